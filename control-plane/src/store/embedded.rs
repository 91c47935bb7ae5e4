//! The embedded store: one redb database file in the state dir.
//!
//! Values are JSON so records can gain fields without a migration. Every
//! trait method runs in one redb transaction (crash-safe, all or nothing).
//! Tables: `join_tokens` (hash -> JoinToken), `workloads` (SPIFFE ID ->
//! WorkloadRecord), `issued_certificates` (serial -> IssuedCertRecord), `meta`
//! (counters). Versioned policies get their own tables beside these.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableHandle};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{
    EndpointChange, IssuedCertRecord, JoinToken, Store, StoreError, TokenClaim, TokenRefusal,
    WorkloadRecord,
};

/// The database file name inside the state dir.
pub const DB_FILE: &str = "trellis.redb";

const JOIN_TOKENS: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("join_tokens");
const WORKLOADS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("workloads");
const ISSUED: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("issued_certificates");
const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");

const SNAPSHOT_VERSION: &str = "snapshot_version";
const MESH_CONFIG: &str = "mesh_config";

pub struct EmbeddedStore {
    db: Database,
    path: PathBuf,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl EmbeddedStore {
    /// Opens (or creates) the database at `path`. A file that is not a redb
    /// database is reported, never replaced.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let store = Self {
            db: Database::create(path).map_err(|e| StoreError::Database {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?,
            path: path.to_path_buf(),
        };
        store.write(|txn| {
            txn.open_table(JOIN_TOKENS)?;
            txn.open_table(WORKLOADS)?;
            txn.open_table(ISSUED)?;
            txn.open_table(META)?;
            Ok(())
        })?;
        Ok(store)
    }

    fn db_error(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Database {
            path: self.path.display().to_string(),
            reason: e.to_string(),
        }
    }

    /// Runs `f` in a write transaction committed only when `f` succeeds.
    fn write<T>(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.db_error(e))?;
        let value = f(&txn)?;
        txn.commit().map_err(|e| self.db_error(e))?;
        Ok(value)
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

fn get_u64(table: &redb::Table<'_, &str, &[u8]>, key: &str) -> Result<u64, StoreError> {
    match table.get(key)? {
        Some(v) => decode(v.value(), key),
        None => Ok(0),
    }
}

impl Store for EmbeddedStore {
    fn add_join_token(&self, hash: &[u8; 32], token: &JoinToken) -> Result<(), StoreError> {
        self.write(|txn| {
            let mut table = txn.open_table(JOIN_TOKENS)?;
            table.insert(hash.as_slice(), encode(token).as_slice())?;
            Ok(())
        })
    }

    fn record_issuance(
        &self,
        claim: Option<TokenClaim<'_>>,
        issued: &IssuedCertRecord,
        workload: &WorkloadRecord,
    ) -> Result<EndpointChange, StoreError> {
        self.write(|txn| {
            if let Some(claim) = claim {
                let mut tokens = txn.open_table(JOIN_TOKENS)?;
                let mut token: JoinToken = match tokens.get(claim.hash.as_slice())? {
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
                token.used = true;
                tokens.insert(claim.hash.as_slice(), encode(&token).as_slice())?;
            }
            let mut log = txn.open_table(ISSUED)?;
            log.insert(issued.serial_hex.as_str(), encode(issued).as_slice())?;
            let mut workloads = txn.open_table(WORKLOADS)?;
            let previous: Option<WorkloadRecord> =
                match workloads.get(workload.spiffe_id.as_str())? {
                    Some(v) => Some(decode(v.value(), "workload")?),
                    None => None,
                };
            let mut record = workload.clone();
            let previous_address = previous.map(|p| p.address).unwrap_or_default();
            if record.address.is_empty() {
                record.address = previous_address.clone();
            }
            workloads.insert(record.spiffe_id.as_str(), encode(&record).as_slice())?;
            Ok(if record.address != previous_address {
                EndpointChange::Changed
            } else {
                EndpointChange::Unchanged
            })
        })
    }

    fn workloads(&self) -> Result<Vec<WorkloadRecord>, StoreError> {
        self.read_all(WORKLOADS)
    }

    fn issued_certificates(&self) -> Result<Vec<IssuedCertRecord>, StoreError> {
        self.read_all(ISSUED)
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
        self.write(|txn| {
            let mut meta = txn.open_table(META)?;
            let next = get_u64(&meta, SNAPSHOT_VERSION)? + 1;
            meta.insert(SNAPSHOT_VERSION, encode(&next).as_slice())?;
            Ok(next)
        })
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
                meta.insert(SNAPSHOT_VERSION, encode(&version).as_slice())?;
                meta.insert(MESH_CONFIG, encoded.as_bytes())?;
            }
            Ok(version)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_core::SpiffeId;

    fn issued(serial: &str, id: &str) -> IssuedCertRecord {
        IssuedCertRecord {
            serial_hex: serial.into(),
            spiffe_id: id.into(),
            not_after_unix: 100,
            issued_at_unix: 1,
        }
    }

    fn workload(id: &str, address: &str) -> WorkloadRecord {
        WorkloadRecord {
            spiffe_id: id.into(),
            address: address.into(),
            cert_expires_at_unix: 100,
            last_seen_unix: 1,
        }
    }

    #[test]
    fn a_token_is_consumed_once_and_refusals_change_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&tmp.path().join(DB_FILE)).unwrap();
        let id = SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap();
        let other = SpiffeId::parse("spiffe://td/ns/a/sa/c").unwrap();
        let hash = [7u8; 32];
        let token = JoinToken {
            spiffe_id: id.to_string(),
            expires_at_unix: 50,
            used: false,
        };
        store.add_join_token(&hash, &token).unwrap();
        let claim = |spiffe_id, now_unix| TokenClaim {
            hash: &hash,
            spiffe_id,
            now_unix,
        };
        let w = workload(id.as_str(), "127.0.0.1:1");
        let err = store
            .record_issuance(Some(claim(&other, 10)), &issued("01", other.as_str()), &w)
            .unwrap_err();
        assert!(matches!(
            err,
            StoreError::Token(TokenRefusal::OtherIdentity { .. })
        ));
        let err = store
            .record_issuance(Some(claim(&id, 60)), &issued("02", id.as_str()), &w)
            .unwrap_err();
        assert!(matches!(err, StoreError::Token(TokenRefusal::Expired)));
        assert!(store.issued_certificates().unwrap().is_empty());
        assert!(store.workloads().unwrap().is_empty());

        let change = store
            .record_issuance(Some(claim(&id, 10)), &issued("03", id.as_str()), &w)
            .unwrap();
        assert_eq!(change, EndpointChange::Changed);
        let err = store
            .record_issuance(Some(claim(&id, 10)), &issued("04", id.as_str()), &w)
            .unwrap_err();
        assert!(matches!(err, StoreError::Token(TokenRefusal::Used)));
        assert_eq!(store.issued_certificates().unwrap().len(), 1);

        let renewal = workload(id.as_str(), "");
        let change = store
            .record_issuance(None, &issued("05", id.as_str()), &renewal)
            .unwrap();
        assert_eq!(change, EndpointChange::Unchanged);
        assert_eq!(store.workloads().unwrap()[0].address, "127.0.0.1:1");
    }

    #[test]
    fn mesh_config_bumps_the_version_only_when_it_changes() {
        let tmp = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&tmp.path().join(DB_FILE)).unwrap();
        assert_eq!(store.settle_mesh_config("a").unwrap(), 1);
        assert_eq!(store.settle_mesh_config("a").unwrap(), 1);
        assert_eq!(store.settle_mesh_config("b").unwrap(), 2);
        assert_eq!(store.bump_snapshot_version().unwrap(), 3);
        assert_eq!(store.snapshot_version().unwrap(), 3);
    }

    #[test]
    fn a_corrupt_file_is_reported_and_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(DB_FILE);
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        let err = EmbeddedStore::open(&path).unwrap_err();
        assert!(err.to_string().contains(DB_FILE), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), vec![0x5a; 8192]);
    }
}
