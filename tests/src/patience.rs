//! Waiting for something to become true, with a tunable patience: the
//! harness's `assert_eventually`.
//!
//! Patience is how long a test is willing to wait, never a claim about how
//! fast anything is (timing belongs to the benchmarks). On a slow machine set
//! `TRELLIS_TEST_PATIENCE` to a factor (e.g. `3`) that multiplies every
//! patience.

use std::future::Future;
use std::time::{Duration, Instant};

/// How often a condition is retried.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// `base` scaled by `TRELLIS_TEST_PATIENCE` (a positive number, default 1).
pub fn patience(base: Duration) -> Duration {
    let factor = std::env::var("TRELLIS_TEST_PATIENCE")
        .ok()
        .and_then(|f| f.parse::<f64>().ok())
        .filter(|f| f.is_finite() && *f > 0.0)
        .unwrap_or(1.0);
    base.mul_f64(factor)
}

/// Retries `attempt` every [`POLL_INTERVAL`] until it succeeds or the
/// (scaled) `patience` runs out; then fails with the last error, saying what
/// was awaited.
pub async fn eventually<T, E, F, Fut>(
    what: &str,
    patience: Duration,
    mut attempt: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let patience = self::patience(patience);
    let deadline = Instant::now() + patience;
    loop {
        let last = match attempt().await {
            Ok(value) => return Ok(value),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            anyhow::bail!("gave up after {patience:?} waiting for {what}; last: {last:#}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Asserts that an async condition becomes true within a patience:
/// `assert_eventually!(Duration::from_secs(5), async { sidecar.is_ready().await })`
/// or with a message as third argument.
#[macro_export]
macro_rules! assert_eventually {
    ($patience:expr, $cond:expr $(,)?) => {
        $crate::assert_eventually!($patience, $cond, stringify!($cond))
    };
    ($patience:expr, $cond:expr, $what:expr $(,)?) => {{
        let result = $crate::eventually(&$what.to_string(), $patience, || async {
            if $cond { Ok(()) } else { Err("still false") }
        })
        .await;
        if let Err(e) = result {
            panic!("{e:#}");
        }
    }};
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    use super::eventually;

    #[tokio::test]
    async fn retries_until_the_condition_holds() {
        let calls = AtomicU32::new(0);
        crate::assert_eventually!(
            Duration::from_secs(5),
            calls.fetch_add(1, Ordering::SeqCst) >= 2
        );
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn gives_up_with_what_was_awaited_and_the_last_error() {
        let result: anyhow::Result<()> =
            eventually("the moon", Duration::from_millis(250), || async {
                Err("still dark")
            })
            .await;
        let message = format!("{:#}", result.unwrap_err());
        assert!(
            message.contains("the moon") && message.contains("still dark"),
            "{message}"
        );
    }
}
