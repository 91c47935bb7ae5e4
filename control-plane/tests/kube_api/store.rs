//! Kubernetes stores connected to the stand-in API server, for the tests of
//! the store's reads and of its writes.

use std::time::Duration;

use trellis_control_plane::store::kubernetes::{self, KubernetesStore};
use trellis_core::TrustDomain;
use trellis_core::policy::ValidationContext;

use super::{ENDPOINT_SLICES, FakeKube, PODS, POLICIES, SERVICES};
use crate::common::eventually_async;

/// The workload the recorded policies select.
pub const API: &str = "spiffe://cluster.local/ns/shop/sa/api";

pub fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").unwrap()
}

/// A store of trust domain `cluster.local` reading from and writing to `fake`.
pub async fn connect(fake: &FakeKube) -> KubernetesStore {
    connect_in(fake, ValidationContext::default())
        .await
        .unwrap()
}

/// [`connect`], for a mesh of `context` (its opaque ports, say); the error
/// if the store refuses what the first lists hold.
pub async fn connect_in(
    fake: &FakeKube,
    context: ValidationContext,
) -> Result<KubernetesStore, kubernetes::KubeStoreError> {
    let client = kubernetes::client(&fake.api()).unwrap();
    KubernetesStore::connect(client, td(), context, Duration::from_secs(20)).await
}

/// Waits until `n` watches of each kind are open, so published events
/// reach every store.
pub async fn watched_by(fake: &FakeKube, n: usize) {
    eventually_async("the stores to watch", || async {
        [POLICIES, PODS, SERVICES, ENDPOINT_SLICES]
            .iter()
            .all(|path| fake.watching(path) == n)
            .then_some(())
    })
    .await;
}
