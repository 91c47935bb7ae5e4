//! HTTP/1 connections to the app.
//!
//! An HTTP/1 connection carries one request at a time. A request goes out
//! on an app connection taken from [`AppConnections`] (the one to the same
//! app port parked last for the same caller identity) or dialled for it;
//! when the request is over (its response written to the caller or
//! dropped), the app connection is parked again for the next request of
//! that caller ([`Upstream::release`]). So a keep-alive caller, a caller
//! that opens a connection per request and an idle caller all cost the app
//! as few connections as the requests in flight of each identity. A
//! request locks the shared list twice (uncontended on the sidecar's
//! one-thread runtime) and, unless its app connection is still reading the
//! end of the response when the request is over, spawns nothing and
//! allocates no future of its own (hyper-util's pooled client boxed a 3 KiB
//! one and spawned a task for every request).
//!
//! An app connection is never shared between identities: an app that reads
//! one request as two (one that ignores a `GET`'s body, which then reads as
//! a request of its own) answers twice, and the second answer, arriving
//! late, would be read as the answer to the next request on the
//! connection. Kept to one identity, such an answer can only reach the
//! caller that sent the bytes it answers, never another caller; and the
//! app connection of a `GET` or `HEAD` with a body, the usual such case, is
//! closed when the request is over rather than parked.
//!
//! Each app connection is driven by a task of its own, which also notices
//! when the app closes an idle one. A parked connection unused for
//! [`IDLE`] is dropped, and at most [`MAX_PARKED`] are kept.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::header::{CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::uri::{Authority, PathAndQuery};
use http::{HeaderValue, Method, Request, Response, Uri};
use hyper::body::{Body, Incoming};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::task::AbortHandle;
use trellis_core::SpiffeId;

use super::RequestBody;
use crate::metrics::Metrics;

/// How long a parked app connection is kept unused.
pub const IDLE: Duration = Duration::from_secs(90);
/// The most app connections parked at once; beyond it the oldest is closed.
pub const MAX_PARKED: usize = 1024;

/// Why a request could not be sent to the app.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("connecting to the app: {0}")]
    Connect(std::io::Error),
    #[error("HTTP/1 handshake with the app: {0}")]
    Handshake(hyper::Error),
    #[error("HTTP/2 handshake with the app: {0}")]
    Http2Handshake(hyper::Error),
    /// The app answered an HTTP/2 connection with bytes that are not
    /// HTTP/2 (an HTTP/1-only app's answer to the connection preface).
    #[error("the app did not answer in HTTP/2: {0}")]
    NotHttp2(hyper::Error),
    #[error(transparent)]
    Request(hyper::Error),
}

/// An app connection that can be parked: it knows when the app has
/// closed it.
pub trait Reusable {
    /// Whether the app has closed it, as far as the runtime has noticed.
    fn is_closed(&self) -> bool;
}

/// An app connection hyper drives: the sender of its requests, and the
/// task driving it, which ends it when a request's body stalls
/// ([`Upstream::ender`]).
pub struct AppConn<B> {
    sender: SendRequest<B>,
    task: AbortHandle,
}

impl<B> Reusable for AppConn<B> {
    fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }
}

/// App connections parked between requests, newest last, each with the
/// app address it was dialled to and the caller identity whose requests
/// it carried: a sidecar serves every port of its app, and a request
/// decided for one port must never go out on a connection to another; nor
/// on one that carried another identity's requests (see the module's
/// documentation). One bound ([`MAX_PARKED`]) holds for every port and
/// identity together. `C` is hyper's sender for the connections hyper drives, or
/// the socket itself for those of the HTTP/1 forwarder ([`super::h1`]).
pub struct AppConnections<C = AppConn<RequestBody>> {
    parked: Mutex<VecDeque<Parked<C>>>,
}

struct Parked<C> {
    target: SocketAddr,
    caller: SpiffeId,
    conn: C,
    since: Instant,
}

impl<C> Default for AppConnections<C> {
    fn default() -> Self {
        AppConnections {
            parked: Mutex::default(),
        }
    }
}

impl<C: Reusable> AppConnections<C> {
    /// Parks `conn` for a later request of `caller`, unless the app closed
    /// it or sent bytes no request asked for (as far as the runtime has
    /// noticed: asking the socket itself would cost a system call on every
    /// request); drops the connections parked too long, and the oldest
    /// beyond [`MAX_PARKED`].
    pub fn park(&self, target: SocketAddr, caller: &SpiffeId, conn: C) {
        if conn.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut parked = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(oldest) = parked.front() {
            if now.duration_since(oldest.since) < IDLE && parked.len() < MAX_PARKED {
                break;
            }
            parked.pop_front();
        }
        parked.push_back(Parked {
            target,
            // A reference count, not a copy of the ID.
            caller: caller.clone(),
            conn,
            since: now,
        });
    }

    /// The most recently parked connection to `target` for `caller` that
    /// is still open, if any. With one app port and one caller identity,
    /// the newest parked connection is the one; the search goes further
    /// back only past other ports' and identities'.
    pub fn unpark(&self, target: SocketAddr, caller: &SpiffeId) -> Option<C> {
        let mut parked = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        let mut at = parked.len();
        while at > 0 {
            at -= 1;
            if parked[at].target != target || parked[at].caller != *caller {
                continue;
            }
            let Some(Parked { conn, since, .. }) = parked.remove(at) else {
                break;
            };
            if !conn.is_closed() && since.elapsed() < IDLE {
                return Some(conn);
            }
        }
        None
    }

    /// How many connections are parked.
    #[cfg(test)]
    fn parked(&self) -> usize {
        self.parked.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// The app connection of one inbound HTTP/1 connection's request in
/// flight, parked when the request is over or the connection ends.
pub struct Upstream<B = RequestBody> {
    pool: Arc<AppConnections<AppConn<B>>>,
    target: SocketAddr,
    /// The caller's identity: the app connections it takes and parks are
    /// its own.
    caller: SpiffeId,
    /// Set once a request is on its way, until [`release`](Self::release);
    /// never locked across an await.
    current: Mutex<Option<AppConn<B>>>,
    /// Whether the app connection of the request in flight is closed when
    /// the request is over rather than parked: the request is a `GET` or
    /// `HEAD` with a body, which an app may read as a request of its own
    /// and answer after this request's answer.
    spent: AtomicBool,
}

impl<B> Upstream<B>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    pub fn new(
        pool: Arc<AppConnections<AppConn<B>>>,
        target: SocketAddr,
        caller: SpiffeId,
    ) -> Self {
        Upstream {
            pool,
            target,
            caller,
            current: Mutex::new(None),
            spent: AtomicBool::new(false),
        }
    }

    /// Sends `req` to the app at `authority` over this connection's app
    /// connection, a parked one or a new one, in that order. A request
    /// that never left a reused connection (the app had closed it) is sent
    /// again on the next, and counted in `metrics`
    /// ([`Metrics::app_request_retry`]). `keep` is false for an upgrade:
    /// its connection is the upgraded stream's afterwards, not this one's.
    pub async fn send(
        &self,
        mut req: Request<B>,
        authority: &Authority,
        keep: bool,
        metrics: &Metrics,
    ) -> Result<Response<Incoming>, SendError> {
        let spent = prepare(&mut req, authority);
        self.spent.store(spent, Ordering::Relaxed);
        loop {
            let (mut app, reused) = match self.checkout() {
                Some(app) => (app, true),
                // Boxed: a dial is rare (once per app connection), and its
                // state would otherwise enlarge the slot hyper keeps for the
                // request in flight on every caller connection.
                None => (Box::pin(dial(self.target)).await?, false),
            };
            // A parked connection was ready when it was parked; this only
            // fails if the app has closed it since: try the next.
            if reused && app.sender.ready().await.is_err() {
                continue;
            }
            let sent = app.sender.try_send_request(req);
            // Dropped once the response is in, not before: the connection
            // must live to deliver it.
            let _held = if keep {
                *self.lock() = Some(app);
                None
            } else {
                Some(app)
            };
            match sent.await {
                Ok(response) => return Ok(response),
                Err(mut e) => {
                    if keep {
                        self.lock().take();
                    }
                    match e.take_message() {
                        Some(unsent) if reused => {
                            metrics.app_request_retry(unsent.body().is_end_stream());
                            req = unsent;
                        }
                        _ => return Err(SendError::Request(e.into_error())),
                    }
                }
            }
        }
    }

    /// Called when a request is over: parks its app connection for the
    /// next request. One still reading the end of the last response (its
    /// task has not run since) is parked once it is ready, by a task of its
    /// own, so an idle caller never holds an app connection.
    pub fn release(&self) {
        let Some(mut app) = self.lock().take() else {
            return;
        };
        if self.spent.load(Ordering::Relaxed) {
            return;
        }
        if app.sender.is_ready() {
            self.pool.park(self.target, &self.caller, app);
        } else if !app.sender.is_closed() {
            let (pool, target, caller) = (self.pool.clone(), self.target, self.caller.clone());
            tokio::spawn(async move {
                if app.sender.ready().await.is_ok() {
                    pool.park(target, &caller, app);
                }
            });
        }
    }

    /// What ends the app connection of the request in flight (one sent
    /// with `keep`), if one is.
    pub fn ender(&self) -> Option<AbortHandle> {
        self.lock().as_ref().map(|app| app.task.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<AppConn<B>>> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The app connection this caller's last request kept, else one
    /// parked to the same app address for the same identity.
    fn checkout(&self) -> Option<AppConn<B>> {
        let held = self.lock().take();
        held.or_else(|| self.pool.unpark(self.target, &self.caller))
    }
}

/// A new HTTP/1 connection to the app at `target`, driven by a task of
/// its own.
async fn dial<B>(target: SocketAddr) -> Result<AppConn<B>, SendError>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = crate::net::connect(target)
        .await
        .map_err(SendError::Connect)?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(SendError::Handshake)?;
    let task = tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "app connection ended with an error");
        }
    });
    Ok(AppConn {
        sender,
        task: task.abort_handle(),
    })
}

impl<B> Drop for Upstream<B> {
    /// Every request's [`release`](Upstream::release) has emptied `current`
    /// by the time the connection ends; should one not have, its app
    /// connection is parked only if ready, as `release` would, since `send`
    /// trusts a parked connection to be ready.
    fn drop(&mut self) {
        let current = self.current.get_mut().unwrap_or_else(|e| e.into_inner());
        let spent = *self.spent.get_mut();
        if let Some(app) = current.take().filter(|app| !spent && app.sender.is_ready()) {
            self.pool.park(self.target, &self.caller, app);
        }
    }
}

/// Puts `req` in the form an HTTP/1 server expects from a client: the
/// request target in origin form (authority form for `CONNECT`), a `Host`
/// header, the app's address when the caller sent none, and the framing of
/// a `GET` or `HEAD` body of unknown length (a chunked one), which hyper's
/// client would otherwise send as no body at all: `Transfer-Encoding:
/// chunked`, named here since the caller's was removed with the other
/// hop-by-hop headers. Whether it is a `GET` or `HEAD` with a body.
fn prepare<B: Body>(req: &mut Request<B>, authority: &Authority) -> bool {
    let mut parts = http::uri::Parts::default();
    if req.method() == Method::CONNECT {
        parts.authority = Some(authority.clone());
    } else {
        let path = req.uri().path_and_query().cloned();
        parts.path_and_query = Some(path.unwrap_or_else(|| PathAndQuery::from_static("/")));
    }
    *req.uri_mut() = Uri::from_parts(parts).expect("a path or an authority alone is a valid URI");
    if !req.headers().contains_key(HOST) {
        let host = HeaderValue::from_str(authority.as_str())
            .expect("a socket address is a valid header value");
        req.headers_mut().insert(HOST, host);
    }
    let body = req.body();
    if !matches!(*req.method(), Method::GET | Method::HEAD) || body.is_end_stream() {
        return false;
    }
    if body.size_hint().exact().is_none() && !req.headers().contains_key(CONTENT_LENGTH) {
        req.headers_mut()
            .insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
    }
    true
}

#[cfg(test)]
mod tests {
    //! Against real apps on loopback sockets: hyper's HTTP/1 server, and a
    //! bare one that closes each connection after its answer.

    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};

    use super::*;
    use crate::http::test_app::{Seen, bare_app};

    /// An HTTP/1.1 app that answers every request 200 with no body and
    /// keeps its connection: what it saw, the connections it accepted
    /// among it.
    async fn app() -> (SocketAddr, Arc<Seen>) {
        bare_app(|_| EMPTY_200.to_vec(), |_| false).await
    }

    const EMPTY_200: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";

    /// The target and `Host` of each request `seen`.
    fn targets_and_hosts(seen: &Seen) -> Vec<(String, String)> {
        let target = |line: &str| line.split(' ').nth(1).unwrap_or_default().to_owned();
        let requests = seen.lines_and_hosts().into_iter();
        requests.map(|(line, host)| (target(&line), host)).collect()
    }

    fn web_id() -> SpiffeId {
        SpiffeId::parse("spiffe://td/ns/a/sa/web").unwrap()
    }

    fn get(uri: &str) -> Request<Empty<Bytes>> {
        Request::get(uri).body(Empty::new()).unwrap()
    }

    async fn send(upstream: &Upstream<Empty<Bytes>>, req: Request<Empty<Bytes>>) -> u16 {
        let authority = Authority::from_maybe_shared(upstream.target.to_string()).unwrap();
        let response = upstream
            .send(req, &authority, true, &Metrics::new())
            .await
            .unwrap();
        let status = response.status().as_u16();
        response.into_body().collect().await.unwrap();
        // As the access-log entry does when the request is over.
        upstream.release();
        status
    }

    #[tokio::test]
    async fn callers_take_turns_on_one_app_connection_while_their_requests_do() {
        let (addr, seen) = app().await;
        let pool = Arc::new(AppConnections::default());

        let first = Upstream::new(pool.clone(), addr, web_id());
        assert_eq!(send(&first, get("http://api.example/a?x=1")).await, 200);
        let mut with_host = get("/b");
        with_host
            .headers_mut()
            .insert(HOST, HeaderValue::from_static("api.example"));
        assert_eq!(send(&first, with_host).await, 200);
        assert_eq!(send(&first, get("/")).await, 200);
        assert_eq!(seen.accepted(), 1, "one caller, one app connection");

        // The first caller is idle now, and holds no app connection.
        let second = Upstream::new(pool.clone(), addr, web_id());
        assert_eq!(send(&second, get("/c")).await, 200);
        assert_eq!(seen.accepted(), 1, "an idle caller held the app connection");
        drop((first, second));
        assert_eq!(pool.parked(), 1, "the app connection was not parked");

        // Origin form, and the app's address as `Host` when the caller sent none.
        let app = addr.to_string();
        let expected = [
            ("/a?x=1", app.as_str()),
            ("/b", "api.example"),
            ("/", &app),
            ("/c", &app),
        ];
        assert_eq!(
            targets_and_hosts(&seen),
            expected.map(|(t, h)| (t.to_owned(), h.to_owned())).to_vec()
        );
    }

    #[tokio::test]
    async fn a_request_goes_out_only_on_a_connection_to_its_own_app_port() {
        // One sidecar serves every port of its app: a request decided for
        // one port must reach that port, whatever another left parked.
        let (web, web_seen) = app().await;
        let (admin, admin_seen) = app().await;
        let pool = Arc::new(AppConnections::default());

        let to_web = Upstream::new(pool.clone(), web, web_id());
        assert_eq!(send(&to_web, get("/public")).await, 200);
        drop(to_web);
        assert_eq!(pool.parked(), 1);

        let to_admin = Upstream::new(pool.clone(), admin, web_id());
        assert_eq!(send(&to_admin, get("/admin")).await, 200);
        drop(to_admin);
        assert_eq!(
            admin_seen.lines_and_hosts().len(),
            1,
            "the request for the admin port did not reach it"
        );
        assert_eq!(admin_seen.accepted(), 1);

        // Each port's parked connection is still there for its own callers.
        assert_eq!(pool.parked(), 2);
        let again = Upstream::new(pool.clone(), web, web_id());
        assert_eq!(send(&again, get("/public/2")).await, 200);
        assert_eq!(web_seen.accepted(), 1, "web's was not reused");
        let web_targets: Vec<String> = targets_and_hosts(&web_seen)
            .into_iter()
            .map(|(t, _)| t)
            .collect();
        assert_eq!(web_targets, ["/public", "/public/2"]);
    }

    #[tokio::test]
    async fn a_connection_the_app_closed_is_never_used_again() {
        // Answers one request per connection, then closes it, without
        // saying so (an app whose idle timeout is shorter than ours).
        let (addr, seen) = bare_app(|_| EMPTY_200.to_vec(), |_| true).await;

        let pool = Arc::new(AppConnections::default());
        let upstream = Upstream::new(pool.clone(), addr, web_id());
        for round in 1..=3 {
            assert_eq!(send(&upstream, get("/")).await, 200, "request {round}");
            // Until the sidecar has seen the close, the next request could
            // race it; that race is a retry's business, not this test's.
            let mut waited = 0;
            while !upstream
                .lock()
                .as_ref()
                .is_none_or(|app| app.sender.is_closed())
            {
                assert!(waited < 5_000, "the close was never noticed");
                tokio::time::sleep(Duration::from_millis(1)).await;
                waited += 1;
            }
        }
        assert_eq!(seen.accepted(), 3);
        drop(upstream);
        assert_eq!(pool.parked(), 0, "a closed connection was parked");
    }

    #[tokio::test]
    async fn a_connection_parked_for_one_identity_never_carries_anothers_request() {
        let (addr, seen) = app().await;
        let pool = Arc::new(AppConnections::default());
        let web = Upstream::new(pool.clone(), addr, web_id());
        assert_eq!(send(&web, get("/")).await, 200);
        drop(web);
        assert_eq!(pool.parked(), 1);

        let other = SpiffeId::parse("spiffe://td/ns/b/sa/api").unwrap();
        let api = Upstream::new(pool.clone(), addr, other);
        assert_eq!(send(&api, get("/")).await, 200);
        assert_eq!(
            seen.accepted(),
            2,
            "another identity's request went out on web's app connection"
        );
        drop(api);
        assert_eq!(pool.parked(), 2, "each identity's connection is parked");

        // web's own is still there for it.
        let web = Upstream::new(pool.clone(), addr, web_id());
        assert_eq!(send(&web, get("/")).await, 200);
        assert_eq!(seen.accepted(), 2);
    }

    #[tokio::test]
    async fn the_app_connection_of_a_get_with_a_body_is_closed_not_parked() {
        let (addr, seen) = app().await;
        let pool = Arc::new(AppConnections::default());
        let upstream = Upstream::new(pool.clone(), addr, web_id());
        let authority = Authority::from_maybe_shared(addr.to_string()).unwrap();
        let with_body = Request::get("/")
            .body(http_body_util::Full::new(Bytes::from_static(
                b"GET /admin HTTP/1.1\r\n\r\n",
            )))
            .unwrap();
        let response = upstream
            .send(with_body, &authority, true, &Metrics::new())
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.into_body().collect().await.unwrap();
        upstream.release();
        drop(upstream);
        assert_eq!(pool.parked(), 0, "its app connection was parked");

        // The next request, without a body, takes a new one and parks it.
        let upstream = Upstream::new(pool.clone(), addr, web_id());
        let authority = Authority::from_maybe_shared(addr.to_string()).unwrap();
        let response = upstream
            .send(get_full("/"), &authority, true, &Metrics::new())
            .await
            .unwrap();
        response.into_body().collect().await.unwrap();
        upstream.release();
        assert_eq!(seen.accepted(), 2);
        assert_eq!(pool.parked(), 1);
    }

    /// A kept-alive connection the app closes with a request queued on it,
    /// before hyper wrote any of it: the request comes back unsent and
    /// goes out on a new connection, counted once as a whole request sent
    /// again.
    #[tokio::test]
    async fn a_request_that_never_left_a_closed_connection_goes_out_again_and_counts() {
        let (addr, seen) = app().await;
        let pool = Arc::new(AppConnections::default());
        // A parked connection whose driver the test holds: polled once, it
        // waits for a request; dropped, it ends with the one queued unsent.
        let (ours, _app_end) = tokio::io::duplex(4096);
        let (sender, conn) = http1::handshake(TokioIo::new(ours)).await.unwrap();
        let mut conn = Box::pin(conn);
        std::future::poll_fn(|cx| {
            assert!(conn.as_mut().poll(cx).is_pending());
            std::task::Poll::Ready(())
        })
        .await;
        let task = tokio::spawn(std::future::pending::<()>()).abort_handle();
        pool.park(addr, &web_id(), AppConn { sender, task });

        let metrics = Metrics::new();
        let upstream = Upstream::new(pool.clone(), addr, web_id());
        let authority = Authority::from_maybe_shared(addr.to_string()).unwrap();
        let mut sending = Box::pin(upstream.send(get("/again"), &authority, true, &metrics));
        std::future::poll_fn(|cx| {
            assert!(sending.as_mut().poll(cx).is_pending(), "answered unsent");
            std::task::Poll::Ready(())
        })
        .await;
        drop(conn);
        let response = sending.await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(seen.accepted(), 1);
        assert_eq!(targets_and_hosts(&seen)[0].0, "/again");
        let text = metrics.encode();
        for series in [
            "trellis_app_request_retries_total{reason=\"whole_request\"} 1",
            "trellis_app_request_retries_total{reason=\"streaming_body\"} 0",
        ] {
            assert!(text.contains(series), "{series} missing from\n{text}");
        }
    }

    fn get_full(uri: &str) -> Request<http_body_util::Full<Bytes>> {
        Request::get(uri)
            .body(http_body_util::Full::default())
            .unwrap()
    }
}
