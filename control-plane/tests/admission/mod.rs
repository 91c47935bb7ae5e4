//! What the `/inject` webhook tests share: the configuration, the real
//! AdmissionReview fixtures of `fixtures/k8s/`, running the webhook, and
//! applying its JSONPatch as the API server does (`json-patch`, RFC 6902).
#![allow(dead_code)]
use std::collections::BTreeMap;

use base64::Engine as _;
use serde_json::Value;
use trellis_control_plane::inject::{
    AdmissionResponse, InjectConfig, NamespaceScope, TrustBundleSource, review_pod,
};

pub const BUNDLE: &str = "-----BEGIN CERTIFICATE-----\nMIIBfTCCASOgAwIBAgIUTrellisTestRootOnly\n-----END CERTIFICATE-----\n";
pub const IMAGE: &str = "registry.example.com/trellis/trellis:0.1.0";

pub fn config() -> InjectConfig {
    InjectConfig {
        image: IMAGE.into(),
        trust_bundle: TrustBundleSource::Annotation(BUNDLE.into()),
        ..InjectConfig::default()
    }
}

pub fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/k8s/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

pub fn body(review: &Value) -> Vec<u8> {
    serde_json::to_vec(review).unwrap()
}

/// Runs the webhook and returns the AdmissionReview it answers, as JSON.
pub fn answer(review: &Value, scope: NamespaceScope<'_>, config: &InjectConfig) -> Value {
    let response: AdmissionResponse = review_pod(&body(review), scope, config).unwrap();
    serde_json::from_slice(&response.to_body()).unwrap()
}

/// The patch of an reply, decoded as the API server decodes it.
pub fn patch_of(reply: &Value) -> Option<json_patch::Patch> {
    let response = &reply["response"];
    let encoded = response.get("patch")?.as_str().unwrap();
    assert_eq!(response["patchType"], "JSONPatch");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .unwrap();
    Some(serde_json::from_slice(&bytes).unwrap())
}

pub fn apply(pod: &Value, patch: &json_patch::Patch) -> Value {
    let mut pod = pod.clone();
    json_patch::patch(&mut pod, patch).unwrap();
    pod
}

/// Injects the pod of `review` and returns it patched.
pub fn injected(review: &Value) -> Value {
    let reply = answer(review, NamespaceScope::SelectedByWebhook, &config());
    assert_eq!(reply["response"]["allowed"], true, "{reply}");
    let patch = patch_of(&reply).expect("a patch");
    apply(&review["request"]["object"], &patch)
}

pub fn with_object(review: &Value, pod: Value) -> Value {
    let mut review = review.clone();
    review["request"]["object"] = pod;
    review
}

pub fn names(containers: &Value) -> Vec<&str> {
    containers
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect()
}

pub fn container<'a>(pod: &'a Value, field: &str, name: &str) -> &'a Value {
    pod["spec"][field]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {field} named {name}"))
}

pub fn env(container: &Value) -> BTreeMap<String, Value> {
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let value = e
                .get("value")
                .cloned()
                .unwrap_or_else(|| e["valueFrom"].clone());
            (e["name"].as_str().unwrap().to_owned(), value)
        })
        .collect()
}

pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// The webhook's answer for a pod in a namespace it selects.
pub fn answer_for(review: &Value) -> Value {
    answer(review, NamespaceScope::SelectedByWebhook, &config())
}

/// Each operation of a patch as `op path`, in order.
pub fn ops(patch: &json_patch::Patch) -> Vec<String> {
    serde_json::to_value(patch)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|op| {
            format!(
                "{} {}",
                op["op"].as_str().unwrap(),
                op["path"].as_str().unwrap()
            )
        })
        .collect()
}

/// The app probes the injected sidecar is told to run (`TRELLIS_APP_PROBES`).
pub fn app_probes(pod: &Value) -> Value {
    let proxy = container(pod, "initContainers", "trellis-proxy");
    serde_json::from_str(env(proxy)["TRELLIS_APP_PROBES"].as_str().unwrap()).unwrap()
}

/// The answer to `pod` reviewed once more in `review`, as a later
/// reinvocation would send it, after asserting it changes nothing (no
/// patch): what a pod the injector has finished with gets.
pub fn settled(review: &Value, pod: Value) -> Value {
    let reply = answer_for(&with_object(review, pod));
    assert!(patch_of(&reply).is_none(), "{reply}");
    reply
}
