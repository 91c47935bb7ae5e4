//! Control-plane scenarios against a real `trellis-control-plane` child
//! process, with simulated sidecars in this process (each its own key, CSR,
//! join token, SVID and TLS connection, as a real sidecar has):
//!
//! - issuance: certificates issued per second over gRPC by 64 concurrent
//!   clients (join tokens made beforehand in bulk through the Admin API),
//!   against raw rcgen signing of the same CSRs in this process, in rounds
//!   that interleave the two, so a burst of load on the host falls on both;
//! - propagation and reconnection ([`propagation`]), once per number of
//!   watchers, each number against a control plane of its own (the first
//!   shares the one that issued).
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
use tonic::transport::Channel;
use trellis_control_plane::ctl::AdminCredentials;
use trellis_core::tls::{ExpectedServer, PROTOCOL_VERSIONS, SpiffeServerVerifier, provider};
use trellis_core::{SpiffeId, TrustDomain};
use trellis_proto::admin::v1::CreateJoinTokenRequest;
use trellis_proto::admin::v1::admin_client::AdminClient;
use trellis_proto::identity::v1::certify_request::Proof;
use trellis_proto::identity::v1::identity_client::IdentityClient;
use trellis_proto::identity::v1::{CertifyRequest, CertifyResponse};

use super::propagation::{self, WatchFigures};
use super::system::{HostTicks, host_ticks};
use crate::binaries::Launcher;
use crate::mesh::Mesh;

/// How long one RPC may take.
pub(super) const RPC_TIMEOUT: Duration = Duration::from_secs(30);

/// How many RPCs of one kind are in flight during set-up.
pub(super) const SETUP_CONCURRENCY: usize = 32;

/// Sizes of the control-plane scenarios.
#[derive(Clone, Debug)]
pub struct ControlSizes {
    pub issuance_certs: usize,
    pub issuance_clients: usize,
    /// Rounds the certificates are issued in, each followed by raw signing.
    pub issuance_rounds: usize,
    /// One propagation scenario per entry, in order.
    pub watchers: Vec<usize>,
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
    /// CPU time (user and system) per certificate while issuing, of the
    /// control plane and of the clients (this process), once the clients'
    /// connections are open.
    pub issuance_control_plane_cpu_us_per_cert: Option<f64>,
    pub issuance_clients_cpu_us_per_cert: Option<f64>,
    /// CPU milliseconds the host stole from the machine while issuing and
    /// while signing raw, over every round.
    pub issuance_stolen_ms: Option<f64>,
    pub raw_signing_stolen_ms: Option<f64>,
    /// Round by round, in the order they ran.
    pub issuance_by_round: Vec<IssuanceRound>,
    pub propagation_trigger: String,
    /// Per number of watchers, in the order they ran.
    pub watch: Vec<WatchFigures>,
    pub errors: Vec<String>,
}

/// One round of the issuance scenario: a share of the certificates issued
/// end to end, then raw signing of the same CSRs.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct IssuanceRound {
    /// Certificates issued end to end, and in how many seconds.
    pub issued: usize,
    pub issuing_seconds: f64,
    /// Certificates signed raw, and in how many seconds.
    pub signed: usize,
    pub signing_seconds: f64,
    pub ratio_to_raw: f64,
    /// CPU milliseconds the host stole while issuing and while signing.
    pub issuing_stolen_ms: Option<f64>,
    pub signing_stolen_ms: Option<f64>,
}

impl IssuanceRound {
    pub(super) fn new(
        issued: usize,
        issuing_seconds: f64,
        signed: usize,
        signing_seconds: f64,
    ) -> Self {
        IssuanceRound {
            issued,
            issuing_seconds,
            signed,
            signing_seconds,
            ratio_to_raw: (issued as f64 / issuing_seconds) / (signed as f64 / signing_seconds),
            issuing_stolen_ms: None,
            signing_stolen_ms: None,
        }
    }
}

/// The rates of every round together: certificates over seconds summed
/// across rounds (not a mean of the rounds' rates, so a short round counts
/// for what it issued), end to end and raw, and the ratio of the two.
pub fn issuance_totals(rounds: &[IssuanceRound]) -> Option<(f64, f64, f64)> {
    let sum = |f: fn(&IssuanceRound) -> f64| rounds.iter().map(f).sum::<f64>();
    let issuing = sum(|r| r.issuing_seconds);
    let signing = sum(|r| r.signing_seconds);
    if rounds.is_empty() || issuing <= 0.0 || signing <= 0.0 {
        return None;
    }
    let issued = sum(|r| r.issued as f64) / issuing;
    let signed = sum(|r| r.signed as f64) / signing;
    Some((issued, signed, issued / signed))
}

impl ControlFigures {
    /// The figures at 1,000 watchers (what the target is set for), or else
    /// the first measured.
    pub fn headline_watch(&self) -> Option<&WatchFigures> {
        self.watch
            .iter()
            .find(|w| w.watchers == 1000)
            .or(self.watch.first())
    }
}

/// A simulated sidecar.
pub(super) struct Sim {
    id: String,
    pub(super) inbound: String,
    key_der: Vec<u8>,
    pub(super) csr: Vec<u8>,
    pub(super) token: String,
    pub(super) chain: Vec<CertificateDer<'static>>,
}

impl Sim {
    pub(super) fn new(namespace: &str, index: usize, inbound: String) -> anyhow::Result<Sim> {
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

    pub(super) fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

/// Connections to one control plane.
pub(super) struct Client {
    pub(super) addr: String,
    bundle: trellis_core::tls::Roots,
    trust_domain: TrustDomain,
}

impl Client {
    pub(super) fn tls(
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

    pub(super) async fn channel(
        &self,
        identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    ) -> anyhow::Result<Channel> {
        let tls = self.tls(identity)?;
        trellis_core::grpc::connect(&self.addr, tls)
            .await
            .with_context(|| format!("cannot reach the control plane at {}", self.addr))
    }
}

pub(super) async fn certify(
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
pub(super) async fn make_tokens(
    admin: &AdminClient<Channel>,
    sims: &mut [Sim],
) -> anyhow::Result<f64> {
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
/// its own connection; returns how long that took once the clients were
/// connected (when `connected` was called).
pub(super) async fn certify_all(
    client: &Client,
    sims: &mut [Sim],
    clients: usize,
    connected: impl FnOnce(),
) -> anyhow::Result<Duration> {
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
    connected();
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
    Ok(start.elapsed())
}

/// How long raw signing runs at least, over every round: a pass over a
/// few thousand CSRs takes a fraction of a second on 2 cores, too short
/// for a steady rate (it swung 17,000-23,000/s between runs), so the CSRs
/// are signed over again until this much time has passed.
const RAW_SIGNING_AT_LEAST: Duration = Duration::from_secs(2);

/// Signs the CSRs with rcgen directly (a fresh P-256 CA in this process,
/// the same certificate profile as an SVID), on every core, each at least
/// once and for at least `at_least`; returns how many it signed and in
/// how many seconds.
fn raw_signing(csrs: Vec<Vec<u8>>, at_least: Duration) -> anyhow::Result<(usize, f64)> {
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
                let share = csrs.iter().skip(t).step_by(threads);
                let mine = share.clone().count();
                for csr in share.cycle() {
                    if signed >= mine && start.elapsed() >= at_least {
                        break;
                    }
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
    Ok((signed, start.elapsed().as_secs_f64()))
}

/// Runs the control-plane scenarios: issuance, then propagation and
/// reconnection for each number of watchers.
pub async fn run(launcher: &Launcher, sizes: &ControlSizes) -> anyhow::Result<ControlFigures> {
    let mut figures = ControlFigures {
        issuance_clients: sizes.issuance_clients,
        issuance_certs: sizes.issuance_certs,
        propagation_trigger: propagation::TRIGGER.to_string(),
        ..ControlFigures::default()
    };
    let mut plane = Some(ControlPlane::start(launcher).await?);
    if let Some(cp) = &plane
        && let Err(e) = issuance(cp, sizes, &mut figures).await
    {
        figures.errors.push(format!("issuance: {e:#}"));
    }
    for &watchers in &sizes.watchers {
        // The first number of watchers meets the control plane that issued,
        // the others one of their own (the previous one is stopped first).
        let cp = match plane.take() {
            Some(cp) => cp,
            None => ControlPlane::start(launcher).await?,
        };
        let mut watch = WatchFigures {
            watchers,
            ..WatchFigures::default()
        };
        let pid = mesh_pid(&cp.mesh);
        if let Err(e) = propagation::run(
            &cp.client,
            &cp.admin,
            cp.mesh.state_dir(),
            watchers,
            sizes,
            pid,
            &mut watch,
        )
        .await
        {
            watch
                .errors
                .push(format!("propagation/reconnection: {e:#}"));
        }
        figures.watch.push(watch);
    }
    Ok(figures)
}

/// A running control plane and the two ways in: as a sidecar and as the
/// operator.
struct ControlPlane {
    mesh: Mesh,
    client: Client,
    admin: AdminClient<Channel>,
}

impl ControlPlane {
    async fn start(launcher: &Launcher) -> anyhow::Result<ControlPlane> {
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
            bundle: trellis_core::tls::root_store(&roots)?,
            trust_domain: TrustDomain::new(super::certs::TRUST_DOMAIN)?,
        };
        Ok(ControlPlane {
            mesh,
            client,
            admin,
        })
    }
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
    cp: &ControlPlane,
    sizes: &ControlSizes,
    figures: &mut ControlFigures,
) -> anyhow::Result<()> {
    let mut sims = (0..sizes.issuance_certs)
        .map(|i| Sim::new("bench-issue", i, String::new()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    figures.tokens_per_second = Some(make_tokens(&cp.admin, &mut sims).await?);
    // Where the time goes: the control plane's CPU and this process's (the
    // clients' gRPC and TLS) per certificate, from when the clients are
    // connected.
    let pid = mesh_pid(&cp.mesh);
    let cpu = || {
        (
            pid.and_then(super::system::cpu_seconds),
            super::system::cpu_seconds(std::process::id()),
        )
    };
    let (mut control_plane_cpu, mut clients_cpu) = (Some(0.0), Some(0.0));
    let mut stolen = (HostTicks::default(), HostTicks::default());
    let rounds = sizes.issuance_rounds.max(1);
    let share = sims.len().div_ceil(rounds);
    let signing_at_least = RAW_SIGNING_AT_LEAST / rounds as u32;
    for chunk in sims.chunks_mut(share) {
        let mut before = ((None, None), None);
        let issuing = certify_all(&cp.client, chunk, sizes.issuance_clients, || {
            before = (cpu(), host_ticks());
        })
        .await?;
        let issuing_stolen = stolen.0.add_since(before.1);
        let after = cpu();
        let spent = |b: Option<f64>, a: Option<f64>| Some(a? - b?);
        control_plane_cpu = control_plane_cpu
            .zip(spent(before.0.0, after.0))
            .map(|(t, d)| t + d);
        clients_cpu = clients_cpu
            .zip(spent(before.0.1, after.1))
            .map(|(t, d)| t + d);

        let csrs = chunk.iter().map(|s| s.csr.clone()).collect();
        let signing_from = host_ticks();
        let (signed, seconds) =
            tokio::task::spawn_blocking(move || raw_signing(csrs, signing_at_least)).await??;
        let signing_stolen = stolen.1.add_since(signing_from);

        let mut round = IssuanceRound::new(chunk.len(), issuing.as_secs_f64(), signed, seconds);
        round.issuing_stolen_ms = issuing_stolen.map(HostTicks::stolen_ms);
        round.signing_stolen_ms = signing_stolen.map(HostTicks::stolen_ms);
        figures.issuance_by_round.push(round);
    }
    let per_cert = |total: Option<f64>| Some(total? * 1e6 / sizes.issuance_certs as f64);
    figures.issuance_control_plane_cpu_us_per_cert = per_cert(control_plane_cpu);
    figures.issuance_clients_cpu_us_per_cert = per_cert(clients_cpu);
    figures.issuance_stolen_ms = stolen.0.stolen_ms_if_read();
    figures.raw_signing_stolen_ms = stolen.1.stolen_ms_if_read();
    if let Some((issued, raw, ratio)) = issuance_totals(&figures.issuance_by_round) {
        figures.issued_per_second = Some(issued);
        figures.raw_signing_per_second = Some(raw);
        figures.issuance_ratio_to_raw = Some(ratio);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rates of all rounds are certificates over seconds summed across
    /// them, not the mean of the rounds' rates: a round that took twice as
    /// long counts twice as much.
    #[test]
    fn issuance_totals_sum_certificates_and_seconds_across_rounds() {
        let rounds = [
            // 1,000 issued in 0.5 s (2,000/s), 10,000 signed in 1 s.
            IssuanceRound::new(1000, 0.5, 10_000, 1.0),
            // 1,000 issued in 1.5 s, 10,000 signed in 0.5 s.
            IssuanceRound::new(1000, 1.5, 10_000, 0.5),
        ];
        assert_eq!(rounds[0].ratio_to_raw, 0.2);
        let (issued, raw, ratio) = issuance_totals(&rounds).unwrap();
        assert_eq!(issued, 1000.0);
        assert!((raw - 20_000.0 / 1.5).abs() < 1e-9, "{raw}");
        assert!((ratio - 0.075).abs() < 1e-12, "{ratio}");
        assert_eq!(issuance_totals(&[]), None);
    }
}
