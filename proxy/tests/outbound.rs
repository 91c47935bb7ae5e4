//! Outbound routes reach a remote sidecar over mTLS only when it presents
//! the route's SPIFFE ID; the transparent listener refuses connections that
//! were not redirected to it.

mod common;

use std::sync::Arc;

use common::*;
use tokio::net::TcpStream;
use tokio::sync::watch;
use trellis_core::SpiffeId;
use trellis_core::logging::throttle::Throttle;
use trellis_proxy::config::Route;
use trellis_proxy::drain;
use trellis_proxy::inbound::REFUSAL_LOG_PAUSE;
use trellis_proxy::metrics::Metrics;
use trellis_proxy::outbound::{RouteListener, Shared, Transparent};
use trellis_proxy::tls::TlsState;

fn shared(ca: &Ca, me: &SpiffeId, expected: &[SpiffeId]) -> Arc<Shared> {
    Arc::new(holding(ca.tls_state(&ca.svid(me), expected)))
}

/// The outbound side of a sidecar holding `tls`, with no snapshot or
/// policies yet.
fn holding(tls: Arc<TlsState>) -> Shared {
    Shared {
        tls: watch::channel(tls).1,
        snapshot: watch::channel(None).1,
        policies: watch::channel(None).1,
        metrics: Arc::new(Metrics::new()),
        own_addrs: Vec::new(),
        plaintext_listeners: Vec::new(),
        user_timeout: Some(trellis_core::tcp::DEFAULT_USER_TIMEOUT),
        peer_refusals: Throttle::new(REFUSAL_LOG_PAUSE),
    }
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
    ca: Ca,
    server: SpiffeId,
    client: Arc<Shared>,
    inbound: TestInbound,
    /// The route's local address.
    local: std::net::SocketAddr,
    app: EchoApp,
    _shutdown: drain::Shutdown,
}

impl Pair {
    async fn start() -> Pair {
        let ca = Ca::new();
        let app = echo_app().await;
        let server = id("/ns/b/sa/server");
        let inbound = inbound_as(&ca, &server, app.addr).await;
        let client = shared(&ca, &id("/ns/a/sa/client"), std::slice::from_ref(&server));
        let (local, shutdown) = route(client.clone(), server.clone(), inbound.addr).await;
        Pair {
            ca,
            server,
            client,
            inbound,
            local,
            app,
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
    let inbound = inbound_as(&ca, &id("/ns/b/sa/impostor"), app.addr).await;
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

/// A server whose certificate chains to the bundle and carries the
/// route's ID but is not shaped as an X.509-SVID leaf is refused: the app
/// calling is told what is wrong in words, counted under its own reason.
#[tokio::test]
async fn a_route_refuses_a_server_whose_certificate_is_not_an_svid_leaf() {
    let ca = Ca::new();
    let app = echo_app().await;
    let server = id("/ns/b/sa/server");
    let key_usage = "an X.509-SVID leaf's keyUsage holds digitalSignature and neither \
                     keyCertSign nor cRLSign";
    let td_id = SpiffeId::parse(&format!("spiffe://{TD}")).unwrap();
    let cases = [
        (
            ca.leaf_shaped(&server, |p| p.key_usages = vec![]),
            server.clone(),
            format!("the certificate has no keyUsage; {key_usage} (svid_key_usage)"),
        ),
        (
            ca.leaf_shaped(&server, |p| {
                p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
            }),
            server.clone(),
            format!(
                "the certificate has a keyUsage without digitalSignature; {key_usage} \
                 (svid_key_usage)"
            ),
        ),
        (
            ca.leaf_shaped(&server, |p| p.is_ca = rcgen::IsCa::NoCa),
            server.clone(),
            "the certificate has no basicConstraints; an X.509-SVID leaf carries \
             basicConstraints with cA false (svid_basic_constraints)"
                .to_owned(),
        ),
        (
            ca.leaf_shaped(&td_id, |_| {}),
            td_id.clone(),
            format!(
                "{td_id} is the trust domain's own ID; an X.509-SVID names a workload, whose \
                 ID has a path (trust_domain_id)"
            ),
        ),
        (
            ca.leaf_shaped(&server, |p| {
                p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            }),
            server.clone(),
            "a CA certificate was presented as the leaf; an X.509-SVID leaf is not a CA \
             (ca_used_as_leaf)"
                .to_owned(),
        ),
        (
            ca.leaf_under_leaf(&server),
            server.clone(),
            "a leaf certificate signed another certificate of the chain; only a CA may \
             (leaf_used_as_ca)"
                .to_owned(),
        ),
    ];
    for ((chain, key), presented, why) in cases {
        // As presented by a sidecar that took the leaf, which its own
        // `Svid::new` refuses.
        let svid = Ca::svid_as_is(&presented, chain, key);
        let inbound = inbound(app.addr, ca.tls_state(&svid, &[])).await;
        let client = shared(
            &ca,
            &id("/ns/a/sa/client"),
            std::slice::from_ref(&presented),
        );
        let (local, _shutdown) = route(client.clone(), presented, inbound.addr).await;
        let answer = http_call(local).await;
        let to = inbound.addr;
        assert!(
            answer.starts_with("HTTP/1.1 502 Bad Gateway\r\n")
                && answer.ends_with(&format!(
                    "\r\n\r\ntrellis: outbound call to {to} refused: dialling {to}: \
                     handshake: invalid peer certificate: {why}\n"
                )),
            "{answer}"
        );
    }
    assert_eq!(*app.accepted.borrow(), 0, "the app was reached");
}

/// The `trellis-proxy-error` of an HTTP/1 answer as it came, if its head
/// has one.
fn proxy_error(answer: &str) -> Option<&str> {
    let (head, _) = answer.split_once("\r\n\r\n")?;
    head.split("\r\n")
        .find_map(|line| line.strip_prefix("trellis-proxy-error: "))
}

/// The value of the field `name` of a text log line.
fn field(line: &str, name: &str) -> Option<String> {
    let prefix = format!("{name}=");
    line.split(' ')
        .find_map(|f| f.strip_prefix(&prefix))
        .map(str::to_owned)
}

/// Sends an HTTP/1 request to `local` and returns what came back.
async fn http_call(local: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = TcpStream::connect(local).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nhost: server\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tcp.read_to_end(&mut answer).await;
    String::from_utf8(answer).unwrap()
}

/// An HTTP/1 app whose call on a route is refused, by the peer's identity
/// or by the route's host name standing for the sidecar itself, is told
/// why rather than left with a closed connection.
#[tokio::test]
async fn an_http1_call_on_a_refused_route_is_answered_with_why() {
    let ca = Ca::new();
    let app = echo_app().await;
    let inbound = inbound_as(&ca, &id("/ns/b/sa/impostor"), app.addr).await;
    let expected = id("/ns/b/sa/server");
    let client = shared(&ca, &id("/ns/a/sa/client"), std::slice::from_ref(&expected));
    let (local, _shutdown) = route(client, expected.clone(), inbound.addr).await;
    let answer = http_call(local).await;
    assert!(
        answer.starts_with("HTTP/1.1 502 Bad Gateway\r\n"),
        "{answer}"
    );
    let to = inbound.addr;
    assert!(
        answer.ends_with(&format!(
            "\r\n\r\ntrellis: outbound call to {to} refused: dialling {to}: handshake: \
             invalid peer certificate: peer presented spiffe://td.test/ns/b/sa/impostor, \
             expected spiffe://td.test/ns/b/sa/server (unexpected_identity)\n"
        )),
        "{answer}"
    );
    assert_eq!(proxy_error(&answer), Some("handshake_failed"), "{answer}");
    assert_eq!(*app.accepted.borrow(), 0, "the app was reached");

    // `app.addr` stands for a plaintext listener of this sidecar.
    let svid = ca.svid(&id("/ns/a/sa/client"));
    let looping = Arc::new(Shared {
        plaintext_listeners: vec![app.addr],
        user_timeout: None,
        ..holding(ca.tls_state(&svid, std::slice::from_ref(&expected)))
    });
    let (_shutdown, drain) = drain::channel();
    let remote = format!("localhost:{}", app.addr.port());
    let route = Route {
        local: "127.0.0.1:0".parse().unwrap(),
        spiffe_id: expected,
        remote: remote.clone(),
    };
    let listener = RouteListener::new(route, looping, drain).await.unwrap();
    let local = listener.local_addr().unwrap();
    tokio::spawn(listener.run());
    let answer = http_call(local).await;
    assert!(
        answer.starts_with("HTTP/1.1 502 Bad Gateway\r\n"),
        "{answer}"
    );
    assert!(
        answer.ends_with(&format!(
            "trellis: outbound call to {remote} refused: it resolves to {}, this sidecar \
             (loop)\n",
            app.addr
        )),
        "{answer}"
    );
    assert_eq!(proxy_error(&answer), Some("loop"), "{answer}");
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
    // An app that does not speak HTTP, waiting for an answer, has no
    // answer to be told why in: it is reset, not ended as if its server
    // had closed in order.
    assert_eq!(
        end_after_sending(addr, b"\x01\x02 opaque\n").await,
        End::Reset(Vec::new())
    );
    drop(shutdown);
}

/// `trellis_tls_handshakes_total` of `direction` and `kind`, of the key
/// exchange `group` or (`None`) of every group.
fn handshakes(m: &Metrics, direction: &str, kind: &str, group: Option<&str>) -> u64 {
    let prefix =
        format!("trellis_tls_handshakes_total{{direction=\"{direction}\",kind=\"{kind}\",group=\"");
    m.encode()
        .lines()
        .filter_map(|l| {
            let (g, value) = l.strip_prefix(prefix.as_str())?.split_once("\"} ")?;
            group
                .is_none_or(|want| want == g)
                .then(|| value.parse::<u64>().ok())?
        })
        .sum()
}

/// Failed handshakes in `direction`, by reason.
fn failures(m: &Metrics, direction: &str) -> Vec<(String, u64)> {
    let prefix = format!("trellis_handshake_failures_total{{direction=\"{direction}\",reason=\"");
    m.encode()
        .lines()
        .filter_map(|l| {
            let (reason, value) = l.strip_prefix(prefix.as_str())?.split_once("\"} ")?;
            Some((reason.to_owned(), value.parse().ok()?))
        })
        // The listed reasons are exported at 0 from the start.
        .filter(|(_, count)| *count > 0)
        .collect()
}

/// Attempts to resume that the peer refused, redialled with the hybrid:
/// abandoned resumptions, not handshake failures.
fn not_resumed(m: &Metrics) -> u64 {
    let series = "trellis_tls_resumptions_abandoned_total{reason=\"not_resumed\"} ";
    m.encode()
        .lines()
        .find_map(|l| l.strip_prefix(series)?.parse().ok())
        .unwrap_or(0)
}

/// What [`connection`] sends: a line no HTTP request starts with, so
/// both sidecars take it for opaque TCP at once.
const PING: &[u8] = b"ping\n";

/// A connection through the route; the round trip lets the client read
/// the tickets the server sent with its answer.
async fn connection(local: std::net::SocketAddr) {
    let mut tcp = TcpStream::connect(local).await.unwrap();
    assert_eq!(round_trip(&mut tcp, PING).await.unwrap(), PING);
}

/// A sidecar reconnecting to a peer resumes the session with a ticket
/// from an earlier connection (no certificates signed or verified), also
/// when it opens many connections at once, and both sides count it. Full
/// handshakes settle the hybrid X25519MLKEM768 key exchange, resumed ones
/// X25519 alone.
#[tokio::test]
async fn reconnecting_to_a_peer_resumes_the_session_even_many_at_once() {
    let pair = Pair::start().await;
    let (client, inbound, local) = (&pair.client, &pair.inbound, pair.local);
    let counted = |m: &Metrics, direction: &str, kind: &str| handshakes(m, direction, kind, None);

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
    // A dial resumes only with a ticket no other dial under way counts on.
    assert_eq!(
        not_resumed(&client.metrics),
        0,
        "no attempt to resume failed"
    );
    for (m, direction) in [(&client.metrics, "outbound"), (&inbound.metrics, "inbound")] {
        assert_eq!(
            handshakes(m, direction, "full", Some("X25519MLKEM768")),
            counted(m, direction, "full"),
            "every {direction} full handshake is hybrid"
        );
        assert_eq!(
            handshakes(m, direction, "resumed", Some("X25519")),
            counted(m, direction, "resumed"),
            "every {direction} resumption settles X25519"
        );
    }
}

/// An app that reads whatever it is sent and never answers, as a server
/// holding a long poll open does.
async fn silent_app() -> std::net::SocketAddr {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while tcp.read(&mut buf).await.is_ok_and(|n| n > 0) {}
            });
        }
    });
    addr
}

/// A caller whose first connection to a peer waits on an answer that is
/// long in coming (a long poll) still gets session tickets from it: the
/// server holds its tickets for its first answer, but lets them go on
/// their own once the caller has been quiet a few milliseconds, so a
/// later connection to the peer resumes while the first still waits.
/// (Held until the answer, every connection here would begin its session
/// with a full handshake, since none is ever answered.)
#[tokio::test]
async fn a_long_poll_brings_back_tickets_before_its_answer() {
    use tokio::io::AsyncWriteExt;
    let ca = Ca::new();
    let app = silent_app().await;
    let server = id("/ns/b/sa/server");
    let inbound = inbound_as(&ca, &server, app).await;
    let client = shared(&ca, &id("/ns/a/sa/client"), std::slice::from_ref(&server));
    let (local, _shutdown) = route(client.clone(), server.clone(), inbound.addr).await;

    let mut polls = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while handshakes(&client.metrics, "outbound", "resumed", None) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no connection resumed: {} full handshakes",
            handshakes(&client.metrics, "outbound", "full", None)
        );
        let mut poll = TcpStream::connect(local).await.unwrap();
        poll.write_all(PING).await.unwrap();
        polls.push(poll);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Replicas of one workload share its identity, and each seals its
/// tickets with a key of its own: a ticket from one replica would not
/// resume a session with another. Calls that go to two replicas in turn
/// each resume with a ticket of the replica they reach.
#[tokio::test]
async fn tickets_of_one_replica_are_not_offered_to_another() {
    let ca = Ca::new();
    let echo = echo_app().await;
    let server = id("/ns/b/sa/server");
    let one = inbound_as(&ca, &server, echo.addr).await;
    let two = inbound_as(&ca, &server, echo.addr).await;
    let client = shared(&ca, &id("/ns/a/sa/client"), std::slice::from_ref(&server));
    let (to_one, _one) = route(client.clone(), server.clone(), one.addr).await;
    let (to_two, _two) = route(client.clone(), server.clone(), two.addr).await;

    // One full handshake with each brings back its tickets.
    connection(to_one).await;
    connection(to_two).await;
    for _ in 0..10 {
        connection(to_one).await;
        connection(to_two).await;
    }
    assert_eq!(
        not_resumed(&client.metrics),
        0,
        "a ticket went to the wrong replica"
    );
    assert_eq!(handshakes(&client.metrics, "outbound", "full", None), 2);
    assert_eq!(handshakes(&client.metrics, "outbound", "resumed", None), 20);
}

/// A relay between the two sidecars that holds every connection it
/// accepts, once its first bytes (the ClientHello) have arrived, until
/// `open` says true; it reports each arrival on `hellos`.
async fn held_relay(
    to: std::net::SocketAddr,
    open: watch::Receiver<bool>,
) -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<()>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (hellos_tx, hellos) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let (mut open, hellos_tx) = (open.clone(), hellos_tx.clone());
            tokio::spawn(async move {
                let mut hello = vec![0u8; 4096];
                let n = tcp.read(&mut hello).await.unwrap();
                hellos_tx.send(()).unwrap();
                open.wait_for(|open| *open).await.unwrap();
                let mut peer = TcpStream::connect(to).await.unwrap();
                peer.write_all(&hello[..n]).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut tcp, &mut peer).await;
            });
        }
    });
    (addr, hellos)
}

/// Dials to one peer whose handshakes overlap each resume while the
/// sidecar holds a ticket for each: a ticket a dial has taken is no
/// longer counted as reserved by it, so it leaves no other dial without
/// one. A relay holds the handshakes until every dial has sent its
/// ClientHello (and so taken its ticket), the overlap a loaded machine
/// brings about by chance.
#[tokio::test]
async fn dials_whose_handshakes_overlap_each_resume_while_tickets_last() {
    let ca = Ca::new();
    let app = echo_app().await;
    let server = id("/ns/b/sa/server");
    let inbound = inbound_as(&ca, &server, app.addr).await;
    let (open_tx, open) = watch::channel(true);
    let (relay, mut hellos) = held_relay(inbound.addr, open).await;
    let client = shared(&ca, &id("/ns/a/sa/client"), std::slice::from_ref(&server));
    let (local, _shutdown) = route(client.clone(), server, relay).await;

    // One full handshake and four resumed, each bringing back two
    // tickets: six held.
    for _ in 0..5 {
        connection(local).await;
        hellos.recv().await.unwrap();
    }
    assert_eq!(handshakes(&client.metrics, "outbound", "full", None), 1);

    // Six dials, each begun once the one before has sent its ClientHello.
    open_tx.send_replace(false);
    let mut held = Vec::new();
    for _ in 0..6 {
        let mut tcp = TcpStream::connect(local).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut tcp, PING)
            .await
            .unwrap();
        hellos.recv().await.unwrap();
        held.push(tcp);
    }
    open_tx.send_replace(true);
    for mut tcp in held {
        let mut echo = [0u8; PING.len()];
        tokio::io::AsyncReadExt::read_exact(&mut tcp, &mut echo)
            .await
            .unwrap();
        assert_eq!(echo, PING);
    }
    assert_eq!(
        handshakes(&client.metrics, "outbound", "full", None),
        1,
        "a dial began a full handshake while a ticket was held for it"
    );
    assert_eq!(handshakes(&client.metrics, "outbound", "resumed", None), 10);
    assert_eq!(
        not_resumed(&client.metrics),
        0,
        "no attempt to resume failed"
    );
}

/// When the peer no longer accepts the tickets held for it (it restarted,
/// or took a new trust bundle, and has a new ticket key), the attempt to
/// resume ends before a session begins: no full handshake ever settles
/// X25519 alone, nothing reaches the app twice, the tickets of the old
/// key are dropped at once, and the connection goes through with a hybrid
/// full handshake. The peer counts the connection it saw end as a
/// `not_resumed` handshake failure; the caller counts an abandoned
/// resumption and no handshake failure, since its dial went through. The
/// next one resumes again.
#[tokio::test]
async fn a_peer_that_refuses_its_old_tickets_gets_a_hybrid_handshake_once() {
    let pair = Pair::start().await;
    let (client, inbound, local) = (&pair.client, &pair.inbound, pair.local);
    for _ in 0..3 {
        connection(local).await;
    }
    assert_eq!(handshakes(&client.metrics, "outbound", "full", None), 1);
    assert_eq!(handshakes(&client.metrics, "outbound", "resumed", None), 2);

    // The peer restarts: new configs, a new ticket key.
    let rotated = pair.ca.svid(&pair.server);
    inbound.tls.send_replace(pair.ca.tls_state(&rotated, &[]));
    let accepted_before = *pair.app.accepted.borrow();
    connection(local).await;
    assert_eq!(not_resumed(&client.metrics), 1, "one refused attempt");
    assert_eq!(
        failures(&client.metrics, "outbound"),
        Vec::<(String, u64)>::new(),
        "a dial that went through counts no handshake failure"
    );
    assert_eq!(
        failures(&inbound.metrics, "inbound"),
        [("not_resumed".to_owned(), 1)],
        "the peer counts the refused attempt as what it is, and nothing else"
    );
    assert_eq!(handshakes(&client.metrics, "outbound", "full", None), 2);
    assert_eq!(
        *pair.app.accepted.borrow(),
        accepted_before + 1,
        "the refused attempt never reached the app"
    );
    // Its tickets came from the new key: the next connections resume.
    for _ in 0..3 {
        connection(local).await;
    }
    assert_eq!(
        not_resumed(&client.metrics),
        1,
        "the old tickets were dropped"
    );
    assert_eq!(handshakes(&client.metrics, "outbound", "full", None), 2);
    assert_eq!(handshakes(&client.metrics, "outbound", "resumed", None), 5);
    for (m, direction) in [(&client.metrics, "outbound"), (&inbound.metrics, "inbound")] {
        assert_eq!(
            handshakes(m, direction, "full", Some("X25519")),
            0,
            "no {direction} full handshake without the hybrid"
        );
    }
}

/// An app that keeps every byte it is sent, on every connection, and
/// echoes them if `echo` (else it never answers); its address and what it
/// has received.
async fn keeping_app(echo: bool) -> (std::net::SocketAddr, watch::Receiver<Vec<u8>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = listener.local_addr().unwrap();
    let (received_tx, received) = watch::channel(Vec::<u8>::new());
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let received_tx = received_tx.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n @ 1..) = tcp.read(&mut buf).await {
                    received_tx.send_modify(|r| r.extend_from_slice(&buf[..n]));
                    if echo && tcp.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (app, received)
}

/// A resumed session brings back the peer's certificate as it was when the
/// session began, and no verifier looks at it again. A peer whose SVID has
/// expired since (one the control plane stopped renewing) is not trusted
/// on the strength of an old ticket: the sidecar checks the resumed
/// certificate before its Finished and the app's first bytes leave, drops
/// the peer's tickets and dials it again with a full handshake, which the
/// expired certificate fails. The peer never finishes that resumed
/// session, and nothing the app sent reaches it.
#[tokio::test]
async fn a_peer_whose_certificate_expired_is_not_trusted_on_an_old_ticket() {
    let ca = Ca::new();
    let server = id("/ns/b/sa/server");
    let (app, received) = keeping_app(true).await;
    let (chain, key) = ca.leaf_valid_for(&server, time::Duration::seconds(4));
    let expires = trellis_core::tls::validity_of(&chain[0]).unwrap().1;
    let short_lived = trellis_proxy::identity::Svid::new(&server, chain, key).unwrap();
    let inbound = inbound(app, ca.tls_state(&short_lived, &[])).await;
    let client = shared(&ca, &id("/ns/a/sa/client"), std::slice::from_ref(&server));
    let (local, _shutdown) = route(client.clone(), server.clone(), inbound.addr).await;

    connection(local).await;
    connection(local).await;
    assert_eq!(handshakes(&client.metrics, "outbound", "resumed", None), 1);
    assert_eq!(received.borrow().as_slice(), b"ping\nping\n");

    past(expires).await;

    let mut tcp = TcpStream::connect(local).await.unwrap();
    assert!(
        round_trip(&mut tcp, b"late").await.is_err(),
        "a peer with an expired certificate was reached"
    );
    assert_eq!(
        failures(&client.metrics, "outbound"),
        [("expired_certificate".to_owned(), 1)],
        "one refused dial, one failure: the full handshake's"
    );
    assert!(
        client
            .metrics
            .encode()
            .lines()
            .any(|l| l
                == "trellis_tls_resumptions_abandoned_total{reason=\"expired_certificate\"} 1"),
        "the resumed session was abandoned, counted apart:\n{}",
        client.metrics.encode()
    );
    assert_eq!(
        handshakes(&client.metrics, "outbound", "resumed", None),
        1,
        "no new session was resumed"
    );
    assert_eq!(
        handshakes(&inbound.metrics, "inbound", "resumed", None),
        1,
        "the client's Finished reached the peer with an expired certificate"
    );
    assert_eq!(
        received.borrow().as_slice(),
        b"ping\nping\n",
        "the app's bytes reached a peer whose certificate had expired"
    );
}

/// The peer's socket holds the session tickets for its first answer. A
/// caller that only sends, to an app that never answers (a log shipper),
/// still gets them: the peer sends them once it reads more from the
/// caller, so the caller's next connection resumes while the first is
/// still open. Held until an answer or a close instead, no connection
/// here would ever resume.
#[tokio::test]
async fn a_caller_that_only_sends_still_gets_tickets() {
    use tokio::io::AsyncWriteExt;
    let (app, received) = keeping_app(false).await;
    let ca = Ca::new();
    let server = id("/ns/b/sa/server");
    let inbound = inbound_as(&ca, &server, app).await;
    let client = shared(&ca, &id("/ns/a/sa/client"), std::slice::from_ref(&server));
    let (local, _shutdown) = route(client.clone(), server.clone(), inbound.addr).await;

    // Each connection sends two lines, the second once the app has the
    // first, and stays open; the client may read the tickets a moment
    // after the peer sends them, so a few connections may begin sessions.
    let mut open = Vec::new();
    let mut sent = 0;
    while handshakes(&client.metrics, "outbound", "resumed", None) == 0 && open.len() < 50 {
        let mut tcp = TcpStream::connect(local).await.unwrap();
        for line in [&b"log line one\n"[..], b"log line two\n"] {
            tcp.write_all(line).await.unwrap();
            sent += line.len();
            received
                .clone()
                .wait_for(|r| r.len() == sent)
                .await
                .unwrap();
        }
        open.push(tcp);
    }
    assert_eq!(
        handshakes(&client.metrics, "outbound", "resumed", None),
        1,
        "no connection of {} open ones resumed: the tickets never left the peer",
        open.len()
    );
    assert!(open.len() < 50);
}

/// The server's sidecar verifies a caller's certificate once the caller's
/// own handshake is over (TLS 1.3), so a caller it does not trust learns
/// it only from the alert it then reads: its app is answered with why,
/// the caller's log names the peer and the alert, and
/// the refusal is counted, instead of an empty reply and a line that
/// reads as success.
#[tokio::test]
async fn a_call_the_server_s_sidecar_refuses_after_the_handshake_is_answered_with_why() {
    let (logs, _guard) = common::sidecar::Logs::capture(false);
    let ca = Ca::new();
    let app = echo_app().await;
    let server = id("/ns/b/sa/server");
    let inbound = inbound_as(&ca, &server, app.addr).await;
    let client = Arc::new(Shared {
        user_timeout: None,
        ..untrusted_caller(&ca, &server)
    });
    let (local, _shutdown) = route(client.clone(), server, inbound.addr).await;

    let to = inbound.addr;
    let words = format!(
        "trellis: outbound call to {to} refused by its sidecar: this sidecar's certificate is \
         not signed by a root it trusts (another trust domain, or a root it no longer or not \
         yet holds) (alert_unknown_ca)\n"
    );
    let answer = http_call(local).await;
    assert!(
        answer.starts_with("HTTP/1.1 502 Bad Gateway\r\n") && answer.ends_with(&words),
        "{answer}"
    );
    assert_eq!(proxy_error(&answer), Some("peer_refused"), "{answer}");
    assert_refused_by_peer(&logs, &client, to, "UnknownCA", "alert_unknown_ca").await;
    assert_eq!(*app.accepted.borrow(), 0, "the app was reached");
}

/// The outbound side of the sidecar `spiffe://td.test/ns/a/sa/client`
/// calling `server`, whose sidecar trusts only `ca`: its certificate is
/// signed by a root the server does not trust (another trust domain's, one
/// it no longer holds), while it trusts `ca`'s root to verify the server.
fn untrusted_caller(ca: &Ca, server: &SpiffeId) -> Shared {
    let other = Ca::new();
    let state = TlsState::build(
        Some(&other.svid(&id("/ns/a/sa/client"))),
        &[ca.root()],
        &td(),
        std::slice::from_ref(server),
    )
    .unwrap();
    holding(Arc::new(state))
}

/// Asserts that `client` logged the refusal of its call to `to` by the
/// sidecar `spiffe://td.test/ns/b/sa/server` with the TLS alert `alert`
/// (as rustls names it), and counted it as the handshake failure `reason`
/// and the connection outcome `refused_by_peer`, once each.
async fn assert_refused_by_peer(
    logs: &common::sidecar::Logs,
    client: &Shared,
    to: std::net::SocketAddr,
    alert: &str,
    reason: &str,
) {
    logs.wait_for(&[
        "WARN",
        "outbound connection refused by the server's sidecar",
        "peer=spiffe://td.test/ns/b/sa/server",
        &format!("remote={to}"),
        &format!("alert={alert}"),
        &format!("reason={reason}"),
    ])
    .await;
    let text = client.metrics.encode();
    for counted in [
        format!("trellis_handshake_failures_total{{direction=\"outbound\",reason=\"{reason}\"}} 1"),
        "trellis_connections_total{direction=\"outbound\",outcome=\"refused_by_peer\"} 1"
            .to_string(),
    ] {
        assert!(text.contains(&counted), "{counted} in {text}");
    }
}

/// The policies of the sidecar `server` allowing the mesh, with `revoked`
/// revoked an hour from now: a certificate issued before is covered.
fn policies_revoking(
    server: &SpiffeId,
    revoked: &SpiffeId,
    metrics: &Metrics,
) -> trellis_proxy::policy::Policies {
    let mut policies = trellis_proxy::policy::Policies::compile(
        1,
        server,
        "allow-mesh".into(),
        Vec::new(),
        metrics,
    )
    .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let later = i64::try_from(now).unwrap() + 3600;
    policies.revocations = Arc::new(trellis_core::revocation::Revocations::new([(
        revoked.clone(),
        later,
    )]));
    policies
}

/// A revoked caller's full handshake is refused by the server's sidecar
/// with the alert `certificate_revoked`, its TLS configs holding the
/// revocations of the policies in force: the caller's app is answered
/// that it is revoked, the caller's log and metrics say the peer refused
/// it, and the server's log names the caller.
#[tokio::test]
async fn a_revoked_caller_s_call_is_answered_with_the_revocation_alert() {
    let (logs, _guard) = common::sidecar::Logs::capture(false);
    let ca = Ca::new();
    let app = echo_app().await;
    let server = id("/ns/b/sa/server");
    let me = id("/ns/a/sa/client");
    let metrics = Arc::new(Metrics::new());
    let policies = policies_revoking(&server, &me, &metrics);
    let state = trellis_proxy::tls::TlsState::build(
        Some(&ca.svid(&server)),
        &[ca.root()],
        &td(),
        std::iter::empty(),
    )
    .unwrap()
    .with_revocations(policies.revocations.clone())
    .unwrap();
    let inbound = inbound_with(app.addr, Arc::new(state), Some(Arc::new(policies)), metrics).await;
    let client = shared(&ca, &me, std::slice::from_ref(&server));
    let (local, _shutdown) = route(client.clone(), server, inbound.addr).await;

    let to = inbound.addr;
    let answer = http_call(local).await;
    assert!(
        answer.starts_with("HTTP/1.1 502 Bad Gateway\r\n")
            && answer.ends_with(&format!(
                "trellis: outbound call to {to} refused by its sidecar: it holds this sidecar's \
                 certificate as revoked (alert_certificate_revoked)\n"
            )),
        "{answer}"
    );
    assert_refused_by_peer(
        &logs,
        &client,
        to,
        "CertificateRevoked",
        "alert_certificate_revoked",
    )
    .await;
    logs.wait_for(&[
        "WARN",
        "inbound connection refused: the caller's identity is revoked",
        &format!("peer={me} "),
        "reason=revoked",
        &format!("peer {me} is revoked"),
    ])
    .await;
    let counted = "trellis_handshake_failures_total{direction=\"inbound\",reason=\"revoked\"} 1";
    let text = inbound.metrics.encode();
    assert!(text.contains(counted), "{counted} in {text}");
    assert_eq!(*app.accepted.borrow(), 0, "the app was reached");
}

/// A route from a caller to a server's sidecar that refuses it only once
/// the handshake is over (its TLS configs do not hold the caller's
/// revocation, its policies do), so that it closes without a TLS alert:
/// the server's app, the caller's sidecar state, the server's sidecar,
/// the route's local address and its shutdown.
async fn revoked_after_the_handshake() -> (
    EchoApp,
    Arc<Shared>,
    TestInbound,
    std::net::SocketAddr,
    drain::Shutdown,
) {
    let ca = Ca::new();
    let app = echo_app().await;
    let server = id("/ns/b/sa/server");
    let me = id("/ns/a/sa/client");
    let metrics = Arc::new(Metrics::new());
    let policies = policies_revoking(&server, &me, &metrics);
    let state = ca.tls_state(&ca.svid(&server), &[]);
    let inbound = inbound_with(app.addr, state, Some(Arc::new(policies)), metrics).await;
    let client = shared(&ca, &me, std::slice::from_ref(&server));
    let (local, shutdown) = route(client.clone(), server, inbound.addr).await;
    (app, client, inbound, local, shutdown)
}

/// A revoked caller the server's sidecar refuses only once the handshake
/// is over (its TLS configs did not hold the revocation yet, or the
/// caller resumed a session with configs taken before they did, which no
/// verifier sees) is closed without a
/// TLS alert: its app is told the call ended there before any answer,
/// and the caller's log and metrics say so.
#[tokio::test]
async fn a_revoked_caller_s_call_is_answered_that_the_server_s_sidecar_ended_it() {
    let (logs, _guard) = common::sidecar::Logs::capture(false);
    let (app, client, inbound, local, _shutdown) = revoked_after_the_handshake().await;
    let to = inbound.addr;

    let answer = http_call(local).await;
    assert!(
        answer.starts_with("HTTP/1.1 502 Bad Gateway\r\n")
            && answer.ends_with(&format!(
                "trellis: outbound call to {to} ended by its sidecar before any answer: it \
                 closed the connection after the handshake without a TLS alert (a refusal its \
                 log names, such as a denial by policy, whose answer only a connection settled \
                 as HTTP gets, a revoked caller's resumed session, or a failure) (closed)\n"
            )),
        "{answer}"
    );
    assert_eq!(proxy_error(&answer), Some("peer_refused"), "{answer}");
    logs.wait_for(&[
        "WARN",
        "outbound connection closed by the server's sidecar before any answer",
        "peer=spiffe://td.test/ns/b/sa/server",
        &format!("remote={to}"),
        "reason=closed",
    ])
    .await;
    let text = client.metrics.encode();
    let counted = "trellis_connections_total{direction=\"outbound\",outcome=\"closed_by_peer\"} 1";
    assert!(text.contains(counted), "{counted} in {text}");
    assert_eq!(*app.accepted.borrow(), 0, "the app was reached");
}

/// A server's sidecar with no certificate yet answers a caller's handshake
/// with an alert rather than a reset: the caller's app is told the peer is
/// not ready, with `503`, where it was told of a reset, as from a crash.
#[tokio::test]
async fn a_call_to_a_sidecar_without_a_certificate_yet_is_answered_that_it_is_not_ready() {
    let ca = Ca::new();
    let app = echo_app().await;
    let server = id("/ns/b/sa/server");
    let not_ready = Arc::new(trellis_proxy::tls::TlsState::default());
    let inbound = inbound(app.addr, not_ready).await;
    let client = shared(&ca, &id("/ns/a/sa/client"), std::slice::from_ref(&server));
    let (local, _shutdown) = route(client.clone(), server, inbound.addr).await;

    let to = inbound.addr;
    let answer = http_call(local).await;
    assert!(
        answer.starts_with("HTTP/1.1 503 Service Unavailable\r\n")
            && answer.ends_with(&format!(
                "\r\n\r\ntrellis: outbound call to {to} refused: dialling {to}: its sidecar has \
                 no certificate yet (not ready) (peer_not_ready)\n"
            )),
        "{answer}"
    );
    assert_eq!(proxy_error(&answer), Some("peer_not_ready"), "{answer}");
    let text = client.metrics.encode();
    let counted =
        "trellis_handshake_failures_total{direction=\"outbound\",reason=\"peer_not_ready\"} 1";
    assert!(text.contains(counted), "{counted} in {text}");
    assert_eq!(*app.accepted.borrow(), 0, "the app was reached");
}

/// A call whose remote cannot be connected to is answered by the sidecar,
/// not by an app: HTTP/1.1 and HTTP/2 clients alike read
/// `trellis-proxy-error` naming why beside the `502`.
#[tokio::test]
async fn a_call_to_an_unreachable_remote_is_marked_as_the_sidecar_s_answer() {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let ca = Ca::new();
    let server = id("/ns/b/sa/server");
    let client = shared(&ca, &id("/ns/a/sa/client"), std::slice::from_ref(&server));
    let closed = common::ports::free_addr();
    let (local, _shutdown) = route(client, server, closed).await;
    let request = || {
        ::http::Request::get(format!("http://{local}/"))
            .body(Empty::<bytes::Bytes>::new())
            .unwrap()
    };
    let says = format!("trellis: outbound call to {closed} refused: dialling {closed}: connect:");

    let tcp = TokioIo::new(TcpStream::connect(local).await.unwrap());
    let (mut h1, conn) = hyper::client::conn::http1::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let tcp = TokioIo::new(TcpStream::connect(local).await.unwrap());
    let (mut h2, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), tcp)
        .await
        .unwrap();
    tokio::spawn(conn);
    for response in [
        h1.send_request(request()).await.unwrap(),
        h2.send_request(request()).await.unwrap(),
    ] {
        let (head, body) = response.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        let body = String::from_utf8_lossy(&body);
        assert_eq!(head.status, 502, "{head:?} {body}");
        assert!(body.starts_with(&says), "{body}");
        assert_eq!(
            head.headers
                .get("trellis-proxy-error")
                .map(|v| v.as_bytes()),
            Some(&b"connect_failed"[..]),
            "{head:?}"
        );
    }
}

/// The HTTP/2 frames in `got`, each its type and payload; fails on bytes
/// that are not whole frames.
fn h2_frames(got: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut frames = Vec::new();
    let mut rest = got;
    while let [a, b, c, kind, _, _, _, _, _, after @ ..] = rest {
        let length = u32::from_be_bytes([0, *a, *b, *c]) as usize;
        assert!(after.len() >= length, "a frame cut short: {got:?}");
        frames.push((*kind, after[..length].to_vec()));
        rest = &after[length..];
    }
    assert!(rest.is_empty(), "not frames: {got:?}");
    frames
}

/// An HTTP/2 app whose call is refused (its remote cannot be reached) and
/// that sends its preface and no request within the sidecar's patience
/// is closed as an HTTP/2 server closes a connection it will not serve:
/// after the server preface, GOAWAY processing no stream, with
/// `REFUSED_STREAM` and the refusal's words, then a FIN; not a bare FIN
/// after the SETTINGS, which said nothing of why, nor a reset.
#[tokio::test]
async fn an_http2_app_that_sends_no_request_to_a_refused_call_gets_a_goaway() {
    use tokio::io::AsyncWriteExt;
    let ca = Ca::new();
    let server = id("/ns/b/sa/server");
    let client = shared(&ca, &id("/ns/a/sa/client"), std::slice::from_ref(&server));
    let closed = common::ports::free_addr();
    let (local, _shutdown) = route(client, server, closed).await;

    let mut app = TcpStream::connect(local).await.unwrap();
    app.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    app.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    let got = match read_end(&mut app).await {
        End::Fin(got) => got,
        End::Reset(got) => panic!("reset after {got:?}"),
    };
    let frames = h2_frames(&got);
    const SETTINGS: u8 = 0x4;
    const GOAWAY: u8 = 0x7;
    assert_eq!(frames.first().map(|f| f.0), Some(SETTINGS), "{frames:?}");
    let (kind, goaway) = frames.last().unwrap();
    assert_eq!(*kind, GOAWAY, "{frames:?}");
    // Last stream 0, REFUSED_STREAM, then why.
    assert_eq!(goaway[..8], [0, 0, 0, 0, 0, 0, 0, 7], "{frames:?}");
    let says = String::from_utf8_lossy(&goaway[8..]);
    let refused =
        format!("trellis: outbound call to {closed} refused: dialling {closed}: connect:");
    assert!(says.starts_with(&refused), "{says}");
}

/// An HTTP/2 app whose call a peer's sidecar ended without a word (no TLS
/// alert, no answer: a denial, a revoked caller's session, or a sidecar
/// killed after passing the request on, which the caller cannot tell
/// apart) is not told that no stream was processed: its GOAWAY names every
/// stream as possibly processed, with `INTERNAL_ERROR`, so that a client
/// that retries refused streams on its own (gRPC's transparent retry) does
/// not send a request that is not idempotent twice.
#[tokio::test]
async fn an_http2_app_whose_peer_ended_without_a_word_is_not_told_nothing_was_processed() {
    use tokio::io::AsyncWriteExt;
    let (app, _client, _inbound, local, _shutdown) = revoked_after_the_handshake().await;

    let mut app_side = TcpStream::connect(local).await.unwrap();
    app_side
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    app_side
        .write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0])
        .await
        .unwrap();
    let got = match read_end(&mut app_side).await {
        End::Fin(got) => got,
        End::Reset(got) => panic!("reset after {got:?}"),
    };
    let frames = h2_frames(&got);
    let (kind, goaway) = frames.last().unwrap();
    assert_eq!(*kind, 0x7, "the last frame is no GOAWAY: {frames:?}");
    // Last stream 2^31-1, INTERNAL_ERROR, then why.
    assert_eq!(
        goaway[..8],
        [0x7f, 0xff, 0xff, 0xff, 0, 0, 0, 2],
        "{:?}",
        String::from_utf8_lossy(goaway)
    );
    let says = String::from_utf8_lossy(&goaway[8..]);
    assert!(
        says.contains("ended by its sidecar before any answer"),
        "{says}"
    );
    assert_eq!(*app.accepted.borrow(), 0, "the app was reached");
}

/// A server certificate this sidecar refuses is logged with what it
/// claims, read unverified and never trusted: the SPIFFE ID it names
/// (`claimed_peer`), and what it was refused for: the notAfter of an
/// expired one, in RFC 3339, the name of an issuer no root of the bundle
/// leads to.
#[tokio::test]
async fn a_refused_server_certificate_is_logged_with_what_it_claims() {
    let (logs, _guard) = common::sidecar::Logs::capture(false);
    let ca = Ca::new();
    let app = echo_app().await;
    let expected = id("/ns/b/sa/server");
    let client = shared(&ca, &id("/ns/a/sa/client"), std::slice::from_ref(&expected));
    // The line of the refused dial to `remote`, for `reason`.
    let refused = async |remote: std::net::SocketAddr, reason: &str| {
        let (local, _shutdown) = route(client.clone(), expected.clone(), remote).await;
        let answer = http_call(local).await;
        assert!(answer.starts_with("HTTP/1.1 502 "), "{answer}");
        let remote = format!("remote={remote} ");
        let reason = format!("reason={reason} ");
        logs.wait_for(&["outbound connection refused", &remote, &reason])
            .await
    };

    let impostor = id("/ns/b/sa/impostor");
    let server = inbound_as(&ca, &impostor, app.addr).await;
    let line = refused(server.addr, "unexpected_identity").await;
    let claimed = Some(impostor.to_string());
    assert_eq!(field(&line, "claimed_peer"), claimed, "{line}");
    assert_eq!(field(&line, "not_after"), None, "{line}");
    assert_eq!(field(&line, "issuer"), None, "{line}");

    let other = Ca::new();
    let server = inbound(app.addr, other.tls_state(&other.svid(&expected), &[])).await;
    let line = refused(server.addr, "unknown_issuer").await;
    let root = other.root();
    let (_, parsed) = x509_parser::parse_x509_certificate(root.as_ref()).unwrap();
    assert!(
        line.ends_with(&format!("issuer={}", parsed.subject())),
        "{line}"
    );
    let claimed = Some(expected.to_string());
    assert_eq!(field(&line, "claimed_peer"), claimed, "{line}");
    assert_eq!(field(&line, "not_after"), None, "{line}");

    let (chain, key) = ca.leaf_valid_for(&expected, time::Duration::seconds(-30));
    let (_, not_after) = trellis_core::tls::validity_of(&chain[0]).unwrap();
    let not_after = trellis_core::clock::rfc3339_checked(not_after).unwrap();
    let svid = Ca::svid_as_is(&expected, chain, key);
    let server = inbound(app.addr, ca.tls_state(&svid, &[])).await;
    let line = refused(server.addr, "expired_certificate").await;
    assert_eq!(field(&line, "not_after"), Some(not_after), "{line}");
    let claimed = Some(expected.to_string());
    assert_eq!(field(&line, "claimed_peer"), claimed, "{line}");
    assert_eq!(field(&line, "issuer"), None, "{line}");
    assert_eq!(*app.accepted.borrow(), 0, "the app was reached");
}

/// A route to a server sidecar in front of an app that hands the test each
/// connection it accepts.
struct Through {
    client: Arc<Shared>,
    /// The policies of the client's sidecar (none at first).
    client_policies: watch::Sender<Option<Arc<trellis_proxy::policy::Policies>>>,
    server: SpiffeId,
    inbound: TestInbound,
    local: std::net::SocketAddr,
    accepted: tokio::sync::mpsc::Receiver<TcpStream>,
    _shutdown: drain::Shutdown,
}

impl Through {
    async fn start() -> Through {
        let ca = Ca::new();
        let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (tx, accepted) = tokio::sync::mpsc::channel(4);
        let app_addr = app.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = app.accept().await {
                let _ = tx.send(tcp).await;
            }
        });
        let server = id("/ns/b/sa/server");
        let inbound = inbound_as(&ca, &server, app_addr).await;
        let tls = ca.tls_state(
            &ca.svid(&id("/ns/a/sa/client")),
            std::slice::from_ref(&server),
        );
        let (client_policies, policies) = watch::channel(None);
        let client = Arc::new(Shared {
            policies,
            ..holding(tls)
        });
        let (local, shutdown) = route(client.clone(), server.clone(), inbound.addr).await;
        Through {
            client,
            client_policies,
            server,
            inbound,
            local,
            accepted,
            _shutdown: shutdown,
        }
    }

    /// A connection from the app through both sidecars, and the server
    /// app's end of it, once a first line crossed.
    async fn connect(&mut self) -> (TcpStream, TcpStream) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut app = TcpStream::connect(self.local).await.unwrap();
        // A whole line: a text protocol paused mid-line is taken for HTTP.
        app.write_all(b"hello\n").await.unwrap();
        let mut server = self.accept().await;
        let mut hello = [0u8; 6];
        server.read_exact(&mut hello).await.unwrap();
        assert_eq!(&hello, b"hello\n");
        (app, server)
    }

    /// The server app's end of the next connection its sidecar opens to it,
    /// within 5 s.
    async fn accept(&mut self) -> TcpStream {
        tokio::time::timeout(std::time::Duration::from_secs(5), self.accepted.recv())
            .await
            .expect("the server app was not called")
            .unwrap()
    }

    /// Gives the server's sidecar policies that deny every caller, as a
    /// policy update would.
    fn deny_at_server(&self) {
        let denying = trellis_proxy::policy::Policies::compile(
            2,
            &self.server,
            "deny".into(),
            Vec::new(),
            &self.inbound.metrics,
        )
        .unwrap();
        self.inbound.policies.send_replace(Some(Arc::new(denying)));
    }

    /// Both sidecars have no connection open any more.
    async fn closed(&self) {
        for metrics in [&self.client.metrics, &self.inbound.metrics] {
            eventually("no connection left open", || {
                let text = metrics.encode();
                ["inbound", "outbound"].iter().all(|direction| {
                    !text.lines().any(|line| {
                        line.starts_with(&format!(
                            "trellis_connections_open{{direction=\"{direction}\"}}"
                        )) && !line.ends_with(" 0")
                    })
                })
            })
            .await;
        }
    }
}

/// Each side of a TCP connection through the mesh ends on its own, either
/// first: one app's FIN reaches the other after its last byte while the
/// other still sends, then the other's FIN after its own last byte;
/// nothing stays open, and neither end is turned into a reset.
#[tokio::test]
async fn half_closes_cross_the_mesh_both_ways() {
    let mut through = Through::start().await;
    let (mut app, mut server) = through.connect().await;
    send_then_fin(&mut server, &mut app, b"banner").await;
    send_then_fin(&mut app, &mut server, b"after").await;
    drop((app, server));
    through.closed().await;

    // The other order: the client's FIN first, the server still sending.
    let (mut app, mut server) = through.connect().await;
    send_then_fin(&mut app, &mut server, b"upload").await;
    send_then_fin(&mut server, &mut app, b"stored").await;
    drop((app, server));
    through.closed().await;
}

/// Sends `bytes` from `from` and closes its side with a FIN, and checks
/// that `to` reads `bytes` then the FIN.
async fn send_then_fin(from: &mut TcpStream, to: &mut TcpStream, bytes: &[u8]) {
    use tokio::io::AsyncWriteExt;
    from.write_all(bytes).await.unwrap();
    from.shutdown().await.unwrap();
    assert_eq!(read_end(to).await, End::Fin(bytes.to_vec()));
}

/// Sends `bytes` from `from` and resets it, and checks that `to` reads
/// `bytes` then the reset.
async fn send_then_reset(mut from: TcpStream, to: &mut TcpStream, bytes: &[u8]) {
    use tokio::io::AsyncWriteExt;
    from.write_all(bytes).await.unwrap();
    from.set_zero_linger().unwrap();
    drop(from);
    assert_eq!(read_end(to).await, End::Reset(bytes.to_vec()));
}

/// A connection the calling app resets is reset at the server app, not
/// ended as if the caller had finished: a server reading an upload to its
/// end must not take a cut one for whole.
#[tokio::test]
async fn a_connection_the_app_resets_is_reset_at_the_server_app() {
    let mut through = Through::start().await;
    let (app, mut server) = through.connect().await;
    app.set_zero_linger().unwrap();
    drop(app);
    assert_eq!(read_end(&mut server).await, End::Reset(Vec::new()));
    through.closed().await;
}

/// A connection the server app resets is reset at the calling app.
#[tokio::test]
async fn a_connection_the_server_app_resets_is_reset_at_the_calling_app() {
    let mut through = Through::start().await;
    let (mut app, server) = through.connect().await;
    server.set_zero_linger().unwrap();
    drop(server);
    assert_eq!(read_end(&mut app).await, End::Reset(Vec::new()));
    through.closed().await;
}

/// The bytes an app sent just before it reset its connection reach the
/// other app ahead of the reset, as they do without the mesh (the kernel
/// hands out what came before a reset): each sidecar writes on what it
/// read before it passes the reset on, both ways.
#[tokio::test]
async fn the_last_bytes_before_a_reset_reach_the_other_app_first() {
    let mut through = Through::start().await;
    let (mut app, server) = through.connect().await;
    send_then_reset(server, &mut app, b"last words").await;
    through.closed().await;

    let (app, mut server) = through.connect().await;
    send_then_reset(app, &mut server, b"last words").await;
    through.closed().await;
}

/// Sends from `app` without end, as an upload does, until its connection
/// fails; gives back the read half, and the task sending.
fn upload_without_end(
    app: TcpStream,
) -> (tokio::net::tcp::OwnedReadHalf, tokio::task::JoinHandle<()>) {
    use tokio::io::AsyncWriteExt;
    let (from, mut to) = app.into_split();
    let uploading = tokio::spawn(async move {
        let chunk = vec![7u8; 64 * 1024];
        while to.write_all(&chunk).await.is_ok() {}
    });
    (from, uploading)
}

/// A server app that answers while the calling app is still sending (an
/// error line to an upload) and closes with the upload unread, which
/// resets its connection: each sidecar's write toward it fails, and the
/// answer, sent before the reset, still reaches the calling app, then the
/// reset, as it would without the mesh.
#[tokio::test]
async fn an_answer_sent_before_the_server_app_resets_an_upload_reaches_the_calling_app() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut through = Through::start().await;
    let (app, mut server) = through.connect().await;
    let (mut from_server, uploading) = upload_without_end(app);
    let mut part = vec![0; 200_000];
    server.read_exact(&mut part).await.unwrap();
    server.write_all(b"ERR upload too large\n").await.unwrap();
    drop(server);
    assert_eq!(
        read_end(&mut from_server).await,
        End::Reset(b"ERR upload too large\n".to_vec())
    );
    within(uploading).await.unwrap();
    through.closed().await;
}

/// A TCP call whose server app is down (nothing listens where the server's
/// sidecar dials it) is cut: the server's sidecar ends its TLS session
/// without `close_notify` before any answer, which the calling app sees as
/// a reset, never as the server's orderly end; the server's sidecar counts
/// the app unreachable, the caller's that its peer closed the connection
/// before any answer, and nothing stays open.
#[tokio::test]
async fn a_tcp_call_whose_server_app_is_down_is_reset_and_counted_on_both_sides() {
    let ca = Ca::new();
    let server = id("/ns/b/sa/server");
    let down = common::ports::free_addr();
    let inbound = inbound_as(&ca, &server, down).await;
    let client = shared(&ca, &id("/ns/a/sa/client"), std::slice::from_ref(&server));
    let (local, _shutdown) = route(client.clone(), server.clone(), inbound.addr).await;

    assert_eq!(
        end_after_sending(local, b"hello\n").await,
        End::Reset(Vec::new())
    );
    eventually("both sides count the call", || {
        inbound.metrics.encode().contains(
            "trellis_connections_total{direction=\"inbound\",outcome=\"app_unreachable\"} 1",
        ) && client.metrics.encode().contains(
            "trellis_connections_total{direction=\"outbound\",outcome=\"closed_by_peer\"} 1",
        )
    })
    .await;
    let through = Through {
        client,
        client_policies: watch::channel(None).0,
        server,
        inbound,
        local,
        accepted: tokio::sync::mpsc::channel(1).1,
        _shutdown,
    };
    through.closed().await;
}

/// A TCP call the server's sidecar denies (no policy allows the caller)
/// is dropped there without `close_notify`, before any answer: the
/// calling app sees a reset, not the FIN of a server that closed in
/// order, and the caller's sidecar logs and counts that its peer closed
/// the connection.
#[tokio::test]
async fn a_tcp_call_the_server_s_sidecar_denies_is_reset_at_the_calling_app() {
    let (logs, _guard) = common::sidecar::Logs::capture(false);
    let ca = Ca::new();
    let app = echo_app().await;
    let server = id("/ns/b/sa/server");
    let metrics = Arc::new(Metrics::new());
    let denying =
        trellis_proxy::policy::Policies::compile(1, &server, "deny".into(), Vec::new(), &metrics)
            .unwrap();
    let state = ca.tls_state(&ca.svid(&server), &[]);
    let inbound = inbound_with(app.addr, state, Some(Arc::new(denying)), metrics).await;
    let client = shared(&ca, &id("/ns/a/sa/client"), std::slice::from_ref(&server));
    let (local, _shutdown) = route(client.clone(), server, inbound.addr).await;

    assert_eq!(
        end_after_sending(local, b"hello\n").await,
        End::Reset(Vec::new())
    );
    logs.wait_for(&[
        "WARN",
        "outbound connection closed by the server's sidecar before any answer",
        "peer=spiffe://td.test/ns/b/sa/server",
        "reason=closed",
    ])
    .await;
    let counted = "trellis_connections_total{direction=\"outbound\",outcome=\"closed_by_peer\"} 1";
    let text = client.metrics.encode();
    assert!(text.contains(counted), "{counted} in {text}");
    let denied = "trellis_connections_total{direction=\"inbound\",outcome=\"denied\"} 1";
    let text = inbound.metrics.encode();
    assert!(text.contains(denied), "{denied} in {text}");
    assert_eq!(*app.accepted.borrow(), 0, "the app was reached");
}

/// A TCP call the server's sidecar refuses with a TLS alert after the
/// handshake (a caller certificate it does not trust) is reset at the
/// calling app, which has no HTTP answer to be told why in, and logged
/// and counted as the refusal it is.
#[tokio::test]
async fn a_tcp_call_the_server_s_sidecar_refuses_with_an_alert_is_reset_at_the_calling_app() {
    let (logs, _guard) = common::sidecar::Logs::capture(false);
    let ca = Ca::new();
    let app = echo_app().await;
    let server = id("/ns/b/sa/server");
    let inbound = inbound_as(&ca, &server, app.addr).await;
    let client = Arc::new(untrusted_caller(&ca, &server));
    let (local, _shutdown) = route(client.clone(), server, inbound.addr).await;

    assert_eq!(
        end_after_sending(local, b"hello\n").await,
        End::Reset(Vec::new())
    );
    let to = inbound.addr;
    assert_refused_by_peer(&logs, &client, to, "UnknownCA", "alert_unknown_ca").await;
    assert_eq!(*app.accepted.borrow(), 0, "the app was reached");
}

/// A connection the client's sidecar closes because the server's identity
/// was revoked is reset at both apps, not ended as if all its bytes had
/// come.
#[tokio::test]
async fn a_connection_closed_for_a_revoked_server_is_reset_at_both_apps() {
    let mut through = Through::start().await;
    let (mut app, mut server) = through.connect().await;
    let policies = policies_revoking(&through.server, &through.server, &through.client.metrics);
    through
        .client_policies
        .send_replace(Some(Arc::new(policies)));
    assert_eq!(read_end(&mut app).await, End::Reset(Vec::new()));
    assert_eq!(read_end(&mut server).await, End::Reset(Vec::new()));
    through.closed().await;
}

/// A connection the server's sidecar closes because new policies deny it
/// is reset at both apps, not ended as if all its bytes had come.
#[tokio::test]
async fn a_connection_closed_by_new_policies_is_reset_at_both_apps() {
    let mut through = Through::start().await;
    let (mut app, mut server) = through.connect().await;
    through.deny_at_server();
    assert_eq!(read_end(&mut server).await, End::Reset(Vec::new()));
    assert_eq!(read_end(&mut app).await, End::Reset(Vec::new()));
    through.closed().await;
}

/// An HTTP connection the server's sidecar closes because new policies
/// deny it is cut for the calling app as a TCP one is (a reset, from its
/// own sidecar), while the app's HTTP connection, the sidecar's own, kept
/// for the caller's identity, ends with a FIN: HTTP frames each request,
/// so the app takes the request cut mid-body (short of its
/// `content-length`) for a cut one without a reset, and a reset would
/// only throw away what the app was still to read.
#[tokio::test]
async fn an_http_connection_closed_by_new_policies_is_reset_for_the_caller_only() {
    use tokio::io::AsyncWriteExt;
    let mut through = Through::start().await;
    let mut app = TcpStream::connect(through.local).await.unwrap();
    app.write_all(b"GET /first HTTP/1.1\r\nhost: api\r\n\r\n")
        .await
        .unwrap();
    let mut server = through.accept().await;
    read_from_to(&mut server, b"GET /first HTTP/1.1\r\n", b"\r\n\r\n").await;
    server
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        .await
        .unwrap();
    read_from_to(&mut app, b"HTTP/1.1 200 OK\r\n", b"\r\n\r\nok").await;

    // An upload under way on the same connection when the policies change.
    app.write_all(b"POST /upload HTTP/1.1\r\nhost: api\r\ncontent-length: 100\r\n\r\npart")
        .await
        .unwrap();
    read_from_to(&mut server, b"POST /upload HTTP/1.1\r\n", b"part").await;
    through.deny_at_server();
    assert_eq!(read_end(&mut app).await, End::Reset(Vec::new()));
    assert_eq!(read_end(&mut server).await, End::Fin(Vec::new()));
    // Nor is the FIN followed by a reset.
    through.closed().await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(
        server.take_error().unwrap().is_none(),
        "the app's connection was reset after its FIN"
    );
}

/// An HTTP/2 connection (h2c from the app, `h2` between the sidecars) the
/// server's sidecar closes because new policies deny it is cut for the
/// calling app as an HTTP/1 one is: its sidecar resets the app's
/// connection, so hyper's HTTP/2 client fails the request in flight and
/// the connection with a reset, not a GOAWAY it could take for a graceful
/// end. The server app's end is the sidecar's own HTTP connection: the
/// upload in flight there ends with a stream reset (`RST_STREAM` with
/// `INTERNAL_ERROR`), which tells the app the request was cut, and the
/// app's connection is not reset.
#[tokio::test]
async fn an_http2_connection_closed_by_new_policies_is_reset_for_the_caller_only() {
    use http_body_util::{BodyExt, Full, StreamBody};
    use hyper::body::Frame;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    type Chunk = Result<Frame<bytes::Bytes>, std::convert::Infallible>;
    // A request body the test sends chunk by chunk; a closed channel ends it.
    let body = |chunks: tokio::sync::mpsc::Receiver<Chunk>| {
        StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(chunks))
    };
    let mut through = Through::start().await;
    let tcp = TokioIo::new(TcpStream::connect(through.local).await.unwrap());
    let (mut caller, connection) = hyper::client::conn::http2::handshake(TokioExecutor::new(), tcp)
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    let first = ::http::Request::get("http://api/first")
        .body(body(tokio::sync::mpsc::channel(1).1))
        .unwrap();
    let answered = tokio::spawn(caller.send_request(first));

    // The server app, hyper's server, on the connection its sidecar opens:
    // `/first` answered at once, `/upload` read to its end, how that went
    // reported.
    let app = through.accept().await;
    let (started_tx, mut started) = tokio::sync::mpsc::channel::<()>(1);
    let (upload_tx, mut upload) = tokio::sync::mpsc::channel::<Result<(), String>>(1);
    let serve =
        hyper::service::service_fn(move |request: ::http::Request<hyper::body::Incoming>| {
            let (started_tx, upload_tx) = (started_tx.clone(), upload_tx.clone());
            async move {
                if request.uri().path() == "/upload" {
                    let mut body = request.into_body();
                    let _ = body.frame().await;
                    let _ = started_tx.send(()).await;
                    let ended = loop {
                        match body.frame().await {
                            None => break Ok(()),
                            Some(Ok(_)) => {}
                            Some(Err(e)) => break Err(format!("{e:?}")),
                        }
                    };
                    let _ = upload_tx.send(ended).await;
                }
                Ok::<_, std::convert::Infallible>(::http::Response::new(Full::new(
                    bytes::Bytes::from_static(b"ok"),
                )))
            }
        });
    let (app_local, app_peer) = (app.local_addr().unwrap(), app.peer_addr().unwrap());
    let app_socket = socket2::SockRef::from(&app).try_clone().unwrap();
    tokio::spawn(async move {
        let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        let _ = builder.serve_connection(TokioIo::new(app), serve).await;
    });

    let response = answered.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.into_body().collect().await.unwrap().to_bytes(),
        "ok"
    );

    // An upload under way on the same connection when the policies change.
    let (chunks, upload_body) = tokio::sync::mpsc::channel(4);
    let upload_request = ::http::Request::post("http://api/upload")
        .header("content-length", "100")
        .body(body(upload_body))
        .unwrap();
    let uploading = tokio::spawn(caller.send_request(upload_request));
    chunks
        .send(Ok(Frame::data(bytes::Bytes::from_static(b"part"))))
        .await
        .unwrap();
    within(started.recv())
        .await
        .expect("the upload never reached the app");
    through.deny_at_server();

    // The calling app: the request and the connection fail with a reset.
    let failed = within(uploading).await.unwrap();
    let error = failed.expect_err("the cut upload was answered");
    let ended = within(connection).await.unwrap();
    let error = match ended {
        Err(e) => format!("{error:?} / {e:?}"),
        Ok(()) => panic!("the caller's connection ended gracefully ({error:?})"),
    };
    assert!(error.contains("ConnectionReset"), "{error}");
    // The server app: the upload's stream is reset, its connection is not.
    let cut = within(upload.recv()).await.unwrap();
    let cut = cut.expect_err("the app took the cut upload for a whole one");
    assert!(
        cut.contains("Reset(") && cut.contains("INTERNAL_ERROR, Remote"),
        "{cut}"
    );
    through.closed().await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(
        app_socket.take_error().unwrap().is_none(),
        "the app's connection {app_local} <- {app_peer} was reset"
    );
}

/// How a TCP connection to `addr` that sends `sent` and then waits for
/// an answer ends, as its app sees it (the bytes it read, then a FIN or a
/// reset), within 5 s.
async fn end_after_sending(addr: std::net::SocketAddr, sent: &[u8]) -> End {
    use tokio::io::AsyncWriteExt;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(sent).await.unwrap();
    read_end(&mut tcp).await
}

/// `future`'s output, within 5 s.
async fn within<F: std::future::Future>(future: F) -> F::Output {
    tokio::time::timeout(std::time::Duration::from_secs(5), future)
        .await
        .expect("nothing within 5 s")
}

/// Reads `tcp` until what was read ends with `end`, within 5 s, and checks
/// that it starts with `start`.
async fn read_from_to(tcp: &mut TcpStream, start: &[u8], end: &[u8]) {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    while !got.ends_with(end) {
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), tcp.read(&mut buf))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no {:?} within 5 s after {:?}",
                    String::from_utf8_lossy(end),
                    String::from_utf8_lossy(&got)
                )
            })
            .unwrap();
        assert!(
            n > 0,
            "ended before {:?}: {:?}",
            String::from_utf8_lossy(end),
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(start), "{}", String::from_utf8_lossy(&got));
}
