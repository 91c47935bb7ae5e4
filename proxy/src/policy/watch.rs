//! The Discovery.Watch client: one stream to the control plane, opened with
//! this sidecar's SVID, kept open and re-opened with capped backoff.
//!
//! Every snapshot is compiled and answered: ACK and publish when valid, NACK
//! with the reason and keep the last good one when not. While the control
//! plane is away, and across its restarts, the last good snapshot stays in
//! force: nothing here ever clears it. Its [`Policies`] are published on
//! their own channel, and only when they change what is enforced, so open
//! connections are re-decided on a policy change and never on endpoint
//! churn or a reconnect that resends the same policies. This module never
//! decides anything about traffic.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use trellis_core::SpiffeId;
use trellis_proto::discovery::v1::{
    Ack, Nack, Subscribe, WatchRequest, discovery_client::DiscoveryClient, watch_request::Kind,
};

use super::{Policies, Snapshot};
use crate::identity::schedule::retry_delay;
use crate::identity::{self, Svid, TrustBundle};
use crate::metrics::Metrics;

/// Why a Watch session ended.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(transparent)]
    Tls(#[from] identity::CertifyError),
    #[error("connecting to the control plane at {addr}: {source}")]
    Connect {
        addr: String,
        source: tonic::transport::Error,
    },
    #[error("Watch failed: {code:?}: {message}")]
    Stream { code: tonic::Code, message: String },
    #[error("the control plane ended the stream")]
    Ended,
}

impl From<tonic::Status> for WatchError {
    fn from(s: tonic::Status) -> Self {
        WatchError::Stream {
            code: s.code(),
            message: s.message().to_string(),
        }
    }
}

/// Where and as whom to watch.
#[derive(Clone)]
pub struct WatchParams {
    pub control_plane: String,
    pub identity: SpiffeId,
    /// Every inbound address reported; never empty.
    pub advertise_addresses: Vec<SocketAddr>,
    /// Inbound ports never parsed as HTTP (`--opaque-ports`).
    pub opaque_ports: Vec<u16>,
}

/// Published state the watch writes.
pub struct Outputs {
    pub snapshot: watch::Sender<Option<Arc<Snapshot>>>,
    /// The policies in force; always sent before the snapshot holding them.
    pub policies: watch::Sender<Option<Arc<Policies>>>,
    pub bundle: watch::Sender<TrustBundle>,
    pub metrics: Arc<Metrics>,
}

/// Watches forever: waits for the first certificate, then keeps a stream
/// open, reconnecting with capped backoff.
pub async fn run(params: WatchParams, mut svid: watch::Receiver<Option<Arc<Svid>>>, out: Outputs) {
    let mut attempt = 0u32;
    loop {
        let current = match svid.wait_for(Option::is_some).await {
            Ok(s) => s.clone().expect("waited for Some"),
            Err(_) => return,
        };
        let mut received = false;
        let e = session(&params, &current, &out, &mut received).await;
        if received {
            attempt = 0;
        }
        let delay = retry_delay(attempt);
        attempt = attempt.saturating_add(1);
        tracing::warn!(error = %e, retry_in = ?delay, "discovery stream lost; keeping the last good snapshot");
        tokio::time::sleep(delay).await;
    }
}

async fn session(
    params: &WatchParams,
    svid: &Svid,
    out: &Outputs,
    received: &mut bool,
) -> WatchError {
    match session_inner(params, svid, out, received).await {
        Ok(()) => WatchError::Ended,
        Err(e) => e,
    }
}

async fn session_inner(
    params: &WatchParams,
    svid: &Svid,
    out: &Outputs,
    received: &mut bool,
) -> Result<(), WatchError> {
    let bundle = out.bundle.borrow().clone();
    let tls = identity::control_plane_tls(&params.identity, &bundle, Some(svid))?;
    // The lazy channel sends HTTP/2 keep-alives, so a control plane that
    // vanished without closing the connection is noticed.
    let channel =
        trellis_core::grpc::lazy_channel(&params.control_plane, tls).map_err(|source| {
            WatchError::Connect {
                addr: params.control_plane.clone(),
                source,
            }
        })?;
    let last_version = out.snapshot.borrow().as_ref().map_or(0, |s| s.version);
    let (tx, rx) = mpsc::channel(4);
    let (inbound_address, inbound_addresses) = identity::advertised(&params.advertise_addresses);
    let subscribe = Kind::Subscribe(Subscribe {
        inbound_address,
        inbound_addresses,
        last_version,
        accepts_endpoints_version: true,
    });
    // The receiver is alive: it was just made.
    let _ = tx
        .send(WatchRequest {
            kind: Some(subscribe),
        })
        .await;
    let mut stream = DiscoveryClient::new(channel)
        .watch(ReceiverStream::new(rx))
        .await?
        .into_inner();
    tracing::info!(control_plane = %params.control_plane, last_version, "discovery stream open");
    while let Some(raw) = stream.message().await? {
        *received = true;
        let version = raw.version;
        let endpoints_from = raw.endpoints_version;
        let held = out.snapshot.borrow().clone();
        let answer = match Snapshot::compile_in(
            raw,
            held.as_deref(),
            &params.identity,
            &params.opaque_ports,
            &out.metrics,
        ) {
            Ok(snapshot) => {
                apply(snapshot, endpoints_from, out);
                Kind::Ack(Ack { version })
            }
            Err(e) => {
                tracing::warn!(version, reason = %e, "snapshot refused; keeping the last good one");
                Kind::Nack(Nack {
                    version,
                    reason: e.to_string(),
                })
            }
        };
        if tx.send(WatchRequest { kind: Some(answer) }).await.is_err() {
            return Err(WatchError::Ended);
        }
    }
    Ok(())
}

/// Publishes a valid snapshot: its bundle if new, its policies if they
/// change what is enforced (else the ones in force are kept, same `Arc`),
/// then the snapshot itself. `endpoints_from` is the version whose
/// endpoints and services it kept (0: it carried them).
fn apply(mut snapshot: Snapshot, endpoints_from: u64, out: &Outputs) {
    let version = snapshot.version;
    let current = out.snapshot.borrow().as_ref().map(|s| s.policies.clone());
    let policies_changed = match current {
        Some(current) if current.same_as(&snapshot.policies) => {
            snapshot.policies = current;
            false
        }
        _ => true,
    };
    if policies_changed {
        // Once per change, not per snapshot: the operator should re-apply
        // a fixed version, which the Admin API would check strictly.
        for (policy, what) in snapshot.policies.relaxed() {
            tracing::warn!(
                version,
                %policy,
                problem = %what,
                "stored policy fails a check added since it was stored; enforced as the problem says (fix and apply it again)"
            );
        }
    }
    tracing::info!(
        version,
        endpoints = snapshot.endpoints.len(),
        services = snapshot.services.len(),
        endpoints_from,
        policies = snapshot.policies.names().count(),
        default_policy = snapshot.policies.set.default_policy().as_str(),
        policies_changed,
        "snapshot applied"
    );
    if !snapshot.trust_bundle.is_empty() && **out.bundle.borrow() != snapshot.trust_bundle {
        out.bundle
            .send_replace(Arc::new(snapshot.trust_bundle.clone()));
    }
    out.metrics.snapshot_version.set(version);
    if policies_changed {
        out.policies.send_replace(Some(snapshot.policies.clone()));
    }
    out.snapshot.send_replace(Some(Arc::new(snapshot)));
}
