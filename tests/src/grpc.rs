//! A gRPC app for tests, served in-process on loopback: a unary method
//! (`trellis.identity.v1.Identity/Certify`, answering a chain of one
//! `b"ok"`) and a server-streaming one (`trellis.discovery.v1.Discovery/
//! Watch`, streaming snapshots version 1 to 3), and the client calls that
//! check them. The services are Trellis's own protos only because they are
//! at hand; nothing here is a control plane.
//!
//! The proxy's own tests include this file by path (they cannot depend on
//! this crate, which depends on the proxy): it must use nothing of this
//! crate, only tonic, tokio, tokio-stream, anyhow and trellis-proto.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status, Streaming};
use trellis_proto::discovery::v1::discovery_client::DiscoveryClient;
use trellis_proto::discovery::v1::discovery_server::{Discovery, DiscoveryServer};
use trellis_proto::discovery::v1::{Snapshot, WatchRequest};
use trellis_proto::identity::v1::identity_client::IdentityClient;
use trellis_proto::identity::v1::identity_server::{Identity, IdentityServer};
use trellis_proto::identity::v1::{CertifyRequest, CertifyResponse};

/// The unary method's path, as L7 rules name it.
pub const UNARY_SERVICE: &str = "trellis.identity.v1.Identity";
/// The streaming method's service and method.
pub const STREAMING_SERVICE: &str = "trellis.discovery.v1.Discovery";
pub const STREAMING_METHOD: &str = "Watch";

/// The app; dropping it stops it.
pub struct GrpcApp {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl GrpcApp {
    /// Serves both methods on a free port.
    pub async fn start() -> anyhow::Result<GrpcApp> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let server = tonic::transport::Server::builder()
            .add_service(IdentityServer::new(Methods))
            .add_service(DiscoveryServer::new(Methods))
            .serve_with_incoming(TcpListenerStream::new(listener));
        let task = tokio::spawn(async move {
            let _ = server.await;
        });
        Ok(GrpcApp { addr, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for GrpcApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A plaintext HTTP/2 channel to `addr` (a sidecar's route, say).
pub async fn channel(addr: SocketAddr) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(10))
        .connect()
        .await?)
}

/// Calls the unary method through `channel`: the chain it answered.
pub async fn certify(channel: Channel) -> Result<Vec<Vec<u8>>, Status> {
    let answer = IdentityClient::new(channel)
        .certify(CertifyRequest::default())
        .await?;
    Ok(answer.into_inner().chain)
}

/// Calls the streaming method through `channel`: the versions of the
/// snapshots it streamed, in order.
pub async fn watch_versions(channel: Channel) -> Result<Vec<u64>, Status> {
    let requests = tokio_stream::iter(vec![WatchRequest::default()]);
    let mut stream = DiscoveryClient::new(channel)
        .watch(requests)
        .await?
        .into_inner();
    let mut versions = Vec::new();
    while let Some(snapshot) = stream.message().await? {
        versions.push(snapshot.version);
    }
    Ok(versions)
}

#[derive(Clone, Copy)]
struct Methods;

#[tonic::async_trait]
impl Identity for Methods {
    async fn certify(
        &self,
        _request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        Ok(Response::new(CertifyResponse {
            chain: vec![b"ok".to_vec()],
            ..CertifyResponse::default()
        }))
    }
}

#[tonic::async_trait]
impl Discovery for Methods {
    type WatchStream = ReceiverStream<Result<Snapshot, Status>>;

    async fn watch(
        &self,
        _request: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            for version in 1..=3 {
                let snapshot = Snapshot {
                    version,
                    ..Snapshot::default()
                };
                if tx.send(Ok(snapshot)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
