//! The benchmark suite behind `trellis-bench`: Trellis side by side with a
//! direct connection and with Envoy, HAProxy and stunnel doing the same mTLS
//! job on loopback, plus the control plane at scale. Every figure is taken
//! in one run and reported as a ratio to the direct baseline of that run (or
//! to raw signing for issuance), never as a single absolute time.
//!
//! Layout: [`certs`] makes the shared credentials, [`app`] is the server
//! behind every pair, [`contenders`] starts the pairs, [`load`] drives
//! traffic, [`system`] reads CPU and memory and pins processes,
//! [`control`] and [`propagation`] run the control-plane scenarios and
//! [`report`] prints the
//! table, writes the JSON and checks the targets.
//!
//! It only ever listens on and dials loopback addresses.

pub mod app;
pub mod certs;
pub mod contenders;
pub mod control;
pub mod load;
pub mod propagation;
pub mod report;
pub mod system;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use crate::binaries::Launcher;
use contenders::{Kind, Setup, Start};
use system::{Pinning, cpu_seconds, rss_kib};

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
    pub bulk_seconds: f64,
    pub bulk_max_bytes_per_stream: u64,
    pub latency_seconds: f64,
    pub latency_rate: f64,
    pub http_connections: usize,
    pub keepalive_seconds: f64,
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
                bulk_seconds: 1.0,
                bulk_max_bytes_per_stream: 16 << 20,
                latency_seconds: 0.0,
                latency_rate: 0.0,
                http_connections: 0,
                keepalive_seconds: 0.0,
                connection_seconds: 0.0,
                connection_concurrency: 0,
                held_connections: 0,
                held_connections_requested: 0,
                control: None,
            },
            Mode::Quick => Sizes {
                bulk_seconds: 2.0,
                bulk_max_bytes_per_stream: 64 << 30,
                latency_seconds: 3.0,
                latency_rate: 1000.0,
                http_connections: 16,
                keepalive_seconds: 2.0,
                connection_seconds: 2.0,
                connection_concurrency: 16,
                held_connections: 1000,
                held_connections_requested: 1000,
                control: Some(control::ControlSizes {
                    issuance_certs: 2000,
                    issuance_clients: 64,
                    watchers: vec![1000],
                    propagation_rounds: 3,
                }),
            },
            Mode::Full => Sizes {
                bulk_seconds: 5.0,
                bulk_max_bytes_per_stream: 64 << 30,
                latency_seconds: 10.0,
                latency_rate: 2000.0,
                http_connections: 16,
                keepalive_seconds: 5.0,
                connection_seconds: 5.0,
                connection_concurrency: 16,
                held_connections: 10_000,
                held_connections_requested: 10_000,
                control: Some(control::ControlSizes {
                    issuance_certs: 10_000,
                    issuance_clients: 64,
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
    pub latency_errors: Option<u64>,
    pub keepalive_requests_per_s: Option<f64>,
    pub keepalive_tool: Option<String>,
    pub new_connections_per_s: Option<f64>,
    pub new_connection_errors: Option<u64>,
    pub cpu_seconds_per_gb: Option<f64>,
    /// Per proxy process, client side first.
    pub rss_idle_kib: Vec<u64>,
    pub rss_held_kib: Vec<u64>,
    pub held_connections: Option<usize>,
    /// The larger of the two proxies' (held - idle) / connections.
    pub kib_per_held_connection: Option<f64>,
    pub errors: Vec<String>,
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
    pub control_plane: Option<control::ControlFigures>,
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

    let mut figures = Vec::new();
    for &kind in &options.contenders {
        eprintln!("trellis-bench: {} ...", kind.name());
        let mut f = PairFigures {
            name: kind.name().to_string(),
            ..PairFigures::default()
        };
        match contenders::start(kind, &setup).await {
            Ok(Start::Missing(reason)) => {
                eprintln!("trellis-bench: {} is missing: {reason}", kind.name());
                f.status = "missing".into();
                f.reason = Some(reason);
            }
            Err(e) => {
                eprintln!("trellis-bench: {} did not start: {e:#}", kind.name());
                f.status = "failed".into();
                f.reason = Some(format!("{e:#}"));
            }
            Ok(Start::Ready(pair)) => {
                f.status = "ok".into();
                f.version = pair.version.clone();
                measure_pair(&pair, &sizes, wrk.as_deref(), dir.path(), &mut f).await;
                pair.stop();
                for e in &f.errors {
                    eprintln!("trellis-bench: {}: {e}", kind.name());
                }
            }
        }
        figures.push(f);
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
        control_plane,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

fn pair_cpu(pair: &contenders::Pair) -> Option<f64> {
    pair.proxies
        .iter()
        .map(|p| cpu_seconds(p.pid))
        .sum::<Option<f64>>()
}

fn pair_rss(pair: &contenders::Pair) -> Vec<u64> {
    pair.proxies.iter().filter_map(|p| rss_kib(p.pid)).collect()
}

/// Every data-plane scenario against one running pair; a failed scenario
/// is recorded and the next one runs.
async fn measure_pair(
    pair: &contenders::Pair,
    sizes: &Sizes,
    wrk: Option<&std::path::Path>,
    dir: &std::path::Path,
    f: &mut PairFigures,
) {
    let entry = pair.entry;
    f.rss_idle_kib = pair_rss(pair);

    // Bulk, with the proxies' CPU time over both runs.
    let cpu_before = pair_cpu(pair);
    let mut moved = 0u64;
    for streams in [1usize, 8] {
        if streams > 1 && sizes.http_connections == 0 {
            break; // smoke: one stream only
        }
        let per_stream = sizes.bulk_max_bytes_per_stream / streams as u64;
        match load::bulk(entry, streams, secs(sizes.bulk_seconds), per_stream).await {
            Ok(b) => {
                moved += b.bytes;
                let rate = Some(b.bytes_per_second());
                if streams == 1 {
                    f.bulk_1_stream_bytes_per_s = rate;
                } else {
                    f.bulk_8_streams_bytes_per_s = rate;
                }
            }
            Err(e) => f.errors.push(format!("bulk {streams} streams: {e:#}")),
        }
    }
    if let (Some(before), Some(after)) = (cpu_before, pair_cpu(pair))
        && moved > 0
        && !pair.proxies.is_empty()
    {
        f.cpu_seconds_per_gb = Some((after - before) / (moved as f64 / 1e9));
    }
    if sizes.http_connections == 0 {
        return;
    }

    match load::fixed_rate(
        entry,
        sizes.http_connections,
        sizes.latency_rate,
        secs(sizes.latency_seconds),
    )
    .await
    {
        Ok(l) => {
            f.latency_rate_per_s = Some(l.rate);
            f.latency_p50_us = Some(l.p50_us);
            f.latency_p99_us = Some(l.p99_us);
            f.latency_p999_us = Some(l.p999_us);
            f.latency_max_us = Some(l.max_us);
            f.latency_errors = Some(l.errors);
        }
        Err(e) => f.errors.push(format!("fixed-rate latency: {e:#}")),
    }

    let keepalive = match wrk {
        Some(wrk) => {
            f.keepalive_tool = Some(format!("wrk -t1 -c{}", sizes.http_connections));
            load::keepalive_rate_wrk(
                wrk,
                dir,
                entry,
                sizes.http_connections,
                secs(sizes.keepalive_seconds),
            )
            .await
        }
        None => {
            f.keepalive_tool = Some(format!(
                "trellis-bench closed loop, {} connections",
                sizes.http_connections
            ));
            load::keepalive_rate(
                entry,
                sizes.http_connections,
                secs(sizes.keepalive_seconds),
                10_000_000,
            )
            .await
        }
    };
    match keepalive {
        Ok(rate) => f.keepalive_requests_per_s = Some(rate),
        Err(e) => f.errors.push(format!("keep-alive rate: {e:#}")),
    }

    match load::connection_rate(
        entry,
        sizes.connection_concurrency,
        secs(sizes.connection_seconds),
        1_000_000,
    )
    .await
    {
        Ok((rate, errors)) => {
            f.new_connections_per_s = Some(rate);
            f.new_connection_errors = Some(errors);
        }
        Err(e) => f.errors.push(format!("new connections: {e:#}")),
    }
    // Let closed connections leave the proxies before measuring memory.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let idle = pair_rss(pair);
    let n = sizes.held_connections;
    match load::hold_connections(entry, n, 64, Duration::from_secs(120)).await {
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
            drop(held);
        }
        Err(e) => f.errors.push(format!("holding {n} connections: {e:#}")),
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
