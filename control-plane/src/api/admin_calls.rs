//! What the control plane keeps of the Admin calls it answers: each is
//! counted by method and gRPC code (`trellis_admin_calls_total`), and each
//! one refused is logged, naming the method, the caller (its SPIFFE ID, or
//! `anonymous` without a client certificate), its address, the code and
//! the status message: `admin call refused` at WARN for a caller the API
//! does not allow (PERMISSION_DENIED, UNAUTHENTICATED), at INFO for the
//! caller's own mistakes (INVALID_ARGUMENT, NOT_FOUND, ...), and `admin
//! call failed` at WARN for the control plane's own failures (INTERNAL,
//! UNAVAILABLE, ...). The request and its metadata are never logged: a
//! caller's bearer token or key stays out of the log.
//!
//! [`AdminCalls`] wraps the whole Admin service, its caller check
//! ([`super::OnlyCaller`]) included, so a caller refused before its
//! request is read is logged as the others are. A refused call's answer
//! carries its status in its headers (tonic answers an error of a unary
//! call trailers-only); an answer without one was answered with its
//! response. Any caller with a certificate of the trust domain, or none,
//! can be refused as often as it calls, so a line of one caller, method
//! and code is written at most once per [`REFUSAL_LOG_PAUSE`], the next one
//! saying how many were not (`suppressed`); each is counted.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::server::NamedService;
use tonic::{Code, Status};
use trellis_core::SpiffeId;
use trellis_core::grpc::code_name;
use trellis_core::logging::keyed::Keyed;

use super::PeerInfo;
use crate::metrics::Metrics;
use crate::server::REFUSAL_LOG_PAUSE;

/// The methods of `trellis.admin.v1.Admin`, as the metric and the log name
/// them; a call of any other is named `unknown`.
pub const ADMIN_METHODS: &[&str] = &[
    "CreateJoinToken",
    "ListWorkloads",
    "ApplyPolicy",
    "GetPolicy",
    "ListPolicies",
    "DeletePolicy",
    "Explain",
    "ListIssuedCertificates",
    "RevokeIdentity",
    "UnrevokeIdentity",
    "ListRevocations",
];

/// How many callers, methods and codes keep a log window of their own;
/// past that they share one.
const REFUSAL_LINES_KEPT: usize = 64;

/// The Admin service `S`, its calls counted and its refusals logged.
#[derive(Clone)]
pub(crate) struct AdminCalls<S> {
    inner: S,
    record: Arc<Record>,
}

/// Where the calls are counted and their refusals logged.
struct Record {
    metrics: Arc<Metrics>,
    lines: Keyed<LineKey>,
}

/// What a refusal's log window is kept for.
#[derive(Clone, PartialEq)]
struct LineKey {
    caller: Option<SpiffeId>,
    method: &'static str,
    code: Code,
}

impl<S> AdminCalls<S> {
    /// `inner`, its calls counted in `metrics`.
    pub(crate) fn new(inner: S, metrics: Arc<Metrics>) -> Self {
        Self {
            inner,
            record: Arc::new(Record {
                metrics,
                lines: Keyed::new(REFUSAL_LOG_PAUSE, REFUSAL_LINES_KEPT),
            }),
        }
    }
}

impl<S: NamedService> NamedService for AdminCalls<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tower::Service<http::Request<Body>> for AdminCalls<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<B>, Error = Infallible>,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<B>;
    type Error = Infallible;
    type Future = futures::future::BoxFuture<'static, Result<http::Response<B>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let method = method_of(request.uri().path());
        let peer = request.extensions().get::<PeerInfo>();
        let remote = peer.map(|p| p.remote);
        let caller = peer.and_then(|p| p.spiffe_id.clone());
        let record = self.record.clone();
        let answer = self.inner.call(request);
        Box::pin(async move {
            let Ok(answer) = answer.await;
            let status = Status::from_header_map(answer.headers());
            let code = status.as_ref().map_or(Code::Ok, Status::code);
            record.metrics.admin_call(method, code_name(code));
            if let Some(status) = status.filter(|s| s.code() != Code::Ok) {
                record.refused(method, caller, remote, &status);
            }
            Ok(answer)
        })
    }
}

impl Record {
    /// Logs the refusal of a call of `method` by `caller` from `remote`
    /// with `status`, unless a line of the same caller, method and code
    /// was written within the window.
    fn refused(
        &self,
        method: &'static str,
        caller: Option<SpiffeId>,
        remote: Option<SocketAddr>,
        status: &Status,
    ) {
        let code = status.code();
        let admitted = self.lines.admit_by(
            |k| k.method == method && k.code == code && k.caller == caller,
            || LineKey {
                caller: caller.clone(),
                method,
                code,
            },
        );
        let Some(suppressed) = admitted else {
            return;
        };
        let suppressed = (suppressed > 0).then_some(suppressed);
        let caller = Caller(caller.as_ref());
        let client = remote.map(tracing::field::display);
        let code = code_name(code);
        // `detail`, not `message`: that is the event's own message field.
        let detail = status.message();
        match fault(status.code()) {
            Fault::NotAllowed => tracing::warn!(
                method, %caller, client, code, detail, suppressed, "admin call refused"
            ),
            Fault::Callers => tracing::info!(
                method, %caller, client, code, detail, suppressed, "admin call refused"
            ),
            Fault::Ours => tracing::warn!(
                method, %caller, client, code, detail, suppressed, "admin call failed"
            ),
        }
    }
}

/// Whose fault a refused call is, which decides its line.
#[derive(Debug, PartialEq, Eq)]
enum Fault {
    /// A caller the API does not allow: worth an operator's look.
    NotAllowed,
    /// The caller's own mistake: a bad argument, a missing policy.
    Callers,
    /// The control plane's, or what it depends on.
    Ours,
}

fn fault(code: Code) -> Fault {
    match code {
        Code::PermissionDenied | Code::Unauthenticated => Fault::NotAllowed,
        Code::Internal | Code::Unknown | Code::DataLoss | Code::Unavailable => Fault::Ours,
        _ => Fault::Callers,
    }
}

/// A caller as its line names it: its SPIFFE ID, or `anonymous` without a
/// client certificate.
pub(super) struct Caller<'a>(pub(super) Option<&'a SpiffeId>);

impl std::fmt::Display for Caller<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(id) => write!(f, "{id}"),
            None => f.write_str("anonymous"),
        }
    }
}

/// The Admin method `path` (`/trellis.admin.v1.Admin/ApplyPolicy`) calls,
/// one of [`ADMIN_METHODS`], or `unknown`.
fn method_of(path: &str) -> &'static str {
    let name = path.rsplit('/').next().unwrap_or_default();
    ADMIN_METHODS
        .iter()
        .find(|m| **m == name)
        .copied()
        .unwrap_or("unknown")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every method of the Admin service in its .proto file is named, and
    /// nothing else.
    #[test]
    fn the_methods_named_are_the_admin_services() {
        let proto = include_str!("../../../proto/proto/trellis/admin/v1/admin.proto");
        let service = proto
            .split("service Admin {")
            .nth(1)
            .and_then(|rest| rest.split("\n}").next())
            .expect("the Admin service in admin.proto");
        let mut declared: Vec<&str> = service
            .lines()
            .filter_map(|l| l.trim().strip_prefix("rpc "))
            .map(|l| l.split('(').next().unwrap_or_default().trim())
            .collect();
        let mut named = ADMIN_METHODS.to_vec();
        declared.sort_unstable();
        named.sort_unstable();
        assert_eq!(declared, named);
    }

    #[test]
    fn a_method_is_named_only_when_the_admin_service_has_it() {
        assert_eq!(
            method_of("/trellis.admin.v1.Admin/ApplyPolicy"),
            "ApplyPolicy"
        );
        assert_eq!(method_of("/trellis.admin.v1.Admin/DropTables"), "unknown");
        assert_eq!(method_of(""), "unknown");
    }

    #[test]
    fn a_caller_not_allowed_is_told_from_a_callers_mistake_and_our_failure() {
        assert_eq!(fault(Code::PermissionDenied), Fault::NotAllowed);
        assert_eq!(fault(Code::Unauthenticated), Fault::NotAllowed);
        for code in [
            Code::InvalidArgument,
            Code::NotFound,
            Code::FailedPrecondition,
        ] {
            assert_eq!(fault(code), Fault::Callers, "{code:?}");
        }
        for code in [Code::Internal, Code::Unavailable] {
            assert_eq!(fault(code), Fault::Ours, "{code:?}");
        }
    }
}
