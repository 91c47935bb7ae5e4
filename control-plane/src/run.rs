//! Start-up and shutdown of the control plane process, in order: every port
//! bound (gRPC, admin, and the webhook when `--webhook` is given: one that
//! cannot be fails the start naming its flag, before anything is made),
//! state dir, CA (files, or the Secret with `--store kubernetes`) and its
//! trust bundle (its root and the `--trust-anchors`), operator credential,
//! store (the embedded database, or the Kubernetes watches listed once),
//! discovery, the TokenReview client and the webhook's certificate and
//! settings, then the ports served;
//! SIGTERM/SIGINT ends the Watch streams first, then stops accepting
//! everywhere and drains in-flight RPCs, and the requests in flight on the
//! webhook and admin ports ([`Connections`]), up to one deadline.
//!
//! Log lines worth asserting on: `trust bundle loaded` (fields `roots`, the
//! count, and `bundle`, each root's subject and expiry date) once the CA is
//! loaded, `control plane ready` (fields `grpc`, `admin`, `webhook` (an
//! address, or `off`), `trust_domain`, `store`, `state_dir`, `trust_reported_addresses`)
//! once the ports serve, and `control plane stopped` on a clean exit.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::service::interceptor::InterceptedService;
use trellis_core::io_error::IoWords;
use trellis_core::policy::{
    RELAXED_POLICY_WARNING, ValidationContext, Violation, policy_key, validate_proto_in,
};
use trellis_proto::admin::v1::admin_server::AdminServer;
use trellis_proto::admin::v1::replica_server::ReplicaServer;
use trellis_proto::discovery::v1::MeshConfig;
use trellis_proto::identity::v1::identity_server::IdentityServer;

use crate::admin_http::AdminHttp;
use crate::api::admin::{AdminService, MAX_ADMIN_REQUEST_BYTES};
use crate::api::discovery::DiscoveryService;
use crate::api::discovery_server::DiscoveryServer;
use crate::api::identity::{IdentityService, MAX_CERTIFY_REQUEST_BYTES};
use crate::api::policy::stored_warnings;
use crate::api::replica::{MAX_REPLICA_REQUEST_BYTES, ReplicaService, Replicas};
use crate::api::unknown_method::UnknownMethodsLayer;
use crate::api::{AdminCalls, Mesh, OnlyCaller, UnaryRequests};
use crate::authn::tokenreview::TokenReviewer;
use crate::body_deadline::BodyDeadlineLayer;
use crate::ca::anchors::{describe_roots, expiries, report_expiring_roots};
use crate::ca::files::{
    ADMIN_CERT, ADMIN_KEY, BUNDLE, CA_CERT, CA_KEY, ensure_admin_credential, open_ca,
};
use crate::ca::secret::{NewRoot, open_ca_secret};
use crate::config::{Config, IdentityProvider, StoreKind};
use crate::discovery::Discovery;
use crate::inject::server::{ServingFiles, WebhookServer, tls_config};
use crate::inject::{InjectConfig, UninjectedPods};
use crate::metrics::Metrics;
use crate::readiness::Readiness;
use crate::server::{
    GrpcListener, InFlightLayer, ServingCert, peer_client_config, serve_connections, server_config,
};
use crate::state_dir::{Secrecy, StateDir};
use crate::store::Store;
use crate::store::embedded::{DB_FILE, EmbeddedStore, MeshHistory, read_history};
use crate::store::kubernetes::{self, KubeStoreError, KubernetesStore, SYNC_TIMEOUT};

/// How long in-flight RPCs may take to finish after a shutdown signal.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// The HTTP/2 streams one client connection of the gRPC port may have open
/// at once (hyper sets no limit of its own). Each stream may hold a
/// request being read, so this and the services' request size limits
/// bound what one connection makes the control plane buffer. A sidecar
/// opens a connection of its own with a Watch and the odd Certify on it;
/// `trellisctl` and peer replicas make a few calls at once, and the
/// control-plane benchmark at most 32 on one connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 100;

/// The largest reflection request read (a message of the reflection
/// stream); a larger one ends the stream with RESOURCE_EXHAUSTED naming
/// this limit (`crate::reflection`). Reflection is served without a
/// client certificate, so that `grpcurl` lists and describes the services;
/// its requests name a file or a symbol, well under this, and tonic's
/// default of 4 MiB would let anyone make each of a connection's
/// [`MAX_STREAMS_PER_CONNECTION`] streams buffer that much.
pub const MAX_REFLECTION_REQUEST_BYTES: usize = 4 * 1024;

/// The services of the gRPC port, as an unknown method's answer names
/// them.
const GRPC_SERVICES: &[&str] = &[
    trellis_proto::identity::v1::identity_server::SERVICE_NAME,
    <DiscoveryServer as tonic::server::NamedService>::NAME,
    trellis_proto::admin::v1::admin_server::SERVICE_NAME,
    trellis_proto::admin::v1::replica_server::SERVICE_NAME,
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// Why the control plane could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    StateDir(#[from] crate::state_dir::StateDirError),
    #[error(transparent)]
    CaFiles(#[from] crate::ca::CaFilesError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Server(#[from] crate::server::ServerError),
    /// A port that cannot be bound (in use, an address not on this host),
    /// named by its flag: `--listen`, `--admin` or `--webhook`.
    #[error("{flag} {addr}: {}", IoWords(source))]
    Bind {
        flag: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("webhook serving certificate: {0}")]
    WebhookTls(#[from] crate::inject::server::TlsFilesError),
    #[error(transparent)]
    InjectSettings(#[from] crate::inject::InvalidSettings),
    #[error(transparent)]
    KubeApi(#[from] crate::authn::tokenreview::KubeSetupError),
    #[error(transparent)]
    KubeStore(#[from] KubeStoreError),
    #[error(transparent)]
    CaSecret(#[from] crate::ca::secret::CaSecretError),
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
    /// The generated CA's files are missing from a state dir whose
    /// database shows a mesh lived on it: a new root would split the mesh.
    #[error(
        "the state dir {dir} holds no {cert} nor {key}, but its database {database} shows a mesh \
         lived on it ({history}), and running sidecars trust that mesh's root only; refusing to \
         generate a new one, and nothing was written. Restore ca.crt and ca.key from the backup \
         they were taken with (the one trellis.redb came from); or, to start a new root on \
         purpose, start the control plane with --new-root (TRELLIS_NEW_ROOT=true) once: every \
         sidecar must then trust the new root first or be re-enrolled (README, \"Rotating the \
         root\")"
    )]
    LostRoot {
        dir: String,
        cert: String,
        key: String,
        database: String,
        /// What the database records, in words ([`MeshHistory`]).
        history: String,
    },
    /// A write to the embedded database met an I/O error; the database
    /// refuses writes until reopened, which the next start does.
    #[error(
        "the state database {path} failed a write ({reason}); stopped so that the next start reopens it: free the volume's space or fix the disk, then start again"
    )]
    DatabaseFailed { path: String, reason: String },
    /// A stored policy that the new mesh config makes invalid: sidecars
    /// would refuse every snapshot holding it, so the control plane does not
    /// start (exit 64, like any invalid configuration).
    #[error(
        "--opaque-ports: the stored policy {policy} cannot be enforced with these opaque ports ({violation}); change or delete it first, or leave the port out"
    )]
    OpaquePorts { policy: String, violation: String },
}

impl RunError {
    /// Whether the configuration, not the environment, is at fault.
    pub fn is_usage(&self) -> bool {
        matches!(self, RunError::OpaquePorts { .. })
    }
}

/// Refuses mesh-wide opaque ports that a stored policy has L7 rules on,
/// and logs what stored documents fail of checks added since they were
/// stored (with `report_relaxed`: the Kubernetes store logs what it reads
/// itself), such as a selector outside the document's namespace outside
/// the root namespace: enforced as written, named with its pattern, so
/// that operators move or narrow it.
fn check_stored_policies(
    store: &dyn Store,
    config: &Config,
    report_relaxed: bool,
) -> Result<(), RunError> {
    let policies = store.policies()?;
    // Stored policies: a check added since one was stored relaxes to what
    // can still be enforced, it does not stop the control plane.
    let context = ValidationContext {
        stored: true,
        ..config.validation_context()
    };
    if !config.opaque_ports.is_empty() {
        for policy in &policies {
            let Err(violations) = validate_proto_in(policy, &config.trust_domain, &context) else {
                continue;
            };
            if let Some(error) = violations.iter().find(|v| v.is_error()) {
                return Err(RunError::OpaquePorts {
                    policy: policy_key(&policy.namespace, &policy.name),
                    violation: error.to_string(),
                });
            }
        }
    }
    if !report_relaxed {
        return Ok(());
    }
    let rate_limits = store.rate_limits()?;
    for w in stored_warnings(&policies, &rate_limits, &config.trust_domain, &context) {
        let problem = w.violation.as_ref().map(Violation::from_proto);
        tracing::warn!(
            kind = %w.kind,
            policy = %policy_key(&w.namespace, &w.name),
            problem = %problem.map(|v| v.to_string()).unwrap_or_default(),
            "{RELAXED_POLICY_WARNING}"
        );
    }
    Ok(())
}

/// How long a stopping replica waits for its Watch streams to end before
/// it stops listening all the same. A stream ends at once, even to a
/// sidecar that stopped reading; this bounds what nothing else does.
pub const STREAMS_DEADLINE: Duration = Duration::from_secs(5);

/// Stops in order: the Watch streams first (`streams` turns true), then,
/// once none is open on `discovery` or after `deadline`, the listeners
/// (`listeners` turns true). A replica that refuses connections thus holds
/// no stream, which is what `policy apply --wait` on another replica takes
/// a refusal to mean: it does not wait for that replica's sidecars, as
/// they are already reconnecting elsewhere. Returns how many streams were
/// still open when the listeners stopped.
async fn stop_in_order(
    discovery: &Discovery,
    streams: &watch::Sender<bool>,
    listeners: &watch::Sender<bool>,
    deadline: Duration,
) -> usize {
    let _ = streams.send(true);
    let _ = tokio::time::timeout(deadline, discovery.streams_closed()).await;
    let left = discovery.streams_open();
    let _ = listeners.send(true);
    left
}

/// The connections of an HTTP port (the admin port, the webhook port),
/// each served by a task of its own. A port hands them over once it stops
/// accepting, each told to close once the answer in progress is written
/// (an idle one at once), for the stop to wait for ([`Self::drain`]).
#[derive(Debug, Default)]
pub struct Connections(tokio::task::JoinSet<()>);

impl Connections {
    /// Serves a connection: `serve` runs until it has closed.
    pub(crate) fn serve(&mut self, serve: impl Future<Output = ()> + Send + 'static) {
        self.0.spawn(serve);
    }

    /// Resolves once a connection has closed, and forgets it (a port
    /// serving for months keeps none of those it served); never while none
    /// is open.
    pub(crate) async fn closed(&mut self) {
        if self.0.join_next().await.is_none() {
            std::future::pending::<()>().await;
        }
    }

    /// The connections still open (or closed and not yet forgotten).
    pub fn open(&self) -> usize {
        self.0.len()
    }

    /// Waits until every connection has closed, or until `deadline`: those
    /// still open then are closed without their answer. Returns how many
    /// were.
    pub async fn drain(mut self, deadline: tokio::time::Instant) -> usize {
        let all_closed = async { while self.0.join_next().await.is_some() {} };
        if tokio::time::timeout_at(deadline, all_closed).await.is_ok() {
            return 0;
        }
        self.0.abort_all();
        let mut cut = 0;
        while let Some(ended) = self.0.join_next().await {
            if ended.is_err_and(|e| e.is_cancelled()) {
                cut += 1;
            }
        }
        cut
    }
}

/// An HTTP port's listener as the port runs and stops: the connections it
/// accepts until the port's stop, then, without waiting, those it still
/// queued ([`crate::net::queued`]: closing it with them queued would reset
/// them), each said to be taken after the stop, then none.
pub(crate) struct Accepting {
    listener: Option<TcpListener>,
    queued: std::vec::IntoIter<(tokio::net::TcpStream, SocketAddr)>,
    /// The port, as its accept failures are logged.
    port: &'static str,
}

impl Accepting {
    pub(crate) fn new(listener: TcpListener, port: &'static str) -> Self {
        Self {
            listener: Some(listener),
            queued: Vec::new().into_iter(),
            port,
        }
    }

    /// The next connection to serve and whether it was taken after the
    /// port's `stop` (its first request is then its last); `None` once the
    /// stop's queue is served. The stop is seen before a connection
    /// accepted with it, and `connections` forgets those that closed while
    /// this waits.
    pub(crate) async fn next<F: Future<Output = ()>>(
        &mut self,
        mut stop: Pin<&mut F>,
        connections: &mut Connections,
    ) -> Option<(tokio::net::TcpStream, SocketAddr, bool)> {
        loop {
            let Some(accepting) = &self.listener else {
                return self.queued.next().map(|(tcp, client)| (tcp, client, true));
            };
            tokio::select! {
                // The stop first: a connection queued then is taken with
                // the others.
                biased;
                () = stop.as_mut() => {
                    let listener = self.listener.take().expect("accepting");
                    self.queued = crate::net::queued(listener).into_iter();
                }
                () = connections.closed() => {}
                accepted = accepting.accept() => match accepted {
                    Ok((tcp, client)) => return Some((tcp, client, false)),
                    Err(e) => {
                        tracing::warn!(error = %e, "{} accept failed", self.port);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
    }
}

/// Binds `addr`, the address of `flag`, or says which flag could not be.
fn bind(flag: &'static str, addr: SocketAddr) -> Result<TcpListener, RunError> {
    crate::net::bind(addr).map_err(|source| RunError::Bind { flag, addr, source })
}

/// Resolves once `shutdown` turns true (or its sender is gone).
pub async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stopping| *stopping).await;
}

pub async fn run(config: Config) -> Result<(), RunError> {
    // One descriptor per connected sidecar: 10,000 sidecars need more than
    // the usual soft limit, and raising it to the hard one is always allowed.
    trellis_core::open_files::raise_and_log("fewer sidecars can connect");
    // Every port first: one in use fails the start naming its flag, before
    // the state dir, a CA or anything else is made. Connections wait in the
    // backlog until the ports serve.
    let grpc_port = bind("--listen", config.listen)?;
    let admin_port = bind("--admin", config.admin)?;
    let webhook_port = match config.webhook {
        Some(addr) => Some(bind("--webhook", addr)?),
        None => None,
    };
    let dir = StateDir::open(&config.state_dir)?;
    // Only the embedded database stops the control plane when it fails.
    let mut write_failure = None;
    // The state dir's own lock, held until `run` returns: what tells
    // another control plane's start, whichever its store, that this one
    // writes there.
    let _dir_lock;
    let (ca, store, store_changes, watches): (_, Arc<dyn Store>, _, _) = match (
        config.store,
        &config.kube,
    ) {
        (StoreKind::Kubernetes, Some(api)) => {
            // Before this process writes here: no database's lock keeps
            // another control plane off the directory, so its own lock does.
            _dir_lock = lock_and_clean(&dir, false)?;
            let client = kubernetes::client(api)?;
            let (namespace, secret) = (
                config.namespace.as_deref().unwrap_or_default(),
                config.ca_secret.as_deref().unwrap_or_default(),
            );
            let new_root = if config.ca_secret_new_root {
                NewRoot::Deliberate
            } else {
                NewRoot::FirstInstall
            };
            let td = &config.trust_domain;
            let ca = open_ca_secret(client.clone(), namespace, secret, td, new_root)
                .await?
                .with_trust_anchors(&config.trust_anchor_roots);
            dir.write_if_changed(BUNDLE, ca.bundle_pem().as_bytes(), Secrecy::Public)?;
            let (td, context) = (config.trust_domain.clone(), config.validation_context());
            let grace = config.watch_failure_grace;
            let store =
                KubernetesStore::connect_with_watch_grace(client, td, context, SYNC_TIMEOUT, grace)
                    .await
                    .map_err(|e| match e {
                        // As a stored policy of the embedded store: exit 64.
                        KubeStoreError::OpaquePorts {
                            policy, violation, ..
                        } => RunError::OpaquePorts { policy, violation },
                        e => e.into(),
                    })?;
            tracing::info!(api = %api.url, "policies from CRDs, endpoints from Pods, CA from Secret {namespace}/{secret}");
            let changes = store.changes();
            let watches = store.watch_health();
            (
                ca,
                Arc::new(store) as Arc<dyn Store>,
                Some(changes),
                Some(watches),
            )
        }
        _ => {
            // The database first: its lock is what keeps a second control
            // plane off this state dir, and it must be held before the CA
            // files are read, generated or `bundle.pem` rewritten (two
            // starts on an empty dir would each write a root of their own).
            refuse_an_emptied_database(&dir)?;
            let operator_ca = config.ca_cert.as_deref().zip(config.ca_key.as_deref());
            // Read-only, before the open writes to the database.
            let replacing = match operator_ca {
                Some(_) => None,
                None => refuse_a_lost_root(&dir, config.new_root)?,
            };
            let store = Arc::new(EmbeddedStore::open(&dir.path(DB_FILE))?);
            // Under the database's lock no other control plane on the
            // embedded store writes here now; under the directory's, none
            // on the Kubernetes store either.
            _dir_lock = lock_and_clean(&dir, true)?;
            let ca = open_ca(
                &dir,
                &config.trust_domain,
                operator_ca,
                &config.trust_anchor_roots,
            )?;
            if let Some(history) = replacing {
                tracing::warn!(
                    cert = %crate::escape::shown(&dir.path(CA_CERT)),
                    history = %history,
                    "generated a new root CA on --new-root, replacing the one missing from the \
                     state dir: sidecars started before trust the old root only; re-enroll every \
                     sidecar or give it the new bundle.pem, and remove the flag"
                );
            }
            write_failure = Some(store.write_failure());
            (ca, store as Arc<dyn Store>, None, None)
        }
    };
    let ca = Arc::new(ca);
    // Subjects and expiry dates only: roots are public, and short enough
    // for one line.
    tracing::info!(
        roots = ca.bundle().len(),
        bundle = describe_roots(ca.bundle()),
        "trust bundle loaded"
    );
    ensure_admin_credential(&dir, &ca)?;
    // The Kubernetes store (the one with changes to follow) logs what the
    // objects it reads fail itself, as it reads them.
    check_stored_policies(store.as_ref(), &config, store_changes.is_none())?;
    let mesh_config = MeshConfig {
        default_policy: config.default_policy.as_str().to_string(),
        outbound_policy: config.outbound_policy.as_str().to_string(),
        opaque_ports: config.opaque_ports.iter().map(|p| u32::from(*p)).collect(),
    };
    let bundle = ca.bundle().iter().map(|c| c.to_vec()).collect();
    let discovery = Discovery::new(store.clone(), bundle, mesh_config)?
        .with_root_namespace(&config.root.root_namespace);
    let discovery = Arc::new(discovery);
    // Two steps, in order: the Watch streams end, then the listeners and
    // the background tasks stop.
    let (streams_tx, streams_rx) = watch::channel(false);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    tokio::spawn(discovery.clone().expire_endpoints(shutdown_rx.clone()));
    if let Some(changes) = store_changes {
        tokio::spawn(follow_store(
            discovery.clone(),
            changes,
            shutdown_rx.clone(),
        ));
    }
    let metrics = Arc::new(Metrics::default());
    let roots = expiries(ca.bundle());
    metrics.trust_bundle(roots.iter().map(|(_, at)| *at).collect());
    metrics.signing_chain(ca.signs_until().unix_timestamp());
    tokio::spawn(report_expiring_roots(roots, shutdown_rx.clone()));

    let reviewer = match (&config.kube, config.identity_provider) {
        (Some(api), IdentityProvider::Kubernetes) => {
            let reviewer = TokenReviewer::new(api, config.trust_domain.clone())?;
            tracing::info!(api = %api.url, "service account tokens are checked with TokenReview");
            Some(Arc::new(reviewer))
        }
        _ => None,
    };
    let webhook_setup = match (webhook_port, &config.webhook_cert, &config.webhook_key) {
        (Some(port), Some(cert), Some(key)) => {
            let files = Arc::new(ServingFiles::load(cert, key)?.with_metrics(metrics.clone()));
            // Without webhook calls the files are still checked, so that the
            // expiry metric follows a renewal.
            tokio::spawn(files.clone().recheck_every(shutdown_rx.clone()));
            let mut inject = InjectConfig::from_settings(
                config.inject_settings.as_deref().unwrap_or("{}"),
                config.trust_domain.clone(),
                ca.bundle_pem(),
            )?;
            inject.validation = config.validation_context();
            inject.outbound_policy = config.outbound_policy;
            Some((port, tls_config(files)?, inject))
        }
        _ => None,
    };

    let serving = ServingCert::new(ca.clone(), &config.dns_names, config.listen.ip())?;
    let tls = server_config(&ca, serving.clone())?;
    let grpc = GrpcListener::new(grpc_port, tls)
        .with_max_connections_per_client(config.max_grpc_connections_per_client);
    let replicas = Arc::new(Replicas::new(
        config.replica_name.clone(),
        grpc.local_addr().map_err(RunError::Signal)?.to_string(),
        config.peers.clone(),
        peer_client_config(&ca, serving.clone())?,
    ));
    // With the Kubernetes store: peers asked for a healthier replica while
    // a policy watch keeps failing.
    let readiness = watches.clone().map(|watches| {
        let peers = (!config.peers.is_empty()).then(|| replicas.clone());
        Arc::new(Readiness::new(watches, peers))
    });
    if let Some(readiness) = &readiness {
        tokio::spawn(readiness.clone().run(shutdown_rx.clone()));
    }
    if !config.peers.is_empty() {
        tracing::info!(
            replica = %replicas.name,
            peers = %trellis_core::logging::List(&config.peers),
            "ListWorkloads joins the streams of the peer replicas"
        );
    }
    let admin = AdminHttp::new(admin_port);
    let webhook = webhook_setup.map(|(port, tls, inject)| (WebhookServer::new(port, tls), inject));
    let webhook_addr = match &webhook {
        Some((server, _)) => server.local_addr().map_err(RunError::Signal)?.to_string(),
        None => "off".to_owned(),
    };
    let grpc_addr = grpc.local_addr().map_err(RunError::Signal)?;
    let admin_addr = admin.local_addr().map_err(RunError::Signal)?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(RunError::Signal)?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(RunError::Signal)?;
    tokio::spawn(serving.clone().renew_until(shutdown_rx.clone()));

    // What the webhook admits without a sidecar, for ListWorkloads.
    let uninjected = Arc::new(UninjectedPods::default());
    let mesh = Mesh {
        trust_domain: config.trust_domain.clone(),
        ca: ca.clone(),
        store,
        discovery: discovery.clone(),
        metrics: metrics.clone(),
        cert_ttl: config.cert_ttl,
        shutdown: streams_rx,
        uninjected: uninjected.clone(),
    };
    let reflection_v1 = crate::reflection::v1(trellis_proto::FILE_DESCRIPTOR_SET)?;
    let reflection_v1alpha = crate::reflection::v1alpha(trellis_proto::FILE_DESCRIPTOR_SET)?;
    let incoming = grpc.run(shutdown_rx.clone(), metrics.clone());
    let identity = Arc::new(
        IdentityService::new(mesh.clone())
            .with_token_reviewer(reviewer)
            .trusting_reported_addresses(config.trust_reported_addresses)
            .renewals_needing_token(config.renewals_need_token()),
    );
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .layer(InFlightLayer)
        .layer(BodyDeadlineLayer)
        .layer(UnknownMethodsLayer::new(GRPC_SERVICES))
        .add_service(
            UnaryRequests::limited(
                IdentityServer::from_arc(identity.clone())
                    .max_decoding_message_size(MAX_CERTIFY_REQUEST_BYTES),
                MAX_CERTIFY_REQUEST_BYTES,
            )
            // Counted and logged as the refusals Certify makes itself.
            .refusing_with(Arc::new(move |reason, status| {
                identity.refuse(reason, status)
            })),
        )
        // Reads Watch requests up to its own `MAX_WATCH_REQUEST_BYTES`.
        .add_service(DiscoveryServer::new(DiscoveryService::new(mesh.clone())))
        // The interceptor refuses a caller before its request is read.
        .add_service(InterceptedService::new(
            UnaryRequests::limited(
                ReplicaServer::new(
                    ReplicaService::new(mesh.clone(), replicas.clone()).with_watches(watches),
                )
                .max_decoding_message_size(MAX_REPLICA_REQUEST_BYTES),
                MAX_REPLICA_REQUEST_BYTES,
            ),
            OnlyCaller::control_plane(&config.trust_domain),
        ))
        // Every call counted and every refusal logged, the caller check's
        // among them.
        .add_service(AdminCalls::new(
            InterceptedService::new(
                UnaryRequests::limited(
                    AdminServer::new(AdminService::new(mesh, replicas))
                        .max_decoding_message_size(MAX_ADMIN_REQUEST_BYTES),
                    MAX_ADMIN_REQUEST_BYTES,
                ),
                OnlyCaller::admin(&config.trust_domain),
            ),
            metrics.clone(),
        ))
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    // Each connection is served on its own, so that one left idle can be
    // closed gracefully while the others go on.
    let serve = serve_connections(
        incoming,
        shutdown_rx.clone(),
        metrics.clone(),
        config.grpc_idle_timeout,
        move |conn, closing| {
            let one = futures::stream::iter([Ok::<_, std::io::Error>(conn)])
                .chain(futures::stream::pending());
            router.clone().serve_with_incoming_shutdown(one, closing)
        },
    );
    let ready = Arc::new(AtomicBool::new(false));
    // Each HTTP port hands over its open connections once it stops
    // accepting, for the drain to wait for.
    let webhook = webhook.map(|(server, inject)| {
        // The sender lives as long as the webhook. The bundle is fixed for
        // the life of the process: a change of the signing CA or of the
        // trust anchors takes a restart.
        let (inject_tx, inject_rx) = watch::channel(Arc::new(inject));
        let mut stop = shutdown_rx.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let open = server
                .run(inject_rx, metrics, uninjected, async move {
                    stopping(&mut stop).await
                })
                .await;
            drop(inject_tx);
            open
        })
    });
    let admin = tokio::spawn(admin.run(
        ready.clone(),
        metrics,
        discovery.clone(),
        readiness,
        shutdown_rx,
    ));
    tokio::pin!(serve);
    ready.store(true, Ordering::Release);
    tracing::info!(
        grpc = %grpc_addr,
        admin = %admin_addr,
        webhook = %webhook_addr,
        trust_domain = %config.trust_domain,
        store = %config.store.as_str(),
        state_dir = %crate::escape::shown(&config.state_dir),
        trust_reported_addresses = config.trust_reported_addresses,
        "control plane ready"
    );

    let database_failed = async {
        match &write_failure {
            Some(failure) => failure.failed().await,
            None => std::future::pending().await,
        }
    };
    let mut failed = None;
    let signal = tokio::select! {
        () = &mut serve => return Ok(()),
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT",
        reason = database_failed => {
            failed = Some(RunError::DatabaseFailed {
                path: crate::escape::shown(&dir.path(DB_FILE)),
                reason,
            });
            "none (a failed database write)"
        }
    };
    ready.store(false, Ordering::Release);
    tracing::info!(
        signal,
        watch_streams = discovery.streams_open(),
        "shutting down: ending the Watch streams, so their sidecars reconnect to another replica"
    );
    let stopped = stop_in_order(&discovery, &streams_tx, &shutdown_tx, STREAMS_DEADLINE);
    tokio::pin!(stopped);
    // Serving goes on meanwhile: the listener still accepts, and a stream
    // opened now ends at once.
    let left = tokio::select! {
        () = &mut serve => return Ok(()),
        left = &mut stopped => left,
    };
    if left > 0 {
        tracing::warn!(
            watch_streams = left,
            deadline = ?STREAMS_DEADLINE,
            "Watch streams still open at their deadline; they close with their connections"
        );
    }
    tracing::info!(
        deadline = ?DRAIN_DEADLINE,
        "no new connections, draining in-flight calls"
    );
    // One deadline for the gRPC calls and the HTTP ports' requests alike.
    let deadline = tokio::time::Instant::now() + DRAIN_DEADLINE;
    let grpc = async {
        if tokio::time::timeout_at(deadline, &mut serve).await.is_err() {
            tracing::warn!(
                deadline = ?DRAIN_DEADLINE,
                "calls still open at the drain deadline; closing them"
            );
        }
    };
    tokio::join!(
        grpc,
        drain_port("webhook", webhook, deadline),
        drain_port("admin", Some(admin), deadline),
    );
    if let Some(failed) = failed {
        return Err(failed);
    }
    tracing::info!("control plane stopped");
    Ok(())
}

/// Waits for the connections of the HTTP port `port` (its task, once it
/// stops accepting, hands them over) until `deadline`, and says how many
/// were cut then.
async fn drain_port(
    port: &'static str,
    task: Option<tokio::task::JoinHandle<Connections>>,
    deadline: tokio::time::Instant,
) {
    let Some(Ok(open)) = futures::future::OptionFuture::from(task).await else {
        return;
    };
    let cut = open.drain(deadline).await;
    if cut > 0 {
        tracing::warn!(
            port,
            connections = cut,
            deadline = ?DRAIN_DEADLINE,
            "{port} connections still open at the drain deadline; cut, their answers unwritten"
        );
    }
}

/// Announces what the Kubernetes store's watches changed: discovery reloads
/// its view (and the Watch streams push) after every change of content,
/// until the store stops or `shutdown` turns true.
async fn follow_store(
    discovery: Arc<Discovery>,
    mut changes: watch::Receiver<u64>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = stopping(&mut shutdown) => return,
        }
        let discovery = discovery.clone();
        match tokio::task::spawn_blocking(move || discovery.refresh()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "could not reload the discovery view"),
            Err(_) => return,
        }
    }
}

/// Refuses a database file of no bytes beside a CA. redb would make it a
/// new, empty database, and the state it held (policies, join tokens,
/// workloads, revocations: a revoked identity would renew again) would be
/// gone without a word. With the operator credential beside it, no crash
/// leaves that: every release writes `admin.crt`/`admin.key` only once the
/// database is made. Without it, a first start of a release that generated
/// the CA first, killed while redb made the file, leaves it, and then it
/// held nothing; but so does a lived state dir whose database was emptied
/// and whose credential was lost or moved, and the files cannot tell the
/// two apart: the operator, who knows which it is, removes the file.
fn refuse_an_emptied_database(dir: &StateDir) -> Result<(), crate::store::StoreError> {
    let path = dir.path(DB_FILE);
    let present = |name: &str| std::fs::symlink_metadata(dir.path(name)).is_ok();
    let empty = std::fs::metadata(&path).is_ok_and(|m| m.is_file() && m.len() == 0);
    if !empty || !(present(CA_CERT) || present(CA_KEY)) {
        return Ok(());
    }
    let reason = if present(ADMIN_CERT) || present(ADMIN_KEY) {
        format!(
            "the file is empty, though the state dir holds a CA and the operator credential \
             ({ADMIN_CERT}), which are written only once the database is made: the state it \
             held is lost (a copy or restore cut short?); it is left as it is: restore the \
             state dir from a backup taken while the control plane was stopped, or remove the \
             empty file to start with an empty store"
        )
    } else {
        format!(
            "the file is empty beside a CA but no operator credential ({ADMIN_CERT}, \
             {ADMIN_KEY}), and it is left as it is: if this state dir never served (a first \
             start of an earlier release killed while making the database leaves just this, \
             holding nothing), remove the empty file to start; if it served a mesh, its \
             database was emptied and its credential lost or moved, and its policies, join \
             tokens and revocations are gone: restore the state dir from a backup taken while \
             the control plane was stopped"
        )
    };
    Err(crate::store::StoreError::Database {
        path: crate::escape::shown(&path),
        reason,
    })
}

/// Refuses to let a root be generated over a mesh that lived: `ca.crt`
/// and `ca.key` both missing (one alone is refused by `open_ca`) beside a
/// database holding issued certificates, workloads or join tokens (a
/// restore without the CA files, a careless clean-up). Reads the database
/// without writing to it. With `new_root` the operator starts a new root
/// on purpose: returns what the database holds, for the warning once the
/// root is generated. A fresh state dir (no database, or one holding
/// nothing) generates as on a first start.
fn refuse_a_lost_root(dir: &StateDir, new_root: bool) -> Result<Option<MeshHistory>, RunError> {
    let (cert, key) = (dir.path(CA_CERT), dir.path(CA_KEY));
    let present = |path: &std::path::Path| std::fs::symlink_metadata(path).is_ok();
    if present(&cert) || present(&key) {
        if new_root {
            tracing::warn!(
                cert = %crate::escape::shown(&cert),
                "--new-root has no effect: the state dir holds a CA; remove the flag, which \
                 would let lost CA files become a new root"
            );
        }
        return Ok(None);
    }
    let database = dir.path(DB_FILE);
    let history = read_history(&database)?.unwrap_or_default();
    if new_root {
        return Ok(Some(history));
    }
    if history.is_empty() {
        return Ok(None);
    }
    Err(RunError::LostRoot {
        dir: crate::escape::shown(dir.root()),
        cert: CA_CERT.to_owned(),
        key: CA_KEY.to_owned(),
        database: crate::escape::shown(&database),
        history: history.to_string(),
    })
}

/// Takes the state dir's lock and, holding it, removes the temporary files
/// a crash left there ([`remove_stale_temp_files`]); returns the lock, to
/// be held for as long as this process runs. Call it before this process
/// writes in the directory. Where another process holds the lock its
/// files may be live, and are left, with a warning; where the file system
/// takes no locks they are left too, unless `database_locked` (the
/// embedded database's lock, held, says no other control plane on that
/// store runs here).
fn lock_and_clean(
    dir: &StateDir,
    database_locked: bool,
) -> Result<Option<std::fs::File>, crate::state_dir::StateDirError> {
    use crate::state_dir::DirLock;
    let state_dir = crate::escape::shown(dir.root());
    match dir.try_lock()? {
        DirLock::Held(lock) => {
            remove_stale_temp_files(dir)?;
            Ok(Some(lock))
        }
        DirLock::HeldElsewhere => {
            tracing::warn!(
                state_dir = %state_dir,
                "another process holds the state dir's lock (is a second control plane running \
                 with this --state-dir?): temporary files a crash left there are not removed, as \
                 they may be its writes in progress"
            );
            Ok(None)
        }
        DirLock::Unsupported(e) => {
            if database_locked {
                remove_stale_temp_files(dir)?;
            } else {
                tracing::warn!(
                    state_dir = %state_dir,
                    error = %trellis_core::io_error::IoWords(&e),
                    "the state dir's file system takes no locks: nothing keeps a second control \
                     plane off it, and temporary files a crash left there are not removed"
                );
            }
            Ok(None)
        }
    }
}

/// Removes the temporary files of the state dir's writes that a process
/// killed mid-write left (one per write cut short, never reused by a
/// restart's new pid, or a container's same pid 1), saying which. Only
/// before this process writes there, while what keeps other control
/// planes off the directory is held ([`lock_and_clean`]).
fn remove_stale_temp_files(dir: &StateDir) -> Result<(), crate::state_dir::StateDirError> {
    let names = [CA_CERT, CA_KEY, BUNDLE, ADMIN_CERT, ADMIN_KEY];
    for name in dir.remove_stale_temp_files(&names)? {
        tracing::info!(
            file = %crate::escape::shown(&dir.path(&name)),
            "removed a temporary file a write cut short by a crash left in the state dir"
        );
    }
    Ok(())
}

/// For tests of background tasks: the task `start` makes from a shutdown
/// receiver keeps running through `patience` of (paused) time, then ends
/// within as long once the shutdown is sent.
#[cfg(test)]
pub(crate) async fn assert_runs_until_shutdown<F>(
    patience: Duration,
    start: impl FnOnce(watch::Receiver<bool>) -> F,
) where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let (stop, shutdown) = watch::channel(false);
    let mut task = tokio::spawn(start(shutdown));
    assert!(
        tokio::time::timeout(patience, &mut task).await.is_err(),
        "ended before the shutdown"
    );
    stop.send(true).unwrap();
    tokio::time::timeout(patience, task)
        .await
        .expect("still running after the shutdown")
        .unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_core::SpiffeId;

    fn discovery(tmp: &tempfile::TempDir) -> Arc<Discovery> {
        let store = Arc::new(EmbeddedStore::open(&tmp.path().join(DB_FILE)).unwrap());
        Arc::new(Discovery::new(store, Vec::new(), MeshConfig::default()).unwrap())
    }

    /// The listeners stop only once the last Watch stream has ended: a
    /// replica that refuses connections holds no stream.
    #[tokio::test]
    async fn the_listeners_stop_after_the_last_watch_stream_ends() {
        let tmp = tempfile::tempdir().unwrap();
        let discovery = discovery(&tmp);
        let web = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/web").unwrap();
        let api = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/api").unwrap();
        let first = discovery.open_stream(&web, None, Vec::new());
        let second = discovery.open_stream(&api, None, Vec::new());
        assert_eq!(discovery.streams_open(), 2);
        let (streams_tx, mut streams) = watch::channel(false);
        let (listeners_tx, listeners) = watch::channel(false);

        let stopped = {
            let discovery = discovery.clone();
            tokio::spawn(async move {
                stop_in_order(
                    &discovery,
                    &streams_tx,
                    &listeners_tx,
                    Duration::from_secs(3600),
                )
                .await
            })
        };
        stopping(&mut streams).await;
        assert!(!*listeners.borrow(), "listening while two streams end");
        drop(first);
        tokio::task::yield_now().await;
        assert!(!*listeners.borrow(), "listening while one stream ends");
        drop(second);
        assert_eq!(stopped.await.unwrap(), 0, "no stream left open");
        assert!(*listeners.borrow(), "the listeners stopped");
    }

    /// A stream that never ends (its sidecar stopped reading) holds the
    /// listeners only until the deadline, and is counted as left open.
    #[tokio::test]
    async fn a_stream_that_never_ends_holds_the_listeners_only_until_the_deadline() {
        let tmp = tempfile::tempdir().unwrap();
        let discovery = discovery(&tmp);
        let web = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/web").unwrap();
        let _stuck = discovery.open_stream(&web, None, Vec::new());
        let (streams_tx, streams) = watch::channel(false);
        let (listeners_tx, listeners) = watch::channel(false);
        let deadline = Duration::from_millis(50);
        let left = stop_in_order(&discovery, &streams_tx, &listeners_tx, deadline).await;
        assert_eq!(left, 1);
        assert!(*streams.borrow() && *listeners.borrow());
    }

    /// With no stream open the listeners stop at once, not at the
    /// deadline (an hour here, which the test would not outlive).
    #[tokio::test]
    async fn with_no_stream_open_the_listeners_stop_at_once() {
        let tmp = tempfile::tempdir().unwrap();
        let discovery = discovery(&tmp);
        let (streams_tx, _streams) = watch::channel(false);
        let (listeners_tx, listeners) = watch::channel(false);
        let hour = Duration::from_secs(3600);
        let stopped = tokio::time::timeout(
            Duration::from_secs(60),
            stop_in_order(&discovery, &streams_tx, &listeners_tx, hour),
        );
        assert_eq!(stopped.await, Ok(0), "stopped without waiting");
        assert!(*listeners.borrow());
    }

    /// The connections of an HTTP port still open at the drain deadline
    /// are closed then, and a warning names the port and how many; those
    /// that closed in time are not counted.
    #[tokio::test]
    async fn connections_open_at_the_drain_deadline_are_cut_and_counted() {
        let (logs, _guard) = crate::test_logs::capture(false);
        let mut open = Connections::default();
        let (answered_tx, answered) = tokio::sync::oneshot::channel::<()>();
        open.serve(async move {
            let _ = answered.await;
        });
        open.serve(std::future::pending());
        open.serve(std::future::pending());
        let port = tokio::spawn(async move { open });
        answered_tx.send(()).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(100);
        drain_port("webhook", Some(port), deadline).await;
        let text = logs.text();
        let line = text
            .lines()
            .find(|l| l.contains("webhook connections still open at the drain deadline"))
            .unwrap_or_else(|| panic!("no line of the cut: {text}"));
        assert!(
            line.contains("WARN")
                && line.contains("port=\"webhook\"")
                && line.contains("connections=2"),
            "{line}"
        );
    }

    /// Following the store's changes ends when the control plane shuts
    /// down, as its other background tasks do, though the store (its
    /// changes' sender here) is still open; until then it keeps following.
    #[tokio::test(start_paused = true)]
    async fn following_the_store_ends_at_shutdown() {
        let tmp = tempfile::tempdir().unwrap();
        let discovery = discovery(&tmp);
        let (_changes_tx, changes) = watch::channel(0u64);
        let day = Duration::from_secs(24 * 3600);
        let following = discovery.clone();
        assert_runs_until_shutdown(day, |shutdown| follow_store(following, changes, shutdown))
            .await;
        assert_eq!(Arc::strong_count(&discovery), 1);
    }
}
