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
use common::{ControlPlane, csr_for, p256};
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
    let flags = api.flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    ControlPlane::start(&flags)
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

/// A CA file that is not there fails the start (exit 1) naming it; no
/// Kubernetes API server can run here, and none is contacted.
#[test]
fn a_missing_kube_ca_fails_the_start_naming_the_file() {
    let out = run_cp(&[
        "--identity-provider",
        "kubernetes",
        "--kube-api",
        "https://127.0.0.1:6443",
        "--kube-ca",
        "/nonexistent/ca.crt",
        "--kube-token-file",
        "/nonexistent/token",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("/nonexistent/ca.crt"), "{stderr}");
}
