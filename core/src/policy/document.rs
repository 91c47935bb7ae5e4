//! The policy documents operators write, exactly as they appear in YAML or
//! JSON (`apiVersion: trellis.io/v1alpha1`).
//!
//! This module owns the shape of each document kind and reading it from a
//! JSON value, with unknown fields refused. It never judges whether values
//! make sense (that is `validate`) and never knows positions in a file (that
//! is `source`). New fields may be added to these types (issue 4 adds L7
//! matches to [`Destination`]); none may change the meaning of an existing
//! one. New kinds are new variants of [`Document`].

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::path::FieldPath;
use super::ratelimit::RateLimitPolicy;

/// The only `apiVersion` this version understands.
pub const API_VERSION: &str = "trellis.io/v1alpha1";
/// The kinds this version understands, in the order error messages list them.
pub const KINDS: &[&str] = &[AuthorizationPolicy::KIND, RateLimitPolicy::KIND];

/// Any policy document.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Document {
    AuthorizationPolicy(AuthorizationPolicy),
    RateLimitPolicy(RateLimitPolicy),
}

/// Who may connect to the selected workloads, and on which ports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationPolicy {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: AuthorizationPolicySpec,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    #[serde(default)]
    pub selector: Selector,
    pub action: Action,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// The workloads a policy protects.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Selector {
    /// Exact SPIFFE IDs, or prefixes ending in `/*`.
    #[serde(default)]
    pub spiffe_ids: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    Allow,
    Deny,
    /// Evaluated and reported as "would deny", never enforced.
    Audit,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
        }
    }
}

/// Matches when any source matches and any destination matches; an absent
/// list matches everything on its side.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<Source>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<Destination>>,
}

/// Who is connecting; exactly one field is set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Source {
    /// An exact SPIFFE ID, or a prefix ending in `/*`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
    /// Any identity `spiffe://<mesh trust domain>/ns/<namespace>/...`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Any identity of this trust domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_domain: Option<String>,
}

/// What is being reached on the selected workload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Destination {
    /// Kept wide so an out-of-range port gets a validation message, not a
    /// type error.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "port_numbers"
    )]
    pub ports: Option<Vec<i64>>,
    /// HTTP methods (exact, case-sensitive); HTTP requests only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub methods: Option<Vec<String>>,
    /// Request paths: exact `/x`, prefix `/x/*`, templates `/users/{id}`,
    /// matched as sent by an ALLOW rule, and also in any ASCII letter case
    /// (and with a trailing `/`, segment parameters, escapes decoded,
    /// characters whose NFKC form or Unicode case is ASCII, or is a
    /// character that is, read as that ASCII, or the `.`s and spaces ending
    /// a segment left out) by a DENY or AUDIT rule; paths an app could read as another one are refused before
    /// matching ([`check_path`](super::l7::check_path)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paths: Option<Vec<String>>,
    /// Header name to exact value; every one must match. A header sent more
    /// than once matches an ALLOW rule only if every value does, a DENY or
    /// AUDIT rule if any does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<std::collections::BTreeMap<String, String>>,
    /// A gRPC service, and optionally one method of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<GrpcMatch>,
}

impl Destination {
    /// Whether this entry matches on anything beyond ports, so it can only
    /// be decided per HTTP request.
    pub fn has_l7(&self) -> bool {
        self.methods.is_some()
            || self.paths.is_some()
            || self.headers.is_some()
            || self.grpc.is_some()
    }
}

/// A gRPC service (`package.Service`) and optionally one of its methods.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcMatch {
    pub service: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

/// Reads ports so that a wrong type says "expected a port number".
fn port_numbers<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<i64>>, D::Error> {
    struct PortNumber(i64);
    impl<'de> Deserialize<'de> for PortNumber {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct Visit;
            impl serde::de::Visitor<'_> for Visit {
                type Value = i64;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("a port number")
                }
                fn visit_i64<E>(self, v: i64) -> Result<i64, E> {
                    Ok(v)
                }
                fn visit_u64<E>(self, v: u64) -> Result<i64, E> {
                    Ok(i64::try_from(v).unwrap_or(i64::MAX))
                }
            }
            d.deserialize_i64(Visit).map(PortNumber)
        }
    }
    let ports = Option::<Vec<PortNumber>>::deserialize(d)?;
    Ok(ports.map(|ports| ports.into_iter().map(|p| p.0).collect()))
}

impl AuthorizationPolicy {
    pub const KIND: &'static str = "AuthorizationPolicy";
}

/// Why a JSON value is not a document of a known kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", if path.is_root() { String::new() } else { format!("{path}: ") })]
pub struct DocumentError {
    pub path: FieldPath,
    pub message: String,
    /// The error is about the key at `path` (an unknown field), not its value.
    pub at_key: bool,
}

impl DocumentError {
    fn new(path: FieldPath, message: impl Into<String>) -> Self {
        Self {
            path,
            message: message.into(),
            at_key: false,
        }
    }
}

impl Document {
    /// Reads one document, choosing the type by `apiVersion` and `kind`.
    pub fn from_value(value: Value) -> Result<Self, DocumentError> {
        let root = FieldPath::root();
        let Value::Object(map) = &value else {
            return Err(DocumentError::new(
                root,
                "a policy document must be a mapping",
            ));
        };
        let header = |field: &'static str| match map.get(field) {
            None => Err(DocumentError::new(
                root.clone(),
                format!("missing field `{field}`"),
            )),
            Some(Value::String(s)) => Ok(s.as_str()),
            Some(_) => Err(DocumentError::new(
                root.field(field),
                format!("{field} must be a string"),
            )),
        };
        let api_version = header("apiVersion")?;
        if api_version != API_VERSION {
            return Err(DocumentError::new(
                root.field("apiVersion"),
                format!("unsupported apiVersion {api_version:?} (expected {API_VERSION:?})"),
            ));
        }
        match header("kind")? {
            AuthorizationPolicy::KIND => typed(value).map(Document::AuthorizationPolicy),
            RateLimitPolicy::KIND => typed(value).map(Document::RateLimitPolicy),
            other => Err(DocumentError::new(
                root.field("kind"),
                format!("unknown kind {other:?} (known kinds: {})", KINDS.join(", ")),
            )),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Document::AuthorizationPolicy(_) => AuthorizationPolicy::KIND,
            Document::RateLimitPolicy(_) => RateLimitPolicy::KIND,
        }
    }

    pub fn metadata(&self) -> &Metadata {
        match self {
            Document::AuthorizationPolicy(p) => &p.metadata,
            Document::RateLimitPolicy(p) => &p.metadata,
        }
    }

    pub fn to_value(&self) -> Value {
        let value = match self {
            Document::AuthorizationPolicy(p) => serde_json::to_value(p),
            Document::RateLimitPolicy(p) => serde_json::to_value(p),
        };
        value.expect("policy documents always serialize")
    }

    /// The document as block YAML, fields in the order operators write them.
    pub fn to_yaml(&self) -> String {
        let mut out = String::new();
        emit_map(&self.to_value(), 0, &mut out);
        out
    }
}

fn typed<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, DocumentError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let message = e.inner().to_string();
        DocumentError {
            path: FieldPath::from_serde(e.path()),
            at_key: message.starts_with("unknown field"),
            message,
        }
    })
}

/// Field order for printing; fields not listed follow, alphabetically.
const FIELD_ORDER: &[&str] = &[
    "apiVersion",
    "kind",
    "metadata",
    "name",
    "namespace",
    "spec",
    "selector",
    "action",
    "rules",
    "from",
    "to",
];

fn emit_map(value: &Value, indent: usize, out: &mut String) {
    let Value::Object(map) = value else { return };
    let mut entries: Vec<_> = map.iter().collect();
    entries.sort_by_key(|(k, _)| {
        let rank = FIELD_ORDER.iter().position(|f| f == k);
        (rank.unwrap_or(usize::MAX), k.as_str())
    });
    for (key, value) in entries {
        let pad = " ".repeat(indent);
        match value {
            Value::Object(m) if !m.is_empty() => {
                let _ = writeln!(out, "{pad}{key}:");
                emit_map(value, indent + 2, out);
            }
            // Numbers (ports) read best in flow style: `ports: [80, 443]`.
            Value::Array(items) if items.iter().all(Value::is_number) => {
                let numbers: Vec<String> = items.iter().map(Value::to_string).collect();
                let _ = writeln!(out, "{pad}{key}: [{}]", numbers.join(", "));
            }
            Value::Array(items) => {
                let _ = writeln!(out, "{pad}{key}:");
                emit_items(items, indent + 2, out);
            }
            _ => {
                let _ = writeln!(out, "{pad}{key}: {}", scalar(value));
            }
        }
    }
}

fn emit_items(items: &[Value], indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    for item in items {
        match item {
            Value::Object(m) if !m.is_empty() => {
                let mut nested = String::new();
                emit_map(item, indent + 2, &mut nested);
                // The first field shares the line of the dash.
                let _ = write!(out, "{pad}- {}", &nested[indent + 2..]);
            }
            Value::Array(inner) if !inner.is_empty() => {
                let _ = writeln!(out, "{pad}-");
                emit_items(inner, indent + 2, out);
            }
            _ => {
                let _ = writeln!(out, "{pad}- {}", scalar(item));
            }
        }
    }
}

fn scalar(value: &Value) -> String {
    match value {
        Value::String(s) if plain_is_safe(s) => s.clone(),
        Value::Object(_) => "{}".to_owned(),
        Value::Array(_) => "[]".to_owned(),
        other => other.to_string(),
    }
}

/// Whether a string may be written unquoted and read back as the same string.
fn plain_is_safe(s: &str) -> bool {
    let Some(first) = s.chars().next() else {
        return false;
    };
    !"-?:,[]{}#&*!|>'\"%@`".contains(first)
        && !s.contains(": ")
        && !s.contains(" #")
        && !s.ends_with(':')
        && s.trim() == s
        && s.chars().all(|c| !c.is_control())
        && super::source::resolves_to_string(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy_value() -> Value {
        json!({
            "apiVersion": API_VERSION,
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "web-to-api", "namespace": "default"},
            "spec": {
                "selector": {"spiffeIds": ["spiffe://cluster.local/ns/default/sa/api"]},
                "action": "ALLOW",
                "rules": [{"from": [{"spiffeId": "spiffe://cluster.local/ns/default/sa/web"},
                                    {"namespace": "monitoring"}],
                           "to": [{"ports": [8080]}]}, {}]
            }
        })
    }

    #[test]
    fn reads_an_authorization_policy() {
        let doc = Document::from_value(policy_value()).unwrap();
        let Document::AuthorizationPolicy(p) = &doc else {
            panic!("not an AuthorizationPolicy: {doc:?}");
        };
        assert_eq!(p.metadata.name, "web-to-api");
        assert_eq!(p.spec.action, Action::Allow);
        assert_eq!(
            p.spec.rules[0].to.as_ref().unwrap()[0].ports,
            Some(vec![8080])
        );
        assert_eq!(p.spec.rules[1], Rule::default());
    }

    #[test]
    fn refuses_unknown_fields_with_their_path() {
        let mut value = policy_value();
        value["spec"]["rules"][0]["from"][1]["sa"] = json!("x");
        let err = Document::from_value(value).unwrap_err();
        assert_eq!(err.path.to_string(), "spec.rules[0].from[1].sa");
        assert!(err.at_key);
        assert!(
            err.message.starts_with("unknown field `sa`"),
            "{}",
            err.message
        );
    }

    #[test]
    fn names_an_unknown_kind() {
        let mut value = policy_value();
        value["kind"] = json!("TrafficPolicy");
        let err = Document::from_value(value).unwrap_err();
        assert_eq!(
            err.to_string(),
            "kind: unknown kind \"TrafficPolicy\" (known kinds: AuthorizationPolicy, RateLimitPolicy)"
        );
    }

    #[test]
    fn refuses_another_api_version() {
        let mut value = policy_value();
        value["apiVersion"] = json!("trellis.io/v1");
        let err = Document::from_value(value).unwrap_err();
        assert_eq!(err.path.to_string(), "apiVersion");
    }

    #[test]
    fn prints_yaml_that_reads_back_the_same() {
        let doc = Document::from_value(policy_value()).unwrap();
        let yaml = doc.to_yaml();
        assert!(yaml.starts_with("apiVersion: trellis.io/v1alpha1\nkind: AuthorizationPolicy\n"));
        assert!(
            yaml.contains("  rules:\n    - from:\n        - spiffeId: spiffe://"),
            "{yaml}"
        );
        let (nodes, err) = super::super::source::parse_stream(&yaml);
        assert_eq!(err, None);
        assert_eq!(Document::from_value(nodes[0].to_json()).unwrap(), doc);
    }
}
