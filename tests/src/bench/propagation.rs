//! Propagation and reconnection against a running control plane, with N
//! simulated sidecars in this process (each its own key, CSR, join token,
//! SVID, TLS connection and Watch stream; each decodes every snapshot it
//! receives and ACKs it, as a real sidecar does):
//!
//! - propagation: a policy selecting all of them is changed through
//!   `Admin.ApplyPolicy`, and the time from the call until each one has
//!   received a snapshot at or above the response's `snapshot_version` (the
//!   first version holding the write) and sent its ACK is recorded (p50,
//!   p99, max);
//! - a workload joining: a new workload certifies with an inbound address,
//!   and the time from its Certify call until each watcher has received
//!   and ACKed a snapshot holding its endpoint is recorded, with the size of
//!   that snapshot (the watchers subscribe as sidecars do, taking
//!   `endpoint_changes`, so it carries the one new endpoint, not all N);
//! - reconnection: every simulated sidecar drops its connection and all
//!   come back at once (renew the certificate over mTLS, then Watch): the
//!   time until the last one holds a certificate and a snapshot.
//!
//! Every snapshot holds every watcher's endpoint, so N watchers receive
//! N x N endpoints per change, all decoded in this process: 10,000 need
//! about 11 GiB of memory here at once, which is checked before they start.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use rustls::ClientConfig;
use tokio::sync::{mpsc, oneshot};
use tonic::transport::Channel;
use trellis_control_plane::ctl::AdminCredentials;
use trellis_proto::admin::v1::ApplyPolicyRequest;
use trellis_proto::admin::v1::admin_client::AdminClient;
use trellis_proto::discovery::v1::discovery_client::DiscoveryClient;
use trellis_proto::discovery::v1::watch_request::Kind;
use trellis_proto::discovery::v1::{Ack, Subscribe, WatchRequest};
use trellis_proxy::identity::schedule::retry_delay;

use super::control::{
    Client, ControlSizes, RPC_TIMEOUT, SETUP_CONCURRENCY, Sim, certify, certify_all, make_tokens,
};

/// What the propagation rounds change and measure.
pub const TRIGGER: &str = "Admin.ApplyPolicy changes one policy selecting all watchers \
     (bench-watch/*); measured from the call to each watcher's ACK of a version >= the \
     response's snapshot_version";

/// How long a reconnecting sidecar keeps trying before it counts as failed
/// (a real one never stops): a minute, or as long as every watcher may
/// take to get one snapshot ([`patience`]) when that is longer, so that
/// 10,000 at once on a slow host are measured rather than given up on.
fn reconnect_patience(watchers: usize) -> Duration {
    patience(watchers).max(Duration::from_secs(60))
}

/// Figures of one number of watchers; `None` where a scenario failed (the
/// reason is in `errors`).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct WatchFigures {
    pub watchers: usize,
    pub propagation_rounds: usize,
    pub propagation_p50_ms: Option<f64>,
    pub propagation_p99_ms: Option<f64>,
    pub propagation_max_ms: Option<f64>,
    /// The control plane's CPU time (user and system) per round: its own
    /// cost of one change at this many watchers, whatever this process
    /// spends decoding.
    pub control_plane_cpu_seconds_per_round: Option<f64>,
    /// Workloads that joined, one a round.
    pub join_rounds: usize,
    pub join_p50_ms: Option<f64>,
    pub join_p99_ms: Option<f64>,
    /// The mean size of the snapshot that brought each watcher the new
    /// endpoint (its protobuf encoding).
    pub join_snapshot_bytes: Option<f64>,
    /// The control plane's CPU time per workload joining.
    pub join_control_plane_cpu_seconds: Option<f64>,
    /// Watch streams that broke during propagation and were opened again.
    pub watch_streams_reopened: usize,
    pub reconnect_all_ready_ms: Option<f64>,
    pub reconnect_p50_ms: Option<f64>,
    pub reconnect_p99_ms: Option<f64>,
    /// The control plane's CPU time through the reconnection, per sidecar:
    /// its TLS handshake, renewal, Watch and first snapshot.
    pub reconnect_control_plane_cpu_ms: Option<f64>,
    /// This process's CPU time through the reconnection, per simulated
    /// sidecar (its handshake, CSR and the snapshot's decoding), which
    /// shares the cores with the control plane: what the figures above
    /// include of the simulation's own work.
    pub reconnect_simulated_cpu_ms: Option<f64>,
    pub control_plane_rss_kib_with_watchers: Option<u64>,
    pub errors: Vec<String>,
}

/// How long every watcher may take to get one snapshot: every snapshot
/// carries every watcher's endpoint, so the work grows with N x N (3.5
/// minutes at 10,000, where streams that broke are re-opened in a round).
fn patience(watchers: usize) -> Duration {
    let n = watchers as u64;
    Duration::from_secs(30) + Duration::from_micros(n * n / 100 * 180)
}

/// Memory this process needs at once for `watchers` (each snapshot is about
/// 66 bytes per endpoint, held encoded and decoded), in MiB.
fn memory_needed_mib(watchers: usize) -> u64 {
    let n = watchers as u64;
    n * n * 110 / (1 << 20) + 512
}

/// The namespace of the watching sims; the propagation policy selects it.
const WATCH_NAMESPACE: &str = "bench-watch";

/// The namespace of the sims that join during the join rounds.
const JOIN_NAMESPACE: &str = "bench-join";

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
  namespace: {WATCH_NAMESPACE}
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
    let stream = tokio::spawn(async move { watch(channel, 0, inbound, &mut (0, 0), tx).await });
    let first = tokio::time::timeout(RPC_TIMEOUT, rx.recv()).await;
    stream.abort();
    let (_, _, at, _) = first
        .context("no snapshot after reconnecting")?
        .context("the Watch stream ended before a snapshot")?;
    Ok(at)
}

/// Whether the simulated sidecars take `endpoint_changes`, as sidecars do;
/// `TRELLIS_BENCH_ENDPOINT_CHANGES=false` makes them take every endpoint of
/// a changed list instead, to compare.
fn takes_changes() -> bool {
    std::env::var("TRELLIS_BENCH_ENDPOINT_CHANGES").map_or(true, |v| v != "false")
}

/// What a watcher reports: which sim, which snapshot version, when, and
/// the snapshot's encoded size.
type Event = (usize, u64, Instant, usize);

/// A watching sim as a real sidecar keeps its stream: when it breaks, the
/// sim dials again with its SVID and subscribes with the last version it
/// holds, so it is sent only what it lacks. With thousands of sims this
/// process, busy decoding their snapshots on the same cores, can answer
/// the control plane's HTTP/2 PINGs too late and lose connections, which
/// a sidecar on its own CPU would not; each re-opened stream is counted in
/// `reopened`, and its time counts in the propagation figures. Runs until
/// aborted or `events` is closed.
async fn keep_watching(
    mut channel: Channel,
    reconnect: (String, Arc<ClientConfig>),
    index: usize,
    inbound: String,
    events: mpsc::UnboundedSender<Event>,
    reopened: Arc<AtomicUsize>,
) {
    let (addr, tls) = reconnect;
    let mut last_version = (0, 0);
    loop {
        let _ = watch(
            channel,
            index,
            inbound.clone(),
            &mut last_version,
            events.clone(),
        )
        .await;
        if events.is_closed() {
            return;
        }
        reopened.fetch_add(1, Ordering::Relaxed);
        channel = loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if let Ok(channel) = trellis_core::grpc::connect(&addr, tls.clone()).await {
                break channel;
            }
        };
    }
}

/// One simulated sidecar's Watch stream: Subscribe (with the version it
/// holds), then decode, ACK and report every snapshot, keeping its version
/// and the epoch it was set in in `last_version`. Runs until aborted or the
/// stream ends.
async fn watch(
    channel: Channel,
    index: usize,
    inbound: String,
    last_version: &mut (u64, u64),
    events: mpsc::UnboundedSender<Event>,
) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel::<WatchRequest>(4);
    tx.send(WatchRequest {
        kind: Some(Kind::Subscribe(Subscribe {
            inbound_address: inbound,
            last_version: last_version.0,
            inbound_addresses: Vec::new(),
            accepts_endpoints_version: true,
            accepts_endpoint_changes: takes_changes(),
            last_version_epoch: last_version.1,
            warnings: Vec::new(),
            opaque_ports: Vec::new(),
        })),
    })
    .await?;
    let mut stream = DiscoveryClient::new(channel)
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    while let Some(snapshot) = stream.message().await? {
        let bytes = prost::Message::encoded_len(&snapshot);
        tx.send(WatchRequest {
            kind: Some(Kind::Ack(Ack {
                version: snapshot.version,
                warnings: Vec::new(),
            })),
        })
        .await?;
        *last_version = (snapshot.version, snapshot.version_epoch);
        // The ACK is on its way: this sidecar holds the version.
        if events
            .send((index, snapshot.version, Instant::now(), bytes))
            .is_err()
        {
            break;
        }
    }
    Ok(())
}

/// Waits until every sim has reported a version above `above`; returns each
/// sim's first such report time and that snapshot's size (or fails after
/// `patience`, saying how many reported), and the newest version seen.
async fn collect(
    events: &mut mpsc::UnboundedReceiver<Event>,
    sims: usize,
    above: u64,
    patience: Duration,
) -> anyhow::Result<(Vec<(Instant, usize)>, u64)> {
    let deadline = tokio::time::Instant::now() + patience;
    let mut seen: Vec<Option<(Instant, usize)>> = vec![None; sims];
    let mut count = 0;
    let mut newest = above;
    while count < sims {
        let event = tokio::time::timeout_at(deadline, events.recv()).await;
        let Ok(Some((index, version, at, bytes))) = event else {
            anyhow::bail!(
                "only {count} of {sims} simulated sidecars got a snapshot above version {above} within {patience:?}"
            );
        };
        newest = newest.max(version);
        if version > above && seen[index].is_none() {
            seen[index] = Some((at, bytes));
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

/// The operator of the propagation rounds: `Admin.ApplyPolicy` from a
/// thread and runtime of its own, so that its connection (and the control
/// plane's HTTP/2 PINGs on it) is served even while the runtime of
/// thousands of simulated sidecars is busy decoding their snapshots.
struct Operator {
    requests: mpsc::UnboundedSender<(String, Applied)>,
}

/// Where the operator answers a document: when the call started and the
/// snapshot version of its answer.
type Applied = oneshot::Sender<anyhow::Result<(Instant, u64)>>;

impl Operator {
    /// Starts the thread; it connects with the operator credential of
    /// `state_dir` and ends when the `Operator` is dropped.
    fn start(state_dir: PathBuf, addr: String) -> anyhow::Result<Operator> {
        let (requests, mut calls) =
            mpsc::unbounded_channel::<(String, oneshot::Sender<anyhow::Result<(Instant, u64)>>)>();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("bench-operator".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let admin = AdminCredentials::in_state_dir(&state_dir)
                        .connect(&addr)
                        .await;
                    while let Some((document, answer)) = calls.recv().await {
                        let result = match &admin {
                            Ok(admin) => {
                                let t0 = Instant::now();
                                admin
                                    .clone()
                                    .apply_policy(ApplyPolicyRequest {
                                        document,
                                        dry_run: false,
                                    })
                                    .await
                                    .map(|r| (t0, r.into_inner().snapshot_version))
                                    .map_err(anyhow::Error::from)
                            }
                            Err(e) => Err(anyhow::anyhow!("the Admin API: {e}")),
                        };
                        let _ = answer.send(result);
                    }
                });
            })?;
        Ok(Operator { requests })
    }

    /// Applies `document`; returns when the call started and the snapshot
    /// version of its answer.
    async fn apply(&self, document: String) -> anyhow::Result<(Instant, u64)> {
        let (answer, result) = oneshot::channel();
        self.requests
            .send((document, answer))
            .map_err(|_| anyhow::anyhow!("the operator thread has stopped"))?;
        result
            .await
            .map_err(|_| anyhow::anyhow!("the operator thread has stopped"))?
    }
}

/// Propagation rounds, then reconnection, with `n` watchers.
pub(super) async fn run(
    client: &Client,
    admin: &AdminClient<Channel>,
    admin_dir: &Path,
    n: usize,
    sizes: &ControlSizes,
    control_plane_pid: Option<u32>,
    figures: &mut WatchFigures,
) -> anyhow::Result<()> {
    let needed = memory_needed_mib(n);
    if let Some(available) = super::system::available_memory_mib() {
        anyhow::ensure!(
            available >= needed,
            "{n} watchers need about {needed} MiB of memory in this process and only \
             {available} MiB are available; skipped"
        );
    }
    // Advertised addresses only: nothing ever dials them.
    let mut sims = (0..n)
        .map(|i| {
            let port = 20_000 + (i % 40_000) as u16;
            Sim::new(WATCH_NAMESPACE, i, format!("127.0.0.2:{port}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    make_tokens(admin, &mut sims).await?;
    certify_all(client, &mut sims, SETUP_CONCURRENCY, || ()).await?;

    // Every sim opens its own connection (with its SVID) and Watch stream.
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let mut watchers = tokio::task::JoinSet::new();
    let reopened = Arc::new(AtomicUsize::new(0));
    for (index, sim) in sims.iter().enumerate() {
        let tls = client.tls(Some((sim.chain.clone(), sim.key())))?;
        let channel = trellis_core::grpc::connect(&client.addr, tls.clone())
            .await
            .with_context(|| format!("cannot reach the control plane at {}", client.addr))?;
        let (tx, inbound) = (events_tx.clone(), sim.inbound.clone());
        let again = (client.addr.clone(), tls);
        watchers.spawn(keep_watching(
            channel,
            again,
            index,
            inbound,
            tx,
            reopened.clone(),
        ));
    }
    let (_, mut version) = collect(&mut events, n, 0, patience(n) * 2)
        .await
        .context("waiting for the first snapshots")?;
    figures.control_plane_rss_kib_with_watchers =
        control_plane_pid.and_then(super::system::rss_kib);

    let mut latencies = Vec::new();
    let operator = Operator::start(admin_dir.to_path_buf(), client.addr.clone())?;
    // Beyond 1,000 watchers a round takes tens of seconds here: a few
    // rounds keep the full run in its budget.
    let rounds = if n > 1000 {
        sizes.propagation_rounds.min(3)
    } else {
        sizes.propagation_rounds
    };
    let cpu_before = control_plane_pid.and_then(super::system::cpu_seconds);
    for round in 0..rounds {
        // Let the previous round's stragglers settle.
        tokio::time::sleep(Duration::from_millis(200)).await;
        while events.try_recv().is_ok() {}
        // A new port each round: new content, so a new revision and version.
        let document = watchers_policy(8000 + round as u32);
        let (t0, applied_version) =
            tokio::time::timeout(RPC_TIMEOUT.max(patience(n)), operator.apply(document))
                .await
                .context("ApplyPolicy timed out")?
                .with_context(|| format!("ApplyPolicy in propagation round {round}"))?;
        anyhow::ensure!(
            applied_version > version,
            "ApplyPolicy in round {round} made no new snapshot version ({applied_version} after {version})"
        );
        let (arrivals, newest) = collect(&mut events, n, applied_version - 1, patience(n))
            .await
            .with_context(|| format!("propagation round {round}"))?;
        version = newest;
        latencies.extend(
            arrivals
                .iter()
                .map(|(at, _)| at.duration_since(t0).as_secs_f64() * 1000.0),
        );
    }
    figures.propagation_rounds = rounds;
    if let (Some(before), Some(after)) = (
        cpu_before,
        control_plane_pid.and_then(super::system::cpu_seconds),
    ) {
        figures.control_plane_cpu_seconds_per_round = Some((after - before) / rounds as f64);
    }
    figures.watch_streams_reopened = reopened.load(Ordering::Relaxed);
    figures.propagation_p50_ms = percentile_ms(latencies.clone(), 0.50);
    figures.propagation_p99_ms = percentile_ms(latencies.clone(), 0.99);
    figures.propagation_max_ms = percentile_ms(latencies, 1.0);

    // Workloads join, one a round: each is a new endpoint for every
    // watcher.
    let mut joiners = (0..rounds)
        .map(|i| Sim::new(JOIN_NAMESPACE, i, format!("127.0.0.3:{}", 20_000 + i)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    make_tokens(admin, &mut joiners).await?;
    let channel = client.channel(None).await?;
    let (mut joined, mut sizes_received) = (Vec::new(), Vec::new());
    let cpu_before = control_plane_pid.and_then(super::system::cpu_seconds);
    for (round, joiner) in joiners.iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(200)).await;
        while let Ok((_, seen, _, _)) = events.try_recv() {
            version = version.max(seen);
        }
        let t0 = Instant::now();
        let request = certify(
            channel.clone(),
            joiner.csr.clone(),
            Some(joiner.token.clone()),
            joiner.inbound.clone(),
        );
        tokio::time::timeout(RPC_TIMEOUT, request)
            .await
            .context("Certify timed out")?
            .with_context(|| format!("Certify in join round {round}"))?;
        let (arrivals, newest) = collect(&mut events, n, version, patience(n))
            .await
            .with_context(|| format!("join round {round}"))?;
        version = newest;
        for (at, bytes) in arrivals {
            joined.push(at.duration_since(t0).as_secs_f64() * 1000.0);
            sizes_received.push(bytes as f64);
        }
    }
    figures.join_rounds = rounds;
    if let (Some(before), Some(after)) = (
        cpu_before,
        control_plane_pid.and_then(super::system::cpu_seconds),
    ) {
        figures.join_control_plane_cpu_seconds = Some((after - before) / rounds as f64);
    }
    figures.join_p50_ms = percentile_ms(joined.clone(), 0.50);
    figures.join_p99_ms = percentile_ms(joined, 0.99);
    figures.join_snapshot_bytes = (!sizes_received.is_empty())
        .then(|| sizes_received.iter().sum::<f64>() / sizes_received.len() as f64);

    // Everyone drops, then everyone comes back at once.
    watchers.abort_all();
    while watchers.join_next().await.is_some() {}
    drop(events);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cpu_before = (
        control_plane_pid.and_then(super::system::cpu_seconds),
        super::system::cpu_seconds(std::process::id()),
    );
    let t0 = Instant::now();
    let give_up = reconnect_patience(n);
    let mut back = tokio::task::JoinSet::new();
    for sim in &sims {
        let tls = client.tls(Some((sim.chain.clone(), sim.key())))?;
        let (addr, csr, inbound) = (client.addr.clone(), sim.csr.clone(), sim.inbound.clone());
        back.spawn(async move {
            // A real sidecar retries with the same spread backoff; this one
            // gives up after `reconnect_patience` and reports the last
            // failure.
            let mut attempt = 0;
            loop {
                match reconnect(&addr, tls.clone(), csr.clone(), inbound.clone()).await {
                    Ok(at) => return Ok(at.duration_since(t0).as_secs_f64() * 1000.0),
                    Err(e) if t0.elapsed() >= give_up => {
                        return Err(e.context(format!("still failing after {attempt} retries")));
                    }
                    Err(_) => {}
                }
                tokio::time::sleep(retry_delay(attempt)).await;
                attempt += 1;
            }
        });
    }
    let mut ready = Vec::with_capacity(n);
    let mut failures = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90) + patience(n);
    while let Ok(Some(result)) = tokio::time::timeout_at(deadline, back.join_next()).await {
        match result {
            Ok(Ok(ms)) => ready.push(ms),
            Ok(Err(e)) => failures.push(format!("{e:#}")),
            Err(e) => failures.push(e.to_string()),
        }
    }
    let per_sidecar_ms =
        |before: Option<f64>, after: Option<f64>| Some((after? - before?) * 1000.0 / n as f64);
    figures.reconnect_control_plane_cpu_ms = per_sidecar_ms(
        cpu_before.0,
        control_plane_pid.and_then(super::system::cpu_seconds),
    );
    figures.reconnect_simulated_cpu_ms =
        per_sidecar_ms(cpu_before.1, super::system::cpu_seconds(std::process::id()));
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
