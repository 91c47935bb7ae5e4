//! The HTTP/1.1 app the sidecar's tests put behind it: a bare server on a
//! real loopback socket that parses each request strictly on its own
//! (not with hyper, so it sees the bytes as they came), answers as a test
//! says, and records what it saw: each request's head and body, and how
//! many connections it accepted, which is how a test tells an app
//! connection reused from one dialled anew.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::h1::Chunked;

/// What the app saw: each request's head and body, and how many
/// connections it accepted.
#[derive(Default)]
pub struct Seen {
    pub requests: Mutex<Vec<(String, Vec<u8>)>>,
    accepted: AtomicUsize,
}

impl Seen {
    /// How many connections the app has accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// The request line and `Host` of each request, in order.
    pub fn lines_and_hosts(&self) -> Vec<(String, String)> {
        let requests = self.requests.lock().unwrap();
        requests
            .iter()
            .map(|(head, _)| {
                let mut lines = head.lines();
                let line = lines.next().unwrap_or_default().to_owned();
                let host = lines
                    .filter_map(|l| l.split_once(':'))
                    .find(|(name, _)| name.eq_ignore_ascii_case("host"))
                    .map(|(_, value)| value.trim().to_owned());
                (line, host.unwrap_or_default())
            })
            .collect()
    }
}

/// A bare HTTP/1.1 app: reads each request (its body framed by
/// Content-Length or chunked, kept as it came) and writes what `answer`
/// makes of its request line; closes the connection after answers for
/// which `close` says so, and keeps it (reading the next request) after
/// the others.
pub async fn bare_app(
    answer: impl Fn(&str) -> Vec<u8> + Send + Sync + 'static,
    close: impl Fn(&str) -> bool + Send + Sync + 'static,
) -> (SocketAddr, Arc<Seen>) {
    resetting_app(answer, close, |_, _| false).await
}

/// A [`bare_app`] that closes connection `c` (from 0, in the order
/// accepted) when its request `r` (from 0) arrives, without reading it,
/// where `unread(c, r)`: the kernel resets the connection.
pub async fn resetting_app(
    answer: impl Fn(&str) -> Vec<u8> + Send + Sync + 'static,
    close: impl Fn(&str) -> bool + Send + Sync + 'static,
    unread: impl Fn(usize, usize) -> bool + Send + Sync + 'static,
) -> (SocketAddr, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let (record, answer, close) = (seen.clone(), Arc::new(answer), Arc::new(close));
    let unread = Arc::new(unread);
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let c = record.accepted.fetch_add(1, Ordering::SeqCst);
            let (record, answer, close) = (record.clone(), answer.clone(), close.clone());
            let unread = unread.clone();
            tokio::spawn(async move {
                let mut buf = BytesMut::new();
                for r in 0.. {
                    if unread(c, r) {
                        let _ = tcp.readable().await;
                        return;
                    }
                    let (head, len, body_len) = loop {
                        if let Some(parsed) = parse_head(&buf) {
                            break parsed;
                        }
                        if tcp.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                            return;
                        }
                    };
                    buf.advance(len);
                    let body_len = loop {
                        let ended = match body_len {
                            Some(n) => (buf.len() >= n).then_some(n),
                            // At a chunk that does not parse, the app
                            // waits for more, as one reading the body as
                            // it comes would.
                            None => match Chunked::default().take(&buf) {
                                Ok((n, true)) => Some(n),
                                _ => None,
                            },
                        };
                        if let Some(n) = ended {
                            break n;
                        }
                        if tcp.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                            return;
                        }
                    };
                    let body = buf.split_to(body_len).to_vec();
                    let line = head.lines().next().unwrap_or_default().to_owned();
                    record.requests.lock().unwrap().push((head, body));
                    if tcp.write_all(&answer(&line)).await.is_err() {
                        return;
                    }
                    if close(&line) {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// The request head at the start of `buf`, if it is whole: the head as
/// text, its length, and its body's length (`None` for a chunked one).
fn parse_head(buf: &[u8]) -> Option<(String, usize, Option<usize>)> {
    let mut fields = [httparse::EMPTY_HEADER; 128];
    let mut request = httparse::Request::new(&mut fields);
    let Ok(httparse::Status::Complete(len)) = request.parse(buf) else {
        return None;
    };
    let field = |name: &str| {
        request
            .headers
            .iter()
            .find(|f| f.name.eq_ignore_ascii_case(name))
            .map(|f| f.value)
    };
    let body_len = match field("transfer-encoding") {
        Some(_) => None,
        None => Some(field("content-length").map_or(0, |v| {
            std::str::from_utf8(v)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .expect("a decimal Content-Length")
        })),
    };
    let head = String::from_utf8(buf[..len].to_vec()).unwrap();
    Some((head, len, body_len))
}
