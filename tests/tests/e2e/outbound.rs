//! The transparent outbound port serves connections iptables redirected to
//! it. One made to it directly, as a user trying the sidecar without
//! interception does with curl, names no destination: it is refused, and
//! an HTTP caller is told why instead of getting an empty reply.

use trellis_tests::Mesh;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_to_the_outbound_port_itself_is_told_it_was_not_redirected() -> anyhow::Result<()> {
    let mesh = Mesh::start().await?;
    let sidecar = mesh.sidecar("web").start().await?;

    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "-i"])
        .arg(format!("http://{}/api", sidecar.outbound_addr()))
        .output()
        .await?;
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "curl: {}{answer}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(answer.starts_with("HTTP/1.1 421 "), "{answer}");
    assert!(
        answer.contains("\r\ntrellis-proxy-error: not_redirected\r\n"),
        "{answer}"
    );
    assert!(
        answer.contains("\r\n\r\ntrellis: this is the sidecar's transparent outbound port"),
        "{answer}"
    );
    assert!(answer.contains("--route"), "{answer}");

    let metrics = sidecar.metrics().await?;
    assert_eq!(
        metrics.counter(
            "trellis_connections_total",
            &[("direction", "outbound"), ("outcome", "refused")]
        ),
        1.0
    );
    Ok(())
}
