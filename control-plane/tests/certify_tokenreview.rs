//! `Identity.Certify` with a Kubernetes ServiceAccount token, through the
//! real control-plane binary, which checks the token with TokenReview.
//!
//! No Kubernetes API server can run on these machines. Each test points the
//! control plane at a local HTTPS server (`tokenreview_api`) that answers
//! TokenReviews with the API server responses in `fixtures/k8s/tokenreview/`
//! and records every request it gets.

mod common;
mod tokenreview_api;

use std::time::Duration;

use common::serving::ServingCert;
use common::{ControlPlane, Svid, csr_for, enroll, p256};
use tokenreview_api::*;
use tonic::Code;
use trellis_proto::identity::v1::certify_request::Proof;
use trellis_proto::identity::v1::{CertifyRequest, CertifyResponse};

async fn certify_with_sa_token(
    cp: &ControlPlane,
    id: &str,
    token: &str,
) -> Result<CertifyResponse, tonic::Status> {
    let mut client = cp.identity_client(None).await;
    client
        .certify(CertifyRequest {
            csr: csr_for(&p256(), id),
            proof: Some(Proof::ServiceAccountToken(token.into())),
            inbound_address: "127.0.0.1:15006".into(),
            inbound_addresses: Vec::new(),
        })
        .await
        .map(|r| r.into_inner())
}

fn start_cp(api: &FakeApi) -> ControlPlane {
    start_cp_with(api, &[])
}

fn start_cp_with(api: &FakeApi, extra: &[&str]) -> ControlPlane {
    let flags = api.flags();
    let mut flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    flags.extend_from_slice(extra);
    ControlPlane::start(&flags)
}

/// WEB's first certificate, proved by its ServiceAccount token.
async fn web_svid(cp: &ControlPlane) -> Svid {
    let key = p256();
    let mut client = cp.identity_client(None).await;
    let issued = client
        .certify(CertifyRequest {
            csr: csr_for(&key, WEB),
            proof: Some(Proof::ServiceAccountToken(WEB_TOKEN.into())),
            inbound_address: "127.0.0.1:15006".into(),
            inbound_addresses: Vec::new(),
        })
        .await
        .expect("the first certificate, proved by the token")
        .into_inner();
    Svid::issued(key, issued)
}

/// A renewal of `svid` (for `id`, presented as the TLS client
/// certificate), proved by the ServiceAccount token `token` too if given.
async fn renew(
    cp: &ControlPlane,
    svid: &Svid,
    id: &str,
    token: Option<&str>,
) -> Result<CertifyResponse, tonic::Status> {
    let mut client = cp.identity_client(Some(svid)).await;
    client
        .certify(CertifyRequest {
            csr: csr_for(&p256(), id),
            proof: token.map(|t| Proof::ServiceAccountToken(t.into())),
            inbound_address: "127.0.0.1:15006".into(),
            inbound_addresses: Vec::new(),
        })
        .await
        .map(|r| r.into_inner())
}

/// The count of Certify refusals for `reason` on the metrics page.
fn refusals(cp: &ControlPlane, reason: &str) -> u64 {
    let prefix = format!("trellis_certify_failures_total{{reason=\"{reason}\"}} ");
    cp.metrics()
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |n| n.parse().unwrap())
}

/// In Kubernetes a renewal proves the ServiceAccount token by default: a
/// stolen key and certificate alone renew nothing. The certificate alone
/// is refused, saying what is needed, logged and counted; with the token
/// the renewal is issued; a token of another service account renews
/// nothing either. No Kubernetes API server can run here; the fake
/// answers with the stand-in API server responses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_kubernetes_a_renewal_proves_the_service_account_token() {
    let api = FakeApi::start(by_token).await;
    let cp = start_cp(&api);
    let svid = web_svid(&cp).await;

    let e = renew(&cp, &svid, WEB, None).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(
        e.message()
            .contains("renewal needs the ServiceAccount token")
            && e.message().contains("--renewal-proof token"),
        "{e:?}"
    );
    assert_eq!(refusals(&cp, "renewal_needs_token"), 1);
    cp.wait_for_line("the refusal logged", |l| {
        l.contains("certify refused") && l.contains("renewal_needs_token")
    });

    let renewed = renew(&cp, &svid, WEB, Some(WEB_TOKEN)).await.unwrap();
    assert_eq!(renewed.spiffe_id, WEB);
    assert_ne!(renewed.chain[0], svid.chain[0].to_vec());

    // payments' certificate (a join token, which the embedded store still
    // takes) with web's token proves neither identity for the other.
    let payments = "spiffe://cluster.local/ns/shop/sa/payments";
    let theirs = enroll(&cp, payments, "127.0.0.1:15007").await;
    let e = renew(&cp, &theirs, payments, Some(WEB_TOKEN))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains(WEB), "{e:?}");
    let e = renew(&cp, &theirs, payments, None).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert_eq!(refusals(&cp, "renewal_needs_token"), 2);
    assert!(!cp.log().contains(WEB_TOKEN), "{}", cp.log());
}

/// `--renewal-proof certificate` keeps renewals proved by the certificate
/// alone, for sidecars of releases that renew without the token; one that
/// sends the token is renewed too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_renewal_proof_certificate_the_certificate_alone_renews() {
    let api = FakeApi::start(by_token).await;
    let cp = start_cp_with(&api, &["--renewal-proof", "certificate"]);
    let svid = web_svid(&cp).await;
    let renewed = renew(&cp, &svid, WEB, None)
        .await
        .expect("renewed by the certificate alone");
    assert_eq!(renewed.spiffe_id, WEB);
    renew(&cp, &svid, WEB, Some(WEB_TOKEN))
        .await
        .expect("renewed with the token too");
    let e = renew(
        &cp,
        &svid,
        "spiffe://cluster.local/ns/shop/sa/payments",
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert_eq!(refusals(&cp, "renewal_needs_token"), 0);
}

/// No Kubernetes API server can run here; the control plane is pointed at the
/// fake, which answers with stand-in API server responses. The reviewed
/// account is issued; the cache spares the API server a second review of the
/// same token within the TTL, even when that Certify is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certify_issues_the_reviewed_identity_and_only_that_one() {
    let api = FakeApi::start(by_token).await;
    let cp = start_cp(&api);

    let issued = certify_with_sa_token(&cp, WEB, WEB_TOKEN).await.unwrap();
    assert_eq!(issued.spiffe_id, WEB);
    assert!(!issued.chain.is_empty());
    assert_eq!(api.requests().len(), 1);
    let workloads = cp.workloads().await;
    assert!(
        workloads.iter().any(|w| w.spiffe_id == WEB),
        "{workloads:?}"
    );

    let other = "spiffe://cluster.local/ns/shop/sa/payments";
    let e = certify_with_sa_token(&cp, other, WEB_TOKEN)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains(WEB), "{e:?}");
    assert_eq!(api.requests().len(), 1, "the review was cached");

    // The token may be used again within its lifetime: it is not single-use.
    certify_with_sa_token(&cp, WEB, WEB_TOKEN).await.unwrap();
    assert_eq!(api.requests().len(), 1);

    let log = cp.log();
    assert!(
        !log.contains(WEB_TOKEN),
        "the token reached the log:\n{log}"
    );
    assert!(
        !log.contains(BEARER),
        "the bearer token reached the log:\n{log}"
    );
}

/// No Kubernetes API server can run here; the fake answers with the stand-in
/// API server responses of an expired token and of a token for another
/// audience.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certify_refuses_tokens_the_api_server_does_not_vouch_for() {
    let api = FakeApi::start(by_token).await;
    let cp = start_cp(&api);

    let e = certify_with_sa_token(&cp, WEB, EXPIRED_TOKEN)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("has expired"), "{e:?}");

    let e = certify_with_sa_token(&cp, WEB, API_AUDIENCE_TOKEN)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("audience"), "{e:?}");

    assert!(cp.workloads().await.is_empty(), "nothing was issued");
    let log = cp.log();
    assert!(
        !log.contains(EXPIRED_TOKEN) && !log.contains(API_AUDIENCE_TOKEN),
        "{log}"
    );
}

/// A token signed by a key of the caller's own, naming the cluster's key,
/// is refused UNAUTHENTICATED saying its signature does not verify, counted
/// as `sa_token_bad_signature`, without a TokenReview; one signed by the
/// cluster's key is issued its identity. No Kubernetes API server can run
/// here: the API server is simulated with recorded responses (the stand-in
/// serves the cluster's key set and answers reviews with the stand-in
/// response of an authenticated token).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certify_refuses_a_forged_token_without_a_review() {
    let api = FakeApi::start(|_| (201, "authenticated.json")).await;
    let cluster = Signer::rsa();
    api.keys.publish(jwks(&[("cluster-key", &cluster)]));
    let cp = start_cp(&api);

    let forged = Signer::rsa().token("cluster-key", "forged");
    let e = certify_with_sa_token(&cp, WEB, &forged).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert_eq!(
        e.message(),
        "the token's signature does not verify against the cluster's service account issuer \
         keys"
    );
    assert_eq!(refusals(&cp, "sa_token_bad_signature"), 1);
    assert!(api.requests().is_empty(), "{:?}", api.requests());
    assert!(cp.workloads().await.is_empty(), "nothing was issued");

    certify_with_sa_token(&cp, WEB, &cluster.token("cluster-key", "real"))
        .await
        .unwrap();
    assert_eq!(api.requests().len(), 1);
    assert!(!cp.log().contains(&forged));
}

/// No Kubernetes API server can run here; the fake answers with the stand-in
/// API server Status of a forbidden TokenReview, and then is not there at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certify_is_unavailable_when_the_api_server_cannot_review() {
    let api = FakeApi::start(|_| (403, "forbidden-403.json")).await;
    let cp = start_cp(&api);
    let e = certify_with_sa_token(&cp, WEB, WEB_TOKEN)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("403"), "{e:?}");

    let url = api.url();
    drop(api);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let e = certify_with_sa_token(&cp, WEB, WEB_TOKEN)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains(&url), "{e:?}");
}

/// Without `--identity-provider kubernetes` no API server is asked (none can
/// run here anyway): a ServiceAccount token is UNIMPLEMENTED, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_kubernetes_service_account_tokens_are_unimplemented() {
    let cp = ControlPlane::start(&[]);
    let e = certify_with_sa_token(&cp, WEB, WEB_TOKEN)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
    assert!(
        e.message().contains("--identity-provider kubernetes"),
        "{e:?}"
    );
}

fn run_cp(args: &[&str]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    std::process::Command::new(common::CP)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .args(args)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .output()
        .unwrap()
}

/// Invalid Kubernetes flags exit 64 naming the flag, before anything would
/// talk to an API server (none can run here).
#[test]
fn kubernetes_flags_are_checked_before_start() {
    for (args, expect) in [
        (
            &["--kube-api", "https://127.0.0.1:6443"][..],
            "--identity-provider kubernetes",
        ),
        (&["--kube-ca", "ca.crt"][..], "--kube-ca"),
        (
            &[
                "--identity-provider",
                "kubernetes",
                "--kube-api",
                "http://127.0.0.1:6443",
            ][..],
            "https",
        ),
        (
            &["--identity-provider", "kubernetes"][..],
            "KUBERNETES_SERVICE_HOST",
        ),
        (
            &["--identity-provider", "openid"][..],
            "--identity-provider",
        ),
        (
            &["--renewal-proof", "token"][..],
            "--renewal-proof token needs --identity-provider kubernetes",
        ),
    ] {
        let out = run_cp(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
    }
}

/// In a pod the API server is `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`
/// (an IPv6 host in brackets). No Kubernetes API server can run here: the
/// test only reads which URL the control plane resolved.
#[test]
fn in_a_pod_the_api_server_comes_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("ca.crt"),
        ServingCert::new("fake kubernetes CA").ca_pem,
    )
    .unwrap();
    std::fs::write(dir.path().join("token"), BEARER).unwrap();
    for (host, port, url) in [
        ("10.96.0.1", "443", "https://10.96.0.1:443/"),
        ("fd00:10:96::1", "6443", "https://[fd00:10:96::1]:6443/"),
    ] {
        let mut child = std::process::Command::new(common::CP)
            .arg("--state-dir")
            .arg(dir.path().join(format!("state-{port}")))
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .args(["--identity-provider", "kubernetes", "--kube-ca"])
            .arg(dir.path().join("ca.crt"))
            .arg("--kube-token-file")
            .arg(dir.path().join("token"))
            .env("KUBERNETES_SERVICE_HOST", host)
            .env("KUBERNETES_SERVICE_PORT", port)
            .env_remove("TRELLIS_LOG")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
        let mut log = String::new();
        for line in std::io::BufRead::lines(stderr) {
            let line = line.unwrap();
            log.push_str(&line);
            log.push('\n');
            if line.contains("control plane ready") {
                break;
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            log.lines()
                .any(|l| l.contains("TokenReview") && l.contains(&format!("api={url}"))),
            "{host}:{port} should give {url}:\n{log}"
        );
    }
}

/// A CA file that is not there, or holds no certificate, is configuration:
/// it exits 64 naming the flag and the file, before the state dir is made
/// (no CA, operator credential or database left behind); no Kubernetes API
/// server can run here, and none is contacted.
#[test]
fn an_unusable_kube_ca_exits_64_naming_the_flag_and_touches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let empty = dir.path().join("empty.crt");
    std::fs::write(&empty, "").unwrap();
    let empty = empty.display().to_string();
    for (ca, names) in [
        (
            "/nonexistent/ca.crt",
            "--kube-ca /nonexistent/ca.crt: ".to_owned(),
        ),
        (
            empty.as_str(),
            format!("--kube-ca {empty}: no certificate in the file"),
        ),
    ] {
        let args = [
            "--identity-provider",
            "kubernetes",
            "--kube-api",
            "https://127.0.0.1:6443",
            "--kube-ca",
            ca,
            "--kube-token-file",
            "/nonexistent/token",
        ];
        common::assert_refused_touching_nothing(&state, &args, 64, &names);
    }
}

/// The bearer token file is re-read every minute, but one that cannot be
/// read or holds no token is configuration too, with either store: it
/// exits 64 naming the flag and the file (never what the file holds),
/// before the state dir is made; no Kubernetes API server is contacted.
#[test]
fn an_unusable_kube_token_file_exits_64_naming_the_flag_and_touches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let path = |name: &str| dir.path().join(name).display().to_string();
    let (ca, empty, spaced) = (path("ca.crt"), path("empty"), path("spaced"));
    std::fs::write(&ca, ServingCert::new("fake kubernetes CA").ca_pem).unwrap();
    std::fs::write(&empty, "\n").unwrap();
    std::fs::write(&spaced, format!("{BEARER} {BEARER}\n")).unwrap();
    let kube = [
        "--identity-provider",
        "kubernetes",
        "--kube-api",
        "https://127.0.0.1:6443",
        "--kube-ca",
        &ca,
    ];
    let kube_store = [
        "--store",
        "kubernetes",
        "--ca-secret",
        "trellis-ca",
        "--namespace",
        "trellis",
    ];
    for store in [&[][..], &kube_store[..]] {
        for (token, names) in [
            (
                "/nonexistent/token",
                "--kube-token-file /nonexistent/token: ".to_owned(),
            ),
            (
                empty.as_str(),
                format!("--kube-token-file {empty}: the file is empty"),
            ),
            (
                spaced.as_str(),
                format!("--kube-token-file {spaced}: the token has characters"),
            ),
        ] {
            let args = [&kube[..], store, &["--kube-token-file", token]].concat();
            let stderr = common::assert_refused_touching_nothing(&state, &args, 64, &names);
            assert!(!stderr.contains(BEARER), "{stderr}");
        }
    }
}

/// A Certify in flight when SIGTERM comes is answered before the control
/// plane exits: a sidecar starting during a rollout gets its certificate
/// instead of a broken connection. No Kubernetes API server can run here;
/// the stand-in holds the review for a second, and the signal is sent
/// while it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certify_in_flight_at_sigterm_is_answered_before_the_exit() {
    use std::sync::{Arc, Mutex};

    let (reviewing_tx, mut reviewing) = tokio::sync::mpsc::unbounded_channel();
    let record = Arc::new(Mutex::new(Vec::new()));
    let server = common::serving::ApiServer::start(
        &format!("{BEARER}\n"),
        common::serving::Answering::Yes,
        move |req: http::Request<hyper::body::Incoming>| {
            let (record, reviewing) = (record.clone(), reviewing_tx.clone());
            async move {
                let _ = reviewing.send(());
                tokio::time::sleep(Duration::from_secs(1)).await;
                serve(req, by_token, &record, &IssuerKeys::default()).await
            }
        },
    )
    .await;
    let (url, ca, token) = (
        server.url(),
        server.ca().display().to_string(),
        server.token_file().display().to_string(),
    );
    let cp = ControlPlane::start(&[
        "--identity-provider",
        "kubernetes",
        "--kube-api",
        &url,
        "--kube-ca",
        &ca,
        "--kube-token-file",
        &token,
    ]);
    let mut client = cp.identity_client(None).await;
    let certify = tokio::spawn(async move {
        client
            .certify(CertifyRequest {
                csr: csr_for(&p256(), WEB),
                proof: Some(Proof::ServiceAccountToken(WEB_TOKEN.into())),
                inbound_address: "127.0.0.1:15006".into(),
                inbound_addresses: Vec::new(),
            })
            .await
    });
    tokio::time::timeout(Duration::from_secs(10), reviewing.recv())
        .await
        .expect("the review reached the API server")
        .expect("the API server is running");
    let stopping = tokio::spawn(cp.stop_async());

    let issued = certify
        .await
        .unwrap()
        .expect("the Certify in flight at SIGTERM was answered")
        .into_inner();
    assert_eq!(issued.spiffe_id, WEB);
    assert!(stopping.await.unwrap().success(), "SIGTERM exits 0");
}
