//! What happened to each request: one access-log line (target
//! [`ACCESS_TARGET`], JSON on stdout whatever `--log-format` says) and the
//! request metrics, both written once the request is over.
//!
//! An [`Entry`] is shared by the request body on its way to the app and
//! the response body on its way back ([`Counted`]), which count the bytes
//! (and drop a caller's `x-trellis-peer-identity`, in any spelling, from
//! request trailers); the last one dropped writes the entry. Fields, in every line:
//! `timestamp` (RFC 3339, UTC), `source` (the caller's SPIFFE ID),
//! `destination` (the app address), `method`, `path` (without the query;
//! cut at [`MAX_LOGGED_PATH`] bytes, then with `path_length`),
//! `status`, `bytes_in`, `bytes_out`, `duration_ms`, `decision` (allow,
//! deny, rate_limited or invalid), `policy` and `rule` (what decided, when
//! something did), `protocol` (`http1` or `h2`). A request the sidecar
//! refused as `invalid` (a head that does not parse or is over one of its
//! limits, `CONNECT`, a `Host` or a path an app could read otherwise) has
//! `problem`, what its answer said was wrong (a path's escape left out);
//! so has one denied before the first policy snapshot
//! (`policy` `default:no-snapshot`); one refused before it was read as a
//! request ([`Entry::refused_head`]) has no `method` or `path`.
//!
//! A request denied by a policy or rate limited is also logged through
//! `tracing`, throttled for each policy or rate limit
//! ([`Entry::log_refusal`]): with the access log off, the log still shows
//! what the sidecar refuses, and what each policy refuses.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::Method;
use http::uri::PathAndQuery;
use hyper::body::{Body, Frame, SizeHint};
use trellis_core::policy::{Decision, Reason};

use super::Connection;
use super::headers::remove_forged;
use crate::logging::access::Line;
use crate::metrics::INBOUND;

/// The tracing target of access-log lines.
pub const ACCESS_TARGET: &str = "trellis::access";

/// The most of a request's path an access-log line holds; a longer one is
/// cut (ending in `…`) and its length given as `path_length`. A caller
/// could otherwise make each line as long as a URI may be (64 KiB), and the
/// lines queued for a slow log collector take memory by their number.
pub const MAX_LOGGED_PATH: usize = 2048;
/// The same for the method, which the caller writes too.
pub const MAX_LOGGED_METHOD: usize = 64;
/// The most of a request's path a refused request's log line
/// ([`Entry::log_refusal`]) holds.
pub const MAX_REFUSAL_PATH: usize = 256;

/// Policies (and rate limits) whose refusals are logged each in a pause of
/// their own ([`Entry::log_refusal`]); past them, the others share one.
/// Bounds what the throttle of those lines remembers.
pub const REFUSAL_POLICIES_LOGGED: usize = 64;

/// What the lines of refused requests are throttled by: their kind
/// (denied, denied with no policy snapshot yet, rate limited) and the
/// policy or rate limit that refused them.
pub type RefusalKey = (&'static str, Box<str>);

/// One request, as it will be logged.
pub struct Entry {
    conn: Arc<Connection>,
    start: Instant,
    /// `None` for a head refused before it was read as a request.
    method: Option<Method>,
    /// Shares the request's bytes: no copy.
    path: Option<PathAndQuery>,
    protocol: &'static str,
    /// One of `metrics::REQUEST_OUTCOMES`.
    pub outcome: &'static str,
    /// What was wrong with a request the sidecar refused as `invalid`, as
    /// its answer says.
    pub problem: Option<&'static str>,
    pub decision: Option<Decision>,
    /// The rate limit that refused the request, if one did.
    pub limit: Option<Arc<str>>,
    status: AtomicU16,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    /// Set once the request body has all been read from the caller.
    body_ended: AtomicBool,
}

impl Entry {
    pub fn start<B>(conn: Arc<Connection>, req: &http::Request<B>, protocol: &'static str) -> Self {
        Entry::new(
            conn,
            protocol,
            Some(req.method().clone()),
            req.uri().path_and_query().cloned(),
        )
    }

    /// A request head the sidecar refused with `status` before it was
    /// read as a request (it does not parse, or is over a limit), `problem`
    /// saying what was wrong: logged without a method or a path, counted
    /// as `invalid`.
    pub fn refused_head(
        conn: Arc<Connection>,
        protocol: &'static str,
        status: http::StatusCode,
        problem: &'static str,
    ) -> Self {
        let mut entry = Entry::new(conn, protocol, None, None);
        entry.outcome = "invalid";
        entry.problem = Some(problem);
        entry.set_status(status);
        entry
    }

    /// An entry for a request allowed so far, with no status yet.
    fn new(
        conn: Arc<Connection>,
        protocol: &'static str,
        method: Option<Method>,
        path: Option<PathAndQuery>,
    ) -> Self {
        Entry {
            conn,
            start: Instant::now(),
            method,
            path,
            protocol,
            outcome: "allow",
            problem: None,
            decision: None,
            limit: None,
            status: AtomicU16::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            body_ended: AtomicBool::new(false),
        }
    }

    pub fn set_status(&self, status: http::StatusCode) {
        self.status.store(status.as_u16(), Ordering::Relaxed);
    }

    /// Counts `n` bytes of body going `direction`.
    pub fn count(&self, direction: Direction, n: usize) {
        let counter = match direction {
            Direction::In => &self.bytes_in,
            Direction::Out => &self.bytes_out,
        };
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Bytes of request body passed to the app so far.
    pub fn bytes_in(&self) -> u64 {
        self.bytes_in.load(Ordering::Relaxed)
    }

    /// Notes that the request body has all been read from the caller.
    pub fn end_body(&self) {
        self.body_ended.store(true, Ordering::Relaxed);
    }

    /// Whether the request body has all been read from the caller.
    pub fn body_ended(&self) -> bool {
        self.body_ended.load(Ordering::Relaxed)
    }

    /// Logs the request, which its `decision` denied or its `limit` rate
    /// limited, at INFO as the listener logs a denied connection: the
    /// peer, the app's port, the method and path (escaped, the path cut at
    /// [`MAX_REFUSAL_PATH`] bytes), the outcome, the policy and the rule.
    /// A caller makes one with each request it sends: at most one line of
    /// each kind (denied, denied with no policy snapshot yet, rate limited)
    /// for each policy or rate limit is written per [`REFUSAL_LOG_PAUSE`],
    /// the next one saying how many were not (`suppressed`): a flood
    /// refused by one policy does not hide the first refusal by another.
    /// Up to [`REFUSAL_POLICIES_LOGGED`] of them are remembered; past
    /// those, the others share one pause. Written whether the access log
    /// is on or not.
    ///
    /// [`REFUSAL_LOG_PAUSE`]: crate::inbound::REFUSAL_LOG_PAUSE
    pub fn log_refusal(&self) {
        let no_snapshot = self
            .decision
            .as_ref()
            .is_some_and(|d| d.reason == Reason::NoSnapshot);
        let (kind, message) = if self.limit.is_some() {
            ("rate_limited", "inbound request rate limited")
        } else if no_snapshot {
            (
                "no_snapshot",
                "inbound request denied: no policy snapshot yet",
            )
        } else {
            ("denied", "inbound request denied")
        };
        let (policy, rule) = self.policy_and_rule();
        let name = policy.unwrap_or_default();
        // The name is copied only when its key is remembered anew, not for
        // each refusal of a flood.
        let is_key = |(k, p): &RefusalKey| *k == kind && **p == *name;
        let make = || (kind, Box::from(name));
        let Some(suppressed) = self.conn.http.refusals.admit_by(is_key, make) else {
            return;
        };
        let suppressed = (suppressed > 0).then_some(suppressed);
        let method = self.method.as_ref().map(Method::as_str).unwrap_or("");
        let path = self.path.as_ref().map_or("", PathAndQuery::path);
        let (method, path) = (
            up_to(method, MAX_LOGGED_METHOD),
            up_to(path, MAX_REFUSAL_PATH),
        );
        tracing::info!(
            peer = %self.conn.peer,
            port = self.conn.target.port(),
            method = %method.escape_debug(),
            path = %path.escape_debug(),
            decision = %self.outcome,
            policy = policy.map(tracing::field::display),
            rule,
            suppressed,
            "{message}"
        );
    }

    /// What decided the request, for its log lines: the rate limit that
    /// refused it, else the deciding policy and rule.
    fn policy_and_rule(&self) -> (Option<&str>, Option<usize>) {
        match (&self.decision, &self.limit) {
            (_, Some(limit)) => (Some(&**limit), None),
            (Some(d), None) => (Some(d.policy_label()), d.rule()),
            (None, None) => (None, None),
        }
    }
}

/// The first `most` bytes of `s` at most, cut on a character boundary.
fn up_to(s: &str, most: usize) -> &str {
    let mut end = most.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl Drop for Entry {
    fn drop(&mut self) {
        // The request is over: its app connection can serve the next one.
        self.conn.upstream.release();
        let status = self.status.load(Ordering::Relaxed);
        let elapsed = self.start.elapsed();
        let metrics = &self.conn.http.metrics;
        metrics.request(status, self.outcome, elapsed.as_secs_f64());
        let (bytes_in, bytes_out) = (
            self.bytes_in.load(Ordering::Relaxed),
            self.bytes_out.load(Ordering::Relaxed),
        );
        metrics.bytes(INBOUND, bytes_in + bytes_out);
        if !self.conn.http.access_log {
            return;
        }
        let (policy, rule) = self.policy_and_rule();
        let mut line = Line::start(SystemTime::now());
        line.raw(self.conn.access_log_caller());
        if let Some(method) = &self.method {
            line.member_up_to("method", method.as_str(), MAX_LOGGED_METHOD);
            let path = self.path.as_ref().map_or("/", PathAndQuery::path);
            line.member_up_to("path", path, MAX_LOGGED_PATH);
        }
        line.number("status", u64::from(status));
        line.number("bytes_in", bytes_in);
        line.number("bytes_out", bytes_out);
        line.millis("duration_ms", elapsed);
        line.member("decision", self.outcome);
        line.member("policy", policy);
        line.number("rule", rule.map(|r| r as u64));
        line.member("protocol", self.protocol);
        line.member("problem", self.problem);
        line.write();
    }
}

/// Which way a [`Counted`] body goes.
#[derive(Debug, Clone, Copy)]
pub enum Direction {
    /// From the caller to the app.
    In,
    /// From the app (or the sidecar) to the caller.
    Out,
}

/// A body that counts its data bytes into an [`Entry`].
pub struct Counted<B> {
    inner: B,
    entry: Arc<Entry>,
    direction: Direction,
}

impl<B> Counted<B> {
    pub fn new(inner: B, entry: Arc<Entry>, direction: Direction) -> Self {
        Counted {
            inner,
            entry,
            direction,
        }
    }
}

impl<B> Body for Counted<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &mut polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.entry.count(self.direction, data.len());
                } else if let (Direction::In, Some(trailers)) =
                    (self.direction, frame.trailers_mut())
                {
                    // An app may read trailers like headers: a caller must
                    // not slip a forged identity or URL override in there
                    // either.
                    remove_forged(trailers);
                }
            }
            Poll::Ready(None) if matches!(self.direction, Direction::In) => self.entry.end_body(),
            _ => {}
        }
        polled
    }

    /// Asked by whoever reads the body before and after each frame: a
    /// request body seen to end is noted in the entry.
    fn is_end_stream(&self) -> bool {
        let end = self.inner.is_end_stream();
        if end && matches!(self.direction, Direction::In) {
            self.entry.end_body();
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
