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
    let record = seen.clone();
    let addr = app(move |tcp| serve(tcp, record.clone())).await;
    (addr, seen)
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
        let (method, path, lengths, codings, head_len) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
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
        seen.0
            .lock()
            .unwrap()
            .requests
            .push(Framed { method, path, body });
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
    Answers {
        status: status_lines(&got),
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

/// The status line of each answer in `bytes`, bodies framed by their
/// `content-length` (every answer here has one).
fn status_lines(mut bytes: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut answer = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(head)) = answer.parse(bytes) else {
            panic!("not an answer: {:?}", String::from_utf8_lossy(bytes));
        };
        out.push(format!(
            "HTTP/1.1 {} {}",
            answer.code.unwrap_or_default(),
            answer.reason.unwrap_or_default()
        ));
        let length: usize = answer
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
            .expect("every answer has a length");
        bytes = &bytes[(head + length).min(bytes.len())..];
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

/// `Content-Length` before `Transfer-Encoding: chunked` (CL.TE): the
/// chunked framing decides, the length is not passed on, and the sidecar
/// closes the connection after its answer (RFC 9112, section 6.3), so
/// what follows the last chunk is never read as a request.
#[tokio::test]
async fn a_length_beside_chunked_framing_is_dropped_and_the_connection_closed() {
    let (cp, s, seen) = setup().await;
    let answers = send_raw(
        &cp,
        s.inbound,
        b"POST /a HTTP/1.1\r\nhost: api\r\ncontent-length: 44\r\ntransfer-encoding: chunked\r\n\r\n\
          0\r\n\r\n\
          GET /admin/x HTTP/1.1\r\nhost: api\r\n\r\n",
    )
    .await;
    assert_nothing_smuggled(&seen);
    assert_eq!(answers.status, ["HTTP/1.1 200 OK"]);
    assert!(answers.closed);
    let requests = seen.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(
        (requests[0].path.as_str(), requests[0].body.len()),
        ("/a", 0)
    );
}

/// `Transfer-Encoding: chunked` before `Content-Length` (TE.CL), with a
/// request written inside the chunked body: it reaches the app as the
/// body of the one request, and the connection is closed after it.
#[tokio::test]
async fn a_request_inside_a_chunked_body_stays_body() {
    let (cp, s, seen) = setup().await;
    let hidden = b"GET /admin/x HTTP/1.1\r\nhost: api\r\n\r\n";
    let mut bytes =
        b"POST /a HTTP/1.1\r\nhost: api\r\ntransfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n"
            .to_vec();
    bytes.extend(format!("{:x}\r\n", hidden.len()).as_bytes());
    bytes.extend(hidden);
    bytes.extend(b"\r\n0\r\n\r\n");
    let answers = send_raw(&cp, s.inbound, &bytes).await;
    assert_nothing_smuggled(&seen);
    let requests = seen.requests();
    let bodies: Vec<&[u8]> = requests.iter().map(|r| r.body.as_slice()).collect();
    assert_eq!(answers.status, ["HTTP/1.1 200 OK"]);
    assert!(answers.closed);
    assert_eq!(bodies, [&hidden[..]]);
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

/// Framing the sidecar cannot read one way only is refused with 400, and
/// nothing reaches the app.
#[tokio::test]
async fn ambiguous_or_malformed_framing_is_refused_before_the_app() {
    let (cp, s, seen) = setup().await;
    let cases: [(&str, &[u8]); 5] = [
        (
            "two different lengths",
            b"POST /a HTTP/1.1\r\nhost: api\r\ncontent-length: 5\r\ncontent-length: 40\r\n\r\n\
              hello",
        ),
        (
            "a coding other than chunked last",
            b"POST /a HTTP/1.1\r\nhost: api\r\ntransfer-encoding: chunked, identity\r\n\r\n\
              0\r\n\r\n",
        ),
        (
            "transfer-encoding on HTTP/1.0",
            b"POST /a HTTP/1.0\r\nhost: api\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "a folded header",
            b"GET /a HTTP/1.1\r\nhost: api\r\nx-folded: one\r\n two\r\n\r\n",
        ),
        (
            "a space before the colon",
            b"POST /a HTTP/1.1\r\nhost: api\r\ncontent-length : 5\r\n\r\nhello",
        ),
    ];
    for (case, bytes) in cases {
        let answers = send_raw(&cp, s.inbound, bytes).await;
        assert_eq!(answers.status, ["HTTP/1.1 400 Bad Request"], "{case}");
        assert!(answers.closed, "{case}");
        assert!(seen.requests().is_empty(), "{case}: {:?}", seen.requests());
    }
    assert_nothing_smuggled(&seen);
}

/// An app that answers `/poison` with a response framed two ways (or
/// with two lengths), bytes after it that read as a second response, and
/// every other request honestly.
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
        let answer: &[u8] = if request_line.starts_with(b"GET /poison ") {
            poison
        } else {
            b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nhonest"
        };
        write.write_all(answer).await?;
    }
}

/// App connections are shared by callers between requests, so an answer
/// the app frames ambiguously must not leave bytes that the next caller
/// would get as its own answer: the sidecar reads it one way only and
/// drops an app connection that sent more than one answer.
#[tokio::test]
async fn an_answer_the_app_frames_two_ways_never_reaches_another_caller() {
    // Each answer, and how the first caller gets it: as chunked alone,
    // its length dropped, or refused as invalid.
    let poisons: [(&str, &'static [u8], &str); 2] = [
        (
            "a length beside chunked",
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n\
              0\r\n\r\n\
              HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\ninjected",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n",
        ),
        (
            "two different lengths",
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\ncontent-length: 45\r\n\r\n\
              HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\ninjected",
            "HTTP/1.1 502 Bad Gateway\r\n",
        ),
    ];
    for (case, poison, expected) in poisons {
        let cp = FakeControlPlane::start(CERT_TTL).await;
        let s = sidecar(&cp, poisoning_app(poison).await, &[]).await;
        push_to(&cp, snapshot(1, "allow-mesh", vec![]), 1).await;
        let config = cp.ca.client_config(Some((&cp.ca, &id("/ns/a/sa/web"))));
        let mut first = tls_connect(s.inbound, config).await.unwrap();
        first
            .write_all(b"GET /poison HTTP/1.1\r\nhost: api\r\n\r\n")
            .await
            .unwrap();
        // Whatever the answer, until 1 s of silence or the end.
        let (got, _) = read_until_quiet(&mut first, Duration::from_secs(1)).await;
        let got = String::from_utf8_lossy(&got);
        assert!(got.starts_with(expected), "{case}: the caller got {got:?}");
        assert!(!got.contains("content-length: 5"), "{case}: {got:?}");
        assert!(!got.contains("injected"), "{case}: the caller got {got:?}");
        if expected.contains("502") {
            assert!(
                got.ends_with("invalid answer from the app\n"),
                "{case}: {got:?}"
            );
        }
        for _ in 0..3 {
            let mut next = h1(&cp, s.inbound, &id("/ns/a/sa/web")).await;
            let (status, body) = text(next.send_request(get("/next", &[])).await.unwrap()).await;
            assert_eq!((status.as_u16(), body.as_str()), (200, "honest"), "{case}");
        }
    }
}
