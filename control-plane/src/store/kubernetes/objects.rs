//! Between Kubernetes objects and what the store holds: a `trellis.io`
//! object becomes a validated [`Policy`] or [`RateLimit`] (or is refused
//! with the messages `policy lint` gives), a Pod becomes mesh endpoints, and
//! a policy written through the Admin API becomes a CRD object to create or
//! a patch of an existing object's `spec`.
//!
//! Kubernetes adds metadata (uid, labels, managedFields...) and a status
//! that the document format does not have: only `metadata.name` and
//! `metadata.namespace` are validated, exactly as the validating webhook
//! does. This module never talks to the API server, and logs nothing: what
//! a stored object fails of checks added since it was stored comes back
//! with it ([`Converted`]), for the watch to log once per change of the
//! object ([`warn_relaxed`]).

use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::{Container, Pod};
use kube::ResourceExt;
use kube::api::DynamicObject;
use kube::discovery::ApiResource;
use serde_json::{Value, json};
use trellis_core::policy::{
    AuthorizationPolicy, Document, RELAXED_POLICY_WARNING, RateLimitPolicy, SIDECAR_INBOUND_PORT,
    ValidationContext, Violation, Violations, document_from_proto, validate_in,
    validate_rate_limit_in_with,
};
use trellis_core::{SpiffeId, TrustDomain};
use trellis_proto::policy::v1::{Policy, RateLimit};

use crate::inject::{GROUP, INBOUND_PORT_NAME, PROXY_CONTAINER};
use crate::store::WorkloadRecord;

/// The API version of the policy CRDs.
pub const VERSION: &str = "v1alpha1";

/// The `AuthorizationPolicy` resource (`authorizationpolicies.trellis.io`).
pub fn authorization_policy_resource() -> ApiResource {
    trellis_resource(AuthorizationPolicy::KIND, "authorizationpolicies")
}

/// The `RateLimitPolicy` resource (`ratelimitpolicies.trellis.io`).
pub fn rate_limit_resource() -> ApiResource {
    trellis_resource(RateLimitPolicy::KIND, "ratelimitpolicies")
}

/// The `trellis.io` resource of `kind`, served at `plural`.
fn trellis_resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: GROUP.to_owned(),
        version: VERSION.to_owned(),
        api_version: format!("{GROUP}/{VERSION}"),
        kind: kind.to_owned(),
        plural: plural.to_owned(),
    }
}

/// A policy object converted, with what it fails of checks added since it
/// was stored: relaxed, it is enforced as each of those says.
#[derive(Debug)]
pub struct Converted<T> {
    pub value: T,
    pub relaxed: Vec<Violation>,
}

/// `namespace/name` of any object.
pub fn object_key(object: &impl ResourceExt) -> String {
    format!(
        "{}/{}",
        object.namespace().unwrap_or_default(),
        object.name_any()
    )
}

/// The validated policy an `AuthorizationPolicy` object stands for, its
/// revision being the object's `metadata.generation` (so every replica
/// agrees on it), for a mesh of `context` (its opaque ports, and how its
/// policies may select). The error lists what `policy lint` would say.
pub fn policy_from_object(
    object: &DynamicObject,
    td: &TrustDomain,
    context: &ValidationContext,
) -> Result<Converted<Policy>, String> {
    let policy = match Document::from_value(document_of(object, AuthorizationPolicy::KIND)?) {
        Ok(Document::AuthorizationPolicy(policy)) => policy,
        Ok(other) => {
            return Err(format!(
                "expected an AuthorizationPolicy, got a {}",
                other.kind()
            ));
        }
        Err(e) => return Err(e.to_string()),
    };
    let valid =
        validate_in(&policy, td, &stored(context)).map_err(|violations| errors_of(&violations))?;
    Ok(Converted {
        value: Policy {
            revision: revision_of(object),
            ..valid.to_proto()
        },
        relaxed: valid.relaxed().to_vec(),
    })
}

/// The validated rate limit a `RateLimitPolicy` object stands for, with its
/// revision (`metadata.generation`), for a mesh of `context`.
pub fn rate_limit_from_object(
    object: &DynamicObject,
    td: &TrustDomain,
    context: &ValidationContext,
) -> Result<Converted<(RateLimit, u64)>, String> {
    let limit = match Document::from_value(document_of(object, RateLimitPolicy::KIND)?) {
        Ok(Document::RateLimitPolicy(limit)) => limit,
        Ok(other) => {
            return Err(format!(
                "expected a RateLimitPolicy, got a {}",
                other.kind()
            ));
        }
        Err(e) => return Err(e.to_string()),
    };
    let relaxed = validate_rate_limit_in_with(&limit, td, &stored(context))
        .map_err(|violations| errors_of(&violations))?;
    Ok(Converted {
        value: (limit.to_proto(), revision_of(object)),
        relaxed,
    })
}

/// Objects are stored documents: one the webhook admitted before a check
/// got stricter is relaxed to what can still be enforced safely (a path
/// that could never match matches nothing, a rate below the minimum is
/// raised to it, a selector outside the object's namespace is enforced as
/// written), not dropped whole with the rules it holds; each relaxation is
/// logged. An L7 rule on one of the mesh's opaque ports is not relaxed:
/// every sidecar the policy selects would refuse each snapshot holding it
/// (and so every later change), so such an object does not convert, as
/// the webhook refuses it (an object written past a webhook that did not
/// answer, with `failurePolicy: Ignore`).
fn stored(context: &ValidationContext) -> ValidationContext {
    ValidationContext {
        stored: true,
        ..context.clone()
    }
}

/// Logs what `object` fails of checks added since it was stored.
pub fn warn_relaxed(object: &DynamicObject, relaxed: &[Violation]) {
    for violation in relaxed {
        tracing::warn!(
            object = %object_key(object),
            problem = %violation,
            "{RELAXED_POLICY_WARNING}"
        );
    }
}

/// The errors among `violations`, as `policy lint` words them, in one
/// line (warnings do not refuse an object), and how many more there were.
fn errors_of(violations: &Violations) -> String {
    let mut errors: Vec<String> = violations
        .iter()
        .filter(|v| v.is_error())
        .map(ToString::to_string)
        .collect();
    let more = violations.omitted().errors;
    if more > 0 {
        errors.push(format!(
            "and {more} more error{}",
            if more == 1 { "" } else { "s" }
        ));
    }
    errors.join("; ")
}

/// The document an object of `kind` holds: its fields less `status`, with
/// only the name and namespace of its metadata (as the webhook validates).
fn document_of(object: &DynamicObject, kind: &str) -> Result<Value, String> {
    let mut document = match &object.data {
        Value::Object(map) => map.clone(),
        _ => return Err("the object has no fields besides its metadata".into()),
    };
    document.remove("status");
    document.insert("apiVersion".into(), json!(format!("{GROUP}/{VERSION}")));
    document.insert("kind".into(), json!(kind));
    document.insert(
        "metadata".into(),
        json!({
            "name": object.name_any(),
            "namespace": object.namespace().unwrap_or_default(),
        }),
    );
    Ok(Value::Object(document))
}

fn revision_of(object: &DynamicObject) -> u64 {
    object
        .metadata
        .generation
        .and_then(|g| u64::try_from(g).ok())
        .unwrap_or(1)
}

/// The `spec` of the `AuthorizationPolicy` object of a policy written
/// through the Admin API.
pub fn policy_spec(policy: &Policy) -> Result<Value, String> {
    let document = document_from_proto(policy).map_err(|v| v.to_string())?;
    Ok(Document::AuthorizationPolicy(document).to_value()["spec"].take())
}

/// The `spec` of the `RateLimitPolicy` object of a rate limit written
/// through the Admin API.
pub fn rate_limit_spec(limit: &RateLimit) -> Result<Value, String> {
    let document = RateLimitPolicy::from_proto(limit).map_err(|v| v.to_string())?;
    Ok(Document::RateLimitPolicy(document).to_value()["spec"].take())
}

/// A new object of `resource` holding `spec`, to create.
pub fn new_object(
    resource: &ApiResource,
    namespace: &str,
    name: &str,
    spec: Value,
) -> DynamicObject {
    DynamicObject::new(name, resource)
        .within(namespace)
        .data(json!({ "spec": spec }))
}

/// The JSON Patch (RFC 6902) that gives an object `spec` and changes
/// nothing else of it: the labels, annotations, owner references and
/// finalizers that Helm, Argo CD or kubectl put there stay, as a full
/// replace would erase them. It sets the object's resourceVersion to
/// `resource_version`, which the API server takes as the update's
/// precondition: a newer object is refused with `409 Conflict`, as a
/// replace of that version would be (a `test` operation would be refused
/// with a 422, which reads as an invalid document). A patch that changes
/// nothing writes nothing.
pub fn spec_patch(spec: &Value, resource_version: &str) -> Value {
    json!([
        {"op": "replace", "path": "/metadata/resourceVersion", "value": resource_version},
        {"op": "add", "path": "/spec", "value": spec},
    ])
}

/// The mesh endpoints of a Pod: one per pod IP with the sidecar's inbound
/// port, named `spiffe://TD/ns/NS/sa/SA`. `None` unless the Pod is Running,
/// has an IP, and runs the sidecar (a `trellis-proxy` container, as the
/// injector counts it: the `trellis.io/injected` annotation alone may have
/// been copied by hand, or the container taken out, and nothing would
/// listen on the inbound port); host-network pods share the node's IP and
/// are left out.
pub fn endpoints_from_pod(pod: &Pod, td: &TrustDomain) -> Option<Vec<WorkloadRecord>> {
    let spec = pod.spec.as_ref()?;
    let status = pod.status.as_ref()?;
    if status.phase.as_deref() != Some("Running") || spec.host_network == Some(true) {
        return None;
    }
    let sidecar = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .find(|c| c.name == PROXY_CONTAINER)?;
    let port = inbound_port(sidecar);
    let namespace = pod.namespace()?;
    let account = spec
        .service_account_name
        .as_deref()
        .filter(|s| !s.is_empty())
        .unwrap_or("default");
    let spiffe_id = SpiffeId::workload(td, &namespace, account).ok()?;
    let mut ips: Vec<&str> = status
        .pod_ips
        .iter()
        .flatten()
        .map(|p| p.ip.as_str())
        .collect();
    if ips.is_empty() {
        ips.extend(status.pod_ip.as_deref());
    }
    let mut addresses: Vec<String> = ips
        .into_iter()
        .filter_map(|ip| ip.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, port).to_string())
        .collect();
    addresses.sort();
    addresses.dedup();
    (!addresses.is_empty()).then(|| {
        // A Pod's endpoints live as long as the Pod runs, not as long as
        // one certificate: the watch removes them.
        vec![WorkloadRecord::new(
            spiffe_id.to_string(),
            addresses,
            i64::MAX,
            0,
        )]
    })
}

fn inbound_port(container: &Container) -> u16 {
    container
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(INBOUND_PORT_NAME))
        .and_then(|p| u16::try_from(p.container_port).ok())
        // The sidecar's default when its container names none.
        .unwrap_or(SIDECAR_INBOUND_PORT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_core::policy::SelectorScope;

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    fn pod(phase: &str, injected: bool) -> Pod {
        let containers = if injected {
            json!([{"name": "trellis-proxy", "restartPolicy": "Always",
                    "ports": [{"name": "trellis-inbound", "containerPort": 15106}]}])
        } else {
            json!([])
        };
        serde_json::from_value(json!({
            "metadata": {"name": "web-1", "namespace": "shop", "resourceVersion": "7"},
            "spec": {"serviceAccountName": "web", "initContainers": containers,
                     "containers": [{"name": "app"}]},
            "status": {"phase": phase, "podIP": "10.1.0.5",
                       "podIPs": [{"ip": "10.1.0.5"}, {"ip": "fd00::5"}]},
        }))
        .unwrap()
    }

    #[test]
    fn a_running_injected_pod_is_an_endpoint_per_ip() {
        let records = endpoints_from_pod(&pod("Running", true), &td()).unwrap();
        let addresses: Vec<_> = records
            .iter()
            .flat_map(|r| &r.addresses)
            .map(|a| &a.address)
            .map(String::as_str)
            .collect();
        assert_eq!(addresses, ["10.1.0.5:15106", "[fd00::5]:15106"]);
        assert!(
            records
                .iter()
                .all(|r| r.spiffe_id == "spiffe://cluster.local/ns/shop/sa/web")
        );
    }

    #[test]
    fn pending_or_plain_pods_are_no_endpoints() {
        assert_eq!(endpoints_from_pod(&pod("Pending", true), &td()), None);
        assert_eq!(endpoints_from_pod(&pod("Running", false), &td()), None);
    }

    /// A pod marked `trellis.io/injected` without the sidecar (the
    /// annotation copied into a manifest by hand, or the container taken
    /// out by another webhook) has nothing listening on the inbound port:
    /// it is no endpoint. The recorded Pod is the injected one of the
    /// store's fixtures, as the API server lists it.
    #[test]
    fn the_injected_annotation_alone_is_no_endpoint() {
        let list: Value = serde_json::from_str(include_str!(
            "../../../tests/fixtures/k8s/store/pods-list.json"
        ))
        .unwrap();
        let mut recorded = list["items"][0].clone();
        let parse = |pod: &Value| serde_json::from_value::<Pod>(pod.clone()).unwrap();
        assert_eq!(
            recorded["metadata"]["annotations"]["trellis.io/injected"],
            "true"
        );
        let records = endpoints_from_pod(&parse(&recorded), &td()).unwrap();
        assert_eq!(records[0].addresses[0].address, "10.244.1.17:15006");

        recorded["spec"]["initContainers"]
            .as_array_mut()
            .unwrap()
            .retain(|c| c["name"] != "trellis-proxy");
        assert_eq!(endpoints_from_pod(&parse(&recorded), &td()), None);
    }

    #[test]
    fn a_written_policy_reads_back_the_same() {
        let object: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "trellis.io/v1alpha1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "web-to-api", "namespace": "shop", "generation": 3,
                         "uid": "u", "managedFields": []},
            "spec": {"selector": {"spiffeIds": ["spiffe://cluster.local/ns/shop/sa/api"]},
                     "action": "ALLOW",
                     "rules": [{"from": [{"namespace": "shop"}], "to": [{"ports": [8080]}]}]},
            "status": {},
        }))
        .unwrap();
        let policy = policy_from_object(&object, &td(), &ValidationContext::default())
            .unwrap()
            .value;
        assert_eq!(policy.revision, 3);
        let spec = policy_spec(&policy).unwrap();
        let written = new_object(&authorization_policy_resource(), "shop", "web-to-api", spec);
        let again = policy_from_object(
            &DynamicObject {
                metadata: kube::api::ObjectMeta {
                    generation: Some(3),
                    ..written.metadata.clone()
                },
                ..written
            },
            &td(),
            &ValidationContext::default(),
        )
        .unwrap()
        .value;
        assert_eq!(again, policy);
    }

    /// An object admitted before policies were limited to their namespace
    /// (or while the webhook was not asked) is enforced as written and
    /// logged, not dropped: dropping a DENY would open what it closed.
    #[test]
    fn an_object_selecting_outside_its_namespace_is_enforced_as_stored() {
        let object: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "trellis.io/v1alpha1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "deny-all", "namespace": "team-a", "generation": 1},
            "spec": {"selector": {"spiffeIds": ["spiffe://cluster.local/*"]},
                     "action": "DENY", "rules": [{}]},
        }))
        .unwrap();
        let context = ValidationContext {
            scope: SelectorScope::root("trellis"),
            ..ValidationContext::default()
        };
        let converted = policy_from_object(&object, &td(), &context).unwrap();
        assert_eq!(converted.relaxed.len(), 1, "{:?}", converted.relaxed);
        let selector = converted.value.selector.unwrap();
        assert_eq!(selector.spiffe_ids, ["spiffe://cluster.local/*"]);
    }
}
