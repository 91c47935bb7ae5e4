//! End-to-end tests of a local Trellis mesh. They run the real binaries
//! (`trellis-control-plane`, `trellisctl`, `trellis-proxy`, built by
//! `cargo test --workspace` or `cargo build --workspace`) as child processes
//! over real loopback sockets; every test starts its own mesh on free ports
//! with its own temporary state, so the tests run in parallel.
//!
//! One test binary holds every module so that libtest runs them all in
//! parallel (separate `tests/*.rs` binaries would run one after another).

mod admin;
mod certify;
mod demo;
mod flags;
mod http;
mod inbound;
mod metrics;
mod mtls;
mod outage;
mod outbound;
mod policy;
mod replicas;
mod revoke;
mod root_rotation;
mod rotation;
mod shutdown;
mod state_disk;
mod tcp;
mod trellisctl;

use std::time::Duration;

use trellis_tests::{HttpApp, Mesh, Sidecar};

/// How long a test waits for something that should happen soon.
pub const SOON: Duration = Duration::from_secs(20);

/// A mesh with an HTTP app `api` behind a sidecar and a `web` sidecar with a
/// route to it: the smallest mesh where a call crosses mTLS. Fields drop in
/// order: the sidecars stop before the control plane.
pub struct Pair {
    pub client: Sidecar,
    pub server: Sidecar,
    pub api: HttpApp,
    pub mesh: Mesh,
}

impl Pair {
    pub async fn start(mesh: Mesh) -> anyhow::Result<Pair> {
        let api = HttpApp::start("api").await?;
        let server = mesh.sidecar("api").app(api.addr()).start().await?;
        let client = mesh.sidecar("web").route_to(&server).start().await?;
        Ok(Pair {
            client,
            server,
            api,
            mesh,
        })
    }

    /// Where the client's app sends plaintext to reach `api` over mTLS.
    pub fn route(&self) -> std::net::SocketAddr {
        self.client.route_addr(self.server.identity())
    }
}
