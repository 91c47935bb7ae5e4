//! The application behind every pair: one loopback port that speaks two
//! protocols, chosen by the first bytes of a connection.
//!
//! - HTTP/1.1 (the connection starts with a method): every request (any body,
//!   sized by `Content-Length`) is answered with a 1 KiB body, keep-alive;
//!   `Connection: close` ends the connection after the answer.
//! - HTTP/2 with prior knowledge (the connection starts with the client
//!   preface, as gRPC over cleartext does): every request's body is read
//!   whole and answered with the same 1 KiB body, status 200, served by
//!   hyper.
//! - Anything else is a bulk stream: the bytes are counted and dropped, and
//!   when the client half-closes the app writes the count (8 bytes, big
//!   endian) and closes, so the client knows every byte arrived.
//!
//! It never dials anywhere and serves only the address it was given.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use trellis_core::refusal::H2_PREFACE;

/// The size of every HTTP answer's body.
pub const RESPONSE_BODY: usize = 1024;

/// Largest request head the app accepts.
const MAX_HEAD: usize = 16 * 1024;

/// The app; dropping it stops accepting (open connections end with their
/// clients).
pub struct BenchApp {
    addr: SocketAddr,
    task: JoinHandle<()>,
    open: Arc<AtomicUsize>,
    accepts: Arc<Accepts>,
}

/// What the app's listener has done: connections accepted, and accepts
/// that failed (out of descriptors, most likely) with the last reason.
#[derive(Default)]
struct Accepts {
    accepted: AtomicU64,
    failed: AtomicU64,
    last_failure: Mutex<Option<String>>,
}

/// The app's accept counts at one moment, to say later what it did since.
#[derive(Clone, Copy, Debug)]
pub struct AcceptCounts {
    accepted: u64,
    failed: u64,
}

/// Counts one open app connection for as long as it lives.
struct Open(Arc<AtomicUsize>);

impl Open {
    fn new(open: &Arc<AtomicUsize>) -> Open {
        open.fetch_add(1, Ordering::Relaxed);
        Open(open.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl BenchApp {
    /// Listens on a free loopback port.
    pub async fn start() -> anyhow::Result<BenchApp> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let open = Arc::new(AtomicUsize::new(0));
        let accepts = Arc::new(Accepts::default());
        let counter = open.clone();
        let seen = accepts.clone();
        let task = tokio::spawn(async move {
            loop {
                let tcp = match listener.accept().await {
                    Ok((tcp, _)) => tcp,
                    Err(e) => {
                        seen.failed.fetch_add(1, Ordering::Relaxed);
                        *seen.last_failure.lock().unwrap() = Some(e.to_string());
                        // Out of descriptors or similar: back off, do not spin.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                seen.accepted.fetch_add(1, Ordering::Relaxed);
                let _ = tcp.set_nodelay(true);
                let open = Open::new(&counter);
                tokio::spawn(async move {
                    serve(tcp).await;
                    drop(open);
                });
            }
        });
        Ok(BenchApp {
            addr,
            task,
            open,
            accepts,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections the app has accepted and not yet closed.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// The accept counts now, for [`BenchApp::since`].
    pub fn accept_counts(&self) -> AcceptCounts {
        AcceptCounts {
            accepted: self.accepts.accepted.load(Ordering::Relaxed),
            failed: self.accepts.failed.load(Ordering::Relaxed),
        }
    }

    /// What the app did since `then`, and how many descriptors this process
    /// holds: what a scenario that failed reports, so that an app that saw
    /// no connection, or could not accept one, is told from a proxy that
    /// did not answer.
    pub fn since(&self, then: AcceptCounts) -> String {
        let now = self.accept_counts();
        let failed = now.failed - then.failed;
        let mut out = format!(
            "the app accepted {} connections meanwhile and has {} open",
            now.accepted - then.accepted,
            self.open_connections()
        );
        if failed > 0 {
            let last = self.accepts.last_failure.lock().unwrap().clone();
            out += &format!(
                "; {failed} accepts failed, the last with \"{}\"",
                last.unwrap_or_default()
            );
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            out += &format!("; this process has {} descriptors open", fds.count());
        }
        out
    }

    /// Waits until the app's open connections are back to `before` or
    /// have stopped falling for a second, for at most `patience`, and
    /// returns how many are open. A pair that was holding thousands of
    /// connections may take seconds to close its side of them (stunnel
    /// ends a thread for each), and until then their descriptors in this
    /// process count against the next scenario's; a pair that keeps idle
    /// connections to the app for later requests (Trellis does, for a
    /// while) settles above `before`.
    pub async fn wait_until_settled(&self, before: usize, patience: Duration) -> usize {
        let deadline = Instant::now() + patience;
        let mut last = self.open_connections();
        let mut since = Instant::now();
        while last > before && since.elapsed() < Duration::from_secs(1) && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = self.open_connections();
            if now != last {
                last = now;
                since = Instant::now();
            }
        }
        last
    }
}

impl Drop for BenchApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The bytes of one HTTP answer.
pub fn response_bytes() -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {RESPONSE_BODY}\r\n\r\n"
    )
    .into_bytes();
    out.extend(std::iter::repeat_n(b'x', RESPONSE_BODY));
    out
}

async fn serve(mut tcp: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    let n = match tcp.read(&mut buf).await {
        Ok(0) | Err(_) => return,
        Ok(n) => n,
    };
    if looks_like_http(&buf[..n]) {
        serve_http(tcp, buf, n).await;
    } else if is_h2_preface_start(&buf[..n]) {
        serve_h2(tcp, &buf[..n]).await;
    } else {
        sink(tcp, buf, n as u64).await;
    }
}

fn looks_like_http(first: &[u8]) -> bool {
    [&b"GET "[..], b"POST ", b"PUT ", b"HEAD "]
        .iter()
        .any(|m| first.starts_with(m))
}

/// Whether `first` starts as the HTTP/2 client preface does (the whole
/// preface may not have arrived in the first read).
fn is_h2_preface_start(first: &[u8]) -> bool {
    let n = first.len().min(H2_PREFACE.len());
    n >= 4 && first[..n] == H2_PREFACE[..n]
}

/// Serves HTTP/2 on `tcp`, whose first bytes (`read`) were already read:
/// each request's body is read to its end, then answered with
/// [`RESPONSE_BODY`] bytes.
async fn serve_h2(tcp: TcpStream, read: &[u8]) {
    use http_body_util::{BodyExt, Full};
    let io = trellis_proxy::http::Rewind::with_prefix(read.into(), tcp);
    let body = bytes::Bytes::from(vec![b'x'; RESPONSE_BODY]);
    let service =
        hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            let body = body.clone();
            async move {
                request.into_body().collect().await?;
                let mut answer = hyper::Response::new(Full::new(body));
                answer.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("application/octet-stream"),
                );
                Ok::<_, hyper::Error>(answer)
            }
        });
    let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .serve_connection(hyper_util::rt::TokioIo::new(io), service)
        .await;
}

async fn sink(mut tcp: TcpStream, mut buf: Vec<u8>, mut total: u64) {
    loop {
        match tcp.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(_) => return,
        }
    }
    let _ = tcp.write_all(&total.to_be_bytes()).await;
    let _ = tcp.shutdown().await;
}

async fn serve_http(mut tcp: TcpStream, mut buf: Vec<u8>, mut filled: usize) {
    let response = response_bytes();
    loop {
        // Answer every complete request in the buffer.
        while let Some(head_end) = find_head_end(&buf[..filled]) {
            let head = &buf[..head_end];
            let body = content_length(head).unwrap_or(0);
            let close = wants_close(head);
            let total = head_end + body;
            if filled < total {
                break;
            }
            if tcp.write_all(&response).await.is_err() {
                return;
            }
            if close {
                let _ = tcp.shutdown().await;
                return;
            }
            buf.copy_within(total..filled, 0);
            filled -= total;
        }
        if filled == buf.len() {
            if buf.len() >= MAX_HEAD * 8 {
                return;
            }
            buf.resize(buf.len() * 2, 0);
        }
        match tcp.read(&mut buf[filled..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => filled += n,
        }
    }
}

/// The length of the head (through the blank line), if it is complete.
pub fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4)
        .take(MAX_HEAD)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
}

/// The `Content-Length` of a head, if it has one.
pub fn content_length(head: &[u8]) -> Option<usize> {
    header_value(head, "content-length").and_then(|v| v.trim().parse().ok())
}

fn wants_close(head: &[u8]) -> bool {
    header_value(head, "connection").is_some_and(|v| v.trim().eq_ignore_ascii_case("close"))
}

fn header_value(head: &[u8], name: &str) -> Option<String> {
    let text = std::str::from_utf8(head).ok()?;
    text.split("\r\n").skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim()
            .eq_ignore_ascii_case(name)
            .then(|| value.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_length_and_end_of_a_head() {
        let head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n\r\nbody";
        let end = find_head_end(head).unwrap();
        assert_eq!(&head[end..], b"body");
        assert_eq!(content_length(&head[..end]), Some(12));
        assert!(!wants_close(&head[..end]));
    }

    /// A client with HTTP/2 prior knowledge (as h2load and gRPC are) gets
    /// every request on its connection answered: status 200, the 1 KiB
    /// body, several streams at once.
    #[tokio::test]
    async fn answers_http2_with_prior_knowledge() {
        use http_body_util::{BodyExt, Full};
        let app = BenchApp::start().await.unwrap();
        let tcp = TcpStream::connect(app.addr()).await.unwrap();
        let (sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let mut calls = Vec::new();
        for _ in 0..4 {
            let mut sender = sender.clone();
            calls.push(tokio::spawn(async move {
                let request = hyper::Request::post("http://bench/")
                    .body(Full::new(bytes::Bytes::from(vec![b'r'; 1024])))
                    .unwrap();
                let answer = sender.send_request(request).await.unwrap();
                let status = answer.status();
                let body = answer.into_body().collect().await.unwrap().to_bytes();
                (status, body.len())
            }));
        }
        for call in calls {
            assert_eq!(call.await.unwrap(), (hyper::StatusCode::OK, RESPONSE_BODY));
        }
        assert_eq!(app.open_connections(), 1);
    }

    /// Only the start of the HTTP/2 preface makes a connection HTTP/2; a
    /// bulk stream that happens to start with "PRI" is still a bulk stream.
    #[test]
    fn tells_the_http2_preface_from_other_bytes() {
        assert!(is_h2_preface_start(H2_PREFACE));
        assert!(is_h2_preface_start(b"PRI * HTTP/2"));
        assert!(!is_h2_preface_start(b"PRI"));
        assert!(!is_h2_preface_start(b"PRICE LIST"));
        assert!(!is_h2_preface_start(b"\0\0\0\0"));
    }

    #[tokio::test]
    async fn counts_its_open_connections_until_their_clients_leave() {
        let app = BenchApp::start().await.unwrap();
        let mut held = Vec::new();
        for _ in 0..3 {
            let mut tcp = TcpStream::connect(app.addr()).await.unwrap();
            tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            // The answer proves the app accepted and serves the connection.
            let mut answer = vec![0u8; 64];
            tcp.read_exact(&mut answer).await.unwrap();
            assert!(answer.starts_with(b"HTTP/1.1 200"));
            held.push(tcp);
        }
        assert_eq!(app.open_connections(), 3);
        // Nothing closes: settled at 3 once a second passes with no change.
        assert_eq!(app.wait_until_settled(0, Duration::from_secs(10)).await, 3);
        let last = held.pop().unwrap();
        drop(held);
        assert_eq!(app.wait_until_settled(0, Duration::from_secs(10)).await, 1);
        drop(last);
        assert_eq!(app.wait_until_settled(0, Duration::from_secs(10)).await, 0);
    }
}
