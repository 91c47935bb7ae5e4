//! The webhook port (15017): HTTPS for the Kubernetes API server, `POST
//! /inject` and `POST /validate`, each answered by the pure functions of
//! [`super`].
//!
//! This module owns only the transport: TLS with the serving certificate
//! the chart generated (re-read when the mounted Secret changes), HTTP/1.1,
//! a body size limit, status codes, and limits on connections (in number,
//! per client address and in time), since every pod of the cluster can
//! reach the port. It decides nothing about pods or policies. The API
//! server authenticates us by the `caBundle` of the webhook
//! configurations; it presents no client certificate, so none is asked
//! for.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use trellis_core::connections::{ConnectionLimits, serve_http1_for};

use super::{InjectConfig, NamespaceScope, review_pod, review_policy};
use crate::api::quoted;

/// The largest review body accepted. A Pod object is at most a few hundred
/// KiB (annotations are capped at 256 KiB); the API server's own request
/// limit is 3 MiB.
pub const MAX_BODY: usize = 4 << 20;

/// How often the certificate files are checked for a change.
const CERT_RECHECK: Duration = Duration::from_secs(10);

/// How long a client has to finish the TLS handshake, and then to send a
/// request's head (an idle connection waits no longer for the next one):
/// the API server sends its at once.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a request's body may take to arrive once its head has: the
/// API server sends it at once. A client trickling a body is answered 408
/// and its connection closed, so it holds its slot seconds, not for the
/// connection's whole lifetime.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(5);

/// Webhook connections served at once; more are closed as they are
/// accepted. Each may be reading a body of up to [`MAX_BODY`], so this
/// bounds the memory that clients sending large bodies slowly can take.
pub const MAX_CONNECTIONS: usize = 128;

/// Webhook connections one client address may hold at once: half of
/// [`MAX_CONNECTIONS`], so that one pod cannot take every slot. The API
/// server calls from the few addresses of its replicas, with a connection
/// for each review in flight: 64 reviews in flight at once from one API
/// server is far more than a busy cluster makes (a review takes
/// milliseconds), so this does not throttle it.
pub const MAX_CONNECTIONS_PER_CLIENT: usize = 64;

/// How long one webhook connection is served: then it closes after the
/// answer in progress, or [`HEAD_TIMEOUT`] later if that answer cannot be
/// written. The API server opens another.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Why the serving certificate cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsFilesError {
    #[error("{}: {message}", path.display())]
    File { path: PathBuf, message: String },
    #[error("webhook TLS: {0}")]
    Tls(#[from] rustls::Error),
}

fn file_error(path: &Path, message: impl ToString) -> TlsFilesError {
    TlsFilesError::File {
        path: path.to_owned(),
        message: message.to_string(),
    }
}

/// The serving certificate from PEM files (`tls.crt` with its chain,
/// `tls.key` in PKCS#1, PKCS#8 or SEC1), re-read when the certificate file
/// changes; a failed re-read keeps the certificate in use.
pub struct ServingFiles {
    cert: PathBuf,
    key: PathBuf,
    state: RwLock<Loaded>,
}

struct Loaded {
    key: Arc<CertifiedKey>,
    modified: Option<SystemTime>,
    checked: Instant,
}

impl std::fmt::Debug for ServingFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingFiles")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl ServingFiles {
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsFilesError> {
        let loaded = load(cert, key)?;
        Ok(Self {
            cert: cert.to_owned(),
            key: key.to_owned(),
            state: RwLock::new(loaded),
        })
    }

    fn current(&self) -> Arc<CertifiedKey> {
        {
            let state = self.state.read().expect("not poisoned");
            if state.checked.elapsed() < CERT_RECHECK {
                return state.key.clone();
            }
        }
        let mut state = self.state.write().expect("not poisoned");
        state.checked = Instant::now();
        if modified(&self.cert) != state.modified {
            match load(&self.cert, &self.key) {
                Ok(loaded) => {
                    tracing::info!(cert = %self.cert.display(), "webhook certificate reloaded");
                    *state = loaded;
                }
                Err(e) => tracing::warn!(error = %e, "webhook certificate not reloaded"),
            }
        }
        state.key.clone()
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn load(cert: &Path, key: &Path) -> Result<Loaded, TlsFilesError> {
    let modified = modified(cert);
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| file_error(cert, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(cert, e))?;
    if chain.is_empty() {
        return Err(file_error(cert, "no certificate in the file"));
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| file_error(key, e))?;
    let signing = trellis_core::tls::provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| file_error(key, e))?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|e| file_error(key, format!("does not match {}: {e}", cert.display())))?;
    Ok(Loaded {
        key: Arc::new(certified),
        modified,
        checked: Instant::now(),
    })
}

impl ResolvesServerCert for ServingFiles {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// TLS 1.3, HTTP/1.1, no client certificate.
pub fn tls_config(files: Arc<ServingFiles>) -> Result<Arc<ServerConfig>, TlsFilesError> {
    let mut config = ServerConfig::builder_with_provider(trellis_core::tls::provider())
        .with_protocol_versions(trellis_core::tls::PROTOCOL_VERSIONS)?
        .with_no_client_auth()
        .with_cert_resolver(files);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The bound webhook port.
pub struct WebhookServer {
    listener: TcpListener,
    acceptor: TlsAcceptor,
}

impl WebhookServer {
    pub async fn bind(addr: SocketAddr, tls: Arc<ServerConfig>) -> std::io::Result<Self> {
        Ok(Self {
            listener: crate::net::bind(addr)?,
            acceptor: TlsAcceptor::from(tls),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` completes. `config` carries the injection
    /// settings and the current trust bundle; a CA rotation sends a new one.
    pub async fn run(
        self,
        config: watch::Receiver<Arc<InjectConfig>>,
        shutdown: impl Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let limits = ConnectionLimits::new(MAX_CONNECTIONS, MAX_CONNECTIONS_PER_CLIENT);
        loop {
            let (tcp, client) = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "webhook accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = &mut shutdown => return,
            };
            let admitted = match limits.admit(client.ip()) {
                Ok(admitted) => admitted,
                Err(refused) => {
                    tracing::debug!(%client, %refused, "webhook connection refused");
                    continue;
                }
            };
            let acceptor = self.acceptor.clone();
            let config = config.clone();
            tokio::spawn(async move {
                let admitted = admitted;
                let handshake = tokio::select! {
                    handshake = tokio::time::timeout(HEAD_TIMEOUT, acceptor.accept(tcp)) => handshake,
                    // Told to make way for a client holding fewer.
                    () = admitted.evicted() => return,
                };
                let tls = match handshake {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(%client, error = %e, "webhook TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%client, timeout = ?HEAD_TIMEOUT, "webhook TLS handshake not finished in time");
                        return;
                    }
                };
                let service = hyper::service::service_fn(move |req| {
                    let config = config.borrow().clone();
                    async move { Ok::<_, Infallible>(serve(req, &config).await) }
                });
                serve_http1_for(
                    tls,
                    service,
                    HEAD_TIMEOUT,
                    CONNECTION_LIFETIME,
                    admitted.evicted(),
                )
                .await;
            });
        }
    }
}

async fn serve(req: Request<Incoming>, config: &InjectConfig) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body =
        match tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, MAX_BODY).collect()).await {
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(e)) => {
                return text(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("cannot read the body: {e}"),
                );
            }
            Err(_) => {
                let mut answer = text(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "the request's body did not arrive within {}",
                        humantime::format_duration(BODY_TIMEOUT)
                    ),
                );
                answer.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
                return answer;
            }
        };
    let (status, content_type, body) = respond(&parts.method, parts.uri.path(), &body, config);
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

fn text(status: StatusCode, message: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(message + "\n")))
        .expect("static response parts are valid")
}

/// Routes one request: the status, content type and body of the answer.
/// A body that is not an AdmissionReview gets 400, so the webhook's
/// `failurePolicy` decides about the object.
pub fn respond(
    method: &Method,
    path: &str,
    body: &[u8],
    config: &InjectConfig,
) -> (StatusCode, &'static str, Vec<u8>) {
    let result = match path {
        "/inject" | "/validate" if method != Method::POST => {
            let message = format!("{path} takes POST, not {method}\n");
            return (StatusCode::METHOD_NOT_ALLOWED, "text/plain", message.into());
        }
        "/inject" => review_pod(body, NamespaceScope::SelectedByWebhook, config),
        "/validate" => review_policy(body, &config.trust_domain, &config.validation),
        _ => {
            let message = format!("not found: {path} (try /inject or /validate)\n");
            return (StatusCode::NOT_FOUND, "text/plain", message.into());
        }
    };
    match result {
        Ok(response) => {
            if !response.allowed || !response.warnings.is_empty() {
                // The uid is whatever the caller sent: quoted, so that it
                // cannot end the line. `detail`, not `message`: that is the
                // event's own message field.
                tracing::info!(
                    path,
                    uid = %quoted(&response.uid),
                    allowed = response.allowed,
                    detail = ?response.message.as_deref().unwrap_or_default(),
                    warnings = ?response.warnings,
                    "admission review"
                );
            }
            (StatusCode::OK, "application/json", response.to_body())
        }
        Err(e) => {
            tracing::warn!(path, error = %e, "unusable admission review");
            (
                StatusCode::BAD_REQUEST,
                "text/plain",
                format!("{e}\n").into(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The uid of a review is whatever its caller sent: logged quoted, a
    /// newline in it cannot start a forged line, and the answer's text is
    /// the `detail`, so the event keeps its own message in JSON.
    #[test]
    fn a_review_is_logged_on_one_line_under_its_own_message() {
        let body = serde_json::json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "7d1c\nINFO forged: policy applied",
                "kind": {"group": "trellis.io", "version": "v1alpha1", "kind": "AuthorizationPolicy"},
                "operation": "CREATE",
            },
        })
        .to_string();
        for json in [true, false] {
            let (logs, guard) = crate::test_logs::capture(json);
            let (status, _, _) = respond(
                &Method::POST,
                "/validate",
                body.as_bytes(),
                &InjectConfig::default(),
            );
            drop(guard);
            assert_eq!(status, StatusCode::OK);
            let text = logs.text();
            assert_eq!(text.lines().count(), 1, "{text:?}");
            assert!(!text.contains("\nINFO forged"), "{text:?}");
            if json {
                let line: serde_json::Value = serde_json::from_str(&text).unwrap();
                assert_eq!(line["fields"]["message"], "admission review", "{line}");
                let detail = line["fields"]["detail"].as_str().unwrap();
                assert!(detail.contains("no object"), "{line}");
            } else {
                assert!(text.contains("admission review"), "{text:?}");
                assert!(text.contains(r#"uid="7d1c\nINFO forged"#), "{text:?}");
            }
        }
    }
}
