//! Per-sidecar snapshots: what each sidecar needs to enforce (its policies,
//! the mesh endpoints, the trust bundle, the mesh config), versioned.
//!
//! One persisted version counter increases with every change that can affect
//! a snapshot; a change is announced on a `watch` channel. Each Watch stream
//! rebuilds its sidecar's snapshot on an announcement and sends it only when
//! its content differs from what that stream last sent, so sidecars a change
//! does not affect see nothing (coalescing more announcements into one build
//! fits here too). This module also tracks what each connected sidecar
//! acknowledged. It never authenticates anyone: callers pass a verified ID.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use trellis_core::SpiffeId;
use trellis_proto::discovery::v1::{Endpoint, MeshConfig, Snapshot};
use trellis_proto::policy::v1::Policy;

use crate::store::{Store, StoreError};

/// The policies that select `id`. Policies are not stored yet; the policy
/// work fills this in.
pub fn policies_for(_id: &SpiffeId) -> Vec<Policy> {
    Vec::new()
}

/// What the control plane knows about one sidecar's discovery streams.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SidecarStatus {
    pub acked_version: u64,
    /// The reason of the last NACK, cleared by a later ACK.
    pub last_nack: String,
    /// Open Watch streams from this identity.
    pub streams: u32,
}

impl SidecarStatus {
    pub fn connected(&self) -> bool {
        self.streams > 0
    }
}

pub struct Discovery {
    store: Arc<dyn Store>,
    bundle: Vec<Vec<u8>>,
    mesh: MeshConfig,
    version: watch::Sender<u64>,
    sidecars: Mutex<BTreeMap<SpiffeId, SidecarStatus>>,
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovery")
            .field("version", &*self.version.borrow())
            .finish_non_exhaustive()
    }
}

impl Discovery {
    /// Settles the mesh config in the store (a changed config is a new
    /// version) and starts announcing from the stored version.
    pub fn new(
        store: Arc<dyn Store>,
        bundle: Vec<Vec<u8>>,
        mesh: MeshConfig,
    ) -> Result<Self, StoreError> {
        let encoded = format!(
            "default_policy={};outbound_policy={}",
            mesh.default_policy, mesh.outbound_policy
        );
        let version = store.settle_mesh_config(&encoded)?;
        Ok(Self {
            store,
            bundle,
            mesh,
            version: watch::Sender::new(version),
            sidecars: Mutex::new(BTreeMap::new()),
        })
    }

    /// Records that something snapshots contain has changed, and announces it.
    pub fn changed(&self) -> Result<u64, StoreError> {
        let version = self.store.bump_snapshot_version()?;
        self.version.send_replace(version);
        Ok(version)
    }

    /// Announcements of new versions.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    pub fn current_version(&self) -> u64 {
        *self.version.borrow()
    }

    /// The snapshot for the sidecar `id` at the current version.
    pub fn snapshot_for(&self, id: &SpiffeId) -> Result<Snapshot, StoreError> {
        let version = self.current_version();
        let mut endpoints: Vec<Endpoint> = self
            .store
            .workloads()?
            .into_iter()
            .filter(|w| !w.address.is_empty())
            .map(|w| Endpoint {
                address: w.address,
                spiffe_id: w.spiffe_id,
            })
            .collect();
        endpoints.sort_by(|a, b| (&a.address, &a.spiffe_id).cmp(&(&b.address, &b.spiffe_id)));
        Ok(Snapshot {
            version,
            trust_bundle: self.bundle.clone(),
            endpoints,
            policies: policies_for(id),
            mesh: Some(self.mesh.clone()),
        })
    }

    /// Marks a stream from `id` open until the returned guard is dropped.
    pub fn open_stream(self: &Arc<Self>, id: &SpiffeId) -> StreamGuard {
        self.with_status(id, |s| s.streams += 1);
        StreamGuard {
            discovery: self.clone(),
            id: id.clone(),
        }
    }

    pub fn ack(&self, id: &SpiffeId, version: u64) {
        self.with_status(id, |s| {
            s.acked_version = s.acked_version.max(version);
            s.last_nack.clear();
        });
    }

    pub fn nack(&self, id: &SpiffeId, reason: &str) {
        let reason: String = reason.chars().take(512).collect();
        self.with_status(id, |s| s.last_nack = reason);
    }

    pub fn status(&self, id: &SpiffeId) -> Option<SidecarStatus> {
        self.sidecars.lock().expect("not poisoned").get(id).cloned()
    }

    fn with_status(&self, id: &SpiffeId, f: impl FnOnce(&mut SidecarStatus)) {
        let mut sidecars = self.sidecars.lock().expect("not poisoned");
        f(sidecars.entry(id.clone()).or_default());
    }
}

/// An open Watch stream; dropping it marks the stream closed.
pub struct StreamGuard {
    discovery: Arc<Discovery>,
    id: SpiffeId,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.discovery
            .with_status(&self.id, |s| s.streams = s.streams.saturating_sub(1));
    }
}

/// Whether two snapshots differ in anything but their version.
pub fn same_content(a: &Snapshot, b: &Snapshot) -> bool {
    Snapshot {
        version: 0,
        ..a.clone()
    } == Snapshot {
        version: 0,
        ..b.clone()
    }
}
