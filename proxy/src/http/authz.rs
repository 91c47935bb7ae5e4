//! Per-request authorization as a tower layer: every request is decided by
//! the L7 rules in force ([`PolicySet::decide_request`] through
//! [`policy::authorize_request`]) before anything below it sees it.
//!
//! A refused request is answered here (403 naming the deciding policy and
//! rule, gRPC `PERMISSION_DENIED`; 400 naming what is wrong with a path
//! an app could read as another one, [`l7::check_path`], where an ALLOW or
//! DENY rule on the request's port or a rate limit reads paths; 400 for
//! more than one `Host`, one that differs from the target's authority,
//! none on an HTTP/1.1 request, or a target authority with a userinfo
//! part ([`l7::host_problem`]); 501 for
//! `CONNECT`, whatever the rules; 431 for an HTTP/2 request whose header
//! list is over [`H2_MAX_HEADER_LIST`](super::H2_MAX_HEADER_LIST), first) and never reaches the inner service;
//! being the first layer, it
//! also keeps such paths from the rate limits below it. Each decision is
//! counted in `trellis_decisions_total`, AUDIT matches are logged as
//! "would deny", and the decision goes to the access log through the
//! request's [`Entry`](super::access::Entry).
//!
//! The policies are read from the connection's `watch` channel when the
//! stack is polled for readiness, and only when they changed: deciding a
//! request takes no lock.
//!
//! [`PolicySet::decide_request`]: trellis_core::policy::PolicySet::decide_request

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use tokio::sync::watch;
use trellis_core::SpiffeId;
use trellis_core::policy::l7::PathProblem;
use trellis_core::policy::{HttpRequest, Reason, l7};
use trellis_core::refusal::token;

use super::proxy::{Exchange, GrpcCode, LocalBody, local, local_prepared};
use super::{Check, Guard, GuardLayer};
use crate::metrics::Metrics;
use crate::policy::{self, Policies};

/// What a request is answered, with 403, before the sidecar has its first
/// policy snapshot: whatever the mesh default will be, it denies all
/// (`default:no-snapshot`). Its access-log line has it as `problem`. The
/// control plane not reached is one reason; a Watch it refused (the
/// per-sidecar cap, a revoked identity, a snapshot too large, a first
/// snapshot this sidecar refused) is another, and only the log says which.
pub const NO_SNAPSHOT_DENIAL: &str =
    "denied: this sidecar has no policy snapshot yet (see its log for why)";

/// What a `CONNECT` request is answered, with 501.
pub use trellis_core::policy::l7::CONNECT_REFUSED;

/// What an HTTP/2 request whose header list is over
/// [`H2_MAX_HEADER_LIST`](super::H2_MAX_HEADER_LIST) is answered, with 431.
pub use trellis_core::policy::l7::H2_HEADERS_TOO_LARGE;

/// Wraps a service in [`Authorize`].
pub type AuthorizeLayer = GuardLayer<Authorization>;

impl AuthorizeLayer {
    /// Decides requests from `peer` to the app's `port` under the policies
    /// `policies` holds, counting decisions in `metrics`.
    pub fn new(
        peer: SpiffeId,
        port: u16,
        policies: watch::Receiver<Option<Arc<Policies>>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let check = Authorization {
            peer,
            port,
            metrics,
        };
        GuardLayer { check, policies }
    }
}

/// Answers requests the policies deny; passes the others to `S`. Before
/// the first snapshot, it denies all.
pub type Authorize<S> = Guard<Authorization, S>;

/// The decision [`Authorize`] makes of each request from `peer` to the
/// app's `port`.
#[derive(Clone)]
pub struct Authorization {
    peer: SpiffeId,
    port: u16,
    metrics: Arc<Metrics>,
}

impl Check for Authorization {
    /// Either way, `exchange`'s entry says what decided.
    fn refusal<B>(
        &self,
        current: Option<&Policies>,
        exchange: &mut Exchange<B>,
    ) -> Option<Response<LocalBody>> {
        let Exchange {
            request,
            entry,
            grpc,
            headers_too_large,
            ..
        } = exchange;
        // A request refused before any rule is read: `problem` in its
        // log line, `message` in its answer.
        let mut invalid = |status, code, reason, problem: &'static str, message: Bytes| {
            entry.outcome = "invalid";
            entry.problem = Some(problem);
            Some(local(*grpc, status, code, reason, message))
        };
        if *headers_too_large {
            return invalid(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                GrpcCode::ResourceExhausted,
                token::HEADERS_TOO_LARGE,
                H2_HEADERS_TOO_LARGE,
                Bytes::from_static(H2_HEADERS_TOO_LARGE.as_bytes()),
            );
        }
        if request.method() == Method::CONNECT {
            // A tunnel's bytes would reach the app with no request in them
            // decided; the app's address also replaces the target, so no
            // tunnel could work. Refused whatever the policies say.
            return invalid(
                StatusCode::NOT_IMPLEMENTED,
                GrpcCode::InvalidArgument,
                token::CONNECT_REFUSED,
                CONNECT_REFUSED,
                Bytes::from_static(CONNECT_REFUSED.as_bytes()),
            );
        }
        // An HTTP/1.1 request in absolute form has its target's authority
        // as `Host` by now ([`Exchange::start`]): one without names none.
        let required = request.version() == http::Version::HTTP_11;
        if let Some(problem) =
            l7::host_problem(request.headers(), request.uri().authority(), required)
        {
            // The app and the rules could read it as meant for another
            // host than the one named, or for none.
            return invalid(
                StatusCode::BAD_REQUEST,
                GrpcCode::InvalidArgument,
                token::INVALID_REQUEST,
                problem,
                Bytes::from_static(problem.as_bytes()),
            );
        }
        let path = request.uri().path();
        // Rules and rate limits match paths as written, apps route them
        // decoded and resolved: `/a/../admin`, `/%61dmin` or `/admin%2Fx`
        // must not pass for something a rule on `/admin/*` does not see.
        // Only where a rule on this port or a rate limit reads paths (and
        // never for `OPTIONS *`), as `policy explain` answers too.
        let reads_paths = current.is_some_and(|p| p.checks_paths(self.port));
        if let Some(problem) =
            l7::request_path_problem(request.method().as_str(), path, reads_paths)
        {
            return invalid(
                StatusCode::BAD_REQUEST,
                GrpcCode::InvalidArgument,
                token::INVALID_REQUEST,
                path_problem(problem),
                problem.to_string().into(),
            );
        }
        let http = HttpRequest {
            method: request.method().as_str(),
            path,
            headers: request.headers(),
        };
        let (peer, port) = (&self.peer, self.port);
        let (decision, denial) = policy::authorize_request(current, peer, port, &http).into_parts();
        policy::count(current, &decision, &self.metrics);
        for audit in &decision.audits {
            tracing::warn!(
                %peer,
                port,
                method = %http.method,
                path,
                decision = %"audit",
                policy = %audit.policy,
                rule = audit.rule,
                "inbound request: would deny (AUDIT, not enforced)"
            );
        }
        // What the caller is told: the deciding policy and rule (`denied
        // by policy NS/NAME rule N`), the mesh default's label and that no
        // policy allowed the request (`DefaultPolicy::denial`), or
        // `NO_SNAPSHOT_DENIAL`: each built once, by the policies that
        // decided (or for good), so a denial costs no allocation for it.
        let refused = denial.map(|text| {
            entry.outcome = "deny";
            if decision.reason == Reason::NoSnapshot {
                entry.problem = Some(NO_SNAPSHOT_DENIAL);
            }
            local_prepared(
                *grpc,
                StatusCode::FORBIDDEN,
                GrpcCode::PermissionDenied,
                token::DENIED,
                text,
            )
        });
        entry.decision = Some(decision);
        if refused.is_some() {
            entry.log_refusal();
        }
        refused
    }
}

/// What the access log says of a path refused for `problem`: the words
/// its answer has, without the escape they quote (the line's `path` has
/// it), so that no refusal costs an allocation to log.
fn path_problem(problem: PathProblem) -> &'static str {
    match problem {
        PathProblem::Segment => {
            "path has an empty, '.' or '..' segment (';' parameters aside, as servlet \
             containers read them)"
        }
        PathProblem::EncodedUnreserved(_) => {
            "path encodes an unreserved character: send unreserved characters as they are \
             (RFC 3986)"
        }
        PathProblem::EncodedSlash(_) => "path encodes '/': an app could read it as a separator",
        PathProblem::EncodedBackslash(_) => {
            "path encodes '\\': an app could read it as a separator"
        }
        PathProblem::Backslash => "path contains '\\': an app could read it as a separator",
        PathProblem::BadEscape => "path has a '%' not followed by two hex digits",
        PathProblem::EncodedControl(_) => {
            "path encodes a control character: an app could cut the path there"
        }
        PathProblem::DoubleEncoded(_) => {
            "path encodes '%' as %25 before two hex digits: an app that decodes twice could \
             read another path"
        }
        PathProblem::NotUtf8 => "path has percent escapes that do not decode to UTF-8",
        PathProblem::LookAlike(_, like) => look_alike(like),
    }
}

/// What the access log says of a path refused for a character an app
/// could read as `like`: named by the refused character `like` holds
/// (looked for in the order `.`, `/`, `?`, `\`, `;`, `%`, `#`), never by
/// one it does not hold, whatever folds a later Unicode adds.
fn look_alike(like: &str) -> &'static str {
    match like {
        "." => return "path contains a character an app could read as '.'",
        ".." => return "path contains a character an app could read as '..'",
        "..." => return "path contains a character an app could read as '...'",
        "/" => return "path contains a character an app could read as '/'",
        "\\" => return "path contains a character an app could read as '\\'",
        ";" => return "path contains a character an app could read as ';'",
        "%" => return "path contains a character an app could read as '%'",
        "#" => return "path contains a character an app could read as '#'",
        _ => {}
    }
    let holds = |c: char| like.contains(c);
    if holds('.') {
        "path contains a character an app could read as text with a '.'"
    } else if holds('/') && like.chars().all(|c| c == '/' || c.is_ascii_alphabetic()) {
        "path contains a character an app could read as letters around a '/'"
    } else if holds('/') {
        "path contains a character an app could read as text with a '/'"
    } else if holds('?') {
        "path contains a character an app could read as '?'"
    } else if holds('\\') {
        "path contains a character an app could read as text with a '\\'"
    } else if holds(';') {
        "path contains a character an app could read as text with a ';'"
    } else if holds('%') {
        "path contains a character an app could read as text with a '%'"
    } else if holds('#') {
        "path contains a character an app could read as text with a '#'"
    } else {
        "path contains a character an app could read as other ASCII text"
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http::Request;
    use tower::{Layer, Service, ServiceExt};

    use super::*;
    use crate::http::testing::{connection, counting_app, exchange, id, no_admin};

    /// A refused fold is described by the character it holds, folds no
    /// table has yet included: none is said to be read as '\\' unless
    /// it holds one.
    #[test]
    fn a_refused_fold_is_described_by_the_character_it_holds() {
        let says = |like: &'static str| path_problem(PathProblem::LookAlike('\u{FFFF}', like));
        for (like, said) in [
            ("\\", "path contains a character an app could read as '\\'"),
            (
                "x\\",
                "path contains a character an app could read as text with a '\\'",
            ),
            (";", "path contains a character an app could read as ';'"),
            (
                "x;",
                "path contains a character an app could read as text with a ';'",
            ),
            (
                "%1",
                "path contains a character an app could read as text with a '%'",
            ),
            (
                "1#",
                "path contains a character an app could read as text with a '#'",
            ),
            ("?!", "path contains a character an app could read as '?'"),
            (
                "1/2",
                "path contains a character an app could read as text with a '/'",
            ),
            (
                "a/c",
                "path contains a character an app could read as letters around a '/'",
            ),
            (
                "1.",
                "path contains a character an app could read as text with a '.'",
            ),
            (
                "ab",
                "path contains a character an app could read as other ASCII text",
            ),
        ] {
            assert_eq!(says(like), said, "{like:?}");
        }
    }

    #[tokio::test]
    async fn the_layer_answers_a_denied_request_itself_and_never_calls_the_service() {
        let metrics = Arc::new(Metrics::new());
        let (_keep, policies) = watch::channel(Some(Arc::new(no_admin(&metrics))));
        let web = id("/ns/a/sa/web");
        let conn = connection(&metrics, &web, &policies);
        let calls = Arc::new(AtomicUsize::new(0));
        let app = counting_app(&calls);
        let mut service = AuthorizeLayer::new(web, 8080, policies, metrics.clone()).layer(app);
        let exchange = |path: &str, grpc: bool| {
            let request = Request::get(path).header("host", "api").body(()).unwrap();
            exchange(&conn, request, grpc)
        };
        let mut call = async |path: &str, grpc: bool| {
            let ready = service.ready().await.unwrap();
            ready.call(exchange(path, grpc)).await.unwrap()
        };

        assert_eq!(call("/users", false).await.status(), StatusCode::OK);
        assert_eq!(calls.load(Ordering::Relaxed), 1);
        let denied = call("/admin/x", false).await;
        assert_eq!(denied.status(), StatusCode::FORBIDDEN);
        let denied = call("/admin/x", true).await;
        assert_eq!(
            denied.status(),
            StatusCode::OK,
            "gRPC errors travel in trailers"
        );
        assert_eq!(denied.headers()["grpc-status"], "7");
        assert_eq!(
            denied.headers()["grpc-message"],
            "trellis: denied by policy b/no-admin rule 0"
        );
        for odd in ["/users/../admin/x", "/%61dmin/x", "/admin%2Fx"] {
            assert_eq!(call(odd, false).await.status(), StatusCode::BAD_REQUEST);
        }
        assert_eq!(call("/a%20b", false).await.status(), StatusCode::OK);
        assert_eq!(
            calls.load(Ordering::Relaxed),
            2,
            "the service was called for a refused request"
        );
    }

    /// A denial by a rule is answered with the text built for that rule
    /// when the policies were compiled: each answer shares it (the same
    /// bytes, no copy made), HTTP body and `grpc-message` alike.
    #[tokio::test]
    async fn a_denial_by_a_rule_shares_the_text_built_for_it() {
        use http_body_util::BodyExt;

        let metrics = Arc::new(Metrics::new());
        let (_keep, policies) = watch::channel(Some(Arc::new(no_admin(&metrics))));
        let web = id("/ns/a/sa/web");
        let conn = connection(&metrics, &web, &policies);
        let mut authorize = AuthorizeLayer::new(web, 8080, policies, metrics).layer(());
        let mut deny = |(path, host): (&str, &str), grpc: bool| {
            let request = Request::get(path).header("host", host);
            let mut exchange = exchange(&conn, request.body(()).unwrap(), grpc);
            authorize.check(&mut exchange).expect("denied")
        };
        let body = async |answer: Response<LocalBody>| match answer.into_body() {
            http_body_util::Either::Right(full) => full.collect().await.unwrap().to_bytes(),
            http_body_util::Either::Left(_) => panic!("the app answered"),
        };
        for (request, rule) in [(("/admin/x", "api"), 0), (("/x", "admin"), 1)] {
            let text = format!("trellis: denied by policy b/no-admin rule {rule}");
            let first = body(deny(request, false)).await;
            let again = body(deny(request, false)).await;
            assert_eq!(first, format!("{text}\n"));
            assert_eq!(first, again);
            assert_eq!(first.as_ptr(), again.as_ptr(), "a body built per request");
            let first = deny(request, true);
            let again = deny(request, true);
            let (first, again) = (
                &first.headers()["grpc-message"],
                &again.headers()["grpc-message"],
            );
            assert_eq!(first, text.as_str());
            assert_eq!(
                first.as_bytes().as_ptr(),
                again.as_bytes().as_ptr(),
                "a grpc-message built per request"
            );
        }
    }

    /// Every request refused as `invalid` has its access-log line say why,
    /// as its answer does.
    #[test]
    fn every_invalid_request_has_a_problem() {
        let metrics = Arc::new(Metrics::new());
        let (_keep, policies) = watch::channel(Some(Arc::new(no_admin(&metrics))));
        let web = id("/ns/a/sa/web");
        let conn = connection(&metrics, &web, &policies);
        let mut authorize = AuthorizeLayer::new(web, 8080, policies, metrics).layer(());
        let connect = Request::connect("api:443").body(()).unwrap();
        let hosts = Request::get("/users")
            .header("host", "a")
            .header("host", "b")
            .body(())
            .unwrap();
        let no_host = Request::get("/users").body(()).unwrap();
        let userinfo = Request::get("http://user@api/users")
            .header("host", "user@api")
            .body(())
            .unwrap();
        let mut cases = vec![
            (connect, StatusCode::NOT_IMPLEMENTED, CONNECT_REFUSED),
            (hosts, StatusCode::BAD_REQUEST, "more than one Host header"),
            (no_host, StatusCode::BAD_REQUEST, l7::MISSING_HOST),
            (userinfo, StatusCode::BAD_REQUEST, l7::AUTHORITY_USERINFO),
        ];
        for (path, problem) in [
            (
                "/%61dmin/x",
                "path encodes an unreserved character: send unreserved characters as they \
                 are (RFC 3986)",
            ),
            (
                "/users/../admin/x",
                "path has an empty, '.' or '..' segment (';' parameters aside, as servlet \
                 containers read them)",
            ),
            (
                "/admin%2fx",
                "path encodes '/': an app could read it as a separator",
            ),
            ("/admin%x", "path has a '%' not followed by two hex digits"),
            (
                "/public/%ef%bc%8e%ef%bc%8e/admin",
                "path contains a character an app could read as '.'",
            ),
            (
                "/public/%E2%80%A5/admin",
                "path contains a character an app could read as '..'",
            ),
            (
                "/admin%E2%80%A6",
                "path contains a character an app could read as '...'",
            ),
            (
                "/admin%E2%92%88",
                "path contains a character an app could read as text with a '.'",
            ),
            (
                "/admin%CD%BEx",
                "path contains a character an app could read as ';'",
            ),
            (
                "/%EF%BC%8561dmin",
                "path contains a character an app could read as '%'",
            ),
            (
                "/admin%EF%BC%9Fx",
                "path contains a character an app could read as '?'",
            ),
            (
                "/admin%E2%81%88",
                "path contains a character an app could read as '?'",
            ),
            (
                "/admin%EF%BC%83x",
                "path contains a character an app could read as '#'",
            ),
            (
                "/%E2%84%80/keys",
                "path contains a character an app could read as letters around a '/'",
            ),
            (
                "/admin%EF%BC%BCx",
                "path contains a character an app could read as '\\'",
            ),
        ] {
            let request = Request::get(path).header("host", "api").body(()).unwrap();
            cases.push((request, StatusCode::BAD_REQUEST, problem));
        }
        for (request, status, problem) in cases {
            let what = format!("{} {}", request.method(), request.uri());
            let mut exchange = exchange(&conn, request, false);
            let answer = authorize.check(&mut exchange).expect(&what);
            assert_eq!(answer.status(), status, "{what}");
            assert_eq!(exchange.entry.outcome, "invalid", "{what}");
            assert_eq!(exchange.entry.problem, Some(problem), "{what}");
        }
    }
}
