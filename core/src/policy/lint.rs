//! Policy files: reading, validating and reporting at `file:line:column`.
//!
//! This module owns turning files into validated policies and every problem
//! into a [`Diagnostic`] at a line: YAML syntax, unknown fields and wrong
//! types (from serde's field path), and each [`Violation`] of `validate`,
//! its field path mapped back to the node that holds it. It is what
//! `trellisctl policy lint` and `policy apply -f` run; it never talks to a
//! control plane.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use super::document::{Action, AuthorizationPolicy, Document};
use super::path::FieldPath;
use super::ratelimit::{RateLimitPolicy, validate_rate_limit_in};
use super::source::{Node, Pos, parse_stream};
use super::validate::{
    Severity, ValidPolicy, ValidationContext, Violation, duplicate_names, policy_key, validate_in,
};
use crate::spiffe::TrustDomain;

/// One problem in one file. `line` and `column` are 1-based; both are 0 when
/// the problem is the file itself (it cannot be read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub severity: Severity,
    pub path: FieldPath,
    pub message: String,
}

impl Diagnostic {
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    fn at(file: &str, pos: Pos, violation: Violation) -> Self {
        Self {
            file: file.to_owned(),
            line: pos.line,
            column: pos.column,
            severity: violation.severity,
            path: violation.path,
            message: violation.message,
        }
    }
}

/// `file:line:column: [warning: ]path: message`, as compilers print.
impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        f.write_str(": ")?;
        if self.severity == Severity::Warning {
            f.write_str("warning: ")?;
        }
        if !self.path.is_root() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// Whether any diagnostic is an error (lint exits non-zero, apply refuses).
pub fn has_errors(diagnostics: &[Diagnostic]) -> bool {
    diagnostics.iter().any(Diagnostic::is_error)
}

/// A validated policy and where its document starts.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedPolicy {
    pub policy: ValidPolicy,
    pub file: String,
    pub line: usize,
}

/// What reading some policy files gave: the valid policies and every
/// diagnostic (errors and warnings), ordered by file, line and column.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Loaded {
    pub policies: Vec<LoadedPolicy>,
    /// The valid `RateLimitPolicy` documents.
    pub rate_limits: Vec<LoadedRateLimit>,
    pub diagnostics: Vec<Diagnostic>,
}

/// A valid `RateLimitPolicy` and where it was read.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedRateLimit {
    pub policy: RateLimitPolicy,
    pub file: String,
    pub line: usize,
}

impl Loaded {
    pub fn has_errors(&self) -> bool {
        has_errors(&self.diagnostics)
    }
}

/// Checks the documents of one text named `name` (a file name in messages).
pub fn lint_source(name: &str, text: &str, td: &TrustDomain) -> Vec<Diagnostic> {
    load_source(name, text, td).diagnostics
}

/// Reads and validates the documents of one text; duplicate names within it
/// are errors.
pub fn load_source(name: &str, text: &str, td: &TrustDomain) -> Loaded {
    load_source_in(name, text, td, &ValidationContext::default())
}

/// [`load_source`] for a mesh whose `context` is known (the control plane
/// knows its mesh-wide opaque ports; offline lint does not).
pub fn load_source_in(
    name: &str,
    text: &str,
    td: &TrustDomain,
    context: &ValidationContext,
) -> Loaded {
    let mut checked = Vec::new();
    let mut loaded = Loaded::default();
    let mut limits = Vec::new();
    check_text(
        name,
        text,
        td,
        context,
        &mut checked,
        &mut limits,
        &mut loaded,
    );
    finish(checked, limits, loaded, &[name.to_owned()])
}

/// Checks files and directories (searched recursively for `*.yaml`, `*.yml`
/// and `*.json`, in sorted order); duplicate names across all of them are
/// errors.
pub fn lint_paths(paths: &[PathBuf], td: &TrustDomain) -> Vec<Diagnostic> {
    load_paths(paths, td).diagnostics
}

/// Reads and validates files and directories, as [`lint_paths`] checks them.
pub fn load_paths(paths: &[PathBuf], td: &TrustDomain) -> Loaded {
    let mut files = Vec::new();
    let mut loaded = Loaded::default();
    for path in paths {
        if let Err(e) = collect(path, true, &mut files) {
            loaded.diagnostics.push(unreadable(path, &e));
        }
    }
    files.sort();
    files.dedup();
    let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    let mut checked = Vec::new();
    let mut limits = Vec::new();
    let context = ValidationContext::default();
    for (file, name) in files.iter().zip(&names) {
        match fs::read_to_string(file) {
            Ok(text) => check_text(
                name,
                &text,
                td,
                &context,
                &mut checked,
                &mut limits,
                &mut loaded,
            ),
            Err(e) => loaded.diagnostics.push(unreadable(file, &e)),
        }
    }
    finish(checked, limits, loaded, &names)
}

fn unreadable(path: &Path, e: &std::io::Error) -> Diagnostic {
    Diagnostic {
        file: path.display().to_string(),
        line: 0,
        column: 0,
        severity: Severity::Error,
        path: FieldPath::root(),
        message: format!("cannot read: {e}"),
    }
}

/// Adds `path`: any file named explicitly, and the policy files found in
/// directories. Symbolic links met while walking are never followed into
/// directories, so a link loop cannot recurse forever.
fn collect(path: &Path, explicit: bool, files: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let is_dir = if explicit {
        fs::metadata(path)?.is_dir()
    } else {
        fs::symlink_metadata(path)?.is_dir()
    };
    if is_dir {
        for entry in fs::read_dir(path)? {
            collect(&entry?.path(), false, files)?;
        }
    } else if explicit || is_policy_file(path) {
        files.push(path.to_owned());
    }
    Ok(())
}

fn is_policy_file(path: &Path) -> bool {
    let ext = path.extension().and_then(|e| e.to_str());
    matches!(ext, Some("yaml" | "yml" | "json"))
}

/// A policy that passed validation, with its document for locating a
/// duplicate-name error.
struct Checked<T> {
    policy: T,
    file: String,
    node: Node,
}

fn check_text(
    name: &str,
    text: &str,
    td: &TrustDomain,
    context: &ValidationContext,
    checked: &mut Vec<Checked<ValidPolicy>>,
    limits: &mut Vec<Checked<RateLimitPolicy>>,
    loaded: &mut Loaded,
) {
    let (documents, syntax) = parse_stream(text);
    for node in documents {
        let document = match Document::from_value(node.to_json()) {
            Ok(document) => document,
            Err(e) => {
                let pos = node.locate(&e.path, e.at_key);
                let violation = Violation {
                    at_key: e.at_key,
                    ..Violation::error(e.path, e.message)
                };
                loaded
                    .diagnostics
                    .push(Diagnostic::at(name, pos, violation));
                continue;
            }
        };
        let policy = match &document {
            Document::AuthorizationPolicy(policy) => policy,
            Document::RateLimitPolicy(limit) => {
                match validate_rate_limit_in(limit, td) {
                    Ok(()) => limits.push(Checked {
                        policy: limit.clone(),
                        file: name.to_owned(),
                        node,
                    }),
                    Err(violations) => {
                        for violation in violations {
                            let pos = node.locate(&violation.path, violation.at_key);
                            loaded
                                .diagnostics
                                .push(Diagnostic::at(name, pos, violation));
                        }
                    }
                }
                continue;
            }
        };
        let out = &mut loaded.diagnostics;
        let (policy, violations) = match validate_in(policy, td, context) {
            Ok(valid) => {
                let mut warnings = valid.warnings().to_vec();
                warnings.extend(denies_connections(policy, context));
                (Some(valid), warnings)
            }
            Err(violations) => (None, violations),
        };
        for violation in violations {
            let pos = node.locate(&violation.path, violation.at_key);
            out.push(Diagnostic::at(name, pos, violation));
        }
        if let Some(policy) = policy {
            checked.push(Checked {
                policy,
                file: name.to_owned(),
                node,
            });
        }
    }
    if let Some(e) = syntax {
        let violation = Violation::error(FieldPath::root(), e.message);
        loaded
            .diagnostics
            .push(Diagnostic::at(name, e.pos, violation));
    }
}

/// Warns of each `to` entry of a DENY or AUDIT rule with HTTP conditions
/// and no ports: the sidecar cannot hold a connection that is not HTTP to
/// those conditions, so the rule denies (AUDIT: would deny) every such
/// connection from its sources, on every port not declared opaque.
fn denies_connections(policy: &AuthorizationPolicy, context: &ValidationContext) -> Vec<Violation> {
    let verb = match policy.spec.action {
        Action::Deny => "denies",
        Action::Audit => "would deny (AUDIT)",
        Action::Allow => return Vec::new(),
    };
    let opaque = match context.opaque_ports.as_slice() {
        [] => String::new(),
        ports => format!(" {ports:?}"),
    };
    let rules = FieldPath::root().field("spec").field("rules");
    let mut found = Vec::new();
    for (i, rule) in policy.spec.rules.iter().enumerate() {
        for (j, d) in rule.to.iter().flatten().enumerate() {
            if d.has_l7() && d.ports.is_none() {
                found.push(Violation::warning(
                    rules.index(i).field("to").index(j),
                    format!(
                        "this rule also {verb} every connection that is not HTTP from its sources, on every port not declared opaque{opaque}: HTTP conditions cannot be checked on such a connection; list ports to say which ones are meant"
                    ),
                ));
            }
        }
    }
    found
}

/// Rejects duplicate names (per kind), then orders diagnostics by the
/// position of their file in `files` (unreadable paths first), line and
/// column.
fn finish(
    checked: Vec<Checked<ValidPolicy>>,
    limits: Vec<Checked<RateLimitPolicy>>,
    mut loaded: Loaded,
    files: &[String],
) -> Loaded {
    let metadata = checked.iter().map(|c| &c.policy.policy().metadata);
    let rejected = reject_duplicates(&checked, metadata, "policy", &mut loaded);
    let metadata = limits.iter().map(|c| &c.policy.metadata);
    let limits_rejected = reject_duplicates(&limits, metadata, "rate limit", &mut loaded);
    for (c, rejected) in limits.into_iter().zip(limits_rejected) {
        if !rejected {
            loaded.rate_limits.push(LoadedRateLimit {
                line: c.node.pos().line,
                policy: c.policy,
                file: c.file,
            });
        }
    }
    for (c, rejected) in checked.into_iter().zip(rejected) {
        if !rejected {
            let line = c.node.pos().line;
            loaded.policies.push(LoadedPolicy {
                policy: c.policy,
                file: c.file,
                line,
            });
        }
    }
    loaded.diagnostics.sort_by_key(|d| {
        let file = files.iter().position(|f| *f == d.file);
        (file, d.line, d.column)
    });
    loaded
}

/// Reports every document named like an earlier one of its kind; which of
/// `checked` are rejected.
fn reject_duplicates<'a, T>(
    checked: &[Checked<T>],
    metadata: impl Iterator<Item = &'a super::document::Metadata>,
    what: &str,
    loaded: &mut Loaded,
) -> Vec<bool> {
    let metadata: Vec<_> = metadata.collect();
    let name_path = FieldPath::root().field("metadata").field("name");
    let mut rejected = vec![false; checked.len()];
    for (dup, first) in duplicate_names(metadata.iter().copied()) {
        rejected[dup] = true;
        let (d, f) = (&checked[dup], &checked[first]);
        let meta = metadata[dup];
        let first_pos = f.node.locate(&name_path, false);
        let message = format!(
            "duplicate {what} {}: already defined at {}:{first_pos}",
            policy_key(&meta.namespace, &meta.name),
            f.file
        );
        let pos = d.node.locate(&name_path, false);
        loaded.diagnostics.push(Diagnostic::at(
            &d.file,
            pos,
            Violation::error(name_path.clone(), message),
        ));
    }
    rejected
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    const GOOD: &str = "apiVersion: trellis.io/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: web-to-api
  namespace: default
spec:
  selector:
    spiffeIds: [\"spiffe://cluster.local/ns/default/sa/api\"]
  action: ALLOW
  rules:
    - from:
        - spiffeId: spiffe://cluster.local/ns/default/sa/web
      to:
        - ports: [8080]
";

    /// Such a rule cannot hold a connection that is not HTTP to its HTTP
    /// conditions, so it denies the whole connection: say so where it
    /// does that on every port.
    #[test]
    fn a_deny_or_audit_rule_with_http_conditions_and_no_ports_warns_that_it_denies_connections() {
        for (action, verb) in [("DENY", "denies"), ("AUDIT", "would deny (AUDIT)")] {
            let text = GOOD
                .replace("ALLOW", action)
                .replace("- ports: [8080]", "- paths: [\"/admin/*\"]");
            let loaded = load_source("deny.yaml", &text, &td());
            assert_eq!(loaded.policies.len(), 1);
            let found: Vec<String> = loaded.diagnostics.iter().map(ToString::to_string).collect();
            assert_eq!(
                found,
                [format!(
                    "deny.yaml:14:11: warning: spec.rules[0].to[0]: this rule also {verb} every connection that is not HTTP from its sources, on every port not declared opaque: HTTP conditions cannot be checked on such a connection; list ports to say which ones are meant"
                )]
            );
        }
        let with_ports = GOOD.replace("ALLOW", "DENY").replace(
            "- ports: [8080]",
            "- ports: [8080]\n          paths: [\"/admin/*\"]",
        );
        assert_eq!(load_source("deny.yaml", &with_ports, &td()).diagnostics, []);
        let allow = GOOD.replace("- ports: [8080]", "- paths: [\"/admin/*\"]");
        assert_eq!(load_source("allow.yaml", &allow, &td()).diagnostics, []);
    }

    /// What a sidecar or the reflector relaxes in a stored policy is still
    /// refused when the policy is applied.
    #[test]
    fn a_path_that_could_never_match_is_refused_at_its_line() {
        let text = GOOD.replace(
            "- ports: [8080]",
            "- ports: [8080]\n          paths: [\"/files/a%2Fb\"]",
        );
        let loaded = load_source("p.yaml", &text, &td());
        assert!(loaded.policies.is_empty());
        assert_eq!(
            loaded.diagnostics[0].to_string(),
            "p.yaml:15:19: spec.rules[0].to[0].paths[0]: path \"/files/a%2Fb\" could never match: path encodes '/' as %2F: an app could read it as a separator (requests with it are refused)"
        );
    }

    #[test]
    fn a_good_file_has_no_diagnostics() {
        let loaded = load_source("good.yaml", GOOD, &td());
        assert_eq!(loaded.diagnostics, []);
        assert_eq!(loaded.policies.len(), 1);
        assert_eq!(loaded.policies[0].line, 1);
    }

    #[test]
    fn reports_the_line_of_a_bad_spiffe_id() {
        let text = GOOD.replace("spiffe://cluster.local/ns/default/sa/web", "spiffe://Bad");
        let diagnostics = lint_source("policies/bad.yaml", &text, &td());
        assert_eq!(diagnostics.len(), 1);
        assert_eq!(
            diagnostics[0].to_string(),
            "policies/bad.yaml:12:21: spec.rules[0].from[0].spiffeId: invalid SPIFFE ID \"spiffe://Bad\": the trust domain may hold only a-z, 0-9, '.', '-' and '_' (found 'B')"
        );
    }

    const LIMIT: &str = "apiVersion: trellis.io/v1alpha1
kind: RateLimitPolicy
metadata: {name: web-to-api, namespace: default}
spec:
  selector: {spiffeIds: [\"spiffe://cluster.local/ns/default/sa/api\"]}
  limit: {requestsPerSecond: 5, burst: 10}
";

    #[test]
    fn both_kinds_load_from_one_text_and_may_share_a_name() {
        let text = format!("{GOOD}---\n{LIMIT}");
        let loaded = load_source("mixed.yaml", &text, &td());
        assert_eq!(loaded.diagnostics, []);
        assert_eq!(loaded.policies.len(), 1);
        assert_eq!(loaded.rate_limits[0].line, 16);
    }

    #[test]
    fn reports_duplicate_rate_limits() {
        let text = format!("{LIMIT}---\n{LIMIT}");
        let loaded = load_source("dup.yaml", &text, &td());
        assert_eq!(
            loaded.diagnostics[0].to_string(),
            "dup.yaml:10:18: metadata.name: duplicate rate limit default/web-to-api: already defined at dup.yaml:3:18"
        );
        assert_eq!(loaded.rate_limits.len(), 1);
    }

    #[test]
    fn refuses_l7_rules_on_ports_the_mesh_declares_opaque() {
        let text = GOOD.replace(
            "- ports: [8080]",
            "- ports: [5432]\n          paths: [\"/x\"]",
        );
        let context = ValidationContext {
            opaque_ports: vec![5432],
            ..ValidationContext::default()
        };
        let loaded = load_source_in("l7.yaml", &text, &td(), &context);
        assert!(loaded.policies.is_empty());
        assert!(
            loaded.diagnostics[0].to_string().starts_with(
                "l7.yaml:14:19: spec.rules[0].to[0].ports[0]: port 5432 is declared opaque"
            ),
            "{}",
            loaded.diagnostics[0]
        );
        assert_eq!(load_source("l7.yaml", &text, &td()).diagnostics, []);
    }

    #[test]
    fn reports_duplicate_names_at_the_second() {
        let text = format!("{GOOD}---\n{GOOD}");
        let diagnostics = lint_source("dup.yaml", &text, &td());
        assert_eq!(
            diagnostics
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            [
                "dup.yaml:19:9: metadata.name: duplicate policy default/web-to-api: already defined at dup.yaml:4:9"
            ]
        );
    }
}
