//! The report of a run: ratios to the direct baseline of the same run, the
//! targets of issue 7 checked against them, a table for the terminal and the
//! JSON document (figures, ratios, targets).

use serde_json::{Value, json};

use super::control::ControlFigures;
use super::profile::{self, Profiles};
use super::{PairFigures, Results, RoundFigures};

/// One figure of a contender relative to direct (or, for figures direct
/// does not have, to Envoy).
fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn diff(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(a? - b?)
}

fn find<'a>(results: &'a Results, name: &str) -> Option<&'a PairFigures> {
    results
        .contenders
        .iter()
        .find(|c| c.name == name && c.status == "ok")
}

fn max_kib(v: &[u64]) -> Option<f64> {
    v.iter().max().map(|&k| k as f64)
}

/// A contender's figure in each round over direct's in the same round.
fn round_ratios(
    c: &PairFigures,
    direct: Option<&PairFigures>,
    get: fn(&RoundFigures) -> &[f64],
) -> Vec<f64> {
    let Some(direct) = direct else {
        return Vec::new();
    };
    get(&c.rounds)
        .iter()
        .zip(get(&direct.rounds))
        .filter(|(_, d)| **d > 0.0)
        .map(|(c, d)| c / d)
        .collect()
}

/// Ratios of one contender to direct (and a few to Envoy).
pub fn ratios(results: &Results, c: &PairFigures) -> Value {
    let direct = find(results, "direct");
    let envoy = find(results, "envoy");
    let d = |get: fn(&PairFigures) -> Option<f64>| ratio(get(c), direct.and_then(get));
    let e = |get: fn(&PairFigures) -> Option<f64>| ratio(get(c), envoy.and_then(get));
    let added = |get: fn(&PairFigures) -> Option<f64>| diff(get(c), direct.and_then(get));
    let rounds = |get: fn(&RoundFigures) -> &[f64]| round_ratios(c, direct, get);
    json!({
        "bulk_1_stream_to_direct": d(|f| f.bulk_1_stream_bytes_per_s),
        "bulk_1_stream_to_direct_by_round": rounds(|r| &r.bulk_1_stream_bytes_per_s),
        "bulk_8_streams_to_direct": d(|f| f.bulk_8_streams_bytes_per_s),
        "bulk_8_streams_to_direct_by_round": rounds(|r| &r.bulk_8_streams_bytes_per_s),
        "keepalive_requests_to_direct": d(|f| f.keepalive_requests_per_s),
        "keepalive_requests_to_direct_by_round": rounds(|r| &r.keepalive_requests_per_s),
        "http2_requests_to_direct": d(|f| f.http2_requests_per_s),
        "http2_requests_to_direct_by_round": rounds(|r| &r.http2_requests_per_s),
        "new_connections_to_direct": d(|f| f.new_connections_per_s),
        "new_connections_to_direct_by_round": rounds(|r| &r.new_connections_per_s),
        "added_p50_us": added(|f| f.latency_p50_us),
        "added_p99_us": added(|f| f.latency_p99_us),
        "added_p999_us": added(|f| f.latency_p999_us),
        "keepalive_added_p50_us": added(|f| f.keepalive_p50_us),
        "keepalive_added_p99_us": added(|f| f.keepalive_p99_us),
        "http2_added_p50_us": added(|f| f.http2_p50_us),
        "http2_added_p99_us": added(|f| f.http2_p99_us),
        "new_connections_to_envoy": e(|f| f.new_connections_per_s),
        "cpu_per_gb_to_envoy": e(|f| f.cpu_seconds_per_gb),
        "idle_rss_to_envoy": ratio(max_kib(&c.rss_idle_kib), envoy.and_then(|f| max_kib(&f.rss_idle_kib))),
    })
}

/// A share as a whole percentage.
fn percent(share: Option<f64>) -> String {
    fmt_opt(share, |x| format!("{:.0} %", x * 100.0))
}

/// More than this share of a pair's fixed-rate requests fell due while
/// the one before them was unanswered, and its p99 is a queued request's:
/// the rate was more than the pair kept up with on this host.
const FELL_BEHIND: f64 = 0.01;

/// The share of `c`'s fixed-rate requests that fell due while the one
/// before them on their connection was unanswered.
fn queued_share(c: &PairFigures) -> Option<f64> {
    let requests = c.latency_requests.filter(|n| *n > 0)?;
    Some(c.latency_queued? as f64 / requests as f64)
}

/// The table's row of the CPU the hypervisor took from the machine during
/// a scenario's rounds (`steal`; see `PairFigures::latency_stolen_ms`).
const STOLEN: &str = "  CPU stolen by the host (ms)";

fn stolen_ms(ms: Option<f64>) -> String {
    fmt_opt(ms, |x| format!("{x:.0}"))
}

/// Trellis's round with the largest p99 (`p99`, round by round), and the
/// CPU the host stole during it against the least and most it stole in the
/// other rounds (`stolen`): whether the worst tail came with the host
/// taking the cores. When they were counted, the same for how often the
/// two sidecars were preempted a request (`preempted`): whether it came
/// with other processes taking their cores.
fn worst_round(p99: &[f64], stolen: &[f64], preempted: &[f64]) -> Option<Value> {
    if p99.len() < 2 || stolen.len() != p99.len() {
        return None;
    }
    let worst = (0..p99.len()).max_by(|&a, &b| p99[a].total_cmp(&p99[b]))?;
    // The least and the most of the other rounds' figures.
    let others = |figures: &[f64]| {
        let others = figures
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != worst)
            .map(|(_, x)| *x);
        let least = others.clone().fold(f64::INFINITY, f64::min);
        json!([least, others.fold(f64::NEG_INFINITY, f64::max)])
    };
    let mut round = json!({
        "round": worst + 1,
        "p99_us": p99[worst],
        "stolen_ms": stolen[worst],
        "others_stolen_ms": others(stolen),
    });
    if preempted.len() == p99.len() {
        round["preempted_per_request"] = json!(preempted[worst]);
        round["others_preempted_per_request"] = others(preempted);
    }
    Some(round)
}

/// One figure per proxy, client side first, with `decimals` places ("-"
/// for direct, which has none).
fn per_side(sides: &[f64], decimals: usize) -> String {
    if sides.is_empty() {
        return "-".into();
    }
    sides
        .iter()
        .map(|x| format!("{x:.decimals$}"))
        .collect::<Vec<_>>()
        .join(" / ")
}

/// A target of issue 7: what, the bound, the value and whether it is met
/// (`null` when it could not be measured).
fn target(name: &str, bound: &str, value: Option<f64>, met: Option<bool>) -> Value {
    json!({ "target": name, "bound": bound, "value": value, "met": met })
}

/// The same figure of the plaintext pair (`haproxy-plain`) in this run,
/// when it ran: the best any pair of proxies reached on this machine,
/// with no cipher and no copy through user space. And, when the run had
/// more than one round, the lowest and highest of Trellis's ratios to
/// direct round by round (from `trellis`, its ratios), how much the host
/// moved them.
fn with_ceiling(mut target: Value, results: &Results, trellis: &Value, key: &str) -> Value {
    let ceiling = find(results, "haproxy-plain").and_then(|p| ratios(results, p)[key].as_f64());
    if let Some(ceiling) = ceiling {
        target["plaintext_pair"] = json!(ceiling);
    }
    let by_round: Vec<f64> = trellis[format!("{key}_by_round")]
        .as_array()
        .map(|v| v.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    name_rounds(&mut target, &by_round);
    target
}

/// Names in `target` the lowest and highest of a figure's rounds, when
/// there was more than one.
fn name_rounds(target: &mut Value, by_round: &[f64]) {
    if by_round.len() > 1 {
        let low = by_round.iter().copied().fold(f64::INFINITY, f64::min);
        let high = by_round.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        target["rounds"] = json!([low, high]);
    }
}

/// Trellis against the targets of issue 7.
pub fn targets(results: &Results) -> Vec<Value> {
    let mut out = match find(results, "trellis") {
        Some(t) => data_plane_targets(results, t),
        None => vec![target(
            "Trellis was not measured in this run",
            "-",
            None,
            None,
        )],
    };
    if let Some(c) = &results.control_plane {
        out.push(issuance_target(c));
        let watch = c.headline_watch();
        let p99 = watch.and_then(|w| w.propagation_p99_ms);
        out.push(target(
            &format!(
                "propagation p99 to {} watchers (ms)",
                watch.map_or(0, |w| w.watchers)
            ),
            "< 250 (at 1,000)",
            p99,
            p99.map(|v| v < 250.0),
        ));
    }
    out
}

/// The issuance target, with the lowest and highest round's ratio when
/// there was more than one, and the CPU the host stole while issuing and
/// while signing raw.
fn issuance_target(c: &ControlFigures) -> Value {
    let ratio = c.issuance_ratio_to_raw;
    let mut t = target(
        "end-to-end issuance to raw signing",
        ">= 0.25",
        ratio,
        ratio.map(|v| v >= 0.25),
    );
    let by_round: Vec<f64> = c.issuance_by_round.iter().map(|r| r.ratio_to_raw).collect();
    name_rounds(&mut t, &by_round);
    if let (Some(issuing), Some(signing)) = (c.issuance_stolen_ms, c.raw_signing_stolen_ms) {
        t["stolen_ms"] = json!({ "issuing": issuing, "signing": signing });
    }
    t
}

/// The targets of the Trellis pair.
fn data_plane_targets(results: &Results, t: &PairFigures) -> Vec<Value> {
    let r = ratios(results, t);
    let get = |k: &str| r.get(k).and_then(Value::as_f64);
    let peers: Vec<&PairFigures> = ["envoy", "envoy-http", "haproxy", "stunnel"]
        .iter()
        .filter_map(|n| find(results, n))
        .collect();
    // Trellis's added tail against each peer's in the same measure, over
    // every round together and round by round.
    let tail = |name: String,
                get: fn(&PairFigures) -> Option<f64>,
                by_round: fn(&RoundFigures) -> &[f64],
                stolen: fn(&RoundFigures) -> &[f64],
                preempted: fn(&RoundFigures) -> &[f64]| {
        let direct = find(results, "direct");
        let added = diff(get(t), direct.and_then(get));
        let added_peers: Vec<(&str, f64)> = peers
            .iter()
            .filter_map(|p| Some((p.name.as_str(), diff(get(p), direct.and_then(get))?)))
            .collect();
        let met = added.map(|v| v <= 500.0 && added_peers.iter().all(|(_, p)| v < *p));
        let mut target = target(&name, "<= 500 and below every peer", added, met);
        if let Some((peer, value)) = added_peers.iter().min_by(|a, b| a.1.total_cmp(&b.1)) {
            target["nearest_peer"] = json!({ "name": peer, "added": value });
        }
        if let Some(direct) = direct {
            let below = rounds_below_every_peer(t, direct, &peers, by_round);
            if below.1 > 1 {
                target["rounds_below_every_peer"] = json!([below.0, below.1]);
            }
        }
        let rounds = &t.rounds;
        if let Some(worst) = worst_round(by_round(rounds), stolen(rounds), preempted(rounds)) {
            target["worst_round"] = worst;
        }
        target
    };
    let closed_loop = t.keepalive_tool.as_deref().unwrap_or("the closed loop");
    let idle_mib = max_kib(&t.rss_idle_kib).map(|k| k / 1024.0);
    vec![
        with_ceiling(
            target(
                "bulk throughput, 1 stream, to direct",
                ">= 0.55",
                get("bulk_1_stream_to_direct"),
                get("bulk_1_stream_to_direct").map(|v| v >= 0.55),
            ),
            results,
            &r,
            "bulk_1_stream_to_direct",
        ),
        with_ceiling(
            target(
                "keep-alive request rate to direct",
                ">= 0.45",
                get("keepalive_requests_to_direct"),
                get("keepalive_requests_to_direct").map(|v| v >= 0.45),
            ),
            results,
            &r,
            "keepalive_requests_to_direct",
        ),
        fell_behind(
            results,
            tail(
                "added p99 at a fixed rate (us)".into(),
                |f| f.latency_p99_us,
                |r| &r.latency_p99_us,
                |r| &r.latency_stolen_ms,
                |r| &r.latency_preempted_per_request,
            ),
        ),
        // The measure issue 7 gives Envoy's tail in ("under wrk -c16").
        tail(
            format!("added p99 under {closed_loop} (us)"),
            |f| f.keepalive_p99_us,
            |r| &r.keepalive_p99_us,
            |r| &r.keepalive_stolen_ms,
            |r| &r.keepalive_preempted_per_request,
        ),
        new_connections_target(results, t, get("new_connections_to_envoy")),
        target(
            "idle RSS per proxy process (MiB)",
            "<= 10",
            idle_mib,
            idle_mib.map(|v| v <= 10.0),
        ),
        target(
            "RSS per held connection, per proxy (KiB)",
            "<= 30",
            t.kib_per_held_connection,
            t.kib_per_held_connection.map(|v| v <= 30.0),
        ),
    ]
}

/// The new-connection target (`ratio`, Trellis's rate to Envoy's), with
/// the lowest and highest of its rounds' ratios: round by round, each
/// against Envoy's rate in the same round, as the rounds interleave them.
fn new_connections_target(results: &Results, t: &PairFigures, ratio: Option<f64>) -> Value {
    let mut target = target(
        "new mTLS connections per second to Envoy's",
        ">= 2",
        ratio,
        ratio.map(|v| v >= 2.0),
    );
    if let Some(envoy) = find(results, "envoy") {
        let by_round: Vec<f64> = t
            .rounds
            .new_connections_per_s
            .iter()
            .zip(&envoy.rounds.new_connections_per_s)
            .filter(|(_, envoy)| **envoy > 0.0)
            .map(|(trellis, envoy)| trellis / envoy)
            .collect();
        name_rounds(&mut target, &by_round);
    }
    target
}

/// Names, in `target`, the contenders that fell behind the fixed rate
/// (more than [`FELL_BEHIND`] of their requests queued): their tails, and
/// so the comparison, are of a queue the rate built on this host.
fn fell_behind(results: &Results, mut target: Value) -> Value {
    let behind: Vec<&str> = results
        .contenders
        .iter()
        .filter(|c| c.status == "ok" && queued_share(c).is_some_and(|s| s > FELL_BEHIND))
        .map(|c| c.name.as_str())
        .collect();
    if !behind.is_empty() {
        target["fell_behind"] = json!(behind);
    }
    target
}

/// In how many rounds Trellis's figure added less to direct's than every
/// peer's did in the same round, of the rounds every one of them has: how
/// steady "below every peer" is under the host's noise.
fn rounds_below_every_peer(
    trellis: &PairFigures,
    direct: &PairFigures,
    peers: &[&PairFigures],
    get: fn(&RoundFigures) -> &[f64],
) -> (usize, usize) {
    let ours = get(&trellis.rounds);
    let base = get(&direct.rounds);
    let rounds = peers
        .iter()
        .map(|p| get(&p.rounds).len())
        .chain([ours.len(), base.len()])
        .min()
        .unwrap_or(0);
    let below = (0..rounds)
        .filter(|&i| {
            let added = ours[i] - base[i];
            peers.iter().all(|p| added < get(&p.rounds)[i] - base[i])
        })
        .count();
    (below, rounds)
}

/// What the table says under it about each contender that is not what its
/// name alone says, in the order the notes are printed.
const CONTENDER_NOTES: [(&str, &str); 3] = [
    (
        "trellis-l4",
        "Trellis with the app's port opaque (bytes copied, no HTTP parsed, no per-request policy \
         or access log), the work the peers' TCP-mode pairs do; the targets are Trellis's own \
         defaults (HTTP inspected)",
    ),
    (
        "envoy-http",
        "the Envoy pair inspecting HTTP as a mesh's sidecars do (protocol sniffed, ALPN, \
         per-request RBAC on the caller's SPIFFE ID, its identity in x-forwarded-client-cert, no \
         access log), the work Trellis's defaults do; a peer in the targets",
    ),
    (
        "haproxy-plain",
        "the HAProxy pair with no TLS, moving bytes with splice: the least work a pair of \
         proxies can do here, so the best ratio any pair could reach on this machine; not a peer \
         in the targets",
    ),
];

/// The JSON document of a run.
pub fn json(results: &Results) -> Value {
    let ratios: serde_json::Map<String, Value> = results
        .contenders
        .iter()
        .filter(|c| c.status == "ok")
        .map(|c| (c.name.clone(), ratios(results, c)))
        .collect();
    json!({
        "results": results,
        "ratios": ratios,
        "targets": targets(results),
    })
}

fn fmt_opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map(f).unwrap_or_else(|| "-".into())
}

/// Percentiles in whole microseconds, "a / b", signed for amounts added;
/// "-" unless every one was measured.
fn micros(values: &[Option<f64>], signed: bool) -> String {
    let Some(values) = values.iter().copied().collect::<Option<Vec<f64>>>() else {
        return "-".into();
    };
    let cells: Vec<String> = values
        .iter()
        .map(|x| {
            if signed {
                format!("{x:+.0}")
            } else {
                format!("{x:.0}")
            }
        })
        .collect();
    cells.join(" / ")
}

/// The table printed at the end of a run.
pub fn table(results: &Results) -> String {
    let cols: Vec<&PairFigures> = results.contenders.iter().collect();
    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    let mut row = |label: &str, cell: &dyn Fn(&PairFigures, &Value) -> String| {
        let cells = cols
            .iter()
            .map(|c| {
                if c.status != "ok" {
                    return c.status.clone();
                }
                cell(c, &ratios(results, c))
            })
            .collect();
        rows.push((label.to_string(), cells));
    };
    let r = |v: &Value, k: &str| v.get(k).and_then(Value::as_f64);
    let gbps = |b: f64| format!("{:.2} GB/s", b / 1e9);
    row("bulk 1 stream", &|c, _| {
        fmt_opt(c.bulk_1_stream_bytes_per_s, gbps)
    });
    row("  ratio to direct", &|_, v| {
        fmt_opt(r(v, "bulk_1_stream_to_direct"), |x| format!("{x:.2}"))
    });
    row("  host CPU busy", &|c, _| {
        percent(c.bulk_1_stream_host_busy)
    });
    row(STOLEN, &|c, _| stolen_ms(c.bulk_1_stream_stolen_ms));
    row("  sleeps a MB (c / s)", &|c, _| {
        per_side(&c.bulk_1_stream_sleeps_per_mb, 2)
    });
    row("  preempted a MB (c / s)", &|c, _| {
        per_side(&c.bulk_1_stream_preempted_per_mb, 2)
    });
    row("bulk 8 streams", &|c, _| {
        fmt_opt(c.bulk_8_streams_bytes_per_s, gbps)
    });
    row("  ratio to direct", &|_, v| {
        fmt_opt(r(v, "bulk_8_streams_to_direct"), |x| format!("{x:.2}"))
    });
    row("fixed rate p50 / p99 (us)", &|c, _| {
        micros(&[c.latency_p50_us, c.latency_p99_us], false)
    });
    row("  added p50 / p99 / p99.9", &|_, v| {
        let added = ["added_p50_us", "added_p99_us", "added_p999_us"];
        micros(&added.map(|k| r(v, k)), true)
    });
    row("  CPU us a request (c / s)", &|c, _| {
        per_side(&c.latency_cpu_us_per_request, 0)
    });
    row("  sleeps a request (c / s)", &|c, _| {
        per_side(&c.latency_sleeps_per_request, 2)
    });
    row("  preempted a request (c / s)", &|c, _| {
        per_side(&c.latency_preempted_per_request, 2)
    });
    row("  fell behind the rate", &|c, _| {
        fmt_opt(queued_share(c), |x| format!("{:.1} %", x * 100.0))
    });
    row(STOLEN, &|c, _| stolen_ms(c.latency_stolen_ms));
    row("keep-alive req/s", &|c, _| {
        fmt_opt(c.keepalive_requests_per_s, |x| format!("{x:.0}"))
    });
    row("  ratio to direct", &|_, v| {
        fmt_opt(r(v, "keepalive_requests_to_direct"), |x| format!("{x:.2}"))
    });
    row("  its p50 / p99 (us)", &|c, _| {
        micros(&[c.keepalive_p50_us, c.keepalive_p99_us], false)
    });
    row("  added p50 / p99", &|_, v| {
        let added = ["keepalive_added_p50_us", "keepalive_added_p99_us"];
        micros(&added.map(|k| r(v, k)), true)
    });
    row("  CPU us a request (c / s)", &|c, _| {
        per_side(&c.keepalive_cpu_us_per_request, 0)
    });
    row("  host CPU busy", &|c, _| percent(c.keepalive_host_busy));
    row("  sleeps a request (c / s)", &|c, _| {
        per_side(&c.keepalive_sleeps_per_request, 2)
    });
    row("  preempted a request (c / s)", &|c, _| {
        per_side(&c.keepalive_preempted_per_request, 2)
    });
    row(STOLEN, &|c, _| stolen_ms(c.keepalive_stolen_ms));
    if results.sizes.http2_connections > 0 && results.http2_not_run.is_none() {
        row("HTTP/2 req/s", &|c, _| {
            fmt_opt(c.http2_requests_per_s, |x| format!("{x:.0}"))
        });
        row("  ratio to direct", &|_, v| {
            fmt_opt(r(v, "http2_requests_to_direct"), |x| format!("{x:.2}"))
        });
        row("  its p50 / p99 (us)", &|c, _| {
            micros(&[c.http2_p50_us, c.http2_p99_us], false)
        });
        row("  added p50 / p99", &|_, v| {
            let added = ["http2_added_p50_us", "http2_added_p99_us"];
            micros(&added.map(|k| r(v, k)), true)
        });
        row("  CPU us a request (c / s)", &|c, _| {
            per_side(&c.http2_cpu_us_per_request, 0)
        });
        row(STOLEN, &|c, _| stolen_ms(c.http2_stolen_ms));
    }
    row("new connections/s", &|c, _| {
        fmt_opt(c.new_connections_per_s, |x| format!("{x:.0}"))
    });
    row("  ratio to direct", &|_, v| {
        fmt_opt(r(v, "new_connections_to_direct"), |x| format!("{x:.3}"))
    });
    row("  ratio to envoy", &|_, v| {
        fmt_opt(r(v, "new_connections_to_envoy"), |x| format!("{x:.2}"))
    });
    row("  CPU us a connection (c / s)", &|c, _| {
        per_side(&c.new_connection_cpu_us, 0)
    });
    row(STOLEN, &|c, _| stolen_ms(c.new_connections_stolen_ms));
    row("CPU s per GB (both proxies)", &|c, _| {
        fmt_opt(c.cpu_seconds_per_gb, |x| format!("{x:.2}"))
    });
    row("  each proxy (c / s)", &|c, _| {
        per_side(&c.cpu_seconds_per_gb_by_side, 2)
    });
    row("idle RSS MiB (client/server)", &|c, _| {
        if c.rss_idle_kib.is_empty() {
            "-".into()
        } else {
            c.rss_idle_kib
                .iter()
                .map(|k| format!("{:.1}", *k as f64 / 1024.0))
                .collect::<Vec<_>>()
                .join("/")
        }
    });
    row("RSS MiB holding N conns", &|c, _| {
        if c.rss_held_kib.is_empty() {
            "-".into()
        } else {
            c.rss_held_kib
                .iter()
                .map(|k| format!("{:.1}", *k as f64 / 1024.0))
                .collect::<Vec<_>>()
                .join("/")
        }
    });
    row("  KiB per held connection", &|c, _| {
        fmt_opt(c.kib_per_held_connection, |x| format!("{x:.1}"))
    });

    let width = 30;
    // Wide enough for the widest cell, with two spaces before it.
    let col = rows
        .iter()
        .flat_map(|(_, cells)| cells.iter().map(String::len))
        .chain(cols.iter().map(|c| c.name.len()))
        .max()
        .map_or(24, |widest| (widest + 2).max(24));
    let machine = &results.machine;
    let mut out = format!(
        "trellis-bench ({:?}) on {} cores ({}; idle cores: {}; TCP congestion control: {}), {}\n",
        results.mode,
        machine.cpus,
        machine.cpu_model,
        machine.cpu_idle,
        machine.tcp_congestion,
        results.pinning
    );
    if results.sizes.rounds > 1 && !cols.is_empty() {
        out.push_str(&format!(
            "bulk, fixed rate, keep-alive, HTTP/2 and new connections in {} interleaved rounds \
             (each round runs every contender in turn); figures are of all rounds together\n",
            results.sizes.rounds
        ));
        if let Some(tool) = cols.iter().find_map(|c| c.http2_tool.as_deref()) {
            out.push_str(&format!(
                "HTTP/2: {tool} (HTTP/2 with prior knowledge, as gRPC over cleartext; a 1 KiB \
                 POST, a 1 KiB answer; the pair carries it over mTLS)\n"
            ));
        }
    }
    if let Some(why) = results
        .http2_not_run
        .as_deref()
        .filter(|_| !cols.is_empty())
    {
        out.push_str(&format!("HTTP/2 rate not run: {why}\n"));
    }
    // A control-plane-only run has no contender columns to show.
    if cols.is_empty() {
        rows.clear();
    } else {
        out.push_str(&format!("{:width$}", ""));
        for c in &cols {
            out.push_str(&format!("{:>col$}", c.name));
        }
        out.push('\n');
    }
    for (label, cells) in rows {
        out.push_str(&format!("{label:width$}"));
        for cell in cells {
            out.push_str(&format!("{cell:>col$}"));
        }
        out.push('\n');
    }
    for c in &cols {
        if let Some(reason) = &c.reason {
            out.push_str(&format!("{} {}: {reason}\n", c.name, c.status));
        }
    }
    for c in &cols {
        if let Some(first) = &c.hold_retried {
            out.push_str(&format!(
                "{}: held its connections on a second attempt; the first: {first}\n",
                c.name
            ));
        }
    }
    for (name, note) in CONTENDER_NOTES {
        if cols.iter().any(|c| c.name == name) {
            out.push_str(&format!("{name}: {note}\n"));
        }
    }
    if let Some(cp) = &results.control_plane {
        out.push_str("\ncontrol plane\n");
        let f = |v: Option<f64>, unit: &str| fmt_opt(v, |x| format!("{x:.1}{unit}"));
        let rounds = cp.issuance_by_round.len();
        out.push_str(&format!(
            "  issuance ({} clients, {} certs in {rounds} round{}, each followed by raw signing): {} /s end to end, raw rcgen {} /s, ratio {}\n",
            cp.issuance_clients,
            cp.issuance_certs,
            if rounds == 1 { "" } else { "s" },
            f(cp.issued_per_second, ""),
            f(cp.raw_signing_per_second, ""),
            fmt_opt(cp.issuance_ratio_to_raw, |x| format!("{x:.3}")),
        ));
        if let (Some(issuing), Some(signing)) = (cp.issuance_stolen_ms, cp.raw_signing_stolen_ms) {
            out.push_str(&format!(
                "  CPU stolen by the host: {issuing:.0} ms while issuing, {signing:.0} ms while signing raw\n"
            ));
        }
        out.push_str(&format!(
            "  CPU per certificate: control plane {}, clients {}\n",
            f(cp.issuance_control_plane_cpu_us_per_cert, " us"),
            f(cp.issuance_clients_cpu_us_per_cert, " us"),
        ));
        out.push_str(&format!(
            "  join tokens via the Admin API: {} /s\n",
            f(cp.tokens_per_second, "")
        ));
        for w in &cp.watch {
            out.push_str(&format!(
                "  propagation to {} watchers ({} rounds): p50 {}, p99 {}, max {}{}\n",
                w.watchers,
                w.propagation_rounds,
                f(w.propagation_p50_ms, " ms"),
                f(w.propagation_p99_ms, " ms"),
                f(w.propagation_max_ms, " ms"),
                match w.watch_streams_reopened {
                    0 => String::new(),
                    n => format!(" ({n} broken streams re-opened)"),
                },
            ));
            out.push_str(&format!(
                "  a workload joining, to {} watchers ({} rounds): p50 {}, p99 {}, {} a watcher, control-plane CPU {} a join\n",
                w.watchers,
                w.join_rounds,
                f(w.join_p50_ms, " ms"),
                f(w.join_p99_ms, " ms"),
                f(w.join_snapshot_bytes, " bytes"),
                f(w.join_control_plane_cpu_seconds.map(|s| s * 1000.0), " ms"),
            ));
            out.push_str(&format!(
                "  {} sidecars reconnecting at once: all ready after {} (p50 {}, p99 {}); CPU a sidecar: control plane {}, simulated sidecars {}\n",
                w.watchers,
                f(w.reconnect_all_ready_ms, " ms"),
                f(w.reconnect_p50_ms, " ms"),
                f(w.reconnect_p99_ms, " ms"),
                f(w.reconnect_control_plane_cpu_ms, " ms"),
                f(w.reconnect_simulated_cpu_ms, " ms"),
            ));
            if let Some(kib) = w.control_plane_rss_kib_with_watchers {
                out.push_str(&format!(
                    "  control plane with {} watchers: RSS {:.0} MiB, CPU {} per round\n",
                    w.watchers,
                    kib as f64 / 1024.0,
                    f(w.control_plane_cpu_seconds_per_round, " s"),
                ));
            }
            for e in &w.errors {
                out.push_str(&format!("  error ({} watchers): {e}\n", w.watchers));
            }
        }
        out.push_str(&format!("  trigger: {}\n", cp.propagation_trigger));
        for e in &cp.errors {
            out.push_str(&format!("  error: {e}\n"));
        }
    }
    out.push_str("\ntargets (Trellis, issue 7)\n");
    for t in targets(results) {
        let met = match t.get("met").and_then(Value::as_bool) {
            Some(true) => "met",
            Some(false) => "NOT met",
            None => "not measured",
        };
        let mut notes = Vec::new();
        if let Some(c) = t["plaintext_pair"].as_f64() {
            notes.push(format!("plaintext pair {c:.3}"));
        }
        if let (Some(low), Some(high)) = (t["rounds"][0].as_f64(), t["rounds"][1].as_f64()) {
            notes.push(format!("rounds {low:.3} to {high:.3}"));
        }
        if let (Some(peer), Some(added)) = (
            t["nearest_peer"]["name"].as_str(),
            t["nearest_peer"]["added"].as_f64(),
        ) {
            notes.push(format!("nearest peer {peer} {added:+.0}"));
        }
        if let (Some(below), Some(rounds)) = (
            t["rounds_below_every_peer"][0].as_u64(),
            t["rounds_below_every_peer"][1].as_u64(),
        ) {
            notes.push(format!("below every peer in {below} of {rounds} rounds"));
        }
        let worst = &t["worst_round"];
        if let (Some(round), Some(p99), Some(stolen), Some(least), Some(most)) = (
            worst["round"].as_u64(),
            worst["p99_us"].as_f64(),
            worst["stolen_ms"].as_f64(),
            worst["others_stolen_ms"][0].as_f64(),
            worst["others_stolen_ms"][1].as_f64(),
        ) {
            let mut note = format!(
                "worst round {round}: p99 {p99:.0} us, {stolen:.0} ms of CPU stolen by the host \
                 in it, {least:.0} to {most:.0} ms in the others"
            );
            if let (Some(preempted), Some(least), Some(most)) = (
                worst["preempted_per_request"].as_f64(),
                worst["others_preempted_per_request"][0].as_f64(),
                worst["others_preempted_per_request"][1].as_f64(),
            ) {
                note.push_str(&format!(
                    ", the sidecars preempted {preempted:.2} times a request in it, {least:.2} \
                     to {most:.2} in the others"
                ));
            }
            notes.push(note);
        }
        if let (Some(issuing), Some(signing)) = (
            t["stolen_ms"]["issuing"].as_f64(),
            t["stolen_ms"]["signing"].as_f64(),
        ) {
            notes.push(format!(
                "{issuing:.0} ms of CPU stolen by the host while issuing, {signing:.0} ms while signing raw"
            ));
        }
        if let Some(behind) = t["fell_behind"].as_array() {
            let names: Vec<&str> = behind.iter().filter_map(Value::as_str).collect();
            notes.push(format!(
                "{} fell behind the rate, so these tails are queues: lower it with --rate",
                names.join(", ")
            ));
        }
        let notes = if notes.is_empty() {
            String::new()
        } else {
            format!(" ({})", notes.join("; "))
        };
        out.push_str(&format!(
            "  {:<48} {:<30} {:>10}  {met}{notes}\n",
            t["target"].as_str().unwrap_or(""),
            t["bound"].as_str().unwrap_or(""),
            fmt_opt(t["value"].as_f64(), |x| format!("{x:.3}")),
        ));
    }
    if let Some(profile) = &results.profile {
        out.push_str(&profile_text(profile));
    }
    out
}

/// Where the profiled pairs' time went (see `profile`): each pair,
/// scenario and side, its samples by object and its busiest functions.
fn profile_text(profile: &Profiles) -> String {
    let mut out = format!("\nwhere the time goes ({})\n", profile.tool);
    for side in &profile.sides {
        let summed = &side.summed;
        let objects: Vec<String> = summed
            .objects
            .iter()
            .filter(|o| o.percent >= 1.0)
            .map(|o| format!("{} {:.0} %", profile::object_name(&o.name), o.percent))
            .collect();
        out.push_str(&format!(
            "  {}, {}, {} side ({} samples): {}; TCP pacing {:.1} %\n",
            side.contender,
            side.scenario,
            side.side,
            summed.samples,
            objects.join(", "),
            summed.pacing_percent
        ));
        for f in &summed.functions {
            let object = f.object.as_deref().map_or("", profile::object_name);
            out.push_str(&format!(
                "    {:>5.1} %  {} [{object}]\n",
                f.percent, f.name
            ));
        }
    }
    if let Some(why) = &profile.not_taken {
        out.push_str(&format!("  not profiled: {why}\n"));
    }
    out
}

/// A quick run of these contenders on a made-up machine, for the tests of
/// what is made of a run's figures.
#[cfg(test)]
pub fn results(contenders: Vec<PairFigures>) -> Results {
    use super::{Mode, system::Machine};
    Results {
        mode: Mode::Quick,
        machine: Machine {
            cpus: 2,
            cpu_model: "test".into(),
            memory_mib: 0,
            kernel: String::new(),
            cpu_idle: "haltpoll, halts at once (guest_halt_poll_ns 0)".into(),
            tcp_congestion: "bbr, which paces loopback connections too".into(),
        },
        pinning: String::new(),
        open_files_limit: 0,
        sizes: Mode::Quick.sizes(),
        contenders,
        http2_not_run: None,
        control_plane: None,
        profile: None,
        seconds: 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(name: &str, bulk: f64, keepalive: f64) -> PairFigures {
        PairFigures {
            name: name.into(),
            status: "ok".into(),
            bulk_1_stream_bytes_per_s: Some(bulk),
            keepalive_requests_per_s: Some(keepalive),
            ..PairFigures::default()
        }
    }

    fn target<'a>(targets: &'a [Value], prefix: &str) -> &'a Value {
        targets
            .iter()
            .find(|t| t["target"].as_str().is_some_and(|n| n.starts_with(prefix)))
            .unwrap_or_else(|| panic!("no target {prefix}: {targets:?}"))
    }

    #[test]
    fn bulk_and_keepalive_targets_show_the_plaintext_pair_when_it_ran() {
        let run = results(vec![
            pair("direct", 3e9, 100_000.0),
            pair("trellis", 1.2e9, 30_000.0),
            pair("haproxy-plain", 1.5e9, 40_000.0),
        ]);
        let targets = targets(&run);
        let bulk = target(&targets, "bulk throughput");
        assert_eq!(bulk["value"].as_f64(), Some(0.4));
        assert_eq!(bulk["plaintext_pair"].as_f64(), Some(0.5));
        assert_eq!(bulk["met"].as_bool(), Some(false));
        let keepalive = target(&targets, "keep-alive");
        assert_eq!(keepalive["plaintext_pair"].as_f64(), Some(0.4));
        // Only those two compare with the ceiling.
        assert!(target(&targets, "new mTLS").get("plaintext_pair").is_none());
        let table = table(&run);
        assert!(
            table.contains("NOT met (plaintext pair 0.500)"),
            "the table names the ceiling:\n{table}"
        );
        assert!(table.contains("haproxy-plain: the HAProxy pair with no TLS"));
    }

    /// The new-connection target names its rounds' lowest and highest
    /// ratio, each round against Envoy's rate in the same round.
    #[test]
    fn the_new_connection_target_names_its_rounds() {
        let with_rounds = |name: &str, rounds: Vec<f64>| {
            let mut f = pair(name, 1.0, 1.0);
            f.new_connections_per_s = Some(rounds.iter().sum::<f64>() / rounds.len() as f64);
            f.rounds.new_connections_per_s = rounds;
            f
        };
        let run = results(vec![
            with_rounds("direct", vec![20_000.0, 20_000.0, 20_000.0]),
            with_rounds("trellis", vec![2_000.0, 3_300.0, 3_600.0]),
            with_rounds("envoy", vec![1_250.0, 1_500.0, 1_500.0]),
        ]);
        let targets = targets(&run);
        let connections = target(&targets, "new mTLS");
        assert_eq!(connections["rounds"], json!([1.6, 2.4]));
        assert_eq!(connections["met"].as_bool(), Some(true), "{connections}");
        let table = table(&run);
        assert!(table.contains("met (rounds 1.600 to 2.400)"), "{table}");
    }

    /// The HTTP/2 rate has its rows, with each pair's ratio to direct and
    /// the latency it adds, and names its load generator; a run without
    /// h2load says why the rate is missing instead of showing empty rows.
    #[test]
    fn the_http2_rate_is_shown_against_direct_or_said_to_be_missing() {
        let mut direct = pair("direct", 1.0, 1.0);
        direct.http2_requests_per_s = Some(80_000.0);
        direct.http2_p50_us = Some(150.0);
        direct.http2_p99_us = Some(400.0);
        direct.http2_tool = Some("h2load -t1 -c4 -m4".into());
        let mut trellis = pair("trellis", 1.0, 1.0);
        trellis.http2_requests_per_s = Some(20_000.0);
        trellis.http2_p50_us = Some(700.0);
        trellis.http2_p99_us = Some(1_400.0);
        trellis.http2_cpu_us_per_request = vec![12.0, 21.0];
        trellis.rounds.http2_requests_per_s = vec![18_000.0, 22_000.0];
        direct.rounds.http2_requests_per_s = vec![90_000.0, 70_000.0];
        let run = results(vec![direct, trellis]);
        let by_round = &ratios(&run, &run.contenders[1])["http2_requests_to_direct_by_round"];
        assert_eq!(by_round, &json!([0.2, 22_000.0 / 70_000.0]));
        let table = table(&run);
        let line = |label: &str| {
            table
                .lines()
                .find(|l| l.starts_with(label))
                .unwrap_or_else(|| panic!("no {label:?} row in\n{table}"))
                .split_whitespace()
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        assert_eq!(line("HTTP/2 req/s")[2..], ["80000", "20000"]);
        assert!(table.contains("HTTP/2: h2load -t1 -c4 -m4"), "{table}");
        let after = table.split("HTTP/2 req/s").nth(1).unwrap();
        assert!(after.contains("0.25"), "{table}");
        assert!(after.contains("+550 / +1000"), "{table}");
        assert!(after.contains("12 / 21"), "{table}");

        let mut without = results(vec![pair("direct", 1.0, 1.0), pair("trellis", 1.0, 1.0)]);
        without.http2_not_run = Some("h2load is not installed".into());
        let table = super::table(&without);
        assert!(
            table.contains("HTTP/2 rate not run: h2load is not installed"),
            "{table}"
        );
        assert!(!table.contains("HTTP/2 req/s"), "{table}");
    }

    /// The issuance target is the ratio of every round together, names
    /// the lowest and highest round's, and says what the host stole while
    /// issuing and while signing raw.
    #[test]
    fn the_issuance_target_names_its_rounds_and_the_stolen_cpu() {
        use super::super::control::{IssuanceRound, issuance_totals};
        // 2,000/s then 1,000/s end to end, against 10,000/s raw.
        let mut rounds = vec![
            IssuanceRound::new(1000, 0.5, 10_000, 1.0),
            IssuanceRound::new(1000, 1.0, 10_000, 1.0),
        ];
        rounds[0].issuing_stolen_ms = Some(0.0);
        rounds[0].signing_stolen_ms = Some(10.0);
        rounds[1].issuing_stolen_ms = Some(250.0);
        let (issued, raw, ratio) = issuance_totals(&rounds).unwrap();
        let mut run = results(vec![pair("direct", 1.0, 1.0), pair("trellis", 1.0, 1.0)]);
        run.control_plane = Some(ControlFigures {
            issuance_clients: 64,
            issuance_certs: 2000,
            issued_per_second: Some(issued),
            raw_signing_per_second: Some(raw),
            issuance_ratio_to_raw: Some(ratio),
            issuance_stolen_ms: Some(250.0),
            raw_signing_stolen_ms: Some(10.0),
            issuance_by_round: rounds,
            ..ControlFigures::default()
        });
        let targets = targets(&run);
        let issuance = target(&targets, "end-to-end issuance");
        assert_eq!(issuance["rounds"], json!([0.1, 0.2]));
        assert_eq!(issuance["met"].as_bool(), Some(false));
        let table = table(&run);
        assert!(
            table.contains(
                "NOT met (rounds 0.100 to 0.200; 250 ms of CPU stolen by the host while issuing, 10 ms while signing raw)"
            ),
            "{table}"
        );
        assert!(
            table.contains("2000 certs in 2 rounds, each followed by raw signing"),
            "{table}"
        );
        assert!(
            table.contains("CPU stolen by the host: 250 ms while issuing, 10 ms while signing raw"),
            "{table}"
        );
    }

    /// Both tails are checked against every peer's in the same measure:
    /// the fixed rate's and the closed loop's.
    #[test]
    fn each_tail_target_compares_trellis_with_the_peers_in_its_own_measure() {
        let with_tails = |name: &str, fixed: f64, closed: f64| PairFigures {
            latency_p99_us: Some(fixed),
            keepalive_p99_us: Some(closed),
            keepalive_tool: Some("wrk -t1 -c16".into()),
            ..pair(name, 1.0, 1.0)
        };
        let run = results(vec![
            with_tails("direct", 100.0, 900.0),
            // +300 at the fixed rate, +400 in the closed loop.
            with_tails("trellis", 400.0, 1_300.0),
            // Envoy: +250 at the fixed rate (lower), +1,400 in the closed loop.
            with_tails("envoy", 350.0, 2_300.0),
            with_tails("haproxy", 500.0, 4_000.0),
        ]);
        let targets = targets(&run);
        let fixed = target(&targets, "added p99 at a fixed rate");
        assert_eq!(fixed["value"].as_f64(), Some(300.0));
        assert_eq!(fixed["met"], json!(false));
        let closed = target(&targets, "added p99 under wrk -t1 -c16");
        assert_eq!(closed["value"].as_f64(), Some(400.0));
        assert_eq!(closed["met"], json!(true));

        // The Envoy pair inspecting HTTP is a peer too: adding +300 in the
        // closed loop, it stands between Trellis and the target.
        let mut run = run;
        run.contenders
            .push(with_tails("envoy-http", 1_000.0, 1_200.0));
        let closed = target(&super::targets(&run), "added p99 under wrk -t1 -c16").clone();
        assert_eq!(closed["met"], json!(false));
        assert_eq!(
            closed["nearest_peer"],
            json!({ "name": "envoy-http", "added": 300.0 })
        );
        assert!(table(&run).contains("envoy-http: the Envoy pair inspecting HTTP"));
    }

    /// Each tail target names the nearest peer and counts the rounds in
    /// which Trellis added less than every peer in that same round.
    #[test]
    fn tail_targets_name_the_nearest_peer_and_count_the_rounds_below_it() {
        let with_rounds = |name: &str, fixed: f64, rounds: &[f64]| {
            let mut f = PairFigures {
                latency_p99_us: Some(fixed),
                ..pair(name, 1.0, 1.0)
            };
            f.rounds.latency_p99_us = rounds.to_vec();
            f
        };
        let run = results(vec![
            with_rounds("direct", 100.0, &[100.0, 200.0, 100.0]),
            // Added +150, +150 and +400 in the three rounds.
            with_rounds("trellis", 300.0, &[250.0, 350.0, 500.0]),
            // Added +200, +100 and +450.
            with_rounds("envoy", 320.0, &[300.0, 300.0, 550.0]),
            // Added +300 in every round.
            with_rounds("haproxy", 400.0, &[400.0, 500.0, 400.0]),
        ]);
        let fixed = target(&targets(&run), "added p99 at a fixed rate").clone();
        assert_eq!(
            fixed["nearest_peer"],
            json!({ "name": "envoy", "added": 220.0 })
        );
        // Below both peers in the first round only; above Envoy in the
        // second and above HAProxy in the third.
        assert_eq!(fixed["rounds_below_every_peer"], json!([1, 3]));
        let table = table(&run);
        assert!(
            table.contains("met (nearest peer envoy +220; below every peer in 1 of 3 rounds)"),
            "{table}"
        );
        // A contender without rounds recorded: no count is claimed.
        let mut run = run;
        run.contenders[3].rounds.latency_p99_us.clear();
        let fixed = target(&targets(&run), "added p99 at a fixed rate").clone();
        assert!(fixed.get("rounds_below_every_peer").is_none(), "{fixed}");
    }

    /// A contender that fell behind the fixed rate (more than 1 % of its
    /// requests queued behind the one before) is named beside the target,
    /// and each contender's share is in the table.
    #[test]
    fn the_contenders_that_fell_behind_the_fixed_rate_are_named() {
        let with_queue = |name: &str, queued: u64| PairFigures {
            latency_p99_us: Some(1_000.0),
            latency_requests: Some(1_000),
            latency_queued: Some(queued),
            ..pair(name, 1.0, 1.0)
        };
        let run = results(vec![
            with_queue("direct", 0),
            with_queue("trellis", 10),
            with_queue("envoy", 11),
            with_queue("haproxy", 250),
        ]);
        let fixed = target(&targets(&run), "added p99 at a fixed rate").clone();
        assert_eq!(fixed["fell_behind"], json!(["envoy", "haproxy"]));
        let table = table(&run);
        assert!(
            table.contains(
                "envoy, haproxy fell behind the rate, so these tails are queues: lower it with \
                 --rate"
            ),
            "{table}"
        );
        let row = table
            .lines()
            .find(|l| l.starts_with("  fell behind the rate"))
            .unwrap();
        let cells: Vec<&str> = row.split("  ").filter(|c| !c.trim().is_empty()).collect();
        assert_eq!(
            cells[1..].iter().map(|c| c.trim()).collect::<Vec<_>>(),
            ["0.0 %", "1.0 %", "1.1 %", "25.0 %"],
            "{table}"
        );

        // None behind: nothing said.
        let run = results(vec![with_queue("direct", 0), with_queue("trellis", 10)]);
        let fixed = target(&targets(&run), "added p99 at a fixed rate").clone();
        assert!(fixed.get("fell_behind").is_none(), "{fixed}");
    }

    /// When each round's preemptions were counted, the worst round of a
    /// tail says how often the sidecars lost their cores a request in it
    /// and in the other rounds: a slow round with nothing stolen can still
    /// be one in which other processes took the sidecars' cores.
    #[test]
    fn the_worst_round_of_a_tail_says_how_often_the_sidecars_were_preempted() {
        let mut direct = pair("direct", 1.0, 1.0);
        direct.latency_p99_us = Some(200.0);
        direct.rounds.latency_p99_us = vec![200.0, 210.0, 190.0];
        let mut trellis = pair("trellis", 1.0, 1.0);
        trellis.latency_p99_us = Some(900.0);
        trellis.rounds.latency_p99_us = vec![700.0, 4_500.0, 650.0];
        trellis.rounds.latency_stolen_ms = vec![0.0, 0.0, 30.0];
        trellis.rounds.latency_preempted_per_request = vec![0.8, 1.9, 0.75];
        let run = results(vec![direct, trellis]);
        let fixed = target(&targets(&run), "added p99 at a fixed rate").clone();
        assert_eq!(
            fixed["worst_round"],
            json!({
                "round": 2,
                "p99_us": 4_500.0,
                "stolen_ms": 0.0,
                "others_stolen_ms": [0.0, 30.0],
                "preempted_per_request": 1.9,
                "others_preempted_per_request": [0.75, 0.8],
            })
        );
        let table = table(&run);
        assert!(
            table.contains(
                "worst round 2: p99 4500 us, 0 ms of CPU stolen by the host in it, 0 to 30 ms in \
                 the others, the sidecars preempted 1.90 times a request in it, 0.75 to 0.80 in \
                 the others"
            ),
            "{table}"
        );
    }

    /// Trellis's worst round of each tail (fixed rate, keep-alive) is
    /// named with the CPU the host stole during it and in the other rounds,
    /// and each scenario's stolen CPU is a row of the table.
    #[test]
    fn the_worst_round_of_each_tail_says_what_the_host_stole_in_it() {
        let with_rounds = |name: &str, p99: &[f64], stolen: &[f64]| {
            let mut f = PairFigures {
                latency_p99_us: Some(1_000.0),
                latency_stolen_ms: Some(stolen.iter().sum()),
                bulk_1_stream_stolen_ms: Some(20.0),
                keepalive_stolen_ms: Some(0.0),
                new_connections_stolen_ms: Some(50.0),
                ..pair(name, 1.0, 1.0)
            };
            f.rounds.latency_p99_us = p99.to_vec();
            f.rounds.latency_stolen_ms = stolen.to_vec();
            f
        };
        let mut run = results(vec![
            with_rounds("direct", &[200.0, 210.0, 220.0], &[0.0, 0.0, 10.0]),
            with_rounds("trellis", &[700.0, 83_000.0, 650.0], &[10.0, 420.0, 0.0]),
        ]);
        run.contenders[1].rounds.keepalive_p99_us = vec![900.0, 1_100.0, 8_000.0];
        run.contenders[1].rounds.keepalive_stolen_ms = vec![0.0, 20.0, 300.0];
        let closed = target(&targets(&run), "added p99 under").clone();
        assert_eq!(
            closed["worst_round"],
            json!({
                "round": 3,
                "p99_us": 8_000.0,
                "stolen_ms": 300.0,
                "others_stolen_ms": [0.0, 20.0],
            })
        );
        let fixed = target(&targets(&run), "added p99 at a fixed rate").clone();
        assert_eq!(
            fixed["worst_round"],
            json!({
                "round": 2,
                "p99_us": 83_000.0,
                "stolen_ms": 420.0,
                "others_stolen_ms": [0.0, 10.0],
            })
        );
        let table = table(&run);
        assert!(
            table.contains(
                "worst round 2: p99 83000 us, 420 ms of CPU stolen by the host in it, 0 to 10 ms \
                 in the others"
            ) && table.contains(
                "worst round 3: p99 8000 us, 300 ms of CPU stolen by the host in it, 0 to 20 ms \
                 in the others"
            ),
            "{table}"
        );
        // What an idle core does, and whether TCP paces loopback, are said
        // with the machine.
        assert!(
            table.starts_with(
                "trellis-bench (Quick) on 2 cores (test; idle cores: haltpoll, halts at once \
                 (guest_halt_poll_ns 0); TCP congestion control: bbr, which paces loopback \
                 connections too),"
            ),
            "{table}"
        );
        let rows: Vec<Vec<&str>> = table
            .lines()
            .filter(|l| l.starts_with(STOLEN))
            .map(|l| l[STOLEN.len()..].split_whitespace().collect())
            .collect();
        // Bulk, fixed rate, keep-alive, HTTP/2 (not measured here), new
        // connections; direct first.
        assert_eq!(
            rows,
            [
                ["20", "20"],
                ["10", "430"],
                ["0", "0"],
                ["-", "-"],
                ["50", "50"]
            ],
            "{table}"
        );

        // Rounds whose stolen CPU was not read: nothing claimed.
        run.contenders[1].rounds.latency_stolen_ms.clear();
        let fixed = target(&targets(&run), "added p99 at a fixed rate").clone();
        assert!(fixed.get("worst_round").is_none(), "{fixed}");
    }

    /// How often each proxy slept and was preempted, a MB of one-stream
    /// bulk data and a request at the fixed rate and in the keep-alive
    /// loop, are rows under those scenarios, and each proxy's CPU a GB a
    /// row under both's, client side first.
    #[test]
    fn each_scenarios_rows_say_how_often_each_proxy_slept() {
        let mut trellis = pair("trellis", 1.2e9, 30_000.0);
        trellis.bulk_1_stream_sleeps_per_mb = vec![2.5, 1.25];
        trellis.bulk_1_stream_preempted_per_mb = vec![0.1, 0.02];
        trellis.latency_sleeps_per_request = vec![1.5, 2.0];
        trellis.latency_preempted_per_request = vec![0.04, 0.05];
        trellis.keepalive_sleeps_per_request = vec![0.75, 1.0];
        trellis.keepalive_preempted_per_request = vec![0.2, 0.3];
        trellis.cpu_seconds_per_gb = Some(1.8);
        trellis.cpu_seconds_per_gb_by_side = vec![1.0, 0.8];
        let run = results(vec![pair("direct", 3e9, 100_000.0), trellis]);
        let table = table(&run);
        // Each row with `label`, in the table's order, as its cells.
        let rows = |label: &str| -> Vec<String> {
            table
                .lines()
                .filter_map(|l| l.strip_prefix(label))
                .map(|cells| cells.split_whitespace().collect::<Vec<_>>().join(" "))
                .collect()
        };
        // Direct has no proxy, so a dash, then Trellis's two sides.
        assert_eq!(rows("  sleeps a MB (c / s)"), ["- 2.50 / 1.25"], "{table}");
        assert_eq!(
            rows("  preempted a MB (c / s)"),
            ["- 0.10 / 0.02"],
            "{table}"
        );
        // The fixed rate's, then the keep-alive loop's.
        assert_eq!(
            rows("  sleeps a request (c / s)"),
            ["- 1.50 / 2.00", "- 0.75 / 1.00"],
            "{table}"
        );
        assert_eq!(
            rows("  preempted a request (c / s)"),
            ["- 0.04 / 0.05", "- 0.20 / 0.30"],
            "{table}"
        );
        // And what each side spent a GB, under both together.
        assert_eq!(rows("  each proxy (c / s)"), ["- 1.00 / 0.80"], "{table}");
    }

    #[test]
    fn per_proxy_figures_print_each_side_or_a_dash_for_direct() {
        assert_eq!(per_side(&[21.4, 47.6], 0), "21 / 48");
        assert_eq!(per_side(&[1.234, 0.5], 2), "1.23 / 0.50");
        assert_eq!(per_side(&[], 2), "-");
        assert_eq!(percent(Some(0.974)), "97 %");
        assert_eq!(percent(None), "-");
    }

    #[test]
    fn percentiles_print_whole_and_signed_or_not_at_all() {
        assert_eq!(micros(&[Some(33.0), Some(81.4)], false), "33 / 81");
        assert_eq!(
            micros(&[Some(0.0), Some(118.0), Some(-8.0)], true),
            "+0 / +118 / -8"
        );
        assert_eq!(micros(&[Some(33.0), None], false), "-");
    }

    #[test]
    fn bulk_and_keepalive_targets_show_the_spread_of_the_rounds() {
        let mut direct = pair("direct", 3e9, 100_000.0);
        direct.rounds.keepalive_requests_per_s = vec![120_000.0, 80_000.0, 100_000.0];
        let mut trellis = pair("trellis", 1.2e9, 30_000.0);
        trellis.rounds.keepalive_requests_per_s = vec![30_000.0, 24_000.0, 36_000.0];
        let run = results(vec![direct, trellis]);
        let keepalive = target(&targets(&run), "keep-alive").clone();
        assert_eq!(keepalive["rounds"], json!([0.25, 0.36]));
        let by_round = &ratios(&run, &run.contenders[1])["keepalive_requests_to_direct_by_round"];
        assert_eq!(by_round, &json!([0.25, 0.3, 0.36]));
        // One round (or none recorded) shows no spread.
        assert!(
            target(&targets(&run), "bulk throughput")
                .get("rounds")
                .is_none()
        );
        let table = table(&run);
        assert!(
            table.contains("NOT met (rounds 0.250 to 0.360)"),
            "the table shows the rounds' spread:\n{table}"
        );
        assert!(table.contains("in 2 interleaved rounds"), "{table}");
    }

    #[test]
    fn without_the_plaintext_pair_no_ceiling_is_claimed() {
        let mut plain = pair("haproxy-plain", 0.0, 0.0);
        plain.status = "missing".into();
        let run = results(vec![
            pair("direct", 3e9, 100_000.0),
            pair("trellis", 1.2e9, 30_000.0),
            plain,
        ]);
        let targets = targets(&run);
        assert!(
            target(&targets, "bulk throughput")
                .get("plaintext_pair")
                .is_none()
        );
        assert!(!table(&run).contains("plaintext pair 0"));
    }

    /// The profile is printed after the targets: each side's objects of
    /// 1 % and more, its busiest functions with their object, and why
    /// anything was not profiled.
    #[test]
    fn the_profile_names_each_sides_objects_and_busiest_functions() {
        use super::profile::{Share, SideProfile, Summed};
        let share = |name: &str, object: Option<&str>, percent: f64| Share {
            name: name.into(),
            object: object.map(Into::into),
            percent,
        };
        let mut run = results(vec![pair("direct", 1.0, 1.0), pair("trellis", 0.4, 0.3)]);
        run.profile = Some(Profiles {
            tool: "perf record".into(),
            sides: vec![SideProfile {
                contender: "trellis".into(),
                scenario: "keep-alive rate".into(),
                side: "server".into(),
                summed: Summed {
                    samples: 5711,
                    objects: vec![
                        share("[kernel.kallsyms]", None, 68.92),
                        share("trellis-proxy", None, 24.25),
                        share("[vdso]", None, 0.75),
                    ],
                    functions: vec![
                        share(
                            "finish_task_switch.isra.0",
                            Some("[kernel.kallsyms]"),
                            23.81,
                        ),
                        share("one_request", Some("trellis-proxy"), 2.31),
                    ],
                    pacing_percent: 14.52,
                },
            }],
            not_taken: Some("bulk 1 stream: perf record failed".into()),
        });
        let printed = table(&run);
        let profile = &printed[printed.find("where the time goes").expect("a profile")..];
        assert_eq!(
            profile,
            "where the time goes (perf record)\n  \
             trellis, keep-alive rate, server side (5711 samples): kernel 69 %, trellis-proxy 24 %; \
             TCP pacing 14.5 %\n  \
             \x20  23.8 %  finish_task_switch.isra.0 [kernel]\n  \
             \x20   2.3 %  one_request [trellis-proxy]\n  \
             not profiled: bulk 1 stream: perf record failed\n"
        );
        run.profile = None;
        assert!(!table(&run).contains("where the time goes"));
    }
}
