//! A whole sidecar ([`trellis_proxy::Sidecar`]) in this process, configured
//! by its real flags against a [`FakeControlPlane`], plus log capture and
//! admin requests.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tracing::subscriber::DefaultGuard;
use trellis_core::SpiffeId;
use trellis_proxy::config::{Cli, Config};
use trellis_proxy::metrics::Metrics;

use super::control_plane::{FakeControlPlane, TOKEN};
use super::id;

/// Every listener of a sidecar on a free loopback port, so that tests run
/// in parallel.
pub const LOOPBACK_LISTENERS: [&str; 6] = [
    "--inbound",
    "127.0.0.1:0",
    "--outbound",
    "127.0.0.1:0",
    "--admin",
    "127.0.0.1:0",
];

/// The configuration `trellis-proxy ARGS` stands for; the flags must be
/// valid.
pub fn config_from(args: &[&str]) -> Config {
    let argv = std::iter::once("trellis-proxy").chain(args.iter().copied());
    let cli = Cli::try_parse_from(argv).expect("valid flags");
    Config::from_args(&cli.proxy).expect("valid configuration")
}

/// A running sidecar; stopped (drained) when dropped.
pub struct TestSidecar {
    pub identity: SpiffeId,
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
    pub metrics: Arc<Metrics>,
    _dir: tempfile::TempDir,
    _stop: oneshot::Sender<()>,
}

/// Starts the sidecar `spiffe://td.test/ns/b/sa/api` for `app`, on free
/// loopback ports, with the flags `extra` added.
pub async fn sidecar(cp: &FakeControlPlane, app: SocketAddr, extra: &[&str]) -> TestSidecar {
    sidecar_as(cp, id("/ns/b/sa/api"), app, extra).await
}

/// Starts the sidecar `identity` for `app`, like [`sidecar`].
pub async fn sidecar_as(
    cp: &FakeControlPlane,
    identity: SpiffeId,
    app: SocketAddr,
    extra: &[&str],
) -> TestSidecar {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, cp.ca.root_pem()).unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let (identity_s, app_s) = (identity.to_string(), app.to_string());
    let mut args = vec![
        "--identity",
        &identity_s,
        "--control-plane",
        &cp.addr,
        "--trust-bundle",
        bundle.to_str().unwrap(),
        "--token-file",
        token.to_str().unwrap(),
    ];
    args.extend(LOOPBACK_LISTENERS);
    args.extend(["--app", &app_s, "--drain-timeout", "1s"]);
    args.extend_from_slice(extra);
    let config = config_from(&args);
    let sidecar = trellis_proxy::Sidecar::bind(config).await.unwrap();
    let inbound = sidecar.inbound_addr().unwrap();
    let admin = sidecar.admin_addr().unwrap();
    let metrics = sidecar.metrics();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(sidecar.run(async move {
        let _ = stopped.await;
        "test over"
    }));
    TestSidecar {
        identity,
        inbound,
        admin,
        metrics,
        _dir: dir,
        _stop: stop,
    }
}

impl TestSidecar {
    /// `GET path` on the admin port: the status line and the body.
    pub async fn get(&self, path: &str) -> String {
        let mut tcp = TcpStream::connect(self.admin).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        tcp.read_to_string(&mut response).await.unwrap();
        response
    }

    /// Whether `/metrics` has the sample `series value` exactly.
    pub fn has_sample(&self, series: &str, value: u64) -> bool {
        self.metrics
            .encode()
            .lines()
            .any(|line| line == format!("{series} {value}"))
    }
}

/// Everything logged on this thread while the guard lives. A
/// `#[tokio::test]` runs every task on the test's thread, so this sees the
/// sidecar's logs and no other test's.
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    /// Captures text logs (`json`: JSON lines) at `info` and above.
    pub fn capture(json: bool) -> (Self, DefaultGuard) {
        let logs = Logs::default();
        let buf = logs.0.clone();
        let builder = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || LogWriter(buf.clone()));
        let guard = if json {
            tracing::subscriber::set_default(builder.json().finish())
        } else {
            tracing::subscriber::set_default(builder.finish())
        };
        (logs, guard)
    }

    pub fn lines(&self) -> Vec<String> {
        let buf = self.0.lock().unwrap();
        String::from_utf8_lossy(&buf)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Waits for a line holding every one of `parts`; on timeout, fails
    /// showing every line logged.
    pub async fn wait_for(&self, parts: &[&str]) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Some(line) = self.find(parts) {
                return line;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no log line with {parts:?} in:\n{}",
                self.lines().join("\n")
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// The first line holding every one of `parts`.
    pub fn find(&self, parts: &[&str]) -> Option<String> {
        self.lines()
            .into_iter()
            .find(|line| parts.iter().all(|p| line.contains(p)))
    }
}
