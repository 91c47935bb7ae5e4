//! The webhook port over real HTTPS: what the Kubernetes API server does
//! when it calls `/inject` and `/validate`.
//!
//! No Kubernetes API server can run on these machines. This test plays its
//! part: it trusts the serving certificate's CA (the `caBundle`), POSTs the
//! real AdmissionReview documents of `fixtures/k8s/` over TLS 1.3 and reads
//! the AdmissionReview answers.

mod admission;
#[path = "common/connections.rs"]
mod connections;

use admission::{app_probes, apply, ops, patch_of};
use trellis_control_plane::inject;

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use inject::server::{ServingFiles, WebhookServer, tls_config};
use inject::{
    Admitted, InjectConfig, Owner, TrustBundleSource, UninjectedPod, UninjectedPods,
    UnknownInjectValue,
};
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::sync::{oneshot, watch};
use trellis_control_plane::metrics::Metrics;

struct Webhook {
    addr: std::net::SocketAddr,
    metrics: Arc<Metrics>,
    uninjected: Arc<UninjectedPods>,
    ca: CertificateDer<'static>,
    _stop: oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

impl Webhook {
    /// The pods recorded as admitted without a sidecar, as `recent` lists them.
    fn recorded(&self) -> Vec<UninjectedPod> {
        let recent = self.uninjected.recent().into_iter();
        recent.map(|(pod, _)| pod).collect()
    }
}

async fn start() -> Webhook {
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert, generated.cert.pem()).unwrap();
    std::fs::write(&key, generated.signing_key.serialize_pem()).unwrap();
    let files = Arc::new(ServingFiles::load(&cert, &key).unwrap());
    start_with(files, generated.cert.der().clone(), dir).await
}

/// The webhook serving `files`, whose certificate `ca` signs.
async fn start_with(
    files: Arc<ServingFiles>,
    ca: CertificateDer<'static>,
    dir: tempfile::TempDir,
) -> Webhook {
    let server = WebhookServer::bind("127.0.0.1:0".parse().unwrap(), tls_config(files).unwrap())
        .await
        .unwrap();
    let addr = server.local_addr().unwrap();
    let config = InjectConfig {
        trust_bundle: TrustBundleSource::Annotation("-----BEGIN CERTIFICATE-----\n".into()),
        ..InjectConfig::default()
    };
    let (_config_tx, config_rx) = watch::channel(Arc::new(config));
    let (stop, stopped) = oneshot::channel::<()>();
    let metrics = Arc::new(Metrics::default());
    let uninjected = Arc::new(UninjectedPods::default());
    let (counting, recording) = (metrics.clone(), uninjected.clone());
    tokio::spawn(async move {
        let _keep = _config_tx;
        server
            .run(config_rx, counting, recording, async {
                let _ = stopped.await;
            })
            .await;
    });
    Webhook {
        addr,
        metrics,
        uninjected,
        ca,
        _stop: stop,
        _dir: dir,
    }
}

/// A TLS connection to the webhook, trusting its CA as the API server does.
async fn connect_tls(
    webhook: &Webhook,
    tcp: tokio::net::TcpStream,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(webhook.ca.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(trellis_core::tls::provider())
        .with_protocol_versions(trellis_core::tls::PROTOCOL_VERSIONS)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

async fn call(
    webhook: &Webhook,
    method: Method,
    path: &str,
    body: Vec<u8>,
) -> (StatusCode, Vec<u8>) {
    let tcp = tokio::net::TcpStream::connect(webhook.addr).await.unwrap();
    try_call(webhook, tcp, method, path, body).await.unwrap()
}

/// One request on `tcp`, or why it got no answer.
async fn try_call(
    webhook: &Webhook,
    tcp: tokio::net::TcpStream,
    method: Method,
    path: &str,
    body: Vec<u8>,
) -> Result<(StatusCode, Vec<u8>), Box<dyn std::error::Error + Send + Sync>> {
    let tls = connect_tls(webhook, tcp).await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(connection);
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, body.to_vec()))
}

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/k8s/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// `/inject` answers a Pod review with a JSONPatch, over HTTPS, as the API
/// server calls it.
#[tokio::test]
async fn inject_answers_with_a_patch_over_https() {
    let webhook = start().await;
    let (status, body) = call(
        &webhook,
        Method::POST,
        "/inject",
        fixture("pod-deployment-http-probes.json"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let review: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(review["kind"], "AdmissionReview");
    assert_eq!(review["response"]["allowed"], true);
    assert_eq!(review["response"]["patchType"], "JSONPatch");
    assert_eq!(
        review["response"]["uid"],
        "5b8e0d52-1c3f-4a8e-9d2b-6f0e7a4c9b11"
    );
}

/// A pod `/inject` injects with a mistyped `trellis.io/` annotation gets,
/// over HTTPS, the warning kubectl prints, naming it and the annotation
/// meant; the server counts the pod once, by where the name was, and a
/// pod without such a name is not counted. Reviewed again with its
/// sidecar (reinvoked), the pod is warned in the same words, which the API
/// server prints once, and not counted again.
#[tokio::test]
async fn an_unknown_trellis_annotation_is_warned_of_and_counted_over_https() {
    let webhook = start().await;
    let review: Value =
        serde_json::from_slice(&fixture("pod-deployment-http-probes.json")).unwrap();
    let reply = inject(&webhook, &review).await;
    assert!(reply["response"].get("warnings").is_none(), "{reply}");
    let mut typoed = review.clone();
    let annotations = &mut typoed["request"]["object"]["metadata"]["annotations"];
    annotations["trellis.io/acces-log"] = json!("false");
    annotations["trellis.io/opaque-port"] = json!("3306");
    let reply = inject(&webhook, &typoed).await;
    assert_eq!(
        reply["response"]["warnings"],
        json!([
            "trellis: metadata.annotations[trellis.io/acces-log] is not a Trellis annotation and \
             is ignored; did you mean trellis.io/access-log?",
            "trellis: metadata.annotations[trellis.io/opaque-port] is not a Trellis annotation \
             and is ignored; did you mean trellis.io/opaque-ports?",
        ]),
        "{reply}"
    );
    let mut reinvoked = typoed.clone();
    reinvoked["request"]["object"] = apply(
        &typoed["request"]["object"],
        &patch_of(&reply).expect("a patch"),
    );
    let again = inject(&webhook, &reinvoked).await;
    assert!(patch_of(&again).is_none(), "{again}");
    assert_eq!(
        again["response"]["warnings"], reply["response"]["warnings"],
        "{again}"
    );
    let rendered = webhook.metrics.render();
    for counted in [
        "trellis_inject_unknown_names_total{reason=\"pod_annotation\"} 1\n",
        "trellis_inject_unknown_names_total{reason=\"pod_label\"} 0\n",
    ] {
        assert!(rendered.contains(counted), "{counted}in\n{rendered}");
    }
}

/// A server-side dry run (`kubectl apply --dry-run=server`, the review's
/// `request.dryRun: true`) of a pod with a mistyped `trellis.io/`
/// annotation is warned as the pod itself would be, but creates no pod, so
/// it is not counted; the pod's real creation then is, once.
#[tokio::test]
async fn a_dry_run_is_warned_of_an_unknown_trellis_name_but_not_counted() {
    let webhook = start().await;
    let mut review: Value =
        serde_json::from_slice(&fixture("pod-deployment-http-probes.json")).unwrap();
    let annotations = &mut review["request"]["object"]["metadata"]["annotations"];
    annotations["trellis.io/acces-log"] = json!("false");
    let mut dry_run = review.clone();
    dry_run["request"]["dryRun"] = json!(true);
    let warned = json!([
        "trellis: metadata.annotations[trellis.io/acces-log] is not a Trellis annotation and is \
         ignored; did you mean trellis.io/access-log?",
    ]);
    let reply = inject(&webhook, &dry_run).await;
    assert_eq!(reply["response"]["warnings"], warned, "{reply}");
    let rendered = webhook.metrics.render();
    let none = "trellis_inject_unknown_names_total{reason=\"pod_annotation\"} 0\n";
    assert!(rendered.contains(none), "{none}in\n{rendered}");

    let reply = inject(&webhook, &review).await;
    assert_eq!(reply["response"]["warnings"], warned, "{reply}");
    let rendered = webhook.metrics.render();
    let one = "trellis_inject_unknown_names_total{reason=\"pod_annotation\"} 1\n";
    assert!(rendered.contains(one), "{one}in\n{rendered}");
}

/// `/inject` posted `review` over HTTPS: the AdmissionReview answered.
async fn inject(webhook: &Webhook, review: &Value) -> Value {
    let (status, body) = call(
        webhook,
        Method::POST,
        "/inject",
        serde_json::to_vec(review).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let reply: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(reply["response"]["allowed"], true, "{reply}");
    reply
}

/// The API server's reinvocation, over HTTPS: it posts the pod, applies
/// the answer's patch, lets a later webhook add a container with an
/// `httpGet` probe and hook, and posts the pod again; the second answer
/// rewrites the added container alone and hands its checks to the
/// sidecar, and a third call gets no patch. The documents are real
/// AdmissionReview JSON (fixtures/k8s) as the API server sends them, each
/// patch applied as it applies one (`json-patch`, RFC 6902).
#[tokio::test]
async fn a_reinvocation_rewrites_the_added_container_over_https() {
    let webhook = start().await;
    let mut review: Value =
        serde_json::from_slice(&fixture("pod-deployment-http-probes.json")).unwrap();
    let reply = inject(&webhook, &review).await;
    let mut pod = review["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch_of(&reply).expect("a patch")).unwrap();
    let first = pod.clone();

    pod["spec"]["containers"].as_array_mut().unwrap().push(json!({
        "name": "vault-agent",
        "image": "hashicorp/vault:1.17",
        "ports": [{"name": "agent", "containerPort": 8200, "protocol": "TCP"}],
        "readinessProbe": {
            "httpGet": {"path": "/agent/v1/ready", "port": "agent", "scheme": "HTTP"},
            "timeoutSeconds": 1, "periodSeconds": 5, "successThreshold": 1, "failureThreshold": 3,
        },
        "lifecycle": {"preStop": {"httpGet": {"path": "/agent/v1/quit", "port": 8200, "scheme": "HTTP"}}},
        "resources": {},
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
        "imagePullPolicy": "IfNotPresent",
    }));
    review["request"]["object"] = pod.clone();
    let reply = inject(&webhook, &review).await;
    assert!(reply["response"].get("warnings").is_none(), "{reply}");
    let patch = patch_of(&reply).expect("a patch for the added container");
    let env = first["spec"]["initContainers"][1]["env"]
        .as_array()
        .unwrap();
    let probes_at = env
        .iter()
        .position(|e| e["name"] == "TRELLIS_APP_PROBES")
        .unwrap();
    assert_eq!(
        ops(&patch),
        [
            "add /metadata/annotations".to_owned(),
            "replace /spec/containers/2".to_owned(),
            format!("replace /spec/initContainers/1/env/{probes_at}"),
            "add /spec/initContainers/1/env/-".to_owned(),
        ]
    );
    json_patch::patch(&mut pod, &patch).unwrap();

    let agent = &pod["spec"]["containers"][2];
    assert_eq!(
        agent["readinessProbe"]["httpGet"],
        json!({"path": "/app-health/vault-agent/readiness", "port": 15020, "scheme": "HTTP"})
    );
    let token = pod["spec"]["initContainers"][1]["env"][env.len()].clone();
    assert_eq!(token["name"], "TRELLIS_HOOK_TOKEN");
    assert_eq!(token["value"].as_str().unwrap().len(), 64, "{token}");
    assert_eq!(
        agent["lifecycle"]["preStop"]["httpGet"]["httpHeaders"],
        json!([{"name": "x-trellis-hook-token", "value": token["value"]}])
    );
    let mut expected = app_probes(&first);
    expected["/app-health/vault-agent/readiness"] =
        json!({"httpGet": {"port": 8200, "path": "/agent/v1/ready", "scheme": "HTTP"}});
    expected["/app-health/vault-agent/pre-stop"] =
        json!({"httpGet": {"port": 8200, "path": "/agent/v1/quit", "scheme": "HTTP"}});
    assert_eq!(app_probes(&pod), expected);
    assert_eq!(pod["spec"]["containers"][0], first["spec"]["containers"][0]);
    assert_eq!(pod["spec"]["containers"][1], first["spec"]["containers"][1]);
    assert_eq!(
        pod["metadata"]["annotations"]["trellis.io/injected-containers"],
        "web,log-shipper,vault-agent,wait-for-db"
    );

    review["request"]["object"] = pod;
    let reply = inject(&webhook, &review).await;
    assert!(patch_of(&reply).is_none(), "{reply}");
}

/// `/inject`, called for a pod of a namespace that opted in, denies a pod
/// whose `trellis.io/inject` label is neither `enabled` nor `disabled`,
/// naming the field and the value (the reason a Deployment's ReplicaSet
/// shows in its FailedCreate events), and counts it by where it was.
#[tokio::test]
async fn inject_denies_a_mistyped_inject_label_over_https() {
    let webhook = start().await;
    let mut review: Value =
        serde_json::from_slice(&fixture("pod-deployment-http-probes.json")).unwrap();
    review["request"]["object"]["metadata"]["labels"]["trellis.io/inject"] = json!("false");
    let (status, body) = call(
        &webhook,
        Method::POST,
        "/inject",
        serde_json::to_vec(&review).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let review: Value = serde_json::from_slice(&body).unwrap();
    let response = &review["response"];
    assert_eq!(response["allowed"], false, "{response}");
    assert_eq!(response["uid"], "5b8e0d52-1c3f-4a8e-9d2b-6f0e7a4c9b11");
    assert_eq!(
        response["status"]["message"],
        "trellis: cannot inject: metadata.labels[trellis.io/inject]: expected \"enabled\" or \
         \"disabled\", got \"false\""
    );
    assert!(response.get("patch").is_none(), "{response}");
    let rendered = webhook.metrics.render();
    let counted = "trellis_inject_unknown_values_total{reason=\"pod_label\"} 1\n";
    assert!(rendered.contains(counted), "{counted}in\n{rendered}");
}

/// The warning-only webhooks the chart calls for a mistyped
/// `trellis.io/inject` label, of the pod (`/inject/unknown-pod-label`) or
/// of its namespace (`/inject/unknown-namespace-label`), admit the pod as
/// it is with a warning that kubectl prints, saying what is wrong and that
/// the pod runs without a sidecar, and count it by where the value was. A
/// pod whose label is right by the time it is reviewed gets no warning.
#[tokio::test]
async fn unknown_inject_labels_are_warned_of_over_https() {
    let webhook = start().await;
    let review: Value = serde_json::from_slice(&fixture("pod-unlabelled-namespace.json")).unwrap();
    let mistyped = {
        let mut review = review.clone();
        review["request"]["object"]["metadata"]["labels"]["trellis.io/inject"] = json!("true");
        serde_json::to_vec(&review).unwrap()
    };
    let unlabelled = serde_json::to_vec(&review).unwrap();

    let pod_label = "/inject/unknown-pod-label";
    assert_eq!(
        admitted_unchanged(&webhook, pod_label, mistyped).await,
        json!([
            "trellis: metadata.labels[trellis.io/inject] is \"true\", neither \"enabled\" nor \
             \"disabled\": ignored, so the pod runs without a sidecar, outside the mesh"
        ])
    );
    assert_eq!(
        admitted_unchanged(&webhook, pod_label, unlabelled.clone()).await,
        Value::Null
    );
    assert_eq!(
        admitted_unchanged(&webhook, "/inject/unknown-namespace-label", unlabelled).await,
        json!([
            "trellis: the namespace's label trellis.io/inject is neither \"enabled\" nor \
             \"disabled\": pods here are not injected; this one runs without a sidecar, outside \
             the mesh"
        ])
    );

    let rendered = webhook.metrics.render();
    for reason in ["pod_label", "namespace_label"] {
        let counted = format!("trellis_inject_unknown_values_total{{reason=\"{reason}\"}} 1\n");
        assert!(rendered.contains(&counted), "{counted}in\n{rendered}");
    }
}

/// A Deployment's pods are created by the ReplicaSet controller: the
/// warning-only webhooks' warning reaches nobody. Each pod they admit
/// without a sidecar is recorded for `trellisctl check`, the pods of one
/// owner (the Deployment of a ReplicaSet named after it) with one label's
/// value as one entry, counted, with the time of the last; a pod without
/// owners by its name. A pod whose label is right
/// by the time it is reviewed is not recorded.
#[tokio::test]
async fn pods_admitted_without_a_sidecar_are_recorded_by_owner() {
    let webhook = start().await;
    let mut replicated: Value =
        serde_json::from_slice(&fixture("pod-deployment-http-probes.json")).unwrap();
    replicated["request"]["object"]["metadata"]["labels"]["trellis.io/inject"] = json!("ture");
    let replicated = serde_json::to_vec(&replicated).unwrap();
    let unlabelled = fixture("pod-unlabelled-namespace.json");
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    for (path, body) in [
        ("/inject/unknown-pod-label", replicated.clone()),
        ("/inject/unknown-pod-label", replicated),
        ("/inject/unknown-pod-label", unlabelled.clone()),
        ("/inject/unknown-namespace-label", unlabelled),
    ] {
        let (status, body) = call(&webhook, Method::POST, path, body).await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    }

    let mut recent = webhook.uninjected.recent();
    recent.sort_by(|a, b| a.0.cmp(&b.0));
    let recorded: Vec<_> = recent
        .iter()
        .map(|(pod, a)| (pod.clone(), a.count))
        .collect();
    assert_eq!(
        recorded,
        [
            (
                UninjectedPod {
                    owner: Owner {
                        namespace: "legacy".into(),
                        kind: "Pod".into(),
                        name: "debug".into(),
                    },
                    found: UnknownInjectValue::NamespaceLabel,
                    value: None,
                },
                1
            ),
            (
                UninjectedPod {
                    owner: Owner {
                        namespace: "shop".into(),
                        kind: "Deployment".into(),
                        name: "web".into(),
                    },
                    found: UnknownInjectValue::PodLabel,
                    value: Some("ture".into()),
                },
                2
            ),
        ]
    );
    for (_, Admitted { last_unix, .. }) in &recent {
        assert!(*last_unix >= before, "{recent:?}");
    }
}

/// The review of `fixture` with the pod's label `trellis.io/inject` set to
/// `label` (none for `None`) and its init containers named in `removed`
/// taken out.
fn pod_review(fixture_name: &str, label: Option<&str>, removed: &[&str]) -> Vec<u8> {
    let mut review: Value = serde_json::from_slice(&fixture(fixture_name)).unwrap();
    let pod = &mut review["request"]["object"];
    if let Some(label) = label {
        pod["metadata"]["labels"]["trellis.io/inject"] = json!(label);
    }
    pod["spec"]["initContainers"]
        .as_array_mut()
        .unwrap()
        .retain(|c| !removed.contains(&c["name"].as_str().unwrap()));
    serde_json::to_vec(&review).unwrap()
}

/// The warnings of the answer of `path` to `review`, which must admit
/// the pod of that review unchanged.
async fn admitted_unchanged(webhook: &Webhook, path: &str, review: Vec<u8>) -> Value {
    let uid = serde_json::from_slice::<Value>(&review).unwrap()["request"]["uid"].clone();
    let (status, body) = call(webhook, Method::POST, path, review).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let review: Value = serde_json::from_slice(&body).unwrap();
    let response = &review["response"];
    assert_eq!(response["allowed"], true, "{response}");
    assert_eq!(response["uid"], uid, "{response}");
    assert!(
        response.get("patch").is_none(),
        "nothing changed: {response}"
    );
    response["warnings"].clone()
}

/// The entry of the fixtures' Deployment `web` admitted with the label
/// `ture`.
fn web_admitted_with_ture() -> UninjectedPod {
    UninjectedPod {
        owner: web(),
        found: UnknownInjectValue::PodLabel,
        value: Some("ture".into()),
    }
}

fn web() -> Owner {
    Owner {
        namespace: "shop".into(),
        kind: "Deployment".into(),
        name: "web".into(),
    }
}

/// A pod that has the sidecar already (injected by hand, or created again
/// from a running pod's manifest) brought to a warning-only webhook by a
/// mistyped label, its own or its namespace's, runs in the mesh: it is
/// not recorded as admitted without a sidecar, and its owner counts as
/// injected, so `check` no longer warns of the owner's earlier pods. The
/// warning says the value is wrong, and that the pod is injected.
#[tokio::test]
async fn a_pod_with_the_sidecar_counts_as_injected_on_the_warning_only_paths() {
    let webhook = start().await;
    let uninjected = pod_review("pod-deployment-http-probes.json", Some("ture"), &[]);
    let (status, _) = call(
        &webhook,
        Method::POST,
        "/inject/unknown-pod-label",
        uninjected,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(webhook.recorded(), [web_admitted_with_ture()]);

    let meshed = pod_review("pod-already-injected.json", Some("ture"), &[]);
    assert_eq!(
        admitted_unchanged(&webhook, "/inject/unknown-pod-label", meshed).await,
        json!([
            "trellis: metadata.labels[trellis.io/inject] is \"ture\", neither \"enabled\" nor \
             \"disabled\": ignored, so the pod is injected"
        ])
    );
    assert_eq!(webhook.uninjected.recent(), []);
    let owners: Vec<_> = (webhook.uninjected.injected_owners().into_iter())
        .map(|(owner, _)| owner)
        .collect();
    assert_eq!(owners, [web()]);

    let meshed = pod_review("pod-already-injected.json", None, &[]);
    assert_eq!(
        admitted_unchanged(&webhook, "/inject/unknown-namespace-label", meshed).await,
        json!([
            "trellis: the namespace's label trellis.io/inject is neither \"enabled\" nor \
             \"disabled\": pods here are not injected; this one opted in itself and is"
        ])
    );
    assert_eq!(webhook.uninjected.recent(), []);
    let rendered = webhook.metrics.render();
    for (reason, count) in [("pod_label", 2), ("namespace_label", 1)] {
        let counted =
            format!("trellis_inject_unknown_values_total{{reason=\"{reason}\"}} {count}\n");
        assert!(rendered.contains(&counted), "{counted}in\n{rendered}");
    }
}

/// The marker annotation `trellis.io/injected` without the `trellis-proxy`
/// container (copied by hand, or the container taken out by another
/// webhook) is no sidecar, nor is the sidecar without our init container
/// (nothing redirects traffic to it): on a warning-only path the pod is
/// recorded as admitted without one, and warned so; on `/inject`, a pod with our init
/// container but not the sidecar (which would redirect its traffic to
/// nothing) is denied naming the missing container, and does not end its
/// owner's entries.
#[tokio::test]
async fn a_pod_marked_injected_without_the_sidecar_counts_as_uninjected() {
    let webhook = start().await;
    let marked = pod_review(
        "pod-already-injected.json",
        Some("ture"),
        &["trellis-init", "trellis-proxy"],
    );
    assert_eq!(
        admitted_unchanged(&webhook, "/inject/unknown-pod-label", marked).await,
        json!([
            "trellis: metadata.labels[trellis.io/inject] is \"ture\", neither \"enabled\" nor \
             \"disabled\": ignored, so the pod runs without a sidecar, outside the mesh"
        ])
    );
    assert_eq!(webhook.recorded(), [web_admitted_with_ture()]);

    // The sidecar without our init: nothing redirects traffic to it.
    let proxy_only = pod_review("pod-already-injected.json", Some("ture"), &["trellis-init"]);
    assert_eq!(
        admitted_unchanged(&webhook, "/inject/unknown-pod-label", proxy_only).await,
        json!([
            "trellis: metadata.labels[trellis.io/inject] is \"ture\", neither \"enabled\" nor \
             \"disabled\": ignored, so the pod runs without a sidecar, outside the mesh"
        ])
    );
    assert_eq!(webhook.recorded(), [web_admitted_with_ture()]);
    assert_eq!(webhook.uninjected.injected_owners(), []);

    let init_only = pod_review("pod-already-injected.json", None, &["trellis-proxy"]);
    let (status, body) = call(&webhook, Method::POST, "/inject", init_only).await;
    assert_eq!(status, StatusCode::OK);
    let review: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(review["response"]["allowed"], false, "{review}");
    assert!(
        review["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("has the container trellis-init but not trellis-proxy"),
        "{review}"
    );
    assert_eq!(webhook.recorded(), [web_admitted_with_ture()]);
    assert_eq!(webhook.uninjected.injected_owners(), []);
}

/// A server-side dry run (`kubectl create --dry-run=server`) of such a pod
/// gets the same warning, but creates no pod: nothing is recorded, and
/// `check` warns of no pod that never ran.
#[tokio::test]
async fn a_dry_run_of_a_pod_admitted_without_a_sidecar_is_not_recorded() {
    let webhook = start().await;
    let mut review: Value =
        serde_json::from_slice(&fixture("pod-deployment-http-probes.json")).unwrap();
    review["request"]["object"]["metadata"]["labels"]["trellis.io/inject"] = json!("ture");
    review["request"]["dryRun"] = json!(true);
    let path = "/inject/unknown-pod-label";
    let (status, body) = call(
        &webhook,
        Method::POST,
        path,
        serde_json::to_vec(&review).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["response"]["allowed"], json!(true), "{answer}");
    assert!(
        answer["response"]["warnings"][0]
            .as_str()
            .is_some_and(|w| w.contains("ture")),
        "{answer}"
    );
    assert_eq!(webhook.uninjected.recent(), []);
}

/// `/validate` denies an invalid policy with the lint message.
#[tokio::test]
async fn validate_denies_an_invalid_policy_over_https() {
    let webhook = start().await;
    let (status, body) = call(
        &webhook,
        Method::POST,
        "/validate",
        fixture("authorizationpolicy-invalid-update.json"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let review: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(review["response"]["allowed"], false);
    let message = review["response"]["status"]["message"].as_str().unwrap();
    assert!(message.contains("port 70000 is out of range"), "{message}");
}

/// A body that is not an AdmissionReview gets 400 (the webhook's
/// failurePolicy then decides); other paths 404; other methods 405.
#[tokio::test]
async fn bad_requests_get_http_errors() {
    let webhook = start().await;
    let (status, body) = call(&webhook, Method::POST, "/inject", b"{}".to_vec()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&body).contains("AdmissionReview"));
    let (status, _) = call(&webhook, Method::GET, "/inject", Vec::new()).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    let (status, _) = call(&webhook, Method::POST, "/mutate", Vec::new()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// A client that sends a request's head and trickles its body (every pod
/// can reach the webhook port) is answered 408 once the body timeout
/// passes, and its connection closed, rather than holding its slot for the
/// connection's whole lifetime.
#[tokio::test]
async fn a_body_that_does_not_arrive_is_answered_408() {
    use connections::{connect_from, loopback};
    use inject::server::{BODY_TIMEOUT, CONNECTION_LIFETIME};
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let webhook = start().await;
    let mut tls = connect_tls(&webhook, connect_from(loopback(1), webhook.addr).await)
        .await
        .unwrap();
    tls.write_all(
        b"POST /validate HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
          content-length: 1000\r\n\r\n{\"apiVersion\":",
    )
    .await
    .unwrap();
    tls.flush().await.unwrap();
    let start = Instant::now();
    let mut answer = Vec::new();
    tokio::time::timeout(CONNECTION_LIFETIME / 2, tls.read_to_end(&mut answer))
        .await
        .expect("answered and closed well before the connection's lifetime")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains("body did not arrive within 5 seconds"),
        "{answer}"
    );
    assert!(
        start.elapsed() >= BODY_TIMEOUT / 2,
        "answered by the timeout, not at once: {:?}",
        start.elapsed()
    );
}

/// A plaintext client is answered that the port speaks only HTTPS once it
/// has sent a request's head; one that starts a head and never ends it
/// holds its connection no longer than a TLS client that stalls: it is
/// closed, unanswered, by the head timeout.
#[tokio::test]
async fn a_plaintext_head_that_never_ends_is_closed_by_the_head_timeout() {
    use connections::{closed_within, connect_from, loopback};
    use inject::server::HEAD_TIMEOUT;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let webhook = start().await;

    let mut plaintext = connect_from(loopback(1), webhook.addr).await;
    plaintext
        .write_all(b"GET /inject HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    plaintext.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(answer.contains("speaks only HTTPS"), "{answer}");

    let mut stalled = connect_from(loopback(1), webhook.addr).await;
    stalled
        .write_all(b"GET /inject HTTP/1.1\r\nhost: localhost\r\n")
        .await
        .unwrap();
    let closed = closed_within(&mut stalled, HEAD_TIMEOUT + Duration::from_secs(30))
        .await
        .expect("a plaintext head that never ends is closed");
    assert!(
        closed >= HEAD_TIMEOUT / 2,
        "closed by the timeout, not at once: {closed:?}"
    );
}

/// The webhook port, which every pod can reach, limits its connections:
/// one that never starts its TLS handshake, or never sends a request
/// after it, is closed after the head timeout; past the cap of one client
/// address, and past the total cap, new ones are closed as they come;
/// once the held ones close, the API server is served again.
#[tokio::test]
async fn the_webhook_port_limits_its_connections() {
    use connections::{REFUSAL, closed_among, closed_within, connect_from, hold, loopback};
    use inject::server::{HEAD_TIMEOUT, MAX_CONNECTIONS, MAX_CONNECTIONS_PER_CLIENT};
    use std::time::{Duration, Instant};
    use tokio::io::AsyncReadExt;
    let patience = HEAD_TIMEOUT + Duration::from_secs(30);
    let webhook = start().await;

    let mut silent = connect_from(loopback(1), webhook.addr).await;
    let closed = closed_within(&mut silent, patience)
        .await
        .expect("a connection that never starts its handshake is closed");
    assert!(
        closed >= HEAD_TIMEOUT / 2,
        "closed by the timeout, not at once: {closed:?}"
    );
    let mut idle = connect_tls(&webhook, connect_from(loopback(1), webhook.addr).await)
        .await
        .unwrap();
    let start = Instant::now();
    let read = tokio::time::timeout(patience, idle.read(&mut [0u8; 64]))
        .await
        .expect("a connection that sends no request is closed");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(
        start.elapsed() >= HEAD_TIMEOUT / 2,
        "closed by the head timeout, not at once: {:?}",
        start.elapsed()
    );

    let mut held = hold(loopback(1), webhook.addr, MAX_CONNECTIONS_PER_CLIENT).await;
    let mut extra = connect_from(loopback(1), webhook.addr).await;
    assert!(
        closed_within(&mut extra, REFUSAL).await.is_some(),
        "one address holds at most {MAX_CONNECTIONS_PER_CLIENT} connections"
    );
    let addresses = u8::try_from(MAX_CONNECTIONS / MAX_CONNECTIONS_PER_CLIENT).unwrap();
    for last in 2..=addresses {
        held.extend(hold(loopback(last), webhook.addr, MAX_CONNECTIONS_PER_CLIENT).await);
    }
    assert_eq!(held.len(), MAX_CONNECTIONS);
    // Full: an address holding none (an API server's) takes the slot of the
    // oldest connection of an address holding the most, which is closed.
    let other = loopback(addresses + 1);
    let extra = connect_from(other, webhook.addr).await;
    assert_eq!(
        closed_among(&mut held, REFUSAL).await,
        1,
        "at most {MAX_CONNECTIONS} connections are served at once"
    );
    let body = fixture("authorizationpolicy-valid.json");
    let (status, _) = try_call(&webhook, extra, Method::POST, "/validate", body)
        .await
        .expect("a full port served a new address");
    assert_eq!(status, StatusCode::OK);

    drop(held);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let tcp = connect_from(other, webhook.addr).await;
        let body = fixture("authorizationpolicy-valid.json");
        match try_call(&webhook, tcp, Method::POST, "/validate", body).await {
            Ok((status, _)) => {
                assert_eq!(status, StatusCode::OK);
                break;
            }
            Err(e) => assert!(
                Instant::now() < deadline,
                "not served once the held connections closed: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A serving certificate for `localhost` expiring at `not_after` (Unix
/// seconds), and its key, in PEM.
fn serving_certificate(not_after: i64) -> (rcgen::Certificate, String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    params.not_after = time::OffsetDateTime::from_unix_timestamp(not_after).unwrap();
    (params.self_signed(&key).unwrap(), key.serialize_pem())
}

/// Writes a Secret's files as the kubelet updates a mounted Secret: into a
/// new directory, then `..data` swapped to it by renaming a symlink over
/// it (`tls.crt` and `tls.key` link to `..data/`, once).
fn kubelet_writes(dir: &std::path::Path, version: &str, cert: &rcgen::Certificate, key: &str) {
    let files = dir.join(version);
    std::fs::create_dir(&files).unwrap();
    std::fs::write(files.join("tls.crt"), cert.pem()).unwrap();
    std::fs::write(files.join("tls.key"), key).unwrap();
    std::os::unix::fs::symlink(version, dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    for name in ["tls.crt", "tls.key"] {
        if !dir.join(name).exists() {
            std::os::unix::fs::symlink(format!("..data/{name}"), dir.join(name)).unwrap();
        }
    }
}

/// The certificate the webhook presents in a handshake.
async fn presented(webhook: &Webhook) -> CertificateDer<'static> {
    let tcp = tokio::net::TcpStream::connect(webhook.addr).await.unwrap();
    // Trusting whatever it presents: the test compares the certificate.
    let config = rustls::ClientConfig::builder_with_provider(trellis_core::tls::provider())
        .with_protocol_versions(trellis_core::tls::PROTOCOL_VERSIONS)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate))
        .with_no_client_auth();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

#[derive(Debug)]
struct AnyCertificate;

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        trellis_core::tls::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

const EXPIRY_METRIC: &str = "trellis_webhook_certificate_expiry_timestamp_seconds";

/// A certificate renewed in the mounted Secret (by cert-manager, or an
/// upgrade of the chart) is served once the files are checked again, and
/// the expiry metric shows the new notAfter: the kubelet's update is a
/// `..data` symlink swapped to a new directory, followed through the
/// `tls.crt` symlink. A swapped-in file that kept the previous file's
/// modification time is still a change.
#[tokio::test]
async fn a_renewed_secret_is_served_and_its_expiry_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (first, first_key) = serving_certificate(2_000_000_000);
    kubelet_writes(dir.path(), "..2026_01_01_00_00_00.1", &first, &first_key);
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let metrics = Arc::new(Metrics::default());
    let files = ServingFiles::load(&cert, &key)
        .unwrap()
        .with_metrics(metrics.clone());
    let files = Arc::new(files);
    let root = tempfile::tempdir().unwrap();
    let webhook = start_with(files.clone(), first.der().clone(), root).await;
    let text = metrics.render();
    assert!(
        text.contains(&format!("{EXPIRY_METRIC} 2000000000\n")),
        "{text}"
    );
    assert_eq!(presented(&webhook).await, *first.der());

    let (second, second_key) = serving_certificate(2_100_000_000);
    kubelet_writes(dir.path(), "..2026_02_01_00_00_00.2", &second, &second_key);
    // Checked every 10 s; at once here.
    files.recheck();
    let text = metrics.render();
    assert!(
        text.contains(&format!("{EXPIRY_METRIC} 2100000000\n")),
        "{text}"
    );
    assert_eq!(presented(&webhook).await, *second.der());

    // Files copied in keeping their times are another file all the same.
    let (third, third_key) = serving_certificate(2_200_000_000);
    let kept = std::fs::metadata(&cert).unwrap().modified().unwrap();
    kubelet_writes(dir.path(), "..2026_03_01_00_00_00.3", &third, &third_key);
    std::fs::File::options()
        .write(true)
        .open(&cert)
        .unwrap()
        .set_modified(kept)
        .unwrap();
    files.recheck();
    let text = metrics.render();
    assert!(
        text.contains(&format!("{EXPIRY_METRIC} 2200000000\n")),
        "{text}"
    );
    assert_eq!(presented(&webhook).await, *third.der());
}

/// A pod whose list annotation holds more items than
/// [`inject::MAX_LIST_ITEMS`] (here `trellis.io/exclude-outbound-cidrs`:
/// thousands of /32s would make every review slow) is denied over HTTPS
/// naming the annotation, the count and the limit; one at the limit, with
/// duplicates, is injected with each CIDR once, in the order written.
#[tokio::test]
async fn a_list_annotation_past_the_limit_is_denied_over_https() {
    use base64::Engine as _;
    let webhook = start().await;
    let review_with = |cidrs: &[String]| {
        let mut review: Value =
            serde_json::from_slice(&fixture("pod-deployment-http-probes.json")).unwrap();
        review["request"]["object"]["metadata"]["annotations"]["trellis.io/exclude-outbound-cidrs"] =
            json!(cidrs.join(","));
        serde_json::to_vec(&review).unwrap()
    };
    let cidr = |i: usize| format!("10.1.{}.{}/32", i / 256, i % 256);
    let over: Vec<String> = (0..=inject::MAX_LIST_ITEMS).map(cidr).collect();
    let (status, body) = call(&webhook, Method::POST, "/inject", review_with(&over)).await;
    assert_eq!(status, StatusCode::OK);
    let review: Value = serde_json::from_slice(&body).unwrap();
    let response = &review["response"];
    assert_eq!(response["allowed"], false, "{}", response["status"]);
    assert_eq!(
        response["status"]["message"],
        "trellis: cannot inject: metadata.annotations[trellis.io/exclude-outbound-cidrs]: 257 \
         items, more than the 256 a list annotation may hold"
    );
    assert!(response.get("patch").is_none(), "{response}");

    // At the limit: 128 CIDRs, each written twice.
    let half = inject::MAX_LIST_ITEMS / 2;
    let distinct: Vec<String> = (0..half).map(cidr).collect();
    let twice = [distinct.clone(), distinct.clone()].concat();
    let (status, body) = call(&webhook, Method::POST, "/inject", review_with(&twice)).await;
    assert_eq!(status, StatusCode::OK);
    let review: Value = serde_json::from_slice(&body).unwrap();
    let response = &review["response"];
    assert_eq!(response["allowed"], true, "{response}");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().unwrap())
        .unwrap();
    let patch = String::from_utf8(patch).unwrap();
    let excluded = format!("\"--exclude-outbound-cidrs\",\"{}\"", distinct.join(","));
    assert!(patch.contains(&excluded), "{excluded} not in {patch}");
}

/// The webhook port switches protocols for nothing, and after a request
/// hyper's server may switch for (an HTTP/1.1 `Upgrade`, a `CONNECT`) no
/// later head on the connection would be checked: its answer says
/// `connection: close` and the connection ends with it, so a second
/// request on it is never served.
#[tokio::test]
async fn the_webhook_port_ends_a_connection_after_an_upgrade_or_connect() {
    use connections::assert_one_answer_then_closed;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let webhook = start().await;
    for (first, status) in [
        (
            "POST /validate HTTP/1.1\r\nhost: localhost\r\nupgrade: websocket\r\n\
             connection: upgrade\r\ncontent-length: 0\r\n\r\n",
            "HTTP/1.1 400 ",
        ),
        (
            "GET /inject HTTP/1.1\r\nhost: localhost\r\nupgrade: websocket\r\n\r\n",
            "HTTP/1.1 405 ",
        ),
        (
            "CONNECT localhost:15017 HTTP/1.1\r\nhost: localhost:15017\r\n\r\n",
            "HTTP/1.1 404 ",
        ),
    ] {
        let tcp = tokio::net::TcpStream::connect(webhook.addr).await.unwrap();
        let mut tls = connect_tls(&webhook, tcp).await.unwrap();
        // The second request asks to close, so that a connection that
        // goes on after the first answer ends after the second.
        let second = "GET /inject HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n";
        tls.write_all(format!("{first}{second}").as_bytes())
            .await
            .unwrap();
        tls.flush().await.unwrap();
        let mut read = Vec::new();
        tokio::time::timeout(std::time::Duration::from_secs(30), async {
            // Until the end of the stream, or a TLS error once it is closed.
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = tls.read(&mut buf).await {
                read.extend_from_slice(&buf[..n]);
            }
        })
        .await
        .expect("answered and closed");
        assert_one_answer_then_closed(first, status, read);
    }
}
