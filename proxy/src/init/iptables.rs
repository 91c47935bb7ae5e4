//! Running `iptables-save` / `iptables-restore` (and the `ip6tables` twins) of one
//! backend in the current network namespace, and turning their failures into errors that
//! say what is missing: the binary, or the privilege.
//!
//! This module reads and writes only what it is given; which rules to write is decided
//! in `rules`.

use std::io::{self, Write};
use std::process::{Command, Stdio};

use super::cidr::Family;

/// Which iptables implementation to drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `iptables-nft`: the nf_tables kernel API with iptables syntax.
    Nft,
    /// `iptables-legacy`: the older x_tables kernel API.
    Legacy,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Nft => "iptables-nft",
            Backend::Legacy => "iptables-legacy",
        }
    }
}

/// The save and restore programs of one backend for one family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tables {
    pub backend: Backend,
    pub family: Family,
}

/// Why an iptables program could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    #[error("{program} not found on PATH: install iptables (it provides {program})")]
    NotFound { program: &'static str },
    #[error(
        "{program} was refused ({detail}): `trellis-proxy init` needs root or the NET_ADMIN \
         capability in the pod's network namespace"
    )]
    Permission {
        program: &'static str,
        detail: String,
    },
    #[error("{program} failed ({status}): {detail}")]
    Failed {
        program: &'static str,
        status: String,
        detail: String,
    },
    #[error("could not run {program}: {source}")]
    Io {
        program: &'static str,
        source: io::Error,
    },
}

impl Tables {
    pub fn new(backend: Backend, family: Family) -> Tables {
        Tables { backend, family }
    }

    pub fn save_program(self) -> &'static str {
        match (self.backend, self.family) {
            (Backend::Nft, Family::V4) => "iptables-nft-save",
            (Backend::Nft, Family::V6) => "ip6tables-nft-save",
            (Backend::Legacy, Family::V4) => "iptables-legacy-save",
            (Backend::Legacy, Family::V6) => "ip6tables-legacy-save",
        }
    }

    pub fn restore_program(self) -> &'static str {
        match (self.backend, self.family) {
            (Backend::Nft, Family::V4) => "iptables-nft-restore",
            (Backend::Nft, Family::V6) => "ip6tables-nft-restore",
            (Backend::Legacy, Family::V4) => "iptables-legacy-restore",
            (Backend::Legacy, Family::V6) => "ip6tables-legacy-restore",
        }
    }

    /// The nat table as `iptables-save -t nat` prints it. Also the probe of whether this
    /// backend works here at all.
    pub fn save_nat(self) -> Result<String, IptablesError> {
        self.save_table("nat")
    }

    /// The filter table as `iptables-save -t filter` prints it; empty when the legacy
    /// backend has none (reading it would create it).
    pub fn save_filter(self) -> Result<String, IptablesError> {
        if self.backend == Backend::Legacy && !legacy_table_exists(self.family, "filter") {
            return Ok(String::new());
        }
        self.save_table("filter")
    }

    fn save_table(self, table: &str) -> Result<String, IptablesError> {
        let program = self.save_program();
        let mut command = Command::new(program);
        command.args(["-t", table]).stdin(Stdio::null());
        let output = command
            .output()
            .map_err(|source| spawn_error(program, source))?;
        if !output.status.success() {
            return Err(failure(program, &output, None));
        }
        String::from_utf8(output.stdout).map_err(|_| IptablesError::Failed {
            program,
            status: "ok".into(),
            detail: "its output is not UTF-8".into(),
        })
    }

    /// Feeds `input` to `iptables-restore --noflush`. iptables-nft applies it all or
    /// nothing; iptables-legacy commits each table at its `COMMIT`, so when a later table
    /// fails the earlier ones stay changed.
    pub fn restore(self, input: &str) -> Result<(), IptablesError> {
        let program = self.restore_program();
        let mut command = Command::new(program);
        command.arg("--noflush");
        if self.backend == Backend::Legacy {
            // Legacy serialises writers through one lock file for all namespaces; wait
            // for it rather than fail when another namespace is being set up.
            command.arg("--wait=10");
        }
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .map_err(|source| spawn_error(program, source))?;
        let written = child
            .stdin
            .take()
            .map(|mut stdin| stdin.write_all(input.as_bytes()));
        let output = child
            .wait_with_output()
            .map_err(|source| IptablesError::Io { program, source })?;
        if !output.status.success() {
            return Err(failure(program, &output, Some(input)));
        }
        if let Some(Err(source)) = written {
            return Err(IptablesError::Io { program, source });
        }
        Ok(())
    }
}

fn spawn_error(program: &'static str, source: io::Error) -> IptablesError {
    match source.kind() {
        io::ErrorKind::NotFound => IptablesError::NotFound { program },
        io::ErrorKind::PermissionDenied => IptablesError::Permission {
            program,
            detail: source.to_string(),
        },
        _ => IptablesError::Io { program, source },
    }
}

fn failure(
    program: &'static str,
    output: &std::process::Output,
    input: Option<&str>,
) -> IptablesError {
    let stderr = String::from_utf8_lossy(&output.stderr);
    let mut detail = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("Try `"))
        .collect::<Vec<_>>()
        .join("; ");
    if is_permission_problem(&detail) {
        return IptablesError::Permission { program, detail };
    }
    // iptables-restore names the line it choked on; show that line and its table, not
    // just its number: legacy commits table by table, so which table failed matters.
    if let Some((table, line)) = input.and_then(|input| failed_line(&detail, input)) {
        if line == "COMMIT" {
            detail.push_str(&format!(" (committing the {table} table)"));
        } else {
            detail.push_str(&format!(" (the line was {line:?}, in the {table} table)"));
        }
    }
    if detail.is_empty() {
        detail = "no message".into();
    }
    IptablesError::Failed {
        program,
        status: output.status.to_string(),
        detail,
    }
}

/// Whether an iptables message means "you may not": not root, or no NET_ADMIN.
pub fn is_permission_problem(message: &str) -> bool {
    let message = message.to_ascii_lowercase();
    [
        "permission denied",
        "you must be root",
        "operation not permitted",
    ]
    .iter()
    .any(|needle| message.contains(needle))
        || (message.contains("can't initialize") || message.contains("cannot initialize"))
            && !message.contains("table `")
}

/// The table and the text of the input line an iptables-restore message names: a line it
/// could not parse (`Error occurred at line: N`) or a `COMMIT` the kernel refused
/// (`line N failed`).
fn failed_line<'a>(detail: &str, input: &'a str) -> Option<(&'a str, &'a str)> {
    let number = line_number(detail, "Error occurred at line: ", "")
        .or_else(|| line_number(detail, "line ", " failed"))?;
    let mut table = None;
    for line in input.lines().take(number.checked_sub(1)?) {
        if let Some(name) = line.strip_prefix('*') {
            table = Some(name);
        }
    }
    Some((table?, input.lines().nth(number - 1)?))
}

/// The number `detail` gives between `before` and `after`, at the first place it does.
fn line_number(detail: &str, before: &str, after: &str) -> Option<usize> {
    detail.match_indices(before).find_map(|(at, _)| {
        let rest = &detail[at + before.len()..];
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        let number = rest[..digits].parse().ok()?;
        rest[digits..].starts_with(after).then_some(number)
    })
}

/// Whether this network namespace has a legacy (x_tables) IPv4 nat table, read without
/// running iptables-legacy, which would create one.
pub fn legacy_nat_exists() -> bool {
    legacy_table_exists(Family::V4, "nat")
}

/// Whether this network namespace has a legacy (x_tables) table of that name.
fn legacy_table_exists(family: Family, table: &str) -> bool {
    let names = match family {
        Family::V4 => "/proc/net/ip_tables_names",
        Family::V6 => "/proc/net/ip6_tables_names",
    };
    std::fs::read_to_string(names).is_ok_and(|names| names.lines().any(|name| name.trim() == table))
}

/// Whether this network namespace has IPv6 at all: the kernel has it and it is not
/// disabled here (`net.ipv6.conf.all.disable_ipv6`, which is per namespace).
pub fn namespace_has_ipv6() -> bool {
    std::path::Path::new("/proc/net/if_inet6").exists()
        && std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6")
            .is_ok_and(|v| v.trim() == "0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_what_iptables_says_without_privilege() {
        assert!(is_permission_problem(
            "iptables-nft-save v1.8.9 (nf_tables): Could not fetch rule set generation id: \
             Permission denied (you must be root)"
        ));
        assert!(is_permission_problem(
            "iptables-save v1.8.9 (legacy): Cannot initialize: Permission denied (you must be root)"
        ));
        assert!(is_permission_problem(
            "iptables v1.6.1: can't initialize iptables table `nat': Permission denied"
        ));
        assert!(!is_permission_problem(
            "iptables-restore v1.8.9 (legacy): Couldn't load target `NOPE':No such file or directory"
        ));
    }

    #[test]
    fn a_failed_restore_names_the_line_and_its_table() {
        let input = "*nat\n:TRELLIS_OUTPUT - [0:0]\n-A TRELLIS_OUTPUT -j NOPE\nCOMMIT\n";
        let detail = "iptables-restore v1.8.9 (legacy): Couldn't load target `NOPE'; \
                      Error occurred at line: 3";
        assert_eq!(
            failed_line(detail, input),
            Some(("nat", "-A TRELLIS_OUTPUT -j NOPE"))
        );
        assert_eq!(failed_line("other", input), None);

        let both = format!("{input}*filter\n-A OUTPUT -m owner --uid-owner 0 -j DROP\nCOMMIT\n");
        let refused = "iptables-restore: line 7 failed";
        assert_eq!(failed_line(refused, &both), Some(("filter", "COMMIT")));
        let error = failure(
            "iptables-legacy-restore",
            &std::process::Output {
                status: std::os::unix::process::ExitStatusExt::from_raw(1 << 8),
                stdout: Vec::new(),
                stderr: refused.as_bytes().to_vec(),
            },
            Some(&both),
        );
        assert_eq!(
            error.to_string(),
            "iptables-legacy-restore failed (exit status: 1): iptables-restore: line 7 failed \
             (committing the filter table)"
        );
    }

    #[test]
    fn program_names_follow_backend_and_family() {
        let v6 = Tables::new(Backend::Legacy, Family::V6);
        assert_eq!(v6.save_program(), "ip6tables-legacy-save");
        assert_eq!(v6.restore_program(), "ip6tables-legacy-restore");
        let v4 = Tables::new(Backend::Nft, Family::V4);
        assert_eq!(v4.restore_program(), "iptables-nft-restore");
    }
}
