//! Policy files: reading, validating and reporting at `file:line:column`.
//!
//! This module owns turning files into validated policies and every problem
//! into a [`Diagnostic`] at a line: YAML syntax (each document's, named by
//! its number, `document N: ...`: one that cannot be read hides no other),
//! unknown fields and wrong types (from serde's field path), and each
//! [`Violation`] of `validate`, its field path mapped back to the node that
//! holds it. It is what
//! `trellisctl policy lint` and `policy apply -f` run; it never talks to a
//! control plane.
//!
//! However many problems a text holds, at most [`MAX_DIAGNOSTICS`] are kept
//! (errors first, then by position) and the rest only counted: a hostile
//! file with a problem every few bytes must not make a diagnostic, with its
//! strings, for each of them.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashSet};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use super::document::{Action, AuthorizationPolicy, Document};
use super::path::FieldPath;
use super::ratelimit::{RateLimitPolicy, validate_rate_limit_in_with};
use super::source::{Node, Pos, parse_each};
use super::validate::{
    MAX_DIAGNOSTICS, Omitted, Severity, ValidPolicy, ValidationContext, Violation, Violations,
    duplicate_names, policy_key, validate_in,
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

/// What reading some policy files gave: the valid policies and the
/// diagnostics (errors and warnings).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Loaded {
    /// The valid `AuthorizationPolicy` documents. Together they keep at
    /// most [`MAX_DIAGNOSTICS`] warnings ([`ValidPolicy::warnings`]).
    pub policies: Vec<LoadedPolicy>,
    /// The valid `RateLimitPolicy` documents.
    pub rate_limits: Vec<LoadedRateLimit>,
    /// The diagnostics kept, ordered by file, line and column: at most
    /// [`MAX_DIAGNOSTICS`], errors chosen before warnings and earlier ones
    /// before later ones.
    pub diagnostics: Vec<Diagnostic>,
    /// How many more there were.
    pub omitted: Omitted,
}

/// A valid `RateLimitPolicy` and where it was read.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedRateLimit {
    pub policy: RateLimitPolicy,
    pub file: String,
    pub line: usize,
}

impl Loaded {
    /// Whether any error was found, kept or not.
    pub fn has_errors(&self) -> bool {
        self.omitted.errors > 0 || has_errors(&self.diagnostics)
    }

    /// How many errors were found, kept or not.
    pub fn errors(&self) -> usize {
        let kept = self.diagnostics.iter().filter(|d| d.is_error()).count();
        kept + self.omitted.errors
    }

    /// How many warnings were found, kept or not.
    pub fn warnings(&self) -> usize {
        let kept = self.diagnostics.iter().filter(|d| !d.is_error()).count();
        kept + self.omitted.warnings
    }
}

/// Checks the documents of one text named `name` (a file name in messages):
/// the diagnostics [`load_source`] keeps.
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
    let mut reading = Reading::default();
    reading.check_text(0, name, text, td, context);
    reading.finish()
}

/// Checks files and directories (each directory's policy files at every
/// depth, as [`Walk::Recursive`] finds them, in sorted order); duplicate
/// names across all of them are errors. The diagnostics [`load_paths`]
/// keeps.
pub fn lint_paths(paths: &[PathBuf], td: &TrustDomain) -> Vec<Diagnostic> {
    load_paths(paths, td).diagnostics
}

/// Reads and validates files and directories, as [`lint_paths`] checks them.
pub fn load_paths(paths: &[PathBuf], td: &TrustDomain) -> Loaded {
    load_files_in(
        &find_policy_files(paths, Walk::Recursive),
        td,
        &ValidationContext::default(),
    )
}

/// Reads and validates the files [`find_policy_files`] found, in their
/// order; a path it could not read is an error diagnostic.
pub fn load_files_in(found: &PolicyFiles, td: &TrustDomain, context: &ValidationContext) -> Loaded {
    load_given_in(found, None, td, context)
}

/// A text given among policy files that no file holds (standard input,
/// which can be read only once): what diagnostics name it, and where it is
/// read among the files.
#[derive(Clone, Copy, Debug)]
pub struct GivenText<'a> {
    /// The name diagnostics give it, as a file's path (`<stdin>`).
    pub name: &'a str,
    /// How many of the files are read before it (all of them, if more).
    pub after: usize,
    pub text: &'a str,
}

/// [`load_files_in`], with `text`, if any, read in its place among the
/// files: its documents and diagnostics are ordered there, and duplicate
/// names across it and the files are errors.
pub fn load_given_in(
    found: &PolicyFiles,
    text: Option<GivenText<'_>>,
    td: &TrustDomain,
    context: &ValidationContext,
) -> Loaded {
    let mut reading = Reading::default();
    for d in &found.unreadable {
        reading.found.push(None, d.clone());
    }
    let after = text.map(|t| t.after.min(found.files.len()));
    let mut index = 0;
    for i in 0..=found.files.len() {
        if let Some(given) = text
            && after == Some(i)
        {
            reading.check_text(index, given.name, given.text, td, context);
            index += 1;
        }
        let Some(file) = found.files.get(i) else {
            break;
        };
        match fs::read_to_string(file) {
            Ok(text) => {
                let name = file.display().to_string();
                reading.check_text(index, &name, &text, td, context);
            }
            Err(e) => reading.found.push(Some(index), unreadable(file, &e)),
        }
        index += 1;
    }
    reading.finish()
}

/// Which files of a directory named among the paths are read: the policy
/// files (`*.yaml`, `*.yml`, `*.json`) whose names do not start with `.`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Walk {
    /// Its own, as `kubectl -f DIR` reads them; not its subdirectories'.
    Directory,
    /// Its own and its subdirectories', at every depth (`kubectl -f DIR
    /// -R`). Subdirectories whose names start with `.` are skipped, and
    /// symbolic links are never followed into directories, so a link loop
    /// cannot recurse forever.
    Recursive,
}

/// The files some paths name ([`find_policy_files`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicyFiles {
    /// The files to read, sorted, each once.
    pub files: Vec<PathBuf>,
    /// The directories named that hold no policy file (as the [`Walk`]
    /// reads them): a path given by mistake, as a caller may refuse it.
    pub empty_directories: Vec<PathBuf>,
    /// What could not be read (a path named, a directory met), as errors.
    unreadable: Vec<Diagnostic>,
}

/// The files `paths` name: each path that is not a directory as it is
/// (whatever its name), and the policy files of each directory as `walk`
/// says; sorted, so a set of files is always read in one order.
pub fn find_policy_files(paths: &[PathBuf], walk: Walk) -> PolicyFiles {
    let mut found = PolicyFiles::default();
    for path in paths {
        match fs::metadata(path) {
            Err(e) => found.unreadable.push(unreadable(path, &e)),
            Ok(meta) if meta.is_dir() => {
                let before = (found.files.len(), found.unreadable.len());
                found.walk(path, walk);
                if (found.files.len(), found.unreadable.len()) == before {
                    found.empty_directories.push(path.clone());
                }
            }
            Ok(_) => found.files.push(path.clone()),
        }
    }
    found.files.sort();
    found.files.dedup();
    found
}

impl PolicyFiles {
    /// Appends what `later` found, for paths given after these: its files
    /// not already among these, in its order, after them (a file is read
    /// once, in its first place).
    pub fn append(&mut self, later: PolicyFiles) {
        let known: HashSet<PathBuf> = self.files.iter().cloned().collect();
        let new = later.files.into_iter().filter(|f| !known.contains(f));
        self.files.extend(new);
        self.empty_directories.extend(later.empty_directories);
        self.unreadable.extend(later.unreadable);
    }

    /// Adds the policy files of `dir`, and with [`Walk::Recursive`] those
    /// of its subdirectories.
    fn walk(&mut self, dir: &Path, walk: Walk) {
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) => return self.unreadable.push(unreadable(dir, &e)),
        };
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => return self.unreadable.push(unreadable(dir, &e)),
            };
            if entry.file_name().as_encoded_bytes().starts_with(b".") {
                continue;
            }
            let path = entry.path();
            // The entry's own type: a symbolic link is not a directory.
            match entry.file_type() {
                Ok(kind) if kind.is_dir() => {
                    if walk == Walk::Recursive {
                        self.walk(&path, walk);
                    }
                }
                Ok(_) if is_policy_file(&path) => self.files.push(path),
                Ok(_) => {}
                Err(e) => self.unreadable.push(unreadable(&path, &e)),
            }
        }
    }
}

fn unreadable(path: &Path, e: &std::io::Error) -> Diagnostic {
    Diagnostic {
        file: path.display().to_string(),
        line: 0,
        column: 0,
        severity: Severity::Error,
        path: FieldPath::root(),
        message: format!("cannot read: {}", crate::io_error::IoWords(e)),
    }
}

fn is_policy_file(path: &Path) -> bool {
    let ext = path.extension().and_then(|e| e.to_str());
    matches!(ext, Some("yaml" | "yml" | "json"))
}

/// A policy that passed validation, and where it is: where its document
/// starts and where it names itself (a duplicate name is reported there).
/// Only positions are kept, not the document's tree, which takes many
/// times the text's size.
struct Checked<T> {
    policy: T,
    /// The position of its file among those read (diagnostics are ordered
    /// by it).
    index: usize,
    file: String,
    line: usize,
    name: Pos,
}

impl<T> Checked<T> {
    fn new(policy: T, index: usize, file: &str, node: &Node) -> Self {
        Self {
            policy,
            index,
            file: file.to_owned(),
            line: node.pos().line,
            name: node.locate(&name_path(), false),
        }
    }
}

fn name_path() -> FieldPath {
    FieldPath::root().field("metadata").field("name")
}

/// What reading texts has found so far.
struct Reading {
    policies: Vec<Checked<ValidPolicy>>,
    limits: Vec<Checked<RateLimitPolicy>>,
    found: Found,
    /// How many more warnings valid policies may keep: each keeps at most
    /// [`MAX_DIAGNOSTICS`], and a text of many must not keep that many for
    /// every one.
    warnings_left: usize,
}

impl Default for Reading {
    fn default() -> Self {
        Self {
            policies: Vec::new(),
            limits: Vec::new(),
            found: Found::default(),
            warnings_left: MAX_DIAGNOSTICS,
        }
    }
}

impl Reading {
    /// Checks the documents of `text`, the `index`th file read, named
    /// `name`, each as soon as it is read.
    fn check_text(
        &mut self,
        index: usize,
        name: &str,
        text: &str,
        td: &TrustDomain,
        context: &ValidationContext,
    ) {
        parse_each(text, |read| match read {
            Ok(node) => self.check_document(index, name, &node, td, context),
            Err(e) => {
                let message = format!("document {}: {}", e.document, e.message);
                let violation = Violation::error(FieldPath::root(), message);
                self.found
                    .push(Some(index), Diagnostic::at(name, e.pos, violation));
            }
        });
    }

    fn check_document(
        &mut self,
        index: usize,
        name: &str,
        node: &Node,
        td: &TrustDomain,
        context: &ValidationContext,
    ) {
        let mut report = |violations: Violations| {
            self.found.omitted.add(violations.omitted());
            for violation in violations {
                let pos = node.locate(&violation.path, violation.at_key);
                self.found
                    .push(Some(index), Diagnostic::at(name, pos, violation));
            }
        };
        let document = match Document::from_value(node.to_json()) {
            Ok(document) => document,
            Err(e) => {
                let violation = Violation {
                    at_key: e.at_key,
                    ..Violation::error(e.path, e.message)
                };
                return report(Violations::from(violation));
            }
        };
        let policy = match document {
            Document::AuthorizationPolicy(policy) => policy,
            Document::RateLimitPolicy(limit) => {
                return match validate_rate_limit_in_with(&limit, td, context) {
                    Ok(_) => self.limits.push(Checked::new(limit, index, name, node)),
                    Err(violations) => report(violations),
                };
            }
        };
        let mut valid = match validate_in(&policy, td, context) {
            Ok(valid) => valid,
            Err(violations) => return report(violations),
        };
        let mut warnings = Violations::default();
        for warning in valid.warnings() {
            warnings.push(warning.clone());
        }
        l7_without_ports(&policy, context, &mut warnings);
        sidecar_ports_named(&policy, &mut warnings);
        report(warnings);
        self.found.omitted.warnings += valid.omitted_warnings();
        valid.keep_warnings(self.warnings_left);
        self.warnings_left -= valid.warnings().len();
        self.policies.push(Checked::new(valid, index, name, node));
    }

    /// Rejects duplicate names (per kind) and orders the diagnostics kept.
    fn finish(mut self) -> Loaded {
        let metadata = self.policies.iter().map(|c| &c.policy.policy().metadata);
        let rejected = reject_duplicates(&self.policies, metadata, "policy", &mut self.found);
        let metadata = self.limits.iter().map(|c| &c.policy.metadata);
        let limits_rejected =
            reject_duplicates(&self.limits, metadata, "rate limit", &mut self.found);
        let (diagnostics, omitted) = self.found.into_sorted();
        let mut loaded = Loaded {
            diagnostics,
            omitted,
            ..Loaded::default()
        };
        for (c, rejected) in self.limits.into_iter().zip(limits_rejected) {
            if !rejected {
                loaded.rate_limits.push(LoadedRateLimit {
                    line: c.line,
                    policy: c.policy,
                    file: c.file,
                });
            }
        }
        for (c, rejected) in self.policies.into_iter().zip(rejected) {
            if !rejected {
                loaded.policies.push(LoadedPolicy {
                    policy: c.policy,
                    file: c.file,
                    line: c.line,
                });
            }
        }
        loaded
    }
}

/// Diagnostics as they are found, in no particular order: the first
/// [`MAX_DIAGNOSTICS`] of them, errors before warnings and then by
/// position, are kept, the others only counted.
#[derive(Default)]
struct Found {
    /// A max-heap: the one to drop next is on top.
    kept: BinaryHeap<Ranked>,
    /// How many have been pushed; ties in position keep the order found.
    pushed: usize,
    omitted: Omitted,
}

/// A diagnostic and its rank: severity, then the position of its file
/// among those read (`None`: a path that could not be listed, first),
/// line, column and the order found.
struct Ranked {
    rank: (Severity, Option<usize>, usize, usize, usize),
    diagnostic: Diagnostic,
}

impl Ranked {
    fn position(&self) -> (Option<usize>, usize, usize, usize) {
        let (_, file, line, column, order) = self.rank;
        (file, line, column, order)
    }
}

impl PartialEq for Ranked {
    fn eq(&self, other: &Self) -> bool {
        self.rank == other.rank
    }
}

impl Eq for Ranked {}

impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> Ordering {
        self.rank.cmp(&other.rank)
    }
}

impl Found {
    /// Adds a diagnostic of the `file`th file read.
    fn push(&mut self, file: Option<usize>, diagnostic: Diagnostic) {
        let d = &diagnostic;
        let rank = (d.severity, file, d.line, d.column, self.pushed);
        self.pushed += 1;
        let ranked = Ranked { rank, diagnostic };
        if self.kept.len() < MAX_DIAGNOSTICS {
            self.kept.push(ranked);
            return;
        }
        let dropped = match self.kept.peek_mut() {
            Some(mut last) if ranked < *last => std::mem::replace(&mut *last, ranked),
            _ => ranked,
        };
        self.omitted.count(dropped.diagnostic.severity);
    }

    /// The diagnostics kept, by position, and how many more there were.
    fn into_sorted(self) -> (Vec<Diagnostic>, Omitted) {
        let mut kept = self.kept.into_vec();
        kept.sort_unstable_by_key(Ranked::position);
        let diagnostics = kept.into_iter().map(|r| r.diagnostic).collect();
        (diagnostics, self.omitted)
    }
}

/// Warns of each `to` entry with HTTP conditions and no ports: the sidecar
/// cannot hold a connection that is not HTTP to those conditions, nor any
/// connection to a port it treats as opaque (never parsed as HTTP), so a
/// DENY rule denies (AUDIT: would deny) every such connection from its
/// sources, and an ALLOW rule allows none on an opaque port. An ALLOW
/// rule is warned of only where the mesh's opaque ports are known.
fn l7_without_ports(
    policy: &AuthorizationPolicy,
    context: &ValidationContext,
    found: &mut Violations,
) {
    let opaque = match context.opaque_ports.as_slice() {
        [] => String::new(),
        ports => format!(" (the mesh's: {ports:?})"),
    };
    let message = match policy.spec.action {
        Action::Deny | Action::Audit => {
            let verb = match policy.spec.action {
                Action::Deny => "denies",
                _ => "would deny (AUDIT)",
            };
            format!(
                "this rule also {verb} every connection from its sources that is not HTTP, and every one to a port declared opaque{opaque}: HTTP conditions cannot be checked on such a connection; list ports to say which ones are meant"
            )
        }
        Action::Allow if opaque.is_empty() => return,
        Action::Allow => format!(
            "this entry allows no connection to a port declared opaque{opaque}: HTTP conditions cannot be checked on such a connection; list ports to say which ones are meant"
        ),
    };
    let rules = FieldPath::root().field("spec").field("rules");
    for (i, rule) in policy.spec.rules.iter().enumerate() {
        for (j, d) in rule.to.iter().flatten().enumerate() {
            if d.has_l7() && d.ports.is_none() {
                found.push(Violation::warning(
                    rules.index(i).field("to").index(j),
                    message.clone(),
                ));
            }
        }
    }
}

/// Warns of each port of a rule's `ports` that is one of the sidecar's own
/// ([`sidecar_port_warning`](super::sidecar_port_warning)): it matches no
/// connection, which a rule meant for the app's port then misses.
fn sidecar_ports_named(policy: &AuthorizationPolicy, found: &mut Violations) {
    let rules = FieldPath::root().field("spec").field("rules");
    for (i, rule) in policy.spec.rules.iter().enumerate() {
        for (j, d) in rule.to.iter().flatten().enumerate() {
            for (k, &port) in d.ports.iter().flatten().enumerate() {
                let warning = u16::try_from(port)
                    .ok()
                    .and_then(super::sidecar_port_warning);
                if let Some(warning) = warning {
                    let path = rules.index(i).field("to").index(j).field("ports").index(k);
                    found.push(Violation::warning(path, warning));
                }
            }
        }
    }
}

/// Reports every document named like an earlier one of its kind; which of
/// `checked` are rejected.
fn reject_duplicates<'a, T>(
    checked: &[Checked<T>],
    metadata: impl Iterator<Item = &'a super::document::Metadata>,
    what: &str,
    found: &mut Found,
) -> Vec<bool> {
    let metadata: Vec<_> = metadata.collect();
    let mut rejected = vec![false; checked.len()];
    for (dup, first) in duplicate_names(metadata.iter().copied()) {
        rejected[dup] = true;
        let (d, f) = (&checked[dup], &checked[first]);
        let meta = metadata[dup];
        let message = format!(
            "duplicate {what} {}: already defined at {}:{}",
            policy_key(&meta.namespace, &meta.name),
            f.file,
            f.name
        );
        let violation = Violation::error(name_path(), message);
        found.push(Some(d.index), Diagnostic::at(&d.file, d.name, violation));
    }
    rejected
}

#[cfg(test)]
mod tests {
    use super::super::source::parse_stream;
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
                    "deny.yaml:14:11: warning: spec.rules[0].to[0]: this rule also {verb} every connection from its sources that is not HTTP, and every one to a port declared opaque: HTTP conditions cannot be checked on such a connection; list ports to say which ones are meant"
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

    /// Where the mesh's opaque ports are known (the control plane), an
    /// entry with HTTP conditions and no ports is warned of once, saying
    /// how it fails closed on them: DENY and AUDIT deny every connection
    /// there, ALLOW allows none.
    #[test]
    fn l7_rules_without_ports_warn_once_of_the_meshs_opaque_ports() {
        let context = ValidationContext {
            opaque_ports: vec![5432],
            ..ValidationContext::default()
        };
        let lint = |action: &str| {
            let text = GOOD
                .replace("ALLOW", action)
                .replace("- ports: [8080]", "- paths: [\"/admin/*\"]");
            let loaded = load_source_in("l7.yaml", &text, &td(), &context);
            assert_eq!(loaded.policies.len(), 1);
            let found: Vec<String> = loaded.diagnostics.iter().map(ToString::to_string).collect();
            found
        };
        assert_eq!(
            lint("DENY"),
            [
                "l7.yaml:14:11: warning: spec.rules[0].to[0]: this rule also denies every connection from its sources that is not HTTP, and every one to a port declared opaque (the mesh's: [5432]): HTTP conditions cannot be checked on such a connection; list ports to say which ones are meant"
            ]
        );
        assert_eq!(
            lint("ALLOW"),
            [
                "l7.yaml:14:11: warning: spec.rules[0].to[0]: this entry allows no connection to a port declared opaque (the mesh's: [5432]): HTTP conditions cannot be checked on such a connection; list ports to say which ones are meant"
            ]
        );
    }

    /// A hostile file of an error every few bytes: a diagnostic for each
    /// would take hundreds of megabytes. At most the cap is kept, the first
    /// by position, and the rest counted; the file is still refused.
    #[test]
    fn a_file_of_far_more_errors_than_the_cap_keeps_the_cap_and_counts_the_rest() {
        // 200,000 documents of one error each (1.8 MB), then one policy of
        // 45,000 errors (under the bound on a document's list items).
        let mut text = "---\nx: 1\n".repeat(200_000);
        let ports = vec!["0"; 45_000].join(",");
        text.push_str(&format!("---\n{}", GOOD.replace("8080", &ports)));
        let loaded = load_source("many.yaml", &text, &td());
        assert!(loaded.has_errors());
        assert!(loaded.policies.is_empty());
        assert_eq!(loaded.diagnostics.len(), MAX_DIAGNOSTICS);
        assert_eq!(loaded.errors(), 245_000);
        assert_eq!(
            loaded.omitted,
            Omitted {
                errors: 245_000 - MAX_DIAGNOSTICS,
                warnings: 0
            }
        );
        let lines: Vec<usize> = loaded.diagnostics.iter().map(|d| d.line).collect();
        let first: Vec<usize> = (0..MAX_DIAGNOSTICS).map(|i| 2 + 2 * i).collect();
        assert_eq!(lines, first);
        assert_eq!(
            loaded.diagnostics[0].to_string(),
            "many.yaml:2:1: missing field `apiVersion`"
        );
    }

    /// One document alone keeps at most the cap of its problems, before
    /// any of them is given a line.
    #[test]
    fn one_policy_keeps_at_most_the_cap_of_its_violations() {
        let ports = vec!["0"; 5_000].join(", ");
        let policy = match Document::from_value(
            parse_stream(&GOOD.replace("8080", &ports)).0[0].to_json(),
        ) {
            Ok(Document::AuthorizationPolicy(policy)) => policy,
            other => panic!("{other:?}"),
        };
        let violations = validate_in(&policy, &td(), &ValidationContext::default()).unwrap_err();
        assert_eq!(violations.len(), MAX_DIAGNOSTICS);
        assert!(violations.has_errors());
        assert_eq!(violations.omitted().errors, 5_000 - MAX_DIAGNOSTICS);
    }

    /// Errors are what must be fixed: a thousand warnings before an error
    /// do not hide it, and the warnings past the cap are counted.
    #[test]
    fn an_error_after_the_cap_of_warnings_is_kept_and_refuses() {
        let ports = vec!["8080"; 1_500].join(", ");
        let warned = GOOD.replace("[8080]", &format!("[{ports}]"));
        let bad = GOOD.replace("web-to-api", "other").replace("8080", "70000");
        let text = format!("{warned}---\n{bad}");
        let loaded = load_source("p.yaml", &text, &td());
        assert!(loaded.has_errors());
        assert_eq!(loaded.diagnostics.len(), MAX_DIAGNOSTICS);
        let last = loaded.diagnostics.last().unwrap();
        assert_eq!(
            last.to_string(),
            "p.yaml:29:19: spec.rules[0].to[0].ports[0]: port 70000 is out of range 1..=65535"
        );
        assert_eq!(loaded.errors(), 1);
        assert_eq!(loaded.warnings(), 1_499);
        assert_eq!(loaded.omitted.warnings, 1_499 - (MAX_DIAGNOSTICS - 1));
    }

    /// Valid policies keep at most the cap of warnings between them (the
    /// Admin API returns them), counting the rest.
    #[test]
    fn many_valid_policies_keep_at_most_the_cap_of_warnings_together() {
        let ports = vec!["8080"; 601].join(", ");
        let text: Vec<String> = (0..3)
            .map(|i| {
                GOOD.replace("web-to-api", &format!("p{i}"))
                    .replace("[8080]", &format!("[{ports}]"))
            })
            .collect();
        let loaded = load_source("p.yaml", &text.join("---\n"), &td());
        assert!(!loaded.has_errors());
        assert_eq!(loaded.policies.len(), 3);
        let kept: Vec<usize> = loaded
            .policies
            .iter()
            .map(|p| p.policy.warnings().len())
            .collect();
        assert_eq!(kept, [600, 400, 0]);
        let omitted: Vec<usize> = loaded
            .policies
            .iter()
            .map(|p| p.policy.omitted_warnings())
            .collect();
        assert_eq!(omitted, [0, 200, 600]);
        assert_eq!(loaded.diagnostics.len(), MAX_DIAGNOSTICS);
        assert_eq!(loaded.warnings(), 1_800);
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
