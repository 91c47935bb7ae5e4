//! Group commit of issuances for the embedded store.
//!
//! Every Certify ends in a durable write (the token consumed, the
//! certificate logged, the workload upserted), and a durable redb commit
//! costs an `fdatasync`. One writer thread owns these writes: it takes
//! every issuance waiting when it is free (and, while commits are being
//! shared, those that arrive within [`GATHER`]), applies them one after
//! another in a single write transaction and commits once, so concurrent
//! Certify calls share one sync. Each caller gets its answer only after the commit
//! that holds its record returned, so an answered issuance is as durable
//! as before. The answer travels on a oneshot channel, so an async caller
//! awaits it without holding a thread of its own. A batch that changed the
//! mesh endpoints bumps the snapshot version in the same commit, once. The
//! issued-certificate log is appended to in sequence (new records fill its
//! last page instead of landing on random pages, as records keyed by serial
//! did) and pruned from its oldest end to the store's retention in the same
//! commit. Each
//! issuance checks its token (a renewal by certificate: that no revocation
//! of its identity covers the certificate, however recently stored), and
//! the addresses it reports against those
//! other live workloads hold (loopback and unspecified addresses are every
//! network namespace's own and have no owner), before it writes anything,
//! so a refused one changes nothing, whatever its neighbours in the batch
//! do (two in one batch claiming one address: the second sees the first's
//! claim); a failed commit fails the whole batch and writes none of it.
//!
//! Addresses are owned by IP. An unverified address (the control plane
//! could not see the sidecar at its IP: the other IP family, or
//! `--trust-reported-addresses`) is refused at an IP another live workload
//! holds, on any port. A verified one (the Certify came from its IP) is
//! the sidecar's for certain: it shares the IP with other workloads'
//! verified claims (several sidecars on one host, each on its own port;
//! one `ip:port` still has one owner) and takes the IP from their
//! unverified ones, which are dropped from those workloads.
//!
//! This module never decides who may have a certificate; it only makes
//! the store's decision durable.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redb::{Database, ReadableTable, ReadableTableMetadata, TableHandle};
use tokio::sync::oneshot;
use trellis_core::SpiffeId;

use super::{
    ENDPOINT_OWNERS, ISSUED_LOG, JOIN_TOKENS, META, REVOCATIONS, SNAPSHOT_VERSION,
    SNAPSHOT_VERSION_SET_AT, WORKLOADS, decode, encode, get_u64, set_snapshot_version,
};
use crate::net::is_namespace_local;
use crate::store::{
    EndpointChange, InboundAddress, IssuanceProof, IssuedCertRecord, JoinToken,
    MAX_WORKLOAD_ADDRESSES, Revocation, StoreError, TokenClaim, TokenRefusal, WorkloadRecord,
};

/// The most issuances one commit holds: bounds the transaction and the
/// wait of the first caller in it.
const MAX_BATCH: usize = 256;

/// How long a batch's first issuance waits for others to join it, when the
/// last commit was shared: under load a commit's `fdatasync` and page
/// writes are then paid by more issuances (the control plane spent about
/// 7 % less CPU a certificate with 64 clients), while a lone renewal on a
/// quiet control plane is committed at once.
const GATHER: Duration = Duration::from_micros(500);

/// An issuance waiting for its commit, owned so it can cross to the writer.
struct Issuance {
    proof: Option<OwnedProof>,
    issued: IssuedCertRecord,
    workload: WorkloadRecord,
    answer: oneshot::Sender<Result<EndpointChange, StoreError>>,
    /// Set when the caller has gone away.
    abandoned: Option<Arc<AtomicBool>>,
}

enum OwnedProof {
    Token {
        hash: [u8; 32],
        spiffe_id: SpiffeId,
        now_unix: i64,
    },
    Certificate {
        issued_at_unix: Option<i64>,
    },
}

impl OwnedProof {
    fn new(proof: IssuanceProof<'_>) -> Self {
        match proof {
            IssuanceProof::Token(c) => OwnedProof::Token {
                hash: *c.hash,
                spiffe_id: c.spiffe_id.clone(),
                now_unix: c.now_unix,
            },
            IssuanceProof::Certificate { issued_at_unix } => {
                OwnedProof::Certificate { issued_at_unix }
            }
        }
    }

    fn borrowed(&self) -> IssuanceProof<'_> {
        match self {
            OwnedProof::Token {
                hash,
                spiffe_id,
                now_unix,
            } => IssuanceProof::Token(TokenClaim {
                hash,
                spiffe_id,
                now_unix: *now_unix,
            }),
            OwnedProof::Certificate { issued_at_unix } => IssuanceProof::Certificate {
                issued_at_unix: *issued_at_unix,
            },
        }
    }
}

/// The handle to the writer thread; dropping it stops the thread and waits
/// for it, so the database file is closed when the store is.
pub(super) struct IssuanceWriter {
    queue: Mutex<Option<Sender<Issuance>>>,
    thread: Option<JoinHandle<()>>,
    path: String,
}

impl IssuanceWriter {
    /// Starts the writer; the issued-certificate log keeps the newest
    /// `retained` issuances, and snapshot versions are set in `epoch`.
    pub(super) fn start(
        db: Arc<Database>,
        path: String,
        retained: u64,
        epoch: u64,
        failure: Arc<super::WriteFailure>,
    ) -> std::io::Result<Self> {
        let (queue, waiting) = mpsc::channel();
        let thread_path = path.clone();
        // The thread logs where the code that opened the store logs: the
        // process's subscriber, or a test's own.
        let logs = tracing::dispatcher::get_default(Clone::clone);
        let thread = std::thread::Builder::new()
            .name("store-issuance".into())
            .spawn(move || {
                tracing::dispatcher::with_default(&logs, || {
                    run(&db, &thread_path, retained, epoch, &waiting, &failure)
                })
            })?;
        Ok(IssuanceWriter {
            queue: Mutex::new(Some(queue)),
            thread: Some(thread),
            path,
        })
    }

    /// Records one issuance and returns once it is durable (or refused).
    /// Blocks the calling thread: call it where blocking is allowed.
    pub(super) fn record(
        &self,
        proof: Option<IssuanceProof<'_>>,
        issued: &IssuedCertRecord,
        workload: &WorkloadRecord,
    ) -> Result<EndpointChange, StoreError> {
        self.queue(proof, issued, workload, None)
            .blocking_recv()
            .unwrap_or_else(|_| Err(self.stopped()))
    }

    /// Queues one issuance without blocking; the answer arrives once it is
    /// durable (or refused). One proved by a token whose caller has set
    /// `abandoned` by the time its batch is applied is refused
    /// ([`StoreError::Abandoned`]) and leaves the token unused.
    pub(super) fn queue(
        &self,
        proof: Option<IssuanceProof<'_>>,
        issued: &IssuedCertRecord,
        workload: &WorkloadRecord,
        abandoned: Option<&Arc<AtomicBool>>,
    ) -> oneshot::Receiver<Result<EndpointChange, StoreError>> {
        let (answer, reply) = oneshot::channel();
        let issuance = Issuance {
            proof: proof.map(OwnedProof::new),
            issued: issued.clone(),
            workload: workload.clone(),
            answer,
            abandoned: abandoned.cloned(),
        };
        // A stopped writer drops the issuance, and with it the answer's
        // sender: the caller hears that the writer has stopped.
        if let Some(queue) = &*self.queue.lock().unwrap_or_else(|e| e.into_inner()) {
            let _ = queue.send(issuance);
        }
        reply
    }

    fn stopped(&self) -> StoreError {
        StoreError::Database {
            path: self.path.clone(),
            reason: "the issuance writer has stopped".into(),
        }
    }
}

impl Drop for IssuanceWriter {
    fn drop(&mut self) {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(
    db: &Database,
    path: &str,
    retained: u64,
    epoch: u64,
    waiting: &Receiver<Issuance>,
    failure: &super::WriteFailure,
) {
    let mut shared = false;
    while let Ok(first) = waiting.recv() {
        let mut batch = vec![first];
        let until = Instant::now() + if shared { GATHER } else { Duration::ZERO };
        while batch.len() < MAX_BATCH {
            let left = until.saturating_duration_since(Instant::now());
            match waiting.recv_timeout(left) {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        shared = batch.len() > 1;
        match commit(db, &batch, retained, epoch, failure) {
            Ok(outcomes) => {
                for (issuance, outcome) in batch.into_iter().zip(outcomes) {
                    let _ = issuance.answer.send(outcome);
                }
            }
            Err(failed) => {
                for issuance in batch {
                    let (path, reason) = (path.to_string(), failed.reason.clone());
                    let _ = issuance.answer.send(Err(if failed.io {
                        StoreError::WriteFailed { path, reason }
                    } else {
                        StoreError::Database { path, reason }
                    }));
                }
            }
        }
    }
}

/// Why a batch's transaction failed, and whether it was an I/O error
/// (a full volume, EIO) that the write failure noted.
struct Failed {
    reason: String,
    io: bool,
}

impl Failed {
    fn noted(failure: &super::WriteFailure, e: impl Into<redb::Error>) -> Self {
        let e = failure.note(e);
        Self {
            io: matches!(e, redb::Error::Io(_) | redb::Error::PreviousIo),
            reason: e.to_string(),
        }
    }
}

impl From<StoreError> for Failed {
    fn from(e: StoreError) -> Self {
        Self {
            reason: e.to_string(),
            io: false,
        }
    }
}

/// Applies `batch` in order in one transaction and commits it. A refused
/// issuance (or one that meets a corrupt record) gets its own answer;
/// a failed write aborts the whole transaction and is every issuance's
/// answer.
fn commit(
    db: &Database,
    batch: &[Issuance],
    retained: u64,
    epoch: u64,
    failure: &super::WriteFailure,
) -> Result<Vec<Result<EndpointChange, StoreError>>, Failed> {
    let txn = db.begin_write().map_err(|e| Failed::noted(failure, e))?;
    let mut outcomes = Vec::with_capacity(batch.len());
    let version_set_at = version_set_at(&txn)?;
    {
        // Opened once for the batch: opening and closing a table reads and
        // writes the database's table of tables.
        let mut tables = Tables::open(&txn)?;
        for issuance in batch {
            // A token used for a caller that is gone would be lost to its
            // retry, which comes with the same token.
            let gone = issuance
                .abandoned
                .as_ref()
                .is_some_and(|a| a.load(Ordering::Acquire));
            if gone && matches!(issuance.proof, Some(OwnedProof::Token { .. })) {
                outcomes.push(Err(StoreError::Abandoned));
                continue;
            }
            let outcome = record_one(
                &mut tables,
                issuance.proof.as_ref().map(OwnedProof::borrowed),
                &issuance.issued,
                &issuance.workload,
                version_set_at,
            )?;
            outcomes.push(outcome);
        }
        prune_log(&mut tables.log, retained)?;
    }
    // New endpoints are a new snapshot version, in the same commit: one
    // bump for the batch, never a version without its content.
    if outcomes
        .iter()
        .any(|o| matches!(o, Ok(EndpointChange::Changed)))
    {
        let bump = || {
            let mut meta = txn.open_table(META)?;
            let next = get_u64(&meta, SNAPSHOT_VERSION)? + 1;
            set_snapshot_version(&mut meta, next, epoch)?;
            Ok::<_, StoreError>(())
        };
        bump()?;
    }
    txn.commit().map_err(|e| Failed::noted(failure, e))?;
    Ok(outcomes)
}

/// When the snapshot version was set, if the store knows.
fn version_set_at(txn: &redb::WriteTransaction) -> Result<Option<i64>, StoreError> {
    let meta = txn.open_table(META)?;
    let set_at = match meta.get(SNAPSHOT_VERSION_SET_AT)? {
        Some(v) => Some(decode(v.value(), SNAPSHOT_VERSION_SET_AT)?),
        None => None,
    };
    Ok(set_at)
}

/// The tables an issuance writes, open in one write transaction.
struct Tables<'txn> {
    tokens: redb::Table<'txn, &'static [u8], &'static [u8]>,
    log: redb::Table<'txn, u64, &'static [u8]>,
    workloads: redb::Table<'txn, &'static str, &'static [u8]>,
    owners: redb::Table<'txn, &'static str, &'static str>,
    revocations: redb::Table<'txn, &'static str, &'static [u8]>,
}

impl<'txn> Tables<'txn> {
    fn open(txn: &'txn redb::WriteTransaction) -> Result<Self, StoreError> {
        Ok(Tables {
            tokens: txn.open_table(JOIN_TOKENS)?,
            log: txn.open_table(ISSUED_LOG)?,
            workloads: txn.open_table(WORKLOADS)?,
            owners: txn.open_table(ENDPOINT_OWNERS)?,
            revocations: txn.open_table(REVOCATIONS)?,
        })
    }
}

/// One issuance in the batch's `tables`: the inner result is its answer,
/// the outer error a failed write that must abort the transaction.
/// Everything that may refuse is read and decided before the first write,
/// so a refused issuance leaves the transaction as it found it. The token
/// is checked before the addresses, so only a caller with a proof hears
/// whether an address is held. Addresses are owned by IP (see the module
/// docs). `version_set_at` is when the snapshot version was set before the
/// batch (`None` when the store does not know): an expired address dropped
/// now was published by that version if it expired after.
fn record_one(
    tables: &mut Tables<'_>,
    proof: Option<IssuanceProof<'_>>,
    issued: &IssuedCertRecord,
    workload: &WorkloadRecord,
    version_set_at: Option<i64>,
) -> Result<Result<EndpointChange, StoreError>, StoreError> {
    let Tables {
        tokens,
        log,
        workloads,
        owners,
        revocations,
    } = tables;
    let now = workload.last_seen_unix;
    let claim = match proof {
        Some(IssuanceProof::Token(claim)) => Some(claim),
        _ => None,
    };
    let decided = (|| {
        if let Some(IssuanceProof::Certificate { issued_at_unix }) = proof {
            refuse_revoked(revocations, &workload.spiffe_id, issued_at_unix, now)?;
        }
        let token = match claim {
            Some(claim) => Some(consume(tokens, claim)?),
            None => None,
        };
        let previous: Option<WorkloadRecord> = match workloads.get(workload.spiffe_id.as_str())? {
            Some(v) => Some(decode(v.value(), "workload")?),
            None => None,
        };
        // The other workloads' unverified claims a verified address takes,
        // by holder.
        let mut taken: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for reported in &workload.addresses {
            let address = &reported.address;
            if is_namespace_local(address) {
                continue;
            }
            for (holder, held) in live_holders_at_ip(owners, workloads, address, workload, now)? {
                let holds_it_verified = held.iter().any(|h| h.address == *address && h.verified);
                if !reported.verified || holds_it_verified {
                    return Err(StoreError::AddressHeld {
                        address: address.clone(),
                        holder,
                    });
                }
                let unverified: BTreeSet<String> = held
                    .into_iter()
                    .filter(|h| !h.verified)
                    .map(|h| h.address)
                    .collect();
                if !unverified.is_empty() {
                    taken.entry(holder).or_default().extend(unverified);
                }
            }
        }
        Ok::<_, StoreError>((token, previous, taken))
    })();
    let (token, previous, taken) = match decided {
        Ok(decided) => decided,
        Err(e) => return Ok(Err(e)),
    };
    let previous = previous.map(|p| p.addresses).unwrap_or_default();
    let mut record = workload.clone();
    // What this Certify reported, each until the later of its new and its
    // stored expiry (two sidecars of the identity may report one loopback
    // address), verified if either claim is...
    for reported in &mut record.addresses {
        if let Some(stored) = previous.iter().find(|p| p.address == reported.address) {
            reported.verified |= stored.verified && stored.expires_at_unix > now;
            reported.expires_at_unix = reported.expires_at_unix.max(stored.expires_at_unix);
        }
    }
    // ...and the addresses other sidecars of the identity reported, until
    // their own expiry, less those another live workload took meanwhile.
    for stored in &previous {
        if stored.expires_at_unix <= now
            || workload
                .addresses
                .iter()
                .any(|r| r.address == stored.address)
        {
            continue;
        }
        if is_namespace_local(&stored.address)
            || live_holder(owners, workloads, &stored.address, workload, now)?.is_none()
        {
            record.addresses.push(stored.clone());
        }
    }
    // Stable: addresses that expire together keep the order reported.
    record
        .addresses
        .sort_by_key(|a| std::cmp::Reverse(a.expires_at_unix));
    record.addresses.truncate(MAX_WORKLOAD_ADDRESSES);

    if let (Some(claim), Some(token)) = (claim, token) {
        tokens.insert(claim.hash.as_slice(), encode(&token).as_slice())?;
    }
    log.insert(next_sequence(log)?, encode(issued).as_slice())?;
    for (holder, addresses) in &taken {
        take_from(workloads, owners, holder, addresses)?;
        let addresses: Vec<&String> = addresses.iter().collect();
        tracing::info!(
            spiffe_id = %record.spiffe_id,
            holder,
            addresses = %trellis_core::logging::List(&addresses),
            "an inbound address verified by its connection took its IP from another \
             workload's unverified claim"
        );
    }
    let kept: HashSet<&str> = record
        .addresses
        .iter()
        .map(|a| a.address.as_str())
        .collect();
    for stored in previous
        .iter()
        .filter(|p| !kept.contains(p.address.as_str()))
    {
        if owners
            .get(stored.address.as_str())?
            .is_some_and(|owner| owner.value() == record.spiffe_id)
        {
            owners.remove(stored.address.as_str())?;
        }
    }
    for address in record.addresses.iter().map(|a| a.address.as_str()) {
        if !is_namespace_local(address)
            && owners
                .get(address)?
                .is_none_or(|owner| owner.value() != record.spiffe_id)
        {
            owners.insert(address, record.spiffe_id.as_str())?;
        }
    }
    workloads.insert(record.spiffe_id.as_str(), encode(&record).as_slice())?;
    // Only addresses are endpoints: a client-only workload (no inbound
    // address) joining or renewing changes no snapshot, nor does a renewal
    // that only moves its addresses' expiry on, so neither costs a push to
    // every sidecar.
    let live = |addresses: &[InboundAddress]| -> BTreeSet<String> {
        addresses
            .iter()
            .filter(|a| a.expires_at_unix > now)
            .map(|a| a.address.clone())
            .collect()
    };
    // An address that expired after the current version was set may be in
    // its snapshots still (until discovery's expiry check withdraws it);
    // dropped from the store, only a new version withdraws it.
    let withdrawn = previous.iter().any(|p| {
        p.expires_at_unix <= now && version_set_at.is_none_or(|set_at| p.expires_at_unix > set_at)
    });
    Ok(Ok(
        if withdrawn || !taken.is_empty() || live(&previous) != live(&record.addresses) {
            EndpointChange::Changed
        } else {
            EndpointChange::Unchanged
        },
    ))
}

/// The workload other than `claimant` that holds `address` at `now`: the
/// owner the index names, while it reports the address unexpired.
fn live_holder(
    owners: &redb::Table<'_, &str, &str>,
    workloads: &redb::Table<'_, &str, &[u8]>,
    address: &str,
    claimant: &WorkloadRecord,
    now: i64,
) -> Result<Option<String>, StoreError> {
    let Some(owner) = owners.get(address)?.map(|o| o.value().to_owned()) else {
        return Ok(None);
    };
    if owner == claimant.spiffe_id {
        return Ok(None);
    }
    let Some(value) = workloads.get(owner.as_str())? else {
        return Ok(None);
    };
    let holder: WorkloadRecord = decode(value.value(), "workload")?;
    let holds = holder.live_addresses(now).any(|a| a.address == address);
    Ok(holds.then_some(owner))
}

/// The workloads other than `claimant` that hold an address at the IP of
/// `address` at `now`, each with those of its live addresses at that IP:
/// the owners the index names at that IP (its keys are canonical `ip:port`,
/// so `ip:` begins exactly that IP's).
fn live_holders_at_ip(
    owners: &redb::Table<'_, &str, &str>,
    workloads: &redb::Table<'_, &str, &[u8]>,
    address: &str,
    claimant: &WorkloadRecord,
    now: i64,
) -> Result<Vec<(String, Vec<InboundAddress>)>, StoreError> {
    let Some(at_ip) = ip_prefix(address) else {
        return Ok(Vec::new());
    };
    let mut named = BTreeSet::new();
    for entry in owners.range(at_ip..)? {
        let (key, owner) = entry?;
        if !key.value().starts_with(at_ip) {
            break;
        }
        if owner.value() != claimant.spiffe_id {
            named.insert(owner.value().to_owned());
        }
    }
    let mut holders = Vec::new();
    for owner in named {
        let Some(value) = workloads.get(owner.as_str())? else {
            continue;
        };
        let holder: WorkloadRecord = decode(value.value(), "workload")?;
        let held: Vec<InboundAddress> = holder
            .live_addresses(now)
            .filter(|a| ip_prefix(&a.address) == Some(at_ip))
            .cloned()
            .collect();
        if !held.is_empty() {
            holders.push((owner, held));
        }
    }
    Ok(holders)
}

/// `ip:` of a canonical `ip:port` (`10.0.0.1:`, `[fd00::1]:`).
fn ip_prefix(address: &str) -> Option<&str> {
    address.rfind(':').map(|colon| &address[..=colon])
}

/// Drops `addresses` from `holder`'s record and from the owner index.
fn take_from(
    workloads: &mut redb::Table<'_, &str, &[u8]>,
    owners: &mut redb::Table<'_, &str, &str>,
    holder: &str,
    addresses: &BTreeSet<String>,
) -> Result<(), StoreError> {
    let stored = workloads.get(holder)?.map(|v| v.value().to_vec());
    let Some(stored) = stored else {
        return Ok(());
    };
    let mut record: WorkloadRecord = decode(&stored, "workload")?;
    record.addresses.retain(|a| !addresses.contains(&a.address));
    workloads.insert(holder, encode(&record).as_slice())?;
    for address in addresses {
        if owners
            .get(address.as_str())?
            .is_some_and(|owner| owner.value() == holder)
        {
            owners.remove(address.as_str())?;
        }
    }
    Ok(())
}

/// The sequence number the log's next record takes.
pub(super) fn next_sequence(log: &redb::Table<'_, u64, &[u8]>) -> Result<u64, StoreError> {
    Ok(log.last()?.map_or(0, |(key, _)| key.value() + 1))
}

/// Drops the log's oldest records until it holds at most `retained`.
pub(super) fn prune_log(
    log: &mut redb::Table<'_, u64, &[u8]>,
    retained: u64,
) -> Result<(), StoreError> {
    while log.len()? > retained {
        log.pop_first()?;
    }
    Ok(())
}

/// Refuses a renewal of `spiffe_id` by a certificate issued at
/// `issued_at_unix` (`None`: not known) that its revocation covers at
/// `now`: read in the issuance's transaction, so a revocation committed
/// after the renewal's own check still stops it.
fn refuse_revoked(
    revocations: &redb::Table<'_, &str, &[u8]>,
    spiffe_id: &str,
    issued_at_unix: Option<i64>,
    now: i64,
) -> Result<(), StoreError> {
    let Some(value) = revocations.get(spiffe_id)? else {
        return Ok(());
    };
    let revocation: Revocation = decode(value.value(), REVOCATIONS.name())?;
    if revocation.is_stale(now) || issued_at_unix.is_some_and(|at| !revocation.covers(at)) {
        return Ok(());
    }
    Err(StoreError::Revoked(revocation))
}

/// The claimed token, marked used, if it proves the claim's identity now.
fn consume(
    tokens: &redb::Table<'_, &[u8], &[u8]>,
    claim: TokenClaim<'_>,
) -> Result<JoinToken, StoreError> {
    let mut token = check_token(tokens, claim)?;
    token.used = true;
    Ok(token)
}

/// The token `claim` names, if it grants the claim's identity now: known,
/// unused, unexpired, and made for that identity.
pub(super) fn check_token(
    tokens: &impl ReadableTable<&'static [u8], &'static [u8]>,
    claim: TokenClaim<'_>,
) -> Result<JoinToken, StoreError> {
    let token: JoinToken = match tokens.get(claim.hash.as_slice())? {
        Some(v) => decode(v.value(), "join token")?,
        None => return Err(TokenRefusal::Unknown.into()),
    };
    if token.used {
        return Err(TokenRefusal::Used.into());
    }
    if token.expires_at_unix <= claim.now_unix {
        return Err(TokenRefusal::Expired.into());
    }
    if token.spiffe_id != claim.spiffe_id.as_str() {
        return Err(TokenRefusal::OtherIdentity {
            granted: token.spiffe_id,
        }
        .into());
    }
    Ok(token)
}
