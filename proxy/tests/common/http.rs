//! HTTP fixtures: an app that reports what reached it (method, path,
//! version, the identity header) and echoes upgraded connections, hyper
//! clients over mTLS, a sidecar pair with an outbound route for curl and
//! tonic, and curl itself. The gRPC app is `common::grpc`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;
use trellis_core::SpiffeId;
use trellis_proto::discovery::v1 as dpb;

use super::control_plane::FakeControlPlane;
use super::sidecar::{TestSidecar, sidecar, sidecar_as};
use super::{tls_connect, web};

/// What reached the HTTP app: one entry per request, the values of
/// `x-trellis-peer-identity` it carried.
#[derive(Clone, Default)]
pub struct Seen(Arc<Mutex<Vec<SeenRequest>>>);

/// A path, and the identity header values that came with it.
type SeenRequest = (String, Vec<String>);

impl Seen {
    pub fn paths(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(p, _)| p.clone())
            .collect()
    }
    pub fn identities(&self) -> Vec<Vec<String>> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(_, i)| i.clone())
            .collect()
    }
}

pub struct HttpApp {
    pub addr: SocketAddr,
    pub seen: Seen,
}

type AppBody = BoxBody<Bytes, Infallible>;

/// An HTTP/1.1 and HTTP/2 app. Answers `METHOD PATH VERSION` as text;
/// `/stream` answers five chunks 20 ms apart; `/hang` never answers;
/// `/headers` answers the names of the headers it got, sorted, one a
/// line; an `Upgrade` request gets 101 and an echo of every byte after it.
pub async fn http_app() -> HttpApp {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Seen::default();
    let record = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let record = record.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let record = record.clone();
                    async move {
                        if req.uri().path() == "/hang" {
                            record.0.lock().unwrap().push(("/hang".into(), Vec::new()));
                            std::future::pending::<()>().await;
                        }
                        Ok::<_, Infallible>(answer(req, &record))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    HttpApp { addr, seen }
}

fn answer(mut req: Request<Incoming>, seen: &Seen) -> Response<AppBody> {
    let identities = req
        .headers()
        .get_all("x-trellis-peer-identity")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    let path = req.uri().path().to_owned();
    seen.0.lock().unwrap().push((path.clone(), identities));
    if req.headers().contains_key(http::header::UPGRADE) {
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(upgraded) = upgrade.await else { return };
            let (mut r, mut w) = tokio::io::split(TokioIo::new(upgraded));
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
        return Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "echo")
            .body(Full::new(Bytes::new()).boxed())
            .unwrap();
    }
    if path == "/headers" {
        let mut names: Vec<&str> = req.headers().keys().map(|n| n.as_str()).collect();
        names.sort();
        let text = names.join("\n");
        return Response::new(Full::new(Bytes::from(text)).boxed());
    }
    if path == "/stream" {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            for i in 0..5 {
                let chunk = Frame::data(Bytes::from(format!("chunk {i}\n")));
                if tx.send(Ok::<_, Infallible>(chunk)).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        return Response::new(StreamBody::new(ReceiverStream::new(rx)).boxed());
    }
    let text = format!("{} {} {:?}", req.method(), req.uri().path(), req.version());
    Response::builder()
        .header("x-app", "yes")
        .body(Full::new(Bytes::from(text)).boxed())
        .unwrap()
}

pub type Client1 = hyper::client::conn::http1::SendRequest<Full<Bytes>>;
pub type Client2 = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

/// An HTTP/1.1 connection as `client` straight to `inbound` over mTLS.
pub async fn h1(cp: &FakeControlPlane, inbound: SocketAddr, client: &SpiffeId) -> Client1 {
    let stream = connect(cp, inbound, client).await;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn.with_upgrades());
    send
}

/// What most HTTP tests start from: a fake control plane issuing hour-long
/// certificates, an [`http_app`], and a sidecar as `ns/b/sa/api` in front
/// of it with no further flags.
pub async fn app_behind_sidecar() -> (FakeControlPlane, HttpApp, TestSidecar) {
    let cp = FakeControlPlane::start(Duration::from_secs(3600)).await;
    let app = http_app().await;
    let s = sidecar(&cp, app.addr, &[]).await;
    (cp, app, s)
}

/// An HTTP/2 (prior knowledge) connection as `client` to `inbound`.
pub async fn h2(cp: &FakeControlPlane, inbound: SocketAddr, client: &SpiffeId) -> Client2 {
    let stream = connect(cp, inbound, client).await;
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    send
}

pub async fn connect(
    cp: &FakeControlPlane,
    inbound: SocketAddr,
    client: &SpiffeId,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let config = cp.ca.client_config(Some((&cp.ca, client)));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tls_connect(inbound, config.clone()).await {
            Ok(stream) => return stream,
            Err(e) => {
                assert!(std::time::Instant::now() < deadline, "no handshake: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// `GET path` with `headers`: the status and the body as text.
pub fn get(path: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut req = Request::get(path).header("host", "api");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.body(Full::new(Bytes::new())).unwrap()
}

pub async fn text(response: Response<Incoming>) -> (StatusCode, String) {
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A client sidecar (`ns/a/sa/web`) whose route listener leads to the
/// server sidecar (`ns/b/sa/api`, protecting `app`): the path app →
/// route → mTLS → inbound → app.
pub struct Pair {
    pub server: TestSidecar,
    pub client: TestSidecar,
    pub route: SocketAddr,
}

pub async fn pair(cp: &FakeControlPlane, app: SocketAddr, server_flags: &[&str]) -> Pair {
    let server = sidecar(cp, app, server_flags).await;
    let route = super::ports::free_addr();
    let flag = format!("{route}={}@{}", server.identity, server.inbound);
    let client = sidecar_as(cp, web(), app, &["--route", &flag]).await;
    Pair {
        server,
        client,
        route,
    }
}

/// Runs curl with `args` (silent, failing on no answer): its stdout, or
/// `None` after [`super::machine::skip`]ping with `skipped: curl not
/// installed`.
pub async fn curl(args: &[&str]) -> Option<String> {
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args(["-sS", "--max-time", "10"]).args(args);
    match cmd.output().await {
        Ok(out) => {
            assert!(
                out.status.success(),
                "curl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Some(String::from_utf8_lossy(&out.stdout).into_owned())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            super::machine::skip("skipped: curl not installed");
            None
        }
        Err(e) => panic!("curl: {e}"),
    }
}

/// Pushes `snapshot` and waits until `sidecars` sidecars acknowledged it.
pub async fn push_to(cp: &FakeControlPlane, snapshot: dpb::Snapshot, sidecars: usize) {
    use super::control_plane::answer_version;
    use trellis_proto::discovery::v1::watch_request::Kind;
    let version = snapshot.version;
    let before = cp.seen.lock().unwrap().answers.len();
    cp.push(snapshot);
    let acks = || {
        let seen = cp.seen.lock().unwrap();
        let answers = &seen.answers[before..];
        for a in answers {
            assert!(!matches!(a, Kind::Nack(_)), "NACKed: {a:?}");
        }
        answers
            .iter()
            .filter(|a| answer_version(a) == Some(version))
            .count()
    };
    super::eventually("every sidecar acknowledged the snapshot", || {
        acks() >= sidecars
    })
    .await;
}

/// A snapshot with the mesh default `default` and `policies`.
pub fn snapshot(
    version: u64,
    default: &str,
    policies: Vec<trellis_proto::policy::v1::Policy>,
) -> dpb::Snapshot {
    dpb::Snapshot {
        version,
        policies,
        mesh: Some(dpb::MeshConfig {
            default_policy: default.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}
