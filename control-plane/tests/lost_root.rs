//! A state dir whose generated CA went missing while its database shows a
//! mesh lived on it (a restore without `ca.crt`/`ca.key`, a careless
//! clean-up): the control plane refuses to generate a new root unless told
//! to with `--new-root`.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;

const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";

/// Every file of `dir` with its bytes.
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            (path, bytes)
        })
        .collect()
}

/// Moves `ca.crt` and `ca.key` out of `state` into `aside`.
fn move_ca(from: &Path, to: &Path) {
    for name in ["ca.crt", "ca.key"] {
        std::fs::rename(from.join(name), to.join(name)).unwrap();
    }
}

/// A control plane that lived: one workload enrolled with a join token,
/// stopped. The temp dir, its state dir and a dir beside it for the CA.
async fn lived_in() -> (Arc<tempfile::TempDir>, PathBuf, PathBuf) {
    let cp = ControlPlane::start(&[]);
    enroll(&cp, WEB, "127.0.0.1:9000").await;
    let (tmp, state) = (cp.tmp.clone(), cp.state_dir.clone());
    assert!(cp.stop_async().await.success());
    let aside = tmp.path().join("backup");
    std::fs::create_dir(&aside).unwrap();
    (tmp, state, aside)
}

fn assert_refused_naming_the_loss(state: &Path) {
    let before = files(state);
    let (code, stderr) = refused_start(state);
    assert_eq!(code, Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    let database = state.join("trellis.redb");
    for words in [
        format!(
            "error: the state dir {} holds no ca.crt nor ca.key, but its database {} shows a mesh \
             lived on it (1 certificate issued, the newest at ",
            state.display(),
            database.display()
        ),
        format!("to {WEB}); 1 workload; 1 join token), and running sidecars trust"),
        "refusing to generate a new one, and nothing was written. Restore ca.crt and ca.key \
         from the backup they were taken with"
            .to_owned(),
        "start the control plane with --new-root (TRELLIS_NEW_ROOT=true) once".to_owned(),
    ] {
        assert!(last.contains(&words), "{words:?} not in {last}");
    }
    assert!(
        files(state) == before,
        "the state dir must be left byte for byte as it was"
    );
}

/// Refused with exit 1, naming the state dir, the missing files, what the
/// database holds and the ways out, the state dir left byte-identical: as
/// a clean stop left it, and as a crash (a database needing repair, read
/// from a copy in memory). With the files back, it starts with its root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lived_in_state_dir_without_its_ca_is_refused_and_left_alone() {
    let (tmp, state, aside) = lived_in().await;
    let bundle = std::fs::read(state.join("bundle.pem")).unwrap();
    move_ca(&state, &aside);
    assert_refused_naming_the_loss(&state);

    move_ca(&aside, &state);
    let cp = ControlPlane::start_in(tmp.clone(), &[]);
    assert_eq!(
        std::fs::read(state.join("bundle.pem")).unwrap(),
        bundle,
        "the restored root"
    );
    cp.kill_hard();
    assert!(!cp.exited().success());
    move_ca(&state, &aside);
    assert_refused_naming_the_loss(&state);
}

/// With `--new-root` (or its twin `TRELLIS_NEW_ROOT=true`) the operator
/// starts a new root on purpose: it is generated, with a warning; a start
/// with the flag and a CA in place warns that it has no effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_root_generates_a_root_over_a_lost_one_and_warns() {
    for twin in [false, true] {
        let (tmp, state, aside) = lived_in().await;
        let old_bundle = std::fs::read(state.join("bundle.pem")).unwrap();
        move_ca(&state, &aside);
        let cp = if twin {
            ControlPlane::start_via(tmp.clone(), &["env", "TRELLIS_NEW_ROOT=true"], None, &[])
        } else {
            ControlPlane::start_in(tmp.clone(), &["--new-root"])
        };
        cp.wait_for_line("the new-root warning", |l| {
            l.contains("WARN")
                && l.contains("generated a new root CA on --new-root, replacing the one missing")
                && l.contains("remove the flag")
        });
        assert_ne!(
            std::fs::read(state.join("bundle.pem")).unwrap(),
            old_bundle,
            "twin {twin}: a new root"
        );
        assert!(state.join("ca.key").exists() && state.join("ca.crt").exists());
        assert!(cp.stop_async().await.success());

        let cp = ControlPlane::start_in(tmp, &["--new-root"]);
        cp.wait_for_line("the no-effect warning", |l| {
            l.contains("WARN") && l.contains("--new-root has no effect: the state dir holds a CA")
        });
        assert!(cp.stop_async().await.success());
    }
}

/// A state dir whose database holds nothing of a mesh (no certificate
/// issued, no workload, no token: a first start and no more) generates a
/// root without the flag, as a fresh one does.
#[test]
fn a_state_dir_whose_database_holds_nothing_generates_a_root() {
    let cp = ControlPlane::start(&[]);
    let tmp = cp.tmp.clone();
    assert!(cp.stop().success());
    let state = tmp.path().join("state");
    for name in ["ca.crt", "ca.key"] {
        std::fs::remove_file(state.join(name)).unwrap();
    }
    let cp = ControlPlane::start_in(tmp, &[]);
    assert!(state.join("ca.crt").exists());
    assert!(!cp.log().contains("--new-root"), "{}", cp.log());
    assert!(cp.stop().success());
}

/// A database holding policies and revocations but no certificate issued,
/// no workload and no token (an operator applied policies, revoked an
/// identity, and no sidecar ever joined) lost nothing signed by the root:
/// the start generates one without the flag, as a fresh state dir does,
/// and keeps the policies and the revocation, which name identities, not
/// the old root's certificates.
#[test]
fn policies_and_revocations_alone_do_not_keep_a_root_from_being_generated() {
    let ok = |cp: &ControlPlane, args: &[&str]| {
        let out = cp.ctl(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "trellisctl {args:?}: {stderr}");
        String::from_utf8(out.stdout).unwrap()
    };
    let cp = ControlPlane::start(&[]);
    let tmp = cp.tmp.clone();
    let policy = tmp.path().join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "apiVersion: trellis.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: web, namespace: default}}
spec:
  selector: {{spiffeIds: [\"{WEB}\"]}}
  action: ALLOW
  rules: [{{to: [{{ports: [8080]}}]}}]
"
        ),
    )
    .unwrap();
    ok(&cp, &["policy", "apply", "-f", policy.to_str().unwrap()]);
    ok(&cp, &["identity", "revoke", WEB, "--reason", "test"]);
    let state = cp.state_dir.clone();
    let old_root = std::fs::read(state.join("ca.crt")).unwrap();
    assert!(cp.stop().success());
    for name in ["ca.crt", "ca.key"] {
        std::fs::remove_file(state.join(name)).unwrap();
    }
    let cp = ControlPlane::start_in(tmp, &[]);
    assert_ne!(std::fs::read(state.join("ca.crt")).unwrap(), old_root);
    assert!(!cp.log().contains("--new-root"), "{}", cp.log());
    assert!(ok(&cp, &["policy", "list"]).contains("web"));
    assert!(ok(&cp, &["identity", "revocations"]).contains(WEB));
    assert!(cp.stop().success());
}

/// The flag is refused as configuration (exit 64, nothing made) with the
/// Kubernetes store, which has `--ca-secret-new-root`; with an operator's
/// CA, see the test below.
#[test]
fn new_root_is_refused_where_it_cannot_apply() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let stderr = assert_refused_touching_nothing(
        &state,
        &[
            "--new-root",
            "--store",
            "kubernetes",
            "--identity-provider",
            "kubernetes",
            "--ca-secret",
            "trellis-ca",
            "--namespace",
            "trellis",
            "--kube-api",
            "https://127.0.0.1:1",
        ],
        64,
        "--new-root is only used with --store embedded",
    );
    assert!(stderr.contains("--ca-secret-new-root"), "{stderr}");
}

/// With an operator's CA the flag is refused as a usage error (exit 64,
/// nothing made), and before the CA files are read: a pair that is fine and
/// a pair that is missing get the same refusal, naming the flags.
#[test]
fn new_root_is_refused_with_an_operator_ca_before_its_files_are_read() {
    let shared = common::replica::SharedCa::generate();
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing");
    let missing = missing.to_str().unwrap();
    let absent = ["--ca-cert", missing, "--ca-key", missing];
    for ca in [shared.flags(), absent] {
        let state = tmp.path().join("state");
        let stderr = assert_refused_touching_nothing(
            &state,
            &[&ca[..], &["--new-root"]].concat(),
            64,
            "error: --new-root is not used with --ca-cert/--ca-key: it lets a generated CA \
             lost from the state dir be replaced, and the CA is the operator's files",
        );
        assert!(!stderr.contains("cannot read"), "{stderr}");
    }
}
