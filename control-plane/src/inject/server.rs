//! The webhook port (15017): HTTPS for the Kubernetes API server, `POST`
//! to [`INJECT_PATH`], [`UNKNOWN_POD_LABEL_PATH`],
//! [`UNKNOWN_NAMESPACE_LABEL_PATH`] and [`VALIDATE_PATH`], each answered by
//! the pure functions of [`super`]; the unknown values of
//! `trellis.io/inject` an answer denies or warns of are counted, and so
//! are the pods injected with names under `trellis.io/` that are not
//! Trellis's; the pods the warning-only paths admit are recorded ([`UninjectedPods`]), and the
//! owners of the pods `/inject` injects told to it.
//!
//! This module owns only the transport: TLS with the serving certificate
//! of the mounted Secret (the chart's, cert-manager's or the operator's;
//! re-read when it changes, its expiry reported), HTTP/1.1,
//! a body size limit and a budget for the bodies read at once
//! ([`BODY_BUDGET`]), status codes, and limits on connections (in number,
//! per client address and in time), since every pod of the cluster can
//! reach the port. It decides nothing about pods or policies. The API
//! server authenticates us by the `caBundle` of the webhook
//! configurations; it presents no client certificate, so none is asked
//! for. A failed handshake (an API server that does not trust the
//! certificate, plaintext, a scanner) is counted by a bounded reason and
//! logged as a warning naming the client, at most once per reason per
//! [`REFUSAL_LOG_PAUSE`](crate::server::REFUSAL_LOG_PAUSE), by the gRPC
//! port's `Refusals`: otherwise an API server that cannot reach the
//! webhook would leave no trace at the default log level. A connection
//! closed as it is accepted because it is past the connection limits (a
//! pod flooding the port, or an API server sending more reviews at once
//! than one address may) is counted and logged the same way, by the limit
//! that refused it.
//! A client that sent plaintext HTTP (`curl http://` while debugging) is
//! answered in HTTP, within the same deadline and connection limits, that
//! the port speaks only HTTPS: the TLS alert it would get otherwise reads
//! as "Received HTTP/0.9 when not allowed". A malformed request head is
//! answered in words, counted and logged as [`crate::request_head`] says;
//! a method other than `POST` on a review path gets 405 with `Allow: POST`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use trellis_core::connections::ConnectionLimits;
use trellis_core::refusal::{plaintext_version, refuse_plaintext};
use trellis_core::tls::{Described, rustls_error};

use super::{
    AdmissionRequest, InjectConfig, LabelAdmission, NamespaceScope, Owner, UninjectedPods,
    UnknownInjectValue, respond_pod_reporting, respond_policy, respond_unknown_label,
};
use crate::api::quoted;
use crate::handshake::HandshakeFailure;
use crate::metrics::Metrics;
use crate::request_head;
use crate::run::{Accepting, Connections};
use crate::server::Refusals;

/// The mutating webhook that injects pods.
pub const INJECT_PATH: &str = "/inject";
/// The warning-only webhook for pods whose `trellis.io/inject` label is
/// neither `enabled` nor `disabled`, in namespaces that did not opt in.
pub const UNKNOWN_POD_LABEL_PATH: &str = "/inject/unknown-pod-label";
/// The warning-only webhook for pods of namespaces whose
/// `trellis.io/inject` label is neither `enabled` nor `disabled`.
pub const UNKNOWN_NAMESPACE_LABEL_PATH: &str = "/inject/unknown-namespace-label";
/// The validating webhook for Trellis policies.
pub const VALIDATE_PATH: &str = "/validate";

/// The largest review body accepted. A Pod object is at most a few hundred
/// KiB (annotations are capped at 256 KiB); the API server's own request
/// limit is 3 MiB.
pub const MAX_BODY: usize = 4 << 20;

/// Reviews answered at once. Answering one is CPU work (parsing the pod,
/// reading its annotations, building the patch), done on a blocking
/// thread, never on the async runtime's workers, so that a slow review
/// cannot stall the gRPC and admin ports; the others wait their turn. Two,
/// so that one large review leaves a turn for the next and the control
/// plane's CPU limit is not exceeded many times over.
pub const MAX_REVIEWS_AT_ONCE: usize = 2;

/// Bytes of review bodies the webhook port holds at once, over every
/// connection: a body is read only with room for it in this budget (as its
/// `Content-Length` announces, or as its chunks arrive), and answered 503
/// when there is none. Without it, [`MAX_CONNECTIONS`] clients sending
/// [`MAX_BODY`] each slowly would hold 512 MiB; this is 16 bodies of the
/// largest size, hundreds of real reviews at once.
pub const BODY_BUDGET: usize = 64 << 20;

/// How often the certificate files are checked for a change.
const CERT_RECHECK: Duration = Duration::from_secs(10);

/// How long a client has to finish the TLS handshake, and then to send a
/// request's head (an idle connection waits no longer for the next one):
/// the API server sends its at once.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a request's body may take to arrive once its head has: the
/// API server sends it at once. A client trickling a body is answered 408
/// and its connection closed, so it holds its slot seconds, not for the
/// connection's whole lifetime.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(5);

/// Webhook connections served at once; more are closed as they are
/// accepted. Each may be reading a body of up to [`MAX_BODY`]; what they
/// hold together is bounded by [`BODY_BUDGET`].
pub const MAX_CONNECTIONS: usize = 128;

/// Webhook connections one client address may hold at once: half of
/// [`MAX_CONNECTIONS`], so that one pod cannot take every slot. The API
/// server calls from the few addresses of its replicas, with a connection
/// for each review in flight: 64 reviews in flight at once from one API
/// server is far more than a busy cluster makes (a review takes
/// milliseconds), so this does not throttle it.
pub const MAX_CONNECTIONS_PER_CLIENT: usize = 64;

/// How long one webhook connection is served: then it closes after the
/// answer in progress, or [`HEAD_TIMEOUT`] later if that answer cannot be
/// written. The API server opens another.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// What a client that sent plaintext HTTP to the webhook port is told.
const PLAINTEXT_ANSWER: &str = "this is the Trellis control plane's admission webhook port: it \
     speaks only HTTPS, for the Kubernetes API server's calls to /inject and /validate (use \
     https://, trusting the CA in the webhook configurations' caBundle, as the API server does)";

/// Why the serving certificate cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsFilesError {
    #[error("{}: {message}", crate::escape::shown(path))]
    File { path: PathBuf, message: String },
    #[error("webhook TLS: {0}")]
    Tls(#[from] rustls::Error),
}

fn file_error(path: &Path, message: impl ToString) -> TlsFilesError {
    TlsFilesError::File {
        path: path.to_owned(),
        message: message.to_string(),
    }
}

/// The serving certificate from PEM files (`tls.crt` with its chain,
/// `tls.key` in PKCS#1, PKCS#8 or SEC1), re-read when the certificate file
/// changes; a failed re-read keeps the certificate in use.
///
/// The files are followed through symlinks, so a mounted Secret's update
/// (the kubelet writes the new files into a new directory and swaps the
/// `..data` symlink to it, as it does when cert-manager renews the
/// certificate) is a change: the file reached is another one.
pub struct ServingFiles {
    cert: PathBuf,
    key: PathBuf,
    state: RwLock<Loaded>,
    metrics: Option<Arc<Metrics>>,
}

struct Loaded {
    key: Arc<CertifiedKey>,
    stamp: Option<FileStamp>,
    /// The certificate's notAfter (Unix seconds).
    not_after: i64,
    checked: Instant,
}

/// What tells a certificate file from the one loaded: its modification
/// time, and which file it is (a file swapped in keeping the time of the
/// one it replaces is still another file).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    modified: SystemTime,
    device: u64,
    inode: u64,
}

impl std::fmt::Debug for ServingFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingFiles")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl ServingFiles {
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsFilesError> {
        let loaded = load(cert, key)?;
        Ok(Self {
            cert: cert.to_owned(),
            key: key.to_owned(),
            state: RwLock::new(loaded),
            metrics: None,
        })
    }

    /// Reports the certificate's notAfter to `metrics` now and after each
    /// reload.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        metrics.webhook_certificate(self.state.read().expect("not poisoned").not_after);
        self.metrics = Some(metrics);
        self
    }

    /// When the certificate served now expires (its notAfter, Unix
    /// seconds).
    pub fn not_after(&self) -> i64 {
        self.state.read().expect("not poisoned").not_after
    }

    fn current(&self) -> Arc<CertifiedKey> {
        {
            let state = self.state.read().expect("not poisoned");
            if state.checked.elapsed() < CERT_RECHECK {
                return state.key.clone();
            }
        }
        self.recheck()
    }

    /// Re-reads the files if the certificate file changed since it was
    /// loaded, and answers the certificate served from now on. Handshakes
    /// call it at most every 10 s; [`Self::recheck_every`] calls it when
    /// there are none, so that the expiry metric follows a renewal.
    pub fn recheck(&self) -> Arc<CertifiedKey> {
        let mut state = self.state.write().expect("not poisoned");
        state.checked = Instant::now();
        if stamp(&self.cert) != state.stamp {
            match load(&self.cert, &self.key) {
                Ok(loaded) => {
                    tracing::info!(
                        cert = %crate::escape::shown(&self.cert),
                        not_after = loaded.not_after,
                        "webhook certificate reloaded"
                    );
                    if let Some(metrics) = &self.metrics {
                        metrics.webhook_certificate(loaded.not_after);
                    }
                    *state = loaded;
                }
                Err(e) => tracing::warn!(error = %e, "webhook certificate not reloaded"),
            }
        }
        state.key.clone()
    }

    /// Checks the files for a change every 10 s, until `shutdown` turns
    /// true.
    pub async fn recheck_every(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut ticks = tokio::time::interval(CERT_RECHECK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                () = crate::run::stopping(&mut shutdown) => return,
            }
            self.recheck();
        }
    }
}

/// Checks `--webhook-cert` and `--webhook-key` as the start will load them
/// (each readable, a certificate, a key, the key of the certificate), so a
/// configuration error exits before the state dir is touched. The error
/// names the flag (as `names` does) and its file, never the key.
pub fn check_serving_files(
    cert: &Path,
    key: &Path,
    names: &dyn trellis_core::flags::FlagNames,
) -> Result<(), String> {
    let e = match load(cert, key) {
        Ok(_) => return Ok(()),
        Err(e) => e,
    };
    let flag = match &e {
        TlsFilesError::File { path, .. } if path == key => "webhook-key",
        _ => "webhook-cert",
    };
    Err(format!("{} {e}", names.name(flag)))
}

/// The certificate file's stamp, through symlinks.
fn stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let metadata = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        modified: metadata.modified().ok()?,
        device: metadata.dev(),
        inode: metadata.ino(),
    })
}

fn load(cert: &Path, key: &Path) -> Result<Loaded, TlsFilesError> {
    let stamp = stamp(cert);
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| file_error(cert, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(cert, e))?;
    if chain.is_empty() {
        return Err(file_error(cert, "no certificate in the file"));
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| file_error(key, e))?;
    let signing = trellis_core::tls::provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| file_error(key, e))?;
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0])
        .map_err(|e| file_error(cert, format!("bad certificate: {e}")))?;
    let not_after = leaf.validity().not_after.timestamp();
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| {
        file_error(
            key,
            format!("does not match {}: {e}", crate::escape::shown(cert)),
        )
    })?;
    Ok(Loaded {
        key: Arc::new(certified),
        stamp,
        not_after,
        checked: Instant::now(),
    })
}

impl ResolvesServerCert for ServingFiles {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// TLS 1.3, HTTP/1.1, no client certificate.
pub fn tls_config(files: Arc<ServingFiles>) -> Result<Arc<ServerConfig>, TlsFilesError> {
    let mut config = ServerConfig::builder_with_provider(trellis_core::tls::provider())
        .with_protocol_versions(trellis_core::tls::PROTOCOL_VERSIONS)?
        .with_no_client_auth()
        .with_cert_resolver(files);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The bound webhook port.
pub struct WebhookServer {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    /// Room for the bodies being read, in bytes ([`BODY_BUDGET`]).
    bodies: BodyBudget,
}

impl WebhookServer {
    pub async fn bind(addr: SocketAddr, tls: Arc<ServerConfig>) -> std::io::Result<Self> {
        Ok(Self::new(crate::net::bind(addr)?, tls))
    }

    /// The webhook port on `listener`, bound already ([`crate::net::bind`]).
    pub fn new(listener: TcpListener, tls: Arc<ServerConfig>) -> Self {
        Self {
            listener,
            acceptor: TlsAcceptor::from(tls),
            bodies: BodyBudget::new(BODY_BUDGET),
        }
    }

    /// With `bytes` of review bodies held at once instead of
    /// [`BODY_BUDGET`].
    pub fn with_body_budget(mut self, bytes: usize) -> Self {
        self.bodies = BodyBudget::new(bytes);
        self
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` completes, then stops accepting and returns
    /// the connections still open, for the caller to wait for
    /// ([`Connections::drain`]): each is told to close once the answer in
    /// progress is written, so that a review in flight (its body still
    /// arriving, or waiting for its turn) is answered, as is one whose first
    /// request head, or a later one, has begun to arrive (read, or waiting
    /// in the socket, served as the connection's last), and one whose TLS
    /// handshake has begun (finished within its deadline, then served so);
    /// one idle between reviews, with nothing received after its handshake,
    /// or nothing at all, closes at once. `config` carries the injection settings and the current trust
    /// bundle; a CA rotation sends a new one. Failed handshakes, and
    /// connections refused by the connection limits, are counted in
    /// `metrics`; pods the warning-only webhooks admit without a sidecar are
    /// recorded in `uninjected`.
    pub async fn run(
        self,
        config: watch::Receiver<Arc<InjectConfig>>,
        metrics: Arc<Metrics>,
        uninjected: Arc<UninjectedPods>,
        shutdown: impl Future<Output = ()>,
    ) -> Connections {
        tokio::pin!(shutdown);
        let (closing_tx, closing) = watch::channel(false);
        let mut connections = Connections::default();
        let limits = ConnectionLimits::new(MAX_CONNECTIONS, MAX_CONNECTIONS_PER_CLIENT);
        let over_limits = Refusals::new(metrics.clone(), Metrics::webhook_connection_refused);
        let failures = Arc::new(Refusals::new(
            metrics.clone(),
            Metrics::webhook_handshake_failed,
        ));
        let malformed = Arc::new(Refusals::new(
            metrics.clone(),
            Metrics::webhook_malformed_request,
        ));
        let turns = Arc::new(Semaphore::new(MAX_REVIEWS_AT_ONCE));
        let mut accepting = Accepting::new(self.listener, "webhook");
        // The port's stop, told to every connection as it comes.
        let mut stop = std::pin::pin!(async {
            (&mut shutdown).await;
            let _ = closing_tx.send(true);
        });
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
            let acceptor = self.acceptor.clone();
            let config = config.clone();
            let metrics = metrics.clone();
            let uninjected = uninjected.clone();
            let failures = failures.clone();
            let turns = turns.clone();
            let bodies = self.bodies.clone();
            let malformed = malformed.clone();
            let mut closing = closing.clone();
            connections.serve(async move {
                let admitted = admitted;
                // Told to make way for a client holding fewer (closed at
                // once), or the port stops (its review in flight, or one
                // begun, answered first: a handshake begun is finished).
                let mut evicted = std::pin::pin!(admitted.evicted());
                // One queued at the stop has begun (`net::queued`): its
                // handshake is finished, its first request its last.
                let mut drain = std::pin::pin!(async {
                    if after_stop {
                        std::future::pending::<()>().await;
                    }
                    crate::run::stopping(&mut closing).await;
                });
                let (tls, drained) = tokio::select! {
                    shaken = handshake(&acceptor, tcp, client, &failures, drain.as_mut()) => shaken,
                    () = evicted.as_mut() => return,
                };
                let Some(tls) = tls else {
                    return;
                };
                // `drain`, once resolved, is not polled again.
                let mut stopped = std::pin::pin!(async {
                    if drained {
                        std::future::pending::<()>().await;
                    }
                    drain.await;
                });
                let service = hyper::service::service_fn(move |req| {
                    let reviewing = Reviewing {
                        config: config.borrow().clone(),
                        metrics: metrics.clone(),
                        uninjected: uninjected.clone(),
                        turns: turns.clone(),
                    };
                    let bodies = bodies.clone();
                    async move { Ok::<_, Infallible>(serve(req, &bodies, reviewing).await) }
                });
                request_head::serve(
                    tls,
                    client,
                    HEAD_TIMEOUT,
                    CONNECTION_LIFETIME,
                    &malformed,
                    MALFORMED,
                    evicted,
                    stopped.as_mut(),
                    drained || after_stop,
                    service,
                )
                .await;
            });
        }
        let _ = closing_tx.send(true);
        connections
    }
}

/// How a failed handshake on the webhook port is logged, with its reason
/// and peer.
const HANDSHAKE_FAILED: &str = "webhook TLS handshake failed";

/// How a connection closed as it was accepted, past the webhook port's
/// connection limits, is logged, with the limit (`reason`, `error`) and
/// peer.
const OVER_LIMITS: &str = "webhook connection refused: past the port's connection limits";

/// How a request head the webhook port refused is logged, with its kind
/// (`reason`), how it was answered and what was wrong (`error`), and the
/// peer ([`crate::request_head`]): never the head's bytes.
pub const MALFORMED: &str = "webhook request refused: malformed request head";

/// The TLS handshake of a connection from `peer`, finished within
/// [`HEAD_TIMEOUT`]; `None` when it failed (counted and logged). A
/// connection closed before it sent anything (a TCP probe, a port scan)
/// did not try a handshake: it is not counted. One that sent plaintext
/// HTTP is counted as `not_tls` and its first request answered with
/// [`PLAINTEXT_ANSWER`], by the same deadline. When the port stops
/// (`drain`), a connection with nothing received (not even waiting to be
/// read) is closed at once, and a handshake begun is finished all the
/// same; the `bool` then says it was (`drain` is not polled again), for
/// the connection's first request to be its last.
async fn handshake<D: Future<Output = ()>>(
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    failures: &Refusals<HandshakeFailure>,
    mut drain: Pin<&mut D>,
) -> (Option<TlsStream<TcpStream>>, bool) {
    let deadline = tokio::time::Instant::now() + HEAD_TIMEOUT;
    let mut first = [0u8; 1];
    let (peeked, drained) = tokio::select! {
        peeked = tokio::time::timeout_at(deadline, tcp.peek(&mut first)) => (peeked, false),
        () = drain.as_mut() => {
            // Nothing received yet: only a byte already waiting keeps it,
            // looked for in the socket itself (tokio finds none in one it
            // has not yet seen readable, as one accepted just before the
            // stop).
            match trellis_core::http1::peek_now(&tcp, &mut first) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return (None, true),
                peeked => (Ok(peeked), true),
            }
        }
    };
    // A handshake begun is finished, within its deadline, though the port
    // stops meanwhile: its client (the API server sends its review right
    // behind its Finished) is then served one request.
    let mut rest = std::pin::pin!(handshake_begun(
        acceptor, tcp, peer, failures, deadline, first, peeked
    ));
    if drained {
        return (rest.await, true);
    }
    tokio::select! {
        shaken = rest.as_mut() => (shaken, false),
        () = drain.as_mut() => (rest.await, true),
    }
}

/// The rest of [`handshake`], once its first byte was waited for
/// (`peeked`, into `first`).
#[allow(clippy::too_many_arguments)]
async fn handshake_begun(
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    failures: &Refusals<HandshakeFailure>,
    deadline: tokio::time::Instant,
    first: [u8; 1],
    peeked: Result<std::io::Result<usize>, tokio::time::error::Elapsed>,
) -> Option<TlsStream<TcpStream>> {
    match peeked {
        Ok(Ok(n)) if n > 0 => {}
        Ok(_) => return None,
        Err(_) => {
            failures.refuse(
                peer,
                HandshakeFailure::Timeout,
                Some(&"nothing received"),
                HANDSHAKE_FAILED,
            );
            return None;
        }
    }
    if plaintext_version(&first).is_some() {
        // Counted before the answer, so that a client reading the metrics
        // once it has its answer finds it counted.
        failures.refuse(
            peer,
            HandshakeFailure::NotTls,
            Some(&"plaintext HTTP: answered that this port speaks only HTTPS"),
            HANDSHAKE_FAILED,
        );
        // Its first bytes are here, so the refusal's own peek returns at
        // once and the answer gets what is left of the deadline.
        let patience = deadline.saturating_duration_since(tokio::time::Instant::now());
        let _ = refuse_plaintext(tcp, PLAINTEXT_ANSWER, patience, || {}).await;
        return None;
    }
    match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(e)) => {
            failures.refuse(
                peer,
                webhook_failure_reason(&e),
                Some(&Described(&e)),
                HANDSHAKE_FAILED,
            );
            None
        }
        Err(_) => {
            failures.refuse(
                peer,
                HandshakeFailure::Timeout,
                Some(&"handshake not finished in time"),
                HANDSHAKE_FAILED,
            );
            None
        }
    }
}

/// The reason a handshake on the webhook port failed: as on the gRPC port
/// ([`HandshakeFailure::of_rustls`]), except that a client refusing the serving
/// certificate (a TLS alert about it: the API server's `caBundle` is not
/// the CA that signed it, or the certificate expired) is
/// `certificate_refused`, the usual cause of a webhook the API server
/// cannot call.
fn webhook_failure_reason(e: &std::io::Error) -> HandshakeFailure {
    use rustls::AlertDescription as A;
    match rustls_error(e) {
        Some(rustls::Error::AlertReceived(
            A::BadCertificate
            | A::UnknownCA
            | A::CertificateUnknown
            | A::CertificateExpired
            | A::CertificateRevoked
            | A::UnsupportedCertificate,
        )) => HandshakeFailure::CertificateRefused,
        Some(e) => HandshakeFailure::of_rustls(e),
        None => HandshakeFailure::IoError,
    }
}

/// What answering a review takes: the injection settings of the moment,
/// where to count and record, and the turns ([`MAX_REVIEWS_AT_ONCE`]).
struct Reviewing {
    config: Arc<InjectConfig>,
    metrics: Arc<Metrics>,
    uninjected: Arc<UninjectedPods>,
    turns: Arc<Semaphore>,
}

async fn serve(
    req: Request<Incoming>,
    bodies: &BodyBudget,
    reviewing: Reviewing,
) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    // Held until the answer is made: the body is in memory until then.
    let (body, _room) = match tokio::time::timeout(BODY_TIMEOUT, bodies.read(body)).await {
        Ok(Ok(read)) => read,
        Ok(Err(refused)) => {
            let status = match refused {
                BodyRefused::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
                BodyRefused::NoRoom { .. } => StatusCode::SERVICE_UNAVAILABLE,
                BodyRefused::Read(_) => StatusCode::BAD_REQUEST,
            };
            let mut answer = text(status, refused.to_string());
            if let BodyRefused::NoRoom { .. } = refused {
                answer.headers_mut().insert(
                    http::header::RETRY_AFTER,
                    http::HeaderValue::from_static("1"),
                );
            }
            // The rest of its body is not read: the connection cannot
            // carry another request.
            answer.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("close"),
            );
            return answer;
        }
        Err(_) => {
            let mut answer = text(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request's body did not arrive within {}",
                    trellis_core::duration::words(BODY_TIMEOUT)
                ),
            );
            answer.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("close"),
            );
            return answer;
        }
    };
    let Reviewing {
        config,
        metrics,
        uninjected,
        turns,
    } = reviewing;
    let _turn = turns.acquire_owned().await.expect("never closed");
    let answered = tokio::task::spawn_blocking(move || {
        respond(
            &parts.method,
            parts.uri.path(),
            &body,
            &config,
            &metrics,
            &uninjected,
        )
    })
    .await;
    let (status, content_type, body) = match answered {
        Ok(answer) => answer,
        // A bug: `respond` panicked (its message is on stderr).
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            b"the review could not be answered\n".to_vec(),
        ),
    };
    let mut answer = Response::builder()
        .status(status)
        .header("content-type", content_type);
    if status == StatusCode::METHOD_NOT_ALLOWED {
        // What is allowed, as RFC 9110 section 15.5.6 asks of a 405: the
        // only 405 of `respond` is of a review path, which takes POST.
        answer = answer.header(http::header::ALLOW, "POST");
    }
    answer
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

/// Room for the review bodies being read, in bytes, shared by every
/// connection of the port: a body is never held without its room.
#[derive(Clone)]
struct BodyBudget {
    room: Arc<tokio::sync::Semaphore>,
    bytes: usize,
}

/// Why a request's body was not read.
#[derive(Debug, thiserror::Error)]
enum BodyRefused {
    #[error("cannot read the body: it is larger than {MAX_BODY} bytes, the most a review may be")]
    TooLarge,
    #[error(
        "cannot read the body now: the webhook holds at most {budget} bytes of review bodies \
         at once, and those being read leave no room for {needed} more bytes of this one; try \
         again"
    )]
    NoRoom { budget: usize, needed: usize },
    #[error("cannot read the body: {0}")]
    Read(hyper::Error),
}

impl BodyBudget {
    fn new(bytes: usize) -> Self {
        Self {
            room: Arc::new(tokio::sync::Semaphore::new(bytes)),
            bytes,
        }
    }

    /// `n` more bytes of room, at once or not at all.
    fn take(&self, n: usize) -> Result<tokio::sync::OwnedSemaphorePermit, BodyRefused> {
        let no_room = || BodyRefused::NoRoom {
            budget: self.bytes,
            needed: n,
        };
        let n32 = u32::try_from(n).map_err(|_| no_room())?;
        self.room
            .clone()
            .try_acquire_many_owned(n32)
            .map_err(|_| no_room())
    }

    /// The body, at most [`MAX_BODY`], with its room: taken as its
    /// `Content-Length` announces before any of it is read, and as chunks
    /// arrive past that (a chunked body announces nothing).
    async fn read(
        &self,
        mut body: Incoming,
    ) -> Result<(Bytes, tokio::sync::OwnedSemaphorePermit), BodyRefused> {
        use hyper::body::Body as _;
        let hint = body.size_hint();
        let announced = usize::try_from(hint.exact().unwrap_or(hint.lower())).unwrap_or(usize::MAX);
        if announced > MAX_BODY {
            return Err(BodyRefused::TooLarge);
        }
        let mut room = self.take(announced)?;
        let mut read = bytes::BytesMut::with_capacity(announced);
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame.map_err(BodyRefused::Read)?.into_data() else {
                continue;
            };
            let length = read.len() + data.len();
            if length > MAX_BODY {
                return Err(BodyRefused::TooLarge);
            }
            if length > room.num_permits() {
                room.merge(self.take(length - room.num_permits())?);
            }
            read.extend_from_slice(&data);
        }
        Ok((read.freeze(), room))
    }
}

fn text(status: StatusCode, message: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(message + "\n")))
        .expect("static response parts are valid")
}

/// Routes one request: the status, content type and body of the answer.
/// A body that is not an AdmissionReview gets 400, so the webhook's
/// `failurePolicy` decides about the object. A `trellis.io/inject` value
/// the answer denies or warns of is counted in `metrics`, as is a pod
/// injected with a name under `trellis.io/` that is not Trellis's, a pod the
/// warning-only paths admit without a sidecar recorded in `uninjected`,
/// and the owner of a pod injected told to it; none of these for a
/// server-side dry run (`request.dryRun`), which creates no pod, and whose
/// log line says it is one.
pub fn respond(
    method: &Method,
    path: &str,
    body: &[u8],
    config: &InjectConfig,
    metrics: &Metrics,
    uninjected: &UninjectedPods,
) -> (StatusCode, &'static str, Vec<u8>) {
    // Set by the review, once parsed: a dry run is answered as the pod
    // would be, and leaves no count, record or entry behind.
    let mut dry_run = false;
    let result = match path {
        INJECT_PATH | UNKNOWN_POD_LABEL_PATH | UNKNOWN_NAMESPACE_LABEL_PATH | VALIDATE_PATH
            if method != Method::POST =>
        {
            let message = format!("{path} takes POST, not {method}\n");
            return (StatusCode::METHOD_NOT_ALLOWED, "text/plain", message.into());
        }
        INJECT_PATH => AdmissionRequest::parse(body).map(|request| {
            dry_run = request.dry_run;
            let scope = NamespaceScope::SelectedByWebhook;
            let review = respond_pod_reporting(&request, scope, config);
            // A server-side dry run (`kubectl apply --dry-run=server`, and
            // tools that diff with it) creates no pod: warned of, or
            // denied, as the pod would be, not counted.
            if !request.dry_run {
                for found in review.unknown {
                    metrics.inject_unknown_value(found.reason());
                }
                for found in review.unknown_names {
                    metrics.inject_unknown_name(found.reason());
                }
            }
            // With the sidecar, injected now or before (re-submitted, or
            // injected by hand): the owner's pods admitted without one
            // before are replaced by pods like this one. A dry run creates
            // none.
            if let Some(pod) = request.object.as_ref()
                && review.meshed
                && !request.dry_run
            {
                let now = crate::unix_now();
                uninjected.injected(Owner::of(&request.namespace, pod, now), now);
            }
            review.response
        }),
        UNKNOWN_POD_LABEL_PATH | UNKNOWN_NAMESPACE_LABEL_PATH => {
            let found = if path == UNKNOWN_POD_LABEL_PATH {
                UnknownInjectValue::PodLabel
            } else {
                UnknownInjectValue::NamespaceLabel
            };
            AdmissionRequest::parse(body).map(|request| {
                dry_run = request.dry_run;
                let now = crate::unix_now();
                let (response, admitted) = respond_unknown_label(&request, found, now);
                // A dry run creates no pod: nothing runs, with a sidecar or
                // without, and nothing is counted.
                if let Some(admitted) = admitted
                    && !request.dry_run
                {
                    metrics.inject_unknown_value(found.reason());
                    match admitted {
                        LabelAdmission::Uninjected(pod) => uninjected.record(pod, now),
                        // Injected before (by hand, or created again from
                        // a running pod's manifest): meshed all the same.
                        LabelAdmission::Meshed(owner) => uninjected.injected(owner, now),
                    }
                }
                response
            })
        }
        VALIDATE_PATH => AdmissionRequest::parse(body).map(|request| {
            dry_run = request.dry_run;
            respond_policy(&request, &config.trust_domain, &config.validation)
        }),
        _ => {
            let message = format!(
                "not found: {path} (try {INJECT_PATH}, {UNKNOWN_POD_LABEL_PATH}, \
                 {UNKNOWN_NAMESPACE_LABEL_PATH} or {VALIDATE_PATH})\n"
            );
            return (StatusCode::NOT_FOUND, "text/plain", message.into());
        }
    };
    match result {
        Ok(response) => {
            if !response.allowed || !response.warnings.is_empty() {
                // The uid is whatever the caller sent: quoted, so that it
                // cannot end the line. `detail`, not `message`: that is the
                // event's own message field.
                tracing::info!(
                    path,
                    uid = %quoted(&response.uid),
                    allowed = response.allowed,
                    dry_run,
                    detail = response.message.as_deref().unwrap_or_default(),
                    warnings = %trellis_core::logging::Sentences(&response.warnings),
                    "admission review"
                );
            }
            (StatusCode::OK, "application/json", response.to_body())
        }
        Err(e) => {
            tracing::warn!(path, error = %e, "unusable admission review");
            (
                StatusCode::BAD_REQUEST,
                "text/plain",
                format!("{e}\n").into(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use rustls_pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::server::REFUSAL_LOG_PAUSE;

    /// A self-signed certificate for `localhost` loaded as a webhook port
    /// serves it, from files in a new temporary directory: the files, the
    /// certificate (a client's root to trust it), and the directory, which
    /// keeps the files.
    fn self_signed_files() -> (
        Arc<ServingFiles>,
        rustls_pki_types::CertificateDer<'static>,
        tempfile::TempDir,
    ) {
        let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        std::fs::write(&cert, generated.cert.pem()).unwrap();
        std::fs::write(&key, generated.signing_key.serialize_pem()).unwrap();
        let files = Arc::new(ServingFiles::load(&cert, &key).unwrap());
        (files, generated.cert.der().clone(), dir)
    }

    /// A webhook port on loopback serving a self-signed certificate for
    /// `localhost`, counting in `metrics`: its address, and what keeps it
    /// (and its certificate files) alive.
    async fn loopback_webhook(
        metrics: Arc<Metrics>,
    ) -> (
        SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tempfile::TempDir,
    ) {
        let (files, _, dir) = self_signed_files();
        let server =
            WebhookServer::bind("127.0.0.1:0".parse().unwrap(), tls_config(files).unwrap())
                .await
                .unwrap();
        let addr = server.local_addr().unwrap();
        let (config_tx, config) = watch::channel(Arc::new(InjectConfig::default()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _keep = config_tx;
            server
                .run(config, metrics, Default::default(), async {
                    let _ = stopped.await;
                })
                .await;
        });
        (addr, stop, dir)
    }

    /// A ClientHello waiting in a socket the runtime has not yet seen
    /// readable when the port stops (a connection accepted just before the
    /// stop, its task first run after it): the handshake is finished, said
    /// to be after the stop, not closed as a connection with nothing
    /// received.
    #[tokio::test]
    async fn a_client_hello_waiting_unseen_at_the_stop_is_handshaken() {
        let (files, root, _dir) = self_signed_files();
        let acceptor = TlsAcceptor::from(tls_config(files).unwrap());
        let failures = Refusals::new(
            Arc::new(Metrics::default()),
            Metrics::webhook_handshake_failed,
        );
        let mut roots = rustls::RootCertStore::empty();
        roots.add(root).unwrap();
        let config = Arc::new(
            rustls::ClientConfig::builder_with_provider(trellis_core::tls::provider())
                .with_protocol_versions(trellis_core::tls::PROTOCOL_VERSIONS)
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // The client on a runtime of its own: this one must not turn its
        // IO driver before the handshake is first polled.
        let client = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let tcp = TcpStream::connect(addr).await.unwrap();
                tokio_rustls::TlsConnector::from(config)
                    .connect(ServerName::try_from("localhost").unwrap(), tcp)
                    .await
                    .map(drop)
            })
        });
        let (port, peer) = listener.accept().unwrap();
        // The ClientHello is in the port's socket, unread, tokio not told.
        assert_eq!(port.peek(&mut [0u8; 1]).unwrap(), 1);
        port.set_nonblocking(true).unwrap();
        let port = TcpStream::from_std(port).unwrap();
        let stopped = std::pin::pin!(async {});
        let (tls, drained) = handshake(&acceptor, port, peer, &failures, stopped).await;
        assert!(drained, "the stop was seen");
        assert!(
            tls.is_some(),
            "a ClientHello waiting at the stop was closed unanswered"
        );
        client.join().unwrap().expect("the client's handshake");
    }

    /// The webhook certificate's recheck ends when the control plane shuts
    /// down, as its other background tasks do; until then it keeps
    /// checking.
    #[tokio::test(start_paused = true)]
    async fn the_certificate_recheck_ends_at_shutdown() {
        let (files, _, _dir) = self_signed_files();
        let rechecking = files.clone();
        crate::run::assert_runs_until_shutdown(Duration::from_secs(60), |shutdown| {
            rechecking.recheck_every(shutdown)
        })
        .await;
        assert_eq!(Arc::strong_count(&files), 1);
    }

    /// An API server whose `caBundle` is not the webhook's CA, and clients
    /// sending plaintext (answered in HTTP that the port speaks only
    /// HTTPS), fail their handshakes: each is counted by reason,
    /// and the first of each reason logged at once as a warning naming the
    /// client; the others within [`REFUSAL_LOG_PAUSE`] are only counted,
    /// and the next line after it says how many were not logged.
    #[tokio::test]
    async fn failed_handshakes_are_counted_and_logged_once_per_reason_per_pause() {
        const FLOOD: usize = 20;
        let metrics = Arc::new(Metrics::default());
        let (logs, _guard) = crate::test_logs::capture(false);
        let (addr, _stop, _dir) = loopback_webhook(metrics.clone()).await;

        // Trusts another CA than the one that signed the webhook's
        // certificate: a wrong `caBundle`.
        let mut other = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        other
            .distinguished_name
            .push(rcgen::DnType::CommonName, "another CA");
        other.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let other = other
            .self_signed(&rcgen::KeyPair::generate().unwrap())
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(other.der().clone()).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(trellis_core::tls::provider())
            .with_protocol_versions(trellis_core::tls::PROTOCOL_VERSIONS)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let foreign_ca = || async {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            let refused = connector
                .connect(ServerName::try_from("localhost").unwrap(), &mut tcp)
                .await;
            assert!(refused.is_err(), "the client trusted the webhook");
            // The server has read the client's alert once it closes.
            let _ = tcp.read_to_end(&mut Vec::new()).await;
        };
        let plaintext = || async {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            tcp.write_all(b"POST /inject HTTP/1.1\r\nHost: webhook\r\n\r\n")
                .await
                .unwrap();
            let mut answer = Vec::new();
            let _ = tcp.read_to_end(&mut answer).await;
            let answer = String::from_utf8_lossy(&answer);
            assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
            assert!(
                answer.ends_with(&format!("{PLAINTEXT_ANSWER}\n")),
                "{answer}"
            );
        };
        for _ in 0..FLOOD {
            foreign_ca().await;
            plaintext().await;
        }
        // Each failure is counted and logged (or not) before the server
        // closes the connection, on this thread.
        let rendered = metrics.render();
        for reason in ["certificate_refused", "not_tls"] {
            let counted = format!(
                "trellis_webhook_tls_handshake_failures_total{{reason=\"{reason}\"}} {FLOOD}\n"
            );
            assert!(rendered.contains(&counted), "{counted}in\n{rendered}");
        }
        assert_eq!(
            counted(&rendered, "trellis_tls_handshake_failures_total{"),
            0,
            "the gRPC port's series are left as they were: {rendered}"
        );
        let first =
            logs.assert_first_warnings(HANDSHAKE_FAILED, &["certificate_refused", "not_tls"]);
        assert!(
            first[0].contains("UnknownCA"),
            "the line says what the client refused: {:?}",
            first[0]
        );

        // The pause passes: the next failure is logged, with how many were
        // not.
        tokio::time::pause();
        tokio::time::advance(REFUSAL_LOG_PAUSE).await;
        tokio::time::resume();
        foreign_ca().await;
        logs.assert_next_warning(HANDSHAKE_FAILED, "certificate_refused", FLOOD - 1);
        assert!(metrics.render().contains(&format!(
            "trellis_webhook_tls_handshake_failures_total{{reason=\"certificate_refused\"}} {}\n",
            FLOOD + 1
        )));
    }

    /// The sum of the series of `rendered` that start with `series` (a
    /// family's name and `{`); a panic when there is none, as every reason
    /// of a handshake family is rendered from the start.
    fn counted(rendered: &str, series: &str) -> u64 {
        let counts: Vec<u64> = rendered
            .lines()
            .filter(|line| line.starts_with(series))
            .map(|line| line.rsplit_once(' ').unwrap().1.parse().unwrap())
            .collect();
        assert!(!counts.is_empty(), "no {series} in\n{rendered}");
        counts.iter().sum()
    }

    /// A client address holding [`MAX_CONNECTIONS_PER_CLIENT`] connections
    /// has each more closed as it is accepted: counted as `per_client`,
    /// the first logged at once as a warning naming the client and the
    /// limit, the next within [`REFUSAL_LOG_PAUSE`] only counted. With
    /// every slot taken and no address holding more to take one from, a
    /// connection is refused as `total`, likewise.
    #[tokio::test]
    async fn connections_past_the_limits_are_counted_and_logged() {
        use std::net::{IpAddr, Ipv4Addr};
        let metrics = Arc::new(Metrics::default());
        let (logs, _guard) = crate::test_logs::capture(false);
        let (addr, _stop, _dir) = loopback_webhook(metrics.clone()).await;
        // Connections from 127.0.0.`last` that send nothing.
        let connect = |last: u8| async move {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            let from = IpAddr::V4(Ipv4Addr::new(127, 0, 0, last));
            socket.bind(SocketAddr::new(from, 0)).unwrap();
            socket.connect(addr).await.unwrap()
        };
        let hold = |last: u8, count: usize| async move {
            let mut held = Vec::with_capacity(count);
            for _ in 0..count {
                held.push(connect(last).await);
            }
            held
        };
        // Closed by the server with nothing sent: once it is, the refusal
        // has been counted and logged (or not).
        let refused = |last: u8| async move {
            let mut tcp = connect(last).await;
            let read = tcp.read(&mut [0u8; 64]).await;
            assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        };

        let mut held = hold(1, MAX_CONNECTIONS_PER_CLIENT).await;
        refused(1).await;
        refused(1).await;
        // Every slot taken, 127.0.0.2 holding as many as any other but one:
        // no slot to take from an address holding more.
        held.extend(hold(2, MAX_CONNECTIONS_PER_CLIENT - 1).await);
        held.extend(hold(3, MAX_CONNECTIONS - held.len()).await);
        refused(2).await;

        let rendered = metrics.render();
        for (reason, count) in [("per_client", 2), ("total", 1)] {
            let counted = format!(
                "trellis_webhook_connections_refused_total{{reason=\"{reason}\"}} {count}\n"
            );
            assert!(rendered.contains(&counted), "{counted}in\n{rendered}");
        }
        logs.assert_limit_refusals(OVER_LIMITS, MAX_CONNECTIONS_PER_CLIENT, MAX_CONNECTIONS);
        drop(held);
    }

    /// A connection closed before it sent anything (a TCP probe, a port
    /// scan) tried no handshake: nothing is counted or logged.
    #[tokio::test]
    async fn a_connection_that_sends_nothing_and_closes_is_no_failure() {
        let metrics = Arc::new(Metrics::default());
        let (logs, _guard) = crate::test_logs::capture(false);
        let (addr, _stop, _dir) = loopback_webhook(metrics.clone()).await;
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.shutdown().await.unwrap();
        let _ = tcp.read_to_end(&mut Vec::new()).await;
        let rendered = metrics.render();
        assert_eq!(
            counted(&rendered, "trellis_webhook_tls_handshake_failures_total{"),
            0,
            "{rendered}"
        );
        assert!(!logs.text().contains("handshake failed"), "{}", logs.text());
    }

    /// The uid of a review is whatever its caller sent: logged quoted, a
    /// newline in it cannot start a forged line, and the answer's text is
    /// the `detail`, so the event keeps its own message in JSON.
    #[test]
    fn a_review_is_logged_on_one_line_under_its_own_message() {
        let body = serde_json::json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "7d1c\nINFO forged: policy applied",
                "kind": {"group": "trellis.io", "version": "v1alpha1", "kind": "AuthorizationPolicy"},
                "operation": "CREATE",
            },
        })
        .to_string();
        for json in [true, false] {
            let (logs, guard) = crate::test_logs::capture(json);
            let (status, _, _) = respond(
                &Method::POST,
                "/validate",
                body.as_bytes(),
                &InjectConfig::default(),
                &Metrics::default(),
                &UninjectedPods::default(),
            );
            drop(guard);
            assert_eq!(status, StatusCode::OK);
            let text = logs.text();
            assert_eq!(text.lines().count(), 1, "{text:?}");
            assert!(!text.contains("\nINFO forged"), "{text:?}");
            if json {
                let line: serde_json::Value = serde_json::from_str(&text).unwrap();
                assert_eq!(line["fields"]["message"], "admission review", "{line}");
                let detail = line["fields"]["detail"].as_str().unwrap();
                assert!(detail.contains("no object"), "{line}");
            } else {
                assert!(text.contains("admission review"), "{text:?}");
                assert!(text.contains(r#"uid="7d1c\nINFO forged"#), "{text:?}");
            }
        }
    }

    /// A pod `/inject` injects with a name under `trellis.io/` that is not
    /// Trellis's is logged with the answer's warnings, as the unknown
    /// values of `trellis.io/inject` are, and counted by where it was.
    #[test]
    fn an_unknown_trellis_name_is_logged_and_counted() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/k8s/pod-deployment-http-probes.json"
        );
        let mut review: serde_json::Value =
            serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        review["request"]["object"]["metadata"]["labels"]["trellis.io/injet"] =
            serde_json::json!("enabled");
        let config = InjectConfig {
            trust_bundle: super::super::TrustBundleSource::Annotation("PEM".into()),
            ..InjectConfig::default()
        };
        let metrics = Metrics::default();
        let (logs, guard) = crate::test_logs::capture(true);
        let (status, _, _) = respond(
            &Method::POST,
            INJECT_PATH,
            review.to_string().as_bytes(),
            &config,
            &metrics,
            &UninjectedPods::default(),
        );
        drop(guard);
        assert_eq!(status, StatusCode::OK);
        let text = logs.text();
        let line: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(line["fields"]["message"], "admission review", "{line}");
        assert_eq!(
            line["fields"]["warnings"],
            "trellis: metadata.labels[trellis.io/injet] is not a Trellis label and is ignored; \
             did you mean trellis.io/inject?",
            "{line}"
        );
        let rendered = metrics.render();
        for counted in [
            "trellis_inject_unknown_names_total{reason=\"pod_annotation\"} 0\n",
            "trellis_inject_unknown_names_total{reason=\"pod_label\"} 1\n",
        ] {
            assert!(rendered.contains(counted), "{counted}in\n{rendered}");
        }
    }

    /// A server-side dry run (`request.dryRun`) is answered as the pod
    /// itself would be, denied or warned of, but creates no pod: no
    /// unknown `trellis.io/inject` value is counted, on `/inject` or on
    /// a warning-only path, and the log line says it was a dry run.
    #[test]
    fn a_dry_run_counts_no_unknown_value_and_is_logged_as_one() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/k8s/pod-deployment-http-probes.json"
        );
        let mut review: serde_json::Value =
            serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        review["request"]["object"]["metadata"]["labels"]["trellis.io/inject"] =
            serde_json::json!("true");
        review["request"]["dryRun"] = serde_json::json!(true);
        let config = InjectConfig {
            trust_bundle: super::super::TrustBundleSource::Annotation("PEM".into()),
            ..InjectConfig::default()
        };
        let metrics = Metrics::default();
        for (path, allowed) in [(INJECT_PATH, false), (UNKNOWN_POD_LABEL_PATH, true)] {
            let (logs, guard) = crate::test_logs::capture(true);
            let (status, _, body) = respond(
                &Method::POST,
                path,
                review.to_string().as_bytes(),
                &config,
                &metrics,
                &UninjectedPods::default(),
            );
            drop(guard);
            assert_eq!(status, StatusCode::OK, "{path}");
            let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(answer["response"]["allowed"], allowed, "{path}: {answer}");
            let text = logs.text();
            let line: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(line["fields"]["message"], "admission review", "{line}");
            assert_eq!(line["fields"]["dry_run"], true, "{path}: {line}");
        }
        let rendered = metrics.render();
        let none = "trellis_inject_unknown_values_total{reason=\"pod_label\"} 0\n";
        assert!(rendered.contains(none), "{none}in\n{rendered}");
    }

    /// A webhook port on loopback holding at most `budget` bytes of
    /// bodies at once, serving a self-signed certificate for `localhost`.
    struct Budgeted {
        addr: SocketAddr,
        connector: tokio_rustls::TlsConnector,
        stop: tokio::sync::oneshot::Sender<()>,
        /// Ends once the port stops accepting, with its open connections.
        serving: tokio::task::JoinHandle<Connections>,
        _dir: tempfile::TempDir,
    }

    type ClientTls = tokio_rustls::client::TlsStream<TcpStream>;

    /// The body budget the tests give, and the size of the bodies they
    /// send: room for one, not two.
    const BUDGET: usize = 1 << 20;
    const SIZE: usize = 600 << 10;

    impl Budgeted {
        async fn start() -> Self {
            let (files, root, dir) = self_signed_files();
            let server =
                WebhookServer::bind("127.0.0.1:0".parse().unwrap(), tls_config(files).unwrap())
                    .await
                    .unwrap()
                    .with_body_budget(BUDGET);
            let addr = server.local_addr().unwrap();
            let (config_tx, config) = watch::channel(Arc::new(InjectConfig::default()));
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let metrics = Arc::new(Metrics::default());
            let serving = tokio::spawn(async move {
                let _keep = config_tx;
                server
                    .run(config, metrics, Default::default(), async {
                        let _ = stopped.await;
                    })
                    .await
            });
            let mut roots = rustls::RootCertStore::empty();
            roots.add(root).unwrap();
            let client = rustls::ClientConfig::builder_with_provider(trellis_core::tls::provider())
                .with_protocol_versions(trellis_core::tls::PROTOCOL_VERSIONS)
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            Self {
                addr,
                connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
                stop,
                serving,
                _dir: dir,
            }
        }

        async fn connect(&self) -> ClientTls {
            let tcp = TcpStream::connect(self.addr).await.unwrap();
            let name = ServerName::try_from("localhost").unwrap();
            self.connector.connect(name, tcp).await.unwrap()
        }

        /// A connection whose request announced a body of [`SIZE`] and
        /// was told to send it (so its room is taken), and sent half.
        async fn holding_room(&self) -> ClientTls {
            self.holding(SIZE).await
        }

        /// A connection whose request announced a body of `size` and was
        /// told to send it, and sent half: a review in flight.
        async fn holding(&self, size: usize) -> ClientTls {
            let mut tls = self.connect().await;
            let head = request_head(&format!(
                "Content-Length: {size}\r\nExpect: 100-continue\r\n"
            ));
            tls.write_all(head.as_bytes()).await.unwrap();
            let mut continued = Vec::new();
            while !continued.ends_with(b"\r\n\r\n") {
                let mut byte = [0u8; 1];
                assert_eq!(tls.read(&mut byte).await.unwrap(), 1, "{continued:?}");
                continued.push(byte[0]);
            }
            assert!(continued.starts_with(b"HTTP/1.1 100 "), "{continued:?}");
            tls.write_all(&review(size)[..size / 2]).await.unwrap();
            tls.flush().await.unwrap();
            tls
        }

        /// The answer to a request sending all of `review(SIZE)` at once,
        /// chunked or with its length.
        async fn send_whole(&self, chunked: bool) -> String {
            let mut tls = self.connect().await;
            let body = review(SIZE);
            let sent = match chunked {
                false => {
                    let head = request_head(&format!("Content-Length: {SIZE}\r\n"));
                    [head.into_bytes(), body].concat()
                }
                true => {
                    let mut sent = request_head("Transfer-Encoding: chunked\r\n").into_bytes();
                    for chunk in body.chunks(64 << 10) {
                        sent.extend(format!("{:x}\r\n", chunk.len()).into_bytes());
                        sent.extend(chunk);
                        sent.extend(b"\r\n");
                    }
                    sent.extend(b"0\r\n\r\n");
                    sent
                }
            };
            // The server may answer before it is all sent.
            let _ = tls.write_all(&sent).await;
            let _ = tls.flush().await;
            answer(tls).await
        }
    }

    /// A POST of a policy review to `/validate` with `headers`, closing
    /// the connection after its answer.
    fn request_head(headers: &str) -> String {
        format!(
            "POST {VALIDATE_PATH} HTTP/1.1\r\nHost: webhook\r\nContent-Type: \
             application/json\r\n{headers}Connection: close\r\n\r\n"
        )
    }

    /// A policy review, padded with whitespace to `size` bytes.
    fn review(size: usize) -> Vec<u8> {
        let mut body = serde_json::json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "7d1c",
                "kind": {"group": "trellis.io", "version": "v1alpha1", "kind": "AuthorizationPolicy"},
                "operation": "CREATE",
            },
        })
        .to_string()
        .into_bytes();
        body.resize(size, b' ');
        body
    }

    async fn answer(mut tls: ClientTls) -> String {
        let mut answer = Vec::new();
        let _ = tls.read_to_end(&mut answer).await;
        String::from_utf8_lossy(&answer).into_owned()
    }

    /// How a body is refused while those being read take all the budget,
    /// up to the size it needed.
    fn no_room() -> String {
        format!(
            "cannot read the body now: the webhook holds at most {BUDGET} bytes of review \
             bodies at once, and those being read leave no room for "
        )
    }

    /// Sends the rest of the body `first` holds room for, and checks it is
    /// answered.
    async fn finish(mut first: ClientTls) {
        first.write_all(&review(SIZE)[SIZE / 2..]).await.unwrap();
        first.flush().await.unwrap();
        let served = answer(first).await;
        assert!(served.starts_with("HTTP/1.1 200 "), "{served}");
    }

    /// At shutdown the port stops accepting and hands over its open
    /// connections: a review whose body is still arriving is answered once
    /// it has, and the drain waits for it; one not answered by the drain's
    /// deadline is closed then, unanswered, and counted as cut.
    #[tokio::test]
    async fn the_drain_waits_for_reviews_in_flight_and_cuts_those_past_its_deadline() {
        const SMALL: usize = 4096;
        let webhook = Budgeted::start().await;
        let mut finishing = webhook.holding(SMALL).await;
        let stuck = webhook.holding(SMALL).await;
        let Budgeted {
            addr,
            stop,
            serving,
            ..
        } = webhook;
        stop.send(()).unwrap();
        let open = serving.await.unwrap();
        assert_eq!(open.open(), 2, "both reviews in flight handed over");
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "the port stopped accepting"
        );

        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        let draining = tokio::spawn(open.drain(deadline));
        finishing
            .write_all(&review(SMALL)[SMALL / 2..])
            .await
            .unwrap();
        finishing.flush().await.unwrap();
        let served = answer(finishing).await;
        assert!(served.starts_with("HTTP/1.1 200 "), "{served}");
        assert!(!draining.is_finished(), "the drain waits for the other");
        assert_eq!(draining.await.unwrap(), 1, "one cut at the deadline");
        let cut = answer(stuck).await;
        assert!(cut.is_empty(), "a review cut got no answer: {cut}");
    }

    /// With the body budget taken by a body being read, a request whose
    /// `Content-Length` needs more is answered 503 saying so, before its
    /// body is read; once the first body is read and answered, its room is
    /// free and the same request is served.
    #[tokio::test]
    async fn a_body_past_the_budget_is_refused_until_room_is_freed() {
        let webhook = Budgeted::start().await;
        let first = webhook.holding_room().await;

        let refused = webhook.send_whole(false).await;
        assert!(refused.starts_with("HTTP/1.1 503 "), "{refused}");
        let message = format!("{}{SIZE} more bytes of this one; try again\n", no_room());
        assert!(refused.ends_with(&message), "{refused}");

        // The first finishes and is answered: its room is free again.
        finish(first).await;
        let served = webhook.send_whole(false).await;
        assert!(served.starts_with("HTTP/1.1 200 "), "{served}");
        assert!(served.contains("\"uid\":\"7d1c\""), "{served}");
    }

    /// A chunked body announces no length: it takes its room as its
    /// chunks arrive, and is refused once there is none.
    #[tokio::test]
    async fn a_chunked_body_takes_its_room_as_it_arrives() {
        let webhook = Budgeted::start().await;
        let first = webhook.holding_room().await;

        let refused = webhook.send_whole(true).await;
        assert!(refused.starts_with("HTTP/1.1 503 "), "{refused}");
        assert!(refused.contains(&no_room()), "{refused}");

        finish(first).await;
        let served = webhook.send_whole(true).await;
        assert!(served.starts_with("HTTP/1.1 200 "), "{served}");
    }
}
