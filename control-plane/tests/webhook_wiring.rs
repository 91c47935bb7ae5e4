//! The admission webhooks as the real `trellis-control-plane` binary serves
//! them with `--webhook`: its flags, its port, its settings file, its
//! shutdown.
//!
//! No Kubernetes API server can run on these machines. This test plays its
//! part with curl: it trusts the CA of a serving certificate made here (the
//! `caBundle` of the webhook configurations) and POSTs the real
//! AdmissionReview documents of `fixtures/k8s/` to `/inject` and `/validate`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use base64::Engine as _;
use common::ControlPlane;
use common::webhook::{WebhookCerts, webhook_addr};
use serde_json::{Value, json};

fn fixture_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/k8s")
        .join(name)
}

/// POSTs a fixture to the webhook as the API server would: HTTPS, verified
/// against the CA, by name. Returns the HTTP status and the body.
fn post(addr: &str, certs: &WebhookCerts, path: &str, fixture: &str) -> (u16, String) {
    certs.post(addr, path, &fixture_path(fixture))
}

fn start(extra: &[String]) -> ControlPlane {
    let args: Vec<&str> = extra.iter().map(String::as_str).collect();
    ControlPlane::start(&args)
}

/// The binary serves `/inject` with the settings of `--inject-config`, its own
/// trust domain and its own trust bundle, and `/validate`; SIGTERM stops the
/// webhook with the rest.
#[test]
fn the_binary_serves_the_webhooks_with_its_settings_and_bundle() {
    let certs = WebhookCerts::new();
    let settings = certs.dir.path().join("inject.json");
    std::fs::write(
        &settings,
        r#"{"image": "registry.example/trellis:test", "controlPlane": "cp.example:15012",
            "imagePullSecrets": [{"name": "registry-example"}]}"#,
    )
    .unwrap();
    let mut flags = certs.flags();
    flags.extend([
        "--inject-config".into(),
        settings.display().to_string(),
        "--trust-domain".into(),
        "example.org".into(),
    ]);
    let cp = start(&flags);
    let addr = webhook_addr(&cp);

    let (status, body) = post(&addr, &certs, "/inject", "pod-deployment-http-probes.json");
    assert_eq!(status, 200, "{body}");
    let review: Value = serde_json::from_str(&body).unwrap();
    let response = &review["response"];
    assert_eq!(response["uid"], "5b8e0d52-1c3f-4a8e-9d2b-6f0e7a4c9b11");
    assert_eq!(response["allowed"], true);
    assert_eq!(response["patchType"], "JSONPatch");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().expect("a patch"))
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
    let request: Value = serde_json::from_slice(
        &std::fs::read(fixture_path("pod-deployment-http-probes.json")).unwrap(),
    )
    .unwrap();
    let mut pod = request["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch).unwrap();

    let proxy = pod["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "trellis-proxy")
        .expect("the sidecar was injected");
    assert_eq!(proxy["image"], "registry.example/trellis:test");
    assert_eq!(
        pod["spec"]["imagePullSecrets"],
        json!([{"name": "registry-example"}])
    );
    let env = |name: &str| {
        proxy["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .and_then(|e| e["value"].as_str())
            .unwrap_or_else(|| panic!("no {name} in {proxy}"))
            .to_owned()
    };
    assert!(
        env("TRELLIS_IDENTITY").starts_with("spiffe://example.org/ns/"),
        "the binary's trust domain"
    );
    assert_eq!(env("TRELLIS_CONTROL_PLANE"), "cp.example:15012");
    let bundle = std::fs::read_to_string(cp.state_dir.join("bundle.pem")).unwrap();
    assert_eq!(
        pod["metadata"]["annotations"]["trellis.io/trust-bundle"], bundle,
        "the bundle the control plane serves"
    );

    let (status, body) = post(
        &addr,
        &certs,
        "/validate",
        "authorizationpolicy-invalid-update.json",
    );
    assert_eq!(status, 200, "{body}");
    let review: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(review["response"]["allowed"], false, "{body}");

    // trellisctl pointed at the webhook port (the Service exposes it beside
    // the gRPC port) is told which port to give.
    let out = Command::new(common::CTL)
        .args(["--control-plane", &addr, "--state-dir"])
        .arg(&cp.state_dir)
        .arg("workloads")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("it does not speak gRPC (HTTP/2)")
            && stderr.contains("not its webhook port"),
        "{stderr}"
    );

    let status = cp.stop();
    assert!(status.success(), "{status}");
    let port = addr.rsplit(':').next().unwrap();
    let refused = Command::new("curl")
        .args(["-sS", "--max-time", "5", "--cacert", &certs.path("ca.crt")])
        .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
        .arg(format!("https://localhost:{port}/inject"))
        .output()
        .unwrap();
    assert!(
        !refused.status.success(),
        "the webhook stopped with the rest"
    );
}

/// A Deployment's pods with a mistyped `trellis.io/inject` label, outside
/// an opted-in namespace, are admitted by the warning-only webhook without
/// a sidecar; the ReplicaSet controller that creates them shows the
/// warning to nobody. `trellisctl check` names them: the namespace, the
/// Deployment, the label, its value and the values allowed, and that
/// those created (a later admission step may refuse a pod) run without a
/// sidecar; likewise a pod of a namespace whose label is mistyped.
#[test]
fn check_names_pods_admitted_without_a_sidecar() {
    let certs = WebhookCerts::new();
    let cp = start(&certs.flags());
    let addr = webhook_addr(&cp);
    let (mistyped, _) = certs.deployment_reviews();

    let (check, passed) = {
        let out = cp.ctl(&["check"]);
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            out.status.success(),
        )
    };
    assert!(passed, "{check}");
    assert!(!check.contains("without a sidecar"), "{check}");

    for _ in 0..2 {
        let (status, body) = certs.post(&addr, "/inject/unknown-pod-label", &mistyped);
        assert_eq!(status, 200, "{body}");
    }
    let (status, body) = post(
        &addr,
        &certs,
        "/inject/unknown-namespace-label",
        "pod-unlabelled-namespace.json",
    );
    assert_eq!(status, 200, "{body}");

    let out = cp.ctl(&["check"]);
    let check = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "warnings fail nothing: {check}");
    let warnings: Vec<_> = check
        .lines()
        .filter(|l| l.contains("without a sidecar"))
        .map(|l| {
            // The time of the last admission, from "the last at " to ")".
            let (head, tail) = l.split_once("the last at ").expect("a time");
            let (_, tail) = tail.split_once(')').expect("a time");
            format!("{head}the last at T){tail}")
        })
        .collect();
    assert_eq!(
        warnings,
        [
            "warn  namespace legacy: the webhook let pod debug through without a sidecar (1 \
             pod, the last at T): the namespace's label trellis.io/inject is neither \
             \"enabled\" nor \"disabled\" (the webhook cannot read its value: kubectl get \
             namespace legacy --show-labels); if it was created, it runs outside the mesh",
            "warn  namespace shop: the webhook let the pods of Deployment web through without a \
             sidecar (2 pods, the last at T): their label trellis.io/inject is \"true\", neither \
             \"enabled\" nor \"disabled\"; those created run outside the mesh",
        ],
        "{check}"
    );
}

/// The label of the Deployment whose pods the warning-only webhook let
/// through without a sidecar is fixed, and the Deployment rolls out: its
/// new ReplicaSet's pods are injected, and `trellisctl check` no longer
/// warns of the Deployment; it still warns of another owner's pods. A
/// server-side dry run of an injected pod changes nothing.
#[test]
fn check_forgets_a_deployment_once_its_pods_are_injected() {
    let certs = WebhookCerts::new();
    let cp = start(&certs.flags());
    let addr = webhook_addr(&cp);
    let (mistyped, fixed) = certs.deployment_reviews();
    let mut review: Value = serde_json::from_slice(&std::fs::read(&fixed).unwrap()).unwrap();
    review["request"]["dryRun"] = json!(true);
    let dry_run = certs.dir.path().join("fixed-dry-run.json");
    std::fs::write(&dry_run, serde_json::to_vec(&review).unwrap()).unwrap();

    let (status, body) = certs.post(&addr, "/inject/unknown-pod-label", &mistyped);
    assert_eq!(status, 200, "{body}");
    let (status, body) = post(
        &addr,
        &certs,
        "/inject/unknown-namespace-label",
        "pod-unlabelled-namespace.json",
    );
    assert_eq!(status, 200, "{body}");
    let warned = |check: &str| -> Vec<String> {
        check
            .lines()
            .filter(|l| l.contains("without a sidecar"))
            .map(|l| l.split(" through ").next().unwrap().to_owned())
            .collect()
    };
    let web = "warn  namespace shop: the webhook let the pods of Deployment web";
    let debug = "warn  namespace legacy: the webhook let pod debug";
    for (path, review) in [("/inject", &dry_run), ("/inject", &fixed)] {
        let check = cp.ctl(&["check"]);
        let check = String::from_utf8_lossy(&check.stdout);
        assert_eq!(warned(&check), [debug, web], "{check}");
        let (status, body) = certs.post(&addr, path, review);
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"patch\""), "injected: {body}");
    }
    let out = cp.ctl(&["check"]);
    let check = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{check}");
    assert_eq!(warned(&check), [debug], "{check}");
}

/// A pod that has the sidecar when it is reviewed (created again from a
/// running pod's manifest, or injected by hand) gets no patch, but runs
/// in the mesh: `trellisctl check` no longer warns of its Deployment's
/// pods let through without a sidecar before.
#[test]
fn check_forgets_a_deployment_once_a_pod_with_the_sidecar_is_created() {
    let certs = WebhookCerts::new();
    let cp = start(&certs.flags());
    let addr = webhook_addr(&cp);
    let (mistyped, _) = certs.deployment_reviews();
    let (status, body) = certs.post(&addr, "/inject/unknown-pod-label", &mistyped);
    assert_eq!(status, 200, "{body}");
    let web = "the webhook let the pods of Deployment web through without a sidecar";
    let check = cp.ctl(&["check"]);
    let check = String::from_utf8_lossy(&check.stdout);
    assert!(check.contains(web), "{check}");

    let (status, body) = post(&addr, &certs, "/inject", "pod-already-injected.json");
    assert_eq!(status, 200, "{body}");
    assert!(!body.contains("\"patch\""), "injected before: {body}");
    let out = cp.ctl(&["check"]);
    let check = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{check}");
    assert!(!check.contains("without a sidecar"), "{check}");
}

/// A CronJob's pods are created by the Job controller, for a Job of each
/// run named after the CronJob and the run's scheduled minute since the
/// epoch. The pods of a run let through without a sidecar are warned of
/// as the CronJob's; once the label is fixed, a later run's pods are
/// injected, and `trellisctl check` no longer warns of the CronJob.
#[test]
fn check_forgets_a_cronjob_once_a_later_runs_pods_are_injected() {
    let certs = WebhookCerts::new();
    let cp = start(&certs.flags());
    let addr = webhook_addr(&cp);
    let minute = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        / 60;
    let mistyped = certs.cronjob_review("mistyped-run.json", minute - 60, "true");
    let fixed = certs.cronjob_review("fixed-run.json", minute, "enabled");

    let (status, body) = certs.post(&addr, "/inject/unknown-pod-label", &mistyped);
    assert_eq!(status, 200, "{body}");
    let warned = |check: &str| -> Vec<String> {
        check
            .lines()
            .filter(|l| l.contains("without a sidecar"))
            .map(|l| l.split(" (").next().unwrap().to_owned())
            .collect()
    };
    let check = cp.ctl(&["check"]);
    let check = String::from_utf8_lossy(&check.stdout);
    assert_eq!(
        warned(&check),
        [
            "warn  namespace shop: the webhook let the pods of CronJob backup through without a \
             sidecar"
        ],
        "{check}"
    );

    let (status, body) = certs.post(&addr, "/inject", &fixed);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"patch\""), "injected: {body}");
    let out = cp.ctl(&["check"]);
    let check = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{check}");
    assert_eq!(warned(&check), Vec::<String>::new(), "{check}");
}

/// `curl http://` at the webhook port, the usual slip while debugging an
/// injection, is told in HTTP that the port speaks only HTTPS, and what to
/// use instead, rather than sent a TLS alert curl cannot read; the
/// failure is counted as `not_tls` all the same.
#[test]
fn plaintext_http_is_told_the_webhook_port_speaks_https() {
    let certs = WebhookCerts::new();
    let cp = start(&certs.flags());
    let addr = webhook_addr(&cp);
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-w", "%{http_code}"])
        .arg(format!("http://{addr}/inject"))
        .output()
        .expect("curl runs");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "this is the Trellis control plane's admission webhook port: it speaks only HTTPS, for \
         the Kubernetes API server's calls to /inject and /validate (use https://, trusting the \
         CA in the webhook configurations' caBundle, as the API server does)\n400",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metrics = cp.metrics();
    assert!(
        metrics.contains("trellis_webhook_tls_handshake_failures_total{reason=\"not_tls\"} 1\n"),
        "{metrics}"
    );
    // An HTTPS call goes on as before.
    let (status, body) = post(&addr, &certs, "/inject", "pod-deployment-http-probes.json");
    assert_eq!(status, 200, "{body}");
}

/// `kubectl apply` in `team-a` of a policy selecting a workload of
/// `payments` is denied: whoever may write policies in one namespace must
/// not govern another's workloads. The same document is admitted when
/// `team-a` is the root namespace (`--root-namespace`), whose policies may
/// select any workload. Stand-in for a recorded
/// AdmissionReview (see `fixtures/k8s/README.md`).
#[test]
fn a_policy_selecting_another_namespace_is_denied_outside_the_root_namespace() {
    const FIXTURE: &str = "authorizationpolicy-other-namespace.json";
    let certs = WebhookCerts::new();
    let mut flags = certs.flags();
    flags.extend(["--root-namespace".into(), "mesh-admin".into()]);
    let cp = start(&flags);
    let (status, body) = post(&webhook_addr(&cp), &certs, "/validate", FIXTURE);
    assert_eq!(status, 200, "{body}");
    let review: Value = serde_json::from_str(&body).unwrap();
    let response = &review["response"];
    assert_eq!(response["uid"], "4c2f8a61-93d7-4b0e-a5f2-1e7d3c9b6a08");
    assert_eq!(response["allowed"], false, "{body}");
    assert_eq!(response["status"]["code"], 403, "{body}");
    assert_eq!(
        response["status"]["message"],
        "AuthorizationPolicy team-a/web-to-payments-db is invalid: spec.selector.spiffeIds[0]: \
         \"spiffe://cluster.local/ns/payments/sa/db\" selects workloads outside the policy's \
         namespace \"team-a\": narrow it to \"spiffe://cluster.local/ns/team-a/...\" or move \
         the policy to the root namespace \"mesh-admin\""
    );
    drop(cp);

    // In the root namespace.
    let mut flags = certs.flags();
    flags.extend(["--root-namespace".into(), "team-a".into()]);
    let cp = start(&flags);
    let (status, body) = post(&webhook_addr(&cp), &certs, "/validate", FIXTURE);
    assert_eq!(status, 200, "{body}");
    let review: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(review["response"]["allowed"], true, "{body}");
}

/// The binary's `--outbound-policy` reaches `/inject`: under `deny` (the
/// default) a pod with a container running as the sidecar's UID is refused
/// naming it, since that container would reach what the mesh refuses;
/// under `passthrough` it is injected with a warning. The fixture's pod
/// with the pod's `runAsUser` set to 1337, which its container
/// `log-shipper` inherits.
#[test]
fn the_outbound_policy_decides_a_pod_running_as_the_sidecars_uid() {
    let certs = WebhookCerts::new();
    let mut review: Value = serde_json::from_slice(
        &std::fs::read(fixture_path("pod-deployment-http-probes.json")).unwrap(),
    )
    .unwrap();
    review["request"]["object"]["spec"]["securityContext"]["runAsUser"] = json!(1337);
    let pod = certs.dir.path().join("pod-as-proxy-uid.json");
    std::fs::write(&pod, serde_json::to_vec(&review).unwrap()).unwrap();

    let cp = start(&certs.flags());
    let (status, body) = certs.post(&webhook_addr(&cp), "/inject", &pod);
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["response"]["allowed"], false, "{body}");
    let message = answer["response"]["status"]["message"].as_str().unwrap();
    assert!(
        message.starts_with(
            "trellis: cannot inject: container \"log-shipper\" runs as UID 1337 (the pod's \
             securityContext.runAsUser), the sidecar's UID"
        ),
        "{message}"
    );
    assert!(message.ends_with("(injection.proxy.uid)"), "{message}");
    // Reinvoked on a pod that carries its sidecar, moving the sidecar with
    // injection.proxy.uid would not help: the refusal says what does.
    let mut injected: Value =
        serde_json::from_slice(&std::fs::read(fixture_path("pod-already-injected.json")).unwrap())
            .unwrap();
    injected["request"]["object"]["spec"]["securityContext"]["runAsUser"] = json!(1337);
    let injected_pod = certs.dir.path().join("injected-as-proxy-uid.json");
    std::fs::write(&injected_pod, serde_json::to_vec(&injected).unwrap()).unwrap();
    let (status, body) = certs.post(&webhook_addr(&cp), "/inject", &injected_pod);
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["response"]["allowed"], false, "{body}");
    let message = answer["response"]["status"]["message"].as_str().unwrap();
    assert!(
        message.ends_with(
            "(the pod's securityContext.runAsUser), the sidecar's UID, whose traffic is never \
             intercepted: under the outbound policy deny it would reach destinations the mesh \
             refuses; run it as another UID: the pod carries its sidecar already, which runs \
             as 1337 whatever injection.proxy.uid says now"
        ),
        "{message}"
    );
    drop(cp);

    let mut flags = certs.flags();
    flags.extend(["--outbound-policy".into(), "passthrough".into()]);
    let cp = start(&flags);
    let (status, body) = certs.post(&webhook_addr(&cp), "/inject", &pod);
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["response"]["allowed"], true, "{body}");
    assert_eq!(answer["response"]["patchType"], "JSONPatch", "{body}");
    assert_eq!(
        answer["response"]["warnings"],
        json!([
            "container \"log-shipper\" runs as UID 1337, the proxy's UID: its traffic bypasses \
             the sidecar",
            "container \"wait-for-db\" runs as UID 1337, the proxy's UID: its traffic bypasses \
             the sidecar"
        ])
    );
}

/// The admission review's warnings are one plain string in a JSON log
/// line, not a debug-printed list quoting each inside it; as each holds
/// commas, they are separated by `; `.
#[test]
fn the_admission_review_logs_its_warnings_as_a_plain_string() {
    let certs = WebhookCerts::new();
    let mut review: Value = serde_json::from_slice(
        &std::fs::read(fixture_path("pod-deployment-http-probes.json")).unwrap(),
    )
    .unwrap();
    review["request"]["object"]["spec"]["securityContext"]["runAsUser"] = json!(1337);
    let pod = certs.dir.path().join("pod-as-proxy-uid.json");
    std::fs::write(&pod, serde_json::to_vec(&review).unwrap()).unwrap();

    let mut flags = certs.flags();
    flags.extend(["--outbound-policy", "passthrough", "--log-format", "json"].map(String::from));
    let cp = start(&flags);
    let (status, body) = certs.post(&webhook_addr(&cp), "/inject", &pod);
    assert_eq!(status, 200, "{body}");
    let line = cp.wait_for_line("the admission review's log line", |l| {
        l.contains("\"admission review\"")
    });
    let line: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        line["warnings"],
        "container \"log-shipper\" runs as UID 1337, the proxy's UID: its traffic bypasses \
         the sidecar; container \"wait-for-db\" runs as UID 1337, the proxy's UID: its traffic \
         bypasses the sidecar",
        "{line}"
    );
}

/// Settings written by a newer chart (a field this release does not know)
/// are what a rolled-back control plane reads from the shared ConfigMap:
/// it starts, names the field in a warning, and injects with the rest.
#[test]
fn settings_of_a_newer_release_are_read_with_a_warning() {
    let certs = WebhookCerts::new();
    let settings = certs.dir.path().join("inject.json");
    std::fs::write(
        &settings,
        r#"{"image": "registry.example/trellis:test", "sidecarFlavour": "new"}"#,
    )
    .unwrap();
    let mut flags = certs.flags();
    flags.extend(["--inject-config".into(), settings.display().to_string()]);
    let cp = start(&flags);
    let warning = cp.wait_for_line("the unknown field's warning", |l| {
        l.contains("ignoring fields this release does not know")
    });
    assert!(warning.contains("sidecarFlavour"), "{warning}");
    let (status, body) = post(
        &webhook_addr(&cp),
        &certs,
        "/inject",
        "pod-deployment-http-probes.json",
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"allowed\":true"), "{body}");
}

/// Without `--webhook` nothing listens for it and the ready line says so.
#[test]
fn the_webhook_is_off_unless_asked_for() {
    let cp = ControlPlane::start(&[]);
    assert_eq!(webhook_addr(&cp), "off");
}

fn run(args: &[&str]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    Command::new(common::CP)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .args(args)
        .env_remove("TRELLIS_LOG")
        .output()
        .unwrap()
}

/// Invalid webhook flags exit 64 naming the flag, before any port is bound.
#[test]
fn invalid_webhook_flags_exit_64() {
    let certs = WebhookCerts::new();
    let (cert, key) = (certs.path("tls.crt"), certs.path("tls.key"));
    let bad_value = certs.dir.path().join("bad.json");
    std::fs::write(&bad_value, r#"{"tokenExpirationSeconds": 60}"#).unwrap();
    let bad_value = bad_value.display().to_string();
    let bad_secret = certs.dir.path().join("bad-secret.json");
    std::fs::write(
        &bad_secret,
        r#"{"imagePullSecrets": [{"name": "Registry_Creds"}]}"#,
    )
    .unwrap();
    let bad_secret = bad_secret.display().to_string();
    let bad_limit = certs.dir.path().join("bad-limit.json");
    std::fs::write(&bad_limit, r#"{"maxH2ConnectionsPerPeer": 0}"#).unwrap();
    let bad_limit = bad_limit.display().to_string();
    let full = [
        "--webhook",
        "127.0.0.1:0",
        "--webhook-cert",
        &cert,
        "--webhook-key",
        &key,
    ];
    let with = |extra: &[&'static str]| -> Vec<String> {
        full.iter()
            .map(|s| s.to_string())
            .chain(extra.iter().map(|s| s.to_string()))
            .collect()
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--webhook".into(), "127.0.0.1:0".into()],
            "--webhook-cert",
        ),
        (
            vec![
                "--webhook".into(),
                "127.0.0.1:0".into(),
                "--webhook-cert".into(),
                cert.clone(),
            ],
            "--webhook-key",
        ),
        (vec!["--webhook-cert".into(), cert.clone()], "--webhook"),
        (vec!["--webhook-key".into(), key.clone()], "--webhook"),
        (
            vec!["--inject-config".into(), bad_value.clone()],
            "--webhook",
        ),
        (vec!["--webhook".into(), "localhost".into()], "--webhook"),
        (
            [with(&["--inject-config"]), vec![bad_value.clone()]].concat(),
            "tokenExpirationSeconds",
        ),
        (
            with(&["--inject-config", "/nonexistent/inject.json"]),
            "/nonexistent/inject.json",
        ),
        (
            [with(&["--inject-config"]), vec![bad_secret.clone()]].concat(),
            "imagePullSecrets: \"Registry_Creds\" is not a Secret name",
        ),
        (
            [with(&["--inject-config"]), vec![bad_limit.clone()]].concat(),
            "maxH2ConnectionsPerPeer: 0 is not a number of connections from 1 to 1024",
        ),
    ];
    for (args, expect) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(
            stderr.contains(expect),
            "{args:?} should name {expect}: {stderr}"
        );
    }
}

/// Serving files that cannot be used are configuration: they exit 64
/// naming the flag and the file, before the state dir is made (no CA,
/// operator credential or database left behind): a certificate or key
/// that is missing, a certificate that is not one, a key of another
/// certificate.
#[test]
fn unusable_webhook_files_exit_64_naming_the_flag_and_touch_nothing() {
    let certs = WebhookCerts::new();
    let (cert, key) = (certs.path("tls.crt"), certs.path("tls.key"));
    let other_key = certs.path("other.key");
    std::fs::write(&other_key, common::p256().serialize_pem()).unwrap();
    let not_pem = certs.path("not.pem");
    std::fs::write(&not_pem, "not a certificate\n").unwrap();
    let missing = "/nonexistent/tls.pem";
    let state = certs.dir.path().join("state");
    for (cert, key, names) in [
        (missing, key.as_str(), format!("--webhook-cert {missing}: ")),
        (cert.as_str(), missing, format!("--webhook-key {missing}: ")),
        (
            not_pem.as_str(),
            key.as_str(),
            format!("--webhook-cert {not_pem}: no certificate in the file"),
        ),
        (
            cert.as_str(),
            other_key.as_str(),
            format!("--webhook-key {other_key}: does not match {cert}"),
        ),
    ] {
        let args = [
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--webhook",
            "127.0.0.1:0",
            "--webhook-cert",
            cert,
            "--webhook-key",
            key,
        ];
        common::assert_refused_touching_nothing(&state, &args, 64, &names);
    }
}

/// A webhook port in use fails the start (exit 1) naming the address.
#[test]
fn webhook_start_up_failures_name_the_cause() {
    let certs = WebhookCerts::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let flags = certs.flags();
    let mut args: Vec<&str> = flags.iter().map(String::as_str).collect();
    args[1] = &addr;
    let out = run(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&addr), "{stderr}");
    assert!(stderr.contains("webhook"), "{stderr}");
}

/// A request head the webhook port refuses is answered in words over
/// TLS: a header line without a colon 400 (sent as written by `openssl
/// s_client`), a target too long for curl's request 414, each naming what
/// was wrong, and the connection closed; a malformed head later on a
/// kept-alive connection the same, and one begun and not finished within
/// the head timeout 408 in words. Each is counted by its kind, and
/// logged as a warning naming the client, never a header's value. A
/// method a review path does not take gets 405 with `Allow: POST`.
#[test]
fn the_webhook_port_answers_a_malformed_head_in_words() {
    use std::io::Write as _;
    use std::process::Stdio;
    use trellis_control_plane::inject::server::MALFORMED;
    let certs = WebhookCerts::new();
    let cp = start(&certs.flags());
    let addr = webhook_addr(&cp);
    let port = addr.rsplit(':').next().unwrap();

    // What `openssl s_client` reads back for `sent`, up to the close.
    let s_client = |sent: &[u8]| {
        let mut s_client = Command::new("openssl")
            .args(["s_client", "-quiet", "-verify_return_error"])
            .args(["-connect", &addr, "-servername", "localhost"])
            .args(["-CAfile", &certs.path("ca.crt")])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("openssl runs");
        s_client.stdin.take().unwrap().write_all(sent).unwrap();
        let out = s_client.wait_with_output().unwrap();
        let answer = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            answer.starts_with("HTTP/1.1 "),
            "{answer}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        answer
    };
    let no_colon = "\r\nconnection: close\r\n\r\nmalformed header line: not a field name and a \
                    colon (a line without a colon, or a space before it)\n";
    let answer = s_client(
        b"POST /inject HTTP/1.1\r\nhost: localhost\r\nx-review: review-secret-91c2\r\n\
          no colon here\r\n\r\n",
    );
    assert!(
        answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{answer}"
    );
    assert!(answer.ends_with(no_colon), "{answer}");

    // Later on a kept-alive connection, the same answer: for a malformed
    // head, and 408 for one begun and not finished in time.
    let answer = s_client(
        b"GET /inject HTTP/1.1\r\nhost: localhost\r\n\r\n\
          POST /inject HTTP/1.1\r\nhost: localhost\r\nno colon here\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 405 "), "{answer}");
    assert!(
        answer.contains("\nHTTP/1.1 400 Bad Request\r\n"),
        "{answer}"
    );
    assert!(answer.ends_with(no_colon), "{answer}");
    let answer = s_client(b"GET /inject HTTP/1.1\r\nhost: localhost\r\n\r\nPOST /inj");
    assert!(answer.starts_with("HTTP/1.1 405 "), "{answer}");
    assert!(
        answer.ends_with(
            "\nHTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n\
             content-length: 39\r\nconnection: close\r\n\r\n\
             request head did not arrive within 5 s\n"
        ),
        "{answer}"
    );

    let curl = |args: &[&str], target: &str| {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "10"])
            .args(["--cacert", &certs.path("ca.crt")])
            .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
            .args(args)
            .arg(format!("https://localhost:{port}{target}"))
            .output()
            .expect("curl runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let long = format!("/inject?{}", "a".repeat(70_000));
    assert_eq!(
        curl(&["-w", "\n%{http_code}"], &long),
        "request target exceeds the limit of 65534 bytes\n\n414"
    );

    let answer = curl(&["-i"], "/inject");
    assert!(answer.starts_with("HTTP/1.1 405 "), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("\r\nallow: post\r\n"),
        "{answer}"
    );

    let metrics = cp.metrics();
    for counted in ["malformed\"} 3\n", "target_too_long\"} 1\n"] {
        let counted = format!("trellis_webhook_malformed_requests_total{{reason=\"{counted}");
        assert!(metrics.contains(&counted), "{counted}in\n{metrics}");
    }
    let line = cp.wait_for_line("the refused head logged", |l| {
        l.contains(MALFORMED) && l.contains("answered 400")
    });
    assert!(
        line.contains("WARN") && line.contains("peer=127.0.0.1:"),
        "{line}"
    );
    assert!(!cp.log().contains("review-secret-91c2"), "{}", cp.log());
}

/// A TLS client trusting the CA of `certs`, as the API server does.
fn client_config(certs: &WebhookCerts) -> rustls::ClientConfig {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let ca = rustls_pki_types::CertificateDer::from_pem_file(certs.path("ca.crt")).unwrap();
    roots.add(ca).unwrap();
    rustls::ClientConfig::builder_with_provider(trellis_core::tls::provider())
        .with_protocol_versions(trellis_core::tls::PROTOCOL_VERSIONS)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// A TLS connection to the webhook at `addr`, trusting the CA of `certs`
/// as the API server does.
async fn connect_tls(
    certs: &WebhookCerts,
    addr: std::net::SocketAddr,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(client_config(certs)))
        .connect(name, tcp)
        .await
        .expect("the TLS handshake with the webhook")
}

/// The answer read from `io`: its status, its head, and its body of the
/// `content-length` the head gives (the connection may stay open after
/// it); `None` when the connection ended before the answer was whole.
async fn read_answer<S>(io: &mut S) -> Option<(u16, String, Vec<u8>)>
where
    S: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;
    let mut read = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(at) = read.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        match io.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => read.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&read[..end]).into_owned();
    let status = head.split(' ').nth(1)?.parse().ok()?;
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .expect("the answer gives its content-length");
    while read.len() < end + length {
        match io.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => read.extend_from_slice(&chunk[..n]),
        }
    }
    Some((status, head, read[end..end + length].to_vec()))
}

/// A control plane serving the webhook, its certificates and the
/// webhook's address.
fn start_webhook() -> (WebhookCerts, ControlPlane, std::net::SocketAddr) {
    let certs = WebhookCerts::new();
    let cp = start(&certs.flags());
    let addr = webhook_addr(&cp).parse().unwrap();
    (certs, cp, addr)
}

/// The review of a pod, and the head of its POST to `/inject`.
fn review_post() -> (String, Vec<u8>) {
    let review = std::fs::read(fixture_path("pod-deployment-http-probes.json")).unwrap();
    let head = format!(
        "POST /inject HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n",
        review.len()
    );
    (head, review)
}

/// A control plane sent SIGTERM, stopping on a task, and its log.
struct Stopping {
    log: std::sync::Arc<std::sync::Mutex<String>>,
    exit: tokio::task::JoinHandle<std::process::ExitStatus>,
}

impl Stopping {
    fn sigterm(cp: ControlPlane) -> Self {
        Self {
            log: cp.log.clone(),
            exit: tokio::spawn(cp.stop_async()),
        }
    }

    /// Waits until the log says the ports stopped accepting.
    async fn until_not_accepting(&self) {
        common::eventually_async("the ports to stop accepting", || {
            let stopped = self.log.lock().unwrap().contains("no new connections");
            async move { stopped.then_some(()) }
        })
        .await;
    }

    /// Waits for the exit: 0, no connection left open at the drain
    /// deadline.
    async fn exits_cleanly(self) {
        let status = self.exit.await.unwrap();
        assert!(status.success(), "SIGTERM exits 0: {status}");
        let log = self.log.lock().unwrap().clone();
        assert!(!log.contains("still open at the drain deadline"), "{log}");
    }
}

/// A review in flight when SIGTERM comes is answered in full before the
/// control plane exits 0: during a rollout, a pod's creation under
/// `failurePolicy: Fail` is not refused because the replica it reached
/// stopped. The review is held by its client, as a slow API server would
/// hold it: its head (read by the port: it is told to continue) and half
/// its body are sent before the signal, the rest a second after the port
/// stopped accepting (well within the 5 s a body has). Connections idle at the signal do not hold the exit: one
/// kept alive after a first review, and one that sent nothing, are closed
/// at once, not at their 5 s head timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_review_in_flight_at_sigterm_is_answered_and_idle_connections_do_not_hold_the_exit() {
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let (certs, cp, addr) = start_webhook();
    let (head, review) = review_post();

    let mut idle = connect_tls(&certs, addr).await;
    idle.write_all(head.as_bytes()).await.unwrap();
    idle.write_all(&review).await.unwrap();
    let (status, answer_head, _) = read_answer(&mut idle).await.expect("a first answer");
    assert_eq!(status, 200, "{answer_head}");
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    // Its head asks to continue, so that the port has read it when the
    // signal comes.
    let mut held = connect_tls(&certs, addr).await;
    let (first, rest) = review.split_at(review.len() / 2);
    let asking = head.replace("\r\n\r\n", "\r\nexpect: 100-continue\r\n\r\n");
    held.write_all(asking.as_bytes()).await.unwrap();
    let mut continued = Vec::new();
    while !continued.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(held.read(&mut byte).await.unwrap(), 1, "{continued:?}");
        continued.push(byte[0]);
    }
    assert!(continued.starts_with(b"HTTP/1.1 100 "), "{continued:?}");
    held.write_all(first).await.unwrap();
    held.flush().await.unwrap();

    let stopping = Stopping::sigterm(cp);
    stopping.until_not_accepting().await;
    let patience = Duration::from_secs(2);
    assert!(
        common::connections::closed_within(&mut silent, patience)
            .await
            .is_some(),
        "a connection that sent nothing was still open {patience:?} after the port stopped"
    );
    let mut buf = [0u8; 64];
    match tokio::time::timeout(patience, idle.read(&mut buf)).await {
        Ok(Ok(0) | Err(_)) => {}
        Ok(Ok(n)) => panic!("the idle connection got {n} bytes unasked"),
        Err(_) => panic!(
            "an idle kept-alive connection was still open {patience:?} after the port stopped"
        ),
    }

    tokio::time::sleep(Duration::from_secs(1)).await;
    held.write_all(rest)
        .await
        .expect("the connection of the review in flight is still open after SIGTERM");
    held.flush().await.unwrap();
    let (status, answer_head, body) =
        tokio::time::timeout(Duration::from_secs(10), read_answer(&mut held))
            .await
            .expect("the review in flight was answered in time")
            .expect("the review in flight at SIGTERM was answered in full");
    let answered = Instant::now();
    assert_eq!(status, 200, "{answer_head}");
    assert!(
        answer_head
            .to_ascii_lowercase()
            .contains("connection: close"),
        "the answer says the connection closes: {answer_head}"
    );
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        answer["response"]["uid"],
        "5b8e0d52-1c3f-4a8e-9d2b-6f0e7a4c9b11"
    );
    assert_eq!(answer["response"]["allowed"], true);
    assert!(answer["response"]["patch"].is_string(), "{answer}");

    stopping.exits_cleanly().await;
    assert!(
        answered.elapsed() < patience,
        "the exit came {:?} after the last answer: it waited for something else",
        answered.elapsed()
    );
}

/// A review the API server sent before SIGTERM, and the port had not yet
/// read, is answered in full, as its last request on the connection, and
/// the control plane exits 0: the API server opens a connection and sends
/// its review at once, so a stop between the handshake and the read of the
/// head would otherwise cut a review already sent. Deterministically: a
/// connection whose first bytes of the head came before the signal (read
/// by the port or still waiting, either way not a whole head) sends the
/// rest only once the port has stopped accepting; another writes its whole
/// review just before the signal. A connection handshaken before the
/// signal that sent nothing is closed at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_review_begun_before_sigterm_and_not_yet_read_is_answered() {
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let (certs, cp, addr) = start_webhook();
    let (head, review) = review_post();

    let mut handshaken = connect_tls(&certs, addr).await;
    let mut begun = connect_tls(&certs, addr).await;
    let (started, rest) = head.as_bytes().split_at(4);
    begun.write_all(started).await.unwrap();
    begun.flush().await.unwrap();
    let mut whole = connect_tls(&certs, addr).await;
    whole.write_all(head.as_bytes()).await.unwrap();
    whole.write_all(&review).await.unwrap();
    whole.flush().await.unwrap();

    let stopping = Stopping::sigterm(cp);
    stopping.until_not_accepting().await;
    let patience = Duration::from_secs(2);
    let mut buf = [0u8; 64];
    match tokio::time::timeout(patience, handshaken.read(&mut buf)).await {
        Ok(Ok(0) | Err(_)) => {}
        Ok(Ok(n)) => panic!("the handshaken connection got {n} bytes unasked"),
        Err(_) => panic!(
            "a connection handshaken before the stop that sent nothing was still open \
             {patience:?} after the port stopped"
        ),
    }

    begun
        .write_all(rest)
        .await
        .expect("the connection whose head had begun is still open after SIGTERM");
    begun.write_all(&review).await.unwrap();
    begun.flush().await.unwrap();
    for (what, io) in [("begun", &mut begun), ("whole", &mut whole)] {
        let (status, answer_head, body) =
            tokio::time::timeout(Duration::from_secs(10), read_answer(io))
                .await
                .unwrap_or_else(|_| panic!("the {what} review was not answered in time"))
                .unwrap_or_else(|| {
                    panic!(
                        "the {what} review, sent before SIGTERM, was cut unanswered: {}",
                        stopping.log.lock().unwrap()
                    )
                });
        assert_eq!(status, 200, "{what}: {answer_head}");
        // The whole review may have been read, and answered, before the
        // stop: only the begun one is sure to be answered after it.
        assert!(
            what == "whole"
                || answer_head
                    .to_ascii_lowercase()
                    .contains("connection: close"),
            "{what}: the answer says the connection closes: {answer_head}"
        );
        let answer: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            answer["response"]["uid"],
            "5b8e0d52-1c3f-4a8e-9d2b-6f0e7a4c9b11"
        );
        assert!(answer["response"]["patch"].is_string(), "{what}: {answer}");
        match tokio::time::timeout(patience, io.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => {}
            Ok(Ok(n)) => panic!("{what}: {n} bytes after the last answer"),
            Err(_) => panic!("{what}: the connection stayed open after its last answer"),
        }
    }

    stopping.exits_cleanly().await;
}

/// A TCP stream whose writes after its first are held until `open`
/// turns true: a TLS client sends its ClientHello, and is held before its
/// Finished.
struct HeldWrites {
    tcp: tokio::net::TcpStream,
    writes: usize,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl tokio::io::AsyncRead for HeldWrites {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for HeldWrites {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.writes > 0 && !self.open.load(std::sync::atomic::Ordering::Acquire) {
            // Looked at again shortly: the test opens it once the port
            // has stopped.
            let waker = cx.waker().clone();
            tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                waker.wake();
            });
            return std::task::Poll::Pending;
        }
        self.writes += 1;
        std::pin::Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// A TLS handshake begun before SIGTERM (the ClientHello sent, the
/// client's Finished held) is finished after the port stopped accepting,
/// and the review its client then sends is answered, as the connection's
/// last: the API server sends its review right behind its Finished. A
/// TCP connection that sent nothing is closed at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_begun_before_sigterm_is_finished_and_its_review_answered() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    let (certs, cp, addr) = start_webhook();
    let (head, review) = review_post();

    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let open = Arc::new(AtomicBool::new(false));
    let held = HeldWrites {
        tcp: tokio::net::TcpStream::connect(addr).await.unwrap(),
        writes: 0,
        open: open.clone(),
    };
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let handshake = tokio::spawn(
        tokio_rustls::TlsConnector::from(Arc::new(client_config(&certs))).connect(name, held),
    );
    // The ClientHello is sent and answered; the Finished is held.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!handshake.is_finished(), "the handshake was not held");

    let stopping = Stopping::sigterm(cp);
    common::eventually_async("the webhook port to stop accepting", || async move {
        tokio::net::TcpStream::connect(addr)
            .await
            .is_err()
            .then_some(())
    })
    .await;
    let patience = Duration::from_secs(2);
    assert!(
        common::connections::closed_within(&mut silent, patience)
            .await
            .is_some(),
        "a connection that sent nothing was still open {patience:?} after the port stopped"
    );

    open.store(true, Ordering::Release);
    let mut tls = handshake
        .await
        .unwrap()
        .expect("a handshake begun before SIGTERM is finished after it");
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.write_all(&review).await.unwrap();
    tls.flush().await.unwrap();
    let (status, answer_head, body) =
        tokio::time::timeout(Duration::from_secs(10), read_answer(&mut tls))
            .await
            .expect("the review was answered in time")
            .unwrap_or_else(|| {
                panic!(
                    "the review of a handshake begun before SIGTERM was cut: {}",
                    stopping.log.lock().unwrap()
                )
            });
    assert_eq!(status, 200, "{answer_head}");
    assert!(
        answer_head
            .to_ascii_lowercase()
            .contains("connection: close"),
        "the answer says the connection closes: {answer_head}"
    );
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert!(answer["response"]["patch"].is_string(), "{answer}");

    stopping.exits_cleanly().await;
}

/// Sends `signal` (a name `kill` knows: `STOP`, `CONT`) to process `pid`.
fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

/// Connections still queued in the webhook port's listener when SIGTERM
/// comes (connected, their ClientHello sent, not yet accepted) are taken
/// rather than reset with the listener: each handshake is finished and the
/// review its client then sends answered, as the connection's last, and
/// the control plane exits 0. The process is held (SIGSTOP) while the
/// clients connect and send their ClientHello, and sent SIGTERM before it
/// goes on (SIGCONT), so that the stop meets the connections in the
/// listener's queue, or just taken from it and not yet read. A connection
/// queued with nothing sent is closed at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_queued_at_sigterm_are_handshaken_and_answered() {
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    // From two addresses, within the port's limits (64 from one address,
    // 128 in all, an address holding fewer taking the slots of one holding
    // more).
    const QUEUED: usize = 120;
    const AHEAD: usize = 600;
    let (certs, cp, addr) = start_webhook();
    let (head, review) = review_post();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(&certs)));
    let pid = cp.pid();

    signal(pid, "STOP");
    // First in the queue, connections from an address past its cap, which
    // the port closes one by one as it takes them: the stop reaches it
    // before it has taken the clients queued behind them.
    let mut ahead = Vec::new();
    for _ in 0..AHEAD {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket
            .bind(std::net::SocketAddr::from(([127, 0, 0, 3], 0)))
            .unwrap();
        ahead.push(socket.connect(addr).await.unwrap());
    }
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut clients = Vec::new();
    for i in 0..QUEUED {
        // Connected while the process is held: in the listener's queue.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket
            .bind(std::net::SocketAddr::from((
                [127, 0, 0, 1 + (i % 2) as u8],
                0,
            )))
            .unwrap();
        let tcp = socket.connect(addr).await.unwrap();
        let connector = connector.clone();
        let (head, review) = (head.clone(), review.clone());
        clients.push(tokio::spawn(async move {
            let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
            let mut tls = connector
                .connect(name, tcp)
                .await
                .map_err(|e| format!("its handshake failed: {e}"))?;
            tls.write_all(head.as_bytes()).await.unwrap();
            tls.write_all(&review).await.unwrap();
            tls.flush().await.unwrap();
            tokio::time::timeout(Duration::from_secs(10), read_answer(&mut tls))
                .await
                .map_err(|_| "its review was not answered in time".to_owned())?
                .ok_or_else(|| "its review was cut unanswered".to_owned())
        }));
    }
    // Every ClientHello is in the port's socket before the signal.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopping = Stopping::sigterm(cp);
    // The signal is sent (pending while the process is held), then the
    // process goes on.
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(pid, "CONT");
    stopping.until_not_accepting().await;

    for (i, client) in clients.into_iter().enumerate() {
        let (status, answer_head, body) = client.await.unwrap().unwrap_or_else(|why| {
            panic!(
                "connection {i}, queued at SIGTERM: {why}\n{}",
                stopping.log.lock().unwrap()
            )
        });
        assert_eq!(status, 200, "{i}: {answer_head}");
        assert!(
            answer_head
                .to_ascii_lowercase()
                .contains("connection: close"),
            "{i}: the answer says the connection closes: {answer_head}"
        );
        let answer: Value = serde_json::from_slice(&body).unwrap();
        assert!(answer["response"]["patch"].is_string(), "{i}: {answer}");
    }
    let patience = Duration::from_secs(2);
    assert!(
        common::connections::closed_within(&mut silent, patience)
            .await
            .is_some(),
        "a connection queued with nothing sent was still open {patience:?} after the stop"
    );
    drop(ahead);
    stopping.exits_cleanly().await;
}
