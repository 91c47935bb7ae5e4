//! `trellis-proxy init` against real iptables, each test in network namespaces of its
//! own (`trellis-init-<pid>-<n>`), removed afterwards even when the test fails.
//!
//! Needs root, `ip` (iproute2) and iptables; writes `skipped: needs root` or
//! `skipped: iptables not installed` to stderr and passes otherwise, except
//! under CI (`CI` set), where it fails. Nothing here touches the
//! machine's own namespace: rules, addresses and listeners all live in namespaces the test
//! made, and the only addresses used are loopback and ones assigned inside them.
//!
//! Work inside a namespace runs in a child process (see `common::init`).

mod common;

use common::init::{
    self, AS_UID, WITH_PATH, can_run, ipv6_usable, lines_with, nat_of, ok, on_path, text,
};
use common::netns::Netns;
use std::path::{Path, PathBuf};
use trellis_proxy::init::Family;

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

    // What it did is said plainly, without the program's name.
    let said = |out: &std::process::Output, line: &str| {
        ok(out);
        let stderr = text(&out.stderr);
        assert!(stderr.lines().any(|l| l.starts_with(line)), "{stderr}");
    };
    said(&ns.init(&[]), "IPv4 rules installed (iptables-");
    assert!(ns.nat(Family::V4).contains("TRELLIS"));
    said(&ns.init(&["--cleanup"]), "IPv4 rules removed (iptables-");
    let after = (ns.nat(Family::V4), ns.nat(Family::V6));
    assert!(
        !after.0.contains("TRELLIS") && !after.1.contains("TRELLIS"),
        "{after:?}"
    );
    assert_eq!(after, before);

    // Nothing left: a second cleanup is a successful no-op.
    said(&ns.init(&["--cleanup"]), "IPv4: nothing of ours to remove");
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

#[test]
fn legacy_backend_works_alike() {
    if !can_run() {
        return;
    }
    let ns = Netns::new("init");
    if nat_of(&ns, "iptables-legacy-save").is_none() {
        common::machine::note("skipped: iptables-legacy does not work here");
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
        common::machine::note("skipped: cannot disable IPv6 in the namespace");
        return;
    }
    let out = ns.init(&[]);
    ok(&out);
    assert!(ns.nat(Family::V4).contains("TRELLIS_OUTPUT"));
    if ipv6_usable(&ns) {
        assert!(!ns.nat(Family::V6).contains("TRELLIS"));
    }
}

/// Where each of `programs` is on the PATH, when iptables-nft works in `ns` and so does
/// IPv6; `None`, noted as a skip, otherwise.
fn nft_with_ipv6<const N: usize>(ns: &Netns, programs: [&str; N]) -> Option<[PathBuf; N]> {
    let found = programs.map(on_path);
    if found.iter().all(Option::is_some)
        && ipv6_usable(ns)
        && nat_of(ns, "iptables-nft-save").is_some()
    {
        Some(found.map(Option::unwrap))
    } else {
        common::machine::note("skipped: needs iptables-nft with IPv6");
        None
    }
}

/// A shell script at `path` running `body`, executable.
fn write_script(path: &Path, body: &str) {
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
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
    let Some(found) = nft_with_ipv6(&ns, programs) else {
        return;
    };
    // A PATH where everything works except ip6tables-nft-restore.
    let bin = tempfile::tempdir().unwrap();
    for (name, target) in programs.iter().zip(found) {
        std::os::unix::fs::symlink(target, bin.path().join(name)).unwrap();
    }
    write_script(
        &bin.path().join("ip6tables-nft-restore"),
        "echo 'simulated failure' >&2\nexit 1",
    );
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

    // The pod's own rules after our jumps (a CNI's, say): still after them, in order.
    ns.restore(
        Family::V4,
        "*nat\n-A PREROUTING -s 10.9.0.0/16 -j RETURN\n\
         -A OUTPUT -d 10.9.9.9/32 -j RETURN\nCOMMIT\n",
    );
    let before = ns.nat(Family::V4);
    let after_ours = |table: &str, ours: &str, theirs: &str| {
        let at = |rule: &str| table.lines().position(|l| l == rule).unwrap();
        at(ours) < at(theirs)
    };
    assert!(
        after_ours(
            &before,
            "-A OUTPUT -p tcp -j TRELLIS_OUTPUT",
            "-A OUTPUT -d 10.9.9.9/32 -j RETURN"
        ) && after_ours(
            &before,
            "-A PREROUTING -p tcp -j TRELLIS_INBOUND",
            "-A PREROUTING -s 10.9.0.0/16 -j RETURN"
        ),
        "{before}"
    );
    let out = failing_init(&["--exclude-outbound-ports", "5432"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert_eq!(ns.nat(Family::V4), before);
}

/// When a family cannot be put back, the others still are, and the error says which were
/// and which were not, and what to do: the namespace may hold half our rules.
#[test]
fn a_revert_that_fails_for_one_family_still_reverts_the_other_and_says_so() {
    if !can_run() {
        return;
    }
    let ns = Netns::new("init");
    let programs = [
        "iptables-nft-save",
        "iptables-nft-restore",
        "ip6tables-nft-save",
        "ip6tables-nft-restore",
    ];
    let Some([save4, restore4, save6, restore6]) = nft_with_ipv6(&ns, programs) else {
        return;
    };
    // A PATH where the IPv4 change works and putting it back does not, and the IPv6
    // change is made but reported failed, and putting it back works.
    let bin = tempfile::tempdir().unwrap();
    for (name, target) in [("iptables-nft-save", save4), ("ip6tables-nft-save", save6)] {
        std::os::unix::fs::symlink(target, bin.path().join(name)).unwrap();
    }
    let script = |name: &str, first: String, second: String| {
        let calls = bin.path().join(format!("{name}.calls"));
        let body = format!(
            "if [ -e {calls} ]; then\n{second}\nelse\n: > {calls}\n{first}\nfi",
            calls = calls.display()
        );
        write_script(&bin.path().join(name), &body);
    };
    script(
        "iptables-nft-restore",
        format!("exec {} \"$@\"", restore4.display()),
        "echo 'simulated revert failure' >&2; exit 4".into(),
    );
    script(
        "ip6tables-nft-restore",
        format!(
            "{} \"$@\"; echo 'simulated failure' >&2; exit 1",
            restore6.display()
        ),
        format!("exec {} \"$@\"", restore6.display()),
    );

    let before = (ns.nat(Family::V4), ns.nat(Family::V6));
    let out = ns
        .child("init", &["--backend", "nft", "--ipv6", "on"])
        .env(WITH_PATH, bin.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert_eq!(
        stderr.lines().last().unwrap_or_default(),
        "error: ip6tables-nft-restore failed (exit status: 1): simulated failure; the IPv6 \
         change was reverted, but reverting the IPv4 change failed too (iptables-nft-restore \
         failed (exit status: 4): simulated revert failure): the pod's IPv4 rules may be left \
         half changed, so some of its traffic may bypass the sidecar; delete the pod so that \
         it starts again in a new network namespace",
        "{stderr}"
    );
    assert_eq!(ns.nat(Family::V6), before.1);
    assert_ne!(ns.nat(Family::V4), before.0);
}

/// Not a test by itself: the child processes' entry ([`init::child_process_entry`]).
#[test]
fn child_process_entry() {
    init::child_process_entry();
}
