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

/// A bucket refilling slower than once a day is no rate limit, and at the
/// extreme a wait no clock can hold: refused where it is written.
#[test]
fn rejects_a_rate_below_one_request_per_day_at_its_line() {
    let rate = |rps: &str| {
        let text = GOOD.replace(
            "requestsPerSecond: 50",
            &format!("requestsPerSecond: {rps}"),
        );
        let loaded = load_source("limit.yaml", &text, &td());
        let diagnostics: Vec<String> = loaded.diagnostics.iter().map(ToString::to_string).collect();
        (diagnostics, loaded.rate_limits.len())
    };
    assert_eq!(
        rate("1e-300"),
        (
            vec![
                "limit.yaml:6:30: spec.limit.requestsPerSecond: requestsPerSecond must be at least one request per day (1/86400, about 0.0000116), not 1e-300".to_owned()
            ],
            0
        )
    );
    assert_eq!(rate("0.0000115").1, 0);
    assert_eq!(rate("0.0000116"), (vec![], 1), "one a day is the least");
}
