//! The inbound listener: every connection from another sidecar is accepted,
//! authenticated (TLS 1.3, client SVID mandatory), authorized and forwarded
//! to the local application. [`serve`] is the whole path of one connection.
//!
//! This module never trusts a peer it has not verified: before the first
//! certificate, and for any handshake failure, the connection is dropped
//! without a byte reaching the application.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::drain::{Drain, Tracker};
use crate::metrics::{INBOUND, Metrics};
use crate::net;
use crate::policy::{self, Snapshot};
use crate::tls::TlsState;

/// Binds the inbound port; [`Inbound::run`] accepts on it.
pub struct Inbound {
    listener: TcpListener,
    shared: Arc<Shared>,
    drain: Drain,
}

/// A redirected connection whose original port is one of the proxy's own.
#[derive(Debug, thiserror::Error)]
#[error("inbound connection must not target the proxy's own port {0}")]
pub struct Loop(pub u16);

/// What every inbound connection reads.
pub struct Shared {
    pub app: SocketAddr,
    /// Ports of the proxy's other listeners (outbound, admin, routes).
    pub own_ports: Vec<u16>,
    pub tls: watch::Receiver<Arc<TlsState>>,
    pub snapshot: watch::Receiver<Option<Arc<Snapshot>>>,
    pub metrics: Arc<Metrics>,
}

impl Inbound {
    pub async fn new(addr: SocketAddr, shared: Shared, drain: Drain) -> io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        Ok(Inbound {
            listener,
            shared: Arc::new(shared),
            drain,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts until shutdown, one task per connection.
    pub async fn run(mut self) {
        loop {
            let accepted = tokio::select! {
                _ = self.drain.signaled() => break,
                accepted = self.listener.accept() => accepted,
            };
            match accepted {
                Ok((tcp, client)) => {
                    let shared = self.shared.clone();
                    let tracker = self.drain.tracker();
                    tokio::spawn(serve(shared, tcp, client, tracker));
                }
                Err(e) => tracing::warn!(error = %e, "inbound accept failed"),
            }
        }
        tracing::info!("inbound listener stopped accepting");
    }
}

/// One inbound connection, from accept to close.
pub async fn serve(shared: Arc<Shared>, tcp: TcpStream, client: SocketAddr, _tracker: Tracker) {
    let metrics = &shared.metrics;
    let _open = metrics.open(INBOUND);
    let _ = tcp.set_nodelay(true);

    // Where the caller meant to go: its original port when iptables
    // redirected it here, else the configured app.
    let target = match net::original_dst(&tcp) {
        Some(dst) if shared.own_ports.contains(&dst.port()) => {
            tracing::warn!(%client, error = %Loop(dst.port()), "inbound connection refused");
            metrics.connection(INBOUND, "loop");
            return;
        }
        Some(dst) => SocketAddr::new(shared.app.ip(), dst.port()),
        None => shared.app,
    };

    // Authenticate: the configs current now serve this connection for its
    // whole life; a rotation only affects later connections.
    let tls = shared.tls.borrow().clone();
    let Some(config) = tls.server() else {
        tracing::warn!(%client, "inbound connection refused: no certificate yet");
        metrics.handshake_failure(INBOUND, "no_local_certificate");
        metrics.connection(INBOUND, "refused");
        return;
    };
    let accept = TlsAcceptor::from(config.clone()).accept(tcp);
    let mut stream = match tokio::time::timeout(net::HANDSHAKE_TIMEOUT, accept).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            let reason = net::handshake_failure_reason(&e);
            tracing::warn!(%client, reason = %reason, error = %e, "inbound handshake failed");
            metrics.handshake_failure(INBOUND, reason);
            metrics.connection(INBOUND, "refused");
            return;
        }
        Err(_) => {
            tracing::warn!(%client, reason = %"timeout", "inbound handshake failed");
            metrics.handshake_failure(INBOUND, "timeout");
            metrics.connection(INBOUND, "refused");
            return;
        }
    };
    drop(tls);
    let peer = match trellis_core::tls::peer_spiffe_id(stream.get_ref().1.peer_certificates()) {
        Ok(peer) => peer,
        Err(e) => {
            // The verifier already checked the SVID; this is defence in depth.
            tracing::warn!(%client, reason = %"invalid_svid", error = %e, "inbound handshake failed");
            metrics.handshake_failure(INBOUND, "invalid_svid");
            metrics.connection(INBOUND, "refused");
            return;
        }
    };

    // Authorize, against the snapshot in force now (an `Arc`, so deciding
    // never holds the channel's lock).
    let snapshot = shared.snapshot.borrow().clone();
    let decision = policy::authorize(snapshot.as_deref(), &peer, target.port());
    drop(snapshot);
    if !decision.is_allowed() {
        tracing::info!(%peer, app = %target, %decision, "inbound connection denied");
        metrics.connection(INBOUND, "denied");
        return;
    }

    // Forward.
    let mut app = match net::connect(target).await {
        Ok(app) => app,
        Err(e) => {
            tracing::warn!(%peer, app = %target, error = %e, "inbound connection failed: app unreachable");
            metrics.connection(INBOUND, "app_unreachable");
            return;
        }
    };
    tracing::info!(%peer, app = %target, %decision, "inbound connection");
    let result = net::copy(&mut stream, &mut app).await;
    match result {
        Ok((from_peer, to_peer)) => {
            metrics.bytes(INBOUND, from_peer + to_peer);
            metrics.connection(INBOUND, "forwarded");
            tracing::debug!(%peer, from_peer, to_peer, "inbound connection closed");
        }
        Err(e) => {
            metrics.connection(INBOUND, "error");
            tracing::debug!(%peer, error = %e, "inbound connection ended with an error");
        }
    }
}
