//! Limits on the connections of the ports that every pod of the cluster
//! can reach (the sidecar's admin port, the control plane's admin, webhook
//! and gRPC ports): how many are served at once, in all and from one
//! client address ([`ConnectionLimits`]), and for the HTTP/1.1 ones how long a client has to send
//! a request's head and how long one connection is served at all
//! ([`serve_http1_for`]). A client that opens connections and sends
//! nothing, or sends slowly, then holds neither file descriptors nor
//! memory without bound, and one client address cannot take every slot.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;

/// How many connections a port serves at once, in all and from one client
/// address. A connection past the cap of its address is closed as it is
/// accepted. With every slot taken, a client address holding at least two
/// fewer connections than the address holding the most takes a slot from
/// it: that address's oldest connection is told to close
/// ([`Admitted::evicted`]). So a few clients that fill every slot (eight
/// pods holding sixteen idle connections each) cannot keep out another,
/// the kubelet with its probes among them, while clients holding even
/// shares are refused past the total.
pub struct ConnectionLimits {
    held: Arc<Mutex<Held>>,
    total: usize,
    per_client: usize,
    /// Whether the host's own address (`127.0.0.1`, `::1`) is spared the
    /// per-address cap ([`ConnectionLimits::sparing_the_own_host`]).
    spare_own_host: bool,
}

/// The connections a port serves now.
#[derive(Default)]
struct Held {
    /// Connections counted against the total: not those told to close.
    open: usize,
    next: u64,
    /// Each address's connections, oldest first, with how to tell each to
    /// close.
    clients: HashMap<IpAddr, VecDeque<(u64, Arc<Notify>)>>,
}

/// Which limit refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("{limit} connections are open from this address already")]
    FromClient { limit: usize },
    #[error("{limit} connections are open already")]
    Total { limit: usize },
}

impl Refused {
    /// The limit as a metric label names it: `per_client` or `total`.
    pub fn reason(self) -> &'static str {
        match self {
            Refused::FromClient { .. } => "per_client",
            Refused::Total { .. } => "total",
        }
    }
}

/// One admitted connection's slot, given back when dropped: keep it as long
/// as the connection is served.
pub struct Admitted {
    held: Arc<Mutex<Held>>,
    ip: IpAddr,
    id: u64,
    evicted: Arc<Notify>,
}

impl Admitted {
    /// Resolves once the connection is told to close, to make way for a
    /// client address that holds fewer.
    pub async fn evicted(&self) {
        self.evicted.notified().await;
    }

    /// Resolves once the connection is told to close, as
    /// [`Admitted::evicted`], without borrowing the slot: for a connection
    /// that keeps its slot and watches for eviction in its own IO.
    pub fn eviction(&self) -> impl Future<Output = ()> + Send + 'static {
        let evicted = self.evicted.clone();
        async move { evicted.notified().await }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let Some(connections) = held.clients.get_mut(&self.ip) else {
            return;
        };
        // One told to close gave its slot away already.
        let Some(at) = connections.iter().position(|(id, _)| *id == self.id) else {
            return;
        };
        connections.remove(at);
        if connections.is_empty() {
            held.clients.remove(&self.ip);
        }
        held.open -= 1;
    }
}

impl ConnectionLimits {
    /// At most `total` connections at once, at most `per_client` of them
    /// from one client address.
    pub fn new(total: usize, per_client: usize) -> Self {
        Self {
            held: Arc::default(),
            total,
            per_client,
            spare_own_host: false,
        }
    }

    /// Spares connections from the host's own address (`127.0.0.1`, `::1`)
    /// the per-address cap; they still count towards the total. For a port
    /// whose legitimate clients may all share the host's address (a local
    /// mesh whose sidecars run beside its control plane), where a client
    /// there could do worse than hold connections anyway.
    pub fn sparing_the_own_host(mut self) -> Self {
        self.spare_own_host = true;
        self
    }

    /// The slot for one more connection from `client` (perhaps taken from
    /// the address holding the most), or the limit that refuses it.
    pub fn admit(&self, client: IpAddr) -> Result<Admitted, Refused> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let mine = held.clients.get(&client).map_or(0, VecDeque::len);
        if mine >= self.per_client && !(self.spare_own_host && is_own_host(client)) {
            return Err(Refused::FromClient {
                limit: self.per_client,
            });
        }
        if held.open >= self.total {
            let most = held
                .clients
                .iter_mut()
                .max_by_key(|(_, connections)| connections.len())
                .filter(|(_, connections)| connections.len() > mine + 1)
                .and_then(|(_, connections)| connections.pop_front());
            let Some((_, oldest)) = most else {
                return Err(Refused::Total { limit: self.total });
            };
            oldest.notify_one();
            held.open -= 1;
        }
        held.open += 1;
        let id = held.next;
        held.next += 1;
        let evicted = Arc::new(Notify::new());
        held.clients
            .entry(client)
            .or_default()
            .push_back((id, evicted.clone()));
        Ok(Admitted {
            held: self.held.clone(),
            ip: client,
            id,
            evicted,
        })
    }

    /// How many client addresses hold a connection now.
    pub fn clients(&self) -> usize {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clients
            .len()
    }
}

/// `127.0.0.1` or `::1` (an IPv4-mapped `127.0.0.1` too): the host itself,
/// not the rest of the loopback range.
pub fn is_own_host(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4 == std::net::Ipv4Addr::LOCALHOST,
        IpAddr::V6(v6) => {
            v6 == std::net::Ipv6Addr::LOCALHOST
                || v6.to_ipv4_mapped() == Some(std::net::Ipv4Addr::LOCALHOST)
        }
    }
}

/// Serves HTTP/1.1 on `io`: a request's head must arrive within
/// `head_timeout` (and an idle connection waits no longer for the next
/// one); after `lifetime`, or once `stop` resolves (the connection was
/// told to make way, [`Admitted::evicted`]), the connection closes once the
/// answer in progress is written, or `head_timeout` later if it cannot be
/// (a client that pipelines requests and never reads would otherwise hold
/// its connection for ever). The error hyper ended the connection with, if
/// any: a request head it refused (with a status alone, [`hyper::Error::is_parse`])
/// among them, for the caller to log and count.
pub async fn serve_http1_for<I, S>(
    io: I,
    service: S,
    head_timeout: Duration,
    lifetime: Duration,
    stop: impl Future<Output = ()>,
) -> Option<hyper::Error>
where
    I: AsyncRead + AsyncWrite + Unpin,
    S: hyper::service::HttpService<Incoming, ResBody = Full<Bytes>>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = http1_server(head_timeout).serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        served = tokio::time::timeout(lifetime, conn.as_mut()) => if let Ok(served) = served {
            return served.err();
        },
        () = stop => {}
    }
    conn.as_mut().graceful_shutdown();
    tokio::time::timeout(head_timeout, conn).await.ok()?.err()
}

/// Serves one request on `io` with HTTP/1.1, as the connection's last:
/// its answer says `connection: close`, and the connection closes once it
/// is written, all within `timeout` (as [`serve_http1_for`] gives the
/// answer in progress when it stops). For a connection whose first request
/// had begun to arrive when its port stopped: hyper's own graceful
/// shutdown closes a connection it has not read from yet, though the
/// request is waiting, so it is not asked to. The error hyper ended the
/// connection with, if any, as [`serve_http1_for`]'s.
pub async fn serve_http1_last<I, S>(io: I, service: S, timeout: Duration) -> Option<hyper::Error>
where
    I: AsyncRead + AsyncWrite + Unpin,
    S: hyper::service::HttpService<Incoming, ResBody = Full<Bytes>>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = http1_server(timeout)
        .keep_alive(false)
        .serve_connection(TokioIo::new(io), service);
    tokio::time::timeout(timeout, conn).await.ok()?.err()
}

/// hyper's HTTP/1.1 server as the ports run it: a request's head must
/// arrive within `head_timeout`, timed by tokio.
fn http1_server(head_timeout: Duration) -> hyper::server::conn::http1::Builder {
    let mut server = hyper::server::conn::http1::Builder::new();
    server
        .timer(TokioTimer::new())
        .header_read_timeout(head_timeout);
    server
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http::Response;
    use hyper::service::service_fn;

    use super::*;

    /// Spared, the host's own address holds more than the per-address cap;
    /// the rest of the loopback range and other addresses do not, and
    /// without sparing neither does the host.
    #[test]
    fn the_own_host_is_spared_the_per_address_cap_only_when_asked() {
        let host: IpAddr = "127.0.0.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        let other: IpAddr = "127.0.0.2".parse().unwrap();
        let limits = ConnectionLimits::new(16, 2).sparing_the_own_host();
        let _host: Vec<_> = (0..4).map(|_| limits.admit(host).unwrap()).collect();
        let _mapped: Vec<_> = (0..3).map(|_| limits.admit(mapped).unwrap()).collect();
        let _other: Vec<_> = (0..2).map(|_| limits.admit(other).unwrap()).collect();
        assert_eq!(
            limits.admit(other).err(),
            Some(Refused::FromClient { limit: 2 })
        );

        let strict = ConnectionLimits::new(16, 2);
        let _held: Vec<_> = (0..2).map(|_| strict.admit(host).unwrap()).collect();
        assert_eq!(
            strict.admit(host).err(),
            Some(Refused::FromClient { limit: 2 })
        );
    }

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
            std::future::pending(),
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

    /// With every slot taken, an address holding two fewer than the one
    /// holding the most takes a slot from it, whose oldest connection is
    /// told to close; addresses holding even shares are refused.
    #[tokio::test]
    async fn a_full_port_makes_way_for_an_address_holding_fewer() {
        let limits = ConnectionLimits::new(4, 3);
        let ip = |last: u8| IpAddr::from([10, 0, 0, last]);
        let mut held: Vec<Admitted> = (0..3).map(|_| limits.admit(ip(1)).unwrap()).collect();
        held.push(limits.admit(ip(2)).unwrap());
        let newcomer = limits
            .admit(ip(3))
            .expect("an address holding none is served");
        async fn told(a: &Admitted) -> bool {
            tokio::time::timeout(Duration::from_millis(10), a.evicted())
                .await
                .is_ok()
        }
        assert!(
            told(&held[0]).await,
            "the oldest of the address holding most"
        );
        for (i, other) in held.iter().enumerate().skip(1) {
            assert!(!told(other).await, "{i} was told to close too");
        }
        // (2, 1, 1): a fourth address holding none takes the next.
        let fourth = limits.admit(ip(4)).expect("still two more than none");
        assert!(
            told(&held[1]).await,
            "the next oldest of the address holding most"
        );
        // Shares are even now (1, 1, 1, 1): a fifth address is refused.
        assert_eq!(limits.admit(ip(5)).err(), Some(Refused::Total { limit: 4 }));
        // The connections told to close gave their slots away already.
        held.drain(..2);
        assert_eq!(limits.admit(ip(5)).err(), Some(Refused::Total { limit: 4 }));
        drop(held.pop());
        let fifth = limits.admit(ip(5)).expect("a slot came free");
        drop((held, newcomer, fourth, fifth));
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
