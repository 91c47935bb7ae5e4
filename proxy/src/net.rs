//! Socket helpers shared by the listeners: binding, the original destination
//! of a redirected connection, dialling with a deadline, and the byte copy.
//!
//! Each direction of the copy starts with a [`COPY_BUFFER_SMALL`] buffer
//! (what a request/response exchange or an idle held connection needs) and
//! grows it once to [`COPY_BUFFER_BULK`] when a read fills it, so bulk
//! transfers take few, large system calls and TLS writes. Per connection
//! the copy holds at most two bulk buffers.
//!
//! Under a TLS session the socket is a [`ReadAhead`]: rustls asks for 4 KiB
//! at a time, which would cost five system calls per 16 KiB record; once a
//! read shows bulk data waiting, the socket is read in large reads instead.
//!
//! Nothing here knows about identities or policy.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use socket2::{Domain, SockRef, Socket, TcpKeepalive, Type};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use trellis_core::duration::Words;
// In `trellis_core::tcp` beside the user timeout's range, which the
// injector checks annotations against too.
pub use trellis_core::tcp::{KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_PROBES};

/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long dialling an upstream may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The buffer each direction of a copy starts with.
pub const COPY_BUFFER_SMALL: usize = 4 * 1024;
/// The buffer a direction grows to once a read fills the small one: four
/// full TLS records.
pub const COPY_BUFFER_BULK: usize = 64 * 1024;

/// What a [`ReadAhead`] reads at once under bulk data: four full TLS
/// records.
pub const READ_AHEAD: usize = 64 * 1024;
/// How long released bytes wait for a write to go with while the peer is
/// quiet (a server's session tickets, when the app has not answered yet):
/// a long-polling caller gets them this soon, not with an answer minutes
/// away.
pub const RELEASED_WAIT: Duration = Duration::from_millis(5);

/// How many connections may wait to be accepted on a listener.
const LISTEN_BACKLOG: i32 = 1024;

/// The TCP keepalive of every listener and every dial of the sidecar.
fn keepalive() -> TcpKeepalive {
    TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES)
}

/// `EAFNOSUPPORT` on Linux: the kernel has no IPv6 at all.
const EAFNOSUPPORT: i32 = 97;

/// Binds a TCP listener on `addr`. An IPv6 address gets `IPV6_V6ONLY`, so
/// `[::]:P` and `0.0.0.0:P` are two sockets side by side rather than one
/// dual-stack socket: each family keeps its own addresses (no
/// `::ffff:a.b.c.d` peers) and its own `SO_ORIGINAL_DST`, whatever the
/// host's `net.ipv6.bindv6only` says, and an address given by a flag binds
/// exactly that family.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    // As tokio does: a restarted sidecar rebinds while old connections
    // sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    // Nagle off and keepalive probes for every connection accepted here:
    // Linux copies both to accepted sockets, which saves system calls per
    // connection.
    socket.set_tcp_nodelay(true)?;
    socket.set_tcp_keepalive(&keepalive())?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Binds a listener for connections from beyond the pod (the inbound
/// port) as [`bind`] does; the connections accepted on it also give up on
/// a peer that vanished with data in flight after `user_timeout`
/// (`TCP_USER_TIMEOUT`, which Linux copies to accepted sockets as it does
/// keepalive; `None` sets none).
///
/// The user timeout (`--tcp-user-timeout`, two minutes by default, as
/// long as keepalive takes to give up on a silent peer) is there because
/// keepalive probes only a connection with nothing in flight: a peer that
/// vanished while data was unacknowledged would be found only when
/// retransmission gave up, about 15 minutes later. It also bounds how long
/// a peer may keep its receive window closed (its app stopped reading,
/// every buffer on the way full): a connection stalled so that long is
/// reset as well. Set on connections to and from beyond the pod, never on
/// those with the app, in the pod.
pub fn bind_mesh(addr: SocketAddr, user_timeout: Option<Duration>) -> io::Result<TcpListener> {
    let listener = bind(addr)?;
    if user_timeout.is_some() {
        SockRef::from(&listener).set_tcp_user_timeout(user_timeout)?;
    }
    Ok(listener)
}

/// Whether a connection to `remote` reaches `listener`, one of this
/// sidecar's listeners: the same port and the same address, or any address
/// of this host of the listener's family when it is bound to a wildcard
/// (`0.0.0.0:PORT`, `[::]:PORT`). A connection to an unspecified address
/// goes to loopback. IPv4-mapped addresses count as IPv4.
pub fn reaches(listener: SocketAddr, remote: SocketAddr) -> bool {
    let (at, to) = (listener.ip().to_canonical(), remote.ip().to_canonical());
    listener.port() == remote.port()
        && (at == to
            || at.is_unspecified() && at.is_ipv4() == to.is_ipv4() && is_local(to)
            || to.is_unspecified() && at.is_loopback() && at.is_ipv4() == to.is_ipv4())
}

/// Whether `ip` is an address of this host: loopback or unspecified, or
/// one a socket can be bound to (a system call, so only asked about a
/// port one of the sidecar's listeners has).
fn is_local(ip: std::net::IpAddr) -> bool {
    ip.is_loopback() || ip.is_unspecified() || std::net::UdpSocket::bind((ip, 0)).is_ok()
}

/// Whether a bind failed because the namespace has no IPv6 (the kernel
/// lacks it, or `::1` is not configured), rather than for a reason that
/// must stop start-up (the port is taken, ...).
pub fn ipv6_unavailable(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::AddrNotAvailable || e.raw_os_error() == Some(EAFNOSUPPORT)
}

/// The destination a connection had before iptables redirected it to us,
/// or `None` when it was not redirected (or the kernel cannot say).
pub fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    let sock = SockRef::from(stream);
    let local = stream.local_addr().ok()?;
    let dst = if local.is_ipv4() {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    };
    let dst = dst.ok()?.as_socket()?;
    // A destination equal to our own address means nothing redirected it.
    (dst != local).then_some(dst)
}

/// Dials the app at `addr` with [`CONNECT_TIMEOUT`], with Nagle off. No
/// keepalive probes: the app is in the pod, and its connection lives no
/// longer than the caller's, which has them.
pub async fn connect(addr: impl tokio::net::ToSocketAddrs) -> io::Result<TcpStream> {
    dial(addr, CONNECT_TIMEOUT).await
}

/// Dials `addr` beyond the pod (a peer, a destination outside the mesh),
/// giving up when it has not answered within `timeout`, with Nagle off,
/// keepalive probes ([`KEEPALIVE_IDLE`]) and `user_timeout` (as
/// [`bind_mesh`] says; `None` sets none).
pub async fn connect_within(
    addr: impl tokio::net::ToSocketAddrs,
    timeout: Duration,
    user_timeout: Option<Duration>,
) -> io::Result<TcpStream> {
    let stream = connect_in_pod_within(addr, timeout).await?;
    if user_timeout.is_some() {
        SockRef::from(&stream).set_tcp_user_timeout(user_timeout)?;
    }
    Ok(stream)
}

/// Dials `addr`, an address of this pod (an app calling its own pod's
/// address), as [`connect_within`] does but without a user timeout: a
/// peer in the pod does not vanish, and an app that stops reading for a
/// while must not have its connection reset.
pub async fn connect_in_pod_within(
    addr: impl tokio::net::ToSocketAddrs,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let stream = dial(addr, timeout).await?;
    SockRef::from(&stream).set_tcp_keepalive(&keepalive())?;
    Ok(stream)
}

async fn dial(addr: impl tokio::net::ToSocketAddrs, timeout: Duration) -> io::Result<TcpStream> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {}", Words(timeout)),
            )
        })??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

trellis_core::tokens! {
    /// Why a [`connect`] failed: the `reason` label of
    /// `trellis_service_connect_retries_total`, each made at 0 from the start.
    pub enum ConnectFailure {
        /// Nothing listens at the address.
        Refused = "refused",
        /// No route to the host or its network.
        Unreachable = "unreachable",
        /// No answer in time.
        Timeout = "timeout",
        /// The connection was reset or aborted as it was made.
        Reset = "reset",
        /// Any other failure.
        Other = "other",
    }
}

impl ConnectFailure {
    /// The reason `e` names.
    pub fn of(e: &io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => ConnectFailure::Refused,
            io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
                ConnectFailure::Unreachable
            }
            io::ErrorKind::TimedOut => ConnectFailure::Timeout,
            io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => {
                ConnectFailure::Reset
            }
            _ => ConnectFailure::Other,
        }
    }
}

/// Makes closing a socket reset the connection (`SO_LINGER` 0) instead of
/// ending it with a FIN: here for a relayed connection whose other side
/// was reset or failed, which its peer must not take for one that ended
/// after its last byte (a cut upload read as a whole one). Zero linger
/// never blocks the close.
pub use trellis_core::refusal::reset_on_close;

/// A relayed stream that is reset when dropped (see [`reset_on_close`])
/// unless its copy ended cleanly ([`ResetIfCut::ended`]): a connection the
/// sidecar cuts, its task dropped mid-copy (closed by policy), or whose
/// other side was reset or failed, is reset, never ended with a FIN that
/// would pass for the end of its bytes.
pub struct ResetIfCut<S> {
    /// Taken only by [`ResetIfCut::into_inner`], which consumes the rest.
    io: Option<S>,
    /// The TCP socket under `io`.
    tcp: fn(&S) -> &TcpStream,
    ended: bool,
}

/// Why a [`ResetIfCut`] always holds its stream.
const HELD: &str = "a ResetIfCut holds its stream until into_inner consumes it";

impl<S> ResetIfCut<S> {
    /// `io`, with `tcp` reaching the socket under it.
    pub fn new(io: S, tcp: fn(&S) -> &TcpStream) -> Self {
        ResetIfCut {
            io: Some(io),
            tcp,
            ended: false,
        }
    }

    /// The copy ended cleanly: dropping the stream closes it as usual.
    pub fn ended(&mut self) {
        self.ended = true;
    }

    /// The stream, no longer reset when dropped: its copy is over, and
    /// how the connection ends is the caller's to say (an answer written
    /// to it first, say).
    pub fn into_inner(mut self) -> S {
        self.io.take().expect(HELD)
    }
}

impl ResetIfCut<TcpStream> {
    /// A plain TCP stream, reset unless its copy ended cleanly.
    pub fn tcp(tcp: TcpStream) -> Self {
        fn itself(tcp: &TcpStream) -> &TcpStream {
            tcp
        }
        ResetIfCut::new(tcp, itself)
    }
}

/// How long a connection ended after a cut ([`ResetIfCut::end_after_cut`])
/// may take to flush its last bytes, and then goes on reading (and
/// dropping) what its peer still sends until the peer closes; and the most
/// bytes it reads so. Closing a socket with bytes unread makes the kernel
/// reset the connection and throw away what it had still to send; a peer
/// that sends more, or for longer, gets that reset.
pub const CUT_LINGER: Duration = Duration::from_secs(2);
pub const CUT_LINGER_BYTES: usize = 8 << 20;

impl<S: AsyncWrite + Unpin> ResetIfCut<S> {
    /// Ends a connection whose copy was cut by a failed write after it
    /// wrote the connection bytes ([`Copied::wrote_after_cut`], an answer
    /// sent before the other side's reset): they are flushed and followed
    /// by a FIN, which the kernel sends after them, where a reset would
    /// throw away what still waits in the send queue (a peer whose receive
    /// window is full). No TLS `close_notify` is sent: the peer reads the
    /// bytes, then an end without it, which says the connection was cut,
    /// not ended (a caller's sidecar resets its app). The connection is
    /// reset all the same if the flush fails or does not end within
    /// [`CUT_LINGER`].
    ///
    /// For a connection to a peer's sidecar only: a plain app socket has no
    /// TLS to tell a cut from an end, and so stays reset.
    pub async fn end_after_cut(mut self) {
        let Some(io) = self.io.as_mut() else { return };
        match tokio::time::timeout(CUT_LINGER, tokio::io::AsyncWriteExt::flush(io)).await {
            Ok(Ok(())) => {}
            // Dropped unended: reset.
            _ => return,
        }
        let tcp = (self.tcp)(self.io.as_ref().expect(HELD));
        if SockRef::from(tcp)
            .shutdown(std::net::Shutdown::Write)
            .is_err()
        {
            return;
        }
        // The TCP socket is read beneath the TLS session: what the peer
        // still sends (an upload it has not seen cut yet) is dropped
        // unread, and only its end is waited for.
        let mut scratch = vec![0u8; COPY_BUFFER_SMALL];
        let mut left = CUT_LINGER_BYTES;
        let discard = async {
            while left > 0 {
                if tcp.readable().await.is_err() {
                    return;
                }
                match tcp.try_read(&mut scratch) {
                    Ok(0) => return,
                    Ok(n) => left = left.saturating_sub(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => return,
                }
            }
        };
        let _ = tokio::time::timeout(CUT_LINGER, discard).await;
        // Closed with its FIN sent: the kernel goes on sending what is
        // queued before it.
        self.ended = true;
    }
}

impl<S> std::ops::Deref for ResetIfCut<S> {
    type Target = S;

    fn deref(&self) -> &S {
        self.io.as_ref().expect(HELD)
    }
}

impl<S> std::ops::DerefMut for ResetIfCut<S> {
    fn deref_mut(&mut self) -> &mut S {
        self.io.as_mut().expect(HELD)
    }
}

impl<S> Drop for ResetIfCut<S> {
    fn drop(&mut self) {
        if let Some(io) = &self.io
            && !self.ended
        {
            reset_on_close((self.tcp)(io));
        }
    }
}

/// What a [`copy`] moved, and how it ended.
#[derive(Debug)]
pub struct Copied {
    /// Bytes moved from a to b.
    pub there: u64,
    /// Bytes moved from b to a.
    pub back: u64,
    /// The error that ended it, if one did: the bytes moved before it
    /// still count.
    pub error: Option<io::Error>,
    /// The copy was cut by a write that failed one way, and the other way
    /// then wrote bytes on (an answer sent before a reset): the side they
    /// went to, which must be ended after them, not reset
    /// ([`ResetIfCut::end_after_cut`]).
    pub wrote_after_cut: Option<Side>,
}

/// A side of a [`copy`]: its first stream or its second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    A,
    B,
}

/// Copies both ways until both sides are done; an EOF on one side is passed
/// on as a half-close (shutdown of the write side) of the other. The first
/// error ends both ways; the bytes a side sent before it failed (was
/// reset) are written on first, as far as they were read.
///
/// A write that fails one way does not throw away what the other way can
/// still read: a peer that answers and closes while its caller is still
/// sending (a server refusing an upload with `413`, or an error line, and
/// closing with the upload unread, which resets the connection) had its
/// answer queued before the reset, and the kernel hands it out before the
/// reset. So the other way goes on until its reader ends, for at most
/// [`AFTER_WRITE_FAILURE`] and with the buffer it has, and its bytes are
/// written on; its reader's end is then not passed on as a half-close, as
/// the connection it came from failed: the copy ends with the error, and
/// the caller cuts the other side after those bytes ([`Copied::wrote_after_cut`]
/// says which side got them): a plain socket is reset, a peer's mTLS
/// connection is ended with a FIN and no `close_notify`
/// ([`ResetIfCut::end_after_cut`]), so that a reset does not throw away
/// what of them is still queued. The error is the
/// failed write's, unless that reader ended with a TLS alert: the peer's
/// refusal, which the caller must see as it would had it read it first.
pub async fn copy<A, B>(a: &mut A, b: &mut B) -> Copied
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut copying = Copying::default();
    let error = poll_fn(|cx| copying.poll(cx, a, b)).await.err();
    copying.copied(error)
}

/// How long a [`copy`] whose write failed one way goes on reading the
/// other way (the answer a peer sent before its connection was reset).
/// What the kernel queued before a reset is read at once; this bounds an
/// app that is slow to take it.
pub const AFTER_WRITE_FAILURE: Duration = Duration::from_secs(5);

/// A [`copy`] polled by its owner, who may look at either side between
/// polls (the copy borrows neither in between): what it moved so far is
/// kept here.
#[derive(Default)]
pub struct Copying {
    a_to_b: Direction,
    b_to_a: Direction,
    /// A write failed one way: the other way is still read ([`copy`]).
    /// Boxed, with its deadline: made once, for a connection whose write
    /// failed, and one pointer in every other connection's task.
    write_failed: Option<Box<WriteFailed>>,
}

/// A way of a [`Copying`] whose write failed, while the other way is
/// read to its end.
struct WriteFailed {
    error: io::Error,
    /// Whether the way still read is b to a (the write to b failed).
    b_to_a: bool,
    /// When the other way is given up on.
    until: Pin<Box<tokio::time::Sleep>>,
}

impl Copying {
    /// Moves what both sides have ready; ready once both ways are done, or
    /// with the first error (after a failed write, once the other way is
    /// read to its end).
    pub fn poll<A, B>(&mut self, cx: &mut Context<'_>, a: &mut A, b: &mut B) -> Poll<io::Result<()>>
    where
        A: AsyncRead + AsyncWrite + Unpin + ?Sized,
        B: AsyncRead + AsyncWrite + Unpin + ?Sized,
    {
        if self.write_failed.is_none() {
            let there = self.a_to_b.poll(cx, Pin::new(&mut *a), Pin::new(&mut *b));
            let there = match self.fail(there, true) {
                Some(there) => there?,
                None => return self.poll_after_write_failure(cx, a, b),
            };
            let back = self.b_to_a.poll(cx, Pin::new(&mut *b), Pin::new(&mut *a));
            let back = match self.fail(back, false) {
                Some(back) => back?,
                None => return self.poll_after_write_failure(cx, a, b),
            };
            ready!(there);
            ready!(back);
            return Poll::Ready(Ok(()));
        }
        self.poll_after_write_failure(cx, a, b)
    }

    /// `polled`, a way's poll, as an I/O result; `None` when its write
    /// failed and the other way, not done yet, is now read on its own.
    /// `to_b`: the way is a to b.
    fn fail(
        &mut self,
        polled: Poll<Result<u64, Failure>>,
        to_b: bool,
    ) -> Option<Poll<io::Result<u64>>> {
        let other = if to_b { &self.b_to_a } else { &self.a_to_b };
        match polled {
            Poll::Ready(Err(Failure::Write(error))) if !other.done => {
                self.write_failed = Some(Box::new(WriteFailed {
                    error,
                    b_to_a: to_b,
                    until: Box::pin(tokio::time::sleep(AFTER_WRITE_FAILURE)),
                }));
                let other = if to_b {
                    &mut self.b_to_a
                } else {
                    &mut self.a_to_b
                };
                other.after_write_failure = true;
                None
            }
            Poll::Ready(Err(failure)) => Some(Poll::Ready(Err(failure.into_error()))),
            Poll::Ready(Ok(moved)) => Some(Poll::Ready(Ok(moved))),
            Poll::Pending => Some(Poll::Pending),
        }
    }

    /// Reads the way left after a write failed the other way, until its
    /// reader ends (or fails) or [`AFTER_WRITE_FAILURE`] is over; ends with
    /// the failed write's error, that is what cut the connection, and its
    /// reader's end after the reset (an EOF without `close_notify`, once
    /// the write took the reset) says less. Unless the reader ended with a
    /// TLS alert: the peer's sidecar refused the connection (a caller's
    /// certificate it does not trust, while the app was still sending) and
    /// said why before it reset the connection, which is then the end the
    /// caller must see, to count, log and answer the refusal.
    fn poll_after_write_failure<A, B>(
        &mut self,
        cx: &mut Context<'_>,
        a: &mut A,
        b: &mut B,
    ) -> Poll<io::Result<()>>
    where
        A: AsyncRead + AsyncWrite + Unpin + ?Sized,
        B: AsyncRead + AsyncWrite + Unpin + ?Sized,
    {
        let Some(failed) = &mut self.write_failed else {
            return Poll::Ready(Ok(()));
        };
        let polled = if failed.b_to_a {
            self.b_to_a.poll(cx, Pin::new(&mut *b), Pin::new(&mut *a))
        } else {
            self.a_to_b.poll(cx, Pin::new(&mut *a), Pin::new(&mut *b))
        };
        if polled.is_pending() && failed.until.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        let failed = self.write_failed.take().expect("checked above");
        match polled {
            Poll::Ready(Err(Failure::Read(e))) if alert_received(&e) => Poll::Ready(Err(e)),
            _ => Poll::Ready(Err(failed.error)),
        }
    }

    /// What was moved, ended by `error` if one did.
    pub fn copied(&self, error: Option<io::Error>) -> Copied {
        let wrote_after_cut = if self.b_to_a.wrote_after_write_failure {
            Some(Side::A)
        } else if self.a_to_b.wrote_after_write_failure {
            Some(Side::B)
        } else {
            None
        };
        Copied {
            there: self.a_to_b.moved,
            back: self.b_to_a.moved,
            error,
            wrote_after_cut,
        }
    }
}

/// Whether `e` is a TLS alert the peer sent: its refusal, with why.
fn alert_received(e: &io::Error) -> bool {
    matches!(
        trellis_core::tls::rustls_error(e),
        Some(rustls::Error::AlertReceived(_))
    )
}

/// How one way of a copy failed: reading its reader, or writing (or
/// flushing, or shutting down) its writer.
enum Failure {
    Read(io::Error),
    Write(io::Error),
}

impl Failure {
    fn into_error(self) -> io::Error {
        match self {
            Failure::Read(e) | Failure::Write(e) => e,
        }
    }
}

/// One way of a [`copy`].
#[derive(Default)]
struct Direction {
    /// Allocated on the first read; `buf[pos..cap]` is still to write.
    buf: Option<Box<[u8]>>,
    pos: usize,
    cap: usize,
    /// Bytes were written since the last flush.
    unflushed: bool,
    /// The reader reached its end.
    eof: bool,
    /// The writer was shut down after the end: this way is finished.
    done: bool,
    /// The reader failed (was reset) after `buf[pos..cap]` was read: the
    /// error is passed on once those bytes are written.
    failed: Option<io::Error>,
    /// The other way's write failed: the reader's end is not passed on as
    /// a half-close, only the bytes before it.
    after_write_failure: bool,
    /// Bytes were written after the other way's write failed.
    wrote_after_write_failure: bool,
    moved: u64,
}

impl Direction {
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<Result<u64, Failure>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(self.moved));
        }
        loop {
            // A reader that failed is not read again, even while the bytes
            // it gave before failing are still being flushed.
            if self.pos == self.cap && !self.eof && self.failed.is_none() {
                (self.pos, self.cap) = (0, 0);
                // Take what the reader has ready, up to a full buffer, so
                // bulk data (one TLS record per read from a TLS reader)
                // leaves in few large writes. A short read clears the
                // socket's readiness, so asking again costs no system call.
                loop {
                    let buf = self
                        .buf
                        .get_or_insert_with(|| vec![0; COPY_BUFFER_SMALL].into_boxed_slice());
                    if self.cap == buf.len() {
                        if buf.len() >= COPY_BUFFER_BULK {
                            break;
                        }
                        // Bulk data: grow once, keep what was read.
                        let mut big = vec![0; COPY_BUFFER_BULK].into_boxed_slice();
                        big[..self.cap].copy_from_slice(&buf[..self.cap]);
                        *buf = big;
                    }
                    let mut read = ReadBuf::new(&mut buf[self.cap..]);
                    match reader.as_mut().poll_read(cx, &mut read) {
                        Poll::Ready(Ok(())) => {
                            let n = read.filled().len();
                            if n == 0 {
                                self.eof = true;
                                break;
                            }
                            self.cap += n;
                        }
                        // What came before a reset goes on ahead of it,
                        // as the kernel hands it out before the reset.
                        Poll::Ready(Err(e)) if self.cap > 0 => {
                            self.failed = Some(e);
                            break;
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(Failure::Read(e))),
                        Poll::Pending if self.cap > 0 => break,
                        Poll::Pending => {
                            if self.unflushed {
                                ready!(writer.as_mut().poll_flush(cx)).map_err(Failure::Write)?;
                                self.unflushed = false;
                            }
                            return Poll::Pending;
                        }
                    }
                }
            }
            if let Some(buf) = &self.buf {
                while self.pos < self.cap {
                    let n = ready!(writer.as_mut().poll_write(cx, &buf[self.pos..self.cap]))
                        .map_err(Failure::Write)?;
                    if n == 0 {
                        let e = io::ErrorKind::WriteZero.into();
                        return Poll::Ready(Err(Failure::Write(e)));
                    }
                    self.pos += n;
                    self.moved += n as u64;
                    self.unflushed = true;
                    self.wrote_after_write_failure |= self.after_write_failure;
                }
            }
            if self.failed.is_some() {
                ready!(writer.as_mut().poll_flush(cx)).map_err(Failure::Write)?;
                if let Some(e) = self.failed.take() {
                    return Poll::Ready(Err(Failure::Read(e)));
                }
            }
            if self.eof {
                ready!(writer.as_mut().poll_flush(cx)).map_err(Failure::Write)?;
                if !self.after_write_failure {
                    ready!(writer.as_mut().poll_shutdown(cx)).map_err(Failure::Write)?;
                }
                self.done = true;
                return Poll::Ready(Ok(self.moved));
            }
        }
    }
}

/// A socket that reads ahead once bulk data flows through it, for use under
/// a TLS session. Until a read fills the caller's buffer (a request, an
/// idle held connection) it holds no buffer and reads straight into the
/// caller's; after one, it reads [`READ_AHEAD`] bytes at a time and hands
/// them out from its own buffer, kept for the connection's life like the
/// copy's. It reads ahead only once [told it may](ReadAhead::read_ahead),
/// when the handshake is over: a peer not yet authenticated, however much
/// of its handshake it sends, never costs the sidecar that buffer. Writes
/// go straight through, vectored writes included (rustls sends several
/// records in one `writev`), unless the socket was told to
/// [hold](ReadAhead::hold_after_first_flush) them.
pub struct ReadAhead<S> {
    io: S,
    /// Whether a read that fills the caller's buffer may make `buf`.
    may_read_ahead: bool,
    buf: Option<Box<[u8]>>,
    /// `buf[pos..end]` is read and not yet handed out.
    pos: usize,
    end: usize,
    hold: Hold,
    /// While released bytes wait and the peer sends nothing: when they
    /// leave on their own ([`RELEASED_WAIT`]). Set by the first read that
    /// finds nothing, cleared as they leave.
    released_wait: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// What a [`ReadAhead`] does with the bytes written to it.
#[derive(Debug)]
enum Hold {
    /// Sent as they are written.
    Off,
    /// Sent until the first flush, then held.
    AfterFirstFlush,
    /// Kept, and flushes send nothing, until [`ReadAhead::release`]; a
    /// read sends them first, as the peer may need them to answer.
    Holding(Vec<u8>),
    /// Sent first by the next write, flush or shutdown, in the same system
    /// call as the write's own bytes, or after a read that finds the peer
    /// sending: the peer needs nothing held to go on, and one that talks
    /// without waiting for an answer gets them all the same.
    Released(Vec<u8>),
}

impl<S> ReadAhead<S> {
    pub fn new(io: S) -> Self {
        ReadAhead {
            io,
            may_read_ahead: false,
            buf: None,
            pos: 0,
            end: 0,
            hold: Hold::Off,
            released_wait: None,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// Lets the socket read ahead from now on, once bulk data flows: called
    /// when the TLS handshake on it is over. Until then every read goes
    /// straight into the caller's buffer.
    pub fn read_ahead(&mut self) {
        self.may_read_ahead = true;
    }

    /// Whether the socket holds a read-ahead buffer.
    pub fn holds_read_ahead_buffer(&self) -> bool {
        self.buf.is_some()
    }

    /// Holds whatever is written after the first flush until
    /// [`release`](Self::release). A resuming client's first flush is its
    /// ClientHello and its second its Finished: held, the Finished leaves
    /// only once the session's peer certificate has been checked, and then
    /// in one segment with the app's first bytes instead of one each. A
    /// server's first flush is its handshake flight and its second the
    /// session tickets: held, they leave with its first answer. A socket
    /// dropped while holding never sends what it held.
    pub fn hold_after_first_flush(&mut self) {
        self.hold = Hold::AfterFirstFlush;
    }

    /// Lets the held bytes go with the next write, flush or shutdown, after
    /// the next read that finds the peer sending, or [`RELEASED_WAIT`] after
    /// a read that finds it quiet, whichever comes first.
    pub fn release(&mut self) {
        self.hold = match std::mem::replace(&mut self.hold, Hold::Off) {
            Hold::Holding(held) | Hold::Released(held) if !held.is_empty() => Hold::Released(held),
            _ => Hold::Off,
        };
    }
}

impl<S: AsyncWrite + Unpin> ReadAhead<S> {
    /// After a failed handshake on this socket: sends what it held, the
    /// alert rustls wrote to tell the peer why among it, and gives back
    /// `error`.
    pub async fn fail_handshake(mut self, error: io::Error) -> io::Error {
        self.release();
        let _ = std::future::poll_fn(|cx| Pin::new(&mut self).poll_flush(cx)).await;
        error
    }

    /// Sends the held bytes ahead of `bufs`, in one vectored write while
    /// both fit; returns how many bytes of `bufs` went out with them. Ends
    /// the hold once every held byte is out.
    fn poll_send_held(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            let (Hold::Holding(held) | Hold::Released(held)) = &mut self.hold else {
                return Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
            };
            if held.is_empty() {
                self.hold = Hold::Off;
                self.released_wait = None;
                continue;
            }
            let mut slices = Vec::with_capacity(1 + bufs.len());
            slices.push(io::IoSlice::new(held));
            slices.extend(bufs.iter().map(|b| io::IoSlice::new(b)));
            let n = ready!(Pin::new(&mut self.io).poll_write_vectored(cx, &slices))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            if n < held.len() {
                held.drain(..n);
                continue;
            }
            let sent = n - held.len();
            self.hold = Hold::Off;
            // Its timer, if one was set, is taken off at once: left to
            // fire, it would wake the connection for nothing.
            self.released_wait = None;
            // Nothing of the caller's went yet: write it as if unheld (an
            // `Ok(0)` would read as a closed socket).
            if sent == 0 && bufs.iter().any(|b| !b.is_empty()) {
                continue;
            }
            return Poll::Ready(Ok(sent));
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        dst: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match &this.hold {
            Hold::Holding(held) if !held.is_empty() => {
                ready!(this.poll_send_held(cx, &[]))?;
            }
            Hold::Released(_) => {
                let before = dst.filled().len();
                let read = Self::poll_read_ahead(this, cx, dst);
                let send = match read {
                    Poll::Ready(Ok(())) => dst.filled().len() > before,
                    Poll::Ready(Err(_)) => false,
                    // The peer is quiet, waiting for an answer that may be
                    // long in coming: the held bytes leave without it once
                    // the wait is over.
                    Poll::Pending => this
                        .released_wait
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(RELEASED_WAIT)))
                        .as_mut()
                        .poll(cx)
                        .is_ready(),
                };
                if send {
                    // Not sent now (the socket is full): the next write
                    // sends them, and says why if it cannot.
                    let _ = this.poll_send_held(cx, &[]);
                }
                return read;
            }
            _ => {}
        }
        Self::poll_read_ahead(this, cx, dst)
    }
}

impl<S: AsyncRead + Unpin> ReadAhead<S> {
    fn poll_read_ahead(
        this: &mut Self,
        cx: &mut Context<'_>,
        dst: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if this.pos == this.end {
            let wanted = dst.remaining();
            match &mut this.buf {
                Some(buf) if wanted < buf.len() => {
                    let mut read = ReadBuf::new(buf);
                    ready!(Pin::new(&mut this.io).poll_read(cx, &mut read))?;
                    (this.pos, this.end) = (0, read.filled().len());
                }
                Some(_) => return Pin::new(&mut this.io).poll_read(cx, dst),
                None => {
                    let before = dst.filled().len();
                    ready!(Pin::new(&mut this.io).poll_read(cx, dst))?;
                    if this.may_read_ahead && wanted > 0 && dst.filled().len() - before == wanted {
                        this.buf = Some(vec![0; READ_AHEAD].into_boxed_slice());
                    }
                    return Poll::Ready(Ok(()));
                }
            }
        }
        if let Some(buf) = &this.buf {
            let n = dst.remaining().min(this.end - this.pos);
            dst.put_slice(&buf[this.pos..this.pos + n]);
            this.pos += n;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.hold {
            Hold::Off | Hold::AfterFirstFlush => {
                Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
            }
            Hold::Holding(_) | Hold::Released(_) => {
                self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match &mut this.hold {
            Hold::Off | Hold::AfterFirstFlush => {
                Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
            }
            Hold::Holding(held) => {
                let before = held.len();
                for buf in bufs {
                    held.extend_from_slice(buf);
                }
                Poll::Ready(Ok(held.len() - before))
            }
            Hold::Released(_) => this.poll_send_held(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.hold {
            Hold::Off => {}
            Hold::AfterFirstFlush => this.hold = Hold::Holding(Vec::new()),
            Hold::Holding(_) => return Poll::Ready(Ok(())),
            Hold::Released(_) => {
                ready!(this.poll_send_held(cx, &[]))?;
            }
        }
        Pin::new(&mut this.io).poll_flush(cx)
    }

    /// Held bytes are sent first, released or not: a session shut down in
    /// order ends as rustls wrote it.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if matches!(this.hold, Hold::Holding(_) | Hold::Released(_)) {
            ready!(this.poll_send_held(cx, &[]))?;
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

/// A handshake that never began: the client sent plaintext, and was told in
/// its own protocol that the port speaks TLS
/// ([`trellis_core::refusal::refuse_plaintext_briefly`]).
#[derive(Debug, thiserror::Error)]
#[error("the client sent plaintext; answered that this port speaks only mutual TLS")]
pub struct PlaintextAnswered;

/// Why an inbound handshake ended when a sidecar's resumption met a ticket
/// this sidecar no longer accepts (it restarted, or took a new trust
/// bundle): the caller ends the attempt and dials again with a full
/// handshake, so this is expected once per caller.
#[derive(Debug, thiserror::Error)]
#[error("the caller's session was not resumed; it dials again with a full handshake")]
pub struct ResumptionRefused;

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    use super::*;
    use trellis_core::tcp::DEFAULT_USER_TIMEOUT;

    /// A failed connect is counted under what its error names, each
    /// reason at its own index of the metric's resolved series.
    #[test]
    fn a_failed_connect_is_named_by_its_error() {
        for (kind, token) in [
            (io::ErrorKind::ConnectionRefused, "refused"),
            (io::ErrorKind::HostUnreachable, "unreachable"),
            (io::ErrorKind::NetworkUnreachable, "unreachable"),
            (io::ErrorKind::TimedOut, "timeout"),
            (io::ErrorKind::ConnectionReset, "reset"),
            (io::ErrorKind::AddrNotAvailable, "other"),
        ] {
            let reason = ConnectFailure::of(&io::Error::from(kind));
            assert_eq!(reason.token(), token, "{kind:?}");
            assert_eq!(ConnectFailure::ALL[reason as usize], reason);
        }
    }

    /// A listener is reached at its own address, and a wildcard one at
    /// any address of this host of its family; another port, another
    /// host, or a wildcard of the other family is not.
    #[test]
    fn a_listener_is_reached_at_its_address_or_any_of_the_host_s_for_a_wildcard() {
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        for (listener, remote) in [
            ("127.0.0.1:9000", "127.0.0.1:9000"),
            ("127.0.0.1:9000", "[::ffff:127.0.0.1]:9000"),
            ("127.0.0.1:9000", "0.0.0.0:9000"),
            ("0.0.0.0:9000", "127.0.0.1:9000"),
            ("0.0.0.0:9000", "127.0.0.2:9000"),
            ("0.0.0.0:9000", "0.0.0.0:9000"),
            ("[::]:9000", "[::1]:9000"),
            ("[::1]:9000", "[::1]:9000"),
        ] {
            assert!(reaches(at(listener), at(remote)), "{listener} {remote}");
        }
        for (listener, remote) in [
            ("127.0.0.1:9000", "127.0.0.1:9001"),
            ("127.0.0.1:9000", "127.0.0.2:9000"),
            ("0.0.0.0:9000", "[::1]:9000"),
            ("[::]:9000", "127.0.0.1:9000"),
            // TEST-NET-1: an address of no host here.
            ("0.0.0.0:9000", "192.0.2.1:9000"),
        ] {
            assert!(!reaches(at(listener), at(remote)), "{listener} {remote}");
        }
    }

    /// Connections accepted on a listener of [`bind`] have Nagle off
    /// without a call of their own (the proxy no longer makes one).
    #[tokio::test]
    async fn accepted_connections_have_nagle_off() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap());
    }

    /// Connections accepted on a listener of [`bind`] (which inherit the
    /// listener's options) and dials of [`connect_within`] probe a silent
    /// peer with TCP keepalives.
    #[tokio::test]
    async fn accepted_and_dialled_connections_probe_a_silent_peer() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let dialled = connect_within(addr, CONNECT_TIMEOUT, Some(DEFAULT_USER_TIMEOUT))
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        for (what, stream) in [("accepted", &accepted), ("dialled", &dialled)] {
            let socket = SockRef::from(stream);
            assert!(socket.keepalive().unwrap(), "{what}: SO_KEEPALIVE off");
            assert_eq!(
                socket.tcp_keepalive_time().unwrap(),
                KEEPALIVE_IDLE,
                "{what}"
            );
            assert_eq!(
                socket.tcp_keepalive_interval().unwrap(),
                KEEPALIVE_INTERVAL,
                "{what}"
            );
            assert_eq!(
                socket.tcp_keepalive_retries().unwrap(),
                KEEPALIVE_PROBES,
                "{what}"
            );
        }
    }

    /// Connections accepted on the inbound port ([`bind_mesh`]) and dials
    /// beyond the pod ([`connect_within`]) give up on unacknowledged data
    /// after the user timeout they are given (by default two minutes, when
    /// keepalive gives up on silence); those with the pod ([`bind`],
    /// [`connect_in_pod_within`]) never do, and with the user timeout off
    /// neither do mesh connections.
    #[tokio::test]
    async fn mesh_connections_give_up_on_unacknowledged_data_after_the_user_timeout() {
        let timeout = |stream: &TcpStream| SockRef::from(stream).tcp_user_timeout().unwrap();
        let five_minutes = Some(Duration::from_secs(300));
        for user_timeout in [Some(DEFAULT_USER_TIMEOUT), five_minutes, None] {
            let mesh = bind_mesh("127.0.0.1:0".parse().unwrap(), user_timeout).unwrap();
            let pod = bind("127.0.0.1:0".parse().unwrap()).unwrap();
            let dialled = connect_within(pod.local_addr().unwrap(), CONNECT_TIMEOUT, user_timeout)
                .await
                .unwrap();
            let in_pod = connect_in_pod_within(mesh.local_addr().unwrap(), CONNECT_TIMEOUT)
                .await
                .unwrap();
            let (from_pod, _) = pod.accept().await.unwrap();
            let (from_mesh, _) = mesh.accept().await.unwrap();
            assert_eq!(
                timeout(&from_mesh),
                user_timeout,
                "accepted inbound, {user_timeout:?}"
            );
            assert_eq!(
                timeout(&dialled),
                user_timeout,
                "dialled beyond the pod, {user_timeout:?}"
            );
            assert_eq!(timeout(&from_pod), None, "accepted from the pod");
            assert_eq!(timeout(&in_pod), None, "dialled in the pod");
            for (what, stream) in [("accepted inbound", &from_mesh), ("dialled", &dialled)] {
                assert!(SockRef::from(stream).keepalive().unwrap(), "{what}");
            }
            assert!(SockRef::from(&in_pod).keepalive().unwrap());
        }
    }

    /// Bulk one way (growing the buffer), a little the other way, and each
    /// EOF passed on as a half-close.
    #[tokio::test]
    async fn copies_both_ways_and_passes_on_half_closes() {
        let (mut client, mut a) = duplex(4096);
        let (mut b, mut server) = duplex(4096);
        let proxy = tokio::spawn(async move { copy(&mut a, &mut b).await });
        let up: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let sent = up.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut received = Vec::new();
        server.read_to_end(&mut received).await.unwrap();
        assert_eq!(received, up);
        server.write_all(b"done").await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"done");
        let moved = proxy.await.unwrap();
        assert!(moved.error.is_none(), "{moved:?}");
        assert_eq!((moved.there, moved.back), (up.len() as u64, 4));
    }

    /// A copy cut by an error still says what it moved before.
    #[tokio::test]
    async fn a_copy_cut_by_an_error_counts_what_it_moved() {
        let (mut client, mut a) = duplex(4096);
        let (mut b, mut server) = duplex(4096);
        let proxy = tokio::spawn(async move { copy(&mut a, &mut b).await });
        client.write_all(b"hello").await.unwrap();
        let mut got = [0; 5];
        server.read_exact(&mut got).await.unwrap();
        // The far side goes away: writing to it fails.
        drop(server);
        client.write_all(b"more").await.unwrap();
        let moved = proxy.await.unwrap();
        assert!(moved.error.is_some(), "{moved:?}");
        assert_eq!((moved.there, moved.back), (5, 0));
    }

    /// A copy's state lives in the task of every connection for its whole
    /// life: what only a copy whose write failed needs costs the others one
    /// pointer, no more.
    #[test]
    fn a_copy_that_never_failed_a_write_holds_one_pointer_for_it() {
        assert_eq!(
            size_of::<Copying>(),
            2 * size_of::<Direction>() + size_of::<usize>(),
        );
    }

    /// Both ends of a TCP connection on loopback.
    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let near = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (far, _) = listener.accept().await.unwrap();
        (near, far)
    }

    /// Closes `tcp` with bytes of the peer's still unread: Linux resets
    /// the connection rather than ending it.
    fn close_unread(tcp: TcpStream) {
        drop(tcp);
    }

    /// What Linux does, on which the copy relies: a peer that answers
    /// and then closes with bytes of ours unread resets the connection;
    /// writing to it fails, and its answer, queued before the reset, is
    /// still read after that failure.
    #[tokio::test]
    async fn an_answer_queued_before_a_reset_is_read_after_a_failed_write() {
        let (mut near, mut far) = tcp_pair().await;
        near.write_all(b"upload").await.unwrap();
        far.write_all(b"answer").await.unwrap();
        close_unread(far);
        let failed = loop {
            match near.write(b"more").await {
                Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                Err(e) => break e,
            }
        };
        assert!(
            matches!(
                failed.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ),
            "{failed}"
        );
        let mut got = [0; 6];
        near.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"answer");
    }

    /// A server that answers while its client is still sending and
    /// closes with the upload unread (`413`, an error line) resets the
    /// connection; the copy's write to it fails, and the answer still
    /// reaches the client, then the reset (not a FIN: the upload was cut).
    #[tokio::test]
    async fn an_answer_sent_before_a_reset_reaches_a_client_still_sending() {
        let (client, mut a) = tcp_pair().await;
        let (mut b, mut server) = tcp_pair().await;
        let proxy = tokio::spawn(async move {
            let copied = copy(&mut a, &mut b).await;
            if copied.error.is_some() {
                reset_on_close(&a);
                reset_on_close(&b);
            }
            copied
        });
        let (mut from_client, mut to_server) = client.into_split();
        let uploading = tokio::spawn(async move {
            let chunk = vec![7u8; 64 * 1024];
            while to_server.write_all(&chunk).await.is_ok() {}
        });
        let mut part = vec![0; 100_000];
        server.read_exact(&mut part).await.unwrap();
        // Written and closed at once, before the copy runs again: the
        // reset is in when it next writes to the server.
        server.write_all(b"ERR upload too large\n").await.unwrap();
        close_unread(server);
        let mut got = Vec::new();
        let end = tokio::time::timeout(Duration::from_secs(5), from_client.read_to_end(&mut got))
            .await
            .expect("the client's connection did not end");
        assert_eq!(String::from_utf8_lossy(&got), "ERR upload too large\n");
        let error = end.expect_err("the cut upload ended with a FIN");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionReset, "{error}");
        let copied = proxy.await.unwrap();
        assert!(copied.error.is_some(), "{copied:?}");
        assert_eq!(copied.back, 21);
        uploading.await.unwrap();
    }

    /// A CA of its own, as its root and its issuer.
    fn test_ca() -> (
        rustls::pki_types::CertificateDer<'static>,
        rcgen::Issuer<'static, rcgen::KeyPair>,
    ) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        let root = params.self_signed(&key).unwrap().der().clone();
        (root, rcgen::Issuer::new(params, key))
    }

    /// A certificate for `localhost` that `issuer` signs, and its key.
    fn test_leaf(
        issuer: &rcgen::Issuer<'static, rcgen::KeyPair>,
    ) -> (
        Vec<rustls::pki_types::CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    ) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        let cert = params.signed_by(&key, issuer).unwrap().der().clone();
        let key = rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der());
        (vec![cert], key.into())
    }

    /// A peer's sidecar that refuses the caller's certificate once the
    /// caller's handshake is over sends its alert and resets the
    /// connection, the caller's app still sending: the copy's write to it
    /// fails first, and the alert read after that ends the copy, not the
    /// write's reset, so the caller counts, logs and answers a refusal.
    #[tokio::test]
    async fn an_alert_read_after_a_failed_write_ends_the_copy() {
        use std::sync::Arc;
        let provider = trellis_core::tls::provider();
        let (root, issuer) = test_ca();
        let (_, untrusted) = test_ca();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(root).unwrap();
        let roots = Arc::new(roots);
        let (chain, key) = test_leaf(&issuer);
        let callers = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .unwrap();
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(callers)
            .with_single_cert(chain, key)
            .unwrap();
        let (chain, key) = test_leaf(&untrusted);
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap();

        let (near, far) = tcp_pair().await;
        let refusing = tokio::spawn(async move {
            let accepting = tokio_rustls::TlsAcceptor::from(Arc::new(server)).accept(far);
            let (_, far) = accepting
                .into_fallible()
                .await
                .expect_err("the untrusted caller was accepted");
            // The alert is sent; the caller's bytes are unread: reset.
            reset_on_close(&far);
        });
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut b = tokio_rustls::TlsConnector::from(Arc::new(client))
            .connect(name, near)
            .await
            .unwrap();
        refusing.await.unwrap();
        let (mut app, mut a) = tcp_pair().await;
        app.write_all(b"upload").await.unwrap();
        let copied = tokio::time::timeout(Duration::from_secs(5), copy(&mut a, &mut b))
            .await
            .expect("the copy did not end");
        let error = copied.error.expect("the copy ended without an error");
        assert!(
            matches!(
                trellis_core::tls::rustls_error(&error),
                Some(rustls::Error::AlertReceived(_))
            ),
            "{error}"
        );
        assert_eq!((copied.there, copied.back), (0, 0));
    }

    /// An app that answers and resets while its caller, across the mesh,
    /// has its receive window full: the answer sits in the server's send
    /// queue when the copy ends, and the caller reads it only afterwards.
    /// A FIN after it delivers it all, then an end without `close_notify`
    /// (a cut); a reset would throw the queued part away.
    #[tokio::test]
    async fn an_answer_after_a_failed_write_reaches_a_caller_that_reads_late() {
        use std::sync::Arc;
        const ANSWER: usize = 64 * 1024;
        let provider = trellis_core::tls::provider();
        let (root, issuer) = test_ca();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(root).unwrap();
        let (chain, key) = test_leaf(&issuer);
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();

        // The caller takes little: the rest of the answer stays queued at
        // the server, which can queue all of it.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let near = socket
            .connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (far, _) = listener.accept().await.unwrap();
        SockRef::from(&far).set_send_buffer_size(1 << 20).unwrap();
        let accepting = tokio::spawn(async move {
            tokio_rustls::TlsAcceptor::from(Arc::new(server))
                .accept(far)
                .await
                .unwrap()
        });
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut caller = tokio_rustls::TlsConnector::from(Arc::new(client))
            .connect(name, near)
            .await
            .unwrap();
        fn tls_tcp(s: &tokio_rustls::server::TlsStream<TcpStream>) -> &TcpStream {
            s.get_ref().0
        }
        let mut a = ResetIfCut::new(accepting.await.unwrap(), tls_tcp);
        caller.write_all(b"upload").await.unwrap();
        caller.flush().await.unwrap();

        // The app's answer is all in before its reset, and the reset is in
        // before the copy writes the upload to it.
        let (mut b, mut app) = tcp_pair().await;
        app.write_all(&[7u8; ANSWER]).await.unwrap();
        let mut peeked = vec![0u8; ANSWER];
        while b.peek(&mut peeked).await.unwrap() < ANSWER {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        reset_on_close(&app);
        drop(app);
        while SockRef::from(&b).take_error().unwrap().is_none() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }

        let copied = tokio::time::timeout(Duration::from_secs(5), copy(&mut *a, &mut b))
            .await
            .expect("the copy did not end");
        assert!(copied.error.is_some(), "{copied:?}");
        assert_eq!(copied.back, ANSWER as u64);
        assert_eq!(copied.wrote_after_cut, Some(Side::A));
        a.end_after_cut().await;

        let mut got = Vec::new();
        let end = tokio::time::timeout(Duration::from_secs(5), caller.read_to_end(&mut got))
            .await
            .expect("the caller's connection did not end");
        assert_eq!(got.len(), ANSWER, "the answer was cut short");
        let error = end.expect_err("the cut ended with close_notify");
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof, "{error}");
    }

    /// A reader that hands out `last` and then fails with a reset, and
    /// counts the reads asked of it after that.
    struct ResetAfter {
        last: &'static [u8],
        given: bool,
        reads_after_reset: usize,
    }

    impl AsyncRead for ResetAfter {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            dst: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            if this.given {
                this.reads_after_reset += 1;
                return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
            }
            this.given = true;
            dst.put_slice(this.last);
            Poll::Ready(Ok(()))
        }
    }

    /// A writer that takes every byte and whose first flush waits.
    #[derive(Default)]
    struct SlowFlush {
        written: Vec<u8>,
        flushes: usize,
    }

    impl AsyncWrite for SlowFlush {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.get_mut().written.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            this.flushes += 1;
            if this.flushes == 1 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// The bytes read before a reset are written and flushed, then the
    /// reset ends the way; a flush that waits does not make the copy read
    /// the reset reader again.
    #[tokio::test]
    async fn bytes_before_a_reset_are_flushed_and_the_reader_is_not_read_again() {
        let mut reader = ResetAfter {
            last: b"last words",
            given: false,
            reads_after_reset: 0,
        };
        let mut writer = SlowFlush::default();
        let mut way = Direction::default();
        let ended = poll_fn(|cx| way.poll(cx, Pin::new(&mut reader), Pin::new(&mut writer))).await;
        let error = ended
            .map_err(Failure::into_error)
            .expect_err("a reset ends the way");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionReset);
        assert_eq!(writer.written, b"last words");
        assert_eq!(
            writer.flushes, 2,
            "the bytes were not flushed before the reset"
        );
        assert_eq!(way.moved, 10);
        assert_eq!(
            reader.reads_after_reset, 1,
            "the reset reader was read again while the flush waited"
        );
    }

    /// A socket that records each write call as one entry, takes at most
    /// `max` bytes a call, and reads `incoming` (nothing waiting while it
    /// is empty).
    #[derive(Default)]
    struct Recorder {
        calls: Vec<Vec<u8>>,
        max: usize,
        incoming: Vec<u8>,
    }

    impl AsyncRead for Recorder {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            dst: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            if this.incoming.is_empty() {
                return Poll::Pending;
            }
            let n = dst.remaining().min(this.incoming.len());
            dst.put_slice(&this.incoming[..n]);
            this.incoming.drain(..n);
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            let all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            let n = all.len().min(this.max);
            this.calls.push(all[..n].to_vec());
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Has `socket` hold what is written after its first flush, then
    /// writes `sent` (which its flush sends) and `held`.
    async fn hold<S: AsyncRead + AsyncWrite + Unpin>(
        socket: &mut ReadAhead<S>,
        sent: &[u8],
        held: &[u8],
    ) {
        socket.hold_after_first_flush();
        socket.write_all(sent).await.unwrap();
        socket.flush().await.unwrap();
        socket.write_all(held).await.unwrap();
        socket.flush().await.unwrap();
    }

    fn recorder(max: usize) -> ReadAhead<Recorder> {
        ReadAhead::new(Recorder {
            max,
            ..Recorder::default()
        })
    }

    /// What a resuming dial does: the ClientHello leaves at once, the
    /// Finished is held, and once released it leaves in the same write as
    /// the app's first bytes.
    #[tokio::test]
    async fn held_bytes_leave_in_one_write_with_the_first_bytes_after_release() {
        let mut socket = recorder(usize::MAX);
        hold(&mut socket, b"hello", b"finished").await;
        assert_eq!(
            socket.io.calls,
            [b"hello".to_vec()],
            "the Finished left while held"
        );
        socket.release();
        socket.write_all(b"GET /").await.unwrap();
        socket.write_all(b" HTTP/1.1").await.unwrap();
        assert_eq!(
            socket.io.calls,
            [
                b"hello".to_vec(),
                b"finishedGET /".to_vec(),
                b" HTTP/1.1".to_vec()
            ]
        );
    }

    /// Released with nothing to send along (a server-first protocol), a
    /// flush sends the held bytes alone; a socket dropped while holding
    /// never sends them.
    #[tokio::test]
    async fn a_flush_sends_released_bytes_and_a_drop_while_holding_sends_none() {
        let mut socket = recorder(usize::MAX);
        socket.hold_after_first_flush();
        socket.flush().await.unwrap();
        socket.write_all(b"finished").await.unwrap();
        socket.release();
        socket.flush().await.unwrap();
        assert_eq!(socket.io.calls, [b"finished".to_vec()]);

        let (mut peer, io) = duplex(1024);
        let mut socket = ReadAhead::new(io);
        hold(&mut socket, b"hello", b"finished").await;
        drop(socket);
        let mut received = Vec::new();
        peer.read_to_end(&mut received).await.unwrap();
        assert_eq!(received, b"hello", "held bytes left a dropped socket");
    }

    /// A read sends held bytes first (the peer may be waiting for them
    /// before it answers), and a socket taking a few bytes a call still
    /// sends every byte once, held ones first.
    #[tokio::test]
    async fn a_read_sends_held_bytes_and_short_writes_keep_the_order() {
        let mut socket = recorder(usize::MAX);
        socket.io.incoming = b"answer".to_vec();
        socket.hold_after_first_flush();
        socket.flush().await.unwrap();
        socket.write_all(b"second hello").await.unwrap();
        let mut buf = [0u8; 16];
        let n = socket.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"answer");
        assert_eq!(socket.io.calls, [b"second hello".to_vec()]);

        let mut socket = recorder(3);
        socket.hold_after_first_flush();
        socket.flush().await.unwrap();
        socket.write_all(b"finished").await.unwrap();
        socket.release();
        socket.write_all(b"first bytes").await.unwrap();
        socket.flush().await.unwrap();
        assert_eq!(socket.io.calls.concat(), b"finishedfirst bytes");
        assert!(socket.io.calls.iter().all(|c| !c.is_empty()));
    }

    /// What a server does: its session tickets, written after its
    /// handshake flight, wait for its first answer; a read that finds
    /// nothing waiting keeps them, and one that finds the peer sending
    /// (a caller that talks without waiting for answers) sends them.
    #[tokio::test]
    async fn released_bytes_wait_for_an_answer_or_for_the_peer_to_talk() {
        let mut buf = [0u8; 16];
        let mut read_once = async |socket: &mut ReadAhead<Recorder>| {
            let mut dst = ReadBuf::new(&mut buf);
            let polled = std::future::poll_fn(|cx| {
                Poll::Ready(Pin::new(&mut *socket).poll_read(cx, &mut dst).is_ready())
            })
            .await;
            polled.then(|| dst.filled().to_vec())
        };
        let mut socket = recorder(usize::MAX);
        hold(&mut socket, b"flight", b"tickets").await;
        socket.release();
        assert_eq!(read_once(&mut socket).await, None, "nothing to read yet");
        assert_eq!(
            socket.io.calls,
            [b"flight".to_vec()],
            "a read that found nothing sent them"
        );
        assert!(socket.released_wait.is_some(), "the wait begins");
        socket.write_all(b"answer").await.unwrap();
        assert_eq!(
            socket.io.calls,
            [b"flight".to_vec(), b"ticketsanswer".to_vec()]
        );
        assert!(
            socket.released_wait.is_none(),
            "the wait's timer is taken off with them"
        );

        let mut socket = recorder(usize::MAX);
        socket.hold_after_first_flush();
        socket.flush().await.unwrap();
        socket.write_all(b"tickets").await.unwrap();
        socket.release();
        socket.io.incoming = b"more".to_vec();
        assert_eq!(read_once(&mut socket).await.as_deref(), Some(&b"more"[..]));
        assert_eq!(
            socket.io.calls,
            [b"tickets".to_vec()],
            "a talking peer waits for them"
        );
    }

    /// A server's tickets when its caller sent its request with its
    /// Finished and waits (a long poll): the app has not answered, the
    /// caller sends nothing, and the tickets leave on their own after
    /// [`RELEASED_WAIT`], the read that waits woken to send them. The
    /// caller's next bytes still come through that read.
    #[tokio::test]
    async fn released_bytes_leave_on_their_own_while_the_peer_is_quiet() {
        let (mut peer, io) = duplex(1024);
        let mut socket = ReadAhead::new(io);
        hold(&mut socket, b"flight", b"tickets").await;
        socket.release();
        let reading = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            let n = socket.read(&mut buf).await.unwrap();
            (socket, buf[..n].to_vec())
        });
        let mut sent = [0u8; 13];
        tokio::time::timeout(Duration::from_secs(10), peer.read_exact(&mut sent))
            .await
            .expect("the tickets left without an answer")
            .unwrap();
        assert_eq!(&sent, b"flighttickets");
        peer.write_all(b"more").await.unwrap();
        let (socket, read) = reading.await.unwrap();
        assert_eq!(read, b"more");
        assert!(socket.released_wait.is_none());
        assert!(matches!(socket.hold, Hold::Off), "{:?}", socket.hold);
    }

    /// A request-sized exchange holds no read-ahead buffer; bulk data gets
    /// one, and every byte comes out in order whatever the caller asks for.
    #[tokio::test]
    async fn reads_ahead_only_under_bulk_data_and_keeps_every_byte() {
        let (mut peer, socket) = duplex(256 * 1024);
        let mut socket = ReadAhead::new(socket);
        socket.read_ahead();
        peer.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut small = [0u8; 4096];
        let n = socket.read(&mut small).await.unwrap();
        assert_eq!(&small[..n], b"GET / HTTP/1.1\r\n\r\n");
        assert!(socket.buf.is_none(), "a short read must not allocate");

        let bulk: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
        peer.write_all(&bulk).await.unwrap();
        drop(peer);
        let mut received = Vec::new();
        let mut chunk = vec![0u8; 4096];
        loop {
            let n = socket.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            received.extend_from_slice(&chunk[..n]);
            if received.len() > 8192 {
                // Larger reads than the buffer go straight through.
                chunk.resize(READ_AHEAD + 1, 0);
            }
        }
        assert!(socket.buf.is_some(), "bulk data must be read ahead");
        assert_eq!(received, bulk);
    }

    /// Before its handshake is over a socket never reads ahead, however
    /// much the peer sends (a ClientHello of many fragments, rustls reading
    /// it 4 KiB at a time): a peer not yet authenticated costs no
    /// read-ahead buffer. Once the handshake is over, bulk data gets one.
    #[tokio::test]
    async fn reads_ahead_only_once_the_handshake_is_over() {
        let (mut peer, socket) = duplex(256 * 1024);
        let mut socket = ReadAhead::new(socket);
        let hello: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 251) as u8).collect();
        peer.write_all(&hello).await.unwrap();
        let mut received = Vec::new();
        let mut chunk = [0u8; 4096];
        while received.len() < hello.len() {
            let n = socket.read(&mut chunk).await.unwrap();
            assert_eq!(n, chunk.len(), "each read fills the caller's buffer");
            received.extend_from_slice(&chunk[..n]);
            assert!(
                !socket.holds_read_ahead_buffer(),
                "a read-ahead buffer before the handshake was over"
            );
        }
        assert_eq!(received, hello);

        socket.read_ahead();
        peer.write_all(&hello).await.unwrap();
        let n = socket.read(&mut chunk).await.unwrap();
        assert_eq!(n, chunk.len());
        assert!(
            socket.holds_read_ahead_buffer(),
            "bulk data after the handshake"
        );
    }
}
