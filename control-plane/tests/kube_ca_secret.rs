//! The mesh CA in a Kubernetes Secret, against recorded API server answers.
//!
//! No Kubernetes API server can run on these machines. Every test here
//! stands one in with a local HTTPS server (`kube_api`) that keeps the
//! Secret as the API server does (recorded `404 NotFound`, `409 Conflict`
//! and `409 AlreadyExists` answers) and records every request.

mod common;
mod kube_api;

use base64::Engine as _;
use kube_api::{CA_NAMESPACE, CA_SECRET, FakeKube, fixture_json};
use serde_json::json;
use trellis_control_plane::ca::CertificateAuthority;
use trellis_control_plane::ca::secret::{CaSecretError, open_ca_secret};
use trellis_control_plane::store::kubernetes;
use trellis_core::TrustDomain;

fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").unwrap()
}

/// No API server can run here: the fake keeps the Secret as the API server
/// would, starting from the empty Secret an earlier chart created. Two replicas
/// starting together write the generated root once (the loser's update is a
/// 409 Conflict and it reads the winner's); a later start only reads it.
#[tokio::test]
async fn the_ca_is_generated_once_and_then_read_from_the_secret() {
    let fake = FakeKube::start().await;
    fake.set_secret(Some(fixture_json("store/secret-empty.json")));
    let client = kubernetes::client(&fake.api()).unwrap();
    let td = td();
    let (a, b) = tokio::join!(
        open_ca_secret(client.clone(), CA_NAMESPACE, CA_SECRET, &td),
        open_ca_secret(client.clone(), CA_NAMESPACE, CA_SECRET, &td),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.bundle_pem(), b.bundle_pem());
    let secret = fake.secret().unwrap();
    let stored = base64::engine::general_purpose::STANDARD
        .decode(secret["data"]["tls.crt"].as_str().unwrap())
        .unwrap();
    assert_eq!(String::from_utf8(stored).unwrap(), a.bundle_pem());
    assert!(secret["data"]["tls.key"].is_string());
    assert_eq!(
        secret["metadata"]["labels"]["app.kubernetes.io/name"],
        "trellis"
    );

    let c = open_ca_secret(client, CA_NAMESPACE, CA_SECRET, &td)
        .await
        .unwrap();
    assert_eq!(c.bundle_pem(), a.bundle_pem());
    let written: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| r.path.contains("/secrets") && r.method != "GET")
        .collect();
    let succeeded = written.iter().filter(|r| r.status < 300).count();
    assert_eq!(succeeded, 1, "one write of the CA: {written:?}");
    assert!(written.iter().all(|r| r.status < 300 || r.status == 409));
}

/// The secrets requests the fake received, as (method, status).
fn secret_requests(fake: &FakeKube) -> Vec<(String, u16)> {
    fake.requests()
        .into_iter()
        .filter(|r| r.path.contains("/secrets"))
        .map(|r| (r.method, r.status))
        .collect()
}

fn calls(list: &[(&str, u16)]) -> Vec<(String, u16)> {
    list.iter().map(|(m, s)| (m.to_string(), *s)).collect()
}

/// No API server can run here: the fake answers the recorded 404 for a
/// Secret that does not exist (the chart does not render it); the control
/// plane creates it (201), with the generated root, labels that tie it to
/// no Helm release nor Argo CD application, and type Opaque. A later start
/// only reads it. A Secret with a certificate and no key is an error naming
/// both, and is left alone.
#[tokio::test]
async fn a_missing_secret_is_created_and_a_half_one_is_refused() {
    let fake = FakeKube::start().await;
    let client = kubernetes::client(&fake.api()).unwrap();
    let ca = open_ca_secret(client.clone(), CA_NAMESPACE, CA_SECRET, &td())
        .await
        .unwrap();
    assert_eq!(
        secret_requests(&fake),
        calls(&[("GET", 404), ("POST", 201)])
    );
    let secret = fake.secret().unwrap();
    assert_eq!(secret["type"], "Opaque");
    assert_eq!(secret["metadata"]["name"], CA_SECRET);
    assert_eq!(secret["metadata"]["namespace"], CA_NAMESPACE);
    assert_eq!(
        secret["metadata"]["labels"],
        json!({"app.kubernetes.io/name": "trellis", "app.kubernetes.io/component": "ca",
               "app.kubernetes.io/managed-by": "trellis-control-plane"})
    );
    assert!(secret["metadata"]["annotations"].is_null(), "{secret}");
    let stored = base64::engine::general_purpose::STANDARD
        .decode(secret["data"]["tls.crt"].as_str().unwrap())
        .unwrap();
    assert_eq!(String::from_utf8(stored).unwrap(), ca.bundle_pem());
    assert!(secret["data"]["tls.key"].is_string());

    let again = open_ca_secret(client.clone(), CA_NAMESPACE, CA_SECRET, &td())
        .await
        .unwrap();
    assert_eq!(again.bundle_pem(), ca.bundle_pem());
    assert_eq!(
        secret_requests(&fake),
        calls(&[("GET", 404), ("POST", 201), ("GET", 200)])
    );

    let mut half = fake.secret().unwrap();
    half["data"].as_object_mut().unwrap().remove("tls.key");
    fake.set_secret(Some(half.clone()));
    let e = open_ca_secret(client, CA_NAMESPACE, CA_SECRET, &td())
        .await
        .unwrap_err();
    assert!(matches!(e, CaSecretError::Incomplete { .. }), "{e}");
    let message = e.to_string();
    assert!(message.contains("trellis-system/trellis-ca"), "{message}");
    assert!(message.contains("tls.key"), "{message}");
    assert_eq!(fake.secret().unwrap(), half, "left as it was");
}

/// No API server can run here: the fake answers the recorded 404 for the
/// Secret, then, as another replica that also found none creates it first,
/// a 409 AlreadyExists for this replica's create. The replica reads the
/// other's CA and uses it; the Secret stays as the other wrote it.
#[tokio::test]
async fn a_secret_another_replica_created_first_is_read_not_overwritten() {
    let fake = FakeKube::start().await;
    let (_, cert, key) = CertificateAuthority::generate(&td()).unwrap();
    let b64 = |pem: &str| base64::engine::general_purpose::STANDARD.encode(pem);
    fake.create_secret_first(json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": CA_SECRET, "namespace": CA_NAMESPACE},
        "type": "Opaque",
        "data": {"tls.crt": b64(&cert), "tls.key": b64(&key)}
    }));
    let client = kubernetes::client(&fake.api()).unwrap();
    let ca = open_ca_secret(client, CA_NAMESPACE, CA_SECRET, &td())
        .await
        .unwrap();
    assert_eq!(ca.bundle_pem(), cert, "the other replica's CA");
    assert_eq!(
        secret_requests(&fake),
        calls(&[("GET", 404), ("POST", 409), ("GET", 200)])
    );
    let kept = fake.secret().unwrap();
    assert_eq!(kept["data"]["tls.crt"], b64(&cert), "not overwritten");
    assert_eq!(kept["data"]["tls.key"], b64(&key), "not overwritten");
}

/// No API server can run here: the fake answers the recorded 404 for the
/// Secret and, as a Role without `create` on Secrets has it (the chart's
/// before it stopped rendering the Secret), the recorded 403 for creating
/// it. The error says the Secret is missing and
/// how to bring it back, not only that a creation was refused.
#[tokio::test]
async fn a_deleted_secret_the_control_plane_may_not_create_says_how_to_restore_it() {
    let fake = FakeKube::start().await;
    fake.forbid_secret_create();
    let client = kubernetes::client(&fake.api()).unwrap();
    let e = open_ca_secret(client, CA_NAMESPACE, CA_SECRET, &td())
        .await
        .unwrap_err();
    assert!(matches!(e, CaSecretError::Missing { .. }), "{e}");
    let message = e.to_string();
    for says in [
        "CA Secret trellis-system/trellis-ca does not exist",
        "may not create it",
        "grants no `create` on Secrets",
        "restore it from a backup",
        "every meshed pod",
    ] {
        assert!(message.contains(says), "{says:?} in {message}");
    }
    assert!(!message.contains("helm upgrade"), "{message}");
    assert!(fake.secret().is_none(), "nothing was written");
}
