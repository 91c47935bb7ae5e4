//! The `admission.k8s.io/v1` `AdmissionReview` envelope: reading a request the
//! API server sent and writing the response it expects.
//!
//! This module owns the wire shape only. It never decides anything about the
//! object under review: [`super::pod`] and [`super::policy`] do.

use std::borrow::Cow;

use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Map, Value, json};

/// The only admission API version the API server is registered to send us
/// (`admissionReviewVersions: ["v1"]` in the chart).
pub const ADMISSION_API_VERSION: &str = "admission.k8s.io/v1";

/// Why a request body is not a usable `AdmissionReview`. The webhook server
/// answers these with HTTP 400, so the webhook's `failurePolicy` decides
/// what happens to the object (the response needs the request's `uid`, which
/// such a body may not have).
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("the body is not JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    #[error(
        "expected apiVersion {ADMISSION_API_VERSION:?} and kind \"AdmissionReview\", got {api_version:?} {kind:?}"
    )]
    NotAdmissionReview { api_version: String, kind: String },
    #[error("the AdmissionReview has no request")]
    NoRequest,
    #[error("request.{field}: {message}")]
    BadRequest {
        field: &'static str,
        message: String,
    },
}

/// A group/version/kind, as `request.kind` names the object under review.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct GroupVersionKind {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub kind: String,
}

impl std::fmt::Display for GroupVersionKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.group.is_empty() {
            write!(f, "{}/{}", self.version, self.kind)
        } else {
            write!(f, "{}/{}/{}", self.group, self.version, self.kind)
        }
    }
}

/// The parts of `request` the webhooks use; everything else (userInfo,
/// options, resource) is ignored.
#[derive(Debug, Clone, PartialEq)]
pub struct AdmissionRequest {
    pub uid: String,
    pub kind: GroupVersionKind,
    pub name: String,
    pub namespace: String,
    /// CREATE, UPDATE, DELETE or CONNECT.
    pub operation: String,
    /// The object as it will be stored; `None` for DELETE.
    pub object: Option<Value>,
    /// A server-side dry run (`kubectl … --dry-run=server`): nothing is
    /// stored, whatever the answer.
    pub dry_run: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    request: Option<RawRequest>,
}

#[derive(Deserialize)]
struct RawRequest {
    #[serde(default)]
    uid: String,
    #[serde(default)]
    kind: GroupVersionKind,
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    operation: String,
    #[serde(default)]
    object: Option<Value>,
    #[serde(default, rename = "dryRun")]
    dry_run: Option<bool>,
}

impl AdmissionRequest {
    /// Reads the body of a webhook call.
    pub fn parse(body: &[u8]) -> Result<Self, ReviewError> {
        let envelope: Envelope = serde_json::from_slice(body).map_err(ReviewError::NotJson)?;
        if envelope.api_version != ADMISSION_API_VERSION || envelope.kind != "AdmissionReview" {
            return Err(ReviewError::NotAdmissionReview {
                api_version: envelope.api_version,
                kind: envelope.kind,
            });
        }
        let raw = envelope.request.ok_or(ReviewError::NoRequest)?;
        if raw.uid.is_empty() {
            return Err(ReviewError::BadRequest {
                field: "uid",
                message: "missing or empty".into(),
            });
        }
        Ok(Self {
            uid: raw.uid,
            kind: raw.kind,
            name: raw.name,
            namespace: raw.namespace,
            operation: raw.operation,
            object: raw.object.filter(|o| !o.is_null()),
            dry_run: raw.dry_run.unwrap_or(false),
        })
    }
}

/// One JSONPatch (RFC 6902) operation: `add`, which creates an object's
/// member or replaces an existing one (and inserts into an array, or
/// appends at `-`), `replace`, which replaces an array's element in
/// place, or `remove`, which takes an array's element out (its `value`
/// is not sent).
#[derive(Debug, Clone, PartialEq)]
pub struct PatchOp {
    pub op: PatchKind,
    /// A JSON pointer: a whole field of the pod (`/spec/containers`), or
    /// one element of an array of it (`/spec/initContainers/1/env/14`).
    pub path: Cow<'static, str>,
    pub value: Value,
}

/// The JSONPatch operations the injector uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    Add,
    Replace,
    Remove,
}

impl PatchKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Add => "add",
            Self::Replace => "replace",
            Self::Remove => "remove",
        }
    }
}

impl PatchOp {
    pub fn add(path: impl Into<Cow<'static, str>>, value: Value) -> Self {
        Self {
            op: PatchKind::Add,
            path: path.into(),
            value,
        }
    }

    pub fn replace(path: impl Into<Cow<'static, str>>, value: Value) -> Self {
        Self {
            op: PatchKind::Replace,
            path: path.into(),
            value,
        }
    }

    pub fn remove(path: impl Into<Cow<'static, str>>) -> Self {
        Self {
            op: PatchKind::Remove,
            path: path.into(),
            value: Value::Null,
        }
    }
}

/// The answer to one review.
#[derive(Debug, Clone, PartialEq)]
pub struct AdmissionResponse {
    pub uid: String,
    pub allowed: bool,
    /// Empty: no patch (the object is admitted as it is).
    pub patch: Vec<PatchOp>,
    /// Shown to the client (`kubectl` prints them).
    pub warnings: Vec<String>,
    /// Why the object was denied.
    pub message: Option<String>,
}

impl AdmissionResponse {
    pub fn allow(uid: &str) -> Self {
        Self {
            uid: uid.to_owned(),
            allowed: true,
            patch: Vec::new(),
            warnings: Vec::new(),
            message: None,
        }
    }

    pub fn deny(uid: &str, message: impl Into<String>) -> Self {
        Self {
            allowed: false,
            message: Some(message.into()),
            ..Self::allow(uid)
        }
    }

    pub fn with_warning(mut self, warning: impl Into<String>) -> Self {
        self.warnings.push(warning.into());
        self
    }

    /// The patch as the JSON array RFC 6902 defines.
    pub fn patch_json(&self) -> Value {
        Value::Array(
            self.patch
                .iter()
                .map(|op| match op.op {
                    PatchKind::Remove => json!({"op": op.op.as_str(), "path": op.path}),
                    _ => json!({"op": op.op.as_str(), "path": op.path, "value": op.value}),
                })
                .collect(),
        )
    }

    /// The whole `AdmissionReview` the API server expects back: the patch is
    /// base64 of its JSON (`patchType: JSONPatch`), and a denial carries a
    /// `status` with code 403 and the message.
    pub fn to_review(&self) -> Value {
        let mut response = Map::new();
        response.insert("uid".into(), json!(self.uid));
        response.insert("allowed".into(), json!(self.allowed));
        if !self.patch.is_empty() {
            let bytes = serde_json::to_vec(&self.patch_json()).unwrap_or_default();
            let encoded = base64::engine::general_purpose::STANDARD.encode(bytes);
            response.insert("patchType".into(), json!("JSONPatch"));
            response.insert("patch".into(), json!(encoded));
        }
        if !self.warnings.is_empty() {
            response.insert("warnings".into(), json!(self.warnings));
        }
        if let Some(message) = &self.message {
            let mut status = json!({"message": message});
            if !self.allowed {
                status["code"] = json!(403);
                status["reason"] = json!("Forbidden");
            }
            response.insert("status".into(), status);
        }
        json!({
            "apiVersion": ADMISSION_API_VERSION,
            "kind": "AdmissionReview",
            "response": Value::Object(response),
        })
    }

    /// [`Self::to_review`] as the HTTP response body.
    pub fn to_body(&self) -> Vec<u8> {
        serde_json::to_vec(&self.to_review()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_other_api_versions() {
        let body = br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview","request":{"uid":"x"}}"#;
        let e = AdmissionRequest::parse(body).unwrap_err();
        assert!(e.to_string().contains("admission.k8s.io/v1"), "{e}");
    }

    #[test]
    fn refuses_a_request_without_uid() {
        let body = br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{}}"#;
        let e = AdmissionRequest::parse(body).unwrap_err();
        assert_eq!(e.to_string(), "request.uid: missing or empty");
    }

    #[test]
    fn an_empty_patch_is_left_out() {
        let review = AdmissionResponse::allow("u1").to_review();
        assert_eq!(
            review,
            json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                   "response": {"uid": "u1", "allowed": true}})
        );
    }

    #[test]
    fn a_denial_has_status_403() {
        let review = AdmissionResponse::deny("u2", "no").to_review();
        assert_eq!(review["response"]["allowed"], json!(false));
        assert_eq!(review["response"]["status"]["code"], json!(403));
        assert_eq!(review["response"]["status"]["message"], json!("no"));
    }
}
