//! What the Helm chart tests share: finding helm and kubernetes-validate
//! (installed by `scripts/install-helm.sh`; missing tools skip a test, or
//! fail it under CI), rendering the chart with `helm template`, and reading
//! and validating the rendered manifests.
#![allow(dead_code)]

#[path = "../../../tests/src/machine.rs"]
pub mod machine;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Map, Value, json};
use yaml_rust2::{Yaml, YamlLoader};

pub const NAMESPACE: &str = "trellis-system";
/// The oldest Kubernetes the chart supports (native sidecars are on by
/// default from 1.29) and the release where they became stable.
pub const KUBERNETES_VERSIONS: [&str; 2] = ["1.29.0", "1.33.0"];

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

pub fn chart() -> PathBuf {
    workspace().join("deploy/helm/trellis")
}

/// A tool from `TRELLIS_TOOLS_DIR/bin` (default target/tools/bin, where
/// scripts/install-helm.sh puts it), else from PATH.
pub fn tool(name: &str) -> Option<PathBuf> {
    let tools = std::env::var_os("TRELLIS_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/tools"));
    let local = tools.join("bin").join(name);
    if local.is_file() {
        return Some(local);
    }
    on_path(name)
}

pub fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The tools, or `None` after saying why the test is skipped. Under CI a
/// missing tool is a failure ([`machine::skip`]): a chart test that never
/// runs proves nothing.
pub fn tools() -> Option<(PathBuf, PathBuf)> {
    let helm = tool("helm");
    let validate = tool("kubernetes-validate");
    match (helm, validate) {
        (Some(h), Some(v)) => Some((h, v)),
        (h, _) => {
            let missing = if h.is_none() {
                "helm"
            } else {
                "kubernetes-validate"
            };
            machine::skip(&format!(
                "skipped: {missing} not installed (run scripts/install-helm.sh)"
            ));
            None
        }
    }
}

/// Runs helm with a private home, so tests neither read nor write the
/// user's helm configuration.
pub fn run_helm(helm: &Path, args: &[&str]) -> Result<String, String> {
    let home = tempfile::tempdir().unwrap();
    let output = Command::new(helm)
        .args(args)
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_DATA_HOME", home.path().join("data"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", helm.display()));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if output.status.success() {
        Ok(stdout)
    } else {
        Err(format!("helm {args:?} failed: {stdout}{stderr}"))
    }
}

/// The chart rendered as release `trellis` in [`NAMESPACE`], with `sets`.
pub fn template(helm: &Path, sets: &[&str]) -> Result<String, String> {
    template_in(helm, NAMESPACE, sets)
}

/// The chart rendered as release `trellis` in `namespace`, with `sets`.
pub fn template_in(helm: &Path, namespace: &str, sets: &[&str]) -> Result<String, String> {
    let args: Vec<&str> = sets.iter().flat_map(|set| ["--set", set]).collect();
    template_with(helm, namespace, &args)
}

/// The chart rendered as release `trellis` in `namespace`, with helm's
/// further `args` (`--set-file`, `--show-only`, ...).
pub fn template_with(helm: &Path, namespace: &str, args: &[&str]) -> Result<String, String> {
    let chart = chart();
    let release = [
        "template",
        "trellis",
        chart.to_str().unwrap(),
        "--namespace",
        namespace,
    ];
    run_helm(helm, &[&release[..], args].concat())
}

/// The chart rendered as [`template`] renders it with `sets`, the
/// manifests validated ([`validate_manifests`]), as JSON values.
pub fn validated(helm: &Path, validate: &Path, sets: &[&str]) -> Vec<Value> {
    let rendered = template(helm, sets).unwrap();
    validate_manifests(validate, &rendered);
    documents(&rendered)
}

/// The rendered manifests as JSON values.
pub fn documents(rendered: &str) -> Vec<Value> {
    YamlLoader::load_from_str(rendered)
        .unwrap_or_else(|e| panic!("helm rendered invalid YAML: {e}"))
        .iter()
        .map(to_json)
        .filter(|v| !v.is_null())
        .collect()
}

pub fn to_json(yaml: &Yaml) -> Value {
    match yaml {
        Yaml::Real(s) => s
            .parse::<f64>()
            .map(|f| json!(f))
            .unwrap_or_else(|_| json!(s)),
        Yaml::Integer(i) => json!(i),
        Yaml::String(s) => json!(s),
        Yaml::Boolean(b) => json!(b),
        Yaml::Array(items) => Value::Array(items.iter().map(to_json).collect()),
        Yaml::Hash(map) => {
            let mut out = Map::new();
            for (k, v) in map {
                let key = match k {
                    Yaml::String(s) => s.clone(),
                    Yaml::Integer(i) => i.to_string(),
                    Yaml::Boolean(b) => b.to_string(),
                    other => panic!("unexpected YAML key {other:?}"),
                };
                out.insert(key, to_json(v));
            }
            Value::Object(out)
        }
        Yaml::Null | Yaml::BadValue | Yaml::Alias(_) => Value::Null,
    }
}

pub fn find<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

pub fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found = find(docs, kind);
    assert_eq!(found.len(), 1, "expected one {kind}, found {}", found.len());
    found[0]
}

/// `kubernetes-validate --strict` on the rendered manifests, for each
/// supported Kubernetes version; unknown fields are errors.
pub fn validate_manifests(validate: &Path, rendered: &str) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, rendered).unwrap();
    for version in KUBERNETES_VERSIONS {
        let output = Command::new(validate)
            .args(["--strict", "--quiet", "--kubernetes-version", version])
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "kubernetes-validate --strict against {version} failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

pub fn args(docs: &[Value]) -> Vec<String> {
    let deployment = one(docs, "Deployment");
    deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect()
}
