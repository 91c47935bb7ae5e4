//! Policy documents and ApplyPolicy for the policy tests.

use tonic::transport::Channel;
use trellis_proto::admin::v1::admin_client::AdminClient;
use trellis_proto::admin::v1::{
    ApplyPolicyRequest, ApplyPolicyResponse, DeletePolicyRequest, GetPolicyRequest,
    ListPoliciesRequest, ListPoliciesResponse,
};

pub const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";
pub const API: &str = "spiffe://cluster.local/ns/default/sa/api";
pub const DB: &str = "spiffe://cluster.local/ns/data/sa/db";

/// The namespace of a workload ID `spiffe://cluster.local/ns/<ns>/...`.
pub fn namespace_of(id: &str) -> &str {
    let rest = id.split("/ns/").nth(1).expect("a workload ID");
    rest.split('/').next().unwrap()
}

/// An ALLOW policy named `name` protecting `target`, letting `source` in on
/// `port`, in the namespace of `target` (a policy selects only workloads of
/// its own namespace).
pub fn allow(name: &str, target: &str, source: &str, port: u32) -> String {
    allow_in(namespace_of(target), name, target, source, port)
}

/// [`allow`] in `namespace`: the root namespace (`trellis-system` unless
/// the control plane is told otherwise) for a `target` of several
/// namespaces.
pub fn allow_in(namespace: &str, name: &str, target: &str, source: &str, port: u32) -> String {
    policy_in(namespace, name, "ALLOW", target, source, port)
}

/// A policy of `action` in `namespace`, named `name`, protecting `target`
/// with one rule from `source` on `port`.
pub fn policy_in(
    namespace: &str,
    name: &str,
    action: &str,
    target: &str,
    source: &str,
    port: u32,
) -> String {
    format!(
        "apiVersion: trellis.io/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: {name}
  namespace: {namespace}
spec:
  selector:
    spiffeIds: [\"{target}\"]
  action: {action}
  rules:
    - from:
        - spiffeId: {source}
      to:
        - ports: [{port}]
"
    )
}

pub async fn apply(
    admin: &mut AdminClient<Channel>,
    document: &str,
    dry_run: bool,
) -> Result<ApplyPolicyResponse, tonic::Status> {
    admin
        .apply_policy(ApplyPolicyRequest {
            document: document.into(),
            dry_run,
        })
        .await
        .map(|r| r.into_inner())
}

/// GetPolicy for `namespace/name` of `kind` (`""`: an AuthorizationPolicy).
pub fn get(namespace: &str, name: &str, kind: &str) -> GetPolicyRequest {
    GetPolicyRequest {
        namespace: namespace.into(),
        name: name.into(),
        kind: kind.into(),
    }
}

/// DeletePolicy for `namespace/name` of `kind`, like [`get`].
pub fn delete(namespace: &str, name: &str, kind: &str) -> DeletePolicyRequest {
    DeletePolicyRequest {
        namespace: namespace.into(),
        name: name.into(),
        kind: kind.into(),
    }
}

/// What ListPolicies answers; it must answer.
pub async fn list(admin: &mut AdminClient<Channel>) -> ListPoliciesResponse {
    admin
        .list_policies(ListPoliciesRequest {})
        .await
        .unwrap()
        .into_inner()
}
