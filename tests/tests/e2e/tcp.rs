//! What the kernel does with a sidecar's connections: those to and from
//! other sidecars give up on a peer that vanished (after the user timeout
//! `--tcp-user-timeout` sets), those with the app in the pod are left
//! alone.

use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trellis_tests::sockets::{self, HeldSocket};
use trellis_tests::{HttpApp, Mesh, eventually};

use crate::{Pair, SOON};

/// When keepalive gives up on a silent peer: 60 s of silence, then 6
/// probes 10 s apart.
const KEEPALIVE_GIVES_UP: Duration = Duration::from_secs(120);

/// A connection between two sidecars gives up on a peer that vanished
/// while data was in flight as soon as keepalive would on a silent one
/// (`TCP_USER_TIMEOUT` of 120 s, on web's dial and on api's accepted
/// connection), rather than when retransmission gives up, about 15
/// minutes later (keepalive probes only a connection with nothing
/// unacknowledged). The connections with the apps in the pods (web's
/// app to its route, api's sidecar to its app) carry none.
///
/// The test reads the option the kernel applies from the sidecars' own
/// sockets ([`check_user_timeouts`]): watching a peer vanish would take
/// the real two minutes, or else a knob shortening them that the test
/// would be testing instead of what the sidecar sets. What the kernel does
/// with the option is its own contract (tcp(7)). `/config` shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_connections_give_up_on_a_vanished_peer_when_keepalive_would() -> anyhow::Result<()> {
    let pair = Pair::start(Mesh::start().await?).await?;
    for sidecar in [&pair.client, &pair.server] {
        assert_eq!(sidecar.config().await?["tcp_user_timeout"], "2m");
    }
    let expected = Some(KEEPALIVE_GIVES_UP);
    check_user_timeouts(&pair, expected, expected).await
}

/// `--tcp-user-timeout` (or `TRELLIS_TCP_USER_TIMEOUT`) gives the same
/// connections another user timeout, or with `0` none (a workload whose
/// peers may keep their receive window closed longer, a consumer that
/// stops reading for minutes); `/config` shows it. The connections with
/// the apps still carry none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_user_timeout_is_set_per_sidecar_or_turned_off() -> anyhow::Result<()> {
    let mesh = Mesh::start().await?;
    let api = HttpApp::start("api").await?;
    let server = mesh
        .sidecar("api")
        .app(api.addr())
        .arg("--tcp-user-timeout")
        .arg("0")
        .start()
        .await?;
    let client = mesh
        .sidecar("web")
        .route_to(&server)
        .env("TRELLIS_TCP_USER_TIMEOUT", "10m")
        .start()
        .await?;
    assert_eq!(client.config().await?["tcp_user_timeout"], "10m");
    assert_eq!(server.config().await?["tcp_user_timeout"], "0s");
    let pair = Pair {
        client,
        server,
        api,
        mesh,
    };
    check_user_timeouts(&pair, Some(Duration::from_secs(600)), None).await
}

/// Makes a call through web's route to api, holds it open, and checks the
/// user timeout of each of its connections as the kernel applies it:
/// `dialled` on web's dial to api, `accepted` on api's accepted
/// connection, none on either connection with an app.
///
/// The option is read from the sidecars' own sockets (copies of their
/// descriptors, `pidfd_getfd`): `ss -tio` does not show it. Where they
/// cannot be read the test says `skipped:` and passes.
async fn check_user_timeouts(
    pair: &Pair,
    dialled: Option<Duration>,
    accepted: Option<Duration>,
) -> anyhow::Result<()> {
    if let Some(skipped) = sockets::unreadable(pair.server.pid()) {
        trellis_tests::machine::skip(&skipped);
        return Ok(());
    }

    // A call through web's route to api, its connection held open.
    let mut caller = TcpStream::connect(pair.route()).await?;
    caller
        .write_all(b"GET / HTTP/1.1\r\nhost: api\r\n\r\n")
        .await?;
    let mut answer = Vec::new();
    tokio::time::timeout(SOON, async {
        while !String::from_utf8_lossy(&answer).contains(&pair.api.greeting()) {
            anyhow::ensure!(caller.read_buf(&mut answer).await? > 0, "closed");
        }
        anyhow::Ok(())
    })
    .await??;

    let (web, api) = (pair.client.pid(), pair.server.pid());
    let inbound = pair.server.inbound_addr();
    let one = |pid, what: &'static str, pick: &dyn Fn(&HeldSocket) -> bool| {
        let held = sockets::established(pid)?;
        let found = held.into_iter().find(|s| pick(s));
        found.with_context(|| format!("no {what} connection yet"))
    };
    let mut checked = Vec::new();
    eventually("every connection of the call found", SOON, || {
        checked.clear();
        let found = (|| {
            let from_web = one(web, "dialled", &|s| s.remote == inbound)?;
            let at_api = one(api, "accepted", &|s| s.local == inbound)?;
            let from_app = one(web, "route", &|s| s.local == pair.route())?;
            let to_app = one(api, "app", &|s| s.remote == pair.api.addr())?;
            anyhow::Ok([
                ("web's dial to api", from_web, dialled),
                ("api's accepted connection from web", at_api, accepted),
                ("web's connection from its app", from_app, None),
                ("api's connection to its app", to_app, None),
            ])
        })();
        std::future::ready(found.map(|f| checked.extend(f)))
    })
    .await?;
    for (what, socket, expected) in &checked {
        assert_eq!(socket.user_timeout()?, *expected, "{what}: {socket:?}");
    }
    for (what, socket, _) in &checked[..2] {
        assert!(socket.keepalive()?, "{what}: no keepalive");
    }
    Ok(())
}
