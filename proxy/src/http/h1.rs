//! The HTTP/1.1 forwarder: one loop per caller connection that reads a
//! request head, decides it, writes it to an app connection, and passes the
//! answer back, following the body's framing and nothing more. It replaces,
//! for the requests it takes, hyper's server and client dispatchers (two
//! state machines and a task hand-off per request) with one parse of each
//! head and byte copies.
//!
//! **What it takes.** A request whose framing has one reading: HTTP/1.1
//! or HTTP/1.0 (below), in origin form or in absolute form with the `http` scheme (`GET
//! http://api/x`, RFC 9112 section 3.2.2, as clients configured with an
//! HTTP proxy send it: as on hyper's path, its authority is what a `Host`
//! must name and the `Host` the rules and the app get when none was sent,
//! its path what the rules match and the access log writes,
//! and the app gets it in origin form), a body framed by Content-Length (one value, however
//! often sent: the app gets it once, without leading zeros), by
//! `Transfer-Encoding: chunked` (that one coding, in one field) or none,
//! no `Upgrade`, no `Expect` but `100-continue` (in one field), no gRPC,
//! and a head within [`MAX_REQUEST_HEADERS`] fields (all parsed at once,
//! so no head is handed over for its number of fields). A chunked body
//! goes to the app as it came, chunk framing, extensions and trailers
//! included (not chunked again), and is followed as it passes
//! ([`Chunked`], as a chunked answer is), so its end is known and the
//! next request on the connection is read here too. The first request
//! that is anything else is handed with the bytes read so far to hyper's
//! server ([`super::serve`]), which serves it and the rest of the
//! connection as it serves every other HTTP/1 connection: upgrades, other
//! targets (`*`, another scheme's absolute form) and CONNECT, other
//! expectations and codings other than `chunked` alone are answered as
//! before. A head that does
//! not parse (a bare CR in its request line or a header line among the
//! faults named), whose framing no server may
//! read (two lengths, a `Transfer-Encoding` not ending in `chunked` or on
//! HTTP/1.0, one beside a `Content-Length`, which RFC 9112 section 6.1
//! lets a server refuse: an app reading the length would take the rest of
//! the chunked body as requests), with more
//! than 100 fields, longer than [`MAX_REQUEST_HEAD`], with a target
//! longer than [`MAX_TARGET`] or with a raw `#` in its target
//! ([`l7::target_problem`]: the `http` crate drops it and what follows) is
//! answered here, with 400 (431, 414) and a
//! text naming what was wrong and the limit ([`HeadFault`], in the words
//! of [`RULES`]), and the
//! connection closed; the answer is one access-log line (no method or
//! path, its `problem`) and counted as `invalid`. Every head up to the
//! hand-off is read here, whole, and the head handed over is checked for
//! what hyper would refuse in it (its target), so none of these gets
//! hyper's answer, which is a status alone.
//!
//! **After a hand-off.** hyper's server answers a head it refuses with a
//! status alone (its `on_error`, which nothing outside hyper can change)
//! and closes a head that stalls without a word, so it is given none of
//! them: every later head on a connection it serves is read and checked
//! first, by the same check (`check_head`), as it passes to hyper
//! ([`Heads`](trellis_core::http1::Heads), which follows each body, by
//! its `Content-Length` or its chunks ([`Chunked`]), to find the next
//! head). A head it refuses is answered
//! as the forwarder answers one (`refuse_later_head`), once hyper has
//! written the answer in progress; one begun and not whole when hyper's
//! header read timeout ([`HEAD_TIMEOUT`]) ends the connection is answered
//! 408 ([`HEAD_TIMED_OUT`]); either is logged and counted once, as
//! `invalid`. Some heads are still hyper's: after a chunked body hyper
//! refuses (one that does not parse, or over hyper's bounds on chunk
//! extensions or trailers: hyper reads nothing after it), after
//! a request whose framing the check leaves to hyper, and after an HTTP/1.1 upgrade or a `CONNECT`,
//! whose bytes are another protocol's (an answer that does not switch
//! says `connection: close`, so the connection ends with it rather than
//! go on unchecked; an `Upgrade` in HTTP/1.0, which hyper never switches
//! for, is read as any other field). A malformed head there gets hyper's answer, 400, 414 or
//! 431 with no body, and the error hyper ends the connection with is
//! logged and counted as the forwarder's refusals are
//! ([`HeadFault::from_hyper`]). HTTP/2 (gRPC among it) is not HTTP/1 and
//! has no such heads.
//!
//! **HTTP/1.0.** As on hyper's path: the request goes to the app in
//! HTTP/1.0 (a `Transfer-Encoding` in it is refused above, and an
//! `Expect` gets no `100 Continue`), its app connection is not parked
//! (the app closes it after the answer), and the answer is written in
//! HTTP/1.0. The caller's connection goes on only when the caller asked
//! for it (`Connection: keep-alive`) and the answer's length is known;
//! that answer then says `connection: keep-alive`. Any other answer ends
//! with the connection: one of unknown length up to the app's close, a
//! chunked one without its chunk framing (HTTP/1.0 has none, so it never
//! gets a chunked answer).
//!
//! **`Expect: 100-continue`.** As on hyper's path: the app gets the
//! field, and the caller a `100 Continue` once its request has gone to
//! the app with the body still to come (hyper's server sends it as the
//! body is first read; one whose body came whole with its head is not
//! sent one, which RFC 9110 section 10.1.1 allows). A request the sidecar
//! answers itself (a denial, a rate limit, an app it cannot reach) is
//! answered at once, without a `100 Continue`, and its connection closed
//! (lingering, below): the caller may send its body or not, so what
//! follows cannot be read as a request. The app's own interim answers
//! are dropped, as all are (below), so the caller gets one `100
//! Continue`, the sidecar's.
//!
//! **What it does with one.** The same as hyper's path: hop-by-hop headers
//! removed and the caller's identity set ([`Exchange::start`]), the
//! request authorized ([`Authorize`]) and checked against the rate limits
//! ([`RateLimit`]) with the same answers, the access-log line and metrics
//! written when the answer is over ([`Entry`]). The request goes to an app
//! connection parked between the requests of the caller's identity
//! ([`AppConnections`](super::upstream::AppConnections)), and is parked
//! again after the answer unless bytes came after it or the request was a
//! `GET` or `HEAD` with a body (an app that ignores that body reads it as a
//! request, and answers it too); a
//! connection the app closed while parked is noticed before it is used,
//! and a request that meets one the app closes as it goes out is sent on
//! another connection when that cannot apply it twice (`never_read`) and
//! all of it that has left the caller is kept to be sent again: the whole
//! request read with its head, or the head and what came with it while
//! none of the rest of the body has gone to the app (or been read past
//! what is kept). An `Expect: 100-continue` upload meeting such a
//! connection has sent no body yet, so it goes out again, and its caller
//! is told `100 Continue` once. A request some of whose streamed body has
//! gone to the app is answered 502: that part cannot be sent again.
//!
//! **The answer.** Its head is parsed (at most [`MAX_ANSWER_HEAD`] bytes,
//! 1xx answers, `100 Continue` and `103 Early Hints` among them, dropped
//! as hyper's client drops them) and rewritten: the status line in
//! HTTP/1.1 (HTTP/1.0 to an HTTP/1.0 request) whatever version the app
//! answered in (RFC 9110 section 6.2: an intermediary sends its own), the
//! hop-by-hop headers removed, `Content-Length` dropped beside
//! `Transfer-Encoding`, `Date` added when missing. Its body is passed on as
//! it came, framed as the app framed it: by its length, chunked (the
//! chunks are followed, [`Chunked`], so the end of the answer is known and
//! a malformed chunk ends the connection), or up to the app closing, after
//! which the caller's connection closes too (an HTTP/1.0 answer without a
//! length among them, framed so in HTTP/1.1 too). The app connection is
//! parked only if the app keeps it: not after `Connection: close`, nor
//! after an HTTP/1.0 answer that does not say `Connection: keep-alive`
//! (HTTP/1.0's default is to close). An answer that cannot be read
//! one way (two lengths, a malformed head, a `Transfer-Encoding` in an
//! HTTP/1.0 answer, which RFC 9112 section 6.1 has a recipient treat as
//! faulty framing) is 502, "invalid answer from the app", as on hyper's
//! path (whose client refuses the same), and its app connection closed.
//!
//! **Bodies that stream.** A request whose body is not all read with its
//! head has the rest copied to the app while the answer is read and passed
//! back (`duplex`): an app may answer before it has read the body (413,
//! say), and the caller gets that answer while its body is still on the
//! way. The connection is kept only if the whole body went out. The access
//! log counts a chunked body's payload, without its framing, as it does an
//! answer's.
//!
//! **A chunk that does not parse.** The caller's fault, on this path as on
//! hyper's (which bound chunk extensions alike: 16 KiB over a whole body,
//! whichever size lines carry them): 400, [`MALFORMED_CHUNK`](super::proxy::MALFORMED_CHUNK) and
//! what was wrong, logged as the caller's, and the connection closed. One
//! read with the head is refused before the app gets any of the request;
//! one found as the body streams closes the app connection (the app waits
//! for the rest of a body that will not come), and once the app's answer
//! has begun the caller's connection just ends, as it does for a caller
//! gone mid-body.
//!
//! **Closing.** A connection that closes after an answer that left a
//! request body unread (a denial, a malformed head) lingers ([`LINGER`]):
//! the caller's answer is not lost to the reset its unread bytes would
//! make the kernel send. hyper's connections do the same ([`Lingering`]),
//! also when the body of the request it answered is still on its way.
//!
//! **Bounded.** At most [`PIPELINED`] bytes are read ahead of a request in
//! flight; a head must arrive within [`HEAD_TIMEOUT`] of the connection
//! waiting for it (as hyper's header read timeout, which also ends idle
//! keep-alive connections): a connection with no byte of a head by then
//! (but empty lines) is idle, and closed without a word; one with part of
//! a head is answered 408 ([`HEAD_TIMED_OUT`], `trellis-proxy-error:
//! request_timeout`), logged and counted as a malformed head is, and
//! closed (as Envoy's header timeout answers; nginx closes without one),
//! after a hand-off too (above).
//! A head is read up to [`MAX_REQUEST_HEAD`] bytes,
//! parsed again past 16 KiB only when a line of it has ended, after at
//! most [`MAX_EMPTY_LINES`] bytes of empty lines, dropped as they come
//! rather than parsed again with each read; the buffers
//! of a request go back to a small spare set of the thread's when it is
//! over (`Buffers`), so an idle caller holds none but what it sent ahead,
//! and a busy one allocates none per request.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll, Waker, ready};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Either};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tower::Layer;
pub use trellis_core::http1::chunked::Chunked;
use trellis_core::http1::{Bounds, HeadFault, HeadRules, INVALID_METHOD, INVALID_TARGET};
use trellis_core::policy::l7::{self, HeadLimit};
use trellis_core::refusal::{self, token};

use super::access::{Direction, Entry};
use super::authz::{Authorize, AuthorizeLayer};
use super::proxy::{Exchange, GrpcCode, LocalBody, local};
use super::ratelimit::{RateLimit, RateLimitLayer};
use super::upstream::Reusable;
use super::{Connection, Protocol, Rewind, detect, headers};

/// What a head over [`MAX_REQUEST_HEAD`] is told.
pub use trellis_core::policy::l7::HEAD_TOO_LARGE;
/// The largest request head the sidecar reads, on either path: a longer
/// one is answered 431 ([`HEAD_TOO_LARGE`]) by the forwarder, which reads
/// every connection's first head. hyper's server, which reads the heads
/// after a hand-off, is given the same bound (its default read buffer).
pub use trellis_core::policy::l7::MAX_REQUEST_HEAD;
/// The longest request target the sidecar takes (hyper's bound, and the
/// `http` crate's): a longer one is answered 414 ([`TARGET_TOO_LONG`]),
/// before any hand-off.
pub use trellis_core::policy::l7::MAX_TARGET;
/// What a target over [`MAX_TARGET`] is told.
pub use trellis_core::policy::l7::TARGET_TOO_LONG;
/// What a head with more than [`MAX_REQUEST_HEADERS`] fields is told.
pub use trellis_core::policy::l7::TOO_MANY_FIELDS;
/// The most bytes of empty lines read before a request line (RFC 9112
/// section 2.2 has a server ignore at least one): as many as protocol
/// detection reads ([`detect::MAX_PEEK`]). More are answered 400
/// ([`TOO_MANY_EMPTY_LINES`]).
pub const MAX_EMPTY_LINES: usize = detect::MAX_PEEK;
/// What a caller sending more than [`MAX_EMPTY_LINES`] of empty lines is
/// told.
pub const TOO_MANY_EMPTY_LINES: &str = "more than 8 KiB of empty lines before the request line";
const _: () = assert!(
    MAX_EMPTY_LINES == 8 * 1024,
    "TOO_MANY_EMPTY_LINES names the bound"
);
/// What a request framed both by `Transfer-Encoding` and
/// `Content-Length` is told.
pub const TWO_FRAMINGS: &str =
    "both Transfer-Encoding and Content-Length: a request body is framed one way";
/// The largest header map a thread keeps for its next requests
/// ([`Buffers::fields`]): one grown for a head of many fields is freed.
const KEPT_FIELDS: usize = 128;
/// What tells a caller that sent `Expect: 100-continue` to send its body.
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
/// The largest answer head read from the app (hyper's client's bound).
pub const MAX_ANSWER_HEAD: usize = 8192 + 4096 * 100;
/// The most header fields of an answer (hyper's client's bound).
const MAX_ANSWER_HEADERS: usize = 100;
/// Why an HTTP/1.0 answer with a `Transfer-Encoding` is refused, as the
/// log line of its 502 says.
const TRANSFER_ENCODING_IN_HTTP_1_0: &str = "Transfer-Encoding in an HTTP/1.0 answer";
/// How long a caller has to send a whole request head, counted from when
/// the connection starts waiting for it.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// What a caller that sent part of a request head, and not the rest
/// within [`HEAD_TIMEOUT`], is told (with 408).
pub const HEAD_TIMED_OUT: &str = "request head did not arrive within 30 s";
const _: () = assert!(
    HEAD_TIMEOUT.as_secs() == 30 && HEAD_TIMEOUT.subsec_nanos() == 0,
    "HEAD_TIMED_OUT names the bound"
);
/// How long the rest of a request body may go without a byte of it
/// reaching the app once the answer is out (nginx's `client_body_timeout`
/// is as long): an app that answered without reading the body and keeps
/// its end open would otherwise hold both connections.
#[cfg(not(test))]
pub const BODY_STALL: Duration = Duration::from_secs(60);
// Long enough that a test's own steps, each a third of it, stay inside it
// on a loaded machine, whose threads can wait hundreds of milliseconds to run.
#[cfg(test)]
pub const BODY_STALL: Duration = Duration::from_millis(1500);
/// The most bytes read from a caller ahead of its request in flight.
pub const PIPELINED: usize = 64 * 1024;
/// What an app connection's buffer starts at, and grows to under bulk
/// answers.
const ANSWER_BUFFER: usize = 8 * 1024;
const ANSWER_BUFFER_BULK: usize = 64 * 1024;
/// The least room for a caller's bytes read while an answer is awaited.
const CALLER_ROOM: usize = 64;
/// How many sets of [`Buffers`] a thread keeps for its next requests: one
/// for each request in flight at once, up to this many. A set for 1 KiB
/// bodies is about 11 KiB, and a kept set at most 40 KiB (its answer
/// buffer up to twice [`ANSWER_BUFFER`], each head buffer up to
/// [`SPARE_HEAD`]): memory glibc would mostly keep in its heap after a
/// burst anyway.
const SPARE_KEPT: usize = 32;
/// The largest head buffer kept: a request head with the body read with
/// it, or an answer head with its first bytes of body.
const SPARE_HEAD: usize = ANSWER_BUFFER + 4096;

thread_local! {
    static SPARE: RefCell<Vec<Buffers>> = const { RefCell::new(Vec::new()) };
}

/// The buffers one request uses: the request as written to the app, the
/// answer as read from it, and the answer's head rewritten for the caller.
/// A request takes a set from its thread's spares and gives it back when
/// its answer is over, so requests in a row on a busy sidecar reuse the
/// same blocks instead of allocating three (one of them 8 KiB) each.
/// Grown sets (a bulk answer, a long head) are freed, not kept, and a
/// thread keeps at most [`SPARE_KEPT`].
struct Buffers {
    request: Vec<u8>,
    answer: BytesMut,
    rewritten: Vec<u8>,
    /// The request's header map, for the next head parsed on the thread
    /// ([`Buffers::fields`]); empty (and unallocated) while a request
    /// holds it.
    fields: HeaderMap,
}

impl Buffers {
    fn take() -> Self {
        SPARE.with_borrow_mut(Vec::pop).unwrap_or_else(|| Buffers {
            request: Vec::with_capacity(512),
            answer: BytesMut::with_capacity(ANSWER_BUFFER),
            rewritten: Vec::with_capacity(512),
            fields: HeaderMap::new(),
        })
    }

    /// An empty header map for a head being parsed: a kept set's, if the
    /// thread has one with its map (the set stays kept, its map then
    /// unallocated), or a new one for `fields` fields. The map comes back
    /// with the request's set, in [`Buffers::keep_fields`].
    fn fields(fields: usize) -> HeaderMap {
        SPARE
            .with_borrow_mut(|spare| {
                let set = spare
                    .iter_mut()
                    .rev()
                    .find(|set| set.fields.capacity() > 0)?;
                Some(std::mem::take(&mut set.fields))
            })
            .unwrap_or_else(|| HeaderMap::with_capacity(fields))
    }

    /// Keeps the header map of a request whose head is written, emptied
    /// when the set is given back.
    fn keep_fields(&mut self, request: Request<()>) {
        self.fields = request.into_parts().0.headers;
    }

    /// Keeps the set for the thread's next request, emptied, if it is of
    /// the usual sizes and the thread has room.
    fn give_back(mut self) {
        self.answer.clear();
        let usual = self.request.capacity() <= SPARE_HEAD
            && self.rewritten.capacity() <= SPARE_HEAD
            && self.answer.try_reclaim(ANSWER_BUFFER)
            && self.answer.capacity() <= 2 * ANSWER_BUFFER;
        if !usual {
            return;
        }
        if self.fields.capacity() > KEPT_FIELDS {
            self.fields = HeaderMap::new();
        }
        // Drops the values, and with them the request head's bytes.
        self.fields.clear();
        self.request.clear();
        self.rewritten.clear();
        SPARE.with_borrow_mut(|spare| {
            if spare.len() < SPARE_KEPT {
                spare.push(self);
            }
        });
    }
}

/// An app connection of the forwarder.
pub struct AppStream(TcpStream);

impl Reusable for AppStream {
    /// Whether the app has closed it, or sent bytes no request asked for:
    /// either way it cannot carry another request. Costs a system call
    /// only when the runtime has seen the socket become readable since it
    /// was last read.
    fn is_closed(&self) -> bool {
        let mut probe = [0u8; 1];
        !matches!(self.0.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

/// How [`serve`] ended.
pub enum Served<S> {
    /// The connection is over.
    Closed,
    /// A request the forwarder does not take: the connection, with what
    /// was read of it put back, is hyper's from here. `drained`: the
    /// sidecar has begun to drain (its future has resolved).
    HandOff { io: Rewind<S>, drained: bool },
}

/// The caller's side of a connection.
struct Caller<S> {
    io: S,
    /// What was read and not yet used: the rest of a head, or requests
    /// sent ahead.
    buf: BytesMut,
    /// The caller may still be sending a request body the connection
    /// closes without reading: [`linger`] before closing.
    unread: bool,
    /// The request in flight is HTTP/1.0: its answers are written in
    /// HTTP/1.0, say `connection: keep-alive` when the connection goes on,
    /// and are never chunked.
    http_1_0: bool,
}

/// How long a connection closed with a request body unread goes on
/// reading (and dropping) what the caller sends, after its answer; and
/// the most bytes it reads, as nginx's `lingering_close` does: closing a
/// socket with unread bytes makes the kernel reset the connection, and a caller still sending its body (a
/// denied upload, say) would see "connection reset" instead of the answer
/// that says why. Bounded both ways, so a caller cannot hold the
/// connection by streaming; one that sends more, or for longer, gets the
/// reset.
pub const LINGER: Duration = Duration::from_secs(2);
pub const LINGER_BYTES: usize = 8 << 20;

/// After an answer that closes the connection with a request body unread
/// and the write side shut down: reads what the caller still sends, into
/// the connection's own buffer, until it closes its end, or for
/// [`LINGER`] or [`LINGER_BYTES`], whichever comes first.
async fn linger<S: AsyncRead + Unpin>(caller: &mut Caller<S>) {
    let Caller { io, buf, .. } = caller;
    refusal::linger(io, buf, LINGER, LINGER_BYTES).await;
}

/// A caller's stream as hyper's server has it: closing it lingers as the
/// forwarder's connections do ([`LINGER`]), when the caller has sent
/// bytes hyper left unread (the body of a request it answered early, a
/// denied upload say), or may still be sending them: the last request's
/// body had not all arrived when hyper took the request. Bytes waiting
/// on a TLS stream read as none until a whole record is in, so a caller
/// sending its body slowly often has only part of a record waiting, or
/// nothing, at the close, and would be reset a moment later. A caller
/// that sent nothing more, after a request whose body was in, is closed
/// at once. The stream of a connection that switched protocols is closed
/// as it is: its bytes are the byte copy's.
pub struct Lingering<S> {
    io: S,
    conn: Arc<Connection>,
    closing: Closing,
}

enum Closing {
    Open,
    /// Shut down for writing; whether the caller is still sending not yet
    /// known.
    ShutDown,
    /// Dropping what the caller sends, until it closes, the deadline
    /// passes or `left` bytes more have been dropped.
    Lingering {
        deadline: Pin<Box<tokio::time::Sleep>>,
        left: usize,
    },
    Done,
}

impl<S> Lingering<S> {
    pub fn new(io: S, conn: Arc<Connection>) -> Self {
        Lingering {
            io,
            conn,
            closing: Closing::Open,
        }
    }
}

/// Reads and drops what the caller has sent, into a buffer on the stack:
/// the bytes dropped, 0 once it has closed its end (or failed).
fn drop_some<S: AsyncRead + Unpin>(io: &mut S, cx: &mut Context<'_>) -> Poll<usize> {
    let mut scratch = [0u8; 8192];
    let mut buf = tokio::io::ReadBuf::new(&mut scratch);
    match Pin::new(io).poll_read(cx, &mut buf) {
        Poll::Ready(Ok(())) => Poll::Ready(buf.filled().len()),
        Poll::Ready(Err(_)) => Poll::Ready(0),
        Poll::Pending => Poll::Pending,
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Lingering<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Lingering<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            match &mut this.closing {
                Closing::Open => {
                    ready!(Pin::new(&mut this.io).poll_shutdown(cx))?;
                    this.closing = if this.conn.switched() {
                        Closing::Done
                    } else {
                        Closing::ShutDown
                    };
                }
                // Bytes waiting now are what would make the kernel reset
                // the connection on close, and so are those of a body
                // still on its way.
                Closing::ShutDown => {
                    let dropped = match drop_some(&mut this.io, cx) {
                        Poll::Ready(0) => None,
                        Poll::Ready(n) => Some(n),
                        Poll::Pending => this.conn.body_unfinished().then_some(0),
                    };
                    this.closing = match dropped {
                        None => Closing::Done,
                        Some(n) => Closing::Lingering {
                            deadline: Box::pin(tokio::time::sleep(LINGER)),
                            left: LINGER_BYTES.saturating_sub(n),
                        },
                    };
                }
                Closing::Lingering { deadline, left } => {
                    if *left == 0 || deadline.as_mut().poll(cx).is_ready() {
                        this.closing = Closing::Done;
                        continue;
                    }
                    match ready!(drop_some(&mut this.io, cx)) {
                        0 => this.closing = Closing::Done,
                        n => *left = left.saturating_sub(n),
                    }
                }
                Closing::Done => return Poll::Ready(Ok(())),
            }
        }
    }
}

/// Answers a head the forwarder refuses ([`HeadFault`]) with its status and
/// what was wrong as a text body, as the sidecar's other answers are
/// written, and `connection: close`; the length of the body written. The
/// admin port answers the heads it refuses so too.
pub(crate) async fn refuse_head<S: AsyncWrite + Unpin>(
    io: &mut S,
    fault: &HeadFault,
) -> io::Result<usize> {
    let status = fault.status;
    let mut out = Vec::with_capacity(256);
    status_line(
        &mut out,
        false,
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
    );
    field(&mut out, b"content-type", b"text/plain; charset=utf-8");
    field(
        &mut out,
        super::proxy::PROXY_ERROR.as_str().as_bytes(),
        proxy_error(fault).as_bytes(),
    );
    let body = trellis_core::refusal::body_text(fault.why.as_bytes(), true);
    let mut digits = itoa::Buffer::new();
    field(
        &mut out,
        b"content-length",
        digits.format(body.len()).as_bytes(),
    );
    head_end(&mut out, false, true, false);
    out.extend_from_slice(&body);
    io.write_all(&out).await?;
    io.flush().await?;
    Ok(body.len())
}

/// Serves HTTP/1.1 requests from `io` until the caller is done, the
/// sidecar drains (an idle connection is closed, the answer in flight
/// says `connection: close`), or a request comes that hyper must serve.
pub async fn serve<S, D>(
    conn: &Arc<Connection>,
    io: S,
    mut draining: Pin<&mut D>,
) -> io::Result<Served<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
    D: Future<Output = ()>,
{
    let (peer, port) = (conn.peer.clone(), conn.target.port());
    let mut authorize = AuthorizeLayer::new(
        peer.clone(),
        port,
        conn.policies.clone(),
        conn.http.metrics.clone(),
    )
    .layer(());
    let mut limit = RateLimitLayer::new(peer, conn.policies.clone()).layer(());
    let mut caller = Caller {
        io,
        buf: BytesMut::new(),
        unread: false,
        http_1_0: false,
    };
    let mut drain = Drain {
        draining: draining.as_mut(),
        done: false,
    };
    loop {
        let taken = match read_head(&mut caller, &mut drain).await? {
            Some(Taken::Request(taken)) => taken,
            Some(Taken::Other) => {
                let Caller { io, buf, .. } = caller;
                return Ok(Served::HandOff {
                    io: Rewind::with_prefix(buf, io),
                    drained: drain.done,
                });
            }
            Some(Taken::Refused(fault)) => {
                // Logged and counted once the answer is out (or failed).
                let entry = refused_entry(&fault, conn.clone());
                entry.count(Direction::Out, refuse_head(&mut caller.io, &fault).await?);
                drop(entry);
                // What follows the head (a body, say) is never read as a
                // request.
                let _ = caller.io.shutdown().await;
                linger(&mut caller).await;
                return Ok(Served::Closed);
            }
            None => {
                // close_notify: a TLS caller can tell a clean end from a
                // cut.
                let _ = caller.io.shutdown().await;
                return Ok(Served::Closed);
            }
        };
        let close = one_request(
            conn,
            &mut caller,
            taken,
            &mut authorize,
            &mut limit,
            &mut drain,
        )
        .await?;
        if close {
            // The answer said `connection: close`; a TLS caller gets
            // close_notify.
            let _ = caller.io.shutdown().await;
            if caller.unread {
                linger(&mut caller).await;
            }
            return Ok(Served::Closed);
        }
    }
}

/// Whether the sidecar has begun to drain, asked without waiting.
struct Drain<'a, D> {
    draining: Pin<&'a mut D>,
    done: bool,
}

impl<D: Future<Output = ()>> Drain<'_, D> {
    fn started(&mut self) -> bool {
        if !self.done {
            let mut cx = Context::from_waker(Waker::noop());
            self.done = self.draining.as_mut().poll(&mut cx).is_ready();
        }
        self.done
    }

    async fn wait(&mut self) {
        if !self.done {
            self.draining.as_mut().await;
            self.done = true;
        }
    }
}

/// A request head, as read.
// Moved once a request, straight into `one_request`: boxing the request
// would cost an allocation a request.
#[allow(clippy::large_enum_variant)]
enum Taken {
    Request(Head),
    /// Not one the forwarder takes: hyper's.
    Other,
    /// Not one at all, framed in a way no server may read, or not whole
    /// in time: answered with what is wrong, and the connection closed.
    Refused(HeadFault),
}

struct Head {
    request: Request<()>,
    /// How its body is framed: by its length (0 without one), or chunked.
    body: Framing,
    /// The caller asked for the connection to close after it.
    close: bool,
    /// The caller sent `Expect: 100-continue`: it may wait for a `100
    /// Continue` before it sends the body.
    expect: bool,
}

/// Reads the next request head; `None` once the caller has closed the
/// connection between requests, the sidecar drains while it is idle, or
/// no byte of a head (but empty lines) came within [`HEAD_TIMEOUT`]. A
/// head begun and not whole by then is refused with 408
/// ([`HEAD_TIMED_OUT`]).
async fn read_head<S, D>(
    caller: &mut Caller<S>,
    drain: &mut Drain<'_, D>,
) -> io::Result<Option<Taken>>
where
    S: AsyncRead + Unpin,
    D: Future<Output = ()>,
{
    let deadline = tokio::time::Instant::now() + HEAD_TIMEOUT;
    // The bytes already parsed as part of a head that is not all in: past
    // 16 KiB a head is parsed again only once a line of it may have
    // ended, so a long head sent a few bytes at a time is not parsed whole
    // once a read.
    let mut parsed: usize = 0;
    // The empty lines before the request line, dropped as they come: every
    // read of them ends a line, and parsing them again with each would
    // cost the square of their number.
    let mut skipped = 0;
    loop {
        let empty = caller.buf.len() - detect::skip_empty_lines(&caller.buf).len();
        if empty > 0 {
            caller.buf.advance(empty);
            parsed = parsed.saturating_sub(empty);
            skipped += empty;
            if skipped > MAX_EMPTY_LINES {
                return Ok(Some(Taken::Refused(HeadFault::bad(TOO_MANY_EMPTY_LINES))));
            }
        }
        let again = caller.buf.len() <= 16 * 1024 || caller.buf[parsed..].contains(&b'\n');
        if !caller.buf.is_empty() && again {
            match take_head(&mut caller.buf) {
                Some(taken) => return Ok(Some(taken)),
                None => parsed = caller.buf.len(),
            }
        }
        if caller.buf.len() >= MAX_REQUEST_HEAD {
            let fault = HeadFault::over(HeadLimit::Size, &RULES.bounds);
            return Ok(Some(Taken::Refused(fault)));
        }
        if caller.buf.capacity() - caller.buf.len() < 1024 {
            caller.buf.reserve(4096.max(caller.buf.len() / 2));
        }
        let idle = caller.buf.is_empty();
        let may_drain = idle && !drain.done;
        let read = tokio::select! {
            // The read first: bytes of a request already received are
            // served, even when the drain has begun; only a connection
            // with none is idle, and closed.
            biased;
            read = tokio::time::timeout_at(deadline, caller.io.read_buf(&mut caller.buf)) => read,
            () = drain.wait(), if may_drain => return Ok(None),
        };
        match read {
            Ok(Ok(0)) if idle => return Ok(None),
            // A head cut short: hyper's server says what is wrong with it.
            Ok(Ok(0)) => return Ok(Some(Taken::Other)),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
            // A kept-alive connection with no byte of a next head is idle:
            // closed without a word, as hyper's server closes one.
            Err(_elapsed) if idle => {
                tracing::debug!(
                    "no request head within {}: idle connection closed",
                    trellis_core::duration::Words(HEAD_TIMEOUT)
                );
                return Ok(None);
            }
            // Part of a head came and the rest did not (a caller that
            // stalled, or one holding connections open a byte at a time):
            // told why, as Envoy's header timeout tells it.
            Err(_elapsed) => {
                return Ok(Some(Taken::Refused(HeadFault::timed_out(HEAD_TIMED_OUT))));
            }
        }
    }
}

/// Takes a complete request head off `buf` if it is one the forwarder
/// serves; `Some(Taken::Other)` if hyper must have it; `None` if more
/// bytes are needed.
fn take_head(buf: &mut BytesMut) -> Option<Taken> {
    #[cfg(test)]
    tests::PARSED.set(tests::PARSED.get() + buf.len());
    // Every field a head may have, on the stack: a head over the bound is
    // refused, never handed to hyper without the checks below.
    let mut fields = [httparse::EMPTY_HEADER; MAX_REQUEST_HEADERS];
    let mut parsed = httparse::Request::new(&mut fields);
    let len = match RULES.parse(&mut parsed, buf) {
        Ok(Some(len)) => len,
        Ok(None) => return None,
        Err(fault) => return Some(Taken::Refused(fault)),
    };
    let (Some(method), Some(target), Some(version)) = (parsed.method, parsed.path, parsed.version)
    else {
        return Some(Taken::Other);
    };
    if let Some(fault) = RULES.refuses(parsed.headers.len(), len, target) {
        return Some(Taken::Refused(fault));
    }
    // Targets neither in origin form nor in absolute form with the `http`
    // scheme (`*`, `https://`...) and CONNECT are hyper's, once the head's
    // framing is known to be readable.
    let mut other = !(target.starts_with('/') || http_absolute(target)) || method == "CONNECT";
    let base = buf.as_ptr() as usize;
    let at = |part: &[u8]| {
        let start = part.as_ptr() as usize - base;
        start..start + part.len()
    };
    let path = at(target.as_bytes());
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Some(Taken::Refused(HeadFault::bad(INVALID_METHOD)));
    };
    let mut body = None;
    let mut close = false;
    // HTTP/1.0 closes the connection after the answer unless the caller
    // asks for keep-alive (RFC 9112 appendix C.2.2).
    let mut keep_alive = false;
    // Whether the caller waits to be told to send its body.
    let mut expect = false;
    // Whether the request has a `Transfer-Encoding`, and whether its last
    // one ends in `chunked` (hyper's reading).
    let mut coded = None;
    // Whether it is one field of the one coding `chunked`: the forwarder
    // follows that framing itself; any other is hyper's.
    let mut only_chunked = false;
    let mut lengths = false;
    let mut ranges: [(Range<usize>, Range<usize>); MAX_REQUEST_HEADERS] =
        std::array::from_fn(|_| (0..0, 0..0));
    // The fields that reach the app: all but the repeats of
    // `Content-Length`.
    let mut count = 0;
    for field in parsed.headers.iter() {
        let name = field.name.as_bytes();
        let mut value = field.value;
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            if version != 1 {
                return Some(Taken::Refused(HeadFault::bad(
                    "Transfer-Encoding in an HTTP/1.0 request",
                )));
            }
            only_chunked = coded.is_none() && value.trim_ascii().eq_ignore_ascii_case(b"chunked");
            coded = Some(ends_chunked(value));
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            other = true;
        } else if name.eq_ignore_ascii_case(b"expect") {
            // `100-continue`, in one field, is the forwarder's to answer
            // (hyper's reading); any other expectation is hyper's, which
            // passes it on.
            other |= expect || !value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
            expect = true;
        } else if name.eq_ignore_ascii_case(b"content-length") {
            lengths = true;
            let Some(length) = decimal(value) else {
                return Some(Taken::Refused(HeadFault::bad("invalid Content-Length")));
            };
            match body {
                Some(b) if b != length => {
                    return Some(Taken::Refused(HeadFault::bad(
                        "two different Content-Length values",
                    )));
                }
                // One field says the length to the app (RFC 9110 section
                // 8.6): apps that refuse two (Node's, Go's) would answer
                // 400 to `5` and `005` sent as two.
                Some(_) => continue,
                None => body = Some(length),
            }
            // Written as the number the sidecar read, without leading
            // zeros: the one spelling every app reads alike.
            let zeros = value.iter().take_while(|d| **d == b'0').count();
            value = &value[zeros.min(value.len() - 1)..];
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in headers::list(value) {
                other |= token.eq_ignore_ascii_case(b"upgrade");
                close |= token.eq_ignore_ascii_case(b"close");
                keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name.eq_ignore_ascii_case(b"content-type")
            && value.starts_with(b"application/grpc")
        {
            other = true;
        }
        ranges[count] = (at(name), at(value));
        count += 1;
    }
    let body = match coded {
        Some(false) => {
            return Some(Taken::Refused(HeadFault::bad(
                "Transfer-Encoding whose last coding is not chunked",
            )));
        }
        // Two framings: an app reading the length would take the rest of
        // the chunked body as requests of its own (RFC 9112 section 6.1
        // lets a server refuse it).
        Some(true) if lengths => {
            return Some(Taken::Refused(HeadFault::bad(TWO_FRAMINGS)));
        }
        _ if other => return Some(for_hyper(target)),
        Some(true) if only_chunked => Framing::Chunked(Chunked::default()),
        Some(true) => return Some(for_hyper(target)),
        None => Framing::Length(body.unwrap_or(0)),
    };
    let head = buf.split_to(len).freeze();
    match build(&head, method, path, &ranges[..count]) {
        Ok(mut request) if version == 0 => {
            *request.version_mut() = Version::HTTP_10;
            // The app gets the field, but an HTTP/1.0 caller is not told
            // `100 Continue` (hyper's reading: it knows no 1xx answer).
            Some(Taken::Request(Head {
                request,
                body,
                close: close || !keep_alive,
                expect: false,
            }))
        }
        Ok(request) => Some(Taken::Request(Head {
            request,
            body,
            close,
            expect,
        })),
        Err(Unbuilt::Target) => Some(Taken::Refused(HeadFault::bad(INVALID_TARGET))),
        Err(Unbuilt::Field) => {
            // Put the head back for hyper, which says what is wrong.
            let mut whole = BytesMut::with_capacity(head.len() + buf.len());
            whole.extend_from_slice(&head);
            whole.extend_from_slice(buf);
            *buf = whole;
            Some(Taken::Other)
        }
    }
}

/// Whether a request target is in absolute form with the `http` scheme
/// (RFC 9112 section 3.2.2), as clients configured with an HTTP proxy
/// send it; the scheme is case-insensitive.
fn http_absolute(target: &str) -> bool {
    target
        .as_bytes()
        .get(..7)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case(b"http://"))
}

/// What of a parsed head the request could not be built from.
enum Unbuilt {
    /// The target is not a path and query the `http` crate takes (hyper
    /// refuses it too).
    Target,
    /// A field name or value: hyper, which takes them as parsed, has it.
    Field,
}

/// The request of a parsed head; the target and values share `head`'s
/// bytes. An absolute-form target is parsed as hyper's server parses it:
/// its authority is what a `Host` must name ([`l7::host_problem`]), its
/// path what the rules match, as on hyper's path.
fn build(
    head: &Bytes,
    method: Method,
    target: Range<usize>,
    fields: &[(Range<usize>, Range<usize>)],
) -> Result<Request<()>, Unbuilt> {
    let target = head.slice(target);
    let uri = if target.first() == Some(&b'/') {
        Uri::from(PathAndQuery::from_maybe_shared(target).map_err(|_| Unbuilt::Target)?)
    } else {
        Uri::from_maybe_shared(target).map_err(|_| Unbuilt::Target)?
    };
    let mut headers = Buffers::fields(fields.len() + 1);
    for (name, value) in fields {
        let name = HeaderName::from_bytes(&head[name.clone()]).map_err(|_| Unbuilt::Field)?;
        let value = HeaderValue::from_maybe_shared(head.slice(value.clone()))
            .map_err(|_| Unbuilt::Field)?;
        headers.append(name, value);
    }
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;
    Ok(request)
}

/// What the sidecar refuses in a request head beyond what hyper's server
/// refuses, in its words: its bounds as its answers and `policy explain`
/// name them ([`Bounds::SIDECAR`], [`HeadLimit::http1`]: a head that came
/// whole in a read past its bound is over it all the same), and a raw `#`
/// in a target ([`l7::target_problem`]), which the `http` crate, and hyper
/// with it, drops with what follows it, so that the rules and the app
/// would get another target than the one sent. A head that does not
/// parse is told what was wrong, a bare CR in its request line or a
/// header line among the faults named.
pub const RULES: HeadRules = HeadRules {
    bounds: Bounds::SIDECAR,
    target: l7::target_problem,
};

/// The `trellis-proxy-error` token of the answer to a refused head:
/// `request_timeout` for a head that did not come whole in time,
/// `invalid_request` for the others.
fn proxy_error(fault: &HeadFault) -> &'static str {
    if fault.status == StatusCode::REQUEST_TIMEOUT {
        token::REQUEST_TIMEOUT
    } else {
        token::INVALID_REQUEST
    }
}

/// The access-log entry of a head refused on `conn` (written as it
/// drops), its refusal traced: by the forwarder, or by hyper's server
/// after a hand-off (read from its error by [`HeadFault::from_hyper`], in
/// the sidecar's words, [`RULES`]).
pub(crate) fn refused_entry(fault: &HeadFault, conn: Arc<Connection>) -> Entry {
    let what = if fault.status == StatusCode::REQUEST_TIMEOUT {
        "request head timed out"
    } else {
        "malformed request head"
    };
    tracing::debug!(peer = %conn.peer, problem = fault.why, "{what}");
    Entry::refused_head(conn, Protocol::Http1.as_str(), fault.status, fault.why)
}

/// Answers a head refused after a hand-off, later on a connection
/// hyper's server serves (by [`Heads`](trellis_core::http1::Heads), before
/// hyper read it, or begun and not whole when hyper's header read timeout
/// ended the connection), as the forwarder answers a head it refuses
/// ([`refuse_head`]): logged and counted once the answer is out (or
/// failed), and the connection closed, lingering.
pub(crate) async fn refuse_later_head<S: AsyncRead + AsyncWrite + Unpin>(
    heads: trellis_core::http1::Heads<S>,
    fault: &HeadFault,
    conn: Arc<Connection>,
) {
    let (mut buf, mut io) = heads.into_parts();
    let entry = refused_entry(fault, conn);
    if let Ok(written) = refuse_head(&mut io, fault).await {
        entry.count(Direction::Out, written);
        drop(entry);
        let _ = io.shutdown().await;
        refusal::linger(&mut io, &mut buf, LINGER, LINGER_BYTES).await;
    }
}

/// A complete head that hyper is to serve, unless hyper would refuse its
/// request `target`: nothing in the head a connection is handed over with
/// gets hyper's answer, a status alone. (The target is copied to be read
/// so: once for a connection, on the path where hyper copies its head.)
fn for_hyper(target: &str) -> Taken {
    match Uri::try_from(target) {
        Ok(_) => Taken::Other,
        Err(_) => Taken::Refused(HeadFault::bad(INVALID_TARGET)),
    }
}

/// The most header fields of a request, on either path: a head with more
/// is answered 431 ([`TOO_MANY_FIELDS`]) by the forwarder, which parses
/// them all; hyper's server, which reads the heads after a hand-off, has
/// the same bound (its default).
pub use trellis_core::policy::l7::MAX_REQUEST_HEADERS;

/// A connection's first request head as far as it has come in `buf`,
/// checked as the forwarder checks it ([`RULES`]), for a server that hands
/// every head to hyper's (the admin port's): `Ok(None)` while more of it
/// is to come, `Ok(Some(len))` for a whole head of `len` bytes that is
/// none of those faults, or the fault, in the forwarder's words. Its
/// framing (`Content-Length`, `Transfer-Encoding`) and its field names
/// are left to hyper.
pub(crate) fn check_head(buf: &[u8]) -> Result<Option<usize>, HeadFault> {
    RULES.check(buf)
}

/// Whether a `Transfer-Encoding` value's last coding is `chunked`, as hyper
/// reads it.
fn ends_chunked(value: &[u8]) -> bool {
    value
        .rsplit(|&b| b == b',')
        .next()
        .is_some_and(|coding| coding.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// A Content-Length value: digits only, as RFC 9110 section 8.6 has it.
fn decimal(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    value.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// Serves one request; whether the connection closes after it.
async fn one_request<S, D>(
    conn: &Arc<Connection>,
    caller: &mut Caller<S>,
    head: Head,
    authorize: &mut Authorize<()>,
    limit: &mut RateLimit<()>,
    drain: &mut Drain<'_, D>,
) -> io::Result<bool>
where
    S: AsyncRead + AsyncWrite + Unpin,
    D: Future<Output = ()>,
{
    let Head {
        request,
        body: mut framing,
        close,
        expect,
    } = head;
    let head_request = request.method() == Method::HEAD;
    let chunked = matches!(framing, Framing::Chunked(_));
    let http_1_0 = request.version() == Version::HTTP_10;
    caller.http_1_0 = http_1_0;
    // A body on a `GET` or `HEAD` has no meaning (RFC 9110 section 9.3),
    // and an app may ignore it, then read it as a request of its own and
    // answer that too, after this request's answer. Its app connection is
    // closed after the answer rather than parked: the next request (of
    // this caller: others never share it) would read that answer as its own.
    // An HTTP/1.0 request goes to the app in HTTP/1.0, as hyper's client
    // sends it, and the app closes its connection after the answer.
    let park = (matches!(framing, Framing::Length(0))
        || !matches!(*request.method(), Method::GET | Method::HEAD))
        && !http_1_0;
    let mut exchange = Exchange::start(conn, request, Protocol::Http1);
    if let Some(answer) = authorize
        .check(&mut exchange)
        .or_else(|| limit.check(&mut exchange))
    {
        let unread = Unread {
            body: framing
                .ends_in([&caller.buf, &[]])
                .map_or(u64::MAX, |n| n as u64),
            head_request,
        };
        return answer_locally(caller, exchange.entry, answer, unread, close, drain).await;
    }
    let Exchange { request, entry, .. } = exchange;
    // The body read with the head: a chunk in it that does not parse is
    // refused before the app gets any of the request.
    let (buffered, whole) = match framing.take(&caller.buf) {
        Ok(taken) => taken,
        Err(fault) => {
            let answer = super::proxy::malformed_chunk_answer(conn, false, &fault);
            let unread = Unread {
                body: u64::MAX,
                head_request,
            };
            return answer_locally(caller, entry, answer, unread, close, drain).await;
        }
    };
    let mut bufs = Buffers::take();
    request_head(&mut bufs.request, &request, conn, chunked);
    bufs.request.extend_from_slice(&caller.buf[..buffered]);
    entry.count(Direction::In, framing.payload(&caller.buf[..buffered]));
    caller.buf.advance(buffered);
    // The body bytes still to come from the caller: none, or some (how
    // many, `framing` knows). What is in `bufs.request` can be written
    // again to another connection when the first did not take it: the
    // whole request (`whole`), or its head and the body read with it
    // while none of the rest has been taken from the caller.
    let rest = if whole { 0 } else { u64::MAX };
    let idempotent = request.method().is_idempotent();
    // Whether the caller has been told `100 Continue`: once, whatever
    // connection the request goes out on.
    let mut continued = false;

    let target = conn.target;
    bufs.keep_fields(request);
    let mut entry = entry;
    let (mut app, parsed) = loop {
        let (mut app, reused) = match conn.http.h1.unpark(target, &conn.peer) {
            Some(app) => (app, true),
            None => match crate::net::connect(target).await {
                Ok(tcp) => (AppStream(tcp), false),
                Err(e) => {
                    let e = Failed::Unreachable(super::proxy::connect_failure(&e));
                    let unread = Unread {
                        body: rest,
                        head_request,
                    };
                    return failed(conn, caller, entry, e, unread, close, drain).await;
                }
            },
        };
        let (unread, unsent) = match app.0.write_all(&bufs.request).await {
            Ok(()) if !whole => {
                // The request is on its way to the app: a caller waiting
                // to send its body is told to go on (as hyper's server
                // tells it when the body is first read). One that was
                // refused, or whose request never went out, is not; and
                // one whose body is all in has no need to be.
                if expect && !continued {
                    caller.io.write_all(CONTINUE).await?;
                    caller.io.flush().await?;
                    continued = true;
                }
                let request = Streaming {
                    body: framing.clone(),
                    head_request,
                    close,
                    park,
                    reused,
                    idempotent,
                };
                match duplex(conn, caller, app, entry, request, bufs, drain).await {
                    Streamed::Over(over) => return over,
                    Streamed::Again(back, kept) => {
                        (entry, bufs) = (back, kept);
                        continue;
                    }
                }
            }
            Ok(()) => (0, false),
            Err(e) => {
                tracing::debug!(app = %conn.target, error = %e, "writing the request to the app failed");
                // The body still to come from the caller, if any, stays
                // with the caller (what it sends meanwhile is kept in
                // `caller.buf`): it goes unread if the connection closes
                // after the answer.
                (rest, true)
            }
        };
        // The answer to a request whose body did not all go out closes
        // the connection, and says so.
        let reading = read_answer(
            &mut app.0,
            &mut bufs.answer,
            Some(&mut *caller),
            AnswerTo {
                head_request,
                close: close || unread != 0,
                http_1_0,
            },
            &mut *drain,
            &mut bufs.rewritten,
        );
        match reading.await {
            Ok(parsed) => break (app, parsed),
            Err(Reading::Caller(e)) => return Err(e),
            // The next connection gets the request if all of it that left
            // the caller is in `bufs.request`: the whole request, or one
            // whose head could not be written, the rest of its body still
            // the caller's. (One whose head went out streams its body in
            // `duplex`, which asks the same there.)
            Err(ref reading)
                if (whole || unsent)
                    && send_again(reading, reused, &bufs.answer, idempotent, unsent, &app.0) =>
            {
                conn.http.metrics.app_request_retry(whole);
                continue;
            }
            Err(reading) => {
                let unread = Unread {
                    body: unread,
                    head_request,
                };
                return failed(conn, caller, entry, reading.into(), unread, close, drain).await;
            }
        }
    };
    let Parsed {
        status,
        framing,
        app_close,
        close,
    } = parsed;
    entry.set_status(status);
    let passed = pass_body(
        &mut caller.io,
        &mut app.0,
        &mut bufs.answer,
        &mut bufs.rewritten,
        framing,
        app_close,
        &entry,
    )
    .await;
    drop(entry);
    bufs.give_back();
    settle(conn, passed.map(|reusable| reusable && park), app, close)
}

/// After an answer was passed to the caller (or not all of it): the app
/// connection parked if it can carry another request; whether the caller's
/// connection closes.
fn settle(
    conn: &Connection,
    passed: Result<bool, Passing>,
    app: AppStream,
    close: bool,
) -> io::Result<bool> {
    match passed {
        Ok(reusable) => {
            if reusable {
                conn.http.h1.park(conn.target, &conn.peer, app);
            }
            Ok(close)
        }
        Err(Passing::Caller(e)) => Err(e),
        Err(Passing::App(e)) => {
            // The head is out; all the caller can be told is that the
            // answer ended early.
            tracing::debug!(peer = %conn.peer, app = %conn.target, error = %e, "answer from the app ended early");
            Ok(true)
        }
    }
}

/// Why a request body stopped before its end.
#[derive(Debug)]
enum BodyStopped {
    /// The caller's stream ended or failed: the rest will never come.
    CallerGone(io::Error),
    /// Writing to the app failed, or the rest stalled after the answer.
    Failed(io::Error),
    /// A chunk of the caller's did not parse: what was wrong.
    Malformed(&'static str),
}

impl std::fmt::Display for BodyStopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::CallerGone(e) => write!(f, "the caller went away: {e}"),
            Self::Failed(e) => e.fmt(f),
            Self::Malformed(why) => f.write_str(why),
        }
    }
}

/// The rest of a request body whose answer is out, for as long as it
/// moves: [`BODY_STALL`] without a byte of it reaching the app ends it.
async fn rest_of_body(
    mut body: Pin<&mut impl Future<Output = Result<(), BodyStopped>>>,
    entry: &Entry,
) -> Result<(), BodyStopped> {
    loop {
        let before = entry.bytes_in();
        match tokio::time::timeout(BODY_STALL, body.as_mut()).await {
            Ok(sent) => return sent,
            Err(_) if entry.bytes_in() == before => {
                return Err(BodyStopped::Failed(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the rest of the body did not move for {} after the answer",
                        trellis_core::duration::Words(BODY_STALL)
                    ),
                )));
            }
            Err(_) => {}
        }
    }
}

/// Streams the rest of a request `body` from the caller to the app,
/// following its framing: a chunked body goes as it came, each byte of it
/// checked ([`Chunked`]), and stops at a chunk that does not parse. While
/// a write to the app waits, what the caller sends is read ahead into
/// `ahead` (up to [`PIPELINED`] bytes), so a caller that goes away ends
/// the request even when the app has stopped reading. Bytes read past the
/// body are left in `buf`, in order. The access log counts the payload
/// (without chunk framing) as it goes out. `touched` is set once a byte
/// of the body has gone to the app or been read ahead: until then, all of
/// it read from the caller is in `buf`.
async fn stream_body<R, W>(
    caller: &mut R,
    buf: &mut BytesMut,
    app: &mut W,
    mut body: Framing,
    entry: &Entry,
    touched: &AtomicBool,
) -> Result<(), BodyStopped>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let gone = || BodyStopped::CallerGone(io::ErrorKind::UnexpectedEof.into());
    let mut ahead = BytesMut::new();
    let mut caller_done = false;
    loop {
        if buf.is_empty() {
            if ahead.is_empty() {
                if caller_done {
                    return Err(gone());
                }
                buf.reserve(8192);
                let read = caller.read_buf(buf).await;
                if read.map_err(BodyStopped::CallerGone)? == 0 {
                    return Err(gone());
                }
            } else {
                std::mem::swap(buf, &mut ahead);
            }
            continue;
        }
        let (take, done) = body.take(buf).map_err(BodyStopped::Malformed)?;
        let mut payload = body.payload(&buf[..take]);
        let mut sent = 0;
        while sent < take {
            let written = loop {
                let watch = !caller_done && ahead.len() < PIPELINED;
                if watch && ahead.capacity() - ahead.len() < 1024 {
                    ahead.reserve(8192);
                }
                tokio::select! {
                    biased;
                    written = app.write(&buf[sent..take]) => break written.map_err(BodyStopped::Failed)?,
                    read = caller.read_buf(&mut ahead), if watch => {
                        let read = read.map_err(BodyStopped::CallerGone)?;
                        touched.store(true, Relaxed);
                        if read == 0 {
                            // Gone before the body was all sent, or done.
                            if done || body.ends_in([&buf[take..], &ahead]).is_some() {
                                caller_done = true;
                            } else {
                                return Err(gone());
                            }
                        }
                    }
                }
            };
            if written == 0 {
                return Err(BodyStopped::Failed(io::ErrorKind::WriteZero.into()));
            }
            touched.store(true, Relaxed);
            sent += written;
            let counted = written.min(payload);
            payload -= counted;
            entry.count(Direction::In, counted);
        }
        buf.advance(take);
        if done {
            break;
        }
    }
    buf.extend_from_slice(&ahead);
    Ok(())
}

/// A request whose body streams from the caller: the body goes to the app
/// while its answer is read and passed back, both at once, as an app may
/// answer before it has read the body. The connection is kept only if the
/// whole body went out; the answer's head says `connection: close` if it
/// is known by then that it will not.
///
/// A parked connection (`reused`) the app closes before answering, when
/// none of the body has gone to the app or been read past what `caller`
/// keeps (for an `Expect: 100-continue` request, also when the caller has
/// not sent any of it yet), gives the request back to go out on another
/// connection ([`Streamed::Again`]) under the rules of the whole request:
/// its method is idempotent, or the app never read it ([`never_read`], or
/// the first write of the body failed, the connection already reset).
async fn duplex<S, D>(
    conn: &Arc<Connection>,
    caller: &mut Caller<S>,
    mut app: AppStream,
    entry: Entry,
    request: Streaming,
    mut bufs: Buffers,
    drain: &mut Drain<'_, D>,
) -> Streamed
where
    S: AsyncRead + AsyncWrite + Unpin,
    D: Future<Output = ()>,
{
    let Streaming {
        body,
        head_request,
        close,
        park,
        reused,
        idempotent,
    } = request;
    let http_1_0 = caller.http_1_0;
    let touched = AtomicBool::new(false);
    // Whether the answer's head is read, and so on its way to the caller.
    let answer_begun = AtomicBool::new(false);
    let (sent, answered) = {
        let (mut app_r, mut app_w) = app.0.split();
        let (mut caller_r, mut caller_w) = tokio::io::split(&mut caller.io);
        let body = stream_body(
            &mut caller_r,
            &mut caller.buf,
            &mut app_w,
            body,
            &entry,
            &touched,
        );
        let answering = async {
            let parsed = read_answer(
                &mut app_r,
                &mut bufs.answer,
                None::<&mut Caller<S>>,
                AnswerTo {
                    head_request,
                    close,
                    http_1_0,
                },
                &mut *drain,
                &mut bufs.rewritten,
            )
            .await?;
            answer_begun.store(true, Relaxed);
            entry.set_status(parsed.status);
            let passed = pass_body(
                &mut caller_w,
                &mut app_r,
                &mut bufs.answer,
                &mut bufs.rewritten,
                parsed.framing,
                parsed.app_close,
                &entry,
            )
            .await;
            Ok::<_, Reading>((parsed.close, passed))
        };
        let mut body = std::pin::pin!(body);
        let mut answering = std::pin::pin!(answering);
        let mut sent = None;
        let answered = loop {
            tokio::select! {
                done = &mut body, if sent.is_none() => match done {
                    // A caller gone mid-body leaves the app waiting for the
                    // rest, which never comes: the request ends here, and
                    // the app connection closes with it.
                    Err(BodyStopped::CallerGone(e)) => {
                        tracing::debug!(peer = %conn.peer, app = %conn.target, error = %e, "the caller went away mid-body");
                        return Streamed::Over(Err(e));
                    }
                    // So does a chunk that does not parse: the app waits
                    // for the rest of a body it will not get. Before the
                    // answer, the caller is told what was wrong; after it,
                    // the connection ends as for a caller gone.
                    Err(BodyStopped::Malformed(fault)) if !answer_begun.load(Relaxed) => {
                        break Err(fault);
                    }
                    Err(BodyStopped::Malformed(fault)) => {
                        super::proxy::log_malformed_chunk(conn, &fault);
                        return Streamed::Over(Err(io::Error::new(io::ErrorKind::InvalidData, fault)));
                    }
                    done => sent = Some(done),
                },
                answered = &mut answering => break Ok(answered),
            }
        };
        // The answer is out: the body goes on until it is all sent, the
        // caller goes away, or it stalls. An answer that failed ends the
        // request.
        let sent = match (sent, &answered) {
            (Some(sent), _) => sent,
            (None, Ok(Ok(_))) => rest_of_body(body, &entry).await,
            (None, _) => Err(BodyStopped::Failed(io::ErrorKind::Interrupted.into())),
        };
        (sent, answered)
    };
    // A parked connection the app closed as the request went out, before
    // any of the body reached it: the request goes to another connection
    // when it cannot be applied twice, as a whole one does. A body write
    // that failed with none of it sent found the connection reset, so the
    // app never read what it was sent. Once any of the body is out (or
    // read ahead, which is not kept), the request is answered 502: the
    // caller's body cannot be sent again.
    let reset_unsent = matches!(&sent, Err(BodyStopped::Failed(e))
        if matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe));
    if let Ok(Err(ref reading)) = answered
        && !touched.load(Relaxed)
        && send_again(
            reading,
            reused,
            &bufs.answer,
            idempotent,
            reset_unsent,
            &app.0,
        )
    {
        tracing::debug!(peer = %conn.peer, app = %conn.target, "the app closed its connection before the request's body: sending it on another");
        conn.http.metrics.app_request_retry(false);
        drop(app);
        return Streamed::Again(entry, bufs);
    }
    let answered = match answered {
        Ok(answered) => answered,
        Err(fault) => {
            drop(app);
            let answer = super::proxy::malformed_chunk_answer(conn, false, &fault);
            let unread = Unread {
                body: u64::MAX,
                head_request,
            };
            return Streamed::Over(
                answer_locally(caller, entry, answer, unread, close, drain).await,
            );
        }
    };
    let whole = sent.is_ok();
    match &sent {
        Err(BodyStopped::Malformed(fault)) => super::proxy::log_malformed_chunk(conn, fault),
        Err(e) => {
            tracing::debug!(peer = %conn.peer, app = %conn.target, error = %e, "request body not all sent");
        }
        Ok(()) => {}
    }
    match answered {
        Ok((close, passed)) => {
            drop(entry);
            bufs.give_back();
            // A body not all sent leaves the connection unreadable.
            caller.unread |= !whole;
            Streamed::Over(settle(
                conn,
                passed.map(|reusable| reusable && whole && park),
                app,
                close || !whole,
            ))
        }
        Err(reading) => {
            let unread = Unread {
                body: u64::MAX,
                head_request,
            };
            Streamed::Over(failed(conn, caller, entry, reading.into(), unread, close, drain).await)
        }
    }
}

/// How [`duplex`] ended.
// Returned once a streamed request: boxing the request's entry and
// buffers to send it again would cost an allocation.
#[allow(clippy::large_enum_variant)]
enum Streamed {
    /// The request is over: whether the caller's connection closes.
    Over(io::Result<bool>),
    /// The app closed the connection before any of the body reached it,
    /// and the request cannot have been applied: it goes out again, on
    /// another connection, with its log entry and buffers.
    Again(Entry, Buffers),
}

/// A request whose body is still to come from the caller.
struct Streaming {
    /// The rest of the body, framed as it comes.
    body: Framing,
    head_request: bool,
    /// The caller asked for the connection to close.
    close: bool,
    /// Whether the app connection may be parked after the answer.
    park: bool,
    /// The app connection was parked: the app may close it as the
    /// request goes out.
    reused: bool,
    /// Sending the request twice is harmless.
    idempotent: bool,
}

/// What the answer read is to: a HEAD request (its answer has no body),
/// one after which the connection closes, an HTTP/1.0 one.
#[derive(Clone, Copy)]
struct AnswerTo {
    head_request: bool,
    close: bool,
    http_1_0: bool,
}

/// What an answer head says.
struct Parsed {
    status: StatusCode,
    framing: Framing,
    /// The app said it closes the connection.
    app_close: bool,
    /// The caller's connection closes after the answer.
    close: bool,
}

/// How a body ends: an answer's, or a request's (by its length or
/// chunked).
#[derive(Clone)]
enum Framing {
    Empty,
    Length(u64),
    Chunked(Chunked),
    /// A chunked answer to an HTTP/1.0 request, passed on without its
    /// chunk framing, up to the caller's connection's close.
    Dechunked(Chunked),
    UntilClose,
}

enum Reading {
    /// The app closed the connection before an answer.
    Closed,
    /// The app reset the connection before an answer: it closed its end
    /// with bytes of ours unread.
    Reset,
    App(io::Error),
    Caller(io::Error),
    Invalid(&'static str),
}

/// Whether a request whose answer `reading` ended before it began may go
/// out again on another app connection, as far as the app is concerned
/// (the caller decides whether all of it is still at hand): the app closed
/// a parked connection (`reused`) as the request went out, with nothing of
/// an answer read (`answer`), and the request cannot have been applied:
/// sending it twice is harmless (`idempotent`), what failed to be written
/// never reached the app (`unsent`), or the app never read it
/// ([`never_read`]).
fn send_again(
    reading: &Reading,
    reused: bool,
    answer: &[u8],
    idempotent: bool,
    unsent: bool,
    app: &TcpStream,
) -> bool {
    matches!(reading, Reading::Closed | Reading::Reset)
        && reused
        && answer.is_empty()
        && (idempotent || unsent || never_read(reading, app))
}

/// Whether an app connection that ended before its answer (`reading`)
/// ended without the app reading the request, so that the request may go
/// to another connection whatever its method. Either the app reset it,
/// closing its end with the request unread, or its end was already closed
/// when the request came: the app's kernel answered the request with a
/// reset after the app's FIN, which leaves the error on our socket (read
/// ends at the FIN and does not report it). An app that closed the
/// connection after reading the request sends a FIN alone, and its
/// request is not sent again. (An app that reads a request whole, never
/// answers and then resets the connection looks like one that never read
/// it; it would see the request twice.)
fn never_read(reading: &Reading, app: &TcpStream) -> bool {
    match reading {
        Reading::Reset => true,
        Reading::Closed => matches!(app.take_error(), Ok(Some(_))),
        _ => false,
    }
}

/// Reads the answer head into `answer`, skipping 1xx answers. While it
/// waits, reads what the caller sends ahead (up to [`PIPELINED`] bytes),
/// so a caller that goes away ends the request at once. The head says
/// `connection: close` if `to.close`, or if the sidecar drains by the time
/// it is whole: a drain that begins while the app answers still ends the
/// connection after this answer, not at the caller's next request.
async fn read_answer<R, S, D>(
    app: &mut R,
    answer: &mut BytesMut,
    mut caller: Option<&mut Caller<S>>,
    to: AnswerTo,
    drain: &mut Drain<'_, D>,
    rewritten: &mut Vec<u8>,
) -> Result<Parsed, Reading>
where
    R: AsyncRead + Unpin,
    S: AsyncRead + Unpin,
    D: Future<Output = ()>,
{
    let AnswerTo {
        head_request,
        close,
        http_1_0,
    } = to;
    loop {
        if !answer.is_empty() {
            let closes = || close || drain.started();
            match parse_answer(answer, head_request, closes, http_1_0, rewritten)? {
                Some(parsed) => return Ok(parsed),
                None if answer.len() >= MAX_ANSWER_HEAD => {
                    return Err(Reading::Invalid("answer head too large"));
                }
                None => {}
            }
        }
        if answer.capacity() - answer.len() < 1024 {
            answer.reserve(ANSWER_BUFFER);
        }
        let read = match caller.as_deref_mut() {
            Some(caller) if caller.buf.len() < PIPELINED => {
                // Room for the caller's next bytes, which seldom come
                // before the answer. While the request's head shares the
                // buffer, growing it means a new block, so it is grown
                // only when nearly full.
                if caller.buf.capacity() - caller.buf.len() < CALLER_ROOM {
                    caller.buf.reserve(4096);
                }
                tokio::select! {
                    read = app.read_buf(answer) => read,
                    read = caller.io.read_buf(&mut caller.buf) => match read {
                        Ok(0) => return Err(Reading::Caller(io::ErrorKind::UnexpectedEof.into())),
                        Ok(_) => continue,
                        Err(e) => return Err(Reading::Caller(e)),
                    },
                }
            }
            _ => app.read_buf(answer).await,
        };
        match read {
            Ok(0) => return Err(Reading::Closed),
            Ok(_) => {}
            Err(e) if answer.is_empty() && e.kind() == io::ErrorKind::ConnectionReset => {
                return Err(Reading::Reset);
            }
            Err(e) => return Err(Reading::App(e)),
        }
    }
}

/// Parses the answer head at the start of `answer`, writes it rewritten
/// for the caller to `rewritten` and takes it off `answer`. A 1xx answer
/// (but 101, which no request of the forwarder asked for) is dropped and
/// the next one awaited. The answer to a HEAD request has no body,
/// whatever its head says. `close` says, once the head is whole, whether
/// the caller's connection closes after it.
fn parse_answer(
    answer: &mut BytesMut,
    head_request: bool,
    close: impl FnOnce() -> bool,
    http_1_0: bool,
    rewritten: &mut Vec<u8>,
) -> Result<Option<Parsed>, Reading> {
    loop {
        let mut fields = [httparse::EMPTY_HEADER; MAX_ANSWER_HEADERS];
        let mut parsed = httparse::Response::new(&mut fields);
        let len = match parsed.parse(answer) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err(Reading::Invalid("malformed answer head")),
        };
        let code = parsed.code.unwrap_or(0);
        let status =
            StatusCode::from_u16(code).map_err(|_| Reading::Invalid("invalid status code"))?;
        if parsed.version != Some(1) && parsed.version != Some(0) {
            return Err(Reading::Invalid("not HTTP/1"));
        }
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(Reading::Invalid("switched protocols unasked"));
        }
        if status.is_informational() {
            answer.advance(len);
            if answer.is_empty() {
                return Ok(None);
            }
            continue;
        }
        let mut length = None;
        let mut chunked = None;
        let mut app_close = false;
        let mut keep_alive = false;
        for field in parsed.headers.iter() {
            let name = field.name.as_bytes();
            if name.eq_ignore_ascii_case(b"content-length") {
                let value =
                    decimal(field.value).ok_or(Reading::Invalid("invalid content-length"))?;
                if length.is_some_and(|l| l != value) {
                    return Err(Reading::Invalid("two content-lengths"));
                }
                length = Some(value);
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                // Chunked only if it is the last coding (RFC 9112 section 6.3).
                chunked = Some(ends_chunked(field.value));
            } else if name.eq_ignore_ascii_case(b"connection") {
                for token in headers::list(field.value) {
                    app_close |= token.eq_ignore_ascii_case(b"close");
                    keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
                }
            }
        }
        // HTTP/1.0 has no `Transfer-Encoding`: an answer with one is
        // framed faultily (RFC 9112 section 6.1), and the app may mean its
        // body otherwise than its chunks say. Refused, as hyper's client
        // refuses it, and its connection closed.
        if parsed.version == Some(0) && chunked.is_some() {
            return Err(Reading::Invalid(TRANSFER_ENCODING_IN_HTTP_1_0));
        }
        // An HTTP/1.0 answer ends its connection unless it says it keeps
        // it (RFC 9112 appendix C.2.2): parked, it would only be found
        // closed by the next request.
        app_close |= parsed.version == Some(0) && !keep_alive;
        let bodiless =
            head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
        let framing = match (chunked, length) {
            _ if bodiless => Framing::Empty,
            // HTTP/1.0 has no chunks: the caller gets the payload alone,
            // up to the connection's close.
            (Some(true), _) if http_1_0 => Framing::Dechunked(Chunked::default()),
            (Some(true), _) => Framing::Chunked(Chunked::default()),
            (Some(false), _) => Framing::UntilClose,
            (None, Some(length)) => Framing::Length(length),
            (None, None) => Framing::UntilClose,
        };
        let close = matches!(framing, Framing::UntilClose | Framing::Dechunked(_)) || close();
        answer_head(
            rewritten,
            code,
            parsed.reason,
            parsed.headers,
            close,
            http_1_0,
        );
        answer.advance(len);
        return Ok(Some(Parsed {
            status,
            framing,
            app_close,
            close,
        }));
    }
}

/// The hop-by-hop fields of an answer the forwarder drops (the fields
/// `Connection` names go too, but its framing:
/// [`headers::NEVER_NAMED_AWAY`]). `Transfer-Encoding` stays: the body
/// goes on with the app's framing.
const HOP_BY_HOP: [&[u8]; 7] = [
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"proxy-authenticate",
    b"proxy-authorization",
    b"te",
    b"upgrade",
];

/// Writes an answer head to `out`, rewritten for the caller.
fn answer_head(
    out: &mut Vec<u8>,
    code: u16,
    reason: Option<&str>,
    fields: &[httparse::Header<'_>],
    close: bool,
    http_1_0: bool,
) {
    status_line(out, http_1_0, code, reason.unwrap_or_default());
    let named = |name: &[u8]| {
        !headers::never_named_away(name)
            && fields
                .iter()
                .filter(|f| f.name.eq_ignore_ascii_case("connection"))
                .flat_map(|f| headers::list(f.value))
                .any(|t| t.eq_ignore_ascii_case(name))
    };
    let encoded = fields
        .iter()
        .any(|f| f.name.eq_ignore_ascii_case("transfer-encoding"));
    let mut dated = false;
    for kept in fields {
        let name = kept.name.as_bytes();
        if HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
            || (encoded && name.eq_ignore_ascii_case(b"content-length"))
            || (http_1_0 && name.eq_ignore_ascii_case(b"transfer-encoding"))
            || named(name)
        {
            continue;
        }
        dated |= name.eq_ignore_ascii_case(b"date");
        field(out, name, kept.value);
    }
    head_end(out, dated, close, http_1_0);
}

/// Writes a status line in the sidecar's own version, whatever the app
/// answered in (RFC 9110 section 6.2): HTTP/1.1, or HTTP/1.0 to an
/// HTTP/1.0 request (`http_1_0`), as hyper's server answers one.
fn status_line(out: &mut Vec<u8>, http_1_0: bool, code: u16, reason: &str) {
    out.extend_from_slice(if http_1_0 { b"HTTP/1.0 " } else { b"HTTP/1.1 " });
    out.extend_from_slice(itoa::Buffer::new().format(code).as_bytes());
    out.push(b' ');
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Writes one header field.
fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Ends an answer head of the sidecar's: `Date` unless the head has one
/// (`dated`), and `connection: close` if the connection closes after it;
/// `connection: keep-alive` if an HTTP/1.0 caller's (`http_1_0`) goes on,
/// which it would otherwise take to close.
fn head_end(out: &mut Vec<u8>, dated: bool, close: bool, http_1_0: bool) {
    if !dated {
        out.extend_from_slice(b"date: ");
        now(out);
        out.extend_from_slice(b"\r\n");
    }
    if close {
        field(out, b"connection", b"close");
    } else if http_1_0 {
        field(out, b"connection", b"keep-alive");
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes the current time as an HTTP date, formatted once a second.
fn now(out: &mut Vec<u8>) {
    thread_local! {
        static DATE: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }
    let time = SystemTime::now();
    let second = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(at, date)| {
        if *at != second || date.is_empty() {
            *date = httpdate::fmt_http_date(time);
            *at = second;
        }
        out.extend_from_slice(date.as_bytes());
    });
}

enum Passing {
    App(io::Error),
    Caller(io::Error),
}

/// Writes `out` (the answer's head) with the body that follows it to the
/// caller, reading the rest from the app. `Ok(true)` if the app connection
/// can carry another request: the app did not say it closes it
/// (`app_close`), the body did not end with the connection, and no bytes
/// came after the body.
async fn pass_body<W: AsyncWrite + Unpin, R: AsyncRead + Unpin>(
    caller: &mut W,
    app: &mut R,
    answer: &mut BytesMut,
    out: &mut Vec<u8>,
    mut framing: Framing,
    app_close: bool,
    entry: &Entry,
) -> Result<bool, Passing> {
    let mut first = true;
    let mut bulk = false;
    // The payload of a chunked answer to an HTTP/1.0 request, without its
    // chunk framing (no allocation for any other).
    let mut plain = Vec::new();
    loop {
        let taken = match &mut framing {
            Framing::Dechunked(chunked) => {
                plain.clear();
                let data = &answer[..];
                chunked.take_each(data, |part| plain.extend_from_slice(&data[part]))
            }
            framing => framing.take(answer),
        };
        let (take, done) =
            taken.map_err(|why| Passing::App(io::Error::new(io::ErrorKind::InvalidData, why)))?;
        let payload = framing.payload(&answer[..take]);
        entry.count(Direction::Out, payload);
        let passed = if matches!(framing, Framing::Dechunked(_)) {
            &plain[..]
        } else {
            &answer[..take]
        };
        if first {
            // The rewritten head and the body read with it, in one write.
            out.extend_from_slice(passed);
            caller.write_all(out).await.map_err(Passing::Caller)?;
            first = false;
        } else if !passed.is_empty() {
            caller.write_all(passed).await.map_err(Passing::Caller)?;
        }
        answer.advance(take);
        if done {
            caller.flush().await.map_err(Passing::Caller)?;
            // A body framed by the connection's end never ends here.
            return Ok(!app_close && answer.is_empty());
        }
        caller.flush().await.map_err(Passing::Caller)?;
        // Everything read has been passed on: the buffer starts over, at
        // its bulk size once a read has filled most of what it offered.
        answer.clear();
        let want = if bulk {
            ANSWER_BUFFER_BULK
        } else {
            ANSWER_BUFFER
        };
        if answer.capacity() < want / 2 {
            answer.reserve(want);
        }
        let offered = answer.capacity();
        let n = app.read_buf(answer).await.map_err(Passing::App)?;
        bulk |= n >= offered / 4 * 3;
        if n == 0 {
            return match framing {
                // The body is over, and so is the connection.
                Framing::UntilClose => {
                    caller.flush().await.map_err(Passing::Caller)?;
                    Ok(false)
                }
                _ => Err(Passing::App(io::ErrorKind::UnexpectedEof.into())),
            };
        }
    }
}

impl Framing {
    /// How many bytes at the start of `data` belong to the body, and
    /// whether the body ends with them.
    fn take(&mut self, data: &[u8]) -> Result<(usize, bool), &'static str> {
        Ok(match self {
            Framing::Empty => (0, true),
            Framing::Length(rest) => {
                let take = (*rest).min(data.len() as u64) as usize;
                *rest -= take as u64;
                (take, *rest == 0)
            }
            Framing::Chunked(chunked) | Framing::Dechunked(chunked) => chunked.take(data)?,
            Framing::UntilClose => (data.len(), false),
        })
    }

    /// How many bytes at the start of `parts`, read as one, the rest of
    /// the body takes, if it ends within them (and its chunks parse); the
    /// body's state is not moved.
    fn ends_in(&self, parts: [&[u8]; 2]) -> Option<usize> {
        let mut probe = self.clone();
        let mut at = 0;
        for part in parts {
            match probe.take(part) {
                Ok((n, true)) => return Some(at + n),
                Ok((n, false)) => at += n,
                Err(_) => return None,
            }
        }
        None
    }

    /// The payload bytes among `passed` (without chunk framing), for the
    /// access log.
    fn payload(&mut self, passed: &[u8]) -> usize {
        match self {
            Framing::Chunked(chunked) | Framing::Dechunked(chunked) => chunked.take_payload(),
            _ => passed.len(),
        }
    }
}

/// Why the app did not answer.
enum Failed {
    Unreachable(String),
    Invalid(&'static str),
}

impl From<Reading> for Failed {
    fn from(reading: Reading) -> Self {
        match reading {
            Reading::Closed => Failed::Unreachable("closed the connection before answering".into()),
            Reading::Reset => Failed::Unreachable("reset the connection before answering".into()),
            Reading::App(e) | Reading::Caller(e) => {
                Failed::Unreachable(format!("failed the request ({e})"))
            }
            Reading::Invalid(why) => Failed::Invalid(why),
        }
    }
}

/// Answers 502 for a request the app did not answer, as hyper's path does.
async fn failed<S, D>(
    conn: &Arc<Connection>,
    caller: &mut Caller<S>,
    entry: Entry,
    failure: Failed,
    unread: Unread,
    close: bool,
    drain: &mut Drain<'_, D>,
) -> io::Result<bool>
where
    S: AsyncRead + AsyncWrite + Unpin,
    D: Future<Output = ()>,
{
    let (reason, message) = match &failure {
        Failed::Unreachable(e) => {
            tracing::warn!(peer = %conn.peer, app = %conn.target, error = %e, "request to the app failed");
            (
                token::APP_UNREACHABLE,
                super::proxy::app_unreachable(conn.target, e),
            )
        }
        Failed::Invalid(why) => {
            tracing::warn!(peer = %conn.peer, app = %conn.target, error = %why, "request to the app failed");
            (
                token::INVALID_APP_ANSWER,
                bytes::Bytes::from_static(b"invalid answer from the app"),
            )
        }
    };
    let answer = local(
        false,
        StatusCode::BAD_GATEWAY,
        GrpcCode::Unavailable,
        reason,
        message,
    );
    answer_locally(caller, entry, answer, unread, close, drain).await
}

/// What an answer of the sidecar's own leaves of its request: the body
/// bytes still to come, and whether it was a HEAD request (whose answer
/// has no body, though its head gives the length a GET's would have).
struct Unread {
    body: u64,
    head_request: bool,
}

/// Writes an answer of the sidecar's own. A request body still to come
/// (`unread.body` bytes) is skipped if it has been read already;
/// otherwise the connection closes after the answer.
async fn answer_locally<S, D>(
    caller: &mut Caller<S>,
    entry: Entry,
    answer: Response<LocalBody>,
    unread: Unread,
    close: bool,
    drain: &mut Drain<'_, D>,
) -> io::Result<bool>
where
    S: AsyncRead + AsyncWrite + Unpin,
    D: Future<Output = ()>,
{
    let skipped = unread.body <= caller.buf.len() as u64;
    if skipped {
        caller.buf.advance(unread.body as usize);
    }
    let close = close || !skipped || drain.started();
    caller.unread |= !skipped;
    entry.set_status(answer.status());
    let (parts, body) = answer.into_parts();
    let body = match body {
        Either::Right(full) => full
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default(),
        Either::Left(_) => Bytes::new(),
    };
    let mut out = Vec::with_capacity(256 + body.len());
    let status = parts.status;
    status_line(
        &mut out,
        caller.http_1_0,
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
    );
    for (name, value) in &parts.headers {
        field(&mut out, name.as_str().as_bytes(), value.as_bytes());
    }
    let mut digits = itoa::Buffer::new();
    field(
        &mut out,
        b"content-length",
        digits.format(body.len()).as_bytes(),
    );
    head_end(&mut out, false, close, caller.http_1_0);
    if !unread.head_request {
        out.extend_from_slice(&body);
        entry.count(Direction::Out, body.len());
    }
    caller.io.write_all(&out).await?;
    caller.io.flush().await?;
    drop(entry);
    Ok(close)
}

/// Writes the head of `request` as the app gets it: origin form, and the
/// app's address as `Host` when it has none (an HTTP/1.0 request: an
/// HTTP/1.1 one without is refused, and one in absolute form has its
/// target's authority by now, [`Exchange::start`]).
/// A chunked body (`chunked`) goes as it came, so its head says so: the
/// caller's `Transfer-Encoding` was removed with the other hop-by-hop
/// fields.
fn request_head(out: &mut Vec<u8>, request: &Request<()>, conn: &Connection, chunked: bool) {
    out.extend_from_slice(request.method().as_str().as_bytes());
    out.push(b' ');
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", PathAndQuery::as_str);
    // In origin form, as hyper's client sends it: an absolute-form
    // target's path, which is empty before a query (`http://api?q`).
    if !path.starts_with('/') {
        out.push(b'/');
    }
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(if request.version() == Version::HTTP_10 {
        b" HTTP/1.0\r\n"
    } else {
        b" HTTP/1.1\r\n"
    });
    if !request.headers().contains_key(header::HOST) {
        field(out, b"host", conn.authority.as_str().as_bytes());
    }
    for (name, value) in request.headers() {
        field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if chunked {
        field(out, b"transfer-encoding", b"chunked");
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    //! The forwarder between a caller writing raw bytes on a loopback
    //! socket and real apps: bare ones that answer with the bytes a test
    //! gives, and hyper's server for what is handed to hyper.

    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::http::test_app::{Seen, bare_app, resetting_app};
    use crate::http::testing::{id, no_admin};
    use crate::http::{Connection, Http};
    use crate::metrics::Metrics;
    use http_body_util::Full;
    use hyper::body::Incoming;
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpListener;
    use tokio::sync::watch;

    /// Reads from `from` into `read` until it ends with `end`, which
    /// must come within 10 s and before the connection closes.
    async fn read_until(
        from: &mut (impl AsyncRead + Unpin),
        read: &mut Vec<u8>,
        end: &[u8],
        what: &str,
    ) {
        let mut buf = [0u8; 4096];
        while !read.ends_with(end) {
            let n = tokio::time::timeout(Duration::from_secs(10), from.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("{what} did not come"))
                .unwrap();
            assert!(
                n > 0,
                "closed before {what}: {}",
                String::from_utf8_lossy(read)
            );
            read.extend_from_slice(&buf[..n]);
        }
    }

    /// A caller's connection to a sidecar's inbound HTTP serving,
    /// plaintext, in front of `app`: every connection is from
    /// `spiffe://td/ns/a/sa/web`.
    async fn caller_of(app: SocketAddr) -> TcpStream {
        TcpStream::connect(sidecar_of(app).await).await.unwrap()
    }

    /// The address of a sidecar's inbound HTTP serving as [`caller_of`]
    /// connects to, for callers that share its parked app connections.
    async fn sidecar_of(app: SocketAddr) -> SocketAddr {
        sidecar_counting(app, Arc::new(Metrics::new())).await
    }

    /// A [`caller_of`] whose sidecar counts in `metrics`.
    async fn counted_caller_of(app: SocketAddr, metrics: &Arc<Metrics>) -> TcpStream {
        let sidecar = sidecar_counting(app, metrics.clone()).await;
        TcpStream::connect(sidecar).await.unwrap()
    }

    /// A [`sidecar_of`] that counts in `metrics`.
    async fn sidecar_counting(app: SocketAddr, metrics: Arc<Metrics>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let sidecar = Sidecar::new(app, metrics);
            while let Ok((tcp, _)) = listener.accept().await {
                sidecar.serve(tcp);
            }
        });
        addr
    }

    /// A sidecar's inbound HTTP serving in front of `app`, counting in
    /// its metrics, for connections a test hands it.
    struct Sidecar {
        app: SocketAddr,
        http: Arc<Http>,
        policies: watch::Receiver<Option<Arc<crate::policy::Policies>>>,
        _keep: watch::Sender<Option<Arc<crate::policy::Policies>>>,
    }

    impl Sidecar {
        fn new(app: SocketAddr, metrics: Arc<Metrics>) -> Self {
            let (keep, policies) = watch::channel(Some(Arc::new(no_admin(&metrics))));
            let http = Arc::new(Http::with_access_log(metrics, false));
            Sidecar {
                app,
                http,
                policies,
                _keep: keep,
            }
        }

        /// Serves `tcp`, a connection from `spiffe://td/ns/a/sa/web`, in a
        /// task of its own.
        fn serve(&self, tcp: TcpStream) {
            let peer = id("/ns/a/sa/web");
            let conn = Connection::new(self.http.clone(), peer, self.app, self.policies.clone());
            tokio::spawn(async move {
                let _ =
                    crate::http::serve(conn, Protocol::Http1, tcp, std::future::pending()).await;
            });
        }
    }

    /// Writes `request` and reads until `answers` answers have come whole,
    /// or the sidecar closes the connection; what was read, as text.
    async fn exchange(caller: &mut TcpStream, request: &str, answers: usize) -> String {
        caller.write_all(request.as_bytes()).await.unwrap();
        let mut read = Vec::new();
        let mut buf = [0u8; 4096];
        while complete(&read) < answers {
            let n = tokio::time::timeout(Duration::from_secs(10), caller.read(&mut buf))
                .await
                .expect("no answer within 10s")
                .unwrap();
            if n == 0 {
                break;
            }
            read.extend_from_slice(&buf[..n]);
        }
        String::from_utf8(read).unwrap()
    }

    /// How many whole answers `read` holds (framed by Content-Length or
    /// chunked).
    fn complete(mut read: &[u8]) -> usize {
        let mut count = 0;
        loop {
            let mut fields = [httparse::EMPTY_HEADER; 32];
            let mut answer = httparse::Response::new(&mut fields);
            let Ok(httparse::Status::Complete(len)) = answer.parse(read) else {
                return count;
            };
            let field = |name: &str| {
                answer
                    .headers
                    .iter()
                    .find(|f| f.name.eq_ignore_ascii_case(name))
                    .map(|f| f.value)
            };
            let body = if answer.code == Some(204) || answer.code == Some(304) {
                0
            } else if field("transfer-encoding").is_some() {
                let mut chunked = Chunked::default();
                match chunked.take(&read[len..]) {
                    Ok((n, true)) => n,
                    _ => return count,
                }
            } else {
                field("content-length").map_or(0, |v| decimal(v).unwrap() as usize)
            };
            if read.len() < len + body {
                return count;
            }
            read = &read[len + body..];
            count += 1;
        }
    }

    fn ok(body: &str, extra: &str) -> Vec<u8> {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n{extra}\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    #[tokio::test]
    async fn requests_reach_the_app_with_the_identity_and_without_hop_by_hop_headers() {
        let (app, seen) = bare_app(
            |line| {
                let extra = "Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nX-Kept: yes\r\n";
                ok(&format!("for {line}"), extra)
            },
            |_| false,
        )
        .await;
        let mut caller = caller_of(app).await;
        // Two requests in one write: the second waits for the first.
        let read = exchange(
            &mut caller,
            "GET /a?x=1 HTTP/1.1\r\nHost: api\r\nX-Trellis-Peer-Identity: spiffe://evil/ns/x/sa/y\r\n\
             Connection: keep-alive, X-Secret\r\nX-Secret: 1\r\n\r\n\
             POST /b HTTP/1.1\r\nHost: api\r\nContent-Length: 5\r\n\r\nhello",
            2,
        )
        .await;
        assert_eq!(read.matches("HTTP/1.1 200 OK\r\n").count(), 2, "{read}");
        assert!(read.contains("for GET /a?x=1 HTTP/1.1"), "{read}");
        assert!(read.contains("for POST /b HTTP/1.1"), "{read}");
        assert!(read.contains("X-Kept: yes\r\n"), "{read}");
        assert!(read.contains("date: "), "{read}");
        for hop in ["X-Hop", "Keep-Alive", "Connection"] {
            assert!(!read.contains(hop), "{hop} reached the caller: {read}");
        }

        let requests = seen.requests.lock().unwrap();
        let (first, _) = &requests[0];
        assert!(first.starts_with("GET /a?x=1 HTTP/1.1\r\n"), "{first}");
        assert!(first.contains("host: api\r\n"), "{first}");
        assert!(
            first.contains("x-trellis-peer-identity: spiffe://td/ns/a/sa/web\r\n"),
            "{first}"
        );
        assert!(
            !first.contains("evil") && !first.contains("x-secret"),
            "{first}"
        );
        assert!(
            !first.to_ascii_lowercase().contains("connection"),
            "{first}"
        );
        let (second, body) = &requests[1];
        assert!(second.contains("host: api\r\n"), "{second}");
        assert_eq!(body, b"hello");
        assert_eq!(seen.accepted(), 1, "one caller, one app connection");
    }

    #[tokio::test]
    async fn answers_keep_the_apps_framing_and_the_connection_goes_on() {
        let (app, seen) = bare_app(
            |line| match line.split(' ').nth(1).unwrap_or_default() {
                _ if line.starts_with("HEAD ") => {
                    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n".to_vec()
                }
                "/chunked" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 99\r\n\r\n\
                    5;note=x\r\nhello\r\n6\r\n world\r\n0\r\nX-Sum: 11\r\n\r\n"
                    .to_vec(),
                "/empty" => b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(),
                "/early" => b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
                _ => ok("0123456789", ""),
            },
            |_| false,
        )
        .await;
        let mut caller = caller_of(app).await;

        let read = exchange(&mut caller, "GET /chunked HTTP/1.1\r\nHost: api\r\n\r\n", 1).await;
        assert!(read.contains("Transfer-Encoding: chunked\r\n"), "{read}");
        assert!(
            !read.contains("Content-Length"),
            "a length beside chunked: {read}"
        );
        assert!(
            read.ends_with("\r\n\r\n5;note=x\r\nhello\r\n6\r\n world\r\n0\r\nX-Sum: 11\r\n\r\n"),
            "{read}"
        );
        // The answer to HEAD has no body, whatever its length says.
        caller
            .write_all(b"HEAD /x HTTP/1.1\r\nHost: api\r\n\r\n")
            .await
            .unwrap();
        let mut read = String::new();
        while !read.ends_with("\r\n\r\n") {
            let mut buf = [0u8; 4096];
            let n = caller.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed after HEAD: {read}");
            read.push_str(std::str::from_utf8(&buf[..n]).unwrap());
        }
        assert!(
            read.contains("Content-Length: 10\r\n") && read.ends_with("\r\n\r\n"),
            "{read}"
        );
        let read = exchange(&mut caller, "GET /empty HTTP/1.1\r\nHost: api\r\n\r\n", 1).await;
        assert!(read.starts_with("HTTP/1.1 204 No Content\r\n"), "{read}");
        // 1xx answers are not passed on, as hyper's client does not.
        let read = exchange(&mut caller, "GET /early HTTP/1.1\r\nHost: api\r\n\r\n", 1).await;
        assert!(
            read.starts_with("HTTP/1.1 200 OK\r\n") && read.ends_with("\r\n\r\nok"),
            "{read}"
        );
        let read = exchange(&mut caller, "GET /x HTTP/1.1\r\nHost: api\r\n\r\n", 1).await;
        assert!(read.ends_with("\r\n\r\n0123456789"), "{read}");
        assert_eq!(seen.accepted(), 1);
    }

    #[tokio::test]
    async fn an_answer_that_ends_with_its_connection_ends_the_callers() {
        let (app, _) = bare_app(
            |_| b"HTTP/1.1 200 OK\r\n\r\nuntil the end".to_vec(),
            |_| true,
        )
        .await;
        let mut caller = caller_of(app).await;
        // Reads until the sidecar closes.
        let read = exchange(&mut caller, "GET / HTTP/1.1\r\nHost: api\r\n\r\n", 2).await;
        assert!(read.contains("connection: close\r\n"), "{read}");
        assert!(read.ends_with("\r\n\r\nuntil the end"), "{read}");
    }

    #[tokio::test]
    async fn a_connection_the_app_closed_while_parked_is_not_used() {
        // Closes each connection after its answer without saying so.
        let (app, seen) = bare_app(|_| ok("fine", ""), |_| true).await;
        let mut caller = caller_of(app).await;
        for round in 0..3 {
            let read = exchange(&mut caller, "GET / HTTP/1.1\r\nHost: api\r\n\r\n", 1).await;
            assert!(read.ends_with("\r\n\r\nfine"), "round {round}: {read}");
        }
        assert_eq!(seen.accepted(), 3);
    }

    /// An app of HTTP/1.0's ways: answers `/unframed` with no length,
    /// ending the answer by closing, and any other target with a length;
    /// in HTTP/1.0 either way, closing after it.
    async fn http_1_0_app() -> SocketAddr {
        let answer = |line: &str| match line.contains("/unframed ") {
            true => b"HTTP/1.0 200 OK\r\n\r\nuntil the end".to_vec(),
            false => b"HTTP/1.0 200 OK\r\nContent-Length: 6\r\n\r\nlength".to_vec(),
        };
        bare_app(answer, |_| true).await.0
    }

    /// An HTTP/1.1 caller is answered in HTTP/1.1 (RFC 9110 section 6.2)
    /// by an app answering in HTTP/1.0: an answer with a length on a
    /// connection that goes on, one ended by the app's close up to that
    /// close, which ends the caller's connection too.
    #[tokio::test]
    async fn an_http_1_0_answer_reaches_an_http_1_1_caller_in_http_1_1() {
        let mut caller = caller_of(http_1_0_app().await).await;
        for round in 0..2 {
            let read = exchange(&mut caller, "GET /length HTTP/1.1\r\nHost: api\r\n\r\n", 1).await;
            assert!(read.starts_with("HTTP/1.1 200 OK\r\n"), "{round}: {read}");
            assert!(!read.contains("connection: close"), "{round}: {read}");
            assert!(read.ends_with("\r\n\r\nlength"), "{round}: {read}");
        }
        // Reads until the sidecar closes.
        let read = exchange(
            &mut caller,
            "GET /unframed HTTP/1.1\r\nHost: api\r\n\r\n",
            2,
        )
        .await;
        assert!(read.starts_with("HTTP/1.1 200 OK\r\n"), "{read}");
        assert!(read.contains("connection: close\r\n"), "{read}");
        assert!(read.ends_with("\r\n\r\nuntil the end"), "{read}");
    }

    /// The same on hyper's path (after an `https` absolute-form target): the
    /// answer the app ended by closing is chunked, so the caller's
    /// connection goes on.
    #[tokio::test]
    async fn an_http_1_0_answer_reaches_an_http_1_1_caller_in_http_1_1_on_hypers_path() {
        let mut caller = caller_of(http_1_0_app().await).await;
        let request = "GET https://api/length HTTP/1.1\r\nHost: api\r\n\r\n";
        let read = exchange(&mut caller, request, 1).await;
        assert!(read.starts_with("HTTP/1.1 200 OK\r\n"), "{read}");
        assert!(read.ends_with("\r\n\r\nlength"), "{read}");
        let request = "GET https://api/unframed HTTP/1.1\r\nHost: api\r\n\r\n";
        let read = exchange(&mut caller, request, 1).await;
        assert!(read.starts_with("HTTP/1.1 200 OK\r\n"), "{read}");
        assert!(
            read.ends_with("\r\n\r\nD\r\nuntil the end\r\n0\r\n\r\n"),
            "{read}"
        );
        let read = exchange(&mut caller, "GET /length HTTP/1.1\r\nHost: api\r\n\r\n", 1).await;
        assert!(read.starts_with("HTTP/1.1 200 OK\r\n"), "{read}");
    }

    /// HTTP/1.0 requests are the forwarder's, answered as hyper's path
    /// answers them: in HTTP/1.0, the request going to the app in HTTP/1.0.
    /// A caller that asks for keep-alive keeps its connection when the
    /// answer's length is known, and is told so; the forwarder goes on with
    /// it (a raw `#` later on it is refused in words, where hyper would cut
    /// it silently). A chunked answer reaches it without its chunk framing,
    /// up to the connection's close; a caller that did not ask for
    /// keep-alive gets its answer and the close. A `Transfer-Encoding` in
    /// an HTTP/1.0 request is refused.
    #[tokio::test]
    async fn http_1_0_requests_are_the_forwarders_and_never_get_chunks() {
        let (app, seen) = bare_app(
            |line| {
                if line.starts_with("GET /chunked ") {
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                      5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n"
                        .to_vec()
                } else {
                    ok("length", "")
                }
            },
            |_| false,
        )
        .await;
        let mut caller = caller_of(app).await;
        let keep_alive = "Connection: keep-alive\r\n\r\n";
        for _ in 0..2 {
            let read = exchange(
                &mut caller,
                &format!("GET /length HTTP/1.0\r\n{keep_alive}"),
                1,
            )
            .await;
            assert!(read.starts_with("HTTP/1.0 200 OK\r\n"), "{read}");
            assert!(read.contains("\r\nconnection: keep-alive\r\n"), "{read}");
            assert!(read.ends_with("\r\n\r\nlength"), "{read}");
        }
        let read = exchange(
            &mut caller,
            &format!("GET /a#b HTTP/1.0\r\n{keep_alive}"),
            1,
        )
        .await;
        refused_400(&read, l7::TARGET_FRAGMENT);

        let mut caller = caller_of(app).await;
        let read = exchange(
            &mut caller,
            &format!("GET /chunked HTTP/1.0\r\n{keep_alive}"),
            2,
        )
        .await;
        assert!(read.starts_with("HTTP/1.0 200 OK\r\n"), "{read}");
        let lower = read.to_ascii_lowercase();
        assert!(!lower.contains("transfer-encoding"), "{read}");
        assert!(!lower.contains("keep-alive"), "{read}");
        // Read to the close: nothing after the payload.
        assert!(read.ends_with("\r\n\r\nhello world"), "{read}");

        let mut caller = caller_of(app).await;
        let read = exchange(&mut caller, "GET /length HTTP/1.0\r\n\r\n", 2).await;
        assert!(read.starts_with("HTTP/1.0 200 OK\r\n"), "{read}");
        assert!(!read.contains("keep-alive"), "{read}");
        assert!(read.ends_with("\r\n\r\nlength"), "{read}");

        let mut caller = caller_of(app).await;
        let read = exchange(
            &mut caller,
            "POST /te HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            2,
        )
        .await;
        refused_400(&read, "Transfer-Encoding in an HTTP/1.0 request");

        let lines: Vec<String> = seen.lines_and_hosts().into_iter().map(|(l, _)| l).collect();
        assert_eq!(
            lines,
            [
                "GET /length HTTP/1.0",
                "GET /length HTTP/1.0",
                "GET /chunked HTTP/1.0",
                "GET /length HTTP/1.0",
            ]
        );
    }

    /// An app answering in HTTP/1.0 without `Connection: keep-alive` is
    /// done with its connection, whatever it then does with it (this one
    /// keeps it open and would answer another request on it): the next
    /// request goes to a new connection.
    #[tokio::test]
    async fn an_http_1_0_answer_without_keep_alive_does_not_park_its_connection() {
        let answer = |_: &str| b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec();
        let (app, seen) = bare_app(answer, |_| false).await;
        let mut caller = caller_of(app).await;
        for round in 0..2 {
            let read = exchange(&mut caller, "GET / HTTP/1.1\r\nHost: api\r\n\r\n", 1).await;
            assert!(read.starts_with("HTTP/1.1 200 OK\r\n"), "{round}: {read}");
            assert!(read.ends_with("\r\n\r\nok"), "{round}: {read}");
        }
        assert_eq!(seen.accepted(), 2);
    }

    /// An app answering in HTTP/1.0 with `Connection: keep-alive` keeps
    /// its connection, and the next request goes on it; the caller is
    /// told neither the version nor the app's keep-alive.
    #[tokio::test]
    async fn an_http_1_0_answer_saying_keep_alive_parks_its_connection() {
        let answer = |_: &str| {
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\
              Content-Length: 2\r\n\r\nok"
                .to_vec()
        };
        let (app, seen) = bare_app(answer, |_| false).await;
        let mut caller = caller_of(app).await;
        for round in 0..2 {
            let read = exchange(&mut caller, "GET / HTTP/1.1\r\nHost: api\r\n\r\n", 1).await;
            assert!(read.starts_with("HTTP/1.1 200 OK\r\n"), "{round}: {read}");
            assert!(
                !read.to_ascii_lowercase().contains("keep-alive"),
                "{round}: {read}"
            );
            assert!(read.ends_with("\r\n\r\nok"), "{round}: {read}");
        }
        assert_eq!(seen.accepted(), 1);
    }

    /// An HTTP/1.0 answer with a `Transfer-Encoding`, which HTTP/1.0
    /// lacks, is framed faultily (RFC 9112 section 6.1): it is 502 in
    /// words on either path, counted as the app's other invalid answers
    /// are, and its app connection is closed, though it says keep-alive
    /// (the app would serve more on it). The caller's connection goes on.
    #[tokio::test]
    async fn an_http_1_0_answer_with_a_transfer_encoding_is_refused_on_either_path() {
        let answer = |_: &str| {
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n\
              2\r\nok\r\n0\r\n\r\n"
                .to_vec()
        };
        let (app, seen) = bare_app(answer, |_| false).await;
        let metrics = Arc::new(Metrics::new());
        let mut caller = counted_caller_of(app, &metrics).await;
        let requests = [
            "GET /a HTTP/1.1\r\nHost: api\r\n\r\n",
            "GET /b HTTP/1.1\r\nHost: api\r\n\r\n",
            // hyper's path.
            "GET https://api/c HTTP/1.1\r\nHost: api\r\n\r\n",
        ];
        for (round, request) in requests.into_iter().enumerate() {
            let read = exchange(&mut caller, request, 1).await;
            assert!(
                read.starts_with("HTTP/1.1 502 Bad Gateway\r\n"),
                "{round}: {read}"
            );
            assert!(
                read.contains("\r\ntrellis-proxy-error: invalid_app_answer\r\n"),
                "{round}: {read}"
            );
            assert!(
                read.ends_with("\r\n\r\ntrellis: invalid answer from the app\n"),
                "{round}: {read}"
            );
            assert_eq!(seen.accepted(), round + 1, "{round}: a connection reused");
        }
        let text = metrics.encode();
        let counted = "trellis_requests_total{status=\"5xx\",decision=\"allow\"} 3";
        assert!(text.contains(counted), "{text}");
    }

    /// How many requests `metrics` counts refused as `invalid` with a 4xx.
    fn invalid_4xx(metrics: &Metrics) -> u64 {
        let text = metrics.encode();
        let series = "trellis_requests_total{status=\"4xx\",decision=\"invalid\"} ";
        let line = text.lines().find_map(|l| l.strip_prefix(series));
        line.unwrap_or_else(|| panic!("{series} missing from\n{text}"))
            .parse()
            .unwrap()
    }

    /// A caller that sends part of a request head and no more (a client
    /// that stalls, or one holding connections a byte at a time) is
    /// answered 408 in words once [`HEAD_TIMEOUT`] has passed, and the
    /// connection closed; the app never hears of it, and the refusal is
    /// counted as the forwarder's refused heads are. The clock is paused
    /// (it moves only when every task waits on a timer), so the 30 s pass
    /// at once; the head's bytes are in the sidecar's socket before its
    /// connection is served, so none of them can arrive after the clock
    /// has moved.
    #[tokio::test(start_paused = true)]
    async fn a_head_that_stalls_is_answered_408_and_its_connection_closed() {
        let (app, seen) = bare_app(|_| ok("fine", ""), |_| false).await;
        let metrics = Arc::new(Metrics::new());
        let sidecar = Sidecar::new(app, metrics.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut caller = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (ours, _) = listener.accept().await.unwrap();
        caller
            .write_all(b"GET /slow HTTP/1.1\r\nHost: api\r\nX-Wait: ")
            .await
            .unwrap();
        ours.readable().await.unwrap();
        sidecar.serve(ours);

        let mut read = Vec::new();
        caller.read_to_end(&mut read).await.unwrap();
        let read = String::from_utf8(read).unwrap();
        assert!(
            read.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
            "{read}"
        );
        assert!(
            read.contains("\r\ntrellis-proxy-error: request_timeout\r\n"),
            "{read}"
        );
        assert!(read.contains("\r\nconnection: close\r\n"), "{read}");
        assert!(
            read.ends_with("\r\n\r\ntrellis: request head did not arrive within 30 s\n"),
            "{read}"
        );
        assert_eq!(seen.accepted(), 0, "the app heard of it");
        assert_eq!(invalid_4xx(&metrics), 1);
    }

    /// A kept-alive connection with no byte of a next head (an empty line
    /// after a request is none, RFC 9112 section 2.2) is idle: closed
    /// without a word once [`HEAD_TIMEOUT`] has passed, and not counted.
    /// The clock is paused once the request is answered.
    #[tokio::test]
    async fn an_idle_kept_alive_connection_is_closed_without_an_answer() {
        let (app, _) = bare_app(|_| ok("fine", ""), |_| false).await;
        let metrics = Arc::new(Metrics::new());
        let mut caller = counted_caller_of(app, &metrics).await;
        let request = "GET / HTTP/1.1\r\nHost: api\r\n\r\n\r\n";
        let read = exchange(&mut caller, request, 1).await;
        assert!(read.ends_with("\r\n\r\nfine"), "{read}");
        tokio::time::pause();
        let mut rest = Vec::new();
        caller.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
        assert_eq!(invalid_4xx(&metrics), 0);
    }

    /// How many requests `metrics` counts as sent again on a new app
    /// connection: whole ones, and ones whose body was still streaming.
    fn retries(metrics: &Metrics) -> (u64, u64) {
        let text = metrics.encode();
        let count = |reason: &str| {
            let series = format!("trellis_app_request_retries_total{{reason=\"{reason}\"}} ");
            let line = text.lines().find_map(|l| l.strip_prefix(series.as_str()));
            line.unwrap_or_else(|| panic!("{series} missing from\n{text}"))
                .parse()
                .unwrap()
        };
        (count("whole_request"), count("streaming_body"))
    }

    /// What the app saw of `POST /pay` requests.
    fn payments(seen: &Seen) -> usize {
        let requests = seen.requests.lock().unwrap();
        requests
            .iter()
            .filter(|(head, _)| head.starts_with("POST /pay "))
            .count()
    }

    const PAY: &str = "POST /pay HTTP/1.1\r\nHost: api\r\nContent-Length: 3\r\n\r\nx=1";

    /// A caller of `app` (which answers "for" and the request line) that
    /// sends a GET, then [`PAY`] on the same connection, through a sidecar
    /// counting in `metrics`: the caller, and what it read for the POST.
    async fn pay_after_a_get(app: SocketAddr, metrics: &Arc<Metrics>) -> (TcpStream, String) {
        let mut caller = counted_caller_of(app, metrics).await;
        let read = exchange(&mut caller, "GET / HTTP/1.1\r\nHost: api\r\n\r\n", 1).await;
        assert!(read.ends_with("for GET / HTTP/1.1"), "{read}");
        let read = exchange(&mut caller, PAY, 1).await;
        (caller, read)
    }

    #[tokio::test]
    async fn a_request_the_app_reset_unread_goes_to_another_connection_whatever_its_method() {
        // The first connection answers a GET, then is closed with the
        // POST after it unread, as when an app closes an idle connection
        // as a request comes.
        let (app, seen) = resetting_app(
            |line| ok(&format!("for {line}"), ""),
            |_| false,
            |c, r| c == 0 && r == 1,
        )
        .await;
        let metrics = Arc::new(Metrics::new());
        let (_caller, read) = pay_after_a_get(app, &metrics).await;
        assert!(read.starts_with("HTTP/1.1 200 OK\r\n"), "{read}");
        assert!(read.ends_with("for POST /pay HTTP/1.1"), "{read}");
        assert_eq!(seen.accepted(), 2);
        assert_eq!(payments(&seen), 1);
        assert_eq!(retries(&metrics), (1, 0), "sent again once, whole");
    }

    /// A caller's `Connection` naming `Content-Length` must not strip the
    /// framing: the body would reach the app unframed and be read as a
    /// request of its own, never authorized and with a forged identity.
    /// An app's answer naming its framing keeps it too.
    #[tokio::test]
    async fn connection_cannot_strip_the_framing_and_smuggle_a_request() {
        let (app, seen) = bare_app(
            |line| {
                let body = format!("for {line}");
                format!(
                    "HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .into_bytes()
            },
            |_| false,
        )
        .await;
        let smuggled = "DELETE /admin/users HTTP/1.1\r\nHost: b\r\n\
                        X-Trellis-Peer-Identity: spiffe://td/ns/ops/sa/root\r\n\
                        Content-Length: 0\r\n\r\n";
        let mut caller = caller_of(app).await;
        let read = exchange(
            &mut caller,
            &format!(
                "POST /public HTTP/1.1\r\nHost: b\r\nConnection: content-length\r\n\
                 Content-Length: {}\r\n\r\n{smuggled}GET /next HTTP/1.1\r\nHost: b\r\n\r\n",
                smuggled.len()
            ),
            2,
        )
        .await;
        // Both answers came whole, each framed by its length.
        assert_eq!(complete(read.as_bytes()), 2, "{read}");
        assert!(read.contains("for POST /public HTTP/1.1"), "{read}");
        assert!(read.contains("for GET /next HTTP/1.1"), "{read}");
        let requests = seen.requests.lock().unwrap();
        let lines: Vec<&str> = requests
            .iter()
            .map(|(head, _)| head.lines().next().unwrap())
            .collect();
        assert_eq!(
            lines,
            ["POST /public HTTP/1.1", "GET /next HTTP/1.1"],
            "the app must see the body as the POST's, not as a request"
        );
        let (post, body) = &requests[0];
        assert!(
            post.contains(&format!("content-length: {}\r\n", smuggled.len())),
            "{post}"
        );
        assert_eq!(body, smuggled.as_bytes());
    }

    #[tokio::test]
    async fn a_request_the_app_read_before_closing_is_not_sent_twice() {
        // The first POST is read whole, then its connection closed with
        // no answer: the app may have acted on it.
        let first = Arc::new(AtomicUsize::new(0));
        let dropped = first.clone();
        let (app, seen) = bare_app(
            move |line| {
                if line.starts_with("POST") && first.fetch_add(1, Ordering::SeqCst) == 0 {
                    return Vec::new();
                }
                ok(&format!("for {line}"), "")
            },
            move |line| line.starts_with("POST") && dropped.load(Ordering::SeqCst) == 1,
        )
        .await;
        let metrics = Arc::new(Metrics::new());
        let (mut caller, read) = pay_after_a_get(app, &metrics).await;
        assert!(read.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{read}");
        assert_eq!(seen.accepted(), 1);
        assert_eq!(payments(&seen), 1);
        assert_eq!(retries(&metrics), (0, 0));

        // The caller's connection goes on, on a new app connection.
        let read = exchange(&mut caller, "GET /again HTTP/1.1\r\nHost: api\r\n\r\n", 1).await;
        assert!(read.ends_with("for GET /again HTTP/1.1"), "{read}");
    }

    /// Waits until the app has accepted `n` connections; fails with what
    /// the sidecar said if it answers the caller first.
    async fn until_accepted(seen: &Seen, n: usize, caller: &mut TcpStream) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 4096];
        while seen.accepted() < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the app did not get connection {n}"
            );
            tokio::select! {
                read = caller.read(&mut buf) => panic!(
                    "answered before the app got connection {n}: {}",
                    String::from_utf8_lossy(&buf[..read.unwrap_or(0)])
                ),
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
        }
    }

    /// An upload of 300 000 bytes, framed by its length.
    fn upload() -> Vec<u8> {
        (0..300_000u32).map(|i| (i % 251) as u8).collect()
    }

    /// Sends the head of a `POST /upload` of `len` bytes that expects
    /// (`expect`, as spelled) to be told to go on, and reads the sidecar's
    /// `100 Continue`.
    async fn told_to_continue(caller: &mut TcpStream, expect: &str, len: usize) {
        let head = format!(
            "POST /upload HTTP/1.1\r\nHost: api\r\nExpect: {expect}\r\n\
             Content-Length: {len}\r\n\r\n"
        );
        caller.write_all(head.as_bytes()).await.unwrap();
        let mut read = Vec::new();
        read_until(caller, &mut read, b"\r\n\r\n", "the 100 Continue").await;
        assert_eq!(
            String::from_utf8_lossy(&read),
            "HTTP/1.1 100 Continue\r\n\r\n"
        );
    }

    /// The app closes its parked connection unread as the head of an
    /// `Expect: 100-continue` upload arrives: none of the body has left
    /// the caller, so the request goes to a new connection, with its
    /// body, and the caller gets the app's answer after one `100
    /// Continue`.
    #[tokio::test]
    async fn an_expect_continue_upload_the_app_reset_unread_goes_to_another_connection() {
        let (app, seen) = resetting_app(
            |line| ok(&format!("for {line}"), ""),
            |_| false,
            |c, r| c == 0 && r == 1,
        )
        .await;
        let metrics = Arc::new(Metrics::new());
        let mut caller = counted_caller_of(app, &metrics).await;
        let read = exchange(&mut caller, "GET / HTTP/1.1\r\nHost: api\r\n\r\n", 1).await;
        assert!(read.ends_with("for GET / HTTP/1.1"), "{read}");
        let body = upload();
        told_to_continue(&mut caller, "100-continue", body.len()).await;
        until_accepted(&seen, 2, &mut caller).await;
        caller.write_all(&body).await.unwrap();
        let mut read = Vec::new();
        read_until(
            &mut caller,
            &mut read,
            b"for POST /upload HTTP/1.1",
            "the answer",
        )
        .await;
        let read = String::from_utf8(read).unwrap();
        // The answer, and no second `100 Continue` before it.
        assert!(read.starts_with("HTTP/1.1 200 OK\r\n"), "{read}");
        assert_eq!(seen.accepted(), 2);
        let requests = seen.requests.lock().unwrap();
        assert_eq!(requests.len(), 2, "the app saw the upload once");
        let (head, got) = &requests[1];
        assert!(head.starts_with("POST /upload HTTP/1.1\r\n"), "{head}");
        assert!(got == &body, "the body reached the app changed");
        assert_eq!(retries(&metrics), (0, 1), "sent again once, streaming");
    }

    /// The same for an upload without `Expect`, its head sent with the
    /// start of its body and the rest of the body after: what the caller
    /// sent first goes again with the head, the rest follows.
    #[tokio::test]
    async fn an_upload_the_app_reset_unread_before_the_rest_of_its_body_goes_to_another_connection()
    {
        let (app, seen) = resetting_app(
            |line| ok(&format!("for {line}"), ""),
            |_| false,
            |c, r| c == 0 && r == 1,
        )
        .await;
        let metrics = Arc::new(Metrics::new());
        let mut caller = counted_caller_of(app, &metrics).await;
        let read = exchange(&mut caller, "GET / HTTP/1.1\r\nHost: api\r\n\r\n", 1).await;
        assert!(read.ends_with("for GET / HTTP/1.1"), "{read}");
        let body = upload();
        let mut first = format!(
            "POST /upload HTTP/1.1\r\nHost: api\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        first.extend_from_slice(&body[..1000]);
        caller.write_all(&first).await.unwrap();
        until_accepted(&seen, 2, &mut caller).await;
        caller.write_all(&body[1000..]).await.unwrap();
        let mut read = Vec::new();
        read_until(
            &mut caller,
            &mut read,
            b"for POST /upload HTTP/1.1",
            "the answer",
        )
        .await;
        let read = String::from_utf8(read).unwrap();
        assert!(read.starts_with("HTTP/1.1 200 OK\r\n"), "{read}");
        assert_eq!(seen.accepted(), 2);
        let requests = seen.requests.lock().unwrap();
        assert_eq!(requests.len(), 2, "the app saw the upload once");
        assert!(requests[1].1 == body, "the body reached the app changed");
        assert_eq!(retries(&metrics), (0, 1), "sent again once, streaming");
    }

    /// An app that answers each connection's first request (a GET),
    /// then reads the head of the next and `body` bytes after it, and
    /// closes the connection without answering; how many connections it
    /// accepted, and what it notifies when it has read a second head.
    async fn app_dropping_the_second(
        body: usize,
    ) -> (SocketAddr, Arc<AtomicUsize>, Arc<tokio::sync::Notify>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let second = Arc::new(tokio::sync::Notify::new());
        let notify = second.clone();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let notify = notify.clone();
                tokio::spawn(async move {
                    let mut read = Vec::new();
                    read_until(&mut tcp, &mut read, b"\r\n\r\n", "a GET").await;
                    tcp.write_all(&ok("fine", "")).await.unwrap();
                    let mut read = Vec::new();
                    let mut buf = [0u8; 4096];
                    let mut told = false;
                    loop {
                        let head = find(&read, b"\r\n\r\n");
                        if head.is_some() && !told {
                            notify.notify_one();
                            told = true;
                        }
                        if head.is_some_and(|end| read.len() >= end + 4 + body) {
                            break;
                        }
                        match tcp.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => read.extend_from_slice(&buf[..n]),
                        }
                    }
                });
            }
        });
        (app, accepted, second)
    }

    /// The app reads the head of an `Expect: 100-continue` `POST` and
    /// closes its connection without answering (a FIN alone): it may have
    /// acted on the head, so the request is not sent again, though none of
    /// its body has left the caller. The caller gets 502 after its `100
    /// Continue`.
    #[tokio::test]
    async fn an_expect_continue_post_whose_head_the_app_read_is_not_sent_twice() {
        let (app, accepted, _) = app_dropping_the_second(0).await;
        let metrics = Arc::new(Metrics::new());
        let mut caller = counted_caller_of(app, &metrics).await;
        let read = exchange(&mut caller, "GET / HTTP/1.1\r\nHost: api\r\n\r\n", 1).await;
        assert!(read.ends_with("fine"), "{read}");
        caller
            .write_all(
                b"POST /pay HTTP/1.1\r\nHost: api\r\nExpect: 100-continue\r\n\
                  Content-Length: 300000\r\n\r\n",
            )
            .await
            .unwrap();
        let read = until_closed(&mut caller).await;
        assert!(
            read.starts_with("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 502 Bad Gateway\r\n"),
            "{read}"
        );
        assert!(
            read.ends_with(&format!(
                "\r\n\r\ntrellis: app unreachable: the app at {app} closed the connection \
                 before answering\n"
            )),
            "{read}"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(retries(&metrics), (0, 0));
    }

    /// The app reads the head of an upload and some of its body, then
    /// closes its connection with the rest unread (a reset): part of the
    /// body has left the caller and cannot be sent again, so the caller
    /// gets 502 and the app no second connection.
    #[tokio::test]
    async fn an_upload_whose_body_began_to_reach_the_app_is_not_sent_again() {
        let (app, accepted, second) = app_dropping_the_second(2000).await;
        let metrics = Arc::new(Metrics::new());
        let mut caller = counted_caller_of(app, &metrics).await;
        let read = exchange(&mut caller, "GET / HTTP/1.1\r\nHost: api\r\n\r\n", 1).await;
        assert!(read.ends_with("fine"), "{read}");
        let body = upload();
        let mut first = format!(
            "POST /upload HTTP/1.1\r\nHost: api\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        first.extend_from_slice(&body[..1000]);
        caller.write_all(&first).await.unwrap();
        // The rest once the head has reached the app: the sidecar has read
        // what was sent first, and streams the rest.
        tokio::time::timeout(Duration::from_secs(10), second.notified())
            .await
            .expect("the upload's head did not reach the app");
        let (mut from, mut to) = caller.split();
        // The rest of the body, as far as the sidecar takes it.
        let sending = async {
            let _ = to.write_all(&body[1000..]).await;
        };
        let mut read = Vec::new();
        let reading = tokio::time::timeout(Duration::from_secs(10), from.read_to_end(&mut read));
        let ((), got) = tokio::join!(sending, reading);
        got.expect("the connection was not closed within 10 s")
            .unwrap();
        let read = String::from_utf8(read).unwrap();
        assert!(read.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{read}");
        assert!(
            read.contains(&format!(
                "\r\n\r\ntrellis: app unreachable: the app at {app} "
            )),
            "{read}"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(retries(&metrics), (0, 0));
    }

    /// The app's kernel resets a connection whose app had closed it when
    /// a request came: our read ends at the app's FIN, and only the
    /// socket's pending error tells it from a connection the app closed
    /// after reading the request.
    #[tokio::test]
    async fn a_request_after_the_apps_close_is_told_from_one_it_read() {
        async fn pair() -> (TcpStream, TcpStream) {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let ours = TcpStream::connect(listener.local_addr().unwrap());
            let (ours, theirs) = tokio::join!(ours, listener.accept());
            (ours.unwrap(), theirs.unwrap().0)
        }
        async fn ended(ours: &mut TcpStream) {
            let mut buf = [0u8; 16];
            let n = tokio::time::timeout(Duration::from_secs(10), ours.read(&mut buf))
                .await
                .expect("the connection did not end")
                .unwrap();
            assert_eq!(n, 0, "the app's end answered");
        }

        let (mut ours, theirs) = pair().await;
        drop(theirs);
        ours.readable().await.unwrap();
        ours.write_all(PAY.as_bytes()).await.unwrap();
        ended(&mut ours).await;
        // On loopback the reset comes back within the write; a busy
        // kernel may deliver it a moment later.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !never_read(&Reading::Closed, &ours) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no reset came for a request sent after the app closed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        let (mut ours, mut theirs) = pair().await;
        ours.write_all(PAY.as_bytes()).await.unwrap();
        let mut request = vec![0u8; PAY.len()];
        theirs.read_exact(&mut request).await.unwrap();
        drop(theirs);
        ended(&mut ours).await;
        assert!(!never_read(&Reading::Closed, &ours));
    }

    #[tokio::test]
    async fn a_denied_request_never_reaches_the_app_and_the_connection_goes_on() {
        let (app, seen) = bare_app(|_| ok("fine", ""), |_| false).await;
        let mut caller = caller_of(app).await;
        let read = exchange(
            &mut caller,
            "POST /admin/x HTTP/1.1\r\nHost: api\r\nContent-Length: 4\r\n\r\nGET GET /ok HTTP/1.1\r\nHost: api\r\n\r\n",
            2,
        )
        .await;
        assert!(read.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{read}");
        assert!(
            read.contains("denied by policy b/no-admin rule 0\n"),
            "{read}"
        );
        assert!(read.ends_with("\r\n\r\nfine"), "{read}");
        let requests = seen.requests.lock().unwrap();
        assert_eq!(requests.len(), 1);
        assert!(requests[0].0.starts_with("GET /ok "), "{:?}", requests[0]);
    }

    /// The sidecar's own answer to a HEAD request has a head only, so the
    /// next answer on the connection is read as the next answer.
    #[tokio::test]
    async fn a_denied_head_request_is_answered_without_a_body() {
        let (app, _) = bare_app(|_| ok("fine", ""), |_| false).await;
        let mut caller = caller_of(app).await;
        caller
            .write_all(
                b"HEAD /admin/x HTTP/1.1\r\nHost: api\r\n\r\nGET /ok HTTP/1.1\r\nHost: api\r\n\r\n",
            )
            .await
            .unwrap();
        let mut read = Vec::new();
        read_until(&mut caller, &mut read, b"\r\n\r\nfine", "the GET's answer").await;
        let read = String::from_utf8(read).unwrap();
        let (denied, next) = read.split_once("\r\n\r\n").unwrap();
        assert!(denied.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{read}");
        assert!(denied.contains("content-length: "), "{read}");
        assert!(next.starts_with("HTTP/1.1 200 OK\r\n"), "{read}");
    }

    #[tokio::test]
    async fn an_answer_with_two_lengths_or_no_app_is_502() {
        let (app, _) = bare_app(
            |_| b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc".to_vec(),
            |_| true,
        )
        .await;
        let mut caller = caller_of(app).await;
        let read = exchange(&mut caller, "GET / HTTP/1.1\r\nHost: api\r\n\r\n", 1).await;
        assert!(read.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{read}");
        assert!(read.ends_with("invalid answer from the app\n"), "{read}");

        // An address nothing listens on any more.
        let gone = {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            listener.local_addr().unwrap()
        };
        let mut caller = caller_of(gone).await;
        let read = exchange(&mut caller, "GET / HTTP/1.1\r\nHost: api\r\n\r\n", 1).await;
        assert!(read.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{read}");
        assert!(
            read.ends_with(&format!(
                "app unreachable: the app at {gone} refused the connection\n"
            )),
            "{read}"
        );
    }

    /// Asserts `read` is the forwarder's 400 saying `why`.
    fn refused_400(read: &str, why: &str) {
        assert!(read.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{read}");
        assert!(
            read.ends_with(&format!("\r\n\r\ntrellis: {why}\n")),
            "{read}"
        );
    }

    /// An absolute-form `http` target (what a client configured with an
    /// HTTP proxy sends, RFC 9112 section 3.2.2) is the forwarder's, and
    /// its outcome is hyper's path's: the app gets it in origin form (`/`
    /// for an authority alone), with the caller's `Host`, or the target's
    /// authority as `Host` when the caller sent none, which the rules read
    /// too (a DENY of `host: admin` denies `http://admin/x`); the rules
    /// match its path; a `Host` naming another authority is refused. The forwarder
    /// keeps the connection: a raw `#` later on it is refused in words,
    /// where hyper would cut it silently. Another scheme is hyper's, and
    /// reaches the app in origin form all the same.
    #[tokio::test]
    async fn an_absolute_form_target_is_the_forwarders_and_reaches_the_app_in_origin_form() {
        let (app, seen) = bare_app(|_| ok("fine", ""), |_| false).await;
        let mut caller = caller_of(app).await;
        let read = exchange(
            &mut caller,
            "GET http://api/x?q=1 HTTP/1.1\r\nHost: api\r\n\r\n\
             GET HTTP://API?q HTTP/1.1\r\nHost: api\r\n\r\n\
             POST http://api:8080/no-host HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi\
             GET http://api/admin/x HTTP/1.1\r\nHost: api\r\n\r\n\
             GET http://admin/x HTTP/1.1\r\n\r\n",
            5,
        )
        .await;
        let statuses: Vec<&str> = read
            .split("HTTP/1.1 ")
            .skip(1)
            .map(|a| a.split("\r\n").next().unwrap())
            .collect();
        assert_eq!(
            statuses,
            [
                "200 OK",
                "200 OK",
                "200 OK",
                "403 Forbidden",
                "403 Forbidden"
            ],
            "{read}"
        );
        assert!(
            read.contains("denied by policy b/no-admin rule 0\n"),
            "{read}"
        );
        assert!(
            read.ends_with("denied by policy b/no-admin rule 1\n"),
            "{read}"
        );
        let read = exchange(&mut caller, "GET /a#b HTTP/1.1\r\nHost: api\r\n\r\n", 1).await;
        refused_400(&read, l7::TARGET_FRAGMENT);

        let mut caller = caller_of(app).await;
        let read = exchange(
            &mut caller,
            "GET http://other/x HTTP/1.1\r\nHost: api\r\n\r\n",
            1,
        )
        .await;
        refused_400(&read, l7::HOST_DIFFERS);

        let mut caller = caller_of(app).await;
        let read = exchange(
            &mut caller,
            "GET https://api/s HTTP/1.1\r\nHost: api\r\n\r\n",
            1,
        )
        .await;
        assert!(read.starts_with("HTTP/1.1 200 OK\r\n"), "{read}");

        let host = |h: &str| h.to_owned();
        // No `Host`: the target's authority, as on hyper's path.
        assert_eq!(
            seen.lines_and_hosts(),
            [
                ("GET /x?q=1 HTTP/1.1".into(), host("api")),
                ("GET /?q HTTP/1.1".into(), host("api")),
                ("POST /no-host HTTP/1.1".into(), host("api:8080")),
                ("GET /s HTTP/1.1".into(), host("api")),
            ]
        );
    }

    /// An HTTP/1.1 request without a `Host` names no host for the rules
    /// or the app (RFC 9112 section 3.2): in origin form it is refused
    /// 400 in words, on the forwarder's path and on hyper's (after an
    /// `https` absolute-form target), and counted as invalid; in absolute
    /// form its target's authority is its `Host` on hyper's path too (a
    /// DENY of `host: admin` denies it), unless that has a userinfo part,
    /// which is refused. An HTTP/1.0 request without one still gets the
    /// app's address.
    #[tokio::test]
    async fn an_http_1_1_request_without_a_host_is_refused_on_either_path() {
        let (app, seen) = bare_app(|_| ok("fine", ""), |_| false).await;
        let metrics = Arc::new(Metrics::new());
        let refused = |read: &str, why: &str| {
            assert!(read.contains("HTTP/1.1 400 Bad Request\r\n"), "{read}");
            assert!(
                read.ends_with(&format!("\r\n\r\ntrellis: {why}\n")),
                "{read}"
            );
        };
        for request in ["GET /x HTTP/1.1\r\n\r\n", "OPTIONS * HTTP/1.1\r\n\r\n"] {
            let mut caller = counted_caller_of(app, &metrics).await;
            refused(&exchange(&mut caller, request, 1).await, l7::MISSING_HOST);
        }
        let mut caller = counted_caller_of(app, &metrics).await;
        let read = exchange(&mut caller, "GET http://user@api/x HTTP/1.1\r\n\r\n", 1).await;
        refused(&read, l7::AUTHORITY_USERINFO);

        let handed = "GET https://api/s HTTP/1.1\r\nHost: api\r\n\r\n";
        let mut caller = counted_caller_of(app, &metrics).await;
        let read = exchange(
            &mut caller,
            &format!("{handed}GET http://admin/x HTTP/1.1\r\n\r\nGET /y HTTP/1.1\r\n\r\n"),
            3,
        )
        .await;
        assert!(read.starts_with("HTTP/1.1 200 OK\r\n"), "{read}");
        assert!(
            read.contains("\r\n\r\ntrellis: denied by policy b/no-admin rule 1\n"),
            "{read}"
        );
        refused(&read, l7::MISSING_HOST);
        let mut caller = counted_caller_of(app, &metrics).await;
        let read = exchange(
            &mut caller,
            &format!("{handed}GET http://user@api/x HTTP/1.1\r\n\r\n"),
            2,
        )
        .await;
        refused(&read, l7::AUTHORITY_USERINFO);

        let mut caller = counted_caller_of(app, &metrics).await;
        let read = exchange(&mut caller, "GET /old HTTP/1.0\r\n\r\n", 1).await;
        assert!(read.starts_with("HTTP/1.0 200 OK\r\n"), "{read}");
        assert_eq!(
            seen.lines_and_hosts(),
            [
                ("GET /s HTTP/1.1".into(), "api".into()),
                ("GET /s HTTP/1.1".into(), "api".into()),
                ("GET /old HTTP/1.0".into(), app.to_string()),
            ]
        );
        let text = metrics.encode();
        let invalid = "trellis_requests_total{status=\"4xx\",decision=\"invalid\"} 5";
        assert!(text.contains(invalid), "{text}");
    }

    /// A request the forwarder does not take (an `https` absolute-form
    /// target here) goes to hyper's server with what was read after it, and hyper
    /// serves the rest of the connection.
    #[tokio::test]
    async fn a_request_the_forwarder_does_not_take_and_the_rest_of_its_connection_go_to_hyper() {
        let app = hyper_app().await;
        let mut caller = caller_of(app).await;
        let read = exchange(&mut caller, "GET /first HTTP/1.1\r\nHost: api\r\n\r\n", 1).await;
        assert!(read.ends_with("GET /first "), "{read}");
        let read = exchange(
            &mut caller,
            "POST https://api/abs HTTP/1.1\r\nHost: api\r\nContent-Length: 3\r\n\r\nabc\
             GET /after HTTP/1.1\r\nHost: api\r\n\r\n",
            2,
        )
        .await;
        assert!(read.starts_with("HTTP/1.1 200 OK\r\n"), "{read}");
        assert!(read.contains("POST /abs abc"), "{read}");
        assert!(read.ends_with("GET /after "), "{read}");
    }

    /// After a hand-off, a later head on the connection hyper serves gets
    /// the forwarder's answer, not hyper's status alone: a malformed one
    /// 400 in words with `trellis-proxy-error: invalid_request`, counted
    /// once as `invalid`, and the connection closed. A body that reads as
    /// a head is passed to the app as a body.
    #[tokio::test]
    async fn a_malformed_head_after_a_hand_off_is_answered_in_words() {
        let app = hyper_app().await;
        let metrics = Arc::new(Metrics::new());
        let mut caller = counted_caller_of(app, &metrics).await;
        let read = exchange(
            &mut caller,
            "POST https://api/abs HTTP/1.1\r\nHost: api\r\nContent-Length: 18\r\n\r\n\
             GET / HTTP/1.1\r\n\r\nGET /after HTTP/1.1\r\nHost: api\r\n\r\n",
            2,
        )
        .await;
        assert!(read.contains("POST /abs GET / HTTP/1.1\r\n\r\n"), "{read}");
        assert!(read.ends_with("GET /after "), "{read}");
        caller
            .write_all(b"GET /a HTTP/1.1\r\nHost: api\r\nx-no-colon\r\n\r\n")
            .await
            .unwrap();
        let mut read = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), caller.read_to_end(&mut read))
            .await
            .expect("closed")
            .unwrap();
        let read = String::from_utf8(read).unwrap();
        assert!(read.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{read}");
        assert!(
            read.contains("\r\ntrellis-proxy-error: invalid_request\r\n"),
            "{read}"
        );
        assert!(
            read.ends_with(
                "\r\n\r\ntrellis: malformed header line: not a field name and a colon (a line \
                 without a colon, or a space before it)\n"
            ),
            "{read}"
        );
        assert_eq!(invalid_4xx(&metrics), 1);
    }

    /// After a hand-off, a later head begun and not whole within
    /// [`HEAD_TIMEOUT`] is answered 408 in words with
    /// `trellis-proxy-error: request_timeout`, as a first head is, and
    /// counted once as `invalid`.
    #[tokio::test]
    async fn a_stalled_head_after_a_hand_off_is_answered_408() {
        let app = hyper_app().await;
        let metrics = Arc::new(Metrics::new());
        let mut caller = counted_caller_of(app, &metrics).await;
        let read = exchange(
            &mut caller,
            "GET https://api/abs HTTP/1.1\r\nHost: api\r\n\r\nGET /next HTTP/1.1\r\nHo",
            1,
        )
        .await;
        assert!(read.ends_with("GET /abs "), "{read}");
        let mut read = Vec::new();
        let within = HEAD_TIMEOUT + Duration::from_secs(10);
        tokio::time::timeout(within, caller.read_to_end(&mut read))
            .await
            .expect("closed")
            .unwrap();
        let read = String::from_utf8(read).unwrap();
        assert!(
            read.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
            "{read}"
        );
        assert!(
            read.contains("\r\ntrellis-proxy-error: request_timeout\r\n"),
            "{read}"
        );
        assert!(
            read.ends_with("\r\n\r\ntrellis: request head did not arrive within 30 s\n"),
            "{read}"
        );
        assert_eq!(invalid_4xx(&metrics), 1);
    }

    /// An `Expect: 100-continue` upload: the caller is told to go on once
    /// the request is on its way to the app (and only then: the head
    /// alone gets the `100 Continue`), the app gets the expectation and
    /// the body byte for byte, and its own interim answers (its `100
    /// Continue`, a `103`) are dropped, as hyper's client drops them: the
    /// caller gets one `100 Continue`, the sidecar's, and the final
    /// answer. The forwarder keeps the connection: a malformed head after
    /// it is refused in words.
    #[tokio::test]
    async fn an_expect_continue_upload_is_told_to_go_on_and_the_forwarder_keeps_the_connection() {
        let (app, seen) = bare_app(
            |_| {
                let mut answer = b"HTTP/1.1 100 Continue\r\n\r\n\
                    HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                    .to_vec();
                answer.extend(ok("stored", ""));
                answer
            },
            |_| false,
        )
        .await;
        let mut caller = caller_of(app).await;
        let body = upload();
        told_to_continue(&mut caller, "100-Continue", body.len()).await;
        caller.write_all(&body).await.unwrap();
        let mut read = Vec::new();
        read_until(&mut caller, &mut read, b"stored", "the answer").await;
        let read = String::from_utf8(read).unwrap();
        assert!(read.starts_with("HTTP/1.1 200 OK\r\n"), "{read}");
        // Interim answers by their status line: the `date` field holds ` 10`
        // at ten o'clock and on the tenth.
        assert!(
            !read.contains("Link") && !read.contains("HTTP/1.1 10"),
            "{read}"
        );
        {
            let requests = seen.requests.lock().unwrap();
            let (head, got) = &requests[0];
            assert!(head.contains("\r\nexpect: 100-Continue\r\n"), "{head}");
            assert!(got == &body, "the body reached the app changed");
        }

        let read = exchange(
            &mut caller,
            "GET /a HTTP/1.1\r\nHost: api\r\nx-no-colon\r\n\r\n",
            1,
        )
        .await;
        assert!(read.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{read}");
        assert!(
            read.contains("\r\ntrellis-proxy-error: invalid_request\r\n"),
            "{read}"
        );
        assert!(
            read.ends_with(
                "\r\n\r\ntrellis: malformed header line: not a field name and a colon \
                 (a line without a colon, or a space before it)\n"
            ),
            "{read}"
        );
        assert_eq!(seen.requests.lock().unwrap().len(), 1);
    }

    /// A denied `Expect: 100-continue` request is answered 403 naming the
    /// policy at once, without a `100 Continue`, and the connection closes:
    /// a body sent anyway (a request, here) is never read as a request,
    /// and nothing reaches the app.
    #[tokio::test]
    async fn a_denied_expect_continue_request_is_answered_without_its_body() {
        let (app, seen) = bare_app(|_| ok("fine", ""), |_| false).await;
        let mut caller = caller_of(app).await;
        caller
            .write_all(
                b"POST /admin/x HTTP/1.1\r\nHost: api\r\nExpect: 100-continue\r\n\
                  Content-Length: 18\r\n\r\n",
            )
            .await
            .unwrap();
        let mut read = Vec::new();
        read_until(&mut caller, &mut read, b"rule 0\n", "the 403").await;
        // The body anyway: the sidecar may already have closed.
        let _ = caller.write_all(b"GET /ok HTTP/1.1\r\nHost: api\r\n").await;
        let _ = caller.write_all(b"\r\n").await;
        let read = String::from_utf8(read).unwrap() + &until_closed(&mut caller).await;
        assert!(read.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{read}");
        assert!(
            read.ends_with("\r\n\r\ntrellis: denied by policy b/no-admin rule 0\n"),
            "{read}"
        );
        assert!(read.contains("\r\nconnection: close\r\n"), "{read}");
        assert!(seen.requests.lock().unwrap().is_empty());
    }

    /// An expectation other than `100-continue` is hyper's, which passes
    /// it to the app: the forwarder does not take it. A raw `#` in a head
    /// after it is refused in words all the same, before hyper (which
    /// would cut it) reads it.
    #[tokio::test]
    async fn another_expectation_goes_to_hyper() {
        let app = hyper_app().await;
        let mut caller = caller_of(app).await;
        let read = exchange(
            &mut caller,
            "POST /x HTTP/1.1\r\nHost: api\r\nExpect: something-else\r\nContent-Length: 3\r\n\r\nabc\
             GET /a#b HTTP/1.1\r\nHost: api\r\n\r\n",
            2,
        )
        .await;
        assert!(read.contains("POST /x abc"), "{read}");
        assert!(read.contains("HTTP/1.1 400 Bad Request\r\n"), "{read}");
        assert!(
            read.contains("\r\ntrellis-proxy-error: invalid_request\r\n"),
            "{read}"
        );
        assert!(
            read.ends_with(&format!("\r\n\r\ntrellis: {}\n", l7::TARGET_FRAGMENT)),
            "{read}"
        );
    }

    /// An HTTP/1.0 request with an `Upgrade` goes to hyper, which never
    /// switches protocols for it and, with `keep-alive`, reads on: a raw
    /// `#` in the head after it is refused in words, before hyper reads it.
    #[tokio::test]
    async fn the_head_after_an_http_1_0_upgrade_is_checked() {
        let app = hyper_app().await;
        let mut caller = caller_of(app).await;
        let read = exchange(
            &mut caller,
            "POST /x HTTP/1.0\r\nHost: api\r\nUpgrade: websocket\r\n\
             Connection: keep-alive, upgrade\r\nContent-Length: 3\r\n\r\nabc\
             GET /a#b HTTP/1.1\r\nHost: api\r\n\r\n",
            2,
        )
        .await;
        assert!(read.starts_with("HTTP/1.0 200 OK\r\n"), "{read}");
        assert!(read.contains("POST /x abc"), "{read}");
        assert!(read.contains("HTTP/1.1 400 Bad Request\r\n"), "{read}");
        assert!(
            read.ends_with(&format!("\r\n\r\ntrellis: {}\n", l7::TARGET_FRAGMENT)),
            "{read}"
        );
    }

    /// hyper's server reads on after a `CONNECT` it does not take as a
    /// tunnel and after an upgrade answered other than `101`, where the
    /// heads are no longer checked: those answers (the `CONNECT` refused,
    /// an upgrade the app declines, or one refused before it reaches the
    /// app) end the connection, so no head after them, a raw `#` in its
    /// target, say, reaches the app.
    #[tokio::test]
    async fn a_connection_ends_after_an_upgrade_or_connect_not_switched() {
        let (app, seen) = bare_app(|_| ok("", ""), |_| false).await;
        for first in [
            "CONNECT api:80 HTTP/1.1\r\nHost: api:80\r\n\r\n",
            "CONNECT api:80 HTTP/1.0\r\nHost: api:80\r\nConnection: keep-alive\r\n\r\n",
            "GET /ws HTTP/1.1\r\nHost: api\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            // An `Upgrade` the sidecar does not pass on is hyper's all the same.
            "GET /ws HTTP/1.1\r\nHost: api\r\nUpgrade: websocket\r\n\r\n",
            "GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        ] {
            let mut caller = caller_of(app).await;
            caller
                .write_all(format!("{first}GET /a#b HTTP/1.1\r\nHost: api\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut read = Vec::new();
            tokio::time::timeout(Duration::from_secs(10), caller.read_to_end(&mut read))
                .await
                .expect("closed")
                .unwrap();
            let read = String::from_utf8(read).unwrap();
            let answers = read.lines().filter(|l| l.starts_with("HTTP/1.")).count();
            assert_eq!(answers, 1, "{first:?}: {read}");
            assert!(
                read.contains("\r\nconnection: close\r\n"),
                "{first:?}: {read}"
            );
        }
        let lines: Vec<String> = seen.lines_and_hosts().into_iter().map(|(l, _)| l).collect();
        assert_eq!(lines, ["GET /ws HTTP/1.1", "GET /ws HTTP/1.1"]);
    }

    /// A head of `Host: api` and `n` fields `x-field-i`, after the
    /// request line and before `more`.
    fn many_fields(line: &str, n: usize, more: &str) -> String {
        let mut head = format!("{line}\r\nHost: api\r\n");
        for i in 0..n {
            head.push_str(&format!("x-field-{i}: {i}\r\n"));
        }
        head + more + "\r\n"
    }

    /// A head of more fields than a usual one and at most 100 is the
    /// forwarder's, its framing checked as any other's: chunked beside a
    /// length is refused in words, an ordinary one reaches the app with
    /// every field and the forwarder keeps the connection (a malformed
    /// head after it is refused in words). One of 101 fields is 431.
    #[tokio::test]
    async fn heads_of_up_to_100_fields_are_the_forwarders() {
        let (app, seen) = bare_app(|_| ok("fine", ""), |_| false).await;
        let mut caller = caller_of(app).await;
        let two = many_fields(
            "POST /two HTTP/1.1",
            70,
            "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
        );
        let read = exchange(&mut caller, &(two + "0\r\n\r\n"), 1).await;
        assert!(read.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{read}");
        assert!(
            read.contains("\r\ntrellis-proxy-error: invalid_request\r\n"),
            "{read}"
        );
        assert!(
            read.ends_with(&format!("\r\n\r\ntrellis: {TWO_FRAMINGS}\n")),
            "{read}"
        );
        assert!(seen.requests.lock().unwrap().is_empty());

        let mut caller = caller_of(app).await;
        let seventy = many_fields("GET /seventy HTTP/1.1", 70, "");
        let read = exchange(&mut caller, &seventy, 1).await;
        assert!(read.starts_with("HTTP/1.1 200 OK\r\n"), "{read}");
        let read = exchange(&mut caller, "GET /a#b HTTP/1.1\r\nHost: api\r\n\r\n", 1).await;
        assert!(read.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{read}");
        assert!(read.contains("request target contains '#'"), "{read}");
        {
            let requests = seen.requests.lock().unwrap();
            assert_eq!(requests.len(), 1);
            assert!(
                requests[0].0.contains("\r\nx-field-69: 69\r\n"),
                "{requests:?}"
            );
        }

        let mut caller = caller_of(app).await;
        let read = exchange(&mut caller, &many_fields("GET /many HTTP/1.1", 101, ""), 1).await;
        assert!(
            read.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            "{read}"
        );
        assert!(
            read.ends_with(&format!("\r\n\r\ntrellis: {TOO_MANY_FIELDS}\n")),
            "{read}"
        );
        assert_eq!(seen.requests.lock().unwrap().len(), 1);
    }

    /// A chunked body, with an extension and a trailer.
    const CHUNKED_BODY: &str = "5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Sum: 11\r\n\r\n";

    /// A chunked request reaches the app as it came, chunk framing,
    /// extension and trailer and all, and the forwarder goes on with the
    /// connection: the requests after it, one at a time or sent with it,
    /// are served on the same app connection.
    #[tokio::test]
    async fn a_chunked_request_reaches_the_app_as_it_came_and_the_connection_goes_on() {
        let (app, seen) = bare_app(|line| ok(&format!("for {line}"), ""), |_| false).await;
        let mut caller = caller_of(app).await;
        let read = exchange(
            &mut caller,
            &format!(
                "POST /up HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: chunked\r\n\r\n{CHUNKED_BODY}"
            ),
            1,
        )
        .await;
        assert!(read.starts_with("HTTP/1.1 200 OK\r\n"), "{read}");
        assert!(read.ends_with("for POST /up HTTP/1.1"), "{read}");
        let read = exchange(&mut caller, "GET /next HTTP/1.1\r\nHost: api\r\n\r\n", 1).await;
        assert!(read.ends_with("for GET /next HTTP/1.1"), "{read}");
        // Pipelined, the coding in capitals.
        let read = exchange(
            &mut caller,
            &format!(
                "POST /piped HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: CHUNKED\r\n\r\n{CHUNKED_BODY}\
                 GET /after HTTP/1.1\r\nHost: api\r\n\r\n"
            ),
            2,
        )
        .await;
        assert_eq!(read.matches("HTTP/1.1 200 OK\r\n").count(), 2, "{read}");
        assert!(read.contains("for POST /piped HTTP/1.1"), "{read}");
        assert!(read.ends_with("for GET /after HTTP/1.1"), "{read}");

        let requests = seen.requests.lock().unwrap();
        let lines: Vec<&str> = requests
            .iter()
            .map(|(head, _)| head.lines().next().unwrap())
            .collect();
        assert_eq!(
            lines,
            [
                "POST /up HTTP/1.1",
                "GET /next HTTP/1.1",
                "POST /piped HTTP/1.1",
                "GET /after HTTP/1.1"
            ]
        );
        for (head, body) in [&requests[0], &requests[2]] {
            assert!(
                head.contains("\r\ntransfer-encoding: chunked\r\n"),
                "{head}"
            );
            assert!(
                !head.to_ascii_lowercase().contains("content-length"),
                "{head}"
            );
            assert_eq!(String::from_utf8_lossy(body), CHUNKED_BODY);
        }
        assert_eq!(seen.accepted(), 1, "one caller, one app connection");
    }

    /// A `GET` or `HEAD` with a chunked body has its app connection closed
    /// after the answer, as one with a length does: an app that ignores
    /// the body would read it as a request.
    #[tokio::test]
    async fn a_get_or_head_with_a_chunked_body_is_not_parked() {
        let (app, seen) = bare_app(
            |line| match line.starts_with("HEAD ") {
                true => b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n".to_vec(),
                false => ok("fine", ""),
            },
            |_| false,
        )
        .await;
        let mut caller = caller_of(app).await;
        for (round, method) in ["GET", "HEAD"].into_iter().enumerate() {
            let request = format!(
                "{method} /with-body HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: chunked\r\n\r\n{CHUNKED_BODY}"
            );
            caller.write_all(request.as_bytes()).await.unwrap();
            let mut read = Vec::new();
            let end: &[u8] = if method == "GET" {
                b"fine"
            } else {
                b"\r\n\r\n"
            };
            read_until(&mut caller, &mut read, end, "the answer").await;
            assert!(read.starts_with(b"HTTP/1.1 200 OK\r\n"), "{method}");
            assert_eq!(seen.accepted(), round + 1, "{method}");
        }
        let read = exchange(&mut caller, "GET /plain HTTP/1.1\r\nHost: api\r\n\r\n", 1).await;
        assert!(read.ends_with("fine"), "{read}");
        assert_eq!(seen.accepted(), 3);
        // A plain GET's connection is parked.
        let read = exchange(&mut caller, "GET /plain HTTP/1.1\r\nHost: api\r\n\r\n", 1).await;
        assert!(read.ends_with("fine"), "{read}");
        assert_eq!(seen.accepted(), 3);
    }

    /// After a chunked request the forwarder still reads the connection:
    /// a malformed head, or a target with a raw `#` (which the `http`
    /// crate would cut), gets its 400 naming the fault, not hyper's bare
    /// status, and never reaches the app.
    #[tokio::test]
    async fn after_a_chunked_request_heads_are_still_refused_in_words() {
        let (app, seen) = bare_app(|line| ok(&format!("for {line}"), ""), |_| false).await;
        let chunked = format!(
            "POST /up HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: chunked\r\n\r\n{CHUNKED_BODY}"
        );
        let cases = [
            (
                "GET /a HTTP/1.1\r\nHost: api\r\nx-no-colon\r\n\r\n",
                "malformed header line: not a field name and a colon (a line without a colon, \
                 or a space before it)",
            ),
            (
                "GET /a#/../admin HTTP/1.1\r\nHost: api\r\n\r\n",
                l7::TARGET_FRAGMENT,
            ),
        ];
        for (next, why) in cases {
            let mut caller = caller_of(app).await;
            let read = exchange(&mut caller, &chunked, 1).await;
            assert!(read.ends_with("for POST /up HTTP/1.1"), "{read}");
            // Reads until the sidecar closes.
            let read = exchange(&mut caller, next, 2).await;
            assert!(
                read.starts_with("HTTP/1.1 400 Bad Request\r\n"),
                "{next:?}: {read}"
            );
            assert!(
                read.contains("\r\ntrellis-proxy-error: invalid_request\r\n"),
                "{next:?}: {read}"
            );
            assert!(
                read.contains("\r\nconnection: close\r\n"),
                "{next:?}: {read}"
            );
            assert!(
                read.ends_with(&format!("\r\n\r\ntrellis: {why}\n")),
                "{next:?}: {read}"
            );
        }
        let requests = seen.requests.lock().unwrap();
        assert!(
            requests
                .iter()
                .all(|(head, _)| head.starts_with("POST /up ")),
            "{requests:?}"
        );
    }

    /// `Transfer-Encoding: chunked` beside `Content-Length`, in either
    /// order, is refused with 400 naming both, the connection closed, and
    /// the app sees nothing: an app reading the length would take the
    /// rest of the chunked body as a request of its own.
    #[tokio::test]
    async fn chunked_beside_a_length_is_refused_and_the_app_sees_nothing() {
        let (app, seen) = bare_app(|_| ok("", ""), |_| false).await;
        let hidden = "GET /admin/x HTTP/1.1\r\nHost: api\r\n\r\n";
        for fields in [
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
            "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
        ] {
            let mut caller = caller_of(app).await;
            let request = format!(
                "POST /a HTTP/1.1\r\nHost: api\r\n{fields}\r\n{:x}\r\n{hidden}\r\n0\r\n\r\n",
                hidden.len()
            );
            let read = exchange(&mut caller, &request, 2).await;
            refused_400(
                &read,
                "both Transfer-Encoding and Content-Length: a request body \
                     is framed one way",
            );
            assert_eq!(complete(read.as_bytes()), 1, "{read}");
        }
        assert!(seen.requests.lock().unwrap().is_empty());
        assert_eq!(seen.accepted(), 0);
    }

    /// A chunk that does not parse: read with the head, the request is
    /// refused before the app gets any of it; arriving once the request is
    /// on its way, it ends the request, and the app connection, which waits
    /// for a body that will not come, is never used again. Either way the
    /// caller is told what was wrong and the connection closes.
    #[tokio::test]
    async fn a_malformed_chunk_ends_the_connection_and_the_app_connection_is_not_reused() {
        let (app, seen) = bare_app(|line| ok(&format!("for {line}"), ""), |_| false).await;
        let sidecar = sidecar_of(app).await;
        let head = "POST /up HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: chunked\r\n\r\n";

        let mut caller = TcpStream::connect(sidecar).await.unwrap();
        let read = exchange(&mut caller, &format!("{head}5\r\nhelloX\r\n0\r\n\r\n"), 2).await;
        refused_400(
            &read,
            "malformed chunked request body: chunk data not followed by CRLF",
        );
        assert_eq!(seen.accepted(), 0, "the app saw it");

        let mut caller = TcpStream::connect(sidecar).await.unwrap();
        caller
            .write_all(format!("{head}5\r\nhello\r\n").as_bytes())
            .await
            .unwrap();
        // The request is on its way once the app has its connection.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while seen.accepted() == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the request never went out"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let read = exchange(&mut caller, "zz\r\n", 2).await;
        assert!(read.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{read}");
        assert!(read.contains("\r\nconnection: close\r\n"), "{read}");
        assert!(
            read.ends_with("\r\n\r\ntrellis: malformed chunked request body: invalid chunk size\n"),
            "{read}"
        );

        // The next request from the same identity gets a new app
        // connection: the one waiting for the body would never answer.
        let mut caller = TcpStream::connect(sidecar).await.unwrap();
        let read = exchange(&mut caller, "GET /next HTTP/1.1\r\nHost: api\r\n\r\n", 1).await;
        assert!(read.ends_with("for GET /next HTTP/1.1"), "{read}");
        assert_eq!(seen.accepted(), 2);
        let requests = seen.requests.lock().unwrap();
        assert_eq!(requests.len(), 1, "{requests:?}");
    }

    /// A chunk that does not parse once the app's answer has begun: the
    /// caller has part of that answer, so it gets no 400 after it; the
    /// connection ends, as for a caller gone mid-body. Once the answer is
    /// all out, the connection closes after it.
    #[tokio::test]
    async fn a_malformed_chunk_after_the_answer_began_ends_the_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let head = read_head(&mut tcp).await;
                    let answer: &[u8] = if head.starts_with(b"POST /half ") {
                        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf!"
                    } else {
                        b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\n\r\ntoo big!"
                    };
                    tcp.write_all(answer).await.unwrap();
                    std::future::pending::<()>().await;
                });
            }
        });
        for (path, end) in [("/half", &b"half!"[..]), ("/whole", b"too big!")] {
            let mut caller = caller_of(app).await;
            let head =
                format!("POST {path} HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: chunked\r\n\r\n");
            caller
                .write_all(format!("{head}5\r\nhello\r\n").as_bytes())
                .await
                .unwrap();
            let mut read = Vec::new();
            read_until(&mut caller, &mut read, end, "the answer").await;
            caller.write_all(b"zz\r\n").await.unwrap();
            let mut buf = [0u8; 4096];
            let ended = tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    match caller.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => read.extend_from_slice(&buf[..n]),
                    }
                }
            })
            .await;
            assert!(ended.is_ok(), "{path}: the connection was kept");
            assert!(
                read.ends_with(end),
                "{path}: something came after the answer: {}",
                String::from_utf8_lossy(&read)
            );
        }
    }

    /// An app served by hyper's server that answers each request with its
    /// method, target and body: `POST /x body`.
    async fn hyper_app() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let line = format!("{} {}", req.method(), req.uri());
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    let text = format!("{line} {}", String::from_utf8_lossy(&body));
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service),
                );
            }
        });
        app
    }

    /// Servers that map `-` and `_` in field names to one character (CGI
    /// and WSGI servers, Python's `wsgiref` among them, where both spell
    /// `HTTP_X_TRELLIS_PEER_IDENTITY`) would give the app a caller's
    /// `x_trellis_peer_identity` as the identity, or joined to it. No
    /// spelling of the identity header but the sidecar's reaches the app,
    /// on the forwarder's path or on hyper's (an HTTP/1.0 request).
    #[tokio::test]
    async fn no_spelling_of_the_identity_header_but_the_sidecars_reaches_the_app() {
        let (app, seen) = bare_app(|_| ok("", ""), |_| false).await;
        let forged = "X_Trellis_Peer_Identity: spiffe://td/ns/prod/sa/admin\r\n\
                      x-trellis_peer-identity: spiffe://td/ns/prod/sa/admin\r\n\
                      x-trellis-peer-identity-extra: kept\r\n";
        for version in ["1.1", "1.0"] {
            let mut caller = caller_of(app).await;
            let request = format!("GET /a HTTP/{version}\r\nHost: api\r\n{forged}\r\n");
            let read = exchange(&mut caller, &request, 1).await;
            assert!(read.starts_with("HTTP/1."), "{read}");
            assert!(read.contains(" 200 OK\r\n"), "{read}");
        }
        let requests = seen.requests.lock().unwrap();
        assert_eq!(requests.len(), 2);
        for (head, _) in requests.iter() {
            let identities: Vec<&str> = head
                .lines()
                .filter(|l| {
                    let (name, _) = l.split_once(':').unwrap_or_default();
                    name.to_ascii_lowercase().replace('_', "-") == "x-trellis-peer-identity"
                })
                .collect();
            assert_eq!(
                identities,
                ["x-trellis-peer-identity: spiffe://td/ns/a/sa/web"],
                "{head}"
            );
            assert!(
                head.contains("x-trellis-peer-identity-extra: kept\r\n"),
                "{head}"
            );
        }
    }

    /// An app that answers at once and then reads the body slowly, in
    /// steps each within the stall bound: the body is not cut, and the
    /// connection serves the next request.
    #[tokio::test]
    async fn a_body_the_app_reads_slowly_after_answering_is_not_cut() {
        // Far more than the sockets between the caller and the app hold,
        // so most of it goes only as fast as the app reads.
        const BODY: usize = 32 << 20;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            for answer in [&b"first"[..], b"next!"] {
                let head = read_head(&mut tcp).await;
                let mut out = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n".to_vec();
                out.extend_from_slice(answer);
                tcp.write_all(&out).await.unwrap();
                if head.starts_with(b"POST") {
                    // Reads the body after answering, in steps slower
                    // than the whole of it could go, each well within
                    // the stall bound.
                    let mut chunk = vec![0u8; 2 << 20];
                    let mut left = BODY;
                    while left > 0 {
                        tokio::time::sleep(BODY_STALL / 3).await;
                        let n = left.min(chunk.len());
                        tcp.read_exact(&mut chunk[..n]).await.unwrap();
                        left -= n;
                    }
                }
            }
            std::future::pending::<()>().await;
        });
        let mut caller = caller_of(app).await;
        let head = format!("POST /upload HTTP/1.1\r\nHost: api\r\nContent-Length: {BODY}\r\n\r\n");
        caller.write_all(head.as_bytes()).await.unwrap();
        caller.write_all(&vec![7u8; BODY]).await.unwrap();
        caller
            .write_all(b"GET /next HTTP/1.1\r\nHost: api\r\n\r\n")
            .await
            .unwrap();
        both_answers_come(&mut caller).await;
    }

    /// An app that answers once it has a request's head and never reads
    /// its body: the caller gets the answer while its body, larger than
    /// the sockets hold, is still on the way; once the body stalls, the
    /// caller's connection ends.
    #[tokio::test]
    async fn an_answer_before_the_body_reaches_the_caller_and_a_stalled_body_ends_the_connection() {
        let app = answers_without_reading().await;
        let (mut from, mut to) = caller_of(app).await.into_split();
        let writer = tokio::spawn(async move {
            let head = format!(
                "POST /upload HTTP/1.1\r\nHost: api\r\nContent-Length: {}\r\n\r\n",
                1u64 << 30
            );
            to.write_all(head.as_bytes()).await?;
            let chunk = vec![7u8; 1 << 20];
            loop {
                to.write_all(&chunk).await?;
            }
            #[allow(unreachable_code)]
            io::Result::Ok(())
        });
        let mut read = Vec::new();
        read_until(
            &mut from,
            &mut read,
            b"too big!",
            "the answer while the body was on the way",
        )
        .await;
        assert!(read.starts_with(b"HTTP/1.1 413 Payload Too Large\r\n"));
        assert!(!writer.is_finished(), "the body was not still on the way");
        // Nobody reads the rest of the body: once it stalls, the sidecar
        // ends the caller's connection rather than hold it for the app.
        closes_after_the_answer(&mut from, &mut read).await;
        writer.abort();
    }

    /// Reads a request head byte by byte, so that nothing after it is
    /// read, and returns it.
    async fn read_head(tcp: &mut TcpStream) -> Vec<u8> {
        try_read_head(tcp).await.expect("no whole head")
    }

    /// The same, or `None` if the connection ends (or fails) first.
    async fn try_read_head(tcp: &mut TcpStream) -> Option<Vec<u8>> {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if tcp.read(&mut byte).await.unwrap_or(0) == 0 {
                return None;
            }
            head.push(byte[0]);
        }
        Some(head)
    }

    /// An app that answers 413 once it has a request's head, keeps the
    /// connection, and reads nothing more.
    async fn answers_without_reading() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    if try_read_head(&mut tcp).await.is_none() {
                        return;
                    }
                    let answer =
                        b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\n\r\ntoo big!";
                    tcp.write_all(answer).await.unwrap();
                    // Holds the connection and reads nothing more.
                    std::future::pending::<()>().await;
                });
            }
        });
        app
    }

    /// Reads what follows the 413 in `read` until the sidecar closes the
    /// connection, which it must within 10 s, with nothing after the
    /// answer.
    async fn closes_after_the_answer(from: &mut (impl AsyncRead + Unpin), read: &mut Vec<u8>) {
        let mut buf = [0u8; 4096];
        let end = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match from.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => read.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        assert!(end.is_ok(), "the connection was held for the stalled body");
        assert!(
            read.ends_with(b"too big!"),
            "nothing came after the answer: {}",
            String::from_utf8_lossy(read)
        );
    }

    /// The same with a chunked body: once it stalls after the answer, its
    /// app connection is ended and the caller's connection closes.
    #[tokio::test]
    async fn a_stalled_chunked_body_after_the_answer_ends_the_connection() {
        let app = answers_without_reading().await;
        let (mut from, mut to) = caller_of(app).await.into_split();
        let writer = tokio::spawn(async move {
            to.write_all(
                b"POST /upload HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: chunked\r\n\r\n",
            )
            .await?;
            let mut chunk = b"100000\r\n".to_vec();
            chunk.extend_from_slice(&[7u8; 1 << 20]);
            chunk.extend_from_slice(b"\r\n");
            loop {
                to.write_all(&chunk).await?;
            }
            #[allow(unreachable_code)]
            io::Result::Ok(())
        });
        let mut read = Vec::new();
        read_until(&mut from, &mut read, b"too big!", "the answer").await;
        assert!(read.starts_with(b"HTTP/1.1 413 Payload Too Large\r\n"));
        assert!(!writer.is_finished(), "the body was not still on the way");
        closes_after_the_answer(&mut from, &mut read).await;
        writer.abort();
    }

    /// A chunked body that the app reads slowly after answering,
    /// each step within the stall bound, is not cut, and the connection
    /// serves the next request.
    #[tokio::test]
    async fn a_chunked_body_the_app_reads_slowly_after_answering_is_not_cut() {
        const CHUNKS: usize = 32;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = listener.local_addr().unwrap();
        let (got, body) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst";
            let mut tcp = answer_at_the_head(&listener, answer).await;
            // The body after answering, in steps slower than the whole of
            // it could go, each well within the stall bound, up to its
            // last chunk; the next request may follow it in the same read.
            let mut read = Vec::new();
            let mut buf = vec![0u8; 64 << 10];
            let end = 'body: loop {
                tokio::time::sleep(BODY_STALL / 3).await;
                let step = read.len() + (2 << 20);
                while read.len() < step {
                    // Only the bytes new since the last read, and the few
                    // before them, can start the last chunk.
                    let from = read.len().saturating_sub(buf.len() + LAST_CHUNK.len());
                    if let Some(at) = find(&read[from..], LAST_CHUNK) {
                        break 'body from + at + LAST_CHUNK.len();
                    }
                    let n = tcp.read(&mut buf).await.unwrap();
                    assert!(n > 0, "the body was cut");
                    read.extend_from_slice(&buf[..n]);
                }
            };
            let mut next = read.split_off(end);
            // Its data is all 'x'.
            let _ = got.send(read.iter().filter(|&&b| b == b'x').count());
            while find(&next, b"\r\n\r\n").is_none() {
                let n = tcp.read(&mut buf).await.unwrap();
                assert!(n > 0, "no next request");
                next.extend_from_slice(&buf[..n]);
            }
            assert!(next.starts_with(b"GET /next "), "{next:?}");
            tcp.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nnext!")
                .await
                .unwrap();
            std::future::pending::<()>().await;
        });
        let mut caller = caller_of(app).await;
        let mut request =
            b"POST /upload HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..CHUNKS {
            request.extend_from_slice(b"100000\r\n");
            request.extend_from_slice(&[b'x'; 1 << 20]);
            request.extend_from_slice(b"\r\n");
        }
        request.extend_from_slice(b"0\r\n\r\nGET /next HTTP/1.1\r\nHost: api\r\n\r\n");
        caller.write_all(&request).await.unwrap();
        both_answers_come(&mut caller).await;
        assert_eq!(
            body.await.unwrap(),
            CHUNKS << 20,
            "the whole body reached the app"
        );
    }

    /// An answer that starts before a chunked body is read and
    /// goes on streaming long after the body is all in is not cut: only a
    /// body still to come is watched for a stall.
    #[tokio::test]
    async fn an_answer_streaming_on_after_the_body_is_in_is_not_cut() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nstart\r\n";
            let mut tcp = answer_at_the_head(&listener, answer).await;
            let mut read = Vec::new();
            let mut buf = [0u8; 4096];
            while find(&read, LAST_CHUNK).is_none() {
                let n = tcp.read(&mut buf).await.unwrap();
                assert!(n > 0, "the body was cut");
                read.extend_from_slice(&buf[..n]);
            }
            // The answer goes on for three times the stall bound, the
            // body long since in.
            for _ in 0..6 {
                tokio::time::sleep(BODY_STALL / 2).await;
                tcp.write_all(b"4\r\nmore\r\n").await.unwrap();
            }
            tcp.write_all(b"3\r\nend\r\n0\r\n\r\n").await.unwrap();
            std::future::pending::<()>().await;
        });
        let mut caller = caller_of(app).await;
        caller
            .write_all(
                b"POST /stream HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nbody\r\n0\r\n\r\n",
            )
            .await
            .unwrap();
        let mut read = Vec::new();
        read_until(&mut caller, &mut read, b"0\r\n\r\n", "the whole answer").await;
        let text = String::from_utf8_lossy(&read);
        assert_eq!(text.matches("more").count(), 6, "{text}");
        assert!(text.contains("end"), "{text}");
    }

    /// Reads the answers to a slowly read upload and the request after
    /// it: `first`, then `next!`, both 200.
    async fn both_answers_come(caller: &mut TcpStream) {
        let mut read = Vec::new();
        read_until(caller, &mut read, b"next!", "the second answer").await;
        let text = String::from_utf8_lossy(&read);
        assert!(
            text.contains("first") && text.matches("HTTP/1.1 200 OK").count() == 2,
            "{text}"
        );
    }

    /// The end of a chunked body: its last data chunk's line end, then the
    /// last chunk (no trailers).
    const LAST_CHUNK: &[u8] = b"\r\n0\r\n\r\n";

    /// Accepts one connection on `listener`, reads a request head and
    /// writes `answer` at once, before any body; the connection, to go on.
    async fn answer_at_the_head(listener: &TcpListener, answer: &[u8]) -> TcpStream {
        let (mut tcp, _) = listener.accept().await.unwrap();
        read_head(&mut tcp).await;
        tcp.write_all(answer).await.unwrap();
        tcp
    }

    /// Where `needle` first starts in `haystack`.
    fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
        haystack.windows(needle.len()).position(|w| w == needle)
    }

    /// A request's header map comes back empty to the next head parsed
    /// on the thread, the same map, with none of the earlier fields.
    #[test]
    fn a_header_map_is_reused_empty_and_never_carries_a_field_over() {
        SPARE.with_borrow_mut(Vec::clear);
        let parse = |head: &[u8]| match take_head(&mut BytesMut::from(head)) {
            Some(Taken::Request(head)) => head.request,
            _ => panic!("the forwarder takes {:?}", String::from_utf8_lossy(head)),
        };
        let first = parse(
            b"GET /a HTTP/1.1\r\nhost: app\r\nauthorization: Bearer secret\r\n\
              x-one: 1\r\nx-two: 2\r\nx-three: 3\r\n\r\n",
        );
        let capacity = first.headers().capacity();
        let mut set = Buffers::take();
        set.keep_fields(first);
        set.give_back();
        assert_eq!(SPARE.with_borrow(|spare| spare[0].fields.len()), 0);

        let second = parse(b"GET /b HTTP/1.1\r\nhost: other\r\n\r\n");
        assert_eq!(
            second.headers().capacity(),
            capacity,
            "the kept map, not a new one for one field"
        );
        let fields: Vec<_> = second
            .headers()
            .iter()
            .map(|(name, value)| (name.as_str(), value.to_str().unwrap()))
            .collect();
        assert_eq!(
            fields,
            [("host", "other")],
            "only the second request's own fields"
        );
        assert_eq!(
            SPARE.with_borrow(|spare| spare[0].fields.capacity()),
            0,
            "the set stays kept without its map"
        );
        SPARE.with_borrow_mut(Vec::clear);
    }

    /// A request's buffers come back empty to the next request on the
    /// thread, the same blocks; grown ones are freed, and a thread keeps
    /// at most its bound.
    #[test]
    fn request_buffers_are_reused_empty_and_only_at_their_usual_sizes() {
        SPARE.with_borrow_mut(Vec::clear);
        let mut used = Buffers::take();
        used.request
            .extend_from_slice(b"POST /secret HTTP/1.1\r\nHost: api\r\n\r\nbody");
        used.answer
            .extend_from_slice(b"HTTP/1.1 200 OK\r\n\r\nanswer");
        used.answer.advance(19);
        used.rewritten.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        let blocks = (
            used.request.as_ptr(),
            used.answer.as_ptr().wrapping_sub(19),
            used.rewritten.as_ptr(),
        );
        used.give_back();

        let next = Buffers::take();
        assert!(next.request.is_empty() && next.answer.is_empty() && next.rewritten.is_empty());
        assert_eq!(
            (
                next.request.as_ptr(),
                next.answer.as_ptr(),
                next.rewritten.as_ptr()
            ),
            blocks,
            "the same blocks, the answer's from its start"
        );
        assert!(next.answer.capacity() >= ANSWER_BUFFER);

        // A bulk answer grew its buffer: it is not kept.
        let mut grown = next;
        grown.answer.reserve(ANSWER_BUFFER_BULK);
        grown.give_back();
        assert_eq!(SPARE.with_borrow(Vec::len), 0);

        let many: Vec<_> = (0..SPARE_KEPT + 3).map(|_| Buffers::take()).collect();
        many.into_iter().for_each(Buffers::give_back);
        assert_eq!(SPARE.with_borrow(Vec::len), SPARE_KEPT);
        SPARE.with_borrow_mut(Vec::clear);
    }

    /// A chunked body with `n` one-byte chunks, each with `ext` bytes of
    /// extension (`;` and a name).
    fn extended_chunks(n: usize, ext: usize) -> String {
        let chunk = format!("1;{}\r\nx\r\n", "e".repeat(ext - 1));
        format!("{}0\r\n\r\n", chunk.repeat(n))
    }

    /// A caller's chunked body with 4 to 16 KiB of extensions on one size
    /// line reaches the app as it came; one with more than 16 KiB of them
    /// over many small ones is refused with 400 saying so.
    #[tokio::test]
    async fn a_chunked_body_with_up_to_16_kib_of_extensions_reaches_the_app() {
        let (app, seen) = bare_app(|_| ok("fine", ""), |_| false).await;
        let head = "POST /up HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut caller = caller_of(app).await;
        for ext in [5000, 12 * 1024, 16 * 1024] {
            let body = extended_chunks(1, ext);
            let read = exchange(&mut caller, &format!("{head}{body}"), 1).await;
            assert!(read.starts_with("HTTP/1.1 200 OK\r\n"), "{ext}: {read}");
            let requests = seen.requests.lock().unwrap();
            assert!(requests.last().unwrap().1 == body.as_bytes(), "{ext}");
        }

        let mut caller = caller_of(app).await;
        let body = extended_chunks(40, 500);
        let read = exchange(&mut caller, &format!("{head}{body}"), 1).await;
        refused_400(
            &read,
            "malformed chunked request body: chunk extensions over 16 KiB \
                 in one body",
        );
        assert_eq!(seen.requests.lock().unwrap().len(), 3);
    }

    /// When the sidecar serving a caller's connection begins to drain.
    #[derive(Clone, Copy)]
    enum DrainAt {
        /// When the test starts it.
        Told,
        /// As the sidecar reads the caller's first bytes.
        FirstRead,
        /// Before the connection is served, once the caller's first bytes
        /// are in its socket.
        BeforeServing,
    }

    /// The sidecar's end of a caller's connection; starts the drain, if
    /// given one, as the caller's first bytes are read.
    struct DrainsOnRead {
        tcp: TcpStream,
        shutdown: Option<Arc<crate::drain::Shutdown>>,
    }

    impl AsyncRead for DrainsOnRead {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            let before = buf.filled().len();
            let read = Pin::new(&mut this.tcp).poll_read(cx, buf);
            if buf.filled().len() > before
                && let Some(shutdown) = this.shutdown.take()
            {
                shutdown.start();
            }
            read
        }
    }

    impl AsyncWrite for DrainsOnRead {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
        }
        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
        }
        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
        }
    }

    /// A caller's connection to a sidecar's inbound HTTP serving in front
    /// of `app`, like [`caller_of`], told of a drain of its own (the
    /// sidecar's: a tracker's) that begins `at`; the drain's handle.
    async fn draining_caller_of(
        app: SocketAddr,
        at: DrainAt,
    ) -> (TcpStream, Arc<crate::drain::Shutdown>) {
        let metrics = Arc::new(Metrics::new());
        let (keep, policies) = watch::channel(Some(Arc::new(no_admin(&metrics))));
        let http = Arc::new(Http::with_access_log(metrics, false));
        let conn = Connection::new(http, id("/ns/a/sa/web"), app, policies);
        let (shutdown, drain) = crate::drain::channel();
        let (shutdown, tracker) = (Arc::new(shutdown), drain.tracker());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let starts = shutdown.clone();
        tokio::spawn(async move {
            let _keep = keep;
            let (tcp, _) = listener.accept().await.unwrap();
            let on_read = match at {
                DrainAt::FirstRead => Some(starts),
                DrainAt::Told => None,
                DrainAt::BeforeServing => {
                    tcp.readable().await.unwrap();
                    starts.start();
                    None
                }
            };
            let io = DrainsOnRead {
                tcp,
                shutdown: on_read,
            };
            let _ = crate::http::serve(conn, Protocol::Http1, io, tracker.draining()).await;
        });
        (TcpStream::connect(addr).await.unwrap(), shutdown)
    }

    /// Everything the sidecar writes until it closes the connection, which
    /// it must within 10 s; as text.
    async fn until_closed(caller: &mut TcpStream) -> String {
        let mut read = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), caller.read_to_end(&mut read))
            .await
            .expect("the connection was not closed within 10 s")
            .unwrap();
        String::from_utf8(read).unwrap()
    }

    /// A drain that begins while the app is answering ends the connection
    /// after that answer, and the answer says so (`connection: close`): a
    /// caller keeping its connection does not send its next request into
    /// a connection about to close. The app holds its answer until the
    /// drain has begun.
    #[tokio::test]
    async fn a_drain_while_the_app_answers_closes_after_the_answer_which_says_so() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = listener.local_addr().unwrap();
        let (arrived, has_arrived) = tokio::sync::oneshot::channel();
        let (answer, may_answer) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            read_head(&mut tcp).await;
            arrived.send(()).unwrap();
            may_answer.await.unwrap();
            tcp.write_all(&ok("done", "")).await.unwrap();
            // Keeps the connection: the sidecar could reuse it.
            std::future::pending::<()>().await;
        });
        let (mut caller, shutdown) = draining_caller_of(app, DrainAt::Told).await;
        caller
            .write_all(b"GET /slow HTTP/1.1\r\nHost: api\r\n\r\n")
            .await
            .unwrap();
        has_arrived.await.unwrap();
        shutdown.start();
        answer.send(()).unwrap();
        let read = until_closed(&mut caller).await;
        assert!(read.starts_with("HTTP/1.1 200 OK\r\n"), "{read}");
        assert!(read.contains("\r\nconnection: close\r\n"), "{read}");
        assert!(read.ends_with("\r\n\r\ndone"), "{read}");
    }

    /// A request the forwarder hands to hyper (an `https` absolute-form
    /// target here) just as the drain begins is served, not closed unanswered as hyper's
    /// idle connection: the drain begins as the sidecar reads the request,
    /// so it has begun when hyper gets it. Each connection is a new draw of
    /// which future is polled first; with the request first, every one
    /// is answered, with `connection: close`, and then closed.
    #[tokio::test]
    async fn a_request_handed_to_hyper_as_the_drain_begins_is_answered() {
        let app = hyper_app().await;
        for _ in 0..20 {
            let (mut caller, _shutdown) = draining_caller_of(app, DrainAt::FirstRead).await;
            caller
                .write_all(
                    b"POST https://api/upload HTTP/1.1\r\nHost: api\r\n\
                      Content-Length: 5\r\n\r\nhello",
                )
                .await
                .unwrap();
            let read = until_closed(&mut caller).await;
            assert!(read.starts_with("HTTP/1.1 200 OK\r\n"), "{read:?}");
            assert!(read.contains("\r\nconnection: close\r\n"), "{read}");
            assert!(read.ends_with("POST /upload hello"), "{read}");
        }
    }

    /// A request already in the socket of a connection that has not been
    /// served yet when the drain begins is answered (`connection: close`)
    /// before the connection closes: only a connection with no request
    /// in it is idle. As above, each connection is a new draw of which is
    /// polled first.
    #[tokio::test]
    async fn a_request_received_before_the_drain_is_answered() {
        let (app, seen) = bare_app(|_| ok("here", ""), |_| false).await;
        for _ in 0..20 {
            let (mut caller, _shutdown) = draining_caller_of(app, DrainAt::BeforeServing).await;
            caller
                .write_all(b"GET /early HTTP/1.1\r\nHost: api\r\n\r\n")
                .await
                .unwrap();
            let read = until_closed(&mut caller).await;
            assert!(read.starts_with("HTTP/1.1 200 OK\r\n"), "{read:?}");
            assert!(read.contains("\r\nconnection: close\r\n"), "{read}");
            assert!(read.ends_with("\r\n\r\nhere"), "{read}");
        }
        assert_eq!(seen.requests.lock().unwrap().len(), 20);
    }

    thread_local! {
        /// The bytes the thread's [`take_head`] calls were given to parse.
        pub(super) static PARSED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    /// A caller that sends its bytes two at a time, a read each.
    struct Trickle(Vec<u8>, usize);

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let at = self.1;
            let n = (self.0.len() - at).min(2).min(buf.remaining());
            buf.put_slice(&self.0[at..at + n]);
            self.1 += n;
            Poll::Ready(Ok(()))
        }
    }

    /// The head read from `sent`, trickled, and the bytes parsed to read it.
    async fn trickled_head(sent: Vec<u8>) -> (Option<Taken>, usize) {
        PARSED.set(0);
        let mut caller = Caller {
            io: Trickle(sent, 0),
            buf: BytesMut::new(),
            unread: false,
            http_1_0: false,
        };
        let mut drain = Drain {
            draining: std::pin::pin!(std::future::pending::<()>()),
            done: false,
        };
        let taken = super::read_head(&mut caller, &mut drain).await.unwrap();
        (taken, PARSED.get())
    }

    #[tokio::test]
    async fn empty_lines_before_a_request_line_are_parsed_once_and_bounded() {
        let request = b"GET /after HTTP/1.1\r\nhost: a\r\n\r\n";
        for line in [&b"\r\n"[..], b"\n"] {
            let mut sent = line.repeat(MAX_EMPTY_LINES / line.len());
            sent.extend_from_slice(request);
            let (taken, parsed) = trickled_head(sent.clone()).await;
            let Some(Taken::Request(head)) = taken else {
                panic!("{line:?}: not read as a request");
            };
            assert_eq!(head.request.uri().path(), "/after");
            // The request line and fields are parsed again as they come
            // (about 500 bytes in all), the empty lines never.
            assert!(
                parsed < 2 * 1024,
                "{line:?}: {parsed} bytes parsed for {} sent",
                sent.len()
            );

            let mut sent = line.repeat(MAX_EMPTY_LINES / line.len() + 1);
            sent.extend_from_slice(request);
            let (taken, _) = trickled_head(sent).await;
            let Some(Taken::Refused(fault)) = taken else {
                panic!("{line:?}: more empty lines than the bound were read on");
            };
            assert_eq!(
                (fault.status, fault.why),
                (StatusCode::BAD_REQUEST, TOO_MANY_EMPTY_LINES)
            );
        }

        // What the caller is told.
        let (app, seen) = bare_app(|_| ok("", ""), |_| false).await;
        let mut caller = caller_of(app).await;
        let mut sent = "\r\n".repeat(MAX_EMPTY_LINES / 2 + 1);
        sent.push_str("GET /after HTTP/1.1\r\nHost: api\r\n\r\n");
        let read = exchange(&mut caller, &sent, 1).await;
        refused_400(&read, TOO_MANY_EMPTY_LINES);
        assert!(seen.requests.lock().unwrap().is_empty());
    }

    /// `5` and `005` are one length, which reaches the app once, in one
    /// spelling: apps that refuse a repeated `Content-Length` (Node's,
    /// Go's) would answer 400.
    #[tokio::test]
    async fn one_content_length_reaches_the_app_without_leading_zeros() {
        let (app, seen) = bare_app(|_| ok("", ""), |_| false).await;
        let mut caller = caller_of(app).await;
        for (lengths, body) in [
            ("Content-Length: 5\r\nContent-Length: 005\r\n", "hello"),
            ("Content-Length: 0005\r\n", "hello"),
            (
                "content-length: 00\r\nX-After: 1\r\nContent-Length: 0\r\n",
                "",
            ),
        ] {
            let request = format!("POST /up HTTP/1.1\r\nHost: a\r\n{lengths}\r\n{body}");
            let read = exchange(&mut caller, &request, 1).await;
            assert!(read.starts_with("HTTP/1.1 200 OK\r\n"), "{read}");
        }
        let seen = seen.requests.lock().unwrap();
        let lengths: Vec<Vec<&str>> = seen
            .iter()
            .map(|(head, _)| {
                head.lines()
                    .filter(|l| l.to_ascii_lowercase().starts_with("content-length"))
                    .collect()
            })
            .collect();
        assert_eq!(
            lengths,
            [
                ["content-length: 5"],
                ["content-length: 5"],
                ["content-length: 0"]
            ]
        );
        assert_eq!(seen[0].1, b"hello");
        assert!(seen[2].0.contains("\r\nx-after: 1\r\n"), "{}", seen[2].0);
    }
}
