//! The Discovery.Watch client: one stream to the control plane, opened with
//! this sidecar's SVID, kept open and re-opened with capped backoff; a
//! reason the stream is lost is warned of once while it repeats.
//!
//! Every snapshot is compiled and answered: ACK and publish when valid, NACK
//! with the reason and keep the last good one when not. While the control
//! plane is away, and across its restarts, the last good snapshot stays in
//! force: nothing here ever clears it. Its [`Policies`] are published on
//! their own channel, and only when they change what is enforced, so open
//! connections are re-decided on a policy change and never on endpoint
//! churn or a reconnect that resends the same policies. This module never
//! decides anything about traffic.
//!
//! A snapshot holds every endpoint and Service of the mesh, so it is taken
//! up to [`MAX_SNAPSHOT_BYTES`], far above gRPC's usual 4 MiB; a larger one
//! cannot be read, and the sidecar says so (an error naming both sizes)
//! and keeps its last good snapshot while it retries.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use trellis_core::SpiffeId;
use trellis_core::duration::Words;
use trellis_core::policy::RELAXED_POLICY_WARNING;
use trellis_proto::discovery::v1::{
    Ack, Nack, Subscribe, WatchRequest, discovery_client::DiscoveryClient, watch_request::Kind,
};

use super::{Policies, Snapshot};
use crate::identity::outage::{Outage, Say};
use crate::identity::schedule::retry_delay;
use crate::identity::{self, Svid, TrustBundle};
use crate::metrics::Metrics;

/// The largest snapshot the sidecar reads, encoded. tonic's default
/// (4 MiB) is reached by a mesh of some 30 000 pods with their Services:
/// past it every Watch would fail and reconnect for ever. An endpoint takes
/// some 60 bytes and a Service's backend some 20, so 64 MiB holds a mesh
/// several times the size Kubernetes supports (150 000 pods), while a bound
/// still keeps a broken control plane from making the sidecar allocate
/// without limit. A larger snapshot ends the stream before it is read:
/// the sidecar logs an error naming its size and this limit, keeps the
/// last good snapshot and retries with backoff.
pub const MAX_SNAPSHOT_BYTES: usize = 64 * 1024 * 1024;

/// The longest NACK reason sent, in bytes, before its `... (N bytes)`
/// mark. A reason quotes a field or two of the refused snapshot, so it is
/// short unless a field is huge; the control plane keeps only its first
/// 512 characters and reads a Watch request of at most 64 KiB.
pub const MAX_NACK_REASON_BYTES: usize = 4096;

/// How long a stream must have been open for its end to start the
/// reconnection backoff again from its first step: the longest retry
/// delay, so a control plane that ends its streams sooner than that is
/// retried no more often than one that cannot be reached.
pub const SETTLED: Duration = crate::identity::schedule::BACKOFF_MAX;

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
    #[error("Watch failed: {}", trellis_core::grpc::refusal_words(*code, message))]
    Stream { code: tonic::Code, message: String },
    #[error("a snapshot of {size} bytes is larger than the {limit} bytes this sidecar reads")]
    TooLarge { size: usize, limit: usize },
    #[error("the control plane ended the stream")]
    Ended,
}

impl WatchError {
    /// Whether the control plane, having opened the stream, ended it with
    /// what a retry at once would meet again: a refusal of this sidecar
    /// (a revoked certificate, too many streams) or a snapshot too large
    /// to read. Such an end does not reset the backoff, so a fleet refused
    /// together does not come back every second, each time for a full
    /// handshake and perhaps a snapshot of the whole mesh.
    fn refuses(&self) -> bool {
        use tonic::Code::*;
        match self {
            WatchError::TooLarge { .. } => true,
            WatchError::Stream { code, .. } => !matches!(
                code,
                Ok | Cancelled | Unknown | DeadlineExceeded | Aborted | Internal | Unavailable
            ),
            WatchError::Tls(_) | WatchError::Connect { .. } | WatchError::Ended => false,
        }
    }
}

impl From<tonic::Status> for WatchError {
    fn from(s: tonic::Status) -> Self {
        if s.code() == tonic::Code::OutOfRange
            && let Some((size, limit)) = too_large(s.message())
        {
            return WatchError::TooLarge { size, limit };
        }
        WatchError::Stream {
            code: s.code(),
            message: s.message().to_string(),
        }
    }
}

/// The size and limit tonic names when a message is larger than it reads:
/// "... found {size} bytes, the limit is: {limit} bytes".
fn too_large(message: &str) -> Option<(usize, usize)> {
    let rest = message.split_once("found ")?.1;
    let (size, rest) = rest.split_once(" bytes, the limit is: ")?;
    let limit = rest.strip_suffix(" bytes")?;
    Some((size.parse().ok()?, limit.parse().ok()?))
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
    // Why the sessions ended since a stream last stayed open: the same reason
    // again is said at debug, so a control plane away for minutes costs
    // one warning for the stream lost and one for the reconnections
    // failing, not one per retry, and a reminder every five minutes while
    // it lasts.
    let mut outage = Outage::default();
    loop {
        let current = match svid.wait_for(Option::is_some).await {
            Ok(s) => s.clone().expect("waited for Some"),
            Err(_) => return,
        };
        // A stream the control plane kept open for a while resets the
        // backoff, whether or not it sent anything: it sends nothing to a
        // sidecar that already holds the version it serves, which in a
        // quiet mesh is every reconnection after the first. So a sidecar
        // whose stream a control plane ends as it shuts down (a rolling
        // upgrade) reconnects within a second to another replica. Not one
        // ended soon after it opened, by a control plane that crashes
        // under its streams, or one that ended refusing what a retry
        // would meet again: every sidecar of the mesh would come back
        // every second.
        let mut opened = None;
        let e = session(&params, &current, &out, &mut opened).await;
        let settled = opened.is_some_and(|at: Instant| at.elapsed() >= SETTLED);
        if settled && !e.refuses() {
            attempt = 0;
            outage.ended();
        }
        let delay = retry_delay(attempt);
        attempt = attempt.saturating_add(1);
        match outage.failed(e.to_string(), std::time::Instant::now()) {
            Say::Debug => {
                tracing::debug!(error = %e, retry_in = ?delay, attempt, "discovery stream still lost; keeping the last good snapshot")
            }
            Say::Remind {
                failing_for,
                attempts,
            } => {
                let failing_for = Words(Duration::from_secs(failing_for.as_secs()));
                tracing::warn!(error = %e, %failing_for, attempts, retry_in = ?delay, "discovery stream still lost; keeping the last good snapshot")
            }
            Say::Warn => match e {
                // No retry reads it either, unless the control plane comes to
                // send less: an operator must know.
                WatchError::TooLarge { size, limit } => tracing::error!(
                    size,
                    limit,
                    retry_in = ?delay,
                    "discovery snapshot too large to read; keeping the last good snapshot"
                ),
                e => {
                    tracing::warn!(error = %e, retry_in = ?delay, "discovery stream lost; keeping the last good snapshot")
                }
            },
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            // A new certificate may be what the control plane was
            // refusing: it is tried at once.
            changed = svid.changed() => if changed.is_err() {
                return;
            }
        }
    }
}

async fn session(
    params: &WatchParams,
    svid: &Svid,
    out: &Outputs,
    opened: &mut Option<Instant>,
) -> WatchError {
    match session_inner(params, svid, out, opened).await {
        Ok(()) => WatchError::Ended,
        Err(e) => e,
    }
}

async fn session_inner(
    params: &WatchParams,
    svid: &Svid,
    out: &Outputs,
    opened: &mut Option<Instant>,
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
    // A version names its content only with the epoch it was set in: a
    // control plane whose database was restored from an older copy sets
    // the same versions again, in another epoch, with other content.
    // Its warnings too: a control plane that finds it holding the current
    // version sends nothing, so it is not acknowledged again.
    let (last_version, last_version_epoch, warnings) = out
        .snapshot
        .borrow()
        .as_ref()
        .map_or((0, 0, Vec::new()), |s| {
            (s.version, s.version_epoch, ack_warnings(&s.policies))
        });
    let (tx, rx) = mpsc::channel(4);
    let (inbound_address, inbound_addresses) = identity::advertised(&params.advertise_addresses);
    let subscribe = Kind::Subscribe(Subscribe {
        inbound_address,
        inbound_addresses,
        last_version,
        accepts_endpoints_version: true,
        accepts_endpoint_changes: true,
        last_version_epoch,
        warnings,
        // So that Explain holds them opaque for connections to us too.
        opaque_ports: params.opaque_ports.iter().map(|&p| p.into()).collect(),
    });
    // The receiver is alive: it was just made.
    let _ = tx
        .send(WatchRequest {
            kind: Some(subscribe),
        })
        .await;
    let mut stream = discovery_client(channel)
        .watch(ReceiverStream::new(rx))
        .await?
        .into_inner();
    *opened = Some(Instant::now());
    // The epoch in hex, as `/config` and `trellisctl workloads` show it.
    tracing::info!(
        control_plane = %params.control_plane,
        last_version,
        last_version_epoch = %format_args!("{last_version_epoch:016x}"),
        "discovery stream open"
    );
    while let Some(raw) = stream.message().await? {
        let version = raw.version;
        let endpoints_from = raw.endpoints_version;
        let changes = raw.endpoint_changes.as_ref().map(|c| {
            c.endpoints.len()
                + c.removed_endpoints.len()
                + c.services.len()
                + c.removed_services.len()
        });
        let held = out.snapshot.borrow().clone();
        let answer = match Snapshot::compile_in(
            raw,
            held.as_deref(),
            &params.identity,
            &params.opaque_ports,
            &out.metrics,
        ) {
            Ok(snapshot) => {
                let warnings = ack_warnings(&snapshot.policies);
                apply(snapshot, endpoints_from, changes, out);
                Kind::Ack(Ack { version, warnings })
            }
            Err(e) => {
                tracing::warn!(version, reason = %e, "snapshot refused; keeping the last good one");
                Kind::Nack(Nack {
                    version,
                    reason: nack_reason(e.to_string()),
                })
            }
        };
        if tx.send(WatchRequest { kind: Some(answer) }).await.is_err() {
            return Err(WatchError::Ended);
        }
    }
    Ok(())
}

/// What an ACK says the sidecar enforces otherwise than `policies` were
/// sent (each rule enforced failing closed on a port it treats as opaque),
/// for `trellisctl check`: each cut as a NACK's reason is, and no more
/// than fit in [`MAX_NACK_REASON_BYTES`] together (then a line saying how
/// many more there are, which the log names).
fn ack_warnings(policies: &Policies) -> Vec<String> {
    let fallbacks = policies.opaque_fallbacks();
    let mut warnings = Vec::new();
    let mut bytes = 0;
    for (i, fallback) in fallbacks.iter().enumerate() {
        let warning = nack_reason(fallback.to_string());
        bytes += warning.len();
        if bytes > MAX_NACK_REASON_BYTES {
            let more = fallbacks.len() - i;
            warnings.push(format!(
                "and {more} more rules with HTTP conditions on ports this sidecar treats as opaque (see its log)"
            ));
            break;
        }
        warnings.push(warning);
    }
    warnings
}

/// `reason` cut to [`MAX_NACK_REASON_BYTES`] (at a character boundary)
/// and marked with its full length when it is longer.
fn nack_reason(mut reason: String) -> String {
    if reason.len() <= MAX_NACK_REASON_BYTES {
        return reason;
    }
    let len = reason.len();
    let mut cut = MAX_NACK_REASON_BYTES;
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    reason.truncate(cut);
    reason.push_str(&format!("... ({len} bytes)"));
    reason
}

/// The Discovery client, reading snapshots up to [`MAX_SNAPSHOT_BYTES`].
fn discovery_client(channel: Channel) -> DiscoveryClient<Channel> {
    DiscoveryClient::new(channel).max_decoding_message_size(MAX_SNAPSHOT_BYTES)
}

/// Publishes a valid snapshot: its bundle if new, its policies if they
/// change what is enforced (else the ones in force are kept, same `Arc`),
/// then the snapshot itself. `endpoints_from` is the version whose
/// endpoints and services it kept (0: it carried them), with `changes`
/// made to them (how many endpoints and services it added, replaced or
/// removed), if any.
fn apply(mut snapshot: Snapshot, endpoints_from: u64, changes: Option<usize>, out: &Outputs) {
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
                "{RELAXED_POLICY_WARNING}"
            );
        }
        // The control plane cannot see this sidecar's opaque ports, and an
        // entry naming no ports reaches every opaque one: the operator
        // hears it here and in /config.
        for fallback in snapshot.policies.opaque_fallbacks() {
            tracing::warn!(
                version,
                policy = %fallback.rule.policy,
                rule = fallback.rule.rule,
                ports = %trellis_core::logging::List(&fallback.ports),
                problem = %fallback,
                "policy has HTTP conditions on a port this sidecar treats as opaque; enforced as the problem says, failing closed"
            );
        }
    }
    tracing::info!(
        version,
        endpoints = snapshot.endpoints.len(),
        services = snapshot.services.len(),
        endpoints_from,
        endpoint_changes = changes,
        policies = snapshot.policies.names().count(),
        default_policy = snapshot.policies.set.default_policy().as_str(),
        policies_changed,
        "snapshot applied"
    );
    if !snapshot.trust_bundle.is_empty() && **out.bundle.borrow() != snapshot.trust_bundle {
        identity::publish_bundle(&out.bundle, snapshot.trust_bundle.clone(), "snapshot");
    }
    out.metrics.snapshot_version.set(version);
    if policies_changed {
        out.policies.send_replace(Some(snapshot.policies.clone()));
    }
    out.snapshot.send_replace(Some(Arc::new(snapshot)));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reason quoting a huge field of a snapshot is cut, on a character
    /// boundary, and says how long it was; a usual one is sent whole.
    #[test]
    fn a_nack_reason_is_cut_to_its_bound() {
        let usual = "endpoints[3].address 10.0.0.300:15006 is not ip:port".to_owned();
        assert_eq!(nack_reason(usual.clone()), usual);
        let huge = format!("services[0].address {} is not ip:port", "é".repeat(40_000));
        let cut = nack_reason(huge.clone());
        assert!(
            cut.len() <= MAX_NACK_REASON_BYTES + 32,
            "{} bytes",
            cut.len()
        );
        assert!(cut.starts_with("services[0].address é"));
        assert!(
            cut.ends_with(&format!("... ({} bytes)", huge.len())),
            "{cut}"
        );
    }

    /// What tonic says when a snapshot is larger than the client reads, and
    /// what the sidecar makes of it: both sizes, not a generic stream loss.
    #[test]
    fn a_snapshot_past_the_limit_is_told_apart() {
        let status = tonic::Status::out_of_range(format!(
            "Error, decoded message length too large: found 70000000 bytes, the limit is: \
             {MAX_SNAPSHOT_BYTES} bytes"
        ));
        let e = WatchError::from(status);
        assert!(
            matches!(
                e,
                WatchError::TooLarge {
                    size: 70_000_000,
                    limit: MAX_SNAPSHOT_BYTES
                }
            ),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "a snapshot of 70000000 bytes is larger than the 67108864 bytes this sidecar reads"
        );
        let other = WatchError::from(tonic::Status::out_of_range("no such version"));
        assert!(matches!(other, WatchError::Stream { .. }), "{other:?}");
        // Said with the code in words, as the control plane's tools say it.
        assert_eq!(
            other.to_string(),
            "Watch failed: out of range: no such version"
        );
    }
}
