//! Outbound routes reach a remote sidecar over mTLS only when it presents
//! the route's SPIFFE ID; the transparent listener refuses connections that
//! were not redirected to it.

mod common;

use std::sync::Arc;

use common::*;
use tokio::net::TcpStream;
use tokio::sync::watch;
use trellis_core::SpiffeId;
use trellis_proxy::config::Route;
use trellis_proxy::drain;
use trellis_proxy::metrics::Metrics;
use trellis_proxy::outbound::{RouteListener, Shared, Transparent};

fn shared(ca: &Ca, me: &SpiffeId, expected: &[SpiffeId]) -> Arc<Shared> {
    let svid = ca.svid(me);
    let (_tls_tx, tls) = watch::channel(ca.tls_state(&svid, expected));
    let (_snapshot_tx, snapshot) = watch::channel(None);
    Arc::new(Shared {
        tls,
        snapshot,
        metrics: Arc::new(Metrics::new()),
        own_addrs: Vec::new(),
    })
}

/// A running route listener; it stops when the returned `Shutdown` drops.
async fn route(
    shared: Arc<Shared>,
    expected: SpiffeId,
    remote: std::net::SocketAddr,
) -> (std::net::SocketAddr, drain::Shutdown) {
    let (shutdown, drain) = drain::channel();
    let route = Route {
        local: "127.0.0.1:0".parse().unwrap(),
        spiffe_id: expected,
        remote: remote.to_string(),
    };
    let listener = RouteListener::new(route, shared, drain).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(listener.run());
    (addr, shutdown)
}

/// A client sidecar's route to a server sidecar in front of an echo app.
struct Pair {
    client: Arc<Shared>,
    inbound: TestInbound,
    /// The route's local address.
    local: std::net::SocketAddr,
    _app: EchoApp,
    _shutdown: drain::Shutdown,
}

impl Pair {
    async fn start() -> Pair {
        let ca = Ca::new();
        let app = echo_app().await;
        let server = id("/ns/b/sa/server");
        let inbound = inbound(app.addr, ca.tls_state(&ca.svid(&server), &[])).await;
        let client = shared(&ca, &id("/ns/a/sa/client"), std::slice::from_ref(&server));
        let (local, shutdown) = route(client.clone(), server, inbound.addr).await;
        Pair {
            client,
            inbound,
            local,
            _app: app,
            _shutdown: shutdown,
        }
    }
}

#[tokio::test]
async fn a_route_reaches_the_expected_identity() {
    let pair = Pair::start().await;
    let (client, inbound, local) = (&pair.client, &pair.inbound, pair.local);

    let mut tcp = TcpStream::connect(local).await.unwrap();
    assert_eq!(
        round_trip(&mut tcp, b"over mtls").await.unwrap(),
        b"over mtls"
    );
    drop(tcp);
    eventually("both sides count the connection", || {
        client
            .metrics
            .encode()
            .contains("trellis_connections_total{direction=\"outbound\",outcome=\"forwarded\"} 1")
            && inbound.metrics.encode().contains(
                "trellis_connections_total{direction=\"inbound\",outcome=\"forwarded\"} 1",
            )
    })
    .await;
}

#[tokio::test]
async fn a_route_refuses_a_server_presenting_another_identity() {
    let (logs, _guard) = common::sidecar::Logs::capture(false);
    let ca = Ca::new();
    let app = echo_app().await;
    let inbound = inbound(
        app.addr,
        ca.tls_state(&ca.svid(&id("/ns/b/sa/impostor")), &[]),
    )
    .await;
    let expected = id("/ns/b/sa/server");
    let client = shared(&ca, &id("/ns/a/sa/client"), std::slice::from_ref(&expected));
    let (local, _shutdown) = route(client.clone(), expected, inbound.addr).await;

    let mut tcp = TcpStream::connect(local).await.unwrap();
    assert!(
        round_trip(&mut tcp, b"secret").await.is_err(),
        "bytes went to the impostor"
    );
    eventually("the refusal is counted", || {
        let text = client.metrics.encode();
        text.contains(
            "trellis_handshake_failures_total{direction=\"outbound\",reason=\"unexpected_identity\"} 1",
        ) && text.contains("trellis_connections_total{direction=\"outbound\",outcome=\"refused\"} 1")
    })
    .await;
    assert_eq!(*app.accepted.borrow(), 0, "the app was reached");
    // The log says who answered and who was expected, in words.
    logs.wait_for(&[
        "outbound connection refused",
        "reason=unexpected_identity",
        "error=handshake: invalid peer certificate: peer presented \
         spiffe://td.test/ns/b/sa/impostor, expected spiffe://td.test/ns/b/sa/server",
    ])
    .await;
}

#[tokio::test]
async fn transparent_refuses_a_connection_that_was_not_redirected() {
    let ca = Ca::new();
    let client = shared(&ca, &id("/ns/a/sa/client"), &[]);
    let (shutdown, drain) = drain::channel();
    let listener = Transparent::new("127.0.0.1:0".parse().unwrap(), client.clone(), drain)
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(listener.run());

    let mut tcp = TcpStream::connect(addr).await.unwrap();
    assert!(round_trip(&mut tcp, b"hello").await.is_err());
    eventually("the refusal is counted", || {
        client
            .metrics
            .encode()
            .contains("trellis_connections_total{direction=\"outbound\",outcome=\"refused\"} 1")
    })
    .await;
    drop(shutdown);
}

/// A sidecar reconnecting to a peer resumes the session with a ticket
/// from an earlier connection (no certificates signed or verified), also
/// when it opens many connections at once, and both sides count it.
#[tokio::test]
async fn reconnecting_to_a_peer_resumes_the_session_even_many_at_once() {
    let pair = Pair::start().await;
    let (client, inbound, local) = (&pair.client, &pair.inbound, pair.local);
    let counted = |m: &Metrics, direction: &str, kind: &str| {
        let series =
            format!("trellis_tls_handshakes_total{{direction=\"{direction}\",kind=\"{kind}\"}} ");
        m.encode()
            .lines()
            .find_map(|l| l.strip_prefix(series.as_str())?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // Each round trip lets the client read the tickets the server sent.
    async fn connection(local: std::net::SocketAddr) {
        let mut tcp = TcpStream::connect(local).await.unwrap();
        assert_eq!(round_trip(&mut tcp, b"ping").await.unwrap(), b"ping");
    }

    // One after another first: each one uses a ticket and brings back two.
    for _ in 0..10 {
        connection(local).await;
    }
    let full_before = counted(&client.metrics, "outbound", "full");
    for _ in 0..3 {
        let many: Vec<_> = (0..12).map(|_| tokio::spawn(connection(local))).collect();
        for c in many {
            c.await.unwrap();
        }
    }
    eventually("the inbound counts every handshake", || {
        counted(&inbound.metrics, "inbound", "full")
            + counted(&inbound.metrics, "inbound", "resumed")
            == 46
    })
    .await;
    let full = counted(&client.metrics, "outbound", "full");
    let resumed = counted(&client.metrics, "outbound", "resumed");
    assert_eq!(full + resumed, 46);
    assert_eq!(counted(&inbound.metrics, "inbound", "resumed"), resumed);
    // rustls' default store keeps 8 tickets per server: each burst of 12
    // would need at least 4 full handshakes.
    assert!(
        full - full_before <= 2,
        "{} full handshakes in 36 connections opened 12 at a time",
        full - full_before
    );
}
