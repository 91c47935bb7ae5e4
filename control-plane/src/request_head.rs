//! The request heads the control plane's HTTP/1.1 ports (the admin port,
//! the webhook port) refuse. Each connection's first head is read and
//! checked before hyper's server is given the connection
//! ([`trellis_core::http1`]): one that does not parse, is too large, or
//! has a target too long or not a URI, is answered 400, 431 or 414 with a
//! line of text naming the fault (a bare CR in a line among them, named as
//! the sidecar names it), and the connection closed. A head hyper
//! refuses later on a kept-alive connection (or for what is left to it: a
//! field name, the framing) gets hyper's own answer, a status alone.
//! Either way the refusal is counted by its kind (`reason`: `malformed`,
//! `head_too_large`, `target_too_long`) in the port's metric and logged as
//! a warning naming the client and the fault, by the port's `Refusals`,
//! at most once per kind per
//! [`REFUSAL_LOG_PAUSE`](crate::server::REFUSAL_LOG_PAUSE). Never a
//! header's value: the webhook's requests carry AdmissionReviews, the
//! admin port's may carry tokens.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use trellis_core::http1::{self, Bounds, FirstHead, HeadFault, Rewind};
use trellis_core::policy::l7::MAX_REQUEST_HEAD;

use crate::server::Refusals;

/// Reads `io`'s first request head, within `timeout`: the connection with
/// what was read put back, for hyper to serve, or `None` once it is
/// closed: a head refused (answered in words, counted and logged by
/// `refusals` as `message`), the client gone or silent, or `stop`
/// resolved first.
pub(crate) async fn first<S, F>(
    io: S,
    client: SocketAddr,
    timeout: Duration,
    refusals: &Refusals,
    message: &str,
    stop: Pin<&mut F>,
) -> Option<Rewind<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: Future<Output = ()>,
{
    match http1::first_head(io, http1::check_head, MAX_REQUEST_HEAD, timeout, stop).await {
        FirstHead::Whole(io) => Some(io),
        FirstHead::Refused { io, read, fault } => {
            // Counted before the answer, so that a client reading the
            // metrics once it has its answer finds it counted.
            refused(client, &fault, true, refusals, message);
            http1::refuse(io, read, &fault, timeout).await;
            None
        }
        // Hyper would have closed these unanswered too.
        FirstHead::Silent | FirstHead::Closed => None,
    }
}

/// Counts and logs a head hyper refused on a connection it served (its
/// `error`), answered with a status alone; errors that are not a refused
/// head are left alone.
pub(crate) fn refused_by_hyper(
    error: &hyper::Error,
    client: SocketAddr,
    refusals: &Refusals,
    message: &str,
) {
    if let Some(fault) = HeadFault::from_hyper(error, &Bounds::PORT) {
        refused(client, &fault, false, refusals, message);
    }
}

fn refused(
    client: SocketAddr,
    fault: &HeadFault,
    worded: bool,
    refusals: &Refusals,
    message: &str,
) {
    refusals.refuse(
        client,
        fault.reason(),
        Some(&Answered { fault, worded }),
        message,
    );
}

/// What a refused head was answered, as its log line's `error` says it:
/// `answered 400: malformed request line: invalid method`, or for hyper's
/// answer `answered 400 with a status alone: malformed request head`.
struct Answered<'a> {
    fault: &'a HeadFault,
    worded: bool,
}

impl fmt::Display for Answered<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = self.fault.status.as_u16();
        let alone = if self.worded {
            ""
        } else {
            " with a status alone"
        };
        write!(f, "answered {status}{alone}: {}", self.fault.why)
    }
}
