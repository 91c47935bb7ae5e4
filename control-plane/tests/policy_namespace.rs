//! A policy governs only the workloads of its own namespace, except in the
//! mesh's root namespace: `trellisctl` against the real control plane.
//!
//! Namespaced RBAC on policies is how a cluster hands out policy authoring:
//! whoever may write policies in `team-a` must not open `payments` (an
//! ALLOW selecting its workloads) nor shut the mesh (a DENY selecting
//! `spiffe://cluster.local/*`, which wins over every ALLOW).

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;

use common::*;
use trellis_proto::admin::v1::ListPoliciesRequest;

const PAYMENTS_DB: &str = "spiffe://cluster.local/ns/payments/sa/db";
const TEAM_A_WEB: &str = "spiffe://cluster.local/ns/team-a/sa/web";

/// An AuthorizationPolicy of `action` in `namespace` selecting `selector`,
/// with one rule from team-a's web to port 5432.
fn policy(namespace: &str, name: &str, action: &str, selector: &str) -> String {
    common::policy::policy_in(namespace, name, action, selector, TEAM_A_WEB, 5432)
}

fn rate_limit(namespace: &str, selector: &str) -> String {
    format!(
        "apiVersion: trellis.io/v1alpha1
kind: RateLimitPolicy
metadata: {{name: slow-db, namespace: {namespace}}}
spec:
  selector: {{spiffeIds: [\"{selector}\"]}}
  limit: {{requestsPerSecond: 1, burst: 1}}
"
    )
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn apply(cp: &ControlPlane, file: &Path) -> Output {
    cp.ctl(&["policy", "apply", "-f", file.to_str().unwrap()])
}

/// Exit code and stderr.
fn outcome(out: &Output) -> (Option<i32>, String) {
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// The refusal of `selector` in `namespace` under root namespace `root`.
fn outside(selector: &str, namespace: &str, root: &str) -> String {
    format!(
        "spec.selector.spiffeIds[0]: \"{selector}\" selects workloads outside the policy's \
         namespace \"{namespace}\": narrow it to \"spiffe://cluster.local/ns/{namespace}/...\" \
         or move the policy to the root namespace \"{root}\""
    )
}

#[test]
fn apply_refuses_a_policy_selecting_outside_its_namespace() {
    let cp = ControlPlane::start(&["--root-namespace", "mesh-admin"]);
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "open-payments.yaml",
            policy("team-a", "open-db", "ALLOW", PAYMENTS_DB),
            PAYMENTS_DB,
        ),
        (
            "shut-mesh.yaml",
            policy("team-a", "deny-all", "DENY", "spiffe://cluster.local/*"),
            "spiffe://cluster.local/*",
        ),
        (
            "slow-payments.yaml",
            rate_limit("team-a", PAYMENTS_DB),
            PAYMENTS_DB,
        ),
    ];
    for (name, text, selector) in &cases {
        let file = write(dir.path(), name, text);
        let (code, stderr) = outcome(&apply(&cp, &file));
        assert_eq!(code, Some(1), "{name}: {stderr}");
        let at = format!("{}:", file.display());
        let message = outside(selector, "team-a", "mesh-admin");
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with(&at) && l.contains(&message)),
            "{name}: {stderr}"
        );
    }
    let stored = cp.ctl(&["policy", "list", "-o", "json"]);
    let listed: serde_json::Value = serde_json::from_slice(&stored.stdout).unwrap();
    assert_eq!(
        listed,
        serde_json::json!({"generation": 0, "policies": [], "rate_limits": []}),
        "nothing stored"
    );

    // Its own namespace's workloads, or any from the root namespace.
    for (name, text) in [
        (
            "own.yaml",
            policy(
                "team-a",
                "own",
                "ALLOW",
                "spiffe://cluster.local/ns/team-a/*",
            ),
        ),
        (
            "root.yaml",
            policy("mesh-admin", "open-db", "ALLOW", PAYMENTS_DB),
        ),
        (
            "root-deny.yaml",
            policy(
                "mesh-admin",
                "deny-all",
                "AUDIT",
                "spiffe://cluster.local/*",
            ),
        ),
        ("root-limit.yaml", rate_limit("mesh-admin", PAYMENTS_DB)),
    ] {
        let (code, stderr) = outcome(&apply(&cp, &write(dir.path(), name, &text)));
        assert_eq!(code, Some(0), "{name}: {stderr}");
    }
}

/// `policy lint` checks the scope offline, against its own
/// `--root-namespace` (default `trellis-system`, as the control plane's)
/// or the environment twin.
#[test]
fn lint_scopes_selectors_by_its_root_namespace() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "open-payments.yaml",
        &policy("team-a", "open-db", "ALLOW", PAYMENTS_DB),
    );
    let lint = |args: &[&str], env: Option<&str>| {
        let mut command = std::process::Command::new(CTL);
        command.args(["policy", "lint"]).arg(&file).args(args);
        command.env_remove("TRELLIS_ROOT_NAMESPACE");
        if let Some(root) = env {
            command.env("TRELLIS_ROOT_NAMESPACE", root);
        }
        command.output().unwrap()
    };
    let refused = lint(&[], None);
    assert_eq!(refused.status.code(), Some(1));
    let stdout = String::from_utf8(refused.stdout).unwrap();
    assert_eq!(
        stdout,
        format!(
            "{}:8:17: {}\n",
            file.display(),
            outside(PAYMENTS_DB, "team-a", "trellis-system")
        )
    );
    for (args, env) in [
        (&["--root-namespace", "team-a"][..], None),
        (&[], Some("team-a")),
    ] {
        let out = lint(args, env);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?} {env:?}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// A policy stored when its namespace was the root one (or before
/// policies were limited to their namespace) is not dropped at a start
/// that finds it outside: it stays enforced as written, the start-up log
/// and `trellisctl check` name it and its pattern, and applying it again
/// as it is is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_policy_outside_its_namespace_stays_enforced_and_is_reported() {
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let file = write(
        tmp.path(),
        "open-payments.yaml",
        &policy("team-a", "open-db", "ALLOW", PAYMENTS_DB),
    );
    let first = tokio::task::spawn_blocking({
        let tmp = tmp.clone();
        move || ControlPlane::start_in(tmp, &["--root-namespace", "team-a"])
    })
    .await
    .unwrap();
    let (code, stderr) = outcome(&apply(&first, &file));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(first.stop_async().await.success());

    let cp = tokio::task::spawn_blocking(move || ControlPlane::start_in(tmp, &[]))
        .await
        .unwrap();
    let warning = cp.wait_for_line("the stored policy's warning", |l| {
        l.contains("stored policy fails a check added since it was stored")
    });
    assert!(
        warning.contains("policy=team-a/open-db")
            && warning.contains(&format!(
                "\"{PAYMENTS_DB}\" selects workloads outside the policy's namespace \"team-a\""
            ))
            && warning.contains("still enforced as written")
            && warning.contains("move the policy to the root namespace"),
        "{warning}"
    );

    // Enforced: the sidecar of the workload it selects is sent it.
    let db = enroll(&cp, PAYMENTS_DB, "127.0.0.1:7301").await;
    let mut watch = Watcher::open(&cp, &db, "127.0.0.1:7301").await;
    let snapshot = watch.next().await;
    let names: Vec<_> = snapshot.policies.iter().map(|p| &p.name).collect();
    assert_eq!(names, ["open-db"]);

    let mut admin = cp.admin_client().await;
    let listed = admin
        .list_policies(ListPoliciesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.stored_warnings.len(), 1, "{listed:?}");

    let check = cp.ctl(&["check"]);
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert!(
        stdout.lines().any(|l| l.starts_with(
            "warn  stored AuthorizationPolicy team-a/open-db: spec.selector.spiffeIds[0]: "
        ) && l.contains(PAYMENTS_DB)
            && l.contains("still enforced as written")
            && l.ends_with("move the policy to the root namespace \"trellis-system\"")),
        "{stdout}"
    );

    let (code, stderr) = outcome(&apply(&cp, &file));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&outside(PAYMENTS_DB, "team-a", "trellis-system")),
        "{stderr}"
    );
}
