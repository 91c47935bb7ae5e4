//! [`run`](super::run) against the wall clock, with real certificates
//! that expire in seconds: the data path stops presenting a certificate
//! the second it expires, never a renewed one, and says when it expired.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::watch;
use trellis_core::{SpiffeId, TrustDomain};

use super::TlsState;
use super::testing::{API, at, now_secs};
use crate::identity::Svid;

/// An SVID for `API` signed by `issuer`, valid from a minute ago until
/// `not_after` (Unix seconds).
fn svid_until(issuer: &Issuer<'static, KeyPair>, not_after: u64) -> Arc<Svid> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = super::svid_shape::leaf_params(API);
    params.not_before = at(now_secs() - 60);
    params.not_after = at(not_after);
    let cert = params.signed_by(&key, issuer).unwrap().der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Arc::new(Svid::new(&SpiffeId::parse(API).unwrap(), vec![cert], key).unwrap())
}

/// Waits until the wall clock reads `secs` (Unix seconds).
async fn until(secs: u64) {
    trellis_core::clock::sleep_until(UNIX_EPOCH + Duration::from_secs(secs)).await;
}

/// Waits, at most 10 s, for a state that `holds`.
async fn state_that(
    rx: &mut watch::Receiver<Arc<TlsState>>,
    what: &str,
    holds: impl FnMut(&Arc<TlsState>) -> bool,
) -> Arc<TlsState> {
    tokio::time::timeout(Duration::from_secs(10), rx.wait_for(holds))
        .await
        .unwrap_or_else(|_| panic!("no state {what} within 10 s"))
        .unwrap()
        .clone()
}

/// A renewal that lands a second before the certificate in force expires
/// is kept past that expiry (the timer armed for the old one must not drop
/// it), and arms the timer for its own: once it expires unrenewed the
/// data path has no certificate, saying when it expired; the next
/// certificate serves again.
#[tokio::test]
async fn a_renewal_just_before_expiry_is_kept_and_expires_in_its_turn() {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let root = ca.self_signed(&key).unwrap().der().clone();
    let issuer = Issuer::new(ca, key);

    let base = now_secs();
    let (svid_tx, svid) = watch::channel(Some(svid_until(&issuer, base + 3)));
    let (_bundle_tx, bundle) = watch::channel(Arc::new(vec![root]));
    let (_snapshot_tx, snapshot) = watch::channel(None);
    let (tx, mut rx) = watch::channel(Arc::new(TlsState::default()));
    let td = TrustDomain::new("cluster.local").unwrap();
    tokio::spawn(super::run(td, Vec::new(), svid, bundle, snapshot, tx));
    let has_certificate = |s: &Arc<TlsState>| s.server().is_some();
    state_that(&mut rx, "with a certificate", has_certificate).await;

    until(base + 1).await;
    let renewed = svid_until(&issuer, base + 6);
    svid_tx.send_replace(Some(renewed));
    // Past the first certificate's expiry, before the renewal's.
    until(base + 4).await;
    let state = rx.borrow().clone();
    assert!(
        state.server().is_some() && state.expired_at().is_none(),
        "the renewed certificate was dropped at the first one's expiry"
    );

    let expired = state_that(&mut rx, "without a certificate", |s| s.server().is_none()).await;
    assert!(now_secs() >= base + 6, "dropped before it expired");
    assert_eq!(expired.expired_at(), Some(base + 6));
    let client = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/web").unwrap();
    assert!(expired.client_for(&client).is_none());

    svid_tx.send_replace(Some(svid_until(&issuer, base + 3600)));
    let served = state_that(&mut rx, "with a certificate again", has_certificate).await;
    assert_eq!(served.expired_at(), None);
}
