//! A CA root rotation, as the operator runs it, reaches running sidecars
//! without a restart and without dropping a request: the new root is added
//! to the trust bundle, certificates move to it while both roots are
//! trusted, then the old root is removed and what it signed is refused.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName};
use trellis_tests::probes::{self, ClientIdentity};
use trellis_tests::{Mesh, Sidecar, Traffic, eventually, http};

use crate::{Pair, SOON};

const TRUST_DOMAIN: &str = "cluster.local";

/// The lifetime of every SVID: renewals come every ~10 s, so certificates
/// move to a new signing root soon after the control plane switches.
const CERT_TTL: Duration = Duration::from_secs(20);

/// How long the sidecars may take to hold certificates from a new root: a
/// renewal at half-life after their last certificate, plus a retry if a
/// renewal fell on the restart.
const RENEWAL_PATIENCE: Duration = Duration::from_secs(60);

/// How long the sidecars may take to get a new trust bundle after the
/// control plane restarts: reconnecting their discovery streams.
const BUNDLE_PATIENCE: Duration = Duration::from_secs(30);

/// A self-signed CA as an operator would bring it (`--ca-cert`,
/// `--ca-key`), shaped like the root the control plane generates.
struct Root {
    cert: PathBuf,
    key: PathBuf,
    der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl Root {
    fn generate(dir: &Path, name: &str) -> anyhow::Result<Root> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Trellis");
        dn.push(DnType::CommonName, format!("{name} root CA {TRUST_DOMAIN}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names =
            vec![SanType::URI(format!("spiffe://{TRUST_DOMAIN}").try_into()?)];
        let cert = params.self_signed(&key)?;
        let (cert_path, key_path) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&cert_path, cert.pem())?;
        std::fs::write(&key_path, key.serialize_pem())?;
        Ok(Root {
            cert: cert_path,
            key: key_path,
            der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        })
    }

    /// An X.509-SVID for `spiffe_id` signed by this root, as the control
    /// plane would have issued it.
    fn svid(&self, spiffe_id: &str) -> anyhow::Result<ClientIdentity> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(ClientIdentity {
            chain: vec![cert.der().clone()],
            key: PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        })
    }

    /// The control plane's flags to sign with this root.
    fn signing_flags(&self) -> Vec<PathBuf> {
        ["--ca-cert".into(), self.cert.clone()]
            .into_iter()
            .chain(["--ca-key".into(), self.key.clone()])
            .collect()
    }
}

/// Which of `roots` (by name) the certificate a sidecar serves on its
/// inbound port chains to: a handshake that trusts that root alone
/// completes. (Without a client certificate the sidecar refuses the
/// connection, but only after the client has verified it.)
async fn serving_root(sidecar: &Sidecar, roots: &[(&str, &Root)]) -> anyhow::Result<String> {
    let addr = sidecar.inbound_addr();
    let mut refusals = Vec::new();
    for (name, root) in roots {
        let config = probes::client_config(std::slice::from_ref(&root.der), TRUST_DOMAIN, None)?;
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        let server = ServerName::IpAddress(addr.ip().into());
        match tokio_rustls::TlsConnector::from(config)
            .connect(server, tcp)
            .await
        {
            Ok(_) => return Ok((*name).to_string()),
            Err(e) => refusals.push(format!("{name}: {e}")),
        }
    }
    anyhow::bail!(
        "sidecar {} serves a certificate from none of the roots: {refusals:?}",
        sidecar.name()
    )
}

/// How many roots a sidecar trusts now, from `/config`.
async fn bundle_size(sidecar: &Sidecar) -> anyhow::Result<u64> {
    let config = sidecar.config().await?;
    config
        .get("bundle_size")
        .and_then(serde_json::Value::as_u64)
        .with_context(|| format!("no bundle_size in /config: {config}"))
}

/// Waits until both sidecars trust exactly `size` roots.
async fn wait_for_bundle_size(pair: &Pair, size: u64) -> anyhow::Result<()> {
    for sidecar in [&pair.client, &pair.server] {
        let what = format!("sidecar {} to trust {size} roots", sidecar.name());
        eventually(&what, BUNDLE_PATIENCE, || async {
            let now = bundle_size(sidecar).await?;
            anyhow::ensure!(now == size, "it trusts {now}");
            anyhow::Ok(())
        })
        .await?;
    }
    Ok(())
}

/// The roots the control plane publishes in `bundle.pem`.
fn published_roots(mesh: &Mesh) -> anyhow::Result<BTreeSet<Vec<u8>>> {
    Ok(probes::load_bundle(&mesh.bundle_path())?
        .iter()
        .map(|c| c.to_vec())
        .collect())
}

fn roots(of: &[&Root]) -> BTreeSet<Vec<u8>> {
    of.iter().map(|r| r.der.to_vec()).collect()
}

/// One call from a client that is no sidecar, with a certificate signed by
/// `root`, straight to the server sidecar's inbound port (whose certificate
/// it verifies against `server_roots`): what it got back.
async fn call_certified_by(
    pair: &Pair,
    root: &Root,
    server_roots: &[&Root],
) -> anyhow::Result<probes::Probe> {
    let inbound = pair.server.inbound_addr();
    let client = root.svid(&pair.mesh.spiffe_id("default", "old-root-client"))?;
    let server_roots: Vec<_> = server_roots.iter().map(|r| r.der.clone()).collect();
    let config = probes::client_config(&server_roots, TRUST_DOMAIN, Some(client))?;
    probes::tls(inbound, config, &probes::http_request(inbound)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_rotation_reaches_running_sidecars_and_drops_no_requests() -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("trellis-roots-")
        .tempdir()?;
    let old = Root::generate(dir.path(), "old")?;
    let new = Root::generate(dir.path(), "new")?;

    // The mesh signs with the old root; the sidecars start trusting it
    // (bundle.pem) and calls flow through them until the end.
    let mut mesh = Mesh::builder()
        .trust_domain(TRUST_DOMAIN)
        .cert_ttl(CERT_TTL);
    for arg in old.signing_flags() {
        mesh = mesh.arg(arg);
    }
    let mut pair = Pair::start(mesh.start().await?).await?;
    let traffic = Traffic::start(pair.route(), "/", &pair.api.greeting());

    let rotated = rotate(&mut pair, &old, &new).await;

    let report = traffic.stop().await;
    let mixed_calls = rotated.with_context(|| {
        format!(
            "meanwhile {} requests went through and {} failed, first: {:#?}",
            report.ok(),
            report.errors.len(),
            &report.errors[..report.errors.len().min(5)]
        )
    })?;
    eprintln!(
        "{} requests on new connections, {} on one kept connection; {mixed_calls} calls seen with one side on each root",
        report.ok_new_connections, report.ok_kept_connection,
    );
    assert!(
        report.errors.is_empty(),
        "{} of {} requests failed: {:#?}",
        report.errors.len(),
        report.ok() + report.errors.len() as u64,
        report.errors
    );
    assert!(
        report.ok_new_connections > 0 && report.ok_kept_connection > 0,
        "{report:?}"
    );
    Ok(())
}

/// Runs the rotation from `old` to `new` on a mesh signing with `old`,
/// checking each step; returns how many calls went through while the
/// sidecars were seen serving certificates from different roots.
async fn rotate(pair: &mut Pair, old: &Root, new: &Root) -> anyhow::Result<u32> {
    let route = pair.route();
    let greeting = pair.api.greeting();
    let both = [("new", new), ("old", old)];

    // 0. Before: one root, which signed both sidecars' certificates.
    http::get(route, "/").await?.success()?;
    wait_for_bundle_size(pair, 1).await?;
    for sidecar in [&pair.client, &pair.server] {
        let root = serving_root(sidecar, &both).await?;
        anyhow::ensure!(
            root == "old",
            "{} serves a certificate from the {root} root",
            sidecar.name()
        );
    }

    // 1. The new root is added to the bundle beside the signing one.
    let mut flags = old.signing_flags();
    flags.extend(["--trust-anchors".into(), new.cert.clone()]);
    pair.mesh.restart_control_plane_with_args(&flags).await?;
    anyhow::ensure!(
        published_roots(&pair.mesh)? == roots(&[old, new]),
        "bundle.pem should hold the old and the new root"
    );
    wait_for_bundle_size(pair, 2).await?;
    for sidecar in [&pair.client, &pair.server] {
        // Logs are written by a thread of the sidecar's own, so the line can
        // land a moment after `/config` shows the bundle.
        let what = format!(
            "sidecar {} to log that it took the two-root bundle",
            sidecar.name()
        );
        eventually(&what, SOON, || async {
            anyhow::ensure!(
                sidecar
                    .log()
                    .lines()
                    .any(|l| l.contains("trust bundle updated") && l.contains("roots=2")),
                "not logged yet"
            );
            anyhow::Ok(())
        })
        .await?;
    }
    http::get(route, "/").await?.success()?;

    // 2. The new root signs; the old one is still trusted while the
    // certificates it signed are replaced at their renewal.
    let mut flags = new.signing_flags();
    flags.extend(["--trust-anchors".into(), old.cert.clone()]);
    pair.mesh.restart_control_plane_with_args(&flags).await?;
    anyhow::ensure!(
        published_roots(&pair.mesh)? == roots(&[old, new]),
        "bundle.pem should hold the new and the old root"
    );
    let mixed_calls = AtomicU32::new(0);
    eventually(
        "both sidecars to serve certificates from the new root",
        RENEWAL_PATIENCE,
        || {
            let (pair, both, mixed_calls) = (&*pair, &both, &mixed_calls);
            async move {
                let client = serving_root(&pair.client, both).await?;
                let server = serving_root(&pair.server, both).await?;
                if client != server {
                    // One side on each root: they must still reach each other.
                    http::get(route, "/").await?.success()?;
                    mixed_calls.fetch_add(1, Ordering::Relaxed);
                }
                anyhow::ensure!(
                    client == "new" && server == "new",
                    "client on the {client} root, server on the {server} root"
                );
                anyhow::Ok(())
            }
        },
    )
    .await?;
    for sidecar in [&pair.client, &pair.server] {
        let size = bundle_size(sidecar).await?;
        anyhow::ensure!(
            size == 2,
            "{} trusts {size} roots, not both",
            sidecar.name()
        );
    }
    // Until the old root is removed, what it signed is still accepted.
    let accepted = call_certified_by(pair, old, &[old, new]).await?;
    anyhow::ensure!(
        accepted.handshake_completed && accepted.received_text().contains(&greeting),
        "a client certified by the old root should still reach the app: {accepted:?}"
    );

    // 3. The old root is removed.
    pair.mesh
        .restart_control_plane_with_args(new.signing_flags())
        .await?;
    anyhow::ensure!(
        published_roots(&pair.mesh)? == roots(&[new]),
        "bundle.pem should hold the new root alone"
    );
    wait_for_bundle_size(pair, 1).await?;
    http::get(route, "/").await?.success()?;
    let failures_before = pair.server.inbound_handshake_failures().await?;
    let refused = call_certified_by(pair, old, &[old, new]).await?;
    anyhow::ensure!(
        refused.received.is_empty(),
        "a client certified by the removed root got an answer: {refused:?}"
    );
    eventually("the refused handshake to be counted", SOON, || async {
        let failures = pair.server.inbound_handshake_failures().await?;
        anyhow::ensure!(failures > failures_before, "still {failures}");
        anyhow::Ok(())
    })
    .await?;
    Ok(mixed_calls.into_inner())
}
