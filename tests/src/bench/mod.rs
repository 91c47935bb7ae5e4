//! The benchmark suite behind `trellis-bench`: Trellis side by side with a
//! direct connection and with Envoy, HAProxy and stunnel doing the same mTLS
//! job on loopback, plus the control plane at scale. Every figure is taken
//! in one run and reported as a ratio to the direct baseline of that run (or
//! to raw signing for issuance), never as a single absolute time.
//!
//! Layout: [`certs`] makes the shared credentials, [`app`] is the server
//! behind every pair, [`contenders`] starts the pairs, [`load`] drives
//! traffic, [`system`] reads CPU and memory and pins processes,
//! [`control`] and [`propagation`] run the control-plane scenarios,
//! [`profile`] samples where the Trellis sidecars' (and Envoy's) time goes,
//! and [`report`] prints the table, writes the JSON and checks the targets.
//!
//! It only ever listens on and dials loopback addresses.

pub mod app;
pub mod certs;
pub mod contenders;
pub mod control;
pub mod load;
pub mod profile;
pub mod propagation;
pub mod report;
pub mod system;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use crate::binaries::Launcher;
use contenders::{Kind, Setup, Start};
use system::{HostTicks, Pinning, Switches, cpu_seconds, rss_kib};

/// The open-files limit the run asks for (children inherit it).
const OPEN_FILES: u64 = 131_072;

/// How much of everything a run does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// One tiny bulk transfer per contender, no control plane: the smoke test.
    Smoke,
    /// Short durations, fewer connections: under 3 minutes on 2 cores.
    Quick,
    /// The full run: under 20 minutes on 2 cores.
    Full,
}

/// Durations and sizes of a mode.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Sizes {
    /// How many rounds the rate and latency scenarios are split into; the
    /// durations below are those of all the rounds together.
    pub rounds: usize,
    pub bulk_seconds: f64,
    pub bulk_max_bytes_per_stream: u64,
    pub latency_seconds: f64,
    pub latency_rate: f64,
    pub http_connections: usize,
    pub keepalive_seconds: f64,
    /// HTTP/2: connections, requests in flight on each, and seconds (all
    /// rounds together).
    pub http2_connections: usize,
    pub http2_streams: usize,
    pub http2_seconds: f64,
    pub connection_seconds: f64,
    pub connection_concurrency: usize,
    pub held_connections: usize,
    /// What the mode asks for; more than `held_connections` when the
    /// open-files limit does not allow it.
    pub held_connections_requested: usize,
    #[serde(skip)]
    pub control: Option<control::ControlSizes>,
}

impl Mode {
    pub fn sizes(self) -> Sizes {
        match self {
            Mode::Smoke => Sizes {
                rounds: 1,
                bulk_seconds: 1.0,
                bulk_max_bytes_per_stream: 16 << 20,
                latency_seconds: 0.0,
                latency_rate: 0.0,
                http_connections: 0,
                keepalive_seconds: 0.0,
                http2_connections: 0,
                http2_streams: 0,
                http2_seconds: 0.0,
                connection_seconds: 0.0,
                connection_concurrency: 0,
                held_connections: 0,
                held_connections_requested: 0,
                control: None,
            },
            Mode::Quick => Sizes {
                rounds: 2,
                bulk_seconds: 2.0,
                bulk_max_bytes_per_stream: 64 << 30,
                latency_seconds: 3.0,
                latency_rate: 1000.0,
                http_connections: 16,
                keepalive_seconds: 2.0,
                http2_connections: 4,
                http2_streams: 4,
                http2_seconds: 2.0,
                connection_seconds: 2.0,
                connection_concurrency: 16,
                held_connections: 1000,
                held_connections_requested: 1000,
                control: Some(control::ControlSizes {
                    issuance_certs: 2000,
                    issuance_clients: 64,
                    issuance_rounds: 2,
                    watchers: vec![1000],
                    propagation_rounds: 3,
                }),
            },
            Mode::Full => Sizes {
                rounds: 5,
                bulk_seconds: 5.0,
                bulk_max_bytes_per_stream: 64 << 30,
                latency_seconds: 10.0,
                latency_rate: 2000.0,
                http_connections: 16,
                keepalive_seconds: 5.0,
                http2_connections: 4,
                http2_streams: 4,
                http2_seconds: 5.0,
                connection_seconds: 5.0,
                connection_concurrency: 16,
                held_connections: 10_000,
                held_connections_requested: 10_000,
                control: Some(control::ControlSizes {
                    issuance_certs: 10_000,
                    issuance_clients: 64,
                    issuance_rounds: 5,
                    watchers: vec![1000, 10_000],
                    propagation_rounds: 10,
                }),
            },
        }
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    pub mode: Mode,
    pub json: PathBuf,
    pub contenders: Vec<Kind>,
    pub pin: bool,
    pub control_plane: bool,
    /// Use wrk for the keep-alive request rate when it is installed.
    pub wrk: bool,
    /// Overrides the mode's number of simulated watching sidecars.
    pub watchers: Option<usize>,
    /// Overrides the mode's fixed request rate (requests a second).
    pub rate: Option<f64>,
    /// Whether to profile the Trellis sidecars and Envoy's pair
    /// (`profile`); `None`: in every mode but the smoke run.
    pub profile: Option<bool>,
}

/// Figures of one contender; `None` where not measured (the reason is in
/// `errors`, or the contender is missing).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PairFigures {
    pub name: String,
    /// "ok", "missing" or "failed".
    pub status: String,
    pub reason: Option<String>,
    pub version: String,
    pub bulk_1_stream_bytes_per_s: Option<f64>,
    pub bulk_8_streams_bytes_per_s: Option<f64>,
    pub latency_rate_per_s: Option<f64>,
    pub latency_p50_us: Option<f64>,
    pub latency_p99_us: Option<f64>,
    pub latency_p999_us: Option<f64>,
    pub latency_max_us: Option<f64>,
    /// Requests answered in all the fixed-rate rounds together.
    pub latency_requests: Option<u64>,
    pub latency_errors: Option<u64>,
    /// Of those, the requests that fell due while the one before them on
    /// their connection was unanswered (see `load::Latency::queued`).
    pub latency_queued: Option<u64>,
    pub keepalive_requests_per_s: Option<f64>,
    /// The closed loop's latencies ("under wrk -c16"): the mean of the
    /// rounds' percentiles, since wrk reports percentiles, not its
    /// histogram.
    pub keepalive_p50_us: Option<f64>,
    pub keepalive_p99_us: Option<f64>,
    pub keepalive_tool: Option<String>,
    /// HTTP/2 requests answered a second, multiplexed on a few connections
    /// as a gRPC client sends them (closed loop), and their latencies: the
    /// mean of the rounds' percentiles, as for keep-alive.
    pub http2_requests_per_s: Option<f64>,
    pub http2_p50_us: Option<f64>,
    pub http2_p99_us: Option<f64>,
    pub http2_tool: Option<String>,
    pub new_connections_per_s: Option<f64>,
    pub new_connection_errors: Option<u64>,
    pub new_connections_stolen_ms: Option<f64>,
    pub cpu_seconds_per_gb: Option<f64>,
    /// The same for each proxy process, client side first: the slower
    /// side of a pipeline is the one that sleeps less.
    pub cpu_seconds_per_gb_by_side: Vec<f64>,
    /// CPU microseconds (user and system, all threads) each proxy process
    /// spent per request answered over the fixed-rate rounds, client side
    /// first: what the pair's tail is made of at a low rate.
    pub latency_cpu_us_per_request: Vec<f64>,
    /// The same over the keep-alive rounds, where the pair's work per
    /// request decides its rate.
    pub keepalive_cpu_us_per_request: Vec<f64>,
    /// The same over the HTTP/2 rounds.
    pub http2_cpu_us_per_request: Vec<f64>,
    /// The same over the new-connection rounds, per connection made: each
    /// a handshake through the pair.
    pub new_connection_cpu_us: Vec<f64>,
    /// The share of the host's CPU (all cores, every process and the
    /// kernel) busy during the one-stream bulk rounds, then during the
    /// keep-alive rounds: near 1, the scenario is bound by CPU, and
    /// cores x share / rate is what a byte or a request cost the host.
    pub bulk_1_stream_host_busy: Option<f64>,
    pub keepalive_host_busy: Option<f64>,
    /// CPU milliseconds (all cores together) the hypervisor took from this
    /// machine while its cores had work (`steal` in `/proc/stat`), during
    /// the one-stream bulk rounds, the fixed-rate rounds and the
    /// keep-alive rounds: a stall while the host stole is the host's.
    pub bulk_1_stream_stolen_ms: Option<f64>,
    pub latency_stolen_ms: Option<f64>,
    pub keepalive_stolen_ms: Option<f64>,
    pub http2_stolen_ms: Option<f64>,
    /// Per proxy process, client side first, over the one-stream bulk
    /// rounds: how often its threads went to sleep to wait (voluntary
    /// context switches) and how often the scheduler took their core
    /// (involuntary ones), a MB moved. A proxy that sleeps often moves
    /// little each time it wakes, and pays for waking each time.
    pub bulk_1_stream_sleeps_per_mb: Vec<f64>,
    pub bulk_1_stream_preempted_per_mb: Vec<f64>,
    /// The same over the fixed-rate rounds, a request answered: at a rate
    /// this low a proxy sleeps between requests, and each preemption is a
    /// wait for its core behind another process (the load generator, the
    /// app), which is what a tail is made of.
    pub latency_sleeps_per_request: Vec<f64>,
    pub latency_preempted_per_request: Vec<f64>,
    /// The same over the keep-alive rounds: near 1 or more, a proxy wakes
    /// for each request rather than serving several connections' requests
    /// each time it wakes.
    pub keepalive_sleeps_per_request: Vec<f64>,
    pub keepalive_preempted_per_request: Vec<f64>,
    /// Per proxy process, client side first.
    pub rss_idle_kib: Vec<u64>,
    pub rss_held_kib: Vec<u64>,
    pub held_connections: Option<usize>,
    /// The larger of the two proxies' (held - idle) / connections.
    pub kib_per_held_connection: Option<f64>,
    /// Why the first attempt to hold the connections failed, when the
    /// second held them.
    pub hold_retried: Option<String>,
    pub errors: Vec<String>,
    /// Each round's figure, in the order of the rounds.
    pub rounds: RoundFigures,
}

/// The figures of each round of a contender (see `measure`): round `i` of
/// every contender ran within the same few seconds.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RoundFigures {
    pub bulk_1_stream_bytes_per_s: Vec<f64>,
    pub bulk_8_streams_bytes_per_s: Vec<f64>,
    pub latency_p99_us: Vec<f64>,
    pub keepalive_requests_per_s: Vec<f64>,
    pub keepalive_p50_us: Vec<f64>,
    pub keepalive_p99_us: Vec<f64>,
    pub http2_requests_per_s: Vec<f64>,
    pub http2_p50_us: Vec<f64>,
    pub http2_p99_us: Vec<f64>,
    pub new_connections_per_s: Vec<f64>,
    /// The CPU milliseconds stolen from the machine during each round (see
    /// `PairFigures::latency_stolen_ms`).
    pub bulk_1_stream_stolen_ms: Vec<f64>,
    pub latency_stolen_ms: Vec<f64>,
    pub keepalive_stolen_ms: Vec<f64>,
    pub http2_stolen_ms: Vec<f64>,
    pub new_connections_stolen_ms: Vec<f64>,
    /// How often the two proxies together were preempted a request in
    /// each fixed-rate and keep-alive round (see
    /// `PairFigures::latency_preempted_per_request`).
    pub latency_preempted_per_request: Vec<f64>,
    pub keepalive_preempted_per_request: Vec<f64>,
}

/// Everything a run measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Results {
    pub mode: Mode,
    pub machine: system::Machine,
    pub pinning: String,
    pub open_files_limit: u64,
    pub sizes: Sizes,
    pub contenders: Vec<PairFigures>,
    /// Why the HTTP/2 scenario did not run in a mode that runs it (its
    /// load generator, h2load, is not installed).
    pub http2_not_run: Option<String>,
    pub control_plane: Option<control::ControlFigures>,
    /// Where the Trellis sidecars' time went, and Envoy's pair's beside
    /// them (`None`: not asked for).
    pub profile: Option<profile::Profiles>,
    pub seconds: f64,
}

/// Runs the benchmark and returns its figures (printing progress to
/// stderr).
pub async fn run(options: &Options, launcher: &Launcher) -> anyhow::Result<Results> {
    let started = std::time::Instant::now();
    let sizes = options.mode.sizes();
    // Held connections: this process (load generator and app) holds two
    // descriptors per connection, each proxy two as well, and HAProxy asks
    // for twice its maxconn up front.
    let open_files_limit =
        system::raise_open_files(((sizes.held_connections as u64) * 3 + 4096).max(OPEN_FILES));
    let mut sizes = sizes;
    if let (Some(control), Some(watchers)) = (sizes.control.as_mut(), options.watchers) {
        control.watchers = vec![watchers];
    }
    if let Some(rate) = options.rate.filter(|_| sizes.latency_seconds > 0.0) {
        sizes.latency_rate = rate;
    }
    sizes.held_connections_requested = sizes.held_connections;
    // Each side of a held connection is a descriptor in this process (and
    // two in each proxy): hold only as many as the limit allows.
    sizes.held_connections = sizes
        .held_connections
        .min((open_files_limit.saturating_sub(2000) / 2) as usize);
    let dir = tempfile::Builder::new()
        .prefix("trellis-bench-")
        .tempdir()?;
    let credentials = certs::Credentials::generate(dir.path())?;
    let pinning = Pinning::detect(options.pin);
    let app = app::BenchApp::start().await?;
    let setup = Setup {
        dir: dir.path(),
        credentials: &credentials,
        launcher,
        app: app.addr(),
        pinning: &pinning,
        open_files: open_files_limit,
    };
    let wrk = options.wrk.then(|| system::find_program("wrk")).flatten();
    let h2load = system::find_program("h2load");
    let http2_not_run = (sizes.http2_connections > 0 && h2load.is_none()).then(|| {
        "h2load is not installed (scripts/install-bench-tools.sh installs it, from nghttp2-client)"
            .to_string()
    });
    if let Some(why) = &http2_not_run {
        eprintln!("trellis-bench: the HTTP/2 rate does not run: {why}");
    }
    let tools = Tools {
        wrk: wrk.as_deref(),
        h2load: h2load.as_deref(),
    };

    // Every pair is started first and stays up, idle while the others are
    // measured, so that the scenarios can interleave them (see `measure`).
    let mut contenders = Vec::new();
    for &kind in &options.contenders {
        eprintln!("trellis-bench: starting {} ...", kind.name());
        let mut f = PairFigures {
            name: kind.name().to_string(),
            ..PairFigures::default()
        };
        let pair = match contenders::start(kind, &setup).await {
            Ok(Start::Missing(reason)) => {
                eprintln!("trellis-bench: {} is missing: {reason}", kind.name());
                f.status = "missing".into();
                f.reason = Some(reason);
                None
            }
            Err(e) => {
                eprintln!("trellis-bench: {} did not start: {e:#}", kind.name());
                f.status = "failed".into();
                f.reason = Some(format!("{e:#}"));
                None
            }
            Ok(Start::Ready(pair)) => {
                f.status = "ok".into();
                f.version = pair.version.clone();
                Some(pair)
            }
        };
        contenders.push(Contender {
            figures: f,
            pair,
            totals: Totals::default(),
        });
    }
    measure(&mut contenders, &app, &sizes, tools, dir.path()).await;
    let profile = match options.profile.unwrap_or(options.mode != Mode::Smoke) {
        true => Some(profile_pairs(&contenders, &sizes, tools, dir.path()).await),
        false => None,
    };
    let mut figures = Vec::new();
    for c in contenders {
        for e in &c.figures.errors {
            eprintln!("trellis-bench: {}: {e}", c.figures.name);
        }
        if let Some(pair) = c.pair {
            pair.stop();
        }
        figures.push(c.figures);
    }
    drop(app);

    let control_plane = match (&sizes.control, options.control_plane) {
        (Some(control_sizes), true) => {
            eprintln!("trellis-bench: control plane ...");
            match control::run(launcher, control_sizes).await {
                Ok(c) => Some(c),
                Err(e) => Some(control::ControlFigures {
                    errors: vec![format!("{e:#}")],
                    ..Default::default()
                }),
            }
        }
        _ => None,
    };

    Ok(Results {
        mode: options.mode,
        machine: system::Machine::describe(),
        pinning: pinning.describe(),
        open_files_limit,
        sizes,
        contenders: figures,
        http2_not_run,
        control_plane,
        profile,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// The CPU seconds of each proxy of a pair, client side first; `None`
/// when one could not be read.
fn side_cpu(pair: &contenders::Pair) -> Option<Vec<f64>> {
    pair.proxies.iter().map(|p| cpu_seconds(p.pid)).collect()
}

/// Adds what each proxy spent between `before` and now to `total`.
fn add_side_cpu(pair: &contenders::Pair, before: Option<Vec<f64>>, total: &mut Option<Vec<f64>>) {
    let (Some(before), Some(after)) = (before, side_cpu(pair)) else {
        return;
    };
    let total = total.get_or_insert_with(|| vec![0.0; after.len()]);
    for ((t, b), a) in total.iter_mut().zip(&before).zip(&after) {
        *t += a - b;
    }
}

/// Each proxy's context switches so far, client side first; `None` for a
/// contender whose threads end with their connections.
fn side_switches(pair: &contenders::Pair) -> Option<Vec<Switches>> {
    if !pair.kind.threads_outlive_connections() {
        return None;
    }
    pair.proxies
        .iter()
        .map(|p| system::switches(p.pid))
        .collect()
}

/// Adds each proxy's context switches since `before` to `total`; the
/// preemptions of both together a request, if `requests` were answered.
fn add_side_switches(
    pair: &contenders::Pair,
    before: Option<Vec<Switches>>,
    total: &mut Option<Vec<Switches>>,
    requests: u64,
) -> Option<f64> {
    let (Some(before), Some(after)) = (before, side_switches(pair)) else {
        return None;
    };
    let total = total.get_or_insert_with(|| vec![Switches::default(); after.len()]);
    let mut preempted = 0;
    for ((t, b), a) in total.iter_mut().zip(&before).zip(&after) {
        let round = a.since(*b);
        preempted += round.involuntary;
        t.add(round);
    }
    (requests > 0 && !after.is_empty()).then(|| preempted as f64 / requests as f64)
}

/// Adds the host's ticks since `before` to `total`, and the CPU they
/// stole to the round-by-round figures `stolen`.
fn add_host(before: Option<HostTicks>, total: &mut HostTicks, stolen: &mut Vec<f64>) {
    if let Some(round) = total.add_since(before) {
        stolen.push(round.stolen_ms());
    }
}

fn pair_rss(pair: &contenders::Pair) -> Vec<u64> {
    pair.proxies.iter().filter_map(|p| rss_kib(p.pid)).collect()
}

/// A contender of the run: its figures, its pair while it runs, and what
/// its rounds add up to.
struct Contender {
    figures: PairFigures,
    pair: Option<Box<contenders::Pair>>,
    totals: Totals,
}

/// The sums over one contender's rounds, from which its figures are made.
#[derive(Default)]
struct Totals {
    /// Bytes and seconds of the bulk runs, one stream then eight.
    bulk: [(u64, f64); 2],
    /// CPU seconds of each proxy (client side first) during the bulk
    /// runs.
    bulk_cpu_seconds: Option<Vec<f64>>,
    /// Each proxy's context switches (client side first) during the
    /// one-stream bulk runs.
    bulk_1_stream_switches: Option<Vec<Switches>>,
    /// The same during the fixed-rate rounds, then the keep-alive rounds.
    latency_switches: Option<Vec<Switches>>,
    keepalive_switches: Option<Vec<Switches>>,
    latency: Option<load::Latency>,
    /// CPU seconds of each proxy (client side first) during the
    /// fixed-rate rounds, then during the keep-alive rounds.
    latency_cpu_seconds: Option<Vec<f64>>,
    keepalive_cpu_seconds: Option<Vec<f64>>,
    /// Requests answered in the keep-alive rounds.
    keepalive_requests: u64,
    /// CPU seconds of each proxy over the HTTP/2 rounds, the requests
    /// answered in them, and the host's ticks over them.
    http2_cpu_seconds: Option<Vec<f64>>,
    http2_requests: u64,
    http2_host: HostTicks,
    /// CPU seconds of each proxy over the new-connection rounds, the
    /// connections made in them, and the host's ticks over them.
    connections_cpu_seconds: Option<Vec<f64>>,
    connections_made: u64,
    connections_host: HostTicks,
    /// The host's CPU ticks over the one-stream bulk rounds, the
    /// fixed-rate rounds and the keep-alive rounds.
    bulk_1_stream_host: HostTicks,
    latency_host: HostTicks,
    keepalive_host: HostTicks,
    new_connection_errors: u64,
    /// Scenarios that failed once: they are not run again, and their
    /// figures are left out.
    failed: Vec<Scenario>,
}

/// The scenarios that run in rounds, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    Bulk1,
    Bulk8,
    FixedRate,
    KeepAlive,
    Http2,
    NewConnections,
}

/// The load generators found on the host (`None`: not installed, or not
/// to be used).
#[derive(Clone, Copy, Default)]
struct Tools<'a> {
    wrk: Option<&'a std::path::Path>,
    h2load: Option<&'a std::path::Path>,
}

impl Scenario {
    fn describe(self) -> &'static str {
        match self {
            Scenario::Bulk1 => "bulk 1 stream",
            Scenario::Bulk8 => "bulk 8 streams",
            Scenario::FixedRate => "fixed-rate latency",
            Scenario::KeepAlive => "keep-alive rate",
            Scenario::Http2 => "HTTP/2 rate",
            Scenario::NewConnections => "new connections",
        }
    }
}

/// Every data-plane scenario against every running pair.
///
/// The scenarios that measure a rate or a latency run in `sizes.rounds`
/// short rounds, and each round runs every contender (direct too) one
/// after the other, starting one further along the list each time. A
/// contender's figure sums its rounds. A burst of load from elsewhere on
/// the host then falls on every contender about alike, and the ratio of
/// each to direct compares runs a few seconds apart instead of minutes.
/// The memory figures follow, one contender at a time. A failed scenario
/// is recorded and the next one runs.
async fn measure(
    contenders: &mut [Contender],
    app: &app::BenchApp,
    sizes: &Sizes,
    tools: Tools<'_>,
    dir: &std::path::Path,
) {
    for c in contenders.iter_mut() {
        if let Some(pair) = &c.pair {
            c.figures.rss_idle_kib = pair_rss(pair);
        }
    }
    let scenarios = measured_scenarios(sizes, tools);
    let n = contenders.len();
    for &scenario in &scenarios {
        eprintln!(
            "trellis-bench: {} ({} rounds) ...",
            scenario.describe(),
            sizes.rounds
        );
        for round in 0..sizes.rounds {
            for i in round_order(round, n) {
                let c = &mut contenders[i];
                let Some(pair) = &c.pair else { continue };
                if c.totals.failed.contains(&scenario) {
                    continue;
                }
                if let Err(e) = run_round(
                    scenario,
                    pair,
                    sizes,
                    tools,
                    dir,
                    &mut c.totals,
                    &mut c.figures,
                )
                .await
                {
                    c.figures
                        .errors
                        .push(format!("{}: {e:#}", scenario.describe()));
                    c.totals.failed.push(scenario);
                }
            }
        }
    }
    for c in contenders.iter_mut() {
        sum_rounds(&c.totals, &mut c.figures);
    }
    if sizes.held_connections == 0 {
        return;
    }
    // Let closed connections leave the proxies before measuring memory.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for c in contenders.iter_mut() {
        let Some(pair) = &c.pair else { continue };
        eprintln!(
            "trellis-bench: {} holding {} connections ...",
            c.figures.name, sizes.held_connections
        );
        let before = app.open_connections();
        hold(pair, app, sizes.held_connections, &mut c.figures).await;
        // The pair closes its side of the held connections in its own
        // time; the next pair's must not find this process out of
        // descriptors.
        app.wait_until_settled(before, Duration::from_secs(60))
            .await;
    }
}

/// The scenarios the mode runs, in order: HTTP/2 only where h2load is
/// installed.
fn measured_scenarios(sizes: &Sizes, tools: Tools<'_>) -> Vec<Scenario> {
    if sizes.http_connections == 0 {
        return vec![Scenario::Bulk1]; // smoke: one stream only
    }
    let mut scenarios = vec![
        Scenario::Bulk1,
        Scenario::Bulk8,
        Scenario::FixedRate,
        Scenario::KeepAlive,
    ];
    if sizes.http2_connections > 0 && tools.h2load.is_some() {
        scenarios.push(Scenario::Http2);
    }
    scenarios.push(Scenario::NewConnections);
    scenarios
}

/// The pairs profiled after the measured rounds: Trellis as deployed, and
/// Envoy's pair beside it, so that a profile of where Trellis's time goes
/// can be read against the peer it is most often compared with.
const PROFILED: [Kind; 2] = [Kind::Trellis, Kind::Envoy];

/// The fewest bytes a stream of a profiled bulk round may move: more than
/// any pair moves in the round's time, so that the round lasts that time.
const PROFILED_BULK_BYTES: u64 = 64 << 30;

/// The scenarios a profile is taken through: one-stream bulk, and
/// keep-alive, HTTP/2 and new connections, of those the run measures.
fn profiled_scenarios(sizes: &Sizes, tools: Tools<'_>) -> Vec<Scenario> {
    measured_scenarios(sizes, tools)
        .into_iter()
        .filter(|s| {
            matches!(
                s,
                Scenario::Bulk1 | Scenario::KeepAlive | Scenario::Http2 | Scenario::NewConnections
            )
        })
        .collect()
}

/// Profiles each pair of [`PROFILED`] that ran through one extra round of
/// the one-stream bulk scenario, one of the keep-alive scenario, one of
/// the HTTP/2 scenario and one of the new-connection scenario (those the
/// mode runs), after
/// the measured rounds (see `profile`). What cannot be profiled is said in
/// `not_taken`.
async fn profile_pairs(
    contenders: &[Contender],
    sizes: &Sizes,
    tools: Tools<'_>,
    dir: &std::path::Path,
) -> profile::Profiles {
    let mut profiles = profile::Profiles {
        tool: profile::Perf::describe(),
        ..Default::default()
    };
    let running = |kind: Kind| {
        contenders
            .iter()
            .find(|c| c.pair.as_ref().is_some_and(|p| p.kind == kind))
    };
    if running(Kind::Trellis).is_none() {
        profiles.not_taken = Some("trellis did not run".into());
        return profiles;
    }
    let perf = match profile::Perf::detect(dir).await {
        Ok(perf) => perf,
        Err(why) => {
            profiles.not_taken = Some(why);
            return profiles;
        }
    };
    let scenarios = profiled_scenarios(sizes, tools);
    // A profiled bulk round runs for its time, whatever the mode's cap on
    // the bytes it moves: the smoke run's 16 MiB go by in a few
    // milliseconds of each side's CPU, which a profiler that took longer
    // than `ATTACH` to start on a busy host would miss altogether.
    let sizes = &Sizes {
        bulk_max_bytes_per_stream: sizes.bulk_max_bytes_per_stream.max(PROFILED_BULK_BYTES),
        ..sizes.clone()
    };
    let mut failures = Vec::new();
    for c in PROFILED.into_iter().filter_map(running) {
        let (name, pair) = (&c.figures.name, c.pair.as_deref().expect("running"));
        let pids: Vec<u32> = pair.proxies.iter().map(|p| p.pid).collect();
        for &scenario in &scenarios {
            if c.totals.failed.contains(&scenario) {
                continue;
            }
            eprintln!(
                "trellis-bench: profiling {name} ({}) ...",
                scenario.describe()
            );
            // The round's figures are not kept: the profiler was attached.
            let (mut totals, mut figures) = (Totals::default(), PairFigures::default());
            let round = run_round(scenario, pair, sizes, tools, dir, &mut totals, &mut figures);
            // A file name: no spaces, and no slash ("HTTP/2 rate").
            let label = format!("{name}-{}", scenario.describe().replace([' ', '/'], "-"));
            let files = match perf.record(&pids, dir, &label, round).await {
                Ok(((), files)) => files,
                Err(e) => {
                    failures.push(format!("{name}, {}: {e:#}", scenario.describe()));
                    continue;
                }
            };
            for (proxy, file) in pair.proxies.iter().zip(files) {
                match perf.sum(&file).await {
                    Ok(summed) => profiles.sides.push(profile::SideProfile {
                        contender: name.clone(),
                        scenario: scenario.describe().into(),
                        side: proxy.side.into(),
                        summed,
                    }),
                    Err(e) => failures.push(format!(
                        "{name}, {}, {} side: {e:#}",
                        scenario.describe(),
                        proxy.side
                    )),
                }
            }
        }
    }
    if !failures.is_empty() {
        profiles.not_taken = Some(failures.join("; "));
    }
    profiles
}

/// The order of the contenders in round `round`: all `n` of them, the
/// first one further along the list each round, so that no contender
/// always runs first, or always right after the same one.
fn round_order(round: usize, n: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |i| (round + i) % n)
}

/// One round of one scenario against one pair, its figure added to
/// `totals` and to the round-by-round figures.
async fn run_round(
    scenario: Scenario,
    pair: &contenders::Pair,
    sizes: &Sizes,
    tools: Tools<'_>,
    dir: &std::path::Path,
    totals: &mut Totals,
    f: &mut PairFigures,
) -> anyhow::Result<()> {
    let entry = pair.entry;
    let rounds = sizes.rounds as f64;
    match scenario {
        Scenario::Bulk1 | Scenario::Bulk8 => {
            let (which, streams) = if scenario == Scenario::Bulk1 {
                (0, 1)
            } else {
                (1, 8)
            };
            let per_stream = sizes.bulk_max_bytes_per_stream / streams as u64;
            let cpu_before = side_cpu(pair);
            // The host's share is reported for the one-stream rounds.
            let host_before = (which == 0).then(system::host_ticks).flatten();
            let switches_before = (which == 0).then(|| side_switches(pair)).flatten();
            let b = load::bulk(
                entry,
                streams,
                secs(sizes.bulk_seconds / rounds),
                per_stream,
            )
            .await?;
            add_side_cpu(pair, cpu_before, &mut totals.bulk_cpu_seconds);
            if which == 0 {
                add_side_switches(pair, switches_before, &mut totals.bulk_1_stream_switches, 0);
                add_host(
                    host_before,
                    &mut totals.bulk_1_stream_host,
                    &mut f.rounds.bulk_1_stream_stolen_ms,
                );
            }
            totals.bulk[which].0 += b.bytes;
            totals.bulk[which].1 += b.seconds;
            let per_round = if which == 0 {
                &mut f.rounds.bulk_1_stream_bytes_per_s
            } else {
                &mut f.rounds.bulk_8_streams_bytes_per_s
            };
            per_round.push(b.bytes_per_second());
        }
        Scenario::FixedRate => {
            let cpu_before = side_cpu(pair);
            let switches_before = side_switches(pair);
            let host_before = system::host_ticks();
            let l = load::fixed_rate(
                entry,
                sizes.http_connections,
                sizes.latency_rate,
                secs(sizes.latency_seconds / rounds),
            )
            .await?;
            add_side_cpu(pair, cpu_before, &mut totals.latency_cpu_seconds);
            let requests = l.histogram.len();
            if let Some(preempted) = add_side_switches(
                pair,
                switches_before,
                &mut totals.latency_switches,
                requests,
            ) {
                f.rounds.latency_preempted_per_request.push(preempted);
            }
            add_host(
                host_before,
                &mut totals.latency_host,
                &mut f.rounds.latency_stolen_ms,
            );
            f.latency_rate_per_s = Some(sizes.latency_rate);
            f.rounds.latency_p99_us.push(l.quantile_us(0.99));
            match &mut totals.latency {
                Some(total) => total.merge(&l)?,
                None => totals.latency = Some(l),
            }
        }
        Scenario::KeepAlive => {
            let duration = secs(sizes.keepalive_seconds / rounds);
            let cpu_before = side_cpu(pair);
            let switches_before = side_switches(pair);
            let host_before = system::host_ticks();
            let closed = match tools.wrk {
                Some(wrk) => {
                    f.keepalive_tool = Some(format!("wrk -t1 -c{}", sizes.http_connections));
                    load::keepalive_rate_wrk(wrk, dir, entry, sizes.http_connections, duration)
                        .await?
                }
                None => {
                    f.keepalive_tool = Some(format!(
                        "trellis-bench closed loop, {} connections",
                        sizes.http_connections
                    ));
                    load::keepalive_rate(entry, sizes.http_connections, duration, 10_000_000)
                        .await?
                }
            };
            add_side_cpu(pair, cpu_before, &mut totals.keepalive_cpu_seconds);
            if let Some(preempted) = add_side_switches(
                pair,
                switches_before,
                &mut totals.keepalive_switches,
                closed.requests,
            ) {
                f.rounds.keepalive_preempted_per_request.push(preempted);
            }
            add_host(
                host_before,
                &mut totals.keepalive_host,
                &mut f.rounds.keepalive_stolen_ms,
            );
            totals.keepalive_requests += closed.requests;
            f.rounds
                .keepalive_requests_per_s
                .push(closed.requests_per_s);
            f.rounds.keepalive_p50_us.push(closed.p50_us);
            f.rounds.keepalive_p99_us.push(closed.p99_us);
        }
        Scenario::Http2 => {
            let h2load = tools
                .h2load
                .context("h2load is not installed (scripts/install-bench-tools.sh)")?;
            let (connections, streams) = (sizes.http2_connections, sizes.http2_streams);
            f.http2_tool = Some(format!("h2load -t1 -c{connections} -m{streams}"));
            let duration = secs(sizes.http2_seconds / rounds);
            let cpu_before = side_cpu(pair);
            let host_before = system::host_ticks();
            let closed =
                load::http2_rate_h2load(h2load, dir, entry, connections, streams, duration).await?;
            add_side_cpu(pair, cpu_before, &mut totals.http2_cpu_seconds);
            add_host(
                host_before,
                &mut totals.http2_host,
                &mut f.rounds.http2_stolen_ms,
            );
            totals.http2_requests += closed.requests;
            f.rounds.http2_requests_per_s.push(closed.requests_per_s);
            f.rounds.http2_p50_us.push(closed.p50_us);
            f.rounds.http2_p99_us.push(closed.p99_us);
        }
        Scenario::NewConnections => {
            let cpu_before = side_cpu(pair);
            let host_before = system::host_ticks();
            let made = load::connection_rate(
                entry,
                sizes.connection_concurrency,
                secs(sizes.connection_seconds / rounds),
                1_000_000,
            )
            .await?;
            add_side_cpu(pair, cpu_before, &mut totals.connections_cpu_seconds);
            add_host(
                host_before,
                &mut totals.connections_host,
                &mut f.rounds.new_connections_stolen_ms,
            );
            totals.connections_made += made.ok;
            totals.new_connection_errors += made.errors;
            f.rounds.new_connections_per_s.push(made.per_second);
        }
    }
    Ok(())
}

/// A contender's figures from the sums of its rounds (and, for the rates,
/// from its round-by-round figures: rounds of a rate last equally long, so
/// the rate of all of them is their mean).
fn sum_rounds(totals: &Totals, f: &mut PairFigures) {
    let ok = |s: Scenario| !totals.failed.contains(&s);
    let rate = |(bytes, seconds): (u64, f64)| (seconds > 0.0).then(|| bytes as f64 / seconds);
    let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    let per_request = |cpu: &Option<Vec<f64>>, requests: u64| match cpu {
        Some(cpu) if requests > 0 => cpu.iter().map(|s| s * 1e6 / requests as f64).collect(),
        _ => Vec::new(),
    };
    if ok(Scenario::Bulk1) {
        f.bulk_1_stream_bytes_per_s = rate(totals.bulk[0]);
        f.bulk_1_stream_host_busy = totals.bulk_1_stream_host.busy_share();
        f.bulk_1_stream_stolen_ms = totals.bulk_1_stream_host.stolen_ms_if_read();
        let mb = totals.bulk[0].0 as f64 / 1e6;
        (
            f.bulk_1_stream_sleeps_per_mb,
            f.bulk_1_stream_preempted_per_mb,
        ) = per_unit(&totals.bulk_1_stream_switches, mb);
    }
    if ok(Scenario::Bulk8) {
        f.bulk_8_streams_bytes_per_s = rate(totals.bulk[1]);
    }
    let moved = totals.bulk[0].0 + totals.bulk[1].0;
    if ok(Scenario::Bulk1) && ok(Scenario::Bulk8) && moved > 0 {
        // Direct has no proxy, and so no figure.
        if let Some(sides) = totals.bulk_cpu_seconds.as_ref().filter(|s| !s.is_empty()) {
            let gb = moved as f64 / 1e9;
            f.cpu_seconds_per_gb = Some(sides.iter().sum::<f64>() / gb);
            f.cpu_seconds_per_gb_by_side = sides.iter().map(|s| s / gb).collect();
        }
    }
    if let Some(l) = totals.latency.as_ref().filter(|_| ok(Scenario::FixedRate)) {
        f.latency_p50_us = Some(l.quantile_us(0.50));
        f.latency_p99_us = Some(l.quantile_us(0.99));
        f.latency_p999_us = Some(l.quantile_us(0.999));
        f.latency_max_us = Some(l.histogram.max() as f64);
        f.latency_requests = Some(l.histogram.len());
        f.latency_errors = Some(l.errors);
        f.latency_queued = Some(l.queued);
        f.latency_stolen_ms = totals.latency_host.stolen_ms_if_read();
        f.latency_cpu_us_per_request = per_request(&totals.latency_cpu_seconds, l.histogram.len());
        (
            f.latency_sleeps_per_request,
            f.latency_preempted_per_request,
        ) = per_unit(&totals.latency_switches, l.histogram.len() as f64);
    }
    if ok(Scenario::KeepAlive) {
        f.keepalive_requests_per_s = mean(&f.rounds.keepalive_requests_per_s);
        f.keepalive_p50_us = mean(&f.rounds.keepalive_p50_us);
        f.keepalive_p99_us = mean(&f.rounds.keepalive_p99_us);
        f.keepalive_cpu_us_per_request =
            per_request(&totals.keepalive_cpu_seconds, totals.keepalive_requests);
        f.keepalive_host_busy = totals.keepalive_host.busy_share();
        f.keepalive_stolen_ms = totals.keepalive_host.stolen_ms_if_read();
        (
            f.keepalive_sleeps_per_request,
            f.keepalive_preempted_per_request,
        ) = per_unit(&totals.keepalive_switches, totals.keepalive_requests as f64);
    }
    if ok(Scenario::Http2) && !f.rounds.http2_requests_per_s.is_empty() {
        f.http2_requests_per_s = mean(&f.rounds.http2_requests_per_s);
        f.http2_p50_us = mean(&f.rounds.http2_p50_us);
        f.http2_p99_us = mean(&f.rounds.http2_p99_us);
        f.http2_cpu_us_per_request = per_request(&totals.http2_cpu_seconds, totals.http2_requests);
        f.http2_stolen_ms = totals.http2_host.stolen_ms_if_read();
    }
    if ok(Scenario::NewConnections) {
        f.new_connections_per_s = mean(&f.rounds.new_connections_per_s);
        f.new_connection_errors = f
            .new_connections_per_s
            .map(|_| totals.new_connection_errors);
        f.new_connection_cpu_us =
            per_request(&totals.connections_cpu_seconds, totals.connections_made);
        f.new_connections_stolen_ms = totals.connections_host.stolen_ms_if_read();
    }
}

/// Each proxy's sleeps and preemptions (client side first) per unit of
/// work done (a MB, a request): none when they were not counted or no work
/// was done.
fn per_unit(switches: &Option<Vec<Switches>>, units: f64) -> (Vec<f64>, Vec<f64>) {
    match switches {
        Some(sides) if units > 0.0 => sides
            .iter()
            .map(|s| (s.voluntary as f64 / units, s.involuntary as f64 / units))
            .unzip(),
        _ => (Vec::new(), Vec::new()),
    }
}

/// Memory of a pair, idle and holding `n` open connections. An attempt that
/// fails is made once more, after what it opened has closed: the failure,
/// with what the app saw meanwhile, is kept in `hold_retried` (or in
/// `errors`, when the second attempt fails too).
async fn hold(pair: &contenders::Pair, app: &app::BenchApp, n: usize, f: &mut PairFigures) {
    let before = app.open_connections();
    let mut first_failure: Option<String> = None;
    loop {
        let idle = pair_rss(pair);
        let accepts = app.accept_counts();
        match load::hold_connections(pair.entry, n, 64, Duration::from_secs(120)).await {
            Ok(held) => {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let with = pair_rss(pair);
                f.held_connections = Some(held.len());
                f.kib_per_held_connection = idle
                    .iter()
                    .zip(&with)
                    .map(|(i, w)| w.saturating_sub(*i) as f64 / held.len() as f64)
                    .max_by(f64::total_cmp);
                f.rss_held_kib = with;
                f.hold_retried = first_failure;
                return;
            }
            Err(e) => {
                let failure = format!("{e:#} ({})", app.since(accepts));
                match first_failure {
                    None => {
                        eprintln!(
                            "trellis-bench: {}: holding {n} connections: {failure}; once more",
                            f.name
                        );
                        app.wait_until_settled(before, Duration::from_secs(60))
                            .await;
                        first_failure = Some(failure);
                    }
                    Some(first) => {
                        f.errors.push(format!(
                            "holding {n} connections: {failure}; the first attempt: {first}"
                        ));
                        return;
                    }
                }
            }
        }
    }
}

/// Writes the JSON report (creating its directory).
pub fn write_json(results: &Results, path: &std::path::Path) -> anyhow::Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let json = report::json(results);
    std::fs::write(path, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    /// Every target a run can miss on the data plane has a profile beside
    /// it: bulk, keep-alive and new connections in the quick and full
    /// runs, and HTTP/2 where h2load is installed; the smoke run, which
    /// runs bulk alone, profiles bulk alone.
    #[test]
    fn the_profile_covers_bulk_keepalive_and_new_connections_where_the_mode_runs_them() {
        let h2load = std::path::Path::new("/usr/bin/h2load");
        let with = Tools {
            wrk: None,
            h2load: Some(h2load),
        };
        let without = Tools::default();
        let all = [
            Scenario::Bulk1,
            Scenario::KeepAlive,
            Scenario::Http2,
            Scenario::NewConnections,
        ];
        let no_http2 = [
            Scenario::Bulk1,
            Scenario::KeepAlive,
            Scenario::NewConnections,
        ];
        assert_eq!(profiled_scenarios(&Mode::Full.sizes(), with), all);
        assert_eq!(profiled_scenarios(&Mode::Quick.sizes(), with), all);
        assert_eq!(profiled_scenarios(&Mode::Quick.sizes(), without), no_http2);
        assert_eq!(
            profiled_scenarios(&Mode::Smoke.sizes(), with),
            [Scenario::Bulk1]
        );
    }

    /// The HTTP/2 rate runs after keep-alive where h2load is installed,
    /// and not at all without it (the run says why) or in the smoke run.
    #[test]
    fn the_http2_rate_runs_only_with_h2load() {
        let h2load = std::path::Path::new("/usr/bin/h2load");
        let with = Tools {
            wrk: None,
            h2load: Some(h2load),
        };
        let full = measured_scenarios(&Mode::Full.sizes(), with);
        assert_eq!(
            full,
            [
                Scenario::Bulk1,
                Scenario::Bulk8,
                Scenario::FixedRate,
                Scenario::KeepAlive,
                Scenario::Http2,
                Scenario::NewConnections,
            ]
        );
        let without = measured_scenarios(&Mode::Full.sizes(), Tools::default());
        assert!(!without.contains(&Scenario::Http2), "{without:?}");
        assert_eq!(without.len(), 5);
        assert_eq!(
            measured_scenarios(&Mode::Smoke.sizes(), with),
            [Scenario::Bulk1]
        );
    }

    /// A loopback port in front of the app that closes the first `refuse`
    /// connections as they come and relays the others to the app.
    async fn entry_refusing_first(app: SocketAddr, refuse: usize) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            for i in 0.. {
                let Ok((mut caller, _)) = listener.accept().await else {
                    return;
                };
                if i < refuse {
                    continue; // dropped: closed before any answer
                }
                tokio::spawn(async move {
                    let mut upstream = tokio::net::TcpStream::connect(app).await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut caller, &mut upstream).await;
                });
            }
        });
        addr
    }

    /// The figures of holding 4 connections through an entry that closes
    /// the first `refuse` it gets.
    async fn hold_four_refusing_first(refuse: usize) -> PairFigures {
        let app = app::BenchApp::start().await.unwrap();
        let pair = contenders::Pair::direct_to(entry_refusing_first(app.addr(), refuse).await);
        let mut f = PairFigures::default();
        hold(&pair, &app, 4, &mut f).await;
        f
    }

    /// A hold that fails once is made again: the connections are held,
    /// and the first failure is kept with what the app saw meanwhile.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hold_that_fails_once_is_made_again_and_says_why() {
        let f = hold_four_refusing_first(1).await;
        assert_eq!(f.held_connections, Some(4), "{f:?}");
        assert!(f.errors.is_empty(), "{f:?}");
        // The refused connection fails whenever its close arrives: before
        // or after the other three are open.
        let first = f.hold_retried.as_deref().unwrap_or_default();
        assert!(
            first.starts_with("a connection failed with ")
                && first.contains(" of 4 open: ")
                && first.contains("the app accepted")
                && first.contains("descriptors open"),
            "{first}"
        );
        let run = report::results(vec![PairFigures {
            name: "haproxy-plain".into(),
            status: "ok".into(),
            ..f
        }]);
        assert!(report::table(&run).contains("held its connections on a second attempt"));
    }

    /// A hold that fails twice is an error naming both attempts, and no
    /// memory figure.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hold_that_fails_twice_is_an_error_with_both_failures() {
        let f = hold_four_refusing_first(1_000).await;
        assert_eq!(f.held_connections, None);
        assert_eq!(f.kib_per_held_connection, None);
        assert_eq!(f.errors.len(), 1, "{f:?}");
        assert!(
            f.errors[0].starts_with("holding 4 connections: a connection failed")
                && f.errors[0].contains("; the first attempt: a connection failed"),
            "{:?}",
            f.errors
        );
    }

    #[test]
    fn each_round_runs_every_contender_once_starting_one_further_along() {
        let orders: Vec<Vec<usize>> = (0..4).map(|r| round_order(r, 3).collect()).collect();
        assert_eq!(
            orders,
            [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2]].map(Vec::from)
        );
    }

    fn latency(times_us: &[u64], errors: u64) -> load::Latency {
        let mut l = load::Latency::new().unwrap();
        for &t in times_us {
            l.histogram.record(t).unwrap();
        }
        l.errors = errors;
        l
    }

    /// A round's context switches are read from every thread of each
    /// proxy process (here this test's own process stands for one), added
    /// to the scenario's totals, and given back as the preemptions a
    /// request of that round; none for a round that answered nothing, or
    /// for stunnel, whose threads end with their connections.
    #[tokio::test]
    async fn a_rounds_switches_are_added_up_and_its_preemptions_given_a_request() {
        let mut pair = contenders::Pair::direct_to("127.0.0.1:9".parse().unwrap());
        pair.kind = Kind::Trellis;
        pair.proxies.push(contenders::ProxyProcess {
            side: "client",
            pid: std::process::id(),
        });
        let mut total = None;
        let before = side_switches(&pair);
        for _ in 0..5 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let preempted = add_side_switches(&pair, before, &mut total, 1_000);
        let sides = total.clone().expect("counted");
        assert_eq!(sides.len(), 1);
        assert!(sides[0].voluntary >= 5, "{sides:?}");
        assert_eq!(preempted, Some(sides[0].involuntary as f64 / 1_000.0));

        let before = side_switches(&pair);
        assert_eq!(add_side_switches(&pair, before, &mut total, 0), None);
        assert!(total.unwrap()[0].voluntary >= sides[0].voluntary);

        pair.kind = Kind::Stunnel;
        let mut total = None;
        let before = side_switches(&pair);
        assert_eq!(add_side_switches(&pair, before, &mut total, 1_000), None);
        assert_eq!(total, None);
    }

    #[test]
    fn a_contenders_figures_are_those_of_all_its_rounds_together() {
        let mut merged = latency(&[100; 98], 1);
        merged.merge(&latency(&[100, 5000], 2)).unwrap();
        let totals = Totals {
            // 3 GB in 1.0 s, then 1 GB in 2.0 s: 4 GB in 3 s, not the mean
            // of 3 and 0.5 GB/s.
            bulk: [(4_000_000_000, 3.0), (8_000_000_000, 4.0)],
            bulk_cpu_seconds: Some(vec![2.0, 4.0]),
            // Over the one-stream rounds' 4,000 MB.
            bulk_1_stream_switches: Some(vec![
                Switches {
                    voluntary: 10_000,
                    involuntary: 400,
                },
                Switches {
                    voluntary: 2_000,
                    involuntary: 0,
                },
            ]),
            // Over the 100 fixed-rate requests.
            latency_switches: Some(vec![
                Switches {
                    voluntary: 100,
                    involuntary: 1,
                },
                Switches {
                    voluntary: 200,
                    involuntary: 0,
                },
            ]),
            keepalive_switches: Some(vec![
                Switches {
                    voluntary: 2_000,
                    involuntary: 1_000,
                },
                Switches {
                    voluntary: 5_000,
                    involuntary: 0,
                },
            ]),
            latency: Some(merged),
            // Over the 100 fixed-rate requests and 4,000 keep-alive ones.
            latency_cpu_seconds: Some(vec![0.002, 0.005]),
            keepalive_cpu_seconds: Some(vec![0.04, 0.1]),
            keepalive_requests: 4_000,
            // Over 6,000 HTTP/2 requests.
            http2_cpu_seconds: Some(vec![0.03, 0.09]),
            http2_requests: 6_000,
            http2_host: HostTicks {
                busy: 180,
                total: 200,
                stolen: 5,
                intervals: 1,
            },
            bulk_1_stream_host: HostTicks {
                busy: 190,
                total: 200,
                stolen: 3,
                intervals: 1,
            },
            latency_host: HostTicks {
                busy: 20,
                total: 200,
                stolen: 0,
                intervals: 1,
            },
            keepalive_host: HostTicks {
                busy: 150,
                total: 200,
                stolen: 41,
                intervals: 1,
            },
            new_connection_errors: 3,
            // 9,000 connections made.
            connections_cpu_seconds: Some(vec![0.9, 0.45]),
            connections_made: 9_000,
            connections_host: HostTicks {
                busy: 180,
                total: 200,
                stolen: 2,
                intervals: 1,
            },
            failed: Vec::new(),
        };
        let mut f = PairFigures::default();
        f.rounds.keepalive_requests_per_s = vec![30_000.0, 20_000.0];
        f.rounds.keepalive_p50_us = vec![500.0, 700.0];
        f.rounds.keepalive_p99_us = vec![900.0, 1_300.0];
        f.rounds.http2_requests_per_s = vec![40_000.0, 20_000.0];
        f.rounds.http2_p50_us = vec![300.0, 500.0];
        f.rounds.http2_p99_us = vec![1_000.0, 2_000.0];
        f.rounds.new_connections_per_s = vec![4_000.0, 5_000.0];
        sum_rounds(&totals, &mut f);
        assert_eq!(
            f.bulk_1_stream_bytes_per_s.map(f64::round),
            Some(1_333_333_333.0)
        );
        assert_eq!(f.bulk_8_streams_bytes_per_s, Some(2e9));
        assert_eq!(f.cpu_seconds_per_gb, Some(0.5));
        assert_eq!(f.cpu_seconds_per_gb_by_side, [1.0 / 6.0, 2.0 / 6.0]);
        assert_eq!(f.bulk_1_stream_sleeps_per_mb, [2.5, 0.5]);
        assert_eq!(f.bulk_1_stream_preempted_per_mb, [0.1, 0.0]);
        assert_eq!(f.latency_sleeps_per_request, [1.0, 2.0]);
        assert_eq!(f.latency_preempted_per_request, [0.01, 0.0]);
        assert_eq!(f.keepalive_sleeps_per_request, [0.5, 1.25]);
        assert_eq!(f.keepalive_preempted_per_request, [0.25, 0.0]);
        // 100 requests: the p99 is the 99th fastest, one of the 100 us.
        assert_eq!(f.latency_requests, Some(100));
        assert!((f.latency_p99_us.unwrap() - 100.0).abs() < 1.0);
        assert!((f.latency_max_us.unwrap() - 5000.0).abs() < 5.0);
        assert_eq!(f.latency_errors, Some(3));
        assert_eq!(f.keepalive_requests_per_s, Some(25_000.0));
        assert_eq!(f.keepalive_p50_us, Some(600.0));
        assert_eq!(f.keepalive_p99_us, Some(1_100.0));
        assert_eq!(f.http2_requests_per_s, Some(30_000.0));
        assert_eq!(f.http2_p50_us, Some(400.0));
        assert_eq!(f.http2_p99_us, Some(1_500.0));
        assert_eq!(f.http2_stolen_ms, Some(50.0));
        let whole = |v: &[f64]| v.iter().map(|x| x.round()).collect::<Vec<_>>();
        assert_eq!(whole(&f.latency_cpu_us_per_request), [20.0, 50.0]);
        assert_eq!(whole(&f.keepalive_cpu_us_per_request), [10.0, 25.0]);
        assert_eq!(whole(&f.http2_cpu_us_per_request), [5.0, 15.0]);
        assert_eq!(f.bulk_1_stream_host_busy, Some(0.95));
        assert_eq!(f.keepalive_host_busy, Some(0.75));
        // Ticks of 10 ms.
        assert_eq!(f.bulk_1_stream_stolen_ms, Some(30.0));
        assert_eq!(f.latency_stolen_ms, Some(0.0));
        assert_eq!(f.keepalive_stolen_ms, Some(410.0));
        assert_eq!(f.new_connections_per_s, Some(4_500.0));
        assert_eq!(f.new_connection_errors, Some(3));
        assert_eq!(whole(&f.new_connection_cpu_us), [100.0, 50.0]);
        assert_eq!(f.new_connections_stolen_ms, Some(20.0));
    }

    #[test]
    fn a_scenario_that_failed_in_any_round_has_no_figure() {
        let totals = Totals {
            bulk: [(1_000_000_000, 1.0), (1_000_000_000, 1.0)],
            bulk_cpu_seconds: Some(vec![0.5, 0.5]),
            keepalive_cpu_seconds: Some(vec![1.0, 1.0]),
            keepalive_requests: 1_000,
            http2_cpu_seconds: Some(vec![1.0, 1.0]),
            http2_requests: 1_000,
            failed: vec![Scenario::Bulk8, Scenario::KeepAlive, Scenario::Http2],
            ..Totals::default()
        };
        let mut f = PairFigures::default();
        f.rounds.keepalive_requests_per_s = vec![30_000.0];
        f.rounds.http2_requests_per_s = vec![30_000.0];
        sum_rounds(&totals, &mut f);
        assert_eq!(f.bulk_1_stream_bytes_per_s, Some(1e9));
        assert_eq!(f.bulk_8_streams_bytes_per_s, None);
        // CPU per GB needs both bulk scenarios.
        assert_eq!(f.cpu_seconds_per_gb, None);
        assert_eq!(f.keepalive_requests_per_s, None);
        assert_eq!(f.keepalive_p99_us, None);
        assert!(f.keepalive_cpu_us_per_request.is_empty());
        assert_eq!(f.http2_requests_per_s, None);
        assert!(f.http2_cpu_us_per_request.is_empty());
        assert_eq!(f.latency_p99_us, None);
        // The host's ticks were never read around a round.
        assert_eq!(f.bulk_1_stream_stolen_ms, None);
        assert_eq!(f.new_connections_per_s, None);
        assert!(f.new_connection_cpu_us.is_empty());
        assert_eq!(f.new_connections_stolen_ms, None);
    }
}
