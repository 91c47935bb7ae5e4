//! Socket helpers shared by the listeners: the original destination of a
//! redirected connection, dialling with a deadline, and the byte copy.
//!
//! Nothing here knows about identities or policy.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long dialling an upstream may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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
/// the bytes moved as (a to b, b to a).
pub async fn copy<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    tokio::io::copy_bidirectional(a, b).await
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
