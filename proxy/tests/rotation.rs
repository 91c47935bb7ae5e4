//! Rotation: a new TLS state handed through the watch channel reaches new
//! connections only; established connections keep working.

mod common;

use std::sync::Arc;

use common::*;
use rustls::pki_types::CertificateDer;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

fn server_leaf(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
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
    let refused = match tls_connect(inbound.addr, old_client).await {
        Err(_) => true,
        Ok(mut s) => round_trip(&mut s, b"c").await.is_err(),
    };
    assert!(refused, "a client of the old CA got through");
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
