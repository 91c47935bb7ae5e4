//! Policies compiled for matching: each rule's sources and `to` entries
//! (ports with their L7 matches), built once from a validated policy so the
//! engine only compares. The meaning of a match lives in `engine`'s docs.

use std::fmt;
use std::sync::Arc;

use trellis_proto::policy::v1 as proto;

use super::convert::validate_proto_in;
use super::document::{Action, AuthorizationPolicy};
use super::engine::{CompileError, OpaqueFallback, RuleRef, WorkloadSelector};
use super::l7::{HttpRequest, L7Match};
use super::pattern::IdPattern;
use super::validate::{ValidationContext, Violation, policy_key};
use crate::spiffe::{SpiffeId, TrustDomain};

/// A source a rule names, ready to match.
#[derive(Debug, Clone)]
pub(crate) enum SourceMatch {
    Id(IdPattern),
    /// `/ns/<namespace>/`, within the mesh's trust domain.
    Namespace(Box<str>),
    TrustDomain(TrustDomain),
}

impl SourceMatch {
    pub(crate) fn matches(&self, source: &SpiffeId, mesh: &TrustDomain) -> bool {
        match self {
            Self::Id(pattern) => pattern.matches(source),
            Self::Namespace(prefix) => {
                source.is_member_of(mesh) && source.path().starts_with(&**prefix)
            }
            Self::TrustDomain(td) => source.is_member_of(td),
        }
    }
}

impl fmt::Display for SourceMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Id(pattern) => write!(f, "spiffeId {pattern}"),
            Self::Namespace(prefix) => write!(f, "namespace {}", &prefix[4..prefix.len() - 1]),
            Self::TrustDomain(td) => write!(f, "trustDomain {td}"),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct CompiledRule {
    /// Empty matches any source.
    pub sources: Box<[SourceMatch]>,
    /// `None` matches any port. The union of the ports of every `to` entry
    /// (`None` if one entry names no ports): the port index's key, and what
    /// a rule "may match" before its L7 matches are known.
    pub ports: Option<Box<[u16]>>,
    /// The `to` entries, each matched on its own (its ports with its L7
    /// matches); empty matches any port and any request.
    pub to: Box<[CompiledDestination]>,
}

/// One `to` entry.
#[derive(Debug, Clone)]
pub(crate) struct CompiledDestination {
    /// `None` matches any port.
    pub ports: Option<Box<[u16]>>,
    /// Ports it does not match although `ports` names none: those a
    /// sidecar treats as opaque, for an entry with L7 matches (see
    /// [`CompiledRule::fail_closed_on`]). Usually empty.
    pub except: Box<[u16]>,
    /// `None`: the entry matches whole connections.
    pub l7: Option<L7Match>,
}

impl CompiledDestination {
    fn port_matches(&self, port: u16) -> bool {
        self.ports.as_ref().is_none_or(|p| p.contains(&port)) && !self.except.contains(&port)
    }
}

/// What [`CompiledRule::fail_closed_on`] changed: the opaque ports the
/// rule had L7 matches on.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct FailedClosed {
    /// Sorted; empty if the rule had none.
    pub ports: Vec<u16>,
    /// Whether an entry with L7 matches named no ports, so had them on
    /// every opaque port.
    pub every_port: bool,
}

/// `ports` sorted, without duplicates, as
/// [`CompiledRule::fail_closed_on`] takes the opaque ones.
pub(crate) fn sorted_ports(ports: &[u16]) -> Vec<u16> {
    let mut sorted = ports.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    sorted
}

impl CompiledRule {
    pub fn source_match(
        &self,
        source: &SpiffeId,
        mesh: &TrustDomain,
    ) -> Option<Option<&SourceMatch>> {
        if self.sources.is_empty() {
            return Some(None);
        }
        self.sources
            .iter()
            .find(|s| s.matches(source, mesh))
            .map(Some)
    }

    pub fn port_matches(&self, port: u16) -> bool {
        self.ports
            .as_ref()
            .is_none_or(|ports| ports.contains(&port))
    }

    /// Whether the rule matches a whole connection on `port`: an entry
    /// without L7 matches names the port.
    pub fn l4_matches(&self, port: u16) -> bool {
        self.to.is_empty()
            || self
                .to
                .iter()
                .any(|d| d.l7.is_none() && d.port_matches(port))
    }

    /// Whether an entry with L7 matches names `port`: requests on it may
    /// match.
    pub fn l7_may_match(&self, port: u16) -> bool {
        self.to
            .iter()
            .any(|d| d.l7.is_some() && d.port_matches(port))
    }

    /// Whether the rule, of a policy with `action`, matches one HTTP
    /// request on `port`.
    pub fn request_matches(&self, port: u16, req: &HttpRequest<'_>, action: Action) -> bool {
        self.to.is_empty()
            || self.to.iter().any(|d| {
                d.port_matches(port) && d.l7.as_ref().is_none_or(|l7| l7.matches(req, action))
            })
    }

    /// Makes the rule, of a policy with `action`, match on the ports of
    /// `opaque` (never parsed as HTTP) as far as it can be enforced there,
    /// failing closed: an entry with L7 matches on some of them (naming
    /// them, or naming no ports at all) matches whole connections on those
    /// if the rule is DENY or AUDIT (as if it had no L7 matches), and is
    /// left off them if it is ALLOW (it could never match). Its other
    /// ports keep the L7 matches. Returns the ports of `opaque` the rule
    /// had L7 matches on. `opaque` is sorted, without duplicates
    /// (its callers sort once for all rules).
    pub fn fail_closed_on(&mut self, opaque: &[u16], action: Action) -> FailedClosed {
        debug_assert!(opaque.is_sorted_by(|a, b| a < b), "{opaque:?}");
        let mut found = FailedClosed::default();
        if opaque.is_empty() {
            return found;
        }
        let mut to = Vec::with_capacity(self.to.len());
        for d in self.to.iter() {
            let Some(l7) = &d.l7 else {
                to.push(d.clone());
                continue;
            };
            let Some(ports) = &d.ports else {
                // On every port, so on every opaque one: the L7 matches
                // stay on the others, whole connections are matched on
                // these (DENY, AUDIT) or nothing is (ALLOW).
                found.every_port = true;
                found.ports.extend(opaque);
                if action != Action::Allow {
                    to.push(CompiledDestination {
                        ports: Some(opaque.into()),
                        except: Box::new([]),
                        l7: None,
                    });
                }
                to.push(CompiledDestination {
                    ports: None,
                    except: opaque.into(),
                    l7: Some(l7.clone()),
                });
                continue;
            };
            let (hit, rest): (Vec<u16>, Vec<u16>) =
                ports.iter().partition(|port| opaque.contains(port));
            if hit.is_empty() {
                to.push(d.clone());
                continue;
            }
            found.ports.extend(&hit);
            if action != Action::Allow {
                to.push(CompiledDestination {
                    ports: Some(hit.into()),
                    except: Box::new([]),
                    l7: None,
                });
            }
            // An ALLOW entry left with no port names none it could match:
            // kept with an empty list rather than dropped, as a rule with
            // no entries would match every port.
            if !rest.is_empty() || action == Action::Allow {
                to.push(CompiledDestination {
                    ports: Some(rest.into()),
                    except: Box::new([]),
                    l7: Some(l7.clone()),
                });
            }
        }
        if !found.ports.is_empty() {
            self.to = to.into();
            if let Some(ports) = &self.ports {
                let mut union: Vec<u16> = (self.to.iter())
                    .flat_map(|d| d.ports.iter().flatten().copied())
                    .collect();
                union.sort_unstable();
                union.dedup();
                debug_assert!(union.iter().all(|p| ports.contains(p)));
                self.ports = Some(union.into());
            }
        }
        found.ports.sort_unstable();
        found.ports.dedup();
        found
    }

    /// The ports on which an entry matches request paths (paths or a gRPC
    /// service): `None` if such an entry names no ports, empty if there is
    /// no such entry.
    pub fn path_ports(&self) -> Option<Vec<u16>> {
        let mut ports = Vec::new();
        for d in self.to.iter() {
            if d.l7.as_ref().is_some_and(L7Match::reads_paths) {
                ports.extend(d.ports.as_deref()?);
            }
        }
        Some(ports)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct CompiledPolicy {
    pub key: Arc<str>,
    pub action: Action,
    pub selector: WorkloadSelector,
    pub rules: Box<[CompiledRule]>,
    /// What this policy, stored before a check got stricter, fails of it
    /// and how it is enforced instead ([`ValidationContext::stored`]).
    pub relaxed: Box<[Violation]>,
}

impl CompiledPolicy {
    /// Validates `policy` for the mesh `td` and compiles it.
    pub fn compile(
        policy: &proto::Policy,
        td: &TrustDomain,
        context: &ValidationContext,
    ) -> Result<Self, CompileError> {
        let valid =
            validate_proto_in(policy, td, context).map_err(|violations| CompileError::Invalid {
                policy: policy_key(&policy.namespace, &policy.name),
                violations,
            })?;
        Ok(Self {
            relaxed: valid.relaxed().into(),
            ..Self::from_valid(valid.policy())
        })
    }

    fn from_valid(policy: &AuthorizationPolicy) -> Self {
        let pattern = |text: &String| IdPattern::parse(text).expect("validated pattern");
        let rules = policy.spec.rules.iter().map(|rule| {
            let sources = rule.from.iter().flatten().map(|s| {
                if let Some(id) = &s.spiffe_id {
                    SourceMatch::Id(pattern(id))
                } else if let Some(ns) = &s.namespace {
                    SourceMatch::Namespace(format!("/ns/{ns}/").into())
                } else {
                    let td = s.trust_domain.as_deref().unwrap_or_default();
                    SourceMatch::TrustDomain(TrustDomain::new(td).expect("validated trust domain"))
                }
            });
            let port_list = |ports: &Vec<i64>| -> Box<[u16]> {
                let mut ports: Vec<u16> = ports
                    .iter()
                    .map(|&p| u16::try_from(p).expect("validated port"))
                    .collect();
                ports.sort_unstable();
                ports.dedup();
                ports.into()
            };
            let to: Box<[CompiledDestination]> = rule
                .to
                .iter()
                .flatten()
                .map(|d| CompiledDestination {
                    ports: d.ports.as_ref().map(port_list),
                    except: Box::new([]),
                    l7: L7Match::compile(d),
                })
                .collect();
            let ports = match &rule.to {
                None => None,
                Some(entries) if entries.iter().any(|d| d.ports.is_none()) => None,
                Some(entries) => {
                    let all: Vec<i64> = entries
                        .iter()
                        .flat_map(|d| d.ports.iter().flatten().copied())
                        .collect();
                    Some(port_list(&all))
                }
            };
            CompiledRule {
                sources: sources.collect(),
                ports,
                to,
            }
        });
        Self {
            key: policy_key(&policy.metadata.namespace, &policy.metadata.name).into(),
            action: policy.spec.action,
            selector: WorkloadSelector(
                policy
                    .spec
                    .selector
                    .spiffe_ids
                    .iter()
                    .map(pattern)
                    .collect(),
            ),
            rules: rules.collect(),
            relaxed: Box::new([]),
        }
    }

    pub fn selects(&self, id: &SpiffeId) -> bool {
        self.selector.selects(id)
    }

    /// Makes each rule fail closed on the `opaque` ports, sorted and without
    /// duplicates ([`CompiledRule::fail_closed_on`]): the rules it changed,
    /// by index.
    pub fn fail_closed_on(&mut self, opaque: &[u16]) -> Vec<OpaqueFallback> {
        let action = self.action;
        let mut fallbacks = Vec::new();
        for (index, rule) in self.rules.iter_mut().enumerate() {
            let FailedClosed { ports, every_port } = rule.fail_closed_on(opaque, action);
            if !ports.is_empty() {
                fallbacks.push(OpaqueFallback {
                    rule: RuleRef {
                        policy: self.key.clone(),
                        rule: index,
                    },
                    action,
                    ports,
                    every_port,
                });
            }
        }
        fallbacks
    }
}
