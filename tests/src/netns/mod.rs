//! A pod network made of Linux network namespaces, for the tests of
//! transparent interception: a `wire` namespace holding a bridge, and
//! [`Host`]s (pods, the control plane, a server outside the mesh), each a
//! namespace of its own joined to the bridge by a veth pair. On it run the
//! real binaries: the control plane ([`ControlPlane`]), and in each [`Pod`]
//! `trellis-proxy init` then the sidecar as UID 1337; the apps are
//! unmodified programs run as another UID (`python3 -m http.server`
//! ([`HttpServer`]), curl or python3 as the client ([`Host::http_get`])), and
//! a [`Capture`] records every frame crossing the bridge. A server of the
//! test's own (a stand-in API server) runs inside a namespace on a
//! [`NetnsRuntime`].
//!
//! Everything is made with `ip -n NS ...` and `ip netns exec NS ...`: nothing
//! touches the machine's own namespace, and the only addresses are
//! TEST-NET-1 (`192.0.2.0/24`) and a ULA prefix (`fd00:7e11::/64`), assigned
//! inside the namespaces. Names carry the process id and a counter, so tests
//! run in parallel.
//!
//! Needs root, iproute2, iptables, python3 and setpriv; [`unavailable`] says
//! which is missing (`skipped: needs root`, ...) so a test can pass it to
//! [`crate::machine::skip`]. Every process is stopped by its pid when its handle drops, and every
//! namespace deleted when its handle drops, also when a test panics; the
//! handles' field order stops the processes of a namespace before it goes.

mod capture;
mod command;
mod control_plane;
mod host;
mod lab;
mod namespace;
mod pod;
mod tools;

use std::time::Duration;

pub use capture::{Capture, Segment, tcp_segment};
pub use command::output;
pub use control_plane::{ControlPlane, spiffe_id};
pub use host::{Host, HttpServer, Reply};
pub use lab::Lab;
pub use namespace::{Netns, NetnsRuntime};
pub use pod::{Credential, Pod};
pub use tools::{Tools, unavailable};

/// The UID (and GID) the sidecars run as; `init` never redirects it.
pub const PROXY_UID: u32 = 1337;
/// The UID (and GID) the apps run as: neither root nor the proxy.
pub const APP_UID: u32 = 1000;
pub const INBOUND_PORT: u16 = 15006;
pub const OUTBOUND_PORT: u16 = 15001;
pub const ADMIN_PORT: u16 = 15020;
pub const CONTROL_PLANE_PORT: u16 = 15012;
/// The trust domain of the meshes made here.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// How long a program may take to start.
pub const START_PATIENCE: Duration = Duration::from_secs(30);
/// How long one short-lived command (a client, `init`, `trellisctl`) may run.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a client waits for an answer.
const REQUEST_TIMEOUT_SECS: u32 = 10;
