//! What the machine can do for a test: whether it runs as root, and
//! whether a program is there and runs; and what a test does when it
//! cannot run ([`skip`]).
//!
//! The proxy's and the control plane's own tests include this file by path
//! (they cannot depend on this crate, which depends on both): it must use
//! nothing but std.

use std::ffi::OsStr;
use std::io::Write;
use std::process::{Command, Stdio};

/// Whether the tests run under CI: `CI` is set (`.ci/run` sets it, as CI
/// services do) to anything but empty, `0` or `false`.
pub fn under_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// What a test calls, then returns, when a prerequisite is missing (root,
/// a tool); `reason` reads `skipped: needs root`, `skipped: curl not
/// installed`, ...
///
/// Under CI ([`under_ci`]) it panics with `reason`: CI has every
/// prerequisite, so a test that cannot run there is a broken runner, not a
/// pass. Elsewhere it writes `reason` to the process's stderr directly,
/// where libtest does not capture it (it captures `println!` and
/// `eprintln!` of a passing test), so whoever runs the tests sees which
/// ones did not run.
pub fn skip(reason: &str) {
    if under_ci() {
        panic!("{reason}: under CI every prerequisite must be there, so this test fails");
    }
    note(reason);
}

/// Writes `line` to the process's stderr, uncaptured by libtest, after the
/// test's name (libtest names the thread a test runs on after it), without
/// failing under CI: for a part of a test that does not apply to this
/// machine (no IPv6, say) rather than a missing prerequisite.
pub fn note(line: &str) {
    let line = match std::thread::current().name() {
        Some(test) if test != "main" => format!("{test}: {line}\n"),
        _ => format!("{line}\n"),
    };
    let _ = std::io::stderr().write_all(line.as_bytes());
}

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
