//! A pod network made of Linux network namespaces, for the tests of
//! transparent interception: a `wire` namespace holding a bridge, and
//! [`Host`]s (pods, the control plane, a server outside the mesh), each a
//! namespace of its own joined to the bridge by a veth pair. On it run the
//! real binaries: the control plane ([`ControlPlane`]), and in each [`Pod`]
//! `trellis-proxy init` then the sidecar as UID 1337; the apps are
//! unmodified programs run as another UID (`python3 -m http.server`
//! ([`HttpServer`]), curl or python3 as the client ([`Host::http_get`])), and
//! a [`Capture`] records every frame crossing the bridge.
//!
//! Everything is made with `ip -n NS ...` and `ip netns exec NS ...`: nothing
//! touches the machine's own namespace, and the only addresses are
//! TEST-NET-1 (`192.0.2.0/24`) and a ULA prefix (`fd00:7e11::/64`), assigned
//! inside the namespaces. Names carry the process id and a counter, so tests
//! run in parallel.
//!
//! Needs root, iproute2, iptables, python3 and setpriv; [`unavailable`] says
//! which is missing (`skipped: needs root`, ...) so a test can print it and
//! pass. Every process is stopped by its pid when its handle drops, and every
//! namespace deleted when its handle drops, also when a test panics; the
//! handles' field order stops the processes of a namespace before it goes.

use std::ffi::{OsStr, OsString};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, bail, ensure};

use crate::binaries::{Launcher, Program};
use crate::metrics::Metrics;
use crate::patience::{eventually, patience};
use crate::process::ChildProcess;

/// The UID (and GID) the sidecars run as; `init` never redirects it.
pub const PROXY_UID: u32 = 1337;
/// The UID (and GID) the apps run as: neither root nor the proxy.
pub const APP_UID: u32 = 1000;
pub const INBOUND_PORT: u16 = 15006;
pub const OUTBOUND_PORT: u16 = 15001;
pub const ADMIN_PORT: u16 = 15020;
pub const CONTROL_PLANE_PORT: u16 = 15012;
/// The trust domain of the meshes made here.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// How long a program may take to start.
pub const START_PATIENCE: Duration = Duration::from_secs(30);
/// How long one short-lived command (a client, `init`, `trellisctl`) may run.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a client waits for an answer.
const REQUEST_TIMEOUT_SECS: u32 = 10;

// ---------------------------------------------------------------------------
// What the machine must have

/// The programs run inside the namespaces, found on `PATH`.
#[derive(Debug)]
pub struct Tools {
    pub setpriv: PathBuf,
    /// A python3 that [`APP_UID`] can run (a per-user install under a
    /// private home is skipped).
    pub python3: PathBuf,
    /// curl, when installed and runnable by [`APP_UID`]; python3 is the
    /// client otherwise.
    pub curl: Option<PathBuf>,
}

impl Tools {
    /// Found once per test process; the error names what is missing.
    pub fn get() -> Result<&'static Tools, String> {
        static TOOLS: OnceLock<Result<Tools, String>> = OnceLock::new();
        TOOLS
            .get_or_init(Tools::find)
            .as_ref()
            .map_err(Clone::clone)
    }

    fn find() -> Result<Tools, String> {
        let setpriv = on_path("setpriv")
            .into_iter()
            .find(|p| runs(p, &["--version"]))
            .ok_or("setpriv not installed")?;
        let by_app = |program: &str| {
            on_path(program).into_iter().find(|p| {
                Command::new(&setpriv)
                    .args(as_user_args(APP_UID))
                    .arg(p)
                    .arg("--version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            })
        };
        let python3 = by_app("python3").ok_or("python3 not installed")?;
        let curl = by_app("curl");
        Ok(Tools {
            setpriv,
            python3,
            curl,
        })
    }
}

/// Why the namespace tests cannot run here (`skipped: ...`, to print), or
/// `None` when they can.
pub fn unavailable() -> Option<String> {
    if !is_root() {
        return Some("skipped: needs root".into());
    }
    if !runs(Path::new("ip"), &["-V"]) {
        return Some("skipped: ip not installed".into());
    }
    let iptables = ["iptables-nft-save", "iptables-legacy-save"]
        .iter()
        .any(|p| runs(Path::new(p), &["--version"]));
    if !iptables {
        return Some("skipped: iptables not installed".into());
    }
    Tools::get()
        .err()
        .map(|missing| format!("skipped: {missing}"))
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            == Some("0")
    })
}

fn runs(program: &Path, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Every file called `program` in the directories of `PATH`, in order.
fn on_path(program: &str) -> Vec<PathBuf> {
    let Some(path) = std::env::var_os("PATH") else {
        return Vec::new();
    };
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .filter(|p| p.is_file())
        .collect()
}

fn as_user_args(uid: u32) -> [String; 4] {
    [
        format!("--reuid={uid}"),
        format!("--regid={uid}"),
        "--clear-groups".into(),
        "--".into(),
    ]
}

// ---------------------------------------------------------------------------
// Commands

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs a short command to the end; fails with its stderr unless it exits 0.
fn run_ok(command: &mut Command) -> anyhow::Result<Output> {
    let shown = format!("{command:?}");
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {shown}"))?;
    ensure!(
        output.status.success(),
        "{shown} failed ({}): {}{}",
        output.status,
        text(&output.stderr),
        text(&output.stdout)
    );
    Ok(output)
}

/// Runs a command to the end without blocking the runtime, killed after
/// [`COMMAND_TIMEOUT`]; returns its output whatever its exit status.
pub async fn output(command: Command) -> anyhow::Result<Output> {
    let shown = format!("{command:?}");
    let run = tokio::process::Command::from(command)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(patience(COMMAND_TIMEOUT), run)
        .await
        .with_context(|| format!("{shown} did not finish"))?
        .with_context(|| format!("cannot run {shown}"))
}

/// The program and leading arguments that run `program` with `launcher`.
fn program_argv(launcher: &Launcher, program: Program) -> Vec<OsString> {
    let command = launcher.command(program);
    std::iter::once(command.get_program().to_owned())
        .chain(command.get_args().map(OsStr::to_owned))
        .collect()
}

// ---------------------------------------------------------------------------
// Namespaces

/// A network namespace that exists while this value does.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// A new namespace `trellis-<pid>-<n>-<label>` with `lo` up.
    pub fn new(label: &str) -> anyhow::Result<Netns> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("trellis-{}-{n}-{label}", std::process::id());
        run_ok(Command::new("ip").args(["netns", "add", &name]))?;
        let netns = Netns { name };
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NS ARGS`, which must succeed.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        run_ok(Command::new("ip").arg("-n").arg(&self.name).args(args)).map(|_| ())
    }

    /// `ip netns exec NS PROGRAM`, as root, without the caller's `TRELLIS_*`
    /// and proxy variables (flags are passed explicitly; a web proxy would
    /// take the clients' requests elsewhere).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        for (key, _) in std::env::vars_os() {
            let name = key.to_string_lossy().to_ascii_lowercase();
            let trellis = name.starts_with("trellis_") && name != "trellis_log";
            if trellis || name.ends_with("_proxy") {
                command.env_remove(key);
            }
        }
        command
    }

    /// `program` inside the namespace as `uid` (and the same GID, no
    /// supplementary groups), through setpriv: `ip` itself needs root.
    pub fn command_as(&self, uid: u32, program: impl AsRef<OsStr>) -> anyhow::Result<Command> {
        let tools = Tools::get().map_err(anyhow::Error::msg)?;
        let mut command = self.command(&tools.setpriv);
        command.args(as_user_args(uid)).arg(program);
        Ok(command)
    }

    /// The nat table rules that mention Trellis chains, as every iptables
    /// backend that works here prints them (`iptables-nft-save`,
    /// `ip6tables-legacy-save`, ...), each line prefixed by the program.
    pub fn trellis_nat_rules(&self) -> String {
        let mut rules = String::new();
        for program in [
            "iptables-nft-save",
            "iptables-legacy-save",
            "ip6tables-nft-save",
            "ip6tables-legacy-save",
        ] {
            let Ok(out) = self.command(program).args(["-t", "nat"]).output() else {
                continue;
            };
            if !out.status.success() {
                continue;
            }
            for line in text(&out.stdout).lines() {
                if line.contains("TRELLIS") {
                    // Chain lines carry packet counters; keep name and policy.
                    let line = line.split(" [").next().unwrap_or(line);
                    rules.push_str(&format!("{program}: {line}\n"));
                }
            }
        }
        rules
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The bridge and the working directory every host of one test shares.
/// Drop it after its hosts and processes.
#[derive(Debug)]
pub struct Lab {
    wire: Netns,
    launcher: Launcher,
    path: PathBuf,
    // Logs and state, removed last (on drop) unless TRELLIS_TEST_KEEP is set.
    _dir: Option<tempfile::TempDir>,
}

/// The bridge in the `wire` namespace.
const BRIDGE: &str = "br0";

impl Lab {
    /// The `wire` namespace with its bridge up, and a working directory
    /// other UIDs can traverse (the pods' files are owned by their UIDs).
    pub fn new() -> anyhow::Result<Lab> {
        let launcher = Launcher::from_build_dir()?;
        let dir = tempfile::Builder::new()
            .prefix("trellis-netns-")
            .tempdir()?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let path = dir.path().to_path_buf();
        std::fs::create_dir(path.join("logs"))?;
        let dir = if std::env::var_os("TRELLIS_TEST_KEEP").is_some() {
            let _ = dir.keep();
            None
        } else {
            Some(dir)
        };
        let wire = Netns::new("wire")?;
        wire.ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        wire.ip(&["link", "set", BRIDGE, "up"])?;
        Ok(Lab {
            wire,
            launcher,
            path,
            _dir: dir,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.path
    }

    pub fn log(&self, name: &str) -> PathBuf {
        self.path.join("logs").join(format!("{name}.log"))
    }

    pub fn wire(&self) -> &Netns {
        &self.wire
    }

    pub fn launcher(&self) -> &Launcher {
        &self.launcher
    }

    /// A new host `label` on the bridge with `192.0.2.<index>/24` and, when
    /// the namespace has IPv6, `fd00:7e11::<index>/64`, on its `eth0`.
    pub fn host(&self, label: &str, index: u8) -> anyhow::Result<Host> {
        let port = format!("v-{label}");
        ensure!(port.len() <= 15, "host label {label:?} is too long");
        let netns = Netns::new(label)?;
        self.wire.ip(&[
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &netns.name,
        ])?;
        self.wire
            .ip(&["link", "set", &port, "master", BRIDGE, "up"])?;
        let ipv4 = Ipv4Addr::new(192, 0, 2, index);
        netns.ip(&["addr", "add", &format!("{ipv4}/24"), "dev", "eth0"])?;
        let ipv6 = Ipv6Addr::new(0xfd00, 0x7e11, 0, 0, 0, 0, 0, u16::from(index));
        // IPv6 may be off in the kernel: the host is then IPv4 only.
        let ipv6 = netns
            .ip(&["addr", "add", &format!("{ipv6}/64"), "dev", "eth0", "nodad"])
            .is_ok()
            .then_some(ipv6);
        netns.ip(&["link", "set", "eth0", "up"])?;
        Ok(Host {
            label: label.to_string(),
            netns,
            ipv4,
            ipv6,
            dir: self.path.clone(),
        })
    }

    /// Starts recording every frame that crosses the bridge.
    pub async fn capture(&self) -> anyhow::Result<Capture> {
        Capture::start(self).await
    }
}

/// One namespace joined to the lab's bridge.
#[derive(Debug)]
pub struct Host {
    label: String,
    netns: Netns,
    ipv4: Ipv4Addr,
    ipv6: Option<Ipv6Addr>,
    dir: PathBuf,
}

/// An HTTP answer as a client in a namespace received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

/// The HTTP client used when curl is not installed: prints the body, a
/// newline and the status; no web proxy.
const PYTHON_GET: &str = r#"
import sys, urllib.request, urllib.error
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    answer = opener.open(sys.argv[1], timeout=float(sys.argv[2]))
    status, body = answer.status, answer.read()
except urllib.error.HTTPError as e:
    status, body = e.code, e.read()
except Exception as e:
    sys.exit(f"{type(e).__name__}: {e}")
sys.stdout.buffer.write(body + b"\n" + str(status).encode())
"#;

impl Host {
    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    pub fn ipv4(&self) -> Ipv4Addr {
        self.ipv4
    }

    pub fn ipv6(&self) -> Option<Ipv6Addr> {
        self.ipv6
    }

    /// `ipv4:port`.
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ipv4), port)
    }

    /// A command inside this host's namespace, as root.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        self.netns.command(program)
    }

    /// A command inside this host's namespace, as `uid`.
    pub fn command_as(&self, uid: u32, program: impl AsRef<OsStr>) -> anyhow::Result<Command> {
        self.netns.command_as(uid, program)
    }

    /// `GET url` from inside the namespace with curl (python3 when curl is
    /// not installed), as `uid` (root when `None`). Fails when no HTTP answer
    /// came, with what the client said.
    pub async fn http_get(&self, uid: Option<u32>, url: &str) -> anyhow::Result<Reply> {
        let tools = Tools::get().map_err(anyhow::Error::msg)?;
        let mut command = match (&tools.curl, uid) {
            (Some(curl), Some(uid)) => self.command_as(uid, curl)?,
            (Some(curl), None) => self.command(curl),
            (None, Some(uid)) => self.command_as(uid, &tools.python3)?,
            (None, None) => self.command(&tools.python3),
        };
        if tools.curl.is_some() {
            command.args([
                "--noproxy",
                "*",
                "--silent",
                "--show-error",
                "--max-time",
                &REQUEST_TIMEOUT_SECS.to_string(),
                "--write-out",
                "\n%{http_code}",
                url,
            ]);
        } else {
            command
                .args(["-c", PYTHON_GET, url])
                .arg(REQUEST_TIMEOUT_SECS.to_string());
        }
        let out = output(command).await?;
        let stdout = text(&out.stdout);
        ensure!(
            out.status.success(),
            "GET {url} from {} got no answer ({}): {}",
            self.label,
            out.status,
            text(&out.stderr).trim()
        );
        let (body, status) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
        let status = status
            .trim()
            .parse()
            .with_context(|| format!("GET {url}: the client printed no status: {stdout:?}"))?;
        Ok(Reply {
            status,
            body: body.to_string(),
        })
    }

    /// Runs `trellis-proxy init ARGS` here, as root, and returns its output
    /// whatever its exit status.
    pub async fn init(&self, launcher: &Launcher, args: &[&str]) -> anyhow::Result<Output> {
        let argv = program_argv(launcher, Program::Proxy);
        let mut command = self.command(&argv[0]);
        command.args(&argv[1..]).arg("init").args(args);
        output(command).await
    }

    /// Like [`Host::init`], failing unless it exits 0.
    pub async fn init_ok(&self, launcher: &Launcher, args: &[&str]) -> anyhow::Result<String> {
        let out = self.init(launcher, args).await?;
        ensure!(
            out.status.success(),
            "trellis-proxy init {args:?} in {} failed ({}): {}{}",
            self.label,
            out.status,
            text(&out.stderr),
            text(&out.stdout)
        );
        Ok(text(&out.stdout))
    }

    /// Starts `python3 -m http.server PORT` here as [`APP_UID`] on IPv4
    /// (`0.0.0.0`), serving a directory whose `index.html` is `body`, and
    /// waits until it listens.
    pub async fn serve_http(&self, port: u16, body: &str) -> anyhow::Result<HttpServer> {
        self.serve_http_on(Ipv4Addr::UNSPECIFIED.into(), port, body)
            .await
    }

    /// Like [`Host::serve_http`], bound to `bind` (`::` serves IPv6 and
    /// IPv4 alike).
    pub async fn serve_http_on(
        &self,
        bind: IpAddr,
        port: u16,
        body: &str,
    ) -> anyhow::Result<HttpServer> {
        let tools = Tools::get().map_err(anyhow::Error::msg)?;
        let name = format!("{}-http-{port}", self.label);
        let root = self.dir.join(&name);
        std::fs::create_dir_all(&root)?;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755))?;
        std::fs::write(root.join("index.html"), body)?;
        std::fs::set_permissions(
            root.join("index.html"),
            std::fs::Permissions::from_mode(0o644),
        )?;
        let mut command = self.command_as(APP_UID, &tools.python3)?;
        command
            .args(["-u", "-m", "http.server", &port.to_string(), "--bind"])
            .arg(bind.to_string())
            .arg("--directory")
            .arg(&root);
        let log = self.dir.join("logs").join(format!("{name}.log"));
        let mut process = ChildProcess::spawn(&name, command, &log)?;
        process
            .wait_for_log("Serving HTTP", START_PATIENCE)
            .await
            .with_context(|| format!("{name} did not start"))?;
        Ok(HttpServer { process, port })
    }
}

/// `python3 -m http.server` in a namespace; stopped when dropped.
#[derive(Debug)]
pub struct HttpServer {
    process: ChildProcess,
    port: u16,
}

impl HttpServer {
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The request lines it logged (`CLIENT - - [date] "GET / HTTP/1.1" 200 -`).
    pub fn requests(&self) -> Vec<String> {
        self.process
            .log()
            .lines()
            .filter(|l| l.contains("\"GET ") || l.contains("\"POST "))
            .map(str::to_string)
            .collect()
    }
}

// ---------------------------------------------------------------------------
// The mesh in the namespaces

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
        host.init_ok(lab.launcher(), init_args).await?;

        let identity = spiffe_id(host.label());
        let token = control_plane.token(&identity).await?;
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
            .args(["--identity", &identity, "--token-file"])
            .arg(&token_file)
            .arg("--admin")
            .arg(format!("0.0.0.0:{ADMIN_PORT}"))
            .arg("--advertise-address")
            .arg(host.addr(INBOUND_PORT).to_string())
            .args(["--drain-timeout", "1s"]);
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

// ---------------------------------------------------------------------------
// Capture

/// Prints every frame the `wire` namespace receives (not the copies it
/// sends on), in hex, one per line, after a `ready` line.
const CAPTURE: &str = r#"
import socket
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
print("ready", flush=True)
while True:
    frame, address = s.recvfrom(65535)
    if address[2] != socket.PACKET_OUTGOING:
        print(frame.hex(), flush=True)
"#;

/// A raw packet capture on every port of the bridge (a python3 AF_PACKET
/// socket in the `wire` namespace); stopped when dropped.
#[derive(Debug)]
pub struct Capture {
    process: ChildProcess,
}

/// One TCP segment seen on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub payload: Vec<u8>,
}

impl Capture {
    async fn start(lab: &Lab) -> anyhow::Result<Capture> {
        let tools = Tools::get().map_err(anyhow::Error::msg)?;
        let mut command = lab.wire().command(&tools.python3);
        command.args(["-u", "-c", CAPTURE]);
        let mut process = ChildProcess::spawn("capture", command, &lab.log("capture"))?;
        // Its log is frames in hex: nothing worth printing.
        process.set_tail_on_drop(false);
        process.wait_for_log("ready", START_PATIENCE).await?;
        Ok(Capture { process })
    }

    /// Every TCP segment captured so far, in order.
    pub fn segments(&self) -> Vec<Segment> {
        self.process
            .log()
            .lines()
            .filter_map(decode_hex)
            .filter_map(|frame| tcp_segment(&frame))
            .collect()
    }
}

fn decode_hex(line: &str) -> Option<Vec<u8>> {
    let line = line.trim();
    if !line.len().is_multiple_of(2) || line.len() < 28 {
        return None;
    }
    (0..line.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(line.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The TCP segment in an Ethernet frame (IPv4, or IPv6 without extension
/// headers), if it holds one.
pub fn tcp_segment(frame: &[u8]) -> Option<Segment> {
    const TCP: u8 = 6;
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let ip = frame.get(14..)?;
    let (src, dst, tcp) = match ethertype {
        0x0800 => {
            let header_len = usize::from(ip.first()? & 0x0f) * 4;
            let total_len = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
            if *ip.get(9)? != TCP || header_len < 20 {
                return None;
            }
            let src: [u8; 4] = ip.get(12..16)?.try_into().ok()?;
            let dst: [u8; 4] = ip.get(16..20)?.try_into().ok()?;
            let tcp = ip.get(header_len..total_len.min(ip.len()))?;
            (IpAddr::from(src), IpAddr::from(dst), tcp)
        }
        0x86dd => {
            let payload_len = usize::from(u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?]));
            if *ip.get(6)? != TCP {
                return None;
            }
            let src: [u8; 16] = ip.get(8..24)?.try_into().ok()?;
            let dst: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
            let tcp = ip.get(40..(40 + payload_len).min(ip.len()))?;
            (IpAddr::from(src), IpAddr::from(dst), tcp)
        }
        _ => return None,
    };
    let src_port = u16::from_be_bytes([*tcp.first()?, *tcp.get(1)?]);
    let dst_port = u16::from_be_bytes([*tcp.get(2)?, *tcp.get(3)?]);
    let data_offset = usize::from(tcp.get(12)? >> 4) * 4;
    Some(Segment {
        src: SocketAddr::new(src, src_port),
        dst: SocketAddr::new(dst, dst_port),
        payload: tcp.get(data_offset..)?.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An Ethernet + IPv4 + TCP frame from 192.0.2.1:40000 to
    /// 192.0.2.2:8080 carrying `payload`, with Ethernet padding after it.
    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend([0x08, 0x00]);
        let total = 20 + 20 + payload.len();
        f.extend([
            0x45,
            0,
            (total >> 8) as u8,
            total as u8,
            0,
            0,
            0,
            0,
            64,
            6,
            0,
            0,
        ]);
        f.extend([192, 0, 2, 1, 192, 0, 2, 2]);
        f.extend(40000u16.to_be_bytes());
        f.extend(8080u16.to_be_bytes());
        f.extend([0; 8]);
        f.extend([0x50, 0x18, 0, 0, 0, 0, 0, 0]);
        f.extend(payload);
        f.extend([0; 6]);
        f
    }

    #[test]
    fn reads_tcp_segments_from_frames() {
        let f = frame(b"GET / HTTP/1.1\r\n");
        let hex: String = f.iter().map(|b| format!("{b:02x}")).collect();
        let decoded = decode_hex(&hex).unwrap();
        assert_eq!(decoded, f);
        let s = tcp_segment(&decoded).unwrap();
        assert_eq!(s.src, "192.0.2.1:40000".parse().unwrap());
        assert_eq!(s.dst, "192.0.2.2:8080".parse().unwrap());
        assert_eq!(s.payload, b"GET / HTTP/1.1\r\n");
        assert!(tcp_segment(&f[..20]).is_none());
        assert!(decode_hex("ready").is_none());
    }
}
