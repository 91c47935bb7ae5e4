//! The first request head of each admin connection, read before hyper's
//! server is given the connection: one the sidecar's HTTP/1.1 forwarder
//! would refuse ([`h1::check_head`]) is answered here in its words, as
//! the forwarder answers it, and the connection closed; any other is
//! handed to hyper with the bytes read so far. A head hyper refuses later
//! on a kept-alive connection gets hyper's answer, a status alone; it is
//! logged and counted all the same ([`refused_by_hyper`]).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use trellis_core::http1::{FirstHead, HeadFault, Rewind, first_head};
use trellis_core::logging::throttle::Throttle;
use trellis_core::warn_throttled;

use super::HEAD_TIMEOUT;
use crate::http::h1::{self, LINGER, LINGER_BYTES, MAX_REQUEST_HEAD};
use crate::metrics::Metrics;

/// How a request head the admin port refused is logged, with what was
/// wrong (`problem`, `reason`) and the client: never the head's bytes,
/// which may carry the hook token.
pub const MALFORMED: &str = "admin request refused: malformed request head";

/// Reads `tcp`'s first request head, within [`HEAD_TIMEOUT`]
/// ([`first_head`], checked by [`h1::check_head`]): the connection with
/// what was read put back, for hyper to serve, or `None` once it is
/// closed: a head refused (answered, logged and counted), the client gone
/// or silent, or `stop` resolved first.
pub async fn first<F: Future<Output = ()>>(
    tcp: TcpStream,
    client: SocketAddr,
    metrics: &Metrics,
    refusals: &Throttle,
    stop: Pin<&mut F>,
) -> Option<Rewind<TcpStream>> {
    match first_head(tcp, h1::check_head, MAX_REQUEST_HEAD, HEAD_TIMEOUT, stop).await {
        FirstHead::Whole(tcp) => Some(tcp),
        FirstHead::Refused { io, read, fault } => {
            refuse(io, read, client, &fault, metrics, refusals).await;
            None
        }
        FirstHead::Silent => {
            tracing::debug!(
                %client,
                "no admin request head within {}",
                trellis_core::duration::Words(HEAD_TIMEOUT)
            );
            None
        }
        // Closed, or failed, before a whole head came: hyper answers
        // nothing either.
        FirstHead::Closed => None,
    }
}

/// Answers a refused head in words, logs and counts it, and closes the
/// connection, lingering so that the answer is not lost to a reset for
/// bytes left unread. The answer gets [`HEAD_TIMEOUT`] to be written.
async fn refuse(
    mut tcp: TcpStream,
    mut buf: BytesMut,
    client: SocketAddr,
    fault: &HeadFault,
    metrics: &Metrics,
    refusals: &Throttle,
) {
    logged(client, fault, true, metrics, refusals);
    let answered = tokio::time::timeout(HEAD_TIMEOUT, h1::refuse_head(&mut tcp, fault)).await;
    if matches!(answered, Ok(Ok(_))) {
        let _ = tcp.shutdown().await;
        trellis_core::refusal::linger(&mut tcp, &mut buf, LINGER, LINGER_BYTES).await;
    }
}

/// Logs and counts a head hyper refused on a connection it served (its
/// `error`), answered with a status alone; errors that are not a refused
/// head are left alone.
pub fn refused_by_hyper(
    error: &hyper::Error,
    client: SocketAddr,
    metrics: &Metrics,
    refusals: &Throttle,
) {
    if let Some(fault) = HeadFault::from_hyper(error, &h1::RULES.bounds) {
        logged(client, &fault, false, metrics, refusals);
    }
}

/// The warning of a refused head, at most once per kind per
/// [`REFUSAL_LOG_PAUSE`](crate::inbound::REFUSAL_LOG_PAUSE), then its
/// count: a refusal the metric shows has been logged, or counted as not.
fn logged(
    client: SocketAddr,
    fault: &HeadFault,
    worded: bool,
    metrics: &Metrics,
    refusals: &Throttle,
) {
    let reason = fault.reason();
    let status = fault.status.as_u16();
    if worded {
        warn_throttled!(
            refusals,
            reason,
            { %client, status, reason, problem = fault.why },
            "{MALFORMED}"
        );
    } else {
        warn_throttled!(
            refusals,
            reason,
            { %client, status, reason, problem = fault.why, answered = "status only" },
            "{MALFORMED}"
        );
    }
    metrics.admin_malformed_request(reason);
}
