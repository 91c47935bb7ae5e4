//! HTTP and gRPC through a local mesh (issue #4): curl over HTTP/1.1 and
//! HTTP/2, tonic unary and streaming calls, L7 policies and rate limits
//! applied with the real `trellisctl`, the access log, the identity header
//! apps can trust, and the ports that stay plain TCP. Each test starts its
//! own mesh; every assertion on enforcement comes after the protected
//! sidecar acknowledged the snapshot version holding the change.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trellis_tests::grpc::{self, GrpcApp, STREAMING_METHOD, STREAMING_SERVICE};
use trellis_tests::http::{HttpConnection, StatusCode};
use trellis_tests::{EchoApp, HttpApp, Mesh, Sidecar, eventually};
use trellis_tests::{policy, probes};

use crate::SOON;

const HEADER: &str = "x-trellis-peer-identity";

/// An app behind the `api` sidecar and a `web` sidecar routing to it.
/// Fields drop in order: sidecars stop before the control plane.
struct Setup {
    web: Sidecar,
    api: Sidecar,
    mesh: Mesh,
}

impl Setup {
    /// Both sidecars run as one-core pods do (`TOKIO_WORKER_THREADS=1`:
    /// every task on one thread); the other suites use several workers.
    async fn start(mesh: Mesh, app: SocketAddr) -> anyhow::Result<Setup> {
        let one_core = ("TOKIO_WORKER_THREADS", "1");
        let api = mesh
            .sidecar("api")
            .app(app)
            .env(one_core.0, one_core.1)
            .start()
            .await?;
        let web = mesh
            .sidecar("web")
            .route_to(&api)
            .env(one_core.0, one_core.1)
            .start()
            .await?;
        Ok(Setup { web, api, mesh })
    }

    /// Where web's app sends plaintext to reach api.
    fn route(&self) -> SocketAddr {
        self.web.route_addr(self.api.identity())
    }

    /// Applies `text` with `trellisctl policy apply` and waits until api
    /// enforces it.
    async fn apply(&self, text: &str) -> anyhow::Result<()> {
        policy::apply_and_wait(&self.mesh, self.api.identity(), text).await?;
        Ok(())
    }

    /// `trellisctl policy explain` for web calling api's `port`, with
    /// `more` arguments.
    async fn explain(&self, port: u16, more: &[&str]) -> anyhow::Result<String> {
        let (from, to) = (self.web.identity(), self.api.identity());
        policy::explain(&self.mesh, from, to, port, more).await
    }
}

/// Lets web call api on `{PORT}`.
const WEB_TO_API: &str = "apiVersion: trellis.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: web-to-api, namespace: default}
spec:
  selector: {spiffeIds: [\"{API}\"]}
  action: ALLOW
  rules: [{from: [{spiffeId: \"{WEB}\"}], to: [{ports: [{PORT}]}]}]
";

/// `trellisctl` takes the document as YAML; `{API}`, `{WEB}` and `{PORT}`
/// are filled in.
fn document(text: &str, setup: &Setup, port: u16) -> String {
    text.replace("{API}", setup.api.identity())
        .replace("{WEB}", setup.web.identity())
        .replace("{PORT}", &port.to_string())
}

/// Runs curl; its stdout when it succeeded.
pub(crate) async fn curl(args: &[&str]) -> anyhow::Result<String> {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The access-log lines of a sidecar's output, parsed.
fn access_lines(sidecar: &Sidecar) -> Vec<serde_json::Value> {
    sidecar
        .log()
        .lines()
        .filter(|l| l.contains("\"trellis::access\""))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?} is not JSON: {e}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_over_http1_and_h2_reaches_the_app_with_the_verified_identity_and_is_logged()
-> anyhow::Result<()> {
    let app = HttpApp::start("api").await?;
    let s = Setup::start(Mesh::start().await?, app.addr()).await?;
    let url = format!("http://{}/hello?token=secret", s.route());
    let spoofed = format!("{HEADER}: spiffe://cluster.local/ns/default/sa/admin");

    let body = curl(&["-H", &spoofed, &url]).await?;
    assert_eq!(body, app.greeting());
    let body = curl(&["--http2-prior-knowledge", "-H", &spoofed, &url]).await?;
    assert_eq!(body, app.greeting());

    let seen = app.requests();
    let versions: Vec<_> = seen.iter().map(|r| r.version).collect();
    assert_eq!(versions, [http::Version::HTTP_11, http::Version::HTTP_2]);
    for request in &seen {
        let identities: Vec<_> = request.headers.get_all(HEADER).iter().collect();
        assert_eq!(
            identities,
            [s.web.identity()],
            "the caller's copy of {HEADER} must never reach the app"
        );
    }

    let lines = eventually("two access-log lines from api", SOON, || async {
        let lines = access_lines(&s.api);
        anyhow::ensure!(lines.len() >= 2, "{} lines so far", lines.len());
        anyhow::Ok(lines)
    })
    .await?;
    let protocols: Vec<_> = lines.iter().map(|l| l["protocol"].clone()).collect();
    assert_eq!(protocols, ["http1", "h2"]);
    for line in &lines {
        assert!(
            line["timestamp"].as_str().is_some_and(|t| !t.is_empty()),
            "{line}"
        );
        assert_eq!(line["source"], s.web.identity(), "{line}");
        assert_eq!(line["destination"], app.addr().to_string(), "{line}");
        assert_eq!(line["method"], "GET", "{line}");
        assert_eq!(line["path"], "/hello", "{line}");
        assert!(
            !line.to_string().contains("secret"),
            "query values leak: {line}"
        );
        assert_eq!(line["status"], 200, "{line}");
        assert!(line["bytes_in"].is_u64(), "{line}");
        assert_eq!(line["bytes_out"], app.greeting().len(), "{line}");
        assert!(
            line["duration_ms"].as_f64().is_some_and(|d| d >= 0.0),
            "{line}"
        );
        assert_eq!(line["decision"], "allow", "{line}");
        assert_eq!(line["policy"], "default:allow-mesh", "{line}");
    }
    Ok(())
}

/// An HTTP/2 frame: its 9-byte header (length, `kind`, `flags`, stream)
/// and `payload`.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut frame = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    frame.extend([kind, flags]);
    frame.extend(stream.to_be_bytes());
    frame.extend(payload);
    frame
}

/// A header field as HPACK writes it literally, not indexed (RFC 7541
/// section 6.2.2; lengths as 7-bit prefix integers).
fn hpack_literal(name: &str, value: &str) -> Vec<u8> {
    let mut out = vec![0];
    for text in [name, value] {
        let mut n = text.len();
        if n < 127 {
            out.push(n as u8);
        } else {
            out.push(127);
            n -= 127;
            while n >= 128 {
                out.push((n % 128) as u8 | 128);
                n /= 128;
            }
            out.push(n as u8);
        }
        out.extend(text.as_bytes());
    }
    out
}

/// A header list over the 64 KiB h2 reads (what a client that ignores the
/// sidecar's SETTINGS_MAX_HEADER_LIST_SIZE sends) is answered 431 with no
/// body, on its stream alone: the connection stays open, and the request
/// reaches neither the app nor the sidecar's log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_header_list_over_64_kib_is_answered_431_on_its_stream() -> anyhow::Result<()> {
    let app = HttpApp::start("api").await?;
    let s = Setup::start(Mesh::start().await?, app.addr()).await?;
    let mut block = Vec::new();
    for (name, value) in [
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/big"),
        (":authority", "api"),
    ] {
        block.extend(hpack_literal(name, value));
    }
    block.extend(hpack_literal("x-big", &"a".repeat(70_000)));
    let mut request = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    request.extend(h2_frame(4, 0, 0, &[]));
    let chunks: Vec<_> = block.chunks(16 * 1024).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let (kind, first) = if i == 0 { (1, 0x1) } else { (9, 0) };
        let last = if i == chunks.len() - 1 { 0x4 } else { 0 };
        request.extend(h2_frame(kind, first | last, 1, chunk));
    }
    let mut tcp = TcpStream::connect(s.route()).await?;
    tcp.write_all(&request).await?;

    // Frames until the answer on stream 1: (kind, flags, stream, payload).
    let mut frames: Vec<(u8, u8, u32, Vec<u8>)> = Vec::new();
    let read = tokio::time::timeout(SOON, async {
        while !frames.iter().any(|f| f.2 == 1) {
            let mut head = [0; 9];
            tcp.read_exact(&mut head).await?;
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0; len];
            tcp.read_exact(&mut payload).await?;
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            frames.push((head[3], head[4], stream, payload));
        }
        anyhow::Ok(())
    })
    .await;
    let kinds: Vec<_> = frames.iter().map(|f| (f.0, f.1, f.2)).collect();
    assert!(read.is_ok_and(|r| r.is_ok()), "{kinds:?}");
    let answer = frames.iter().find(|f| f.2 == 1).expect("read until found");
    // HEADERS with END_STREAM and END_HEADERS; `:status: 431` as h2 encodes
    // it: indexed name 8 (`:status`), Huffman-coded value "431".
    assert_eq!((answer.0, answer.1), (1, 0x5), "{kinds:?}");
    assert_eq!(answer.3, [0x48, 0x83, 0x69, 0x90, 0xff]);
    assert!(
        frames.iter().all(|f| f.0 != 7),
        "no GOAWAY: the connection goes on: {kinds:?}"
    );
    assert!(app.requests().is_empty());
    assert!(access_lines(&s.api).is_empty());

    // `policy explain` says the same, not the sidecar's own 16 KiB words.
    let big = format!("x-big: {}", "a".repeat(70_000));
    let more = [
        "--path",
        "/big",
        "--http2",
        "--header",
        "Host: api",
        "--header",
        &big,
    ];
    let explained = s.explain(app.addr().port(), &more).await?;
    assert!(
        explained.contains(
            "\n  request GET /big: refused (answered 431): request headers (counted as HTTP/2 \
             counts them) reach the HTTP/2 layer's 64 KiB bound: it refuses the request itself, \
             before any rule, with no body, and the sidecar logs nothing (a header block sent \
             in more than six CONTINUATION frames ends the connection instead)\n"
        ),
        "{explained}"
    );
    Ok(())
}

/// An app that speaks only HTTP/1 (Python's `http.server`), called in
/// HTTP/2: the caller's 502 says the app did not answer in HTTP/2, not that
/// it is unreachable, and so does the sidecar's log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_only_app_called_in_h2_is_named_as_such_not_unreachable() -> anyhow::Result<()> {
    let addr = trellis_tests::ports::free_addr();
    let mut app = tokio::process::Command::new("python3")
        .args(["-m", "http.server", "--bind", "127.0.0.1"])
        .arg(addr.port().to_string())
        .current_dir(std::env::temp_dir())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    eventually("the HTTP/1 app to listen", SOON, || {
        TcpStream::connect(addr)
    })
    .await?;
    let mut s = Setup::start(Mesh::start().await?, addr).await?;
    let url = format!("http://{}/", s.route());

    let http1 = curl(&["-o", "/dev/null", "-w", "%{http_code}", &url]).await?;
    let h2 = curl(&["--http2-prior-knowledge", "-w", "%{http_code}", &url]).await?;
    let logged = s
        .api
        .wait_for_log("the app did not answer in HTTP/2", SOON)
        .await;
    app.kill().await?;

    assert_eq!(http1, "200", "the app is up");
    assert_eq!(
        h2,
        "trellis: the app did not answer in HTTP/2: the request came in HTTP/2, and the \
         sidecar sends each request to the app in the version it came in\n502"
    );
    let logged = logged?;
    assert!(logged.contains("request to the app failed"), "{logged}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_path_gets_403_naming_the_rule_and_the_connection_goes_on() -> anyhow::Result<()> {
    let app = HttpApp::start("api").await?;
    let mesh = Mesh::builder().default_policy(Some("deny")).start().await?;
    let s = Setup::start(mesh, app.addr()).await?;
    let policies = WEB_TO_API.to_owned()
        + "---
apiVersion: trellis.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: default}
spec:
  selector: {spiffeIds: [\"{API}\"]}
  action: DENY
  rules: [{to: [{paths: [\"/admin/*\"]}]}]
";
    s.apply(&document(&policies, &s, app.addr().port())).await?;

    let mut connection = HttpConnection::open(s.route()).await?;
    let denied = connection.get("/admin/users").await?;
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
    assert!(
        denied
            .body
            .contains("trellis: denied by policy default/no-admin rule 0"),
        "{denied:?}"
    );
    let allowed = connection.get("/hello").await?.success()?;
    assert_eq!(allowed.body, app.greeting());
    // A DENY path matches in any letter case.
    let denied = connection.get("/ADMIN/users").await?;
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
    let paths: Vec<_> = app.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(
        paths,
        ["/hello"],
        "the denied request never reached the app"
    );

    // A second `Host` is refused before any rule.
    let hosts = "GET /hello HTTP/1.1\r\nhost: api\r\nhost: other\r\n\r\n";
    let answer = probes::plaintext(s.route(), hosts.as_bytes())
        .await?
        .received_text();
    assert_eq!(
        status_and_body(&answer),
        (
            "HTTP/1.1 400 Bad Request",
            "trellis: more than one Host header\n"
        ),
        "{answer}"
    );

    // An absolute-form target is taken: the rules match its path, and a
    // Host naming another authority is refused before any rule.
    let absolute = "GET http://api/admin/users HTTP/1.1\r\nhost: api\r\n\r\n";
    let answer = probes::plaintext(s.route(), absolute.as_bytes())
        .await?
        .received_text();
    let (status, body) = status_and_body(&answer);
    assert_eq!(status, "HTTP/1.1 403 Forbidden", "{answer}");
    assert!(
        body.starts_with("trellis: denied by policy default/no-admin rule 0"),
        "{answer}"
    );
    let differs = "GET http://api/hello HTTP/1.1\r\nhost: other\r\n\r\n";
    let answer = probes::plaintext(s.route(), differs.as_bytes())
        .await?
        .received_text();
    assert_eq!(
        status_and_body(&answer),
        (
            "HTTP/1.1 400 Bad Request",
            "trellis: Host header differs from the authority of the request target\n"
        ),
        "{answer}"
    );

    // An HTTP/2 header list over 16 KiB is refused before any rule.
    let big = format!("x-big: {}", "b".repeat(20 * 1024));
    let url = format!("http://{}/hello", s.route());
    let answer = curl(&[
        "--http2-prior-knowledge",
        "-w",
        "%{http_code}",
        "-H",
        &big,
        &url,
    ])
    .await?;
    let too_large = "request headers (the path and pseudo-headers among them, 32 bytes more \
                     for each field) exceed the sidecar's 16 KiB limit";
    assert_eq!(answer, format!("trellis: {too_large}\n431"));

    // `policy explain` answers each request as the sidecar did.
    let port = app.addr().port();
    let two_hosts = [
        "--path",
        "/hello",
        "--header",
        "Host: api",
        "--header",
        "Host: other",
    ];
    let explained = s.explain(port, &two_hosts).await?;
    assert!(
        explained.contains(
            "\n  request GET /hello: refused (answered 400): more than one Host header\n"
        ),
        "{explained}"
    );
    let explained = s
        .explain(port, &["--path", "/hello", "--http2", "--header", &big])
        .await?;
    assert!(
        explained.contains(&format!(
            "\n  request GET /hello: refused (answered 431): {too_large}\n"
        )),
        "{explained}"
    );
    let other_host = ["--path", "http://api/hello", "--header", "Host: other"];
    let explained = s.explain(port, &other_host).await?;
    assert!(
        explained.contains(
            "\n  request GET /hello: refused (answered 400): Host header differs from the \
             authority of the request target\n"
        ),
        "{explained}"
    );
    for (path, answer) in [
        (
            "http://api/admin/users",
            "deny by default/no-admin rule 0 (answered 403)",
        ),
        (
            "/admin/users",
            "deny by default/no-admin rule 0 (answered 403)",
        ),
        (
            "/ADMIN/users",
            "deny by default/no-admin rule 0 (answered 403)",
        ),
        (
            "/hello",
            "allow by default/web-to-api rule 0 (passed to the app)",
        ),
    ] {
        let explained = s
            .explain(port, &["--path", path, "--header", "Host: api"])
            .await?;
        assert!(
            explained.contains(&format!(
                "\n  request GET {}: {answer}\n",
                path.trim_start_matches("http://api")
            )),
            "{explained}"
        );
    }
    // An HTTP/1.1 request names its host: without a `Host`, in origin
    // form, it is refused; in absolute form, its authority is its `Host`.
    let explained = s.explain(port, &["--path", "/hello"]).await?;
    assert!(
        explained.contains(
            "\n  request GET /hello: refused (answered 400): missing Host header: an HTTP/1.1 \
             request names its host in one (or in an absolute-form target); to explain a request \
             that names one, add --header 'Host: NAME'\n"
        ),
        "{explained}"
    );
    let explained = s.explain(port, &["--path", "http://api/hello"]).await?;
    assert!(
        explained.contains(
            "\n  request GET /hello: allow by default/web-to-api rule 0 (passed to the app)\n"
        ),
        "{explained}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_cross_the_mesh_and_a_denied_method_gets_permission_denied() -> anyhow::Result<()>
{
    let app = GrpcApp::start().await?;
    let mesh = Mesh::builder().default_policy(Some("deny")).start().await?;
    let s = Setup::start(mesh, app.addr()).await?;
    let port = app.addr().port();
    s.apply(&document(WEB_TO_API, &s, port)).await?;

    let channel = grpc::channel(s.route()).await?;
    assert_eq!(grpc::certify(channel.clone()).await?, [b"ok".to_vec()]);
    assert_eq!(grpc::watch_versions(channel.clone()).await?, [1, 2, 3]);

    let deny = format!(
        "apiVersion: trellis.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: no-watch, namespace: default}}
spec:
  selector: {{spiffeIds: [\"{}\"]}}
  action: DENY
  rules: [{{to: [{{grpc: {{service: {STREAMING_SERVICE}, method: {STREAMING_METHOD}}}}}]}}]
",
        s.api.identity()
    );
    s.apply(&deny).await?;
    let refused = grpc::watch_versions(channel.clone())
        .await
        .expect_err("Watch is denied");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("default/no-watch"),
        "{refused:?}"
    );
    assert_eq!(grpc::certify(channel).await?, [b"ok".to_vec()]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_applied_with_trellisctl_answers_429_then_recovers() -> anyhow::Result<()> {
    let app = HttpApp::start("api").await?;
    let s = Setup::start(Mesh::start().await?, app.addr()).await?;
    // One token every five seconds: the burst is spent long before the
    // next one, however slow the machine.
    let limit = "apiVersion: trellis.io/v1alpha1
kind: RateLimitPolicy
metadata: {name: search-limit, namespace: default}
spec:
  selector: {spiffeIds: [\"{API}\"]}
  limit: {requestsPerSecond: 0.2, burst: 3}
  key: source
  match: [{paths: [\"/search/*\"]}]
";
    s.apply(&document(limit, &s, 0)).await?;
    let listed = s.mesh.ctl(["policy", "list"]).await?;
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("RateLimitPolicy") && l.contains("default/search-limit")),
        "{listed}"
    );

    let mut connection = HttpConnection::open(s.route()).await?;
    for _ in 0..3 {
        connection.get("/search/a").await?.success()?;
    }
    let limited = connection.get("/search/a").await?;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS, "{limited:?}");
    let retry_after: u64 = limited
        .headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or_else(|| panic!("429 without a Retry-After in seconds: {limited:?}"));
    assert!((1..=5).contains(&retry_after), "Retry-After {retry_after}");
    // Other paths are not limited.
    connection.get("/other").await?.success()?;

    eventually("the bucket to refill", SOON, || async {
        connection_get(s.route(), "/search/a").await
    })
    .await?;
    Ok(())
}

async fn connection_get(addr: SocketAddr, path: &str) -> anyhow::Result<()> {
    trellis_tests::http::get(addr, path).await?.success()?;
    Ok(())
}

/// Sends `bytes` to `addr`, half-closes, and reads everything back.
async fn round_trip(addr: SocketAddr, bytes: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.write_all(bytes).await?;
    tcp.shutdown().await?;
    let mut back = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tcp.read_to_end(&mut back),
    )
    .await??;
    Ok(back)
}

/// The answer's status line and its body, for a sidecar's answer that
/// closes the connection.
fn status_and_body(answer: &str) -> (&str, &str) {
    let status = answer.split("\r\n").next().unwrap_or_default();
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    (status, body)
}

/// A request head the sidecar refuses (one too large for its limits, or
/// malformed) is answered with the status and a text naming what was
/// wrong and the limit, over HTTP/1.1 (through the sidecar's forwarder,
/// also for a head hyper would serve: an absolute-form target) and HTTP/2 (curl); each is
/// one access-log line with the caller's identity and the problem, and
/// counted as `invalid`. A malformed head later on a connection handed
/// off to hyper is answered in words too, with the token, and logged and
/// counted as the first head is, also after a request whose body is
/// chunked (followed to its end to find the next head): the app reads that
/// body and answers it, and the connection stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_request_heads_say_what_was_wrong_and_are_logged_and_counted() -> anyhow::Result<()>
{
    const TARGET_TOO_LONG: &str =
        "trellis: request target exceeds the sidecar's limit of 65534 bytes\n";
    const HEAD_TOO_LARGE: &str = "trellis: request head exceeds the sidecar's 408 KiB limit\n";
    const INVALID_TARGET: &str = "trellis: malformed request line: invalid request target\n";
    let app = HttpApp::start("api").await?;
    let s = Setup::start(Mesh::start().await?, app.addr()).await?;
    let long = "a".repeat(70_000);
    let http1: [(&str, String, &str, &str); 4] = [
        (
            "an over-long target",
            format!("GET /{long} HTTP/1.1\r\nhost: api\r\n\r\n"),
            "HTTP/1.1 414 URI Too Long",
            TARGET_TOO_LONG,
        ),
        (
            "an over-long target on a head hyper would serve",
            format!("GET https://api/{long} HTTP/1.1\r\nhost: api\r\n\r\n"),
            "HTTP/1.1 414 URI Too Long",
            TARGET_TOO_LONG,
        ),
        (
            "headers over the limit",
            format!(
                "GET /big HTTP/1.1\r\nhost: api\r\ncookie: {}\r\n\r\n",
                "c".repeat(500 * 1024)
            ),
            "HTTP/1.1 431 Request Header Fields Too Large",
            HEAD_TOO_LARGE,
        ),
        (
            "a malformed request line",
            "GET /a\x7fb HTTP/1.1\r\nhost: api\r\n\r\n".to_string(),
            "HTTP/1.1 400 Bad Request",
            INVALID_TARGET,
        ),
    ];
    // Every case is tried before any is asserted: a failure names them all.
    let mut wrong = Vec::new();
    for (case, head, status, text) in &http1 {
        let answer = probes::plaintext(s.route(), head.as_bytes())
            .await?
            .received_text();
        if status_and_body(&answer) != (*status, *text) {
            wrong.push(format!("HTTP/1.1, {case}: {:?}", status_and_body(&answer)));
        }
    }
    // An `https` absolute-form request is hyper's, and so is the connection
    // after it; a malformed head later on it is answered as the first head
    // is, in words with the token.
    let handed_off = "GET https://api/up HTTP/1.1\r\nhost: api\r\n\r\n\
                      GET /a\x7fb HTTP/1.1\r\nhost: api\r\n\r\n";
    let answer = probes::plaintext(s.route(), handed_off.as_bytes())
        .await?
        .received_text();
    let statuses: Vec<_> = answer
        .split("HTTP/1.1 ")
        .skip(1)
        .map(|a| a.split("\r\n").next().unwrap_or_default())
        .collect();
    if statuses != ["200 OK", "400 Bad Request"]
        || !answer.contains("\r\ntrellis-proxy-error: invalid_request\r\n")
        || !answer.ends_with("\r\n\r\ntrellis: malformed request line: invalid request target\n")
    {
        wrong.push(format!("HTTP/1.1 after a hand-off: {answer:?}"));
    }
    // The same after a chunked body the app reads and answers.
    const NO_COLON: &str = "trellis: malformed header line: not a field name and a colon (a line \
                            without a colon, or a space before it)\n";
    let after_chunked = "GET https://api/up HTTP/1.1\r\nhost: api\r\n\r\n\
                         POST /chunked HTTP/1.1\r\nhost: api\r\ntransfer-encoding: chunked\r\n\r\n\
                         5\r\nhello\r\n0\r\n\r\n\
                         GET /after HTTP/1.1\r\nhost: api\r\nno colon\r\n\r\n";
    let answer = probes::plaintext(s.route(), after_chunked.as_bytes())
        .await?
        .received_text();
    let answers: Vec<_> = answer
        .split("HTTP/1.1 ")
        .skip(1)
        .map(|a| {
            let status = a.split("\r\n").next().unwrap_or_default();
            let body = a.split_once("\r\n\r\n").map_or("", |(_, body)| body);
            (status, body)
        })
        .collect();
    let greeting = app.greeting();
    if answers
        != [
            ("200 OK", greeting.as_str()),
            ("200 OK", greeting.as_str()),
            ("400 Bad Request", NO_COLON),
        ]
        || !answer.contains("\r\ntrellis-proxy-error: invalid_request\r\n")
    {
        wrong.push(format!("HTTP/1.1 after a chunked body: {answer:?}"));
    }

    let url = format!("http://{}/h2", s.route());
    let big = format!("x-big: {}", "b".repeat(20 * 1024));
    let long_path = format!("http://{}/{}", s.route(), "p".repeat(20 * 1024));
    let h2_too_large = "trellis: request headers (the path and pseudo-headers among them, 32 bytes more \
                        for each field) exceed the sidecar's 16 KiB limit\n";
    for (case, args) in [
        ("headers over the limit", ["-H", big.as_str(), url.as_str()]),
        (
            "an over-long path",
            ["-H", "x-small: 1", long_path.as_str()],
        ),
    ] {
        let answer = curl(
            &[
                &["--http2-prior-knowledge", "-w", "%{http_code}"][..],
                &args[..],
            ]
            .concat(),
        )
        .await?;
        if answer != format!("{h2_too_large}431") {
            wrong.push(format!("HTTP/2, {case}: {answer:?}"));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    let requests: Vec<_> = app
        .requests()
        .into_iter()
        .map(|r| format!("{} {} {:?}", r.method, r.path, r.body))
        .collect();
    assert_eq!(
        requests,
        ["GET /up b\"\"", "GET /up b\"\"", "POST /chunked b\"hello\""]
    );

    let refused = http1.len() + 2 + 2;
    let lines = eventually("the refusals' access-log lines from api", SOON, || async {
        let lines: Vec<_> = access_lines(&s.api)
            .into_iter()
            .filter(|l| l["decision"] == "invalid")
            .collect();
        anyhow::ensure!(lines.len() >= refused, "{} lines so far", lines.len());
        anyhow::Ok(lines)
    })
    .await?;
    let logged: Vec<_> = lines
        .iter()
        .map(|l| {
            (
                l["status"].clone(),
                l["problem"].clone(),
                l["protocol"].clone(),
            )
        })
        .collect();
    // The log's problem is the answer's words, without `trellis: `.
    let problem = |text: &str| {
        let words = text.trim_end().strip_prefix("trellis: ");
        serde_json::Value::from(words.unwrap_or(text))
    };
    let expected: Vec<_> = http1
        .iter()
        .map(|(_, _, status, text)| {
            let code: u64 = status[9..12].parse().unwrap();
            (code.into(), problem(text), "http1".into())
        })
        .chain([
            (
                400.into(),
                "malformed request line: invalid request target".into(),
                "http1".into(),
            ),
            (400.into(), problem(NO_COLON), "http1".into()),
        ])
        .chain(std::iter::repeat_n(
            (431.into(), problem(h2_too_large), "h2".into()),
            2,
        ))
        .collect();
    assert_eq!(logged, expected);
    for line in &lines {
        assert_eq!(line["source"], s.web.identity(), "{line}");
        assert_eq!(line["policy"], serde_json::Value::Null, "{line}");
        assert!(
            line.to_string().len() < 4096,
            "the caller's bytes are not logged: {line}"
        );
    }
    let invalid = s.api.metrics().await?.counter(
        "trellis_requests_total",
        &[("decision", "invalid"), ("status", "4xx")],
    );
    assert_eq!(invalid, refused as f64);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_stays_tcp_and_mesh_opaque_ports_refuse_l7_policies() -> anyhow::Result<()> {
    let db = EchoApp::start().await?;
    let echo = EchoApp::start().await?;
    let db_port = db.addr().port().to_string();
    let mesh = Mesh::builder()
        .arg("--opaque-ports")
        .arg(&db_port)
        .start()
        .await?;
    let db_sidecar = mesh.sidecar("db").app(db.addr()).start().await?;
    let echo_sidecar = mesh.sidecar("echo").app(echo.addr()).start().await?;
    let web = mesh
        .sidecar("web")
        .route_to(&db_sidecar)
        .route_to(&echo_sidecar)
        .start()
        .await?;

    // A client-first binary protocol on a port nobody declared: detected
    // as not HTTP, passed as bytes.
    let binary = b"\x16\x03\x01\x00\x05hello\x00";
    let back = round_trip(web.route_addr(echo_sidecar.identity()), binary).await?;
    assert_eq!(back, binary);
    // An HTTP request to the mesh-opaque port is never parsed: the echo
    // answers with the very bytes, not the sidecar with a response.
    let request = b"GET / HTTP/1.1\r\nhost: db\r\n\r\n";
    let back = round_trip(web.route_addr(db_sidecar.identity()), request).await?;
    assert_eq!(back, request);
    // The sidecar says which ports it holds opaque, the mesh's among them.
    let config = db_sidecar.config().await?;
    assert!(
        config["opaque_ports"].as_array().is_some_and(|ports| ports
            .iter()
            .any(|p| p.as_u64() == Some(db.addr().port().into()))),
        "{config}"
    );

    let l7 = format!(
        "apiVersion: trellis.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: db-reads, namespace: default}}
spec:
  selector: {{spiffeIds: [\"{}\"]}}
  action: ALLOW
  rules:
    - to:
        - ports: [{db_port}]
          methods: [GET]
",
        db_sidecar.identity()
    );
    // An L7 rule on a mesh-opaque port is refused.
    let (file, message) = policy::apply_refused(&mesh, &l7).await?;
    assert!(
        message.contains(&format!(
            "{}:9:19: spec.rules[0].to[0].ports[0]: port {db_port} is declared opaque",
            file.display()
        )),
        "{message}"
    );
    assert!(message.contains("nothing applied"), "{message}");
    let listed = mesh.ctl(["policy", "list", "-o", "json"]).await?;
    assert!(!listed.contains("db-reads"), "{listed}");
    Ok(())
}

/// The policy `default/{name}` on `target`'s workload: one `action` rule,
/// from `source`, to `to` (a YAML flow mapping: ports, paths).
fn one_rule(name: &str, action: &str, target: &Sidecar, source: &Sidecar, to: &str) -> String {
    format!(
        "apiVersion: trellis.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: default}}
spec:
  selector: {{spiffeIds: [\"{}\"]}}
  action: {action}
  rules: [{{from: [{{spiffeId: \"{}\"}}], to: [{to}]}}]
",
        target.identity(),
        source.identity()
    )
}

/// An allow-mesh mesh and in it an echo app, `db`, behind a sidecar that
/// declares the app's port opaque (`--opaque-ports` on that sidecar
/// alone): the app, its port, the mesh and the sidecar.
async fn db_behind_its_own_opaque_port() -> anyhow::Result<(EchoApp, u16, Mesh, Sidecar)> {
    let db = EchoApp::start().await?;
    let db_port = db.addr().port();
    let mesh = Mesh::builder()
        .default_policy(Some("allow-mesh"))
        .start()
        .await?;
    let db_sidecar = mesh
        .sidecar("db")
        .app(db.addr())
        .arg("--opaque-ports")
        .arg(db_port.to_string())
        .start()
        .await?;
    Ok((db, db_port, mesh, db_sidecar))
}

/// A port one sidecar declares opaque (`--opaque-ports` on it, not on the
/// control plane): the control plane cannot know it, so an L7 policy on it
/// is valid and reaches the sidecar. The sidecar applies the snapshot
/// instead of refusing it (and every later one), failing closed on that
/// port: the DENY rule with paths denies the whole connection, naming the
/// policy. It says so in its log and `/config`, and a later change still
/// reaches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l7_rules_on_a_sidecars_own_opaque_port_fail_closed() -> anyhow::Result<()> {
    let (_db, db_port, mesh, mut db_sidecar) = db_behind_its_own_opaque_port().await?;
    let web = mesh.sidecar("web").route_to(&db_sidecar).start().await?;
    let to_db = web.route_addr(db_sidecar.identity());
    let binary = b"\x16\x03\x01\x00\x05hello\x00";
    assert_eq!(round_trip(to_db, binary).await?, binary);

    let to = format!("{{ports: [{db_port}], paths: [/admin]}}");
    let no_admin = one_rule("no-admin", "DENY", &db_sidecar, &web, &to);
    policy::apply_and_wait(&mesh, db_sidecar.identity(), &no_admin).await?;

    // Nothing reaches the app: the connection ends without an answer.
    let back = round_trip(to_db, binary).await.unwrap_or_default();
    assert!(back.is_empty(), "{back:?}");
    let line = db_sidecar
        .wait_for_log("inbound connection denied", SOON)
        .await?;
    assert!(line.contains("policy=default/no-admin rule=0"), "{line}");
    let warning = db_sidecar.wait_for_log("declares opaque", SOON).await?;
    assert!(
        warning.contains("default/no-admin rule 0 has HTTP conditions on port")
            && warning.contains(&db_port.to_string())
            && warning.contains("it denies every connection"),
        "{warning}"
    );
    let config = db_sidecar.config().await?;
    let reported = config["policy"]["opaque_fallbacks"][0]
        .as_str()
        .unwrap_or_default();
    assert!(
        reported.starts_with(&format!(
            "default/no-admin rule 0 has HTTP conditions on port {db_port}"
        )),
        "{config}"
    );

    // The sidecar's ACK carries the warning to the control plane, and
    // `trellisctl check` shows it for that workload.
    let check = mesh.ctl_output(["check"]).await?;
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(
        text.lines().any(|l| l.contains(&format!(
            "{} enforces its snapshot otherwise than sent: default/no-admin rule 0 has HTTP \
             conditions on port {db_port}",
            db_sidecar.identity()
        ))),
        "{text}{}",
        String::from_utf8_lossy(&check.stderr)
    );

    // A later change reaches the sidecar too: without the policy, the
    // connection is allowed again.
    let removed = policy::delete(&mesh, "default/no-admin").await?;
    policy::wait_for_ack(&mesh, db_sidecar.identity(), removed).await?;
    assert_eq!(round_trip(to_db, binary).await?, binary);
    let config = db_sidecar.config().await?;
    assert_eq!(config["policy"]["opaque_fallbacks"], serde_json::json!([]));
    let workload = mesh.workload(db_sidecar.identity()).await?;
    assert_eq!(
        workload["ack_warnings"],
        serde_json::json!([]),
        "{workload}"
    );
    Ok(())
}

/// An L7 DENY entry that names no ports has its HTTP conditions on every
/// port, the sidecar's opaque ones included, where they cannot be checked.
/// There it fails closed instead of letting the rule's sources through:
/// the attacker's TCP connection to the opaque port is refused, the log
/// and the decision metric name the policy, and `trellisctl policy
/// explain`, which knows the ports the sidecar declared when it
/// subscribed, says the same and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l7_deny_naming_no_ports_fails_closed_on_an_opaque_port() -> anyhow::Result<()> {
    let (_db, db_port, mesh, mut db_sidecar) = db_behind_its_own_opaque_port().await?;
    let attacker = mesh
        .sidecar("attacker")
        .route_to(&db_sidecar)
        .start()
        .await?;
    let to_db = attacker.route_addr(db_sidecar.identity());
    let binary = b"\x16\x03\x01\x00\x05hello\x00";
    assert_eq!(round_trip(to_db, binary).await?, binary);

    let no_admin = one_rule(
        "no-admin",
        "DENY",
        &db_sidecar,
        &attacker,
        "{paths: [/admin]}",
    );
    policy::apply_and_wait(&mesh, db_sidecar.identity(), &no_admin).await?;

    // Nothing reaches the app: the connection ends without an answer.
    let back = round_trip(to_db, binary).await.unwrap_or_default();
    assert!(back.is_empty(), "{back:?}");
    let line = db_sidecar
        .wait_for_log("inbound connection denied", SOON)
        .await?;
    assert!(line.contains("policy=default/no-admin rule=0"), "{line}");
    let metrics = db_sidecar.metrics().await?;
    let denied = metrics.counter(
        "trellis_decisions_total",
        &[("action", "deny"), ("policy", "default/no-admin")],
    );
    assert!(denied >= 1.0, "no deny counted for the policy");
    let warning = db_sidecar.wait_for_log("treats as opaque", SOON).await?;
    assert!(
        warning.contains("default/no-admin rule 0 has HTTP conditions on every port")
            && warning.contains(&format!("port {db_port} is opaque"))
            && warning.contains("it denies every connection"),
        "{warning}"
    );
    let config = db_sidecar.config().await?;
    let reported = config["policy"]["opaque_fallbacks"][0]
        .as_str()
        .unwrap_or_default();
    assert!(
        reported.starts_with("default/no-admin rule 0 has HTTP conditions on every port"),
        "{config}"
    );
    let (from, to) = (attacker.identity(), db_sidecar.identity());
    let explained = policy::explain(&mesh, from, to, db_port, &[]).await?;
    assert!(
        explained.contains("deny by default/no-admin rule 0"),
        "{explained}"
    );
    assert!(
        explained.contains(&format!(
            "port {db_port} is opaque (never parsed as HTTP): declared by the destination's \
             sidecar (its --opaque-ports)"
        )),
        "{explained}"
    );
    Ok(())
}

/// An AUDIT rule with HTTP conditions is the dry run of the DENY that
/// would refuse a connection that is not HTTP whole: such a connection
/// passes, logged as "would deny" naming the policy and rule and counted
/// under the policy's `audit` decisions, as an HTTP request it matches is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_l7_audit_counts_a_connection_that_is_not_http() -> anyhow::Result<()> {
    let echo = EchoApp::start().await?;
    let mesh = Mesh::builder()
        .default_policy(Some("allow-mesh"))
        .start()
        .await?;
    let mut echo_sidecar = mesh.sidecar("echo").app(echo.addr()).start().await?;
    let web = mesh.sidecar("web").route_to(&echo_sidecar).start().await?;
    let watch = one_rule(
        "watch-admin",
        "AUDIT",
        &echo_sidecar,
        &web,
        "{paths: [/admin]}",
    );
    policy::apply_and_wait(&mesh, echo_sidecar.identity(), &watch).await?;

    let binary = b"\x16\x03\x01\x00\x05hello\x00";
    let to_echo = web.route_addr(echo_sidecar.identity());
    assert_eq!(round_trip(to_echo, binary).await?, binary);
    let line = echo_sidecar
        .wait_for_log("inbound connection is not HTTP: would deny", SOON)
        .await?;
    assert!(line.contains("policy=default/watch-admin rule=0"), "{line}");
    // Counted with the connection's decision, before its bytes reach the
    // app: the echo answered, so both are in.
    let metrics = echo_sidecar.metrics().await?;
    let audited = metrics.counter(
        "trellis_decisions_total",
        &[("action", "audit"), ("policy", "default/watch-admin")],
    );
    let allowed = metrics.counter(
        "trellis_decisions_total",
        &[("action", "allow"), ("policy", "default:allow-mesh")],
    );
    assert_eq!((audited, allowed), (1.0, 1.0), "audit and allow counted");
    Ok(())
}
