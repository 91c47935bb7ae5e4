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
use kube_api::store::{API, connect, connect_in, td, watched_by};
use kube_api::{
    ENDPOINT_SLICES, PODS, POLICIES, RATE_LIMITS, SERVICES, endpoint_slices_list, event, fixture,
    fixture_json, item, pods_list, policies_list, rate_limits_list, recorded_cluster,
    services_list, unready,
};
use serde_json::{Value, json};
use trellis_control_plane::discovery::Discovery;
use trellis_control_plane::store::kubernetes::{self, KubernetesStore};
use trellis_control_plane::store::{DiscoveryState, Store};
use trellis_core::SpiffeId;
use trellis_core::policy::{DefaultPolicy, PolicySet, SelectorScope, ValidationContext};
use trellis_proto::discovery::v1::MeshConfig;

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

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
        .flat_map(|w| w.addresses.iter().map(|a| a.address.clone()))
        .collect();
    out.sort();
    out
}

/// `address namespace/name [backend ...]` of every published service.
fn services(state: &DiscoveryState) -> Vec<String> {
    state
        .services
        .iter()
        .map(|s| format!("{} {} [{}]", s.address, s.name, s.backends.join(" ")))
        .collect()
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
/// that fails validation (a field of a newer release, or written past a
/// webhook that was down) is never pushed, and the policy's last valid
/// version stays in force, as a sidecar keeps its last good snapshot; a
/// fix brings the new version.
#[tokio::test]
async fn watch_events_update_policies_and_invalid_updates_are_never_pushed() {
    let fake = recorded_cluster().await;
    let store = connect(&fake).await;
    watched_by(&fake, 1).await;
    let mut changes = store.changes();
    let first = store.snapshot_version().unwrap();
    let valid = store.policy("shop", "web-to-api").unwrap().unwrap();
    let (_, before) = store.snapshot_position().unwrap();

    let list = policies_list();
    let mut broken = item(&list, "web-to-api", 48400);
    broken["spec"]["rules"][0]["to"] = json!([{"port": 8080}]);
    fake.publish(POLICIES, event("MODIFIED", &broken));
    // The position moves past the invalid update, and nothing else does.
    eventually_async("the invalid update to be read", || async {
        (store.snapshot_position().unwrap().1 != before).then_some(())
    })
    .await;
    let kept = store.policy("shop", "web-to-api").unwrap();
    assert_eq!(kept.as_ref(), Some(&valid), "the last valid version stays");
    let broken_version = store.snapshot_version().unwrap();
    assert_eq!(broken_version, first, "the content did not change");
    let _ = changes.borrow_and_update();

    let mut fixed = item(&list, "web-to-api", 48401);
    fixed["metadata"]["generation"] = json!(4);
    fake.publish(POLICIES, event("MODIFIED", &fixed));
    let back = eventually_async("the fixed policy", || async {
        let held = store.policy("shop", "web-to-api").unwrap()?;
        (held.revision == 4).then_some(held)
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

/// The mesh of the tests of opaque ports: port 5432 is never parsed as
/// HTTP, by any sidecar.
fn opaque_5432() -> ValidationContext {
    ValidationContext {
        opaque_ports: vec![5432],
        ..ValidationContext::default()
    }
}

/// `web-to-api` of the recorded list, at `rv`, with an L7 rule on port
/// 5432.
fn web_to_api_with_l7_on_5432(rv: u64) -> Value {
    let mut object = item(&policies_list(), "web-to-api", rv);
    object["spec"]["rules"][0]["to"] = json!([{"ports": [5432], "methods": ["GET"]}]);
    object
}

/// No API server can run here: the fake streams a recorded watch event.
/// A sidecar refuses every snapshot holding a policy with L7 rules on a
/// port the mesh declares opaque (it never parses that port as HTTP), and
/// with it every later change. An object with such a rule, written past a
/// webhook that did not answer (`failurePolicy: Ignore`), is therefore
/// skipped as invalid, as the webhook would have refused it: the policy's
/// last valid version stays in force, and the sidecar it selects accepts
/// what it is sent.
#[tokio::test]
async fn a_policy_with_l7_rules_on_an_opaque_port_is_never_pushed() {
    let fake = recorded_cluster().await;
    let store = Arc::new(connect_in(&fake, opaque_5432()).await.unwrap());
    watched_by(&fake, 1).await;
    let valid = store.policy("shop", "web-to-api").unwrap().unwrap();
    let (_, before) = store.snapshot_position().unwrap();

    fake.publish(
        POLICIES,
        event("MODIFIED", &web_to_api_with_l7_on_5432(48400)),
    );
    eventually_async("the update to be read", || async {
        (store.snapshot_position().unwrap().1 != before).then_some(())
    })
    .await;
    assert_eq!(
        store.policy("shop", "web-to-api").unwrap(),
        Some(valid),
        "the last valid version stays"
    );

    // The sidecar of `api`, with the mesh's opaque ports, compiles what it
    // is sent as it does before it acknowledges a snapshot.
    let mesh = MeshConfig {
        opaque_ports: vec![5432],
        ..mesh()
    };
    let discovery = Discovery::new(store.clone(), Vec::new(), mesh).unwrap();
    let api = SpiffeId::parse(API).unwrap();
    let snapshot = discovery.snapshot_for(&api);
    let sidecar = ValidationContext {
        opaque_ports: vec![5432],
        stored: true,
        scope: SelectorScope::Unchecked,
    };
    let names: Vec<_> = snapshot.policies.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["deny-legacy", "web-to-api"]);
    if let Err(e) = PolicySet::compile_in(&api, &snapshot.policies, DefaultPolicy::Deny, &sidecar) {
        panic!("the sidecar of api refuses its snapshot: {e}");
    }
}

/// No API server can run here: the fake answers a recorded list holding
/// a policy with L7 rules on an opaque port. As a stored policy of the
/// embedded store, it stops the start (the control plane exits 64),
/// naming the policy and the rule.
#[tokio::test]
async fn a_listed_policy_with_l7_rules_on_an_opaque_port_is_refused_at_start() {
    let fake = recorded_cluster().await;
    let mut list = policies_list();
    list["items"] = json!([web_to_api_with_l7_on_5432(48300)]);
    fake.lists(POLICIES, vec![(200, list)]);
    let Err(e) = connect_in(&fake, opaque_5432()).await else {
        panic!("the store took a policy with L7 rules on an opaque port");
    };
    let e = e.to_string();
    assert!(e.contains("shop/web-to-api"), "{e}");
    assert!(e.contains("port 5432 is declared opaque"), "{e}");
}

/// No API server can run here: the fake answers recorded lists. When the
/// watch lists its kind again after a failure, a policy whose object no
/// longer converts keeps its last valid version, as on a watch event,
/// while the rest of the list is taken as the truth (a policy deleted
/// meanwhile goes).
#[tokio::test]
async fn a_re_list_that_finds_a_policy_invalid_keeps_its_last_valid_version() {
    use trellis_control_plane::store::kubernetes::cache::Kind;
    let fake = recorded_cluster().await;
    let store = connect(&fake).await;
    watched_by(&fake, 1).await;
    let valid = store.policy("shop", "web-to-api").unwrap().unwrap();
    assert!(store.policy("shop", "deny-legacy").unwrap().is_some());

    let mut list = policies_list();
    let items = list["items"].as_array_mut().unwrap();
    items.retain(|i| i["metadata"]["name"] != "deny-legacy");
    for item in items.iter_mut() {
        if item["metadata"]["name"] == "web-to-api" {
            item["spec"]["rules"][0]["to"] = json!([{"port": 8080}]);
            item["metadata"]["resourceVersion"] = json!("48500");
        }
    }
    fake.lists(POLICIES, vec![(200, list)]);
    fake.fail(POLICIES, 500);
    let health = store.watch_health();
    eventually_async("the policy watch to fail", || async {
        health
            .failing()
            .iter()
            .any(|(kind, failing)| *kind == Kind::AuthorizationPolicy && failing.is_some())
            .then_some(())
    })
    .await;
    fake.recover(POLICIES);
    eventually_async("the re-list to drop the deleted policy", || async {
        store
            .policy("shop", "deny-legacy")
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    assert_eq!(
        store.policy("shop", "web-to-api").unwrap(),
        Some(valid),
        "the last valid version stays"
    );
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

/// The next watch of the policies sends a bookmark, then the `410 Gone` an
/// API server sends for an expired resourceVersion (both recorded).
fn expire_the_next_watch(fake: &kube_api::FakeKube) {
    fake.script_watch(
        POLICIES,
        vec![
            fixture("store/bookmark.json").trim().to_owned(),
            fixture("store/gone-410.json").trim().to_owned(),
        ],
    );
}

/// The policies list after `deny-legacy` was deleted at resourceVersion
/// 48590, while the store's watch was away: the list leaves the object out
/// and is at the deletion's resourceVersion, newer than every object in it.
fn after_the_deletion() -> Value {
    let mut later = policies_list();
    later["metadata"]["resourceVersion"] = json!("48590");
    later["items"]
        .as_array_mut()
        .unwrap()
        .retain(|p| p["metadata"]["name"] != "deny-legacy");
    later
}

/// Requests for the policies the fake has answered: its watches, or its
/// lists.
fn policy_requests(fake: &kube_api::FakeKube, watches: bool) -> usize {
    fake.requests()
        .iter()
        .filter(|r| r.path == POLICIES && r.query.contains("watch=true") == watches)
        .count()
}

/// Lists of the policies the fake has answered (watches left out).
fn policy_lists(fake: &kube_api::FakeKube) -> usize {
    policy_requests(fake, false)
}

/// No API server can run here: the fake's watch sends a bookmark, then the
/// `410 Gone` an API server sends for an expired resourceVersion; the store
/// lists again, and an object deleted meanwhile is gone. The re-list shows
/// the deletion only by leaving the object out, so the store lists once
/// more; that list is unchanged, so the store's position moves to its
/// resourceVersion, the deletion's, and a `--wait` for the deletion would
/// end. (Without the second list the position stays at the newest object
/// listed, 47960, below the deletion.)
#[tokio::test]
async fn an_expired_watch_lists_again_and_its_deletions_move_the_position() {
    let fake = recorded_cluster().await;
    fake.lists(
        POLICIES,
        vec![(200, policies_list()), (200, after_the_deletion())],
    );
    expire_the_next_watch(&fake);
    let store = connect(&fake).await;
    assert_eq!(store.snapshot_position().unwrap().1.policies, 47960);
    eventually_async("the position to reach the deletion", || async {
        (store.snapshot_position().unwrap().1.policies == 48590).then_some(())
    })
    .await;
    assert_eq!(keys(&store.discovery_state().unwrap()), ["shop/web-to-api"]);
    assert_eq!(
        policy_lists(&fake),
        3,
        "at start, after the 410, and the check"
    );
}

/// No API server can run here: the list after the re-list names a policy
/// the re-list did not (created in between, its event still to come through
/// the watch). The store does not claim that list's resourceVersion: it
/// does not hold the new policy yet.
#[tokio::test]
async fn a_change_between_the_re_list_and_the_check_does_not_move_the_position() {
    let fake = recorded_cluster().await;
    let mut newer = after_the_deletion();
    newer["metadata"]["resourceVersion"] = json!("48700");
    let mut created = item(&policies_list(), "web-to-api", 48700);
    created["metadata"]["name"] = json!("web-to-api-2");
    newer["items"].as_array_mut().unwrap().push(created.clone());
    fake.lists(
        POLICIES,
        vec![
            (200, policies_list()),
            (200, after_the_deletion()),
            (200, newer),
        ],
    );
    expire_the_next_watch(&fake);
    let store = connect(&fake).await;
    // The watch after the re-list opens once the check is done.
    eventually_async("the watch after the check", || async {
        (policy_requests(&fake, true) == 2).then_some(())
    })
    .await;
    assert_eq!(
        policy_lists(&fake),
        3,
        "at start, after the 410, and the check"
    );
    assert_eq!(keys(&store.discovery_state().unwrap()), ["shop/web-to-api"]);
    let position = store.snapshot_position().unwrap().1.policies;
    assert_eq!(position, 47960, "claimed a list the cache does not hold");

    // The creation's event comes through the watch, and moves it on.
    fake.publish(POLICIES, event("ADDED", &created));
    eventually_async("the creation's event", || async {
        (store.snapshot_position().unwrap().1.policies == 48700).then_some(())
    })
    .await;
}

/// No API server can run here: the fake answers the recorded policies
/// list, `deny-legacy` in it selecting the whole trust domain from its
/// namespace `shop` (admitted before policies were limited to their
/// namespace: enforced as written, and warned of), then its watch sends the
/// recorded bookmark and `410 Gone`, and the store lists the same list
/// again, as a long-running replica does whenever its watch expires. The
/// unchanged object is warned of once, not at every list; a change of it
/// (a new resourceVersion) that still fails the check is warned of again.
#[tokio::test]
async fn a_relaxed_policy_is_warned_of_once_per_change_not_per_list() {
    const WARNING: &str = "stored policy fails a check added since it was stored";
    let (logs, _guard) = common::logs::capture();
    let fake = recorded_cluster().await;
    let mut list = policies_list();
    for item in list["items"].as_array_mut().unwrap() {
        if item["metadata"]["name"] == "deny-legacy" {
            item["spec"]["selector"] = json!({"spiffeIds": ["spiffe://cluster.local/*"]});
        }
    }
    fake.lists(POLICIES, vec![(200, list.clone())]);
    expire_the_next_watch(&fake);
    let store = connect(&fake).await;
    assert!(store.policy("shop", "deny-legacy").unwrap().is_some());
    listed_again(&fake).await;
    let warnings = logs.warnings(WARNING);
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    assert!(
        warnings[0].contains("object=shop/deny-legacy")
            && warnings[0].contains("selects workloads outside the policy's namespace"),
        "{}",
        warnings[0]
    );

    let mut changed = item(&list, "deny-legacy", 48700);
    changed["metadata"]["generation"] = json!(2);
    fake.publish(POLICIES, event("MODIFIED", &changed));
    eventually_async("the changed object's warning", || async {
        (logs.warnings(WARNING).len() == 2).then_some(())
    })
    .await;
    let revision = store
        .policy("shop", "deny-legacy")
        .unwrap()
        .unwrap()
        .revision;
    assert_eq!(revision, 2, "the change is enforced");
}

/// Waits for the store to list the policies again after the watch that
/// [`expire_the_next_watch`] expired, and to list them once more (the
/// check after a re-list): the watch after those opens once they are done.
async fn listed_again(fake: &kube_api::FakeKube) {
    eventually_async("the watch after the check", || async {
        (policy_requests(fake, true) == 2).then_some(())
    })
    .await;
    assert_eq!(
        policy_lists(fake),
        3,
        "at start, after the 410, and the check"
    );
}

/// No API server can run here: the fake answers the recorded policies
/// list, `misspelt-port` in it failing `policy lint` (`port` where the
/// format says `ports`), then its watch sends the recorded bookmark and
/// `410 Gone`, and the store lists the same list again. The object is
/// warned of once, not at every list; a change of it (a new
/// resourceVersion) that still fails is warned of again, and a fix is
/// taken.
#[tokio::test]
async fn an_invalid_object_is_warned_of_once_per_change_not_per_list() {
    let (logs, _guard) = common::logs::capture();
    let warnings = || {
        let mut of_it = logs.warnings("skipped an invalid object");
        of_it.retain(|l| l.contains("object=shop/misspelt-port"));
        of_it
    };
    let fake = recorded_cluster().await;
    expire_the_next_watch(&fake);
    let store = connect(&fake).await;
    listed_again(&fake).await;
    let first = warnings();
    assert_eq!(first.len(), 1, "{first:#?}");
    assert!(
        first[0].contains(r#"resource_version="47960""#),
        "{}",
        first[0]
    );

    let list = policies_list();
    let mut changed = item(&list, "misspelt-port", 48700);
    changed["metadata"]["generation"] = json!(2);
    changed["spec"]["rules"][0]["to"] = json!([{"port": 8080}]);
    fake.publish(POLICIES, event("MODIFIED", &changed));
    let second = eventually_async("the changed object's warning", || async {
        let second = warnings();
        (second.len() == 2).then_some(second)
    })
    .await;
    assert!(
        second[1].contains(r#"resource_version="48700""#),
        "{}",
        second[1]
    );
    assert_eq!(store.policy("shop", "misspelt-port").unwrap(), None);

    let mut fixed = item(&list, "misspelt-port", 48701);
    fixed["metadata"]["generation"] = json!(3);
    fixed["spec"]["rules"][0]["to"] = json!([{"ports": [8080]}]);
    fake.publish(POLICIES, event("MODIFIED", &fixed));
    let taken = eventually_async("the fixed policy", || async {
        store.policy("shop", "misspelt-port").unwrap()
    })
    .await;
    assert_eq!(taken.revision, 3, "the fix is enforced");
    assert_eq!(warnings().len(), 2, "a fix is no warning");
}

/// The `403 Forbidden` Status kube-apiserver answers a list of `resource`
/// (of API `group`, "" for the core group) with when RBAC does not allow it,
/// shaped as the recorded `forbidden-list-403.json`.
fn forbidden(resource: &str, group: &str) -> Value {
    let qualified = match group {
        "" => resource.to_owned(),
        group => format!("{resource}.{group}"),
    };
    let mut details = json!({"kind": resource});
    if !group.is_empty() {
        details["group"] = json!(group);
    }
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": format!("{qualified} is forbidden: User \"system:serviceaccount:trellis-system:trellis-control-plane\" \
                               cannot list resource \"{resource}\" in API group \"{group}\" at the cluster scope"),
           "reason": "Forbidden", "details": details, "code": 403})
}

/// No API server can run here: the fake answers the list of one kind at a
/// time with the `403 Forbidden` Status of missing RBAC (the recorded one
/// for AuthorizationPolicies), the others with the recorded lists. Start-up
/// fails with the API server's message, naming the kind.
#[tokio::test]
async fn an_api_server_refusal_of_any_kind_is_a_clear_error_naming_it() {
    let cases = [
        (
            POLICIES,
            "AuthorizationPolicy",
            "authorizationpolicies",
            fixture_json("store/forbidden-list-403.json"),
        ),
        (
            RATE_LIMITS,
            "RateLimitPolicy",
            "ratelimitpolicies",
            forbidden("ratelimitpolicies", "trellis.io"),
        ),
        (PODS, "Pod", "pods", forbidden("pods", "")),
        (SERVICES, "Service", "services", forbidden("services", "")),
        (
            ENDPOINT_SLICES,
            "EndpointSlice",
            "endpointslices",
            forbidden("endpointslices", "discovery.k8s.io"),
        ),
    ];
    for (path, kind, resource, answer) in cases {
        let fake = recorded_cluster().await;
        fake.lists(path, vec![(403, answer)]);
        let client = kubernetes::client(&fake.api()).unwrap();
        let e = KubernetesStore::connect(
            client,
            td(),
            ValidationContext::default(),
            Duration::from_secs(20),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(e.contains(&format!("listing {kind} objects failed")), "{e}");
        assert!(
            e.contains(&format!("cannot list resource \"{resource}\"")),
            "{e}"
        );
        assert!(e.contains("403"), "{e}");
    }
}

/// The recorded Services as the store publishes them.
const RECORDED_SERVICES: [&str; 6] = [
    "10.96.120.34:80 shop/web [10.244.1.17:8080]",
    "10.96.200.5:80 shop/storefront [10.244.1.17:8080]",
    "10.96.45.210:8080 shop/api [10.244.2.9:8080]",
    "10.96.45.210:9090 shop/api []",
    "172.18.255.200:80 shop/storefront [10.244.1.17:8080]",
    "198.51.100.7:80 shop/storefront [10.244.1.17:8080]",
];

/// No API server can run here: the fake answers the recorded Service and
/// EndpointSlice lists and streams events. Every cluster IP, external IP
/// and load-balancer IP of a Service in the mesh, with each TCP port, is
/// published with the ready endpoints of its slices at the target port
/// (none for a port no slice serves), and `sessionAffinity: ClientIP` asks
/// for client affinity; headless and ExternalName Services, those with
/// `internalTrafficPolicy: Local`, those with no mesh endpoint (`kubernetes`,
/// `kube-dns`), node ports, UDP ports and endpoints not ready are not. A
/// backend that stops being ready and a deleted Service change the services
/// and the version; the snapshots carry them.
#[tokio::test]
async fn services_are_published_with_their_ready_backends_and_follow_events() {
    let fake = recorded_cluster().await;
    let store = Arc::new(connect(&fake).await);
    watched_by(&fake, 1).await;
    let recorded = RECORDED_SERVICES;
    let state = store.discovery_state().unwrap();
    assert_eq!(services(&state), recorded);
    let affinity: Vec<_> = state
        .services
        .iter()
        .filter(|s| s.client_affinity)
        .map(|s| s.address.as_str())
        .collect();
    assert_eq!(
        affinity,
        ["10.96.200.5:80", "172.18.255.200:80", "198.51.100.7:80"],
        "shop/storefront asks that a client keep to one backend"
    );
    let slice_list = fake
        .requests()
        .into_iter()
        .find(|r| r.path == ENDPOINT_SLICES)
        .expect("a list of EndpointSlices");
    assert!(
        slice_list
            .query
            .contains("labelSelector=kubernetes.io%2Fservice-name"),
        "only the slices of a Service are watched: {}",
        slice_list.query
    );

    let mut changes = store.changes();
    let first = store.snapshot_version().unwrap();
    // The api pod's readiness probe fails: its endpoint stays in the slice,
    // no longer ready.
    let unready = unready(&endpoint_slices_list(), "api-7h5tq", 48900);
    fake.publish(ENDPOINT_SLICES, event("MODIFIED", &unready));
    eventually_async("the unready backend to leave", || async {
        let state = store.discovery_state().unwrap();
        services(&state)
            .contains(&"10.96.45.210:8080 shop/api []".to_owned())
            .then_some(())
    })
    .await;
    assert!(
        services(&store.discovery_state().unwrap())
            .contains(&"10.96.45.210:9090 shop/api []".to_owned()),
        "its pod is still a mesh endpoint: shop/api stays, with no ready backend"
    );
    assert!(changes.has_changed().unwrap(), "the change is announced");
    let unready_version = *changes.borrow_and_update();
    assert_ne!(unready_version, first);

    fake.publish(
        SERVICES,
        event("DELETED", &item(&services_list(), "web", 48901)),
    );
    eventually_async("the deleted Service to leave", || async {
        let state = store.discovery_state().unwrap();
        (!services(&state).iter().any(|s| s.contains("shop/web"))).then_some(())
    })
    .await;
    assert_ne!(store.snapshot_version().unwrap(), unready_version);
    let state = store.discovery_state().unwrap();
    assert_eq!(services(&state).len(), recorded.len() - 1);

    let discovery = Discovery::new(store.clone(), Vec::new(), mesh()).unwrap();
    let snapshot = discovery.snapshot_for(&SpiffeId::parse(WEB).unwrap());
    assert_eq!(snapshot.services, state.services);
    assert_eq!(snapshot.version, store.snapshot_version().unwrap());
}

/// `services` with the Service `name` also claiming `ip` as an external IP.
fn with_external_ip(services: &Value, name: &str, ip: &str, rv: u64) -> Value {
    let mut service = item(services, name, rv);
    service["spec"]["externalIPs"] = json!([ip]);
    service
}

/// No API server can run here: the fake answers the recorded Service list
/// with `shop/web` also claiming `shop/storefront`'s external IP
/// 198.51.100.7 (nothing in Kubernetes checks external IPs), then the
/// Services watch sends the recorded `410 Gone` and the store lists them
/// again, and an EndpointSlice changes. The clash is warned of once, not at
/// every list or change that joins the Services again; `shop/web` claiming
/// another address instead is warned of again.
#[tokio::test]
async fn two_services_claiming_one_address_are_warned_of_once_per_clash() {
    const WARNING: &str = "two Services claim one address and port";
    let (logs, _guard) = common::logs::capture();
    let fake = recorded_cluster().await;
    let mut list = services_list();
    let web = with_external_ip(&list, "web", "198.51.100.7", 45810);
    for service in list["items"].as_array_mut().unwrap() {
        if service["metadata"]["name"] == "web" {
            *service = web.clone();
        }
    }
    fake.lists(SERVICES, vec![(200, list.clone())]);
    fake.script_watch(
        SERVICES,
        vec![fixture("store/gone-410.json").trim().to_owned()],
    );
    let store = connect(&fake).await;
    eventually_async("the Services listed again and watched", || async {
        let watches = fake
            .requests()
            .iter()
            .filter(|r| r.path == SERVICES && r.query.contains("watch=true"))
            .count();
        (watches == 2).then_some(())
    })
    .await;
    let unready = unready(&endpoint_slices_list(), "api-7h5tq", 48900);
    fake.publish(ENDPOINT_SLICES, event("MODIFIED", &unready));
    eventually_async("the unready backend to leave", || async {
        services(&store.discovery_state().unwrap())
            .contains(&"10.96.45.210:8080 shop/api []".to_owned())
            .then_some(())
    })
    .await;
    let published = services(&store.discovery_state().unwrap());
    assert!(
        published.contains(&"198.51.100.7:80 shop/storefront [10.244.1.17:8080]".to_owned())
            && !published
                .iter()
                .any(|s| s.starts_with("198.51.100.7:80 shop/web")),
        "{published:#?}"
    );
    let warnings = logs.warnings(WARNING);
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    assert!(
        warnings[0].contains("address=198.51.100.7:80")
            && warnings[0].contains("kept=shop/storefront")
            && warnings[0].contains("left_out=shop/web"),
        "{}",
        warnings[0]
    );

    let moved = with_external_ip(&list, "web", "172.18.255.200", 48901);
    fake.publish(SERVICES, event("MODIFIED", &moved));
    let warnings = eventually_async("the new clash's warning", || async {
        let warnings = logs.warnings(WARNING);
        (warnings.len() == 2).then_some(warnings)
    })
    .await;
    assert!(
        warnings[1].contains("address=172.18.255.200:80")
            && warnings[1].contains("left_out=shop/web"),
        "{}",
        warnings[1]
    );
}

/// No API server can run here: the fake answers the recorded lists. The
/// version is a digest of the content and of what the control plane
/// settles, the trust bundle included: replicas with one bundle agree on
/// it, a replica started with an added trust anchor announces another one
/// (whose snapshots carry both roots), and the same bundle again gives the
/// same version.
#[tokio::test]
async fn the_trust_bundle_is_part_of_the_version() {
    let fake = recorded_cluster().await;
    let (signing, anchor) = (vec![0x30, 1, 1], vec![0x30, 1, 2]);
    let started = async |bundle: &[&Vec<u8>]| {
        let store: Arc<dyn Store> = Arc::new(connect(&fake).await);
        let bundle = bundle.iter().map(|r| r.to_vec()).collect();
        Discovery::new(store, bundle, mesh()).unwrap()
    };
    let one = started(&[&signing]).await.current_version();
    assert_eq!(started(&[&signing]).await.current_version(), one);

    let anchored = started(&[&signing, &anchor]).await;
    assert_ne!(anchored.current_version(), one);
    let snapshot = anchored.snapshot_for(&SpiffeId::parse(API).unwrap());
    assert_eq!(snapshot.version, anchored.current_version());
    assert_eq!(snapshot.trust_bundle, [signing.clone(), anchor.clone()]);
    assert_eq!(
        started(&[&signing, &anchor]).await.current_version(),
        anchored.current_version()
    );
}

/// No API server can run here: the fake streams recorded events. The
/// unmeshed `kube-dns` loses its ready endpoint while `shop/web`'s pod
/// fails its readiness probe and recovers: only the second is announced,
/// and once it recovered the version is the first one again, as a replica
/// that never saw `kube-dns` change would announce. A mesh pod that goes
/// takes the Services it alone stood behind out of the snapshots.
#[tokio::test]
async fn only_what_the_snapshots_carry_moves_the_version() {
    let fake = recorded_cluster().await;
    let store = connect(&fake).await;
    watched_by(&fake, 1).await;
    let mut changes = store.changes();
    let first = *changes.borrow_and_update();
    assert_eq!(first, store.snapshot_version().unwrap());

    let slices = endpoint_slices_list();
    let dns_unready = unready(&slices, "kube-dns-8qzwn", 49000);
    fake.publish(ENDPOINT_SLICES, event("MODIFIED", &dns_unready));
    let web_unready = unready(&slices, "web-2xk8d", 49001);
    fake.publish(ENDPOINT_SLICES, event("MODIFIED", &web_unready));
    eventually_async("shop/web's backend to leave", || async {
        let state = store.discovery_state().unwrap();
        services(&state)
            .contains(&"10.96.120.34:80 shop/web []".to_owned())
            .then_some(())
    })
    .await;
    assert!(changes.has_changed().unwrap());
    assert_ne!(*changes.borrow_and_update(), first);

    fake.publish(
        ENDPOINT_SLICES,
        event("MODIFIED", &item(&slices, "web-2xk8d", 49002)),
    );
    eventually_async("shop/web's backend to come back", || async {
        let state = store.discovery_state().unwrap();
        (services(&state) == RECORDED_SERVICES).then_some(())
    })
    .await;
    assert_eq!(
        store.snapshot_version().unwrap(),
        first,
        "kube-dns's slice is in no snapshot"
    );
    assert_eq!(*changes.borrow_and_update(), first);

    let web_pod = item(&pods_list(), "web-7d4b9c8f6d-x2x8q", 49003);
    fake.publish(PODS, event("DELETED", &web_pod));
    let api_only = [
        "10.96.45.210:8080 shop/api [10.244.2.9:8080]",
        "10.96.45.210:9090 shop/api []",
    ];
    eventually_async("the Services of the web pod to leave", || async {
        let state = store.discovery_state().unwrap();
        (services(&state) == api_only).then_some(())
    })
    .await;
    assert_ne!(store.snapshot_version().unwrap(), first);
}

/// A GET of `path` on the admin port at `addr`: the status and the body.
async fn admin_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.unwrap();
    let status = answer[9..12].parse().unwrap();
    let body = answer.split_once("\r\n\r\n").unwrap().1.to_owned();
    (status, body)
}

/// No API server can run here: the stand-in ends the AuthorizationPolicy
/// watch and answers every list and watch of the kind with a 500 from
/// then on, as an API server that lost its storage would, while it keeps
/// answering the other kinds. `trellis_store_watch_failing` says which
/// watch fails. The admin port of a replica with no peer keeps answering
/// /ready with 200 past the grace (shortened for the test through the
/// store's constructor, 60 s in the binary): with nowhere better for
/// sidecars to go, it serves the policies it last saw, and its body names
/// the kind and says so, as `trellis_store_serving_stale_policies` does.
/// Once the stand-in answers again, the watch lists afresh and /ready is
/// plainly ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_replica_stays_ready_while_a_policy_watch_keeps_failing() {
    use std::sync::atomic::AtomicBool;
    use trellis_control_plane::admin_http::AdminHttp;
    use trellis_control_plane::metrics::Metrics;
    use trellis_control_plane::readiness::Readiness;

    let fake = recorded_cluster().await;
    let client = kubernetes::client(&fake.api()).unwrap();
    let grace = Duration::from_secs(2);
    let store = KubernetesStore::connect_with_watch_grace(
        client,
        td(),
        ValidationContext::default(),
        Duration::from_secs(20),
        grace,
    )
    .await
    .unwrap();
    let readiness = Arc::new(Readiness::new(store.watch_health(), None));
    let store = Arc::new(store);
    watched_by(&fake, 1).await;
    let discovery = Arc::new(Discovery::new(store.clone(), Vec::new(), mesh()).unwrap());
    let admin = AdminHttp::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = admin.local_addr().unwrap();
    let (_stop, stop) = tokio::sync::watch::channel(false);
    let ready = Arc::new(AtomicBool::new(true));
    let metrics = Arc::new(Metrics::default());
    tokio::spawn(readiness.clone().run(stop.clone()));
    tokio::spawn(admin.run(ready, metrics, discovery, Some(readiness), stop));
    assert_eq!(admin_get(addr, "/ready").await, (200, "ready\n".into()));
    let failing =
        |kind: &str, value: u8| format!("trellis_store_watch_failing{{kind=\"{kind}\"}} {value}\n");
    let stale = |value: u8| format!("trellis_store_serving_stale_policies {value}\n");
    let scraped = admin_get(addr, "/metrics").await.1;
    assert!(
        scraped.contains(&failing("AuthorizationPolicy", 0)),
        "{scraped}"
    );
    assert!(scraped.contains(&stale(0)), "{scraped}");

    fake.fail(POLICIES, 500);
    let failed_at = std::time::Instant::now();
    eventually_async("the watch to fail", || async {
        let scraped = admin_get(addr, "/metrics").await.1;
        scraped
            .contains(&failing("AuthorizationPolicy", 1))
            .then_some(())
    })
    .await;
    let scraped = admin_get(addr, "/metrics").await.1;
    assert!(scraped.contains(&failing("Pod", 0)), "{scraped}");
    let body = eventually_async("/ready to say it serves stale policies", || async {
        let (status, body) = admin_get(addr, "/ready").await;
        assert_eq!(status, 200, "a replica with no peer stays ready: {body}");
        (body != "ready\n").then_some(body)
    })
    .await;
    assert!(failed_at.elapsed() >= grace);
    common::assert_serving_stale(&body, "AuthorizationPolicy");
    assert!(!body.contains("Pod"), "{body}");
    let scraped = admin_get(addr, "/metrics").await.1;
    assert!(scraped.contains(&stale(1)), "{scraped}");

    fake.recover(POLICIES);
    eventually_async("/ready to answer plainly ready again", || async {
        (admin_get(addr, "/ready").await == (200, "ready\n".into())).then_some(())
    })
    .await;
    let scraped = admin_get(addr, "/metrics").await.1;
    assert!(
        scraped.contains(&failing("AuthorizationPolicy", 0)),
        "{scraped}"
    );
    assert!(scraped.contains(&stale(0)), "{scraped}");
}
