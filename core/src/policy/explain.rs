//! Why a connection would be allowed or denied, for `trellisctl policy
//! explain` and the Admin API's Explain.
//!
//! This module owns the account of a decision: every policy considered,
//! whether it selects the destination, each of its rules and why it matched
//! or not, and the decision itself, which comes from the very engine the
//! sidecars run ([`PolicySet::decide`]). It never decides on its own.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use trellis_proto::policy::v1 as proto;

use super::document::Action;
use super::engine::{
    CompileError, CompiledPolicy, CompiledRule, Decision, DefaultPolicy, OpaqueFallback, PolicySet,
    Reason, RuleRef,
};
use super::l7::{self, HttpRequest};
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
    /// How the HTTP requests of the connection are decided when
    /// `decision` is not the whole story for them; `None` when each request
    /// gets `decision` (and always on an opaque port).
    pub per_request: Option<PerRequest>,
    /// What the destination's sidecar does with the HTTP request asked
    /// about ([`explain_http`]); `None` when none was.
    pub request: Option<RequestAnswer>,
}

/// An HTTP request to explain, and what the destination's sidecar knows
/// besides the authorization policies that decides whether it checks the
/// request's path.
#[derive(Debug, Clone, Copy)]
pub struct ExplainedHttp<'a> {
    /// The request, its path without the query, as the sidecar matches
    /// rules on it.
    pub request: HttpRequest<'a>,
    /// The query of the request target, from its `?` on (empty without
    /// one): no rule matches it, but it counts towards the sidecar's
    /// bounds on the head as the rest of the target does.
    pub query: &'a str,
    /// An absolute-form HTTP/1.1 request target as sent
    /// (`http://api:8080/users?x=1`, whose `request.path` is `/users` and
    /// `query` `?x=1`); empty for one in origin form. The sidecar takes
    /// such a target as hyper reads it: the rules match its path, a `Host`
    /// must name the same host and port as its authority, and it counts
    /// whole towards the bounds on the head.
    pub absolute: &'a str,
    /// Whether a rate limit selecting the destination reads paths
    /// ([`RateLimitPolicy::reads_paths`](super::RateLimitPolicy::reads_paths)).
    pub limits_read_paths: bool,
    /// Whether the request comes in HTTP/2 (else HTTP/1.1): the bound on
    /// its headers differs (see [`RequestAnswer`]).
    pub http2: bool,
}

/// What the destination's sidecar does with one HTTP request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestAnswer {
    pub method: String,
    /// Without the query.
    pub path: String,
    pub outcome: RequestOutcome,
}

/// How a sidecar answers one HTTP request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestOutcome {
    /// Decided by the rules ([`PolicySet::decide_request`]): allowed, it
    /// reaches the app; denied, it is answered 403.
    Decided(Decision),
    /// Answered before any rule is checked, with `status`, for `why`
    /// (e.g. a path an app could read as another one, or more than one
    /// `Host`); `status` 0 when nothing answers it (the connection is
    /// ended).
    Refused { status: u16, why: String },
    /// The port is opaque: never parsed as HTTP, so no request is decided
    /// and the connection's verdict applies.
    Opaque,
}

impl RequestAnswer {
    /// What the sidecar holding `set` does with `http` from `source` on
    /// `port` (`opaque` when it never parses the port as HTTP): the checks
    /// its request layer makes before the rules, in its order (the size of
    /// the head, a `#` in the target, `CONNECT`, the `Host`, the path),
    /// then the rules.
    fn of(
        set: &PolicySet,
        http: &ExplainedHttp<'_>,
        source: &SpiffeId,
        port: u16,
        opaque: bool,
    ) -> Self {
        let HttpRequest { method, path, .. } = http.request;
        let reads_paths = http.limits_read_paths || set.matches_paths_on(port);
        let outcome = if opaque {
            RequestOutcome::Opaque
        } else if let Some((status, why)) = over_bounds(http) {
            RequestOutcome::Refused {
                status,
                why: why.to_owned(),
            }
        } else if let Some(why) = target_problem(http) {
            RequestOutcome::Refused {
                status: 400,
                why: why.to_owned(),
            }
        } else if method == "CONNECT" {
            RequestOutcome::Refused {
                status: 501,
                why: l7::CONNECT_REFUSED.to_owned(),
            }
        } else if let Some(problem) = host_problem(http) {
            RequestOutcome::Refused {
                status: 400,
                why: problem.to_owned(),
            }
        } else if let Some(problem) = l7::request_path_problem(method, path, reads_paths) {
            RequestOutcome::Refused {
                status: 400,
                why: problem.to_string(),
            }
        } else if let Some(headers) = absolute_host(http) {
            // The rules read the target's authority as its `Host`, as the
            // sidecar gives it to them and the app.
            let request = HttpRequest {
                headers: &headers,
                ..http.request
            };
            RequestOutcome::Decided(set.decide_request(source, port, &request))
        } else {
            RequestOutcome::Decided(set.decide_request(source, port, &http.request))
        };
        RequestAnswer {
            method: method.to_owned(),
            path: path.to_owned(),
            outcome,
        }
    }
}

/// What the sidecar refuses in the target of `http` as sent, if anything
/// ([`l7::target_problem`]): its HTTP/1.1 head is read for it before
/// anything else but the bounds. (HTTP/2's layer drops a `#` in `:path`
/// before the sidecar reads it: such a request is not explained.)
fn target_problem(http: &ExplainedHttp<'_>) -> Option<&'static str> {
    match (http.http2, http.absolute) {
        (true, _) => None,
        (false, "") => {
            l7::target_problem(http.request.path).or_else(|| l7::target_problem(http.query))
        }
        (false, absolute) => l7::target_problem(absolute),
    }
}

/// What the sidecar refuses in the `Host` of `http`, if anything. An
/// HTTP/1.1 request in origin form names no authority but its `Host`, so
/// none is refused, and so is a second one; in absolute form, its target's
/// authority (of [`ExplainedHttp::absolute`]) is its host, which a `Host`
/// must name, and which has no userinfo part. In HTTP/2 the first `Host`
/// given stands for `:authority` ([`h2_authority`]), which a second one
/// must name again.
fn host_problem(http: &ExplainedHttp<'_>) -> Option<&'static str> {
    let headers = http.request.headers;
    if !http.http2 {
        let authority = absolute_authority(http.absolute);
        return l7::host_problem(headers, authority.as_ref(), authority.is_none());
    }
    let (authority, rest) = h2_authority(headers);
    let authority = authority.and_then(|a| http::uri::Authority::try_from(a).ok());
    l7::host_problem(&rest, authority.as_ref(), false)
}

/// The headers of an HTTP/1.1 request `http` in absolute form without a
/// `Host`, with its target's authority as one, as the sidecar gives it to
/// the rules and the app (RFC 9112 section 3.2.2); `None` for any other.
fn absolute_host(http: &ExplainedHttp<'_>) -> Option<http::HeaderMap> {
    let headers = http.request.headers;
    if http.http2 || headers.contains_key(http::header::HOST) {
        return None;
    }
    let authority = absolute_authority(http.absolute)?;
    let host = http::HeaderValue::from_str(authority.as_str()).ok()?;
    let mut headers = headers.clone();
    headers.insert(http::header::HOST, host);
    Some(headers)
}

/// The authority of an absolute-form target (`api:8080` of
/// `http://api:8080/x`); `None` for one in origin form (empty). Read from
/// the text before the path alone: a target of any length has one.
fn absolute_authority(absolute: &str) -> Option<http::uri::Authority> {
    let (_, rest) = absolute.split_once("://")?;
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    http::uri::Authority::try_from(&rest[..end]).ok()
}

/// The `:authority` of an HTTP/2 request with `headers` as `policy
/// explain` takes them, and its other headers: a `Host` given stands for
/// `:authority` (HTTP/2 clients send that instead), the first one when
/// more are.
fn h2_authority(headers: &http::HeaderMap) -> (Option<&str>, http::HeaderMap) {
    let mut authority = None;
    let mut rest = http::HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        match value.to_str() {
            Ok(host) if name == http::header::HOST && authority.is_none() => {
                authority = Some(host);
            }
            _ => {
                rest.append(name.clone(), value.clone());
            }
        }
    }
    (authority, rest)
}

/// The status and words the sidecar answers `http` with for the size of
/// its head, if it does: an HTTP/1.1 head over one of its bounds
/// ([`l7::HeadLimit::http1`]: more than 100 fields or 408 KiB, 431; a
/// target over 65,534 bytes, 414), or an HTTP/2 header list over
/// [`l7::H2_MAX_HEADER_LIST`] (431), counted with `:scheme` `http` and a
/// `Host` given as `:authority` ([`h2_authority`]), as the sidecar counts
/// the `:authority` a client sends. The request target counts whole, its
/// query too (`:path` in HTTP/2), and an absolute-form one as sent. An
/// HTTP/2 list the HTTP/2 layer itself refuses (from
/// [`l7::H2_HEADER_LIST_READ`] on) never reaches the sidecar's code: 431
/// with no words of the sidecar's, or, over [`l7::H2_HEADER_LIST_ABUSE`],
/// no answer at all (status 0), the connection ended.
fn over_bounds(http: &ExplainedHttp<'_>) -> Option<(u16, &'static str)> {
    let HttpRequest {
        method,
        path,
        headers,
    } = http.request;
    let target = match http.absolute {
        "" => format!("{path}{}", http.query),
        absolute => absolute.to_owned(),
    };
    if http.http2 {
        let (authority, rest) = h2_authority(headers);
        let size = l7::h2_header_list_size(method, Some("http"), authority, Some(&target), &rest);
        if size > l7::H2_HEADER_LIST_ABUSE {
            Some((0, l7::H2_HEADERS_END_CONNECTION))
        } else if size >= l7::H2_HEADER_LIST_READ {
            Some((431, l7::H2_HEADERS_REFUSED_BY_HTTP2))
        } else {
            (size > l7::H2_MAX_HEADER_LIST).then_some((431, l7::H2_HEADERS_TOO_LARGE))
        }
    } else {
        let size = l7::http1_head_size(method, &target, headers);
        let limit = l7::HeadLimit::http1(headers.len(), size, target.len())?;
        Some((limit.status().as_u16(), limit.why()))
    }
}

impl RequestAnswer {
    /// Whether the request gets to the rate limits: the sidecar checks
    /// them below its request layer, on a request the rules allow only.
    pub fn reaches_rate_limits(&self) -> bool {
        matches!(&self.outcome, RequestOutcome::Decided(d) if d.is_allowed())
    }
}

/// Which of `limits` (those selecting the destination) count the request
/// `answer` is about, each in turn: one counts it when the request gets to
/// the rate limits ([`RequestAnswer::reaches_rate_limits`]) and its paths
/// take in the request's ([`RateLimitPolicy::counts`](super::RateLimitPolicy::counts);
/// one that does not read back is taken to count it).
pub fn rate_limits_counting(limits: &[proto::RateLimit], answer: &RequestAnswer) -> Vec<bool> {
    let reaches = answer.reaches_rate_limits();
    (limits.iter())
        .map(|l| {
            reaches
                && super::RateLimitPolicy::from_proto(l).map_or(true, |p| p.counts(&answer.path))
        })
        .collect()
}

impl fmt::Display for RequestAnswer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "request {} {}: ", self.method, self.path)?;
        match &self.outcome {
            RequestOutcome::Decided(d) if d.is_allowed() => write!(f, "{d} (passed to the app)"),
            RequestOutcome::Decided(d) => write!(f, "{} (answered 403)", Told(d, "request")),
            RequestOutcome::Refused { status: 0, why } => write!(f, "refused (no answer): {why}"),
            RequestOutcome::Refused { status, why } => {
                write!(f, "refused (answered {status}): {why}")?;
                // The likelier cause is a Host left out of the question,
                // not a client that leaves it out.
                if *why == l7::MISSING_HOST {
                    f.write_str(
                        "; to explain a request that names one, add --header 'Host: NAME'",
                    )?;
                }
                Ok(())
            }
            RequestOutcome::Opaque => f.write_str(
                "not decided: the port is opaque (never parsed as HTTP), the connection's \
                 verdict applies",
            ),
        }
    }
}

/// A decision as `policy explain` tells it of a `.1` (`request`,
/// `connection`): as [`Decision`] displays, and for a denial by the mesh
/// default, as the sidecar's answer says, that no policy allows it
/// ([`Decision::denied_because`]).
struct Told<'a>(&'a Decision, &'static str);

impl fmt::Display for Told<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self(decision, what) = *self;
        match decision.denied_because(what) {
            // A denied decision names no audits.
            Some(why) => write!(f, "{decision}: {why}"),
            None => write!(f, "{decision}"),
        }
    }
}

/// L7 rules that decide the HTTP requests of a connection on a port parsed
/// as HTTP one by one, as the sidecar does: when the decision denies the
/// connection but an ALLOW rule's L7 matches may allow some of its requests
/// ([`PolicySet::admits_requests`]), when it allows the connection but a
/// DENY rule's L7 matches deny some ([`PolicySet::denies_unless_http`]),
/// and when the connection carries requests that an AUDIT rule's L7
/// matches report as "would deny" ([`PolicySet::audits_unless_http`]). At
/// least one of the three is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PerRequest {
    /// The ALLOW rule the sidecar admits the connection for (the first):
    /// it is served as HTTP only, the requests L7 ALLOW rules match
    /// allowed, the others decided by the mesh default. Set only when the
    /// decision denies.
    pub allowed_by: Option<RuleRef>,
    /// The verdict of the DENY rule whose L7 matches deny the requests
    /// they match (the first), as [`PolicySet::denies_unless_http`] gives
    /// it: a connection that is not HTTP it denies whole, as its conditions
    /// cannot be checked on bytes.
    pub denied: Option<Decision>,
    /// The AUDIT rules whose L7 matches report the requests they match as
    /// "would deny", never changing what they get (the first of each AUDIT
    /// policy, as [`PolicySet::audits_unless_http`] finds them): a
    /// connection that is not HTTP, unless denied, they report whole, as
    /// their conditions cannot be checked on bytes. A policy the
    /// decision's `audits` name is left out: it reports every request. For
    /// a connection admitted for HTTP only, whose denied decision names
    /// none, those matching it whole are listed too
    /// ([`PolicySet::audits_of_requests`]).
    pub audited_by: Vec<RuleRef>,
}

impl PerRequest {
    /// The DENY rule of [`denied`](Self::denied).
    pub fn denied_by(&self) -> Option<&RuleRef> {
        match &self.denied.as_ref()?.reason {
            Reason::Rule(rule) => Some(rule),
            Reason::Default(_) | Reason::NoSnapshot => None,
        }
    }
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
            Reason::Default(_) | Reason::NoSnapshot => None,
        }
    }

    /// The verdict on a connection that turns out not to be HTTP, when
    /// the HTTP requests are decided one by one (see [`PerRequest`]): a
    /// connection admitted for HTTP only gets `decision`, one that a DENY
    /// rule's L7 matches apply to is denied whole by that rule, and an
    /// allowed one that AUDIT rules' L7 matches apply to gets `decision`
    /// with those rules among its audits ("would deny"). `None` when
    /// `decision` is the verdict on every connection.
    pub fn not_http(&self) -> Option<Cow<'_, Decision>> {
        let per_request = self.per_request.as_ref()?;
        Some(match &per_request.denied {
            _ if !self.decision.is_allowed() => Cow::Borrowed(&self.decision),
            Some(denied) => Cow::Borrowed(denied),
            None if per_request.audited_by.is_empty() => Cow::Borrowed(&self.decision),
            None => {
                let mut audited = self.decision.clone();
                audited
                    .audits
                    .extend(per_request.audited_by.iter().cloned());
                Cow::Owned(audited)
            }
        })
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
    explain_with(source, destination, port, policies, default, opaque, None)
}

/// [`explain`], and what the destination's sidecar does with the HTTP
/// request `http` on the connection ([`Explanation::request`]), by the
/// same code as the sidecar's request layer.
pub fn explain_http(
    source: &SpiffeId,
    destination: &SpiffeId,
    port: u16,
    policies: &[proto::Policy],
    default: DefaultPolicy,
    opaque: &OpaquePorts,
    http: &ExplainedHttp<'_>,
) -> Result<Explanation, CompileError> {
    explain_with(
        source,
        destination,
        port,
        policies,
        default,
        opaque,
        Some(http),
    )
}

fn explain_with(
    source: &SpiffeId,
    destination: &SpiffeId,
    port: u16,
    policies: &[proto::Policy],
    default: DefaultPolicy,
    opaque: &OpaquePorts,
    http: Option<&ExplainedHttp<'_>>,
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
    let decision = set.decide(source, port);
    // As the sidecar decides on a port it parses as HTTP; one it holds
    // opaque never carries requests, and L7 matches there failed closed.
    let per_request = if origin.is_none() {
        per_request(&set, &decision, source, port)
    } else {
        None
    };
    let request = http.map(|http| RequestAnswer::of(&set, http, source, port, origin.is_some()));
    Ok(Explanation {
        source: source.clone(),
        destination: destination.clone(),
        port,
        policies: traces,
        decision,
        opaque: origin,
        per_request,
        request,
    })
}

/// The L7 rules of `set` that decide the requests of a connection that
/// `decision` decided, as the inbound listener applies them.
fn per_request(
    set: &PolicySet,
    decision: &Decision,
    source: &SpiffeId,
    port: u16,
) -> Option<PerRequest> {
    let allowed_by = set.admitting_rule(decision, source, port);
    // A connection denied and not admitted carries no request to decide.
    if !decision.is_allowed() && allowed_by.is_none() {
        return None;
    }
    let denied = set.denies_unless_http(source, port);
    let audited_by = if decision.is_allowed() {
        // The dry run of `denies_unless_http`: the AUDIT rules whose L7
        // matches the sidecar checks on each request (and reports a
        // connection that is not HTTP by). A policy that matched the
        // connection already reports each of its requests anyway.
        let mut audited_by = set.audits_unless_http(source, port);
        audited_by.retain(|audit| !(decision.audits.iter()).any(|a| a.policy == audit.policy));
        audited_by
    } else {
        // Admitted for HTTP only: the denied connection reports nothing,
        // the requests the ALLOW rule's L7 matches allow are reported by
        // every AUDIT rule that matches them, whole or per request.
        set.audits_of_requests(source, port)
    };
    let any = allowed_by.is_some() || denied.is_some() || !audited_by.is_empty();
    any.then_some(PerRequest {
        allowed_by,
        denied,
        audited_by,
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
        let decision = &self.decision;
        write!(
            f,
            "{} -> {} port {}: {} by ",
            self.source,
            self.destination,
            self.port,
            decision.verdict.as_str()
        )?;
        match &decision.reason {
            Reason::Rule(r) => write!(f, "{r}")?,
            Reason::Default(_) | Reason::NoSnapshot => f.write_str(decision.policy_label())?,
        }
        // A denial by the mesh default says why in the sidecar's words,
        // unless the connection is admitted for HTTP requests: then no
        // policy allows it as bytes, which its not-HTTP line below says,
        // while some of its requests are allowed, which this line says.
        if self.per_request.is_none()
            && let Some(why) = decision.denied_because("connection")
        {
            write!(f, ": {why}")?;
        }
        if let Some(per_request) = &self.per_request {
            match (&per_request.allowed_by, per_request.denied_by()) {
                (Some(allowed), Some(denied)) => write!(
                    f,
                    ", except HTTP requests allowed per request by {allowed} (unless denied \
                     per request by {denied})"
                )?,
                (Some(allowed), None) => {
                    write!(f, ", except HTTP requests allowed per request by {allowed}")?
                }
                (None, Some(denied)) => {
                    write!(f, ", except HTTP requests denied per request by {denied}")?
                }
                (None, None) => {}
            }
        }
        for (i, audit) in decision.audits.iter().enumerate() {
            f.write_str(if i == 0 { "; would deny by " } else { ", " })?;
            write!(f, "{audit}")?;
        }
        let audited_by = self.per_request.iter().flat_map(|p| &p.audited_by);
        for (i, audit) in audited_by.enumerate() {
            f.write_str(if i == 0 {
                "; HTTP requests audited per request by "
            } else {
                ", "
            })?;
            write!(f, "{audit}")?;
        }
        writeln!(f)?;
        if let Some(request) = &self.request {
            writeln!(f, "  {request}")?;
        }
        if let Some(not_http) = self.not_http() {
            let why = if !decision.is_allowed() {
                "the connection is admitted for HTTP requests only"
            } else if not_http.is_allowed() {
                "the AUDIT rules' HTTP conditions cannot be checked on bytes"
            } else {
                "its HTTP conditions cannot be checked on bytes"
            };
            let not_http = Told(&not_http, "connection");
            writeln!(f, "  a connection that is not HTTP: {not_http} ({why})")?;
        }
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
            Reason::NoSnapshot => writeln!(f, "no rule decided: no policy snapshot yet"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{HttpRequest, Verdict, load_source};

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

    const WEB: &str = "spiffe://td/ns/a/sa/web";
    const API: &str = "spiffe://td/ns/b/sa/api";

    /// A policy selecting api: `rules` YAML of the `rules` list.
    fn policy(name: &str, action: &str, rules: &str) -> proto::Policy {
        let td = TrustDomain::new("td").unwrap();
        let yaml = format!(
            "apiVersion: trellis.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: b}}
spec:
  selector: {{spiffeIds: [\"{API}\"]}}
  action: {action}
  rules:
{rules}"
        );
        let loaded = load_source("p.yaml", &yaml, &td);
        assert!(!loaded.has_errors(), "{:?}", loaded.diagnostics);
        loaded.policies[0].policy.to_proto()
    }

    /// An ALLOW policy selecting api whose one rule admits web to `to`,
    /// the YAML of one `to` entry.
    fn allow_from_web(name: &str, to: &str) -> proto::Policy {
        policy(
            name,
            "ALLOW",
            &format!("    - from: [{{spiffeId: {WEB}}}]\n      to: [{to}]\n"),
        )
    }

    fn explain_web(
        port: u16,
        policies: &[proto::Policy],
        default: DefaultPolicy,
        opaque: &[u16],
    ) -> Explanation {
        let web = SpiffeId::parse(WEB).unwrap();
        let api = SpiffeId::parse(API).unwrap();
        let opaque = OpaquePorts {
            requested: opaque.to_vec(),
            ..OpaquePorts::default()
        };
        explain(&web, &api, port, policies, default, &opaque).unwrap()
    }

    /// One HTTP request a test asks `explain` to decide, from web to api's
    /// port 8080: `GET /x` with nothing else unless told (but `host: api`
    /// first in HTTP/1.1, where a request has one).
    struct Ask<'a> {
        method: &'a str,
        path: &'a str,
        query: &'a str,
        /// The target in absolute form, if it is.
        absolute: &'a str,
        /// The `Host` put first in HTTP/1.1 when `headers` have none (none
        /// if empty).
        host: &'a str,
        headers: &'a [(&'a str, &'a str)],
        limits_read_paths: bool,
        http2: bool,
        opaque: &'a [u16],
    }

    impl Default for Ask<'_> {
        fn default() -> Self {
            Ask {
                method: "GET",
                path: "/x",
                query: "",
                absolute: "",
                host: "api",
                headers: &[],
                limits_read_paths: false,
                http2: false,
                opaque: &[],
            }
        }
    }

    impl Ask<'_> {
        /// The request's line of the explanation under `policies` and the
        /// default deny (the explanation read back from its proto the same).
        fn answer(&self, policies: &[proto::Policy]) -> String {
            let mut headers = http::HeaderMap::new();
            let has_host = self.headers.iter().any(|(name, _)| *name == "host");
            if !self.http2 && !has_host && !self.host.is_empty() {
                headers.append(http::header::HOST, self.host.parse().unwrap());
            }
            for (name, value) in self.headers {
                headers.append(
                    http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    http::HeaderValue::from_str(value).unwrap(),
                );
            }
            let http = ExplainedHttp {
                request: HttpRequest {
                    method: self.method,
                    path: self.path,
                    headers: &headers,
                },
                query: self.query,
                absolute: self.absolute,
                limits_read_paths: self.limits_read_paths,
                http2: self.http2,
            };
            let opaque = OpaquePorts {
                requested: self.opaque.to_vec(),
                ..OpaquePorts::default()
            };
            let (web, api) = (SpiffeId::parse(WEB).unwrap(), SpiffeId::parse(API).unwrap());
            let explained = explain_http(
                &web,
                &api,
                8080,
                policies,
                DefaultPolicy::Deny,
                &opaque,
                &http,
            )
            .unwrap();
            let read = Explanation::from_proto(&explained.to_proto()).unwrap();
            assert_eq!(read, explained);
            explained.request.unwrap().to_string()
        }
    }

    fn rule(policy: &str, rule: usize) -> RuleRef {
        RuleRef {
            policy: policy.into(),
            rule,
        }
    }

    /// What a connection that is not HTTP gets from a DENY rule with HTTP
    /// conditions.
    fn denied_by(policy: &str, index: usize) -> Decision {
        Decision {
            verdict: Verdict::Deny,
            reason: Reason::Rule(rule(policy, index)),
            audits: Vec::new(),
        }
    }

    fn first_lines(e: &Explanation) -> String {
        e.to_string().lines().take(2).collect::<Vec<_>>().join("\n")
    }

    /// A request named is answered as the sidecar's request layer answers
    /// it: a path an app could read as another is refused only where a
    /// rule or a rate limit reads paths, `CONNECT` is refused whatever
    /// the rules, a header condition is checked, and on an opaque port no
    /// request is decided. Each answer reads back from its protobuf form.
    #[test]
    fn an_http_request_is_answered_as_the_sidecar_answers_it() {
        let allow = allow_from_web("web-to-api", "{ports: [8080]}");
        let deny = policy(
            "no-debug",
            "DENY",
            "    - to: [{headers: {x-debug: \"1\"}}]\n",
        );
        let policies = [allow, deny];
        let answer = |method: &str,
                      path: &str,
                      headers: &[(&str, &str)],
                      limits_read_paths: bool,
                      opaque: &[u16]| {
            Ask {
                method,
                path,
                headers,
                limits_read_paths,
                opaque,
                ..Ask::default()
            }
            .answer(&policies)
        };

        assert_eq!(
            answer("GET", "/a/%2e%2e/b", &[], false, &[]),
            "request GET /a/%2e%2e/b: allow by b/web-to-api rule 0 (passed to the app)"
        );
        assert_eq!(
            answer("GET", "/a/%2e%2e/b", &[], true, &[]),
            "request GET /a/%2e%2e/b: refused (answered 400): path encodes '.' as %2e: send \
             unreserved characters as they are (RFC 3986)"
        );
        assert_eq!(
            answer("OPTIONS", "*", &[], true, &[]),
            "request OPTIONS *: allow by b/web-to-api rule 0 (passed to the app)"
        );
        assert_eq!(
            answer("CONNECT", "/", &[], false, &[]),
            format!(
                "request CONNECT /: refused (answered 501): {}",
                l7::CONNECT_REFUSED
            )
        );
        assert_eq!(
            answer(
                "GET",
                "/x",
                &[("x-debug", "0"), ("x-debug", "1")],
                false,
                &[]
            ),
            "request GET /x: deny by b/no-debug rule 0 (answered 403)"
        );
        // A second `Host` is refused before the path is looked at, after
        // `CONNECT`, as the sidecar's request layer orders its checks.
        let hosts = [("host", "api"), ("host", "other")];
        assert_eq!(
            answer("GET", "/a/%2e%2e/b", &hosts, true, &[]),
            "request GET /a/%2e%2e/b: refused (answered 400): more than one Host header"
        );
        assert_eq!(
            answer("CONNECT", "/", &hosts, false, &[]),
            format!(
                "request CONNECT /: refused (answered 501): {}",
                l7::CONNECT_REFUSED
            )
        );
        assert_eq!(
            answer("GET", "/x", &[("host", "api")], false, &[]),
            "request GET /x: allow by b/web-to-api rule 0 (passed to the app)"
        );
        assert_eq!(
            answer("GET", "/x", &[("x-debug", "1")], false, &[8080]),
            "request GET /x: not decided: the port is opaque (never parsed as HTTP), the \
             connection's verdict applies"
        );
    }

    /// A head over the sidecar's bound is answered 431 with the sidecar's
    /// words before anything else is checked (`CONNECT`, a second `Host`),
    /// one at the bound is not: 408 KiB of HTTP/1.1 head, 16 KiB of HTTP/2
    /// header list (32 bytes more for each field, pseudo-headers among
    /// them), so 20 KiB of headers pass in HTTP/1.1 only.
    #[test]
    fn a_head_over_the_sidecars_bound_is_answered_431_first() {
        let allow = policy(
            "web-to-api",
            "ALLOW",
            &format!("    - from: [{{spiffeId: {WEB}}}]\n      to: [{{ports: [8080]}}]\n"),
        );
        let answer = |method: &str, headers: &[(&str, &str)], http2: bool| {
            Ask {
                method,
                headers,
                http2,
                ..Ask::default()
            }
            .answer(std::slice::from_ref(&allow))
        };
        let refused =
            |status, why| format!("request CONNECT /x: refused (answered {status}): {why}");

        // The head as a client writes it, at the bound: the rest is `x-big`.
        let head = |big: &str| {
            format!("CONNECT /x HTTP/1.1\r\nhost: a\r\nhost: b\r\nx-big: {big}\r\n\r\n")
        };
        let at_bound = "b".repeat(l7::MAX_REQUEST_HEAD - head("").len());
        assert_eq!(head(&at_bound).len(), 408 * 1024);
        let over = format!("{at_bound}b");
        let h1 = |big: &str| {
            answer(
                "CONNECT",
                &[("host", "a"), ("host", "b"), ("x-big", big)],
                false,
            )
        };
        assert_eq!(h1(&at_bound), refused(501, l7::CONNECT_REFUSED));
        assert_eq!(
            h1(&over),
            refused(431, "request head exceeds the sidecar's 408 KiB limit")
        );

        // `:method` GET, `:scheme` http, `:path` /x and `x-big`, each 32
        // bytes more.
        let fields = (7 + 3 + 32) + (7 + 4 + 32) + (5 + 2 + 32) + (5 + 32);
        let at_bound = "b".repeat(16 * 1024 - fields);
        let over = format!("{at_bound}b");
        let h2 = |big: &str, http2| answer("GET", &[("x-big", big)], http2);
        let allowed = "request GET /x: allow by b/web-to-api rule 0 (passed to the app)";
        assert_eq!(h2(&at_bound, true), allowed);
        assert_eq!(
            h2(&over, true),
            "request GET /x: refused (answered 431): request headers (the path and \
             pseudo-headers among them, 32 bytes more for each field) exceed the sidecar's \
             16 KiB limit"
        );
        assert_eq!(h2(&over, false), allowed);
    }

    /// A query counts towards the sidecar's bound on the head as the rest
    /// of the request target does, in HTTP/1.1 (the request line) and in
    /// HTTP/2 (`:path`), while the rules match the path without it.
    #[test]
    fn a_query_counts_towards_the_head_but_not_the_path_matched() {
        let allow = allow_from_web("web-to-x", "{ports: [8080], paths: [/x]}");
        // `big`: the value of an `x-big` header, none if empty.
        let answer = |query: &str, big: &str, http2: bool| {
            let big = [("x-big", big)];
            let headers: &[(&str, &str)] = if big[0].1.is_empty() { &[] } else { &big };
            Ask {
                query,
                headers,
                http2,
                ..Ask::default()
            }
            .answer(std::slice::from_ref(&allow))
        };
        let allowed = "request GET /x: allow by b/web-to-x rule 0 (passed to the app)";

        // `GET /x?q=1 HTTP/1.1`, `host`, `x-big` and the empty line, at the
        // bound (a target over 65,534 bytes is refused on its own, 414).
        let head = |big: &str| format!("GET /x?q=1 HTTP/1.1\r\nhost: api\r\nx-big: {big}\r\n\r\n");
        let big = "b".repeat(l7::MAX_REQUEST_HEAD - head("").len());
        assert_eq!(head(&big).len(), 408 * 1024);
        assert_eq!(answer("?q=1", &big, false), allowed);
        assert_eq!(
            answer("?q=12", &big, false),
            "request GET /x: refused (answered 431): request head exceeds the sidecar's \
             408 KiB limit"
        );

        // `:method` GET, `:scheme` http and `:path` /x?q=..., each 32
        // bytes more.
        let fields = (7 + 3 + 32) + (7 + 4 + 32) + (5 + "/x?q=".len() + 32);
        let at_bound = "q".repeat(16 * 1024 - fields);
        assert_eq!(answer(&format!("?q={at_bound}"), "", true), allowed);
        assert_eq!(
            answer(&format!("?q={at_bound}q"), "", true),
            "request GET /x: refused (answered 431): request headers (the path and \
             pseudo-headers among them, 32 bytes more for each field) exceed the sidecar's \
             16 KiB limit"
        );
    }

    /// The sidecar's other bounds on an HTTP/1.1 head are answered with its
    /// status and words: more than 100 header fields with 431, a request
    /// target (its query too) over 65,534 bytes with 414; at the bound, or
    /// in HTTP/2, which has neither bound, the request is decided.
    #[test]
    fn the_http1_bounds_on_fields_and_target_are_the_sidecars() {
        let allow = allow_from_web("web-to-api", "{ports: [8080]}");
        // `fields`: `host` among them in HTTP/1.1.
        let answer = |fields: usize, query: &str, http2: bool| {
            let headers = vec![("x-a", "1"); fields - usize::from(!http2)];
            Ask {
                query,
                headers: &headers,
                http2,
                ..Ask::default()
            }
            .answer(std::slice::from_ref(&allow))
        };
        let allowed = "request GET /x: allow by b/web-to-api rule 0 (passed to the app)";

        assert_eq!(answer(100, "", false), allowed);
        assert_eq!(
            answer(101, "", false),
            "request GET /x: refused (answered 431): request head exceeds the sidecar's limit \
             of 100 header fields"
        );
        assert_eq!(answer(101, "", true), allowed);

        // `/x?q=` and the rest of the query, at the bound.
        let at_bound = format!("?q={}", "q".repeat(l7::MAX_TARGET - "/x?q=".len()));
        assert_eq!(format!("/x{at_bound}").len(), 65534);
        assert_eq!(answer(1, &at_bound, false), allowed);
        assert_eq!(
            answer(1, &format!("{at_bound}q"), false),
            "request GET /x: refused (answered 414): request target exceeds the sidecar's \
             limit of 65534 bytes"
        );
    }

    /// In HTTP/2 a `Host` given stands for `:authority`: it is counted
    /// in the header list as `:authority` (6 bytes more than as `host`),
    /// and a second `Host` is refused only when it names another
    /// authority, as the sidecar checks one beside `:authority`.
    #[test]
    fn an_http2_host_stands_for_the_authority() {
        let allow = allow_from_web("web-to-api", "{ports: [8080]}");
        let answer = |headers: &[(&str, &str)], http2: bool| {
            Ask {
                headers,
                http2,
                ..Ask::default()
            }
            .answer(std::slice::from_ref(&allow))
        };
        let allowed = "request GET /x: allow by b/web-to-api rule 0 (passed to the app)";

        // `:method` GET, `:scheme` http, `:authority` api, `:path` /x and
        // `x-big`, each 32 bytes more.
        let fields = (7 + 3 + 32) + (7 + 4 + 32) + (10 + 3 + 32) + (5 + 2 + 32) + (5 + 32);
        let at_bound = "b".repeat(16 * 1024 - fields);
        let over = format!("{at_bound}b");
        assert_eq!(
            answer(&[("host", "api"), ("x-big", &at_bound)], true),
            allowed
        );
        assert_eq!(
            answer(&[("host", "api"), ("x-big", &over)], true),
            "request GET /x: refused (answered 431): request headers (the path and \
             pseudo-headers among them, 32 bytes more for each field) exceed the sidecar's \
             16 KiB limit"
        );

        assert_eq!(answer(&[("host", "api"), ("host", "API")], true), allowed);
        assert_eq!(
            answer(&[("host", "api"), ("host", "other")], true),
            "request GET /x: refused (answered 400): Host header differs from the authority \
             of the request target"
        );
        assert_eq!(
            answer(&[("host", "api"), ("host", "api")], false),
            "request GET /x: refused (answered 400): more than one Host header"
        );
    }

    /// An HTTP/1.1 request names its host in its `Host`, or in an
    /// absolute-form target, as the sidecar reads it: one in origin form
    /// without a `Host` is refused 400, one in absolute form without has
    /// its target's authority as `Host` for the rules (a DENY of `host:
    /// admin` denies `http://admin/x`), unless that has a userinfo part,
    /// which is refused. HTTP/2 names it in `:authority`, and needs no
    /// `Host`.
    #[test]
    fn an_http1_request_without_a_host_is_answered_as_the_sidecar_answers_it() {
        let allow = allow_from_web("web-to-api", "{ports: [8080]}");
        let deny = policy("no-admin", "DENY", "    - to: [{headers: {host: admin}}]\n");
        let policies = [allow, deny];
        let answer = |absolute: &str, host: &str, http2: bool| {
            Ask {
                absolute,
                host,
                http2,
                ..Ask::default()
            }
            .answer(&policies)
        };
        let allowed = "request GET /x: allow by b/web-to-api rule 0 (passed to the app)";
        let refused = |why| format!("request GET /x: refused (answered 400): {why}");

        assert_eq!(
            answer("", "", false),
            refused(l7::MISSING_HOST)
                + "; to explain a request that names one, add --header 'Host: NAME'"
        );
        assert_eq!(
            refused(l7::MISSING_HOST),
            "request GET /x: refused (answered 400): missing Host header: an HTTP/1.1 request \
             names its host in one (or in an absolute-form target)"
        );
        assert_eq!(answer("", "api", false), allowed);
        assert_eq!(answer("", "", true), allowed);
        assert_eq!(answer("http://api/x", "", false), allowed);
        assert_eq!(
            answer("http://admin/x", "", false),
            "request GET /x: deny by b/no-admin rule 0 (answered 403)"
        );
        assert_eq!(
            answer("http://user@api/x", "", false),
            refused(l7::AUTHORITY_USERINFO)
        );
        assert_eq!(
            answer("http://user@api/x", "api", false),
            refused(l7::AUTHORITY_USERINFO)
        );
    }

    /// A rate limit counts a request when its paths take in the request's
    /// as apps route it (another spelling too), or it names none, and only
    /// when the rules let the request get to the rate limits: not a denied
    /// one, nor any on an opaque port.
    #[test]
    fn the_rate_limits_counting_a_request_are_named() {
        let allow = policy(
            "web-to-api",
            "ALLOW",
            &format!("    - from: [{{spiffeId: {WEB}}}]\n      to: [{{ports: [8080]}}]\n"),
        );
        let deny = policy("no-admin", "DENY", "    - to: [{paths: [/admin/*]}]\n");
        let policies = [allow, deny];
        let limit = |name: &str, paths: &[&str]| proto::RateLimit {
            name: name.into(),
            namespace: "b".into(),
            requests_per_second: 1.0,
            burst: 1,
            matches: (!paths.is_empty())
                .then(|| proto::RateLimitMatch {
                    paths: paths.iter().map(|p| p.to_string()).collect(),
                })
                .into_iter()
                .collect(),
            ..Default::default()
        };
        let limits = [
            limit("login", &["/login"]),
            limit("all", &[]),
            limit("admin", &["/admin/*"]),
        ];
        let web = SpiffeId::parse(WEB).unwrap();
        let api = SpiffeId::parse(API).unwrap();
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::HOST, http::HeaderValue::from_static("api"));
        let counting = |path, opaque: &[u16]| {
            let http = ExplainedHttp {
                request: HttpRequest {
                    method: "POST",
                    path,
                    headers: &headers,
                },
                query: "",
                absolute: "",
                limits_read_paths: true,
                http2: false,
            };
            let opaque = OpaquePorts {
                requested: opaque.to_vec(),
                ..OpaquePorts::default()
            };
            let explained = explain_http(
                &web,
                &api,
                8080,
                &policies,
                DefaultPolicy::Deny,
                &opaque,
                &http,
            )
            .unwrap();
            rate_limits_counting(&limits, &explained.request.unwrap())
        };
        assert_eq!(counting("/login", &[]), [true, true, false]);
        assert_eq!(counting("/LOGIN/", &[]), [true, true, false]);
        assert_eq!(counting("/logout", &[]), [false, true, false]);
        assert_eq!(counting("/admin/x", &[]), [false, false, false]);
        assert_eq!(counting("/login", &[8080]), [false, false, false]);
    }

    /// An ALLOW rule with only HTTP conditions, under the mesh's default
    /// deny: the connection is denied, yet the sidecar serves it as HTTP
    /// and allows the requests the rule matches. The verdict line says so,
    /// and what a connection that is not HTTP gets.
    #[test]
    fn an_l7_allow_under_the_default_deny_allows_requests_per_request() {
        let reads = allow_from_web("reads", "{paths: [/api]}");
        let explained = explain_web(8080, &[reads], DefaultPolicy::Deny, &[]);
        assert!(!explained.decision.is_allowed());
        assert_eq!(
            explained.per_request,
            Some(PerRequest {
                allowed_by: Some(rule("b/reads", 0)),
                denied: None,
                audited_by: Vec::new(),
            })
        );
        assert_eq!(explained.not_http().as_deref(), Some(&explained.decision));
        assert_eq!(
            first_lines(&explained),
            format!(
                "{WEB} -> {API} port 8080: deny by default:deny, except HTTP requests allowed \
                 per request by b/reads rule 0\n  a connection that is not HTTP: deny by \
                 default:deny: no policy allows this connection (the connection is admitted \
                 for HTTP requests only)"
            )
        );
        // Read back from the Admin API's answer, it says the same.
        let read = Explanation::from_proto(&explained.to_proto()).unwrap();
        assert_eq!(read, explained);
    }

    /// A DENY rule with only HTTP conditions under an ALLOW: the connection
    /// is allowed, but the requests the DENY rule matches are denied, and a
    /// connection that is not HTTP is denied whole by it.
    #[test]
    fn an_l7_deny_under_an_allow_denies_requests_per_request() {
        let allow = allow_from_web("web-to-api", "{ports: [8080]}");
        let deny = policy(
            "no-admin",
            "DENY",
            "    - to: [{ports: [9090]}]\n    - to: [{paths: [/admin]}]\n",
        );
        let policies = [allow, deny];
        let explained = explain_web(8080, &policies, DefaultPolicy::Deny, &[]);
        assert!(explained.decision.is_allowed());
        assert_eq!(
            explained.per_request,
            Some(PerRequest {
                allowed_by: None,
                denied: Some(denied_by("b/no-admin", 1)),
                audited_by: Vec::new(),
            })
        );
        assert_eq!(
            first_lines(&explained),
            format!(
                "{WEB} -> {API} port 8080: allow by b/web-to-api rule 0, except HTTP requests \
                 denied per request by b/no-admin rule 1\n  a connection that is not HTTP: deny \
                 by b/no-admin rule 1 (its HTTP conditions cannot be checked on bytes)"
            )
        );
        let read = Explanation::from_proto(&explained.to_proto()).unwrap();
        assert_eq!(read, explained);

        // Both: admitted for the ALLOW's requests, less the DENY's.
        let reads = allow_from_web("reads", "{methods: [GET]}");
        let explained = explain_web(
            8080,
            &[reads, policies[1].clone()],
            DefaultPolicy::Deny,
            &[],
        );
        assert_eq!(
            explained.per_request,
            Some(PerRequest {
                allowed_by: Some(rule("b/reads", 0)),
                denied: Some(denied_by("b/no-admin", 1)),
                audited_by: Vec::new(),
            })
        );
        assert_eq!(explained.not_http().as_deref(), Some(&explained.decision));
        assert!(
            explained.to_string().starts_with(&format!(
                "{WEB} -> {API} port 8080: deny by default:deny, except HTTP requests allowed \
                 per request by b/reads rule 0 (unless denied per request by b/no-admin rule 1)\n"
            )),
            "{explained}"
        );
    }

    /// `policy explain` reads a path as the sidecar's rules do: a DENY of
    /// `/admin` denies the spellings apps route to it (trailing dots and
    /// spaces, `%3B` parameters, characters apps read as ASCII, raw or
    /// escaped: fullwidth, mathematical and circled letters, `\u{017F}`,
    /// `\u{0131}`, `\u{1D6A4}` and `\u{0130}`, U+00A0 ending a segment), an ALLOW of
    /// `/public` allows none of them, and a character an app could fold
    /// into `;` or text with a `.` is refused naming it.
    #[test]
    fn explain_reads_path_spellings_as_the_sidecars_rules_do() {
        let allow = allow_from_web("public", "{paths: [/public, /admin/*, /secret]}");
        let deny = policy(
            "no-admin",
            "DENY",
            "    - to: [{paths: [/admin, /secret]}]\n",
        );
        let policies = [allow, deny];
        let answer = |path: &str| {
            Ask {
                path,
                ..Ask::default()
            }
            .answer(&policies)
        };
        for path in [
            "/admin.",
            "/admin%20",
            "/admin.%20.",
            "/admin%3Bx",
            "/admin%3b",
            "/\u{FF41}dmin",
            "/%EF%BD%81DMIN",
            "/\u{1D41A}dmin",
            "/%F0%9D%90%9Admin",
            "/\u{24D0}dmin",
            "/adm\u{0131}n",
            "/adm\u{1D6A4}n",
            "/ADM\u{0130}N",
            "/\u{017F}ecret",
            "/admin\u{00A0}",
            "/admin%C2%A0",
        ] {
            assert_eq!(
                answer(path),
                format!("request GET {path}: deny by b/no-admin rule 0 (answered 403)")
            );
        }
        assert_eq!(
            answer("/admin/x"),
            "request GET /admin/x: allow by b/public rule 0 (passed to the app)"
        );
        assert_eq!(
            answer("/public"),
            "request GET /public: allow by b/public rule 0 (passed to the app)"
        );
        for path in [
            "/public.",
            "/public%20",
            "/public%3Bx",
            "/\u{FF50}ublic",
            "/\u{1D429}ublic",
            "/publ\u{0131}c",
            "/public\u{00A0}",
        ] {
            let said = answer(path);
            assert!(
                said.starts_with(&format!("request GET {path}: deny by default")),
                "{said}"
            );
        }
        assert_eq!(
            answer("/admin%EF%BC%9Bx"),
            "request GET /admin%EF%BC%9Bx: refused (answered 400): path contains U+FF1B, \
             which an app could read as ';'"
        );
        assert_eq!(
            answer("/admin\u{2488}"),
            "request GET /admin\u{2488}: refused (answered 400): path contains U+2488, \
             which an app could read as '1.'"
        );
    }

    /// An AUDIT rule reports what it would deny that is allowed today: a
    /// connection denied anyway names none, its requests answered 403 by
    /// the denying policy alone; one admitted for HTTP only names those
    /// matching it whole as auditing its requests, as the sidecar reports
    /// each request they allow.
    #[test]
    fn audits_name_only_what_is_allowed() {
        let watch = policy("watch", "AUDIT", "    - to: [{ports: [8080]}]\n");
        let denied = explain_web(8080, std::slice::from_ref(&watch), DefaultPolicy::Deny, &[]);
        assert_eq!(denied.decision.audits, [], "{denied}");
        assert_eq!(denied.per_request, None, "{denied}");
        assert_eq!(
            first_lines(&denied),
            format!(
                "{WEB} -> {API} port 8080: deny by default:deny: no policy allows this connection\n  b/watch (AUDIT): selects the destination"
            )
        );

        let reads = allow_from_web("reads", "{paths: [/api]}");
        let admitted = explain_web(8080, &[reads, watch], DefaultPolicy::Deny, &[]);
        assert_eq!(
            first_lines(&admitted),
            format!(
                "{WEB} -> {API} port 8080: deny by default:deny, except HTTP requests allowed \
                 per request by b/reads rule 0; HTTP requests audited per request by b/watch \
                 rule 0\n  a connection that is not HTTP: deny by default:deny: no policy \
                 allows this connection (the connection is admitted for HTTP requests only)"
            )
        );
    }

    /// An AUDIT rule with only HTTP conditions: the sidecar checks them
    /// on each request, reporting those they match as "would deny", and
    /// reports a connection that is not HTTP by the rule whole. The verdict
    /// line says so, and what a connection that is not HTTP gets.
    #[test]
    fn an_l7_audit_audits_requests_per_request() {
        let allow = allow_from_web("web-to-api", "{ports: [8080]}");
        let watch = policy("watch", "AUDIT", "    - to: [{paths: [/admin]}]\n");
        let policies = [allow, watch.clone()];
        // What the sidecar's engine does with each request and with the
        // connection.
        let web = SpiffeId::parse(WEB).unwrap();
        let api = SpiffeId::parse(API).unwrap();
        let set = PolicySet::compile(&api, &policies, DefaultPolicy::Deny).unwrap();
        let headers = http::HeaderMap::new();
        let get = |path| {
            let request = HttpRequest {
                method: "GET",
                path,
                headers: &headers,
            };
            set.decide_request(&web, 8080, &request).to_string()
        };
        assert_eq!(
            get("/admin"),
            "allow by b/web-to-api rule 0; would deny by b/watch rule 0"
        );
        assert_eq!(get("/api"), "allow by b/web-to-api rule 0");
        assert_eq!(set.decide(&web, 8080).audits, []);

        let explained = explain_web(8080, &policies, DefaultPolicy::Deny, &[]);
        assert_eq!(
            explained.per_request,
            Some(PerRequest {
                allowed_by: None,
                denied: None,
                audited_by: vec![rule("b/watch", 0)],
            })
        );
        assert_eq!(
            first_lines(&explained),
            format!(
                "{WEB} -> {API} port 8080: allow by b/web-to-api rule 0; HTTP requests audited \
                 per request by b/watch rule 0\n  a connection that is not HTTP: allow by \
                 b/web-to-api rule 0; would deny by b/watch rule 0 (the AUDIT rules' HTTP \
                 conditions cannot be checked on bytes)"
            )
        );
        let read = Explanation::from_proto(&explained.to_proto()).unwrap();
        assert_eq!(read, explained);

        // Admitted for the requests an L7 ALLOW matches, they are audited
        // too; a connection that is not HTTP is refused, reported by none.
        let reads = allow_from_web("reads", "{paths: [/api]}");
        let admitted = explain_web(8080, &[reads, watch], DefaultPolicy::Deny, &[]);
        assert_eq!(
            first_lines(&admitted),
            format!(
                "{WEB} -> {API} port 8080: deny by default:deny, except HTTP requests allowed \
                 per request by b/reads rule 0; HTTP requests audited per request by b/watch \
                 rule 0\n  a connection that is not HTTP: deny by default:deny: no policy \
                 allows this connection (the connection is admitted for HTTP requests only)"
            )
        );

        // An AUDIT policy that matches the connection reports each of its
        // requests already: named once, as it is.
        let everything = policy(
            "watch",
            "AUDIT",
            "    - to: [{paths: [/admin]}]\n    - to: [{ports: [8080]}]\n",
        );
        let whole = explain_web(
            8080,
            &[policies[0].clone(), everything],
            DefaultPolicy::Deny,
            &[],
        );
        assert_eq!(whole.per_request, None, "{whole}");
        assert!(
            whole.to_string().starts_with(&format!(
                "{WEB} -> {API} port 8080: allow by b/web-to-api rule 0; would deny by b/watch \
                 rule 1\n  b/"
            )),
            "{whole}"
        );
    }

    /// Where the connection's verdict is every request's, the verdict line
    /// is the connection's alone: on an opaque port (L7 matches fail closed
    /// there), for a connection a DENY rule denies outright, and for a
    /// source no L7 rule names.
    #[test]
    fn the_verdict_is_the_whole_story_where_no_request_is_decided_apart() {
        let reads = allow_from_web("reads", "{paths: [/api]}");
        let no_admin = policy("no-admin", "DENY", "    - to: [{paths: [/admin]}]\n");
        let cases = [
            (
                &reads,
                DefaultPolicy::Deny,
                "default:deny: no policy allows this connection",
            ),
            (&no_admin, DefaultPolicy::AllowMesh, "b/no-admin rule 0"),
        ];
        for (policy, default, by) in cases {
            let opaque = explain_web(5432, std::slice::from_ref(policy), default, &[5432]);
            assert_eq!(opaque.per_request, None, "{opaque}");
            assert_eq!(opaque.not_http(), None);
            assert!(
                (opaque.to_string())
                    .starts_with(&format!("{WEB} -> {API} port 5432: deny by {by}\n  port")),
                "{opaque}"
            );
        }

        let everything = policy("everything", "DENY", "    - to: [{ports: [8080]}]\n");
        let denied = explain_web(8080, &[reads.clone(), everything], DefaultPolicy::Deny, &[]);
        assert_eq!(denied.per_request, None, "{denied}");
        assert!(
            denied.to_string().starts_with(&format!(
                "{WEB} -> {API} port 8080: deny by b/everything rule 0\n  b/everything"
            )),
            "{denied}"
        );

        let other = policy(
            "reads",
            "ALLOW",
            "    - from: [{spiffeId: spiffe://td/ns/a/sa/other}]\n      to: [{paths: [/api]}]\n",
        );
        let unnamed = explain_web(8080, &[other], DefaultPolicy::Deny, &[]);
        assert_eq!(unnamed.per_request, None, "{unnamed}");
        assert!(
            unnamed.to_string().starts_with(&format!(
                "{WEB} -> {API} port 8080: deny by default:deny: no policy allows this connection\n  b/reads"
            )),
            "{unnamed}"
        );
    }
}
