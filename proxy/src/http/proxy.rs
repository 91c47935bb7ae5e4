//! One request through the sidecar: authorized, cleaned of hop-by-hop
//! headers, given the verified identity, sent to the app over the pooled
//! client of its HTTP version, and answered with the app's streamed
//! response, or with a short local answer when the sidecar refuses it.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::{PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use trellis_core::policy::HttpRequest;
use trellis_core::policy::l7;

use std::sync::Arc;

use super::access::{Counted, Direction, Entry};
use super::{Body, Connection, Protocol, headers};
use crate::policy;

/// The body of a response before it is counted: the app's or the sidecar's.
type LocalBody = Either<Incoming, Full<Bytes>>;

/// gRPC status codes the sidecar answers with.
#[derive(Debug, Clone, Copy)]
pub enum GrpcCode {
    InvalidArgument = 3,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    Unavailable = 14,
}

/// Whether the request is gRPC (its answers then carry `grpc-status`).
pub fn is_grpc(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

pub(super) async fn handle(
    conn: Arc<Connection>,
    mut req: Request<Incoming>,
    protocol: Protocol,
) -> Response<Body> {
    let mut entry = Entry::start(conn.clone(), &req, protocol.as_str());
    let grpc = is_grpc(&req);
    let upgrading = req.version() == Version::HTTP_11 && headers::is_upgrade(req.headers());
    headers::remove_hop_by_hop(req.headers_mut(), upgrading);
    // Before deciding, so rules on headers see what the app will see.
    headers::set_identity(req.headers_mut(), &conn.identity);
    if let Some(refused) = authorize(&conn, &req, grpc, &mut entry) {
        return finish(entry, refused);
    }
    let entry = Arc::new(entry);
    let client = if req.version() == Version::HTTP_2 {
        &conn.http.h2
    } else {
        &conn.http.h1
    };

    // The pooled client dials the URI's authority: always the app.
    let mut parts = std::mem::take(req.uri_mut()).into_parts();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(conn.authority.clone());
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    *req.uri_mut() = Uri::from_parts(parts).expect("scheme, authority and path make a URI");

    let from_client = upgrading.then(|| hyper::upgrade::on(&mut req));
    let req = req.map(|body| Counted::new(body, entry.clone(), Direction::In));
    let mut response = match client.request(req).await {
        Ok(response) => response.map(Either::Left),
        Err(e) => {
            tracing::warn!(peer = %conn.peer, app = %conn.target, error = %e, "request to the app failed");
            local(
                grpc,
                StatusCode::BAD_GATEWAY,
                GrpcCode::Unavailable,
                "app unreachable",
            )
        }
    };
    let switched = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    match from_client {
        Some(from_client) if switched => {
            let from_app = hyper::upgrade::on(&mut response);
            tokio::spawn(splice(from_client, from_app));
        }
        _ => {}
    }
    headers::remove_hop_by_hop(response.headers_mut(), switched && upgrading);
    entry.set_status(response.status());
    response.map(|body| Counted::new(body, entry, Direction::Out))
}

/// A response the sidecar wrote, logged with `entry`.
fn finish(entry: Entry, response: Response<LocalBody>) -> Response<Body> {
    entry.set_status(response.status());
    let entry = Arc::new(entry);
    response.map(|body| Counted::new(body, entry, Direction::Out))
}

/// Decides `req` under the policies in force now; `Some` is the answer to
/// send instead of forwarding it.
fn authorize(
    conn: &Connection,
    req: &Request<Incoming>,
    grpc: bool,
    entry: &mut Entry,
) -> Option<Response<LocalBody>> {
    let metrics = &conn.http.metrics;
    // An `Arc` out of the channel: the read lock is held only to clone it.
    let current = conn.policies.borrow().clone();
    let path = req.uri().path();
    if current.as_ref().is_some_and(|p| p.set.has_l7()) && !l7::is_normalized(path) {
        // Rules match paths as written: `/a/../admin` must not pass for
        // something a rule on `/admin` does not see.
        entry.outcome = "invalid";
        return Some(local(
            grpc,
            StatusCode::BAD_REQUEST,
            GrpcCode::InvalidArgument,
            "path has empty, '.' or '..' segments",
        ));
    }
    let request = HttpRequest {
        method: req.method().as_str(),
        path,
        headers: req.headers(),
    };
    let port = conn.target.port();
    let decision = policy::authorize_request(current.as_deref(), &conn.peer, port, &request);
    policy::count(current.as_deref(), &decision, metrics);
    for audit in &decision.audits {
        tracing::warn!(
            peer = %conn.peer,
            port,
            method = %request.method,
            path,
            decision = %"audit",
            policy = %audit.policy,
            rule = audit.rule,
            "inbound request: would deny (AUDIT, not enforced)"
        );
    }
    let allowed = decision.is_allowed();
    let message = (!allowed).then(|| match decision.rule() {
        Some(rule) => format!("denied by policy {} rule {rule}", decision.policy_label()),
        None => format!("denied by policy {}", decision.policy_label()),
    });
    entry.decision = Some(decision);
    let Some(message) = message else {
        let limits = &current.as_ref()?.rate_limits;
        if limits.is_empty() {
            return None;
        }
        let limited = limits.check(&conn.peer, path).err()?;
        entry.outcome = "rate_limited";
        let mut response = local(
            grpc,
            StatusCode::TOO_MANY_REQUESTS,
            GrpcCode::ResourceExhausted,
            format!("rate limited by policy {}", limited.policy),
        );
        let seconds = limited.retry_after.as_secs_f64().ceil().max(1.0) as u64;
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        entry.limit = Some(limited.policy);
        return Some(response);
    };
    entry.outcome = "deny";
    Some(local(
        grpc,
        StatusCode::FORBIDDEN,
        GrpcCode::PermissionDenied,
        message,
    ))
}

/// Copies bytes between the two upgraded connections until both are done.
async fn splice(client: OnUpgrade, app: OnUpgrade) {
    let (client, app) = match tokio::try_join!(client, app) {
        Ok(both) => both,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let (mut client, mut app) = (TokioIo::new(client), TokioIo::new(app));
    if let Err(e) = crate::net::copy(&mut client, &mut app).await {
        tracing::debug!(error = %e, "upgraded connection ended with an error");
    }
}

/// An answer from the sidecar itself: `status` with `message` as a text
/// body, or for gRPC HTTP 200 with `grpc-status` and `grpc-message` in a
/// trailers-only response.
pub fn local(
    grpc: bool,
    status: StatusCode,
    code: GrpcCode,
    message: impl Into<Bytes>,
) -> Response<LocalBody> {
    let message = message.into();
    let mut response = Response::builder();
    let body = if grpc {
        response = response
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/grpc")
            .header("grpc-status", code as u16);
        if let Ok(value) = HeaderValue::from_maybe_shared(message) {
            response = response.header("grpc-message", value);
        }
        Bytes::new()
    } else {
        response = response
            .status(status)
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8");
        let mut text = Vec::with_capacity(message.len() + 1);
        text.extend_from_slice(&message);
        text.push(b'\n');
        text.into()
    };
    response
        .body(Either::Right(Full::new(body)))
        .expect("static headers are valid")
}
