//! Identity and discovery against an in-process fake control plane (real
//! gRPC over real mTLS): the first certificate is proved by the token
//! without a client certificate, renewals by the current SVID (and a
//! ServiceAccount token, never a join token); snapshots are
//! ACKed, an invalid one is NACKed with its reason and the last good one
//! stays in force.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::control_plane::{FakeControlPlane, TOKEN};
use common::sidecar::Logs;
use common::*;
use tokio::sync::watch;
use trellis_proto::discovery::v1::{self as pb, encoded::EncodedSnapshot, watch_request::Kind};
use trellis_proto::identity::v1::RefusedInboundAddress;
use trellis_proxy::identity::{self, CertifyParams};
use trellis_proxy::metrics::Metrics;
use trellis_proxy::policy::Snapshot;
use trellis_proxy::policy::watch::{MAX_SNAPSHOT_BYTES, Outputs, SETTLED, WatchParams};

/// The join token the fake accepts, from a file that is not there (it
/// was removed once read at start-up).
fn join_token() -> trellis_proxy::config::Credential {
    trellis_proxy::config::Credential::JoinToken {
        path: "/nonexistent/token".into(),
        at_start: trellis_proxy::config::Token(TOKEN.into()),
    }
}

/// A sidecar's Certify parameters as `me` against `cp`, proving itself
/// with the ServiceAccount token of a file in `dir` that holds `token`;
/// also the file's path, for a test to rotate or remove it.
fn service_account_params(
    cp: &FakeControlPlane,
    me: &trellis_core::SpiffeId,
    dir: &tempfile::TempDir,
    token: &str,
) -> (CertifyParams, std::path::PathBuf) {
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let params = CertifyParams {
        control_plane: cp.addr.clone(),
        identity: me.clone(),
        token: Some(trellis_proxy::config::Credential::ServiceAccountToken(
            token_file.clone(),
        )),
        advertise_addresses: vec!["127.0.0.1:15006".parse().unwrap()],
    };
    (params, token_file)
}

/// Runs the sidecar's identity task as `me` against `cp`, proving the
/// first certificate with the join token; its certificates come out of
/// the returned channel, its trust bundles out of `bundle_tx`'s.
fn start_identity(
    cp: &FakeControlPlane,
    me: &trellis_core::SpiffeId,
    bundle_tx: watch::Sender<trellis_proxy::identity::TrustBundle>,
    metrics: &Arc<Metrics>,
) -> watch::Receiver<Option<Arc<trellis_proxy::identity::Svid>>> {
    let (svid_tx, svid) = watch::channel(None);
    tokio::spawn(identity::run(
        CertifyParams {
            control_plane: cp.addr.clone(),
            identity: me.clone(),
            token: Some(join_token()),
            advertise_addresses: vec!["127.0.0.1:15006".parse().unwrap()],
        },
        svid_tx,
        bundle_tx,
        watch::channel(None).0,
        metrics.clone(),
    ));
    svid
}

#[tokio::test]
async fn certifies_renews_and_watches() {
    let cp = FakeControlPlane::start(Duration::from_secs(4)).await;
    let me = id("/ns/a/sa/web");
    let metrics = Arc::new(Metrics::new());
    let (bundle_tx, bundle) = watch::channel(Arc::new(vec![cp.root.clone()]));
    let (snapshot_tx, mut snapshot) = watch::channel(None);
    let (policies_tx, policies) = watch::channel(None);
    let svid = start_identity(&cp, &me, bundle_tx.clone(), &metrics);
    tokio::spawn(trellis_proxy::policy::watch::run(
        WatchParams {
            control_plane: cp.addr.clone(),
            identity: me.clone(),
            advertise_addresses: vec!["127.0.0.1:15006".parse().unwrap()],
            opaque_ports: Vec::new(),
        },
        svid.clone(),
        Outputs {
            snapshot: snapshot_tx,
            policies: policies_tx,
            bundle: bundle_tx,
            metrics: metrics.clone(),
        },
    ));

    // The first certificate, then a renewal over mTLS before it expires.
    eventually("a renewal proved by the current SVID", || {
        cp.seen
            .lock()
            .unwrap()
            .certify
            .iter()
            .any(|(token, peer)| !token && peer.as_ref() == Some(&me))
    })
    .await;
    let certify = cp.seen.lock().unwrap().certify.clone();
    assert_eq!(
        certify[0],
        (true, None),
        "the first Certify uses the token alone"
    );
    assert!(
        svid.borrow()
            .as_ref()
            .unwrap()
            .is_valid_at(std::time::SystemTime::now())
    );
    assert_eq!(bundle.borrow().len(), 1);

    // Snapshot 1 is ACKed and applied; snapshot 2 is NACKed with the field.
    let good = pb::Snapshot {
        version: 1,
        endpoints: vec![pb::Endpoint {
            address: "10.1.0.7:15006".into(),
            spiffe_id: "spiffe://td.test/ns/b/sa/api".into(),
        }],
        ..Default::default()
    };
    let bad = pb::Snapshot {
        version: 2,
        endpoints: vec![pb::Endpoint {
            address: "not an address".into(),
            spiffe_id: "spiffe://td.test/ns/b/sa/api".into(),
        }],
        ..Default::default()
    };
    let answer = cp.push_and_wait(good).await;
    assert!(
        matches!(&answer, Kind::Ack(a) if a.version == 1),
        "{answer:?}"
    );
    let answer = cp.push_and_wait(bad).await;
    assert!(
        matches!(&answer, Kind::Nack(n) if n.reason.contains("endpoints[0].address")),
        "{answer:?}"
    );
    let current = snapshot.borrow_and_update().clone().unwrap();
    assert_eq!(current.version, 1);
    assert_eq!(
        current.endpoints[&"10.1.0.7:15006".parse().unwrap()].as_str(),
        "spiffe://td.test/ns/b/sa/api"
    );
    assert!(Arc::ptr_eq(
        policies.borrow().as_ref().unwrap(),
        &current.policies
    ));
    assert!(metrics.encode().contains("trellis_snapshot_version 1"));
}

/// A projected ServiceAccount token is rotated by the kubelet, so the sidecar
/// reads its file when it certifies, not once at start-up.
#[tokio::test]
async fn service_account_token_is_read_from_its_file_when_certifying() {
    let cp = FakeControlPlane::start(Duration::from_secs(60)).await;
    let dir = tempfile::tempdir().unwrap();
    let (params, token_file) =
        service_account_params(&cp, &id("/ns/a/sa/web"), &dir, "sa-token-old");
    // The kubelet rewrote the token after the sidecar read its flags.
    std::fs::write(&token_file, "sa-token-new\n").unwrap();
    let (svid_tx, mut svid) = watch::channel(None);
    let (bundle_tx, _bundle) = watch::channel(Arc::new(vec![cp.root.clone()]));
    tokio::spawn(identity::run(
        params,
        svid_tx,
        bundle_tx,
        watch::channel(None).0,
        Arc::new(Metrics::new()),
    ));
    tokio::time::timeout(Duration::from_secs(20), svid.wait_for(|s| s.is_some()))
        .await
        .expect("a certificate within 20 s")
        .unwrap();
    assert_eq!(
        cp.seen.lock().unwrap().service_account_tokens,
        vec!["sa-token-new".to_string()]
    );
}

/// In Kubernetes every Certify proves the ServiceAccount token, renewals
/// too (a control plane with `--renewal-proof token` refuses the
/// certificate alone): the renewal presents the current certificate and
/// carries the token as its file holds it then.
#[tokio::test]
async fn a_renewal_carries_the_service_account_token_beside_the_certificate() {
    let cp = FakeControlPlane::start(Duration::from_secs(60)).await;
    let me = id("/ns/a/sa/web");
    let dir = tempfile::tempdir().unwrap();
    let (params, token_file) = service_account_params(&cp, &me, &dir, "sa-token-1");
    let bundle = [cp.root.clone()];
    let (first, _) = identity::certify(&params, &bundle, None).await.unwrap();
    // The kubelet rotated the token before the renewal.
    std::fs::write(&token_file, "sa-token-2\n").unwrap();
    let (renewed, _) = identity::certify(&params, &bundle, Some(&first))
        .await
        .unwrap();
    assert_ne!(renewed.serial, first.serial);
    let seen = cp.seen.lock().unwrap();
    assert_eq!(
        seen.certify,
        [(true, None), (true, Some(me))],
        "the renewal presents the certificate and proves the token"
    );
    assert_eq!(seen.service_account_tokens, ["sa-token-1", "sa-token-2"]);
}

/// A renewal whose ServiceAccount token file cannot be read (removed, or
/// empty) is made with the certificate alone, which a control plane with
/// `--renewal-proof certificate` renews; the sidecar warns naming the
/// file and the error, never the token. Without a current certificate
/// there is nothing else to prove, and the unreadable file is the error.
#[tokio::test]
async fn a_renewal_without_a_readable_token_file_proves_the_certificate_alone() {
    let (logs, _guard) = Logs::capture(false);
    let cp = FakeControlPlane::start(Duration::from_secs(60)).await;
    let me = id("/ns/a/sa/web");
    let dir = tempfile::tempdir().unwrap();
    let (params, token_file) = service_account_params(&cp, &me, &dir, "sa-token-1");
    let bundle = [cp.root.clone()];
    let (first, _) = identity::certify(&params, &bundle, None).await.unwrap();

    std::fs::remove_file(&token_file).unwrap();
    let (renewed, _) = identity::certify(&params, &bundle, Some(&first))
        .await
        .expect("renewed with the certificate alone");
    assert_ne!(renewed.serial, first.serial);
    let warning = logs
        .find(&["WARN", "ServiceAccount token file could not be read"])
        .expect("a warning");
    assert!(
        warning.contains(&token_file.display().to_string())
            && warning.contains("no such file or directory"),
        "{warning}"
    );

    std::fs::write(&token_file, "").unwrap();
    let (again, _) = identity::certify(&params, &bundle, Some(&renewed))
        .await
        .expect("renewed with the certificate alone");
    assert_ne!(again.serial, renewed.serial);
    assert!(
        logs.find(&[
            "WARN",
            "ServiceAccount token file could not be read",
            "is empty"
        ])
        .is_some(),
        "{:?}",
        logs.lines()
    );

    let e = identity::certify(&params, &bundle, None)
        .await
        .expect_err("no certificate and no token")
        .to_string();
    assert!(
        e.contains("--token-file") && e.contains(&token_file.display().to_string()),
        "{e}"
    );
    let seen = cp.seen.lock().unwrap();
    assert_eq!(
        seen.certify,
        [(true, None), (false, Some(me.clone())), (false, Some(me))],
        "the renewals present the certificate alone; nothing is asked without a proof"
    );
    assert_eq!(seen.service_account_tokens, ["sa-token-1"]);
    assert!(!logs.lines().iter().any(|l| l.contains("sa-token-1")));
}

/// When the control plane needs the token for a renewal
/// (`--renewal-proof token`) and its file cannot be read, the sidecar's
/// error says both, so the one line names the real cause.
#[tokio::test]
async fn a_renewal_refused_for_want_of_an_unreadable_token_says_why_it_was_not_sent() {
    let cp = FakeControlPlane::start(Duration::from_secs(60)).await;
    cp.renewals_need_token();
    let me = id("/ns/a/sa/web");
    let dir = tempfile::tempdir().unwrap();
    let (params, token_file) = service_account_params(&cp, &me, &dir, "sa-token-1");
    let bundle = [cp.root.clone()];
    let (first, _) = identity::certify(&params, &bundle, None).await.unwrap();

    std::fs::remove_file(&token_file).unwrap();
    let e = identity::certify(&params, &bundle, Some(&first))
        .await
        .expect_err("refused without the token");
    assert_eq!(e.reason().token(), "refused");
    let e = e.to_string();
    assert!(
        e.contains("the control plane renews only with the ServiceAccount token")
            && e.contains("--token-file could not be read")
            && e.contains(&token_file.display().to_string())
            && e.contains("no such file or directory"),
        "{e}"
    );
    assert_eq!(
        cp.seen.lock().unwrap().certify,
        [(true, None), (false, Some(me))],
        "the renewal was asked with the certificate alone"
    );
}

/// A join token is read from its file for each Certify that needs one:
/// after the first was used and the certificate expired, an operator
/// writes a new token there and the sidecar recovers without a restart.
#[tokio::test]
async fn a_join_token_is_read_from_its_file_when_certifying() {
    let cp = FakeControlPlane::start(Duration::from_secs(60)).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    let params = CertifyParams {
        control_plane: cp.addr.clone(),
        identity: id("/ns/a/sa/web"),
        token: Some(trellis_proxy::config::Credential::JoinToken {
            path: token_file.clone(),
            at_start: trellis_proxy::config::Token("a-token-already-used".into()),
        }),
        advertise_addresses: vec!["127.0.0.1:15006".parse().unwrap()],
    };
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let (svid, _) = identity::certify(&params, std::slice::from_ref(&cp.root), None)
        .await
        .expect("certified with the token now in the file");
    assert_eq!(svid.id, id("/ns/a/sa/web"));
    assert_eq!(cp.seen.lock().unwrap().certify, [(true, None)]);
}

/// A sidecar given the wrong `--trust-bundle`, or the wrong address, says
/// which and why, each cause once, instead of tonic's bare "transport
/// error"; and nothing is asked of the control plane.
#[tokio::test]
async fn a_failed_dial_says_what_to_check() {
    let cp = FakeControlPlane::start(Duration::from_secs(60)).await;
    let params = |control_plane: String| CertifyParams {
        control_plane,
        identity: id("/ns/a/sa/web"),
        token: Some(join_token()),
        advertise_addresses: vec!["127.0.0.1:15006".parse().unwrap()],
    };

    let foreign = Ca::new().root();
    let e = identity::certify(&params(cp.addr.clone()), &[foreign], None)
        .await
        .unwrap_err();
    assert_eq!(e.reason().token(), "unreachable");
    let e = e.to_string();
    assert!(
        e.starts_with(&format!(
            "connecting to the control plane at {}: its certificate was not issued by a CA of \
             --trust-bundle",
            cp.addr
        )),
        "{e}"
    );
    assert_eq!(e.matches("invalid peer certificate").count(), 1, "{e}");
    assert!(cp.seen.lock().unwrap().certify.is_empty());

    let stopped = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let e = identity::certify(
        &params(stopped.clone()),
        std::slice::from_ref(&cp.root),
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(e.reason().token(), "unreachable");
    let e = e.to_string();
    assert!(
        e.starts_with(&format!(
            "connecting to the control plane at {stopped}: nothing listens there"
        )),
        "{e}"
    );
    assert_eq!(e.matches("Connection refused").count(), 1, "{e}");
}

/// A trust bundle the sidecar cannot use, sent with a certificate, is not
/// taken: every later call to the control plane trusts the bundle, so
/// taking it would cut the sidecar off (no renewal, no discovery) until a
/// restart. The certificate is taken and renewals go on.
#[tokio::test]
async fn an_unusable_trust_bundle_from_certify_is_not_taken() {
    let cp = FakeControlPlane::start(Duration::from_secs(4)).await;
    cp.seen.lock().unwrap().bundle_extra = vec![b"not a certificate".to_vec()];
    let me = id("/ns/a/sa/web");
    let metrics = Arc::new(Metrics::new());
    let (bundle_tx, bundle) = watch::channel(Arc::new(vec![cp.root.clone()]));
    let svid = start_identity(&cp, &me, bundle_tx, &metrics);
    // Two renewals proved by the current SVID: the calls after the bad
    // bundle still trust the control plane.
    eventually("two renewals after the unusable bundle", || {
        let seen = cp.seen.lock().unwrap();
        seen.certify
            .iter()
            .filter(|(token, peer)| !token && peer.as_ref() == Some(&me))
            .count()
            >= 2
    })
    .await;
    assert!(svid.borrow().is_some());
    assert_eq!(
        bundle.borrow().as_slice(),
        std::slice::from_ref(&cp.root),
        "the unusable bundle was taken"
    );
}

/// An inbound address the control plane did not record is named in the
/// sidecar's own log with what to check, and the certificate is taken.
#[tokio::test]
async fn an_address_the_control_plane_did_not_record_is_logged_by_the_sidecar() {
    let (logs, _guard) = Logs::capture(false);
    let cp = FakeControlPlane::start(Duration::from_secs(60)).await;
    cp.seen.lock().unwrap().not_recorded = vec![
        RefusedInboundAddress {
            address: "10.0.0.1:15006".into(),
            reason: "unverified".into(),
        },
        RefusedInboundAddress {
            address: "127.0.0.1:15006".into(),
            reason: "loopback".into(),
        },
    ];
    let me = id("/ns/a/sa/web");
    let metrics = Arc::new(Metrics::new());
    let (bundle_tx, _bundle) = watch::channel(Arc::new(vec![cp.root.clone()]));
    let mut svid = start_identity(&cp, &me, bundle_tx, &metrics);
    svid.wait_for(Option::is_some).await.unwrap();
    logs.wait_for(&[
        "did not record an inbound address of this sidecar",
        "address=10.0.0.1:15006",
        "reason=unverified",
        "--trust-reported-addresses",
    ])
    .await;
    // A loopback address, from a sidecar not on the control plane's host:
    // the remedy is an address its peers can reach.
    logs.wait_for(&[
        "did not record an inbound address of this sidecar",
        "address=127.0.0.1:15006",
        "reason=loopback",
        "set --advertise-address",
    ])
    .await;
}

/// Runs the sidecar's identity and discovery tasks as `me` against `cp`;
/// the snapshots it applies come out of the returned channel.
fn start_watch(
    cp: &FakeControlPlane,
    me: &trellis_core::SpiffeId,
) -> watch::Receiver<Option<Arc<Snapshot>>> {
    let metrics = Arc::new(Metrics::new());
    let (bundle_tx, _) = watch::channel(Arc::new(vec![cp.root.clone()]));
    let (snapshot_tx, snapshot) = watch::channel(None);
    let (policies_tx, _) = watch::channel(None);
    let svid = start_identity(cp, me, bundle_tx.clone(), &metrics);
    tokio::spawn(trellis_proxy::policy::watch::run(
        WatchParams {
            control_plane: cp.addr.clone(),
            identity: me.clone(),
            advertise_addresses: vec!["127.0.0.1:15006".parse().unwrap()],
            opaque_ports: Vec::new(),
        },
        svid,
        Outputs {
            snapshot: snapshot_tx,
            policies: policies_tx,
            bundle: bundle_tx,
            metrics,
        },
    ));
    snapshot
}

/// The snapshot of a mesh of `pods` pods (one endpoint each) and `services`
/// Services of four backends each.
fn mesh_of(version: u64, pods: u32, services: u32) -> pb::Snapshot {
    let ip = |n: u32| format!("10.{}.{}.{}", n >> 16 & 0xff, n >> 8 & 0xff, n & 0xff);
    pb::Snapshot {
        version,
        endpoints: (0..pods)
            .map(|n| pb::Endpoint {
                address: format!("{}:15006", ip(n)),
                spiffe_id: format!("spiffe://td.test/ns/team-{}/sa/workload-{n}", n % 200),
            })
            .collect(),
        services: (0..services)
            .map(|n| pb::Service {
                address: format!("172.20.{}.{}:8080", n >> 8 & 0xff, n & 0xff),
                name: format!("team-{}/service-{n}", n % 200),
                backends: (0..4)
                    .map(|b| format!("{}:8080", ip((n * 4 + b) % pods)))
                    .collect(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// A large mesh's snapshot is more than gRPC's usual 4 MiB: the sidecar
/// still reads it, instead of failing and reconnecting for ever.
#[tokio::test]
async fn a_snapshot_past_grpcs_default_size_is_taken() {
    let cp = FakeControlPlane::start(Duration::from_secs(60)).await;
    let mut snapshot = start_watch(&cp, &id("/ns/a/sa/web"));
    let large = mesh_of(1, 60_000, 15_000);
    let size = EncodedSnapshot::part(&large).len();
    assert!(size > 5 << 20, "{size} bytes");
    let answer = cp.push_and_wait(large).await;
    assert!(
        matches!(&answer, Kind::Ack(a) if a.version == 1),
        "{answer:?}"
    );
    let current = snapshot.borrow_and_update().clone().unwrap();
    assert_eq!(current.endpoints.len(), 60_000);
    assert_eq!(current.services.len(), 15_000);
}

/// A snapshot larger than the sidecar reads is refused before it is read,
/// with an error naming its size and the limit; the last good snapshot
/// stays in force.
#[tokio::test]
async fn a_snapshot_past_the_limit_is_refused_saying_how_large() {
    let (logs, _guard) = Logs::capture(false);
    let cp = FakeControlPlane::start(Duration::from_secs(60)).await;
    let snapshot = start_watch(&cp, &id("/ns/a/sa/web"));
    let answer = cp.push_and_wait(mesh_of(1, 10, 2)).await;
    assert!(matches!(answer, Kind::Ack(_)), "{answer:?}");

    let huge = pb::Snapshot {
        version: 2,
        endpoints: vec![pb::Endpoint {
            address: "10.0.0.1:15006".into(),
            spiffe_id: "x".repeat(MAX_SNAPSHOT_BYTES),
        }],
        ..Default::default()
    };
    let size = EncodedSnapshot::part(&huge).len();
    cp.push(huge);
    let line = logs
        .wait_for(&["discovery snapshot too large to read"])
        .await;
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains(&format!("size={size}")), "{line}");
    assert!(
        line.contains(&format!("limit={MAX_SNAPSHOT_BYTES}")),
        "{line}"
    );
    assert_eq!(snapshot.borrow().as_ref().unwrap().version, 1);
}

/// A sidecar whose certificate the control plane no longer trusts (the
/// root that signed it was dropped from the bundle while the sidecar was
/// cut off) renews with its ServiceAccount token instead of retrying the
/// refused certificate until it expires, as long as it stays valid.
#[tokio::test]
async fn a_certificate_the_control_plane_refuses_is_replaced_by_proving_the_token() {
    let (logs, _guard) = Logs::capture(false);
    let cp = FakeControlPlane::start(Duration::from_secs(60)).await;
    let dropped = Ca::new();
    let me = id("/ns/a/sa/web");
    let held = dropped.svid(&me);
    let dir = tempfile::tempdir().unwrap();
    let (params, _) = service_account_params(&cp, &me, &dir, "sa-token");
    // The sidecar still trusts both roots: it never saw the new bundle.
    let bundle = [cp.root.clone(), dropped.root()];
    let (svid, _) = identity::certify(&params, &bundle, Some(&held))
        .await
        .expect("certified with the token once the certificate was refused");
    assert_eq!(svid.id, me);
    assert_ne!(svid.serial, held.serial);
    // The certificate was refused in the handshake, before any call.
    assert_eq!(cp.seen.lock().unwrap().certify, [(true, None)]);
    assert_eq!(
        cp.seen.lock().unwrap().service_account_tokens,
        ["sa-token".to_string()]
    );
    logs.wait_for(&[
        "refused the current certificate for a renewal",
        &format!("serial={}", held.serial),
        "alert=UnknownCA",
        "proving the token instead",
    ])
    .await;
}

/// A certificate from Certify that peers would refuse (a faulty CA's leaf
/// without basicConstraints) is not taken, as every handshake with it
/// would fail: at start the sidecar stays without one and not ready, at a
/// renewal it keeps the current one. Each refusal is logged saying what is
/// wrong and counted as a failed renewal, for that reason.
#[tokio::test]
async fn a_certificate_peers_would_refuse_is_not_taken() {
    const WHY: &str = "error=Certify answered an unusable certificate: every peer would refuse \
                       the leaf: the certificate has no basicConstraints; an X.509-SVID leaf \
                       carries basicConstraints with cA false";
    let (logs, _guard) = Logs::capture(false);
    let cp = FakeControlPlane::start(Duration::from_secs(4)).await;
    cp.seen.lock().unwrap().leaf_without_basic_constraints = true;
    let app = echo_app().await;
    let s = common::sidecar::sidecar(&cp, app.addr, &[]).await;
    let refusals = || {
        logs.lines()
            .iter()
            .filter(|l| l.contains("certify failed") && l.contains(WHY))
            .count()
    };
    eventually("the first certificate refused", || refusals() > 0).await;
    // `/ready` says why, as the log does.
    let ready = s.get("/ready").await;
    let why = WHY.strip_prefix("error=").unwrap();
    assert!(
        ready.starts_with("HTTP/1.1 503 ")
            && ready.ends_with(&format!(
                "\r\n\r\ntrellis: not ready: no certificate yet: the last Certify failed: {why}\n"
            )),
        "{ready}"
    );
    let errors =
        "trellis_certificate_renewals_total{outcome=\"error\",reason=\"peers_would_refuse\"}";
    assert!(s.metrics.encode().contains(errors), "no {errors}");

    // A well-formed leaf is taken; the renewal's, again without
    // basicConstraints, is not.
    cp.seen.lock().unwrap().leaf_without_basic_constraints = false;
    logs.wait_for(&["certificate issued", "renewal=false"])
        .await;
    cp.seen.lock().unwrap().leaf_without_basic_constraints = true;
    let serial = || async {
        let config = s.get("/config").await;
        let (_, body) = config.split_once("\r\n\r\n").unwrap();
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        body["certificate"]["serial"].as_str().unwrap().to_owned()
    };
    let held = serial().await;
    let before = refusals();
    eventually("a renewal refused", || refusals() > before).await;
    assert!(
        cp.seen
            .lock()
            .unwrap()
            .certify
            .contains(&(false, Some(s.identity.clone()))),
        "no renewal proved by the certificate"
    );
    assert_eq!(serial().await, held, "the refused certificate was taken");
}

/// When each of the three Subscribes after the first reached `cp`, watched
/// every 20 ms; the test fails if they have not all come within 20 s.
async fn resubscribed(cp: &FakeControlPlane) -> Vec<std::time::Instant> {
    let mut arrived = Vec::new();
    let mut seen = 1;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while arrived.len() < 3 {
        let subscribes = cp.seen.lock().unwrap().subscribes.len();
        if subscribes > seen {
            seen = subscribes;
            arrived.push(std::time::Instant::now());
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not three Subscribes after the first within 20 s, only at {arrived:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    arrived
}

/// A stream that opened and then brought a snapshot too large to read
/// does not reset the reconnection backoff, as a stream that opened and
/// later broke does: every retry would meet the same snapshot, so they
/// come 0.5 to 1 s, 1 to 2 s, then 2 to 4 s apart, not every second.
#[tokio::test]
async fn a_snapshot_past_the_limit_is_retried_with_growing_backoff() {
    let cp = FakeControlPlane::start(Duration::from_secs(60)).await;
    let _snapshot = start_watch(&cp, &id("/ns/a/sa/web"));
    let answer = cp.push_and_wait(mesh_of(1, 10, 2)).await;
    assert!(matches!(answer, Kind::Ack(_)), "{answer:?}");
    cp.push(pb::Snapshot {
        version: 2,
        endpoints: vec![pb::Endpoint {
            address: "10.0.0.1:15006".into(),
            spiffe_id: "x".repeat(MAX_SNAPSHOT_BYTES),
        }],
        ..Default::default()
    });
    let arrived = resubscribed(&cp).await;
    let third = arrived[2] - arrived[1];
    assert!(
        third >= Duration::from_millis(1900),
        "the third retry came {third:?} after the second"
    );
}

/// A control plane that ends every stream with `UNAVAILABLE` as soon as
/// it opens (crashing under its streams, again and again) is retried with
/// growing backoff, as one that cannot be reached: 0.5 to 1 s, 1 to 2 s,
/// then 2 to 4 s apart. Only a stream that stayed open a while starts the
/// backoff again from its first step, so a fleet does not come back to a
/// crash-looping control plane every second.
#[tokio::test]
async fn streams_ended_as_they_open_are_retried_with_growing_backoff() {
    let cp = FakeControlPlane::start(Duration::from_secs(60)).await;
    let _snapshot = start_watch(&cp, &id("/ns/a/sa/web"));
    let answer = cp.push_and_wait(mesh_of(1, 10, 2)).await;
    assert!(matches!(answer, Kind::Ack(_)), "{answer:?}");
    cp.end_streams_at_once(true);
    cp.drop_streams();
    let arrived = resubscribed(&cp).await;
    let third = arrived[2] - arrived[1];
    assert!(
        third >= Duration::from_millis(1900),
        "the third retry after a stream ended at once came {third:?} after the second"
    );
}

/// A stream that stayed open a while and then ended, as a control plane
/// replica ends its streams when it shuts down in a rolling upgrade,
/// starts the backoff again: the sidecar reconnects within a second, even
/// after the backoff had grown.
#[tokio::test]
async fn a_stream_ended_after_a_while_reconnects_within_a_second() {
    let cp = FakeControlPlane::start(Duration::from_secs(120)).await;
    let _snapshot = start_watch(&cp, &id("/ns/a/sa/web"));
    let answer = cp.push_and_wait(mesh_of(1, 10, 2)).await;
    assert!(matches!(answer, Kind::Ack(_)), "{answer:?}");
    let subscribes = || cp.seen.lock().unwrap().subscribes.len();
    let after = |n: usize, within: Duration| async move {
        let deadline = std::time::Instant::now() + within;
        while subscribes() < n {
            assert!(
                std::time::Instant::now() < deadline,
                "no Subscribe {n} within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    // The backoff grows to 4 to 8 s.
    cp.end_streams_at_once(true);
    cp.drop_streams();
    after(4, Duration::from_secs(10)).await;
    cp.end_streams_at_once(false);
    after(5, Duration::from_secs(10)).await;

    tokio::time::sleep(SETTLED + Duration::from_secs(1)).await;
    cp.drop_streams();
    let ended = std::time::Instant::now();
    after(6, Duration::from_secs(10)).await;
    assert!(
        ended.elapsed() < Duration::from_millis(1500),
        "reconnected {:?} after a settled stream ended",
        ended.elapsed()
    );
}
