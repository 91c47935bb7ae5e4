//! A fake control plane over real gRPC and real mTLS: Identity signs CSRs
//! with a throwaway CA (refusing renewals without the ServiceAccount token
//! as `--renewal-proof token` does, once told to), Discovery streams
//! whatever snapshot the test pushes and records every ACK and NACK.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

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
use trellis_proto::identity::v1::{
    CertifyRequest, CertifyResponse, RefusedInboundAddress, certify_request::Proof,
};

use super::{Ca, eventually, td};

/// The join token the fake accepts.
pub const TOKEN: &str = "join-token-for-web";

/// What the fake control plane saw.
#[derive(Default, Debug)]
pub struct Seen {
    /// For each Certify: whether it came with the token, and the client
    /// certificate's SPIFFE ID if any.
    pub certify: Vec<(bool, Option<SpiffeId>)>,
    /// The ServiceAccount tokens Certify was proved with, in order.
    pub service_account_tokens: Vec<String>,
    /// The `last_version` and `last_version_epoch` of each Subscribe, in
    /// order.
    pub subscribes: Vec<(u64, u64)>,
    /// Every ACK and NACK, in order.
    pub answers: Vec<Kind>,
    /// Entries Certify adds to the trust bundle after the root (a broken
    /// control plane's).
    pub bundle_extra: Vec<Vec<u8>>,
    /// The inbound addresses Certify says it did not record, with why.
    pub not_recorded: Vec<RefusedInboundAddress>,
    /// Whether Certify signs leaves without basicConstraints, which peers
    /// refuse (a faulty CA's).
    pub leaf_without_basic_constraints: bool,
    /// Connections closed unanswered while down (see
    /// [`FakeControlPlane::go_down`]).
    pub closed_while_down: usize,
}

/// A running fake; dropped with the test's runtime.
pub struct FakeControlPlane {
    pub addr: String,
    pub ca: Arc<Ca>,
    pub root: CertificateDer<'static>,
    pub seen: Arc<Mutex<Seen>>,
    snapshot: watch::Sender<Option<pb::Snapshot>>,
    /// Bumped to end every open Watch stream.
    generation: watch::Sender<u64>,
    /// Whether a Watch from a sidecar that holds the pushed snapshot is
    /// sent nothing, as the real control plane does (see [`Self::hold`]).
    hold: Arc<std::sync::atomic::AtomicBool>,
    /// Whether a renewal must prove a ServiceAccount token too (see
    /// [`Self::renewals_need_token`]).
    renewals_need_token: Arc<std::sync::atomic::AtomicBool>,
    /// Whether every Watch stream ends as its Subscribe is read (see
    /// [`Self::end_streams_at_once`]).
    end_at_once: Arc<std::sync::atomic::AtomicBool>,
    /// Whether every new connection is closed as it is accepted (see
    /// [`Self::go_down`]).
    down: Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Clone)]
struct Service {
    ca: Arc<Ca>,
    root: CertificateDer<'static>,
    cert_ttl: time::Duration,
    seen: Arc<Mutex<Seen>>,
    snapshot: watch::Receiver<Option<pb::Snapshot>>,
    generation: watch::Receiver<u64>,
    hold: Arc<std::sync::atomic::AtomicBool>,
    renewals_need_token: Arc<std::sync::atomic::AtomicBool>,
    end_at_once: Arc<std::sync::atomic::AtomicBool>,
}

#[async_trait]
impl Identity for Service {
    async fn certify(
        &self,
        req: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let peer = req.extensions().get::<PeerId>().and_then(|p| p.0.clone());
        let req = req.into_inner();
        let service_account = match &req.proof {
            Some(Proof::ServiceAccountToken(t)) => Some(t.clone()),
            _ => None,
        };
        let token = service_account.is_some()
            || matches!(&req.proof, Some(Proof::JoinToken(t)) if t == TOKEN);
        {
            let mut seen = self.seen.lock().unwrap();
            seen.certify.push((token, peer.clone()));
            seen.service_account_tokens.extend(service_account);
        }
        if !token && peer.is_none() {
            return Err(Status::unauthenticated("no proof"));
        }
        if peer.is_some()
            && !matches!(req.proof, Some(Proof::ServiceAccountToken(_)))
            && self
                .renewals_need_token
                .load(std::sync::atomic::Ordering::Relaxed)
        {
            // As the real control plane refuses it, reason included.
            let mut status = Status::unauthenticated(
                "renewal needs the ServiceAccount token: this control plane runs with \
                 --renewal-proof token",
            );
            status.metadata_mut().insert(
                trellis_core::grpc::REFUSAL_KEY,
                tonic::metadata::MetadataValue::from_static(
                    trellis_core::grpc::REFUSAL_RENEWAL_NEEDS_TOKEN,
                ),
            );
            return Err(status);
        }
        let mut csr = CertificateSigningRequestParams::from_der(&req.csr.into())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let now = time::OffsetDateTime::now_utc();
        // Backdated like a real CA: renewal must count from receipt.
        csr.params.not_before = now - time::Duration::minutes(5);
        csr.params.not_after = now + self.cert_ttl;
        let seen = self.seen.lock().unwrap();
        // A leaf as the X.509-SVID specification has it, as a real CA signs.
        csr.params.is_ca = if seen.leaf_without_basic_constraints {
            rcgen::IsCa::NoCa
        } else {
            rcgen::IsCa::ExplicitNoCa
        };
        csr.params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        let cert = self.ca.sign(&csr);
        let mut trust_bundle = vec![self.root.to_vec()];
        trust_bundle.extend(seen.bundle_extra.iter().cloned());
        Ok(Response::new(CertifyResponse {
            chain: vec![cert.to_vec()],
            trust_bundle,
            expires_at_unix: 0,
            spiffe_id: String::new(),
            refused_inbound_addresses: seen.not_recorded.clone(),
        }))
    }
}

#[async_trait]
impl Discovery for Service {
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
        let mut snapshot = self.snapshot.clone();
        let mut generation = self.generation.clone();
        generation.mark_unchanged();
        let hold = self.hold.clone();
        let end_at_once = self.end_at_once.clone();
        tokio::spawn(async move {
            let Ok(Some(first)) = requests.message().await else {
                return;
            };
            let Some(Kind::Subscribe(subscribe)) = first.kind else {
                panic!("the first request must subscribe");
            };
            let held = (subscribe.last_version, subscribe.last_version_epoch);
            // Read before the Subscribe is seen: a test that turns it off
            // once it sees one turns it off for the next.
            let end = end_at_once.load(std::sync::atomic::Ordering::Relaxed);
            seen.lock().unwrap().subscribes.push(held);
            if end {
                let _ = tx.send(Err(Status::unavailable("shutting down"))).await;
                return;
            }
            let holds = |s: &Option<pb::Snapshot>| {
                s.as_ref()
                    .is_some_and(|s| (s.version, s.version_epoch) == held && s.version != 0)
            };
            if hold.load(std::sync::atomic::Ordering::Relaxed) && holds(&snapshot.borrow()) {
                snapshot.mark_unchanged();
            } else {
                snapshot.mark_changed();
            }
            loop {
                tokio::select! {
                    changed = snapshot.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        let current = snapshot.borrow_and_update().clone();
                        if let Some(current) = current
                            && tx.send(Ok(current)).await.is_err()
                        {
                            return;
                        }
                    }
                    request = requests.message() => match request {
                        Ok(Some(request)) => {
                            if let Some(answer) = request.kind {
                                seen.lock().unwrap().answers.push(answer);
                            }
                        }
                        _ => return,
                    },
                    // Dropping `tx` ends the stream: the sidecar reconnects.
                    _ = generation.changed() => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

impl FakeControlPlane {
    /// Starts a fake that issues certificates valid for `cert_ttl` and
    /// streams no snapshot until one is pushed.
    pub async fn start(cert_ttl: Duration) -> Self {
        super::sidecar::install_log_capture();
        let ca = Arc::new(Ca::new());
        let root = ca.root();
        let td = td();
        let svid = ca.svid(&SpiffeId::control_plane(&td));
        let roots = trellis_core::tls::root_store(std::slice::from_ref(&root)).unwrap();
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
        let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let closing = down.clone();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let seen_accepts = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                if closing.load(std::sync::atomic::Ordering::Relaxed) {
                    let seen_down = seen_accepts.clone();
                    // Closed once the ClientHello is read, so every client
                    // sees the same end of stream, never a reset.
                    tokio::spawn(async move {
                        let mut tcp = tcp;
                        let mut hello = [0u8; 4096];
                        let _ = tokio::io::AsyncReadExt::read(&mut tcp, &mut hello).await;
                        seen_down.lock().unwrap().closed_while_down += 1;
                    });
                    continue;
                }
                let (acceptor, conns) = (acceptor.clone(), conns.clone());
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        let _ = conns.send(Ok(Conn(tls))).await;
                    }
                });
            }
        });
        let (snapshot, snapshot_rx) = watch::channel(None);
        let (generation, generation_rx) = watch::channel(0);
        let hold = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let renewals_need_token = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let end_at_once = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let service = Service {
            ca: ca.clone(),
            root: root.clone(),
            cert_ttl: time::Duration::try_from(cert_ttl).unwrap(),
            seen: seen.clone(),
            snapshot: snapshot_rx,
            generation: generation_rx,
            hold: hold.clone(),
            renewals_need_token: renewals_need_token.clone(),
            end_at_once: end_at_once.clone(),
        };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(IdentityServer::new(service.clone()))
                .add_service(DiscoveryServer::new(service))
                .serve_with_incoming(ReceiverStream::new(incoming)),
        );
        FakeControlPlane {
            addr,
            ca,
            root,
            seen,
            snapshot,
            generation,
            hold,
            renewals_need_token,
            end_at_once,
            down,
        }
    }

    /// Acts as a control plane gone away: open Watch streams end and every
    /// new connection is closed unanswered, so Certify and Watch fail to
    /// connect, until [`Self::come_back`].
    pub fn go_down(&self) {
        self.down.store(true, std::sync::atomic::Ordering::Relaxed);
        self.drop_streams();
    }

    /// Accepts connections again after [`Self::go_down`].
    pub fn come_back(&self) {
        self.down.store(false, std::sync::atomic::Ordering::Relaxed);
    }

    /// From now on, a renewal (a Certify with a client certificate) without
    /// a ServiceAccount token is refused `UNAUTHENTICATED` with reason
    /// `renewal_needs_token`, as by a control plane with
    /// `--renewal-proof token`; until then the certificate alone renews,
    /// as with `--renewal-proof certificate`.
    pub fn renewals_need_token(&self) {
        self.renewals_need_token
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// From now on (`true`), every Watch stream ends with `UNAVAILABLE` as
    /// soon as its Subscribe is read, as with a control plane that crashes
    /// under its streams, again and again; `false` keeps them open again.
    pub fn end_streams_at_once(&self, end: bool) {
        self.end_at_once
            .store(end, std::sync::atomic::Ordering::Relaxed);
    }

    /// From now on, a Watch from a sidecar that already holds the pushed
    /// snapshot is sent nothing, as the real control plane does.
    pub fn hold(&self) {
        self.hold.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Streams `snapshot` to every open Watch, and to every later one.
    pub fn push(&self, snapshot: pb::Snapshot) {
        self.snapshot.send_replace(Some(snapshot));
    }

    /// Pushes `snapshot` and waits for the sidecar's answer to its version.
    pub async fn push_and_wait(&self, snapshot: pb::Snapshot) -> Kind {
        let version = snapshot.version;
        let before = self.seen.lock().unwrap().answers.len();
        self.push(snapshot);
        self.answer_after(before, version).await
    }

    /// Waits for an answer to `version` among the answers after the first
    /// `skip`.
    pub async fn answer_after(&self, skip: usize, version: u64) -> Kind {
        let find = || {
            let seen = self.seen.lock().unwrap();
            seen.answers[skip.min(seen.answers.len())..]
                .iter()
                .find(|a| answer_version(a) == Some(version))
                .cloned()
        };
        eventually(&format!("an answer to snapshot {version}"), || {
            find().is_some()
        })
        .await;
        find().unwrap()
    }

    /// Ends every open Watch stream, as a control plane restart would.
    pub fn drop_streams(&self) {
        self.generation.send_modify(|g| *g += 1);
    }
}

/// The version an ACK or NACK answers.
pub fn answer_version(answer: &Kind) -> Option<u64> {
    match answer {
        Kind::Ack(a) => Some(a.version),
        Kind::Nack(n) => Some(n.version),
        Kind::Subscribe(_) => None,
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
