//! Limits on the connections of the HTTP/1.1 ports that every pod of
//! the cluster can reach (the sidecar's admin port, the control plane's
//! admin and webhook ports): how many are served at once, in all and from
//! one client address ([`ConnectionLimits`]), how long a client has to send
//! a request's head and how long one connection is served at all
//! ([`serve_http1_for`]). A client that opens connections and sends
//! nothing, or sends slowly, then holds neither file descriptors nor
//! memory without bound, and one client address cannot take every slot.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::slots::{ClientSlot, ClientSlots};

/// How many connections a port serves at once, in all and from one client
/// address. Connections past either limit are closed as they are accepted.
pub struct ConnectionLimits {
    open: Arc<Semaphore>,
    clients: Arc<ClientSlots>,
    total: usize,
    per_client: usize,
}

/// Which limit refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("{limit} connections are open from this address already")]
    FromClient { limit: usize },
    #[error("{limit} connections are open already")]
    Total { limit: usize },
}

/// One admitted connection's slots, in all and of its client address,
/// given back when dropped: keep it as long as the connection is served.
pub struct Admitted {
    _open: OwnedSemaphorePermit,
    _client: ClientSlot,
}

impl ConnectionLimits {
    /// At most `total` connections at once, at most `per_client` of them
    /// from one client address.
    pub fn new(total: usize, per_client: usize) -> Self {
        Self {
            open: Arc::new(Semaphore::new(total)),
            clients: ClientSlots::new(per_client),
            total,
            per_client,
        }
    }

    /// The slots for one more connection from `client`, or the limit that
    /// refuses it.
    pub fn admit(&self, client: IpAddr) -> Result<Admitted, Refused> {
        let client_slot = self.clients.try_take(client).ok_or(Refused::FromClient {
            limit: self.per_client,
        })?;
        let open = self
            .open
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refused::Total { limit: self.total })?;
        Ok(Admitted {
            _open: open,
            _client: client_slot,
        })
    }

    /// How many client addresses hold a connection now.
    pub fn clients(&self) -> usize {
        self.clients.addresses()
    }
}

/// Serves HTTP/1.1 on `io`: a request's head must arrive within
/// `head_timeout` (and an idle connection waits no longer for the next
/// one); after `lifetime` the connection closes once the answer in
/// progress is written, or `head_timeout` later if it cannot be (a client
/// that pipelines requests and never reads would otherwise hold its
/// connection for ever).
pub async fn serve_http1_for<I, S>(io: I, service: S, head_timeout: Duration, lifetime: Duration)
where
    I: AsyncRead + AsyncWrite + Unpin,
    S: hyper::service::HttpService<Incoming, ResBody = Full<Bytes>>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(head_timeout)
        .serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    if tokio::time::timeout(lifetime, conn.as_mut()).await.is_err() {
        conn.as_mut().graceful_shutdown();
        let _ = tokio::time::timeout(head_timeout, conn).await;
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http::Response;
    use hyper::service::service_fn;

    use super::*;

    /// A client that asks for answers and never reads them cannot hold its
    /// connection past its lifetime and the grace after it.
    #[tokio::test]
    async fn a_client_that_never_reads_is_closed_after_the_lifetime() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut client = socket
            .connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        let big = Bytes::from(vec![b'x'; 8 << 20]);
        let service = service_fn(move |_req| {
            let big = big.clone();
            async move { Ok::<_, Infallible>(Response::new(Full::new(big))) }
        });
        let served = tokio::spawn(serve_http1_for(
            tcp,
            service,
            Duration::from_millis(500),
            Duration::from_millis(200),
        ));
        tokio::io::AsyncWriteExt::write_all(&mut client, b"GET /big HTTP/1.1\r\nhost: a\r\n\r\n")
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), served)
            .await
            .expect("a connection whose answer cannot be written outlived its lifetime")
            .unwrap();
        drop(client);
    }

    #[test]
    fn a_client_address_holds_at_most_its_share_of_connections() {
        let limits = ConnectionLimits::new(8, 3);
        let (one, two): (IpAddr, IpAddr) =
            ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let mut held: Vec<Admitted> = (0..3).map(|_| limits.admit(one).unwrap()).collect();
        assert_eq!(
            limits.admit(one).err(),
            Some(Refused::FromClient { limit: 3 })
        );
        let other = limits.admit(two).expect("another address is served");
        held.pop();
        held.push(limits.admit(one).expect("a slot came free"));
        drop((held, other));
        assert_eq!(limits.clients(), 0, "nothing kept for gone clients");
    }

    #[test]
    fn connections_past_the_total_are_refused_until_one_closes() {
        let limits = ConnectionLimits::new(4, 3);
        let ip = |last: u8| IpAddr::from([10, 0, 0, last]);
        let mut held: Vec<Admitted> = (1..=4).map(|i| limits.admit(ip(i)).unwrap()).collect();
        assert_eq!(limits.admit(ip(5)).err(), Some(Refused::Total { limit: 4 }));
        assert_eq!(limits.clients(), 4, "a refused client holds no slot");
        held.pop();
        held.push(limits.admit(ip(5)).expect("a slot came free"));
        drop(held);
        assert_eq!(limits.clients(), 0);
    }
}
