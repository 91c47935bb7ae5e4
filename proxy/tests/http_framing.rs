//! Request smuggling through the sidecar: every request the app receives
//! is one the sidecar framed the same way, and decided.
//!
//! Raw bytes go over mTLS to a real sidecar's inbound listener, crafted
//! the way request-smuggling attacks are: `Content-Length` beside
//! `Transfer-Encoding`, two lengths, an encoding that is not `chunked`, a
//! folded header, a request hidden in a body (also in a denied one's).
//! The app behind it is a strict HTTP/1.1 server of the test's own
//! (httparse for the head, its own chunked decoder) that records every
//! request it frames and whether its framing was ambiguous. A policy denies `/admin/*`: a request for it
//! reaching the app would be a request the sidecar never decided.
//!
//! The other way, an app's answer framed two ways (a length beside
//! `chunked`, two lengths) followed by bytes that read as a second answer:
//! app connections are shared by callers between requests, so those bytes
//! must never become another caller's answer.
//!
//! And HTTP/1.0 keep-alive: a caller that asks for it keeps its
//! connection when the answer's length is known, whichever version the
//! app answers in, and only then.

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::control_plane::FakeControlPlane;
use common::http::*;
use common::sidecar::sidecar;
use common::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CERT_TTL: Duration = Duration::from_secs(3600);

/// A request as the app framed it.
#[derive(Debug, Clone, PartialEq)]
struct Framed {
    method: String,
    path: String,
    body: Vec<u8>,
}

/// What the app saw: the requests it framed, and any it could not frame
/// unambiguously (both lengths, two lengths, an unknown coding).
#[derive(Default)]
struct Record {
    requests: Vec<Framed>,
    ambiguous: Vec<String>,
    /// The `Content-Length` fields of each request framed, as sent.
    lengths: Vec<Vec<String>>,
    /// The `Expect` fields of each request framed, after its path.
    expectations: Vec<String>,
}

#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Record>>);

impl Seen {
    fn requests(&self) -> Vec<Framed> {
        self.0.lock().unwrap().requests.clone()
    }
    fn ambiguous(&self) -> Vec<String> {
        self.0.lock().unwrap().ambiguous.clone()
    }
    fn lengths(&self) -> Vec<Vec<String>> {
        self.0.lock().unwrap().lengths.clone()
    }
    fn expectations(&self) -> Vec<String> {
        self.0.lock().unwrap().expectations.clone()
    }
}

/// An app on a free loopback port that serves each connection with
/// `serve` until it returns.
async fn app<F, Fut>(serve: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = std::io::Result<()>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(serve(tcp));
        }
    });
    addr
}

/// The strict app: answers each request it frames with `200 ok`.
async fn strict_app() -> (SocketAddr, Seen) {
    let seen = Seen::default();
    (strict_app_addr(&seen).await, seen)
}

/// Another strict app, recording into `seen`.
async fn strict_app_addr(seen: &Seen) -> SocketAddr {
    let record = seen.clone();
    app(move |tcp| serve(tcp, record.clone())).await
}

/// Bytes read from a connection and not yet used.
struct Reader<S> {
    io: S,
    buf: Vec<u8>,
}

impl<S: AsyncRead + Unpin> Reader<S> {
    /// Reads more; false at the end of the stream.
    async fn fill(&mut self) -> std::io::Result<bool> {
        let mut chunk = [0u8; 4096];
        let n = self.io.read(&mut chunk).await?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n > 0)
    }

    async fn take(&mut self, n: usize) -> std::io::Result<Vec<u8>> {
        while self.buf.len() < n {
            if !self.fill().await? {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    async fn line(&mut self) -> std::io::Result<Vec<u8>> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let mut line: Vec<u8> = self.buf.drain(..end + 2).collect();
                line.truncate(end);
                return Ok(line);
            }
            if !self.fill().await? {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// A chunked body, its trailers skipped.
    async fn chunked(&mut self) -> std::io::Result<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let line = self.line().await?;
            let size = std::str::from_utf8(&line)
                .ok()
                .and_then(|l| usize::from_str_radix(l.split(';').next()?.trim(), 16).ok())
                .ok_or_else(|| std::io::Error::other("bad chunk size"))?;
            if size == 0 {
                while !self.line().await?.is_empty() {}
                return Ok(body);
            }
            body.extend(self.take(size).await?);
            if !self.line().await?.is_empty() {
                return Err(std::io::Error::other("no CRLF after a chunk"));
            }
        }
    }
}

async fn serve(tcp: TcpStream, seen: Seen) -> std::io::Result<()> {
    let (read, mut write) = tcp.into_split();
    let mut r = Reader {
        io: read,
        buf: Vec::new(),
    };
    loop {
        let (method, path, lengths, codings, expect, head_len) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 128];
            let mut req = httparse::Request::new(&mut headers);
            if let httparse::Status::Complete(n) = req
                .parse(&r.buf)
                .map_err(|e| std::io::Error::other(e.to_string()))?
            {
                let values = |name: &str| -> Vec<String> {
                    req.headers
                        .iter()
                        .filter(|h| h.name.eq_ignore_ascii_case(name))
                        .map(|h| String::from_utf8_lossy(h.value).into_owned())
                        .collect()
                };
                break (
                    req.method.unwrap_or_default().to_string(),
                    req.path.unwrap_or_default().to_string(),
                    values("content-length"),
                    values("transfer-encoding"),
                    values("expect"),
                    n,
                );
            }
            if !r.fill().await? {
                return Ok(());
            }
        };
        r.buf.drain(..head_len);
        let body = match (lengths.as_slice(), codings.as_slice()) {
            ([], []) => Vec::new(),
            ([length], []) => {
                let n = length.trim().parse().map_err(std::io::Error::other)?;
                r.take(n).await?
            }
            ([], [coding]) if coding.trim().eq_ignore_ascii_case("chunked") => r.chunked().await?,
            _ => {
                seen.0.lock().unwrap().ambiguous.push(format!(
                    "{method} {path}: content-length {lengths:?}, transfer-encoding {codings:?}"
                ));
                return Ok(());
            }
        };
        {
            let mut record = seen.0.lock().unwrap();
            record.lengths.push(lengths);
            for value in expect {
                record.expectations.push(format!("{path}: {value}"));
            }
            record.requests.push(Framed { method, path, body });
        }
        write
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await?;
    }
}

/// A sidecar for the strict app under a policy that denies `/admin/*`
/// and lets the rest of the mesh in.
async fn setup() -> (FakeControlPlane, common::sidecar::TestSidecar, Seen) {
    let cp = FakeControlPlane::start(CERT_TTL).await;
    let (app, seen) = strict_app().await;
    let s = sidecar(&cp, app, &[]).await;
    let deny = api_policy("no-admin", "DENY", "{to: [{paths: [\"/admin/*\"]}]}");
    push_to(&cp, snapshot(1, "allow-mesh", vec![deny]), 1).await;
    (cp, s, seen)
}

/// What came back on a connection.
struct Answers {
    /// The status line of each answer, in order.
    status: Vec<String>,
    /// The body of each answer, in order.
    bodies: Vec<String>,
    /// Whether the sidecar closed the connection (rather than falling
    /// silent for 3 s).
    closed: bool,
}

/// Sends `bytes` on a new mTLS connection from `ns/a/sa/web` and reads
/// the answers until the sidecar closes the connection or 3 s of silence.
async fn send_raw(cp: &FakeControlPlane, inbound: SocketAddr, bytes: &[u8]) -> Answers {
    let config = cp.ca.client_config(Some((&cp.ca, &id("/ns/a/sa/web"))));
    let mut tls = tls_connect(inbound, config).await.unwrap();
    tls.write_all(bytes).await.unwrap();
    tls.flush().await.unwrap();
    let (got, closed) = read_until_quiet(&mut tls, Duration::from_secs(3)).await;
    let (status, bodies) = answers(&got).into_iter().unzip();
    Answers {
        status,
        bodies,
        closed,
    }
}

/// What `stream` sends until it ends or falls silent for `quiet`, and
/// whether it ended.
async fn read_until_quiet<S: AsyncRead + Unpin>(
    stream: &mut S,
    quiet: Duration,
) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    while let Ok(read) = tokio::time::timeout(quiet, stream.read(&mut chunk)).await {
        match read {
            Ok(0) | Err(_) => return (got, true),
            Ok(n) => got.extend_from_slice(&chunk[..n]),
        }
    }
    (got, false)
}

/// The status line and body of each answer in `bytes`, bodies framed by
/// their `content-length` (every answer here has one); a `100 Continue`,
/// which has no body, is skipped.
fn answers(mut bytes: &[u8]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut answer = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(head)) = answer.parse(bytes) else {
            panic!("not an answer: {:?}", String::from_utf8_lossy(bytes));
        };
        if answer.code == Some(100) {
            bytes = &bytes[head..];
            continue;
        }
        let status = format!(
            "HTTP/1.1 {} {}",
            answer.code.unwrap_or_default(),
            answer.reason.unwrap_or_default()
        );
        let length: usize = answer
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
            .expect("every answer has a length");
        let end = (head + length).min(bytes.len());
        out.push((
            status,
            String::from_utf8_lossy(&bytes[head..end]).into_owned(),
        ));
        bytes = &bytes[end..];
    }
    out
}

/// The app never framed a request for the denied path, nor one whose
/// framing it found ambiguous.
fn assert_nothing_smuggled(seen: &Seen) {
    assert!(seen.ambiguous().is_empty(), "{:?}", seen.ambiguous());
    let paths: Vec<String> = seen.requests().into_iter().map(|r| r.path).collect();
    assert!(
        !paths.iter().any(|p| p.starts_with("/admin")),
        "a denied request reached the app: {paths:?}"
    );
}

#[tokio::test]
async fn the_policy_under_test_denies_admin_paths() {
    let (cp, s, seen) = setup().await;
    let answers = send_raw(
        &cp,
        s.inbound,
        b"GET /admin/x HTTP/1.1\r\nhost: api\r\n\r\nGET /ok HTTP/1.1\r\nhost: api\r\n\r\n",
    )
    .await;
    assert_eq!(
        answers.status,
        ["HTTP/1.1 403 Forbidden", "HTTP/1.1 200 OK"]
    );
    assert!(
        !answers.closed,
        "a denied request does not end the connection"
    );
    assert_eq!(
        seen.requests(),
        [Framed {
            method: "GET".into(),
            path: "/ok".into(),
            body: Vec::new()
        }]
    );
}

/// `Content-Length` beside `Transfer-Encoding: chunked`, before it (CL.TE)
/// or after it (TE.CL), with a request written inside the chunked body:
/// refused with 400 naming both (RFC 9112 section 6.1 lets a server refuse
/// the two), the connection closed, and nothing reaches the app, neither
/// the request nor the one inside its body. Also in a head of 70 fields,
/// more than a usual one.
#[tokio::test]
async fn a_length_beside_chunked_framing_is_refused() {
    let (cp, s, seen) = setup().await;
    let hidden = b"GET /admin/x HTTP/1.1\r\nhost: api\r\n\r\n";
    let many: String = (0..70).map(|i| format!("x-field-{i}: {i}\r\n")).collect();
    for fields in [
        "content-length: 4\r\ntransfer-encoding: chunked\r\n".to_owned(),
        "transfer-encoding: chunked\r\ncontent-length: 4\r\n".to_owned(),
        format!("{many}transfer-encoding: chunked\r\ncontent-length: 4\r\n"),
    ] {
        let mut bytes = format!("POST /a HTTP/1.1\r\nhost: api\r\n{fields}\r\n").into_bytes();
        bytes.extend(format!("{:x}\r\n", hidden.len()).as_bytes());
        bytes.extend(hidden);
        bytes.extend(b"\r\n0\r\n\r\n");
        bytes.extend(hidden);
        let answers = send_raw(&cp, s.inbound, &bytes).await;
        assert_eq!(answers.status, ["HTTP/1.1 400 Bad Request"], "{fields}");
        assert_eq!(
            answers.bodies,
            [
                "trellis: both Transfer-Encoding and Content-Length: a request body is framed one \
              way\n"
            ],
            "{fields}"
        );
        assert!(answers.closed, "{fields}");
    }
    assert_nothing_smuggled(&seen);
    assert!(seen.requests().is_empty(), "{:?}", seen.requests());
}

/// A chunked request is served by the forwarder, which goes on reading
/// the connection after it: a malformed head, or a target with a raw `#`
/// (which the `http` crate would cut silently), pipelined after it, gets
/// the forwarder's 400 naming the fault, where hyper's server would
/// answer a bare status.
#[tokio::test]
async fn after_a_chunked_request_heads_are_still_refused_in_words() {
    let (cp, s, seen) = setup().await;
    let chunked = "POST /up HTTP/1.1\r\nhost: api\r\ntransfer-encoding: chunked\r\n\r\n\
                   5\r\nhello\r\n0\r\n\r\n";
    let cases = [
        (
            "GET /a HTTP/1.1\r\nhost: api\r\nx-no-colon\r\n\r\n",
            "malformed header line: not a field name and a colon (a line without a colon, or a \
             space before it)",
        ),
        (
            "GET /a#/../admin/x HTTP/1.1\r\nhost: api\r\n\r\n",
            "request target contains '#': a request carries no fragment (send a '#' in a path or \
             query as %23)",
        ),
    ];
    for (next, why) in cases {
        let answers = send_raw(&cp, s.inbound, format!("{chunked}{next}").as_bytes()).await;
        assert_eq!(
            answers.status,
            ["HTTP/1.1 200 OK", "HTTP/1.1 400 Bad Request"],
            "{next:?}"
        );
        assert_eq!(answers.bodies[1], format!("trellis: {why}\n"), "{next:?}");
        assert!(answers.closed, "{next:?}");
    }
    assert_nothing_smuggled(&seen);
    let framed: Vec<(String, Vec<u8>)> = seen
        .requests()
        .into_iter()
        .map(|r| (r.path, r.body))
        .collect();
    let up = || ("/up".to_string(), b"hello".to_vec());
    assert_eq!(framed, [up(), up()]);
}

/// curl's chunked upload (`Transfer-Encoding: chunked` with
/// `--data-binary @file`) reaches the app whole, and the forwarder goes on
/// with the connection: curl's next request on it is answered, and the
/// one after, whose target has a raw `#` (`--request-target`), is refused
/// in words, where hyper's server would have cut the target silently.
#[tokio::test]
async fn a_chunked_upload_from_curl_reaches_the_app_and_the_connection_goes_on() {
    let (cp, s, seen) = setup().await;
    let dir = tempfile::tempdir().unwrap();
    // Larger than a chunk curl reads at once, so it comes in several.
    let body: Vec<u8> = (0..200_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let (tls, data) = curl_files(&cp, dir.path(), &body);
    let tls: Vec<&str> = tls.iter().map(String::as_str).collect();
    let upload = format!("https://{}/upload", s.inbound);
    let after = format!("https://{}/after", s.inbound);
    let mut args = tls.clone();
    args.extend([
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        &data,
        &upload,
        "-w",
        " %{http_code} %{num_connects}\n",
        "--next",
    ]);
    args.extend(&tls);
    args.extend([&after, "-w", " %{http_code} %{num_connects}\n", "--next"]);
    args.extend(&tls);
    args.extend([
        "--request-target",
        "/after#/../admin/x",
        &after,
        "-w",
        " %{http_code} %{num_connects}\n",
    ]);
    let Some(out) = curl(&args).await else {
        return;
    };
    // The strict app answers `ok`; the requests after the first made no
    // connection of their own.
    assert_eq!(
        out,
        "ok 200 1\nok 200 0\ntrellis: request target contains '#': a request carries no \
         fragment (send a '#' in a path or query as %23)\n 400 0\n"
    );
    assert_nothing_smuggled(&seen);
    let requests = seen.requests();
    let framed: Vec<(&str, &str, usize)> = requests
        .iter()
        .map(|r| (r.method.as_str(), r.path.as_str(), r.body.len()))
        .collect();
    assert_eq!(
        framed,
        [("POST", "/upload", body.len()), ("GET", "/after", 0)]
    );
    assert!(requests[0].body == body, "the body reached the app changed");
}

/// Writes the caller's (`ns/a/sa/web`) certificate and key and `body` to
/// files in `dir`: curl's arguments to present them over HTTP/1.1, and
/// its `--data-binary` argument to send the body.
fn curl_files(cp: &FakeControlPlane, dir: &std::path::Path, body: &[u8]) -> (Vec<String>, String) {
    let (chain, key) = cp.ca.leaf(&id("/ns/a/sa/web"));
    let (cert_file, key_file, body_file) =
        (dir.join("cert.der"), dir.join("key.der"), dir.join("body"));
    std::fs::write(&cert_file, &chain[0]).unwrap();
    std::fs::write(&key_file, key.secret_der()).unwrap();
    std::fs::write(&body_file, body).unwrap();
    let path = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    // The sidecar's certificate names a SPIFFE ID, not a host: curl is
    // not asked to check it, only to present the caller's.
    let tls = [
        "--http1.1",
        "--insecure",
        "--cert-type",
        "DER",
        "--cert",
        &path(&cert_file),
        "--key-type",
        "DER",
        "--key",
        &path(&key_file),
    ]
    .map(str::to_owned)
    .to_vec();
    (tls, format!("@{}", path(&body_file)))
}

/// curl with the sidecar as its HTTPS proxy (`--proxy`) sends absolute-form
/// targets (`GET http://api/proxied?q=1`, RFC 9112 section 3.2.2): the
/// forwarder takes them, and the app gets them in origin form. The
/// forwarder goes on with the connection: curl's next request on it, whose
/// target has a raw `#`, is refused in words, where hyper's server would
/// have cut the target silently.
#[tokio::test]
async fn requests_from_curl_through_the_sidecar_as_its_proxy_reach_the_app_in_origin_form() {
    let (cp, s, seen) = setup().await;
    let dir = tempfile::tempdir().unwrap();
    let (tls, _) = curl_files(&cp, dir.path(), b"");
    // The same certificate and key, presented to the proxy.
    let mut proxy = vec!["--proxy".to_owned(), format!("https://{}", s.inbound)];
    proxy.extend(tls.into_iter().map(|arg| match arg.as_str() {
        "--insecure" | "--cert-type" | "--cert" | "--key-type" | "--key" => {
            arg.replacen("--", "--proxy-", 1)
        }
        _ => arg,
    }));
    let proxy: Vec<&str> = proxy.iter().map(String::as_str).collect();
    let mut args = proxy.clone();
    args.extend([
        "http://api/proxied?q=1",
        "-w",
        " %{http_code} %{num_connects}\n",
        "--next",
    ]);
    args.extend(&proxy);
    args.extend([
        "--request-target",
        "/after#/../admin/x",
        "http://api/after",
        "-w",
        " %{http_code} %{num_connects} %header{trellis-proxy-error}\n",
    ]);
    let Some(out) = curl(&args).await else {
        return;
    };
    assert_eq!(
        out,
        "ok 200 1\ntrellis: request target contains '#': a request carries no fragment (send a \
         '#' in a path or query as %23)\n 400 0 invalid_request\n"
    );
    assert_nothing_smuggled(&seen);
    let requests: Vec<(String, String)> = seen
        .requests()
        .into_iter()
        .map(|r| (r.method, r.path))
        .collect();
    assert_eq!(requests, [("GET".into(), "/proxied?q=1".into())]);
}

/// curl's HTTP/1.0 requests with `Connection: keep-alive` (`--http1.0`)
/// are the forwarder's: the answer says keep-alive, curl sends its next
/// request on the same connection, and that one, whose target has a raw
/// `#`, is refused in words, where hyper's server would have cut the
/// target silently.
#[tokio::test]
async fn http_1_0_keep_alive_requests_from_curl_stay_with_the_forwarder() {
    let (cp, s, seen) = setup().await;
    let dir = tempfile::tempdir().unwrap();
    let (tls, _) = curl_files(&cp, dir.path(), b"");
    let tls: Vec<&str> = tls
        .iter()
        .map(|arg| match arg.as_str() {
            "--http1.1" => "--http1.0",
            arg => arg,
        })
        .collect();
    let first = format!("https://{}/first", s.inbound);
    let after = format!("https://{}/after", s.inbound);
    let mut args = tls.clone();
    args.extend([
        "-H",
        "Connection: keep-alive",
        &first,
        "-w",
        " %{http_version} %{http_code} %{num_connects}\n",
        "--next",
    ]);
    args.extend(&tls);
    args.extend([
        "-H",
        "Connection: keep-alive",
        "--request-target",
        "/after#/../admin/x",
        &after,
        "-w",
        " %{http_code} %{num_connects} %header{trellis-proxy-error}\n",
    ]);
    let Some(out) = curl(&args).await else {
        return;
    };
    // curl writes HTTP/1.0 as `1`.
    assert_eq!(
        out,
        "ok 1 200 1\ntrellis: request target contains '#': a request carries no fragment (send \
         a '#' in a path or query as %23)\n 400 0 invalid_request\n"
    );
    assert_nothing_smuggled(&seen);
    let paths: Vec<String> = seen.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, ["/first"]);
}

/// curl's upload of a file over 1 MiB (`--data-binary @file`), which it
/// sends with `Expect: 100-continue`, waiting for the `100 Continue` (here
/// longer than it may run, so an upload it was not told to send fails),
/// reaches the app byte for byte with the expectation. The forwarder goes
/// on with the connection: curl's next request on it, whose target has a
/// raw `#`, is refused in words with `trellis-proxy-error:
/// invalid_request`, where hyper's server would have cut the target
/// silently.
#[tokio::test]
async fn an_expect_continue_upload_from_curl_reaches_the_app_and_the_connection_goes_on() {
    let (cp, s, seen) = setup().await;
    let dir = tempfile::tempdir().unwrap();
    let body: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
    let (tls, data) = curl_files(&cp, dir.path(), &body);
    let tls: Vec<&str> = tls.iter().map(String::as_str).collect();
    let upload = format!("https://{}/upload", s.inbound);
    let after = format!("https://{}/after", s.inbound);
    let mut args = tls.clone();
    args.extend([
        "--expect100-timeout",
        "30",
        "--data-binary",
        &data,
        &upload,
        "-w",
        " %{http_code} %{num_connects}\n",
        "--next",
    ]);
    args.extend(&tls);
    args.extend([
        "--request-target",
        "/after#/../admin/x",
        &after,
        "-w",
        " %{http_code} %{num_connects} %header{trellis-proxy-error}\n",
    ]);
    let Some(out) = curl(&args).await else {
        return;
    };
    assert_eq!(
        out,
        "ok 200 1\ntrellis: request target contains '#': a request carries no fragment (send a \
         '#' in a path or query as %23)\n 400 0 invalid_request\n"
    );
    assert_nothing_smuggled(&seen);
    let requests = seen.requests();
    assert_eq!(requests.len(), 1, "{:?}", seen.expectations());
    assert_eq!(requests[0].path, "/upload");
    assert!(requests[0].body == body, "the body reached the app changed");
    assert_eq!(seen.expectations(), ["/upload: 100-continue"]);
}

/// A denied request's body is skipped, never read as the next request:
/// the sidecar answers 403 and goes on with the request after the body.
#[tokio::test]
async fn a_denied_requests_body_is_never_read_as_a_request() {
    let (cp, s, seen) = setup().await;
    let hidden = b"GET /inside HTTP/1.1\r\nhost: api\r\n\r\n";
    let mut bytes = format!(
        "POST /admin/x HTTP/1.1\r\nhost: api\r\ncontent-length: {}\r\n\r\n",
        hidden.len()
    )
    .into_bytes();
    bytes.extend(hidden);
    bytes.extend(b"GET /after HTTP/1.1\r\nhost: api\r\n\r\n");
    let answers = send_raw(&cp, s.inbound, &bytes).await;
    assert_nothing_smuggled(&seen);
    let paths: Vec<String> = seen.requests().into_iter().map(|r| r.path).collect();
    assert!(!paths.contains(&"/inside".to_string()), "{paths:?}");
    assert_eq!(
        answers.status,
        ["HTTP/1.1 403 Forbidden", "HTTP/1.1 200 OK"]
    );
    assert!(!answers.closed);
    assert_eq!(paths, ["/after"]);
}

/// Framing the sidecar cannot read one way only, and heads that do not
/// parse, are refused with 400 (431 for too many fields) and a body that
/// says what was wrong, the connection is closed, and nothing reaches the
/// app.
#[tokio::test]
async fn ambiguous_or_malformed_framing_is_refused_before_the_app() {
    let (cp, s, seen) = setup().await;
    let bad_header = "400 malformed header line: not a field name and a colon \
                      (a line without a colon, or a space before it)";
    let many_fields = {
        let mut head = b"GET /a HTTP/1.1\r\nhost: api\r\n".to_vec();
        for i in 0..120 {
            head.extend(format!("x-field-{i}: {i}\r\n").as_bytes());
        }
        head.extend(b"\r\n");
        head
    };
    let bare_cr = "400 malformed request line: a bare CR (a CR not followed by LF)";
    let bare_cr_in_header = "400 malformed header line: a bare CR (a CR not followed by LF)";
    // More fields than a usual head, fewer than the sidecar takes.
    let fields_then_bare_cr = {
        let mut head = b"GET /a HTTP/1.1\r\nhost: api\r\n".to_vec();
        for i in 0..80 {
            head.extend(format!("x-field-{i}: {i}\r\n").as_bytes());
        }
        head.extend(b"x-last: one\rtwo\r\n\r\n");
        head
    };
    let cases: [(&str, &[u8], &str); 18] = [
        (
            "two different lengths",
            b"POST /a HTTP/1.1\r\nhost: api\r\ncontent-length: 5\r\ncontent-length: 40\r\n\r\n\
              hello",
            "400 two different Content-Length values",
        ),
        (
            "a length that is not a number",
            b"POST /a HTTP/1.1\r\nhost: api\r\ncontent-length: 5x\r\n\r\nhello",
            "400 invalid Content-Length",
        ),
        (
            "a coding other than chunked last",
            b"POST /a HTTP/1.1\r\nhost: api\r\ntransfer-encoding: chunked, identity\r\n\r\n\
              0\r\n\r\n",
            "400 Transfer-Encoding whose last coding is not chunked",
        ),
        (
            "transfer-encoding on HTTP/1.0",
            b"POST /a HTTP/1.0\r\nhost: api\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
            "400 Transfer-Encoding in an HTTP/1.0 request",
        ),
        (
            "a folded header",
            b"GET /a HTTP/1.1\r\nhost: api\r\nx-folded: one\r\n two\r\n\r\n",
            bad_header,
        ),
        (
            "a space before the colon",
            b"POST /a HTTP/1.1\r\nhost: api\r\ncontent-length : 5\r\n\r\nhello",
            bad_header,
        ),
        (
            "a header line without a colon",
            b"GET /a HTTP/1.1\r\nhost: api\r\nx-no-colon\r\n\r\n",
            bad_header,
        ),
        (
            "a control character in a value",
            b"GET /a HTTP/1.1\r\nhost: api\r\nx-bell: \x07\r\n\r\n",
            "400 invalid character in a header value",
        ),
        (
            "a version that is not HTTP/1.x",
            b"GET /a HTTP/7.1\r\nhost: api\r\n\r\n",
            "400 malformed request line: not HTTP/1.0 or HTTP/1.1",
        ),
        (
            "a target with a control character",
            b"GET /a\x7fb HTTP/1.1\r\nhost: api\r\n\r\n",
            "400 malformed request line: invalid request target",
        ),
        (
            "more fields than the sidecar takes",
            &many_fields,
            "431 request head exceeds the sidecar's limit of 100 header fields",
        ),
        (
            "a bare CR ending the request line",
            b"GET /admin/x HTTP/1.1\rhost: api\r\n\r\n",
            bare_cr,
        ),
        (
            "a bare CR in the target",
            b"GET /a\rb HTTP/1.1\r\nhost: api\r\n\r\n",
            bare_cr,
        ),
        (
            "a bare CR starting a header line",
            b"GET /admin/x HTTP/1.1\r\nhost: api\r\n\rx-after: cr\r\n\r\n",
            bare_cr_in_header,
        ),
        (
            "a bare CR in a header value",
            b"GET /a HTTP/1.1\r\nhost: api\r\nx-value: one\rtwo\r\n\r\n",
            bare_cr_in_header,
        ),
        (
            "a bare CR in a field name",
            b"GET /a HTTP/1.1\r\nhost: api\r\nx-na\rme: value\r\n\r\n",
            bare_cr_in_header,
        ),
        (
            "a bare CR after more fields than the forwarder parses at once",
            &fields_then_bare_cr,
            bare_cr_in_header,
        ),
        (
            "a fault in a header line before one with a bare CR",
            b"GET /a HTTP/1.1\r\nhost: api\r\nx-bell: \x07\r\nx-value: one\rtwo\r\n\r\n",
            "400 invalid character in a header value",
        ),
    ];
    for (case, bytes, expected) in cases {
        let answers = send_raw(&cp, s.inbound, bytes).await;
        let (code, why) = expected.split_once(' ').unwrap();
        let got: Vec<(String, String)> = answers
            .status
            .iter()
            .map(|line| line.split(' ').nth(1).unwrap().to_string())
            .zip(answers.bodies)
            .collect();
        assert_eq!(
            got,
            [(code.to_string(), format!("trellis: {why}\n"))],
            "{case}"
        );
        assert!(answers.closed, "{case}");
        assert!(seen.requests().is_empty(), "{case}: {:?}", seen.requests());
    }
    assert_nothing_smuggled(&seen);
}

/// A request with two `Host` fields, or whose absolute-form target names
/// another host than its `Host`, is refused with 400 saying so (RFC 9112,
/// section 3.2): the app could read it as meant for a host other than
/// the one the rules saw. Whether the forwarder or hyper serves it
/// (HTTP/1.0).
#[tokio::test]
async fn two_hosts_or_a_host_other_than_the_target_are_refused() {
    let (cp, s, seen) = setup().await;
    let cases: [(&str, &[u8], &str); 4] = [
        (
            "two hosts",
            b"GET /a HTTP/1.1\r\nhost: api\r\nhost: other\r\n\r\n",
            "more than one Host header",
        ),
        (
            "two hosts on HTTP/1.0",
            b"POST /a HTTP/1.0\r\nhost: api\r\nhost: api\r\ncontent-length: 0\r\n\r\n",
            "more than one Host header",
        ),
        (
            "a target naming another host",
            b"GET http://other/a HTTP/1.1\r\nhost: api\r\n\r\n",
            "Host header differs from the authority of the request target",
        ),
        (
            "a target naming another port",
            b"GET http://api:81/a HTTP/1.1\r\nhost: api\r\n\r\n",
            "Host header differs from the authority of the request target",
        ),
    ];
    for (case, bytes, why) in cases {
        let answers = send_raw(&cp, s.inbound, bytes).await;
        assert_eq!(answers.status, ["HTTP/1.1 400 Bad Request"], "{case}");
        assert_eq!(answers.bodies, [format!("trellis: {why}\n")], "{case}");
    }
    assert!(seen.requests().is_empty(), "{:?}", seen.requests());
    let same = send_raw(
        &cp,
        s.inbound,
        b"GET http://API/a HTTP/1.1\r\nhost: api\r\n\r\n",
    )
    .await;
    assert_eq!(same.status, ["HTTP/1.1 200 OK"]);
}

/// A raw `#` in a request target is refused with 400, whether the
/// forwarder or hyper serves the request: the `http` crate would drop it
/// and what follows, so the rules and the app would get another target
/// than the one sent. `%23` is a `#` in a path, and reaches the app.
#[tokio::test]
async fn a_raw_fragment_mark_in_a_target_is_refused_and_an_encoded_one_goes() {
    let (cp, s, seen) = setup().await;
    // More fields than a usual head, fewer than the sidecar takes.
    let many_fields = {
        let mut head = b"GET /a#x HTTP/1.1\r\nhost: api\r\n".to_vec();
        for i in 0..80 {
            head.extend(format!("x-field-{i}: {i}\r\n").as_bytes());
        }
        head.extend(b"\r\n");
        head
    };
    let cases: [(&str, &[u8]); 6] = [
        ("after a path", b"GET /admin# HTTP/1.1\r\nhost: api\r\n\r\n"),
        (
            "before dot segments",
            b"GET /a#/../admin/x HTTP/1.1\r\nhost: api\r\n\r\n",
        ),
        ("in a query", b"GET /a?q=1#x HTTP/1.1\r\nhost: api\r\n\r\n"),
        (
            "in an absolute-form target",
            b"GET http://api/a#x HTTP/1.1\r\nhost: api\r\n\r\n",
        ),
        (
            "on HTTP/1.0",
            b"POST /a#x HTTP/1.0\r\nhost: api\r\ncontent-length: 0\r\n\r\n",
        ),
        ("with 80 fields", &many_fields),
    ];
    for (case, bytes) in cases {
        let answers = send_raw(&cp, s.inbound, bytes).await;
        assert_eq!(answers.status, ["HTTP/1.1 400 Bad Request"], "{case}");
        assert_eq!(
            answers.bodies,
            [
                "trellis: request target contains '#': a request carries no fragment (send a '#' \
              in a path or query as %23)\n"
            ],
            "{case}"
        );
        assert!(answers.closed, "{case}");
    }
    assert!(seen.requests().is_empty(), "{:?}", seen.requests());
    for target in ["/a%23b", "http://api/a%23b"] {
        let answers = send_raw(
            &cp,
            s.inbound,
            format!("GET {target} HTTP/1.1\r\nhost: api\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(answers.status, ["HTTP/1.1 200 OK"], "{target}");
    }
    let paths: Vec<String> = seen.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, ["/a%23b", "/a%23b"]);
}

/// A request hyper serves (an `https` absolute-form target, one after
/// such a request on the same connection) reaches the app framed as
/// the forwarder passes one on (an HTTP/1.0 one among them): a `Content-Length` sent more than once
/// with one value arrives once, without leading zeros, and the empty
/// lines before a request line are dropped.
#[tokio::test]
async fn a_repeated_length_reaches_the_app_once_whichever_path_serves_it() {
    let (cp, s, seen) = setup().await;
    let twice = "content-length: 005\r\ncontent-length: 5\r\n\r\nhello";
    let cases = [
        (
            "the forwarder's",
            format!("POST /a HTTP/1.1\r\nhost: api\r\n{twice}"),
        ),
        (
            "an `https` absolute-form target",
            format!("POST https://api/b HTTP/1.1\r\nhost: api\r\n{twice}"),
        ),
        (
            "HTTP/1.0",
            format!("POST /c HTTP/1.0\r\nhost: api\r\n{twice}"),
        ),
        (
            "after a hand-off, after empty lines",
            format!(
                "POST https://api/d HTTP/1.1\r\nhost: api\r\ncontent-length: 0\r\n\r\n\
                 \r\n\n\r\nPOST /e HTTP/1.1\r\nhost: api\r\n{twice}"
            ),
        ),
    ];
    for (case, bytes) in &cases {
        let answers = send_raw(&cp, s.inbound, bytes.as_bytes()).await;
        assert!(!answers.status.is_empty(), "{case}: no answer");
        for status in &answers.status {
            assert_eq!(status, "HTTP/1.1 200 OK", "{case}");
        }
    }
    assert_nothing_smuggled(&seen);
    let framed: Vec<(String, Vec<u8>)> = seen
        .requests()
        .into_iter()
        .map(|r| (r.path, r.body))
        .collect();
    let hello = || b"hello".to_vec();
    assert_eq!(
        framed,
        [
            ("/a".into(), hello()),
            ("/b".into(), hello()),
            ("/c".into(), hello()),
            ("/d".into(), Vec::new()),
            ("/e".into(), hello()),
        ]
    );
    let one = || vec!["5".to_string()];
    let zero = vec!["0".to_string()];
    assert_eq!(seen.lengths(), [one(), one(), one(), zero, one()]);
}

/// A denied request whose body is larger than the socket buffers, sent
/// whole before its answer is read (as `curl --data-binary @file` sends
/// it): the caller gets the 403 naming the policy, not a reset
/// connection. The sidecar closes after that answer without reading the
/// body as requests, but reads and drops what the caller still sends
/// first, so no unread bytes make the kernel reset the connection.
/// Its body framed by a length, chunked, or by a length after `Expect:
/// 100-continue` (the forwarder's, which refuses it without a `100
/// Continue`), or by a length on HTTP/1.0 (also the forwarder's), or by a
/// length on hyper's path (an `https` absolute-form target).
#[tokio::test]
async fn a_denied_upload_is_told_why_not_reset() {
    let (cp, s, seen) = setup().await;
    const BODY: usize = 6 << 20;
    const CHUNK: usize = 64 * 1024;
    let config = cp.ca.client_config(Some((&cp.ca, &id("/ns/a/sa/web"))));
    let mut inside = vec![b'x'; CHUNK];
    // A request inside the body is never read as one.
    inside[..36].copy_from_slice(b"GET /admin/x HTTP/1.1\r\nhost: api\r\n\r\n");
    let mut length =
        format!("POST /admin/upload HTTP/1.1\r\nhost: api\r\ncontent-length: {BODY}\r\n\r\n")
            .into_bytes();
    let mut chunked =
        b"POST /admin/upload HTTP/1.1\r\nhost: api\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..BODY / CHUNK {
        length.extend_from_slice(&inside);
        chunked.extend(format!("{CHUNK:x}\r\n").as_bytes());
        chunked.extend_from_slice(&inside);
        chunked.extend(b"\r\n");
    }
    chunked.extend(b"0\r\n\r\n");
    let mut expecting = format!(
        "POST /admin/upload HTTP/1.1\r\nhost: api\r\nexpect: 100-continue\r\n\
         content-length: {BODY}\r\n\r\n"
    )
    .into_bytes();
    expecting.extend_from_slice(&length[length.len() - BODY..]);
    let mut old =
        format!("POST /admin/upload HTTP/1.0\r\nhost: api\r\ncontent-length: {BODY}\r\n\r\n")
            .into_bytes();
    old.extend_from_slice(&length[length.len() - BODY..]);
    let mut hypers = format!(
        "POST https://api/admin/upload HTTP/1.1\r\nhost: api\r\ncontent-length: {BODY}\r\n\r\n"
    )
    .into_bytes();
    hypers.extend_from_slice(&length[length.len() - BODY..]);
    for (framing, request) in [
        ("length", length),
        ("chunked", chunked),
        ("expecting", expecting),
        ("HTTP/1.0", old),
        ("hyper's", hypers),
    ] {
        let mut tls = tls_connect(s.inbound, config.clone()).await.unwrap();
        tls.write_all(&request)
            .await
            .unwrap_or_else(|e| panic!("{framing}: the request is not sent whole: {e}"));
        tls.flush().await.unwrap();
        let (got, closed) = read_until_quiet(&mut tls, Duration::from_secs(3)).await;
        assert_eq!(
            answers(&got),
            [(
                "HTTP/1.1 403 Forbidden".to_string(),
                "trellis: denied by policy b/no-admin rule 0\n".to_string()
            )],
            "{framing}"
        );
        assert!(closed, "{framing}: the connection closes after the answer");
    }
    assert_nothing_smuggled(&seen);
}

/// After an answer that leaves a body unread, a caller that goes on
/// sending cannot hold the connection: it is closed once the sidecar has
/// dropped a bounded amount of it.
#[tokio::test]
async fn a_caller_streaming_after_its_denial_does_not_hold_the_connection() {
    let (cp, s, _seen) = setup().await;
    let config = cp.ca.client_config(Some((&cp.ca, &id("/ns/a/sa/web"))));
    let heads: [(&str, &[u8], &[u8]); 2] = [
        (
            "length",
            b"POST /admin/upload HTTP/1.1\r\nhost: api\r\ncontent-length: 99999999999\r\n\r\n",
            b"",
        ),
        (
            "chunked",
            b"POST /admin/upload HTTP/1.1\r\nhost: api\r\ntransfer-encoding: chunked\r\n\r\n",
            b"10000\r\n",
        ),
    ];
    for (framing, head, chunk_line) in heads {
        let mut tls = tls_connect(s.inbound, config.clone()).await.unwrap();
        tls.write_all(head).await.unwrap();
        let mut chunk = chunk_line.to_vec();
        chunk.extend(vec![b'x'; 64 * 1024]);
        if !chunk_line.is_empty() {
            chunk.extend(b"\r\n");
        }
        let streaming = async {
            loop {
                if tls.write_all(&chunk).await.is_err() || tls.flush().await.is_err() {
                    return;
                }
            }
        };
        // Far longer than the sidecar lingers: a hang, not a measure.
        tokio::time::timeout(Duration::from_secs(60), streaming)
            .await
            .unwrap_or_else(|_| {
                panic!("{framing}: the connection stays open while the caller streams")
            });
    }
}

/// Requests sent one after another without waiting (pipelined) are
/// answered in order, each decided on its own: a denied one in the middle
/// is answered 403 in its place, and its neighbours, with bodies framed by
/// a length or chunked, reach the app whole.
#[tokio::test]
async fn pipelined_requests_are_answered_in_order_and_each_decided() {
    let (cp, s, seen) = setup().await;
    let answers = send_raw(
        &cp,
        s.inbound,
        b"GET /1 HTTP/1.1\r\nhost: api\r\n\r\n\
          POST /2 HTTP/1.1\r\nhost: api\r\ncontent-length: 3\r\n\r\nabc\
          GET /admin/3 HTTP/1.1\r\nhost: api\r\n\r\n\
          POST /4 HTTP/1.1\r\nhost: api\r\ntransfer-encoding: chunked\r\n\r\n3\r\nxyz\r\n0\r\n\r\n\
          GET /5 HTTP/1.1\r\nhost: api\r\n\r\n",
    )
    .await;
    assert_nothing_smuggled(&seen);
    assert_eq!(
        answers.status,
        [
            "HTTP/1.1 200 OK",
            "HTTP/1.1 200 OK",
            "HTTP/1.1 403 Forbidden",
            "HTTP/1.1 200 OK",
            "HTTP/1.1 200 OK"
        ]
    );
    assert!(!answers.closed);
    let requests: Vec<(String, Vec<u8>)> = seen
        .requests()
        .into_iter()
        .map(|r| (r.path, r.body))
        .collect();
    assert_eq!(
        requests,
        [
            ("/1".into(), Vec::new()),
            ("/2".into(), b"abc".to_vec()),
            ("/4".into(), b"xyz".to_vec()),
            ("/5".into(), Vec::new())
        ]
    );
}

/// Reads one answer's head (through its blank line) from `stream`.
async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte)).await;
        match read {
            Ok(Ok(1)) => head.push(byte[0]),
            other => panic!("no whole head: {other:?} after {head:?}"),
        }
    }
    String::from_utf8(head).unwrap()
}

/// `Expect: 100-continue`: an allowed request's caller is told to go on
/// and its body reaches the app; a denied one's caller is not, gets 403
/// naming the policy at once, and the connection closes, so a body sent
/// anyway (here, a request for a denied path) is never read as a request.
#[tokio::test]
async fn only_an_allowed_request_is_told_to_continue() {
    let (cp, s, seen) = setup().await;
    let config = cp.ca.client_config(Some((&cp.ca, &id("/ns/a/sa/web"))));

    let mut allowed = tls_connect(s.inbound, config.clone()).await.unwrap();
    allowed
        .write_all(
            b"POST /upload HTTP/1.1\r\nhost: api\r\nexpect: 100-continue\r\ncontent-length: 5\r\n\r\n",
        )
        .await
        .unwrap();
    assert_eq!(
        read_head(&mut allowed).await,
        "HTTP/1.1 100 Continue\r\n\r\n"
    );
    allowed.write_all(b"hello").await.unwrap();
    assert!(
        read_head(&mut allowed)
            .await
            .starts_with("HTTP/1.1 200 OK\r\n")
    );
    assert_eq!(
        seen.requests(),
        [Framed {
            method: "POST".into(),
            path: "/upload".into(),
            body: b"hello".to_vec()
        }]
    );

    let hidden = b"GET /admin/x HTTP/1.1\r\nhost: api\r\n\r\n";
    let mut denied = tls_connect(s.inbound, config).await.unwrap();
    let head = format!(
        "POST /admin/upload HTTP/1.1\r\nhost: api\r\nexpect: 100-continue\r\ncontent-length: {}\r\n\r\n",
        hidden.len()
    );
    denied.write_all(head.as_bytes()).await.unwrap();
    let answer = read_head(&mut denied).await;
    assert!(answer.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{answer}");
    // The body anyway; the sidecar may already have closed.
    let _ = denied.write_all(hidden).await;
    let _ = denied.flush().await;
    let (rest, closed) = read_until_quiet(&mut denied, Duration::from_secs(3)).await;
    assert!(closed, "the connection of a refused 100-continue closes");
    let rest = String::from_utf8_lossy(&rest);
    assert_eq!(
        rest, "trellis: denied by policy b/no-admin rule 0\n",
        "no second answer"
    );
    assert_nothing_smuggled(&seen);
    assert_eq!(seen.requests().len(), 1);
}

/// `CONNECT` would turn the connection into a tunnel whose requests no
/// rule decides, so it is refused with 501 saying so, with or without L7
/// rules and over HTTP/1.1 or HTTP/2; an HTTP/1.1 connection ends after it
/// (hyper would read on, after a `CONNECT`, heads no check reads), an
/// HTTP/2 one goes on. `OPTIONS *` is decided by the rules like any
/// request (no rule's path matches `*`) and reaches the app.
#[tokio::test]
async fn connect_is_refused_by_name_and_options_asterisk_is_decided() {
    // With L7 rules in force, then with none.
    let (cp, s, seen) = setup().await;
    let other = FakeControlPlane::start(CERT_TTL).await;
    let without_rules = sidecar(&other, strict_app_addr(&seen).await, &[]).await;
    push_to(&other, snapshot(1, "allow-mesh", vec![]), 1).await;
    for (cp, inbound) in [(&cp, s.inbound), (&other, without_rules.inbound)] {
        let config = cp.ca.client_config(Some((&cp.ca, &id("/ns/a/sa/web"))));
        let mut tls = tls_connect(inbound, config).await.unwrap();
        tls.write_all(b"CONNECT api:8080 HTTP/1.1\r\nhost: api:8080\r\n\r\n")
            .await
            .unwrap();
        let head = read_head(&mut tls).await;
        assert!(
            head.starts_with("HTTP/1.1 501 Not Implemented\r\n"),
            "{head}"
        );
        let expected = format!("trellis: {}\n", trellis_proxy::http::authz::CONNECT_REFUSED);
        assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
        let mut body = vec![0u8; expected.len()];
        tls.read_exact(&mut body).await.unwrap();
        assert_eq!(String::from_utf8_lossy(&body), expected);
        let after = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut body)).await;
        assert!(
            matches!(after, Ok(Ok(0) | Err(_))),
            "the connection goes on after a CONNECT: {after:?}"
        );
        let config = cp.ca.client_config(Some((&cp.ca, &id("/ns/a/sa/web"))));
        let mut tls = tls_connect(inbound, config).await.unwrap();
        tls.write_all(b"OPTIONS * HTTP/1.1\r\nhost: api\r\n\r\n")
            .await
            .unwrap();
        let head = read_head(&mut tls).await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    }
    // Over HTTP/2 the same.
    let mut h2 = h2(&cp, s.inbound, &id("/ns/a/sa/web")).await;
    let connect = ::http::Request::connect("api:8080")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let (status, body) = text(h2.send_request(connect).await.unwrap()).await;
    let expected = format!("trellis: {}", trellis_proxy::http::authz::CONNECT_REFUSED);
    assert_eq!((status.as_u16(), body.trim_end()), (501, expected.as_str()));
    let requests: Vec<(String, String)> = seen
        .requests()
        .into_iter()
        .map(|r| (r.method, r.path))
        .collect();
    let options = ("OPTIONS".to_string(), "*".to_string());
    assert_eq!(requests, [options.clone(), options]);
}

/// A request head larger than the sidecar reads (more than 100 header
/// fields) is answered 431 and the connection closed, before the app.
#[tokio::test]
async fn a_head_too_large_is_refused_before_the_app() {
    let (cp, s, seen) = setup().await;
    let mut head = b"GET /big HTTP/1.1\r\nhost: api\r\n".to_vec();
    for i in 0..120 {
        head.extend(format!("x-field-{i}: {}\r\n", "a".repeat(100)).as_bytes());
    }
    head.extend(b"\r\n");
    let answers = send_raw(&cp, s.inbound, &head).await;
    assert_eq!(
        answers.status,
        ["HTTP/1.1 431 Request Header Fields Too Large"]
    );
    assert!(answers.closed);
    assert!(seen.requests().is_empty(), "{:?}", seen.requests());
}

/// A head of a few long fields reaches the app up to the sidecar's bound
/// (a 64 KiB cookie, say); one past it (408 KiB) is answered 431 with a
/// text naming the bound, never the caller's bytes, and the connection
/// closed, before the app. The caller, which sent the whole head before
/// reading, reads that answer rather than a reset.
#[tokio::test]
async fn a_head_past_the_bound_is_told_the_bound() {
    let (cp, s, seen) = setup().await;
    let head = |field: usize| {
        let value = "c".repeat(field);
        format!("GET /long HTTP/1.1\r\nhost: api\r\ncookie: {value}\r\n\r\n").into_bytes()
    };
    let answers = send_raw(&cp, s.inbound, &head(64 * 1024)).await;
    assert_eq!(answers.status, ["HTTP/1.1 200 OK"]);
    assert!(!answers.closed);
    let paths: Vec<String> = seen.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, ["/long"]);

    let answers = send_raw(&cp, s.inbound, &head(1 << 20)).await;
    assert_eq!(
        answers.status,
        ["HTTP/1.1 431 Request Header Fields Too Large"]
    );
    assert_eq!(
        answers.bodies,
        ["trellis: request head exceeds the sidecar's 408 KiB limit\n"]
    );
    assert!(answers.closed);
    assert_eq!(seen.requests().len(), 1, "{:?}", seen.requests());
}

/// A denied upload whose body comes slowly, on the forwarder's path
/// (chunked, `Expect: 100-continue` with the body sent anyway, or HTTP/1.0)
/// and on hyper's (an `https` absolute-form target): when the 403 goes out, only part of a TLS record of the body
/// is waiting at the sidecar, which reads as nothing yet. The caller still
/// sending its body after the answer is not reset: it sends the rest, and
/// the connection ends cleanly once it is done.
#[tokio::test]
async fn a_denied_upload_sent_slowly_is_told_why_not_reset() {
    let (cp, s, seen) = setup().await;
    let config = cp.ca.client_config(Some((&cp.ca, &id("/ns/a/sa/web"))));
    let inbound = s.inbound;
    for framing in [Slow::Chunked, Slow::Expecting, Slow::Http10, Slow::Hypers] {
        let config = config.clone();
        let (answer, end) =
            tokio::task::spawn_blocking(move || slow_upload(config, inbound, framing))
                .await
                .unwrap();
        assert_eq!(
            answers(&answer),
            [(
                "HTTP/1.1 403 Forbidden".to_string(),
                "trellis: denied by policy b/no-admin rule 0\n".to_string()
            )],
            "{framing:?}"
        );
        end.unwrap_or_else(|e| {
            panic!("{framing:?}: the caller sends the rest of its body and sees a clean close: {e}")
        });
    }
    assert_nothing_smuggled(&seen);
}

/// How a slow upload is framed.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Slow {
    Chunked,
    /// By its length, after `Expect: 100-continue`.
    Expecting,
    /// By its length, on HTTP/1.0.
    Http10,
    /// By its length, to an `https` absolute-form target (hyper's).
    Hypers,
}

/// Sends an upload to a denied path over mTLS, framed as `framing` says,
/// the TLS records written by hand:
/// the head, then half of the body's first record. Once the answer is
/// read, sends the rest of the body and closes its side. Returns the
/// answer, and how the connection ended (an error: reset).
fn slow_upload(
    config: std::sync::Arc<rustls::ClientConfig>,
    inbound: SocketAddr,
    framing: Slow,
) -> (Vec<u8>, std::io::Result<()>) {
    let chunked = framing == Slow::Chunked;
    use std::io::{Read, Write};
    let name = rustls::pki_types::ServerName::try_from("test").unwrap();
    let mut tls = rustls::ClientConnection::new(config, name).unwrap();
    tls.set_buffer_limit(None);
    let mut tcp = std::net::TcpStream::connect(inbound).unwrap();
    while tls.is_handshaking() {
        tls.complete_io(&mut tcp).unwrap();
    }
    // What `plaintext` is as TLS records.
    let mut records = |plaintext: &[u8]| {
        tls.writer().write_all(plaintext).unwrap();
        let mut wire = Vec::new();
        while tls.wants_write() {
            tls.write_tls(&mut wire).unwrap();
        }
        wire
    };
    let mut body = Vec::new();
    for _ in 0..8 {
        if chunked {
            body.extend(b"4000\r\n");
        }
        body.extend([b'x'; 0x4000]);
        if chunked {
            body.extend(b"\r\n");
        }
    }
    let (version, head) = match framing {
        Slow::Chunked => {
            body.extend(b"0\r\n\r\n");
            ("1.1", "transfer-encoding: chunked".to_owned())
        }
        Slow::Expecting => (
            "1.1",
            format!("expect: 100-continue\r\ncontent-length: {}", body.len()),
        ),
        Slow::Http10 => ("1.0", format!("content-length: {}", body.len())),
        Slow::Hypers => ("1.1", format!("content-length: {}", body.len())),
    };
    let target = match framing {
        Slow::Hypers => "https://api/admin/upload",
        _ => "/admin/upload",
    };
    let head =
        records(format!("POST {target} HTTP/{version}\r\nhost: api\r\n{head}\r\n\r\n").as_bytes());
    let body = records(&body);
    tcp.write_all(&head).unwrap();
    tcp.write_all(&body[..4096]).unwrap();
    // The answer, read until it is whole.
    let mut answer = Vec::new();
    let mut raw = [0u8; 4096];
    while !answer.ends_with(b"rule 0\n") {
        let n = tcp.read(&mut raw).expect("the answer comes");
        assert!(n > 0, "closed before the answer: {answer:?}");
        tls.read_tls(&mut &raw[..n]).unwrap();
        tls.process_new_packets().unwrap();
        let _ = tls.reader().read_to_end(&mut answer);
    }
    // The rest of the body, a record's part at a time, as a slow caller
    // sends it.
    let mut rest = || -> std::io::Result<()> {
        for part in body[4096..].chunks(1024) {
            tcp.write_all(part)?;
        }
        tcp.shutdown(std::net::Shutdown::Write)?;
        while tcp.read(&mut raw)? > 0 {}
        Ok(())
    };
    let end = rest();
    (answer, end)
}

/// An app that answers `/poison` with `poison` (an answer framed two
/// ways, or bytes after an answer that read as a second one) and every
/// other request honestly.
async fn poisoning_app(poison: &'static [u8]) -> SocketAddr {
    app(move |tcp| answer_heads(tcp, poison)).await
}

/// Answers each request head on `tcp` (these requests have no body).
async fn answer_heads(tcp: TcpStream, poison: &'static [u8]) -> std::io::Result<()> {
    let (read, mut write) = tcp.into_split();
    let mut r = Reader {
        io: read,
        buf: Vec::new(),
    };
    loop {
        let request_line = r.line().await?;
        while !r.line().await?.is_empty() {}
        let target = request_line.split(|b| *b == b' ').nth(1);
        let answer: &[u8] = if target == Some(&b"/poison"[..]) {
            poison
        } else {
            b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nhonest"
        };
        write.write_all(answer).await?;
    }
}

/// An answer the app sends to `/poison`, and what the first caller must
/// get of it.
struct Poison {
    case: &'static str,
    method: &'static str,
    answer: &'static [u8],
    /// How the caller's answer starts.
    expected: &'static str,
    /// What the caller's answer must not hold.
    absent: &'static str,
}

/// App connections are shared by callers between requests, so an answer
/// the app frames ambiguously, or bytes it sends after an answer, must
/// not reach the next caller as its own answer: the sidecar reads each
/// answer one way only, and drops an app connection that sent more than
/// one. An answer to `HEAD`, a 204 and a 304 have no body whatever their
/// headers say, so what follows them is such bytes; a 1xx answer is
/// followed by the real one.
#[tokio::test]
async fn an_answer_the_app_frames_two_ways_never_reaches_another_caller() {
    // A whole second answer, as the stray bytes.
    const INJECTED: &str = "HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\ninjected";
    let poisons = [
        Poison {
            case: "a length beside chunked",
            method: "GET",
            answer: b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n\
              0\r\n\r\n\
              HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\ninjected",
            expected: "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n",
            absent: "content-length: 5",
        },
        Poison {
            case: "two different lengths",
            method: "GET",
            answer: b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\ncontent-length: 45\r\n\r\n\
              HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\ninjected",
            expected: "HTTP/1.1 502 Bad Gateway\r\n",
            absent: "content-length: 45",
        },
        Poison {
            case: "a body after an answer to HEAD",
            method: "HEAD",
            answer: b"HTTP/1.1 200 OK\r\ncontent-length: 46\r\n\r\n\
              HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\ninjected",
            expected: "HTTP/1.1 200 OK\r\ncontent-length: 46\r\n",
            absent: INJECTED,
        },
        Poison {
            case: "a body after a 204 with a length",
            method: "GET",
            answer: b"HTTP/1.1 204 No Content\r\ncontent-length: 46\r\n\r\n\
              HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\ninjected",
            expected: "HTTP/1.1 204 No Content\r\n",
            absent: INJECTED,
        },
        Poison {
            case: "an answer after a 304",
            method: "GET",
            answer: b"HTTP/1.1 304 Not Modified\r\n\r\n\
              HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\ninjected",
            expected: "HTTP/1.1 304 Not Modified\r\n",
            absent: INJECTED,
        },
        Poison {
            case: "an informational answer before the answer",
            method: "GET",
            answer: b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>\r\n\r\n\
              HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfinal",
            expected: "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n",
            absent: "Early Hints",
        },
    ];
    assert_eq!(INJECTED.len(), 46, "the lengths above frame exactly it");
    for Poison {
        case,
        method,
        answer,
        expected,
        absent,
    } in poisons
    {
        let cp = FakeControlPlane::start(CERT_TTL).await;
        let s = sidecar(&cp, poisoning_app(answer).await, &[]).await;
        push_to(&cp, snapshot(1, "allow-mesh", vec![]), 1).await;
        let config = cp.ca.client_config(Some((&cp.ca, &id("/ns/a/sa/web"))));
        let mut first = tls_connect(s.inbound, config).await.unwrap();
        first
            .write_all(format!("{method} /poison HTTP/1.1\r\nhost: api\r\n\r\n").as_bytes())
            .await
            .unwrap();
        // Whatever the answer, until 1 s of silence or the end.
        let (got, _) = read_until_quiet(&mut first, Duration::from_secs(1)).await;
        let got = String::from_utf8_lossy(&got);
        assert!(got.starts_with(expected), "{case}: the caller got {got:?}");
        assert!(!got.contains(absent), "{case}: the caller got {got:?}");
        assert!(!got.contains("injected"), "{case}: the caller got {got:?}");
        if expected.contains("502") {
            assert!(
                got.ends_with("trellis: invalid answer from the app\n"),
                "{case}: {got:?}"
            );
        }
        if case.contains("informational") {
            assert!(got.ends_with("\r\n\r\nfinal"), "{case}: {got:?}");
        }
        for _ in 0..3 {
            let mut next = h1(&cp, s.inbound, &id("/ns/a/sa/web")).await;
            let (status, body) = text(next.send_request(get("/next", &[])).await.unwrap()).await;
            assert_eq!((status.as_u16(), body.as_str()), (200, "honest"), "{case}");
        }
    }
}

/// A chunked body that does not parse (a size with a `0x` prefix, a
/// chunk extension with a CRLF in quotes) is the caller's fault: 400,
/// naming what was wrong, and the log says the caller sent it. So on the
/// forwarder's path and on hyper's (after a request hyper serves, with
/// hyper's words for the fault).
#[tokio::test]
async fn a_malformed_chunk_from_the_caller_is_400_naming_it() {
    let (logs, _guard) = common::sidecar::Logs::capture(false);
    let (cp, s, _) = setup().await;
    // An `https` absolute-form target: hyper's.
    let hyper_first = "POST https://api/first HTTP/1.1\r\nhost: api\r\ncontent-length: 2\r\n\r\nhi";
    let cases = [
        (
            "",
            "0x1\r\nz\r\n0\r\n\r\n",
            "trellis: malformed chunked request body: invalid chunk size",
        ),
        (
            "",
            "1;x=\"a\r\nb\"\r\nz\r\n0\r\n\r\n",
            "trellis: malformed chunked request body: chunk data not followed by CRLF",
        ),
        (
            hyper_first,
            "0x1\r\nz\r\n0\r\n\r\n",
            "trellis: malformed chunked request body: Invalid chunk size line: Invalid Size",
        ),
    ];
    for (first, body, expected) in cases {
        let request = format!(
            "{first}POST /upload HTTP/1.1\r\nhost: api\r\ntransfer-encoding: chunked\r\n\r\n{body}"
        );
        let answers = send_raw(&cp, s.inbound, request.as_bytes()).await;
        let bodies = &answers.bodies[answers.bodies.len().saturating_sub(1)..];
        assert_eq!(
            answers.status.last().map(String::as_str),
            Some("HTTP/1.1 400 Bad Request"),
            "{body:?}"
        );
        assert_eq!(bodies, [format!("{expected}\n")], "{first}{body:?}");
    }
    for fault in ["invalid chunk size", "Invalid chunk size line"] {
        let line = logs
            .wait_for(&[
                "the caller sent a malformed chunked request body",
                "ns/a/sa/web",
                fault,
            ])
            .await;
        assert!(line.contains(fault), "{line}");
    }
    assert_eq!(logs.find(&["request to the app failed"]), None);
}

/// A `GET` or `HEAD` with a chunked body: the app gets the
/// body, framed, not a request without it.
#[tokio::test]
async fn a_chunked_body_on_a_get_or_head_reaches_the_app() {
    let (cp, s, seen) = setup().await;
    for method in ["GET", "HEAD"] {
        let request = format!(
            "{method} /with-body HTTP/1.1\r\nhost: api\r\ntransfer-encoding: chunked\r\n\
             connection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        );
        let answers = send_raw(&cp, s.inbound, request.as_bytes()).await;
        assert_eq!(answers.status, ["HTTP/1.1 200 OK"], "{method}");
    }
    assert_nothing_smuggled(&seen);
    let requests: Vec<(String, String)> = seen
        .requests()
        .into_iter()
        .map(|r| (r.method, String::from_utf8(r.body).unwrap()))
        .collect();
    assert_eq!(
        requests,
        [
            ("GET".to_owned(), "hello world".to_owned()),
            ("HEAD".to_owned(), "hello world".to_owned())
        ]
    );
}

/// An app that reads no request body: the body of a request is read as
/// the next request on the connection (a `GET` handler that ignores its
/// body does so, "CL.0"). It is slow to answer `/admin/*`: that answer goes
/// out with the answer to the next request on the connection, before it.
/// Each answer's body names the target it answers and the identity header
/// the request came with.
async fn body_ignoring_app() -> SocketAddr {
    app(|tcp| async move {
        let (read, mut write) = tcp.into_split();
        let mut r = Reader {
            io: read,
            buf: Vec::new(),
        };
        let mut late = Vec::new();
        loop {
            let request_line = String::from_utf8_lossy(&r.line().await?).into_owned();
            let mut identity = String::new();
            loop {
                let line = r.line().await?;
                if line.is_empty() {
                    break;
                }
                let line = String::from_utf8_lossy(&line).into_owned();
                if let Some((name, value)) = line.split_once(':')
                    && name.eq_ignore_ascii_case("x-trellis-peer-identity")
                {
                    identity = value.trim().to_owned();
                }
            }
            let target = request_line.split(' ').nth(1).unwrap_or_default();
            let body = format!("{target} for {identity}");
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            late.extend_from_slice(answer.as_bytes());
            if !target.starts_with("/admin") {
                write.write_all(&late).await?;
                late.clear();
            }
        }
    })
    .await
}

/// The body of the next answer on `stream` (one framed by its length),
/// read to its end and no further.
async fn one_answer<S: AsyncRead + Unpin>(stream: &mut S) -> String {
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut answer = httparse::Response::new(&mut headers);
        if let Ok(httparse::Status::Complete(head)) = answer.parse(&got) {
            let length: usize = answer
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
                .expect("every answer here has a length");
            if got.len() >= head + length {
                assert_eq!(got.len(), head + length, "more than one answer came");
                return String::from_utf8_lossy(&got[head..]).into_owned();
            }
        }
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed before an answer: {got:?}");
        got.extend_from_slice(&chunk[..n]);
    }
}

/// A sidecar in front of [`body_ignoring_app`] that denies `/admin/*`.
async fn body_ignoring_setup() -> (FakeControlPlane, common::sidecar::TestSidecar) {
    let cp = FakeControlPlane::start(CERT_TTL).await;
    let s = sidecar(&cp, body_ignoring_app().await, &[]).await;
    let deny = api_policy("no-admin", "DENY", "{to: [{paths: [\"/admin/*\"]}]}");
    push_to(&cp, snapshot(1, "allow-mesh", vec![deny]), 1).await;
    (cp, s)
}

/// A request for `target` with `hidden` as its body.
fn with_hidden(method: &str, target: &str) -> String {
    let hidden = "GET /admin/x HTTP/1.1\r\nhost: api\r\nx-trellis-peer-identity: forged\r\n\r\n";
    format!(
        "{method} {target} HTTP/1.1\r\nhost: api\r\ncontent-length: {}\r\n\r\n{hidden}",
        hidden.len()
    )
}

/// An app that reads a request's body as a request of its own answers it
/// too, after the answer to the request: app connections are shared
/// between the requests of one caller identity only, so that answer never
/// reaches another caller as its own.
#[tokio::test]
async fn an_answer_to_a_request_hidden_in_a_body_never_reaches_another_caller() {
    let (cp, s) = body_ignoring_setup().await;
    let config = cp.ca.client_config(Some((&cp.ca, &web())));
    let mut from_web = tls_connect(s.inbound, config).await.unwrap();
    let request = with_hidden("POST", "/public/x");
    from_web.write_all(request.as_bytes()).await.unwrap();
    assert_eq!(
        one_answer(&mut from_web).await,
        format!("/public/x for {}", web())
    );

    let api = id("/ns/b/sa/api");
    for round in 1..=2 {
        let mut from_api = h1(&cp, s.inbound, &api).await;
        let answer = from_api.send_request(get("/public/y", &[])).await.unwrap();
        assert_eq!(
            text(answer).await,
            (::http::StatusCode::OK, format!("/public/y for {api}")),
            "round {round}"
        );
    }
}

/// A `GET` (or `HEAD`) has no use for a body, and an app may read one as
/// a request: the app connection of a `GET` with a body is closed after
/// its answer, so the late answer to what the body held is not read as
/// the answer to the caller's next request either.
#[tokio::test]
async fn an_answer_to_a_request_hidden_in_a_get_body_never_reaches_the_next_request() {
    let (cp, s) = body_ignoring_setup().await;
    let config = cp.ca.client_config(Some((&cp.ca, &web())));
    let mut from_web = tls_connect(s.inbound, config).await.unwrap();
    let request = with_hidden("GET", "/public/x");
    from_web.write_all(request.as_bytes()).await.unwrap();
    assert_eq!(
        one_answer(&mut from_web).await,
        format!("/public/x for {}", web())
    );

    // The same connection, then a new one of the same caller.
    from_web
        .write_all(b"GET /public/y HTTP/1.1\r\nhost: api\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(
        one_answer(&mut from_web).await,
        format!("/public/y for {}", web())
    );
    let mut again = h1(&cp, s.inbound, &web()).await;
    let answer = again.send_request(get("/public/z", &[])).await.unwrap();
    assert_eq!(
        text(answer).await,
        (::http::StatusCode::OK, format!("/public/z for {}", web()))
    );
}

/// A head the sidecar refuses before it is a request is marked as the
/// sidecar's answer, as its other answers are: `trellis-proxy-error`.
#[tokio::test]
async fn a_refused_head_is_marked_as_the_sidecars_answer() {
    let (cp, s, seen) = setup().await;
    let mut head = b"GET /big HTTP/1.1\r\nhost: api\r\n".to_vec();
    for i in 0..120 {
        head.extend(format!("x-field-{i}: a\r\n").as_bytes());
    }
    head.extend(b"\r\n");
    let config = cp.ca.client_config(Some((&cp.ca, &id("/ns/a/sa/web"))));
    let mut tls = tls_connect(s.inbound, config).await.unwrap();
    tls.write_all(&head).await.unwrap();
    let (got, _) = read_until_quiet(&mut tls, Duration::from_secs(3)).await;
    let got = String::from_utf8_lossy(&got);
    let (answer_head, _) = got.split_once("\r\n\r\n").expect("an answer");
    let fields: Vec<&str> = answer_head.lines().skip(1).collect();
    assert!(
        fields.contains(&"trellis-proxy-error: invalid_request"),
        "{answer_head}"
    );
    assert!(seen.requests().is_empty(), "{:?}", seen.requests());
}

/// An app of HTTP/1.0's ways, as Go's, Python's or hyper's servers are:
/// it answers a request in the version it came in, keeps its connection
/// only for an HTTP/1.1 request or an HTTP/1.0 one with `Connection:
/// keep-alive`, and answers with the request's target as the body:
/// framed by its length, or for `/unframed` not framed (HTTP/1.0 and
/// closing after it), for `/unframed-1.1` in HTTP/1.1 with `Connection:
/// close` and closing after it, for `/framed-1.0` by its length in
/// HTTP/1.0 whatever the request's version, and closing after it. It
/// records each target.
async fn old_app() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let addr = app(move |tcp| {
        let record = record.clone();
        async move {
            let (read, mut write) = tcp.into_split();
            let mut r = Reader {
                io: read,
                buf: Vec::new(),
            };
            loop {
                let (target, minor, keep) = loop {
                    let mut headers = [httparse::EMPTY_HEADER; 32];
                    let mut req = httparse::Request::new(&mut headers);
                    if let httparse::Status::Complete(n) = req
                        .parse(&r.buf)
                        .map_err(|e| std::io::Error::other(e.to_string()))?
                    {
                        let minor = req.version.unwrap_or_default();
                        let asked = req.headers.iter().any(|h| {
                            h.name.eq_ignore_ascii_case("connection")
                                && String::from_utf8_lossy(h.value)
                                    .split(',')
                                    .any(|t| t.trim().eq_ignore_ascii_case("keep-alive"))
                        });
                        let target = req.path.unwrap_or_default().to_owned();
                        r.buf.drain(..n);
                        break (target, minor, minor == 1 || asked);
                    }
                    if !r.fill().await? {
                        return Ok(());
                    }
                };
                record.lock().unwrap().push(target.clone());
                let answer = match target.as_str() {
                    "/unframed" => format!("HTTP/1.0 200 OK\r\n\r\n{target}"),
                    "/unframed-1.1" => format!("HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n{target}"),
                    "/framed-1.0" => format!(
                        "HTTP/1.0 200 OK\r\ncontent-length: {}\r\n\r\n{target}",
                        target.len()
                    ),
                    _ => {
                        let connection = if keep && minor == 0 {
                            "connection: keep-alive\r\n"
                        } else {
                            ""
                        };
                        format!(
                            "HTTP/1.{minor} 200 OK\r\ncontent-length: {}\r\n{connection}\r\n{target}",
                            target.len()
                        )
                    }
                };
                write.write_all(answer.as_bytes()).await?;
                if !keep || target.starts_with("/unframed") || target == "/framed-1.0" {
                    return Ok(());
                }
            }
        }
    })
    .await;
    (addr, seen)
}

/// One answer framed by its length on `stream`: its head (lower-cased)
/// and body, read to its end and no further; `None` if the connection
/// ends before a head.
async fn framed_answer<S: AsyncRead + Unpin>(stream: &mut S) -> Option<(String, String)> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte)).await;
        match read.expect("an answer within 5 s") {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("an answer framed by its length: {head}"));
    let mut body = vec![0; length];
    stream.read_exact(&mut body).await.unwrap();
    Some((head, String::from_utf8(body).unwrap()))
}

/// A sidecar in front of [`old_app`], and a connection to it.
async fn old_app_setup() -> (
    FakeControlPlane,
    common::sidecar::TestSidecar,
    Arc<Mutex<Vec<String>>>,
) {
    let cp = FakeControlPlane::start(CERT_TTL).await;
    let (app, seen) = old_app().await;
    let s = sidecar(&cp, app, &[]).await;
    push_to(&cp, snapshot(1, "allow-mesh", vec![]), 1).await;
    (cp, s, seen)
}

/// HTTP/1.0 callers that ask for keep-alive (`ab -k`, some health
/// checks) keep their connection: each answer whose length is known says
/// `connection: keep-alive`, and the next request goes on the same
/// connection, also from an app that answers in HTTP/1.0.
#[tokio::test]
async fn http_1_0_keep_alive_requests_go_on_one_connection() {
    let (cp, s, seen) = old_app_setup().await;
    let config = cp.ca.client_config(Some((&cp.ca, &id("/ns/a/sa/web"))));
    let mut tls = tls_connect(s.inbound, config).await.unwrap();
    for target in ["/1", "/2", "/3"] {
        let request =
            format!("GET {target} HTTP/1.0\r\nhost: api\r\nconnection: keep-alive\r\n\r\n");
        tls.write_all(request.as_bytes()).await.unwrap();
        let (head, body) = framed_answer(&mut tls)
            .await
            .unwrap_or_else(|| panic!("{target}: the connection closed before its answer"));
        assert!(head.starts_with("http/1.0 200 ok\r\n"), "{target}: {head}");
        assert!(
            head.contains("\r\nconnection: keep-alive\r\n"),
            "{target}: {head}"
        );
        assert_eq!(body, target);
    }
    assert_eq!(*seen.lock().unwrap(), ["/1", "/2", "/3"]);
}

/// An HTTP/1.0 request without `Connection: keep-alive` is answered and
/// its connection closed, the answer not saying keep-alive.
#[tokio::test]
async fn an_http_1_0_request_without_keep_alive_is_answered_and_closed() {
    let (cp, s, seen) = old_app_setup().await;
    let config = cp.ca.client_config(Some((&cp.ca, &id("/ns/a/sa/web"))));
    let mut tls = tls_connect(s.inbound, config).await.unwrap();
    tls.write_all(b"GET /once HTTP/1.0\r\nhost: api\r\n\r\n")
        .await
        .unwrap();
    let (got, closed) = read_until_quiet(&mut tls, Duration::from_secs(3)).await;
    let got = String::from_utf8_lossy(&got).to_ascii_lowercase();
    let (head, body) = got.split_once("\r\n\r\n").expect("an answer");
    assert!(head.starts_with("http/1.0 200 ok\r\n"), "{head}");
    assert!(!head.contains("keep-alive"), "{head}");
    assert_eq!(body, "/once");
    assert!(closed, "the connection closes after the answer");
    assert_eq!(*seen.lock().unwrap(), ["/once"]);
}

/// An HTTP/1.0 caller that asked for keep-alive, given an answer whose
/// length is not known (the app ends it by closing, in HTTP/1.0 or in
/// HTTP/1.1, which would be chunked but HTTP/1.0 has no chunks), gets it
/// whole up to the close, not told keep-alive.
#[tokio::test]
async fn an_http_1_0_keep_alive_answer_of_unknown_length_is_answered_and_closed() {
    let (cp, s, seen) = old_app_setup().await;
    let config = cp.ca.client_config(Some((&cp.ca, &id("/ns/a/sa/web"))));
    for target in ["/unframed", "/unframed-1.1"] {
        let mut tls = tls_connect(s.inbound, config.clone()).await.unwrap();
        let request =
            format!("GET {target} HTTP/1.0\r\nhost: api\r\nconnection: keep-alive\r\n\r\n");
        tls.write_all(request.as_bytes()).await.unwrap();
        let (got, closed) = read_until_quiet(&mut tls, Duration::from_secs(3)).await;
        let got = String::from_utf8_lossy(&got).to_ascii_lowercase();
        let (head, body) = got.split_once("\r\n\r\n").expect("an answer");
        assert!(head.starts_with("http/1.0 200 ok\r\n"), "{target}: {head}");
        assert!(!head.contains("keep-alive"), "{target}: {head}");
        assert!(!head.contains("content-length"), "{target}: {head}");
        assert_eq!(body, target);
        assert!(closed, "{target}: the connection closes after the answer");
    }
    assert_eq!(*seen.lock().unwrap(), ["/unframed", "/unframed-1.1"]);
}

/// An HTTP/1.1 caller is answered in HTTP/1.1 by an app answering in
/// HTTP/1.0 (RFC 9110 section 6.2: the sidecar sends its own version), on
/// the forwarder's path and on hyper's (after an `https` absolute-form target):
/// an answer with a length on a connection that goes on, and one the app
/// ends by closing whole, up to the close on the forwarder's path (which
/// then closes the caller's connection), chunked on hyper's.
#[tokio::test]
async fn an_http_1_1_caller_is_answered_in_http_1_1_by_an_http_1_0_app() {
    let (cp, s, seen) = old_app_setup().await;
    let config = cp.ca.client_config(Some((&cp.ca, &id("/ns/a/sa/web"))));
    for (path, target) in [
        ("forwarder", "/framed-1.0"),
        ("hyper", "https://api/framed-1.0"),
    ] {
        let mut tls = tls_connect(s.inbound, config.clone()).await.unwrap();
        for round in 0..2 {
            let request = format!("GET {target} HTTP/1.1\r\nhost: api\r\n\r\n");
            tls.write_all(request.as_bytes()).await.unwrap();
            let (head, body) = framed_answer(&mut tls)
                .await
                .unwrap_or_else(|| panic!("{path} {round}: closed before its answer"));
            assert!(head.starts_with("http/1.1 200 ok\r\n"), "{path}: {head}");
            assert_eq!(body, "/framed-1.0", "{path}");
        }
        let unframed = target.replace("framed-1.0", "unframed");
        let request = format!("GET {unframed} HTTP/1.1\r\nhost: api\r\n\r\n");
        tls.write_all(request.as_bytes()).await.unwrap();
        let (got, closed) = read_until_quiet(&mut tls, Duration::from_secs(3)).await;
        let got = String::from_utf8_lossy(&got).to_ascii_lowercase();
        let (head, body) = got.split_once("\r\n\r\n").expect("an answer");
        assert!(head.starts_with("http/1.1 200 ok\r\n"), "{path}: {head}");
        if path == "forwarder" {
            assert!(head.contains("\r\nconnection: close"), "{path}: {head}");
            assert_eq!(body, "/unframed", "{path}");
            assert!(closed, "{path}: the connection closes after the answer");
        } else {
            assert!(head.contains("\r\ntransfer-encoding: chunked"), "{head}");
            assert_eq!(body, "9\r\n/unframed\r\n0\r\n\r\n", "{path}");
            assert!(!closed, "{path}: the connection goes on");
        }
    }
    let framed = ["/framed-1.0", "/framed-1.0", "/unframed"];
    assert_eq!(*seen.lock().unwrap(), [framed, framed].concat());
}
