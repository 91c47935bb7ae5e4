//! What both binaries' logging shares: their one setup ([`init`]), the
//! filter they read from `TRELLIS_LOG` (a default level and levels per
//! module, `info`, `warn,trellis_proxy=debug`, as `tracing_subscriber`'s
//! `Targets` parses it), and the output streams written in batches by a
//! thread of their own
//! ([`batched`]), so that no request, connection or Certify waits for a
//! write to a slow log collector; and the [`throttle`] of the lines a peer
//! can make them write as often as it opens connections, with its
//! counterpart by key ([`keyed`]) for lines about authenticated peers.

pub mod batched;
pub mod keyed;
pub mod throttle;

use std::io::{IsTerminal, Write};

use tracing_subscriber::Layer;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::writer::EitherWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use batched::{Batched, Flush};

/// The variable holding the log filter.
pub const FILTER_VAR: &str = "TRELLIS_LOG";

/// How a process writes its own lines on stderr: the value of each
/// binary's `--log-format` (`TRELLIS_LOG_FORMAT`), `text` (the default) or
/// `json`. `Text` is one human-readable line per event. `Json` is one flat
/// JSON object per event: `timestamp`, `level`, `message`, the event's
/// fields and `target`, all top-level keys, so that a log pipeline indexes
/// each field by its own name; no span context (the binaries open no spans,
/// and a library's would nest objects).
// The variants carry no doc comments: clap would list them in `--help` as
// each value's help.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    #[default]
    Text,
    Json,
}

/// Installs the global subscriber: the process's own lines on stderr in
/// `format`, filtered by [`FILTER_VAR`], written by a thread of their own
/// (line by line if it cannot start, `program` saying so). The stream's
/// flush joins `guard`, after those of the streams already in it.
pub fn init(program: &str, format: Format, guard: &mut Guard) {
    let stderr = stream(program, "log", std::io::stderr, guard);
    let (filter, bad_filter) = filter_from_env();
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let logs = match format {
        Format::Text => logs.boxed(),
        Format::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .try_init();
    if let Some(error) = bad_filter {
        tracing::warn!(%error, "{FILTER_VAR} is not a log filter; logging at info");
    }
}

/// A list as one field's value: its items by [`Display`](std::fmt::Display),
/// separated by commas (`10.0.0.1:80,10.0.0.2:80`), so that a JSON line
/// holds a plain string where a debug-printed list would quote each item
/// inside it.
pub struct List<'a, T>(pub &'a [T]);

impl<T: std::fmt::Display> std::fmt::Display for List<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        joined(self.0, ",", f)
    }
}

/// Sentences as one field's value, as [`List`] but separated by `; `:
/// for items that hold commas themselves (an admission review's
/// warnings), so that a reader can tell where one ends.
pub struct Sentences<'a, T>(pub &'a [T]);

impl<T: std::fmt::Display> std::fmt::Display for Sentences<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        joined(self.0, "; ", f)
    }
}

fn joined<T: std::fmt::Display>(
    items: &[T],
    separator: &str,
    f: &mut std::fmt::Formatter<'_>,
) -> std::fmt::Result {
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            f.write_str(separator)?;
        }
        item.fmt(f)?;
    }
    Ok(())
}

/// The filter in [`FILTER_VAR`]: `info` when it is unset or empty, and
/// `info` with the reason when it cannot be read, for the caller to log
/// once its subscriber is installed.
pub fn filter_from_env() -> (Targets, Option<String>) {
    parse(std::env::var(FILTER_VAR))
}

fn parse(var: Result<String, std::env::VarError>) -> (Targets, Option<String>) {
    let info = || Targets::new().with_default(tracing::Level::INFO);
    match var {
        Err(std::env::VarError::NotPresent) => (info(), None),
        Err(e) => (info(), Some(e.to_string())),
        Ok(text) if text.trim().is_empty() => (info(), None),
        Ok(text) => match text.parse::<Targets>() {
            Ok(filter) => (filter, None),
            Err(e) => (info(), Some(format!("{text:?}: {e}"))),
        },
    }
}

/// Writes the lines still queued by its streams when dropped: keep it
/// until exit.
#[derive(Default)]
pub struct Guard {
    flushes: Vec<Flush>,
}

/// A stream written by the thread `name`, or line by line if the thread
/// cannot start (`program` says so on stderr); `guard` writes what is
/// still queued when it is dropped.
pub fn stream<W: Write + Send + 'static>(
    program: &str,
    name: &str,
    out: fn() -> W,
    guard: &mut Guard,
) -> Output<W> {
    match Batched::start(name, out()) {
        Ok((batched, flush)) => {
            guard.flushes.push(flush);
            Output::Batched(batched)
        }
        Err(e) => {
            eprintln!("{program}: starting the {name} writer thread: {e}; writing lines directly");
            Output::Direct(out)
        }
    }
}

/// One stream's output: batched, or direct when its thread could not start.
pub enum Output<W> {
    Batched(Batched),
    Direct(fn() -> W),
}

impl<W: Write> Output<W> {
    /// Writes `count` whole lines (formatted records, newlines included)
    /// gathered in one buffer.
    pub fn lines(&self, bytes: Vec<u8>, count: usize) {
        match self {
            Output::Batched(batched) => batched.send_lines(bytes, count),
            Output::Direct(out) => {
                let _ = out().write_all(&bytes);
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

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    fn level_for(filter: &Targets, target: &str) -> Option<Level> {
        [
            Level::TRACE,
            Level::DEBUG,
            Level::INFO,
            Level::WARN,
            Level::ERROR,
        ]
        .into_iter()
        .find(|l| filter.would_enable(target, l))
    }

    #[test]
    fn a_list_is_its_items_between_commas() {
        assert_eq!(List(&[8080u16, 9090]).to_string(), "8080,9090");
        assert_eq!(List(&["127.0.0.1:1"]).to_string(), "127.0.0.1:1");
        assert_eq!(
            Sentences(&["a, b", "c"]).to_string(),
            "a, b; c",
            "sentences holding commas are told apart"
        );
        assert_eq!(List::<u16>(&[]).to_string(), "");
    }

    #[test]
    fn unset_or_empty_means_info() {
        for var in [Err(std::env::VarError::NotPresent), Ok(" ".to_string())] {
            let (filter, error) = parse(var);
            assert_eq!(error, None);
            assert_eq!(
                level_for(&filter, "trellis_proxy::inbound"),
                Some(Level::INFO)
            );
        }
    }

    #[test]
    fn a_default_and_levels_per_module() {
        let (filter, error) = parse(Ok("warn,trellis_proxy::identity=debug".into()));
        assert_eq!(error, None);
        assert_eq!(
            level_for(&filter, "trellis_proxy::identity"),
            Some(Level::DEBUG)
        );
        assert_eq!(
            level_for(&filter, "trellis_proxy::inbound"),
            Some(Level::WARN)
        );
    }

    #[test]
    fn an_unreadable_filter_falls_back_to_info_and_says_why() {
        let (filter, error) = parse(Ok("trellis_proxy=loud".into()));
        let error = error.expect("an error");
        assert!(error.contains("trellis_proxy=loud"), "{error}");
        assert_eq!(level_for(&filter, "trellis_proxy"), Some(Level::INFO));
    }
}
