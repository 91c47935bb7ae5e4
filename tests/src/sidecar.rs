//! Sidecars: `trellis-proxy` run as a real child process with a join token
//! file, free loopback ports for its inbound, outbound and admin listeners
//! and for the local end of each route, started and awaited until `/ready`.

use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::admin::Admin;
use crate::binaries::Program;
use crate::mesh::{MeshContext, START_PATIENCE, StartError};
use crate::metrics::Metrics;
use crate::patience::eventually;
use crate::ports::{free_addrs, log_says_address_in_use, preferred_or_free};
use crate::process::{ChildProcess, STOP_GRACE};

/// How many times a start is retried with fresh ports when a port was taken.
const START_ATTEMPTS: usize = 3;

/// An explicit outbound route: plaintext on `local`, mTLS to `remote`, which
/// must present `spiffe_id`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub local: SocketAddr,
    pub spiffe_id: String,
    pub remote: SocketAddr,
}

impl Route {
    /// The `--route` value: `LOCAL=SPIFFE_ID@REMOTE`.
    pub fn flag_value(&self) -> String {
        format!("{}={}@{}", self.local, self.spiffe_id, self.remote)
    }
}

#[derive(Clone, Debug)]
struct RouteSpec {
    local: Option<SocketAddr>,
    spiffe_id: String,
    remote: SocketAddr,
}

/// The settings of one sidecar; see [`crate::Mesh::sidecar`].
#[derive(Clone, Debug)]
pub struct SidecarBuilder {
    context: Arc<MeshContext>,
    name: String,
    identity: Option<String>,
    app: Option<SocketAddr>,
    routes: Vec<RouteSpec>,
    preferred: Option<[SocketAddr; 3]>,
    unchecked: bool,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    token_file: Option<PathBuf>,
}

impl SidecarBuilder {
    pub(crate) fn new(context: Arc<MeshContext>, name: &str) -> SidecarBuilder {
        SidecarBuilder {
            context,
            name: name.to_string(),
            identity: None,
            app: None,
            routes: Vec::new(),
            preferred: None,
            unchecked: false,
            args: Vec::new(),
            env: Vec::new(),
            token_file: None,
        }
    }

    /// The join token file the sidecar proves, as it is (default: one
    /// holding a token made for the sidecar's identity).
    pub fn token_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.token_file = Some(path.into());
        self
    }

    /// The SPIFFE ID (default `spiffe://<td>/ns/default/sa/<name>`).
    pub fn identity(mut self, spiffe_id: &str) -> Self {
        self.identity = Some(spiffe_id.to_string());
        self
    }

    /// The local app the inbound side forwards to (default: a free port
    /// nobody listens on, for a sidecar that only calls out).
    pub fn app(mut self, addr: SocketAddr) -> Self {
        self.app = Some(addr);
        self
    }

    /// A route to `remote` expecting `spiffe_id`, on a free local port.
    pub fn route(mut self, spiffe_id: &str, remote: SocketAddr) -> Self {
        self.routes.push(RouteSpec {
            local: None,
            spiffe_id: spiffe_id.to_string(),
            remote,
        });
        self
    }

    /// A route to another sidecar of the mesh, expecting its identity.
    pub fn route_to(self, server: &Sidecar) -> Self {
        let (id, addr) = (server.identity().to_string(), server.inbound_addr());
        self.route(&id, addr)
    }

    /// A route on `local` if that port is free (a free one otherwise).
    pub fn route_at(mut self, local: SocketAddr, spiffe_id: &str, remote: SocketAddr) -> Self {
        self.routes.push(RouteSpec {
            local: Some(local),
            spiffe_id: spiffe_id.to_string(),
            remote,
        });
        self
    }

    /// Inbound, outbound and admin addresses to use if they are free.
    pub fn preferred_addrs(
        mut self,
        inbound: SocketAddr,
        outbound: SocketAddr,
        admin: SocketAddr,
    ) -> Self {
        self.preferred = Some([inbound, outbound, admin]);
        self
    }

    /// Tries the addresses of [`Self::preferred_addrs`] first without
    /// checking that they are free: as when another program takes one
    /// between the check and the sidecar's bind (two meshes on one host
    /// starting at once).
    pub fn preferred_unchecked(mut self) -> Self {
        self.unchecked = true;
        self
    }

    /// An extra command-line argument.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// An extra environment variable.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Makes a join token (unless given a token file), starts the sidecar
    /// and waits until `/ready`.
    pub async fn start(self) -> anyhow::Result<Sidecar> {
        let mut last_error = None;
        for attempt in 0..START_ATTEMPTS {
            match self.try_start(attempt).await {
                Ok(sidecar) => return Ok(sidecar),
                Err(StartError::PortTaken(e)) => last_error = Some(e),
                Err(StartError::Failed(e)) => return Err(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("sidecar {} did not start", self.name)))
    }

    /// Starts the sidecar without waiting for it to be ready (for one that
    /// is not to be, such as one the control plane refuses).
    pub async fn spawn(self) -> anyhow::Result<ChildProcess> {
        Ok(self.spawn_attempt(0).await?.process)
    }

    async fn try_start(&self, attempt: usize) -> Result<Sidecar, StartError> {
        let mut sidecar = self
            .spawn_attempt(attempt)
            .await
            .map_err(StartError::Failed)?;
        let admin = sidecar.admin;
        let process = &mut sidecar.process;
        let admin_client = Admin::new(admin);
        let what = format!("sidecar {} to be ready", self.name);
        let waited = eventually(&what, START_PATIENCE, || {
            let running = process.ensure_running();
            let ours = process.ensure_listening(admin);
            async move {
                // One that exited will not become ready: stop waiting.
                if let Err(exited) = running {
                    return Ok(Err(exited));
                }
                admin_client.ready().await?;
                ours.map(Ok)
            }
        })
        .await
        .and_then(|ready| ready);
        if let Err(e) = waited {
            let _ = process.stop(STOP_GRACE);
            let e = e.context(format!(
                "sidecar {} did not become ready; the end of its log ({}):\n{}",
                self.name,
                process.log_path().display(),
                process.log_tail(30)
            ));
            return Err(if log_says_address_in_use(&process.log()) {
                StartError::PortTaken(e)
            } else {
                StartError::Failed(e)
            });
        }
        Ok(sidecar)
    }

    /// Spawns the sidecar with fresh ports (its preferred ones on the first
    /// `attempt`) and, unless it was given one, a join token file; it is not
    /// yet known to be ready.
    async fn spawn_attempt(&self, attempt: usize) -> anyhow::Result<Sidecar> {
        let ctx = &self.context;
        let identity = self.identity.clone().unwrap_or_else(|| {
            format!("spiffe://{}/ns/default/sa/{}", ctx.trust_domain, self.name)
        });
        let mut free = free_addrs(4 + self.routes.len()).into_iter();
        let mut next_free = || free.next().expect("enough free addresses were taken");
        let pick = |preferred: Option<SocketAddr>, free: SocketAddr| match (attempt, preferred) {
            (0, Some(addr)) if self.unchecked => addr,
            (0, Some(addr)) => preferred_or_free(addr),
            _ => free,
        };
        let inbound = pick(self.preferred.map(|p| p[0]), next_free());
        let outbound = pick(self.preferred.map(|p| p[1]), next_free());
        let admin = pick(self.preferred.map(|p| p[2]), next_free());
        let app = self.app.unwrap_or_else(&mut next_free);
        let routes: Vec<Route> = self
            .routes
            .iter()
            .map(|spec| Route {
                local: pick(spec.local, next_free()),
                spiffe_id: spec.spiffe_id.clone(),
                remote: spec.remote,
            })
            .collect();

        let token_file = match &self.token_file {
            Some(given) => given.clone(),
            None => {
                let token = ctx.token(&identity).await?;
                let made = ctx
                    .dir
                    .path()
                    .join(format!("{}-{attempt}.token", self.name));
                write_secret(&made, &token)?;
                made
            }
        };

        let mut command = ctx.command(Program::Proxy);
        command
            .arg("--control-plane")
            .arg(ctx.control_plane.to_string())
            .arg("--trust-bundle")
            .arg(ctx.state_dir.join("bundle.pem"))
            .arg("--identity")
            .arg(&identity)
            .arg("--token-file")
            .arg(&token_file)
            .arg("--inbound")
            .arg(inbound.to_string())
            .arg("--app")
            .arg(app.to_string())
            .arg("--outbound")
            .arg(outbound.to_string())
            .arg("--admin")
            .arg(admin.to_string());
        for route in &routes {
            command.arg("--route").arg(route.flag_value());
        }
        command.args(&self.args);
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        let log = ctx.dir.log(&format!("sidecar-{}", self.name));
        let label = format!("sidecar {}", self.name);
        let mut process = ChildProcess::spawn(&label, command, &log)?;
        process.set_tail_on_drop(ctx.tail_on_drop);
        Ok(Sidecar {
            name: self.name.clone(),
            identity,
            inbound,
            outbound,
            admin,
            app,
            routes,
            token_file,
            process,
            _context: self.context.clone(),
        })
    }
}

fn write_secret(path: &PathBuf, secret: &str) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(secret.as_bytes())?;
    Ok(())
}

/// A running sidecar. Dropping it stops it.
#[derive(Debug)]
pub struct Sidecar {
    name: String,
    identity: String,
    inbound: SocketAddr,
    outbound: SocketAddr,
    admin: SocketAddr,
    app: SocketAddr,
    routes: Vec<Route>,
    token_file: PathBuf,
    process: ChildProcess,
    // Keeps the mesh directory (logs, bundle) alive as long as the sidecar.
    _context: Arc<MeshContext>,
}

impl Sidecar {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its SPIFFE ID.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    pub fn inbound_addr(&self) -> SocketAddr {
        self.inbound
    }

    pub fn outbound_addr(&self) -> SocketAddr {
        self.outbound
    }

    pub fn app_addr(&self) -> SocketAddr {
        self.app
    }

    pub fn token_file(&self) -> &PathBuf {
        &self.token_file
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The local address of the first route that expects `spiffe_id`.
    pub fn route_addr(&self, spiffe_id: &str) -> SocketAddr {
        self.routes
            .iter()
            .find(|r| r.spiffe_id == spiffe_id)
            .map(|r| r.local)
            .unwrap_or_else(|| panic!("sidecar {} has no route to {spiffe_id}", self.name))
    }

    /// `GET path` through the route that expects `spiffe_id`, on a new
    /// connection.
    pub async fn get_via(
        &self,
        spiffe_id: &str,
        path: &str,
    ) -> anyhow::Result<crate::http::Response> {
        crate::http::get(self.route_addr(spiffe_id), path).await
    }

    pub fn admin(&self) -> Admin {
        Admin::new(self.admin)
    }

    pub async fn metrics(&self) -> anyhow::Result<Metrics> {
        self.admin().metrics().await
    }

    pub async fn config(&self) -> anyhow::Result<serde_json::Value> {
        self.admin().config().await
    }

    /// The serial number of the certificate it serves now, from `/config`
    /// (`certificate.serial`).
    pub async fn cert_serial(&self) -> anyhow::Result<String> {
        let config = self.config().await?;
        let serial = config
            .pointer("/certificate/serial")
            .and_then(serde_json::Value::as_str)
            .with_context(|| format!("no certificate.serial in /config: {config}"))?;
        Ok(serial.to_string())
    }

    /// How many renewals succeeded, from `/metrics`
    /// (`trellis_certificate_renewals_total{outcome="ok"}`; the first
    /// certificate counts too if the sidecar counts it).
    pub async fn renewals(&self) -> anyhow::Result<f64> {
        Ok(self
            .metrics()
            .await?
            .counter("trellis_certificate_renewals_total", &[("outcome", "ok")]))
    }

    /// Inbound TLS handshake failures so far, from `/metrics`
    /// (`trellis_handshake_failures_total{direction="inbound"}`).
    pub async fn inbound_handshake_failures(&self) -> anyhow::Result<f64> {
        Ok(self.metrics().await?.counter(
            "trellis_handshake_failures_total",
            &[("direction", "inbound")],
        ))
    }

    pub fn process(&mut self) -> &mut ChildProcess {
        &mut self.process
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Waits until its log contains `needle`; returns that line.
    pub async fn wait_for_log(
        &mut self,
        needle: &str,
        patience: Duration,
    ) -> anyhow::Result<String> {
        self.process.wait_for_log(needle, patience).await
    }

    /// Everything it has logged so far.
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// SIGTERM, then SIGKILL after a grace.
    pub fn stop(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        self.process.stop(STOP_GRACE)
    }
}

/// The first value of a field called `key`, searching nested objects and
/// arrays depth-first.
pub fn find_field<'a>(value: &'a serde_json::Value, key: &str) -> Option<&'a serde_json::Value> {
    match value {
        serde_json::Value::Object(map) => map
            .get(key)
            .or_else(|| map.values().find_map(|v| find_field(v, key))),
        serde_json::Value::Array(items) => items.iter().find_map(|v| find_field(v, key)),
        _ => None,
    }
}
