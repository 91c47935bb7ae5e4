//! Certificates rotate under load without dropping a request or a
//! connection.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use trellis_tests::{Mesh, Sidecar, Traffic};

use crate::Pair;

/// Collects every certificate serial a sidecar serves until told to stop.
fn watch_serials(
    sidecar: Arc<Sidecar>,
    seen: Arc<Mutex<BTreeSet<String>>>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while !*stop.borrow() {
            if let Ok(serial) = sidecar.cert_serial().await {
                seen.lock().await.insert(serial);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_drops_no_requests() -> anyhow::Result<()> {
    let mesh = Mesh::builder()
        .cert_ttl(Duration::from_secs(20))
        .start()
        .await?;
    let pair = Pair::start(mesh).await?;
    let route = pair.route();
    let (server, client) = (Arc::new(pair.server), Arc::new(pair.client));
    let server_serials = Arc::new(Mutex::new(BTreeSet::new()));
    let client_serials = Arc::new(Mutex::new(BTreeSet::new()));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let watchers = [
        watch_serials(server.clone(), server_serials.clone(), stopped.clone()),
        watch_serials(client.clone(), client_serials.clone(), stopped),
    ];

    let traffic = Traffic::start(route, "/", &pair.api.greeting());
    tokio::time::sleep(Duration::from_secs(60)).await;
    let report = traffic.stop().await;
    stop.send(true)?;
    for watcher in watchers {
        watcher.await?;
    }

    eprintln!(
        "{} requests on new connections, {} on one kept connection; serials: server {:?}, client {:?}",
        report.ok_new_connections,
        report.ok_kept_connection,
        server_serials.lock().await,
        client_serials.lock().await
    );
    assert!(
        report.errors.is_empty(),
        "{} of {} requests failed: {:#?}",
        report.errors.len(),
        report.ok() + report.errors.len() as u64,
        report.errors
    );
    assert!(
        report.ok_new_connections > 0 && report.ok_kept_connection > 0,
        "{report:?}"
    );
    // The first certificate and at least two renewals on each side.
    for (side, serials) in [("server", server_serials), ("client", client_serials)] {
        let serials = serials.lock().await;
        assert!(
            serials.len() >= 3,
            "the {side} sidecar served only these certificates: {serials:?}"
        );
    }
    Ok(())
}
