//! A whole sidecar ([`trellis_proxy::Sidecar`]) in this process, configured
//! by its real flags against a [`FakeControlPlane`], plus log capture and
//! admin requests.

use std::cell::RefCell;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Once};

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
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

/// A trust bundle (a CA of its own) and a join token, as files that live
/// as long as the test process, for a sidecar that never reaches a control
/// plane: `--trust-bundle B --token-file T`.
pub fn credential_flags() -> [&'static str; 4] {
    static FILES: std::sync::OnceLock<(tempfile::TempDir, String, String)> =
        std::sync::OnceLock::new();
    let (_, bundle, token) = FILES.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let (bundle, token) = (dir.path().join("bundle.pem"), dir.path().join("token"));
        std::fs::write(&bundle, super::Ca::new().root_pem()).unwrap();
        std::fs::write(&token, TOKEN).unwrap();
        let path = |p: std::path::PathBuf| p.to_str().unwrap().to_owned();
        (dir, path(bundle), path(token))
    });
    ["--trust-bundle", bundle, "--token-file", token]
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
    install_log_capture();
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
///
/// One subscriber, the process's global one, serves every test and writes
/// each event to the capture of the thread it happens on, if that thread
/// has one. A subscriber set per thread instead made tracing's per-callsite
/// cache racy: a test that captured nothing could hit a callsite first and
/// have it cached as disabled, and another test's capture then missed the
/// sidecar's lines.
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

thread_local! {
    /// This thread's capture and whether it takes JSON lines.
    static CAPTURE: RefCell<Option<(Logs, bool)>> = const { RefCell::new(None) };
}

/// Writes for the global subscriber's layer of one format: to this
/// thread's capture when it asked for that format, nowhere otherwise.
struct ToCapture {
    json: bool,
}

struct CaptureWriter(Option<Logs>);

impl Write for CaptureWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(logs) = &self.0 {
            logs.0.lock().unwrap().extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for ToCapture {
    type Writer = CaptureWriter;

    fn make_writer(&'a self) -> CaptureWriter {
        CaptureWriter(CAPTURE.with(|c| {
            c.borrow()
                .as_ref()
                .filter(|(_, json)| *json == self.json)
                .map(|(logs, _)| logs.clone())
        }))
    }
}

/// Ends this thread's capture when dropped.
pub struct CaptureGuard(());

impl Drop for CaptureGuard {
    fn drop(&mut self) {
        CAPTURE.with(|c| c.borrow_mut().take());
    }
}

/// Sets the process's global subscriber that writes each event to its
/// thread's capture, once, before any test logs: every test that starts a
/// sidecar or a capture calls it.
pub fn install_log_capture() {
    static GLOBAL: Once = Once::new();
    GLOBAL.call_once(|| {
        let subscriber = tracing_subscriber::registry()
            .with(tracing_subscriber::filter::LevelFilter::INFO)
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(ToCapture { json: false }),
            )
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(ToCapture { json: true }),
            );
        tracing::subscriber::set_global_default(subscriber)
            .expect("no other global subscriber in the sidecar's tests");
    });
}

impl Logs {
    /// Captures text logs (`json`: JSON lines) at `info` and above.
    pub fn capture(json: bool) -> (Self, CaptureGuard) {
        install_log_capture();
        let logs = Logs::default();
        CAPTURE.with(|c| *c.borrow_mut() = Some((logs.clone(), json)));
        (logs, CaptureGuard(()))
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
