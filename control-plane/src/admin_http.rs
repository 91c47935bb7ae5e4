//! The plain-HTTP admin port: `/live`, `/ready` (200 once the gRPC port is
//! serving; with the Kubernetes store, when the watch of a policy kind has
//! been failing for longer than its grace, 503 naming it if a peer replica
//! answers as healthy, else 200 saying that the policies served may be
//! stale: see [`crate::readiness`]) and `/metrics` (Prometheus text, the
//! only answer typed as such; the others are plain text, a 404 naming the
//! three paths, a 405 with `Allow: GET, HEAD`).
//!
//! It exposes nothing secret and accepts nothing that changes state. It is
//! reachable from every pod of the cluster (the kubelet probes it, a
//! Prometheus scrapes it), so its connections are limited as the sidecar's
//! admin port's are: in number, per client address and in time. A
//! connection closed as it is accepted, past those limits, is counted by
//! the limit that refused it and logged as a warning naming the client,
//! at most once per limit per
//! [`REFUSAL_LOG_PAUSE`](crate::server::REFUSAL_LOG_PAUSE), by the gRPC
//! port's `Refusals`: a kubelet probe refused here restarts the pod or
//! takes it out of its Service, which must not go unseen at the default
//! log level. A malformed request head is answered in words, counted and
//! logged as [`crate::request_head`] says; the answer to a `CONNECT` or an
//! HTTP/1.1 request with an `Upgrade` ends the connection, as it says too.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::watch;
use trellis_core::connections::ConnectionLimits;

use crate::discovery::Discovery;
use crate::metrics::{
    Metrics, render_sidecar_sync, render_store_serving_stale, render_store_watches,
};
use crate::readiness::{Check, Readiness};
use crate::request_head;
use crate::run::{Accepting, Connections};
use crate::server::Refusals;

/// How long a client of the admin port has to send a request's head, and
/// how long an idle connection is kept waiting for the next one: the
/// kubelet and Prometheus send theirs at once.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// Admin connections served at once; more are closed as they are accepted,
/// so a client that opens connections and sends nothing cannot take the
/// control plane's file descriptors or grow its memory without bound.
pub const MAX_CONNECTIONS: usize = 128;

/// Admin connections one client address may hold at once. The kubelet
/// (from the node's address) and a Prometheus need a few; one pod of the
/// cluster must not take every slot and leave the kubelet's probes refused.
pub const MAX_CONNECTIONS_PER_CLIENT: usize = 16;

/// How long one admin connection is served: then it closes after the
/// answer in progress, or [`HEAD_TIMEOUT`] later if that answer cannot be
/// written. A scraper simply reconnects.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// How a connection closed as it was accepted, past the admin port's
/// connection limits, is logged, with the limit (`reason`, `error`) and
/// peer.
const OVER_LIMITS: &str = "admin connection refused: past the port's connection limits";

/// How a request head the admin port refused is logged, with its kind
/// (`reason`), how it was answered and what was wrong (`error`), and the
/// peer ([`crate::request_head`]).
pub const MALFORMED: &str = "admin request refused: malformed request head";

pub struct AdminHttp {
    listener: TcpListener,
}

impl AdminHttp {
    pub async fn bind(addr: SocketAddr) -> std::io::Result<Self> {
        Ok(Self::new(crate::net::bind(addr)?))
    }

    /// The admin port on `listener`, bound already ([`crate::net::bind`]).
    pub fn new(listener: TcpListener) -> Self {
        Self { listener }
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` turns true, then stops accepting and returns
    /// the connections still open, for the caller to wait for
    /// ([`Connections::drain`]): each closes once the answer in progress is
    /// written (a request whose first head has begun to arrive, read or
    /// waiting in the socket, is served as the connection's last), an idle
    /// one, or one with nothing received, at once. `readiness` is the Kubernetes store's
    /// (none with the embedded store). Connections refused by the
    /// connection limits are counted in `metrics`.
    pub async fn run(
        self,
        ready: Arc<AtomicBool>,
        metrics: Arc<Metrics>,
        discovery: Arc<Discovery>,
        readiness: Option<Arc<Readiness>>,
        shutdown: watch::Receiver<bool>,
    ) -> Connections {
        let mut connections = Connections::default();
        let limits = ConnectionLimits::new(MAX_CONNECTIONS, MAX_CONNECTIONS_PER_CLIENT);
        let over_limits = Refusals::new(metrics.clone(), Metrics::admin_connection_refused);
        let malformed = Arc::new(Refusals::new(
            metrics.clone(),
            Metrics::admin_malformed_request,
        ));
        let mut accepting = Accepting::new(self.listener, "admin");
        // The port's stop, seen once here (each connection watches for it
        // too).
        let mut stop_rx = shutdown.clone();
        let mut stop = std::pin::pin!(crate::run::stopping(&mut stop_rx));
        while let Some((tcp, client, after_stop)) =
            accepting.next(stop.as_mut(), &mut connections).await
        {
            let admitted = match limits.admit(client.ip()) {
                Ok(admitted) => admitted,
                Err(refused) => {
                    over_limits.refuse(client, refused.reason(), Some(&refused), OVER_LIMITS);
                    continue;
                }
            };
            let ready = ready.clone();
            let metrics = metrics.clone();
            let discovery = discovery.clone();
            let readiness = readiness.clone();
            let malformed = malformed.clone();
            let mut closing = shutdown.clone();
            connections.serve(async move {
                let admitted = admitted;
                // Told to make way for a client holding fewer (closed at
                // once), or the port stops (its request in flight, or one
                // begun, answered first). One queued at the stop has begun
                // (`net::queued`): its first request is its last.
                let evicted = admitted.evicted();
                let drain = async {
                    if after_stop {
                        std::future::pending::<()>().await;
                    }
                    crate::run::stopping(&mut closing).await;
                };
                let service = hyper::service::service_fn(move |req| {
                    let response =
                        respond(&req, &ready, &metrics, &discovery, readiness.as_deref());
                    async move { Ok::<_, Infallible>(response) }
                });
                request_head::serve(
                    tcp,
                    client,
                    HEAD_TIMEOUT,
                    CONNECTION_LIFETIME,
                    &malformed,
                    MALFORMED,
                    std::pin::pin!(evicted),
                    std::pin::pin!(drain),
                    after_stop,
                    service,
                )
                .await;
            });
        }
        connections
    }
}

fn respond(
    req: &Request<Incoming>,
    ready: &AtomicBool,
    metrics: &Metrics,
    discovery: &Discovery,
    readiness: Option<&Readiness>,
) -> Response<Full<Bytes>> {
    let typed = |status: StatusCode, content_type: &'static str, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts are valid")
    };
    // Only /metrics is Prometheus text (its version), as a scraper reads it.
    let text = |status, body| typed(status, "text/plain; charset=utf-8", body);
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut answer = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed: GET or HEAD only\n".into(),
        );
        // What is allowed, as RFC 9110 section 15.5.6 asks of a 405.
        answer
            .headers_mut()
            .insert(http::header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return answer;
    }
    match req.uri().path() {
        "/live" => text(StatusCode::OK, "live\n".into()),
        "/ready" if !ready.load(Ordering::Acquire) => {
            text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into())
        }
        // Sidecars moved here (a rollout) would get policies that may be
        // stale: a Service sends them to a healthy peer meanwhile. With no
        // healthy peer, staying ready keeps the mesh served.
        "/ready" => match readiness.map(Readiness::check) {
            Some(Check::Unready(reason)) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {reason}\n"),
            ),
            Some(Check::ServingStale(reason)) => {
                text(StatusCode::OK, format!("ready, serving stale: {reason}\n"))
            }
            Some(Check::Current) | None => text(StatusCode::OK, "ready\n".into()),
        },
        "/metrics" => {
            let mut body = metrics.render();
            render_sidecar_sync(&mut body, &discovery.sync_counts());
            if let Some(readiness) = readiness {
                let stale = matches!(readiness.check(), Check::ServingStale(_));
                render_store_serving_stale(&mut body, stale);
                let failing: Vec<_> = readiness
                    .watches()
                    .failing()
                    .into_iter()
                    .map(|(kind, failing)| (kind.as_str(), failing.is_some()))
                    .collect();
                render_store_watches(&mut body, &failing);
            }
            typed(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                body,
            )
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /live /ready /metrics\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpSocket, TcpStream};
    use trellis_proto::discovery::v1::MeshConfig;

    use super::*;
    use crate::store::embedded::{DB_FILE, EmbeddedStore};

    /// A connection to `addr` from 127.0.0.`last`.
    async fn connect(last: u8, addr: SocketAddr) -> TcpStream {
        let socket = TcpSocket::new_v4().unwrap();
        let from = IpAddr::V4(Ipv4Addr::new(127, 0, 0, last));
        socket.bind(SocketAddr::new(from, 0)).unwrap();
        socket.connect(addr).await.unwrap()
    }

    /// An admin port serving on 127.0.0.1, ready, over an empty embedded
    /// store, until `stop` says so.
    struct Port {
        addr: SocketAddr,
        stop: watch::Sender<bool>,
        /// What [`AdminHttp::run`] returns once stopped.
        serving: tokio::task::JoinHandle<Connections>,
        _dir: tempfile::TempDir,
    }

    impl Port {
        async fn start() -> Port {
            let dir = tempfile::tempdir().unwrap();
            let store = Arc::new(EmbeddedStore::open(&dir.path().join(DB_FILE)).unwrap());
            let discovery =
                Arc::new(Discovery::new(store, Vec::new(), MeshConfig::default()).unwrap());
            let admin = AdminHttp::bind("127.0.0.1:0".parse().unwrap())
                .await
                .unwrap();
            let addr = admin.local_addr().unwrap();
            let (stop, shutdown) = watch::channel(false);
            let ready = Arc::new(AtomicBool::new(true));
            let metrics = Arc::new(Metrics::default());
            let serving = tokio::spawn(admin.run(ready, metrics, discovery, None, shutdown));
            Port {
                addr,
                stop,
                serving,
                _dir: dir,
            }
        }
    }

    /// Connections queued in the listener when the port stops (connected,
    /// not yet accepted) are taken, not reset with the listener: one that
    /// sent its request is answered, as its last; one that sent nothing, or
    /// only an empty line, is closed at once.
    #[tokio::test]
    async fn connections_queued_at_the_stop_are_served_or_closed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::open(&dir.path().join(DB_FILE)).unwrap());
        let discovery = Arc::new(Discovery::new(store, Vec::new(), MeshConfig::default()).unwrap());
        let admin = AdminHttp::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = admin.local_addr().unwrap();
        // Queued before the port runs, which it does stopped already.
        let mut sent = connect(1, addr).await;
        sent.write_all(b"GET /live HTTP/1.1\r\nhost: a\r\n\r\n")
            .await
            .unwrap();
        let silent = connect(1, addr).await;
        let mut blank = connect(1, addr).await;
        blank.write_all(b"\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (_stop, shutdown) = watch::channel(true);
        let metrics = Arc::new(Metrics::default());
        let ready = Arc::new(AtomicBool::new(true));
        let connections = AdminHttp::run(admin, ready, metrics, discovery, None, shutdown).await;
        let started = tokio::time::Instant::now();
        let draining =
            tokio::spawn(connections.drain(tokio::time::Instant::now() + Duration::from_secs(10)));

        let mut answer = String::new();
        let read = tokio::time::timeout(Duration::from_secs(5), sent.read_to_string(&mut answer))
            .await
            .expect("the queued request was answered in time");
        assert!(
            read.is_ok() && answer.starts_with("HTTP/1.1 200 OK\r\n") && answer.ends_with("live\n"),
            "a request queued at the stop was not answered: {read:?} {answer:?}"
        );
        assert!(
            answer.to_ascii_lowercase().contains("connection: close"),
            "{answer}"
        );
        // Closed at once: with its empty line unread, by a reset.
        for (mut client, what) in [(silent, "nothing"), (blank, "an empty line")] {
            let mut rest = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(1), client.read_to_end(&mut rest))
                .await
                .unwrap_or_else(|_| panic!("a connection queued with {what} was held"));
            let closed = match &read {
                Ok(0) => true,
                Err(e) => what != "nothing" && e.kind() == std::io::ErrorKind::ConnectionReset,
                Ok(_) => false,
            };
            assert!(
                closed,
                "a connection queued with {what} was not closed: {read:?} {rest:?}"
            );
        }
        assert_eq!(draining.await.unwrap(), 0, "none left open at the deadline");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    /// A client address holding [`MAX_CONNECTIONS_PER_CLIENT`] connections
    /// has each more closed as it is accepted: counted as `per_client` in
    /// `/metrics`, the first logged at once as a warning naming the client
    /// and the limit, the next within
    /// [`REFUSAL_LOG_PAUSE`](crate::server::REFUSAL_LOG_PAUSE) only
    /// counted. With every slot taken and no address holding more to take
    /// one from, a connection is refused as `total`, likewise.
    #[tokio::test]
    async fn connections_past_the_limits_are_counted_and_logged() {
        let (logs, _guard) = crate::test_logs::capture(false);
        let port = Port::start().await;
        let addr = port.addr;

        // Connections from 127.0.0.`last` that send nothing.
        let hold = |last: u8, count: usize| async move {
            let mut held = Vec::with_capacity(count);
            for _ in 0..count {
                held.push(connect(last, addr).await);
            }
            held
        };
        // Closed by the server with nothing sent: once it is, the refusal
        // has been counted and logged (or not).
        let refused = |last: u8| async move {
            let mut tcp = connect(last, addr).await;
            let read = tcp.read(&mut [0u8; 64]).await;
            assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        };

        let mut held = hold(1, MAX_CONNECTIONS_PER_CLIENT).await;
        refused(1).await;
        refused(1).await;
        // Every slot taken, 127.0.0.2 holding one fewer than the others:
        // no address holds two more than it, to take a slot from.
        held.extend(hold(2, MAX_CONNECTIONS_PER_CLIENT - 1).await);
        let mut last = 3;
        while held.len() < MAX_CONNECTIONS {
            let count = MAX_CONNECTIONS_PER_CLIENT.min(MAX_CONNECTIONS - held.len());
            held.extend(hold(last, count).await);
            last += 1;
        }
        refused(2).await;

        // Scraped as Prometheus does, from an address holding none: the
        // full port makes way for it.
        let mut scrape = connect(last, addr).await;
        scrape
            .write_all(b"GET /metrics HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut scraped = String::new();
        scrape.read_to_string(&mut scraped).await.unwrap();
        assert!(scraped.starts_with("HTTP/1.1 200 "), "{scraped}");
        for (reason, count) in [("per_client", 2), ("total", 1)] {
            let counted =
                format!("trellis_admin_connections_refused_total{{reason=\"{reason}\"}} {count}\n");
            assert!(scraped.contains(&counted), "{counted}in\n{scraped}");
        }

        logs.assert_limit_refusals(OVER_LIMITS, MAX_CONNECTIONS_PER_CLIENT, MAX_CONNECTIONS);
        drop(held);
    }

    /// At shutdown the port stops accepting and hands over its open
    /// connections: one kept alive after its answer closes at once, not at
    /// its head timeout, so the drain does not wait for it.
    #[tokio::test]
    async fn an_idle_connection_closes_at_shutdown_and_the_drain_waits_for_none() {
        let port = Port::start().await;
        let addr = port.addr;

        let mut kept = connect(1, addr).await;
        kept.write_all(b"GET /live HTTP/1.1\r\nhost: admin\r\n\r\n")
            .await
            .unwrap();
        let answer = b"HTTP/1.1 200 OK\r\n";
        let mut read = vec![0u8; answer.len()];
        kept.read_exact(&mut read).await.unwrap();
        assert_eq!(read, answer);

        port.stop.send(true).unwrap();
        let open = port.serving.await.unwrap();
        let patience = Duration::from_secs(2);
        let closed = tokio::time::timeout(patience, async {
            let mut rest = Vec::new();
            let _ = kept.read_to_end(&mut rest).await;
        });
        assert!(
            closed.await.is_ok(),
            "a kept-alive connection was still open {patience:?} after the shutdown"
        );
        let deadline = tokio::time::Instant::now() + patience;
        assert_eq!(open.drain(deadline).await, 0, "none cut");
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "the port stopped accepting"
        );
    }
}
