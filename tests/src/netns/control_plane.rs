//! The control plane in the namespaces ([`ControlPlane`]): started on its
//! host, driven with `trellisctl` from the same namespace, stopped when its
//! handle drops.

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::ensure;

use super::command::{output, program_argv, text};
use super::host::Host;
use super::lab::Lab;
use super::{CONTROL_PLANE_PORT, START_PATIENCE, TRUST_DOMAIN};
use crate::binaries::{Launcher, Program};
use crate::process::ChildProcess;

/// `trellis-control-plane` in its host's namespace, listening on the host's
/// address; stopped when dropped, before its namespace goes.
#[derive(Debug)]
pub struct ControlPlane {
    process: ChildProcess,
    host: Host,
    launcher: Launcher,
    addr: SocketAddr,
    state_dir: PathBuf,
}

impl ControlPlane {
    /// Starts the control plane on `host` (gRPC on `host:15012`, admin on
    /// its loopback) with `args` added (`--default-policy deny`, ...), and
    /// waits until it is ready.
    pub async fn start(lab: &Lab, host: Host, args: &[&str]) -> anyhow::Result<ControlPlane> {
        let addr = host.addr(CONTROL_PLANE_PORT);
        let state_dir = lab.dir().join("control-plane");
        let argv = program_argv(lab.launcher(), Program::ControlPlane);
        let mut command = host.command(&argv[0]);
        command
            .args(&argv[1..])
            .args(["--trust-domain", TRUST_DOMAIN, "--listen"])
            .arg(addr.to_string())
            .arg("--admin")
            .arg("127.0.0.1:15014")
            .arg("--state-dir")
            .arg(&state_dir)
            .args(args);
        let mut process = ChildProcess::spawn("control-plane", command, &lab.log("control-plane"))?;
        let bundle = state_dir.join("bundle.pem");
        process
            .wait_for_log("control plane ready", START_PATIENCE)
            .await?;
        ensure!(bundle.is_file(), "{} was not written", bundle.display());
        Ok(ControlPlane {
            process,
            host,
            launcher: lab.launcher().clone(),
            addr,
            state_dir,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn bundle_path(&self) -> PathBuf {
        self.state_dir.join("bundle.pem")
    }

    pub fn log(&self) -> String {
        self.process.log()
    }

    pub fn host(&self) -> &Host {
        &self.host
    }

    /// Runs `trellisctl --control-plane ADDR --state-dir DIR ARGS` in the
    /// control plane's namespace and returns its stdout; fails with its
    /// stderr unless it exits 0.
    pub async fn ctl<S: AsRef<OsStr>>(&self, args: &[S]) -> anyhow::Result<String> {
        let argv = program_argv(&self.launcher, Program::Ctl);
        let mut command = self.host.command(&argv[0]);
        command
            .args(&argv[1..])
            .arg("--control-plane")
            .arg(self.addr.to_string())
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(args);
        let shown: Vec<_> = args.iter().map(|a| a.as_ref().to_string_lossy()).collect();
        let out = output(command).await?;
        ensure!(
            out.status.success(),
            "trellisctl {} failed ({}): {}",
            shown.join(" "),
            out.status,
            text(&out.stderr)
        );
        Ok(text(&out.stdout))
    }

    /// A join token for `spiffe_id`, from `trellisctl token create`.
    pub async fn token(&self, spiffe_id: &str) -> anyhow::Result<String> {
        let out = self
            .ctl(&["token", "create", "--spiffe-id", spiffe_id])
            .await?;
        let token = out.trim().to_string();
        ensure!(
            !token.is_empty() && !token.contains(char::is_whitespace),
            "`trellisctl token create` should print only the token, printed {out:?}"
        );
        Ok(token)
    }
}

/// `spiffe://cluster.local/ns/default/sa/<name>`.
pub fn spiffe_id(name: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/default/sa/{name}")
}
