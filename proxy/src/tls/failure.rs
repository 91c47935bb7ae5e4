//! Which handshake failures the sidecar counts in each direction, and how
//! it names the I/O error a handshake ended with.
//!
//! The reasons themselves are core's one list
//! ([`trellis_core::tls::HandshakeFailure`]), shared with the control
//! plane; the metrics make each of the lists here at 0 in its direction.

use std::io;

pub use trellis_core::tls::HandshakeFailure;

use crate::metrics::{INBOUND, OUTBOUND};

use HandshakeFailure as F;

/// The reasons either direction can count: core's classifiers
/// ([`HandshakeFailure::CLASSIFIED`]) and what a sidecar meets on both
/// sides of a handshake.
const EITHER_DIRECTION: [HandshakeFailure; 23] = [
    F::NotTls,
    F::NoClientCertificate,
    F::UnknownIssuer,
    F::ExpiredRoot,
    F::UnexpectedIdentity,
    F::ForeignTrustDomain,
    F::SvidKeyUsage,
    F::SvidBasicConstraints,
    F::TrustDomainId,
    F::CaUsedAsLeaf,
    F::LeafUsedAsCa,
    F::InvalidSvid,
    F::InvalidCertificate,
    F::Timeout,
    F::IncompatiblePeer,
    F::ExpiredCertificate,
    F::NotYetValidCertificate,
    F::Revoked,
    F::NoLocalCertificate,
    F::AlertReceived,
    F::Closed,
    F::Io,
    F::Other,
];

/// The reasons an inbound handshake can fail for: a caller's resumption
/// with a ticket no longer accepted ([`F::NotResumed`]), and a caller past
/// the handshake limits ([`F::Overloaded`]), besides either direction's.
pub const INBOUND_REASONS: [HandshakeFailure; 25] =
    joined(EITHER_DIRECTION, [F::NotResumed, F::Overloaded]);

/// The reasons an outbound dial can fail for: a server whose sidecar has
/// no certificate yet, and the alerts a server's sidecar refuses this
/// sidecar's certificate with once this side's handshake is over (as TLS
/// 1.3 has it), besides either direction's.
pub const OUTBOUND_REASONS: [HandshakeFailure; 34] = joined(
    EITHER_DIRECTION,
    [
        F::PeerNotReady,
        F::AlertCertificateRevoked,
        F::AlertCertificateExpired,
        F::AlertUnknownCa,
        F::AlertCertificateRequired,
        F::AlertBadCertificate,
        F::AlertCertificateUnknown,
        F::AlertAccessDenied,
        F::AlertHandshakeFailure,
        F::AlertInternalError,
        F::AlertOther,
    ],
);

/// `a` then `b`; `N` must be their length together (checked as the
/// constant is evaluated).
const fn joined<const A: usize, const B: usize, const N: usize>(
    a: [HandshakeFailure; A],
    b: [HandshakeFailure; B],
) -> [HandshakeFailure; N] {
    assert!(A + B == N, "the length of a joined list");
    let mut out = [F::Other; N];
    let mut i = 0;
    while i < A {
        out[i] = a[i];
        i += 1;
    }
    while i < N {
        out[i] = b[i - A];
        i += 1;
    }
    out
}

/// The reasons the sidecar counts in `direction` ([`INBOUND`] or
/// [`OUTBOUND`]); none for any other.
pub fn reasons_of(direction: &str) -> &'static [HandshakeFailure] {
    match direction {
        INBOUND => &INBOUND_REASONS,
        OUTBOUND => &OUTBOUND_REASONS,
        _ => &[],
    }
}

/// The I/O error a TLS handshake ended with: the rustls error inside it
/// ([`HandshakeFailure::of_rustls`]), a caller's resumption ended
/// ([`crate::net::ResumptionRefused`]), the connection closed, or
/// [`HandshakeFailure::Io`].
pub fn of_io(e: &io::Error) -> HandshakeFailure {
    if e.get_ref()
        .is_some_and(|inner| inner.is::<crate::net::ResumptionRefused>())
    {
        return F::NotResumed;
    }
    match trellis_core::tls::rustls_error(e) {
        Some(tls) => HandshakeFailure::of_rustls(tls),
        None if e.kind() == io::ErrorKind::UnexpectedEof => F::Closed,
        None => F::Io,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    /// Whatever core's classifiers name a failure by has a series in both
    /// directions, so none falls to a series of its own unlisted; and no
    /// reason is listed twice in a direction.
    #[test]
    fn every_reason_the_classifiers_name_is_listed_in_both_directions() {
        for direction in [INBOUND, OUTBOUND] {
            let listed = reasons_of(direction);
            for reason in HandshakeFailure::CLASSIFIED {
                assert!(listed.contains(reason), "{reason} in {direction}");
            }
            let unique: HashSet<_> = listed.iter().collect();
            assert_eq!(unique.len(), listed.len(), "{direction}");
        }
    }

    #[test]
    fn an_ended_handshake_is_named_by_what_ended_it() {
        let closed = io::Error::new(io::ErrorKind::UnexpectedEof, "eof");
        assert_eq!(of_io(&closed), F::Closed);
        let reset = io::Error::new(io::ErrorKind::ConnectionReset, "reset");
        assert_eq!(of_io(&reset), F::Io);
        let tls = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        assert_eq!(of_io(&tls), F::UnknownIssuer);
    }
}
