//! Why a TLS handshake on one of the control plane's TLS ports failed: the
//! one list of reasons that labels `trellis_tls_handshake_failures_total`
//! (the gRPC port) and `trellis_webhook_tls_handshake_failures_total` (the
//! admission webhook port), so every series is known before its first
//! count. This module only classifies; counting is `crate::metrics`'s.

/// Declares [`HandshakeFailure`] from one table of variant and label, so
/// [`HandshakeFailure::ALL`] cannot leave a variant out.
macro_rules! handshake_failures {
    ($($(#[$doc:meta])* $variant:ident = $label:literal,)*) => {
        /// Why a handshake failed, as the metrics label it.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum HandshakeFailure {
            $($(#[$doc])* $variant,)*
        }

        impl HandshakeFailure {
            /// Every reason, in the order of the table.
            pub const ALL: &[HandshakeFailure] = &[$(HandshakeFailure::$variant,)*];

            /// The reason's metric label.
            pub const fn label(self) -> &'static str {
                match self {
                    $(HandshakeFailure::$variant => $label,)*
                }
            }
        }
    };
}

handshake_failures! {
    /// Nothing received, or the handshake not finished, in time.
    Timeout = "timeout",
    /// The client spoke something else than TLS (plaintext HTTP, say).
    NotTls = "not_tls",
    /// Too many handshakes were waiting for their turn.
    Overloaded = "overloaded",
    /// The client left while its handshake waited for its turn.
    ClientGone = "client_gone",
    /// The connection failed under the handshake.
    IoError = "io_error",
    /// The client refused the serving certificate (webhook port).
    CertificateRefused = "certificate_refused",
    /// No client certificate where one is required.
    NoClientCertificate = "no_client_certificate",
    /// A client certificate of another identity than expected.
    UnexpectedIdentity = "unexpected_identity",
    /// A client certificate of another trust domain.
    ForeignTrustDomain = "foreign_trust_domain",
    /// A client certificate whose chain ends at an expired root.
    ExpiredRoot = "expired_root",
    /// An expired client certificate.
    ExpiredCertificate = "expired_certificate",
    /// A client certificate not valid yet: a clock is off.
    NotYetValidCertificate = "not_yet_valid_certificate",
    /// A client certificate naming the trust domain itself.
    TrustDomainId = "trust_domain_id",
    /// A client certificate without an SVID's key usage.
    SvidKeyUsage = "svid_key_usage",
    /// A client certificate without an SVID's basic constraints.
    SvidBasicConstraints = "svid_basic_constraints",
    /// A CA certificate presented as a leaf.
    CaUsedAsLeaf = "ca_used_as_leaf",
    /// A leaf certificate used as a CA.
    LeafUsedAsCa = "leaf_used_as_ca",
    /// A client certificate that is no SVID.
    InvalidSvid = "invalid_svid",
    /// A client certificate refused for another reason.
    InvalidCertificate = "invalid_certificate",
    /// A client certificate from no CA of the trust bundle.
    UnknownIssuer = "unknown_issuer",
    /// A client certificate of a revoked identity.
    Revoked = "revoked",
    /// No protocol version or algorithm in common.
    IncompatiblePeer = "incompatible_peer",
    /// The client ended the handshake with an alert.
    AlertReceived = "alert_received",
    /// Anything else.
    Other = "other",
}

impl HandshakeFailure {
    /// The reasons of the gRPC port: all but the webhook's own.
    pub const GRPC_PORT: &[HandshakeFailure] = &{
        let mut port = [HandshakeFailure::Other; HandshakeFailure::ALL.len() - 1];
        let (mut i, mut at) = (0, 0);
        while i < HandshakeFailure::ALL.len() {
            if !matches!(
                HandshakeFailure::ALL[i],
                HandshakeFailure::CertificateRefused
            ) {
                port[at] = HandshakeFailure::ALL[i];
                at += 1;
            }
            i += 1;
        }
        port
    };

    /// The reasons of the admission webhook port, which asks for no
    /// client certificate and queues no handshake.
    pub const WEBHOOK_PORT: &[HandshakeFailure] = &[
        HandshakeFailure::Timeout,
        HandshakeFailure::NotTls,
        HandshakeFailure::CertificateRefused,
        HandshakeFailure::IoError,
        HandshakeFailure::IncompatiblePeer,
        HandshakeFailure::AlertReceived,
        HandshakeFailure::Other,
    ];

    /// The reason labelled `label` (as `trellis_core::tls::failure_reason`
    /// names a rustls error); `other` for a label not in the list.
    pub fn from_label(label: &str) -> Self {
        Self::ALL
            .iter()
            .copied()
            .find(|failure| failure.label() == label)
            .unwrap_or(Self::Other)
    }

    /// This reason as a port whose reasons are `port` counts it: itself
    /// when listed, else `other`.
    pub fn on(self, port: &[HandshakeFailure]) -> Self {
        if port.contains(&self) {
            self
        } else {
            Self::Other
        }
    }

    /// The reason a rustls error fails a handshake for.
    pub fn of_rustls(e: &rustls::Error) -> Self {
        Self::from_label(trellis_core::tls::failure_reason(e))
    }
}

#[cfg(test)]
mod tests {
    use rustls::{AlertDescription, CertificateError, Error as E};

    use super::*;

    #[test]
    fn labels_are_distinct_and_each_port_ends_with_other() {
        let mut seen = std::collections::BTreeSet::new();
        for failure in HandshakeFailure::ALL {
            assert!(seen.insert(failure.label()), "{failure:?} twice");
            assert_eq!(HandshakeFailure::from_label(failure.label()), *failure);
        }
        for port in [HandshakeFailure::GRPC_PORT, HandshakeFailure::WEBHOOK_PORT] {
            assert!(port.contains(&HandshakeFailure::Other), "{port:?}");
        }
        assert_eq!(
            HandshakeFailure::GRPC_PORT.len(),
            HandshakeFailure::ALL.len() - 1
        );
        assert!(!HandshakeFailure::GRPC_PORT.contains(&HandshakeFailure::CertificateRefused));
    }

    /// What rustls reports is classified by name, not folded into `other`.
    #[test]
    fn rustls_failures_are_classified_by_the_list() {
        for (error, failure) in [
            (
                E::NoCertificatesPresented,
                HandshakeFailure::NoClientCertificate,
            ),
            (
                E::InvalidCertificate(CertificateError::UnknownIssuer),
                HandshakeFailure::UnknownIssuer,
            ),
            (
                E::InvalidCertificate(CertificateError::Expired),
                HandshakeFailure::ExpiredCertificate,
            ),
            (
                E::InvalidCertificate(CertificateError::NotValidYet),
                HandshakeFailure::NotYetValidCertificate,
            ),
            (
                E::InvalidCertificate(CertificateError::Revoked),
                HandshakeFailure::Revoked,
            ),
            (
                E::InvalidCertificate(CertificateError::BadEncoding),
                HandshakeFailure::InvalidCertificate,
            ),
            (
                E::AlertReceived(AlertDescription::HandshakeFailure),
                HandshakeFailure::AlertReceived,
            ),
            (E::HandshakeNotComplete, HandshakeFailure::Other),
        ] {
            assert_eq!(HandshakeFailure::of_rustls(&error), failure, "{error}");
        }
        assert_eq!(
            HandshakeFailure::from_label("a_reason_never_heard_of"),
            HandshakeFailure::Other
        );
        assert_eq!(
            HandshakeFailure::UnknownIssuer.on(HandshakeFailure::WEBHOOK_PORT),
            HandshakeFailure::Other
        );
    }
}
