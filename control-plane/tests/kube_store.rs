//! The Kubernetes store against recorded API server responses.
//!
//! No Kubernetes API server can run on these machines. Every test here
//! stands one in with a local HTTPS server (`kube_api`) that answers
//! kube-rs's list and watch requests with recorded documents from
//! `fixtures/k8s/store/` (lists with their resourceVersion, watch events,
//! bookmarks, a `410 Gone`, `v1` Status refusals) and keeps the CA Secret
//! and written policy objects as the API server would.

mod common;
mod kube_api;

use std::sync::Arc;
use std::time::Duration;

use common::eventually_async;
use kube_api::{
    FakeKube, PODS, POLICIES, RATE_LIMITS, event, fixture, fixture_json, item, pods_list,
    policies_list, rate_limits_list, recorded_cluster,
};
use serde_json::json;
use trellis_control_plane::discovery::Discovery;
use trellis_control_plane::store::kubernetes::{self, KubernetesStore};
use trellis_control_plane::store::{DiscoveryState, PolicyOutcome, Store};
use trellis_core::{SpiffeId, TrustDomain};
use trellis_proto::discovery::v1::MeshConfig;
use trellis_proto::policy::v1::{Policy, RateLimit};

const API: &str = "spiffe://cluster.local/ns/shop/sa/api";
const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").unwrap()
}

async fn connect(fake: &FakeKube) -> KubernetesStore {
    let client = kubernetes::client(&fake.api()).unwrap();
    KubernetesStore::connect(client, td(), Duration::from_secs(20))
        .await
        .unwrap()
}

/// Waits until `n` watches of each kind are open, so published events
/// reach every store.
async fn watched_by(fake: &FakeKube, n: usize) {
    eventually_async("the stores to watch", || async {
        (fake.watching(POLICIES) == n && fake.watching(PODS) == n).then_some(())
    })
    .await;
}

fn keys(state: &DiscoveryState) -> Vec<String> {
    state
        .policies
        .iter()
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .collect()
}

fn addresses(state: &DiscoveryState) -> Vec<String> {
    let mut out: Vec<_> = state
        .workloads
        .iter()
        .flat_map(|w| w.addresses.clone())
        .collect();
    out.sort();
    out
}

fn mesh() -> MeshConfig {
    MeshConfig {
        default_policy: "deny".into(),
        outbound_policy: "deny".into(),
        ..MeshConfig::default()
    }
}

/// No API server can run here: the fake answers the recorded lists. Valid
/// CRD objects become policies (revision = metadata.generation) in the
/// snapshots of the workloads they select; the object with a misspelt
/// field is skipped and in no snapshot; injected running Pods are endpoints.
#[tokio::test]
async fn policies_from_crd_objects_reach_the_snapshots_and_invalid_ones_never_do() {
    let fake = recorded_cluster().await;
    let store = Arc::new(connect(&fake).await);
    let state = store.discovery_state().unwrap();
    assert_eq!(keys(&state), ["shop/deny-legacy", "shop/web-to-api"]);
    let web_to_api = store.policy("shop", "web-to-api").unwrap().unwrap();
    assert_eq!(web_to_api.revision, 2, "the object's metadata.generation");
    assert_eq!(store.policy("shop", "misspelt-port").unwrap(), None);
    assert_eq!(addresses(&state), ["10.244.1.17:15006", "10.244.2.9:15006"]);

    let discovery = Discovery::new(store.clone(), Vec::new(), mesh()).unwrap();
    let snapshot = discovery.snapshot_for(&SpiffeId::parse(API).unwrap());
    let names: Vec<_> = snapshot.policies.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["deny-legacy", "web-to-api"]);
    let endpoints: Vec<_> = snapshot
        .endpoints
        .iter()
        .map(|e| (e.address.as_str(), e.spiffe_id.as_str()))
        .collect();
    assert_eq!(
        endpoints,
        [("10.244.1.17:15006", WEB), ("10.244.2.9:15006", API)]
    );
    assert_eq!(snapshot.version, store.snapshot_version().unwrap());
    let db = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/db").unwrap();
    let names: Vec<_> = discovery
        .snapshot_for(&db)
        .policies
        .iter()
        .map(|p| p.name.clone())
        .collect();
    assert_eq!(
        names,
        ["deny-legacy"],
        "the invalid policy for db is never pushed"
    );
}

/// No API server can run here: the fake streams recorded watch events. A
/// DELETED event removes the policy and announces a new version; an update
/// that fails validation drops the policy (never pushed), a fix brings it back.
#[tokio::test]
async fn watch_events_update_policies_and_invalid_updates_are_never_pushed() {
    let fake = recorded_cluster().await;
    let store = connect(&fake).await;
    watched_by(&fake, 1).await;
    let mut changes = store.changes();
    let first = store.snapshot_version().unwrap();

    let list = policies_list();
    let mut broken = item(&list, "web-to-api", 48400);
    broken["spec"]["rules"][0]["to"] = json!([{"port": 8080}]);
    fake.publish(POLICIES, event("MODIFIED", &broken));
    eventually_async("the invalid update to drop the policy", || async {
        store
            .policy("shop", "web-to-api")
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    assert!(changes.has_changed().unwrap());
    let broken_version = *changes.borrow_and_update();
    assert_eq!(broken_version, store.snapshot_version().unwrap());
    assert_ne!(broken_version, first);

    let mut fixed = item(&list, "web-to-api", 48401);
    fixed["metadata"]["generation"] = json!(4);
    fake.publish(POLICIES, event("MODIFIED", &fixed));
    let back = eventually_async("the fixed policy", || async {
        store.policy("shop", "web-to-api").unwrap()
    })
    .await;
    assert_eq!(back.revision, 4);
    assert!(changes.has_changed().unwrap(), "the fix is announced");
    assert_ne!(store.snapshot_version().unwrap(), broken_version);

    fake.publish(
        POLICIES,
        event("DELETED", &item(&list, "deny-legacy", 48402)),
    );
    eventually_async("the DELETED event to remove the policy", || async {
        store
            .policy("shop", "deny-legacy")
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    assert_eq!(keys(&store.discovery_state().unwrap()), ["shop/web-to-api"]);
    assert_ne!(store.snapshot_version().unwrap(), first);
}

/// No API server can run here: the fake answers the recorded
/// RateLimitPolicy list and streams an event. Valid objects are held with
/// their generation as revision and move the policy generation; the one
/// selecting no workload is skipped.
#[tokio::test]
async fn rate_limit_objects_are_reflected_and_invalid_ones_skipped() {
    let fake = recorded_cluster().await;
    let store = connect(&fake).await;
    let held = store.rate_limits().unwrap();
    assert_eq!(held.len(), 1, "{held:?}");
    let (limit, revision) = (held[0].rate_limit.as_ref().unwrap(), held[0].revision);
    assert_eq!(
        (limit.namespace.as_str(), limit.name.as_str()),
        ("shop", "api-search")
    );
    assert_eq!(
        (limit.requests_per_second, limit.burst, revision),
        (50.0, 100, 3)
    );
    assert_eq!(limit.matches[0].paths, ["/search/*"]);

    let generation = store.generation().unwrap();
    eventually_async("the store to watch rate limits", || async {
        (fake.watching(RATE_LIMITS) == 1).then_some(())
    })
    .await;
    let mut fixed = item(&rate_limits_list(), "no-selector", 48800);
    fixed["spec"]["selector"] = json!({"spiffeIds": ["spiffe://cluster.local/ns/shop/*"]});
    fake.publish(RATE_LIMITS, event("MODIFIED", &fixed));
    eventually_async("the fixed rate limit", || async {
        (store.rate_limits().unwrap().len() == 2).then_some(())
    })
    .await;
    assert_ne!(store.generation().unwrap().policies, generation.policies);
}

/// No API server can run here: the fake streams recorded Pod events. A Pod
/// becomes an endpoint once Running with an IP, and leaves when it is deleted.
#[tokio::test]
async fn pods_become_endpoints_and_leave() {
    let fake = recorded_cluster().await;
    let store = connect(&fake).await;
    watched_by(&fake, 1).await;
    let list = pods_list();
    let mut pending = item(&list, "web-7d4b9c8f6d-x2x8q", 48500);
    pending["metadata"]["name"] = json!("web-7d4b9c8f6d-n4k2z");
    pending["status"] = json!({"phase": "Pending", "hostIP": "172.18.0.3"});
    fake.publish(PODS, event("ADDED", &pending));
    let mut running = pending.clone();
    running["metadata"]["resourceVersion"] = json!("48510");
    running["status"] = json!({"phase": "Running", "podIP": "10.244.1.30",
                               "podIPs": [{"ip": "10.244.1.30"}]});
    fake.publish(PODS, event("MODIFIED", &running));
    eventually_async("the running pod to be an endpoint", || async {
        let state = store.discovery_state().unwrap();
        (addresses(&state) == ["10.244.1.17:15006", "10.244.1.30:15006", "10.244.2.9:15006"])
            .then_some(())
    })
    .await;

    fake.publish(
        PODS,
        event("DELETED", &item(&list, "api-5f6d8b7c4-q9v7m", 48520)),
    );
    eventually_async("the deleted pod to leave", || async {
        let state = store.discovery_state().unwrap();
        (addresses(&state) == ["10.244.1.17:15006", "10.244.1.30:15006"]).then_some(())
    })
    .await;
    assert!(
        store
            .workloads()
            .unwrap()
            .iter()
            .all(|w| !w.spiffe_id.contains("coredns")),
        "pods without a sidecar are no endpoints"
    );
}

/// No API server can run here: two stores (two replicas) watch the same
/// fake and get the same recorded events; a third starts later from a list
/// of the final state. All three hold the same snapshot version and serve
/// identical snapshots.
#[tokio::test]
async fn replicas_fed_the_same_events_serve_identical_snapshots() {
    let fake = recorded_cluster().await;
    let one = Arc::new(connect(&fake).await);
    let two = Arc::new(connect(&fake).await);
    watched_by(&fake, 2).await;
    let policies = policies_list();
    let pods = pods_list();
    let mut widened = item(&policies, "web-to-api", 48600);
    widened["spec"]["rules"][0]["to"][0]["ports"] = json!([8080, 8443]);
    widened["metadata"]["generation"] = json!(3);
    let gone_pod = item(&pods, "web-7d4b9c8f6d-x2x8q", 48601);
    fake.publish(POLICIES, event("MODIFIED", &widened));
    fake.publish(POLICIES, fixture("store/bookmark.json").trim().to_owned());
    fake.publish(PODS, event("DELETED", &gone_pod));
    eventually_async("both replicas to see the events", || async {
        let (a, b) = (
            one.discovery_state().unwrap(),
            two.discovery_state().unwrap(),
        );
        let seen = addresses(&a) == ["10.244.2.9:15006"]
            && a.policies.iter().any(|p| p.revision == 3)
            && addresses(&b) == addresses(&a)
            && b.policies == a.policies;
        seen.then_some(())
    })
    .await;
    assert_eq!(
        one.snapshot_version().unwrap(),
        two.snapshot_version().unwrap()
    );

    let mut final_policies = policies.clone();
    for item in final_policies["items"].as_array_mut().unwrap() {
        if item["metadata"]["name"] == "web-to-api" {
            *item = widened.clone();
        }
    }
    let mut final_pods = pods.clone();
    final_pods["items"]
        .as_array_mut()
        .unwrap()
        .retain(|p| p["metadata"]["name"] != "web-7d4b9c8f6d-x2x8q");
    fake.lists(POLICIES, vec![(200, final_policies)]);
    fake.lists(PODS, vec![(200, final_pods)]);
    let late = Arc::new(connect(&fake).await);
    assert_eq!(
        late.snapshot_version().unwrap(),
        one.snapshot_version().unwrap()
    );

    let api = SpiffeId::parse(API).unwrap();
    let snapshots: Vec<_> = [one, two, late]
        .into_iter()
        .map(|store| {
            let store: Arc<dyn Store> = store;
            Discovery::new(store, Vec::new(), mesh())
                .unwrap()
                .snapshot_for(&api)
        })
        .collect();
    assert_eq!(snapshots[0], snapshots[1]);
    assert_eq!(snapshots[0], snapshots[2]);
    assert_eq!(snapshots[0].policies.len(), 2);
}

/// No API server can run here: the fake's watch sends a bookmark, then the
/// `410 Gone` an API server sends for an expired resourceVersion; the store
/// lists again, and an object deleted meanwhile is gone.
#[tokio::test]
async fn an_expired_watch_lists_again_and_drops_what_was_deleted_meanwhile() {
    let fake = FakeKube::start().await;
    let mut later = policies_list();
    later["metadata"]["resourceVersion"] = json!("48590");
    later["items"]
        .as_array_mut()
        .unwrap()
        .retain(|p| p["metadata"]["name"] != "deny-legacy");
    fake.lists(POLICIES, vec![(200, policies_list()), (200, later)]);
    fake.lists(RATE_LIMITS, vec![(200, rate_limits_list())]);
    fake.lists(PODS, vec![(200, pods_list())]);
    fake.script_watch(
        POLICIES,
        vec![
            fixture("store/bookmark.json").trim().to_owned(),
            fixture("store/gone-410.json").trim().to_owned(),
        ],
    );
    let store = connect(&fake).await;
    eventually_async("the re-list to drop deny-legacy", || async {
        (keys(&store.discovery_state().unwrap()) == ["shop/web-to-api"]).then_some(())
    })
    .await;
    let lists = fake
        .requests()
        .iter()
        .filter(|r| r.path == POLICIES && !r.query.contains("watch=true"))
        .count();
    assert_eq!(lists, 2, "one list at start, one after the 410");
}

/// No API server can run here: the fake's lists answer with the recorded
/// `403 Forbidden` Status of missing RBAC. Start-up fails with the API
/// server's message, naming the kind.
#[tokio::test]
async fn an_api_server_refusal_is_a_clear_error() {
    let fake = FakeKube::start().await;
    let forbidden = fixture_json("store/forbidden-list-403.json");
    fake.lists(POLICIES, vec![(403, forbidden)]);
    fake.lists(RATE_LIMITS, vec![(200, rate_limits_list())]);
    fake.lists(PODS, vec![(200, pods_list())]);
    let client = kubernetes::client(&fake.api()).unwrap();
    let e = KubernetesStore::connect(client, td(), Duration::from_secs(20))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("AuthorizationPolicy"), "{e}");
    assert!(
        e.contains("cannot list resource \"authorizationpolicies\""),
        "{e}"
    );
    assert!(e.contains("403"), "{e}");
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

    let writer = one.clone();
    let (applied, generation) = tokio::task::spawn_blocking(move || {
        writer.apply_policies(&[policy("from-shop", &[9090])], false)
    })
    .await
    .unwrap()
    .unwrap();
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
    let put = fake.first("PUT");
    assert!(
        put.body["metadata"]["resourceVersion"].is_string(),
        "{put:?}"
    );
    assert_eq!(
        fake.requests().iter().filter(|r| r.method != "GET").count(),
        2,
        "an unchanged policy writes nothing"
    );
    eventually_async("the other replica to see the update", || async {
        (two.policy("shop", "from-shop").unwrap()?.revision == 2).then_some(())
    })
    .await;

    // Changed by another writer whose event has not arrived: the replace on
    // the held resourceVersion is refused, and nothing changes here.
    fake.change_unseen("authorizationpolicies/shop/from-shop");
    let writer = one.clone();
    let refused = tokio::task::spawn_blocking(move || {
        writer.apply_policies(&[policy("from-shop", &[9092])], false)
    })
    .await
    .unwrap()
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
/// replica's snapshots, writes nothing when applied unchanged, and leaves
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
    let writes_before = fake.requests().iter().filter(|r| r.method != "GET").count();
    let unchanged = tokio::task::spawn_blocking(move || {
        writer.apply_documents(&[], &[rate_limit("api-burst", 5.0)], false)
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(unchanged.rate_limits[0].outcome, PolicyOutcome::Unchanged);
    assert_eq!(
        fake.requests().iter().filter(|r| r.method != "GET").count(),
        writes_before,
        "an unchanged rate limit writes nothing"
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
