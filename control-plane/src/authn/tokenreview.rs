//! Kubernetes ServiceAccount tokens, checked with the TokenReview API.
//!
//! A meshed pod's sidecar presents the projected token of its
//! ServiceAccount (audience `trellis`). [`TokenReviewer::review`] POSTs an
//! `authentication.k8s.io/v1` TokenReview to the API server and accepts the
//! token only when the answer says `status.authenticated: true`, lists
//! `trellis` in `status.audiences` (an empty list means the API server's own
//! audience, so it is refused), and names a ServiceAccount
//! (`system:serviceaccount:NS:SA`). The identity is derived from that answer,
//! never from the token: `spiffe://TD/ns/NS/sa/SA`.
//!
//! The API server is reached at `--kube-api` or, in a pod, at
//! `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`, verified
//! against `--kube-ca` (default: the pod's service-account `ca.crt`); the
//! control plane authenticates with the bearer token in `--kube-token-file`
//! (default: the pod's service-account `token`), re-read every minute because
//! the kubelet rotates it. TLS 1.2 or 1.3: this is the cluster's API server,
//! not a mesh peer.
//!
//! Before any review, a token is refused without asking the API server
//! when it cannot be one the API server would accept ([`precheck`]): not
//! shaped as a JWT, or its payload (read without checking the signature)
//! says it expired or is for another audience. Certify needs no client
//! certificate, so anyone can send made-up tokens; these checks keep them
//! from costing reviews. They only refuse: the TokenReview stays the one
//! authority on a token that passes them.
//!
//! A made-up token that passes them, each with a fresh subject, would still
//! cost a review; so its signature is checked next against the cluster's
//! service account issuer keys ([`jwks`]), fetched
//! from [`JWKS_PATH`] with the same connections, CA and bearer token as the
//! reviews: on first need, again when a token names a key ID the set
//! lacks, and in the background once the set is [`KEYS_REFETCH`] old, but
//! never twice within [`KEYS_REFETCH`]. A token whose signature does not
//! verify, that names a key the cluster does not publish, or that is
//! signed with an algorithm other than RS256, ES256, ES384 and ES512 is refused without
//! a review. Keys that cannot be had (the API server out of reach, a 403,
//! a document that is not a key set) leave the token to the review alone,
//! as without this check, with a warning at most every [`KEYS_WARN_EVERY`]
//! saying why. A signature that verifies proves only that the cluster once
//! issued the token: the review still decides.
//!
//! Successful reviews are cached under the SHA-256 of the token for at most
//! [`CACHE_TTL`], and never past the token's own `exp` (read from the JWT
//! payload without trusting it: it can only shorten the entry). A token the
//! API server refused, or refused for its signature, is remembered the same
//! way for [`REFUSAL_CACHE_TTL`],
//! so the same bad token sent again is refused without another review; a
//! sidecar retrying with a fresh token is reviewed again. A review waits
//! for one of [`MAX_REVIEWS_IN_FLIGHT`] turns at most [`TURN_WAIT`], then
//! is refused as the control plane being busy, not the API server being
//! unreachable; its own [`REVIEW_TIMEOUT`] starts with its turn.
//!
//! The turns are shared between client addresses: one address may have at
//! most [`MAX_REVIEWS_PER_CLIENT`] reviews in progress (waiting for a turn
//! or asked), and one more from it is refused at once, before it waits,
//! naming that limit. A caller sending made-up tokens that pass the checks
//! above, each different, thus holds a few turns, not all of them, and the
//! first Certify of a new pod elsewhere still gets a review. Only addresses
//! with reviews in progress are remembered. Loopback callers are not held to
//! it: they are on the control plane's own host (in a cluster, in its own
//! pod), where a local mesh may start many sidecars at once.
//!
//! Connections to the API server are kept open between reviews (at most
//! [`MAX_REVIEWS_IN_FLIGHT`] of them, each idle at most [`IDLE_CONNECTION`]
//! and open at most [`CONNECTION_LIFETIME`]), so a mesh whose pods start
//! together costs the API server one TLS handshake per connection, not one
//! per review.
//!
//! Neither the reviewed token nor the bearer token ever reaches a log or an
//! error message.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio_rustls::TlsConnector;
use trellis_core::flags::FlagNames;
use trellis_core::grpc::CertifyRefusal;
use trellis_core::{SpiffeId, TrustDomain};

use crate::authn::jwks::{self, IssuerKeys, JWKS_PATH, SignatureError};
use crate::config::{is_dns_label, is_dns_subdomain};
use crate::escape::shown;

/// The audience the projected tokens are made for, and the only one asked for.
pub const AUDIENCE: &str = crate::inject::TOKEN_AUDIENCE;
/// Where TokenReviews are created.
pub const TOKENREVIEW_PATH: &str = "/apis/authentication.k8s.io/v1/tokenreviews";
/// The API server's CA inside a pod.
pub const IN_CLUSTER_CA: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";
/// The control plane's own ServiceAccount token inside a pod.
pub const IN_CLUSTER_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
/// The longest a successful review is trusted without asking again.
pub const CACHE_TTL: Duration = Duration::from_secs(60);
/// How long one review may take, connection included.
pub const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the bearer token file is re-read.
pub const BEARER_RELOAD: Duration = Duration::from_secs(60);
/// Tokens longer than this are refused without asking the API server.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;
/// How many reviews are asked of the API server at once; more wait their
/// turn at most [`TURN_WAIT`]. Certify needs no client certificate, so
/// a flood of made-up tokens would otherwise open as many connections to
/// the API server, and fill the control plane's share of it, as it likes.
pub const MAX_REVIEWS_IN_FLIGHT: usize = 32;
/// How many reviews one client address may have in progress at once
/// (waiting for one of the [`MAX_REVIEWS_IN_FLIGHT`] turns, or asked); one
/// more is refused at once. A pod asks one review at a time, and in a
/// cluster every pod has an address of its own, so only a caller sending
/// many tokens at once runs into it; callers from the host's own address
/// (`127.0.0.1`, `::1`), as on the gRPC port's connection cap, never do.
pub const MAX_REVIEWS_PER_CLIENT: usize = 4;
/// How long a connection to the API server is kept idle for the next
/// review. Below the API server's own idle timeout (Go's HTTP server keeps
/// an idle connection as long as it allows a read, at least a minute here).
pub const IDLE_CONNECTION: Duration = Duration::from_secs(30);
/// How long a connection to the API server is used at most, so a moved or
/// re-balanced API server endpoint is picked up.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(300);
/// The largest API server answer read.
const MAX_RESPONSE: usize = 1 << 20;
/// How long a review waits for one of the [`MAX_REVIEWS_IN_FLIGHT`] turns
/// before it is refused as the control plane being busy. Apart from
/// [`REVIEW_TIMEOUT`], which starts with the turn: a caller kept waiting by
/// a flood of other reviews is told so, not that the API server is
/// unreachable.
pub const TURN_WAIT: Duration = Duration::from_secs(5);
/// How long a token the API server refused is refused again without a
/// review: long enough that a caller repeating one bad token costs one
/// review in that time, short enough that a token refused while the API
/// server had not yet seen its new pod is soon reviewed again.
pub const REFUSAL_CACHE_TTL: Duration = Duration::from_secs(10);
/// How far past its `exp` a token's payload may say it is before it is
/// refused without a review: the control plane's clock may run ahead of
/// the API server's.
pub const EXPIRY_LEEWAY: Duration = Duration::from_secs(60);
/// The least time between two fetches of the issuer keys: a token naming
/// a key ID the set does not have fetches it again at most this often (so
/// made-up key IDs cost the API server one GET in that time), and a set
/// this old is refreshed in the background when next used.
pub const KEYS_REFETCH: Duration = Duration::from_secs(30);
/// How long a fetch of the issuer keys may take (at most the review's own
/// timeout).
pub const KEYS_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the issuer keys being out of reach is logged at most.
pub const KEYS_WARN_EVERY: Duration = Duration::from_secs(10);
/// Cached reviews (and, apart, cached refusals) kept at most; beyond,
/// expired ones go, then all.
const CACHE_CAPACITY: usize = 10_000;

/// Where the Kubernetes API server is and how to trust and call it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubeApi {
    /// `https://host[:port][/prefix]`.
    pub url: Uri,
    /// PEM roots that verify the API server's certificate.
    pub ca: PathBuf,
    /// File holding the bearer token the control plane sends.
    pub token_file: PathBuf,
}

impl KubeApi {
    /// From the flags: `url` (else the pod's environment), `ca` (else the
    /// pod's service-account CA, read now: a CA that cannot verify anything
    /// is a configuration error) and `token_file` (else the pod's
    /// service-account token, read now too, only to check that it can be
    /// read and holds a token: it is read again when used, and its content
    /// is never part of an error). The error is a sentence naming the flag
    /// as `names` does.
    pub fn resolve(
        url: Option<&str>,
        ca: Option<&Path>,
        token_file: Option<&Path>,
        names: &dyn FlagNames,
    ) -> Result<Self, String> {
        let url = match url {
            Some(url) => parse_api_url(url)
                .map_err(|e| format!("{} {url:?}: {e}", names.name("kube-api")))?,
            None => in_cluster_url(names)?,
        };
        let ca = usable_file(ca, &names.name("kube-ca"), IN_CLUSTER_CA, "CA", read_roots)?;
        let token_file = usable_file(
            token_file,
            &names.name("kube-token-file"),
            IN_CLUSTER_TOKEN,
            "token",
            read_bearer,
        )?;
        Ok(Self {
            url,
            ca,
            token_file,
        })
    }
}

/// The file given with `flag`, else the pod's own `pods` file at
/// `in_cluster`, once `read` finds it usable. The error names the flag (or
/// says it was not given) and the file, and what `read` says of it.
fn usable_file<T>(
    given: Option<&Path>,
    flag: &str,
    in_cluster: &str,
    pods: &str,
    read: impl FnOnce(&Path) -> Result<T, String>,
) -> Result<PathBuf, String> {
    let path = given.map_or_else(|| in_cluster.into(), Path::to_path_buf);
    read(&path).map_err(|e| match given {
        Some(_) => format!("{flag} {}: {e}", shown(&path)),
        None => format!(
            "no {flag} given, and the pod's {pods} {}: {e}",
            shown(&path)
        ),
    })?;
    Ok(path)
}

/// The roots of the PEM file at `path`, which must hold at least one
/// certificate.
fn read_roots(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| e.to_string())? {
        let cert = cert.map_err(|e| e.to_string())?;
        roots.add(cert).map_err(|e| e.to_string())?;
    }
    if roots.is_empty() {
        return Err("no certificate in the file".into());
    }
    Ok(roots)
}

/// Checks an API server URL: `https`, a host, no query.
pub fn parse_api_url(s: &str) -> Result<Uri, String> {
    let uri: Uri = s.parse().map_err(|e| format!("not a URL: {e}"))?;
    if uri.scheme_str() != Some("https") {
        return Err("the Kubernetes API is only reached over https://".into());
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("no host".into());
    }
    if uri.query().is_some() {
        return Err("a query has no place in the API server URL".into());
    }
    Ok(uri)
}

fn in_cluster_url(names: &dyn FlagNames) -> Result<Uri, String> {
    let host = std::env::var("KUBERNETES_SERVICE_HOST")
        .ok()
        .filter(|h| !h.is_empty());
    let port = std::env::var("KUBERNETES_SERVICE_PORT")
        .ok()
        .filter(|p| !p.is_empty());
    let Some(host) = host else {
        return Err(format!(
            "{} kubernetes: no {} given and KUBERNETES_SERVICE_HOST is not set (not running \
             in a pod)",
            names.name("identity-provider"),
            names.name("kube-api")
        ));
    };
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host
    };
    let url = format!("https://{host}:{}", port.as_deref().unwrap_or("443"));
    parse_api_url(&url).map_err(|e| format!("KUBERNETES_SERVICE_HOST/PORT give {url:?}: {e}"))
}

/// Why the reviewer cannot be set up (start-up fails naming the file).
#[derive(Debug, thiserror::Error)]
pub enum KubeSetupError {
    #[error("Kubernetes API CA {}: {message}", shown(path))]
    Ca { path: PathBuf, message: String },
    #[error("Kubernetes API token {}: {message}", shown(path))]
    Token { path: PathBuf, message: String },
    #[error("Kubernetes API TLS: {0}")]
    Tls(#[from] rustls::Error),
}

/// A ServiceAccount the API server vouched for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReviewedAccount {
    pub namespace: String,
    pub service_account: String,
    /// `spiffe://TD/ns/NS/sa/SA`.
    pub spiffe_id: SpiffeId,
}

/// Why a token was not accepted. [`ReviewError::is_callers_fault`] splits the
/// caller's problems (UNAUTHENTICATED) from ours (UNAVAILABLE).
#[derive(Clone, Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("the service account token is empty")]
    Empty,
    #[error("the service account token is longer than {MAX_TOKEN_LEN} bytes")]
    TooLong,
    #[error(
        "the service account token is not a JWT: {0}; a ServiceAccount token is three \
         base64url parts separated by dots, the second a JSON object"
    )]
    NotAJwt(&'static str),
    #[error(
        "the service account token expired (its exp claim is past); the kubelet renews a \
         projected token before then: read the token file again"
    )]
    Expired,
    #[error(
        "the service account token is not for audience \"trellis\" (its aud claim does not \
         include it); mount a projected token with audience \"trellis\""
    )]
    NotForAudience,
    #[error("the Kubernetes API server did not authenticate the service account token: {0}")]
    NotAuthenticated(String),
    #[error(
        "the service account token is not valid for audience \"trellis\" (the API server's review \
         lists audiences {0:?}); mount a projected token with audience \"trellis\""
    )]
    WrongAudience(Vec<String>),
    #[error("the token belongs to {0:?}, not to a Kubernetes ServiceAccount")]
    NotAServiceAccount(String),
    #[error("the ServiceAccount {0:?} does not make a valid SPIFFE ID")]
    BadAccount(String),
    #[error("cannot reach the Kubernetes API server for a TokenReview: {0}")]
    Unreachable(String),
    #[error(
        "the control plane is busy reviewing service account tokens: all \
         {MAX_REVIEWS_IN_FLIGHT} of its TokenReview turns stayed taken for {}; try again",
        trellis_core::duration::Words(*.0)
    )]
    Busy(Duration),
    #[error(
        "this client address already has {MAX_REVIEWS_PER_CLIENT} service account token reviews \
         in progress, the most one address may have at once; try again once they are answered"
    )]
    ClientBusy,
    #[error(
        "the Kubernetes API server refused the TokenReview ({code}: {message}); check the \
         control plane's credentials and its RBAC (create tokenreviews)"
    )]
    Refused { code: u16, message: String },
    #[error("unusable TokenReview answer from the Kubernetes API server: {0}")]
    BadResponse(String),
    #[error(transparent)]
    Signature(#[from] SignatureError),
}

impl ReviewError {
    /// True when the token is at fault (UNAUTHENTICATED); false when the
    /// review itself could not be made (UNAVAILABLE: try again later).
    pub fn is_callers_fault(&self) -> bool {
        matches!(
            self,
            Self::Empty
                | Self::TooLong
                | Self::NotAJwt(_)
                | Self::Expired
                | Self::NotForAudience
                | Self::NotAuthenticated(_)
                | Self::WrongAudience(_)
                | Self::NotAServiceAccount(_)
                | Self::BadAccount(_)
                | Self::Signature(_)
        )
    }

    /// A short label for metrics and logs.
    pub fn reason(&self) -> CertifyRefusal {
        use CertifyRefusal as R;
        match self {
            Self::Empty
            | Self::TooLong
            | Self::NotAJwt(_)
            | Self::Signature(SignatureError::BadHeader) => R::SaTokenMalformed,
            Self::Signature(_) => R::SaTokenBadSignature,
            Self::NotAuthenticated(_) | Self::Expired => R::SaTokenNotAuthenticated,
            Self::WrongAudience(_) | Self::NotForAudience => R::SaTokenWrongAudience,
            Self::NotAServiceAccount(_) | Self::BadAccount(_) => R::SaTokenNotServiceAccount,
            Self::Unreachable(_) => R::KubeApiUnreachable,
            Self::Busy(_) => R::TokenReviewsBusy,
            Self::ClientBusy => R::TokenReviewsPerClient,
            Self::Refused { .. } => R::KubeApiRefused,
            Self::BadResponse(_) => R::KubeApiBadResponse,
        }
    }
}

struct Bearer {
    token: String,
    read_at: Instant,
}

/// Answers remembered under the SHA-256 of a token, each until its own
/// time, at most [`CACHE_CAPACITY`] of them.
struct Cache<T> {
    entries: HashMap<[u8; 32], (T, Instant)>,
}

impl<T: Clone> Cache<T> {
    fn new() -> Self {
        Self {
            entries: HashMap::new(),
        }
    }

    /// The answer remembered for `key`, unless its time has passed.
    fn get(&mut self, key: &[u8; 32]) -> Option<T> {
        match self.entries.get(key) {
            Some((value, until)) if *until > Instant::now() => Some(value.clone()),
            Some(_) => {
                self.entries.remove(key);
                None
            }
            None => None,
        }
    }

    /// Remembers `value` for `key` for `ttl`; when full, the expired
    /// entries go first, then all of them.
    fn insert(&mut self, key: [u8; 32], value: T, ttl: Duration) {
        let now = Instant::now();
        if self.entries.len() >= CACHE_CAPACITY {
            self.entries.retain(|_, (_, until)| *until > now);
            if self.entries.len() >= CACHE_CAPACITY {
                self.entries.clear();
            }
        }
        self.entries.insert(key, (value, now + ttl));
    }
}

/// Reviews ServiceAccount tokens against one API server (see the module docs).
pub struct TokenReviewer {
    trust_domain: TrustDomain,
    api: Arc<ApiClient>,
    /// The cluster's service account issuer keys, as last fetched.
    keys: Arc<KeyCache>,
    cache: Mutex<Cache<ReviewedAccount>>,
    cache_ttl: Duration,
    /// Tokens the API server refused, and why.
    refused: Mutex<Cache<ReviewError>>,
    timeout: Duration,
    turn_wait: Duration,
    /// One permit for each review asked of the API server now.
    in_flight: tokio::sync::Semaphore,
    /// Reviews in progress by client address.
    clients: ClientShares,
}

/// How the reviewer reaches the API server: its address, TLS, bearer
/// token and the connections kept open between requests.
struct ApiClient {
    url: Uri,
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    tls: TlsConnector,
    token_file: PathBuf,
    bearer: Mutex<Bearer>,
    bearer_reload: Duration,
    /// Connections between requests, the most recently used last.
    idle: Mutex<Vec<IdleConnection>>,
}

/// The issuer keys last fetched, and when and how the last fetch went.
struct KeyCache {
    /// The least time between two fetches ([`KEYS_REFETCH`]).
    refetch: Duration,
    state: Mutex<KeyState>,
    /// Held by the one fetch in progress.
    fetching: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct KeyState {
    /// The set of the last fetch that succeeded, and when it was fetched.
    keys: Option<(Arc<IssuerKeys>, Instant)>,
    /// When a fetch was last begun, whatever its outcome.
    attempted: Option<Instant>,
    /// Why the last fetch failed; `None` once one succeeds.
    failure: Option<String>,
    /// When falling back to the review alone was last logged.
    warned: Option<Instant>,
}

/// What a review does about the token's signature.
enum KeysNow {
    /// Verify with these keys.
    Use(Arc<IssuerKeys>),
    /// Fetch the keys first, then decide again.
    Fetch,
    /// The keys cannot be had: leave the token to the review.
    Fallback,
}

impl KeyCache {
    fn new(refetch: Duration) -> Self {
        Self {
            refetch,
            state: Mutex::default(),
            fetching: tokio::sync::Mutex::default(),
        }
    }

    /// Whether a fetch may begin: none was begun in the last `refetch`.
    fn due(&self, state: &KeyState) -> bool {
        state.attempted.is_none_or(|t| t.elapsed() >= self.refetch)
    }

    /// What to do for a token naming `kid` (`fetched`: this review fetched
    /// the keys, or waited for a fetch, already, and does not again), and
    /// whether a refresh of a set that knows it is due, to be made in the
    /// background: the set is [`KEYS_REFETCH`] old and no fetch began since.
    fn now(&self, kid: Option<&str>, fetched: bool) -> (KeysNow, bool) {
        let mut state = self.state.lock().expect("not poisoned");
        let due = self.due(&state);
        match &state.keys {
            Some((keys, at)) if kid.is_none_or(|kid| keys.has(kid)) => {
                let stale = due && at.elapsed() >= KEYS_REFETCH;
                (KeysNow::Use(keys.clone()), stale)
            }
            // Due, or a fetch is in progress: this review waits for it.
            _ if (due || self.fetching.try_lock().is_err()) && !fetched => (KeysNow::Fetch, false),
            // The last fetch succeeded and did not have the key: the
            // token is refused naming it.
            Some((keys, _)) if state.failure.is_none() => (KeysNow::Use(keys.clone()), false),
            _ => {
                if state.warned.is_none_or(|t| t.elapsed() >= KEYS_WARN_EVERY) {
                    state.warned = Some(Instant::now());
                    tracing::warn!(
                        error = state.failure.as_deref().unwrap_or("not fetched yet"),
                        "cannot get the cluster's service account issuer keys; tokens are \
                         checked with TokenReview alone, their signatures unchecked"
                    );
                }
                (KeysNow::Fallback, false)
            }
        }
    }

    /// Fetches the set from `api` now, unless another fetch was begun
    /// since this one was found due, and keeps the outcome: a failed fetch
    /// keeps the last set.
    async fn refresh(&self, api: &ApiClient, timeout: Duration) {
        let _one = self.fetching.lock().await;
        if !self.due(&self.state.lock().expect("not poisoned")) {
            return;
        }
        self.state.lock().expect("not poisoned").attempted = Some(Instant::now());
        let fetched = fetch_keys(api, timeout).await;
        let mut state = self.state.lock().expect("not poisoned");
        match fetched {
            Ok(keys) => {
                tracing::debug!(keys = keys.len(), "fetched the service account issuer keys");
                state.keys = Some((Arc::new(keys), Instant::now()));
                state.failure = None;
            }
            Err(why) => state.failure = Some(why),
        }
    }
}

/// `GET` [`JWKS_PATH`] of `api`: the issuer keys, or why not (a sentence
/// naming the URL).
async fn fetch_keys(api: &ApiClient, timeout: Duration) -> Result<IssuerKeys, String> {
    let url = format!("{}{JWKS_PATH}", api.url.to_string().trim_end_matches('/'));
    let (status, body) =
        match tokio::time::timeout(timeout, api.send(Method::GET, JWKS_PATH, None)).await {
            Err(_) => {
                return Err(format!(
                    "no answer from {url} within {}",
                    trellis_core::duration::words(timeout)
                ));
            }
            Ok(Err(ReviewError::Unreachable(why))) => return Err(why),
            Ok(Err(other)) => return Err(other.to_string()),
            Ok(Ok(answer)) => answer,
        };
    if !status.is_success() {
        let message = serde_json::from_slice::<ApiStatus>(&body)
            .ok()
            .map(|s| {
                if s.message.is_empty() {
                    s.reason
                } else {
                    s.message
                }
            })
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| status.canonical_reason().unwrap_or("no reason").to_owned());
        let hint = if status == StatusCode::FORBIDDEN {
            "; the default system:service-account-issuer-discovery ClusterRoleBinding lets \
             every ServiceAccount get it"
        } else {
            ""
        };
        return Err(format!(
            "{url} answered {} ({message}){hint}",
            status.as_u16()
        ));
    }
    IssuerKeys::parse(&body).map_err(|e| format!("{url}: {e}"))
}

/// How many reviews each client address has in progress; an address is
/// there only while it has at least one.
#[derive(Default)]
struct ClientShares {
    reviewing: Mutex<HashMap<IpAddr, usize>>,
}

impl ClientShares {
    /// One of `client`'s [`MAX_REVIEWS_PER_CLIENT`], given back when the
    /// share is dropped; none is needed without an address or from the host's
    /// own address.
    fn take(&self, client: Option<IpAddr>) -> Result<Option<Share<'_>>, ReviewError> {
        let Some(client) = client.map(|ip| ip.to_canonical()) else {
            return Ok(None);
        };
        if trellis_core::connections::is_own_host(client) {
            return Ok(None);
        }
        let mut reviewing = self.reviewing.lock().expect("not poisoned");
        let count = reviewing.entry(client).or_insert(0);
        if *count >= MAX_REVIEWS_PER_CLIENT {
            return Err(ReviewError::ClientBusy);
        }
        *count += 1;
        Ok(Some(Share {
            shares: self,
            client,
        }))
    }

    #[cfg(test)]
    fn addresses(&self) -> usize {
        self.reviewing.lock().expect("not poisoned").len()
    }
}

/// One review in progress from `client`.
struct Share<'a> {
    shares: &'a ClientShares,
    client: IpAddr,
}

impl Drop for Share<'_> {
    fn drop(&mut self) {
        let mut reviewing = self.shares.reviewing.lock().expect("not poisoned");
        if let Some(count) = reviewing.get_mut(&self.client) {
            *count -= 1;
            if *count == 0 {
                reviewing.remove(&self.client);
            }
        }
    }
}

/// An open HTTP/1.1 connection to the API server waiting for a review.
struct IdleConnection {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    since: Instant,
}

impl std::fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewer")
            .field("url", &self.api.url)
            .field("token_file", &self.api.token_file)
            .finish_non_exhaustive()
    }
}

impl TokenReviewer {
    /// Reads the CA and the bearer token now, so a missing file fails the
    /// start, not the first pod.
    pub fn new(api: &KubeApi, trust_domain: TrustDomain) -> Result<Self, KubeSetupError> {
        let ca_error = |message: String| KubeSetupError::Ca {
            path: api.ca.clone(),
            message,
        };
        let roots = read_roots(&api.ca).map_err(ca_error)?;
        let mut config = ClientConfig::builder_with_provider(trellis_core::tls::provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let token = read_bearer(&api.token_file).map_err(|message| KubeSetupError::Token {
            path: api.token_file.clone(),
            message,
        })?;
        let raw_host = api.url.host().unwrap_or_default();
        let host = raw_host.trim_start_matches('[').trim_end_matches(']');
        let server_name =
            ServerName::try_from(host.to_owned()).map_err(|e| KubeSetupError::Ca {
                path: api.ca.clone(),
                message: format!("cannot verify host {host:?}: {e}"),
            })?;
        Ok(Self {
            trust_domain,
            api: Arc::new(ApiClient {
                url: api.url.clone(),
                host: host.to_owned(),
                port: api.url.port_u16().unwrap_or(443),
                server_name,
                tls: TlsConnector::from(Arc::new(config)),
                token_file: api.token_file.clone(),
                bearer: Mutex::new(Bearer {
                    token,
                    read_at: Instant::now(),
                }),
                bearer_reload: BEARER_RELOAD,
                idle: Mutex::new(Vec::new()),
            }),
            keys: Arc::new(KeyCache::new(KEYS_REFETCH)),
            cache: Mutex::new(Cache::new()),
            cache_ttl: CACHE_TTL,
            refused: Mutex::new(Cache::new()),
            timeout: REVIEW_TIMEOUT,
            turn_wait: TURN_WAIT,
            in_flight: tokio::sync::Semaphore::new(MAX_REVIEWS_IN_FLIGHT),
            clients: ClientShares::default(),
        })
    }

    /// Replaces [`CACHE_TTL`] (zero disables the caches; refusals are
    /// remembered for the shorter of it and [`REFUSAL_CACHE_TTL`]).
    pub fn with_cache_ttl(mut self, ttl: Duration) -> Self {
        self.cache_ttl = ttl;
        self
    }

    /// Replaces [`REVIEW_TIMEOUT`].
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Replaces [`TURN_WAIT`] (zero: a review finding every turn taken is
    /// refused at once).
    pub fn with_turn_wait(mut self, wait: Duration) -> Self {
        self.turn_wait = wait;
        self
    }

    /// Replaces [`KEYS_REFETCH`] as the least time between two fetches of
    /// the issuer keys (a set is still refreshed in the background only
    /// once it is [`KEYS_REFETCH`] old).
    pub fn with_keys_refetch(mut self, every: Duration) -> Self {
        Arc::get_mut(&mut self.keys)
            .expect("set before the reviewer is used")
            .refetch = every;
        self
    }

    /// Replaces [`BEARER_RELOAD`].
    pub fn with_bearer_reload(mut self, every: Duration) -> Self {
        Arc::get_mut(&mut self.api)
            .expect("set before the reviewer is used")
            .bearer_reload = every;
        self
    }

    /// The API server this reviewer asks.
    pub fn url(&self) -> &Uri {
        &self.api.url
    }

    /// Reviews `token`, sent from `client` (`None`: an address not known,
    /// held to no share of the turns): the ServiceAccount it proves, or why
    /// not.
    pub async fn review(
        &self,
        token: &str,
        client: Option<IpAddr>,
    ) -> Result<ReviewedAccount, ReviewError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(ReviewError::Empty);
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(ReviewError::TooLong);
        }
        precheck(token)?;
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(account) = self.cache.lock().expect("not poisoned").get(&key) {
            tracing::debug!(spiffe_id = %account.spiffe_id, "token review answered from the cache");
            return Ok(account);
        }
        if let Some(refused) = self.refused.lock().expect("not poisoned").get(&key) {
            return Err(refused);
        }
        let _share = self.clients.take(client)?;
        if let Err(refused) = self.check_signature(token).await {
            self.remember_refusal(key, &refused);
            return Err(refused);
        }
        let Ok(_turn) = tokio::time::timeout(self.turn_wait, self.in_flight.acquire()).await else {
            return Err(ReviewError::Busy(self.turn_wait));
        };
        let answer = match tokio::time::timeout(self.timeout, self.ask(token)).await {
            Ok(answer) => answer?,
            Err(_) => {
                return Err(ReviewError::Unreachable(format!(
                    "no answer from {} within {}",
                    self.api.url,
                    trellis_core::duration::words(self.timeout)
                )));
            }
        };
        match verdict(answer, &self.trust_domain) {
            Ok(account) => {
                self.remember(key, token, &account);
                Ok(account)
            }
            Err(refused) => {
                self.remember_refusal(key, &refused);
                Err(refused)
            }
        }
    }

    /// Remembers a refusal for [`REFUSAL_CACHE_TTL`] when only the token
    /// is at fault, not the API server or our credentials: the same token
    /// gets the same answer.
    fn remember_refusal(&self, key: [u8; 32], refused: &ReviewError) {
        if refused.is_callers_fault() {
            let mut refusals = self.refused.lock().expect("not poisoned");
            let ttl = REFUSAL_CACHE_TTL.min(self.cache_ttl);
            if !ttl.is_zero() {
                refusals.insert(key, refused.clone(), ttl);
            }
        }
    }

    /// Refuses a token whose signature does not verify against the
    /// cluster's issuer keys, or whose algorithm cannot be verified. The
    /// keys are fetched on first need, again for a key ID the set does not
    /// have, and refreshed in the background; no fetch begins within
    /// [`KEYS_REFETCH`] of the last. Without keys (the fetch failed), the
    /// token is left to the review, as it would be without this check.
    async fn check_signature(&self, token: &str) -> Result<(), ReviewError> {
        let header = jwks::header(token)?;
        let mut fetched = false;
        let keys = loop {
            match self.keys.now(header.kid.as_deref(), fetched) {
                (KeysNow::Use(keys), refresh) => {
                    if refresh {
                        let (cache, api) = (self.keys.clone(), self.api.clone());
                        let timeout = self.timeout.min(KEYS_TIMEOUT);
                        tokio::spawn(async move { cache.refresh(&api, timeout).await });
                    }
                    break keys;
                }
                (KeysNow::Fetch, _) => {
                    self.keys
                        .refresh(&self.api, self.timeout.min(KEYS_TIMEOUT))
                        .await;
                    fetched = true;
                }
                (KeysNow::Fallback, _) => return Ok(()),
            }
        };
        jwks::verify(token, &keys)?;
        Ok(())
    }

    fn remember(&self, key: [u8; 32], token: &str, account: &ReviewedAccount) {
        let mut ttl = self.cache_ttl;
        if let Some(left) = unverified_expiry(token) {
            ttl = ttl.min(left);
        }
        if ttl.is_zero() {
            return;
        }
        let mut cache = self.cache.lock().expect("not poisoned");
        cache.insert(key, account.clone(), ttl);
    }

    /// One TokenReview POST; the decoded answer or why there is none.
    async fn ask(&self, token: &str) -> Result<TokenReview, ReviewError> {
        let body = serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [AUDIENCE]},
        });
        let (status, body) = self
            .api
            .send(Method::POST, TOKENREVIEW_PATH, Some(body.to_string()))
            .await?;
        decode(status, &body)
    }
}

impl ApiClient {
    fn bearer(&self) -> String {
        let mut bearer = self.bearer.lock().expect("not poisoned");
        if bearer.read_at.elapsed() >= self.bearer_reload {
            bearer.read_at = Instant::now();
            match read_bearer(&self.token_file) {
                Ok(token) => bearer.token = token,
                Err(message) => tracing::warn!(
                    file = %shown(&self.token_file),
                    error = %message,
                    "cannot re-read the Kubernetes API token; keeping the last one"
                ),
            }
        }
        bearer.token.clone()
    }

    /// One request to `path` (under the API server URL's own path); the
    /// status and body of the answer, or why there is none.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> Result<(StatusCode, Bytes), ReviewError> {
        if let Some(mut sender) = self.idle_connection() {
            match sender
                .send_request(self.request(&method, path, body.clone())?)
                .await
            {
                Ok(response) => return self.answer(sender, response).await,
                // The API server closed the idle connection as the request
                // was sent. A review or a GET changes nothing, so it is
                // asked again on a new connection even if the server had
                // read it.
                Err(e) => tracing::debug!(error = %e, "an idle API server connection had closed"),
            }
        }
        let mut sender = self.connect().await?;
        let response = sender
            .send_request(self.request(&method, path, body)?)
            .await
            .map_err(|e| self.unreachable("no answer from", &e))?;
        self.answer(sender, response).await
    }

    fn unreachable(&self, what: &str, e: &dyn std::fmt::Display) -> ReviewError {
        ReviewError::Unreachable(format!("{what} {}: {e}", self.url))
    }

    /// The request to `path`, with a JSON `body` if any.
    fn request(
        &self,
        method: &Method,
        path: &str,
        body: Option<String>,
    ) -> Result<Request<Full<Bytes>>, ReviewError> {
        let path = format!("{}{path}", self.url.path().trim_end_matches('/'));
        let authority = self
            .url
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_default();
        let mut request = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(http::header::HOST, authority)
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", self.bearer()),
            )
            .header(http::header::ACCEPT, "application/json")
            .header(
                http::header::USER_AGENT,
                concat!("trellis-control-plane/", env!("CARGO_PKG_VERSION")),
            );
        if body.is_some() {
            request = request.header(http::header::CONTENT_TYPE, "application/json");
        }
        request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ReviewError::BadResponse(format!("cannot build the request: {e}")))
    }

    /// Reads an answer; the connection is kept for the next request
    /// unless the API server said it closes it.
    async fn answer(
        &self,
        sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
        response: http::Response<hyper::body::Incoming>,
    ) -> Result<(StatusCode, Bytes), ReviewError> {
        let status = response.status();
        let closing = response
            .headers()
            .get(http::header::CONNECTION)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        let body = Limited::new(response.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| self.unreachable("cannot read the answer of", &e))?
            .to_bytes();
        if !closing {
            self.keep(sender);
        }
        Ok((status, body))
    }

    /// The most recently used idle connection still open, if any; those
    /// idle too long are closed on the way.
    fn idle_connection(&self) -> Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
        let mut idle = self.idle.lock().expect("not poisoned");
        while let Some(connection) = idle.pop() {
            if connection.since.elapsed() < IDLE_CONNECTION
                && !connection.sender.is_closed()
                && connection.sender.is_ready()
            {
                return Some(connection.sender);
            }
        }
        None
    }

    /// Keeps a connection whose answer was read whole for the next review.
    fn keep(&self, sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>) {
        if sender.is_closed() || !sender.is_ready() {
            return;
        }
        let now = Instant::now();
        let mut idle = self.idle.lock().expect("not poisoned");
        idle.retain(|c| now.duration_since(c.since) < IDLE_CONNECTION);
        if idle.len() < MAX_REVIEWS_IN_FLIGHT {
            idle.push(IdleConnection { sender, since: now });
        }
    }

    /// A new TLS connection to the API server.
    async fn connect(
        &self,
    ) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, ReviewError> {
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| self.unreachable("cannot connect to", &e))?;
        let tls = self
            .tls
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| self.unreachable("TLS with", &e))?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| self.unreachable("HTTP with", &e))?;
        // The connection ends when its sender is dropped (an idle one is
        // dropped when found too old, a review given up on drops its own),
        // and after its lifetime in any case, so a hung API server leaves no
        // task behind.
        tokio::spawn(async move {
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection).await;
        });
        Ok(sender)
    }
}

/// The verdict on a decoded review for the mesh of `td`.
pub fn verdict(review: TokenReview, td: &TrustDomain) -> Result<ReviewedAccount, ReviewError> {
    let status = review.status;
    if !status.authenticated {
        let reason = if status.error.is_empty() {
            "no reason given".to_owned()
        } else {
            status.error
        };
        return Err(ReviewError::NotAuthenticated(reason));
    }
    if !status.audiences.iter().any(|a| a == AUDIENCE) {
        return Err(ReviewError::WrongAudience(status.audiences));
    }
    account_of(&status.user.username, td)
}

/// `system:serviceaccount:NS:SA` → the account and its SPIFFE ID.
pub fn account_of(username: &str, td: &TrustDomain) -> Result<ReviewedAccount, ReviewError> {
    let not_sa = || ReviewError::NotAServiceAccount(username.to_owned());
    let rest = username
        .strip_prefix("system:serviceaccount:")
        .ok_or_else(not_sa)?;
    let (namespace, service_account) = rest.split_once(':').ok_or_else(not_sa)?;
    if !is_dns_label(namespace) || !is_dns_subdomain(service_account) {
        return Err(ReviewError::BadAccount(username.to_owned()));
    }
    let spiffe_id = SpiffeId::workload(td, namespace, service_account)
        .map_err(|_| ReviewError::BadAccount(username.to_owned()))?;
    Ok(ReviewedAccount {
        namespace: namespace.to_owned(),
        service_account: service_account.to_owned(),
        spiffe_id,
    })
}

/// The parts of a TokenReview answer that matter.
#[derive(Debug, Deserialize)]
pub struct TokenReview {
    #[serde(default)]
    pub kind: String,
    pub status: ReviewStatus,
}

#[derive(Debug, Default, Deserialize)]
pub struct ReviewStatus {
    #[serde(default)]
    pub authenticated: bool,
    #[serde(default)]
    pub user: UserInfo,
    #[serde(default)]
    pub audiences: Vec<String>,
    #[serde(default)]
    pub error: String,
}

#[derive(Debug, Default, Deserialize)]
pub struct UserInfo {
    #[serde(default)]
    pub username: String,
}

/// A `Status` object, the API server's answer to a request it refused.
#[derive(Debug, Default, Deserialize)]
struct ApiStatus {
    #[serde(default)]
    message: String,
    #[serde(default)]
    reason: String,
}

/// Decodes an API server answer to a TokenReview POST.
pub fn decode(status: StatusCode, body: &[u8]) -> Result<TokenReview, ReviewError> {
    if !status.is_success() {
        let message = match serde_json::from_slice::<ApiStatus>(body) {
            Ok(s) if !s.message.is_empty() => s.message,
            Ok(s) if !s.reason.is_empty() => s.reason,
            _ => status.canonical_reason().unwrap_or("no reason").to_owned(),
        };
        return Err(ReviewError::Refused {
            code: status.as_u16(),
            message,
        });
    }
    let review: TokenReview = serde_json::from_slice(body)
        .map_err(|e| ReviewError::BadResponse(format!("not a TokenReview: {e}")))?;
    if !review.kind.is_empty() && review.kind != "TokenReview" {
        return Err(ReviewError::BadResponse(format!(
            "kind {:?}, expected TokenReview",
            review.kind
        )));
    }
    Ok(review)
}

fn read_bearer(path: &Path) -> Result<String, String> {
    let token = std::fs::read_to_string(path)
        .map_err(|e| trellis_core::io_error::IoWords(&e).to_string())?;
    let token = token.trim();
    if token.is_empty() {
        return Err("the file is empty".into());
    }
    if token.bytes().any(|b| !(0x21..0x7f).contains(&b)) {
        return Err("the token has characters a bearer token cannot have".into());
    }
    Ok(token.to_owned())
}

/// Refuses, before any review, a token the API server could not accept:
/// not shaped as a JWT (three base64url parts, the second a JSON object),
/// or whose payload says it expired more than [`EXPIRY_LEEWAY`] ago or
/// names audiences (`aud`) without [`AUDIENCE`]. The payload is read
/// without checking the signature, so passing proves nothing: these are
/// cheap filters that spare the API server a review of a token it would
/// refuse, and the TokenReview stays the only authority on a token. A
/// payload without `exp` or `aud` is left to the review. The error never
/// holds the token.
pub fn precheck(token: &str) -> Result<(), ReviewError> {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ReviewError::NotAJwt("it does not have three parts"));
    };
    if [header, payload, signature].iter().any(|part| {
        part.is_empty()
            || !part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    }) {
        return Err(ReviewError::NotAJwt(
            "a part is empty or holds characters base64url does not use",
        ));
    }
    let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()
        .and_then(|json| serde_json::from_slice::<serde_json::Value>(&json).ok())
        .filter(serde_json::Value::is_object)
        .ok_or(ReviewError::NotAJwt("its payload is not a JSON object"))?;
    if let Some(exp) = claims.get("exp").and_then(serde_json::Value::as_u64) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if exp.saturating_add(EXPIRY_LEEWAY.as_secs()) < now {
            return Err(ReviewError::Expired);
        }
    }
    let for_us = match claims.get("aud") {
        None => true,
        Some(serde_json::Value::String(aud)) => aud == AUDIENCE,
        Some(serde_json::Value::Array(auds)) => auds.iter().any(|a| a == AUDIENCE),
        Some(_) => false,
    };
    if !for_us {
        return Err(ReviewError::NotForAudience);
    }
    Ok(())
}

/// How long until the JWT's `exp`, read from its payload without checking
/// the signature: it may only shorten a cache entry, never lengthen one.
/// `Some(ZERO)` when already expired, `None` when there is no readable `exp`.
pub fn unverified_expiry(token: &str) -> Option<Duration> {
    let payload = token.split('.').nth(1)?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let exp = serde_json::from_slice::<serde_json::Value>(&json)
        .ok()?
        .get("exp")?
        .as_u64()?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
    Some(Duration::from_secs(exp.saturating_sub(now)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    /// An address past its share is refused, naming the limit, while
    /// another still gets one; the host's own address and unknown callers
    /// take none (the rest of the loopback range does), and
    /// an address whose reviews all ended is forgotten.
    #[test]
    fn each_client_address_has_a_share_of_the_reviews() {
        let shares = ClientShares::default();
        let (a, b): (IpAddr, IpAddr) = ("10.1.0.7".parse().unwrap(), "10.1.0.8".parse().unwrap());
        let held: Vec<_> = (0..MAX_REVIEWS_PER_CLIENT)
            .map(|_| shares.take(Some(a)).unwrap().unwrap())
            .collect();
        let Err(e) = shares.take(Some(a)) else {
            panic!("a fifth review from one address was let through");
        };
        assert_eq!(
            e.to_string(),
            "this client address already has 4 service account token reviews in progress, \
             the most one address may have at once; try again once they are answered"
        );
        assert_eq!(e.reason().token(), "token_reviews_per_client");
        assert!(!e.is_callers_fault());
        // The same address written as IPv4-mapped IPv6 is the same client.
        let mapped: IpAddr = "::ffff:10.1.0.7".parse().unwrap();
        assert!(shares.take(Some(mapped)).is_err());
        let other = shares.take(Some(b)).unwrap();
        assert!(other.is_some());
        let elsewhere = shares.take(Some("127.0.0.2".parse().unwrap())).unwrap();
        assert!(
            elsewhere.is_some(),
            "127.0.0.2 is not the host's own address"
        );
        drop(elsewhere);
        for _ in 0..MAX_REVIEWS_PER_CLIENT * 2 {
            assert!(
                shares
                    .take(Some("127.0.0.1".parse().unwrap()))
                    .unwrap()
                    .is_none()
            );
            assert!(shares.take(None).unwrap().is_none());
        }
        assert_eq!(shares.addresses(), 2);
        drop(held);
        drop(other);
        assert_eq!(
            shares.addresses(),
            0,
            "addresses without reviews are forgotten"
        );
        assert!(shares.take(Some(a)).unwrap().is_some());
    }

    #[test]
    fn derives_the_workload_identity_from_the_username() {
        let account = account_of("system:serviceaccount:shop:web", &td()).unwrap();
        assert_eq!(
            account.spiffe_id.as_str(),
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        assert_eq!(account.namespace, "shop");
        assert_eq!(account.service_account, "web");
        let dotted = account_of("system:serviceaccount:shop:web.v2", &td()).unwrap();
        assert_eq!(
            dotted.spiffe_id.as_str(),
            "spiffe://cluster.local/ns/shop/sa/web.v2"
        );
    }

    #[test]
    fn refuses_users_that_are_not_service_accounts() {
        for name in [
            "kubernetes-admin",
            "system:node:kind-worker",
            "system:serviceaccount:shop",
            "",
        ] {
            let e = account_of(name, &td()).unwrap_err();
            assert!(
                matches!(e, ReviewError::NotAServiceAccount(_)),
                "{name}: {e}"
            );
            assert!(e.is_callers_fault());
        }
        for name in [
            "system:serviceaccount:shop:web:x",
            "system:serviceaccount:Shop:web",
            "system:serviceaccount:shop:../x",
            "system:serviceaccount::web",
        ] {
            let e = account_of(name, &td()).unwrap_err();
            assert!(matches!(e, ReviewError::BadAccount(_)), "{name}: {e}");
        }
    }

    #[test]
    fn reads_the_expiry_without_trusting_it() {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let token = |exp: u64| {
            format!(
                "{}.{}.sig",
                b64(r#"{"alg":"RS256"}"#),
                b64(&format!(r#"{{"exp":{exp}}}"#))
            )
        };
        let left = unverified_expiry(&token(now + 30)).unwrap();
        assert!(left <= Duration::from_secs(30) && left >= Duration::from_secs(28));
        assert_eq!(unverified_expiry(&token(now - 5)), Some(Duration::ZERO));
        assert_eq!(unverified_expiry("opaque-token"), None);
        assert_eq!(unverified_expiry("a.!!!.c"), None);
    }

    #[test]
    fn api_urls_must_be_https_with_a_host() {
        assert!(parse_api_url("https://10.96.0.1:443").is_ok());
        assert!(parse_api_url("https://[fd00::1]:6443").is_ok());
        assert!(parse_api_url("http://10.96.0.1").is_err());
        assert!(parse_api_url("10.96.0.1:443").is_err());
        assert!(parse_api_url("https://h/?x=1").is_err());
    }

    #[test]
    fn an_empty_audience_list_means_the_api_servers_own_and_is_refused() {
        let body = br#"{"kind":"TokenReview","apiVersion":"authentication.k8s.io/v1",
            "status":{"authenticated":true,"user":{"username":"system:serviceaccount:shop:web"}}}"#;
        let review = decode(StatusCode::CREATED, body).unwrap();
        let e = verdict(review, &td()).unwrap_err();
        assert!(
            matches!(e, ReviewError::WrongAudience(ref a) if a.is_empty()),
            "{e}"
        );
        let body =
            br#"{"kind":"TokenReview","status":{"authenticated":true,"audiences":["trellis"],
            "user":{"username":"system:serviceaccount:shop:web"}}}"#;
        let account = verdict(decode(StatusCode::CREATED, body).unwrap(), &td()).unwrap();
        assert_eq!(
            account.spiffe_id.as_str(),
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        let e = decode(StatusCode::CREATED, br#"{"kind":"Status"}"#).unwrap_err();
        assert!(matches!(e, ReviewError::BadResponse(_)), "{e}");
    }

    #[test]
    fn refusals_carry_the_api_servers_message() {
        let body = br#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"Unauthorized","reason":"Unauthorized","code":401}"#;
        let e = decode(StatusCode::UNAUTHORIZED, body).unwrap_err();
        assert!(matches!(e, ReviewError::Refused { code: 401, .. }), "{e}");
        assert!(!e.is_callers_fault());
        let e = decode(StatusCode::BAD_GATEWAY, b"<html>").unwrap_err();
        assert!(e.to_string().contains("Bad Gateway"), "{e}");
    }
}
