//! Where pod B's sidecar dials pod B's app for a caller of the mesh: the
//! pod's own address and the port the caller dialled, never loopback. A
//! listener the app keeps on loopback is private to the pod without the
//! mesh, and stays so with it, whatever the policies allow; a listener on
//! every address (or the pod's) is reached, over the family the caller
//! used, as it would be without the mesh. The app's probes, which the
//! kubelet sends to the pod IP, are checked there too.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use serde_json::json;
use trellis_tests::netns::{ADMIN_PORT, APP_UID};

use crate::cluster::{
    APP_PORT, B_GREETING, Cluster, Setup, assert_refused, bare_two_pods, skipped,
};

/// What pod B keeps on loopback: a debug or admin endpoint of its own.
const PRIVATE_PORT: u16 = 8200;
const PRIVATE: &str = "pod-b private endpoint";

/// Starts pod B's app on `bind:port`, answering `body`; returns its index
/// in `cluster.apps`.
async fn b_serves_on(cluster: &mut Cluster, bind: IpAddr, port: u16, body: &str) -> usize {
    let app = cluster
        .b()
        .host()
        .serve_http_on(bind, port, body)
        .await
        .unwrap();
    cluster.apps.push(app);
    cluster.apps.len() - 1
}

/// Asserts that pod A's call to `url` was answered by pod B's sidecar with
/// 502 (nothing listens where it dialled), and that the sidecar logged
/// that it could not reach the app at `dialled`.
async fn assert_app_unreachable(cluster: &mut Cluster, url: &str, dialled: SocketAddr) {
    let reply = cluster.a_calls(url).await.unwrap();
    assert_refused(&reply, 502, "trellis: app unreachable");
    cluster
        .b_logs_inbound_from_a(&[
            "request to the app failed",
            &format!("app={dialled}"),
            "error=refused the connection",
        ])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_on_loopback_in_a_pod_stays_out_of_reach_of_the_mesh() {
    if skipped() {
        return;
    }
    // Every mesh caller is allowed on every port of pod B.
    let mut cluster = bare_two_pods("allow-mesh").await;
    let private = b_serves_on(
        &mut cluster,
        Ipv4Addr::LOCALHOST.into(),
        PRIVATE_PORT,
        PRIVATE,
    )
    .await;
    let public = b_serves_on(
        &mut cluster,
        Ipv4Addr::UNSPECIFIED.into(),
        APP_PORT,
        B_GREETING,
    )
    .await;
    cluster.a_knows_b().await.unwrap();

    // The listener on every address is reached.
    cluster
        .assert_a_reaches_b(cluster.b().host().addr(APP_PORT))
        .await;

    // Pod A's call to the private port, allowed all the same: pod B's
    // sidecar dials pod B's address, where nothing listens on it.
    let b_private = cluster.b().host().addr(PRIVATE_PORT);
    assert_app_unreachable(&mut cluster, &format!("http://{b_private}/"), b_private).await;
    let port = format!("port={PRIVATE_PORT}");
    cluster
        .b_logs_inbound_from_a(&["inbound connection allowed", &port])
        .await;
    let requests = cluster.apps[private].requests();
    assert!(
        requests.is_empty(),
        "the private listener was reached: {requests:?}"
    );

    // The private listener is up, and pod B's own app reaches it.
    let url = format!("http://127.0.0.1:{PRIVATE_PORT}/");
    let reply = cluster
        .b()
        .host()
        .http_get(Some(APP_UID), &url)
        .await
        .unwrap();
    assert_eq!((reply.status, reply.body.as_str()), (200, PRIVATE));
    assert_eq!(cluster.apps[private].requests().len(), 1);

    // Pod B's sidecar called the listener on every address from pod B's
    // own address, not from loopback.
    let requests = cluster.apps[public].requests();
    let pod_b = cluster.b().host().ipv4().to_string();
    assert!(
        requests.len() == 1 && requests[0].starts_with(&format!("{pod_b} ")),
        "{requests:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_over_ipv6_reaches_the_app_on_the_pods_ipv6_address_only() {
    if skipped() {
        return;
    }
    let mut cluster = bare_two_pods("allow-mesh").await;
    let Some(b_ipv6) = cluster.b().host().ipv6() else {
        println!("skipped: IPv6 is off");
        return;
    };
    /// A listener on every IPv4 address only.
    const IPV4_ONLY: u16 = 8300;
    /// A listener on every address of both families.
    const BOTH: u16 = 8181;
    let mut served = Vec::new();
    for (bind, port, body) in [
        (IpAddr::from(Ipv4Addr::LOCALHOST), PRIVATE_PORT, PRIVATE),
        (Ipv4Addr::UNSPECIFIED.into(), IPV4_ONLY, "pod-b on IPv4"),
        (Ipv6Addr::UNSPECIFIED.into(), BOTH, B_GREETING),
    ] {
        served.push(b_serves_on(&mut cluster, bind, port, body).await);
    }
    cluster.a_knows_b().await.unwrap();

    cluster
        .assert_a_reaches_b(SocketAddr::new(b_ipv6.into(), BOTH))
        .await;

    // Loopback is out of reach; so is the IPv4-only listener over IPv6,
    // as it is without the mesh.
    for port in [PRIVATE_PORT, IPV4_ONLY] {
        let dialled = SocketAddr::new(b_ipv6.into(), port);
        assert_app_unreachable(&mut cluster, &format!("http://{dialled}/"), dialled).await;
    }
    for app in &served[..2] {
        let requests = cluster.apps[*app].requests();
        assert!(requests.is_empty(), "reached over IPv6: {requests:?}");
    }
}

/// The kubelet probes the pod IP from outside the pod: the rewritten probe
/// reaches pod B's admin port there, and the sidecar checks the app at the
/// pod IP too, where the kubelet's own probe would have gone. An app that
/// listens only on loopback fails it, as it would without the mesh, rather
/// than being ready for callers that cannot reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_checks_the_app_on_the_pod_ip_as_the_kubelet_would() {
    if skipped() {
        return;
    }
    let probes = json!({
        "/app-health/web/readiness": {"httpGet": {"port": APP_PORT, "path": "/"}},
        "/app-health/debug/readiness": {"tcpSocket": {"port": PRIVATE_PORT}},
    })
    .to_string();
    let mut cluster = Cluster::start(Setup {
        control_plane: &["--default-policy", "allow-mesh"],
        init_b: Some(&[]),
        sidecar_b: &["--app-probes", &probes],
        outside: true,
        ..Setup::default()
    })
    .await
    .unwrap();
    let loopback = Ipv4Addr::LOCALHOST.into();
    b_serves_on(&mut cluster, loopback, PRIVATE_PORT, PRIVATE).await;
    let public = Ipv4Addr::UNSPECIFIED.into();
    b_serves_on(&mut cluster, public, APP_PORT, B_GREETING).await;

    // The kubelet: on the node, outside the pod, calling the pod IP.
    let admin = cluster.b().host().addr(ADMIN_PORT);
    let kubelet = cluster.outside();
    let url = format!("http://{admin}/app-health/web/readiness");
    let reply = kubelet.http_get(None, &url).await.unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    let url = format!("http://{admin}/app-health/debug/readiness");
    let reply = kubelet.http_get(None, &url).await.unwrap();
    let pod_b = cluster.b().host().ipv4();
    assert_refused(
        &reply,
        503,
        &format!("cannot connect to tcp://{pod_b}:{PRIVATE_PORT}"),
    );

    // Asked over loopback, inside the pod, the check goes to loopback.
    let url = format!("http://127.0.0.1:{ADMIN_PORT}/app-health/debug/readiness");
    let reply = cluster.b().host().http_get(None, &url).await.unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
}
