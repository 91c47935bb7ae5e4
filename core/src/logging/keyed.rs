//! At most one line per key per window, for lines about an authenticated
//! peer (a caller refused for its revoked identity) or what refused one's
//! request (a policy): one peer's or policy's flood is throttled without
//! hiding another's first line, which a throttle by reason alone
//! ([`super::throttle`]) would swallow for its window.
//!
//! The keys remembered are bounded ([`Keyed::new`]'s `capacity`): a new
//! key takes the place of one whose window is over, and when every place
//! is taken by a key still within its window, the lines of new keys share
//! one window, as a throttle by reason does. A forgotten key's lines not
//! written are counted in that shared window, so every line not written is
//! reported by a later one. Keys are taken under a lock, so this is for
//! lines of peers that completed a handshake, not for the refusals of
//! unauthenticated connections ([`super::throttle::Throttle`] counts those
//! with atomics). Time is tokio's clock, which a test can pause and
//! advance.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Writes a warning about `key` through `throttle` ([`Keyed`]):
/// `tracing::warn!` with the fields and message given in braces when the
/// throttle admits it, with a `suppressed` field after them counting the
/// lines not written since the key's last one (none on the first).
#[macro_export]
macro_rules! warn_throttled_by_key {
    ($throttle:expr, $key:expr, { $($fields:tt)* }, $($message:tt)+) => {
        match $throttle.admit($key) {
            None => {}
            Some(0) => ::tracing::warn!($($fields)*, $($message)+),
            Some(suppressed) => ::tracing::warn!($($fields)*, suppressed, $($message)+),
        }
    };
}

/// The windows of up to `capacity` keys, and one they share past that.
pub struct Keyed<K> {
    window: Duration,
    capacity: usize,
    state: Mutex<State<K>>,
}

struct State<K> {
    keys: Vec<Window<K>>,
    /// The window shared by keys that found no place.
    shared: Window<()>,
}

/// The window of one key: when it ends, and the lines not written since
/// its last one that was.
struct Window<K> {
    key: K,
    until: Option<Instant>,
    unwritten: u64,
}

impl<K> Window<K> {
    /// [`Keyed::admit`] for this window at `now`.
    fn admit(&mut self, now: Instant, window: Duration) -> Option<u64> {
        if self.until.is_some_and(|until| now < until) {
            self.unwritten += 1;
            return None;
        }
        self.until = Some(now + window);
        Some(std::mem::take(&mut self.unwritten))
    }

    fn is_over(&self, now: Instant) -> bool {
        self.until.is_none_or(|until| now >= until)
    }
}

impl<K: PartialEq + Clone> Keyed<K> {
    /// At most one line per key per `window`, remembering up to `capacity`
    /// keys.
    pub fn new(window: Duration, capacity: usize) -> Self {
        Keyed {
            window,
            capacity,
            state: Mutex::new(State {
                keys: Vec::new(),
                shared: Window {
                    key: (),
                    until: None,
                    unwritten: 0,
                },
            }),
        }
    }

    /// Whether a line about `key` is to be written now: `Some` with the
    /// number of lines about it that were not since the last one written,
    /// or `None` (the line is counted, to be reported by the next one
    /// written).
    pub fn admit(&self, key: &K) -> Option<u64> {
        self.admit_by(|known| known == key, || key.clone())
    }

    /// [`admit`](Self::admit) for the key `is_key` tells from the others,
    /// which `make` makes only when it is to be remembered anew: a key
    /// holding a copy of what the line borrows (a policy's name) is copied
    /// once while it is remembered, not for each line.
    pub fn admit_by(&self, is_key: impl Fn(&K) -> bool, make: impl FnOnce() -> K) -> Option<u64> {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let State { keys, shared } = &mut *state;
        if let Some(known) = keys.iter_mut().find(|w| is_key(&w.key)) {
            return known.admit(now, self.window);
        }
        let fresh = |key| Window {
            key,
            until: Some(now + self.window),
            unwritten: 0,
        };
        if keys.len() < self.capacity {
            keys.push(fresh(make()));
            return Some(0);
        }
        match keys.iter_mut().find(|w| w.is_over(now)) {
            Some(place) => {
                // Its lines not written are the shared window's to report.
                shared.unwritten += place.unwritten;
                *place = fresh(make());
                Some(0)
            }
            None => shared.admit(now, self.window),
        }
    }

    /// How many keys are remembered.
    pub fn len(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(10);

    /// Each key's first line is written at once, whatever other keys
    /// wrote; its next ones within the window are counted.
    #[tokio::test(start_paused = true)]
    async fn each_key_has_a_window_of_its_own() {
        let throttle = Keyed::new(WINDOW, 8);
        assert_eq!(throttle.admit(&"web"), Some(0));
        assert_eq!(throttle.admit(&"api"), Some(0));
        assert_eq!(throttle.admit(&"web"), None);
        assert_eq!(throttle.admit(&"web"), None);
        tokio::time::advance(WINDOW).await;
        assert_eq!(throttle.admit(&"web"), Some(2));
        assert_eq!(throttle.admit(&"api"), Some(0));
    }

    /// However many keys come, no more than `capacity` are remembered:
    /// past them, new keys share one window while every place is within
    /// its own, and take the place of one whose window is over, its
    /// unwritten lines reported by the shared window's next line.
    #[tokio::test(start_paused = true)]
    async fn remembers_at_most_its_capacity_of_keys() {
        let throttle = Keyed::new(WINDOW, 4);
        for key in 0..4 {
            assert_eq!(throttle.admit(&key), Some(0), "{key}");
        }
        assert_eq!(throttle.admit(&0), None);
        for key in 4..10_000 {
            let admitted = throttle.admit(&key);
            assert_eq!(admitted.is_some(), key == 4, "{key}");
        }
        assert_eq!(throttle.len(), 4);

        tokio::time::advance(WINDOW).await;
        // A new key takes a place whose window is over; key 0's unwritten
        // line is reported by the shared window, with those it counted.
        assert_eq!(throttle.admit(&20_000), Some(0));
        assert_eq!(throttle.len(), 4);
        for key in 1..4 {
            assert_eq!(throttle.admit(&(30_000 + key)), Some(0));
        }
        assert_eq!(throttle.admit(&40_000), Some(9_995 + 1));
        assert_eq!(throttle.len(), 4);
    }

    /// A key told by `is_key` is made only when it is remembered anew:
    /// not for a line about a key remembered, written or not, nor for one
    /// that finds no place and shares the window of the others; and its
    /// lines are throttled as `admit`'s are.
    #[tokio::test(start_paused = true)]
    async fn a_key_is_made_only_when_it_is_remembered_anew() {
        let throttle: Keyed<(&str, Box<str>)> = Keyed::new(WINDOW, 1);
        let made = std::cell::Cell::new(0);
        let admit = |kind: &'static str, policy: &str| {
            let is_key = |(k, p): &(&str, Box<str>)| *k == kind && **p == *policy;
            throttle.admit_by(is_key, || {
                made.set(made.get() + 1);
                (kind, policy.into())
            })
        };
        assert_eq!(admit("denied", "b/no-admin"), Some(0));
        assert_eq!(admit("denied", "b/no-admin"), None);
        assert_eq!(admit("denied", "b/no-admin"), None);
        assert_eq!(made.get(), 1);
        // No place left: the shared window, and nothing made.
        assert_eq!(admit("rate_limited", "b/no-admin"), Some(0));
        assert_eq!(admit("denied", "b/other"), None);
        assert_eq!(made.get(), 1);

        tokio::time::advance(WINDOW).await;
        assert_eq!(admit("denied", "b/no-admin"), Some(2));
        assert_eq!(made.get(), 1);
        // A new key takes the place of one whose window is over: made.
        tokio::time::advance(WINDOW).await;
        assert_eq!(admit("denied", "b/other"), Some(0));
        assert_eq!(made.get(), 2);
        assert_eq!(throttle.len(), 1);
    }
}
