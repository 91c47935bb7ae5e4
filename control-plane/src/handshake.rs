//! Which handshake failures each of the control plane's TLS ports counts:
//! the reasons that label `trellis_tls_handshake_failures_total` (the gRPC
//! port) and `trellis_webhook_tls_handshake_failures_total` (the admission
//! webhook port), so every series is known before its first count.
//!
//! The reasons themselves are core's one list
//! ([`trellis_core::tls::HandshakeFailure`]), shared with the sidecar.
//! This module only lists; counting is `crate::metrics`'s.

pub use trellis_core::tls::HandshakeFailure;

use HandshakeFailure as F;

/// The reasons of the gRPC port, in the order its series are written.
pub const GRPC_PORT: &[HandshakeFailure] = &[
    F::Timeout,
    F::NotTls,
    F::Overloaded,
    F::ClientGone,
    F::IoError,
    F::NoClientCertificate,
    F::UnexpectedIdentity,
    F::ForeignTrustDomain,
    F::ExpiredRoot,
    F::ExpiredCertificate,
    F::NotYetValidCertificate,
    F::TrustDomainId,
    F::SvidKeyUsage,
    F::SvidBasicConstraints,
    F::CaUsedAsLeaf,
    F::LeafUsedAsCa,
    F::InvalidSvid,
    F::InvalidCertificate,
    F::UnknownIssuer,
    F::Revoked,
    F::IncompatiblePeer,
    F::AlertReceived,
    F::Other,
];

/// The reasons of the admission webhook port, which asks for no client
/// certificate and queues no handshake.
pub const WEBHOOK_PORT: &[HandshakeFailure] = &[
    F::Timeout,
    F::NotTls,
    F::CertificateRefused,
    F::IoError,
    F::IncompatiblePeer,
    F::AlertReceived,
    F::Other,
];

/// `reason` as a port whose reasons are `port` counts it: itself when
/// listed, else `other`.
pub fn on(reason: HandshakeFailure, port: &[HandshakeFailure]) -> HandshakeFailure {
    if port.contains(&reason) {
        reason
    } else {
        F::Other
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn each_port_lists_a_reason_once_and_ends_with_other() {
        for port in [GRPC_PORT, WEBHOOK_PORT] {
            let tokens: BTreeSet<_> = port.iter().map(|f| f.token()).collect();
            assert_eq!(tokens.len(), port.len(), "{port:?}");
            assert_eq!(port.last(), Some(&F::Other), "{port:?}");
        }
        assert!(!GRPC_PORT.contains(&F::CertificateRefused));
    }

    /// The gRPC port counts whatever core's classifiers name a refused
    /// client certificate or rustls error by under its own series, not
    /// `other`.
    #[test]
    fn the_grpc_port_lists_every_reason_the_classifiers_name() {
        for reason in HandshakeFailure::CLASSIFIED {
            assert!(GRPC_PORT.contains(reason), "{reason}");
            assert_eq!(on(*reason, GRPC_PORT), *reason);
        }
        assert_eq!(on(F::UnknownIssuer, WEBHOOK_PORT), F::Other);
        assert_eq!(
            on(F::CertificateRefused, WEBHOOK_PORT),
            F::CertificateRefused
        );
    }
}
