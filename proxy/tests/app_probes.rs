//! The app's kubelet probes on the sidecar's admin port, as the kubelet
//! sees them: `GET /app-health/<container>/<kind>` answers 200 when the
//! app passes its original probe and 503 when not, against real apps on
//! loopback (an HTTP and an HTTPS server answering 200, 302 and 500, an open
//! and a closed TCP port, a gRPC health server). The probes come from the
//! injector itself, so the sidecar reads exactly what the injector writes.

mod common;

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::injector::sidecar_env;
use common::sidecar::{LOOPBACK_LISTENERS, config_from, credential_flags};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use trellis_proxy::admin::probes::{self, Check, Failure, HttpGet};

const ID: &str = "spiffe://td.test/ns/default/sa/web";

/// Where the test apps listen.
const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// What the test app answers: 200 on `/ok` and on `/a%20b` exactly as
/// escaped, 302 on `/moved`, 500 on `/fail`; `/header` is 200 only with
/// `X-Probe: kubelet`.
fn app_answer(req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let status = match req.uri().path() {
        "/ok" | "/a%20b" => StatusCode::OK,
        "/moved" => StatusCode::FOUND,
        "/header" if req.headers().get("x-probe").is_some_and(|v| v == "kubelet") => StatusCode::OK,
        "/header" => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let mut response = Response::new(Full::new(Bytes::from_static(b"app\n")));
    *response.status_mut() = status;
    if status == StatusCode::FOUND {
        // Somewhere a probe must never go.
        response
            .headers_mut()
            .insert(http::header::LOCATION, "http://192.0.2.1/".parse().unwrap());
    }
    response
}

/// Serves [`app_answer`] on a free loopback port, over TLS with a
/// self-signed certificate when `tls`.
async fn http_app(tls: bool) -> u16 {
    serve_app(tls.then(|| {
        app_tls(
            rustls::ServerConfig::builder_with_provider(trellis_core::tls::provider())
                .with_safe_default_protocol_versions()
                .unwrap(),
        )
    }))
    .await
}

/// Serves [`app_answer`] over TLS 1.2 only, as an app on an older TLS
/// stack does.
async fn tls12_app() -> u16 {
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    serve_app(Some(app_tls(
        rustls::ServerConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap(),
    )))
    .await
}

/// A self-signed certificate on `config`.
fn app_tls(
    config: rustls::ConfigBuilder<rustls::ServerConfig, rustls::WantsVerifier>,
) -> tokio_rustls::TlsAcceptor {
    let cert = rcgen::generate_simple_self_signed(vec!["app.invalid".into()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let config = config
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

async fn serve_app(acceptor: Option<tokio_rustls::TlsAcceptor>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req| async move {
                    Ok::<_, Infallible>(app_answer(&req))
                });
                let http = hyper::server::conn::http1::Builder::new();
                let _ = match acceptor {
                    Some(acceptor) => {
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        http.serve_connection(TokioIo::new(tls), service).await
                    }
                    None => http.serve_connection(TokioIo::new(tcp), service).await,
                };
            });
        }
    });
    port
}

/// A gRPC server with grpc.health.v1: "" and "orders" SERVING, "payments"
/// NOT_SERVING, any other service unknown.
async fn grpc_health_app() -> u16 {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("orders", tonic_health::ServingStatus::Serving)
        .await;
    reporter
        .set_service_status("payments", tonic_health::ServingStatus::NotServing)
        .await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tokio::spawn(async move {
        let _reporter = reporter;
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming)
            .await
    });
    port
}

/// A loopback port nothing listens on (below the ephemeral range, so no
/// parallel test's socket takes it).
fn closed_port() -> u16 {
    common::ports::free_addr().port()
}

/// `TRELLIS_APP_PROBES` as the injector writes it for `pod`.
fn injected_probes(pod: &Value) -> String {
    sidecar_env(pod)
        .into_iter()
        .find(|(name, _)| name == "TRELLIS_APP_PROBES")
        .and_then(|(_, value)| value.as_str().map(str::to_owned))
        .expect("the sidecar gets the probes")
}

fn http_probe(port: Value, path: &str) -> Value {
    json!({"httpGet": {"port": port, "path": path}, "periodSeconds": 10})
}

/// A sidecar serving `probes` (the `--app-probes` JSON); returns its admin
/// address.
async fn sidecar(probes: &str) -> SocketAddr {
    let mut args = vec!["--identity", ID, "--app-probes", probes];
    args.extend(LOOPBACK_LISTENERS);
    args.extend(credential_flags());
    let config = config_from(&args);
    let sidecar = trellis_proxy::Sidecar::bind(config).await.unwrap();
    let admin = sidecar.admin_addr().unwrap();
    tokio::spawn(sidecar.run(std::future::pending()));
    admin
}

/// What the kubelet gets for `GET path` on the admin port.
async fn kubelet_get(admin: SocketAddr, path: &str) -> (StatusCode, String) {
    let (status, _, body) = kubelet_get_marked(admin, path).await;
    (status, body)
}

/// [`kubelet_get`], with the answer's `trellis-proxy-error`, if any.
async fn kubelet_get_marked(admin: SocketAddr, path: &str) -> (StatusCode, Option<String>, String) {
    let tcp = TcpStream::connect(admin).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = Request::get(path)
        .header(http::header::HOST, admin.to_string())
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status();
    let marked = response.headers().get("trellis-proxy-error");
    let marked = marked.map(|v| v.to_str().unwrap().to_owned());
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, marked, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn each_probe_kind_passes_and_fails_as_the_kubelet_would_see_it() {
    let plain = http_app(false).await;
    let secure = http_app(true).await;
    let grpc = grpc_health_app().await;
    let open = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (open_port, closed) = (open.local_addr().unwrap().port(), closed_port());

    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web-1", "namespace": "default"},
        "spec": {
            "serviceAccountName": "web",
            "containers": [
                {
                    "name": "web",
                    "image": "web",
                    "ports": [{"name": "http", "containerPort": plain}],
                    "livenessProbe": http_probe(json!("http"), "/ok"),
                    "readinessProbe": http_probe(json!(plain), "/fail"),
                    "startupProbe": http_probe(json!(plain), "/moved"),
                    // A hook the kubelet calls on the pod IP reaches the app
                    // the same way.
                    "lifecycle": {"preStop": {"httpGet": {"port": "http", "path": "/ok"}}},
                },
                {
                    "name": "secure",
                    "image": "secure",
                    "livenessProbe": {"httpGet": {"port": secure, "path": "/header",
                        "scheme": "HTTPS", "httpHeaders": [{"name": "X-Probe", "value": "kubelet"}]}},
                    "readinessProbe": {"httpGet": {"port": secure, "path": "/header",
                        "scheme": "HTTPS"}},
                },
                {
                    "name": "db",
                    "image": "db",
                    "livenessProbe": {"tcpSocket": {"port": open_port}},
                    "readinessProbe": {"tcpSocket": {"port": closed}},
                },
                {
                    "name": "grpc",
                    "image": "grpc",
                    "livenessProbe": {"grpc": {"port": grpc}},
                    "readinessProbe": {"grpc": {"port": grpc, "service": "payments"}},
                    "startupProbe": {"grpc": {"port": grpc, "service": "nobody"}},
                },
            ],
        },
    });
    let admin = sidecar(&injected_probes(&pod)).await;

    let expected = [
        ("/app-health/web/liveness", 200, "ok"),
        ("/app-health/web/readiness", 503, "answered 500"),
        ("/app-health/web/startup", 200, "ok"),
        ("/app-health/web/pre-stop", 200, "ok"),
        ("/app-health/secure/liveness", 200, "ok"),
        ("/app-health/secure/readiness", 503, "answered 400"),
        ("/app-health/db/liveness", 200, "ok"),
        ("/app-health/db/readiness", 503, "cannot connect"),
        ("/app-health/db/readiness", 503, ": connection refused\n"),
        ("/app-health/grpc/liveness", 200, "ok"),
        ("/app-health/grpc/readiness", 503, "NOT_SERVING"),
        (
            "/app-health/grpc/startup",
            503,
            "service \"nobody\": not found: service not registered\n",
        ),
        ("/app-health/nobody/liveness", 404, "no app probe"),
    ];
    for (path, status, says) in expected {
        let (got, marked, body) = kubelet_get_marked(admin, path).await;
        assert_eq!(got.as_u16(), status, "{path}: {body}");
        assert!(body.contains(says), "{path}: {body}");
        assert!(!body.contains("os error"), "{path}: {body}");
        // The sidecar's own verdict on the app, not the app's answer.
        let token = match status {
            200 => None,
            503 => Some("probe_failed"),
            _ => Some("not_found"),
        };
        assert_eq!(marked.as_deref(), token, "{path}: {body}");
    }
    drop(open);
}

/// The sidecar's `/ready`, while it is not ready (here it has no
/// certificate: no control plane answers it), answers 503 saying why,
/// marked as the sidecar's own answer as its other refusals are.
#[tokio::test]
async fn the_sidecar_s_own_503_is_marked_not_ready() {
    let admin = sidecar("{}").await;
    let (status, marked, body) = kubelet_get_marked(admin, "/ready").await;
    assert_eq!(
        (status.as_u16(), marked.as_deref()),
        (503, Some("not_ready")),
        "{body}"
    );
    // Then, once a Certify has failed, why it did.
    assert!(
        body.starts_with("trellis: not ready: no certificate yet"),
        "{body}"
    );
    let (status, marked, body) = kubelet_get_marked(admin, "/live").await;
    assert_eq!(
        (status.as_u16(), marked.as_deref(), body.as_str()),
        (200, None, "live\n")
    );
}

#[tokio::test]
async fn a_probe_gives_up_after_its_timeout() {
    // Accepts, then never answers.
    let hung = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = hung.local_addr().unwrap().port();
    let _held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = hung.accept().await {
            held.push(tcp);
        }
    });
    let check = Check::Http(HttpGet {
        port,
        path: "/ok".into(),
        https: false,
        headers: Vec::new(),
    });
    let err = probes::run(&check, LOOPBACK, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(err, Failure::Timeout(..)), "{err}");
    // The 503 answer of `/app-health/...` says it, in words.
    assert_eq!(
        err.to_string(),
        format!("http://127.0.0.1:{port}/ok did not answer within 300 milliseconds")
    );
}

/// The kubelet probes the pod IP: a check goes to the address it is given
/// (the one the kubelet reached the admin port on), so an app that listens
/// only on another address (127.0.0.1 here; loopback in a pod) fails it,
/// as it fails the kubelet's own probe.
#[tokio::test]
async fn a_probe_checks_the_app_at_the_address_it_is_given_only() {
    let app = http_app(false).await;
    let check = Check::Http(HttpGet {
        port: app,
        path: "/ok".into(),
        https: false,
        headers: Vec::new(),
    });
    probes::run(&check, LOOPBACK, Duration::from_secs(5))
        .await
        .unwrap();
    let elsewhere = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let err = probes::run(&check, elsewhere, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(matches!(err, Failure::Connect(..)), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("http://127.0.0.2:{app}/ok")),
        "{err}"
    );
}

#[tokio::test]
async fn paths_are_requested_as_the_kubelet_requests_them() {
    let app = http_app(false).await;
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web-1", "namespace": "default"},
        "spec": {
            "serviceAccountName": "web",
            "containers": [{
                "name": "web",
                "image": "web",
                // Kubernetes only wants a non-empty path: the kubelet adds
                // the leading slash and escapes the space.
                "livenessProbe": http_probe(json!(app), "ok"),
                "readinessProbe": http_probe(json!(app), "/a b"),
            }],
        },
    });
    let admin = sidecar(&injected_probes(&pod)).await;
    for path in ["/app-health/web/liveness", "/app-health/web/readiness"] {
        let (status, body) = kubelet_get(admin, path).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
    }
}

#[tokio::test]
async fn a_probe_that_cannot_make_its_request_fails_without_panicking() {
    // Only a hand-built probe can hold such a path: parsing escapes it.
    let app = http_app(false).await;
    let check = Check::Http(HttpGet {
        port: app,
        path: "/a b".into(),
        https: false,
        headers: Vec::new(),
    });
    let err = probes::run(&check, LOOPBACK, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(matches!(err, Failure::Request(..)), "{err}");
}

#[tokio::test]
async fn https_probes_reach_an_app_limited_to_tls_1_2() {
    let app = tls12_app().await;
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web-1", "namespace": "default"},
        "spec": {
            "serviceAccountName": "web",
            "containers": [{
                "name": "legacy",
                "image": "legacy",
                "livenessProbe": {"httpGet": {"port": app, "path": "/ok", "scheme": "HTTPS"}},
            }],
        },
    });
    let admin = sidecar(&injected_probes(&pod)).await;
    let (status, body) = kubelet_get(admin, "/app-health/legacy/liveness").await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[test]
fn invalid_probes_exit_64_naming_the_flag() {
    let bin = env!("CARGO_BIN_EXE_trellis-proxy");
    let bad = [
        ("{not json", "--app-probes"),
        (
            r#"{"/app-health/web/liveness": {"exec": {"command": ["true"]}}}"#,
            "--app-probes",
        ),
        (
            r#"{"/app-health/web/liveness": {"httpGet": {"port": 8080, "scheme": "FTP"}}}"#,
            "--app-probes",
        ),
        // A path the kubelet would read as a URL, not a path: refused at
        // start-up naming the probe, rather than failing every probe.
        (
            r#"{"/app-health/web/liveness": {"httpGet": {"port": 8080, "path": "healthz:8080"}}}"#,
            r#""/app-health/web/liveness": path "healthz:8080""#,
        ),
    ];
    for (json, says) in bad {
        let out = Command::new(bin)
            .args(["--identity", ID, "--app-probes", json])
            .args(credential_flags())
            .env_clear()
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{json}: {stderr}");
        assert!(stderr.contains("--app-probes"), "{json}: {stderr}");
        assert!(stderr.contains(says), "{json}: {stderr}");
    }
    // The environment twin is checked the same way.
    let out = Command::new(bin)
        .args(["--identity", ID])
        .args(credential_flags())
        .env_clear()
        .env("TRELLIS_APP_PROBES", "[]")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--app-probes"));
}
