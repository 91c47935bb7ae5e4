//! The CA and the operator credential on disk: `ca.crt`, `ca.key`,
//! `bundle.pem`, `admin.crt`, `admin.key` in the state dir, or an operator's
//! `--ca-cert` / `--ca-key`.
//!
//! Loading never overwrites: a file that does not parse, a key that does not
//! match its certificate, or a key without its certificate is an error naming
//! the file, and the file stays byte-identical. Only missing files are
//! generated. Operator-supplied CA files are read each start and never copied
//! into the state dir.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{Issuer, KeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use trellis_core::SpiffeId;
use trellis_core::io_error::IoWords;
use x509_parser::prelude::*;

use super::{CaError, CertificateAuthority, ExtraSans, der_to_pem};
use crate::escape::{escape_controls, shown};
use crate::state_dir::{Secrecy, StateDir, StateDirError};

pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const BUNDLE: &str = "bundle.pem";
pub const ADMIN_CERT: &str = "admin.crt";
pub const ADMIN_KEY: &str = "admin.key";

/// Lifetime of the operator credential.
pub const ADMIN_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum CaFilesError {
    #[error(transparent)]
    StateDir(#[from] StateDirError),
    #[error("cannot read {}: {}", shown(path), IoWords(source))]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not usable: {reason}", shown(path))]
    Invalid { path: PathBuf, reason: String },
    #[error("{} does not match the certificate in {}", shown(key), shown(cert))]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error(
        "{} exists but {} does not; refusing to overwrite, restore or remove it",
        shown(present),
        shown(missing)
    )]
    Incomplete { present: PathBuf, missing: PathBuf },
    #[error(
        "the state dir already holds a generated CA ({}); to sign with --ca-cert/--ca-key, \
         move ca.crt and ca.key out of the state dir (they can be given as --ca-cert/--ca-key, or \
         ca.crt as --trust-anchors), or drop --ca-cert/--ca-key",
        shown(path)
    )]
    ConflictingCa { path: PathBuf },
    #[error(transparent)]
    Ca(#[from] CaError),
}

fn invalid(path: &Path, reason: impl ToString) -> CaFilesError {
    CaFilesError::Invalid {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// Loads the CA (from the operator's files, or the state dir, generating a
/// root on first start), adds the trust anchors to its bundle and writes
/// `bundle.pem` if it changed.
pub fn open_ca(
    dir: &StateDir,
    trust_domain: &trellis_core::TrustDomain,
    operator: Option<(&Path, &Path)>,
    anchors: &[CertificateDer<'static>],
) -> Result<CertificateAuthority, CaFilesError> {
    let ca = match operator {
        Some((cert, key)) => {
            if dir.read(CA_CERT)?.is_some() || dir.read(CA_KEY)?.is_some() {
                return Err(CaFilesError::ConflictingCa {
                    path: dir.path(CA_CERT),
                });
            }
            load_ca(trust_domain, &read(cert)?, cert, &read(key)?, key)?
        }
        None => match (dir.read(CA_CERT)?, dir.read_secret(CA_KEY)?) {
            (Some(cert), Some(key)) => load_ca(
                trust_domain,
                &cert,
                &dir.path(CA_CERT),
                &key,
                &dir.path(CA_KEY),
            )?,
            (None, None) => {
                let (ca, cert_pem, key_pem) = CertificateAuthority::generate(trust_domain)?;
                // Key first: a crash in between leaves a key without a
                // certificate, which the next start reports instead of
                // silently replacing.
                dir.write_atomic(CA_KEY, key_pem.as_bytes(), Secrecy::Secret)?;
                dir.write_atomic(CA_CERT, cert_pem.as_bytes(), Secrecy::Public)?;
                tracing::info!(cert = %shown(&dir.path(CA_CERT)), "generated a new root CA");
                ca
            }
            (Some(_), None) => {
                return Err(CaFilesError::Incomplete {
                    present: dir.path(CA_CERT),
                    missing: dir.path(CA_KEY),
                });
            }
            (None, Some(_)) => {
                return Err(CaFilesError::Incomplete {
                    present: dir.path(CA_KEY),
                    missing: dir.path(CA_CERT),
                });
            }
        },
    }
    .with_trust_anchors(anchors);
    dir.write_if_changed(BUNDLE, ca.bundle_pem().as_bytes(), Secrecy::Public)?;
    Ok(ca)
}

/// Checks `--ca-cert` and `--ca-key` as the start will load them (each
/// readable, a chain of CAs each signed by the next, ending at a root that
/// signed itself, valid now, and the key of its first certificate), so a
/// configuration error exits before the state dir is touched. The error
/// names the flag (as `names` does), its file and the certificate, never
/// the key.
pub fn check_operator_ca(
    trust_domain: &trellis_core::TrustDomain,
    cert: &Path,
    key: &Path,
    names: &dyn trellis_core::flags::FlagNames,
) -> Result<(), String> {
    let read = |flag: &str, path: &Path| {
        std::fs::read(path).map_err(|e| {
            let flag = names.name(flag);
            format!("{flag} {}: cannot read it: {}", shown(path), IoWords(&e))
        })
    };
    let (cert_pem, key_pem) = (read("ca-cert", cert)?, read("ca-key", key)?);
    let e = match load_ca(trust_domain, &cert_pem, cert, &key_pem, key) {
        Ok(_) => return Ok(()),
        Err(e) => e,
    };
    let flag = match &e {
        CaFilesError::KeyMismatch { .. } => "ca-key",
        CaFilesError::Invalid { path, .. } if path == key => "ca-key",
        _ => "ca-cert",
    };
    Err(format!("{} {e}", names.name(flag)))
}

fn read(path: &Path) -> Result<Vec<u8>, CaFilesError> {
    std::fs::read(path).map_err(|source| CaFilesError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn parse_key(bytes: &[u8], path: &Path) -> Result<KeyPair, CaFilesError> {
    let der = PrivateKeyDer::from_pem_slice(bytes)
        .map_err(|e| invalid(path, format!("no PEM private key: {e}")))?;
    KeyPair::try_from(&der).map_err(|e| invalid(path, format!("unusable private key: {e}")))
}

fn parse_certs(bytes: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, CaFilesError> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(path, format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(path, "no PEM certificate found"));
    }
    for cert in &certs {
        parse_x509_certificate(cert).map_err(|e| invalid(path, format!("bad certificate: {e}")))?;
    }
    Ok(certs)
}

fn key_matches(cert: &X509Certificate<'_>, key: &KeyPair) -> bool {
    cert.public_key().subject_public_key.data.as_ref() == key.public_key_raw()
}

/// Why `cert` cannot sign certificates, if it cannot: no basicConstraints
/// CA:TRUE, or a keyUsage without keyCertSign. Peers refuse what such a
/// certificate signs.
fn cannot_sign(cert: &X509Certificate<'_>) -> Option<&'static str> {
    if !cert.is_ca() {
        return Some("is not a CA (its basicConstraints do not say CA:TRUE)");
    }
    match cert.key_usage() {
        Ok(Some(usage)) if !usage.value.key_cert_sign() => {
            Some("may not sign certificates (its keyUsage lacks keyCertSign)")
        }
        Ok(_) => None,
        Err(_) => Some("has a keyUsage extension that cannot be read"),
    }
}

/// Why `signed`'s signature does not verify with `key`, in words.
fn bad_signature(
    signed: &X509Certificate<'_>,
    key: Option<&SubjectPublicKeyInfo<'_>>,
) -> Option<String> {
    match signed.verify_signature(key) {
        Ok(()) => None,
        Err(X509Error::SignatureVerificationError) => {
            Some("the signature does not verify with its key".to_string())
        }
        Err(X509Error::SignatureUnsupportedAlgorithm) => Some(format!(
            "its signature algorithm ({}) is not supported",
            signed.signature_algorithm.algorithm
        )),
        Err(e) => Some(e.to_string()),
    }
}

/// A name from a certificate as errors show it.
fn name_shown(name: &X509Name<'_>) -> String {
    escape_controls(&name.to_string())
}

pub(super) fn load_ca(
    trust_domain: &trellis_core::TrustDomain,
    cert_pem: &[u8],
    cert_path: &Path,
    key_pem: &[u8],
    key_path: &Path,
) -> Result<CertificateAuthority, CaFilesError> {
    let certs = parse_certs(cert_pem, cert_path)?;
    let key = parse_key(key_pem, key_path)?;
    let chain = certs
        .iter()
        .map(|der| {
            parse_x509_certificate(der)
                .map(|(_, cert)| cert)
                .map_err(|e| invalid(cert_path, format!("bad certificate: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    // A CA outside its validity period signs certificates no peer accepts:
    // refuse it at start rather than issue them.
    let mut signs_until = ::time::OffsetDateTime::now_utc() + ::time::Duration::days(365 * 100);
    for (at, cert) in chain.iter().enumerate() {
        let validity = cert.validity();
        signs_until = signs_until.min(validity.not_after.to_datetime());
        if !validity.is_valid() {
            return Err(invalid(
                cert_path,
                format!(
                    "certificate {} of the chain is outside its validity period (not before {}, not after {})",
                    at + 1,
                    validity.not_before,
                    validity.not_after
                ),
            ));
        }
    }
    let signing = &chain[0];
    if let Some(why) = cannot_sign(signing) {
        return Err(invalid(cert_path, format!("the first certificate {why}")));
    }
    if !key_matches(signing, &key) {
        return Err(CaFilesError::KeyMismatch {
            cert: cert_path.to_path_buf(),
            key: key_path.to_path_buf(),
        });
    }
    // Each certificate must be signed by the next, up to the root: a peer
    // verifies every SVID along this chain, so a wrong intermediate, a
    // chain out of order or a root that only claims its name would let the
    // control plane start and issue certificates that every handshake
    // refuses.
    for (at, pair) in chain.windows(2).enumerate() {
        let (child, parent) = (&pair[0], &pair[1]);
        let (child_at, parent_at) = (at + 1, at + 2);
        if child.issuer() != parent.subject() {
            return Err(invalid(
                cert_path,
                format!(
                    "certificate {child_at} of the chain is issued by {}, but certificate \
                     {parent_at} is {}: give the signing CA first, then each certificate's \
                     issuer, ending at the root",
                    name_shown(child.issuer()),
                    name_shown(parent.subject())
                ),
            ));
        }
        if let Some(why) = cannot_sign(parent) {
            return Err(invalid(
                cert_path,
                format!("certificate {parent_at} of the chain {why}"),
            ));
        }
        if let Some(why) = bad_signature(child, Some(parent.public_key())) {
            return Err(invalid(
                cert_path,
                format!(
                    "certificate {parent_at} of the chain ({}) did not sign certificate \
                     {child_at}: {why}",
                    name_shown(parent.subject())
                ),
            ));
        }
    }
    let root = chain.last().expect("parse_certs returns at least one");
    if root.subject() != root.issuer() {
        return Err(invalid(
            cert_path,
            "the last certificate must be the self-signed root of the chain",
        ));
    }
    if let Some(why) = bad_signature(root, None) {
        return Err(invalid(
            cert_path,
            format!(
                "the last certificate ({}) names itself as its issuer but did not sign itself: \
                 {why}",
                name_shown(root.subject())
            ),
        ));
    }
    let root = certs
        .last()
        .cloned()
        .expect("parse_certs returns at least one");
    let intermediates = certs[..certs.len() - 1].to_vec();
    let issuer = Issuer::from_ca_cert_der(&certs[0], key)
        .map_err(|e| invalid(cert_path, format!("cannot sign with it: {e}")))?;
    Ok(CertificateAuthority::from_parts(
        trust_domain,
        issuer,
        intermediates,
        root,
        signs_until,
    ))
}

/// Where the operator credential lives.
#[derive(Clone, Debug)]
pub struct AdminCredential {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Makes sure `admin.crt` / `admin.key` hold a current operator SVID signed
/// by `ca`; issues a new one when missing, expired, from another CA, or
/// when the two files do not belong together (a re-issue cut short between
/// its two writes leaves a new key beside the old certificate). Unlike the
/// CA's key, which is refused when it does not match, this credential is
/// the control plane's own to make again.
pub fn ensure_admin_credential(
    dir: &StateDir,
    ca: &CertificateAuthority,
) -> Result<AdminCredential, CaFilesError> {
    let cred = AdminCredential {
        cert: dir.path(ADMIN_CERT),
        key: dir.path(ADMIN_KEY),
    };
    if let (Some(cert), Some(key)) = (dir.read(ADMIN_CERT)?, dir.read_secret(ADMIN_KEY)?) {
        let chain = parse_certs(&cert, &cred.cert)?;
        let key = parse_key(&key, &cred.key)?;
        let (_, leaf) = parse_x509_certificate(&chain[0])
            .map_err(|e| invalid(&cred.cert, format!("bad certificate: {e}")))?;
        let margin = ::time::Duration::days(1);
        let fresh =
            leaf.validity().not_after.to_datetime() > ::time::OffsetDateTime::now_utc() + margin;
        if !key_matches(&leaf, &key) {
            tracing::warn!(cert = %shown(&cred.cert), key = %shown(&cred.key), "operator certificate and key do not belong together; issuing a new pair");
        } else if fresh && signed_by_ca(&leaf, ca) {
            return Ok(cred);
        } else {
            tracing::info!(cert = %shown(&cred.cert), "operator credential expired or from another CA; issuing a new one");
        }
    }
    let admin = SpiffeId::admin(ca.trust_domain());
    let (issued, key) = ca.issue_with_key(&admin, &ExtraSans::default(), ADMIN_LIFETIME)?;
    let cert_pem: String = issued.chain.iter().map(|c| der_to_pem(c)).collect();
    dir.write_atomic(ADMIN_KEY, key.serialize_pem().as_bytes(), Secrecy::Secret)?;
    dir.write_atomic(ADMIN_CERT, cert_pem.as_bytes(), Secrecy::Public)?;
    Ok(cred)
}

fn signed_by_ca(leaf: &X509Certificate<'_>, ca: &CertificateAuthority) -> bool {
    parse_x509_certificate(ca.signing_cert())
        .is_ok_and(|(_, issuer)| leaf.verify_signature(Some(issuer.public_key())).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_core::TrustDomain;

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    #[test]
    fn restart_loads_the_same_ca_and_credential() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::open(&tmp.path().join("s")).unwrap();
        let ca = open_ca(&dir, &td(), None, &[]).unwrap();
        ensure_admin_credential(&dir, &ca).unwrap();
        let files = [CA_CERT, CA_KEY, BUNDLE, ADMIN_CERT, ADMIN_KEY];
        let before: Vec<_> = files.iter().map(|f| dir.read(f).unwrap()).collect();
        let ca = open_ca(&dir, &td(), None, &[]).unwrap();
        ensure_admin_credential(&dir, &ca).unwrap();
        let after: Vec<_> = files.iter().map(|f| dir.read(f).unwrap()).collect();
        assert_eq!(before, after);
    }

    #[test]
    fn an_expired_ca_is_refused_naming_its_file() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let now = ::time::OffsetDateTime::now_utc();
        params.not_before = now - ::time::Duration::days(30);
        params.not_after = now - ::time::Duration::days(1);
        let cert = params.self_signed(&key).unwrap();
        let (cert_path, key_path) = (Path::new("operator/ca.pem"), Path::new("operator/ca.key"));
        let Err(err) = load_ca(
            &td(),
            cert.pem().as_bytes(),
            cert_path,
            key.serialize_pem().as_bytes(),
            key_path,
        ) else {
            panic!("an expired CA was loaded");
        };
        let err = err.to_string();
        assert!(err.contains("operator/ca.pem"), "{err}");
        assert!(err.contains("outside its validity period"), "{err}");

        params.not_after = now + ::time::Duration::days(1);
        let cert = params.self_signed(&key).unwrap();
        assert!(
            load_ca(
                &td(),
                cert.pem().as_bytes(),
                cert_path,
                key.serialize_pem().as_bytes(),
                key_path,
            )
            .is_ok()
        );
    }

    /// A CA certificate as an operator's PKI makes it, with its key.
    struct Link {
        der: CertificateDer<'static>,
        pem: String,
        key_pem: String,
        issuer: Issuer<'static, KeyPair>,
    }

    fn p256() -> KeyPair {
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
    }

    fn ca_params(name: &str) -> rcgen::CertificateParams {
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        params
    }

    /// `params` signed by `by`, or by its own key without one.
    fn link(params: rcgen::CertificateParams, by: Option<&Link>) -> Link {
        let key = p256();
        let cert = match by {
            Some(by) => params.signed_by(&key, &by.issuer).unwrap(),
            None => params.self_signed(&key).unwrap(),
        };
        Link {
            der: cert.der().clone(),
            pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// An operator's chain: a root, an intermediate it signed, and a
    /// signing CA the intermediate signed.
    fn three_links() -> [Link; 3] {
        let root = link(ca_params("Operator root"), None);
        let middle = link(ca_params("Operator intermediate"), Some(&root));
        let signing = link(ca_params("Operator signing CA"), Some(&middle));
        [root, middle, signing]
    }

    /// Loads `chain` as `--ca-cert` with the first link's key.
    fn load_chain(chain: &[&Link]) -> Result<CertificateAuthority, String> {
        let pem: String = chain.iter().map(|l| l.pem.as_str()).collect();
        load_ca(
            &td(),
            pem.as_bytes(),
            Path::new("operator/chain.pem"),
            chain[0].key_pem.as_bytes(),
            Path::new("operator/signing.key"),
        )
        .map_err(|e| e.to_string())
    }

    #[test]
    fn a_valid_three_link_chain_signs_with_its_intermediates_and_root() {
        let [root, middle, signing] = three_links();
        let ca = load_chain(&[&signing, &middle, &root]).unwrap();
        assert_eq!(
            ca.bundle(),
            std::slice::from_ref(&root.der),
            "the root alone is trusted"
        );
        assert_eq!(ca.signing_cert(), &signing.der);
        let (issued, _) = ca
            .issue_with_key(
                &SpiffeId::admin(&td()),
                &ExtraSans::default(),
                ADMIN_LIFETIME,
            )
            .unwrap();
        assert_eq!(
            issued.chain[1..],
            [signing.der.clone(), middle.der.clone()],
            "a leaf is sent with the intermediates, not the root"
        );
    }

    #[test]
    fn a_chain_out_of_order_is_refused_naming_the_link() {
        let [root, middle, signing] = three_links();
        let err = load_chain(&[&signing, &root, &middle]).unwrap_err();
        assert_eq!(
            err,
            "operator/chain.pem is not usable: certificate 1 of the chain is issued by \
             CN=Operator intermediate, but certificate 2 is CN=Operator root: give the signing \
             CA first, then each certificate's issuer, ending at the root"
        );
    }

    /// An intermediate of the same name from another root: the names
    /// chain, the signature does not.
    #[test]
    fn an_intermediate_from_another_root_is_refused() {
        let root = link(ca_params("Operator root"), None);
        let other_root = link(ca_params("Operator root"), None);
        let middle = link(ca_params("Operator intermediate"), Some(&other_root));
        let signing = link(ca_params("Operator signing CA"), Some(&middle));
        let err = load_chain(&[&signing, &middle, &root]).unwrap_err();
        assert_eq!(
            err,
            "operator/chain.pem is not usable: certificate 3 of the chain (CN=Operator root) did \
             not sign certificate 2: the signature does not verify with its key"
        );
        // The wrong intermediate for the signing CA, under the right root.
        let stranger = link(ca_params("Operator intermediate"), Some(&root));
        let err = load_chain(&[&signing, &stranger, &root]).unwrap_err();
        assert!(
            err.contains(
                "certificate 2 of the chain (CN=Operator intermediate) did not sign \
                 certificate 1: "
            ),
            "{err}"
        );
    }

    #[test]
    fn an_intermediate_that_may_not_sign_is_refused() {
        let root = link(ca_params("Operator root"), None);
        let mut not_ca = ca_params("Operator intermediate");
        not_ca.is_ca = rcgen::IsCa::ExplicitNoCa;
        let middle = link(not_ca, Some(&root));
        let signing = link(ca_params("Operator signing CA"), Some(&middle));
        let err = load_chain(&[&signing, &middle, &root]).unwrap_err();
        assert_eq!(
            err,
            "operator/chain.pem is not usable: certificate 2 of the chain is not a CA (its \
             basicConstraints do not say CA:TRUE)"
        );
        let mut no_cert_sign = ca_params("Operator intermediate");
        no_cert_sign.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        let middle = link(no_cert_sign, Some(&root));
        let signing = link(ca_params("Operator signing CA"), Some(&middle));
        let err = load_chain(&[&signing, &middle, &root]).unwrap_err();
        assert_eq!(
            err,
            "operator/chain.pem is not usable: certificate 2 of the chain may not sign \
             certificates (its keyUsage lacks keyCertSign)"
        );
        // The signing CA itself.
        let mut no_cert_sign = ca_params("Operator signing CA");
        no_cert_sign.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        let signing = link(no_cert_sign, Some(&root));
        let err = load_chain(&[&signing, &root]).unwrap_err();
        assert_eq!(
            err,
            "operator/chain.pem is not usable: the first certificate may not sign certificates \
             (its keyUsage lacks keyCertSign)"
        );
    }

    /// A last certificate whose issuer is its own name, but signed by
    /// another key: it only claims to be a root.
    #[test]
    fn a_root_that_did_not_sign_itself_is_refused() {
        let impostor = link(ca_params("Operator root"), None);
        let claims = link(ca_params("Operator root"), Some(&impostor));
        let signing = link(ca_params("Operator signing CA"), Some(&claims));
        let err = load_chain(&[&signing, &claims]).unwrap_err();
        assert_eq!(
            err,
            "operator/chain.pem is not usable: the last certificate (CN=Operator root) names \
             itself as its issuer but did not sign itself: the signature does not verify with \
             its key"
        );
        // Alone, as the signing CA.
        let err = load_chain(&[&claims]).unwrap_err();
        assert!(err.contains("did not sign itself"), "{err}");
    }

    /// Paths and names from the operator's files are said with their
    /// control characters escaped.
    #[test]
    fn paths_and_names_in_errors_are_escaped() {
        let err = CaFilesError::Invalid {
            path: PathBuf::from("ca\n\x1b[2J.pem"),
            reason: "no".into(),
        };
        assert_eq!(err.to_string(), "ca\\n\\u{1b}[2J.pem is not usable: no");
        let root = link(ca_params("Operator \x1b[31mroot"), None);
        let other = link(ca_params("Operator signing CA"), None);
        let err = load_chain(&[&other, &root]).unwrap_err();
        assert!(
            err.contains("certificate 2 is CN=Operator \\u{1b}[31mroot:"),
            "{err}"
        );
    }

    #[test]
    fn corrupt_key_is_reported_and_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::open(&tmp.path().join("s")).unwrap();
        open_ca(&dir, &td(), None, &[]).unwrap();
        dir.write_atomic(CA_KEY, b"garbage", Secrecy::Secret)
            .unwrap();
        let err = open_ca(&dir, &td(), None, &[]).unwrap_err();
        assert!(err.to_string().contains("ca.key"), "{err}");
        assert_eq!(dir.read(CA_KEY).unwrap().unwrap(), b"garbage");
    }

    #[test]
    fn a_stale_or_foreign_admin_credential_is_reissued() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::open(&tmp.path().join("s")).unwrap();
        let ca = open_ca(&dir, &td(), None, &[]).unwrap();
        let admin = SpiffeId::admin(&td());
        let cases = [
            // About to expire: less than the one-day margin left.
            ca.issue_with_key(&admin, &ExtraSans::default(), Duration::from_secs(3600)),
            // Signed by another CA.
            CertificateAuthority::generate(&td())
                .unwrap()
                .0
                .issue_with_key(&admin, &ExtraSans::default(), ADMIN_LIFETIME),
        ];
        for case in cases {
            let (issued, key) = case.unwrap();
            let stale = der_to_pem(&issued.chain[0]);
            dir.write_atomic(ADMIN_CERT, stale.as_bytes(), Secrecy::Public)
                .unwrap();
            dir.write_atomic(ADMIN_KEY, key.serialize_pem().as_bytes(), Secrecy::Secret)
                .unwrap();
            ensure_admin_credential(&dir, &ca).unwrap();
            let fresh = dir.read(ADMIN_CERT).unwrap().unwrap();
            assert_ne!(fresh, stale.as_bytes());
            let chain = parse_certs(&fresh, &dir.path(ADMIN_CERT)).unwrap();
            let (_, leaf) = parse_x509_certificate(&chain[0]).unwrap();
            assert!(signed_by_ca(&leaf, &ca));
        }
    }

    fn bundle_of(dir: &StateDir, name: &str) -> Vec<CertificateDer<'static>> {
        parse_certs(&dir.read(name).unwrap().unwrap(), &dir.path(name)).unwrap()
    }

    #[test]
    fn trust_anchors_join_the_bundle_once_after_the_signing_root() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::open(&tmp.path().join("s")).unwrap();
        let signing = open_ca(&dir, &td(), None, &[]).unwrap().bundle()[0].clone();
        let (other, _, _) = CertificateAuthority::generate(&td()).unwrap();
        let other = other.bundle()[0].clone();
        let anchors = [other.clone(), signing.clone(), other.clone()];
        let ca = open_ca(&dir, &td(), None, &anchors).unwrap();
        assert_eq!(ca.bundle(), [signing.clone(), other.clone()]);
        assert_eq!(ca.signing_cert(), &signing);
        assert_eq!(bundle_of(&dir, BUNDLE), [signing.clone(), other]);
        // Dropping the anchor leaves the signing root alone again.
        open_ca(&dir, &td(), None, &[]).unwrap();
        assert_eq!(bundle_of(&dir, BUNDLE), [signing]);
    }

    /// The rotation the docs describe, on a state dir that generated its
    /// CA: the generated files, moved out, are the operator CA of the old
    /// root; then the new root signs and the old one stays trusted.
    #[test]
    fn a_generated_ca_moved_out_of_the_state_dir_rotates_to_a_new_root() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::open(&tmp.path().join("s")).unwrap();
        let old = open_ca(&dir, &td(), None, &[]).unwrap();
        ensure_admin_credential(&dir, &old).unwrap();
        let old_root = old.bundle()[0].clone();
        let (new, new_cert, new_key) = CertificateAuthority::generate(&td()).unwrap();
        let new_root = new.bundle()[0].clone();
        let new_files = (tmp.path().join("new.crt"), tmp.path().join("new.key"));
        std::fs::write(&new_files.0, new_cert).unwrap();
        std::fs::write(&new_files.1, new_key).unwrap();
        let old_files = (tmp.path().join("old.crt"), tmp.path().join("old.key"));

        // The generated CA and an operator CA cannot both be used.
        let operator = Some((new_files.0.as_path(), new_files.1.as_path()));
        let err = open_ca(&dir, &td(), operator, &[]).unwrap_err();
        assert!(matches!(err, CaFilesError::ConflictingCa { .. }), "{err}");
        assert!(
            err.to_string().contains("move ca.crt and ca.key out"),
            "{err}"
        );

        // Step 1: the old root signs from outside the state dir, the new
        // one is an anchor; the operator credential stays as it was.
        std::fs::rename(dir.path(CA_CERT), &old_files.0).unwrap();
        std::fs::rename(dir.path(CA_KEY), &old_files.1).unwrap();
        let admin = dir.read(ADMIN_CERT).unwrap();
        let operator = Some((old_files.0.as_path(), old_files.1.as_path()));
        let ca = open_ca(&dir, &td(), operator, std::slice::from_ref(&new_root)).unwrap();
        assert_eq!(ca.bundle(), [old_root.clone(), new_root.clone()]);
        ensure_admin_credential(&dir, &ca).unwrap();
        assert_eq!(dir.read(ADMIN_CERT).unwrap(), admin);

        // Step 2: the new root signs, the old one is an anchor; the
        // operator credential is re-issued by the new root.
        let operator = Some((new_files.0.as_path(), new_files.1.as_path()));
        let ca = open_ca(&dir, &td(), operator, std::slice::from_ref(&old_root)).unwrap();
        assert_eq!(ca.bundle(), [new_root.clone(), old_root]);
        ensure_admin_credential(&dir, &ca).unwrap();
        let admin = bundle_of(&dir, ADMIN_CERT);
        let (_, leaf) = parse_x509_certificate(&admin[0]).unwrap();
        assert!(signed_by_ca(&leaf, &ca));

        // Step 3: the new root alone.
        let ca = open_ca(&dir, &td(), operator, &[]).unwrap();
        assert_eq!(bundle_of(&dir, BUNDLE), ca.bundle());
        assert_eq!(ca.bundle(), [new_root]);
        assert!(dir.read(CA_CERT).unwrap().is_none(), "nothing generated");
    }

    /// A credential re-issue cut short between its two writes leaves a new
    /// key beside the old certificate: the next start makes a new pair.
    #[test]
    fn a_half_replaced_operator_credential_is_issued_again() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::open(&tmp.path().join("s")).unwrap();
        let ca = open_ca(&dir, &td(), None, &[]).unwrap();
        ensure_admin_credential(&dir, &ca).unwrap();
        let (_, _, other_key) = CertificateAuthority::generate(&td()).unwrap();
        dir.write_atomic(ADMIN_KEY, other_key.as_bytes(), Secrecy::Secret)
            .unwrap();
        let cred = ensure_admin_credential(&dir, &ca).unwrap();
        let chain = parse_certs(&dir.read(ADMIN_CERT).unwrap().unwrap(), &cred.cert).unwrap();
        let key = parse_key(&dir.read(ADMIN_KEY).unwrap().unwrap(), &cred.key).unwrap();
        let (_, leaf) = parse_x509_certificate(&chain[0]).unwrap();
        assert!(key_matches(&leaf, &key), "the new pair belongs together");
        assert!(signed_by_ca(&leaf, &ca));
        assert_ne!(
            dir.read(ADMIN_KEY).unwrap().unwrap(),
            other_key.as_bytes(),
            "a new key"
        );
    }

    #[test]
    fn mismatched_key_is_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::open(&tmp.path().join("s")).unwrap();
        open_ca(&dir, &td(), None, &[]).unwrap();
        let (_, _, other_key) = CertificateAuthority::generate(&td()).unwrap();
        dir.write_atomic(CA_KEY, other_key.as_bytes(), Secrecy::Secret)
            .unwrap();
        let err = open_ca(&dir, &td(), None, &[]).unwrap_err();
        assert!(matches!(err, CaFilesError::KeyMismatch { .. }), "{err}");
    }
}
