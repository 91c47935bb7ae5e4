//! `trellis-bench`: Trellis side by side with a direct connection and with
//! Envoy, HAProxy and stunnel pairs doing the same mTLS job on loopback, and
//! the control plane at scale; prints a table and writes JSON of the figures
//! and their ratios to the direct baseline of the same run.
//!
//! It runs the real `trellis-proxy` and `trellis-control-plane` binaries when
//! they are built beside it; otherwise, like `trellis-demo`, it re-executes
//! itself as the Trellis programs (hidden first argument `__trellis-proxy`
//! etc.), so `cargo run --release --bin trellis-bench` needs nothing else
//! built. The
//! contenders come from the system (`scripts/install-bench-tools.sh`); a
//! missing one is reported as missing.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use tokio::signal::unix::{SignalKind, signal};

use trellis_tests::bench::contenders::Kind;
use trellis_tests::bench::{self, Mode, Options};
use trellis_tests::{Launcher, Program};

/// The sidecar's allocator, for when this program runs as the sidecar
/// (see [`trellis_alloc`]).
#[global_allocator]
static ALLOC: trellis_alloc::LineAligned = trellis_alloc::LineAligned;

const USAGE: &str = "\
trellis-bench: Trellis against direct, Envoy, HAProxy and stunnel (and a plaintext HAProxy pair) on loopback, and the control plane at scale

Usage: trellis-bench [--quick | --smoke] [--json FILE] [--only NAME,NAME] [--no-pin] [--no-control-plane] [--no-wrk]
                     [--watchers N] [--rate N] [--control-plane-only] [--profile | --no-profile]

Options:
  --quick             short run (under 3 minutes on 2 cores)
  --smoke             one tiny bulk transfer per contender, no control plane (the smoke test)
  --json FILE         where to write the JSON (default target/bench/results.json)
  --only LIST         contenders to run, comma separated:
                      direct,trellis,trellis-l4,envoy,envoy-http,haproxy,stunnel,haproxy-plain
                      (trellis-l4: the app port opaque, no HTTP inspection, as the TCP-mode peers run;
                      envoy-http: Envoy inspecting HTTP with per-request RBAC, as a mesh's sidecar;
                      haproxy-plain: HAProxy with no TLS, splicing: the best a pair can do here)
                      (direct is always added: every ratio needs it)
  --no-pin            do not pin the proxies to cores
  --no-control-plane  skip the control-plane scenarios
  --control-plane-only  run only the control-plane scenarios (no contender)
  --watchers N        simulated sidecars watching the control plane (default 1000, and
                      10000 after it in the full run; 10000 need about 11 GiB of memory)
  --rate N            the fixed-rate scenario's requests a second (default 1000 quick, 2000 full);
                      lower it on a host where the pairs fall behind (the table's \"fell behind\" row)
  --no-wrk            measure the keep-alive rate with the built-in client even if wrk is installed
  --no-profile        do not profile the Trellis and Envoy pairs (by default, when perf is installed, one
                      extra bulk, keep-alive, HTTP/2 and new-connection round each under `perf record`,
                      after the measured ones)
  --profile           profile them in a smoke run too
  -h, --help          print this help

Install the contenders with scripts/install-bench-tools.sh.
";

fn main() -> ExitCode {
    let mut args: Vec<OsString> = std::env::args_os().collect();
    if let Some(program) = args.get(1).and_then(|a| Program::from_self_exec_arg(a)) {
        args.remove(1);
        args[0] = program.binary_name().into();
        return match program {
            Program::ControlPlane => trellis_control_plane::cli_main(args),
            Program::Ctl => trellis_control_plane::ctl::cli_main(args),
            Program::Proxy => trellis_proxy::cli_main(args),
        };
    }
    let options = match parse(&args[1..]) {
        Ok(Some(options)) => options,
        Ok(None) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("trellis-bench: {e}\n\n{USAGE}");
            return ExitCode::from(64);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("trellis-bench: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        // The real binaries when they were built beside this one (`cargo
        // build --release --workspace`), so memory figures are the
        // sidecar's own; otherwise this executable runs them itself.
        let launcher = match Launcher::from_build_dir() {
            Ok(launcher) => launcher,
            Err(_) => Launcher::self_exec()?,
        };
        eprintln!(
            "trellis-bench: running the sidecar as {}",
            launcher.describe(Program::Proxy)
        );
        if let Some(sidecar) = launcher.executable(Program::Proxy) {
            match bench::system::symbol_order(&sidecar) {
                Ok(o) if o.first * 10 >= o.listed * 9 => eprintln!(
                    "trellis-bench: the sidecar lays out first {} of the {} functions its start-up order lists",
                    o.first, o.listed
                ),
                Ok(o) => eprintln!(
                    "trellis-bench: warning: the sidecar lays out first only {} of the {} functions its \
                     start-up order lists ({} of them defined), so it idles with more memory than the \
                     shipped build; build it with `cargo build --profile dist -p trellis-proxy --bin \
                     trellis-proxy` (LLD), or refresh the list with scripts/symbol-order.sh",
                    o.first, o.listed, o.defined
                ),
                Err(e) => eprintln!(
                    "trellis-bench: the sidecar's start-up order was not checked: {e:#}"
                ),
            }
        }
        // Stopped by a signal, the run is dropped, which stops every proxy,
        // app and control plane it started: none is left behind.
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        let results = tokio::select! {
            results = bench::run(&options, &launcher) => results?,
            _ = interrupt.recv() => anyhow::bail!("interrupted; every process it started is stopped"),
            _ = terminate.recv() => anyhow::bail!("terminated; every process it started is stopped"),
        };
        print!("{}", bench::report::table(&results));
        bench::write_json(&results, &options.json)?;
        println!("\nJSON written to {}", options.json.display());
        anyhow::Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trellis-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The next argument as a number within `range`, or `error`.
fn number<T: std::str::FromStr + PartialOrd>(
    args: &mut std::slice::Iter<'_, OsString>,
    range: std::ops::RangeInclusive<T>,
    error: &str,
) -> Result<T, String> {
    args.next()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse::<T>().ok())
        .filter(|n| range.contains(n))
        .ok_or_else(|| error.to_owned())
}

fn parse(args: &[OsString]) -> Result<Option<Options>, String> {
    let mut options = Options {
        mode: Mode::Full,
        json: PathBuf::from("target/bench/results.json"),
        contenders: Kind::ALL.to_vec(),
        pin: true,
        control_plane: true,
        wrk: true,
        watchers: None,
        rate: None,
        profile: None,
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("--quick") => options.mode = Mode::Quick,
            Some("--smoke") => options.mode = Mode::Smoke,
            Some("--no-pin") => options.pin = false,
            Some("--no-control-plane") => options.control_plane = false,
            Some("--control-plane-only") => options.contenders.clear(),
            Some("--no-wrk") => options.wrk = false,
            Some("--profile") => options.profile = Some(true),
            Some("--no-profile") => options.profile = Some(false),
            Some("--json") => {
                let file = args.next().ok_or("--json needs a file")?;
                options.json = PathBuf::from(file);
            }
            Some("--watchers") => {
                let error = "--watchers needs a number from 1 to 20000";
                options.watchers = Some(number(&mut args, 1..=20_000, error)?);
            }
            Some("--rate") => {
                let error = "--rate needs a number of requests a second from 16 to 100000";
                options.rate = Some(number(&mut args, 16.0..=100_000.0, error)?);
            }
            Some("--only") => {
                let list = args
                    .next()
                    .and_then(|l| l.to_str())
                    .ok_or("--only needs a list")?;
                let mut kinds = vec![Kind::Direct];
                for name in list.split(',').filter(|n| !n.is_empty()) {
                    let kind = Kind::parse(name)
                        .ok_or_else(|| format!("--only: unknown contender {name:?}"))?;
                    if !kinds.contains(&kind) {
                        kinds.push(kind);
                    }
                }
                options.contenders = kinds;
            }
            Some("-h" | "--help") => return Ok(None),
            _ => return Err(format!("unknown argument {arg:?}")),
        }
    }
    Ok(Some(options))
}
