//! Which addresses the sidecar listens on: by default the transparent
//! outbound port on 127.0.0.1 and ::1 and the inbound port on 0.0.0.0 and
//! [::], IPv6 only where the network namespace has it; `--inbound` and
//! `--outbound` bind exactly the addresses they name.
//!
//! The default ports are fixed, so those tests run the real binary in a
//! network namespace of their own (`ip netns exec`, root only; elsewhere
//! they say `skipped: needs root` and pass, except under CI, where they
//! fail) and read its listening
//! sockets with `ss`, as an operator would.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::machine::{is_root, skip};
use common::netns::Netns;
use common::sidecar::{LOOPBACK_LISTENERS, config_from, credential_flags};

const BIN: &str = env!("CARGO_BIN_EXE_trellis-proxy");
const ID: &str = "spiffe://td.test/ns/a/sa/web";
/// How long the sidecar may take to start listening.
const START: Duration = Duration::from_secs(20);

/// Whether this machine lacks what the tests need; says which (see
/// [`skip`]: under CI, fails the test instead).
fn skipped() -> bool {
    if !is_root() {
        skip("skipped: needs root");
        return true;
    }
    let has = |program: &str| {
        Command::new(program)
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !has("ip") || !has("ss") {
        skip("skipped: iproute2 (ip, ss) not installed");
        return true;
    }
    false
}

/// What these tests do in a namespace of their own.
impl Netns {
    /// Runs `program args`, inside the namespace when `inside`; must succeed.
    fn run(&self, program: &str, args: &[&str], inside: bool) -> String {
        let mut command = if inside {
            self.exec(program)
        } else {
            Command::new(program)
        };
        let out = command.args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Turns IPv6 off in the namespace: no `::1`, as in a pod of an IPv4
    /// only cluster.
    fn disable_ipv6(&self) {
        for iface in ["all", "default", "lo"] {
            let key = format!("net.ipv6.conf.{iface}.disable_ipv6=1");
            self.run("sysctl", &["-q", "-w", &key], true);
        }
    }

    /// The local addresses of the listening TCP sockets.
    fn listening(&self) -> Vec<String> {
        self.run("ss", &["-H", "-l", "-t", "-n"], true)
            .lines()
            .filter_map(|l| l.split_whitespace().nth(3).map(str::to_owned))
            .collect()
    }
}

/// The sidecar, killed by its own id when dropped; its stderr lines arrive
/// on `lines`.
struct Sidecar {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Sidecar {
    fn start(ns: &Netns, args: &[&str]) -> Sidecar {
        let mut child = ns
            .exec(BIN)
            .args(["--identity", ID])
            .args(credential_flags())
            .args(args)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Sidecar { child, lines }
    }

    /// Waits for a log line holding every needle; panics with what was
    /// logged when none comes.
    fn wait_for(&mut self, needles: &[&str]) -> String {
        let deadline = Instant::now() + START;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) if needles.iter().all(|n| line.contains(n)) => return line,
                Ok(line) => seen.push(line),
                Err(_) => break,
            }
        }
        panic!(
            "no line with {needles:?}; the sidecar logged:\n{}",
            seen.join("\n")
        );
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn listens_on_ipv4_and_ipv6_by_default() {
    if skipped() {
        return;
    }
    let ns = Netns::new("listen");
    let mut sidecar = Sidecar::start(&ns, &[]);
    let line = sidecar.wait_for(&["listening"]);
    assert!(line.contains("inbound=0.0.0.0:15006,[::]:15006"), "{line}");
    assert!(
        line.contains("outbound=127.0.0.1:15001,[::1]:15001"),
        "{line}"
    );
    let listening = ns.listening();
    for addr in [
        "0.0.0.0:15006",
        "[::]:15006",
        "127.0.0.1:15001",
        "[::1]:15001",
    ] {
        assert!(
            listening.iter().any(|l| l == addr),
            "{addr} not in {listening:?}"
        );
    }
}

#[test]
fn without_ipv6_the_default_serves_ipv4_and_says_so() {
    if skipped() {
        return;
    }
    let ns = Netns::new("listen");
    ns.disable_ipv6();
    let mut sidecar = Sidecar::start(&ns, &[]);
    // There is no ::1 to bind. (The kernel still lets [::]:15006 bind,
    // harmlessly: nothing can reach it.)
    sidecar.wait_for(&["no IPv6", "--outbound serves IPv4 only"]);
    let line = sidecar.wait_for(&["listening"]);
    assert!(line.contains("outbound=127.0.0.1:15001 "), "{line}");
    let listening = ns.listening();
    for addr in ["0.0.0.0:15006", "127.0.0.1:15001", "127.0.0.1:15020"] {
        assert!(
            listening.iter().any(|l| l == addr),
            "{addr} not in {listening:?}"
        );
    }
    assert!(
        !listening
            .iter()
            .any(|l| l.ends_with(":15001") && l.starts_with('['))
    );
    assert!(
        sidecar.child.try_wait().unwrap().is_none(),
        "the sidecar exited"
    );
}

#[test]
fn an_ipv6_address_named_by_a_flag_must_bind() {
    if skipped() {
        return;
    }
    let ns = Netns::new("listen");
    ns.disable_ipv6();
    let mut sidecar = Sidecar::start(&ns, &["--outbound", "127.0.0.1:15001,[::1]:15001"]);
    sidecar.wait_for(&["error: --outbound [::1]:15001: "]);
    let status = sidecar.child.wait().unwrap();
    assert_eq!(status.code(), Some(1));
}

#[tokio::test]
async fn listener_flags_bind_exactly_the_addresses_they_name() {
    let mut args = vec!["--identity", ID];
    args.extend(LOOPBACK_LISTENERS);
    args.extend(credential_flags());
    let config = config_from(&args);
    let sidecar = trellis_proxy::Sidecar::bind(config).await.unwrap();
    let families = |addrs: Vec<std::net::SocketAddr>| -> Vec<bool> {
        addrs.iter().map(|a| a.is_ipv6()).collect()
    };
    assert_eq!(families(sidecar.inbound_addrs()), [false]);
    assert_eq!(families(sidecar.outbound_addrs()), [false]);
    drop(sidecar);

    // Where this machine has ::1, both families side by side on one port
    // number: IPV6_V6ONLY keeps the IPv6 socket off the IPv4 one.
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        println!("no ::1 here: the IPv6 half is not checked");
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let inbound = format!("0.0.0.0:{port},[::]:{port}");
    let mut args = vec![
        "--identity",
        ID,
        "--inbound",
        &inbound,
        "--outbound",
        "[::1]:0",
        "--admin",
        "127.0.0.1:0",
    ];
    args.extend(credential_flags());
    let config = config_from(&args);
    let sidecar = trellis_proxy::Sidecar::bind(config).await.unwrap();
    let inbound = sidecar.inbound_addrs();
    assert_eq!(families(inbound.clone()), [false, true]);
    assert!(inbound.iter().all(|a| a.port() == port), "{inbound:?}");
    assert_eq!(families(sidecar.outbound_addrs()), [true]);
}
