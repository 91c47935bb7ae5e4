//! Who the sidecar's admin port serves what. In a pod it listens on the
//! pod IP and every pod of the cluster reaches it: `/config` is served
//! only over loopback (from inside the pod), and the app's lifecycle hooks
//! only to a request carrying the pod's hook token; the kubelet's and
//! Prometheus's endpoints stay open to all.
//!
//! Here the sidecar's admin port listens on every address and the
//! "other pod" is this machine calling from its own non-loopback address,
//! so the sidecar sees a peer that is not loopback.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use anyhow::Context;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};
use trellis_tests::apps::Handler;
use trellis_tests::http::StatusCode;
use trellis_tests::ports::free_addr;
use trellis_tests::{HttpApp, Mesh, Sidecar, machine};

/// The token the injector would have written into the pod.
const TOKEN: &str = "8f14e45fceea167a5a36dedd4bea2543";
const HEADER: &str = "x-trellis-hook-token";
const HOOK: &str = "/app-health/web/pre-stop";

/// This machine's first IPv4 address that is not loopback, if it has one.
fn machine_address() -> Option<IpAddr> {
    let out = std::process::Command::new("ip")
        .args(["-o", "-4", "addr", "show", "scope", "global"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|line| {
            let mut words = line.split_whitespace();
            words.find(|w| *w == "inet")?;
            let ip: IpAddr = words.next()?.split('/').next()?.parse().ok()?;
            (!ip.is_loopback()).then_some(ip)
        })
}

/// `GET path` from `from` to `to`, with `x-trellis-hook-token: token` if
/// given; the status and body.
async fn get(
    from: IpAddr,
    to: SocketAddr,
    path: &str,
    token: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    let mut tcp = socket
        .connect(to)
        .await
        .with_context(|| format!("connecting from {from} to {to}"))?;
    let token = token.map_or(String::new(), |t| format!("{HEADER}: {t}\r\n"));
    let request = format!("GET {path} HTTP/1.1\r\nHost: {to}\r\n{token}Connection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(crate::SOON, tcp.read_to_end(&mut answer)).await??;
    let answer = String::from_utf8_lossy(&answer);
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {answer:?}"))?;
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((status, body.to_owned()))
}

/// A mesh with the app `web` (listening on every address, as in a pod)
/// behind a sidecar whose admin port listens on every address, with the
/// app's preStop hook `/drain` rewritten to the admin port, the sidecar
/// given `extra` environment.
async fn start(mesh: &Mesh, extra: &[(&str, &str)]) -> anyhow::Result<(HttpApp, Sidecar)> {
    let handler: Handler = Arc::new(|_| Box::pin(async { (StatusCode::OK, "drained".into()) }));
    let app = HttpApp::start_with("web", "0.0.0.0:0".parse()?, handler).await?;
    let port = app.addr().port();
    let probes = json!({(HOOK): {"httpGet": {"port": port, "path": "/drain"}}}).to_string();
    let admin = {
        let free = TcpListener::bind("0.0.0.0:0").await?;
        free.local_addr()?
    };
    let mut builder = mesh
        .sidecar("web")
        .app(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port))
        .preferred_addrs(free_addr(), free_addr(), admin)
        .arg("--app-probes")
        .arg(probes);
    for (key, value) in extra {
        builder = builder.env(key, value);
    }
    let sidecar = builder.start().await?;
    anyhow::ensure!(
        sidecar.admin().addr().ip().is_unspecified(),
        "the admin port {admin} was taken: the sidecar listens on {}",
        sidecar.admin().addr()
    );
    Ok((app, sidecar))
}

/// `/config` names the sidecar's identity, policies, services and control
/// plane: it answers over loopback, and from another address of the
/// machine (another pod) it is refused with 403 saying how to reach it;
/// `/ready` and `/metrics`, which the kubelet and Prometheus use, answer
/// from anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_is_served_over_loopback_only() -> anyhow::Result<()> {
    let Some(elsewhere) = machine_address() else {
        machine::skip("skipped: this machine has no IPv4 address besides loopback");
        return Ok(());
    };
    let mesh = Mesh::start().await?;
    let (_app, sidecar) = start(&mesh, &[("TRELLIS_HOOK_TOKEN", TOKEN)]).await?;
    let port = sidecar.admin().addr().port();
    let loopback = Ipv4Addr::LOCALHOST.into();

    let (status, body) = get(loopback, SocketAddr::new(loopback, port), "/config", None).await?;
    assert_eq!(status, 200, "{body}");
    let config: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(config["identity"], sidecar.identity());

    let to = SocketAddr::new(elsewhere, port);
    let (status, body) = get(elsewhere, to, "/config", None).await?;
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("trellis: forbidden: /config is served on loopback only")
            && body.contains(&format!(
                "kubectl port-forward <pod> {port}, then curl http://127.0.0.1:{port}/config"
            )),
        "{body}"
    );
    assert!(!body.contains(sidecar.identity()), "{body}");

    for path in ["/ready", "/live", "/metrics"] {
        let (status, body) = get(elsewhere, to, path, None).await?;
        assert_eq!(status, 200, "{path}: {body}");
    }
    Ok(())
}

/// The app's preStop hook, rewritten to the admin port, runs for a request
/// carrying the pod's token, from any address (the kubelet's varies with
/// the CNI); without the header or with another token it is refused with
/// 403 naming the header, and the app is not called. The token never
/// reaches the sidecar's log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_runs_only_with_the_pods_token() -> anyhow::Result<()> {
    let Some(elsewhere) = machine_address() else {
        machine::skip("skipped: this machine has no IPv4 address besides loopback");
        return Ok(());
    };
    let mesh = Mesh::start().await?;
    let (app, sidecar) = start(&mesh, &[("TRELLIS_HOOK_TOKEN", TOKEN)]).await?;
    let to = SocketAddr::new(elsewhere, sidecar.admin().addr().port());

    let (status, body) = get(elsewhere, to, HOOK, None).await?;
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("with the pod's hook token in the x-trellis-hook-token header"),
        "{body}"
    );
    let wrong = "0".repeat(TOKEN.len());
    let (status, body) = get(elsewhere, to, HOOK, Some(&wrong)).await?;
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("the x-trellis-hook-token header does not carry the pod's hook token"),
        "{body}"
    );
    assert!(app.requests().is_empty(), "{:?}", app.requests());

    let (status, body) = get(elsewhere, to, HOOK, Some(TOKEN)).await?;
    assert_eq!(status, 200, "{body}");
    let requests = app.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(requests[0].path, "/drain");
    assert!(requests[0].headers.get(HEADER).is_none(), "{requests:?}");

    assert!(!sidecar.log().contains(TOKEN), "{}", sidecar.log());
    Ok(())
}

/// A pod injected before hook tokens has none in its sidecar's
/// environment: its hook runs as it did, for any caller, and the sidecar
/// says so once, at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_a_hook_runs_as_before_with_a_warning() -> anyhow::Result<()> {
    let Some(elsewhere) = machine_address() else {
        machine::skip("skipped: this machine has no IPv4 address besides loopback");
        return Ok(());
    };
    let mesh = Mesh::start().await?;
    let (app, sidecar) = start(&mesh, &[]).await?;
    let to = SocketAddr::new(elsewhere, sidecar.admin().addr().port());
    for _ in 0..2 {
        let (status, body) = get(elsewhere, to, HOOK, None).await?;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(app.requests().len(), 2);
    let warning = "no --hook-token: the app's lifecycle hooks on the admin port run for any caller";
    let log = sidecar.log();
    assert_eq!(log.matches(warning).count(), 1, "{log}");
    assert!(log.contains(HOOK), "{log}");
    Ok(())
}

/// Writes `request` on a new connection to `admin` and reads every answer
/// up to the close, within `within`.
async fn answers_to(
    admin: SocketAddr,
    request: &[u8],
    within: std::time::Duration,
) -> anyhow::Result<String> {
    let mut tcp = tokio::net::TcpStream::connect(admin)
        .await
        .with_context(|| format!("connecting to the admin port {admin}"))?;
    tcp.write_all(request).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(within, tcp.read_to_end(&mut answer))
        .await
        .with_context(|| format!("{admin} did not close the connection within {within:?}"))??;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// The status lines of `answer`'s answers, in order.
fn statuses(answer: &str) -> Vec<&str> {
    answer
        .split("HTTP/1.1 ")
        .skip(1)
        .map(|a| a.split("\r\n").next().unwrap_or_default())
        .collect()
}

/// On a kept-alive connection to the sidecar's admin port, the head after
/// a chunked request body is read and checked as any later head is: a
/// malformed one is answered in words with `trellis-proxy-error:
/// invalid_request`, one begun and not whole within 5 s 408 with
/// `request_timeout`, each counted and logged once. The port reads no
/// body, and hyper keeps a connection after an answer only when it can
/// skip the rest of the body at once: the bodies here are empty
/// (`0\r\n\r\n`), the 405 of a `POST /live` answered first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_head_after_a_chunked_body_is_checked_on_the_admin_port() -> anyhow::Result<()> {
    use trellis_proxy::admin::MALFORMED;
    const POST: &str =
        "POST /live HTTP/1.1\r\nhost: admin\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n";
    let mesh = Mesh::start().await?;
    let app = HttpApp::start("web").await?;
    let mut sidecar = mesh.sidecar("web").app(app.addr()).start().await?;
    let admin = sidecar.admin().addr();

    let malformed = format!("{POST}GET /live HTTP/1.1\r\nhost: admin\r\nbroken line\r\n\r\n");
    let answer = answers_to(admin, malformed.as_bytes(), crate::SOON).await?;
    assert_eq!(
        statuses(&answer),
        ["405 Method Not Allowed", "400 Bad Request"],
        "{answer}"
    );
    let refused = answer.split("HTTP/1.1 ").nth(2).unwrap_or_default();
    assert!(
        refused.contains("\r\ntrellis-proxy-error: invalid_request\r\n"),
        "{answer}"
    );
    assert!(
        refused.ends_with(
            "\r\n\r\ntrellis: malformed header line: not a field name and a colon (a line \
             without a colon, or a space before it)\n"
        ),
        "{answer}"
    );
    let line = sidecar.wait_for_log(MALFORMED, crate::SOON).await?;
    assert!(line.contains("not a field name and a colon"), "{line}");
    assert!(!line.contains("status only"), "answered in words: {line}");
    let counted = |metrics: trellis_tests::Metrics| {
        metrics.counter(
            "trellis_admin_malformed_requests_total",
            &[("reason", "malformed")],
        )
    };
    assert_eq!(counted(sidecar.metrics().await?), 1.0);

    // A head begun after the body, and not finished: 408 once the port's
    // 5 s for a head have passed.
    let stalled = format!("{POST}GET /live HTTP/1.1\r\nhost: ad");
    let answer = answers_to(admin, stalled.as_bytes(), crate::SOON).await?;
    assert_eq!(
        statuses(&answer),
        ["405 Method Not Allowed", "408 Request Timeout"],
        "{answer}"
    );
    let refused = answer.split("HTTP/1.1 ").nth(2).unwrap_or_default();
    assert!(
        refused.contains("\r\ntrellis-proxy-error: request_timeout\r\n"),
        "{answer}"
    );
    assert!(
        refused.ends_with("\r\n\r\ntrellis: request head did not arrive within 5 s\n"),
        "{answer}"
    );
    assert_eq!(counted(sidecar.metrics().await?), 2.0);
    Ok(())
}
