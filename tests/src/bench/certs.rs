//! The one set of credentials every contender uses, made once per run with
//! rcgen: an ECDSA P-256 root CA and two P-256 leaves (client and server
//! side of a pair) whose only URI SAN is a SPIFFE ID. Written as PEM files
//! that Envoy, HAProxy and stunnel read; the CA is also handed to the
//! Trellis control plane (`--ca-cert`/`--ca-key`) so Trellis's SVIDs chain
//! to the same root and are signed with the same key type.

use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// The trust domain of every identity in the benchmark.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// The SPIFFE ID of the client-side proxy.
pub const CLIENT_ID: &str = "spiffe://cluster.local/ns/bench/sa/client";

/// The SPIFFE ID of the server-side proxy.
pub const SERVER_ID: &str = "spiffe://cluster.local/ns/bench/sa/server";

/// Where the PEM files of one side are.
#[derive(Clone, Debug)]
pub struct LeafFiles {
    pub spiffe_id: &'static str,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Certificate then key in one file (HAProxy's `crt`).
    pub combined: PathBuf,
}

/// The credentials of a run, as files in one directory.
#[derive(Clone, Debug)]
pub struct Credentials {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub client: LeafFiles,
    pub server: LeafFiles,
}

impl Credentials {
    /// Makes the CA and both leaves and writes them into `dir`.
    pub fn generate(dir: &Path) -> anyhow::Result<Credentials> {
        let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::OrganizationName, "Trellis benchmark");
        name.push(DnType::CommonName, "Trellis benchmark root CA");
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names =
            vec![SanType::URI(format!("spiffe://{TRUST_DOMAIN}").try_into()?)];
        let ca_cert = params.self_signed(&ca_key)?;
        let ca_cert_path = dir.join("ca.pem");
        let ca_key_path = dir.join("ca.key");
        write(&ca_cert_path, &ca_cert.pem())?;
        write(&ca_key_path, &ca_key.serialize_pem())?;
        let issuer = Issuer::new(params, ca_key);
        let client = leaf(dir, "client", CLIENT_ID, &issuer)?;
        let server = leaf(dir, "server", SERVER_ID, &issuer)?;
        Ok(Credentials {
            ca_cert: ca_cert_path,
            ca_key: ca_key_path,
            client,
            server,
        })
    }
}

fn leaf(
    dir: &Path,
    name: &str,
    spiffe_id: &'static str,
    issuer: &Issuer<'_, KeyPair>,
) -> anyhow::Result<LeafFiles> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into()?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, issuer)?;
    let files = LeafFiles {
        spiffe_id,
        cert: dir.join(format!("{name}.crt")),
        key: dir.join(format!("{name}.key")),
        combined: dir.join(format!("{name}.pem")),
    };
    write(&files.cert, &cert.pem())?;
    write(&files.key, &key.serialize_pem())?;
    write(
        &files.combined,
        &format!("{}{}", cert.pem(), key.serialize_pem()),
    )?;
    Ok(files)
}

fn write(path: &Path, pem: &str) -> anyhow::Result<()> {
    std::fs::write(path, pem).with_context(|| format!("cannot write {}", path.display()))
}
