//! ALPN between sidecars: the outbound sidecar offers `h2` or `http/1.1`
//! for what the app sent first (nothing for opaque TCP), the inbound
//! sidecar settles it and serves that protocol without sniffing; a client
//! without ALPN, or with a foreign offer, is still served by detection, and
//! an opaque port never settles HTTP. Shown as users see it: the
//! `trellis_alpn_total` series of both sidecars, and what a TLS client
//! (rustls, `openssl s_client`) reports.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::control_plane::FakeControlPlane;
use common::grpc::{self, GrpcApp};
use common::http::*;
use common::sidecar::TestSidecar;
use common::*;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CERT_TTL: Duration = Duration::from_secs(3600);

/// Waits until `sidecar` counted `n` connections in `direction` that
/// settled `alpn`.
async fn settled(sidecar: &TestSidecar, direction: &str, alpn: &str, n: u64) {
    let series = format!("trellis_alpn_total{{direction=\"{direction}\",alpn=\"{alpn}\"}}");
    eventually(&format!("{series} {n}"), || sidecar.has_sample(&series, n)).await;
}

/// A plain HTTP/2 (prior knowledge) client of the route, as an app uses it.
async fn h2_via(route: SocketAddr) -> Client2 {
    let tcp = TcpStream::connect(route).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    send
}

/// A plain HTTP/1.1 client of the route.
async fn h1_via(route: SocketAddr) -> Client1 {
    let tcp = TcpStream::connect(route).await.unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

#[tokio::test]
async fn an_h2_client_makes_the_sidecars_settle_h2() {
    let cp = FakeControlPlane::start(CERT_TTL).await;
    let app = http_app().await;
    let p = pair(&cp, app.addr, &[]).await;
    push_to(&cp, snapshot(1, "allow-mesh", vec![]), 2).await;

    let mut c = h2_via(p.route).await;
    let mut req = get("http://api/hello", &[]);
    *req.version_mut() = ::http::Version::HTTP_2;
    let (status, body) = text(c.send_request(req).await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(body, "GET /hello HTTP/2.0");

    settled(&p.client, "outbound", "h2", 1).await;
    settled(&p.server, "inbound", "h2", 1).await;
    assert!(
        p.server
            .has_sample("trellis_alpn_total{direction=\"inbound\",alpn=\"none\"}", 0)
    );
}

#[tokio::test]
async fn an_http1_client_makes_the_sidecars_settle_http1() {
    let cp = FakeControlPlane::start(CERT_TTL).await;
    let app = http_app().await;
    let p = pair(&cp, app.addr, &[]).await;
    push_to(&cp, snapshot(1, "allow-mesh", vec![]), 2).await;

    let mut c = h1_via(p.route).await;
    for path in ["/one", "/two"] {
        let (status, body) = text(c.send_request(get(path, &[])).await.unwrap()).await;
        assert_eq!(status, 200);
        assert_eq!(body, format!("GET {path} HTTP/1.1"));
    }
    // Both requests went on the one keep-alive connection.
    settled(&p.client, "outbound", "http/1.1", 1).await;
    settled(&p.server, "inbound", "http/1.1", 1).await;
    for seen in app.seen.identities() {
        assert_eq!(seen, [p.client.identity.to_string()]);
    }
}

#[tokio::test]
async fn an_upgrade_crosses_the_pair_over_settled_http1() {
    let cp = FakeControlPlane::start(CERT_TTL).await;
    let app = http_app().await;
    let p = pair(&cp, app.addr, &[]).await;
    push_to(&cp, snapshot(1, "allow-mesh", vec![]), 2).await;

    let tcp = TcpStream::connect(p.route).await.unwrap();
    let (mut c, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn.with_upgrades());
    let req = ::http::Request::get("/ws")
        .header("host", "api")
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = c.send_request(req).await.unwrap();
    assert_eq!(response.status(), 101);
    let upgraded = hyper::upgrade::on(response).await.unwrap();
    let mut upgraded = TokioIo::new(upgraded);
    let frame = b"\x81\x05hello, then bytes the sidecar never parses \x00\xff";
    assert_eq!(round_trip(&mut upgraded, frame).await.unwrap(), frame);
    settled(&p.client, "outbound", "http/1.1", 1).await;
    settled(&p.server, "inbound", "http/1.1", 1).await;
}

#[tokio::test]
async fn grpc_calls_settle_h2_and_stream_through() {
    let cp = FakeControlPlane::start(CERT_TTL).await;
    let app = GrpcApp::start().await.unwrap();
    let p = pair(&cp, app.addr(), &[]).await;
    push_to(&cp, snapshot(1, "allow-mesh", vec![]), 2).await;
    let channel = grpc::channel(p.route).await.unwrap();
    let versions = grpc::watch_versions(channel).await.unwrap();
    assert_eq!(versions, [1, 2, 3]);
    settled(&p.client, "outbound", "h2", 1).await;
    settled(&p.server, "inbound", "h2", 1).await;
}

#[tokio::test]
async fn opaque_tcp_and_server_first_protocols_settle_nothing_and_pass() {
    let cp = FakeControlPlane::start(CERT_TTL).await;
    let echo = echo_app().await;
    let p = pair(&cp, echo.addr, &[]).await;
    push_to(&cp, snapshot(1, "allow-mesh", vec![]), 2).await;
    let mut tcp = TcpStream::connect(p.route).await.unwrap();
    let binary = b"\x16\x03\x01\x00\x05hello\x00";
    assert_eq!(round_trip(&mut tcp, binary).await.unwrap(), binary);
    // Text that is not a request line stays bytes too.
    let line = b"SET key value\r\n";
    assert_eq!(round_trip(&mut tcp, line).await.unwrap(), line);
    settled(&p.client, "outbound", "none", 1).await;
    settled(&p.server, "inbound", "none", 1).await;

    let cp = FakeControlPlane::start(CERT_TTL).await;
    let p = pair(&cp, banner_app().await, &[]).await;
    push_to(&cp, snapshot(1, "allow-mesh", vec![]), 2).await;
    let mut tcp = TcpStream::connect(p.route).await.unwrap();
    let mut banner = [0; 12];
    tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut banner))
        .await
        .expect("the banner arrives")
        .unwrap();
    assert_eq!(&banner, b"220 banner\r\n");
    assert_eq!(
        round_trip(&mut tcp, b"EHLO x\r\n").await.unwrap(),
        b"EHLO x\r\n"
    );
    settled(&p.client, "outbound", "none", 1).await;
}

/// A rustls client presenting `web` and offering `alpn`.
fn client_offering(cp: &FakeControlPlane, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut config = (*cp.ca.client_config(Some((&cp.ca, &web())))).clone();
    config.alpn_protocols = alpn.iter().map(|id| id.to_vec()).collect();
    Arc::new(config)
}

#[tokio::test]
async fn the_inbound_settles_what_a_client_offers_and_serves_it_without_sniffing() {
    let (cp, _app, s) = app_behind_sidecar().await;
    push_to(&cp, snapshot(1, "allow-mesh", vec![]), 1).await;

    // h2 preferred when both are offered, and served as HTTP/2.
    let config = client_offering(&cp, &[b"http/1.1", b"h2"]);
    let tls = tls_connect(s.inbound, config).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut c, conn) = hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(
        TokioExecutor::new(),
        TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut req = get("http://api/alpn", &[]);
    *req.version_mut() = ::http::Version::HTTP_2;
    let (status, body) = text(c.send_request(req).await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(body, "GET /alpn HTTP/2.0");

    // A foreign offer is ignored, not refused: detection serves HTTP/1.
    let config = client_offering(&cp, &[b"foo/1"]);
    let mut tls = tls_connect(s.inbound, config).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), None);
    tls.write_all(b"GET /foreign HTTP/1.1\r\nhost: api\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let answer = String::from_utf8(read_to_end(&mut tls).await.unwrap()).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("GET /foreign HTTP/1.1"), "{answer}");
    settled(&s, "inbound", "h2", 1).await;
    settled(&s, "inbound", "none", 1).await;
}

#[tokio::test]
async fn an_opaque_port_never_settles_http() {
    let cp = FakeControlPlane::start(CERT_TTL).await;
    let echo = echo_app().await;
    let port = echo.addr.port().to_string();
    let p = pair(&cp, echo.addr, &["--opaque-ports", &port]).await;
    push_to(&cp, snapshot(1, "allow-mesh", vec![]), 2).await;

    // Straight to the inbound, offering only HTTP: nothing is settled and
    // the request is echoed back, not answered.
    let config = client_offering(&cp, &[b"h2", b"http/1.1"]);
    let mut tls = tls_connect(p.server.inbound, config).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), None);
    let request = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n";
    assert_eq!(round_trip(&mut tls, request).await.unwrap(), request);

    // Through the pair, an HTTP/1 request offers http/1.1 and is refused
    // it: the bytes still reach the app untouched.
    let mut tcp = TcpStream::connect(p.route).await.unwrap();
    assert_eq!(round_trip(&mut tcp, request).await.unwrap(), request);
    settled(&p.client, "outbound", "none", 1).await;
    settled(&p.server, "inbound", "none", 2).await;
    assert!(p.server.has_sample(
        "trellis_alpn_total{direction=\"inbound\",alpn=\"http/1.1\"}",
        0
    ));
}

/// A pod's `trellis.io/opaque-ports` annotation, naming its app's port,
/// makes its injected sidecar hold that port opaque: an HTTP request to it
/// is decided at L4 and reaches the app untouched, as with the flag. The
/// sidecar gets what the injector wrote (`TRELLIS_OPAQUE_PORTS`, given as
/// its flag twin), taken from the injector's own patch.
#[tokio::test]
async fn the_pods_opaque_ports_annotation_holds_its_port_opaque() {
    let cp = FakeControlPlane::start(CERT_TTL).await;
    let echo = echo_app().await;
    let pod = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "db-0",
            "namespace": "b",
            "annotations": {"trellis.io/opaque-ports": "db"},
        },
        "spec": {
            "serviceAccountName": "api",
            "containers": [{
                "name": "db",
                "image": "db",
                "ports": [{"name": "db", "containerPort": echo.addr.port()}],
            }],
        },
    });
    let mut flags = Vec::new();
    for (name, value) in injector::sidecar_env(&pod) {
        if name == "TRELLIS_OPAQUE_PORTS" {
            flags.extend([
                "--opaque-ports".to_owned(),
                value.as_str().unwrap().to_owned(),
            ]);
        }
    }
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let p = pair(&cp, echo.addr, &flags).await;
    push_to(&cp, snapshot(1, "allow-mesh", vec![]), 2).await;

    let request = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n";
    let mut tcp = TcpStream::connect(p.route).await.unwrap();
    assert_eq!(round_trip(&mut tcp, request).await.unwrap(), request);
    settled(&p.server, "inbound", "none", 1).await;
}

#[tokio::test]
async fn openssl_s_client_sees_h2_settled_by_the_inbound() {
    let (cp, _app, s) = app_behind_sidecar().await;
    push_to(&cp, snapshot(1, "allow-mesh", vec![]), 1).await;
    let Some(seen) = common::openssl::s_client(s.inbound, &cp.ca, &web(), &["-alpn", "h2"]).await
    else {
        return;
    };
    assert!(seen.contains("ALPN protocol: h2"), "{seen}");
    settled(&s, "inbound", "h2", 1).await;
}

/// How a refused connection ends, as its TLS client sees it, with what
/// it read: an orderly end (`close_notify`, then FIN), a FIN alone
/// (which a client takes for its server's close), or a reset.
async fn how_it_ends<S: tokio::io::AsyncRead + Unpin>(tls: &mut S) -> (&'static str, String) {
    let mut got = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(30), tls.read_to_end(&mut got))
        .await
        .expect("the connection still open after 30 s");
    let end = match end {
        Ok(_) => "orderly",
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => "reset",
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => "fin",
        Err(e) => panic!("neither an orderly end nor a reset: {e} ({:?})", e.kind()),
    };
    (end, String::from_utf8_lossy(&got).into_owned())
}

/// A caller that settles `h2` by ALPN and starts an HTTP/1 request is
/// answered `400` and ended in order once its head is whole; one whose
/// head never ends (it stalls past the handshake timeout, or closes its
/// side first) gets no answer, and is reset rather than ended as if
/// answered.
#[tokio::test]
async fn an_http1_head_on_h2_left_unanswered_is_reset() {
    let (cp, _app, s) = app_behind_sidecar().await;
    push_to(&cp, snapshot(1, "allow-mesh", vec![]), 1).await;
    let config = client_offering(&cp, &[b"h2"]);
    let h2_settled = async |head: &[u8]| {
        let mut tls = tls_connect(s.inbound, config.clone()).await.unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        tls.write_all(head).await.unwrap();
        tls.flush().await.unwrap();
        tls
    };

    let whole = async {
        let mut tls = h2_settled(b"GET / HTTP/1.1\r\nhost: api\r\n\r\n").await;
        how_it_ends(&mut tls).await
    };
    let half_closed = async {
        let mut tls = h2_settled(b"GET / HTTP/1.1\r\nhost: a").await;
        // close_notify, then FIN: the head can never end.
        tls.shutdown().await.unwrap();
        how_it_ends(&mut tls).await
    };
    let stalled = async {
        let mut tls = h2_settled(b"GET / HTTP/1.1\r\nhost: a").await;
        how_it_ends(&mut tls).await
    };
    let (whole, half_closed, stalled) = tokio::join!(whole, half_closed, stalled);
    assert_eq!(whole.0, "orderly", "{whole:?}");
    assert!(
        whole.1.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{whole:?}"
    );
    assert_eq!(half_closed, ("reset", String::new()));
    assert_eq!(stalled, ("reset", String::new()));
}
