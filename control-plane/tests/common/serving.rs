//! Serving certificates for the HTTPS servers of the tests: the stand-ins
//! for the Kubernetes API server (none can run here) and the webhooks the
//! binary serves. A CA made with rcgen and a leaf it signed for `localhost`
//! and 127.0.0.1; throwaway test material, never written to a log.

use std::sync::Arc;

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
