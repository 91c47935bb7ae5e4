//! Domain types shared by the Trellis control plane and sidecar.
//!
//! `spiffe` owns SPIFFE IDs and trust domains: a [`SpiffeId`] is parsed once
//! and valid afterwards. `tls` owns the rustls pieces both sides need to
//! verify peers by SPIFFE ID against a trust bundle, never by hostname.
//! `policy` owns authorization policies: documents, validation, the protobuf
//! form and the engine that decides connections. `logging` reads the log
//! filter both binaries share. `clock` waits for a wall-clock time, as
//! certificate renewals do. `duration` reads every duration flag, annotation
//! and setting and says durations in words. `revocation` says which certificates a
//! revoked identity's revocation covers, for renewals and for peers. `connections` limits the connections of the
//! HTTP/1.1 ports every pod can reach, and `http1` reads and checks the
//! first request head of each of their connections before hyper serves it,
//! answering one it refuses in words. `open_files` raises the open-files
//! limit, as both binaries do at start-up. `io_error` says an I/O error
//! without the OS's `(os error N)`, as the binaries report a port in use
//! or a file they cannot read, and how they end when the reader of their
//! stdout goes away. `tcp` holds the sidecar's TCP
//! timers, the range of its `TCP_USER_TIMEOUT` and what its opaque ports
//! may be, and `h2_limits` the range of its HTTP/2 connection limits,
//! which the injector checks annotations against. `app_health` holds the
//! admin path and header of the app's probes and hooks, which the injector
//! writes and the sidecar serves.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod app_health;
pub mod clock;
pub mod connections;
pub mod duration;
pub mod escape;
pub mod flags;
pub mod gather;
pub mod grpc;
pub mod h2_limits;
pub mod http1;
pub mod io_error;
pub mod logging;
pub mod open_files;
pub mod policy;
pub mod refusal;
pub mod revocation;
pub mod slots;
pub mod spiffe;
pub mod tcp;
pub mod tls;
pub mod tokens;

pub use spiffe::{SpiffeId, TrustDomain};
