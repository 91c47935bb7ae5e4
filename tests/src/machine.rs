//! What the machine can do for a test: whether it runs as root, and
//! whether a program is there and runs.
//!
//! The proxy's own tests include this file by path (they cannot depend on
//! this crate, which depends on the proxy): it must use nothing but std.

use std::ffi::OsStr;
use std::process::{Command, Stdio};

/// Whether this process runs as root (its real user id is 0), which
/// `ip netns` and iptables need.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            == Some("0")
    })
}

/// Whether `program` with `args` starts and exits successfully, its output
/// discarded.
pub fn runs(program: impl AsRef<OsStr>, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
