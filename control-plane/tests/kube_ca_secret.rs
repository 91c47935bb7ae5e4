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
use trellis_control_plane::ca::secret::{CaSecretError, open_ca_secret};
use trellis_control_plane::store::kubernetes;
use trellis_core::TrustDomain;

fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").unwrap()
}

/// No API server can run here: the fake keeps the Secret as the API server
/// would, starting from the empty Secret the chart creates. Two replicas
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

/// No API server can run here: the fake answers the recorded 404 for a
/// Secret that does not exist; the store creates it. A Secret with a
/// certificate and no key is an error naming both, and is left alone.
#[tokio::test]
async fn a_missing_secret_is_created_and_a_half_one_is_refused() {
    let fake = FakeKube::start().await;
    let client = kubernetes::client(&fake.api()).unwrap();
    let ca = open_ca_secret(client.clone(), CA_NAMESPACE, CA_SECRET, &td())
        .await
        .unwrap();
    assert!(
        fake.requests()
            .iter()
            .any(|r| r.method == "POST" && r.status == 201)
    );
    assert_eq!(fake.secret().unwrap()["type"], "Opaque");

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
    drop(ca);
}

/// No API server can run here: the fake answers the recorded 404 for the
/// Secret and, as the chart's RBAC has it (no `create` of Secrets), the
/// recorded 403 for creating it. The error says the Secret is missing and
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
        "helm upgrade",
        "every meshed pod",
    ] {
        assert!(message.contains(says), "{says:?} in {message}");
    }
    assert!(fake.secret().is_none(), "nothing was written");
}
