//! Test fixtures: a throwaway CA made with rcgen, SVIDs it issues, an echo
//! app and a server-first one, and in-process listeners of the sidecar on
//! free loopback ports.
#![allow(dead_code)]

pub mod control_plane;
// Shared with the end-to-end tests, which serve the same gRPC app.
#[path = "../../../tests/src/grpc.rs"]
pub mod grpc;
pub mod http;
pub mod init;
pub mod injector;
#[path = "../../../tests/src/machine.rs"]
pub mod machine;
pub mod netns;
pub mod openssl;
#[path = "../../../tests/src/ports.rs"]
pub mod ports;
pub mod sidecar;

use std::net::SocketAddr;
use std::process::Child;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use trellis_core::{SpiffeId, TrustDomain};
use trellis_proxy::drain::{self, Drain, Shutdown};
use trellis_proxy::identity::Svid;
use trellis_proxy::inbound::{self, Inbound};
use trellis_proxy::metrics::Metrics;
use trellis_proxy::policy::Policies;
use trellis_proxy::tls::TlsState;

pub const TD: &str = "td.test";

pub fn id(path: &str) -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://{TD}{path}")).unwrap()
}

/// `ns/a/sa/web`, the caller most tests connect as and name in their
/// policies.
pub fn web() -> SpiffeId {
    id("/ns/a/sa/web")
}

pub fn td() -> TrustDomain {
    TrustDomain::new(TD).unwrap()
}

/// A throwaway root CA.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    pub fn new() -> Self {
        Self::with_params(CertificateParams::default())
    }

    /// A root that expires `lifetime` from now (valid since a minute ago).
    pub fn expiring_in(lifetime: time::Duration) -> Self {
        let mut params = CertificateParams::default();
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + lifetime;
        Self::with_params(params)
    }

    fn with_params(mut params: CertificateParams) -> Self {
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let mut dn = DistinguishedName::new();
        // Each CA gets its own name, as another mesh's CA would.
        dn.push(
            rcgen::DnType::CommonName,
            format!("test root {}", rand::random::<u64>()),
        );
        params.distinguished_name = dn;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        Ca {
            issuer: CertifiedIssuer::self_signed(params, key).unwrap(),
        }
    }

    pub fn root(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// Signs a CSR as it is (the caller sets the validity on `csr`).
    pub fn sign(&self, csr: &rcgen::CertificateSigningRequestParams) -> CertificateDer<'static> {
        csr.signed_by(&self.issuer).unwrap().der().clone()
    }

    pub fn root_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A leaf X.509-SVID for `id` and its PKCS#8 key.
    pub fn leaf(&self, id: &SpiffeId) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        self.leaf_valid_for(id, time::Duration::hours(1))
    }

    /// A leaf X.509-SVID for `id` that expires `lifetime` from now.
    pub fn leaf_valid_for(
        &self,
        id: &SpiffeId,
        lifetime: time::Duration,
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let (params, key) = Self::leaf_params(id, lifetime);
        self.signed_leaf(params, key)
    }

    /// A leaf for `id` as [`Ca::leaf`] makes one, its fields changed by
    /// `shape` first (to make it other than an X.509-SVID leaf).
    pub fn leaf_shaped(
        &self,
        id: &SpiffeId,
        shape: impl FnOnce(&mut CertificateParams),
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let (mut params, key) = Self::leaf_params(id, time::Duration::hours(1));
        shape(&mut params);
        self.signed_leaf(params, key)
    }

    /// The leaf `params` describe, for `key`, signed by this CA: its
    /// one-certificate chain and the key.
    fn signed_leaf(
        &self,
        params: CertificateParams,
        key: KeyPair,
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        (vec![cert.der().clone()], der)
    }

    /// A leaf for `id` signed by another leaf of this CA: the chain of both.
    pub fn leaf_under_leaf(
        &self,
        id: &SpiffeId,
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let (mut signer, signer_key) = Self::leaf_params(id, time::Duration::hours(1));
        signer
            .distinguished_name
            .push(rcgen::DnType::CommonName, "a leaf");
        let signer_cert = signer.signed_by(&signer_key, &self.issuer).unwrap();
        let signer = rcgen::Issuer::new(signer, signer_key);
        let (params, key) = Self::leaf_params(id, time::Duration::hours(1));
        let cert = params.signed_by(&key, &signer).unwrap();
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        (vec![cert.der().clone(), signer_cert.der().clone()], der)
    }

    fn leaf_params(id: &SpiffeId, lifetime: time::Duration) -> (CertificateParams, KeyPair) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id.as_str().try_into().unwrap())];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + lifetime;
        (params, key)
    }

    pub fn svid(&self, id: &SpiffeId) -> Svid {
        let (chain, key) = self.leaf(id);
        Svid::new(id, chain, key).unwrap()
    }

    /// An SVID of `id` holding `chain` and `key` as they are, without the
    /// checks of `Svid::new`, which refuses a leaf that peers refuse: what
    /// a sidecar would present had it taken such a leaf, for a test of how
    /// its peers answer.
    pub fn svid_as_is(
        id: &SpiffeId,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Svid {
        let (not_before, not_after) = trellis_core::tls::validity_of(&chain[0]).unwrap();
        let at = |secs: i64| std::time::UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64);
        let signing = trellis_core::tls::provider()
            .key_provider
            .load_private_key(key)
            .unwrap();
        Svid {
            id: id.clone(),
            certified: Arc::new(rustls::sign::CertifiedKey::new(chain, signing)),
            not_before: at(not_before),
            not_after: at(not_after),
            serial: "as-is".to_owned(),
        }
    }

    /// A TLS state as a sidecar holding `svid` and trusting this CA has.
    pub fn tls_state(&self, svid: &Svid, expected: &[SpiffeId]) -> Arc<TlsState> {
        Arc::new(TlsState::build(Some(svid), &[self.root()], &td(), expected).unwrap())
    }

    /// A plain rustls client presenting `client` (if any) and accepting any
    /// server chained to `roots`.
    pub fn client_config(&self, client: Option<(&Ca, &SpiffeId)>) -> Arc<rustls::ClientConfig> {
        self.client_config_presenting(client.map(|(ca, id)| ca.leaf(id)))
    }

    /// As [`Ca::client_config`], presenting `client`'s chain and key as
    /// they are.
    pub fn client_config_presenting(
        &self,
        client: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    ) -> Arc<rustls::ClientConfig> {
        let roots = trellis_core::tls::root_store(&[self.root()]).unwrap();
        let verifier = trellis_core::tls::SpiffeServerVerifier::new(
            roots,
            trellis_core::tls::ExpectedServer::AnyIn(td()),
        );
        let builder = rustls::ClientConfig::builder_with_provider(trellis_core::tls::provider())
            .with_protocol_versions(trellis_core::tls::PROTOCOL_VERSIONS)
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier));
        let config = match client {
            Some((chain, key)) => builder.with_client_auth_cert(chain, key).unwrap(),
            None => builder.with_no_client_auth(),
        };
        Arc::new(config)
    }
}

/// An app that echoes every byte and closes its write side at EOF. Counts
/// the connections it accepted.
pub struct EchoApp {
    pub addr: SocketAddr,
    pub accepted: watch::Receiver<usize>,
}

pub async fn echo_app() -> EchoApp {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, accepted) = watch::channel(0usize);
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            tx.send_modify(|n| *n += 1);
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    EchoApp { addr, accepted }
}

/// An app that speaks first (like SMTP), then echoes.
pub async fn banner_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                tcp.write_all(b"220 banner\r\n").await.unwrap();
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// A policy `b/<name>` protecting the sidecar under test (`ns/b/sa/api`)
/// with the one rule `rule` (a YAML flow mapping), loaded from the
/// operator's YAML as the control plane would.
pub fn api_policy(name: &str, action: &str, rule: &str) -> trellis_proto::policy::v1::Policy {
    let yaml = format!(
        "apiVersion: trellis.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: b}}
spec:
  selector: {{spiffeIds: [\"spiffe://{TD}/ns/b/sa/api\"]}}
  action: {action}
  rules:
    - {rule}
"
    );
    let loaded = trellis_core::policy::load_source("test.yaml", &yaml, &td());
    assert!(!loaded.has_errors(), "{:?}", loaded.diagnostics);
    loaded.policies[0].policy.to_proto()
}

/// A rate limit `b/<name>` on the sidecar under test (`ns/b/sa/api`):
/// each caller's requests to `path` get `rps` a second after a burst of
/// `burst`.
pub fn api_rate_limit(
    name: &str,
    rps: f64,
    burst: u32,
    path: &str,
) -> trellis_proto::policy::v1::RateLimit {
    use trellis_proto::policy::v1 as pb;
    pb::RateLimit {
        name: name.into(),
        namespace: "b".into(),
        selector: Some(pb::Selector {
            spiffe_ids: vec![format!("spiffe://{TD}/ns/b/sa/api")],
        }),
        requests_per_second: rps,
        burst,
        key: "source".into(),
        matches: vec![pb::RateLimitMatch {
            paths: vec![path.into()],
        }],
    }
}

/// Policies under which the mesh default `allow-mesh` lets every peer of
/// the test trust domain in: for tests about something other than policy.
pub fn allow_mesh(metrics: &Metrics) -> Arc<Policies> {
    let local = id("/ns/b/sa/server");
    let policies = Policies::compile(1, &local, "allow-mesh".into(), Vec::new(), metrics);
    Arc::new(policies.unwrap())
}

/// An inbound listener of a sidecar, running in this process.
pub struct TestInbound {
    pub addr: SocketAddr,
    pub tls: watch::Sender<Arc<TlsState>>,
    pub policies: watch::Sender<Option<Arc<Policies>>>,
    pub metrics: Arc<Metrics>,
    pub shutdown: Shutdown,
    pub drain: Drain,
}

/// An inbound listener under [`allow_mesh`] policies.
pub async fn inbound(app: SocketAddr, state: Arc<TlsState>) -> TestInbound {
    let metrics = Arc::new(Metrics::new());
    let policies = allow_mesh(&metrics);
    inbound_with(app, state, Some(policies), metrics).await
}

/// An inbound listener as [`inbound`], in front of `app`, serving as `id`
/// with an SVID of `ca`.
pub async fn inbound_as(ca: &Ca, id: &SpiffeId, app: SocketAddr) -> TestInbound {
    inbound(app, ca.tls_state(&ca.svid(id), &[])).await
}

/// An inbound listener under `policies` (`None`: no snapshot yet), closing
/// open connections that new policies deny.
pub async fn inbound_with(
    app: SocketAddr,
    state: Arc<TlsState>,
    policies: Option<Arc<Policies>>,
    metrics: Arc<Metrics>,
) -> TestInbound {
    inbound_limited(app, state, policies, metrics, Default::default()).await
}

/// An inbound listener like [`inbound_with`], with `handshakes` for its
/// limits on connections in their handshake phase.
pub async fn inbound_limited(
    app: SocketAddr,
    state: Arc<TlsState>,
    policies: Option<Arc<Policies>>,
    metrics: Arc<Metrics>,
    handshakes: inbound::Handshakes,
) -> TestInbound {
    let (tls, tls_rx) = watch::channel(state);
    let (policies, policies_rx) = watch::channel(policies);
    let (shutdown, drain) = drain::channel();
    let listener = Inbound::new(
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(inbound::Shared {
            app,
            own_ports: Vec::new(),
            pod_ips: Vec::new(),
            tls: tls_rx,
            policies: policies_rx,
            close_denied: true,
            opaque_ports: Vec::new(),
            user_timeout: Some(trellis_core::tcp::DEFAULT_USER_TIMEOUT),
            http: Arc::new(trellis_proxy::http::Http::new(metrics.clone())),
            metrics: metrics.clone(),
            handshakes,
            h2: Default::default(),
        }),
        drain.clone(),
    )
    .await
    .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(listener.run());
    TestInbound {
        addr,
        tls,
        policies,
        metrics,
        shutdown,
        drain,
    }
}

/// Connects with TLS to `addr`.
pub async fn tls_connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("test").unwrap(), tcp)
        .await
}

/// Writes `msg` as a line (a line end added unless it has one) and reads
/// the echo of it back, returned without the added line end; an error or
/// an early EOF is an `Err`.
pub async fn round_trip<S>(stream: &mut S, msg: &[u8]) -> std::io::Result<Vec<u8>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    // A client-first text protocol that pauses mid-line is taken for HTTP
    // (`http::detect`): the message goes as a whole line.
    let line = if msg.ends_with(b"\n") {
        msg.to_vec()
    } else {
        [msg, b"\n"].concat()
    };
    stream.write_all(&line).await?;
    stream.flush().await?;
    let mut buf = vec![0; line.len()];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut buf))
        .await
        .map_err(|_| std::io::Error::other("no answer within 10 s"))??;
    buf.truncate(msg.len());
    Ok(buf)
}

/// Reads until EOF or error, returning what was read; the connection being
/// refused shows as an empty result or an error.
pub async fn read_to_end<S>(stream: &mut S) -> std::io::Result<Vec<u8>>
where
    S: tokio::io::AsyncRead + Unpin,
{
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf))
        .await
        .map_err(|_| std::io::Error::other("connection still open after 10 s"))??;
    Ok(buf)
}

/// Polls `check` until it holds or the deadline passes.
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A process a test started; killed (by its own id) and reaped when
/// dropped, also when the test fails.
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sleeps until the wall clock is past `unix_secs` (a certificate's "not
/// after", which is inclusive and in whole seconds).
pub async fn past(unix_secs: i64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let until = Duration::from_secs(u64::try_from(unix_secs + 1).unwrap());
    if let Some(wait) = until.checked_sub(now) {
        tokio::time::sleep(wait + Duration::from_millis(50)).await;
    }
}

/// How a TCP connection ended, as the side reading it saw it.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// An orderly end (FIN) after these bytes.
    Fin(Vec<u8>),
    /// A reset after these bytes.
    Reset(Vec<u8>),
}

/// Reads `tcp` (a connection, or its read half) until it ends, within 5 s.
pub async fn read_end<R: tokio::io::AsyncRead + Unpin>(tcp: &mut R) -> End {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let read = tokio::time::timeout(std::time::Duration::from_secs(5), tcp.read(&mut buf))
            .await
            .expect("the connection neither ended nor was reset within 5 s");
        match read {
            Ok(0) => return End::Fin(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return End::Reset(got),
            Err(e) => panic!("reading: {e}"),
        }
    }
}
