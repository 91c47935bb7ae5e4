//! Authorization policy: the documents operators write, their one
//! validation, their protobuf form, and the engine that decides connections.
//!
//! Everything that must agree between the control plane, `trellisctl` and
//! the sidecar lives here, so the Admin API, `policy lint`, the admission
//! webhook and a sidecar's NACK all reject a policy with the same message,
//! and `policy explain` answers with the very engine the sidecars run.
//! This module never does I/O beyond reading the files it is asked to lint,
//! never logs, and holds no state: storing, pushing and enforcing are the
//! callers' jobs.
//!
//! | module | owns |
//! | --- | --- |
//! | [`document`] | the YAML/JSON shape (`apiVersion: trellis.io/v1alpha1`), unknown fields refused |
//! | [`validate`](mod@validate) | every rule of a valid policy, as [`Violation`]s at field paths |
//! | [`lint`] | files and directories to validated policies or `file:line:column` [`Diagnostic`]s |
//! | [`convert`] | document ⇄ `trellis_proto::policy::v1::Policy` |
//! | [`l7`] | HTTP/gRPC matches of `to` entries: syntax and matching one request |
//! | [`ratelimit`] | the `RateLimitPolicy` kind, its validation and protobuf form |
//! | [`engine`] | [`PolicySet`]: compiled policies of one workload, [`Decision`]s |
//! | [`explain`](mod@explain) | an [`Explanation`] of one decision, rule by rule |
//!
//! # Line numbers
//!
//! Diagnostics need the line of any field, including ones only validation
//! finds wrong. Files are read with `saphyr-parser`, a YAML 1.2 event parser
//! (the maintained successor of yaml-rust's) that gives every event a line
//! and column, into a small tree of positioned nodes (`source`). The tree
//! becomes a `serde_json::Value` and is deserialized with serde through
//! `serde_path_to_error`, so a serde error (unknown field, wrong type) comes
//! with a field path; that path, like every validation [`Violation`]'s, is
//! looked up in the tree for its line. JSON is read by the same parser, being
//! YAML 1.2. We chose this over `serde_yaml` (unmaintained, and its error
//! locations cover only what serde sees, not later validation) and over
//! `serde-saphyr` (typed spans would have to thread through every field of
//! every document type): here the document types stay plain serde structs,
//! and one tree answers every "which line" question.

/// What is logged of a stored policy that fails a check added since it was
/// stored, with the problem: by either store of the control plane, true of
/// a document of the embedded store and of a Kubernetes object alike (the
/// latter may have been written past a webhook that did not answer), and
/// by the sidecar that receives it. One wording, so one search of the logs
/// finds them all.
pub const RELAXED_POLICY_WARNING: &str = "stored policy fails a check added since it was stored; enforced as the problem says (fix and apply it again)";

/// The sidecar's own ports where its flags do not move them: `--inbound`
/// (mTLS, where callers' sidecars connect), `--outbound` (where iptables
/// redirects the app's own calls) and `--admin`.
pub const SIDECAR_INBOUND_PORT: u16 = 15006;
/// See [`SIDECAR_INBOUND_PORT`].
pub const SIDECAR_OUTBOUND_PORT: u16 = 15001;
/// See [`SIDECAR_INBOUND_PORT`].
pub const SIDECAR_ADMIN_PORT: u16 = 15020;

/// What to warn of a rule's `ports`, or the port `policy explain` is asked
/// about, naming `port` when it is one of the sidecar's own: a connection
/// is decided on the app's port, the one its caller dialled (for one
/// straight to the inbound port, the port of the sidecar's `--app`), never
/// on the sidecar's, so naming it matches nothing. `None` for any other
/// port.
pub fn sidecar_port_warning(port: u16) -> Option<String> {
    let which = match port {
        SIDECAR_INBOUND_PORT => "inbound",
        SIDECAR_OUTBOUND_PORT => "outbound",
        SIDECAR_ADMIN_PORT => "admin",
        _ => return None,
    };
    Some(format!(
        "{port} is the sidecar's {which} port, which no connection is decided on: a \
         policy's ports are the app's ports, those callers dial (for a connection straight to \
         the inbound port, the port of the sidecar's --app)"
    ))
}

mod ascii_folds;
pub mod convert;
pub mod document;
pub mod engine;
pub mod explain;
pub mod l7;
pub mod lint;
pub mod path;
pub mod pattern;
pub mod ratelimit;
mod rules;
mod source;
pub mod validate;

pub use convert::{InvalidExplanation, document_from_proto, validate_proto, validate_proto_in};
pub use document::{
    API_VERSION, Action, AuthorizationPolicy, AuthorizationPolicySpec, Destination, Document,
    DocumentError, GrpcMatch, Metadata, Rule, Selector, Source,
};
pub use engine::{
    CompileError, Decision, DefaultPolicy, NO_SNAPSHOT, OpaqueFallback, PolicySet, Reason, RuleRef,
    Ruling, UnknownDefaultPolicy, Verdict, WorkloadSelector, selects,
};
pub use explain::{
    ExplainedHttp, Explanation, OpaqueOrigin, OpaquePorts, PerRequest, PolicyTrace, RequestAnswer,
    RequestOutcome, RuleTrace, explain, explain_http, rate_limits_counting,
};
pub use l7::{HttpRequest, PathPattern, routed_bytes, routed_segments};
pub use lint::{
    Diagnostic, GivenText, Loaded, LoadedPolicy, LoadedRateLimit, PolicyFiles, Walk,
    find_policy_files, has_errors, lint_paths, lint_source, load_files_in, load_given_in,
    load_paths, load_source, load_source_in,
};
pub use path::{FieldPath, Segment};
pub use pattern::{IdPattern, InvalidPattern};
pub use ratelimit::{
    LimitKey, RateLimitPolicy, counts_path, validate_rate_limit, validate_rate_limit_in,
    validate_rate_limit_in_with, validate_rate_limit_with,
};
pub use validate::{
    DEFAULT_ROOT_NAMESPACE, MAX_DIAGNOSTICS, Omitted, SelectorScope, Severity, ValidPolicy,
    ValidationContext, Violation, Violations, duplicate_names, policy_key, validate, validate_in,
};
