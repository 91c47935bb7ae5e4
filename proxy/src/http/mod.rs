//! HTTP awareness on the inbound path: after the connection is
//! authenticated and allowed at L4, ALPN or [`detect()`] tells HTTP/1.x and
//! HTTP/2 from opaque bytes, and [`serve`] proxies HTTP request by request
//! to the local app: HTTP/1.1 requests whose framing has one reading
//! through the sidecar's own forwarder ([`h1`]), the others and HTTP/2
//! with hyper. (The outbound listeners run [`detect()`] too, only to
//! choose the ALPN they offer.)
//!
//! On hyper's path each request goes through a tower stack (the forwarder
//! calls the same layers itself): authorized on its own (method,
//! path, headers, gRPC service; [`authz`]), checked against the rate
//! limits ([`ratelimit`]), then forwarded. It carries the caller's verified
//! identity in [`PEER_IDENTITY`](headers::PEER_IDENTITY), goes to the app
//! over keep-alive connections (HTTP/1 on app connections parked between
//! requests, [`upstream`]; HTTP/2 on one connection to the app port for
//! each caller connection, which its streams share, [`app_h2`], so gRPC
//! works), and
//! its body streams through, never buffered whole.
//! Upgrades (WebSocket) switch to a byte copy once the app agrees. A
//! denied request never reaches the app and does not end the connection.
//!
//! This module never decides at L4 and never touches TLS: the listener in
//! `inbound` has done both before calling [`serve`].

pub mod access;
pub mod app_h2;
pub mod authz;
pub mod detect;
pub mod h1;
pub mod headers;
pub mod proxy;
pub mod ratelimit;
#[cfg(test)]
pub(crate) mod test_app;
pub mod upstream;

use std::cell::RefCell;
use std::convert::Infallible;
use std::future::{Ready, ready};
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures::future;
use http::uri::Authority;
use http::{HeaderValue, Request, Response};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tower::ServiceBuilder;
use trellis_core::SpiffeId;
use trellis_core::gather::GatheredWrites;
use trellis_core::http1::{HeadFault, Heads, end_connection};
use trellis_core::logging::keyed::Keyed;

pub use access::ACCESS_TARGET;
pub use detect::{Protocol, detect, detect_after, h2_preface};
pub use trellis_core::http1::Rewind;

use access::Counted;
use app_h2::AppH2;
use authz::AuthorizeLayer;
use proxy::{Exchange, LocalBody};
use ratelimit::RateLimitLayer;
use upstream::{AppConnections, Upstream};

use crate::metrics::Metrics;
use crate::policy::Policies;

/// A response body: the app's, streamed, or one the sidecar wrote,
/// counted for the access log.
pub type Body = Counted<Either<Incoming, Full<Bytes>>>;
/// A request body on its way to the app, counted.
type RequestBody = Counted<Incoming>;

/// What every HTTP connection of the sidecar shares: the app connections
/// parked between HTTP/1 callers.
pub struct Http {
    app: Arc<AppConnections>,
    /// The app connections of the HTTP/1 forwarder ([`h1`]), parked
    /// between requests.
    h1: AppConnections<h1::AppStream>,
    pub metrics: Arc<Metrics>,
    /// Whether each request is written to the access log.
    pub access_log: bool,
    /// The pauses between log lines of requests the sidecar refused
    /// ([`access::Entry::log_refusal`]), by kind and policy.
    refusals: Keyed<access::RefusalKey>,
    /// How long an HTTP/2 caller may send nothing before it is pinged, and
    /// how long it then has to answer ([`H2_KEEP_ALIVE_INTERVAL`],
    /// [`H2_KEEP_ALIVE_TIMEOUT`]; shorter in tests).
    h2_keep_alive: (Duration, Duration),
}

impl Http {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self::with_access_log(metrics, true)
    }

    pub fn with_access_log(metrics: Arc<Metrics>, access_log: bool) -> Self {
        Http {
            app: Arc::default(),
            h1: AppConnections::default(),
            metrics,
            access_log,
            refusals: Keyed::new(
                crate::inbound::REFUSAL_LOG_PAUSE,
                access::REFUSAL_POLICIES_LOGGED,
            ),
            h2_keep_alive: (H2_KEEP_ALIVE_INTERVAL, H2_KEEP_ALIVE_TIMEOUT),
        }
    }

    /// HTTP/2 callers pinged after `interval` of silence and closed when
    /// they do not answer within `timeout`.
    #[cfg(test)]
    fn with_h2_keep_alive(mut self, interval: Duration, timeout: Duration) -> Self {
        self.h2_keep_alive = (interval, timeout);
        self
    }
}

/// One HTTP connection from a verified peer, to the app at `target`.
pub struct Connection {
    pub http: Arc<Http>,
    pub peer: SpiffeId,
    /// The peer's SPIFFE ID as the header value, built once.
    pub identity: HeaderValue,
    pub target: SocketAddr,
    /// `target` as a URI authority, built once.
    pub authority: Authority,
    pub policies: watch::Receiver<Option<Arc<Policies>>>,
    /// The app connection of this connection's HTTP/1 request in flight.
    upstream: Upstream,
    /// The byte copy between the caller and the app once an HTTP/1
    /// request has switched protocols (a WebSocket, say), run by
    /// [`serve`] after hyper hands the connection over: it stays part of
    /// the connection's life, so new policies that deny the caller and
    /// the sidecar's drain reach it as they reach any other connection.
    upgraded: std::sync::Mutex<Option<Upgraded>>,
    /// Whether an HTTP/1 request of the connection switched protocols: its
    /// stream is then the byte copy's, closed without lingering.
    switched: std::sync::atomic::AtomicBool,
    /// Whether the body of the connection's last HTTP/1 request on hyper's
    /// path had yet to arrive when hyper called the request stack: the
    /// caller may still be sending it when the connection closes, so the
    /// close lingers ([`h1::Lingering`]).
    body_unfinished: std::sync::atomic::AtomicBool,
    /// The access log's `source` and `destination` members, written once
    /// at the connection's first logged request.
    access_log_caller: std::sync::OnceLock<Box<[u8]>>,
    /// This connection's HTTP/2 connection to the app, made at its first
    /// HTTP/2 request. It is the caller's own: HTTP/2 flow control is per
    /// connection, so a caller that stops reading its answers stalls only
    /// its own streams, never another caller's.
    h2: std::sync::OnceLock<AppH2<RequestBody>>,
    /// The `:authority` of the connection's first HTTP/2 request without a
    /// `Host` (or the target authority of its first HTTP/1 request in
    /// absolute form without one), and the `Host` value made of it: the
    /// next requests, which name the same, take it without an allocation.
    h2_host: std::sync::OnceLock<(Authority, HeaderValue)>,
}

/// The byte copy of an upgraded connection.
pub type Upgraded = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

impl Connection {
    pub fn new(
        http: Arc<Http>,
        peer: SpiffeId,
        target: SocketAddr,
        policies: watch::Receiver<Option<Arc<Policies>>>,
    ) -> Self {
        let identity = HeaderValue::from_maybe_shared(Bytes::from(peer.to_string()))
            .expect("a SPIFFE ID is a valid header value");
        let authority =
            Authority::try_from(target.to_string()).expect("a socket address is a valid authority");
        let upstream = Upstream::new(http.app.clone(), target, peer.clone());
        Connection {
            http,
            peer,
            identity,
            target,
            authority,
            policies,
            upstream,
            upgraded: std::sync::Mutex::new(None),
            switched: std::sync::atomic::AtomicBool::new(false),
            body_unfinished: std::sync::atomic::AtomicBool::new(false),
            access_log_caller: std::sync::OnceLock::new(),
            h2: std::sync::OnceLock::new(),
            h2_host: std::sync::OnceLock::new(),
        }
    }

    /// `authority` as a `Host` value.
    fn host_value(&self, authority: &Authority) -> HeaderValue {
        let value = |a: &Authority| {
            HeaderValue::from_str(a.as_str()).expect("an authority is a valid header value")
        };
        let (first, host) = self
            .h2_host
            .get_or_init(|| (authority.clone(), value(authority)));
        if first.as_str() == authority.as_str() {
            host.clone()
        } else {
            value(authority)
        }
    }

    /// What every access-log line of this connection begins with: the
    /// caller's SPIFFE ID and the app's address.
    fn access_log_caller(&self) -> &[u8] {
        self.access_log_caller.get_or_init(|| {
            crate::logging::access::members(|line| {
                line.member("source", self.peer.as_str());
                line.member("destination", self.authority.as_str());
            })
        })
    }

    /// Keeps the byte copy of the connection's upgraded stream for
    /// [`serve`] to run.
    pub fn hold_upgraded(&self, copy: Upgraded) {
        self.switched
            .store(true, std::sync::atomic::Ordering::Relaxed);
        *self.upgraded.lock().unwrap_or_else(|e| e.into_inner()) = Some(copy);
    }

    /// Whether a request of the connection switched protocols.
    fn switched(&self) -> bool {
        self.switched.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the last request hyper served may have left its body
    /// unread.
    fn body_unfinished(&self) -> bool {
        self.body_unfinished
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn take_upgraded(&self) -> Option<Upgraded> {
        self.upgraded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

/// How long an HTTP/2 caller may send nothing before the sidecar pings
/// it. The ping goes end to end, to the caller's own HTTP/2 client: it
/// finds a caller that is gone or hung even where the TCP connection is
/// still answered (by a proxy between the two, say), and keeps an idle
/// connection from looking dead to anything between them.
pub const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(60);
/// How long an HTTP/2 caller has to answer a ping before its connection is
/// closed, with its streams and its connection to the app.
pub const H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// How much of an answer the sidecar holds for one stream of an HTTP/2
/// caller beyond what the caller has read: four frames of the app's, enough
/// that the connection always has the next one to write. A caller opens
/// windows as large as it likes and may then read nothing; hyper's default
/// (400 KiB) would let each of its 200 streams pile up that much, 80 MiB a
/// connection, and a few connections of one caller exhaust the sidecar's
/// memory. With this, a caller that does not read holds at most
/// this much (and a frame) for each stream, beside the window of its
/// connection to the app ([`app_h2::APP_CONNECTION_WINDOW`]).
pub const H2_STREAM_SEND_BUFFER: usize = 64 * 1024;

/// The largest header list of an HTTP/2 request the sidecar forwards, as
/// HTTP/2 counts it ([`headers::h2_header_list_size`]; hyper's default
/// bound): a larger one is answered 431 by the request stack, in words
/// naming the bound ([`authz::H2_HEADERS_TOO_LARGE`]), logged and counted
/// as `invalid`. An HTTP/1 head's bound is [`h1::MAX_REQUEST_HEAD`].
pub const H2_MAX_HEADER_LIST: usize = trellis_core::policy::l7::H2_MAX_HEADER_LIST;

/// The bound HTTP/2 itself reads header lists to (advertised to callers as
/// SETTINGS_MAX_HEADER_LIST_SIZE), four times [`H2_MAX_HEADER_LIST`] so
/// that the sidecar's own bound trips first; `policy explain` answers from
/// the same constant ([`trellis_core::policy::l7::H2_HEADER_LIST_READ`]). A
/// list of this size or more is refused inside h2, which answers 431 alone
/// (no body, on that stream only) and never hands the request to the
/// sidecar (no log line, no count); h2 ends the connection with GOAWAY
/// `ENHANCE_YOUR_CALM` for one over four times this, or a header block in
/// more than six CONTINUATION frames. A caller that heeds the setting
/// never sends one (Go's and h2's clients refuse to; curl's nghttp2 sends
/// nothing of such a request, and curl reports `REFUSED_STREAM`, retries,
/// then gives up with "Connection died"). A list up to it is held while
/// its stream is accepted, then dropped at once when it is refused.
pub const H2_HEADER_LIST_READ: u32 = {
    let read = trellis_core::policy::l7::H2_HEADER_LIST_READ;
    assert!(
        read <= u32::MAX as usize,
        "SETTINGS_MAX_HEADER_LIST_SIZE is 32 bits"
    );
    read as u32
};

/// Why an HTTP connection ended early.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Serves HTTP (`protocol` as settled by ALPN or detected) on `io` until
/// the client is done. HTTP/1.1 requests whose framing has one reading go
/// through the forwarder ([`h1`]) until the first that does not; that one
/// and the rest of the connection, and HTTP/2, go through hyper's server
/// and the connection's request stack: [`Authorize`](authz::Authorize),
/// then [`RateLimit`](ratelimit::RateLimit), then [`proxy::forward`] to the
/// app. Both decide, log and answer a request the same way.
///
/// Once `draining` resolves (the sidecar is shutting down), the connection
/// ends as soon as it can without cutting a request: an idle HTTP/1
/// connection is closed and the answer in flight says `connection: close`;
/// HTTP/2 sends GOAWAY and finishes the streams already open. Callers move
/// to another replica instead of sending more requests to a stopping pod,
/// and the drain ends early.
pub async fn serve<S>(
    conn: Connection,
    protocol: Protocol,
    io: S,
    draining: impl std::future::Future<Output = ()>,
) -> Result<(), ServeError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = Arc::new(conn);
    let mut draining = std::pin::pin!(draining);
    if protocol == Protocol::Http2 {
        return Ok(serve_hyper(conn, protocol, io, draining).await?);
    }
    match h1::serve(&conn, io, draining.as_mut()).await? {
        h1::Served::Closed => Ok(()),
        h1::Served::HandOff { io, drained: false } => {
            Ok(serve_hyper(conn, protocol, io, draining).await?)
        }
        // The drain has begun: hyper ends the connection after the request
        // in flight.
        h1::Served::HandOff { io, drained: true } => {
            let drained = std::pin::pin!(std::future::ready(()));
            Ok(serve_hyper(conn, protocol, io, drained).await?)
        }
    }
}

/// Serves `io` with hyper's server, each request through the connection's
/// request stack.
async fn serve_hyper<S>(
    conn: Arc<Connection>,
    protocol: Protocol,
    io: S,
    draining: std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> Result<(), hyper::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let held = conn.clone();
    let forward = {
        let conn = conn.clone();
        tower::service_fn(move |exchange| proxy::forward(conn.clone(), exchange))
    };
    let stack = ServiceBuilder::new()
        .layer(AuthorizeLayer::new(
            conn.peer.clone(),
            conn.target.port(),
            conn.policies.clone(),
            conn.http.metrics.clone(),
        ))
        .layer(RateLimitLayer::new(
            conn.peer.clone(),
            conn.policies.clone(),
        ))
        .service(forward);
    let service = Stack {
        conn,
        protocol,
        stack: RefCell::new(stack),
    };
    match protocol {
        Protocol::Http2 => {
            // The frames of the streams in flight leave in one TLS record,
            // not one for each DATA frame h2 sends from the app's buffer.
            let io = TokioIo::new(GatheredWrites::new(io));
            let keep_alive = service.conn.http.h2_keep_alive;
            let served = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(keep_alive.0)
                .keep_alive_timeout(keep_alive.1)
                .max_send_buf_size(H2_STREAM_SEND_BUFFER)
                .max_header_list_size(H2_HEADER_LIST_READ)
                .serve_connection(io, service);
            until_drained(served, draining, |c| c.graceful_shutdown()).await
        }
        _ => {
            // Every head is read and checked before hyper sees it
            // (`Heads`), so that a later one gets the forwarder's answer,
            // not hyper's status alone. A caller still sending a body
            // hyper left unread when it closes is read a while first, so
            // its answer is not lost to a reset.
            let heads = Heads::new(
                h1::Lingering::new(io, held.clone()),
                h1::check_head,
                h1::MAX_REQUEST_HEAD,
            );
            // A later head refused ends hyper's service as a drain does,
            // after the answer in progress.
            let refusal = heads.signals();
            let mut stop = std::pin::pin!(async {
                tokio::select! {
                    () = draining => {}
                    () = refusal.refused() => {}
                }
            });
            let io = TokioIo::new(heads);
            let mut served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .max_buf_size(h1::MAX_REQUEST_HEAD)
                .header_read_timeout(h1::HEAD_TIMEOUT)
                // Half-closed callers are not supported (hyper's default):
                // with them, hyper stops reading while a request is in
                // flight, so a caller that went away would hold its app
                // connection until the app answered, and a hung app for
                // ever.
                .serve_connection(io, service)
                .with_upgrades();
            let ended = until_drained(&mut served, stop.as_mut(), |c| {
                std::pin::Pin::new(&mut **c.get_mut()).graceful_shutdown()
            })
            .await;
            // A head `Heads` refused, or held begun when hyper's header
            // read timeout ended the connection: answered as the forwarder
            // answers it.
            if let Some(parts) = served.into_parts() {
                let heads = parts.io.into_inner();
                if let Some(fault) = heads.refused(ended.as_ref().err(), h1::HEAD_TIMED_OUT) {
                    h1::refuse_later_head(heads, &fault, held).await;
                    return Ok(());
                }
            }
            if let Err(e) = ended {
                // A head hyper refused has had hyper's answer, a status
                // alone: it is logged and counted as the forwarder's are.
                let Some(refused) = HeadFault::from_hyper(&e, &h1::RULES.bounds) else {
                    return Err(e);
                };
                // Written as it drops.
                drop(h1::refused_entry(&refused, held));
                return Ok(());
            }
            // hyper is done with a connection that switched protocols once
            // it has handed the stream over: the copy runs here, inside
            // the connection's life (a drain waits for it, as for any byte
            // copy).
            if let Some(upgraded) = held.take_upgraded() {
                upgraded.await;
            }
            Ok(())
        }
    }
}

/// Runs `served` to its end, asking it to finish gracefully (`shut`) once
/// `draining` resolves.
async fn until_drained<C, T>(
    served: C,
    mut draining: std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    shut: impl FnOnce(std::pin::Pin<&mut C>),
) -> Result<T, hyper::Error>
where
    C: std::future::Future<Output = Result<T, hyper::Error>>,
{
    let mut served = std::pin::pin!(served);
    tokio::select! {
        // `served` first: what is already received, or handed over by the
        // forwarder, is read before a drain that has begun asks hyper to
        // finish, so a request in it is served (its answer says
        // `connection: close`), not taken for an idle connection's silence
        // and closed unanswered.
        biased;
        result = served.as_mut() => return result,
        () = draining.as_mut() => shut(served.as_mut()),
    }
    served.await
}

/// The request stack of one connection, as hyper calls it.
///
/// hyper calls a connection's service from the connection's own task, one
/// request at a time (HTTP/2 streams run concurrently only after `call`
/// returns their future), so the stack needs no lock: a `RefCell` lends it
/// to each call. Readiness is polled before every call, which is where the
/// layers pick up new policies; every layer of this stack is always ready.
struct Stack<S> {
    conn: Arc<Connection>,
    protocol: Protocol,
    stack: RefCell<S>,
}

impl<S> hyper::service::Service<Request<Incoming>> for Stack<S>
where
    S: tower::Service<Exchange, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = future::Either<S::Future, future::Map<S::Future, Answered>>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        let unfinished = !hyper::body::Body::is_end_stream(req.body());
        self.conn
            .body_unfinished
            .store(unfinished, std::sync::atomic::Ordering::Relaxed);
        // As the forwarder passes a length on.
        headers::length_without_zeros(req.headers_mut());
        // A request hyper's server may switch protocols for: `Heads`
        // passes what follows it unchecked, so an answer that does not
        // switch ends the connection rather than let hyper read on.
        let ends_unless_switched: Option<Answered> = if !trellis_core::http1::may_switch(&req) {
            None
        } else if req.method() != http::Method::CONNECT {
            Some(close_unless_switched)
        } else if req.version() == http::Version::HTTP_10 {
            Some(close_unless_tunnel_1_0)
        } else {
            Some(close_unless_tunnel)
        };
        let exchange = Exchange::start(&self.conn, req, self.protocol);
        let mut stack = self.stack.borrow_mut();
        let ready = stack.poll_ready(&mut Context::from_waker(Waker::noop()));
        debug_assert!(ready.is_ready(), "request layers never apply backpressure");
        let answer = stack.call(exchange);
        match ends_unless_switched {
            Some(mark) => future::Either::Right(future::FutureExt::map(answer, mark)),
            None => future::Either::Left(answer),
        }
    }
}

/// Marks an answer to a request hyper may switch protocols for.
type Answered = fn(Result<Response<Body>, Infallible>) -> Result<Response<Body>, Infallible>;

/// The answer to an HTTP/1.1 `CONNECT`, which hyper's server takes as a
/// tunnel when it is `2xx` (or `101`): any other ends the connection.
fn close_unless_tunnel(
    answer: Result<Response<Body>, Infallible>,
) -> Result<Response<Body>, Infallible> {
    end_unless_tunnel(answer, http::Version::HTTP_11)
}

/// [`close_unless_tunnel`] for an HTTP/1.0 `CONNECT`: the answer that ends
/// the connection is in HTTP/1.0 too ([`end_connection`]).
fn close_unless_tunnel_1_0(
    answer: Result<Response<Body>, Infallible>,
) -> Result<Response<Body>, Infallible> {
    end_unless_tunnel(answer, http::Version::HTTP_10)
}

/// The answer to a `CONNECT` in `version`, ending the connection unless it
/// is a tunnel.
fn end_unless_tunnel(
    answer: Result<Response<Body>, Infallible>,
    version: http::Version,
) -> Result<Response<Body>, Infallible> {
    answer.map(|mut answer| {
        let status = answer.status();
        if !status.is_success() && status != http::StatusCode::SWITCHING_PROTOCOLS {
            end_connection(&mut answer, version);
        }
        answer
    })
}

/// The answer to an HTTP/1.1 request with an `Upgrade`, which hyper's
/// server switches protocols for when it is `101`: any other ends the
/// connection.
fn close_unless_switched(
    answer: Result<Response<Body>, Infallible>,
) -> Result<Response<Body>, Infallible> {
    answer.map(|mut answer| {
        if answer.status() != http::StatusCode::SWITCHING_PROTOCOLS {
            end_connection(&mut answer, http::Version::HTTP_11);
        }
        answer
    })
}

/// The policies in force for one connection's request stack, as each layer
/// of it reads them: a copy of the channel's value, refreshed when the
/// stack is polled for readiness and only when the channel changed, so
/// deciding a request takes no lock.
struct InForce {
    policies: watch::Receiver<Option<Arc<Policies>>>,
    current: Option<Arc<Policies>>,
}

impl InForce {
    fn new(mut policies: watch::Receiver<Option<Arc<Policies>>>) -> Self {
        let current = policies.borrow_and_update().clone();
        InForce { policies, current }
    }

    /// An atomic load unless the policies changed; a closed channel keeps
    /// the last policies.
    fn refresh(&mut self) {
        if self.policies.has_changed().unwrap_or(false) {
            self.current = self.policies.borrow_and_update().clone();
        }
    }

    /// `None` before the first snapshot.
    fn get(&self) -> Option<&Policies> {
        self.current.as_deref()
    }
}

/// What one layer of the request stack decides of a request, under the
/// policies in force.
pub trait Check {
    /// Decides `exchange` under `policies` (`None` before the first
    /// snapshot); `Some` is the answer to send instead of passing it on.
    fn refusal<B>(
        &self,
        policies: Option<&Policies>,
        exchange: &mut Exchange<B>,
    ) -> Option<Response<LocalBody>>;
}

/// Wraps a service in a [`Guard`] running `C`.
#[derive(Clone)]
pub struct GuardLayer<C> {
    check: C,
    policies: watch::Receiver<Option<Arc<Policies>>>,
}

impl<C: Clone, S> tower::Layer<S> for GuardLayer<C> {
    type Service = Guard<C, S>;

    fn layer(&self, inner: S) -> Guard<C, S> {
        Guard {
            check: self.check.clone(),
            policies: InForce::new(self.policies.clone()),
            inner,
        }
    }
}

/// A layer of the request stack: answers the requests its [`Check`]
/// refuses, passes the others to `S`. The policies in force are picked up
/// when it is polled for readiness.
pub struct Guard<C, S> {
    check: C,
    policies: InForce,
    inner: S,
}

impl<C, S, B> tower::Service<Exchange<B>> for Guard<C, S>
where
    C: Check,
    S: tower::Service<Exchange<B>, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = future::Either<Ready<Result<Response<Body>, Infallible>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.policies.refresh();
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut exchange: Exchange<B>) -> Self::Future {
        match self.check.refusal(self.policies.get(), &mut exchange) {
            Some(response) => {
                let answer = proxy::finish(exchange.entry, response);
                future::Either::Left(ready(Ok(answer)))
            }
            None => future::Either::Right(self.inner.call(exchange)),
        }
    }
}

impl<C: Check> Guard<C, ()> {
    /// The check alone, for a request path that is not a tower stack (the
    /// HTTP/1 forwarder): the policies in force picked up if they
    /// changed, then the same decision as the layer's.
    pub fn check<B>(&mut self, exchange: &mut Exchange<B>) -> Option<Response<LocalBody>> {
        self.policies.refresh();
        self.check.refusal(self.policies.get(), exchange)
    }
}

/// What the HTTP tests share.
#[cfg(test)]
pub(crate) mod testing {
    use std::convert::Infallible;
    use std::future::{Ready, ready};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http::{Request, Response, StatusCode};
    use tokio::io::{AsyncRead, AsyncReadExt};
    use tokio::sync::watch;
    use trellis_core::{SpiffeId, TrustDomain};

    use super::access::Entry;
    use super::proxy::{Exchange, GrpcCode, finish, local};
    use super::{Body, Connection, Http};
    use crate::metrics::Metrics;
    use crate::policy::Policies;

    /// `spiffe://td{path}`.
    pub fn id(path: &str) -> SpiffeId {
        SpiffeId::parse(&format!("spiffe://td{path}")).unwrap()
    }

    /// A connection from `peer` to the app's port 8080 under `policies`,
    /// counted in `metrics`, with no access log.
    pub fn connection(
        metrics: &Arc<Metrics>,
        peer: &SpiffeId,
        policies: &watch::Receiver<Option<Arc<Policies>>>,
    ) -> Arc<Connection> {
        Arc::new(Connection::new(
            Arc::new(Http::with_access_log(metrics.clone(), false)),
            peer.clone(),
            "127.0.0.1:8080".parse().unwrap(),
            policies.clone(),
        ))
    }

    /// `request` on `conn` as the request stack takes it: HTTP/1, no
    /// upgrade, headers within the limit.
    pub fn exchange<B>(conn: &Arc<Connection>, request: Request<B>, grpc: bool) -> Exchange<B> {
        Exchange {
            entry: Entry::start(conn.clone(), &request, "http1"),
            request,
            grpc,
            upgrading: false,
            headers_too_large: false,
        }
    }

    /// An app that answers every request 200 `from the app`, counting the
    /// requests that reach it in `calls`.
    pub fn counting_app(
        calls: &Arc<AtomicUsize>,
    ) -> impl tower::Service<
        Exchange<()>,
        Response = Response<Body>,
        Error = Infallible,
        Future = Ready<Result<Response<Body>, Infallible>>,
    > {
        let calls = calls.clone();
        tower::service_fn(move |exchange: Exchange<()>| {
            calls.fetch_add(1, Ordering::Relaxed);
            let ok = local(
                false,
                StatusCode::OK,
                GrpcCode::Unavailable,
                "none",
                "from the app",
            );
            ready(Ok(finish(exchange.entry, ok)))
        })
    }

    /// Policies of `ns/b/sa/api` under the mesh default `allow-mesh`, with
    /// one DENY (policy `b/no-admin`) of `/admin/*` (rule 0) and of the
    /// host `admin` (rule 1).
    pub fn no_admin(metrics: &Metrics) -> Policies {
        let yaml = "apiVersion: trellis.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: b}
spec:
  selector: {spiffeIds: [\"spiffe://td/ns/b/sa/api\"]}
  action: DENY
  rules:
    - to: [{paths: [\"/admin/*\"]}]
    - to: [{headers: {host: admin}}]
";
        let loaded =
            trellis_core::policy::load_source("p.yaml", yaml, &TrustDomain::new("td").unwrap());
        assert!(!loaded.has_errors(), "{:?}", loaded.diagnostics);
        let policy = loaded.policies[0].policy.to_proto();
        let api = id("/ns/b/sa/api");
        Policies::compile(1, &api, "allow-mesh".into(), vec![policy], metrics).unwrap()
    }

    /// What an HTTP/2 client sends first: the preface.
    pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    /// An HTTP/2 frame's type: SETTINGS.
    pub const SETTINGS: u8 = 0x4;
    /// An HTTP/2 frame's type: PING.
    pub const PING: u8 = 0x6;
    /// An HTTP/2 frame's type: WINDOW_UPDATE.
    pub const WINDOW_UPDATE: u8 = 0x8;
    /// The SETTINGS parameter SETTINGS_INITIAL_WINDOW_SIZE.
    pub const INITIAL_WINDOW_SIZE: u16 = 0x4;
    /// The flag of a SETTINGS or PING frame that acknowledges one.
    pub const ACK: u8 = 0x1;

    /// One HTTP/2 frame, as read off the wire.
    #[derive(Debug)]
    pub struct Frame {
        pub kind: u8,
        pub flags: u8,
        pub stream: u32,
        pub payload: Vec<u8>,
    }

    impl Frame {
        /// The frame's bytes: header and payload.
        pub fn encode(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
            let mut bytes = (payload.len() as u32).to_be_bytes()[1..].to_vec();
            bytes.extend([kind, flags]);
            bytes.extend(stream.to_be_bytes());
            bytes.extend_from_slice(payload);
            bytes
        }

        /// The parameters of a SETTINGS frame, as (identifier, value).
        pub fn settings(&self) -> Vec<(u16, u32)> {
            assert_eq!(self.kind, SETTINGS, "{self:?}");
            self.payload
                .chunks_exact(6)
                .map(|p| {
                    let id = u16::from_be_bytes([p[0], p[1]]);
                    (id, u32::from_be_bytes([p[2], p[3], p[4], p[5]]))
                })
                .collect()
        }

        /// The increment of a WINDOW_UPDATE frame.
        pub fn window_increment(&self) -> u32 {
            assert_eq!(self.kind, WINDOW_UPDATE, "{self:?}");
            let p = &self.payload;
            u32::from_be_bytes([p[0], p[1], p[2], p[3]]) & 0x7fff_ffff
        }
    }

    /// The next frame on `io`; `None` once the peer has closed it.
    pub async fn read_frame(io: &mut (impl AsyncRead + Unpin)) -> Option<Frame> {
        let mut head = [0u8; 9];
        io.read_exact(&mut head).await.ok()?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0; len];
        io.read_exact(&mut payload).await.ok()?;
        Some(Frame {
            kind: head[3],
            flags: head[4],
            stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
            payload,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Poll;

    use http_body_util::BodyExt;
    use tokio::io::{DuplexStream, ReadBuf};
    use tokio::net::TcpListener;

    use super::testing::{ACK, Frame, H2_PREFACE, PING, SETTINGS, id, no_admin, read_frame};
    use super::*;

    /// The sidecar's end of a caller's connection, counting the writes
    /// that reach it.
    struct Counting {
        inner: DuplexStream,
        writes: Arc<AtomicUsize>,
    }

    impl AsyncRead for Counting {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Counting {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let this = self.get_mut();
            let written = Pin::new(&mut this.inner).poll_write(cx, buf);
            if let Poll::Ready(Ok(n)) = written
                && n > 0
            {
                this.writes.fetch_add(1, Ordering::Relaxed);
            }
            written
        }
        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_flush(cx)
        }
        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
        }
    }

    /// An app serving HTTP/2 with prior knowledge on loopback: each
    /// request's body is read whole and answered with 1 KiB. It counts the
    /// connections it accepted.
    async fn h2_app() -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::Relaxed);
                let service = hyper::service::service_fn(|request: Request<Incoming>| async {
                    request.into_body().collect().await?;
                    Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from(vec![b'a'; 1024]))))
                });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), service),
                );
            }
        });
        (addr, accepted)
    }

    /// The segments with data that the app's end of its one established
    /// connection, on `app`'s port, has received, as `ss` reports them from
    /// the kernel's `TCP_INFO` (`data_segs_in`); `None` without `ss`.
    fn data_segments_in(app: SocketAddr) -> Option<u64> {
        let filter = format!("sport = :{}", app.port());
        let out = std::process::Command::new("ss")
            .args(["-tinH", "state", "established", &filter])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let counts: Vec<u64> = text
            .split_whitespace()
            .filter_map(|field| field.strip_prefix("data_segs_in:"))
            .map(|n| n.parse().expect("a count"))
            .collect();
        assert_eq!(counts.len(), 1, "one connection to the app: {text}");
        Some(counts[0])
    }

    /// HTTP/2 requests with a 1 KiB body and their 1 KiB answers, as gRPC
    /// calls with messages of that size are, leave the sidecar in
    /// gathered writes both ways. h2 sends a DATA frame that large from
    /// the message's own buffer and flushes it apart from the frames queued
    /// before it; the sidecar gathers what each of its HTTP/2 connections
    /// writes until the connection's task has had its turns, on the
    /// caller's stream and on its connection to the app. Sixteen
    /// requests in flight at a time: the frames of several streams leave
    /// together, well under one write a request each way (30 writes to the
    /// caller and 20 segments to the app for 160 requests, here). Without
    /// the gathering it was two writes a request to the caller and a
    /// segment a request to the app. The app's side is counted by the
    /// kernel (segments with data received), the caller's at its stream.
    #[tokio::test]
    async fn http2_frames_leave_in_gathered_writes_both_ways() {
        const IN_FLIGHT: usize = 16;
        const BURSTS: usize = 10;
        let (app, accepted) = h2_app().await;
        let metrics = Arc::new(Metrics::new());
        let (_keep, policies) = watch::channel(Some(Arc::new(no_admin(&metrics))));
        let http = Arc::new(Http::with_access_log(metrics, false));
        let conn = Connection::new(http, id("/ns/a/sa/web"), app, policies);
        let (caller, sidecar_end) = tokio::io::duplex(1 << 20);
        let writes = Arc::new(AtomicUsize::new(0));
        let counted = Counting {
            inner: sidecar_end,
            writes: writes.clone(),
        };
        tokio::spawn(serve(
            conn,
            Protocol::Http2,
            counted,
            std::future::pending(),
        ));
        let (send, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(caller))
                .await
                .unwrap();
        tokio::spawn(connection);
        let post = |mut send: hyper::client::conn::http2::SendRequest<Full<Bytes>>| async move {
            let request = Request::post("http://app/upload")
                .body(Full::new(Bytes::from(vec![b'r'; 1024])))
                .unwrap();
            let answer = send.send_request(request).await.unwrap();
            assert_eq!(answer.status(), http::StatusCode::OK);
            let body = answer.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body.len(), 1024);
        };
        // The first request opens the connection to the app.
        post(send.clone()).await;
        let (writes_before, segments_before) =
            (writes.load(Ordering::Relaxed), data_segments_in(app));
        for _ in 0..BURSTS {
            let mut burst = tokio::task::JoinSet::new();
            for _ in 0..IN_FLIGHT {
                burst.spawn(post(send.clone()));
            }
            while let Some(done) = burst.join_next().await {
                done.unwrap();
            }
        }
        let requests = IN_FLIGHT * BURSTS;
        let to_caller = writes.load(Ordering::Relaxed) - writes_before;
        assert_eq!(
            accepted.load(Ordering::Relaxed),
            1,
            "one connection to the app"
        );
        assert!(
            to_caller <= requests / 2,
            "{to_caller} writes to the caller for {requests} requests"
        );
        match (segments_before, data_segments_in(app)) {
            (Some(before), Some(after)) => {
                let to_app = after - before;
                assert!(
                    to_app <= requests as u64 / 2,
                    "{to_app} segments to the app for {requests} requests"
                );
            }
            _ => crate::machine::skip(
                "skipped: needs ss (iproute2) to count the segments to the app",
            ),
        }
    }

    /// A caller's HTTP/2 connection that carries nothing for the keep-alive
    /// interval is pinged, and closed when the ping is not answered within
    /// the keep-alive timeout: a caller that has gone away without a word
    /// no longer holds it for ever. The clock is paused (it moves only when
    /// every task waits on a timer, and the caller talks over an in-memory
    /// pipe), so the intervals measured are the sidecar's own, whatever the
    /// load on the machine.
    #[tokio::test(start_paused = true)]
    async fn a_silent_http2_caller_is_pinged_and_closed_when_it_does_not_answer() {
        use tokio::io::AsyncWriteExt;
        use tokio::time::Instant;

        const INTERVAL: Duration = Duration::from_millis(300);
        const TIMEOUT: Duration = Duration::from_millis(300);
        let metrics = Arc::new(Metrics::new());
        let (_keep, policies) = watch::channel(Some(Arc::new(no_admin(&metrics))));
        let http = Http::with_access_log(metrics, false).with_h2_keep_alive(INTERVAL, TIMEOUT);
        // No request is sent: the app is never dialled.
        let app = "127.0.0.1:9".parse().unwrap();
        let conn = Connection::new(Arc::new(http), id("/ns/a/sa/web"), app, policies);
        let (mut caller, sidecar_end) = tokio::io::duplex(64 * 1024);
        tokio::spawn(serve(
            conn,
            Protocol::Http2,
            sidecar_end,
            std::future::pending(),
        ));
        caller.write_all(H2_PREFACE).await.unwrap();
        caller
            .write_all(&Frame::encode(SETTINGS, 0, 0, &[]))
            .await
            .unwrap();
        let start = Instant::now();
        let mut pinged = None;
        let until_closed = async {
            while let Some(frame) = read_frame(&mut caller).await {
                match frame.kind {
                    SETTINGS if frame.flags & ACK == 0 => caller
                        .write_all(&Frame::encode(SETTINGS, ACK, 0, &[]))
                        .await
                        .unwrap(),
                    PING if frame.flags & ACK == 0 => {
                        assert!(pinged.is_none(), "pinged again before closing");
                        pinged = Some(start.elapsed());
                    }
                    _ => {}
                }
            }
        };
        let open = tokio::time::timeout(Duration::from_secs(10), until_closed).await;
        let pinged = pinged.expect("the silent caller was never pinged");
        assert!(
            open.is_ok(),
            "the connection is still open 10 s after the ping"
        );
        assert!(
            (INTERVAL..INTERVAL * 2).contains(&pinged),
            "pinged after {pinged:?}"
        );
        let unanswered = start.elapsed() - pinged;
        assert!(
            (TIMEOUT..TIMEOUT * 2).contains(&unanswered),
            "closed {unanswered:?} after the ping"
        );
    }
}
