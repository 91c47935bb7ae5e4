//! The control plane's state behind one trait: join tokens (hashed),
//! workloads, the issued-certificate log, revoked identities (the embedded
//! store only), versioned authorization policies
//! and rate limits (RateLimitPolicy), and the snapshot version counter.
//!
//! [`Store`] is what the API layer talks to: the embedded backend (redb in
//! the state dir) or the Kubernetes backend ([`kubernetes`]: CRDs, Pods,
//! Services and EndpointSlices, and a Secret). Every method is one
//! transaction: a refused call changes nothing. This module never sees a
//! token in clear, only its SHA-256 hash, and never signs anything.

pub mod embedded;
pub mod kubernetes;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use serde::{Deserialize, Serialize};
use trellis_core::SpiffeId;
use trellis_proto::admin::v1::RateLimitRecord;
use trellis_proto::discovery::v1::Service;
use trellis_proto::policy::v1::{Policy, RateLimit};

pub use embedded::EmbeddedStore;
pub use kubernetes::KubernetesStore;

/// A join token as stored: the token itself is never kept, only its hash
/// (the key of the record).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    pub spiffe_id: String,
    pub expires_at_unix: i64,
    pub used: bool,
}

/// The most inbound addresses one workload (SPIFFE ID) keeps. Every Certify
/// reports at most 16 and keeps the other unexpired ones of the identity,
/// so sidecars sharing an identity, or one whose addresses keep changing,
/// would otherwise grow its record for as long as they renew; past this
/// many, those that expire soonest are dropped. A record of this many
/// addresses is about 100 KB.
pub const MAX_WORKLOAD_ADDRESSES: usize = 1024;

/// One inbound address ("ip:port") of a workload, a mesh endpoint until
/// it expires.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InboundAddress {
    pub address: String,
    /// notAfter of the newest certificate issued by a Certify that reported
    /// the address: a sidecar that stops renewing leaves the endpoints when
    /// its certificate ends, while the other sidecars of its identity stay.
    pub expires_at_unix: i64,
    /// Whether a Certify that reported it came from its IP (the control
    /// plane saw the sidecar connect from there), so the identity is known
    /// to be at that IP: such a claim may share the IP with other
    /// identities' verified claims (one host, several sidecars) and takes
    /// it from their unverified ones.
    pub verified: bool,
}

/// A workload the control plane has issued a certificate to.
///
/// Stored as JSON in the third format: `addresses`, each address's own
/// expiry in `address_expires_at_unix` and, for a control plane rolled
/// back to the single-address format, `address` (the first one). A record
/// of the second format (`addresses` only) or of the first (only
/// `address`) reads as those addresses, each expiring with the record's
/// certificate, as they all did then.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "StoredWorkload", into = "StoredWorkload")]
pub struct WorkloadRecord {
    pub spiffe_id: String,
    /// Every inbound address its sidecars reported that the store keeps,
    /// each a mesh endpoint until its own expiry (a dual-stack pod has an
    /// IPv4 and an IPv6 one; two sidecars sharing an identity one or more
    /// each), those that expire last first; empty when unknown.
    pub addresses: Vec<InboundAddress>,
    /// notAfter of the newest certificate issued to it.
    pub cert_expires_at_unix: i64,
    /// When that certificate was issued, Unix seconds; 0 when not known
    /// (a Pod, or a record written before this was kept).
    pub cert_issued_at_unix: i64,
    pub last_seen_unix: i64,
}

impl WorkloadRecord {
    /// A workload whose `addresses` are all mesh endpoints until
    /// `cert_expires_at_unix`: what one Certify reports, or a Pod.
    pub fn new(
        spiffe_id: impl Into<String>,
        addresses: impl IntoIterator<Item = String>,
        cert_expires_at_unix: i64,
        last_seen_unix: i64,
    ) -> Self {
        WorkloadRecord {
            spiffe_id: spiffe_id.into(),
            addresses: addresses
                .into_iter()
                .map(|address| InboundAddress {
                    address,
                    expires_at_unix: cert_expires_at_unix,
                    verified: false,
                })
                .collect(),
            cert_expires_at_unix,
            cert_issued_at_unix: 0,
            last_seen_unix,
        }
    }

    /// The addresses that are mesh endpoints at `now`.
    pub fn live_addresses(&self, now: i64) -> impl Iterator<Item = &InboundAddress> {
        self.addresses
            .iter()
            .filter(move |a| a.expires_at_unix > now)
    }

    /// The addresses a listing shows at `now`: those that are endpoints,
    /// or, when none is, every one it keeps (where it was when its
    /// certificates ended).
    pub fn listed_addresses(&self, now: i64) -> Vec<String> {
        let live: Vec<String> = self
            .live_addresses(now)
            .map(|a| a.address.clone())
            .collect();
        if !live.is_empty() {
            return live;
        }
        self.addresses.iter().map(|a| a.address.clone()).collect()
    }
}

/// [`WorkloadRecord`] as stored, in the current and the two previous
/// formats.
#[derive(Clone, Serialize, Deserialize)]
struct StoredWorkload {
    spiffe_id: String,
    /// The first address; the only one in the first format.
    #[serde(default)]
    address: String,
    /// Every address; since the second format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    addresses: Option<Vec<String>>,
    /// Each address's own expiry; since the third format. An address
    /// missing here expires with `cert_expires_at_unix`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    address_expires_at_unix: BTreeMap<String, i64>,
    /// The addresses a Certify reported from their own IP
    /// ([`InboundAddress::verified`]); an address missing here (every one
    /// of a record written before there was this field) is unverified.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    verified_addresses: BTreeSet<String>,
    cert_expires_at_unix: i64,
    /// When the certificate of `cert_expires_at_unix` was issued; missing
    /// from a record written before it was kept, which reads as 0 (not
    /// known).
    #[serde(default, skip_serializing_if = "is_zero")]
    cert_issued_at_unix: i64,
    last_seen_unix: i64,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

impl From<StoredWorkload> for WorkloadRecord {
    fn from(s: StoredWorkload) -> Self {
        let addresses = match s.addresses {
            Some(addresses) => addresses,
            None if s.address.is_empty() => Vec::new(),
            None => vec![s.address],
        };
        let expiries = s.address_expires_at_unix;
        let verified = s.verified_addresses;
        WorkloadRecord {
            spiffe_id: s.spiffe_id,
            addresses: addresses
                .into_iter()
                .map(|address| InboundAddress {
                    expires_at_unix: expiries
                        .get(&address)
                        .copied()
                        .unwrap_or(s.cert_expires_at_unix),
                    verified: verified.contains(&address),
                    address,
                })
                .collect(),
            cert_expires_at_unix: s.cert_expires_at_unix,
            cert_issued_at_unix: s.cert_issued_at_unix,
            last_seen_unix: s.last_seen_unix,
        }
    }
}

impl From<WorkloadRecord> for StoredWorkload {
    fn from(w: WorkloadRecord) -> Self {
        StoredWorkload {
            spiffe_id: w.spiffe_id,
            address: w
                .addresses
                .first()
                .map(|a| a.address.clone())
                .unwrap_or_default(),
            address_expires_at_unix: w
                .addresses
                .iter()
                .map(|a| (a.address.clone(), a.expires_at_unix))
                .collect(),
            verified_addresses: w
                .addresses
                .iter()
                .filter(|a| a.verified)
                .map(|a| a.address.clone())
                .collect(),
            addresses: Some(w.addresses.into_iter().map(|a| a.address).collect()),
            cert_expires_at_unix: w.cert_expires_at_unix,
            cert_issued_at_unix: w.cert_issued_at_unix,
            last_seen_unix: w.last_seen_unix,
        }
    }
}

/// One line of the issued-certificate log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedCertRecord {
    pub serial_hex: String,
    pub spiffe_id: String,
    pub not_after_unix: i64,
    pub issued_at_unix: i64,
}

/// A revoked SPIFFE ID: none of its certificates issued at or before
/// `revoked_at_unix` renews.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub spiffe_id: String,
    pub revoked_at_unix: i64,
    /// Why, as the operator said; may be empty.
    #[serde(default)]
    pub reason: String,
}

/// How long a revocation is kept: a certificate issued before then has
/// expired, however long its lifetime ([`crate::config::MAX_CERT_TTL`] at
/// most, backdated by [`crate::ca::BACKDATE`]), so an older revocation
/// covers no certificate that could still renew.
pub const REVOCATION_KEPT: std::time::Duration = std::time::Duration::from_secs(
    crate::config::MAX_CERT_TTL.as_secs() + crate::ca::BACKDATE.as_secs(),
);

impl Revocation {
    /// Whether it stops a certificate issued at `issued_at_unix` from
    /// renewing (and sidecars from accepting it as a peer: they apply the
    /// same rule).
    pub fn covers(&self, issued_at_unix: i64) -> bool {
        trellis_core::revocation::covers(self.revoked_at_unix, issued_at_unix)
    }

    /// Whether it is older than [`REVOCATION_KEPT`] at `now_unix`: every
    /// certificate it covers has expired, and the store drops it.
    pub fn is_stale(&self, now_unix: i64) -> bool {
        self.revoked_at_unix < now_unix.saturating_sub(REVOCATION_KEPT.as_secs() as i64)
    }
}

/// What a store that records no certificate per workload (the Kubernetes
/// store) knows of certificates from its issued-certificate log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IssuedLogView {
    /// The log holds every certificate this replica issued since then,
    /// Unix seconds: since it started, or later once the bounded log has
    /// dropped its oldest records.
    pub complete_since_unix: i64,
    /// The newest certificate of each identity the log holds.
    pub newest: Vec<IssuedCertRecord>,
}

/// A join token offered as proof for a Certify.
#[derive(Clone, Copy, Debug)]
pub struct TokenClaim<'a> {
    pub hash: &'a [u8; 32],
    /// The identity the CSR asks for; must be the one the token grants.
    pub spiffe_id: &'a SpiffeId,
    pub now_unix: i64,
}

/// What a Certify proved its identity with, where the store decides
/// whether it still does, in the issuance's own transaction.
#[derive(Clone, Copy, Debug)]
pub enum IssuanceProof<'a> {
    /// A join token: checked and used.
    Token(TokenClaim<'a>),
    /// A certificate of the identity, issued at `issued_at_unix` (`None`:
    /// when is not known): refused when a revocation of the identity covers
    /// it ([`StoreError::Revoked`]), so a revocation stored after the
    /// caller's was read still stops the renewal.
    Certificate { issued_at_unix: Option<i64> },
}

impl<'a> From<TokenClaim<'a>> for IssuanceProof<'a> {
    fn from(claim: TokenClaim<'a>) -> Self {
        IssuanceProof::Token(claim)
    }
}

/// Why a join token does not prove an identity.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    #[error("join token is unknown")]
    Unknown,
    #[error("join token has expired")]
    Expired,
    #[error("join token was already used")]
    Used,
    #[error("join token grants {granted}, not the identity in the CSR")]
    OtherIdentity { granted: String },
    #[error(
        "join tokens are not used with the Kubernetes store: sidecars prove their identity \
         with a projected ServiceAccount token"
    )]
    Disabled,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// `path` is as errors name a path ([`crate::escape::shown`]).
    #[error("database {path}: {reason}")]
    Database { path: String, reason: String },
    /// A write to the embedded database met an I/O error (a full volume,
    /// EIO): nothing was written, and the control plane stops so that a
    /// restart reopens the file.
    #[error(
        "database {path}: a write failed ({reason}); nothing was written: free space on its \
         volume or fix the disk; this control plane stops so that its next start reopens the \
         database"
    )]
    WriteFailed { path: String, reason: String },
    #[error("database record {what} is corrupt: {reason}")]
    Corrupt { what: String, reason: String },
    #[error(transparent)]
    Token(#[from] TokenRefusal),
    /// An issuance reported an inbound address whose IP another workload
    /// holds unexpired, and the report could not show that the workload is
    /// at that IP too (or both claim the very same address): an address
    /// has one owner, and an IP is not taken on a sidecar's word.
    #[error(
        "inbound address {address} is at an IP that {holder} holds, whose certificate is still valid"
    )]
    AddressHeld { address: String, holder: String },
    /// A renewal by a certificate that a revocation of its identity
    /// covers.
    #[error("{} was revoked at {} (Unix seconds)", .0.spiffe_id, .0.revoked_at_unix)]
    Revoked(Revocation),
    #[error(transparent)]
    Kubernetes(#[from] kubernetes::KubeStoreError),
    /// The store keeps no revocations (the Kubernetes store: its sidecars
    /// renew with their ServiceAccount token).
    #[error(
        "the Kubernetes store keeps no revocations: its sidecars renew with their ServiceAccount \
         token, so delete the pod (or its ServiceAccount) to stop a workload from renewing"
    )]
    RevocationsUnsupported,
    /// The caller went away while its issuance, which would have used a
    /// join token, waited for its commit: nothing was written.
    #[error("the caller went away before its issuance was recorded")]
    Abandoned,
}

impl StoreError {
    /// The status a call that met `self` answers with: UNAVAILABLE for a
    /// failed write (the disk, not the request: worth retrying, at another
    /// replica or once this one restarted), INTERNAL otherwise.
    pub fn into_status(self) -> tonic::Status {
        match self {
            StoreError::WriteFailed { .. } => tonic::Status::unavailable(self.to_string()),
            other => tonic::Status::internal(other.to_string()),
        }
    }
}

/// What a recorded issuance changed for discovery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndpointChange {
    /// The mesh endpoints changed: an address joined, came back after it
    /// expired, or left (an expired one the current snapshot version may
    /// have published is dropped from the store).
    Changed,
    Unchanged,
}

/// What applying one policy did (or, in a dry run, would do).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyOutcome {
    Created,
    Updated,
    /// Same content as stored: nothing written, the revision stays.
    Unchanged,
}

/// One policy of a write: its revision after the write, and what happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppliedPolicy {
    pub namespace: String,
    pub name: String,
    pub revision: u64,
    pub outcome: PolicyOutcome,
}

/// What one write of both policy kinds did, in the order they were given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppliedDocuments {
    pub policies: Vec<AppliedPolicy>,
    pub rate_limits: Vec<AppliedPolicy>,
    pub generation: Generation,
}

impl AppliedDocuments {
    /// Whether the write changed anything stored.
    pub fn changed(&self) -> bool {
        self.policies
            .iter()
            .chain(&self.rate_limits)
            .any(|a| a.outcome != PolicyOutcome::Unchanged)
    }
}

/// The counters after a policy write. Both move only when something changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Generation {
    /// Store-wide: increases with every write that changes a policy or a
    /// rate limit.
    pub policies: u64,
    /// The snapshot version, bumped in the same transaction.
    pub snapshot: u64,
    /// The epoch `snapshot` was set in ([`DiscoveryState::epoch`]): 0 when
    /// the version alone names the content, or was set before there were
    /// epochs.
    pub epoch: u64,
    /// Where the write stands in the store's history of policies: a view
    /// that has reached it holds the write, or a later change of what it
    /// wrote.
    pub position: Position,
}

/// How far into the store's history of each policy kind a view reaches:
/// it holds every change of that kind up to here. Unlike a snapshot
/// version (the Kubernetes store's are digests of content), positions are
/// ordered, so a replica that loaded a write together with other changes,
/// or after changes the writing replica had not seen, can still tell that
/// it holds the write.
///
/// The embedded store's position is its snapshot version, for both kinds.
/// The Kubernetes store's is, per kind, the highest resourceVersion its
/// watch of that kind has delivered: the API server delivers a kind's
/// events in resourceVersion order, so a cache that has applied one holds
/// every change of the kind before it. (resourceVersions are numbers in
/// every API server; the cache already relies on that to drop stale
/// events.)
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Position {
    pub policies: u64,
    pub rate_limits: u64,
}

impl Position {
    /// A store whose one counter orders every change.
    pub fn at(version: u64) -> Self {
        Position {
            policies: version,
            rate_limits: version,
        }
    }

    /// Whether a view at this position holds a write at `written` (0 for
    /// a kind the write did not touch).
    pub fn covers(&self, written: &Position) -> bool {
        self.policies >= written.policies && self.rate_limits >= written.rate_limits
    }

    /// As the admin API carries it.
    pub fn from_proto(position: &trellis_proto::admin::v1::StorePosition) -> Self {
        Position {
            policies: position.policies,
            rate_limits: position.rate_limits,
        }
    }

    /// The later of the two, kind by kind.
    pub fn max(self, other: Position) -> Position {
        Position {
            policies: self.policies.max(other.policies),
            rate_limits: self.rate_limits.max(other.rate_limits),
        }
    }
}

impl From<Position> for trellis_proto::admin::v1::StorePosition {
    fn from(position: Position) -> Self {
        trellis_proto::admin::v1::StorePosition {
            policies: position.policies,
            rate_limits: position.rate_limits,
        }
    }
}

/// What discovery builds snapshots from, read in one transaction so a
/// version always names exactly this content.
#[derive(Clone, Debug, Default)]
pub struct DiscoveryState {
    pub version: u64,
    /// The epoch `version` was set in: a store whose versions are counters
    /// sets them in a new epoch each time it is opened, so that one restored
    /// from an older copy never names other content with a version it named
    /// before. 0 when the version alone names the content (the Kubernetes
    /// store's are digests of it) or was set before there were epochs.
    pub epoch: u64,
    /// How far into the store's policy history this content reaches.
    pub position: Position,
    /// When `version` was set, Unix seconds; `None` when the store does not
    /// know. The endpoints it published were the addresses unexpired then.
    pub version_set_at_unix: Option<i64>,
    pub workloads: Vec<WorkloadRecord>,
    /// Ordered by `namespace/name`.
    pub policies: Vec<Policy>,
    /// Every rate limit as pushed (no revision), ordered by `namespace/name`.
    pub rate_limits: Vec<RateLimit>,
    /// Every virtual address (a Kubernetes Service's cluster IP and port)
    /// with its backends, ordered by address; empty in the embedded store,
    /// which knows no Services.
    pub services: Vec<Service>,
    /// Every revocation stored, ordered by SPIFFE ID; empty in the
    /// Kubernetes store, which keeps none.
    pub revocations: Vec<Revocation>,
}

/// Whether two policies differ in anything but their revision: an apply of
/// the same content writes nothing and keeps the revision.
pub(crate) fn same_content(a: &Policy, b: &Policy) -> bool {
    Policy {
        revision: 0,
        ..a.clone()
    } == Policy {
        revision: 0,
        ..b.clone()
    }
}

/// The control plane's persistent state.
pub trait Store: Send + Sync + 'static {
    /// Stores a new join token under the SHA-256 hash of its value. A store
    /// may drop tokens that expired long before `now_unix` in the same write.
    fn add_join_token(
        &self,
        hash: &[u8; 32],
        token: &JoinToken,
        now_unix: i64,
    ) -> Result<(), StoreError>;

    /// Whether `claim` would be accepted now: the check
    /// [`Store::record_issuance`] makes before it uses the token, made
    /// ahead and only reading, so a made-up or spent token is refused
    /// before a certificate is signed for it. The issuance still decides
    /// (another caller may use the token meanwhile). The default accepts,
    /// leaving the decision to the issuance.
    fn check_join_token(&self, claim: TokenClaim<'_>) -> Result<(), StoreError> {
        let _ = claim;
        Ok(())
    }

    /// Whether the mesh endpoints come from the addresses sidecars report
    /// when they certify (the embedded store), rather than from elsewhere
    /// (the Kubernetes store reads Pods, and ignores reports).
    fn takes_reported_addresses(&self) -> bool {
        true
    }

    /// Records an issued certificate and upserts its workload, in one
    /// transaction. With a `proof`, it is checked in the same transaction:
    /// a token is consumed, and a refused one ([`StoreError::Token`])
    /// changes nothing; a certificate a revocation covers is refused
    /// ([`StoreError::Revoked`], by a store that keeps revocations) and
    /// changes nothing. `workload.addresses` (what one Certify reported, each
    /// expiring with its certificate) are added to the workload's, or
    /// refreshed there (an address keeps the later of its two expiries);
    /// its other addresses stay until their own expiry (several sidecars
    /// may share an identity, each renewing its own), less any another live
    /// workload has taken since, and at most [`MAX_WORKLOAD_ADDRESSES`],
    /// those that expire soonest dropped. A store that takes addresses
    /// from what sidecars report owns them by IP: it refuses an unverified
    /// address ([`InboundAddress::verified`]) at an IP a different workload
    /// holds unexpired, and any address another workload holds itself
    /// unless it is verified and the holder's claim is not
    /// ([`StoreError::AddressHeld`]), deciding it in the same transaction,
    /// and changes nothing; a verified address takes its IP from the other
    /// workloads' unverified claims. A [`EndpointChange::Changed`]
    /// issuance has bumped the snapshot version in that same transaction, so
    /// the caller only refreshes discovery.
    fn record_issuance(
        &self,
        proof: Option<IssuanceProof<'_>>,
        issued: &IssuedCertRecord,
        workload: &WorkloadRecord,
    ) -> Result<EndpointChange, StoreError>;

    /// [`Store::record_issuance`] for async callers: the answer comes on the
    /// receiver, and the caller's thread is not held meanwhile. A closed
    /// receiver means the store stopped before answering. The caller sets
    /// `abandoned` when it goes away: an issuance proved by a token that
    /// is still waiting then is not applied ([`StoreError::Abandoned`]), so
    /// the token stays unused for the caller's next try. The default
    /// answers at once, which suits stores whose `record_issuance` does not
    /// block.
    fn queue_issuance(
        &self,
        proof: Option<IssuanceProof<'_>>,
        issued: &IssuedCertRecord,
        workload: &WorkloadRecord,
        abandoned: &Arc<AtomicBool>,
    ) -> tokio::sync::oneshot::Receiver<Result<EndpointChange, StoreError>> {
        let _ = abandoned;
        let (answer, reply) = tokio::sync::oneshot::channel();
        let _ = answer.send(self.record_issuance(proof, issued, workload));
        reply
    }

    fn workloads(&self) -> Result<Vec<WorkloadRecord>, StoreError>;

    /// Revokes `spiffe_id` for `reason`, replacing a revocation it had;
    /// returns the revocation stored and the one replaced. It is stamped
    /// with the time inside the write's own transaction, so an issuance
    /// recorded after it sees it (a renewal it covers is refused there),
    /// and never earlier than the one it replaces (two revokes committed in
    /// the other order than they were stamped).
    /// The default (a store that keeps no revocations) refuses with
    /// [`StoreError::RevocationsUnsupported`].
    fn revoke(
        &self,
        spiffe_id: &str,
        reason: &str,
    ) -> Result<(Revocation, Option<Revocation>), StoreError> {
        let _ = (spiffe_id, reason);
        Err(StoreError::RevocationsUnsupported)
    }

    /// Removes the revocation of `spiffe_id` and returns it; `None` (and
    /// nothing changed) when it is not revoked.
    fn unrevoke(&self, spiffe_id: &str) -> Result<Option<Revocation>, StoreError> {
        let _ = spiffe_id;
        Err(StoreError::RevocationsUnsupported)
    }

    /// Every revocation, ordered by SPIFFE ID.
    fn revocations(&self) -> Result<Vec<Revocation>, StoreError> {
        Err(StoreError::RevocationsUnsupported)
    }

    /// The revocation of `spiffe_id`, read on every renewal by
    /// certificate; `None` when it is not revoked, as always in a store
    /// that keeps no revocations.
    fn revocation(&self, spiffe_id: &str) -> Result<Option<Revocation>, StoreError> {
        let _ = spiffe_id;
        Ok(None)
    }

    /// Whether this control plane has issued a certificate to
    /// `spiffe_id` (that the store still knows of): read when it is
    /// revoked, to warn of a revocation that may name no workload.
    fn issued_to(&self, spiffe_id: &str) -> Result<bool, StoreError> {
        Ok(!self
            .newest_issued(1, &|r| r.spiffe_id == spiffe_id)?
            .is_empty())
    }

    /// The newest `limit` records of the issued-certificate log that
    /// `matches` keeps, newest first, read from the newest end: a listing
    /// reads what it returns and what it skips, not the whole log.
    fn newest_issued(
        &self,
        limit: usize,
        matches: &dyn Fn(&IssuedCertRecord) -> bool,
    ) -> Result<Vec<IssuedCertRecord>, StoreError>;

    /// `None` for a store whose [`Store::workloads`] carry each workload's
    /// newest certificate (the embedded store). A store whose workloads
    /// carry none (the Kubernetes store: a Pod's record says `i64::MAX`)
    /// answers from its issued-certificate log instead, which a listing
    /// joins over the replicas.
    fn issued_log_view(&self) -> Option<IssuedLogView> {
        None
    }

    /// The current snapshot version (0 before the first change).
    fn snapshot_version(&self) -> Result<u64, StoreError>;

    /// The current snapshot version and how far into the store's policy
    /// history its content reaches. A store whose version orders every
    /// change is at its version.
    fn snapshot_position(&self) -> Result<(u64, Position), StoreError> {
        let version = self.snapshot_version()?;
        Ok((version, Position::at(version)))
    }

    /// Increments and returns the snapshot version.
    fn bump_snapshot_version(&self) -> Result<u64, StoreError>;

    /// Stores the encoded mesh config, bumping the snapshot version when it
    /// differs from the stored one; returns the current version.
    fn settle_mesh_config(&self, encoded: &str) -> Result<u64, StoreError>;

    /// [`apply_documents`](Self::apply_documents) with authorization
    /// policies only.
    fn apply_policies(
        &self,
        policies: &[Policy],
        dry_run: bool,
    ) -> Result<(Vec<AppliedPolicy>, Generation), StoreError> {
        let applied = self.apply_documents(policies, &[], dry_run)?;
        Ok((applied.policies, applied.generation))
    }

    /// Creates or updates `policies` and `rate_limits` (each validated and
    /// unique by namespace/name within its kind; the two kinds are separate
    /// name spaces) in one transaction: a document whose content differs
    /// from the stored one of its kind gets the next revision; when any
    /// changed, the policy generation and the snapshot version are bumped
    /// once. A `dry_run` reports the same outcomes and commits nothing.
    fn apply_documents(
        &self,
        policies: &[Policy],
        rate_limits: &[RateLimit],
        dry_run: bool,
    ) -> Result<AppliedDocuments, StoreError>;

    /// Every policy, ordered by `namespace/name`.
    fn policies(&self) -> Result<Vec<Policy>, StoreError>;

    fn policy(&self, namespace: &str, name: &str) -> Result<Option<Policy>, StoreError>;

    /// Removes a policy, bumping the generation and the snapshot version;
    /// `None` (and nothing changed) when there is no such policy.
    fn delete_policy(&self, namespace: &str, name: &str) -> Result<Option<Generation>, StoreError>;

    /// Every rate limit with its revision, ordered by `namespace/name`.
    fn rate_limits(&self) -> Result<Vec<RateLimitRecord>, StoreError>;

    fn rate_limit(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<RateLimitRecord>, StoreError>;

    /// Removes a rate limit, bumping the generation and the snapshot
    /// version; `None` (and nothing changed) when there is no such one.
    fn delete_rate_limit(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<Generation>, StoreError>;

    /// The current counters.
    fn generation(&self) -> Result<Generation, StoreError>;

    /// The snapshot version with the workloads, policies and rate limits it
    /// stands for.
    fn discovery_state(&self) -> Result<DiscoveryState, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(address: &str, expires_at_unix: i64) -> InboundAddress {
        InboundAddress {
            address: address.into(),
            expires_at_unix,
            verified: false,
        }
    }

    #[test]
    fn a_workload_record_of_the_single_address_format_reads_as_one_address() {
        let old = r#"{"spiffe_id":"spiffe://td/ns/a/sa/b","address":"10.0.0.1:15006",
                      "cert_expires_at_unix":100,"last_seen_unix":1}"#;
        let record: WorkloadRecord = serde_json::from_str(old).unwrap();
        assert_eq!(record.addresses, [address("10.0.0.1:15006", 100)]);
        let unknown = r#"{"spiffe_id":"spiffe://td/ns/a/sa/b","address":"",
                          "cert_expires_at_unix":100,"last_seen_unix":1}"#;
        let record: WorkloadRecord = serde_json::from_str(unknown).unwrap();
        assert!(record.addresses.is_empty());
    }

    /// Before addresses had their own expiry, they all ended with the
    /// record's certificate.
    #[test]
    fn a_workload_record_of_the_addresses_format_reads_each_expiring_with_the_certificate() {
        let old = r#"{"spiffe_id":"spiffe://td/ns/a/sa/b","address":"10.0.0.1:15006",
                      "addresses":["10.0.0.1:15006","[fd00::1]:15006"],
                      "cert_expires_at_unix":100,"last_seen_unix":1}"#;
        let record: WorkloadRecord = serde_json::from_str(old).unwrap();
        assert_eq!(
            record.addresses,
            [
                address("10.0.0.1:15006", 100),
                address("[fd00::1]:15006", 100)
            ]
        );
        assert_eq!(record.cert_expires_at_unix, 100);
        // Nor did they keep when it was issued.
        assert_eq!(record.cert_issued_at_unix, 0);
    }

    #[test]
    fn a_workload_record_keeps_each_address_s_expiry_and_the_older_formats_fields() {
        let record = WorkloadRecord {
            spiffe_id: "spiffe://td/ns/a/sa/b".into(),
            addresses: vec![
                address("10.0.0.1:15006", 300),
                address("[fd00::1]:15006", 300),
                address("10.0.0.9:15006", 200),
            ],
            cert_expires_at_unix: 300,
            cert_issued_at_unix: 240,
            last_seen_unix: 1,
        };
        let stored: serde_json::Value = serde_json::to_value(&record).unwrap();
        assert_eq!(stored["cert_issued_at_unix"], 240);
        // What a control plane rolled back to an older format reads.
        assert_eq!(stored["address"], "10.0.0.1:15006");
        assert_eq!(
            stored["addresses"],
            serde_json::json!(["10.0.0.1:15006", "[fd00::1]:15006", "10.0.0.9:15006"])
        );
        assert_eq!(stored["address_expires_at_unix"]["10.0.0.9:15006"], 200);
        let back: WorkloadRecord = serde_json::from_value(stored).unwrap();
        assert_eq!(back, record);
    }

    /// An address a record lists without an expiry of its own ends with the
    /// record's certificate, and an expiry for an address it does not list
    /// is no address.
    #[test]
    fn an_address_without_an_expiry_of_its_own_ends_with_the_certificate() {
        let mixed = r#"{"spiffe_id":"spiffe://td/ns/a/sa/b","address":"10.0.0.1:15006",
                        "addresses":["10.0.0.1:15006","10.0.0.2:15006"],
                        "address_expires_at_unix":{"10.0.0.2:15006":50,"10.0.0.3:15006":70},
                        "cert_expires_at_unix":100,"last_seen_unix":1}"#;
        let record: WorkloadRecord = serde_json::from_str(mixed).unwrap();
        assert_eq!(
            record.addresses,
            [
                address("10.0.0.1:15006", 100),
                address("10.0.0.2:15006", 50)
            ]
        );
    }

    #[test]
    fn a_listing_shows_the_live_addresses_or_where_a_gone_workload_was() {
        let record = WorkloadRecord {
            spiffe_id: "spiffe://td/ns/a/sa/b".into(),
            addresses: vec![
                address("10.0.0.1:15006", 300),
                address("10.0.0.2:15006", 200),
            ],
            cert_expires_at_unix: 300,
            cert_issued_at_unix: 240,
            last_seen_unix: 1,
        };
        assert_eq!(
            record.listed_addresses(100),
            ["10.0.0.1:15006", "10.0.0.2:15006"]
        );
        assert_eq!(record.listed_addresses(250), ["10.0.0.1:15006"]);
        assert_eq!(
            record.listed_addresses(400),
            ["10.0.0.1:15006", "10.0.0.2:15006"]
        );
    }
}
