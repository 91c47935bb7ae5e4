//! Encoded snapshots against the snapshots they stand for.

use super::*;
use crate::store::embedded::{DB_FILE, EmbeddedStore};
use crate::store::{IssuedCertRecord, WorkloadRecord};

const WEB: &str = "spiffe://td/ns/a/sa/web";
const DB: &str = "spiffe://td/ns/a/sa/db";

/// Records a renewal of `id` listening on `address`, valid for an hour.
fn register(store: &EmbeddedStore, id: &str, serial: &str, address: &str) {
    let expires = unix_now() + 3600;
    let issued = IssuedCertRecord {
        serial_hex: serial.into(),
        spiffe_id: id.into(),
        not_after_unix: expires,
        issued_at_unix: unix_now(),
    };
    let workload = WorkloadRecord {
        spiffe_id: id.into(),
        addresses: vec![address.into()],
        cert_expires_at_unix: expires,
        last_seen_unix: unix_now(),
    };
    store.record_issuance(None, &issued, &workload).unwrap();
}

#[test]
fn an_encoded_snapshot_decodes_as_the_snapshot_it_stands_for() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(&tmp.path().join(DB_FILE)).unwrap());
    register(&store, WEB, "01", "127.0.0.1:7001");
    let mesh = MeshConfig {
        default_policy: "deny".into(),
        outbound_policy: "passthrough".into(),
        opaque_ports: vec![5432],
    };
    let discovery = Discovery::new(store.clone(), vec![vec![1, 2, 3]], mesh).unwrap();
    let web = SpiffeId::parse(WEB).unwrap();
    let view = discovery.view();
    let decoded = discovery
        .encoded_snapshot_in(&view, &web, None)
        .decode()
        .unwrap();
    assert_eq!(decoded, discovery.snapshot_in(&view, &web));
    assert_eq!(decoded.endpoints.len(), 1);

    // A new endpoint is a new version, whose endpoint part is new too.
    register(&store, DB, "02", "127.0.0.1:7002");
    discovery.refresh().unwrap();
    let view = discovery.view();
    let decoded = discovery
        .encoded_snapshot_in(&view, &web, None)
        .decode()
        .unwrap();
    assert_eq!(decoded, discovery.snapshot_in(&view, &web));
    assert_eq!(decoded.endpoints.len(), 2);
    assert_eq!(decoded.version, view.version);
}

/// A snapshot that refers to the endpoints of a version the sidecar holds
/// carries everything else and no endpoint.
#[test]
fn a_snapshot_that_refers_to_held_endpoints_leaves_them_out() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(&tmp.path().join(DB_FILE)).unwrap());
    register(&store, WEB, "01", "127.0.0.1:7001");
    let discovery =
        Discovery::new(store.clone(), vec![vec![1, 2, 3]], MeshConfig::default()).unwrap();
    let web = SpiffeId::parse(WEB).unwrap();
    let view = discovery.view();
    let full = discovery.snapshot_in(&view, &web);
    let encoded = discovery.encoded_snapshot_in(&view, &web, Some(view.version - 1));
    let decoded = encoded.decode().unwrap();
    assert_eq!(decoded.endpoints_version, view.version - 1);
    assert!(decoded.endpoints.is_empty());
    assert_eq!(
        Snapshot {
            endpoints: full.endpoints.clone(),
            endpoints_version: 0,
            ..decoded
        },
        full,
        "everything but the endpoints is sent"
    );
}

/// Versions of the Kubernetes store are content digests: a smaller number
/// may be the newer snapshot, so the status keeps the last acknowledged.
#[test]
fn the_acked_version_is_the_last_one_acknowledged_not_the_greatest() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(&tmp.path().join(DB_FILE)).unwrap());
    let discovery = Discovery::new(store, Vec::new(), MeshConfig::default()).unwrap();
    let web = SpiffeId::parse(WEB).unwrap();
    discovery.ack(&web, 0x9f3a_0000_0000_0001);
    discovery.nack(&web, "bad policy");
    discovery.ack(&web, 0x1b20_0000_0000_0002);
    let status = discovery.status(&web).unwrap();
    assert_eq!(status.acked_version, 0x1b20_0000_0000_0002);
    assert!(status.last_nack.is_empty(), "{status:?}");
}

/// Two live workloads that report one address (a store written before
/// addresses were owned) are never both published: a sidecar would expect
/// whichever it read last.
#[test]
fn one_address_is_published_with_one_owner() {
    let live = |id: &str, addresses: &[&str]| WorkloadRecord {
        spiffe_id: id.into(),
        addresses: addresses.iter().map(|a| a.to_string()).collect(),
        cert_expires_at_unix: unix_now() + 3600,
        last_seen_unix: unix_now(),
    };
    let view = View::from_state(DiscoveryState {
        version: 7,
        workloads: vec![
            live(WEB, &["10.0.0.1:15006", "10.0.0.2:15006"]),
            live(DB, &["10.0.0.1:15006", "10.0.0.3:15006"]),
        ],
        ..DiscoveryState::default()
    });
    let listed: Vec<(&str, &str)> = view
        .endpoints
        .iter()
        .map(|e| (e.address.as_str(), e.spiffe_id.as_str()))
        .collect();
    assert_eq!(
        listed,
        [
            ("10.0.0.1:15006", DB),
            ("10.0.0.2:15006", WEB),
            ("10.0.0.3:15006", DB)
        ]
    );
}
