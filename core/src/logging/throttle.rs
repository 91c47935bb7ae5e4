//! At most one line per kind per window, for lines a peer can make a
//! binary write as often as it opens connections (a refused handshake, on
//! the sidecar's inbound port or the control plane's gRPC port; a
//! connection past an admin port's connection limits): a flood of them
//! would otherwise flood the log. The first line of a kind is
//! written at once; the lines of that kind within the window after it are
//! only counted, and the next one written after the window says how many
//! were not. Counting takes atomics, never a lock, on the path of the
//! connections being refused.
//!
//! A kind is a bounded label (a `reason`), never anything a peer chooses,
//! such as its address or identity: a peer could otherwise open a window
//! of its own with each connection. Time is tokio's clock, which a test
//! can pause and advance.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Writes a warning of kind `reason` through `throttle` ([`Throttle`]):
/// `tracing::warn!` with the fields and message given in braces when the
/// throttle admits it, with a `suppressed` field after them counting the
/// lines of the kind not written since the last one (none on the first).
/// The callers' crates depend on `tracing`.
///
/// ```ignore
/// warn_throttled!(refusals, reason, { %client, reason, error }, "{message}");
/// ```
#[macro_export]
macro_rules! warn_throttled {
    ($throttle:expr, $reason:expr, { $($fields:tt)* }, $($message:tt)+) => {
        match $throttle.admit($reason) {
            None => {}
            Some(0) => ::tracing::warn!($($fields)*, $($message)+),
            Some(suppressed) => ::tracing::warn!($($fields)*, suppressed, $($message)+),
        }
    };
}

/// Kinds that get a window of their own; any more share one (a kind is a
/// `reason` label, of which there are about twenty).
const KINDS: usize = 32;

/// The windows of each kind of line.
pub struct Throttle {
    window: Duration,
    /// What the times of the windows count from.
    start: Instant,
    kinds: [Kind; KINDS],
    /// The window of kinds past the first [`KINDS`].
    others: Kind,
}

/// The window of one kind of line.
#[derive(Default)]
struct Kind {
    name: OnceLock<&'static str>,
    /// When the window of the last line written ends, in milliseconds
    /// from [`Throttle::start`]; 0 before the first.
    until: AtomicU64,
    /// Lines not written since the last one that was.
    unwritten: AtomicU64,
}

impl Throttle {
    /// At most one line of a kind per `window`.
    pub fn new(window: Duration) -> Self {
        Throttle {
            window,
            start: Instant::now(),
            kinds: Default::default(),
            others: Kind::default(),
        }
    }

    /// Whether a line of `kind` is to be written now: `Some` with the
    /// number of lines of the kind that were not since the last one
    /// written, or `None` (the line is counted, to be reported by the next
    /// one written).
    pub fn admit(&self, kind: &'static str) -> Option<u64> {
        let kind = self.kind(kind);
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        let until = kind.until.load(Ordering::Acquire);
        let next = now.saturating_add(u64::try_from(self.window.as_millis()).unwrap_or(u64::MAX));
        // Of the lines that find the window over at once, the one that
        // opens the next is written; the others count in it.
        if now >= until
            && kind
                .until
                .compare_exchange(until, next, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            return Some(kind.unwritten.swap(0, Ordering::AcqRel));
        }
        kind.unwritten.fetch_add(1, Ordering::AcqRel);
        None
    }

    /// The window of `name`, taking a free one for a kind not seen yet.
    fn kind(&self, name: &'static str) -> &Kind {
        for kind in &self.kinds {
            // `set` waits only while another thread sets the same entry,
            // once in the life of the process.
            match kind.name.get() {
                Some(taken) if *taken == name => return kind,
                Some(_) => {}
                None => match kind.name.set(name) {
                    Ok(()) => return kind,
                    Err(_) if kind.name.get() == Some(&name) => return kind,
                    Err(_) => {}
                },
            }
        }
        &self.others
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first line of a kind is written, the others within the window
    /// counted, and the first after it says how many; another kind has a
    /// window of its own.
    #[tokio::test(start_paused = true)]
    async fn writes_one_line_of_a_kind_per_window_and_counts_the_others() {
        let window = Duration::from_secs(10);
        let throttle = Throttle::new(window);
        assert_eq!(throttle.admit("not_tls"), Some(0));
        for _ in 0..5 {
            assert_eq!(throttle.admit("not_tls"), None);
        }
        assert_eq!(throttle.admit("timeout"), Some(0));
        tokio::time::advance(window - Duration::from_millis(1)).await;
        assert_eq!(throttle.admit("not_tls"), None);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(throttle.admit("not_tls"), Some(6));
        assert_eq!(throttle.admit("not_tls"), None);
        assert_eq!(throttle.admit("timeout"), Some(0));
    }

    /// Past the kinds with a window of their own, the others share one.
    #[test]
    fn kinds_past_the_table_share_a_window() {
        let throttle = Throttle::new(Duration::from_secs(60));
        let names: Vec<&'static str> = (0..KINDS + 2)
            .map(|i| &*Box::leak(format!("kind{i}").into_boxed_str()))
            .collect();
        for name in &names[..KINDS] {
            assert_eq!(throttle.admit(name), Some(0), "{name}");
        }
        assert_eq!(throttle.admit(names[KINDS]), Some(0));
        assert_eq!(throttle.admit(names[KINDS + 1]), None);
    }

    /// Lines from many threads at once: one is written, every other is
    /// counted.
    #[test]
    fn no_line_goes_uncounted_under_contention() {
        let throttle = Throttle::new(Duration::from_secs(60));
        let written: u64 = std::thread::scope(|s| {
            let threads: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        (0..1000)
                            .filter(|_| throttle.admit("not_tls").is_some())
                            .count() as u64
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).sum()
        });
        assert_eq!(written, 1);
        assert_eq!(throttle.kinds[0].unwritten.load(Ordering::Relaxed), 3999);
    }
}
