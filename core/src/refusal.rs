//! Refusing in words a client can show, instead of a TLS alert or a closed
//! connection.
//!
//! [`local_answer`] is the answer Trellis writes itself (a text body, or for
//! gRPC `grpc-status` and `grpc-message`): the sidecar's request layer
//! refuses with it. [`refuse_plaintext`] and [`refuse_plaintext_briefly`]
//! tell a client that sent plaintext HTTP to a TLS port what the port is:
//! left to the TLS library, such a client gets a TLS alert, which curl shows
//! as "Received HTTP/0.9 when not allowed" and a gRPC client as a closed
//! connection or a timeout.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
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
    if seen >= 3 && H2_PREFACE.starts_with(&first[..seen]) {
        Some(Version::Http2)
    } else {
        Some(Version::Http1)
    }
}

/// Waits at most `patience` for a new connection's first bytes and peeks at
/// them: the HTTP version when they are plaintext HTTP.
async fn peek_plaintext(tcp: &TcpStream, patience: Duration) -> Option<Version> {
    let mut first = [0u8; H2_PREFACE.len()];
    match tokio::time::timeout(patience, tcp.peek(&mut first)).await {
        Ok(Ok(n)) => plaintext_version(&first[..n]),
        _ => None,
    }
}

/// Peeks at what a new connection to a TLS port sent first (waiting for it
/// at most `patience`) and, when it is plaintext HTTP, answers its first
/// request in its own protocol: `400 Bad Request` with `message` as the
/// body, or for a gRPC call `UNAVAILABLE` with `message`. Gives the
/// connection back, untouched, when it is not plaintext HTTP (or sent
/// nothing in time); `None` when it was answered.
pub async fn refuse_plaintext(
    tcp: TcpStream,
    message: &str,
    patience: Duration,
) -> Option<TcpStream> {
    let Some(version) = peek_plaintext(&tcp, patience).await else {
        return Some(tcp);
    };
    let message = Bytes::copy_from_slice(message.as_bytes());
    // Boxed: a caller's future keeps room only for the pointer.
    Box::pin(answer_first_request(tcp, version, patience, message)).await;
    None
}

/// Like [`refuse_plaintext`], without an HTTP server: an HTTP/1.x client
/// gets the same `400` written as bytes, an HTTP/2 client the server
/// preface and a GOAWAY whose debug data is `message` (which gRPC clients
/// log but do not show). For a binary that must stay small (the sidecar).
/// Returns whether it answered; the connection is then done.
pub async fn refuse_plaintext_briefly(
    tcp: &mut TcpStream,
    message: &str,
    patience: Duration,
) -> bool {
    use tokio::io::AsyncWriteExt;
    let answer = match peek_plaintext(tcp, patience).await {
        None => return false,
        Some(Version::Http1) => format!(
            "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{message}\n",
            message.len() + 1
        )
        .into_bytes(),
        Some(Version::Http2) => goaway(H2_PROTOCOL_ERROR, message),
    };
    let write = async {
        tcp.write_all(&answer).await?;
        tcp.shutdown().await
    };
    let _ = tokio::time::timeout(patience, write).await;
    true
}

/// The HTTP/2 error codes a refusal's GOAWAY carries (RFC 9113, section
/// 7): the client broke the protocol (plaintext to a TLS port, say).
pub const H2_PROTOCOL_ERROR: u32 = 0x1;
/// The client's request was not processed and may be retried elsewhere
/// (a server with no room for another connection).
pub const H2_REFUSED_STREAM: u32 = 0x7;
/// The client is asking for more than its share (too many connections).
pub const H2_ENHANCE_YOUR_CALM: u32 = 0xb;

/// An empty SETTINGS frame (the server preface), then GOAWAY: last stream
/// 0 (no stream of the connection was processed, so a client may send its
/// requests again elsewhere), `code`, `message` as debug data.
pub fn goaway(code: u32, message: &str) -> Vec<u8> {
    const SETTINGS: u8 = 0x4;
    const GOAWAY: u8 = 0x7;
    let mut frames = vec![0, 0, 0, SETTINGS, 0, 0, 0, 0, 0];
    let length = (8 + message.len()) as u32;
    frames.extend_from_slice(&length.to_be_bytes()[1..]);
    frames.extend_from_slice(&[GOAWAY, 0, 0, 0, 0, 0]);
    frames.extend_from_slice(&0u32.to_be_bytes());
    frames.extend_from_slice(&code.to_be_bytes());
    frames.extend_from_slice(message.as_bytes());
    frames
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
/// grpc_code` and `grpc-message: message` in a trailers-only response.
pub fn local_answer(
    grpc: bool,
    status: StatusCode,
    grpc_code: u16,
    message: Bytes,
) -> Response<Full<Bytes>> {
    let mut response = Response::builder();
    let body = if grpc {
        response = response
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/grpc")
            .header("grpc-status", grpc_code);
        if let Ok(value) = HeaderValue::from_maybe_shared(grpc_message(message)) {
            response = response.header("grpc-message", value);
        }
        Bytes::new()
    } else {
        response = response
            .status(status)
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8");
        let mut text = Vec::with_capacity(message.len() + 1);
        text.extend_from_slice(&message);
        text.push(b'\n');
        text.into()
    };
    response
        .body(Full::new(body))
        .expect("static headers are valid")
}

/// Serves `tcp` as `version` until its first request has been answered
/// with `400` and `message` (gRPC: `UNAVAILABLE`), then closes it
/// (HTTP/1.1 without keep-alive; HTTP/2 with GOAWAY once that stream is
/// done). Nothing is read past what hyper needs for that request; a client
/// that sends none is closed after `patience`.
async fn answer_first_request(
    tcp: TcpStream,
    version: Version,
    patience: Duration,
    message: Bytes,
) {
    let answered = Arc::new(Notify::new());
    let service = {
        let answered = answered.clone();
        hyper::service::service_fn(move |req: Request<Incoming>| {
            answered.notify_one();
            let response = local_answer(
                is_grpc(&req),
                StatusCode::BAD_REQUEST,
                GRPC_UNAVAILABLE,
                message.clone(),
            );
            std::future::ready(Ok::<_, Infallible>(response))
        })
    };
    let io = TokioIo::new(tcp);
    let served = async {
        match version {
            Version::Http2 => {
                let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .serve_connection(io, service);
                until_answered(conn, &answered).await;
            }
            Version::Http1 => {
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .keep_alive(false)
                    .serve_connection(io, service);
                until_answered(conn, &answered).await;
            }
        }
    };
    let _ = tokio::time::timeout(patience, served).await;
}

/// Serves `conn` until its first request is answered, then shuts it down
/// gracefully.
async fn until_answered<C: GracefulConnection>(conn: C, answered: &Notify) {
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        () = answered.notified() => conn.as_mut().graceful_shutdown(),
    }
    let _ = conn.await;
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

    #[test]
    fn a_goaway_carries_the_message_after_the_server_preface() {
        let frames = goaway(H2_PROTOCOL_ERROR, "TLS only");
        // SETTINGS, empty.
        assert_eq!(frames[..9], [0, 0, 0, 4, 0, 0, 0, 0, 0]);
        // GOAWAY on stream 0: last stream 0, PROTOCOL_ERROR, the message.
        assert_eq!(frames[9..18], [0, 0, 16, 7, 0, 0, 0, 0, 0]);
        assert_eq!(frames[18..26], [0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(&frames[26..], b"TLS only");
    }

    #[test]
    fn a_local_answer_is_text_or_grpc_trailers() {
        let text = local_answer(
            false,
            StatusCode::FORBIDDEN,
            GRPC_PERMISSION_DENIED,
            Bytes::from_static(b"denied"),
        );
        assert_eq!(text.status(), StatusCode::FORBIDDEN);
        assert_eq!(text.headers()["content-type"], "text/plain; charset=utf-8");

        let grpc = local_answer(
            true,
            StatusCode::FORBIDDEN,
            GRPC_PERMISSION_DENIED,
            Bytes::from_static(b"denied"),
        );
        assert_eq!(grpc.status(), StatusCode::OK);
        assert_eq!(grpc.headers()["grpc-status"], "7");
        assert_eq!(grpc.headers()["grpc-message"], "denied");
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
                Bytes::copy_from_slice(message.as_bytes()),
            );
            let status = tonic::Status::from_header_map(grpc.headers()).unwrap();
            assert_eq!(status.message(), message);
        }
    }
}
