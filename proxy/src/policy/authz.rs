//! The authorization policy in force ([`Policies`]) and the decision on one
//! inbound connection ([`authorize`]).
//!
//! `Policies` is built once per snapshot whose policies changed, off the
//! data path: compiling the engine's [`PolicySet`] and resolving the
//! `trellis_decisions_total` series each policy can produce. Deciding and
//! counting a connection then only reads it: no lock, no allocation beyond
//! the engine's (none unless an AUDIT rule matches). This module never
//! logs; the listener logs each decision where it knows the connection.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, LazyLock};

use prometheus_client::metrics::counter::Counter;
use trellis_core::SpiffeId;
use trellis_core::policy::{
    CompileError, Decision, DefaultPolicy, HttpRequest, OpaqueFallback, PolicySet, Reason, RuleRef,
    Ruling, SelectorScope, ValidationContext, Verdict, policy_key,
};
use trellis_core::refusal::AnswerText;
use trellis_core::revocation::Revocations;
use trellis_proto::policy::v1 as pb;

use crate::http::authz::NO_SNAPSHOT_DENIAL;
use crate::http::ratelimit::{InvalidRateLimit, RateLimits};
use crate::metrics::{AUDIT, Metrics};

/// The compiled policies of one snapshot, as enforced.
#[derive(Debug)]
pub struct Policies {
    /// The snapshot version these policies arrived with.
    pub version: u64,
    pub set: PolicySet,
    /// The rate limits that select this workload, with their buckets.
    pub rate_limits: RateLimits,
    /// The policy part of the snapshot as received, to tell whether a later
    /// snapshot changes anything enforced.
    received: (String, Vec<pb::Policy>, Vec<pb::RateLimit>),
    /// Inbound ports never parsed as HTTP: the sidecar's own and the mesh's.
    opaque_ports: Vec<u16>,
    /// Where they came from, to tell whether a later snapshot changes them.
    opaque: OpaquePorts,
    /// Whether a rate limit in force reads request paths.
    limits_read_paths: bool,
    counters: Counters,
    /// The mesh's revoked identities: a peer whose certificate one of them
    /// covers is refused whatever the policies say, and an open connection
    /// of one is closed when they arrive ([`Snapshot::compile_in`] sets
    /// them; empty until then).
    ///
    /// [`Snapshot::compile_in`]: super::Snapshot::compile_in
    pub revocations: Arc<Revocations>,
}

/// The inbound ports never parsed as HTTP, by who declared them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpaquePorts {
    /// This sidecar's (`--opaque-ports`), which the control plane does not
    /// know: L7 matches on them are enforced failing closed (see
    /// [`PolicySet::compile_with_opaque`]).
    pub own: Vec<u16>,
    /// The mesh's (`mesh.opaque_ports` of the snapshot): the control plane
    /// refuses entries with L7 matches naming them, and so does the
    /// sidecar; those naming no ports fail closed on them.
    pub mesh: Vec<u16>,
}

impl OpaquePorts {
    /// Every port of both, each once.
    fn all(&self) -> Vec<u16> {
        let mut all = self.own.clone();
        all.extend(self.mesh.iter().filter(|p| !self.own.contains(p)));
        all
    }
}

/// The `trellis_decisions_total` series these policies can produce,
/// resolved once. Each policy has one action, so one series.
#[derive(Debug)]
struct Counters {
    by_policy: HashMap<Arc<str>, Counter>,
    default_allow: Counter,
    default_deny: Counter,
}

impl Policies {
    /// Compiles the policies that select `local` under the mesh default
    /// `default_policy` (`""` is `deny`).
    pub fn compile(
        version: u64,
        local: &SpiffeId,
        default_policy: String,
        policies: Vec<pb::Policy>,
        metrics: &Metrics,
    ) -> Result<Self, InvalidPolicies> {
        Self::compile_in(
            version,
            local,
            default_policy,
            policies,
            Vec::new(),
            &OpaquePorts::default(),
            metrics,
        )
    }

    /// [`compile`](Self::compile) with `rate_limits`, refusing entries with
    /// L7 matches naming the mesh's `opaque` ports and enforcing other L7
    /// matches on opaque ports (the sidecar's own, or any for an entry
    /// naming no ports) failing closed.
    pub fn compile_in(
        version: u64,
        local: &SpiffeId,
        default_policy: String,
        policies: Vec<pb::Policy>,
        rate_limits: Vec<pb::RateLimit>,
        opaque: &OpaquePorts,
        metrics: &Metrics,
    ) -> Result<Self, InvalidPolicies> {
        let limits = RateLimits::compile(&rate_limits, local, metrics)?;
        let default = match default_policy.as_str() {
            "" => DefaultPolicy::Deny,
            other => other.parse()?,
        };
        // A snapshot carries stored documents: one valid when it was stored
        // must not make the sidecar refuse every snapshot after a check got
        // stricter. Which namespace may select this workload is the control
        // plane's check, made when a policy is written: the sidecar does not
        // know the mesh's root namespace. L7 matches on the sidecar's own
        // opaque ports, which the control plane cannot check, must not
        // make it refuse every snapshot that holds them either: they fail
        // closed there, reported as `opaque_fallbacks`, as do those of
        // entries naming no ports on any opaque port.
        let context = ValidationContext {
            opaque_ports: opaque.mesh.clone(),
            stored: true,
            scope: SelectorScope::Unchecked,
        };
        let opaque_ports = opaque.all();
        let set =
            PolicySet::compile_with_opaque(local, &policies, default, &context, &opaque_ports)?;
        // Only the policies that select this workload are in force.
        let in_force: HashSet<&str> = set.policy_names().collect();
        let mut by_policy = HashMap::new();
        for policy in &policies {
            let label = policy_key(&policy.namespace, &policy.name);
            if !in_force.contains(label.as_str()) {
                continue;
            }
            let action = match pb::Action::try_from(policy.action) {
                Ok(pb::Action::Allow) => Verdict::Allow.as_str(),
                Ok(pb::Action::Deny) => Verdict::Deny.as_str(),
                // Validation refused anything else when the set compiled.
                _ => AUDIT,
            };
            let label: Arc<str> = label.into();
            let counter = metrics.decision_counter(action, &label);
            by_policy.insert(label, counter);
        }
        let default_label: Arc<str> = default.label().into();
        let counters = Counters {
            by_policy,
            default_allow: metrics.decision_counter(Verdict::Allow.as_str(), &default_label),
            default_deny: metrics.decision_counter(Verdict::Deny.as_str(), &default_label),
        };
        Ok(Self {
            version,
            set,
            limits_read_paths: limits.reads_paths(),
            rate_limits: limits,
            received: (default_policy, policies, rate_limits),
            opaque_ports,
            opaque: opaque.clone(),
            counters,
            revocations: Arc::default(),
        })
    }

    /// Whether `other` enforces exactly what this does (same default, same
    /// policies as received, same revocations), so connections need not be
    /// re-decided.
    pub fn same_as(&self, other: &Policies) -> bool {
        self.received == other.received
            && self.opaque == other.opaque
            && self.revocations == other.revocations
    }

    /// Whether requests to `port` have their paths checked
    /// ([`l7::check_path`](trellis_core::policy::l7::check_path)): a rule
    /// matches request paths on it, or a rate limit reads paths.
    pub fn checks_paths(&self, port: u16) -> bool {
        self.limits_read_paths || self.set.matches_paths_on(port)
    }

    /// What the stored documents in force fail of checks added since they
    /// were stored, and how they are enforced instead: one
    /// `(namespace/name, what)` each, to be logged once per change.
    pub fn relaxed(&self) -> Vec<(&str, String)> {
        let policies = self.set.relaxed().map(|(key, v)| (key, v.to_string()));
        policies.chain(self.rate_limits.relaxed()).collect()
    }

    /// The rules with L7 matches on this sidecar's opaque ports (its own,
    /// or the mesh's for an entry naming no ports), and how each is
    /// enforced there instead: to be logged once per change
    /// and shown in `/config`.
    pub fn opaque_fallbacks(&self) -> &[OpaqueFallback] {
        self.set.opaque_fallbacks()
    }

    /// Whether traffic to `port` is never parsed as HTTP.
    pub fn is_opaque(&self, port: u16) -> bool {
        self.opaque_ports.contains(&port)
    }

    /// The ports never parsed as HTTP: the sidecar's own and the mesh's.
    pub fn opaque_ports(&self) -> &[u16] {
        &self.opaque_ports
    }

    /// `namespace/name` of each policy in force, in evaluation order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.set.policy_names()
    }

    /// Counts `decision` in `trellis_decisions_total`: its verdict under its
    /// deciding policy, and each AUDIT policy that would have denied it.
    pub fn count(&self, decision: &Decision, metrics: &Metrics) {
        let counter = match &decision.reason {
            Reason::Rule(rule) => self.counters.by_policy.get(&*rule.policy),
            Reason::Default(_) => Some(match decision.verdict {
                Verdict::Allow => &self.counters.default_allow,
                Verdict::Deny => &self.counters.default_deny,
            }),
            // Never made with policies in force.
            Reason::NoSnapshot => None,
        };
        match counter {
            Some(counter) => {
                counter.inc();
            }
            // Unreachable while the engine names only the policies it was
            // given; counted the slow way rather than lost.
            None => metrics.decision(decision.verdict.as_str(), decision.policy_label()),
        }
        for audit in &decision.audits {
            self.count_audit(audit, metrics);
        }
    }

    /// Counts `audit`'s AUDIT policy in `trellis_decisions_total` as
    /// having a "would deny", on its series resolved with these policies.
    pub fn count_audit(&self, audit: &RuleRef, metrics: &Metrics) {
        match self.counters.by_policy.get(&*audit.policy) {
            Some(counter) => {
                counter.inc();
            }
            None => metrics.decision(AUDIT, &audit.policy),
        }
    }
}

/// Why the policy part of a snapshot cannot be enforced (the NACK reason).
#[derive(Debug, thiserror::Error)]
pub enum InvalidPolicies {
    #[error("mesh.default_policy: {0}")]
    DefaultPolicy(#[from] trellis_core::policy::UnknownDefaultPolicy),
    #[error("policies: {0}")]
    Policy(#[from] CompileError),
    #[error(transparent)]
    RateLimit(#[from] InvalidRateLimit),
}

/// Decides whether `peer` may connect to local `port` under the policies in
/// force: a matching DENY rule denies, else a matching ALLOW rule allows,
/// else the mesh default decides. Zero trust: with no snapshot yet (`None`)
/// everything is denied, named `default:no-snapshot`
/// ([`Reason::NoSnapshot`]), not as any mesh default: the one the snapshot
/// will bring is not known yet.
pub fn authorize(policies: Option<&Policies>, peer: &SpiffeId, port: u16) -> Decision {
    match policies {
        Some(policies) => policies.set.decide(peer, port),
        None => Decision {
            verdict: Verdict::Deny,
            reason: Reason::NoSnapshot,
            audits: Vec::new(),
        },
    }
}

/// Counts `decision` when there may be no policies yet.
pub fn count(policies: Option<&Policies>, decision: &Decision, metrics: &Metrics) {
    match policies {
        Some(policies) => policies.count(decision, metrics),
        None => metrics.denied_without_snapshot(),
    }
}

/// Counts `audit` (a rule of an AUDIT policy in force in `policies`) as a
/// "would deny": see [`Policies::count_audit`].
pub fn count_audit(policies: Option<&Policies>, audit: &RuleRef, metrics: &Metrics) {
    match policies {
        Some(policies) => policies.count_audit(audit, metrics),
        None => metrics.decision(AUDIT, &audit.policy),
    }
}

/// Whether a connection that `decision` (L4) did not allow may still be
/// served as HTTP, each request decided on its own: see
/// [`PolicySet::admits_requests`].
pub fn admits_requests(
    policies: Option<&Policies>,
    decision: &Decision,
    peer: &SpiffeId,
    port: u16,
) -> bool {
    policies.is_some_and(|p| p.set.admits_requests(decision, peer, port))
}

/// The verdict on an allowed connection from `peer` on local `port` that
/// is not HTTP, when a DENY rule with HTTP conditions there denies it
/// whole: see [`PolicySet::denies_unless_http`].
pub fn denies_unless_http(
    policies: Option<&Policies>,
    peer: &SpiffeId,
    port: u16,
) -> Option<Decision> {
    policies.and_then(|p| p.set.denies_unless_http(peer, port))
}

/// The AUDIT rules that would deny a connection from `peer` on local
/// `port` that is not HTTP: see [`PolicySet::audits_unless_http`].
pub fn audits_unless_http(policies: Option<&Policies>, peer: &SpiffeId, port: u16) -> Vec<RuleRef> {
    policies.map_or_else(Vec::new, |p| p.set.audits_unless_http(peer, port))
}

/// Decides one HTTP request from `peer` on local `port` under the policies
/// in force ([`PolicySet::rule_request`]): a denial comes with what its
/// caller is answered, built when those policies were compiled. With no
/// snapshot yet, denied like a connection and answered
/// [`NO_SNAPSHOT_DENIAL`].
pub fn authorize_request<'a>(
    policies: Option<&'a Policies>,
    peer: &SpiffeId,
    port: u16,
    request: &HttpRequest<'_>,
) -> Ruling<'a> {
    static NO_SNAPSHOT: LazyLock<AnswerText> =
        LazyLock::new(|| AnswerText::new(NO_SNAPSHOT_DENIAL));
    match policies {
        Some(policies) => policies.set.rule_request(peer, port, request),
        None => Ruling::Denied(authorize(None, peer, port), &NO_SNAPSHOT),
    }
}
