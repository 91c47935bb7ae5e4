//! Connections that hold a port's slots and send nothing, from several
//! loopback addresses standing for several clients, and whether the port
//! closed one.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};

/// How long a port may take to close a connection it refuses: far less
/// than any head timeout, so a connection it admitted is still open then.
pub const REFUSAL: Duration = Duration::from_secs(2);

/// The loopback address 127.0.0.`last`.
pub fn loopback(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// A TCP connection to `addr` from `from`, which sends nothing.
pub async fn connect_from(from: IpAddr, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    socket.connect(addr).await.unwrap()
}

/// `count` connections from `from` to `addr` that send nothing.
pub async fn hold(from: IpAddr, addr: SocketAddr, count: usize) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(count);
    for _ in 0..count {
        held.push(connect_from(from, addr).await);
    }
    held
}

/// How long the port took to close `tcp` (end of stream or reset) without
/// a byte sent, or `None` when it was still open after `patience`.
pub async fn closed_within(tcp: &mut TcpStream, patience: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 64];
    match tokio::time::timeout(patience, tcp.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => Some(start.elapsed()),
        Ok(Ok(n)) => panic!("the port sent {n} bytes to a client that sent nothing"),
        Err(_) => None,
    }
}

/// How many of `held` the port closed within `patience` (all looked at
/// together).
pub async fn closed_among(held: &mut [TcpStream], patience: Duration) -> usize {
    tokio::time::sleep(patience).await;
    let mut closed = 0;
    for tcp in held {
        if closed_within(tcp, Duration::from_millis(5)).await.is_some() {
            closed += 1;
        }
    }
    closed
}

/// Checks that `read`, all a port wrote on a connection before ending it
/// after `first` and a second request were sent on it, is one answer, to
/// `first`, starting with `status` and saying `connection: close`.
pub fn assert_one_answer_then_closed(first: &str, status: &str, read: Vec<u8>) {
    let read = String::from_utf8(read).unwrap();
    assert!(read.starts_with(status), "{first:?}: {read}");
    let answers = read.lines().filter(|l| l.starts_with("HTTP/1.")).count();
    assert_eq!(answers, 1, "{first:?}: {read}");
    assert!(
        read.to_ascii_lowercase()
            .contains("\r\nconnection: close\r\n"),
        "{first:?}: {read}"
    );
}
