//! Protocol detection on a plaintext stream: HTTP/2 with prior knowledge,
//! HTTP/1.x, or anything else (opaque TCP). The inbound listener runs it on
//! the decrypted stream when ALPN settled nothing; the outbound listeners
//! run it on the app's first bytes to choose the ALPN they offer.
//!
//! Detection reads the first bytes the client sends, up to [`MAX_PEEK`] or
//! [`DETECT_TIMEOUT`], and hands them back in front of the stream
//! ([`Rewind`]), so whichever protocol serves the connection sees every
//! byte. A server-first protocol (SMTP, MySQL) sends nothing and falls to
//! opaque TCP when the timeout passes (the inbound listener then waits to
//! see which side speaks first before it copies bytes: see
//! `inbound::forward`). A complete HTTP/1 request line (a method token, a
//! blank, and a line whose last word starts `HTTP/`, or `GET` and a target
//! alone, after the empty lines RFC 9112 lets a server skip; a blank is
//! whatever the most lenient server splits the line on; what comes before
//! a bare CR, a CR followed by anything but LF, reading as such a line) or
//! the HTTP/2 preface count as HTTP at once; bytes that
//! cannot start either are opaque at once, so a binary or line protocol is
//! never fed to an HTTP parser. What could still start a request when the
//! timeout or [`MAX_PEEK`] ends the wait (a token, with or without a blank
//! and more after it, or part of the preface) is served as HTTP: servers
//! accept any token as a method (`FOO /x HTTP/1.1` reaches a Go or hyper
//! handler), so passing it as bytes would let a client that pauses in its
//! request line slip past the per-request rules and hand the app requests
//! with an identity header of its own. At the end of the stream nothing
//! more can come, and only the start of a standard method is HTTP.

use std::io;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};
use trellis_core::http1::Rewind;
use trellis_core::http1::bare_cr;
pub(super) use trellis_core::http1::skip_empty_lines;
use trellis_core::refusal::H2_PREFACE;

/// How long a client has to send enough bytes to be recognised as HTTP.
pub const DETECT_TIMEOUT: Duration = Duration::from_millis(300);
/// At most this many bytes are read before deciding; a longer HTTP/1
/// request line is treated as opaque.
pub const MAX_PEEK: usize = 8 * 1024;

/// The ALPN protocol ID of HTTP/2 over TLS (RFC 9113).
pub const ALPN_H2: &[u8] = b"h2";
/// The ALPN protocol ID of HTTP/1.1 (RFC 9112).
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

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

    /// The ALPN protocol ID that announces this protocol on TLS; none for
    /// opaque TCP, which must never be mistaken for HTTP.
    pub fn alpn(self) -> Option<&'static [u8]> {
        match self {
            Self::Http1 => Some(ALPN_HTTP1),
            Self::Http2 => Some(ALPN_H2),
            Self::Opaque => None,
        }
    }

    /// The protocol a settled ALPN protocol ID names, if it is HTTP.
    pub fn from_alpn(id: &[u8]) -> Option<Self> {
        match id {
            ALPN_H2 => Some(Self::Http2),
            ALPN_HTTP1 => Some(Self::Http1),
            _ => None,
        }
    }
}

/// Reads from `io` until its protocol is known, then returns it with the
/// bytes read put back in front.
pub async fn detect<S>(io: S) -> io::Result<(Protocol, Rewind<S>)>
where
    S: AsyncRead + Unpin,
{
    detect_after(BytesMut::with_capacity(1024), io).await
}

/// [`detect`] on a stream from which `buf` was read already: the wait for
/// more starts again.
pub async fn detect_after<S>(mut buf: BytesMut, mut io: S) -> io::Result<(Protocol, Rewind<S>)>
where
    S: AsyncRead + Unpin,
{
    let deadline = tokio::time::Instant::now() + DETECT_TIMEOUT;
    let protocol = loop {
        if let Some(protocol) = classify(&buf) {
            break protocol;
        }
        if buf.len() >= MAX_PEEK {
            // Nothing but empty lines, which an HTTP server skips before
            // a request: HTTP, for the parser to refuse.
            if skip_empty_lines(&buf).is_empty() {
                break Protocol::Http1;
            }
            break classify_unfinished(&buf, false);
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Ok(Ok(0)) => break classify_unfinished(&buf, true),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => break classify_unfinished(&buf, false),
        }
    };
    Ok((protocol, Rewind::with_prefix(buf, io)))
}

/// The largest first SETTINGS frame [`h2_preface`] waits for: the
/// smallest frame size a client may send (RFC 9113, section 4.2); a larger
/// one is for the HTTP/2 server to refuse.
const MAX_FIRST_SETTINGS: usize = 16 * 1024;

/// Reads, after what `stream` holds already, until it holds the HTTP/2
/// client preface and the SETTINGS frame every client sends right after
/// it, within [`DETECT_TIMEOUT`]; `None` when they did not come in time.
/// A caller that settled `h2` by ALPN (or sent the start of the preface)
/// and then nothing would otherwise hold its connection, and the TLS
/// state of it, for ever: the HTTP/2 server waits for the preface without
/// a timeout, and pings a caller only once the preface is in. Bytes that
/// are not the preface, a first frame of another type, a larger one or
/// the end of the stream are handed on at once, for the server to refuse.
pub async fn h2_preface<S>(stream: Rewind<S>) -> io::Result<Option<Rewind<S>>>
where
    S: AsyncRead + Unpin,
{
    let (mut buf, mut io) = stream.into_parts();
    let deadline = tokio::time::Instant::now() + DETECT_TIMEOUT;
    while !h2_start_is_in(&buf) {
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Ok(Ok(0)) => break,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Ok(None),
        }
    }
    Ok(Some(Rewind::with_prefix(buf, io)))
}

/// Whether `buf` holds the start of an HTTP/2 connection (the preface
/// and a whole first SETTINGS frame), or enough to know it will never
/// hold one.
fn h2_start_is_in(buf: &[u8]) -> bool {
    const FRAME_HEADER: usize = 9;
    const SETTINGS: u8 = 0x4;
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] != H2_PREFACE[..n] {
        return true;
    }
    let frame = &buf[n..];
    if n < H2_PREFACE.len() || frame.len() < FRAME_HEADER {
        return false;
    }
    let length = u32::from_be_bytes([0, frame[0], frame[1], frame[2]]) as usize;
    frame[3] != SETTINGS || length > MAX_FIRST_SETTINGS || frame.len() >= FRAME_HEADER + length
}

/// The protocol of a stream starting with `buf`, or `None` while more bytes
/// could change the answer.
pub fn classify(buf: &[u8]) -> Option<Protocol> {
    let buf = skip_empty_lines(buf);
    if buf.is_empty() {
        return None;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return (n == H2_PREFACE.len()).then_some(Protocol::Http2);
    }
    // HTTP/1: a method token, a blank, then the rest of the request line.
    // Blanks before the method are skipped, as a server that splits the
    // line on whitespace skips them.
    let buf = skip_blanks(buf);
    let method_len = buf.iter().take_while(|b| is_tchar(**b)).count();
    match buf.get(method_len) {
        // Servers take a method of any length: a long word may still be one.
        None => return None,
        Some(&b) if method_len > 0 && is_blank(b) => {}
        _ => return Some(Protocol::Opaque),
    }
    // A CR followed by anything but LF ends the line for no server the
    // sidecar's parser agrees with (Python's splits the line on it as a
    // blank, nginx and Node refuse it): what comes before it that reads
    // as a request line is HTTP, for the parser to refuse, not bytes for
    // the app to read as a request of its own.
    let lf = buf.iter().position(|b| *b == b'\n');
    if bare_cr(&buf[..lf.unwrap_or(buf.len())]).is_some_and(|cr| request_line(&buf[..cr])) {
        return Some(Protocol::Http1);
    }
    let Some(end) = lf else {
        // Control bytes cannot be in a request line (blanks can, as
        // separators lenient servers take).
        let binary = buf.iter().any(|b| b.is_ascii_control() && !is_blank(*b));
        return binary.then_some(Protocol::Opaque);
    };
    // Whatever a lenient server could read as a request line is HTTP:
    // another version (`HTTP/1.2`), two blanks, any blank between the
    // words or after them, a control byte in the target, or `GET` and a
    // target alone (HTTP/0.9, which Python's server still takes, reading
    // the header fields after it). The sidecar's parser refuses what is
    // malformed, and none of it reaches the app as bytes, past the
    // per-request rules and with the caller's own identity header.
    Some(if request_line(&buf[..end]) {
        Protocol::Http1
    } else {
        Protocol::Opaque
    })
}

/// Whether `line` has the words of a request line: three or more, the
/// last starting `HTTP/`, or `GET` and a target alone.
fn request_line(line: &[u8]) -> bool {
    let mut words = line.split(|b| is_blank(*b)).filter(|w| !w.is_empty());
    let first = words.next().unwrap_or_default();
    let (count, last) = words.fold((1, first), |(count, _), word| (count + 1, word));
    (count >= 3 && last.starts_with(b"HTTP/")) || (count == 2 && first == b"GET")
}

/// The protocol of a stream that sent only `buf` before the wait ended
/// (timeout, end of stream or [`MAX_PEEK`]). The start of a request an
/// HTTP server would go on reading is HTTP: part of the preface, or, while
/// more may come (`ended` false), a token (any method, extension methods
/// included) alone or followed by a blank (`GE`, `FOO /adm`), or blanks
/// that may still be followed by one. A
/// client-first text protocol that pauses in the middle of a line (`ping`
/// with no line end yet) is taken for HTTP too: it cannot be told from a
/// paused extension method, and the safe mistake is the one that keeps the
/// per-request rules and the identity header; its port is declared opaque.
/// At the end of the stream (`ended`), only a standard method and a blank,
/// or part of one, is HTTP (for the parser to refuse): other text cannot
/// become a request any more and passes as bytes. Other bytes (a control
/// byte, a token followed by anything but a blank) stay opaque.
fn classify_unfinished(buf: &[u8], ended: bool) -> Protocol {
    if let Some(protocol) = classify(buf) {
        return protocol;
    }
    let start = skip_empty_lines(buf);
    if start.is_empty() {
        Protocol::Opaque
    } else if H2_PREFACE.starts_with(start) {
        Protocol::Http2
    } else {
        let start = skip_blanks(start);
        let token_len = start.iter().take_while(|b| is_tchar(**b)).count();
        let (token, rest) = start.split_at(token_len);
        let http = match rest.first() {
            None if ended => !token.is_empty() && METHODS.iter().any(|m| m.starts_with(token)),
            Some(&b) if ended && is_blank(b) => METHODS.contains(&token),
            // Blanks alone may still be followed by a method.
            None => true,
            Some(&b) => is_blank(b) && !token.is_empty(),
        };
        if http {
            Protocol::Http1
        } else {
            Protocol::Opaque
        }
    }
}

/// The methods of RFC 9110 and PATCH.
const METHODS: [&[u8]; 9] = [
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH",
];

/// `buf` after the blanks a server that splits the request line on
/// whitespace skips before the method.
fn skip_blanks(buf: &[u8]) -> &[u8] {
    let blanks = buf.iter().take_while(|b| is_blank(**b)).count();
    &buf[blanks..]
}

/// Whether `b` separates the words of a request line for the most lenient
/// server there is: Python's `http.server`, which splits the line (read as
/// Latin-1, up to its LF) on any whitespace: space, tab, CR, vertical tab,
/// form feed, the separators 0x1C to 0x1F, NEL (0x85) and no-break space
/// (0xA0).
fn is_blank(b: u8) -> bool {
    matches!(
        b,
        b' ' | b'\t' | b'\r' | 0x0b | 0x0c | 0x1c..=0x1f | 0x85 | 0xa0
    )
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_of_http2_is_the_preface_and_a_whole_settings_frame() {
        let mut start = H2_PREFACE.to_vec();
        assert!(!h2_start_is_in(&start[..10]));
        assert!(!h2_start_is_in(&start));
        // SETTINGS with one setting (6 bytes), its header alone first.
        start.extend([0, 0, 6, 4, 0, 0, 0, 0, 0]);
        assert!(!h2_start_is_in(&start));
        start.extend([0, 3, 0, 0, 0, 100]);
        assert!(h2_start_is_in(&start));
        // An empty SETTINGS is whole with its header.
        let mut empty = H2_PREFACE.to_vec();
        empty.extend([0, 0, 0, 4, 0, 0, 0, 0, 0]);
        assert!(h2_start_is_in(&empty));
        // What will never be a start goes to the server at once.
        assert!(h2_start_is_in(b"GET / HTTP/1.1\r\n"));
        let mut headers = H2_PREFACE.to_vec();
        headers.extend([0, 0, 6, 1, 4, 0, 0, 0, 1]);
        assert!(h2_start_is_in(&headers));
        let mut huge = H2_PREFACE.to_vec();
        huge.extend([0, 0x40, 1, 4, 0, 0, 0, 0, 0]);
        assert!(h2_start_is_in(&huge));
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_sends_no_preface_is_given_up_on() {
        let (caller, ours) = tokio::io::duplex(1024);
        let stream = Rewind::with_prefix(BytesMut::from(&H2_PREFACE[..5]), ours);
        assert!(h2_preface(stream).await.unwrap().is_none());
        drop(caller);
    }

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
    fn skips_the_empty_lines_an_http1_server_skips() {
        assert_eq!(
            classify(b"\r\n\r\nGET /admin HTTP/1.1\r\n"),
            Some(Protocol::Http1)
        );
        assert_eq!(classify(b"\nGET /admin HTTP/1.1\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"\r\n"), None);
    }

    #[test]
    fn what_could_still_be_http_when_the_wait_ends_is_http() {
        for ended in [false, true] {
            // A trickled request line must not pass as bytes.
            assert_eq!(classify_unfinished(b"GET /admin", ended), Protocol::Http1);
            assert_eq!(classify_unfinished(b"DELE", ended), Protocol::Http1);
            let delete = classify_unfinished(b"DELETE /admin?q=a", ended);
            assert_eq!(delete, Protocol::Http1);
            let preface = classify_unfinished(&H2_PREFACE[..16], ended);
            assert_eq!(preface, Protocol::Http2);
            // Nothing at all (server-first) and what cannot be HTTP stay opaque.
            assert_eq!(classify_unfinished(b"", ended), Protocol::Opaque);
            assert_eq!(classify_unfinished(b"\r\n", ended), Protocol::Opaque);
            assert_eq!(classify_unfinished(b"\x00\x01", ended), Protocol::Opaque);
            assert_eq!(classify_unfinished(b"{\"ping\"", ended), Protocol::Opaque);
            assert_eq!(classify_unfinished(b"ping\x01", ended), Protocol::Opaque);
            let blanks = classify_unfinished(b" \x0bGET\x0c/adm", ended);
            assert_eq!(blanks, Protocol::Http1);
        }
        // While more may come, any token may be a method (`FOO /x HTTP/1.1`
        // reaches Go and hyper handlers), and a paused line cannot be told
        // from one.
        let long = [b'A'; 40];
        for paused in [
            &b"FOO /admin"[..],
            b"FOO",
            b"FOO ",
            b"FOO\t/x",
            b"FOO\x0b/x",
            b" ",
            b"ping",
            &long,
        ] {
            assert_eq!(classify_unfinished(paused, false), Protocol::Http1);
        }
        assert_eq!(
            classify_unfinished(&[b'A'; MAX_PEEK], false),
            Protocol::Http1
        );
        // At the end of the stream, other text can no longer become one.
        for ended in [&b"FOO /admin"[..], b"ping", b"hello mesh"] {
            assert_eq!(classify_unfinished(ended, true), Protocol::Opaque);
        }
    }

    #[tokio::test]
    async fn a_request_line_trickled_past_the_timeout_is_still_http() {
        let (mut client, server) = tokio::io::duplex(1024);
        tokio::io::AsyncWriteExt::write_all(&mut client, b"GET /adm")
            .await
            .unwrap();
        // The rest never comes before the timeout.
        let (protocol, rewind) = detect(server).await.unwrap();
        assert_eq!(protocol, Protocol::Http1);
        let (prefix, _) = rewind.into_parts();
        assert_eq!(&prefix[..], b"GET /adm", "every byte read is handed back");
    }

    #[tokio::test]
    async fn a_request_line_longer_than_the_peek_is_still_http() {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let mut line = b"GET /admin?q=".to_vec();
        line.resize(MAX_PEEK + 100, b'a');
        line.extend_from_slice(b" HTTP/1.1\r\nhost: api\r\n\r\n");
        tokio::io::AsyncWriteExt::write_all(&mut client, &line)
            .await
            .unwrap();
        let (protocol, _) = detect(server).await.unwrap();
        assert_eq!(
            protocol,
            Protocol::Http1,
            "a long query must not make it bytes"
        );
    }

    #[test]
    fn a_request_line_with_a_bare_cr_is_http() {
        // At once, with or without the line's LF yet: the parser answers
        // it 400, where the app would be handed it as bytes.
        for line in [
            &b"GET / HTTP/1.1\rHost: api\r\n\r\n"[..],
            b"GET / HTTP/1.1\rx",
            b"POST /admin HTTP/1.1\r\rHost: api\r\n",
            b"GET /admin\rx: y\r\n",
        ] {
            assert_eq!(classify(line), Some(Protocol::Http1), "{line:?}");
        }
        // A CR at the end may still be followed by LF.
        assert_eq!(classify(b"GET / HTTP/1.1\r"), None);
        // Text that does not start like a request line stays opaque.
        assert_eq!(classify(b"hello\rmesh\r\n"), Some(Protocol::Opaque));
    }

    #[test]
    fn maps_alpn_ids_to_protocols_and_back() {
        assert_eq!(Protocol::from_alpn(b"h2"), Some(Protocol::Http2));
        assert_eq!(Protocol::from_alpn(b"http/1.1"), Some(Protocol::Http1));
        assert_eq!(Protocol::from_alpn(b"grpc-exp"), None);
        assert_eq!(Protocol::Opaque.alpn(), None);
        assert_eq!(Protocol::Http2.alpn(), Some(&b"h2"[..]));
    }

    #[test]
    fn what_a_lenient_server_reads_as_a_request_is_http() {
        for line in [
            &b"GET / HTTP/1.2\r\n"[..],
            b"GET /admin  HTTP/1.1\r\n",
            b"GET /admin\tHTTP/1.1\r\n",
            b"GET\t/admin\tHTTP/1.1\r\n",
            b"GET /ad\x01min HTTP/1.1\r\n",
            b"GET /admin HTTP/9\n",
            // Python's server splits the line on any whitespace, and
            // takes `GET /path` alone as HTTP/0.9.
            b" GET /admin HTTP/1.1\r\n",
            b"GET /admin HTTP/1.1 \r\n",
            b"GET\x0b/admin\x0cHTTP/1.1\r\n",
            b"GET\r/admin\rHTTP/1.1\n",
            b"GET\x1c/admin\xa0HTTP/1.1\n",
            b"GET /admin\r\n",
        ] {
            assert_eq!(
                classify(line),
                Some(Protocol::Http1),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[tokio::test]
    async fn a_peek_of_empty_lines_is_http() {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let lines = b"\r\n".repeat(MAX_PEEK);
        tokio::io::AsyncWriteExt::write_all(&mut client, &lines)
            .await
            .unwrap();
        let (protocol, rewind) = detect(server).await.unwrap();
        assert_eq!(protocol, Protocol::Http1);
        assert!(rewind.said_nothing());
    }

    #[tokio::test]
    async fn detection_goes_on_from_what_was_read() {
        let (mut client, server) = tokio::io::duplex(1024);
        tokio::io::AsyncWriteExt::write_all(&mut client, b"T /a HTTP/1.1\r\n")
            .await
            .unwrap();
        let (protocol, rewind) = detect_after(BytesMut::from(&b"\r\nGE"[..]), server)
            .await
            .unwrap();
        assert_eq!(protocol, Protocol::Http1);
        assert!(!rewind.said_nothing());
        assert_eq!(&rewind.into_parts().0[..], b"\r\nGET /a HTTP/1.1\r\n");
    }

    #[test]
    fn everything_else_is_opaque() {
        assert_eq!(classify(b"\x16\x03\x01\x02\x00"), Some(Protocol::Opaque));
        assert_eq!(classify(b"SET key value\r\n"), Some(Protocol::Opaque));
        assert_eq!(classify(b"HELLO \x00\x01"), Some(Protocol::Opaque));
        assert_eq!(classify(b"get key\r\n"), Some(Protocol::Opaque));
        assert_eq!(classify(b"GET\r\n"), Some(Protocol::Opaque));
    }
}
