//! Binding the control plane's listeners (gRPC, admin, webhook), and
//! telling an address every network namespace has of its own (loopback,
//! unspecified) from one that names a single workload.
//!
//! `[::]:PORT` means every address of both IP families: one dual-stack
//! socket (`IPV6_V6ONLY` off, whatever the host's `net.ipv6.bindv6only`
//! says), which takes IPv4 connections as `::ffff:a.b.c.d`. The control
//! plane reads no original destination and decides nothing by the peer's
//! address family, so one socket serves an IPv4-only, IPv6-only or
//! dual-stack pod alike. Where the namespace has no IPv6 at all, `[::]`
//! falls back to `0.0.0.0`, logged. Any other address binds exactly that
//! address.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};

use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpStream};

/// How many connections may wait to be accepted, as tokio's default.
const LISTEN_BACKLOG: i32 = 1024;

/// `EAFNOSUPPORT` on Linux: the kernel has no IPv6 at all.
const EAFNOSUPPORT: i32 = 97;

/// Whether `address` (an `ip:port`) is one that every network namespace
/// has of its own: loopback or unspecified, IPv4-mapped ones included. A
/// sidecar with default flags advertises `127.0.0.1:15006`, so such an
/// address says nothing about which workload is behind it, and two
/// workloads in separate namespaces (containers, VMs) reporting it are not
/// contending for one address. Anything that does not parse is not.
pub fn is_namespace_local(address: &str) -> bool {
    address.parse::<SocketAddr>().is_ok_and(|a| {
        let ip = a.ip().to_canonical();
        ip.is_loopback() || ip.is_unspecified()
    })
}

/// The connections a stopping port's `listener` still queues (their TCP
/// handshake done, not yet accepted), taken without waiting, as the
/// listener closes: closing it with them queued would reset them. One whose
/// client has begun to send (more than empty lines, which a server ignores
/// before a request line, RFC 9112 section 2.2; a TLS ClientHello is
/// more), found by a look at what waits that does not wait
/// ([`trellis_core::http1::begun_in_socket`]), is returned, to
/// be served its first request as its last; one with nothing received is
/// closed at once, as a connection accepted before the stop is. Must be
/// called inside a tokio runtime.
pub fn queued(listener: TcpListener) -> Vec<(TcpStream, SocketAddr)> {
    let mut begun = Vec::new();
    // Non-blocking still, as tokio keeps it.
    let Ok(listener) = listener.into_std() else {
        return begun;
    };
    loop {
        let (tcp, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                ) =>
            {
                continue;
            }
            // `WouldBlock`: none is left.
            Err(_) => return begun,
        };
        let sent = tcp.set_nonblocking(true).is_ok() && trellis_core::http1::begun_in_socket(&tcp);
        if let (true, Ok(tcp)) = (sent, TcpStream::from_std(tcp)) {
            begun.push((tcp, peer));
        }
    }
}

/// Binds a TCP listener on `addr`; `[::]` is dual-stack (see the module
/// docs). Must be called inside a tokio runtime.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let dual_stack = matches!(addr, SocketAddr::V6(v6) if v6.ip().is_unspecified());
    if !dual_stack {
        return bind_exactly(addr, None);
    }
    match bind_exactly(addr, Some(false)) {
        Err(e) if ipv6_unavailable(&e) => {
            let v4 = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), addr.port());
            tracing::info!(%addr, fallback = %v4, error = %e, "no IPv6 here; listening on IPv4 only");
            bind_exactly(v4, None)
        }
        other => other,
    }
}

fn bind_exactly(addr: SocketAddr, only_v6: Option<bool>) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    // As tokio does: a restarted control plane rebinds while old
    // connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    if let Some(only_v6) = only_v6 {
        socket.set_only_v6(only_v6)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Whether a bind failed because the namespace has no IPv6 (the kernel
/// lacks it, or no IPv6 address can be bound), rather than for a reason
/// that must stop start-up (the port is taken, ...).
fn ipv6_unavailable(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::AddrNotAvailable || e.raw_os_error() == Some(EAFNOSUPPORT)
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv6Addr};

    use socket2::SockRef;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    /// Accepts one connection from `peer` and exchanges a byte with it.
    async fn round_trip(listener: &TcpListener, peer: IpAddr) {
        let port = listener.local_addr().unwrap().port();
        let mut client = TcpStream::connect((peer, port)).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        client.write_all(b"x").await.unwrap();
        let mut byte = [0u8; 1];
        server.read_exact(&mut byte).await.unwrap();
        assert_eq!(&byte, b"x");
    }

    #[tokio::test]
    async fn unspecified_ipv6_takes_both_families() {
        let listener = bind("[::]:0".parse().unwrap()).unwrap();
        let local = listener.local_addr().unwrap();
        if local.is_ipv4() {
            // This namespace has no IPv6: the fallback took over.
            round_trip(&listener, Ipv4Addr::LOCALHOST.into()).await;
            return;
        }
        assert!(!SockRef::from(&listener).only_v6().unwrap());
        round_trip(&listener, Ipv4Addr::LOCALHOST.into()).await;
        // The kernel may have IPv6 while loopback has no `::1`.
        if std::net::TcpListener::bind("[::1]:0").is_err() {
            crate::machine::note("skipped: no IPv6 loopback");
            return;
        }
        round_trip(&listener, Ipv6Addr::LOCALHOST.into()).await;
    }

    #[tokio::test]
    async fn other_addresses_bind_exactly() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        assert_eq!(
            listener.local_addr().unwrap().ip(),
            IpAddr::from(Ipv4Addr::LOCALHOST)
        );
        round_trip(&listener, Ipv4Addr::LOCALHOST.into()).await;
    }

    #[test]
    fn loopback_and_unspecified_addresses_are_every_namespace_s_own() {
        for local in [
            "127.0.0.1:15006",
            "127.3.4.5:80",
            "[::1]:15006",
            "[::ffff:127.0.0.1]:15006",
            "0.0.0.0:15006",
            "[::]:15006",
        ] {
            assert!(is_namespace_local(local), "{local}");
        }
        for owned in [
            "10.0.0.1:15006",
            "[fd00::1]:15006",
            "[::ffff:10.0.0.1]:1",
            "junk",
        ] {
            assert!(!is_namespace_local(owned), "{owned}");
        }
    }

    #[test]
    fn knows_a_namespace_without_ipv6_from_other_failures() {
        assert!(ipv6_unavailable(&io::Error::from_raw_os_error(
            EAFNOSUPPORT
        )));
        assert!(ipv6_unavailable(&io::Error::from(
            io::ErrorKind::AddrNotAvailable
        )));
        assert!(!ipv6_unavailable(&io::Error::from(
            io::ErrorKind::AddrInUse
        )));
    }
}
