//! The data plane does not depend on the control plane being up: sidecars
//! keep their certificate and snapshot while it is away, and renew from it
//! again once it is back on the same state directory.

use std::time::Duration;

use trellis_tests::http::HttpConnection;
use trellis_tests::{Mesh, Sidecar, Traffic, eventually, http};

use crate::{Pair, SOON};

/// Short enough that the tests see renewals, long enough that a certificate
/// outlives the outage.
const TTL: Duration = Duration::from_secs(20);

/// Waits until `sidecar` counts a failed renewal
/// (`trellis_certificate_renewals_total{outcome="error"}`), which comes
/// at about half of [`TTL`].
async fn a_renewal_fails(sidecar: &Sidecar) -> anyhow::Result<()> {
    let what = format!("sidecar {} to fail a renewal", sidecar.name());
    eventually(&what, TTL, || async {
        let failed = sidecar.metrics().await?.counter(
            "trellis_certificate_renewals_total",
            &[("outcome", "error")],
        );
        anyhow::ensure!(failed >= 1.0, "no failed renewal yet");
        anyhow::Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_keep_working_while_the_control_plane_is_down() -> anyhow::Result<()> {
    let mesh = Mesh::builder().cert_ttl(TTL).start().await?;
    let mut pair = Pair::start(mesh).await?;
    let greeting = pair.api.greeting();
    let mut open = HttpConnection::open(pair.route()).await?;
    assert_eq!(open.get("/before").await?.success()?.body, greeting);

    pair.mesh.stop_control_plane()?;
    // New connections, and the one opened before, until both sidecars have
    // tried to renew and failed: they keep serving their current
    // certificate, which outlives this wait.
    let traffic = Traffic::start(pair.route(), "/during", &greeting);
    for sidecar in [&pair.server, &pair.client] {
        a_renewal_fails(sidecar).await?;
    }
    let report = traffic.stop().await;
    let still_open = open.get("/still-open").await?.success()?;

    assert!(
        report.errors.is_empty(),
        "requests failed: {:#?}",
        report.errors
    );
    assert!(report.ok_new_connections > 0, "{report:?}");
    assert_eq!(still_open.body, greeting);
    pair.server.process().ensure_running()?;
    pair.client.process().ensure_running()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_renew_after_the_control_plane_restarts_on_the_same_state_dir()
-> anyhow::Result<()> {
    let mesh = Mesh::builder().cert_ttl(TTL).start().await?;
    let mut pair = Pair::start(mesh).await?;
    let bundle = std::fs::read(pair.mesh.bundle_path())?;
    let server_pid = pair.server.process().pid();
    let client_pid = pair.client.process().pid();

    let server_serial = pair.server.cert_serial().await?;
    let client_serial = pair.client.cert_serial().await?;

    // Down until both sidecars have tried to renew and failed, keeping
    // the certificate they had.
    pair.mesh.stop_control_plane()?;
    for (sidecar, before) in [
        (&pair.server, &server_serial),
        (&pair.client, &client_serial),
    ] {
        a_renewal_fails(sidecar).await?;
        assert_eq!(&sidecar.cert_serial().await?, before, "{}", sidecar.name());
    }
    pair.mesh.restart_control_plane().await?;

    // Both renew (from the restarted control plane, with the same CA).
    for (sidecar, before) in [(&pair.server, server_serial), (&pair.client, client_serial)] {
        let what = format!("sidecar {} to renew after the restart", sidecar.name());
        eventually(&what, TTL + SOON, || async {
            let now = sidecar.cert_serial().await?;
            anyhow::ensure!(now != before, "still serving {now}");
            anyhow::Ok(())
        })
        .await?;
    }
    assert_eq!(
        std::fs::read(pair.mesh.bundle_path())?,
        bundle,
        "the CA changed"
    );
    // Without a restart of either sidecar, and traffic still flows.
    pair.server.process().ensure_running()?;
    pair.client.process().ensure_running()?;
    assert_eq!(pair.server.process().pid(), server_pid);
    assert_eq!(pair.client.process().pid(), client_pid);
    let answer = http::get(pair.route(), "/after").await?.success()?;
    assert_eq!(answer.body, pair.api.greeting());
    Ok(())
}
