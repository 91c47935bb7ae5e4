//! The inbound port serves only mesh members: a client that does not
//! present an SVID of the mesh's CA never reaches the app.

use trellis_tests::probes::{self, Probe};
use trellis_tests::{HttpApp, Mesh, Sidecar, eventually};

use crate::SOON;

struct Server {
    mesh: Mesh,
    app: HttpApp,
    sidecar: Sidecar,
}

async fn server() -> anyhow::Result<Server> {
    let mesh = Mesh::start().await?;
    let app = HttpApp::start("api").await?;
    let sidecar = mesh.sidecar("api").app(app.addr()).start().await?;
    Ok(Server { mesh, app, sidecar })
}

/// The probe got nothing from the app, the app saw no connection, and the
/// sidecar counted a failed handshake.
async fn assert_refused(
    server: &Server,
    probe: &Probe,
    failures_before: f64,
) -> anyhow::Result<()> {
    let text = probe.received_text();
    assert!(
        !text.contains(&server.app.greeting()) && !text.starts_with("HTTP/1.1 2"),
        "the client got an answer from the app: {probe:?}"
    );
    assert_eq!(server.app.connections(), 0, "the app must not be reached");
    eventually("the handshake failure to be counted", SOON, || async {
        let failures = server.sidecar.inbound_handshake_failures().await?;
        anyhow::ensure!(failures > failures_before, "still {failures}");
        anyhow::Ok(())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_refuses_a_plaintext_client() -> anyhow::Result<()> {
    let server = server().await?;
    let inbound = server.sidecar.inbound_addr();
    let before = server.sidecar.inbound_handshake_failures().await?;

    let probe = probes::plaintext(inbound, &probes::http_request(inbound)).await?;

    // Told in its own protocol what the port is, rather than sent a TLS
    // alert that an HTTP client shows as garbage.
    let text = probe.received_text();
    assert!(
        text.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{probe:?}"
    );
    assert!(
        text.ends_with("\r\n\r\ntrellis: this is a Trellis sidecar's inbound port: it accepts only mutual TLS from another sidecar of the mesh; call the app from a workload that has a Trellis sidecar\n"),
        "{probe:?}"
    );
    assert_refused(&server, &probe, before).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_refuses_a_tls_client_without_a_certificate() -> anyhow::Result<()> {
    let server = server().await?;
    let inbound = server.sidecar.inbound_addr();
    let bundle = probes::load_bundle(&server.mesh.bundle_path())?;
    let config = probes::client_config(&bundle, server.mesh.trust_domain(), None)?;
    let before = server.sidecar.inbound_handshake_failures().await?;

    let probe = probes::tls(inbound, config, &probes::http_request(inbound)).await?;

    assert!(probe.received.is_empty(), "{probe:?}");
    assert_refused(&server, &probe, before).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_refuses_a_client_certified_by_another_ca() -> anyhow::Result<()> {
    let server = server().await?;
    let inbound = server.sidecar.inbound_addr();
    let bundle = probes::load_bundle(&server.mesh.bundle_path())?;
    // A well-formed SVID with a plausible identity, from a CA the mesh does
    // not trust.
    let intruder = probes::foreign_svid(&server.mesh.spiffe_id("default", "intruder"))?;
    let config = probes::client_config(&bundle, server.mesh.trust_domain(), Some(intruder))?;
    let before = server.sidecar.inbound_handshake_failures().await?;

    let probe = probes::tls(inbound, config, &probes::http_request(inbound)).await?;

    assert!(probe.received.is_empty(), "{probe:?}");
    assert_refused(&server, &probe, before).await
}

/// A flood of refused handshakes writes one warning per reason per
/// `REFUSAL_LOG_PAUSE`, not one per connection: the first at once, naming
/// the caller and the reason, and the next one after the pause saying how
/// many were not logged meanwhile. The metric counts every one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refused_handshakes_logs_one_line_per_reason_per_pause() -> anyhow::Result<()> {
    const FLOOD: usize = 40;
    let mut server = server().await?;
    let inbound = server.sidecar.inbound_addr();
    let request = probes::http_request(inbound);
    let before = server.sidecar.inbound_handshake_failures().await?;
    let refusals = |log: &str| -> Vec<String> {
        log.lines()
            .filter(|l| l.contains("inbound handshake failed") && l.contains("reason=not_tls"))
            .map(str::to_string)
            .collect()
    };

    let started = std::time::Instant::now();
    for _ in 0..FLOOD {
        probes::plaintext(inbound, &request).await?;
    }
    eventually("every refusal to be counted", SOON, || async {
        let failures = server.sidecar.inbound_handshake_failures().await?;
        anyhow::ensure!(failures >= before + FLOOD as f64, "{failures}");
        anyhow::Ok(())
    })
    .await?;
    let first = server.sidecar.wait_for_log("reason=not_tls", SOON).await?;
    assert!(
        first.contains("WARN") && first.contains("client=127.0.0.1:"),
        "{first}"
    );
    assert!(!first.contains("suppressed"), "{first}");
    // The log is written by a thread of its own: give it a moment.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let lines = refusals(&server.sidecar.log());
    assert_eq!(lines.len(), 1, "one line per refusal: {lines:#?}");
    assert!(
        started.elapsed() < trellis_proxy::inbound::REFUSAL_LOG_PAUSE,
        "the flood took the whole pause: the test proves nothing"
    );

    // The pause began with the first refusal, just after `started`.
    let pause = trellis_proxy::inbound::REFUSAL_LOG_PAUSE + std::time::Duration::from_secs(1);
    tokio::time::sleep_until((started + pause).into()).await;
    probes::plaintext(inbound, &request).await?;
    let next = server
        .sidecar
        .wait_for_log(&format!("suppressed={}", FLOOD - 1), SOON)
        .await?;
    assert!(next.contains("reason=not_tls"), "{next}");
    let lines = refusals(&server.sidecar.log());
    assert_eq!(lines.len(), 2, "{lines:#?}");
    Ok(())
}
