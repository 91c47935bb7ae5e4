//! Revoked identities: which certificates a revocation covers, one rule for
//! the control plane (which stops them from renewing) and the sidecar
//! (which refuses them as peers).
//!
//! A revocation names a SPIFFE ID and when it was made; it covers every
//! certificate of the ID issued then or before. A certificate's issue time
//! is read from its notBefore, which the CA sets [`BACKDATE`] into the
//! past. This module never decides who may revoke and never logs.

use std::collections::HashMap;
use std::time::Duration;

use rustls::pki_types::CertificateDer;

use crate::spiffe::SpiffeId;

/// How far the control plane's CA sets a certificate's notBefore into the
/// past, against clock skew between peers.
pub const BACKDATE: Duration = Duration::from_secs(30);

/// When a certificate whose notBefore is `not_before_unix` was issued: the
/// CA backdates notBefore by [`BACKDATE`].
pub fn issued_at(not_before_unix: i64) -> i64 {
    not_before_unix.saturating_add(BACKDATE.as_secs() as i64)
}

/// Whether a revocation made at `revoked_at_unix` covers a certificate
/// issued at `issued_at_unix`: it was issued then or before.
pub fn covers(revoked_at_unix: i64, issued_at_unix: i64) -> bool {
    issued_at_unix <= revoked_at_unix
}

/// The revoked identities of a mesh, each with when it was revoked (Unix
/// seconds), as a sidecar holds them to refuse peers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Revocations {
    revoked_at: HashMap<SpiffeId, i64>,
}

/// A peer refused: a revocation of its identity covers its certificate.
/// Its text gives both times in RFC 3339, as `/config` and `trellisctl`
/// show revocations.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "peer {spiffe_id} is revoked: its certificate was issued at {}, at or before the revocation \
     at {}",
    Written(*.issued_at_unix),
    Written(*.revoked_at_unix)
)]
pub struct Revoked {
    pub spiffe_id: SpiffeId,
    pub revoked_at_unix: i64,
    pub issued_at_unix: i64,
}

/// Unix seconds in RFC 3339, or as the number they are when they have no
/// such form (before 1970, past the year 9999).
struct Written(i64);

impl std::fmt::Display for Written {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match crate::clock::rfc3339_checked(self.0) {
            Some(at) => f.write_str(&at),
            None => write!(f, "{} (Unix seconds)", self.0),
        }
    }
}

impl Revocations {
    /// The revocations of `entries` (SPIFFE ID, revoked at); of two for one
    /// ID, the later holds.
    pub fn new(entries: impl IntoIterator<Item = (SpiffeId, i64)>) -> Self {
        let mut revoked_at = HashMap::new();
        for (id, at) in entries {
            revoked_at
                .entry(id)
                .and_modify(|held: &mut i64| *held = (*held).max(at))
                .or_insert(at);
        }
        Revocations { revoked_at }
    }

    pub fn is_empty(&self) -> bool {
        self.revoked_at.is_empty()
    }

    pub fn len(&self) -> usize {
        self.revoked_at.len()
    }

    /// When `id` was revoked; `None` when it is not. With nothing revoked
    /// this is one comparison: no hashing.
    pub fn revoked_at(&self, id: &SpiffeId) -> Option<i64> {
        if self.revoked_at.is_empty() {
            return None;
        }
        self.revoked_at.get(id).copied()
    }

    /// Every revocation, in no order: each SPIFFE ID with when it was
    /// revoked (Unix seconds).
    pub fn iter(&self) -> impl Iterator<Item = (&SpiffeId, i64)> {
        self.revoked_at.iter().map(|(id, at)| (id, *at))
    }

    /// Refuses the peer `id` whose certificate began its validity at
    /// `not_before_unix` when a revocation of `id` covers it. With nothing
    /// revoked this is one comparison: no hashing, no allocation.
    pub fn check_issued(&self, id: &SpiffeId, not_before_unix: i64) -> Result<(), Revoked> {
        match self.revoked_at(id) {
            Some(revoked_at_unix) => check_against(id, revoked_at_unix, not_before_unix),
            None => Ok(()),
        }
    }
}

/// Refuses the peer `id` whose certificate began its validity at
/// `not_before_unix` when the revocation of `id` made at `revoked_at_unix`
/// covers it: [`Revocations::check_issued`] for a revocation looked up
/// already.
pub fn check_against(
    id: &SpiffeId,
    revoked_at_unix: i64,
    not_before_unix: i64,
) -> Result<(), Revoked> {
    let issued_at_unix = issued_at(not_before_unix);
    if !covers(revoked_at_unix, issued_at_unix) {
        return Ok(());
    }
    Err(Revoked {
        spiffe_id: id.clone(),
        revoked_at_unix,
        issued_at_unix,
    })
}

/// [`check_against`] for the peer `id` that presented `leaf`, if it
/// presented one. A certificate whose dates cannot be read, or none, is
/// treated as issued at the beginning of time, so it is refused: the
/// verifier that accepted it read them already.
pub fn check_leaf(
    id: &SpiffeId,
    revoked_at_unix: i64,
    leaf: Option<&CertificateDer<'_>>,
) -> Result<(), Revoked> {
    check_against(id, revoked_at_unix, leaf.map_or(i64::MIN, not_before_of))
}

/// The notBefore of `leaf` (Unix seconds), or the beginning of time when
/// its dates cannot be read: so read, a revocation of its identity covers
/// it.
fn not_before_of(leaf: &CertificateDer<'_>) -> i64 {
    crate::tls::validity_of(leaf).map_or(i64::MIN, |(nb, _)| nb)
}

#[cfg(test)]
mod tests {
    use super::*;

    const REVOKED_AT: i64 = 1_800_000_000;
    const BACK: i64 = BACKDATE.as_secs() as i64;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn revoked() -> Revocations {
        Revocations::new([(id("spiffe://td/ns/a/sa/web"), REVOKED_AT)])
    }

    #[test]
    fn refuses_a_certificate_issued_before_the_revocation() {
        let web = id("spiffe://td/ns/a/sa/web");
        let e = revoked()
            .check_issued(&web, REVOKED_AT - 600 - BACK)
            .unwrap_err();
        assert_eq!(e.spiffe_id, web);
        assert_eq!(e.revoked_at_unix, REVOKED_AT);
        assert_eq!(e.issued_at_unix, REVOKED_AT - 600);
        assert!(e.to_string().contains("revoked"), "{e}");
        assert!(e.to_string().contains("spiffe://td/ns/a/sa/web"), "{e}");
    }

    #[test]
    fn refuses_a_certificate_issued_in_the_second_of_the_revocation() {
        let web = id("spiffe://td/ns/a/sa/web");
        assert!(revoked().check_issued(&web, REVOKED_AT - BACK).is_err());
    }

    #[test]
    fn accepts_a_certificate_issued_after_the_revocation() {
        let web = id("spiffe://td/ns/a/sa/web");
        assert_eq!(revoked().check_issued(&web, REVOKED_AT + 1 - BACK), Ok(()));
    }

    #[test]
    fn reads_the_issue_time_as_the_control_plane_does() {
        // The rule the control plane's renewals apply, from notBefore.
        for not_before in [
            REVOKED_AT - BACK - 1,
            REVOKED_AT - BACK,
            REVOKED_AT - BACK + 1,
        ] {
            let web = id("spiffe://td/ns/a/sa/web");
            assert_eq!(
                revoked().check_issued(&web, not_before).is_err(),
                covers(REVOKED_AT, issued_at(not_before)),
            );
        }
    }

    #[test]
    fn accepts_every_other_identity() {
        let api = id("spiffe://td/ns/a/sa/api");
        assert_eq!(revoked().check_issued(&api, 0), Ok(()));
        assert_eq!(Revocations::default().check_issued(&api, 0), Ok(()));
    }

    #[test]
    fn refuses_a_certificate_whose_dates_cannot_be_read() {
        let web = id("spiffe://td/ns/a/sa/web");
        let garbage = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x01]);
        let e = check_leaf(&web, REVOKED_AT, Some(&garbage)).unwrap_err();
        assert_eq!(e.spiffe_id, web);
        // And a peer that presented none.
        let e = check_leaf(&web, REVOKED_AT, None).unwrap_err();
        assert_eq!(e.spiffe_id, web);
    }

    #[test]
    fn the_later_of_two_revocations_of_one_identity_holds() {
        let web = id("spiffe://td/ns/a/sa/web");
        let both = Revocations::new([(web.clone(), REVOKED_AT), (web.clone(), REVOKED_AT - 100)]);
        assert_eq!(both.revoked_at(&web), Some(REVOKED_AT));
        assert_eq!(both.len(), 1);
    }

    /// The refusal gives both times as people read them; a time without
    /// an RFC 3339 form (an unreadable certificate's) as its number.
    #[test]
    fn the_refusal_writes_its_times_in_rfc_3339() {
        let web = id("spiffe://td/ns/a/sa/web");
        let e = revoked()
            .check_issued(&web, REVOKED_AT - 600 - BACK)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "peer spiffe://td/ns/a/sa/web is revoked: its certificate was issued at \
             2027-01-15T07:50:00Z, at or before the revocation at 2027-01-15T08:00:00Z"
        );
        let e = check_leaf(&web, REVOKED_AT, None).unwrap_err();
        let unreadable = format!("issued at {} (Unix seconds),", i64::MIN + BACK);
        assert!(e.to_string().contains(&unreadable), "{e}");
    }
}
