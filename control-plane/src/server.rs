//! The gRPC port's TLS: the control plane's own SVID, the accept loop and the
//! handshakes that turn TCP connections into authenticated streams for tonic.
//!
//! TLS 1.3 only, ALPN h2, client certificate optional (a first Certify has
//! only a token) but fully verified against the bundle when presented. Each
//! handshake runs in its own task with a deadline, so a slow or silent client
//! never holds up accept. A handshake takes one of
//! [`MAX_CONCURRENT_HANDSHAKES`] turns, the others wait theirs in arrival
//! order: when a whole fleet of sidecars reconnects at once (a control plane
//! restart), handshakes finish one batch after another instead of all
//! progressing together until every one of them misses its deadline. A turn
//! bounds the CPU of handshakes, not the wait for a client: it is given back
//! when the handshake ends or after [`TURN_HOLD`], whichever comes first, so
//! clients that start a handshake and stall cannot keep the others waiting.
//! Connections are limited in number, in all and from one client address
//! ([`MAX_CONNECTIONS`], [`MAX_CONNECTIONS_PER_CLIENT`]), from their
//! accept: one address's stalled handshakes hold few turns, and one client
//! cannot make the control plane hold the requests of connections without
//! end. A served connection with no request in flight (a Watch is one
//! for as long as it lives) for `--grpc-idle-timeout`
//! ([`DEFAULT_IDLE_TIMEOUT`]) is closed gracefully, each connection being
//! served on its own ([`serve_connections`]).
//! Handshake failures are counted by a bounded reason, and logged at most
//! once per reason per [`REFUSAL_LOG_PAUSE`]: a scanner, plaintext probes
//! or a client failing its handshake in a loop write one line per reason
//! per pause, the next one saying how many were not logged since
//! (`suppressed`), instead of a line per connection.
//! This module authenticates connections; it never authorizes a request.

use std::fmt::Display;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, HandshakeKind, ServerConfig};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use trellis_core::SpiffeId;
use trellis_core::connections::{Admitted, ConnectionLimits};
use trellis_core::gather::GatheredWrites;
use trellis_core::logging::throttle::Throttle;
use trellis_core::refusal::refuse_plaintext;
use trellis_core::tls::{
    ExpectedServer, PROTOCOL_VERSIONS, SpiffeClientVerifier, SpiffeServerVerifier, peer_spiffe_id,
    provider, root_store, rustls_error,
};
use trellis_core::warn_throttled;

use crate::api::PeerInfo;
use crate::ca::{CertificateAuthority, ExtraSans};
use crate::discovery::PresentedCert;
use crate::handshake::HandshakeFailure;
use crate::metrics::Metrics;

/// The longest a client may take to finish the TLS handshake, from when
/// its turn came.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a plaintext client of the gRPC port is told.
const PLAINTEXT_ANSWER: &str = "this is the Trellis control plane's gRPC port: it speaks only TLS \
     (a client must trust the mesh's bundle.pem, as trellisctl and the sidecars do)";

/// Handshakes given a turn at once; more wait for one. Each costs about a
/// millisecond of CPU, so this keeps every core busy while a turn comes
/// within a fraction of a second, and a client that sent its first bytes
/// and then stalls holds a turn for at most [`TURN_HOLD`].
pub const MAX_CONCURRENT_HANDSHAKES: usize = 256;

/// The longest a handshake holds its turn. A live client answers within a
/// round trip, so its handshake ends, and its CPU is spent, well within
/// this; one still unfinished then goes on without a turn until
/// [`HANDSHAKE_TIMEOUT`], and the turn goes to the next client waiting.
/// The turn is held for the first flights rather than taken after the
/// ClientHello was read (as `tokio_rustls::LazyConfigAcceptor` would allow),
/// so that a client that gave up while it waited is still seen before any
/// work is done for it.
pub const TURN_HOLD: Duration = Duration::from_secs(1);

/// The longest an accepted connection waits for its handshake's turn; a
/// client still there after it is closed (and retries with backoff).
pub const HANDSHAKE_QUEUE_TIMEOUT: Duration = Duration::from_secs(30);

/// gRPC connections served at once, those still waiting for or in their
/// handshake among them; more are closed as they are accepted. Each holds
/// a file descriptor and may hold up to [`crate::run::MAX_STREAMS_PER_CONNECTION`]
/// requests being read: a sidecar holds one or two, so this leaves room for
/// the sidecars of a large mesh reconnecting to one replica, while a
/// client opening connections without end runs into it rather than into
/// the process's file descriptor limit.
pub const MAX_CONNECTIONS: usize = 16384;

/// gRPC connections one client address may hold at once by default
/// (`--max-grpc-connections-per-client`), from the moment
/// they are accepted (waiting for a handshake's turn, in it, or served).
/// A sidecar holds one or two and `trellisctl` one a command, so a pod
/// never needs more; one client cannot hold the memory of more than this
/// many connections' requests in progress, nor more than this many of the
/// [`MAX_CONCURRENT_HANDSHAKES`] turns, so that its stalled handshakes do
/// not keep another client's waiting. With every slot of
/// [`MAX_CONNECTIONS`] taken, an address holding at least two fewer than
/// the address holding the most takes a slot from it (its oldest
/// connection is closed), as on the admin and webhook ports. The host's
/// own address (`127.0.0.1`, `::1`) is spared it: a local mesh's sidecars
/// all dial from there.
pub const MAX_CONNECTIONS_PER_CLIENT: usize = 16;

/// How a connection closed as it was accepted, past the gRPC port's
/// connection limits, is logged, with the limit (`reason`, `error`) and
/// peer.
const OVER_LIMITS: &str = "gRPC connection refused: past the port's connection limits";

/// What the reads of a connection closed to make way for a client address
/// holding fewer fail with.
const EVICTED: &str = "closed to make way for a client address holding fewer connections";

/// How often handshake failures are logged, at most, for each reason: the
/// first at once, the next after the pause with how many were not logged
/// meanwhile. The metric counts every one.
pub const REFUSAL_LOG_PAUSE: Duration = Duration::from_secs(10);

/// Lifetime of the control plane's own serving certificate; renewed at half
/// (of what it got: a CA whose chain ends sooner gives less).
pub const SERVING_CERT_TTL: Duration = Duration::from_secs(24 * 3600);

/// How long after a failed renewal of the serving certificate it is tried
/// again.
pub const SERVING_CERT_RETRY: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot issue the control plane's certificate: {0}")]
    Issue(#[from] crate::ca::CaError),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("cannot listen on {addr}: {}", trellis_core::io_error::IoWords(source))]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// The control plane's own SVID, `spiffe://TD/trellis/control-plane`, with
/// DNS and IP SANs so that standard tools (grpcurl) verify it too.
pub struct ServingCert {
    ca: Arc<CertificateAuthority>,
    extra: ExtraSans,
    current: RwLock<Arc<CertifiedKey>>,
    /// When the current certificate is due for renewal (wall clock).
    renew_at: std::sync::Mutex<SystemTime>,
}

impl std::fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCert")
            .field("extra", &self.extra)
            .finish_non_exhaustive()
    }
}

impl ServingCert {
    pub fn new(
        ca: Arc<CertificateAuthority>,
        dns_names: &[String],
        listen: IpAddr,
    ) -> Result<Arc<Self>, ServerError> {
        let mut extra = ExtraSans {
            dns_names: vec!["localhost".to_string()],
            ips: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
        };
        for name in dns_names {
            if !extra.dns_names.contains(name) {
                extra.dns_names.push(name.clone());
            }
        }
        if !listen.is_unspecified() && !extra.ips.contains(&listen) {
            extra.ips.push(listen);
        }
        let (current, renew_at) = issue(&ca, &extra)?;
        Ok(Arc::new(Self {
            ca,
            extra,
            current: RwLock::new(current),
            renew_at: std::sync::Mutex::new(renew_at),
        }))
    }

    /// Issues a fresh certificate and key for new handshakes.
    pub fn renew(&self) -> Result<(), ServerError> {
        let (fresh, renew_at) = issue(&self.ca, &self.extra)?;
        *self.current.write().expect("not poisoned") = fresh;
        *self.renew_at.lock().expect("not poisoned") = renew_at;
        Ok(())
    }

    /// When the current certificate is due for renewal: half-way through
    /// what is left of it when it was issued.
    pub fn renew_at(&self) -> SystemTime {
        *self.renew_at.lock().expect("not poisoned")
    }

    /// Renews at half-life, by the wall clock (a host suspended past it
    /// renews as it wakes), until `shutdown` turns true; a failed renewal
    /// is tried again after [`SERVING_CERT_RETRY`].
    pub async fn renew_until(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                () = trellis_core::clock::sleep_until(self.renew_at()) => {}
                () = crate::run::stopping(&mut shutdown) => return,
            }
            match self.renew() {
                Ok(()) => tracing::info!("renewed the control plane's serving certificate"),
                Err(e) => {
                    tracing::error!(error = %e, retry_in = ?SERVING_CERT_RETRY, "could not renew the serving certificate");
                    tokio::select! {
                        () = tokio::time::sleep(SERVING_CERT_RETRY) => {}
                        () = crate::run::stopping(&mut shutdown) => return,
                    }
                }
            }
        }
    }
}

/// A serving certificate, and when it is due for renewal: half-way from now
/// to its end (at least a second from now).
fn issue(
    ca: &CertificateAuthority,
    extra: &ExtraSans,
) -> Result<(Arc<CertifiedKey>, SystemTime), ServerError> {
    let id = SpiffeId::control_plane(ca.trust_domain());
    let (issued, key) = ca.issue_with_key(&id, extra, SERVING_CERT_TTL)?;
    let now = SystemTime::now();
    let ends = UNIX_EPOCH + Duration::from_secs(issued.not_after_unix.max(0) as u64);
    let left = ends.duration_since(now).unwrap_or_default();
    let renew_at = now + (left / 2).max(Duration::from_secs(1));
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing_key = provider().key_provider.load_private_key(key)?;
    Ok((
        Arc::new(CertifiedKey::new(issued.chain, signing_key)),
        renew_at,
    ))
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().expect("not poisoned").clone())
    }
}

/// The same SVID as a client certificate, when a replica asks its peers.
impl ResolvesClientCert for ServingCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().expect("not poisoned").clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The gRPC port's TLS: the rustls config, and its verifier of clients'
/// chains for the sessions it resumes.
#[derive(Clone)]
pub struct GrpcTls {
    pub config: Arc<ServerConfig>,
    callers: Arc<SpiffeClientVerifier>,
}

impl GrpcTls {
    /// A resumed session's client chain, verified again once a root of the
    /// bundle has expired: rustls restores the chain from its session
    /// cache and calls no verifier, so a chain whose root expired after
    /// the session began would otherwise resume its way in until its leaf
    /// expires. A full handshake's chain was verified by the handshake.
    fn verify_resumed(&self, conn: &rustls::ServerConnection) -> Result<(), rustls::Error> {
        match (conn.handshake_kind(), conn.peer_certificates()) {
            (Some(rustls::HandshakeKind::Resumed), Some(chain)) => {
                self.callers.verify_resumed(chain, UnixTime::now())
            }
            _ => Ok(()),
        }
    }
}

/// The TLS of the gRPC port.
pub fn server_config(
    ca: &CertificateAuthority,
    serving: Arc<ServingCert>,
) -> Result<GrpcTls, ServerError> {
    let roots = root_store(ca.bundle())?;
    let callers = Arc::new(SpiffeClientVerifier::new(
        roots,
        ca.trust_domain().clone(),
        false,
    )?);
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)?
        .with_client_cert_verifier(callers.clone())
        .with_cert_resolver(serving);
    config.alpn_protocols = vec![trellis_core::grpc::ALPN_H2.to_vec()];
    Ok(GrpcTls {
        config: Arc::new(config),
        callers,
    })
}

/// The rustls config a replica asks its peers with: it presents the
/// control plane's SVID and accepts only a server with that same ID.
pub fn peer_client_config(
    ca: &CertificateAuthority,
    serving: Arc<ServingCert>,
) -> Result<Arc<ClientConfig>, ServerError> {
    let config = trusting_the_control_plane(ca)?.with_client_cert_resolver(serving);
    Ok(Arc::new(trellis_core::grpc::with_h2_alpn(config)))
}

/// A client config, its client authentication still to choose, that
/// accepts only a server presenting the control plane's SPIFFE ID from
/// `ca`'s bundle.
fn trusting_the_control_plane(
    ca: &CertificateAuthority,
) -> Result<rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>, ServerError> {
    let verifier = SpiffeServerVerifier::new(
        root_store(ca.bundle())?,
        ExpectedServer::Exact(SpiffeId::control_plane(ca.trust_domain())),
    );
    Ok(ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier)))
}

/// Whether a handshake presented the client's certificate anew: a
/// resumed session carries the one presented when it began.
fn full_handshake(kind: Option<HandshakeKind>) -> bool {
    matches!(
        kind,
        Some(HandshakeKind::Full | HandshakeKind::FullWithHelloRetryRequest)
    )
}

/// The leaf of `peer_certs`, as [`PeerInfo::presented`] records it (and
/// [`PeerInfo::cert_issued_at_unix`] reads its notBefore).
fn presented(peer_certs: Option<&[rustls_pki_types::CertificateDer<'_>]>) -> Option<PresentedCert> {
    let (_, leaf) = x509_parser::parse_x509_certificate(peer_certs?.first()?.as_ref()).ok()?;
    let validity = leaf.validity();
    Some(PresentedCert {
        serial: hex::encode(leaf.raw_serial()),
        not_before_unix: validity.not_before.timestamp(),
        not_after_unix: validity.not_after.timestamp(),
        presented_at_unix: crate::unix_now(),
    })
}

/// A TLS connection with who is on the other end, and its slot in the
/// port's connection limits: once told to make way for a client address
/// holding fewer, its reads fail, which closes it.
pub struct TlsConn {
    stream: GatheredWrites<tokio_rustls::server::TlsStream<TcpStream>>,
    peer: PeerInfo,
    _admitted: Admitted,
    /// Resolves once the connection is told to close; none once it has.
    eviction: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

/// The connection is gone: its idle timeout no longer waits.
impl Drop for TlsConn {
    fn drop(&mut self) {
        self.peer.activity.close();
    }
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let evicted = match &mut this.eviction {
            Some(eviction) => eviction.as_mut().poll(cx).is_ready(),
            None => true,
        };
        if evicted {
            this.eviction = None;
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                EVICTED,
            )));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The default of `--grpc-idle-timeout`: how long a connection of the
/// gRPC port is kept with no request in flight before it is closed,
/// gracefully (an HTTP/2 GOAWAY, then the end of the connection). A
/// sidecar's connection holds its Watch, so it is never idle; `trellisctl`
/// and peer replicas call again within moments or not at all. Without it
/// a client, with or without a certificate, could hold its share of the
/// [`MAX_CONNECTIONS`] open doing nothing for as long as it liked.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// How many requests a connection has in flight, and whether it is still
/// open: shared by the connection and the requests on it.
#[derive(Clone, Debug, Default)]
pub struct Activity(Arc<Load>);

/// What [`Activity`] shares: counted without a lock, since every request
/// of the port updates it twice.
#[derive(Debug, Default)]
struct Load {
    in_flight: AtomicUsize,
    closed: AtomicBool,
    /// Told when a request begins on a connection with none in flight,
    /// when the last in flight ends, and when the connection closes: the
    /// changes [`Activity::idle_for`] waits on. Only these take its lock:
    /// a connection holding a Watch counts its other requests lock-free.
    changed: Notify,
}

impl Activity {
    /// A request begins; it is in flight until the guard is dropped (with
    /// its response's body, which a stream holds as long as it lives).
    fn begin(&self) -> InFlight {
        if self.0.in_flight.fetch_add(1, Ordering::SeqCst) == 0 {
            self.0.changed.notify_waiters();
        }
        InFlight(self.clone())
    }

    /// The connection is gone.
    fn close(&self) {
        self.0.closed.store(true, Ordering::SeqCst);
        self.0.changed.notify_waiters();
    }

    /// Resolves with `true` once the connection has had no request in
    /// flight for `timeout` (each request that comes starts the wait
    /// again), or with `false` once it is gone.
    async fn idle_for(&self, timeout: Duration) -> bool {
        let load = &*self.0;
        loop {
            // Registered before the state is read, so that a change made
            // after the read still wakes this wait.
            let changed = load.changed.notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            if load.closed.load(Ordering::SeqCst) {
                return false;
            }
            if load.in_flight.load(Ordering::SeqCst) > 0 {
                changed.await;
                continue;
            }
            tokio::select! {
                biased;
                () = changed => {}
                () = tokio::time::sleep(timeout) => return true,
            }
        }
    }
}

/// A request in flight on its connection.
struct InFlight(Activity);

impl Drop for InFlight {
    fn drop(&mut self) {
        let load = &*self.0.0;
        if load.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            load.changed.notify_waiters();
        }
    }
}

/// Counts each request of the gRPC port as in flight on its connection
/// until its response has been sent in full (a [`tower::Layer`]), for the
/// connection's idle timeout.
#[derive(Clone, Copy, Debug, Default)]
pub struct InFlightLayer;

impl<S> tower::Layer<S> for InFlightLayer {
    type Service = InFlightService<S>;

    fn layer(&self, inner: S) -> InFlightService<S> {
        InFlightService { inner }
    }
}

/// The service of [`InFlightLayer`].
#[derive(Clone, Debug)]
pub struct InFlightService<S> {
    inner: S,
}

impl<S> tower::Service<http::Request<tonic::body::Body>> for InFlightService<S>
where
    S: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
        >,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let guard = request
            .extensions()
            .get::<PeerInfo>()
            .map(|peer| peer.activity.begin());
        let answer = self.inner.call(request);
        Box::pin(async move {
            let response = answer.await?;
            Ok(response.map(|body| {
                tonic::body::Body::new(HeldBody {
                    body,
                    _in_flight: guard,
                })
            }))
        })
    }
}

/// A response body that keeps its request in flight until it is dropped.
struct HeldBody {
    body: tonic::body::Body,
    _in_flight: Option<InFlight>,
}

impl hyper::body::Body for HeldBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, tonic::Status>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Serves each connection of `incoming` with `serve` (given the
/// connection and what tells it to close, gracefully) until `shutdown`
/// turns true, then until every connection has closed. A connection with
/// no request in flight for `idle_timeout` is told to close, counted in
/// `trellis_grpc_connections_closed_total{reason="idle"}`.
pub async fn serve_connections<F, Fut>(
    mut incoming: ReceiverStream<Result<TlsConn, io::Error>>,
    mut shutdown: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
    idle_timeout: Duration,
    serve: F,
) where
    F: Fn(TlsConn, Pin<Box<dyn Future<Output = ()> + Send>>) -> Fut,
    Fut: Future<Output = Result<(), tonic::transport::Error>> + Send + 'static,
{
    use tokio_stream::StreamExt;
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let conn = tokio::select! {
            conn = incoming.next() => match conn {
                Some(Ok(conn)) => conn,
                Some(Err(_)) => continue,
                None => break,
            },
            Some(_) = connections.join_next() => continue,
            () = crate::run::stopping(&mut shutdown) => break,
        };
        let activity = conn.peer.activity.clone();
        let mut stop = shutdown.clone();
        let metrics = metrics.clone();
        let closing = Box::pin(async move {
            tokio::select! {
                idle = activity.idle_for(idle_timeout) => if idle {
                    metrics.grpc_connection_closed("idle");
                    tracing::debug!("closing an idle gRPC connection");
                },
                () = crate::run::stopping(&mut stop) => {}
            }
        });
        let served = serve(conn, closing);
        connections.spawn(async move {
            if let Err(e) = served.await {
                tracing::debug!(error = %e, "serving a gRPC connection failed");
            }
        });
    }
    drop(incoming);
    while connections.join_next().await.is_some() {}
}

/// How a port's refused connections are counted and logged: the gRPC
/// port's failed handshakes and connections past its limits here, the admission webhook port's failed
/// handshakes and connections past its limits (`crate::inject::server`),
/// the admin port's connections past its limits (`crate::admin_http`),
/// each into a metric of its own.
pub(crate) struct Refusals<R = &'static str> {
    metrics: Arc<Metrics>,
    /// Counts a failure, by reason, in the port's metric.
    counter: fn(&Metrics, R),
    /// The lines written, by reason.
    lines: Throttle,
}

/// A reason a port refuses a connection for, as its metric labels it.
pub(crate) trait RefusalReason: Copy {
    fn label(self) -> &'static str;
}

impl RefusalReason for &'static str {
    fn label(self) -> &'static str {
        self
    }
}

impl RefusalReason for HandshakeFailure {
    fn label(self) -> &'static str {
        HandshakeFailure::token(self)
    }
}

impl<R: RefusalReason> Refusals<R> {
    /// Failures counted by `counter` in `metrics`, each reason logged at
    /// most once per [`REFUSAL_LOG_PAUSE`].
    pub(crate) fn new(metrics: Arc<Metrics>, counter: fn(&Metrics, R)) -> Self {
        Self {
            metrics,
            counter,
            lines: Throttle::new(REFUSAL_LOG_PAUSE),
        }
    }

    /// Counts a connection from `peer` whose handshake failed for `reason`,
    /// and logs it as `message` with `error` (when there is one) - unless
    /// one that failed for the same reason was logged within the last
    /// [`REFUSAL_LOG_PAUSE`]; the next line logged says how many were not
    /// (`suppressed`).
    pub(crate) fn refuse(
        &self,
        peer: SocketAddr,
        reason: R,
        error: Option<&dyn Display>,
        message: &str,
    ) {
        let error = error.map(tracing::field::display);
        let label = reason.label();
        warn_throttled!(self.lines, label, { %peer, reason = label, error }, "{message}");
        // Counted once its line, if any, is in the log's queue: a failure
        // the metric shows has been logged, or counted as not.
        self.count(reason);
    }

    /// Counts a failure for `reason` without logging it.
    pub(crate) fn count(&self, reason: R) {
        (self.counter)(&self.metrics, reason);
    }
}

/// The bound gRPC port.
pub struct GrpcListener {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    tls: GrpcTls,
    total: usize,
    per_client: usize,
}

impl GrpcListener {
    pub async fn bind(addr: SocketAddr, tls: GrpcTls) -> Result<Self, ServerError> {
        let listener =
            crate::net::bind(addr).map_err(|source| ServerError::Bind { addr, source })?;
        Ok(Self::new(listener, tls))
    }

    /// The gRPC port on `listener`, bound already ([`crate::net::bind`]).
    pub fn new(listener: TcpListener, tls: GrpcTls) -> Self {
        Self {
            listener,
            acceptor: TlsAcceptor::from(tls.config.clone()),
            tls,
            total: MAX_CONNECTIONS,
            per_client: MAX_CONNECTIONS_PER_CLIENT,
        }
    }

    /// At most `per_client` connections from one client address, in place
    /// of [`MAX_CONNECTIONS_PER_CLIENT`] (`--max-grpc-connections-per-client`).
    pub fn with_max_connections_per_client(mut self, per_client: usize) -> Self {
        self.per_client = per_client;
        self
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts until `shutdown` turns true; yields completed handshakes.
    pub fn run(
        self,
        mut shutdown: watch::Receiver<bool>,
        metrics: Arc<Metrics>,
    ) -> ReceiverStream<Result<TlsConn, io::Error>> {
        let (tx, rx) = mpsc::channel(64);
        let turns = Arc::new(Semaphore::new(MAX_CONCURRENT_HANDSHAKES));
        let refusals = Arc::new(Refusals::new(metrics.clone(), Metrics::handshake_failed));
        // A local mesh's sidecars all dial from the host's own address.
        let limits = ConnectionLimits::new(self.total, self.per_client).sparing_the_own_host();
        let over_limits = Refusals::new(metrics, Metrics::grpc_connection_refused);
        tokio::spawn(async move {
            loop {
                let (tcp, remote) = tokio::select! {
                    accepted = self.listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // Out of file descriptors and the like: back off briefly.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                    _ = crate::run::stopping(&mut shutdown) => return,
                };
                // Counted from the accept, so that connections waiting for
                // a handshake's turn, or stalled in one, count too.
                let admitted = match limits.admit(remote.ip()) {
                    Ok(admitted) => admitted,
                    Err(refused) => {
                        over_limits.refuse(remote, refused.reason(), Some(&refused), OVER_LIMITS);
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = self.acceptor.clone();
                let tls = self.tls.clone();
                let tx = tx.clone();
                let refusals = refusals.clone();
                let turns = turns.clone();
                tokio::spawn(async move {
                    // A connection that has sent nothing takes no turn (a
                    // peek, because readiness alone may be a false positive).
                    let mut first = [0u8; 1];
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, tcp.peek(&mut first)).await {
                        Ok(Ok(n)) if n > 0 => {}
                        Ok(_) => return,
                        Err(_) => {
                            refusals.refuse(
                                remote,
                                HandshakeFailure::Timeout,
                                None,
                                "TLS handshake failed: nothing received",
                            );
                            return;
                        }
                    }
                    // Plaintext (curl http://, grpcurl -plaintext) is told
                    // in its own protocol that this port speaks TLS.
                    let found = || {
                        refusals.refuse(remote, HandshakeFailure::NotTls, None, "TLS handshake failed: the client sent plaintext; answered that this port speaks TLS");
                    };
                    let Some(tcp) =
                        refuse_plaintext(tcp, PLAINTEXT_ANSWER, HANDSHAKE_TIMEOUT, found).await
                    else {
                        return;
                    };
                    // Tokio's semaphore is fair: turns come in arrival order.
                    let Ok(Ok(turn)) =
                        tokio::time::timeout(HANDSHAKE_QUEUE_TIMEOUT, turns.acquire_owned()).await
                    else {
                        refusals.refuse(
                            remote,
                            HandshakeFailure::Overloaded,
                            None,
                            "TLS handshake never started: too many handshakes waiting",
                        );
                        return;
                    };
                    // A client that gave up while it waited (its connect
                    // timeout) has closed its side: no work for it, so a
                    // backlog of abandoned connections cannot starve the
                    // ones still waiting.
                    if tcp
                        .ready(Interest::READABLE)
                        .await
                        .is_ok_and(|ready| ready.is_read_closed())
                    {
                        refusals.count(HandshakeFailure::ClientGone);
                        tracing::debug!(peer = %remote, "client left before its handshake's turn");
                        return;
                    }
                    // The turn bounds the handshake's CPU, not the wait
                    // for the client: given back at [`TURN_HOLD`] while
                    // the handshake goes on to its deadline.
                    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
                    tokio::pin!(handshake);
                    let handshake = tokio::select! {
                        done = &mut handshake => {
                            drop(turn);
                            done
                        }
                        () = tokio::time::sleep(TURN_HOLD) => {
                            drop(turn);
                            handshake.await
                        }
                    };
                    match handshake {
                        Ok(Ok(stream)) => {
                            let (_, session) = stream.get_ref();
                            if let Err(e) = tls.verify_resumed(session) {
                                let error = trellis_core::tls::Described(&e);
                                refusals.refuse(remote, HandshakeFailure::of_rustls(&e), Some(&error), "TLS handshake failed: a resumed session's chain is no longer trusted");
                                return;
                            }
                            let spiffe_id = peer_spiffe_id(session.peer_certificates()).ok();
                            let leaf = spiffe_id
                                .as_ref()
                                .and_then(|_| presented(session.peer_certificates()));
                            let cert_issued_at_unix = leaf
                                .as_ref()
                                .map(|leaf| crate::ca::issued_at(leaf.not_before_unix));
                            let presented =
                                leaf.filter(|_| full_handshake(session.handshake_kind()));
                            let peer = PeerInfo {
                                remote,
                                spiffe_id,
                                cert_issued_at_unix,
                                presented,
                                activity: Activity::default(),
                            };
                            let eviction = Some(Box::pin(admitted.eviction()) as Pin<Box<_>>);
                            let _ = tx
                                .send(Ok(TlsConn {
                                    stream: GatheredWrites::new(stream),
                                    peer,
                                    _admitted: admitted,
                                    eviction,
                                }))
                                .await;
                        }
                        Ok(Err(e)) => {
                            let reason = rustls_error(&e)
                                .map_or(HandshakeFailure::IoError, HandshakeFailure::of_rustls);
                            let error = trellis_core::tls::Described(&e);
                            refusals.refuse(remote, reason, Some(&error), "TLS handshake failed");
                        }
                        Err(_) => {
                            refusals.refuse(
                                remote,
                                HandshakeFailure::Timeout,
                                None,
                                "TLS handshake failed",
                            );
                        }
                    }
                });
            }
        });
        ReceiverStream::new(rx)
    }
}

#[cfg(test)]
mod tests {
    use rustls_pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_stream::StreamExt;
    use trellis_core::TrustDomain;

    use super::*;

    /// The serving certificate is renewed half-way through the lifetime it
    /// got: a day's certificate after 12 hours, and one cut short by a
    /// signing chain that ends in 100 s after about 50 s, well before it
    /// expires.
    #[test]
    fn the_serving_certificate_is_renewed_half_way_through_what_it_got() {
        let td = trellis_core::TrustDomain::new("cluster.local").unwrap();
        let (ca, _, _) = CertificateAuthority::generate(&td).unwrap();
        let near = |at: SystemTime, expected: SystemTime| {
            let gap = at.duration_since(expected).unwrap_or_else(|e| e.duration());
            assert!(gap < Duration::from_secs(5), "{at:?} vs {expected:?}");
        };
        let serving = ServingCert::new(Arc::new(ca), &[], Ipv4Addr::LOCALHOST.into()).unwrap();
        near(serving.renew_at(), SystemTime::now() + SERVING_CERT_TTL / 2);

        let (ca, _, _) = CertificateAuthority::generate(&td).unwrap();
        let ends = time::OffsetDateTime::now_utc() + time::Duration::seconds(100);
        let serving = ServingCert::new(
            Arc::new(ca.ending_at(ends)),
            &[],
            Ipv4Addr::LOCALHOST.into(),
        )
        .unwrap();
        near(
            serving.renew_at(),
            SystemTime::now() + Duration::from_secs(50),
        );
    }

    /// The renewal task ends when the control plane shuts down, as its
    /// other background tasks do, though its next renewal is hours away;
    /// until then it keeps waiting for it.
    #[tokio::test(start_paused = true)]
    async fn the_serving_certificate_renewal_ends_at_shutdown() {
        let td = trellis_core::TrustDomain::new("cluster.local").unwrap();
        let (ca, _, _) = CertificateAuthority::generate(&td).unwrap();
        let serving = ServingCert::new(Arc::new(ca), &[], Ipv4Addr::LOCALHOST.into()).unwrap();
        let renewing = serving.clone();
        crate::run::assert_runs_until_shutdown(Duration::from_secs(60), |shutdown| {
            renewing.renew_until(shutdown)
        })
        .await;
        assert_eq!(Arc::strong_count(&serving), 1);
    }

    /// A connection is idle once no request has been in flight for the
    /// whole timeout: a request that begins starts the wait again, one in
    /// flight keeps the connection from being idle however long it lasts,
    /// and the wait begins anew when the last one ends.
    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_only_after_a_whole_timeout_without_a_request() {
        use tokio::time::timeout as within;
        const TIMEOUT: Duration = Duration::from_secs(60);
        let activity = Activity::default();
        let idle = activity.idle_for(TIMEOUT);
        tokio::pin!(idle);

        assert!(within(Duration::from_secs(40), &mut idle).await.is_err());
        drop(activity.begin());
        assert!(
            within(Duration::from_secs(59), &mut idle).await.is_err(),
            "a request that came starts the wait again"
        );

        let request = activity.begin();
        assert!(
            within(TIMEOUT * 100, &mut idle).await.is_err(),
            "a request in flight is never idle"
        );
        drop(activity.begin());
        assert!(
            within(TIMEOUT * 100, &mut idle).await.is_err(),
            "nor once another request came and went beside it"
        );
        drop(request);
        assert!(within(Duration::from_secs(59), &mut idle).await.is_err());
        assert_eq!(within(Duration::from_secs(2), &mut idle).await, Ok(true));
    }

    /// Once its connection is gone, the idle wait ends without having
    /// found it idle, with or without a request in flight.
    #[tokio::test(start_paused = true)]
    async fn a_closed_connection_is_not_idle() {
        const TIMEOUT: Duration = Duration::from_secs(60);
        let activity = Activity::default();
        let idle = activity.idle_for(TIMEOUT);
        tokio::pin!(idle);
        let request = activity.begin();
        assert!(tokio::time::timeout(TIMEOUT, &mut idle).await.is_err());
        activity.close();
        assert_eq!(tokio::time::timeout(TIMEOUT, idle).await, Ok(false));
        drop(request);

        let closed = Activity::default();
        closed.close();
        assert!(!closed.idle_for(TIMEOUT).await);
    }

    /// A gRPC listener on a loopback port, serving a certificate of a new
    /// mesh CA: the trust domain, the CA, the listener and its address.
    async fn loopback_listener() -> (
        TrustDomain,
        Arc<CertificateAuthority>,
        GrpcListener,
        SocketAddr,
    ) {
        let td = TrustDomain::new("cluster.local").unwrap();
        let (ca, _, _) = CertificateAuthority::generate(&td).unwrap();
        let ca = Arc::new(ca);
        let serving = ServingCert::new(ca.clone(), &[], IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap();
        let tls = server_config(&ca, serving).unwrap();
        let listener = GrpcListener::bind("127.0.0.1:0".parse().unwrap(), tls)
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        (td, ca, listener, addr)
    }

    /// A client of the gRPC port trusting `ca`, presenting no certificate.
    fn anonymous_client(ca: &CertificateAuthority) -> tokio_rustls::TlsConnector {
        let config = trusting_the_control_plane(ca)
            .unwrap()
            .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(trellis_core::grpc::with_h2_alpn(config)))
    }

    /// The client's side of a handshake `connector` completes over `tcp`,
    /// and the connection `incoming` yields for it.
    async fn complete_handshake(
        connector: &tokio_rustls::TlsConnector,
        tcp: TcpStream,
        incoming: &mut ReceiverStream<Result<TlsConn, io::Error>>,
    ) -> (tokio_rustls::client::TlsStream<TcpStream>, TlsConn) {
        let client = connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .expect("the handshake completes");
        let conn = incoming
            .next()
            .await
            .expect("the listener goes on")
            .expect("a connection");
        (client, conn)
    }

    /// Clients that send the first byte of a handshake and then nothing
    /// hold every turn for [`TURN_HOLD`] at most: a sidecar that comes
    /// after them is through its handshake long before
    /// [`HANDSHAKE_TIMEOUT`] would have freed the turns.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stalled_handshakes_give_their_turns_back() {
        let (_, ca, listener, addr) = loopback_listener().await;
        let (_stop, shutdown) = watch::channel(false);
        let mut incoming = listener.run(shutdown, Arc::new(Metrics::default()));

        // More stalled clients than there are turns: each has sent the
        // first byte of a TLS record, so each takes a turn. From as many
        // addresses as it takes, each holding all it may.
        let mut stalled = Vec::new();
        for i in 0..MAX_CONCURRENT_HANDSHAKES + 16 {
            let from = 2 + u8::try_from(i / MAX_CONNECTIONS_PER_CLIENT).unwrap();
            let mut tcp = connect_from(Ipv4Addr::new(127, 0, 0, from), addr).await;
            tcp.write_all(&[0x16]).await.unwrap();
            stalled.push(tcp);
        }
        // The sidecar comes once every turn is held and stalled clients
        // still wait for one, so that it waits behind them: a client's
        // byte is read once it has its turn, and only peeked before.
        let mut seen = (0, 0);
        let queued = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
            loop {
                seen = read_and_unread(addr.port());
                let (read, unread) = seen;
                if read >= MAX_CONCURRENT_HANDSHAKES && unread > 0 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        let (read, unread) = seen;
        assert!(
            queued.is_ok(),
            "never every turn held with clients waiting: {read} read, {unread} unread"
        );

        let connector = anonymous_client(&ca);
        let patience = HANDSHAKE_TIMEOUT / 2;
        let handshake = async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            complete_handshake(&connector, tcp, &mut incoming).await.1
        };
        let served = tokio::time::timeout(patience, handshake).await;
        assert!(
            served.is_ok(),
            "a handshake behind {} stalled ones was not through within {}",
            stalled.len(),
            trellis_core::duration::Words(patience)
        );
        drop(stalled);
    }

    /// Thousands of clients from one address that send the first byte of
    /// a handshake and stall hold no more than
    /// [`MAX_CONNECTIONS_PER_CLIENT`] of the turns: the rest are closed as
    /// they are accepted, counted by the limit, and a sidecar at another
    /// address is through its handshake long before
    /// [`HANDSHAKE_TIMEOUT`], not after turn upon turn of them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stalled_handshakes_of_one_address_do_not_hold_up_another() {
        const STALLED: usize = 3000;
        let (_, ca, listener, addr) = loopback_listener().await;
        let (_stop, shutdown) = watch::channel(false);
        let metrics = Arc::new(Metrics::default());
        let mut incoming = listener.run(shutdown, metrics.clone());

        let mut stalled = Vec::new();
        for _ in 0..STALLED {
            let mut tcp = connect_from(Ipv4Addr::new(127, 0, 0, 2), addr).await;
            // One refused may be closed already.
            let _ = tcp.write_all(&[0x16]).await;
            stalled.push(tcp);
        }

        let connector = anonymous_client(&ca);
        let patience = HANDSHAKE_TIMEOUT / 2;
        let handshake = async {
            let tcp = connect_from(Ipv4Addr::new(127, 0, 0, 3), addr).await;
            complete_handshake(&connector, tcp, &mut incoming).await.1
        };
        let served = tokio::time::timeout(patience, handshake).await;
        assert!(
            served.is_ok_and(|conn| conn.peer.remote.ip() == Ipv4Addr::new(127, 0, 0, 3)),
            "a handshake from another address behind {STALLED} stalled ones was not through \
             within {}",
            trellis_core::duration::Words(patience)
        );
        let refused = format!(
            "trellis_grpc_connections_refused_total{{reason=\"per_client\"}} {}\n",
            STALLED - MAX_CONNECTIONS_PER_CLIENT
        );
        let rendered = metrics.render();
        assert!(rendered.contains(&refused), "{refused}in\n{rendered}");
        drop(stalled);
    }

    /// With every slot taken, a connection from an address holding none
    /// is served, and the oldest connection of the address holding the most
    /// is closed to make way for it: its reads fail, naming why.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_port_closes_the_oldest_connection_of_the_address_holding_most() {
        let (_, ca, mut listener, addr) = loopback_listener().await;
        (listener.total, listener.per_client) = (4, 3);
        let (_stop, shutdown) = watch::channel(false);
        let mut incoming = listener.run(shutdown, Arc::new(Metrics::default()));
        let connector = anonymous_client(&ca);
        let mut clients = Vec::new();
        let mut served = Vec::new();
        for from in [2, 2, 2, 3, 4] {
            let tcp = connect_from(Ipv4Addr::new(127, 0, 0, from), addr).await;
            let (client, conn) = complete_handshake(&connector, tcp, &mut incoming).await;
            clients.push(client);
            assert_eq!(conn.peer.remote.ip(), Ipv4Addr::new(127, 0, 0, from));
            served.push(conn);
        }
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(HANDSHAKE_TIMEOUT, served[0].read(&mut buf))
            .await
            .expect("the oldest connection of 127.0.0.2 was not closed");
        let error = read.expect_err("its read fails");
        assert_eq!(error.to_string(), EVICTED);
        drop(clients);
    }

    /// A TCP connection to `addr` from the loopback address `from`.
    async fn connect_from(from: Ipv4Addr, addr: SocketAddr) -> TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(from.into(), 0)).unwrap();
        socket.connect(addr).await.unwrap()
    }

    /// A flood of failed handshakes - plaintext clients, clients whose
    /// certificate is from another CA - writes one warning per reason, the
    /// first at once naming the client; once [`REFUSAL_LOG_PAUSE`] has
    /// passed (a paused clock, advanced) the next one says how many were
    /// not logged meanwhile. The metric counts every failure.
    #[tokio::test]
    async fn a_flood_of_failed_handshakes_logs_one_line_per_reason_per_pause() {
        const FLOOD: usize = 30;
        let (td, ca, listener, addr) = loopback_listener().await;
        let (_stop, shutdown) = watch::channel(false);
        let metrics = Arc::new(Metrics::default());
        let (logs, _guard) = crate::test_logs::capture(false);
        let _incoming = listener.run(shutdown, metrics.clone());

        // A client that trusts the control plane but presents a
        // certificate of a CA the mesh does not know.
        let (foreign, _, _) = CertificateAuthority::generate(&td).unwrap();
        let (issued, key) = foreign
            .issue_with_key(
                &SpiffeId::parse("spiffe://cluster.local/ns/default/sa/web").unwrap(),
                &ExtraSans::default(),
                Duration::from_secs(3600),
            )
            .unwrap();
        let config = trusting_the_control_plane(&ca)
            .unwrap()
            .with_client_auth_cert(
                issued.chain,
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        let connector =
            tokio_rustls::TlsConnector::from(Arc::new(trellis_core::grpc::with_h2_alpn(config)));
        let plaintext = || async {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            tcp.write_all(b"GET / HTTP/1.1\r\nHost: cp\r\n\r\n")
                .await
                .unwrap();
            // Answered, then closed.
            let mut answer = Vec::new();
            tcp.read_to_end(&mut answer).await.unwrap();
        };
        let foreign = || async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            // TLS 1.3: the client's side of the handshake is over before
            // the server has seen its certificate; the refusal comes next.
            if let Ok(mut tls) = connector
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await
            {
                let _ = tls.read_to_end(&mut Vec::new()).await;
            }
        };
        for _ in 0..FLOOD {
            plaintext().await;
            foreign().await;
        }
        // Each refusal is counted and logged (or not) before the server
        // closes the connection, on this thread.
        let rendered = metrics.render();
        for reason in ["not_tls", "unknown_issuer"] {
            let counted =
                format!("trellis_tls_handshake_failures_total{{reason=\"{reason}\"}} {FLOOD}\n");
            assert!(rendered.contains(&counted), "{counted}in\n{rendered}");
        }
        const FAILED: &str = "TLS handshake failed";
        logs.assert_first_warnings(FAILED, &["not_tls", "unknown_issuer"]);

        // The pause passes: the next failure is logged, with how many were
        // not.
        tokio::time::pause();
        tokio::time::advance(REFUSAL_LOG_PAUSE).await;
        tokio::time::resume();
        plaintext().await;
        logs.assert_next_warning(FAILED, "not_tls", FLOOD - 1);
        assert!(metrics.render().contains(&format!(
            "trellis_tls_handshake_failures_total{{reason=\"not_tls\"}} {}\n",
            FLOOD + 1
        )));
    }

    /// How many of the server's established connections on `port`, from
    /// `/proc/net/tcp` (what `ss -tn` shows as Recv-Q), have had what they
    /// sent read (their handshake has had a turn), and how many still hold
    /// unread bytes.
    fn read_and_unread(port: u16) -> (usize, usize) {
        let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
        let queues = table.lines().skip(1).filter_map(|line| {
            // sl local_address rem_address st tx_queue:rx_queue ...
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local = fields.get(1)?.rsplit(':').next()?;
            let established = *fields.get(3)? == "01";
            let rx_queue = fields.get(4)?.split(':').nth(1)?;
            (established && u16::from_str_radix(local, 16).ok()? == port)
                .then(|| usize::from_str_radix(rx_queue, 16).ok())?
        });
        queues.fold((0, 0), |(read, unread), queued| match queued {
            0 => (read + 1, unread),
            _ => (read, unread + 1),
        })
    }
}
