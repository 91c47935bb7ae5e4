//! Where the sidecar's lines go: its own log on stderr (text or JSON,
//! filtered by `TRELLIS_LOG`, default `info`) and the access log on stdout
//! (target [`ACCESS_TARGET`](crate::http::ACCESS_TARGET), JSON whatever
//! `--log-format` says, one object per request with its fields at the top
//! level, written by [`access`]). Each stream is written in batches by a
//! thread of its own ([`trellis_core::logging::batched`]), so nothing on the
//! data path waits for a write.

pub mod access;

use std::io::Write;

use trellis_core::logging::{Output, stream};

pub use trellis_core::logging::Guard;

use trellis_core::logging::Format;

/// Installs the global subscriber, with the access log's stream. A stream
/// whose writer thread cannot start is written line by line instead (and
/// says so).
pub fn init(format: Format) -> Guard {
    let mut guard = Guard::default();
    // The access log first: its writer reports dropped lines on stderr.
    access::install(stream(PROGRAM, "access-log", std::io::stdout, &mut guard));
    trellis_core::logging::init(PROGRAM, format, &mut guard);
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
