//! The Trellis sidecar.
//!
//! [`cli_main`] is the whole program: it parses flags (exit 64 on invalid
//! configuration, before any port is bound), binds every listener, then
//! starts identity, TLS, discovery and the listeners, and drains on
//! SIGTERM/SIGINT. The path of one connection reads top to bottom in
//! [`inbound::serve`] and in `outbound`.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod admin;
pub mod config;
pub mod drain;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod init;
pub mod logging;
// What the machine can do for a unit test, and how one says it cannot run:
// the file every test crate of the workspace shares.
#[cfg(test)]
#[allow(dead_code)]
#[path = "../../tests/src/machine.rs"]
mod machine;
pub mod metrics;
pub mod net;
pub mod outbound;
pub mod policy;
mod run;
pub mod tls;

pub use run::{Bind, Sidecar};

use std::ffi::OsString;
use std::process::ExitCode;

use config::{Command, Config, Given};

/// Exit code for invalid configuration (EX_USAGE).
pub const EXIT_USAGE: u8 = 64;

/// Runs `trellis-proxy` with `args` (argv, the program name first, whatever
/// it is) until SIGTERM or SIGINT. Exit codes: 0 after a drain or `--help`,
/// 64 for invalid configuration (before any port is bound; a credential
/// file that cannot be read included), 1 when start-up fails (a listener
/// address that cannot be bound, named by its flag). Either error is said
/// once, as the last line on stderr (`error: ...`), not logged.
pub fn cli_main(args: Vec<OsString>) -> ExitCode {
    let (cli, given) = match Given::parse::<config::Cli>(&args) {
        Ok(parsed) => parsed,
        Err(e) => {
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    let _ = e.print();
                    ExitCode::SUCCESS
                }
                _ => {
                    eprint!("{}", config::refusal_text(e, &args));
                    ExitCode::from(EXIT_USAGE)
                }
            };
        }
    };
    if let Some(Command::Init(args)) = cli.command {
        return init::run(args, &given);
    }
    let config = match Config::from_given(&cli.proxy, &given) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {}", given.refused(e.flag, &e.reason));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let logs = logging::init(config.log_format);
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(e) => {
            drop(logs);
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run::run(config));
    // Connections still open after the drain deadline are dropped here.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    // The access-log lines of the last requests, gathered on this thread;
    // then everything queued is written, before the last word on stderr.
    logging::access::hand_over();
    drop(logs);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Said once, as the last line (not also logged), as an
            // invalid flag is.
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The runtime for the sidecar's tasks. A sidecar given one core (the
/// usual pod limit, seen through the cgroup's CPU quota, or
/// `TOKIO_WORKER_THREADS=1`) runs every task on its main thread: no work
/// stealing, no wake-ups across threads. More cores get one worker each.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let workers = std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    // Each runtime thread hands its gathered access-log lines to the
    // writer before it waits for work, and as it stops.
    builder
        .on_thread_park(logging::access::hand_over)
        .on_thread_stop(logging::access::hand_over)
        .enable_all()
        .build()
}
