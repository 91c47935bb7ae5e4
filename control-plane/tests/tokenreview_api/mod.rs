//! A local HTTPS server (a self-made CA, tokio-rustls + hyper) that plays
//! the Kubernetes API server for TokenReview: it answers `POST
//! /apis/authentication.k8s.io/v1/tokenreviews` with the API server
//! responses in `fixtures/k8s/tokenreview/` (stand-ins for recorded
//! responses; see the README there) and records every request it gets. At
//! `GET /openid/v1/jwks` it serves the issuer keys a test publishes
//! ([`IssuerKeys`]; none: 404, as a path it does not serve), counting the
//! fetches apart from the reviews.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::common::serving::{Answering, ApiServer};
use base64::Engine as _;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::Value;
use trellis_control_plane::authn::jwks::JWKS_PATH;
use trellis_control_plane::authn::tokenreview::{TOKENREVIEW_PATH, TokenReviewer};
use trellis_core::TrustDomain;

/// The crate's test issuer keys and tokens, shared with its unit tests.
#[path = "../../src/authn/jwks/testing.rs"]
mod signer;
pub use signer::{Signer, jwks};

/// The control plane's own bearer token, as its pod would mount it.
pub const BEARER: &str = "control-plane-sa-token";
/// Tokens the fake API server knows, and the answer each gets: JWT-shaped
/// as projected tokens are (the control plane refuses any other shape
/// without a review), their payloads for audience `trellis` and expiring in
/// 2100, unsigned: the fake does not check, it answers by token.
pub const WEB_TOKEN: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsifQ.eyJhdWQiOlsidHJlbGxpcyJdLCJleHAiOjQxMDI0NDQ4MDAsInN1YiI6InN5c3RlbTpzZXJ2aWNlYWNjb3VudDpzaG9wOndlYiJ9.c2lnbmF0dXJl";
/// One the fake answers expired (not authenticated), as the API server
/// answers a token whose pod is gone whatever its payload says.
pub const EXPIRED_TOKEN: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsifQ.eyJhdWQiOlsidHJlbGxpcyJdLCJleHAiOjQxMDI0NDQ4MDAsInN1YiI6InN5c3RlbTpzZXJ2aWNlYWNjb3VudDpzaG9wOmV4cGlyZWQifQ.c2lnbmF0dXJl";
/// One the fake answers authenticated for the API server's own audience.
pub const API_AUDIENCE_TOKEN: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsifQ.eyJhdWQiOlsidHJlbGxpcyJdLCJleHAiOjQxMDI0NDQ4MDAsInN1YiI6InN5c3RlbTpzZXJ2aWNlYWNjb3VudDpzaG9wOm90aGVyLWF1ZGllbmNlIn0.c2lnbmF0dXJl";
pub const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

pub fn fixture(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/k8s/tokenreview")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// What the fake API server answers for a reviewed token.
type Answer = fn(&str) -> (u16, &'static str);

/// Answers by token, as the API server would for these tokens.
pub fn by_token(token: &str) -> (u16, &'static str) {
    match token {
        WEB_TOKEN => (201, "authenticated.json"),
        API_AUDIENCE_TOKEN => (201, "wrong-audience.json"),
        _ => (201, "not-authenticated.json"),
    }
}

/// One request as the fake API server received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub headers: HashMap<String, String>,
    pub body: Value,
}

/// What the stand-in answers at `GET /openid/v1/jwks`, and how often it
/// was asked.
#[derive(Clone, Default)]
pub struct IssuerKeys {
    answer: Arc<Mutex<Option<(u16, String)>>>,
    fetches: Arc<AtomicUsize>,
}

impl IssuerKeys {
    /// Publishes the key set `jwks` (200).
    pub fn publish(&self, jwks: String) {
        self.answer(200, jwks);
    }

    /// Answers `status` with `body` from now on.
    pub fn answer(&self, status: u16, body: String) {
        *self.answer.lock().unwrap() = Some((status, body));
    }

    /// How many times the key set was asked for.
    pub fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    fn serve(&self) -> (u16, String) {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        self.answer
            .lock()
            .unwrap()
            .clone()
            .unwrap_or_else(|| (404, fixture("not-found-404.json")))
    }
}

/// A local HTTPS server standing in for the Kubernetes API server.
pub struct FakeApi {
    server: ApiServer,
    requests: Arc<Mutex<Vec<Recorded>>>,
    /// Its `GET /openid/v1/jwks`.
    pub keys: IssuerKeys,
}

impl std::ops::Deref for FakeApi {
    type Target = ApiServer;

    fn deref(&self) -> &ApiServer {
        &self.server
    }
}

impl FakeApi {
    pub async fn start(answer: Answer) -> Self {
        Self::start_with(answer, false).await
    }

    /// `silent`: accept connections but never answer (a hung API server).
    pub async fn start_with(answer: Answer, silent: bool) -> Self {
        let requests = Arc::new(Mutex::new(Vec::new()));
        let record = requests.clone();
        let keys = IssuerKeys::default();
        let serving = keys.clone();
        let answering = if silent {
            Answering::Never
        } else {
            Answering::Yes
        };
        let server = ApiServer::start(&format!("{BEARER}\n"), answering, move |req| {
            let (record, keys) = (record.clone(), serving.clone());
            async move { serve(req, answer, &record, &keys).await }
        })
        .await;
        Self {
            server,
            requests,
            keys,
        }
    }

    pub fn reviewer(&self) -> TokenReviewer {
        TokenReviewer::new(&self.api(), td()).unwrap()
    }

    /// The requests other than for the issuer keys: the reviews.
    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    /// The flags that point the control plane at this server.
    pub fn flags(&self) -> Vec<String> {
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

pub async fn serve(
    req: Request<Incoming>,
    answer: Answer,
    record: &Mutex<Vec<Recorded>>,
    keys: &IssuerKeys,
) -> Response<Full<Bytes>> {
    if req.method() == http::Method::GET && req.uri().path() == JWKS_PATH {
        let (status, body) = keys.serve();
        return Response::builder()
            .status(StatusCode::from_u16(status).unwrap())
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
    }
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

pub fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").unwrap()
}

/// A JWT-shaped token whose payload says it expires at `exp` (unsigned: the
/// fake API server does not look at it, and the reviewer only reads `exp`).
pub fn jwt_expiring_at(exp: u64) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    format!(
        "{}.{}.c2lnbmF0dXJl",
        b64(r#"{"alg":"RS256","kid":"k"}"#),
        b64(&format!(r#"{{"aud":["trellis"],"exp":{exp}}}"#))
    )
}

/// A JWT-shaped token for audience `trellis`, expiring in 2100, told from
/// others by `subject` (unsigned, like [`jwt_expiring_at`]'s).
pub fn jwt_of(subject: &str) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    format!(
        "{}.{}.c2lnbmF0dXJl",
        b64(r#"{"alg":"RS256","kid":"k"}"#),
        b64(&format!(
            r#"{{"aud":["trellis"],"exp":4102444800,"sub":{subject:?}}}"#
        ))
    )
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
