//! The control plane's counters and their Prometheus text rendering.
//!
//! Labels are short, bounded reasons (never SPIFFE IDs, tokens or addresses),
//! so the number of series stays small. This module only counts; it never
//! serves HTTP (that is `admin_http`).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use trellis_core::connections::Refused;
use trellis_core::grpc::CertifyRefusal;
use trellis_core::http1::HEAD_FAULT_REASONS;

use crate::discovery::{EndpointsIn, SyncState};
use crate::handshake::{self, HandshakeFailure};

/// The `reason` values of `trellis_inbound_addresses_refused_total`
/// (see [`Metrics::inbound_address_refused`]).
const INBOUND_ADDRESSES_REFUSED: [&str; 3] = ["unverified", "loopback", "held"];
/// The `reason` values of `trellis_grpc_connections_closed_total`.
const GRPC_CONNECTIONS_CLOSED: [&str; 1] = ["idle"];
/// The `reason` values of `trellis_inject_unknown_values_total`: where the
/// unknown `trellis.io/inject` was.
const INJECT_UNKNOWN_VALUES: [&str; 3] = ["pod_label", "pod_annotation", "namespace_label"];
/// The `reason` values of `trellis_inject_unknown_names_total`: where the
/// name under `trellis.io/` that is not the mesh's was.
const INJECT_UNKNOWN_NAMES: [&str; 2] = ["pod_annotation", "pod_label"];
/// The `reason` values of `trellis_watch_streams_refused_total`: the limit
/// that refused the stream.
const WATCH_STREAM_LIMITS: [&str; 2] = ["per_sidecar", "total"];

/// How a snapshot may carry the mesh endpoints ([`EndpointsIn`]), as the
/// metrics label it.
const SNAPSHOT_ENDPOINTS: [&str; 3] = ["full", "unchanged", "changes"];

#[derive(Debug, Default)]
pub struct Metrics {
    certificates_issued: AtomicU64,
    /// Certify refusals, by [`CertifyRefusal`] (in the order of its
    /// `ALL`).
    certify_failures: ByReason<{ CertifyRefusal::ALL.len() }>,
    /// Admin calls answered, by method and gRPC code.
    admin_calls: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    inbound_addresses_refused: Mutex<BTreeMap<&'static str, u64>>,
    /// Failed handshakes of the gRPC port and of the webhook port, by
    /// [`HandshakeFailure`] (in the order of its `ALL`).
    handshake_failures: ByReason<{ HandshakeFailure::COUNT }>,
    webhook_handshake_failures: ByReason<{ HandshakeFailure::COUNT }>,
    webhook_connections_refused: Mutex<BTreeMap<&'static str, u64>>,
    grpc_connections_refused: Mutex<BTreeMap<&'static str, u64>>,
    grpc_connections_closed: Mutex<BTreeMap<&'static str, u64>>,
    admin_connections_refused: Mutex<BTreeMap<&'static str, u64>>,
    admin_malformed_requests: Mutex<BTreeMap<&'static str, u64>>,
    webhook_malformed_requests: Mutex<BTreeMap<&'static str, u64>>,
    watch_streams_refused: Mutex<BTreeMap<&'static str, u64>>,
    inject_unknown_values: Mutex<BTreeMap<&'static str, u64>>,
    inject_unknown_names: Mutex<BTreeMap<&'static str, u64>>,
    watch_streams: AtomicI64,
    /// Snapshots sent, and their bytes, by how they carried the endpoints
    /// (in the order of [`SNAPSHOT_ENDPOINTS`]): counted without a lock,
    /// as every stream sends.
    snapshots_sent: [(AtomicU64, AtomicU64); 3],
    /// When each root of the published bundle expires (Unix seconds);
    /// empty before the bundle is known.
    trust_bundle_expiries: Mutex<Vec<i64>>,
    /// When the signing CA's chain first expires (Unix seconds; 0 before
    /// it is known).
    signs_until: AtomicI64,
    /// When the webhook's serving certificate expires (Unix seconds; 0
    /// without the webhook).
    webhook_certificate_expiry: AtomicI64,
}

impl Metrics {
    pub fn certificate_issued(&self) {
        self.certificates_issued.fetch_add(1, Ordering::Relaxed);
    }

    pub fn certify_failed(&self, reason: CertifyRefusal) {
        self.certify_failures.count(reason as usize);
    }

    /// An Admin call of `method` answered with the gRPC `code` (`OK` for
    /// one answered with its response).
    pub fn admin_call(&self, method: &'static str, code: &'static str) {
        *self
            .admin_calls
            .lock()
            .expect("not poisoned")
            .entry((method, code))
            .or_default() += 1;
    }

    /// An inbound address a Certify reported that was not recorded, for
    /// `reason`: `unverified` (the Certify did not come from its IP),
    /// `loopback` (a loopback address, from a Certify that did not come
    /// over loopback) or `held` (another live workload holds its IP).
    pub fn inbound_address_refused(&self, reason: &'static str) {
        count(&self.inbound_addresses_refused, reason);
    }

    /// A connection to the gRPC port whose TLS handshake failed, for
    /// `reason` (`other` for one the port does not list).
    pub fn handshake_failed(&self, reason: HandshakeFailure) {
        let reason = handshake::on(reason, handshake::GRPC_PORT);
        self.handshake_failures.count(reason as usize);
    }

    /// A connection to the webhook port whose TLS handshake failed, for
    /// `reason` (`other` for one the port does not list).
    pub fn webhook_handshake_failed(&self, reason: HandshakeFailure) {
        let reason = handshake::on(reason, handshake::WEBHOOK_PORT);
        self.webhook_handshake_failures.count(reason as usize);
    }

    /// A connection to the webhook port closed as it was accepted, by the
    /// limit that refused it (`per_client` or `total`).
    pub fn webhook_connection_refused(&self, reason: &'static str) {
        count(&self.webhook_connections_refused, reason);
    }

    /// A connection to the gRPC port closed as it was accepted, by the
    /// limit that refused it (`per_client` or `total`).
    pub fn grpc_connection_refused(&self, reason: &'static str) {
        count(&self.grpc_connections_refused, reason);
    }

    /// A served connection of the gRPC port closed by the control plane,
    /// for `reason` (`idle`: no request in flight for
    /// `--grpc-idle-timeout`).
    pub fn grpc_connection_closed(&self, reason: &'static str) {
        count(&self.grpc_connections_closed, reason);
    }

    /// A connection to the admin port closed as it was accepted, by the
    /// limit that refused it (`per_client` or `total`).
    pub fn admin_connection_refused(&self, reason: &'static str) {
        count(&self.admin_connections_refused, reason);
    }

    /// A request head the admin port refused, by its kind (`malformed`,
    /// `head_too_large` or `target_too_long`).
    pub fn admin_malformed_request(&self, reason: &'static str) {
        count(&self.admin_malformed_requests, reason);
    }

    /// A request head the webhook port refused, by its kind, as
    /// [`Self::admin_malformed_request`].
    pub fn webhook_malformed_request(&self, reason: &'static str) {
        count(&self.webhook_malformed_requests, reason);
    }

    /// A pod reviewed by the webhooks whose `trellis.io/inject` (label or
    /// annotation, of the pod or of its namespace: the reason) is neither
    /// `enabled` nor `disabled`; the pod was denied, or its author warned.
    pub fn inject_unknown_value(&self, reason: &'static str) {
        count(&self.inject_unknown_values, reason);
    }

    /// A pod `/inject` injected with annotations (or labels: the reason)
    /// under `trellis.io/` that are not the mesh's, once however many;
    /// its author was warned of them.
    pub fn inject_unknown_name(&self, reason: &'static str) {
        count(&self.inject_unknown_names, reason);
    }

    /// A Discovery.Watch stream refused as it opened, by the limit that
    /// refused it (`per_sidecar` or `total`).
    pub fn watch_stream_refused(&self, reason: &'static str) {
        count(&self.watch_streams_refused, reason);
    }

    pub fn watch_stream_opened(&self) {
        self.watch_streams.fetch_add(1, Ordering::Relaxed);
    }

    pub fn watch_stream_closed(&self) {
        self.watch_streams.fetch_sub(1, Ordering::Relaxed);
    }

    /// A snapshot of `bytes` sent on a Watch stream, its endpoints carried
    /// as `endpoints` says.
    pub fn snapshot_sent(&self, endpoints: &EndpointsIn, bytes: usize) {
        let at = match endpoints {
            EndpointsIn::Full => 0,
            EndpointsIn::Same(_) => 1,
            EndpointsIn::Changes(..) => 2,
        };
        let (count, total) = &self.snapshots_sent[at];
        count.fetch_add(1, Ordering::Relaxed);
        total.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// The trust bundle published: when each of its roots expires (Unix
    /// seconds).
    pub fn trust_bundle(&self, expiries: Vec<i64>) {
        *self.trust_bundle_expiries.lock().expect("not poisoned") = expiries;
    }

    /// When the first certificate from the signing CA up to its root
    /// expires (Unix seconds).
    pub fn signing_chain(&self, signs_until: i64) {
        self.signs_until.store(signs_until, Ordering::Relaxed);
    }

    /// The webhook's serving certificate loaded: its notAfter (Unix
    /// seconds).
    pub fn webhook_certificate(&self, not_after: i64) {
        self.webhook_certificate_expiry
            .store(not_after, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        self.render_at(crate::unix_now())
    }

    /// [`Self::render`] at `now` (Unix seconds), which decides the roots
    /// that have expired.
    fn render_at(&self, now: i64) -> String {
        let mut out = String::new();
        let connection_limits = [
            Refused::FromClient { limit: 0 }.reason(),
            Refused::Total { limit: 0 }.reason(),
        ];
        let _ = writeln!(
            out,
            "# HELP trellis_certificates_issued_total X.509-SVIDs signed for workloads.\n\
             # TYPE trellis_certificates_issued_total counter\n\
             trellis_certificates_issued_total {}",
            self.certificates_issued.load(Ordering::Relaxed)
        );
        render_listed(
            &mut out,
            "trellis_certify_failures_total",
            "Certify calls refused, by reason.",
            CertifyRefusal::ALL
                .iter()
                .map(|reason| (reason.token(), self.certify_failures.get(*reason as usize))),
        );
        let _ = writeln!(
            out,
            "# HELP trellis_admin_calls_total Admin API calls answered, by method and gRPC code \
             (OK: answered with its response; any other: refused, and logged).\n\
             # TYPE trellis_admin_calls_total counter"
        );
        for ((method, code), count) in self.admin_calls.lock().expect("not poisoned").iter() {
            let _ = writeln!(
                out,
                "trellis_admin_calls_total{{method=\"{method}\",code=\"{code}\"}} {count}"
            );
        }
        render_family(
            &mut out,
            "trellis_inbound_addresses_refused_total",
            &INBOUND_ADDRESSES_REFUSED,
            "Inbound addresses reported by a Certify that were not recorded as mesh endpoints \
             (the certificate was still issued), by reason.",
            &self.inbound_addresses_refused.lock().expect("not poisoned"),
        );
        render_listed(
            &mut out,
            "trellis_tls_handshake_failures_total",
            "TLS handshakes on the gRPC port that failed, by reason.",
            handshake::GRPC_PORT.iter().map(|reason| {
                (
                    reason.token(),
                    self.handshake_failures.get(*reason as usize),
                )
            }),
        );
        // A metric of its own, not a label on the gRPC port's: its callers
        // are the API server and whatever reaches a pod's port, not
        // sidecars, so an alert on sidecars failing their handshakes must
        // not fire for a scanner of the webhook, nor its series change.
        render_listed(
            &mut out,
            "trellis_webhook_tls_handshake_failures_total",
            "TLS handshakes on the admission webhook port that failed, by reason (the gRPC \
             port's are trellis_tls_handshake_failures_total).",
            handshake::WEBHOOK_PORT.iter().map(|reason| {
                let count = self.webhook_handshake_failures.get(*reason as usize);
                (reason.token(), count)
            }),
        );
        render_family(
            &mut out,
            "trellis_webhook_connections_refused_total",
            &connection_limits,
            "Connections to the admission webhook port closed as they were accepted, by the \
             limit that refused them: per_client (as many open from the client's address as one \
             may hold) or total (every slot taken, none from an address holding more).",
            &self
                .webhook_connections_refused
                .lock()
                .expect("not poisoned"),
        );
        render_family(
            &mut out,
            "trellis_grpc_connections_refused_total",
            &connection_limits,
            "Connections to the gRPC port closed as they were accepted, before their TLS \
             handshake, by the limit that refused them: per_client (as many open from the \
             client's address as one may hold) or total (every slot taken, none from an address \
             holding more).",
            &self.grpc_connections_refused.lock().expect("not poisoned"),
        );
        render_family(
            &mut out,
            "trellis_grpc_connections_closed_total",
            &GRPC_CONNECTIONS_CLOSED,
            "Served connections of the gRPC port the control plane closed, gracefully, by \
             reason: idle (no request in flight for --grpc-idle-timeout).",
            &self.grpc_connections_closed.lock().expect("not poisoned"),
        );
        render_family(
            &mut out,
            "trellis_inject_unknown_values_total",
            &INJECT_UNKNOWN_VALUES,
            "Pods the admission webhooks denied, or warned, because their trellis.io/inject is \
             neither enabled nor disabled, by where: pod_label, pod_annotation or \
             namespace_label.",
            &self.inject_unknown_values.lock().expect("not poisoned"),
        );
        render_family(
            &mut out,
            "trellis_inject_unknown_names_total",
            &INJECT_UNKNOWN_NAMES,
            "Pods the injecting webhook injected with a name under trellis.io/ that is not a \
             Trellis one (a typo: ignored, and warned of), by where: pod_annotation or pod_label.",
            &self.inject_unknown_names.lock().expect("not poisoned"),
        );
        render_family(
            &mut out,
            "trellis_admin_connections_refused_total",
            &connection_limits,
            "Connections to the admin port (/live, /ready, /metrics) closed as they were \
             accepted, by the limit that refused them: per_client (as many open from the \
             client's address as one may hold) or total (every slot taken, none from an address \
             holding more).",
            &self.admin_connections_refused.lock().expect("not poisoned"),
        );
        render_family(
            &mut out,
            "trellis_admin_malformed_requests_total",
            &HEAD_FAULT_REASONS,
            "Request heads the admin port (/live, /ready, /metrics) refused, by kind: malformed \
             (400: does not parse, an invalid method or target), head_too_large (431: over 408 \
             KiB or 100 header fields) or target_too_long (414: over 65534 bytes).",
            &self.admin_malformed_requests.lock().expect("not poisoned"),
        );
        render_family(
            &mut out,
            "trellis_webhook_malformed_requests_total",
            &HEAD_FAULT_REASONS,
            "Request heads the admission webhook port refused, by kind: malformed (400: does \
             not parse, an invalid method or target), head_too_large (431: over 408 KiB or 100 \
             header fields) or target_too_long (414: over 65534 bytes).",
            &self
                .webhook_malformed_requests
                .lock()
                .expect("not poisoned"),
        );
        render_family(
            &mut out,
            "trellis_watch_streams_refused_total",
            &WATCH_STREAM_LIMITS,
            "Discovery.Watch streams refused as they opened, by the limit that refused them: \
             per_sidecar (as many open from the identity and address as one sidecar may hold) \
             or total (as many open as the replica holds).",
            &self.watch_streams_refused.lock().expect("not poisoned"),
        );
        let _ = writeln!(
            out,
            "# HELP trellis_watch_streams Discovery.Watch streams connected now.\n\
             # TYPE trellis_watch_streams gauge\n\
             trellis_watch_streams {}",
            self.watch_streams.load(Ordering::Relaxed)
        );
        let sent: Vec<_> = SNAPSHOT_ENDPOINTS
            .iter()
            .zip(&self.snapshots_sent)
            .map(|(endpoints, (count, bytes))| {
                let count = count.load(Ordering::Relaxed);
                (endpoints, (count, bytes.load(Ordering::Relaxed)))
            })
            .collect();
        let _ = writeln!(
            out,
            "# HELP trellis_snapshots_sent_total Snapshots sent on Discovery.Watch streams, by how \
             they carried the mesh endpoints: all of them (full), none because the sidecar held \
             them (unchanged), or what changed since a snapshot it held (changes).\n\
             # TYPE trellis_snapshots_sent_total counter"
        );
        for (endpoints, (count, _)) in &sent {
            let _ = writeln!(
                out,
                "trellis_snapshots_sent_total{{endpoints=\"{endpoints}\"}} {count}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP trellis_snapshot_bytes_sent_total Bytes of the snapshots of \
             trellis_snapshots_sent_total (their protobuf encoding).\n\
             # TYPE trellis_snapshot_bytes_sent_total counter"
        );
        for (endpoints, (_, bytes)) in &sent {
            let _ = writeln!(
                out,
                "trellis_snapshot_bytes_sent_total{{endpoints=\"{endpoints}\"}} {bytes}"
            );
        }
        let signs_until = self.signs_until.load(Ordering::Relaxed);
        if signs_until != 0 {
            let _ = writeln!(
                out,
                "# HELP trellis_ca_signing_expiry_timestamp_seconds When the first certificate \
                 from the signing CA up to its root expires (Unix seconds): no certificate is \
                 issued past it, nor after it.\n\
                 # TYPE trellis_ca_signing_expiry_timestamp_seconds gauge\n\
                 trellis_ca_signing_expiry_timestamp_seconds {signs_until}"
            );
        }
        let webhook_expiry = self.webhook_certificate_expiry.load(Ordering::Relaxed);
        if webhook_expiry != 0 {
            let _ = writeln!(
                out,
                "# HELP trellis_webhook_certificate_expiry_timestamp_seconds When the admission \
                 webhook port's serving certificate expires (Unix seconds): every admission call \
                 fails past it. Follows the mounted files within 10 s of a renewal.\n\
                 # TYPE trellis_webhook_certificate_expiry_timestamp_seconds gauge\n\
                 trellis_webhook_certificate_expiry_timestamp_seconds {webhook_expiry}"
            );
        }
        let expiries = self
            .trust_bundle_expiries
            .lock()
            .expect("not poisoned")
            .clone();
        let _ = writeln!(
            out,
            "# HELP trellis_trust_bundle_roots Roots in the trust bundle published to sidecars.\n\
             # TYPE trellis_trust_bundle_roots gauge\n\
             trellis_trust_bundle_roots {}",
            expiries.len()
        );
        if expiries.is_empty() {
            return out;
        }
        let _ = writeln!(
            out,
            "# HELP trellis_trust_bundle_expired_roots Roots of the published trust bundle that \
             have expired: they anchor nothing, and stay published until the control plane \
             restarts without them.\n\
             # TYPE trellis_trust_bundle_expired_roots gauge\n\
             trellis_trust_bundle_expired_roots {}",
            expiries.iter().filter(|at| **at <= now).count()
        );
        if let Some(expiry) = expiries.iter().filter(|at| **at > now).min() {
            let _ = writeln!(
                out,
                "# HELP trellis_trust_bundle_expiry_timestamp_seconds When the first root of the \
                 published trust bundle that has not expired yet expires (Unix seconds): the \
                 chains it anchors stop verifying then.\n\
                 # TYPE trellis_trust_bundle_expiry_timestamp_seconds gauge\n\
                 trellis_trust_bundle_expiry_timestamp_seconds {expiry}"
            );
        }
        out
    }
}

/// The Prometheus text of the sidecars' sync with the version served:
/// how many identities with an open Watch stream stand in each state
/// ([`Discovery::sync_counts`](crate::discovery::Discovery::sync_counts)).
pub fn render_sidecar_sync(out: &mut String, counts: &[(SyncState, u64)]) {
    let _ = writeln!(
        out,
        "# HELP trellis_sidecar_snapshots SPIFFE IDs with an open Discovery.Watch stream, by \
         whether their sidecar holds the snapshot served now (synced), has it on the way or \
         unanswered (pending), or refused it (refused).\n\
         # TYPE trellis_sidecar_snapshots gauge"
    );
    for (state, count) in counts {
        let _ = writeln!(
            out,
            "trellis_sidecar_snapshots{{state=\"{}\"}} {count}",
            state.label()
        );
    }
}

/// The Prometheus text of the Kubernetes store's watches: per kind, 1
/// while its watch is failing (an error since it last delivered an event
/// or a complete list: the kind is served as last seen), else 0.
pub fn render_store_watches(out: &mut String, failing: &[(&str, bool)]) {
    let _ = writeln!(
        out,
        "# HELP trellis_store_watch_failing Whether the Kubernetes store's watch of a kind is \
         failing (1): an error since it last delivered an event or a complete list, so the kind \
         is served as last seen. Past --watch-failure-grace (60 s) for a policy kind, /ready answers \
         503 when a peer replica answers as healthy.\n\
         # TYPE trellis_store_watch_failing gauge"
    );
    for (kind, failing) in failing {
        let _ = writeln!(
            out,
            "trellis_store_watch_failing{{kind=\"{kind}\"}} {}",
            u8::from(*failing)
        );
    }
}

/// The Kubernetes store's gauge of whether this replica stays ready while
/// the policies it serves may be stale (see [`crate::readiness`]).
pub fn render_store_serving_stale(out: &mut String, stale: bool) {
    let _ = writeln!(
        out,
        "# HELP trellis_store_serving_stale_policies Whether this replica serves policies that \
         may be stale (1): the watch of a policy kind has been failing past its grace and no peer \
         replica answers as healthy, so it stays ready with the policies it last saw. 1 on every \
         replica: none reaches the API server.\n\
         # TYPE trellis_store_serving_stale_policies gauge\n\
         trellis_store_serving_stale_policies {}",
        u8::from(stale)
    );
}

/// The counts of a family whose reasons are all listed in advance, by
/// their place in the list: counted without a lock.
#[derive(Debug)]
struct ByReason<const N: usize>([AtomicU64; N]);

impl<const N: usize> Default for ByReason<N> {
    fn default() -> Self {
        Self(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl<const N: usize> ByReason<N> {
    fn count(&self, at: usize) {
        self.0[at].fetch_add(1, Ordering::Relaxed);
    }

    fn get(&self, at: usize) -> u64 {
        self.0[at].load(Ordering::Relaxed)
    }
}

/// Renders the counter family `name` whose reasons are all listed in
/// advance: each of `counts` (reason and count), 0 before its first.
fn render_listed<'a>(
    out: &mut String,
    name: &str,
    help: &str,
    counts: impl Iterator<Item = (&'a str, u64)>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (reason, count) in counts {
        let _ = writeln!(out, "{name}{{reason=\"{reason}\"}} {count}");
    }
}

/// Adds one to `reason`'s count in a family counted by reason.
fn count(family: &Mutex<BTreeMap<&'static str, u64>>, reason: &'static str) {
    *family
        .lock()
        .expect("not poisoned")
        .entry(reason)
        .or_default() += 1;
}

/// Renders the counter family `name`, by reason: each of `reasons` (those
/// known in advance) at its count, 0 before its first, then any other
/// counted.
fn render_family(
    out: &mut String,
    name: &str,
    reasons: &[&'static str],
    help: &str,
    values: &BTreeMap<&'static str, u64>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    let mut all: BTreeMap<&str, u64> = reasons.iter().map(|reason| (*reason, 0)).collect();
    all.extend(values.iter().map(|(reason, count)| (*reason, *count)));
    for (reason, count) in all {
        let _ = writeln!(out, "{name}{{reason=\"{reason}\"}} {count}");
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// A fresh control plane's scrape has each series of a family whose
    /// reasons are known in advance at 0, and a reason counted beside them.
    #[test]
    fn known_reasons_are_rendered_at_zero_before_a_count() {
        let m = Metrics::default();
        let text = m.render();
        for series in [
            "trellis_grpc_connections_refused_total{reason=\"per_client\"} 0\n",
            "trellis_grpc_connections_refused_total{reason=\"total\"} 0\n",
            "trellis_webhook_connections_refused_total{reason=\"total\"} 0\n",
            "trellis_admin_connections_refused_total{reason=\"per_client\"} 0\n",
            "trellis_grpc_connections_closed_total{reason=\"idle\"} 0\n",
            "trellis_admin_malformed_requests_total{reason=\"head_too_large\"} 0\n",
            "trellis_webhook_malformed_requests_total{reason=\"target_too_long\"} 0\n",
            "trellis_inject_unknown_values_total{reason=\"namespace_label\"} 0\n",
            "trellis_inject_unknown_names_total{reason=\"pod_label\"} 0\n",
            "trellis_watch_streams_refused_total{reason=\"per_sidecar\"} 0\n",
            "trellis_inbound_addresses_refused_total{reason=\"held\"} 0\n",
        ] {
            assert!(text.contains(series), "{series} missing from\n{text}");
        }
        m.watch_stream_refused("total");
        m.watch_stream_refused("other");
        let text = m.render();
        assert!(
            text.contains(
                "trellis_watch_streams_refused_total{reason=\"other\"} 1\n\
                 trellis_watch_streams_refused_total{reason=\"per_sidecar\"} 0\n\
                 trellis_watch_streams_refused_total{reason=\"total\"} 1\n"
            ),
            "{text}"
        );
    }

    /// The `reason` values the README's paragraph on the control plane's
    /// metrics gives `family`: each word in backticks (lower case and
    /// underscores) within the parentheses after its name.
    fn readme_reasons(readme: &str, family: &str) -> BTreeSet<String> {
        let start = format!("`{family}{{reason}}` (");
        let (_, after) = readme
            .split_once(&start)
            .unwrap_or_else(|| panic!("{start} is not in the README"));
        let mut depth = 0;
        let end = after
            .char_indices()
            .find(|(_, c)| {
                match c {
                    '(' => depth += 1,
                    ')' if depth == 0 => return true,
                    ')' => depth -= 1,
                    _ => {}
                }
                false
            })
            .map_or(after.len(), |(at, _)| at);
        after[..end]
            .split('`')
            .skip(1)
            .step_by(2)
            .filter(|word| {
                !word.is_empty() && word.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
            })
            .map(str::to_owned)
            .collect()
    }

    /// The README lists every reason of each family whose reasons are all
    /// known in advance, and no other: a reason added to the code and not
    /// to the README fails, as does one left in the README.
    #[test]
    fn the_readme_lists_every_refusal_and_handshake_reason() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
            .expect("the README reads");
        let listed = |labels: &mut dyn Iterator<Item = &'static str>| -> BTreeSet<String> {
            labels.map(str::to_owned).collect()
        };
        for (family, in_code) in [
            (
                "trellis_certify_failures_total",
                listed(&mut CertifyRefusal::ALL.iter().map(|r| r.token())),
            ),
            (
                "trellis_tls_handshake_failures_total",
                listed(&mut handshake::GRPC_PORT.iter().map(|f| f.token())),
            ),
            (
                "trellis_webhook_tls_handshake_failures_total",
                listed(&mut handshake::WEBHOOK_PORT.iter().map(|f| f.token())),
            ),
        ] {
            let in_readme = readme_reasons(&readme, family);
            let missing: Vec<_> = in_code.difference(&in_readme).collect();
            assert!(
                missing.is_empty(),
                "{family}: not in the README: {missing:?}"
            );
            let stale: Vec<_> = in_readme.difference(&in_code).collect();
            assert!(
                stale.is_empty(),
                "{family}: in the README, not in the code: {stale:?}"
            );
        }
    }

    /// Every listed reason of the certify and handshake families is a
    /// series at 0 before anything is counted, and a count moves only its
    /// own series.
    #[test]
    fn every_listed_refusal_and_handshake_reason_is_rendered_at_zero() {
        let m = Metrics::default();
        let text = m.render();
        let series = |family: &str, reason: &str| format!("{family}{{reason=\"{reason}\"}}");
        for refusal in CertifyRefusal::ALL {
            let zero = format!(
                "{} 0\n",
                series("trellis_certify_failures_total", refusal.token())
            );
            assert!(text.contains(&zero), "{zero} missing from\n{text}");
        }
        for failure in handshake::GRPC_PORT {
            let zero = format!(
                "{} 0\n",
                series("trellis_tls_handshake_failures_total", failure.token())
            );
            assert!(text.contains(&zero), "{zero} missing from\n{text}");
        }
        for failure in handshake::WEBHOOK_PORT {
            let family = "trellis_webhook_tls_handshake_failures_total";
            let zero = format!("{} 0\n", series(family, failure.token()));
            assert!(text.contains(&zero), "{zero} missing from\n{text}");
        }
        // A reason a port does not list is counted as `other`.
        m.webhook_handshake_failed(HandshakeFailure::UnknownIssuer);
        m.handshake_failed(HandshakeFailure::NotTls);
        m.certify_failed(CertifyRefusal::CsrSan);
        let text = m.render();
        for counted in [
            "trellis_webhook_tls_handshake_failures_total{reason=\"other\"} 1\n",
            "trellis_tls_handshake_failures_total{reason=\"not_tls\"} 1\n",
            "trellis_tls_handshake_failures_total{reason=\"other\"} 0\n",
            "trellis_certify_failures_total{reason=\"csr_san\"} 1\n",
            "trellis_certify_failures_total{reason=\"csr_malformed\"} 0\n",
        ] {
            assert!(text.contains(counted), "{counted} missing from\n{text}");
        }
        assert!(
            !text.contains(
                "trellis_webhook_tls_handshake_failures_total{reason=\"unknown_issuer\"}"
            ),
            "{text}"
        );
    }

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.certificate_issued();
        m.certify_failed(CertifyRefusal::TokenUsed);
        m.certify_failed(CertifyRefusal::TokenUsed);
        m.watch_stream_opened();
        m.admin_call("ApplyPolicy", "InvalidArgument");
        m.admin_call("ApplyPolicy", "InvalidArgument");
        m.admin_call("ApplyPolicy", "OK");
        let text = m.render();
        assert!(text.contains(
            "trellis_admin_calls_total{method=\"ApplyPolicy\",code=\"InvalidArgument\"} 2\n\
             trellis_admin_calls_total{method=\"ApplyPolicy\",code=\"OK\"} 1\n"
        ));
        assert!(
            text.contains("trellis_certificates_issued_total 1\n"),
            "{text}"
        );
        assert!(text.contains("trellis_certify_failures_total{reason=\"token_used\"} 2\n"));
        assert!(text.contains("trellis_watch_streams 1\n"));
        assert!(
            !text.contains("trellis_trust_bundle_expiry_timestamp_seconds"),
            "no expiry before the bundle is known: {text}"
        );
        m.trust_bundle(vec![1_900_000_000, 2_000_000_000]);
        let text = m.render_at(1_800_000_000);
        assert!(text.contains("trellis_trust_bundle_roots 2\n"), "{text}");
        assert!(
            text.contains("trellis_trust_bundle_expired_roots 0\n"),
            "{text}"
        );
        assert!(text.contains("trellis_trust_bundle_expiry_timestamp_seconds 1900000000\n"));
        // Once the first has expired, the gauge moves on to the next, so
        // an alert on it stops firing once the rotation is done.
        let text = m.render_at(1_900_000_000);
        assert!(
            text.contains("trellis_trust_bundle_expired_roots 1\n"),
            "{text}"
        );
        assert!(text.contains("trellis_trust_bundle_expiry_timestamp_seconds 2000000000\n"));
        let text = m.render_at(2_000_000_000);
        assert!(
            text.contains("trellis_trust_bundle_expired_roots 2\n"),
            "{text}"
        );
        assert!(
            !text.contains("trellis_trust_bundle_expiry_timestamp_seconds"),
            "{text}"
        );
    }
}
