//! Every request head of each admin connection, read before hyper's
//! server sees it: the first by [`first_head`], each later one on a
//! kept-alive connection by [`Heads`]. One the sidecar's HTTP/1.1
//! forwarder would refuse ([`h1::check_head`]) is answered here in its
//! words, as the forwarder answers it (with `trellis-proxy-error:
//! invalid_request`), and the connection closed; one begun and not whole
//! within [`HEAD_TIMEOUT`] is answered 408 ([`HEAD_TIMED_OUT`],
//! `trellis-proxy-error: request_timeout`); a connection idle that long
//! is closed without a word. What the check leaves to hyper (a field
//! name, the framing), and a head after a chunked body hyper refuses
//! (one that does not parse, or over hyper's bounds on chunk extensions
//! or trailers), gets hyper's
//! answer, a status alone; it is logged and counted all the
//! same ([`refused_by_hyper`]). The port never switches protocols, so its
//! answer to a request hyper's server may switch for (an HTTP/1.1 request
//! with an `Upgrade`, or a `CONNECT`), after which [`Heads`] checks no
//! head, says `connection: close` and ends the connection
//! ([`may_switch`](trellis_core::http1::may_switch)): hyper would read on, unchecked, otherwise.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

use bytes::{Bytes, BytesMut};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use trellis_core::connections::serve_http1_for;
use trellis_core::http1::{FirstHead, HeadFault, Heads, first_head};
use trellis_core::logging::throttle::Throttle;
use trellis_core::warn_throttled;

use super::{CONNECTION_LIFETIME, HEAD_TIMEOUT};
use crate::http::h1::{self, LINGER, LINGER_BYTES, MAX_REQUEST_HEAD};
use crate::metrics::Metrics;

/// How a request head the admin port refused is logged, with what was
/// wrong (`problem`, `reason`) and the client: never the head's bytes,
/// which may carry the hook token.
pub const MALFORMED: &str = "admin request refused: malformed request head";

/// What a client that sent part of a request head, and not the rest
/// within [`HEAD_TIMEOUT`], is told (with 408).
pub const HEAD_TIMED_OUT: &str = "request head did not arrive within 5 s";
const _: () = assert!(
    HEAD_TIMEOUT.as_secs() == 5 && HEAD_TIMEOUT.subsec_nanos() == 0,
    "HEAD_TIMED_OUT names the bound"
);

/// Serves `tcp` with hyper's HTTP/1.1 server until `stop` resolves, every
/// request head read and checked by [`h1::check_head`] before hyper sees
/// it: a head refused, or begun and not whole within [`HEAD_TIMEOUT`], is
/// answered in words, logged and counted, and the connection closed.
pub async fn serve<F, S>(
    tcp: TcpStream,
    client: SocketAddr,
    metrics: &Metrics,
    refusals: &Throttle,
    mut stop: Pin<&mut F>,
    service: S,
) where
    F: Future<Output = ()>,
    S: hyper::service::HttpService<Incoming, ResBody = Full<Bytes>>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let first = first_head(
        tcp,
        h1::check_head,
        MAX_REQUEST_HEAD,
        HEAD_TIMEOUT,
        stop.as_mut(),
    );
    let (tcp, read, fault) = match first.await {
        FirstHead::Whole(tcp) => {
            let mut heads = Heads::after_first(tcp, h1::check_head, MAX_REQUEST_HEAD);
            // A later head refused ends hyper's service as `stop` does,
            // after the answer in progress.
            let refusal = heads.signals();
            let stop = async move {
                tokio::select! {
                    () = stop => {}
                    () = refusal.refused() => {}
                }
            };
            let ended =
                serve_http1_for(&mut heads, service, HEAD_TIMEOUT, CONNECTION_LIFETIME, stop).await;
            let Some(fault) = heads.refused(ended.as_ref(), HEAD_TIMED_OUT) else {
                if let Some(error) = ended {
                    refused_by_hyper(&error, client, metrics, refusals);
                }
                return;
            };
            let (read, tcp) = heads.into_parts();
            (tcp, read, fault)
        }
        FirstHead::Refused { io, read, fault } => (io, read, fault),
        FirstHead::Stalled { io, read } => (io, read, HeadFault::timed_out(HEAD_TIMED_OUT)),
        FirstHead::Silent => {
            tracing::debug!(
                %client,
                "no admin request head within {}",
                trellis_core::duration::Words(HEAD_TIMEOUT)
            );
            return;
        }
        // Closed, or failed, before a whole head came: hyper answers
        // nothing either.
        FirstHead::Closed => return,
    };
    refuse(tcp, read, client, &fault, metrics, refusals).await;
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
fn refused_by_hyper(
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
