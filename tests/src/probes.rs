//! Clients that are not sidecars, to knock on a sidecar's inbound port: a
//! plaintext client, a TLS client without a certificate, and a TLS client
//! with a certificate from a CA outside the mesh (made here with rcgen).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trellis_core::TrustDomain;
use trellis_core::tls::{ExpectedServer, PROTOCOL_VERSIONS, SpiffeServerVerifier};

/// How long a probe waits for an answer after sending its request.
pub const PROBE_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// What a client got from the port it knocked on.
#[derive(Debug)]
pub struct Probe {
    /// Whether the client's side of the TLS handshake completed (with TLS 1.3
    /// a server refuses a client certificate only after that).
    pub handshake_completed: bool,
    /// Every byte received after the request was sent (TLS: decrypted).
    pub received: Vec<u8>,
    /// How the exchange ended if it did not end with a clean EOF.
    pub error: Option<String>,
}

impl Probe {
    pub fn received_text(&self) -> String {
        String::from_utf8_lossy(&self.received).into_owned()
    }
}

/// A minimal HTTP/1.1 request, as the app behind a sidecar would expect.
pub fn http_request(host: SocketAddr) -> Vec<u8> {
    format!("GET / HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n").into_bytes()
}

/// Sends `request` in plaintext and collects the answer.
pub async fn plaintext(addr: SocketAddr, request: &[u8]) -> anyhow::Result<Probe> {
    let mut tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    let write_error = tcp.write_all(request).await.err();
    let (received, error) = read_all(&mut tcp).await;
    Ok(Probe {
        handshake_completed: false,
        received,
        error: error.or(write_error.map(|e| e.to_string())),
    })
}

/// Runs a TLS handshake with `config`, sends `request` and collects the
/// answer. A refused handshake is an outcome, not an error.
pub async fn tls(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    request: &[u8],
) -> anyhow::Result<Probe> {
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    let name = ServerName::IpAddress(addr.ip().into());
    let mut stream = match tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
    {
        Ok(stream) => stream,
        Err(e) => {
            return Ok(Probe {
                handshake_completed: false,
                received: Vec::new(),
                error: Some(e.to_string()),
            });
        }
    };
    let write_error = match stream.write_all(request).await {
        Ok(()) => stream.flush().await.err(),
        Err(e) => Some(e),
    };
    let (received, error) = read_all(&mut stream).await;
    Ok(Probe {
        handshake_completed: true,
        received,
        error: error.or(write_error.map(|e| e.to_string())),
    })
}

async fn read_all<S: AsyncRead + Unpin>(stream: &mut S) -> (Vec<u8>, Option<String>) {
    let mut received = Vec::new();
    let result = tokio::time::timeout(PROBE_READ_TIMEOUT, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(n) => received.extend_from_slice(&buf[..n]),
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await;
    let error = match result {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e),
        Err(_) => Some(format!("no EOF within {PROBE_READ_TIMEOUT:?}")),
    };
    (received, error)
}

/// The roots of a PEM trust bundle (e.g. the control plane's bundle.pem).
pub fn load_bundle(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let roots = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} is not a PEM bundle", path.display()))?;
    anyhow::ensure!(!roots.is_empty(), "{} holds no certificate", path.display());
    Ok(roots)
}

/// A TLS 1.3 client that verifies the server against `bundle` (any SPIFFE ID
/// in `trust_domain`) and presents `client` if given.
pub fn client_config(
    bundle: &[CertificateDer<'static>],
    trust_domain: &str,
    client: Option<ClientIdentity>,
) -> anyhow::Result<Arc<ClientConfig>> {
    let roots = trellis_core::tls::root_store(bundle)?;
    let td = TrustDomain::new(trust_domain)?;
    let verifier = SpiffeServerVerifier::new(roots, ExpectedServer::AnyIn(td));
    let builder = ClientConfig::builder_with_provider(trellis_core::tls::provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let config = match client {
        None => builder.with_no_client_auth(),
        Some(id) => builder.with_client_auth_cert(id.chain, id.key)?,
    };
    Ok(Arc::new(config))
}

/// A client certificate chain (leaf first) and its key.
#[derive(Debug)]
pub struct ClientIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

/// An X.509-SVID for `spiffe_id` that looks right in every way but is signed
/// by a fresh CA the mesh has never heard of.
pub fn foreign_svid(spiffe_id: &str) -> anyhow::Result<ClientIdentity> {
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, "not the mesh CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);

    let leaf_key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(Vec::<String>::new())?;
    leaf.subject_alt_names = vec![SanType::URI(spiffe_id.try_into()?)];
    leaf.is_ca = IsCa::ExplicitNoCa;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer)?;
    Ok(ClientIdentity {
        chain: vec![leaf_cert.der().clone(), ca_cert.der().clone()],
        key: PrivatePkcs8KeyDer::from(leaf_key.serialize_der()).into(),
    })
}
