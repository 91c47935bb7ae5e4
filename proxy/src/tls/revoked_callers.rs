//! The verifier of callers refusing a certificate that a revocation of
//! its identity covers, by the rule the post-handshake check applies
//! (`Revocations::check_issued`): refused with `certificate_revoked`,
//! noted for the refusal's line, and a certificate issued after the
//! revocation accepted; and the revocation changes that replace the
//! inbound configs' session-ticket key.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use trellis_core::revocation::{BACKDATE, Revocations};
use trellis_core::tls::{HandshakeFailure, SpiffeClientVerifier, noting_refused, root_store};
use trellis_core::{SpiffeId, TrustDomain};

use super::TlsState;
use super::svid_shape::{key, leaf_params, root};
use crate::identity::Svid;

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
    assert_eq!(HandshakeFailure::of_rustls(&e).token(), "revoked");
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

/// The session-ticket key of `state`'s inbound configs.
fn ticket_key(state: &TlsState) -> Arc<dyn rustls::server::ProducesTickets> {
    let server = state.server().expect("a server config");
    let http = state.http_server().expect("an HTTP server config");
    assert!(Arc::ptr_eq(&server.ticketer, &http.ticketer));
    server.ticketer.clone()
}

/// A state just built (at start-up, or for a new bundle) has sealed no
/// ticket with its key: the revocations of its first snapshot keep that
/// key. A state that may have been in force gets a new key when
/// revocations cover more, as before.
#[test]
fn a_state_just_built_keeps_its_ticket_key_through_its_first_revocations() {
    let (root, issuer) = root();
    let key = key();
    let cert = leaf_params(API).signed_by(&key, &issuer).unwrap();
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let svid = Svid::new(
        &SpiffeId::parse(API).unwrap(),
        vec![cert.der().clone()],
        der,
    )
    .unwrap();
    let td = TrustDomain::new("cluster.local").unwrap();
    let web = SpiffeId::parse(WEB).unwrap();
    let revoked = Arc::new(Revocations::new([(web.clone(), now_secs())]));

    let built = TlsState::build(Some(&svid), &[root], &td, []).unwrap();
    let first = ticket_key(&built);
    let state = built.with_revocations(revoked.clone()).unwrap();
    assert!(
        Arc::ptr_eq(&ticket_key(&state), &first),
        "a new key for a state that sealed nothing"
    );
    assert_eq!(state.revocations(), &revoked);

    // In force: a revocation moved later covers more, and replaces the key.
    let later = Arc::new(Revocations::new([(web, now_secs() + 60)]));
    let state = state
        .with_expected([])
        .unwrap()
        .with_revocations(later)
        .unwrap();
    assert!(
        !Arc::ptr_eq(&ticket_key(&state), &first),
        "the key kept though the revocations cover more"
    );
}
