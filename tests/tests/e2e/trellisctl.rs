//! `trellisctl` against a running control plane.

use trellis_tests::policy::{self, PolicyDoc};
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

/// `policy apply --wait` against the real sidecars: it returns once the
/// sidecar the policy selects holds the snapshot that carries it (so the
/// sidecar's own `/config` shows that version at once, with no polling
/// here), and the other sidecar, which the write does not concern, is
/// counted as holding it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_apply_waits_until_the_sidecars_hold_the_write() -> anyhow::Result<()> {
    let pair = Pair::start(Mesh::start().await?).await?;
    let document = PolicyDoc::allow("web-to-api", pair.server.identity())
        .from(pair.client.identity())
        .port(pair.api.addr().port())
        .to_yaml();
    let file = policy::write_file(&pair.mesh, &document)?;
    let out = pair
        .mesh
        .ctl([
            "policy".as_ref(),
            "apply".as_ref(),
            "--wait=30s".as_ref(),
            "-o".as_ref(),
            "json".as_ref(),
            "-f".as_ref(),
            file.as_os_str(),
        ])
        .await?;
    let applied: serde_json::Value = serde_json::from_str(&out)?;
    let version = applied["snapshot_version"].as_u64().unwrap_or(0);
    let holds = pair.server.config().await?["snapshot_version"]
        .as_u64()
        .unwrap_or(0);
    assert_eq!(holds, version, "--wait returned before api held {version}");
    Ok(())
}
