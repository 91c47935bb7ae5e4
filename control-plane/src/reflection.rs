//! gRPC reflection (v1 and v1alpha), served without a client certificate so
//! that `grpcurl` lists and describes the services, its requests read up to
//! [`MAX_REFLECTION_REQUEST_BYTES`].
//!
//! tonic-reflection ends its stream with OK when a request cannot be read,
//! so a client whose request is too large is told nothing. Here the
//! requests are read first, under the limit, and handed on one by one to
//! tonic-reflection, which answers them: a request past the limit ends the
//! stream with RESOURCE_EXHAUSTED naming the limit, one that is not a
//! reflection request with INVALID_ARGUMENT, instead of that OK. Reading a
//! request never buffers more than the limit: a message whose gRPC prefix
//! announces more is refused on its prefix.

use std::convert::Infallible;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};

use bytes::{BufMut, Bytes, BytesMut};
use futures::StreamExt;
use http::HeaderMap;
use http_body_util::StreamBody;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tonic::body::Body;
use tonic::codec::Streaming;
use tonic::server::NamedService;
use tonic::{Code, Status};
use tonic_prost::ProstDecoder;
use tonic_reflection::pb::v1::ServerReflectionRequest as V1Request;
use tonic_reflection::pb::v1alpha::ServerReflectionRequest as V1AlphaRequest;
use tonic_reflection::server::{Builder, Error, v1, v1alpha};

use crate::run::MAX_REFLECTION_REQUEST_BYTES;

/// The v1 reflection service, describing the files of the encoded
/// descriptor set `descriptors` (and reflection itself).
pub fn v1(
    descriptors: &[u8],
) -> Result<Reflection<v1::ServerReflectionServer<impl v1::ServerReflection>, V1Request>, Error> {
    let inner = Builder::configure()
        .register_encoded_file_descriptor_set(descriptors)
        .build_v1()?
        .max_decoding_message_size(MAX_REFLECTION_REQUEST_BYTES);
    Ok(Reflection::new(inner))
}

/// The v1alpha reflection service, which older clients ask, as [`v1()`].
pub fn v1alpha(
    descriptors: &[u8],
) -> Result<
    Reflection<v1alpha::ServerReflectionServer<impl v1alpha::ServerReflection>, V1AlphaRequest>,
    Error,
> {
    let inner = Builder::configure()
        .register_encoded_file_descriptor_set(descriptors)
        .build_v1alpha()?
        .max_decoding_message_size(MAX_REFLECTION_REQUEST_BYTES);
    Ok(Reflection::new(inner))
}

/// A reflection route: reads the requests of each stream, as messages `M`,
/// and hands them on to `S`, tonic-reflection's service, ending the stream
/// with a status of its own when one cannot be read.
pub struct Reflection<S, M> {
    inner: S,
    request: PhantomData<fn() -> M>,
}

impl<S, M> Reflection<S, M> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            request: PhantomData,
        }
    }
}

impl<S: Clone, M> Clone for Reflection<S, M> {
    fn clone(&self) -> Self {
        Self::new(self.inner.clone())
    }
}

impl<S: NamedService, M> NamedService for Reflection<S, M> {
    const NAME: &'static str = S::NAME;
}

impl<S, M> tower::Service<http::Request<Body>> for Reflection<S, M>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
    M: prost::Message + Default + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = futures::future::BoxFuture<'static, Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let refusal = Arc::new(OnceLock::new());
        let request = request.map(|body| {
            let requests = Streaming::new_request(
                ProstDecoder::<M>::default(),
                body,
                None,
                Some(MAX_REFLECTION_REQUEST_BYTES),
            );
            Body::new(StreamBody::new(read_under_limit(requests, refusal.clone())))
        });
        let answer = self.inner.call(request);
        Box::pin(async move {
            let Ok(answer) = answer.await;
            Ok(answer.map(|body| Body::new(Answers { body, refusal })))
        })
    }
}

/// The requests of `requests` as gRPC messages again, for
/// tonic-reflection; they end with the first that cannot be read, whose
/// status is set in `refusal`.
fn read_under_limit<M>(
    requests: Streaming<M>,
    refusal: Arc<OnceLock<Status>>,
) -> impl futures::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send
where
    M: prost::Message + Default + Send + 'static,
{
    futures::stream::unfold(requests, move |mut requests| {
        let refusal = refusal.clone();
        async move {
            match requests.message().await {
                Ok(Some(request)) => Some((Ok(Frame::data(framed(&request))), requests)),
                Ok(None) => None,
                Err(status) => {
                    let _ = refusal.set(refused(&status));
                    None
                }
            }
        }
    })
    .fuse()
}

/// `message` as a gRPC message: not compressed, its length (big-endian, 4
/// bytes), then the message. It was read under the limit, so its length
/// fits.
fn framed<M: prost::Message>(message: &M) -> Bytes {
    let encoded = message.encode_to_vec();
    let mut framed = BytesMut::with_capacity(5 + encoded.len());
    framed.put_u8(0);
    framed.put_u32(u32::try_from(encoded.len()).unwrap_or(u32::MAX));
    framed.put_slice(&encoded);
    framed.freeze()
}

/// What the client is told of a request that could not be read: tonic's
/// decoder says OUT_OF_RANGE for a message past the limit, and INTERNAL
/// for one that is not a message of the method (bytes that do not decode,
/// a compressed flag that was not negotiated, a message cut short by the
/// end of the stream; see [`crate::api::unreadable_request`]); any other
/// status, INTERNAL from a stream reset among them (the connection
/// failed), is kept.
fn refused(status: &Status) -> Status {
    match status.code() {
        Code::OutOfRange => {
            crate::api::request_too_large("reflection", MAX_REFLECTION_REQUEST_BYTES)
        }
        _ if crate::api::unreadable_request(status) => {
            crate::api::unreadable("the reflection request", status)
        }
        _ => status.clone(),
    }
}

/// The answers of a reflection stream: those of tonic-reflection, with
/// the status that ends them replaced by the refusal of a request, when
/// one could not be read and tonic-reflection ended with OK.
struct Answers {
    body: Body,
    refusal: Arc<OnceLock<Status>>,
}

impl HttpBody for Answers {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.body).poll_frame(cx));
        let refusal = match (&frame, this.refusal.get()) {
            (Some(Ok(frame)), Some(refusal)) if frame.trailers_ref().is_some_and(ended_ok) => {
                refusal
            }
            _ => return Poll::Ready(frame),
        };
        let mut trailers = HeaderMap::new();
        if refusal.add_header(&mut trailers).is_err() {
            trailers.insert(
                "grpc-status",
                http::HeaderValue::from(refusal.code() as i32),
            );
        }
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Whether `trailers` end a stream with OK.
fn ended_ok(trailers: &HeaderMap) -> bool {
    trailers
        .get("grpc-status")
        .is_some_and(|status| status.as_bytes() == b"0")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The caller is told its request could not be read when tonic's
    /// decoder says so, and not when the stream was reset: tonic makes
    /// the INTERNAL of a reset from the HTTP/2 error, kept as its source,
    /// and nobody is left to be told.
    #[test]
    fn only_the_decoders_internal_is_the_callers_unreadable_request() {
        let cut_short = Status::internal("Unexpected EOF decoding stream.");
        let refusal = refused(&cut_short);
        assert_eq!(refusal.code(), Code::InvalidArgument);
        assert_eq!(
            refusal.message(),
            "the reflection request could not be read: Unexpected EOF decoding stream."
        );

        let mut reset = Status::internal("h2 protocol error: stream error received");
        reset.set_source(Arc::new(std::io::Error::other("stream reset")));
        let kept = refused(&reset);
        assert_eq!(kept.code(), Code::Internal);
        assert_eq!(kept.message(), "h2 protocol error: stream error received");
    }
}
