//! The webhook port of the real binary (`--webhook`), called as the
//! Kubernetes API server calls it: over HTTPS with curl, trusting the CA of
//! a serving certificate made here (the webhook configurations'
//! `caBundle`).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

use super::ControlPlane;

/// Serving certificate files for `localhost` (`tls.crt`, `tls.key`), and
/// the CA that signed them (`ca.crt`), in a directory of their own.
pub struct WebhookCerts {
    pub dir: tempfile::TempDir,
}

impl WebhookCerts {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cert = super::serving::ServingCert::new("trellis webhook test CA");
        std::fs::write(dir.path().join("ca.crt"), &cert.ca_pem).unwrap();
        std::fs::write(dir.path().join("tls.crt"), &cert.cert_pem).unwrap();
        std::fs::write(dir.path().join("tls.key"), &cert.key_pem).unwrap();
        Self { dir }
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// The flags serving the webhook port on a free loopback port with
    /// these files.
    pub fn flags(&self) -> Vec<String> {
        vec![
            "--webhook".into(),
            "127.0.0.1:0".into(),
            "--webhook-cert".into(),
            self.path("tls.crt"),
            "--webhook-key".into(),
            self.path("tls.key"),
        ]
    }

    /// POSTs the review in the file `review` to `path` of the webhook at
    /// `addr` as the API server would: HTTPS, verified against the CA, by
    /// name. Returns the HTTP status and the body.
    pub fn post(&self, addr: &str, path: &str, review: &Path) -> (u16, String) {
        let port = addr.rsplit(':').next().unwrap();
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
            .args(["--cacert", &self.path("ca.crt")])
            .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
            .args(["-H", "content-type: application/json"])
            .arg("--data-binary")
            .arg(format!("@{}", review.display()))
            .arg(format!("https://localhost:{port}{path}"))
            .output()
            .expect("curl runs");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "curl failed: {}{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (body, code) = stdout.rsplit_once('\n').unwrap();
        (code.trim().parse().unwrap(), body.to_owned())
    }

    /// Reviews of a Deployment `web`'s pods in namespace `shop`, written
    /// next to the certificates (`mistyped.json`, `fixed.json`): one whose
    /// `trellis.io/inject` label is mistyped (`true`), and the rollout of
    /// the fixed label (`enabled`), a pod of a new ReplicaSet of the
    /// Deployment, named by the new pod template's hash.
    pub fn deployment_reviews(&self) -> (PathBuf, PathBuf) {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/k8s/pod-deployment-http-probes.json");
        let mut review: Value = serde_json::from_slice(&std::fs::read(&fixture).unwrap()).unwrap();
        let metadata = &mut review["request"]["object"]["metadata"];
        metadata["labels"]["trellis.io/inject"] = json!("true");
        let mistyped = self.dir.path().join("mistyped.json");
        std::fs::write(&mistyped, serde_json::to_vec(&review).unwrap()).unwrap();
        let metadata = &mut review["request"]["object"]["metadata"];
        metadata["labels"]["trellis.io/inject"] = json!("enabled");
        metadata["labels"]["pod-template-hash"] = json!("5c8d7e9f4");
        metadata["generateName"] = json!("web-5c8d7e9f4-");
        metadata["ownerReferences"][0]["name"] = json!("web-5c8d7e9f4");
        let fixed = self.dir.path().join("fixed.json");
        std::fs::write(&fixed, serde_json::to_vec(&review).unwrap()).unwrap();
        (mistyped, fixed)
    }

    /// A review of a pod of the run of CronJob `backup` in namespace
    /// `shop` scheduled at `minute` (since the epoch), whose
    /// `trellis.io/inject` label is `inject`, written next to the
    /// certificates as `name`: the recorded review of a Deployment's pod,
    /// with what the Job controller gives a pod instead (the run's Job
    /// `backup-MINUTE` as its controller, the labels naming the Job, its
    /// restart policy, the Job controller as the creator).
    pub fn cronjob_review(&self, name: &str, minute: i64, inject: &str) -> PathBuf {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/k8s/pod-deployment-http-probes.json");
        let mut review: Value = serde_json::from_slice(&std::fs::read(&fixture).unwrap()).unwrap();
        let job = format!("backup-{minute}");
        let uid = "7e1c9a3f-5b2d-4c8e-a6f0-3d9b1e7c5a24";
        review["request"]["userInfo"]["username"] =
            json!("system:serviceaccount:kube-system:job-controller");
        let pod = &mut review["request"]["object"];
        pod["spec"]["restartPolicy"] = json!("OnFailure");
        let metadata = &mut pod["metadata"];
        metadata["generateName"] = json!(format!("{job}-"));
        metadata["labels"] = json!({
            "app.kubernetes.io/name": "backup",
            "batch.kubernetes.io/controller-uid": uid,
            "batch.kubernetes.io/job-name": job,
            "controller-uid": uid,
            "job-name": job,
            "trellis.io/inject": inject,
        });
        metadata["ownerReferences"] = json!([{
            "apiVersion": "batch/v1",
            "kind": "Job",
            "name": job,
            "uid": uid,
            "controller": true,
            "blockOwnerDeletion": true,
        }]);
        let path = self.dir.path().join(name);
        std::fs::write(&path, serde_json::to_vec(&review).unwrap()).unwrap();
        path
    }
}

/// The `webhook=` field of `cp`'s ready line: the webhook port's address,
/// or `off`.
pub fn webhook_addr(cp: &ControlPlane) -> String {
    cp.ready_field("webhook")
}
