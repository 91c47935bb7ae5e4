//! `--trust-anchors` against the real control plane: the anchors join the
//! trust bundle that Certify, Watch and `bundle.pem` hand out; unusable
//! anchors stop the start with exit 64; and a root is rotated as
//! docs/ARCHITECTURE.md describes, with restarts only: a new version reaches
//! reconnecting sidecars at each step, and a certificate of the old root
//! renews during the overlap.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rustls_pki_types::CertificateDer;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use trellis_control_plane::ca::CertificateAuthority;
use trellis_core::TrustDomain;
use trellis_proto::discovery::v1::discovery_client::DiscoveryClient;
use trellis_proto::discovery::v1::watch_request::Kind;
use trellis_proto::discovery::v1::{Snapshot, Subscribe, WatchRequest};
use trellis_proto::identity::v1::CertifyRequest;
use trellis_proto::identity::v1::identity_client::IdentityClient;
use x509_parser::prelude::*;

const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";
const INBOUND: &str = "127.0.0.1:7001";

/// A new root of the mesh's trust domain, written as `name.crt` and
/// `name.key` into `dir`; returns its DER and the two paths.
fn new_root(dir: &Path, name: &str) -> (CertificateDer<'static>, PathBuf, PathBuf) {
    let td = TrustDomain::new("cluster.local").unwrap();
    let (ca, cert_pem, key_pem) = CertificateAuthority::generate(&td).unwrap();
    let (cert, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert, cert_pem).unwrap();
    std::fs::write(&key, key_pem).unwrap();
    (ca.bundle()[0].clone(), cert, key)
}

fn der(roots: &[&CertificateDer<'static>]) -> Vec<Vec<u8>> {
    roots.iter().map(|r| r.to_vec()).collect()
}

fn arg(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `svid`'s Watch stream, subscribed holding `held`: a version and the
/// epoch it was set in.
async fn watch(
    cp: &ControlPlane,
    svid: &Svid,
    (last_version, last_version_epoch): (u64, u64),
) -> (mpsc::Sender<WatchRequest>, tonic::Streaming<Snapshot>) {
    let channel = trellis_core::grpc::connect(&cp.grpc, Arc::new(cp.client_config(Some(svid))))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(8);
    tx.send(WatchRequest {
        kind: Some(Kind::Subscribe(Subscribe {
            inbound_address: INBOUND.into(),
            last_version,
            inbound_addresses: Vec::new(),
            accepts_endpoints_version: false,
            accepts_endpoint_changes: false,
            last_version_epoch,
            warnings: Vec::new(),
            opaque_ports: Vec::new(),
        })),
    })
    .await
    .unwrap();
    let snapshots = DiscoveryClient::new(channel)
        .watch(ReceiverStream::new(rx))
        .await
        .expect("watch opens")
        .into_inner();
    (tx, snapshots)
}

/// What a sidecar holding `snapshot` subscribes with.
fn held(snapshot: &Snapshot) -> (u64, u64) {
    (snapshot.version, snapshot.version_epoch)
}

/// The first snapshot of a Watch subscribed holding `held`, or `None` when
/// the control plane sends nothing (the sidecar is current).
async fn first_snapshot(cp: &ControlPlane, svid: &Svid, held: (u64, u64)) -> Option<Snapshot> {
    let (_tx, mut snapshots) = watch(cp, svid, held).await;
    let wait = Duration::from_millis(800);
    match tokio::time::timeout(wait, snapshots.message()).await {
        Ok(message) => Some(message.unwrap().expect("a snapshot")),
        Err(_) => None,
    }
}

/// A renewal with `svid` as the client certificate: `Err` when the control
/// plane refuses the certificate (in TLS 1.3 that may surface at connect or
/// at the call).
async fn renew(cp: &ControlPlane, svid: &Svid) -> Result<Svid, String> {
    let channel =
        trellis_core::grpc::connect(&cp.grpc, Arc::new(cp.client_config(Some(svid)))).await;
    let key = p256();
    let response = IdentityClient::new(channel.map_err(|e| e.to_string())?)
        .certify(CertifyRequest {
            csr: csr_for(&key, WEB),
            proof: None,
            inbound_address: INBOUND.into(),
            inbound_addresses: Vec::new(),
        })
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    assert_eq!(
        response.trust_bundle,
        der(&cp.bundle().iter().collect::<Vec<_>>())
    );
    Ok(Svid::issued(key, response))
}

fn signed_by(leaf: &CertificateDer<'_>, root: &CertificateDer<'_>) -> bool {
    let (_, leaf) = parse_x509_certificate(leaf).unwrap();
    let (_, root) = parse_x509_certificate(root).unwrap();
    leaf.verify_signature(Some(root.public_key())).is_ok()
}

#[tokio::test]
async fn certify_the_first_snapshot_and_bundle_pem_carry_the_trust_anchors() {
    let tmp = tempfile::tempdir().unwrap();
    let (anchor, anchor_file, _) = new_root(tmp.path(), "next");
    // The same root twice in the file is published once.
    let twice = tmp.path().join("anchors.pem");
    let pem = std::fs::read_to_string(&anchor_file).unwrap();
    std::fs::write(&twice, format!("{pem}{pem}")).unwrap();
    let cp = ControlPlane::start(&["--trust-anchors", arg(&twice)]);

    let bundle = cp.bundle();
    assert_eq!(
        bundle.len(),
        2,
        "bundle.pem holds the signing root and the anchor"
    );
    let signing = bundle[0].clone();
    assert_eq!(bundle[1], anchor);
    let log = cp.log();
    let loaded = log
        .lines()
        .find(|l| l.contains("trust bundle loaded"))
        .unwrap_or_else(|| panic!("no `trust bundle loaded` in {log}"));
    assert!(loaded.contains("roots=2"), "{loaded}");
    // The generated root is named apart by its key.
    use sha2::{Digest, Sha256};
    let (_, root) = parse_x509_certificate(&signing).unwrap();
    let key_id = hex::encode(&Sha256::digest(root.public_key().raw)[..4]);
    assert!(
        loaded.contains(&format!(
            "CN=Trellis root CA cluster.local {key_id} (until "
        )),
        "{loaded}"
    );
    assert!(!log.contains("PRIVATE KEY"), "{log}");
    // An operator alerts on the first root to expire.
    let earliest = bundle
        .iter()
        .map(|der| {
            let (_, cert) = parse_x509_certificate(der).unwrap();
            cert.validity().not_after.timestamp()
        })
        .min()
        .unwrap();
    let metrics = cp.metrics();
    assert!(
        metrics.contains("trellis_trust_bundle_roots 2\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "trellis_trust_bundle_expiry_timestamp_seconds {earliest}\n"
        )),
        "{metrics}"
    );

    let token = cp.token(WEB, 0).await;
    let key = p256();
    let response = cp
        .certify(csr_for(&key, WEB), Some(&token), None, INBOUND)
        .await
        .expect("certify with a join token");
    assert_eq!(response.trust_bundle, der(&[&signing, &anchor]));
    let web = Svid::issued(key, response);
    assert!(
        signed_by(&web.chain[0], &signing),
        "the signing CA signs, not the anchor"
    );

    let snapshot = first_snapshot(&cp, &web, (0, 0))
        .await
        .expect("a first snapshot");
    assert_eq!(snapshot.trust_bundle, der(&[&signing, &anchor]));
}

#[test]
fn unusable_trust_anchors_exit_64_naming_the_file_and_touch_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let empty = tmp.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let leaf = tmp.path().join("leaf.pem");
    let td = TrustDomain::new("cluster.local").unwrap();
    let (ca, _, _) = CertificateAuthority::generate(&td).unwrap();
    let (issued, _) = ca
        .issue_with_key(
            &trellis_core::SpiffeId::parse(WEB).unwrap(),
            &Default::default(),
            Duration::from_secs(600),
        )
        .unwrap();
    write_pem(&leaf, &issued.chain[0]);
    for (file, why) in [
        (&empty, "no certificate in it".to_owned()),
        (
            &leaf,
            "certificate 1 (O=Trellis): not a CA certificate".to_owned(),
        ),
    ] {
        let flag = Command::new(CP)
            .arg("--state-dir")
            .arg(&state)
            .arg("--trust-anchors")
            .arg(file)
            .output()
            .unwrap();
        let twin = Command::new(CP)
            .arg("--state-dir")
            .arg(&state)
            .env("TRELLIS_TRUST_ANCHORS", file)
            .output()
            .unwrap();
        // From the environment, the refusal names the variable the value
        // came from as well as its flag.
        for (out, source) in [
            (flag, "--trust-anchors"),
            (twin, "TRELLIS_TRUST_ANCHORS (--trust-anchors)"),
        ] {
            assert_eq!(out.status.code(), Some(64), "{}", file.display());
            let stderr = String::from_utf8_lossy(&out.stderr);
            let expected = format!("error: {source} {}: {why}", file.display());
            assert!(stderr.contains(&expected), "{expected} in {stderr}");
            assert!(
                !state.exists(),
                "{} must not create the state dir",
                file.display()
            );
        }
    }
}

/// A path quoted in a refusal is said as it is, even when it holds the
/// text of a flag whose value came from the environment: only the flag
/// the refusal names is named with its variable.
#[test]
fn a_refused_path_holding_a_flags_text_is_said_as_it_is() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let dir = tmp.path().join("--trust-anchors");
    std::fs::create_dir(&dir).unwrap();
    let file = dir.join("--trust-anchors.pem");
    std::fs::write(&file, "").unwrap();
    let out = Command::new(CP)
        .arg("--state-dir")
        .arg(&state)
        .env("TRELLIS_TRUST_ANCHORS", &file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    let expected = format!(
        "error: TRELLIS_TRUST_ANCHORS (--trust-anchors) {}: no certificate in it (it should \
         hold the PEM roots to trust)\n",
        file.display()
    );
    assert_eq!(stderr, expected);
    assert!(!state.exists(), "the state dir must not be created");
}

/// The procedure of docs/ARCHITECTURE.md ("Rotating the root") on a state
/// dir whose control plane generated its root.
#[tokio::test]
async fn a_root_is_rotated_with_restarts_and_an_overlap() {
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let (new_root, new_cert, new_key) = new_root(tmp.path(), "new");
    let cp = ControlPlane::start_in(tmp.clone(), &[]);
    let old_root = cp.bundle()[0].clone();
    let web = enroll(&cp, WEB, INBOUND).await;
    let before = first_snapshot(&cp, &web, (0, 0))
        .await
        .expect("a first snapshot");
    assert_eq!(before.trust_bundle, der(&[&old_root]));
    cp.stop_async().await;

    // (1) The generated CA, moved out of the state dir, signs as the
    // operator's; the new root is an anchor. A sidecar that reconnects
    // holding the last version gets the new one, with both roots.
    let (old_cert, old_key) = (tmp.path().join("old.crt"), tmp.path().join("old.key"));
    let state = tmp.path().join("state");
    std::fs::rename(state.join("ca.crt"), &old_cert).unwrap();
    std::fs::rename(state.join("ca.key"), &old_key).unwrap();
    let step1 = [
        "--ca-cert",
        arg(&old_cert),
        "--ca-key",
        arg(&old_key),
        "--trust-anchors",
        arg(&new_cert),
    ];
    let cp = ControlPlane::start_in(tmp.clone(), &step1);
    assert_eq!(cp.bundle(), [old_root.clone(), new_root.clone()]);
    let both = first_snapshot(&cp, &web, held(&before))
        .await
        .expect("a new version for the new bundle");
    assert_ne!(both.version, before.version);
    assert_eq!(both.trust_bundle, der(&[&old_root, &new_root]));
    cp.stop_async().await;
    // The same flags again: the sidecar is current, nothing is sent.
    let cp = ControlPlane::start_in(tmp.clone(), &step1);
    assert_eq!(first_snapshot(&cp, &web, held(&both)).await, None);
    cp.stop_async().await;

    // (2) The new root signs, the old one is an anchor: the certificate
    // the old root signed still renews, and the new one chains to the new
    // root.
    let step2 = [
        "--ca-cert",
        arg(&new_cert),
        "--ca-key",
        arg(&new_key),
        "--trust-anchors",
        arg(&old_cert),
    ];
    let cp = ControlPlane::start_in(tmp.clone(), &step2);
    assert_eq!(cp.bundle(), [new_root.clone(), old_root.clone()]);
    let swapped = first_snapshot(&cp, &web, held(&both))
        .await
        .expect("a new version for the reordered bundle");
    assert_eq!(swapped.trust_bundle, der(&[&new_root, &old_root]));
    let renewed = renew(&cp, &web)
        .await
        .expect("the old root's certificate renews");
    assert!(signed_by(&renewed.chain[0], &new_root));
    cp.stop_async().await;

    // (3) The old anchor dropped: the new root alone; the old root's
    // certificates are refused, the new ones renew.
    let step3 = ["--ca-cert", arg(&new_cert), "--ca-key", arg(&new_key)];
    let cp = ControlPlane::start_in(tmp.clone(), &step3);
    assert_eq!(cp.bundle(), std::slice::from_ref(&new_root));
    let alone = first_snapshot(&cp, &renewed, held(&swapped))
        .await
        .expect("a new version for the new root alone");
    assert_eq!(alone.trust_bundle, der(&[&new_root]));
    assert!(
        renew(&cp, &web).await.is_err(),
        "the old root is no longer trusted"
    );
    renew(&cp, &renewed)
        .await
        .expect("the new root's certificate renews");
}

/// A root of `--trust-anchors` that expires `lifetime` from now, and a
/// client SVID for `id` that it signed, valid for an hour.
fn retiring_root(lifetime: ::time::Duration, id: &str) -> (String, Svid) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyUsagePurpose,
    };
    let now = ::time::OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "retiring root");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = now - ::time::Duration::minutes(1);
    params.not_after = now + lifetime;
    let root_key = p256();
    let root_pem = params.self_signed(&root_key).unwrap().pem();
    let issuer = Issuer::new(params, root_key);
    let key = p256();
    let mut leaf = CertificateParams::default();
    leaf.subject_alt_names = vec![uri(id)];
    leaf.is_ca = IsCa::ExplicitNoCa;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    leaf.not_before = now - ::time::Duration::minutes(1);
    leaf.not_after = now + ::time::Duration::hours(1);
    let chain = vec![leaf.signed_by(&key, &issuer).unwrap().der().clone()];
    (root_pem, Svid { key, chain })
}

/// A TLS connection to the gRPC port with `config` (whose session cache
/// lets a later one resume): whether it resumed, and whether the server
/// then answered the HTTP/2 preface, as it does a connection it serves.
async fn resumed_and_served(cp: &ControlPlane, config: &Arc<rustls::ClientConfig>) -> (bool, bool) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(&cp.grpc).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await
        .unwrap();
    let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    // The client preface and an empty SETTINGS frame.
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let mut answer = [0u8; 9];
    let served = matches!(
        tokio::time::timeout(PATIENCE, tls.read(&mut answer)).await,
        Ok(Ok(n)) if n > 0
    );
    (resumed, served)
}

/// An anchor that expires while the control plane runs anchors nothing
/// from then on, and is reported: a warning names it, the bundle's gauges
/// count it as expired and move on to the next root to expire (so an alert
/// on the expiry gauge stops firing once a rotation is done), and
/// `trellisctl check` warns of it before and after.
/// rustls restores a resumed session's client chain from its cache and
/// calls no verifier: once the root that chain leads to has expired, the
/// control plane verifies the chain again and closes the connection
/// (`expired_root`) instead of serving it, as the sidecars do; until then a
/// session resumes as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_anchor_is_reported_and_the_sessions_it_anchored_cannot_resume() {
    let dir = tempfile::tempdir().unwrap();
    let (root_pem, svid) = retiring_root(::time::Duration::seconds(4), WEB);
    let anchors = dir.path().join("anchors.pem");
    std::fs::write(&anchors, root_pem).unwrap();
    let cp = ControlPlane::start(&["--trust-anchors", arg(&anchors)]);
    let config = Arc::new(cp.client_config(Some(&svid)));
    let not_after = |der: &CertificateDer<'_>| {
        let (_, cert) = parse_x509_certificate(der).unwrap();
        cert.validity().not_after.timestamp()
    };
    let bundle = cp.bundle();
    let (signing, retiring) = (not_after(&bundle[0]), not_after(&bundle[1]));
    let gauges = |expired: usize, next: i64| {
        let metrics = cp.metrics();
        assert!(
            metrics.contains(&format!("trellis_trust_bundle_expired_roots {expired}\n"))
                && metrics.contains(&format!(
                    "trellis_trust_bundle_expiry_timestamp_seconds {next}\n"
                )),
            "{metrics}"
        );
    };
    gauges(0, retiring);
    // `trellisctl check` warns of the anchor as it comes, then as it goes.
    let check = |warning: &str| {
        let out = cp.ctl(&["check"]);
        let report = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{report}");
        assert!(
            report.contains(&format!("warn  trust anchor CN=retiring root {warning}")),
            "{report}"
        );
    };
    check("expires at");

    assert_eq!(resumed_and_served(&cp, &config).await, (false, true));
    assert_eq!(resumed_and_served(&cp, &config).await, (true, true));

    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(resumed_and_served(&cp, &config).await, (true, false));
    assert!(
        cp.metrics()
            .contains("trellis_tls_handshake_failures_total{reason=\"expired_root\"} 1"),
        "{}",
        cp.metrics()
    );
    cp.wait_for_line("the refusal to be logged", |l| {
        l.contains("a resumed session's chain is no longer trusted") && l.contains("expired")
    });
    cp.wait_for_line("the expiry to be reported", |l| {
        l.contains("a trust anchor has expired") && l.contains("CN=retiring root")
    });
    gauges(1, signing);
    check("expired at");
}
