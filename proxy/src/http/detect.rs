//! Protocol detection on a decrypted inbound stream: HTTP/2 with prior
//! knowledge, HTTP/1.x, or anything else (opaque TCP).
//!
//! Detection reads the first bytes the client sends, up to [`MAX_PEEK`] or
//! [`DETECT_TIMEOUT`], and hands them back in front of the stream
//! ([`Rewind`]), so whichever protocol serves the connection sees every
//! byte. A server-first protocol (SMTP, MySQL) sends nothing and falls to
//! opaque TCP when the timeout passes. Detection errs towards opaque: only
//! a complete HTTP/1 request line (`TOKEN SP TARGET SP HTTP/1.x`) or the
//! HTTP/2 preface count as HTTP, so a binary or line protocol that happens
//! to start with letters is never fed to an HTTP parser.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// How long a client has to send enough bytes to be recognised as HTTP.
pub const DETECT_TIMEOUT: Duration = Duration::from_millis(300);
/// At most this many bytes are read before deciding; a longer HTTP/1
/// request line is treated as opaque.
pub const MAX_PEEK: usize = 8 * 1024;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    Opaque,
}

impl Protocol {
    /// `http1`, `h2` or `tcp`, for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http1 => "http1",
            Self::Http2 => "h2",
            Self::Opaque => "tcp",
        }
    }
}

/// Reads from `io` until its protocol is known, then returns it with the
/// bytes read put back in front.
pub async fn detect<S>(mut io: S) -> io::Result<(Protocol, Rewind<S>)>
where
    S: AsyncRead + Unpin,
{
    let mut buf = BytesMut::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + DETECT_TIMEOUT;
    let protocol = loop {
        if let Some(protocol) = classify(&buf) {
            break protocol;
        }
        if buf.len() >= MAX_PEEK {
            break Protocol::Opaque;
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Ok(Ok(0)) => break Protocol::Opaque,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => break Protocol::Opaque,
        }
    };
    Ok((protocol, Rewind { prefix: buf, io }))
}

/// The protocol of a stream starting with `buf`, or `None` while more bytes
/// could change the answer.
pub fn classify(buf: &[u8]) -> Option<Protocol> {
    if buf.is_empty() {
        return None;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return (n == H2_PREFACE.len()).then_some(Protocol::Http2);
    }
    // HTTP/1: a method token, one space, then the rest of the request line.
    let method_len = buf.iter().take_while(|b| is_tchar(**b)).count();
    match buf.get(method_len) {
        None if method_len < 32 => return None,
        Some(b' ') if method_len > 0 => {}
        _ => return Some(Protocol::Opaque),
    }
    let Some(end) = buf.iter().position(|b| *b == b'\n') else {
        // Control bytes cannot be in a request line.
        let binary = buf.iter().any(|b| b.is_ascii_control() && *b != b'\r');
        return binary.then_some(Protocol::Opaque);
    };
    let line = buf[..end].strip_suffix(b"\r").unwrap_or(&buf[..end]);
    let version = line.rsplit(|b| *b == b' ').next().unwrap_or_default();
    let http1 = matches!(version, b"HTTP/1.1" | b"HTTP/1.0")
        && line.iter().filter(|b| **b == b' ').count() == 2
        && !line.iter().any(u8::is_ascii_control);
    Some(if http1 {
        Protocol::Http1
    } else {
        Protocol::Opaque
    })
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A stream with bytes already read from it put back in front.
#[derive(Debug)]
pub struct Rewind<S> {
    prefix: BytesMut,
    io: S,
}

impl<S> Rewind<S> {
    pub fn get_ref(&self) -> &S {
        &self.io
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_http1_request_lines() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(
            classify(b"POST /x?y=1 HTTP/1.0\r\nHost: a\r\n"),
            Some(Protocol::Http1)
        );
        assert_eq!(classify(b"GET /partial"), None);
        assert_eq!(classify(b"GE"), None);
    }

    #[test]
    fn recognises_the_h2_preface_only_when_complete() {
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(classify(&H2_PREFACE[..10]), None);
    }

    #[test]
    fn everything_else_is_opaque() {
        assert_eq!(classify(b"\x16\x03\x01\x02\x00"), Some(Protocol::Opaque));
        assert_eq!(classify(b"SET key value\r\n"), Some(Protocol::Opaque));
        assert_eq!(classify(b"HELLO \x00\x01"), Some(Protocol::Opaque));
        assert_eq!(classify(b" GET / HTTP/1.1\r\n"), Some(Protocol::Opaque));
    }
}
