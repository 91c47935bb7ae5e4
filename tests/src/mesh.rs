//! A local mesh: one control plane, run as a real child process with its own
//! temporary state directory and free loopback ports, and the operator's
//! tools against it (`trellisctl`). Sidecars are added with
//! [`Mesh::sidecar`].

use std::ffi::{OsStr, OsString};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::admin::Admin;
use crate::binaries::{Launcher, Program};
use crate::patience::eventually;
use crate::ports::{free_addrs, log_says_address_in_use, preferred_or_free};
use crate::process::{ChildProcess, STOP_GRACE};
use crate::sidecar::SidecarBuilder;

/// How long a program may take to become ready.
pub const START_PATIENCE: Duration = Duration::from_secs(30);

/// How long one `trellisctl` command may take.
const CTL_TIMEOUT: Duration = Duration::from_secs(30);

/// How many times a start is retried with fresh ports when a port was taken.
const START_ATTEMPTS: usize = 3;

/// The working directory of a mesh: state, tokens and logs. Shared by the
/// mesh and its sidecars so it outlives the last of them.
#[derive(Debug)]
pub(crate) struct MeshDir {
    // Removes the directory on drop; `None` when it is kept.
    _owner: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl MeshDir {
    fn new() -> anyhow::Result<MeshDir> {
        let dir = tempfile::Builder::new().prefix("trellis-mesh-").tempdir()?;
        let path = dir.path().to_path_buf();
        std::fs::create_dir_all(path.join("logs"))?;
        // Kept for a post-mortem when asked to.
        let dir = if std::env::var_os("TRELLIS_TEST_KEEP").is_some() {
            let _ = dir.keep();
            None
        } else {
            Some(dir)
        };
        Ok(MeshDir { _owner: dir, path })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn log(&self, name: &str) -> PathBuf {
        self.path.join("logs").join(format!("{name}.log"))
    }
}

/// What every program of a mesh shares: how to run the binaries, the
/// directory, the trust domain and where the control plane listens.
#[derive(Debug)]
pub(crate) struct MeshContext {
    pub(crate) launcher: Launcher,
    pub(crate) dir: MeshDir,
    pub(crate) trust_domain: String,
    pub(crate) control_plane: SocketAddr,
    pub(crate) state_dir: PathBuf,
    pub(crate) tail_on_drop: bool,
}

impl MeshContext {
    pub(crate) fn command(&self, program: Program) -> Command {
        command(&self.launcher, program)
    }

    pub(crate) async fn ctl<I, S>(&self, args: I) -> anyhow::Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let (shown, output) = self.ctl_run(args).await?;
        if !output.status.success() {
            bail!(
                "{shown} failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Runs `trellisctl` as [`MeshContext::ctl`] does: the command as
    /// shown, and how it exited and what it printed, whatever the status.
    pub(crate) async fn ctl_run<I, S>(&self, args: I) -> anyhow::Result<(String, Output)>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut command = self.command(Program::Ctl);
        command
            .arg("--control-plane")
            .arg(self.control_plane.to_string())
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(args);
        let shown = format!("{command:?}");
        let run = tokio::process::Command::from(command)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(crate::patience::patience(CTL_TIMEOUT), run)
            .await
            .with_context(|| format!("{shown} did not finish"))?
            .with_context(|| format!("cannot run {shown}"))?;
        Ok((shown, output))
    }

    pub(crate) async fn token(&self, spiffe_id: &str) -> anyhow::Result<String> {
        let out = self
            .ctl(["token", "create", "--spiffe-id", spiffe_id])
            .await?;
        let token = out.trim();
        anyhow::ensure!(
            !token.is_empty() && !token.contains(char::is_whitespace),
            "`trellisctl token create` should print only the token, printed {out:?}"
        );
        Ok(token.to_string())
    }
}

/// A command for `program` without the caller's `TRELLIS_*` variables: each
/// is the twin of a flag and would change what the program does, and the
/// harness passes everything explicitly. `TRELLIS_LOG` (the log filter) is
/// kept, to debug a test.
fn command(launcher: &Launcher, program: Program) -> Command {
    let mut command = launcher.command(program);
    for (key, _) in std::env::vars_os() {
        let name = key.to_string_lossy();
        if name.starts_with("TRELLIS_") && name != "TRELLIS_LOG" {
            command.env_remove(key);
        }
    }
    command
}

/// Settings of a mesh's control plane.
#[derive(Clone, Debug)]
pub struct MeshBuilder {
    launcher: Option<Launcher>,
    trust_domain: String,
    cert_ttl: Duration,
    default_policy: Option<String>,
    outbound_policy: Option<String>,
    preferred_listen: Option<SocketAddr>,
    preferred_admin: Option<SocketAddr>,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    tail_on_drop: bool,
}

impl Default for MeshBuilder {
    fn default() -> Self {
        MeshBuilder {
            launcher: None,
            trust_domain: "cluster.local".to_string(),
            cert_ttl: Duration::from_secs(3600),
            // These tests are about identity and mTLS, not authorization:
            // every workload of the mesh may talk to every other.
            default_policy: Some("allow-mesh".to_string()),
            outbound_policy: None,
            preferred_listen: None,
            preferred_admin: None,
            args: Vec::new(),
            env: Vec::new(),
            tail_on_drop: true,
        }
    }
}

impl MeshBuilder {
    /// Runs the programs this way instead of the binaries beside the running
    /// executable.
    pub fn launcher(mut self, launcher: Launcher) -> Self {
        self.launcher = Some(launcher);
        self
    }

    pub fn trust_domain(mut self, trust_domain: &str) -> Self {
        self.trust_domain = trust_domain.to_string();
        self
    }

    /// The lifetime of every certificate the control plane issues.
    pub fn cert_ttl(mut self, ttl: Duration) -> Self {
        self.cert_ttl = ttl;
        self
    }

    /// `--default-policy`; `None` leaves the control plane's own default.
    pub fn default_policy(mut self, policy: Option<&str>) -> Self {
        self.default_policy = policy.map(str::to_string);
        self
    }

    /// `--outbound-policy`; `None` leaves the control plane's own default.
    pub fn outbound_policy(mut self, policy: Option<&str>) -> Self {
        self.outbound_policy = policy.map(str::to_string);
        self
    }

    /// Listens on these addresses when they are free (otherwise on free
    /// ones): gRPC and admin.
    pub fn preferred_addrs(mut self, listen: SocketAddr, admin: SocketAddr) -> Self {
        self.preferred_listen = Some(listen);
        self.preferred_admin = Some(admin);
        self
    }

    /// An extra command-line argument for the control plane.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// An extra environment variable for the control plane.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Whether stopping a program prints the end of its log to stderr (on by
    /// default for tests, where libtest shows it only when a test fails; off
    /// for the demo).
    pub fn log_tails_on_drop(mut self, on: bool) -> Self {
        self.tail_on_drop = on;
        self
    }

    /// Starts the control plane and waits until it is ready.
    pub async fn start(self) -> anyhow::Result<Mesh> {
        let launcher = match self.launcher.clone() {
            Some(launcher) => launcher,
            None => Launcher::from_build_dir()?,
        };
        let dir = MeshDir::new()?;
        let state_dir = dir.path().join("state");
        let mut last_error = None;
        for attempt in 0..START_ATTEMPTS {
            let (listen, admin) = match (attempt, self.preferred_listen, self.preferred_admin) {
                (0, Some(listen), Some(admin)) => {
                    (preferred_or_free(listen), preferred_or_free(admin))
                }
                _ => {
                    let addrs = free_addrs(2);
                    (addrs[0], addrs[1])
                }
            };
            let mut control_plane = ControlPlane {
                launcher: launcher.clone(),
                settings: self.clone(),
                listen,
                admin_addr: admin,
                state_dir: state_dir.clone(),
                log: dir.log("control-plane"),
                process: None,
            };
            match control_plane.start().await {
                Ok(()) => {
                    let context = Arc::new(MeshContext {
                        launcher,
                        dir,
                        trust_domain: self.trust_domain.clone(),
                        control_plane: listen,
                        state_dir,
                        tail_on_drop: self.tail_on_drop,
                    });
                    return Ok(Mesh {
                        control_plane,
                        context,
                    });
                }
                Err(StartError::PortTaken(e)) => last_error = Some(e),
                Err(StartError::Failed(e)) => return Err(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("the control plane did not start")))
    }
}

/// Why a start failed: a port another process took in the meantime (worth a
/// retry with fresh ports) or anything else.
pub(crate) enum StartError {
    PortTaken(anyhow::Error),
    Failed(anyhow::Error),
}

/// The control plane process of a mesh.
#[derive(Debug)]
pub struct ControlPlane {
    launcher: Launcher,
    settings: MeshBuilder,
    listen: SocketAddr,
    admin_addr: SocketAddr,
    state_dir: PathBuf,
    log: PathBuf,
    process: Option<ChildProcess>,
}

impl ControlPlane {
    async fn start(&mut self) -> Result<(), StartError> {
        let s = &self.settings;
        let mut command = command(&self.launcher, Program::ControlPlane);
        command
            .arg("--trust-domain")
            .arg(&s.trust_domain)
            .arg("--listen")
            .arg(self.listen.to_string())
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--cert-ttl")
            .arg(format!("{}s", s.cert_ttl.as_secs().max(1)))
            .arg("--admin")
            .arg(self.admin_addr.to_string());
        if let Some(policy) = &s.default_policy {
            command.arg("--default-policy").arg(policy);
        }
        if let Some(policy) = &s.outbound_policy {
            command.arg("--outbound-policy").arg(policy);
        }
        command.args(&s.args);
        command.envs(s.env.iter().map(|(k, v)| (k, v)));
        let mut process =
            ChildProcess::spawn("control-plane", command, &self.log).map_err(StartError::Failed)?;
        process.set_tail_on_drop(s.tail_on_drop);

        let admin = Admin::new(self.admin_addr);
        let bundle = self.state_dir.join("bundle.pem");
        let waited = eventually("the control plane to be ready", START_PATIENCE, || {
            let running = process.ensure_running();
            let ours = process.ensure_listening(admin.addr());
            let bundle = bundle.clone();
            async move {
                // One that exited will not become ready: stop waiting.
                if let Err(exited) = running {
                    return Ok(Err(exited));
                }
                anyhow::ensure!(bundle.is_file(), "{} does not exist yet", bundle.display());
                admin.ready().await?;
                ours.map(Ok)
            }
        })
        .await
        .and_then(|ready| ready);
        match waited {
            Ok(()) => {
                self.process = Some(process);
                Ok(())
            }
            Err(e) => {
                let _ = process.stop(STOP_GRACE);
                let log = process.log();
                let e = e.context(format!(
                    "the control plane did not become ready; the end of its log ({}):\n{}",
                    process.log_path().display(),
                    process.log_tail(30)
                ));
                if log_says_address_in_use(&log) {
                    Err(StartError::PortTaken(e))
                } else {
                    Err(StartError::Failed(e))
                }
            }
        }
    }

    pub fn admin(&self) -> Admin {
        Admin::new(self.admin_addr)
    }

    pub fn process(&mut self) -> Option<&mut ChildProcess> {
        self.process.as_mut()
    }
}

/// A running local mesh. Dropping it stops the control plane; sidecars stop
/// when their own handles drop.
#[derive(Debug)]
pub struct Mesh {
    // Dropped first: the control plane stops while its directory exists.
    control_plane: ControlPlane,
    pub(crate) context: Arc<MeshContext>,
}

impl Mesh {
    /// A mesh with the default settings (trust domain `cluster.local`,
    /// 1 h certificates, default policy `allow-mesh`).
    pub async fn start() -> anyhow::Result<Mesh> {
        Mesh::builder().start().await
    }

    pub fn builder() -> MeshBuilder {
        MeshBuilder::default()
    }

    pub fn trust_domain(&self) -> &str {
        &self.context.trust_domain
    }

    /// `spiffe://<td>/ns/<namespace>/sa/<service_account>`.
    pub fn spiffe_id(&self, namespace: &str, service_account: &str) -> String {
        format!(
            "spiffe://{}/ns/{namespace}/sa/{service_account}",
            self.context.trust_domain
        )
    }

    /// The control plane's gRPC address.
    pub fn control_plane_addr(&self) -> SocketAddr {
        self.context.control_plane
    }

    pub fn control_plane_admin(&self) -> Admin {
        self.control_plane.admin()
    }

    pub fn control_plane(&mut self) -> &mut ControlPlane {
        &mut self.control_plane
    }

    /// The control plane's `--state-dir`.
    pub fn state_dir(&self) -> &Path {
        &self.context.state_dir
    }

    /// The trust bundle the control plane wrote (`<state-dir>/bundle.pem`).
    pub fn bundle_path(&self) -> PathBuf {
        self.context.state_dir.join("bundle.pem")
    }

    /// The mesh's working directory (state, tokens, logs).
    pub fn dir(&self) -> &Path {
        self.context.dir.path()
    }

    pub fn launcher(&self) -> &Launcher {
        &self.context.launcher
    }

    /// Stops the control plane (SIGTERM, then SIGKILL after a grace). The
    /// sidecars keep running.
    pub fn stop_control_plane(&mut self) -> anyhow::Result<()> {
        if let Some(mut process) = self.control_plane.process.take() {
            process.stop(STOP_GRACE)?;
        }
        Ok(())
    }

    /// Starts the control plane again on the same state directory and
    /// addresses, and waits until it is ready.
    pub async fn restart_control_plane(&mut self) -> anyhow::Result<()> {
        self.stop_control_plane()?;
        match self.control_plane.start().await {
            Ok(()) => Ok(()),
            Err(StartError::PortTaken(e) | StartError::Failed(e)) => Err(e),
        }
    }

    /// Like [`Mesh::restart_control_plane`], with `args` in place of the
    /// extra arguments it ran with ([`MeshBuilder::arg`]), for this start
    /// and the later ones: an operator restarting it with another CA, say.
    pub async fn restart_control_plane_with_args<I, S>(&mut self, args: I) -> anyhow::Result<()>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.control_plane.settings.args = args
            .into_iter()
            .map(|arg| arg.as_ref().to_owned())
            .collect();
        self.restart_control_plane().await
    }

    /// Runs `trellisctl --control-plane ADDR --state-dir DIR <args>` and
    /// returns its stdout; fails with its stderr unless it exits 0.
    pub async fn ctl<I, S>(&self, args: I) -> anyhow::Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.context.ctl(args).await
    }

    /// Runs `trellisctl` as [`Mesh::ctl`] does and returns how it exited
    /// and what it printed on stdout and stderr, whatever the status.
    pub async fn ctl_output<I, S>(&self, args: I) -> anyhow::Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Ok(self.context.ctl_run(args).await?.1)
    }

    /// A single-use join token for `spiffe_id`, made with the real
    /// `trellisctl token create`.
    pub async fn token(&self, spiffe_id: &str) -> anyhow::Result<String> {
        self.context.token(spiffe_id).await
    }

    /// `trellisctl workloads -o json`, parsed.
    pub async fn workloads(&self) -> anyhow::Result<serde_json::Value> {
        let out = self.ctl(["workloads", "-o", "json"]).await?;
        serde_json::from_str(&out)
            .with_context(|| format!("`trellisctl workloads -o json` printed no JSON: {out}"))
    }

    /// The entry of `spiffe_id` in `trellisctl workloads -o json`.
    pub async fn workload(&self, spiffe_id: &str) -> anyhow::Result<serde_json::Value> {
        let listed = self.workloads().await?;
        let list = listed.get("workloads").unwrap_or(&listed);
        list.as_array()
            .into_iter()
            .flatten()
            .find(|w| w["spiffe_id"] == spiffe_id)
            .cloned()
            .with_context(|| format!("{spiffe_id} is not listed in {listed}"))
    }

    /// A sidecar named `name` (identity `spiffe://<td>/ns/default/sa/<name>`
    /// unless set), to configure and start.
    pub fn sidecar(&self, name: &str) -> SidecarBuilder {
        SidecarBuilder::new(self.context.clone(), name)
    }
}
