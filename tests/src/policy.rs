//! Authorization policies in a local mesh, the way an operator handles them:
//! YAML documents written to files and applied with the real `trellisctl
//! policy apply`, then waited on until the sidecar acknowledges the snapshot
//! that holds them (`trellisctl workloads -o json`), so a test asserts on
//! enforcement that has happened, never on a sleep.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;

use crate::binaries::Program;
use crate::mesh::Mesh;
use crate::patience::{eventually, patience};

/// How long a sidecar may take to acknowledge a new snapshot.
pub const ACK_PATIENCE: Duration = Duration::from_secs(20);

/// An AuthorizationPolicy document, in the namespace of the workload it
/// protects: a policy selects only workloads of its own namespace.
#[derive(Clone, Debug)]
pub struct PolicyDoc {
    name: String,
    namespace: String,
    targets: Vec<String>,
    action: &'static str,
    sources: Vec<String>,
    ports: Vec<u16>,
}

impl PolicyDoc {
    fn new(action: &'static str, name: &str, target: &str) -> Self {
        // `spiffe://<td>/ns/<namespace>/...`; anything else (a mesh-wide
        // prefix) is refused in `default`, as it is outside the root
        // namespace.
        let namespace = target
            .split("/ns/")
            .nth(1)
            .and_then(|rest| rest.split('/').next());
        Self {
            name: name.to_owned(),
            namespace: namespace.unwrap_or("default").to_owned(),
            targets: vec![target.to_owned()],
            action,
            sources: Vec::new(),
            ports: Vec::new(),
        }
    }

    /// ALLOW connections to `target` (a SPIFFE ID or prefix ending in `/*`).
    pub fn allow(name: &str, target: &str) -> Self {
        Self::new("ALLOW", name, target)
    }

    pub fn deny(name: &str, target: &str) -> Self {
        Self::new("DENY", name, target)
    }

    pub fn audit(name: &str, target: &str) -> Self {
        Self::new("AUDIT", name, target)
    }

    /// A source SPIFFE ID of the one rule; without any, the rule matches
    /// every source.
    pub fn from(mut self, spiffe_id: &str) -> Self {
        self.sources.push(spiffe_id.to_owned());
        self
    }

    /// A destination port of the one rule; without any, every port.
    pub fn port(mut self, port: u16) -> Self {
        self.ports.push(port);
        self
    }

    pub fn to_yaml(&self) -> String {
        let targets: Vec<String> = self.targets.iter().map(|t| format!("{t:?}")).collect();
        let mut rule = String::new();
        if !self.sources.is_empty() {
            rule.push_str("from:\n");
            for s in &self.sources {
                rule.push_str(&format!("        - spiffeId: {s}\n"));
            }
        }
        if !self.ports.is_empty() {
            let ports: Vec<String> = self.ports.iter().map(u16::to_string).collect();
            if !rule.is_empty() {
                rule.push_str("      ");
            }
            rule.push_str(&format!("to:\n        - ports: [{}]\n", ports.join(", ")));
        }
        if rule.is_empty() {
            rule.push_str("{}\n");
        }
        format!(
            "apiVersion: trellis.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: {}\n  namespace: {}\nspec:\n  selector:\n    spiffeIds: [{}]\n  action: {}\n  rules:\n    - {rule}",
            self.name,
            self.namespace,
            targets.join(", "),
            self.action
        )
    }
}

/// Several documents as one YAML stream.
pub fn stream(documents: &[PolicyDoc]) -> String {
    let texts: Vec<String> = documents.iter().map(PolicyDoc::to_yaml).collect();
    texts.join("---\n")
}

/// What `trellisctl policy apply -o json` reported.
#[derive(Clone, Debug)]
pub struct Applied {
    pub snapshot_version: u64,
    pub json: serde_json::Value,
}

static FILES: AtomicUsize = AtomicUsize::new(0);

/// Writes `text` to a new file in the mesh's directory.
pub fn write_file(mesh: &Mesh, text: &str) -> anyhow::Result<PathBuf> {
    let n = FILES.fetch_add(1, Ordering::Relaxed);
    let path = mesh.dir().join(format!("policy-{n}.yaml"));
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// `trellisctl policy apply -f FILE -o json` with `text` in the file.
pub async fn apply(mesh: &Mesh, text: &str) -> anyhow::Result<Applied> {
    let path = write_file(mesh, text)?;
    let out = mesh
        .ctl([
            "policy".as_ref(),
            "apply".as_ref(),
            "-o".as_ref(),
            "json".as_ref(),
            "-f".as_ref(),
            path.as_os_str(),
        ])
        .await?;
    let json: serde_json::Value = serde_json::from_str(&out)
        .with_context(|| format!("`policy apply -o json` printed no JSON: {out}"))?;
    let snapshot_version = json["snapshot_version"]
        .as_u64()
        .with_context(|| format!("no snapshot_version in {json}"))?;
    Ok(Applied {
        snapshot_version,
        json,
    })
}

/// Applies `text` as [`apply`] does, then waits until `spiffe_id`'s
/// sidecar has acknowledged the snapshot that holds it; the version
/// acknowledged.
pub async fn apply_and_wait(mesh: &Mesh, spiffe_id: &str, text: &str) -> anyhow::Result<u64> {
    let applied = apply(mesh, text).await?;
    wait_for_ack(mesh, spiffe_id, applied.snapshot_version).await
}

/// `trellisctl policy apply -f FILE` with `text` in the file, which must
/// be refused: the file, and the error as `{:#}` prints it, for a test to
/// check that it names the file and the place.
pub async fn apply_refused(mesh: &Mesh, text: &str) -> anyhow::Result<(PathBuf, String)> {
    let path = write_file(mesh, text)?;
    let args = [
        "policy".as_ref(),
        "apply".as_ref(),
        "-f".as_ref(),
        path.as_os_str(),
    ];
    match mesh.ctl(args).await {
        Ok(out) => anyhow::bail!("`policy apply` accepted {}: {out}", path.display()),
        Err(e) => Ok((path, format!("{e:#}"))),
    }
}

/// `trellisctl policy delete NS/NAME`; returns the snapshot version that no
/// longer holds it (printed as `VERSION@EPOCH`: the number).
pub async fn delete(mesh: &Mesh, key: &str) -> anyhow::Result<u64> {
    let out = mesh.ctl(["policy", "delete", key]).await?;
    out.lines()
        .find_map(|l| l.strip_prefix("snapshot version "))
        .and_then(|v| v.trim().split('@').next()?.parse().ok())
        .with_context(|| format!("`policy delete` printed no snapshot version: {out}"))
}

/// The version `spiffe_id`'s sidecar last acknowledged, per `trellisctl
/// workloads -o json`.
pub async fn acked_version(mesh: &Mesh, spiffe_id: &str) -> anyhow::Result<u64> {
    let entry = mesh.workload(spiffe_id).await?;
    Ok(entry["acked_version"].as_u64().unwrap_or(0))
}

/// Waits until `spiffe_id`'s sidecar has acknowledged `version` or later.
pub async fn wait_for_ack(mesh: &Mesh, spiffe_id: &str, version: u64) -> anyhow::Result<u64> {
    let what = format!("{spiffe_id} to acknowledge snapshot version {version}");
    eventually(&what, ACK_PATIENCE, || async {
        let acked = acked_version(mesh, spiffe_id).await?;
        anyhow::ensure!(acked >= version, "acked version is {acked}");
        anyhow::Ok(acked)
    })
    .await
}

/// `trellisctl policy explain --from FROM --to TO --port PORT`, then the
/// arguments `more` (a path, headers, an output format); what it printed.
pub async fn explain(
    mesh: &Mesh,
    from: &str,
    to: &str,
    port: u16,
    more: &[&str],
) -> anyhow::Result<String> {
    let port = port.to_string();
    let args = [
        "policy", "explain", "--from", from, "--to", to, "--port", &port,
    ];
    mesh.ctl(args.iter().chain(more)).await
}

/// Runs `trellisctl ARGS` without the mesh's address or credentials (as
/// `policy lint` is run in CI) and returns its exit status and output,
/// whatever the status.
pub async fn ctl_offline<I, S>(mesh: &Mesh, args: I) -> anyhow::Result<std::process::Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut command = mesh.launcher().command(Program::Ctl);
    command.args(args).env_remove("TRELLIS_CONTROL_PLANE");
    let shown = format!("{command:?}");
    let run = tokio::process::Command::from(command)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(patience(Duration::from_secs(30)), run)
        .await
        .with_context(|| format!("{shown} did not finish"))?
        .with_context(|| format!("cannot run {shown}"))
}
