//! Outbound: connections from the local application to the mesh.
//!
//! Two kinds of listener: an explicit [`Route`] listener (plaintext on a
//! local port, mTLS to one remote whose SPIFFE ID is fixed by the route) and
//! the [`Transparent`] listener (connections redirected by iptables, whose
//! original destination is looked up in the snapshot's mesh endpoints).
//! A mesh destination is only ever reached over mTLS with its expected
//! SPIFFE ID verified; this module never sends application bytes to a peer
//! before that check, and never dials its own listeners.
//!
//! Where a transparent connection goes is decided by `target::resolve`
//! from the snapshot alone. An original destination that is a service's
//! virtual address (a Kubernetes Service's cluster IP and port, which
//! kube-proxy has not translated yet) is first replaced by one of the
//! service's backends: under outbound `deny` only its mesh backends are
//! candidates, under `passthrough` all; they are taken in turn, or always
//! the same one for a service with client affinity. A service without a
//! ready backend is refused (`no_backend`), and one whose ready backends
//! are all outside the mesh under `deny` is refused too
//! (`no_mesh_backend`), unless one of them is this pod itself. The backend,
//! or the original destination when no service has it, is then: one of
//! the proxy's own listeners (refused, a loop); a mesh endpoint (mTLS to
//! that address, expecting its SPIFFE ID); an address of this pod that is
//! no endpoint's inbound (plain TCP, which stays inside the pod as the
//! app's own call to it would); or outside the mesh (refused or plain TCP
//! to it, as the outbound policy says). The virtual address itself is
//! never dialled. Log lines of a call to a service name it (`service`,
//! `dst` the virtual address, `backend`).
//!
//! Before dialling a mesh peer it runs the HTTP detector on the app's
//! first bytes and offers the matching ALPN (`h2`, `http/1.1`, or none for
//! opaque TCP); it never parses or changes the bytes themselves. A port
//! the mesh declares opaque skips detection: the backend's, or, for a
//! call to a service, the service's port the app dialled.

mod target;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use trellis_core::SpiffeId;
use trellis_core::tls::SvidError;

use crate::config::Route;
use crate::drain::{Drain, Tracker};
use crate::http::{self, Protocol};
use crate::metrics::{Metrics, NO_BACKEND, NO_MESH_BACKEND, OUTBOUND, SAME_POD};
use crate::net;
use crate::policy::{OutboundPolicy, Snapshot};
use crate::tls::{self, NotResumed, TlsState};
use target::{Resolved, Target, resolve};

/// The TLS server name sent as SNI; peers are verified by SPIFFE ID, so its
/// value carries no meaning.
const SNI: &str = "trellis.mesh";

/// What every outbound connection reads.
pub struct Shared {
    pub tls: watch::Receiver<Arc<TlsState>>,
    pub snapshot: watch::Receiver<Option<Arc<Snapshot>>>,
    pub metrics: Arc<Metrics>,
    /// Every address the proxy listens on: a destination among them is a loop.
    pub own_addrs: Vec<SocketAddr>,
}

/// Why a mesh dial failed.
#[derive(Debug, thiserror::Error)]
enum DialError {
    #[error("no certificate yet")]
    NoCertificate,
    #[error("connect: {0}")]
    Connect(io::Error),
    #[error("handshake: {}", trellis_core::tls::Described(.0))]
    Handshake(io::Error),
    #[error("handshake timed out")]
    Timeout,
    #[error("sending the app's first bytes: {0}")]
    FirstBytes(io::Error),
}

impl DialError {
    fn reason(&self) -> &'static str {
        match self {
            DialError::NoCertificate => "no_local_certificate",
            DialError::Connect(_) => "connect_failed",
            DialError::Handshake(e) => net::handshake_failure_reason(e),
            DialError::Timeout => "timeout",
            DialError::FirstBytes(_) => "write_failed",
        }
    }
}

/// Dials `remote` with mTLS, accepting only a server presenting `expected`
/// and offering `protocol`'s ALPN (nothing for opaque TCP).
///
/// While a ticket of the peer is held the dial resumes with X25519 alone;
/// if the peer does not accept the ticket, that attempt ends before a
/// session begins, the peer's tickets are forgotten and the dial starts
/// again with the hybrid key exchange (see [`crate::tls`]).
///
/// `first` (the app's bytes read by detection, at most
/// [`http::detect::MAX_PEEK`]) is handed to a full handshake's TLS session
/// before the handshake: rustls holds it until the server has been
/// verified and then sends it in the same write as the client's
/// `Finished`, so the peer gets the handshake's end and the first request
/// in one segment. A resumed session verifies no certificate, so there
/// the sidecar first checks that the certificate the session brought back
/// is still valid and then writes `first` itself. It is never sent as
/// 0-RTT early data.
async fn dial_mesh<R>(
    shared: &Shared,
    remote: R,
    expected: &SpiffeId,
    protocol: Protocol,
    first: &[u8],
) -> Result<TlsStream<net::ReadAhead<TcpStream>>, DialError>
where
    R: tokio::net::ToSocketAddrs + Copy,
{
    let peer = shared
        .tls
        .borrow()
        .client_for(expected)
        .ok_or(DialError::NoCertificate)?;
    let name = ServerName::DnsName(SNI.try_into().expect("valid name"));
    let Some(_reserved) = peer.tickets.reserve(&name) else {
        return handshake(&peer.full, remote, &name, protocol, first).await;
    };
    // The app's first bytes wait until the resumed session's certificate
    // is checked (below), instead of leaving with the handshake.
    match tls::resuming(handshake(&peer.resume, remote, &name, protocol, &[])).await {
        Err(DialError::Handshake(e)) if NotResumed::caused(&e) => {
            tracing::debug!(peer = %expected, "session not resumed; dialling again with the hybrid key exchange");
            shared.metrics.handshake_failure(OUTBOUND, "not_resumed");
            peer.tickets.forget(&name);
            handshake(&peer.full, remote, &name, protocol, first).await
        }
        // A resumed session brings back the peer's certificate as it was
        // verified when the session began, and no verifier looks at it
        // again: one that has expired since is not trusted, and the peer
        // is dialled again with a full handshake, which verifies its
        // current one.
        Ok(mut stream) => {
            let leaf = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first());
            let valid = leaf.map_or(Err(SvidError::NoCertificate), |leaf| {
                peer.tickets.still_valid(leaf)
            });
            match valid {
                Ok(()) => {
                    if !first.is_empty() {
                        stream
                            .write_all(first)
                            .await
                            .map_err(DialError::FirstBytes)?;
                    }
                    Ok(stream)
                }
                Err(e) => {
                    tracing::debug!(peer = %expected, error = %e, "resumed session's certificate no longer valid; dialling again with a full handshake");
                    shared
                        .metrics
                        .handshake_failure(OUTBOUND, "expired_certificate");
                    peer.tickets.forget(&name);
                    drop(stream);
                    handshake(&peer.full, remote, &name, protocol, first).await
                }
            }
        }
        other => other,
    }
}

/// One connection and handshake of [`dial_mesh`] with `config`.
async fn handshake(
    config: &Arc<rustls::ClientConfig>,
    remote: impl tokio::net::ToSocketAddrs,
    name: &ServerName<'static>,
    protocol: Protocol,
    first: &[u8],
) -> Result<TlsStream<net::ReadAhead<TcpStream>>, DialError> {
    let tcp = net::connect(remote).await.map_err(DialError::Connect)?;
    let tcp = net::ReadAhead::new(tcp);
    let connector = TlsConnector::from(config.clone());
    // rustls buffers up to 64 KiB of plaintext before the handshake ends
    // (`first` is at most 8 KiB); whatever it did not take is written
    // after the handshake.
    let queued = std::cell::Cell::new(0);
    let queue = |conn: &mut rustls::ClientConnection| {
        queued.set(std::io::Write::write(&mut conn.writer(), first).unwrap_or(0));
    };
    let connect = match protocol.alpn() {
        Some(id) => connector
            .with_alpn(vec![id.to_vec()])
            .connect_with(name.clone(), tcp, queue),
        None => connector.connect_with(name.clone(), tcp, queue),
    };
    match tokio::time::timeout(net::HANDSHAKE_TIMEOUT, connect).await {
        Ok(Ok(mut stream)) => {
            let rest = &first[queued.get()..];
            if !rest.is_empty() {
                stream
                    .write_all(rest)
                    .await
                    .map_err(DialError::FirstBytes)?;
            }
            Ok(stream)
        }
        Ok(Err(e)) => Err(DialError::Handshake(e)),
        Err(_) => Err(DialError::Timeout),
    }
}

/// Dials the mesh peer and copies bytes until both sides close. The app's
/// first bytes (or its silence, for a server-first protocol) choose the
/// ALPN offered, so the peer can serve HTTP without looking at the bytes.
/// An `opaque` connection (see [`Target::Mesh`]) is never looked at, so a
/// server-first protocol there (MySQL, SMTP) does not wait for detection.
/// `service` is the service the app called, when `remote` is its backend.
async fn forward_mesh<R>(
    shared: &Shared,
    local: TcpStream,
    remote: R,
    expected: &SpiffeId,
    via: &'static str,
    service: Option<ServiceCall<'_>>,
    opaque: bool,
) where
    R: tokio::net::ToSocketAddrs + std::fmt::Display + Copy,
{
    let metrics = &shared.metrics;
    let detected = if opaque {
        Ok((Protocol::Opaque, http::Rewind::new(local)))
    } else {
        http::detect(local).await
    };
    let (protocol, local) = match detected {
        Ok(detected) => detected,
        Err(e) => {
            tracing::debug!(remote = %remote, service = service.map(|s| s.name), error = %e, "outbound connection ended before its protocol was known");
            metrics.connection(OUTBOUND, "error");
            return;
        }
    };
    // From here the copy runs on the app's socket itself: what detection
    // read is written once, ahead of it.
    let (prefix, mut local) = local.into_parts();
    // Boxed, so the handshake's state is freed once it is over instead of
    // sizing this connection's task for as long as it is open.
    let mut upstream = match Box::pin(dial_mesh(shared, remote, expected, protocol, &prefix)).await
    {
        Ok(upstream) => upstream,
        Err(e) => {
            let reason = e.reason();
            tracing::warn!(
                remote = %remote,
                expected = %expected,
                via = %via,
                service = service.map(|s| s.name),
                dst = service.map(|s| tracing::field::display(s.dst)),
                reason = %reason,
                error = %e,
                "outbound connection refused"
            );
            if matches!(
                e,
                DialError::Handshake(_) | DialError::Timeout | DialError::NoCertificate
            ) {
                metrics.handshake_failure(OUTBOUND, reason);
            }
            metrics.connection(OUTBOUND, "refused");
            return;
        }
    };
    metrics.established(OUTBOUND, upstream.get_ref().1);
    let alpn = upstream.get_ref().1.alpn_protocol();
    tracing::info!(
        peer = %expected,
        remote = %remote,
        via = %via,
        service = service.map(|s| s.name),
        dst = service.map(|s| tracing::field::display(s.dst)),
        protocol = protocol.as_str(),
        alpn = alpn.map(String::from_utf8_lossy).as_deref().unwrap_or("none"),
        "outbound connection"
    );
    // The prefix went out with the handshake's end. Not held for the life
    // of the connection.
    let prefix_len = prefix.len() as u64;
    drop(prefix);
    match net::copy(&mut local, &mut upstream).await {
        Ok((up, down)) => {
            metrics.bytes(OUTBOUND, prefix_len + up + down);
            metrics.connection(OUTBOUND, "forwarded");
        }
        Err(e) => {
            metrics.connection(OUTBOUND, "error");
            tracing::debug!(remote = %remote, service = service.map(|s| s.name), error = %e, "outbound connection ended with an error");
        }
    }
}

/// A `--route` listener: plaintext on `route.local`, mTLS to `route.remote`.
pub struct RouteListener {
    listener: TcpListener,
    route: Arc<Route>,
    shared: Arc<Shared>,
    drain: Drain,
}

impl RouteListener {
    pub async fn new(route: Route, shared: Arc<Shared>, drain: Drain) -> io::Result<Self> {
        let listener = net::bind(route.local)?;
        Ok(RouteListener {
            listener,
            route: Arc::new(route),
            shared,
            drain,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub async fn run(self) {
        let RouteListener {
            listener,
            route,
            shared,
            drain,
        } = self;
        drain
            .accept(&listener, "route", |tcp, _, tracker| {
                tokio::spawn(serve_route(route.clone(), shared.clone(), tcp, tracker));
            })
            .await;
    }
}

/// One connection on a route: straight to the route's remote over mTLS.
async fn serve_route(route: Arc<Route>, shared: Arc<Shared>, tcp: TcpStream, _tracker: Tracker) {
    let _open = shared.metrics.open(OUTBOUND);
    forward_mesh(
        &shared,
        tcp,
        route.remote.as_str(),
        &route.spiffe_id,
        "route",
        None,
        // The remote app's port is the peer's business: detection decides.
        false,
    )
    .await;
}

/// One transparent `--outbound` listener (a sidecar has one per address:
/// 127.0.0.1 and ::1 by default).
pub struct Transparent {
    listener: TcpListener,
    shared: Arc<Shared>,
    drain: Drain,
}

impl Transparent {
    pub async fn new(addr: SocketAddr, shared: Arc<Shared>, drain: Drain) -> io::Result<Self> {
        let listener = net::bind(addr)?;
        Ok(Transparent {
            listener,
            shared,
            drain,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub async fn run(self) {
        let Transparent {
            listener,
            shared,
            drain,
        } = self;
        drain
            .accept(&listener, "outbound", |tcp, client, tracker| {
                tokio::spawn(serve_transparent(shared.clone(), tcp, client, tracker));
            })
            .await;
    }
}

/// The service a transparent connection was addressed to: its name and the
/// virtual address the app dialled.
#[derive(Debug, Clone, Copy)]
struct ServiceCall<'a> {
    name: &'a str,
    dst: SocketAddr,
}

/// One redirected connection: mesh destinations over mTLS, others per the
/// mesh's outbound policy, a service's virtual address by one of its
/// backends (see [`resolve`]).
async fn serve_transparent(
    shared: Arc<Shared>,
    tcp: TcpStream,
    client: SocketAddr,
    _tracker: Tracker,
) {
    let metrics = &shared.metrics;
    let _open = metrics.open(OUTBOUND);

    let Some(dst) = net::original_dst(&tcp) else {
        tracing::warn!(%client, "outbound connection refused: no original destination (not redirected)");
        metrics.connection(OUTBOUND, "refused");
        return;
    };
    let Resolved { service, target } = {
        let snapshot = shared.snapshot.borrow();
        resolve(&shared.own_addrs, snapshot.as_deref(), dst)
    };
    let call = service.as_deref().map(|name| ServiceCall { name, dst });
    let name = call.map(|c| c.name);
    // The backend picked is logged only when there was a service to pick
    // it: otherwise it is `dst`.
    let backend = |addr: SocketAddr| call.map(|_| tracing::field::display(addr));
    match target {
        Target::Loop(addr) => {
            tracing::warn!(%client, %dst, service = name, backend = backend(addr), "outbound connection refused: destination is this proxy (loop)");
            metrics.connection(OUTBOUND, "loop");
        }
        Target::NoBackend => {
            tracing::info!(%client, %dst, service = name, "outbound connection refused: no ready backend");
            metrics.connection(OUTBOUND, NO_BACKEND);
        }
        Target::NoMeshBackend { backends } => {
            tracing::info!(%client, %dst, service = name, backends, "outbound connection refused: no ready backend is in the mesh and the outbound policy is deny");
            metrics.connection(OUTBOUND, NO_MESH_BACKEND);
        }
        Target::Mesh { addr, id, opaque } => {
            let via = if call.is_some() {
                "service"
            } else {
                "transparent"
            };
            forward_mesh(&shared, tcp, addr, &id, via, call, opaque).await;
        }
        Target::SamePod(addr) => match net::connect(addr).await {
            Ok(upstream) => {
                tracing::info!(%client, %dst, service = name, backend = backend(addr), "outbound connection within the pod: plain TCP to this pod's own address");
                copy_plain(metrics, tcp, upstream, SAME_POD).await;
            }
            Err(e) => {
                tracing::warn!(%dst, service = name, backend = backend(addr), error = %e, "outbound connection within the pod failed");
                metrics.connection(OUTBOUND, "connect_failed");
            }
        },
        Target::Outside {
            addr,
            policy: OutboundPolicy::Deny,
        } => {
            tracing::info!(%client, %dst, service = name, backend = backend(addr), "outbound connection denied: destination outside the mesh");
            metrics.connection(OUTBOUND, "denied");
        }
        Target::Outside {
            addr,
            policy: OutboundPolicy::Passthrough,
        } => match net::connect(addr).await {
            Ok(upstream) => {
                tracing::info!(%client, %dst, service = name, backend = backend(addr), "outbound connection passthrough: destination outside the mesh");
                copy_plain(metrics, tcp, upstream, "passthrough").await;
            }
            Err(e) => {
                tracing::warn!(%dst, service = name, backend = backend(addr), error = %e, "outbound passthrough failed");
                metrics.connection(OUTBOUND, "connect_failed");
            }
        },
    }
}

/// Copies a plain connection both ways until both sides close; counted as
/// `outcome` when it ends well.
async fn copy_plain(
    metrics: &Metrics,
    mut local: TcpStream,
    mut upstream: TcpStream,
    outcome: &'static str,
) {
    match net::copy(&mut local, &mut upstream).await {
        Ok((up, down)) => {
            metrics.bytes(OUTBOUND, up + down);
            metrics.connection(OUTBOUND, outcome);
        }
        Err(_) => metrics.connection(OUTBOUND, "error"),
    }
}
