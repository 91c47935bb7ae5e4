//! The HTTPS servers of the tests: serving certificates for the stand-ins
//! for the Kubernetes API server (none can run here) and the webhooks the
//! binary serves (a CA made with rcgen and a leaf it signed for `localhost`
//! and 127.0.0.1; throwaway test material, never written to a log), and the
//! loop that serves a stand-in's answers over real TLS.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;
use trellis_control_plane::authn::tokenreview::KubeApi;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A CA and the serving certificate it signed.
pub struct ServingCert {
    /// The CA, as a client trusts it (`ca.crt`, a `caBundle`).
    pub ca_pem: String,
    /// The leaf and its key, as a server reads them (`tls.crt`, `tls.key`).
    pub cert_pem: String,
    pub key_pem: String,
    chain: Vec<CertificateDer<'static>>,
    key_der: Vec<u8>,
}

impl ServingCert {
    /// A new CA called `ca_name` and a leaf for `localhost` and 127.0.0.1.
    pub fn new(ca_name: &str) -> ServingCert {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.distinguished_name.push(DnType::CommonName, ca_name);
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut leaf = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        leaf.subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        let leaf_cert = leaf.signed_by(&key, &issuer).unwrap();
        ServingCert {
            ca_pem: ca_cert.pem(),
            cert_pem: leaf_cert.pem(),
            key_pem: key.serialize_pem(),
            chain: vec![leaf_cert.der().clone()],
            key_der: key.serialize_der(),
        }
    }

    /// A TLS acceptor presenting the leaf, asking no client certificate.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let key = PrivateKeyDer::from(PrivatePkcs8KeyDer::from(self.key_der.clone()));
        let config = rustls::ServerConfig::builder_with_provider(trellis_core::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), key)
            .unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }
}

/// Whether a stand-in server answers the connections it accepts.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Answering {
    Yes,
    /// Accepts and holds every connection, never answering (a hung API
    /// server).
    Never,
}

/// Serves HTTP/1.1 over TLS with `cert` on a free loopback port, each
/// request answered by `answer`, until the returned sender is dropped;
/// `accepted` counts the connections accepted.
pub async fn serve_https<F, Fut, B>(
    cert: &ServingCert,
    answering: Answering,
    answer: F,
    accepted: Arc<AtomicUsize>,
) -> (SocketAddr, oneshot::Sender<()>)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let acceptor = cert.acceptor();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, mut stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let mut held = Vec::new();
        // Dropped when the server stops: its open connections close too, as
        // a server that is gone leaves none behind.
        let (_open, closing) = tokio::sync::watch::channel(());
        loop {
            let tcp = tokio::select! {
                tcp = listener.accept() => tcp.unwrap().0,
                _ = &mut stopped => return,
            };
            accepted.fetch_add(1, Ordering::SeqCst);
            if answering == Answering::Never {
                held.push(tcp);
                continue;
            }
            let acceptor = acceptor.clone();
            let answer = answer.clone();
            let mut closing = closing.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |req| {
                    let answer = answer.clone();
                    async move { Ok::<_, Infallible>(answer(req).await) }
                });
                let serving = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service);
                tokio::select! {
                    _ = serving => {}
                    _ = closing.changed() => {}
                }
            });
        }
    });
    (addr, stop)
}

/// A stand-in for the Kubernetes API server as a client in a pod finds it:
/// its HTTPS address (a CA of its own), and the CA and bearer-token files
/// the pod would have mounted. Serves until dropped.
pub struct ApiServer {
    addr: SocketAddr,
    dir: tempfile::TempDir,
    accepted: Arc<AtomicUsize>,
    _stop: oneshot::Sender<()>,
}

impl ApiServer {
    /// Serves `answer`, with `token` as the mounted token file's contents.
    pub async fn start<F, Fut, B>(token: &str, answering: Answering, answer: F) -> Self
    where
        F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Response<B>> + Send + 'static,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let dir = tempfile::tempdir().unwrap();
        let cert = ServingCert::new("fake kubernetes CA");
        std::fs::write(dir.path().join("ca.crt"), &cert.ca_pem).unwrap();
        std::fs::write(dir.path().join("token"), token).unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (addr, stop) = serve_https(&cert, answering, answer, accepted.clone()).await;
        ApiServer {
            addr,
            dir,
            accepted,
            _stop: stop,
        }
    }

    /// How many connections clients have opened to this server.
    pub fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    pub fn token_file(&self) -> PathBuf {
        self.dir.path().join("token")
    }

    /// The control plane's client settings for this server.
    pub fn api(&self) -> KubeApi {
        KubeApi::resolve(
            Some(&self.url()),
            Some(&self.ca()),
            Some(&self.token_file()),
            &trellis_core::flags::AsTyped,
        )
        .unwrap()
    }
}
