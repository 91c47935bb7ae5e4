//! `trellis.discovery.v1.Discovery/Watch`: one stream per sidecar, snapshots
//! down, ACK/NACK up.
//!
//! The caller must present an SVID; the first message must be a Subscribe,
//! sent within [`SUBSCRIBE_TIMEOUT`] of the stream's headers (else the
//! stream ends with DEADLINE_EXCEEDED). A message that does not decode
//! as a `WatchRequest`, the Subscribe or one after it, ends the stream
//! with INVALID_ARGUMENT naming which one and why.
//! A snapshot is sent first (unless the sidecar already holds the current
//! version: it subscribed with that version and the epoch it was set in),
//! then again whenever the sidecar's snapshot content changes: an
//! announced change is looked at once the stream's last rebuild is a
//! [`COALESCE_WINDOW`] old (at once after a quiet spell), when the stream
//! derives its sidecar's content key from the shared view and builds a
//! snapshot only when that key changed. A sidecar that subscribed with
//! `accepts_endpoints_version` and acknowledged the last snapshot sent is
//! not sent endpoints it holds: the snapshot names the version they come
//! from instead, and, when they changed since and the sidecar subscribed
//! with `accepts_endpoint_changes`, carries only what changed (computed
//! once per starting version for every stream). Snapshots leave as
//! [`EncodedSnapshot`]s, whose shared parts were encoded once per version
//! (the route that writes them is `super::discovery_server`).
//! The stream ends with UNAVAILABLE when the control plane shuts down.
//! A stream past the replica's [`WatchLimits`](crate::discovery::WatchLimits)
//! (per sidecar: an identity from one address; and in all) is refused
//! with RESOURCE_EXHAUSTED naming the limit and the identity.
//!
//! A revoked certificate is sent nothing: a Watch whose client certificate
//! a revocation of its identity covers (issued at or before it, or at a
//! time not known, as Certify decides a renewal) is refused with
//! PERMISSION_DENIED naming the identity and when it was revoked, and an
//! open stream ends with that status at its first rebuild after such a
//! revocation (which sets a new version, so every stream rebuilds). A
//! stream looks its identity up in the view's revocations only when they
//! changed, so other changes cost it nothing more.

use std::collections::VecDeque;
use std::pin::Pin;

use futures::Stream;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};
use trellis_core::SpiffeId;
use trellis_proto::discovery::v1::encoded::EncodedSnapshot;
use trellis_proto::discovery::v1::watch_request::Kind;
use trellis_proto::discovery::v1::{Subscribe, WatchRequest};

use super::discovery_server::MAX_WATCH_REQUEST_BYTES;
use super::{Mesh, peer_of, quoted_chars, quoted_up_to, require_svid, rfc3339};
use crate::discovery::{
    COALESCE_WINDOW, ContentKey, Discovery, EndpointsIn, HeldEndpoints, SnapshotVersion,
    StreamGuard, View,
};
use crate::metrics::Metrics;
use crate::server::Refusals;

/// At most this many characters of what a sidecar sent (its addresses, a
/// NACK's reason, each warning of an ACK) are logged.
const LOGGED_CHARS: usize = 512;

/// At most this many warnings of an ACK are kept (then one line that says
/// how many more there were).
const ACK_WARNINGS_KEPT: usize = 16;

pub type SnapshotStream = Pin<Box<dyn Stream<Item = Result<EncodedSnapshot, Status>> + Send>>;

pub struct DiscoveryService {
    mesh: Mesh,
    /// Streams refused past the Watch limits: counted, and logged at most
    /// once per limit per pause (a sidecar retrying in a loop must not
    /// flood the log).
    over_limits: Refusals,
}

/// How long a Watch has, from its headers, to send its Subscribe, as
/// long as a unary call has for its request
/// ([`REQUEST_BODY_TIMEOUT`](crate::body_deadline::REQUEST_BODY_TIMEOUT)):
/// a sidecar sends it at once. A stream takes a slot in the
/// [`WatchLimits`](crate::discovery::WatchLimits) only once it has
/// subscribed, so without this a caller could hold any number of streams
/// waiting, each with the part of a Subscribe it sent.
pub const SUBSCRIBE_TIMEOUT: std::time::Duration = crate::body_deadline::REQUEST_BODY_TIMEOUT;

/// How a Watch stream refused past the Watch limits is logged, with the
/// limit (`reason`, `error`) and peer.
const OVER_LIMITS: &str = "discovery stream refused: past the Watch limits";

impl DiscoveryService {
    pub fn new(mesh: Mesh) -> Self {
        let over_limits = Refusals::new(mesh.metrics.clone(), Metrics::watch_stream_refused);
        Self { mesh, over_limits }
    }

    /// `Discovery.Watch`: checks the caller and its Subscribe, then serves
    /// the stream from a task of its own.
    pub async fn watch(
        &self,
        request: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<SnapshotStream>, Status> {
        let id = require_svid(&request, "Discovery.Watch")?;
        let issued_at = peer_of(&request).and_then(|p| p.cert_issued_at_unix);
        if let Some(refused) = refused_as_revoked(&self.mesh.discovery.view(), &id, issued_at) {
            tracing::warn!(spiffe_id = %id, detail = refused.message(), "discovery stream refused: the certificate is revoked");
            return Err(refused);
        }
        let peer = peer_of(&request).map(|p| p.remote);
        let presented = peer_of(&request).and_then(|p| p.presented.clone());
        let mut inbound = request.into_inner();
        // A stream refused before it opens is logged once, as a revoked
        // one is: its sidecar is told why, its operator reads it here.
        let subscribed: Result<(Subscribe, Vec<u16>), Status> = async {
            let first = tokio::time::timeout(SUBSCRIBE_TIMEOUT, inbound.message())
                .await
                .map_err(|_| {
                    Status::deadline_exceeded(format!(
                        "the Subscribe of a Watch did not arrive in full within {} of its headers",
                        trellis_core::duration::Words(SUBSCRIBE_TIMEOUT)
                    ))
                })?;
            let subscribe = match first.map_err(|status| {
                if super::unreadable_request(&status) {
                    super::unreadable("the first message of a Watch (its Subscribe)", &status)
                } else {
                    super::request_refused("Watch", MAX_WATCH_REQUEST_BYTES, status)
                }
            })? {
                Some(WatchRequest {
                    kind: Some(Kind::Subscribe(s)),
                }) => s,
                Some(_) => {
                    return Err(Status::invalid_argument(
                        "the first message of a Watch must be a Subscribe",
                    ));
                }
                None => {
                    return Err(Status::invalid_argument(
                        "the stream closed before a Subscribe",
                    ));
                }
            };
            // Kept with the stream for Explain; a sidecar never sends a number
            // that is not a port, so one that does is refused.
            let opaque_ports = super::port_list("Subscribe.opaque_ports", &subscribe.opaque_ports)?;
            Ok((subscribe, opaque_ports))
        }
        .await;
        let (subscribe, opaque_ports) = subscribed.inspect_err(|refused| {
            // A stream that failed (reset, a broken connection) keeps that
            // failure as its source: nobody sent anything wrong.
            if std::error::Error::source(refused).is_some() {
                return;
            }
            tracing::warn!(spiffe_id = %id, code = ?refused.code(), detail = refused.message(), "discovery stream refused: no valid Subscribe");
        })?;
        // The caller's address is the TLS layer's, never missing with an
        // SVID; unspecified stands for one all the same.
        let peer = peer.unwrap_or_else(|| (std::net::Ipv4Addr::UNSPECIFIED, 0).into());
        // Open until the closing line is written: a stopping replica
        // stops listening once every stream is closed, so the lines of
        // its streams come before the line that says so.
        let open =
            match self
                .mesh
                .discovery
                .try_open_stream(&id, peer.ip(), presented, opaque_ports)
            {
                Ok(open) => open,
                Err(refused) => {
                    self.over_limits
                        .refuse(peer, refused.reason(), Some(&refused), OVER_LIMITS);
                    return Err(Status::resource_exhausted(refused.to_string()));
                }
            };
        let (tx, rx) = mpsc::channel(4);
        let mesh = self.mesh.clone();
        tokio::spawn(async move {
            // What the sidecar sent, bounded: a log line never grows with
            // a caller's input.
            let addresses = if subscribe.inbound_addresses.is_empty() {
                quoted_up_to(&subscribe.inbound_address, LOGGED_CHARS)
            } else {
                quoted_list_up_to(&subscribe.inbound_addresses, LOGGED_CHARS)
            };
            tracing::info!(spiffe_id = %id, inbound = %addresses, last_version = subscribe.last_version, last_version_epoch = %crate::ctl::epoch_hex(subscribe.last_version_epoch), "discovery stream opened");
            mesh.metrics.watch_stream_opened();
            let reason = serve_stream(&mesh, &open, &id, issued_at, &subscribe, inbound, tx).await;
            mesh.metrics.watch_stream_closed();
            tracing::info!(spiffe_id = %id, reason, "discovery stream closed");
            drop(open);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

type Sender = mpsc::Sender<Result<EncodedSnapshot, Status>>;

/// How long a stream whose certificate was revoked waits for room to tell
/// its sidecar so (one that stopped reading sees its stream end without
/// it).
const REVOKED_SEND_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);

/// PERMISSION_DENIED, as Certify refuses a renewal, when a revocation of
/// `id` in `view` covers a certificate issued at `issued_at` (Unix
/// seconds; `None` when not known, which is covered).
fn refused_as_revoked(view: &View, id: &SpiffeId, issued_at: Option<i64>) -> Option<Status> {
    let at = view.revoked_at(id)?;
    if issued_at.is_some_and(|issued| !trellis_core::revocation::covers(at, issued)) {
        return None;
    }
    let mut status = Status::permission_denied(format!(
        "{id} was revoked at {} ({at}): a certificate issued then or before is sent no \
         snapshot; obtain a new one with a join token",
        rfc3339(at)
    ));
    status.metadata_mut().insert(
        trellis_core::grpc::REFUSAL_KEY,
        tonic::metadata::MetadataValue::from_static(trellis_core::grpc::REFUSAL_REVOKED),
    );
    Some(status)
}

/// One snapshot a stream sent: its version and its endpoints.
#[derive(Clone, Debug)]
struct Sent {
    version: u64,
    /// The epoch `version` was set in.
    epoch: u64,
    endpoints: HeldEndpoints,
}

/// How many unanswered snapshots a stream remembers. A sidecar answers
/// each snapshot in turn, so more wait only while it is slow to read; past
/// this, the stream forgets what the sidecar holds until it answers one it
/// remembers, and sends every endpoint meanwhile.
const UNANSWERED_KEPT: usize = 8;

/// What the sidecar at the other end of a stream holds, as far as the
/// stream knows: which snapshots it sent and are unanswered, and which one
/// the sidecar last acknowledged, each with its endpoints.
#[derive(Default)]
struct Held {
    /// The sidecar understands `Snapshot.endpoints_version`.
    accepts_reference: bool,
    /// The sidecar understands `Snapshot.endpoint_changes`.
    accepts_changes: bool,
    /// The snapshots sent and not yet answered, oldest first (at most
    /// [`UNANSWERED_KEPT`]). Every answer counts, not only the last
    /// one's: a snapshot sent while another waited for its ACK must not
    /// leave the stream believing the sidecar holds an older one, which a
    /// reference would then name and the sidecar refuse, snapshot after
    /// snapshot.
    unanswered: VecDeque<Sent>,
    /// The last snapshot the sidecar accepted (what it holds when nothing
    /// is unanswered: a refused snapshot leaves the last good one).
    acked: Option<Sent>,
    /// The version of the last snapshot sent (or found held).
    sent: u64,
    /// The newest version whose content for this sidecar is that of the
    /// last snapshot sent: `sent`, or a later one that changed nothing
    /// the sidecar is sent.
    same_as_sent: SnapshotVersion,
}

impl Held {
    /// How the next snapshot, of `view`, carries its endpoints: by
    /// reference to a version the sidecar holds for sure (the last one it
    /// accepted, with nothing in flight) when they are the same, or that
    /// version's with what changed since when that is smaller; else all
    /// of them.
    fn endpoints_for(&self, discovery: &Discovery, view: &View) -> EndpointsIn {
        let (true, true, Some(acked)) = (
            self.accepts_reference,
            self.unanswered.is_empty(),
            &self.acked,
        ) else {
            return EndpointsIn::Full;
        };
        if acked.endpoints.token == view.endpoints_token() {
            return EndpointsIn::Same(acked.version);
        }
        match self.accepts_changes {
            true => discovery
                .endpoint_changes(&acked.endpoints, view)
                .map_or(EndpointsIn::Full, |part| {
                    EndpointsIn::Changes(acked.version, part)
                }),
            false => EndpointsIn::Full,
        }
    }

    /// The epoch of `version`, sent and not yet answered (0 when it is not
    /// among those remembered).
    fn epoch_of_unanswered(&self, version: u64) -> u64 {
        self.unanswered
            .iter()
            .find(|s| s.version == version)
            .map_or(0, |s| s.epoch)
    }

    /// Takes the sidecar's answer for `version`; returns whether it was the
    /// answer to the last snapshot sent.
    fn answered(&mut self, version: u64, accepted: bool) -> bool {
        let Some(at) = self.unanswered.iter().position(|s| s.version == version) else {
            return false;
        };
        // Answers come in the order the snapshots went out.
        let answered = self.unanswered.drain(..=at).next_back();
        if accepted {
            self.acked = answered;
        }
        self.unanswered.is_empty()
    }

    /// Remembers `sent`, unanswered.
    fn remember(&mut self, sent: Sent) {
        if self.unanswered.len() == UNANSWERED_KEPT {
            // Its answer would go unseen: what the sidecar holds is
            // unknown until it answers one of those remembered.
            self.unanswered.pop_front();
            self.acked = None;
        }
        self.unanswered.push_back(sent);
    }

    /// Whether the sidecar holds the last snapshot sent: answered, and
    /// accepted.
    fn holds_last_sent(&self) -> bool {
        self.unanswered.is_empty() && self.acked.as_ref().is_some_and(|s| s.version == self.sent)
    }
}

/// Runs one Watch stream until it ends; returns why it ended.
async fn serve_stream(
    mesh: &Mesh,
    stream: &StreamGuard,
    id: &SpiffeId,
    issued_at: Option<i64>,
    subscribe: &Subscribe,
    mut inbound: Streaming<WatchRequest>,
    tx: Sender,
) -> &'static str {
    // What the sidecar holds: a version names its content only with the
    // epoch it was set in (a restored database counts through its versions
    // again, in another epoch).
    let last_version = subscribe.last_version;
    let last_epoch = subscribe.last_version_epoch;
    let mut sidecar = Held {
        accepts_reference: subscribe.accepts_endpoints_version,
        accepts_changes: subscribe.accepts_endpoints_version && subscribe.accepts_endpoint_changes,
        ..Held::default()
    };
    let mut versions = mesh.discovery.subscribe();
    let mut shutdown = mesh.shutdown.clone();
    versions.borrow_and_update();
    // What the stream last sent (or found the sidecar holding), by content.
    let mut last_sent: Option<ContentKey> = None;
    // When to rebuild: now for the first snapshot, then on an announcement
    // at once or, within a window of the last rebuild, at its end (so a
    // burst reaches the sidecar together).
    let mut due = Some(Instant::now());
    let mut rebuilt: Option<Instant> = None;
    // The revocations the stream's certificate was last checked against.
    let mut revocations_checked: Option<u64> = None;
    loop {
        tokio::select! {
            changed = versions.changed() => {
                if changed.is_err() {
                    return "control plane stopping";
                }
                due.get_or_insert_with(|| {
                    let now = Instant::now();
                    rebuilt.map_or(now, |at| (at + COALESCE_WINDOW).max(now))
                });
            }
            () = sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                due = None;
                rebuilt = Some(Instant::now());
                versions.borrow_and_update();
                // One shared view per version; only the key is per stream,
                // and the snapshot is built only when it is sent.
                let view = mesh.discovery.view();
                if revocations_checked != Some(view.revocations_token()) {
                    revocations_checked = Some(view.revocations_token());
                    if let Some(refused) = refused_as_revoked(&view, id, issued_at) {
                        drop(view);
                        tracing::warn!(spiffe_id = %id, detail = refused.message(), "ending a discovery stream: the certificate is revoked");
                        tokio::select! {
                            _ = tx.send(Err(refused)) => {}
                            () = tokio::time::sleep(REVOKED_SEND_PATIENCE) => {}
                            _ = crate::run::stopping(&mut shutdown) => {}
                        }
                        return "certificate revoked";
                    }
                }
                let key = view.content_key(id);
                let first = last_sent.is_none();
                if last_sent.as_ref() == Some(&key) {
                    // Nothing this sidecar is sent changed: what it holds
                    // (or will, once it accepts it) is this version's too.
                    sidecar.same_as_sent = view.snapshot_version();
                    if sidecar.holds_last_sent() {
                        stream.holds(sidecar.same_as_sent);
                    }
                    continue;
                }
                // A reconnecting sidecar that holds the current version (that
                // version set in the same epoch) needs nothing until the next
                // change.
                let held = first
                    && last_version != 0
                    && (last_version, last_epoch) == (view.version, view.epoch);
                last_sent = Some(key);
                sidecar.sent = view.version;
                let current = view.snapshot_version();
                sidecar.same_as_sent = current;
                if held {
                    // It acknowledged this version before (perhaps to an
                    // earlier run of the control plane).
                    stream.ack(current, Some(current), kept_warnings(&subscribe.warnings));
                    sidecar.acked = Some(Sent {
                        version: last_version,
                        epoch: last_epoch,
                        endpoints: view.held_endpoints(),
                    });
                    continue;
                }
                // Endpoints the sidecar holds are not sent again: with every
                // workload an endpoint, they are most of every snapshot.
                let endpoints = sidecar.endpoints_for(&mesh.discovery, &view);
                let snapshot = mesh.discovery.encoded_snapshot_in(&view, id, &endpoints);
                mesh.metrics.snapshot_sent(&endpoints, snapshot.encoded_len());
                sidecar.remember(Sent {
                    version: view.version,
                    epoch: view.epoch,
                    endpoints: view.held_endpoints(),
                });
                drop(view);
                // A sidecar that stopped reading holds this send until
                // its connection fails: a shutdown must not wait for it.
                tokio::select! {
                    sent = tx.send(Ok(snapshot)) => if sent.is_err() {
                        return "sidecar went away";
                    },
                    _ = crate::run::stopping(&mut shutdown) => return "control plane shutting down",
                }
            }
            message = inbound.message() => match message {
                Ok(Some(WatchRequest { kind: Some(Kind::Ack(ack)) })) => {
                    // An answer to the last snapshot sent: the sidecar now
                    // holds every version since with the same content.
                    let acked = SnapshotVersion {
                        version: ack.version,
                        epoch: sidecar.epoch_of_unanswered(ack.version),
                    };
                    let holds = sidecar
                        .answered(ack.version, true)
                        .then_some(sidecar.same_as_sent);
                    stream.ack(acked, holds, kept_warnings(&ack.warnings));
                }
                Ok(Some(WatchRequest { kind: Some(Kind::Nack(nack)) })) => {
                    sidecar.answered(nack.version, false);
                    tracing::warn!(spiffe_id = %id, version = nack.version, reason = %quoted_up_to(&nack.reason, LOGGED_CHARS), "sidecar refused a snapshot");
                    // The status keeps what the log line shows, unquoted.
                    stream.nack(&shown_up_to(&nack.reason, LOGGED_CHARS));
                }
                Ok(Some(_)) => {
                    let _ = tx.send(Err(Status::invalid_argument(
                        "after the Subscribe, only Ack and Nack messages are accepted",
                    ))).await;
                    return "protocol error";
                }
                Ok(None) => return "sidecar closed the stream",
                Err(status) if status.code() == Code::OutOfRange => {
                    let refusal = super::request_too_large("Watch", MAX_WATCH_REQUEST_BYTES);
                    let _ = tx.send(Err(refusal)).await;
                    return "request too large";
                }
                // Only the stream's decoder says INVALID_ARGUMENT: the
                // failures of the connection carry other codes.
                Err(status) if status.code() == Code::InvalidArgument => {
                    tracing::warn!(spiffe_id = %id, error = %status.message(), "ending a discovery stream: a message after the Subscribe could not be decoded");
                    let _ = tx.send(Err(status)).await;
                    return "undecodable message";
                }
                // Bytes tonic's decoder could not read as a message, as
                // opposed to a connection that failed: nobody is left to
                // tell of the latter.
                Err(status) if super::unreadable_request(&status) => {
                    tracing::warn!(spiffe_id = %id, error = %shown_up_to(status.message(), DECODE_REASON_CHARS), "ending a discovery stream: a message after the Subscribe could not be read");
                    let _ = tx.send(Err(super::unreadable("a Watch message after the Subscribe", &status))).await;
                    return "unreadable message";
                }
                Err(_) => return "stream broken",
            },
            _ = crate::run::stopping(&mut shutdown) => {
                // Told when there is room; a sidecar that stopped reading
                // sees its stream end without it.
                let _ = tx.try_send(Err(Status::unavailable("control plane shutting down")));
                return "control plane shutting down";
            }
        }
    }
}

/// At most this many characters of the decoder's reason are kept in the
/// refusal of a request or stream message that could not be decoded.
pub(super) const DECODE_REASON_CHARS: usize = 256;

/// Decodes the messages of a Watch's request stream, as tonic's own
/// decoder does, except that a message that is not a [`WatchRequest`]
/// ends the stream with INVALID_ARGUMENT naming which message it was and
/// why, rather than INTERNAL (tonic's word for bytes that do not decode,
/// as if the control plane had failed).
#[derive(Debug, Default)]
pub(super) struct WatchRequestDecoder {
    /// Whether the first message, the Subscribe, was decoded.
    subscribed: bool,
}

impl tonic::codec::Decoder for WatchRequestDecoder {
    type Item = WatchRequest;
    type Error = Status;

    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<WatchRequest>, Status> {
        let which = match self.subscribed {
            false => "the first message of a Watch (its Subscribe)",
            true => "a Watch message after the Subscribe",
        };
        let request = <WatchRequest as prost::Message>::decode(buf).map_err(|e| {
            Status::invalid_argument(format!(
                "{which} could not be decoded: {}",
                shown_up_to(&e.to_string(), DECODE_REASON_CHARS)
            ))
        })?;
        self.subscribed = true;
        Ok(Some(request))
    }
}

/// `pieces` joined with `,` and quoted as [`quoted_up_to`] quotes the
/// joined text, without joining them: only the characters the quote shows
/// are read, so a huge list costs no huge string.
fn quoted_list_up_to(pieces: &[String], max: usize) -> String {
    let total = pieces
        .iter()
        .map(|p| p.len() + 1)
        .sum::<usize>()
        .saturating_sub(1);
    let chars = pieces
        .iter()
        .enumerate()
        .flat_map(|(i, p)| (i > 0).then_some(',').into_iter().chain(p.chars()));
    quoted_chars(chars, total, max)
}

/// The warnings of an ACK as the status keeps them: each bounded as a
/// NACK's reason is, at most [`ACK_WARNINGS_KEPT`] of them.
fn kept_warnings(warnings: &[String]) -> Vec<String> {
    let mut kept: Vec<String> = (warnings.iter())
        .take(ACK_WARNINGS_KEPT)
        .map(|w| shown_up_to(w, LOGGED_CHARS))
        .collect();
    if warnings.len() > ACK_WARNINGS_KEPT {
        kept.push(format!(
            "and {} more warnings",
            warnings.len() - ACK_WARNINGS_KEPT
        ));
    }
    kept
}

/// The start of `raw` that [`quoted_up_to`] shows within `max`, unescaped,
/// followed by `... (N bytes)` when that is not all of it: what is kept of
/// a sidecar's text, so it is bounded as the log line is.
pub(super) fn shown_up_to(raw: &str, max: usize) -> String {
    let mut escaped = 0;
    for (at, c) in raw.char_indices() {
        escaped += c.escape_debug().map(char::len_utf8).sum::<usize>();
        if escaped > max {
            return format!("{}... ({} bytes)", &raw[..at], raw.len());
        }
    }
    raw.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(version: u64) -> Sent {
        Sent {
            version,
            epoch: 1,
            endpoints: HeldEndpoints::default(),
        }
    }

    fn acked(held: &Held) -> Option<u64> {
        held.acked.as_ref().map(|s| s.version)
    }

    #[test]
    fn every_answer_counts_and_too_many_unanswered_forget_what_is_held() {
        let mut held = Held::default();
        held.remember(sent(1));
        assert!(held.answered(1, true), "the answer to the last one sent");
        held.remember(sent(2));
        held.remember(sent(3));
        assert!(!held.answered(2, true));
        assert_eq!(acked(&held), Some(2), "accepted while 3 was on its way");
        assert!(held.answered(3, false));
        assert_eq!(acked(&held), Some(2), "a refusal keeps the last good one");
        assert!(!held.answered(3, true), "answered already");

        let first = 4;
        let last = first + UNANSWERED_KEPT as u64;
        for version in first..=last {
            held.remember(sent(version));
        }
        assert_eq!(held.unanswered.len(), UNANSWERED_KEPT);
        assert_eq!(acked(&held), None, "one answer will go unseen");
        assert!(!held.answered(first, true));
        assert_eq!(acked(&held), None);
        assert!(!held.answered(first + 2, true));
        assert_eq!(acked(&held), Some(first + 2));
        assert!(held.answered(last, true));
        assert_eq!(acked(&held), Some(last));
    }

    #[test]
    fn a_list_is_quoted_as_its_joined_text_is() {
        let few: Vec<String> = vec!["10.0.0.1:15006".into(), "[fd00::1]:15006".into()];
        let many: Vec<String> = (0..100_000).map(|i| format!("10.0.{i}:15006")).collect();
        let odd: Vec<String> = vec!["".into(), "\u{1b}[2J".repeat(200), "é".repeat(400)];
        for list in [&few, &many, &odd] {
            assert_eq!(
                quoted_list_up_to(list, LOGGED_CHARS),
                quoted_up_to(&list.join(","), LOGGED_CHARS)
            );
        }
        assert_eq!(
            quoted_list_up_to(&few, 64),
            "\"10.0.0.1:15006,[fd00::1]:15006\""
        );
        assert!(quoted_list_up_to(&many, LOGGED_CHARS).len() < LOGGED_CHARS + 32);
    }

    #[test]
    fn a_nack_reason_is_kept_as_far_as_the_log_line_shows_it() {
        assert_eq!(
            shown_up_to("policy 3: bad port", LOGGED_CHARS),
            "policy 3: bad port"
        );
        let long = "x".repeat(10_000);
        assert_eq!(
            shown_up_to(&long, LOGGED_CHARS),
            format!("{}... (10000 bytes)", "x".repeat(LOGGED_CHARS))
        );
        for raw in [long, "\u{1b}[31m".repeat(500), "é".repeat(1000)] {
            let kept = shown_up_to(&raw, LOGGED_CHARS);
            let (start, marker) = kept.rsplit_once("... (").unwrap();
            // The same start as the log line, and the same full length.
            assert_eq!(
                quoted_up_to(&raw, LOGGED_CHARS),
                format!("{}... ({marker}", quoted_up_to(start, usize::MAX))
            );
            assert!(kept.len() <= LOGGED_CHARS + 32, "{}", kept.len());
        }
    }
}
