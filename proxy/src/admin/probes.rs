//! The app's own kubelet probes, run by the sidecar: `GET
//! /app-health/<container>/<liveness|readiness|startup>` on the admin port.
//!
//! Under strict mTLS the kubelet cannot probe the app itself (every inbound
//! port wants a client SVID), so the injector rewrites each `httpGet`,
//! `tcpSocket` and `grpc` probe to one of these paths and hands the original
//! checks over in `--app-probes` (`TRELLIS_APP_PROBES`): a JSON object from
//! path to `{"httpGet": {port, path, scheme, httpHeaders}}`, `{"tcpSocket":
//! {port}}` or `{"grpc": {port, service}}`. This module parses that once at
//! start-up and runs a check against the app on 127.0.0.1 (loopback is never
//! intercepted) the way the kubelet would have: HTTP 200-399 passes, HTTPS
//! without verifying the certificate, a TCP connect, gRPC Health/Check
//! answering SERVING. The answer is 200, or 503 with a short reason.
//!
//! It only ever connects to the local app, on the ports the probes name; it
//! never follows a redirect (a 3xx is a pass, as the kubelet counts it) and
//! never takes a destination from the request.

use std::collections::HashMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, StatusCode, header};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::Deserialize;
use tokio::net::TcpStream;

/// The prefix of every app probe path.
pub const PATH_PREFIX: &str = "/app-health/";

/// How long one check may take. The kubelet gives up on the rewritten
/// probe after its own `timeoutSeconds` anyway; this bound only keeps a
/// hung app from holding admin connections for longer than that would.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// The User-Agent the kubelet sends, so apps that log or branch on it see
/// what they saw before injection.
const USER_AGENT: &str = "kube-probe/trellis";

/// The checks by admin path, parsed from `--app-probes`.
#[derive(Debug, Default, Clone)]
pub struct AppProbes {
    checks: HashMap<String, Check>,
}

/// One original probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    Http(HttpGet),
    Tcp { port: u16 },
    Grpc { port: u16, service: String },
}

/// An `httpGet` probe against 127.0.0.1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpGet {
    pub port: u16,
    pub path: String,
    pub https: bool,
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

/// `--app-probes` as the injector writes it.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
enum RawCheck {
    HttpGet(RawHttpGet),
    TcpSocket(RawPort),
    Grpc(RawGrpc),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawHttpGet {
    port: u16,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    scheme: Option<String>,
    #[serde(default)]
    http_headers: Vec<RawHeader>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeader {
    name: String,
    value: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPort {
    port: u16,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrpc {
    port: u16,
    #[serde(default)]
    service: Option<String>,
}

impl AppProbes {
    /// Parses and checks `--app-probes`; the error says which path and
    /// field is wrong.
    pub fn parse(json: &str) -> Result<Self, String> {
        let raw: HashMap<String, RawCheck> =
            serde_json::from_str(json).map_err(|e| format!("not a JSON probe map: {e}"))?;
        let mut checks = HashMap::with_capacity(raw.len());
        for (path, raw) in raw {
            let check = check(&path, raw).map_err(|e| format!("{path:?}: {e}"))?;
            checks.insert(path, check);
        }
        Ok(AppProbes { checks })
    }

    pub fn get(&self, path: &str) -> Option<&Check> {
        self.checks.get(path)
    }

    pub fn is_empty(&self) -> bool {
        self.checks.is_empty()
    }

    /// The admin paths, sorted.
    pub fn paths(&self) -> Vec<String> {
        let mut paths: Vec<String> = self.checks.keys().cloned().collect();
        paths.sort();
        paths
    }
}

fn check(path: &str, raw: RawCheck) -> Result<Check, String> {
    if !path.starts_with(PATH_PREFIX) || path.len() == PATH_PREFIX.len() {
        return Err(format!(
            "the path must start with {PATH_PREFIX}<container>/"
        ));
    }
    let port = |port: u16| match port {
        0 => Err("port 0 is not a port".to_string()),
        p => Ok(p),
    };
    Ok(match raw {
        RawCheck::HttpGet(h) => {
            let https = match h.scheme.as_deref().map(str::to_ascii_uppercase).as_deref() {
                None | Some("HTTP") => false,
                Some("HTTPS") => true,
                Some(other) => return Err(format!("scheme {other:?} is not HTTP or HTTPS")),
            };
            let path = h
                .path
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| "/".into());
            if !path.starts_with('/') {
                return Err(format!("path {path:?} must start with /"));
            }
            let headers = h
                .http_headers
                .into_iter()
                .map(|RawHeader { name, value }| {
                    let n = HeaderName::try_from(name.as_str())
                        .map_err(|_| format!("header name {name:?} is not valid"))?;
                    let v = HeaderValue::try_from(value.as_str())
                        .map_err(|_| format!("header {name:?} has an invalid value"))?;
                    Ok((n, v))
                })
                .collect::<Result<_, String>>()?;
            Check::Http(HttpGet {
                port: port(h.port)?,
                path,
                https,
                headers,
            })
        }
        RawCheck::TcpSocket(t) => Check::Tcp {
            port: port(t.port)?,
        },
        RawCheck::Grpc(g) => Check::Grpc {
            port: port(g.port)?,
            service: g.service.unwrap_or_default(),
        },
    })
}

/// Why a check failed, as the 503 body says it.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("{0} did not answer within {1:?}")]
    Timeout(Target, Duration),
    #[error("cannot connect to {0}: {1}")]
    Connect(Target, std::io::Error),
    #[error("TLS with {0}: {1}")]
    Tls(Target, std::io::Error),
    #[error("HTTP to {0}: {1}")]
    Http(Target, hyper::Error),
    #[error("{0} answered {1}")]
    Status(Target, StatusCode),
    #[error("gRPC health check of {0}: {1}")]
    Grpc(Target, String),
}

/// What a check reached, for its failure message.
#[derive(Debug)]
pub struct Target(String);

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port)
}

/// Runs `check` against the local app, giving up after `timeout`.
pub async fn run(check: &Check, timeout: Duration) -> Result<(), Failure> {
    let target = match check {
        Check::Http(h) => {
            let scheme = if h.https { "https" } else { "http" };
            Target(format!("{scheme}://{}{}", local(h.port), h.path))
        }
        Check::Tcp { port } => Target(format!("tcp://{}", local(*port))),
        Check::Grpc { port, service } => {
            Target(format!("grpc://{} service {service:?}", local(*port)))
        }
    };
    match tokio::time::timeout(timeout, run_check(check, &target)).await {
        Ok(result) => result,
        Err(_) => Err(Failure::Timeout(target, timeout)),
    }
}

async fn run_check(check: &Check, target: &Target) -> Result<(), Failure> {
    let connect = |port| async move {
        TcpStream::connect(local(port))
            .await
            .map_err(|e| Failure::Connect(Target(target.0.clone()), e))
    };
    match check {
        Check::Tcp { port } => connect(*port).await.map(drop),
        Check::Http(h) => {
            let tcp = connect(h.port).await?;
            let status = if h.https {
                let tls = tokio_rustls::TlsConnector::from(insecure_tls())
                    .connect(ServerName::from(Ipv4Addr::LOCALHOST), tcp)
                    .await
                    .map_err(|e| Failure::Tls(Target(target.0.clone()), e))?;
                http_get(tls, h).await
            } else {
                http_get(tcp, h).await
            }
            .map_err(|e| Failure::Http(Target(target.0.clone()), e))?;
            // As the kubelet counts it: 200-399 passes.
            if status.is_success() || status.is_redirection() {
                Ok(())
            } else {
                Err(Failure::Status(Target(target.0.clone()), status))
            }
        }
        Check::Grpc { port, service } => grpc_check(*port, service)
            .await
            .map_err(|e| Failure::Grpc(Target(target.0.clone()), e)),
    }
}

/// One HTTP/1.1 GET on `io`; only the status matters.
async fn http_get<IO>(io: IO, h: &HttpGet) -> Result<StatusCode, hyper::Error>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    let conn = tokio::spawn(conn);
    let mut request = Request::get(h.path.as_str())
        .header(header::HOST, local(h.port).to_string())
        .header(header::USER_AGENT, USER_AGENT)
        .header(header::CONNECTION, "close");
    for (name, value) in &h.headers {
        // A probe's own Host or User-Agent replaces ours, as with the kubelet.
        if let Some(headers) = request.headers_mut() {
            headers.insert(name.clone(), value.clone());
        }
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .expect("a checked path and headers make a valid request");
    let response = sender.send_request(request).await?;
    conn.abort();
    Ok(response.status())
}

/// grpc.health.v1.Health/Check; passes only on SERVING.
async fn grpc_check(port: u16, service: &str) -> Result<(), String> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", local(port)))
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    match ServingStatus::try_from(response.status) {
        Ok(ServingStatus::Serving) => Ok(()),
        Ok(status) => Err(format!("status {}", status.as_str_name())),
        Err(_) => Err(format!("unknown status {}", response.status)),
    }
}

/// A client config that accepts any server certificate, as the kubelet's
/// HTTPS probes do (`InsecureSkipVerify`); handshake signatures are still
/// checked. Used only for the app on loopback.
fn insecure_tls() -> Arc<rustls::ClientConfig> {
    let provider = trellis_core::tls::provider();
    let verifier = Arc::new(AnyCertificate(provider.clone()));
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("the default provider supports the default versions")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Arc::new(config)
}

#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_kind_of_check() {
        let probes = AppProbes::parse(
            r#"{
              "/app-health/web/liveness": {"httpGet": {"port": 8080, "path": "/healthz",
                  "scheme": "HTTPS", "httpHeaders": [{"name": "X-Probe", "value": "1"}]}},
              "/app-health/web/readiness": {"tcpSocket": {"port": 5432}},
              "/app-health/web/startup": {"grpc": {"port": 9000}}
            }"#,
        )
        .unwrap();
        let Some(Check::Http(h)) = probes.get("/app-health/web/liveness") else {
            panic!("{probes:?}");
        };
        assert!(h.https && h.port == 8080 && h.path == "/healthz");
        assert_eq!(h.headers[0].0.as_str(), "x-probe");
        assert_eq!(
            probes.get("/app-health/web/readiness"),
            Some(&Check::Tcp { port: 5432 })
        );
        assert_eq!(
            probes.get("/app-health/web/startup"),
            Some(&Check::Grpc {
                port: 9000,
                service: String::new()
            })
        );
    }

    #[test]
    fn refuses_bad_probes_naming_the_path() {
        for (json, says) in [
            ("[1]", "not a JSON probe map"),
            (
                r#"{"/app-health/a/liveness": {"exec": {}}}"#,
                "unknown variant",
            ),
            (
                r#"{"/app-health/a/liveness": {"tcpSocket": {"port": 0}}}"#,
                "port 0",
            ),
            (
                r#"{"/app-health/a/liveness": {"tcpSocket": {"port": 70000}}}"#,
                "70000",
            ),
            (
                r#"{"/elsewhere": {"tcpSocket": {"port": 1}}}"#,
                "\"/elsewhere\"",
            ),
            (
                r#"{"/app-health/a/liveness": {"httpGet": {"port": 1, "scheme": "FTP"}}}"#,
                "\"/app-health/a/liveness\": scheme \"FTP\"",
            ),
            (
                r#"{"/app-health/a/liveness": {"httpGet": {"port": 1,
                    "httpHeaders": [{"name": "bad name", "value": "x"}]}}}"#,
                "header name \"bad name\"",
            ),
        ] {
            let err = AppProbes::parse(json).unwrap_err();
            assert!(err.contains(says), "{json}: {err}");
        }
    }
}
