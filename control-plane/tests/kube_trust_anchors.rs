//! `--trust-anchors` with `--store kubernetes`, as the chart's
//! `trustAnchorsPEM` passes it: the real binary against recorded API server
//! answers (no Kubernetes API server can run on these machines; `kube_api`
//! stands one in and keeps the CA Secret).

mod common;
mod kube_api;

use base64::Engine as _;
use common::{ControlPlane, csr_for, p256};
use kube_api::{fixture_json, recorded_cluster, web_certify_request};
use serde_json::json;
use trellis_control_plane::ca::CertificateAuthority;
use trellis_core::TrustDomain;

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

/// The CA Secret holds a root; the anchors hold that root and a new one
/// (step 1 of a rotation in Kubernetes). The bundle is the Secret's root,
/// then the new one, each once: in `bundle.pem` and in a Certify response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_anchors_join_the_root_of_the_ca_secret() {
    let fake = recorded_cluster().await;
    let td = TrustDomain::new("cluster.local").unwrap();
    let (secret_ca, secret_cert, secret_key) = CertificateAuthority::generate(&td).unwrap();
    let (next, next_cert, _) = CertificateAuthority::generate(&td).unwrap();
    let b64 = |pem: &str| base64::engine::general_purpose::STANDARD.encode(pem);
    let mut secret = fixture_json("store/secret-empty.json");
    secret["data"] = json!({"tls.crt": b64(&secret_cert), "tls.key": b64(&secret_key)});
    fake.set_secret(Some(secret));
    let dir = tempfile::tempdir().unwrap();
    let anchors = dir.path().join("trust-anchors.pem");
    std::fs::write(&anchors, format!("{secret_cert}{next_cert}")).unwrap();

    let mut flags = fake.control_plane_flags();
    flags.extend(["--trust-anchors".into(), anchors.display().to_string()]);
    let cp = tokio::task::spawn_blocking(move || {
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        ControlPlane::start(&flags)
    })
    .await
    .unwrap();
    let roots = [secret_ca.bundle()[0].clone(), next.bundle()[0].clone()];
    assert_eq!(cp.bundle(), roots);
    assert_eq!(
        fake.secret().unwrap()["data"]["tls.crt"],
        b64(&secret_cert),
        "the Secret is read, never written"
    );

    let response = cp
        .identity_client(None)
        .await
        .certify(web_certify_request(csr_for(&p256(), WEB)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        response.trust_bundle,
        roots.iter().map(|r| r.to_vec()).collect::<Vec<_>>()
    );
}
