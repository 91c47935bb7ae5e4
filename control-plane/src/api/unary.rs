//! What a client of a unary call is told when tonic refuses its request
//! before the service sees it.
//!
//! tonic reads a unary request (its one message, then the rest of the
//! stream) before it calls the service, and ends the call itself when it
//! cannot: OUT_OF_RANGE for a message past the decode limit, INTERNAL for
//! one cut short by the end of the stream, flagged compressed without a
//! negotiated `grpc-encoding`, or whose bytes do not decode. Both come as a
//! status in the answer's headers, already serialized, so nothing is left
//! to tell tonic's INTERNAL from the service's own. [`UnaryRequests`]
//! follows the gRPC framing of the request as tonic reads it (counting
//! bytes, keeping none) and answers INTERNAL with INVALID_ARGUMENT only
//! when that record shows tonic stopped at the request's bytes.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::{Code, Status};
use trellis_core::grpc::CertifyRefusal;

use super::{article, request_too_large};

/// The length of a gRPC message's prefix: its compressed flag (a byte),
/// then its length (a big-endian u32).
const PREFIX: usize = 5;

/// A tonic service `S` of unary calls whose requests tonic refuses before
/// `S` sees them are answered as the client's fault, naming the call:
/// INVALID_ARGUMENT for one that could not be read (see the module), and
/// [`request_too_large`] for one past the limit. Any other answer is
/// passed on as it is.
#[derive(Clone)]
pub(crate) struct UnaryRequests<S> {
    inner: S,
    limit: usize,
    refusals: Option<Refusals>,
}

/// What a service does with a refusal of a request it never saw: given
/// the reason ([`REQUEST_TOO_LARGE`], [`REQUEST_UNREADABLE`]) and the
/// status, the status the client is told (Certify counts and logs it as
/// its own refusals, and names the reason in the metadata).
pub(crate) type Refusals = Arc<dyn Fn(CertifyRefusal, Status) -> Status + Send + Sync>;

/// The reason of a refusal of a request past the limit.
pub(crate) const REQUEST_TOO_LARGE: CertifyRefusal = CertifyRefusal::RequestTooLarge;

/// The reason of a refusal of a request that could not be read.
pub(crate) const REQUEST_UNREADABLE: CertifyRefusal = CertifyRefusal::RequestUnreadable;

impl<S> UnaryRequests<S> {
    /// `inner`, whose requests are read up to `limit` bytes (its
    /// `max_decoding_message_size`). The services wrapped never answer
    /// OUT_OF_RANGE themselves, so that status can only be the decoder's.
    pub(crate) fn limited(inner: S, limit: usize) -> Self {
        Self {
            inner,
            limit,
            refusals: None,
        }
    }

    /// Hands each refusal of a request `inner` never saw to `refusals`.
    pub(crate) fn refusing_with(mut self, refusals: Refusals) -> Self {
        self.refusals = Some(refusals);
        self
    }
}

impl<S: NamedService> NamedService for UnaryRequests<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower::Service<http::Request<Body>> for UnaryRequests<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = futures::future::BoxFuture<'static, Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // Only the service's own methods get as far as reading a request,
        // so this is one of their names whenever it is shown.
        let call = request
            .uri()
            .path()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        let limit = self.limit;
        let refusals = self.refusals.clone();
        let refused = move |reason: CertifyRefusal, status: Status| match &refusals {
            Some(refusals) => refusals(reason, status),
            None => status,
        };
        let framing = Arc::new(Mutex::new(Framing::default()));
        let request = request.map(|body| {
            Body::new(Followed {
                body,
                framing: framing.clone(),
            })
        });
        let answer = self.inner.call(request);
        Box::pin(async move {
            let Ok(answer) = answer.await;
            let Some(status) = Status::from_header_map(answer.headers()) else {
                return Ok(answer);
            };
            let at_fault = framing
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .request_at_fault();
            Ok(match status.code() {
                Code::OutOfRange => {
                    refused(REQUEST_TOO_LARGE, request_too_large(&call, limit)).into_http()
                }
                Code::Internal if at_fault => {
                    let which = format!("{} {call} request", article(&call));
                    refused(REQUEST_UNREADABLE, super::unreadable(&which, &status)).into_http()
                }
                _ => answer,
            })
        })
    }
}

/// How a request stream ended, as tonic read it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// No more frames: tonic refuses a message left unfinished.
    Stream,
    /// A trailers frame, after which tonic reads no more.
    Trailers,
}

/// The gRPC framing of what a request body passed on to tonic: counts and
/// the current message's prefix, never the messages' bytes.
#[derive(Debug, Default)]
struct Framing {
    /// The bytes of the current message's prefix passed on so far; at
    /// [`PREFIX`], its body is being passed on.
    prefix: usize,
    /// The length bytes of the current message's prefix.
    length: [u8; 4],
    /// The bytes of the current message's body still to come.
    rest: u64,
    /// Prefixes passed on in full.
    prefixes: u64,
    /// Messages passed on in full.
    messages: u64,
    /// How the stream ended, once tonic has read its end.
    end: Option<End>,
    /// Whether the body failed (a reset stream, a broken connection, the
    /// body's deadline): no fault of the request's bytes.
    failed: bool,
}

impl Framing {
    /// Follows `data`, the next bytes passed on.
    fn passed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.prefix == PREFIX {
                let taken = usize::try_from(self.rest).map_or(data.len(), |r| r.min(data.len()));
                self.rest -= taken as u64;
                data = &data[taken..];
            } else {
                if self.prefix > 0 {
                    self.length[self.prefix - 1] = data[0];
                }
                self.prefix += 1;
                data = &data[1..];
                if self.prefix == PREFIX {
                    self.prefixes += 1;
                    self.rest = u64::from(u32::from_be_bytes(self.length));
                }
            }
            if self.prefix == PREFIX && self.rest == 0 {
                self.messages += 1;
                self.prefix = 0;
            }
        }
    }

    /// Whether an INTERNAL answer can only be tonic's refusal of the
    /// request's bytes. tonic calls a unary service only once it has read
    /// the stream to its end, so:
    /// - a stream tonic stopped reading after a message's prefix was
    ///   refused at that prefix (a compressed flag without an encoding, a
    ///   flag that is neither 0 nor 1) or at that message's bytes;
    /// - a stream that ended before any whole message, or (with no more
    ///   frames) inside one, was refused for it.
    ///
    /// A body that failed is never the request's fault, nor is a request
    /// tonic never read (refused before: by an interceptor, for its
    /// encoding).
    fn request_at_fault(&self) -> bool {
        if self.failed {
            return false;
        }
        match self.end {
            None => self.prefixes > 0,
            Some(End::Trailers) => self.messages == 0,
            Some(End::Stream) => self.messages == 0 || self.prefix != 0,
        }
    }
}

/// A request body, its framing followed as tonic reads it.
struct Followed {
    body: Body,
    framing: Arc<Mutex<Framing>>,
}

impl HttpBody for Followed {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        let polled = ready!(Pin::new(&mut this.body).poll_frame(cx));
        let mut framing = this.framing.lock().unwrap_or_else(PoisonError::into_inner);
        match &polled {
            Some(Ok(frame)) => match frame.data_ref() {
                Some(data) => framing.passed(data),
                None if frame.is_trailers() => framing.end = Some(End::Trailers),
                None => {}
            },
            Some(Err(_)) => framing.failed = true,
            None => framing.end = Some(End::Stream),
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(flag: u8, body: &[u8]) -> Vec<u8> {
        let mut message = vec![flag];
        message.extend_from_slice(&(body.len() as u32).to_be_bytes());
        message.extend_from_slice(body);
        message
    }

    fn followed(chunks: &[&[u8]], end: Option<End>) -> Framing {
        let mut framing = Framing::default();
        for chunk in chunks {
            framing.passed(chunk);
        }
        framing.end = end;
        framing
    }

    /// A whole message read to the end of its stream is the service's to
    /// answer, however its bytes were split; so is one whose stream failed.
    #[test]
    fn a_request_read_in_full_is_not_at_fault() {
        let whole = framed(0, b"\x0a\x03abc");
        for at in 0..=whole.len() {
            let (a, b) = whole.split_at(at);
            let framing = followed(&[a, b], Some(End::Stream));
            assert_eq!(framing.messages, 1, "split at {at}");
            assert!(!framing.request_at_fault(), "split at {at}");
        }
        let empty = followed(&[&framed(0, b"")], Some(End::Trailers));
        assert!(!empty.request_at_fault());
        let mut failed = followed(&[&whole[..3]], None);
        failed.failed = true;
        assert!(!failed.request_at_fault());
        assert!(!followed(&[], None).request_at_fault());
    }

    /// A stream that ends inside a message or without one, or that tonic
    /// stopped reading after a prefix, was refused for its bytes.
    #[test]
    fn a_request_refused_for_its_bytes_is_at_fault() {
        let whole = framed(0, b"\x0a\x03abc");
        for at in 1..whole.len() {
            let framing = followed(&[&whole[..at]], Some(End::Stream));
            assert!(framing.request_at_fault(), "cut at {at}");
        }
        let mut then_cut = whole.clone();
        then_cut.push(0);
        assert!(followed(&[&then_cut], Some(End::Stream)).request_at_fault());
        assert!(followed(&[], Some(End::Stream)).request_at_fault());
        assert!(followed(&[&framed(1, b"x")[..PREFIX]], None).request_at_fault());
    }

    /// The status `inner`, wrapped, answers a call of ListWorkloads whose
    /// body is `body` with: its code and message.
    async fn answer_of<S>(inner: S, body: Vec<u8>) -> (Code, String)
    where
        S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
        S::Future: Send + 'static,
    {
        use tower::ServiceExt;
        let request = http::Request::post("/trellis.admin.v1.Admin/ListWorkloads")
            .body(Body::new(http_body_util::Full::new(Bytes::from(body))))
            .unwrap();
        let Ok(answer) = UnaryRequests::limited(inner, 1024).oneshot(request).await;
        let status = Status::from_header_map(answer.headers()).expect("a status");
        (status.code(), status.message().to_owned())
    }

    /// An INTERNAL the service answers after reading the whole request is
    /// its own, and passed on as it is; one answered after reading only a
    /// message's prefix is the decoder's refusal of the request.
    #[tokio::test]
    async fn only_an_internal_before_the_end_of_the_request_is_the_callers() {
        use http_body_util::BodyExt;
        let whole = framed(0, b"\x0a\x03abc");
        let read_all = tower::service_fn(|request: http::Request<Body>| async move {
            request.into_body().collect().await.expect("the whole body");
            Ok::<_, Infallible>(Status::internal("the store failed").into_http())
        });
        assert_eq!(
            answer_of(read_all, whole.clone()).await,
            (Code::Internal, "the store failed".to_owned())
        );
        let read_prefix = tower::service_fn(|request: http::Request<Body>| async move {
            request
                .into_body()
                .frame()
                .await
                .expect("a frame")
                .expect("data");
            Ok::<_, Infallible>(Status::internal("bad bytes").into_http())
        });
        assert_eq!(
            answer_of(read_prefix, whole).await,
            (
                Code::InvalidArgument,
                "a ListWorkloads request could not be read: bad bytes".to_owned()
            )
        );
    }
}
