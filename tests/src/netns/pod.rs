//! A meshed pod ([`Pod`]): `trellis-proxy init` on its host, then the
//! sidecar as [`PROXY_UID`] with its [`Credential`] (a join token, or a
//! ServiceAccount token where the control plane runs on the Kubernetes
//! store) and the trust bundle in files only that UID can read. The sidecar
//! stops before the namespace goes.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use anyhow::{Context, bail, ensure};

use super::command::{program_argv, text};
use super::control_plane::{ControlPlane, spiffe_id};
use super::host::Host;
use super::lab::Lab;
use super::{ADMIN_PORT, INBOUND_PORT, PROXY_UID, START_PATIENCE};
use crate::binaries::Program;
use crate::metrics::Metrics;
use crate::patience::eventually;
use crate::process::ChildProcess;

/// What a pod's sidecar proves its identity with for its first certificate.
#[derive(Clone, Debug, Default)]
pub enum Credential {
    /// A join token for [`spiffe_id`]`(host label)`, made with `trellisctl
    /// token create`.
    #[default]
    JoinToken,
    /// A Kubernetes ServiceAccount token (`--token-type service-account`)
    /// for `identity`, which the control plane reviews.
    ServiceAccountToken { identity: String, token: String },
}

/// A pod: its host, where `trellis-proxy init` ran, and its sidecar running
/// as [`PROXY_UID`]. The sidecar stops before the namespace goes.
#[derive(Debug)]
pub struct Pod {
    sidecar: ChildProcess,
    host: Host,
    identity: String,
}

impl Pod {
    /// Runs `init INIT_ARGS` on `host`, then the sidecar of identity
    /// [`spiffe_id`]`(host label)`: inbound and outbound on the defaults
    /// (`0.0.0.0:15006` and `[::]:15006`, `127.0.0.1:15001` and
    /// `[::1]:15001`), admin `0.0.0.0:15020`, advertising
    /// `<host IPv4 address>:15006` and, when the host has one,
    /// `[<host IPv6 address>]:15006`; waits until `/ready` answers 200.
    pub async fn start(
        lab: &Lab,
        host: Host,
        control_plane: &ControlPlane,
        init_args: &[&str],
    ) -> anyhow::Result<Pod> {
        Pod::start_with(
            lab,
            host,
            control_plane,
            init_args,
            &Credential::JoinToken,
            &[],
        )
        .await
    }

    /// Like [`Pod::start`], the sidecar proving its identity with
    /// `credential` and given `sidecar_args` besides its own.
    pub async fn start_with(
        lab: &Lab,
        host: Host,
        control_plane: &ControlPlane,
        init_args: &[&str],
        credential: &Credential,
        sidecar_args: &[&str],
    ) -> anyhow::Result<Pod> {
        host.init_ok(lab.launcher(), init_args).await?;

        let (identity, token, token_type) = match credential {
            Credential::JoinToken => {
                let identity = spiffe_id(host.label());
                let token = control_plane.token(&identity).await?;
                (identity, token, "join")
            }
            Credential::ServiceAccountToken { identity, token } => {
                (identity.clone(), token.clone(), "service-account")
            }
        };
        // The sidecar's own files, readable by its UID only.
        let dir = lab.dir().join(format!("{}-sidecar", host.label()));
        std::fs::create_dir_all(&dir)?;
        let token_file = dir.join("token");
        let bundle = dir.join("bundle.pem");
        std::fs::write(&token_file, format!("{token}\n"))?;
        std::fs::copy(control_plane.bundle_path(), &bundle)?;
        for path in [&dir, &token_file, &bundle] {
            std::os::unix::fs::chown(path, Some(PROXY_UID), Some(PROXY_UID))?;
            let mode = if path.is_dir() { 0o700 } else { 0o600 };
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        }

        let mut argv = program_argv(lab.launcher(), Program::Proxy);
        let mut can_run = host
            .command_as(PROXY_UID, &argv[0])?
            .args(&argv[1..])
            .arg("--version")
            .output()?;
        if !can_run.status.success() {
            // The build directory may sit where other users cannot read it
            // (a home directory): run a copy from the lab's directory, which
            // every UID can traverse.
            let copy = lab.dir().join(format!("{}-trellis-proxy", host.label()));
            std::fs::copy(&argv[0], &copy)?;
            std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755))?;
            argv[0] = copy.into_os_string();
            can_run = host
                .command_as(PROXY_UID, &argv[0])?
                .args(&argv[1..])
                .arg("--version")
                .output()?;
        }
        ensure!(
            can_run.status.success(),
            "UID {PROXY_UID} cannot run {}: put the build directory where every user can \
             read it ({})",
            argv[0].to_string_lossy(),
            text(&can_run.stderr).trim()
        );
        let mut command = host.command_as(PROXY_UID, &argv[0])?;
        command
            .args(&argv[1..])
            .arg("--control-plane")
            .arg(control_plane.addr().to_string())
            .arg("--trust-bundle")
            .arg(&bundle)
            .args([
                "--identity",
                &identity,
                "--token-type",
                token_type,
                "--token-file",
            ])
            .arg(&token_file)
            .arg("--admin")
            .arg(format!("0.0.0.0:{ADMIN_PORT}"))
            .arg("--advertise-address")
            .arg(host.addr(INBOUND_PORT).to_string())
            .args(["--drain-timeout", "1s"])
            .args(sidecar_args);
        if let Some(ipv6) = host.ipv6() {
            command
                .arg("--advertise-address")
                .arg(SocketAddr::new(ipv6.into(), INBOUND_PORT).to_string());
        }
        let name = format!("{}-sidecar", host.label());
        let mut sidecar = ChildProcess::spawn(&name, command, &lab.log(&name))?;

        let ready = format!("http://127.0.0.1:{ADMIN_PORT}/ready");
        let what = format!("sidecar {name} to be ready");
        let waited = eventually(&what, START_PATIENCE, || {
            let running = sidecar.ensure_running();
            let host = &host;
            let ready = &ready;
            async move {
                running?;
                let reply = host.http_get(None, ready).await?;
                ensure!(
                    reply.status == 200,
                    "{}: {}",
                    reply.status,
                    reply.body.trim()
                );
                anyhow::Ok(())
            }
        })
        .await;
        if let Err(e) = waited {
            bail!(
                "{e:#}\nthe end of the log of {name}:\n{}",
                sidecar.log_tail(30)
            );
        }
        Ok(Pod {
            sidecar,
            host,
            identity,
        })
    }

    pub fn host(&self) -> &Host {
        &self.host
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Everything the sidecar logged so far.
    pub fn sidecar_log(&self) -> String {
        self.sidecar.log()
    }

    /// Waits until the sidecar logs a line containing every one of
    /// `needles`, and returns that line.
    pub async fn wait_for_sidecar_log(
        &mut self,
        needles: &[&str],
        patience: Duration,
    ) -> anyhow::Result<String> {
        let what = format!("{} to log a line with {needles:?}", self.sidecar.name());
        let sidecar = &mut self.sidecar;
        let found = eventually(&what, patience, || {
            let line = sidecar
                .log()
                .lines()
                .find(|l| needles.iter().all(|n| l.contains(n)))
                .map(str::to_string);
            let result = match (line, sidecar.try_exit_status()) {
                (Some(line), _) => Ok(line),
                (None, Some(status)) => Err(anyhow::anyhow!("it exited ({status})")),
                (None, None) => Err(anyhow::anyhow!("not yet")),
            };
            std::future::ready(result)
        })
        .await;
        found.with_context(|| {
            format!(
                "the end of the log of {}:\n{}",
                self.sidecar.name(),
                self.sidecar.log_tail(30)
            )
        })
    }

    /// The sidecar's `/metrics`, scraped from inside the pod.
    pub async fn metrics(&self) -> anyhow::Result<Metrics> {
        let url = format!("http://127.0.0.1:{ADMIN_PORT}/metrics");
        let reply = self.host.http_get(None, &url).await?;
        ensure!(reply.status == 200, "/metrics answered {}", reply.status);
        Ok(Metrics::parse(&reply.body))
    }
}
