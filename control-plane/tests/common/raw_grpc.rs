//! gRPC calls made by hand over HTTP/2, for requests no tonic client sends:
//! a message that does not decode, one announced and never finished, a
//! stream reset.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::StreamBody;
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{ControlPlane, Svid};

/// What keeps a hand-made request's body open: dropped, the body ends;
/// sent an error, the stream is reset (RST_STREAM, INTERNAL_ERROR).
pub type BodySender = mpsc::Sender<Result<Frame<Bytes>, io::Error>>;

/// How long a hand-made call waits for its answer's head.
const PATIENCE: Duration = Duration::from_secs(40);

/// Calls `path` (`/package.Service/Method`) on a new TLS connection to the
/// gRPC port, presenting `svid`'s certificate (or none), the request's body
/// beginning with `first`: the answer's head, and what keeps the body open.
pub async fn call(
    cp: &ControlPlane,
    svid: Option<&Svid>,
    path: &str,
    first: Bytes,
) -> (http::Response<Incoming>, BodySender) {
    let (body, rx) = mpsc::channel(4);
    body.send(Ok(Frame::data(first))).await.unwrap();
    (send(cp, cp.client_config(svid), path, rx).await, body)
}

/// Calls `path` as [`call`] does, the request's body `whole` and ended
/// before the answer is awaited: the answer's head.
pub async fn call_ended(
    cp: &ControlPlane,
    svid: Option<&Svid>,
    path: &str,
    whole: Bytes,
) -> http::Response<Incoming> {
    call_ended_with(cp, cp.client_config(svid), path, whole).await
}

/// Calls `path` as [`call_ended`] does, presenting the operator SVID the
/// control plane wrote into its state dir: the answer's head.
pub async fn admin_call_ended(
    cp: &ControlPlane,
    path: &str,
    whole: Bytes,
) -> http::Response<Incoming> {
    let config = trellis_control_plane::ctl::AdminCredentials::in_state_dir(&cp.state_dir)
        .client_config()
        .expect("the operator's credentials");
    call_ended_with(cp, config, path, whole).await
}

/// Calls `path` as [`call_ended`] does, on a connection made with `config`
/// (a peer replica's, say): the answer's head.
pub async fn call_ended_with(
    cp: &ControlPlane,
    config: rustls::ClientConfig,
    path: &str,
    whole: Bytes,
) -> http::Response<Incoming> {
    let (body, rx) = mpsc::channel(1);
    body.send(Ok(Frame::data(whole))).await.unwrap();
    drop(body);
    send(cp, config, path, rx).await
}

/// Sends a request of `path` on a connection made with `config`, its
/// body what `rx` receives: the answer's head.
async fn send(
    cp: &ControlPlane,
    config: rustls::ClientConfig,
    path: &str,
    rx: mpsc::Receiver<Result<Frame<Bytes>, io::Error>>,
) -> http::Response<Incoming> {
    let tcp = tokio::net::TcpStream::connect(&cp.grpc).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("a TLS handshake with the gRPC port");
    let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake::<_, StreamBody<ReceiverStream<Result<Frame<Bytes>, io::Error>>>>(TokioIo::new(
            tls,
        ))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = http::Request::post(format!("http://{}{path}", cp.grpc))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(StreamBody::new(ReceiverStream::new(rx)))
        .unwrap();
    tokio::time::timeout(PATIENCE, sender.send_request(request))
        .await
        .unwrap_or_else(|_| panic!("{path} never answered"))
        .expect("an answer")
}
