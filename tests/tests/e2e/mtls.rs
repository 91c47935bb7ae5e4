//! A call crosses the mesh over mTLS, and a route refuses a remote that is
//! not who it should be.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trellis_tests::{EchoApp, HttpApp, Mesh, Sidecar, eventually, http};

use crate::{Pair, SOON};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_request_crosses_the_mesh_and_the_server_records_the_client_identity()
-> anyhow::Result<()> {
    let mut pair = Pair::start(Mesh::start().await?).await?;

    let answer = http::get(pair.route(), "/greeting").await?.success()?;

    assert_eq!(answer.body, "hello from api");
    let requests = pair.api.requests();
    assert_eq!(requests.len(), 1, "the app saw {requests:?}");
    assert_eq!(requests[0].path, "/greeting");
    let client_id = pair.client.identity().to_string();
    let line = pair
        .server
        .wait_for_log(&format!("peer={client_id}"), SOON)
        .await?;
    assert!(line.contains("inbound"), "unexpected log line: {line}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_refuses_a_remote_that_presents_another_identity() -> anyhow::Result<()> {
    let mesh = Mesh::start().await?;
    let api = HttpApp::start("b").await?;
    let b = mesh.sidecar("b").app(api.addr()).start().await?;
    // `a` expects to find itself behind b's address: b presents its own ID.
    let a_id = mesh.spiffe_id("default", "a");
    let a = mesh
        .sidecar("a")
        .route(&a_id, b.inbound_addr())
        .route_to(&b)
        .start()
        .await?;

    let refused = http::get(a.route_addr(&a_id), "/").await;

    assert!(
        refused.as_ref().map_or(true, |r| !r.status.is_success()),
        "a remote with the wrong identity was reached: {refused:?}"
    );
    assert_eq!(api.requests().len(), 0, "b's app must not be reached");
    eventually(
        "a to count an unexpected_identity failure",
        SOON,
        || async {
            let failures = a.metrics().await?.counter(
                "trellis_handshake_failures_total",
                &[("direction", "outbound"), ("reason", "unexpected_identity")],
            );
            anyhow::ensure!(failures >= 1.0, "{failures} failures");
            anyhow::Ok(())
        },
    )
    .await?;
    // The same remote, expected as itself, is reached.
    let answer = http::get(a.route_addr(b.identity()), "/")
        .await?
        .success()?;
    assert_eq!(answer.body, "hello from b");
    Ok(())
}

/// Starts sidecar `name` for `app` listening on `inbound`, where another
/// listened until a moment ago: a sidecar that starts has new ticket keys.
async fn start_at(
    mesh: &Mesh,
    name: &str,
    app: SocketAddr,
    inbound: SocketAddr,
) -> anyhow::Result<Sidecar> {
    let [outbound, admin] = trellis_tests::ports::free_addrs(2)[..] else {
        unreachable!("two addresses");
    };
    let sidecar = mesh
        .sidecar(name)
        .app(app)
        .preferred_addrs(inbound, outbound, admin)
        .start()
        .await?;
    anyhow::ensure!(
        sidecar.inbound_addr() == inbound,
        "{inbound} was taken meanwhile: the test proves nothing"
    );
    Ok(sidecar)
}

/// `sidecar`'s outbound handshake failures of every reason, and its
/// resumptions abandoned because the peer refused the ticket.
async fn failures_and_refused_tickets(sidecar: &Sidecar) -> anyhow::Result<(f64, f64)> {
    let metrics = sidecar.metrics().await?;
    Ok((
        metrics.counter(
            "trellis_handshake_failures_total",
            &[("direction", "outbound")],
        ),
        metrics.counter(
            "trellis_tls_resumptions_abandoned_total",
            &[("reason", "not_resumed")],
        ),
    ))
}

/// A caller holding tickets of a server sidecar that restarted (and so has
/// new ticket keys) offers one, which is refused, and dials again with a
/// full handshake: an abandoned resumption, and no handshake failure when
/// the full handshake goes through, though the server counts the attempt
/// it saw end. When the full handshake is refused too (another workload
/// listens at the server's address now), the dial counts one failure: the
/// full handshake's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_ticket_is_abandoned_and_a_dial_counts_one_failure_at_most() -> anyhow::Result<()>
{
    let mut pair = Pair::start(Mesh::start().await?).await?;
    let (route, inbound) = (pair.route(), pair.server.inbound_addr());
    http::get(route, "/first").await?.success()?;
    http::get(route, "/second").await?.success()?;
    let resumed = pair.client.metrics().await?.counter(
        "trellis_tls_handshakes_total",
        &[("direction", "outbound"), ("kind", "resumed")],
    );
    assert_eq!(resumed, 1.0, "the caller holds api's tickets");

    pair.server.stop()?;
    pair.server = start_at(&pair.mesh, "api", pair.api.addr(), inbound).await?;
    let answer = http::get(route, "/restarted").await?.success()?;
    assert_eq!(answer.body, "hello from api");
    assert_eq!(
        failures_and_refused_tickets(&pair.client).await?,
        (0.0, 1.0),
        "a dial whose ticket was refused and that went through: no failure, one abandoned \
         resumption"
    );
    eventually("api to count the attempt it saw end", SOON, || async {
        let refused = pair.server.metrics().await?.counter(
            "trellis_handshake_failures_total",
            &[("direction", "inbound"), ("reason", "not_resumed")],
        );
        anyhow::ensure!(refused == 1.0, "{refused} not_resumed");
        anyhow::Ok(())
    })
    .await?;

    // The caller holds the restarted api's tickets; another workload
    // takes api's address.
    pair.server.stop()?;
    let _intruder = start_at(&pair.mesh, "intruder", pair.api.addr(), inbound).await?;
    let answer = http::get(route, "/intruder").await?;
    assert_eq!(answer.status, 502, "{answer:?}");
    assert_eq!(
        failures_and_refused_tickets(&pair.client).await?,
        (1.0, 2.0),
        "a dial whose ticket and full handshake were refused: one failure"
    );
    let unexpected = pair.client.metrics().await?.counter(
        "trellis_handshake_failures_total",
        &[("direction", "outbound"), ("reason", "unexpected_identity")],
    );
    assert_eq!(unexpected, 1.0);
    let reached: Vec<_> = pair.api.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(reached, ["/first", "/second", "/restarted"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_bytes_cross_the_mesh_unchanged() -> anyhow::Result<()> {
    let mesh = Mesh::start().await?;
    let echo = EchoApp::start().await?;
    let server = mesh.sidecar("echo").app(echo.addr()).start().await?;
    let client = mesh.sidecar("caller").route_to(&server).start().await?;
    let sent: Vec<u8> = (0..256 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();

    let tcp = TcpStream::connect(client.route_addr(server.identity())).await?;
    let (mut read, mut write) = tcp.into_split();
    let to_send = sent.clone();
    let writer = tokio::spawn(async move {
        write.write_all(&to_send).await?;
        write.shutdown().await
    });
    let mut received = Vec::new();
    read.read_to_end(&mut received).await?;
    writer.await??;

    assert_eq!(received.len(), sent.len());
    assert!(received == sent, "the bytes changed on the way");
    assert_eq!(echo.connections(), 1);
    Ok(())
}

/// A sidecar that is already running learns of a workload joining the
/// mesh from a snapshot that carries only the change: its `/config`
/// counts the new endpoint, its log says it made one endpoint change, and
/// the control plane counts the snapshot as `changes`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_sidecar_is_sent_only_the_endpoint_that_joined() -> anyhow::Result<()> {
    let mesh = Mesh::start().await?;
    let mut caller = mesh.sidecar("caller").start().await?;
    let endpoints = || async {
        let config = caller.config().await?;
        anyhow::Ok(config["endpoints"].as_u64())
    };
    eventually("caller to know its own endpoint", SOON, || async {
        anyhow::ensure!(endpoints().await? == Some(1), "{:?}", endpoints().await?);
        anyhow::Ok(())
    })
    .await?;

    let api = HttpApp::start("api").await?;
    let _server = mesh.sidecar("api").app(api.addr()).start().await?;
    eventually("caller to know api's endpoint", SOON, || async {
        anyhow::ensure!(endpoints().await? == Some(2), "{:?}", endpoints().await?);
        anyhow::Ok(())
    })
    .await?;
    caller.wait_for_log("endpoint_changes=1", SOON).await?;
    let sent = mesh.control_plane_admin().metrics().await?;
    let changes = sent.counter("trellis_snapshots_sent_total", &[("endpoints", "changes")]);
    assert!(changes >= 1.0, "no snapshot sent as changes");
    assert!(
        sent.counter(
            "trellis_snapshot_bytes_sent_total",
            &[("endpoints", "changes")]
        ) > 0.0
    );
    Ok(())
}

/// A route whose remote is a host name standing for one of the sidecar's
/// own plaintext listeners - the route's own port, or the outbound port -
/// refuses each connection before dialling anything (an HTTP/1 app is
/// answered 502 naming the loop), the log naming the route and the
/// address, counted as a `loop`. Dialled, the connection would come back
/// to the sidecar, each making another until its file descriptors ran out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_by_host_name_to_the_sidecar_itself_is_refused() -> anyhow::Result<()> {
    let mesh = Mesh::start().await?;
    let api = mesh.spiffe_id("default", "api");
    let free = trellis_tests::ports::free_addrs(5);
    let [inbound, outbound, admin, itself, via_outbound] = free[..] else {
        unreachable!("five addresses");
    };
    let to = |port: u16| format!("{api}@localhost:{port}");
    let mut web = mesh
        .sidecar("web")
        .preferred_addrs(inbound, outbound, admin)
        .arg("--route")
        .arg(format!("{itself}={}", to(itself.port())))
        .arg("--route")
        .arg(format!("{via_outbound}={}", to(outbound.port())))
        .start()
        .await?;
    anyhow::ensure!(
        web.outbound_addr() == outbound,
        "the outbound port was taken meanwhile: the test proves nothing"
    );

    for (local, port) in [(itself, itself.port()), (via_outbound, outbound.port())] {
        let mut app = TcpStream::connect(local).await?;
        app.write_all(b"GET / HTTP/1.1\r\nhost: api\r\n\r\n")
            .await?;
        // Answered and closed at once (a loop would hold it until the
        // first of its dials gave up), the app told why.
        let mut answer = Vec::new();
        let closed = tokio::time::timeout(SOON, app.read_to_end(&mut answer)).await;
        assert!(closed.is_ok(), "route {local}: still open after {SOON:?}");
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with("HTTP/1.1 502 Bad Gateway\r\n")
                && answer.ends_with(&format!(
                    "\r\n\r\ntrellis: outbound call to localhost:{port} refused: it resolves \
                     to 127.0.0.1:{port}, this sidecar (loop)\n"
                )),
            "{answer}"
        );
        let line = web
            .wait_for_log(&format!("@localhost:{port} address=127.0.0.1:{port}"), SOON)
            .await?;
        assert!(
            line.contains("resolves to this sidecar's own listener (loop)")
                && line.contains(&format!("route={local}={api}@localhost:{port}")),
            "{line}"
        );
    }
    let loops = web.metrics().await?.counter(
        "trellis_connections_total",
        &[("direction", "outbound"), ("outcome", "loop")],
    );
    assert_eq!(loops, 2.0);
    Ok(())
}
