//! Where the sidecar's lines go: its own log on stderr (text or JSON,
//! filtered by `TRELLIS_LOG`, default `info`) and the access log on stdout
//! (target [`ACCESS_TARGET`](crate::http::ACCESS_TARGET), JSON whatever
//! `--log-format` says, one object per request with its fields at the top
//! level, written by [`access`]). Each stream is written in batches by a
//! thread of its own ([`trellis_core::logging::batched`]), so nothing on the
//! data path waits for a write.

pub mod access;

use std::io::{IsTerminal, Write};

use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use trellis_core::logging::{Output, stream};

pub use trellis_core::logging::Guard;

use crate::config::LogFormat;

/// Installs the global subscriber. A stream whose writer thread cannot
/// start is written line by line instead (and says so).
pub fn init(format: LogFormat) -> Guard {
    let mut guard = Guard::default();
    // The access log first: its writer reports dropped lines on stderr.
    let stdout = stream(PROGRAM, "access-log", std::io::stdout, &mut guard);
    let stderr = stream(PROGRAM, "log", std::io::stderr, &mut guard);

    let (filter, bad_filter) = trellis_core::logging::filter_from_env();
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let logs = match format {
        LogFormat::Text => logs.boxed(),
        LogFormat::Json => logs.json().boxed(),
    };
    access::install(stdout);
    let _ = tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .try_init();
    if let Some(error) = bad_filter {
        tracing::warn!(%error, "{} is not a log filter; logging at info", trellis_core::logging::FILTER_VAR);
    }
    guard
}

/// How the sidecar names itself when its log cannot start.
const PROGRAM: &str = "trellis-proxy";

/// The access log's lines, handed to the writer thread as they are.
impl<W: Write + 'static> access::Lines for Output<W> {
    fn lines(&self, bytes: Vec<u8>, count: usize) {
        Output::lines(self, bytes, count);
    }
}
