//! Revoking an identity whose sidecar proves itself with join tokens: the
//! sidecar stops offering its certificate at the first refused renewal and
//! proves its token file instead, so a new token written there enrols it
//! again while the revoked certificate is still valid, without a restart.

use std::time::Duration;

use trellis_tests::{Mesh, Sidecar, eventually};

/// Long enough that a renewal (at about half of it) and a few retries
/// after it end well before the first certificate expires.
const TTL: Duration = Duration::from_secs(60);

/// The serial and expiry (Unix seconds) of the certificate `sidecar` serves,
/// from `/config`.
async fn certificate(sidecar: &Sidecar) -> anyhow::Result<(String, u64)> {
    let config = sidecar.config().await?;
    let expires = config
        .pointer("/certificate/expires_at_unix")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| anyhow::anyhow!("no certificate.expires_at_unix in /config: {config}"))?;
    Ok((sidecar.cert_serial().await?, expires))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_sidecar_takes_a_new_join_token_before_its_certificate_expires()
-> anyhow::Result<()> {
    let mesh = Mesh::builder().cert_ttl(TTL).start().await?;
    let mut web = mesh.sidecar("web").start().await?;
    let id = web.identity().to_string();
    let (revoked_serial, revoked_expiry) = certificate(&web).await?;
    mesh.ctl(["identity", "revoke", id.as_str()]).await?;

    // Its renewal is refused as revoked; the token it started with was
    // used, so it says what to do, and keeps reading the file.
    web.process()
        .wait_for_log(
            "the join token was already used: write a new one to --token-file",
            TTL,
        )
        .await?;
    let token = mesh.token(&id).await?;
    std::fs::write(web.token_file(), token)?;

    let (serial, expiry) = eventually("web to hold a new certificate", TTL, || async {
        let (serial, expiry) = certificate(&web).await?;
        anyhow::ensure!(serial != revoked_serial, "still {serial}");
        anyhow::Ok((serial, expiry))
    })
    .await?;
    // Every certificate lives TTL from its issuance: the new one was issued
    // while the revoked one was still valid, not once it had expired.
    let issued = expiry - TTL.as_secs();
    assert!(
        issued < revoked_expiry,
        "certificate {serial} was issued at {issued}, once the revoked {revoked_serial} had \
         expired at {revoked_expiry}"
    );
    let log = web.process().log();
    let warned = log
        .lines()
        .filter(|l| l.contains("its identity was revoked; proving the token instead"))
        .count();
    assert_eq!(warned, 1, "the revocation is warned about once:\n{log}");
    web.process().ensure_running()?;
    Ok(())
}
