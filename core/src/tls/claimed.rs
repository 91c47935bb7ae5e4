//! What a refused peer certificate claims, for the line that logs its
//! refusal: the SPIFFE ID of its URI SAN, and what it was refused for (its
//! notAfter or notBefore, its issuer's name). Read from the certificate unverified, so
//! never trusted for any decision, and bounded and escaped, as a peer
//! writes it.
//!
//! The verifiers of this module note it when they refuse a certificate
//! in a handshake run by [`noting_refused`], on that handshake's task;
//! elsewhere they note nothing, and a certificate they accept costs
//! nothing.

use std::cell::RefCell;
use std::fmt;
use std::future::Future;

use rustls::CertificateError;
use rustls::pki_types::CertificateDer;

/// The most characters of a claimed name kept, before escaping.
pub const CLAIMED_CHARS: usize = 256;

/// What a refused certificate claims.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claimed {
    /// The SPIFFE ID its one URI SAN holds, unverified; `None` when it
    /// has none or several.
    pub peer: Option<Bounded>,
    /// Its notAfter in RFC 3339, when it was refused for having expired.
    pub not_after: Option<String>,
    /// Its notBefore in RFC 3339, when it was refused for not being valid
    /// yet (a clock, its holder's or the verifier's, is off).
    pub not_before: Option<String>,
    /// Its issuer's name, when no root of the bundle leads to it.
    pub issuer: Option<Bounded>,
    /// The revocation that covers it, when it was refused as revoked. Its
    /// chain was verified before, so this one names the peer it verified.
    pub revoked: Option<crate::revocation::Revoked>,
}

/// Text a peer wrote: at most [`CLAIMED_CHARS`] of its characters, each
/// outside printable ASCII escaped, with `...` when it went on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bounded(String);

impl Bounded {
    pub fn new(text: &str) -> Self {
        let mut out = String::new();
        for c in text.chars().take(CLAIMED_CHARS) {
            match c {
                ' '..='~' if c != '\\' => out.push(c),
                _ => out.extend(c.escape_default()),
            }
        }
        if text.chars().nth(CLAIMED_CHARS).is_some() {
            out.push_str("...");
        }
        Bounded(out)
    }
}

impl fmt::Display for Bounded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

tokio::task_local! {
    static REFUSED: RefCell<Option<Claimed>>;
}

/// Runs `handshake`, and gives with its output what the last certificate
/// a verifier of this module refused in it claims, if one did.
pub async fn noting_refused<F: Future>(handshake: F) -> (F::Output, Option<Claimed>) {
    REFUSED
        .scope(RefCell::new(None), async move {
            let output = handshake.await;
            (output, REFUSED.with(|refused| refused.borrow_mut().take()))
        })
        .await
}

/// Notes what `leaf`, refused with `error`, claims, within
/// [`noting_refused`]; outside it, does nothing.
pub(super) fn note_refused(leaf: &CertificateDer<'_>, error: &rustls::Error) {
    let _ = REFUSED.try_with(|refused| {
        *refused.borrow_mut() = Some(claimed(leaf, error));
    });
}

/// Notes `leaf`, refused because `revoked` covers it, within
/// [`noting_refused`]; outside it, does nothing.
pub(super) fn note_revoked(leaf: &CertificateDer<'_>, revoked: crate::revocation::Revoked) {
    let _ = REFUSED.try_with(|refused| {
        let error = rustls::Error::InvalidCertificate(CertificateError::Revoked);
        *refused.borrow_mut() = Some(Claimed {
            revoked: Some(revoked),
            ..claimed(leaf, &error)
        });
    });
}

/// What `leaf`, refused with `error`, claims.
pub fn claimed(leaf: &CertificateDer<'_>, error: &rustls::Error) -> Claimed {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(leaf.as_ref()) else {
        return Claimed::default();
    };
    let mut uris = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(uri) = name {
                uris.push(*uri);
            }
        }
    }
    let peer = match uris.as_slice() {
        [uri] => Some(Bounded::new(uri)),
        _ => None,
    };
    let refused_for = match error {
        rustls::Error::InvalidCertificate(e) => Some(e),
        _ => None,
    };
    let rfc3339 = |at: i64| {
        crate::clock::rfc3339_checked(at).unwrap_or_else(|| format!("{at} (Unix seconds)"))
    };
    let not_after = match refused_for {
        Some(CertificateError::Expired | CertificateError::ExpiredContext { .. }) => {
            Some(rfc3339(parsed.validity().not_after.timestamp()))
        }
        _ => None,
    };
    let not_before = match refused_for {
        Some(CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. }) => {
            Some(rfc3339(parsed.validity().not_before.timestamp()))
        }
        _ => None,
    };
    let issuer = match refused_for {
        Some(CertificateError::UnknownIssuer) => Some(Bounded::new(&parsed.issuer().to_string())),
        _ => None,
    };
    Claimed {
        peer,
        not_after,
        not_before,
        issuer,
        revoked: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A name a peer wrote is kept to its first characters, with what
    /// would break a log line escaped.
    #[test]
    fn a_claimed_name_is_bounded_and_escaped() {
        let id = "spiffe://td/ns/a/sa/web";
        assert_eq!(Bounded::new(id).to_string(), id);
        assert_eq!(
            Bounded::new("spiffe://td/x\ny=1 \\ \u{1b}[2J").to_string(),
            "spiffe://td/x\\ny=1 \\\\ \\u{1b}[2J"
        );
        let long = "a".repeat(CLAIMED_CHARS + 10);
        let kept = Bounded::new(&long).to_string();
        assert_eq!(kept, format!("{}...", "a".repeat(CLAIMED_CHARS)));
    }
}
