//! The embedded store: one redb database file in the state dir.
//!
//! Values are JSON so records can gain fields without a migration. Every
//! trait method runs in one redb transaction (crash-safe, all or nothing).
//! Tables: `join_tokens` (hash -> JoinToken), `join_tokens_by_expiry`
//! ((expiry, hash) -> (), so that tokens long expired are found from its
//! start and removed when a token is added), `workloads` (SPIFFE ID ->
//! WorkloadRecord, each inbound address with its own expiry),
//! `endpoint_owners` (inbound address -> the SPIFFE ID that holds it, so
//! an issuance finds an address's owner without reading every workload;
//! rebuilt from `workloads` on open; loopback and unspecified addresses,
//! every namespace's own, are never in it), `issued_log` (sequence number
//! -> IssuedCertRecord, the newest [`ISSUED_LOG_RETAINED`] issuances,
//! oldest first), `policies` (`namespace/name` -> the policy's protobuf
//! encoding, revision included: the very form pushed to sidecars, whose
//! fields are only ever added), `rate_limits` (`namespace/name` -> a
//! `RateLimitRecord`'s protobuf encoding: the pushed form and its
//! revision), `revocations` (SPIFFE ID -> Revocation, the identities
//! whose certificates up to a time no longer renew and sidecars refuse;
//! every revocation write sets a new snapshot version, as the snapshots
//! carry them; one older than
//! [`REVOCATION_KEPT`](super::REVOCATION_KEPT) covers only expired certificates, is not read by renewals, and
//! is removed when the database is opened and at every revocation write,
//! with a new snapshot version when any was), `meta` (counters: snapshot version, the epoch it was set
//! in and when, policy generation).
//!
//! The snapshot version is a counter, so a database restored from a backup
//! (or any older copy) counts again through versions it had already set,
//! with other content. So each open draws a random epoch, and every
//! version set while the database is open is set under it: a pair
//! (version, epoch) is set by one commit ever, and names its content.
//!
//! Issuances are written by one thread in group commits (the `issuance` module);
//! every other write is its own transaction.

mod issuance;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use prost::Message;
use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use trellis_core::policy::policy_key;
use trellis_proto::admin::v1::RateLimitRecord;
use trellis_proto::policy::v1::{Policy, RateLimit};

use super::{
    AppliedDocuments, AppliedPolicy, DiscoveryState, EndpointChange, Generation, IssuanceProof,
    IssuedCertRecord, JoinToken, PolicyOutcome, Position, Revocation, Store, StoreError,
    TokenClaim, WorkloadRecord, same_content,
};
use crate::escape::shown;
use crate::unix_now;

/// The database file name inside the state dir.
pub const DB_FILE: &str = "trellis.redb";

/// How long a join token is kept after it expires, used or not: a late
/// claim hears that the token expired (or was used), not that it is
/// unknown. After that the token is removed, the next time a token is
/// added.
pub const EXPIRED_TOKENS_KEPT_SECONDS: i64 = 24 * 3600;

/// How many issuances the issued-certificate log keeps, the newest. Every
/// renewal of every sidecar adds one, so an unbounded log would grow for as
/// long as the mesh runs; at about 150 bytes a record this is some 15 MB,
/// days of renewals for a mesh of thousands of workloads. Each issuance is
/// also logged (`issued SVID`) as it happens.
pub const ISSUED_LOG_RETAINED: u64 = 100_000;

const JOIN_TOKENS: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("join_tokens");
const TOKENS_BY_EXPIRY: TableDefinition<'_, (i64, [u8; 32]), ()> =
    TableDefinition::new("join_tokens_by_expiry");
const WORKLOADS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("workloads");
const ENDPOINT_OWNERS: TableDefinition<'_, &str, &str> = TableDefinition::new("endpoint_owners");
const ISSUED_LOG: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("issued_log");
/// The log as the first releases kept it: by serial, never pruned. Moved
/// into [`ISSUED_LOG`] when such a database is opened.
const ISSUED_BY_SERIAL: TableDefinition<'_, &str, &[u8]> =
    TableDefinition::new("issued_certificates");
const POLICIES: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("policies");
const RATE_LIMITS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("rate_limits");
const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");
const REVOCATIONS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("revocations");

const SNAPSHOT_VERSION: &str = "snapshot_version";
/// When the snapshot version was last set, Unix seconds: the endpoints it
/// published are the addresses unexpired then.
const SNAPSHOT_VERSION_SET_AT: &str = "snapshot_version_set_at";
/// The epoch the snapshot version was set in, with that version
/// ([`VersionEpoch`]).
const SNAPSHOT_EPOCH: &str = "snapshot_epoch";
const POLICY_GENERATION: &str = "policy_generation";
const MESH_CONFIG: &str = "mesh_config";

pub struct EmbeddedStore {
    db: Arc<Database>,
    path: PathBuf,
    /// Every snapshot version set while the database is open is set in
    /// this epoch, drawn at random when it was opened.
    epoch: u64,
    issuances: issuance::IssuanceWriter,
    failure: Arc<WriteFailure>,
}

/// Set once a write meets an I/O error (a full volume, EIO). redb then
/// refuses every later write, and reads past its cache, until the file is
/// reopened, however soon the cause is gone: a control plane that went on
/// would answer every Certify with an error until its sidecars' certificates
/// expired. The control plane stops instead ([`WriteFailure::failed`]), and
/// the next start reopens (and if need be repairs) the database.
#[derive(Debug)]
pub struct WriteFailure {
    path: String,
    reason: tokio::sync::watch::Sender<Option<String>>,
}

impl WriteFailure {
    fn new(path: &Path) -> Self {
        Self {
            path: shown(path),
            reason: tokio::sync::watch::Sender::new(None),
        }
    }

    /// Notes `e` if it is an I/O error, and returns it.
    fn note(&self, e: impl Into<redb::Error>) -> redb::Error {
        let e = e.into();
        if matches!(e, redb::Error::Io(_) | redb::Error::PreviousIo) {
            let reason = e.to_string();
            self.reason.send_if_modified(|held| {
                if held.is_some() {
                    return false;
                }
                tracing::error!(
                    path = %self.path,
                    error = %reason,
                    "the state database failed a write and refuses every write until it is \
                     reopened; stopping, so that a restart reopens it"
                );
                *held = Some(reason.clone());
                true
            });
        }
        e
    }

    /// `e` as a store error, noted as [`note`](Self::note) does:
    /// [`StoreError::WriteFailed`] when it is an I/O error.
    fn error(&self, e: impl Into<redb::Error>) -> StoreError {
        let e = self.note(e);
        let reason = e.to_string();
        if matches!(e, redb::Error::Io(_) | redb::Error::PreviousIo) {
            StoreError::WriteFailed {
                path: self.path.clone(),
                reason,
            }
        } else {
            StoreError::Database {
                path: self.path.clone(),
                reason,
            }
        }
    }

    /// Resolves with the I/O error once a write has met one.
    pub async fn failed(&self) -> String {
        let mut reason = self.reason.subscribe();
        let held = reason
            .wait_for(Option::is_some)
            .await
            .expect("the sender lives in self");
        held.clone().unwrap_or_default()
    }
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// What to do about a database file that cannot be read as one.
const CORRUPT_ADVICE: &str = "the file is left as it is: restore the state dir from a backup \
    taken while the control plane was stopped, or move the file aside to start with an empty \
    store";

/// Why the database could not be opened, in words that say what to do
/// where redb's do not: the lock it failed to take is another process's,
/// and a file that is no database (or a damaged one) is the operator's to
/// restore.
fn open_error(e: redb::DatabaseError) -> String {
    use std::io::ErrorKind;
    match e {
        redb::DatabaseError::DatabaseAlreadyOpen => "another process has it open: is a control \
            plane already running with this --state-dir? Stop it, or give this one a state dir \
            of its own"
            .to_owned(),
        redb::DatabaseError::Storage(redb::StorageError::Corrupted(_)) => {
            format!("{e}; {CORRUPT_ADVICE}")
        }
        redb::DatabaseError::Storage(redb::StorageError::Io(ref io))
            if matches!(io.kind(), ErrorKind::InvalidData | ErrorKind::UnexpectedEof) =>
        {
            format!("{e}; {CORRUPT_ADVICE}")
        }
        e => e.to_string(),
    }
}

/// The words of a caught panic.
fn panic_words(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic")
}

impl EmbeddedStore {
    /// Opens (or creates) the database at `path`. A file that is not a redb
    /// database is reported, never replaced.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_retaining(path, ISSUED_LOG_RETAINED)
    }

    /// [`EmbeddedStore::open`] with an issued-certificate log that keeps the
    /// newest `retained` issuances.
    pub(crate) fn open_retaining(path: &Path, retained: u64) -> Result<Self, StoreError> {
        // redb panics on some damaged pages (a page type it does not know)
        // where it returns an error on others: either is a damaged file,
        // said as one, not a crash with a backtrace.
        caught_quietly(|| Self::open_unguarded(path, retained)).unwrap_or_else(|panic| {
            Err(StoreError::Database {
                path: shown(path),
                reason: format!(
                    "DB corrupted: {}; {CORRUPT_ADVICE}",
                    panic_words(panic.as_ref())
                ),
            })
        })
    }

    fn open_unguarded(path: &Path, retained: u64) -> Result<Self, StoreError> {
        let database_error = |reason: String| StoreError::Database {
            path: shown(path),
            reason,
        };
        let db = Arc::new(Database::create(path).map_err(|e| database_error(open_error(e)))?);
        let failure = Arc::new(WriteFailure::new(path));
        let epoch = new_epoch();
        let issuances = issuance::IssuanceWriter::start(
            db.clone(),
            shown(path),
            retained,
            epoch,
            failure.clone(),
        )
        .map_err(|e| database_error(format!("starting the issuance writer: {e}")))?;
        let store = Self {
            db,
            path: path.to_path_buf(),
            epoch,
            issuances,
            failure,
        };
        store.write(|txn| {
            index_tokens_by_expiry(txn)?;
            index_endpoint_owners(txn)?;
            txn.open_table(POLICIES)?;
            txn.open_table(RATE_LIMITS)?;
            txn.open_table(META)?;
            // Snapshots carry every stored revocation: removing one is new
            // content, so a new version (of this open's epoch) names it.
            if prune_revocations(&mut txn.open_table(REVOCATIONS)?, unix_now())? > 0 {
                store.bump_in(txn)?;
            }
            let mut log = txn.open_table(ISSUED_LOG)?;
            let moved = move_log_by_serial(txn, &mut log)?;
            issuance::prune_log(&mut log, retained)?;
            if moved > 0 {
                tracing::info!(
                    path = %shown(path),
                    moved,
                    kept = log.len()?,
                    "moved the issued-certificate log to its bounded table"
                );
            }
            Ok(())
        })?;
        Ok(store)
    }

    fn db_error(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Database {
            path: shown(&self.path),
            reason: e.to_string(),
        }
    }

    /// A failed write as a store error: [`StoreError::WriteFailed`] for an
    /// I/O error (noted, so that the control plane stops).
    fn write_error(&self, e: impl Into<redb::Error>) -> StoreError {
        self.failure.error(e)
    }

    /// What the control plane waits on to stop when a write fails for good.
    pub fn write_failure(&self) -> Arc<WriteFailure> {
        self.failure.clone()
    }

    /// Moves the snapshot version on in `txn`; returns the new one.
    fn bump_in(&self, txn: &redb::WriteTransaction) -> Result<u64, StoreError> {
        let mut meta = txn.open_table(META)?;
        let next = get_u64(&meta, SNAPSHOT_VERSION)? + 1;
        set_snapshot_version(&mut meta, next, self.epoch)?;
        Ok(next)
    }

    /// Runs `f` in a write transaction committed only when `f` succeeds.
    fn write<T>(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.write_error(e))?;
        let value = f(&txn)?;
        txn.commit().map_err(|e| self.write_error(e))?;
        Ok(value)
    }

    /// [`write`](Self::write) for a change that may find nothing to do:
    /// `f` answers `None` for that, and the transaction is then dropped
    /// uncommitted, so a refused call leaves the database file as it was
    /// (a commit rewrites its header even when nothing changed).
    fn write_if<T>(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<Option<T>, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.write_error(e))?;
        let Some(value) = f(&txn)? else {
            txn.abort().map_err(|e| self.write_error(e))?;
            return Ok(None);
        };
        txn.commit().map_err(|e| self.write_error(e))?;
        Ok(Some(value))
    }

    fn read_all<K: redb::Key + 'static, T: DeserializeOwned>(
        &self,
        table: TableDefinition<'_, K, &[u8]>,
    ) -> Result<Vec<T>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.db_error(e))?;
        let name = table.name();
        let table = txn.open_table(table).map_err(|e| self.db_error(e))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| self.db_error(e))? {
            let (_, value) = entry.map_err(|e| self.db_error(e))?;
            out.push(decode(value.value(), name)?);
        }
        Ok(out)
    }

    /// Every record of the issued-certificate log, oldest first: what the
    /// tests check the log's order and bound against.
    #[cfg(test)]
    fn issued_certificates(&self) -> Result<Vec<IssuedCertRecord>, StoreError> {
        self.read_all(ISSUED_LOG)
    }

    /// Opens a write transaction, so every other write (the issuance
    /// writer's included) waits until it is dropped: what the tests hold a
    /// commit back with.
    #[cfg(test)]
    pub(crate) fn hold_writes(&self) -> redb::WriteTransaction {
        self.db.begin_write().expect("a write transaction")
    }
}

/// Opens the join-token tables and, where the expiry index does not cover
/// every token (a database written before there was one), builds it anew.
fn index_tokens_by_expiry(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    let tokens = txn.open_table(JOIN_TOKENS)?;
    if txn.open_table(TOKENS_BY_EXPIRY)?.len()? == tokens.len()? {
        return Ok(());
    }
    txn.delete_table(TOKENS_BY_EXPIRY)?;
    let mut by_expiry = txn.open_table(TOKENS_BY_EXPIRY)?;
    for entry in tokens.iter()? {
        let (hash, value) = entry?;
        let token: JoinToken = decode(value.value(), JOIN_TOKENS.name())?;
        let hash: [u8; 32] = hash.value().try_into().map_err(|_| StoreError::Corrupt {
            what: JOIN_TOKENS.name().to_string(),
            reason: format!("a key of {} bytes, not a SHA-256 hash", hash.value().len()),
        })?;
        by_expiry.insert((token.expires_at_unix, hash), ())?;
    }
    Ok(())
}

/// Builds the address -> owner index anew from the workloads: each address
/// goes to a workload that holds it unexpired, where one does (the first
/// by SPIFFE ID, should a store written before there was an index hold the
/// address twice), else to the first that reported it.
fn index_endpoint_owners(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    let now = unix_now();
    txn.delete_table(ENDPOINT_OWNERS)?;
    let workloads = txn.open_table(WORKLOADS)?;
    let mut owners = txn.open_table(ENDPOINT_OWNERS)?;
    // Whether each address's owner so far is live.
    let mut live_owner = std::collections::HashMap::new();
    for entry in workloads.iter()? {
        let (_, value) = entry?;
        let workload: WorkloadRecord = decode(value.value(), WORKLOADS.name())?;
        for entry in workload
            .addresses
            .iter()
            .filter(|a| !crate::net::is_namespace_local(&a.address))
        {
            let (address, live) = (&entry.address, entry.expires_at_unix > now);
            let taken = live_owner.get(address.as_str()).copied();
            if taken.is_none() || (taken == Some(false) && live) {
                owners.insert(address.as_str(), workload.spiffe_id.as_str())?;
                live_owner.insert(address.clone(), live);
            }
        }
    }
    Ok(())
}

/// Moves the records of a log kept by serial ([`ISSUED_BY_SERIAL`]) into
/// `log`, oldest issuance first, and drops the old table; returns how many
/// moved. Runs in the opening transaction, so a failure leaves the old
/// table as it was.
fn move_log_by_serial(
    txn: &redb::WriteTransaction,
    log: &mut redb::Table<'_, u64, &[u8]>,
) -> Result<u64, StoreError> {
    let old_name = ISSUED_BY_SERIAL.name();
    if !txn.list_tables()?.any(|t| t.name() == old_name) {
        return Ok(0);
    }
    let mut records = Vec::new();
    for entry in txn.open_table(ISSUED_BY_SERIAL)?.iter()? {
        let (_, value) = entry?;
        let record: IssuedCertRecord = decode(value.value(), old_name)?;
        records.push((record.issued_at_unix, value.value().to_vec()));
    }
    // Stable: records issued in the same second keep their serial order.
    records.sort_by_key(|(issued_at, _)| *issued_at);
    let first = issuance::next_sequence(log)?;
    for (sequence, (_, value)) in (first..).zip(&records) {
        log.insert(sequence, value.as_slice())?;
    }
    txn.delete_table(ISSUED_BY_SERIAL)?;
    Ok(records.len() as u64)
}

/// What a database shows of a mesh that has lived on it: certificates
/// issued, workloads, join tokens. Read by [`read_history`] without
/// writing, before the CA files are generated. Policies, rate limits and
/// revocations are not counted: they may be applied before any sidecar
/// joins, they name identities rather than anything the root signed, and
/// they stay in force under a new root.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MeshHistory {
    /// Issuances in the log (it keeps the newest [`ISSUED_LOG_RETAINED`]).
    pub issued: u64,
    /// The newest of them.
    pub newest: Option<IssuedCertRecord>,
    pub workloads: u64,
    pub join_tokens: u64,
}

impl MeshHistory {
    /// Whether nothing shows that the mesh has lived.
    pub fn is_empty(&self) -> bool {
        self.issued == 0 && self.workloads == 0 && self.join_tokens == 0
    }
}

impl std::fmt::Display for MeshHistory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let plural =
            |n: u64, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
        let mut parts = Vec::new();
        if self.issued > 0 {
            let mut issued = plural(self.issued, "certificate issued", "certificates issued");
            if let Some(newest) = &self.newest {
                issued.push_str(&format!(
                    ", the newest at {} (serial {}, to {})",
                    crate::api::rfc3339(newest.issued_at_unix),
                    crate::escape::escape_controls(&newest.serial_hex),
                    crate::escape::escape_controls(&newest.spiffe_id),
                ));
            }
            parts.push(issued);
        }
        if self.workloads > 0 {
            parts.push(plural(self.workloads, "workload", "workloads"));
        }
        if self.join_tokens > 0 {
            parts.push(plural(self.join_tokens, "join token", "join tokens"));
        }
        if parts.is_empty() {
            return f.write_str("nothing");
        }
        f.write_str(&parts.join("; "))
    }
}

/// Reads what the database at `path` shows of the mesh that lived on it,
/// writing nothing: not the file, not its header. A database another
/// process has open is an error saying so; one a crash or a live copy left
/// needing repair is repaired in memory, the file untouched. `None` when
/// there is no database, or one that cannot be read: its open says why.
pub fn read_history(path: &Path) -> Result<Option<MeshHistory>, StoreError> {
    if std::fs::metadata(path).map_or(true, |m| m.len() == 0) {
        return Ok(None);
    }
    caught_quietly(|| read_history_unguarded(path)).unwrap_or(Ok(None))
}

thread_local! {
    /// Whether a panic on this thread is caught by `caught_quietly`.
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, catching a panic of redb's on a damaged file without the
/// default hook printing it (its message and, with `RUST_BACKTRACE`, a
/// backtrace above the error that says what to do). Only panics on this
/// thread while `f` runs are kept quiet; every other goes to the hook
/// installed before.
fn caught_quietly<T>(f: impl FnOnce() -> T) -> std::thread::Result<T> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(std::cell::Cell::get) {
                previous(info);
            }
        }));
    });
    let was = QUIET.with(|quiet| quiet.replace(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET.with(|quiet| quiet.set(was));
    result
}

fn read_history_unguarded(path: &Path) -> Result<Option<MeshHistory>, StoreError> {
    let history = |db: &dyn ReadableDatabase| {
        let txn = db.begin_read().map_err(redb::Error::from)?;
        history_in(&txn)
            .map(Some)
            .map_err(|e| StoreError::Database {
                path: shown(path),
                reason: format!("cannot be read to see whether a mesh lived on it: {e}"),
            })
    };
    match redb::ReadOnlyDatabase::open(path) {
        Ok(db) => history(&db),
        Err(e @ redb::DatabaseError::DatabaseAlreadyOpen) => Err(StoreError::Database {
            path: shown(path),
            reason: open_error(e),
        }),
        // Not closed cleanly (a crash, a copy of a running database):
        // repaired as the open would, but on a copy in memory.
        Err(redb::DatabaseError::RepairAborted) => {
            use redb::StorageBackend;
            let Ok(bytes) = std::fs::read(path) else {
                return Ok(None);
            };
            let memory = redb::backends::InMemoryBackend::new();
            if memory.set_len(bytes.len() as u64).is_err() || memory.write(0, &bytes).is_err() {
                return Ok(None);
            }
            drop(bytes);
            match redb::Builder::new().create_with_backend(memory) {
                Ok(db) => history(&db),
                Err(_) => Ok(None),
            }
        }
        // Damaged or not a database: the open says so.
        Err(_) => Ok(None),
    }
}

/// Counts what `txn` holds of a mesh; a table not there holds nothing.
fn history_in(txn: &redb::ReadTransaction) -> Result<MeshHistory, StoreError> {
    fn count<K: redb::Key + 'static, V: redb::Value + 'static>(
        txn: &redb::ReadTransaction,
        table: TableDefinition<'_, K, V>,
    ) -> Result<u64, StoreError> {
        match txn.open_table(table) {
            Ok(t) => Ok(t.len()?),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }
    let mut history = MeshHistory {
        issued: count(txn, ISSUED_LOG)? + count(txn, ISSUED_BY_SERIAL)?,
        workloads: count(txn, WORKLOADS)?,
        join_tokens: count(txn, JOIN_TOKENS)?,
        newest: None,
    };
    if let Ok(log) = txn.open_table(ISSUED_LOG)
        && let Some((_, value)) = log.last()?
    {
        history.newest = decode(value.value(), ISSUED_LOG.name()).ok();
    }
    Ok(history)
}

impl From<redb::Error> for StoreError {
    fn from(e: redb::Error) -> Self {
        StoreError::Database {
            path: DB_FILE.to_string(),
            reason: e.to_string(),
        }
    }
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                redb::Error::from(e).into()
            }
        }
    )*};
}
from_redb!(
    redb::TableError,
    redb::StorageError,
    redb::TransactionError,
    redb::CommitError
);

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records serialize to JSON")
}

fn decode<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        what: what.to_string(),
        reason: e.to_string(),
    })
}

fn get_u64(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<u64, StoreError> {
    match table.get(key)? {
        Some(v) => decode(v.value(), key),
        None => Ok(0),
    }
}

fn decode_policy(bytes: &[u8], key: &str) -> Result<Policy, StoreError> {
    Policy::decode(bytes).map_err(|e| StoreError::Corrupt {
        what: format!("policy {key}"),
        reason: e.to_string(),
    })
}

fn read_policies(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<Vec<Policy>, StoreError> {
    let mut out = Vec::new();
    for entry in table.iter()? {
        let (key, value) = entry?;
        out.push(decode_policy(value.value(), key.value())?);
    }
    Ok(out)
}

fn decode_rate_limit(bytes: &[u8], key: &str) -> Result<RateLimitRecord, StoreError> {
    RateLimitRecord::decode(bytes).map_err(|e| StoreError::Corrupt {
        what: format!("rate limit {key}"),
        reason: e.to_string(),
    })
}

fn read_rate_limits(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<Vec<RateLimitRecord>, StoreError> {
    let mut out = Vec::new();
    for entry in table.iter()? {
        let (key, value) = entry?;
        out.push(decode_rate_limit(value.value(), key.value())?);
    }
    Ok(out)
}

/// The revision a document gets and what applying it does, given the stored
/// revision and whether the stored content is the same.
fn revise(stored: Option<(u64, bool)>) -> (u64, PolicyOutcome) {
    match stored {
        None => (1, PolicyOutcome::Created),
        Some((revision, true)) => (revision, PolicyOutcome::Unchanged),
        Some((revision, false)) => (revision + 1, PolicyOutcome::Updated),
    }
}

/// A random epoch for the versions one open of the database sets; never 0,
/// which stands for a version set before there were epochs.
fn new_epoch() -> u64 {
    rand::random::<u64>().max(1)
}

/// The epoch a snapshot version was set in, stored with that version: a
/// control plane rolled back to a release that predates epochs sets
/// versions without one, and the epoch left behind must not be read as
/// theirs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct VersionEpoch {
    version: u64,
    epoch: u64,
}

/// The epoch the stored snapshot version was set in; 0 when it was set
/// without one (by a release that predates epochs, or never).
fn stored_epoch(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<u64, StoreError> {
    let version = get_u64(table, SNAPSHOT_VERSION)?;
    let stored: Option<VersionEpoch> = match table.get(SNAPSHOT_EPOCH)? {
        Some(v) => Some(decode(v.value(), SNAPSHOT_EPOCH)?),
        None => None,
    };
    Ok(stored
        .filter(|s| s.version == version)
        .map_or(0, |s| s.epoch))
}

/// Sets the snapshot version in `epoch`, and records when.
fn set_snapshot_version(
    meta: &mut redb::Table<'_, &str, &[u8]>,
    version: u64,
    epoch: u64,
) -> Result<(), StoreError> {
    meta.insert(SNAPSHOT_VERSION, encode(&version).as_slice())?;
    meta.insert(
        SNAPSHOT_EPOCH,
        encode(&VersionEpoch { version, epoch }).as_slice(),
    )?;
    meta.insert(SNAPSHOT_VERSION_SET_AT, encode(&unix_now()).as_slice())?;
    Ok(())
}

/// Bumps the policy generation and the snapshot version (in `epoch`)
/// together.
fn bump_generation(
    meta: &mut redb::Table<'_, &str, &[u8]>,
    epoch: u64,
) -> Result<Generation, StoreError> {
    let snapshot = get_u64(meta, SNAPSHOT_VERSION)? + 1;
    let generation = Generation {
        policies: get_u64(meta, POLICY_GENERATION)? + 1,
        snapshot,
        epoch,
        position: Position::at(snapshot),
    };
    meta.insert(POLICY_GENERATION, encode(&generation.policies).as_slice())?;
    set_snapshot_version(meta, generation.snapshot, epoch)?;
    Ok(generation)
}

fn current_generation(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<Generation, StoreError> {
    let snapshot = get_u64(meta, SNAPSHOT_VERSION)?;
    Ok(Generation {
        policies: get_u64(meta, POLICY_GENERATION)?,
        snapshot,
        epoch: stored_epoch(meta)?,
        position: Position::at(snapshot),
    })
}

impl Store for EmbeddedStore {
    fn add_join_token(
        &self,
        hash: &[u8; 32],
        token: &JoinToken,
        now_unix: i64,
    ) -> Result<(), StoreError> {
        let removed = self.write(|txn| {
            let mut tokens = txn.open_table(JOIN_TOKENS)?;
            let mut by_expiry = txn.open_table(TOKENS_BY_EXPIRY)?;
            tokens.insert(hash.as_slice(), encode(token).as_slice())?;
            by_expiry.insert((token.expires_at_unix, *hash), ())?;
            let horizon = now_unix.saturating_sub(EXPIRED_TOKENS_KEPT_SECONDS);
            let mut removed = 0u64;
            for entry in by_expiry.extract_from_if(..(horizon, [0u8; 32]), |_, _| true)? {
                let (key, _) = entry?;
                tokens.remove(key.value().1.as_slice())?;
                removed += 1;
            }
            Ok(removed)
        })?;
        if removed > 0 {
            tracing::debug!(removed, "removed join tokens expired over a day ago");
        }
        Ok(())
    }

    fn record_issuance(
        &self,
        proof: Option<IssuanceProof<'_>>,
        issued: &IssuedCertRecord,
        workload: &WorkloadRecord,
    ) -> Result<EndpointChange, StoreError> {
        self.issuances.record(proof, issued, workload)
    }

    fn check_join_token(&self, claim: TokenClaim<'_>) -> Result<(), StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.db_error(e))?;
        let tokens = txn.open_table(JOIN_TOKENS).map_err(|e| self.db_error(e))?;
        issuance::check_token(&tokens, claim).map(drop)
    }

    fn queue_issuance(
        &self,
        proof: Option<IssuanceProof<'_>>,
        issued: &IssuedCertRecord,
        workload: &WorkloadRecord,
        abandoned: &Arc<AtomicBool>,
    ) -> tokio::sync::oneshot::Receiver<Result<EndpointChange, StoreError>> {
        self.issuances
            .queue(proof, issued, workload, Some(abandoned))
    }

    fn workloads(&self) -> Result<Vec<WorkloadRecord>, StoreError> {
        self.read_all(WORKLOADS)
    }

    fn revoke(
        &self,
        spiffe_id: &str,
        reason: &str,
    ) -> Result<(Revocation, Option<Revocation>), StoreError> {
        self.revoke_at(spiffe_id, reason, unix_now)
    }

    fn unrevoke(&self, spiffe_id: &str) -> Result<Option<Revocation>, StoreError> {
        self.write_if(|txn| {
            let mut table = txn.open_table(REVOCATIONS)?;
            let now = unix_now();
            let stored: Option<Revocation> = table
                .get(spiffe_id)?
                .map(|v| decode(v.value(), REVOCATIONS.name()))
                .transpose()?;
            // Not revoked (a stale revocation is none): answered before
            // anything is written, so the refusal changes nothing.
            let Some(removed) = stored.filter(|r| !r.is_stale(now)) else {
                return Ok(None);
            };
            table.remove(spiffe_id)?;
            prune_revocations(&mut table, now)?;
            self.bump_in(txn)?;
            Ok(Some(removed))
        })
    }

    fn revocations(&self) -> Result<Vec<Revocation>, StoreError> {
        let now = unix_now();
        let all: Vec<Revocation> = self.read_all(REVOCATIONS)?;
        Ok(all.into_iter().filter(|r| !r.is_stale(now)).collect())
    }

    fn revocation(&self, spiffe_id: &str) -> Result<Option<Revocation>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.db_error(e))?;
        let table = txn.open_table(REVOCATIONS).map_err(|e| self.db_error(e))?;
        let value = table.get(spiffe_id).map_err(|e| self.db_error(e))?;
        let revocation: Option<Revocation> = value
            .map(|v| decode(v.value(), REVOCATIONS.name()))
            .transpose()?;
        Ok(revocation.filter(|r| !r.is_stale(unix_now())))
    }

    /// A workload is recorded with its first certificate, and kept.
    fn issued_to(&self, spiffe_id: &str) -> Result<bool, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.db_error(e))?;
        let table = txn.open_table(WORKLOADS).map_err(|e| self.db_error(e))?;
        let value = table.get(spiffe_id).map_err(|e| self.db_error(e))?;
        Ok(value.is_some())
    }

    /// Reads the log from its newest record back, and stops at `limit`.
    fn newest_issued(
        &self,
        limit: usize,
        matches: &dyn Fn(&IssuedCertRecord) -> bool,
    ) -> Result<Vec<IssuedCertRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.db_error(e))?;
        let log = txn.open_table(ISSUED_LOG).map_err(|e| self.db_error(e))?;
        let mut out = Vec::new();
        for entry in log.iter().map_err(|e| self.db_error(e))?.rev() {
            if out.len() == limit {
                break;
            }
            let (_, value) = entry.map_err(|e| self.db_error(e))?;
            let record: IssuedCertRecord = decode(value.value(), ISSUED_LOG.name())?;
            if matches(&record) {
                out.push(record);
            }
        }
        Ok(out)
    }

    fn snapshot_version(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.db_error(e))?;
        let table = txn.open_table(META).map_err(|e| self.db_error(e))?;
        match table.get(SNAPSHOT_VERSION).map_err(|e| self.db_error(e))? {
            Some(v) => decode(v.value(), SNAPSHOT_VERSION),
            None => Ok(0),
        }
    }

    fn bump_snapshot_version(&self) -> Result<u64, StoreError> {
        self.write(|txn| self.bump_in(txn))
    }

    fn settle_mesh_config(&self, encoded: &str) -> Result<u64, StoreError> {
        self.write(|txn| {
            let mut meta = txn.open_table(META)?;
            let stored = meta
                .get(MESH_CONFIG)?
                .map(|v| String::from_utf8_lossy(v.value()).into_owned());
            let mut version = get_u64(&meta, SNAPSHOT_VERSION)?;
            if stored.as_deref() != Some(encoded) {
                version += 1;
                set_snapshot_version(&mut meta, version, self.epoch)?;
                meta.insert(MESH_CONFIG, encoded.as_bytes())?;
            }
            Ok(version)
        })
    }

    fn apply_documents(
        &self,
        policies: &[Policy],
        rate_limits: &[RateLimit],
        dry_run: bool,
    ) -> Result<AppliedDocuments, StoreError> {
        if !dry_run {
            return self.write(|txn| self.apply_in(txn, policies, rate_limits));
        }
        let txn = self.db.begin_write().map_err(|e| self.write_error(e))?;
        let mut result = self.apply_in(&txn, policies, rate_limits)?;
        txn.abort().map_err(|e| self.db_error(e))?;
        // Nothing was committed: report the counters as they stand.
        result.generation = self.generation()?;
        Ok(result)
    }

    fn rate_limits(&self) -> Result<Vec<RateLimitRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.db_error(e))?;
        read_rate_limits(&txn.open_table(RATE_LIMITS)?)
    }

    fn rate_limit(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<RateLimitRecord>, StoreError> {
        let key = policy_key(namespace, name);
        let txn = self.db.begin_read().map_err(|e| self.db_error(e))?;
        let table = txn.open_table(RATE_LIMITS)?;
        let value = table.get(key.as_str())?;
        value
            .map(|v| decode_rate_limit(v.value(), &key))
            .transpose()
    }

    fn delete_rate_limit(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<Generation>, StoreError> {
        let key = policy_key(namespace, name);
        self.write_if(|txn| {
            let mut table = txn.open_table(RATE_LIMITS)?;
            if table.remove(key.as_str())?.is_none() {
                return Ok(None);
            }
            let mut meta = txn.open_table(META)?;
            bump_generation(&mut meta, self.epoch).map(Some)
        })
    }

    fn policies(&self) -> Result<Vec<Policy>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.db_error(e))?;
        read_policies(&txn.open_table(POLICIES)?)
    }

    fn policy(&self, namespace: &str, name: &str) -> Result<Option<Policy>, StoreError> {
        let key = policy_key(namespace, name);
        let txn = self.db.begin_read().map_err(|e| self.db_error(e))?;
        let table = txn.open_table(POLICIES)?;
        let value = table.get(key.as_str())?;
        value.map(|v| decode_policy(v.value(), &key)).transpose()
    }

    fn delete_policy(&self, namespace: &str, name: &str) -> Result<Option<Generation>, StoreError> {
        let key = policy_key(namespace, name);
        self.write_if(|txn| {
            let mut table = txn.open_table(POLICIES)?;
            if table.remove(key.as_str())?.is_none() {
                return Ok(None);
            }
            let mut meta = txn.open_table(META)?;
            bump_generation(&mut meta, self.epoch).map(Some)
        })
    }

    fn generation(&self) -> Result<Generation, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.db_error(e))?;
        current_generation(&txn.open_table(META)?)
    }

    fn discovery_state(&self) -> Result<DiscoveryState, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.db_error(e))?;
        let meta = txn.open_table(META)?;
        let version = get_u64(&meta, SNAPSHOT_VERSION)?;
        let epoch = stored_epoch(&meta)?;
        let version_set_at_unix = match meta.get(SNAPSHOT_VERSION_SET_AT)? {
            Some(v) => Some(decode(v.value(), SNAPSHOT_VERSION_SET_AT)?),
            None => None,
        };
        let mut workloads = Vec::new();
        for entry in txn.open_table(WORKLOADS)?.iter()? {
            let (_, value) = entry?;
            workloads.push(decode(value.value(), "workloads")?);
        }
        let policies = read_policies(&txn.open_table(POLICIES)?)?;
        // Every one stored, stale or not: what a version holds must not
        // change with the clock (a stale one covers only expired
        // certificates, and the next revocation write drops it).
        let mut revocations = Vec::new();
        for entry in txn.open_table(REVOCATIONS)?.iter()? {
            let (_, value) = entry?;
            revocations.push(decode(value.value(), REVOCATIONS.name())?);
        }
        let rate_limits = read_rate_limits(&txn.open_table(RATE_LIMITS)?)?
            .into_iter()
            .filter_map(|r| r.rate_limit)
            .collect();
        Ok(DiscoveryState {
            version,
            epoch,
            position: Position::at(version),
            version_set_at_unix,
            workloads,
            policies,
            rate_limits,
            services: Vec::new(),
            revocations,
        })
    }
}

impl EmbeddedStore {
    /// [`Store::revoke`], stamped with `now()` read once the write
    /// transaction is open.
    fn revoke_at(
        &self,
        spiffe_id: &str,
        reason: &str,
        now: impl FnOnce() -> i64,
    ) -> Result<(Revocation, Option<Revocation>), StoreError> {
        self.write(|txn| {
            let mut table = txn.open_table(REVOCATIONS)?;
            let now = now();
            prune_revocations(&mut table, now)?;
            let previous: Option<Revocation> = table
                .get(spiffe_id)?
                .map(|v| decode(v.value(), REVOCATIONS.name()))
                .transpose()?;
            let revocation = Revocation {
                spiffe_id: spiffe_id.to_owned(),
                revoked_at_unix: previous
                    .as_ref()
                    .map_or(now, |p| p.revoked_at_unix.max(now)),
                reason: reason.to_owned(),
            };
            table.insert(spiffe_id, encode(&revocation).as_slice())?;
            // Every snapshot carries the revocations: a new version, in the
            // same transaction, so a version names them too.
            self.bump_in(txn)?;
            Ok((revocation, previous))
        })
    }

    fn apply_in(
        &self,
        txn: &redb::WriteTransaction,
        policies: &[Policy],
        rate_limits: &[RateLimit],
    ) -> Result<AppliedDocuments, StoreError> {
        let mut table = txn.open_table(POLICIES)?;
        let mut applied = Vec::with_capacity(policies.len());
        for policy in policies {
            let key = policy_key(&policy.namespace, &policy.name);
            let stored = match table.get(key.as_str())? {
                Some(v) => Some(decode_policy(v.value(), &key)?),
                None => None,
            };
            let (revision, outcome) =
                revise(stored.map(|old| (old.revision, same_content(&old, policy))));
            if outcome != PolicyOutcome::Unchanged {
                let record = Policy {
                    revision,
                    ..policy.clone()
                };
                table.insert(key.as_str(), record.encode_to_vec().as_slice())?;
            }
            applied.push(AppliedPolicy {
                namespace: policy.namespace.clone(),
                name: policy.name.clone(),
                revision,
                outcome,
            });
        }
        let mut result = AppliedDocuments {
            policies: applied,
            rate_limits: Self::apply_rate_limits_in(txn, rate_limits)?,
            generation: Generation::default(),
        };
        let mut meta = txn.open_table(META)?;
        result.generation = if result.changed() {
            bump_generation(&mut meta, self.epoch)?
        } else {
            current_generation(&meta)?
        };
        Ok(result)
    }

    fn apply_rate_limits_in(
        txn: &redb::WriteTransaction,
        rate_limits: &[RateLimit],
    ) -> Result<Vec<AppliedPolicy>, StoreError> {
        let mut table = txn.open_table(RATE_LIMITS)?;
        let mut applied = Vec::with_capacity(rate_limits.len());
        for limit in rate_limits {
            let key = policy_key(&limit.namespace, &limit.name);
            let stored = match table.get(key.as_str())? {
                Some(v) => Some(decode_rate_limit(v.value(), &key)?),
                None => None,
            };
            let (revision, outcome) =
                revise(stored.map(|old| (old.revision, old.rate_limit.as_ref() == Some(limit))));
            if outcome != PolicyOutcome::Unchanged {
                let record = RateLimitRecord {
                    rate_limit: Some(limit.clone()),
                    revision,
                };
                table.insert(key.as_str(), record.encode_to_vec().as_slice())?;
            }
            applied.push(AppliedPolicy {
                namespace: limit.namespace.clone(),
                name: limit.name.clone(),
                revision,
                outcome,
            });
        }
        Ok(applied)
    }
}

/// Removes the revocations stale at `now` (older than
/// [`REVOCATION_KEPT`](super::REVOCATION_KEPT)); the table holds one per revoked identity, so
/// reading it whole is cheap. Returns how many it removed: the caller sets a
/// new snapshot version when any were.
fn prune_revocations(
    table: &mut redb::Table<'_, &str, &[u8]>,
    now: i64,
) -> Result<usize, StoreError> {
    let mut stale = Vec::new();
    for entry in table.iter()? {
        let (id, value) = entry?;
        let revocation: Revocation = decode(value.value(), REVOCATIONS.name())?;
        if revocation.is_stale(now) {
            stale.push(id.value().to_string());
        }
    }
    for id in &stale {
        table.remove(id.as_str())?;
    }
    if !stale.is_empty() {
        tracing::info!(
            pruned = stale.len(),
            "removed revocations that cover only expired certificates"
        );
    }
    Ok(stale.len())
}

#[cfg(test)]
#[path = "embedded_tests.rs"]
mod tests;
