//! Where the sidecar's lines go: its own log on stderr (text or JSON,
//! filtered by `TRELLIS_LOG`, default `info`) and the access log on stdout
//! (target [`ACCESS_TARGET`](crate::http::ACCESS_TARGET), JSON whatever
//! `--log-format` says, one object per request with its fields at the top
//! level, written by [`access`]). Each stream is written in batches by a
//! thread of its own ([`batched`]), so nothing on the data path waits for a
//! write.

pub mod access;
pub mod batched;

use std::io::{IsTerminal, Write};

use tracing_subscriber::Layer;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::writer::EitherWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogFormat;
use batched::{Batched, Flush};

/// Writes the lines still queued when dropped: keep it until exit.
pub struct Guard {
    _flushes: Vec<Flush>,
}

/// Installs the global subscriber. A stream whose writer thread cannot
/// start is written line by line instead (and says so).
pub fn init(format: LogFormat) -> Guard {
    let mut flushes = Vec::new();
    // The access log first: its writer reports dropped lines on stderr.
    let stdout = stream("access-log", std::io::stdout, &mut flushes);
    let stderr = stream("log", std::io::stderr, &mut flushes);

    let (filter, bad_filter) = trellis_core::logging::filter_from_env();
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let logs = match format {
        LogFormat::Text => logs.boxed(),
        LogFormat::Json => logs.json().boxed(),
    };
    let is_access = |meta: &tracing::Metadata<'_>| meta.target() == crate::http::ACCESS_TARGET;
    let access = access::AccessLayer::new(stdout);
    let _ = tracing_subscriber::registry()
        .with(
            logs.with_filter(filter)
                .with_filter(filter_fn(move |meta| !is_access(meta))),
        )
        .with(access.with_filter(filter_fn(is_access)))
        .try_init();
    if let Some(error) = bad_filter {
        tracing::warn!(%error, "{} is not a log filter; logging at info", trellis_core::logging::FILTER_VAR);
    }
    Guard { _flushes: flushes }
}

/// A stream written by the thread `name`, or directly if it cannot start.
fn stream<W: Write + Send + 'static>(
    name: &str,
    out: fn() -> W,
    flushes: &mut Vec<Flush>,
) -> Output<W> {
    match Batched::start(name, out()) {
        Ok((batched, flush)) => {
            flushes.push(flush);
            Output::Batched(batched)
        }
        Err(e) => {
            eprintln!(
                "trellis-proxy: starting the {name} writer thread: {e}; writing lines directly"
            );
            Output::Direct(out)
        }
    }
}

/// One stream's output: batched, or direct when its thread could not start.
enum Output<W> {
    Batched(Batched),
    Direct(fn() -> W),
}

/// The access log's lines, handed to the writer thread as they are.
impl<W: Write + 'static> access::Lines for Output<W> {
    fn line(&self, line: Vec<u8>) {
        match self {
            Output::Batched(batched) => batched.send(line),
            Output::Direct(out) => {
                let _ = out().write_all(&line);
            }
        }
    }
}

impl<'a, W: Write + 'a> MakeWriter<'a> for Output<W> {
    type Writer = EitherWriter<batched::Line<'a>, W>;

    fn make_writer(&'a self) -> Self::Writer {
        match self {
            Output::Batched(batched) => EitherWriter::A(batched.make_writer()),
            Output::Direct(out) => EitherWriter::B(out()),
        }
    }
}
