//! `policy lint` over the fixture files: every rejection at its exact line.
//!
//! Each bad YAML fixture ends with `# expect: LINE:COLUMN: DIAGNOSTIC`
//! comments, so a fixture documents what it checks; JSON holds no comments,
//! so the JSON fixture's expectation is [`EXPECT_JSON`]. Paths are relative:
//! cargo runs integration tests from the package directory.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use trellis_core::TrustDomain;
use trellis_core::policy::{Severity, has_errors, lint_paths, lint_source, load_paths};

const GOOD: &str = "tests/fixtures/policies/good";
const BAD: &str = "tests/fixtures/policies/bad";
const EXPECT_JSON: &str =
    "9:53: spec.rules[0].to[0].methods[0]: \"get\": methods are case-sensitive, write \"GET\"";

fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").unwrap()
}

/// Diagnostics by file name, each without its `file:` prefix.
fn by_file(paths: &[PathBuf]) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::<String, Vec<String>>::new();
    for d in lint_paths(paths, &td()) {
        let text = d.to_string();
        let name = Path::new(&d.file).file_name().unwrap().to_string_lossy();
        out.entry(name.into_owned())
            .or_default()
            .push(text[d.file.len() + 1..].to_owned());
    }
    out
}

fn expectations(dir: &str) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let expected: Vec<String> = if name.ends_with(".json") {
            vec![EXPECT_JSON.to_owned()]
        } else {
            let text = fs::read_to_string(&path).unwrap();
            let lines = text.lines().filter_map(|l| l.strip_prefix("# expect: "));
            lines.map(str::to_owned).collect()
        };
        if !expected.is_empty() {
            out.insert(name, expected);
        }
    }
    out
}

#[test]
fn every_bad_fixture_fails_at_its_expected_lines() {
    let actual = by_file(&[PathBuf::from(BAD)]);
    let expected = expectations(BAD);
    for (file, want) in &expected {
        assert_eq!(actual.get(file), Some(want), "diagnostics of {file}");
    }
    assert_eq!(
        actual.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
}

#[test]
fn good_fixtures_pass_and_other_files_are_skipped() {
    let loaded = load_paths(&[PathBuf::from(GOOD)], &td());
    assert_eq!(loaded.diagnostics, []);
    let names: Vec<String> = loaded.policies.iter().map(|p| p.policy.key()).collect();
    // Sorted by file, then in document order: mesh.json, nested/prefix.yml,
    // web-to-api.yaml (README.md is not a policy file).
    assert_eq!(
        names,
        [
            "frontend/mesh-to-frontend",
            "jobs/batch",
            "default/web-to-api",
            "default/deny-legacy",
            "default/audit-admin-port",
        ]
    );
    let lines: Vec<usize> = loaded.policies.iter().map(|p| p.line).collect();
    assert_eq!(lines, [1, 1, 2, 18, 31]);
}

#[test]
fn bad_files_have_errors_and_good_ones_do_not() {
    assert!(has_errors(&lint_paths(&[PathBuf::from(BAD)], &td())));
    assert!(!has_errors(&lint_paths(&[PathBuf::from(GOOD)], &td())));
    let bad = PathBuf::from(BAD).join("types.yaml");
    let both = lint_paths(&[PathBuf::from(GOOD), bad], &td());
    assert_eq!(both.len(), 2);
}

#[test]
fn duplicates_are_found_across_files_given_together() {
    let a = PathBuf::from(BAD).join("duplicate-a.yaml");
    let b = PathBuf::from(BAD).join("duplicate-b.yaml");
    let diagnostics = lint_paths(&[b.clone(), a.clone()], &td());
    assert_eq!(diagnostics.len(), 1);
    assert_eq!(
        diagnostics[0].to_string(),
        format!(
            "{}:4:9: metadata.name: duplicate policy default/twice: already defined at {}:4:9",
            b.display(),
            a.display()
        )
    );
    // Each alone is fine.
    assert_eq!(lint_paths(&[a], &td()), []);
}

#[test]
fn a_missing_path_is_an_error_without_a_line() {
    let diagnostics = lint_paths(&[PathBuf::from(BAD).join("absent.yaml")], &td());
    assert_eq!(diagnostics.len(), 1);
    assert_eq!(diagnostics[0].line, 0);
    // Said as the binaries say an I/O error: no `(os error 2)`.
    let said = diagnostics[0].to_string();
    assert!(
        said.contains("absent.yaml: cannot read: no such file or directory"),
        "{said}"
    );
    assert!(!said.contains("os error"), "{said}");
}

#[test]
fn warnings_alone_do_not_fail_a_lint() {
    let text = "apiVersion: trellis.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: a, namespace: b}
spec:
  selector: {spiffeIds: [\"spiffe://cluster.local/ns/b/sa/a\"]}
  action: ALLOW
  rules: [{to: [{ports: [80, 80]}]}]
";
    let diagnostics = lint_source("warn.yaml", text, &td());
    assert_eq!(diagnostics.len(), 1);
    assert_eq!(diagnostics[0].severity, Severity::Warning);
    assert_eq!(
        diagnostics[0].to_string(),
        "warn.yaml:7:30: warning: spec.rules[0].to[0].ports[1]: port 80 is listed twice"
    );
    assert!(!has_errors(&diagnostics));
}

#[test]
fn the_trust_domain_decides_what_can_match() {
    let text = fs::read_to_string(Path::new(GOOD).join("mesh.json")).unwrap();
    let other = TrustDomain::new("example.org").unwrap();
    let diagnostics = lint_source("mesh.json", &text, &other);
    let paths: Vec<String> = diagnostics.iter().map(|d| d.path.to_string()).collect();
    assert_eq!(
        paths,
        [
            "spec.selector.spiffeIds[0]",
            "spec.rules[0].from[0].trustDomain"
        ]
    );
}
