//! A deadline for the request of each unary call on the gRPC port: its
//! body (the one message and the end of the stream) must have arrived
//! within [`REQUEST_BODY_TIMEOUT`] of its headers, else the call ends with
//! `DEADLINE_EXCEEDED` and what it had read is dropped. Without it, a
//! client (authenticated or not: Certify takes a token) that announces a
//! message in the gRPC length prefix, sends most of it and stalls holds the
//! buffer for as long as it keeps its connection, on each of its streams.
//!
//! The Discovery Watch and reflection streams are left alone: a Watch
//! request stream lives as long as the sidecar watches (only its first
//! message, the Subscribe, has a deadline:
//! [`SUBSCRIBE_TIMEOUT`](crate::api::discovery::SUBSCRIBE_TIMEOUT)), and a reflection
//! stream as long as its client browses; their messages are small (their
//! services' own decode limits) and what they hold is bounded by the
//! connection limits of [`crate::server`].

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::time::Sleep;
use tonic::Status;
use tonic::body::Body;

/// How long a unary call's request has to arrive in full, from its
/// headers. A request to the control plane is a few KiB at most (a
/// Certify's CSR and token, an Admin call), sent at once: this leaves a
/// slow link many round trips, and bounds how long a stalled request holds
/// what it sent.
pub const REQUEST_BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// The prefixes of the paths whose request streams live as long as the
/// call: no deadline for their bodies.
const STREAMING: [&str; 3] = [
    "/trellis.discovery.v1.Discovery/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// Gives each unary call's request body [`REQUEST_BODY_TIMEOUT`] to arrive
/// (a [`tower::Layer`] for the gRPC server).
#[derive(Clone, Copy, Debug, Default)]
pub struct BodyDeadlineLayer;

impl<S> tower::Layer<S> for BodyDeadlineLayer {
    type Service = BodyDeadline<S>;

    fn layer(&self, inner: S) -> BodyDeadline<S> {
        BodyDeadline { inner }
    }
}

/// The service of [`BodyDeadlineLayer`].
#[derive(Clone, Debug)]
pub struct BodyDeadline<S> {
    inner: S,
}

impl<S> tower::Service<http::Request<Body>> for BodyDeadline<S>
where
    S: tower::Service<http::Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let path = request.uri().path();
        if STREAMING.iter().any(|prefix| path.starts_with(prefix)) {
            return self.inner.call(request);
        }
        let request = request.map(|body| {
            Body::new(Deadline {
                body,
                deadline: Box::pin(tokio::time::sleep(REQUEST_BODY_TIMEOUT)),
            })
        });
        self.inner.call(request)
    }
}

/// A request body that fails with `DEADLINE_EXCEEDED` once its deadline
/// passes before it has ended.
struct Deadline {
    body: Body,
    deadline: Pin<Box<Sleep>>,
}

impl HttpBody for Deadline {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        match this.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Status::deadline_exceeded(format!(
                "the request did not arrive in full within {} of its headers",
                trellis_core::duration::Words(REQUEST_BODY_TIMEOUT)
            ))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
