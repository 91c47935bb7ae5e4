//! The request heads the control plane's HTTP/1.1 ports (the admin port,
//! the webhook port) refuse. Every head of a connection is read and
//! checked before hyper's server sees it ([`trellis_core::http1`]: the
//! first by `first_head`, each later one on a kept-alive connection by
//! `Heads`): one that does not parse, is too large, or has a target too
//! long or not a URI, is answered 400, 431 or 414 with a line of text
//! naming the fault (a bare CR in a line among them, named as the sidecar
//! names it), and the connection closed; one begun and not whole within
//! the port's head timeout is answered 408 ([`HEAD_TIMED_OUT`]); a
//! connection idle that long is closed without a word. What the check
//! leaves to hyper (a field name, the framing), and a head after a chunked
//! body hyper refuses (one that does not parse, or over hyper's bounds on
//! chunk extensions or trailers), gets hyper's own answer, a status
//! alone.
//! Either way the refusal is counted by its kind (`reason`: `malformed`,
//! `head_too_large`, `target_too_long`; a 408 is `malformed`) in the
//! port's metric and logged as a warning naming the client and the fault,
//! by the port's `Refusals`, at most once per kind per
//! [`REFUSAL_LOG_PAUSE`](crate::server::REFUSAL_LOG_PAUSE). Never a
//! header's value: the webhook's requests carry AdmissionReviews, the
//! admin port's may carry tokens.
//!
//! The ports switch protocols for nothing: the answer to a request hyper's
//! server may switch for ([`http1::may_switch`]: an HTTP/1.1 request with
//! an `Upgrade`, or a `CONNECT`), after which `Heads` checks no head, says
//! `connection: close` and ends the connection (`SwitchesNothing`), as
//! the sidecar's ports do; hyper would read on, unchecked, otherwise.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use futures::future::{Either, Map};
use http::{Request, Response, Version};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::Service;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use trellis_core::connections::{serve_http1_for, serve_http1_last};
use trellis_core::http1::{self, Bounds, FirstHead, HeadFault, HeadSignals, Heads};
use trellis_core::policy::l7::MAX_REQUEST_HEAD;

use crate::server::Refusals;

/// What a client that sent part of a request head, and not the rest
/// within the port's [`HEAD_TIMEOUT`](crate::admin_http::HEAD_TIMEOUT), is
/// told (with 408).
pub const HEAD_TIMED_OUT: &str = "request head did not arrive within 5 s";
const _: () = assert!(
    crate::admin_http::HEAD_TIMEOUT.as_secs() == 5
        && crate::admin_http::HEAD_TIMEOUT.subsec_nanos() == 0
        && crate::inject::server::HEAD_TIMEOUT.as_secs() == 5
        && crate::inject::server::HEAD_TIMEOUT.subsec_nanos() == 0,
    "HEAD_TIMED_OUT names the ports' bound"
);

/// Serves `io` with hyper's HTTP/1.1 server ([`serve_http1_for`]: `timeout`
/// for each head and the answer in progress at the end, `lifetime` for the
/// connection) until `evicted` resolves (the connection is closed at once)
/// or the port stops (`drain`: the answer in progress, if any, is written
/// first), every request head read and checked before hyper sees it
/// ([`http1::first_head_or_drain`], then [`Heads`]): a head refused, first
/// or later on a kept-alive connection, is answered in words, counted and
/// logged by `refusals` as `message`; one begun and not whole within
/// `timeout` is answered 408 ([`HEAD_TIMED_OUT`]) likewise. A connection
/// whose first head has begun to arrive when the port stops (a byte of it,
/// not only empty lines, read or waiting to be) is served all the same, its answer the
/// connection's last (`connection: close`, [`serve_http1_last`]); one with
/// nothing received is closed at once; so is one idle between requests, while
/// one whose later head has begun to arrive (read, or waiting to be when
/// the port stops) is served that request as its last. `last` says that
/// the port had stopped when the connection's exchange began (a TLS
/// handshake finished after the stop): its first request, given the usual
/// `timeout` to arrive, is its last, and `drain` is not polled. The answer to
/// a request hyper may switch protocols for ends the connection
/// ([`SwitchesNothing`]).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn serve<S, E, D, Svc>(
    io: S,
    client: SocketAddr,
    timeout: Duration,
    lifetime: Duration,
    refusals: &Refusals,
    message: &str,
    mut evicted: Pin<&mut E>,
    mut drain: Pin<&mut D>,
    last: bool,
    service: Svc,
) where
    S: AsyncRead + AsyncWrite + Unpin + OnTcp,
    E: Future<Output = ()>,
    D: Future<Output = ()>,
    Svc: Service<Request<Incoming>, Response = Response<Full<Bytes>>>,
    Svc::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let first = http1::first_head_or_drain(
        io,
        http1::check_head,
        MAX_REQUEST_HEAD,
        timeout,
        evicted.as_mut(),
        drain.as_mut(),
        |io: &S| http1::begun_in_socket(io.tcp()),
    );
    let (first, drained) = first.await;
    let (io, read, fault) = match first {
        FirstHead::Whole(io) => {
            let mut heads = Heads::after_first(io, http1::check_head, MAX_REQUEST_HEAD);
            // Told the port's stop (`HeadSignals::stop`): every answer from
            // then on is the last.
            let signals = heads.signals();
            let service = SwitchesNothing(service, signals.clone());
            let ended = if drained || last {
                // Past the port's stop: the first request is the last.
                serve_http1_last(&mut heads, service, timeout).await
            } else {
                // A later head refused ends hyper's service as a stop
                // does, after the answer in progress.
                let stop = async move {
                    tokio::select! {
                        () = evicted => {}
                        () = signals.refused() => {}
                        () = async {
                            drain.await;
                            signals.stop();
                            // hyper reads the connection once more first
                            // (`serve_http1_for` polls it while this waits),
                            // so bytes waiting at the stop are held too.
                            tokio::task::yield_now().await;
                            // A head begun (the first, read and not yet
                            // given to hyper, or a later one on a kept-alive
                            // connection) is served as a request in
                            // progress is: hyper's graceful shutdown would
                            // close the connection under it. It has what is
                            // left of hyper's head timeout.
                            signals.given().await;
                        } => {}
                    }
                };
                serve_http1_for(&mut heads, service, timeout, lifetime, stop).await
            };
            let Some(fault) = heads.refused(ended.as_ref(), HEAD_TIMED_OUT) else {
                if let Some(error) = ended {
                    refused_by_hyper(&error, client, refusals, message);
                }
                return;
            };
            let (read, io) = heads.into_parts();
            (io, read, fault)
        }
        FirstHead::Refused { io, read, fault } => (io, read, fault),
        FirstHead::Stalled { io, read } => (io, read, HeadFault::timed_out(HEAD_TIMED_OUT)),
        // Hyper would have closed these unanswered too.
        FirstHead::Silent | FirstHead::Closed => return,
    };
    // Counted before the answer, so that a client reading the metrics once
    // it has its answer finds it counted.
    refused(client, &fault, true, refusals, message);
    http1::refuse(io, read, &fault, timeout).await;
}

/// A port's connection, over a TCP stream its stop may look at directly
/// ([`http1::begun_in_socket`]): for a TLS one, the records waiting.
pub(crate) trait OnTcp {
    fn tcp(&self) -> &TcpStream;
}

impl OnTcp for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl OnTcp for tokio_rustls::server::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

/// A port's service, for a port that switches protocols for nothing: its
/// answer to a request hyper's server may switch for
/// ([`http1::may_switch`]) is marked as the connection's last
/// ([`http1::end_connection`]). `Heads` checks no head after such a
/// request (what follows would be another protocol's, were it switched),
/// and hyper, which switches only for a `101` (or a `2xx` to a `CONNECT`),
/// would read on after any other answer, serving heads no check read (a
/// raw `#` in a target among them).
///
/// Once the port stops ([`HeadSignals::stopped`]), every answer is marked
/// so: a request begun then is served as the connection's last.
struct SwitchesNothing<S>(S, Arc<HeadSignals>);

/// Marks an answer as the connection's last ([`ends`]).
type Ends<E> = fn(Result<Response<Full<Bytes>>, E>) -> Result<Response<Full<Bytes>>, E>;

impl<S> Service<Request<Incoming>> for SwitchesNothing<S>
where
    S: Service<Request<Incoming>, Response = Response<Full<Bytes>>>,
{
    type Response = Response<Full<Bytes>>;
    type Error = S::Error;
    type Future = Either<S::Future, Map<S::Future, Ends<S::Error>>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        if !http1::may_switch(&req) && !self.1.stopped() {
            return Either::Left(self.0.call(req));
        }
        let ends: Ends<S::Error> = if req.version() == Version::HTTP_10 {
            ends::<_, true>
        } else {
            ends::<_, false>
        };
        Either::Right(self.0.call(req).map(ends))
    }
}

/// The answer to a request, marked as the connection's last in the
/// request's version: HTTP/1.0 when `HTTP_1_0`, else HTTP/1.1. The version
/// is a parameter of the function, not a value it captures, so that each
/// is a plain `fn` ([`Ends`]), which a closure holding it could not be.
fn ends<E, const HTTP_1_0: bool>(
    answer: Result<Response<Full<Bytes>>, E>,
) -> Result<Response<Full<Bytes>>, E> {
    let version = if HTTP_1_0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    answer.map(|mut answer| {
        http1::end_connection(&mut answer, version);
        answer
    })
}

/// Counts and logs a head hyper refused on a connection it served (its
/// `error`), answered with a status alone; errors that are not a refused
/// head are left alone.
fn refused_by_hyper(error: &hyper::Error, client: SocketAddr, refusals: &Refusals, message: &str) {
    if let Some(fault) = HeadFault::from_hyper(error, &Bounds::PORT) {
        refused(client, &fault, false, refusals, message);
    }
}

fn refused(
    client: SocketAddr,
    fault: &HeadFault,
    worded: bool,
    refusals: &Refusals,
    message: &str,
) {
    refusals.refuse(
        client,
        fault.reason(),
        Some(&Answered { fault, worded }),
        message,
    );
}

/// What a refused head was answered, as its log line's `error` says it:
/// `answered 400: malformed request line: invalid method`, or for hyper's
/// answer `answered 400 with a status alone: malformed request head`.
struct Answered<'a> {
    fault: &'a HeadFault,
    worded: bool,
}

impl fmt::Display for Answered<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = self.fault.status.as_u16();
        let alone = if self.worded {
            ""
        } else {
            " with a status alone"
        };
        write!(f, "answered {status}{alone}: {}", self.fault.why)
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Poll;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::metrics::Metrics;

    const TIMEOUT: Duration = Duration::from_secs(5);
    const HEAD: &[u8] = b"GET /a HTTP/1.1\r\nhost: a\r\n\r\n";

    /// A client's end and the port's end of a loopback connection.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        (client, listener.accept().await.unwrap().0)
    }

    /// Serves `port` as a control-plane port does, until `drain` resolves.
    async fn serving(port: TcpStream, drain: impl Future<Output = ()>) {
        let refusals = Refusals::new(
            Arc::new(Metrics::default()),
            Metrics::admin_malformed_request,
        );
        let service = hyper::service::service_fn(|_req| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
        });
        serve(
            port,
            "127.0.0.1:1".parse().unwrap(),
            TIMEOUT,
            Duration::from_secs(60),
            &refusals,
            "refused",
            std::pin::pin!(std::future::pending::<()>()),
            std::pin::pin!(drain),
            false,
            service,
        )
        .await;
    }

    /// The client's end of a connection its port serves on a task until
    /// the sender says the port stops; the task ends with the connection.
    async fn served_until_stopped() -> (
        TcpStream,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let (client, port) = pair().await;
        let (stop_tx, stop) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(serving(port, async {
            let _ = stop.await;
        }));
        (client, stop_tx, served)
    }

    /// All the client reads until the connection closes, or what it read
    /// by `TIMEOUT`.
    async fn rest(client: &mut TcpStream) -> String {
        let mut read = Vec::new();
        let _ = tokio::time::timeout(TIMEOUT, client.read_to_end(&mut read)).await;
        String::from_utf8_lossy(&read).into_owned()
    }

    /// A kept-alive connection whose second request head has begun to
    /// arrive when the port stops is served that request, as its last,
    /// as a first head begun is: not closed under it.
    #[tokio::test]
    async fn a_second_head_begun_at_the_stop_is_answered_as_the_last() {
        let (mut client, stop_tx, served) = served_until_stopped().await;
        client.write_all(HEAD).await.unwrap();
        let mut first = [0u8; 17];
        client.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"HTTP/1.1 200 OK\r\n");
        let mut answer = vec![0u8; 256];
        let n = client.read(&mut answer).await.unwrap();
        assert!(String::from_utf8_lossy(&answer[..n]).ends_with("ok"));

        client.write_all(&HEAD[..6]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop_tx.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        client.write_all(&HEAD[6..]).await.unwrap();
        let second = rest(&mut client).await;
        assert!(
            second.starts_with("HTTP/1.1 200 OK\r\n") && second.ends_with("ok"),
            "the second request, begun at the stop, was cut: {second:?}"
        );
        assert!(
            second.to_ascii_lowercase().contains("connection: close"),
            "{second}"
        );
        tokio::time::timeout(TIMEOUT, served)
            .await
            .expect("the connection ended after its last answer")
            .unwrap();
    }

    /// A head waiting in a socket the runtime has not yet seen readable
    /// when the port stops (a connection accepted just before the stop,
    /// its task first run after it) is answered, as the connection's last,
    /// not closed unread as one with nothing received.
    #[tokio::test]
    async fn a_head_waiting_unseen_at_the_stop_is_answered_as_the_last() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        for _ in 0..8 {
            let mut client = TcpStream::connect(listener.local_addr().unwrap())
                .await
                .unwrap();
            client.write_all(HEAD).await.unwrap();
            let (port, _) = listener.accept().unwrap();
            // In the port's socket, unread, tokio not told.
            assert_eq!(port.peek(&mut [0u8; 1]).unwrap(), 1);
            port.set_nonblocking(true).unwrap();
            serving(TcpStream::from_std(port).unwrap(), async {}).await;
            let answer = rest(&mut client).await;
            assert!(
                answer.starts_with("HTTP/1.1 200 OK\r\n") && answer.ends_with("ok"),
                "a head waiting at the stop was closed unanswered: {answer:?}"
            );
            assert!(
                answer.to_ascii_lowercase().contains("connection: close"),
                "{answer}"
            );
        }
    }

    /// A kept-alive connection idle at the stop (nothing of a next head
    /// received) closes at once.
    #[tokio::test]
    async fn a_connection_idle_at_the_stop_closes_at_once() {
        let (mut client, stop_tx, served) = served_until_stopped().await;
        client.write_all(HEAD).await.unwrap();
        let mut first = [0u8; 17];
        client.read_exact(&mut first).await.unwrap();
        stop_tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(1), served)
            .await
            .expect("an idle connection closed at once at the stop")
            .unwrap();
    }

    /// A first head read whole, the stop coming before hyper has read it
    /// (the stop is seen on its second look, the first head's read having
    /// looked at most once): the request is answered, not closed unread.
    #[tokio::test]
    async fn a_first_head_read_whole_just_before_the_stop_is_answered() {
        for _ in 0..32 {
            let (mut client, port) = pair().await;
            client.write_all(HEAD).await.unwrap();
            let mut peeked = [0u8; 1];
            port.peek(&mut peeked).await.unwrap();
            let looks = Arc::new(AtomicUsize::new(0));
            let drain = std::future::poll_fn(move |cx| {
                if looks.fetch_add(1, Ordering::Relaxed) >= 1 {
                    return Poll::Ready(());
                }
                cx.waker().wake_by_ref();
                Poll::Pending
            });
            let served = tokio::spawn(serving(port, drain));
            let answer = rest(&mut client).await;
            assert!(
                answer.starts_with("HTTP/1.1 200 OK\r\n") && answer.ends_with("ok"),
                "a head read whole before the stop was cut: {answer:?}"
            );
            served.await.unwrap();
        }
    }
}
