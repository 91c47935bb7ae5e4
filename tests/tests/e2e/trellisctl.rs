//! `trellisctl` against a running control plane.

use trellis_tests::{Mesh, eventually};

use crate::{Pair, SOON};

/// The workload entries of `trellisctl workloads -o json`, whether printed
/// as a list or as `{"workloads": [...]}`.
fn entries(json: &serde_json::Value) -> Vec<serde_json::Value> {
    let list = json.get("workloads").unwrap_or(json);
    list.as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_lists_both_sidecars_with_addresses_acked_versions_and_sync() -> anyhow::Result<()>
{
    let pair = Pair::start(Mesh::start().await?).await?;

    for sidecar in [&pair.server, &pair.client] {
        let what = format!(
            "trellisctl workloads to show {} with an acked version",
            sidecar.name()
        );
        eventually(&what, SOON, || async {
            let listed = pair.mesh.workloads().await?;
            let entry = entries(&listed)
                .into_iter()
                .find(|w| w["spiffe_id"] == sidecar.identity())
                .ok_or_else(|| anyhow::anyhow!("not listed in {listed}"))?;
            anyhow::ensure!(
                entry["address"] == sidecar.inbound_addr().to_string(),
                "listed with another address: {entry}"
            );
            let acked = entry["acked_version"].as_u64().unwrap_or(0);
            anyhow::ensure!(acked > 0, "no acked version yet: {entry}");
            let config = sidecar.config().await?;
            let holds = config["snapshot_version"].as_u64().unwrap_or(0);
            anyhow::ensure!(
                acked == holds,
                "acked {acked}, the sidecar holds snapshot {holds}"
            );
            anyhow::ensure!(
                entry["snapshot"] == "synced",
                "not synced with the version served: {entry}"
            );
            anyhow::Ok(())
        })
        .await?;
    }
    Ok(())
}
