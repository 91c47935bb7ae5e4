//! Why a connection would be allowed or denied, for `trellisctl policy
//! explain` and the Admin API's Explain.
//!
//! This module owns the account of a decision: every policy considered,
//! whether it selects the destination, each of its rules and why it matched
//! or not, and the decision itself, which comes from the very engine the
//! sidecars run ([`PolicySet::decide`]). It never decides on its own.

use std::fmt;
use std::sync::Arc;

use trellis_proto::policy::v1 as proto;

use super::document::Action;
use super::engine::{
    CompileError, CompiledPolicy, CompiledRule, Decision, DefaultPolicy, OpaqueFallback, PolicySet,
    Reason, RuleRef,
};
use super::validate::{SelectorScope, ValidationContext};
use crate::spiffe::{SpiffeId, TrustDomain};

/// The account of one decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    pub source: SpiffeId,
    pub destination: SpiffeId,
    pub port: u16,
    /// Every policy given, ordered by `namespace/name`.
    pub policies: Vec<PolicyTrace>,
    pub decision: Decision,
    /// Where `port` being opaque comes from; `None` when it is not.
    pub opaque: Option<OpaqueOrigin>,
}

/// A destination's opaque ports (never parsed as HTTP), by where each
/// comes from: the explanation says which made the explained port opaque.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpaquePorts {
    /// The mesh's, which every sidecar holds opaque.
    pub mesh: Vec<u16>,
    /// Each connected sidecar of the destination's identity: the ports it
    /// declares opaque itself (empty for one that declares none).
    pub sidecars: Vec<Vec<u16>>,
    /// Named by whoever asks (a sidecar not connected now).
    pub requested: Vec<u16>,
}

impl OpaquePorts {
    /// Only the mesh's `ports`.
    pub fn mesh_wide(ports: &[u16]) -> Self {
        Self {
            mesh: ports.to_vec(),
            ..Self::default()
        }
    }

    /// Every port opaque for the destination from any origin, sorted.
    pub fn all(&self) -> Vec<u16> {
        let all: Vec<u16> = (self.mesh.iter())
            .chain(self.sidecars.iter().flatten())
            .chain(&self.requested)
            .copied()
            .collect();
        super::rules::sorted_ports(&all)
    }

    /// Where `port` being opaque comes from, if it is.
    pub fn origin(&self, port: u16) -> Option<OpaqueOrigin> {
        let declaring = self.sidecars.iter().filter(|s| s.contains(&port)).count();
        let origin = OpaqueOrigin {
            mesh: self.mesh.contains(&port),
            declaring_sidecars: u32::try_from(declaring).unwrap_or(u32::MAX),
            connected_sidecars: u32::try_from(self.sidecars.len()).unwrap_or(u32::MAX),
            requested: self.requested.contains(&port),
        };
        (origin.mesh || origin.declaring_sidecars > 0 || origin.requested).then_some(origin)
    }
}

/// Why a port is opaque for a destination; any number of these may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpaqueOrigin {
    /// One of the mesh's opaque ports.
    pub mesh: bool,
    /// How many of the destination's connected sidecars declare it opaque
    /// themselves, of how many are connected.
    pub declaring_sidecars: u32,
    pub connected_sidecars: u32,
    /// Named by whoever asks.
    pub requested: bool,
}

impl fmt::Display for OpaqueOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut origins = Vec::new();
        if self.mesh {
            origins.push("mesh-wide (the control plane's --opaque-ports)".to_owned());
        }
        let (declaring, connected) = (self.declaring_sidecars, self.connected_sidecars);
        if declaring > 0 {
            origins.push(match (declaring, connected) {
                (1, 1) => "declared by the destination's sidecar (its --opaque-ports)".to_owned(),
                _ if declaring == connected => format!(
                    "declared by all {connected} of the destination's connected sidecars \
                     (their --opaque-ports)"
                ),
                // Mesh-wide, it is opaque on every sidecar anyway.
                _ if self.mesh => format!(
                    "declared by {declaring} of the destination's {connected} connected sidecars"
                ),
                _ => format!(
                    "declared by only {declaring} of the destination's {connected} connected \
                     sidecars (their --opaque-ports): the sidecars disagree, the other {} \
                     parse it as HTTP and may decide otherwise",
                    connected - declaring
                ),
            });
        }
        if self.requested {
            origins.push("named in the request".to_owned());
        }
        write!(f, "{}", origins.join("; "))
    }
}

/// One policy and how it took part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyTrace {
    pub policy: Arc<str>,
    pub action: Action,
    /// Whether it selects the destination; rules are listed only if it does.
    pub selected: bool,
    pub rules: Vec<RuleTrace>,
}

/// One rule, whether it matched, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleTrace {
    pub index: usize,
    pub matched: bool,
    pub why: String,
    /// Its source and port match, and its L7 matches on the port are
    /// checked on each HTTP request: it neither matches nor misses the
    /// connection as a whole (`matched` is false).
    pub per_request: bool,
}

impl Explanation {
    /// The rule that decided, or `None` when the mesh default did.
    pub fn deciding_rule(&self) -> Option<&RuleRef> {
        match &self.decision.reason {
            Reason::Rule(r) => Some(r),
            Reason::Default(_) => None,
        }
    }
}

/// Explains the decision on a connection from `source` to `destination` on
/// `port`, given every policy of the mesh (those not selecting the
/// destination are listed as such) and the destination's `opaque` ports
/// (never parsed as HTTP, where L7 matches fail closed as the sidecars
/// enforce them: see [`PolicySet::compile_with_opaque`]), every origin's
/// together.
pub fn explain(
    source: &SpiffeId,
    destination: &SpiffeId,
    port: u16,
    policies: &[proto::Policy],
    default: DefaultPolicy,
    opaque: &OpaquePorts,
) -> Result<Explanation, CompileError> {
    let origin = opaque.origin(port);
    // Sorted, without duplicates, as `fail_closed_on` takes them.
    let opaque = opaque.all();
    let opaque = opaque.as_slice();
    let mesh = destination.trust_domain();
    // The mesh's policies are stored ones, compiled as the sidecars compile
    // them: one stored before a check got stricter is enforced as far as
    // it can be, and must not make every explanation fail. Like a sidecar,
    // it enforces whatever the control plane serves, whoever may select.
    let stored = ValidationContext {
        stored: true,
        scope: SelectorScope::Unchecked,
        ..ValidationContext::default()
    };
    let mut compiled = policies
        .iter()
        .map(|p| CompiledPolicy::compile(p, &mesh, &stored))
        .collect::<Result<Vec<_>, _>>()?;
    compiled.sort_by(|a, b| a.key.cmp(&b.key));
    let traces = (compiled.iter_mut())
        .map(|policy| {
            let fallbacks = policy.fail_closed_on(opaque);
            trace_policy(policy, &fallbacks, source, destination, port, &mesh)
        })
        .collect();
    let selected = compiled
        .into_iter()
        .filter(|p| p.selects(destination))
        .collect();
    let set = PolicySet::from_compiled(destination.clone(), default, selected)?;
    debug_assert_eq!(set.mesh(), &mesh);
    Ok(Explanation {
        source: source.clone(),
        destination: destination.clone(),
        port,
        policies: traces,
        decision: set.decide(source, port),
        opaque: origin,
    })
}

/// `fallbacks`: the policy's rules that fail closed on opaque ports.
fn trace_policy(
    policy: &CompiledPolicy,
    fallbacks: &[OpaqueFallback],
    source: &SpiffeId,
    destination: &SpiffeId,
    port: u16,
    mesh: &TrustDomain,
) -> PolicyTrace {
    let selected = policy.selects(destination);
    let rules = if selected {
        let rules = policy.rules.iter().enumerate();
        rules
            .map(|(index, rule)| {
                // Its L7 matches cannot be checked on this port.
                let opaque_here =
                    (fallbacks.iter()).any(|f| f.rule.rule == index && f.ports.contains(&port));
                let opaque_here = opaque_here.then_some(policy.action);
                trace_rule(index, rule, opaque_here, source, port, mesh)
            })
            .collect()
    } else {
        Vec::new()
    };
    PolicyTrace {
        policy: policy.key.clone(),
        action: policy.action,
        selected,
        rules,
    }
}

/// `opaque_here`: the action of the rule's policy if `port` is opaque and
/// the rule has L7 matches on it, which fail closed there.
fn trace_rule(
    index: usize,
    rule: &CompiledRule,
    opaque_here: Option<Action>,
    source: &SpiffeId,
    port: u16,
    mesh: &TrustDomain,
) -> RuleTrace {
    let source_match = rule.source_match(source, mesh);
    let from = match source_match {
        Some(None) => "any source".to_owned(),
        Some(Some(matched)) => format!("source matches {matched}"),
        None => {
            let names: Vec<String> = rule.sources.iter().map(ToString::to_string).collect();
            format!("no source matches (rule names {})", names.join(", "))
        }
    };
    let to = match (&rule.ports, opaque_here) {
        (_, Some(action)) => {
            let instead = match action {
                Action::Deny => "so the rule denies the whole connection",
                Action::Audit => "so the rule would deny the whole connection (AUDIT)",
                Action::Allow => "so they allow nothing there",
            };
            format!(
                "port {port} is opaque (never parsed as HTTP): the rule's HTTP conditions cannot \
                 be matched there, {instead}"
            )
        }
        (None, None) if !rule.l4_matches(port) && rule.l7_may_match(port) => {
            "any port, with L7 matches".to_owned()
        }
        (None, None) => "any port".to_owned(),
        (Some(_), None) if rule.port_matches(port) && !rule.l4_matches(port) => {
            format!("port {port} is listed with L7 matches")
        }
        (Some(_), None) if rule.port_matches(port) => format!("port {port} is listed"),
        (Some(ports), None) => format!("port {port} is not in {ports:?}"),
    };
    let l4 = rule.l4_matches(port);
    RuleTrace {
        index,
        matched: source_match.is_some() && l4,
        why: format!("{from}; {to}"),
        // On an opaque port, L7 matches were turned into whole-connection
        // ones (DENY, AUDIT) or left off (ALLOW): none are left there.
        per_request: source_match.is_some() && !l4 && rule.l7_may_match(port),
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} -> {} port {}: {}",
            self.source, self.destination, self.port, self.decision
        )?;
        if let Some(origin) = &self.opaque {
            writeln!(
                f,
                "  port {} is opaque (never parsed as HTTP): {origin}",
                self.port
            )?;
        }
        if self.policies.is_empty() {
            writeln!(f, "  no policies")?;
        }
        for policy in &self.policies {
            let selects = if policy.selected {
                "selects"
            } else {
                "does not select"
            };
            writeln!(
                f,
                "  {} ({}): {selects} the destination",
                policy.policy,
                policy.action.as_str()
            )?;
            for rule in &policy.rules {
                let verdict = if rule.matched {
                    "matches"
                } else if rule.per_request {
                    "decided per HTTP request"
                } else {
                    "does not match"
                };
                writeln!(f, "    rule {}: {verdict}: {}", rule.index, rule.why)?;
            }
        }
        match &self.decision.reason {
            Reason::Rule(r) => writeln!(f, "decided by {r}"),
            Reason::Default(mode) => writeln!(f, "no rule decided: mesh default {}", mode.as_str()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::load_source;

    /// A policy stored before a path that can never match was refused
    /// (`/%7Euser/*`) is explained as the sidecars enforce it, for every
    /// destination, not refused as a whole.
    #[test]
    fn a_stored_policy_that_newer_checks_refuse_is_explained() {
        let td = TrustDomain::new("td").unwrap();
        let yaml = "apiVersion: trellis.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-home, namespace: b}
spec:
  selector: {spiffeIds: [\"spiffe://td/ns/b/sa/api\"]}
  action: DENY
  rules:
    - to: [{paths: [\"/placeholder\"]}]
";
        let loaded = load_source("p.yaml", yaml, &td);
        assert!(!loaded.has_errors(), "{:?}", loaded.diagnostics);
        let mut policy = loaded.policies[0].policy.to_proto();
        policy.rules[0].to[0].paths[0] = "/%7Euser/*".into();
        let web = SpiffeId::parse("spiffe://td/ns/a/sa/web").unwrap();
        for destination in ["spiffe://td/ns/b/sa/api", "spiffe://td/ns/c/sa/db"] {
            let destination = SpiffeId::parse(destination).unwrap();
            let explained = explain(
                &web,
                &destination,
                80,
                &[policy.clone()],
                DefaultPolicy::AllowMesh,
                &OpaquePorts::default(),
            )
            .unwrap_or_else(|e| panic!("{destination}: {e}"));
            assert!(explained.decision.is_allowed(), "{destination}");
        }
    }
}
