//! `trellis-proxy init`: programs iptables in the pod's network namespace so
//! that every TCP connection in and out of the pod passes through the sidecar.

use std::process::ExitCode;

/// Flags of `trellis-proxy init`.
#[derive(Debug, Clone, clap::Args)]
pub struct InitArgs {}

/// Runs `trellis-proxy init` with parsed flags.
pub fn run(_args: InitArgs) -> ExitCode {
    ExitCode::FAILURE
}
