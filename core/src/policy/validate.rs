//! The one validation of authorization policies, shared by the Admin API,
//! `trellisctl policy lint`, the admission webhook and the sidecar (NACK).
//!
//! This module owns every rule about what a valid policy is and reports each
//! broken rule as a [`Violation`] at a field path. It never reads files or
//! knows line numbers (`lint` maps paths to lines), and it never decides
//! connections (`engine` does, only from policies that passed here).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::ops::Deref;

use super::document::{API_VERSION, AuthorizationPolicy, Destination, Metadata, Rule, Source};
use super::l7::{self, PathPattern};
use super::path::FieldPath;
use super::pattern::{DNS_LABEL_RULE, IdPattern, is_dns_label};
use crate::spiffe::TrustDomain;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// The policy is rejected.
    Error,
    /// The policy is accepted, but probably not what was meant.
    Warning,
}

/// One broken rule, at the field that breaks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub path: FieldPath,
    pub message: String,
    pub severity: Severity,
    /// Points at the key rather than the value (unknown fields).
    pub at_key: bool,
}

impl Violation {
    pub fn error(path: FieldPath, message: impl Into<String>) -> Self {
        Self {
            path,
            message: message.into(),
            severity: Severity::Error,
            at_key: false,
        }
    }

    pub fn warning(path: FieldPath, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Warning,
            ..Self::error(path, message)
        }
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.severity == Severity::Warning {
            f.write_str("warning: ")?;
        }
        if !self.path.is_root() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// The most problems one check keeps, and so the most that `trellisctl
/// policy lint` prints and the admission webhook lists; the rest are only
/// counted. Past that many a file is usually one mistake repeated, and a
/// message kept for every few bytes of a hostile file would take a hundred
/// times its size in memory or more.
pub const MAX_DIAGNOSTICS: usize = 1_000;

/// How many problems were found past the [`MAX_DIAGNOSTICS`] kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Omitted {
    pub errors: usize,
    pub warnings: usize,
}

impl Omitted {
    pub fn total(self) -> usize {
        self.errors + self.warnings
    }

    pub(crate) fn count(&mut self, severity: Severity) {
        match severity {
            Severity::Error => self.errors += 1,
            Severity::Warning => self.warnings += 1,
        }
    }

    pub(crate) fn add(&mut self, other: Omitted) {
        self.errors += other.errors;
        self.warnings += other.warnings;
    }
}

/// The violations one check found: at most [`MAX_DIAGNOSTICS`] of them,
/// in the order found, and how many more there were. Errors are kept
/// before warnings (an error found once the list is full takes the place
/// of the last warning), so a refused policy always shows an error. Reads
/// as the slice of the kept ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Violations {
    kept: Vec<Violation>,
    /// How many of `kept` are warnings, so a full list of errors is not
    /// searched for one with every further error.
    kept_warnings: usize,
    omitted: Omitted,
}

impl Violations {
    /// Keeps `violation` while there is room, else counts it (or the
    /// warning it displaces).
    pub fn push(&mut self, violation: Violation) {
        if self.kept.len() < MAX_DIAGNOSTICS {
            self.keep(violation);
        } else if violation.is_error() && self.kept_warnings > 0 {
            let last = self.kept.iter().rposition(|v| !v.is_error());
            let warning = self.kept.remove(last.expect("a warning is kept"));
            self.kept_warnings -= 1;
            self.omitted.count(warning.severity);
            self.keep(violation);
        } else {
            self.omitted.count(violation.severity);
        }
    }

    fn keep(&mut self, violation: Violation) {
        if !violation.is_error() {
            self.kept_warnings += 1;
        }
        self.kept.push(violation);
    }

    /// Whether any violation, kept or not, is an error.
    pub fn has_errors(&self) -> bool {
        self.kept.len() > self.kept_warnings || self.omitted.errors > 0
    }

    /// How many were found but not kept.
    pub fn omitted(&self) -> Omitted {
        self.omitted
    }

    /// Keeps only the first `n` warnings (counting the rest); errors stay.
    pub(crate) fn keep_warnings(&mut self, n: usize) {
        if self.kept_warnings <= n {
            return;
        }
        let mut seen = 0;
        self.kept.retain(|v| {
            if v.is_error() {
                return true;
            }
            seen += 1;
            seen <= n
        });
        self.omitted.warnings += self.kept_warnings - n;
        self.kept_warnings = n;
    }

    pub fn into_vec(self) -> Vec<Violation> {
        self.kept
    }
}

impl Deref for Violations {
    type Target = [Violation];

    fn deref(&self) -> &[Violation] {
        &self.kept
    }
}

impl From<Violation> for Violations {
    fn from(violation: Violation) -> Self {
        let mut violations = Self::default();
        violations.push(violation);
        violations
    }
}

impl IntoIterator for Violations {
    type Item = Violation;
    type IntoIter = std::vec::IntoIter<Violation>;

    fn into_iter(self) -> Self::IntoIter {
        self.kept.into_iter()
    }
}

impl<'a> IntoIterator for &'a Violations {
    type Item = &'a Violation;
    type IntoIter = std::slice::Iter<'a, Violation>;

    fn into_iter(self) -> Self::IntoIter {
        self.kept.iter()
    }
}

/// An authorization policy that passed [`validate`], with its warnings.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidPolicy {
    policy: AuthorizationPolicy,
    warnings: Violations,
    relaxed: Vec<Violation>,
}

impl ValidPolicy {
    pub fn policy(&self) -> &AuthorizationPolicy {
        &self.policy
    }

    pub fn into_policy(self) -> AuthorizationPolicy {
        self.policy
    }

    /// The warnings kept (at most [`MAX_DIAGNOSTICS`]).
    pub fn warnings(&self) -> &[Violation] {
        &self.warnings
    }

    /// How many warnings were found past those kept.
    pub fn omitted_warnings(&self) -> usize {
        self.warnings.omitted().warnings
    }

    /// Keeps only the first `n` warnings, counting the rest: many valid
    /// policies must not keep [`MAX_DIAGNOSTICS`] warnings each.
    pub(crate) fn keep_warnings(&mut self, n: usize) {
        self.warnings.keep_warnings(n);
    }

    /// What a stored policy fails of the checks added since it could have
    /// been stored, and how it is enforced instead (warnings; only with
    /// [`ValidationContext::stored`]).
    pub fn relaxed(&self) -> &[Violation] {
        &self.relaxed
    }

    /// `namespace/name`, unique in a mesh.
    pub fn key(&self) -> String {
        policy_key(&self.policy.metadata.namespace, &self.policy.metadata.name)
    }
}

/// `namespace/name`, how decisions, logs and metrics name a policy.
pub fn policy_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// The root namespace when none is configured: its policies may select any
/// workload of the mesh. In Kubernetes the chart passes the control
/// plane's own namespace instead.
pub const DEFAULT_ROOT_NAMESPACE: &str = "trellis-system";

/// Which workloads a policy may select, by the namespace it is in.
///
/// Namespaced RBAC is how a cluster hands out policy authoring: whoever
/// may write policies in `team-a` must not thereby govern the workloads of
/// `payments` (an ALLOW opening them) or of the whole mesh (a DENY, which
/// wins, shutting it). So a policy selects only workloads of its own
/// namespace; mesh-wide policies live in the root namespace. The callers
/// in a selector's `from` are not scoped: naming who may call is what a
/// namespace decides for its own workloads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SelectorScope {
    /// Every `selector.spiffeIds` pattern lies under
    /// `spiffe://<td>/ns/<metadata.namespace>/`, except in the namespace
    /// `root`, whose policies may select any workload of the trust domain.
    Namespace { root: String },
    /// Not checked here. Only for whoever enforces what the control plane
    /// serves (a sidecar, `explain`): the control plane checks the scope
    /// when a policy is written and when it starts, and a sidecar does not
    /// know the root namespace.
    Unchecked,
}

impl SelectorScope {
    /// Scoped to their namespace, with `root` as the root namespace.
    pub fn root(root: impl Into<String>) -> Self {
        Self::Namespace { root: root.into() }
    }
}

impl Default for SelectorScope {
    fn default() -> Self {
        Self::root(DEFAULT_ROOT_NAMESPACE)
    }
}

/// What validation knows about where a policy is enforced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ValidationContext {
    /// Ports declared opaque (mesh-wide or on the sidecar): never parsed as
    /// HTTP, so L7 matches on them could not be enforced and are refused.
    pub opaque_ports: Vec<u16>,
    /// The documents come from storage or a snapshot (the sidecar, the
    /// Kubernetes reflector, the control plane's start-up check), not from
    /// an operator applying them now. A document valid when it was stored
    /// must not break enforcement once a check gets stricter: a path
    /// pattern that could never match as written matches nothing (requests
    /// with such a path are refused anyway), and a rate limit below the
    /// minimum is enforced at the minimum. Each such relaxation is a
    /// warning in [`ValidPolicy::relaxed`]; applying the document again is
    /// still refused. A selector outside the policy's namespace (see
    /// [`SelectorScope`]) is enforced as written, with a warning naming the
    /// pattern: refusing it would drop rules a mesh relies on at an
    /// upgrade, without its operators having been told.
    pub stored: bool,
    /// Which workloads a policy of a namespace may select.
    pub scope: SelectorScope,
}

/// Checks one policy for the mesh of trust domain `td`. Errors reject it;
/// warnings come back in the `Err` with the errors, or in the [`ValidPolicy`].
pub fn validate(policy: &AuthorizationPolicy, td: &TrustDomain) -> Result<ValidPolicy, Violations> {
    validate_in(policy, td, &ValidationContext::default())
}

/// [`validate`], knowing the opaque ports of `context`.
pub fn validate_in(
    policy: &AuthorizationPolicy,
    td: &TrustDomain,
    context: &ValidationContext,
) -> Result<ValidPolicy, Violations> {
    let mut check = Check {
        td,
        context,
        found: Violations::default(),
        relaxed: Vec::new(),
    };
    check.policy(policy);
    if check.found.has_errors() {
        return Err(check.found);
    }
    Ok(ValidPolicy {
        policy: policy.clone(),
        warnings: check.found,
        relaxed: check.relaxed,
    })
}

/// Checks the path pattern `text` at `at`: errors and relaxations (see
/// [`ValidationContext::stored`]) go to `found` and `relaxed`.
pub(crate) fn check_path_pattern(
    at: FieldPath,
    text: &str,
    stored: bool,
    found: &mut Violations,
    relaxed: &mut Vec<Violation>,
) {
    match PathPattern::parse_stored(text) {
        Err(e) => found.push(Violation::error(at, e)),
        Ok((_, Some(never))) if stored => relaxed.push(Violation::warning(
            at,
            format!("{never}; stored before such patterns were refused, it matches nothing"),
        )),
        Ok((_, Some(never))) => found.push(Violation::error(at, never)),
        Ok((_, None)) => {}
    }
}

/// Whether the selector pattern `text` (parsed: `pattern`, in trust domain
/// `td`) at `at` of a policy in `namespace` selects workloads that
/// namespace may not govern ([`SelectorScope`]): an error, or for a stored
/// policy the warning of its relaxation (see [`ValidationContext::stored`]),
/// naming the pattern, the namespace and the root namespace.
pub(crate) fn outside_namespace(
    at: FieldPath,
    text: &str,
    pattern: &IdPattern,
    namespace: &str,
    td: &TrustDomain,
    context: &ValidationContext,
) -> Option<Violation> {
    let SelectorScope::Namespace { root } = &context.scope else {
        return None;
    };
    // An invalid namespace is an error of its own; nothing lies under it.
    if namespace == root || !is_dns_label(namespace) {
        return None;
    }
    let own = format!("spiffe://{td}/ns/{namespace}/");
    if pattern.within(&own) {
        return None;
    }
    // Short enough that the Admin API's refusal, which cuts each error to
    // 256 bytes, keeps the advice of a usual pattern.
    let outside =
        format!("{text:?} selects workloads outside the policy's namespace {namespace:?}");
    let advice =
        format!("narrow it to \"{own}...\" or move the policy to the root namespace {root:?}");
    Some(if context.stored {
        Violation::warning(
            at,
            format!(
                "{outside}, stored before that was refused: it is still enforced as written; {advice}"
            ),
        )
    } else {
        Violation::error(at, format!("{outside}: {advice}"))
    })
}

/// Adds `violation` to `found` if it is an error, else (a relaxation of a
/// stored document) to `relaxed`.
pub(crate) fn push_or_relax(
    violation: Violation,
    found: &mut Violations,
    relaxed: &mut Vec<Violation>,
) {
    if violation.is_error() {
        found.push(violation);
    } else {
        relaxed.push(violation);
    }
}

/// Documents named like an earlier one in `documents` (their metadata), as
/// `(index of the duplicate, index of the first)`.
pub fn duplicate_names<'a>(
    documents: impl IntoIterator<Item = &'a Metadata>,
) -> Vec<(usize, usize)> {
    let mut first = HashMap::new();
    let mut duplicates = Vec::new();
    for (i, metadata) in documents.into_iter().enumerate() {
        let key = (&metadata.namespace, &metadata.name);
        match first.get(&key) {
            Some(&j) => duplicates.push((i, j)),
            None => {
                first.insert(key, i);
            }
        }
    }
    duplicates
}

struct Check<'a> {
    td: &'a TrustDomain,
    context: &'a ValidationContext,
    found: Violations,
    relaxed: Vec<Violation>,
}

impl Check<'_> {
    fn error(&mut self, path: FieldPath, message: impl Into<String>) {
        self.found.push(Violation::error(path, message));
    }

    fn warning(&mut self, path: FieldPath, message: impl Into<String>) {
        self.found.push(Violation::warning(path, message));
    }

    fn policy(&mut self, policy: &AuthorizationPolicy) {
        let root = FieldPath::root();
        if policy.api_version != API_VERSION {
            self.error(
                root.field("apiVersion"),
                format!(
                    "unsupported apiVersion {:?} (expected {API_VERSION:?})",
                    policy.api_version
                ),
            );
        }
        if policy.kind != AuthorizationPolicy::KIND {
            self.error(
                root.field("kind"),
                format!(
                    "kind must be {:?}, not {:?}",
                    AuthorizationPolicy::KIND,
                    policy.kind
                ),
            );
        }
        let metadata = root.field("metadata");
        self.label(metadata.field("name"), "name", &policy.metadata.name);
        self.label(
            metadata.field("namespace"),
            "namespace",
            &policy.metadata.namespace,
        );

        let spec = root.field("spec");
        self.selector(
            spec.field("selector").field("spiffeIds"),
            &policy.spec.selector.spiffe_ids,
            &policy.metadata.namespace,
        );
        let rules = spec.field("rules");
        if policy.spec.rules.is_empty() {
            self.error(
                rules.clone(),
                "a policy needs at least one rule: without rules it never matches",
            );
        }
        for (i, rule) in policy.spec.rules.iter().enumerate() {
            self.rule(rules.index(i), rule);
        }
    }

    fn label(&mut self, path: FieldPath, what: &str, value: &str) {
        if value.is_empty() {
            self.error(path, format!("{what} is required"));
        } else if !is_dns_label(value) {
            self.error(path, format!("invalid {what} {value:?}: {DNS_LABEL_RULE}"));
        }
    }

    fn selector(&mut self, path: FieldPath, ids: &[String], namespace: &str) {
        if ids.is_empty() {
            self.error(
                path,
                "the selector must name at least one workload (spiffeIds)",
            );
            return;
        }
        // Sets, not a scan of the earlier entries: a list of many would
        // take quadratic time.
        let mut seen = HashSet::new();
        for (i, text) in ids.iter().enumerate() {
            let path = path.index(i);
            if !seen.insert(text) {
                self.warning(path, format!("{text:?} is listed twice"));
                continue;
            }
            match IdPattern::parse(text) {
                Err(e) => self.error(path, e.to_string()),
                Ok(pattern) if pattern.trust_domain_str() != self.td.as_str() => self.error(
                    path,
                    format!(
                        "selects no workload of this mesh: {text:?} is outside trust domain {:?}",
                        self.td.as_str()
                    ),
                ),
                Ok(pattern) => {
                    let context = self.context;
                    if let Some(v) =
                        outside_namespace(path, text, &pattern, namespace, self.td, context)
                    {
                        push_or_relax(v, &mut self.found, &mut self.relaxed);
                    }
                }
            }
        }
    }

    fn rule(&mut self, path: FieldPath, rule: &Rule) {
        if let Some(sources) = &rule.from {
            let from = path.field("from");
            if sources.is_empty() {
                self.error(
                    from.clone(),
                    "`from` is present but empty: name at least one source, or leave `from` out to match any source",
                );
            }
            let mut seen = HashSet::new();
            for (i, source) in sources.iter().enumerate() {
                if !seen.insert(source) {
                    self.warning(from.index(i), "this source is listed twice");
                    continue;
                }
                self.source(from.index(i), source);
            }
        }
        if let Some(destinations) = &rule.to {
            let to = path.field("to");
            if destinations.is_empty() {
                self.error(
                    to.clone(),
                    "`to` is present but empty: name at least one destination, or leave `to` out to match any port",
                );
            }
            for (i, destination) in destinations.iter().enumerate() {
                self.destination(to.index(i), destination);
            }
        }
    }

    fn destination(&mut self, path: FieldPath, d: &Destination) {
        if d.ports.is_none() && !d.has_l7() {
            self.error(
                path.clone(),
                "a destination must name ports or L7 matches (methods, paths, headers, grpc): an entry that matches nothing in particular is ambiguous; leave `to` out to match any port",
            );
        }
        if let Some(ports) = &d.ports {
            self.ports(path.field("ports"), ports);
        }
        if let Some(methods) = &d.methods {
            let at = path.field("methods");
            self.non_empty(&at, methods.is_empty(), "methods");
            for (i, method) in methods.iter().enumerate() {
                if let Err(e) = l7::check_method(method) {
                    self.error(at.index(i), e);
                }
            }
        }
        if let Some(paths) = &d.paths {
            let at = path.field("paths");
            self.non_empty(&at, paths.is_empty(), "paths");
            for (i, text) in paths.iter().enumerate() {
                let (found, relaxed) = (&mut self.found, &mut self.relaxed);
                check_path_pattern(at.index(i), text, self.context.stored, found, relaxed);
            }
        }
        if let Some(headers) = &d.headers {
            let at = path.field("headers");
            self.non_empty(&at, headers.is_empty(), "headers");
            for (name, value) in headers {
                if !l7::is_token(name) {
                    self.error(
                        at.field(name.clone()),
                        format!("{name:?} is not a valid header name"),
                    );
                } else if value.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
                    self.error(
                        at.field(name.clone()),
                        "a header value must not contain control characters",
                    );
                }
            }
        }
        if let Some(grpc) = &d.grpc {
            let at = path.field("grpc");
            if d.methods.is_some() || d.paths.is_some() {
                self.error(
                    at.clone(),
                    "grpc cannot be combined with methods or paths in one entry (a gRPC call is POST /<service>/<method>); use separate entries",
                );
            }
            if !l7::check_grpc_name(&grpc.service, true) {
                self.error(
                    at.field("service"),
                    format!(
                        "{:?} is not a gRPC service name like package.Service",
                        grpc.service
                    ),
                );
            }
            if let Some(method) = &grpc.method
                && !l7::check_grpc_name(method, false)
            {
                self.error(
                    at.field("method"),
                    format!("{method:?} is not a gRPC method name"),
                );
            }
        }
        let context = self.context;
        let opaque = &context.opaque_ports;
        // An entry naming no ports fails closed on the opaque ones: lint
        // warns of it, knowing the rule's action.
        if d.has_l7()
            && let Some(ports) = &d.ports
        {
            for (i, port) in ports.iter().enumerate() {
                if u16::try_from(*port).is_ok_and(|p| opaque.contains(&p)) {
                    self.error(
                        path.field("ports").index(i),
                        format!("port {port} is declared opaque: its traffic is never parsed as HTTP, so methods, paths, headers and grpc cannot be enforced on it"),
                    );
                }
            }
        }
    }

    fn non_empty(&mut self, at: &FieldPath, empty: bool, what: &str) {
        if empty {
            self.error(
                at.clone(),
                format!("`{what}` is present but empty: list at least one, or leave it out"),
            );
        }
    }

    fn source(&mut self, path: FieldPath, source: &Source) {
        let set: Vec<&str> = [
            ("spiffeId", source.spiffe_id.is_some()),
            ("namespace", source.namespace.is_some()),
            ("trustDomain", source.trust_domain.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, set)| set.then_some(name))
        .collect();
        if set.len() != 1 {
            let found = if set.is_empty() {
                "none".to_owned()
            } else {
                set.join(", ")
            };
            self.error(
                path,
                format!("a source sets exactly one of spiffeId, namespace or trustDomain (found: {found})"),
            );
            return;
        }
        let td = self.td.as_str();
        if let Some(text) = &source.spiffe_id {
            let path = path.field("spiffeId");
            match IdPattern::parse(text) {
                Err(e) => self.error(path, e.to_string()),
                Ok(p) if p.trust_domain_str() != td => self.error(
                    path,
                    format!("can never match: {text:?} is outside the mesh's trust domain {td:?}"),
                ),
                Ok(_) => {}
            }
        }
        if let Some(namespace) = &source.namespace {
            self.label(path.field("namespace"), "namespace", namespace);
        }
        if let Some(text) = &source.trust_domain {
            let path = path.field("trustDomain");
            match TrustDomain::new(text) {
                Err(e) => self.error(path, format!("invalid trust domain {text:?}: {e}")),
                Ok(other) if other != *self.td => self.error(
                    path,
                    format!("can never match: only identities of the mesh's trust domain {td:?} can connect"),
                ),
                Ok(_) => {}
            }
        }
    }

    fn ports(&mut self, path: FieldPath, ports: &[i64]) {
        if ports.is_empty() {
            self.error(
                path,
                "`ports` is present but empty: list at least one port, or leave `to` out to match any port",
            );
            return;
        }
        let mut seen = HashSet::new();
        for (i, &port) in ports.iter().enumerate() {
            if !(1..=65535).contains(&port) {
                self.error(
                    path.index(i),
                    format!("port {port} is out of range 1..=65535"),
                );
            } else if !seen.insert(port) {
                self.warning(path.index(i), format!("port {port} is listed twice"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::document::{
        Action, AuthorizationPolicySpec, Destination, Metadata, Selector,
    };
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    fn policy(rules: Vec<Rule>) -> AuthorizationPolicy {
        AuthorizationPolicy {
            api_version: API_VERSION.into(),
            kind: AuthorizationPolicy::KIND.into(),
            metadata: Metadata {
                name: "web-to-api".into(),
                namespace: "default".into(),
            },
            spec: AuthorizationPolicySpec {
                selector: Selector {
                    spiffe_ids: vec!["spiffe://cluster.local/ns/default/sa/api".into()],
                },
                action: Action::Allow,
                rules,
            },
        }
    }

    fn errors(policy: &AuthorizationPolicy) -> Vec<String> {
        validate(policy, &td())
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    fn from(source: Source) -> Rule {
        Rule {
            from: Some(vec![source]),
            to: None,
        }
    }

    #[test]
    fn accepts_a_plain_policy() {
        let valid = validate(&policy(vec![Rule::default()]), &td()).unwrap();
        assert_eq!(valid.key(), "default/web-to-api");
        assert!(valid.warnings().is_empty());
    }

    #[test]
    fn rejects_sources_in_another_trust_domain() {
        let p = policy(vec![from(Source {
            spiffe_id: Some("spiffe://other.org/ns/a/sa/b".into()),
            ..Source::default()
        })]);
        assert_eq!(
            errors(&p),
            [
                "spec.rules[0].from[0].spiffeId: can never match: \"spiffe://other.org/ns/a/sa/b\" is outside the mesh's trust domain \"cluster.local\""
            ]
        );
    }

    #[test]
    fn a_source_sets_exactly_one_field() {
        let p = policy(vec![from(Source {
            spiffe_id: Some("spiffe://cluster.local/ns/a/sa/b".into()),
            namespace: Some("a".into()),
            trust_domain: None,
        })]);
        assert_eq!(
            errors(&p),
            [
                "spec.rules[0].from[0]: a source sets exactly one of spiffeId, namespace or trustDomain (found: spiffeId, namespace)"
            ]
        );
    }

    #[test]
    fn duplicate_ports_are_only_a_warning() {
        let p = policy(vec![Rule {
            from: None,
            to: Some(vec![Destination {
                ports: Some(vec![8080, 8080]),
                ..Destination::default()
            }]),
        }]);
        let valid = validate(&p, &td()).unwrap();
        assert_eq!(
            valid.warnings()[0].to_string(),
            "warning: spec.rules[0].to[0].ports[1]: port 8080 is listed twice"
        );
    }

    /// Past the cap an error takes the place of the last warning kept: a
    /// refusal must show what refuses it.
    #[test]
    fn violations_past_the_cap_are_counted_and_errors_displace_warnings() {
        let at = |i| FieldPath::root().field("spec").index(i);
        let mut found = Violations::default();
        for i in 0..MAX_DIAGNOSTICS + 5 {
            found.push(Violation::warning(at(i), "w"));
        }
        assert!(!found.has_errors());
        found.push(Violation::error(at(0), "e"));
        assert!(found.has_errors());
        assert_eq!(found.len(), MAX_DIAGNOSTICS);
        assert_eq!(found.last().map(|v| v.message.as_str()), Some("e"));
        assert_eq!(found[MAX_DIAGNOSTICS - 2].path, at(MAX_DIAGNOSTICS - 2));
        assert_eq!(
            found.omitted(),
            Omitted {
                errors: 0,
                warnings: 6
            }
        );
        for _ in 0..MAX_DIAGNOSTICS {
            found.push(Violation::error(at(1), "e"));
        }
        assert!(found.iter().all(Violation::is_error));
        assert_eq!(
            found.omitted(),
            Omitted {
                errors: 1,
                warnings: MAX_DIAGNOSTICS + 5
            }
        );
    }

    /// Entries listed twice are found in one lookup each, not by scanning
    /// the earlier ones: lists of a 2 MB file took minutes.
    #[test]
    fn long_lists_are_checked_for_repeats_in_linear_time() {
        let sources = (0..100_000)
            .map(|i| Source {
                namespace: Some(format!("ns{i}")),
                ..Source::default()
            })
            .collect();
        let ports = (0..200_000).map(|i| 1 + i % 65_535).collect();
        let mut p = policy(vec![Rule {
            from: Some(sources),
            to: Some(vec![Destination {
                ports: Some(ports),
                ..Destination::default()
            }]),
        }]);
        p.spec.selector.spiffe_ids = (0..100_000)
            .map(|i| format!("spiffe://cluster.local/ns/default/sa/s{i}"))
            .collect();
        let valid = validate(&p, &td()).unwrap();
        assert_eq!(valid.warnings().len(), MAX_DIAGNOSTICS);
        assert_eq!(
            valid.warnings()[0].to_string(),
            "warning: spec.rules[0].to[0].ports[65535]: port 1 is listed twice"
        );
        assert_eq!(valid.omitted_warnings(), 200_000 - 65_535 - MAX_DIAGNOSTICS);
    }

    fn selecting(namespace: &str, selector: &str) -> AuthorizationPolicy {
        let mut p = policy(vec![Rule::default()]);
        p.metadata.namespace = namespace.into();
        p.spec.selector.spiffe_ids = vec![selector.into()];
        p
    }

    fn in_root(root: &str, stored: bool) -> ValidationContext {
        ValidationContext {
            stored,
            scope: SelectorScope::root(root),
            ..ValidationContext::default()
        }
    }

    #[test]
    fn a_policy_selects_workloads_of_its_own_namespace() {
        for own in [
            "spiffe://cluster.local/ns/team-a/sa/web",
            "spiffe://cluster.local/ns/team-a/*",
            "spiffe://cluster.local/ns/team-a/sa/*",
        ] {
            let valid = validate(&selecting("team-a", own), &td()).unwrap();
            assert!(valid.warnings().is_empty(), "{own}");
        }
    }

    #[test]
    fn a_policy_cannot_select_workloads_of_another_namespace() {
        let p = selecting("team-a", "spiffe://cluster.local/ns/payments/sa/db");
        assert_eq!(
            errors(&p),
            [
                "spec.selector.spiffeIds[0]: \"spiffe://cluster.local/ns/payments/sa/db\" selects workloads outside the policy's namespace \"team-a\": narrow it to \"spiffe://cluster.local/ns/team-a/...\" or move the policy to the root namespace \"trellis-system\""
            ]
        );
        // A namespace whose name starts like the policy's is another one.
        for other in [
            "spiffe://cluster.local/ns/team-ab/sa/web",
            "spiffe://cluster.local/ns/team-ab/*",
            "spiffe://cluster.local/ns/*",
            "spiffe://cluster.local/ns/team-a",
            "spiffe://cluster.local/trellis/admin",
        ] {
            let errors = errors(&selecting("team-a", other));
            assert_eq!(errors.len(), 1, "{other}: {errors:?}");
            assert!(
                errors[0].contains("outside the policy's namespace \"team-a\""),
                "{other}: {errors:?}"
            );
        }
    }

    #[test]
    fn only_the_root_namespace_selects_the_whole_mesh() {
        let everything = "spiffe://cluster.local/*";
        let refused = validate_in(
            &selecting("team-a", everything),
            &td(),
            &in_root("mesh", false),
        )
        .unwrap_err();
        assert_eq!(refused.len(), 1);
        assert!(
            refused[0].message.starts_with(
                "\"spiffe://cluster.local/*\" selects workloads outside the policy's namespace \"team-a\""
            ) && refused[0]
                .message
                .ends_with("or move the policy to the root namespace \"mesh\""),
            "{}",
            refused[0]
        );
        for selector in [everything, "spiffe://cluster.local/ns/payments/sa/db"] {
            let valid =
                validate_in(&selecting("mesh", selector), &td(), &in_root("mesh", false)).unwrap();
            assert!(valid.warnings().is_empty() && valid.relaxed().is_empty());
        }
        // The default root namespace, when none is configured.
        validate(&selecting(DEFAULT_ROOT_NAMESPACE, everything), &td()).unwrap();
    }

    #[test]
    fn sources_in_other_namespaces_stay_allowed() {
        let mut p = selecting("team-a", "spiffe://cluster.local/ns/team-a/sa/api");
        p.spec.rules = vec![
            from(Source {
                spiffe_id: Some("spiffe://cluster.local/ns/payments/sa/db".into()),
                ..Source::default()
            }),
            from(Source {
                namespace: Some("payments".into()),
                ..Source::default()
            }),
            from(Source {
                spiffe_id: Some("spiffe://cluster.local/*".into()),
                ..Source::default()
            }),
        ];
        let valid = validate(&p, &td()).unwrap();
        assert!(valid.warnings().is_empty());
    }

    /// A policy stored before the scope was checked keeps being enforced as
    /// written, reported; writing it again is refused.
    #[test]
    fn a_stored_policy_outside_its_namespace_is_enforced_with_a_warning() {
        let p = selecting("team-a", "spiffe://cluster.local/*");
        let valid = validate_in(&p, &td(), &in_root("mesh", true)).unwrap();
        assert!(valid.warnings().is_empty());
        let relaxed: Vec<String> = valid.relaxed().iter().map(ToString::to_string).collect();
        assert_eq!(relaxed.len(), 1);
        assert!(
            relaxed[0].starts_with(
                "warning: spec.selector.spiffeIds[0]: \"spiffe://cluster.local/*\" selects workloads outside the policy's namespace \"team-a\""
            ) && relaxed[0].contains("still enforced as written")
                && relaxed[0].ends_with("move the policy to the root namespace \"mesh\""),
            "{relaxed:?}"
        );
        assert_eq!(valid.policy().spec.selector, p.spec.selector);
        validate_in(&p, &td(), &in_root("mesh", false)).unwrap_err();
    }

    /// What enforces served policies (a sidecar) does not know the root
    /// namespace and leaves the scope to the control plane.
    #[test]
    fn an_unchecked_scope_accepts_any_selector_of_the_trust_domain() {
        let context = ValidationContext {
            scope: SelectorScope::Unchecked,
            ..ValidationContext::default()
        };
        let p = selecting("team-a", "spiffe://cluster.local/*");
        let valid = validate_in(&p, &td(), &context).unwrap();
        assert!(valid.warnings().is_empty() && valid.relaxed().is_empty());
    }

    #[test]
    fn finds_duplicate_names() {
        let a = policy(vec![Rule::default()]);
        let mut b = a.clone();
        b.metadata.name = "other".into();
        assert_eq!(
            duplicate_names([&a.metadata, &b.metadata, &a.metadata]),
            [(2, 0)]
        );
    }
}
