//! SPIFFE peer verification for rustls, shared by the control plane, the
//! sidecar and `trellisctl`.
//!
//! Peers are verified against the trust bundle and by SPIFFE ID, never by
//! hostname. Only TLS 1.3 is offered, with the aws-lc-rs provider (which
//! prefers the X25519MLKEM768 hybrid key exchange) and the suites of
//! [`CIPHER_SUITES`]. This module builds
//! verifiers; it never loads keys from disk and never talks to the CA.

use std::fmt;
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    SignatureScheme,
};

use crate::revocation::Revocations;
use crate::spiffe::{InvalidSpiffeId, SpiffeId, TrustDomain};

mod claimed;
mod failure;

pub use claimed::{Bounded, CLAIMED_CHARS, Claimed, claimed, noting_refused};
pub use failure::HandshakeFailure;

/// The only protocol version Trellis speaks.
pub static PROTOCOL_VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// The crypto provider every Trellis TLS config uses: aws-lc-rs with the
/// TLS 1.3 suites in [`CIPHER_SUITES`]' order.
pub fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites = CIPHER_SUITES.to_vec();
    Arc::new(provider)
}

/// TLS 1.3 suites, most preferred first (a rustls server follows the
/// client's order, so between two Trellis peers this order decides).
/// AES-128-GCM with SHA-256 first, as BoringSSL orders them: a handshake
/// runs its key schedule and transcript through the suite's hash, and
/// SHA-256 has instructions of its own on current x86 and Arm CPUs where
/// SHA-384 does not (SHA-384 was the largest single cost of a resumed
/// handshake); AES-128-GCM is also the faster cipher. AES-256-GCM stays
/// offered for peers that insist on it.
pub static CIPHER_SUITES: &[rustls::SupportedCipherSuite] = &[
    rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
    rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
    rustls::crypto::aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
];

/// Why a certificate is not a usable X.509-SVID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    #[error("certificate is not valid X.509: {0}")]
    Malformed(String),
    #[error("an X.509-SVID has exactly one URI SAN; this certificate has {0}")]
    UriSanCount(usize),
    #[error("the URI SAN is not a valid SPIFFE ID: {0}")]
    InvalidId(#[from] InvalidSpiffeId),
    #[error("peer {found} is outside trust domain {expected}")]
    ForeignTrustDomain {
        found: SpiffeId,
        expected: TrustDomain,
    },
    #[error("peer presented {found}, expected {expected}")]
    UnexpectedId { found: SpiffeId, expected: SpiffeId },
    #[error("no peer certificate was presented")]
    NoCertificate,
    #[error(
        "the certificate is outside its validity period (not before {not_before}, not after {not_after})"
    )]
    OutsideValidity {
        not_before: String,
        not_after: String,
    },
    #[error("the chain ends at root {subject} of the trust bundle, which expired {not_after}")]
    ExpiredRoot { subject: String, not_after: String },
    #[error("every root of the trust bundle has expired, the last {not_after}")]
    RootsExpired { not_after: String },
    #[error(
        "{id} is the trust domain's own ID; an X.509-SVID names a workload, whose ID has a path"
    )]
    NoPath { id: SpiffeId },
    #[error(
        "the certificate {0}; an X.509-SVID leaf's keyUsage holds digitalSignature and neither keyCertSign nor cRLSign"
    )]
    KeyUsage(&'static str),
    #[error("the certificate {0}; an X.509-SVID leaf carries basicConstraints with cA false")]
    BasicConstraints(&'static str),
    #[error("a CA certificate was presented as the leaf; an X.509-SVID leaf is not a CA")]
    CaAsLeaf,
    #[error("a leaf certificate signed another certificate of the chain; only a CA may")]
    LeafAsCa,
}

impl SvidError {
    /// The handshake failure the refusal ends, as
    /// [`HandshakeFailure::of_rustls`] names a rustls error carrying it.
    pub fn reason(&self) -> HandshakeFailure {
        match self {
            SvidError::UnexpectedId { .. } => HandshakeFailure::UnexpectedIdentity,
            SvidError::ForeignTrustDomain { .. } => HandshakeFailure::ForeignTrustDomain,
            SvidError::ExpiredRoot { .. } | SvidError::RootsExpired { .. } => {
                HandshakeFailure::ExpiredRoot
            }
            SvidError::OutsideValidity { .. } => HandshakeFailure::ExpiredCertificate,
            SvidError::NoPath { .. } => HandshakeFailure::TrustDomainId,
            SvidError::KeyUsage(_) => HandshakeFailure::SvidKeyUsage,
            SvidError::BasicConstraints(_) => HandshakeFailure::SvidBasicConstraints,
            SvidError::CaAsLeaf => HandshakeFailure::CaUsedAsLeaf,
            SvidError::LeafAsCa => HandshakeFailure::LeafUsedAsCa,
            SvidError::Malformed(_)
            | SvidError::UriSanCount(_)
            | SvidError::InvalidId(_)
            | SvidError::NoCertificate => HandshakeFailure::InvalidSvid,
        }
    }
}

/// The SPIFFE ID held in a certificate's single URI SAN.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, SvidError> {
    id_in(&parse(cert)?)
}

fn parse<'a>(
    cert: &'a CertificateDer<'_>,
) -> Result<x509_parser::certificate::X509Certificate<'a>, SvidError> {
    x509_parser::parse_x509_certificate(cert.as_ref())
        .map(|(_, parsed)| parsed)
        .map_err(|e| SvidError::Malformed(e.to_string()))
}

fn id_in(parsed: &x509_parser::certificate::X509Certificate<'_>) -> Result<SpiffeId, SvidError> {
    let mut uris = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(uri) = name {
                uris.push(*uri);
            }
        }
    }
    match uris.as_slice() {
        [uri] => Ok(SpiffeId::parse(uri)?),
        other => Err(SvidError::UriSanCount(other.len())),
    }
}

/// The SPIFFE ID of an X.509-SVID leaf, which must be shaped as the
/// X.509-SVID specification has it: a workload's ID (with a path), a
/// keyUsage with digitalSignature and neither keyCertSign nor cRLSign, and
/// basicConstraints with cA false. webpki checks none of these on a leaf
/// but the last's cA.
pub fn leaf_spiffe_id(cert: &CertificateDer<'_>) -> Result<SpiffeId, SvidError> {
    leaf_id_in(&parse(cert)?)
}

fn leaf_id_in(
    parsed: &x509_parser::certificate::X509Certificate<'_>,
) -> Result<SpiffeId, SvidError> {
    let id = id_in(parsed)?;
    if id.path().is_empty() {
        return Err(SvidError::NoPath { id });
    }
    match parsed.key_usage() {
        Ok(Some(usage)) if !usage.value.digital_signature() => {
            return Err(SvidError::KeyUsage(
                "has a keyUsage without digitalSignature",
            ));
        }
        Ok(Some(usage)) if usage.value.key_cert_sign() || usage.value.crl_sign() => {
            return Err(SvidError::KeyUsage(
                "has a keyUsage with keyCertSign or cRLSign, a CA's",
            ));
        }
        Ok(Some(_)) => {}
        Ok(None) => return Err(SvidError::KeyUsage("has no keyUsage")),
        Err(e) => return Err(SvidError::Malformed(e.to_string())),
    }
    match parsed.basic_constraints() {
        Ok(Some(constraints)) if constraints.value.ca => Err(SvidError::CaAsLeaf),
        Ok(Some(_)) => Ok(id),
        Ok(None) => Err(SvidError::BasicConstraints("has no basicConstraints")),
        Err(e) => Err(SvidError::Malformed(e.to_string())),
    }
}

/// The SPIFFE ID of the peer of an established TLS connection, whose
/// certificate must be valid now.
///
/// A full handshake's verifier has already checked the validity period. A
/// resumed session's has not: rustls restores the peer's chain from the
/// session (a ticket, sealed when the chain was verified) and calls no
/// verifier, and each resumption is handed fresh tickets carrying the same
/// chain. Without this check a caller whose SVID expired, or was never
/// renewed, could resume its way in for as long as the ticket key lives.
pub fn peer_spiffe_id(peer_certs: Option<&[CertificateDer<'_>]>) -> Result<SpiffeId, SvidError> {
    peer_svid(peer_certs).map(|(id, _)| id)
}

/// As [`peer_spiffe_id`], with the certificate's notBefore (Unix seconds),
/// read in the same parse: what a revocation is checked against
/// ([`crate::revocation::Revocations::check_issued`]).
pub fn peer_svid(peer_certs: Option<&[CertificateDer<'_>]>) -> Result<(SpiffeId, i64), SvidError> {
    let leaf = peer_certs
        .and_then(|c| c.first())
        .ok_or(SvidError::NoCertificate)?;
    let parsed = parse(leaf)?;
    let id = leaf_id_in(&parsed)?;
    let (not_before, not_after) = period(&parsed);
    within_validity(not_before, not_after)?;
    Ok((id, not_before))
}

/// The validity period of `cert`, as Unix seconds (not before, not after).
pub fn validity_of(cert: &CertificateDer<'_>) -> Result<(i64, i64), SvidError> {
    Ok(period(&parse(cert)?))
}

fn period(parsed: &x509_parser::certificate::X509Certificate<'_>) -> (i64, i64) {
    let validity = parsed.validity();
    (
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    )
}

/// Whether now lies in the validity period `not_before..=not_after` (Unix
/// seconds, as [`validity_of`] gives them); the error gives both ends as
/// certificates write their times.
pub fn within_validity(not_before: i64, not_after: i64) -> Result<(), SvidError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    if (not_before..=not_after).contains(&now) {
        return Ok(());
    }
    Err(SvidError::OutsideValidity {
        not_before: written(not_before),
        not_after: written(not_after),
    })
}

/// Unix seconds as certificates write their times.
fn written(secs: i64) -> String {
    x509_parser::time::ASN1Time::from_timestamp(secs)
        .map_or_else(|_| format!("{secs} s after the epoch"), |t| t.to_string())
}

/// The roots of a trust bundle as the verifiers here take them: a root
/// store, and when each root expires. webpki knows a trust anchor as a name
/// and a key, with no validity period, so on its own a root past its
/// notAfter would go on anchoring chains for as long as it is in the bundle;
/// these verifiers stop trusting it the moment it expires (Go's and
/// OpenSSL's verifiers check the dates of the whole chain, root included).
/// Cheap to clone.
#[derive(Clone)]
pub struct Roots(Arc<RootsInner>);

struct RootsInner {
    store: Arc<RootCertStore>,
    roots: Vec<Root>,
    /// The earliest notAfter of `roots`: until then none has expired, and
    /// a verification takes `store` as it is.
    earliest: u64,
    /// The store without the roots expired, once some have, with how many
    /// it leaves out (roots only ever expire, so that count names it).
    unexpired: Mutex<Option<(usize, Arc<RootCertStore>)>>,
}

struct Root {
    der: CertificateDer<'static>,
    subject: String,
    /// Unix seconds; `u64::MAX` for a root whose dates cannot be read
    /// (webpki took it, so it anchors as it always did).
    not_after: u64,
}

impl Root {
    /// Past its notAfter at `now` (a certificate is valid through the
    /// second its notAfter names).
    fn expired_at(&self, now: UnixTime) -> bool {
        now.as_secs() > self.not_after
    }
}

/// Builds the roots of a trust bundle (DER). Refuses an empty bundle, a
/// root webpki cannot take, and a bundle whose every root has expired.
pub fn root_store(bundle: &[CertificateDer<'static>]) -> Result<Roots, rustls::Error> {
    let mut store = RootCertStore::empty();
    let mut roots = Vec::with_capacity(bundle.len());
    for root in bundle {
        store.add(root.clone())?;
        let (subject, not_after) = match parse(root) {
            Ok(parsed) => (
                parsed.subject().to_string(),
                u64::try_from(period(&parsed).1).unwrap_or(0),
            ),
            Err(_) => (String::new(), u64::MAX),
        };
        roots.push(Root {
            der: root.clone(),
            subject,
            not_after,
        });
    }
    if store.is_empty() {
        return Err(rustls::Error::General("the trust bundle is empty".into()));
    }
    let roots = Roots(Arc::new(RootsInner {
        store: Arc::new(store),
        earliest: roots.iter().map(|r| r.not_after).min().unwrap_or(u64::MAX),
        roots,
        unexpired: Mutex::new(None),
    }));
    roots
        .at(UnixTime::now())
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    Ok(roots)
}

impl Roots {
    /// Every root, expired or not.
    pub fn store(&self) -> &Arc<RootCertStore> {
        &self.0.store
    }

    fn expired(&self, now: UnixTime) -> usize {
        if now.as_secs() <= self.0.earliest {
            return 0;
        }
        self.0.roots.iter().filter(|r| r.expired_at(now)).count()
    }

    /// The roots that anchor chains at `now`: all of them until the first
    /// expires (no lock, no copy), then those not expired.
    fn at(&self, now: UnixTime) -> Result<Arc<RootCertStore>, SvidError> {
        let expired = self.expired(now);
        if expired == 0 {
            return Ok(self.0.store.clone());
        }
        if expired == self.0.roots.len() {
            let last = self.0.roots.iter().map(|r| r.not_after).max().unwrap_or(0);
            return Err(SvidError::RootsExpired {
                not_after: written(i64::try_from(last).unwrap_or(i64::MAX)),
            });
        }
        let mut cached = self.0.unexpired.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((count, store)) = &*cached
            && *count == expired
        {
            return Ok(store.clone());
        }
        let mut store = RootCertStore::empty();
        for root in self.0.roots.iter().filter(|r| !r.expired_at(now)) {
            // Each was added to the full store already.
            let _ = store.add(root.der.clone());
        }
        let store = Arc::new(store);
        *cached = Some((expired, store.clone()));
        Ok(store)
    }

    /// A resumed session's chain split into its leaf and intermediates,
    /// to verify again at `now`; `None` while no root and none of its
    /// intermediates has expired, when nothing of its trust can have
    /// changed (a chain of a leaf alone costs one comparison).
    fn to_verify_again<'c, 'a>(
        &self,
        chain: &'c [CertificateDer<'a>],
        now: UnixTime,
    ) -> Result<Option<(&'c CertificateDer<'a>, &'c [CertificateDer<'a>])>, rustls::Error> {
        let (leaf, intermediates) = chain
            .split_first()
            .ok_or(rustls::Error::NoCertificatesPresented)?;
        let now_secs = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        // An intermediate that cannot be read is for the verifier to refuse.
        let intermediate_expired = intermediates
            .iter()
            .any(|c| validity_of(c).map_or(true, |(_, not_after)| not_after < now_secs));
        if self.expired(now) == 0 && !intermediate_expired {
            return Ok(None);
        }
        Ok(Some((leaf, intermediates)))
    }

    /// After a chain failed to verify at `now`: the expired root it leads
    /// to, if one does (`verifies` tells whether it verifies against a
    /// store), as the error to give instead.
    fn expired_anchor(
        &self,
        now: UnixTime,
        verifies: impl Fn(Arc<RootCertStore>) -> bool,
    ) -> Option<SvidError> {
        self.0
            .roots
            .iter()
            .filter(|r| r.expired_at(now))
            .find(|r| {
                let mut alone = RootCertStore::empty();
                alone.add(r.der.clone()).is_ok() && verifies(Arc::new(alone))
            })
            .map(|r| SvidError::ExpiredRoot {
                subject: r.subject.clone(),
                not_after: written(i64::try_from(r.not_after).unwrap_or(i64::MAX)),
            })
    }
}

impl fmt::Debug for Roots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Roots")
            .field("roots", &self.0.roots.len())
            .field("earliest_expiry", &self.0.earliest)
            .finish_non_exhaustive()
    }
}

/// Whether `result` is the error of a chain that leads to no root.
fn no_path(result: &Result<(), rustls::Error>) -> bool {
    matches!(
        result,
        Err(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer
        ))
    )
}

/// webpki's refusals of a chain whose certificates play the wrong part, as
/// the SVID checks' own errors: rustls would write them as webpki's
/// `Debug` (`Other(OtherError(CaUsedAsEndEntity))`).
fn in_words(e: rustls::Error) -> rustls::Error {
    match &e {
        rustls::Error::InvalidCertificate(CertificateError::Other(other)) => {
            as_svid_error(other).map_or(e, svid_error)
        }
        _ => e,
    }
}

/// The SVID check's error a webpki refusal amounts to, if it is one of
/// those of a certificate playing the wrong part.
fn as_svid_error(other: &OtherError) -> Option<SvidError> {
    match other.0.downcast_ref::<webpki::Error>()? {
        webpki::Error::CaUsedAsEndEntity => Some(SvidError::CaAsLeaf),
        webpki::Error::EndEntityUsedAsCa => Some(SvidError::LeafAsCa),
        _ => None,
    }
}

fn svid_error(e: SvidError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// Which server identities a client accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExpectedServer {
    /// Exactly this SPIFFE ID (an outbound route, the control plane).
    Exact(SpiffeId),
    /// Any ID in this trust domain.
    AnyIn(TrustDomain),
}

/// Writes, inside an `impl` of rustls' `ServerCertVerifier` or
/// `ClientCertVerifier`, the three methods that check a handshake's
/// signature (`verify_tls12_signature`, `verify_tls13_signature`,
/// `supported_verify_schemes`) as passed on to the verifier `self.$field`,
/// for a verifier that only changes how a certificate is judged. The
/// callers' crates depend on `rustls`.
///
/// ```ignore
/// impl ClientCertVerifier for Callers {
///     // ...
///     trellis_core::delegate_signature_checks!(verifier);
/// }
/// ```
#[macro_export]
macro_rules! delegate_signature_checks {
    ($field:tt) => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &::rustls::pki_types::CertificateDer<'_>,
            dss: &::rustls::DigitallySignedStruct,
        ) -> Result<::rustls::client::danger::HandshakeSignatureValid, ::rustls::Error> {
            self.$field.verify_tls12_signature(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &::rustls::pki_types::CertificateDer<'_>,
            dss: &::rustls::DigitallySignedStruct,
        ) -> Result<::rustls::client::danger::HandshakeSignatureValid, ::rustls::Error> {
            self.$field.verify_tls13_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<::rustls::SignatureScheme> {
            self.$field.supported_verify_schemes()
        }
    };
}

/// A client-side verifier: the server's chain must lead to the bundle and its
/// SPIFFE ID must be the expected one. The TLS server name is ignored.
pub struct SpiffeServerVerifier {
    roots: Roots,
    expected: ExpectedServer,
    provider: Arc<CryptoProvider>,
}

impl SpiffeServerVerifier {
    pub fn new(roots: Roots, expected: ExpectedServer) -> Self {
        Self {
            roots,
            expected,
            provider: provider(),
        }
    }

    /// A resumed session's chain (leaf first, as the session brought it
    /// back), which no verifier sees on resumption, verified again at
    /// `now` once a root of the bundle or an intermediate of the chain has
    /// expired: the root it was verified against may be the one, and a
    /// leaf can outlive its intermediate. Until then nothing of the
    /// chain's trust can have changed (the leaf's own dates are for the
    /// caller to check), and for a chain of a leaf alone this is one
    /// comparison.
    pub fn verify_resumed(
        &self,
        chain: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        let Some((leaf, intermediates)) = self.roots.to_verify_again(chain, now)? else {
            return Ok(());
        };
        let name = ServerName::try_from("resumed.trellis").expect("a valid DNS name");
        self.verify_server_cert(leaf, intermediates, &name, &[], now)
            .map(|_| ())
    }
}

impl fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeServerVerifier")
            .field("expected", &self.expected)
            .finish_non_exhaustive()
    }
}

impl SpiffeServerVerifier {
    /// [`ServerCertVerifier::verify_server_cert`], before what a refused
    /// certificate claims is noted.
    fn check_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        let verify = |roots: Arc<RootCertStore>| {
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &parsed,
                &roots,
                intermediates,
                now,
                self.provider.signature_verification_algorithms.all,
            )
        };
        let verified = verify(self.roots.at(now).map_err(svid_error)?);
        if no_path(&verified)
            && let Some(expired) = self.roots.expired_anchor(now, |r| verify(r).is_ok())
        {
            return Err(svid_error(expired));
        }
        verified.map_err(in_words)?;
        let found = leaf_spiffe_id(end_entity).map_err(svid_error)?;
        match &self.expected {
            ExpectedServer::Exact(expected) if &found != expected => {
                Err(svid_error(SvidError::UnexpectedId {
                    found,
                    expected: expected.clone(),
                }))
            }
            ExpectedServer::AnyIn(td) if !found.is_member_of(td) => {
                Err(svid_error(SvidError::ForeignTrustDomain {
                    found,
                    expected: td.clone(),
                }))
            }
            _ => Ok(ServerCertVerified::assertion()),
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    /// A refused certificate's claims are noted for the refusal's line
    /// ([`noting_refused`]), as the client verifier's are.
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let checked = self.check_server_cert(end_entity, intermediates, now);
        if let Err(e) = &checked {
            claimed::note_refused(end_entity, e);
        }
        checked
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Configs built here offer TLS 1.3 only; a 1.2 signature is never valid.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A server-side verifier: a client certificate must chain to the bundle and
/// carry a SPIFFE ID in the trust domain. With `mandatory` false a client may
/// connect without a certificate (the control plane's Certify with a token);
/// one that presents a certificate is still fully verified.
pub struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    roots: Roots,
    mandatory: bool,
    /// The verifier of the roots not expired, once some have, with the
    /// store it was built from.
    unexpired: Mutex<Option<UnexpiredVerifier>>,
    trust_domain: TrustDomain,
}

impl SpiffeClientVerifier {
    pub fn new(
        roots: Roots,
        trust_domain: TrustDomain,
        mandatory: bool,
    ) -> Result<Self, rustls::Error> {
        Ok(Self {
            inner: webpki_client_verifier(roots.store().clone(), mandatory)?,
            roots,
            mandatory,
            unexpired: Mutex::new(None),
            trust_domain,
        })
    }

    /// As [`SpiffeServerVerifier::verify_resumed`], for a caller's chain.
    pub fn verify_resumed(
        &self,
        chain: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        let Some((leaf, intermediates)) = self.roots.to_verify_again(chain, now)? else {
            return Ok(());
        };
        self.verify_client_cert(leaf, intermediates, now)
            .map(|_| ())
    }

    /// The webpki verifier of the roots that anchor chains at `now`.
    fn verifier_at(&self, now: UnixTime) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
        let store = self.roots.at(now).map_err(svid_error)?;
        if Arc::ptr_eq(&store, self.roots.store()) {
            return Ok(self.inner.clone());
        }
        let mut cached = self.unexpired.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((built_from, verifier)) = &*cached
            && Arc::ptr_eq(built_from, &store)
        {
            return Ok(verifier.clone());
        }
        let verifier = webpki_client_verifier(store.clone(), self.mandatory)?;
        *cached = Some((store, verifier.clone()));
        Ok(verifier)
    }
}

/// A webpki client verifier and the store of unexpired roots it holds.
type UnexpiredVerifier = (Arc<RootCertStore>, Arc<dyn ClientCertVerifier>);

fn webpki_client_verifier(
    roots: Arc<RootCertStore>,
    mandatory: bool,
) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
    let builder = WebPkiClientVerifier::builder_with_provider(roots, provider());
    let builder = if mandatory {
        builder
    } else {
        builder.allow_unauthenticated()
    };
    builder
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))
}

impl fmt::Debug for SpiffeClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeClientVerifier")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self.check_client_cert(end_entity, intermediates, now) {
            Ok(_) => Ok(ClientCertVerified::assertion()),
            Err(e) => {
                claimed::note_refused(end_entity, &e);
                Err(e)
            }
        }
    }

    crate::delegate_signature_checks!(inner);
}

impl SpiffeClientVerifier {
    /// [`ClientCertVerifier::verify_client_cert`], without noting what a
    /// refused certificate claims; an accepted one's SPIFFE ID and
    /// notBefore (Unix seconds), read in one parse.
    fn check_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(SpiffeId, i64), rustls::Error> {
        let verified = self
            .verifier_at(now)?
            .verify_client_cert(end_entity, intermediates, now)
            .map(|_| ());
        if no_path(&verified)
            && let Some(expired) = self.roots.expired_anchor(now, |roots| {
                webpki_client_verifier(roots, true)
                    .is_ok_and(|v| v.verify_client_cert(end_entity, intermediates, now).is_ok())
            })
        {
            return Err(svid_error(expired));
        }
        verified.map_err(in_words)?;
        let parsed = parse(end_entity).map_err(svid_error)?;
        let found = leaf_id_in(&parsed).map_err(svid_error)?;
        if !found.is_member_of(&self.trust_domain) {
            return Err(svid_error(SvidError::ForeignTrustDomain {
                found,
                expected: self.trust_domain.clone(),
            }));
        }
        Ok((found, period(&parsed).0))
    }

    /// [`ClientCertVerifier::verify_client_cert`], refusing besides a
    /// certificate that a revocation of `revocations` covers, as
    /// [`Revocations::check_issued`] does, with
    /// [`CertificateError::Revoked`]: rustls answers it with the alert
    /// `certificate_revoked`, which tells the caller why. Within
    /// [`noting_refused`] the revocation is noted ([`Claimed::revoked`]).
    /// With nothing revoked this costs one comparison more.
    pub fn verify_unrevoked_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        revocations: &Revocations,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let (found, not_before) = match self.check_client_cert(end_entity, intermediates, now) {
            Ok(found) => found,
            Err(e) => {
                claimed::note_refused(end_entity, &e);
                return Err(e);
            }
        };
        if let Err(revoked) = revocations.check_issued(&found, not_before) {
            claimed::note_revoked(end_entity, revoked);
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(ClientCertVerified::assertion())
    }
}

/// A TLS error, or an I/O error carrying one, as people read it. rustls
/// writes what a verifier of ours refused with `Debug`
/// (`invalid peer certificate: Other(OtherError(UnexpectedId { .. }))`);
/// this writes the SVID check's own message instead (`invalid peer
/// certificate: peer presented spiffe://.., expected spiffe://..`), and a
/// client that speaks only TLS 1.2 or older as such, where rustls names
/// the TLS 1.3 extension it lacks. Any other error is its usual text.
pub struct Described<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for Described<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(rustls::Error::InvalidCertificate(CertificateError::Other(other))) =
            rustls_error(self.0)
        {
            if let Some(svid) = other.0.downcast_ref::<SvidError>() {
                return write!(f, "invalid peer certificate: {svid}");
            }
            if let Some(svid) = as_svid_error(other) {
                return write!(f, "invalid peer certificate: {svid}");
            }
        }
        // rustls names the TLS 1.3 extension a TLS 1.2 client lacks.
        if let Some(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::SupportedVersionsExtensionRequired,
        )) = rustls_error(self.0)
        {
            return f.write_str(
                "the client offers only TLS 1.2 or older (no supported_versions extension); \
                 Trellis speaks TLS 1.3 only",
            );
        }
        fmt::Display::fmt(self.0, f)
    }
}

/// The rustls error `e` is, or carries as an I/O error's inner error (as
/// tokio-rustls and hyper-util report a failed handshake).
pub fn rustls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    e.downcast_ref::<rustls::Error>().or_else(|| {
        e.downcast_ref::<std::io::Error>()?
            .get_ref()?
            .downcast_ref::<rustls::Error>()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    #[test]
    fn a_refused_svid_reads_as_the_check_that_refused_it() {
        let refused = svid_error(SvidError::UnexpectedId {
            found: id("spiffe://td/ns/b/sa/impostor"),
            expected: id("spiffe://td/ns/b/sa/api"),
        });
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, refused.clone());
        let words = "invalid peer certificate: peer presented spiffe://td/ns/b/sa/impostor, \
                     expected spiffe://td/ns/b/sa/api";
        assert_eq!(Described(&refused).to_string(), words);
        assert_eq!(Described(&io).to_string(), words);
        assert!(
            refused.to_string().contains("OtherError"),
            "rustls' own text"
        );

        let other = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        assert_eq!(Described(&other).to_string(), other.to_string());
    }
}
