//! What the control plane's stand-in for the Kubernetes API server
//! (`kube_api`, included from the control plane's tests so that there is
//! one stand-in, not two) finds beside it in a test crate: the HTTPS
//! serving loop it runs on, from the same place, and the waiting helper its
//! store module calls. Owns no test of its own.

#[allow(dead_code)]
#[path = "../../../control-plane/tests/common/serving.rs"]
pub mod serving;

use std::time::Duration;

/// The control plane's tests' `eventually_async` (retry `f` until it
/// returns `Some`, panic naming `what` after 30 s), on this harness's
/// [`trellis_tests::eventually`].
#[allow(dead_code)]
pub async fn eventually_async<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    trellis_tests::eventually(what, Duration::from_secs(30), || {
        let attempt = f();
        async move { attempt.await.ok_or("not yet") }
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"))
}
