//! `RateLimitPolicy` documents read like every policy file: valid ones are
//! loaded, broken ones rejected at their line.

use trellis_core::TrustDomain;
use trellis_core::policy::{LimitKey, load_source};

fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").unwrap()
}

const GOOD: &str = "apiVersion: trellis.io/v1alpha1
kind: RateLimitPolicy
metadata: {name: api-limit, namespace: default}
spec:
  selector: {spiffeIds: [\"spiffe://cluster.local/ns/default/sa/api\"]}
  limit: {requestsPerSecond: 50, burst: 100}
  key: source
  match: [{paths: [\"/search/*\"]}]
";

#[test]
fn loads_the_issue_example() {
    let loaded = load_source("limit.yaml", GOOD, &td());
    assert_eq!(loaded.diagnostics, []);
    assert!(loaded.policies.is_empty());
    let limit = &loaded.rate_limits[0];
    assert_eq!(limit.line, 1);
    assert_eq!(limit.policy.spec.key, LimitKey::Source);
    assert_eq!(limit.policy.to_proto().burst, 100);
}

#[test]
fn rejects_bad_limits_at_their_lines() {
    let bad = GOOD
        .replace(
            "requestsPerSecond: 50, burst: 100",
            "requestsPerSecond: -1, burst: 0",
        )
        .replace("key: source", "key: everyone");
    let loaded = load_source("limit.yaml", &bad, &td());
    let diagnostics: Vec<String> = loaded.diagnostics.iter().map(ToString::to_string).collect();
    assert_eq!(diagnostics.len(), 1, "{diagnostics:?}");
    assert!(
        diagnostics[0].starts_with("limit.yaml:7:"),
        "{diagnostics:?}"
    );
    assert!(
        diagnostics[0].contains("unknown variant `everyone`"),
        "{diagnostics:?}"
    );

    let bad = GOOD.replace(
        "requestsPerSecond: 50, burst: 100",
        "requestsPerSecond: -1, burst: 0",
    );
    let loaded = load_source("limit.yaml", &bad, &td());
    let diagnostics: Vec<String> = loaded.diagnostics.iter().map(ToString::to_string).collect();
    assert_eq!(
        diagnostics,
        [
            "limit.yaml:6:30: spec.limit.requestsPerSecond: requestsPerSecond must be a positive number, not -1",
            "limit.yaml:6:41: spec.limit.burst: burst must be between 1 and 1000000, not 0",
        ]
    );
    assert!(loaded.rate_limits.is_empty());
}
