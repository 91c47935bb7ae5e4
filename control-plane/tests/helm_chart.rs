//! The Helm chart in `deploy/helm/trellis`, checked with the real tools:
//! `helm lint`, `helm template` with default and non-default values, and
//! `kubernetes-validate --strict` (the Kubernetes OpenAPI schemas, offline)
//! on every rendered manifest; the rendered RBAC is compared rule by rule
//! with the least-privilege list of issue 6.
//!
//! No Kubernetes API server can run on these machines, so nothing is
//! installed: the rendered manifests stand in for what `helm install` would
//! send. `scripts/install-helm.sh` installs helm (into target/tools/bin) and
//! kubernetes-validate; without them each test prints
//! `skipped: helm not installed (run scripts/install-helm.sh)` and passes,
//! except under CI (`CI` set), where a missing tool fails the test.

use trellis_control_plane::inject;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Map, Value, json};
use trellis_core::TrustDomain;
use yaml_rust2::{Yaml, YamlLoader};

const NAMESPACE: &str = "trellis-system";
/// The oldest Kubernetes the chart supports (native sidecars are on by
/// default from 1.29) and the release where they became stable.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.29.0", "1.33.0"];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn chart() -> PathBuf {
    workspace().join("deploy/helm/trellis")
}

/// A tool from `TRELLIS_TOOLS_DIR/bin` (default target/tools/bin, where
/// scripts/install-helm.sh puts it), else from PATH.
fn tool(name: &str) -> Option<PathBuf> {
    let tools = std::env::var_os("TRELLIS_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/tools"));
    let local = tools.join("bin").join(name);
    if local.is_file() {
        return Some(local);
    }
    on_path(name)
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The tools, or `None` after printing why the test is skipped. Under CI a
/// missing tool is a failure: a chart test that never runs proves nothing.
fn tools() -> Option<(PathBuf, PathBuf)> {
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
            if std::env::var_os("CI").is_some() {
                panic!("{missing} not installed under CI: run scripts/install-helm.sh first");
            }
            println!("skipped: {missing} not installed (run scripts/install-helm.sh)");
            None
        }
    }
}

/// Runs helm with a private home, so tests neither read nor write the
/// user's helm configuration.
fn run_helm(helm: &Path, args: &[&str]) -> Result<String, String> {
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

fn template(helm: &Path, sets: &[&str]) -> Result<String, String> {
    let chart = chart();
    let mut args = vec![
        "template",
        "trellis",
        chart.to_str().unwrap(),
        "--namespace",
        NAMESPACE,
    ];
    for set in sets {
        args.extend(["--set", set]);
    }
    run_helm(helm, &args)
}

/// The rendered manifests as JSON values.
fn documents(rendered: &str) -> Vec<Value> {
    YamlLoader::load_from_str(rendered)
        .unwrap_or_else(|e| panic!("helm rendered invalid YAML: {e}"))
        .iter()
        .map(to_json)
        .filter(|v| !v.is_null())
        .collect()
}

fn to_json(yaml: &Yaml) -> Value {
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

fn find<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found = find(docs, kind);
    assert_eq!(found.len(), 1, "expected one {kind}, found {}", found.len());
    found[0]
}

/// `kubernetes-validate --strict` on the rendered manifests, for each
/// supported Kubernetes version; unknown fields are errors.
fn validate_manifests(validate: &Path, rendered: &str) {
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

fn args(docs: &[Value]) -> Vec<String> {
    let deployment = one(docs, "Deployment");
    deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect()
}

/// `helm lint --strict` passes with the default values and with others.
#[test]
fn helm_lint_passes() {
    let Some((helm, _)) = tools() else { return };
    let chart = chart();
    let chart = chart.to_str().unwrap();
    run_helm(&helm, &["lint", "--strict", chart]).unwrap();
    run_helm(
        &helm,
        &[
            "lint",
            "--strict",
            chart,
            "--set",
            "trustDomain=example.org,replicas=3,defaultPolicy=allow-same-namespace",
        ],
    )
    .unwrap();
}

/// With the default values every manifest passes strict schema validation,
/// and the control plane gets the mesh defaults of DESIGN.md.
#[test]
fn default_values_render_valid_manifests() {
    let Some((helm, validate)) = tools() else {
        return;
    };
    let rendered = template(&helm, &[]).unwrap();
    validate_manifests(&validate, &rendered);
    let docs = documents(&rendered);
    let mut kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    kinds.sort_unstable();
    assert_eq!(
        kinds,
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "CustomResourceDefinition",
            "CustomResourceDefinition",
            "Deployment",
            "MutatingWebhookConfiguration",
            "PodDisruptionBudget",
            "Role",
            "RoleBinding",
            "Secret",
            "Secret",
            "Service",
            "ServiceAccount",
            "ValidatingWebhookConfiguration",
        ]
    );
    let args = args(&docs);
    for expected in [
        "--trust-domain=cluster.local",
        "--cert-ttl=1h",
        "--default-policy=deny",
        "--outbound-policy=deny",
        "--listen=0.0.0.0:15012",
        "--admin=0.0.0.0:15014",
        "--store=kubernetes",
        "--webhook=0.0.0.0:15017",
    ] {
        assert!(args.iter().any(|a| a == expected), "{expected} in {args:?}");
    }
    assert!(
        !args.iter().any(|a| a.starts_with("--opaque-ports")),
        "no mesh-wide opaque ports unless asked: {args:?}"
    );
    assert_eq!(one(&docs, "Deployment")["spec"]["replicas"], 2);
}

/// Non-default values reach the control plane and still validate.
#[test]
fn custom_values_render_valid_manifests() {
    let Some((helm, validate)) = tools() else {
        return;
    };
    let rendered = template(
        &helm,
        &[
            "trustDomain=example.org",
            "replicas=3",
            "defaultPolicy=allow-same-namespace",
            "outboundPolicy=passthrough",
            "opaquePorts={5432,25}",
            "certTTL=30m",
            "antiAffinity=hard",
            "injection.failurePolicy=Fail",
            "injection.excludeOutboundPorts={5432,6379}",
            "image.repository=registry.example.com/mesh/trellis",
            "image.tag=0.1.0-rc1",
            "crds.keep=false",
        ],
    )
    .unwrap();
    validate_manifests(&validate, &rendered);
    let docs = documents(&rendered);
    let deployment = one(&docs, "Deployment");
    assert_eq!(deployment["spec"]["replicas"], 3);
    let args = args(&docs);
    for expected in [
        "--trust-domain=example.org",
        "--default-policy=allow-same-namespace",
        "--outbound-policy=passthrough",
        "--opaque-ports=5432,25",
        "--cert-ttl=30m",
    ] {
        assert!(args.iter().any(|a| a == expected), "{expected} in {args:?}");
    }
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(
        pod["containers"][0]["image"],
        "registry.example.com/mesh/trellis:0.1.0-rc1"
    );
    assert!(
        pod["affinity"]["podAntiAffinity"]
            .get("requiredDuringSchedulingIgnoredDuringExecution")
            .is_some()
    );
    let mutating = one(&docs, "MutatingWebhookConfiguration");
    for webhook in mutating["webhooks"].as_array().unwrap() {
        assert_eq!(webhook["failurePolicy"], "Fail");
    }
    for crd in find(&docs, "CustomResourceDefinition") {
        assert!(crd["metadata"].get("annotations").is_none());
    }
}

/// Invalid values are refused by the chart's schema, naming the value.
#[test]
fn invalid_values_are_refused() {
    let Some((helm, _)) = tools() else { return };
    for (set, names) in [
        ("defaultPolicy=allow-all", "defaultPolicy"),
        ("trustDomain=Example.ORG", "trustDomain"),
        (
            "injection.tokenExpirationSeconds=60",
            "tokenExpirationSeconds",
        ),
        ("replicas=0", "replicas"),
        ("opaquePorts={0}", "opaquePorts"),
        ("injection.failurePolicy=Maybe", "failurePolicy"),
    ] {
        let e = template(&helm, &[set]).unwrap_err();
        assert!(e.contains(names), "{set}: {e}");
    }
}

/// The rule list of a Role or ClusterRole, normalised for comparison.
fn rules(role: &Value) -> Vec<Value> {
    role["rules"].as_array().unwrap().clone()
}

/// The control plane may create tokenreviews, read pods and the Trellis
/// CRDs, write AuthorizationPolicies (the Admin API's applies and deletes
/// with the Kubernetes store), and read and update the one CA Secret, by
/// name, in its own namespace: nothing else, compared rule by rule.
#[test]
fn rbac_grants_nothing_beyond_the_list() {
    let Some((helm, _)) = tools() else { return };
    let docs = documents(&template(&helm, &[]).unwrap());
    let cluster_role = one(&docs, "ClusterRole");
    assert_eq!(
        rules(cluster_role),
        [
            json!({"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]}),
            json!({"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}),
            json!({"apiGroups": ["trellis.io"], "resources": ["authorizationpolicies", "ratelimitpolicies"],
                   "verbs": ["get", "list", "watch"]}),
            json!({"apiGroups": ["trellis.io"], "resources": ["authorizationpolicies", "ratelimitpolicies"],
                   "verbs": ["create", "update", "delete"]}),
        ]
    );
    assert!(
        cluster_role.get("aggregationRule").is_none(),
        "an aggregated ClusterRole could gain rules"
    );
    let role = one(&docs, "Role");
    assert_eq!(role["metadata"]["namespace"], NAMESPACE);
    assert_eq!(
        rules(role),
        [
            json!({"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["trellis-ca"],
                "verbs": ["get", "update"]})
        ]
    );
    // The named Secret is the CA the chart creates, kept on uninstall.
    let ca = find(&docs, "Secret")
        .into_iter()
        .find(|s| s["metadata"]["name"] == "trellis-ca")
        .expect("the CA Secret");
    assert_eq!(ca["metadata"]["namespace"], NAMESPACE);
    assert_eq!(
        ca["metadata"]["annotations"]["helm.sh/resource-policy"],
        "keep"
    );

    // Each binding gives its role to the control plane's account only.
    let subject = json!([{"kind": "ServiceAccount", "name": "trellis-control-plane", "namespace": NAMESPACE}]);
    for (binding, role_kind, role) in [
        ("ClusterRoleBinding", "ClusterRole", cluster_role),
        ("RoleBinding", "Role", role),
    ] {
        let binding = one(&docs, binding);
        assert_eq!(binding["subjects"], subject);
        assert_eq!(
            binding["roleRef"],
            json!({"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind,
                   "name": role["metadata"]["name"]})
        );
    }
    let account = one(&docs, "ServiceAccount");
    assert_eq!(account["metadata"]["name"], "trellis-control-plane");
    assert_eq!(account["automountServiceAccountToken"], false);
}

/// The control plane runs hardened: non-root, read-only root filesystem, no
/// privilege escalation, no capabilities, seccomp RuntimeDefault, probes on
/// the admin port, spread over nodes, with a disruption budget.
#[test]
fn control_plane_deployment_is_hardened() {
    let Some((helm, _)) = tools() else { return };
    let docs = documents(&template(&helm, &[]).unwrap());
    let pod = &one(&docs, "Deployment")["spec"]["template"];
    assert_eq!(pod["metadata"]["labels"]["trellis.io/inject"], "disabled");
    let spec = &pod["spec"];
    assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        spec["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    assert_eq!(spec["automountServiceAccountToken"], true);
    let container = &spec["containers"][0];
    assert_eq!(
        container["securityContext"],
        json!({"runAsNonRoot": true, "allowPrivilegeEscalation": false, "privileged": false,
               "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]},
               "seccompProfile": {"type": "RuntimeDefault"}})
    );
    for (probe, path) in [("livenessProbe", "/live"), ("readinessProbe", "/ready")] {
        assert_eq!(
            container[probe]["httpGet"],
            json!({"path": path, "port": "admin"})
        );
    }
    let admin = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "admin")
        .unwrap();
    assert_eq!(admin["containerPort"], 15014);
    assert!(container["resources"]["requests"]["cpu"].is_string());
    assert!(container["resources"]["limits"]["memory"].is_string());
    assert!(
        spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
            .is_array()
    );
    let pdb = one(&docs, "PodDisruptionBudget");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        one(&docs, "Deployment")["spec"]["selector"]["matchLabels"]
    );

    let service = one(&docs, "Service");
    let ports: Vec<(Value, Value)> = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["port"].clone(), p["targetPort"].clone()))
        .collect();
    assert_eq!(
        ports,
        [
            (json!(15012), json!("grpc")),
            (json!(15017), json!("webhook"))
        ]
    );
}

/// The webhooks call the Service over HTTPS at /inject and /validate, trust
/// the CA that signed the serving certificate in the Secret, and select
/// only opted-in namespaces and pods, never the control plane's own.
#[test]
fn webhooks_use_the_generated_serving_certificate() {
    let Some((helm, _)) = tools() else { return };
    let docs = documents(&template(&helm, &[]).unwrap());
    let tls = find(&docs, "Secret")
        .into_iter()
        .find(|s| s["type"] == "kubernetes.io/tls")
        .expect("the serving certificate Secret");
    let ca_bundle = tls["data"]["ca.crt"].as_str().unwrap();
    let mutating = one(&docs, "MutatingWebhookConfiguration");
    let validating = one(&docs, "ValidatingWebhookConfiguration");
    let webhooks: Vec<&Value> = mutating["webhooks"]
        .as_array()
        .unwrap()
        .iter()
        .chain(validating["webhooks"].as_array().unwrap())
        .collect();
    assert_eq!(webhooks.len(), 3);
    for webhook in &webhooks {
        assert_eq!(webhook["clientConfig"]["caBundle"], ca_bundle);
        assert_eq!(
            webhook["clientConfig"]["service"]["name"],
            "trellis-control-plane"
        );
        assert_eq!(webhook["clientConfig"]["service"]["port"], 15017);
        assert_eq!(webhook["sideEffects"], "None");
        assert_eq!(webhook["admissionReviewVersions"], json!(["v1"]));
    }
    let (inject, validate) = (&webhooks[..2], webhooks[2]);
    for webhook in inject {
        assert_eq!(webhook["clientConfig"]["service"]["path"], "/inject");
        assert_eq!(webhook["failurePolicy"], "Ignore");
        assert_eq!(webhook["rules"][0]["resources"], json!(["pods"]));
        assert_eq!(webhook["rules"][0]["operations"], json!(["CREATE"]));
        let excluded = webhook["namespaceSelector"]["matchExpressions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["key"] == "kubernetes.io/metadata.name")
            .unwrap();
        assert_eq!(excluded["operator"], "NotIn");
        assert_eq!(excluded["values"], json!([NAMESPACE, "kube-system"]));
    }
    assert_eq!(
        inject[0]["namespaceSelector"]["matchExpressions"][0],
        json!({"key": "trellis.io/inject", "operator": "In", "values": ["enabled"]})
    );
    assert_eq!(
        inject[1]["objectSelector"],
        json!({"matchLabels": {"trellis.io/inject": "enabled"}})
    );
    assert_eq!(validate["clientConfig"]["service"]["path"], "/validate");
    assert_eq!(validate["failurePolicy"], "Fail");
    assert_eq!(validate["rules"][0]["apiGroups"], json!(["trellis.io"]));
    assert_eq!(
        validate["rules"][0]["resources"],
        json!(["authorizationpolicies", "ratelimitpolicies"])
    );

    // The certificate names the Service as the API server dials it.
    use base64::Engine as _;
    let pem = base64::engine::general_purpose::STANDARD
        .decode(tls["data"]["tls.crt"].as_str().unwrap())
        .unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    let cert = pem.parse_x509().unwrap();
    let names: Vec<String> = cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|n| n.to_string())
        .collect();
    let expected = format!("DNSName(trellis-control-plane.{NAMESPACE}.svc)");
    assert!(names.contains(&expected), "{names:?}");
}

/// The injection settings the chart renders are read by the control
/// plane's parser, and carry the chart's values.
#[test]
fn rendered_injection_settings_parse() {
    let Some((helm, _)) = tools() else { return };
    let docs = documents(
        &template(
            &helm,
            &[
                "injection.tokenExpirationSeconds=7200",
                "injection.excludeOutboundCIDRs={169.254.169.254/32}",
            ],
        )
        .unwrap(),
    );
    let settings = one(&docs, "ConfigMap")["data"]["inject.json"]
        .as_str()
        .unwrap()
        .to_owned();
    let td = TrustDomain::new("cluster.local").unwrap();
    let config = inject::InjectConfig::from_settings(&settings, td, "PEM".into())
        .unwrap_or_else(|e| panic!("{e}\n{settings}"));
    assert_eq!(config.image, "trellis/trellis:0.1.0");
    assert_eq!(
        config.control_plane,
        format!("trellis-control-plane.{NAMESPACE}.svc:15012")
    );
    assert_eq!(config.token_expiration_seconds, 7200);
    assert_eq!(config.exclude_outbound_cidrs, ["169.254.169.254/32"]);
    assert_eq!(config.proxy_resources.requests_cpu.as_deref(), Some("50m"));
    assert_eq!(
        config.trust_bundle,
        inject::TrustBundleSource::Annotation("PEM".into())
    );
}

/// Every field of the policy documents (issue 3) has a place in the CRD
/// schema, so `kubectl explain` documents it; a field the library gains
/// makes this test fail until the CRD describes it too.
#[test]
fn crd_schema_covers_the_policy_document() {
    let Some((helm, _)) = tools() else { return };
    let docs = documents(&template(&helm, &[]).unwrap());
    let crd = find(&docs, "CustomResourceDefinition")
        .into_iter()
        .find(|c| c["spec"]["names"]["kind"] == "AuthorizationPolicy")
        .unwrap();
    assert_eq!(crd["spec"]["group"], "trellis.io");
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    let schema = &version["schema"]["openAPIV3Schema"];

    let full = json!({
        "apiVersion": "trellis.io/v1alpha1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "all-fields", "namespace": "shop"},
        "spec": {
            "selector": {"spiffeIds": ["spiffe://cluster.local/ns/shop/sa/api"]},
            "action": "ALLOW",
            "rules": [{
                "from": [{"spiffeId": "spiffe://cluster.local/ns/shop/sa/web"},
                         {"namespace": "monitoring"}, {"trustDomain": "cluster.local"}],
                "to": [{"ports": [8080]}],
            }],
        },
    });
    // Round-trip through the library, so only fields it knows are walked.
    let trellis_core::policy::Document::AuthorizationPolicy(policy) =
        trellis_core::policy::Document::from_value(full).unwrap()
    else {
        unreachable!()
    };
    let value = serde_json::to_value(&policy).unwrap();
    covers(&value["spec"], "spec", &schema["properties"]["spec"]);
    // Unknown fields reach the validating webhook rather than being pruned.
    assert_eq!(
        schema["properties"]["spec"]["x-kubernetes-preserve-unknown-fields"],
        true
    );
}

fn covers(value: &Value, path: &str, schema: &Value) {
    match value {
        Value::Object(map) => {
            assert_eq!(schema["type"], "object", "{path} is an object in the CRD");
            for (key, v) in map {
                let field = &schema["properties"][key];
                assert!(!field.is_null(), "the CRD schema lacks {path}.{key}");
                covers(v, &format!("{path}.{key}"), field);
            }
        }
        Value::Array(items) => {
            assert_eq!(schema["type"], "array", "{path} is an array in the CRD");
            for item in items {
                covers(item, &format!("{path}[]"), &schema["items"]);
            }
        }
        Value::String(_) => assert_eq!(schema["type"], "string", "{path}"),
        Value::Number(_) => assert_eq!(schema["type"], "integer", "{path}"),
        _ => {}
    }
}

/// Without `crds.install` the chart renders no CRDs (for clusters that
/// manage CRDs separately).
#[test]
fn crds_can_be_left_out() {
    let Some((helm, _)) = tools() else { return };
    let docs = documents(&template(&helm, &["crds.install=false"]).unwrap());
    assert!(find(&docs, "CustomResourceDefinition").is_empty());
}

/// The serving certificate and key Helm generates (RSA, PKCS#1) load in the
/// webhook server's TLS, as they will from the mounted Secret.
#[test]
fn rendered_serving_certificate_loads() {
    let Some((helm, _)) = tools() else { return };
    let docs = documents(&template(&helm, &[]).unwrap());
    let tls = find(&docs, "Secret")
        .into_iter()
        .find(|s| s["type"] == "kubernetes.io/tls")
        .unwrap();
    use base64::Engine as _;
    let dir = tempfile::tempdir().unwrap();
    for name in ["tls.crt", "tls.key"] {
        let pem = base64::engine::general_purpose::STANDARD
            .decode(tls["data"][name].as_str().unwrap())
            .unwrap();
        std::fs::write(dir.path().join(name), pem).unwrap();
    }
    let files = inject::server::ServingFiles::load(
        &dir.path().join("tls.crt"),
        &dir.path().join("tls.key"),
    )
    .unwrap();
    inject::server::tls_config(std::sync::Arc::new(files)).unwrap();
}

/// NOTES.txt renders with default and non-default values and names the
/// next steps: label a namespace, apply a policy, check the workloads.
#[test]
fn notes_name_the_next_steps() {
    let Some((helm, _)) = tools() else { return };
    let chart = chart();
    for sets in [
        "trustDomain=cluster.local",
        "trustDomain=example.org,defaultPolicy=allow-same-namespace",
    ] {
        let out = run_helm(
            &helm,
            &[
                "install",
                "trellis",
                chart.to_str().unwrap(),
                "--namespace",
                NAMESPACE,
                "--dry-run=client",
                "--set",
                sets,
            ],
        )
        .unwrap();
        let notes = &out[out.find("NOTES:").expect("NOTES are printed")..];
        for step in [
            "kubectl label namespace NAMESPACE trellis.io/inject=enabled",
            "kind: AuthorizationPolicy",
            "trellisctl --control-plane 127.0.0.1:15012",
        ] {
            assert!(notes.contains(step), "{step} in {notes}");
        }
        if sets.contains("example.org") {
            assert!(notes.contains("spiffe://example.org/ns/NAMESPACE/sa/web"));
            assert!(notes.contains("allow-same-namespace"));
        }
    }
}
