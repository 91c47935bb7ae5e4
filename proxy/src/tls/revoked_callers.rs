//! The verifier of callers refusing a certificate that a revocation of
//! its identity covers, by the rule the post-handshake check applies
//! (`Revocations::check_issued`): refused with `certificate_revoked`,
//! noted for the refusal's line, and a certificate issued after the
//! revocation accepted; and the revocation changes that replace the
//! inbound configs' session-ticket key.

use std::time::{SystemTime, UNIX_EPOCH};

use rustls::pki_types::{CertificateDer, UnixTime};
use trellis_core::revocation::{BACKDATE, Revocations};
use trellis_core::tls::{SpiffeClientVerifier, failure_reason, noting_refused, root_store};
use trellis_core::{SpiffeId, TrustDomain};

use super::svid_shape::{key, leaf_params, root};

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const API: &str = "spiffe://cluster.local/ns/shop/sa/api";

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test]
async fn a_caller_is_refused_with_certificate_revoked_only_if_issued_by_the_revocation() {
    let (root, issuer) = root();
    let leaf = |id: &str, not_before: i64| -> CertificateDer<'static> {
        let mut params = leaf_params(id);
        params.not_before = time::OffsetDateTime::from_unix_timestamp(not_before).unwrap();
        params.not_after = time::OffsetDateTime::from_unix_timestamp(now_secs() + 3600).unwrap();
        params.signed_by(&key(), &issuer).unwrap().der().clone()
    };
    let roots = root_store(std::slice::from_ref(&root)).unwrap();
    let td = TrustDomain::new("cluster.local").unwrap();
    let verifier = SpiffeClientVerifier::new(roots, td, true).unwrap();
    let web = SpiffeId::parse(WEB).unwrap();
    let revoked_at = now_secs() - 60;
    let revocations = Revocations::new([(web.clone(), revoked_at)]);
    let backdate = BACKDATE.as_secs() as i64;
    let now = UnixTime::now();

    // Issued (notBefore plus the CA's backdating) in the second of the
    // revocation: covered, refused with the alert `certificate_revoked`.
    let covered = leaf(WEB, revoked_at - backdate);
    let (refused, claimed) = noting_refused(async {
        verifier.verify_unrevoked_client_cert(&covered, &[], now, &revocations)
    })
    .await;
    let e = refused.unwrap_err();
    assert_eq!(
        e,
        rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)
    );
    assert_eq!(
        rustls::AlertDescription::from(rustls::CertificateError::Revoked),
        rustls::AlertDescription::CertificateRevoked
    );
    assert_eq!(failure_reason(&e), "revoked");
    let revoked = claimed
        .and_then(|c| c.revoked)
        .expect("the revocation noted");
    assert_eq!(revoked.spiffe_id, web);
    assert_eq!(revoked.revoked_at_unix, revoked_at);
    assert_eq!(revoked.issued_at_unix, revoked_at);

    // Issued a second after it: accepted, as the renewal that follows a
    // revocation's is.
    let after = leaf(WEB, revoked_at + 1 - backdate);
    assert!(
        verifier
            .verify_unrevoked_client_cert(&after, &[], now, &revocations)
            .is_ok()
    );
    // Another identity, and nothing revoked.
    let api = leaf(API, revoked_at - 3600);
    assert!(
        verifier
            .verify_unrevoked_client_cert(&api, &[], now, &revocations)
            .is_ok()
    );
    assert!(
        verifier
            .verify_unrevoked_client_cert(&covered, &[], now, &Revocations::default())
            .is_ok()
    );
}

/// The revocations that make the inbound configs seal with a new ticket
/// key (`TlsState::with_revocations`): those covering a certificate the
/// ones before did not.
#[test]
fn only_revocations_that_cover_more_replace_the_ticket_key() {
    let web = SpiffeId::parse(WEB).unwrap();
    let api = SpiffeId::parse(API).unwrap();
    let none = Revocations::default();
    let web_at = |at: i64| Revocations::new([(web.clone(), at)]);
    let both = Revocations::new([(web.clone(), 100), (api.clone(), 100)]);
    let covers_more = super::covers_more;
    assert!(covers_more(&none, &web_at(100)), "a new revocation");
    assert!(covers_more(&web_at(100), &web_at(101)), "moved later");
    assert!(covers_more(&web_at(100), &both), "another identity");
    assert!(!covers_more(&web_at(100), &web_at(100)), "the same");
    assert!(!covers_more(&web_at(100), &web_at(99)), "moved earlier");
    assert!(!covers_more(&both, &web_at(100)), "one removed");
    assert!(!covers_more(&web_at(100), &none), "all removed");
}
