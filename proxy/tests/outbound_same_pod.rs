//! A service whose backend is the pod's own address, for real: a pod network
//! namespace whose `eth0` has a documentation address, `trellis-proxy init`'s
//! interception, and a whole sidecar on the transparent port iptables
//! redirects the app's connections to. The app's call to the service's
//! virtual address reaches the sidecar, which finds the backend is this pod
//! and dials it in plain TCP that never leaves the pod, under outbound `deny`
//! too; a port there that refuses is answered `connect_failed`, a call
//! the app resets is reset at the backend, and a call before the sidecar's
//! first snapshot is told it has none.
//!
//! The sidecar, its fake control plane and the app run in a child process
//! inside the namespace (this test executable again, as its
//! `child_process_entry` test), which makes every check and says so.
//!
//! Needs root, `ip` (iproute2) and iptables; writes `skipped: needs root`,
//! `skipped: iptables not installed` or `skipped: iproute2 not installed` to
//! stderr and passes otherwise, except under CI (`CI` set), where it fails.
//! The namespaces are the test's own and removed afterwards, even when the
//! test fails.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::control_plane::FakeControlPlane;
use common::init::{self, can_run, ok, text};
use common::netns::Netns;
use common::sidecar::{Logs, TestSidecar, sidecar_as};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use trellis_proto::discovery::v1::{self as pb, watch_request::Kind};

/// The pod's address, on its `eth0` (TEST-NET-2, in a namespace of its own).
const POD_IP: &str = "198.51.100.5";
/// A service whose one backend is the app, on the pod's address.
const APP_VIP: &str = "10.96.0.10:80";
/// A service whose one backend is a port of the pod's address that refuses.
const GONE_VIP: &str = "10.96.0.11:80";
/// A service whose one backend reports how its connection ended.
const READER_VIP: &str = "10.96.0.12:80";
/// The role of the child process that runs the sidecar and the app.
const ROLE: &str = "same-pod";
/// What the child prints once every check passed.
const CHECKED: &str = "same-pod: every check passed";
/// Bytes no HTTP starts with: detection settles on opaque TCP at once.
const MESSAGE: &[u8] = b"\x01\x02 to this pod";

#[test]
fn a_service_backend_at_the_pods_own_address_is_plain_tcp_within_the_pod() {
    if !can_run() {
        return;
    }
    let pod = Netns::new("outbound");
    let node = Netns::new("outbound");
    pod.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &node.name,
    ]);
    pod.ip(&["addr", "add", &format!("{POD_IP}/24"), "dev", "eth0"]);
    pod.ip(&["link", "set", "eth0", "up"]);
    node.ip(&["link", "set", "eth0", "up"]);
    // A service's virtual address is routed off the pod, as in a cluster.
    pod.ip(&["route", "add", "default", "dev", "eth0"]);
    ok(&pod.init(&[]));

    let out = pod.child(ROLE, &[POD_IP]).output().unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success() && stdout.contains(CHECKED),
        "the child in {} failed ({}):\n{stdout}{stderr}",
        pod.name,
        out.status
    );
}

/// Inside the pod's namespace: the sidecar, the app on the pod's address,
/// and the app's calls to the two services, each checked.
fn same_pod_child(pod: IpAddr) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(same_pod_checks(pod));
    println!("{CHECKED}");
}

async fn same_pod_checks(pod: IpAddr) {
    let (logs, _guard) = Logs::capture(false);
    let cp = FakeControlPlane::start(Duration::from_secs(3600)).await;
    let (app, served) = echo_on(pod).await;
    let gone = refusing_on(pod);
    let gone_addr = gone.local_addr().unwrap().as_socket().unwrap();
    let (reader, ended) = reader_on(pod).await;
    // Where `init` redirects the app's connections, and the pod's address
    // as a pod's sidecar is told it.
    let advertised = SocketAddr::new(pod, 15006).to_string();
    let flags = [
        "--outbound",
        "127.0.0.1:15001",
        "--advertise-address",
        &advertised,
    ];
    let s = sidecar_as(&cp, id("/ns/shop/sa/web"), app, &flags).await;

    // Before its first snapshot the sidecar knows nothing in the mesh: an
    // HTTP call is told so, not that its destination is outside the mesh.
    let answer = http_call(APP_VIP).await;
    assert_eq!(
        refusal(&answer),
        (
            "HTTP/1.1 503 Service Unavailable",
            Some("not_ready"),
            format!(
                "trellis: outbound call to {APP_VIP} refused: this sidecar has no snapshot yet, \
                 so it knows no destination in the mesh (its log says why: the control plane \
                 not reached, or a Watch it refused)\n"
            )
            .as_str()
        ),
        "{answer}"
    );
    let line = logs
        .wait_for(&["outbound connection refused: this sidecar has no snapshot yet"])
        .await;
    assert!(line.contains(&format!("dst={APP_VIP}")), "{line}");
    // Named as an inbound denial before the first snapshot is.
    assert!(
        line.contains("decision=deny policy=default:no-snapshot"),
        "{line}"
    );
    eventually("the call counted denied", || outcome(&s, "denied") == 1).await;
    let snapshot = pb::Snapshot {
        version: 1,
        services: vec![
            service(APP_VIP, "shop/web", app),
            service(GONE_VIP, "shop/gone", gone_addr),
            service(READER_VIP, "shop/reader", reader),
        ],
        mesh: Some(pb::MeshConfig {
            outbound_policy: "deny".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let answer = cp.push_and_wait(snapshot).await;
    assert!(
        matches!(&answer, Kind::Ack(a) if a.version == 1),
        "{answer:?}"
    );

    // The app's own call, redirected: plain TCP to the app, echoed.
    let mut tcp = TcpStream::connect(APP_VIP).await.unwrap();
    tcp.write_all(MESSAGE).await.unwrap();
    tcp.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    tcp.read_to_end(&mut echoed).await.unwrap();
    assert_eq!(echoed, MESSAGE, "plain TCP echoed");
    assert_eq!(*served.borrow(), 1);
    eventually("the call counted same_pod", || outcome(&s, "same_pod") == 1).await;
    assert_eq!(outcome(&s, "passthrough"), 0);
    assert_eq!(outcome(&s, "no_mesh_backend"), 0);

    // A call the app resets is reset at the backend too, not ended with
    // a FIN that would pass for the end of its bytes.
    let mut tcp = TcpStream::connect(READER_VIP).await.unwrap();
    tcp.write_all(MESSAGE).await.unwrap();
    let mut ended = ended;
    tokio::time::timeout(Duration::from_secs(5), ended.wait_for(|e| e.is_some()))
        .await
        .expect("the backend took no connection")
        .unwrap();
    assert_eq!(
        ended.borrow().as_deref(),
        Some("read"),
        "the first bytes arrive"
    );
    tcp.set_zero_linger().unwrap();
    drop(tcp);
    let ended = tokio::time::timeout(
        Duration::from_secs(5),
        ended.wait_for(|e| e.as_deref() != Some("read")),
    )
    .await
    .expect("the backend's connection neither ended nor was reset")
    .unwrap()
    .clone();
    assert_eq!(
        ended.as_deref(),
        Some("reset"),
        "the app's reset reached the backend"
    );
    eventually("the reset call counted as an error", || {
        outcome(&s, "error") == 1
    })
    .await;

    // A port of the pod that refuses: answered, counted and logged
    // `connect_failed`, as a passthrough call is.
    let answer = http_call(GONE_VIP).await;
    assert_eq!(
        refusal(&answer),
        (
            "HTTP/1.1 502 Bad Gateway",
            Some("connect_failed"),
            format!(
                "trellis: outbound call to {GONE_VIP} refused: connecting to {gone_addr}: \
                 Connection refused (os error 111) (connect_failed)\n"
            )
            .as_str()
        ),
        "{answer}"
    );
    eventually("the call counted connect_failed", || {
        outcome(&s, "connect_failed") == 1
    })
    .await;
    let line = logs
        .wait_for(&[
            "outbound connection within the pod failed",
            "reason=connect_failed",
        ])
        .await;
    assert!(line.contains(&format!("dst={GONE_VIP}")), "{line}");
}

/// A service `name` at `address` whose one backend is `backend`.
fn service(address: &str, name: &str, backend: SocketAddr) -> pb::Service {
    pb::Service {
        address: address.into(),
        name: name.into(),
        backends: vec![backend.to_string()],
        ..Default::default()
    }
}

/// An app on `ip` that echoes every byte and closes at EOF; counts the
/// connections it took.
async fn echo_on(ip: IpAddr) -> (SocketAddr, watch::Receiver<usize>) {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (served_tx, served) = watch::channel(0);
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            served_tx.send_modify(|n| *n += 1);
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (addr, served)
}

/// An app on `ip` that reads its one connection to the end and says how
/// it went: `read` once bytes came, then `fin` or `reset`.
async fn reader_on(ip: IpAddr) -> (SocketAddr, watch::Receiver<Option<String>>) {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, ended) = watch::channel(None);
    tokio::spawn(async move {
        let Ok((mut tcp, _)) = listener.accept().await else {
            return;
        };
        let mut buf = [0u8; 1024];
        loop {
            let end = match tcp.read(&mut buf).await {
                Ok(0) => "fin",
                Ok(_) => {
                    tx.send_replace(Some("read".to_string()));
                    continue;
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => "reset",
                Err(e) => panic!("reading: {e}"),
            };
            tx.send_replace(Some(end.to_string()));
            return;
        }
    });
    (addr, ended)
}

/// A port on `ip` that refuses connections: bound, so nothing else takes
/// it, and never listening.
fn refusing_on(ip: IpAddr) -> socket2::Socket {
    let any = SocketAddr::new(ip, 0);
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(any),
        socket2::Type::STREAM,
        None,
    )
    .unwrap();
    socket.bind(&any.into()).unwrap();
    socket
}

/// The value of `trellis_connections_total` for outbound `outcome`, 0
/// when it has none.
fn outcome(s: &TestSidecar, outcome: &str) -> u64 {
    let series =
        format!("trellis_connections_total{{direction=\"outbound\",outcome=\"{outcome}\"}} ");
    s.metrics
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix(series.as_str())?.parse().ok())
        .unwrap_or(0)
}

/// An HTTP/1 request on a call to `dst`: all that came back.
async fn http_call(dst: &str) -> String {
    let mut tcp = TcpStream::connect(dst).await.unwrap();
    tcp.write_all(b"GET /orders HTTP/1.1\r\nhost: gone.shop\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tcp.read_to_end(&mut answer).await;
    String::from_utf8(answer).unwrap()
}

/// An HTTP/1 answer's status line, `trellis-proxy-error` and body.
fn refusal(answer: &str) -> (&str, Option<&str>, &str) {
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((answer, ""));
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default();
    let token = lines.find_map(|l| l.strip_prefix("trellis-proxy-error: "));
    (status, token, body)
}

/// Not a test by itself: the child processes' entry, this file's role or
/// [`init::child_process_entry`]'s.
#[test]
fn child_process_entry() {
    match std::env::var(init::ROLE).as_deref() {
        Ok(ROLE) => {
            let pod = std::env::var(init::ARGS).unwrap().parse().unwrap();
            same_pod_child(pod);
        }
        _ => init::child_process_entry(),
    }
}
