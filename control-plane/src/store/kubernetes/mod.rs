//! The Kubernetes store (`--store kubernetes`): the API server is the
//! distributed store, every replica is stateless.
//!
//! - Policies are `AuthorizationPolicy` objects (group `trellis.io`, version
//!   `v1alpha1`, the documents `trellisctl` takes), reflected by a watch into
//!   an in-memory [`cache::Cache`], and so are `RateLimitPolicy` objects
//!   ([`KubernetesStore::rate_limits`]; the `Store` trait has no rate limits
//!   yet, so they are held, not pushed); an Admin API apply creates the
//!   object or patches its `spec` (optimistic on its resourceVersion, and
//!   leaving the metadata other tools set) and a delete deletes it, so every
//!   replica sees the write through its own watch.
//! - Mesh endpoints come from Pods: each Running, injected Pod with an IP
//!   is `pod IP:inbound port -> spiffe://TD/ns/NS/sa/SA`.
//! - Services come from Services and EndpointSlices ([`services`]): each
//!   cluster IP, external IP and load-balancer IP of a Service, with each
//!   TCP port, is a virtual address whose backends are the ready endpoints
//!   its EndpointSlices list, so a sidecar that reads one as an original
//!   destination knows where to go. Only Services with an endpoint in the
//!   mesh are published, and none with `internalTrafficPolicy: Local`.
//! - The snapshot version names the published content (see [`cache`]), so
//!   two replicas that see the same objects serve identical snapshots at
//!   the same version, and a change no sidecar would see moves nothing.
//! - Join tokens are refused: sidecars prove themselves with ServiceAccount
//!   tokens (TokenReview).
//! - Revocations are refused ([`StoreError::RevocationsUnsupported`]): the
//!   API server already says which workloads may hold an identity, so
//!   deleting the pod, or its ServiceAccount, is what stops one renewing.
//! - The issued-certificate log is a bounded ring in memory
//!   ([`ISSUED_LOG_CAPACITY`]): one API write per certificate would load the
//!   API server with every renewal of every sidecar, and the `issued SVID`
//!   log line is the durable record. Pods carry no certificate, so a
//!   listing learns each identity's newest certificate from the replicas'
//!   rings ([`Store::issued_log_view`]), each saying since when it holds
//!   every certificate its replica issued.
//!
//! The trait is synchronous and called from blocking threads; API writes
//! block on the runtime the store was connected on. Nothing here holds the
//! cache lock across an API call. A write of several policies is not one
//! transaction (Kubernetes has none): each object is written in order and
//! the first refusal stops the rest, leaving the earlier ones written.

pub mod cache;
mod issued;
pub mod objects;
mod reflect;
pub mod services;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Service as KubeService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde_json::Value;
use tokio::runtime::Handle;
use tokio::sync::{oneshot, watch};
use tokio::task::AbortHandle;
use trellis_core::TrustDomain;
use trellis_core::policy::{ValidationContext, policy_key};
use trellis_proto::admin::v1::RateLimitRecord;
use trellis_proto::policy::v1::{Policy, RateLimit};

use self::cache::{Entry, Kind, Reflected, numeric};
use self::issued::IssuedRing;
use self::objects::{
    Converted, authorization_policy_resource, endpoints_from_pod, new_object, object_key,
    policy_from_object, policy_spec, rate_limit_from_object, rate_limit_resource, rate_limit_spec,
    spec_patch, warn_relaxed,
};
pub use self::reflect::WatchHealth;
use self::reflect::{Convert, Reading, Shared, reflect};
use self::services::{SERVICE_NAME_LABEL, slice_backends, virtual_ips};
use super::{
    AppliedDocuments, AppliedPolicy, DiscoveryState, EndpointChange, Generation, IssuanceProof,
    IssuedCertRecord, IssuedLogView, JoinToken, PolicyOutcome, Position, Store, StoreError,
    TokenClaim, TokenRefusal, WorkloadRecord, same_content,
};
use crate::authn::tokenreview::KubeApi;

/// Issued certificates remembered per replica, newest last.
pub const ISSUED_LOG_CAPACITY: usize = 10_000;

/// The field manager of the store's writes, as the API server records it.
const FIELD_MANAGER: &str = "trellis-control-plane";

/// How long start-up waits for the first full list of each kind.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the watch of a policy kind may keep failing before the replica
/// goes unready, if a peer replica is healthy ([`WatchHealth::unready`],
/// [`crate::readiness`]): past it, the policies it would push to a sidecar
/// moved to it may be stale, a deleted ALLOW policy among them. Long enough
/// for an API server's restart. The default of `--watch-failure-grace`.
pub const WATCH_FAILURE_GRACE: Duration = Duration::from_secs(60);

/// The Pods the store watches: only running ones can be endpoints.
pub const POD_FIELD_SELECTOR: &str = "status.phase=Running";

/// The EndpointSlices the store watches: only those of a Service (the label
/// exists) can hold its backends.
pub const SLICE_LABEL_SELECTOR: &str = SERVICE_NAME_LABEL;

/// Why the Kubernetes store (or its client) failed.
#[derive(Debug, thiserror::Error)]
pub enum KubeStoreError {
    #[error("Kubernetes API CA {path}: {message}")]
    Ca { path: String, message: String },
    #[error("Kubernetes API client: {0}")]
    Client(String),
    #[error("Kubernetes API server: listing {kind} objects failed: {message}")]
    List { kind: &'static str, message: String },
    #[error(
        "Kubernetes API server: no complete list of {kind} objects within {}",
        trellis_core::duration::Words(*timeout)
    )]
    SyncTimeout {
        kind: &'static str,
        timeout: Duration,
    },
    #[error("Kubernetes API server refused to {action}: {message}")]
    Write {
        action: String,
        message: String,
        /// The API server's HTTP status, when it answered.
        status: Option<u16>,
    },
    #[error("cannot turn policy {key} into an object: {message}")]
    Encode { key: String, message: String },
    /// A policy object the first list found that only the mesh's opaque
    /// ports make invalid: an L7 rule on one of them.
    #[error(
        "the policy object {policy} cannot be enforced with the opaque ports {ports:?}: {violation}"
    )]
    OpaquePorts {
        policy: String,
        ports: Vec<u16>,
        violation: String,
    },
}

/// A policy object (`namespace/name`) that only the mesh's opaque ports
/// make invalid, and why.
type OpaqueConflict = (String, String);

/// A write refused in the middle of an apply, naming the documents of the
/// apply written before it: there is no transaction over several
/// objects, so they stay written, and the operator must know which.
fn kept_before(e: StoreError, applied: &AppliedDocuments) -> StoreError {
    let written: Vec<String> = [
        (Kind::AuthorizationPolicy, &applied.policies),
        (Kind::RateLimitPolicy, &applied.rate_limits),
    ]
    .into_iter()
    .flat_map(|(kind, documents)| {
        documents
            .iter()
            .filter(|d| d.outcome != PolicyOutcome::Unchanged)
            .map(move |d| format!("{} {}/{}", kind.as_str(), d.namespace, d.name))
    })
    .collect();
    match e {
        StoreError::Kubernetes(KubeStoreError::Write {
            action,
            message,
            status,
        }) if !written.is_empty() => KubeStoreError::Write {
            action,
            message: format!(
                "{message} (written before it, and kept: {})",
                written.join(", ")
            ),
            status,
        }
        .into(),
        e => e,
    }
}

/// A kube-rs client for the API server of `api`: verified against its CA,
/// authenticated with the bearer token file (which kube-rs re-reads, as the
/// kubelet rotates it).
pub fn client(api: &KubeApi) -> Result<Client, KubeStoreError> {
    let ca_error = |message: String| KubeStoreError::Ca {
        path: crate::escape::shown(&api.ca),
        message,
    };
    let pem = std::fs::read(&api.ca)
        .map_err(|e| ca_error(trellis_core::io_error::IoWords(&e).to_string()))?;
    let roots = CertificateDer::pem_slice_iter(&pem)
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ca_error(format!("bad PEM: {e}")))?;
    if roots.is_empty() {
        return Err(ca_error("no PEM certificate found".into()));
    }
    let mut config = kube::Config::new(api.url.clone());
    config.root_cert = Some(roots);
    config.auth_info.token_file = Some(api.token_file.display().to_string());
    Client::try_from(config).map_err(|e| KubeStoreError::Client(e.to_string()))
}

/// A readable sentence from a kube-rs error: the API server's Status
/// message and code when there is one.
pub fn describe(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(status) => {
            format!("{} ({} {})", status.message, status.code, status.reason)
        }
        other => other.to_string(),
    }
}

/// The API server's HTTP status code in an error, if it answered.
pub fn status_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

pub struct KubernetesStore {
    shared: Arc<Shared>,
    client: Client,
    trust_domain: TrustDomain,
    /// What the watches check objects against: the mesh's opaque ports and
    /// what the policies' selectors may name.
    context: ValidationContext,
    runtime: Handle,
    issued: Mutex<IssuedRing>,
    watches: Vec<AbortHandle>,
}

impl std::fmt::Debug for KubernetesStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesStore").finish_non_exhaustive()
    }
}

impl Drop for KubernetesStore {
    fn drop(&mut self) {
        for watch in &self.watches {
            watch.abort();
        }
    }
}

impl KubernetesStore {
    /// Starts the watches and returns once every kind has been listed once;
    /// an API server error on the way (unreachable, 401, 403, a missing
    /// CRD) is returned, naming the kind.
    /// Policies are read as stored ones in a mesh of `context` (as
    /// `Config::validation_context` gives it): one selecting outside its
    /// namespace is enforced as written and logged (the webhook refuses
    /// new ones); one with L7 rules on an opaque port of `context` is
    /// skipped as invalid, since the sidecars it selects would refuse
    /// every snapshot holding it, and one the first list finds is
    /// [`KubeStoreError::OpaquePorts`], as the embedded store's start
    /// refuses such a stored policy.
    pub async fn connect(
        client: Client,
        trust_domain: TrustDomain,
        context: ValidationContext,
        sync_timeout: Duration,
    ) -> Result<Self, KubeStoreError> {
        Self::connect_with_watch_grace(
            client,
            trust_domain,
            context,
            sync_timeout,
            WATCH_FAILURE_GRACE,
        )
        .await
    }

    /// [`Self::connect`], with a policy kind's watch allowed to fail for
    /// `watch_grace` rather than [`WATCH_FAILURE_GRACE`] before the
    /// replica may go unready.
    pub async fn connect_with_watch_grace(
        client: Client,
        trust_domain: TrustDomain,
        context: ValidationContext,
        sync_timeout: Duration,
        watch_grace: Duration,
    ) -> Result<Self, KubeStoreError> {
        let shared = Arc::new(Shared::new(watch_grace));
        let mut watches = Vec::new();
        let mut firsts = Vec::new();
        let mut watch = |task: tokio::task::JoinHandle<()>, kind, first| {
            watches.push(task.abort_handle());
            firsts.push((kind, first));
        };

        // Policy objects of the first list that only the opaque ports make
        // invalid; `None` once the first lists are in.
        let opaque_conflicts: Arc<Mutex<Option<Vec<OpaqueConflict>>>> =
            Arc::new(Mutex::new(Some(Vec::new())));
        let (td, within) = (trust_domain.clone(), context.clone());
        let conflicts = opaque_conflicts.clone();
        let policies: Convert<DynamicObject> = Box::new(move |object, reading| {
            policy_from_object(object, &td, &within)
                .map(|converted| Some(Entry::Policy(logged(object, converted, reading))))
                .inspect_err(|violation| {
                    let mut conflicts = conflicts.lock().expect("not poisoned");
                    let Some(conflicts) = conflicts.as_mut() else {
                        return;
                    };
                    let without = ValidationContext {
                        opaque_ports: Vec::new(),
                        ..within.clone()
                    };
                    if policy_from_object(object, &td, &without).is_ok() {
                        conflicts.push((object_key(object), violation.clone()));
                    }
                })
        });
        let api = Api::all_with(client.clone(), &authorization_policy_resource());
        let (tx, rx) = oneshot::channel();
        let config = watcher::Config::default();
        let kind = Kind::AuthorizationPolicy;
        let task = reflect(api, config, kind, policies, shared.clone(), tx);
        watch(tokio::spawn(task), kind, rx);

        let (td, within) = (trust_domain.clone(), context.clone());
        let rate_limits: Convert<DynamicObject> = Box::new(move |object, reading| {
            rate_limit_from_object(object, &td, &within).map(|converted| {
                let (limit, revision) = logged(object, converted, reading);
                Some(Entry::RateLimit(limit, revision))
            })
        });
        let api = Api::all_with(client.clone(), &rate_limit_resource());
        let (tx, rx) = oneshot::channel();
        let config = watcher::Config::default();
        let kind = Kind::RateLimitPolicy;
        let task = reflect(api, config, kind, rate_limits, shared.clone(), tx);
        watch(tokio::spawn(task), kind, rx);

        let td = trust_domain.clone();
        let pods: Convert<Pod> =
            Box::new(move |pod, _| Ok(endpoints_from_pod(pod, &td).map(Entry::Endpoints)));
        let api = Api::<Pod>::all(client.clone());
        let (tx, rx) = oneshot::channel();
        let config = watcher::Config::default().fields(POD_FIELD_SELECTOR);
        let task = reflect(api, config, Kind::Pod, pods, shared.clone(), tx);
        watch(tokio::spawn(task), Kind::Pod, rx);

        let services: Convert<KubeService> =
            Box::new(|service, _| Ok(virtual_ips(service).map(Entry::Service)));
        let api = Api::<KubeService>::all(client.clone());
        let (tx, rx) = oneshot::channel();
        let config = watcher::Config::default();
        let task = reflect(api, config, Kind::Service, services, shared.clone(), tx);
        watch(tokio::spawn(task), Kind::Service, rx);

        let slices: Convert<EndpointSlice> =
            Box::new(|slice, _| Ok(slice_backends(slice).map(Entry::Backends)));
        let api = Api::<EndpointSlice>::all(client.clone());
        let (tx, rx) = oneshot::channel();
        let config = watcher::Config::default().labels(SLICE_LABEL_SELECTOR);
        let kind = Kind::EndpointSlice;
        let task = reflect(api, config, kind, slices, shared.clone(), tx);
        watch(tokio::spawn(task), kind, rx);

        let store = Self {
            shared,
            client,
            trust_domain,
            context,
            runtime: Handle::current(),
            issued: Mutex::new(IssuedRing::new(crate::unix_now())),
            watches,
        };
        for (kind, first) in firsts {
            let kind = kind.as_str();
            match tokio::time::timeout(sync_timeout, first).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => {
                    return Err(KubeStoreError::List {
                        kind,
                        message: watch_error(&e),
                    });
                }
                Ok(Err(_)) => {
                    return Err(KubeStoreError::List {
                        kind,
                        message: "the watch ended".into(),
                    });
                }
                Err(_) => {
                    return Err(KubeStoreError::SyncTimeout {
                        kind,
                        timeout: sync_timeout,
                    });
                }
            }
        }
        let conflicts = opaque_conflicts.lock().expect("not poisoned").take();
        if let Some((policy, violation)) = conflicts.into_iter().flatten().next() {
            return Err(KubeStoreError::OpaquePorts {
                policy,
                ports: store.context.opaque_ports.clone(),
                violation,
            });
        }
        Ok(store)
    }

    /// How the watches fare, for readiness and metrics.
    pub fn watch_health(&self) -> Arc<WatchHealth> {
        self.shared.health.clone()
    }

    /// The snapshot version after every change the watches (or writes) made.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.shared.changes.subscribe()
    }

    fn generation(&self) -> Generation {
        self.shared.read(|c| Generation {
            policies: c.policy_generation(),
            snapshot: c.version(),
            // Its versions are digests of the content: they set no epoch.
            epoch: 0,
            position: c.position(),
        })
    }

    /// The namespaced API of one of the two policy kinds.
    fn document_api(&self, kind: Kind, namespace: &str) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), namespace, &document_resource(kind))
    }

    /// Writes one object: creates it, or patches the `spec` of the version
    /// held (see [`spec_patch`]), and returns the API server's answer with
    /// the revision it gave (`metadata.generation`).
    fn write_object(
        &self,
        kind: Kind,
        key: &str,
        (namespace, name): (&str, &str),
        spec: Value,
        held_version: Option<&str>,
    ) -> Result<(DynamicObject, u64), StoreError> {
        let api = self.document_api(kind, namespace);
        let refused = |verb: &str, e: kube::Error| KubeStoreError::Write {
            action: format!("{verb} {} {key}", kind.as_str()),
            message: describe(&e),
            status: status_code(&e),
        };
        let written = self.runtime.block_on(async {
            if let Some(held) = held_version {
                return patch_spec(&api, name, &spec, held)
                    .await
                    .map_err(|e| refused("replace", e));
            }
            let object = new_object(&document_resource(kind), namespace, name, spec.clone());
            let exists = match api.create(&write_params(), &object).await {
                Err(e) if status_code(&e) == Some(409) => e,
                created => return created.map_err(|e| refused("create", e)),
            };
            // Not held, yet there. One that does not convert is held as
            // absent, and the write replaces its `spec`; a valid one was
            // written by another client (perhaps through another replica)
            // and is not seen here yet: overwriting it would answer
            // "created" to two writers, so it is a conflict to retry.
            let current = api.get(name).await.map_err(|e| refused("create", e))?;
            if self.converts(kind, &current) {
                let mut refusal = refused("create", exists);
                if let KubeStoreError::Write { message, .. } = &mut refusal {
                    message.push_str(
                        ": a valid object another client wrote, not seen by this replica yet",
                    );
                }
                return Err(refusal);
            }
            let at = current.resource_version().unwrap_or_default();
            patch_spec(&api, name, &spec, &at)
                .await
                .map_err(|e| refused("create", e))
        })?;
        let revision = written
            .metadata
            .generation
            .and_then(|g| u64::try_from(g).ok())
            .unwrap_or(1);
        Ok((written, revision))
    }

    /// Whether an object of `kind` is a valid policy or rate limit.
    fn converts(&self, kind: Kind, object: &DynamicObject) -> bool {
        match kind {
            Kind::RateLimitPolicy => {
                rate_limit_from_object(object, &self.trust_domain, &self.context).is_ok()
            }
            _ => policy_from_object(object, &self.trust_domain, &self.context).is_ok(),
        }
    }

    /// Writes one policy and puts the API server's answer into the cache, so
    /// the caller reads its write, unless the watch has already passed it
    /// ([`cache::Cache::apply_written`]). Returns the revision and the
    /// resourceVersion the write got.
    fn write_policy(
        &self,
        policy: &Policy,
        held_version: Option<&str>,
    ) -> Result<(u64, u64), StoreError> {
        let key = policy_key(&policy.namespace, &policy.name);
        let spec = policy_spec(policy).map_err(|message| KubeStoreError::Encode {
            key: key.clone(),
            message,
        })?;
        let kind = Kind::AuthorizationPolicy;
        let at = (policy.namespace.as_str(), policy.name.as_str());
        let (written, revision) = self.write_object(kind, &key, at, spec, held_version)?;
        let reflected = Reflected {
            resource_version: written.resource_version().unwrap_or_default(),
            entry: Entry::Policy(Policy {
                revision,
                ..policy.clone()
            }),
        };
        let at = numeric(Some(&reflected.resource_version));
        self.shared
            .update(|c| c.apply_written(kind, &key, reflected));
        Ok((revision, at))
    }

    /// Writes one rate limit, as [`Self::write_policy`] does a policy.
    fn write_rate_limit(
        &self,
        limit: &RateLimit,
        held_version: Option<&str>,
    ) -> Result<(u64, u64), StoreError> {
        let key = policy_key(&limit.namespace, &limit.name);
        let spec = rate_limit_spec(limit).map_err(|message| KubeStoreError::Encode {
            key: key.clone(),
            message,
        })?;
        let kind = Kind::RateLimitPolicy;
        let at = (limit.namespace.as_str(), limit.name.as_str());
        let (written, revision) = self.write_object(kind, &key, at, spec, held_version)?;
        let reflected = Reflected {
            resource_version: written.resource_version().unwrap_or_default(),
            entry: Entry::RateLimit(limit.clone(), revision),
        };
        let at = numeric(Some(&reflected.resource_version));
        self.shared
            .update(|c| c.apply_written(kind, &key, reflected));
        Ok((revision, at))
    }

    /// Deletes one object; `None` when the cache holds no such (valid)
    /// object.
    fn delete_object(
        &self,
        kind: Kind,
        namespace: &str,
        name: &str,
    ) -> Result<Option<Generation>, StoreError> {
        let key = policy_key(namespace, name);
        let (held, held_at) = self.shared.read(|c| {
            let held = match kind {
                Kind::RateLimitPolicy => c.rate_limit(&key).is_some(),
                _ => c.policy(&key).is_some(),
            };
            (held, numeric(c.resource_version(kind, &key)))
        });
        if !held {
            return Ok(None);
        }
        let api = self.document_api(kind, namespace);
        let deleted = self
            .runtime
            .block_on(api.delete(name, &DeleteParams::default()));
        // The API server answers a deletion with the object as deleted,
        // at the deletion's resourceVersion; without it (a Status, or
        // deleted meanwhile) the deletion is known only to come after the
        // version held (and not at all when that is not a number: no
        // position, so `--wait` asks by version).
        let after_held = if held_at == 0 { 0 } else { held_at + 1 };
        let deleted_at = match deleted {
            Ok(answer) => answer
                .left()
                .map(|object| numeric(object.resource_version().as_deref()))
                .filter(|at| *at > held_at)
                .unwrap_or(after_held),
            // Deleted meanwhile: the watch brings (or brought) the event.
            Err(e) if status_code(&e) == Some(404) => after_held,
            Err(e) => {
                return Err(KubeStoreError::Write {
                    action: format!("delete {} {key}", kind.as_str()),
                    message: describe(&e),
                    status: status_code(&e),
                }
                .into());
            }
        };
        self.shared
            .update(|c| c.remove_written(kind, &key, deleted_at));
        Ok(Some(Generation {
            position: written_position(kind, deleted_at),
            ..self.generation()
        }))
    }
}

/// The resource of one of the two policy kinds.
fn document_resource(kind: Kind) -> ApiResource {
    match kind {
        Kind::RateLimitPolicy => rate_limit_resource(),
        _ => authorization_policy_resource(),
    }
}

/// How the store's writes name themselves to the API server.
fn write_params() -> PostParams {
    PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PostParams::default()
    }
}

/// Gives object `name` the `spec`, if it is still at `resource_version`
/// ([`spec_patch`]).
async fn patch_spec(
    api: &Api<DynamicObject>,
    name: &str,
    spec: &Value,
    resource_version: &str,
) -> kube::Result<DynamicObject> {
    let patch = serde_json::from_value(spec_patch(spec, resource_version))
        .map_err(kube::Error::SerdeError)?;
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    api.patch(name, &params, &Patch::Json::<()>(patch)).await
}

/// The position of a write of `kind` at resourceVersion `at`.
fn written_position(kind: Kind, at: u64) -> Position {
    match kind {
        Kind::RateLimitPolicy => Position {
            rate_limits: at,
            ..Position::default()
        },
        _ => Position {
            policies: at,
            ..Position::default()
        },
    }
}

/// What a write of one document would do to what is held (what a dry run
/// answers).
fn outcome_of<T>(held: Option<(T, u64)>, same: impl FnOnce(&T) -> bool) -> (u64, PolicyOutcome) {
    match held {
        None => (1, PolicyOutcome::Created),
        Some((old, revision)) if same(&old) => (revision, PolicyOutcome::Unchanged),
        Some((_, revision)) => (revision + 1, PolicyOutcome::Updated),
    }
}

/// What a write did, from the revision held before it (`None`: nothing
/// valid was held) and the revision the API server answered with: the
/// revision (`metadata.generation`) moves only when the `spec` changes.
fn written_outcome(held: Option<u64>, written: u64) -> PolicyOutcome {
    match held {
        None => PolicyOutcome::Created,
        Some(held) if held == written => PolicyOutcome::Unchanged,
        Some(_) => PolicyOutcome::Updated,
    }
}

/// The value of a policy object the watch read, its relaxations logged on
/// its first reading: once per change of the object, however often it is
/// listed again.
fn logged<T>(object: &DynamicObject, converted: Converted<T>, reading: Reading) -> T {
    if reading == Reading::First {
        warn_relaxed(object, &converted.relaxed);
    }
    converted.value
}

fn watch_error(e: &watcher::Error) -> String {
    match e {
        watcher::Error::InitialListFailed(e)
        | watcher::Error::WatchStartFailed(e)
        | watcher::Error::WatchFailed(e) => describe(e),
        other => other.to_string(),
    }
}

impl Store for KubernetesStore {
    fn add_join_token(
        &self,
        _hash: &[u8; 32],
        _token: &JoinToken,
        _now_unix: i64,
    ) -> Result<(), StoreError> {
        Err(TokenRefusal::Disabled.into())
    }

    /// Join tokens have no place here: refused before anything is signed.
    fn check_join_token(&self, _claim: TokenClaim<'_>) -> Result<(), StoreError> {
        Err(TokenRefusal::Disabled.into())
    }

    fn takes_reported_addresses(&self) -> bool {
        false
    }

    fn record_issuance(
        &self,
        proof: Option<IssuanceProof<'_>>,
        issued: &IssuedCertRecord,
        _workload: &WorkloadRecord,
    ) -> Result<EndpointChange, StoreError> {
        if matches!(proof, Some(IssuanceProof::Token(_))) {
            return Err(TokenRefusal::Disabled.into());
        }
        self.issued.lock().expect("not poisoned").push(issued);
        // Endpoints come from Pods, not from what a sidecar reports.
        Ok(EndpointChange::Unchanged)
    }

    fn workloads(&self) -> Result<Vec<WorkloadRecord>, StoreError> {
        Ok(self.shared.read(|c| c.workloads()))
    }

    fn newest_issued(
        &self,
        limit: usize,
        matches: &dyn Fn(&IssuedCertRecord) -> bool,
    ) -> Result<Vec<IssuedCertRecord>, StoreError> {
        Ok(self
            .issued
            .lock()
            .expect("not poisoned")
            .newest_first()
            .filter(|r| matches(r))
            .take(limit)
            .cloned()
            .collect())
    }

    fn issued_log_view(&self) -> Option<IssuedLogView> {
        Some(self.issued.lock().expect("not poisoned").view())
    }

    fn snapshot_version(&self) -> Result<u64, StoreError> {
        Ok(self.shared.read(|c| c.version()))
    }

    fn snapshot_position(&self) -> Result<(u64, Position), StoreError> {
        Ok(self.shared.read(|c| (c.version(), c.position())))
    }

    /// The version names the content: there is nothing to bump.
    fn bump_snapshot_version(&self) -> Result<u64, StoreError> {
        self.snapshot_version()
    }

    fn settle_mesh_config(&self, encoded: &str) -> Result<u64, StoreError> {
        Ok(self.shared.update(|c| c.set_mesh_config(encoded)))
    }

    /// Kubernetes has no transaction over several objects: the documents
    /// are written one by one, and a refusal stops the rest, leaving the
    /// earlier ones written (each is whole; the answer names the refusal).
    ///
    /// A document the cache holds unchanged is written all the same, on
    /// the resourceVersion held: the cache may lag behind the API server
    /// (another replica's write on its way through the watch), and
    /// answering "unchanged" from it would leave that other content in
    /// force. The API server refuses a stale resourceVersion with a 409,
    /// an error to retry, and makes a write that changes nothing a no-op
    /// (no new revision, no watch event). Reading the object first would
    /// tell no more, and leave a window between the read and the write.
    fn apply_documents(
        &self,
        policies: &[Policy],
        rate_limits: &[RateLimit],
        dry_run: bool,
    ) -> Result<AppliedDocuments, StoreError> {
        let mut applied = AppliedDocuments::default();
        // Where each document stands once written: what the write got, or
        // what is held when it is unchanged (another replica may not hold
        // that yet either).
        let mut written = Position::default();
        for policy in policies {
            let key = policy_key(&policy.namespace, &policy.name);
            let kind = Kind::AuthorizationPolicy;
            let (held, held_version) = self.shared.read(|c| {
                (
                    c.policy(&key).map(|p| {
                        let revision = p.revision;
                        (p, revision)
                    }),
                    c.resource_version(kind, &key).map(str::to_owned),
                )
            });
            let held_revision = held.as_ref().map(|(_, revision)| *revision);
            let (revision, outcome) = outcome_of(held, |old| same_content(old, policy));
            // An object held as invalid is not in `held` but exists: the
            // write replaces it.
            let (revision, outcome, at) = if dry_run {
                (revision, outcome, numeric(held_version.as_deref()))
            } else {
                let (revision, at) = self
                    .write_policy(policy, held_version.as_deref())
                    .map_err(|e| kept_before(e, &applied))?;
                (revision, written_outcome(held_revision, revision), at)
            };
            written = written.max(written_position(kind, at));
            applied.policies.push(AppliedPolicy {
                namespace: policy.namespace.clone(),
                name: policy.name.clone(),
                revision,
                outcome,
            });
        }
        for limit in rate_limits {
            let key = policy_key(&limit.namespace, &limit.name);
            let kind = Kind::RateLimitPolicy;
            let (held, held_version) = self.shared.read(|c| {
                (
                    c.rate_limit(&key),
                    c.resource_version(kind, &key).map(str::to_owned),
                )
            });
            let held_revision = held.as_ref().map(|(_, revision)| *revision);
            let (revision, outcome) = outcome_of(held, |old| old == limit);
            let (revision, outcome, at) = if dry_run {
                (revision, outcome, numeric(held_version.as_deref()))
            } else {
                let (revision, at) = self
                    .write_rate_limit(limit, held_version.as_deref())
                    .map_err(|e| kept_before(e, &applied))?;
                (revision, written_outcome(held_revision, revision), at)
            };
            written = written.max(written_position(kind, at));
            applied.rate_limits.push(AppliedPolicy {
                namespace: limit.namespace.clone(),
                name: limit.name.clone(),
                revision,
                outcome,
            });
        }
        applied.generation = Generation {
            position: written,
            ..KubernetesStore::generation(self)
        };
        Ok(applied)
    }

    fn policies(&self) -> Result<Vec<Policy>, StoreError> {
        Ok(self.shared.read(|c| c.policies()))
    }

    fn policy(&self, namespace: &str, name: &str) -> Result<Option<Policy>, StoreError> {
        let key = policy_key(namespace, name);
        Ok(self.shared.read(|c| c.policy(&key)))
    }

    fn delete_policy(&self, namespace: &str, name: &str) -> Result<Option<Generation>, StoreError> {
        self.delete_object(Kind::AuthorizationPolicy, namespace, name)
    }

    fn rate_limits(&self) -> Result<Vec<RateLimitRecord>, StoreError> {
        Ok(self
            .shared
            .read(|c| c.rate_limits())
            .into_iter()
            .map(|(limit, revision)| RateLimitRecord {
                rate_limit: Some(limit),
                revision,
            })
            .collect())
    }

    fn rate_limit(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<RateLimitRecord>, StoreError> {
        let key = policy_key(namespace, name);
        Ok(self
            .shared
            .read(|c| c.rate_limit(&key))
            .map(|(limit, revision)| RateLimitRecord {
                rate_limit: Some(limit),
                revision,
            }))
    }

    fn delete_rate_limit(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<Generation>, StoreError> {
        self.delete_object(Kind::RateLimitPolicy, namespace, name)
    }

    fn generation(&self) -> Result<Generation, StoreError> {
        Ok(KubernetesStore::generation(self))
    }

    fn discovery_state(&self) -> Result<DiscoveryState, StoreError> {
        Ok(self.shared.read(|c| DiscoveryState {
            version: c.version(),
            // The version is a digest of the content: it needs no epoch.
            epoch: 0,
            position: c.position(),
            // Endpoints are Pods, which no certificate expiry removes.
            version_set_at_unix: None,
            workloads: c.workloads(),
            policies: c.policies(),
            rate_limits: c
                .rate_limits()
                .into_iter()
                .map(|(limit, _)| limit)
                .collect(),
            services: c.services(),
            // Revocations are refused here: sidecars are sent none.
            revocations: Vec::new(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_that_cannot_be_read_is_named_with_its_path_escaped() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = tmp.path().join("gone\n\x1b[2J.crt");
        let api = KubeApi {
            url: "https://127.0.0.1:6443".parse().unwrap(),
            ca,
            token_file: tmp.path().join("token"),
        };
        let Err(error) = client(&api) else {
            panic!("a CA that cannot be read makes no client")
        };
        let error = error.to_string();
        let shown = tmp.path().join("gone\\n\\u{1b}[2J.crt");
        assert!(
            error.starts_with(&format!("Kubernetes API CA {}: ", shown.display())),
            "{error:?}"
        );
        assert!(!error.contains('\x1b'), "{error:?}");
    }
}
