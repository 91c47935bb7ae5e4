//! Waiting for a time of the wall clock, and writing one.
//!
//! Tokio's timers run on the monotonic clock, which stands still while the
//! host is suspended (a laptop's lid closed, a paused virtual machine). A
//! certificate's renewal is due at a wall-clock time, and one long sleep
//! towards it would wake that much late, after the certificate expired. So
//! the wait is taken in slices, each time reading the wall clock again.

use std::time::{Duration, SystemTime};

/// The longest slice of a wait: how late a wait may end after the host
/// wakes from a suspension.
pub const SLICE: Duration = Duration::from_secs(30);

/// Returns once the wall clock reads `at` or later.
pub async fn sleep_until(at: SystemTime) {
    while let Ok(left) = at.duration_since(SystemTime::now()) {
        if left.is_zero() {
            return;
        }
        tokio::time::sleep(left.min(SLICE)).await;
    }
}

/// `unix` in RFC 3339, in whole seconds, UTC; `None` when it is before
/// 1970, past the year 9999 or past what a system time holds.
pub fn rfc3339_checked(unix: i64) -> Option<String> {
    use std::fmt::Write as _;
    let time =
        SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(u64::try_from(unix).ok()?))?;
    let mut out = String::new();
    write!(out, "{}", humantime::format_rfc3339_seconds(time)).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn returns_once_the_wall_clock_reaches_the_time() {
        let at = SystemTime::now() + Duration::from_millis(300);
        sleep_until(at).await;
        assert!(SystemTime::now() >= at);
        // A time passed already: at once.
        let before = std::time::Instant::now();
        sleep_until(SystemTime::now() - Duration::from_secs(60)).await;
        assert!(before.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn times_without_an_rfc3339_form_are_none() {
        assert_eq!(rfc3339_checked(0).as_deref(), Some("1970-01-01T00:00:00Z"));
        assert_eq!(
            rfc3339_checked(253_402_300_799).as_deref(),
            Some("9999-12-31T23:59:59Z")
        );
        for unix in [-1, 253_402_300_800, i64::MAX] {
            assert_eq!(rfc3339_checked(unix), None, "{unix}");
        }
    }
}
