//! Why a TLS handshake failed, or a peer was refused as if it had: the one
//! list of reasons the sidecar and the control plane count and log, each
//! with its label token.
//!
//! The classifiers here name a rustls error, a refused SVID or an alert by
//! one of them, so no caller matches tokens. Which reasons a place can
//! count (a sidecar's direction, a control plane's port) is that place's
//! own list, a slice of this enum; this module never counts.

use rustls::CertificateError;

use super::{SvidError, as_svid_error};

crate::tokens! {
    /// Why a handshake failed: the `reason` label of the handshake failure
    /// metrics and of the log lines that report one.
    pub enum HandshakeFailure {
        /// The bytes were not TLS (plaintext HTTP, say).
        NotTls = "not_tls",
        /// The peer presented no certificate where one is required.
        NoClientCertificate = "no_client_certificate",
        /// No root of the trust bundle leads to the peer's certificate.
        UnknownIssuer = "unknown_issuer",
        /// The chain leads only to a root of the bundle that has expired.
        ExpiredRoot = "expired_root",
        /// The peer is not the identity expected of it.
        UnexpectedIdentity = "unexpected_identity",
        /// The peer's SPIFFE ID is of another trust domain.
        ForeignTrustDomain = "foreign_trust_domain",
        /// A leaf without digitalSignature in its keyUsage, or with
        /// keyCertSign or cRLSign.
        SvidKeyUsage = "svid_key_usage",
        /// A leaf without basicConstraints.
        SvidBasicConstraints = "svid_basic_constraints",
        /// The trust domain's own ID for a workload's.
        TrustDomainId = "trust_domain_id",
        /// A CA certificate presented as the leaf.
        CaUsedAsLeaf = "ca_used_as_leaf",
        /// A leaf that signed another certificate of the chain.
        LeafUsedAsCa = "leaf_used_as_ca",
        /// A certificate that is no X.509-SVID: malformed, no single URI SAN,
        /// or one that is no SPIFFE ID.
        InvalidSvid = "invalid_svid",
        /// Any other fault of the peer's certificate.
        InvalidCertificate = "invalid_certificate",
        /// Nothing received, or the handshake not finished, in time.
        Timeout = "timeout",
        /// A TLS 1.2 peer, or one with no cipher suite or key exchange in
        /// common.
        IncompatiblePeer = "incompatible_peer",
        /// The peer's certificate has expired.
        ExpiredCertificate = "expired_certificate",
        /// The peer's certificate is not valid yet by this clock.
        NotYetValidCertificate = "not_yet_valid_certificate",
        /// A revocation covers the peer's certificate.
        Revoked = "revoked",
        /// A sidecar that has no certificate yet.
        NoLocalCertificate = "no_local_certificate",
        /// The peer ended the handshake with a TLS alert.
        AlertReceived = "alert_received",
        /// The peer closed the connection during the handshake (sidecar).
        Closed = "closed",
        /// The connection failed during the handshake, not a TLS error
        /// (sidecar).
        Io = "io",
        /// Any other TLS error.
        Other = "other",
        /// A caller's attempt to resume with a ticket the sidecar no longer
        /// accepts, which it ends and dials again in full.
        NotResumed = "not_resumed",
        /// A caller past the handshake limits, or too many handshakes waiting
        /// for their turn.
        Overloaded = "overloaded",
        /// The server's sidecar has no certificate yet.
        PeerNotReady = "peer_not_ready",
        /// The server's sidecar refused the dialling sidecar's certificate with
        /// the alert `certificate_revoked`, once the dialling side's handshake
        /// was over (as TLS 1.3 has it); so the `alert_` reasons below.
        AlertCertificateRevoked = "alert_certificate_revoked",
        AlertCertificateExpired = "alert_certificate_expired",
        AlertUnknownCa = "alert_unknown_ca",
        AlertCertificateRequired = "alert_certificate_required",
        AlertBadCertificate = "alert_bad_certificate",
        AlertCertificateUnknown = "alert_certificate_unknown",
        AlertAccessDenied = "alert_access_denied",
        AlertHandshakeFailure = "alert_handshake_failure",
        AlertInternalError = "alert_internal_error",
        /// Any other alert.
        AlertOther = "alert_other",
        /// The client left while its handshake waited for its turn (control
        /// plane).
        ClientGone = "client_gone",
        /// The connection failed under the handshake (control plane).
        IoError = "io_error",
        /// The client refused the serving certificate (the control plane's
        /// webhook port).
        CertificateRefused = "certificate_refused",
    }
}

impl HandshakeFailure {
    /// Every reason [`HandshakeFailure::of_rustls`] and
    /// [`SvidError::reason`] can name: each place that classifies with them
    /// lists all of these, so none falls to `other` for want of a series.
    pub const CLASSIFIED: &[HandshakeFailure] = &[
        HandshakeFailure::NoClientCertificate,
        HandshakeFailure::UnexpectedIdentity,
        HandshakeFailure::ForeignTrustDomain,
        HandshakeFailure::ExpiredRoot,
        HandshakeFailure::ExpiredCertificate,
        HandshakeFailure::NotYetValidCertificate,
        HandshakeFailure::TrustDomainId,
        HandshakeFailure::SvidKeyUsage,
        HandshakeFailure::SvidBasicConstraints,
        HandshakeFailure::CaUsedAsLeaf,
        HandshakeFailure::LeafUsedAsCa,
        HandshakeFailure::InvalidSvid,
        HandshakeFailure::InvalidCertificate,
        HandshakeFailure::UnknownIssuer,
        HandshakeFailure::Revoked,
        HandshakeFailure::NotTls,
        HandshakeFailure::IncompatiblePeer,
        HandshakeFailure::AlertReceived,
        HandshakeFailure::Other,
    ];

    /// The reason a rustls error fails a handshake for.
    pub fn of_rustls(e: &rustls::Error) -> Self {
        use rustls::Error as E;
        match e {
            E::NoCertificatesPresented => HandshakeFailure::NoClientCertificate,
            E::InvalidCertificate(CertificateError::Other(other)) => {
                match other.0.downcast_ref::<SvidError>() {
                    Some(svid) => svid.reason(),
                    None => match as_svid_error(other) {
                        Some(svid) => svid.reason(),
                        None => HandshakeFailure::InvalidCertificate,
                    },
                }
            }
            E::InvalidCertificate(CertificateError::Expired)
            | E::InvalidCertificate(CertificateError::ExpiredContext { .. }) => {
                HandshakeFailure::ExpiredCertificate
            }
            // Its holder's clock, or this one, is off by more than the CA
            // backdates: told apart from an expired one.
            E::InvalidCertificate(CertificateError::NotValidYet)
            | E::InvalidCertificate(CertificateError::NotValidYetContext { .. }) => {
                HandshakeFailure::NotYetValidCertificate
            }
            E::InvalidCertificate(CertificateError::UnknownIssuer) => {
                HandshakeFailure::UnknownIssuer
            }
            E::InvalidCertificate(CertificateError::Revoked) => HandshakeFailure::Revoked,
            E::InvalidCertificate(_) => HandshakeFailure::InvalidCertificate,
            E::InvalidMessage(_) => HandshakeFailure::NotTls,
            E::PeerIncompatible(_) => HandshakeFailure::IncompatiblePeer,
            E::AlertReceived(_) => HandshakeFailure::AlertReceived,
            _ => HandshakeFailure::Other,
        }
    }

    /// The reason an alert a server refused the dialler's certificate with,
    /// after the dialler's handshake was over, is counted under.
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

    use rustls::{
        AlertDescription, CertificateError, Error as E, InvalidMessage, PeerIncompatible,
    };

    use super::*;
    use crate::spiffe::SpiffeId;

    #[test]
    fn tokens_are_unique_and_in_snake_case() {
        let tokens: HashSet<_> = HandshakeFailure::ALL.map(HandshakeFailure::token).into();
        assert_eq!(tokens.len(), HandshakeFailure::COUNT);
        for token in tokens {
            assert!(
                token.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                "{token}"
            );
        }
        for (at, reason) in HandshakeFailure::ALL.into_iter().enumerate() {
            assert_eq!(reason as usize, at, "{reason:?}");
        }
        assert_eq!(
            HandshakeFailure::Revoked.token(),
            crate::grpc::REFUSAL_REVOKED
        );
    }

    /// Whatever the classifiers name a refused SVID or a rustls error by is
    /// in [`HandshakeFailure::CLASSIFIED`], the list every place that
    /// counts them makes series for.
    #[test]
    fn the_classifiers_name_only_listed_reasons() {
        let id = |s: &str| SpiffeId::parse(s).unwrap();
        let svid_errors = [
            (SvidError::Malformed("x".into()), "invalid_svid"),
            (SvidError::UriSanCount(2), "invalid_svid"),
            (
                SvidError::ForeignTrustDomain {
                    found: id("spiffe://other/ns/a/sa/b"),
                    expected: id("spiffe://td/ns/a/sa/b").trust_domain(),
                },
                "foreign_trust_domain",
            ),
            (
                SvidError::UnexpectedId {
                    found: id("spiffe://td/ns/a/sa/b"),
                    expected: id("spiffe://td/ns/a/sa/c"),
                },
                "unexpected_identity",
            ),
            (SvidError::NoCertificate, "invalid_svid"),
            (
                SvidError::OutsideValidity {
                    not_before: String::new(),
                    not_after: String::new(),
                },
                "expired_certificate",
            ),
            (
                SvidError::ExpiredRoot {
                    subject: String::new(),
                    not_after: String::new(),
                },
                "expired_root",
            ),
            (
                SvidError::RootsExpired {
                    not_after: String::new(),
                },
                "expired_root",
            ),
            (
                SvidError::NoPath {
                    id: id("spiffe://td/ns/a/sa/b"),
                },
                "trust_domain_id",
            ),
            (SvidError::KeyUsage("x"), "svid_key_usage"),
            (SvidError::BasicConstraints("x"), "svid_basic_constraints"),
            (SvidError::CaAsLeaf, "ca_used_as_leaf"),
            (SvidError::LeafAsCa, "leaf_used_as_ca"),
        ];
        for (e, token) in &svid_errors {
            assert_eq!(e.reason().token(), *token, "{e:?}");
            assert!(HandshakeFailure::CLASSIFIED.contains(&e.reason()), "{e:?}");
        }
        for (e, token) in [
            (E::NoCertificatesPresented, "no_client_certificate"),
            (
                E::InvalidCertificate(CertificateError::Expired),
                "expired_certificate",
            ),
            (
                E::InvalidCertificate(CertificateError::NotValidYet),
                "not_yet_valid_certificate",
            ),
            (
                E::InvalidCertificate(CertificateError::UnknownIssuer),
                "unknown_issuer",
            ),
            (E::InvalidCertificate(CertificateError::Revoked), "revoked"),
            (
                E::InvalidCertificate(CertificateError::BadSignature),
                "invalid_certificate",
            ),
            (
                E::InvalidMessage(InvalidMessage::InvalidContentType),
                "not_tls",
            ),
            (
                E::PeerIncompatible(PeerIncompatible::Tls12NotOffered),
                "incompatible_peer",
            ),
            (
                E::AlertReceived(AlertDescription::HandshakeFailure),
                "alert_received",
            ),
            (E::HandshakeNotComplete, "other"),
        ] {
            let reason = HandshakeFailure::of_rustls(&e);
            assert_eq!(reason.token(), token, "{e:?}");
            assert!(HandshakeFailure::CLASSIFIED.contains(&reason), "{e:?}");
        }
    }

    #[test]
    fn alerts_after_the_handshake_are_named_by_their_description() {
        for (alert, token) in [
            (
                AlertDescription::CertificateRevoked,
                "alert_certificate_revoked",
            ),
            (
                AlertDescription::UnsupportedCertificate,
                "alert_bad_certificate",
            ),
            (AlertDescription::AccessDenied, "alert_access_denied"),
            (AlertDescription::DecodeError, "alert_other"),
        ] {
            assert_eq!(HandshakeFailure::of_alert(alert).token(), token);
        }
    }
}
