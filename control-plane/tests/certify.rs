//! Identity.Certify against the real control plane: every refusal has a
//! fitting status and issues nothing; a valid proof gives an X.509-SVID that
//! follows the spec; renewal works over mTLS for the caller's own identity.

mod common;

use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use common::*;
use tonic::Code;
use trellis_control_plane::api::identity::MAX_CERTIFY_REQUEST_BYTES;
use x509_parser::prelude::*;

const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";
const DB: &str = "spiffe://cluster.local/ns/default/sa/db";

/// Nothing was issued and nothing recorded.
async fn assert_nothing_issued(cp: &ControlPlane) {
    assert_eq!(issued_total(&cp.metrics()), 0);
    assert!(
        cp.workloads().await.is_empty(),
        "no workload may be recorded"
    );
}

#[tokio::test]
async fn rejects_csr_for_another_identity() {
    let cp = ControlPlane::start(&[]);
    let token = cp.token(WEB, 0).await;
    let key = p256();
    let err = cp
        .certify(csr_for(&key, DB), Some(&token), None, "")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains(DB), "{}", err.message());
    assert_nothing_issued(&cp).await;
    // The token was not consumed: its rightful use still works.
    cp.certify(csr_for(&key, WEB), Some(&token), None, "")
        .await
        .expect("the token still proves its own identity");
}

/// Certify needs no client certificate, so what it reads is bounded far
/// below gRPC's usual 4 MiB: a request of 1 MiB is refused naming the
/// call and the limit, before its CSR is looked at, and the port serves
/// the next call.
#[tokio::test]
async fn refuses_an_oversized_request_naming_the_limit() {
    use prost::Message;
    use trellis_proto::identity::v1::CertifyRequest;
    use trellis_proto::identity::v1::certify_request::Proof;

    let cp = ControlPlane::start(&[]);
    let token = cp.token(WEB, 0).await;
    let mut client = cp.identity_client(None).await;
    let oversized = CertifyRequest {
        csr: vec![0x30; 1 << 20],
        proof: Some(Proof::JoinToken(token.clone())),
        inbound_address: String::new(),
        inbound_addresses: Vec::new(),
    };
    assert!(oversized.encoded_len() > MAX_CERTIFY_REQUEST_BYTES);
    let err = client.certify(oversized).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(
        err.message(),
        format!(
            "a Certify request may be at most {MAX_CERTIFY_REQUEST_BYTES} bytes; this one is larger"
        )
    );
    let key = p256();
    client
        .certify(CertifyRequest {
            csr: csr_for(&key, WEB),
            proof: Some(Proof::JoinToken(token)),
            inbound_address: String::new(),
            inbound_addresses: Vec::new(),
        })
        .await
        .expect("a Certify of the usual size is served on the same connection");
}

/// A fresh control plane's first scrape, by curl as an operator's
/// Prometheus would, already has every Certify refusal and every TLS
/// handshake failure reason of its gRPC and webhook ports at 0, so alerts
/// and `rate()` work before the first refusal; one refusal then moves its
/// own series only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_control_planes_first_scrape_has_every_refusal_reason_at_zero() {
    use trellis_control_plane::handshake;
    use trellis_core::grpc::CertifyRefusal;

    let cp = ControlPlane::start(&[]);
    let page = cp.metrics();
    let has = |series: String| page.lines().any(|line| line == series);
    for refusal in CertifyRefusal::ALL {
        let series = format!(
            "trellis_certify_failures_total{{reason=\"{}\"}} 0",
            refusal.token()
        );
        assert!(has(series.clone()), "{series} missing from\n{page}");
    }
    for (family, reasons) in [
        ("trellis_tls_handshake_failures_total", handshake::GRPC_PORT),
        (
            "trellis_webhook_tls_handshake_failures_total",
            handshake::WEBHOOK_PORT,
        ),
    ] {
        for reason in reasons {
            let series = format!("{family}{{reason=\"{}\"}} 0", reason.token());
            assert!(has(series.clone()), "{series} missing from\n{page}");
        }
    }

    let err = cp
        .certify(b"not a csr".to_vec(), None, None, "")
        .await
        .unwrap_err();
    assert_eq!(
        err.metadata()
            .get(trellis_core::grpc::REFUSAL_KEY)
            .map(|v| v.to_str().unwrap()),
        Some("csr_malformed"),
        "{err:?}"
    );
    let page = cp.metrics();
    let counted: Vec<_> = page
        .lines()
        .filter(|line| line.starts_with("trellis_certify_failures_total{") && !line.ends_with(" 0"))
        .collect();
    assert_eq!(
        counted,
        ["trellis_certify_failures_total{reason=\"csr_malformed\"} 1"],
        "{page}"
    );
}

/// A Certify refused before the service reads it, one past the limit or
/// one whose bytes are no CertifyRequest, is a refusal like any other:
/// counted in `trellis_certify_failures_total` by its reason, logged as
/// `certify refused`, and named in the answer's `trellis-refusal`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certify_refused_unread_is_counted_and_logged() {
    use prost::Message;
    use trellis_core::grpc::REFUSAL_KEY;
    use trellis_proto::identity::v1::CertifyRequest;

    let cp = ControlPlane::start(&[]);
    let mut client = cp.identity_client(None).await;
    let oversized = CertifyRequest {
        csr: vec![0x30; 1 << 20],
        ..Default::default()
    };
    assert!(oversized.encoded_len() > MAX_CERTIFY_REQUEST_BYTES);
    let err = client.certify(oversized).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(
        err.metadata().get(REFUSAL_KEY).map(|v| v.to_str().unwrap()),
        Some("request_too_large"),
        "{err:?}"
    );

    // A message of 4 bytes that do not decode (a varint never ended).
    let garbage = bytes::Bytes::from_static(&[0, 0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff]);
    let answer =
        raw_grpc::call_ended(&cp, None, "/trellis.identity.v1.Identity/Certify", garbage).await;
    let status = tonic::Status::from_header_map(answer.headers()).expect("a status");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(
        answer
            .headers()
            .get(REFUSAL_KEY)
            .map(|v| v.to_str().unwrap()),
        Some("request_unreadable")
    );

    let metrics = cp.metrics();
    for reason in ["request_too_large", "request_unreadable"] {
        assert!(
            metrics.contains(&format!(
                "trellis_certify_failures_total{{reason=\"{reason}\"}} 1\n"
            )),
            "{reason} not counted once in {metrics}"
        );
        cp.wait_for_line(&format!("a `certify refused` line for {reason}"), |l| {
            l.contains("WARN")
                && l.contains("certify refused")
                && l.contains(&format!("reason=\"{reason}\""))
        });
    }
    assert_nothing_issued(&cp).await;
}

#[tokio::test]
async fn rejects_a_reused_token() {
    let cp = ControlPlane::start(&[]);
    let token = cp.token(WEB, 0).await;
    cp.certify(csr_for(&p256(), WEB), Some(&token), None, "127.0.0.1:1")
        .await
        .unwrap();
    let err = cp
        .certify(csr_for(&p256(), WEB), Some(&token), None, "127.0.0.1:2")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("already used"), "{}", err.message());
    assert_eq!(issued_total(&cp.metrics()), 1);
    let workloads = cp.workloads().await;
    assert_eq!(workloads.len(), 1);
    assert_eq!(
        workloads[0].address, "127.0.0.1:1",
        "the refused call changed nothing"
    );
}

#[tokio::test]
async fn rejects_an_expired_token() {
    let cp = ControlPlane::start(&[]);
    let mut admin = cp.admin_client().await;
    let created = admin
        .create_join_token(trellis_proto::admin::v1::CreateJoinTokenRequest {
            spiffe_id: WEB.into(),
            ttl_seconds: 1,
        })
        .await
        .unwrap()
        .into_inner();
    eventually("the token to expire", || {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        (now > created.expires_at_unix).then_some(())
    });
    let err = cp
        .certify(csr_for(&p256(), WEB), Some(&created.token), None, "")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("expired"), "{}", err.message());
    assert_nothing_issued(&cp).await;
}

#[tokio::test]
async fn rejects_malformed_requests_and_keeps_the_token() {
    let cp = ControlPlane::start(&[]);
    let token = cp.token(WEB, 0).await;
    let key = p256();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "two SANs",
            csr_with(&key, vec![uri(WEB), uri(DB)]),
            "exactly one SAN",
        ),
        (
            "a DNS SAN",
            csr_with(
                &key,
                vec![rcgen::SanType::DnsName("web.local".try_into().unwrap())],
            ),
            "DNS",
        ),
        ("garbage", b"this is not a CSR".to_vec(), "not a valid DER"),
        (
            "a foreign trust domain",
            csr_for(&key, "spiffe://other.org/ns/default/sa/web"),
            "outside trust domain",
        ),
        (
            "a P-384 key",
            csr_for(
                &rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap(),
                WEB,
            ),
            "found an EC key on curve P-384 (1.3.132.0.34)",
        ),
        (
            "an RSA key",
            csr_for(
                &rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap(),
                WEB,
            ),
            "must be ECDSA P-256, found a key of algorithm RSA (1.2.840.113549.1.1.1)",
        ),
        (
            "the CSR as PEM text",
            pem_of(&csr_for(&key, WEB)),
            "it is PEM text; send the DER bytes",
        ),
        ("an empty csr", Vec::new(), "the csr field is empty"),
    ];
    for (what, csr, names) in cases {
        let err = cp.certify(csr, Some(&token), None, "").await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
        assert!(err.message().contains(names), "{what}: {}", err.message());
    }
    assert_nothing_issued(&cp).await;
    assert!(
        cp.metrics()
            .contains("trellis_certify_failures_total{reason=\"csr_san\"} 2")
    );
    cp.certify(csr_for(&key, WEB), Some(&token), None, "")
        .await
        .expect("a refused CSR leaves the token usable");
}

/// `der` as the PEM text `openssl req` writes.
fn pem_of(der: &[u8]) -> Vec<u8> {
    use base64::Engine;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE REQUEST-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap());
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE REQUEST-----\n");
    pem.into_bytes()
}

#[tokio::test]
async fn rejects_renewal_without_client_certificate() {
    let cp = ControlPlane::start(&[]);
    let err = cp
        .certify(csr_for(&p256(), WEB), None, None, "")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert_nothing_issued(&cp).await;
}

#[tokio::test]
async fn service_account_tokens_are_not_implemented_yet() {
    let cp = ControlPlane::start(&[]);
    let mut client = cp.identity_client(None).await;
    let err = client
        .certify(trellis_proto::identity::v1::CertifyRequest {
            csr: csr_for(&p256(), WEB),
            proof: Some(
                trellis_proto::identity::v1::certify_request::Proof::ServiceAccountToken(
                    "x".into(),
                ),
            ),
            inbound_address: String::new(),
            inbound_addresses: Vec::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    assert_nothing_issued(&cp).await;
}

#[tokio::test]
async fn issued_leaf_follows_the_x509_svid_spec() {
    let cp = ControlPlane::start(&["--cert-ttl", "10m"]);
    let token = cp.token(WEB, 0).await;
    let response = cp
        .certify(csr_for(&p256(), WEB), Some(&token), None, "127.0.0.1:15006")
        .await
        .unwrap();
    assert_eq!(response.spiffe_id, WEB);
    assert_eq!(
        response.chain.len(),
        1,
        "signed by the root, no intermediates"
    );
    assert_eq!(response.trust_bundle, vec![cp.bundle()[0].to_vec()]);

    let leaf_path = cp.tmp.path().join("leaf.pem");
    write_pem(&leaf_path, &response.chain[0]);
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(&leaf_path)
        .output()
        .expect("openssl runs");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains(&format!("URI:{WEB}")), "{text}");
    assert!(text.contains("CA:FALSE"), "{text}");
    assert!(text.contains("TLS Web Server Authentication"), "{text}");
    assert!(text.contains("TLS Web Client Authentication"), "{text}");
    assert!(text.contains("Digital Signature"), "{text}");
    assert!(!text.contains("Certificate Sign"), "{text}");

    let (_, leaf) = parse_x509_certificate(&response.chain[0]).unwrap();
    let validity = leaf.validity();
    let lifetime = validity.not_after.timestamp() - validity.not_before.timestamp();
    let backdate = 30;
    assert!(
        (600..=600 + backdate).contains(&lifetime),
        "lifetime {lifetime}s should be the 600s --cert-ttl plus at most {backdate}s backdating"
    );
    assert_eq!(response.expires_at_unix, validity.not_after.timestamp());
    let bundle = cp.bundle();
    let (_, root) = parse_x509_certificate(&bundle[0]).unwrap();
    leaf.verify_signature(Some(root.public_key())).unwrap();
    assert_eq!(issued_total(&cp.metrics()), 1);
}

#[tokio::test]
async fn renews_over_mtls_for_its_own_identity_only() {
    let cp = ControlPlane::start(&[]);
    let svid = enroll(&cp, WEB, "127.0.0.1:7000").await;
    let fresh = p256();
    let renewed = cp
        .certify(csr_for(&fresh, WEB), None, Some(&svid), "")
        .await
        .expect("renewal with the current SVID");
    assert_eq!(renewed.spiffe_id, WEB);
    assert_ne!(renewed.chain[0], svid.chain[0].to_vec());

    let err = cp
        .certify(csr_for(&p256(), DB), None, Some(&svid), "")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(issued_total(&cp.metrics()), 2);
    let workloads = cp.workloads().await;
    assert_eq!(workloads.len(), 1, "{workloads:?}");
    assert_eq!(
        workloads[0].address, "127.0.0.1:7000",
        "renewal keeps the address"
    );
    assert_eq!(workloads[0].cert_expires_at_unix, renewed.expires_at_unix);
}

#[tokio::test]
async fn reserved_identities_are_never_issued() {
    let cp = ControlPlane::start(&[]);
    let token = cp.token(WEB, 0).await;
    let err = cp
        .certify(
            csr_for(&p256(), "spiffe://cluster.local/trellis/admin"),
            Some(&token),
            None,
            "",
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_nothing_issued(&cp).await;
}

/// `trellisctl check` names a connected sidecar that has stopped renewing
/// once three quarters of its certificate's life have passed, before the
/// certificate expires: when it was issued, how long its renewal is
/// overdue and when it expires. A sidecar that renewed at half its life,
/// as sidecars do, is fine, as both were before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_a_sidecar_whose_renewal_is_overdue() {
    let cp = ControlPlane::start(&["--cert-ttl", "60s"]);
    let web = enroll(&cp, WEB, "127.0.0.1:7000").await;
    let db = enroll(&cp, DB, "127.0.0.1:7001").await;
    let mut streams = Vec::new();
    for (svid, inbound) in [(&web, "127.0.0.1:7000"), (&db, "127.0.0.1:7001")] {
        let mut stream = Watcher::open(&cp, svid, inbound).await;
        stream.next().await;
        streams.push(stream.answer_all());
    }
    let answer = cp.list_workloads().await;
    let (issued, expires) = {
        let web = listed(&answer, WEB);
        (web.cert_issued_at_unix, web.cert_expires_at_unix)
    };
    assert_eq!(expires - issued, 60, "{answer:?}");
    let check = || {
        let check = tokio::task::block_in_place(|| cp.ctl(&["check"]));
        let report = String::from_utf8_lossy(&check.stdout).into_owned();
        (report, check.status.success())
    };
    let (report, passed) = check();
    assert!(passed && !report.contains("renew"), "{report}");

    // db renews at half its life; web's sidecar does not.
    let db_issued = listed(&answer, DB).cert_issued_at_unix;
    until(db_issued + 30).await;
    cp.certify(csr_for(&p256(), DB), None, Some(&db), "127.0.0.1:7001")
        .await
        .expect("db's renewal");
    until(issued + 46).await;
    let (report, passed) = check();
    assert!(!passed, "{report}");
    assert_renewal_overdue(&report, WEB, issued, expires);
    assert!(
        !report.contains(DB) && report.contains("1 failure, "),
        "{report}"
    );
    for stream in streams {
        stream.abort();
    }
}
