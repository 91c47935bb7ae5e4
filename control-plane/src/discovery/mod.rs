//! Per-sidecar snapshots: what each sidecar needs to enforce (its policies
//! and rate limits, the mesh endpoints, the trust bundle, the mesh config),
//! versioned.
//!
//! The store's snapshot version changes with every change that can affect a
//! snapshot (a new endpoint, a policy write, a changed mesh config or trust
//! bundle, which a restart brings): a
//! persisted counter in the embedded store, set in an epoch of its own each
//! time the database is opened (so a database restored from an older copy,
//! whose counter went back, never names other content with a version and
//! epoch it named before), a digest of the content in the Kubernetes store
//! (so replicas agree on it, with no epoch). After
//! each change this module reads the version together with the workloads and
//! policies it stands for, in one store transaction, into an in-memory
//! [`View`], and announces the version on a `watch` channel: a snapshot's
//! version therefore always names exactly its content. The view is built
//! once per version and shared (`Arc`) by every stream: its endpoint list is
//! itself shared, and each part of it (the endpoint list, each policy, each
//! rate limit) has a content token, reused from the previous view when that part did not
//! change. What every snapshot shares is encoded once: the trust bundle and
//! the mesh config when the control plane starts, the endpoint list and the
//! revocations each once per version that changes them; a stream encodes
//! only its sidecar's own fields (the version, the policies and rate limits
//! that select it) and sends those bytes with the shared ones
//! ([`EncodedSnapshot`]).
//!
//! A Watch stream rebuilds at once after a change when its last rebuild is
//! at least [`COALESCE_WINDOW`] old, and otherwise when that window ends (so
//! a stream rebuilds at most once per window, however many changes a burst
//! holds, and a lone change waits for nothing). It derives its
//! sidecar's [`ContentKey`] from the view (which policies and rate limits
//! select it, and the tokens), and builds and sends a snapshot only when
//! that key differs from what the stream last sent: sidecars a change does
//! not affect see nothing, and the version a sidecar sees moves only when
//! its content changes. The mesh's revocations go to every sidecar, whole,
//! in every snapshot (a revocation write sets a new version, so a
//! reconnecting sidecar that holds the current version holds them too). This module also tracks what each connected sidecar
//! acknowledged. It never authenticates anyone: callers pass a verified ID.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use prost::bytes::Bytes;
use tokio::sync::watch;
use trellis_core::SpiffeId;
use trellis_core::policy::{DefaultPolicy, SelectorScope, ValidationContext, WorkloadSelector};
use trellis_proto::discovery::v1::encoded::EncodedSnapshot;
use trellis_proto::discovery::v1::{
    Endpoint, EndpointChanges, MeshConfig, Revocation, Service, Snapshot,
};
use trellis_proto::policy::v1::{Policy, RateLimit};

use crate::store::{DiscoveryState, Position, Store, StoreError};
use crate::unix_now;

/// The shortest time between two rebuilds of one stream's snapshot: a
/// change that finds the stream idle for this long is sent at once, later
/// changes of a burst wait for the end of the window and reach the sidecar
/// together. Well under the 100 ms the design allows.
pub const COALESCE_WINDOW: Duration = Duration::from_millis(50);

/// A snapshot version with the epoch it was set in
/// ([`View::epoch`]): together they name a snapshot's content.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnapshotVersion {
    pub version: u64,
    pub epoch: u64,
}

/// What the control plane knows about one sidecar's discovery streams.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SidecarStatus {
    /// The version it acknowledged last (0 before any).
    pub acked_version: u64,
    /// The epoch `acked_version` was set in (0 when not known: a version
    /// the stream did not send).
    pub acked_epoch: u64,
    /// The newest version whose content it holds: the one it acknowledged,
    /// or a later one that left what it is sent as it was (0 before any).
    pub synced_version: u64,
    /// The epoch `synced_version` was set in.
    pub synced_epoch: u64,
    /// The reason of the last NACK, cleared by a later ACK.
    pub last_nack: String,
    /// What the last ACK said the sidecar enforces otherwise than sent.
    pub ack_warnings: Vec<String>,
    /// Open Watch streams from this identity.
    pub streams: u32,
    /// When the stream opened, Unix seconds.
    pub opened_at_unix: i64,
    /// The certificate its sidecar presented for the connection the stream
    /// is on, when this replica saw it presented ([`PresentedCert`]).
    pub presented: Option<PresentedCert>,
    /// The ports its sidecar declared opaque on its own when it
    /// subscribed, sorted (empty from one that declares none, or predates
    /// `Subscribe.opaque_ports`).
    pub opaque_ports: Vec<u16>,
}

/// A certificate a client presented in a full TLS handshake. A resumed
/// session presents none: its certificate is the one presented when the
/// session began, maybe renewed since, and is not recorded as presented.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PresentedCert {
    /// Its serial number, lowercase hex.
    pub serial: String,
    /// notBefore, Unix seconds.
    pub not_before_unix: i64,
    /// notAfter, Unix seconds.
    pub not_after_unix: i64,
    /// When the handshake presented it, Unix seconds: the client held no
    /// newer certificate then.
    pub presented_at_unix: i64,
}

/// Watch streams one sidecar may hold open at once: a sidecar holds one,
/// and a few more while a restarted one's old connection has not failed
/// yet.
pub const MAX_WATCH_STREAMS_PER_SIDECAR: usize = 16;

/// Watch streams a replica holds open at once, over every sidecar: well
/// above the 10,000 sidecars the benchmark watches with.
pub const MAX_WATCH_STREAMS: usize = 50_000;

/// How many Watch streams may be open at once on a replica. Every stream
/// keeps its sidecar's status (with the opaque ports it declared), so
/// without a bound one SVID could make the control plane hold any number.
///
/// One sidecar is an identity on a connection from one address: the
/// replicas of a Deployment share their identity (their ServiceAccount's)
/// but each pod has its own address, and the address is the connection's,
/// which the caller cannot choose as it chooses what its Subscribe says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatchLimits {
    /// Streams of one identity from one address.
    pub per_sidecar: usize,
    /// Streams over every identity.
    pub total: usize,
}

impl Default for WatchLimits {
    fn default() -> Self {
        Self {
            per_sidecar: MAX_WATCH_STREAMS_PER_SIDECAR,
            total: MAX_WATCH_STREAMS,
        }
    }
}

/// Why a Watch stream was not opened.
#[derive(Debug, thiserror::Error)]
pub enum WatchLimitReached {
    #[error(
        "{id} already holds {limit} Watch streams from {from}, the most one sidecar may hold at \
         once; close one first (the stream of a restarted sidecar closes when its old \
         connection fails)"
    )]
    PerSidecar {
        limit: usize,
        id: SpiffeId,
        from: IpAddr,
    },
    #[error(
        "this control plane replica already holds {limit} Watch streams, the most it holds at \
         once; the stream of {id} from {from} is refused until one closes"
    )]
    Total {
        limit: usize,
        id: SpiffeId,
        from: IpAddr,
    },
}

impl WatchLimitReached {
    /// The limit's name in metrics: `per_sidecar` or `total`.
    pub fn reason(&self) -> &'static str {
        match self {
            WatchLimitReached::PerSidecar { .. } => "per_sidecar",
            WatchLimitReached::Total { .. } => "total",
        }
    }
}

/// Whether a sidecar holds the snapshot the control plane serves now,
/// ordered from synced to not connected: an identity is as synced as its
/// least synced stream, the greatest of their states.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SyncState {
    /// It holds the current version's content.
    Synced,
    /// The current version is on its way to it or waits for its answer.
    Pending,
    /// It refused the newest snapshot it was sent.
    Refused,
    /// No Watch stream from it is open.
    NotConnected,
}

impl SyncState {
    /// Its name in metrics and in `trellisctl`.
    pub fn label(self) -> &'static str {
        match self {
            SyncState::NotConnected => "not connected",
            SyncState::Synced => "synced",
            SyncState::Pending => "pending",
            SyncState::Refused => "refused",
        }
    }
}

impl SidecarStatus {
    pub fn connected(&self) -> bool {
        self.streams > 0
    }

    /// Where it stands against `current`, the version served now. Versions
    /// are compared for equality only: the Kubernetes store's are content
    /// digests, with no order.
    pub fn sync(&self, current: u64) -> SyncState {
        if !self.connected() {
            SyncState::NotConnected
        } else if self.synced_version == current && current != 0 {
            SyncState::Synced
        } else if !self.last_nack.is_empty() {
            SyncState::Refused
        } else {
            SyncState::Pending
        }
    }
}

/// The content of every snapshot at one version.
#[derive(Debug, Default)]
pub struct View {
    pub version: u64,
    /// The epoch `version` was set in ([`DiscoveryState::epoch`]).
    pub epoch: u64,
    /// One per address of live workloads, ordered by address: never two
    /// for one address, and no loopback address several workloads report.
    pub endpoints: Arc<Vec<Endpoint>>,
    /// Every virtual address with its backends, ordered by address; they
    /// travel with the endpoints (one part, one token).
    pub services: Arc<Vec<Service>>,
    /// `endpoints` and `services` encoded as a snapshot part, shared like
    /// them.
    endpoints_part: Bytes,
    /// Every policy with its selector parsed once, ordered by key.
    pub policies: Vec<(WorkloadSelector, Policy)>,
    /// Every rate limit with its selector parsed once, ordered by key.
    pub rate_limits: Vec<(WorkloadSelector, RateLimit)>,
    /// Names the content of `endpoints` and `services`: equal tokens, equal
    /// content.
    endpoints_token: u64,
    /// Per entry of `policies`, a token naming its content.
    policy_tokens: Vec<u64>,
    /// Per entry of `rate_limits`, a token naming its content.
    rate_limit_tokens: Vec<u64>,
    /// Every revocation of the mesh, ordered by SPIFFE ID: every snapshot
    /// carries them all (they are few), whatever it leaves out of the
    /// endpoints.
    pub revocations: Arc<Vec<Revocation>>,
    /// `revocations` encoded as a snapshot part, once per version that
    /// changes them.
    revocations_part: Bytes,
    /// Names the content of `revocations`.
    revocations_token: u64,
    /// The soonest expiry among the endpoints' addresses when the view was
    /// built (renewals may have moved it on since).
    soonest_expiry: Option<i64>,
}

/// What content tokens are kept for: a document with a name and a selector.
trait Named: PartialEq {
    fn key(&self) -> (&str, &str);
}

impl Named for Policy {
    fn key(&self) -> (&str, &str) {
        (&self.namespace, &self.name)
    }
}

impl Named for RateLimit {
    fn key(&self) -> (&str, &str) {
        (&self.namespace, &self.name)
    }
}

/// Tokens for `now`, reusing the one of an equal document in `before` and
/// taking fresh ones for the others. Documents are matched by key, whatever
/// order each list is in: the store's order of `namespace/name` strings is
/// not that of `(namespace, name)` pairs (`prod-eu/x` sorts before
/// `prod/y`), and an unchanged document given a fresh token would be sent
/// again to every sidecar it selects.
fn tokens_after<T: Named>(
    now: &[(WorkloadSelector, T)],
    before: &[(WorkloadSelector, T)],
    before_tokens: &[u64],
    fresh: &mut impl FnMut() -> u64,
) -> Vec<u64> {
    let old: HashMap<(&str, &str), (&T, u64)> = before
        .iter()
        .zip(before_tokens)
        .map(|((_, doc), token)| (doc.key(), (doc, *token)))
        .collect();
    now.iter()
        .map(|(_, doc)| match old.get(&doc.key()) {
            Some((d, token)) if *d == doc => *token,
            _ => fresh(),
        })
        .collect()
}

/// What one sidecar's snapshot holds besides its version, named by content
/// tokens: two keys from views of one [`Discovery`] are equal exactly when
/// the snapshots they stand for have the same content. The trust bundle and
/// the mesh config never change while the control plane runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContentKey {
    endpoints: u64,
    /// The tokens of the policies that select the sidecar, in view order.
    policies: Vec<u64>,
    /// The tokens of the rate limits that select the sidecar, in view order.
    rate_limits: Vec<u64>,
    revocations: u64,
}

/// Leaves out of `sorted` (by address, then SPIFFE ID) every loopback or
/// unspecified address that more than one workload reports. Sidecars in
/// separate network namespaces (containers, VMs) with default flags all
/// advertise `127.0.0.1:15006`, each its own: no one identity is behind
/// it, so none is published, and the store does not refuse the claims. A
/// loopback address only one workload reports (sidecars sharing one
/// machine, each on its own port) is still an endpoint.
fn leave_out_shared_local(sorted: &mut Vec<Endpoint>) {
    let mut shared: Vec<String> = sorted
        .windows(2)
        .filter(|w| {
            w[0].address == w[1].address
                && w[0].spiffe_id != w[1].spiffe_id
                && crate::net::is_namespace_local(&w[0].address)
        })
        .map(|w| w[0].address.clone())
        .collect();
    if shared.is_empty() {
        return;
    }
    shared.dedup();
    tracing::debug!(
        addresses = %trellis_core::logging::List(&shared),
        "loopback addresses reported by several workloads are not published"
    );
    sorted.retain(|e| shared.binary_search(&e.address).is_err());
}

impl View {
    /// Its version, with the epoch it was set in.
    pub fn snapshot_version(&self) -> SnapshotVersion {
        SnapshotVersion {
            version: self.version,
            epoch: self.epoch,
        }
    }

    /// The view of `state`, with content tokens reused from `previous` for
    /// the parts that did not change and fresh ones (from `next_token`)
    /// for the others.
    fn from_state_after(state: DiscoveryState, previous: &View, next_token: &mut u64) -> Self {
        let mut view = Self::from_state(state);
        let mut fresh = || {
            *next_token += 1;
            *next_token
        };
        if view.endpoints == previous.endpoints && view.services == previous.services {
            view.endpoints = previous.endpoints.clone();
            view.services = previous.services.clone();
            view.endpoints_part = previous.endpoints_part.clone();
            view.endpoints_token = previous.endpoints_token;
        } else {
            view.encode_endpoints();
            view.endpoints_token = fresh();
        }
        if view.revocations == previous.revocations {
            view.revocations = previous.revocations.clone();
            view.revocations_part = previous.revocations_part.clone();
            view.revocations_token = previous.revocations_token;
        } else {
            view.encode_revocations();
            view.revocations_token = fresh();
        }
        view.policy_tokens = tokens_after(
            &view.policies,
            &previous.policies,
            &previous.policy_tokens,
            &mut fresh,
        );
        view.rate_limit_tokens = tokens_after(
            &view.rate_limits,
            &previous.rate_limits,
            &previous.rate_limit_tokens,
            &mut fresh,
        );
        view
    }

    fn from_state(state: DiscoveryState) -> Self {
        Self::from_state_at(state, unix_now())
    }

    /// The view of `state` at `now`.
    fn from_state_at(state: DiscoveryState, now: i64) -> Self {
        // An address is an endpoint until it expires: a sidecar that is
        // gone stops renewing, and its addresses leave when the certificate
        // it last reported them with ends, while those of other sidecars of
        // its identity stay.
        let mut soonest_expiry: Option<i64> = None;
        // One endpoint per address, so an outbound lookup of any of a pod's
        // addresses (IPv4 or IPv6) finds its SPIFFE ID.
        let mut endpoints: Vec<Endpoint> = Vec::new();
        for w in state.workloads {
            for a in w.addresses.into_iter().filter(|a| a.expires_at_unix > now) {
                let at = a.expires_at_unix;
                soonest_expiry = Some(soonest_expiry.map_or(at, |s| s.min(at)));
                endpoints.push(Endpoint {
                    address: a.address,
                    spiffe_id: w.spiffe_id.clone(),
                });
            }
        }
        endpoints.sort_by(|a, b| (&a.address, &a.spiffe_id).cmp(&(&b.address, &b.spiffe_id)));
        leave_out_shared_local(&mut endpoints);
        // One address, one owner: sidecars map an address to the identity
        // they expect, so a second owner would silently replace the first.
        // The embedded store refuses a second live claim; this keeps a store
        // written before it did (or two Pods reporting one address) from
        // publishing both. The one kept is the first by SPIFFE ID.
        endpoints.dedup_by(|later, kept| {
            let shared = later.address == kept.address;
            if shared {
                tracing::warn!(
                    address = %kept.address,
                    kept = %kept.spiffe_id,
                    left_out = %later.spiffe_id,
                    "two live workloads report one inbound address; only one is published"
                );
            }
            shared
        });
        let policies: Vec<_> = state
            .policies
            .into_iter()
            .map(|p| (WorkloadSelector::of(&p), p))
            .collect();
        let rate_limits: Vec<_> = state
            .rate_limits
            .into_iter()
            .map(|r| (WorkloadSelector::of_selector(r.selector.as_ref()), r))
            .collect();
        let policy_tokens = (1..=policies.len() as u64).collect();
        let first_limit_token = policies.len() as u64 + 1;
        let rate_limit_tokens =
            (first_limit_token..first_limit_token + rate_limits.len() as u64).collect();
        let revocations: Vec<Revocation> = state
            .revocations
            .into_iter()
            .map(|r| Revocation {
                spiffe_id: r.spiffe_id,
                revoked_at_unix: r.revoked_at_unix,
            })
            .collect();
        Self {
            version: state.version,
            epoch: state.epoch,
            endpoints: Arc::new(endpoints),
            services: Arc::new(state.services),
            endpoints_part: Bytes::new(),
            endpoints_token: 0,
            policies,
            rate_limits,
            policy_tokens,
            rate_limit_tokens,
            revocations: Arc::new(revocations),
            revocations_part: Bytes::new(),
            revocations_token: 0,
            soonest_expiry,
        }
    }

    /// Encodes the endpoint and service lists once for every stream of
    /// this version.
    fn encode_endpoints(&mut self) {
        let fields = Snapshot {
            endpoints: std::mem::take(Arc::make_mut(&mut self.endpoints)),
            services: std::mem::take(Arc::make_mut(&mut self.services)),
            ..Snapshot::default()
        };
        self.endpoints_part = EncodedSnapshot::part(&fields);
        self.endpoints = Arc::new(fields.endpoints);
        self.services = Arc::new(fields.services);
    }

    /// Encodes the revocations once for every stream of this version (and
    /// of the later ones, until they change).
    fn encode_revocations(&mut self) {
        #[cfg(test)]
        tests::REVOCATION_ENCODINGS.with(|n| n.set(n.get() + 1));
        let fields = Snapshot {
            revocations: std::mem::take(Arc::make_mut(&mut self.revocations)),
            ..Snapshot::default()
        };
        self.revocations_part = EncodedSnapshot::part(&fields);
        self.revocations = Arc::new(fields.revocations);
    }

    /// Names the content of the endpoints: equal tokens, equal endpoints
    /// (for views of one [`Discovery`]).
    pub fn endpoints_token(&self) -> u64 {
        self.endpoints_token
    }

    /// Names the content of the revocations: equal tokens, equal
    /// revocations (for views of one [`Discovery`]). A stream looks its
    /// identity up again only when this changes.
    pub fn revocations_token(&self) -> u64 {
        self.revocations_token
    }

    /// When `id` was revoked (Unix seconds), if it is: read through the
    /// revocations (they are few), whatever order a store gave them in.
    pub fn revoked_at(&self, id: &SpiffeId) -> Option<i64> {
        (self.revocations.iter())
            .find(|r| r.spiffe_id == id.as_str())
            .map(|r| r.revoked_at_unix)
    }

    /// The endpoints and services of this view, as a stream remembers
    /// what its sidecar holds (shared, not copied).
    pub fn held_endpoints(&self) -> HeldEndpoints {
        HeldEndpoints {
            token: self.endpoints_token,
            endpoints: self.endpoints.clone(),
            services: self.services.clone(),
        }
    }

    /// What the snapshot of the workload `id` holds, by content tokens.
    pub fn content_key(&self, id: &SpiffeId) -> ContentKey {
        ContentKey {
            endpoints: self.endpoints_token,
            policies: self
                .policies
                .iter()
                .zip(&self.policy_tokens)
                .filter(|((selector, _), _)| selector.selects(id))
                .map(|(_, token)| *token)
                .collect(),
            rate_limits: self
                .rate_limits
                .iter()
                .zip(&self.rate_limit_tokens)
                .filter(|((selector, _), _)| selector.selects(id))
                .map(|(_, token)| *token)
                .collect(),
            revocations: self.revocations_token,
        }
    }

    /// The rate limits that select the workload `id`.
    pub fn rate_limits_for(&self, id: &SpiffeId) -> Vec<RateLimit> {
        self.rate_limits
            .iter()
            .filter(|(selector, _)| selector.selects(id))
            .map(|(_, r)| r.clone())
            .collect()
    }

    /// The policies that select the workload `id`.
    pub fn policies_for(&self, id: &SpiffeId) -> Vec<Policy> {
        self.policies
            .iter()
            .filter(|(selector, _)| selector.selects(id))
            .map(|(_, p)| p.clone())
            .collect()
    }
}

/// The endpoints and services of a snapshot a sidecar holds, shared with
/// the view they came from.
#[derive(Clone, Debug, Default)]
pub struct HeldEndpoints {
    /// Their content token ([`View::endpoints_token`]).
    pub token: u64,
    endpoints: Arc<Vec<Endpoint>>,
    services: Arc<Vec<Service>>,
}

/// How a snapshot carries its endpoints and services.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndpointsIn {
    /// Every one of them.
    Full,
    /// None: they are those of the snapshot of this version, which the
    /// sidecar holds.
    Same(u64),
    /// What changed since the snapshot of this version, which the sidecar
    /// holds: this encoded part.
    Changes(u64, Bytes),
}

/// The changes from earlier endpoint contents to the current one, each
/// encoded once for every stream whose sidecar holds that content.
#[derive(Debug, Default)]
struct ChangesTo {
    /// The content token they lead to; the cache is emptied when it moves
    /// on.
    to: u64,
    /// By the token they start from: the encoded part, or `None` when
    /// the changes are no smaller than the full lists.
    from: HashMap<u64, Option<Bytes>>,
}

/// The most starting points [`ChangesTo`] keeps: sidecars are nearly all
/// one or two versions behind.
const CHANGES_KEPT: usize = 64;

pub struct Discovery {
    store: Arc<dyn Store>,
    bundle: Vec<Vec<u8>>,
    mesh: MeshConfig,
    /// Which workloads a policy of a namespace may select
    /// (`--root-namespace`): checked on writes, not pushed to sidecars.
    scope: SelectorScope,
    /// The trust bundle and the mesh config, encoded as a snapshot part:
    /// they never change while the control plane runs.
    constant_part: Bytes,
    default_policy: DefaultPolicy,
    view: RwLock<Arc<View>>,
    /// Serializes refreshes, so views are published in version order; holds
    /// the last content token handed out.
    refreshing: Mutex<u64>,
    version: watch::Sender<u64>,
    /// Each identity's Watch streams: many pods share one identity (the
    /// replicas of a Deployment share its ServiceAccount), and each stream
    /// keeps its own status.
    sidecars: Mutex<BTreeMap<SpiffeId, IdentityStreams>>,
    /// The number the next stream opened gets.
    next_stream: std::sync::atomic::AtomicU64,
    /// How many Watch streams are open, over every identity: a stopping
    /// replica waits for none before it stops listening.
    open_streams: watch::Sender<usize>,
    /// How many Watch streams may be open at once.
    watch_limits: WatchLimits,
    served: Mutex<Served>,
    changes: Mutex<ChangesTo>,
}

/// How many of the versions it served last a replica remembers the order
/// of.
pub const SERVED_KEPT: usize = 4096;

/// The versions this replica has served, by when each was served last: a
/// view loaded after another holds every write the other held, whether or
/// not their versions (the Kubernetes store's are digests) are ordered.
/// Each also keeps the store position its content reached.
#[derive(Debug, Default)]
struct Served {
    /// The order given to the last version served.
    last: u64,
    /// Each version remembered, with the order it was last served at and
    /// its position.
    order: HashMap<u64, (u64, Position)>,
    /// Each version as it was served, with the order it got then, the
    /// oldest first.
    queue: std::collections::VecDeque<(u64, u64)>,
}

/// A write that `policy apply --wait` asks about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Write {
    /// None asked about.
    None,
    /// By the snapshot version the write returned: reached by a replica
    /// that served it, and by the versions it served after it.
    Version(u64),
    /// By the store position the write returned: reached by every version
    /// whose content reaches that position, however the replica came by
    /// it (with the Kubernetes store, a replica that saw the write after
    /// or together with other changes never serves the writer's version).
    Position(Position),
}

impl Served {
    fn record(&mut self, version: u64, position: Position) {
        self.last += 1;
        self.order.insert(version, (self.last, position));
        self.queue.push_back((version, self.last));
        while self.queue.len() > SERVED_KEPT {
            if let Some((old, at)) = self.queue.pop_front()
                && self.order.get(&old).map(|(order, _)| *order) == Some(at)
            {
                self.order.remove(&old);
            }
        }
    }

    /// The store moved on to `position` with the same content as the
    /// version served last, `version` (the watch's echo of this replica's
    /// own write): that version's content reaches it too.
    fn advance(&mut self, version: u64, position: Position) {
        if let Some((order, held)) = self.order.get_mut(&version)
            && *order == self.last
        {
            *held = held.max(position);
        }
    }

    /// See [`Discovery::reached`].
    fn reached(&self, write: Write, version: u64) -> bool {
        let Some((order, position)) = self.order.get(&version) else {
            return false;
        };
        match write {
            Write::None => false,
            Write::Version(since) => self
                .order
                .get(&since)
                .is_some_and(|(since, _)| order >= since),
            Write::Position(written) => position.covers(&written),
        }
    }
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovery")
            .field("version", &*self.version.borrow())
            .finish_non_exhaustive()
    }
}

impl Discovery {
    /// Settles the mesh config and the trust bundle in the store (a change
    /// of either is a new version), withdraws in a new version the
    /// endpoints whose certificates ended while the control plane was
    /// stopped, loads the current view and starts announcing from it.
    pub fn new(
        store: Arc<dyn Store>,
        bundle: Vec<Vec<u8>>,
        mesh: MeshConfig,
    ) -> Result<Self, StoreError> {
        store.settle_mesh_config(&encode_constant_part(&mesh, &bundle))?;
        let now = unix_now();
        let mut state = store.discovery_state()?;
        // Sidecars that reconnect holding the stored version are sent
        // nothing until the next change: when an endpoint that version
        // published has expired since (the control plane was stopped when
        // it did, so no expiry check ran), its leaving is a new version.
        if published_since_expired(&state, now) {
            store.bump_snapshot_version()?;
            state = store.discovery_state()?;
            tracing::info!(
                version = state.version,
                "endpoints whose certificates ended while the control plane was stopped are withdrawn"
            );
        }
        let position = state.position;
        let mut view = View::from_state_at(state, now);
        view.encode_endpoints();
        view.encode_revocations();
        let constant_part = EncodedSnapshot::part(&Snapshot {
            trust_bundle: bundle.clone(),
            mesh: Some(mesh.clone()),
            ..Snapshot::default()
        });
        let tokens = (view.policy_tokens.len() + view.rate_limit_tokens.len()) as u64;
        // The flag parser only produces known names; deny is the safe reading.
        let default_policy = mesh.default_policy.parse().unwrap_or_default();
        let mut served = Served::default();
        served.record(view.version, position);
        Ok(Self {
            store,
            bundle,
            mesh,
            scope: SelectorScope::default(),
            constant_part,
            default_policy,
            version: watch::Sender::new(view.version),
            view: RwLock::new(Arc::new(view)),
            refreshing: Mutex::new(tokens),
            sidecars: Mutex::new(BTreeMap::new()),
            next_stream: std::sync::atomic::AtomicU64::new(0),
            open_streams: watch::Sender::new(0),
            watch_limits: WatchLimits::default(),
            served: Mutex::new(served),
            changes: Mutex::default(),
        })
    }

    /// With `limits` on the Watch streams open at once (by default
    /// [`WatchLimits::default`]).
    pub fn with_watch_limits(mut self, limits: WatchLimits) -> Self {
        self.watch_limits = limits;
        self
    }

    /// With `root` as the mesh's root namespace ([`SelectorScope`]) in
    /// [`validation_context`](Self::validation_context) (by default
    /// [`DEFAULT_ROOT_NAMESPACE`](trellis_core::policy::DEFAULT_ROOT_NAMESPACE)).
    pub fn with_root_namespace(mut self, root: &str) -> Self {
        self.scope = SelectorScope::root(root);
        self
    }

    /// Records that something snapshots contain has changed, and announces it.
    pub fn changed(&self) -> Result<u64, StoreError> {
        self.store.bump_snapshot_version()?;
        self.refresh()
    }

    /// Reloads the view after the store's version moved (a policy write
    /// bumps it in its own transaction) and announces the new version.
    /// Blocks on the store: call it from blocking code.
    pub fn refresh(&self) -> Result<u64, StoreError> {
        let mut next_token = self.refreshing.lock().expect("not poisoned");
        // Concurrent writers each refresh; the first one through loads the
        // version they all wrote, so the others need not read the whole
        // state again (a version names its content).
        let (version, position) = self.store.snapshot_position()?;
        if version == self.view().version {
            let mut served = self.served.lock().expect("not poisoned");
            served.advance(version, position);
            return Ok(self.current_version());
        }
        let state = self.store.discovery_state()?;
        let version = state.version;
        let previous = self.view();
        // Versions name content; the embedded store's only ever grow, the
        // Kubernetes store's are content digests: any other version is new.
        if version != previous.version {
            let position = state.position;
            let view = View::from_state_after(state, &previous, &mut next_token);
            *self.view.write().expect("not poisoned") = Arc::new(view);
            self.served
                .lock()
                .expect("not poisoned")
                .record(version, position);
            self.version.send_replace(version);
        }
        Ok(self.current_version())
    }

    /// Removes addresses from the mesh endpoints when they expire (the
    /// certificate their sidecar last reported them with ends): when an
    /// endpoint of the current view has expired it records a change, so
    /// the endpoint leaves in a new version (a version always names exactly
    /// its content). It sleeps until the soonest expiry the current view
    /// knows; only then does it read the store's workloads, whose renewals
    /// may have moved that expiry on, so a new version costs no read of
    /// every workload, and it still wakes for sidecars that stopped
    /// renewing. Runs until `shutdown` turns true (or the announcements
    /// end).
    pub async fn expire_endpoints(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut versions = self.subscribe();
        loop {
            // The view's soonest expiry only moves on with a new version;
            // once it has passed, the store tells when the next one is due
            // (after a wait for that, the view's is still in the past, so
            // the store is read again).
            let soonest = self.view().soonest_expiry;
            let checked = if soonest.is_some_and(|at| at <= unix_now()) {
                let discovery = self.clone();
                tokio::task::spawn_blocking(move || {
                    let (due, next) = discovery.endpoint_expiries()?;
                    if due {
                        let version = discovery.changed()?;
                        tracing::info!(version, "expired endpoints removed");
                    }
                    Ok::<_, StoreError>(next)
                })
                .await
            } else {
                Ok(Ok(soonest))
            };
            let wait = match checked {
                // One second past the expiry, so the check sees it expired.
                Ok(Ok(Some(at))) => {
                    Duration::from_secs(u64::try_from(at - unix_now() + 1).unwrap_or(1))
                }
                Ok(Ok(None)) => Duration::from_secs(3600),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "checking endpoint expiry failed");
                    Duration::from_secs(5)
                }
                Err(_) => return,
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                changed = versions.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                () = crate::run::stopping(&mut shutdown) => return,
            }
        }
    }

    /// Whether an endpoint of the current view has expired, and the soonest
    /// address expiry still to come.
    fn endpoint_expiries(&self) -> Result<(bool, Option<i64>), StoreError> {
        let now = unix_now();
        let view = self.view();
        let listed: std::collections::HashSet<(&str, &str)> = view
            .endpoints
            .iter()
            .map(|e| (e.address.as_str(), e.spiffe_id.as_str()))
            .collect();
        let mut due = false;
        let mut next: Option<i64> = None;
        for w in self.store.workloads()? {
            for a in &w.addresses {
                if a.expires_at_unix <= now {
                    due |= listed.contains(&(a.address.as_str(), w.spiffe_id.as_str()));
                } else {
                    next = Some(next.map_or(a.expires_at_unix, |n| n.min(a.expires_at_unix)));
                }
            }
        }
        Ok((due, next))
    }

    /// Announcements of new versions.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    pub fn current_version(&self) -> u64 {
        self.view.read().expect("not poisoned").version
    }

    /// The version served now, with the epoch it was set in.
    pub fn current(&self) -> SnapshotVersion {
        self.view.read().expect("not poisoned").snapshot_version()
    }

    /// The content of every snapshot at the current version.
    pub fn view(&self) -> Arc<View> {
        self.view.read().expect("not poisoned").clone()
    }

    /// The mesh default when no policy decides.
    pub fn default_policy(&self) -> DefaultPolicy {
        self.default_policy
    }

    /// What applied policies are validated against: the mesh's opaque
    /// ports, where L7 rules could never be enforced, and the root
    /// namespace, outside which a policy selects only workloads of its own
    /// namespace.
    pub fn validation_context(&self) -> ValidationContext {
        ValidationContext {
            opaque_ports: self
                .mesh
                .opaque_ports
                .iter()
                .filter_map(|p| u16::try_from(*p).ok())
                .collect(),
            stored: false,
            scope: self.scope.clone(),
        }
    }

    /// The policies that select `id`, at the current version.
    pub fn policies_for(&self, id: &SpiffeId) -> Vec<Policy> {
        self.view().policies_for(id)
    }

    /// The snapshot for the sidecar `id` at the current version.
    pub fn snapshot_for(&self, id: &SpiffeId) -> Snapshot {
        self.snapshot_in(&self.view(), id)
    }

    /// The snapshot for the sidecar `id` in `view`.
    pub fn snapshot_in(&self, view: &View, id: &SpiffeId) -> Snapshot {
        Snapshot {
            version: view.version,
            version_epoch: view.epoch,
            trust_bundle: self.bundle.clone(),
            endpoints: view.endpoints.as_ref().clone(),
            policies: view.policies_for(id),
            mesh: Some(self.mesh.clone()),
            rate_limits: view.rate_limits_for(id),
            endpoints_version: 0,
            services: view.services.as_ref().clone(),
            endpoint_changes: None,
            revocations: view.revocations.as_ref().clone(),
        }
    }

    /// The snapshot for the sidecar `id` in `view`, encoded: only its own
    /// fields are encoded here, the shared ones were encoded with the view.
    /// With [`EndpointsIn::Same`], the sidecar holds the snapshot of that
    /// version, whose endpoints and services are `view`'s: they are left
    /// out and the snapshot refers to them; with [`EndpointsIn::Changes`],
    /// the snapshot refers to them and carries what changed.
    pub fn encoded_snapshot_in(
        &self,
        view: &View,
        id: &SpiffeId,
        endpoints: &EndpointsIn,
    ) -> EncodedSnapshot {
        let endpoints_version = match endpoints {
            EndpointsIn::Full => 0,
            EndpointsIn::Same(version) | EndpointsIn::Changes(version, _) => *version,
        };
        let own = Snapshot {
            version: view.version,
            version_epoch: view.epoch,
            policies: view.policies_for(id),
            rate_limits: view.rate_limits_for(id),
            endpoints_version,
            ..Snapshot::default()
        };
        let mut parts = vec![
            EncodedSnapshot::part(&own),
            self.constant_part.clone(),
            view.revocations_part.clone(),
        ];
        match endpoints {
            EndpointsIn::Full => parts.push(view.endpoints_part.clone()),
            EndpointsIn::Same(_) => {}
            EndpointsIn::Changes(_, changes) => parts.push(changes.clone()),
        }
        EncodedSnapshot::from_parts(parts)
    }

    /// What changed from `held` to `view`'s endpoints and services,
    /// encoded as a snapshot part; `None` when that is no smaller than
    /// sending them all. Computed once per starting content for every
    /// stream (the changes to the current view are kept until it moves
    /// on).
    pub fn endpoint_changes(&self, held: &HeldEndpoints, view: &View) -> Option<Bytes> {
        let mut cache = self.changes.lock().expect("not poisoned");
        if cache.to != view.endpoints_token {
            cache.to = view.endpoints_token;
            cache.from.clear();
        }
        if let Some(part) = cache.from.get(&held.token) {
            return part.clone();
        }
        let changes = changes_between(held, view);
        let part = EncodedSnapshot::part(&Snapshot {
            endpoint_changes: Some(changes),
            ..Snapshot::default()
        });
        let part = (part.len() < view.endpoints_part.len()).then_some(part);
        if cache.from.len() < CHANGES_KEPT {
            cache.from.insert(held.token, part.clone());
        }
        part
    }

    /// Marks a stream from `id`, on a connection from `from`, open until
    /// the returned guard is dropped; the guard records what the sidecar
    /// at its end answers. `presented` is the certificate the sidecar
    /// presented for the stream's connection, when it presented one in a
    /// full handshake; `opaque_ports` those the sidecar declares opaque on
    /// its own. Refused, opening nothing, past the [`WatchLimits`].
    pub fn try_open_stream(
        self: &Arc<Self>,
        id: &SpiffeId,
        from: IpAddr,
        presented: Option<PresentedCert>,
        opaque_ports: Vec<u16>,
    ) -> Result<StreamGuard, WatchLimitReached> {
        let limits = self.watch_limits;
        let mut sidecars = self.sidecars.lock().expect("not poisoned");
        // Checked and counted under the lock: streams opening at once
        // cannot all pass the same last free slot.
        let open = *self.open_streams.borrow();
        if open >= limits.total {
            return Err(WatchLimitReached::Total {
                limit: limits.total,
                id: id.clone(),
                from,
            });
        }
        let from_there = (sidecars.get(id))
            .and_then(|streams| streams.from.get(&from))
            .copied()
            .unwrap_or(0);
        if from_there >= limits.per_sidecar {
            return Err(WatchLimitReached::PerSidecar {
                limit: limits.per_sidecar,
                id: id.clone(),
                from,
            });
        }
        let streams = sidecars.entry(id.clone()).or_default();
        *streams.from.entry(from).or_default() += 1;
        let number = self
            .next_stream
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        streams.open.insert(
            number,
            SidecarStatus {
                streams: 1,
                opened_at_unix: crate::unix_now(),
                presented,
                opaque_ports,
                ..SidecarStatus::default()
            },
        );
        self.open_streams.send_modify(|open| *open += 1);
        drop(sidecars);
        Ok(StreamGuard {
            discovery: self.clone(),
            id: id.clone(),
            from,
            number,
        })
    }

    /// [`try_open_stream`](Self::try_open_stream) from an unspecified
    /// address, within the limits.
    #[cfg(test)]
    pub fn open_stream(
        self: &Arc<Self>,
        id: &SpiffeId,
        presented: Option<PresentedCert>,
        opaque_ports: Vec<u16>,
    ) -> StreamGuard {
        let from = IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);
        self.try_open_stream(id, from, presented, opaque_ports)
            .expect("within the Watch limits")
    }

    /// How many Watch streams are open now, over every identity.
    pub fn streams_open(&self) -> usize {
        *self.open_streams.borrow()
    }

    /// Resolves once no Watch stream is open.
    pub async fn streams_closed(&self) {
        let mut open = self.open_streams.subscribe();
        // The sender lives as long as `self`, so the wait cannot fail.
        let _ = open.wait_for(|open| *open == 0).await;
    }

    /// How many identities with an open Watch stream stand in each state
    /// of sync with the version served now (not connected ones are not
    /// counted): each as synced as its least synced stream.
    pub fn sync_counts(&self) -> [(SyncState, u64); 3] {
        let current = self.current_version();
        let mut counts = [
            (SyncState::Synced, 0),
            (SyncState::Pending, 0),
            (SyncState::Refused, 0),
        ];
        for streams in self.sidecars.lock().expect("not poisoned").values() {
            let least = streams.open.values().map(|s| s.sync(current)).max();
            if let Some((_, count)) = counts.iter_mut().find(|(s, _)| Some(*s) == least) {
                *count += 1;
            }
        }
        counts
    }

    /// Whether `version`, served by this replica, holds `write`. By
    /// version: whether it served the write's version, and `version` since
    /// it last did (`version` itself included), as a view loaded at or
    /// after one that held a write holds that write too. By position:
    /// whether `version`'s content reaches the write's position. False
    /// for a version it has not served, or served too long ago to
    /// remember ([`SERVED_KEPT`]).
    pub fn reached(&self, write: Write, version: u64) -> bool {
        self.served
            .lock()
            .expect("not poisoned")
            .reached(write, version)
    }

    /// Every identity that has had a Watch stream on this replica, with
    /// the status of each of its open streams, or, with none open, that of
    /// the one that closed last (its `streams` 0).
    pub fn statuses(&self) -> Vec<(SpiffeId, Vec<SidecarStatus>)> {
        let sidecars = self.sidecars.lock().expect("not poisoned");
        sidecars
            .iter()
            .map(|(id, streams)| {
                let statuses = match streams.open.is_empty() {
                    true => vec![streams.closed.clone()],
                    false => streams.open.values().cloned().collect(),
                };
                (id.clone(), statuses)
            })
            .collect()
    }

    fn with_stream(&self, id: &SpiffeId, number: u64, f: impl FnOnce(&mut SidecarStatus)) {
        let mut sidecars = self.sidecars.lock().expect("not poisoned");
        if let Some(status) = sidecars
            .get_mut(id)
            .and_then(|streams| streams.open.get_mut(&number))
        {
            f(status);
        }
    }
}

/// The Watch streams of one identity on this replica.
#[derive(Default)]
struct IdentityStreams {
    /// Each open stream's status, by the number it was opened with.
    open: BTreeMap<u64, SidecarStatus>,
    /// How many of them are open from each address.
    from: HashMap<IpAddr, usize>,
    /// The status of the stream that closed last, kept while none is open.
    closed: SidecarStatus,
}

/// An open Watch stream; records what the sidecar at its end answers, and
/// dropping it marks the stream closed.
pub struct StreamGuard {
    discovery: Arc<Discovery>,
    id: SpiffeId,
    from: IpAddr,
    number: u64,
}

impl StreamGuard {
    /// Records that the sidecar acknowledged `acked`: the last
    /// acknowledged, not the greatest, as versions of the Kubernetes store
    /// are content digests with no order. `holds` is the newest version
    /// with the same content for it, when the stream knows it (the
    /// acknowledged snapshot was the last one it sent). `warnings`, which
    /// the caller has bounded, are what the sidecar enforces otherwise than
    /// sent.
    pub fn ack(
        &self,
        acked: SnapshotVersion,
        holds: Option<SnapshotVersion>,
        warnings: Vec<String>,
    ) {
        self.discovery.with_stream(&self.id, self.number, |s| {
            s.acked_version = acked.version;
            s.acked_epoch = acked.epoch;
            s.last_nack.clear();
            s.ack_warnings = warnings;
            if let Some(holds) = holds {
                s.synced_version = holds.version;
                s.synced_epoch = holds.epoch;
            }
        });
    }

    /// Records that the sidecar, which accepted the last snapshot it was
    /// sent, holds the content of `version` too: nothing it is sent
    /// changed.
    pub fn holds(&self, version: SnapshotVersion) {
        self.discovery.with_stream(&self.id, self.number, |s| {
            s.synced_version = version.version;
            s.synced_epoch = version.epoch;
        });
    }

    /// Records that the sidecar refused a snapshot for `reason`, which the
    /// caller has bounded (the Watch stream keeps what its log line shows).
    pub fn nack(&self, reason: &str) {
        self.discovery
            .with_stream(&self.id, self.number, |s| s.last_nack = reason.to_owned());
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        {
            let mut sidecars = self.discovery.sidecars.lock().expect("not poisoned");
            if let Some(streams) = sidecars.get_mut(&self.id)
                && let Some(status) = streams.open.remove(&self.number)
            {
                streams.closed = SidecarStatus {
                    streams: 0,
                    ..status
                };
                if let Some(from_there) = streams.from.get_mut(&self.from) {
                    *from_there -= 1;
                    if *from_there == 0 {
                        streams.from.remove(&self.from);
                    }
                }
            }
            // Under the lock, as opening counts it.
            self.discovery
                .open_streams
                .send_modify(|open| *open = open.saturating_sub(1));
        }
    }
}

/// What every snapshot shares, as the store settles it: sidecars that
/// reconnect holding the stored version are sent nothing until the next
/// change, so a restart with another mesh config or trust bundle (a new
/// signing CA, an added or dropped trust anchor) must be a new version.
fn encode_constant_part(mesh: &MeshConfig, bundle: &[Vec<u8>]) -> String {
    use sha2::{Digest, Sha256};
    let mut encoded = format!(
        "default_policy={};outbound_policy={}",
        mesh.default_policy, mesh.outbound_policy
    );
    // Written only when set, so a store from before the field existed
    // sees the same config and keeps its version.
    if !mesh.opaque_ports.is_empty() {
        let ports: Vec<String> = mesh.opaque_ports.iter().map(u32::to_string).collect();
        encoded.push_str(&format!(";opaque_ports={}", ports.join(",")));
    }
    // Always written, unlike the ports: a store from before it sees one new
    // version, once; in exchange every bundle, a lone root included, has a
    // version of its own. DER is self-delimiting, so the roots in order
    // need no separator.
    let mut digest = Sha256::new();
    for root in bundle {
        digest.update(root);
    }
    encoded.push_str(&format!(";trust_bundle={}", hex::encode(digest.finalize())));
    encoded
}

/// Whether an address that `state`'s version published (unexpired when the
/// version was set; any, when the store does not know when that was) has
/// expired by `now`.
fn published_since_expired(state: &DiscoveryState, now: i64) -> bool {
    state.workloads.iter().flat_map(|w| &w.addresses).any(|a| {
        a.expires_at_unix <= now
            && state
                .version_set_at_unix
                .is_none_or(|set_at| a.expires_at_unix > set_at)
    })
}

/// Endpoints and services in `view` that are not in `held` as they are
/// there (joined or changed), and the addresses of those in `held` that
/// `view` no longer has, each in the order of its list.
fn changes_between(held: &HeldEndpoints, view: &View) -> EndpointChanges {
    let (endpoints, removed_endpoints) =
        by_address(&held.endpoints, &view.endpoints, |e: &Endpoint| &e.address);
    let (services, removed_services) =
        by_address(&held.services, &view.services, |s: &Service| &s.address);
    EndpointChanges {
        endpoints,
        removed_endpoints,
        services,
        removed_services,
    }
}

/// What `new` has that `old` does not have as it is (keyed by `address`),
/// and the addresses of what `old` has that `new` does not.
fn by_address<'a, T: Clone + PartialEq>(
    old: &'a [T],
    new: &'a [T],
    address: impl Fn(&'a T) -> &'a str,
) -> (Vec<T>, Vec<String>) {
    let before: HashMap<&str, &T> = old.iter().map(|item| (address(item), item)).collect();
    let after: HashMap<&str, &T> = new.iter().map(|item| (address(item), item)).collect();
    let changed = new
        .iter()
        .filter(|item| before.get(address(item)) != Some(item))
        .cloned()
        .collect();
    let gone = old
        .iter()
        .filter(|item| !after.contains_key(address(item)))
        .map(|item| address(item).to_owned())
        .collect();
    (changed, gone)
}

#[cfg(test)]
mod tests;
