//! The Trellis control plane: the CA that issues X.509-SVIDs, the store of
//! join tokens, workloads, issued certificates and versioned authorization
//! policies, discovery snapshots for sidecars, the gRPC API (Identity,
//! Discovery, Admin with the policy methods) over TLS, and `trellisctl`
//! ([`ctl`]).
//!
//! The binaries only call [`cli_main`] and [`ctl::cli_main`]; both take the
//! whole argv and ignore argv\[0\], so a harness may re-execute itself into
//! them.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod admin_http;
pub mod api;
pub mod authn;
pub mod body_deadline;
pub mod ca;
pub mod config;
pub mod ctl;
pub mod discovery;
pub mod escape;
pub mod handshake;
pub mod inject;
// What the machine can do for a unit test, and how one says it cannot run:
// the file every test crate of the workspace shares.
#[cfg(test)]
#[allow(dead_code)]
#[path = "../../tests/src/machine.rs"]
mod machine;
pub mod metrics;
pub mod net;
pub mod readiness;
pub mod reflection;
pub mod request_head;
pub mod run;
pub mod server;
pub mod state_dir;
pub mod store;
#[cfg(test)]
mod test_logs;

/// Now, in Unix seconds (0 for a clock set before the epoch).
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

use std::ffi::OsString;
use std::process::ExitCode;

use config::{Config, EXIT_USAGE, Parsed};

/// Runs `trellis-control-plane` with `args` (argv, including a program name)
/// until SIGTERM or SIGINT. Exit codes: 0 after a clean shutdown or `--help`,
/// 64 for invalid configuration (before any port is bound or the state dir is
/// touched), 1 when start-up fails (the error names the file or address).
/// Either error is said once, as the last line on stderr (`error: ...`).
pub fn cli_main(args: Vec<OsString>) -> ExitCode {
    let config = match Config::parse_args(args) {
        Parsed::Run(config) => *config,
        Parsed::Printed => return ExitCode::SUCCESS,
        Parsed::Invalid(message) => {
            eprint!("{message}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let log = init_logging(config.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("trellis-cp")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run::run(config));
    // The runtime's tasks may still log while it stops; then everything
    // queued is written, before the last word on stderr.
    drop(runtime);
    drop(log);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Said once, as the last line (not also logged), as an invalid
            // flag is.
            eprintln!("error: {e}");
            if e.is_usage() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Installs the global subscriber, writing to stderr from a thread of its
/// own: a Certify or a policy push never waits for a slow log collector.
/// Dropping what it returns writes the lines still queued.
fn init_logging(format: trellis_core::logging::Format) -> trellis_core::logging::Guard {
    let mut guard = trellis_core::logging::Guard::default();
    trellis_core::logging::init("trellis-control-plane", format, &mut guard);
    guard
}
