//! The local-mesh harness: it runs the real Trellis binaries as child
//! processes (`trellis-control-plane`, `trellisctl`, `trellis-proxy`) on free
//! loopback ports with temporary state, plus small in-process apps behind
//! the sidecars. The end-to-end tests and `trellis-demo` are built on it.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use trellis_tests::{HttpApp, Mesh, http};
//! let mesh = Mesh::start().await?;
//! let api = HttpApp::start("api").await?;
//! let server = mesh.sidecar("api").app(api.addr()).start().await?;
//! let client = mesh.sidecar("web").route_to(&server).start().await?;
//! let answer = http::get(client.route_addr(server.identity()), "/").await?;
//! assert_eq!(answer.body, "hello from api");
//! # Ok(()) }
//! ```
//!
//! The binaries are found beside the running executable (`target/<profile>/`,
//! which `cargo test --workspace` fills), or the running executable runs
//! them itself ([`Launcher::SelfExec`], the demo). Every child's output goes
//! to a log file in the mesh's directory; every child is stopped (SIGTERM,
//! then SIGKILL) when its handle drops, also when a test panics. Set
//! `TRELLIS_TEST_KEEP=1` to keep the directories and `TRELLIS_TEST_PATIENCE`
//! to scale every wait on a slow machine.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod admin;
pub mod apps;
pub mod binaries;
pub mod http;
pub mod mesh;
pub mod metrics;
pub mod patience;
pub mod ports;
#[cfg(test)]
mod ports_tests;
pub mod probes;
pub mod process;
pub mod sidecar;
pub mod sockets;
pub mod traffic;

pub use admin::Admin;
pub use apps::{EchoApp, HttpApp, greeting};
pub use binaries::{Launcher, Program};
pub use mesh::{Mesh, MeshBuilder};
pub use metrics::Metrics;
pub use patience::{eventually, patience};
pub use process::ChildProcess;
pub use sidecar::{Route, Sidecar, SidecarBuilder, find_field};
pub use traffic::{Traffic, TrafficReport};
pub mod bench;
pub mod grpc;
pub mod machine;
pub mod netns;
pub mod policy;
