//! What the rendered Helm chart carries besides the control plane itself:
//! the webhooks and their generated serving certificate, the injection
//! settings the control plane parses, the trust anchors, the CRDs (and
//! leaving them out), and the install notes. Checked on `helm template`
//! output with the real tools.
//!
//! No Kubernetes API server can run on these machines, so nothing is
//! installed: the rendered manifests stand in for what `helm install` would
//! send. Without helm and kubernetes-validate each test says
//! `skipped: helm not installed (run scripts/install-helm.sh)` and passes,
//! except under CI (`CI` set), where a missing tool fails the test.

mod admission;
mod chart;
// Only the stand-in API server from `common`: all of it would load the
// `machine` module that `chart` includes a second time.
#[allow(dead_code)]
#[path = "common/serving.rs"]
mod serving;

use std::path::Path;
use std::time::Duration;

use chart::*;
use serde_json::{Value, json};
use trellis_control_plane::ca::{CertificateAuthority, load_trust_anchors};
use trellis_control_plane::inject;
use trellis_core::TrustDomain;

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
    assert_eq!(webhooks.len(), 5);
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
    let (inject, validate) = (&webhooks[..4], webhooks[4]);
    let paths: Vec<&Value> = inject
        .iter()
        .map(|w| &w["clientConfig"]["service"]["path"])
        .collect();
    assert_eq!(
        paths,
        [
            "/inject",
            "/inject",
            "/inject/unknown-pod-label",
            "/inject/unknown-namespace-label"
        ]
    );
    for (i, webhook) in inject.iter().enumerate() {
        // The injecting entries fail closed; the warning-only ones never
        // block a pod.
        let policy = if i < 2 { "Fail" } else { "Ignore" };
        assert_eq!(webhook["failurePolicy"], policy);
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

/// Whether a label selector of a webhook (`namespaceSelector`,
/// `objectSelector`) selects `labels`, as the API server decides: every
/// `matchLabels` pair and every `matchExpressions` requirement holds
/// (`NotIn` holds for a missing key); no selector selects everything.
fn selects(selector: &Value, labels: &std::collections::BTreeMap<&str, &str>) -> bool {
    let match_labels = selector["matchLabels"].as_object().into_iter().flatten();
    let expressions = selector["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten();
    match_labels
        .map(|(key, value)| labels.get(key.as_str()).copied() == value.as_str())
        .chain(expressions.map(|e| {
            let value = labels.get(e["key"].as_str().unwrap()).copied();
            let listed = |v: &str| e["values"].as_array().unwrap().iter().any(|l| l == v);
            match e["operator"].as_str().unwrap() {
                "In" => value.is_some_and(listed),
                "NotIn" => !value.is_some_and(listed),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                other => panic!("operator {other}"),
            }
        }))
        .all(|holds| holds)
}

/// Every combination of the label `trellis.io/inject` on a namespace and
/// on a pod (none, `enabled`, `disabled`, a typo), as the API server
/// matches the rendered webhooks' selectors and the control plane answers
/// the one it calls: no pod is sent to two webhooks; a pod that opted in,
/// by its namespace or itself, is injected; a pod of a namespace that
/// opted in whose own label is mistyped is denied, naming the label and
/// its value; a mistyped label, of the pod or of a namespace that did not
/// opt in otherwise, is warned of and the pod admitted as it is, by a
/// webhook whose failure never blocks the pod (`Ignore`, even under
/// `injection.failurePolicy=Fail`), and recorded for `trellisctl check`
/// with the pod's value; the control plane's own namespace and
/// kube-system are never sent anything.
#[test]
fn every_inject_label_combination_is_injected_denied_or_warned_of_once() {
    use std::collections::BTreeMap;
    use trellis_control_plane::inject::server::respond;
    use trellis_control_plane::metrics::Metrics;

    let Some((helm, _)) = tools() else { return };
    let docs = documents(&template(&helm, &["injection.failurePolicy=Fail"]).unwrap());
    let webhooks = one(&docs, "MutatingWebhookConfiguration")["webhooks"]
        .as_array()
        .unwrap();
    let settings = one(&docs, "ConfigMap")["data"]["inject.json"]
        .as_str()
        .unwrap();
    let td = TrustDomain::new("cluster.local").unwrap();
    let config = inject::InjectConfig::from_settings(settings, td, "PEM".into()).unwrap();
    let path = format!(
        "{}/tests/fixtures/k8s/pod-unlabelled-namespace.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let review: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();

    let pod_typo = "trellis: metadata.labels[trellis.io/inject] is \"true\", neither \
                    \"enabled\" nor \"disabled\": ignored, so the pod";
    let namespace_typo = "trellis: the namespace's label trellis.io/inject is neither \
                          \"enabled\" nor \"disabled\": pods here are not injected";
    let pod_denial = "trellis: cannot inject: metadata.labels[trellis.io/inject]: expected \
                      \"enabled\" or \"disabled\", got \"true\"";
    let values = [None, Some("enabled"), Some("disabled"), Some("true")];
    for namespace_name in ["legacy", NAMESPACE, "kube-system"] {
        for namespace_value in values {
            for pod_value in values {
                let mut namespace =
                    BTreeMap::from([("kubernetes.io/metadata.name", namespace_name)]);
                let mut pod_labels = BTreeMap::from([("run", "debug")]);
                if let Some(value) = namespace_value {
                    namespace.insert("trellis.io/inject", value);
                }
                if let Some(value) = pod_value {
                    pod_labels.insert("trellis.io/inject", value);
                }
                let case = format!("namespace {namespace:?}, pod {pod_labels:?}");
                let called: Vec<&Value> = webhooks
                    .iter()
                    .filter(|w| {
                        selects(&w["namespaceSelector"], &namespace)
                            && selects(&w["objectSelector"], &pod_labels)
                    })
                    .collect();
                assert!(called.len() <= 1, "{case}: sent to {called:?}");

                // What the pod's author sees: why it was denied, or
                // whether it got a sidecar, and the warnings; and what the
                // control plane records for `trellisctl check`.
                let uninjected = inject::UninjectedPods::default();
                let (denial, injected, warnings) = match called.first() {
                    None => (None, false, Vec::new()),
                    Some(webhook) => {
                        let path = webhook["clientConfig"]["service"]["path"].as_str().unwrap();
                        if path != "/inject" {
                            assert_eq!(webhook["failurePolicy"], "Ignore", "{case}");
                            assert_eq!(webhook["reinvocationPolicy"], "Never", "{case}");
                        }
                        let mut review = review.clone();
                        let pod = &mut review["request"]["object"]["metadata"];
                        pod["namespace"] = json!(namespace_name);
                        pod["labels"] = json!(pod_labels);
                        let body = serde_json::to_vec(&review).unwrap();
                        let (status, _, answer) = respond(
                            &http::Method::POST,
                            path,
                            &body,
                            &config,
                            &Metrics::default(),
                            &uninjected,
                        );
                        assert_eq!(status, http::StatusCode::OK, "{case}");
                        let answer: Value = serde_json::from_slice(&answer).unwrap();
                        let denial = match answer["response"]["allowed"].as_bool() {
                            Some(true) => None,
                            Some(false) => answer["response"]["status"]["message"].as_str(),
                            None => panic!("{case}: {answer}"),
                        }
                        .map(str::to_owned);
                        let warnings: Vec<String> = answer["response"]["warnings"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|w| w.as_str().unwrap().to_owned())
                            .collect();
                        (denial, answer["response"].get("patch").is_some(), warnings)
                    }
                };

                let excluded = namespace_name != "legacy";
                let denied =
                    !excluded && namespace_value == Some("enabled") && pod_value == Some("true");
                assert_eq!(
                    denial.as_deref(),
                    denied.then_some(pod_denial),
                    "{case}: {warnings:?}"
                );
                let opted_in = !excluded
                    && !denied
                    && pod_value != Some("disabled")
                    && (namespace_value == Some("enabled") || pod_value == Some("enabled"));
                assert_eq!(injected, opted_in, "{case}: {warnings:?}");
                let expected = if excluded || denied {
                    None
                } else if pod_value == Some("true") {
                    Some(pod_typo)
                } else if namespace_value == Some("true") && pod_value.is_none() {
                    Some(namespace_typo)
                } else {
                    None
                };
                match expected {
                    Some(expected) => assert!(
                        warnings.len() == 1 && warnings[0].starts_with(expected),
                        "{case}: {warnings:?}"
                    ),
                    None => assert!(warnings.is_empty(), "{case}: {warnings:?}"),
                }
                // A pod admitted without a sidecar for a mistyped label is
                // recorded, by its namespace and name, with the pod's value.
                let recorded: Vec<_> = uninjected
                    .recent()
                    .into_iter()
                    .map(|(pod, _)| (pod.owner.namespace, pod.owner.name, pod.value))
                    .collect();
                let expected = expected.map(|_| {
                    let value = pod_value.filter(|_| expected == Some(pod_typo));
                    (
                        namespace_name.to_owned(),
                        "debug".to_owned(),
                        value.map(str::to_owned),
                    )
                });
                assert_eq!(recorded, Vec::from_iter(expected), "{case}");
            }
        }
    }
}

/// Injection fails closed by default: both injecting entries are `Fail`
/// and the control plane's settings deny what it cannot inject, so a pod
/// of a meshed namespace created while no replica answers is refused (its
/// controller retries it) instead of running outside the mesh unrecorded.
/// `Ignore` stays selectable. The control plane still starts under `Fail`:
/// its own pods, in its namespace (labelled `enabled` or not) and in
/// kube-system, are sent to no `Fail` entry. One replica under `Fail` is
/// refused, naming the ways out, unless accepted, and the notes then warn
/// of it; one replica under `Ignore` renders.
#[test]
fn injection_fails_closed_by_default_and_the_control_plane_still_starts() {
    use std::collections::BTreeMap;

    let Some((helm, validate)) = tools() else {
        return;
    };
    let policies = |docs: &[Value]| -> Vec<(String, String)> {
        one(docs, "MutatingWebhookConfiguration")["webhooks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| {
                (
                    w["clientConfig"]["service"]["path"]
                        .as_str()
                        .unwrap()
                        .to_owned(),
                    w["failurePolicy"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let expected = |policy: &str| -> Vec<(String, String)> {
        [
            ("/inject", policy),
            ("/inject", policy),
            ("/inject/unknown-pod-label", "Ignore"),
            ("/inject/unknown-namespace-label", "Ignore"),
        ]
        .iter()
        .map(|(p, f)| (p.to_string(), f.to_string()))
        .collect()
    };
    let docs = documents(&template(&helm, &[]).unwrap());
    assert_eq!(policies(&docs), expected("Fail"));
    assert_eq!(
        rendered_injection_config(&helm, &[]).failure_policy,
        inject::FailurePolicy::Fail
    );
    let ignore = documents(&template(&helm, &["injection.failurePolicy=Ignore"]).unwrap());
    assert_eq!(policies(&ignore), expected("Ignore"));

    // The control plane's own pods, as its Deployment labels them, in its
    // namespace (even labelled for injection) and in kube-system.
    let deployment = one(&docs, "Deployment");
    let template_labels = deployment["spec"]["template"]["metadata"]["labels"]
        .as_object()
        .unwrap();
    let pod: BTreeMap<&str, &str> = template_labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str().unwrap()))
        .collect();
    let mut unlabelled_pod = pod.clone();
    unlabelled_pod.remove("trellis.io/inject");
    for namespace_name in [NAMESPACE, "kube-system"] {
        for namespace_value in [None, Some("enabled")] {
            let mut namespace = BTreeMap::from([("kubernetes.io/metadata.name", namespace_name)]);
            if let Some(value) = namespace_value {
                namespace.insert("trellis.io/inject", value);
            }
            for labels in [&pod, &unlabelled_pod] {
                let called: Vec<&Value> = one(&docs, "MutatingWebhookConfiguration")["webhooks"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|w| {
                        selects(&w["namespaceSelector"], &namespace)
                            && selects(&w["objectSelector"], labels)
                    })
                    .collect();
                assert!(called.is_empty(), "{namespace:?} {labels:?}: {called:?}");
            }
        }
    }

    // One replica: refused under Fail, naming the ways out; nothing renders.
    let e = template(&helm, &["replicas=1"]).unwrap_err();
    assert!(
        e.contains(
            "replicas: 1 with injection.failurePolicy: Fail refuses every pod of the meshed \
             namespaces whenever that replica is down"
        ) && e.contains("set replicas: 2 or more, or injection.singleReplicaAccepted: true")
            && e.contains("or injection.failurePolicy: Ignore"),
        "{e}"
    );
    assert!(!e.contains("kind: Deployment"), "{e}");
    // Accepted: it renders and validates, and the notes warn of it.
    let accepted = template(
        &helm,
        &["replicas=1", "injection.singleReplicaAccepted=true"],
    )
    .unwrap();
    validate_manifests(&validate, &accepted);
    let chart = chart();
    let warning = "WARNING: one control-plane replica with injection.failurePolicy Fail";
    let notes = install_notes(
        &helm,
        &chart,
        &["--set", "replicas=1,injection.singleReplicaAccepted=true"],
    );
    assert!(notes.contains(warning), "{notes}");
    assert!(
        notes.contains(
            "failurePolicy Fail (pods of meshed namespaces are refused while no replica answers)"
        ),
        "{notes}"
    );
    let notes = install_notes(&helm, &chart, &[]);
    assert!(!notes.contains(warning), "{notes}");
    // Under Ignore one replica loses no pod, only its sidecar: rendered, and
    // the notes say what Ignore does.
    template(&helm, &["replicas=1", "injection.failurePolicy=Ignore"]).unwrap();
    let notes = install_notes(
        &helm,
        &chart,
        &["--set", "replicas=1,injection.failurePolicy=Ignore"],
    );
    assert!(!notes.contains(warning), "{notes}");
    assert!(
        notes.contains("start without a sidecar, unrecorded, while no replica answers"),
        "{notes}"
    );
}

/// The injecting entries are reinvoked (`IfNeeded`), the warning-only
/// ones not (`Never`: they change nothing): called again after a later
/// webhook added a container, the control plane rewrites that container's
/// probe to the sidecar's admin port, as it did the others', and the
/// sidecar is told of its check; called once more, it changes nothing.
/// Shown on a real AdmissionReview document (fixtures/k8s) with the
/// settings the chart renders: injected, patched, a container added, and
/// reviewed again; no Kubernetes API server can run here.
#[test]
fn injecting_webhooks_are_reinvoked() {
    use base64::Engine as _;
    use trellis_control_plane::inject::server::respond;
    use trellis_control_plane::metrics::Metrics;

    let Some((helm, _)) = tools() else { return };
    for sets in [&[][..], &["injection.failurePolicy=Ignore"][..]] {
        let docs = documents(&template(&helm, sets).unwrap());
        let webhooks = one(&docs, "MutatingWebhookConfiguration")["webhooks"]
            .as_array()
            .unwrap();
        let mut injecting = 0;
        for webhook in webhooks {
            let expected = if webhook["clientConfig"]["service"]["path"] == "/inject" {
                injecting += 1;
                "IfNeeded"
            } else {
                "Never"
            };
            assert_eq!(
                webhook["reinvocationPolicy"], expected,
                "{sets:?}: {webhook}"
            );
        }
        assert_eq!(injecting, 2, "{sets:?}");
    }

    let config = rendered_injection_config(&helm, &[]);
    let review_of = |review: &Value| -> Value {
        let (status, _, answer) = respond(
            &http::Method::POST,
            "/inject",
            &serde_json::to_vec(review).unwrap(),
            &config,
            &Metrics::default(),
            &inject::UninjectedPods::default(),
        );
        assert_eq!(status, http::StatusCode::OK);
        let answer: Value = serde_json::from_slice(&answer).unwrap();
        assert_eq!(answer["response"]["allowed"], true, "{answer}");
        answer
    };
    let apply = |review: &mut Value, answer: &Value| {
        let patch = base64::engine::general_purpose::STANDARD
            .decode(answer["response"]["patch"].as_str().expect("a patch"))
            .unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
        json_patch::patch(&mut review["request"]["object"], &patch).unwrap();
    };
    let path = format!(
        "{}/tests/fixtures/k8s/pod-deployment-http-probes.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let mut review: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let answer = review_of(&review);
    apply(&mut review, &answer);
    let injected = review["request"]["object"].clone();
    let probe = json!({"httpGet": {"path": "/healthz", "port": 9000, "scheme": "HTTP"}});
    review["request"]["object"]["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "vault-agent", "image": "registry.example.com/vault:1", "readinessProbe": probe}));
    let again = review_of(&review);
    apply(&mut review, &again);
    let pod = &review["request"]["object"];
    assert_eq!(
        pod["spec"]["containers"][2]["readinessProbe"],
        json!({"httpGet": {"path": "/app-health/vault-agent/readiness", "port": 15020, "scheme": "HTTP"}})
    );
    assert_eq!(
        pod["spec"]["containers"].as_array().unwrap()[..2],
        injected["spec"]["containers"].as_array().unwrap()[..2]
    );
    let sidecar = pod["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "trellis-proxy")
        .unwrap();
    let probes = sidecar["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "TRELLIS_APP_PROBES")
        .unwrap();
    let probes: Value = serde_json::from_str(probes["value"].as_str().unwrap()).unwrap();
    assert_eq!(
        probes["/app-health/vault-agent/readiness"],
        json!({"httpGet": {"port": 9000, "path": "/healthz", "scheme": "HTTP"}})
    );
    let third = review_of(&review);
    assert!(third["response"].get("patch").is_none(), "{third}");
}

/// The injection settings the chart renders are read by the control
/// plane's parser, and carry the chart's values.
#[test]
fn rendered_injection_settings_parse() {
    let Some((helm, _)) = tools() else { return };
    let config = rendered_injection_config(
        &helm,
        &[
            "injection.tokenExpirationSeconds=7200",
            "injection.excludeOutboundCIDRs={169.254.169.254/32}",
            "injection.ipFamilies={IPv6,IPv4}",
            "injection.tcpUserTimeout=1m30s",
            "injection.proxy.maxH2ConnectionsPerPeer=64",
            "injection.proxy.maxH2Connections=4096",
            "imagePullSecrets[0].name=mirror-pull",
            "imagePullSecrets[1].name=team-pull",
        ],
    );
    assert_eq!(config.image, "trellis/trellis:0.1.0");
    // The secrets the control plane pulls the image with are the injected
    // pods' too: the sidecar and init run the same image.
    assert_eq!(config.image_pull_secrets, ["mirror-pull", "team-pull"]);
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
    assert_eq!(
        config.ip_families,
        [inject::IpFamily::V6, inject::IpFamily::V4]
    );
    assert_eq!(config.tcp_user_timeout, Some(Duration::from_secs(90)));
    assert_eq!(
        (
            config.max_h2_connections_per_peer,
            config.max_h2_connections
        ),
        (64, 4096)
    );
    // By default the pods are IPv4 (only or primary).
    let config = rendered_injection_config(&helm, &[]);
    assert_eq!(config.ip_families, [inject::IpFamily::V4]);
    assert!(config.image_pull_secrets.is_empty());
    // The sidecars' own default user timeout, two minutes.
    assert_eq!(config.tcp_user_timeout, Some(Duration::from_secs(120)));
    // And its HTTP/2 connection limits.
    assert_eq!(
        (
            config.max_h2_connections_per_peer,
            config.max_h2_connections
        ),
        (8, 1024)
    );
    // DNS goes straight to the pod's nameservers, which have no sidecar
    // (under outboundPolicy deny the sidecar would refuse it); port 53 of
    // any other host does not.
    assert!(config.exclude_outbound_dns);
    assert!(config.exclude_outbound_ports.is_empty());
    let config = rendered_injection_config(&helm, &["injection.excludeOutboundDNS=false"]);
    assert!(!config.exclude_outbound_dns);
    // `--set injection.tcpUserTimeout=0` (a number to helm) turns it off.
    let config = rendered_injection_config(&helm, &["injection.tcpUserTimeout=0"]);
    assert_eq!(config.tcp_user_timeout, None);
}

/// Sidecar resources the API server would refuse in every injected pod (a
/// request above the chart's default limit) are refused at `helm template`,
/// naming the value, instead of every meshed pod created after it; the
/// control plane, which has the last word, refuses the same settings at
/// start.
#[test]
fn injection_resources_the_api_server_would_refuse_are_refused() {
    let Some((helm, _)) = tools() else { return };
    let defaults: Value = serde_json::from_str(&rendered_injection_settings(&helm, &[])).unwrap();
    for (set, value, field, resource, resources) in [
        (
            "injection.proxy.resources.requests.memory=512Mi",
            "injection.proxy.resources",
            "proxyResources",
            "requests.memory 512Mi is above limits.memory 256Mi",
            json!({"requests": {"memory": "512Mi"}, "limits": {"memory": "256Mi"}}),
        ),
        (
            "injection.init.resources.requests.cpu=200m",
            "injection.init.resources",
            "initResources",
            "requests.cpu 200m is above limits.cpu 100m",
            json!({"requests": {"cpu": "200m"}, "limits": {"cpu": "100m"}}),
        ),
    ] {
        let e = template(&helm, &[set]).unwrap_err();
        assert!(e.contains(&format!("{value}: {resource}")), "{set}: {e}");
        // The rendered settings with those resources, as a chart that did
        // not check them would have written them.
        let mut settings = defaults.clone();
        settings[field] = resources;
        let td = TrustDomain::new("cluster.local").unwrap();
        let e = inject::InjectConfig::from_settings(&settings.to_string(), td, "PEM".into())
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("{field}: {resource}")), "{e}");
    }
    // Raised together, they are what the pods get.
    let config = rendered_injection_config(
        &helm,
        &[
            "injection.proxy.resources.requests.memory=512Mi",
            "injection.proxy.resources.limits.memory=1Gi",
        ],
    );
    assert_eq!(
        config.proxy_resources.requests_memory.as_deref(),
        Some("512Mi")
    );
}

/// `metrics.sidecarPodMonitor.enabled` renders a PodMonitor that scrapes
/// `/metrics` on every injected sidecar's admin port, in every namespace or
/// those listed, with the labels a Prometheus selects PodMonitors by. It
/// selects pods by the port alone (an empty selector): the port it names is
/// the one the injector, with the settings the chart renders, declares on
/// the sidecar and no container of the pod before injection has, so the
/// Prometheus Operator, which keeps only targets with that port, finds
/// injected pods and no other. Off by default: its kind exists only where
/// the Prometheus Operator is installed.
#[test]
fn sidecar_pod_monitor_scrapes_every_injected_pod() {
    let Some((helm, validate)) = tools() else {
        return;
    };
    let docs = documents(&template(&helm, &[]).unwrap());
    assert!(find(&docs, "PodMonitor").is_empty());

    let docs = validated(
        &helm,
        &validate,
        &[
            "metrics.sidecarPodMonitor.enabled=true",
            "metrics.sidecarPodMonitor.interval=15s",
            "metrics.sidecarPodMonitor.labels.release=kube-prometheus-stack",
        ],
    );
    // The sidecars' alone: the control plane's stays off.
    let monitor = one(&docs, "PodMonitor");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(monitor["metadata"]["name"], "trellis-sidecars");
    assert_eq!(monitor["metadata"]["namespace"], NAMESPACE);
    assert_eq!(
        monitor["metadata"]["labels"]["release"],
        "kube-prometheus-stack"
    );
    assert_eq!(monitor["spec"]["namespaceSelector"], json!({"any": true}));
    assert_eq!(monitor["spec"]["selector"], json!({}));
    assert_eq!(
        monitor["spec"]["podMetricsEndpoints"],
        json!([{"port": "trellis-admin", "path": "/metrics", "scheme": "http", "interval": "15s"}])
    );

    // The port of that name is the sidecar's admin port (15020, where it
    // serves /metrics), and only an injected pod has it.
    let with_port = |pod: &Value| -> Vec<(String, Value)> {
        ["initContainers", "containers"]
            .iter()
            .flat_map(|field| pod["spec"][field].as_array().cloned().unwrap_or_default())
            .flat_map(|c| {
                let name = c["name"].as_str().unwrap().to_owned();
                c["ports"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|p| p["name"] == "trellis-admin")
                    .map(move |p| (name.clone(), p["containerPort"].clone()))
            })
            .collect()
    };
    let review = admission::fixture("pod-deployment-http-probes.json");
    assert!(with_port(&review["request"]["object"]).is_empty());
    let config = rendered_injection_config(&helm, &[]);
    let reply = admission::answer(&review, inject::NamespaceScope::SelectedByWebhook, &config);
    let pod = admission::apply(
        &review["request"]["object"],
        &admission::patch_of(&reply).expect("injected"),
    );
    assert_eq!(
        with_port(&pod),
        [("trellis-proxy".to_owned(), json!(15020))]
    );

    // The namespaces listed, beside the control plane's PodMonitor.
    let docs = validated(
        &helm,
        &validate,
        &[
            "metrics.podMonitor.enabled=true",
            "metrics.sidecarPodMonitor.enabled=true",
            "metrics.sidecarPodMonitor.namespaces={shop,payments}",
        ],
    );
    let monitors = find(&docs, "PodMonitor");
    assert_eq!(monitors.len(), 2);
    let sidecars = monitors
        .iter()
        .find(|m| m["metadata"]["name"] == "trellis-sidecars")
        .unwrap();
    assert_eq!(
        sidecars["spec"]["namespaceSelector"],
        json!({"matchNames": ["shop", "payments"]})
    );

    for (set, names) in [
        ("metrics.sidecarPodMonitor.namespaces={Shop}", "namespaces"),
        (
            "metrics.sidecarPodMonitor.namespaces={shop,shop}",
            "namespaces",
        ),
        ("metrics.sidecarPodMonitor.interval=30", "interval"),
        ("metrics.sidecarPodMonitor.labels.team=1", "labels"),
        ("metrics.sidecarPodMonitor.enable=true", "enable"),
    ] {
        let e = template(&helm, &[set]).unwrap_err();
        assert!(
            e.contains("sidecarPodMonitor") && e.contains(names),
            "{set}: {e}"
        );
    }
}

/// Ephemeral storage for the injected containers, where a cluster asks every
/// container for it, reaches the settings the control plane reads
/// (`--inject-config`, the rendered ConfigMap mounted), beside cpu and
/// memory. A quantity Kubernetes cannot parse, or a request above its limit,
/// is refused at `helm template`, naming the value; the control plane
/// refuses the same settings at start, naming the field.
#[test]
fn injection_ephemeral_storage_reaches_the_control_plane() {
    let Some((helm, validate)) = tools() else {
        return;
    };
    let sets = [
        "injection.proxy.resources.requests.ephemeral-storage=100Mi",
        "injection.proxy.resources.limits.ephemeral-storage=1Gi",
        "injection.init.resources.limits.ephemeral-storage=64Mi",
    ];
    let docs = validated(&helm, &validate, &sets);
    assert!(
        args(&docs)
            .iter()
            .any(|a| a == "--inject-config=/etc/trellis/inject/inject.json"),
        "{:?}",
        args(&docs)
    );
    let config = rendered_injection_config(&helm, &sets);
    let proxy = &config.proxy_resources;
    assert_eq!(proxy.requests_ephemeral_storage.as_deref(), Some("100Mi"));
    assert_eq!(proxy.limits_ephemeral_storage.as_deref(), Some("1Gi"));
    assert_eq!(proxy.requests_memory.as_deref(), Some("64Mi"));
    let init = &config.init_resources;
    assert_eq!(init.requests_ephemeral_storage, None);
    assert_eq!(init.limits_ephemeral_storage.as_deref(), Some("64Mi"));
    // Unset by default: a cluster that does not ask for it gets none.
    let config = rendered_injection_config(&helm, &[]);
    assert_eq!(config.proxy_resources.limits_ephemeral_storage, None);
    assert_eq!(config.init_resources.requests_ephemeral_storage, None);

    let e = template(
        &helm,
        &["injection.proxy.resources.limits.ephemeral-storage=1GB"],
    )
    .unwrap_err();
    assert!(
        e.contains("/injection/proxy/resources/limits/ephemeral-storage")
            && e.contains("'1GB' does not match pattern"),
        "{e}"
    );
    let e = template(
        &helm,
        &[
            "injection.init.resources.requests.ephemeral-storage=2Gi",
            "injection.init.resources.limits.ephemeral-storage=1Gi",
        ],
    )
    .unwrap_err();
    assert!(
        e.contains(
            "injection.init.resources: requests.ephemeral-storage 2Gi is above \
             limits.ephemeral-storage 1Gi"
        ),
        "{e}"
    );
    // The control plane, which has the last word, refuses them at start.
    let defaults: Value = serde_json::from_str(&rendered_injection_settings(&helm, &[])).unwrap();
    for (resources, says) in [
        (
            json!({"limits": {"ephemeral-storage": "1GB"}}),
            "proxyResources.limits.ephemeral-storage: \"1GB\" is not a Kubernetes quantity",
        ),
        (
            json!({"requests": {"ephemeral-storage": "2Gi"}, "limits": {"ephemeral-storage": "1Gi"}}),
            "proxyResources: requests.ephemeral-storage 2Gi is above limits.ephemeral-storage 1Gi",
        ),
    ] {
        let mut settings = defaults.clone();
        settings["proxyResources"] = resources;
        let td = TrustDomain::new("cluster.local").unwrap();
        let e = inject::InjectConfig::from_settings(&settings.to_string(), td, "PEM".into())
            .unwrap_err()
            .to_string();
        assert!(e.contains(says), "{e}");
    }
}

/// The sidecar's UID reaches the control plane's injection settings, so an
/// operator whose images run as 1337 moves the sidecar off it; root, or a
/// UID Kubernetes refuses, is refused at `helm template`, naming the value.
#[test]
fn the_sidecar_uid_is_set_from_the_chart_and_never_root() {
    let Some((helm, _)) = tools() else { return };
    assert_eq!(rendered_injection_config(&helm, &[]).proxy_uid, 1337);
    let config = rendered_injection_config(&helm, &["injection.proxy.uid=2102"]);
    assert_eq!(config.proxy_uid, 2102);
    for (bad, says) in [
        ("0", "minimum: got 0, want 1"),
        ("-1", "minimum: got -1, want 1"),
        ("2147483648", "maximum: got 2.147483648"),
    ] {
        let e = template(&helm, &[&format!("injection.proxy.uid={bad}")]).unwrap_err();
        assert!(
            e.contains("injection/proxy/uid") && e.contains(says),
            "{bad}: {e}"
        );
    }
}

/// Destinations excluded from interception for every injected pod: the IPv4
/// and IPv6 CIDRs (and bare addresses) the control plane reads render and
/// reach it; anything it would refuse at start (exit 64, then a crash loop)
/// is refused at `helm template` instead, naming the value.
#[test]
fn excluded_cidrs_the_control_plane_refuses_are_refused() {
    let Some((helm, _)) = tools() else { return };
    for bad in [
        "garbage",
        "10.0.0.0/33",
        "10.0.0.256/8",
        "10.0.0/8",
        "10.0.0.0/",
        "fd00::/129",
        "fd00::1::/64",
        "fe80::1%eth0/64",
        "kubernetes.default",
    ] {
        let e = template(
            &helm,
            &[&format!("injection.excludeOutboundCIDRs={{{bad}}}")],
        )
        .unwrap_err();
        assert!(
            e.contains("excludeOutboundCIDRs") && e.contains(bad),
            "{bad}: {e}"
        );
    }
    let good = [
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("0.0.0.0/0", "0.0.0.0/0"),
        ("169.254.169.254", "169.254.169.254/32"),
        ("fd00::/8", "fd00::/8"),
        ("::1/128", "::1/128"),
        ("::/0", "::/0"),
        ("2001:db8:0:0:0:0:0:1/64", "2001:db8::1/64"),
        ("2001:DB8::/32", "2001:db8::/32"),
        ("::ffff:10.0.0.0/104", "::ffff:10.0.0.0/104"),
    ];
    let list = good.map(|(value, _)| value).join(",");
    let config = rendered_injection_config(
        &helm,
        &[&format!("injection.excludeOutboundCIDRs={{{list}}}")],
    );
    assert_eq!(
        config.exclude_outbound_cidrs,
        good.map(|(_, read)| read.to_owned())
    );
}

/// `image.digest` pins the image by digest for every role: the control
/// plane's container and, through the injection settings the control plane
/// reads, the sidecar and init containers it injects; it takes precedence
/// over the tag.
#[test]
fn an_image_digest_pins_every_image() {
    let Some((helm, validate)) = tools() else {
        return;
    };
    let digest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let set = [
        "image.repository=registry.example.com/mesh/trellis",
        "image.tag=0.1.0-rc1",
        &format!("image.digest={digest}"),
    ];
    let rendered = template(&helm, &set).unwrap();
    validate_manifests(&validate, &rendered);
    let docs = documents(&rendered);
    let image = format!("registry.example.com/mesh/trellis@{digest}");
    assert_eq!(
        one(&docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"],
        image.as_str()
    );
    assert_eq!(rendered_injection_config(&helm, &set).image, image);
    // Without a digest, the tag.
    let config = rendered_injection_config(&helm, &set[..2]);
    assert_eq!(config.image, "registry.example.com/mesh/trellis:0.1.0-rc1");
}

/// A registry at an IPv6 address is written in brackets, with or without a
/// port (`[fd00::1]:5000/trellis/trellis`): the chart takes it, and every
/// role runs that image, by tag or by digest, in manifests the API server
/// would take. A tag or a digest in the repository is still refused, naming
/// `image.repository`, as with a registry by name.
#[test]
fn an_image_from_a_registry_at_an_ipv6_address_is_taken() {
    let Some((helm, validate)) = tools() else {
        return;
    };
    let digest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    for (repository, digest, image) in [
        (
            "[fd00::1]:5000/trellis/trellis",
            "",
            "[fd00::1]:5000/trellis/trellis:0.1.0-rc1".to_owned(),
        ),
        (
            "[fd00::1]/trellis/trellis",
            "",
            "[fd00::1]/trellis/trellis:0.1.0-rc1".to_owned(),
        ),
        (
            "[2001:db8::10]:443/mesh/trellis",
            digest,
            format!("[2001:db8::10]:443/mesh/trellis@{digest}"),
        ),
    ] {
        let repository = format!("image.repository={repository}");
        let digest = format!("image.digest={digest}");
        let set = [repository.as_str(), "image.tag=0.1.0-rc1", digest.as_str()];
        let rendered = template(&helm, &set).unwrap_or_else(|e| panic!("{repository}: {e}"));
        validate_manifests(&validate, &rendered);
        let docs = documents(&rendered);
        assert_eq!(
            one(&docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"],
            image.as_str(),
            "{repository}"
        );
        assert_eq!(rendered_injection_config(&helm, &set).image, image);
    }

    for repository in [
        "[fd00::1]:5000/trellis/trellis:0.1.0",
        "[fd00::1]/trellis/trellis:latest",
        &format!("[fd00::1]:5000/trellis/trellis@{digest}"),
        "registry.example.com:5000/trellis/trellis:0.1.0",
        "trellis/trellis@sha256:0123",
        // A registry with no repository, or no address in the brackets.
        "[fd00::1]:5000",
        "[]:5000/trellis/trellis",
        "fd00::1:5000/trellis/trellis",
    ] {
        let e = template(&helm, &[&format!("image.repository={repository}")]).unwrap_err();
        assert!(e.contains("image/repository"), "{repository}: {e}");
    }
}

/// The injection settings file the chart renders with `set`.
fn rendered_injection_settings(helm: &Path, set: &[&str]) -> String {
    let docs = documents(&template(helm, set).unwrap());
    one(&docs, "ConfigMap")["data"]["inject.json"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The injection settings the chart renders with `set`, as the control
/// plane reads them.
fn rendered_injection_config(helm: &Path, set: &[&str]) -> inject::InjectConfig {
    read_rendered_injection_config(helm, set).unwrap_or_else(|e| panic!("{e}"))
}

/// The injection settings the chart renders with `set`, or why the control
/// plane refuses them.
fn read_rendered_injection_config(
    helm: &Path,
    set: &[&str],
) -> Result<inject::InjectConfig, inject::InvalidSettings> {
    let settings = rendered_injection_settings(helm, set);
    let td = TrustDomain::new("cluster.local").unwrap();
    inject::InjectConfig::from_settings(&settings, td, "PEM".into())
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

/// The notes `helm install --dry-run` prints for the chart with `extra`
/// arguments.
fn install_notes(helm: &std::path::Path, chart: &std::path::Path, extra: &[&str]) -> String {
    let mut args = vec![
        "install",
        "trellis",
        chart.to_str().unwrap(),
        "--namespace",
        NAMESPACE,
        "--dry-run=client",
    ];
    args.extend_from_slice(extra);
    let out = run_helm(helm, &args).unwrap();
    out[out.find("NOTES:").expect("NOTES are printed")..].to_owned()
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
        let notes = &install_notes(&helm, &chart, &["--set", sets]);
        for step in [
            "kubectl label namespace NAMESPACE trellis.io/inject=enabled",
            // Pod Security baseline and restricted reject every meshed
            // pod (trellis-init's NET_ADMIN and NET_RAW): the notes say so
            // before the user finds FailedCreate events.
            "kubectl label --overwrite namespace NAMESPACE pod-security.kubernetes.io/enforce=privileged",
            "kind: AuthorizationPolicy",
            "trellisctl --control-plane 127.0.0.1:15012",
            "belongs in the root namespace trellis-system",
            "--root-namespace trellis-system",
        ] {
            assert!(notes.contains(step), "{step} in {notes}");
        }
        if sets.contains("example.org") {
            assert!(notes.contains("spiffe://example.org/ns/NAMESPACE/sa/web"));
            assert!(notes.contains("allow-same-namespace"));
            // lint's own default is cluster.local: the mesh's is given.
            assert!(
                notes
                    .contains("trellisctl policy lint --trust-domain example.org --root-namespace")
            );
        }
    }
    // Under the default outbound deny, calls to what has no sidecar are
    // refused: the notes say so and how to let them out.
    let notes = install_notes(&helm, &chart, &[]);
    assert!(
        notes.contains("trellis.io/exclude-outbound-cidrs"),
        "{notes}"
    );
    let notes = install_notes(&helm, &chart, &["--set", "outboundPolicy=passthrough"]);
    assert!(
        !notes.contains("trellis.io/exclude-outbound-cidrs"),
        "{notes}"
    );

    // The control plane's pods wait for the webhooks' serving certificate
    // when the chart does not make it: the notes say which Secret, and
    // where to look while they wait.
    let notes = install_notes(&helm, &chart, &[]);
    assert!(!notes.contains("ContainerCreating"), "{notes}");
    let notes = install_notes(
        &helm,
        &chart,
        &["--set", "webhook.certManager.enabled=true"],
    );
    for said in [
        "cert-manager has issued the webhooks' serving certificate into the\n   Secret trellis-webhook-cert",
        "kubectl -n trellis-system describe certificate trellis-webhook-cert",
    ] {
        assert!(notes.contains(said), "{said} in {notes}");
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.crt");
    let pem = rcgen::generate_simple_self_signed(vec!["ca".to_owned()]).unwrap();
    std::fs::write(&ca, pem.cert.pem()).unwrap();
    let ca = format!("webhook.caBundle={}", ca.display());
    let notes = install_notes(
        &helm,
        &chart,
        &[
            "--set",
            "webhook.existingSecret=corp-webhook-tls",
            "--set-file",
            &ca,
        ],
    );
    assert!(
        notes.contains("Its pods mount the Secret corp-webhook-tls")
            && notes.contains("which you create in trellis-system"),
        "{notes}"
    );
}

/// `trustAnchorsPEM` (set from a file of roots) renders a ConfigMap that the
/// control plane's own loader accepts, mounted read-only where
/// `--trust-anchors` reads it, and a checksum that rolls the control plane
/// when it changes; every manifest still validates. Without the value none
/// of it is rendered. A value holding a private key, or no certificate, is
/// refused, and the key is never echoed.
#[test]
fn trust_anchors_reach_the_control_plane() {
    let Some((helm, validate)) = tools() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let td = TrustDomain::new("cluster.local").unwrap();
    let render = |name: &str, pem: &str| {
        let file = dir.path().join(name);
        std::fs::write(&file, pem).unwrap();
        let value = format!("trustAnchorsPEM={}", file.display());
        template_with(&helm, NAMESPACE, &["--set-file", &value])
    };
    let (ca, root_pem, key_pem) = CertificateAuthority::generate(&td).unwrap();
    let rendered = render("roots.pem", &root_pem).unwrap();
    validate_manifests(&validate, &rendered);
    let docs = documents(&rendered);

    let config_map = find(&docs, "ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["name"] == "trellis-trust-anchors")
        .expect("the trust anchors ConfigMap");
    assert_eq!(config_map["metadata"]["namespace"], NAMESPACE);
    let mounted = dir.path().join("trust-anchors.pem");
    std::fs::write(
        &mounted,
        config_map["data"]["trust-anchors.pem"].as_str().unwrap(),
    )
    .unwrap();
    assert_eq!(load_trust_anchors(&mounted).unwrap(), ca.bundle());

    let args = args(&docs);
    assert!(
        args.iter()
            .any(|a| a == "--trust-anchors=/etc/trellis/trust-anchors/trust-anchors.pem"),
        "{args:?}"
    );
    let pod_template = &one(&docs, "Deployment")["spec"]["template"];
    let pod = &pod_template["spec"];
    assert!(
        pod["volumes"].as_array().unwrap().contains(&json!({
            "name": "trust-anchors",
            "configMap": {"name": "trellis-trust-anchors"}
        })),
        "{}",
        pod["volumes"]
    );
    assert!(
        pod["containers"][0]["volumeMounts"]
            .as_array()
            .unwrap()
            .contains(&json!({
                "name": "trust-anchors",
                "mountPath": "/etc/trellis/trust-anchors",
                "readOnly": true
            })),
        "{}",
        pod["containers"][0]["volumeMounts"]
    );
    let checksum = pod_template["metadata"]["annotations"]["checksum/trust-anchors"].clone();
    assert!(checksum.is_string(), "{}", pod_template["metadata"]);
    let (_, other_pem, _) = CertificateAuthority::generate(&td).unwrap();
    let both = documents(&render("both.pem", &format!("{root_pem}{other_pem}")).unwrap());
    let annotations = &one(&both, "Deployment")["spec"]["template"]["metadata"]["annotations"];
    assert_ne!(
        annotations["checksum/trust-anchors"], checksum,
        "a change of the anchors rolls the control plane"
    );

    let rendered = template(&helm, &[]).unwrap();
    assert!(
        !rendered.contains("trust-anchors"),
        "nothing without the value"
    );

    let err = render("with-key.pem", &format!("{root_pem}{key_pem}")).unwrap_err();
    assert!(err.contains("trustAnchorsPEM holds a private key"), "{err}");
    let key_line = key_pem.lines().nth(1).unwrap();
    assert!(!err.contains(key_line), "the key is echoed: {err}");
    let err = render("notes.txt", "the new root, to add later\n").unwrap_err();
    assert!(
        err.contains("trustAnchorsPEM holds no PEM certificate"),
        "{err}"
    );
}

/// The control plane opens the state dir the chart gives it on the volume
/// the kubelet makes for it: an emptyDir is created 0777, with the setgid
/// bit under `fsGroup`, and the control plane refuses a state dir that
/// others can read. So the state dir must lie below the volume, where the
/// control plane creates it itself; and the install notes name that path.
/// The volume is made here as the kubelet makes it.
#[test]
fn state_dir_opens_on_the_volume_the_kubelet_makes() {
    use std::os::unix::fs::PermissionsExt;
    let Some((helm, _)) = tools() else { return };
    let docs = documents(&template(&helm, &[]).unwrap());
    let state_dir = args(&docs)
        .iter()
        .find_map(|a| a.strip_prefix("--state-dir=").map(str::to_owned))
        .expect("--state-dir is set");
    let pod = &one(&docs, "Deployment")["spec"]["template"]["spec"];
    let mounts = pod["containers"][0]["volumeMounts"].as_array().unwrap();
    let mount = mounts
        .iter()
        .find(|m| state_dir.starts_with(m["mountPath"].as_str().unwrap()))
        .unwrap_or_else(|| panic!("no volume holds {state_dir}"));
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    assert!(volume["emptyDir"].is_object(), "{volume}");

    let root = tempfile::tempdir().unwrap();
    let volume_dir = root
        .path()
        .join(mount["mountPath"].as_str().unwrap().trim_start_matches('/'));
    std::fs::create_dir_all(&volume_dir).unwrap();
    std::fs::set_permissions(&volume_dir, std::fs::Permissions::from_mode(0o2777)).unwrap();
    let opened = trellis_control_plane::state_dir::StateDir::open(
        &root.path().join(state_dir.trim_start_matches('/')),
    );
    assert!(opened.is_ok(), "{state_dir}: {:?}", opened.err());

    let notes = &install_notes(&helm, &chart(), &[]);
    assert!(
        notes.contains(&format!("--state-dir {state_dir} ")),
        "{notes}"
    );
}

/// A group version and its resources: name, kind, namespaced.
type GroupVersion = (&'static str, &'static [(&'static str, &'static str, bool)]);

/// The discovery documents of a cluster with the kinds the chart renders,
/// as `helm` asks for them (`/api`, `/apis`, each group version), with
/// `objects` as the objects it holds; anything else is 404. Written after
/// the API server's JSON shapes (no API server can run here).
fn cluster_with(
    objects: Vec<Value>,
) -> impl Fn(&str) -> (u16, Value) + Clone + Send + Sync + 'static {
    let kinds: [GroupVersion; 6] = [
        (
            "v1",
            &[
                ("secrets", "Secret", true),
                ("services", "Service", true),
                ("serviceaccounts", "ServiceAccount", true),
                ("configmaps", "ConfigMap", true),
            ],
        ),
        ("apps/v1", &[("deployments", "Deployment", true)]),
        (
            "rbac.authorization.k8s.io/v1",
            &[
                ("roles", "Role", true),
                ("rolebindings", "RoleBinding", true),
                ("clusterroles", "ClusterRole", false),
                ("clusterrolebindings", "ClusterRoleBinding", false),
            ],
        ),
        (
            "apiextensions.k8s.io/v1",
            &[(
                "customresourcedefinitions",
                "CustomResourceDefinition",
                false,
            )],
        ),
        (
            "admissionregistration.k8s.io/v1",
            &[
                (
                    "mutatingwebhookconfigurations",
                    "MutatingWebhookConfiguration",
                    false,
                ),
                (
                    "validatingwebhookconfigurations",
                    "ValidatingWebhookConfiguration",
                    false,
                ),
            ],
        ),
        (
            "policy/v1",
            &[("poddisruptionbudgets", "PodDisruptionBudget", true)],
        ),
    ];
    // Each object at the path of its GET.
    let objects: Vec<(String, Value)> = objects
        .into_iter()
        .map(|object| {
            let (gv, list) = kinds
                .iter()
                .find(|(gv, _)| object["apiVersion"] == *gv)
                .expect("a kind the chart renders");
            let (resource, _, namespaced) = list
                .iter()
                .find(|(_, kind, _)| object["kind"] == *kind)
                .expect("a kind the chart renders");
            let root = if gv.contains('/') { "apis" } else { "api" };
            let namespace = match namespaced {
                true => format!(
                    "namespaces/{}/",
                    object["metadata"]["namespace"].as_str().unwrap()
                ),
                false => String::new(),
            };
            let name = object["metadata"]["name"].as_str().unwrap();
            (format!("/{root}/{gv}/{namespace}{resource}/{name}"), object)
        })
        .collect();
    move |path: &str| {
        let resources = |gv: &str, list: &[(&str, &str, bool)]| {
            let resources: Vec<Value> = list
                .iter()
                .map(|(name, kind, namespaced)| {
                    json!({"name": name, "singularName": "", "namespaced": namespaced,
                           "kind": kind, "verbs": ["get", "list", "create", "update", "patch"]})
                })
                .collect();
            json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv,
                   "resources": resources})
        };
        let groups: Vec<Value> = kinds[1..]
            .iter()
            .map(|(gv, _)| {
                let (group, version) = gv.split_once('/').unwrap();
                let version = json!({"groupVersion": gv, "version": version});
                json!({"name": group, "versions": [version], "preferredVersion": version})
            })
            .collect();
        match path {
            "/version" => (
                200,
                json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0",
                       "platform": "linux/amd64"}),
            ),
            "/api" => (
                200,
                json!({"kind": "APIVersions", "versions": ["v1"],
                       "serverAddressByClientCIDRs": [
                           {"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1:443"}]}),
            ),
            "/apis" => (
                200,
                json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}),
            ),
            p if objects.iter().any(|(path, _)| path == p) => {
                let (_, object) = objects.iter().find(|(path, _)| path == p).unwrap();
                (200, object.clone())
            }
            p => match kinds
                .iter()
                .find(|(gv, _)| p == format!("/api/{gv}") || p == format!("/apis/{gv}"))
            {
                Some((gv, list)) => (200, resources(gv, list)),
                None => (
                    404,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                           "reason": "NotFound", "code": 404}),
                ),
            },
        }
    }
}

/// The mesh CA's Secret is never rendered, so its key (the mesh root's) is
/// in no release record, no `helm get manifest`, `helm diff` or
/// `--dry-run=server` output, and no upgrade (`--force` and GitOps
/// "Replace" syncs included) can empty or replace it: the control plane
/// creates it. Rendered as an upgrade of a cluster that holds it, as an
/// earlier chart left it (`--dry-run=server` looks objects up), no document
/// is a Secret of that name and the key appears nowhere, in PEM or base64;
/// the only `tls.key` is the webhooks' serving key. A plain `helm template`
/// renders no CA Secret either. No API server can run here: a local HTTPS
/// stand-in answers helm's discovery requests and the Secret's GET with the
/// API server's JSON shapes, and 404 for the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_rendering_holds_the_ca_secret_or_its_key() {
    use base64::Engine as _;
    use trellis_control_plane::ca::secret::{CERT_KEY, KEY_KEY};
    let Some((helm, _)) = tools() else { return };
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let td = TrustDomain::new("cluster.local").unwrap();
    let (_, cert, key) = CertificateAuthority::generate(&td).unwrap();
    let secret = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": "trellis-ca",
            "namespace": NAMESPACE,
            "resourceVersion": "4711",
            // As an earlier chart created it.
            "labels": {"app.kubernetes.io/managed-by": "Helm"},
            "annotations": {
                "meta.helm.sh/release-name": "trellis",
                "meta.helm.sh/release-namespace": NAMESPACE,
                "helm.sh/resource-policy": "keep"
            }
        },
        "type": "Opaque",
        "data": {CERT_KEY: b64(&cert), KEY_KEY: b64(&key)}
    });
    let upgrade = render_against_cluster(&helm, vec![secret], None).await;
    let plain = template(&helm, &[]).unwrap();
    let key_body = key.lines().nth(1).expect("a PEM body line");
    for leaked in [b64(&key).as_str(), key_body, &b64(&cert)] {
        assert!(
            !upgrade.contains(leaked),
            "the CA Secret's data was rendered"
        );
    }
    for rendered in [&upgrade, &plain] {
        let docs = documents(rendered);
        assert!(docs.len() > 10, "the whole chart: {rendered}");
        let secrets: Vec<&str> = find(&docs, "Secret")
            .iter()
            .map(|s| s["metadata"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(secrets, ["trellis-webhook-tls"], "no CA Secret");
        let with_key: Vec<&Value> = docs
            .iter()
            .filter(|d| !d["data"][KEY_KEY].is_null() || !d["stringData"][KEY_KEY].is_null())
            .collect();
        assert_eq!(with_key.len(), 1, "only the webhooks' key");
        assert_eq!(with_key[0]["metadata"]["name"], "trellis-webhook-tls");
    }
}

/// The chart (or only `show_only` of it) rendered as an upgrade of a cluster holding
/// `objects`: `--dry-run=server` looks them up in a local HTTPS stand-in
/// for the API server ([`cluster_with`]). Must run on a multi-threaded
/// runtime, where the stand-in answers while helm blocks.
async fn render_against_cluster(
    helm: &Path,
    objects: Vec<Value>,
    show_only: Option<&str>,
) -> String {
    let answer = cluster_with(objects);
    let server = serving::ApiServer::start(
        "operator-token",
        serving::Answering::Yes,
        move |req: http::Request<hyper::body::Incoming>| {
            let (status, body) = answer(req.uri().path());
            async move {
                http::Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(http_body_util::Full::new(bytes::Bytes::from(
                        body.to_string(),
                    )))
                    .unwrap()
            }
        },
    )
    .await;
    let kubeconfig = server.token_file().with_file_name("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    \
             certificate-authority: {}\nusers:\n- name: u\n  user:\n    tokenFile: {}\n\
             contexts:\n- name: x\n  context: {{cluster: c, user: u}}\ncurrent-context: x\n",
            server.url(),
            server.ca().display(),
            server.token_file().display()
        ),
    )
    .unwrap();
    let kubeconfig = kubeconfig.display().to_string();
    let mut args: Vec<String> = [
        "--dry-run=server",
        "--disable-openapi-validation",
        "--kubeconfig",
        &kubeconfig,
    ]
    .map(String::from)
    .to_vec();
    if let Some(only) = show_only {
        args.extend(["--show-only".into(), only.into()]);
    }
    let helm = helm.to_owned();
    // helm blocks; the stand-in answers on this runtime meanwhile.
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        template_with(&helm, NAMESPACE, &args)
    })
    .await
    .unwrap()
    .unwrap()
}

/// The name the API server dials the webhooks by.
const WEBHOOK_NAME: &str = "trellis-control-plane.trellis-system.svc";

/// The webhooks' Secret and caBundle as the chart renders them: the
/// Secret, the certificates of the caBundle (DER, in order; the same in
/// every webhook), and the mutating webhook configuration.
struct Webhooks {
    secret: Value,
    bundle: Vec<Vec<u8>>,
    mutating: Value,
}

impl Webhooks {
    fn from(rendered: &str) -> Webhooks {
        let docs = documents(rendered);
        let secret = one(&docs, "Secret").clone();
        let bundles: Vec<&Value> = [
            one(&docs, "MutatingWebhookConfiguration"),
            one(&docs, "ValidatingWebhookConfiguration"),
        ]
        .into_iter()
        .flat_map(|c| c["webhooks"].as_array().unwrap())
        .map(|w| &w["clientConfig"]["caBundle"])
        .collect();
        assert_eq!(bundles.len(), 5);
        assert!(bundles.iter().all(|b| *b == bundles[0]), "{bundles:?}");
        let bundle = certificates(&b64_pem(bundles[0].as_str().unwrap()));
        let mutating = one(&docs, "MutatingWebhookConfiguration").clone();
        Webhooks {
            secret,
            bundle,
            mutating,
        }
    }

    /// The PEM of a key of the Secret.
    fn pem(&self, key: &str) -> String {
        b64_pem(self.secret["data"][key].as_str().unwrap())
    }
}

fn b64_pem(b64: &str) -> String {
    use base64::Engine as _;
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap(),
    )
    .unwrap()
}

/// The certificates of a PEM bundle, DER.
fn certificates(pem: &str) -> Vec<Vec<u8>> {
    use rustls_pki_types::pem::PemObject as _;
    rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| c.unwrap().to_vec())
        .collect()
}

/// Whether a client trusting `roots` (DER) accepts `serving` (PEM) for
/// the webhooks' Service name: the check the API server makes with the
/// caBundle.
fn verifies(serving: &str, roots: &[Vec<u8>]) -> bool {
    use rustls::client::danger::ServerCertVerifier as _;
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        store
            .add(rustls_pki_types::CertificateDer::from(root.clone()))
            .unwrap();
    }
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        std::sync::Arc::new(store),
        trellis_core::tls::provider(),
    )
    .build()
    .unwrap();
    let leaf = rustls_pki_types::CertificateDer::from(certificates(serving).remove(0));
    verifier
        .verify_server_cert(
            &leaf,
            &[],
            &rustls_pki_types::ServerName::try_from(WEBHOOK_NAME).unwrap(),
            &[],
            rustls_pki_types::UnixTime::now(),
        )
        .is_ok()
}

/// A time `days` from now (negative: ago), as Kubernetes writes times.
fn days_from_now(days: i64) -> String {
    rfc3339(time::OffsetDateTime::now_utc() + time::Duration::days(days))
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.replace_nanosecond(0)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// The webhooks and their Secret as an install renders them.
fn installed(helm: &Path) -> Webhooks {
    let show_only = ["--show-only", "templates/webhooks.yaml"];
    Webhooks::from(&template_with(helm, NAMESPACE, &show_only).unwrap())
}

/// `object` of the chart as the cluster holds it after an install:
/// annotated as Helm's (it adopts only its own) and with `annotations`,
/// created at `created`.
fn live(object: &Value, annotations: &[(&str, &str)], created: &str) -> Value {
    let mut object = object.clone();
    let metadata = object["metadata"].as_object_mut().unwrap();
    let mut all = json!({
        "meta.helm.sh/release-name": "trellis",
        "meta.helm.sh/release-namespace": NAMESPACE,
    });
    for (name, value) in annotations {
        all[*name] = json!(value);
    }
    metadata.insert("annotations".into(), all);
    metadata.insert("creationTimestamp".into(), json!(created));
    metadata.insert("resourceVersion".into(), json!("4711"));
    object
}

/// Renewing the webhooks' serving certificate (the Secret's
/// `trellis.io/renew-after` has passed) makes a new CA and certificate but
/// keeps the previous CA in the caBundle beside the new one: the API
/// server accepts the certificate the running control plane still serves
/// until the kubelet updates its mounted Secret, and the new one from
/// then on (or from a pod the upgrade started), in either order. An
/// upgrade within the next ten minutes keeps both; the first one after
/// drops the previous CA and changes nothing else. The manifests validate
/// throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewing_the_webhook_certificate_keeps_the_previous_ca_for_a_while() {
    let Some((helm, validate)) = tools() else {
        return;
    };
    let old = installed(&helm);
    let secret = live(
        &old.secret,
        &[("trellis.io/renew-after", "2020-01-01T00:00:00Z")],
        "2019-01-01T00:00:00Z",
    );
    let rendered =
        render_against_cluster(&helm, vec![secret], Some("templates/webhooks.yaml")).await;
    validate_manifests(&validate, &rendered);
    let renewed = Webhooks::from(&rendered);
    assert_ne!(renewed.pem("ca.crt"), old.pem("ca.crt"), "a new CA");
    assert_ne!(
        renewed.pem("tls.crt"),
        old.pem("tls.crt"),
        "a new certificate"
    );
    let new_ca = certificates(&renewed.pem("ca.crt"));
    assert_eq!(
        renewed.bundle,
        [new_ca.clone(), old.bundle.clone()].concat()
    );
    assert_eq!(renewed.pem("ca-previous.crt"), old.pem("ca.crt"));
    assert!(verifies(&renewed.pem("tls.crt"), &new_ca));
    assert!(!verifies(&old.pem("tls.crt"), &new_ca));
    for serving in [old.pem("tls.crt"), renewed.pem("tls.crt")] {
        assert!(verifies(&serving, &renewed.bundle));
    }
    let annotations = &renewed.secret["metadata"]["annotations"];
    let renew_after = annotations["trellis.io/renew-after"].as_str().unwrap();
    assert!(
        renew_after > days_from_now(2433).as_str() && renew_after < days_from_now(2434).as_str(),
        "two thirds of 3650 days from now: {renew_after}"
    );
    let until = annotations["trellis.io/previous-ca-until"]
        .as_str()
        .unwrap();
    assert!(
        until > days_from_now(0).as_str() && until < days_from_now(1).as_str(),
        "{until}"
    );

    // An upgrade soon after keeps both.
    let kept: Vec<(&str, &str)> = annotations
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str().unwrap()))
        .collect();
    let mut secret = live(&renewed.secret, &kept, &days_from_now(0));
    let rendered =
        render_against_cluster(&helm, vec![secret.clone()], Some("templates/webhooks.yaml")).await;
    let again = Webhooks::from(&rendered);
    assert_eq!(again.secret, renewed.secret);
    assert_eq!(again.bundle, renewed.bundle);

    // The first upgrade past previous-ca-until drops the previous CA.
    secret["metadata"]["annotations"]["trellis.io/previous-ca-until"] = json!(days_from_now(-1));
    let rendered =
        render_against_cluster(&helm, vec![secret], Some("templates/webhooks.yaml")).await;
    validate_manifests(&validate, &rendered);
    let later = Webhooks::from(&rendered);
    assert_eq!(later.bundle, new_ca);
    for key in ["tls.crt", "tls.key", "ca.crt"] {
        assert_eq!(later.pem(key), renewed.pem(key), "{key} is kept");
    }
    assert!(
        later.secret["data"]["ca-previous.crt"].is_null(),
        "{}",
        later.secret
    );
    assert_eq!(
        later.secret["metadata"]["annotations"],
        json!({"trellis.io/renew-after": renew_after})
    );
}

/// Deleting the webhooks' Secret, to replace a certificate at once, takes
/// its CA with it: the upgrade that makes the new pair keeps the CAs of
/// the mutating webhook configuration's caBundle, which the running
/// control plane's certificate chains to, beside the new CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_webhook_secret_keeps_the_ca_the_webhooks_trusted() {
    let Some((helm, _)) = tools() else { return };
    let deleted = installed(&helm);
    let mutating = live(&deleted.mutating, &[], &days_from_now(0));
    let rendered =
        render_against_cluster(&helm, vec![mutating], Some("templates/webhooks.yaml")).await;
    let renewed = Webhooks::from(&rendered);
    let new_ca = certificates(&renewed.pem("ca.crt"));
    assert_ne!(new_ca, deleted.bundle);
    assert_eq!(
        renewed.bundle,
        [new_ca.clone(), deleted.bundle.clone()].concat()
    );
    assert!(verifies(&renewed.pem("tls.crt"), &new_ca));
    for serving in [deleted.pem("tls.crt"), renewed.pem("tls.crt")] {
        assert!(verifies(&serving, &renewed.bundle));
    }
}

/// A Secret an earlier chart made carries no `trellis.io/renew-after`: its
/// renewal is reckoned from its creation, when its certificate was made
/// (two thirds of `webhook.certValidityDays` later), and recorded. Before
/// then an upgrade keeps the pair and a caBundle of its CA alone; after,
/// it renews with the previous CA kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_of_an_earlier_chart_is_renewed_by_its_age() {
    let Some((helm, _)) = tools() else { return };
    let created = time::OffsetDateTime::now_utc() - time::Duration::days(10);
    let installed = installed(&helm);
    let old = live(&installed.secret, &[], &rfc3339(created));
    let old_ca = installed.bundle;
    let rendered =
        render_against_cluster(&helm, vec![old.clone()], Some("templates/webhooks.yaml")).await;
    let kept = Webhooks::from(&rendered);
    assert_eq!(kept.secret["data"], old["data"]);
    assert_eq!(kept.bundle, old_ca);
    let renew_after = rfc3339(created + time::Duration::seconds(3650 * 86400 * 2 / 3));
    assert_eq!(
        kept.secret["metadata"]["annotations"],
        json!({"trellis.io/renew-after": renew_after})
    );

    let mut aged = old;
    aged["metadata"]["creationTimestamp"] = json!(days_from_now(-2500));
    let rendered = render_against_cluster(&helm, vec![aged], Some("templates/webhooks.yaml")).await;
    let renewed = Webhooks::from(&rendered);
    let new_ca = certificates(&renewed.pem("ca.crt"));
    assert_ne!(new_ca, old_ca);
    assert_eq!(renewed.bundle, [new_ca, old_ca].concat());
}

/// Every webhook of both configurations.
fn all_webhooks(docs: &[Value]) -> Vec<Value> {
    [
        one(docs, "MutatingWebhookConfiguration"),
        one(docs, "ValidatingWebhookConfiguration"),
    ]
    .into_iter()
    .flat_map(|c| c["webhooks"].as_array().unwrap().clone())
    .collect()
}

/// The Secret the control plane's Deployment mounts as its serving
/// certificate.
fn mounted_secret(docs: &[Value]) -> String {
    one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "webhook-tls")
        .unwrap()["secret"]["secretName"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// With cert-manager the chart renders no key and no caBundle (the CA
/// injector fills it in from the Certificate the annotation names), and
/// the same manifests each render: `helm template` under Argo CD or Flux
/// shows no drift, and a sync swaps nothing. Without an issuer given, a CA
/// of the release's own signs the serving certificate the Deployment
/// mounts, for the Service's names.
#[test]
fn cert_manager_mode_renders_no_key_and_the_same_each_time() {
    let Some((helm, _)) = tools() else { return };
    let set = ["webhook.certManager.enabled=true"];
    let rendered = template(&helm, &set).unwrap();
    assert_eq!(rendered, template(&helm, &set).unwrap(), "a second render");
    assert!(!rendered.contains("tls.key:"), "{rendered}");
    assert!(!rendered.contains("PRIVATE KEY"), "{rendered}");
    let docs = documents(&rendered);
    assert!(find(&docs, "Secret").is_empty(), "no Secret rendered");
    for kind in [
        "MutatingWebhookConfiguration",
        "ValidatingWebhookConfiguration",
    ] {
        assert_eq!(
            one(&docs, kind)["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
            "trellis-system/trellis-webhook-cert",
            "{kind}"
        );
    }
    for webhook in all_webhooks(&docs) {
        assert!(
            webhook["clientConfig"].get("caBundle").is_none(),
            "{webhook}"
        );
    }
    let certificates = find(&docs, "Certificate");
    let serving = certificates
        .iter()
        .find(|c| c["metadata"]["name"] == "trellis-webhook-cert")
        .expect("the serving Certificate");
    assert_eq!(serving["spec"]["secretName"], "trellis-webhook-cert");
    assert_eq!(mounted_secret(&docs), "trellis-webhook-cert");
    assert_eq!(
        serving["spec"]["dnsNames"],
        json!([
            "trellis-control-plane",
            "trellis-control-plane.trellis-system",
            "trellis-control-plane.trellis-system.svc",
            "trellis-control-plane.trellis-system.svc.cluster.local",
        ])
    );
    assert_eq!(
        serving["spec"]["issuerRef"],
        json!({"name": "trellis-webhook-cert-ca", "kind": "Issuer", "group": "cert-manager.io"})
    );
    let ca = certificates
        .iter()
        .find(|c| c["metadata"]["name"] == "trellis-webhook-cert-ca")
        .expect("the CA Certificate");
    assert_eq!(ca["spec"]["isCA"], true);
    assert_eq!(
        ca["spec"]["issuerRef"]["name"],
        "trellis-webhook-cert-selfsigned"
    );
    let issuers = find(&docs, "Issuer");
    assert_eq!(issuers.len(), 2);
    assert!(issuers.iter().any(|i| i["spec"]["selfSigned"] == json!({})));
    assert!(
        issuers
            .iter()
            .any(|i| i["spec"]["ca"]["secretName"] == "trellis-webhook-cert-ca")
    );

    // An issuer of the operator's: only the serving Certificate.
    let docs = documents(
        &template(
            &helm,
            &[
                "webhook.certManager.enabled=true",
                "webhook.certManager.issuerRef.name=corp-ca",
                "webhook.certManager.issuerRef.kind=ClusterIssuer",
            ],
        )
        .unwrap(),
    );
    assert!(find(&docs, "Issuer").is_empty());
    assert_eq!(
        one(&docs, "Certificate")["spec"]["issuerRef"],
        json!({"name": "corp-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"})
    );
}

/// With a Secret of the operator's, the Deployment mounts it, the
/// webhooks trust the CA given (its PEM, base64 in the caBundle as the API
/// expects), and nothing else about the certificate is rendered.
#[test]
fn an_existing_secret_is_served_with_the_ca_bundle_given() {
    let Some((helm, _)) = tools() else { return };
    let ca = rcgen::generate_simple_self_signed(vec!["ca".to_owned()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ca.crt");
    std::fs::write(&file, ca.cert.pem()).unwrap();
    let args = [
        "--set",
        "webhook.existingSecret=corp-webhook-tls",
        "--set-file",
        &format!("webhook.caBundle={}", file.display()),
    ];
    let rendered = template_with(&helm, NAMESPACE, &args).unwrap();
    assert_eq!(
        rendered,
        template_with(&helm, NAMESPACE, &args).unwrap(),
        "a second render"
    );
    let docs = documents(&rendered);
    assert!(find(&docs, "Secret").is_empty(), "no Secret rendered");
    assert!(find(&docs, "Certificate").is_empty());
    assert_eq!(mounted_secret(&docs), "corp-webhook-tls");
    for webhook in all_webhooks(&docs) {
        let bundle = b64_pem(webhook["clientConfig"]["caBundle"].as_str().unwrap());
        assert_eq!(certificates(&bundle), [ca.cert.der().to_vec()]);
    }
}

/// A `webhook.caBundle` holding a private key (the CA's key file given by
/// mistake, or a PEM file of certificate and key) is refused without
/// echoing the key: rendered, the key would sit in every webhook
/// configuration, cluster-wide objects that many can read. One holding no
/// certificate is refused too, naming the value.
#[test]
fn a_ca_bundle_holding_a_key_is_refused_without_echoing_it() {
    let Some((helm, _)) = tools() else { return };
    let ca = rcgen::generate_simple_self_signed(vec!["ca".to_owned()]).unwrap();
    let key_pem = ca.signing_key.serialize_pem();
    let dir = tempfile::tempdir().unwrap();
    let render = |name: &str, pem: &str| {
        let file = dir.path().join(name);
        std::fs::write(&file, pem).unwrap();
        let value = format!("webhook.caBundle={}", file.display());
        let args = [
            "--set",
            "webhook.existingSecret=corp-webhook-tls",
            "--set-file",
            &value,
        ];
        template_with(&helm, NAMESPACE, &args)
    };
    let key_line = key_pem.lines().nth(1).unwrap();
    for (name, pem) in [
        ("ca.key", key_pem.clone()),
        ("ca.pem", format!("{}{key_pem}", ca.cert.pem())),
    ] {
        let err = render(name, &pem).unwrap_err();
        assert!(
            err.contains("webhook.caBundle holds a private key"),
            "{name}: {err}"
        );
        assert!(!err.contains(key_line), "{name}: the key is echoed: {err}");
    }
    let err = render("ca.txt", "the corporate CA\n").unwrap_err();
    assert!(
        err.contains("webhook.caBundle holds no PEM certificate"),
        "{err}"
    );
    render("ca.crt", &ca.cert.pem()).unwrap();
}

/// Half of an existing-Secret configuration is refused, naming both
/// values, as is an existing Secret with cert-manager: either would leave
/// the API server trusting a CA that did not sign what is served.
#[test]
fn half_an_existing_secret_configuration_is_refused() {
    let Some((helm, _)) = tools() else { return };
    for sets in [
        &["webhook.existingSecret=corp-webhook-tls"][..],
        &["webhook.caBundle=-----BEGIN CERTIFICATE-----"][..],
    ] {
        let err = template(&helm, sets).unwrap_err();
        assert!(
            err.contains("webhook.existingSecret") && err.contains("webhook.caBundle"),
            "{sets:?}: {err}"
        );
        assert!(err.contains("set both"), "{sets:?}: {err}");
    }
    let err = template(
        &helm,
        &[
            "webhook.existingSecret=corp-webhook-tls",
            "webhook.caBundle=-----BEGIN CERTIFICATE-----",
            "webhook.certManager.enabled=true",
        ],
    )
    .unwrap_err();
    assert!(
        err.contains("webhook.certManager.enabled and webhook.existingSecret exclude each other"),
        "{err}"
    );
}
