//! Validation of a certificate signing request before anything is signed.
//!
//! A CSR is acceptable when it parses completely, its signature verifies with
//! its own key, the key is ECDSA P-256, and it names exactly one SAN: a URI
//! that is a valid SPIFFE ID of our trust domain, outside the reserved
//! `/trellis/` path. Validation is pure: it never touches state.

use trellis_core::grpc::CertifyRefusal;
use trellis_core::spiffe::InvalidSpiffeId;
use trellis_core::{SpiffeId, TrustDomain};
use x509_parser::asn1_rs::Tag;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
use x509_parser::prelude::FromDer;

/// The path prefix of the control plane's own identities; never issued to a
/// workload.
pub const RESERVED_PATH: &str = "/trellis/";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("csr is not a valid DER PKCS#10 request: {0}")]
    Malformed(String),
    #[error("csr signature does not verify with the key it carries")]
    BadSignature,
    #[error("csr key must be ECDSA P-256, found {0}")]
    KeyType(String),
    #[error("csr must have exactly one SAN (a URI SAN holding the SPIFFE ID); it has {0}")]
    SanCount(usize),
    #[error("csr SAN must be a URI holding the SPIFFE ID; found a {0} SAN")]
    NotUri(&'static str),
    #[error("csr URI SAN is not a valid SPIFFE ID: {0}")]
    InvalidId(#[from] InvalidSpiffeId),
    #[error("csr SPIFFE ID {found} is outside trust domain {expected}")]
    ForeignTrustDomain {
        found: SpiffeId,
        expected: TrustDomain,
    },
    #[error("csr SPIFFE ID {0} is reserved for the control plane")]
    Reserved(SpiffeId),
    #[error(
        "csr SPIFFE ID {0} names the trust domain itself: a workload's ID has a path (spiffe://TD/ns/NS/sa/SA)"
    )]
    NoPath(SpiffeId),
}

impl CsrError {
    /// A short, bounded label for metrics.
    pub fn reason(&self) -> CertifyRefusal {
        match self {
            Self::Malformed(_) => CertifyRefusal::CsrMalformed,
            Self::BadSignature => CertifyRefusal::CsrBadSignature,
            Self::KeyType(_) => CertifyRefusal::CsrKeyType,
            Self::SanCount(_) | Self::NotUri(_) => CertifyRefusal::CsrSan,
            Self::InvalidId(_) | Self::NoPath(_) => CertifyRefusal::CsrInvalidId,
            Self::ForeignTrustDomain { .. } => CertifyRefusal::CsrForeignTrustDomain,
            Self::Reserved(_) => CertifyRefusal::CsrReservedId,
        }
    }
}

/// A CSR that passed every check: who it asks to be, and its public key.
#[derive(Debug, Clone)]
pub struct ValidCsr {
    pub spiffe_id: SpiffeId,
    /// DER SubjectPublicKeyInfo of the requester's key.
    pub public_key_der: Vec<u8>,
}

/// Whether `id` lies under the control plane's reserved path.
pub fn is_reserved(id: &SpiffeId) -> bool {
    id.path().starts_with(RESERVED_PATH)
}

pub fn validate(der: &[u8], trust_domain: &TrustDomain) -> Result<ValidCsr, CsrError> {
    // What a parser says of these two mistakes names neither.
    if der.is_empty() {
        return Err(CsrError::Malformed("the csr field is empty".to_owned()));
    }
    if der.trim_ascii_start().starts_with(b"-----BEGIN") {
        return Err(CsrError::Malformed(
            "it is PEM text; send the DER bytes (the base64 between the PEM lines, decoded)"
                .to_owned(),
        ));
    }
    // A DER request begins with a SEQUENCE (0x30); its base64 with "MI".
    if der.starts_with(b"MI")
        && der
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"+/=\r\n".contains(b))
    {
        return Err(CsrError::Malformed(
            "it is base64 text; send the DER bytes it encodes".to_owned(),
        ));
    }
    let (rest, csr) =
        X509CertificationRequest::from_der(der).map_err(|e| CsrError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        let (n, bytes) = (rest.len(), if rest.len() == 1 { "byte" } else { "bytes" });
        return Err(CsrError::Malformed(format!(
            "{n} trailing {bytes} after the request"
        )));
    }
    let spki = &csr.certification_request_info.subject_pki;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        // `as_oid` reads any tag's bytes as an OID's: a SEQUENCE of
        // explicit parameters would read as a curve of nonsense numbers.
        .filter(|p| p.tag() == Tag::Oid)
        .and_then(|p| p.as_oid().ok());
    let ec = spki.algorithm.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY;
    if !ec || curve != Some(OID_EC_P256) {
        let found = match (&curve, &spki.algorithm.parameters) {
            (Some(curve), _) if ec => {
                let curve = curve.to_id_string();
                format!("an EC key on curve {}", named(&curve, CURVES))
            }
            // RFC 5480 allows only a named curve; `-param_enc explicit`
            // writes the curve's numbers in its place.
            (None, Some(params)) if ec && params.tag() == Tag::Sequence => {
                "an EC key with explicit curve parameters, not the named curve P-256 \
                 (1.2.840.10045.3.1.7)"
                    .to_owned()
            }
            (None, _) if ec => "an EC key that names no curve".to_owned(),
            _ => {
                let algorithm = spki.algorithm.algorithm.to_id_string();
                format!("a key of algorithm {}", named(&algorithm, KEY_ALGORITHMS))
            }
        };
        return Err(CsrError::KeyType(found));
    }
    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;

    let mut names = Vec::new();
    if let Some(extensions) = csr.requested_extensions() {
        for ext in extensions {
            match ext {
                ParsedExtension::SubjectAlternativeName(san) => {
                    names.extend(san.general_names.iter().cloned());
                }
                ParsedExtension::ParseError { error } => {
                    return Err(CsrError::Malformed(format!(
                        "unparseable requested extension: {error}"
                    )));
                }
                _ => {}
            }
        }
    }
    let uri = match names.as_slice() {
        [GeneralName::URI(uri)] => *uri,
        [other] => return Err(CsrError::NotUri(general_name_kind(other))),
        other => return Err(CsrError::SanCount(other.len())),
    };
    let spiffe_id = SpiffeId::parse(uri)?;
    if !spiffe_id.is_member_of(trust_domain) {
        return Err(CsrError::ForeignTrustDomain {
            found: spiffe_id,
            expected: trust_domain.clone(),
        });
    }
    // The X509-SVID specification: a leaf's SPIFFE ID has a path; the
    // trust domain's own ID is the root CA's.
    if spiffe_id.path().is_empty() {
        return Err(CsrError::NoPath(spiffe_id));
    }
    if is_reserved(&spiffe_id) {
        return Err(CsrError::Reserved(spiffe_id));
    }
    Ok(ValidCsr {
        spiffe_id,
        public_key_der: spki.raw.to_vec(),
    })
}

/// The curves a CSR is likeliest to name in place of P-256, by OID.
const CURVES: &[(&str, &str)] = &[
    ("1.3.132.0.34", "P-384"),
    ("1.3.132.0.35", "P-521"),
    ("1.3.132.0.10", "secp256k1"),
];

/// The key algorithms a CSR is likeliest to carry in place of EC, by OID.
const KEY_ALGORITHMS: &[(&str, &str)] = &[
    ("1.2.840.113549.1.1.1", "RSA"),
    ("1.2.840.113549.1.1.10", "RSA-PSS"),
    ("1.3.101.112", "Ed25519"),
    ("1.3.101.113", "Ed448"),
    ("1.2.840.10040.4.1", "DSA"),
];

/// `oid` by its name in `names`, with the OID; the OID alone if unnamed.
fn named(oid: &str, names: &[(&str, &str)]) -> String {
    match names.iter().find(|(known, _)| *known == oid) {
        Some((_, name)) => format!("{name} ({oid})"),
        None => oid.to_owned(),
    }
}

fn general_name_kind(name: &GeneralName<'_>) -> &'static str {
    match name {
        GeneralName::DNSName(_) => "DNS",
        GeneralName::IPAddress(_) => "IP address",
        GeneralName::RFC822Name(_) => "email",
        GeneralName::DirectoryName(_) => "directory name",
        GeneralName::URI(_) => "URI",
        _ => "non-URI",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, SanType};

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    fn csr(sans: Vec<SanType>, key: &KeyPair) -> Vec<u8> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.serialize_request(key).unwrap().der().to_vec()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    fn p256() -> KeyPair {
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
    }

    #[test]
    fn accepts_one_spiffe_uri() {
        let der = csr(vec![uri("spiffe://cluster.local/ns/a/sa/b")], &p256());
        let valid = validate(&der, &td()).unwrap();
        assert_eq!(valid.spiffe_id.as_str(), "spiffe://cluster.local/ns/a/sa/b");
    }

    #[test]
    fn rejects_bad_requests() {
        let key = p256();
        let two = csr(
            vec![
                uri("spiffe://cluster.local/ns/a/sa/b"),
                uri("spiffe://cluster.local/ns/a/sa/c"),
            ],
            &key,
        );
        assert_eq!(validate(&two, &td()).unwrap_err(), CsrError::SanCount(2));
        let dns = csr(vec![SanType::DnsName("web".try_into().unwrap())], &key);
        assert_eq!(validate(&dns, &td()).unwrap_err(), CsrError::NotUri("DNS"));
        let none = csr(vec![], &key);
        assert_eq!(validate(&none, &td()).unwrap_err(), CsrError::SanCount(0));
        let foreign = csr(vec![uri("spiffe://other.org/ns/a/sa/b")], &key);
        assert!(matches!(
            validate(&foreign, &td()),
            Err(CsrError::ForeignTrustDomain { .. })
        ));
        let root = csr(vec![uri("spiffe://cluster.local")], &key);
        assert!(matches!(validate(&root, &td()), Err(CsrError::NoPath(_))));
        let reserved = csr(vec![uri("spiffe://cluster.local/trellis/admin")], &key);
        assert!(matches!(
            validate(&reserved, &td()),
            Err(CsrError::Reserved(_))
        ));
        assert!(matches!(
            validate(b"not a csr", &td()),
            Err(CsrError::Malformed(_))
        ));
        let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let wrong_curve = csr(vec![uri("spiffe://cluster.local/ns/a/sa/b")], &p384);
        assert!(matches!(
            validate(&wrong_curve, &td()),
            Err(CsrError::KeyType(_))
        ));
    }

    /// The last byte of an ECDSA signature is the last of its `s`: the
    /// request still parses, and only the signature is wrong.
    #[test]
    fn rejects_a_tampered_signature() {
        let mut der = csr(vec![uri("spiffe://cluster.local/ns/a/sa/b")], &p256());
        let last = der.len() - 1;
        der[last] ^= 0x01;
        let refused = validate(&der, &td()).unwrap_err();
        assert_eq!(refused, CsrError::BadSignature);
        assert_eq!(
            refused.to_string(),
            "csr signature does not verify with the key it carries"
        );
    }

    /// Each key a caller may send in place of a P-256 one is refused in
    /// words naming it, with its OID.
    #[test]
    fn a_refused_key_is_named() {
        let id = "spiffe://cluster.local/ns/a/sa/b";
        let generated = |alg| csr(vec![uri(id)], &KeyPair::generate_for(alg).unwrap());
        // The P-256 curve's OID, as a SEQUENCE of the same length in its
        // place: how `openssl ecparam -param_enc explicit` writes a key.
        let mut explicit = csr(vec![uri(id)], &p256());
        let named = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
        let at = explicit
            .windows(named.len())
            .position(|w| w == named)
            .expect("the P-256 OID in the request");
        explicit[at..at + named.len()]
            .copy_from_slice(&[0x30, 0x08, 0x02, 0x01, 0x01, 0x30, 0x03, 0x02, 0x01, 0x01]);
        let cases = [
            (
                generated(&rcgen::PKCS_ED25519),
                "csr key must be ECDSA P-256, found a key of algorithm Ed25519 (1.3.101.112)",
            ),
            (
                generated(&rcgen::PKCS_ECDSA_P521_SHA512),
                "csr key must be ECDSA P-256, found an EC key on curve P-521 (1.3.132.0.35)",
            ),
            (
                generated(&rcgen::PKCS_ECDSA_P384_SHA384),
                "csr key must be ECDSA P-256, found an EC key on curve P-384 (1.3.132.0.34)",
            ),
            (
                explicit,
                "csr key must be ECDSA P-256, found an EC key with explicit curve parameters, \
                 not the named curve P-256 (1.2.840.10045.3.1.7)",
            ),
        ];
        for (der, words) in cases {
            let refused = validate(&der, &td()).unwrap_err();
            assert!(matches!(refused, CsrError::KeyType(_)), "{refused:?}");
            assert_eq!(refused.to_string(), words);
        }
    }

    /// What is not one DER request is refused saying what it is: the
    /// bytes past its end counted, PEM or base64 text named as such.
    #[test]
    fn a_request_that_is_not_der_alone_says_what_it_is() {
        use base64::Engine;
        let der = csr(vec![uri("spiffe://cluster.local/ns/a/sa/b")], &p256());
        let base64 = base64::engine::general_purpose::STANDARD.encode(&der);
        let cases = [
            (
                [der.as_slice(), b"\n"].concat(),
                "1 trailing byte after the request",
            ),
            (
                [der.as_slice(), b"junk"].concat(),
                "4 trailing bytes after the request",
            ),
            (
                base64.clone().into_bytes(),
                "it is base64 text; send the DER bytes it encodes",
            ),
            (
                format!("{base64}\n").into_bytes(),
                "it is base64 text; send the DER bytes it encodes",
            ),
            (Vec::new(), "the csr field is empty"),
        ];
        for (bytes, words) in cases {
            assert_eq!(
                validate(&bytes, &td()).unwrap_err().to_string(),
                format!("csr is not a valid DER PKCS#10 request: {words}")
            );
        }
    }
}
