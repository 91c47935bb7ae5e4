//! A sidecar the control plane refuses a certificate says why in its log,
//! the refusal's gRPC code in words, and keeps retrying.

use trellis_tests::Mesh;

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
