//! The `/validate` webhook as a specification: Trellis policy objects are
//! admitted or denied by the same validation as `trellisctl policy lint`.
//!
//! No Kubernetes API server can run on these machines. The fixtures in
//! `fixtures/k8s/` are real `admission.k8s.io/v1` AdmissionReview documents
//! as the API server sends them for a custom resource of group `trellis.io`
//! (with the metadata the API server adds: uid, managedFields, generation).

use trellis_control_plane::inject;

use inject::review_policy;
use serde_json::{Value, json};
use trellis_core::TrustDomain;
use trellis_core::policy::{Document, ValidationContext, validate};

fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").unwrap()
}

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/k8s/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn reply(review: &Value) -> Value {
    let body = serde_json::to_vec(review).unwrap();
    let response = review_policy(&body, &td(), &ValidationContext::default()).unwrap();
    serde_json::from_slice(&response.to_body()).unwrap()
}

/// A valid policy applied with `kubectl apply` is admitted, without a patch.
/// Real AdmissionReview for a CREATE; no API server here.
#[test]
fn admits_a_valid_policy() {
    let review = fixture("authorizationpolicy-valid.json");
    assert_eq!(
        reply(&review),
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
               "response": {"uid": review["request"]["uid"], "allowed": true}})
    );
}

/// An invalid edit is denied with every error at its field path, the same
/// messages `policy lint` prints (less the line). Real AdmissionReview for
/// an UPDATE from `kubectl edit`; no API server here.
#[test]
fn denies_an_invalid_policy_with_the_lint_messages() {
    let review = fixture("authorizationpolicy-invalid-update.json");
    let reply = reply(&review);
    let response = &reply["response"];
    assert_eq!(response["allowed"], false);
    assert_eq!(response["status"]["code"], 403);
    let message = response["status"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("AuthorizationPolicy shop/web-to-api is invalid: "),
        "{message}"
    );

    // The same violations, in the same words, as the library reports them.
    let mut document = review["request"]["object"].clone();
    document["metadata"] = json!({"name": "web-to-api", "namespace": "shop"});
    let Ok(Document::AuthorizationPolicy(policy)) = Document::from_value(document) else {
        panic!("the fixture is a well-formed document");
    };
    let violations = validate(&policy, &td()).unwrap_err();
    assert!(violations.len() >= 2, "{violations:?}");
    for violation in &violations {
        assert!(
            message.contains(&violation.to_string()),
            "{message} lacks {violation}"
        );
    }
    assert!(
        message.contains("spec.rules[0].from[0].spiffeId"),
        "{message}"
    );
    assert!(
        message.contains("spec.rules[0].to[0].ports[1]"),
        "{message}"
    );
}

/// Unknown fields and kinds are denied, never admitted unchecked: the CRD
/// schema prunes unknown fields, but a kind the library cannot validate
/// must not reach the store.
/// Real AdmissionReview documents (fixtures/k8s) as the API server sends them; no
/// Kubernetes API server can run here.
#[test]
fn denies_unknown_fields_and_kinds() {
    let mut review = fixture("authorizationpolicy-valid.json");
    review["request"]["object"]["spec"]["rules"][0]["to"][0]["port"] = json!(80);
    let reply1 = reply(&review);
    assert_eq!(reply1["response"]["allowed"], false);
    let message = reply1["response"]["status"]["message"].as_str().unwrap();
    assert!(message.contains("spec.rules[0].to[0]"), "{message}");
    assert!(message.contains("port"), "{message}");

    let mut review = fixture("authorizationpolicy-valid.json");
    review["request"]["kind"]["kind"] = json!("Gateway");
    review["request"]["object"]["kind"] = json!("Gateway");
    let reply2 = reply(&review);
    assert_eq!(reply2["response"]["allowed"], false);
    let message = reply2["response"]["status"]["message"].as_str().unwrap();
    assert!(message.contains("unknown kind \"Gateway\""), "{message}");
}

/// A RateLimitPolicy gets the one rate-limit validation: admitted when
/// valid, denied naming the field otherwise.
/// Real AdmissionReview documents (fixtures/k8s) as the API server sends them
/// (the AuthorizationPolicy fixture turned into a RateLimitPolicy); no
/// Kubernetes API server can run here.
#[test]
fn validates_rate_limit_policies() {
    let mut review = fixture("authorizationpolicy-valid.json");
    review["request"]["kind"]["kind"] = json!("RateLimitPolicy");
    review["request"]["object"]["kind"] = json!("RateLimitPolicy");
    review["request"]["object"]["spec"] = json!({
        "selector": {"spiffeIds": ["spiffe://cluster.local/ns/shop/sa/api"]},
        "limit": {"requestsPerSecond": 50, "burst": 100},
        "key": "source",
    });
    assert_eq!(reply(&review)["response"]["allowed"], true);

    review["request"]["object"]["spec"]["limit"]["burst"] = json!(0);
    let denied = reply(&review);
    assert_eq!(denied["response"]["allowed"], false);
    let message = denied["response"]["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("spec.limit.burst: burst must be between 1 and 1000000, not 0"),
        "{message}"
    );
}

/// Deleting is always allowed (there is no object to judge), and objects
/// outside `trellis.io` are not this webhook's business.
/// Real AdmissionReview documents (fixtures/k8s) as the API server sends them; no
/// Kubernetes API server can run here.
#[test]
fn allows_deletes_and_foreign_groups() {
    let mut review = fixture("authorizationpolicy-invalid-update.json");
    review["request"]["operation"] = json!("DELETE");
    review["request"]["oldObject"] = review["request"]["object"].take();
    assert_eq!(reply(&review)["response"]["allowed"], true);

    let mut review = fixture("authorizationpolicy-invalid-update.json");
    review["request"]["kind"]["group"] = json!("example.com");
    assert_eq!(reply(&review)["response"]["allowed"], true);
}

/// A policy is judged against the mesh's trust domain: naming workloads of
/// another one selects nothing and is rejected, as `policy lint` rejects it.
/// Real AdmissionReview documents (fixtures/k8s) as the API server sends them; no
/// Kubernetes API server can run here.
#[test]
fn validates_against_the_mesh_trust_domain() {
    let review = fixture("authorizationpolicy-valid.json");
    let body = serde_json::to_vec(&review).unwrap();
    let other = TrustDomain::new("example.org").unwrap();
    let response = review_policy(&body, &other, &ValidationContext::default()).unwrap();
    assert!(!response.allowed);
    let message = response.message.unwrap();
    assert!(
        message.contains("spec.selector.spiffeIds[0]: selects no workload of this mesh"),
        "{message}"
    );
}

/// With `--opaque-ports 5432` the mesh never parses port 5432 as HTTP, so a
/// policy with L7 matches on it could not be enforced: `kubectl apply` is
/// denied naming the port, as `trellisctl policy apply` is. The same rule on
/// an HTTP port is admitted. Real AdmissionReview for a CREATE, its object
/// given L7 matches; no API server here.
#[test]
fn denies_l7_rules_on_a_port_the_mesh_declares_opaque() {
    let mut review = fixture("authorizationpolicy-valid.json");
    review["request"]["object"]["spec"]["rules"][0]["to"] =
        json!([{"ports": [5432], "methods": ["GET"], "paths": ["/health"]}]);
    let body = serde_json::to_vec(&review).unwrap();
    let mesh = ValidationContext {
        opaque_ports: vec![5432],
        ..ValidationContext::default()
    };

    let denied: Value =
        serde_json::from_slice(&review_policy(&body, &td(), &mesh).unwrap().to_body()).unwrap();
    assert_eq!(denied["response"]["allowed"], false, "{denied}");
    let message = denied["response"]["status"]["message"].as_str().unwrap();
    assert!(message.contains("5432"), "{message}");
    assert!(message.contains("opaque"), "{message}");

    let elsewhere = ValidationContext {
        opaque_ports: vec![25],
        ..ValidationContext::default()
    };
    let admitted: Value =
        serde_json::from_slice(&review_policy(&body, &td(), &elsewhere).unwrap().to_body())
            .unwrap();
    assert_eq!(admitted["response"]["allowed"], true, "{admitted}");
}
