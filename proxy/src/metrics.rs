//! The sidecar's Prometheus metrics, registered once and shared by every
//! listener through an `Arc`.
//!
//! Labels are static strings, so recording a metric never allocates. This
//! module owns metric names; it must never take a lock on the data path
//! beyond the registry's own per-family map.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use trellis_core::connections::Refused;

use crate::identity::RenewalFailure;
use crate::inbound::H2Refused;
use crate::net::ConnectFailure;
pub use crate::tls::{HandshakeFailure, INBOUND_REASONS, OUTBOUND_REASONS};

type Labels1 = [(&'static str, &'static str); 1];
type Labels2 = [(&'static str, &'static str); 2];
type Labels3 = [(&'static str, &'static str); 3];
/// `outcome` alone when a Certify call succeeded, with a `reason` when it
/// failed (one of [`RenewalFailure::ALL`]).
type RenewalLabels = Vec<(&'static str, &'static str)>;
/// `action` (static) and `policy` (a policy's `namespace/name` or
/// `default:<mode>`: bounded by the policies selecting this workload).
type DecisionLabels = (Labels1, [(&'static str, Arc<str>); 1]);

/// Connection direction label values.
pub const INBOUND: &str = "inbound";
pub const OUTBOUND: &str = "outbound";

/// The directions a label value of a per-direction family can be counted
/// in; its series are made at 0 in those alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Directions {
    Both,
    Inbound,
    Outbound,
}

impl Directions {
    /// Whether `direction` ([`INBOUND`] or [`OUTBOUND`]) is one of them.
    pub fn include(self, direction: &str) -> bool {
        match self {
            Directions::Both => direction == INBOUND || direction == OUTBOUND,
            Directions::Inbound => direction == INBOUND,
            Directions::Outbound => direction == OUTBOUND,
        }
    }
}

/// Declares the bounded label values of a per-direction family as an enum
/// ([`trellis_core::tokens!`]), each variant with its label token and the
/// [`Directions`] it is counted in: the one list both the code that names a
/// value and the metrics that make its series at 0 read (`ALL`, in order;
/// `COUNT`).
macro_rules! label_values {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = ($label:literal, $directions:ident), )+
        }
    ) => {
        trellis_core::tokens! {
            $(#[$meta])*
            pub enum $name {
                $( $(#[$vmeta])* $variant = $label, )+
            }
        }

        impl $name {
            /// The directions it can be counted in.
            pub const fn directions(self) -> $crate::metrics::Directions {
                match self {
                    $( $name::$variant => $crate::metrics::Directions::$directions, )+
                }
            }
        }
    };
}

/// Series touched by every connection, resolved once so the data path only
/// does atomic adds (the family map takes a lock).
struct Hot {
    open: Gauge,
    bytes: Counter,
}

impl Hot {
    fn new(
        direction: &'static str,
        open: &Family<Labels1, Gauge>,
        bytes: &Family<Labels1, Counter>,
    ) -> Self {
        // One statement per series: a family's read guard lives to the end
        // of its statement, and creating a second series of the same
        // family while it lives would deadlock.
        let open = open.get_or_create(&[("direction", direction)]).clone();
        let bytes = bytes.get_or_create(&[("direction", direction)]).clone();
        Hot { open, bytes }
    }
}

/// The index of `direction` in the per-direction arrays of resolved
/// series: `[inbound, outbound]`.
fn side(direction: &str) -> Option<usize> {
    match direction {
        INBOUND => Some(0),
        OUTBOUND => Some(1),
        _ => None,
    }
}

/// Makes the series of `family` at 0 for each of `values` in each
/// direction it can be counted in (`token` and `counted_in` say which),
/// and resolves them once, so counting takes no lock:
/// `[inbound, outbound][value]`, `None` where a value is never counted.
fn per_direction<T: Copy, const N: usize>(
    family: &Family<Labels2, Counter>,
    label: &'static str,
    values: [T; N],
    token: fn(T) -> &'static str,
    counted_in: fn(T, &str) -> bool,
) -> [[Option<Counter>; N]; 2] {
    [INBOUND, OUTBOUND].map(|direction| {
        values.map(|value| {
            counted_in(value, direction).then(|| {
                family
                    .get_or_create(&[("direction", direction), (label, token(value))])
                    .clone()
            })
        })
    })
}

label_values! {
    /// The `outcome` label values of `trellis_connections_total`: how a
    /// connection ended, or why it was refused. Each is made at 0 from the
    /// start in the directions it can be counted in.
    pub enum Outcome {
        /// Forwarded (outbound: over mTLS to a mesh peer) and ended.
        Forwarded = ("forwarded", Both),
        /// Inbound: a handshake refused, or an HTTP/2 connection past its
        /// limits; outbound: a dial to a mesh destination that failed, or a
        /// connection to the outbound port that was not redirected.
        Refused = ("refused", Both),
        /// Inbound: denied by policy; outbound: a destination outside the
        /// mesh under outbound `deny`.
        Denied = ("denied", Both),
        /// An open connection closed when new policies arrive: inbound,
        /// because they deny it or their revocations cover its caller;
        /// outbound, because their revocations cover its server.
        ClosedByPolicy = ("closed_by_policy", Both),
        /// A connection to one of the sidecar's own ports.
        Loop = ("loop", Both),
        /// Ended by an error once forwarding began.
        Error = ("error", Both),
        /// Inbound: an HTTP/2 connection closed because its caller sent no
        /// client preface in time (`http::h2_preface`).
        NoPreface = ("no_preface", Inbound),
        /// Inbound: a redirected connection whose original destination is
        /// no address of this pod.
        Misdirected = ("misdirected", Inbound),
        /// Inbound: the app could not be connected to.
        AppUnreachable = ("app_unreachable", Inbound),
        /// Outbound: plain TCP to a destination outside the mesh.
        Passthrough = ("passthrough", Outbound),
        /// Outbound: a connection to an address of this pod (a service's
        /// backend that is this pod): plain TCP that never leaves the pod,
        /// as the app's own call to that address would be.
        SamePod = ("same_pod", Outbound),
        /// Outbound: a call to a service's virtual address while the
        /// service has no ready backend: refused.
        NoBackend = ("no_backend", Outbound),
        /// Outbound: a call to a service's virtual address under outbound
        /// `deny` while every ready backend of the service is outside the
        /// mesh (none is picked, since each would be denied): refused.
        NoMeshBackend = ("no_mesh_backend", Outbound),
        /// Outbound: the server's sidecar answered with a TLS alert after
        /// this sidecar's handshake was over, before any answer.
        RefusedByPeer = ("refused_by_peer", Outbound),
        /// Outbound: the server's sidecar closed the connection after the
        /// handshake, before any answer and without a TLS alert.
        ClosedByPeer = ("closed_by_peer", Outbound),
        /// Outbound: plain TCP (passthrough or within the pod) whose
        /// destination could not be connected to.
        ConnectFailed = ("connect_failed", Outbound),
    }
}

/// The `action` of a decision an AUDIT policy would have denied.
pub const AUDIT: &str = "audit";

/// Every metric of the sidecar.
pub struct Metrics {
    inbound: Hot,
    outbound: Hot,
    registry: Registry,
    connections: Family<Labels2, Counter>,
    /// `trellis_connections_total`, resolved once:
    /// `[inbound, outbound][Outcome]`.
    outcomes: [[Option<Counter>; Outcome::COUNT]; 2],
    open: Family<Labels1, Gauge>,
    bytes: Family<Labels1, Counter>,
    handshake_failures: Family<Labels2, Counter>,
    /// `trellis_handshake_failures_total`, resolved once:
    /// `[inbound, outbound][HandshakeFailure]`.
    failures: [[Option<Counter>; HandshakeFailure::COUNT]; 2],
    pub certificate_expiry: Gauge,
    /// `trellis_certificate_renewals_total{outcome="ok"}`, resolved once.
    renewals_ok: Counter,
    /// `trellis_certificate_renewals_total{outcome="error"}`, resolved
    /// once: `[RenewalFailure]`.
    renewal_failures: [Counter; RenewalFailure::ALL.len()],
    pub snapshot_version: Gauge<u64, AtomicU64>,
    /// `trellis_drain_start_timestamp_seconds`: 0 until the drain starts.
    drain_start: Gauge,
    decisions: Family<DecisionLabels, Counter>,
    /// Denials before the first snapshot, under `default:no-snapshot`.
    denied_without_snapshot: Counter,
    /// `trellis_requests_total` by status class and request outcome,
    /// resolved once: `[STATUS_CLASSES][REQUEST_OUTCOMES]`.
    requests: [[Counter; REQUEST_OUTCOMES.len()]; STATUS_CLASSES.len()],
    request_duration: Histogram,
    rate_limited: Family<PolicyLabel, Counter>,
    /// `trellis_alpn_total`, resolved once: `[inbound, outbound][ALPN_VALUES]`.
    alpn: [[Counter; ALPN_VALUES.len()]; 2],
    /// `trellis_tls_handshakes_total`, resolved once:
    /// `[inbound, outbound][full, resumed][KX_GROUP_VALUES]`.
    handshakes: [[[Counter; KX_GROUP_VALUES.len()]; 2]; 2],
    /// `trellis_service_connect_retries_total`, resolved once:
    /// `[ConnectFailure]`.
    service_retries: [Counter; ConnectFailure::ALL.len()],
    /// `trellis_app_request_retries_total`, resolved once:
    /// `[APP_RETRIES]`.
    app_retries: [Counter; APP_RETRIES.len()],
    /// `trellis_tls_resumptions_abandoned_total`, resolved once:
    /// `[RESUMPTIONS_ABANDONED]`.
    resumptions_abandoned: [Counter; RESUMPTIONS_ABANDONED.len()],
    /// `trellis_admin_connections_refused_total`, resolved once:
    /// `[per_client, total]`.
    admin_refused: [Counter; 2],
    /// `trellis_admin_malformed_requests_total`, resolved once:
    /// `[ADMIN_MALFORMED]`.
    admin_malformed: [Counter; ADMIN_MALFORMED.len()],
    /// `trellis_h2_connections_refused_total`, resolved once:
    /// `[per_peer, total]`.
    h2_refused: [Counter; 2],
}

/// The `reason` label values of `trellis_app_request_retries_total`: what
/// of an inbound request was at hand when it went out again on another app
/// connection: all of it (`whole_request`), or its head, with the body read
/// along with it, while the rest of the body was still the caller's
/// (`streaming_body`).
pub const APP_RETRIES: [&str; 2] = ["whole_request", "streaming_body"];

/// The `reason` label of `trellis_admin_malformed_requests_total`: what
/// was wrong with a request head the admin port refused. The last stands
/// for any other.
pub const ADMIN_MALFORMED: [&str; 3] = trellis_core::http1::HEAD_FAULT_REASONS;

/// The `reason` label values of `trellis_tls_resumptions_abandoned_total`:
/// `not_resumed` (the peer no longer accepted the ticket), or why a resumed
/// session's peer certificate is no longer trusted, named as in
/// `trellis_handshake_failures_total` (any other reason is `other`, the
/// last).
pub const RESUMPTIONS_ABANDONED: [HandshakeFailure; 6] = [
    HandshakeFailure::NotResumed,
    HandshakeFailure::ExpiredCertificate,
    HandshakeFailure::Revoked,
    HandshakeFailure::ExpiredRoot,
    HandshakeFailure::UnknownIssuer,
    HandshakeFailure::Other,
];

/// The index in [`RESUMPTIONS_ABANDONED`] each reason is counted at, by
/// `reason as usize`: its own, or `other`'s for one not listed.
const RESUMPTION_ABANDONED_AT: [usize; HandshakeFailure::COUNT] = {
    let mut at = [RESUMPTIONS_ABANDONED.len() - 1; HandshakeFailure::COUNT];
    let mut i = 0;
    while i < RESUMPTIONS_ABANDONED.len() {
        at[RESUMPTIONS_ABANDONED[i] as usize] = i;
        i += 1;
    }
    at
};

/// The `group` label values of `trellis_tls_handshakes_total`: the key
/// exchange of the handshake: the hybrid, X25519 alone, or any other.
pub const KX_GROUP_VALUES: [&str; 3] = ["X25519MLKEM768", "X25519", "other"];
const KX_GROUPS: [rustls::NamedGroup; 2] = [
    rustls::NamedGroup::X25519MLKEM768,
    rustls::NamedGroup::X25519,
];

/// The `alpn` label values of `trellis_alpn_total`: what an mTLS handshake
/// between sidecars settled. Any other protocol ID counts as `none`, since
/// the sidecar never serves it.
pub const ALPN_VALUES: [&str; 3] = ["h2", "http/1.1", "none"];

type PolicyLabel = [(&'static str, Arc<str>); 1];

/// The `decision` label values of `trellis_requests_total`.
pub const REQUEST_OUTCOMES: [&str; 4] = ["allow", "deny", "rate_limited", "invalid"];
/// The `status` label values of `trellis_requests_total`: the class of the
/// answer, or `none` when the caller left before there was one.
const STATUS_CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "none"];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let connections = Family::<Labels2, Counter>::default();
        registry.register(
            "trellis_connections",
            "Connections by direction and outcome",
            connections.clone(),
        );
        let open = Family::<Labels1, Gauge>::default();
        registry.register(
            "trellis_connections_open",
            "Connections open now, by direction",
            open.clone(),
        );
        let bytes = Family::<Labels1, Counter>::default();
        registry.register(
            "trellis_bytes",
            "Bytes forwarded (both ways) by direction: byte streams as copied, HTTP request and response bodies",
            bytes.clone(),
        );
        let handshake_failures = Family::<Labels2, Counter>::default();
        registry.register(
            "trellis_handshake_failures",
            "TLS handshake failures by direction and reason",
            handshake_failures.clone(),
        );
        let failures = per_direction(
            &handshake_failures,
            "reason",
            HandshakeFailure::ALL,
            HandshakeFailure::token,
            |reason, direction| crate::tls::failure::reasons_of(direction).contains(&reason),
        );
        let outcomes = per_direction(
            &connections,
            "outcome",
            Outcome::ALL,
            Outcome::token,
            |outcome, direction| outcome.directions().include(direction),
        );
        let certificate_expiry = Gauge::default();
        registry.register(
            "trellis_certificate_expiry_timestamp_seconds",
            "notAfter of the current SVID, seconds since the Unix epoch",
            certificate_expiry.clone(),
        );
        let renewals = Family::<RenewalLabels, Counter>::default();
        registry.register(
            "trellis_certificate_renewals",
            "Certify calls by outcome, and by reason when they failed",
            renewals.clone(),
        );
        // Made at 0 and resolved once, so counting takes no lock.
        let renewals_ok = renewals.get_or_create(&vec![("outcome", "ok")]).clone();
        let renewal_failures = RenewalFailure::ALL.map(|reason| {
            renewals
                .get_or_create(&vec![("outcome", "error"), ("reason", reason.token())])
                .clone()
        });
        let snapshot_version = Gauge::<u64, AtomicU64>::default();
        registry.register(
            "trellis_snapshot_version",
            "Version of the discovery snapshot in force",
            snapshot_version.clone(),
        );
        let drain_start = Gauge::default();
        registry.register(
            "trellis_drain_start_timestamp_seconds",
            "When the drain after SIGTERM started, seconds since the Unix epoch; 0 while serving",
            drain_start.clone(),
        );
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "trellis_decisions",
            "Authorization decisions on inbound connections forwarded as bytes or denied, and on \
             inbound HTTP requests, by action (allow, deny, audit) and deciding policy \
             (namespace/name, default:<mode>, or default:no-snapshot before the first policy \
             snapshot)",
            decisions.clone(),
        );
        let denied_without_snapshot = decisions
            .get_or_create(&(
                [("action", "deny")],
                [("policy", Arc::from(trellis_core::policy::NO_SNAPSHOT))],
            ))
            .clone();
        let requests_family = Family::<Labels2, Counter>::default();
        registry.register(
            "trellis_requests",
            "Inbound HTTP requests by status class (1xx..5xx, none when the caller left \
             before an answer) and decision (allow, deny, rate_limited, invalid)",
            requests_family.clone(),
        );
        let requests = STATUS_CLASSES.map(|status| {
            REQUEST_OUTCOMES.map(|decision| {
                requests_family
                    .get_or_create(&[("status", status), ("decision", decision)])
                    .clone()
            })
        });
        let request_duration = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "trellis_request_duration_seconds",
            "Inbound HTTP request duration, from the request head to the end of the response body",
            request_duration.clone(),
        );
        let rate_limited = Family::<PolicyLabel, Counter>::default();
        // Its series are the policies', made as they are compiled: the
        // family is scraped before the first, with no series.
        registry.register(
            "trellis_rate_limited",
            "Inbound HTTP requests refused by a rate limit, by RateLimitPolicy (namespace/name)",
            Listed(rate_limited.clone()),
        );
        let alpn_family = Family::<Labels2, Counter>::default();
        registry.register(
            "trellis_alpn",
            "mTLS connections between sidecars by direction and the ALPN protocol the \
             handshake settled (h2, http/1.1, none)",
            alpn_family.clone(),
        );
        let alpn = [INBOUND, OUTBOUND].map(|direction| {
            ALPN_VALUES.map(|alpn| {
                alpn_family
                    .get_or_create(&[("direction", direction), ("alpn", alpn)])
                    .clone()
            })
        });
        let handshake_family = Family::<Labels3, Counter>::default();
        registry.register(
            "trellis_tls_handshakes",
            "mTLS handshakes between sidecars by direction, kind (full: certificates signed \
             and verified; resumed: a session ticket from an earlier connection) and key \
             exchange group",
            handshake_family.clone(),
        );
        let handshakes = [INBOUND, OUTBOUND].map(|direction| {
            ["full", "resumed"].map(|kind| {
                KX_GROUP_VALUES.map(|group| {
                    handshake_family
                        .get_or_create(&[
                            ("direction", direction),
                            ("kind", kind),
                            ("group", group),
                        ])
                        .clone()
                })
            })
        });
        let service_retries = per_reason(
            &mut registry,
            "trellis_service_connect_retries",
            "Calls to a Service sent on to another of its backends because connecting to \
             the one tried failed (before any byte of the app's was sent), by why \
             (refused, unreachable, timeout, reset, other)",
            ConnectFailure::ALL.map(ConnectFailure::token),
        );
        let app_retries = per_reason(
            &mut registry,
            "trellis_app_request_retries",
            &format!(
                "Inbound HTTP requests sent again on a new connection to the app because the \
                 app closed the kept-alive one they went out on before answering, when that \
                 cannot apply them twice (over HTTP/2: the closed connection gave them back \
                 unsent), as an app keep-alive timeout shorter than the sidecar's {} s idle \
                 bound causes, by what of the request was at hand: whole_request, or \
                 streaming_body (its body still coming from the caller, none of it sent yet)",
                crate::http::upstream::IDLE.as_secs()
            ),
            APP_RETRIES,
        );
        let resumptions_abandoned = per_reason(
            &mut registry,
            "trellis_tls_resumptions_abandoned",
            "Outbound attempts to resume a session from a ticket given up before anything of \
             the app's was sent, because the peer no longer accepted the ticket (not_resumed) \
             or the peer certificate the session brought back is no longer trusted \
             (expired_certificate, revoked, expired_root, unknown_issuer, other): the peer is \
             dialled again with a full handshake, counted in trellis_handshake_failures_total \
             only if it fails",
            RESUMPTIONS_ABANDONED.map(HandshakeFailure::token),
        );
        let admin_refused = per_reason(
            &mut registry,
            "trellis_admin_connections_refused",
            "Connections to the admin port (/live, /ready, /metrics, /config, the app's probes) \
             closed as they were accepted, by the limit that refused them: per_client (as many \
             open from the client's address as one may hold) or total (every slot taken, none \
             from an address holding more)",
            [
                Refused::FromClient { limit: 0 }.reason(),
                Refused::Total { limit: 0 }.reason(),
            ],
        );
        let admin_malformed = per_reason(
            &mut registry,
            "trellis_admin_malformed_requests",
            "Requests to the admin port refused for their head, and their connection closed: \
             target_too_long (414, a target over 65534 bytes), head_too_large (431, a head over 408 \
             KiB or 100 fields) or malformed (400, a head that does not parse or names an \
             invalid method or target)",
            ADMIN_MALFORMED,
        );
        let h2_refused = per_reason(
            &mut registry,
            "trellis_h2_connections_refused",
            "Inbound HTTP/2 connections refused with GOAWAY once their preface was in, by the \
             limit that refused them: per_peer (as many open from the caller's identity at its \
             address as one may hold) or total (as many open from all callers as the sidecar \
             serves)",
            [
                H2Refused::PerPeer { limit: 0 }.reason(),
                H2Refused::Total { limit: 0 }.reason(),
            ],
        );
        Metrics {
            admin_refused,
            admin_malformed,
            h2_refused,
            alpn,
            handshakes,
            service_retries,
            app_retries,
            resumptions_abandoned,
            requests,
            request_duration,
            rate_limited,
            inbound: Hot::new(INBOUND, &open, &bytes),
            outbound: Hot::new(OUTBOUND, &open, &bytes),
            registry,
            connections,
            outcomes,
            open,
            bytes,
            handshake_failures,
            failures,
            certificate_expiry,
            renewals_ok,
            renewal_failures,
            snapshot_version,
            drain_start,
            decisions,
            denied_without_snapshot,
        }
    }

    fn hot(&self, direction: &'static str) -> Option<&Hot> {
        match direction {
            INBOUND => Some(&self.inbound),
            OUTBOUND => Some(&self.outbound),
            _ => None,
        }
    }

    /// Counts a finished or refused connection by its `outcome`. A call
    /// to a service counts once, by its last backend: the ones it could
    /// not connect to before count in [`Metrics::service_retry`]. No lock
    /// for an outcome of the direction it is listed in: its series was
    /// resolved up front.
    pub fn connection(&self, direction: &'static str, outcome: Outcome) {
        match side(direction).and_then(|side| self.outcomes[side][outcome as usize].as_ref()) {
            Some(counter) => {
                counter.inc();
            }
            None => {
                self.connections
                    .get_or_create(&[("direction", direction), ("outcome", outcome.token())])
                    .inc();
            }
        }
    }

    /// Counts a TLS handshake that failed, or a peer refused as one, by
    /// `reason`. No lock for a reason of the direction it is listed in:
    /// its series was resolved up front.
    pub fn handshake_failure(&self, direction: &'static str, reason: HandshakeFailure) {
        match side(direction).and_then(|side| self.failures[side][reason as usize].as_ref()) {
            Some(counter) => {
                counter.inc();
            }
            None => {
                self.handshake_failures
                    .get_or_create(&[("direction", direction), ("reason", reason.token())])
                    .inc();
            }
        }
    }

    pub fn bytes(&self, direction: &'static str, n: u64) {
        match self.hot(direction) {
            Some(hot) => hot.bytes.inc_by(n),
            None => self
                .bytes
                .get_or_create(&[("direction", direction)])
                .inc_by(n),
        };
    }

    /// The `trellis_decisions_total` series of `action` by `policy`, to be
    /// resolved when policies are compiled, off the data path (the family
    /// map takes a lock).
    pub fn decision_counter(&self, action: &'static str, policy: &Arc<str>) -> Counter {
        self.decisions
            .get_or_create(&([("action", action)], [("policy", policy.clone())]))
            .clone()
    }

    /// Counts one decision through the family map (allocates the label):
    /// for decisions no resolved series covers.
    pub fn decision(&self, action: &'static str, policy: &str) {
        self.decision_counter(action, &Arc::from(policy)).inc();
    }

    /// Counts one finished HTTP request: `outcome` is one of
    /// [`REQUEST_OUTCOMES`]. No lock: every series was resolved up front.
    /// `status` 0 means there was no answer. A gRPC call the sidecar refuses
    /// is answered HTTP 200 (its `grpc-status` in the trailers), so counts
    /// as 2xx: its `outcome` is what says it was refused.
    pub fn request(&self, status: u16, outcome: &'static str, seconds: f64) {
        let class = match status {
            0 => STATUS_CLASSES.len() - 1,
            _ => usize::from(status / 100).clamp(1, 5) - 1,
        };
        let index = REQUEST_OUTCOMES
            .iter()
            .position(|o| *o == outcome)
            .unwrap_or(0);
        self.requests[class][index].inc();
        self.request_duration.observe(seconds);
    }

    /// Counts an established mTLS connection between sidecars by the ALPN
    /// protocol its handshake settled and by whether it resumed a session.
    /// No lock: every series was resolved up front.
    pub fn established(&self, direction: &'static str, tls: &rustls::CommonState) {
        let direction = usize::from(direction == OUTBOUND);
        let alpn = tls
            .alpn_protocol()
            .and_then(|id| ALPN_VALUES.iter().position(|v| v.as_bytes() == id))
            .unwrap_or(ALPN_VALUES.len() - 1);
        self.alpn[direction][alpn].inc();
        let resumed = tls.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        let group = tls.negotiated_key_exchange_group().map(|g| g.name());
        let group = KX_GROUPS
            .iter()
            .position(|g| Some(*g) == group)
            .unwrap_or(KX_GROUP_VALUES.len() - 1);
        self.handshakes[direction][usize::from(resumed)][group].inc();
    }

    /// Counts a call to a service that went on to another backend because
    /// connecting to one failed, for `reason`. No lock: every series was
    /// resolved up front.
    pub fn service_retry(&self, reason: ConnectFailure) {
        self.service_retries[reason as usize].inc();
    }

    /// Counts an inbound request sent again on a new app connection
    /// because the app closed the kept-alive one it went out on before
    /// answering, when that cannot apply it twice: under `whole_request` if
    /// all of it was at hand (`whole`), else `streaming_body`. The HTTP/1
    /// forwarder's requests, those hyper sends over HTTP/1, and those an
    /// HTTP/2 app connection gave back unsent all count. No lock: both
    /// series were resolved up front.
    pub fn app_request_retry(&self, whole: bool) {
        self.app_retries[usize::from(!whole)].inc();
    }

    /// Counts an outbound attempt to resume a session given up because the
    /// peer refused its ticket or the peer certificate it brought back is
    /// no longer trusted, for `reason`, one of [`RESUMPTIONS_ABANDONED`]
    /// (any other counts as `other`). Not a handshake failure: the dial
    /// goes on with a full handshake, which counts as one if it fails. No
    /// lock: every series was resolved up front.
    pub fn resumption_abandoned(&self, reason: HandshakeFailure) {
        self.resumptions_abandoned[RESUMPTION_ABANDONED_AT[reason as usize]].inc();
    }

    /// Counts a connection to the admin port closed as it was accepted, by
    /// the limit that `refused` it. No lock: both series were resolved up
    /// front.
    pub fn admin_connection_refused(&self, refused: Refused) {
        let index = match refused {
            Refused::FromClient { .. } => 0,
            Refused::Total { .. } => 1,
        };
        self.admin_refused[index].inc();
    }

    /// Counts a request head the admin port refused, by what was wrong
    /// with it (`reason`, one of [`ADMIN_MALFORMED`]; any other counts as
    /// `malformed`). No lock: every series was resolved up front.
    pub fn admin_malformed_request(&self, reason: &'static str) {
        self.admin_malformed[reason_index(&ADMIN_MALFORMED, reason)].inc();
    }

    /// Counts an inbound HTTP/2 connection refused by the limit that
    /// `refused` it. No lock: both series were resolved up front.
    pub fn h2_connection_refused(&self, refused: H2Refused) {
        let index = match refused {
            H2Refused::PerPeer { .. } => 0,
            H2Refused::Total { .. } => 1,
        };
        self.h2_refused[index].inc();
    }

    /// The `trellis_rate_limited_total` series of `policy`, resolved when
    /// limits are compiled (the family map takes a lock).
    pub fn rate_limited_counter(&self, policy: &Arc<str>) -> Counter {
        self.rate_limited
            .get_or_create(&[("policy", policy.clone())])
            .clone()
    }

    /// Counts a connection denied because no snapshot has arrived yet.
    pub fn denied_without_snapshot(&self) {
        self.denied_without_snapshot.inc();
    }

    /// Records that the drain started now.
    pub fn drain_started(&self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.drain_start
            .set(i64::try_from(now.as_secs()).unwrap_or(i64::MAX));
    }

    /// Counts a Certify call that gave this sidecar its certificate. No
    /// lock: its series was resolved up front.
    pub fn renewed(&self) {
        self.renewals_ok.inc();
    }

    /// Counts a failed Certify call, by `reason`. No lock: every series
    /// was resolved up front.
    pub fn renewal_failed(&self, reason: RenewalFailure) {
        self.renewal_failures[reason as usize].inc();
    }

    /// Marks a connection open until the returned guard is dropped.
    pub fn open(&self, direction: &'static str) -> OpenGuard {
        let gauge = match self.hot(direction) {
            Some(hot) => hot.open.clone(),
            None => self.open.get_or_create(&[("direction", direction)]).clone(),
        };
        gauge.inc();
        OpenGuard(gauge)
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String never fails");
        out
    }
}

/// Registers the counter family `name` with a `reason` label and resolves
/// its series, one for each of `reasons` in their order, so that counting
/// takes no lock.
fn per_reason<const N: usize>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    reasons: [&'static str; N],
) -> [Counter; N] {
    let family = Family::<Labels1, Counter>::default();
    registry.register(name, help, family.clone());
    reasons.map(|reason| family.get_or_create(&[("reason", reason)]).clone())
}

/// The index of `reason` in `values`, whose last value (`other`) stands
/// for any reason not among them.
fn reason_index(values: &[&str], reason: &str) -> usize {
    values
        .iter()
        .position(|r| *r == reason)
        .unwrap_or(values.len() - 1)
}

/// A family scraped with its `# HELP` and `# TYPE` before it has a series,
/// which the registry leaves out of a scrape for a bare [`Family`]: for a
/// family whose label values are not known in advance.
#[derive(Debug)]
struct Listed<F>(F);

impl<F: EncodeMetric> EncodeMetric for Listed<F> {
    fn encode(&self, encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }

    fn metric_type(&self) -> MetricType {
        self.0.metric_type()
    }
}

/// Decrements `trellis_connections_open` when dropped.
pub struct OpenGuard(Gauge);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_the_documented_names() {
        let m = Metrics::new();
        m.connection(INBOUND, Outcome::Forwarded);
        m.handshake_failure(INBOUND, HandshakeFailure::NotTls);
        m.bytes(OUTBOUND, 10);
        m.renewed();
        m.renewal_failed(RenewalFailure::Unreachable);
        let _g = m.open(INBOUND);
        let text = m.encode();
        for name in [
            "trellis_connections_total{direction=\"inbound\",outcome=\"forwarded\"} 1",
            "trellis_connections_open{direction=\"inbound\"} 1",
            "trellis_connections_open{direction=\"outbound\"} 0",
            "trellis_connections_total{direction=\"outbound\",outcome=\"forwarded\"} 0",
            "trellis_bytes_total{direction=\"outbound\"} 10",
            "trellis_handshake_failures_total{direction=\"inbound\",reason=\"not_tls\"} 1",
            "trellis_certificate_expiry_timestamp_seconds 0",
            "trellis_certificate_renewals_total{outcome=\"ok\"} 1",
            "trellis_certificate_renewals_total{outcome=\"error\",reason=\"unreachable\"} 1",
            "trellis_snapshot_version 0",
            "trellis_decisions_total{action=\"deny\",policy=\"default:no-snapshot\"} 0",
            "trellis_connections_total{direction=\"inbound\",outcome=\"denied\"} 0",
            "trellis_service_connect_retries_total{reason=\"refused\"} 0",
            "trellis_app_request_retries_total{reason=\"whole_request\"} 0",
            "trellis_app_request_retries_total{reason=\"streaming_body\"} 0",
            "trellis_tls_resumptions_abandoned_total{reason=\"revoked\"} 0",
            "trellis_tls_resumptions_abandoned_total{reason=\"not_resumed\"} 0",
            "trellis_admin_connections_refused_total{reason=\"per_client\"} 0",
            "trellis_admin_connections_refused_total{reason=\"total\"} 0",
            "trellis_h2_connections_refused_total{reason=\"per_peer\"} 0",
            "trellis_h2_connections_refused_total{reason=\"total\"} 0",
            "# HELP trellis_app_request_retries Inbound HTTP requests sent again",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }

    /// A fresh sidecar's scrape has every family, and each series whose
    /// labels are known in advance at 0, so `rate()` and alerts work from
    /// the first scrape.
    #[test]
    fn every_listed_series_is_scraped_at_zero_before_a_count() {
        let text = Metrics::new().encode();
        let zeros = |family: &str| {
            text.lines()
                .filter(|l| l.starts_with(family) && l.ends_with(" 0"))
                .count()
        };
        let directions = |d: Directions| match d {
            Directions::Both => 2,
            Directions::Inbound | Directions::Outbound => 1,
        };
        assert_eq!(
            zeros("trellis_handshake_failures_total{"),
            INBOUND_REASONS.len() + OUTBOUND_REASONS.len(),
            "{text}"
        );
        assert_eq!(
            zeros("trellis_connections_total{"),
            Outcome::ALL
                .map(|outcome| directions(outcome.directions()))
                .iter()
                .sum::<usize>(),
            "{text}"
        );
        for direction in [INBOUND, OUTBOUND] {
            for reason in HandshakeFailure::ALL {
                let series = format!(
                    "trellis_handshake_failures_total{{direction=\"{direction}\",reason=\"{reason}\"}} 0"
                );
                let listed = crate::tls::failure::reasons_of(direction).contains(&reason);
                assert_eq!(text.contains(&series), listed, "{series} in\n{text}");
            }
            for outcome in Outcome::ALL {
                let series = format!(
                    "trellis_connections_total{{direction=\"{direction}\",outcome=\"{outcome}\"}} 0"
                );
                let listed = outcome.directions().include(direction);
                assert_eq!(text.contains(&series), listed, "{series} in\n{text}");
            }
        }
        for series in [
            "trellis_handshake_failures_total{direction=\"inbound\",reason=\"not_tls\"} 0",
            "trellis_handshake_failures_total{direction=\"outbound\",reason=\"alert_other\"} 0",
            "trellis_handshake_failures_total{direction=\"inbound\",reason=\"overloaded\"} 0",
            "trellis_certificate_renewals_total{outcome=\"ok\"} 0",
            "trellis_certificate_renewals_total{outcome=\"error\",reason=\"local\"} 0",
            "# TYPE trellis_rate_limited counter",
        ] {
            assert!(text.contains(series), "{series} missing from\n{text}");
        }
        assert_eq!(
            zeros("trellis_certificate_renewals_total{"),
            1 + RenewalFailure::ALL.len()
        );
        assert!(!text.contains("trellis_rate_limited_total{"), "{text}");
    }

    /// Each failed renewal's reason has its series at 0 from the start,
    /// and a count lands on the series of its own reason alone.
    #[test]
    fn renewal_failures_count_under_their_reason() {
        let fresh = Metrics::new().encode();
        for reason in RenewalFailure::ALL {
            let series = format!(
                "trellis_certificate_renewals_total{{outcome=\"error\",reason=\"{}\"}} 0",
                reason.token()
            );
            assert!(
                fresh.lines().any(|l| l == series),
                "{series} missing from\n{fresh}"
            );
        }
        let m = Metrics::new();
        // Each reason a different number of times: its index plus one.
        for (i, reason) in RenewalFailure::ALL.into_iter().enumerate() {
            for _ in 0..=i {
                m.renewal_failed(reason);
            }
        }
        m.renewed();
        let text = m.encode();
        for (i, reason) in RenewalFailure::ALL.into_iter().enumerate() {
            let series = format!(
                "trellis_certificate_renewals_total{{outcome=\"error\",reason=\"{}\"}} {}",
                reason.token(),
                i + 1
            );
            assert!(
                text.lines().any(|l| l == series),
                "{series} missing from\n{text}"
            );
        }
        assert!(
            text.lines()
                .any(|l| l == "trellis_certificate_renewals_total{outcome=\"ok\"} 1"),
            "{text}"
        );
    }

    /// An abandoned resumption counts under its reason when the metric
    /// lists it, else under `other`.
    #[test]
    fn an_abandoned_resumption_counts_under_its_reason_or_other() {
        let m = Metrics::new();
        m.resumption_abandoned(HandshakeFailure::Revoked);
        m.resumption_abandoned(HandshakeFailure::NotResumed);
        m.resumption_abandoned(HandshakeFailure::NotResumed);
        m.resumption_abandoned(HandshakeFailure::ForeignTrustDomain);
        let text = m.encode();
        for series in [
            "trellis_tls_resumptions_abandoned_total{reason=\"revoked\"} 1",
            "trellis_tls_resumptions_abandoned_total{reason=\"not_resumed\"} 2",
            "trellis_tls_resumptions_abandoned_total{reason=\"other\"} 1",
            "trellis_tls_resumptions_abandoned_total{reason=\"expired_root\"} 0",
        ] {
            assert!(text.contains(series), "{series} missing from\n{text}");
        }
    }

    /// A count lands on its own series, made at 0 before; a value counted
    /// in a direction it is not listed for still counts, in a series of
    /// its own.
    #[test]
    fn counts_land_on_the_series_of_their_value() {
        let m = Metrics::new();
        m.handshake_failure(INBOUND, HandshakeFailure::ForeignTrustDomain);
        m.handshake_failure(OUTBOUND, HandshakeFailure::AlertOther);
        m.handshake_failure(OUTBOUND, HandshakeFailure::NotResumed);
        m.connection(OUTBOUND, Outcome::NoMeshBackend);
        m.connection(INBOUND, Outcome::NoPreface);
        m.connection(INBOUND, Outcome::NoPreface);
        let text = m.encode();
        for series in [
            "trellis_handshake_failures_total{direction=\"inbound\",reason=\"foreign_trust_domain\"} 1",
            "trellis_handshake_failures_total{direction=\"outbound\",reason=\"foreign_trust_domain\"} 0",
            "trellis_handshake_failures_total{direction=\"outbound\",reason=\"alert_other\"} 1",
            "trellis_handshake_failures_total{direction=\"outbound\",reason=\"not_resumed\"} 1",
            "trellis_connections_total{direction=\"outbound\",outcome=\"no_mesh_backend\"} 1",
            "trellis_connections_total{direction=\"inbound\",outcome=\"no_preface\"} 2",
            "trellis_connections_total{direction=\"inbound\",outcome=\"forwarded\"} 0",
        ] {
            assert!(text.contains(series), "{series} missing from\n{text}");
        }
    }

    /// Each refused HTTP/2 connection counts under the label its limit's
    /// `reason` names, the one its log line gives.
    #[test]
    fn h2_refusals_count_under_their_reason() {
        let m = Metrics::new();
        m.h2_connection_refused(H2Refused::Total { limit: 4 });
        m.h2_connection_refused(H2Refused::PerPeer { limit: 2 });
        m.h2_connection_refused(H2Refused::Total { limit: 4 });
        let text = m.encode();
        for (refused, count) in [
            (H2Refused::PerPeer { limit: 2 }, 1),
            (H2Refused::Total { limit: 4 }, 2),
        ] {
            let series = format!(
                "trellis_h2_connections_refused_total{{reason=\"{}\"}} {count}",
                refused.reason()
            );
            assert!(text.contains(&series), "{series} missing from\n{text}");
        }
    }

    /// A request sent again counts once, under what of it was at hand.
    #[test]
    fn app_request_retries_count_under_what_was_at_hand() {
        let m = Metrics::new();
        m.app_request_retry(true);
        m.app_request_retry(false);
        m.app_request_retry(false);
        let text = m.encode();
        for series in [
            "trellis_app_request_retries_total{reason=\"whole_request\"} 1",
            "trellis_app_request_retries_total{reason=\"streaming_body\"} 2",
        ] {
            assert!(text.contains(series), "{series} missing from\n{text}");
        }
    }

    #[test]
    fn request_series_are_a_fixed_set_whatever_the_status() {
        let m = Metrics::new();
        for status in [0, 101, 200, 204, 302, 404, 429, 503, 599, 999] {
            for outcome in REQUEST_OUTCOMES {
                m.request(status, outcome, 0.001);
            }
        }
        let text = m.encode();
        let series = text
            .lines()
            .filter(|l| l.starts_with("trellis_requests_total{"))
            .count();
        assert_eq!(
            series,
            STATUS_CLASSES.len() * REQUEST_OUTCOMES.len(),
            "{text}"
        );
        assert!(text.contains("trellis_requests_total{status=\"none\",decision=\"deny\"} 1"));
        assert!(text.contains("trellis_requests_total{status=\"5xx\",decision=\"allow\"} 3"));
        assert!(
            text.contains("trellis_request_duration_seconds_count 40"),
            "one histogram without labels: {text}"
        );
    }
}
