//! The Admin API and trellisctl against the real control plane: only the
//! operator identity may call it, tokens print alone, workloads list.

mod common;

use common::*;
use tonic::Code;
use trellis_proto::admin::v1::ListWorkloadsRequest;
use trellis_proto::admin::v1::admin_client::AdminClient;

const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";

#[tokio::test]
async fn token_create_prints_only_the_token() {
    let cp = ControlPlane::start(&[]);
    let out = cp.ctl(&["token", "create", "--spiffe-id", WEB, "--ttl", "10m"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{stdout:?}");
    let token = lines[0];
    let secret = token.strip_prefix("trellis-join-").expect("token prefix");
    assert!(secret.len() >= 32 && secret.chars().all(|c| c.is_ascii_hexdigit()));
    // The token works, and never reached the log.
    cp.certify(csr_for(&p256(), WEB), Some(token), None, "")
        .await
        .expect("the printed token proves the identity");
    assert!(!cp.log().contains(secret), "the token must not be logged");
}

#[tokio::test]
async fn token_create_refuses_bad_input() {
    let cp = ControlPlane::start(&[]);
    for (args, names) in [
        (
            vec!["--spiffe-id", "spiffe://other.org/ns/a/sa/b"],
            "outside trust domain",
        ),
        (vec!["--spiffe-id", "not-an-id"], "spiffe_id"),
        (
            vec!["--spiffe-id", "spiffe://cluster.local/trellis/admin"],
            "reserved",
        ),
        (vec!["--spiffe-id", WEB, "--ttl", "25h"], "ttl_seconds"),
    ] {
        let mut full = vec!["token", "create"];
        full.extend(args);
        let out = cp.ctl(&full);
        assert_eq!(out.status.code(), Some(1), "{full:?}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(stderr.contains(names), "{full:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one-line error: {stderr}");
        assert!(out.stdout.is_empty());
    }
    let out = cp.ctl(&["token", "create"]);
    assert_eq!(
        out.status.code(),
        Some(64),
        "a missing --spiffe-id is a usage error"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--spiffe-id"));
}

#[tokio::test]
async fn only_the_operator_identity_may_call_admin() {
    let cp = ControlPlane::start(&[]);
    let workload = enroll(&cp, WEB, "").await;
    let channel = trellis_core::grpc::connect(
        &cp.grpc,
        std::sync::Arc::new(cp.client_config(Some(&workload))),
    )
    .await
    .unwrap();
    let err = AdminClient::new(channel)
        .list_workloads(ListWorkloadsRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    let channel =
        trellis_core::grpc::connect(&cp.grpc, std::sync::Arc::new(cp.client_config(None)))
            .await
            .unwrap();
    let err = AdminClient::new(channel)
        .list_workloads(ListWorkloadsRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
}

#[tokio::test]
async fn workloads_lists_a_certified_workload() {
    let cp = ControlPlane::start(&[]);
    let out = cp.ctl(&["workloads"]);
    assert!(out.status.success());
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.starts_with("SPIFFE ID"), "{table}");
    assert_eq!(
        table.lines().count(),
        1,
        "only the header before any Certify"
    );

    enroll(&cp, WEB, "127.0.0.1:15006").await;
    let out = cp.ctl(&["workloads"]);
    let table = String::from_utf8(out.stdout).unwrap();
    let header = table.lines().next().unwrap();
    for column in [
        "SPIFFE ID",
        "ADDRESS",
        "CERT EXPIRES",
        "ACKED VERSION",
        "CONNECTED",
    ] {
        assert!(header.contains(column), "{header}");
    }
    let row = table.lines().nth(1).expect("one workload row");
    assert!(
        row.starts_with(WEB) && row.contains("127.0.0.1:15006"),
        "{row}"
    );

    let out = cp.ctl(&["workloads", "-o", "json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json[0]["spiffe_id"], WEB);
    assert_eq!(json[0]["address"], "127.0.0.1:15006");
    assert_eq!(json[0]["connected"], false);
}

#[tokio::test]
async fn ctl_without_credentials_is_a_usage_error() {
    let out = std::process::Command::new(CTL)
        .args(["workloads"])
        .env_remove("TRELLIS_STATE_DIR")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--state-dir"));
}
