//! Kubernetes ServiceAccount tokens checked with TokenReview: the reviewer on
//! its own, then `Identity.Certify` through the real binary.
//!
//! No Kubernetes API server can run on these machines. Each test stands up a
//! local HTTPS server (a self-made CA, tokio-rustls + hyper) that plays the
//! API server: it answers `POST /apis/authentication.k8s.io/v1/tokenreviews`
//! with the API server responses in `fixtures/k8s/tokenreview/` (stand-ins
//! for recorded responses; see the README there) and records every request
//! it gets, so the tests check what the control plane sent too.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use common::serving::{Answering, ServingCert, serve_https};
use common::{ControlPlane, csr_for, p256};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::Value;
use tokio::sync::oneshot;
use tonic::Code;
use trellis_control_plane::authn::tokenreview::{
    KubeApi, ReviewError, TOKENREVIEW_PATH, TokenReviewer,
};
use trellis_core::TrustDomain;
use trellis_proto::identity::v1::certify_request::Proof;
use trellis_proto::identity::v1::{CertifyRequest, CertifyResponse};

/// The control plane's own bearer token, as its pod would mount it.
const BEARER: &str = "control-plane-sa-token";
/// Tokens the fake API server knows, and the answer each gets.
const WEB_TOKEN: &str = "projected-token-of-shop-web";
const EXPIRED_TOKEN: &str = "expired-projected-token";
const API_AUDIENCE_TOKEN: &str = "token-for-the-api-servers-audience";
const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

fn fixture(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/k8s/tokenreview")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// What the fake API server answers for a reviewed token.
type Answer = fn(&str) -> (u16, &'static str);

/// Answers by token, as the API server would for these tokens.
fn by_token(token: &str) -> (u16, &'static str) {
    match token {
        WEB_TOKEN => (201, "authenticated.json"),
        API_AUDIENCE_TOKEN => (201, "wrong-audience.json"),
        _ => (201, "not-authenticated.json"),
    }
}

/// One request as the fake API server received it.
#[derive(Clone, Debug)]
struct Recorded {
    method: String,
    path: String,
    headers: HashMap<String, String>,
    body: Value,
}

/// A local HTTPS server standing in for the Kubernetes API server.
struct FakeApi {
    addr: SocketAddr,
    dir: tempfile::TempDir,
    requests: Arc<Mutex<Vec<Recorded>>>,
    _stop: oneshot::Sender<()>,
}

impl FakeApi {
    async fn start(answer: Answer) -> Self {
        Self::start_with(answer, false).await
    }

    /// `silent`: accept connections but never answer (a hung API server).
    async fn start_with(answer: Answer, silent: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cert = ServingCert::new("fake kubernetes CA");
        std::fs::write(dir.path().join("ca.crt"), &cert.ca_pem).unwrap();
        std::fs::write(dir.path().join("token"), format!("{BEARER}\n")).unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let record = requests.clone();
        let answering = if silent {
            Answering::Never
        } else {
            Answering::Yes
        };
        let (addr, stop) = serve_https(&cert, answering, move |req| {
            let record = record.clone();
            async move { serve(req, answer, &record).await }
        })
        .await;
        Self {
            addr,
            dir,
            requests,
            _stop: stop,
        }
    }

    fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    fn token_file(&self) -> PathBuf {
        self.dir.path().join("token")
    }

    fn api(&self) -> KubeApi {
        KubeApi::resolve(
            Some(&self.url()),
            Some(&self.ca()),
            Some(&self.token_file()),
        )
        .unwrap()
    }

    fn reviewer(&self) -> TokenReviewer {
        TokenReviewer::new(&self.api(), td()).unwrap()
    }

    fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    /// The flags that point the control plane at this server.
    fn flags(&self) -> Vec<String> {
        vec![
            "--identity-provider".into(),
            "kubernetes".into(),
            "--kube-api".into(),
            self.url(),
            "--kube-ca".into(),
            self.ca().display().to_string(),
            "--kube-token-file".into(),
            self.token_file().display().to_string(),
        ]
    }
}

async fn serve(
    req: Request<Incoming>,
    answer: Answer,
    record: &Mutex<Vec<Recorded>>,
) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let token = body["spec"]["token"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    record.lock().unwrap().push(Recorded {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_owned()))
            .collect(),
        body,
    });
    let (status, file) = if parts.uri.path() == TOKENREVIEW_PATH {
        answer(&token)
    } else {
        (404, "unauthorized-401.json")
    };
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(fixture(file))))
        .unwrap()
}

fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").unwrap()
}

/// A JWT-shaped token whose payload says it expires at `exp` (unsigned: the
/// fake API server does not look at it, and the reviewer only reads `exp`).
fn jwt_expiring_at(exp: u64) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    format!(
        "{}.{}.c2lnbmF0dXJl",
        b64(r#"{"alg":"RS256","kid":"k"}"#),
        b64(&format!(r#"{{"aud":["trellis"],"exp":{exp}}}"#))
    )
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

// ---- the reviewer against the fake API server ----

/// No Kubernetes API server can run here; the fake answers with the stand-in
/// API server response for an authenticated projected token of shop/web.
/// The request must be the TokenReview the API server expects.
#[tokio::test]
async fn an_authenticated_token_gives_the_service_accounts_identity() {
    let api = FakeApi::start(by_token).await;
    let account = api.reviewer().review(WEB_TOKEN).await.unwrap();
    assert_eq!(account.spiffe_id.as_str(), WEB);
    assert_eq!(account.namespace, "shop");
    assert_eq!(account.service_account, "web");

    let requests = api.requests();
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(request.method, "POST");
    assert_eq!(request.path, "/apis/authentication.k8s.io/v1/tokenreviews");
    assert_eq!(request.headers["authorization"], format!("Bearer {BEARER}"));
    assert_eq!(request.headers["content-type"], "application/json");
    assert_eq!(request.body["apiVersion"], "authentication.k8s.io/v1");
    assert_eq!(request.body["kind"], "TokenReview");
    assert_eq!(request.body["spec"]["token"], WEB_TOKEN);
    assert_eq!(
        request.body["spec"]["audiences"],
        serde_json::json!(["trellis"])
    );
}

/// No Kubernetes API server can run here; the fake answers with the stand-in
/// API server response for an expired token (not authenticated, with an error).
#[tokio::test]
async fn an_unauthenticated_token_is_refused_with_the_api_servers_reason() {
    let api = FakeApi::start(by_token).await;
    let e = api.reviewer().review(EXPIRED_TOKEN).await.unwrap_err();
    assert!(matches!(e, ReviewError::NotAuthenticated(_)), "{e}");
    assert!(e.is_callers_fault());
    assert!(e.to_string().contains("has expired"), "{e}");
    assert!(
        !e.to_string().contains(EXPIRED_TOKEN),
        "never echo the token: {e}"
    );
}

/// No Kubernetes API server can run here; the fake answers with the stand-in
/// API server response of an authentication without audience `trellis`.
#[tokio::test]
async fn a_token_for_another_audience_is_refused() {
    let api = FakeApi::start(by_token).await;
    let e = api.reviewer().review(API_AUDIENCE_TOKEN).await.unwrap_err();
    assert!(matches!(e, ReviewError::WrongAudience(_)), "{e}");
    assert!(e.is_callers_fault());
    assert!(e.to_string().contains("audience \"trellis\""), "{e}");
}

/// No Kubernetes API server can run here; the fakes answer with the stand-in
/// API server Status objects of a refused request (401: our bearer token;
/// 403: our RBAC). That is the control plane's problem, not the caller's.
#[tokio::test]
async fn api_server_refusals_are_not_the_callers_fault() {
    let unauthorized = FakeApi::start(|_| (401, "unauthorized-401.json")).await;
    let e = unauthorized.reviewer().review(WEB_TOKEN).await.unwrap_err();
    assert!(matches!(e, ReviewError::Refused { code: 401, .. }), "{e}");
    assert!(!e.is_callers_fault());

    let forbidden = FakeApi::start(|_| (403, "forbidden-403.json")).await;
    let e = forbidden.reviewer().review(WEB_TOKEN).await.unwrap_err();
    assert!(matches!(e, ReviewError::Refused { code: 403, .. }), "{e}");
    assert!(e.to_string().contains("cannot create resource"), "{e}");
    assert!(e.to_string().contains("RBAC"), "{e}");
}

/// No Kubernetes API server can run here; the fake answers with stand-in API
/// server responses and counts the reviews it gets.
#[tokio::test]
async fn successes_are_cached_briefly_and_failures_not_at_all() {
    let api = FakeApi::start(by_token).await;
    let reviewer = api.reviewer();
    reviewer.review(WEB_TOKEN).await.unwrap();
    reviewer.review(WEB_TOKEN).await.unwrap();
    assert_eq!(api.requests().len(), 1, "the second review is cached");

    reviewer.review(EXPIRED_TOKEN).await.unwrap_err();
    reviewer.review(EXPIRED_TOKEN).await.unwrap_err();
    assert_eq!(api.requests().len(), 3, "failures are asked again");

    let uncached = api.reviewer().with_cache_ttl(Duration::ZERO);
    uncached.review(WEB_TOKEN).await.unwrap();
    uncached.review(WEB_TOKEN).await.unwrap();
    assert_eq!(api.requests().len(), 5);

    let short = api.reviewer().with_cache_ttl(Duration::from_millis(200));
    short.review(WEB_TOKEN).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    short.review(WEB_TOKEN).await.unwrap();
    assert_eq!(api.requests().len(), 7, "an entry ends with its TTL");
}

/// No Kubernetes API server can run here; the fake authenticates any token
/// with the stand-in API server response. A token whose own `exp` has
/// passed is never cached, whatever the TTL.
#[tokio::test]
async fn the_cache_never_outlives_the_tokens_expiry() {
    let api = FakeApi::start(|_| (201, "authenticated.json")).await;
    let reviewer = api.reviewer();
    let expired = jwt_expiring_at(unix_now() - 1);
    reviewer.review(&expired).await.unwrap();
    reviewer.review(&expired).await.unwrap();
    assert_eq!(api.requests().len(), 2);

    let fresh = jwt_expiring_at(unix_now() + 600);
    reviewer.review(&fresh).await.unwrap();
    reviewer.review(&fresh).await.unwrap();
    assert_eq!(api.requests().len(), 3);
}

/// No Kubernetes API server can run here: an API server that is not there,
/// one that never answers, and one whose certificate is not from --kube-ca.
#[tokio::test]
async fn an_api_server_out_of_reach_is_unavailable() {
    let gone = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let api = FakeApi::start(by_token).await;
    let mut unreachable = api.api();
    unreachable.url = format!("https://{gone}").parse().unwrap();
    let e = TokenReviewer::new(&unreachable, td())
        .unwrap()
        .review(WEB_TOKEN)
        .await
        .unwrap_err();
    assert!(matches!(e, ReviewError::Unreachable(_)), "{e}");
    assert!(!e.is_callers_fault());

    let hung = FakeApi::start_with(by_token, true).await;
    let e = hung
        .reviewer()
        .with_timeout(Duration::from_millis(300))
        .review(WEB_TOKEN)
        .await
        .unwrap_err();
    assert!(matches!(e, ReviewError::Unreachable(_)), "{e}");
    assert!(e.to_string().contains("within"), "{e}");

    let other = FakeApi::start(by_token).await;
    let mut untrusted = api.api();
    untrusted.ca = other.ca();
    let e = TokenReviewer::new(&untrusted, td())
        .unwrap()
        .review(WEB_TOKEN)
        .await
        .unwrap_err();
    assert!(matches!(e, ReviewError::Unreachable(_)), "{e}");
    assert!(e.to_string().contains("TLS"), "{e}");
    assert!(
        api.requests().is_empty(),
        "nothing was sent to an unverified server"
    );
}

/// No Kubernetes API server can run here; the fake answers with the stand-in
/// API server response and records the bearer token of each request. The
/// kubelet rotates the control plane's token in its file; the reviewer
/// re-reads it.
#[tokio::test]
async fn the_bearer_token_file_is_re_read() {
    let api = FakeApi::start(|_| (201, "authenticated.json")).await;
    let reviewer = api
        .reviewer()
        .with_cache_ttl(Duration::ZERO)
        .with_bearer_reload(Duration::from_millis(100));
    reviewer.review("first").await.unwrap();
    std::fs::write(api.token_file(), "rotated-token\n").unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    reviewer.review("second").await.unwrap();
    std::fs::write(api.token_file(), "").unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    reviewer.review("third").await.unwrap();
    let bearers: Vec<String> = api
        .requests()
        .iter()
        .map(|r| r.headers["authorization"].clone())
        .collect();
    assert_eq!(
        bearers,
        [
            format!("Bearer {BEARER}"),
            "Bearer rotated-token".into(),
            "Bearer rotated-token".into(),
        ],
        "an unreadable or empty file keeps the last token"
    );
}

/// No Kubernetes API server can run here; the fake records requests, and an
/// empty token must not make one.
#[tokio::test]
async fn empty_tokens_never_reach_the_api_server() {
    let api = FakeApi::start(by_token).await;
    let e = api.reviewer().review("  \n").await.unwrap_err();
    assert!(matches!(e, ReviewError::Empty), "{e}");
    assert!(api.requests().is_empty());
}

// ---- Certify through the real binary ----

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
