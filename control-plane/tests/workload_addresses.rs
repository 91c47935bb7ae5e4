//! A workload reports every inbound address its sidecar serves (IPv4 and
//! IPv6): the control plane validates each one, stores them all, and lists
//! one mesh endpoint per address. Sidecars sharing an identity each keep
//! their own addresses. Sidecars that send the single `inbound_address`,
//! and records written before addresses had their own expiry, keep
//! working. An address is recorded only if the Certify came from its IP
//! (the tests' sidecars connect from loopback, so those reporting other
//! addresses run with `--trust-reported-addresses`, as behind NAT), a
//! loopback address only if the Certify came over loopback, and an IP
//! another live workload holds is not taken; a refused address is not
//! recorded, and the certificate is still issued.

mod common;

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
/// `addresses`; the addresses the answer says were not recorded, each with
/// its reason.
async fn renew(
    cp: &ControlPlane,
    svid: &Svid,
    id: &str,
    addresses: &[&str],
) -> Vec<(String, String)> {
    cp.identity_client(Some(svid))
        .await
        .certify(CertifyRequest {
            csr: csr_for(&p256(), id),
            inbound_addresses: addresses.iter().map(|a| a.to_string()).collect(),
            ..CertifyRequest::default()
        })
        .await
        .expect("a renewal")
        .into_inner()
        .refused_inbound_addresses
        .into_iter()
        .map(|r| (r.address, r.reason))
        .collect()
}

fn endpoint(address: &str, id: &str) -> Endpoint {
    Endpoint {
        address: address.into(),
        spiffe_id: id.into(),
    }
}

/// The switch for a control plane that sees sidecars through NAT.
const TRUST: &[&str] = &["--trust-reported-addresses"];

#[tokio::test]
async fn a_dual_stack_workload_is_one_mesh_endpoint_per_address() {
    let cp = ControlPlane::start(TRUST);
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
    // Refusals of one reason are logged once a pause: the first one here.
    let log = eventually("the refusal to be logged", || {
        let log = cp.log();
        log.contains("bad_inbound_address").then_some(log)
    });
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 1000, "a log line of {longest} bytes");

    // Nothing was stored, and the token was not spent.
    assert!(cp.workloads().await.is_empty());
    certify_with_token(&cp, WEB, &token, &["10.0.0.1:15006"])
        .await
        .expect("the token still proves the identity");
}

/// A workload with a valid proof cannot take an IP another live workload
/// holds, on its port or any other, even where reports are trusted: sidecars
/// would expect the wrong identity there. The address is not recorded, and
/// the certificate is issued all the same.
#[tokio::test]
async fn an_ip_another_live_workload_holds_is_not_recorded_even_when_trusted() {
    let cp = ControlPlane::start(TRUST);
    let victim = certify_dual(&cp, DB, &["10.0.0.2:15006"]).await.unwrap();
    let web = certify_dual(&cp, WEB, &["10.0.0.1:15006", "10.0.0.2:15006"])
        .await
        .expect("the certificate is issued without the held address");
    let expected = [
        endpoint("10.0.0.1:15006", WEB),
        endpoint("10.0.0.2:15006", DB),
    ];
    assert_eq!(endpoints(&cp, &web).await, expected);
    assert_eq!(endpoints(&cp, &victim).await, expected);

    // A renewal onto the victim's IP, at another port or written as an
    // IPv4-mapped address, is refused as well.
    renew(
        &cp,
        &web,
        WEB,
        &["10.0.0.2:9999", "[::ffff:10.0.0.2]:15007"],
    )
    .await;
    assert_eq!(endpoints(&cp, &victim).await, expected);
    let line = cp.wait_for_line("the refusal", |l| {
        l.contains("inbound address not recorded") && l.contains("10.0.0.2:9999")
    });
    assert!(line.contains(WEB) && line.contains(DB), "{line}");
    let metrics = cp.metrics();
    assert!(
        metrics.contains("trellis_inbound_addresses_refused_total{reason=\"held\"} 3\n"),
        "{metrics}"
    );
}

/// A state dir whose store holds [`DB`] at `10.0.0.2:15006`, as its
/// sidecar's Certify from that IP recorded it, until an hour from now.
async fn state_with_victim() -> Arc<tempfile::TempDir> {
    use trellis_control_plane::store::embedded::{DB_FILE, EmbeddedStore};
    use trellis_control_plane::store::{IssuedCertRecord, Store, WorkloadRecord};

    let (tmp, state) = empty_state_dir();
    let store = EmbeddedStore::open(&state.join(DB_FILE)).unwrap();
    let now = trellis_control_plane::unix_now();
    let issued = IssuedCertRecord {
        serial_hex: "01".into(),
        spiffe_id: DB.into(),
        not_after_unix: now + 3600,
        issued_at_unix: now,
    };
    let mut victim = WorkloadRecord::new(DB, ["10.0.0.2:15006".to_string()], now + 3600, now);
    victim.addresses[0].verified = true;
    store
        .queue_issuance(None, &issued, &victim, &Arc::default())
        .await
        .unwrap()
        .unwrap();
    tmp
}

/// By default an address is recorded only if the Certify came from its
/// IP: a workload with a valid proof cannot claim another workload's IP
/// (at its port or another), nor any other IP, by reporting it. The victim
/// stays the endpoint at its address; the sidecar gets its certificate
/// and the address it can be seen at; each refusal is logged and counted.
#[tokio::test]
async fn a_report_of_another_workloads_ip_from_elsewhere_is_not_recorded() {
    let cp = ControlPlane::start_in(state_with_victim().await, &[]);
    let web = certify_dual(&cp, WEB, &["127.0.0.1:7001", "10.0.0.2:9999"])
        .await
        .expect("the certificate is issued without the address");
    let not_recorded = renew(
        &cp,
        &web,
        WEB,
        &[
            "127.0.0.1:7001",
            "10.0.0.2:15006",
            "10.0.0.3:15006",
            "[fd00::2]:15006",
        ],
    )
    .await;
    // The sidecar is told which, and why (never who holds an IP).
    let unverified = |a: &str| (a.to_owned(), "unverified".to_owned());
    assert_eq!(
        not_recorded,
        [
            unverified("10.0.0.2:15006"),
            unverified("10.0.0.3:15006"),
            unverified("[fd00::2]:15006"),
        ]
    );

    let expected = [
        endpoint("10.0.0.2:15006", DB),
        endpoint("127.0.0.1:7001", WEB),
    ];
    assert_eq!(endpoints(&cp, &web).await, expected);
    let listed = cp.list_workloads().await;
    assert_eq!(listed_addresses(&listed, WEB), ["127.0.0.1:7001"]);
    assert_eq!(listed_addresses(&listed, DB), ["10.0.0.2:15006"]);
    let line = cp.wait_for_line("the refusal", |l| {
        l.contains("inbound address not recorded") && l.contains("10.0.0.2:9999")
    });
    assert!(
        line.contains(WEB) && line.contains("connected_from=127.0.0.1"),
        "{line}"
    );
    let metrics = cp.metrics();
    assert!(
        metrics.contains("trellis_inbound_addresses_refused_total{reason=\"unverified\"} 4\n"),
        "{metrics}"
    );
}

/// `--trust-reported-addresses` (a control plane behind NAT, seeing no
/// sidecar's own address) records an address the Certify did not come
/// from, but still not at an IP another live workload holds.
#[tokio::test]
async fn the_switch_records_reported_addresses_but_not_at_a_held_ip() {
    let cp = ControlPlane::start_in(state_with_victim().await, TRUST);
    let web = certify_dual(&cp, WEB, &["10.0.0.3:15006", "10.0.0.2:9999"])
        .await
        .expect("a certificate");
    assert_eq!(
        endpoints(&cp, &web).await,
        [
            endpoint("10.0.0.2:15006", DB),
            endpoint("10.0.0.3:15006", WEB)
        ]
    );
    assert_eq!(
        renew(&cp, &web, WEB, &["10.0.0.3:15006", "10.0.0.2:9999"]).await,
        [("10.0.0.2:9999".to_owned(), "held".to_owned())],
        "the renewal's answer names the held address"
    );
    let metrics = cp.metrics();
    assert!(
        refused(&metrics, "held") == 2 && refused(&metrics, "unverified") == 0,
        "{metrics}"
    );
}

/// The reasons an advertised address is refused for, each exported from
/// the start (at 0 until counted).
const REFUSAL_REASONS: [&str; 3] = ["held", "unverified", "loopback"];

/// How many advertised addresses `metrics` counts refused for `reason`:
/// 0 for a series at 0 or not exported.
fn refused(metrics: &str, reason: &str) -> u64 {
    let series = format!("trellis_inbound_addresses_refused_total{{reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series.as_str()))
        .map_or(0, |count| count.parse().expect("a count"))
}

/// The addresses `id` is listed with.
fn listed_addresses(
    answer: &trellis_proto::admin::v1::ListWorkloadsResponse,
    id: &str,
) -> Vec<String> {
    listed(answer, id).addresses.clone()
}

/// A routable (not loopback) IPv4 address of this host: the one it would
/// send from towards a documentation address (nothing is sent).
fn routable_ipv4() -> Option<std::net::IpAddr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.1:9").ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

/// A sidecar reporting its own address is recorded: on loopback, as on one
/// machine (the demo); and from a routable address of this host, with the
/// IPv6 address of a dual-stack sidecar beside it, and beside another
/// identity on the same host at its own port.
#[tokio::test]
async fn a_sidecar_reporting_its_own_address_is_recorded() {
    let mut cp = ControlPlane::start(&["--listen", "0.0.0.0:0"]);
    cp.grpc = format!("127.0.0.1:{}", cp.port());
    let web = certify_dual(&cp, WEB, &["127.0.0.1:7001", "[::1]:7001"])
        .await
        .unwrap();
    assert_eq!(
        endpoints(&cp, &web).await,
        [endpoint("127.0.0.1:7001", WEB), endpoint("[::1]:7001", WEB)]
    );

    let Some(own) = routable_ipv4() else {
        println!("skipped the rest: this host has no routable IPv4 address");
        return;
    };
    let from_own = format!("{own}:{}", cp.port());
    for (id, addresses) in [
        (
            DB,
            vec![format!("{own}:7002"), "[fd00::99]:7002".to_string()],
        ),
        (WEB, vec![format!("{own}:7003")]),
    ] {
        let channel = trellis_core::grpc::connect(&from_own, Arc::new(cp.client_config(None)))
            .await
            .unwrap();
        let token = cp.token(id, 0).await;
        trellis_proto::identity::v1::identity_client::IdentityClient::new(channel)
            .certify(CertifyRequest {
                csr: csr_for(&p256(), id),
                proof: Some(Proof::JoinToken(token)),
                inbound_address: String::new(),
                inbound_addresses: addresses,
            })
            .await
            .expect("a certificate");
    }
    let mut expected = vec![
        endpoint(&format!("{own}:7002"), DB),
        endpoint(&format!("{own}:7003"), WEB),
        endpoint("127.0.0.1:7001", WEB),
        endpoint("[::1]:7001", WEB),
        endpoint("[fd00::99]:7002", DB),
    ];
    expected.sort_by(|a, b| a.address.cmp(&b.address));
    assert_eq!(endpoints(&cp, &web).await, expected);
    let metrics = cp.metrics();
    assert!(
        REFUSAL_REASONS
            .iter()
            .all(|reason| refused(&metrics, reason) == 0),
        "{metrics}"
    );
}

/// A loopback address means "this host", so only a sidecar on the control
/// plane's own host, whose Certify comes over loopback, may report one. A
/// sidecar on another host (simulated here by a Certify from this host's
/// routable address, which the control plane sees as any remote sidecar's)
/// is refused it with the reason `loopback`, logged and counted, and its
/// certificate and routable address are issued and recorded all the same;
/// the same loopback address reported over loopback is an endpoint.
#[tokio::test]
async fn a_loopback_address_is_recorded_only_from_the_control_planes_own_host() {
    let mut cp = ControlPlane::start(&["--listen", "0.0.0.0:0"]);
    let Some(own) = routable_ipv4() else {
        println!("skipped: this host has no routable IPv4 address");
        return;
    };
    let over_loopback = format!("127.0.0.1:{}", cp.port());
    cp.grpc = format!("{own}:{}", cp.port());
    let token = cp.token(DB, 0).await;
    let not_recorded: Vec<(String, String)> = cp
        .identity_client(None)
        .await
        .certify(CertifyRequest {
            csr: csr_for(&p256(), DB),
            proof: Some(Proof::JoinToken(token)),
            inbound_address: String::new(),
            inbound_addresses: vec![
                format!("{own}:7002"),
                "127.0.0.1:7001".into(),
                "[::1]:7001".into(),
            ],
        })
        .await
        .expect("a certificate without the loopback addresses")
        .into_inner()
        .refused_inbound_addresses
        .into_iter()
        .map(|r| (r.address, r.reason))
        .collect();
    let loopback = |a: &str| (a.to_owned(), "loopback".to_owned());
    assert_eq!(
        not_recorded,
        [loopback("127.0.0.1:7001"), loopback("[::1]:7001")]
    );
    let line = cp.wait_for_line("the refusal", |l| {
        l.contains("inbound address not recorded") && l.contains("127.0.0.1:7001")
    });
    assert!(
        line.contains(DB) && line.contains(&format!("connected_from={own}")),
        "{line}"
    );

    cp.grpc = over_loopback;
    let web = certify_dual(&cp, WEB, &["127.0.0.1:7001"])
        .await
        .expect("a certificate");
    let mut expected = vec![
        endpoint("127.0.0.1:7001", WEB),
        endpoint(&format!("{own}:7002"), DB),
    ];
    expected.sort_by(|a, b| a.address.cmp(&b.address));
    assert_eq!(endpoints(&cp, &web).await, expected);
    let listed = cp.list_workloads().await;
    assert_eq!(listed_addresses(&listed, DB), [format!("{own}:7002")]);
    let metrics = cp.metrics();
    assert!(
        refused(&metrics, "loopback") == 2 && refused(&metrics, "unverified") == 0,
        "{metrics}"
    );
}

/// Every sidecar with default flags advertises `127.0.0.1:15006`, its own
/// loopback: sidecars in separate network namespaces (containers, VMs)
/// behind NAT, with `--trust-reported-addresses`, share one control plane
/// and all become ready. No one identity stands behind such an address, so
/// it is not published while several report it; a routable address still
/// has one owner.
#[tokio::test]
async fn sidecars_advertising_loopback_all_certify_and_routable_addresses_stay_owned() {
    let cp = ControlPlane::start(TRUST);
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

    let thief = certify_dual(
        &cp,
        "spiffe://cluster.local/ns/default/sa/thief",
        &["127.0.0.1:15006", "10.0.0.2:15006"],
    )
    .await
    .expect("certified without the held address");
    assert_eq!(endpoints(&cp, &thief).await, expected);
}

/// Two sidecars sharing an identity (two VMs of one service, each with a
/// join token of its own) each report their own address at every renewal:
/// neither displaces the other, and discovery lists both.
#[tokio::test]
async fn sidecars_sharing_an_identity_are_both_endpoints_through_their_renewals() {
    let cp = ControlPlane::start(TRUST);
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
    let (tmp, state) = empty_state_dir();
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

    let cp = ControlPlane::start_in(tmp, TRUST);
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
