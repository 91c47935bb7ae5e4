//! The policy half of the Admin API: ApplyPolicy, GetPolicy, ListPolicies,
//! DeletePolicy and Explain, called from [`super::admin`] (so only the
//! operator identity ever reaches them).
//!
//! A request may mix AuthorizationPolicy and RateLimitPolicy documents; the
//! two kinds are separate name spaces, and the read and delete methods take
//! the kind (empty means AuthorizationPolicy, as before rate limits existed).
//! Every document is checked by the one library validation
//! (`trellis_core::policy::load_source_in`), the same code `trellisctl policy
//! lint` and the sidecars run, knowing the mesh's opaque ports (an L7 rule on
//! one could never be enforced); a request with any error is refused whole
//! with INVALID_ARGUMENT and stores nothing. The message lists the first
//! errors as `document:LINE:COLUMN: field.path: message`, then how many more
//! there were (all of them would not fit in the headers a client accepts;
//! validation keeps at most
//! [`MAX_DIAGNOSTICS`](trellis_core::policy::MAX_DIAGNOSTICS) and counts the
//! rest);
//! the status details carry the same as a `google.rpc.Status` whose one
//! detail is a `trellis.admin.v1.PolicyErrors` ([`policy_errors_of`] reads
//! it back), the count of the others as a last error without a line.
//! A successful write bumps the snapshot version in its own transaction and
//! then refreshes discovery, which pushes to the sidecars it affects.

use prost::Message;
use tonic::{Code, Status};
use trellis_core::policy::pattern::{DNS_LABEL_RULE, MAX_DNS_LABEL_BYTES, is_dns_label};
use trellis_core::policy::{
    AuthorizationPolicy, Diagnostic, Document, ExplainedHttp, HttpRequest, OpaquePorts,
    RateLimitPolicy, ValidationContext, WorkloadSelector, document_from_proto, explain,
    explain_http, l7, load_source_in, policy_key, rate_limits_counting, validate_proto_in,
    validate_rate_limit_in_with,
};
use trellis_core::{SpiffeId, TrustDomain};
use trellis_proto::admin::v1::{
    ApplyPolicyRequest, ApplyPolicyResponse, DeletePolicyRequest, DeletePolicyResponse,
    ExplainRequest, ExplainResponse, ExplainedHttpRequest, ExplainedRevocation, GetPolicyRequest,
    GetPolicyResponse, ListPoliciesResponse, ListStreamsRequest, PolicyError, PolicyErrors,
    PolicyResult, RateLimitRecord, StoredPolicyWarning,
};
use trellis_proto::policy::v1::{Policy, RateLimit, Selector, Violation};

use super::Mesh;
use super::replica::Replicas;
use crate::store::{AppliedPolicy, Generation, PolicyOutcome, WorkloadRecord};

/// How the Admin API names the request's text in positions.
pub const SOURCE_NAME: &str = "document";

/// The type URL of the [`PolicyErrors`] detail of a rejected ApplyPolicy.
pub const POLICY_ERRORS_TYPE_URL: &str = "type.googleapis.com/trellis.admin.v1.PolicyErrors";

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

/// Runs blocking store work off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(internal)?
        .map_err(store_status)
}

/// The status of a failed store call. A write the Kubernetes API server
/// refused keeps its meaning: a conflict is worth applying again, a
/// denial (an admission webhook) is the document's fault, missing RBAC or
/// an unreachable server is ours.
fn store_status(e: crate::store::StoreError) -> Status {
    use crate::store::{StoreError, kubernetes::KubeStoreError};
    let message = e.to_string();
    match e {
        StoreError::Kubernetes(KubeStoreError::Write { status, .. }) => match status {
            Some(409) => Status::aborted(format!("{message}; read it again and retry")),
            Some(400 | 422) => Status::invalid_argument(message),
            Some(401 | 403) => Status::failed_precondition(message),
            _ => Status::unavailable(message),
        },
        e => e.into_status(),
    }
}

/// ApplyPolicy of `req`, by `caller` (named in its log line).
pub async fn apply(
    mesh: &Mesh,
    req: ApplyPolicyRequest,
    caller: Option<&SpiffeId>,
) -> Result<ApplyPolicyResponse, Status> {
    let context = mesh.discovery.validation_context();
    let loaded = load_source_in(SOURCE_NAME, &req.document, &mesh.trust_domain, &context);
    if loaded.has_errors() {
        return Err(invalid_policy(&loaded.diagnostics, loaded.omitted.errors));
    }
    if loaded.policies.is_empty() && loaded.rate_limits.is_empty() {
        return Err(Status::invalid_argument(
            "document: holds no AuthorizationPolicy or RateLimitPolicy document",
        ));
    }
    let policies: Vec<Policy> = loaded
        .policies
        .iter()
        .map(|l| l.policy.to_proto())
        .collect();
    let rate_limits: Vec<RateLimit> = loaded
        .rate_limits
        .iter()
        .map(|l| l.policy.to_proto())
        .collect();
    let dry_run = req.dry_run;
    let store = mesh.store.clone();
    let discovery = mesh.discovery.clone();
    let (to_store, limits_to_store) = (policies.clone(), rate_limits.clone());
    let (applied, workloads) = blocking(move || {
        // Read before the write: once the write is stored, the call reports
        // it, whatever fails after.
        let workloads = store.workloads()?;
        let applied = store.apply_documents(&to_store, &limits_to_store, dry_run)?;
        if applied.changed() && !dry_run {
            refresh_after_write(&discovery);
        }
        Ok((applied, workloads))
    })
    .await?;
    let generation = applied.generation;
    // Both kinds, in the order of their documents.
    let mut results: Vec<(usize, PolicyResult)> = Vec::new();
    for ((applied, policy), loaded) in applied
        .policies
        .into_iter()
        .zip(&policies)
        .zip(&loaded.policies)
    {
        let mut warnings: Vec<Violation> = loaded
            .policy
            .warnings()
            .iter()
            .map(|w| w.to_proto())
            .collect();
        let more = loaded.policy.omitted_warnings();
        if more > 0 {
            // Not a field: how many warnings were only counted.
            warnings.push(Violation {
                path: String::new(),
                message: format!(
                    "and {more} more warning{} (run `trellisctl policy lint` for all)",
                    if more == 1 { "" } else { "s" }
                ),
                warning: true,
            });
        }
        let selector = policy.selector.as_ref();
        let result = result_of(
            applied,
            AuthorizationPolicy::KIND,
            selector,
            &workloads,
            warnings,
        );
        results.push((loaded.line, result));
    }
    for ((applied, limit), loaded) in applied
        .rate_limits
        .into_iter()
        .zip(&rate_limits)
        .zip(&loaded.rate_limits)
    {
        let selector = limit.selector.as_ref();
        let result = result_of(
            applied,
            RateLimitPolicy::KIND,
            selector,
            &workloads,
            Vec::new(),
        );
        results.push((loaded.line, result));
    }
    results.sort_by_key(|(line, _)| *line);
    if !dry_run {
        log_applied(results.iter().map(|(_, r)| r), &generation, caller);
    }
    Ok(ApplyPolicyResponse {
        results: results.into_iter().map(|(_, r)| r).collect(),
        generation: generation.policies,
        snapshot_version: generation.snapshot,
        dry_run,
        position: Some(generation.position.into()),
        snapshot_version_epoch: generation.epoch,
    })
}

/// How many changed documents an ApplyPolicy's log line names; the others
/// it counts.
const NAMED_IN_LOG: usize = 5;

/// Logs an ApplyPolicy stored as `generation` by `caller`, whose documents
/// had `results`: one line at INFO, however many documents it held, counting
/// them by outcome and naming the first [`NAMED_IN_LOG`] it changed; a line
/// at DEBUG for each it changed.
fn log_applied<'a>(
    results: impl Iterator<Item = &'a PolicyResult>,
    generation: &Generation,
    caller: Option<&SpiffeId>,
) {
    use std::fmt::Write;
    use trellis_proto::admin::v1::PolicyOutcome as Outcome;
    let (mut created, mut updated, mut unchanged) = (0usize, 0usize, 0usize);
    let mut named = String::new();
    for r in results {
        match Outcome::try_from(r.outcome) {
            Ok(Outcome::Created) => created += 1,
            Ok(Outcome::Updated) => updated += 1,
            _ => {
                unchanged += 1;
                continue;
            }
        }
        tracing::debug!(
            kind = %r.kind,
            policy = %policy_key(&r.namespace, &r.name),
            revision = r.revision,
            snapshot_version = generation.snapshot,
            "policy applied"
        );
        if created + updated <= NAMED_IN_LOG {
            let comma = if named.is_empty() { "" } else { ", " };
            let _ = write!(
                named,
                "{comma}{} {}",
                r.kind,
                policy_key(&r.namespace, &r.name)
            );
        }
    }
    let more = (created + updated).saturating_sub(NAMED_IN_LOG);
    if more > 0 {
        let _ = write!(named, ", and {more} more");
    }
    tracing::info!(
        created,
        updated,
        unchanged,
        snapshot_version = generation.snapshot,
        snapshot_version_epoch = %crate::ctl::epoch_hex(generation.epoch),
        caller = %super::admin_calls::Caller(caller),
        changed = (!named.is_empty()).then_some(tracing::field::display(&named)),
        "policies applied"
    );
}

/// The result of one applied document: its outcome and the known workloads
/// its selector matches.
fn result_of(
    applied: AppliedPolicy,
    kind: &str,
    selector: Option<&Selector>,
    workloads: &[WorkloadRecord],
    warnings: Vec<Violation>,
) -> PolicyResult {
    let selector = WorkloadSelector::of_selector(selector);
    let selected_workloads = workloads
        .iter()
        .filter(|w| SpiffeId::parse(&w.spiffe_id).is_ok_and(|id| selector.selects(&id)))
        .map(|w| w.spiffe_id.clone())
        .collect();
    let outcome = match applied.outcome {
        PolicyOutcome::Created => trellis_proto::admin::v1::PolicyOutcome::Created,
        PolicyOutcome::Updated => trellis_proto::admin::v1::PolicyOutcome::Updated,
        PolicyOutcome::Unchanged => trellis_proto::admin::v1::PolicyOutcome::Unchanged,
    };
    PolicyResult {
        namespace: applied.namespace,
        name: applied.name,
        revision: applied.revision,
        outcome: outcome.into(),
        selected_workloads,
        warnings,
        kind: kind.to_owned(),
    }
}

/// At most this many errors are listed in a refusal; `trellisctl policy
/// lint` lists them all.
const LISTED_ERRORS: usize = 20;
/// The most one listed error may take in `grpc-message` once
/// percent-encoded; a longer one is cut.
const ERROR_BUDGET: usize = 256;
/// The most the listed errors together may take there. The details repeat
/// the message and each listed error's path and message, base64-encoded;
/// with this budget a refusal's headers stay under 8 KiB, half of the 16 KiB
/// an HTTP/2 client accepts by default (more, and the caller sees only
/// "h2 protocol error").
const LIST_BUDGET: usize = 1920;

/// INVALID_ARGUMENT listing the first errors of `diagnostics`, with the
/// same errors as structured details; how many more there were (also the
/// `omitted` ones validation only counted) closes both lists.
fn invalid_policy(diagnostics: &[Diagnostic], omitted: usize) -> Status {
    let errors = diagnostics.iter().filter(|d| d.is_error());
    let total = errors.clone().count() + omitted;
    let mut lines = Vec::new();
    let mut details = PolicyErrors::default();
    let mut spent = 0;
    for d in errors.take(LISTED_ERRORS) {
        let line = cut(&d.to_string(), ERROR_BUDGET, wire_len);
        let cost = wire_len(&line) + 2;
        if spent + cost > LIST_BUDGET {
            break;
        }
        spent += cost;
        lines.push(line);
        let path = cut(&d.path.to_string(), ERROR_BUDGET / 2, str::len);
        let message = cut(&d.message, ERROR_BUDGET - path.len(), str::len);
        details.errors.push(PolicyError {
            violation: Some(Violation {
                path,
                message,
                warning: false,
            }),
            line: d.line as u32,
            column: d.column as u32,
        });
    }
    let more = total - lines.len();
    if more > 0 {
        let line = more_errors(more);
        details.errors.push(PolicyError {
            violation: Some(Violation {
                path: String::new(),
                message: line.clone(),
                warning: false,
            }),
            line: 0,
            column: 0,
        });
        lines.push(line);
    }
    let message = format!(
        "invalid policy ({total} error{}): {}",
        if total == 1 { "" } else { "s" },
        lines.join("; ")
    );
    let status = RpcStatus {
        code: Code::InvalidArgument as i32,
        message: message.clone(),
        details: vec![Any {
            type_url: POLICY_ERRORS_TYPE_URL.to_owned(),
            value: details.encode_to_vec(),
        }],
    };
    Status::with_details(
        Code::InvalidArgument,
        message,
        status.encode_to_vec().into(),
    )
}

/// The line that closes a refusal listing only its first errors.
fn more_errors(more: usize) -> String {
    format!(
        "and {more} more error{} (run `trellisctl policy lint` for all)",
        if more == 1 { "" } else { "s" }
    )
}

/// The length of `text` in `grpc-message`, which percent-encodes controls,
/// non-ASCII bytes, spaces and `"#%<>`?{}`.
fn wire_len(text: &str) -> usize {
    text.bytes()
        .map(|b| match b {
            b' ' | b'"' | b'#' | b'%' | b'<' | b'>' | b'`' | b'?' | b'{' | b'}' => 3,
            0x21..=0x7e => 1,
            _ => 3,
        })
        .sum()
}

/// `text` if `len` finds it at most `max` long, else its longest prefix
/// (on a character boundary) that fits with "..." after it.
fn cut(text: &str, max: usize, len: fn(&str) -> usize) -> String {
    if len(text) <= max {
        return text.to_owned();
    }
    let mut spent = len("...");
    let mut end = 0;
    for (i, c) in text.char_indices() {
        let next = i + c.len_utf8();
        spent += len(&text[i..next]);
        if spent > max {
            break;
        }
        end = next;
    }
    format!("{}...", &text[..end])
}

/// The structured errors of a rejected ApplyPolicy, if the status has them.
pub fn policy_errors_of(status: &Status) -> Option<PolicyErrors> {
    let status = RpcStatus::decode(status.details()).ok()?;
    let detail = status
        .details
        .iter()
        .find(|a| a.type_url == POLICY_ERRORS_TYPE_URL)?;
    PolicyErrors::decode(detail.value.as_slice()).ok()
}

/// `google.rpc.Status`, the conventional content of gRPC status details.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<Any>,
}

/// `google.protobuf.Any`.
#[derive(Clone, PartialEq, prost::Message)]
struct Any {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

fn require_name(namespace: &str, name: &str) -> Result<(), Status> {
    for (field, value) in [("namespace", namespace), ("name", name)] {
        if value.is_empty() {
            return Err(Status::invalid_argument(format!("{field}: must be set")));
        }
    }
    Ok(())
}

/// The answer to a read or delete that found nothing: a namespace or name
/// that no document could have, as a write checks them (each a DNS label,
/// [`is_dns_label`]), is the request's mistake, refused naming the field
/// and the rule (a value too long to be one by its length, not quoted
/// back); any other is not found. The store is asked first all the same,
/// so that a document stored under such a name (a database written by
/// other means) can still be read and deleted.
fn not_found_or_invalid(kind: Kind, namespace: &str, name: &str) -> Status {
    for (field, value) in [("namespace", namespace), ("name", name)] {
        if !is_dns_label(value) {
            return Status::invalid_argument(if value.len() > MAX_DNS_LABEL_BYTES {
                format!(
                    "{field}: invalid {field} ({} bytes long): {DNS_LABEL_RULE}",
                    value.len()
                )
            } else {
                format!("{field}: invalid {field} {value:?}: {DNS_LABEL_RULE}")
            });
        }
    }
    let what = match kind {
        Kind::Authorization => "policy",
        Kind::RateLimit => "rate limit",
    };
    Status::not_found(format!("{what} {} not found", policy_key(namespace, name)))
}

/// The document kinds the read and delete methods address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Authorization,
    RateLimit,
}

impl Kind {
    /// The kind as its documents name it (`AuthorizationPolicy`).
    fn name(self) -> &'static str {
        match self {
            Self::Authorization => AuthorizationPolicy::KIND,
            Self::RateLimit => RateLimitPolicy::KIND,
        }
    }

    fn parse(kind: &str) -> Result<Self, Status> {
        match kind {
            "" | AuthorizationPolicy::KIND => Ok(Self::Authorization),
            RateLimitPolicy::KIND => Ok(Self::RateLimit),
            other => Err(Status::invalid_argument(format!(
                "kind: unknown kind {other:?} (expected {} or {})",
                AuthorizationPolicy::KIND,
                RateLimitPolicy::KIND
            ))),
        }
    }
}

pub async fn get(mesh: &Mesh, req: GetPolicyRequest) -> Result<GetPolicyResponse, Status> {
    require_name(&req.namespace, &req.name)?;
    let kind = Kind::parse(&req.kind)?;
    let store = mesh.store.clone();
    let (namespace, name) = (req.namespace.clone(), req.name.clone());
    let missing = || not_found_or_invalid(kind, &req.namespace, &req.name);
    if kind == Kind::RateLimit {
        let record = blocking(move || store.rate_limit(&namespace, &name))
            .await?
            .ok_or_else(missing)?;
        let limit = record.rate_limit.clone().unwrap_or_default();
        let document = RateLimitPolicy::from_proto(&limit).map_err(internal)?;
        return Ok(GetPolicyResponse {
            yaml: Document::RateLimitPolicy(document).to_yaml(),
            policy: None,
            rate_limit: Some(record),
        });
    }
    let policy = blocking(move || store.policy(&namespace, &name))
        .await?
        .ok_or_else(missing)?;
    let document = document_from_proto(&policy).map_err(internal)?;
    Ok(GetPolicyResponse {
        yaml: Document::AuthorizationPolicy(document).to_yaml(),
        policy: Some(policy),
        rate_limit: None,
    })
}

pub async fn list(mesh: &Mesh) -> Result<ListPoliciesResponse, Status> {
    let store = mesh.store.clone();
    let (policies, rate_limits, generation) =
        blocking(move || Ok((store.policies()?, store.rate_limits()?, store.generation()?)))
            .await?;
    let context = mesh.discovery.validation_context();
    let stored_warnings = stored_warnings(&policies, &rate_limits, &mesh.trust_domain, &context);
    Ok(ListPoliciesResponse {
        policies,
        rate_limits,
        generation: generation.policies,
        stored_warnings,
    })
}

/// What the stored `policies` and `rate_limits` fail of the checks of
/// `context` (a write's) that were added since they were stored, and how
/// each is enforced instead ([`ValidationContext::stored`]): a selector
/// outside the document's namespace, enforced as written, is one. A
/// document failing outright is not listed here (the sidecars refuse
/// snapshots holding it; the start-up check names it).
pub fn stored_warnings(
    policies: &[Policy],
    rate_limits: &[RateLimitRecord],
    td: &TrustDomain,
    context: &ValidationContext,
) -> Vec<StoredPolicyWarning> {
    let stored = ValidationContext {
        stored: true,
        ..context.clone()
    };
    let warning = |kind: &str, namespace: &str, name: &str, v: &trellis_core::policy::Violation| {
        StoredPolicyWarning {
            kind: kind.to_owned(),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            violation: Some(v.to_proto()),
        }
    };
    let mut found = Vec::new();
    for p in policies {
        if let Ok(valid) = validate_proto_in(p, td, &stored) {
            let kind = AuthorizationPolicy::KIND;
            found.extend((valid.relaxed().iter()).map(|v| warning(kind, &p.namespace, &p.name, v)));
        }
    }
    for record in rate_limits {
        let Some(limit) = &record.rate_limit else {
            continue;
        };
        let relaxed = RateLimitPolicy::from_proto(limit)
            .ok()
            .and_then(|doc| validate_rate_limit_in_with(&doc, td, &stored).ok());
        let kind = RateLimitPolicy::KIND;
        found.extend(
            (relaxed.iter().flatten()).map(|v| warning(kind, &limit.namespace, &limit.name, v)),
        );
    }
    found
}

/// Loads the snapshot that holds a write just stored. The write is stored
/// whatever happens here, so a failure is logged, not returned: the caller
/// must not hear that a stored write failed (a retry would find it done).
/// The load is tried again until it succeeds ([`refresh_until_loaded`]);
/// meanwhile `--wait` says the sidecars do not hold the write yet.
pub(super) fn refresh_after_write(discovery: &std::sync::Arc<crate::discovery::Discovery>) {
    if let Err(e) = discovery.refresh() {
        tracing::error!(error = %e, "the write is stored, but the snapshot holding it could not be loaded; trying again");
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(refresh_until_loaded(discovery.clone()));
        }
    }
}

/// Tries the load of the current snapshot again, a second later, then
/// twice as late each time up to 30 s, until it succeeds (a later write's
/// own load may have done it meanwhile: then this one finds nothing new).
async fn refresh_until_loaded(discovery: std::sync::Arc<crate::discovery::Discovery>) {
    let mut wait = std::time::Duration::from_secs(1);
    loop {
        tokio::time::sleep(wait).await;
        let again = discovery.clone();
        match tokio::task::spawn_blocking(move || again.refresh()).await {
            Ok(Ok(version)) => {
                tracing::info!(
                    snapshot_version = version,
                    "the stored write's snapshot is loaded"
                );
                return;
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "the stored write's snapshot still could not be loaded")
            }
            // The runtime is stopping.
            Err(_) => return,
        }
        wait = (wait * 2).min(std::time::Duration::from_secs(30));
    }
}

/// DeletePolicy of `req`, by `caller` (named in its log line).
pub async fn delete(
    mesh: &Mesh,
    req: DeletePolicyRequest,
    caller: Option<&SpiffeId>,
) -> Result<DeletePolicyResponse, Status> {
    require_name(&req.namespace, &req.name)?;
    let kind = Kind::parse(&req.kind)?;
    let store = mesh.store.clone();
    let discovery = mesh.discovery.clone();
    let (namespace, name) = (req.namespace.clone(), req.name.clone());
    let deleted: Option<Generation> = blocking(move || {
        let deleted = match kind {
            Kind::Authorization => store.delete_policy(&namespace, &name)?,
            Kind::RateLimit => store.delete_rate_limit(&namespace, &name)?,
        };
        if deleted.is_some() {
            refresh_after_write(&discovery);
        }
        Ok(deleted)
    })
    .await?;
    let generation =
        deleted.ok_or_else(|| not_found_or_invalid(kind, &req.namespace, &req.name))?;
    tracing::info!(
        kind = kind.name(),
        policy = %policy_key(&req.namespace, &req.name),
        snapshot_version = generation.snapshot,
        caller = %super::admin_calls::Caller(caller),
        "policy deleted"
    );
    Ok(DeletePolicyResponse {
        generation: generation.policies,
        snapshot_version: generation.snapshot,
        position: Some(generation.position.into()),
        snapshot_version_epoch: generation.epoch,
    })
}

/// Explain, for the destination's opaque ports: the mesh's, those each of
/// the destination identity's sidecars connected to any replica that
/// answers declared when it subscribed, and those the request names. The
/// peers that did not answer are named in the answer: their sidecars'
/// ports are not known.
pub async fn explain_request(
    mesh: &Mesh,
    replicas: &Replicas,
    req: &ExplainRequest,
) -> Result<ExplainResponse, Status> {
    let id = |field: &str, value: &str| {
        let id = SpiffeId::parse(value).map_err(|e| {
            Status::invalid_argument(format!("{field}: {}: {e}", super::quoted(value)))
        })?;
        if !id.is_member_of(&mesh.trust_domain) {
            return Err(Status::invalid_argument(format!(
                "{field}: {id} is outside trust domain {}",
                mesh.trust_domain
            )));
        }
        Ok(id)
    };
    let source = id("source", &req.source)?;
    let destination = id("destination", &req.destination)?;
    let port = super::port_arg("port", req.port)?;
    let requested = super::port_list("opaque_ports", &req.opaque_ports)?;
    let fleet = replicas.fleet(mesh, ListStreamsRequest::default()).await;
    let opaque = OpaquePorts {
        mesh: mesh.discovery.validation_context().opaque_ports,
        sidecars: fleet.opaque_ports(destination.as_str()),
        requested,
    };
    let http = (req.request.as_ref())
        .map(|r| explained_request(r).map_err(Status::invalid_argument))
        .transpose()?;
    let http2 = req.request.as_ref().is_some_and(|r| r.http2);
    let view = mesh.discovery.view();
    let policies: Vec<Policy> = view.policies.iter().map(|(_, p)| p.clone()).collect();
    let default = mesh.discovery.default_policy();
    let rate_limits = view.rate_limits_for(&destination);
    let explanation = match &http {
        None => explain(&source, &destination, port, &policies, default, &opaque),
        Some((method, target, headers)) => {
            let http = ExplainedHttp {
                request: HttpRequest {
                    method,
                    path: &target.path,
                    headers,
                },
                query: &target.query,
                absolute: &target.absolute,
                limits_read_paths: limits_read_paths(&rate_limits),
                http2,
            };
            explain_http(
                &source,
                &destination,
                port,
                &policies,
                default,
                &opaque,
                &http,
            )
        }
    }
    .map_err(internal)?;
    let unanswered_replicas = (fleet.replicas.into_iter())
        .filter(|r| !r.error.is_empty())
        .collect();
    // As every sidecar holds them: the source's first, a self-call's once.
    let mut ids = vec![&source];
    if destination != source {
        ids.push(&destination);
    }
    let revocations = (ids.into_iter())
        .filter_map(|id| {
            view.revoked_at(id)
                .map(|revoked_at_unix| ExplainedRevocation {
                    spiffe_id: id.to_string(),
                    revoked_at_unix,
                })
        })
        .collect();
    let rate_limits_counting = (explanation.request.as_ref())
        .map(|answer| rate_limits_counting(&rate_limits, answer))
        .unwrap_or_default();
    Ok(ExplainResponse {
        explanation: Some(explanation.to_proto()),
        unanswered_replicas,
        revocations,
        rate_limits,
        rate_limits_counting,
        http2_evaluated: http2,
    })
}

/// Whether any of a destination's rate limits reads request paths, as
/// its sidecar compiles them (a stored one that no longer reads back is
/// taken to, as a path check is the safe answer).
fn limits_read_paths(limits: &[RateLimit]) -> bool {
    (limits.iter()).any(|l| !matches!(RateLimitPolicy::from_proto(l), Ok(p) if !p.reads_paths()))
}

/// The method, target ([`http_path`]) and headers of an Explain's
/// HTTP request, each checked as an HTTP server reads it; why not, naming
/// the field (a header's value is never repeated: it may hold a
/// credential).
fn explained_request(
    r: &ExplainedHttpRequest,
) -> Result<(String, RequestTarget, http::HeaderMap), String> {
    let method = http_method(&r.method).map_err(|e| format!("request.method: {e}"))?;
    let path = http_path(&r.path).map_err(|e| format!("request.path: {e}"))?;
    if r.http2 && !path.absolute.is_empty() {
        return Err(format!(
            "request.path: {}: {NO_ABSOLUTE_H2}",
            super::quoted(&r.path)
        ));
    }
    if r.http2 && r.path.contains('#') {
        return Err(format!(
            "request.path: {}: {NO_FRAGMENT_H2}",
            super::quoted(&r.path)
        ));
    }
    let mut headers = http::HeaderMap::new();
    for (i, h) in r.headers.iter().enumerate() {
        let (name, value) =
            header_parts(&h.name, &h.value).map_err(|e| format!("request.headers[{i}]: {e}"))?;
        headers.append(name, value);
    }
    Ok((method, path, headers))
}

/// An HTTP method as a request line carries it: an RFC 9110 token, case
/// kept (`get` is another method than `GET`).
pub fn http_method(text: &str) -> Result<String, String> {
    match l7::is_token(text) {
        true => Ok(text.to_owned()),
        false => Err(format!(
            "{} is not an HTTP method (a token such as GET)",
            super::quoted(text)
        )),
    }
}

/// A request target as `trellisctl policy explain --path` takes it: in
/// origin form (`/users/7?x=1`), `*`, or in absolute form
/// (`http://api:8080/users/7?x=1`), which the sidecar takes over HTTP/1.1.
pub fn http_target(text: &str) -> Result<String, String> {
    request_target(text).map(|_| text.to_owned())
}

/// Why an HTTP/2 request's target cannot be in absolute form.
pub const NO_ABSOLUTE_H2: &str = "an absolute-form target is HTTP/1.1's: for HTTP/2 give its \
     path, and its authority as a Host header (which stands for :authority)";

/// Why an HTTP/2 request's target cannot have a `#`.
pub const NO_FRAGMENT_H2: &str = "HTTP/2's layer drops a '#' in :path and what follows it before \
     the sidecar reads the path: give the path without it (a '#' in a path or query is %23)";

/// Whether `target`, read as [`http_target`] reads it, is in absolute form.
pub fn is_absolute_target(target: &str) -> bool {
    matches!(request_target(target), Ok((true, ..)))
}

/// A request target as the sidecar reads it ([`http_path`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestTarget {
    /// The path, without the query, as the sidecar matches rules on it
    /// (`/` for an absolute-form target that names none).
    pub path: String,
    /// The query from its `?` on (empty without one): matched by no rule,
    /// but counted towards the sidecar's bounds on the head.
    pub query: String,
    /// The whole target when in absolute form, else empty: its authority
    /// is the one a `Host` must name.
    pub absolute: String,
}

/// The path, query and absolute form of a request target ([`http_target`]).
pub fn http_path(text: &str) -> Result<RequestTarget, String> {
    let (absolute, path, query) = request_target(text)?;
    Ok(RequestTarget {
        path,
        query,
        absolute: if absolute {
            text.to_owned()
        } else {
            String::new()
        },
    })
}

/// Whether `text` is in absolute form, and its path and query. The scheme
/// and authority are read apart from the rest ([`absolute_parts`]), and a
/// long path or query in pieces ([`path_and_query`]): a target of any
/// length reads, the sidecar's bounds on it being the explanation's to
/// tell.
fn request_target(text: &str) -> Result<(bool, String, String), String> {
    let parsed = if text.starts_with('/') || text == "*" {
        path_and_query(text).map(|(p, q)| (false, p, q))
    } else {
        absolute_parts(text)
            .and_then(path_and_query)
            .map(|(p, q)| (true, p, q))
    };
    parsed.ok_or_else(|| {
        format!(
            "{} is not a request target (a path starting with '/', '*', or an absolute URI such \
             as http://host:port/path; no spaces or control characters)",
            super::quoted(text)
        )
    })
}

/// The path of `text` (a target from its path on) and its query from the
/// `?` on, as the `http` crate reads them, a `#` and what follows it kept
/// at the end of the one it is in: that crate would drop them, and the
/// sidecar refuses an HTTP/1.1 target with a `#`
/// ([`l7::target_problem`]), which the explanation is to say.
fn path_and_query(text: &str) -> Option<(String, String)> {
    let (text, fragment) = text.split_at(text.find('#').unwrap_or(text.len()));
    if !(fragment.bytes()).all(|b| b.is_ascii_graphic() || !b.is_ascii()) {
        return None;
    }
    // An absolute-form target may go from its authority to its `#`.
    let (path, query) = fragmentless(if text.is_empty() { "/" } else { text })?;
    Some(match query.is_empty() {
        true => (path + fragment, query),
        false => (path, query + fragment),
    })
}

/// [`path_and_query`] of a `text` without a `#`. The `http` crate reads no
/// target over 65,534 bytes: a longer one is read in pieces, each holding
/// only what a target may.
fn fragmentless(text: &str) -> Option<(String, String)> {
    const PIECE: usize = 16 * 1024;
    if text.len() <= PIECE {
        let target = http::uri::PathAndQuery::try_from(text).ok()?;
        let query = target.query().map(|q| format!("?{q}")).unwrap_or_default();
        return Some((target.path().to_owned(), query));
    }
    let (path, query) = text.split_at(text.find('?').unwrap_or(text.len()));
    let reads = |piece: &str, before: &str| {
        let whole = format!("{before}{piece}");
        http::uri::PathAndQuery::try_from(whole.as_str()).is_ok_and(|t| t.as_str() == whole)
    };
    let in_pieces = |part: &str, before: &str| {
        let mut rest = part;
        while !rest.is_empty() {
            let mut at = rest.len().min(PIECE);
            while !rest.is_char_boundary(at) {
                at -= 1;
            }
            let (piece, tail) = rest.split_at(at);
            if !reads(piece, before) {
                return false;
            }
            rest = tail;
        }
        true
    };
    // An absolute-form target may go from its authority to its query.
    let path_reads = path.is_empty() || path.starts_with('/') && in_pieces(&path[1..], "/");
    let query_reads = query.is_empty() || in_pieces(&query[1..], "/?");
    let path = if path.is_empty() { "/" } else { path };
    (path_reads && query_reads).then(|| (path.to_owned(), query.to_owned()))
}

/// The path and query of an absolute-form target (`/p?q` of
/// `http://host:port/p?q`, `/` when it has neither), if its scheme and
/// authority read as hyper reads them.
fn absolute_parts(text: &str) -> Option<&str> {
    let after_scheme = text.find("://")? + "://".len();
    let end = text[after_scheme..]
        .find(['/', '?', '#'])
        .map_or(text.len(), |at| after_scheme + at);
    let uri = http::Uri::try_from(&text[..end]).ok()?;
    uri.authority()?;
    match &text[end..] {
        "" => Some("/"),
        rest => Some(rest),
    }
}

/// One header `NAME: VALUE`, as `trellisctl policy explain --header` takes
/// it; why not, never repeating the value.
pub fn http_header(text: &str) -> Result<(String, String), String> {
    let Some((name, value)) = text.split_once(':') else {
        return Err(format!(
            "{} is not NAME: VALUE (no ':')",
            super::quoted(text.split_whitespace().next().unwrap_or_default())
        ));
    };
    let (name, value) = (name.trim(), value.trim());
    header_parts(name, value)?;
    Ok((name.to_owned(), value.to_owned()))
}

/// A header's name and value, each checked as an HTTP server does.
fn header_parts(name: &str, value: &str) -> Result<(http::HeaderName, http::HeaderValue), String> {
    let header_name = http::HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("{} is not a header name", super::quoted(name)))?;
    let value = http::HeaderValue::from_str(value)
        .map_err(|_| format!("the value of {} is not a header value", super::quoted(name)))?;
    Ok((header_name, value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_core::policy::{FieldPath, MAX_DIAGNOSTICS, Severity};

    fn error(line: usize, path: &str, message: &str) -> Diagnostic {
        Diagnostic {
            file: SOURCE_NAME.to_owned(),
            line,
            column: 7,
            severity: Severity::Error,
            path: FieldPath::parse(path),
            message: message.to_owned(),
        }
    }

    /// The bytes the status takes in the response's trailers.
    fn header_bytes(status: &Status) -> usize {
        let mut headers = http::HeaderMap::new();
        status.add_header(&mut headers).unwrap();
        headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len())
            .sum()
    }

    /// `--path` keeps the query for the control plane, which matches
    /// rules on the path alone and sizes the head with the query.
    #[test]
    fn a_request_target_keeps_its_query_apart_from_the_path() {
        let target = |path: &str, query: &str, absolute: &str| RequestTarget {
            path: path.to_owned(),
            query: query.to_owned(),
            absolute: absolute.to_owned(),
        };
        assert_eq!(http_target("/users/7?x=1&y").unwrap(), "/users/7?x=1&y");
        assert_eq!(
            http_path("/users/7?x=1&y").unwrap(),
            target("/users/7", "?x=1&y", "")
        );
        assert_eq!(http_path("/x?").unwrap(), target("/x", "?", ""));
        assert_eq!(http_path("*").unwrap(), target("*", "", ""));
        let absolute = "http://api:8080/users/7?x=1";
        assert_eq!(
            http_path(absolute).unwrap(),
            target("/users/7", "?x=1", absolute)
        );
        assert_eq!(
            http_path("http://api?x").unwrap(),
            target("/", "?x", "http://api?x")
        );
        assert_eq!(
            http_path("http://api").unwrap(),
            target("/", "", "http://api")
        );
        // Past the `http` crate's 65,534 bytes, read in pieces.
        let long = "q".repeat(100 * 1024);
        assert_eq!(
            http_path(&format!("/{long}?{long}")).unwrap(),
            target(&format!("/{long}"), &format!("?{long}"), "")
        );
        let absolute = format!("http://api?{long}");
        assert_eq!(
            http_path(&absolute).unwrap(),
            target("/", &format!("?{long}"), &absolute)
        );
        // A `#` and what follows it are kept, at any length, for the
        // explanation to refuse as the sidecar does.
        assert_eq!(http_path("/a#f").unwrap(), target("/a#f", "", ""));
        assert_eq!(
            http_path(&format!("/x?{long}#f")).unwrap(),
            target("/x", &format!("?{long}#f"), "")
        );
        assert_eq!(
            http_path("http://api#f").unwrap(),
            target("/#f", "", "http://api#f")
        );
        for bad in [
            format!("/x?{long} "),
            format!("/x?{long}#f g"),
            "/x#f g".to_owned(),
            format!("/{long}\t"),
        ] {
            assert!(http_target(&bad).is_err());
        }
        for bad in ["x?y", "http://", "http://a b/c", "mailto:a@b"] {
            assert_eq!(
                http_target(bad).unwrap_err(),
                format!(
                    "{bad:?} is not a request target (a path starting with '/', '*', or an \
                     absolute URI such as http://host:port/path; no spaces or control \
                     characters)"
                )
            );
        }
    }

    #[test]
    fn a_refusal_of_many_errors_lists_the_first_and_counts_the_rest() {
        let diagnostics: Vec<Diagnostic> = (0..1000)
            .map(|i| {
                let path = format!("spec.rules[{i}].to[0].ports[0]");
                error(10 + i, &path, "port 5432 is declared opaque")
            })
            .collect();
        let status = invalid_policy(&diagnostics, 0);
        assert_eq!(status.code(), Code::InvalidArgument);
        let message = status.message();
        assert!(
            message.starts_with(
                "invalid policy (1000 errors): \
                 document:10:7: spec.rules[0].to[0].ports[0]: port 5432 is declared opaque; \
                 document:11:7: "
            ),
            "{message}"
        );
        let errors = policy_errors_of(&status).unwrap().errors;
        let listed = errors.len() - 1;
        assert!((10..=LISTED_ERRORS).contains(&listed), "{listed}");
        let more = format!(
            "and {} more errors (run `trellisctl policy lint` for all)",
            1000 - listed
        );
        assert!(message.ends_with(&format!("; {more}")), "{message}");
        assert_eq!((errors[1].line, errors[1].column), (11, 7));
        let last = &errors[listed];
        assert_eq!(
            (last.line, last.violation.as_ref().unwrap()),
            (
                0,
                &Violation {
                    path: String::new(),
                    message: more,
                    warning: false,
                }
            )
        );
        assert!(
            header_bytes(&status) < 8 * 1024,
            "{}",
            header_bytes(&status)
        );
    }

    /// Validation keeps a thousand problems and counts the rest: the
    /// refusal still counts them all.
    #[test]
    fn a_refusal_counts_the_errors_validation_did_not_keep() {
        let td = trellis_core::TrustDomain::new("cluster.local").unwrap();
        let ports = vec!["0"; 5000].join(", ");
        let document = format!(
            "apiVersion: trellis.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: many, namespace: default}}
spec:
  selector: {{spiffeIds: [\"spiffe://cluster.local/ns/default/sa/api\"]}}
  action: ALLOW
  rules: [{{to: [{{ports: [{ports}]}}]}}]
"
        );
        let loaded = load_source_in(SOURCE_NAME, &document, &td, &Default::default());
        assert_eq!(loaded.diagnostics.len(), MAX_DIAGNOSTICS);
        assert_eq!(loaded.omitted.errors, 5000 - MAX_DIAGNOSTICS);
        let status = invalid_policy(&loaded.diagnostics, loaded.omitted.errors);
        let message = status.message();
        assert!(
            message.starts_with(
                "invalid policy (5000 errors): \
                 document:7:26: spec.rules[0].to[0].ports[0]: port 0 is out of range 1..=65535; \
                 document:7:29: spec.rules[0].to[0].ports[1]: "
            ),
            "{message}"
        );
        let listed = policy_errors_of(&status).unwrap().errors.len() - 1;
        let more = 5000 - listed;
        assert!(
            message.ends_with(&format!(
                "; and {more} more errors (run `trellisctl policy lint` for all)"
            )),
            "{message}"
        );
    }

    #[test]
    fn a_refusal_stays_small_whatever_its_errors_hold() {
        // Text that percent-encodes to three times its length, and text
        // that does not encode at all (the most bytes in the details).
        let encoded = (
            "é \"?%".repeat(10_000),
            format!("spec.{}", "fêld{ }.".repeat(500)),
        );
        let plain = (
            "x".repeat(100_000),
            format!("spec.{}", "field.".repeat(500)),
        );
        for (message, path) in [&encoded, &plain] {
            let diagnostics: Vec<Diagnostic> = (1..=50).map(|i| error(i, path, message)).collect();
            let status = invalid_policy(&diagnostics, 0);
            let size = header_bytes(&status);
            assert!(size < 8 * 1024, "{size}");
            let errors = policy_errors_of(&status).unwrap().errors;
            assert!(errors.len() >= 2, "{errors:?}");
            assert_eq!(errors[0].line, 1);
            let first = errors[0].violation.as_ref().unwrap();
            assert!(first.message.starts_with(&message[..5]), "{first:?}");
            assert!(first.message.ends_with("..."), "{first:?}");
            assert!(status.message().contains("more errors"));
        }

        // One short error is listed whole, with no count of others.
        let status = invalid_policy(&[error(3, "metadata.name", "must be set")], 0);
        assert_eq!(
            status.message(),
            "invalid policy (1 error): document:3:7: metadata.name: must be set"
        );
        assert_eq!(policy_errors_of(&status).unwrap().errors.len(), 1);
    }

    #[test]
    fn cut_keeps_characters_whole() {
        assert_eq!(cut("short", 5, str::len), "short");
        assert_eq!(cut("abcdefgh", 6, str::len), "abc...");
        assert_eq!(cut("ééé", 5, str::len), "é...");
        assert_eq!(cut("ééé", 4, str::len), "...");
        assert_eq!(cut("a b c", 7, wire_len), "a ...");
        assert_eq!(cut("a b c", 6, wire_len), "a...");
    }
}

/// A write stored, then a failure loading the snapshot that holds it: the
/// call still reports the write, against the real embedded store.
#[cfg(test)]
mod stored_writes {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use trellis_proto::admin::v1::RateLimitRecord;
    use trellis_proto::discovery::v1::MeshConfig;

    use super::*;
    use crate::discovery::Discovery;
    use crate::store::embedded::{DB_FILE, EmbeddedStore};
    use crate::store::{
        AppliedDocuments, DiscoveryState, EndpointChange, IssuanceProof, IssuedCertRecord,
        JoinToken, Position, Store, StoreError,
    };

    /// The embedded store, whose discovery state cannot be read while
    /// `unreadable` is set (a disk error after a commit, say).
    struct Unreadable {
        inner: EmbeddedStore,
        unreadable: AtomicBool,
    }

    impl Store for Unreadable {
        fn add_join_token(
            &self,
            hash: &[u8; 32],
            token: &JoinToken,
            now: i64,
        ) -> Result<(), StoreError> {
            self.inner.add_join_token(hash, token, now)
        }
        fn record_issuance(
            &self,
            proof: Option<IssuanceProof<'_>>,
            issued: &IssuedCertRecord,
            workload: &WorkloadRecord,
        ) -> Result<EndpointChange, StoreError> {
            self.inner.record_issuance(proof, issued, workload)
        }
        fn workloads(&self) -> Result<Vec<WorkloadRecord>, StoreError> {
            self.inner.workloads()
        }
        fn newest_issued(
            &self,
            limit: usize,
            matches: &dyn Fn(&IssuedCertRecord) -> bool,
        ) -> Result<Vec<IssuedCertRecord>, StoreError> {
            self.inner.newest_issued(limit, matches)
        }
        fn snapshot_version(&self) -> Result<u64, StoreError> {
            self.inner.snapshot_version()
        }
        fn snapshot_position(&self) -> Result<(u64, Position), StoreError> {
            self.inner.snapshot_position()
        }
        fn bump_snapshot_version(&self) -> Result<u64, StoreError> {
            self.inner.bump_snapshot_version()
        }
        fn settle_mesh_config(&self, encoded: &str) -> Result<u64, StoreError> {
            self.inner.settle_mesh_config(encoded)
        }
        fn apply_documents(
            &self,
            policies: &[Policy],
            rate_limits: &[RateLimit],
            dry_run: bool,
        ) -> Result<AppliedDocuments, StoreError> {
            self.inner.apply_documents(policies, rate_limits, dry_run)
        }
        fn policies(&self) -> Result<Vec<Policy>, StoreError> {
            self.inner.policies()
        }
        fn policy(&self, namespace: &str, name: &str) -> Result<Option<Policy>, StoreError> {
            self.inner.policy(namespace, name)
        }
        fn delete_policy(
            &self,
            namespace: &str,
            name: &str,
        ) -> Result<Option<Generation>, StoreError> {
            self.inner.delete_policy(namespace, name)
        }
        fn rate_limits(&self) -> Result<Vec<RateLimitRecord>, StoreError> {
            self.inner.rate_limits()
        }
        fn rate_limit(
            &self,
            namespace: &str,
            name: &str,
        ) -> Result<Option<RateLimitRecord>, StoreError> {
            self.inner.rate_limit(namespace, name)
        }
        fn delete_rate_limit(
            &self,
            namespace: &str,
            name: &str,
        ) -> Result<Option<Generation>, StoreError> {
            self.inner.delete_rate_limit(namespace, name)
        }
        fn generation(&self) -> Result<Generation, StoreError> {
            self.inner.generation()
        }
        fn discovery_state(&self) -> Result<DiscoveryState, StoreError> {
            if self.unreadable.load(Ordering::SeqCst) {
                return Err(StoreError::Database {
                    path: "test".into(),
                    reason: "unreadable for the test".into(),
                });
            }
            self.inner.discovery_state()
        }
    }

    const POLICY: &str = "apiVersion: trellis.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: web-to-api, namespace: default}
spec:
  selector: {spiffeIds: [\"spiffe://cluster.local/ns/default/sa/api\"]}
  action: ALLOW
  rules:
    - from: [{spiffeId: \"spiffe://cluster.local/ns/default/sa/web\"}]
";

    #[tokio::test]
    async fn a_stored_write_is_reported_though_its_snapshot_could_not_be_loaded() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(Unreadable {
            inner: EmbeddedStore::open(&tmp.path().join(DB_FILE)).unwrap(),
            unreadable: AtomicBool::new(false),
        });
        let discovery =
            Arc::new(Discovery::new(store.clone(), Vec::new(), MeshConfig::default()).unwrap());
        let (mesh, _stop) = Mesh::for_tests(store.clone(), discovery.clone());
        let before = discovery.current_version();
        store.unreadable.store(true, Ordering::SeqCst);

        let applied = apply(
            &mesh,
            ApplyPolicyRequest {
                document: POLICY.into(),
                dry_run: false,
            },
            None,
        )
        .await
        .expect("the write is stored, so the call reports it");
        assert_eq!(applied.results.len(), 1);
        assert_eq!(store.inner.policies().unwrap().len(), 1);
        assert_eq!(discovery.current_version(), before, "not loaded yet");

        let deleted = delete(
            &mesh,
            DeletePolicyRequest {
                namespace: "default".into(),
                name: "web-to-api".into(),
                kind: String::new(),
            },
            None,
        )
        .await
        .expect("the deletion is stored, so the call reports it");
        assert!(deleted.snapshot_version > before);
        assert!(store.inner.policies().unwrap().is_empty());

        // Readable again: the load is tried again, and the sidecars get
        // what was written without another write.
        store.unreadable.store(false, Ordering::SeqCst);
        let stored = store.inner.snapshot_version().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while discovery.current_version() != stored {
            assert!(
                std::time::Instant::now() < deadline,
                "the stored write's snapshot was never loaded"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}
