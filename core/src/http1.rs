//! The first request head of a connection to an HTTP/1.1 port served by
//! hyper (the sidecar's admin port, the control plane's admin and webhook
//! ports), read before hyper's server is given the connection: hyper
//! answers a head it refuses with a status alone and no hook to add
//! words, so a head the port's check refuses is answered here instead, in
//! words, and the connection closed ([`first_head`]); any other is handed
//! to hyper with the bytes read so far put back ([`Rewind`]).
//!
//! [`HeadRules`] is a port's check of a head: what hyper refuses, in
//! words that name the fault ([`HeadFault`]), a bare CR among them, and
//! what the port refuses besides. [`check_head`] is that of a port only
//! hyper serves (the control plane's), naming hyper's bounds; the
//! sidecar's HTTP/1.1 forwarder reads its heads with the same parse and
//! bounds, in the sidecar's words and with its rule on targets, and its
//! admin port checks them as the forwarder does. None ever says a
//! header's value: it may carry a token, or a review.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use http::{Method, StatusCode, Uri};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::Notify;

use crate::policy::l7::{self, HeadLimit, MAX_REQUEST_HEAD, MAX_REQUEST_HEADERS, MAX_TARGET};

pub mod chunked;

use chunked::Chunked;

/// A stream with bytes already read from it put back in front.
#[derive(Debug)]
pub struct Rewind<S> {
    prefix: BytesMut,
    io: S,
}

impl<S> Rewind<S> {
    /// `io` with nothing put back.
    pub fn new(io: S) -> Self {
        Rewind {
            prefix: BytesMut::new(),
            io,
        }
    }

    /// `io` with `prefix`, bytes already read from it, put back. The
    /// prefix's allocation is released once it is all read (at once, if it
    /// is empty).
    pub fn with_prefix(prefix: BytesMut, io: S) -> Self {
        let prefix = if prefix.is_empty() {
            BytesMut::new()
        } else {
            prefix
        };
        Rewind { prefix, io }
    }

    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// Whether the stream has said nothing yet but empty lines (which an
    /// HTTP server skips): silence, as far as telling its protocol goes.
    pub fn said_nothing(&self) -> bool {
        skip_empty_lines(&self.prefix).is_empty()
    }

    /// The bytes read so far, put back in front of the stream.
    pub fn prefix(&self) -> &[u8] {
        &self.prefix
    }

    /// The bytes read so far and the stream after them: a byte copy
    /// writes the prefix once, then runs on the stream itself.
    pub fn into_parts(self) -> (BytesMut, S) {
        (self.prefix, self.io)
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
            if self.prefix.is_empty() {
                // `advance` keeps the allocation, which may be a read
                // buffer grown to a large head: it is not held for the
                // rest of a long-lived (upgraded, say) connection.
                self.prefix = BytesMut::new();
            }
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

/// A connection hyper's HTTP/1.1 server is given, every request head of
/// which is read and checked here before hyper sees it, so that a head
/// later on a kept-alive connection gets the same answer as the first:
/// hyper answers a head it refuses with a status alone (its server's
/// `on_error`, which nothing outside hyper can change), and closes a head
/// begun and not whole within its header read timeout without a word.
///
/// Each head is held back until [`check`](Self::new) passes it whole; its
/// body is then followed by its framing, as hyper's server reads it
/// (`framing`): its `Content-Length`, or its chunks as hyper's decoder
/// reads them ([`Chunked::lenient`]: a size zero-padded to any length
/// while its value fits 64 bits, spaces and tabs after a size, chunk
/// extensions and trailers within hyper's bounds), so that the next head
/// is found. A body's bytes pass to hyper as they
/// come, never held back for the rest of it; once none is held, they are
/// read straight into hyper's buffer while it has no room for more than
/// the body's rest (or the rest of a chunk's data). A head the check refuses is
/// never given to hyper: the caller, told so ([`signals`](Self::signals)),
/// asks hyper to finish the answer it is writing, if any, and end;
/// [`refused`](Self::refused) then says the fault, for the caller to
/// answer in its words. A head begun and not whole when hyper's header
/// read timeout ends the connection is held here too (hyper has none of
/// it), so the caller answers it 408.
///
/// What is not HTTP/1.1 heads is passed on unread: after a request whose
/// body is framed in a way the check leaves to hyper (hyper refuses it
/// itself, with a status alone, or closes the connection after it: two
/// `Content-Length`s that differ, a `Transfer-Encoding` whose last coding
/// is not `chunked`, one in HTTP/1.0, one with a `Content-Length` too),
/// after a chunked body hyper's decoder refuses (a bad size line, a bare
/// LF in one, a size past 64 bits, extensions or trailers over hyper's
/// bounds; hyper reads nothing more of the connection after it, nor after
/// trailers it then fails to parse as fields), and after an HTTP/1.1
/// request with an `Upgrade` or a `CONNECT`, whose bytes after the head
/// are another protocol's if hyper's answer switches (`101`, or `2xx` to
/// a `CONNECT`); an answer that does not switch leaves the connection in
/// HTTP/1.1, its later heads unchecked here, as the answer is not seen
/// (the sidecar's request stack and admin port, and the control plane's
/// HTTP/1.1 ports, mark such an answer `connection: close` to end the
/// connection with it, [`end_connection`]). An
/// `Upgrade` in HTTP/1.0, which hyper never switches for, is read as any
/// other field. Later heads on such a connection get hyper's answer,
/// logged and counted ([`HeadFault::from_hyper`]). The chunks are followed as hyper 1.x's
/// decoder reads them with its server's default bounds (100 trailer
/// fields, trailers under 16 KiB), which no port changes: a port that set
/// its own (`max_headers`), or another hyper whose decoder read a body
/// otherwise, would differ from it there, and only there.
///
/// No head is read after a request that ends the connection, as hyper's
/// server reads it (`Connection: close` in HTTP/1.1, HTTP/1.0 without
/// `keep-alive`), which hyper answers and closes: nothing after it is
/// passed to hyper, refused or counted, but the end of the stream, which
/// hyper looks for while it answers. An answer that ends the connection
/// itself (a service's own `Connection: close`) is not seen here: a head
/// that comes whole after the request's body while hyper still writes
/// such an answer is read, and refused in words if malformed, though
/// hyper would not have served it.
///
/// Nothing is allocated per request: the bytes held are in one buffer per
/// connection, which is freed once empty when it grew past what a small
/// head needs.
#[derive(Debug)]
pub struct Heads<S> {
    io: S,
    check: fn(&[u8]) -> Result<Option<usize>, HeadFault>,
    max_head: usize,
    /// Bytes read from `io` and not yet given to hyper.
    held: BytesMut,
    /// How many of `held`, from its start, may be given to hyper.
    passed: usize,
    /// The bytes of `held` already parsed of a head not all in.
    parsed: usize,
    reading: Reading,
    /// The chunked body being followed ([`Reading::Chunked`]).
    chunked: Chunked,
    /// Whether the request being read ends the connection: no head is
    /// read after it ([`Reading::Last`]).
    last: bool,
    fault: Option<HeadFault>,
    /// What the connection's stop is told: a head refused, a head held
    /// ([`Heads::signals`]). The one allocation `Heads` makes for a
    /// connection but its buffer.
    signals: Arc<HeadSignals>,
}

/// What a connection's [`Heads`] tells whoever stops its hyper server
/// ([`Heads::signals`]): that a head was refused, and whether it holds a
/// request head its client has begun (not only empty lines) and hyper has
/// not yet been given whole, as of its last read: hyper, idle between
/// requests, knows nothing of such a head, and its graceful shutdown would
/// close the connection with it unread. And the other way, what the stop
/// tells the connection's service: that its port stopped
/// ([`HeadSignals::stop`]), which `Heads` itself does not heed.
#[derive(Debug, Default)]
pub struct HeadSignals {
    refused: Notify,
    held: AtomicBool,
    /// Beside `held`, in room the allocation has anyway.
    stopped: AtomicBool,
    given: Notify,
}

impl HeadSignals {
    /// Resolves once a head is refused: hyper is then to be asked to
    /// finish (`graceful_shutdown`), which it does once the answer in
    /// progress, if any, is written, for the refusal to be answered. hyper
    /// reads nothing more meanwhile: an end of the stream would make it
    /// drop the answer in progress, so it is never told one.
    pub fn refused(&self) -> tokio::sync::futures::Notified<'_> {
        self.refused.notified()
    }

    /// Whether a head is held now.
    pub fn held(&self) -> bool {
        self.held.load(Ordering::Acquire)
    }

    /// Resolves once no head is held (at once if none is): the head held
    /// was given whole to hyper, which then serves it as a request in
    /// progress, or the connection ended.
    pub async fn given(&self) {
        loop {
            let given = self.given.notified();
            let mut given = std::pin::pin!(given);
            given.as_mut().enable();
            if !self.held() {
                return;
            }
            given.await;
        }
    }

    /// Says that the connection's port stopped: for its service to make
    /// every answer from then on the connection's last ([`Self::stopped`]).
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
    }

    /// Whether the connection's port stopped ([`Self::stop`]).
    pub fn stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// Kept up to date at each read: a plain load when nothing changed.
    fn set_held(&self, held: bool) {
        if self.held.load(Ordering::Relaxed) != held {
            self.held.store(held, Ordering::Release);
            if !held {
                self.given.notify_waiters();
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reading {
    Head,
    /// A body with this many bytes still to pass.
    Body(u64),
    /// A chunked body, followed by [`Heads::chunked`] to its end.
    Chunked,
    /// Not heads any more: passed on unread.
    Through,
    /// After a request that ends the connection, which hyper answers and
    /// closes: nothing more is passed to hyper, but the end of the stream
    /// (a client gone while it answers), as hyper alone would read it.
    Last,
    /// A refused head: hyper reads the end of the stream.
    Refused,
}

/// The buffer a connection keeps for the heads it holds: one grown past
/// it for a large head is freed once given to hyper.
const HELD: usize = 4096;

impl<S> Heads<S> {
    /// `io`, each request head of which `check` passes before hyper reads
    /// it (as [`first_head`]'s check does: `Ok(None)` while more is to come),
    /// `max_head` its bound on a head's size.
    pub fn new(
        io: S,
        check: fn(&[u8]) -> Result<Option<usize>, HeadFault>,
        max_head: usize,
    ) -> Self {
        Heads {
            io,
            check,
            max_head,
            held: BytesMut::new(),
            passed: 0,
            parsed: 0,
            reading: Reading::Head,
            chunked: Chunked::default(),
            last: false,
            fault: None,
            signals: Arc::new(HeadSignals::default()),
        }
    }

    /// What the connection's stop is to heed: a head refused
    /// ([`HeadSignals::refused`]), and a head held, begun and not yet given
    /// to hyper ([`HeadSignals::held`]), kept up to date as the connection
    /// is read: for a port's stop, which is to let hyper take such a head
    /// in and answer it, as it answers one it is reading, rather than
    /// close the connection under it.
    pub fn signals(&self) -> Arc<HeadSignals> {
        self.signals.clone()
    }

    /// A connection whose first head [`first_head`] read: its bytes are
    /// held, and checked again as hyper reads them.
    pub fn after_first(
        first: Rewind<S>,
        check: fn(&[u8]) -> Result<Option<usize>, HeadFault>,
        max_head: usize,
    ) -> Self {
        let (held, io) = first.into_parts();
        let heads = Heads {
            held,
            ..Heads::new(io, check, max_head)
        };
        heads.signals.set_held(heads.holds());
        heads
    }

    /// Whether a head is held, begun, that hyper has not been given whole.
    fn holds(&self) -> bool {
        self.passed > 0 || self.begun()
    }

    /// Whether part of a head (not only empty lines) is held, not whole.
    pub fn begun(&self) -> bool {
        self.reading == Reading::Head && !skip_empty_lines(&self.held).is_empty()
    }

    /// Why the connection must be answered now that hyper's server has
    /// ended it (`ended`: its error, if any): a head the check refused, or
    /// one begun and not whole when hyper's header read timeout ended it
    /// (408, `stalled` naming that time). `None` when hyper's answer is the
    /// last one.
    pub fn refused(
        &self,
        ended: Option<&hyper::Error>,
        stalled: &'static str,
    ) -> Option<HeadFault> {
        if let Some(fault) = self.fault {
            return Some(fault);
        }
        match ended {
            Some(error) if error.is_timeout() && self.begun() => {
                Some(HeadFault::timed_out(stalled))
            }
            _ => None,
        }
    }

    /// The bytes held (a buffer to linger with) and the stream.
    pub fn into_parts(self) -> (BytesMut, S) {
        (self.held, self.io)
    }

    /// What to do with the bytes held, now that there are some and none
    /// is passed: `true` when more must be read first.
    fn classify(&mut self) -> bool {
        match self.reading {
            Reading::Head => {
                let again = self.held.len() <= 16 * 1024
                    || self.held.len() >= self.max_head
                    || self.held[self.parsed..].contains(&b'\n');
                if !again {
                    return true;
                }
                match (self.check)(&self.held) {
                    Ok(Some(len)) => {
                        self.passed = len;
                        self.parsed = 0;
                        let (reading, last) = framing(&self.held[..len]);
                        self.last = last;
                        self.reading = match reading {
                            Reading::Head => self.next_head(),
                            reading => reading,
                        };
                        if self.reading == Reading::Chunked {
                            self.chunked = Chunked::lenient();
                        }
                        false
                    }
                    Ok(None) => {
                        self.parsed = self.held.len();
                        true
                    }
                    Err(fault) => {
                        self.fault = Some(fault);
                        self.reading = Reading::Refused;
                        self.signals.refused.notify_one();
                        false
                    }
                }
            }
            Reading::Body(left) => {
                let take = left.min(self.held.len() as u64);
                self.passed = take as usize;
                self.reading = if take == left {
                    self.next_head()
                } else {
                    Reading::Body(left - take)
                };
                false
            }
            Reading::Chunked => {
                match self.chunked.take(&self.held) {
                    Ok((take, ended)) => {
                        self.passed = take;
                        if ended {
                            // Where hyper's decoder ends it too.
                            self.reading = self.next_head();
                        }
                    }
                    // hyper refuses it, and reads nothing after it.
                    Err(_) => {
                        self.passed = self.held.len();
                        self.reading = Reading::Through;
                    }
                }
                false
            }
            Reading::Through => {
                self.passed = self.held.len();
                false
            }
            Reading::Refused | Reading::Last => false,
        }
    }

    /// What is read once a request's body has passed: the next head, or
    /// nothing after a request that ends the connection.
    fn next_head(&self) -> Reading {
        if self.last {
            Reading::Last
        } else {
            Reading::Head
        }
    }
}

/// How the body after the whole head `head` is framed, as far as finding
/// the next head goes: as hyper's server frames a request's body, or
/// [`Reading::Through`] where hyper refuses the head, reads no head after
/// it, or might read the body otherwise; and whether the request ends the
/// connection (hyper answers it and closes).
///
/// hyper takes a body as chunked when its last `Transfer-Encoding` field's
/// last coding is `chunked`, and refuses one whose last coding is another,
/// or any `Transfer-Encoding` in HTTP/1.0; with a `Content-Length` too, it
/// reads the chunks and closes the connection after the answer. Otherwise
/// it reads the `Content-Length` (every one the same, digits only), or no
/// body.
///
/// A request ends its connection as hyper's server reads it: HTTP/1.1
/// unless a `Connection` field has a `close` token, HTTP/1.0 only with a
/// `keep-alive` token; once one field has `close`, no later `keep-alive`
/// keeps the connection. A value not visible ASCII has no token.
fn framing(head: &[u8]) -> (Reading, bool) {
    let mut fields = [httparse::EMPTY_HEADER; MAX_REQUEST_HEADERS];
    let mut request = httparse::Request::new(&mut fields);
    if !matches!(request.parse(head), Ok(httparse::Status::Complete(_))) {
        return (Reading::Through, false);
    }
    if request.method == Some("CONNECT") {
        return (Reading::Through, false);
    }
    let mut kept = request.version == Some(1);
    let mut closed = false;
    let mut length = None;
    // Whether the last `Transfer-Encoding` ends with `chunked`, if any.
    let mut chunked = None;
    for field in request.headers.iter() {
        // hyper upgrades only an HTTP/1.1 request for its `Upgrade`: in
        // HTTP/1.0 the field is as any other, and the next head hyper's.
        if field.name.eq_ignore_ascii_case("upgrade") && request.version == Some(1) {
            return (Reading::Through, false);
        }
        if field.name.eq_ignore_ascii_case("connection") {
            if closed || has_token(field.value, b"close") {
                closed = true;
                kept = false;
            } else if !kept {
                kept = has_token(field.value, b"keep-alive");
            }
            continue;
        }
        if field.name.eq_ignore_ascii_case("transfer-encoding") {
            if request.version != Some(1) {
                return (Reading::Through, false);
            }
            chunked = Some(ends_chunked(field.value));
            continue;
        }
        if field.name.eq_ignore_ascii_case("content-length") {
            let value = std::str::from_utf8(field.value)
                .ok()
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<u64>().ok());
            match (value, length) {
                (Some(value), None) => length = Some(value),
                (Some(value), Some(before)) if value == before => {}
                // Hyper refuses it, or reads it otherwise: its own.
                _ => return (Reading::Through, false),
            }
        }
    }
    let reading = match (chunked, length) {
        (Some(true), None) => Reading::Chunked,
        // Refused, or the last request of its connection.
        (Some(_), _) => Reading::Through,
        (None, Some(0) | None) => Reading::Head,
        (None, Some(length)) => Reading::Body(length),
    };
    (reading, !kept)
}

/// Whether a `Connection` value has `token` among its comma-separated
/// parts, trimmed, in any case, as hyper reads it: only in a value of
/// visible ASCII (and tabs).
fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .iter()
        .all(|&b| b == b'\t' || (b' '..=b'~').contains(&b))
        && value
            .split(|&b| b == b',')
            .any(|part| part.trim_ascii().eq_ignore_ascii_case(token))
}

/// Whether a `Transfer-Encoding` value's last coding is `chunked`, as
/// hyper reads it: a value of visible ASCII (and tabs), its last
/// comma-separated part, trimmed.
fn ends_chunked(value: &[u8]) -> bool {
    value
        .iter()
        .all(|&b| b == b'\t' || (b' '..=b'~').contains(&b))
        && value
            .rsplit(|&b| b == b',')
            .next()
            .is_some_and(|coding| coding.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

impl<S: AsyncRead + Unpin> AsyncRead for Heads<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let read = self.as_mut().read_heads(cx, buf);
        self.signals.set_held(self.holds());
        read
    }
}

impl<S: AsyncRead + Unpin> Heads<S> {
    fn read_heads(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.passed > 0 {
                let n = this.passed.min(buf.remaining());
                buf.put_slice(&this.held[..n]);
                this.held.advance(n);
                this.passed -= n;
                if this.held.is_empty() && this.held.capacity() > HELD {
                    this.held = BytesMut::new();
                }
                return Poll::Ready(Ok(()));
            }
            if this.reading == Reading::Refused {
                // Woken by the graceful shutdown its refusal asks for.
                return Poll::Pending;
            }
            if this.reading == Reading::Last && !this.held.is_empty() {
                // Bytes after the last request: hyper alone would hold
                // them unread, and look for the end of the stream no more.
                return Poll::Pending;
            }
            // Bytes not heads go to hyper as they are read, not through
            // the buffer, when hyper has no room for more of them.
            match this.reading {
                Reading::Through if this.held.is_empty() => {
                    return Pin::new(&mut this.io).poll_read(cx, buf);
                }
                Reading::Body(left) if this.held.is_empty() && buf.remaining() as u64 <= left => {
                    let before = buf.filled().len();
                    ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
                    let read = (buf.filled().len() - before) as u64;
                    if read == 0 {
                        this.reading = Reading::Through;
                    } else if read == left {
                        this.reading = this.next_head();
                    } else {
                        this.reading = Reading::Body(left - read);
                    }
                    return Poll::Ready(Ok(()));
                }
                // So are a chunked body's, within a chunk's data.
                Reading::Chunked
                    if this.held.is_empty()
                        && buf.remaining() as u64 <= this.chunked.data_left() =>
                {
                    let before = buf.filled().len();
                    ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
                    let read = &buf.filled()[before..];
                    if read.is_empty() {
                        this.reading = Reading::Through;
                    } else {
                        // Chunk data, none of it the body's end.
                        let taken = this.chunked.take(read);
                        debug_assert_eq!(taken, Ok((read.len(), false)));
                    }
                    return Poll::Ready(Ok(()));
                }
                _ => {}
            }
            if !this.held.is_empty() && !this.classify() {
                continue;
            }
            // More is to be read.
            if this.held.capacity() - this.held.len() < 1024 {
                this.held.reserve(HELD.max(this.held.len() / 2));
            }
            let start = this.held.len();
            // Zeroed before it is read into: no more than a read takes.
            let room = (this.held.capacity() - start).min(16 * 1024);
            this.held.resize(start + room, 0);
            let mut into = ReadBuf::new(&mut this.held[start..]);
            let read = Pin::new(&mut this.io).poll_read(cx, &mut into);
            let filled = into.filled().len();
            this.held.truncate(start + filled);
            match read {
                Poll::Ready(Ok(())) if filled == 0 => {
                    // The end of the stream: a head begun is dropped, as
                    // hyper would (it answers nothing to a head cut short).
                    if this.reading == Reading::Head {
                        this.held.clear();
                    }
                    this.passed = this.held.len();
                    this.reading = Reading::Through;
                    if this.passed == 0 {
                        return Poll::Ready(Ok(()));
                    }
                }
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Heads<S> {
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
    /// Left to the caller when it has an answer to write
    /// ([`refused`](Heads::refused) may say so): a refused head, or one
    /// begun.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.fault.is_some() || self.begun() {
            return Poll::Ready(Ok(()));
        }
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

/// Whether hyper's server may switch protocols after `req`: an HTTP/1.1
/// request with an `Upgrade`, or a `CONNECT` in HTTP/1.x. [`Heads`] checks
/// no head after one (what follows may be another protocol's), so a port
/// whose answer to it does not switch ends the connection, lest hyper read
/// on unchecked.
pub fn may_switch<B>(req: &http::Request<B>) -> bool {
    let version = req.version();
    if req.method() == Method::CONNECT {
        version <= http::Version::HTTP_11
    } else {
        version == http::Version::HTTP_11 && req.headers().contains_key(http::header::UPGRADE)
    }
}

/// Marks `answer`, to a request in `version`, as the connection's last:
/// it says `connection: close`, so hyper's server ends the connection once
/// it is written. To an HTTP/1.0 request the answer is in HTTP/1.0 too,
/// which hyper's server does not mark `keep-alive`. A port calls it on
/// its answer to a request that [`may_switch`] when that answer does not
/// switch, lest hyper read on, unchecked by [`Heads`].
pub fn end_connection<B>(answer: &mut http::Response<B>, version: http::Version) {
    answer.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    if version == http::Version::HTTP_10 {
        *answer.version_mut() = http::Version::HTTP_10;
    }
}

/// `buf` after the empty lines (CRLF or LF) an HTTP/1 server skips before
/// a request line (RFC 9112 section 2.2).
pub fn skip_empty_lines(mut buf: &[u8]) -> &[u8] {
    loop {
        if let Some(rest) = buf.strip_prefix(b"\r\n") {
            buf = rest;
        } else if let Some(rest) = buf.strip_prefix(b"\n") {
            buf = rest;
        } else {
            return buf;
        }
    }
}

/// Whether `socket` has bytes waiting to be read other than empty lines
/// (a request head begun; a TLS record is one too), as the kernel says now,
/// looking at no more than the first 64 bytes and taking none: unlike a
/// read through tokio, which finds nothing on a socket its runtime has not
/// yet seen readable, as with one accepted and not yet polled.
pub fn begun_in_socket(socket: impl std::os::fd::AsFd) -> bool {
    let mut waiting = [0u8; 64];
    peek_now(socket, &mut waiting).is_ok_and(|n| !skip_empty_lines(&waiting[..n]).is_empty())
}

/// The bytes waiting in `socket` copied into `buf`, taking none and not
/// waiting for any (`WouldBlock` when none wait; `Ok(0)` at the end of the
/// stream), whatever tokio knows of the socket's readiness.
pub fn peek_now(socket: impl std::os::fd::AsFd, buf: &mut [u8]) -> io::Result<usize> {
    use rustix::net::RecvFlags;
    let (n, _) = rustix::net::recv(socket, buf, RecvFlags::PEEK | RecvFlags::DONTWAIT)?;
    Ok(n)
}

/// How reading a connection's first request head ended ([`first_head`]).
pub enum FirstHead<S, F> {
    /// A whole head the check passed: the connection, with what was read
    /// put back, for hyper to serve.
    Whole(Rewind<S>),
    /// A head the check refused, with what was read of it (a buffer to
    /// linger with) and the fault: for the caller to answer.
    Refused { io: S, read: BytesMut, fault: F },
    /// Nothing but empty lines within the time given: an idle connection.
    Silent,
    /// Part of a head and not the rest within the time given, with what
    /// was read of it: for the caller to answer 408
    /// ([`HeadFault::timed_out`]).
    Stalled { io: S, read: BytesMut },
    /// Closed, or failed, before a whole head came (hyper answers nothing
    /// either), or told to stop (at a port's stop, only with nothing
    /// received: [`first_head_or_drain`]).
    Closed,
}

/// Reads `io`'s first request head, within `timeout`, checking it with
/// `check` as it comes (`Ok(None)`: more of it is to come; `Ok(Some(len))`:
/// a whole head of `len` bytes it passes), until `stop` resolves.
/// `max_head` is the check's bound on a head's size: past 16 KiB, a head
/// not all in is checked again only once a line of it may have ended, or
/// once it is over that bound, so that a large head sent a byte at a time
/// is not parsed again for each.
pub async fn first_head<S, F, C, P>(
    io: S,
    check: C,
    max_head: usize,
    timeout: Duration,
    stop: Pin<&mut P>,
) -> FirstHead<S, F>
where
    S: AsyncRead + Unpin,
    C: FnMut(&[u8]) -> Result<Option<usize>, F>,
    P: Future<Output = ()>,
{
    let mut never = std::pin::pin!(std::future::pending::<()>());
    // Never asked: there is no drain.
    let waiting = |_: &S| false;
    first_head_or_drain(io, check, max_head, timeout, stop, never.as_mut(), waiting)
        .await
        .0
}

/// [`first_head`], with a port's stop (`drain`) apart from `stop`, which
/// closes the connection at once whatever it sent (an eviction). When
/// `drain` resolves, a connection the client has begun its head on is
/// read on, as hyper's graceful shutdown serves a connection it has read
/// part of a request from: one with any byte of it read, or with bytes
/// waiting to be read then (a single read that does not wait, and, if it
/// finds no head begun, `waiting`, which looks at the socket itself:
/// tokio's read finds nothing on a socket its runtime has not yet seen
/// readable, as with one accepted just before the stop; [`begun_in_socket`]
/// for a TCP stream). Such is a client that sent its request just before
/// the stop, as the Kubernetes API server sends its review as soon as its
/// handshake is done. Its head
/// then has what is left of `timeout`, as any other. A connection with
/// nothing received, or only empty lines (which a server ignores before
/// a request line, RFC 9112 section 2.2, as [`Heads`] does before a later
/// head), is [`FirstHead::Closed`] at once.
///
/// The `bool` says whether `drain` resolved (it is not polled again): the
/// caller is then to serve the request as the connection's last.
pub async fn first_head_or_drain<S, F, C, P, D, W>(
    mut io: S,
    mut check: C,
    max_head: usize,
    timeout: Duration,
    mut stop: Pin<&mut P>,
    mut drain: Pin<&mut D>,
    waiting: W,
) -> (FirstHead<S, F>, bool)
where
    S: AsyncRead + Unpin,
    C: FnMut(&[u8]) -> Result<Option<usize>, F>,
    P: Future<Output = ()>,
    D: Future<Output = ()>,
    W: Fn(&S) -> bool,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = BytesMut::with_capacity(1024);
    // The bytes already parsed of a head not all in.
    let mut parsed = 0;
    let mut drained = false;
    loop {
        let again =
            buf.len() <= 16 * 1024 || buf.len() >= max_head || buf[parsed..].contains(&b'\n');
        if !buf.is_empty() && again {
            match check(&buf) {
                Ok(Some(_)) => return (FirstHead::Whole(Rewind::with_prefix(buf, io)), drained),
                Ok(None) => parsed = buf.len(),
                Err(fault) => {
                    let refused = FirstHead::Refused {
                        io,
                        read: buf,
                        fault,
                    };
                    return (refused, drained);
                }
            }
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(4096.max(buf.len() / 2));
        }
        // Biased, the stop and the drain first: a head whole in the socket
        // when the port stops is read as one begun at the stop (served as
        // the connection's last), not by chance as one read before it.
        let read = tokio::select! {
            biased;
            () = stop.as_mut() => return (FirstHead::Closed, drained),
            () = drain.as_mut(), if !drained => {
                drained = true;
                // Empty lines before a request line are no head begun (a
                // server ignores them, RFC 9112 section 2.2), as for
                // `Heads` at a later head.
                if !skip_empty_lines(&buf).is_empty() {
                    continue;
                }
                // Nothing of a head read yet: only bytes already waiting,
                // more than empty lines, keep it.
                let read_now = tokio::select! {
                    biased;
                    read = io.read_buf(&mut buf) => Some(read),
                    () = std::future::ready(()) => None,
                };
                match read_now {
                    Some(Ok(n)) if n > 0 && !skip_empty_lines(&buf).is_empty() => continue,
                    Some(Ok(0) | Err(_)) => return (FirstHead::Closed, drained),
                    // Nothing read, or empty lines alone: the socket itself
                    // may hold more, unseen by tokio yet. Then read on,
                    // waiting: it is readable.
                    _ if waiting(&io) => continue,
                    _ => return (FirstHead::Closed, drained),
                }
            }
            read = tokio::time::timeout_at(deadline, io.read_buf(&mut buf)) => read,
        };
        match read {
            Ok(Ok(0) | Err(_)) => return (FirstHead::Closed, drained),
            Ok(Ok(_)) => {}
            Err(_elapsed) if skip_empty_lines(&buf).is_empty() => {
                return (FirstHead::Silent, drained);
            }
            Err(_elapsed) => return (FirstHead::Stalled { io, read: buf }, drained),
        }
    }
}

/// A request head a port refuses, and closes the connection after: the
/// status and what was wrong, as the answer's text says it (never the
/// client's bytes). The sidecar's forwarder refuses with it too, with its
/// own answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadFault {
    pub status: StatusCode,
    pub why: &'static str,
}

/// What a head over [`MAX_REQUEST_HEAD`] is told, with 431, by a port only
/// hyper serves.
pub const HEAD_TOO_LARGE: &str = "request head exceeds the 408 KiB limit";
/// What a head with more than [`MAX_REQUEST_HEADERS`] fields is told, with
/// 431, by a port only hyper serves.
pub const TOO_MANY_FIELDS: &str = "request head exceeds the limit of 100 header fields";
/// What a request target over [`MAX_TARGET`] is told, with 414, by a port
/// only hyper serves.
pub const TARGET_TOO_LONG: &str = "request target exceeds the limit of 65534 bytes";
const _: () = assert!(
    MAX_REQUEST_HEAD == 408 * 1024 && MAX_REQUEST_HEADERS == 100 && MAX_TARGET == 65534,
    "the answers name the bounds"
);
/// What a request line whose method is not a token is told.
pub const INVALID_METHOD: &str = "malformed request line: invalid method";
/// What a request line whose target is not a URI is told.
pub const INVALID_TARGET: &str = "malformed request line: invalid request target";
/// What a request line with a CR not followed by LF is told.
pub const BARE_CR: &str = "malformed request line: a bare CR (a CR not followed by LF)";
/// What a header line with a CR not followed by LF is told.
pub const BARE_CR_IN_HEADER: &str = "malformed header line: a bare CR (a CR not followed by LF)";

/// The words a port's refusals name its bounds on a head in
/// ([`HeadLimit`]): whose bounds they are is the one difference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// A head over [`MAX_REQUEST_HEAD`].
    pub size: &'static str,
    /// A head with more than [`MAX_REQUEST_HEADERS`] fields.
    pub fields: &'static str,
    /// A request target over [`MAX_TARGET`].
    pub target: &'static str,
    /// A head hyper refused for one of the first two: its error does not
    /// say which.
    pub size_or_fields: &'static str,
}

impl Bounds {
    /// A port only hyper serves (the control plane's): hyper's bounds.
    pub const PORT: Bounds = Bounds {
        size: HEAD_TOO_LARGE,
        fields: TOO_MANY_FIELDS,
        target: TARGET_TOO_LONG,
        size_or_fields: "request head exceeds the 408 KiB limit or the limit of 100 header fields",
    };

    /// The sidecar's, as its forwarder and `policy explain` name them
    /// ([`HeadLimit::why`]).
    pub const SIDECAR: Bounds = Bounds {
        size: l7::HEAD_TOO_LARGE,
        fields: l7::TOO_MANY_FIELDS,
        target: l7::TARGET_TOO_LONG,
        size_or_fields: "request head exceeds the sidecar's 408 KiB limit or its limit of \
                         100 header fields",
    };

    /// What a head over `limit` is told.
    fn of(&self, limit: HeadLimit) -> &'static str {
        match limit {
            HeadLimit::Size => self.size,
            HeadLimit::Fields => self.fields,
            HeadLimit::Target => self.target,
        }
    }
}

/// Every `reason` a refused head is counted as ([`HeadFault::reason`]),
/// the last standing for any fault but the two limits.
pub const HEAD_FAULT_REASONS: [&str; 3] = ["target_too_long", "head_too_large", "malformed"];

impl HeadFault {
    /// A head refused with 400 for `why`.
    pub fn bad(why: &'static str) -> Self {
        HeadFault {
            status: StatusCode::BAD_REQUEST,
            why,
        }
    }

    /// A head over `limit`, named in `bounds`' words: 431, or 414 for its
    /// target.
    pub fn over(limit: HeadLimit, bounds: &Bounds) -> Self {
        HeadFault {
            status: limit.status(),
            why: bounds.of(limit),
        }
    }

    /// A head begun and not whole in the time a port gives it: 408, `why`
    /// naming that time.
    pub fn timed_out(why: &'static str) -> Self {
        HeadFault {
            status: StatusCode::REQUEST_TIMEOUT,
            why,
        }
    }

    /// What the refusal is counted as (a metric's `reason`, one of
    /// [`HEAD_FAULT_REASONS`]): `target_too_long` (414), `head_too_large`
    /// (431) or `malformed` (400 and any other).
    pub fn reason(&self) -> &'static str {
        let [target, size, malformed] = HEAD_FAULT_REASONS;
        match self.status {
            StatusCode::URI_TOO_LONG => target,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => size,
            _ => malformed,
        }
    }

    /// What hyper's server answered, with a status alone, for a head it
    /// refused on a connection it served (`error`), its bounds named in
    /// `bounds`' words: a later head of a kept-alive connection, or what
    /// [`HeadRules::check`] leaves to hyper (a field name the `http` crate
    /// refuses, a `Content-Length` it cannot read); `None` for an error
    /// that is not a refused head, which hyper answers with nothing.
    pub fn from_hyper(error: &hyper::Error, bounds: &Bounds) -> Option<Self> {
        if !error.is_parse() || error.is_parse_version_h2() || error.is_parse_status() {
            return None;
        }
        if error.is_parse_too_large() {
            // hyper says which of its two bounds only in words.
            return Some(if error.to_string().starts_with("URI") {
                HeadFault::over(HeadLimit::Target, bounds)
            } else {
                HeadFault {
                    status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    why: bounds.size_or_fields,
                }
            });
        }
        // hyper's internal errors (a bug of its own) get no answer.
        if error.to_string().starts_with("internal error") {
            return None;
        }
        Some(HeadFault::bad("malformed request head"))
    }

    /// The answer to the refused head: its status, `text/plain` naming
    /// the fault, and `connection: close`.
    pub fn answer(&self) -> Vec<u8> {
        let body = crate::refusal::body_text(self.why.as_bytes(), false);
        let mut answer = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n\
             connection: close\r\n\r\n",
            self.status.as_u16(),
            self.status.canonical_reason().unwrap_or(""),
            body.len()
        )
        .into_bytes();
        answer.extend_from_slice(&body);
        answer
    }
}

/// What a port refuses in a request head on top of what hyper's server
/// refuses, and the words of its bounds: [`HeadRules::PORT`] for a port
/// only hyper serves, the sidecar's for its forwarder and admin port.
#[derive(Debug, Clone, Copy)]
pub struct HeadRules {
    pub bounds: Bounds,
    /// What is wrong with a request target within its bound, if anything.
    pub target: fn(&str) -> Option<&'static str>,
}

impl HeadRules {
    /// A port only hyper serves: what hyper refuses, in words naming
    /// hyper's bounds.
    pub const PORT: HeadRules = HeadRules {
        bounds: Bounds::PORT,
        target: any_target,
    };

    /// Parses the head in `buf` into `request`: `Ok(None)` while more of
    /// it is to come, `Ok(Some(len))` for a whole head of `len` bytes, or
    /// the fault: one not whole within [`MAX_REQUEST_HEAD`] bytes or with
    /// more than [`MAX_REQUEST_HEADERS`] fields (431), one that does not
    /// parse (400, in words naming what was wrong: a bare CR among them,
    /// [`BARE_CR`], [`BARE_CR_IN_HEADER`]).
    pub fn parse<'b>(
        &self,
        request: &mut httparse::Request<'_, 'b>,
        buf: &'b [u8],
    ) -> Result<Option<usize>, HeadFault> {
        match request.parse(buf) {
            Ok(httparse::Status::Complete(len)) => Ok(Some(len)),
            Ok(httparse::Status::Partial) if buf.len() >= MAX_REQUEST_HEAD => {
                Err(HeadFault::over(HeadLimit::Size, &self.bounds))
            }
            Ok(httparse::Status::Partial) => Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                Err(HeadFault::over(HeadLimit::Fields, &self.bounds))
            }
            Err(e) => {
                let method = request.method.is_some();
                Err(HeadFault::bad(
                    bare_cr_fault(buf).unwrap_or_else(|| unparsable(e, method)),
                ))
            }
        }
    }

    /// What a whole head of `len` bytes with `fields` header fields and
    /// the request `target` is refused for, if anything, before its
    /// method is read: over a bound ([`HeadLimit::http1`]: a head that
    /// came whole in a read past its bound is over it all the same), then
    /// the port's rule on targets.
    pub fn refuses(&self, fields: usize, len: usize, target: &str) -> Option<HeadFault> {
        match HeadLimit::http1(fields, len, target.len()) {
            Some(limit) => Some(HeadFault::over(limit, &self.bounds)),
            None => (self.target)(target).map(HeadFault::bad),
        }
    }

    /// A connection's first request head as far as it has come in `buf`,
    /// checked for what hyper's server would refuse with a status alone
    /// and what the port refuses besides: `Ok(None)` while more of it is
    /// to come, `Ok(Some(len))` for a whole head of `len` bytes, or the
    /// fault: a head that does not parse (400), over a bound (431, 414)
    /// or refused for its target ([`HeadRules::parse`],
    /// [`HeadRules::refuses`]), an invalid method or a target not a URI
    /// (400). Its framing (`Content-Length`, `Transfer-Encoding`) and
    /// field names are left to hyper.
    pub fn check(&self, buf: &[u8]) -> Result<Option<usize>, HeadFault> {
        let mut fields = [httparse::EMPTY_HEADER; MAX_REQUEST_HEADERS];
        let mut parsed = httparse::Request::new(&mut fields);
        let Some(len) = self.parse(&mut parsed, buf)? else {
            return Ok(None);
        };
        let (Some(method), Some(target)) = (parsed.method, parsed.path) else {
            return Ok(Some(len));
        };
        if let Some(fault) = self.refuses(parsed.headers.len(), len, target) {
            return Err(fault);
        }
        if Method::from_bytes(method.as_bytes()).is_err() {
            return Err(HeadFault::bad(INVALID_METHOD));
        }
        if Uri::try_from(target).is_err() {
            return Err(HeadFault::bad(INVALID_TARGET));
        }
        Ok(Some(len))
    }
}

/// The rule on targets of a port that refuses none but what hyper does.
fn any_target(_: &str) -> Option<&'static str> {
    None
}

/// The check of a port only hyper serves ([`HeadRules::PORT`]).
pub fn check_head(buf: &[u8]) -> Result<Option<usize>, HeadFault> {
    HeadRules::PORT.check(buf)
}

/// What is wrong with a head that does not parse, in words; `method`:
/// whether the request line's method was read.
fn unparsable(e: httparse::Error, method: bool) -> &'static str {
    match e {
        httparse::Error::Token if !method => INVALID_METHOD,
        httparse::Error::Token => INVALID_TARGET,
        httparse::Error::Version => "malformed request line: not HTTP/1.0 or HTTP/1.1",
        httparse::Error::HeaderName => {
            "malformed header line: not a field name and a colon (a line without a colon, \
             or a space before it)"
        }
        httparse::Error::HeaderValue => "invalid character in a header value",
        httparse::Error::NewLine => "malformed line ending in the request head",
        httparse::Error::Status | httparse::Error::TooManyHeaders => "malformed request head",
    }
}

/// Where `line` (one line or several) holds a CR followed by anything but
/// LF: lines end only at CRLF (or LF) for the sidecar, and at a bare CR for
/// some servers, so the words around it are not what an app would read.
pub fn bare_cr(line: &[u8]) -> Option<usize> {
    line.iter()
        .enumerate()
        .position(|(at, b)| *b == b'\r' && line.get(at + 1).is_some_and(|next| *next != b'\n'))
}

/// What a head that does not parse is told when its first fault is in a
/// line holding a bare CR ([`bare_cr`]): [`BARE_CR`] for the request
/// line, [`BARE_CR_IN_HEADER`] for a header line; `None` when the head
/// has a fault before its first such line, or none.
fn bare_cr_fault(buf: &[u8]) -> Option<&'static str> {
    let head = skip_empty_lines(buf);
    // A CR before LF is never bare, so the first bare CR of the head is
    // that of its first line holding one.
    let cr = bare_cr(head)?;
    let start = head[..cr]
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |lf| lf + 1);
    if start == 0 {
        return Some(BARE_CR);
    }
    // The lines before it are a head begun without a fault (nor ended):
    // the first fault is in this line.
    let mut fields = [httparse::EMPTY_HEADER; MAX_REQUEST_HEADERS];
    match httparse::Request::new(&mut fields).parse(&head[..start]) {
        Ok(httparse::Status::Partial) => Some(BARE_CR_IN_HEADER),
        _ => None,
    }
}

/// Answers a refused head ([`HeadFault::answer`]) and closes the
/// connection, lingering ([`linger`](crate::refusal::linger)) so that the
/// answer is not lost to a reset for bytes left unread; `read` is what was
/// read of it. The answer gets `timeout` to be written.
pub async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    mut read: BytesMut,
    fault: &HeadFault,
    timeout: Duration,
) {
    let answered = tokio::time::timeout(timeout, io.write_all(&fault.answer())).await;
    if matches!(answered, Ok(Ok(()))) {
        let _ = io.shutdown().await;
        crate::refusal::linger(
            &mut io,
            &mut read,
            crate::refusal::ANSWER_LINGER,
            crate::refusal::ANSWER_LINGER_BYTES,
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_is_checked_for_what_hyper_refuses() {
        assert_eq!(check_head(b"GET / HTTP/1.1\r\nhost: a\r\n"), Ok(None));
        assert_eq!(
            check_head(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n"),
            Ok(Some(27))
        );
        let why = |head: &[u8]| check_head(head).unwrap_err().why;
        assert_eq!(
            why(b"GET / HTTP/1.1\r\nno colon\r\n\r\n"),
            unparsable(httparse::Error::HeaderName, true)
        );
        assert_eq!(why(b"G(T / HTTP/1.1\r\n\r\n"), INVALID_METHOD);
        assert_eq!(
            why(b"GET / HTTP/2.5\r\n\r\n"),
            "malformed request line: not HTTP/1.0 or HTTP/1.1"
        );
        let fields = "x: y\r\n".repeat(MAX_REQUEST_HEADERS + 1);
        let many = format!("GET / HTTP/1.1\r\n{fields}\r\n");
        let fault = check_head(many.as_bytes()).unwrap_err();
        assert_eq!(
            (fault.status.as_u16(), fault.why, fault.reason()),
            (431, TOO_MANY_FIELDS, "head_too_large")
        );
        let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_TARGET));
        let fault = check_head(long.as_bytes()).unwrap_err();
        assert_eq!(
            (fault.status.as_u16(), fault.reason()),
            (414, "target_too_long")
        );
        let big = format!("GET / HTTP/1.1\r\nx: {}", "a".repeat(MAX_REQUEST_HEAD));
        assert_eq!(check_head(big.as_bytes()).unwrap_err().why, HEAD_TOO_LARGE);
    }

    /// A connected pair of loopback sockets: the client's end and the
    /// port's.
    async fn socket_pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        (client, listener.accept().await.unwrap().0)
    }

    /// At a port's stop, a first head the client sent and the port has
    /// not read (waiting in the socket) is read and passed whole, the stop
    /// said; a connection with nothing received is closed at once; an
    /// eviction closes one with part of a head, as before.
    #[tokio::test]
    async fn a_head_waiting_at_a_ports_stop_is_read_and_silence_is_closed() {
        const HEAD: &[u8] = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n";
        let timeout = Duration::from_secs(5);
        let first = |port, stop: bool, drain: bool| async move {
            let mut stop = std::pin::pin!(async move {
                if !stop {
                    std::future::pending::<()>().await;
                }
            });
            let mut drain = std::pin::pin!(async move {
                if !drain {
                    std::future::pending::<()>().await;
                }
            });
            let started = tokio::time::Instant::now();
            let (first, drained) = first_head_or_drain(
                port,
                check_head,
                MAX_REQUEST_HEAD,
                timeout,
                stop.as_mut(),
                drain.as_mut(),
                |port: &tokio::net::TcpStream| begun_in_socket(port),
            )
            .await;
            (first, drained, started.elapsed())
        };
        let waiting = || async {
            let (mut client, port) = socket_pair().await;
            client.write_all(HEAD).await.unwrap();
            // In the port's socket, not read.
            let mut peeked = [0u8; 1];
            assert_eq!(port.peek(&mut peeked).await.unwrap(), 1);
            (client, port)
        };

        let (_client, port) = waiting().await;
        match first(port, false, true).await {
            (FirstHead::Whole(io), true, _) => assert_eq!(io.prefix(), HEAD),
            (other, drained, _) => panic!(
                "a head waiting at the stop was not read whole (drained: {drained}): {}",
                name(&other)
            ),
        }

        let (_client, port) = socket_pair().await;
        let (got, drained, took) = first(port, false, true).await;
        assert!(
            matches!(got, FirstHead::Closed) && drained,
            "{} {drained}",
            name(&got)
        );
        assert!(
            took < Duration::from_secs(1),
            "silence held the stop {took:?}"
        );

        let (mut client, port) = socket_pair().await;
        client.write_all(b"GET / HT").await.unwrap();
        let (got, drained, _) = first(port, true, false).await;
        assert!(
            matches!(got, FirstHead::Closed) && !drained,
            "an eviction did not close at once: {}",
            name(&got)
        );
    }

    /// The first head of `port` read as a port reads it, never evicted,
    /// the port stopping when `drain` resolves: what was read, whether
    /// the stop was seen, and how long it took.
    async fn first_head_at_stop(
        port: tokio::net::TcpStream,
        drain: impl Future<Output = ()>,
    ) -> (FirstHead<tokio::net::TcpStream, HeadFault>, bool, Duration) {
        let mut stop = std::pin::pin!(std::future::pending::<()>());
        let mut drain = std::pin::pin!(drain);
        let started = tokio::time::Instant::now();
        let (first, drained) = first_head_or_drain(
            port,
            check_head,
            MAX_REQUEST_HEAD,
            Duration::from_secs(5),
            stop.as_mut(),
            drain.as_mut(),
            |port: &tokio::net::TcpStream| begun_in_socket(port),
        )
        .await;
        (first, drained, started.elapsed())
    }

    /// A head waiting in a socket the runtime has not yet seen readable
    /// (a connection accepted just before a port's stop whose task first
    /// runs after it): read and passed whole, not closed unread as one with
    /// nothing received.
    #[tokio::test]
    async fn a_head_waiting_in_a_socket_not_yet_seen_readable_at_a_ports_stop_is_read() {
        use std::io::Write;
        const HEAD: &[u8] = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n";
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        for _ in 0..8 {
            let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            client.write_all(HEAD).unwrap();
            let (port, _) = listener.accept().unwrap();
            // In the port's socket, unread, tokio not told.
            assert_eq!(port.peek(&mut [0u8; 1]).unwrap(), 1);
            port.set_nonblocking(true).unwrap();
            let port = tokio::net::TcpStream::from_std(port).unwrap();
            match first_head_at_stop(port, async {}).await {
                (FirstHead::Whole(io), true, _) => assert_eq!(io.prefix(), HEAD),
                (other, drained, _) => panic!(
                    "a head waiting at the stop, unseen by the runtime, was not read \
                     (drained: {drained}): {}",
                    name(&other)
                ),
            }
        }
    }

    /// Part of a head read before the stop, the rest sent after it: read
    /// whole within the head's deadline.
    #[tokio::test]
    async fn a_head_begun_before_a_ports_stop_is_read_on_after_it() {
        let (mut client, port) = socket_pair().await;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let reading = tokio::spawn(first_head_at_stop(port, async {
            let _ = rx.await;
        }));
        client.write_all(b"GET / HT").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        tx.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        client
            .write_all(b"TP/1.1\r\nhost: a\r\n\r\n")
            .await
            .unwrap();
        let (got, drained, _) = tokio::time::timeout(Duration::from_secs(5), reading)
            .await
            .expect("the head was read within its deadline")
            .unwrap();
        assert!(drained);
        let FirstHead::Whole(io) = got else {
            panic!(
                "a head begun before the stop was not read on: {}",
                name(&got)
            );
        };
        assert_eq!(io.prefix(), b"GET / HTTP/1.1\r\nhost: a\r\n\r\n");
    }

    /// Empty lines alone are no head begun at a port's stop, read before
    /// it or waiting then (a server ignores them, RFC 9112 section 2.2):
    /// the connection closes at once, as `Heads` lets one go with only
    /// empty lines of a later head held; a request line behind them keeps
    /// it.
    #[tokio::test]
    async fn empty_lines_alone_at_a_ports_stop_are_no_head_begun() {
        let at_stop = |port, before: Option<oneshot::Receiver<()>>| {
            first_head_at_stop(port, async move {
                if let Some(before) = before {
                    let _ = before.await;
                }
            })
        };
        let closed_at_once = |(got, drained, took): (FirstHead<_, _>, bool, Duration), what| {
            assert!(
                matches!(got, FirstHead::Closed) && drained && took < Duration::from_secs(1),
                "{what}: {} after {took:?}, drained {drained}",
                name(&got)
            );
        };
        use tokio::sync::oneshot;

        // Read before the stop.
        let (mut client, port) = socket_pair().await;
        let (tx, rx) = oneshot::channel();
        let reading = tokio::spawn(at_stop(port, Some(rx)));
        client.write_all(b"\r\n\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        tx.send(()).unwrap();
        closed_at_once(reading.await.unwrap(), "empty lines read before the stop");

        // Waiting in the socket at the stop.
        let (mut client, port) = socket_pair().await;
        client.write_all(b"\r\n").await.unwrap();
        let mut peeked = [0u8; 1];
        assert_eq!(port.peek(&mut peeked).await.unwrap(), 1);
        closed_at_once(at_stop(port, None).await, "empty lines waiting at the stop");

        // A request line behind them is a head begun.
        let (mut client, port) = socket_pair().await;
        client
            .write_all(b"\r\nGET / HTTP/1.1\r\nhost: a\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(port.peek(&mut peeked).await.unwrap(), 1);
        let (got, _, _) = at_stop(port, None).await;
        assert!(
            matches!(got, FirstHead::Whole(_)),
            "a head behind an empty line was not read: {}",
            name(&got)
        );
    }

    fn name<S, F>(first: &FirstHead<S, F>) -> &'static str {
        match first {
            FirstHead::Whole(_) => "whole",
            FirstHead::Refused { .. } => "refused",
            FirstHead::Silent => "silent",
            FirstHead::Stalled { .. } => "stalled",
            FirstHead::Closed => "closed",
        }
    }

    #[test]
    fn a_bare_cr_is_named_in_the_line_it_is_in() {
        let why = |head: &[u8]| check_head(head).unwrap_err().why;
        assert_eq!(why(b"GET /\rx HTTP/1.1\r\n\r\n"), BARE_CR);
        assert_eq!(why(b"\r\nGET / HTTP/1.1\rhost: a\r\n\r\n"), BARE_CR);
        assert_eq!(
            why(b"GET / HTTP/1.1\r\nhost: a\r\nx: y\rz\r\n\r\n"),
            BARE_CR_IN_HEADER
        );
        // A fault before the line with the bare CR is the one named.
        assert_eq!(
            why(b"GET / HTTP/1.1\r\nno colon\r\nx: y\rz\r\n\r\n"),
            unparsable(httparse::Error::HeaderName, true)
        );
    }

    #[test]
    fn a_port_names_its_bounds_in_its_own_words() {
        let sidecar = HeadRules {
            bounds: Bounds::SIDECAR,
            target: l7::target_problem,
        };
        let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_TARGET));
        assert_eq!(
            sidecar.check(long.as_bytes()),
            Err(HeadFault {
                status: StatusCode::URI_TOO_LONG,
                why: l7::TARGET_TOO_LONG
            })
        );
        // Its rule on targets, which a port only hyper serves has not.
        assert_eq!(
            sidecar.check(b"GET /a#b HTTP/1.1\r\n\r\n"),
            Err(HeadFault::bad(l7::TARGET_FRAGMENT))
        );
        assert_eq!(check_head(b"GET /a#b HTTP/1.1\r\n\r\n"), Ok(Some(21)));
    }

    #[test]
    fn a_refused_head_is_answered_in_words() {
        let fault = HeadFault::bad(INVALID_METHOD);
        let answer = String::from_utf8(fault.answer()).unwrap();
        assert_eq!(
            answer,
            "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\n\
             content-length: 39\r\nconnection: close\r\n\r\nmalformed request line: invalid method\n"
        );
    }

    /// Serves the connection `server` with hyper's server behind [`Heads`],
    /// checked by [`check_head`] (hyper's header read timeout 5 s): each
    /// request's body is read whole, as it comes, before its answer `ok`,
    /// but for a target of `/early`, answered at once with its body unread;
    /// one of `/slow` is answered 200 ms later, one of `/length` with its
    /// body's length. Why the connection is to be answered in words once hyper has ended it.
    async fn serve_behind_heads<S>(server: S) -> Option<HeadFault>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        serve(server, true).await
    }

    /// As [`serve_behind_heads`], or with hyper's server alone (`heads`
    /// false: `None`, hyper answering every head itself).
    async fn serve<S>(server: S, heads: bool) -> Option<HeadFault>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        use http_body_util::BodyExt;
        use hyper::body::Incoming;
        use std::convert::Infallible;
        let service = hyper::service::service_fn(|request: http::Request<Incoming>| async {
            let mut answer = bytes::Bytes::from_static(b"ok");
            match request.uri().path() {
                "/early" => {}
                "/slow" => tokio::time::sleep(Duration::from_millis(200)).await,
                "/length" => {
                    let body = request.into_body().collect().await;
                    let length = body.map_or(0, |body| body.to_bytes().len());
                    answer = bytes::Bytes::from(format!("length {length}"));
                }
                _ => drop(request.into_body().collect().await),
            }
            Ok::<_, Infallible>(http::Response::new(http_body_util::Full::new(answer)))
        });
        if !heads {
            crate::connections::serve_http1_for(
                server,
                service,
                Duration::from_secs(5),
                Duration::from_secs(600),
                std::future::pending(),
            )
            .await;
            return None;
        }
        let mut heads = Heads::new(server, check_head, MAX_REQUEST_HEAD);
        let refusal = heads.signals();
        let ended = crate::connections::serve_http1_for(
            &mut heads,
            service,
            Duration::from_secs(5),
            Duration::from_secs(600),
            refusal.refused(),
        )
        .await;
        heads.refused(ended.as_ref(), "stalled")
    }

    /// Serves `sent` as [`serve_behind_heads`] does: what the client read,
    /// and why the connection is to be answered in words once hyper has
    /// ended it.
    async fn served(sent: &'static [u8]) -> (String, Option<HeadFault>) {
        served_in(&[sent]).await
    }

    /// As [`served`], `sent` coming in parts a millisecond apart.
    async fn served_in(sent: &[&'static [u8]]) -> (String, Option<HeadFault>) {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let serving = tokio::spawn(serve_behind_heads(server));
        for part in sent {
            client.write_all(part).await.unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let refused = serving.await.unwrap();
        drop(client.shutdown().await);
        let mut read = String::new();
        client.read_to_string(&mut read).await.unwrap();
        let answers = read.matches("HTTP/1.1 200 OK").count();
        (format!("{answers} answered"), refused)
    }

    #[tokio::test(start_paused = true)]
    async fn every_head_is_checked_before_hyper_reads_it() {
        // A body that reads as a head is passed as a body: the head after
        // it is the one refused.
        let (answered, refused) = served(
            b"POST / HTTP/1.1\r\ncontent-length: 18\r\n\r\nGET / HTTP/1.1\r\n\r\n\
              GET / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\nno colon\r\n\r\n",
        )
        .await;
        assert_eq!(answered, "2 answered");
        assert_eq!(
            refused,
            Some(HeadFault::bad(unparsable(
                httparse::Error::HeaderName,
                true
            )))
        );

        // Begun and not whole when hyper's header read timeout ends it: 408.
        let (answered, refused) = served(b"GET / HTTP/1.1\r\n\r\nGET / HT").await;
        assert_eq!(answered, "1 answered");
        assert_eq!(refused, Some(HeadFault::timed_out("stalled")));

        // Idle, or after empty lines only: closed without a word.
        let (answered, refused) = served(b"GET / HTTP/1.1\r\n\r\n\r\n").await;
        assert_eq!(answered, "1 answered");
        assert_eq!(refused, None);

        // After a chunked body, as after any other: the head after it is
        // refused in words.
        let (answered, refused) = served(
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n\
              GET / HTTP/1.1\r\nno colon\r\n\r\n",
        )
        .await;
        assert_eq!(answered, "1 answered");
        assert_eq!(
            refused,
            Some(HeadFault::bad(unparsable(
                httparse::Error::HeaderName,
                true
            )))
        );
    }

    /// A chunked request whose chunks read as heads.
    const CHUNKED: &[u8] = b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n\
                             5;a=b\r\nGET /\r\n12\r\nGET / HTTP/1.1\r\n\r\n\r\n0\r\n\r\n";

    #[tokio::test(start_paused = true)]
    async fn the_head_after_a_chunked_body_is_checked_too() {
        // Chunks that read as heads, a byte at a time, then a head
        // answered as any other, then one refused.
        let mut sent: Vec<&'static [u8]> = CHUNKED.chunks(1).collect();
        sent.push(b"GET / HTTP/1.1\r\n\r\n");
        sent.push(b"GET / HTTP/1.1\r\nno colon\r\n\r\n");
        let (answered, refused) = served_in(&sent).await;
        assert_eq!(answered, "2 answered");
        assert_eq!(
            refused,
            Some(HeadFault::bad(unparsable(
                httparse::Error::HeaderName,
                true
            )))
        );

        // A valid head after it is answered, and the connection idles.
        let (answered, refused) = served_in(&[CHUNKED, b"GET / HTTP/1.1\r\n\r\n"]).await;
        assert_eq!(answered, "2 answered");
        assert_eq!(refused, None);

        // Begun and not whole after a chunked body: 408.
        let (answered, refused) = served_in(&[CHUNKED, b"GET / HT"]).await;
        assert_eq!(answered, "1 answered");
        assert_eq!(refused, Some(HeadFault::timed_out("stalled")));

        // Chunked as the last coding, on any line of its own, in any case.
        let (answered, refused) = served(
            b"POST / HTTP/1.1\r\ntransfer-encoding: gzip\r\nTransfer-Encoding: x, Chunked \r\n\r\n\
              0\r\n\r\nGET / HTTP/1.1\r\nno colon\r\n\r\n",
        )
        .await;
        assert_eq!(answered, "1 answered");
        assert_eq!(
            refused,
            Some(HeadFault::bad(unparsable(
                httparse::Error::HeaderName,
                true
            )))
        );
    }

    /// A chunked body's bytes reach hyper as they come: the app answers
    /// its first chunk before the rest is sent, and the head after it is
    /// checked all the same.
    #[tokio::test]
    async fn a_chunked_body_passes_as_it_comes() {
        use http_body_util::BodyExt;
        use std::convert::Infallible;
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let serving = tokio::spawn(async move {
            let mut heads = Heads::new(server, check_head, MAX_REQUEST_HEAD);
            let service = hyper::service::service_fn(
                |request: http::Request<hyper::body::Incoming>| async move {
                    let mut body = request.into_body();
                    let first = match body.frame().await {
                        Some(Ok(frame)) => frame.into_data().unwrap_or_default(),
                        _ => bytes::Bytes::new(),
                    };
                    // The rest is read as it comes, after the answer.
                    tokio::spawn(async move { drop(body.collect().await) });
                    Ok::<_, Infallible>(http::Response::new(http_body_util::Full::new(first)))
                },
            );
            let refusal = heads.signals();
            let ended = crate::connections::serve_http1_for(
                &mut heads,
                service,
                Duration::from_secs(5),
                Duration::from_secs(600),
                refusal.refused(),
            )
            .await;
            heads.refused(ended.as_ref(), "stalled")
        });
        client
            .write_all(b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
            .await
            .unwrap();
        let mut read = Vec::new();
        while !read.ends_with(b"first") {
            let mut more = [0; 256];
            let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut more))
                .await
                .expect("the first chunk answered before the rest was sent")
                .unwrap();
            assert_ne!(n, 0, "closed: {}", String::from_utf8_lossy(&read));
            read.extend_from_slice(&more[..n]);
        }
        client
            .write_all(b"4\r\nrest\r\n0\r\n\r\nGET / HTTP/1.1\r\nno colon\r\n\r\n")
            .await
            .unwrap();
        let refused = serving.await.unwrap();
        assert_eq!(
            refused,
            Some(HeadFault::bad(unparsable(
                httparse::Error::HeaderName,
                true
            )))
        );
    }

    /// Serves one connection on a loopback socket as [`serve_behind_heads`]
    /// does. `sent` is written at once and the client then half-closes:
    /// what it read, and why the connection is to be answered in words.
    async fn served_on_a_socket(sent: &[u8]) -> (String, Option<HeadFault>) {
        served_on_a_socket_by(sent, true).await
    }

    /// As [`served_on_a_socket`], or by hyper's server alone (`heads`
    /// false).
    async fn served_on_a_socket_by(sent: &[u8], heads: bool) -> (String, Option<HeadFault>) {
        served_on_a_socket_in(&[sent], heads).await
    }

    /// As [`served_on_a_socket_by`], `sent` written in parts 50 ms apart
    /// (a part the server closed before is not written).
    async fn served_on_a_socket_in(sent: &[&[u8]], heads: bool) -> (String, Option<HeadFault>) {
        served_on_a_socket_apart(sent, heads, Duration::from_millis(50)).await
    }

    /// As [`served_on_a_socket_in`], the parts `gap` apart.
    async fn served_on_a_socket_apart(
        sent: &[&[u8]],
        heads: bool,
        gap: Duration,
    ) -> (String, Option<HeadFault>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let serving = tokio::spawn(serve(server, heads));
        for (at, part) in sent.iter().enumerate() {
            if at > 0 {
                tokio::time::sleep(gap).await;
            }
            if client.write_all(part).await.is_err() {
                break;
            }
        }
        drop(client.shutdown().await);
        let refused = tokio::time::timeout(Duration::from_secs(10), serving)
            .await
            .expect("the connection ends once the client half-closes")
            .unwrap();
        let mut read = Vec::new();
        drop(client.read_to_end(&mut read).await);
        (String::from_utf8_lossy(&read).into_owned(), refused)
    }

    /// Chunked requests pipelined in one write, as hyper frames them: an
    /// `Expect: 100-continue`, a quoted chunk extension holding `;` and
    /// `"`, zero-padded and upper-case sizes, and a second chunked body
    /// followed from its own start; requests answered before their bodies
    /// are read, which hyper reads to their ends once they are in. The head
    /// after them is checked.
    #[tokio::test]
    async fn pipelined_chunked_requests_are_followed_on_a_socket() {
        let no_colon = Some(HeadFault::bad(unparsable(
            httparse::Error::HeaderName,
            true,
        )));
        let (read, refused) = served_on_a_socket(
            b"POST / HTTP/1.1\r\nhost: a\r\nexpect: 100-continue\r\n\
              transfer-encoding: chunked\r\n\r\n\
              005;q=\"a;b\\\"c\"\r\nhello\r\n0\r\n\r\n\
              POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n\
              0A\r\nGET / HTTP\r\n0\r\n\r\n\
              POST /early HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n\
              GET / HTTP/1.1\r\nno colon\r\n\r\n",
        )
        .await;
        assert_eq!(read.matches("HTTP/1.1 200 OK").count(), 3, "{read}");
        assert_eq!(refused, no_colon, "{read}");

        let (read, refused) = served_on_a_socket(
            b"POST /early HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n\
              5\r\nhello\r\n0\r\n\r\nGET / HTTP/1.1\r\nno colon\r\n\r\n",
        )
        .await;
        assert_eq!(read.matches("HTTP/1.1 200 OK").count(), 1, "{read}");
        assert_eq!(refused, no_colon, "{read}");
    }

    /// Large chunks, whose data is read straight into hyper's buffer,
    /// reach hyper whole, in parts or pipelined, and the head after them
    /// is checked.
    #[tokio::test]
    async fn large_chunks_reach_hyper_whole() {
        let no_colon = Some(HeadFault::bad(unparsable(
            httparse::Error::HeaderName,
            true,
        )));
        let chunk = "x".repeat(256 * 1024);
        let body = format!(
            "{:x}\r\n{chunk}\r\n7\r\n, small\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
            chunk.len(),
            chunk.len()
        );
        let sent = format!(
            "POST /length HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n{body}\
             POST /length HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n{body}\
             GET / HTTP/1.1\r\nno colon\r\n\r\n"
        );
        let length = format!("length {}", 2 * chunk.len() + 7);
        let parts: Vec<&[u8]> = sent.as_bytes().chunks(100 * 1024).collect();
        for sent in [&[sent.as_bytes()][..], &parts] {
            let (read, refused) = served_on_a_socket_in(sent, true).await;
            assert_eq!(read.matches(&length).count(), 2, "{read}");
            assert_eq!(refused, no_colon, "{read}");
        }
    }

    /// `sent` served on a socket by hyper's server alone and behind
    /// [`Heads`]: how many requests each answered `200` and `400`, and why
    /// the connection behind `Heads` is to be answered in words.
    async fn compared(sent: &[u8]) -> ((usize, usize), (usize, usize), Option<HeadFault>) {
        let (alone, _) = served_on_a_socket_by(sent, false).await;
        let (behind, refused) = served_on_a_socket_by(sent, true).await;
        (answered(&alone), answered(&behind), refused)
    }

    /// How many requests `read` answers `200` and `400`, in HTTP/1.1 or
    /// HTTP/1.0.
    fn answered(read: &str) -> (usize, usize) {
        (
            read.matches(" 200 OK\r\n").count(),
            read.matches(" 400 Bad Request\r\n").count(),
        )
    }

    /// The chunked bodies hyper reads that the sidecar's forwarder does not
    /// take as they are (trailers, whitespace after a size, a size
    /// zero-padded past 16 digits) are followed as hyper reads them: the
    /// stream splits into requests behind `Heads` where hyper alone splits
    /// it, a valid head after the body is served, and a malformed one,
    /// which hyper alone answers with a status alone, is refused in words.
    #[tokio::test]
    async fn chunked_bodies_hyper_reads_are_followed_as_hyper_reads_them() {
        let no_colon = Some(HeadFault::bad(unparsable(
            httparse::Error::HeaderName,
            true,
        )));
        let padded = format!("{}5\r\nhello\r\n0\r\n\r\n", "0".repeat(40));
        let trailers = format!("0\r\n{}\r\n", "x-t: a b\r\n".repeat(100));
        let large = format!("0\r\nx: {}\r\n\r\n", "a".repeat(16 * 1024 - 8));
        // Chunk extensions of 16 KiB but a byte, their `;`s not counted.
        let extensions = format!(
            "{}0\r\n\r\n",
            format!("1;{}\r\nx\r\n", "e".repeat(1023)).repeat(16)
        )
        .replacen(';', &format!(";{}", "e".repeat(15)), 1);
        for body in [
            &b"5\r\nhello\r\n0\r\nx-t: 1\r\nX-U:\r\n\r\n"[..],
            trailers.as_bytes(),
            large.as_bytes(),
            b"5 \t \r\nhello\r\n0\t;a=b\r\n\r\n",
            b"5\t;a\r\nhello\r\n0 \r\nx: y\r\n\r\n",
            // Trailers as httparse and the `http` crate take them.
            b"0\r\nx: y\n\r\n\r\n",
            b"0\r\nx: \xc3\xa9\r\n\r\n",
            extensions.as_bytes(),
            padded.as_bytes(),
            b"00000000000000000005\r\nhello\r\n0\r\n\r\n",
        ] {
            let what = String::from_utf8_lossy(&body[..body.len().min(60)]).into_owned();
            // A request answered before its body is read: hyper then
            // reads the body once, to its end only if it is all in, so
            // only a small one.
            let early: &[bool] = if body.len() < 1024 {
                &[false, true]
            } else {
                &[false]
            };
            for &early in early {
                let head: &[u8] = if early {
                    b"POST /early HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n"
                } else {
                    b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n"
                };
                let valid = [head, body, b"GET / HTTP/1.1\r\nhost: a\r\n\r\n"].concat();
                let (alone, behind, refused) = compared(&valid).await;
                assert_eq!((alone, behind, refused), ((2, 0), (2, 0), None), "{what:?}");
                let malformed = [&valid[..], b"GET / HTTP/1.1\r\nno colon\r\n\r\n"].concat();
                let (alone, behind, refused) = compared(&malformed).await;
                assert_eq!(
                    (alone, behind, refused),
                    ((2, 1), (2, 0), no_colon),
                    "{what:?}"
                );
            }
        }
    }

    /// A chunked body hyper refuses (over its bounds on trailers, a size
    /// past 64 bits, a digit after whitespace, trailers that do not parse
    /// as fields) ends hyper's reading of the connection: behind `Heads`
    /// it answers as hyper alone does, and no later head is refused.
    #[tokio::test]
    async fn chunked_bodies_hyper_refuses_or_may_read_otherwise_are_hyper_s() {
        let many = format!("0\r\n{}\r\n", "x: y\r\n".repeat(101));
        let large = format!("0\r\nx: {}\r\n\r\n", "a".repeat(16 * 1024 - 7));
        for body in [
            many.as_bytes(),
            large.as_bytes(),
            b"10000000000000000\r\nhello\r\n0\r\n\r\n",
            b"5 5\r\nhello\r\n0\r\n\r\n",
            b"0\r\nx : y\r\n\r\n",
            b"0\r\nx: y\nz: w\r\n\r\n",
            b"0\r\nx: y\r\n folded\r\n\r\n",
        ] {
            let what = String::from_utf8_lossy(&body[..body.len().min(60)]).into_owned();
            let sent = [
                &b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n"[..],
                body,
                b"GET / HTTP/1.1\r\nhost: a\r\n\r\nGET / HTTP/1.1\r\nno colon\r\n\r\n",
            ]
            .concat();
            let (alone, behind, refused) = compared(&sent).await;
            assert_eq!((behind, refused), (alone, None), "{what:?}");
        }
    }

    /// After a request that ends its connection (`Connection: close` in
    /// HTTP/1.1, HTTP/1.0 without `keep-alive`), hyper answers it and
    /// closes, reading nothing more: behind `Heads` a malformed head sent
    /// after it, at once or while it is served, is neither read nor
    /// refused. A request that keeps its connection has the next head
    /// checked.
    #[tokio::test]
    async fn nothing_after_a_request_that_ends_its_connection_is_read() {
        let no_colon: &[u8] = b"GET / HTTP/1.1\r\nno colon\r\n\r\n";
        for last in [
            &b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n"[..],
            b"GET /slow HTTP/1.1\r\nhost: a\r\nConnection: te, Close\r\n\r\n",
            // A later `keep-alive` does not undo a `close`.
            b"GET / HTTP/1.1\r\nconnection: close\r\nconnection: keep-alive\r\n\r\n",
            b"GET /slow HTTP/1.0\r\n\r\n",
            b"GET / HTTP/1.0\r\nconnection: te\r\n\r\n",
            b"POST /slow HTTP/1.1\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n\
              5\r\nhello\r\n0\r\n\r\n",
            b"POST / HTTP/1.0\r\ncontent-length: 5\r\n\r\nhello",
        ] {
            let what = String::from_utf8_lossy(last).into_owned();
            for sent in [&[&[last, no_colon].concat()[..]][..], &[last, no_colon]] {
                for heads in [false, true] {
                    let (read, refused) = served_on_a_socket_in(sent, heads).await;
                    assert_eq!(refused, None, "{what:?} {read}");
                    assert_eq!(read.matches("HTTP/1.").count(), 1, "{what:?} {read}");
                    assert!(read.contains(" 200 OK\r\n"), "{what:?} {read}");
                }
            }
            // Nothing after it, and the client half-closes: what hyper
            // alone makes of the end of the stream while it answers (it
            // drops a slow answer) is what it makes of it behind `Heads`.
            let (alone, _) = served_on_a_socket_in(&[last], false).await;
            let (behind, refused) = served_on_a_socket_in(&[last], true).await;
            let answers = |read: &str| read.matches("HTTP/1.").count();
            assert_eq!(
                (answers(&behind), refused),
                (answers(&alone), None),
                "{what:?}"
            );
        }
        for kept in [
            &b"GET /slow HTTP/1.0\r\nconnection: Keep-Alive\r\n\r\n"[..],
            b"GET /slow HTTP/1.1\r\nconnection: keep-alive, x\r\n\r\n",
        ] {
            let what = String::from_utf8_lossy(kept).into_owned();
            let (read, refused) = served_on_a_socket_in(&[kept, no_colon], true).await;
            assert_eq!(
                refused,
                Some(HeadFault::bad(unparsable(
                    httparse::Error::HeaderName,
                    true
                ))),
                "{what:?} {read}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_chunked_body_hyper_may_read_otherwise_heads_are_hyper_s() {
        let no_colon = b"GET / HTTP/1.1\r\nno colon\r\n\r\n";
        for (body, answered) in [
            // Chunks that do not parse: hyper refuses them itself.
            (&b"zz\r\nhello\r\n0\r\n\r\n"[..], "1 answered"),
            (b"5\nhello\r\n0\r\n\r\n", "1 answered"),
            // Trailers that do not parse as fields.
            (b"0\r\nx : y\r\n\r\n", "1 answered"),
        ] {
            let head: &[u8] = b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n";
            let sent = [head, body, no_colon].concat().leak();
            let (got, refused) = served(sent).await;
            let body = String::from_utf8_lossy(body);
            assert_eq!((got.as_str(), refused), (answered, None), "{body:?}");
        }
        // Framings hyper refuses, or closes the connection after.
        for framing in [
            &b"transfer-encoding: chunked\r\ncontent-length: 5\r\n"[..],
            b"content-length: 5\r\ntransfer-encoding: chunked\r\n",
            b"transfer-encoding: chunked\r\ntransfer-encoding: gzip\r\n",
        ] {
            let sent = [
                &b"POST / HTTP/1.1\r\n"[..],
                framing,
                b"\r\n0\r\n\r\n",
                no_colon,
            ]
            .concat()
            .leak();
            let (_, refused) = served(sent).await;
            assert_eq!(refused, None, "{:?}", String::from_utf8_lossy(framing));
        }
    }

    #[test]
    fn the_framing_followed_is_hyper_s() {
        let framing =
            |fields: &str| framing(format!("POST / HTTP/1.1\r\n{fields}\r\n").as_bytes()).0;
        assert_eq!(framing("transfer-encoding: chunked\r\n"), Reading::Chunked);
        assert_eq!(
            framing("Transfer-Encoding: gzip , CHUNKED\r\n"),
            Reading::Chunked
        );
        assert_eq!(
            framing("transfer-encoding: chunked\r\ntransfer-encoding: gzip\r\n"),
            Reading::Through
        );
        assert_eq!(
            framing("transfer-encoding: gzip\r\ntransfer-encoding: chunked\r\n"),
            Reading::Chunked
        );
        assert_eq!(
            framing("transfer-encoding: chunked, gzip\r\n"),
            Reading::Through
        );
        assert_eq!(
            framing("transfer-encoding: chunked\r\ncontent-length: 3\r\n"),
            Reading::Through
        );
        assert_eq!(framing("content-length: 3\r\n"), Reading::Body(3));
        let http_1_0 = b"POST / HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n";
        assert_eq!(super::framing(http_1_0).0, Reading::Through);
        // Whether a request ends its connection, as hyper reads it.
        let last = |head: &str| super::framing(head.as_bytes()).1;
        assert!(!last("GET / HTTP/1.1\r\nconnection: keep-alive\r\n\r\n"));
        assert!(last("GET / HTTP/1.1\r\nconnection: x ,\tCLOSE\r\n\r\n"));
        assert!(last(
            "GET / HTTP/1.1\r\nconnection: close\r\nconnection: keep-alive\r\n\r\n"
        ));
        assert!(!last("GET / HTTP/1.1\r\nconnection: close, é\r\n\r\n"));
        assert!(last("GET / HTTP/1.0\r\n\r\n"));
        assert!(!last(
            "GET / HTTP/1.0\r\nconnection: x\r\nconnection: keep-alive\r\n\r\n"
        ));
        assert!(last(
            "GET / HTTP/1.0\r\nconnection: keep-alive, close\r\n\r\n"
        ));
        // hyper switches protocols only for an HTTP/1.1 request's
        // `Upgrade`, for a `CONNECT` in either version.
        let upgrade = "upgrade: websocket\r\nconnection: upgrade\r\ncontent-length: 3\r\n\r\n";
        for (head, reading) in [
            (format!("GET / HTTP/1.1\r\n{upgrade}"), Reading::Through),
            (format!("GET / HTTP/1.0\r\n{upgrade}"), Reading::Body(3)),
            ("CONNECT a:1 HTTP/1.0\r\n\r\n".to_string(), Reading::Through),
        ] {
            assert_eq!(super::framing(head.as_bytes()).0, reading, "{head:?}");
        }
    }

    /// An HTTP/1.0 request with an `Upgrade` and `keep-alive`, which hyper
    /// serves as any other and goes on reading after: the head after it,
    /// and after its body, is checked, and refused in words.
    #[tokio::test]
    async fn the_head_after_an_http_1_0_upgrade_is_checked() {
        for first in [
            &b"GET / HTTP/1.0\r\nupgrade: x\r\nconnection: keep-alive, upgrade\r\n\r\n"[..],
            b"POST / HTTP/1.0\r\nupgrade: x\r\nconnection: keep-alive\r\ncontent-length: 29\r\n\r\n\
              GET / HTTP/1.1\r\nno colon\r\n\r\n",
        ] {
            let what = String::from_utf8_lossy(first).into_owned();
            let sent = [first, NO_COLON].concat();
            let (alone, _) = served_on_a_socket_by(&sent, false).await;
            assert!(alone.starts_with("HTTP/1.0 200 OK\r\n"), "{what:?}: {alone}");
            assert_eq!(alone.matches("HTTP/1.0 400 Bad Request\r\n").count(), 1);
            let (behind, refused) = served_on_a_socket_by(&sent, true).await;
            assert!(behind.starts_with("HTTP/1.0 200 OK\r\n"), "{what:?}: {behind}");
            assert!(!behind.contains(" 400 "), "{what:?}: {behind}");
            let no_colon = HeadFault::bad(unparsable(httparse::Error::HeaderName, true));
            assert_eq!(refused, Some(no_colon), "{what:?}: {behind}");
        }
    }

    #[tokio::test]
    async fn the_prefix_is_freed_once_it_is_read() {
        // A forwarder's read buffer grown to a large head, then handed on.
        const HEAD: &[u8] = b"GET /ws HTTP/1.1\r\nupgrade: echo\r\n\r\n";
        let mut head = BytesMut::with_capacity(256 * 1024);
        head.extend_from_slice(HEAD);
        let (mut caller, ours) = tokio::io::duplex(1024);
        let mut stream = Rewind::with_prefix(head, ours);
        let mut read = vec![0; 10];
        stream.read_exact(&mut read).await.unwrap();
        assert!(stream.prefix.capacity() > 128 * 1024, "still being read");
        let mut rest = vec![0; HEAD.len() - 10];
        stream.read_exact(&mut rest).await.unwrap();
        read.extend(rest);
        assert_eq!(read, HEAD);
        assert_eq!(stream.prefix.capacity(), 0, "the read prefix is still held");
        // The stream itself follows.
        tokio::io::AsyncWriteExt::write_all(&mut caller, b"after")
            .await
            .unwrap();
        let mut after = [0; 5];
        stream.read_exact(&mut after).await.unwrap();
        assert_eq!(&after, b"after");
        // An empty prefix holds nothing from the start.
        let empty = Rewind::with_prefix(BytesMut::with_capacity(64 * 1024), caller);
        assert_eq!(empty.prefix.capacity(), 0, "an empty prefix is still held");
    }

    /// A small deterministic generator (xorshift64*), for the randomized
    /// comparison with hyper.
    struct Draw(u64);

    impl Draw {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        /// A number below `n`.
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        /// Whether a one-in-`n` chance came.
        fn one_in(&mut self, n: usize) -> bool {
            self.below(n) == 0
        }
        fn pick<T: Copy>(&mut self, from: &[T]) -> T {
            from[self.below(from.len())]
        }
    }

    /// The bytes a mutation puts in: each class a chunked body's framing
    /// tells apart, and some it does not.
    const ODD_BYTES: &[u8] = b"\r\n \t;\"=,:0fFgG\x00\x7f\x80\xff";

    /// A size line: `size` in hex of either case, perhaps zero-padded
    /// (sometimes past 16 digits), perhaps with whitespace and extensions
    /// (quoted ones holding `;` and `"`, or long ones near hyper's bound
    /// on a body's extensions).
    fn size_line(draw: &mut Draw, size: u64, out: &mut Vec<u8>) {
        match draw.below(6) {
            0 => out.extend(std::iter::repeat_n(b'0', draw.below(3))),
            1 if draw.one_in(3) => out.extend(std::iter::repeat_n(b'0', 14 + draw.below(30))),
            _ => {}
        }
        let hex = if draw.one_in(2) {
            format!("{size:x}")
        } else {
            format!("{size:X}")
        };
        out.extend_from_slice(hex.as_bytes());
        if draw.one_in(4) {
            for _ in 0..=draw.below(3) {
                out.push(draw.pick(b" \t"));
            }
        }
        for _ in 0..draw.pick(&[0, 0, 1, 1, 2]) {
            out.push(b';');
            match draw.below(12) {
                // Near hyper's bound on a body's extensions, where it
                // falls on one line.
                0 => out.extend(std::iter::repeat_n(b'e', 16 * 1024 - 3 + draw.below(5))),
                1..4 => out.extend_from_slice(b"q=\"a;b\\\"c\""),
                4..6 => out.extend_from_slice(b" a = b "),
                _ => out.extend_from_slice(b"name"),
            }
        }
        out.extend_from_slice(b"\r\n");
    }

    /// A chunked body drawn from RFC 9112's grammar as hyper reads it,
    /// near its bounds (data of 0 to 70 KiB a chunk, trailers near 100
    /// fields or 16 KiB), then mutated at times: a byte of a class the
    /// framing tells apart put in, dropped or changed, a chunk's data a
    /// byte short or long, a size past 64 bits.
    fn chunked_body(draw: &mut Draw) -> Vec<u8> {
        let mut body = Vec::new();
        for _ in 0..draw.below(4) {
            let size = match draw.below(10) {
                0 => 8 * 1024 + draw.below(64 * 1024),
                _ => 1 + draw.below(40),
            };
            size_line(draw, size as u64, &mut body);
            let data = size as i64 + [-1, 1][draw.below(2)] * i64::from(draw.one_in(20));
            body.extend((0..data.max(0)).map(|i| b"GET / HTTP/1.1\r\n"[i as usize % 16]));
            body.extend_from_slice(b"\r\n");
        }
        if draw.one_in(40) {
            body.extend_from_slice(b"10000000000000000\r\n");
        }
        size_line(draw, 0, &mut body);
        match draw.below(8) {
            0 => {
                let fields = 98 + draw.below(5);
                body.extend_from_slice(b"x: y\r\n".repeat(fields).as_slice());
            }
            1 => {
                // Trailers near 16 KiB, their CRLFs and last line counted.
                let long = 16 * 1024 - 10 + draw.below(6);
                body.extend_from_slice(b"x: ");
                body.extend(std::iter::repeat_n(b'a', long));
                body.extend_from_slice(b"\r\n");
            }
            2 => body.extend_from_slice(b"x-t: 1\r\nX-U:\r\n"),
            3 => body.extend_from_slice(draw.pick(&[
                &b"x : y\r\n"[..],
                b"x: y\r\n folded\r\n",
                b"x: y\nz: w\r\n",
                b"x: \xc3\xa9\r\n",
                b"\n\r\n",
                b"x:y\r\r\n",
            ])),
            _ => {}
        }
        body.extend_from_slice(b"\r\n");
        for _ in 0..draw.pick(&[0, 0, 0, 0, 0, 1, 1, 2]) {
            let at = draw.below(body.len() + 1);
            match draw.below(3) {
                0 => body.insert(at, draw.pick(ODD_BYTES)),
                1 if at < body.len() => drop(body.remove(at)),
                _ if at < body.len() => body[at] = draw.pick(ODD_BYTES),
                _ => {}
            }
        }
        body
    }

    const CHUNKED_POST: &[u8] = b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n";
    const VALID_GET: &[u8] = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n";
    const NO_COLON: &[u8] = b"GET / HTTP/1.1\r\nno colon\r\n\r\n";

    /// Whether hyper behind `Heads` answered as hyper alone: the same
    /// requests served, and a head hyper alone refused with a status alone
    /// refused in words instead, none other.
    fn agree(alone: (usize, usize), behind: (usize, usize), refused: Option<HeadFault>) -> bool {
        behind.0 == alone.0 && behind.1 == 0 && refused.is_some() == (alone.1 == 1)
    }

    /// Serves each of `cases` by hyper alone and behind `Heads`, 32 at a
    /// time, and asserts that they [`agree`], a case that does not shown
    /// by its first `shown` bytes. How many cases hyper alone answered with
    /// each count of requests served and refused.
    async fn all_agree(
        cases: &[Vec<u8>],
        shown: usize,
    ) -> std::collections::HashMap<(usize, usize), usize> {
        let mut served = std::collections::HashMap::new();
        for batch in cases.chunks(32) {
            let mut set = tokio::task::JoinSet::new();
            for sent in batch {
                let sent = sent.clone();
                set.spawn(async move {
                    let got = compared(&sent).await;
                    (sent, got)
                });
            }
            while let Some(done) = set.join_next().await {
                let (sent, (alone, behind, refused)) = done.unwrap();
                assert!(
                    agree(alone, behind, refused),
                    "alone {alone:?}, behind {behind:?} {refused:?}: {:?}",
                    String::from_utf8_lossy(&sent[..sent.len().min(shown)])
                );
                *served.entry(alone).or_insert(0) += 1;
            }
        }
        served
    }

    /// Randomized chunked bodies (a fixed seed), each after a chunked
    /// request and before a valid request and a malformed head, served on
    /// a socket by hyper alone and behind `Heads`: wherever hyper ends the
    /// body, or refuses it, behind `Heads` the same requests are answered,
    /// and the malformed head, if hyper reads it, is refused in words.
    #[tokio::test]
    async fn random_chunked_bodies_split_where_hyper_splits_them() {
        let mut draw = Draw(0x7e11_15c0_ffee_0042);
        let cases: Vec<Vec<u8>> = (0..2000)
            .map(|_| [CHUNKED_POST, &chunked_body(&mut draw), VALID_GET, NO_COLON].concat())
            .collect();
        let served = all_agree(&cases, 400).await;
        // The draw reaches bodies hyper reads (then the valid request is
        // served and the malformed head read) and bodies it refuses.
        assert!(served.get(&(2, 1)).is_some_and(|&n| n > 300), "{served:?}");
        assert!(
            served.keys().any(|&(ok, bad)| ok < 2 && bad == 0),
            "{served:?}"
        );
    }

    /// Randomized `Connection` fields (a fixed seed): tokens in lists, in
    /// any case, with whitespace, in one field or two, in HTTP/1.1 or
    /// HTTP/1.0 (with an `Upgrade` at times, which hyper ignores there),
    /// before a malformed head. Behind `Heads` the same requests are
    /// answered as by hyper alone, the malformed head refused in words
    /// exactly when hyper alone reads it: none is read after a request
    /// hyper closes after, none left unchecked after one it keeps.
    #[tokio::test]
    async fn random_connection_fields_end_a_connection_where_hyper_ends_it() {
        const TOKENS: &[&str] = &[
            "close",
            "Close",
            "CLOSE",
            "keep-alive",
            "Keep-Alive",
            "te",
            "closed",
            "clos",
            "x",
            "",
            "close\t",
            "\tkeep-alive ",
            "keep-alive;",
            "\u{e9}",
        ];
        let mut draw = Draw(0xc105_e000_0000_0001);
        let cases: Vec<Vec<u8>> = (0..400)
            .map(|_| {
                let version = draw.pick(&["1.1", "1.0"]);
                let mut head = format!("GET / HTTP/{version}\r\nhost: a\r\n");
                if version == "1.0" && draw.one_in(3) {
                    head.push_str("upgrade: websocket\r\n");
                }
                for _ in 0..draw.pick(&[0, 1, 1, 1, 2]) {
                    let tokens: Vec<&str> =
                        (0..1 + draw.below(3)).map(|_| draw.pick(TOKENS)).collect();
                    let sep = draw.pick(&[",", ", ", " ,\t"]);
                    let name = draw.pick(&["connection", "Connection", "CONNECTION"]);
                    head.push_str(&format!("{name}: {}\r\n", tokens.join(sep)));
                }
                head.push_str("\r\n");
                [head.as_bytes(), NO_COLON].concat()
            })
            .collect();
        let served = all_agree(&cases, usize::MAX).await;
        // Both kinds are drawn: requests that keep and that end it.
        assert!(served.get(&(1, 1)).is_some_and(|&n| n > 50), "{served:?}");
        assert!(served.get(&(1, 0)).is_some_and(|&n| n > 50), "{served:?}");
    }

    /// `sent` split in two at each of `at`, the parts 2 ms apart, served
    /// behind `Heads` as hyper alone serves it whole.
    async fn split_as_hyper_reads_it(sent: Vec<u8>, at: std::ops::Range<usize>) {
        let (alone, _) = served_on_a_socket_by(&sent, false).await;
        let alone = answered(&alone);
        let sent = Arc::new(sent);
        let mut set = tokio::task::JoinSet::new();
        for at in at {
            let sent = sent.clone();
            set.spawn(async move {
                let parts = [&sent[..at], &sent[at..]];
                let gap = Duration::from_millis(2);
                (at, served_on_a_socket_apart(&parts, true, gap).await)
            });
        }
        while let Some(done) = set.join_next().await {
            let (at, (behind, refused)) = done.unwrap();
            let behind = answered(&behind);
            assert!(
                agree(alone, behind, refused),
                "split at {at}: alone {alone:?}, behind {behind:?} {refused:?}: {:?}",
                String::from_utf8_lossy(&sent[..sent.len().min(400)])
            );
        }
    }

    /// Bodies split across reads at every byte: drawn ones hyper reads and
    /// refuses, and a large chunk (read straight into hyper's buffer)
    /// whose end and CRLF fall at the split, or its next size line's.
    #[tokio::test]
    async fn chunked_bodies_split_anywhere_split_where_hyper_splits_them() {
        let mut draw = Draw(0x5eed_0000_c0de_0007);
        let (mut read, mut refused) = (0, 0);
        while read + refused < 6 {
            let body = chunked_body(&mut draw);
            if body.len() > 160 {
                continue;
            }
            let sent = [CHUNKED_POST, &body, VALID_GET, NO_COLON].concat();
            let (alone, _) = served_on_a_socket_by(&sent, false).await;
            let counter = if answered(&alone) == (2, 1) {
                &mut read
            } else {
                &mut refused
            };
            if *counter < 3 {
                *counter += 1;
                let start = CHUNKED_POST.len();
                split_as_hyper_reads_it(sent, start..start + body.len() + 1).await;
            }
        }
        let chunk = "x".repeat(40 * 1024);
        let body = format!(
            "{:x}\r\n{chunk}\r\n1e ;a\r\n{}\r\n0\r\n\r\n",
            chunk.len(),
            &chunk[..30]
        );
        let sent = [CHUNKED_POST, body.as_bytes(), VALID_GET, NO_COLON].concat();
        let end = CHUNKED_POST.len() + body.find("\r\n1e").unwrap();
        split_as_hyper_reads_it(sent, end - 2..end + 10).await;
    }
}
