//! Sidecars sharing an identity, as replicas of one service outside
//! Kubernetes do (two VMs, each its own join token): every one is a mesh
//! endpoint at its own address, through every renewal, and one that stops
//! leaves when its certificate ends while the others stay.

use std::time::Duration;

use trellis_tests::{Mesh, Sidecar, eventually};

use crate::SOON;

/// Short, so that the test sees renewals and an expiry.
const TTL: Duration = Duration::from_secs(10);

/// The addresses `trellisctl workloads -o json` lists for `spiffe_id`,
/// sorted.
async fn listed_addresses(mesh: &Mesh, spiffe_id: &str) -> anyhow::Result<Vec<String>> {
    let entry = mesh.workload(spiffe_id).await?;
    let mut addresses: Vec<String> = entry["addresses"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str().map(String::from))
        .collect();
    addresses.sort();
    Ok(addresses)
}

/// How many mesh endpoints the snapshot `sidecar` holds knows.
async fn endpoints_known(sidecar: &Sidecar) -> anyhow::Result<u64> {
    let config = sidecar.config().await?;
    config["endpoints"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no snapshot yet: {config}"))
}

/// Until `trellisctl` lists exactly `expected` for `spiffe_id` and
/// `caller` holds `endpoints` mesh endpoints.
async fn until_published(
    mesh: &Mesh,
    spiffe_id: &str,
    expected: &[String],
    caller: &Sidecar,
    endpoints: u64,
) -> anyhow::Result<()> {
    let what = format!("{spiffe_id} to be listed at {expected:?}, {endpoints} endpoints known");
    eventually(&what, SOON, || async {
        let listed = listed_addresses(mesh, spiffe_id).await?;
        anyhow::ensure!(listed == expected, "listed at {listed:?}");
        let known = endpoints_known(caller).await?;
        anyhow::ensure!(known == endpoints, "the caller knows {known} endpoints");
        anyhow::Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_sharing_an_identity_are_all_endpoints_until_one_stops() -> anyhow::Result<()> {
    let mesh = Mesh::builder().cert_ttl(TTL).start().await?;
    let api = mesh.spiffe_id("default", "api");
    let first = mesh.sidecar("api-1").identity(&api).start().await?;
    let mut second = mesh.sidecar("api-2").identity(&api).start().await?;
    let web = mesh.sidecar("web").route_to(&first).start().await?;
    let mut both = vec![
        first.inbound_addr().to_string(),
        second.inbound_addr().to_string(),
    ];
    both.sort();
    // Both replicas and the caller itself.
    until_published(&mesh, &api, &both, &web, 3).await?;

    // Each renews, reporting its own address only: neither displaces the
    // other.
    for sidecar in [&first, &second] {
        let what = format!("sidecar {} to renew twice", sidecar.name());
        eventually(&what, 3 * TTL, || async {
            let renewals = sidecar.renewals().await?;
            anyhow::ensure!(renewals >= 3.0, "{renewals} renewals so far");
            anyhow::Ok(())
        })
        .await?;
    }
    assert_eq!(listed_addresses(&mesh, &api).await?, both);
    assert_eq!(endpoints_known(&web).await?, 3);

    // The second replica goes away: its address leaves when its
    // certificate ends, the first stays.
    second.stop()?;
    let first_only = [first.inbound_addr().to_string()];
    until_published(&mesh, &api, &first_only, &web, 2).await?;
    Ok(())
}
