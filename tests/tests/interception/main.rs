//! Transparent interception end to end, in real network namespaces.
//!
//! Each test stands up its own pod network (see `trellis_tests::netns`): a
//! `wire` namespace with a bridge; a `cp` namespace where the real
//! `trellis-control-plane` listens on 192.0.2.10:15012; pods `pod-a`
//! (192.0.2.1) and `pod-b` (192.0.2.2), in each of which the real
//! `trellis-proxy init` programs iptables and the real sidecar runs as UID
//! 1337; and, where a test needs one, a server `outside` the mesh
//! (192.0.2.100). The apps are unmodified and run as UID 1000:
//! `python3 -m http.server` serves, curl (or python3) calls plain
//! `http://<address>:<port>/`. A raw capture on the bridge shows what
//! crosses the wire. The tests of calls to Kubernetes Services
//! (`services`) run the control plane on the Kubernetes store against the
//! control plane's stand-in API server (`kube_api`, included from its
//! tests), and the sidecars certify with ServiceAccount tokens.
//!
//! Needs root, iproute2, iptables, python3 and setpriv; elsewhere each test
//! writes `skipped: needs root` (or names what is missing) to stderr and
//! passes, except under CI (`CI` set), where it fails.
//! Namespaces and processes are removed after each test, also when it fails.

mod cluster;
mod common;
// The control plane's stand-in for the Kubernetes API server, compiled into
// this test too: one stand-in for both crates, and neither crate's tests
// depend on the other's (this crate depends on the control plane).
#[path = "../../../control-plane/tests/kube_api/mod.rs"]
mod kube_api;
mod pod_address;
mod services;

use std::net::{Ipv6Addr, SocketAddr};

use cluster::{
    APP_PORT, B_GREETING, Cluster, SOON, Setup, assert_only_tls_toward, assert_refused,
    bare_two_pods, contains, counted, outside_cluster, skipped, two_pods,
};
use trellis_tests::netns::Lab;
use trellis_tests::{eventually, netns};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_between_pods_crosses_the_wire_as_mtls_and_names_the_caller() {
    if skipped() {
        return;
    }
    let mut cluster = two_pods("allow-mesh").await;
    cluster.capture().await.unwrap();

    // Pod A's app calls pod B's address and port and gets pod B's answer;
    // both sidecars were on the path, and pod B's knows who called.
    cluster
        .assert_a_reaches_b(cluster.b().host().addr(APP_PORT))
        .await;
    let b_id = cluster.b().identity().to_string();
    cluster
        .a
        .wait_for_sidecar_log(&["outbound connection", &format!("peer={b_id}")], SOON)
        .await
        .unwrap();
    // The app saw its own sidecar as the client, not pod A: a connection
    // from pod B's own address to it.
    let requests = cluster.apps[0].requests();
    let pod_b = cluster.b().host().ipv4().to_string();
    assert!(
        requests.len() == 1 && requests[0].starts_with(&format!("{pod_b} ")),
        "{requests:?}"
    );

    // On the wire: TLS records toward pod B, and no plaintext HTTP at all.
    assert_only_tls_toward(&cluster, cluster.b().host().addr(APP_PORT)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_between_pods_over_ipv6_crosses_the_wire_as_mtls() {
    if skipped() {
        return;
    }
    let mut cluster = bare_two_pods("allow-mesh").await;
    let Some(b_ipv6) = cluster.b().host().ipv6() else {
        trellis_tests::machine::note("skipped: IPv6 is off");
        return;
    };
    // Not the sidecar's default --app port: reaching it shows pod B's
    // sidecar read the IPv6 original destination.
    const PORT: u16 = 8181;
    let b_app = cluster
        .b()
        .host()
        .serve_http_on(Ipv6Addr::UNSPECIFIED.into(), PORT, B_GREETING)
        .await
        .unwrap();
    cluster.apps.push(b_app);
    cluster.capture().await.unwrap();
    cluster.a_knows_b().await.unwrap();

    let b_app_addr = SocketAddr::new(b_ipv6.into(), PORT);
    cluster.assert_a_reaches_b(b_app_addr).await;
    let b_id = cluster.b().identity().to_string();
    // Pod A's sidecar found pod B's IPv6 address among the mesh endpoints.
    cluster
        .a
        .wait_for_sidecar_log(
            &[
                "outbound connection",
                &format!("peer={b_id}"),
                &format!("remote={b_app_addr}"),
            ],
            SOON,
        )
        .await
        .unwrap();
    assert_only_tls_toward(&cluster, b_app_addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_default_deny_blocks_pod_a_to_pod_b() {
    if skipped() {
        return;
    }
    // No policy allows anything and the mesh default is deny.
    let mut cluster = two_pods("deny").await;

    let b_url = format!("http://{}/", cluster.b().host().addr(APP_PORT));
    // Pod A's app is told by pod B's sidecar which policy refused it.
    let reply = cluster.a_calls(&b_url).await.unwrap();
    assert_refused(
        &reply,
        403,
        "trellis: denied by policy default:deny: no policy allows this request",
    );

    cluster
        .b_logs_inbound_from_a(&["inbound connection denied"])
        .await;
    let requests = cluster.apps[0].requests();
    assert!(requests.is_empty(), "the app was reached: {requests:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deny_policy_blocks_pod_a_to_pod_b() {
    if skipped() {
        return;
    }
    let mut cluster = two_pods("allow-mesh").await;
    let b_url = format!("http://{}/", cluster.b().host().addr(APP_PORT));
    let reply = cluster.a_calls(&b_url).await.unwrap();
    assert_eq!(reply.body, B_GREETING);

    // An operator denies pod A on pod B, with the real trellisctl.
    let policy = cluster.lab.dir().join("deny-pod-a.yaml");
    let (a_id, b_id) = (cluster.a.identity(), cluster.b().identity());
    let yaml = format!(
        r#"apiVersion: trellis.io/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: deny-pod-a
  namespace: default
spec:
  selector:
    spiffeIds: ["{b_id}"]
  action: DENY
  rules:
    - from:
        - spiffeId: {a_id}
"#
    );
    std::fs::write(&policy, yaml).unwrap();
    let policy = policy.to_str().unwrap();
    cluster
        .control_plane
        .ctl(&["policy", "apply", "-f", policy])
        .await
        .unwrap();
    eventually("the deny policy to block pod A", SOON, || async {
        match cluster.a_calls(&b_url).await {
            Ok(reply) if reply.status == 403 => Ok(()),
            Ok(reply) => Err(format!("pod B still answered {}", reply.status)),
            Err(e) => Err(format!("{e:#}")),
        }
    })
    .await
    .unwrap();
    // From now on every call is refused before pod B's app, naming the
    // policy.
    let reached = cluster.apps[0].requests().len();
    let reply = cluster.a_calls(&b_url).await.unwrap();
    assert_refused(
        &reply,
        403,
        "trellis: denied by policy default/deny-pod-a rule 0",
    );
    cluster
        .b_logs_inbound_from_a(&["inbound connection denied", "deny-pod-a"])
        .await;
    let requests = cluster.apps[0].requests();
    assert_eq!(requests.len(), reached, "the app was reached: {requests:?}");

    // Without the policy pod A gets through again.
    cluster
        .control_plane
        .ctl(&["policy", "delete", "default/deny-pod-a"])
        .await
        .unwrap();
    eventually("pod A to reach pod B again", SOON, || async {
        match cluster.a_calls(&b_url).await {
            Ok(reply) if reply.status == 200 && reply.body == B_GREETING => Ok(()),
            Ok(reply) => Err(format!("pod B answered {reply:?}")),
            Err(e) => Err(format!("{e:#}")),
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_outside_the_mesh_is_refused_under_outbound_deny() {
    if skipped() {
        return;
    }
    let mut cluster = outside_cluster("deny").await;
    let outside = cluster.outside().addr(APP_PORT);

    let reply = cluster
        .a_calls(&format!("http://{outside}/"))
        .await
        .unwrap();
    let says = format!("outbound call to {outside} refused: {outside} is outside the mesh");
    assert_refused(&reply, 403, &says);
    // An HTTP/2 app (a plaintext gRPC client speaks it so) is told the
    // same on its first request.
    let url = format!("http://{outside}/");
    if let Some(reply) = cluster.a_calls_h2(&url).await.unwrap() {
        assert_refused(&reply, 403, &says);
    }

    cluster
        .a
        .wait_for_sidecar_log(
            &[
                "outbound connection denied",
                "outside the mesh",
                &format!("dst={outside}"),
            ],
            SOON,
        )
        .await
        .unwrap();
    counted(&cluster.a, "outbound", "denied").await;
    let requests = cluster.apps[0].requests();
    assert!(requests.is_empty(), "the server was reached: {requests:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_outside_the_mesh_passes_under_outbound_passthrough() {
    if skipped() {
        return;
    }
    let mut cluster = outside_cluster("passthrough").await;
    let outside = cluster.outside().addr(APP_PORT);

    let reply = cluster
        .a_calls(&format!("http://{outside}/"))
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.body, "hello from outside");

    cluster
        .a
        .wait_for_sidecar_log(
            &[
                "outbound connection passthrough",
                "outside the mesh",
                &format!("dst={outside}"),
            ],
            SOON,
        )
        .await
        .unwrap();
    counted(&cluster.a, "outbound", "passthrough").await;
    // The sidecar dialled from the pod's address.
    let requests = cluster.apps[0].requests();
    let pod_a = cluster.a.host().ipv4().to_string();
    assert!(
        requests.len() == 1 && requests[0].starts_with(&format!("{pod_a} ")),
        "{requests:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn excluded_ports_bypass_the_proxy() {
    if skipped() {
        return;
    }
    const EXCLUDED: u16 = 9090;
    let mut cluster = Cluster::start(Setup {
        control_plane: &["--default-policy", "allow-mesh"],
        init_a: &["--exclude-outbound-ports", "9090"],
        init_b: Some(&["--exclude-ports", "15020,9090"]),
        ..Setup::default()
    })
    .await
    .unwrap();
    cluster.b_serves(APP_PORT, B_GREETING).await;
    cluster.b_serves(EXCLUDED, "pod-b, unmeshed").await;
    cluster.capture().await.unwrap();
    cluster.a_knows_b().await.unwrap();

    // The excluded port: straight from app to app, in plaintext.
    let excluded = cluster.b().host().addr(EXCLUDED);
    let reply = cluster
        .a_calls(&format!("http://{excluded}/"))
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.body, "pod-b, unmeshed");
    let requests = cluster.apps[1].requests();
    let pod_a = cluster.a.host().ipv4().to_string();
    assert!(
        requests.len() == 1 && requests[0].starts_with(&format!("{pod_a} ")),
        "pod B's app should see pod A itself as the client: {requests:?}"
    );
    eventually(
        "plaintext toward the excluded port on the wire",
        SOON,
        || {
            let seen = cluster
                .segments()
                .iter()
                .any(|s| s.dst == excluded && contains(&s.payload, b"GET /"));
            std::future::ready(if seen { Ok(()) } else { Err("not yet") })
        },
    )
    .await
    .unwrap();

    // Any other port still goes through both sidecars.
    cluster
        .assert_a_reaches_b(cluster.b().host().addr(APP_PORT))
        .await;

    let needle = format!(":{EXCLUDED}");
    for pod in [&cluster.a, cluster.b()] {
        let log = pod.sidecar_log();
        let mentions: Vec<&str> = log.lines().filter(|l| l.contains(&needle)).collect();
        assert!(
            mentions.is_empty(),
            "{} saw the excluded port: {mentions:?}",
            pod.identity()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_to_another_pods_sidecar_port_is_refused() {
    if skipped() {
        return;
    }
    let mut cluster = bare_two_pods("allow-mesh").await;
    cluster.a_knows_b().await.unwrap();

    // Redirected into pod B's inbound listener, whose original port is pod
    // B's own outbound listener: a loop, which pod B refuses in the
    // handshake and pod A's sidecar reports to the app.
    let port = netns::OUTBOUND_PORT;
    let target = cluster.b().host().addr(port);
    let reply = cluster.a_calls(&format!("http://{target}/")).await.unwrap();
    assert_refused(
        &reply,
        502,
        &format!("outbound call to {target} refused: dialling {target}: handshake"),
    );
    let b = cluster.b.as_mut().unwrap();
    b.wait_for_sidecar_log(
        &["inbound connection refused", &format!("own port {port}")],
        SOON,
    )
    .await
    .unwrap();
    counted(cluster.b(), "inbound", "loop").await;
}

/// A caller outside the mesh (no sidecar) calling pod B's app port is
/// redirected to pod B's inbound listener, which accepts only mutual TLS:
/// it is told so in an HTTP answer it can show, and pod B's app never sees
/// the call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_outside_the_mesh_is_told_the_pod_accepts_only_mtls() {
    if skipped() {
        return;
    }
    let mut cluster = Cluster::start(Setup {
        control_plane: &["--default-policy", "allow-mesh"],
        init_b: Some(&[]),
        outside: true,
        ..Setup::default()
    })
    .await
    .unwrap();
    cluster.b_serves(APP_PORT, B_GREETING).await;

    let b_url = format!("http://{}/", cluster.b().host().addr(APP_PORT));
    let reply = cluster.outside().http_get(None, &b_url).await.unwrap();
    assert_refused(
        &reply,
        400,
        "trellis: this is a Trellis sidecar's inbound port: it accepts only mutual TLS",
    );
    let requests = cluster.apps[0].requests();
    assert!(requests.is_empty(), "the app was reached: {requests:?}");
    counted(cluster.b(), "inbound", "refused").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_twice_leaves_one_set_of_rules_and_cleanup_leaves_none() {
    if skipped() {
        return;
    }
    let lab = Lab::new().unwrap();
    let pod = lab.host("pod", 1).unwrap();

    pod.init_ok(lab.launcher(), &[]).await.unwrap();
    let once = pod.netns().trellis_nat_rules();
    assert!(!once.is_empty(), "init installed no Trellis rule");
    pod.init_ok(lab.launcher(), &[]).await.unwrap();
    let twice = pod.netns().trellis_nat_rules();
    assert_eq!(twice, once, "a second init changed the rules");

    // One jump into our chains per table, whichever backends hold them.
    let programs: std::collections::BTreeSet<&str> = twice
        .lines()
        .filter_map(|l| l.split_once(": ").map(|(program, _)| program))
        .collect();
    for program in programs {
        for jump in [
            "-A PREROUTING -p tcp -j TRELLIS_INBOUND",
            "-A OUTPUT -p tcp -j TRELLIS_OUTPUT",
        ] {
            let rule = format!("{program}: {jump}");
            let n = twice.lines().filter(|l| *l == rule).count();
            assert_eq!(n, 1, "{rule} appears {n} times:\n{twice}");
        }
    }

    pod.init_ok(lab.launcher(), &["--cleanup"]).await.unwrap();
    let after = pod.netns().trellis_nat_rules();
    assert!(after.is_empty(), "left behind:\n{after}");
}
