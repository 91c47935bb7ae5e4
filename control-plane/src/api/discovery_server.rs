//! The `trellis.discovery.v1.Discovery` route, served by hand instead of by
//! tonic's generated server, so that the parts of a snapshot every stream
//! shares leave without a copy per stream.
//!
//! tonic's codecs encode each message into the stream's own buffer: with
//! 10,000 sidecars and 10,000 endpoints that is a 660 KB copy per stream
//! and change, all held at once while slow sidecars read. Here a snapshot
//! is framed as gRPC frames it (a 5-byte prefix: not compressed, length)
//! and its [`EncodedSnapshot`] parts follow as they are, reference-counted,
//! down to the TLS writer. Requests are still read by tonic
//! (`Streaming<WatchRequest>`, with the Watch's own decoder), and errors
//! end the stream as gRPC status trailers, so clients see the same
//! protocol as from a generated server.
//! This module only frames bytes; [`DiscoveryService`] decides what is sent.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::{Stream, StreamExt};
use http::HeaderMap;
use http_body_util::StreamBody;
use hyper::body::Frame;
use prost::bytes::{BufMut, Bytes, BytesMut};
use tonic::Status;
use tonic::body::Body;
use tonic::codec::Streaming;
use tonic::server::NamedService;
use trellis_proto::discovery::v1::encoded::EncodedSnapshot;

use super::discovery::{DiscoveryService, WatchRequestDecoder};

/// The one method of the service.
const WATCH_PATH: &str = "/trellis.discovery.v1.Discovery/Watch";

/// The largest Watch request read, in bytes: a Subscribe is a few
/// addresses, an ACK a version, a NACK a version and the sidecar's reason
/// for refusing a snapshot (the text of its error, which quotes a field
/// or two of the snapshot, cut by the sidecar to its
/// `MAX_NACK_REASON_BYTES`, 4 KiB). Far below gRPC's usual 4 MiB: a larger
/// request is refused as its length prefix arrives, ending its stream with
/// RESOURCE_EXHAUSTED naming the call and this limit.
pub const MAX_WATCH_REQUEST_BYTES: usize = 64 * 1024;

/// The Discovery service as a tonic route.
#[derive(Clone)]
pub struct DiscoveryServer {
    service: Arc<DiscoveryService>,
}

impl DiscoveryServer {
    pub fn new(service: DiscoveryService) -> Self {
        Self {
            service: Arc::new(service),
        }
    }
}

impl NamedService for DiscoveryServer {
    const NAME: &'static str = "trellis.discovery.v1.Discovery";
}

impl tower::Service<http::Request<Body>> for DiscoveryServer {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let service = self.service.clone();
        Box::pin(async move {
            if request.uri().path() != WATCH_PATH {
                return Ok(Status::unimplemented(format!(
                    "{} is not a method of trellis.discovery.v1.Discovery",
                    request.uri().path()
                ))
                .into_http());
            }
            let request = tonic::Request::from_http(request.map(|body| {
                Streaming::new_request(
                    WatchRequestDecoder::default(),
                    body,
                    None,
                    Some(MAX_WATCH_REQUEST_BYTES),
                )
            }));
            match service.watch(request).await {
                Ok(response) => {
                    let (metadata, snapshots, _) = response.into_parts();
                    let mut response =
                        http::Response::new(Body::new(StreamBody::new(frames(snapshots))));
                    *response.headers_mut() = metadata.into_headers();
                    response.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/grpc"),
                    );
                    Ok(response)
                }
                Err(status) => Ok(status.into_http()),
            }
        })
    }
}

/// The gRPC prefix of a message of `len` bytes: not compressed, then the
/// length (big-endian, 4 bytes).
fn message_prefix(len: usize) -> Result<Bytes, Status> {
    let len = u32::try_from(len)
        .map_err(|_| Status::internal(format!("a snapshot of {len} bytes is too large")))?;
    let mut prefix = BytesMut::with_capacity(5);
    prefix.put_u8(0);
    prefix.put_u32(len);
    Ok(prefix.freeze())
}

/// The status trailers that end a response.
fn trailers(status: &Status) -> HeaderMap {
    let mut map = HeaderMap::new();
    if status.add_header(&mut map).is_err() {
        map.insert("grpc-status", http::HeaderValue::from_static("13"));
    }
    map
}

/// The body frames of a Watch response: each snapshot as its prefix and
/// its parts, then the status trailers (OK when the stream ends, or the
/// error it ended with).
fn frames<S>(snapshots: S) -> impl Stream<Item = Result<Frame<Bytes>, Status>> + Send
where
    S: Stream<Item = Result<EncodedSnapshot, Status>> + Send + Unpin + 'static,
{
    struct State<S> {
        snapshots: S,
        pending: std::vec::IntoIter<Bytes>,
        ended: bool,
    }
    let state = State {
        snapshots,
        pending: Vec::new().into_iter(),
        ended: false,
    };
    futures::stream::unfold(state, |mut state| async move {
        if let Some(chunk) = state.pending.next() {
            return Some((Ok(Frame::data(chunk)), state));
        }
        if state.ended {
            return None;
        }
        let end = match state.snapshots.next().await {
            Some(Ok(snapshot)) => match message_prefix(snapshot.encoded_len()) {
                Ok(prefix) => {
                    state.pending = snapshot.into_parts().into_iter();
                    return Some((Ok(Frame::data(prefix)), state));
                }
                Err(status) => status,
            },
            Some(Err(status)) => status,
            None => Status::ok(""),
        };
        state.ended = true;
        Some((Ok(Frame::trailers(trailers(&end))), state))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use prost::Message;
    use trellis_proto::discovery::v1::{Endpoint, Snapshot, WatchRequest};

    /// A Discovery over a fresh store in `dir` with `limits`, and the mesh
    /// of a replica serving it (the sender stops its background tasks when
    /// dropped).
    fn mesh_in(
        dir: &std::path::Path,
        limits: crate::discovery::WatchLimits,
    ) -> (
        crate::api::Mesh,
        Arc<crate::discovery::Discovery>,
        tokio::sync::watch::Sender<bool>,
    ) {
        use crate::store::embedded::{DB_FILE, EmbeddedStore};
        use trellis_proto::discovery::v1::MeshConfig;

        let store = Arc::new(EmbeddedStore::open(&dir.join(DB_FILE)).unwrap());
        let discovery = Arc::new(
            crate::discovery::Discovery::new(store.clone(), Vec::new(), MeshConfig::default())
                .unwrap()
                .with_watch_limits(limits),
        );
        let (mesh, stop) = crate::api::Mesh::for_tests(store, discovery.clone());
        (mesh, discovery, stop)
    }

    /// A Watch request carrying `body`, from `id` on a connection from
    /// `remote`.
    fn watch_request(body: Body, id: &str, remote: &str) -> http::Request<Body> {
        let mut request = http::Request::post(format!("http://cp{WATCH_PATH}"))
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .body(body)
            .unwrap();
        request.extensions_mut().insert(crate::api::PeerInfo {
            activity: Default::default(),
            remote: remote.parse().unwrap(),
            spiffe_id: Some(trellis_core::SpiffeId::parse(id).unwrap()),
            cert_issued_at_unix: None,
            presented: None,
        });
        request
    }

    fn snapshot(version: u64) -> EncodedSnapshot {
        let own = Snapshot {
            version,
            ..Snapshot::default()
        };
        let shared = Snapshot {
            endpoints: vec![Endpoint {
                address: "10.0.0.1:15006".into(),
                spiffe_id: "spiffe://td/ns/a/sa/web".into(),
            }],
            ..Snapshot::default()
        };
        EncodedSnapshot::from_parts(vec![
            EncodedSnapshot::part(&own),
            EncodedSnapshot::part(&shared),
        ])
    }

    /// The messages of a gRPC body, and its trailers.
    async fn read(body: Body) -> (Vec<Snapshot>, HeaderMap) {
        let collected = body.collect().await.expect("the body ends");
        let trailers = collected.trailers().cloned().expect("status trailers");
        let mut bytes = collected.to_bytes();
        let mut messages = Vec::new();
        while !bytes.is_empty() {
            assert_eq!(bytes[0], 0, "a message is never compressed");
            let len = u32::from_be_bytes(bytes[1..5].try_into().unwrap()) as usize;
            messages.push(Snapshot::decode(&bytes[5..5 + len]).expect("a Snapshot"));
            bytes = bytes.slice(5 + len..);
        }
        (messages, trailers)
    }

    #[tokio::test]
    async fn snapshots_are_framed_as_grpc_messages_and_end_with_ok() {
        let stream = futures::stream::iter(vec![Ok(snapshot(1)), Ok(snapshot(2))]);
        let body = Body::new(StreamBody::new(frames(stream)));
        let (messages, trailers) = read(body).await;
        let versions: Vec<u64> = messages.iter().map(|m| m.version).collect();
        assert_eq!(versions, [1, 2]);
        assert_eq!(
            messages[1].endpoints[0].spiffe_id,
            "spiffe://td/ns/a/sa/web"
        );
        assert_eq!(trailers["grpc-status"], "0");
    }

    /// A Watch request larger than [`MAX_WATCH_REQUEST_BYTES`] (here 1 MiB,
    /// below gRPC's usual 4 MiB) is refused as its length prefix arrives,
    /// naming the call and the limit, instead of being buffered.
    #[tokio::test]
    async fn an_oversized_watch_request_is_refused_naming_the_limit() {
        use tower::Service;

        let tmp = tempfile::tempdir().unwrap();
        let (mesh, _, _stop) = mesh_in(tmp.path(), Default::default());
        let mut server = DiscoveryServer::new(DiscoveryService::new(mesh));
        let size: u32 = 1 << 20;
        let mut prefix = BytesMut::new();
        prefix.put_u8(0);
        prefix.put_u32(size);
        prefix.put_slice(&[0; 1024]);
        let request = watch_request(
            Body::new(http_body_util::Full::new(prefix.freeze())),
            "spiffe://cluster.local/ns/a/sa/web",
            "127.0.0.1:40000",
        );
        let response = server.call(request).await.unwrap();
        let status = Status::from_header_map(response.headers()).expect("a status");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        assert_eq!(
            status.message(),
            format!(
                "a Watch request may be at most {MAX_WATCH_REQUEST_BYTES} bytes; this one is larger"
            )
        );
    }

    /// A Watch that sends no Subscribe, or part of one and then stalls, is
    /// ended with DEADLINE_EXCEEDED naming the deadline once
    /// [`SUBSCRIBE_TIMEOUT`](super::super::discovery::SUBSCRIBE_TIMEOUT)
    /// has passed, instead of being held, outside the Watch limits, for as
    /// long as its caller keeps the connection.
    #[tokio::test(start_paused = true)]
    async fn a_watch_without_its_subscribe_is_ended_at_the_deadline() {
        use crate::api::discovery::SUBSCRIBE_TIMEOUT;
        use futures::channel::mpsc;
        use tower::Service;

        let tmp = tempfile::tempdir().unwrap();
        let (mesh, discovery, _stop) = mesh_in(tmp.path(), Default::default());
        let mut server = DiscoveryServer::new(DiscoveryService::new(mesh));
        // Nothing, then the prefix of a 1,000-byte message and 10 of its bytes.
        let mut part = BytesMut::new();
        part.put_u8(0);
        part.put_u32(1000);
        part.put_slice(&[0x0a; 10]);
        for sent in [Bytes::new(), part.freeze()] {
            let (mut tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Status>>(4);
            if !sent.is_empty() {
                tx.try_send(Ok(Frame::data(sent.clone()))).unwrap();
            }
            let request = watch_request(
                Body::new(StreamBody::new(rx)),
                "spiffe://cluster.local/ns/a/sa/web",
                "127.0.0.1:40000",
            );
            let response = tokio::time::timeout(SUBSCRIBE_TIMEOUT * 100, server.call(request))
                .await
                .unwrap_or_else(|_| panic!("a Watch that sent {sent:?} was held open"))
                .unwrap();
            let status = Status::from_header_map(response.headers()).expect("a status");
            assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
            assert_eq!(
                status.message(),
                "the Subscribe of a Watch did not arrive in full within 10 seconds of its headers"
            );
            assert_eq!(discovery.streams_open(), 0);
            drop(tx);
        }
    }

    #[tokio::test]
    async fn an_error_ends_the_stream_with_its_status() {
        let stream = futures::stream::iter(vec![
            Ok(snapshot(1)),
            Err(Status::unavailable("control plane shutting down")),
            Ok(snapshot(2)),
        ]);
        let body = Body::new(StreamBody::new(frames(stream)));
        let (messages, trailers) = read(body).await;
        assert_eq!(messages.len(), 1, "nothing after the error");
        let status = Status::from_header_map(&trailers).expect("a status in the trailers");
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(status.message(), "control plane shutting down");
    }

    /// A sidecar (an identity on connections from one address) holding as
    /// many Watch streams as one may is refused another with
    /// RESOURCE_EXHAUSTED naming the limit and the identity; another pod
    /// of the same identity (another address) is not. Past the replica's
    /// total, any identity is refused. Each refusal is counted by its
    /// limit, and a stream that ends frees its slot.
    #[tokio::test]
    async fn watch_streams_past_the_limits_are_refused_until_one_closes() {
        use crate::discovery::WatchLimits;
        use futures::channel::mpsc;
        use tower::Service;
        use trellis_proto::discovery::v1::Subscribe;
        use trellis_proto::discovery::v1::watch_request::Kind;

        const WEB: &str = "spiffe://cluster.local/ns/a/sa/web";
        const API: &str = "spiffe://cluster.local/ns/a/sa/api";
        let tmp = tempfile::tempdir().unwrap();
        let limits = WatchLimits {
            per_sidecar: 2,
            total: 3,
        };
        let (mesh, discovery, _stop) = mesh_in(tmp.path(), limits);
        let metrics = mesh.metrics.clone();
        let server = DiscoveryServer::new(DiscoveryService::new(mesh));

        // A Watch from `id` on a connection from `remote` that subscribes
        // and stays open while the returned sender lives; the status it
        // was refused with, if it was.
        type Held = (
            mpsc::Sender<Result<Frame<Bytes>, Status>>,
            http::Response<Body>,
        );
        let watch = |id: &str, remote: &str| {
            let mut server = server.clone();
            let subscribe = WatchRequest {
                kind: Some(Kind::Subscribe(Subscribe {
                    inbound_address: "10.0.0.1:15006".into(),
                    ..Subscribe::default()
                })),
            };
            let mut framed = BytesMut::new();
            framed.put_u8(0);
            framed.put_u32(subscribe.encoded_len() as u32);
            subscribe.encode(&mut framed).unwrap();
            let (mut tx, rx) = mpsc::channel(4);
            tx.try_send(Ok(Frame::data(framed.freeze()))).unwrap();
            let request = watch_request(Body::new(StreamBody::new(rx)), id, remote);
            async move {
                let response = server.call(request).await.unwrap();
                match Status::from_header_map(response.headers()) {
                    Some(refused) => Err(refused),
                    None => Ok::<Held, Status>((tx, response)),
                }
            }
        };

        // A Watch refused for want of room, saying `message`.
        fn assert_exhausted(watched: Result<Held, Status>, message: &str) {
            let refused = watched.expect_err("refused");
            assert_eq!(
                refused.code(),
                tonic::Code::ResourceExhausted,
                "{refused:?}"
            );
            assert_eq!(refused.message(), message);
        }

        let first = watch(WEB, "10.0.0.1:40000").await.expect("opened");
        let _second = watch(WEB, "10.0.0.1:40001").await.expect("opened");
        assert_exhausted(
            watch(WEB, "10.0.0.1:40002").await,
            "spiffe://cluster.local/ns/a/sa/web already holds 2 Watch streams from 10.0.0.1, \
             the most one sidecar may hold at once; close one first (the stream of a restarted \
             sidecar closes when its old connection fails)",
        );
        // Another replica of the Deployment: the same identity, its own pod.
        let _other_pod = watch(WEB, "10.0.0.2:40000").await.expect("opened");
        assert_exhausted(
            watch(API, "10.0.0.3:40000").await,
            "this control plane replica already holds 3 Watch streams, the most it holds at \
             once; the stream of spiffe://cluster.local/ns/a/sa/api from 10.0.0.3 is refused \
             until one closes",
        );
        let rendered = metrics.render();
        for reason in ["per_sidecar", "total"] {
            let counted = format!("trellis_watch_streams_refused_total{{reason=\"{reason}\"}} 1\n");
            assert!(rendered.contains(&counted), "{counted}in\n{rendered}");
        }
        assert_eq!(
            discovery.statuses().len(),
            1,
            "a refused identity is not listed"
        );

        // The sidecar closes its first stream: its slot is free again.
        drop(first);
        let mut patience = 500;
        while discovery.streams_open() > 2 {
            patience -= 1;
            assert!(patience > 0, "the closed stream never freed its slot");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let _again = watch(WEB, "10.0.0.1:40003").await.expect("opened again");
        assert_eq!(discovery.streams_open(), 3);
    }
}
