//! One request through the sidecar: taken from the caller ([`Exchange`],
//! cleaned of hop-by-hop headers and given the verified identity), passed
//! through the request stack's layers, sent to the app ([`forward`]: over a
//! parked app connection for HTTP/1, the app port's one connection for
//! HTTP/2), and answered with the app's streamed response, or with a short
//! local answer ([`local`]) when the sidecar refuses it.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::header::HeaderName;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::{Body as _, Incoming};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::AbortHandle;

use trellis_core::duration::Words;
use trellis_core::refusal::{self, token};

use super::access::{Counted, Direction, Entry};
use super::h1::BODY_STALL;
use super::upstream::SendError;
use super::{Body, Connection, Protocol, RequestBody, headers};
use crate::metrics::{INBOUND, Metrics};
use crate::net;

/// The body of a response before it is counted: the app's or the sidecar's.
pub type LocalBody = Either<Incoming, Full<Bytes>>;

/// gRPC status codes the sidecar answers with.
#[derive(Debug, Clone, Copy)]
pub enum GrpcCode {
    InvalidArgument = refusal::GRPC_INVALID_ARGUMENT as isize,
    PermissionDenied = refusal::GRPC_PERMISSION_DENIED as isize,
    ResourceExhausted = refusal::GRPC_RESOURCE_EXHAUSTED as isize,
    Unavailable = refusal::GRPC_UNAVAILABLE as isize,
}

pub use refusal::is_grpc;

/// One request on its way through the request stack of a connection
/// ([`Authorize`](super::authz::Authorize), then
/// [`RateLimit`](super::ratelimit::RateLimit), then [`forward`]). A layer
/// that refuses it answers with [`finish`], having said why in `entry`.
pub struct Exchange<B = Incoming> {
    pub request: Request<B>,
    /// Written to the access log and the metrics when the request is over.
    pub entry: Entry,
    /// Whether answers carry `grpc-status` (a gRPC request).
    pub grpc: bool,
    /// Whether it asks to switch protocols (an HTTP/1.1 upgrade).
    pub upgrading: bool,
    /// Whether its header list, as the caller sent it, is over
    /// [`H2_MAX_HEADER_LIST`](super::H2_MAX_HEADER_LIST) (HTTP/2 only: an
    /// HTTP/1 head is bounded as it is read).
    pub headers_too_large: bool,
}

impl<B> Exchange<B> {
    /// Takes `req` from the caller: hop-by-hop headers removed and the
    /// verified identity set before any layer decides, so rules on headers
    /// see what the app will see.
    pub fn start(conn: &Arc<Connection>, mut req: Request<B>, protocol: Protocol) -> Self {
        let entry = Entry::start(conn.clone(), &req, protocol.as_str());
        let grpc = is_grpc(&req);
        let headers_too_large = req.version() == Version::HTTP_2
            && headers::h2_header_list_size(&req) > super::H2_MAX_HEADER_LIST;
        let upgrading = req.version() == Version::HTTP_11 && headers::is_upgrade(req.headers());
        headers::remove_hop_by_hop(req.headers_mut(), upgrading);
        headers::set_identity(req.headers_mut(), &conn.identity);
        // An HTTP/2 request names its authority in `:authority`, an
        // HTTP/1 request in absolute form (`GET http://api/x`) in its
        // target: that is its host, which the app gets and rules on `Host`
        // read (RFC 9112 section 3.2.2; a `Host` beside it names the same,
        // [`l7::host_problem`](trellis_core::policy::l7::host_problem)).
        // An HTTP/1 request in origin form names none but its `Host`.
        if let Some(authority) = req.uri().authority()
            && !req.headers().contains_key(http::header::HOST)
        {
            let host = conn.host_value(authority);
            req.headers_mut().insert(http::header::HOST, host);
        }
        Exchange {
            request: req,
            entry,
            grpc,
            upgrading,
            headers_too_large,
        }
    }
}

/// The answer to an HTTP/2 request whose app answered the sidecar's HTTP/2
/// connection with something else.
pub const NOT_HTTP2: &str = "the app did not answer in HTTP/2: the request came in HTTP/2, and the \
                             sidecar sends each request to the app in the version it came in";

/// The end of the stack: sends the request to the app and streams the
/// app's response back.
pub async fn forward(
    conn: Arc<Connection>,
    exchange: Exchange,
) -> Result<Response<Body>, Infallible> {
    let Exchange {
        request: mut req,
        entry,
        grpc,
        upgrading,
        ..
    } = exchange;
    let entry = Arc::new(entry);
    let http_1_0 = req.version() == Version::HTTP_10;
    let from_client = upgrading.then(|| hyper::upgrade::on(&mut req));
    let req = req.map(|body| Counted::new(body, entry.clone(), Direction::In));
    if req.body().is_end_stream() {
        // Nothing will read a body that has no bytes.
        entry.end_body();
    }
    let sent = if req.version() == Version::HTTP_2 {
        to_app_h2(&conn, req).await
    } else {
        let sent = conn
            .upstream
            .send(req, &conn.authority, !upgrading, &conn.http.metrics)
            .await;
        // An answer in before the body: the rest of the body is watched.
        if sent.is_ok()
            && !upgrading
            && !entry.body_ended()
            && let Some(app) = conn.upstream.ender()
        {
            watch_body(&entry, app);
        }
        sent
    };
    let mut response = match sent {
        Ok(response) => response.map(Either::Left),
        Err(e) => match malformed_chunk(&e) {
            Some(fault) => malformed_chunk_answer(&conn, grpc, fault),
            None => app_failed(&conn, grpc, e),
        },
    };
    let switched = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    match from_client {
        Some(from_client) if switched => {
            let from_app = hyper::upgrade::on(&mut response);
            conn.hold_upgraded(Box::pin(splice(
                from_client,
                from_app,
                conn.http.metrics.clone(),
            )));
        }
        _ => {}
    }
    headers::remove_hop_by_hop(response.headers_mut(), switched && upgrading);
    if http_1_0 {
        mark_for_http_1_0(&mut response);
    } else if response.version() == Version::HTTP_10 {
        // An HTTP/1.1 caller is answered in the sidecar's own version,
        // not the app's (RFC 9110 section 6.2). hyper writes the status
        // line from this mark, and frames an answer of unknown length
        // (one the app ended by closing) chunked, which the caller reads
        // to its end on a connection that goes on.
        *response.version_mut() = Version::HTTP_11;
    }
    entry.set_status(response.status());
    Ok(response.map(|body| Counted::new(body, entry, Direction::Out)))
}

/// Marks the answer to an HTTP/1.0 request so that hyper's server keeps
/// the caller's connection when, and only when, it can. hyper answers an
/// HTTP/1.0 caller in HTTP/1.0 whatever the answer is marked, and decides
/// by the mark: one marked HTTP/1.1 says `connection: keep-alive` if the
/// caller asked for it (and the connection is not closing), and the
/// connection is kept; one marked HTTP/1.0 without `Connection:
/// keep-alive` closes it. Left as it comes, the mark is the app's
/// version, and the app's `Connection` is removed with the other
/// hop-by-hop headers (it spoke of the app's own connection): an app
/// answering in HTTP/1.0 would close every keep-alive caller's
/// connection, and one answering in HTTP/1.1 would have callers told
/// keep-alive on an answer that then ends by closing. So it is marked
/// from the answer's framing: HTTP/1.1 when its length is
/// known (a `Content-Length`, or no body), HTTP/1.0 when it is not, for
/// HTTP/1.0 has no chunked coding and such an answer ends by closing
/// (RFC 9112 section 9.3 and appendix C.2.2).
fn mark_for_http_1_0<B: hyper::body::Body>(response: &mut Response<B>) {
    let body = response.body();
    let length_known = body.is_end_stream()
        || body.size_hint().exact().is_some()
        || response
            .headers()
            .contains_key(http::header::CONTENT_LENGTH);
    *response.version_mut() = if length_known {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
}

/// The answer to a request the app failed: 502.
fn app_failed(conn: &Connection, grpc: bool, e: SendError) -> Response<LocalBody> {
    tracing::warn!(peer = %conn.peer, app = %conn.target, error = %e, "request to the app failed");
    // An answer hyper could not read one way only (two lengths, a
    // malformed head) is the app's fault, not its absence.
    let (reason, message) = match &e {
        SendError::Request(e) if e.is_parse() => (
            token::INVALID_APP_ANSWER,
            Bytes::from_static(b"invalid answer from the app"),
        ),
        // It is up, but HTTP/1 only: the request came in HTTP/2
        // and is sent on in the version it came in.
        SendError::NotHttp2(_) => (
            token::APP_NOT_HTTP2,
            Bytes::from_static(NOT_HTTP2.as_bytes()),
        ),
        SendError::Connect(io) => (
            token::APP_UNREACHABLE,
            app_unreachable(conn.target, &connect_failure(io)),
        ),
        other => (
            token::APP_UNREACHABLE,
            app_unreachable(conn.target, &format!("failed the request ({other})")),
        ),
    };
    local(
        grpc,
        StatusCode::BAD_GATEWAY,
        GrpcCode::Unavailable,
        reason,
        message,
    )
}

/// What a caller is told when the app at `app` was not reached, or failed
/// the request, for `cause` ([`connect_failure`], say): `app unreachable:
/// the app at 127.0.0.1:8080 refused the connection`.
pub fn app_unreachable(app: std::net::SocketAddr, cause: &str) -> Bytes {
    format!("app unreachable: the app at {app} {cause}").into()
}

/// Why connecting to the app failed, as [`app_unreachable`] words it.
pub fn connect_failure(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "refused the connection".to_owned(),
        std::io::ErrorKind::TimedOut => "did not accept the connection in time".to_owned(),
        _ => format!("could not be connected to ({e})"),
    }
}

/// What a caller whose chunked request body does not parse is told, before
/// the fault found in it (the size line, the end of a chunk), by the
/// forwarder or by hyper's server.
pub const MALFORMED_CHUNK: &str = "malformed chunked request body";

/// Logs a caller's chunked request body that does not parse (`fault`):
/// the caller's fault, not the app's. Both paths log it so.
pub fn log_malformed_chunk(conn: &Connection, fault: &dyn std::fmt::Display) {
    tracing::info!(peer = %conn.peer, error = %fault, "the caller sent a malformed chunked request body");
}

/// The answer to a request whose chunked body does not parse, on either
/// path: 400, [`MALFORMED_CHUNK`] and the `fault`, logged as the caller's
/// ([`log_malformed_chunk`]).
pub fn malformed_chunk_answer(
    conn: &Connection,
    grpc: bool,
    fault: &dyn std::fmt::Display,
) -> Response<LocalBody> {
    log_malformed_chunk(conn, fault);
    local(
        grpc,
        StatusCode::BAD_REQUEST,
        GrpcCode::InvalidArgument,
        token::INVALID_REQUEST,
        format!("{MALFORMED_CHUNK}: {fault}"),
    )
}

/// The fault in the caller's chunked body that failed the request, if that
/// is what did: hyper's client stopped on an error of the body it was
/// sending, and the body's error is hyper's server refusing a chunk. The
/// request is the caller's fault then, not the app's: the app may have
/// read part of the body, but not an answer to it.
fn malformed_chunk(e: &SendError) -> Option<&std::io::Error> {
    let SendError::Request(e) = e else {
        return None;
    };
    if !e.is_user() {
        return None;
    }
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::{InvalidData, InvalidInput};
            return matches!(io.kind(), InvalidData | InvalidInput).then_some(io);
        }
        source = cause.source();
    }
    None
}

/// The rest of an HTTP/1 request body whose answer came first, watched:
/// once [`BODY_STALL`] passes without a byte of it reaching the app, its
/// app connection is ended, and with it the request (the caller's
/// connection closes after the answer). An app that answered without
/// reading the body and keeps its end open would otherwise hold both
/// connections; the forwarder ([`super::h1`]) bounds its own requests'
/// bodies alike. The watch ends with the request or its body.
fn watch_body(entry: &Arc<Entry>, app: AbortHandle) {
    let mut before = entry.bytes_in();
    let entry = Arc::downgrade(entry);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(BODY_STALL).await;
            let Some(now) = entry.upgrade().filter(|e| !e.body_ended()) else {
                return;
            };
            let sent = now.bytes_in();
            if sent == before {
                tracing::debug!(
                    "the rest of the body did not move for {} after the answer: ending its app \
                     connection",
                    Words(BODY_STALL)
                );
                app.abort();
                return;
            }
            before = sent;
        }
    });
}

/// Sends an HTTP/2 request over the connection's own HTTP/2 connection to
/// the app. Its `:authority` is the one the caller named, as an HTTP/1
/// request keeps its `Host`: the caller's `:authority`, else its `Host`,
/// else the app's address. The app gets no `Host` that names another
/// authority than `:authority` (RFC 9113 section 8.3.1), and reads the
/// same host on either version.
async fn to_app_h2(
    conn: &Connection,
    mut req: Request<RequestBody>,
) -> Result<Response<Incoming>, SendError> {
    let mut parts = std::mem::take(req.uri_mut()).into_parts();
    parts.scheme = Some(Scheme::HTTP);
    if parts.authority.is_none() {
        // Rare: HTTP/2 clients name the authority in `:authority`.
        let host = req.headers().get(http::header::HOST);
        let host = host.and_then(|h| Authority::try_from(h.as_bytes()).ok());
        parts.authority = Some(host.unwrap_or_else(|| conn.authority.clone()));
    }
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    *req.uri_mut() = Uri::from_parts(parts).expect("scheme, authority and path make a URI");
    conn.h2
        .get_or_init(super::app_h2::AppH2::default)
        .send(conn.target, req, &conn.http.metrics)
        .await
}

/// A response the sidecar wrote instead of the app, logged with `entry`.
pub fn finish(entry: Entry, response: Response<LocalBody>) -> Response<Body> {
    entry.set_status(response.status());
    let entry = Arc::new(entry);
    response.map(|body| Counted::new(body, entry, Direction::Out))
}

/// Copies bytes between the two upgraded connections until both are done,
/// counting them in `trellis_bytes_total`. A connection ends as a TCP
/// connection through the mesh does: each side's end (FIN, or the caller's
/// `close_notify`) is passed on after its last byte as a half-close, and a
/// reset or a failure of one side is a reset of the other. The app's
/// socket is reset unless the copy ended cleanly (`net::ResetIfCut`, so
/// also when new policies drop the copy); the caller's connection is then
/// dropped without `close_notify`, which the caller's sidecar takes for a
/// reset and passes on to its app as one.
async fn splice(client: OnUpgrade, app: OnUpgrade, metrics: Arc<Metrics>) {
    let app = match app.await {
        Ok(app) => app,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    // Every HTTP/1 app connection is one `upstream::dial` made: its own
    // socket, reset when the copy is cut (and when the caller's side of
    // the switch fails, below). What hyper read past the 101 is the app's
    // first bytes of the new protocol.
    let app = app
        .downcast::<TokioIo<TcpStream>>()
        .map(|parts| (net::ResetIfCut::tcp(parts.io.into_inner()), parts.read_buf));
    let mut client = match client.await {
        Ok(client) => TokioIo::new(client),
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let (copied, early) = match app {
        Ok((mut app, early)) => {
            let copied = match write_early(&mut client, &early).await {
                Ok(()) => net::copy(&mut client, &mut *app).await,
                Err(e) => net::Copied {
                    there: 0,
                    back: 0,
                    error: Some(e),
                    wrote_after_cut: None,
                },
            };
            if copied.error.is_none() {
                app.ended();
            }
            (copied, early.len() as u64)
        }
        // Not a connection `upstream::dial` made: copied as hyper hands it
        // over.
        Err(app) => (net::copy(&mut client, &mut TokioIo::new(app)).await, 0),
    };
    metrics.bytes(INBOUND, early + copied.there + copied.back);
    if let Some(e) = copied.error {
        // `client` is dropped without `close_notify`: a cut, not an end,
        // which the caller's sidecar passes on to its app as a reset. Its
        // socket is not reset here (hyper's upgraded stream hides it): a
        // TLS end without `close_notify` says the cut alone, and still
        // delivers the bytes written before it, which a reset could lose.
        tracing::debug!(error = %e, "upgraded connection ended with an error");
    }
}

/// Writes `early`, the app's bytes read with its 101, to the caller.
async fn write_early<W>(client: &mut W, early: &[u8]) -> std::io::Result<()>
where
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    if early.is_empty() {
        return Ok(());
    }
    client.write_all(early).await?;
    client.flush().await
}

/// The header on every answer the sidecar makes itself instead of the app,
/// naming why in a fixed token ([`local`]): an app's own 403 or 502 has
/// none.
pub const PROXY_ERROR: HeaderName = refusal::PROXY_ERROR;

/// An answer from the sidecar itself: `status` with `message` as a text
/// body, or for gRPC HTTP 200 with `grpc-status` and `grpc-message` in a
/// trailers-only response ([`refusal::local_answer`]), the text starting
/// with `trellis: `; either way with [`PROXY_ERROR`]`: reason`, a fixed
/// token (`denied`, `rate_limited`, `invalid_request`,
/// `app_unreachable`...).
pub fn local(
    grpc: bool,
    status: StatusCode,
    code: GrpcCode,
    reason: &'static str,
    message: impl Into<Bytes>,
) -> Response<LocalBody> {
    let answer = refusal::local_answer(grpc, status, code as u16, Some(reason), message.into());
    answer.map(Either::Right)
}

/// [`local`] with a text built once for many answers (a denial by one
/// rule, [`refusal::prepared_answer`]): the answer shares it, no copy made.
pub fn local_prepared(
    grpc: bool,
    status: StatusCode,
    code: GrpcCode,
    reason: &'static str,
    text: &refusal::AnswerText,
) -> Response<LocalBody> {
    let answer = refusal::prepared_answer(grpc, status, code as u16, reason, text);
    answer.map(Either::Right)
}
