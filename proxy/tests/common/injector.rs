//! The sidecar container the injector writes for a pod, taken from the
//! injector's own patch, so that tests of what the sidecar makes of it
//! cannot drift from what the injector writes.

use serde_json::Value;
use trellis_control_plane::inject::{self, InjectConfig, Injection, NamespaceScope};

/// The sidecar container's environment as the injector writes it for
/// `pod`: each variable's `value`, or its `valueFrom` when it has none.
pub fn sidecar_env(pod: &Value) -> Vec<(String, Value)> {
    sidecar_env_with(pod, InjectConfig::default())
}

/// [`sidecar_env`] with the injector's settings `config`.
pub fn sidecar_env_with(pod: &Value, config: InjectConfig) -> Vec<(String, Value)> {
    let config = InjectConfig {
        trust_bundle: inject::TrustBundleSource::Annotation("bundle".into()),
        ..config
    };
    let Injection::Injected { patch, .. } =
        inject::inject_pod(pod, NamespaceScope::SelectedByWebhook, &config).unwrap()
    else {
        panic!("the pod was not injected");
    };
    let patch = Value::Array(patch.into_iter().map(|op| op.value).collect());
    let sidecar = find_container(&patch, "trellis-proxy").expect("a sidecar container");
    sidecar["env"]
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

fn find_container<'a>(value: &'a Value, name: &str) -> Option<&'a Value> {
    match value {
        Value::Object(map)
            if map.get("name").and_then(Value::as_str) == Some(name) && map.contains_key("env") =>
        {
            Some(value)
        }
        Value::Object(map) => map.values().find_map(|v| find_container(v, name)),
        Value::Array(items) => items.iter().find_map(|v| find_container(v, name)),
        _ => None,
    }
}
