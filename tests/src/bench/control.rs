//! Control-plane scenarios against a real `trellis-control-plane` child
//! process, with simulated sidecars in this process (each its own key, CSR,
//! join token, SVID and TLS connection, as a real sidecar has):
//!
//! - issuance: certificates issued per second over gRPC by 64 concurrent
//!   clients (join tokens made beforehand in bulk through the Admin API),
//!   against raw rcgen signing of the same CSRs in this process;
//! - propagation: N simulated sidecars hold open `Discovery.Watch` streams;
//!   a policy selecting all of them is changed through `Admin.ApplyPolicy`,
//!   and the time from the call until each one has received a snapshot at
//!   or above the response's `snapshot_version` (the first version holding
//!   the write) and sent its ACK is recorded (p50, p99, max);
//! - reconnection: every simulated sidecar drops its connection and all
//!   come back at once (renew the certificate over mTLS, then Watch): the
//!   time until the last one holds a certificate and a snapshot.
//!
//! Only loopback addresses are used; every loop is bounded in count and
//! time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rcgen::{CertificateParams, CertificateSigningRequestParams, KeyPair, SanType};
use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{
    CertificateDer, CertificateSigningRequestDer, PrivateKeyDer, PrivatePkcs8KeyDer,
};
use tokio::sync::mpsc;
use tonic::transport::Channel;
use trellis_control_plane::ctl::AdminCredentials;
use trellis_core::tls::{ExpectedServer, PROTOCOL_VERSIONS, SpiffeServerVerifier, provider};
use trellis_core::{SpiffeId, TrustDomain};
use trellis_proto::admin::v1::admin_client::AdminClient;
use trellis_proto::admin::v1::{ApplyPolicyRequest, CreateJoinTokenRequest};
use trellis_proto::discovery::v1::discovery_client::DiscoveryClient;
use trellis_proto::discovery::v1::watch_request::Kind;
use trellis_proto::discovery::v1::{Ack, Subscribe, WatchRequest};
use trellis_proto::identity::v1::certify_request::Proof;
use trellis_proto::identity::v1::identity_client::IdentityClient;
use trellis_proto::identity::v1::{CertifyRequest, CertifyResponse};

use crate::binaries::Launcher;
use crate::mesh::Mesh;

/// The namespace of the watching sims; the propagation policy selects it.
const WATCH_NAMESPACE: &str = "bench-watch";

/// The policy changed in each propagation round: it selects every watching
/// sim and allows `port` from the same namespace.
fn watchers_policy(port: u32) -> String {
    let prefix = format!(
        "spiffe://{}/ns/{WATCH_NAMESPACE}/*",
        super::certs::TRUST_DOMAIN
    );
    format!(
        "apiVersion: trellis.io/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: bench-propagation
  namespace: default
spec:
  selector:
    spiffeIds: [\"{prefix}\"]
  action: ALLOW
  rules:
    - from:
        - spiffeId: \"{prefix}\"
      to:
        - ports: [{port}]
"
    )
}

/// How long one RPC may take.
const RPC_TIMEOUT: Duration = Duration::from_secs(30);

/// How often a reconnecting sidecar tries before it counts as failed.
const RECONNECT_ATTEMPTS: u32 = 4;

/// How many RPCs of one kind are in flight during set-up.
const SETUP_CONCURRENCY: usize = 32;

/// Sizes of the control-plane scenarios.
#[derive(Clone, Debug)]
pub struct ControlSizes {
    pub issuance_certs: usize,
    pub issuance_clients: usize,
    pub watchers: usize,
    pub propagation_rounds: usize,
}

/// Figures of the control-plane scenarios; `None` where a scenario failed
/// (the reason is in `errors`).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ControlFigures {
    pub tokens_per_second: Option<f64>,
    pub issued_per_second: Option<f64>,
    pub raw_signing_per_second: Option<f64>,
    pub issuance_ratio_to_raw: Option<f64>,
    pub issuance_clients: usize,
    pub issuance_certs: usize,
    pub watchers: usize,
    pub propagation_trigger: String,
    pub propagation_rounds: usize,
    pub propagation_p50_ms: Option<f64>,
    pub propagation_p99_ms: Option<f64>,
    pub propagation_max_ms: Option<f64>,
    pub reconnect_all_ready_ms: Option<f64>,
    pub reconnect_p50_ms: Option<f64>,
    pub reconnect_p99_ms: Option<f64>,
    pub control_plane_rss_kib_with_watchers: Option<u64>,
    pub errors: Vec<String>,
}

/// A simulated sidecar.
struct Sim {
    id: String,
    inbound: String,
    key_der: Vec<u8>,
    csr: Vec<u8>,
    token: String,
    chain: Vec<CertificateDer<'static>>,
}

impl Sim {
    fn new(namespace: &str, index: usize, inbound: String) -> anyhow::Result<Sim> {
        let id = format!(
            "spiffe://{}/ns/{namespace}/sa/w{index}",
            super::certs::TRUST_DOMAIN
        );
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
        let csr = params.serialize_request(&key)?.der().to_vec();
        Ok(Sim {
            id,
            inbound,
            key_der: key.serialize_der(),
            csr,
            token: String::new(),
            chain: Vec::new(),
        })
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

/// Connections to one control plane.
struct Client {
    addr: String,
    bundle: Arc<rustls::RootCertStore>,
    trust_domain: TrustDomain,
}

impl Client {
    fn tls(
        &self,
        identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    ) -> anyhow::Result<Arc<ClientConfig>> {
        let verifier = SpiffeServerVerifier::new(
            self.bundle.clone(),
            ExpectedServer::Exact(SpiffeId::control_plane(&self.trust_domain)),
        );
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(PROTOCOL_VERSIONS)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier));
        let config = match identity {
            Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
            None => builder.with_no_client_auth(),
        };
        Ok(Arc::new(trellis_core::grpc::with_h2_alpn(config)))
    }

    async fn channel(
        &self,
        identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    ) -> anyhow::Result<Channel> {
        let tls = self.tls(identity)?;
        trellis_core::grpc::connect(&self.addr, tls)
            .await
            .with_context(|| format!("cannot reach the control plane at {}", self.addr))
    }
}

async fn certify(
    channel: Channel,
    csr: Vec<u8>,
    token: Option<String>,
    inbound: String,
) -> anyhow::Result<CertifyResponse> {
    let request = CertifyRequest {
        csr,
        proof: token.map(Proof::JoinToken),
        inbound_address: inbound,
        inbound_addresses: Vec::new(),
    };
    let mut identity = IdentityClient::new(channel);
    let response = tokio::time::timeout(RPC_TIMEOUT, identity.certify(request))
        .await
        .context("Certify timed out")??;
    Ok(response.into_inner())
}

fn chain_of(response: &CertifyResponse) -> Vec<CertificateDer<'static>> {
    response
        .chain
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect()
}

/// Makes a join token for every sim, `SETUP_CONCURRENCY` at a time over
/// one Admin connection; returns tokens per second.
async fn make_tokens(admin: &AdminClient<Channel>, sims: &mut [Sim]) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut next = 0;
    let mut done = 0;
    while done < sims.len() {
        while next < sims.len() && tasks.len() < SETUP_CONCURRENCY {
            let mut admin = admin.clone();
            let request = CreateJoinTokenRequest {
                spiffe_id: sims[next].id.clone(),
                ttl_seconds: 0,
            };
            let index = next;
            tasks.spawn(async move {
                let response = tokio::time::timeout(RPC_TIMEOUT, admin.create_join_token(request))
                    .await
                    .context("CreateJoinToken timed out")??;
                anyhow::Ok((index, response.into_inner().token))
            });
            next += 1;
        }
        let Some(result) = tasks.join_next().await else {
            break;
        };
        let (index, token) = result??;
        sims[index].token = token;
        done += 1;
    }
    Ok(sims.len() as f64 / start.elapsed().as_secs_f64())
}

/// Certifies every sim with its token, `clients` at a time, each client on
/// its own connection; returns certificates per second.
async fn certify_all(client: &Client, sims: &mut [Sim], clients: usize) -> anyhow::Result<f64> {
    let mut channels = Vec::with_capacity(clients);
    for _ in 0..clients {
        channels.push(client.channel(None).await?);
    }
    let jobs: Vec<(usize, Vec<u8>, String, String)> = sims
        .iter()
        .enumerate()
        .map(|(i, s)| (i, s.csr.clone(), s.token.clone(), s.inbound.clone()))
        .collect();
    let jobs = Arc::new(std::sync::Mutex::new(jobs));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for channel in channels {
        let jobs = jobs.clone();
        tasks.spawn(async move {
            let mut issued = Vec::new();
            loop {
                let job = jobs.lock().expect("not poisoned").pop();
                let Some((index, csr, token, inbound)) = job else {
                    break;
                };
                let response = certify(channel.clone(), csr, Some(token), inbound).await?;
                issued.push((index, chain_of(&response)));
            }
            anyhow::Ok(issued)
        });
    }
    while let Some(result) = tasks.join_next().await {
        for (index, chain) in result?? {
            sims[index].chain = chain;
        }
    }
    Ok(sims.len() as f64 / start.elapsed().as_secs_f64())
}

/// Signs every CSR with rcgen directly (a fresh P-256 CA in this process,
/// the same certificate profile as an SVID), on every core; returns
/// certificates per second.
fn raw_signing(csrs: Vec<Vec<u8>>) -> anyhow::Result<f64> {
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let issuer = Arc::new(rcgen::Issuer::new(ca_params, ca_key));
    let threads = super::system::cpus();
    let csrs = Arc::new(csrs);
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (csrs, issuer) = (csrs.clone(), issuer.clone());
            std::thread::spawn(move || -> anyhow::Result<usize> {
                let mut signed = 0;
                for csr in csrs.iter().skip(t).step_by(threads) {
                    let der = CertificateSigningRequestDer::from(csr.as_slice());
                    let mut request = CertificateSigningRequestParams::from_der(&der)?;
                    let params = &mut request.params;
                    params.is_ca = rcgen::IsCa::ExplicitNoCa;
                    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
                    params.extended_key_usages = vec![
                        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
                    ];
                    params.use_authority_key_identifier_extension = true;
                    let serial = (t as u128) << 64 | signed as u128;
                    params.serial_number =
                        Some(rcgen::SerialNumber::from_slice(&serial.to_be_bytes()));
                    let cert = request.signed_by(&issuer)?;
                    std::hint::black_box(cert.der());
                    signed += 1;
                }
                Ok(signed)
            })
        })
        .collect();
    let mut signed = 0;
    for handle in handles {
        signed += handle
            .join()
            .map_err(|_| anyhow::anyhow!("a signing thread panicked"))??;
    }
    Ok(signed as f64 / start.elapsed().as_secs_f64())
}

/// One reconnection: a new TLS connection with the current SVID, a renewal
/// (the SVID is the proof), then Watch until the first snapshot; returns
/// when that snapshot arrived.
async fn reconnect(
    addr: &str,
    tls: Arc<ClientConfig>,
    csr: Vec<u8>,
    inbound: String,
) -> anyhow::Result<Instant> {
    let channel = trellis_core::grpc::connect(addr, tls).await?;
    certify(channel.clone(), csr, None, inbound.clone()).await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let stream = tokio::spawn(watch(channel, 0, inbound, 0, tx));
    let first = tokio::time::timeout(RPC_TIMEOUT, rx.recv()).await;
    stream.abort();
    let (_, _, at) = first
        .context("no snapshot after reconnecting")?
        .context("the Watch stream ended before a snapshot")?;
    Ok(at)
}

/// What a watcher reports: which sim, which snapshot version, when.
type Event = (usize, u64, Instant);

/// One simulated sidecar's Watch stream: Subscribe, then ACK every
/// snapshot and report it. Runs until aborted or the stream ends.
async fn watch(
    channel: Channel,
    index: usize,
    inbound: String,
    last_version: u64,
    events: mpsc::UnboundedSender<Event>,
) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel::<WatchRequest>(4);
    tx.send(WatchRequest {
        kind: Some(Kind::Subscribe(Subscribe {
            inbound_address: inbound,
            last_version,
            inbound_addresses: Vec::new(),
        })),
    })
    .await?;
    let mut stream = DiscoveryClient::new(channel)
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    while let Some(snapshot) = stream.message().await? {
        tx.send(WatchRequest {
            kind: Some(Kind::Ack(Ack {
                version: snapshot.version,
            })),
        })
        .await?;
        // The ACK is on its way: this sidecar holds the version.
        if events
            .send((index, snapshot.version, Instant::now()))
            .is_err()
        {
            break;
        }
    }
    Ok(())
}

/// Waits until every sim has reported a version above `above`; returns each
/// sim's first such report time (or fails after `patience`, saying how many
/// reported).
async fn collect(
    events: &mut mpsc::UnboundedReceiver<Event>,
    sims: usize,
    above: u64,
    patience: Duration,
) -> anyhow::Result<(Vec<Instant>, u64)> {
    let deadline = tokio::time::Instant::now() + patience;
    let mut seen: Vec<Option<Instant>> = vec![None; sims];
    let mut count = 0;
    let mut newest = above;
    while count < sims {
        let event = tokio::time::timeout_at(deadline, events.recv()).await;
        let Ok(Some((index, version, at))) = event else {
            anyhow::bail!(
                "only {count} of {sims} simulated sidecars got a snapshot above version {above} within {patience:?}"
            );
        };
        newest = newest.max(version);
        if version > above && seen[index].is_none() {
            seen[index] = Some(at);
            count += 1;
        }
    }
    Ok((seen.into_iter().flatten().collect(), newest))
}

fn percentile_ms(mut values: Vec<f64>, q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    Some(values[rank - 1])
}

/// Runs the control-plane scenarios on a fresh control plane.
pub async fn run(launcher: &Launcher, sizes: &ControlSizes) -> anyhow::Result<ControlFigures> {
    let mesh = Mesh::builder()
        .launcher(launcher.clone())
        .trust_domain(super::certs::TRUST_DOMAIN)
        .log_tails_on_drop(false)
        .start()
        .await
        .context("the control plane did not start")?;
    let addr = mesh.control_plane_addr().to_string();
    let admin = AdminCredentials::in_state_dir(mesh.state_dir())
        .connect(&addr)
        .await
        .map_err(|e| anyhow::anyhow!("the Admin API: {e}"))?;
    let bundle_pem = std::fs::read(mesh.bundle_path())?;
    let roots: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&bundle_pem).collect::<Result<_, _>>()?;
    let client = Client {
        addr,
        bundle: Arc::new(trellis_core::tls::root_store(&roots)?),
        trust_domain: TrustDomain::new(super::certs::TRUST_DOMAIN)?,
    };
    let mut figures = ControlFigures {
        issuance_clients: sizes.issuance_clients,
        issuance_certs: sizes.issuance_certs,
        watchers: sizes.watchers,
        propagation_trigger: format!(
            "Admin.ApplyPolicy changes one policy selecting all watchers \
             ({WATCH_NAMESPACE}/*); measured from the call to each watcher's ACK of a \
             version >= the response's snapshot_version"
        ),
        ..ControlFigures::default()
    };

    if let Err(e) = issuance(&client, &admin, sizes, &mut figures).await {
        figures.errors.push(format!("issuance: {e:#}"));
    }
    let pid = mesh_pid(&mesh);
    if let Err(e) = propagation_and_reconnect(&client, &admin, sizes, pid, &mut figures).await {
        figures
            .errors
            .push(format!("propagation/reconnection: {e:#}"));
    }
    drop(mesh);
    Ok(figures)
}

fn mesh_pid(mesh: &Mesh) -> Option<u32> {
    // The control plane's process is not exposed by `&Mesh`; find it by its
    // state directory in /proc (only our own child matches).
    let needle = mesh.state_dir().to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline);
            (cmdline.contains(&needle) && cmdline.contains("--listen")).then_some(pid)
        })
}

async fn issuance(
    client: &Client,
    admin: &AdminClient<Channel>,
    sizes: &ControlSizes,
    figures: &mut ControlFigures,
) -> anyhow::Result<()> {
    let mut sims = (0..sizes.issuance_certs)
        .map(|i| Sim::new("bench-issue", i, String::new()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    figures.tokens_per_second = Some(make_tokens(admin, &mut sims).await?);
    let issued = certify_all(client, &mut sims, sizes.issuance_clients).await?;
    figures.issued_per_second = Some(issued);
    let csrs = sims.iter().map(|s| s.csr.clone()).collect();
    let raw = tokio::task::spawn_blocking(move || raw_signing(csrs)).await??;
    figures.raw_signing_per_second = Some(raw);
    figures.issuance_ratio_to_raw = Some(issued / raw);
    Ok(())
}

async fn propagation_and_reconnect(
    client: &Client,
    admin: &AdminClient<Channel>,
    sizes: &ControlSizes,
    control_plane_pid: Option<u32>,
    figures: &mut ControlFigures,
) -> anyhow::Result<()> {
    let n = sizes.watchers;
    // Advertised addresses only: nothing ever dials them.
    let mut sims = (0..n)
        .map(|i| {
            let port = 20_000 + (i % 40_000) as u16;
            Sim::new(WATCH_NAMESPACE, i, format!("127.0.0.2:{port}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    make_tokens(admin, &mut sims).await?;
    certify_all(client, &mut sims, SETUP_CONCURRENCY).await?;

    // Every sim opens its own connection (with its SVID) and Watch stream.
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let mut watchers = tokio::task::JoinSet::new();
    for (index, sim) in sims.iter().enumerate() {
        let channel = client.channel(Some((sim.chain.clone(), sim.key()))).await?;
        let (tx, inbound) = (events_tx.clone(), sim.inbound.clone());
        watchers.spawn(watch(channel, index, inbound, 0, tx));
    }
    let patience = Duration::from_secs(60);
    let (_, mut version) = collect(&mut events, n, 0, patience)
        .await
        .context("waiting for the first snapshots")?;
    figures.control_plane_rss_kib_with_watchers =
        control_plane_pid.and_then(super::system::rss_kib);

    let mut latencies = Vec::new();
    let mut admin = admin.clone();
    for round in 0..sizes.propagation_rounds {
        // Let the previous round's stragglers settle.
        tokio::time::sleep(Duration::from_millis(200)).await;
        while events.try_recv().is_ok() {}
        // A new port each round: new content, so a new revision and version.
        let document = watchers_policy(8000 + round as u32);
        let t0 = Instant::now();
        let applied = tokio::time::timeout(
            RPC_TIMEOUT,
            admin.apply_policy(ApplyPolicyRequest {
                document,
                dry_run: false,
            }),
        )
        .await
        .context("ApplyPolicy timed out")?
        .with_context(|| format!("ApplyPolicy in propagation round {round}"))?
        .into_inner();
        anyhow::ensure!(
            applied.snapshot_version > version,
            "ApplyPolicy in round {round} made no new snapshot version ({} after {version})",
            applied.snapshot_version
        );
        let (arrivals, newest) = collect(
            &mut events,
            n,
            applied.snapshot_version - 1,
            Duration::from_secs(30),
        )
        .await
        .with_context(|| format!("propagation round {round}"))?;
        version = newest;
        latencies.extend(
            arrivals
                .iter()
                .map(|at| at.duration_since(t0).as_secs_f64() * 1000.0),
        );
    }
    figures.propagation_rounds = sizes.propagation_rounds;
    figures.propagation_p50_ms = percentile_ms(latencies.clone(), 0.50);
    figures.propagation_p99_ms = percentile_ms(latencies.clone(), 0.99);
    figures.propagation_max_ms = percentile_ms(latencies, 1.0);

    // Everyone drops, then everyone comes back at once.
    watchers.abort_all();
    while watchers.join_next().await.is_some() {}
    drop(events);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = Instant::now();
    let mut back = tokio::task::JoinSet::new();
    for sim in &sims {
        let tls = client.tls(Some((sim.chain.clone(), sim.key())))?;
        let (addr, csr, inbound) = (client.addr.clone(), sim.csr.clone(), sim.inbound.clone());
        back.spawn(async move {
            // A real sidecar retries with backoff; so does this one, a few
            // times, and reports the last failure.
            let mut last = None;
            for attempt in 0..RECONNECT_ATTEMPTS {
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                }
                match reconnect(&addr, tls.clone(), csr.clone(), inbound.clone()).await {
                    Ok(at) => return Ok(at.duration_since(t0).as_secs_f64() * 1000.0),
                    Err(e) => last = Some(e),
                }
            }
            Err(last.unwrap_or_else(|| anyhow::anyhow!("no attempt was made")))
        });
    }
    let mut ready = Vec::with_capacity(n);
    let mut failures = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while let Ok(Some(result)) = tokio::time::timeout_at(deadline, back.join_next()).await {
        match result {
            Ok(Ok(ms)) => ready.push(ms),
            Ok(Err(e)) => failures.push(format!("{e:#}")),
            Err(e) => failures.push(e.to_string()),
        }
    }
    anyhow::ensure!(
        ready.len() == n,
        "after reconnecting, {} of {n} simulated sidecars held a certificate and a snapshot; \
         {} failed, the first: {}",
        ready.len(),
        failures.len(),
        failures
            .first()
            .map_or("(none; time ran out)", String::as_str)
    );
    figures.reconnect_all_ready_ms = percentile_ms(ready.clone(), 1.0);
    figures.reconnect_p50_ms = percentile_ms(ready.clone(), 0.50);
    figures.reconnect_p99_ms = percentile_ms(ready, 0.99);
    Ok(())
}
