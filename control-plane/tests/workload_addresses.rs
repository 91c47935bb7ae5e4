//! A workload reports every inbound address its sidecar serves (IPv4 and
//! IPv6): the control plane validates each one, stores them all, and lists
//! one mesh endpoint per address. Sidecars sharing an identity each keep
//! their own addresses. Sidecars that send the single `inbound_address`,
//! and records written before addresses had their own expiry, keep
//! working.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use common::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use trellis_control_plane::api::identity::MAX_CERTIFY_REQUEST_BYTES;
use trellis_proto::discovery::v1::discovery_client::DiscoveryClient;
use trellis_proto::discovery::v1::watch_request::Kind;
use trellis_proto::discovery::v1::{Endpoint, Subscribe, WatchRequest};
use trellis_proto::identity::v1::CertifyRequest;
use trellis_proto::identity::v1::certify_request::Proof;

const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";
const DB: &str = "spiffe://cluster.local/ns/default/sa/db";

/// Certifies `id` with a fresh token, reporting `addresses` in the repeated
/// field.
async fn certify_dual(
    cp: &ControlPlane,
    id: &str,
    addresses: &[&str],
) -> Result<Svid, tonic::Status> {
    let token = cp.token(id, 0).await;
    certify_with_token(cp, id, &token, addresses).await
}

async fn certify_with_token(
    cp: &ControlPlane,
    id: &str,
    token: &str,
    addresses: &[&str],
) -> Result<Svid, tonic::Status> {
    certify_with(cp, id, Proof::JoinToken(token.into()), addresses).await
}

/// The endpoints of the first snapshot `svid`'s sidecar is sent.
async fn endpoints(cp: &ControlPlane, svid: &Svid) -> Vec<Endpoint> {
    let channel = trellis_core::grpc::connect(&cp.grpc, Arc::new(cp.client_config(Some(svid))))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(4);
    tx.send(WatchRequest {
        kind: Some(Kind::Subscribe(Subscribe::default())),
    })
    .await
    .unwrap();
    let mut snapshots = DiscoveryClient::new(channel)
        .watch(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    snapshots.message().await.unwrap().unwrap().endpoints
}

/// Renews `svid` of `id` with its current certificate, reporting
/// `addresses`.
async fn renew(cp: &ControlPlane, svid: &Svid, id: &str, addresses: &[&str]) {
    cp.identity_client(Some(svid))
        .await
        .certify(CertifyRequest {
            csr: csr_for(&p256(), id),
            inbound_addresses: addresses.iter().map(|a| a.to_string()).collect(),
            ..CertifyRequest::default()
        })
        .await
        .expect("a renewal");
}

fn endpoint(address: &str, id: &str) -> Endpoint {
    Endpoint {
        address: address.into(),
        spiffe_id: id.into(),
    }
}

#[tokio::test]
async fn a_dual_stack_workload_is_one_mesh_endpoint_per_address() {
    let cp = ControlPlane::start(&[]);
    // Written non-canonically and twice: stored once, canonical.
    let web = certify_dual(
        &cp,
        WEB,
        &["10.0.0.1:15006", "[fd00:0::1]:15006", "[fd00::1]:15006"],
    )
    .await
    .unwrap();

    let listed = endpoints(&cp, &web).await;
    assert_eq!(
        listed,
        [
            endpoint("10.0.0.1:15006", WEB),
            endpoint("[fd00::1]:15006", WEB)
        ]
    );
    let workloads = cp.workloads().await;
    assert_eq!(workloads.len(), 1);
    assert_eq!(
        workloads[0].addresses,
        ["10.0.0.1:15006", "[fd00::1]:15006"]
    );
    assert_eq!(workloads[0].address, "10.0.0.1:15006");

    // A renewal that reports nothing keeps both addresses (until the
    // certificate they were reported with ends).
    let renewed = cp
        .identity_client(Some(&web))
        .await
        .certify(CertifyRequest {
            csr: csr_for(&p256(), WEB),
            ..CertifyRequest::default()
        })
        .await;
    assert!(renewed.is_ok(), "{renewed:?}");
    assert_eq!(
        cp.workloads().await[0].addresses,
        ["10.0.0.1:15006", "[fd00::1]:15006"]
    );
}

#[tokio::test]
async fn an_older_sidecars_single_address_is_still_an_endpoint() {
    let cp = ControlPlane::start(&[]);
    let db = enroll(&cp, DB, "127.0.0.1:7002").await;
    assert_eq!(endpoints(&cp, &db).await, [endpoint("127.0.0.1:7002", DB)]);
    assert_eq!(cp.workloads().await[0].addresses, ["127.0.0.1:7002"]);
}

#[tokio::test]
async fn rejects_a_bad_inbound_address_naming_it_and_records_nothing() {
    let cp = ControlPlane::start(&[]);
    let token = cp.token(WEB, 0).await;
    for (addresses, named) in [
        (
            &["10.0.0.1:15006", "fd00::1"][..],
            "inbound_addresses[1] \"fd00::1\"",
        ),
        (&["web:15006"][..], "inbound_addresses[0] \"web:15006\""),
        (&["[::]:15006"][..], "inbound_addresses[0] \"[::]:15006\""),
    ] {
        let err = certify_with_token(&cp, WEB, &token, addresses)
            .await
            .map(drop)
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{addresses:?}: {err:?}");
        assert!(
            err.message().contains(named),
            "{addresses:?}: {}",
            err.message()
        );
    }
    let too_many: Vec<String> = (1..=17).map(|i| format!("10.0.0.{i}:15006")).collect();
    let too_many: Vec<&str> = too_many.iter().map(String::as_str).collect();
    let err = certify_with_token(&cp, WEB, &token, &too_many)
        .await
        .map(drop)
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("at most 16"), "{}", err.message());

    // Nothing was stored, and the token was not spent.
    assert!(cp.workloads().await.is_empty());
    certify_with_token(&cp, WEB, &token, &["10.0.0.1:15006"])
        .await
        .expect("the token still proves the identity");
}

#[tokio::test]
async fn refuses_a_huge_inbound_address_with_a_short_answer_and_a_short_log_line() {
    let cp = ControlPlane::start(&[]);
    let token = cp.token(WEB, 0).await;
    // As long as a Certify request may be, far past any address.
    let huge = "9".repeat(MAX_CERTIFY_REQUEST_BYTES / 2);
    let newer = CertifyRequest {
        csr: csr_for(&p256(), WEB),
        proof: Some(Proof::JoinToken(token.clone())),
        inbound_address: String::new(),
        inbound_addresses: vec!["10.0.0.1:15006".into(), huge.clone()],
    };
    let older = CertifyRequest {
        inbound_address: huge,
        inbound_addresses: Vec::new(),
        ..newer.clone()
    };
    for (request, field) in [(newer, "inbound_addresses[1]"), (older, "inbound_address")] {
        let err = cp
            .identity_client(None)
            .await
            .certify(request)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}");
        assert!(
            err.message().starts_with(field) && err.message().contains("at most 64"),
            "{}",
            err.message()
        );
        assert!(err.message().len() < 300, "{} bytes", err.message().len());
    }
    let log = eventually("both refusals to be logged", || {
        let log = cp.log();
        (log.matches("bad_inbound_address").count() >= 2).then_some(log)
    });
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 1000, "a log line of {longest} bytes");

    // Nothing was stored, and the token was not spent.
    assert!(cp.workloads().await.is_empty());
    certify_with_token(&cp, WEB, &token, &["10.0.0.1:15006"])
        .await
        .expect("the token still proves the identity");
}

/// A workload with a valid proof cannot take the address another live
/// workload holds: sidecars would expect the wrong identity there.
#[tokio::test]
async fn refuses_an_address_another_live_workload_holds_and_spends_nothing() {
    let cp = ControlPlane::start(&[]);
    let victim = certify_dual(&cp, DB, &["10.0.0.2:15006"]).await.unwrap();
    let token = cp.token(WEB, 0).await;
    for claimed in [
        &["10.0.0.2:15006"][..],
        &["10.0.0.1:15006", "10.0.0.2:15006"][..],
    ] {
        let err = certify_with_token(&cp, WEB, &token, claimed)
            .await
            .map(drop)
            .unwrap_err();
        assert_eq!(err.code(), Code::AlreadyExists, "{claimed:?}: {err:?}");
        assert!(
            err.message().contains("inbound address 10.0.0.2:15006"),
            "{}",
            err.message()
        );
    }
    let workloads = cp.workloads().await;
    assert_eq!(workloads.len(), 1, "{workloads:?}");
    assert_eq!(workloads[0].spiffe_id, DB);

    // The token was not spent: it proves WEB at its own address.
    let web = certify_with_token(&cp, WEB, &token, &["10.0.0.1:15006"])
        .await
        .expect("the token still proves the identity");
    let expected = [
        endpoint("10.0.0.1:15006", WEB),
        endpoint("10.0.0.2:15006", DB),
    ];
    assert_eq!(endpoints(&cp, &web).await, expected);
    assert_eq!(endpoints(&cp, &victim).await, expected);

    // A renewal that moves onto the victim's address is refused as well.
    let err = cp
        .identity_client(Some(&web))
        .await
        .certify(CertifyRequest {
            csr: csr_for(&p256(), WEB),
            inbound_addresses: vec!["10.0.0.2:15006".into()],
            ..CertifyRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert_eq!(endpoints(&cp, &victim).await, expected);
}

/// Every sidecar with default flags advertises `127.0.0.1:15006`, its own
/// loopback: sidecars in separate network namespaces (containers, VMs)
/// share one control plane and all become ready. No one identity stands
/// behind such an address, so it is not published while several report
/// it; a routable address still has one owner.
#[tokio::test]
async fn sidecars_advertising_loopback_all_certify_and_routable_addresses_stay_owned() {
    let cp = ControlPlane::start(&[]);
    let db = certify_dual(&cp, DB, &["127.0.0.1:15006", "10.0.0.2:15006"])
        .await
        .expect("the first sidecar on loopback certifies");
    let web = certify_dual(&cp, WEB, &["127.0.0.1:15006", "[::1]:15006"])
        .await
        .expect("a second sidecar on the same loopback address certifies");
    let expected = [endpoint("10.0.0.2:15006", DB), endpoint("[::1]:15006", WEB)];
    assert_eq!(endpoints(&cp, &web).await, expected);
    assert_eq!(endpoints(&cp, &db).await, expected);

    // Renewals reporting the loopback address again are refused nothing.
    for (svid, id, other) in [(&db, DB, "10.0.0.2:15006"), (&web, WEB, "[::1]:15006")] {
        cp.identity_client(Some(svid))
            .await
            .certify(CertifyRequest {
                csr: csr_for(&p256(), id),
                inbound_addresses: vec!["127.0.0.1:15006".into(), other.into()],
                ..CertifyRequest::default()
            })
            .await
            .expect("a renewal on loopback is refused nothing");
    }

    let err = certify_dual(
        &cp,
        "spiffe://cluster.local/ns/default/sa/thief",
        &["127.0.0.1:15006", "10.0.0.2:15006"],
    )
    .await
    .map(drop)
    .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert!(
        err.message().contains("inbound address 10.0.0.2:15006"),
        "{}",
        err.message()
    );
}

/// Two sidecars sharing an identity (two VMs of one service, each with a
/// join token of its own) each report their own address at every renewal:
/// neither displaces the other, and discovery lists both.
#[tokio::test]
async fn sidecars_sharing_an_identity_are_both_endpoints_through_their_renewals() {
    let cp = ControlPlane::start(&[]);
    let first = certify_dual(&cp, WEB, &["10.0.0.1:15006"]).await.unwrap();
    let second = certify_dual(&cp, WEB, &["10.0.0.2:15006", "[fd00::2]:15006"])
        .await
        .unwrap();
    let both = [
        endpoint("10.0.0.1:15006", WEB),
        endpoint("10.0.0.2:15006", WEB),
        endpoint("[fd00::2]:15006", WEB),
    ];
    assert_eq!(endpoints(&cp, &first).await, both);

    // Each renews with its own certificate, reporting its own addresses.
    for _ in 0..2 {
        renew(&cp, &first, WEB, &["10.0.0.1:15006"]).await;
        renew(&cp, &second, WEB, &["10.0.0.2:15006", "[fd00::2]:15006"]).await;
    }
    assert_eq!(endpoints(&cp, &second).await, both);
    let workloads = cp.workloads().await;
    assert_eq!(workloads.len(), 1, "{workloads:?}");
    let mut listed = workloads[0].addresses.clone();
    listed.sort();
    assert_eq!(
        listed,
        ["10.0.0.1:15006", "10.0.0.2:15006", "[fd00::2]:15006"]
    );
}

/// Records written before addresses had their own expiry, in the
/// single-address format and in the addresses format, read as those
/// addresses, each until the record's certificate ends: another sidecar of
/// such an identity joins them instead of displacing them.
#[tokio::test]
async fn reads_workloads_stored_in_the_older_formats() {
    use redb::{Database, TableDefinition};
    const WORKLOADS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("workloads");
    const API: &str = "spiffe://cluster.local/ns/default/sa/api";

    // A database as the single-address and the addresses control planes
    // wrote it.
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let state = tmp.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    let single = serde_json::json!({
        "spiffe_id": DB,
        "address": "10.0.0.2:15006",
        "cert_expires_at_unix": 4_000_000_000i64,
        "last_seen_unix": 1_700_000_000i64,
    });
    let several = serde_json::json!({
        "spiffe_id": API,
        "address": "10.0.0.3:15006",
        "addresses": ["10.0.0.3:15006", "[fd00::3]:15006"],
        "cert_expires_at_unix": 4_000_000_000i64,
        "last_seen_unix": 1_700_000_000i64,
    });
    {
        let db = Database::create(state.join("trellis.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut table = txn.open_table(WORKLOADS).unwrap();
            for (id, record) in [(DB, single), (API, several)] {
                let bytes = serde_json::to_vec(&record).unwrap();
                table.insert(id, bytes.as_slice()).unwrap();
            }
        }
        txn.commit().unwrap();
    }

    let cp = ControlPlane::start_in(tmp, &[]);
    let mut workloads = cp.workloads().await;
    workloads.sort_by(|a, b| a.spiffe_id.cmp(&b.spiffe_id));
    assert_eq!(workloads.len(), 2, "{workloads:?}");
    assert_eq!(
        workloads[0].addresses,
        ["10.0.0.3:15006", "[fd00::3]:15006"]
    );
    assert_eq!(workloads[1].addresses, ["10.0.0.2:15006"]);
    let web = certify_dual(&cp, WEB, &["10.0.0.1:15006"]).await.unwrap();
    certify_dual(&cp, API, &["10.0.0.4:15006"]).await.unwrap();
    assert_eq!(
        endpoints(&cp, &web).await,
        [
            endpoint("10.0.0.1:15006", WEB),
            endpoint("10.0.0.2:15006", DB),
            endpoint("10.0.0.3:15006", API),
            endpoint("10.0.0.4:15006", API),
            endpoint("[fd00::3]:15006", API)
        ]
    );
}
