//! The inbound listener refuses anything but a valid client SVID and
//! forwards bytes, half-close included, for a valid one.

mod common;

use common::*;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

fn failures(metrics: &trellis_proxy::metrics::Metrics, reason: &str) -> bool {
    metrics.encode().contains(&format!(
        "trellis_handshake_failures_total{{direction=\"inbound\",reason=\"{reason}\"}} 1"
    ))
}

#[tokio::test]
async fn forwards_bytes_for_a_valid_svid() {
    let ca = Ca::new();
    let app = echo_app().await;
    let inbound = inbound_as(&ca, &id("/ns/b/sa/server"), app.addr).await;

    let config = ca.client_config(Some((&ca, &id("/ns/a/sa/client"))));
    let mut stream = tls_connect(inbound.addr, config).await.unwrap();
    assert_eq!(
        round_trip(&mut stream, b"hello mesh").await.unwrap(),
        b"hello mesh"
    );
    // Half-close: our EOF reaches the app, whose EOF comes back.
    stream.write_all(b"last words").await.unwrap();
    stream.shutdown().await.unwrap();
    assert_eq!(read_to_end(&mut stream).await.unwrap(), b"last words");
    eventually("the connection is counted as forwarded", || {
        inbound
            .metrics
            .encode()
            .contains("trellis_connections_total{direction=\"inbound\",outcome=\"forwarded\"} 1")
    })
    .await;
    assert!(
        inbound
            .metrics
            .encode()
            .contains("trellis_bytes_total{direction=\"inbound\"} 42"),
        "\"hello mesh\\n\" and \"last words\" both ways"
    );
}

#[tokio::test]
async fn refuses_plaintext() {
    let ca = Ca::new();
    let app = echo_app().await;
    let inbound = inbound_as(&ca, &id("/ns/b/sa/server"), app.addr).await;

    let mut tcp = TcpStream::connect(inbound.addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let answer = read_to_end(&mut tcp).await.unwrap_or_default();
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 400 Bad Request\r\n")
            && answer.contains("connection: close\r\n")
            && answer.contains("\r\ntrellis-proxy-error: not_tls\r\n")
            && answer.contains(
                "\r\n\r\ntrellis: this is a Trellis sidecar's inbound port: it accepts only mutual TLS"
            ),
        "{answer:?}"
    );
    eventually("a not_tls failure is counted", || {
        failures(&inbound.metrics, "not_tls")
    })
    .await;
    assert_eq!(*app.accepted.borrow(), 0, "the app was reached");
}

/// A plaintext client finds its refusal in the admin port's `/metrics`
/// and in the log as soon as it has read its answer: the refusal is
/// counted when the plaintext is seen, not once the answered connection
/// closes. The client keeps its connection open while it looks, so the
/// sidecar is still reading from it ([`trellis_core::refusal::linger`]).
#[tokio::test]
async fn a_plaintext_refusal_is_on_record_once_answered() {
    use common::control_plane::FakeControlPlane;
    use common::http::{push_to, snapshot};
    use common::sidecar::{Logs, sidecar};
    use tokio::io::AsyncReadExt;
    let (logs, _guard) = Logs::capture(false);
    let cp = FakeControlPlane::start(Duration::from_secs(3600)).await;
    let app = echo_app().await;
    let s = sidecar(&cp, app.addr, &[]).await;
    push_to(&cp, snapshot(1, "allow-mesh", vec![]), 1).await;

    let mut tcp = TcpStream::connect(s.inbound).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // Up to the end of the answer: the sidecar shuts its side down.
    let mut answer = Vec::new();
    tcp.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{answer:?}"
    );

    let metrics = s.get("/metrics").await;
    for series in [
        "trellis_handshake_failures_total{direction=\"inbound\",reason=\"not_tls\"} 1\n",
        "trellis_connections_total{direction=\"inbound\",outcome=\"refused\"} 1\n",
    ] {
        assert!(metrics.contains(series), "no {series:?} in:\n{metrics}");
    }
    assert!(
        logs.find(&["inbound handshake failed", "reason=not_tls"])
            .is_some(),
        "{:#?}",
        logs.lines()
    );
    assert_eq!(*app.accepted.borrow(), 0, "the app was reached");
    drop(tcp);
}

/// A plaintext HTTP/2 client (curl with prior knowledge, a gRPC client as
/// `grpcurl -plaintext` is) is told the same in its own protocol: `400`
/// with the text, or `UNAVAILABLE` with it as the message.
#[tokio::test]
async fn refuses_plaintext_http2_and_grpc_in_their_protocol() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    const SAYS: &str =
        "trellis: this is a Trellis sidecar's inbound port: it accepts only mutual TLS";
    let ca = Ca::new();
    let app = echo_app().await;
    let inbound = inbound_as(&ca, &id("/ns/b/sa/server"), app.addr).await;

    let url = format!("http://{}/", inbound.addr);
    let args = [
        "--http2-prior-knowledge",
        "-w",
        "\n%{http_version} %{http_code}",
    ];
    if let Some(answer) = http::curl(&[&args[..], &[url.as_str()]].concat()).await {
        let (body, status) = answer.rsplit_once('\n').unwrap();
        assert_eq!(status, "2 400", "{answer}");
        assert!(body.starts_with(SAYS), "{answer}");
    }

    // Marked as the sidecar's answer, as its answers over mTLS are.
    {
        use hyper_util::rt::{TokioExecutor, TokioIo};
        let tcp = TokioIo::new(TcpStream::connect(inbound.addr).await.unwrap());
        let (mut h2, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), tcp)
            .await
            .unwrap();
        tokio::spawn(conn);
        let response = h2.send_request(http::get("/", &[])).await.unwrap();
        let marked = response.headers().get("trellis-proxy-error").cloned();
        let (status, body) = http::text(response).await;
        assert_eq!(status, 400, "{body}");
        assert!(body.starts_with(SAYS), "{body}");
        assert_eq!(marked.as_ref().map(|v| v.as_bytes()), Some(&b"not_tls"[..]));
    }

    let channel = tonic::transport::Endpoint::from_shared(url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let refused = HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .expect_err("a plaintext call was answered");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().starts_with(SAYS), "{refused:?}");
    assert_eq!(*app.accepted.borrow(), 0, "the app was reached");
}

#[tokio::test]
async fn refuses_tls_without_a_client_certificate() {
    let ca = Ca::new();
    let app = echo_app().await;
    let inbound = inbound_as(&ca, &id("/ns/b/sa/server"), app.addr).await;

    // With TLS 1.3 the client may finish its side of the handshake before
    // the server refuses it: the refusal shows on the first read.
    if let Ok(mut stream) = tls_connect(inbound.addr, ca.client_config(None)).await {
        assert!(round_trip(&mut stream, b"hello").await.is_err());
    }
    eventually("a no_client_certificate failure is counted", || {
        failures(&inbound.metrics, "no_client_certificate")
    })
    .await;
    assert_eq!(*app.accepted.borrow(), 0, "the app was reached");
}

/// The caller is told why, in the TLS alert rustls sends: its
/// certificate's issuer is unknown here.
#[tokio::test]
async fn refuses_a_certificate_from_another_ca() {
    let ca = Ca::new();
    let other = Ca::new();
    let app = echo_app().await;
    let inbound = inbound_as(&ca, &id("/ns/b/sa/server"), app.addr).await;

    let config = ca.client_config(Some((&other, &id("/ns/a/sa/client"))));
    // TLS 1.3: the client's handshake ends before the server has checked
    // its certificate, so the alert may come on the first read.
    let refused = match tls_connect(inbound.addr, config).await {
        Ok(mut stream) => round_trip(&mut stream, b"hello").await.unwrap_err(),
        Err(e) => e,
    };
    assert!(
        refused
            .to_string()
            .contains("received fatal alert: UnknownCA"),
        "{refused}"
    );
    eventually("an unknown_issuer failure is counted", || {
        failures(&inbound.metrics, "unknown_issuer")
    })
    .await;
    assert_eq!(*app.accepted.borrow(), 0, "the app was reached");
}

/// A caller whose certificate chains to the bundle but is not shaped as
/// an X.509-SVID leaf is refused before the app, counted under what is
/// wrong with it.
#[tokio::test]
async fn refuses_a_certificate_that_is_not_an_svid_leaf() {
    let ca = Ca::new();
    let app = echo_app().await;
    let inbound = inbound_as(&ca, &id("/ns/b/sa/server"), app.addr).await;
    let client = id("/ns/a/sa/client");
    let td_id = trellis_core::SpiffeId::parse(&format!("spiffe://{TD}")).unwrap();
    let cases = [
        (
            ca.leaf_shaped(&client, |p| p.key_usages = vec![]),
            "svid_key_usage",
        ),
        (
            ca.leaf_shaped(&client, |p| p.is_ca = rcgen::IsCa::NoCa),
            "svid_basic_constraints",
        ),
        (ca.leaf_shaped(&td_id, |_| {}), "trust_domain_id"),
        (
            ca.leaf_shaped(&client, |p| {
                p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            }),
            "ca_used_as_leaf",
        ),
        (ca.leaf_under_leaf(&client), "leaf_used_as_ca"),
    ];
    for (presented, reason) in cases {
        let config = ca.client_config_presenting(Some(presented));
        if let Ok(mut stream) = tls_connect(inbound.addr, config).await {
            assert!(round_trip(&mut stream, b"hello").await.is_err());
        }
        eventually(&format!("a {reason} failure is counted"), || {
            failures(&inbound.metrics, reason)
        })
        .await;
    }
    assert_eq!(*app.accepted.borrow(), 0, "the app was reached");
}

#[tokio::test]
async fn refuses_everything_before_the_first_certificate() {
    let ca = Ca::new();
    let app = echo_app().await;
    let inbound = inbound(app.addr, Default::default()).await;

    let config = ca.client_config(Some((&ca, &id("/ns/a/sa/client"))));
    if let Ok(mut stream) = tls_connect(inbound.addr, config).await {
        assert!(round_trip(&mut stream, b"hello").await.is_err());
    }
    eventually("the refusal is counted", || {
        failures(&inbound.metrics, "no_local_certificate")
    })
    .await;
    assert_eq!(*app.accepted.borrow(), 0, "the app was reached");
}

#[tokio::test]
async fn shutdown_stops_accepting_and_waits_for_open_connections() {
    let ca = Ca::new();
    let app = echo_app().await;
    let TestInbound {
        addr,
        shutdown,
        drain,
        ..
    } = inbound_as(&ca, &id("/ns/b/sa/server"), app.addr).await;
    drop(drain);
    let config = ca.client_config(Some((&ca, &id("/ns/a/sa/client"))));
    let mut open = tls_connect(addr, config.clone()).await.unwrap();
    assert_eq!(round_trip(&mut open, b"before").await.unwrap(), b"before");

    let draining = tokio::spawn(shutdown.drain(std::time::Duration::from_secs(30)));
    // New connections are refused once the listener has stopped...
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while TcpStream::connect(addr).await.is_ok() {
        assert!(std::time::Instant::now() < deadline, "still accepting");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // ...while the open one still works, and the drain waits for it.
    assert_eq!(round_trip(&mut open, b"during").await.unwrap(), b"during");
    assert!(!draining.is_finished());
    open.shutdown().await.unwrap();
    let _ = read_to_end(&mut open).await;
    drop(open);
    assert!(
        draining.await.unwrap(),
        "the drain did not see the connection end"
    );
}

#[tokio::test]
async fn a_connection_future_stays_small() {
    let ca = Ca::new();
    let app = echo_app().await;
    let (_tls_tx, tls) =
        tokio::sync::watch::channel(ca.tls_state(&ca.svid(&id("/ns/b/sa/s")), &[]));
    let (_policies_tx, policies) = tokio::sync::watch::channel(None);
    let shared = std::sync::Arc::new(trellis_proxy::inbound::Shared {
        app: app.addr,
        own_ports: Vec::new(),
        pod_ips: Vec::new(),
        tls,
        policies,
        close_denied: true,
        opaque_ports: Vec::new(),
        user_timeout: Some(trellis_core::tcp::DEFAULT_USER_TIMEOUT),
        http: std::sync::Arc::new(trellis_proxy::http::Http::new(Default::default())),
        metrics: Default::default(),
        handshakes: Default::default(),
        h2: Default::default(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (tcp, peer) = listener.accept().await.unwrap();
    let (_shutdown, drain) = trellis_proxy::drain::channel();
    let handshake = shared.handshakes.permits().clone().try_acquire_owned();
    let future =
        trellis_proxy::inbound::serve(shared, tcp, peer, drain.tracker(), handshake.unwrap());
    let size = std::mem::size_of_val(&future);
    // Buffers and the TLS state machine live on the heap (the handshake's
    // and the stream's boxes); the future itself holds the sockets, the
    // copy's state both ways and the connection's few facts, about 1,030
    // bytes. Every held connection pays for each byte more: a slot the
    // size of a TLS stream kept in it by mistake would more than double it.
    assert!(size <= 1088, "an inbound connection future is {size} bytes");
    drop(client);
}

/// On shutdown an HTTP connection ends as soon as it can without cutting a
/// request: the answer in flight says `connection: close` and the
/// connection closes after it, so callers go to another replica instead
/// of sending more requests to a stopping pod, and the drain ends without
/// waiting for its deadline even while a caller keeps its connection.
#[tokio::test]
async fn shutdown_closes_http_connections_between_requests() {
    use http_body_util::{BodyExt, Empty};
    let ca = Ca::new();
    let app = common::http::http_app().await;
    let TestInbound {
        addr,
        shutdown,
        drain,
        ..
    } = inbound_as(&ca, &id("/ns/b/sa/server"), app.addr).await;
    drop(drain);
    let mut config = (*ca.client_config(Some((&ca, &id("/ns/a/sa/client"))))).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let stream = tls_connect(addr, std::sync::Arc::new(config))
        .await
        .unwrap();
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let get = || {
        ::http::Request::get("/before")
            .header("host", "api")
            .body(Empty::<bytes::Bytes>::new())
            .unwrap()
    };
    let response = send.send_request(get()).await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(!response.headers().contains_key("connection"));
    response.into_body().collect().await.unwrap();

    // The caller keeps its connection open; the drain must not wait for it.
    assert!(
        shutdown.drain(std::time::Duration::from_secs(20)).await,
        "the drain waited for an idle HTTP connection"
    );
    let ended = tokio::time::timeout(std::time::Duration::from_secs(10), conn)
        .await
        .expect("the sidecar kept the idle connection open");
    assert!(ended.unwrap().is_ok(), "the connection did not end cleanly");
}

/// Connects to `addr` from `from`, an address of the loopback network
/// (127.0.0.0/8), as a caller on another host would from its own.
async fn connect_from(from: &str, addr: std::net::SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    socket.connect(addr).await.unwrap()
}

/// Connects with TLS to `addr` from `from`, and sends `msg` through to the
/// app and back.
async fn round_trip_from(
    from: &str,
    addr: std::net::SocketAddr,
    config: std::sync::Arc<rustls::ClientConfig>,
    msg: &'static [u8],
) -> std::io::Result<Vec<u8>> {
    let tcp = connect_from(from, addr).await;
    let name = rustls::pki_types::ServerName::try_from("test").unwrap();
    let mut stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    round_trip(&mut stream, msg).await
}

/// Whether the metrics show `n` inbound connections open (accepted, not
/// yet over).
fn inbound_open(metrics: &trellis_proxy::metrics::Metrics, n: usize) -> bool {
    metrics.encode().contains(&format!(
        "trellis_connections_open{{direction=\"inbound\"}} {n}"
    ))
}

/// An inbound listener allowing the mesh in front of an echo app, with
/// at most `total` connections in their handshakes, 2 from one address
/// and 1 more from it (and `total` in all) waiting up to 2 s; and a
/// client's TLS config.
async fn limited(total: usize) -> (TestInbound, Arc<rustls::ClientConfig>, EchoApp) {
    limited_by(trellis_proxy::inbound::Handshakes::new(
        total,
        total,
        2,
        1,
        Duration::from_secs(2),
    ))
    .await
}

/// An inbound listener allowing the mesh in front of an echo app, with
/// `limits` on connections in their handshakes; and a client's TLS config.
async fn limited_by(
    limits: trellis_proxy::inbound::Handshakes,
) -> (TestInbound, Arc<rustls::ClientConfig>, EchoApp) {
    let ca = Ca::new();
    let app = echo_app().await;
    let server = ca.svid(&id("/ns/b/sa/server"));
    let metrics = Arc::new(trellis_proxy::metrics::Metrics::new());
    let policies = Some(allow_mesh(&metrics));
    let inbound = inbound_limited(
        app.addr,
        ca.tls_state(&server, &[]),
        policies,
        metrics,
        limits,
    )
    .await;
    let config = ca.client_config(Some((&ca, &id("/ns/a/sa/client"))));
    (inbound, config, app)
}

/// Connections from one address that have not finished their handshakes
/// hold at most its handshake slots: one more waits for a slot and is
/// served once one comes free, one beyond those allowed to wait is
/// refused at once, and one that waits too long is refused. A caller from
/// another address completes its handshake all the while.
#[tokio::test]
async fn one_address_holds_at_most_its_handshake_slots_while_another_is_served() {
    let (inbound, config, app) = limited(16).await;
    let (addr, metrics) = (inbound.addr, &inbound.metrics);

    // Two callers from 127.0.0.1 that never send a ClientHello hold both
    // of its slots.
    let mut stalled = vec![
        connect_from("127.0.0.1", addr).await,
        connect_from("127.0.0.1", addr).await,
    ];
    eventually("two connections in their handshakes", || {
        inbound_open(metrics, 2)
    })
    .await;
    // A third from there waits for a slot...
    let waiting = tokio::spawn(round_trip_from("127.0.0.1", addr, config.clone(), b"third"));
    eventually("the third connection accepted", || inbound_open(metrics, 3)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "a third connection from one address got a handshake beside two stalled ones"
    );
    // ...and a fourth, beyond those allowed to wait, is refused at once.
    let mut refused = connect_from("127.0.0.1", addr).await;
    assert_eq!(read_to_end(&mut refused).await.unwrap_or_default(), b"");
    assert!(failures(metrics, "overloaded"), "{}", metrics.encode());

    // Another address is served meanwhile.
    let other = round_trip_from("127.0.0.2", addr, config.clone(), b"other").await;
    assert_eq!(other.unwrap(), b"other");

    // A slot comes free: the waiting connection gets it.
    stalled.pop();
    let third = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiting connection was served once a slot came free")
        .unwrap();
    assert_eq!(third.unwrap(), b"third");

    // Both slots held again: a connection that waits longer than its
    // patience is refused.
    eventually("the served connections over", || inbound_open(metrics, 1)).await;
    stalled.push(connect_from("127.0.0.1", addr).await);
    eventually("two stalled connections again", || inbound_open(metrics, 2)).await;
    let late = round_trip_from("127.0.0.1", addr, config.clone(), b"late").await;
    assert!(late.is_err(), "a connection waited past its patience");
    eventually("two overloaded failures counted", || {
        metrics.encode().contains(
            "trellis_handshake_failures_total{direction=\"inbound\",reason=\"overloaded\"} 2",
        )
    })
    .await;
    assert_eq!(
        *app.accepted.borrow(),
        2,
        "the app was reached by a refused one"
    );
    drop(stalled);
}

/// While as many connections as the listener sets up at once are in their
/// handshakes, it accepts no more: a caller from any address waits in the
/// listen backlog, and is served once one of them is over.
#[tokio::test]
async fn the_listener_sets_up_at_most_its_limit_of_connections_at_once() {
    let (inbound, config, _app) = limited(2).await;
    let (addr, metrics) = (inbound.addr, &inbound.metrics);

    let mut stalled = vec![
        connect_from("127.0.0.1", addr).await,
        connect_from("127.0.0.2", addr).await,
    ];
    eventually("two connections in their handshakes", || {
        inbound_open(metrics, 2)
    })
    .await;
    let waiting = tokio::spawn(round_trip_from("127.0.0.3", addr, config, b"third"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "a third connection got a handshake beside two in theirs"
    );
    assert!(inbound_open(metrics, 2), "{}", metrics.encode());

    stalled.remove(0);
    let third = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiting connection was served once a handshake was over")
        .unwrap();
    assert_eq!(third.unwrap(), b"third");
    assert!(
        failures_counted(metrics, "overloaded", 0),
        "a connection waiting in the backlog was refused: {}",
        metrics.encode()
    );
    drop(stalled);
}

/// Connections waiting for a slot of their address hold none of the
/// listener's handshakes: while two addresses hold all their slots, as
/// many more of their connections as may wait for one, a caller from a
/// third address is accepted and completes its handshake at once, not
/// once those waits are over.
#[tokio::test]
async fn connections_waiting_for_a_slot_leave_the_handshakes_to_other_addresses() {
    // 2 slots an address and 2 waiting: two addresses take 8 connections,
    // as many as the listener sets up at once.
    let limits = trellis_proxy::inbound::Handshakes::new(8, 8, 2, 2, Duration::from_secs(5));
    let (inbound, config, _app) = limited_by(limits).await;
    let (addr, metrics) = (inbound.addr, &inbound.metrics);

    let mut stalled = Vec::new();
    for from in ["127.0.0.2", "127.0.0.3"] {
        for _ in 0..4 {
            stalled.push(connect_from(from, addr).await);
        }
    }
    eventually("eight connections accepted", || inbound_open(metrics, 8)).await;

    let third = tokio::time::timeout(
        Duration::from_secs(2),
        round_trip_from("127.0.0.4", addr, config, b"third"),
    )
    .await
    .expect("a third address waited for the waits of two others");
    assert_eq!(third.unwrap(), b"third");
    assert!(
        failures_counted(metrics, "overloaded", 0),
        "a connection was refused: {}",
        metrics.encode()
    );
    drop(stalled);
}

/// Connections waiting for a slot of their address are bounded in total,
/// whatever the number of addresses: past the bound, a connection that
/// would wait is refused at once, while one from an address holding fewer
/// than its slots is served.
#[tokio::test]
async fn connections_waiting_for_a_slot_are_bounded_in_total() {
    // 2 slots an address, 4 of its connections waiting, 2 in all.
    let limits = trellis_proxy::inbound::Handshakes::new(16, 2, 2, 4, Duration::from_secs(5));
    let (inbound, config, _app) = limited_by(limits).await;
    let (addr, metrics) = (inbound.addr, &inbound.metrics);

    let mut stalled = Vec::new();
    for _ in 0..4 {
        stalled.push(connect_from("127.0.0.2", addr).await);
    }
    eventually("two connections in their handshakes, two waiting", || {
        inbound_open(metrics, 4)
    })
    .await;
    for _ in 0..2 {
        stalled.push(connect_from("127.0.0.3", addr).await);
    }
    eventually("two more in their handshakes", || inbound_open(metrics, 6)).await;

    let mut refused = connect_from("127.0.0.3", addr).await;
    assert_eq!(read_to_end(&mut refused).await.unwrap_or_default(), b"");
    assert!(failures(metrics, "overloaded"), "{}", metrics.encode());

    let other = round_trip_from("127.0.0.4", addr, config, b"other").await;
    assert_eq!(other.unwrap(), b"other");
    drop(stalled);
}

/// An inbound listener serving as `/ns/b/sa/server` with an SVID of `ca`
/// in front of `app`, under policies whose mesh default is `default`
/// (`allow-mesh`, `deny`), with `revoked` revoked at `revoked_at` (Unix
/// seconds).
async fn inbound_revoking(
    ca: &Ca,
    app: std::net::SocketAddr,
    default: &str,
    revoked: &[trellis_core::SpiffeId],
    revoked_at: i64,
) -> TestInbound {
    let metrics = Arc::new(trellis_proxy::metrics::Metrics::new());
    let local = id("/ns/b/sa/server");
    let mut policies =
        trellis_proxy::policy::Policies::compile(1, &local, default.into(), Vec::new(), &metrics)
            .unwrap();
    policies.revocations = Arc::new(trellis_core::revocation::Revocations::new(
        revoked.iter().map(|id| (id.clone(), revoked_at)),
    ));
    let server = ca.tls_state(&ca.svid(&local), &[]);
    inbound_with(app, server, Some(Arc::new(policies)), metrics).await
}

/// Calls `inbound` as `caller`, with an SVID of `ca`, and checks the
/// connection is closed with nothing read; the address it called from.
async fn unanswered_call(
    ca: &Ca,
    inbound: &TestInbound,
    caller: &trellis_core::SpiffeId,
) -> std::net::SocketAddr {
    let config = ca.client_config(Some((ca, caller)));
    let mut stream = tls_connect(inbound.addr, config).await.unwrap();
    let from = stream.get_ref().0.local_addr().unwrap();
    assert!(
        read_to_end(&mut stream)
            .await
            .unwrap_or_default()
            .is_empty()
    );
    from
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A caller refused for its revoked identity is logged naming it (`peer`)
/// and the address it called from (`client`), with the revocation's time
/// in RFC 3339; the refusals of one revoked caller are throttled, but
/// those of another within the same pause are logged all the same.
#[tokio::test]
async fn each_revoked_caller_is_logged_by_its_identity() {
    let (logs, _guard) = common::sidecar::Logs::capture(false);
    let ca = Ca::new();
    let app = echo_app().await;
    let (web, api) = (web(), id("/ns/c/sa/api"));
    let revoked_at = unix_now() + 3600;
    let revoked = [web.clone(), api.clone()];
    let inbound = inbound_revoking(&ca, app.addr, "allow-mesh", &revoked, revoked_at).await;

    let refused = "inbound connection refused: the caller's identity is revoked";
    let mut callers = Vec::new();
    for caller in [&web, &web, &api] {
        callers.push(unanswered_call(&ca, &inbound, caller).await);
    }
    let at = trellis_core::clock::rfc3339_checked(revoked_at).unwrap();
    let at = format!("at or before the revocation at {at}");
    for (caller, from) in [(&web, callers[0]), (&api, callers[2])] {
        let peer = format!("peer={caller} ");
        let line = logs
            .wait_for(&[refused, &peer, "reason=revoked", &at])
            .await;
        assert_eq!(field(&line, "client"), Some(from.to_string()), "{line}");
    }
    eventually("all three refusals are counted", || {
        failures_counted(&inbound.metrics, "revoked", 3)
    })
    .await;
    // The second refusal of `web`, within the pause, is counted only.
    let web_lines = logs
        .lines()
        .into_iter()
        .filter(|l| l.contains(refused) && l.contains(&format!("peer={web} ")))
        .count();
    assert_eq!(web_lines, 1, "{}", logs.lines().join("\n"));
    assert_eq!(*app.accepted.borrow(), 0, "the app was never dialled");
}

/// Connects to `inbound` as `config` presents, and has a line echoed:
/// whether the handshake resumed a session, or the error the caller met,
/// in its handshake or at its first read (TLS 1.3 brings the server's
/// refusal of the caller's certificate after the caller's handshake is
/// over). The echo brings the caller the server's tickets.
async fn echoed(
    inbound: &TestInbound,
    config: &Arc<rustls::ClientConfig>,
) -> std::io::Result<rustls::HandshakeKind> {
    let mut stream = tls_connect(inbound.addr, config.clone()).await?;
    assert_eq!(round_trip(&mut stream, b"ping").await?, b"ping");
    Ok(stream.get_ref().1.handshake_kind().unwrap())
}

/// What a sidecar serving as `/ns/b/sa/server` makes of a snapshot whose
/// revocations are `revoked` (SPIFFE ID, revoked at): the TLS configs in
/// force built again from the ones in force (as `tls::run` does), and the
/// policies holding the same revocations.
fn snapshot_revoking(inbound: &TestInbound, revoked: &[(trellis_core::SpiffeId, i64)]) {
    let revocations = Arc::new(trellis_core::revocation::Revocations::new(
        revoked.iter().cloned(),
    ));
    let current = inbound.tls.borrow().clone();
    let state = current
        .with_expected(std::iter::empty())
        .unwrap()
        .with_revocations(revocations.clone())
        .unwrap();
    inbound.tls.send_replace(Arc::new(state));
    let local = id("/ns/b/sa/server");
    let mut policies = trellis_proxy::policy::Policies::compile(
        1,
        &local,
        "allow-mesh".into(),
        Vec::new(),
        &inbound.metrics,
    )
    .unwrap();
    policies.revocations = revocations;
    inbound.policies.send_replace(Some(Arc::new(policies)));
}

/// What a sidecar serving as `/ns/b/sa/server` makes of a new SVID under
/// the same bundle and snapshot: configs built again keeping the
/// session-ticket key of those in force, as `tls::run` does.
fn renewed(ca: &Ca, inbound: &TestInbound) {
    let current = inbound.tls.borrow().clone();
    let svid = ca.svid(&id("/ns/b/sa/server"));
    let state =
        trellis_proxy::tls::TlsState::build(Some(&svid), &[ca.root()], &td(), std::iter::empty())
            .unwrap()
            .keeping_tickets(&current)
            .with_revocations(current.revocations().clone())
            .unwrap();
    inbound.tls.send_replace(Arc::new(state));
}

/// A caller revoked after it got session tickets offers one on its next
/// connection: the sidecar, whose configs seal tickets with a new key
/// once a revocation covers more, refuses the ticket, and the caller's
/// full handshake is refused with the alert `certificate_revoked`, which
/// tells it why (not a close after the handshake). A caller not revoked
/// makes one full handshake and resumes again after it; a renewal of the
/// sidecar's certificate, and a change that only removes a revocation,
/// keep the key, and sessions resume across them.
#[tokio::test]
async fn a_caller_revoked_since_it_got_its_tickets_is_refused_with_the_revocation_alert() {
    use rustls::HandshakeKind::{Full, Resumed};
    let ca = Ca::new();
    let app = echo_app().await;
    let (web, api) = (web(), id("/ns/c/sa/api"));
    let inbound = inbound_revoking(&ca, app.addr, "allow-mesh", &[], 0).await;
    let web_config = ca.client_config(Some((&ca, &web)));
    let api_config = ca.client_config(Some((&ca, &api)));
    for config in [&web_config, &api_config] {
        assert_eq!(echoed(&inbound, config).await.unwrap(), Full);
        assert_eq!(echoed(&inbound, config).await.unwrap(), Resumed);
    }

    snapshot_revoking(&inbound, &[(web.clone(), unix_now() + 3600)]);
    let refused = echoed(&inbound, &web_config).await.unwrap_err();
    assert_eq!(
        trellis_core::tls::rustls_error(&refused),
        Some(&rustls::Error::AlertReceived(
            rustls::AlertDescription::CertificateRevoked
        )),
        "{refused}"
    );
    // The caller not revoked: one full handshake, its tickets of before
    // refused with the key, then resumed with the new key's.
    assert_eq!(echoed(&inbound, &api_config).await.unwrap(), Full);
    assert_eq!(echoed(&inbound, &api_config).await.unwrap(), Resumed);
    // A new certificate of the sidecar's, the revocation still in force,
    // keeps the key.
    renewed(&ca, &inbound);
    assert_eq!(echoed(&inbound, &api_config).await.unwrap(), Resumed);

    // Removing the revocation covers nothing more: the key is kept.
    snapshot_revoking(&inbound, &[]);
    assert_eq!(echoed(&inbound, &api_config).await.unwrap(), Resumed);
    // web's tickets died with the key before: a full handshake, accepted.
    assert_eq!(echoed(&inbound, &web_config).await.unwrap(), Full);
    assert_eq!(echoed(&inbound, &web_config).await.unwrap(), Resumed);
    eventually("the refusal is counted", || {
        failures_counted(&inbound.metrics, "revoked", 1)
    })
    .await;
}

fn failures_counted(metrics: &trellis_proxy::metrics::Metrics, reason: &str, n: u64) -> bool {
    metrics.encode().contains(&format!(
        "trellis_handshake_failures_total{{direction=\"inbound\",reason=\"{reason}\"}} {n}\n"
    ))
}

/// The line of a denied connection names the address the caller called
/// from (`client`), which the caller's sidecar logs as `remote`.
#[tokio::test]
async fn a_denied_connection_is_logged_with_the_callers_address() {
    let (logs, _guard) = common::sidecar::Logs::capture(false);
    let ca = Ca::new();
    let app = echo_app().await;
    let inbound = inbound_revoking(&ca, app.addr, "deny", &[], 0).await;

    let from = unanswered_call(&ca, &inbound, &web()).await;
    let peer = format!("peer={} ", web());
    let line = logs
        .wait_for(&["inbound connection denied", &peer, "policy=default:deny"])
        .await;
    assert_eq!(field(&line, "client"), Some(from.to_string()), "{line}");
}

/// The value of the field `name` of a text log line.
fn field(line: &str, name: &str) -> Option<String> {
    let prefix = format!("{name}=");
    line.split(' ')
        .find_map(|f| f.strip_prefix(&prefix))
        .map(str::to_owned)
}

/// A client certificate the verifier refuses is logged with the SPIFFE ID
/// it claims (`claimed_peer`), and what it was refused for: the name of
/// an issuer no root of the bundle leads to, the notAfter of an expired
/// one, in RFC 3339.
#[tokio::test]
async fn a_refused_client_certificate_is_logged_with_what_it_claims() {
    let (logs, _guard) = common::sidecar::Logs::capture(false);
    let ca = Ca::new();
    let app = echo_app().await;
    let inbound = inbound_as(&ca, &id("/ns/b/sa/server"), app.addr).await;

    let foreign = Ca::new();
    let config = ca.client_config_presenting(Some(foreign.leaf(&web())));
    let _ = tls_connect(inbound.addr, config).await;
    let root = foreign.root();
    let (_, parsed) = x509_parser::parse_x509_certificate(root.as_ref()).unwrap();
    let issuer = format!("issuer={}", parsed.subject());
    let line = logs
        .wait_for(&["inbound handshake failed", "reason=unknown_issuer"])
        .await;
    assert!(line.ends_with(&issuer), "{line}");
    assert_eq!(
        field(&line, "claimed_peer"),
        Some(web().to_string()),
        "{line}"
    );

    let expired = ca.leaf_valid_for(&id("/ns/c/sa/api"), time::Duration::seconds(-30));
    let (_, not_after) = trellis_core::tls::validity_of(&expired.0[0]).unwrap();
    let not_after = trellis_core::clock::rfc3339_checked(not_after).unwrap();
    let config = ca.client_config_presenting(Some(expired));
    let _ = tls_connect(inbound.addr, config).await;
    let line = logs
        .wait_for(&["inbound handshake failed", "reason=expired_certificate"])
        .await;
    assert_eq!(field(&line, "not_after"), Some(not_after), "{line}");
    let api = id("/ns/c/sa/api").to_string();
    assert_eq!(field(&line, "claimed_peer"), Some(api), "{line}");
}

/// A caller whose certificate is not valid yet by this sidecar's clock
/// (one of the two clocks is off by more than the CA backdates) is
/// refused, counted and logged as such, with the notBefore it holds, not
/// as any invalid certificate: an operator reads the clock skew off the
/// line.
#[tokio::test]
async fn a_caller_whose_certificate_is_not_valid_yet_is_refused_as_such() {
    let (logs, _guard) = common::sidecar::Logs::capture(false);
    let ca = Ca::new();
    let app = echo_app().await;
    let inbound = inbound_as(&ca, &id("/ns/b/sa/server"), app.addr).await;

    let early = ca.leaf_shaped(&web(), |p| {
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now + time::Duration::hours(1);
        p.not_after = now + time::Duration::hours(2);
    });
    let (not_before, _) = trellis_core::tls::validity_of(&early.0[0]).unwrap();
    let not_before = trellis_core::clock::rfc3339_checked(not_before).unwrap();
    let config = ca.client_config_presenting(Some(early));
    let refused = match tls_connect(inbound.addr, config).await {
        Ok(mut stream) => round_trip(&mut stream, b"hello").await.unwrap_err(),
        Err(e) => e,
    };
    assert!(
        refused
            .to_string()
            .contains("received fatal alert: CertificateExpired"),
        "{refused}"
    );
    let line = logs
        .wait_for(&[
            "inbound handshake failed",
            "reason=not_yet_valid_certificate",
        ])
        .await;
    assert!(
        line.contains("error=invalid peer certificate: certificate not valid yet"),
        "{line}"
    );
    assert_eq!(field(&line, "not_before"), Some(not_before), "{line}");
    assert_eq!(
        field(&line, "claimed_peer"),
        Some(web().to_string()),
        "{line}"
    );
    assert!(
        failures_counted(&inbound.metrics, "not_yet_valid_certificate", 1),
        "{}",
        inbound.metrics.encode()
    );
    assert_eq!(*app.accepted.borrow(), 0, "the app was reached");
}

/// A caller that settles HTTP/2 by ALPN and then sends something other
/// than the HTTP/2 client preface (`openssl s_client -alpn h2` with an
/// HTTP/1.1 request typed in, or a client that offers `h2` and speaks
/// HTTP/1.1) is told why, not closed without a word: an HTTP/1 request is
/// answered `400` in HTTP/1.1, other bytes with a GOAWAY with
/// PROTOCOL_ERROR; each is counted as `no_preface` and logged, and the
/// app is never dialled.
#[tokio::test]
async fn a_caller_that_settles_h2_and_sends_no_preface_is_told_why() {
    const SAYS: &str = "trellis: this connection settled HTTP/2 by ALPN (h2), and its first \
                        bytes are not the HTTP/2 client preface";
    let (logs, _guard) = common::sidecar::Logs::capture(false);
    let ca = Ca::new();
    let app = echo_app().await;
    let inbound = inbound_as(&ca, &id("/ns/b/sa/server"), app.addr).await;
    let mut config = (*ca.client_config(Some((&ca, &web())))).clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let config = Arc::new(config);

    let mut http1 = tls_connect(inbound.addr, config.clone()).await.unwrap();
    http1
        .write_all(b"GET / HTTP/1.1\r\nHost: api\r\n\r\n")
        .await
        .unwrap();
    let answer = read_to_end(&mut http1).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 400 Bad Request\r\n")
            && answer.contains("\r\ntrellis-proxy-error: invalid_request\r\n")
            && answer.contains(&format!("\r\n\r\n{SAYS}")),
        "{answer:?}"
    );
    let line = logs
        .wait_for(&["inbound HTTP/2 connection refused", "sent=http1"])
        .await;
    assert!(line.contains("not the HTTP/2 client preface"), "{line}");
    assert_eq!(field(&line, "peer"), Some(web().to_string()), "{line}");

    let mut other = tls_connect(inbound.addr, config).await.unwrap();
    other.write_all(b"\x00\x01\x02 hello\r\n").await.unwrap();
    let answer = read_to_end(&mut other).await.unwrap();
    // The server preface (an empty SETTINGS frame), then GOAWAY: last
    // stream 0, PROTOCOL_ERROR, the words as debug data.
    let goaway = &answer[9..];
    assert_eq!(goaway[3], 0x7, "{answer:?}");
    assert_eq!(&goaway[9..17], &[0, 0, 0, 0, 0, 0, 0, 1], "{answer:?}");
    assert!(
        String::from_utf8_lossy(&goaway[17..]).starts_with(SAYS),
        "{answer:?}"
    );
    eventually("both counted as no_preface", || {
        inbound
            .metrics
            .encode()
            .contains("trellis_connections_total{direction=\"inbound\",outcome=\"no_preface\"} 2\n")
    })
    .await;
    assert_eq!(*app.accepted.borrow(), 0, "the app was reached");
}

/// A caller still sending to an app that answers and closes with the
/// upload unread (which resets the app's connection): the server's
/// sidecar, its write to the app failed, still reads the answer the app
/// sent before the reset and passes it on, then ends the caller's
/// connection without `close_notify`, as cut.
#[tokio::test]
async fn an_answer_the_app_sent_before_resetting_an_upload_reaches_the_caller() {
    use tokio::io::AsyncReadExt;
    let ca = Ca::new();
    let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let inbound = inbound_as(&ca, &id("/ns/b/sa/server"), app.local_addr().unwrap()).await;
    let config = ca.client_config(Some((&ca, &id("/ns/a/sa/client"))));
    let mut stream = tls_connect(inbound.addr, config).await.unwrap();
    // A whole line first: a text protocol paused mid-line is taken for HTTP.
    stream.write_all(b"upload\n").await.unwrap();
    let (mut from_app, mut to_app) = tokio::io::split(stream);
    let uploading = tokio::spawn(async move {
        let chunk = vec![7u8; 64 * 1024];
        while to_app.write_all(&chunk).await.is_ok() {}
    });
    let (mut server, _) = app.accept().await.unwrap();
    let mut part = vec![0; 200_000];
    server.read_exact(&mut part).await.unwrap();
    server.write_all(b"ERR upload too large\n").await.unwrap();
    drop(server);

    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let end = loop {
        let read = tokio::time::timeout(Duration::from_secs(5), from_app.read(&mut buf))
            .await
            .expect("the connection neither ended nor failed within 5 s");
        match read {
            Ok(0) => break None,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => break Some(e),
        }
    };
    assert_eq!(String::from_utf8_lossy(&got), "ERR upload too large\n");
    assert!(end.is_some(), "the cut upload ended with close_notify");
    tokio::time::timeout(Duration::from_secs(5), uploading)
        .await
        .expect("the upload went on")
        .unwrap();
}
