//! Why a TLS handshake failed, or a peer was refused as if it had: the
//! `reason` of `trellis_handshake_failures_total` and of the log lines
//! that report it.
//!
//! This is the one list of those reasons: the code that classifies a
//! failure names one of them (so no other can be counted), and the
//! metrics make each at 0 in the directions it can occur in.

use std::io;

use trellis_core::tls::SvidError;

use crate::metrics::label_values;

label_values! {
    /// The `reason` label values of `trellis_handshake_failures_total`.
    pub enum HandshakeFailure {
        /// The bytes were not TLS (plaintext to the inbound port).
        NotTls = ("not_tls", Both),
        /// The peer presented no certificate.
        NoClientCertificate = ("no_client_certificate", Both),
        /// No root of the trust bundle leads to the peer's certificate.
        UnknownIssuer = ("unknown_issuer", Both),
        /// The chain leads only to a root of the bundle that has expired.
        ExpiredRoot = ("expired_root", Both),
        /// The peer is not the identity expected of it.
        UnexpectedIdentity = ("unexpected_identity", Both),
        /// The peer's SPIFFE ID is of another trust domain.
        ForeignTrustDomain = ("foreign_trust_domain", Both),
        /// A leaf without digitalSignature in its keyUsage, or with
        /// keyCertSign or cRLSign.
        SvidKeyUsage = ("svid_key_usage", Both),
        /// A leaf without basicConstraints.
        SvidBasicConstraints = ("svid_basic_constraints", Both),
        /// The trust domain's own ID for a workload's.
        TrustDomainId = ("trust_domain_id", Both),
        /// A CA certificate presented as the leaf.
        CaUsedAsLeaf = ("ca_used_as_leaf", Both),
        /// A leaf that signed another certificate of the chain.
        LeafUsedAsCa = ("leaf_used_as_ca", Both),
        /// A certificate that is no X.509-SVID: malformed, no single URI
        /// SAN, or one that is no SPIFFE ID.
        InvalidSvid = ("invalid_svid", Both),
        /// Any other fault of the peer's certificate.
        InvalidCertificate = ("invalid_certificate", Both),
        /// The handshake did not end in time.
        Timeout = ("timeout", Both),
        /// A TLS 1.2 peer, or one with no cipher suite or key exchange in
        /// common.
        IncompatiblePeer = ("incompatible_peer", Both),
        /// The peer's certificate has expired.
        ExpiredCertificate = ("expired_certificate", Both),
        /// The peer's certificate is not valid yet by this sidecar's clock.
        NotYetValidCertificate = ("not_yet_valid_certificate", Both),
        /// A revocation covers the peer's certificate.
        Revoked = ("revoked", Both),
        /// This sidecar has no certificate yet.
        NoLocalCertificate = ("no_local_certificate", Both),
        /// The peer ended the handshake with a TLS alert.
        AlertReceived = ("alert_received", Both),
        /// The peer closed the connection during the handshake.
        Closed = ("closed", Both),
        /// The connection failed during the handshake (not a TLS error).
        Io = ("io", Both),
        /// Any other TLS error.
        Other = ("other", Both),
        /// A caller's attempt to resume with a ticket this sidecar no
        /// longer accepts, which it ends and dials again in full.
        NotResumed = ("not_resumed", Inbound),
        /// A caller past the handshake limits.
        Overloaded = ("overloaded", Inbound),
        /// The server's sidecar has no certificate yet.
        PeerNotReady = ("peer_not_ready", Outbound),
        /// The server's sidecar refused this sidecar's certificate with
        /// the alert `certificate_revoked`, once this sidecar's handshake
        /// was over (as TLS 1.3 has it); so the `alert_` reasons below.
        AlertCertificateRevoked = ("alert_certificate_revoked", Outbound),
        AlertCertificateExpired = ("alert_certificate_expired", Outbound),
        AlertUnknownCa = ("alert_unknown_ca", Outbound),
        AlertCertificateRequired = ("alert_certificate_required", Outbound),
        AlertBadCertificate = ("alert_bad_certificate", Outbound),
        AlertCertificateUnknown = ("alert_certificate_unknown", Outbound),
        AlertAccessDenied = ("alert_access_denied", Outbound),
        AlertHandshakeFailure = ("alert_handshake_failure", Outbound),
        AlertInternalError = ("alert_internal_error", Outbound),
        /// Any other alert.
        AlertOther = ("alert_other", Outbound),
    }
}

impl HandshakeFailure {
    /// The reason whose token is `label`, or [`HandshakeFailure::Other`].
    fn named(label: &str) -> Self {
        Self::ALL
            .into_iter()
            .find(|reason| reason.label() == label)
            .unwrap_or(HandshakeFailure::Other)
    }

    /// A rustls error of a handshake, named as the control plane names it
    /// ([`trellis_core::tls::failure_reason`]).
    pub fn of_rustls(e: &rustls::Error) -> Self {
        Self::named(trellis_core::tls::failure_reason(e))
    }

    /// A certificate refused for not being a usable X.509-SVID.
    pub fn of_svid(e: &SvidError) -> Self {
        Self::named(e.reason())
    }

    /// The I/O error a TLS handshake ended with: the rustls error inside
    /// it, a caller's resumption ended ([`crate::net::ResumptionRefused`]),
    /// the connection closed, or [`HandshakeFailure::Io`].
    pub fn of_io(e: &io::Error) -> Self {
        if e.get_ref()
            .is_some_and(|inner| inner.is::<crate::net::ResumptionRefused>())
        {
            return HandshakeFailure::NotResumed;
        }
        match trellis_core::tls::rustls_error(e) {
            Some(tls) => Self::of_rustls(tls),
            None if e.kind() == io::ErrorKind::UnexpectedEof => HandshakeFailure::Closed,
            None => HandshakeFailure::Io,
        }
    }

    /// The reason an alert the server's sidecar refused this sidecar's
    /// certificate with after the handshake is counted under.
    pub fn of_alert(alert: rustls::AlertDescription) -> Self {
        use rustls::AlertDescription as A;
        match alert {
            A::CertificateRevoked => HandshakeFailure::AlertCertificateRevoked,
            A::CertificateExpired => HandshakeFailure::AlertCertificateExpired,
            A::UnknownCA => HandshakeFailure::AlertUnknownCa,
            A::CertificateRequired => HandshakeFailure::AlertCertificateRequired,
            A::BadCertificate | A::UnsupportedCertificate | A::DecryptError => {
                HandshakeFailure::AlertBadCertificate
            }
            A::CertificateUnknown => HandshakeFailure::AlertCertificateUnknown,
            A::AccessDenied => HandshakeFailure::AlertAccessDenied,
            A::HandshakeFailure => HandshakeFailure::AlertHandshakeFailure,
            A::InternalError => HandshakeFailure::AlertInternalError,
            _ => HandshakeFailure::AlertOther,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use rustls::{AlertDescription, CertificateError, Error, InvalidMessage, PeerIncompatible};
    use trellis_core::spiffe::SpiffeId;

    use super::*;

    #[test]
    fn tokens_are_unique_and_in_snake_case() {
        let tokens: HashSet<_> = HandshakeFailure::ALL.map(HandshakeFailure::label).into();
        assert_eq!(tokens.len(), HandshakeFailure::COUNT);
        for token in tokens {
            assert!(
                token.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                "{token}"
            );
        }
    }

    /// Every reason the shared classifier names a rustls error or a
    /// refused SVID by is one of the list, under the same token: none
    /// falls to `other` for want of a place in it.
    #[test]
    fn every_reason_the_classifier_names_is_listed() {
        let id = |s: &str| SpiffeId::parse(s).unwrap();
        let svid_errors = [
            SvidError::Malformed("x".into()),
            SvidError::UriSanCount(2),
            SvidError::ForeignTrustDomain {
                found: id("spiffe://other/ns/a/sa/b"),
                expected: id("spiffe://td/ns/a/sa/b").trust_domain(),
            },
            SvidError::UnexpectedId {
                found: id("spiffe://td/ns/a/sa/b"),
                expected: id("spiffe://td/ns/a/sa/c"),
            },
            SvidError::NoCertificate,
            SvidError::OutsideValidity {
                not_before: String::new(),
                not_after: String::new(),
            },
            SvidError::ExpiredRoot {
                subject: String::new(),
                not_after: String::new(),
            },
            SvidError::RootsExpired {
                not_after: String::new(),
            },
            SvidError::NoPath {
                id: id("spiffe://td/ns/a/sa/b"),
            },
            SvidError::KeyUsage("x"),
            SvidError::BasicConstraints("x"),
            SvidError::CaAsLeaf,
            SvidError::LeafAsCa,
        ];
        for e in &svid_errors {
            let reason = HandshakeFailure::of_svid(e);
            assert_eq!(reason.label(), e.reason(), "{e:?}");
            assert_ne!(reason, HandshakeFailure::Other, "{e:?}");
        }
        for e in [
            Error::NoCertificatesPresented,
            Error::InvalidCertificate(CertificateError::Expired),
            Error::InvalidCertificate(CertificateError::NotValidYet),
            Error::InvalidCertificate(CertificateError::UnknownIssuer),
            Error::InvalidCertificate(CertificateError::Revoked),
            Error::InvalidCertificate(CertificateError::BadSignature),
            Error::InvalidMessage(InvalidMessage::InvalidContentType),
            Error::PeerIncompatible(PeerIncompatible::Tls12NotOffered),
            Error::AlertReceived(AlertDescription::HandshakeFailure),
        ] {
            let reason = HandshakeFailure::of_rustls(&e);
            assert_eq!(reason.label(), trellis_core::tls::failure_reason(&e));
            assert_ne!(reason, HandshakeFailure::Other, "{e:?}");
        }
        assert_eq!(
            HandshakeFailure::of_rustls(&Error::HandshakeNotComplete),
            HandshakeFailure::Other
        );
    }
}
