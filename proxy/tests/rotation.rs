//! Rotation: a new TLS state handed through the watch channel reaches new
//! connections only; established connections keep working.

mod common;

use std::sync::Arc;

use common::*;
use rustls::pki_types::CertificateDer;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::client::TlsStream;
use trellis_proxy::tls::TlsState;

fn server_leaf(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

/// Whether a connection `dial` makes is refused: its handshake fails, or
/// the first round trip on it does (a TLS 1.3 server refuses a client's
/// certificate after the client has finished its side).
async fn refused(
    dial: impl std::future::Future<Output = std::io::Result<TlsStream<TcpStream>>>,
) -> bool {
    match dial.await {
        Err(_) => true,
        Ok(mut stream) => round_trip(&mut stream, b"refused?").await.is_err(),
    }
}

#[tokio::test]
async fn rotation_keeps_established_connections_and_serves_the_new_certificate() {
    let ca = Ca::new();
    let app = echo_app().await;
    let server = id("/ns/b/sa/server");
    let first = ca.svid(&server);
    let inbound = inbound(app.addr, ca.tls_state(&first, &[])).await;
    let client = ca.client_config(Some((&ca, &id("/ns/a/sa/client"))));

    let mut before = tls_connect(inbound.addr, client.clone()).await.unwrap();
    assert_eq!(round_trip(&mut before, b"one").await.unwrap(), b"one");
    assert_eq!(&server_leaf(&before), &first.chain()[0]);

    let second = ca.svid(&server);
    inbound.tls.send_replace(ca.tls_state(&second, &[]));

    assert_eq!(round_trip(&mut before, b"two").await.unwrap(), b"two");
    let mut after = tls_connect(inbound.addr, client).await.unwrap();
    assert_eq!(round_trip(&mut after, b"three").await.unwrap(), b"three");
    assert_eq!(&server_leaf(&after), &second.chain()[0]);
    assert_ne!(first.serial, second.serial);
}

#[tokio::test]
async fn a_new_trust_bundle_applies_to_new_connections_only() {
    let old_ca = Ca::new();
    let new_ca = Ca::new();
    let app = echo_app().await;
    let server = id("/ns/b/sa/server");
    let inbound = inbound(app.addr, old_ca.tls_state(&old_ca.svid(&server), &[])).await;
    let old_client = old_ca.client_config(Some((&old_ca, &id("/ns/a/sa/client"))));

    let mut established = tls_connect(inbound.addr, old_client.clone()).await.unwrap();
    assert_eq!(round_trip(&mut established, b"a").await.unwrap(), b"a");

    // The mesh moved to a new CA: the sidecar holds a new SVID and trusts
    // only the new root.
    let state = new_ca.tls_state(&new_ca.svid(&server), &[]);
    inbound.tls.send_replace(Arc::clone(&state));

    assert_eq!(round_trip(&mut established, b"b").await.unwrap(), b"b");
    // A client of the old CA is refused now (it rejects the server's new
    // chain, or the server rejects its certificate).
    assert!(
        refused(tls_connect(inbound.addr, old_client)).await,
        "a client of the old CA got through"
    );
    let new_client = new_ca.client_config(Some((&new_ca, &id("/ns/a/sa/client"))));
    let mut fresh = tls_connect(inbound.addr, new_client).await.unwrap();
    assert_eq!(round_trip(&mut fresh, b"d").await.unwrap(), b"d");
}

#[test]
fn new_endpoints_reuse_the_configs_already_built() {
    let ca = Ca::new();
    let a = id("/ns/a/sa/a");
    let b = id("/ns/b/sa/b");
    let state = ca.tls_state(&ca.svid(&id("/ns/me/sa/me")), std::slice::from_ref(&a));
    let next = state.with_expected([&a, &b]).unwrap();
    assert!(Arc::ptr_eq(state.server().unwrap(), next.server().unwrap()));
    assert!(Arc::ptr_eq(
        &state.client_for(&a).unwrap(),
        &next.client_for(&a).unwrap()
    ));
    assert!(next.client_for(&b).is_some());
}

/// The callee's session-ticket key outlives a new certificate of its own
/// under the same trust bundle, as the sidecar's TLS task rebuilds its
/// configs, so its callers go on resuming; with a new bundle (or after a
/// restart) the key is new and the tickets it sealed are refused.
#[tokio::test]
async fn tickets_outlive_a_new_certificate_but_not_a_new_bundle() {
    let ca = Ca::new();
    let app = echo_app().await;
    let server = id("/ns/b/sa/server");
    let (svid_tx, svid_rx) = watch::channel(Some(Arc::new(ca.svid(&server))));
    let (bundle_tx, bundle_rx) = watch::channel(Arc::new(vec![ca.root()]));
    let (_snapshot_tx, snapshot_rx) = watch::channel(None);
    let (state_tx, mut state_rx) = watch::channel(Arc::new(TlsState::default()));
    tokio::spawn(trellis_proxy::tls::run(
        td(),
        Vec::new(),
        svid_rx,
        bundle_rx,
        snapshot_rx,
        state_tx,
    ));
    let mut next_state = async || {
        state_rx.changed().await.unwrap();
        state_rx.borrow_and_update().clone()
    };
    let inbound = inbound(app.addr, next_state().await).await;
    let client = ca.tls_state(&ca.svid(&id("/ns/a/sa/client")), &[]);
    let peer = client.client_for(&server).unwrap();
    // A dial as the sidecar makes it: the hybrid config while no ticket is
    // held, the resuming one (inside `resuming`) with one. The round trip
    // brings the tickets back.
    let dial = async |resume: bool| -> std::io::Result<rustls::HandshakeKind> {
        let mut stream = if resume {
            trellis_proxy::tls::resuming(tls_connect(inbound.addr, peer.resume.clone())).await?
        } else {
            tls_connect(inbound.addr, peer.full.clone()).await?
        };
        assert_eq!(round_trip(&mut stream, b"ping\n").await?, b"ping\n");
        Ok(stream
            .get_ref()
            .1
            .handshake_kind()
            .expect("the handshake is over"))
    };
    assert_eq!(dial(false).await.unwrap(), rustls::HandshakeKind::Full);

    svid_tx.send_replace(Some(Arc::new(ca.svid(&server))));
    inbound.tls.send_replace(next_state().await);
    assert_eq!(
        dial(true).await.unwrap(),
        rustls::HandshakeKind::Resumed,
        "a ticket sealed before the new certificate resumes"
    );

    // A new bundle (the same root, read again).
    bundle_tx.send_replace(Arc::new(vec![ca.root()]));
    inbound.tls.send_replace(next_state().await);
    let refused = dial(true).await.unwrap_err();
    assert!(
        trellis_proxy::tls::NotResumed::caused(&refused),
        "a ticket sealed before the new bundle is refused: {refused}"
    );
    assert_eq!(dial(false).await.unwrap(), rustls::HandshakeKind::Full);
}

/// While `peer`'s credentials are trusted: a full handshake, then a
/// resumed one, each carrying a round trip; both streams, still open.
async fn begin_and_resume(
    inbound: &TestInbound,
    peer: &trellis_proxy::tls::PeerClient,
) -> (TlsStream<TcpStream>, TlsStream<TcpStream>) {
    let mut first = tls_connect(inbound.addr, peer.full.clone()).await.unwrap();
    assert_eq!(round_trip(&mut first, b"one").await.unwrap(), b"one");
    let mut resumed = trellis_proxy::tls::resuming(tls_connect(inbound.addr, peer.resume.clone()))
        .await
        .unwrap();
    assert_eq!(round_trip(&mut resumed, b"two").await.unwrap(), b"two");
    assert_eq!(
        resumed.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed)
    );
    (first, resumed)
}

/// Once `peer`'s chain is no longer trusted: its resumed session is
/// refused once the chain is seen, before the app is dialled, and counted
/// as `reason`; a full handshake is refused by the verifier.
async fn no_longer_trusted(
    inbound: &TestInbound,
    peer: &trellis_proxy::tls::PeerClient,
    reason: &str,
) {
    assert!(
        refused(trellis_proxy::tls::resuming(tls_connect(
            inbound.addr,
            peer.resume.clone()
        )))
        .await,
        "a session of a chain no longer trusted ({reason}) was resumed"
    );
    let counted =
        format!("trellis_handshake_failures_total{{direction=\"inbound\",reason=\"{reason}\"}} 1");
    assert!(
        inbound.metrics.encode().contains(&counted),
        "the refusal was not counted as {reason}:\n{}",
        inbound.metrics.encode()
    );
    assert!(
        refused(tls_connect(inbound.addr, peer.full.clone())).await,
        "a chain no longer trusted ({reason}) was accepted"
    );
}

/// A resumed session brings back the caller's certificate as it was when
/// the session began, and no verifier looks at it again; each resumption
/// is also handed fresh tickets. A caller whose SVID has expired since
/// (one the control plane stopped renewing) must not resume its way in:
/// the sidecar checks the resumed certificate's validity itself.
#[tokio::test]
async fn a_caller_whose_certificate_expired_cannot_resume_its_session() {
    let ca = Ca::new();
    let app = echo_app().await;
    let server = id("/ns/b/sa/server");
    let inbound = inbound(app.addr, ca.tls_state(&ca.svid(&server), &[])).await;
    let caller = id("/ns/a/sa/client");
    let (chain, key) = ca.leaf_valid_for(&caller, time::Duration::seconds(4));
    let expires = trellis_core::tls::validity_of(&chain[0]).unwrap().1;
    let short_lived = trellis_proxy::identity::Svid::new(&caller, chain, key).unwrap();
    let client = ca.tls_state(&short_lived, &[]);
    let peer = client.client_for(&server).unwrap();

    // While the certificate is valid: a full handshake, then a resumed one.
    let (mut first, _resumed) = begin_and_resume(&inbound, &peer).await;

    past(expires).await;

    // Expired: refused resumed or full.
    no_longer_trusted(&inbound, &peer, "expired_certificate").await;
    // The connection made while it was valid is not cut by the check.
    assert_eq!(round_trip(&mut first, b"five").await.unwrap(), b"five");
}

/// A root of the bundle that expires while a caller's session lives: the
/// resumed session brings back a chain no verifier sees again, so the
/// sidecar verifies it once more when a root has expired, and a chain that
/// leads to the expired root is refused (`expired_root`), resumed or full,
/// while one under the other root still resumes.
#[tokio::test]
async fn a_caller_whose_root_expired_cannot_resume_its_session() {
    let retiring = Ca::expiring_in(time::Duration::seconds(4));
    let current = Ca::new();
    let bundle = [retiring.root(), current.root()];
    let root_expires = trellis_core::tls::validity_of(&retiring.root()).unwrap().1;
    let state = |svid: &trellis_proxy::identity::Svid, expected: &[trellis_core::SpiffeId]| {
        Arc::new(TlsState::build(Some(svid), &bundle, &td(), expected).unwrap())
    };
    let app = echo_app().await;
    let server = id("/ns/b/sa/server");
    let inbound = inbound(app.addr, state(&current.svid(&server), &[])).await;
    let old_caller = state(&retiring.svid(&id("/ns/a/sa/old")), &[]);
    let new_caller = state(&current.svid(&id("/ns/a/sa/new")), &[]);
    let (old_peer, new_peer) = (
        old_caller.client_for(&server).unwrap(),
        new_caller.client_for(&server).unwrap(),
    );

    // Both roots valid: each caller begins a session, then resumes it.
    let mut resumed_before = Vec::new();
    for peer in [&old_peer, &new_peer] {
        resumed_before.push(begin_and_resume(&inbound, peer).await.1);
    }

    past(root_expires).await;

    no_longer_trusted(&inbound, &old_peer, "expired_root").await;

    let mut resumed =
        trellis_proxy::tls::resuming(tls_connect(inbound.addr, new_peer.resume.clone()))
            .await
            .expect("a caller under the current root still resumes");
    assert_eq!(round_trip(&mut resumed, b"five").await.unwrap(), b"five");
    // Connections made before the expiry are not cut by the check.
    for stream in &mut resumed_before {
        assert_eq!(round_trip(stream, b"six").await.unwrap(), b"six");
    }
}
