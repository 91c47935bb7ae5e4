//! `trellis-proxy init` against real iptables, each test in network namespaces of its
//! own (`trellis-init-<pid>-<n>`), removed afterwards even when the test fails.
//!
//! Needs root, `ip` (iproute2) and iptables; prints `skipped: needs root` or
//! `skipped: iptables not installed` and passes otherwise. Nothing here touches the
//! machine's own namespace: rules, addresses and listeners all live in namespaces the test
//! made, and the only addresses used are loopback and ones assigned inside them.
//!
//! Work inside a namespace runs in a child process: `ip netns exec NS <exe> ...`, where
//! `<exe>` is the `trellis-proxy` binary (`init ...`) when it dispatches the subcommand, and
//! otherwise this test executable re-run as [`child_process_entry`], which calls the
//! library's `init::run` (and also serves as listener and client for the redirect test).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use clap::Parser;
use common::netns::{Netns, is_root};
use trellis_proxy::init::{Family, InitArgs};

const ROLE: &str = "TRELLIS_INIT_TEST_ROLE";
const ARGS: &str = "TRELLIS_INIT_TEST_ARGS";
const AS_UID: &str = "TRELLIS_INIT_TEST_UID";
const WITH_PATH: &str = "TRELLIS_INIT_TEST_PATH";
const SEP: char = '\u{1f}';

// ---------------------------------------------------------------------------------------
// Preconditions and namespaces

fn runs(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether this machine can run the tests; says why not when it cannot.
fn can_run() -> bool {
    if !is_root() {
        println!("skipped: needs root");
        return false;
    }
    let iptables = ["iptables-nft-save", "iptables-legacy-save"]
        .iter()
        .any(|p| runs(p, &["--version"]) || runs(p, &["-V"]));
    if !iptables {
        println!("skipped: iptables not installed");
        return false;
    }
    if !runs("ip", &["-V"]) {
        println!("skipped: iproute2 not installed");
        return false;
    }
    true
}

/// What these tests do in a namespace of their own.
impl Netns {
    /// Runs `trellis-proxy init ARGS` inside the namespace.
    fn init(&self, args: &[&str]) -> Output {
        match proxy_binary_with_init() {
            Some(binary) => self.exec(binary).arg("init").args(args).output().unwrap(),
            None => self.child("init", args).output().unwrap(),
        }
    }

    /// This test executable, inside the namespace, as [`child_process_entry`] in `role`.
    fn child(&self, role: &str, args: &[&str]) -> Command {
        let exe = std::env::current_exe().unwrap();
        let mut command = self.exec(exe.to_str().unwrap());
        command
            .args([
                "child_process_entry",
                "--exact",
                "--nocapture",
                "--test-threads=1",
                "-q",
            ])
            .env(ROLE, role)
            .env(ARGS, args.join(&SEP.to_string()));
        command
    }

    /// The nat table as the backend `init` picks (nft where it works) prints it, without
    /// the comment lines that carry timestamps.
    fn nat(&self, family: Family) -> String {
        let prefix = match family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        for backend in ["nft", "legacy"] {
            let out = self
                .exec(&format!("{prefix}-{backend}-save"))
                .args(["-t", "nat"])
                .output();
            if let Some(out) = out.ok().filter(|o| o.status.success()) {
                return text(&out.stdout)
                    .lines()
                    .filter(|l| !l.starts_with('#'))
                    .map(|l| format!("{l}\n"))
                    .collect();
            }
        }
        panic!("no {prefix}-save works in {}", self.name);
    }

    /// Feeds `input` to the restore program of the backend `init` picks.
    fn restore(&self, family: Family, input: &str) {
        let prefix = match family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        let backend = if runs(&format!("{prefix}-nft-save"), &["-V"]) {
            "nft"
        } else {
            "legacy"
        };
        let mut child = self
            .exec(&format!("{prefix}-{backend}-restore"))
            .arg("--noflush")
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success());
    }
}

/// A process this test started; killed (by its own id) when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The `trellis-proxy` binary, if it already dispatches `init`.
fn proxy_binary_with_init() -> Option<&'static str> {
    let binary = env!("CARGO_BIN_EXE_trellis-proxy");
    let help = Command::new(binary)
        .args(["init", "--help"])
        .output()
        .ok()?;
    (help.status.success() && text(&help.stdout).contains("--proxy-uid")).then_some(binary)
}

fn ipv6_usable(ns: &Netns) -> bool {
    ns.exec("ip6tables-nft-save")
        .args(["-t", "nat"])
        .output()
        .is_ok_and(|o| o.status.success())
        || ns
            .exec("ip6tables-legacy-save")
            .args(["-t", "nat"])
            .output()
            .is_ok_and(|o| o.status.success())
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "init failed ({}): {}{}",
        out.status,
        text(&out.stderr),
        text(&out.stdout)
    );
    text(&out.stdout)
}

fn lines_with(table: &str, needle: &str) -> Vec<String> {
    table
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_owned)
        .collect()
}

// ---------------------------------------------------------------------------------------
// Rules as iptables-save shows them

const V4_RULES: [&str; 10] = [
    "-A PREROUTING -p tcp -j TRELLIS_INBOUND",
    "-A OUTPUT -p tcp -j TRELLIS_OUTPUT",
    "-A TRELLIS_INBOUND -p tcp -m tcp --dport 15020 -j RETURN",
    "-A TRELLIS_INBOUND -p tcp -j TRELLIS_IN_REDIRECT",
    "-A TRELLIS_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
    "-A TRELLIS_OUTPUT -m owner --uid-owner 1337 -j RETURN",
    "-A TRELLIS_OUTPUT -o lo -j RETURN",
    "-A TRELLIS_OUTPUT -d 127.0.0.0/8 -j RETURN",
    "-A TRELLIS_OUTPUT -p tcp -j TRELLIS_OUT_REDIRECT",
    "-A TRELLIS_OUT_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
];

#[test]
fn init_installs_our_chains_and_one_jump_each() {
    if !can_run() {
        return;
    }
    let ns = Netns::new("init");
    ok(&ns.init(&[]));

    let v4 = ns.nat(Family::V4);
    let ours: Vec<String> = v4
        .lines()
        .filter(|l| l.starts_with("-A") && l.contains("TRELLIS"))
        .map(str::to_owned)
        .collect();
    assert_eq!(ours, V4_RULES, "{v4}");
    for chain in [
        "TRELLIS_INBOUND",
        "TRELLIS_IN_REDIRECT",
        "TRELLIS_OUTPUT",
        "TRELLIS_OUT_REDIRECT",
    ] {
        assert!(
            v4.contains(&format!(":{chain} - [0:0]")),
            "{chain} missing:\n{v4}"
        );
    }

    if ipv6_usable(&ns) {
        let v6 = ns.nat(Family::V6);
        assert_eq!(lines_with(&v6, "-j TRELLIS_INBOUND").len(), 1, "{v6}");
        assert_eq!(
            lines_with(&v6, "-A OUTPUT -p tcp -j TRELLIS_OUTPUT").len(),
            1,
            "{v6}"
        );
        assert!(
            v6.contains("-A TRELLIS_OUTPUT -d ::1/128 -j RETURN"),
            "{v6}"
        );
        assert!(v6.contains("-A TRELLIS_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006"));
        assert!(!v6.contains("127.0.0.0/8"), "{v6}");
    }
}

#[test]
fn init_twice_gives_identical_rules() {
    if !can_run() {
        return;
    }
    let ns = Netns::new("init");
    let flags = ["--exclude-outbound-ports", "53", "--proxy-gid", "1337"];
    ok(&ns.init(&flags));
    let first = (ns.nat(Family::V4), ns.nat(Family::V6));
    ok(&ns.init(&flags));
    let second = (ns.nat(Family::V4), ns.nat(Family::V6));
    assert_eq!(first, second);
    assert_eq!(lines_with(&second.0, "-j TRELLIS_INBOUND").len(), 1);
    assert_eq!(lines_with(&second.0, "-j TRELLIS_OUTPUT").len(), 1);

    // Changed flags replace the chain contents; the jumps stay single.
    ok(&ns.init(&["--exclude-outbound-ports", "5432"]));
    let third = ns.nat(Family::V4);
    assert!(
        third.contains("--dport 5432 -j RETURN") && !third.contains("--dport 53 "),
        "{third}"
    );
    assert!(!third.contains("--gid-owner"), "{third}");
    assert_eq!(lines_with(&third, "-j TRELLIS_OUTPUT").len(), 1);
}

#[test]
fn exclusions_are_split_by_family() {
    if !can_run() {
        return;
    }
    let ns = Netns::new("init");
    ok(&ns.init(&[
        "--exclude-ports",
        "22,15020",
        "--exclude-outbound-cidrs",
        "10.1.0.0/16,fd00:7e11::/32",
        "--inbound-port",
        "16006",
    ]));
    let v4 = ns.nat(Family::V4);
    assert!(
        v4.contains("-A TRELLIS_INBOUND -p tcp -m tcp --dport 22 -j RETURN"),
        "{v4}"
    );
    assert!(
        v4.contains("-A TRELLIS_OUTPUT -d 10.1.0.0/16 -j RETURN"),
        "{v4}"
    );
    assert!(v4.contains("-j REDIRECT --to-ports 16006"), "{v4}");
    assert!(!v4.contains("fd00"), "{v4}");
    if ipv6_usable(&ns) {
        let v6 = ns.nat(Family::V6);
        assert!(
            v6.contains("-A TRELLIS_OUTPUT -d fd00:7e11::/32 -j RETURN"),
            "{v6}"
        );
        assert!(!v6.contains("10.1.0.0"), "{v6}");
    }
}

#[test]
fn dry_run_prints_the_rules_and_changes_nothing() {
    if !can_run() {
        return;
    }
    let ns = Netns::new("init");
    let before = (ns.nat(Family::V4), ns.nat(Family::V6));
    let printed = ok(&ns.init(&["--dry-run"]));
    for rule in V4_RULES {
        assert!(printed.contains(rule), "{rule} not printed:\n{printed}");
    }
    assert!(
        printed.contains("*nat") && printed.contains("COMMIT"),
        "{printed}"
    );
    assert_eq!((ns.nat(Family::V4), ns.nat(Family::V6)), before);

    let printed = ok(&ns.init(&["--dry-run", "--cleanup"]));
    assert!(printed.contains("nothing of ours to remove"), "{printed}");
}

#[test]
fn cleanup_removes_ours_and_nothing_else() {
    if !can_run() {
        return;
    }
    let ns = Netns::new("init");
    // Someone else's chain and jump, which must survive.
    ns.restore(
        Family::V4,
        "*nat\n:OTHER - [0:0]\n-A OTHER -p tcp -j RETURN\n-A OUTPUT -d 192.0.2.9/32 -j OTHER\nCOMMIT\n",
    );
    let before = (ns.nat(Family::V4), ns.nat(Family::V6));

    ok(&ns.init(&[]));
    assert!(ns.nat(Family::V4).contains("TRELLIS"));
    let out = ns.init(&["--cleanup"]);
    ok(&out);
    let after = (ns.nat(Family::V4), ns.nat(Family::V6));
    assert!(
        !after.0.contains("TRELLIS") && !after.1.contains("TRELLIS"),
        "{after:?}"
    );
    assert_eq!(after, before);

    // Nothing left: a second cleanup is a successful no-op.
    ok(&ns.init(&["--cleanup"]));
    assert_eq!((ns.nat(Family::V4), ns.nat(Family::V6)), before);
}

#[test]
fn without_net_admin_init_says_what_is_missing() {
    if !can_run() {
        return;
    }
    let ns = Netns::new("init");
    let out = ns.child("init", &[]).env(AS_UID, "65534").output().unwrap();
    assert_eq!(out.status.code(), Some(77), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("needs root or the NET_ADMIN capability"),
        "{stderr}"
    );
}

#[test]
fn without_iptables_init_says_which_program_is_missing() {
    if !can_run() {
        return;
    }
    let ns = Netns::new("init");
    let empty = tempfile::tempdir().unwrap();
    let out = ns
        .child("init", &[])
        .env(WITH_PATH, empty.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("iptables-nft-save not found"), "{stderr}");
    assert!(stderr.contains("install iptables"), "{stderr}");
}

/// The nat table as one backend's save program prints it, without comment lines.
fn nat_of(ns: &Netns, program: &str) -> Option<String> {
    let out = ns.exec(program).args(["-t", "nat"]).output().ok()?;
    out.status.success().then(|| {
        text(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect()
    })
}

#[test]
fn legacy_backend_works_alike() {
    if !can_run() {
        return;
    }
    let ns = Netns::new("init");
    if nat_of(&ns, "iptables-legacy-save").is_none() {
        println!("skipped: iptables-legacy does not work here");
        return;
    }
    ok(&ns.init(&["--backend", "legacy", "--ipv6", "off"]));
    let first = nat_of(&ns, "iptables-legacy-save").unwrap();
    let ours: Vec<&str> = first
        .lines()
        .filter(|l| l.starts_with("-A") && l.contains("TRELLIS"))
        .collect();
    assert_eq!(ours, V4_RULES, "{first}");
    ok(&ns.init(&["--backend", "legacy", "--ipv6", "off"]));
    assert_eq!(nat_of(&ns, "iptables-legacy-save").unwrap(), first);

    // `auto` keeps using the backend that holds our rules, for reruns and cleanup.
    if nat_of(&ns, "iptables-nft-save").is_some() {
        let out = ns.init(&["--ipv6", "off"]);
        assert!(
            text(&out.stderr).contains("iptables-legacy"),
            "{}",
            text(&out.stderr)
        );
        assert_eq!(nat_of(&ns, "iptables-legacy-save").unwrap(), first);
        assert!(
            !nat_of(&ns, "iptables-nft-save")
                .unwrap()
                .contains("TRELLIS")
        );
        ok(&ns.init(&["--ipv6", "off", "--cleanup"]));
    } else {
        ok(&ns.init(&["--backend", "legacy", "--ipv6", "off", "--cleanup"]));
    }
    assert!(
        !nat_of(&ns, "iptables-legacy-save")
            .unwrap()
            .contains("TRELLIS")
    );
}

#[test]
fn ipv6_auto_skips_a_namespace_with_ipv6_disabled() {
    if !can_run() {
        return;
    }
    let ns = Netns::new("init");
    let off = ns
        .exec("sysctl")
        .args(["-qw", "net.ipv6.conf.all.disable_ipv6=1"])
        .status();
    if !off.is_ok_and(|s| s.success()) {
        println!("skipped: cannot disable IPv6 in the namespace");
        return;
    }
    let out = ns.init(&[]);
    ok(&out);
    assert!(ns.nat(Family::V4).contains("TRELLIS_OUTPUT"));
    if ipv6_usable(&ns) {
        assert!(!ns.nat(Family::V6).contains("TRELLIS"));
    }
}

/// Where `program` is on this machine's PATH.
fn on_path(program: &str) -> Option<std::path::PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

#[test]
fn a_failed_ipv6_change_reverts_the_ipv4_one() {
    if !can_run() {
        return;
    }
    let ns = Netns::new("init");
    let programs = [
        "iptables-nft-save",
        "iptables-nft-restore",
        "ip6tables-nft-save",
    ];
    let (Some(found), true) = (
        programs
            .iter()
            .map(|p| on_path(p))
            .collect::<Option<Vec<_>>>(),
        ipv6_usable(&ns) && nat_of(&ns, "iptables-nft-save").is_some(),
    ) else {
        println!("skipped: needs iptables-nft with IPv6");
        return;
    };
    // A PATH where everything works except ip6tables-nft-restore.
    let bin = tempfile::tempdir().unwrap();
    for (name, target) in programs.iter().zip(found) {
        std::os::unix::fs::symlink(target, bin.path().join(name)).unwrap();
    }
    let broken = bin.path().join("ip6tables-nft-restore");
    std::fs::write(&broken, "#!/bin/sh\necho 'simulated failure' >&2\nexit 1\n").unwrap();
    std::fs::set_permissions(&broken, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let failing_init = |args: &[&str]| {
        let mut all = vec!["--backend", "nft", "--ipv6", "on"];
        all.extend_from_slice(args);
        ns.child("init", &all)
            .env(WITH_PATH, bin.path())
            .output()
            .unwrap()
    };

    // Nothing before: nothing after.
    let before = ns.nat(Family::V4);
    let out = failing_init(&[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("simulated failure") && stderr.contains("reverted"),
        "{stderr}"
    );
    assert_eq!(ns.nat(Family::V4), before);

    // Earlier rules: the very same rules after.
    ok(&ns.init(&["--exclude-outbound-ports", "53"]));
    let before = ns.nat(Family::V4);
    let out = failing_init(&["--exclude-outbound-ports", "5432"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert_eq!(ns.nat(Family::V4), before);
}

// ---------------------------------------------------------------------------------------
// Redirection, for real: a pod namespace and a peer namespace joined by a veth pair

/// Starts a listener inside `ns` on `port` (IPv4 and IPv6) that answers every connection
/// with `NAME local=ADDR orig=ADDR`.
fn serve(ns: &Netns, port: u16, name: &str) -> Running {
    let mut child = ns
        .child("serve", &[&port.to_string(), name])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let running = Running(child);
    loop {
        match lines.next() {
            Some(Ok(line)) if line == "ready" => break,
            Some(Ok(_)) => continue,
            other => panic!("listener {name} on {port} did not start: {other:?}"),
        }
    }
    running
}

/// Connects from inside `ns` (as `uid` when given) and returns what the server said.
fn connect(ns: &Netns, to: &str, uid: Option<u32>) -> String {
    let mut command = ns.child("connect", &[to]);
    if let Some(uid) = uid {
        command.env(AS_UID, uid.to_string());
    }
    let out = command.output().unwrap();
    text(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("reply: "))
        .map(str::to_owned)
        .unwrap_or_else(|| format!("no reply: {}{}", text(&out.stdout), text(&out.stderr)))
}

#[test]
fn redirects_reach_the_sidecar_ports_and_keep_the_original_destination() {
    if !can_run() {
        return;
    }
    let pod = Netns::new("init");
    let peer = Netns::new("init");
    pod.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &peer.name,
    ]);
    let six = ipv6_usable(&pod);
    for (ns, v4, v6) in [
        (&pod, "192.0.2.1/24", "fd00:7e11::1/64"),
        (&peer, "192.0.2.2/24", "fd00:7e11::2/64"),
    ] {
        ns.ip(&["addr", "add", v4, "dev", "eth0"]);
        if six {
            ns.ip(&["addr", "add", v6, "dev", "eth0", "nodad"]);
        }
        ns.ip(&["link", "set", "eth0", "up"]);
    }

    let _inbound = serve(&pod, 15006, "inbound");
    let _outbound = serve(&pod, 15001, "outbound");
    let _admin = serve(&pod, 15020, "admin");
    let _app = serve(&pod, 7070, "app");
    let _remote = serve(&peer, 9090, "remote");

    ok(&pod.init(&[]));

    let mut cases = vec![
        // Inbound to any port lands on the inbound listener, original port kept.
        (
            &peer,
            "192.0.2.1:8080",
            None,
            "inbound",
            "orig=192.0.2.1:8080",
        ),
        (
            &peer,
            "192.0.2.1:7070",
            None,
            "inbound",
            "orig=192.0.2.1:7070",
        ),
        // The admin port is excluded: probes reach it directly.
        (&peer, "192.0.2.1:15020", None, "admin", ""),
        // The app's outbound connection lands on the outbound listener.
        (
            &pod,
            "192.0.2.2:9090",
            None,
            "outbound",
            "orig=192.0.2.2:9090",
        ),
        // The proxy's own (UID 1337) goes out untouched: no loop.
        (&pod, "192.0.2.2:9090", Some(1337), "remote", ""),
        // Loopback and the pod's own address stay inside the pod.
        (&pod, "127.0.0.1:7070", None, "app", ""),
        (&pod, "192.0.2.1:7070", None, "app", ""),
    ];
    if six {
        cases.extend([
            (
                &peer,
                "[fd00:7e11::1]:8080",
                None,
                "inbound",
                "orig=[fd00:7e11::1]:8080",
            ),
            (
                &pod,
                "[fd00:7e11::2]:9090",
                None,
                "outbound",
                "orig=[fd00:7e11::2]:9090",
            ),
            (&pod, "[fd00:7e11::2]:9090", Some(1337), "remote", ""),
            (&pod, "[::1]:7070", None, "app", ""),
        ]);
    }
    let mut failures = Vec::new();
    for (from, to, uid, expect, orig) in cases {
        let reply = connect(from, to, uid);
        println!("{} -> {to} (uid {uid:?}): {reply}", from.name);
        if !reply.starts_with(&format!("{expect} ")) || !reply.contains(orig) {
            failures.push(format!(
                "{} -> {to} (uid {uid:?}): wanted {expect} {orig}, got {reply}",
                from.name
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // After cleanup nothing is redirected any more.
    ok(&pod.init(&["--cleanup"]));
    let reply = connect(&pod, "192.0.2.2:9090", None);
    assert!(reply.starts_with("remote "), "{reply}");
}

// ---------------------------------------------------------------------------------------
// The child process

/// Not a test by itself: the entry point of the child processes above, selected by
/// environment variables. Without them it does nothing.
#[test]
fn child_process_entry() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let args: Vec<String> = std::env::var(ARGS)
        .unwrap_or_default()
        .split(SEP)
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
        .collect();

    // Run the same role again as another user or with another PATH (in the same
    // namespace: `ip` itself must not run with those).
    let uid = std::env::var(AS_UID).ok();
    let path = std::env::var_os(WITH_PATH);
    if uid.is_some() || path.is_some() {
        let mut again = Command::new(std::env::current_exe().unwrap());
        again
            .args(std::env::args().skip(1))
            .env_remove(AS_UID)
            .env_remove(WITH_PATH);
        if let Some(uid) = uid {
            let uid: u32 = uid.parse().unwrap();
            again.uid(uid).gid(uid);
        }
        if let Some(path) = path {
            again.env("PATH", path);
        }
        let status = again.status().unwrap();
        std::process::exit(status.code().unwrap_or(1));
    }

    match role.as_str() {
        "init" => {
            #[derive(Parser)]
            struct Cli {
                #[command(flatten)]
                args: InitArgs,
            }
            let cli = Cli::parse_from(std::iter::once("init".to_owned()).chain(args));
            std::io::stdout().flush().unwrap();
            // What `init::run` does, with the exit code `ExitCode` keeps opaque.
            let code = match trellis_proxy::init::execute(&cli.args, &mut std::io::stdout()) {
                Ok(()) => 0,
                Err(error) => {
                    eprintln!("trellis-proxy init: {error}");
                    i32::from(error.exit_code())
                }
            };
            std::io::stdout().flush().unwrap();
            std::process::exit(code);
        }
        "serve" => serve_forever(args[0].parse().unwrap(), &args[1]),
        "connect" => {
            let to: SocketAddr = args[0].parse().unwrap();
            match talk(to) {
                Ok(reply) => println!("reply: {}", reply.trim()),
                Err(e) => println!("error: {e}"),
            }
            std::process::exit(0);
        }
        other => panic!("unknown role {other}"),
    }
}

fn talk(to: SocketAddr) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    Ok(reply)
}

fn serve_forever(port: u16, name: &str) -> ! {
    use socket2::{Domain, Socket, Type};
    let mut listeners = Vec::new();
    for (domain, addr) in [
        (Domain::IPV4, SocketAddr::from(([0, 0, 0, 0], port))),
        (Domain::IPV6, SocketAddr::from(([0u16; 8], port))),
    ] {
        let socket = Socket::new(domain, Type::STREAM, None).unwrap();
        if domain == Domain::IPV6 {
            socket.set_only_v6(true).unwrap();
        }
        socket.set_reuse_address(true).unwrap();
        // IPv6 may be off in the namespace: serve IPv4 alone then.
        if socket.bind(&addr.into()).is_err() && domain == Domain::IPV6 {
            continue;
        }
        socket.listen(64).unwrap();
        listeners.push((domain, std::net::TcpListener::from(socket)));
    }
    println!("ready");
    std::io::stdout().flush().unwrap();
    let name = name.to_owned();
    let threads: Vec<_> = listeners
        .into_iter()
        .map(|(domain, listener)| {
            let name = name.clone();
            std::thread::spawn(move || {
                for stream in listener.incoming().flatten() {
                    let sock = socket2::SockRef::from(&stream);
                    let orig = if domain == Domain::IPV4 {
                        sock.original_dst_v4()
                    } else {
                        sock.original_dst_v6()
                    };
                    let orig = orig
                        .ok()
                        .and_then(|a| a.as_socket())
                        .map_or("-".to_owned(), |a| a.to_string());
                    let local = stream
                        .local_addr()
                        .map_or("-".to_owned(), |a| a.to_string());
                    let _ = (&stream)
                        .write_all(format!("{name} local={local} orig={orig}\n").as_bytes());
                }
            })
        })
        .collect();
    for thread in threads {
        let _ = thread.join();
    }
    std::process::exit(0);
}
