//! The decision engine: the policies that select one workload, compiled into
//! an index, and the verdict for each inbound connection.
//!
//! This module owns the meaning of a policy set: a matching DENY rule denies
//! (DENY wins over ALLOW); otherwise a matching ALLOW rule allows; otherwise
//! the mesh default decides. AUDIT rules are evaluated too and reported as
//! "would deny", never changing the verdict. Policies are ordered by
//! `namespace/name` and rules by index, so the rule named in a [`Decision`]
//! is always the first that matched. It never validates (it compiles only
//! what `validate` accepted) and never logs: the caller logs the [`Decision`].
//!
//! # Connections and requests
//!
//! A `to` entry with L7 matches (methods, paths, headers, grpc) can only be
//! decided on an HTTP request, so decisions come at two levels:
//!
//! - [`PolicySet::decide`] decides a whole connection (L4). Only entries
//!   without L7 matches take part: an ALLOW on `GET /health` does not allow
//!   raw TCP on the port, and a DENY on `/admin` does not block the
//!   connection that `GET /` arrives on. This is the decision for opaque
//!   traffic and the one an open connection is re-checked with.
//! - [`PolicySet::admits_requests`] says whether a connection that `decide`
//!   did not allow may still be served as HTTP: not denied by a DENY rule,
//!   and some ALLOW rule for the source has an L7 entry on the port ("may
//!   match"). Such a connection is refused if it turns out not to be HTTP.
//! - [`PolicySet::decide_request`] decides each HTTP request with every
//!   rule: an entry without L7 matches matches every request on its ports,
//!   one with them only requests they match. DENY still wins over ALLOW,
//!   and the mesh default decides when nothing matches, so a DENY rule on
//!   `/admin` denies exactly those requests, also on connections that an L4
//!   ALLOW let in. A header sent more than once never helps a request get
//!   allowed: an ALLOW rule's header condition needs every value to match,
//!   a DENY's (and an AUDIT's "would deny") any one.
//!
//! Entries of one rule are matched separately: `[{ports: [80], paths:
//! [/a]}, {ports: [81]}]` matches `/a` on 80 and anything on 81, not `/b`
//! on 80.
//!
//! # Opaque ports
//!
//! A sidecar never parses traffic to its opaque ports as HTTP: the mesh's
//! (the control plane's `--opaque-ports`), its own (`--opaque-ports`, which
//! a pod's `trellis.io/opaque-ports` annotation sets) or both. L7 matches
//! cannot be checked there. Validation refuses entries naming the mesh's,
//! but the control plane cannot know the ports one sidecar declares
//! opaque, and an entry naming no ports has its L7 matches on every port,
//! opaque ones included. Refusing such a policy would leave the sidecar
//! without any later change; enforcing it as written would fail open (an
//! L7 DENY entry never matches a connection). A set compiled with
//! [`PolicySet::compile_with_opaque`] fails closed on those ports instead,
//! as Istio does with HTTP-only fields on TCP traffic: an entry with L7
//! matches there of a DENY rule matches whole connections there (an AUDIT
//! one reports them as "would deny"), one of an ALLOW rule matches nothing
//! there. Each such rule is an [`OpaqueFallback`], for the sidecar to
//! report.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use trellis_proto::policy::v1 as proto;

use super::document::Action;
use super::l7::HttpRequest;
use super::pattern::IdPattern;
use super::rules::sorted_ports;
pub(crate) use super::rules::{CompiledPolicy, CompiledRule};
use super::validate::{ValidationContext, Violation, Violations};
use crate::refusal::AnswerText;
use crate::spiffe::{SpiffeId, TrustDomain};

/// What happens when no policy decides: the control plane's `--default-policy`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum DefaultPolicy {
    /// Nothing is allowed until a policy allows it.
    #[default]
    Deny,
    /// Sources in the destination's own namespace (`/ns/<ns>/`) are allowed.
    AllowSameNamespace,
    /// Any source of the mesh's trust domain is allowed.
    AllowMesh,
}

impl DefaultPolicy {
    /// The flag value: `deny`, `allow-same-namespace` or `allow-mesh`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deny => "deny",
            Self::AllowSameNamespace => "allow-same-namespace",
            Self::AllowMesh => "allow-mesh",
        }
    }

    /// How decisions name the default: `default:<mode>`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Deny => "default:deny",
            Self::AllowSameNamespace => "default:allow-same-namespace",
            Self::AllowMesh => "default:allow-mesh",
        }
    }

    /// Why this default denies what it denies, in plain words, of a
    /// `what` (`request`, `connection`): no policy allows it, and, for a
    /// mode that allows some callers, why this caller is not one of them.
    /// The words [`denial`](Self::denial) answers a request with, for
    /// `policy explain` to say.
    pub fn denied_because(self, what: &str) -> String {
        let caller = match self {
            Self::Deny => "",
            Self::AllowSameNamespace => ", and its caller is not of this workload's namespace",
            Self::AllowMesh => ", and its caller is not of this mesh's trust domain",
        };
        format!("no policy allows this {what}{caller}")
    }

    /// What a request this default denies is answered (after `trellis: `):
    /// its label, as a deciding policy is named, then in plain words that
    /// no policy allowed the request, and, for a mode that allows some
    /// callers, why this caller is not one of them. A default denies on the
    /// caller alone, so the mode says why.
    pub fn denial(self) -> &'static str {
        match self {
            Self::Deny => "denied by policy default:deny: no policy allows this request",
            Self::AllowSameNamespace => {
                "denied by policy default:allow-same-namespace: no policy allows this request, \
                 and its caller is not of this workload's namespace"
            }
            Self::AllowMesh => {
                "denied by policy default:allow-mesh: no policy allows this request, and its \
                 caller is not of this mesh's trust domain"
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown default policy {0:?} (expected deny, allow-same-namespace or allow-mesh)")]
pub struct UnknownDefaultPolicy(pub String);

impl FromStr for DefaultPolicy {
    type Err = UnknownDefaultPolicy;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Self::Deny, Self::AllowSameNamespace, Self::AllowMesh]
            .into_iter()
            .find(|mode| mode.as_str() == s)
            .ok_or_else(|| UnknownDefaultPolicy(s.to_owned()))
    }
}

impl fmt::Display for DefaultPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    Allow,
    Deny,
}

impl Verdict {
    /// `allow` or `deny`, for log fields and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        }
    }
}

/// One rule of one policy: `namespace/name` and the rule's index.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RuleRef {
    pub policy: Arc<str>,
    pub rule: usize,
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} rule {}", self.policy, self.rule)
    }
}

/// What made the verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    Rule(RuleRef),
    Default(DefaultPolicy),
    /// A sidecar that has no policy snapshot yet denies everything, whatever
    /// the mesh default will be: named [`NO_SNAPSHOT`].
    NoSnapshot,
}

/// How decisions name a denial by a sidecar that has no policy snapshot yet
/// ([`Reason::NoSnapshot`]): `default:` like the mesh defaults, which no
/// `namespace/name` of a policy can be.
pub const NO_SNAPSHOT: &str = "default:no-snapshot";

/// The verdict on one connection, what decided it, and the AUDIT rules that
/// would have denied it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    pub reason: Reason,
    /// The first matching rule of each AUDIT policy that matched ("would
    /// deny"), when `verdict` allows: an AUDIT rule reports what it would
    /// deny that is allowed today, so a denied decision names none.
    pub audits: Vec<RuleRef>,
}

impl Decision {
    /// `namespace/name` of the deciding policy, `default:<mode>`, or
    /// [`NO_SNAPSHOT`]: the `policy` label of `trellis_decisions_total`.
    pub fn policy_label(&self) -> &str {
        match &self.reason {
            Reason::Rule(r) => &r.policy,
            Reason::Default(mode) => mode.label(),
            Reason::NoSnapshot => NO_SNAPSHOT,
        }
    }

    /// The index of the deciding rule, if a rule decided.
    pub fn rule(&self) -> Option<usize> {
        match &self.reason {
            Reason::Rule(r) => Some(r.rule),
            Reason::Default(_) | Reason::NoSnapshot => None,
        }
    }

    pub fn is_allowed(&self) -> bool {
        self.verdict == Verdict::Allow
    }

    /// For a denial by the mesh default, why, in plain words, of a `what`
    /// (`request`, `connection`): [`DefaultPolicy::denied_because`].
    /// `None` for any other decision.
    pub fn denied_because(&self, what: &str) -> Option<String> {
        match (self.verdict, &self.reason) {
            (Verdict::Deny, Reason::Default(mode)) => Some(mode.denied_because(what)),
            _ => None,
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} by ", self.verdict.as_str())?;
        match &self.reason {
            Reason::Rule(r) => write!(f, "{r}")?,
            Reason::Default(_) | Reason::NoSnapshot => f.write_str(self.policy_label())?,
        }
        for (i, audit) in self.audits.iter().enumerate() {
            f.write_str(if i == 0 { "; would deny by " } else { ", " })?;
            write!(f, "{audit}")?;
        }
        Ok(())
    }
}

/// A [`Decision`] on one HTTP request, and for a denial what its caller
/// is answered (after `trellis: `): the text built once, when the set that
/// decided was compiled, so answering costs no allocation for it.
#[derive(Debug, Clone)]
pub enum Ruling<'a> {
    Allowed(Decision),
    /// `denied by policy NS/NAME rule N` for a rule of a DENY policy,
    /// [`DefaultPolicy::denial`] for the mesh default.
    Denied(Decision, &'a AnswerText),
}

impl<'a> Ruling<'a> {
    /// The decision, and the text of a denial (`None` when allowed).
    pub fn into_parts(self) -> (Decision, Option<&'a AnswerText>) {
        match self {
            Self::Allowed(decision) => (decision, None),
            Self::Denied(decision, text) => (decision, Some(text)),
        }
    }

    pub fn decision(&self) -> &Decision {
        match self {
            Self::Allowed(decision) | Self::Denied(decision, _) => decision,
        }
    }

    pub fn into_decision(self) -> Decision {
        self.into_parts().0
    }
}

/// A rule with L7 matches on ports the sidecar treats as opaque, and how
/// it is enforced there instead (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpaqueFallback {
    pub rule: RuleRef,
    pub action: Action,
    /// The opaque ports it has L7 matches on, sorted.
    pub ports: Vec<u16>,
    /// Whether an entry with L7 matches names no ports, so has them on
    /// every port (and `ports` are every opaque one).
    pub every_port: bool,
}

impl fmt::Display for OpaqueFallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (s, them) = if self.ports.len() == 1 {
            ("", "it")
        } else {
            ("s", "them")
        };
        let ports = (self.ports.iter())
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        if self.every_port {
            let is = if self.ports.len() == 1 { "is" } else { "are" };
            write!(
                f,
                "{} has HTTP conditions on every port (an entry names no ports), and port{s} \
                 {ports} {is} opaque on this sidecar (never parsed as HTTP); there, ",
                self.rule
            )?;
        } else {
            write!(
                f,
                "{} has HTTP conditions on port{s} {ports}, which this sidecar declares opaque \
                 (never parsed as HTTP); instead, ",
                self.rule
            )?;
        }
        f.write_str(match self.action {
            Action::Deny => "it denies every connection the rule's sources make to ",
            Action::Audit => {
                "it reports as \"would deny\" every connection the rule's sources make to "
            }
            Action::Allow => "it allows no connection to ",
        })?;
        f.write_str(them)
    }
}

/// Why a set of policies cannot be enforced (the sidecar NACKs with this).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error("policy {policy} is invalid: {}", join(.violations))]
    Invalid {
        policy: String,
        violations: Violations,
    },
    #[error("policy {0} appears more than once")]
    Duplicate(String),
}

fn join(violations: &Violations) -> String {
    let errors = violations.iter().filter(|v| v.is_error());
    let mut joined = errors
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    let more = violations.omitted().errors;
    if more > 0 {
        let s = if more == 1 { "" } else { "s" };
        joined.push_str(&format!("; and {more} more error{s}"));
    }
    joined
}

/// Whether `policy` selects the workload `id`: the control plane sends each
/// sidecar only the policies that select it. Invalid patterns select nothing.
/// To test one policy against many workloads, build a [`WorkloadSelector`].
pub fn selects(policy: &proto::Policy, id: &SpiffeId) -> bool {
    WorkloadSelector::of(policy).selects(id)
}

/// A policy's selector, parsed once, for matching many workloads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadSelector(pub(crate) Box<[IdPattern]>);

impl WorkloadSelector {
    /// The selector of `policy`; patterns that do not parse are left out
    /// (validation rejects them before a policy is stored).
    pub fn of(policy: &proto::Policy) -> Self {
        Self::of_selector(policy.selector.as_ref())
    }

    /// A selector of any document kind (a rate limit has one too).
    pub fn of_selector(selector: Option<&proto::Selector>) -> Self {
        let ids = selector.iter().flat_map(|s| &s.spiffe_ids);
        Self(ids.filter_map(|text| IdPattern::parse(text).ok()).collect())
    }

    pub fn selects(&self, id: &SpiffeId) -> bool {
        self.0.iter().any(|pattern| pattern.matches(id))
    }
}

/// A rule's place: indices into the set's policies and that policy's rules.
/// The derived order is evaluation order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct RuleId {
    policy: u32,
    rule: u32,
}

/// The rules of one action, indexed by port: only where each rule is, so
/// a rule naming many ports costs a [`RuleId`] on each.
#[derive(Debug, Default)]
struct Table {
    by_port: HashMap<u16, Vec<RuleId>>,
    any_port: Vec<RuleId>,
}

impl Table {
    fn build(policies: &[CompiledPolicy], action: Action) -> Self {
        let mut table = Self::default();
        for (p, policy) in policies.iter().enumerate() {
            if policy.action != action {
                continue;
            }
            for (r, rule) in policy.rules.iter().enumerate() {
                let id = RuleId {
                    policy: p as u32,
                    rule: r as u32,
                };
                match &rule.ports {
                    None => table.any_port.push(id),
                    Some(ports) => {
                        for port in ports {
                            table.by_port.entry(*port).or_default().push(id);
                        }
                    }
                }
            }
        }
        table
    }

    /// Matching rules for `port`, in evaluation order within each list.
    fn candidates(&self, port: u16) -> [&[RuleId]; 2] {
        let by_port = self.by_port.get(&port).map_or(&[][..], Vec::as_slice);
        [by_port, &self.any_port]
    }
}

/// The answer text of each rule of each DENY policy in `policies`
/// (`denied by policy NS/NAME rule N`), by policy and then rule; none for
/// a policy of another action.
fn deny_texts(policies: &[CompiledPolicy]) -> Box<[Box<[AnswerText]>]> {
    policies
        .iter()
        .map(|policy| match policy.action {
            Action::Deny => (0..policy.rules.len())
                .map(|r| AnswerText::new(&format!("denied by policy {} rule {r}", policy.key)))
                .collect(),
            Action::Allow | Action::Audit => Box::default(),
        })
        .collect()
}

/// The compiled policies of one workload, ready to decide connections.
#[derive(Debug)]
pub struct PolicySet {
    local: SpiffeId,
    mesh: TrustDomain,
    default: DefaultPolicy,
    policies: Vec<CompiledPolicy>,
    deny: Table,
    allow: Table,
    audit: Table,
    /// Where an ALLOW or DENY rule matches request paths (paths or gRPC).
    path_ports: PathPorts,
    /// The rules enforced failing closed on opaque ports, by rule.
    opaque_fallbacks: Vec<OpaqueFallback>,
    /// What a request each DENY rule denies is answered (`denied by
    /// policy NS/NAME rule N`), by policy and then rule, beside
    /// `policies`: built once per rule, whatever ports it names; empty
    /// for a policy of another action.
    deny_texts: Box<[Box<[AnswerText]>]>,
    /// What a request the mesh default denies is answered:
    /// [`DefaultPolicy::denial`], built once.
    default_denial: AnswerText,
}

/// The ports on which some rule matches request paths, known once per set
/// so that a request only looks its port up.
#[derive(Debug, Default)]
struct PathPorts {
    any_port: bool,
    ports: HashSet<u16>,
}

impl PathPorts {
    /// AUDIT rules are left out: a dry run never changes what a request
    /// gets, so it does not turn the refusal of such paths on either.
    fn build(policies: &[CompiledPolicy]) -> Self {
        let mut found = Self::default();
        let enforced = policies.iter().filter(|p| p.action != Action::Audit);
        for rule in enforced.flat_map(|p| &p.rules) {
            match rule.path_ports() {
                None => found.any_port = true,
                Some(ports) => found.ports.extend(ports),
            }
        }
        found
    }
}

impl PolicySet {
    /// Compiles the policies that select `local`; others are ignored. Every
    /// policy is validated first: one invalid policy fails the whole set, so
    /// a sidecar keeps its last good set and NACKs with the error.
    pub fn compile(
        local: &SpiffeId,
        policies: &[proto::Policy],
        default: DefaultPolicy,
    ) -> Result<Self, CompileError> {
        Self::compile_in(local, policies, default, &ValidationContext::default())
    }

    /// [`compile`](Self::compile), validating against `context` (the
    /// mesh's opaque ports: L7 rules on them are refused).
    pub fn compile_in(
        local: &SpiffeId,
        policies: &[proto::Policy],
        default: DefaultPolicy,
        context: &ValidationContext,
    ) -> Result<Self, CompileError> {
        Self::compile_with_opaque(local, policies, default, context, &[])
    }

    /// [`compile_in`](Self::compile_in) for a sidecar that treats `opaque`
    /// ports as opaque (its own and the mesh's): L7 matches on them fail
    /// closed (see the module docs), each rule so enforced listed in
    /// [`opaque_fallbacks`](Self::opaque_fallbacks). Entries naming ports
    /// of `context` are still refused; those naming the sidecar's own, which
    /// the control plane does not know, are not.
    pub fn compile_with_opaque(
        local: &SpiffeId,
        policies: &[proto::Policy],
        default: DefaultPolicy,
        context: &ValidationContext,
        opaque: &[u16],
    ) -> Result<Self, CompileError> {
        let mesh = local.trust_domain();
        let opaque = sorted_ports(opaque);
        let mut compiled = Vec::new();
        let mut fallbacks = Vec::new();
        for policy in policies {
            let mut policy = CompiledPolicy::compile(policy, &mesh, context)?;
            if !policy.selects(local) {
                continue;
            }
            fallbacks.extend(policy.fail_closed_on(&opaque));
            compiled.push(policy);
        }
        fallbacks.sort_by(|a, b| (&a.rule.policy, a.rule.rule).cmp(&(&b.rule.policy, b.rule.rule)));
        let mut set = Self::from_compiled(local.clone(), default, compiled)?;
        set.opaque_fallbacks = fallbacks;
        Ok(set)
    }

    pub(crate) fn from_compiled(
        local: SpiffeId,
        default: DefaultPolicy,
        mut policies: Vec<CompiledPolicy>,
    ) -> Result<Self, CompileError> {
        policies.sort_by(|a, b| a.key.cmp(&b.key));
        if let Some(pair) = policies.windows(2).find(|w| w[0].key == w[1].key) {
            return Err(CompileError::Duplicate(pair[0].key.to_string()));
        }
        Ok(Self {
            mesh: local.trust_domain(),
            local,
            default,
            deny: Table::build(&policies, Action::Deny),
            allow: Table::build(&policies, Action::Allow),
            audit: Table::build(&policies, Action::Audit),
            path_ports: PathPorts::build(&policies),
            deny_texts: deny_texts(&policies),
            policies,
            opaque_fallbacks: Vec::new(),
            default_denial: AnswerText::new(default.denial()),
        })
    }

    /// The workload this set protects.
    pub fn local(&self) -> &SpiffeId {
        &self.local
    }

    pub fn default_policy(&self) -> DefaultPolicy {
        self.default
    }

    /// `namespace/name` of each policy in force, in evaluation order.
    pub fn policy_names(&self) -> impl Iterator<Item = &str> {
        self.policies.iter().map(|p| &*p.key)
    }

    /// The verdict on a whole connection from `source` to this workload's
    /// `port` (L4). Rules with L7 matches take part only through their
    /// entries without any: see the module docs.
    pub fn decide(&self, source: &SpiffeId, port: u16) -> Decision {
        self.decide_by(source, port, |rule, _| rule.l4_matches(port))
            .into_decision()
    }

    /// The verdict on one HTTP request from `source` on `port`: every rule
    /// takes part, an entry with L7 matches only when they match `req`.
    pub fn decide_request(&self, source: &SpiffeId, port: u16, req: &HttpRequest<'_>) -> Decision {
        self.rule_request(source, port, req).into_decision()
    }

    /// [`decide_request`](Self::decide_request), with what a denied
    /// request is answered: the text this set built for the deciding DENY
    /// rule or for the mesh default.
    pub fn rule_request(&self, source: &SpiffeId, port: u16, req: &HttpRequest<'_>) -> Ruling<'_> {
        self.decide_by(source, port, |rule, action| {
            rule.request_matches(port, req, action)
        })
    }

    /// Whether a connection that `decision` (from [`decide`](Self::decide))
    /// did not allow may still carry HTTP requests that rules allow: it was
    /// not denied by a DENY rule, and an ALLOW rule naming `source` has an
    /// entry with L7 matches on `port`. Such a connection is served only as
    /// HTTP, each request decided by [`decide_request`](Self::decide_request).
    pub fn admits_requests(&self, decision: &Decision, source: &SpiffeId, port: u16) -> bool {
        decision.is_allowed() || self.admitting(decision, source, port).is_some()
    }

    /// The ALLOW rule for which [`admits_requests`](Self::admits_requests)
    /// admits a connection that `decision` did not allow: the first naming
    /// `source` with an entry with L7 matches on `port`. `None` when
    /// `decision` allows, or the connection is not admitted.
    pub fn admitting_rule(
        &self,
        decision: &Decision,
        source: &SpiffeId,
        port: u16,
    ) -> Option<RuleRef> {
        (!decision.is_allowed())
            .then(|| self.admitting(decision, source, port))
            .flatten()
            .map(|id| self.rule_ref(id))
    }

    /// [`admitting_rule`](Self::admitting_rule) for a `decision` that did
    /// not allow, without naming it.
    fn admitting(&self, decision: &Decision, source: &SpiffeId, port: u16) -> Option<RuleId> {
        let denied_by_rule = matches!(decision.reason, Reason::Rule(_));
        if denied_by_rule {
            return None;
        }
        self.first_match(&self.allow, source, port, |rule| rule.l7_may_match(port))
    }

    /// Whether an ALLOW or DENY rule in force matches the paths of requests
    /// on `port` (paths or a gRPC service): then a request path an app
    /// could read as another must be refused on it, or it would slip past
    /// the rule.
    pub fn matches_paths_on(&self, port: u16) -> bool {
        self.path_ports.any_port || self.path_ports.ports.contains(&port)
    }

    /// The rules with L7 matches on the ports this sidecar treats as
    /// opaque, enforced there failing closed, by policy and rule (see
    /// [`compile_with_opaque`](Self::compile_with_opaque)).
    pub fn opaque_fallbacks(&self) -> &[OpaqueFallback] {
        &self.opaque_fallbacks
    }

    /// What the policies in force, stored before a check got stricter,
    /// fail of it and how each is enforced instead, with the policy's
    /// `namespace/name` (see [`ValidationContext::stored`]).
    pub fn relaxed(&self) -> impl Iterator<Item = (&str, &Violation)> {
        self.policies
            .iter()
            .flat_map(|p| p.relaxed.iter().map(|v| (&*p.key, v)))
    }

    /// The verdict on a connection from `source` on `port` that is not
    /// HTTP, when a DENY rule naming `source` has HTTP conditions on
    /// `port`: such a connection's requests cannot be held to them, so
    /// the rule denies it whole (fails closed) rather than letting it
    /// through as bytes. `None` when no such rule applies, and the
    /// connection's L4 decision stands. Without this, a request line an
    /// app accepts but detection does not take for HTTP (`HTTP/1.2`, two
    /// spaces, a tab) would reach the app past the DENY rule.
    pub fn denies_unless_http(&self, source: &SpiffeId, port: u16) -> Option<Decision> {
        let id = self.first_match(&self.deny, source, port, |rule| rule.l7_may_match(port))?;
        Some(Decision {
            verdict: Verdict::Deny,
            reason: Reason::Rule(self.rule_ref(id)),
            audits: Vec::new(),
        })
    }

    /// The AUDIT policies that would deny a connection from `source` on
    /// `port` that is not HTTP: the dry run of
    /// [`denies_unless_http`](Self::denies_unless_http), the first rule of
    /// each AUDIT policy naming `source` with HTTP conditions on `port`.
    pub fn audits_unless_http(&self, source: &SpiffeId, port: u16) -> Vec<RuleRef> {
        self.audits(source, port, |rule| rule.l7_may_match(port))
    }

    /// The AUDIT policies that may report the HTTP requests from `source`
    /// on `port` as "would deny": the first rule of each AUDIT policy
    /// naming `source` that matches `port` whole or has HTTP conditions
    /// there. For a connection [`admits_requests`](Self::admits_requests)
    /// admits for HTTP only, whose denied decision names no audits while
    /// the requests rules allow report theirs.
    pub fn audits_of_requests(&self, source: &SpiffeId, port: u16) -> Vec<RuleRef> {
        self.audits(source, port, |rule| {
            rule.l4_matches(port) || rule.l7_may_match(port)
        })
    }

    /// The verdict by the rules `matches`, which is told the action of the
    /// rule it is asked about (see [`L7Match`](super::l7::L7Match) for why
    /// a header condition needs it).
    fn decide_by(
        &self,
        source: &SpiffeId,
        port: u16,
        matches: impl Fn(&CompiledRule, Action) -> bool + Copy,
    ) -> Ruling<'_> {
        let as_rule_of = |action| move |rule: &CompiledRule| matches(rule, action);
        let denied = |reason, text| {
            // Denied anyway: nothing for a dry run of a DENY to report.
            let decision = Decision {
                verdict: Verdict::Deny,
                reason,
                audits: Vec::new(),
            };
            Ruling::Denied(decision, text)
        };
        if let Some(id) = self.first_match(&self.deny, source, port, as_rule_of(Action::Deny)) {
            return denied(Reason::Rule(self.rule_ref(id)), self.deny_text(id));
        }
        let reason = match self.first_match(&self.allow, source, port, as_rule_of(Action::Allow)) {
            Some(id) => Reason::Rule(self.rule_ref(id)),
            None if self.default_verdict(source) == Verdict::Deny => {
                return denied(Reason::Default(self.default), &self.default_denial);
            }
            None => Reason::Default(self.default),
        };
        Ruling::Allowed(Decision {
            verdict: Verdict::Allow,
            reason,
            audits: self.audits(source, port, as_rule_of(Action::Audit)),
        })
    }

    fn rule(&self, id: RuleId) -> &CompiledRule {
        &self.policies[id.policy as usize].rules[id.rule as usize]
    }

    /// What a request the DENY rule `id` denies is answered.
    fn deny_text(&self, id: RuleId) -> &AnswerText {
        &self.deny_texts[id.policy as usize][id.rule as usize]
    }

    fn rule_ref(&self, id: RuleId) -> RuleRef {
        RuleRef {
            policy: self.policies[id.policy as usize].key.clone(),
            rule: id.rule as usize,
        }
    }

    fn source_matches(&self, id: RuleId, source: &SpiffeId) -> bool {
        let rule = &self.policies[id.policy as usize].rules[id.rule as usize];
        rule.source_match(source, &self.mesh).is_some()
    }

    /// The first rule of `table`, in evaluation order, that `matches` and
    /// names `source`.
    fn first_match(
        &self,
        table: &Table,
        source: &SpiffeId,
        port: u16,
        matches: impl Fn(&CompiledRule) -> bool + Copy,
    ) -> Option<RuleId> {
        table
            .candidates(port)
            .into_iter()
            .filter_map(|ids| {
                ids.iter()
                    .copied()
                    .find(|&id| matches(self.rule(id)) && self.source_matches(id, source))
            })
            .min()
    }

    /// The first matching rule of each AUDIT policy; allocates only on a match.
    fn audits(
        &self,
        source: &SpiffeId,
        port: u16,
        matches: impl Fn(&CompiledRule) -> bool + Copy,
    ) -> Vec<RuleRef> {
        let mut matched: Vec<RuleId> = Vec::new();
        for ids in self.audit.candidates(port) {
            for &id in ids {
                if matches(self.rule(id)) && self.source_matches(id, source) {
                    matched.push(id);
                }
            }
        }
        matched.sort_unstable();
        matched.dedup_by_key(|id| id.policy);
        matched.into_iter().map(|id| self.rule_ref(id)).collect()
    }

    fn default_verdict(&self, source: &SpiffeId) -> Verdict {
        let allowed = match self.default {
            DefaultPolicy::Deny => false,
            DefaultPolicy::AllowMesh => source.is_member_of(&self.mesh),
            DefaultPolicy::AllowSameNamespace => {
                source.is_member_of(&self.mesh)
                    && source.namespace().is_some()
                    && source.namespace() == self.local.namespace()
            }
        };
        if allowed {
            Verdict::Allow
        } else {
            Verdict::Deny
        }
    }

    pub(crate) fn mesh(&self) -> &TrustDomain {
        &self.mesh
    }
}

#[cfg(test)]
mod tests {
    use super::super::rules::{CompiledDestination, SourceMatch};
    use super::*;

    /// `policy explain` says why the mesh default denied in the words
    /// the sidecar answers a request it denies with.
    #[test]
    fn a_default_denial_is_explained_in_the_sidecar_s_words() {
        for mode in [
            DefaultPolicy::Deny,
            DefaultPolicy::AllowSameNamespace,
            DefaultPolicy::AllowMesh,
        ] {
            let why = mode.denied_because("request");
            assert_eq!(
                mode.denial(),
                format!("denied by policy {}: {why}", mode.label())
            );
        }
    }

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn rule(ports: Option<&[u16]>) -> CompiledRule {
        CompiledRule {
            sources: Box::new([]),
            ports: ports.map(Box::from),
            to: ports
                .map(|p| {
                    Box::from([CompiledDestination {
                        ports: Some(Box::from(p)),
                        except: Box::new([]),
                        l7: None,
                    }])
                })
                .unwrap_or_default(),
        }
    }

    fn policy(key: &str, action: Action, rules: Vec<CompiledRule>) -> CompiledPolicy {
        CompiledPolicy {
            key: key.into(),
            action,
            selector: WorkloadSelector(Box::new([IdPattern::parse("spiffe://td/*").unwrap()])),
            rules: rules.into_boxed_slice(),
            relaxed: Box::new([]),
        }
    }

    #[test]
    fn the_earliest_rule_wins_across_the_port_index() {
        let policies = vec![
            policy("a/p", Action::Allow, vec![rule(Some(&[80])), rule(None)]),
            policy("b/q", Action::Allow, vec![rule(None), rule(Some(&[443]))]),
        ];
        let set =
            PolicySet::from_compiled(id("spiffe://td/ns/a/sa/x"), DefaultPolicy::Deny, policies)
                .unwrap();
        let source = id("spiffe://td/ns/b/sa/y");
        assert_eq!(set.decide(&source, 80).to_string(), "allow by a/p rule 0");
        assert_eq!(set.decide(&source, 443).to_string(), "allow by a/p rule 1");
    }

    /// A denied request comes with what its caller is answered, built
    /// with the set: the deciding DENY rule's text, the same bytes on
    /// every port the rule names, or the mesh default's; an allowed one
    /// comes with none.
    #[test]
    fn a_denied_request_comes_with_the_text_built_for_what_denied_it() {
        let policies = vec![
            policy(
                "a/deny",
                Action::Deny,
                vec![rule(Some(&[80, 443])), rule(Some(&[8080]))],
            ),
            policy("b/allow", Action::Allow, vec![rule(Some(&[9090]))]),
        ];
        let set =
            PolicySet::from_compiled(id("spiffe://td/ns/a/sa/x"), DefaultPolicy::Deny, policies)
                .unwrap();
        let source = id("spiffe://td/ns/b/sa/y");
        let request = HttpRequest {
            method: "GET",
            path: "/",
            headers: &http::HeaderMap::new(),
        };
        let denial = |port| match set.rule_request(&source, port, &request) {
            Ruling::Denied(decision, text) => (decision.to_string(), text),
            Ruling::Allowed(decision) => panic!("port {port}: {decision}"),
        };
        let body = |text: &AnswerText| String::from_utf8(text.body().to_vec()).unwrap();
        let (on_80, on_443) = (denial(80), denial(443));
        assert_eq!(on_80.0, "deny by a/deny rule 0");
        assert_eq!(body(on_80.1), "trellis: denied by policy a/deny rule 0\n");
        assert_eq!(
            on_80.1.body().as_ptr(),
            on_443.1.body().as_ptr(),
            "a text built per port"
        );
        let on_8080 = denial(8080);
        assert_eq!(on_8080.0, "deny by a/deny rule 1");
        assert_eq!(body(on_8080.1), "trellis: denied by policy a/deny rule 1\n");
        assert_eq!(
            on_8080.1.grpc_message().unwrap(),
            "trellis: denied by policy a/deny rule 1"
        );
        let by_default = denial(1234);
        assert_eq!(by_default.0, "deny by default:deny");
        assert_eq!(
            body(by_default.1),
            format!("trellis: {}\n", DefaultPolicy::Deny.denial())
        );
        let allowed = set.rule_request(&source, 9090, &request);
        assert!(matches!(allowed, Ruling::Allowed(_)), "{allowed:?}");
    }

    /// A DENY rule's answer text is kept once, beside the rules: the
    /// port index holds only where each rule is, however many ports the
    /// rule names, and a request it denies on any of them is answered
    /// from that one text.
    #[test]
    fn a_deny_rule_naming_many_ports_keeps_one_text() {
        let ports: Vec<u16> = (8000..8064).collect();
        let policies = vec![policy(
            "a/deny",
            Action::Deny,
            vec![rule(Some(&ports)), rule(None)],
        )];
        let set =
            PolicySet::from_compiled(id("spiffe://td/ns/a/sa/x"), DefaultPolicy::Deny, policies)
                .unwrap();
        for (port, entries) in &set.deny.by_port {
            for entry in entries {
                assert_eq!(
                    std::mem::size_of_val(entry),
                    std::mem::size_of::<RuleId>(),
                    "the index entry on port {port} holds more than the rule's place"
                );
            }
        }
        assert_eq!(
            std::mem::size_of_val(&set.deny.any_port[0]),
            std::mem::size_of::<RuleId>(),
            "the index entry for any port holds more than the rule's place"
        );
        let source = id("spiffe://td/ns/b/sa/y");
        let request = HttpRequest {
            method: "GET",
            path: "/",
            headers: &http::HeaderMap::new(),
        };
        let text = |port| match set.rule_request(&source, port, &request) {
            Ruling::Denied(_, text) => text,
            Ruling::Allowed(decision) => panic!("port {port}: {decision}"),
        };
        let first = text(ports[0]);
        assert_eq!(
            &first.body()[..],
            b"trellis: denied by policy a/deny rule 0\n"
        );
        for &port in &ports[1..] {
            assert!(
                std::ptr::eq(first, text(port)),
                "port {port} has a text of its own"
            );
        }
        let any = text(9000);
        assert_eq!(
            &any.body()[..],
            b"trellis: denied by policy a/deny rule 1\n"
        );
    }

    #[test]
    fn names_sources_as_written() {
        let ns = SourceMatch::Namespace("/ns/monitoring/".into());
        assert_eq!(ns.to_string(), "namespace monitoring");
        let td = TrustDomain::new("td").unwrap();
        assert!(ns.matches(&id("spiffe://td/ns/monitoring/sa/p"), &td));
        assert!(!ns.matches(&id("spiffe://other/ns/monitoring/sa/p"), &td));
    }

    #[test]
    fn parses_default_policy_flags() {
        assert_eq!("allow-mesh".parse(), Ok(DefaultPolicy::AllowMesh));
        assert_eq!(
            "open".parse::<DefaultPolicy>().unwrap_err().to_string(),
            "unknown default policy \"open\" (expected deny, allow-same-namespace or allow-mesh)"
        );
        assert_eq!(DefaultPolicy::default().label(), "default:deny");
    }
}
