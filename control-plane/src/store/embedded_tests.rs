use super::*;
use crate::store::{MAX_WORKLOAD_ADDRESSES, REVOCATION_KEPT, TokenRefusal};
use trellis_core::SpiffeId;

fn issued(serial: &str, id: &str) -> IssuedCertRecord {
    IssuedCertRecord {
        serial_hex: serial.into(),
        spiffe_id: id.into(),
        not_after_unix: 100,
        issued_at_unix: 1,
    }
}

/// A Certify of `id` at 1 reporting `address` (none when empty), with a
/// certificate that ends at 100.
fn workload(id: &str, address: &str) -> WorkloadRecord {
    let addresses: &[&str] = if address.is_empty() { &[] } else { &[address] };
    certified(id, addresses, 100, 1)
}

/// A Certify of `id` at `now` reporting `addresses`, with a certificate
/// that ends at `expires`.
fn certified(id: &str, addresses: &[&str], expires: i64, now: i64) -> WorkloadRecord {
    WorkloadRecord::new(id, addresses.iter().map(|a| a.to_string()), expires, now)
}

/// The addresses of `record`, in its order.
fn addresses_of(record: &WorkloadRecord) -> Vec<&str> {
    record
        .addresses
        .iter()
        .map(|a| a.address.as_str())
        .collect()
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
    store.add_join_token(&hash, &token, 0).unwrap();
    let claim = |spiffe_id, now_unix| TokenClaim {
        hash: &hash,
        spiffe_id,
        now_unix,
    };
    let w = workload(id.as_str(), "127.0.0.1:1");
    let err = store
        .record_issuance(
            Some(claim(&other, 10).into()),
            &issued("01", other.as_str()),
            &w,
        )
        .unwrap_err();
    assert!(matches!(
        err,
        StoreError::Token(TokenRefusal::OtherIdentity { .. })
    ));
    let err = store
        .record_issuance(Some(claim(&id, 60).into()), &issued("02", id.as_str()), &w)
        .unwrap_err();
    assert!(matches!(err, StoreError::Token(TokenRefusal::Expired)));
    assert!(store.issued_certificates().unwrap().is_empty());
    assert!(store.workloads().unwrap().is_empty());

    let change = store
        .record_issuance(Some(claim(&id, 10).into()), &issued("03", id.as_str()), &w)
        .unwrap();
    assert_eq!(change, EndpointChange::Changed);
    let err = store
        .record_issuance(Some(claim(&id, 10).into()), &issued("04", id.as_str()), &w)
        .unwrap_err();
    assert!(matches!(err, StoreError::Token(TokenRefusal::Used)));
    assert_eq!(store.issued_certificates().unwrap().len(), 1);

    let renewal = workload(id.as_str(), "");
    let change = store
        .record_issuance(None, &issued("05", id.as_str()), &renewal)
        .unwrap();
    assert_eq!(change, EndpointChange::Unchanged);
    assert_eq!(
        addresses_of(&store.workloads().unwrap()[0]),
        ["127.0.0.1:1"]
    );

    // Certified again after its certificate ended: an endpoint again.
    let returned = certified(id.as_str(), &["127.0.0.1:1"], 300, 200);
    let change = store
        .record_issuance(None, &issued("06", id.as_str()), &returned)
        .unwrap();
    assert_eq!(change, EndpointChange::Changed);
}

/// An inbound address has one owner: a second workload reporting an
/// address a live one holds is refused, and the refusal writes nothing, its
/// token included; once the holder's certificate has ended the address is
/// free again.
#[test]
fn an_address_a_live_workload_holds_is_refused_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join(DB_FILE);
    let store = EmbeddedStore::open(&path).unwrap();
    let victim = "spiffe://td/ns/a/sa/victim";
    let thief = SpiffeId::parse("spiffe://td/ns/a/sa/thief").unwrap();
    let hash = [9u8; 32];
    store
        .add_join_token(&hash, &token_for(&thief, 1000), 0)
        .unwrap();
    store
        .record_issuance(
            None,
            &issued("01", victim),
            &workload(victim, "10.0.0.1:15006"),
        )
        .unwrap();
    let version = store.snapshot_version().unwrap();

    // Checked again after a restart: the index is rebuilt from the workloads.
    drop(store);
    let store = EmbeddedStore::open(&path).unwrap();
    let claim = claim_at(&hash, &thief, 10);
    let taking = certified(
        thief.as_str(),
        &["10.0.0.2:15006", "10.0.0.1:15006"],
        100,
        1,
    );
    let err = store
        .record_issuance(Some(claim.into()), &issued("02", thief.as_str()), &taking)
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::AddressHeld { address, holder }
            if address == "10.0.0.1:15006" && holder == victim),
        "{err}"
    );
    assert_eq!(store.workloads().unwrap().len(), 1);
    assert_eq!(store.issued_certificates().unwrap().len(), 1);
    assert_eq!(store.snapshot_version().unwrap(), version);

    // The token was not spent: it proves the identity at its own address.
    let own = workload(thief.as_str(), "10.0.0.2:15006");
    let change = store
        .record_issuance(Some(claim.into()), &issued("03", thief.as_str()), &own)
        .unwrap();
    assert_eq!(change, EndpointChange::Changed);

    // A renewal that moves onto the victim's address is refused too.
    let err = store
        .record_issuance(None, &issued("04", thief.as_str()), &taking)
        .unwrap_err();
    assert!(matches!(err, StoreError::AddressHeld { .. }), "{err}");

    // The victim's certificate ended (at 100): the address is free.
    let later = certified(thief.as_str(), &["10.0.0.1:15006"], 400, 200);
    store
        .record_issuance(None, &issued("05", thief.as_str()), &later)
        .unwrap();
    // The victim, back with a join token and no address, does not keep the
    // address it lost.
    let back = certified(victim, &[], 400, 201);
    store
        .record_issuance(None, &issued("06", victim), &back)
        .unwrap();
    let mut owners: Vec<(String, Vec<String>)> = store
        .workloads()
        .unwrap()
        .into_iter()
        .map(|w| {
            let addresses = addresses_of(&w).into_iter().map(String::from).collect();
            (w.spiffe_id, addresses)
        })
        .collect();
    owners.sort();
    assert_eq!(
        owners,
        [
            (thief.to_string(), vec!["10.0.0.1:15006".to_string()]),
            (victim.to_string(), vec![])
        ]
    );
}

/// A workload without an inbound address is no endpoint: its first
/// certificate and its renewals leave the snapshot version where it was,
/// until it reports an address.
#[test]
fn a_client_only_workload_changes_no_endpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&tmp.path().join(DB_FILE)).unwrap();
    let id = "spiffe://td/ns/a/sa/job";
    let before = store.snapshot_version().unwrap();
    for serial in ["01", "02"] {
        let change = store
            .record_issuance(None, &issued(serial, id), &workload(id, ""))
            .unwrap();
        assert_eq!(change, EndpointChange::Unchanged, "certificate {serial}");
    }
    assert_eq!(store.snapshot_version().unwrap(), before);
    assert_eq!(store.workloads().unwrap().len(), 1, "the workload is known");

    let change = store
        .record_issuance(None, &issued("03", id), &workload(id, "127.0.0.1:1"))
        .unwrap();
    assert_eq!(change, EndpointChange::Changed);
    assert_eq!(store.snapshot_version().unwrap(), before + 1);
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

/// The stored snapshot version with the epoch it was set in.
fn versioned(store: &EmbeddedStore) -> (u64, u64) {
    let state = store.discovery_state().unwrap();
    (state.version, state.epoch)
}

/// A database restored from an older copy counts again through versions
/// it had set: each open sets its versions in an epoch of its own, so the
/// copy never names other content with a version and epoch the original
/// named. A reopen that changes nothing keeps both, and every kind of
/// write (issuance, policy, mesh config, bump) sets the open's epoch.
#[test]
fn a_restored_copy_sets_its_versions_again_in_another_epoch() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join(DB_FILE);
    let copy = tmp.path().join("backup.redb");
    let store = EmbeddedStore::open(&path).unwrap();
    assert_eq!(versioned(&store), (0, 0), "no version yet");
    store.settle_mesh_config("a").unwrap();
    let (version, epoch) = versioned(&store);
    assert_eq!(version, 1);
    assert_ne!(epoch, 0);
    let id = "spiffe://td/ns/a/sa/b";
    store
        .record_issuance(None, &issued("01", id), &workload(id, "10.0.0.1:1"))
        .unwrap();
    assert_eq!(versioned(&store), (2, epoch), "one epoch for the open");
    drop(store);
    std::fs::copy(&path, &copy).unwrap();
    let store = EmbeddedStore::open(&path).unwrap();
    assert_eq!(versioned(&store), (2, epoch), "a reopen keeps both");
    store.apply_policies(&[policy("p", &[80])], false).unwrap();
    let (later, later_epoch) = versioned(&store);
    assert_eq!(later, 3);
    assert_ne!(later_epoch, epoch);
    drop(store);

    // The copy, restored, sets version 3 again, with other content.
    std::fs::copy(&copy, &path).unwrap();
    let store = EmbeddedStore::open(&path).unwrap();
    assert_eq!(versioned(&store), (2, epoch));
    store.bump_snapshot_version().unwrap();
    let (again, again_epoch) = versioned(&store);
    assert_eq!(again, later);
    assert!(![0, epoch, later_epoch].contains(&again_epoch));
    store.settle_mesh_config("b").unwrap();
    assert_eq!(versioned(&store), (4, again_epoch));
}

/// A version set by a release that predates epochs, or by one rolled back
/// to after a later one set an epoch, reads with epoch 0: an epoch stored
/// for another version is not that version's.
#[test]
fn a_version_set_without_an_epoch_reads_with_none() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join(DB_FILE);
    let set_by_an_older_release = |version: u64| {
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(META)
            .unwrap()
            .insert(SNAPSHOT_VERSION, encode(&version).as_slice())
            .unwrap();
        txn.commit().unwrap();
    };
    set_by_an_older_release(5);
    let store = EmbeddedStore::open(&path).unwrap();
    assert_eq!(versioned(&store), (5, 0));
    store.bump_snapshot_version().unwrap();
    let (version, epoch) = versioned(&store);
    assert_eq!(version, 6);
    assert_ne!(epoch, 0);
    drop(store);
    set_by_an_older_release(7);
    let store = EmbeddedStore::open(&path).unwrap();
    assert_eq!(versioned(&store), (7, 0));
}

fn policy(name: &str, ports: &[u32]) -> Policy {
    use trellis_proto::policy::v1::{Destination, Rule};
    Policy {
        name: name.into(),
        namespace: "default".into(),
        rules: vec![Rule {
            from: vec![],
            to: vec![Destination {
                ports: ports.to_vec(),
                ..Destination::default()
            }],
        }],
        ..Policy::default()
    }
}

#[test]
fn policies_get_revisions_and_only_changes_bump_the_counters() {
    let tmp = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&tmp.path().join(DB_FILE)).unwrap();
    let outcomes = |applied: &[AppliedPolicy]| -> Vec<(u64, PolicyOutcome)> {
        applied.iter().map(|a| (a.revision, a.outcome)).collect()
    };
    let (applied, g1) = store
        .apply_policies(&[policy("a", &[1]), policy("b", &[2])], false)
        .unwrap();
    assert_eq!(
        outcomes(&applied),
        [(1, PolicyOutcome::Created), (1, PolicyOutcome::Created)]
    );
    assert_eq!(g1.policies, 1);
    let (applied, g2) = store
        .apply_policies(&[policy("a", &[1]), policy("b", &[3])], false)
        .unwrap();
    assert_eq!(
        outcomes(&applied),
        [(1, PolicyOutcome::Unchanged), (2, PolicyOutcome::Updated)]
    );
    assert_eq!((g2.policies, g2.snapshot), (2, g1.snapshot + 1));
    let (applied, g3) = store.apply_policies(&[policy("c", &[4])], true).unwrap();
    assert_eq!(outcomes(&applied), [(1, PolicyOutcome::Created)]);
    assert_eq!(g3, g2, "a dry run moves nothing");
    assert_eq!(store.policy("default", "c").unwrap(), None);
    assert_eq!(store.policy("default", "b").unwrap().unwrap().revision, 2);

    assert_eq!(store.delete_policy("default", "zzz").unwrap(), None);
    let g4 = store.delete_policy("default", "a").unwrap().unwrap();
    assert_eq!(g4.policies, 3);
    let state = store.discovery_state().unwrap();
    assert_eq!(state.version, g4.snapshot);
    let names: Vec<_> = state.policies.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["b"]);
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

fn rate_limit(name: &str, burst: u32) -> RateLimit {
    RateLimit {
        name: name.into(),
        namespace: "default".into(),
        requests_per_second: 5.0,
        burst,
        ..RateLimit::default()
    }
}

#[test]
fn rate_limits_share_the_write_and_the_counters_with_policies() {
    let tmp = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&tmp.path().join(DB_FILE)).unwrap();
    let both = store
        .apply_documents(&[policy("a", &[1])], &[rate_limit("a", 10)], false)
        .unwrap();
    assert_eq!(both.policies[0].outcome, PolicyOutcome::Created);
    assert_eq!(both.rate_limits[0].outcome, PolicyOutcome::Created);
    assert_eq!(both.generation.policies, 1, "one write, one generation");

    let same = store
        .apply_documents(&[], &[rate_limit("a", 10)], false)
        .unwrap();
    assert_eq!(
        (same.rate_limits[0].revision, same.rate_limits[0].outcome),
        (1, PolicyOutcome::Unchanged)
    );
    assert_eq!(
        same.generation, both.generation,
        "no change, no new version"
    );

    let dry = store
        .apply_documents(&[], &[rate_limit("a", 20)], true)
        .unwrap();
    assert_eq!(
        (dry.rate_limits[0].revision, dry.rate_limits[0].outcome),
        (2, PolicyOutcome::Updated)
    );
    assert_eq!(
        store.rate_limit("default", "a").unwrap().unwrap().revision,
        1
    );

    let changed = store
        .apply_documents(&[], &[rate_limit("a", 20)], false)
        .unwrap();
    assert_eq!(changed.generation.snapshot, both.generation.snapshot + 1);
    let state = store.discovery_state().unwrap();
    assert_eq!(state.version, changed.generation.snapshot);
    assert_eq!(state.rate_limits, [rate_limit("a", 20)]);
    assert_eq!(
        state.policies.len(),
        1,
        "the kinds are separate name spaces"
    );

    assert_eq!(store.delete_rate_limit("default", "zzz").unwrap(), None);
    let deleted = store.delete_rate_limit("default", "a").unwrap().unwrap();
    assert_eq!(deleted.snapshot, changed.generation.snapshot + 1);
    assert!(store.rate_limits().unwrap().is_empty());
    assert!(store.policy("default", "a").unwrap().is_some());
}

/// Concurrent issuances are committed together, yet each answer is its
/// own: a token claimed twice at once is consumed by exactly one, and the
/// refused one leaves nothing behind.
#[test]
fn concurrent_issuances_each_get_their_own_answer() {
    let tmp = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&tmp.path().join(DB_FILE)).unwrap();
    let ids: Vec<SpiffeId> = (0..32)
        .map(|i| SpiffeId::parse(&format!("spiffe://td/ns/a/sa/w{i}")).unwrap())
        .collect();
    for (i, id) in ids.iter().enumerate() {
        let token = JoinToken {
            spiffe_id: id.to_string(),
            expires_at_unix: 50,
            used: false,
        };
        store.add_join_token(&[i as u8; 32], &token, 0).unwrap();
    }
    // Every workload claims its own token, and w0's token twice.
    let claims: Vec<(usize, String)> = (0..ids.len())
        .map(|i| (i, format!("{i:02x}")))
        .chain([(0, "ff".to_string())])
        .collect();
    let outcomes: Vec<(String, Result<EndpointChange, StoreError>)> = std::thread::scope(|s| {
        let handles: Vec<_> = claims
            .iter()
            .map(|(i, serial)| {
                let (store, id) = (&store, &ids[*i]);
                s.spawn(move || {
                    let hash = [*i as u8; 32];
                    let claim = TokenClaim {
                        hash: &hash,
                        spiffe_id: id,
                        now_unix: 10,
                    };
                    let w = workload(id.as_str(), &format!("127.0.0.1:{}", 1000 + i));
                    let outcome =
                        store.record_issuance(Some(claim.into()), &issued(serial, id.as_str()), &w);
                    (serial.clone(), outcome)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let refused: Vec<&String> = outcomes
        .iter()
        .filter_map(|(serial, outcome)| match outcome {
            Err(StoreError::Token(TokenRefusal::Used)) => Some(serial),
            Err(e) => panic!("unexpected error for {serial}: {e}"),
            Ok(_) => None,
        })
        .collect();
    assert_eq!(refused.len(), 1, "w0's token must be consumed exactly once");
    let logged: Vec<String> = store
        .issued_certificates()
        .unwrap()
        .into_iter()
        .map(|c| c.serial_hex)
        .collect();
    assert_eq!(logged.len(), ids.len());
    assert!(
        !logged.contains(refused[0]),
        "a refused issuance is not logged"
    );
    assert_eq!(store.workloads().unwrap().len(), ids.len());
    // Every batch of new endpoints bumped the version with its records.
    let version = store.snapshot_version().unwrap();
    assert!(
        (1..=ids.len() as u64).contains(&version),
        "version {version}"
    );
}

/// The writer of issuances lets go of the database with the store, so a
/// restarted control plane opens it again at once.
#[test]
fn a_closed_store_reopens_with_its_issuances() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join(DB_FILE);
    let id = SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap();
    let store = EmbeddedStore::open(&path).unwrap();
    store
        .record_issuance(
            None,
            &issued("01", id.as_str()),
            &workload(id.as_str(), "127.0.0.1:1"),
        )
        .unwrap();
    drop(store);
    let store = EmbeddedStore::open(&path).unwrap();
    assert_eq!(store.issued_certificates().unwrap().len(), 1);
    assert_eq!(store.snapshot_version().unwrap(), 1);
}

fn serials(store: &EmbeddedStore) -> Vec<String> {
    store
        .issued_certificates()
        .unwrap()
        .into_iter()
        .map(|r| r.serial_hex)
        .collect()
}

#[test]
fn the_issued_log_keeps_the_newest_issuances_in_the_order_they_were_made() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join(DB_FILE);
    let store = EmbeddedStore::open_retaining(&path, 3).unwrap();
    let id = SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap();
    let w = workload(id.as_str(), "127.0.0.1:1");
    for serial in ["0f", "03", "a1"] {
        store
            .record_issuance(None, &issued(serial, id.as_str()), &w)
            .unwrap();
    }
    // A refused issuance takes no place in the log.
    let unknown = TokenClaim {
        hash: &[9; 32],
        spiffe_id: &id,
        now_unix: 1,
    };
    store
        .record_issuance(Some(unknown.into()), &issued("ee", id.as_str()), &w)
        .unwrap_err();
    for serial in ["07", "22"] {
        store
            .record_issuance(None, &issued(serial, id.as_str()), &w)
            .unwrap();
    }
    assert_eq!(serials(&store), ["a1", "07", "22"]);
    drop(store);

    // Reopened, the log goes on after its newest record.
    let store = EmbeddedStore::open_retaining(&path, 3).unwrap();
    store
        .record_issuance(None, &issued("01", id.as_str()), &w)
        .unwrap();
    assert_eq!(serials(&store), ["07", "22", "01"]);
    drop(store);

    // A smaller retention prunes the log when the store opens.
    let store = EmbeddedStore::open_retaining(&path, 2).unwrap();
    assert_eq!(serials(&store), ["22", "01"]);
}

/// A listing reads the log from the newest end: newest first, only what
/// `matches` keeps, at most `limit`.
#[test]
fn the_newest_issuances_come_first_filtered_and_limited() {
    let tmp = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&tmp.path().join(DB_FILE)).unwrap();
    let (a, b) = ("spiffe://td/ns/a/sa/a", "spiffe://td/ns/a/sa/b");
    for (serial, id) in [("01", a), ("02", b), ("03", a), ("04", b), ("05", a)] {
        store
            .record_issuance(None, &issued(serial, id), &workload(id, ""))
            .unwrap();
    }
    let newest = |limit, id: &str| -> Vec<String> {
        store
            .newest_issued(limit, &|r| id.is_empty() || r.spiffe_id == id)
            .unwrap()
            .into_iter()
            .map(|r| r.serial_hex)
            .collect()
    };
    assert_eq!(newest(10, ""), ["05", "04", "03", "02", "01"]);
    assert_eq!(newest(2, ""), ["05", "04"]);
    assert_eq!(newest(10, b), ["04", "02"]);
    assert_eq!(newest(2, a), ["05", "03"]);
    assert!(newest(0, "").is_empty());
}

/// A database written before the log was bounded kept it by serial; opening
/// it moves the records, oldest issuance first, and drops the old table.
#[test]
fn a_log_kept_by_serial_is_moved_to_the_bounded_log_on_open() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join(DB_FILE);
    {
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut old = txn.open_table(ISSUED_BY_SERIAL).unwrap();
            for (serial, issued_at) in [("aa", 30), ("bb", 10), ("cc", 20)] {
                let record = IssuedCertRecord {
                    issued_at_unix: issued_at,
                    ..issued(serial, "spiffe://td/ns/a/sa/b")
                };
                old.insert(serial, encode(&record).as_slice()).unwrap();
            }
        }
        txn.commit().unwrap();
    }
    let store = EmbeddedStore::open_retaining(&path, 2).unwrap();
    assert_eq!(serials(&store), ["cc", "aa"]);
    drop(store);

    let db = Database::open(&path).unwrap();
    let txn = db.begin_write().unwrap();
    let tables: Vec<String> = txn
        .list_tables()
        .unwrap()
        .map(|t| t.name().to_string())
        .collect();
    assert!(tables.contains(&"issued_log".to_string()), "{tables:?}");
    assert!(
        !tables.contains(&"issued_certificates".to_string()),
        "{tables:?}"
    );
}

fn claim_at<'a>(hash: &'a [u8; 32], id: &'a SpiffeId, now_unix: i64) -> TokenClaim<'a> {
    TokenClaim {
        hash,
        spiffe_id: id,
        now_unix,
    }
}

fn token_for(id: &SpiffeId, expires_at_unix: i64) -> JoinToken {
    JoinToken {
        spiffe_id: id.to_string(),
        expires_at_unix,
        used: false,
    }
}

#[test]
fn tokens_expired_over_a_day_ago_are_removed_when_a_token_is_added() {
    let tmp = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&tmp.path().join(DB_FILE)).unwrap();
    let id = SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap();
    let w = workload(id.as_str(), "");
    let (old, young, new) = ([1u8; 32], [2u8; 32], [3u8; 32]);
    store
        .add_join_token(&old, &token_for(&id, 1_000), 0)
        .unwrap();
    store
        .add_join_token(&young, &token_for(&id, 5_000), 0)
        .unwrap();
    // Within the day after it expired, a claim hears why it is refused.
    let err = store
        .record_issuance(
            Some(claim_at(&old, &id, 2_000).into()),
            &issued("01", id.as_str()),
            &w,
        )
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Token(TokenRefusal::Expired)),
        "{err}"
    );

    let later = 1_000 + EXPIRED_TOKENS_KEPT_SECONDS + 1;
    store
        .add_join_token(&new, &token_for(&id, later + 60), later)
        .unwrap();
    let err = store
        .record_issuance(
            Some(claim_at(&old, &id, later).into()),
            &issued("02", id.as_str()),
            &w,
        )
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Token(TokenRefusal::Unknown)),
        "{err}"
    );
    // A token expired less than a day ago stays, and so does the new one.
    let err = store
        .record_issuance(
            Some(claim_at(&young, &id, later).into()),
            &issued("03", id.as_str()),
            &w,
        )
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Token(TokenRefusal::Expired)),
        "{err}"
    );
    store
        .record_issuance(
            Some(claim_at(&new, &id, later).into()),
            &issued("04", id.as_str()),
            &w,
        )
        .unwrap();
}

/// Tokens written before the expiry index existed are indexed when the
/// database is opened, and so removed like any other once long expired.
#[test]
fn tokens_from_before_the_expiry_index_are_indexed_on_open() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join(DB_FILE);
    let id = SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap();
    let old = [4u8; 32];
    {
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(JOIN_TOKENS)
            .unwrap()
            .insert(old.as_slice(), encode(&token_for(&id, 1_000)).as_slice())
            .unwrap();
        txn.commit().unwrap();
    }
    let store = EmbeddedStore::open(&path).unwrap();
    let w = workload(id.as_str(), "");
    let later = 1_000 + EXPIRED_TOKENS_KEPT_SECONDS + 1;
    store
        .add_join_token(&[5u8; 32], &token_for(&id, later + 60), later)
        .unwrap();
    let err = store
        .record_issuance(
            Some(claim_at(&old, &id, later).into()),
            &issued("01", id.as_str()),
            &w,
        )
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Token(TokenRefusal::Unknown)),
        "{err}"
    );
}

/// The live addresses of the workload `id` at `now`, sorted.
fn live_at(store: &EmbeddedStore, id: &str, now: i64) -> Vec<String> {
    let workloads = store.workloads().unwrap();
    let record = workloads.iter().find(|w| w.spiffe_id == id).unwrap();
    let mut live: Vec<String> = record
        .live_addresses(now)
        .map(|a| a.address.clone())
        .collect();
    live.sort();
    live
}

/// Two sidecars sharing an identity (two VMs of one service) each report
/// their own address at every renewal: neither displaces the other, and
/// one that stops renewing leaves when the certificate it last reported
/// its address with ends, while the other stays.
#[test]
fn sidecars_sharing_an_identity_keep_their_own_addresses_until_each_expires() {
    let tmp = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&tmp.path().join(DB_FILE)).unwrap();
    let web = "spiffe://td/ns/shop/sa/web";
    let (one, two) = ("10.0.0.1:15006", "10.0.0.2:15006");
    let certify = |serial: &str, address: &str, expires: i64, now: i64| {
        store
            .record_issuance(
                None,
                &issued(serial, web),
                &certified(web, &[address], expires, now),
            )
            .unwrap()
    };
    assert_eq!(certify("01", one, 100, 1), EndpointChange::Changed);
    assert_eq!(certify("02", two, 110, 10), EndpointChange::Changed);
    assert_eq!(live_at(&store, web, 20), [one, two]);
    // Each renews, reporting only its own address: nothing changes.
    assert_eq!(certify("03", one, 150, 50), EndpointChange::Unchanged);
    assert_eq!(certify("04", two, 160, 60), EndpointChange::Unchanged);
    assert_eq!(live_at(&store, web, 60), [one, two]);

    // The first stops renewing; its address expires at 150.
    assert_eq!(live_at(&store, web, 149), [one, two]);
    assert_eq!(live_at(&store, web, 150), [two]);
    // The second renews after that: the expired address is dropped.
    certify("05", two, 210, 155);
    let workloads = store.workloads().unwrap();
    assert_eq!(addresses_of(&workloads[0]), [two]);
    assert_eq!(workloads[0].addresses[0].expires_at_unix, 210);
}

/// An address keeps its owner until it expires, then moves: another
/// identity may report it once the sidecar that reported it has stopped
/// renewing, though a sibling sidecar of the old owner renews on; never
/// both hold it.
#[test]
fn an_address_moves_to_another_identity_only_once_it_expired() {
    let tmp = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&tmp.path().join(DB_FILE)).unwrap();
    let (web, api) = ("spiffe://td/ns/shop/sa/web", "spiffe://td/ns/shop/sa/api");
    let (one, two) = ("10.0.0.1:15006", "10.0.0.2:15006");
    let record = |serial, id, address, expires, now| {
        store.record_issuance(
            None,
            &issued(serial, id),
            &certified(id, &[address], expires, now),
        )
    };
    record("01", web, one, 100, 1).unwrap();
    record("02", web, two, 100, 1).unwrap();
    record("03", web, two, 200, 90).unwrap();
    let err = record("04", api, one, 200, 99).unwrap_err();
    assert!(
        matches!(&err, StoreError::AddressHeld { address, holder }
            if address == one && holder == web),
        "{err}"
    );
    // Web's sidecar on `one` stopped renewing at 100.
    record("05", api, one, 300, 101).unwrap();
    assert_eq!(live_at(&store, api, 101), [one]);
    assert_eq!(live_at(&store, web, 101), [two]);
    // Web's other sidecar renews: it does not take `one` back.
    record("06", web, two, 300, 150).unwrap();
    let workloads = store.workloads().unwrap();
    let web_record = workloads.iter().find(|w| w.spiffe_id == web).unwrap();
    assert_eq!(addresses_of(web_record), [two]);
    // And web cannot report it again while api holds it.
    let err = record("07", web, one, 300, 160).unwrap_err();
    assert!(matches!(err, StoreError::AddressHeld { .. }), "{err}");
}

/// A renewal that drops an address which expired after the current
/// snapshot version was set (a version that may have published it) is an
/// endpoint change, so the address leaves in a new version; once a version
/// set after it expired is current, dropping it is none.
#[test]
fn dropping_an_address_the_current_version_published_is_a_change() {
    let tmp = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&tmp.path().join(DB_FILE)).unwrap();
    let web = "spiffe://td/ns/shop/sa/web";
    let now = crate::unix_now();
    let ends = now + 2;
    let record = |serial, address, expires| {
        store
            .record_issuance(
                None,
                &issued(serial, web),
                &certified(web, &[address], expires, crate::unix_now()),
            )
            .unwrap()
    };
    record("01", "10.0.0.1:15006", ends);
    record("02", "10.0.0.2:15006", now + 3600);
    let version = store.snapshot_version().unwrap();
    while crate::unix_now() <= ends {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(
        record("03", "10.0.0.2:15006", now + 3600),
        EndpointChange::Changed
    );
    assert_eq!(store.snapshot_version().unwrap(), version + 1);
    assert_eq!(
        record("04", "10.0.0.2:15006", now + 3600),
        EndpointChange::Unchanged
    );
}

/// However many sidecars share an identity, or however often one's
/// addresses change, a workload keeps at most [`MAX_WORKLOAD_ADDRESSES`]:
/// those that expire soonest are dropped, and their owner with them.
#[test]
fn a_workload_keeps_at_most_the_bound_of_addresses_dropping_the_soonest_to_expire() {
    let tmp = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&tmp.path().join(DB_FILE)).unwrap();
    let web = "spiffe://td/ns/shop/sa/web";
    let per_certify = 16;
    let certifies = MAX_WORKLOAD_ADDRESSES / per_certify + 1;
    let address = |i: usize, j: usize| format!("10.{}.{}.{j}:15006", i / 256, i % 256);
    for i in 0..certifies {
        let addresses: Vec<String> = (0..per_certify).map(|j| address(i, j)).collect();
        let record = WorkloadRecord::new(web, addresses, 1_000 + i as i64, 1);
        store
            .record_issuance(None, &issued(&format!("{i:04x}"), web), &record)
            .unwrap();
    }
    let workloads = store.workloads().unwrap();
    let kept = addresses_of(&workloads[0]);
    assert_eq!(kept.len(), MAX_WORKLOAD_ADDRESSES);
    assert!(
        !kept.contains(&address(0, 0).as_str()),
        "the soonest to expire"
    );
    assert!(kept.contains(&address(1, 0).as_str()));
    assert!(kept.contains(&address(certifies - 1, 0).as_str()));
    assert_eq!(
        workloads[0].addresses[0].expires_at_unix,
        1_000 + certifies as i64 - 1
    );

    // A dropped address has no owner any more.
    let api = "spiffe://td/ns/shop/sa/api";
    store
        .record_issuance(
            None,
            &issued("ffff", api),
            &certified(api, &[&address(0, 0)], 5_000, 2),
        )
        .unwrap();
}

/// Records written before addresses had their own expiry (the single
/// address format, and the addresses format) read as those addresses, each
/// expiring with the record's certificate; the owners index is rebuilt
/// from them, and a renewal writes the current format.
#[test]
fn workloads_of_the_older_formats_read_with_their_certificate_s_expiry() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join(DB_FILE);
    let (web, db) = ("spiffe://td/ns/shop/sa/web", "spiffe://td/ns/shop/sa/db");
    {
        let database = Database::create(&path).unwrap();
        let txn = database.begin_write().unwrap();
        {
            let mut workloads = txn.open_table(WORKLOADS).unwrap();
            let single = serde_json::json!({
                "spiffe_id": db, "address": "10.0.0.9:15006",
                "cert_expires_at_unix": 100, "last_seen_unix": 1,
            });
            let several = serde_json::json!({
                "spiffe_id": web, "address": "10.0.0.1:15006",
                "addresses": ["10.0.0.1:15006", "[fd00::1]:15006"],
                "cert_expires_at_unix": 200, "last_seen_unix": 1,
            });
            for (id, record) in [(db, single), (web, several)] {
                let bytes = serde_json::to_vec(&record).unwrap();
                workloads.insert(id, bytes.as_slice()).unwrap();
            }
        }
        txn.commit().unwrap();
    }
    let store = EmbeddedStore::open(&path).unwrap();
    let mut read: Vec<(String, Vec<(String, i64)>)> = store
        .workloads()
        .unwrap()
        .into_iter()
        .map(|w| {
            let addresses = w
                .addresses
                .into_iter()
                .map(|a| (a.address, a.expires_at_unix))
                .collect();
            (w.spiffe_id, addresses)
        })
        .collect();
    read.sort();
    assert_eq!(
        read,
        [
            (db.to_string(), vec![("10.0.0.9:15006".to_string(), 100)]),
            (
                web.to_string(),
                vec![
                    ("10.0.0.1:15006".to_string(), 200),
                    ("[fd00::1]:15006".to_string(), 200)
                ]
            ),
        ]
    );
    // The migrated addresses are owned until they expire.
    let api = "spiffe://td/ns/shop/sa/api";
    let err = store
        .record_issuance(
            None,
            &issued("01", api),
            &certified(api, &["[fd00::1]:15006"], 300, 150),
        )
        .unwrap_err();
    assert!(matches!(err, StoreError::AddressHeld { .. }), "{err}");
    // Another sidecar of web joins: the migrated addresses stay with theirs.
    store
        .record_issuance(
            None,
            &issued("02", web),
            &certified(web, &["10.0.0.2:15006"], 300, 150),
        )
        .unwrap();
    assert_eq!(
        live_at(&store, web, 150),
        ["10.0.0.1:15006", "10.0.0.2:15006", "[fd00::1]:15006"]
    );
    let txn = store.db.begin_read().unwrap();
    let table = txn.open_table(WORKLOADS).unwrap();
    let stored: serde_json::Value =
        serde_json::from_slice(table.get(web).unwrap().unwrap().value()).unwrap();
    assert_eq!(
        stored["address_expires_at_unix"],
        serde_json::json!({"10.0.0.1:15006": 200, "10.0.0.2:15006": 300, "[fd00::1]:15006": 200})
    );
    assert_eq!(
        stored["address"], "10.0.0.2:15006",
        "the latest to expire first"
    );
}

/// A Certify of `id` at 1 whose connection verified each of `addresses`,
/// with a certificate that ends at 100.
fn verified(id: &str, addresses: &[&str]) -> WorkloadRecord {
    let mut record = certified(id, addresses, 100, 1);
    for address in &mut record.addresses {
        address.verified = true;
    }
    record
}

/// Addresses are owned by IP: an unverified report of another port at an
/// IP a live workload holds is refused as the very address is, and the
/// refusal writes nothing; an IP nobody holds is taken.
#[test]
fn an_unverified_address_at_an_ip_another_workload_holds_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&tmp.path().join(DB_FILE)).unwrap();
    let victim = "spiffe://td/ns/a/sa/victim";
    let thief = "spiffe://td/ns/a/sa/thief";
    store
        .record_issuance(
            None,
            &issued("01", victim),
            &verified(victim, &["10.0.0.1:15006", "[fd00::1]:15006"]),
        )
        .unwrap();
    let version = store.snapshot_version().unwrap();

    for address in ["10.0.0.1:9999", "[fd00::1]:1"] {
        let taking = certified(thief, &["10.0.0.2:15006", address], 100, 1);
        let err = store
            .record_issuance(None, &issued("02", thief), &taking)
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::AddressHeld { address: a, holder }
                if a == address && holder == victim),
            "{address}: {err}"
        );
    }
    assert_eq!(store.workloads().unwrap().len(), 1);
    assert_eq!(store.issued_certificates().unwrap().len(), 1);
    assert_eq!(store.snapshot_version().unwrap(), version);
    assert_eq!(
        live_at(&store, victim, 50),
        ["10.0.0.1:15006", "[fd00::1]:15006"]
    );

    // An IP that begins like the victim's is another IP.
    store
        .record_issuance(
            None,
            &issued("03", thief),
            &workload(thief, "10.0.0.10:15006"),
        )
        .unwrap();
    assert_eq!(live_at(&store, thief, 50), ["10.0.0.10:15006"]);
}

/// A verified address is the workload's for certain: it shares its IP
/// with other workloads' verified claims (sidecars of one host, each on
/// its port) and takes the IP from unverified ones, across a restart; the
/// very address another workload holds verified stays that workload's.
#[test]
fn a_verified_address_shares_an_ip_with_verified_claims_and_takes_it_from_others() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join(DB_FILE);
    let store = EmbeddedStore::open(&path).unwrap();
    let web = "spiffe://td/ns/a/sa/web";
    let db = "spiffe://td/ns/a/sa/db";
    let squatter = "spiffe://td/ns/a/sa/squatter";
    // Claimed unverified (another family's address, say) before anyone
    // was seen at that IP.
    store
        .record_issuance(
            None,
            &issued("01", squatter),
            &certified(squatter, &["10.0.0.9:15006", "10.0.0.1:7002"], 100, 1),
        )
        .unwrap();
    drop(store);
    let store = EmbeddedStore::open(&path).unwrap();

    let change = store
        .record_issuance(None, &issued("02", web), &verified(web, &["10.0.0.1:7001"]))
        .unwrap();
    assert_eq!(change, EndpointChange::Changed);
    assert_eq!(live_at(&store, squatter, 50), ["10.0.0.9:15006"]);
    drop(store);
    let store = EmbeddedStore::open(&path).unwrap();

    store
        .record_issuance(None, &issued("03", db), &verified(db, &["10.0.0.1:7002"]))
        .unwrap();
    assert_eq!(live_at(&store, web, 50), ["10.0.0.1:7001"]);
    assert_eq!(live_at(&store, db, 50), ["10.0.0.1:7002"]);

    // The squatter cannot come back at that IP, on any port.
    let err = store
        .record_issuance(
            None,
            &issued("04", squatter),
            &certified(squatter, &["10.0.0.1:7003"], 100, 1),
        )
        .unwrap_err();
    assert!(matches!(err, StoreError::AddressHeld { .. }), "{err}");
    // Nor may a verified claim take the address web holds verified.
    let err = store
        .record_issuance(None, &issued("05", db), &verified(db, &["10.0.0.1:7001"]))
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::AddressHeld { address, holder }
            if address == "10.0.0.1:7001" && holder == web),
        "{err}"
    );
    assert_eq!(live_at(&store, web, 50), ["10.0.0.1:7001"]);
}

/// A verified address taking an IP from unverified claims is logged once
/// for each workload it took from, naming both workloads and every address
/// taken, in JSON as one plain string (a list joined by `,`, not a debug
/// print) that a log query can match; a Certify that takes nothing logs
/// no such line.
#[test]
fn taking_an_ip_from_unverified_claims_is_logged_with_the_addresses_taken() {
    // Unexpired when the test runs: a live claim is taken, an expired one
    // only dropped.
    const LATER: i64 = 32_503_680_000;
    // Opened under the capture: the store's writer thread logs where its
    // opener does.
    let (logs, guard) = crate::test_logs::capture(true);
    let tmp = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&tmp.path().join(DB_FILE)).unwrap();
    let web = "spiffe://td/ns/a/sa/web";
    let squatter = "spiffe://td/ns/a/sa/squatter";
    store
        .record_issuance(
            None,
            &issued("01", squatter),
            &certified(
                squatter,
                &["10.0.0.9:15006", "10.0.0.1:7003", "10.0.0.1:7002"],
                LATER,
                1,
            ),
        )
        .unwrap();
    assert!(
        !logs.text().contains("took its IP"),
        "nothing was taken yet: {}",
        logs.text()
    );
    let mut web_record = certified(web, &["10.0.0.1:7001"], LATER, 1);
    web_record.addresses[0].verified = true;
    store
        .record_issuance(None, &issued("02", web), &web_record)
        .unwrap();
    drop(guard);
    let lines: Vec<serde_json::Value> = logs
        .text()
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .filter(|line: &serde_json::Value| {
            line["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("took its IP from another workload's unverified claim"))
        })
        .collect();
    let [line] = &lines[..] else {
        panic!("one line for the one holder: {lines:#?}");
    };
    assert_eq!(line["level"], "INFO");
    assert_eq!(line["fields"]["spiffe_id"], web);
    assert_eq!(line["fields"]["holder"], squatter);
    assert_eq!(line["fields"]["addresses"], "10.0.0.1:7002,10.0.0.1:7003");
    assert_eq!(live_at(&store, squatter, 50), ["10.0.0.9:15006"]);
    assert_eq!(live_at(&store, web, 50), ["10.0.0.1:7001"]);
}

/// A revocation older than the longest certificate lifetime covers only
/// expired certificates: it is neither read nor listed, and the next
/// revocation write (or opening the database) removes it.
#[test]
fn a_revocation_past_every_certificate_lifetime_is_pruned() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join(DB_FILE);
    let store = EmbeddedStore::open(&path).unwrap();
    let kept = REVOCATION_KEPT.as_secs() as i64;
    let revocation = |id: &str, at: i64| Revocation {
        spiffe_id: id.into(),
        revoked_at_unix: at,
        reason: String::new(),
    };
    let revoke = |store: &EmbeddedStore, r: &Revocation| {
        let at = r.revoked_at_unix;
        store.revoke_at(&r.spiffe_id, &r.reason, || at).unwrap();
    };
    let old = revocation("spiffe://td/ns/a/sa/old", unix_now() - kept - 60);
    let recent = revocation("spiffe://td/ns/a/sa/recent", unix_now() - kept + 3600);
    for r in [&recent, &old] {
        revoke(&store, r);
    }
    assert_eq!(store.revocation(&old.spiffe_id).unwrap(), None);
    assert_eq!(
        store.revocation(&recent.spiffe_id).unwrap().as_ref(),
        Some(&recent)
    );
    assert_eq!(store.revocations().unwrap(), std::slice::from_ref(&recent));
    let stored: Vec<Revocation> = store.read_all(REVOCATIONS).unwrap();
    assert_eq!(stored.len(), 2, "not removed before the next write");

    let fresh = revocation("spiffe://td/ns/a/sa/fresh", unix_now());
    revoke(&store, &fresh);
    let stored: Vec<Revocation> = store.read_all(REVOCATIONS).unwrap();
    assert_eq!(stored, [fresh.clone(), recent.clone()]);

    // Opening the database prunes too.
    revoke(&store, &old);
    drop(store);
    let store = EmbeddedStore::open(&path).unwrap();
    let stored: Vec<Revocation> = store.read_all(REVOCATIONS).unwrap();
    assert_eq!(stored, [fresh, recent]);
}

/// A revocation is stamped in its write's transaction and never moves
/// back: of two revokes committed in the other order than they were
/// stamped, the later time holds.
#[test]
fn a_revocation_never_moves_back_in_time() {
    let tmp = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&tmp.path().join(DB_FILE)).unwrap();
    let id = "spiffe://td/ns/a/sa/b";
    let now = unix_now();
    let (first, previous) = store.revoke_at(id, "first", || now).unwrap();
    assert_eq!((first.revoked_at_unix, previous), (now, None));
    let (second, previous) = store.revoke_at(id, "second", || now - 5).unwrap();
    assert_eq!(second.revoked_at_unix, now, "not moved back");
    assert_eq!(second.reason, "second");
    assert_eq!(previous, Some(first));
    assert_eq!(store.revocation(id).unwrap(), Some(second));
}

/// A renewal by certificate is checked against the identity's revocation
/// in the issuance's transaction: one covering the certificate (or one of
/// unknown issue time) is refused and changes nothing; a certificate
/// issued after the revocation renews.
#[test]
fn a_renewal_by_a_revoked_certificate_is_refused_in_its_transaction() {
    let tmp = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&tmp.path().join(DB_FILE)).unwrap();
    let id = "spiffe://td/ns/a/sa/b";
    let now = unix_now();
    let w = certified(id, &["10.0.0.1:1"], now + 3600, now);
    let (revocation, _) = store.revoke_at(id, "", || now - 10).unwrap();
    let version = store.snapshot_version().unwrap();
    for issued_at_unix in [Some(now - 10), Some(now - 600), None] {
        let proof = IssuanceProof::Certificate { issued_at_unix };
        let err = store
            .record_issuance(Some(proof), &issued("01", id), &w)
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::Revoked(r) if *r == revocation),
            "{issued_at_unix:?}: {err}"
        );
    }
    assert!(store.workloads().unwrap().is_empty());
    assert!(store.issued_certificates().unwrap().is_empty());
    assert_eq!(store.snapshot_version().unwrap(), version);

    let after = IssuanceProof::Certificate {
        issued_at_unix: Some(now - 9),
    };
    store
        .record_issuance(Some(after), &issued("02", id), &w)
        .unwrap();
    assert_eq!(store.issued_certificates().unwrap().len(), 1);
}

/// Opening the database removes revocations past every certificate
/// lifetime, which snapshots carried: it sets a new version, so the
/// (version, epoch) a sidecar holds never names other content. An open
/// that removes nothing keeps both.
#[test]
fn pruning_revocations_on_open_sets_a_new_version() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join(DB_FILE);
    let store = EmbeddedStore::open(&path).unwrap();
    let old = unix_now() - REVOCATION_KEPT.as_secs() as i64 - 60;
    store
        .revoke_at("spiffe://td/ns/a/sa/old", "", || old)
        .unwrap();
    let before = versioned(&store);
    drop(store);

    let store = EmbeddedStore::open(&path).unwrap();
    let state = store.discovery_state().unwrap();
    assert!(state.revocations.is_empty());
    assert_ne!(
        (state.version, state.epoch),
        before,
        "new content, new version"
    );
    assert_eq!(state.version, before.0 + 1);
    let after = versioned(&store);
    drop(store);

    let store = EmbeddedStore::open(&path).unwrap();
    assert_eq!(versioned(&store), after, "nothing removed, nothing new");
}

/// An unrevoke of an identity that is not revoked (or whose revocation is
/// past every certificate lifetime) is answered `None` and changes
/// nothing: no revocation removed, stale ones included, no new version.
#[test]
fn an_unrevoke_of_an_identity_not_revoked_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&tmp.path().join(DB_FILE)).unwrap();
    let old = unix_now() - REVOCATION_KEPT.as_secs() as i64 - 60;
    let stale = "spiffe://td/ns/a/sa/stale";
    store.revoke_at(stale, "", || old).unwrap();
    let stored: Vec<Revocation> = store.read_all(REVOCATIONS).unwrap();
    let before = versioned(&store);
    for id in ["spiffe://td/ns/a/sa/never", stale] {
        assert_eq!(store.unrevoke(id).unwrap(), None, "{id}");
        let now_stored: Vec<Revocation> = store.read_all(REVOCATIONS).unwrap();
        assert_eq!(now_stored, stored, "{id}");
        assert_eq!(versioned(&store), before, "{id}");
    }

    // One that is revoked is removed, in a new version.
    let live = "spiffe://td/ns/a/sa/live";
    store.revoke_at(live, "", unix_now).unwrap();
    let version = store.snapshot_version().unwrap();
    assert!(store.unrevoke(live).unwrap().is_some());
    let now_stored: Vec<Revocation> = store.read_all(REVOCATIONS).unwrap();
    assert!(now_stored.is_empty(), "{now_stored:?}");
    assert_eq!(store.snapshot_version().unwrap(), version + 1);
}
