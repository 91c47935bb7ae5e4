//! What the control plane's stand-in for the Kubernetes API server
//! (`kube_api`, included from the control plane's tests so that there is
//! one stand-in, not two) finds beside it in a test crate: the HTTPS
//! serving loop it runs on, from the same place, and the waiting helper its
//! store module calls. Owns no test of its own.

#[allow(dead_code)]
#[path = "../../../control-plane/tests/common/serving.rs"]
pub mod serving;

use std::time::Duration;

/// As the control plane's tests wait: retries `f` until it returns `Some`,
/// or panics naming `what` after 30 s.
#[allow(dead_code)]
pub async fn eventually_async<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
