//! The verifiers of `trellis_core::tls`, as the sidecar builds them from a
//! trust bundle, on real certificates: a root stops anchoring chains the
//! moment it expires, whichever side verifies, and the refusal names it.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use trellis_core::tls::{
    Described, ExpectedServer, HandshakeFailure, SpiffeClientVerifier, SpiffeServerVerifier,
    root_store,
};
use trellis_core::{SpiffeId, TrustDomain};

use super::testing::{API, at, now_secs};

const DAY: u64 = 86_400;

/// A CA's key and certificate fields: named `name`, valid from a day ago
/// until `not_after`.
fn ca_params(name: &str, not_after: u64) -> (KeyPair, CertificateParams) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = at(now_secs() - DAY);
    params.not_after = at(not_after);
    (key, params)
}

/// A root named `name`, valid from a day ago until `not_after`.
fn root(name: &str, not_after: u64) -> (CertificateDer<'static>, Issuer<'static, KeyPair>) {
    let (key, params) = ca_params(name, not_after);
    let cert = params.self_signed(&key).unwrap();
    (cert.der().clone(), Issuer::new(params, key))
}

/// An SVID for `API` signed by `issuer`, valid for ten days.
fn svid(issuer: &Issuer<'static, KeyPair>) -> CertificateDer<'static> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = super::svid_shape::leaf_params(API);
    params.not_before = at(now_secs() - DAY);
    params.not_after = at(now_secs() + 10 * DAY);
    params.signed_by(&key, issuer).unwrap().der().clone()
}

fn unix(secs: u64) -> UnixTime {
    UnixTime::since_unix_epoch(Duration::from_secs(secs))
}

fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").unwrap()
}

/// Both verifiers' answers for `leaf` at `secs`: the error's words, or
/// "trusted".
fn verdicts(
    server: &SpiffeServerVerifier,
    client: &SpiffeClientVerifier,
    leaf: &CertificateDer<'static>,
    secs: u64,
) -> [String; 2] {
    let name = ServerName::try_from("api.mesh").unwrap();
    let words =
        |e: rustls::Error| format!("{} ({})", Described(&e), HandshakeFailure::of_rustls(&e));
    [
        server
            .verify_server_cert(leaf, &[], &name, &[], unix(secs))
            .map_or_else(words, |_| "trusted".into()),
        client
            .verify_client_cert(leaf, &[], unix(secs))
            .map_or_else(words, |_| "trusted".into()),
    ]
}

/// A bundle of two roots, the old one expiring in two days (a rotation's
/// retired root), and an SVID under each, both valid for ten days: until
/// the old root expires both are trusted; from then on the old root's is
/// refused by both verifiers, naming the root, and the new root's still
/// trusted.
#[test]
fn a_root_stops_anchoring_chains_the_moment_it_expires() {
    let expiry = now_secs() + 2 * DAY;
    let (old_root, old) = root("Trellis old root", expiry);
    let (new_root, new) = root("Trellis new root", now_secs() + 365 * DAY);
    let roots = root_store(&[old_root, new_root]).unwrap();
    let server = SpiffeServerVerifier::new(
        roots.clone(),
        ExpectedServer::Exact(SpiffeId::parse(API).unwrap()),
    );
    let client = SpiffeClientVerifier::new(roots, td(), true).unwrap();
    let (under_old, under_new) = (svid(&old), svid(&new));

    for secs in [now_secs(), expiry] {
        assert_eq!(verdicts(&server, &client, &under_old, secs), ["trusted"; 2]);
        assert_eq!(verdicts(&server, &client, &under_new, secs), ["trusted"; 2]);
    }
    for secs in [expiry + 1, expiry + DAY] {
        for verdict in verdicts(&server, &client, &under_old, secs) {
            assert!(
                verdict.starts_with(
                    "invalid peer certificate: the chain ends at root CN=Trellis old root \
                     of the trust bundle, which expired "
                ) && verdict.ends_with("(expired_root)"),
                "{verdict}"
            );
        }
        assert_eq!(verdicts(&server, &client, &under_new, secs), ["trusted"; 2]);
    }

    // A resumed session's chain, which no verifier sees, is verified again
    // only once a root has expired, and then as a full handshake's is.
    let old_chain = [under_old.clone()];
    for verifier_says in [
        server.verify_resumed(&old_chain, unix(expiry)),
        client.verify_resumed(&old_chain, unix(expiry)),
    ] {
        assert!(verifier_says.is_ok(), "{verifier_says:?}");
    }
    for refused in [
        server.verify_resumed(&old_chain, unix(expiry + 1)),
        client.verify_resumed(&old_chain, unix(expiry + 1)),
    ] {
        let refused = refused.unwrap_err();
        assert_eq!(
            HandshakeFailure::of_rustls(&refused).token(),
            "expired_root",
            "{refused}"
        );
    }
    assert!(
        server
            .verify_resumed(std::slice::from_ref(&under_new), unix(expiry + 1))
            .is_ok()
    );
    assert!(
        client
            .verify_resumed(&[under_new], unix(expiry + 1))
            .is_ok()
    );
}

/// A CA under `issuer` named `name`, valid from a day ago until
/// `not_after`.
fn intermediate(
    issuer: &Issuer<'static, KeyPair>,
    name: &str,
    not_after: u64,
) -> (CertificateDer<'static>, Issuer<'static, KeyPair>) {
    let (key, params) = ca_params(name, not_after);
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.der().clone(), Issuer::new(params, key))
}

/// A leaf issued under an intermediate CA can outlive it. Once the
/// intermediate has expired a full handshake refuses the chain, and so
/// does the verification of a resumed session, which no verifier sees
/// otherwise, on both sides; no root has expired meanwhile.
#[test]
fn a_resumed_chain_is_refused_once_its_intermediate_expires() {
    let expiry = now_secs() + 2 * DAY;
    let (root_der, root_issuer) = root("Trellis root", now_secs() + 365 * DAY);
    let (ca_der, ca) = intermediate(&root_issuer, "Trellis intermediate", expiry);
    let leaf = svid(&ca);
    let roots = root_store(&[root_der]).unwrap();
    let server = SpiffeServerVerifier::new(
        roots.clone(),
        ExpectedServer::Exact(SpiffeId::parse(API).unwrap()),
    );
    let client = SpiffeClientVerifier::new(roots, td(), true).unwrap();
    let chain = [leaf, ca_der];

    assert!(server.verify_resumed(&chain, unix(expiry)).is_ok());
    assert!(client.verify_resumed(&chain, unix(expiry)).is_ok());
    for refused in [
        server.verify_resumed(&chain, unix(expiry + 1)),
        client.verify_resumed(&chain, unix(expiry + 1)),
    ] {
        let refused = refused.expect_err("a chain through an expired intermediate resumed");
        assert!(
            Described(&refused).to_string().contains("expired"),
            "{}",
            Described(&refused)
        );
    }
}

/// Once every root has expired nothing is trusted, and the refusal says
/// so; a bundle already in that state is refused when it is loaded, so a
/// sidecar keeps the bundle it has.
#[test]
fn a_bundle_whose_every_root_expired_trusts_nothing_and_is_refused() {
    let expiry = now_secs() + DAY;
    let (only_root, only) = root("Trellis root", expiry);
    let roots = root_store(&[only_root]).unwrap();
    let server = SpiffeServerVerifier::new(roots.clone(), ExpectedServer::AnyIn(td()));
    let client = SpiffeClientVerifier::new(roots, td(), true).unwrap();
    let leaf = svid(&only);
    for verdict in verdicts(&server, &client, &leaf, expiry + 1) {
        assert!(
            verdict.starts_with(
                "invalid peer certificate: every root of the trust bundle has expired, the last "
            ),
            "{verdict}"
        );
    }

    let (expired_root, _) = root("Trellis root", now_secs() - 60);
    let refused = root_store(&[expired_root]).unwrap_err().to_string();
    assert!(
        refused.contains("every root of the trust bundle has expired"),
        "{refused}"
    );
}

/// A foreign root is still "unknown issuer" (no expired root of the
/// bundle leads to it), not mistaken for an expired one.
#[test]
fn a_chain_to_no_root_of_the_bundle_is_still_an_unknown_issuer() {
    let expiry = now_secs() + DAY;
    let (bundle_root, _) = root("Trellis root", expiry);
    let (_, foreign) = root("Another mesh", now_secs() + 365 * DAY);
    let (spare_root, _) = root("Trellis spare root", now_secs() + 365 * DAY);
    let roots = root_store(&[bundle_root, spare_root]).unwrap();
    let server = SpiffeServerVerifier::new(roots.clone(), ExpectedServer::AnyIn(td()));
    let client = SpiffeClientVerifier::new(roots, td(), true).unwrap();
    let leaf = svid(&foreign);
    for verdict in verdicts(&server, &client, &leaf, expiry + 1) {
        assert!(verdict.ends_with("(unknown_issuer)"), "{verdict}");
    }
}
