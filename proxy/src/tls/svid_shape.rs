//! The verifiers of `trellis_core::tls` and the check of an established
//! connection's peer (`peer_svid`) on certificates that chain to the
//! bundle but are not shaped as the X.509-SVID specification has a leaf:
//! each is refused, in words naming what is wrong, counted under its own
//! reason.

use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use trellis_core::tls::{
    Described, ExpectedServer, HandshakeFailure, SpiffeClientVerifier, SpiffeServerVerifier,
    peer_svid, root_store,
};
use trellis_core::{SpiffeId, TrustDomain};

const API: &str = "spiffe://cluster.local/ns/shop/sa/api";
const KEY_USAGE: &str = "an X.509-SVID leaf's keyUsage holds digitalSignature and neither \
                         keyCertSign nor cRLSign";

pub(super) fn key() -> KeyPair {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
}

pub(super) fn root() -> (CertificateDer<'static>, Issuer<'static, KeyPair>) {
    let key = key();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Trellis root");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key).unwrap();
    (cert.der().clone(), Issuer::new(params, key))
}

/// The fields of a well-formed SVID for `id` (the expired-root tests
/// make their SVIDs from these too).
pub(super) fn leaf_params(id: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params
}

/// What the server verifier, the client verifier and `peer_svid` say of
/// `chain`: the error's words and reason, or "trusted".
fn verdicts(chain: &[CertificateDer<'static>], root: &CertificateDer<'static>) -> [String; 3] {
    let roots = root_store(std::slice::from_ref(root)).unwrap();
    let server = SpiffeServerVerifier::new(
        roots.clone(),
        ExpectedServer::Exact(SpiffeId::parse(API).unwrap()),
    );
    let td = TrustDomain::new("cluster.local").unwrap();
    let client = SpiffeClientVerifier::new(roots, td, true).unwrap();
    let name = ServerName::try_from("api.mesh").unwrap();
    let now = UnixTime::since_unix_epoch(SystemTime::now().duration_since(UNIX_EPOCH).unwrap());
    let words =
        |e: rustls::Error| format!("{} ({})", Described(&e), HandshakeFailure::of_rustls(&e));
    let (leaf, intermediates) = chain.split_first().unwrap();
    [
        server
            .verify_server_cert(leaf, intermediates, &name, &[], now)
            .map_or_else(words, |_| "trusted".into()),
        client
            .verify_client_cert(leaf, intermediates, now)
            .map_or_else(words, |_| "trusted".into()),
        peer_svid(Some(chain)).map_or_else(
            |e| format!("invalid peer certificate: {e} ({})", e.reason()),
            |_| "trusted".into(),
        ),
    ]
}

#[test]
fn a_leaf_not_shaped_as_an_x509_svid_is_refused_naming_what_is_wrong() {
    let (root, issuer) = root();
    let signed =
        |params: CertificateParams| vec![params.signed_by(&key(), &issuer).unwrap().der().clone()];
    assert_eq!(verdicts(&signed(leaf_params(API)), &root), ["trusted"; 3]);

    let mut no_key_usage = leaf_params(API);
    no_key_usage.key_usages = vec![];
    let mut signs_certificates = leaf_params(API);
    signs_certificates.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let mut signs_crls_too = leaf_params(API);
    signs_crls_too.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::CrlSign];
    let mut no_basic_constraints = leaf_params(API);
    no_basic_constraints.is_ca = IsCa::NoCa;
    for (params, refusal) in [
        (
            no_key_usage,
            format!("the certificate has no keyUsage; {KEY_USAGE} (svid_key_usage)"),
        ),
        (
            signs_certificates,
            format!(
                "the certificate has a keyUsage without digitalSignature; {KEY_USAGE} \
                 (svid_key_usage)"
            ),
        ),
        (
            signs_crls_too,
            format!(
                "the certificate has a keyUsage with keyCertSign or cRLSign, a CA's; \
                 {KEY_USAGE} (svid_key_usage)"
            ),
        ),
        (
            no_basic_constraints,
            "the certificate has no basicConstraints; an X.509-SVID leaf carries \
             basicConstraints with cA false (svid_basic_constraints)"
                .to_owned(),
        ),
        (
            leaf_params("spiffe://cluster.local"),
            "spiffe://cluster.local is the trust domain's own ID; an X.509-SVID names a \
             workload, whose ID has a path (trust_domain_id)"
                .to_owned(),
        ),
    ] {
        let refusal = format!("invalid peer certificate: {refusal}");
        assert_eq!(verdicts(&signed(params), &root), [refusal.as_str(); 3]);
    }
}

/// webpki's refusals of a certificate in the wrong part, which rustls
/// writes as webpki's `Debug`, read as words with a reason of their own.
#[test]
fn a_ca_as_the_leaf_or_a_leaf_as_an_issuer_is_refused_in_words() {
    let (root, issuer) = root();
    let mut ca = leaf_params(API);
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let ca = vec![ca.signed_by(&key(), &issuer).unwrap().der().clone()];
    let refusal = "invalid peer certificate: a CA certificate was presented as the leaf; an \
                   X.509-SVID leaf is not a CA (ca_used_as_leaf)";
    assert_eq!(verdicts(&ca, &root), [refusal; 3]);

    // A well-formed SVID that signs another.
    let signer_key = key();
    let mut signer = leaf_params("spiffe://cluster.local/ns/shop/sa/signer");
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "signer");
    signer.distinguished_name = dn;
    let signer_cert = signer.clone().signed_by(&signer_key, &issuer).unwrap();
    let signer = Issuer::new(signer, signer_key);
    let chain = vec![
        leaf_params(API)
            .signed_by(&key(), &signer)
            .unwrap()
            .der()
            .clone(),
        signer_cert.der().clone(),
    ];
    let refusal = "invalid peer certificate: a leaf certificate signed another certificate of \
                   the chain; only a CA may (leaf_used_as_ca)";
    let [server, client, _] = verdicts(&chain, &root);
    assert_eq!([server, client], [refusal; 2]);
}
