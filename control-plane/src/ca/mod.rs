//! The certificate authority: the signing key and certificate (a root we
//! generate, or an operator's root or intermediate), the trust bundle (the
//! signing CA's root, then the operator's trust anchors), and the signing of
//! X.509-SVIDs.
//!
//! Every leaf follows the SPIFFE X509-SVID specification: one URI SAN, not a
//! CA, key usage digitalSignature, EKU serverAuth + clientAuth, a random
//! serial, backdated a little against clock skew. This module signs what it
//! is given; it never decides who may have which identity (that is `authn`
//! and `api::identity`) and never logs key material.

pub mod anchors;
pub mod csr;
pub mod files;
pub mod secret;

use std::net::IpAddr;
use std::time::Duration;

use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber, SubjectPublicKeyInfo,
};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use trellis_core::{SpiffeId, TrustDomain};

pub use anchors::{TrustAnchorsError, load_trust_anchors};
pub use csr::{CsrError, ValidCsr};
pub use files::{AdminCredential, CaFilesError};

// How far notBefore is set into the past, and the issue time read back
// from it: one rule for the CA and the sidecars checking revocations.
pub use trellis_core::revocation::{BACKDATE, issued_at};

/// Lifetime of a root the control plane generates.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("signing failed: {0}")]
    Sign(#[from] rcgen::Error),
    #[error("invalid SAN {0:?}")]
    San(String),
    #[error(
        "a lifetime of {} ends past the latest date a certificate can hold",
        trellis_core::duration::Words(*.0)
    )]
    Lifetime(Duration),
    #[error(
        "the signing CA's chain expired at {0} (its first certificate to expire): nothing it \
         signs would verify; rotate the CA (docs/ARCHITECTURE.md, Rotating the root)"
    )]
    ChainExpired(OffsetDateTime),
}

/// A freshly signed certificate and the facts recorded about it.
#[derive(Clone, Debug)]
pub struct Issued {
    /// Leaf first, then the intermediates up to (not including) the root.
    pub chain: Vec<CertificateDer<'static>>,
    pub serial_hex: String,
    /// When it was signed: notBefore is earlier, backdated against clock
    /// skew, and its life as its holder counts it starts here.
    pub issued_at_unix: i64,
    pub not_before_unix: i64,
    pub not_after_unix: i64,
}

/// The signing CA of the trust domain.
pub struct CertificateAuthority {
    trust_domain: TrustDomain,
    issuer: Issuer<'static, KeyPair>,
    /// Certificates between a leaf and the root: the signing CA when it is an
    /// intermediate, then its parents; empty when we sign with the root.
    intermediates: Vec<CertificateDer<'static>>,
    /// The root of the signing CA first, then the trust anchors, each once.
    bundle: Vec<CertificateDer<'static>>,
    /// When the first certificate from the signing CA up to its root
    /// expires: no leaf outlives it, and none is signed after it.
    signs_until: OffsetDateTime,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

/// What to put into a certificate beside the SPIFFE ID.
#[derive(Clone, Debug, Default)]
pub struct ExtraSans {
    pub dns_names: Vec<String>,
    pub ips: Vec<IpAddr>,
}

impl CertificateAuthority {
    /// Generates a self-signed ECDSA P-256 root for `trust_domain`, named
    /// `O=Trellis, CN=Trellis root CA <trust domain> <key id>` (see
    /// [`root_key_id`]). Returns the CA and the PEM of its certificate and
    /// key.
    pub fn generate(trust_domain: &TrustDomain) -> Result<(Self, String, String), CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::OrganizationName, "Trellis");
        name.push(
            DnType::CommonName,
            format!("Trellis root CA {trust_domain} {}", root_key_id(&key)),
        );
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = now_seconds();
        params.not_before = now - BACKDATE;
        params.not_after = now + ROOT_LIFETIME;
        params.serial_number = Some(random_serial());
        params.subject_alt_names = vec![SanType::URI(
            trust_domain
                .id_string()
                .try_into()
                .map_err(|_| CaError::San(trust_domain.id_string()))?,
        )];
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        let key_pem = key.serialize_pem();
        let der = cert.der().clone();
        let signs_until = params.not_after;
        let issuer = Issuer::new(params, key);
        Ok((
            Self {
                trust_domain: trust_domain.clone(),
                issuer,
                intermediates: Vec::new(),
                bundle: vec![der],
                signs_until,
            },
            cert_pem,
            key_pem,
        ))
    }

    /// A CA from already validated parts (see [`files`]); `signs_until`
    /// is when the first of the chain's certificates expires.
    fn from_parts(
        trust_domain: &TrustDomain,
        issuer: Issuer<'static, KeyPair>,
        intermediates: Vec<CertificateDer<'static>>,
        root: CertificateDer<'static>,
        signs_until: OffsetDateTime,
    ) -> Self {
        Self {
            trust_domain: trust_domain.clone(),
            issuer,
            intermediates,
            bundle: vec![root],
            signs_until,
        }
    }

    /// When the first certificate from the signing CA up to its root
    /// expires: the latest any leaf it signs is valid until.
    pub fn signs_until(&self) -> OffsetDateTime {
        self.signs_until
    }

    /// This CA as if its chain ended at `at` (tests of what follows from
    /// a chain that ends soon).
    #[cfg(test)]
    pub(crate) fn ending_at(mut self, at: OffsetDateTime) -> Self {
        self.signs_until = at;
        self
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// Adds `anchors` to the trust bundle after the signing CA's root,
    /// leaving out any already in it (the signing root itself, a root
    /// listed twice).
    pub fn with_trust_anchors(mut self, anchors: &[CertificateDer<'static>]) -> Self {
        for anchor in anchors {
            if !self.bundle.contains(anchor) {
                self.bundle.push(anchor.clone());
            }
        }
        self
    }

    /// The DER roots of the trust domain: the signing CA's root first, then
    /// the trust anchors. Everything that verifies a mesh certificate or
    /// hands roots to sidecars takes all of them.
    pub fn bundle(&self) -> &[CertificateDer<'static>] {
        &self.bundle
    }

    /// The certificate whose key signs leaves.
    pub fn signing_cert(&self) -> &CertificateDer<'static> {
        self.intermediates.first().unwrap_or(&self.bundle[0])
    }

    /// The trust bundle as PEM, as written to `bundle.pem`.
    pub fn bundle_pem(&self) -> String {
        self.bundle.iter().map(|c| der_to_pem(c)).collect()
    }

    /// Signs a validated CSR for its SPIFFE ID with lifetime `ttl`.
    pub fn sign_csr(&self, csr: &ValidCsr, ttl: Duration) -> Result<Issued, CaError> {
        let public_key = SubjectPublicKeyInfo::from_der(&csr.public_key_der)?;
        self.sign(&csr.spiffe_id, &ExtraSans::default(), ttl, &public_key)
    }

    /// Makes a key pair and an SVID for it (the control plane's own serving
    /// certificate, the operator credential).
    pub fn issue_with_key(
        &self,
        id: &SpiffeId,
        extra: &ExtraSans,
        ttl: Duration,
    ) -> Result<(Issued, KeyPair), CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let issued = self.sign(id, extra, ttl, &key)?;
        Ok((issued, key))
    }

    fn sign(
        &self,
        id: &SpiffeId,
        extra: &ExtraSans,
        ttl: Duration,
        public_key: &impl rcgen::PublicKeyData,
    ) -> Result<Issued, CaError> {
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::OrganizationName, "Trellis");
        params.distinguished_name = name;
        let mut sans = vec![SanType::URI(
            id.as_str()
                .try_into()
                .map_err(|_| CaError::San(id.to_string()))?,
        )];
        for dns in &extra.dns_names {
            sans.push(SanType::DnsName(
                dns.as_str()
                    .try_into()
                    .map_err(|_| CaError::San(dns.clone()))?,
            ));
        }
        sans.extend(extra.ips.iter().copied().map(SanType::IpAddress));
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let serial = random_serial();
        let serial_hex = hex::encode(serial.as_ref());
        params.serial_number = Some(serial);
        let now = now_seconds();
        if now >= self.signs_until {
            return Err(CaError::ChainExpired(self.signs_until));
        }
        params.not_before = now - BACKDATE;
        // X.509 times end with the year 9999; configuration bounds the
        // lifetime far below that, this keeps a mistake from panicking.
        // A leaf never outlives its chain: peers would refuse it from the
        // moment an intermediate expires.
        params.not_after = time::Duration::try_from(ttl)
            .ok()
            .and_then(|ttl| now.checked_add(ttl))
            .filter(|at| at.year() <= 9999)
            .ok_or(CaError::Lifetime(ttl))?
            .min(self.signs_until);
        let cert = params.signed_by(public_key, &self.issuer)?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.intermediates.iter().cloned());
        Ok(Issued {
            chain,
            serial_hex,
            issued_at_unix: now.unix_timestamp(),
            not_before_unix: params.not_before.unix_timestamp(),
            not_after_unix: params.not_after.unix_timestamp(),
        })
    }
}

/// The first 8 hex digits of the SHA-256 of `key`'s SubjectPublicKeyInfo:
/// what sets a generated root's name apart from every other root of its
/// trust domain (another mesh's, the root it is rotated in beside). A
/// verifier picks the root that signed a chain by its subject; under one
/// name for all, a certificate of another mesh's root would be refused as
/// of a bad signature rather than of an unknown issuer.
pub fn root_key_id(key: &impl rcgen::PublicKeyData) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(key.subject_public_key_info());
    hex::encode(&digest[..4])
}

/// Now, truncated to whole seconds as X.509 times are.
fn now_seconds() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(0).unwrap_or(now)
}

/// 16 random bytes, positive and of fixed length (RFC 5280 allows 20).
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

pub fn der_to_pem(der: &CertificateDer<'_>) -> String {
    pem_block("CERTIFICATE", der.as_ref())
}

pub fn pem_block(label: &str, der: &[u8]) -> String {
    use std::fmt::Write;
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len() * 4 / 3 + 4);
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        let _ = writeln!(out, "{}", std::str::from_utf8(line).unwrap_or_default());
    }
    let _ = writeln!(out, "-----END {label}-----");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::*;

    /// A leaf never outlives the signing chain, and once the chain has
    /// expired nothing is signed: the error names when it expired.
    #[test]
    fn nothing_is_signed_past_the_chain() {
        let td = TrustDomain::new("cluster.local").unwrap();
        let (mut ca, _, _) = CertificateAuthority::generate(&td).unwrap();
        let id = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap();
        let ends = now_seconds() + ::time::Duration::minutes(10);
        ca = ca.ending_at(ends);
        let (issued, _) = ca
            .issue_with_key(&id, &ExtraSans::default(), Duration::from_secs(3600))
            .unwrap();
        assert_eq!(issued.not_after_unix, ends.unix_timestamp());

        let ended = now_seconds() - ::time::Duration::minutes(1);
        ca = ca.ending_at(ended);
        let e = ca
            .issue_with_key(&id, &ExtraSans::default(), Duration::from_secs(3600))
            .unwrap_err();
        assert!(matches!(e, CaError::ChainExpired(at) if at == ended), "{e}");
        assert!(e.to_string().contains("chain expired"), "{e}");
    }

    /// Two roots generated for one trust domain (two meshes', or a new
    /// root rotated in beside the old) never share a subject: each ends
    /// with the id of its own key, as `openssl x509 -subject` shows it.
    #[test]
    fn each_generated_root_is_named_apart_by_its_key() {
        use sha2::{Digest, Sha256};
        let td = TrustDomain::new("cluster.local").unwrap();
        let subject = || {
            let (ca, cert_pem, _) = CertificateAuthority::generate(&td).unwrap();
            let (_, pem) = parse_x509_pem(cert_pem.as_bytes()).unwrap();
            assert_eq!(pem.contents, ca.bundle()[0].as_ref());
            let (_, cert) = parse_x509_certificate(&pem.contents).unwrap();
            let key_id = hex::encode(&Sha256::digest(cert.public_key().raw)[..4]);
            let subject = cert.subject().to_string();
            assert_eq!(
                subject,
                format!("O=Trellis, CN=Trellis root CA cluster.local {key_id}")
            );
            subject
        };
        assert_ne!(subject(), subject());
    }

    #[test]
    fn signs_leaves_per_the_x509_svid_spec() {
        let td = TrustDomain::new("cluster.local").unwrap();
        let (ca, _, _) = CertificateAuthority::generate(&td).unwrap();
        let id = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap();
        let (issued, _key) = ca
            .issue_with_key(&id, &ExtraSans::default(), Duration::from_secs(600))
            .unwrap();
        let (_, cert) = parse_x509_certificate(&issued.chain[0]).unwrap();
        assert!(!cert.is_ca());
        let bc = cert.basic_constraints().unwrap().unwrap();
        assert!(!bc.value.ca);
        let ku = cert.key_usage().unwrap().unwrap();
        assert!(ku.critical && ku.value.digital_signature() && !ku.value.key_cert_sign());
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert_eq!(
            issued.not_after_unix - issued.not_before_unix,
            600 + BACKDATE.as_secs() as i64
        );
        assert_eq!(issued.not_after_unix - issued.issued_at_unix, 600);
        let (_, root) = parse_x509_certificate(&ca.bundle()[0]).unwrap();
        cert.verify_signature(Some(root.public_key())).unwrap();
        assert!(ca.bundle_pem().starts_with("-----BEGIN CERTIFICATE-----\n"));
    }

    #[test]
    fn a_lifetime_past_what_x509_can_hold_is_an_error_not_a_panic() {
        let td = TrustDomain::new("cluster.local").unwrap();
        let (ca, _, _) = CertificateAuthority::generate(&td).unwrap();
        let id = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap();
        for ttl in [
            Duration::from_secs(10_000 * 365 * 24 * 3600),
            Duration::from_secs(u64::MAX),
        ] {
            let err = ca
                .issue_with_key(&id, &ExtraSans::default(), ttl)
                .map(drop)
                .unwrap_err();
            assert!(matches!(err, CaError::Lifetime(t) if t == ttl), "{err}");
        }
    }

    #[test]
    fn pem_matches_the_standard_encoding() {
        assert_eq!(
            pem_block("X", b"foobar!"),
            "-----BEGIN X-----\nZm9vYmFyIQ==\n-----END X-----\n"
        );
    }
}
