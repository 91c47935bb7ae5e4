//! Socket helpers shared by the listeners: binding, the original destination
//! of a redirected connection, dialling with a deadline, and the byte copy.
//!
//! Each direction of the copy starts with a [`COPY_BUFFER_SMALL`] buffer
//! (what a request/response exchange or an idle held connection needs) and
//! grows it once to [`COPY_BUFFER_BULK`] when a read fills it, so bulk
//! transfers take few, large system calls and TLS writes. Per connection
//! the copy holds at most two bulk buffers.
//!
//! Nothing here knows about identities or policy.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use socket2::{Domain, SockRef, Socket, Type};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long dialling an upstream may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The buffer each direction of a copy starts with.
pub const COPY_BUFFER_SMALL: usize = 8 * 1024;
/// The buffer a direction grows to once a read fills the small one: four
/// full TLS records.
pub const COPY_BUFFER_BULK: usize = 64 * 1024;

/// How many connections may wait to be accepted on a listener.
const LISTEN_BACKLOG: i32 = 1024;

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
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
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

/// Dials `addr` with [`CONNECT_TIMEOUT`], with Nagle off.
pub async fn connect(addr: impl tokio::net::ToSocketAddrs) -> io::Result<TcpStream> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Copies both ways until both sides are done; an EOF on one side is passed
/// on as a half-close (shutdown of the write side) of the other. Returns
/// the bytes moved as (a to b, b to a). The first error ends both ways.
pub async fn copy<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (mut a_to_b, mut b_to_a) = (Direction::default(), Direction::default());
    poll_fn(|cx| {
        let there = a_to_b.poll(cx, Pin::new(&mut *a), Pin::new(&mut *b))?;
        let back = b_to_a.poll(cx, Pin::new(&mut *b), Pin::new(&mut *a))?;
        Poll::Ready(Ok((ready!(there), ready!(back))))
    })
    .await
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
    moved: u64,
}

impl Direction {
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(self.moved));
        }
        loop {
            if self.pos == self.cap && !self.eof {
                let buf = self
                    .buf
                    .get_or_insert_with(|| vec![0; COPY_BUFFER_SMALL].into_boxed_slice());
                let mut read = ReadBuf::new(buf);
                match reader.as_mut().poll_read(cx, &mut read) {
                    Poll::Ready(Ok(())) => {
                        let n = read.filled().len();
                        (self.pos, self.cap) = (0, n);
                        self.eof = n == 0;
                        if n == buf.len() && n < COPY_BUFFER_BULK {
                            // Bulk data: the next reads get the big buffer.
                            let mut big = vec![0; COPY_BUFFER_BULK].into_boxed_slice();
                            big[..n].copy_from_slice(&buf[..n]);
                            self.buf = Some(big);
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        if self.unflushed {
                            ready!(writer.as_mut().poll_flush(cx))?;
                            self.unflushed = false;
                        }
                        return Poll::Pending;
                    }
                }
            }
            if let Some(buf) = &self.buf {
                while self.pos < self.cap {
                    let n = ready!(writer.as_mut().poll_write(cx, &buf[self.pos..self.cap]))?;
                    if n == 0 {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    self.pos += n;
                    self.moved += n as u64;
                    self.unflushed = true;
                }
            }
            if self.eof {
                ready!(writer.as_mut().poll_flush(cx))?;
                ready!(writer.as_mut().poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(self.moved));
            }
        }
    }
}

/// The rustls error inside an I/O error from a TLS handshake, named for
/// metrics; `"io"` when it is not a TLS error.
pub fn handshake_failure_reason(e: &io::Error) -> &'static str {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(tls) => trellis_core::tls::failure_reason(tls),
        None if e.kind() == io::ErrorKind::UnexpectedEof => "closed",
        None => "io",
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    use super::*;

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
        let moved = proxy.await.unwrap().unwrap();
        assert_eq!(moved, (up.len() as u64, 4));
    }
}
