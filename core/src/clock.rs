//! Waiting for a time of the wall clock.
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
}
