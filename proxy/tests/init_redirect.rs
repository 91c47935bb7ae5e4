//! `trellis-proxy init` redirects for real: a pod namespace and a peer namespace joined by a
//! veth pair, listeners standing in for the sidecar's ports and the app, and connections
//! from both sides, IPv4 and (where the namespace has it) IPv6. And that a pod never starts
//! with half its interception: a table that fails leaves the others as they were.
//!
//! Needs root, `ip` (iproute2) and iptables; writes `skipped: needs root` or
//! `skipped: iptables not installed` to stderr and passes otherwise, except
//! under CI (`CI` set), where it fails. Every namespace is the test's
//! own (`trellis-init-<pid>-<n>`) and removed afterwards, even when the test fails.

mod common;

use common::init::{
    self, WITH_PATH, can_run, connect, ipv6_usable, nat_of, ok, on_path, send_udp, serve,
    serve_udp, table_of, text,
};
use common::netns::Netns;

/// A peer namespace joined to `pod` by a veth pair, `eth0` on both sides, each side with
/// its addresses (IPv6 ones usable at once: no duplicate address detection) and up.
fn peer_of(pod: &Netns, pod_addresses: &[&str], peer_addresses: &[&str]) -> Netns {
    let peer = Netns::new("init");
    pod.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &peer.name,
    ]);
    for (ns, addresses) in [(pod, pod_addresses), (&peer, peer_addresses)] {
        for address in addresses {
            let mut add = vec!["addr", "add", address, "dev", "eth0"];
            if address.contains(':') {
                add.push("nodad");
            }
            ns.ip(&add);
        }
        ns.ip(&["link", "set", "eth0", "up"]);
    }
    peer
}

#[test]
fn redirects_reach_the_sidecar_ports_and_keep_the_original_destination() {
    if !can_run() {
        return;
    }
    let pod = Netns::new("init");
    let six = ipv6_usable(&pod);
    let families = |addresses: [&'static str; 2]| -> Vec<&'static str> {
        addresses
            .into_iter()
            .filter(|a| six || !a.contains(':'))
            .collect()
    };
    let peer = peer_of(
        &pod,
        &families(["192.0.2.1/24", "fd00:7e11::1/64"]),
        &families(["192.0.2.2/24", "fd00:7e11::2/64"]),
    );

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
        // The sidecar forwarding a redirected caller dials the pod's own
        // address and the original port: it reaches the app, never its own
        // inbound listener again.
        (&pod, "192.0.2.1:7070", Some(1337), "app", ""),
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
            (&pod, "[fd00:7e11::1]:7070", None, "app", ""),
            (&pod, "[fd00:7e11::1]:7070", Some(1337), "app", ""),
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

/// DNS bypasses the sidecar only towards the pod's nameservers; port 53 of any other host
/// is redirected like any port. Under outbound deny UDP leaving the pod is dropped, except
/// DNS to the nameservers and the proxy's own; under passthrough it passes.
#[test]
fn dns_goes_direct_only_to_the_nameservers_and_outbound_deny_drops_other_udp() {
    if !can_run() {
        return;
    }
    let pod = Netns::new("init");
    // The peer is both the nameserver (.2) and another host (.3).
    let peer = peer_of(&pod, &["192.0.2.1/24"], &["192.0.2.2/24", "192.0.2.3/24"]);
    let resolv = std::env::temp_dir().join(format!("trellis-resolv-{}", pod.name));
    std::fs::write(
        &resolv,
        "search default.svc.cluster.local\nnameserver 192.0.2.2\noptions ndots:5\n",
    )
    .unwrap();
    let resolv_path = resolv.to_str().unwrap().to_owned();
    let _outbound = serve(&pod, 15001, "outbound");
    let _tcp_dns = serve(&peer, 53, "remote-dns");
    let _udp_dns = serve_udp(&peer, 53, "remote-dns");
    let _quic = serve_udp(&peer, 443, "remote-quic");

    let deny = [
        "--exclude-outbound-dns",
        "--resolv-conf",
        &resolv_path,
        "--outbound-policy",
        "deny",
    ];
    let installed = pod.init(&deny);
    std::fs::remove_file(&resolv).unwrap();
    ok(&installed);

    let tcp = |to: &str, uid| connect(&pod, to, uid);
    let udp = |to: &str, uid| send_udp(&pod, to, uid);
    let cases = [
        ("tcp", tcp("192.0.2.2:53", None), "remote-dns "),
        ("tcp", tcp("192.0.2.3:53", None), "outbound "),
        ("udp", udp("192.0.2.2:53", None), "remote-dns local=53"),
        (
            "udp",
            udp("192.0.2.3:53", None),
            "error: Operation not permitted",
        ),
        (
            "udp",
            udp("192.0.2.3:443", None),
            "error: Operation not permitted",
        ),
        (
            "udp",
            udp("192.0.2.3:443", Some(1337)),
            "remote-quic local=443",
        ),
    ];
    let failures: Vec<String> = cases
        .iter()
        .filter(|(_, got, wanted)| !got.starts_with(wanted))
        .map(|(proto, got, wanted)| format!("{proto}: wanted {wanted:?}, got {got:?}"))
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The redirected one kept its destination for the sidecar.
    assert!(
        tcp("192.0.2.3:53", None).contains("orig=192.0.2.3:53"),
        "port 53 of another host should reach the sidecar"
    );

    // Passthrough leaves UDP alone again.
    ok(&pod.init(&["--outbound-policy", "passthrough"]));
    let reply = udp("192.0.2.3:443", None);
    assert!(reply.starts_with("remote-quic local=443"), "{reply}");
}

/// iptables-legacy commits its input table by table: when the filter table (outbound deny's
/// UDP chain) fails, the nat table committed before it is put back, so a pod never starts
/// with half its interception and a retry of init finds what was there before.
#[test]
fn a_failed_filter_table_leaves_the_nat_table_as_it_was() {
    if !can_run() {
        return;
    }
    let pod = Netns::new("init");
    let programs = ["iptables-legacy-save", "iptables-legacy-restore", "sed"].map(on_path);
    let ([Some(save), Some(restore), Some(sed)], Some(_)) =
        (programs, nat_of(&pod, "iptables-legacy-save"))
    else {
        common::machine::note("skipped: iptables-legacy does not work here");
        return;
    };
    // A PATH whose iptables-legacy-restore is the real one given a filter chain that ends
    // in a target it does not know, which it refuses once it has committed the nat table.
    let bin = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(save, bin.path().join("iptables-legacy-save")).unwrap();
    let failing = bin.path().join("iptables-legacy-restore");
    let script = format!(
        "#!/bin/sh\n{} 's/^-A TRELLIS_OUT_UDP -j DROP$/-A TRELLIS_OUT_UDP -j SIMULATED_FAILURE/' \
         | {} \"$@\"\n",
        sed.display(),
        restore.display()
    );
    std::fs::write(&failing, script).unwrap();
    std::fs::set_permissions(
        &failing,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    fn legacy<'a>(args: &[&'a str]) -> Vec<&'a str> {
        [&["--backend", "legacy", "--ipv6", "off"][..], args].concat()
    }
    let failing_init = |args: &[&str]| {
        pod.child("init", &legacy(args))
            .env(WITH_PATH, bin.path())
            .output()
            .unwrap()
    };
    let deny = ["--outbound-policy", "deny"];
    let filter = || table_of(&pod, "iptables-legacy-save", "filter").unwrap();

    // Nothing before: nothing after, and the error says which table failed.
    let before = nat_of(&pod, "iptables-legacy-save").unwrap();
    let out = failing_init(&deny);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    let error = stderr.lines().last().unwrap_or_default();
    assert!(
        error.starts_with("error: iptables-legacy-restore failed (exit status: 2): ")
            && error.contains("Couldn't load target `SIMULATED_FAILURE'")
            && error.ends_with(
                "(the line was \"-A TRELLIS_OUT_UDP -j DROP\", in the filter table); the IPv4 \
                 change was reverted, so nothing is left half done"
            ),
        "{stderr}"
    );
    assert_eq!(nat_of(&pod, "iptables-legacy-save").unwrap(), before);
    assert!(!filter().contains("TRELLIS"), "{}", filter());

    // Earlier rules: the very same rules after.
    ok(&pod.init(&legacy(&["--exclude-outbound-ports", "53"])));
    let before = nat_of(&pod, "iptables-legacy-save").unwrap();
    let out = failing_init(&[&deny[..], &["--exclude-outbound-ports", "5432"]].concat());
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert_eq!(nat_of(&pod, "iptables-legacy-save").unwrap(), before);
    assert!(!filter().contains("TRELLIS"), "{}", filter());

    // The pod's own rules after our jumps (a CNI's, say): still after them, in order.
    for rule in [
        ["PREROUTING", "-s", "10.9.0.0/16"],
        ["OUTPUT", "-d", "10.9.9.9/32"],
    ] {
        let added = pod
            .exec("iptables-legacy")
            .args(["-w", "10", "-t", "nat", "-A"])
            .args(rule)
            .args(["-j", "RETURN"])
            .status()
            .unwrap();
        assert!(added.success());
    }
    let before = nat_of(&pod, "iptables-legacy-save").unwrap();
    assert!(
        before.contains("-A OUTPUT -p tcp -j TRELLIS_OUTPUT\n-A OUTPUT -d 10.9.9.9/32 -j RETURN\n"),
        "{before}"
    );
    let out = failing_init(&[&deny[..], &["--exclude-outbound-ports", "5432"]].concat());
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert_eq!(nat_of(&pod, "iptables-legacy-save").unwrap(), before);
    assert!(!filter().contains("TRELLIS"), "{}", filter());

    // The retry that works installs both tables.
    ok(&pod.init(&legacy(&deny)));
    assert!(
        nat_of(&pod, "iptables-legacy-save")
            .unwrap()
            .contains("-A TRELLIS_OUTPUT -p tcp -j TRELLIS_OUT_REDIRECT")
    );
    assert!(
        filter().contains("-A OUTPUT -p udp -j TRELLIS_OUT_UDP"),
        "{}",
        filter()
    );
}

/// Not a test by itself: the child processes' entry ([`init::child_process_entry`]).
#[test]
fn child_process_entry() {
    init::child_process_entry();
}
