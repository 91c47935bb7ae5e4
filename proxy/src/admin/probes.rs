//! The app's own kubelet probes, run by the sidecar: `GET
//! /app-health/<container>/<liveness|readiness|startup>` on the admin port.
//!
//! Under strict mTLS the kubelet cannot probe the app itself (every inbound
//! port wants a client SVID), so the injector rewrites each `httpGet`,
//! `tcpSocket` and `grpc` probe to one of these paths and hands the original
//! checks over in `--app-probes` (`TRELLIS_APP_PROBES`): a JSON object from
//! path to `{"httpGet": {port, path, scheme, httpHeaders}}`, `{"tcpSocket":
//! {port}}` or `{"grpc": {port, service}}`. This module parses that once at
//! start-up and runs a check against the app the way the kubelet would have:
//! HTTP 200-399 passes, HTTPS without verifying the certificate, a TCP
//! connect, gRPC Health/Check answering SERVING. The answer is 200, or 503
//! with a short reason.
//!
//! A check goes where the kubelet's own probe would have gone: to the
//! address the kubelet reached the admin port on, the pod IP
//! ([`app_host`]; the sidecar's own connections are never intercepted).
//! An app that listens only on loopback fails it, as it fails the kubelet's
//! probe without the mesh - and as mesh callers, which reach the app on the
//! pod IP too, would fail to reach it: a probe never says ready for an app
//! no caller can reach. A check asked for over loopback (an operator in the
//! pod, the local demo) goes to 127.0.0.1.
//!
//! It only ever connects to the local app, on the ports the probes name; it
//! never follows a redirect (a 3xx is a pass, as the kubelet counts it) and
//! never takes a destination from the request.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
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
use trellis_core::duration::Words;
use trellis_core::io_error::IoWords;

pub use trellis_core::app_health::PATH_PREFIX;

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

/// An `httpGet` probe of the app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpGet {
    pub port: u16,
    /// The request target the kubelet would send (path and query), as
    /// [`AppProbes::parse`] makes it from `httpGet.path`.
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
            let path = match h.path.as_deref() {
                None | Some("") => "/".to_string(),
                Some(path) => request_target(path)?,
            };
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

/// The request target the kubelet sends for an `httpGet.path`, which
/// Kubernetes only requires to be non-empty: the kubelet reads it with Go's
/// `url.Parse` (falling back to the whole string as a path when that fails)
/// and writes the request from the URL's string form. So a missing leading
/// `/` is added (`healthz` asks for `/healthz`), a fragment is dropped, a
/// path already validly escaped is kept as written, and otherwise the
/// bytes a path may not hold are percent-encoded (`/a b` asks for
/// `/a%20b`). The query is kept, with the bytes a URI may not hold
/// percent-encoded (the kubelet would write them raw onto the request
/// line). A path Go reads as a URL with a host (`http://localhost/ready`,
/// `//healthz`) asks for what follows the host, since the kubelet puts its
/// own scheme and host in place of the URL's (`/ready`, and `/`). One Go
/// reads as a URL with a scheme and no host (`healthz:8080`) is refused:
/// the kubelet would send no path at all.
fn request_target(raw: &str) -> Result<String, String> {
    let refused = |why: String| Err(format!("path {raw:?} {why}"));
    let after_host = match after_url_host(raw) {
        Ok(rest) => rest,
        Err(scheme) => {
            return refused(format!(
                "reads as a URL with the scheme {scheme:?} and no host, not a path"
            ));
        }
    };
    let raw = after_host.unwrap_or(raw);
    let (target, fragment) = raw.split_once('#').unwrap_or((raw, ""));
    let (path, query) = target
        .split_once('?')
        .map_or((target, None), |(p, q)| (p, Some(q)));
    let controls = target.bytes().any(|b| b < 0x20 || b == 0x7f);
    // What Go's `url.Parse` refuses, so that the kubelet takes the whole
    // string as the path.
    let go_parses = !controls
        && !target.starts_with(':')
        && (path.starts_with('/') || !path.split('/').next().unwrap_or("").contains(':'))
        && percent_escapes_are_valid(path)
        && percent_escapes_are_valid(fragment);
    let (path, query) = if !go_parses {
        (escape_path(raw.as_bytes()), None)
    } else if path.bytes().all(|b| b == b'%' || path_keeps_escaped(b)) {
        (path.to_string(), query)
    } else {
        (escape_path(&percent_decode(path)), query)
    };
    let slash = if path.starts_with('/') { "" } else { "/" };
    let target = match query {
        Some(query) => format!("{slash}{path}?{}", escape_query(query)),
        None => format!("{slash}{path}"),
    };
    match http::uri::PathAndQuery::try_from(target.as_str()) {
        Ok(_) => Ok(target),
        Err(e) => refused(format!("cannot make a request ({target:?}: {e})")),
    }
}

/// What follows the host when Go's `url.Parse` reads `raw` as a URL with
/// one (`scheme://host...` or `//host...`); `None` when it reads no host;
/// the scheme when it reads a scheme and no host.
fn after_url_host(raw: &str) -> Result<Option<&str>, &str> {
    if raw.bytes().any(|b| b < 0x20 || b == 0x7f) {
        // Go refuses the URL, and the kubelet takes it all as the path.
        return Ok(None);
    }
    let path = raw.split(['?', '#']).next().unwrap_or_default();
    let authority = match url_scheme(path) {
        Some(scheme) => raw[scheme.len() + 1..].strip_prefix("//").ok_or(scheme)?,
        None if path.starts_with("//") && !path.starts_with("///") => &raw[2..],
        None => return Ok(None),
    };
    let end = authority.find(['/', '?', '#']).unwrap_or(authority.len());
    Ok(Some(&authority[end..]))
}

/// The scheme Go's `url.Parse` finds before a `:`, if any.
fn url_scheme(path: &str) -> Option<&str> {
    let (scheme, _) = path.split_once(':')?;
    let mut bytes = scheme.bytes();
    let first = bytes.next()?;
    let rest_ok = bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    (first.is_ascii_alphabetic() && rest_ok).then_some(scheme)
}

/// Whether every `%` starts two hex digits, as Go's `url.Parse` requires.
fn percent_escapes_are_valid(s: &str) -> bool {
    let b = s.as_bytes();
    (0..b.len()).filter(|&i| b[i] == b'%').all(|i| {
        b.get(i + 1..i + 3)
            .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
    })
}

fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (c, ..) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// What Go's escaping of a URL path (`shouldEscape`) leaves as it is.
fn path_keeps(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'_'
                | b'.'
                | b'~'
                | b'$'
                | b'&'
                | b'+'
                | b','
                | b'/'
                | b':'
                | b';'
                | b'='
                | b'@'
        )
}

/// What Go accepts in a path already escaped (besides `%`), so keeps as
/// written.
fn path_keeps_escaped(b: u8) -> bool {
    path_keeps(b) || matches!(b, b'!' | b'\'' | b'(' | b')' | b'*' | b'[' | b']')
}

fn escape_path(bytes: &[u8]) -> String {
    escape(bytes, path_keeps)
}

/// A URI query keeps RFC 3986's query characters and existing escapes.
fn escape_query(query: &str) -> String {
    escape(query.as_bytes(), |b| {
        b == b'%' || b == b'?' || path_keeps_escaped(b) && b != b'[' && b != b']'
    })
}

fn escape(bytes: &[u8], keeps: impl Fn(u8) -> bool) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if keeps(b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Why a check failed, as the 503 body says it.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("{target} did not answer within {}", Words(*.1), target = .0)]
    Timeout(Target, Duration),
    #[error("cannot connect to {target}: {}", IoWords(.1), target = .0)]
    Connect(Target, std::io::Error),
    #[error("TLS with {0}: {1}")]
    Tls(Target, std::io::Error),
    #[error("cannot make the request for {0}: {1}")]
    Request(Target, http::Error),
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

/// The address a check reaches the app on, given the one its request
/// reached the admin port on: that address, where the kubelet's probe
/// would have gone (the pod IP), or 127.0.0.1 when it came over loopback
/// (or is unknown).
pub fn app_host(arrived_on: Option<SocketAddr>) -> IpAddr {
    match arrived_on.map(|a| a.ip().to_canonical()) {
        Some(ip) if !ip.is_loopback() && !ip.is_unspecified() => ip,
        _ => Ipv4Addr::LOCALHOST.into(),
    }
}

/// Runs `check` against the app at `host`, giving up after `timeout`.
pub async fn run(check: &Check, host: IpAddr, timeout: Duration) -> Result<(), Failure> {
    let at = |port| SocketAddr::new(host, port);
    let target = match check {
        Check::Http(h) => {
            let scheme = if h.https { "https" } else { "http" };
            Target(format!("{scheme}://{}{}", at(h.port), h.path))
        }
        Check::Tcp { port } => Target(format!("tcp://{}", at(*port))),
        Check::Grpc { port, service } => {
            Target(format!("grpc://{} service {service:?}", at(*port)))
        }
    };
    match tokio::time::timeout(timeout, run_check(check, host, &target)).await {
        Ok(result) => result,
        Err(_) => Err(Failure::Timeout(target, timeout)),
    }
}

async fn run_check(check: &Check, host: IpAddr, target: &Target) -> Result<(), Failure> {
    let connect = |port| async move {
        TcpStream::connect(SocketAddr::new(host, port))
            .await
            .map_err(|e| Failure::Connect(Target(target.0.clone()), e))
    };
    match check {
        Check::Tcp { port } => connect(*port).await.map(drop),
        Check::Http(h) => {
            // Built before connecting: a probe that cannot make its request
            // fails without touching the app.
            let request =
                http_request(h, host).map_err(|e| Failure::Request(Target(target.0.clone()), e))?;
            let tcp = connect(h.port).await?;
            let status = if h.https {
                let tls = tokio_rustls::TlsConnector::from(insecure_tls())
                    .connect(ServerName::from(host), tcp)
                    .await
                    .map_err(|e| Failure::Tls(Target(target.0.clone()), e))?;
                http_get(tls, request).await
            } else {
                http_get(tcp, request).await
            }
            .map_err(|e| Failure::Http(Target(target.0.clone()), e))?;
            // As the kubelet counts it: 200-399 passes.
            if status.is_success() || status.is_redirection() {
                Ok(())
            } else {
                Err(Failure::Status(Target(target.0.clone()), status))
            }
        }
        Check::Grpc { port, service } => grpc_check(SocketAddr::new(host, *port), service)
            .await
            .map_err(|e| Failure::Grpc(Target(target.0.clone()), e)),
    }
}

/// The probe's GET, naming the app at `host` as the kubelet's names the
/// pod IP. [`AppProbes::parse`] only makes probes whose request can be
/// made; a hand-built one that cannot is an error, never a panic.
fn http_request(h: &HttpGet, host: IpAddr) -> Result<Request<Empty<Bytes>>, http::Error> {
    let mut request = Request::get(h.path.as_str())
        .header(header::HOST, SocketAddr::new(host, h.port).to_string())
        .header(header::USER_AGENT, USER_AGENT)
        .header(header::CONNECTION, "close");
    for (name, value) in &h.headers {
        // A probe's own Host or User-Agent replaces ours, as with the kubelet.
        if let Some(headers) = request.headers_mut() {
            headers.insert(name.clone(), value.clone());
        }
    }
    request.body(Empty::<Bytes>::new())
}

/// One HTTP/1.1 GET on `io`; only the status matters.
async fn http_get<IO>(io: IO, request: Request<Empty<Bytes>>) -> Result<StatusCode, hyper::Error>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    let conn = tokio::spawn(conn);
    let response = sender.send_request(request).await?;
    conn.abort();
    Ok(response.status())
}

/// grpc.health.v1.Health/Check on `app`; passes only on SERVING.
async fn grpc_check(app: SocketAddr, service: &str) -> Result<(), String> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{app}"))
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .map_err(|s| trellis_core::grpc::status_words(&s))?
        .into_inner();
    match ServingStatus::try_from(response.status) {
        Ok(ServingStatus::Serving) => Ok(()),
        Ok(status) => Err(format!("status {}", status.as_str_name())),
        Err(_) => Err(format!("unknown status {}", response.status)),
    }
}

/// A client config that accepts any server certificate, as the kubelet's
/// HTTPS probes do (`InsecureSkipVerify`); handshake signatures are still
/// checked. Used only for the app in the pod.
///
/// Unlike the mesh's own TLS (1.3 only, `trellis_core::tls::provider`), it
/// offers TLS 1.2 and 1.3 with rustls' default aws-lc-rs suites: the
/// kubelet speaks TLS 1.2, so an app limited to it passed its probes before
/// injection and must pass them after.
fn insecure_tls() -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = Arc::new(AnyCertificate(provider.clone()));
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("the default provider supports TLS 1.2 and 1.3")
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
    fn a_check_goes_where_the_kubelet_reached_the_admin_port() {
        let at = |a: &str| app_host(Some(a.parse().unwrap())).to_string();
        assert_eq!(at("10.1.2.3:15020"), "10.1.2.3", "the pod IP");
        assert_eq!(at("[fd00::3]:15020"), "fd00::3", "an IPv6 pod IP");
        assert_eq!(at("[::ffff:10.1.2.3]:15020"), "10.1.2.3");
        for loopback in ["127.0.0.1:15020", "[::1]:15020", "0.0.0.0:15020"] {
            assert_eq!(at(loopback), "127.0.0.1", "{loopback}");
        }
        assert_eq!(app_host(None).to_string(), "127.0.0.1");
    }

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

    fn requested(path: &str) -> String {
        let json =
            serde_json::json!({"/app-health/web/liveness": {"httpGet": {"port": 1, "path": path}}});
        match AppProbes::parse(&json.to_string())
            .unwrap()
            .get("/app-health/web/liveness")
        {
            Some(Check::Http(h)) => h.path.clone(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn requests_what_the_kubelet_would_for_a_path() {
        for (path, target) in [
            ("healthz", "/healthz"),
            ("healthz/deep?full=1", "/healthz/deep?full=1"),
            ("/healthz", "/healthz"),
            ("", "/"),
            ("/a b", "/a%20b"),
            ("/caf\u{e9}", "/caf%C3%A9"),
            ("/a\"b<c>{d}|e^`", "/a%22b%3Cc%3E%7Bd%7D%7Ce%5E%60"),
            // Already escaped, or characters a path may hold: as written.
            ("/a%2Fb/(x)!*[y];k=v@h:1", "/a%2Fb/(x)!*[y];k=v@h:1"),
            // Once anything must be escaped, Go re-escapes the decoded path.
            ("/a%41 b!", "/aA%20b%21"),
            ("/x?q=a b&r=%41", "/x?q=a%20b&r=%41"),
            ("/x#frag ment", "/x"),
            ("/x?", "/x?"),
            ("*", "/*"),
            ("///x", "///x"),
            // What Go's url.Parse refuses is all path, escaped as it is.
            ("/bad%zz?q", "/bad%25zz%3Fq"),
            ("/tab\there#f", "/tab%09here%23f"),
            ("1a:b", "/1a:b"),
            (":x", "/:x"),
            // The kubelet puts its own scheme and host in place of a URL's.
            ("http://localhost:8080/ready?full=1", "/ready?full=1"),
            ("HTTPS://user@10.0.0.1/a b", "/a%20b"),
            ("//healthz", "/"),
            ("//host/x#f", "/x"),
            ("http://host?q", "/?q"),
            ("http://host//x", "//x"),
        ] {
            assert_eq!(requested(path), target, "{path:?}");
            http::uri::PathAndQuery::try_from(target).unwrap();
        }
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
            (
                r#"{"/app-health/a/liveness": {"httpGet": {"port": 1, "path": "healthz:8080"}}}"#,
                "\"/app-health/a/liveness\": path \"healthz:8080\" reads as a URL with the scheme \"healthz\"",
            ),
        ] {
            let err = AppProbes::parse(json).unwrap_err();
            assert!(err.contains(says), "{json}: {err}");
        }
    }
}
