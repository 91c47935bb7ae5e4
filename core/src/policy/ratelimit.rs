//! The `RateLimitPolicy` document kind: how many requests per second the
//! selected workloads accept, per caller, per route or both; its validation
//! and its protobuf form (`trellis_proto::policy::v1::RateLimit`).
//!
//! ```yaml
//! apiVersion: trellis.io/v1alpha1
//! kind: RateLimitPolicy
//! metadata: {name: api-limit, namespace: default}
//! spec:
//!   selector: {spiffeIds: ["spiffe://cluster.local/ns/default/sa/api"]}
//!   limit: {requestsPerSecond: 50, burst: 100}
//!   key: source            # source | route | source-and-route
//!   match: [{paths: ["/search/*"]}]   # optional
//! ```
//!
//! This module never counts requests: the sidecar's limiter does.

use serde::{Deserialize, Serialize};
use trellis_proto::policy::v1 as proto;

use super::document::{API_VERSION, Metadata, Selector};
use super::l7::PathPattern;
use super::path::FieldPath;
use super::pattern::{DNS_LABEL_RULE, IdPattern, is_dns_label};
use super::validate::{
    ValidationContext, Violation, Violations, check_path_pattern, outside_namespace, push_or_relax,
};
use crate::spiffe::TrustDomain;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RateLimitPolicy {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: RateLimitSpec,
}

impl RateLimitPolicy {
    pub const KIND: &'static str = "RateLimitPolicy";
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSpec {
    #[serde(default)]
    pub selector: Selector,
    pub limit: Limit,
    #[serde(default)]
    pub key: LimitKey,
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub matches: Option<Vec<LimitMatch>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Limit {
    pub requests_per_second: f64,
    pub burst: i64,
}

/// What one bucket counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LimitKey {
    /// One bucket per calling identity.
    #[default]
    Source,
    /// One bucket per request path.
    Route,
    /// One bucket per caller and path.
    SourceAndRoute,
}

impl LimitKey {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Source => "source",
            Self::Route => "route",
            Self::SourceAndRoute => "source-and-route",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Source, Self::Route, Self::SourceAndRoute]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

/// Which requests the limit applies to; any entry matching is enough.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitMatch {
    #[serde(default)]
    pub paths: Vec<String>,
}

/// Whether a limit matching `paths` (none: every request) counts a
/// request to `path`: one of them matches it as apps route it
/// ([`PathPattern::matches_as_routed`]), so that another spelling of a
/// path it names (`/login/`, `/login;x`, `/LOGIN`, `/login.`, `/a%3Ab` for `/a:b`)
/// does not escape it. The
/// sidecar's limiter and `policy explain` both ask this.
pub fn counts_path(paths: &[PathPattern], path: &str) -> bool {
    paths.is_empty() || paths.iter().any(|p| p.matches_as_routed(path))
}

/// The lowest `requestsPerSecond` accepted: one request per day. A bucket
/// that refills slower would tell a refused caller to come back in more
/// than a day, which is no rate limit but a DENY, and at the extreme a
/// wait no clock can hold.
pub const MIN_REQUESTS_PER_SECOND: f64 = 1.0 / 86_400.0;

/// Checks a rate limit; every broken rule as a [`Violation`] (at most
/// [`MAX_DIAGNOSTICS`](super::validate::MAX_DIAGNOSTICS) of them kept, the
/// rest counted in the [`Violations`]).
pub fn validate_rate_limit(policy: &RateLimitPolicy) -> Result<(), Violations> {
    validate_rate_limit_with(policy, &ValidationContext::default()).map(drop)
}

/// [`validate_rate_limit`] under `context`: with
/// [`stored`](ValidationContext::stored), what it relaxes comes back as
/// warnings (a rate below [`MIN_REQUESTS_PER_SECOND`] is enforced at it:
/// [`Limit::enforced_rate`]).
pub fn validate_rate_limit_with(
    policy: &RateLimitPolicy,
    context: &ValidationContext,
) -> Result<Vec<Violation>, Violations> {
    let mut found = Violations::default();
    let mut relaxed = Vec::new();
    let root = FieldPath::root();
    if policy.api_version != API_VERSION {
        found.push(Violation::error(
            root.field("apiVersion"),
            format!(
                "unsupported apiVersion {:?} (expected {API_VERSION:?})",
                policy.api_version
            ),
        ));
    }
    for (field, value) in [
        ("name", &policy.metadata.name),
        ("namespace", &policy.metadata.namespace),
    ] {
        if value.is_empty() {
            found.push(Violation::error(
                root.field("metadata").field(field),
                format!("{field} must not be empty"),
            ));
        }
    }
    let spec = root.field("spec");
    let ids = &policy.spec.selector.spiffe_ids;
    let at = spec.field("selector").field("spiffeIds");
    if ids.is_empty() {
        found.push(Violation::error(at.clone(), "select at least one workload"));
    }
    for (i, id) in ids.iter().enumerate() {
        if let Err(e) = IdPattern::parse(id) {
            found.push(Violation::error(at.index(i), e.to_string()));
        }
    }
    let limit = &policy.spec.limit;
    let rps = limit.requests_per_second;
    if !(rps.is_finite() && rps > 0.0) {
        found.push(Violation::error(
            spec.field("limit").field("requestsPerSecond"),
            format!("requestsPerSecond must be a positive number, not {rps}"),
        ));
    } else if rps < MIN_REQUESTS_PER_SECOND && context.stored {
        relaxed.push(Violation::warning(
            spec.field("limit").field("requestsPerSecond"),
            format!(
                "requestsPerSecond {rps:?} is below one request per day (1/86400); stored before such rates were refused, it is enforced as one request per day"
            ),
        ));
    } else if rps < MIN_REQUESTS_PER_SECOND {
        found.push(Violation::error(
            spec.field("limit").field("requestsPerSecond"),
            format!(
                "requestsPerSecond must be at least one request per day (1/86400, about 0.0000116), not {rps:?}"
            ),
        ));
    }
    if !(1..=1_000_000).contains(&limit.burst) {
        found.push(Violation::error(
            spec.field("limit").field("burst"),
            format!("burst must be between 1 and 1000000, not {}", limit.burst),
        ));
    }
    if let Some(matches) = &policy.spec.matches {
        let at = spec.field("match");
        if matches.is_empty() {
            found.push(Violation::error(
                at.clone(),
                "`match` is present but empty: list at least one, or leave it out to limit every request",
            ));
        }
        for (i, m) in matches.iter().enumerate() {
            let at = at.index(i).field("paths");
            if m.paths.is_empty() {
                found.push(Violation::error(at.clone(), "list at least one path"));
            }
            for (j, path) in m.paths.iter().enumerate() {
                check_path_pattern(at.index(j), path, context.stored, &mut found, &mut relaxed);
            }
        }
    }
    if found.has_errors() {
        Err(found)
    } else {
        Ok(relaxed)
    }
}

/// [`validate_rate_limit`] for the mesh of trust domain `td`, as the
/// control plane stores it: names are DNS labels (they key the store as
/// `namespace/name`) and the selector names workloads of this mesh, of the
/// policy's own namespace unless it is in the root namespace
/// ([`SelectorScope`](super::validate::SelectorScope), as for an
/// AuthorizationPolicy).
pub fn validate_rate_limit_in(
    policy: &RateLimitPolicy,
    td: &TrustDomain,
) -> Result<(), Violations> {
    validate_rate_limit_in_with(policy, td, &ValidationContext::default()).map(drop)
}

/// [`validate_rate_limit_in`] under `context`, as
/// [`validate_rate_limit_with`].
pub fn validate_rate_limit_in_with(
    policy: &RateLimitPolicy,
    td: &TrustDomain,
    context: &ValidationContext,
) -> Result<Vec<Violation>, Violations> {
    let (mut found, mut relaxed) = match validate_rate_limit_with(policy, context) {
        Ok(relaxed) => (Violations::default(), relaxed),
        Err(found) => (found, Vec::new()),
    };
    let metadata = FieldPath::root().field("metadata");
    for (field, value) in [
        ("name", &policy.metadata.name),
        ("namespace", &policy.metadata.namespace),
    ] {
        if !value.is_empty() && !is_dns_label(value) {
            found.push(Violation::error(
                metadata.field(field),
                format!("invalid {field} {value:?}: {DNS_LABEL_RULE}"),
            ));
        }
    }
    let at = FieldPath::root()
        .field("spec")
        .field("selector")
        .field("spiffeIds");
    for (i, text) in policy.spec.selector.spiffe_ids.iter().enumerate() {
        let Ok(pattern) = IdPattern::parse(text) else {
            continue;
        };
        if pattern.trust_domain_str() != td.as_str() {
            found.push(Violation::error(
                at.index(i),
                format!(
                    "selects no workload of this mesh: {text:?} is outside trust domain {:?}",
                    td.as_str()
                ),
            ));
        } else if let Some(v) = outside_namespace(
            at.index(i),
            text,
            &pattern,
            &policy.metadata.namespace,
            td,
            context,
        ) {
            push_or_relax(v, &mut found, &mut relaxed);
        }
    }
    if found.has_errors() {
        Err(found)
    } else {
        Ok(relaxed)
    }
}

impl Limit {
    /// The rate a valid limit is enforced at: as written, or
    /// [`MIN_REQUESTS_PER_SECOND`] for a stored one below it.
    pub fn enforced_rate(&self) -> f64 {
        self.requests_per_second.max(MIN_REQUESTS_PER_SECOND)
    }
}

impl RateLimitPolicy {
    /// Whether the limit looks at the request path (it matches paths, or
    /// keys buckets by route): then a path an app could read as another
    /// must be refused before the limit sees it, or it would escape the
    /// limit ([`request_path_problem`](super::l7::request_path_problem)).
    pub fn reads_paths(&self) -> bool {
        let paths = self.spec.matches.iter().flatten().flat_map(|m| &m.paths);
        paths.count() > 0 || self.spec.key != LimitKey::Source
    }

    /// Whether the limit counts (takes a token for) a request to `path`,
    /// without its query: [`counts_path`] on its `match` paths. A stored
    /// path that no longer reads back is taken to match.
    pub fn counts(&self, path: &str) -> bool {
        let texts = self.spec.matches.iter().flatten().flat_map(|m| &m.paths);
        let patterns: Result<Vec<PathPattern>, String> = texts
            .map(|text| PathPattern::parse_stored(text).map(|(p, _)| p))
            .collect();
        patterns.map_or(true, |patterns| counts_path(&patterns, path))
    }

    /// The protobuf form of a valid rate limit.
    pub fn to_proto(&self) -> proto::RateLimit {
        proto::RateLimit {
            name: self.metadata.name.clone(),
            namespace: self.metadata.namespace.clone(),
            selector: Some(proto::Selector {
                spiffe_ids: self.spec.selector.spiffe_ids.clone(),
            }),
            requests_per_second: self.spec.limit.requests_per_second,
            burst: u32::try_from(self.spec.limit.burst).unwrap_or(0),
            key: self.spec.key.as_str().to_owned(),
            matches: self
                .spec
                .matches
                .iter()
                .flatten()
                .map(|m| proto::RateLimitMatch {
                    paths: m.paths.clone(),
                })
                .collect(),
        }
    }

    /// The document a protobuf rate limit stands for; an unknown key fails.
    pub fn from_proto(p: &proto::RateLimit) -> Result<Self, Violation> {
        let key = match p.key.as_str() {
            "" => LimitKey::Source,
            other => LimitKey::parse(other).ok_or_else(|| {
                Violation::error(
                    FieldPath::root().field("spec").field("key"),
                    format!("unknown key {other:?} (expected source, route or source-and-route)"),
                )
            })?,
        };
        Ok(Self {
            api_version: API_VERSION.into(),
            kind: Self::KIND.into(),
            metadata: Metadata {
                name: p.name.clone(),
                namespace: p.namespace.clone(),
            },
            spec: RateLimitSpec {
                selector: Selector {
                    spiffe_ids: p
                        .selector
                        .iter()
                        .flat_map(|s| s.spiffe_ids.clone())
                        .collect(),
                },
                limit: Limit {
                    requests_per_second: p.requests_per_second,
                    burst: i64::from(p.burst),
                },
                key,
                matches: (!p.matches.is_empty()).then(|| {
                    p.matches
                        .iter()
                        .map(|m| LimitMatch {
                            paths: m.paths.clone(),
                        })
                        .collect()
                }),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::validate::SelectorScope;
    use super::*;

    fn sample() -> RateLimitPolicy {
        let yaml = serde_json::json!({
            "apiVersion": API_VERSION,
            "kind": "RateLimitPolicy",
            "metadata": {"name": "api-limit", "namespace": "default"},
            "spec": {
                "selector": {"spiffeIds": ["spiffe://cluster.local/ns/default/sa/api"]},
                "limit": {"requestsPerSecond": 50, "burst": 100},
                "key": "source-and-route",
                "match": [{"paths": ["/search/*"]}]
            }
        });
        serde_json::from_value(yaml).unwrap()
    }

    /// A limit counts the requests its paths take in as apps route them,
    /// other spellings of them too; one naming no path counts every one.
    #[test]
    fn a_limit_counts_the_paths_it_names_as_routed() {
        let limit = sample();
        for path in ["/search/x", "/SEARCH/x/", "/search/x;v=1"] {
            assert!(limit.counts(path), "{path}");
        }
        for path in ["/searching/x", "/other/search/x"] {
            assert!(!limit.counts(path), "{path}");
        }
        let mut every = sample();
        every.spec.matches = None;
        assert!(every.counts("/other/x"));
    }

    #[test]
    fn accepts_the_issue_example_and_round_trips_through_protobuf() {
        let p = sample();
        validate_rate_limit(&p).unwrap();
        assert_eq!(RateLimitPolicy::from_proto(&p.to_proto()).unwrap(), p);
    }

    #[test]
    fn in_a_mesh_names_are_labels_and_the_selector_is_in_the_trust_domain() {
        let td = TrustDomain::new("cluster.local").unwrap();
        validate_rate_limit_in(&sample(), &td).unwrap();
        let mut p = sample();
        p.metadata.name = "api/limit".into();
        p.spec.selector.spiffe_ids = vec!["spiffe://other.org/ns/default/sa/api".into()];
        let errors: Vec<String> = validate_rate_limit_in(&p, &td)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].starts_with("metadata.name: invalid name \"api/limit\""));
        assert!(
            errors[1].starts_with("spec.selector.spiffeIds[0]: selects no workload of this mesh")
        );
    }

    #[test]
    fn a_rate_limit_selects_workloads_of_its_own_namespace_unless_in_the_root() {
        let td = TrustDomain::new("cluster.local").unwrap();
        let mut p = sample();
        p.spec.selector.spiffe_ids = vec!["spiffe://cluster.local/ns/default/*".into()];
        validate_rate_limit_in(&p, &td).unwrap();
        p.spec.selector.spiffe_ids = vec!["spiffe://cluster.local/ns/payments/sa/db".into()];
        let errors: Vec<String> = validate_rate_limit_in(&p, &td)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].starts_with(
                "spec.selector.spiffeIds[0]: \"spiffe://cluster.local/ns/payments/sa/db\" selects workloads outside the policy's namespace \"default\""
            ),
            "{errors:?}"
        );
        let root = ValidationContext {
            scope: SelectorScope::root("default"),
            ..ValidationContext::default()
        };
        p.spec.selector.spiffe_ids = vec!["spiffe://cluster.local/*".into()];
        assert_eq!(validate_rate_limit_in_with(&p, &td, &root).unwrap(), []);
        let stored = ValidationContext {
            stored: true,
            ..ValidationContext::default()
        };
        let relaxed = validate_rate_limit_in_with(&p, &td, &stored).unwrap();
        assert_eq!(relaxed.len(), 1);
        assert!(relaxed[0].message.contains("still enforced as written"));
    }

    #[test]
    fn rejects_non_positive_limits_and_bad_paths() {
        let mut p = sample();
        p.spec.limit.requests_per_second = 0.0;
        p.spec.limit.burst = 0;
        p.spec.matches = Some(vec![LimitMatch {
            paths: vec!["search".into()],
        }]);
        let errors: Vec<String> = validate_rate_limit(&p)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            errors,
            [
                "spec.limit.requestsPerSecond: requestsPerSecond must be a positive number, not 0",
                "spec.limit.burst: burst must be between 1 and 1000000, not 0",
                "spec.match[0].paths[0]: path \"search\" must start with '/'",
            ]
        );
    }
}
