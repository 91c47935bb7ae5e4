//! Identity and discovery against an in-process fake control plane (real
//! gRPC over real mTLS): the first certificate is proved by the join token
//! without a client certificate, renewals by the current SVID; snapshots are
//! ACKed, an invalid one is NACKed with its reason and the last good one
//! stays in force.

mod common;

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use common::*;
use rcgen::CertificateSigningRequestParams;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::async_trait;
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status, Streaming};
use trellis_core::SpiffeId;
use trellis_proto::discovery::v1::{
    self as pb, discovery_server::Discovery, discovery_server::DiscoveryServer, watch_request::Kind,
};
use trellis_proto::identity::v1::identity_server::{Identity, IdentityServer};
use trellis_proto::identity::v1::{CertifyRequest, CertifyResponse, certify_request::Proof};
use trellis_proxy::identity::{self, CertifyParams};
use trellis_proxy::metrics::Metrics;
use trellis_proxy::policy::watch::{Outputs, WatchParams};

const TOKEN: &str = "join-token-for-web";

/// What the fake control plane saw.
#[derive(Default, Debug)]
struct Seen {
    /// For each Certify: whether it came with a token, and the client
    /// certificate's SPIFFE ID if any.
    certify: Vec<(bool, Option<SpiffeId>)>,
    answers: Vec<Kind>,
}

#[derive(Clone)]
struct FakeControlPlane {
    ca: Arc<Ca>,
    root: CertificateDer<'static>,
    seen: Arc<Mutex<Seen>>,
}

#[async_trait]
impl Identity for FakeControlPlane {
    async fn certify(
        &self,
        req: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let peer = req.extensions().get::<PeerId>().and_then(|p| p.0.clone());
        let req = req.into_inner();
        let token = matches!(&req.proof, Some(Proof::JoinToken(t)) if t == TOKEN);
        self.seen
            .lock()
            .unwrap()
            .certify
            .push((token, peer.clone()));
        if !token && peer.is_none() {
            return Err(Status::unauthenticated("no proof"));
        }
        let mut csr = CertificateSigningRequestParams::from_der(&req.csr.into())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let now = time::OffsetDateTime::now_utc();
        // Backdated like a real CA: renewal must count from receipt.
        csr.params.not_before = now - time::Duration::minutes(5);
        csr.params.not_after = now + time::Duration::seconds(4);
        let cert = self.ca.sign(&csr);
        Ok(Response::new(CertifyResponse {
            chain: vec![cert.to_vec()],
            trust_bundle: vec![self.root.to_vec()],
            expires_at_unix: 0,
            spiffe_id: String::new(),
        }))
    }
}

#[async_trait]
impl Discovery for FakeControlPlane {
    type WatchStream = ReceiverStream<Result<pb::Snapshot, Status>>;

    async fn watch(
        &self,
        req: Request<Streaming<pb::WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        if req
            .extensions()
            .get::<PeerId>()
            .and_then(|p| p.0.clone())
            .is_none()
        {
            return Err(Status::unauthenticated("an SVID is required"));
        }
        let mut requests = req.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let seen = self.seen.clone();
        tokio::spawn(async move {
            let Ok(Some(first)) = requests.message().await else {
                return;
            };
            assert!(
                matches!(first.kind, Some(Kind::Subscribe(_))),
                "first request must subscribe"
            );
            let good = pb::Snapshot {
                version: 1,
                endpoints: vec![pb::Endpoint {
                    address: "10.1.0.7:15006".into(),
                    spiffe_id: "spiffe://td.test/ns/b/sa/api".into(),
                }],
                ..Default::default()
            };
            let bad = pb::Snapshot {
                version: 2,
                endpoints: vec![pb::Endpoint {
                    address: "not an address".into(),
                    spiffe_id: "spiffe://td.test/ns/b/sa/api".into(),
                }],
                ..Default::default()
            };
            for snapshot in [good, bad] {
                if tx.send(Ok(snapshot)).await.is_err() {
                    return;
                }
                let Ok(Some(answer)) = requests.message().await else {
                    return;
                };
                seen.lock().unwrap().answers.push(answer.kind.unwrap());
            }
            // Keep the stream open.
            let _ = requests.message().await;
            drop(tx);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// The client's SPIFFE ID, as tonic connect info.
#[derive(Clone, Debug)]
struct PeerId(Option<SpiffeId>);

struct Conn(tokio_rustls::server::TlsStream<TcpStream>);

impl Connected for Conn {
    type ConnectInfo = PeerId;
    fn connect_info(&self) -> PeerId {
        PeerId(trellis_core::tls::peer_spiffe_id(self.0.get_ref().1.peer_certificates()).ok())
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Starts the fake control plane; returns its address, root and log.
async fn start() -> (String, CertificateDer<'static>, Arc<Mutex<Seen>>) {
    let ca = Ca::new();
    let root = ca.root();
    let td = td();
    let svid = ca.svid(&SpiffeId::control_plane(&td));
    let roots = Arc::new(trellis_core::tls::root_store(std::slice::from_ref(&root)).unwrap());
    let verifier = trellis_core::tls::SpiffeClientVerifier::new(roots, td, false).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(trellis_core::tls::provider())
        .with_protocol_versions(trellis_core::tls::PROTOCOL_VERSIONS)
        .unwrap()
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(trellis_proxy::tls::SvidResolver(
            svid.certified.clone(),
        )));
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (conns, incoming) = mpsc::channel::<std::io::Result<Conn>>(16);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, conns) = (acceptor.clone(), conns.clone());
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    let _ = conns.send(Ok(Conn(tls))).await;
                }
            });
        }
    });
    let seen = Arc::new(Mutex::new(Seen::default()));
    let cp = FakeControlPlane {
        ca: Arc::new(ca),
        root: root.clone(),
        seen: seen.clone(),
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(IdentityServer::new(cp.clone()))
            .add_service(DiscoveryServer::new(cp))
            .serve_with_incoming(ReceiverStream::new(incoming)),
    );
    (addr, root, seen)
}

#[tokio::test]
async fn certifies_renews_and_watches() {
    let (addr, root, seen) = start().await;
    let me = id("/ns/a/sa/web");
    let metrics = Arc::new(Metrics::new());
    let (svid_tx, svid) = watch::channel(None);
    let (bundle_tx, bundle) = watch::channel(Arc::new(vec![root]));
    let (snapshot_tx, mut snapshot) = watch::channel(None);
    tokio::spawn(identity::run(
        CertifyParams {
            control_plane: addr.clone(),
            identity: me.clone(),
            token: Some(trellis_proxy::config::Token(TOKEN.into())),
            advertise_address: "127.0.0.1:15006".parse().unwrap(),
        },
        svid_tx,
        bundle_tx.clone(),
        metrics.clone(),
    ));
    tokio::spawn(trellis_proxy::policy::watch::run(
        WatchParams {
            control_plane: addr,
            identity: me.clone(),
            advertise_address: "127.0.0.1:15006".parse().unwrap(),
        },
        svid.clone(),
        Outputs {
            snapshot: snapshot_tx,
            bundle: bundle_tx,
            metrics: metrics.clone(),
        },
    ));

    // The first certificate, then a renewal over mTLS before it expires.
    eventually("a renewal proved by the current SVID", || {
        seen.lock()
            .unwrap()
            .certify
            .iter()
            .any(|(token, peer)| !token && peer.as_ref() == Some(&me))
    })
    .await;
    let certify = seen.lock().unwrap().certify.clone();
    assert_eq!(
        certify[0],
        (true, None),
        "the first Certify uses the token alone"
    );
    assert!(
        svid.borrow()
            .as_ref()
            .unwrap()
            .is_valid_at(std::time::SystemTime::now())
    );
    assert_eq!(bundle.borrow().len(), 1);

    // Snapshot 1 is ACKed and applied; snapshot 2 is NACKed with the field.
    eventually("an ACK and a NACK", || {
        seen.lock().unwrap().answers.len() == 2
    })
    .await;
    let answers = std::mem::take(&mut seen.lock().unwrap().answers);
    assert!(
        matches!(&answers[0], Kind::Ack(a) if a.version == 1),
        "{answers:?}"
    );
    assert!(
        matches!(&answers[1], Kind::Nack(n) if n.version == 2 && n.reason.contains("endpoints[0].address")),
        "{answers:?}"
    );
    let current = snapshot.borrow_and_update().clone().unwrap();
    assert_eq!(current.version, 1);
    assert_eq!(
        current.endpoints[&"10.1.0.7:15006".parse().unwrap()].as_str(),
        "spiffe://td.test/ns/b/sa/api"
    );
    assert!(metrics.encode().contains("trellis_snapshot_version 1"));
}
