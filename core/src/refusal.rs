//! Refusing in words a client can show, instead of a TLS alert or a closed
//! connection.
//!
//! [`local_answer`] is the answer Trellis writes itself (a text body, or for
//! gRPC `grpc-status` and `grpc-message`): the sidecar's request layer
//! refuses with it. [`answer`] gives it to a connection refused before any
//! request layer serves it, in HTTP/1.x or HTTP/2, and closes the
//! connection ([`linger`]ing, so the client reads it): the sidecar refuses
//! an app's outbound call with it. [`refuse_plaintext`] and
//! [`refuse_plaintext_briefly`] answer a client that sent plaintext HTTP to
//! a TLS port with what the port is: left to the TLS library, such a client
//! gets a TLS alert, which curl shows as "Received HTTP/0.9 when not
//! allowed" and a gRPC client as a closed connection or a timeout.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// The HTTP version a refused connection is answered in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    Http1,
    Http2,
}

/// The first byte of every TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// The HTTP/2 client connection preface (RFC 9113, section 3.4): what a
/// client speaking HTTP/2 with prior knowledge sends first.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether the first bytes a client sent to a TLS port (at least one) are
/// plaintext HTTP, and which version: `None` for a TLS handshake and for
/// bytes that are not text a person or an HTTP client would send.
pub fn plaintext_version(first: &[u8]) -> Option<Version> {
    let &byte = first.first()?;
    if byte == TLS_HANDSHAKE_RECORD || !byte.is_ascii_uppercase() {
        return None;
    }
    let seen = first.len().min(H2_PREFACE.len());
    if seen >= H2_DECIDES && H2_PREFACE.starts_with(&first[..seen]) {
        Some(Version::Http2)
    } else {
        Some(Version::Http1)
    }
}

/// How much of [`H2_PREFACE`] tells it from an HTTP/1 request line: `PRI`
/// (`POST`, `PUT` and `PATCH` begin as it does).
const H2_DECIDES: usize = 3;

/// Whether `first` cannot yet be told: the start of [`H2_PREFACE`], too
/// short to say whether it is HTTP/2 or HTTP/1 (`P`, `PR`).
fn undecided(first: &[u8]) -> bool {
    !first.is_empty() && first.len() < H2_DECIDES && H2_PREFACE.starts_with(first)
}

/// The first pause before peeking again at bytes that cannot be told yet
/// ([`undecided`]), and the longest: each pause doubles.
const PEEK_AGAIN_AFTER: Duration = Duration::from_millis(1);
const PEEK_AGAIN_AT_MOST: Duration = Duration::from_millis(50);

/// Waits at most `patience` for a new connection's first bytes and peeks at
/// them: the HTTP version when they are plaintext HTTP. A TLS ClientHello
/// or HTTP/1 is told from the first peek. A client whose first segment is
/// only the start of the HTTP/2 preface (`P`) is peeked at again, within
/// the same `patience`, until it can be told: taken for HTTP/1 it would be
/// answered in a protocol it cannot read. A peek leaves the bytes in the
/// socket, which stays readable, so nothing wakes this task when more
/// come: it pauses between peeks instead. Still untold once `patience` is
/// over, it is what it began as (`P`: HTTP/1).
async fn peek_plaintext(tcp: &TcpStream, patience: Duration) -> Option<Version> {
    let mut first = [0u8; H2_PREFACE.len()];
    let mut seen = 0;
    let peeking = async {
        let mut pause = PEEK_AGAIN_AFTER;
        loop {
            seen = tcp.peek(&mut first).await.unwrap_or(0);
            if !undecided(&first[..seen]) {
                return;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(PEEK_AGAIN_AT_MOST);
        }
    };
    let _ = tokio::time::timeout(patience, peeking).await;
    plaintext_version(&first[..seen])
}

/// Peeks at what a new connection to a TLS port sent first (waiting for it
/// at most `patience`) and, when it is plaintext HTTP, answers its first
/// request in its own protocol ([`answer`]): `400 Bad Request` with
/// `message` as the body, or for a gRPC call `UNAVAILABLE` with `message`.
/// Gives the connection back, untouched, when it is not plaintext HTTP (or
/// sent nothing in time); `None` when it was plaintext: answered, or, with
/// no whole request in `patience`, reset ([`Answered::Nothing`]). `found` is called
/// once plaintext is seen, before the answer: a refusal counted and logged
/// there is on record by the time the client reads its answer (the answer
/// then lingers, [`answer`]).
pub async fn refuse_plaintext(
    mut tcp: TcpStream,
    message: &str,
    patience: Duration,
    found: impl FnOnce(),
) -> Option<TcpStream> {
    if refuse_plaintext_briefly(&mut tcp, message, None, patience, found).await {
        None
    } else {
        Some(tcp)
    }
}

/// Like [`refuse_plaintext`], on a connection the caller keeps: returns
/// whether it found plaintext; the connection is then done (answered, or
/// set to be reset when closed: [`Answered::Nothing`]). A sidecar's answer
/// names `proxy_error` in [`PROXY_ERROR`] ([`Refusal::proxy_error`]).
pub async fn refuse_plaintext_briefly(
    tcp: &mut TcpStream,
    message: &str,
    proxy_error: Option<&'static str>,
    patience: Duration,
    found: impl FnOnce(),
) -> bool {
    let Some(version) = peek_plaintext(tcp, patience).await else {
        return false;
    };
    found();
    let refusal = Refusal {
        status: StatusCode::BAD_REQUEST,
        grpc_code: GRPC_UNAVAILABLE,
        message,
        proxy_error,
        request_may_have_gone: false,
    };
    // Boxed: a caller's future keeps room only for the pointer.
    if Box::pin(answer(tcp, version, &refusal, patience)).await == Answered::Nothing {
        reset_on_close(tcp);
    }
    true
}

/// Makes closing `tcp` reset the connection (`SO_LINGER` 0) instead of
/// ending it with a FIN, which its peer would take for an orderly end: for
/// a client left unanswered ([`Answered::Nothing`]), and the sidecar's
/// relayed connections cut mid-stream. Zero linger never blocks the close.
pub fn reset_on_close(tcp: &TcpStream) {
    // A socket already gone has nothing left to reset.
    let _ = tcp.set_zero_linger();
}

/// The HTTP/2 error codes a refusal's GOAWAY carries (RFC 9113, section
/// 7): the client's request was not processed and may be retried elsewhere
/// (a server with no room for another connection).
pub const H2_REFUSED_STREAM: u32 = 0x7;
/// The client is asking for more than its share (too many connections).
pub const H2_ENHANCE_YOUR_CALM: u32 = 0xb;
/// The connection failed in a way that says nothing of whether a request
/// was processed.
pub const H2_INTERNAL_ERROR: u32 = 0x2;
/// The highest stream identifier: a GOAWAY naming it as the last stream
/// says any stream the client opened may have been processed.
const H2_ANY_STREAM: u32 = 0x7fff_ffff;

/// An empty SETTINGS frame: the server preface of a refusal.
const EMPTY_SETTINGS: [u8; 9] = [0, 0, 0, 0x4, 0, 0, 0, 0, 0];

/// The most of a message a GOAWAY carries as debug data: far below the
/// smallest frame a client may be sent (16 KiB).
pub const GOAWAY_DEBUG_MOST: usize = 1024;

/// An empty SETTINGS frame (the server preface), then GOAWAY: last stream
/// 0 (no stream of the connection was processed, so a client may send its
/// requests again elsewhere), `code`, `message` as debug data (its first
/// [`GOAWAY_DEBUG_MOST`] bytes, cut between characters).
pub fn goaway(code: u32, message: &str) -> Vec<u8> {
    goaway_after(0, code, message)
}

/// [`goaway`] naming `last_stream` as the last stream processed.
fn goaway_after(last_stream: u32, code: u32, message: &str) -> Vec<u8> {
    const GOAWAY: u8 = 0x7;
    let mut end = message.len().min(GOAWAY_DEBUG_MOST);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let message = &message[..end];
    let mut frames = EMPTY_SETTINGS.to_vec();
    let length = (8 + message.len()) as u32;
    frames.extend_from_slice(&length.to_be_bytes()[1..]);
    frames.extend_from_slice(&[GOAWAY, 0, 0, 0, 0, 0]);
    frames.extend_from_slice(&last_stream.to_be_bytes());
    frames.extend_from_slice(&code.to_be_bytes());
    frames.extend_from_slice(message.as_bytes());
    frames
}

/// A refusal as a client is told it ([`answer`]).
#[derive(Clone, Copy, Debug)]
pub struct Refusal<'a> {
    /// The HTTP status of a text answer.
    pub status: StatusCode,
    /// The `grpc-status` of a gRPC answer (whose HTTP status is 200).
    pub grpc_code: u16,
    /// Why, as the client is shown it: the text body (with a newline), or
    /// the `grpc-message`.
    pub message: &'a str,
    /// For an answer of a sidecar, the fixed token (one of [`token`]) its
    /// [`PROXY_ERROR`] header carries, HTTP/1 and HTTP/2 (gRPC too) alike.
    pub proxy_error: Option<&'static str>,
    /// Whether the client's request may already have reached a server that
    /// processed it (its bytes were passed on before the refusal, and the
    /// peer ended without saying it refused them). An HTTP/2 client whose
    /// request [`answer`] never sees is then told so: GOAWAY naming every
    /// stream as possibly processed, with `INTERNAL_ERROR`, not last stream
    /// 0 with `REFUSED_STREAM`, which would invite it to send a request
    /// that is not idempotent again.
    pub request_may_have_gone: bool,
}

/// The header on an answer a sidecar writes itself instead of an app,
/// naming why in a fixed token: a client tells it from the app's own.
pub const PROXY_ERROR: HeaderName = HeaderName::from_static("trellis-proxy-error");

/// What the text of every answer a sidecar writes itself begins with (its
/// body, or a gRPC answer's `grpc-message`), beside [`PROXY_ERROR`]: a
/// person reading only the body tells the sidecar's answer from the app's.
pub const SIDECAR_PREFIX: &str = "trellis: ";

/// The fixed tokens a sidecar's own answer names in [`PROXY_ERROR`]: every
/// one it writes is here, and [`ALL`](token::ALL) lists them, as the
/// README does for users.
pub mod token {
    /// Policy refused the request (403), or an outbound call to a
    /// destination outside the mesh under `deny` (403), or the admin port
    /// refused the caller (403).
    pub const DENIED: &str = "denied";
    /// A rate limit refused the request (429).
    pub const RATE_LIMITED: &str = "rate_limited";
    /// The request, or its head, is malformed (400, 414, 431).
    pub const INVALID_REQUEST: &str = "invalid_request";
    /// An HTTP/1 request head begun and not whole in time (408).
    pub const REQUEST_TIMEOUT: &str = "request_timeout";
    /// HTTP/2 request headers over the limit (431).
    pub const HEADERS_TOO_LARGE: &str = "headers_too_large";
    /// A `CONNECT` request, which no app behind a sidecar serves (501).
    pub const CONNECT_REFUSED: &str = "connect_refused";
    /// The app could not be reached, or failed the request (502).
    pub const APP_UNREACHABLE: &str = "app_unreachable";
    /// The app's answer does not parse (502).
    pub const INVALID_APP_ANSWER: &str = "invalid_app_answer";
    /// An HTTP/2 request to an app that speaks HTTP/1 only (502).
    pub const APP_NOT_HTTP2: &str = "app_not_http2";
    /// Plaintext sent to the inbound port (400).
    pub const NOT_TLS: &str = "not_tls";
    /// A path the admin port serves nothing at (404).
    pub const NOT_FOUND: &str = "not_found";
    /// A method the admin port does not serve (405).
    pub const METHOD_NOT_ALLOWED: &str = "method_not_allowed";
    /// `/ready` while the sidecar is not ready or drains, or a transparent
    /// outbound call before its first policy snapshot (503).
    pub const NOT_READY: &str = "not_ready";
    /// An app probe the app failed (503).
    pub const PROBE_FAILED: &str = "probe_failed";
    /// An outbound call to a service with no ready backend (503).
    pub const NO_BACKEND: &str = "no_backend";
    /// An outbound call under `deny` to a service with no ready backend in
    /// the mesh (503).
    pub const NO_MESH_BACKEND: &str = "no_mesh_backend";
    /// An outbound call while this sidecar has no certificate yet, or the
    /// one it had expired unrenewed (503).
    pub const NO_LOCAL_CERTIFICATE: &str = "no_local_certificate";
    /// An outbound call whose server's sidecar has no certificate yet (503).
    pub const PEER_NOT_READY: &str = "peer_not_ready";
    /// An outbound call whose remote could not be reached (502).
    pub const CONNECT_FAILED: &str = "connect_failed";
    /// An outbound call whose TLS handshake failed (502).
    pub const HANDSHAKE_FAILED: &str = "handshake_failed";
    /// An outbound call whose TLS handshake was not answered in time (502).
    pub const HANDSHAKE_TIMEOUT: &str = "handshake_timeout";
    /// An outbound call whose first bytes could not be sent on (502).
    pub const WRITE_FAILED: &str = "write_failed";
    /// An outbound call whose server's identity is revoked (502).
    pub const REVOKED: &str = "revoked";
    /// An outbound call the server's sidecar refused, or ended before any
    /// answer, after the handshake (502).
    pub const PEER_REFUSED: &str = "peer_refused";
    /// An outbound call that would come back to this sidecar (502).
    pub const LOOP: &str = "loop";
    /// A connection to the transparent outbound port that iptables did
    /// not redirect there, so it names no destination (421).
    pub const NOT_REDIRECTED: &str = "not_redirected";

    /// Every token, each once.
    pub const ALL: &[&str] = &[
        DENIED,
        RATE_LIMITED,
        INVALID_REQUEST,
        REQUEST_TIMEOUT,
        HEADERS_TOO_LARGE,
        CONNECT_REFUSED,
        APP_UNREACHABLE,
        INVALID_APP_ANSWER,
        APP_NOT_HTTP2,
        NOT_TLS,
        NOT_FOUND,
        METHOD_NOT_ALLOWED,
        NOT_READY,
        PROBE_FAILED,
        NO_BACKEND,
        NO_MESH_BACKEND,
        NO_LOCAL_CERTIFICATE,
        PEER_NOT_READY,
        CONNECT_FAILED,
        HANDSHAKE_FAILED,
        HANDSHAKE_TIMEOUT,
        WRITE_FAILED,
        REVOKED,
        PEER_REFUSED,
        LOOP,
        NOT_REDIRECTED,
    ];
}

/// The text body of an answer: `message` and a newline, after
/// [`SIDECAR_PREFIX`] for a sidecar's (`sidecar`).
pub fn body_text(message: &[u8], sidecar: bool) -> Vec<u8> {
    let prefix = if sidecar { SIDECAR_PREFIX } else { "" };
    let mut text = Vec::with_capacity(prefix.len() + message.len() + 1);
    text.extend_from_slice(prefix.as_bytes());
    text.extend_from_slice(message);
    text.push(b'\n');
    text
}

/// How long an answered connection goes on being read from (and what it
/// sends dropped) after its answer, and how much of it, at most: a client
/// still sending (the rest of a request, the body of a call) whose
/// connection is closed with bytes unread gets a reset, which may throw the
/// answer away before the client reads it. Bounded both ways, so a client
/// cannot hold the connection by sending.
pub const ANSWER_LINGER: Duration = Duration::from_secs(1);
pub const ANSWER_LINGER_BYTES: usize = 256 * 1024;

/// The most a client's HTTP/2 request head may take in an answered
/// connection, and the flow-control window it is given: nothing of its
/// request is read but its head.
const ANSWER_H2_HEADERS: u32 = 16 * 1024;
const ANSWER_H2_WINDOW: u32 = 64 * 1024;

/// The most of an HTTP/1.x request head read before it is answered.
const ANSWER_H1_HEAD: usize = 16 * 1024;

/// Answers the first request of a client speaking `version` on `io`
/// (whatever it sent first still to be read from it) with `refusal`, then
/// closes it: HTTP/1.x gets `refusal.status` with the message as a text
/// body and `connection: close` once its request head has come (or 16 KiB
/// of it); HTTP/2 gets the server preface and, for its
/// first request, the same answer ([`local_answer`]; a gRPC call gets
/// `grpc-status` and `grpc-message` in a trailers-only response), then
/// GOAWAY naming that stream as the last. An answered connection is
/// then read from for [`ANSWER_LINGER`] or [`ANSWER_LINGER_BYTES`],
/// whichever comes first, or until the client closes it ([`linger`]).
///
/// `patience` is one deadline for the whole answer: the request, the
/// answer and the shutdown of the write side get until then, and what is
/// left undone at it is given up, but for the one step the deadline itself
/// calls for: an HTTP/2 client that sent no request by then has had the server
/// preface already, and is closed as an HTTP/2 server closes a connection
/// it will not serve, with a GOAWAY of last stream 0 and `REFUSED_STREAM`
/// (nothing was processed; or, when the request may have reached a server
/// already, [`Refusal::request_may_have_gone`], naming every stream as
/// possibly processed, with `INTERNAL_ERROR`), the message as its debug data (after
/// [`SIDECAR_PREFIX`] for a sidecar's, as its answer's text); that GOAWAY and
/// the shutdown after it get [`ANSWER_LINGER`] more, and the connection is
/// then read from as an answered one is. A client that stopped reading may
/// hold a frame of the server preface written only in part: no GOAWAY can
/// follow that, and the write side is only shut down.
///
/// An HTTP/1.x client whose request head has not come by the deadline (or
/// that ended or failed first) is left unanswered, its write side still
/// open: ended with a FIN, it would take the close for its server's
/// orderly one, so the caller resets it instead. [`Answered::Nothing`]
/// says so: not one byte was written to it. Once a byte was written (an
/// HTTP/2 client's server preface is one), the write side is shut down,
/// once, and no reset may throw the answer away ([`Answered::Written`]);
/// an HTTP/2 client that ended before any request is shut down so too,
/// with no GOAWAY, and not read from.
#[must_use = "a client left unanswered is to be reset, not ended with a FIN"]
pub async fn answer<S>(
    io: &mut S,
    version: Version,
    refusal: &Refusal<'_>,
    patience: Duration,
) -> Answered
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let deadline = tokio::time::Instant::now() + patience;
    let mut buf = BytesMut::new();
    let mut io = Writing {
        io,
        wrote: false,
        shut: false,
        framing: Framing::default(),
    };
    // Whether to linger, and by when the write side is to be shut down.
    let (answered, close_by) = match version {
        Version::Http1 => {
            let answering = async {
                let answered = read_h1_head(&mut io, &mut buf).await;
                if answered {
                    let _ = io.write_all(&h1_answer(refusal)).await;
                }
                answered
            };
            let answered = tokio::time::timeout_at(deadline, answering).await == Ok(true);
            (answered, deadline)
        }
        Version::Http2 => match answer_first_h2_request(&mut io, refusal, deadline).await {
            H2Request::Answered => (true, deadline),
            H2Request::Ended => (false, deadline),
            H2Request::NoRequest => {
                // The server preface is out (unless writing it failed, and
                // this fails too): the GOAWAY alone follows it. A few dozen
                // bytes, it goes at once unless the client stopped reading.
                let close_by = tokio::time::Instant::now() + ANSWER_LINGER;
                let sidecar;
                let says = match refusal.proxy_error {
                    Some(_) => {
                        sidecar = format!("{SIDECAR_PREFIX}{}", refusal.message);
                        &sidecar
                    }
                    None => refusal.message,
                };
                // A frame the HTTP/2 server had written only part of when
                // it was dropped (the client not reading) cannot be
                // finished: a GOAWAY after it would be read as the rest of
                // that frame, so the write side is only shut down.
                if !io.framing.between_frames() {
                    (false, close_by)
                } else {
                    let frames = match refusal.request_may_have_gone {
                        false => goaway(H2_REFUSED_STREAM, says),
                        true => goaway_after(H2_ANY_STREAM, H2_INTERNAL_ERROR, says),
                    };
                    let frames = match io.wrote {
                        true => &frames[EMPTY_SETTINGS.len()..],
                        false => &frames[..],
                    };
                    let sent = tokio::time::timeout_at(close_by, io.write_all(frames)).await;
                    (matches!(sent, Ok(Ok(()))), close_by)
                }
            }
        },
    };
    // Once, and only after a byte: the HTTP/2 server's graceful close shut
    // the write side down itself.
    let shut = match io.wrote && !io.shut {
        true => matches!(
            tokio::time::timeout_at(close_by, io.shutdown()).await,
            Ok(Ok(()))
        ),
        false => io.shut,
    };
    if answered && shut {
        linger(&mut io, &mut buf, ANSWER_LINGER, ANSWER_LINGER_BYTES).await;
    }
    match io.wrote {
        true => Answered::Written,
        false => Answered::Nothing,
    }
}

/// What [`answer`] did to a refused connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answered {
    /// At least a byte was written: an HTTP/1.x answer, or an HTTP/2 server
    /// preface, followed by the answer to the first request and GOAWAY
    /// naming it as the last stream, or by GOAWAY with last stream 0 and
    /// `REFUSED_STREAM` when no request came in time (every stream and
    /// `INTERNAL_ERROR` when it may have gone to a server), or by nothing when
    /// the client ended first. The write side was then shut down, unless
    /// that could not be done in time (a client that stopped reading).
    Written,
    /// Nothing was written, and the write side is still open: the client
    /// sent no request in time, or ended first (an HTTP/2 client has had
    /// the server preface by then, unless writing it failed). Its caller
    /// resets it.
    Nothing,
}

/// A refused connection as [`answer`] writes to it, noting whether any
/// byte was written, whether the write side was shut down, and where the
/// bytes written end in HTTP/2 framing.
struct Writing<'a, S> {
    io: &'a mut S,
    wrote: bool,
    shut: bool,
    framing: Framing,
}

/// Where the bytes written to an HTTP/2 client end: within a frame's
/// 9-byte head (how much of it, and the length it gives so far) or its
/// payload (how much of it is still owed), or between frames.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Framing {
    head: usize,
    length: usize,
    payload_left: usize,
}

impl Framing {
    /// Notes `written`, the next bytes that went out.
    fn wrote(&mut self, mut written: &[u8]) {
        while let Some((&byte, rest)) = written.split_first() {
            if self.payload_left > 0 {
                let n = self.payload_left.min(written.len());
                self.payload_left -= n;
                written = &written[n..];
                continue;
            }
            if self.head < 3 {
                self.length = self.length << 8 | usize::from(byte);
            }
            self.head += 1;
            if self.head == 9 {
                self.payload_left = self.length;
                self.head = 0;
                self.length = 0;
            }
            written = rest;
        }
    }

    /// Whether the bytes written end a frame (or none was written).
    fn between_frames(&self) -> bool {
        self.head == 0 && self.payload_left == 0
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Writing<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Writing<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut *self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = written {
            self.wrote |= n > 0;
            self.framing.wrote(&buf[..n]);
        }
        written
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut *self.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = written {
            self.wrote |= n > 0;
            let mut left = n;
            for buf in bufs {
                if left == 0 {
                    break;
                }
                let taken = left.min(buf.len());
                self.framing.wrote(&buf[..taken]);
                left -= taken;
            }
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let shut = Pin::new(&mut *self.io).poll_shutdown(cx);
        if let Poll::Ready(Ok(())) = shut {
            self.shut = true;
        }
        shut
    }
}

/// Reads `io` into `buf` until a request head has ended, or
/// [`ANSWER_H1_HEAD`] of it has come: whether it did, before the client
/// closed or failed.
async fn read_h1_head<S: AsyncRead + Unpin>(io: &mut S, buf: &mut BytesMut) -> bool {
    buf.reserve(1024);
    loop {
        let ended =
            buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n");
        if ended || buf.len() >= ANSWER_H1_HEAD {
            return true;
        }
        match io.read_buf(buf).await {
            Ok(0) | Err(_) => return false,
            Ok(_) => {}
        }
    }
}

/// `refusal` as an HTTP/1.1 answer that closes the connection.
fn h1_answer(refusal: &Refusal<'_>) -> Vec<u8> {
    let proxy_error = match refusal.proxy_error {
        Some(reason) => format!("{PROXY_ERROR}: {reason}\r\n"),
        None => String::new(),
    };
    let body = body_text(refusal.message.as_bytes(), refusal.proxy_error.is_some());
    let head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\n{proxy_error}\
         content-length: {}\r\nconnection: close\r\n\r\n",
        refusal.status.as_u16(),
        refusal.status.canonical_reason().unwrap_or(""),
        body.len()
    );
    let mut text = head.into_bytes();
    text.extend_from_slice(&body);
    text
}

/// How [`answer_first_h2_request`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum H2Request {
    /// The first request came and was answered (the graceful close over,
    /// or given up at the deadline).
    Answered,
    /// The client ended or failed first, with no request.
    Ended,
    /// No request came by the deadline.
    NoRequest,
}

/// Serves `io` as HTTP/2 until its first request has been answered with
/// `refusal`, then shuts it down gracefully: GOAWAY, the last stream being
/// that request's, once its answer is sent. Nothing is read past what the
/// request's head needs; a head over [`ANSWER_H2_HEADERS`] is refused by
/// the HTTP/2 server itself. Given up at `deadline`, with or without a
/// request.
async fn answer_first_h2_request<S>(
    io: S,
    refusal: &Refusal<'_>,
    deadline: tokio::time::Instant,
) -> H2Request
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let answered = Notify::new();
    let message = Bytes::copy_from_slice(refusal.message.as_bytes());
    let service = hyper::service::service_fn(|req: Request<Incoming>| {
        answered.notify_one();
        let response = local_answer(
            is_grpc(&req),
            refusal.status,
            refusal.grpc_code,
            refusal.proxy_error,
            message.clone(),
        );
        std::future::ready(Ok::<_, Infallible>(response))
    });
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_concurrent_streams(1)
        .max_header_list_size(ANSWER_H2_HEADERS)
        .initial_stream_window_size(ANSWER_H2_WINDOW)
        .initial_connection_window_size(ANSWER_H2_WINDOW)
        .serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        // A request answered as the client closed is answered all the same.
        biased;
        () = answered.notified() => conn.as_mut().graceful_shutdown(),
        _ = conn.as_mut() => return H2Request::Ended,
        () = tokio::time::sleep_until(deadline) => return H2Request::NoRequest,
    }
    let _ = tokio::time::timeout_at(deadline, conn).await;
    H2Request::Answered
}

/// After an answer that closes a connection, its write side shut down:
/// reads what the client still sends, into `buf`, dropping it, until the
/// client closes its end, or for `within` or `most` bytes, whichever comes
/// first.
pub async fn linger<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    within: Duration,
    most: usize,
) {
    let mut left = most;
    let discard = async {
        buf.clear();
        if buf.capacity() < 4096 {
            buf.reserve(4096);
        }
        while left > 0 {
            match io.read_buf(buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left = left.saturating_sub(n),
            }
            buf.clear();
        }
    };
    let _ = tokio::time::timeout(within, discard).await;
}

/// gRPC status codes a refusal answers with.
pub const GRPC_INVALID_ARGUMENT: u16 = 3;
pub const GRPC_PERMISSION_DENIED: u16 = 7;
pub const GRPC_RESOURCE_EXHAUSTED: u16 = 8;
pub const GRPC_UNAVAILABLE: u16 = 14;

/// Whether the request is gRPC (its answers then carry `grpc-status`).
pub fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// An answer written by Trellis itself: `status` with `message` and a
/// newline as a text body, or for gRPC HTTP 200 with `grpc-status:
/// grpc_code` and `grpc-message: message` in a trailers-only response. A
/// sidecar's answer names `proxy_error` in [`PROXY_ERROR`], and its text
/// begins with [`SIDECAR_PREFIX`].
pub fn local_answer(
    grpc: bool,
    status: StatusCode,
    grpc_code: u16,
    proxy_error: Option<&'static str>,
    message: Bytes,
) -> Response<Full<Bytes>> {
    let (body, grpc_message) = if grpc {
        let message = match proxy_error {
            Some(_) => Bytes::from([SIDECAR_PREFIX.as_bytes(), &message].concat()),
            None => message,
        };
        (Bytes::new(), grpc_message_value(message))
    } else {
        (body_text(&message, proxy_error.is_some()).into(), None)
    };
    respond(grpc, status, grpc_code, proxy_error, body, grpc_message)
}

/// The text of a sidecar's answer given many times over (a denial by one
/// rule), built once: its body and its `grpc-message`, each starting with
/// [`SIDECAR_PREFIX`], so that answering with it ([`prepared_answer`])
/// copies and allocates nothing for the text.
#[derive(Debug, Clone)]
pub struct AnswerText {
    body: Bytes,
    grpc_message: Option<HeaderValue>,
}

impl AnswerText {
    /// The text of a sidecar's answer with `message` (after `trellis: `).
    pub fn new(message: &str) -> Self {
        let text = [SIDECAR_PREFIX.as_bytes(), message.as_bytes()].concat();
        Self {
            body: body_text(message.as_bytes(), true).into(),
            grpc_message: grpc_message_value(text.into()),
        }
    }

    /// The text body of an HTTP answer: the message after `trellis: `, and
    /// a newline.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// The `grpc-message` of a gRPC answer, percent-encoded; `None` for a
    /// message no header value can hold.
    pub fn grpc_message(&self) -> Option<&HeaderValue> {
        self.grpc_message.as_ref()
    }
}

/// [`local_answer`] of a sidecar (naming `proxy_error`) whose text was
/// built before: the answer shares it.
pub fn prepared_answer(
    grpc: bool,
    status: StatusCode,
    grpc_code: u16,
    proxy_error: &'static str,
    text: &AnswerText,
) -> Response<Full<Bytes>> {
    let (body, grpc_message) = match grpc {
        true => (Bytes::new(), text.grpc_message.clone()),
        false => (text.body.clone(), None),
    };
    respond(
        grpc,
        status,
        grpc_code,
        Some(proxy_error),
        body,
        grpc_message,
    )
}

/// The answer of [`local_answer`], its text made: `body` for HTTP, or
/// `grpc_message` for gRPC.
fn respond(
    grpc: bool,
    status: StatusCode,
    grpc_code: u16,
    proxy_error: Option<&'static str>,
    body: Bytes,
    grpc_message: Option<HeaderValue>,
) -> Response<Full<Bytes>> {
    let mut response = Response::builder();
    if grpc {
        response = response
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/grpc")
            .header("grpc-status", grpc_code);
        if let Some(value) = grpc_message {
            response = response.header("grpc-message", value);
        }
    } else {
        response = response
            .status(status)
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8");
    }
    if let Some(reason) = proxy_error {
        response = response.header(PROXY_ERROR, HeaderValue::from_static(reason));
    }
    response
        .body(Full::new(body))
        .expect("static headers are valid")
}

/// [`grpc_message`] as a header value; `None` for one no header value can
/// hold (none after encoding, which leaves printable ASCII only).
fn grpc_message_value(message: Bytes) -> Option<HeaderValue> {
    HeaderValue::from_maybe_shared(grpc_message(message)).ok()
}

/// `message` as a `grpc-message` value: percent-encoded, as gRPC clients
/// decode it, where it holds a `%` or a byte outside printable ASCII (a
/// 400 naming an escape such as `%2F` would otherwise be shown decoded).
/// Left as it is, with no copy, when nothing needs encoding.
fn grpc_message(message: Bytes) -> Bytes {
    let plain = |b: &u8| (0x20..=0x7e).contains(b) && *b != b'%';
    if message.iter().all(plain) {
        return message;
    }
    let mut encoded = Vec::with_capacity(message.len() + 16);
    for b in message.iter() {
        if plain(b) {
            encoded.push(*b);
        } else {
            const HEX: &[u8; 16] = b"0123456789ABCDEF";
            encoded.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
        }
    }
    encoded.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_is_told_from_tls_by_its_first_bytes() {
        assert_eq!(
            plaintext_version(b"GET / HTTP/1.1\r\n"),
            Some(Version::Http1)
        );
        assert_eq!(plaintext_version(b"POST"), Some(Version::Http1));
        assert_eq!(plaintext_version(b"PUT /x"), Some(Version::Http1));
        assert_eq!(plaintext_version(H2_PREFACE), Some(Version::Http2));
        assert_eq!(plaintext_version(b"PRI * HT"), Some(Version::Http2));
        // A ClientHello, and bytes nobody typed, are not plaintext HTTP.
        assert_eq!(plaintext_version(&[0x16, 3, 1, 0, 200]), None);
        assert_eq!(plaintext_version(&[0, 1, 2]), None);
        assert_eq!(plaintext_version(b""), None);
    }

    /// Only the start of the HTTP/2 preface, too short to be told from
    /// `POST` or `PUT`, is peeked at again.
    #[test]
    fn only_the_start_of_the_preface_is_undecided() {
        assert!(undecided(b"P"));
        assert!(undecided(b"PR"));
        for told in [&b"PRI"[..], b"PO", b"G", b"", &[0x16, 3]] {
            assert!(!undecided(told), "{told:?}");
        }
    }

    /// A client speaking HTTP/2 with prior knowledge whose first segment
    /// is only `P` (one that writes as it goes) is answered in HTTP/2 all
    /// the same: the server preface, its request answered with the
    /// message, and GOAWAY. Taken for HTTP/1 it would read an HTTP/1.1
    /// answer where it expects frames.
    #[tokio::test]
    async fn a_preface_cut_after_its_first_byte_is_answered_in_http2() {
        const SAYS: &str = "this port speaks only TLS";
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            refuse_plaintext(tcp, SAYS, Duration::from_secs(10), || {}).await
        });

        let mut client = TcpStream::connect(addr).await.unwrap();
        client.set_nodelay(true).unwrap();
        client.write_all(&H2_PREFACE[..1]).await.unwrap();
        // The rest once the sidecar has had the time to peek at the `P`.
        tokio::time::sleep(Duration::from_millis(200)).await;
        client.write_all(&H2_PREFACE[1..]).await.unwrap();
        // An empty SETTINGS, then HEADERS opening and ending stream 1: `GET
        // http /`, as HPACK's static table (2, 6, 4) names them.
        client
            .write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0])
            .await
            .unwrap();
        let get = [0, 0, 3, 1, 0x5, 0, 0, 0, 1, 0x82, 0x86, 0x84];
        client.write_all(&get).await.unwrap();

        let frames = h2_frames(&mut client).await;
        let kinds: Vec<u8> = frames.iter().map(|(kind, _)| *kind).collect();
        const DATA: u8 = 0x0;
        const HEADERS: u8 = 0x1;
        const SETTINGS: u8 = 0x4;
        const GOAWAY: u8 = 0x7;
        assert_eq!(kinds.first(), Some(&SETTINGS), "{frames:?}");
        assert!(kinds.contains(&GOAWAY), "{frames:?}");
        // `:status 400`, index 12 of the static table.
        let head = frames.iter().find(|(kind, _)| *kind == HEADERS);
        assert_eq!(head.map(|(_, block)| block[0]), Some(0x8c), "{frames:?}");
        let body: Vec<u8> = frames
            .iter()
            .filter(|(kind, _)| *kind == DATA)
            .flat_map(|(_, data)| data.iter().copied())
            .collect();
        assert_eq!(body, format!("{SAYS}\n").as_bytes(), "{frames:?}");
        assert!(
            server.await.unwrap().is_none(),
            "the connection was not answered"
        );
    }

    /// A plaintext client that sends no whole request head in time, or
    /// ends its side mid-head, is reset, not ended with a FIN it would
    /// take for its server's orderly close after an answer it never got;
    /// one whose head comes is answered, and ended with a FIN.
    #[tokio::test]
    async fn a_plaintext_client_with_no_whole_head_is_reset() {
        async fn how_it_ends(sends: &[u8], half_close: bool) -> (&'static str, Vec<u8>) {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let server = tokio::spawn(async move {
                let (tcp, _) = listener.accept().await.unwrap();
                let patience = Duration::from_millis(300);
                refuse_plaintext(tcp, "speaks only TLS", patience, || {}).await
            });
            let mut client = TcpStream::connect(addr).await.unwrap();
            client.write_all(sends).await.unwrap();
            if half_close {
                client.shutdown().await.unwrap();
            }
            assert!(server.await.unwrap().is_none(), "plaintext was not seen");
            let mut got = Vec::new();
            match client.read_to_end(&mut got).await {
                Ok(_) => ("fin", got),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => ("reset", got),
                Err(e) => panic!("reading: {e}"),
            }
        }
        assert_eq!(how_it_ends(b"GET / HT", false).await, ("reset", vec![]));
        assert_eq!(how_it_ends(b"GET / HT", true).await, ("reset", vec![]));
        let (end, answer) = how_it_ends(b"GET / HTTP/1.1\r\n\r\n", true).await;
        assert_eq!(end, "fin");
        let answer = String::from_utf8(answer).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{answer}"
        );
    }

    /// The frames of a refusal to an HTTP/2 client that sent no request:
    /// the server preface, then GOAWAY with last stream 0,
    /// `REFUSED_STREAM` and `says` as debug data, and nothing else.
    #[track_caller]
    fn assert_goaway_alone(frames: &[(u8, Vec<u8>)], says: &str) {
        const SETTINGS: u8 = 0x4;
        const GOAWAY: u8 = 0x7;
        let mut goaway = vec![0, 0, 0, 0];
        goaway.extend_from_slice(&H2_REFUSED_STREAM.to_be_bytes());
        goaway.extend_from_slice(says.as_bytes());
        const WINDOW_UPDATE: u8 = 0x8;
        let kinds: Vec<u8> = frames.iter().map(|(kind, _)| *kind).collect();
        assert_eq!(kinds.first(), Some(&SETTINGS), "{frames:?}");
        assert_eq!(frames.last(), Some(&(GOAWAY, goaway)), "{frames:?}");
        // Before it, the server's SETTINGS and its acknowledgement of the
        // client's, perhaps a window; no answer (HEADERS, DATA).
        let before = &kinds[..kinds.len() - 1];
        assert!(
            before.iter().all(|k| [SETTINGS, WINDOW_UPDATE].contains(k)),
            "{frames:?}"
        );
    }

    /// An HTTP/2 client that sent its preface and no request within the
    /// patience has had the server preface, and is closed as an HTTP/2
    /// server closes a connection it will not serve: GOAWAY, last stream
    /// 0 and `REFUSED_STREAM`, the message as debug data (a sidecar's
    /// after `trellis: `), then a FIN, not a bare FIN after the SETTINGS,
    /// which says nothing of why.
    #[tokio::test]
    async fn an_http2_client_that_sends_no_request_in_time_gets_a_goaway() {
        const SAYS: &str = "outbound call refused";
        const SIDECAR_SAYS: &str = "trellis: outbound call refused";
        let patience = Duration::from_millis(300);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let refusal = Refusal {
                status: StatusCode::BAD_GATEWAY,
                grpc_code: GRPC_UNAVAILABLE,
                message: SAYS,
                proxy_error: Some(token::CONNECT_FAILED),
                request_may_have_gone: false,
            };
            answer(&mut tcp, Version::Http2, &refusal, patience).await
        });

        let started = tokio::time::Instant::now();
        let (client, frames, end) = preface_and_no_request(addr).await;
        assert!(started.elapsed() >= patience, "{:?}", started.elapsed());
        assert_goaway_alone(&frames, SIDECAR_SAYS);
        assert_eq!(end, "fin", "{frames:?}");
        drop(client);
        assert_eq!(server.await.unwrap(), Answered::Written);
    }

    /// Plaintext HTTP/2 sent to a TLS port, the preface and no request, is
    /// refused alike, with the GOAWAY and a FIN: the server preface went
    /// out, so the client is not reset as one left unanswered is.
    #[tokio::test]
    async fn a_plaintext_http2_client_with_no_request_gets_a_goaway_not_a_reset() {
        const SAYS: &str = "this port speaks only TLS";
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let patience = Duration::from_millis(300);
            refuse_plaintext(tcp, SAYS, patience, || {}).await
        });

        let (client, frames, end) = preface_and_no_request(addr).await;
        assert_goaway_alone(&frames, SAYS);
        assert_eq!(end, "fin", "{frames:?}");
        drop(client);
        assert!(server.await.unwrap().is_none(), "plaintext was not seen");
    }

    /// An HTTP/2 client that reads nothing until the deadline has had only
    /// part of the server's SETTINGS (all its connection holds): a GOAWAY
    /// written after it would be read as the rest of that frame, so the
    /// client gets the part and then the end, and nothing else.
    #[tokio::test]
    async fn no_goaway_follows_a_frame_written_in_part() {
        // Less than the HTTP/2 server's SETTINGS, more than a frame head.
        const HOLDS: usize = 12;
        let patience = Duration::from_millis(300);
        let (mut server, mut client) = tokio::io::duplex(HOLDS);
        let answering = tokio::spawn(async move {
            let refusal = Refusal {
                status: StatusCode::BAD_GATEWAY,
                grpc_code: GRPC_UNAVAILABLE,
                message: "outbound call refused",
                proxy_error: Some(token::CONNECT_FAILED),
                request_may_have_gone: false,
            };
            answer(&mut server, Version::Http2, &refusal, patience).await
        });
        let (mut reading, mut writing) = tokio::io::split(&mut client);
        let sending = async {
            let _ = writing.write_all(H2_PREFACE).await;
            let _ = writing.write_all(&EMPTY_SETTINGS).await;
            std::future::pending::<()>().await
        };
        let read = async {
            tokio::time::sleep(patience + Duration::from_millis(200)).await;
            let mut read = Vec::new();
            reading.read_to_end(&mut read).await.map(|_| read)
        };
        let read = tokio::select! {
            () = sending => unreachable!(),
            read = tokio::time::timeout(Duration::from_secs(5), read) => read,
        };
        let read = read.expect("the connection was not closed").unwrap();
        assert_eq!(read.len(), HOLDS, "{read:?}");
        const SETTINGS: u8 = 0x4;
        assert_eq!(read[3], SETTINGS, "{read:?}");
        let length = u32::from_be_bytes([0, read[0], read[1], read[2]]) as usize;
        assert!(9 + length > HOLDS, "the SETTINGS fit: {read:?}");
        assert_eq!(answering.await.unwrap(), Answered::Written);
    }

    /// A message of any length makes one GOAWAY a client can take: its
    /// debug data is the message's start, cut between characters.
    #[test]
    fn a_goaway_carries_at_most_the_start_of_a_long_message() {
        let message = "\u{e9}".repeat(20 * 1024);
        let frames = goaway(H2_REFUSED_STREAM, &message);
        let goaway = &frames[EMPTY_SETTINGS.len()..];
        let length = u32::from_be_bytes([0, goaway[0], goaway[1], goaway[2]]) as usize;
        assert_eq!(goaway.len(), 9 + length);
        let debug = std::str::from_utf8(&goaway[9 + 8..]).expect("cut inside a character");
        assert!(debug.len() <= GOAWAY_DEBUG_MOST, "{}", debug.len());
        assert!(debug.len() > GOAWAY_DEBUG_MOST - 2, "{}", debug.len());
        assert!(message.starts_with(debug));
    }

    #[test]
    fn framing_follows_frames_however_they_are_cut() {
        let frames = goaway(H2_REFUSED_STREAM, "refused");
        for cut in 0..=frames.len() {
            let mut framing = Framing::default();
            framing.wrote(&frames[..cut]);
            let between = [0, EMPTY_SETTINGS.len(), frames.len()].contains(&cut);
            assert_eq!(framing.between_frames(), between, "cut at {cut}");
            framing.wrote(&frames[cut..]);
            assert!(framing.between_frames(), "cut at {cut}");
        }
    }

    /// The frames a server sends, type and payload, until it closes (or
    /// sends what is not a frame); its PINGs are acknowledged, as a
    /// client's HTTP/2 library does.
    async fn h2_frames(tcp: &mut TcpStream) -> Vec<(u8, Vec<u8>)> {
        h2_frames_and_end(tcp).await.0
    }

    /// An HTTP/2 client of `addr` that sends its preface and no request:
    /// the connection, the frames it was sent and how it ended
    /// ([`h2_frames_and_end`]), within 5 s.
    async fn preface_and_no_request(
        addr: std::net::SocketAddr,
    ) -> (TcpStream, Vec<(u8, Vec<u8>)>, String) {
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(H2_PREFACE).await.unwrap();
        client.write_all(&EMPTY_SETTINGS).await.unwrap();
        let (frames, end) =
            tokio::time::timeout(Duration::from_secs(5), h2_frames_and_end(&mut client))
                .await
                .expect("the connection was not closed");
        (client, frames, end)
    }

    /// [`h2_frames`], and how the connection ended after them: `"fin"`,
    /// `"reset"`, or what else ended the reading.
    async fn h2_frames_and_end(tcp: &mut TcpStream) -> (Vec<(u8, Vec<u8>)>, String) {
        const PING: u8 = 0x6;
        const ACK: u8 = 0x1;
        let ended = |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => "fin".to_owned(),
            std::io::ErrorKind::ConnectionReset => "reset".to_owned(),
            _ => format!("reading: {e}"),
        };
        let mut frames = Vec::new();
        let mut head = [0u8; 9];
        loop {
            if let Err(e) = tcp.read_exact(&mut head).await {
                return (frames, ended(e));
            }
            let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            if length > 16 * 1024 {
                return (frames, format!("not a frame: {head:?}"));
            }
            let mut payload = vec![0; length];
            if let Err(e) = tcp.read_exact(&mut payload).await {
                return (frames, ended(e));
            }
            if head[3] == PING && head[4] & ACK == 0 {
                let mut pong = [0, 0, 8, PING, ACK, 0, 0, 0, 0].to_vec();
                pong.extend_from_slice(&payload);
                let _ = tcp.write_all(&pong).await;
            }
            frames.push((head[3], payload));
        }
    }

    #[test]
    fn a_goaway_carries_the_message_after_the_server_preface() {
        let frames = goaway(H2_ENHANCE_YOUR_CALM, "too many");
        // SETTINGS, empty.
        assert_eq!(frames[..9], [0, 0, 0, 4, 0, 0, 0, 0, 0]);
        // GOAWAY on stream 0: last stream 0, ENHANCE_YOUR_CALM, the message.
        assert_eq!(frames[9..18], [0, 0, 16, 7, 0, 0, 0, 0, 0]);
        assert_eq!(frames[18..26], [0, 0, 0, 0, 0, 0, 0, 0xb]);
        assert_eq!(&frames[26..], b"too many");
    }

    #[test]
    fn a_local_answer_is_text_or_grpc_trailers() {
        let text = local_answer(
            false,
            StatusCode::FORBIDDEN,
            GRPC_PERMISSION_DENIED,
            None,
            Bytes::from_static(b"denied"),
        );
        assert_eq!(text.status(), StatusCode::FORBIDDEN);
        assert_eq!(text.headers()["content-type"], "text/plain; charset=utf-8");
        assert!(!text.headers().contains_key(PROXY_ERROR));

        let grpc = local_answer(
            true,
            StatusCode::FORBIDDEN,
            GRPC_PERMISSION_DENIED,
            None,
            Bytes::from_static(b"denied"),
        );
        assert_eq!(grpc.status(), StatusCode::OK);
        assert_eq!(grpc.headers()["grpc-status"], "7");
        assert_eq!(grpc.headers()["grpc-message"], "denied");
    }

    /// A sidecar's own answer says so twice: in `trellis-proxy-error`, and
    /// in its text, which begins with `trellis: `; text or gRPC alike.
    #[tokio::test]
    async fn a_sidecar_answer_begins_with_trellis() {
        use http_body_util::BodyExt;

        let text = local_answer(
            false,
            StatusCode::FORBIDDEN,
            GRPC_PERMISSION_DENIED,
            Some("denied"),
            Bytes::from_static(b"denied by policy b/no-admin rule 0"),
        );
        assert_eq!(text.headers()["trellis-proxy-error"], "denied");
        let body = text.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "trellis: denied by policy b/no-admin rule 0\n");

        let grpc = local_answer(
            true,
            StatusCode::FORBIDDEN,
            GRPC_PERMISSION_DENIED,
            Some("denied"),
            Bytes::from_static(b"denied by policy b/no-admin rule 0"),
        );
        assert_eq!(grpc.headers()["trellis-proxy-error"], "denied");
        assert_eq!(
            grpc.headers()["grpc-message"],
            "trellis: denied by policy b/no-admin rule 0"
        );
    }

    /// An answer to a refused connection: a sidecar's begins with
    /// `trellis: `, the control plane's (no `trellis-proxy-error`) is its
    /// message as it is; the length is the body's.
    #[test]
    fn an_h1_answer_of_a_sidecar_begins_with_trellis() {
        let mut refusal = Refusal {
            status: StatusCode::BAD_REQUEST,
            grpc_code: GRPC_UNAVAILABLE,
            message: "not TLS",
            proxy_error: Some("not_tls"),
            request_may_have_gone: false,
        };
        let sidecar = String::from_utf8(h1_answer(&refusal)).unwrap();
        assert!(
            sidecar.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{sidecar}"
        );
        assert!(
            sidecar.contains("\r\ntrellis-proxy-error: not_tls\r\n"),
            "{sidecar}"
        );
        assert!(
            sidecar
                .ends_with("\r\ncontent-length: 17\r\nconnection: close\r\n\r\ntrellis: not TLS\n"),
            "{sidecar}"
        );

        refusal.proxy_error = None;
        let control_plane = String::from_utf8(h1_answer(&refusal)).unwrap();
        assert!(
            control_plane.ends_with("\r\ncontent-length: 8\r\nconnection: close\r\n\r\nnot TLS\n"),
            "{control_plane}"
        );
    }

    /// A message holding `%` or text outside printable ASCII reaches a gRPC
    /// client as written: tonic decodes the header it reads.
    #[test]
    fn a_grpc_message_is_percent_encoded() {
        for message in [
            "path encodes '/' as %2F: an app could read it as a separator",
            "not allowed: café",
            "plain",
        ] {
            let grpc = local_answer(
                true,
                StatusCode::BAD_REQUEST,
                3,
                None,
                Bytes::copy_from_slice(message.as_bytes()),
            );
            let status = tonic::Status::from_header_map(grpc.headers()).unwrap();
            assert_eq!(status.message(), message);
        }
    }
}
