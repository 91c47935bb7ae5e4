//! The mesh CA in a Kubernetes Secret, against recorded API server answers.
//!
//! No Kubernetes API server can run on these machines. Every test here
//! stands one in with a local HTTPS server (`kube_api`) that keeps the
//! Secret as the API server does (recorded `404 NotFound`, `409 Conflict`
//! and `409 AlreadyExists` answers) and records every request.

mod common;
mod kube_api;

use base64::Engine as _;
use kube_api::{CA_NAMESPACE, CA_SECRET, FakeKube, PODS, fixture_json, pods_list};
use serde_json::json;
use trellis_control_plane::ca::CertificateAuthority;
use trellis_control_plane::ca::secret::{CaSecretError, NewRoot, open_ca_secret};
use trellis_control_plane::store::kubernetes;
use trellis_core::TrustDomain;

const FIRST: NewRoot = NewRoot::FirstInstall;

fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").unwrap()
}

/// A fake API server whose cluster runs `pods` (a recorded PodList's
/// items), in one page.
async fn cluster_running(pods: &[&str]) -> FakeKube {
    let fake = FakeKube::start().await;
    let mut list = pods_list();
    list["items"]
        .as_array_mut()
        .unwrap()
        .retain(|p| pods.contains(&p["metadata"]["name"].as_str().unwrap()));
    assert_eq!(list["items"].as_array().unwrap().len(), pods.len());
    fake.lists(PODS, vec![(200, list)]);
    fake
}

/// The pods of the recorded cluster without a sidecar.
const UNMESHED: &[&str] = &["coredns-668d6bf9bc-7xk2p"];

/// No API server can run here: the fake keeps the Secret as the API server
/// would, starting from the empty Secret an earlier chart created. Two replicas
/// starting together write the generated root once (the loser's update is a
/// 409 Conflict and it reads the winner's); a later start only reads it.
#[tokio::test]
async fn the_ca_is_generated_once_and_then_read_from_the_secret() {
    let fake = cluster_running(UNMESHED).await;
    fake.set_secret(Some(fixture_json("store/secret-empty.json")));
    let client = kubernetes::client(&fake.api()).unwrap();
    let td = td();
    let (a, b) = tokio::join!(
        open_ca_secret(client.clone(), CA_NAMESPACE, CA_SECRET, &td, FIRST),
        open_ca_secret(client.clone(), CA_NAMESPACE, CA_SECRET, &td, FIRST),
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

    let c = open_ca_secret(client, CA_NAMESPACE, CA_SECRET, &td, FIRST)
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
/// Secret that does not exist (the chart does not render it), and a list
/// of unfinished pods none of which carries a sidecar: a first install. The
/// control plane creates it (201), with the generated root, labels that tie it to
/// no Helm release nor Argo CD application, and type Opaque. A later start
/// only reads it. A Secret with a certificate and no key is an error naming
/// both, and is left alone.
#[tokio::test]
async fn a_missing_secret_is_created_and_a_half_one_is_refused() {
    let fake = cluster_running(UNMESHED).await;
    let client = kubernetes::client(&fake.api()).unwrap();
    let ca = open_ca_secret(client.clone(), CA_NAMESPACE, CA_SECRET, &td(), FIRST)
        .await
        .unwrap();
    assert_eq!(
        secret_requests(&fake),
        calls(&[("GET", 404), ("POST", 201)])
    );
    let listed = fake
        .requests()
        .into_iter()
        .find(|r| r.path == PODS)
        .expect("the pods were listed");
    assert!(listed.query.contains("limit=500"), "{}", listed.query);
    let selector = "fieldSelector=status.phase%21%3DSucceeded%2Cstatus.phase%21%3DFailed";
    assert!(listed.query.contains(selector), "{}", listed.query);
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

    let again = open_ca_secret(client.clone(), CA_NAMESPACE, CA_SECRET, &td(), FIRST)
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
    let e = open_ca_secret(client, CA_NAMESPACE, CA_SECRET, &td(), FIRST)
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
    let fake = cluster_running(UNMESHED).await;
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
    let ca = open_ca_secret(client, CA_NAMESPACE, CA_SECRET, &td(), FIRST)
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
    let fake = cluster_running(UNMESHED).await;
    fake.forbid_secret_create();
    let client = kubernetes::client(&fake.api()).unwrap();
    let e = open_ca_secret(client, CA_NAMESPACE, CA_SECRET, &td(), FIRST)
        .await
        .unwrap_err();
    assert!(matches!(e, CaSecretError::Missing { .. }), "{e}");
    let message = e.to_string();
    for says in [
        "CA Secret trellis-system/trellis-ca does not exist",
        "may not create it",
        "grants no `create` on Secrets",
        "`rbac.createCASecret` is false",
        "restore it from a backup",
        "every meshed pod",
    ] {
        assert!(message.contains(says), "{says:?} in {message}");
    }
    assert!(!message.contains("helm upgrade"), "{message}");
    assert!(fake.secret().is_none(), "nothing was written");
}

/// The requests the fake received that write anything.
fn writes(fake: &FakeKube) -> Vec<(String, String)> {
    fake.requests()
        .into_iter()
        .filter(|r| r.method != "GET")
        .map(|r| (r.method, r.path))
        .collect()
}

/// No API server can run here: the fake answers the recorded 404 for the
/// Secret (deleted by mistake, by a GitOps prune) while the recorded
/// cluster's pods carry sidecars: a first page without one and a
/// continue token, then a page with the injector's annotation on
/// `shop/web`. A new root would split the mesh: the replica refuses,
/// creates nothing, and says which Secret, which pod, and the two ways
/// out. An emptied Secret is refused the same way, and left as it is.
#[tokio::test]
async fn a_lost_secret_is_not_replaced_while_pods_carry_sidecars() {
    let fake = FakeKube::start().await;
    let mut first = pods_list();
    first["items"]
        .as_array_mut()
        .unwrap()
        .retain(|p| p["metadata"]["namespace"] == "kube-system");
    first["metadata"]["continue"] = json!("eyJ2IjoibWV0YS5rOHMuaW8vdjEiLCJydiI6NDgyMTd9");
    let mut second = pods_list();
    second["items"]
        .as_array_mut()
        .unwrap()
        .retain(|p| p["metadata"]["namespace"] == "shop");
    fake.lists(PODS, vec![(200, first), (200, second)]);
    let client = kubernetes::client(&fake.api()).unwrap();
    let e = open_ca_secret(client.clone(), CA_NAMESPACE, CA_SECRET, &td(), FIRST)
        .await
        .unwrap_err();
    assert!(matches!(e, CaSecretError::MeshExists { .. }), "{e}");
    let message = e.to_string();
    for says in [
        "CA Secret trellis-system/trellis-ca does not exist, but the mesh whose root it held \
         exists: pod shop/web-7d4b9c8f6d-x2x8q carries a Trellis sidecar (annotation \
         trellis.io/injected)",
        "refusing to generate a new one",
        "Restore the Secret from its backup (`kubectl create -f` the saved manifest",
        "start the control plane with --ca-secret-new-root (TRELLIS_CA_SECRET_NEW_ROOT=true)",
        "then every meshed pod",
    ] {
        assert!(message.contains(says), "{says:?} in {message}");
    }
    assert_eq!(writes(&fake), [], "nothing was created");
    assert!(fake.secret().is_none());
    let pages: Vec<String> = fake
        .requests()
        .into_iter()
        .filter(|r| r.path == PODS)
        .map(|r| r.query)
        .collect();
    assert_eq!(pages.len(), 2, "{pages:?}");
    assert!(
        pages[1].contains("continue=eyJ2IjoibWV0YS5rOHMuaW8vdjEiLCJydiI6NDgyMTd9"),
        "{pages:?}"
    );

    let empty = fixture_json("store/secret-empty.json");
    fake.set_secret(Some(empty.clone()));
    let e = open_ca_secret(client, CA_NAMESPACE, CA_SECRET, &td(), FIRST)
        .await
        .unwrap_err();
    let message = e.to_string();
    assert!(
        message.contains("CA Secret trellis-system/trellis-ca holds no CA, but the mesh"),
        "{message}"
    );
    assert!(
        message.contains("pod shop/web-7d4b9c8f6d-x2x8q"),
        "{message}"
    );
    assert_eq!(writes(&fake), [], "nothing was written");
    assert_eq!(fake.secret().unwrap(), empty, "left as it was");
}

/// No API server can run here: the fake answers the recorded 404 for the
/// Secret and, for the list of pods, the recorded 403 of a Role without
/// `list` on pods. Not knowing whether a mesh runs is no first install:
/// the replica refuses, creates nothing, and says what it could not check.
#[tokio::test]
async fn a_refused_check_for_meshed_pods_generates_nothing() {
    let fake = FakeKube::start().await;
    let forbidden = fixture_json("store/pods-list-forbidden-403.json");
    fake.lists(PODS, vec![(403, forbidden)]);
    let client = kubernetes::client(&fake.api()).unwrap();
    let e = open_ca_secret(client, CA_NAMESPACE, CA_SECRET, &td(), FIRST)
        .await
        .unwrap_err();
    assert!(matches!(e, CaSecretError::Unchecked { .. }), "{e}");
    let message = e.to_string();
    for says in [
        "CA Secret trellis-system/trellis-ca does not exist, and whether pods already carry \
         Trellis sidecars could not be checked (listing pods: pods is forbidden",
        "(403 Forbidden)",
        "refusing to generate a new root",
        "Restore the Secret from its backup",
        "--ca-secret-new-root",
    ] {
        assert!(message.contains(says), "{says:?} in {message}");
    }
    assert_eq!(writes(&fake), [], "nothing was created");
    assert!(fake.secret().is_none());
}

/// No API server can run here: the fake answers the recorded 404 for the
/// Secret while the recorded cluster's pods carry sidecars. With
/// `--ca-secret-new-root` the operator starts a new root on purpose: it is
/// created, and a warning says the running sidecars trust the old root and
/// every meshed pod must restart. A later start with the flag loads the
/// Secret and warns that the flag should go.
#[tokio::test]
async fn a_new_root_on_purpose_is_created_with_a_warning() {
    let (logs, _guard) = common::logs::capture();
    let fake = FakeKube::start().await;
    fake.lists(PODS, vec![(200, pods_list())]);
    let client = kubernetes::client(&fake.api()).unwrap();
    let new_root = NewRoot::Deliberate;
    let ca = open_ca_secret(client.clone(), CA_NAMESPACE, CA_SECRET, &td(), new_root)
        .await
        .unwrap();
    assert_eq!(
        secret_requests(&fake),
        calls(&[("GET", 404), ("POST", 201)])
    );
    let stored = fake.secret().unwrap()["data"]["tls.crt"].clone();
    let stored = base64::engine::general_purpose::STANDARD
        .decode(stored.as_str().unwrap())
        .unwrap();
    assert_eq!(String::from_utf8(stored).unwrap(), ca.bundle_pem());
    let text = logs.text();
    let warned: Vec<&str> = text.lines().filter(|l| l.contains(" WARN ")).collect();
    assert_eq!(warned.len(), 1, "{text}");
    for says in [
        "generated a new root CA on --ca-secret-new-root",
        "sidecars started before trust the old root only",
        "restart every control-plane replica and every meshed pod, and remove the flag",
        "secret=trellis-system/trellis-ca",
    ] {
        assert!(warned[0].contains(says), "{says:?} in {}", warned[0]);
    }
    assert!(!text.contains("PRIVATE KEY"), "{text}");

    let again = open_ca_secret(client, CA_NAMESPACE, CA_SECRET, &td(), new_root)
        .await
        .unwrap();
    assert_eq!(again.bundle_pem(), ca.bundle_pem());
    let text = logs.text();
    assert!(
        text.contains("--ca-secret-new-root has no effect: the Secret holds a CA; remove the flag"),
        "{text}"
    );
}
