//! Policy documents and ApplyPolicy for the policy tests.

use tonic::transport::Channel;
use trellis_proto::admin::v1::admin_client::AdminClient;
use trellis_proto::admin::v1::{ApplyPolicyRequest, ApplyPolicyResponse};

pub const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";
pub const API: &str = "spiffe://cluster.local/ns/default/sa/api";
pub const DB: &str = "spiffe://cluster.local/ns/data/sa/db";

/// An ALLOW policy named `name` protecting `target`, letting `source` in on
/// `port`.
pub fn allow(name: &str, target: &str, source: &str, port: u32) -> String {
    format!(
        "apiVersion: trellis.io/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: {name}
  namespace: default
spec:
  selector:
    spiffeIds: [\"{target}\"]
  action: ALLOW
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
