//! Between policy documents and their protobuf form
//! (`trellis_proto::policy::v1::Policy`), which the control plane stores and
//! pushes to sidecars.
//!
//! A valid document always converts; a protobuf policy converts back to a
//! document for printing (`trellisctl policy get`) and for validation, so a
//! policy arriving at a sidecar is checked by exactly the rules that checked
//! it at the Admin API, and rejected with the same messages. An empty list in
//! the protobuf is an absent list in the document: the meanings agree.
//!
//! It also carries [`Violation`]s and [`Explanation`]s over the Admin API,
//! so `trellisctl` prints exactly what the library would have printed.

use trellis_proto::policy::v1 as proto;

use std::sync::Arc;

use super::document::{
    API_VERSION, Action, AuthorizationPolicy, AuthorizationPolicySpec, Destination, GrpcMatch,
    Metadata, Rule, Selector, Source,
};
use super::engine::{Decision, DefaultPolicy, Reason, RuleRef, Verdict};
use super::explain::{
    Explanation, OpaqueOrigin, PerRequest, PolicyTrace, RequestAnswer, RequestOutcome, RuleTrace,
};
use super::path::FieldPath;
use super::validate::{
    Severity, ValidPolicy, ValidationContext, Violation, Violations, validate_in,
};
use crate::spiffe::{SpiffeId, TrustDomain};

impl From<Action> for proto::Action {
    fn from(action: Action) -> Self {
        match action {
            Action::Allow => proto::Action::Allow,
            Action::Deny => proto::Action::Deny,
            Action::Audit => proto::Action::Audit,
        }
    }
}

impl ValidPolicy {
    /// The protobuf form, at revision 0: the store sets revisions.
    pub fn to_proto(&self) -> proto::Policy {
        let policy = self.policy();
        proto::Policy {
            name: policy.metadata.name.clone(),
            namespace: policy.metadata.namespace.clone(),
            revision: 0,
            selector: Some(proto::Selector {
                spiffe_ids: policy.spec.selector.spiffe_ids.clone(),
            }),
            action: proto::Action::from(policy.spec.action).into(),
            rules: policy.spec.rules.iter().map(rule_to_proto).collect(),
        }
    }
}

fn rule_to_proto(rule: &Rule) -> proto::Rule {
    proto::Rule {
        from: rule
            .from
            .iter()
            .flatten()
            .filter_map(source_to_proto)
            .collect(),
        to: rule
            .to
            .iter()
            .flatten()
            .map(|d| proto::Destination {
                // A valid policy holds only ports in 1..=65535.
                ports: d.ports.iter().flatten().map(|&p| p as u32).collect(),
                methods: d.methods.clone().unwrap_or_default(),
                paths: d.paths.clone().unwrap_or_default(),
                headers: d
                    .headers
                    .iter()
                    .flatten()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                grpc: d.grpc.as_ref().map(|g| proto::GrpcMatch {
                    service: g.service.clone(),
                    method: g.method.clone().unwrap_or_default(),
                }),
            })
            .collect(),
    }
}

fn source_to_proto(source: &Source) -> Option<proto::Source> {
    use proto::source::Match;
    let matched = match source {
        Source {
            spiffe_id: Some(id),
            ..
        } => Match::SpiffeId(id.clone()),
        Source {
            namespace: Some(ns),
            ..
        } => Match::Namespace(ns.clone()),
        Source {
            trust_domain: Some(td),
            ..
        } => Match::TrustDomain(td.clone()),
        _ => return None,
    };
    Some(proto::Source {
        r#match: Some(matched),
    })
}

/// The document a protobuf policy stands for. Fails only on an action the
/// document cannot express (unspecified or unknown).
pub fn document_from_proto(policy: &proto::Policy) -> Result<AuthorizationPolicy, Violation> {
    let Some(action) = action_from_proto(policy.action) else {
        return Err(Violation::error(
            FieldPath::root().field("spec").field("action"),
            format!("action {} is not one of ALLOW, DENY, AUDIT", policy.action),
        ));
    };
    Ok(AuthorizationPolicy {
        api_version: API_VERSION.to_owned(),
        kind: AuthorizationPolicy::KIND.to_owned(),
        metadata: Metadata {
            name: policy.name.clone(),
            namespace: policy.namespace.clone(),
        },
        spec: AuthorizationPolicySpec {
            selector: Selector {
                spiffe_ids: policy
                    .selector
                    .as_ref()
                    .map(|s| s.spiffe_ids.clone())
                    .unwrap_or_default(),
            },
            action,
            rules: policy.rules.iter().map(rule_from_proto).collect(),
        },
    })
}

fn action_from_proto(action: i32) -> Option<Action> {
    match proto::Action::try_from(action) {
        Ok(proto::Action::Allow) => Some(Action::Allow),
        Ok(proto::Action::Deny) => Some(Action::Deny),
        Ok(proto::Action::Audit) => Some(Action::Audit),
        Ok(proto::Action::Unspecified) | Err(_) => None,
    }
}

fn rule_from_proto(rule: &proto::Rule) -> Rule {
    use proto::source::Match;
    let from = rule
        .from
        .iter()
        .map(|s| match &s.r#match {
            Some(Match::SpiffeId(id)) => Source {
                spiffe_id: Some(id.clone()),
                ..Source::default()
            },
            Some(Match::Namespace(ns)) => Source {
                namespace: Some(ns.clone()),
                ..Source::default()
            },
            Some(Match::TrustDomain(td)) => Source {
                trust_domain: Some(td.clone()),
                ..Source::default()
            },
            // Rejected by validation: a source must name something.
            None => Source::default(),
        })
        .collect::<Vec<_>>();
    let to = rule
        .to
        .iter()
        .map(|d| Destination {
            ports: (!d.ports.is_empty()).then(|| d.ports.iter().map(|&p| i64::from(p)).collect()),
            methods: (!d.methods.is_empty()).then(|| d.methods.clone()),
            paths: (!d.paths.is_empty()).then(|| d.paths.clone()),
            headers: (!d.headers.is_empty()).then(|| {
                d.headers
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            }),
            grpc: d.grpc.as_ref().map(|g| GrpcMatch {
                service: g.service.clone(),
                method: (!g.method.is_empty()).then(|| g.method.clone()),
            }),
        })
        .collect::<Vec<_>>();
    Rule {
        from: (!from.is_empty()).then_some(from),
        to: (!to.is_empty()).then_some(to),
    }
}

/// Validates a protobuf policy, e.g. one pushed to a sidecar, with the same
/// rules and messages as a document.
pub fn validate_proto(policy: &proto::Policy, td: &TrustDomain) -> Result<ValidPolicy, Violations> {
    validate_proto_in(policy, td, &ValidationContext::default())
}

/// [`validate_proto`], knowing the opaque ports of `context`.
pub fn validate_proto_in(
    policy: &proto::Policy,
    td: &TrustDomain,
    context: &ValidationContext,
) -> Result<ValidPolicy, Violations> {
    validate_in(
        &document_from_proto(policy).map_err(Violations::from)?,
        td,
        context,
    )
}

impl Violation {
    pub fn to_proto(&self) -> proto::Violation {
        proto::Violation {
            path: self.path.to_string(),
            message: self.message.clone(),
            warning: self.severity == Severity::Warning,
        }
    }

    pub fn from_proto(v: &proto::Violation) -> Self {
        let path = FieldPath::parse(&v.path);
        if v.warning {
            Self::warning(path, v.message.clone())
        } else {
            Self::error(path, v.message.clone())
        }
    }
}

impl RuleRef {
    fn to_proto(&self) -> proto::RuleRef {
        proto::RuleRef {
            policy: self.policy.to_string(),
            rule: self.rule as u32,
        }
    }

    fn from_proto(r: &proto::RuleRef) -> Self {
        Self {
            policy: r.policy.as_str().into(),
            rule: r.rule as usize,
        }
    }
}

/// Why a protobuf explanation cannot be read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid explanation: {0}")]
pub struct InvalidExplanation(String);

impl Explanation {
    /// The Admin API's answer to Explain.
    pub fn to_proto(&self) -> proto::Explanation {
        let decision = &self.decision;
        let (deciding_rule, default) = match &decision.reason {
            Reason::Rule(r) => (Some(r.to_proto()), None),
            Reason::Default(mode) => (None, Some(*mode)),
            // The control plane always has its policies.
            Reason::NoSnapshot => (None, None),
        };
        proto::Explanation {
            source: self.source.to_string(),
            destination: self.destination.to_string(),
            port: self.port.into(),
            verdict: decision.verdict.as_str().to_owned(),
            deciding_rule,
            default_policy: default.map(|m| m.as_str().to_owned()).unwrap_or_default(),
            audits: decision.audits.iter().map(RuleRef::to_proto).collect(),
            policies: self.policies.iter().map(trace_to_proto).collect(),
            opaque: self.opaque.map(|o| proto::OpaquePortOrigin {
                mesh: o.mesh,
                declaring_sidecars: o.declaring_sidecars,
                connected_sidecars: o.connected_sidecars,
                requested: o.requested,
            }),
            per_request: self.per_request.as_ref().map(|p| proto::PerRequestRules {
                allowed_by: p.allowed_by.as_ref().map(RuleRef::to_proto),
                denied_by: p.denied_by().map(RuleRef::to_proto),
                audited_by: p.audited_by.iter().map(RuleRef::to_proto).collect(),
            }),
            request: self.request.as_ref().map(request_to_proto),
        }
    }

    /// Reads an Admin API answer, to print it as the library does.
    pub fn from_proto(e: &proto::Explanation) -> Result<Self, InvalidExplanation> {
        let bad = |what: &str| InvalidExplanation(what.to_owned());
        let id = |s: &str| SpiffeId::parse(s).map_err(|err| bad(&format!("{s:?}: {err}")));
        let verdict = match e.verdict.as_str() {
            "allow" => Verdict::Allow,
            "deny" => Verdict::Deny,
            other => return Err(bad(&format!("verdict {other:?}"))),
        };
        let reason = match &e.deciding_rule {
            Some(r) => Reason::Rule(RuleRef::from_proto(r)),
            None => Reason::Default(
                e.default_policy
                    .parse::<DefaultPolicy>()
                    .map_err(|err| bad(&err.to_string()))?,
            ),
        };
        let policies = e
            .policies
            .iter()
            .map(trace_from_proto)
            .collect::<Result<_, _>>()?;
        Ok(Self {
            source: id(&e.source)?,
            destination: id(&e.destination)?,
            port: u16::try_from(e.port).map_err(|_| bad(&format!("port {}", e.port)))?,
            policies,
            decision: Decision {
                verdict,
                reason,
                audits: e.audits.iter().map(RuleRef::from_proto).collect(),
            },
            opaque: e.opaque.as_ref().map(|o| OpaqueOrigin {
                mesh: o.mesh,
                declaring_sidecars: o.declaring_sidecars,
                connected_sidecars: o.connected_sidecars,
                requested: o.requested,
            }),
            // The answer carries the DENY rule of the verdict on a
            // connection that is not HTTP: `PolicySet::denies_unless_http`
            // denies by it, naming no audits.
            per_request: e.per_request.as_ref().map(|p| PerRequest {
                allowed_by: p.allowed_by.as_ref().map(RuleRef::from_proto),
                denied: p.denied_by.as_ref().map(|rule| Decision {
                    verdict: Verdict::Deny,
                    reason: Reason::Rule(RuleRef::from_proto(rule)),
                    audits: Vec::new(),
                }),
                audited_by: p.audited_by.iter().map(RuleRef::from_proto).collect(),
            }),
            request: e.request.as_ref().map(request_from_proto).transpose()?,
        })
    }
}

fn request_to_proto(r: &RequestAnswer) -> proto::RequestAnswer {
    let mut answer = proto::RequestAnswer {
        method: r.method.clone(),
        path: r.path.clone(),
        ..proto::RequestAnswer::default()
    };
    match &r.outcome {
        RequestOutcome::Decided(d) => {
            answer.outcome = d.verdict.as_str().to_owned();
            answer.status = if d.is_allowed() { 0 } else { 403 };
            match &d.reason {
                Reason::Rule(rule) => answer.deciding_rule = Some(rule.to_proto()),
                Reason::Default(mode) => answer.default_policy = mode.as_str().to_owned(),
                // The control plane always has its policies.
                Reason::NoSnapshot => {}
            }
            answer.audits = d.audits.iter().map(RuleRef::to_proto).collect();
        }
        RequestOutcome::Refused { status, why } => {
            answer.outcome = "refused".to_owned();
            answer.status = u32::from(*status);
            answer.refusal = why.clone();
        }
        RequestOutcome::Opaque => answer.outcome = "opaque".to_owned(),
    }
    answer
}

fn request_from_proto(r: &proto::RequestAnswer) -> Result<RequestAnswer, InvalidExplanation> {
    let bad = |what: String| InvalidExplanation(format!("request: {what}"));
    let decided = |verdict| {
        let reason = match &r.deciding_rule {
            Some(rule) => Reason::Rule(RuleRef::from_proto(rule)),
            None => Reason::Default(
                (r.default_policy.parse::<DefaultPolicy>()).map_err(|e| bad(e.to_string()))?,
            ),
        };
        Ok(RequestOutcome::Decided(Decision {
            verdict,
            reason,
            audits: r.audits.iter().map(RuleRef::from_proto).collect(),
        }))
    };
    let outcome = match r.outcome.as_str() {
        "allow" => decided(Verdict::Allow)?,
        "deny" => decided(Verdict::Deny)?,
        "refused" => RequestOutcome::Refused {
            status: u16::try_from(r.status).map_err(|_| bad(format!("status {}", r.status)))?,
            why: r.refusal.clone(),
        },
        "opaque" => RequestOutcome::Opaque,
        other => return Err(bad(format!("outcome {other:?}"))),
    };
    Ok(RequestAnswer {
        method: r.method.clone(),
        path: r.path.clone(),
        outcome,
    })
}

fn trace_to_proto(t: &PolicyTrace) -> proto::PolicyTrace {
    proto::PolicyTrace {
        policy: t.policy.to_string(),
        action: proto::Action::from(t.action).into(),
        selected: t.selected,
        rules: t
            .rules
            .iter()
            .map(|r| proto::RuleTrace {
                index: r.index as u32,
                matched: r.matched,
                why: r.why.clone(),
                per_request: r.per_request,
            })
            .collect(),
    }
}

fn trace_from_proto(t: &proto::PolicyTrace) -> Result<PolicyTrace, InvalidExplanation> {
    let action = action_from_proto(t.action)
        .ok_or_else(|| InvalidExplanation(format!("action {}", t.action)))?;
    Ok(PolicyTrace {
        policy: Arc::from(t.policy.as_str()),
        action,
        selected: t.selected,
        rules: t
            .rules
            .iter()
            .map(|r| RuleTrace {
                index: r.index as usize,
                matched: r.matched,
                why: r.why.clone(),
                per_request: r.per_request,
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::super::validate::validate;
    use super::*;
    use crate::policy::document::Document;

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    fn sample() -> AuthorizationPolicy {
        let yaml = "apiVersion: trellis.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: b}\nspec:\n  selector: {spiffeIds: [\"spiffe://cluster.local/ns/b/*\"]}\n  action: DENY\n  rules:\n    - from: [{spiffeId: spiffe://cluster.local/ns/x/sa/y}, {namespace: m}, {trustDomain: cluster.local}]\n      to: [{ports: [1, 65535]}]\n    - to: [{ports: [80]}]\n    - {}\n";
        let (nodes, _) = crate::policy::source::parse_stream(yaml);
        match Document::from_value(nodes[0].to_json()).unwrap() {
            Document::AuthorizationPolicy(p) => p,
            other => panic!("not an AuthorizationPolicy: {other:?}"),
        }
    }

    #[test]
    fn round_trips_through_proto() {
        let doc = sample();
        let valid = validate(&doc, &td()).unwrap();
        let proto = valid.to_proto();
        assert_eq!(proto.action, proto::Action::Deny as i32);
        assert_eq!(proto.rules[0].from.len(), 3);
        assert_eq!(document_from_proto(&proto).unwrap(), doc);
        assert_eq!(validate_proto(&proto, &td()).unwrap(), valid);
    }

    #[test]
    fn rejects_an_unspecified_action_and_an_empty_source() {
        let mut proto = validate(&sample(), &td()).unwrap().to_proto();
        proto.action = 0;
        let err = validate_proto(&proto, &td()).unwrap_err();
        assert_eq!(
            err[0].to_string(),
            "spec.action: action 0 is not one of ALLOW, DENY, AUDIT"
        );

        let mut proto = validate(&sample(), &td()).unwrap().to_proto();
        proto.rules[0].from[1].r#match = None;
        let err = validate_proto(&proto, &td()).unwrap_err();
        assert_eq!(err[0].path.to_string(), "spec.rules[0].from[1]");
    }
}
