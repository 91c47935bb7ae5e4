//! The benchmark's smoke test: `trellis-bench --smoke` runs its smallest
//! scenario end to end (one 1-second bulk transfer through every contender:
//! direct, Trellis with a real control plane and two sidecars, the same
//! with the app's port opaque (`trellis-l4`), and each of
//! Envoy, HAProxy, stunnel and the plaintext HAProxy pair that is
//! installed) and writes its JSON. This
//! checks that numbers come out, never how large they are: timing belongs
//! to the benchmark itself. A contender that is not installed is reported
//! as missing and skipped here.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use trellis_tests::bench::system::stat_fields;

/// How long the smoke run may take on a slow, busy machine.
const PATIENCE: Duration = Duration::from_secs(300);

#[test]
fn smoke_run_measures_direct_and_trellis_and_reports_every_contender() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let json_path = dir.path().join("results.json");
    let mut child = Command::new(env!("CARGO_BIN_EXE_trellis-bench"))
        .args(["--smoke", "--no-pin", "--json"])
        .arg(&json_path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("trellis-bench starts");
    let deadline = Instant::now() + trellis_tests::patience(PATIENCE);
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for trellis-bench") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("trellis-bench --smoke did not finish within {PATIENCE:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = child.wait_with_output().expect("trellis-bench output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        status.success(),
        "trellis-bench --smoke failed ({status}):\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("bulk 1 stream"),
        "no table printed:\n{stdout}"
    );

    let json: Value = serde_json::from_str(
        &std::fs::read_to_string(&json_path).expect("the JSON report was written"),
    )
    .expect("the report is JSON");
    let contenders = json["results"]["contenders"]
        .as_array()
        .expect("results.contenders is a list");
    let names: Vec<&str> = contenders
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(
        names,
        [
            "direct",
            "trellis",
            "trellis-l4",
            "envoy",
            "envoy-http",
            "haproxy",
            "stunnel",
            "haproxy-plain"
        ],
        "every contender is reported, missing or not"
    );
    for contender in contenders {
        let name = contender["name"].as_str().unwrap_or("?");
        match contender["status"].as_str() {
            Some("ok") => {
                let rate = contender["bulk_1_stream_bytes_per_s"].as_f64();
                assert!(
                    rate.is_some_and(|r| r > 0.0),
                    "{name} produced no throughput: {contender}"
                );
                // The CPU the host stole is read around every round.
                let rounds = json["results"]["sizes"]["rounds"].as_u64();
                let stolen = contender["rounds"]["bulk_1_stream_stolen_ms"].as_array();
                assert_eq!(
                    stolen.map(|s| s.len() as u64),
                    rounds,
                    "{name}: no stolen CPU for each round: {contender}"
                );
                assert!(
                    contender["bulk_1_stream_stolen_ms"]
                        .as_f64()
                        .is_some_and(|ms| ms >= 0.0),
                    "{name}: no stolen CPU: {contender}"
                );
                // How often each Trellis sidecar slept and was preempted
                // while it moved the stream.
                if name == "trellis" {
                    for figure in ["sleeps", "preempted"] {
                        let key = format!("bulk_1_stream_{figure}_per_mb");
                        let sides = contender[&key].as_array().map(Vec::len);
                        assert_eq!(
                            sides,
                            Some(2),
                            "{name}: no {key} for each side: {contender}"
                        );
                    }
                    let sleeps = &contender["bulk_1_stream_sleeps_per_mb"];
                    assert!(
                        sleeps[0].as_f64().is_some_and(|n| n > 0.0),
                        "{name}: the client side never slept moving the stream: {contender}"
                    );
                }
                if name != "direct" {
                    assert!(
                        json["ratios"][name]["bulk_1_stream_to_direct"]
                            .as_f64()
                            .is_some_and(|r| r > 0.0),
                        "{name} has no ratio to direct: {}",
                        json["ratios"]
                    );
                }
            }
            Some("missing") if !["direct", "trellis", "trellis-l4"].contains(&name) => {
                eprintln!("skipping {name}: {}", contender["reason"]);
            }
            other => panic!("{name} did not run ({other:?}): {contender}\n{stderr}"),
        }
    }
}

/// The direct children of process `pid`, from `/proc`.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&child| {
            stat_fields(child).and_then(|f| f.get(1)?.parse::<u32>().ok()) == Some(pid)
        })
        .collect()
}

/// Whether `pid` is still a running (not yet reaped, not zombie) process.
fn running(pid: u32) -> bool {
    stat_fields(pid).is_some_and(|f| f.first().is_some_and(|state| state != "Z"))
}

/// A run stopped with SIGTERM (as a CI job's timeout or `kill` does)
/// stops the control plane and sidecars it started instead of leaving
/// them running: a later run would share the cores with them.
#[test]
fn a_run_stopped_by_a_signal_leaves_no_process_behind() {
    use std::io::BufRead;

    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut child = Command::new(env!("CARGO_BIN_EXE_trellis-bench"))
        .args([
            "--quick",
            "--only",
            "trellis",
            "--no-pin",
            "--no-control-plane",
            "--no-wrk",
            "--json",
        ])
        .arg(dir.path().join("results.json"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("trellis-bench starts");
    let stderr = child.stderr.take().expect("stderr is piped");
    let (lines, said) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines.send(line);
        }
    });
    // Once the first scenario runs, the pair is up.
    let mut log = Vec::new();
    let deadline = Instant::now() + trellis_tests::patience(Duration::from_secs(120));
    while !log.iter().any(|l: &String| l.contains("bulk 1 stream")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match said.recv_timeout(left) {
            Ok(line) => log.push(line),
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "the run never reached its first scenario:\n{}",
                    log.join("\n")
                );
            }
        }
    }
    let started = children_of(child.id());
    assert!(
        started.len() >= 3,
        "a control plane and two sidecars run as children of the benchmark, found {started:?}"
    );

    rustix::process::kill_process(
        rustix::process::Pid::from_child(&child),
        rustix::process::Signal::TERM,
    )
    .expect("SIGTERM sent");
    let status = child.wait().expect("trellis-bench exits");
    assert!(!status.success(), "a stopped run does not report success");
    let rest: Vec<String> = said.iter().collect();
    assert!(
        rest.iter().any(|l| l.contains("terminated")),
        "the run says it was stopped:\n{}",
        rest.join("\n")
    );
    let left: Vec<u32> = started.into_iter().filter(|&pid| running(pid)).collect();
    assert!(left.is_empty(), "processes left running: {left:?}");
}

/// A fixed rate the benchmark cannot pace is refused before anything
/// starts, naming the option and its range.
#[test]
fn a_rate_out_of_range_is_refused_naming_the_option() {
    for rate in ["5", "fast"] {
        let run = Command::new(env!("CARGO_BIN_EXE_trellis-bench"))
            .args(["--quick", "--rate", rate])
            .output()
            .expect("trellis-bench runs");
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(64), "{stderr}");
        assert!(
            stderr.starts_with(
                "trellis-bench: --rate needs a number of requests a second from 16 to 100000\n"
            ),
            "{stderr}"
        );
    }
}

/// `--profile` samples both real Trellis sidecars with `perf record`
/// through an extra bulk round of the smoke run, and the report names
/// where their time went: samples, the kernel among the objects, the
/// busiest functions, and from the call graphs the share TCP spent pacing
/// (none on a host whose congestion control does not pace). Where perf is
/// missing or may not sample, the run says why in the JSON, and this test
/// says it skipped.
#[test]
fn a_profiled_smoke_run_says_where_the_sidecars_time_went() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let json_path = dir.path().join("results.json");
    let run = Command::new(env!("CARGO_BIN_EXE_trellis-bench"))
        .args([
            "--smoke",
            "--no-pin",
            "--only",
            "trellis",
            "--profile",
            "--json",
        ])
        .arg(&json_path)
        .output()
        .expect("trellis-bench runs");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stdout}\n{stderr}");
    let json: Value = serde_json::from_str(
        &std::fs::read_to_string(&json_path).expect("the JSON report was written"),
    )
    .expect("the report is JSON");
    let profile = &json["results"]["profile"];
    let sides = profile["sides"]
        .as_array()
        .expect("profile.sides is a list");
    if sides.is_empty() {
        let why = profile["not_taken"]
            .as_str()
            .expect("why nothing was profiled");
        assert!(why.contains("perf"), "{why}");
        trellis_tests::machine::note(&format!("skipped: {why}"));
        return;
    }
    assert_eq!(profile["not_taken"], Value::Null, "{profile}");
    let named: Vec<[&str; 3]> = sides
        .iter()
        .map(|s| ["contender", "scenario", "side"].map(|k| s[k].as_str().unwrap()))
        .collect();
    assert_eq!(
        named,
        [
            ["trellis", "bulk 1 stream", "client"],
            ["trellis", "bulk 1 stream", "server"]
        ]
    );
    for side in sides {
        assert!(side["samples"].as_u64().is_some_and(|n| n > 0), "{side}");
        let objects: Vec<&str> = side["objects"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|o| o["name"].as_str())
            .collect();
        assert!(objects.contains(&"[kernel.kallsyms]"), "{side}");
        let functions = side["functions"].as_array().unwrap();
        assert!(!functions.is_empty() && functions.len() <= 8, "{side}");
        let pacing = side["pacing_percent"].as_f64();
        assert!(pacing.is_some_and(|p| (0.0..=100.0).contains(&p)), "{side}");
    }
    assert!(
        stdout.contains("where the time goes (perf record -g -e cpu-clock")
            && stdout.contains("trellis, bulk 1 stream, server side (")
            && stdout.contains("; TCP pacing "),
        "{stdout}"
    );
}
