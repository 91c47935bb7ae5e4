//! Trust anchors (`--trust-anchors FILE`): roots the mesh trusts and
//! publishes beside the signing CA's own root, so a root can be rotated
//! without a moment where sidecars trust only one of two live roots: a new
//! root is trusted before it signs anything, an old one until every
//! certificate it signed has been renewed.
//!
//! The file is read once at start and checked whole: every PEM block must be
//! a certificate, each one a CA within its validity period. A refusal names
//! the file, the certificate (its index, from 1, and its subject) and why.
//! This module only reads public certificates: a private key in the file is
//! refused without a byte of it reaching an error or a log.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::{PemObject, SectionKind};
use tokio::sync::watch;
use x509_parser::prelude::*;

use crate::escape::{escape_controls, shown};

#[derive(Debug, thiserror::Error)]
pub enum TrustAnchorsError {
    #[error(
        "{}: cannot read it: {}",
        shown(path),
        trellis_core::io_error::IoWords(source)
    )]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not PEM: {reason}", shown(path))]
    Pem { path: PathBuf, reason: String },
    #[error(
        "{}: no certificate in it (it should hold the PEM roots to trust)",
        shown(path)
    )]
    Empty { path: PathBuf },
    #[error(
        "{}: PEM block {block} is {what}, not a certificate: the file holds the public roots \
         to trust, never a key",
        shown(path)
    )]
    NotACertificate {
        path: PathBuf,
        block: usize,
        what: &'static str,
    },
    #[error(
        "{}: certificate {index} is not an X.509 certificate: {reason}",
        shown(path)
    )]
    Unparsable {
        path: PathBuf,
        index: usize,
        reason: String,
    },
    #[error(
        "{}: certificate {index} ({}): {reason}",
        shown(path),
        escape_controls(subject)
    )]
    Refused {
        path: PathBuf,
        index: usize,
        subject: String,
        reason: String,
    },
}

/// Reads and checks the trust anchors in `path` (see the module docs).
pub fn load_trust_anchors(path: &Path) -> Result<Vec<CertificateDer<'static>>, TrustAnchorsError> {
    let bytes = std::fs::read(path).map_err(|source| TrustAnchorsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_trust_anchors(&bytes, path)
}

/// Checks the trust anchors in `pem`, read from `path` (named in errors).
pub fn parse_trust_anchors(
    pem: &[u8],
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TrustAnchorsError> {
    let path = || path.to_path_buf();
    let mut anchors = Vec::new();
    for (block, section) in <(SectionKind, Vec<u8>)>::pem_slice_iter(pem).enumerate() {
        let (kind, der) = section.map_err(|e| TrustAnchorsError::Pem {
            path: path(),
            reason: e.to_string(),
        })?;
        if kind != SectionKind::Certificate {
            return Err(TrustAnchorsError::NotACertificate {
                path: path(),
                block: block + 1,
                what: describe_section(kind),
            });
        }
        let index = anchors.len() + 1;
        let der = CertificateDer::from(der);
        check_anchor(&der).map_err(|refusal| match refusal {
            Refusal::Unparsable(reason) => TrustAnchorsError::Unparsable {
                path: path(),
                index,
                reason,
            },
            Refusal::Refused { subject, reason } => TrustAnchorsError::Refused {
                path: path(),
                index,
                subject,
                reason,
            },
        })?;
        anchors.push(der);
    }
    if anchors.is_empty() {
        return Err(TrustAnchorsError::Empty { path: path() });
    }
    Ok(anchors)
}

enum Refusal {
    Unparsable(String),
    Refused { subject: String, reason: String },
}

/// A root is only useful in the bundle as a CA that can verify today.
fn check_anchor(der: &CertificateDer<'_>) -> Result<(), Refusal> {
    let cert = match parse_x509_certificate(der) {
        Ok(([], cert)) => cert,
        Ok(_) => return Err(Refusal::Unparsable("trailing bytes after the DER".into())),
        Err(e) => return Err(Refusal::Unparsable(e.to_string())),
    };
    let refused = |reason: String| Refusal::Refused {
        subject: subject_of(&cert),
        reason,
    };
    if !cert.is_ca() {
        return Err(refused(
            "not a CA certificate (basicConstraints CA is not true)".into(),
        ));
    }
    let validity = cert.validity();
    let now = ASN1Time::now();
    if now > validity.not_after {
        return Err(refused(format!("expired on {}", validity.not_after)));
    }
    if now < validity.not_before {
        return Err(refused(format!("not valid before {}", validity.not_before)));
    }
    Ok(())
}

fn subject_of(cert: &X509Certificate<'_>) -> String {
    let subject = cert.subject().to_string();
    if subject.is_empty() {
        "no subject".into()
    } else {
        subject
    }
}

fn describe_section(kind: SectionKind) -> &'static str {
    match kind {
        SectionKind::PrivateKey | SectionKind::RsaPrivateKey | SectionKind::EcPrivateKey => {
            "a private key"
        }
        SectionKind::PublicKey => "a public key",
        SectionKind::Crl => "a CRL",
        SectionKind::Csr => "a certificate request",
        SectionKind::EchConfigList => "an ECH config",
        _ => "something else",
    }
}

/// One line per root for the start-up log: subject and expiry date.
pub fn describe_roots(roots: &[CertificateDer<'_>]) -> String {
    roots
        .iter()
        .map(|der| match parse_x509_certificate(der) {
            Ok((_, cert)) => format!(
                "{} (until {})",
                subject_of(&cert),
                cert.validity().not_after.to_datetime().date()
            ),
            Err(_) => "unreadable".into(),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Each of `roots` by its subject, with when it expires (Unix seconds), for
/// the trust bundle's gauges and the warning when one expires; unreadable
/// roots are passed over (none reaches a bundle: each was read at
/// start-up).
pub fn expiries(roots: &[CertificateDer<'_>]) -> Vec<(String, i64)> {
    roots
        .iter()
        .filter_map(|der| parse_x509_certificate(der).ok())
        .map(|(_, cert)| (subject_of(&cert), cert.validity().not_after.timestamp()))
        .collect()
}

/// Logs as each root of the bundle (`expiries`, the signing CA's root
/// first) expires, until the last one has or `shutdown` turns true: an
/// expired root anchors nothing, and stays published until a restart
/// without it.
pub async fn report_expiring_roots(
    expiries: Vec<(String, i64)>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut ahead: Vec<(usize, String, i64)> = expiries
        .into_iter()
        .enumerate()
        .map(|(i, (subject, at))| (i, subject, at))
        .collect();
    ahead.sort_by_key(|(_, _, at)| *at);
    for (index, subject, at) in ahead {
        let expiry = std::time::UNIX_EPOCH + Duration::from_secs(at.max(0) as u64);
        // In steps of a day at most, so a clock set forward is noticed.
        while let Ok(left) = expiry.duration_since(std::time::SystemTime::now()) {
            tokio::select! {
                () = tokio::time::sleep(left.min(Duration::from_secs(86_400))) => {}
                () = crate::run::stopping(&mut shutdown) => return,
            }
        }
        if index == 0 {
            tracing::error!(
                root = %subject,
                expired_at = at,
                "the signing CA's root has expired: no certificate it signed verifies any longer; \
                 rotate the root (docs/ARCHITECTURE.md, Rotating the root)"
            );
        } else {
            tracing::warn!(
                root = %subject,
                expired_at = at,
                "a trust anchor has expired: it anchors nothing from now on; remove it from \
                 --trust-anchors (the chart's trustAnchorsPEM) at the next restart"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::time::{Duration, OffsetDateTime};
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

    const FILE: &str = "operator/anchors.pem";

    fn cert(name: &str, ca: bool, from_days: i64, to_days: i64) -> (String, KeyPair) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = if ca {
            IsCa::Ca(BasicConstraints::Unconstrained)
        } else {
            IsCa::ExplicitNoCa
        };
        let now = OffsetDateTime::now_utc();
        params.not_before = now + Duration::days(from_days);
        params.not_after = now + Duration::days(to_days);
        (params.self_signed(&key).unwrap().pem(), key)
    }

    fn root(name: &str) -> String {
        cert(name, true, -1, 365).0
    }

    fn refusal(pem: &str) -> String {
        let err = parse_trust_anchors(pem.as_bytes(), Path::new(FILE)).unwrap_err();
        let message = err.to_string();
        assert!(message.starts_with(FILE), "{message}");
        message
    }

    #[test]
    fn loads_every_root_in_order() {
        let pem = format!("{}{}", root("Old root"), root("New root"));
        let anchors = parse_trust_anchors(pem.as_bytes(), Path::new(FILE)).unwrap();
        assert_eq!(anchors.len(), 2);
        let described = describe_roots(&anchors);
        assert!(
            described.starts_with("CN=Old root (until ")
                && described.contains("; CN=New root (until "),
            "{described}"
        );
    }

    #[test]
    fn a_leaf_is_refused_naming_the_certificate() {
        let pem = format!("{}{}", root("Old root"), cert("Leaf", false, -1, 30).0);
        let message = refusal(&pem);
        assert!(message.contains("certificate 2 (CN=Leaf)"), "{message}");
        assert!(message.contains("not a CA certificate"), "{message}");
    }

    #[test]
    fn a_root_outside_its_validity_period_is_refused() {
        let message = refusal(&cert("Expired root", true, -30, -1).0);
        assert!(
            message.contains("certificate 1 (CN=Expired root): expired on"),
            "{message}"
        );
        let message = refusal(&cert("Future root", true, 2, 30).0);
        assert!(
            message.contains("certificate 1 (CN=Future root): not valid before"),
            "{message}"
        );
    }

    #[test]
    fn garbage_is_refused() {
        let message = refusal("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n");
        assert!(
            message.contains("certificate 1 is not an X.509 certificate"),
            "{message}"
        );
        let message =
            refusal("-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n");
        assert!(message.contains("not PEM"), "{message}");
        let message = refusal(&format!("{}-----BEGIN CERTIFICATE-----\n", root("Root")));
        assert!(message.contains("not PEM"), "{message}");
    }

    #[test]
    fn an_empty_file_or_one_without_a_certificate_is_refused() {
        for pem in ["", "\n", "some notes, no PEM at all\n"] {
            let message = refusal(pem);
            assert!(
                message.contains("no certificate in it"),
                "{pem:?}: {message}"
            );
        }
    }

    #[test]
    fn a_private_key_is_refused_without_showing_it() {
        let (root, key) = cert("Root", true, -1, 365);
        let key_pem = key.serialize_pem();
        let message = refusal(&format!("{root}{key_pem}"));
        assert!(
            message.contains("PEM block 2 is a private key"),
            "{message}"
        );
        let body: String = key_pem.lines().nth(1).unwrap().chars().take(16).collect();
        assert!(!message.contains(&body), "{message}");
    }

    #[test]
    fn an_unreadable_file_is_named() {
        let err = load_trust_anchors(Path::new("/nonexistent/anchors.pem")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("/nonexistent/anchors.pem: cannot read it"),
            "{err}"
        );
    }

    /// The task that reports expiring roots ends when the control plane
    /// shuts down, as its other background tasks do, though its root
    /// expires only in a year; until then it keeps waiting for that.
    #[tokio::test(start_paused = true)]
    async fn the_root_expiry_report_ends_at_shutdown() {
        let pem = root("Root");
        let roots = parse_trust_anchors(pem.as_bytes(), Path::new(FILE)).unwrap();
        let day = std::time::Duration::from_secs(24 * 3600);
        let expiries = expiries(&roots);
        crate::run::assert_runs_until_shutdown(day, |shutdown| {
            report_expiring_roots(expiries, shutdown)
        })
        .await;
    }
}
