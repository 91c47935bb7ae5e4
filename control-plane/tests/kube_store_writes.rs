//! Writes through the Kubernetes store against a stand-in API server: what
//! an operator applies through one control-plane replica is written as a
//! CRD object and reaches every replica by its watch.
//!
//! No Kubernetes API server can run on these machines. The stand-in
//! (`kube_api`) serves the recorded documents of `fixtures/k8s/store/`,
//! stores written objects and publishes them to every open watch, as the
//! API server does.

mod common;
mod kube_api;

use std::sync::Arc;

use common::eventually_async;
use kube_api::store::{API, connect, watched_by};
use kube_api::{RATE_LIMITS, recorded_cluster};
use serde_json::{Value, json};
use trellis_control_plane::store::kubernetes::KubernetesStore;
use trellis_control_plane::store::{AppliedPolicy, Generation, PolicyOutcome, Store, StoreError};
use trellis_proto::policy::v1::{Policy, RateLimit};

/// Applies one policy through `store` from a blocking thread, as the
/// Admin API does.
async fn apply_one(
    store: &Arc<KubernetesStore>,
    policy: Policy,
) -> Result<(Vec<AppliedPolicy>, Generation), StoreError> {
    let writer = store.clone();
    tokio::task::spawn_blocking(move || writer.apply_policies(&[policy], false))
        .await
        .unwrap()
}

fn policy(name: &str, ports: &[u32]) -> Policy {
    use trellis_proto::policy::v1::{Action, Destination, Rule, Selector, Source, source};
    Policy {
        name: name.into(),
        namespace: "shop".into(),
        revision: 0,
        selector: Some(Selector {
            spiffe_ids: vec![API.into()],
        }),
        action: Action::Allow.into(),
        rules: vec![Rule {
            from: vec![Source {
                r#match: Some(source::Match::Namespace("shop".into())),
            }],
            to: vec![Destination {
                ports: ports.to_vec(),
                ..Destination::default()
            }],
        }],
    }
}

/// No API server can run here: the fake stores written objects and
/// publishes them to every open watch, as the API server does. An apply
/// through one replica creates the CRD object, then replaces it on its
/// resourceVersion; a delete deletes it; the other replica follows each
/// write through its watch and ends with the same version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_write_goes_to_the_api_server_and_every_replica_follows() {
    let fake = recorded_cluster().await;
    let one = Arc::new(connect(&fake).await);
    let two = Arc::new(connect(&fake).await);
    watched_by(&fake, 2).await;

    let (applied, generation) = apply_one(&one, policy("from-shop", &[9090])).await.unwrap();
    assert_eq!(applied[0].outcome, PolicyOutcome::Created);
    assert_eq!(applied[0].revision, 1);
    assert_eq!(generation.snapshot, one.snapshot_version().unwrap());
    let post = fake.first("POST");
    assert_eq!(
        post.path,
        "/apis/trellis.io/v1alpha1/namespaces/shop/authorizationpolicies"
    );
    assert_eq!(post.body["kind"], "AuthorizationPolicy");
    assert_eq!(
        post.body["spec"]["rules"][0]["to"][0]["ports"],
        json!([9090])
    );
    eventually_async("the other replica to see the new policy", || async {
        two.policy("shop", "from-shop").unwrap()
    })
    .await;
    assert_eq!(
        two.snapshot_version().unwrap(),
        one.snapshot_version().unwrap()
    );

    let writer = one.clone();
    let (applied, _) = tokio::task::spawn_blocking(move || {
        let same = writer.apply_policies(&[policy("from-shop", &[9090])], false)?;
        assert_eq!(same.0[0].outcome, PolicyOutcome::Unchanged);
        writer.apply_policies(&[policy("from-shop", &[9091])], false)
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        (applied[0].outcome, applied[0].revision),
        (PolicyOutcome::Updated, 2)
    );
    let patch = fake.first("PATCH");
    assert_eq!(
        patch.path,
        "/apis/trellis.io/v1alpha1/namespaces/shop/authorizationpolicies/from-shop"
    );
    assert!(patch.body[0]["value"].is_string(), "{patch:?}");
    let writes: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| r.method != "GET")
        .map(|r| (r.method, r.status))
        .collect();
    assert_eq!(
        writes,
        [
            ("POST".into(), 201),
            ("PATCH".into(), 200),
            ("PATCH".into(), 200)
        ],
        "an unchanged policy is still written, on the resourceVersion held"
    );
    eventually_async("the other replica to see the update", || async {
        (two.policy("shop", "from-shop").unwrap()?.revision == 2).then_some(())
    })
    .await;

    // Changed by another writer whose event has not arrived: the replace on
    // the held resourceVersion is refused, and nothing changes here.
    fake.change_unseen("authorizationpolicies/shop/from-shop");
    let refused = apply_one(&one, policy("from-shop", &[9092]))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("replace AuthorizationPolicy shop/from-shop"),
        "{refused}"
    );
    assert!(refused.contains("409"), "{refused}");
    assert_eq!(
        one.policy("shop", "from-shop").unwrap().unwrap().rules[0].to[0].ports,
        [9091]
    );

    // With no transaction over several objects, a refusal after an earlier
    // document was written names what stays written.
    let writer = one.clone();
    let refused = tokio::task::spawn_blocking(move || {
        writer.apply_policies(
            &[policy("first-one", &[7070]), policy("from-shop", &[9092])],
            false,
        )
    })
    .await
    .unwrap()
    .unwrap_err()
    .to_string();
    assert!(
        refused.contains("replace AuthorizationPolicy shop/from-shop"),
        "{refused}"
    );
    assert!(
        refused.contains("written before it, and kept: AuthorizationPolicy shop/first-one"),
        "{refused}"
    );
    assert!(one.policy("shop", "first-one").unwrap().is_some());

    let writer = one.clone();
    let deleted = tokio::task::spawn_blocking(move || writer.delete_policy("shop", "from-shop"))
        .await
        .unwrap()
        .unwrap();
    assert!(deleted.is_some());
    eventually_async("the other replica to see the delete", || async {
        two.policy("shop", "from-shop")
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    assert_eq!(
        two.snapshot_version().unwrap(),
        one.snapshot_version().unwrap()
    );
}

fn rate_limit(name: &str, requests_per_second: f64) -> RateLimit {
    use trellis_proto::policy::v1::Selector;
    RateLimit {
        name: name.into(),
        namespace: "shop".into(),
        selector: Some(Selector {
            spiffe_ids: vec![API.into()],
        }),
        requests_per_second,
        burst: 20,
        key: "source".into(),
        matches: vec![],
    }
}

/// No API server can run here: the fake stores written objects and
/// publishes them to every open watch. A RateLimitPolicy applied through one
/// replica is created as an object of its own kind, reaches the other
/// replica's snapshots, changes nothing when applied unchanged, and leaves
/// both when deleted.
#[tokio::test]
async fn a_rate_limit_applied_through_one_replica_reaches_every_replica() {
    let fake = recorded_cluster().await;
    let one = Arc::new(connect(&fake).await);
    let two = Arc::new(connect(&fake).await);
    eventually_async("both stores to watch rate limits", || async {
        (fake.watching(RATE_LIMITS) == 2).then_some(())
    })
    .await;

    let writer = one.clone();
    let applied = tokio::task::spawn_blocking(move || {
        writer.apply_documents(&[], &[rate_limit("api-burst", 5.0)], false)
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(applied.rate_limits[0].outcome, PolicyOutcome::Created);
    let post = fake.first("POST");
    assert_eq!(
        post.path,
        "/apis/trellis.io/v1alpha1/namespaces/shop/ratelimitpolicies"
    );
    assert_eq!(post.body["kind"], "RateLimitPolicy");
    assert_eq!(post.body["spec"]["limit"]["requestsPerSecond"], json!(5.0));
    let held = |store: &KubernetesStore| {
        store
            .discovery_state()
            .unwrap()
            .rate_limits
            .iter()
            .any(|l| l.name == "api-burst")
    };
    eventually_async("the other replica to see the rate limit", || async {
        held(&two).then_some(())
    })
    .await;
    assert!(held(&one));
    assert_eq!(
        two.rate_limit("shop", "api-burst")
            .unwrap()
            .unwrap()
            .revision,
        1
    );
    assert_eq!(
        two.snapshot_version().unwrap(),
        one.snapshot_version().unwrap()
    );

    let writer = one.clone();
    let key = "ratelimitpolicies/shop/api-burst";
    let stored = fake.object(key).unwrap();
    let unchanged = tokio::task::spawn_blocking(move || {
        writer.apply_documents(&[], &[rate_limit("api-burst", 5.0)], false)
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(unchanged.rate_limits[0].outcome, PolicyOutcome::Unchanged);
    assert_eq!(
        fake.object(key).unwrap(),
        stored,
        "an unchanged rate limit changes nothing"
    );

    let writer = one.clone();
    let deleted =
        tokio::task::spawn_blocking(move || writer.delete_rate_limit("shop", "api-burst"))
            .await
            .unwrap()
            .unwrap();
    assert!(deleted.is_some());
    eventually_async("the other replica to see the delete", || async {
        (!held(&two)).then_some(())
    })
    .await;
    assert!(!held(&one));
}

/// No API server can run here: the stand-in stores the write and publishes
/// it at once, then holds its answer back while another client deletes the
/// policy, as kubectl could, so the writing replica's watch delivers the
/// creation and the deletion before the write returns. The answer, older
/// than the deletion, does not bring the policy back: it is in no snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_deleted_before_its_write_is_answered_stays_deleted() {
    let fake = recorded_cluster().await;
    let store = Arc::new(connect(&fake).await);
    watched_by(&fake, 1).await;

    let release = fake.hold_next_answer();
    let writer = store.clone();
    let apply = tokio::task::spawn_blocking(move || {
        writer.apply_policies(&[policy("from-shop", &[9090])], false)
    });
    eventually_async("the watch to deliver the creation", || async {
        store.policy("shop", "from-shop").unwrap()
    })
    .await;
    fake.delete("authorizationpolicies/shop/from-shop");
    eventually_async("the watch to deliver the deletion", || async {
        store
            .policy("shop", "from-shop")
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    release.send(()).unwrap();
    let (applied, _) = apply.await.unwrap().unwrap();
    assert_eq!(applied[0].outcome, PolicyOutcome::Created);

    assert_eq!(
        store.policy("shop", "from-shop").unwrap(),
        None,
        "the write's answer brought back a policy deleted after it"
    );
    assert!(
        !store
            .discovery_state()
            .unwrap()
            .policies
            .iter()
            .any(|p| p.name == "from-shop")
    );
}

/// What Helm puts on an object it manages, as `helm upgrade` checks it.
fn helm_metadata() -> Value {
    json!({
        "labels": {"app.kubernetes.io/managed-by": "Helm", "team": "shop"},
        "annotations": {
            "meta.helm.sh/release-name": "shop",
            "meta.helm.sh/release-namespace": "shop",
        },
        "ownerReferences": [{
            "apiVersion": "argoproj.io/v1alpha1",
            "kind": "Application",
            "name": "shop",
            "uid": "5a0c7c2e-8f0e-4a4e-9a51-3f1c1d2b7e10",
        }],
        "finalizers": ["resources-finalizer.argocd.argoproj.io"],
    })
}

/// The object Helm would create for `policy(name, ports)`.
fn helm_object(name: &str, ports: &[u32]) -> Value {
    let mut metadata = helm_metadata();
    metadata["name"] = json!(name);
    metadata["namespace"] = json!("shop");
    json!({
        "apiVersion": "trellis.io/v1alpha1",
        "kind": "AuthorizationPolicy",
        "metadata": metadata,
        "spec": {
            "selector": {"spiffeIds": [API]},
            "action": "ALLOW",
            "rules": [{"from": [{"namespace": "shop"}], "to": [{"ports": ports}]}],
        },
    })
}

/// No API server can run here: the stand-in holds a policy object as Helm
/// and Argo CD left it (labels, annotations, an owner reference, a
/// finalizer) and applies JSON Patches as the API server does. An apply
/// through the store changes the object's `spec` and nothing else: the
/// request patches only `/spec` (setting the resourceVersion held, as the
/// precondition), and the object keeps its metadata, so the next `helm
/// upgrade` still finds it its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apply_changes_the_spec_and_keeps_what_other_tools_set() {
    let fake = recorded_cluster().await;
    let store = Arc::new(connect(&fake).await);
    watched_by(&fake, 1).await;
    let created = fake.create(helm_object("from-shop", &[9090]));
    eventually_async("the store to see Helm's object", || async {
        store.policy("shop", "from-shop").unwrap()
    })
    .await;

    let (applied, _) = apply_one(&store, policy("from-shop", &[9091]))
        .await
        .unwrap();
    assert_eq!(
        (applied[0].outcome, applied[0].revision),
        (PolicyOutcome::Updated, 2)
    );

    let stored = fake.object("authorizationpolicies/shop/from-shop").unwrap();
    for field in ["labels", "annotations", "ownerReferences", "finalizers"] {
        assert_eq!(
            stored["metadata"][field],
            helm_metadata()[field],
            "{field} erased: {stored}"
        );
    }
    assert_eq!(stored["spec"]["rules"][0]["to"][0]["ports"], json!([9091]));
    let patch = fake.first("PATCH");
    let paths: Vec<_> = patch
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|op| op["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["/metadata/resourceVersion", "/spec"]);
    assert_eq!(
        patch.body[0]["value"],
        created["metadata"]["resourceVersion"]
    );
}

/// No API server can run here: the stand-in stores another replica's
/// change of a policy without publishing it, as when this replica's watch
/// lags. Applying the content this replica's cache still holds (a revert
/// of that change) is not answered "unchanged" from the cache: it is
/// written on the resourceVersion held, the stand-in refuses it with a
/// 409 as the API server would, and the error names the object to apply
/// again. The other replica's content is not taken for reverted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revert_through_a_lagging_replica_is_a_conflict_not_unchanged() {
    let fake = recorded_cluster().await;
    let store = Arc::new(connect(&fake).await);
    watched_by(&fake, 1).await;
    apply_one(&store, policy("from-shop", &[9090]))
        .await
        .unwrap();
    let key = "authorizationpolicies/shop/from-shop";
    fake.change_spec_unseen(key, |spec| {
        spec["rules"][0]["to"][0]["ports"] = json!([9091]);
    });

    let refused = apply_one(&store, policy("from-shop", &[9090]))
        .await
        .map(|(applied, _)| applied[0].outcome)
        .expect_err("answered from a cache that lags")
        .to_string();
    assert!(
        refused.contains("replace AuthorizationPolicy shop/from-shop"),
        "{refused}"
    );
    assert!(refused.contains("409"), "{refused}");
    assert_eq!(
        fake.object(key).unwrap()["spec"]["rules"][0]["to"][0]["ports"],
        json!([9091])
    );
}

/// No API server can run here: the stand-in stores objects another replica
/// created without publishing them, as when this replica's watch lags, and
/// answers a create of an existing name with 409 AlreadyExists and a GET
/// with the object, as the API server does. A create that meets a valid
/// object this replica has not seen is a conflict naming it, and the other
/// writer's object stays: two operators creating one policy through two
/// replicas are not both told "created". One that meets an object that
/// fails validation (held as absent) replaces its `spec`, and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_that_meets_an_unseen_valid_object_is_a_conflict() {
    let fake = recorded_cluster().await;
    let store = Arc::new(connect(&fake).await);
    watched_by(&fake, 1).await;
    let theirs = fake.create_unseen(helm_object("from-shop", &[9091]));

    let refused = apply_one(&store, policy("from-shop", &[9090]))
        .await
        .map(|(applied, _)| applied[0].outcome)
        .expect_err("another writer's object overwritten")
        .to_string();
    assert!(
        refused.contains("create AuthorizationPolicy shop/from-shop"),
        "{refused}"
    );
    assert!(refused.contains("409"), "{refused}");
    assert_eq!(
        fake.object("authorizationpolicies/shop/from-shop").unwrap(),
        theirs
    );

    let mut invalid = helm_object("misspelt", &[9091]);
    invalid["spec"]["rules"][0]["to"] = json!([{"port": 9091}]);
    fake.create(invalid);
    let (applied, _) = apply_one(&store, policy("misspelt", &[9090]))
        .await
        .unwrap();
    assert_eq!(applied[0].outcome, PolicyOutcome::Created);
    let fixed = fake.object("authorizationpolicies/shop/misspelt").unwrap();
    assert_eq!(fixed["spec"]["rules"][0]["to"][0]["ports"], json!([9090]));
    assert_eq!(fixed["metadata"]["labels"], helm_metadata()["labels"]);
    eventually_async("the fixed policy to be held", || async {
        store.policy("shop", "misspelt").unwrap()
    })
    .await;
}
