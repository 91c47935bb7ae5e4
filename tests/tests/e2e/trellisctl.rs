//! `trellisctl` against a running control plane.

use rustix::process::Signal;
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
            // A version names its content with the epoch it was set in:
            // the one the control plane lists is the one the sidecar holds.
            let epoch = entry["acked_version_epoch"].as_str().unwrap_or_default();
            let holds_epoch = config["snapshot_version_epoch"]
                .as_str()
                .unwrap_or_default();
            anyhow::ensure!(
                epoch.len() == 16 && epoch == holds_epoch && epoch != "0".repeat(16),
                "acked epoch {epoch:?}, the sidecar holds epoch {holds_epoch:?}: {entry}"
            );
            anyhow::ensure!(
                entry["synced_version_epoch"] == epoch,
                "synced in another epoch: {entry}"
            );
            let table = pair.mesh.ctl(["workloads"]).await?;
            let row = table
                .lines()
                .find(|l| l.starts_with(sidecar.identity()))
                .ok_or_else(|| anyhow::anyhow!("no row in {table}"))?;
            anyhow::ensure!(
                row.contains(&format!(" {acked}@{epoch} ")),
                "the row shows no {acked}@{epoch}: {row}"
            );
            anyhow::Ok(())
        })
        .await?;
    }
    Ok(())
}

/// `policy apply --wait` against the real sidecars: it returns once every
/// sidecar the write concerns holds the snapshot that carries it, so each
/// sidecar's own `/config` shows that version, and the epoch the write
/// returned with it, at once, with no polling here, and says so on stderr; while a sidecar cannot take the snapshot
/// (its process stopped), the wait fails at its deadline naming that
/// sidecar, and only it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_apply_waits_until_the_sidecars_hold_the_write() -> anyhow::Result<()> {
    let mut pair = Pair::start(Mesh::start().await?).await?;
    let api = pair.server.identity().to_owned();
    let web = pair.client.identity().to_owned();
    // One policy for each sidecar, so that each is sent the write.
    let policies = |port: u16| {
        policy::stream(&[
            PolicyDoc::allow("web-to-api", &api).from(&web).port(port),
            PolicyDoc::allow("api-to-web", &web).from(&api).port(port),
        ])
    };
    let apply = |text: String, wait: &'static str| {
        let mesh = &pair.mesh;
        async move {
            let file = policy::write_file(mesh, &text)?;
            let out = mesh
                .ctl_output([
                    "policy".as_ref(),
                    "apply".as_ref(),
                    wait.as_ref(),
                    "-o".as_ref(),
                    "json".as_ref(),
                    "-f".as_ref(),
                    file.as_os_str(),
                ])
                .await?;
            let applied: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            let version = applied["snapshot_version"].as_u64().unwrap_or(0);
            anyhow::ensure!(version > 0, "no snapshot version in {applied}");
            let epoch = applied["snapshot_version_epoch"]
                .as_str()
                .unwrap_or_default();
            anyhow::ensure!(
                epoch.len() == 16 && epoch != "0".repeat(16),
                "no snapshot version epoch in {applied}"
            );
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            anyhow::Ok((out.status, (version, epoch.to_owned()), stderr))
        }
    };

    let (status, (version, epoch), told) =
        apply(policies(pair.api.addr().port()), "--wait=30s").await?;
    assert!(status.success(), "{status}: {told}");
    assert!(
        told.contains(&format!(
            "every connected sidecar holds snapshot {version} or a later one: 2 on 1 replica"
        )),
        "{told}"
    );
    // How long the wait took is said in words, as every duration is.
    let took = told
        .split_once(" (after ")
        .and_then(|(_, rest)| rest.split_once(")\n"))
        .map(|(took, _)| took.split(' ').collect::<Vec<_>>());
    let said_in_words = took.as_deref().is_some_and(|words| {
        words.len() % 2 == 0
            && words.chunks(2).all(|pair| {
                pair[0].parse::<u64>().is_ok()
                    && ["second", "seconds", "millisecond", "milliseconds"].contains(&pair[1])
            })
    });
    assert!(said_in_words, "{told}");
    for sidecar in [&pair.server, &pair.client] {
        let config = sidecar.config().await?;
        let holds = config["snapshot_version"].as_u64().unwrap_or(0);
        assert_eq!(
            holds,
            version,
            "--wait returned before {} held {version}",
            sidecar.name()
        );
        // The write's epoch is the one its snapshot was sent with.
        assert_eq!(
            config["snapshot_version_epoch"].as_str(),
            Some(epoch.as_str()),
            "{} holds {version} of another epoch than the write returned",
            sidecar.name()
        );
    }

    // web's process stopped: its connection stays open, it takes nothing.
    pair.client.process().signal(Signal::STOP)?;
    let late = apply(policies(pair.api.addr().port() + 1), "--wait=3s").await;
    pair.client.process().signal(Signal::CONT)?;
    let (status, (version, _), told) = late?;
    assert!(!status.success(), "--wait held with web stopped: {told}");
    assert!(
        told.contains(&format!(
            "not every connected sidecar holds snapshot {version} after 3 seconds"
        )),
        "{told}"
    );
    assert!(
        told.contains(&format!("{web} does not hold it yet")),
        "{told}"
    );
    assert!(!told.contains(&api), "api held it: {told}");
    Ok(())
}
