//! When to renew and how long to wait after a failure: pure functions, so the
//! schedule is tested without clocks.

use std::time::{Duration, SystemTime};

/// The first retry delay after a failed Certify.
pub const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// Retry delays never grow beyond this.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Never renew sooner than this after a certificate was issued, so a CA
/// handing out nearly expired certificates cannot make us spin.
pub const MIN_RENEWAL_INTERVAL: Duration = Duration::from_secs(1);

/// When to renew a certificate valid from `not_before` to `not_after`: at
/// half its lifetime, moved by `jitter` (clamped to -0.1..=0.1) times that
/// half, so sidecars started together do not renew together.
pub fn renew_at(not_before: SystemTime, not_after: SystemTime, jitter: f64) -> SystemTime {
    let lifetime = not_after
        .duration_since(not_before)
        .unwrap_or(Duration::ZERO);
    let half = lifetime / 2;
    let jitter = jitter.clamp(-0.1, 0.1);
    let offset = half.mul_f64(1.0 + jitter);
    not_before + offset
}

/// The delay before retry number `attempt` (0 for the first retry):
/// doubling from [`BACKOFF_MIN`], capped at [`BACKOFF_MAX`].
pub fn backoff(attempt: u32) -> Duration {
    BACKOFF_MIN
        .saturating_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX))
        .min(BACKOFF_MAX)
}

/// `delay` spread over its upper half by `spread` (0..=1): a fleet of
/// sidecars that lost the control plane together does not come back in
/// lockstep at every retry.
pub fn spread(delay: Duration, spread: f64) -> Duration {
    delay / 2 + (delay / 2).mul_f64(spread.clamp(0.0, 1.0))
}

/// A retry delay after failure number `attempt`: [`backoff`], spread at
/// random over its upper half.
pub fn retry_delay(attempt: u32) -> Duration {
    spread(backoff(attempt), rand::random_range(0.0..=1.0))
}

/// A random jitter in -0.1..=0.1.
pub fn random_jitter() -> f64 {
    rand::random_range(-0.1..=0.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn renews_at_half_life_within_ten_percent() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let end = start + HOUR;
        assert_eq!(renew_at(start, end, 0.0), start + HOUR / 2);
        assert_eq!(renew_at(start, end, 0.1), start + Duration::from_secs(1980));
        assert_eq!(
            renew_at(start, end, -0.1),
            start + Duration::from_secs(1620)
        );
        // Out-of-range jitter is clamped, never past the bounds.
        assert_eq!(renew_at(start, end, 5.0), renew_at(start, end, 0.1));
        assert_eq!(renew_at(start, end, -5.0), renew_at(start, end, -0.1));
        for _ in 0..1000 {
            let at = renew_at(start, end, random_jitter());
            assert!(
                at >= start + Duration::from_secs(1620) && at <= start + Duration::from_secs(1980)
            );
        }
    }

    #[test]
    fn a_backwards_certificate_renews_now() {
        let t = SystemTime::UNIX_EPOCH + HOUR;
        assert_eq!(renew_at(t, t - HOUR, 0.0), t);
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let delays: Vec<u64> = (0..8).map(|a| backoff(a).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }

    #[test]
    fn retries_spread_over_the_upper_half_of_the_backoff() {
        let four = Duration::from_secs(4);
        assert_eq!(spread(four, 0.0), Duration::from_secs(2));
        assert_eq!(spread(four, 0.5), Duration::from_secs(3));
        assert_eq!(spread(four, 1.0), four);
        assert_eq!(spread(four, 7.0), four, "clamped");
        for attempt in 0..8 {
            let delay = retry_delay(attempt);
            assert!(delay >= backoff(attempt) / 2 && delay <= backoff(attempt));
        }
    }
}
