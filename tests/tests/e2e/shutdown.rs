//! What a sidecar does on SIGTERM outside Kubernetes, where the app beside
//! it is told to stop at the same moment: the inbound port closes at once,
//! while the outbound listeners keep carrying the app's last calls until
//! no connection has been open for `--drain-idle`, and the admin port keeps
//! answering probes and scrapes until then, `/ready` saying it drains.

use anyhow::Context;
use rustix::process::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use trellis_tests::http::{self, HttpConnection};
use trellis_tests::{HttpApp, Mesh, Sidecar, eventually};

use crate::{Pair, SOON};

/// Long enough that a sidecar that exits did so because its drain ended,
/// not because the deadline passed.
const NEVER: &str = "1h";

/// A pair whose client, `web`, drains for as long as it takes.
async fn pair() -> anyhow::Result<Pair> {
    let mesh = Mesh::start().await?;
    let api = HttpApp::start("api").await?;
    let server = mesh.sidecar("api").app(api.addr()).start().await?;
    let client = mesh
        .sidecar("web")
        .route_to(&server)
        .arg("--drain-timeout")
        .arg(NEVER)
        .start()
        .await?;
    Ok(Pair {
        client,
        server,
        api,
        mesh,
    })
}

/// Waits for `sidecar` to exit and returns its log.
async fn exited(sidecar: &mut Sidecar) -> anyhow::Result<String> {
    let process = sidecar.process();
    let status = eventually("the sidecar to exit", SOON, || {
        let status = process.try_exit_status();
        async move { status.ok_or("still running") }
    })
    .await?;
    anyhow::ensure!(status.success(), "the sidecar exited with {status}");
    Ok(sidecar.log())
}

/// After SIGTERM, web's inbound port refuses new connections while a new
/// call through its route still reaches api over mTLS (api's app sees
/// web's verified identity); web exits once its connections are done,
/// without waiting for `--drain-timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_sigterm_outbound_keeps_working_until_the_connections_are_done() -> anyhow::Result<()>
{
    let mut pair = pair().await?;
    let route = pair.route();
    let inbound = pair.client.inbound_addr();

    // The app's pooled connection, open when the stop comes.
    let mut pooled = HttpConnection::open(route).await?;
    pooled.get("/before").await?.success()?;

    pair.client.process().signal(Signal::TERM)?;
    pair.client
        .wait_for_log("listener stopped accepting listener=\"inbound\"", SOON)
        .await
        .map_err(|e| e.context("the inbound listener did not stop"))?;
    let refused = tokio::net::TcpStream::connect(inbound).await;
    assert!(
        matches!(&refused, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
        "a new connection to the inbound port of a stopping sidecar: {refused:?}"
    );

    // The app's last calls as it shuts down: on its open connection and on
    // a new one.
    let last = http::get(route, "/deregister")
        .await
        .map_err(|e| e.context("a new call through the route of a stopping sidecar"))?
        .success()?;
    assert_eq!(last.body, pair.api.greeting());
    pooled.get("/flush").await?.success()?;
    let seen = pair.api.requests();
    let deregister = seen
        .iter()
        .find(|r| r.path == "/deregister")
        .expect("api's app received the call");
    assert_eq!(
        deregister.headers["x-trellis-peer-identity"],
        pair.client.identity(),
        "the call did not cross mTLS as web"
    );
    pair.client.process().ensure_running()?;

    drop(pooled);
    let log = exited(&mut pair.client).await?;
    assert!(log.contains("drained: no connection open"), "{log}");
    assert!(!log.contains("drain timeout reached"), "{log}");
    Ok(())
}

/// Through the drain, web's admin port keeps answering until the process
/// exits: `/ready` 503 saying the sidecar drains, since when and what for
/// (the app's connection still open), marked as the sidecar's own answer
/// (`trellis-proxy-error: not_ready`), `/live` 200 (a draining sidecar must
/// not be restarted), `/metrics` with when the drain started. Neither the
/// probes nor the scrapes hold the drain open: once the app's connection
/// closes, web exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_sigterm_the_admin_port_answers_until_the_process_exits() -> anyhow::Result<()> {
    let mut pair = pair().await?;
    let admin = pair.client.admin();
    let drain_start = |metrics: &trellis_tests::Metrics| {
        metrics.get("trellis_drain_start_timestamp_seconds", &[])
    };
    assert_eq!(drain_start(&admin.metrics().await?), Some(0.0));
    let mut held = HttpConnection::open(pair.route()).await?;
    held.get("/before").await?.success()?;

    pair.client.process().signal(Signal::TERM)?;
    pair.client
        .wait_for_log("listener stopped accepting listener=\"inbound\"", SOON)
        .await?;
    let ready = http::get(admin.addr(), "/ready")
        .await
        .map_err(|e| e.context("/ready of a draining sidecar"))?;
    assert_eq!(ready.status, 503, "{}", ready.body);
    assert_eq!(
        ready
            .headers
            .get("trellis-proxy-error")
            .and_then(|v| v.to_str().ok()),
        Some("not_ready"),
        "{:?}",
        ready.headers
    );
    assert!(
        ready
            .body
            .starts_with("trellis: not ready: draining since "),
        "{}",
        ready.body
    );
    assert!(
        ready.body.contains(
            "once no connection has been open for 1 second (1 open now), or 1 hour after the \
             drain started"
        ),
        "{}",
        ready.body
    );
    let live = http::get(admin.addr(), "/live").await?;
    assert_eq!(
        live.status, 200,
        "/live of a draining sidecar: {}",
        live.body
    );
    let metrics = admin
        .metrics()
        .await
        .map_err(|e| e.context("/metrics of a draining sidecar"))?;
    assert!(
        drain_start(&metrics).is_some_and(|at| at > 0.0),
        "trellis_drain_start_timestamp_seconds: {:?}",
        drain_start(&metrics)
    );
    admin.config().await?;
    pair.client.process().ensure_running()?;

    drop(held);
    let log = exited(&mut pair.client).await?;
    assert!(log.contains("drained: no connection open"), "{log}");
    Ok(())
}

/// With nothing open, a stopping sidecar exits after `--drain-idle`, not
/// at `--drain-timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_sigterm_with_nothing_open_the_sidecar_exits_without_the_timeout()
-> anyhow::Result<()> {
    let mut pair = pair().await?;
    pair.client.process().signal(Signal::TERM)?;
    let log = exited(&mut pair.client).await?;
    assert!(log.contains("drained: no connection open"), "{log}");
    Ok(())
}

/// A second SIGTERM during the drain ends it at once, connections still
/// open or not: the way out for an operator who cannot wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_ends_the_drain_at_once() -> anyhow::Result<()> {
    let mut pair = pair().await?;
    let mut pooled = HttpConnection::open(pair.route()).await?;
    pooled.get("/before").await?.success()?;

    pair.client.process().signal(Signal::TERM)?;
    pair.client.wait_for_log("shutting down", SOON).await?;
    pair.client.process().signal(Signal::TERM)?;
    let log = exited(&mut pair.client).await?;
    assert!(log.contains("second signal: exiting"), "{log}");
    drop(pooled);
    Ok(())
}

/// A drain that reaches `--drain-timeout` says so and what it cuts, by
/// side: here the app's pooled connection through web's route, outbound,
/// and nothing inbound. The sidecar still exits 0: the drain ran its
/// course.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_drain_timeout_the_log_says_what_is_cut() -> anyhow::Result<()> {
    let mesh = Mesh::start().await?;
    let api = HttpApp::start("api").await?;
    let server = mesh.sidecar("api").app(api.addr()).start().await?;
    let mut client = mesh
        .sidecar("web")
        .route_to(&server)
        .arg("--drain-timeout")
        .arg("1s")
        .start()
        .await?;
    let route = client.route_addr(server.identity());
    let mut pooled = HttpConnection::open(route).await?;
    pooled.get("/before").await?.success()?;

    client.process().signal(Signal::TERM)?;
    let log = exited(&mut client).await?;
    let cut = log
        .lines()
        .find(|l| l.contains("drain timeout reached"))
        .ok_or_else(|| anyhow::anyhow!("no drain timeout line in:\n{log}"))?;
    assert!(
        cut.contains("inbound=0") && cut.contains("outbound=1"),
        "the line does not say what is cut: {cut}"
    );
    assert!(!log.contains("drained: no connection open"), "{log}");
    drop(pooled);
    Ok(())
}

/// A TCP connection through `web`'s route to a raw app behind `api`,
/// `stopping` (`web` or `api`) given a short `--drain-timeout`: the calling
/// app's end and the server app's, once a first line crossed.
async fn tcp_through(mesh: &Mesh, stopping: &str) -> anyhow::Result<TcpThrough> {
    let app = TcpListener::bind("127.0.0.1:0").await?;
    let short = |name: &str| if name == stopping { "1s" } else { NEVER };
    let server = mesh
        .sidecar("api")
        .app(app.local_addr()?)
        .arg("--drain-timeout")
        .arg(short("api"))
        .start()
        .await?;
    let client = mesh
        .sidecar("web")
        .route_to(&server)
        .arg("--drain-timeout")
        .arg(short("web"))
        .start()
        .await?;
    let mut caller = TcpStream::connect(client.route_addr(server.identity())).await?;
    // A whole line: a text protocol paused mid-line is taken for HTTP.
    caller.write_all(b"hello\n").await?;
    let (mut served, _) = tokio::time::timeout(SOON, app.accept())
        .await
        .context("the server app was not called")??;
    let mut hello = [0u8; 6];
    served.read_exact(&mut hello).await?;
    anyhow::ensure!(&hello == b"hello\n", "the server app read {hello:?}");
    Ok(TcpThrough {
        client,
        server,
        caller,
        served,
    })
}

struct TcpThrough {
    client: Sidecar,
    server: Sidecar,
    caller: TcpStream,
    served: TcpStream,
}

/// How a TCP connection ended, read to its end.
#[derive(Debug, PartialEq)]
enum End {
    /// An orderly end (FIN) after these bytes.
    Fin(Vec<u8>),
    /// A reset after these bytes.
    Reset(Vec<u8>),
}

async fn read_end(tcp: &mut TcpStream) -> anyhow::Result<End> {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let read = tokio::time::timeout(SOON, tcp.read(&mut buf))
            .await
            .context("the connection neither ended nor was reset")?;
        match read {
            Ok(0) => return Ok(End::Fin(got)),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Ok(End::Reset(got));
            }
            Err(e) => return Err(e).context("reading"),
        }
    }
}

/// A TCP connection into a stopping sidecar that is still open at its
/// `--drain-timeout` is cut, not ended: the app behind it and the calling
/// app (through its own sidecar) both see a reset, never a FIN that would
/// pass for the end of the bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbound_tcp_connection_open_at_the_drain_timeout_is_reset_at_both_apps()
-> anyhow::Result<()> {
    reset_at_both_apps_at_the_drain_timeout("api").await
}

/// So is an outbound one, the calling app's, open when its own sidecar
/// stops and reaches its `--drain-timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbound_tcp_connection_open_at_the_drain_timeout_is_reset_at_both_apps()
-> anyhow::Result<()> {
    reset_at_both_apps_at_the_drain_timeout("web").await
}

/// Stops the `stopping` sidecar (`web` or `api`) of a [`tcp_through`]
/// connection and checks that the app on its side, then the app on the
/// other, reads a reset with nothing before it, and that its log says the
/// drain timeout was reached.
async fn reset_at_both_apps_at_the_drain_timeout(stopping: &str) -> anyhow::Result<()> {
    let mesh = Mesh::start().await?;
    let mut through = tcp_through(&mesh, stopping).await?;
    let (sidecar, near, far) = match stopping {
        "api" => (
            &mut through.server,
            &mut through.served,
            &mut through.caller,
        ),
        "web" => (
            &mut through.client,
            &mut through.caller,
            &mut through.served,
        ),
        other => anyhow::bail!("no sidecar {other:?}: web or api"),
    };
    sidecar.process().signal(Signal::TERM)?;
    assert_eq!(read_end(near).await?, End::Reset(Vec::new()));
    assert_eq!(read_end(far).await?, End::Reset(Vec::new()));
    let log = exited(sidecar).await?;
    assert!(log.contains("drain timeout reached"), "{log}");
    Ok(())
}
