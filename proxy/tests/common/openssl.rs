//! `openssl s_client` against a sidecar's inbound port, as an operator
//! checks what a TLS client sees.

use std::net::SocketAddr;

use trellis_core::SpiffeId;

use super::Ca;
use super::machine::skip;

/// What `openssl s_client` printed (stdout, then stderr) after connecting to
/// `inbound` with an SVID for `client` from `ca` and the extra `args`;
/// `None`, after [`skip`]ping with `skipped: openssl not installed`, without
/// openssl.
pub async fn s_client(
    inbound: SocketAddr,
    ca: &Ca,
    client: &SpiffeId,
    args: &[&str],
) -> Option<String> {
    let dir = tempfile::tempdir().unwrap();
    let (chain, key) = ca.leaf(client);
    let (cert_file, key_file, ca_file) = (
        dir.path().join("client.der"),
        dir.path().join("client.key.der"),
        dir.path().join("bundle.pem"),
    );
    std::fs::write(&cert_file, &chain[0]).unwrap();
    std::fs::write(&key_file, key.secret_der()).unwrap();
    std::fs::write(&ca_file, ca.root_pem()).unwrap();
    let connect = inbound.to_string();
    let output = tokio::process::Command::new("openssl")
        .args(["s_client", "-connect", &connect])
        .args(["-cert", cert_file.to_str().unwrap(), "-certform", "DER"])
        .args(["-key", key_file.to_str().unwrap(), "-keyform", "DER"])
        .args(["-CAfile", ca_file.to_str().unwrap()])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await;
    match output {
        Ok(output) => Some(format!(
            "{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            skip("skipped: openssl not installed");
            None
        }
        Err(e) => panic!("openssl: {e}"),
    }
}
