//! The policy half of the Admin API: ApplyPolicy, GetPolicy, ListPolicies,
//! DeletePolicy and Explain, called from [`super::admin`] (so only the
//! operator identity ever reaches them).
//!
//! Every document is checked by the one library validation
//! (`trellis_core::policy::load_source`), the same code `trellisctl policy
//! lint` and the sidecars run; a request with any error is refused whole
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
    Diagnostic, Document, WorkloadSelector, document_from_proto, explain, load_source, policy_key,
};
use trellis_proto::admin::v1::{
    ApplyPolicyRequest, ApplyPolicyResponse, DeletePolicyRequest, DeletePolicyResponse,
    ExplainRequest, ExplainResponse, GetPolicyRequest, GetPolicyResponse, ListPoliciesResponse,
    PolicyError, PolicyErrors, PolicyResult,
};
use trellis_proto::policy::v1::Policy;

use super::Mesh;
use crate::store::{Generation, PolicyOutcome};

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
    let loaded = load_source(SOURCE_NAME, &req.document, &mesh.trust_domain);
    if loaded.has_errors() {
        return Err(invalid_policy(&loaded.diagnostics));
    }
    if loaded.policies.is_empty() {
        return Err(Status::invalid_argument(
            "document: holds no AuthorizationPolicy document",
        ));
    }
    let policies: Vec<Policy> = loaded
        .policies
        .iter()
        .map(|l| l.policy.to_proto())
        .collect();
    let dry_run = req.dry_run;
    let store = mesh.store.clone();
    let discovery = mesh.discovery.clone();
    let to_store = policies.clone();
    let (applied, generation, workloads) = blocking(move || {
        let (applied, generation) = store.apply_policies(&to_store, dry_run)?;
        let changed = applied
            .iter()
            .any(|a| a.outcome != PolicyOutcome::Unchanged);
        if changed && !dry_run {
            discovery.refresh()?;
        }
        Ok((applied, generation, store.workloads()?))
    })
    .await?;
    let mut results = Vec::with_capacity(applied.len());
    for ((applied, policy), loaded) in applied.into_iter().zip(&policies).zip(&loaded.policies) {
        let selector = WorkloadSelector::of(policy);
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
        if !dry_run && applied.outcome != PolicyOutcome::Unchanged {
            tracing::info!(
                policy = %policy_key(&applied.namespace, &applied.name),
                revision = applied.revision,
                outcome = ?applied.outcome,
                snapshot_version = generation.snapshot,
                "policy applied"
            );
        }
        results.push(PolicyResult {
            namespace: applied.namespace,
            name: applied.name,
            revision: applied.revision,
            outcome: outcome.into(),
            selected_workloads,
            warnings: loaded
                .policy
                .warnings()
                .iter()
                .map(|w| w.to_proto())
                .collect(),
        });
    }
    Ok(ApplyPolicyResponse {
        results,
        generation: generation.policies,
        snapshot_version: generation.snapshot,
        dry_run,
    })
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

fn not_found(namespace: &str, name: &str) -> Status {
    Status::not_found(format!("policy {} not found", policy_key(namespace, name)))
}

pub async fn get(mesh: &Mesh, req: GetPolicyRequest) -> Result<GetPolicyResponse, Status> {
    require_name(&req.namespace, &req.name)?;
    let store = mesh.store.clone();
    let (namespace, name) = (req.namespace.clone(), req.name.clone());
    let policy = blocking(move || store.policy(&namespace, &name))
        .await?
        .ok_or_else(|| not_found(&req.namespace, &req.name))?;
    let document = document_from_proto(&policy).map_err(internal)?;
    Ok(GetPolicyResponse {
        yaml: Document::AuthorizationPolicy(document).to_yaml(),
        policy: Some(policy),
    })
}

pub async fn list(mesh: &Mesh) -> Result<ListPoliciesResponse, Status> {
    let store = mesh.store.clone();
    let (policies, generation) =
        blocking(move || Ok((store.policies()?, store.generation()?))).await?;
    Ok(ListPoliciesResponse {
        policies,
        generation: generation.policies,
    })
}

pub async fn delete(mesh: &Mesh, req: DeletePolicyRequest) -> Result<DeletePolicyResponse, Status> {
    require_name(&req.namespace, &req.name)?;
    let store = mesh.store.clone();
    let discovery = mesh.discovery.clone();
    let (namespace, name) = (req.namespace.clone(), req.name.clone());
    let deleted: Option<Generation> = blocking(move || {
        let deleted = store.delete_policy(&namespace, &name)?;
        if deleted.is_some() {
            discovery.refresh()?;
        }
        Ok(deleted)
    })
    .await?;
    let generation = deleted.ok_or_else(|| not_found(&req.namespace, &req.name))?;
    tracing::info!(
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
