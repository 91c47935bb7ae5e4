//! What to log of a failure of the control plane's calls that repeats:
//! a warning when it begins or changes words, the same failure again at
//! debug level, and a reminder every [`REMIND_EVERY`] for as long as it
//! lasts, saying for how long and after how many attempts. One warning
//! per change keeps a fleet's logs readable while the control plane is
//! away; the reminder keeps an outage of hours from reading as one line
//! at its start and nothing after. A pure tally, so it is tested without
//! waiting.

use std::time::{Duration, Instant};

/// How often a failure that goes on is warned of again.
pub const REMIND_EVERY: Duration = Duration::from_secs(5 * 60);

/// How a failure is to be logged.
#[derive(Debug, PartialEq, Eq)]
pub enum Say {
    /// As a warning: the first of an outage, or in other words than the
    /// one before.
    Warn,
    /// As a warning again: the same failure, [`REMIND_EVERY`] after it was
    /// last warned of; failing for `failing_for`, `attempts` attempts.
    Remind {
        failing_for: Duration,
        attempts: u32,
    },
    /// At debug level: the same failure, warned of not long ago.
    Debug,
}

/// The failures since the last success: only the words of the last one
/// are kept, to compare the next with, and two instants and a count.
#[derive(Debug, Default)]
pub struct Outage {
    said: Option<String>,
    since: Option<Instant>,
    warned: Option<Instant>,
    attempts: u32,
}

impl Outage {
    /// Tallies a failure in `words` at `now`, saying how to log it.
    pub fn failed(&mut self, words: String, now: Instant) -> Say {
        let since = *self.since.get_or_insert(now);
        self.attempts = self.attempts.saturating_add(1);
        let say = match self.warned {
            Some(warned) if self.said.as_deref() == Some(words.as_str()) => {
                if now.saturating_duration_since(warned) >= REMIND_EVERY {
                    Say::Remind {
                        failing_for: now.saturating_duration_since(since),
                        attempts: self.attempts,
                    }
                } else {
                    Say::Debug
                }
            }
            _ => Say::Warn,
        };
        if say != Say::Debug {
            self.warned = Some(now);
        }
        self.said = Some(words);
        say
    }

    /// The outage is over: the next failure is the first of another.
    pub fn ended(&mut self) {
        *self = Outage::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    /// A control plane away for an hour, retried every 30 s: one warning
    /// as it begins, then one every five minutes saying for how long and
    /// after how many attempts, the retries between at debug level.
    #[test]
    fn a_long_outage_is_warned_of_again_every_five_minutes() {
        let start = Instant::now();
        let mut outage = Outage::default();
        let mut warned = Vec::new();
        for attempt in 0..120u32 {
            let now = start + Duration::from_secs(30) * attempt;
            match outage.failed("unreachable".into(), now) {
                Say::Debug => {}
                say => warned.push((now - start, say)),
            }
        }
        assert_eq!(warned.len(), 12, "{warned:?}");
        assert_eq!(warned[0], (Duration::ZERO, Say::Warn));
        assert_eq!(
            warned[1],
            (
                5 * MINUTE,
                Say::Remind {
                    failing_for: 5 * MINUTE,
                    attempts: 11
                }
            )
        );
        assert_eq!(
            warned[11].1,
            Say::Remind {
                failing_for: 55 * MINUTE,
                attempts: 111
            }
        );
    }

    /// A failure in other words is warned of at once, and the reminders
    /// count from it; after a success, the next failure begins anew.
    #[test]
    fn other_words_warn_at_once_and_a_success_starts_over() {
        let start = Instant::now();
        let mut outage = Outage::default();
        assert_eq!(outage.failed("a".into(), start), Say::Warn);
        assert_eq!(outage.failed("a".into(), start + MINUTE), Say::Debug);
        assert_eq!(outage.failed("b".into(), start + 4 * MINUTE), Say::Warn);
        assert_eq!(outage.failed("b".into(), start + 8 * MINUTE), Say::Debug);
        assert_eq!(
            outage.failed("b".into(), start + 9 * MINUTE),
            Say::Remind {
                failing_for: 9 * MINUTE,
                attempts: 5
            }
        );
        outage.ended();
        assert_eq!(outage.failed("b".into(), start + 10 * MINUTE), Say::Warn);
        assert_eq!(outage.failed("b".into(), start + 11 * MINUTE), Say::Debug);
    }
}
