//! HTTP/2 connections to the app.
//!
//! HTTP/2 multiplexes, so one connection to an app port carries every
//! HTTP/2 request of one caller's connection: each caller connection has
//! its own ([`Connection`](super::Connection) holds it), as HTTP/2 flow
//! control is per connection, and a caller that stops reading its answers
//! must stall only its own streams. A request clones the connection's
//! sender under a short lock and sends on it: no pool checkout, no boxed
//! future, no task of its own beyond the one hyper spawns for a request
//! body still arriving. When the owner is dropped (the caller's connection
//! ended), its app connections close once their streams are done.
//!
//! The first request to a port dials it; requests that arrive while it is
//! being dialled wait for that one connection rather than dial their own.
//! A connection the app closes, or that fails, is forgotten and the next
//! request dials again; a request that never left a reused connection
//! (the app had closed it) goes out on the next, counted in
//! `trellis_app_request_retries_total` ([`Metrics::app_request_retry`]).
//! A stream the app resets fails alone: its connection stays the port's.
//! A connection that no request has used for [`IDLE`] is let go: no new
//! request takes it, and it closes once the streams on it are done.
//!
//! A request whose connection fails after the app's first bytes were not
//! HTTP/2 (an app that speaks only HTTP/1 answers the connection preface
//! with an HTTP/1 status line) fails with [`SendError::NotHttp2`], not as
//! an app that could not be reached.
//!
//! Each connection gathers its writes ([`GatheredWrites`]), so the frames
//! of the streams in flight leave together instead of one write for each
//! DATA frame h2 sends from a request's own buffer.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use trellis_core::gather::GatheredWrites;

use super::upstream::{IDLE, SendError};
use crate::metrics::Metrics;

/// The flow-control window each HTTP/2 connection to the app opens for one
/// stream: how much of one answer the sidecar takes from the app before it
/// has passed any on. hyper's client opens 2 MiB.
pub const APP_STREAM_WINDOW: u32 = 256 * 1024;

/// The flow-control window each HTTP/2 connection to the app opens for all
/// of its streams together: how much of the answers on it the sidecar holds
/// at most while their caller does not read them. hyper's client opens
/// 5 MiB, which a caller that stopped reading left piled up in the sidecar
/// for each of its connections; this is the window the inbound server
/// opens to each caller (hyper's server default).
pub const APP_CONNECTION_WINDOW: u32 = 1024 * 1024;

/// The HTTP/2 connections to the app's ports, at most one each.
pub struct AppH2<B> {
    shared: Arc<Shared<B>>,
}

impl<B> Drop for AppH2<B> {
    fn drop(&mut self) {
        // No new request will come: each connection ends once its streams
        // are done.
        self.shared.lock().clear();
    }
}

struct Shared<B> {
    ports: Mutex<Vec<Port<B>>>,
    /// How long a connection is kept with no request on it.
    idle: Duration,
}

/// One app port: its connection, if one is open, the lock its dial is
/// made under, and whether the app's first bytes on the last connection
/// dialled were not HTTP/2 ([`FirstBytes`]).
struct Port<B> {
    target: SocketAddr,
    conn: Option<Conn<B>>,
    dialing: Arc<tokio::sync::Mutex<()>>,
    not_h2: Arc<AtomicBool>,
}

struct Conn<B> {
    /// Tells this connection from the ones dialled before and after it to
    /// the same port.
    id: u64,
    sender: SendRequest<B>,
    used: Instant,
}

impl<B> Default for AppH2<B> {
    fn default() -> Self {
        Self::with_idle(IDLE)
    }
}

impl<B> AppH2<B> {
    /// Connections let go after `idle` without a request.
    pub fn with_idle(idle: Duration) -> Self {
        AppH2 {
            shared: Arc::new(Shared {
                ports: Mutex::default(),
                idle,
            }),
        }
    }

    /// How many connections to the app are held open for new requests.
    #[cfg(test)]
    fn open(&self) -> usize {
        let ports = self.shared.lock();
        ports.iter().filter(|p| p.conn.is_some()).count()
    }
}

impl<B> Shared<B> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Port<B>>> {
        self.ports.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The open connection to `target`, marked used now, if there is one.
    fn checkout(&self, target: SocketAddr) -> Option<(u64, SendRequest<B>)> {
        let mut ports = self.lock();
        let port = ports.iter_mut().find(|p| p.target == target)?;
        let conn = port.conn.as_mut()?;
        if conn.sender.is_closed() {
            port.conn = None;
            return None;
        }
        conn.used = Instant::now();
        Some((conn.id, conn.sender.clone()))
    }

    /// The lock the dial to `target` is made under, and the port's
    /// [`not_h2`](Port::not_h2).
    fn dialing(&self, target: SocketAddr) -> (Arc<tokio::sync::Mutex<()>>, Arc<AtomicBool>) {
        let mut ports = self.lock();
        if let Some(port) = ports.iter().find(|p| p.target == target) {
            return (port.dialing.clone(), port.not_h2.clone());
        }
        let dialing = Arc::new(tokio::sync::Mutex::new(()));
        let not_h2 = Arc::new(AtomicBool::new(false));
        ports.push(Port {
            target,
            conn: None,
            dialing: dialing.clone(),
            not_h2: not_h2.clone(),
        });
        (dialing, not_h2)
    }

    /// Why a request to `target` failed: [`SendError::NotHttp2`] if the
    /// app's first bytes on its connection were not HTTP/2, else `e`.
    fn failed(&self, target: SocketAddr, e: hyper::Error) -> SendError {
        let ports = self.lock();
        let port = ports.iter().find(|p| p.target == target);
        if port.is_some_and(|p| p.not_h2.load(Ordering::Relaxed)) {
            SendError::NotHttp2(e)
        } else {
            SendError::Request(e)
        }
    }

    /// Forgets connection `id` to `target`, if it is still the port's.
    fn forget(&self, target: SocketAddr, id: u64) {
        let mut ports = self.lock();
        if let Some(port) = ports.iter_mut().find(|p| p.target == target)
            && port.conn.as_ref().is_some_and(|c| c.id == id)
        {
            port.conn = None;
        }
    }

    /// Forgets connection `id` to `target` if no request has used it for
    /// [`idle`](Self::idle); otherwise how long until it would have been
    /// idle that long. `None` once it is forgotten, or was already.
    fn idle_left(&self, target: SocketAddr, id: u64) -> Option<Duration> {
        let mut ports = self.lock();
        let port = ports.iter_mut().find(|p| p.target == target)?;
        let conn = port.conn.as_ref().filter(|c| c.id == id)?;
        let left = self.idle.checked_sub(conn.used.elapsed());
        if left.is_none_or(|left| left.is_zero()) {
            port.conn = None;
            return None;
        }
        left
    }
}

impl<B> AppH2<B>
where
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// Sends `req` (its URI in absolute form, with the authority the app is
    /// to read in `:authority`) to the app at `target` over the port's
    /// connection, dialling one if there is none. A request a reused
    /// connection gives back unsent (the app had closed it) goes out on
    /// the next, and is counted in `metrics`
    /// ([`Metrics::app_request_retry`]).
    pub async fn send(
        &self,
        target: SocketAddr,
        mut req: Request<B>,
        metrics: &Metrics,
    ) -> Result<Response<Incoming>, SendError> {
        loop {
            let ((id, mut sender), reused) = match self.shared.checkout(target) {
                Some(open) => (open, true),
                // Boxed: a dial is rare (once a connection), and its state
                // would otherwise enlarge every request's future.
                None => Box::pin(self.dial(target)).await?,
            };
            match sender.try_send_request(req).await {
                Ok(response) => return Ok(response),
                Err(mut e) => {
                    // The request comes back only if it never left: the
                    // connection had closed, and a new one may take it.
                    // An error of this request's stream alone (the app
                    // reset it) leaves the connection to the others.
                    let unsent = e.take_message();
                    if unsent.is_some() || sender.is_closed() {
                        self.shared.forget(target, id);
                    }
                    match unsent {
                        Some(unsent) if reused => {
                            metrics.app_request_retry(unsent.body().is_end_stream());
                            req = unsent;
                        }
                        _ => return Err(self.shared.failed(target, e.into_error())),
                    }
                }
            }
        }
    }

    /// The connection to `target` another request dialled meanwhile, or a
    /// new one; `true` with the first.
    async fn dial(&self, target: SocketAddr) -> Result<((u64, SendRequest<B>), bool), SendError> {
        let (dialing, not_h2) = self.shared.dialing(target);
        let _one = dialing.lock().await;
        if let Some(open) = self.shared.checkout(target) {
            return Ok((open, true));
        }
        let tcp = crate::net::connect(target)
            .await
            .map_err(SendError::Connect)?;
        not_h2.store(false, Ordering::Relaxed);
        let tcp = FirstBytes {
            inner: tcp,
            not_h2: Some(not_h2),
        };
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(APP_STREAM_WINDOW)
            .initial_connection_window_size(APP_CONNECTION_WINDOW)
            .handshake(TokioIo::new(GatheredWrites::new(tcp)))
            .await
            .map_err(SendError::Http2Handshake)?;
        let id = next_id();
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let mut wait = shared.idle;
            loop {
                tokio::select! {
                    ended = &mut conn => {
                        if let Err(e) = ended {
                            tracing::debug!(error = %e, "HTTP/2 app connection ended with an error");
                        }
                        break;
                    }
                    () = tokio::time::sleep(wait) => match shared.idle_left(target, id) {
                        Some(left) => wait = left,
                        // Let go: it ends once its streams are done and the
                        // last request holding its sender has finished.
                        None => {
                            let _ = (&mut conn).await;
                            break;
                        }
                    },
                }
            }
            shared.forget(target, id);
        });
        let mut ports = self.shared.lock();
        if let Some(port) = ports.iter_mut().find(|p| p.target == target) {
            port.conn = Some(Conn {
                id,
                sender: sender.clone(),
                used: Instant::now(),
            });
        }
        Ok(((id, sender), false))
    }
}

/// An app connection that notes whether the app's first bytes were not
/// HTTP/2: an HTTP/2 server's first frame is its SETTINGS (frame type 4
/// after a 3-byte length), and an HTTP/1-only app answers the connection
/// preface with a status line (`HTTP/1.1 400 ...`) instead. Once the first
/// bytes are in, reads and writes pass straight through.
struct FirstBytes<S> {
    inner: S,
    /// Set (to whether they were not HTTP/2) and dropped at the first bytes.
    not_h2: Option<Arc<AtomicBool>>,
}

impl<S: AsyncRead + Unpin> AsyncRead for FirstBytes<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.inner).poll_read(cx, buf);
        if self.not_h2.is_some() && buf.filled().len() > before {
            let first = &buf.filled()[before..];
            let not_h2 = first.get(3).is_some_and(|kind| *kind != 4);
            if let Some(flag) = self.not_h2.take() {
                flag.store(not_h2, Ordering::Relaxed);
            }
        }
        read
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FirstBytes<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A number no other connection of this process has.
fn next_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    //! Against real HTTP/2 apps (hyper's server) on loopback sockets.

    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use http::StatusCode;
    use http_body_util::{BodyExt, Full, StreamBody};
    use tokio::net::TcpListener;

    use super::*;

    /// What the test app counts: connections accepted, and those over.
    #[derive(Default)]
    struct Seen {
        accepted: AtomicUsize,
        ended: AtomicUsize,
    }

    impl Seen {
        fn accepted(&self) -> usize {
            self.accepted.load(Ordering::SeqCst)
        }
        fn ended(&self) -> usize {
            self.ended.load(Ordering::SeqCst)
        }
    }

    /// An app serving HTTP/2 with prior knowledge: `/slow` is answered
    /// with ten chunks of 100 bytes 50 ms apart, `/reset` with its stream
    /// reset, anything else with its own path. With `one_each` it closes
    /// each connection after its first answer, as an app restarting its
    /// listener would.
    async fn app(one_each: bool) -> (SocketAddr, Arc<Seen>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let counts = seen.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                counts.accepted.fetch_add(1, Ordering::SeqCst);
                let (answered, mut first) = tokio::sync::mpsc::channel::<()>(1);
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let answered = answered.clone();
                    async move {
                        let path = req.uri().path().to_owned();
                        if let Err(e) = req.into_body().collect().await {
                            return Err(std::io::Error::other(e));
                        }
                        if path == "/reset" {
                            // hyper's server resets the stream of a
                            // request its service fails.
                            return Err(std::io::Error::other("reset"));
                        }
                        let _ = answered.try_send(());
                        let body = if path == "/slow" {
                            let chunks = futures::stream::unfold(0, |n| async move {
                                if n == 10 {
                                    return None;
                                }
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                let chunk = hyper::body::Frame::data(Bytes::from(vec![b's'; 100]));
                                Some((Ok::<_, hyper::Error>(chunk), n + 1))
                            });
                            http_body_util::Either::Left(StreamBody::new(chunks))
                        } else {
                            http_body_util::Either::Right(Full::new(Bytes::from(path)))
                        };
                        Ok::<_, std::io::Error>(Response::new(body))
                    }
                });
                let served = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service);
                let counts = counts.clone();
                tokio::spawn(async move {
                    let mut served = std::pin::pin!(served);
                    if one_each {
                        tokio::select! {
                            _ = &mut served => {}
                            _ = first.recv() => {
                                // Let the answer leave, then go away.
                                served.as_mut().graceful_shutdown();
                                let _ = served.await;
                            }
                        }
                    } else {
                        let _ = served.await;
                    }
                    counts.ended.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        (addr, seen)
    }

    fn post(app: SocketAddr, path: &str) -> Request<Full<Bytes>> {
        Request::post(format!("http://{app}{path}"))
            .body(Full::new(Bytes::from_static(b"a request body")))
            .unwrap()
    }

    /// Sends `path` to `app` and returns the status and body.
    async fn call(h2: &AppH2<Full<Bytes>>, app: SocketAddr, path: &str) -> (StatusCode, Bytes) {
        let answer = h2
            .send(app, post(app, path), &Metrics::new())
            .await
            .unwrap();
        let status = answer.status();
        (
            status,
            answer.into_body().collect().await.unwrap().to_bytes(),
        )
    }

    /// Waits, at most ten seconds, until `done`.
    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "still waiting: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn every_request_to_a_port_shares_its_one_connection() {
        let (one, seen_one) = app(false).await;
        let (two, seen_two) = app(false).await;
        let h2 = Arc::new(AppH2::default());
        // Forty requests at once to each port, before any connection is
        // open: they wait for the first dial instead of making their own.
        let mut calls = tokio::task::JoinSet::new();
        for n in 0..40 {
            for app in [one, two] {
                let h2 = h2.clone();
                let path = format!("/call-{n}");
                calls.spawn(async move { (path.clone(), call(&h2, app, &path).await) });
            }
        }
        while let Some(done) = calls.join_next().await {
            let (path, (status, body)) = done.unwrap();
            assert_eq!(status, StatusCode::OK);
            assert_eq!(body, path.as_bytes(), "each answer is its own request's");
        }
        assert_eq!(seen_one.accepted(), 1, "one connection to the first port");
        assert_eq!(seen_two.accepted(), 1, "one connection to the second port");
        assert_eq!(h2.open(), 2);
        // Later requests still take them.
        assert_eq!(call(&h2, one, "/later").await.0, StatusCode::OK);
        assert_eq!(seen_one.accepted(), 1);
    }

    /// Dropped with its caller's connection, the owner lets its
    /// connections go: a stream still running finishes whole, then the
    /// connection closes instead of waiting out the idle time.
    #[tokio::test]
    async fn dropping_the_owner_closes_its_connections_once_their_streams_end() {
        let (app, seen) = app(false).await;
        let h2 = AppH2::default();
        assert_eq!(call(&h2, app, "/").await.0, StatusCode::OK);
        let slow = h2
            .send(app, post(app, "/slow"), &Metrics::new())
            .await
            .unwrap();
        drop(h2);
        let body = slow.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body.len(), 1000, "the stream in flight is delivered whole");
        until("the connection to close", || seen.ended() == 1).await;
        assert_eq!(seen.accepted(), 1);
    }

    #[tokio::test]
    async fn a_stream_the_app_resets_fails_alone() {
        let (app, seen) = app(false).await;
        let h2 = AppH2::default();
        assert_eq!(call(&h2, app, "/").await.0, StatusCode::OK);
        let reset = h2.send(app, post(app, "/reset"), &Metrics::new()).await;
        assert!(
            matches!(&reset, Err(SendError::Request(e)) if !e.is_closed()),
            "{reset:?}"
        );
        // The connection stays the port's: the next request takes it.
        assert_eq!(h2.open(), 1);
        assert_eq!(
            call(&h2, app, "/after").await,
            (StatusCode::OK, "/after".into())
        );
        assert_eq!(seen.accepted(), 1, "one connection throughout");
    }

    #[tokio::test]
    async fn a_connection_the_app_closed_is_replaced() {
        let (app, seen) = app(true).await;
        let h2 = AppH2::default();
        for n in 1..=3 {
            assert_eq!(call(&h2, app, "/").await.0, StatusCode::OK);
            assert_eq!(seen.accepted(), n);
            // The app has gone away from this connection: it is forgotten,
            // and the next request dials a new one.
            until("the app closing its connection", || seen.ended() == n).await;
            until("the connection being forgotten", || h2.open() == 0).await;
        }
    }

    /// The series of `trellis_app_request_retries_total`, as `metrics`
    /// has them: whole_request, then streaming_body.
    fn retries(metrics: &Metrics) -> [String; 2] {
        let text = metrics.encode();
        ["whole_request", "streaming_body"].map(|reason| {
            let series = format!("trellis_app_request_retries_total{{reason=\"{reason}\"}} ");
            let line = text.lines().find(|l| l.starts_with(&series));
            line.unwrap_or_else(|| panic!("{series} missing from\n{text}"))
                .to_owned()
        })
    }

    /// Sends `req` to `app` with the port's connection replaced by one whose
    /// driver the test holds and drops once the request is queued on it, as
    /// a connection the app closed gives it back unsent; returns the body
    /// of the answer it got on the connection it went out on instead.
    async fn given_back(
        h2: &AppH2<Full<Bytes>>,
        app: SocketAddr,
        req: Request<Full<Bytes>>,
        metrics: &Metrics,
    ) -> Bytes {
        let (ours, _app_end) = tokio::io::duplex(4096);
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .handshake::<_, Full<Bytes>>(TokioIo::new(ours))
            .await
            .unwrap();
        if let Some(port) = h2.shared.lock().iter_mut().find(|p| p.target == app) {
            port.conn = Some(Conn {
                id: next_id(),
                sender,
                used: Instant::now(),
            });
        }
        let mut sending = Box::pin(h2.send(app, req, metrics));
        std::future::poll_fn(|cx| {
            assert!(sending.as_mut().poll(cx).is_pending(), "answered unsent");
            std::task::Poll::Ready(())
        })
        .await;
        drop(conn);
        let answer = sending.await.unwrap();
        assert_eq!(answer.status(), StatusCode::OK);
        answer.into_body().collect().await.unwrap().to_bytes()
    }

    /// A request on a fresh connection counts nothing; one a reused
    /// connection gives back unsent goes out on a new connection and
    /// counts once: under whole_request if its body was at its end, else
    /// under streaming_body.
    #[tokio::test]
    async fn a_request_a_closed_connection_gave_back_goes_out_again_and_counts() {
        let (app, seen) = app(false).await;
        let h2 = AppH2::default();
        let metrics = Metrics::new();
        let get = Request::get(format!("http://{app}/fresh"))
            .body(Full::<Bytes>::default())
            .unwrap();
        let answer = h2.send(app, get, &metrics).await.unwrap();
        assert_eq!(answer.status(), StatusCode::OK);
        assert_eq!(
            retries(&metrics),
            [
                "trellis_app_request_retries_total{reason=\"whole_request\"} 0",
                "trellis_app_request_retries_total{reason=\"streaming_body\"} 0",
            ],
            "a request on a fresh connection is not sent again"
        );

        let get = Request::get(format!("http://{app}/again"))
            .body(Full::<Bytes>::default())
            .unwrap();
        assert_eq!(given_back(&h2, app, get, &metrics).await, "/again");
        assert_eq!(seen.accepted(), 2, "sent again on a new connection");
        assert_eq!(
            retries(&metrics),
            [
                "trellis_app_request_retries_total{reason=\"whole_request\"} 1",
                "trellis_app_request_retries_total{reason=\"streaming_body\"} 0",
            ],
            "a request with no body left counts as a whole request"
        );

        let with_body = post(app, "/with-body");
        assert_eq!(
            given_back(&h2, app, with_body, &metrics).await,
            "/with-body"
        );
        assert_eq!(seen.accepted(), 3);
        assert_eq!(
            retries(&metrics),
            [
                "trellis_app_request_retries_total{reason=\"whole_request\"} 1",
                "trellis_app_request_retries_total{reason=\"streaming_body\"} 1",
            ],
            "a request whose body was still to be read counts as streaming"
        );
    }

    #[tokio::test]
    async fn an_idle_connection_is_let_go_but_one_in_use_is_kept() {
        let (app, seen) = app(false).await;
        const IDLE: Duration = Duration::from_secs(2);
        let h2 = AppH2::with_idle(IDLE);
        // Fifteen requests a tenth of the idle time apart, so over one and
        // a half times the idle time whatever the load (a slow request only
        // makes it longer), each well within the idle time of the one
        // before: one connection throughout.
        for _ in 0..15 {
            assert_eq!(call(&h2, app, "/").await.0, StatusCode::OK);
            tokio::time::sleep(IDLE / 10).await;
        }
        assert_eq!(seen.accepted(), 1, "a connection in use is kept");
        // Then none: it is let go and closed.
        until("the idle connection closing", || seen.ended() == 1).await;
        assert_eq!(h2.open(), 0);
        assert_eq!(call(&h2, app, "/").await.0, StatusCode::OK);
        assert_eq!(seen.accepted(), 2, "the next request dials again");
    }

    #[tokio::test]
    async fn a_stream_outlives_the_idle_time_of_its_connection() {
        let (app, seen) = app(false).await;
        let h2 = AppH2::with_idle(Duration::from_millis(100));
        // The answer takes half a second, five times the idle time: the
        // connection is let go meanwhile, and still delivers all of it.
        let (status, body) = call(&h2, app, "/slow").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body.len(), 1000, "the whole answer");
        assert_eq!(h2.open(), 0, "let go while the answer came");
        until("the idle connection closing", || seen.ended() == 1).await;
    }

    /// The app sees the windows the sidecar's connection to it opens:
    /// [`APP_STREAM_WINDOW`] for each stream in its SETTINGS, and
    /// [`APP_CONNECTION_WINDOW`] for the connection, by the WINDOW_UPDATE
    /// that follows them, so an answer its caller does not read piles up
    /// in the sidecar no further than that.
    #[tokio::test]
    async fn the_app_connection_opens_bounded_windows() {
        use crate::http::testing::{
            H2_PREFACE, INITIAL_WINDOW_SIZE, SETTINGS, WINDOW_UPDATE, read_frame,
        };
        use tokio::io::AsyncReadExt;

        /// A stream's and a connection's window before any SETTINGS or
        /// WINDOW_UPDATE (RFC 9113, 6.9.2).
        const DEFAULT_WINDOW: u32 = 65_535;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = listener.local_addr().unwrap();
        let h2: AppH2<Full<Bytes>> = AppH2::default();
        let sending = tokio::spawn(async move {
            let _ = h2.send(app, post(app, "/"), &Metrics::new()).await;
        });
        let (mut tcp, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .expect("the sidecar dialled the app")
            .unwrap();
        let mut preface = [0u8; 24];
        tcp.read_exact(&mut preface).await.unwrap();
        assert_eq!(&preface[..], H2_PREFACE);
        let (mut stream_window, mut connection_window) = (None, None);
        while connection_window.is_none() {
            let frame = tokio::time::timeout(Duration::from_secs(10), read_frame(&mut tcp))
                .await
                .expect("the sidecar sent its SETTINGS and WINDOW_UPDATE")
                .expect("the sidecar kept the connection open");
            match frame.kind {
                SETTINGS => {
                    stream_window = frame
                        .settings()
                        .iter()
                        .rev()
                        .find(|(id, _)| *id == INITIAL_WINDOW_SIZE)
                        .map(|(_, value)| *value);
                }
                WINDOW_UPDATE if frame.stream == 0 => {
                    connection_window = Some(DEFAULT_WINDOW + frame.window_increment());
                }
                _ => {}
            }
        }
        assert_eq!(
            stream_window,
            Some(APP_STREAM_WINDOW),
            "SETTINGS_INITIAL_WINDOW_SIZE"
        );
        assert_eq!(
            connection_window,
            Some(APP_CONNECTION_WINDOW),
            "the connection's window"
        );
        sending.abort();
    }
}
