//! A sidecar the control plane refuses a certificate says why in its log,
//! the refusal's gRPC code in words, and keeps retrying; its `/ready`
//! says the same until a Certify succeeds.

use trellis_tests::ports::free_addrs;
use trellis_tests::{Mesh, eventually};

use crate::SOON;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_token_the_control_plane_does_not_know_is_logged_in_words() -> anyhow::Result<()> {
    let mesh = Mesh::start().await?;
    let token = mesh.dir().join("unknown.token");
    std::fs::write(&token, "a-token-trellisctl-never-made")?;
    let mut sidecar = mesh.sidecar("web").token_file(&token).spawn().await?;

    let failed = sidecar.wait_for_log("certify failed", SOON).await?;
    assert!(
        failed.contains("Certify refused: unauthenticated: join token is unknown"),
        "{failed}"
    );
    assert!(!failed.contains("Unauthenticated"), "{failed}");
    assert!(
        !failed.contains("a-token-trellisctl-never-made"),
        "{failed}"
    );
    sidecar.ensure_running()?;
    Ok(())
}

/// `/ready` as curl gets it: the status code and the body.
async fn curl_ready(admin: std::net::SocketAddr) -> anyhow::Result<(String, String)> {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
        .arg(format!("http://{admin}/ready"))
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "curl /ready: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, status) = text.rsplit_once('\n').unwrap_or_default();
    Ok((status.to_string(), body.to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_says_why_the_sidecar_has_no_certificate_until_it_gets_one() -> anyhow::Result<()> {
    let mesh = Mesh::start().await?;
    let token = mesh.dir().join("unknown.token");
    std::fs::write(&token, "a-token-trellisctl-never-made")?;
    let [inbound, outbound, admin] = free_addrs(3)[..] else {
        unreachable!("three addresses were asked for")
    };
    let mut sidecar = mesh
        .sidecar("web")
        .token_file(&token)
        .preferred_addrs(inbound, outbound, admin)
        .spawn()
        .await?;
    sidecar.wait_for_log("certify failed", SOON).await?;

    // What a user who curls the probe, or reads the kubelet's event, sees.
    let (status, body) = eventually("/ready to say why Certify failed", SOON, || async {
        let (status, body) = curl_ready(admin).await?;
        anyhow::ensure!(body.contains("Certify"), "{status} {body}");
        anyhow::Ok((status, body))
    })
    .await?;
    assert_eq!(status, "503", "{body}");
    assert_eq!(
        body.trim_end(),
        "trellis: not ready: no certificate yet: the last Certify failed: \
         Certify refused: unauthenticated: join token is unknown",
    );
    assert!(!body.contains("a-token-trellisctl-never-made"), "{body}");

    // A good token written to the file is taken at the next retry: ready,
    // and the old failure is no longer said.
    let identity = mesh.spiffe_id("default", "web");
    std::fs::write(&token, mesh.token(&identity).await?)?;
    let body = eventually("/ready to answer 200", SOON, || async {
        let (status, body) = curl_ready(admin).await?;
        anyhow::ensure!(status == "200", "{status} {body}");
        anyhow::Ok(body)
    })
    .await?;
    assert_eq!(body, "ready\n");
    sidecar.ensure_running()?;
    Ok(())
}
