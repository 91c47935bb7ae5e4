//! RateLimitPolicy through the real control plane: stored beside
//! authorization policies (one write, one generation), read back and deleted
//! by kind, pushed only to the sidecars it selects; and the mesh-wide opaque
//! ports, which reach every sidecar and make L7 rules on them invalid.

mod common;

use std::sync::Arc;

use common::policy::*;
use common::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use trellis_control_plane::api::policy::policy_errors_of;
use trellis_proto::admin::v1::PolicyOutcome;
use trellis_proto::discovery::v1::discovery_client::DiscoveryClient;
use trellis_proto::discovery::v1::watch_request::Kind;
use trellis_proto::discovery::v1::{Ack, Snapshot, Subscribe, WatchRequest};

const RATE_LIMIT: &str = "RateLimitPolicy";

fn limit(name: &str, target: &str, burst: u32) -> String {
    format!(
        "apiVersion: trellis.io/v1alpha1
kind: RateLimitPolicy
metadata: {{name: {name}, namespace: default}}
spec:
  selector: {{spiffeIds: [\"{target}\"]}}
  limit: {{requestsPerSecond: 50, burst: {burst}}}
  key: source
  match: [{{paths: [\"/search/*\"]}}]
"
    )
}

/// A Watch stream of `svid`, and its request side for ACKs.
async fn watch(
    cp: &ControlPlane,
    svid: &Svid,
    inbound: &str,
) -> (mpsc::Sender<WatchRequest>, tonic::Streaming<Snapshot>) {
    let channel = trellis_core::grpc::connect(&cp.grpc, Arc::new(cp.client_config(Some(svid))))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(8);
    tx.send(WatchRequest {
        kind: Some(Kind::Subscribe(Subscribe {
            inbound_address: inbound.into(),
            inbound_addresses: vec![inbound.into()],
            last_version: 0,
            accepts_endpoints_version: false,
            accepts_endpoint_changes: false,
            last_version_epoch: 0,
            warnings: Vec::new(),
            opaque_ports: Vec::new(),
        })),
    })
    .await
    .unwrap();
    let stream = DiscoveryClient::new(channel)
        .watch(ReceiverStream::new(rx))
        .await
        .expect("watch opens")
        .into_inner();
    (tx, stream)
}

async fn next(
    stream: &mut tonic::Streaming<Snapshot>,
    tx: &mpsc::Sender<WatchRequest>,
) -> Snapshot {
    let snapshot = tokio::time::timeout(PATIENCE, stream.message())
        .await
        .expect("a snapshot in time")
        .unwrap()
        .expect("the stream stays open");
    let ack = Kind::Ack(Ack {
        version: snapshot.version,
        warnings: Vec::new(),
    });
    tx.send(WatchRequest { kind: Some(ack) }).await.unwrap();
    snapshot
}

#[tokio::test]
async fn a_mixed_file_is_one_write_and_each_sidecar_gets_only_its_rate_limits() {
    let cp = ControlPlane::start(&[]);
    let api = enroll(&cp, API, "127.0.0.1:7201").await;
    let web = enroll(&cp, WEB, "127.0.0.1:7202").await;
    let (api_tx, mut api_stream) = watch(&cp, &api, "127.0.0.1:7201").await;
    let (web_tx, mut web_stream) = watch(&cp, &web, "127.0.0.1:7202").await;
    let first_api = next(&mut api_stream, &api_tx).await;
    let first_web = next(&mut web_stream, &web_tx).await;
    assert!(first_api.rate_limits.is_empty());

    let mut admin = cp.admin_client().await;
    // Same name, other kind: the kinds are separate name spaces.
    let mixed = format!(
        "{}---\n{}",
        allow("api-limit", API, WEB, 8080),
        limit("api-limit", API, 100)
    );
    let applied = apply(&mut admin, &mixed, false).await.unwrap();
    let results: Vec<_> = applied
        .results
        .iter()
        .map(|r| (r.kind.as_str(), r.name.as_str(), r.outcome()))
        .collect();
    assert_eq!(
        results,
        [
            ("AuthorizationPolicy", "api-limit", PolicyOutcome::Created),
            (RATE_LIMIT, "api-limit", PolicyOutcome::Created)
        ]
    );
    assert_eq!(applied.results[1].selected_workloads, [API]);
    assert_eq!(applied.generation, 1, "one write, one generation");

    let pushed = next(&mut api_stream, &api_tx).await;
    assert!(pushed.version >= applied.snapshot_version);
    assert_eq!(pushed.rate_limits.len(), 1);
    let pushed_limit = &pushed.rate_limits[0];
    assert_eq!(
        (
            pushed_limit.name.as_str(),
            pushed_limit.burst,
            pushed_limit.key.as_str()
        ),
        ("api-limit", 100, "source")
    );
    assert_eq!(pushed_limit.matches[0].paths, ["/search/*"]);

    // Only the rate limit changes: api gets a snapshot, web (selected by
    // neither) none; the next thing web sees is the workload that joins.
    let changed = apply(&mut admin, &limit("api-limit", API, 10), false)
        .await
        .unwrap();
    assert_eq!(changed.results[0].outcome(), PolicyOutcome::Updated);
    assert_eq!(changed.results[0].revision, 2);
    assert_eq!(
        next(&mut api_stream, &api_tx).await.rate_limits[0].burst,
        10
    );
    enroll(&cp, DB, "127.0.0.1:7203").await;
    let web_next = next(&mut web_stream, &web_tx).await;
    assert!(web_next.rate_limits.is_empty());
    assert!(web_next.version > changed.snapshot_version);
    assert!(web_next.version > first_web.version);
    let api_next = next(&mut api_stream, &api_tx).await;
    assert_eq!(api_next.endpoints.len(), 3, "api sees the new endpoint too");
    assert_eq!(api_next.rate_limits[0].burst, 10);

    let got = admin
        .get_policy(get("default", "api-limit", RATE_LIMIT))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.rate_limit.unwrap().revision, 2);
    assert!(got.policy.is_none());
    assert!(got.yaml.contains("kind: RateLimitPolicy"), "{}", got.yaml);
    assert!(got.yaml.contains("burst: 10"), "{}", got.yaml);

    let listed = list(&mut admin).await;
    assert_eq!(listed.policies.len(), 1);
    assert_eq!(listed.rate_limits.len(), 1);

    let err = admin
        .get_policy(get("default", "api-limit", "Gateway"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("unknown kind \"Gateway\""),
        "{err:?}"
    );

    let deleted = admin
        .delete_policy(delete("default", "api-limit", RATE_LIMIT))
        .await
        .unwrap()
        .into_inner();
    assert!(deleted.snapshot_version > changed.snapshot_version);
    let after = next(&mut api_stream, &api_tx).await;
    assert!(after.rate_limits.is_empty());
    assert_eq!(after.policies.len(), 1, "the policy of the same name stays");
}

#[tokio::test]
async fn an_invalid_rate_limit_refuses_the_whole_file() {
    let cp = ControlPlane::start(&[]);
    let mut admin = cp.admin_client().await;
    let bad = limit("api-limit", API, 100).replace("requestsPerSecond: 50", "requestsPerSecond: 0");
    let mixed = format!("{}---\n{bad}", allow("web-to-api", API, WEB, 8080));
    let err = apply(&mut admin, &mixed, false).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let errors = policy_errors_of(&err).expect("structured errors");
    let e = &errors.errors[0];
    assert_eq!(
        e.violation.as_ref().unwrap().path,
        "spec.limit.requestsPerSecond"
    );
    assert_eq!((e.line, e.column), (21, 30));
    let listed = list(&mut admin).await;
    assert!(listed.policies.is_empty() && listed.rate_limits.is_empty());
    assert_eq!(listed.generation, 0);
}

#[tokio::test]
async fn mesh_opaque_ports_reach_sidecars_and_refuse_l7_rules_on_them() {
    let cp = ControlPlane::start(&["--opaque-ports", "5432,25"]);
    let api = enroll(&cp, API, "127.0.0.1:7211").await;
    let (tx, mut stream) = watch(&cp, &api, "127.0.0.1:7211").await;
    let first = next(&mut stream, &tx).await;
    assert_eq!(first.mesh.unwrap().opaque_ports, [5432, 25]);

    let mut admin = cp.admin_client().await;
    let l7 = allow("web-to-db", API, WEB, 5432).replace(
        "        - ports: [5432]\n",
        "        - ports: [5432]\n          paths: [\"/x\"]\n",
    );
    let err = apply(&mut admin, &l7, false).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message()
            .contains("spec.rules[0].to[0].ports[0]: port 5432 is declared opaque"),
        "{err:?}"
    );
    // L4 rules on the port stay fine, and nothing was stored by the refusal.
    let listed = list(&mut admin).await;
    assert_eq!(listed.generation, 0);
    apply(&mut admin, &allow("web-to-db", API, WEB, 5432), false)
        .await
        .unwrap();
}

#[tokio::test]
async fn trellisctl_applies_gets_lists_and_deletes_rate_limits() {
    let cp = ControlPlane::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mixed.yaml");
    std::fs::write(
        &file,
        format!(
            "{}---\n{}",
            allow("web-to-api", API, WEB, 8080),
            limit("api-limit", API, 100)
        ),
    )
    .unwrap();
    let file = file.to_str().unwrap();
    let out = cp.ctl(&["policy", "apply", "-f", file]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("RateLimitPolicy default/api-limit: created (revision 1)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("AuthorizationPolicy default/web-to-api: created (revision 1)"),
        "{stdout}"
    );

    let out = cp.ctl(&["policy", "get", "default/api-limit", "--kind", RATE_LIMIT]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.starts_with("# revision 1\n"), "{stdout}");
    assert!(stdout.contains("requestsPerSecond: 50"), "{stdout}");

    let out = cp.ctl(&["policy", "list"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("RateLimitPolicy") && l.contains("default/api-limit")),
        "{stdout}"
    );

    // A name copied from the list without its kind: `get` and `delete`
    // read AuthorizationPolicy unless told, and say which kind has it.
    // Nothing is deleted.
    for (verb, name, kind) in [
        ("get", "default/api-limit", "RateLimitPolicy"),
        ("delete", "default/api-limit", "RateLimitPolicy"),
        ("get", "default/web-to-api", "AuthorizationPolicy"),
    ] {
        let mut args = vec!["policy", verb, name];
        if kind == "AuthorizationPolicy" {
            args.extend(["--kind", RATE_LIMIT]);
        }
        let out = cp.ctl(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.ends_with(&format!(
                " {name} not found ({name} is a {kind}: add --kind {kind})\n"
            )),
            "{args:?}: {stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
    }
    let out = cp.ctl(&["policy", "get", "default/nothing"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "error: not found: policy default/nothing not found\n"
    );
    let out = cp.ctl(&["policy", "list"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("default/api-limit"),
        "the hint deleted nothing"
    );

    // A broken rate limit in a second file: nothing is applied, the error
    // names the file, line and column.
    let broken = dir.path().join("broken.yaml");
    std::fs::write(
        &broken,
        limit("other", API, 0).replace("key: source", "key: path"),
    )
    .unwrap();
    let out = cp.ctl(&["policy", "apply", "-f", broken.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("{}:7:8: spec.key", broken.display())),
        "{stderr}"
    );
    assert!(stderr.contains("nothing applied"), "{stderr}");

    let out = cp.ctl(&[
        "policy",
        "delete",
        "default/api-limit",
        "--kind",
        RATE_LIMIT,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cp.ctl(&["policy", "get", "default/api-limit", "--kind", RATE_LIMIT]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("rate limit default/api-limit not found")
    );
    let out = cp.ctl(&["policy", "get", "default/web-to-api"]);
    assert!(out.status.success(), "the policy of the other kind stays");
}

#[tokio::test]
async fn opaque_ports_that_a_stored_l7_policy_uses_stop_the_start() {
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let cp = ControlPlane::start_in(tmp.clone(), &[]);
    let mut admin = cp.admin_client().await;
    let l7 = allow("web-to-db", API, WEB, 5432).replace(
        "        - ports: [5432]\n",
        "        - ports: [5432]\n          methods: [GET]\n",
    );
    apply(&mut admin, &l7, false).await.unwrap();
    assert!(cp.stop_async().await.success());

    let out = std::process::Command::new(CP)
        .arg("--state-dir")
        .arg(tmp.path().join("state"))
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .args(["--opaque-ports", "5432"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("--opaque-ports: the stored policy default/web-to-db")
            && stderr.contains("port 5432 is declared opaque"),
        "{stderr}"
    );
    // Without the port, the same state starts and keeps the policy.
    let cp = ControlPlane::start_in(tmp, &[]);
    let listed = list(&mut cp.admin_client().await).await;
    assert_eq!(listed.policies.len(), 1);
}
