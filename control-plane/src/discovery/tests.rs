//! Encoded snapshots against the snapshots they stand for.

use super::*;
use crate::store::embedded::{DB_FILE, EmbeddedStore};
use crate::store::{IssuedCertRecord, WorkloadRecord};

thread_local! {
    /// How many revocation lists this thread's views encoded.
    pub(super) static REVOCATION_ENCODINGS: std::cell::Cell<usize> =
        const { std::cell::Cell::new(0) };
}

const WEB: &str = "spiffe://td/ns/a/sa/web";
const DB: &str = "spiffe://td/ns/a/sa/db";
const API: &str = "spiffe://td/ns/a/sa/api";

/// Records a renewal of `id` listening on `address`, valid for an hour.
fn register(store: &EmbeddedStore, id: &str, serial: &str, address: &str) {
    register_until(store, id, serial, address, unix_now() + 3600);
}

/// Records a renewal of `id` listening on `address`, valid until `expires`.
fn register_until(store: &EmbeddedStore, id: &str, serial: &str, address: &str, expires: i64) {
    let issued = IssuedCertRecord {
        serial_hex: serial.into(),
        spiffe_id: id.into(),
        not_after_unix: expires,
        issued_at_unix: unix_now(),
    };
    let workload = WorkloadRecord::new(id, [address.to_string()], expires, unix_now());
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
        .encoded_snapshot_in(&view, &web, &EndpointsIn::Full)
        .decode()
        .unwrap();
    assert_eq!(decoded, discovery.snapshot_in(&view, &web));
    assert_eq!(decoded.endpoints.len(), 1);

    // A new endpoint is a new version, whose endpoint part is new too.
    register(&store, DB, "02", "127.0.0.1:7002");
    discovery.refresh().unwrap();
    let view = discovery.view();
    let decoded = discovery
        .encoded_snapshot_in(&view, &web, &EndpointsIn::Full)
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
    let encoded = discovery.encoded_snapshot_in(&view, &web, &EndpointsIn::Same(view.version - 1));
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

/// A sidecar that holds an earlier content of the endpoints can be sent
/// what changed since instead: computed once per starting content (the
/// same bytes for every stream that starts there), and not at all when it
/// would be no smaller than the whole list.
#[test]
fn endpoint_changes_are_what_changed_since_the_content_held() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(&tmp.path().join(DB_FILE)).unwrap());
    register(&store, WEB, "01", "127.0.0.1:7001");
    // DB's sidecar on 7002 stops renewing, and that address leaves.
    let ends = unix_now() + 2;
    register_until(&store, DB, "02", "127.0.0.1:7002", ends);
    let discovery =
        Discovery::new(store.clone(), vec![vec![1, 2, 3]], MeshConfig::default()).unwrap();
    let web = SpiffeId::parse(WEB).unwrap();
    let before = discovery.view();
    let held = before.held_endpoints();
    assert_eq!(held.endpoints.len(), 2);
    register(&store, API, "03", "127.0.0.1:7003");
    register(&store, DB, "04", "127.0.0.1:7004");
    while unix_now() < ends {
        std::thread::sleep(Duration::from_millis(100));
    }
    discovery.changed().unwrap();
    let view = discovery.view();
    assert_ne!(view.endpoints_token(), held.token);

    let part = discovery.endpoint_changes(&held, &view).unwrap();
    let again = discovery.endpoint_changes(&held, &view).unwrap();
    assert_eq!(part.as_ptr(), again.as_ptr(), "encoded once");
    let endpoints = EndpointsIn::Changes(before.version, part);
    let decoded = discovery
        .encoded_snapshot_in(&view, &web, &endpoints)
        .decode()
        .unwrap();
    assert_eq!(decoded.endpoints_version, before.version);
    assert!(decoded.endpoints.is_empty() && decoded.services.is_empty());
    let endpoint = |address: &str, id: &str| Endpoint {
        address: address.into(),
        spiffe_id: id.into(),
    };
    assert_eq!(
        decoded.endpoint_changes,
        Some(EndpointChanges {
            endpoints: vec![
                endpoint("127.0.0.1:7003", API),
                endpoint("127.0.0.1:7004", DB)
            ],
            removed_endpoints: vec!["127.0.0.1:7002".into()],
            ..EndpointChanges::default()
        })
    );

    // From nothing held, the changes are every endpoint: no smaller.
    let nothing = HeldEndpoints {
        token: u64::MAX,
        endpoints: Arc::default(),
        services: Arc::default(),
    };
    assert_eq!(discovery.endpoint_changes(&nothing, &view), None);
}

/// `version`, in no epoch (as the Kubernetes store sets them).
fn at(version: u64) -> SnapshotVersion {
    SnapshotVersion { version, epoch: 0 }
}

/// Versions of the Kubernetes store are content digests: a smaller number
/// may be the newer snapshot, so the status keeps the last acknowledged.
#[test]
fn the_acked_version_is_the_last_one_acknowledged_not_the_greatest() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(&tmp.path().join(DB_FILE)).unwrap());
    let discovery = Arc::new(Discovery::new(store, Vec::new(), MeshConfig::default()).unwrap());
    let web = SpiffeId::parse(WEB).unwrap();
    let stream = discovery.open_stream(&web, None, Vec::new());
    stream.ack(at(0x9f3a_0000_0000_0001), None, Vec::new());
    stream.nack("bad policy");
    stream.ack(at(0x1b20_0000_0000_0002), None, Vec::new());
    let (_, statuses) = discovery
        .statuses()
        .into_iter()
        .find(|(id, _)| *id == web)
        .unwrap();
    assert_eq!(statuses.len(), 1);
    assert_eq!(statuses[0].acked_version, 0x1b20_0000_0000_0002);
    assert!(statuses[0].last_nack.is_empty(), "{statuses:?}");

    // Closed, it is remembered as it was, not connected.
    drop(stream);
    let (_, statuses) = discovery.statuses().into_iter().next().unwrap();
    assert_eq!(statuses.len(), 1);
    assert_eq!(statuses[0].acked_version, 0x1b20_0000_0000_0002);
    assert!(!statuses[0].connected());
}

/// Each stream of an identity keeps its own status, and the identity is
/// counted as synced as its least synced stream.
#[test]
fn streams_of_one_identity_keep_their_own_status() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(&tmp.path().join(DB_FILE)).unwrap());
    let discovery = Arc::new(Discovery::new(store, Vec::new(), MeshConfig::default()).unwrap());
    let web = SpiffeId::parse(WEB).unwrap();
    let current = discovery.current();
    let (one, two) = (
        discovery.open_stream(&web, None, Vec::new()),
        discovery.open_stream(&web, None, Vec::new()),
    );
    one.ack(current, Some(current), Vec::new());
    two.nack("bad policy");
    let count = |state| {
        discovery
            .sync_counts()
            .iter()
            .find(|(s, _)| *s == state)
            .unwrap()
            .1
    };
    assert_eq!(count(SyncState::Refused), 1);
    assert_eq!(count(SyncState::Synced), 0);
    let (_, statuses) = discovery.statuses().into_iter().next().unwrap();
    assert_eq!(statuses.len(), 2);
    assert_eq!(
        statuses[1].last_nack, "bad policy",
        "not cleared by the other's ACK"
    );

    two.ack(current, Some(current), Vec::new());
    assert_eq!(count(SyncState::Synced), 1);
    drop(one);
    assert_eq!(discovery.statuses()[0].1.len(), 1, "the open one only");
}

/// A workload seen now whose certificate is good for an hour.
fn live(id: &str, addresses: &[&str]) -> WorkloadRecord {
    WorkloadRecord::new(
        id,
        addresses.iter().map(|a| a.to_string()),
        unix_now() + 3600,
        unix_now(),
    )
}

/// The view's endpoints as (address, SPIFFE ID).
fn endpoints_of(view: &View) -> Vec<(&str, &str)> {
    view.endpoints
        .iter()
        .map(|e| (e.address.as_str(), e.spiffe_id.as_str()))
        .collect()
}

/// Two live workloads that report one address (a store written before
/// addresses were owned) are never both published: a sidecar would expect
/// whichever it read last.
#[test]
fn one_address_is_published_with_one_owner() {
    let view = View::from_state(DiscoveryState {
        version: 7,
        workloads: vec![
            live(WEB, &["10.0.0.1:15006", "10.0.0.2:15006"]),
            live(DB, &["10.0.0.1:15006", "10.0.0.3:15006"]),
        ],
        ..DiscoveryState::default()
    });
    let listed = endpoints_of(&view);
    assert_eq!(
        listed,
        [
            ("10.0.0.1:15006", DB),
            ("10.0.0.2:15006", WEB),
            ("10.0.0.3:15006", DB)
        ]
    );
}

/// An endpoint whose certificate ended while the control plane was stopped
/// leaves in a new version when it starts again: a sidecar that reconnects
/// holding the stored version would otherwise keep the endpoint, as nothing
/// is sent to a sidecar that holds the current version. A restart with
/// nothing expired keeps the version, so such sidecars are sent nothing.
#[test]
fn endpoints_that_expired_while_stopped_leave_in_a_new_version() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(&tmp.path().join(DB_FILE)).unwrap());
    let start = || Discovery::new(store.clone(), Vec::new(), MeshConfig::default()).unwrap();
    let expires = unix_now() + 3;
    let short_lived = WorkloadRecord::new(WEB, ["127.0.0.1:7001".to_string()], expires, unix_now());
    let issued = IssuedCertRecord {
        serial_hex: "01".into(),
        spiffe_id: WEB.into(),
        not_after_unix: expires,
        issued_at_unix: unix_now(),
    };
    store.record_issuance(None, &issued, &short_lived).unwrap();
    register(&store, DB, "02", "127.0.0.1:7002");
    let published = start().view();
    assert_eq!(published.endpoints.len(), 2);
    assert_eq!(start().current_version(), published.version);

    while unix_now() < expires {
        std::thread::sleep(Duration::from_millis(100));
    }
    let restarted = start();
    let view = restarted.view();
    assert!(view.version > published.version, "version {}", view.version);
    assert_eq!(view.version, store.snapshot_version().unwrap());
    let listed: Vec<&str> = view
        .endpoints
        .iter()
        .map(|e| e.spiffe_id.as_str())
        .collect();
    assert_eq!(listed, [DB]);
    drop(restarted);
    assert_eq!(start().current_version(), view.version, "withdrawn once");
}

/// A store that does not say when its version was set counts every
/// expired endpoint as published by it.
#[test]
fn without_the_time_of_the_version_any_expired_endpoint_counts() {
    let now = unix_now();
    let expired = WorkloadRecord::new(WEB, ["127.0.0.1:7001".to_string()], now - 60, now - 3660);
    let state = |set_at| DiscoveryState {
        version: 4,
        version_set_at_unix: set_at,
        workloads: vec![expired.clone()],
        ..DiscoveryState::default()
    };
    assert!(published_since_expired(&state(None), now));
    assert!(published_since_expired(&state(Some(now - 120)), now));
    assert!(!published_since_expired(&state(Some(now - 30)), now));
}

/// Sidecars in separate network namespaces all advertise their own
/// `127.0.0.1:15006`: no one identity is behind it, so it is not published
/// while several report it. A loopback address one workload reports (a
/// mesh on one machine, one port each) still is.
#[test]
fn a_loopback_address_several_workloads_report_is_not_published() {
    let view = View::from_state(DiscoveryState {
        version: 7,
        workloads: vec![
            live(WEB, &["127.0.0.1:15006", "10.0.0.2:15006"]),
            live(DB, &["127.0.0.1:15006", "[::1]:15006"]),
            live(API, &["127.0.0.1:15006", "127.0.0.1:7003"]),
        ],
        ..DiscoveryState::default()
    });
    let listed = endpoints_of(&view);
    assert_eq!(
        listed,
        [
            ("10.0.0.2:15006", WEB),
            ("127.0.0.1:7003", API),
            ("[::1]:15006", DB)
        ]
    );
}

fn service(address: &str, backends: &[&str]) -> Service {
    Service {
        address: address.into(),
        name: "shop/api".into(),
        backends: backends.iter().map(|b| b.to_string()).collect(),
        client_affinity: false,
    }
}

/// Services travel with the endpoints: in the part every stream shares,
/// under the endpoints' content token. A changed backend is new content
/// (a sidecar holding the old list must be sent the new one); the same
/// services again are not (a sidecar that holds them is sent a reference).
#[test]
fn services_travel_with_the_endpoints_and_change_their_token() {
    let state = |backends: &[&str]| DiscoveryState {
        version: 3,
        workloads: vec![live(WEB, &["10.0.0.1:15006"])],
        services: vec![service("10.96.0.10:80", backends)],
        ..DiscoveryState::default()
    };
    let mut tokens = 0;
    let first = View::from_state_after(state(&["10.0.0.1:8080"]), &View::default(), &mut tokens);
    let decoded = EncodedSnapshot::from_parts(vec![first.endpoints_part.clone()])
        .decode()
        .unwrap();
    assert_eq!(decoded.endpoints.len(), 1);
    assert_eq!(
        decoded.services,
        vec![service("10.96.0.10:80", &["10.0.0.1:8080"])]
    );

    let same = View::from_state_after(state(&["10.0.0.1:8080"]), &first, &mut tokens);
    assert_eq!(same.endpoints_token(), first.endpoints_token());

    let moved = View::from_state_after(
        state(&["10.0.0.1:8080", "10.0.0.2:8080"]),
        &same,
        &mut tokens,
    );
    assert_ne!(
        moved.endpoints_token(),
        first.endpoints_token(),
        "a new backend is new content even though no endpoint changed"
    );
    let decoded = EncodedSnapshot::from_parts(vec![moved.endpoints_part.clone()])
        .decode()
        .unwrap();
    assert_eq!(decoded.services[0].backends.len(), 2);
}

/// The revocations are encoded once per change of them: a view after a
/// policy write shares the previous view's encoded revocations (the same
/// bytes, not a copy) and encodes nothing, and one after a revocation
/// encodes the new list.
#[test]
fn revocations_are_encoded_once_per_change_of_them() {
    let revoked = |ids: &[&str]| -> Vec<crate::store::Revocation> {
        ids.iter()
            .map(|id| crate::store::Revocation {
                spiffe_id: (*id).into(),
                revoked_at_unix: 1_700_000_000,
                reason: String::new(),
            })
            .collect()
    };
    let policy = |name: &str| Policy {
        namespace: "a".into(),
        name: name.into(),
        ..Policy::default()
    };
    let state = |version, policies: &[&str], revocations: &[&str]| DiscoveryState {
        version,
        workloads: vec![live(WEB, &["10.0.0.1:15006"])],
        policies: policies.iter().map(|name| policy(name)).collect(),
        revocations: revoked(revocations),
        ..DiscoveryState::default()
    };
    let decoded = |view: &View| {
        EncodedSnapshot::from_parts(vec![view.revocations_part.clone()])
            .decode()
            .unwrap()
            .revocations
    };
    let encodings = || REVOCATION_ENCODINGS.with(|n| n.get());
    let mut tokens = 0;
    let first = View::from_state_after(state(3, &[], &[DB]), &View::default(), &mut tokens);
    assert_eq!(decoded(&first).len(), 1);

    let before = encodings();
    let policy_write = View::from_state_after(state(4, &["p"], &[DB]), &first, &mut tokens);
    assert_eq!(
        encodings(),
        before,
        "unchanged revocations are encoded again"
    );
    assert_ne!(policy_write.policy_tokens, first.policy_tokens);
    assert_eq!(policy_write.revocations_token, first.revocations_token);
    assert_eq!(
        policy_write.revocations_part.as_ptr(),
        first.revocations_part.as_ptr()
    );

    let revocation =
        View::from_state_after(state(5, &["p"], &[DB, API]), &policy_write, &mut tokens);
    assert_eq!(encodings(), before + 1);
    assert_ne!(revocation.revocations_token, policy_write.revocations_token);
    let ids: Vec<_> = decoded(&revocation)
        .into_iter()
        .map(|r| r.spiffe_id)
        .collect();
    assert_eq!(ids, [DB, API]);
}

/// Sidecars that reconnect holding the stored version are sent nothing
/// until the next change: a restart with an added trust anchor must be a
/// new version, whose snapshots carry both roots; a restart with the same
/// bundle keeps the version, and dropping the anchor is a new one again.
#[test]
fn a_restart_with_another_trust_bundle_is_a_new_version() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(&tmp.path().join(DB_FILE)).unwrap());
    register(&store, WEB, "01", "127.0.0.1:7001");
    let (signing, anchor) = (vec![0x30, 1, 1], vec![0x30, 1, 2]);
    let start = |bundle: &[&Vec<u8>]| {
        let bundle = bundle.iter().map(|r| r.to_vec()).collect();
        Discovery::new(store.clone(), bundle, MeshConfig::default()).unwrap()
    };
    let web = SpiffeId::parse(WEB).unwrap();

    let alone = start(&[&signing]).current_version();
    assert_eq!(start(&[&signing]).current_version(), alone);

    let both = start(&[&signing, &anchor]);
    let version = both.current_version();
    assert_ne!(version, alone);
    let view = both.view();
    let snapshot = both.snapshot_in(&view, &web);
    assert_eq!(snapshot.version, version);
    assert_eq!(snapshot.trust_bundle, [signing.clone(), anchor.clone()]);
    let encoded = both
        .encoded_snapshot_in(&view, &web, &EndpointsIn::Full)
        .decode()
        .unwrap();
    assert_eq!(encoded, snapshot);
    assert_eq!(start(&[&signing, &anchor]).current_version(), version);

    // The order is part of the bundle: the signing CA's root comes first.
    let swapped = start(&[&anchor, &signing]).current_version();
    assert_ne!(swapped, version);
    let dropped = start(&[&signing]).current_version();
    assert!(![alone, version, swapped].contains(&dropped));
    assert_eq!(
        start(&[&signing]).snapshot_for(&web).trust_bundle,
        [signing]
    );
}

/// Versions are digests with the Kubernetes store: a replica orders them by
/// when it served them, the last time for one served twice, and forgets
/// those served before the last [`SERVED_KEPT`].
#[test]
fn served_versions_are_ordered_by_when_they_were_last_served() {
    let mut served = Served::default();
    let record = |served: &mut Served, version| served.record(version, Position::default());
    let reached = |served: &Served, since, version| served.reached(Write::Version(since), version);
    for version in [900, 17, 500] {
        record(&mut served, version);
    }
    assert!(reached(&served, 17, 500) && reached(&served, 17, 17));
    assert!(!reached(&served, 500, 17), "17 was served before 500");
    assert!(!reached(&served, 3, 500), "3 was never served");
    // Content that comes back to an earlier digest is served again, later.
    record(&mut served, 17);
    assert!(reached(&served, 500, 17));
    assert!(!reached(&served, 17, 500));
    for version in 1_000..1_000 + SERVED_KEPT as u64 {
        record(&mut served, version);
    }
    assert!(!reached(&served, 17, 1_000), "17 is forgotten");
    assert!(reached(&served, 1_000, 1_000 + SERVED_KEPT as u64 - 1));
    assert_eq!(served.order.len(), SERVED_KEPT);
    assert!(
        !served.reached(Write::None, 1_000),
        "nothing asked, nothing reached"
    );
}

/// A write asked about by its store position is reached by every version
/// whose content reaches that position, kind by kind, whether or not the
/// replica ever served the version the write returned; the watch's echo of
/// a replica's own write (same content, later position) moves the version
/// served last on.
#[test]
fn a_write_is_reached_by_position_whatever_versions_were_served() {
    let at = |policies, rate_limits| Position {
        policies,
        rate_limits,
    };
    let mut served = Served::default();
    served.record(900, at(40, 7));
    served.record(17, at(52, 7));
    let write = Write::Position(at(50, 0));
    assert!(!served.reached(write, 900), "900 holds policies up to 40");
    assert!(served.reached(write, 17), "17 holds policies up to 52");
    assert!(!served.reached(write, 12_345), "never served");
    let rate_limit = Write::Position(at(0, 8));
    assert!(!served.reached(rate_limit, 17), "no rate limit past 7");
    served.advance(17, at(52, 8));
    assert!(served.reached(rate_limit, 17));
    served.advance(900, at(99, 99));
    assert!(
        !served.reached(Write::Position(at(60, 0)), 900),
        "only the version served last moves on"
    );
}

/// A policy the store lists in `namespace/name` order (`prod-eu/x` before
/// `prod/y`) keeps its content token across a change that leaves it as it
/// was, so the sidecars it selects are sent nothing for it.
#[test]
fn unchanged_policies_keep_their_tokens_whatever_their_order() {
    let td = trellis_core::TrustDomain::new("td").unwrap();
    // Each selects the workloads of its own namespace, as it must.
    let policy = |namespace: &str, name: &str| {
        let yaml = format!(
            "apiVersion: trellis.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  selector: {{spiffeIds: [\"spiffe://td/ns/{namespace}/*\"]}}
  action: ALLOW
  rules:
    - from: [{{spiffeId: \"{API}\"}}]
"
        );
        let loaded = trellis_core::policy::load_source("p.yaml", &yaml, &td);
        assert!(!loaded.has_errors(), "{:?}", loaded.diagnostics);
        loaded.policies[0].policy.to_proto()
    };
    let state = |workloads: Vec<WorkloadRecord>| DiscoveryState {
        version: 3,
        workloads,
        policies: vec![policy("prod-eu", "x"), policy("prod", "y")],
        ..DiscoveryState::default()
    };
    let mut tokens = 0;
    let first = View::from_state_after(
        state(vec![live(WEB, &["10.0.0.1:15006"])]),
        &View::default(),
        &mut tokens,
    );
    let joined = View::from_state_after(
        state(vec![
            live(WEB, &["10.0.0.1:15006"]),
            live(DB, &["10.0.0.2:15006"]),
        ]),
        &first,
        &mut tokens,
    );
    assert_ne!(joined.endpoints_token(), first.endpoints_token());
    assert_eq!(joined.policy_tokens, first.policy_tokens);
    for selected in [
        "spiffe://td/ns/prod/sa/web",
        "spiffe://td/ns/prod-eu/sa/web",
    ] {
        let web = SpiffeId::parse(selected).unwrap();
        assert!(!first.content_key(&web).policies.is_empty(), "{selected}");
        assert_eq!(
            joined.content_key(&web).policies,
            first.content_key(&web).policies
        );
    }
}

/// Two sidecars sharing an identity (two VMs of one service) are each an
/// endpoint, at its own address: one that stops renewing leaves when the
/// address it reported expires, in a new version, and the other stays.
#[test]
fn sidecars_sharing_an_identity_are_each_an_endpoint_until_their_address_expires() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(&tmp.path().join(DB_FILE)).unwrap());
    let now = unix_now();
    let ends = now + 2;
    register_until(&store, WEB, "01", "10.0.0.1:15006", ends);
    register(&store, WEB, "02", "10.0.0.2:15006");
    let discovery = Discovery::new(store.clone(), Vec::new(), MeshConfig::default()).unwrap();
    let published = discovery.view();
    assert_eq!(
        endpoints_of(&published),
        [("10.0.0.1:15006", WEB), ("10.0.0.2:15006", WEB)]
    );
    let later = View::from_state_at(store.discovery_state().unwrap(), ends);
    assert_eq!(endpoints_of(&later), [("10.0.0.2:15006", WEB)]);

    while unix_now() <= ends {
        std::thread::sleep(Duration::from_millis(100));
    }
    let (due, next) = discovery.endpoint_expiries().unwrap();
    assert!(due, "the first sidecar's address is still published");
    assert!(next.is_some_and(|at| at > ends), "{next:?}");
    discovery.changed().unwrap();
    let view = discovery.view();
    assert!(view.version > published.version);
    assert_eq!(endpoints_of(&view), [("10.0.0.2:15006", WEB)]);
    assert!(!discovery.endpoint_expiries().unwrap().0);
}

/// The expiry task ends when the control plane shuts down, as its other
/// background tasks do, though it would otherwise sleep for the hour an
/// empty mesh gives it; until then it keeps running.
#[tokio::test(start_paused = true)]
async fn endpoint_expiry_ends_at_shutdown() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(&tmp.path().join(DB_FILE)).unwrap());
    let discovery = Arc::new(Discovery::new(store, Vec::new(), MeshConfig::default()).unwrap());
    let expiring = discovery.clone();
    crate::run::assert_runs_until_shutdown(Duration::from_secs(24 * 3600), |shutdown| {
        expiring.expire_endpoints(shutdown)
    })
    .await;
    assert_eq!(Arc::strong_count(&discovery), 1);
}
