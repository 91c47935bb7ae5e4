//! The `/validate` webhook: Trellis policy objects (group `trellis.io`) are
//! admitted only when they pass the one policy validation.
//!
//! This is the validation `trellisctl policy lint` and the Admin API run:
//! [`Document::from_value`] (shape, unknown fields, kind) and then
//! [`validate_in`] (every rule of a valid AuthorizationPolicy) or
//! [`validate_rate_limit_in_with`] (a RateLimitPolicy), so a policy is rejected by
//! `kubectl apply` with the same field path and message as by `policy lint`,
//! less the line number (the API server has no file). Warnings are admitted
//! and shown by `kubectl`. Validation keeps at most
//! [`MAX_DIAGNOSTICS`](trellis_core::policy::MAX_DIAGNOSTICS) problems of an
//! object; the answer lists those and says how many more there were. It
//! never stores anything: the CRD store backend watches what the API server
//! accepted.
//!
//! Kubernetes adds metadata (uid, resourceVersion, labels, managedFields...)
//! that the document format does not have; only `metadata.name` and
//! `metadata.namespace` are kept for validation. The namespace is the
//! request's, the one the API server checked the writer's RBAC in: a
//! policy selects only workloads of that namespace unless it is the root
//! namespace, so namespaced RBAC on policies grants no more than that
//! namespace. A kind that the policy library does not know (yet) is
//! denied, never admitted unchecked.

use serde_json::{Value, json};
use trellis_core::TrustDomain;
use trellis_core::policy::{
    Document, Omitted, ValidationContext, validate_in, validate_rate_limit_in_with,
};

use super::review::{AdmissionRequest, AdmissionResponse, ReviewError};

/// The API group of Trellis policy objects.
pub const GROUP: &str = "trellis.io";

/// Reviews one Trellis policy object for the mesh of trust domain `td`,
/// knowing the mesh's opaque ports (`context`), as `trellisctl policy apply`
/// is checked by the control plane.
pub fn review_policy(
    body: &[u8],
    td: &TrustDomain,
    context: &ValidationContext,
) -> Result<AdmissionResponse, ReviewError> {
    let request = AdmissionRequest::parse(body)?;
    Ok(respond_policy(&request, td, context))
}

/// [`review_policy`] for a request already read.
pub fn respond_policy(
    request: &AdmissionRequest,
    td: &TrustDomain,
    context: &ValidationContext,
) -> AdmissionResponse {
    let uid = &request.uid;
    if !matches!(request.operation.as_str(), "CREATE" | "UPDATE") || request.kind.group != GROUP {
        return AdmissionResponse::allow(uid);
    }
    let Some(object) = &request.object else {
        return AdmissionResponse::deny(uid, "the review has no object");
    };
    let name = field(object, "name").unwrap_or(&request.name);
    // The namespace RBAC was checked in decides what the policy may select:
    // an object naming another one is not admitted on its word.
    let namespace = match (request.namespace.as_str(), field(object, "namespace")) {
        ("", Some(own)) => own,
        (request_ns, Some(own)) if own != request_ns => {
            return AdmissionResponse::deny(
                uid,
                format!(
                    "{} {own}/{name}: metadata.namespace {own:?} is not the namespace {request_ns:?} it is written in",
                    request.kind.kind
                ),
            );
        }
        (request_ns, _) => request_ns,
    };
    let what = format!("{} {namespace}/{name}", request.kind.kind);

    let mut document = object.clone();
    if let Some(map) = document.as_object_mut() {
        map.insert(
            "metadata".into(),
            json!({"name": name, "namespace": namespace}),
        );
        map.remove("status");
    }
    let checked = match Document::from_value(document) {
        Ok(Document::AuthorizationPolicy(policy)) => {
            validate_in(&policy, td, context).map(|valid| {
                let omitted = Omitted {
                    errors: 0,
                    warnings: valid.omitted_warnings(),
                };
                (valid.warnings().to_vec(), omitted)
            })
        }
        Ok(Document::RateLimitPolicy(limit)) => validate_rate_limit_in_with(&limit, td, context)
            .map(|relaxed| (relaxed, Omitted::default())),
        Ok(_) => {
            return AdmissionResponse::deny(
                uid,
                format!("{what}: this control plane cannot validate this kind yet"),
            );
        }
        Err(e) => return AdmissionResponse::deny(uid, format!("{what} is invalid: {e}")),
    };
    let (violations, omitted) = match checked {
        Ok(warnings) => warnings,
        Err(violations) => {
            let omitted = violations.omitted();
            (violations.into_vec(), omitted)
        }
    };
    let (errors, warnings): (Vec<_>, Vec<_>) = violations.into_iter().partition(|v| v.is_error());
    let mut response = if errors.is_empty() && omitted.errors == 0 {
        AdmissionResponse::allow(uid)
    } else {
        let mut messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
        if omitted.errors > 0 {
            messages.push(more(omitted.errors, "error"));
        }
        AdmissionResponse::deny(uid, format!("{what} is invalid: {}", messages.join("; ")))
    };
    response.warnings = warnings
        .iter()
        .map(|w| format!("{what}: {}", w.message_with_path()))
        .collect();
    if omitted.warnings > 0 {
        let more = more(omitted.warnings, "warning");
        response.warnings.push(format!("{what}: {more}"));
    }
    response
}

/// `and N more errors`: what validation counted but did not keep.
fn more(n: usize, what: &str) -> String {
    format!("and {n} more {what}{}", if n == 1 { "" } else { "s" })
}

fn field<'a>(object: &'a Value, name: &str) -> Option<&'a str> {
    object
        .get("metadata")?
        .get(name)?
        .as_str()
        .filter(|s| !s.is_empty())
}

/// A warning's `path: message` without the `warning: ` prefix that
/// `Display` adds (kubectl prints "Warning:" itself).
trait PathMessage {
    fn message_with_path(&self) -> String;
}

impl PathMessage for trellis_core::policy::Violation {
    fn message_with_path(&self) -> String {
        if self.path.is_root() {
            self.message.clone()
        } else {
            format!("{}: {}", self.path, self.message)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::review::GroupVersionKind;
    use super::*;
    use trellis_core::policy::MAX_DIAGNOSTICS;

    /// A CREATE of an AuthorizationPolicy `name` asked in `namespace`.
    fn create(name: &str, namespace: &str, object: serde_json::Value) -> AdmissionRequest {
        AdmissionRequest {
            uid: "u".into(),
            kind: GroupVersionKind {
                group: GROUP.into(),
                version: "v1alpha1".into(),
                kind: "AuthorizationPolicy".into(),
            },
            name: name.into(),
            namespace: namespace.into(),
            operation: "CREATE".into(),
            object: Some(object),
            dry_run: false,
        }
    }

    fn review(ports: Vec<i64>) -> AdmissionResponse {
        let request = create(
            "many",
            "default",
            json!({
                "apiVersion": "trellis.io/v1alpha1",
                "kind": "AuthorizationPolicy",
                "metadata": {"name": "many", "namespace": "default"},
                "spec": {
                    "selector": {"spiffeIds": ["spiffe://cluster.local/ns/default/sa/api"]},
                    "action": "ALLOW",
                    "rules": [{"to": [{"ports": ports}]}],
                },
            }),
        );
        let td = TrustDomain::new("cluster.local").unwrap();
        respond_policy(&request, &td, &ValidationContext::default())
    }

    /// An object of an error every few bytes (the body may hold 4 MiB) is
    /// denied listing the errors validation kept and counting the rest.
    #[test]
    fn a_denial_lists_the_errors_kept_and_counts_the_rest() {
        let response = review(vec![0; 50_000]);
        assert!(!response.allowed);
        let message = response.message.unwrap();
        let listed = message.matches("port 0 is out of range").count();
        assert_eq!(listed, MAX_DIAGNOSTICS);
        assert!(
            message.starts_with(
                "AuthorizationPolicy default/many is invalid: spec.rules[0].to[0].ports[0]: port 0"
            ),
            "{}",
            &message[..200]
        );
        assert!(message.ends_with("; and 49000 more errors"), "{message}");
    }

    /// RBAC was checked in the request's namespace: an object claiming
    /// another (the API server refuses that before asking, but the webhook
    /// does not rely on it) is judged by neither.
    #[test]
    fn an_object_naming_another_namespace_than_the_request_is_denied() {
        let request = create(
            "db",
            "team-a",
            json!({
                "apiVersion": "trellis.io/v1alpha1",
                "kind": "AuthorizationPolicy",
                "metadata": {"name": "db", "namespace": "payments"},
                "spec": {
                    "selector": {"spiffeIds": ["spiffe://cluster.local/ns/payments/sa/db"]},
                    "action": "ALLOW",
                    "rules": [{}],
                },
            }),
        );
        let td = TrustDomain::new("cluster.local").unwrap();
        let response = respond_policy(&request, &td, &ValidationContext::default());
        assert!(!response.allowed);
        assert_eq!(
            response.message.as_deref(),
            Some(
                "AuthorizationPolicy payments/db: metadata.namespace \"payments\" is not the namespace \"team-a\" it is written in"
            )
        );
    }

    #[test]
    fn warnings_past_the_cap_are_counted() {
        let response = review(vec![8080; 1_502]);
        assert!(response.allowed);
        assert_eq!(response.warnings.len(), MAX_DIAGNOSTICS + 1);
        assert_eq!(
            response.warnings.last().unwrap(),
            "AuthorizationPolicy default/many: and 501 more warnings"
        );
    }
}
