//! One host on the lab's bridge ([`Host`]) and the programs run on it by
//! the tests: an HTTP client ([`Host::http_get`]), `trellis-proxy init`, and
//! an unmodified app server ([`HttpServer`]). The mesh's own processes are
//! in `control_plane` and `pod`.

use std::ffi::OsStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Output};

use anyhow::{Context, ensure};

use super::command::{output, program_argv, text};
use super::namespace::Netns;
use super::tools::Tools;
use super::{APP_UID, REQUEST_TIMEOUT_SECS, START_PATIENCE};
use crate::binaries::{Launcher, Program};
use crate::process::ChildProcess;

/// One namespace joined to the lab's bridge.
#[derive(Debug)]
pub struct Host {
    pub(super) label: String,
    pub(super) netns: Netns,
    pub(super) ipv4: Ipv4Addr,
    pub(super) ipv6: Option<Ipv6Addr>,
    // The lab's working directory, where its apps' files and logs go.
    pub(super) dir: PathBuf,
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
        self.get(uid, &[], url).await
    }

    /// Like [`Host::http_get`] over HTTP/2 with prior knowledge (as
    /// plaintext gRPC clients speak it), as `uid`: `None` when curl is not
    /// installed (python3's client speaks only HTTP/1).
    pub async fn h2_get(&self, uid: u32, url: &str) -> anyhow::Result<Option<Reply>> {
        let tools = Tools::get().map_err(anyhow::Error::msg)?;
        if tools.curl.is_none() {
            return Ok(None);
        }
        let reply = self
            .get(Some(uid), &["--http2-prior-knowledge"], url)
            .await?;
        Ok(Some(reply))
    }

    /// `GET url`, with `curl_args` when curl is the client.
    async fn get(&self, uid: Option<u32>, curl_args: &[&str], url: &str) -> anyhow::Result<Reply> {
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
            ]);
            command.args(curl_args).arg(url);
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
