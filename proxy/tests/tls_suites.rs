//! What TLS the inbound port speaks: two sidecars settle AES-128-GCM with
//! SHA-256 (their handshakes hash with SHA-256, which CPUs accelerate);
//! a client that offers only AES-256-GCM is still served, and TLS 1.2 is
//! refused, as `openssl s_client` reports; a sidecar called by hundreds
//! of others resumes every one of their sessions, with X25519 alone after
//! a hybrid X25519MLKEM768 full handshake, and the config that resumes
//! never completes a full handshake.

mod common;

use common::openssl::s_client;
use common::*;

use trellis_proxy::tls::{NotResumed, resuming};

async fn sidecar() -> (Ca, TestInbound, EchoApp) {
    let ca = Ca::new();
    let app = echo_app().await;
    let server = ca.svid(&id("/ns/b/sa/server"));
    let inbound = inbound(app.addr, ca.tls_state(&server, &[])).await;
    (ca, inbound, app)
}

#[tokio::test]
async fn two_sidecars_settle_aes_128_gcm_sha256() {
    let (ca, inbound, _app) = sidecar().await;
    // The client side exactly as an outbound sidecar dials a peer.
    let client = ca.tls_state(&ca.svid(&id("/ns/a/sa/client")), &[]);
    let config = client.client_for(&id("/ns/b/sa/server")).unwrap();
    let stream = tls_connect(inbound.addr, config.full.clone())
        .await
        .unwrap();
    let (_, session) = stream.get_ref();
    assert_eq!(
        session.negotiated_cipher_suite().map(|s| s.suite()),
        Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
    );
    assert_eq!(
        session.negotiated_key_exchange_group().map(|g| g.name()),
        Some(rustls::NamedGroup::X25519MLKEM768)
    );
    assert_eq!(
        session.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
}

#[tokio::test]
async fn a_client_offering_only_aes_256_is_served_with_it() {
    let (ca, inbound, _app) = sidecar().await;
    let client = id("/ns/a/sa/client");
    let args = ["-ciphersuites", "TLS_AES_256_GCM_SHA384"];
    let Some(seen) = s_client(inbound.addr, &ca, &client, &args).await else {
        return;
    };
    assert!(seen.contains("Cipher is TLS_AES_256_GCM_SHA384"), "{seen}");
}

/// A TLS 1.2 client is refused with the alert `protocol_version`, and
/// the sidecar's line says in words that it offered only TLS 1.2, not
/// which TLS 1.3 extension rustls missed.
#[tokio::test]
async fn tls_1_2_is_refused() {
    let (logs, _guard) = common::sidecar::Logs::capture(false);
    let (ca, inbound, app) = sidecar().await;
    let client = id("/ns/a/sa/client");
    let Some(seen) = s_client(inbound.addr, &ca, &client, &["-tls1_2"]).await else {
        return;
    };
    assert!(seen.contains("Cipher is (NONE)"), "{seen}");
    assert!(seen.contains("alert protocol version"), "{seen}");
    let line = logs
        .wait_for(&["inbound handshake failed", "reason=incompatible_peer"])
        .await;
    assert!(
        line.ends_with(
            "error=the client offers only TLS 1.2 or older (no supported_versions extension); \
             Trellis speaks TLS 1.3 only"
        ),
        "{line}"
    );
    assert!(
        inbound.metrics.encode().contains(
            "trellis_handshake_failures_total{direction=\"inbound\",reason=\"incompatible_peer\"} 1\n"
        ),
        "{}",
        inbound.metrics.encode()
    );
    assert_eq!(*app.accepted.borrow(), 0, "the app must not be reached");
}

/// A sidecar called by many others keeps no session state of its own: its
/// session tickets are sealed with a key of its TLS config, so every
/// caller's ticket is good however many callers there are (a cache of
/// sessions on the server, rustls' default, keeps the latest 256, which
/// two tickets for each of 300 callers overflow). Each caller connects
/// once with a full handshake (hybrid key exchange) and once more later
/// with the config that resumes (X25519 alone), and the second connection
/// of every one of them is resumed.
#[tokio::test]
async fn every_one_of_hundreds_of_callers_resumes_its_session() {
    const CALLERS: usize = 300;
    let (ca, inbound, _app) = sidecar().await;
    let server = id("/ns/b/sa/server");
    let configs: Vec<_> = (0..CALLERS)
        .map(|i| {
            let caller = ca.tls_state(&ca.svid(&id(&format!("/ns/a/sa/caller-{i}"))), &[]);
            caller.client_for(&server).unwrap()
        })
        .collect();
    // A round trip lets the caller read the tickets sent after the
    // handshake; the newline makes the bytes plainly not HTTP, so the
    // sidecar forwards them without waiting for more.
    async fn connect(
        addr: std::net::SocketAddr,
        config: std::sync::Arc<rustls::ClientConfig>,
    ) -> Option<(rustls::HandshakeKind, rustls::NamedGroup)> {
        let mut stream = tls_connect(addr, config).await.ok()?;
        assert_eq!(round_trip(&mut stream, b"ping\n").await.unwrap(), b"ping\n");
        let session = stream.get_ref().1;
        Some((
            session.handshake_kind()?,
            session.negotiated_key_exchange_group()?.name(),
        ))
    }
    for config in &configs {
        assert_eq!(
            connect(inbound.addr, config.full.clone()).await,
            Some((
                rustls::HandshakeKind::Full,
                rustls::NamedGroup::X25519MLKEM768
            ))
        );
    }
    let mut full = Vec::new();
    let test = rustls::pki_types::ServerName::try_from("test").unwrap();
    for (i, config) in configs.iter().enumerate() {
        let _reserved = config.tickets.reserve(&test).expect("a ticket is held");
        if resuming(connect(inbound.addr, config.resume.clone())).await
            != Some((rustls::HandshakeKind::Resumed, rustls::NamedGroup::X25519))
        {
            full.push(i);
        }
    }
    assert!(
        full.is_empty(),
        "{} of {CALLERS} callers could not resume, the first {:?}",
        full.len(),
        &full[..full.len().min(5)]
    );
}

/// The config that resumes offers X25519 alone, so it must never begin a
/// session: dialled as the sidecar dials it ([`resuming`]) without a
/// ticket the peer accepts, its handshake ends with [`NotResumed`] before
/// the client's `Finished`, and the app is not reached.
#[tokio::test]
async fn the_resuming_config_refuses_a_full_handshake() {
    let (ca, inbound, app) = sidecar().await;
    let client = ca.tls_state(&ca.svid(&id("/ns/a/sa/client")), &[]);
    let peer = client.client_for(&id("/ns/b/sa/server")).unwrap();
    let test = rustls::pki_types::ServerName::try_from("test").unwrap();
    assert!(
        peer.tickets.reserve(&test).is_none(),
        "no ticket yet: the sidecar would dial with the hybrid config"
    );
    let error = resuming(tls_connect(inbound.addr, peer.resume.clone()))
        .await
        .expect_err("a full handshake on the resuming config");
    assert!(NotResumed::caused(&error), "{error}");
    assert_eq!(*app.accepted.borrow(), 0, "the app must not be reached");
}
