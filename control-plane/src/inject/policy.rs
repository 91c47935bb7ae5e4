//! The `/validate` webhook: Trellis policy objects (group `trellis.io`) are
//! admitted only when they pass the one policy validation.
//!
//! This is the validation `trellisctl policy lint` and the Admin API run:
//! [`Document::from_value`] (shape, unknown fields, kind) and then
//! [`validate_in`] (every rule of a valid AuthorizationPolicy) or
//! [`validate_rate_limit_in`] (a RateLimitPolicy), so a policy is rejected by
//! `kubectl apply` with the same field path and message as by `policy lint`,
//! less the line number (the API server has no file). Warnings are admitted
//! and shown by `kubectl`. It never stores anything: the CRD store backend
//! watches what the API server accepted.
//!
//! Kubernetes adds metadata (uid, resourceVersion, labels, managedFields...)
//! that the document format does not have; only `metadata.name` and
//! `metadata.namespace` are kept for validation. A kind that the policy
//! library does not know (yet) is denied, never admitted unchecked.

use serde_json::{Value, json};
use trellis_core::TrustDomain;
use trellis_core::policy::{Document, ValidationContext, validate_in, validate_rate_limit_in};

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
    let namespace = field(object, "namespace").unwrap_or(&request.namespace);
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
            validate_in(&policy, td, context).map(|valid| valid.warnings().to_vec())
        }
        Ok(Document::RateLimitPolicy(limit)) => {
            validate_rate_limit_in(&limit, td).map(|()| Vec::new())
        }
        Ok(_) => {
            return AdmissionResponse::deny(
                uid,
                format!("{what}: this control plane cannot validate this kind yet"),
            );
        }
        Err(e) => return AdmissionResponse::deny(uid, format!("{what} is invalid: {e}")),
    };
    let (errors, warnings): (Vec<_>, Vec<_>) = match checked {
        Ok(warnings) => (Vec::new(), warnings),
        Err(violations) => violations.into_iter().partition(|v| v.is_error()),
    };
    let mut response = if errors.is_empty() {
        AdmissionResponse::allow(uid)
    } else {
        let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
        AdmissionResponse::deny(uid, format!("{what} is invalid: {}", messages.join("; ")))
    };
    response.warnings = warnings
        .iter()
        .map(|w| format!("{what}: {}", w.message_with_path()))
        .collect();
    response
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
