//! HTTP through the sidecar, end to end in one process: detection of
//! HTTP/1.1 and HTTP/2, the verified identity header (never a client's),
//! streamed bodies, Upgrade, gRPC unary and streaming calls, curl through
//! a sidecar pair, bytes that are not HTTP passing as TCP, and the app
//! connections under bodies larger than the sockets hold, answers that
//! come before the body, callers that leave mid-request, and HTTP/2
//! callers that read none of their answers, send no preface or open more
//! connections than their share; the authority the app reads.

mod common;

use std::time::Duration;

use common::control_plane::FakeControlPlane;
use common::grpc::{self, GrpcApp};
use common::http::*;
use common::sidecar::sidecar;
use common::*;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const CERT_TTL: Duration = Duration::from_secs(3600);

fn web() -> trellis_core::SpiffeId {
    id("/ns/a/sa/web")
}

#[tokio::test]
async fn http1_and_h2_reach_the_app_with_the_verified_identity_only() {
    let (cp, app, s) = app_behind_sidecar().await;
    push_to(&cp, snapshot(1, "allow-mesh", vec![]), 1).await;

    let spoof = [(
        "x-trellis-peer-identity",
        "spiffe://td.test/ns/kube-system/sa/admin",
    )];
    let mut c1 = h1(&cp, s.inbound, &web()).await;
    for path in ["/one", "/two?secret=1"] {
        let (status, body) = text(c1.send_request(get(path, &spoof)).await.unwrap()).await;
        assert_eq!(status, 200);
        assert!(body.starts_with("GET /"), "{body}");
        assert!(body.ends_with("HTTP/1.1"), "{body}");
    }
    let mut c2 = h2(&cp, s.inbound, &web()).await;
    let mut req = get("http://api/three", &spoof);
    *req.version_mut() = ::http::Version::HTTP_2;
    let (status, body) = text(c2.send_request(req).await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(body, "GET /three HTTP/2.0");

    assert_eq!(app.seen.paths(), ["/one", "/two", "/three"]);
    for seen in app.seen.identities() {
        assert_eq!(seen, [web().to_string()], "the app saw a spoofed identity");
    }
}

/// A caller that pauses in its request line past the detection timeout
/// (after an extension method, with or without its space) is still served
/// as HTTP: every request the app sees carries the verified identity, and
/// none the one the caller wrote. As bytes, the app (which takes any token
/// for a method) would have read the pipelined second request with the
/// forged header.
#[tokio::test]
async fn a_request_line_paused_after_any_method_is_still_http() {
    let (cp, app, s) = app_behind_sidecar().await;
    push_to(&cp, snapshot(1, "allow-mesh", vec![]), 1).await;
    let forged = "spiffe://td.test/ns/kube-system/sa/admin";
    for (first, rest) in [("FOO /x", " HTTP/1.1"), ("FOO", " /x HTTP/1.1")] {
        let mut tls = connect(&cp, s.inbound, &web()).await;
        tls.write_all(first.as_bytes()).await.unwrap();
        tls.flush().await.unwrap();
        tokio::time::sleep(3 * trellis_proxy::http::detect::DETECT_TIMEOUT).await;
        let rest = format!(
            "{rest}\r\nhost: api\r\n\r\n\
             GET /admin HTTP/1.1\r\nhost: api\r\nx-trellis-peer-identity: {forged}\r\n\
             connection: close\r\n\r\n"
        );
        tls.write_all(rest.as_bytes()).await.unwrap();
        tls.flush().await.unwrap();
        let mut answers = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut answers)).await;
        let answers = String::from_utf8_lossy(&answers);
        assert_eq!(
            answers.matches("HTTP/1.1 200").count(),
            2,
            "both requests answered: {answers}"
        );
    }
    assert_eq!(app.seen.paths(), ["/x", "/admin", "/x", "/admin"]);
    for seen in app.seen.identities() {
        assert_eq!(seen, [web().to_string()], "the app saw a forged identity");
    }
}

/// An app that reads each request body to its end and answers with the
/// `x-trellis-peer-identity` values of the request's trailers, one a line
/// (also those of the name spelled with `_` for `-`, which CGI and WSGI
/// servers read as the same field).
async fn trailer_app() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let service = hyper::service::service_fn(
                |req: ::http::Request<hyper::body::Incoming>| async move {
                    let body = req.into_body().collect().await?;
                    let seen: Vec<String> = body
                        .trailers()
                        .into_iter()
                        .flat_map(|t| t.iter())
                        .filter(|(name, _)| {
                            name.as_str().replace('_', "-") == "x-trellis-peer-identity"
                        })
                        .map(|(_, v)| v.to_str().unwrap().to_owned())
                        .collect();
                    Ok::<_, hyper::Error>(::http::Response::new(http_body_util::Full::new(
                        bytes::Bytes::from(seen.join("\n")),
                    )))
                },
            );
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service),
            );
        }
    });
    addr
}

#[tokio::test]
async fn a_forged_identity_in_request_trailers_never_reaches_the_app() {
    use http_body_util::StreamBody;
    use hyper::body::Frame;
    let cp = FakeControlPlane::start(CERT_TTL).await;
    let s = sidecar(&cp, trailer_app().await, &[]).await;
    push_to(&cp, snapshot(1, "allow-mesh", vec![]), 1).await;
    let tls = connect(&cp, s.inbound, &web()).await;
    let (mut c, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut trailers = ::http::HeaderMap::new();
    trailers.insert(
        "x-trellis-peer-identity",
        "spiffe://td.test/ns/kube-system/sa/admin".parse().unwrap(),
    );
    trailers.insert(
        "x_trellis_peer_identity",
        "spiffe://td.test/ns/kube-system/sa/admin".parse().unwrap(),
    );
    trailers.insert("x-other", "kept".parse().unwrap());
    let frames: Vec<Result<Frame<bytes::Bytes>, std::convert::Infallible>> = vec![
        Ok(Frame::data(bytes::Bytes::from("body"))),
        Ok(Frame::trailers(trailers)),
    ];
    let req = ::http::Request::post("http://api/upload")
        .version(::http::Version::HTTP_2)
        .body(StreamBody::new(tokio_stream::iter(frames)))
        .unwrap();
    let response = c.send_request(req).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "", "the app saw an identity in the trailers");
}

/// A new connection to `inbound` switched to the app's echo protocol,
/// its request head padded with a field of `padding` bytes.
async fn upgrade_to_echo(
    cp: &FakeControlPlane,
    inbound: std::net::SocketAddr,
    padding: usize,
) -> hyper_util::rt::TokioIo<hyper::upgrade::Upgraded> {
    let mut req = ::http::Request::get("/ws")
        .header("host", "api")
        .header("connection", "upgrade")
        .header("upgrade", "echo");
    if padding > 0 {
        req = req.header("x-padding", "p".repeat(padding));
    }
    let req = req
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let mut c = h1(cp, inbound, &web()).await;
    let response = c.send_request(req).await.unwrap();
    assert_eq!(response.status(), 101);
    hyper_util::rt::TokioIo::new(hyper::upgrade::on(response).await.unwrap())
}

#[tokio::test]
async fn response_bodies_stream_and_upgrades_pass_through() {
    let (cp, _app, s) = app_behind_sidecar().await;
    push_to(&cp, snapshot(1, "allow-mesh", vec![]), 1).await;

    let mut c = h1(&cp, s.inbound, &web()).await;
    let response = c.send_request(get("/stream", &[])).await.unwrap();
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "chunk 0\n", "the first chunk arrives on its own");
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, "chunk 1\nchunk 2\nchunk 3\nchunk 4\n");

    let mut upgraded = upgrade_to_echo(&cp, s.inbound, 0).await;
    let sent = b"\x00binary after the upgrade\xff";
    let echoed = round_trip(&mut upgraded, sent).await.unwrap();
    assert_eq!(echoed, sent);

    // The streamed body and, once the upgraded connection is over, its
    // bytes both ways count in the inbound bytes.
    drop(upgraded);
    // `round_trip` sends a line: the message and a line end.
    let bytes = "chunk 0\n".len() as u64 * 5 + 2 * (sent.len() as u64 + 1);
    eventually("the bytes counted in trellis_bytes_total", || {
        s.has_sample("trellis_bytes_total{direction=\"inbound\"}", bytes)
    })
    .await;

    // After a head large enough to grow the sidecar's read buffer, the
    // upgraded connection carries bytes both ways all the same.
    let mut upgraded = upgrade_to_echo(&cp, s.inbound, 256 * 1024).await;
    for sent in [&b"first after a large head"[..], b"and the next"] {
        assert_eq!(round_trip(&mut upgraded, sent).await.unwrap(), sent);
    }
}

/// An app that answers each request with 101 and `early`, the first bytes
/// of the new protocol in the same write, then hands the test its end of
/// the connection.
async fn switching_app(
    early: &'static [u8],
) -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::Receiver<tokio::net::TcpStream>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, accepted) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                read_head(&mut tcp).await;
                let mut answer =
                    b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n"
                        .to_vec();
                answer.extend_from_slice(early);
                tcp.write_all(&answer).await.unwrap();
                let _ = tx.send(tcp).await;
            });
        }
    });
    (addr, accepted)
}

/// Reads an HTTP/1 head up to its empty line, a byte at a time so that
/// nothing after it is taken.
async fn read_head(tcp: &mut tokio::net::TcpStream) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(tcp.read_u8().await.expect("the connection ended in a head"));
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// A connection from a calling app through the sidecar pair of `route`,
/// switched by the app of `accepted`: the calling app's end and the server
/// app's.
async fn switched(
    route: std::net::SocketAddr,
    accepted: &mut tokio::sync::mpsc::Receiver<tokio::net::TcpStream>,
) -> (tokio::net::TcpStream, tokio::net::TcpStream) {
    let mut caller = tokio::net::TcpStream::connect(route).await.unwrap();
    caller
        .write_all(b"GET /ws HTTP/1.1\r\nhost: api\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let server = tokio::time::timeout(Duration::from_secs(10), accepted.recv())
        .await
        .expect("the app was not called")
        .unwrap();
    let head = tokio::time::timeout(Duration::from_secs(10), read_head(&mut caller))
        .await
        .expect("no answer within 10 s");
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    (caller, server)
}

/// An upgraded connection (a WebSocket, say) through a sidecar pair that
/// the server app resets is reset at the calling app, not ended as if the
/// app had finished.
#[tokio::test]
async fn an_upgraded_connection_the_app_resets_is_reset_at_the_caller() {
    let cp = FakeControlPlane::start(CERT_TTL).await;
    let (app, mut accepted) = switching_app(b"").await;
    let p = pair(&cp, app, &[]).await;
    push_to(&cp, snapshot(1, "allow-mesh", vec![]), 2).await;
    let (mut caller, server) = switched(p.route, &mut accepted).await;
    server.set_zero_linger().unwrap();
    drop(server);
    assert_eq!(read_end(&mut caller).await, End::Reset(Vec::new()));
}

/// An upgraded connection the calling app resets is reset at the server
/// app: one reading an upload to its end must not take a cut one for
/// whole.
#[tokio::test]
async fn an_upgraded_connection_the_caller_resets_is_reset_at_the_app() {
    let cp = FakeControlPlane::start(CERT_TTL).await;
    let (app, mut accepted) = switching_app(b"").await;
    let p = pair(&cp, app, &[]).await;
    push_to(&cp, snapshot(1, "allow-mesh", vec![]), 2).await;
    let (mut caller, mut server) = switched(p.route, &mut accepted).await;
    caller.write_all(b"part of an upload").await.unwrap();
    let mut part = [0u8; 17];
    server.read_exact(&mut part).await.unwrap();
    caller.set_zero_linger().unwrap();
    drop(caller);
    assert_eq!(read_end(&mut server).await, End::Reset(Vec::new()));
}

/// An upgraded connection the server's sidecar closes because new
/// policies deny the caller is cut, as a TCP connection is: reset at the
/// server app (its socket taken back from hyper) and, through the mTLS
/// connection dropped without `close_notify`, at the calling app.
#[tokio::test]
async fn an_upgraded_connection_closed_by_new_policies_is_reset_at_both_apps() {
    let cp = FakeControlPlane::start(CERT_TTL).await;
    let (app, mut accepted) = switching_app(b"").await;
    let p = pair(&cp, app, &[]).await;
    push_to(&cp, snapshot(1, "allow-mesh", vec![]), 2).await;
    let (mut caller, mut server) = switched(p.route, &mut accepted).await;
    push_to(&cp, snapshot(2, "deny", vec![]), 2).await;
    assert_eq!(read_end(&mut server).await, End::Reset(Vec::new()));
    assert_eq!(read_end(&mut caller).await, End::Reset(Vec::new()));
}

/// Each side of an upgraded connection ends on its own, either first: its
/// FIN reaches the other app after its last byte (the app's first bytes
/// too, sent with its 101) while the other still sends.
#[tokio::test]
async fn an_upgraded_connection_half_closes_both_ways() {
    let cp = FakeControlPlane::start(CERT_TTL).await;
    let (app, mut accepted) = switching_app(b"banner").await;
    let p = pair(&cp, app, &[]).await;
    push_to(&cp, snapshot(1, "allow-mesh", vec![]), 2).await;

    let (mut caller, mut server) = switched(p.route, &mut accepted).await;
    server.shutdown().await.unwrap();
    assert_eq!(read_end(&mut caller).await, End::Fin(b"banner".to_vec()));
    caller.write_all(b"after").await.unwrap();
    caller.shutdown().await.unwrap();
    assert_eq!(read_end(&mut server).await, End::Fin(b"after".to_vec()));

    let (mut caller, mut server) = switched(p.route, &mut accepted).await;
    caller.write_all(b"up").await.unwrap();
    caller.shutdown().await.unwrap();
    assert_eq!(read_end(&mut server).await, End::Fin(b"up".to_vec()));
    server.write_all(b" down").await.unwrap();
    server.shutdown().await.unwrap();
    assert_eq!(
        read_end(&mut caller).await,
        End::Fin(b"banner down".to_vec())
    );
}

#[tokio::test]
async fn an_upgrade_to_h2c_is_not_passed_to_the_app() {
    let (cp, _app, s) = app_behind_sidecar().await;
    push_to(&cp, snapshot(1, "allow-mesh", vec![]), 1).await;

    // After an h2c switch every request would be bytes the sidecar copies
    // undecided: the app gets a plain HTTP/1.1 request instead.
    let req = ::http::Request::get("/h2c")
        .header("host", "api")
        .header("connection", "Upgrade, HTTP2-Settings")
        .header("upgrade", "h2c")
        .header("http2-settings", "AAMAAABkAAQAAP__")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let mut c = h1(&cp, s.inbound, &web()).await;
    let (status, body) = text(c.send_request(req).await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(body, "GET /h2c HTTP/1.1");
}

#[tokio::test]
async fn curl_reaches_the_app_through_a_sidecar_pair_over_http1_and_h2() {
    let cp = FakeControlPlane::start(CERT_TTL).await;
    let app = http_app().await;
    let p = pair(&cp, app.addr, &[]).await;
    push_to(&cp, snapshot(1, "allow-mesh", vec![]), 2).await;
    let url = format!("http://{}/hello", p.route);

    let Some(body) = curl(&["--http1.1", &url]).await else {
        return;
    };
    assert_eq!(body, "GET /hello HTTP/1.1");
    let body = curl(&["--http2-prior-knowledge", &url]).await.unwrap();
    assert_eq!(body, "GET /hello HTTP/2.0");
    for seen in app.seen.identities() {
        assert_eq!(seen, [p.client.identity.to_string()]);
    }
}

#[tokio::test]
async fn grpc_unary_and_streaming_calls_go_through_a_sidecar_pair() {
    let cp = FakeControlPlane::start(CERT_TTL).await;
    let app = GrpcApp::start().await.unwrap();
    let p = pair(&cp, app.addr(), &[]).await;
    push_to(&cp, snapshot(1, "allow-mesh", vec![]), 2).await;
    let channel = grpc::channel(p.route).await.unwrap();

    let chain = grpc::certify(channel.clone()).await.unwrap();
    assert_eq!(chain, [b"ok".to_vec()]);

    let versions = grpc::watch_versions(channel).await.unwrap();
    assert_eq!(versions, [1, 2, 3]);
}

/// A gRPC app whose `Discovery/Watch` answers each message the caller
/// streams with a snapshot numbered by the messages so far, for as long as
/// the caller keeps the call open.
#[derive(Clone)]
struct PingPong;

#[tonic::codegen::async_trait]
impl trellis_proto::discovery::v1::discovery_server::Discovery for PingPong {
    type WatchStream = tokio_stream::wrappers::ReceiverStream<
        Result<trellis_proto::discovery::v1::Snapshot, tonic::Status>,
    >;

    async fn watch(
        &self,
        req: tonic::Request<tonic::Streaming<trellis_proto::discovery::v1::WatchRequest>>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        let mut requests = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            let mut version = 0;
            while let Ok(Some(_)) = requests.message().await {
                version += 1;
                let snapshot = trellis_proto::discovery::v1::Snapshot {
                    version,
                    ..Default::default()
                };
                if tx.send(Ok(snapshot)).await.is_err() {
                    return;
                }
            }
        });
        Ok(tonic::Response::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
    }
}

#[tokio::test]
async fn a_streaming_grpc_call_stays_open_across_new_policies() {
    use trellis_proto::discovery::v1::WatchRequest;
    use trellis_proto::discovery::v1::discovery_client::DiscoveryClient;
    use trellis_proto::discovery::v1::discovery_server::DiscoveryServer;
    let cp = FakeControlPlane::start(CERT_TTL).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(DiscoveryServer::new(PingPong))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let p = pair(&cp, app, &[]).await;
    push_to(&cp, snapshot(1, "allow-mesh", vec![]), 2).await;
    let channel = grpc::channel(p.route).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut answers = DiscoveryClient::new(channel)
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(WatchRequest::default()).await.unwrap();
    assert_eq!(answers.message().await.unwrap().unwrap().version, 1);

    // New policies reach the server sidecar while the call is open: a rate
    // limit on another service, which this call is not under.
    let mut snap = snapshot(2, "allow-mesh", vec![]);
    snap.rate_limits = vec![trellis_proto::policy::v1::RateLimit {
        name: "other".into(),
        namespace: "b".into(),
        selector: Some(trellis_proto::policy::v1::Selector {
            spiffe_ids: vec![p.server.identity.to_string()],
        }),
        requests_per_second: 0.01,
        burst: 1,
        key: "source".into(),
        matches: vec![trellis_proto::policy::v1::RateLimitMatch {
            paths: vec!["/pkg.Other/*".into()],
        }],
    }];
    push_to(&cp, snap, 2).await;
    for version in 2..=5 {
        tx.send(WatchRequest::default()).await.unwrap();
        let answer = answers.message().await.unwrap().unwrap();
        assert_eq!(answer.version, version);
    }
    drop(tx);
    assert!(
        answers.message().await.unwrap().is_none(),
        "the call ends cleanly when the caller ends it"
    );
}

#[tokio::test]
async fn bytes_that_are_not_http_pass_as_tcp() {
    let cp = FakeControlPlane::start(CERT_TTL).await;
    let echo = echo_app().await;
    let s = sidecar(&cp, echo.addr, &[]).await;
    push_to(&cp, snapshot(1, "allow-mesh", vec![]), 1).await;
    let config = cp.ca.client_config(Some((&cp.ca, &web())));

    // A client-first binary protocol, and text that is not an HTTP request.
    let mut tls = tls_connect(s.inbound, config.clone()).await.unwrap();
    let binary = b"\x16\x03\x01\x00\x05hello\x00";
    assert_eq!(round_trip(&mut tls, binary).await.unwrap(), binary);
    let mut tls = tls_connect(s.inbound, config.clone()).await.unwrap();
    let line = b"SET key value\r\n";
    assert_eq!(round_trip(&mut tls, line).await.unwrap(), line);

    // A server-first protocol: nothing sent until the banner.
    let banner = banner_app().await;
    let cp = FakeControlPlane::start(CERT_TTL).await;
    let s = sidecar(&cp, banner, &[]).await;
    push_to(&cp, snapshot(1, "allow-mesh", vec![]), 1).await;
    let mut tls = connect(&cp, s.inbound, &web()).await;
    let mut buf = [0; 12];
    tokio::time::timeout(Duration::from_secs(5), tls.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"220 banner\r\n");
}

/// A caller that waits out detection before it writes a request (so that
/// neither ALPN nor detection settled HTTP) is still served as HTTP: the
/// app gets the verified identity, never the caller's. A request line only
/// a lenient server reads (`HTTP/1.2`) is refused, not passed as bytes.
#[tokio::test]
async fn a_request_sent_after_a_silence_is_still_http() {
    let (cp, app, s) = app_behind_sidecar().await;
    push_to(&cp, snapshot(1, "allow-mesh", vec![]), 1).await;
    let forged = "X-Trellis-Peer-Identity: spiffe://td.test/ns/kube-system/sa/admin\r\n";

    let mut tls = connect(&cp, s.inbound, &web()).await;
    tokio::time::sleep(trellis_proxy::http::detect::DETECT_TIMEOUT * 2).await;
    tls.write_all(
        format!("\r\nGET /late HTTP/1.1\r\nHost: api\r\n{forged}Connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let answer = String::from_utf8(read_to_end(&mut tls).await.unwrap()).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");

    let mut tls = connect(&cp, s.inbound, &web()).await;
    tls.write_all(format!("GET /lenient HTTP/1.2\r\nHost: api\r\n{forged}\r\n").as_bytes())
        .await
        .unwrap();
    let answer = String::from_utf8(read_to_end(&mut tls).await.unwrap()).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 400") || answer.starts_with("HTTP/1.1 505"),
        "{answer}"
    );

    assert_eq!(app.seen.paths(), ["/late"]);
    assert_eq!(app.seen.identities(), [[web().to_string()]]);
}

#[tokio::test]
async fn opaque_ports_are_never_inspected() {
    let cp = FakeControlPlane::start(CERT_TTL).await;
    let echo = echo_app().await;
    let port = echo.addr.port().to_string();
    let s = sidecar(&cp, echo.addr, &["--opaque-ports", &port]).await;
    push_to(&cp, snapshot(1, "allow-mesh", vec![]), 1).await;
    let config = cp.ca.client_config(Some((&cp.ca, &web())));
    // An HTTP request on an opaque port is echoed back, not answered.
    let mut tls = tls_connect(s.inbound, config).await.unwrap();
    let request = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n";
    assert_eq!(round_trip(&mut tls, request).await.unwrap(), request);
}

/// An HTTP/1.1 app that counts the connections it accepted and those
/// still open. `/echo` streams the request body back as it arrives, `/big`
/// answers [`BIG`] bytes, `/drip` sends a chunk every 20 ms until the caller goes away, and
/// `/hang` never answers.
struct CountingApp {
    addr: std::net::SocketAddr,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    open: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

const BIG: usize = 8 << 20;

impl CountingApp {
    async fn start() -> Self {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        type AppBody = http_body_util::combinators::BoxBody<bytes::Bytes, hyper::Error>;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let (a, o) = (accepted.clone(), open.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                o.fetch_add(1, Ordering::SeqCst);
                let o = o.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        |req: ::http::Request<hyper::body::Incoming>| async move {
                            let body: AppBody = match req.uri().path() {
                                "/echo" => req.into_body().boxed(),
                                "/big" => {
                                    http_body_util::Full::new(bytes::Bytes::from(vec![7u8; BIG]))
                                        .map_err(|never| match never {})
                                        .boxed()
                                }
                                "/drip" => {
                                    let chunks = tokio_stream::StreamExt::throttle(
                                        tokio_stream::iter(std::iter::repeat_with(|| {
                                            Ok(hyper::body::Frame::data(bytes::Bytes::from(
                                                "drip\n",
                                            )))
                                        })),
                                        Duration::from_millis(20),
                                    );
                                    http_body_util::StreamBody::new(chunks).boxed()
                                }
                                "/hang" => std::future::pending().await,
                                // The whole body first, as many apps read it.
                                "/collect" => {
                                    let _ = req.into_body().collect().await;
                                    http_body_util::Full::new(bytes::Bytes::from("ok"))
                                        .map_err(|never| match never {})
                                        .boxed()
                                }
                                _ => http_body_util::Full::new(bytes::Bytes::from("ok"))
                                    .map_err(|never| match never {})
                                    .boxed(),
                            };
                            Ok::<_, hyper::Error>(::http::Response::new(body))
                        },
                    );
                    // HTTP/1.1 or HTTP/2 with prior knowledge.
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
                    o.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        CountingApp {
            addr,
            accepted,
            open,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn open(&self) -> usize {
        self.open.load(std::sync::atomic::Ordering::SeqCst)
    }
}

fn post(path: &str, body: Vec<u8>) -> ::http::Request<http_body_util::Full<bytes::Bytes>> {
    ::http::Request::post(path)
        .header("host", "api")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap()
}

/// Bodies far larger than the socket buffers stream through the sidecar
/// both ways, the app connection driven by whoever waits on it, and a
/// caller's requests one after another take one app connection.
#[tokio::test]
async fn large_bodies_stream_both_ways_over_one_app_connection() {
    let cp = FakeControlPlane::start(CERT_TTL).await;
    let app = CountingApp::start().await;
    let s = sidecar(&cp, app.addr, &[]).await;
    push_to(&cp, snapshot(1, "allow-mesh", vec![]), 1).await;
    let mut c = h1(&cp, s.inbound, &web()).await;
    let sent: Vec<u8> = (0..BIG).map(|i| (i % 251) as u8).collect();
    for round in 1..=2 {
        let exchange = async {
            let echoed = c.send_request(post("/echo", sent.clone())).await.unwrap();
            assert_eq!(echoed.status(), 200);
            let echoed = echoed.into_body().collect().await.unwrap().to_bytes();
            assert!(echoed == sent, "round {round}: the echo differs");
            let big = c.send_request(get("/big", &[])).await.unwrap();
            let big = big.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(big.len(), BIG, "round {round}");
            let (status, body) = text(c.send_request(get("/", &[])).await.unwrap()).await;
            assert_eq!((status.as_u16(), body.as_str()), (200, "ok"));
        };
        tokio::time::timeout(Duration::from_secs(30), exchange)
            .await
            .unwrap_or_else(|_| panic!("round {round} stalled"));
    }
    assert_eq!(
        app.accepted(),
        1,
        "one caller's requests took more than one app connection"
    );
    // Each request's bodies count in the inbound bytes, as a byte stream's
    // copied bytes do: per round the echo both ways, the big answer, "ok".
    let bytes = 2 * (3 * BIG as u64 + 2);
    eventually("the bodies counted in trellis_bytes_total", || {
        s.has_sample("trellis_bytes_total{direction=\"inbound\"}", bytes)
    })
    .await;
}

/// An HTTP/1.1 app that answers every request as soon as it has the head,
/// `early` in the body, and only 100 ms later reads the request body; then
/// the next request on the connection. It counts the body bytes it read.
struct EarlyApp {
    addr: std::net::SocketAddr,
    read: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl EarlyApp {
    async fn start() -> Self {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let read = Arc::new(AtomicUsize::new(0));
        let r = read.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let r = r.clone();
                tokio::spawn(async move {
                    let mut tcp = tokio::io::BufReader::new(tcp);
                    loop {
                        let mut length = 0;
                        loop {
                            let mut line = String::new();
                            if tcp.read_line(&mut line).await.unwrap_or(0) == 0 {
                                return;
                            }
                            let line = line.to_ascii_lowercase();
                            if let Some(value) = line.strip_prefix("content-length:") {
                                length = value.trim().parse().unwrap();
                            }
                            if line == "\r\n" {
                                break;
                            }
                        }
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nearly";
                        tcp.get_mut().write_all(answer).await.unwrap();
                        // Slow to read: the body fills the sockets meanwhile.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        let mut body = (&mut tcp).take(length as u64);
                        let n = tokio::io::copy(&mut body, &mut tokio::io::sink())
                            .await
                            .unwrap();
                        r.fetch_add(n as usize, Ordering::SeqCst);
                    }
                });
            }
        });
        EarlyApp { addr, read }
    }
}

/// An app that answers before it has read the request body: the caller
/// gets the answer while its body (larger than the sockets hold) is still
/// on the way, the whole body still reaches the app, and the caller's next
/// request on the same connection is answered. The caller writes HTTP/1.1
/// by hand, as curl would send it (hyper's own client never takes a next
/// request on a connection whose answer came before its body was sent).
#[tokio::test]
async fn an_answer_before_the_request_body_is_read_reaches_the_caller() {
    use std::sync::atomic::Ordering;
    use tokio::io::AsyncWriteExt;
    let cp = FakeControlPlane::start(CERT_TTL).await;
    let app = EarlyApp::start().await;
    let s = sidecar(&cp, app.addr, &[]).await;
    push_to(&cp, snapshot(1, "allow-mesh", vec![]), 1).await;
    let (mut from, mut to) = tokio::io::split(connect(&cp, s.inbound, &web()).await);
    let answers = tokio::spawn(async move {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while seen.windows(5).filter(|w| *w == b"early").count() < 2 {
            let n = from.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed after {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
        String::from_utf8(seen).unwrap()
    });
    let length = 4 * BIG;
    let head = format!("POST /upload HTTP/1.1\r\nhost: api\r\ncontent-length: {length}\r\n\r\n");
    to.write_all(head.as_bytes()).await.unwrap();
    to.write_all(&vec![1; length]).await.unwrap();
    to.write_all(b"GET / HTTP/1.1\r\nhost: api\r\n\r\n")
        .await
        .unwrap();
    // The TLS writer accepts what the socket cannot take yet and sends it
    // only when written to or flushed again: without this, the end of the
    // body and the second request could wait in it for ever.
    to.flush().await.unwrap();
    let answers = tokio::time::timeout(Duration::from_secs(30), answers)
        .await
        .expect("the second request was never answered")
        .unwrap();
    assert_eq!(answers.matches("HTTP/1.1 200 OK").count(), 2, "{answers}");
    assert_eq!(
        app.read.load(Ordering::SeqCst),
        length,
        "the body did not reach the app"
    );
}

/// HTTP/2 flow control is per connection: a caller that asks for large
/// answers and never reads them takes up the window of the connection its
/// streams use to the app. Another caller's streams are not on that
/// connection, and are answered.
#[tokio::test]
async fn a_caller_that_stops_reading_http2_answers_does_not_stall_another() {
    let cp = FakeControlPlane::start(CERT_TTL).await;
    let app = CountingApp::start().await;
    let s = sidecar(&cp, app.addr, &[]).await;
    push_to(&cp, snapshot(1, "allow-mesh", vec![]), 1).await;

    let stream = connect(&cp, s.inbound, &web()).await;
    let (mut stalled, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(0)
            .initial_connection_window_size(65_535)
            .handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut req = get("http://api/big", &[]);
        *req.version_mut() = ::http::Version::HTTP_2;
        // Answered (the head needs no window), never read.
        held.push(stalled.send_request(req).await.unwrap());
    }

    let mut other = h2(&cp, s.inbound, &web()).await;
    let mut req = get("http://api/big", &[]);
    *req.version_mut() = ::http::Version::HTTP_2;
    let answered = tokio::time::timeout(Duration::from_secs(10), async {
        let response = other.send_request(req).await.unwrap();
        response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .len()
    })
    .await
    .expect("another caller's answer stalled behind the one that does not read");
    assert_eq!(answered, BIG);
    drop(held);
}

/// A caller that goes away while the app is still answering, before it
/// has, or in the middle of its request's body, frees the app connection
/// its request had: the sidecar closes it, and holds nothing for the
/// caller that left.
#[tokio::test]
async fn a_caller_that_goes_away_mid_request_frees_its_app_connection() {
    let cp = FakeControlPlane::start(CERT_TTL).await;
    let app = CountingApp::start().await;
    let s = sidecar(&cp, app.addr, &[]).await;
    push_to(&cp, snapshot(1, "allow-mesh", vec![]), 1).await;

    // Mid-response: one chunk read, then the caller's connection dropped.
    let mut c = h1(&cp, s.inbound, &web()).await;
    let mut drip = c.send_request(get("/drip", &[])).await.unwrap().into_body();
    let first = drip.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "drip\n");
    assert_eq!(app.open(), 1);
    drop((drip, c));
    eventually(
        "the app connection of a response cut short is closed",
        || app.open() == 0,
    )
    .await;

    // Before the answer: the app has the request and never answers.
    let mut c = h1(&cp, s.inbound, &web()).await;
    let pending = tokio::spawn(async move {
        let _ = c.send_request(get("/hang", &[])).await;
    });
    eventually("the app has the request", || app.open() == 1).await;
    pending.abort();
    eventually(
        "the app connection of an unanswered request is closed",
        || app.open() == 0,
    )
    .await;

    // Mid-body: the app reads the whole body before it answers, and the
    // caller goes away with most of it unsent.
    let mut tls = connect(&cp, s.inbound, &web()).await;
    tls.write_all(b"POST /collect HTTP/1.1\r\nhost: api\r\ncontent-length: 1000\r\n\r\n0123456789")
        .await
        .unwrap();
    tls.flush().await.unwrap();
    eventually("the app has the request", || app.open() == 1).await;
    drop(tls);
    eventually("the app connection of a body cut short is closed", || {
        app.open() == 0
    })
    .await;
    assert_eq!(app.accepted(), 3);
}

/// A connection that switched protocols (a WebSocket, say) stays the
/// sidecar's connection: new policies that deny the caller close it, as
/// they close any other connection of a denied caller.
#[tokio::test]
async fn an_upgraded_connection_is_closed_when_new_policies_deny_the_caller() {
    let (cp, _app, s) = app_behind_sidecar().await;
    push_to(&cp, snapshot(1, "allow-mesh", vec![]), 1).await;

    let mut upgraded = upgrade_to_echo(&cp, s.inbound, 0).await;
    assert_eq!(
        round_trip(&mut upgraded, b"before").await.unwrap(),
        b"before"
    );

    push_to(&cp, snapshot(2, "deny", vec![]), 1).await;
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), upgraded.read_to_end(&mut rest))
        .await
        .expect("the upgraded connection of a denied caller stayed open");
    assert!(
        closed.is_err() || rest.is_empty(),
        "the upgraded connection still carried bytes: {rest:?}"
    );
}

/// An HTTP/2 app whose every answer is endless: 16 KiB chunks, as many as
/// the sidecar takes. It counts the bytes of answers it has handed over.
async fn endless_h2_app() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    const CHUNK: usize = 16 * 1024;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handed = Arc::new(AtomicUsize::new(0));
    let count = handed.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let count = count.clone();
            let service =
                hyper::service::service_fn(move |_: ::http::Request<hyper::body::Incoming>| {
                    let count = count.clone();
                    let chunk = bytes::Bytes::from(vec![b'e'; CHUNK]);
                    let chunks = tokio_stream::iter(std::iter::repeat_with(move || {
                        count.fetch_add(CHUNK, Ordering::SeqCst);
                        Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(chunk.clone()))
                    }));
                    let answer = ::http::Response::new(http_body_util::StreamBody::new(chunks));
                    std::future::ready(Ok::<_, std::convert::Infallible>(answer))
                });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service),
            );
        }
    });
    (addr, handed)
}

/// One HTTP/2 frame: its header and `payload`.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut frame = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    frame.extend([kind, flags]);
    frame.extend(stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// An HTTP/2 caller may open windows as large as it likes and then read
/// nothing: the answers of its streams pile up in the sidecar only as far
/// as [`trellis_proxy::http::H2_STREAM_SEND_BUFFER`] a stream. The caller
/// here writes its frames by hand (a client library would read): the
/// largest windows, 200 streams (as many as the sidecar lets a connection
/// have) asking for endless answers, and never a byte read. What the app
/// has handed over and the caller has not read is in the sidecar, its
/// connection to the app and the sockets between: it stops growing well
/// under 40 MiB (200 KiB a stream). With hyper's default of 400 KiB a
/// stream it passed 80 MiB, and a few such connections could exhaust the
/// sidecar's memory.
#[tokio::test]
async fn an_http2_caller_that_reads_nothing_holds_little_in_the_sidecar() {
    use std::sync::atomic::Ordering;
    const STREAMS: usize = 200;
    const BOUND: usize = STREAMS * 200 * 1024;
    let cp = FakeControlPlane::start(CERT_TTL).await;
    let (app, handed) = endless_h2_app().await;
    let s = sidecar(&cp, app, &[]).await;
    push_to(&cp, snapshot(1, "allow-mesh", vec![]), 1).await;
    let mut caller = connect(&cp, s.inbound, &web()).await;
    let mut frames = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    const MAX_WINDOW: u32 = 0x7fff_ffff;
    // SETTINGS_INITIAL_WINDOW_SIZE, and the connection's window raised by
    // WINDOW_UPDATE from its initial 65,535.
    let mut settings = 4u16.to_be_bytes().to_vec();
    settings.extend(MAX_WINDOW.to_be_bytes());
    frames.extend(h2_frame(0x4, 0, 0, &settings));
    frames.extend(h2_frame(0x8, 0, 0, &(MAX_WINDOW - 65_535).to_be_bytes()));
    // GET, http, /, and `:authority: api` (HPACK: indexed fields, then a
    // literal not indexed), ending the stream and its headers.
    let head = [0x82, 0x86, 0x84, 0x01, 0x03, b'a', b'p', b'i'];
    for n in 0..STREAMS as u32 {
        frames.extend(h2_frame(0x1, 0x5, 1 + 2 * n, &head));
    }
    caller.write_all(&frames).await.unwrap();
    caller.flush().await.unwrap();
    // Until it stops growing: nothing more for half a second.
    let mut before = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = handed.load(Ordering::SeqCst);
        assert!(
            now <= BOUND,
            "{} MiB of answers handed over and not read, and growing",
            now >> 20
        );
        if now == before {
            break;
        }
        before = now;
    }
    assert!(
        before >= STREAMS * 16 * 1024,
        "the answers of the {STREAMS} streams were not all flowing: {before} bytes"
    );
}

/// An HTTP/1.1 and HTTP/2 app that answers with the authority it reads
/// (HTTP/2's `:authority`, else `Host`), a space, and the `Host` headers
/// it got, joined by commas.
async fn authority_app() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let service =
                hyper::service::service_fn(|req: ::http::Request<hyper::body::Incoming>| {
                    let hosts: Vec<&str> = req
                        .headers()
                        .get_all("host")
                        .iter()
                        .map(|h| h.to_str().unwrap())
                        .collect();
                    let read = match req.uri().authority() {
                        Some(authority) => authority.as_str(),
                        None => hosts.first().copied().unwrap_or("-"),
                    };
                    let text = format!("{read} {}", hosts.join(","));
                    let answer =
                        ::http::Response::new(http_body_util::Full::new(bytes::Bytes::from(text)));
                    std::future::ready(Ok::<_, std::convert::Infallible>(answer))
                });
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                .await;
            });
        }
    });
    addr
}

/// The app reads the authority the caller named, over HTTP/2 as over
/// HTTP/1.1, and the rules on `Host` read the same: the caller's
/// `:authority` reaches the app as `:authority`, with a `Host` naming the
/// same (never the app's own address beside the caller's `Host`, a request
/// RFC 9113, section 8.3.1, calls malformed, whose host an app reads as
/// one or the other depending on its server), and a caller's `Host`
/// without `:authority` becomes it. A rule denying `host: admin` denies
/// the HTTP/2 request naming `admin` in `:authority` alone.
#[tokio::test]
async fn the_app_and_the_rules_read_the_authority_the_caller_named() {
    let cp = FakeControlPlane::start(CERT_TTL).await;
    let s = sidecar(&cp, authority_app().await, &[]).await;
    let no_admin = api_policy("no-admin", "DENY", "{to: [{headers: {host: admin}}]}");
    push_to(&cp, snapshot(1, "allow-mesh", vec![no_admin]), 1).await;

    let mut c1 = h1(&cp, s.inbound, &web()).await;
    let answer = text(c1.send_request(get("/x", &[])).await.unwrap()).await;
    assert_eq!(
        answer,
        (::http::StatusCode::OK, "api api".into()),
        "HTTP/1.1"
    );

    let mut c2 = h2(&cp, s.inbound, &web()).await;
    let cases = [
        ("http://api/x", Some("api"), 200, "api api"),
        ("http://api/x", None, 200, "api api"),
        (
            "http://admin/x",
            None,
            403,
            "trellis: denied by policy b/no-admin rule 0\n",
        ),
    ];
    for (uri, host, status, seen) in cases {
        let mut req = ::http::Request::get(uri).version(::http::Version::HTTP_2);
        if let Some(host) = host {
            req = req.header("host", host);
        }
        let req = req
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let (got, body) = text(c2.send_request(req).await.unwrap()).await;
        assert_eq!(
            (got.as_u16(), body.as_str()),
            (status, seen),
            "HTTP/2 {uri} with Host {host:?}"
        );
    }

    // No `:authority`, only `Host` (hyper's client always sends the
    // former): frames by hand, GET, http, / and `host: api` (HPACK: indexed
    // fields, then a literal not indexed with the static table's name 38).
    let (mut from, mut to) = tokio::io::split(connect(&cp, s.inbound, &web()).await);
    let mut frames = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frames.extend(h2_frame(0x4, 0, 0, &[]));
    let head = [0x82, 0x86, 0x84, 0x0f, 38 - 15, 0x03, b'a', b'p', b'i'];
    frames.extend(h2_frame(0x1, 0x5, 1, &head));
    to.write_all(&frames).await.unwrap();
    to.flush().await.unwrap();
    let body = tokio::time::timeout(Duration::from_secs(10), async {
        let mut body = Vec::new();
        loop {
            let mut head = [0u8; 9];
            from.read_exact(&mut head)
                .await
                .expect("the answer's frames");
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0; len];
            from.read_exact(&mut payload).await.unwrap();
            let (kind, flags) = (head[3], head[4]);
            assert_ne!(kind, 0x3, "the stream was reset");
            if kind == 0x0 {
                body.extend(payload);
                if flags & 0x1 != 0 {
                    return String::from_utf8(body).unwrap();
                }
            }
        }
    })
    .await
    .expect("no answer to the request without :authority");
    assert_eq!(body, "api api", "HTTP/2, Host without :authority");
}

/// A TLS connection as `client` to `inbound` that settled `h2` by ALPN.
async fn h2_by_alpn(
    cp: &FakeControlPlane,
    inbound: std::net::SocketAddr,
    client: &trellis_core::SpiffeId,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut config = (*cp.ca.client_config(Some((&cp.ca, client)))).clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tls = tls_connect(inbound, std::sync::Arc::new(config))
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    tls
}

/// Everything the sidecar sends until it closes the connection (an error
/// after its data, a reset or a close without `close_notify`, ends it too).
async fn until_closed(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the connection is still open; it sent {got:?}"),
        }
    }
}

/// A caller that settles `h2` by ALPN and then sends no preface, or only
/// part of it, would hold its connection and its TLS state for ever: the
/// HTTP/2 server waits for the preface without a timeout. It is closed
/// once the detection timeout has passed, counted and logged naming it.
#[tokio::test]
async fn an_http2_caller_that_sends_no_preface_is_closed() {
    let (logs, _guard) = common::sidecar::Logs::capture(false);
    let (cp, app, s) = app_behind_sidecar().await;
    push_to(&cp, snapshot(1, "allow-mesh", vec![]), 1).await;

    let mut silent = h2_by_alpn(&cp, s.inbound, &web()).await;
    assert_eq!(until_closed(&mut silent).await, b"");
    let mut halfway = h2_by_alpn(&cp, s.inbound, &web()).await;
    halfway.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    assert_eq!(until_closed(&mut halfway).await, b"");
    // The preface alone, without the SETTINGS frame that must follow it.
    let mut no_settings = h2_by_alpn(&cp, s.inbound, &web()).await;
    no_settings
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(until_closed(&mut no_settings).await, b"");

    let series = "trellis_connections_total{direction=\"inbound\",outcome=\"no_preface\"}";
    eventually(&format!("{series} 3"), || s.has_sample(series, 3)).await;
    logs.wait_for(&[
        "WARN",
        "inbound HTTP/2 connection closed: no client preface",
        "peer=spiffe://td.test/ns/a/sa/web",
    ])
    .await;
    assert!(app.seen.paths().is_empty());
}

/// An HTTP/2 connection past its peer's share is refused with GOAWAY
/// (ENHANCE_YOUR_CALM, no stream processed, the limit named), counted by
/// the limit and logged naming the peer; the peer's first connections go
/// on serving, and another peer has a share of its own.
#[tokio::test]
async fn http2_connections_past_a_peers_share_are_refused() {
    let (logs, _guard) = common::sidecar::Logs::capture(false);
    let cp = FakeControlPlane::start(CERT_TTL).await;
    let app = http_app().await;
    let s = sidecar(&cp, app.addr, &["--max-h2-connections-per-peer", "2"]).await;
    push_to(&cp, snapshot(1, "allow-mesh", vec![]), 1).await;

    let request = |path: &str| {
        let mut req = get(&format!("http://api{path}"), &[]);
        *req.version_mut() = ::http::Version::HTTP_2;
        req
    };
    let mut held = Vec::new();
    for n in 0..2 {
        let tls = h2_by_alpn(&cp, s.inbound, &web()).await;
        let (mut c, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tls),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let (status, _) = text(c.send_request(request(&format!("/{n}"))).await.unwrap()).await;
        assert_eq!(status, 200);
        held.push(c);
    }

    // The third: its preface, SETTINGS and a request, answered with the
    // server's SETTINGS and GOAWAY.
    let mut third = h2_by_alpn(&cp, s.inbound, &web()).await;
    let mut frames = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frames.extend(h2_frame(0x4, 0, 0, &[]));
    let head = [0x82, 0x86, 0x84, 0x01, 0x03, b'a', b'p', b'i'];
    frames.extend(h2_frame(0x1, 0x5, 1, &head));
    third.write_all(&frames).await.unwrap();
    third.flush().await.unwrap();
    let got = until_closed(&mut third).await;
    assert!(got.len() >= 26, "no GOAWAY: {got:?}");
    assert_eq!(got[..9], [0, 0, 0, 4, 0, 0, 0, 0, 0], "SETTINGS first");
    assert_eq!(got[12], 0x7, "then GOAWAY: {got:?}");
    // Last stream 0 (nothing processed), ENHANCE_YOUR_CALM.
    assert_eq!(got[18..26], [0, 0, 0, 0, 0, 0, 0, 0xb]);
    // The debug data reads as every answer the sidecar writes itself.
    let debug = String::from_utf8_lossy(&got[26..]);
    assert_eq!(
        debug,
        "trellis: the peer holds 2 HTTP/2 connections from its address already"
    );

    let series = "trellis_h2_connections_refused_total{reason=\"per_peer\"}";
    eventually(&format!("{series} 1"), || s.has_sample(series, 1)).await;
    logs.wait_for(&[
        "WARN",
        "inbound HTTP/2 connection refused",
        "peer=spiffe://td.test/ns/a/sa/web",
        "limit=per_peer",
    ])
    .await;

    // The first two go on serving.
    for (n, c) in held.iter_mut().enumerate() {
        let (status, _) = text(
            c.send_request(request(&format!("/again{n}")))
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 200);
    }
    // Another peer has its own share.
    let mut other = h2(&cp, s.inbound, &id("/ns/c/sa/batch")).await;
    let (status, _) = text(other.send_request(request("/other")).await.unwrap()).await;
    assert_eq!(status, 200);
    assert!(s.has_sample(series, 1));
    assert_eq!(
        app.seen.paths(),
        ["/0", "/1", "/again0", "/again1", "/other"]
    );
}
