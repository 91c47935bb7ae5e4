//! A sidecar the control plane refuses a certificate says why in its log,
//! the refusal's gRPC code in words, and keeps retrying.

use trellis_tests::ports::free_addrs;
use trellis_tests::{ChildProcess, Mesh, Program};

use crate::SOON;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_token_the_control_plane_does_not_know_is_logged_in_words() -> anyhow::Result<()> {
    let mesh = Mesh::start().await?;
    let token = mesh.dir().join("unknown.token");
    std::fs::write(&token, "a-token-trellisctl-never-made")?;
    let [inbound, outbound, admin, app] = free_addrs(4).try_into().expect("four addresses");
    let mut command = mesh.launcher().command(Program::Proxy);
    command
        .arg("--control-plane")
        .arg(mesh.control_plane_addr().to_string())
        .arg("--trust-bundle")
        .arg(mesh.bundle_path())
        .arg("--identity")
        .arg(mesh.spiffe_id("default", "web"))
        .arg("--token-file")
        .arg(&token)
        .arg("--inbound")
        .arg(inbound.to_string())
        .arg("--outbound")
        .arg(outbound.to_string())
        .arg("--admin")
        .arg(admin.to_string())
        .arg("--app")
        .arg(app.to_string());
    let log = mesh.dir().join("sidecar-web.log");
    let mut sidecar = ChildProcess::spawn("sidecar web", command, &log)?;

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
