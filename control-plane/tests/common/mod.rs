//! Shared pieces of the control plane's integration tests: the real binary as
//! a child process on free ports with its own temp state dir, gRPC clients
//! over real TLS, and CSRs made with rcgen.
#![allow(dead_code)]

pub mod connections;
pub mod logs;
#[path = "../../../tests/src/machine.rs"]
pub mod machine;
pub mod policy;
#[path = "../../../tests/src/ports.rs"]
pub mod ports;
pub mod raw_grpc;
pub mod replica;
pub mod serving;
pub mod webhook;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use trellis_control_plane::ctl::AdminCredentials;
use trellis_core::tls::{
    ExpectedServer, PROTOCOL_VERSIONS, SpiffeServerVerifier, provider, root_store,
};
use trellis_core::{SpiffeId, TrustDomain};
use trellis_proto::admin::v1::admin_client::AdminClient;
use trellis_proto::admin::v1::{
    CreateJoinTokenRequest, ListWorkloadsRequest, ListWorkloadsResponse, Workload,
};
use trellis_proto::discovery::v1::discovery_client::DiscoveryClient;
use trellis_proto::discovery::v1::watch_request::Kind;
use trellis_proto::discovery::v1::{Ack, Snapshot, Subscribe, WatchRequest};
use trellis_proto::identity::v1::identity_client::IdentityClient;
use trellis_proto::identity::v1::{CertifyRequest, CertifyResponse, certify_request::Proof};

pub const CP: &str = env!("CARGO_BIN_EXE_trellis-control-plane");
pub const CTL: &str = env!("CARGO_BIN_EXE_trellisctl");
pub const PATIENCE: Duration = Duration::from_secs(30);

/// An open Watch stream of one enrolled workload.
pub struct Watcher {
    pub acks: mpsc::Sender<WatchRequest>,
    pub snapshots: tonic::Streaming<Snapshot>,
}

/// How a simulated sidecar's Subscribe says it takes the endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Takes {
    /// All of them in every snapshot (a sidecar older than both flags).
    AllEndpoints,
    /// `endpoints_version`: none when they are those of a snapshot it holds.
    EndpointsVersion,
    /// `endpoints_version` and `endpoint_changes`: what changed since.
    EndpointChanges,
}

impl Watcher {
    pub async fn open(cp: &ControlPlane, svid: &Svid, inbound: &str) -> Self {
        Self::open_with(cp, svid, inbound, Takes::AllEndpoints).await
    }

    /// A stream whose Subscribe says how it takes the endpoints.
    pub async fn open_with(cp: &ControlPlane, svid: &Svid, inbound: &str, takes: Takes) -> Self {
        let subscribe = Subscribe {
            inbound_address: inbound.into(),
            last_version: 0,
            inbound_addresses: Vec::new(),
            accepts_endpoints_version: takes != Takes::AllEndpoints,
            accepts_endpoint_changes: takes == Takes::EndpointChanges,
            last_version_epoch: 0,
            warnings: Vec::new(),
            opaque_ports: Vec::new(),
        };
        Self::subscribe(cp, svid, subscribe).await.unwrap()
    }

    /// A stream of a sidecar that declares `opaque_ports` its own.
    pub async fn open_declaring(
        cp: &ControlPlane,
        svid: &Svid,
        inbound: &str,
        opaque_ports: &[u32],
    ) -> Result<Self, tonic::Status> {
        let subscribe = Subscribe {
            inbound_address: inbound.into(),
            opaque_ports: opaque_ports.to_vec(),
            ..Subscribe::default()
        };
        Self::subscribe(cp, svid, subscribe).await
    }

    /// A stream that begins with `subscribe`, or why the control plane
    /// refused it.
    pub async fn subscribe(
        cp: &ControlPlane,
        svid: &Svid,
        subscribe: Subscribe,
    ) -> Result<Self, tonic::Status> {
        let (acks, rx) = mpsc::channel(64);
        acks.send(WatchRequest {
            kind: Some(Kind::Subscribe(subscribe)),
        })
        .await
        .unwrap();
        let channel = trellis_core::grpc::connect(&cp.grpc, Arc::new(cp.client_config(Some(svid))))
            .await
            .unwrap();
        let snapshots = DiscoveryClient::new(channel)
            .watch(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(Self { acks, snapshots })
    }

    /// The next snapshot, not answered.
    pub async fn receive(&mut self) -> Snapshot {
        tokio::time::timeout(PATIENCE, self.snapshots.message())
            .await
            .expect("a snapshot in time")
            .unwrap()
            .expect("the stream stays open")
    }

    /// The next snapshot, acknowledged.
    pub async fn next(&mut self) -> Snapshot {
        let snapshot = self.receive().await;
        self.acks
            .send(WatchRequest {
                kind: Some(Kind::Ack(Ack {
                    version: snapshot.version,
                    warnings: Vec::new(),
                })),
            })
            .await
            .unwrap();
        snapshot
    }

    /// Answers every snapshot from now on, as a sidecar does, however long
    /// none comes: the stream stays open until the task is aborted.
    pub fn answer_all(mut self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            while let Ok(Some(snapshot)) = self.snapshots.message().await {
                let ack = WatchRequest {
                    kind: Some(Kind::Ack(Ack {
                        version: snapshot.version,
                        warnings: Vec::new(),
                    })),
                };
                if self.acks.send(ack).await.is_err() {
                    return;
                }
            }
        })
    }
}

/// Retries `f` until it returns `Some`, or panics naming `what` at the deadline.
pub fn eventually<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    eventually_within(PATIENCE, what, f)
}

/// [`eventually`] with a deadline of its own.
pub fn eventually_within<T>(patience: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + patience;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Like [`eventually`] for async checks, without blocking the runtime.
pub async fn eventually_async<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs the control plane with `--state-dir state` and `args`, which it
/// must refuse before touching anything: it exits with `code`, says `names`
/// once on stderr (returned), and leaves no state dir behind (no CA,
/// operator credential or database).
pub fn assert_refused_touching_nothing(
    state: &Path,
    args: &[&str],
    code: i32,
    names: &str,
) -> String {
    let mut child = Command::new(CP)
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .env_remove("TRELLIS_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read while it runs, so a start that goes on logging never blocks on
    // a full pipe; one that starts instead of being refused is stopped.
    let mut pipe = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = Vec::new();
        let _ = std::io::Read::read_to_end(&mut pipe, &mut text);
        text
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = String::from_utf8_lossy(&reader.join().unwrap()).into_owned();
            panic!("{args:?}: still running after 60 s, not refused: {stderr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = String::from_utf8_lossy(&reader.join().unwrap()).into_owned();
    assert_eq!(status.code(), Some(code), "{args:?}: {stderr}");
    assert_eq!(
        stderr.matches(names).count(),
        1,
        "{names:?} once in {stderr}"
    );
    assert!(!state.exists(), "{args:?} must not create the state dir");
    stderr
}

/// Starts the control plane on `state` (a state dir it made) on free ports,
/// with no other flag and neither `TRELLIS_LOG` nor `TRELLIS_NEW_ROOT` from
/// the environment, for a test expecting it to refuse. A start that serves
/// instead of refusing ends at the timeout (exit 124). Its exit code and
/// stderr.
pub fn refused_start(state: &Path) -> (Option<i32>, String) {
    let out = Command::new("timeout")
        .args(["60", CP])
        .arg("--state-dir")
        .arg(state)
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .env_remove("TRELLIS_LOG")
        .env_remove("TRELLIS_NEW_ROOT")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A temp dir holding a state dir with a generated CA and no database,
/// private as the control plane makes it, for a test to fill the database
/// of before [`ControlPlane::start_in`]: the temp dir, and the state dir in
/// it. The CA is there because a database that shows a mesh lived beside no
/// CA is refused at start (a lost root).
pub fn empty_state_dir() -> (Arc<tempfile::TempDir>, PathBuf) {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    use trellis_control_plane::ca::CertificateAuthority;
    use trellis_control_plane::ca::files::{CA_CERT, CA_KEY};
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let state = tmp.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    let td = trellis_core::TrustDomain::new("cluster.local").unwrap();
    let (_, cert_pem, key_pem) = CertificateAuthority::generate(&td).unwrap();
    std::fs::write(state.join(CA_CERT), cert_pem).unwrap();
    let mut key = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(state.join(CA_KEY))
        .unwrap();
    std::io::Write::write_all(&mut key, key_pem.as_bytes()).unwrap();
    (tmp, state)
}

/// A running control plane process.
pub struct ControlPlane {
    child: Child,
    pub tmp: Arc<tempfile::TempDir>,
    pub state_dir: PathBuf,
    pub grpc: String,
    pub admin: String,
    pub log: Arc<Mutex<String>>,
    /// The `control plane ready` line, naming the ports it serves.
    ready_line: String,
}

impl ControlPlane {
    pub fn start(extra: &[&str]) -> Self {
        let tmp = Arc::new(tempfile::tempdir().unwrap());
        Self::start_in(tmp, extra)
    }

    /// Starts on the state dir inside `tmp` (a restart when it exists); the
    /// gRPC API on a free IPv4 loopback port unless `extra` gives `--listen`.
    pub fn start_in(tmp: Arc<tempfile::TempDir>, extra: &[&str]) -> Self {
        Self::start_via(tmp, &[], None, extra)
    }

    /// [`Self::start_in`] through `via`, a command given the control
    /// plane's command line to exec (`nsenter -t PID -m --`: another mount
    /// namespace), with the state dir seen by the test at `state_seen_at`
    /// (`/proc/PID/root/...`) when that differs from its path.
    pub fn start_via(
        tmp: Arc<tempfile::TempDir>,
        via: &[&str],
        state_seen_at: Option<PathBuf>,
        extra: &[&str],
    ) -> Self {
        let state_dir = tmp.path().join("state");
        let mut command = match via.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(CP);
                command
            }
            None => Command::new(CP),
        };
        let mut child = command
            .arg("--state-dir")
            .arg(&state_dir)
            .args(if extra.contains(&"--listen") {
                &[][..]
            } else {
                &["--listen", "127.0.0.1:0"][..]
            })
            .args(["--admin", "127.0.0.1:0"])
            .args(extra)
            .env_remove("TRELLIS_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start trellis-control-plane");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let mut cp = Self {
            child,
            tmp,
            state_dir: state_seen_at.unwrap_or(state_dir),
            grpc: String::new(),
            admin: String::new(),
            log,
            ready_line: String::new(),
        };
        // A start opens and reads the whole store: one a test filled with
        // thousands of workloads takes longer on a loaded machine than
        // other waits may.
        let patience = PATIENCE * 4;
        cp.ready_line = eventually_within(
            patience,
            "the control plane to log `control plane ready`",
            || {
                if let Ok(Some(status)) = cp.child.try_wait() {
                    panic!("control plane exited with {status}:\n{}", cp.log());
                }
                cp.log()
                    .lines()
                    .find(|l| l.contains("control plane ready"))
                    .map(str::to_string)
            },
        );
        cp.grpc = cp.ready_field("grpc");
        cp.admin = cp.ready_field("admin");
        cp
    }

    /// The value of `name=VALUE` in the ready line: the address a port
    /// serves on, or `off`.
    pub fn ready_field(&self, name: &str) -> String {
        field(&self.ready_line, name)
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The whole log of a control plane that has exited (`log`, taken from
    /// it before it stopped): its reader may still be catching up, so this
    /// waits for the last line, `control plane stopped`.
    pub fn log_after_exit(log: &Mutex<String>) -> String {
        eventually("the last line of the log after exit", || {
            let text = log.lock().unwrap().clone();
            text.contains("control plane stopped").then_some(text)
        })
    }

    /// Waits until the log holds a line that `matches` and returns it. The
    /// control plane writes its log from a thread of its own, so a line can
    /// land a moment after the answer to the call that logged it.
    pub fn wait_for_line(&self, what: &str, matches: impl Fn(&str) -> bool) -> String {
        eventually(what, || {
            self.log().lines().find(|l| matches(l)).map(str::to_string)
        })
    }

    pub fn port(&self) -> u16 {
        self.grpc.rsplit(':').next().unwrap().parse().unwrap()
    }

    pub fn bundle(&self) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_file_iter(self.state_dir.join("bundle.pem"))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// The process's id, to send it signals.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then waits for the exit.
    pub fn stop(mut self) -> ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        eventually("the control plane to exit", || {
            self.child.try_wait().unwrap()
        })
    }

    /// SIGKILL, as a power cut or the OOM killer ends it, from a shared
    /// reference (calls in flight may hold the others).
    pub fn kill_hard(&self) {
        let status = Command::new("kill")
            .args(["-KILL", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the control plane to exit by itself.
    pub fn exited(mut self) -> ExitStatus {
        eventually("the control plane to exit", || {
            self.child.try_wait().unwrap()
        })
    }

    /// [`Self::stop`] from async code: the runtime keeps running, so the
    /// test's own idle connections answer the server's graceful GOAWAY.
    pub async fn stop_async(self) -> ExitStatus {
        tokio::task::spawn_blocking(move || self.stop())
            .await
            .unwrap()
    }

    pub async fn admin_client(&self) -> AdminClient<Channel> {
        AdminCredentials::in_state_dir(&self.state_dir)
            .connect(&self.grpc)
            .await
            .expect("admin connects")
    }

    pub async fn token(&self, id: &str, ttl_seconds: u64) -> String {
        let mut admin = self.admin_client().await;
        admin
            .create_join_token(CreateJoinTokenRequest {
                spiffe_id: id.into(),
                ttl_seconds,
            })
            .await
            .expect("token created")
            .into_inner()
            .token
    }

    pub async fn workloads(&self) -> Vec<Workload> {
        self.list_workloads().await.workloads
    }

    /// ListWorkloads' whole answer: the workloads and the version served.
    pub async fn list_workloads(&self) -> ListWorkloadsResponse {
        let mut admin = self.admin_client().await;
        admin
            .list_workloads(ListWorkloadsRequest::default())
            .await
            .unwrap()
            .into_inner()
    }

    /// A TLS client config trusting this control plane, optionally presenting
    /// a client certificate.
    pub fn client_config(&self, identity: Option<&Svid>) -> ClientConfig {
        let roots = root_store(&self.bundle()).unwrap();
        let td = TrustDomain::new("cluster.local").unwrap();
        let verifier =
            SpiffeServerVerifier::new(roots, ExpectedServer::Exact(SpiffeId::control_plane(&td)));
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(PROTOCOL_VERSIONS)
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier));
        let config = match identity {
            Some(svid) => builder
                .with_client_auth_cert(svid.chain.clone(), svid.key_der())
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        trellis_core::grpc::with_h2_alpn(config)
    }

    pub async fn identity_client(&self, identity: Option<&Svid>) -> IdentityClient<Channel> {
        let channel =
            trellis_core::grpc::connect(&self.grpc, Arc::new(self.client_config(identity)))
                .await
                .expect("connects to the control plane");
        IdentityClient::new(channel)
    }

    pub async fn certify(
        &self,
        csr: Vec<u8>,
        token: Option<&str>,
        identity: Option<&Svid>,
        inbound: &str,
    ) -> Result<CertifyResponse, tonic::Status> {
        let mut client = self.identity_client(identity).await;
        client
            .certify(CertifyRequest {
                csr,
                proof: token.map(|t| Proof::JoinToken(t.to_string())),
                inbound_address: inbound.into(),
                inbound_addresses: Vec::new(),
            })
            .await
            .map(|r| r.into_inner())
    }

    pub fn metrics(&self) -> String {
        let out = Command::new("curl")
            .args(["-sf", &format!("http://{}/metrics", self.admin)])
            .output()
            .expect("curl runs");
        assert!(out.status.success(), "GET /metrics failed");
        String::from_utf8(out.stdout).unwrap()
    }

    /// GET /ready on the admin port: the status and the body.
    pub fn ready(&self) -> (u16, String) {
        let out = Command::new("curl")
            .args(["-s", "-w", "\n%{http_code}"])
            .arg(format!("http://{}/ready", self.admin))
            .output()
            .expect("curl runs");
        let answer = String::from_utf8(out.stdout).unwrap();
        let (body, status) = answer.rsplit_once('\n').expect("a status line");
        (status.parse().expect("an HTTP status"), body.to_owned())
    }

    pub fn ctl(&self, args: &[&str]) -> std::process::Output {
        self.ctl_command(args).output().expect("trellisctl runs")
    }

    /// `trellisctl ARGS` against this control plane, not started yet.
    pub fn ctl_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(CTL);
        command
            .args(["--control-plane", &self.grpc, "--state-dir"])
            .arg(&self.state_dir)
            .args(args);
        command
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of `name=VALUE` in a log line, or of the key `name` in a
/// line of `--log-format json`.
fn field(line: &str, name: &str) -> String {
    if let Ok(serde_json::Value::Object(object)) = serde_json::from_str(line) {
        return match object.get(name) {
            Some(serde_json::Value::String(value)) => value.clone(),
            Some(value) => value.to_string(),
            None => panic!("no {name:?} in {line}"),
        };
    }
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name}= in {line:?}"))
        .to_string()
}

/// A workload key and, once certified, its chain.
pub struct Svid {
    pub key: KeyPair,
    pub chain: Vec<CertificateDer<'static>>,
}

impl Svid {
    /// The SVID a Certify answer issued for `key`.
    pub fn issued(key: KeyPair, response: CertifyResponse) -> Self {
        Self {
            key,
            chain: response
                .chain
                .into_iter()
                .map(CertificateDer::from)
                .collect(),
        }
    }

    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()))
    }
}

/// An SVID for `id` from Certify with `proof`, the sidecar reporting
/// `addresses` (the first as `inbound_address`).
pub async fn certify_with(
    cp: &ControlPlane,
    id: &str,
    proof: Proof,
    addresses: &[&str],
) -> Result<Svid, tonic::Status> {
    let key = p256();
    let response = cp
        .identity_client(None)
        .await
        .certify(CertifyRequest {
            csr: csr_for(&key, id),
            proof: Some(proof),
            inbound_address: addresses.first().map(|a| a.to_string()).unwrap_or_default(),
            inbound_addresses: addresses.iter().map(|a| a.to_string()).collect(),
        })
        .await?
        .into_inner();
    Ok(Svid::issued(key, response))
}

/// The workload `id` in a ListWorkloads answer.
pub fn listed<'a>(answer: &'a ListWorkloadsResponse, id: &str) -> &'a Workload {
    answer
        .workloads
        .iter()
        .find(|w| w.spiffe_id == id)
        .unwrap_or_else(|| panic!("{id} not listed in {answer:?}"))
}

pub fn p256() -> KeyPair {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
}

pub fn uri(id: &str) -> SanType {
    SanType::URI(id.try_into().unwrap())
}

/// A DER CSR with these SANs, signed by `key`.
pub fn csr_with(key: &KeyPair, sans: Vec<SanType>) -> Vec<u8> {
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    params.serialize_request(key).unwrap().der().to_vec()
}

pub fn csr_for(key: &KeyPair, id: &str) -> Vec<u8> {
    csr_with(key, vec![uri(id)])
}

/// Certifies `id` with a fresh key and token; returns the SVID.
pub async fn enroll(cp: &ControlPlane, id: &str, inbound: &str) -> Svid {
    let token = cp.token(id, 0).await;
    let key = p256();
    let response = cp
        .certify(csr_for(&key, id), Some(&token), None, inbound)
        .await
        .expect("certify with a fresh token");
    Svid::issued(key, response)
}

pub fn issued_total(metrics: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("trellis_certificates_issued_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("metrics have trellis_certificates_issued_total")
}

pub fn write_pem(path: &Path, der: &[u8]) {
    std::fs::write(
        path,
        trellis_control_plane::ca::der_to_pem(&CertificateDer::from(der.to_vec())),
    )
    .unwrap();
}

/// Waits for the wall clock, which is what ages a certificate, to reach
/// `unix` seconds.
pub async fn until(unix: i64) {
    let at = std::time::UNIX_EPOCH + Duration::from_secs(unix as u64);
    if let Ok(left) = at.duration_since(std::time::SystemTime::now()) {
        tokio::time::sleep(left).await;
    }
}

/// Asserts that `report`, what `trellisctl check` printed, fails `id` for
/// not renewing its certificate issued at `issued` that expires at
/// `expires` (Unix seconds), whatever the overdue time it names.
pub fn assert_renewal_overdue(report: &str, id: &str, issued: i64, expires: i64) {
    let written = |unix: i64| {
        humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(unix as u64))
    };
    let (start, end) = (
        format!(
            "FAIL  {id} is connected, but has not renewed its certificate: the newest, issued \
             at {}, was due for renewal at half its life, ",
            written(issued)
        ),
        format!(
            " ago, and expires at {}, when its peers refuse it (see its sidecar's log and \
             trellis_certificate_renewals_total{{outcome=\"error\"}}, and the control plane's \
             trellis_certify_failures_total)",
            written(expires)
        ),
    );
    assert!(
        report
            .lines()
            .any(|line| line.starts_with(&start) && line.ends_with(&end)),
        "no {start:?}...{end:?} in\n{report}"
    );
}

/// Asserts that `body`, a replica's `/ready` answer, says it stays ready
/// serving the policies last seen: `kind`'s watch failing, and no peer
/// replica healthy.
pub fn assert_serving_stale(body: &str, kind: &str) {
    assert!(body.starts_with("ready, serving stale: "), "{body}");
    assert!(
        body.contains(&format!("the {kind} watch has been failing for")),
        "{body}"
    );
    assert!(
        body.contains("no peer replica answers as healthy, so this one stays ready"),
        "{body}"
    );
}
