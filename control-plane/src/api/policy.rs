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
//! with INVALID_ARGUMENT and stores nothing. The message lists every error
//! as `document:LINE:COLUMN: field.path: message`; the status details carry
//! the same as a `google.rpc.Status` whose one detail is a
//! `trellis.admin.v1.PolicyErrors` ([`policy_errors_of`] reads it back).
//! A successful write bumps the snapshot version in its own transaction and
//! then refreshes discovery, which pushes to the sidecars it affects.

use prost::Message;
use tonic::{Code, Status};
use trellis_core::SpiffeId;
use trellis_core::policy::{
    AuthorizationPolicy, Diagnostic, Document, RateLimitPolicy, WorkloadSelector,
    document_from_proto, explain, load_source_in, policy_key,
};
use trellis_proto::admin::v1::{
    ApplyPolicyRequest, ApplyPolicyResponse, DeletePolicyRequest, DeletePolicyResponse,
    ExplainRequest, ExplainResponse, GetPolicyRequest, GetPolicyResponse, ListPoliciesResponse,
    PolicyError, PolicyErrors, PolicyResult,
};
use trellis_proto::policy::v1::{Policy, RateLimit, Selector, Violation};

use super::Mesh;
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
        _ => Status::internal(message),
    }
}

pub async fn apply(mesh: &Mesh, req: ApplyPolicyRequest) -> Result<ApplyPolicyResponse, Status> {
    let context = mesh.discovery.validation_context();
    let loaded = load_source_in(SOURCE_NAME, &req.document, &mesh.trust_domain, &context);
    if loaded.has_errors() {
        return Err(invalid_policy(&loaded.diagnostics));
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
        let applied = store.apply_documents(&to_store, &limits_to_store, dry_run)?;
        if applied.changed() && !dry_run {
            discovery.refresh()?;
        }
        Ok((applied, store.workloads()?))
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
        let warnings = loaded
            .policy
            .warnings()
            .iter()
            .map(|w| w.to_proto())
            .collect();
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
        for (_, r) in results
            .iter()
            .filter(|(_, r)| r.outcome != trellis_proto::admin::v1::PolicyOutcome::Unchanged as i32)
        {
            tracing::info!(
                kind = %r.kind,
                policy = %policy_key(&r.namespace, &r.name),
                revision = r.revision,
                snapshot_version = generation.snapshot,
                "policy applied"
            );
        }
    }
    Ok(ApplyPolicyResponse {
        results: results.into_iter().map(|(_, r)| r).collect(),
        generation: generation.policies,
        snapshot_version: generation.snapshot,
        dry_run,
    })
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

/// INVALID_ARGUMENT listing every error, with the structured details.
fn invalid_policy(diagnostics: &[Diagnostic]) -> Status {
    let errors: Vec<String> = diagnostics
        .iter()
        .filter(|d| d.is_error())
        .map(ToString::to_string)
        .collect();
    let message = format!(
        "invalid policy ({} error{}): {}",
        errors.len(),
        if errors.len() == 1 { "" } else { "s" },
        errors.join("; ")
    );
    let details = PolicyErrors {
        errors: diagnostics
            .iter()
            .map(|d| PolicyError {
                violation: Some(trellis_proto::policy::v1::Violation {
                    path: d.path.to_string(),
                    message: d.message.clone(),
                    warning: !d.is_error(),
                }),
                line: d.line as u32,
                column: d.column as u32,
            })
            .collect(),
    };
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

fn not_found(kind: Kind, namespace: &str, name: &str) -> Status {
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
    let missing = || not_found(kind, &req.namespace, &req.name);
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
    Ok(ListPoliciesResponse {
        policies,
        rate_limits,
        generation: generation.policies,
    })
}

pub async fn delete(mesh: &Mesh, req: DeletePolicyRequest) -> Result<DeletePolicyResponse, Status> {
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
            discovery.refresh()?;
        }
        Ok(deleted)
    })
    .await?;
    let generation = deleted.ok_or_else(|| not_found(kind, &req.namespace, &req.name))?;
    tracing::info!(
        kind = ?kind,
        policy = %policy_key(&req.namespace, &req.name),
        snapshot_version = generation.snapshot,
        "policy deleted"
    );
    Ok(DeletePolicyResponse {
        generation: generation.policies,
        snapshot_version: generation.snapshot,
    })
}

pub fn explain_request(mesh: &Mesh, req: &ExplainRequest) -> Result<ExplainResponse, Status> {
    let id = |field: &str, value: &str| {
        let id = SpiffeId::parse(value)
            .map_err(|e| Status::invalid_argument(format!("{field}: {value:?}: {e}")))?;
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
    let port = u16::try_from(req.port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| Status::invalid_argument(format!("port: {} is not in 1-65535", req.port)))?;
    let view = mesh.discovery.view();
    let policies: Vec<Policy> = view.policies.iter().map(|(_, p)| p.clone()).collect();
    let default = mesh.discovery.default_policy();
    let explanation = explain(&source, &destination, port, &policies, default).map_err(internal)?;
    Ok(ExplainResponse {
        explanation: Some(explanation.to_proto()),
    })
}
