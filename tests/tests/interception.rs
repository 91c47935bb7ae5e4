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
//! crosses the wire.
//!
//! Needs root, iproute2, iptables, python3 and setpriv; elsewhere each test
//! prints `skipped: needs root` (or names what is missing) and passes.
//! Namespaces and processes are removed after each test, also when it fails.

use std::net::{Ipv6Addr, SocketAddr};
use std::time::Duration;

use trellis_tests::netns::{
    APP_UID, Capture, ControlPlane, Host, HttpServer, Lab, Pod, Segment, unavailable,
};
use trellis_tests::{eventually, netns};

/// How long a test waits for something that should happen soon.
const SOON: Duration = Duration::from_secs(20);

/// The port the apps serve on.
const APP_PORT: u16 = 8080;

fn skipped() -> bool {
    match unavailable() {
        Some(reason) => {
            println!("{reason}");
            true
        }
        None => false,
    }
}

/// What a test asks for.
#[derive(Default)]
struct Setup<'a> {
    control_plane: &'a [&'a str],
    init_a: &'a [&'a str],
    /// `None`: no pod B.
    init_b: Option<&'a [&'a str]>,
    outside: bool,
}

/// A running pod network. Fields drop in order: the apps and the capture
/// stop, then each pod's sidecar and namespace, then the control plane and
/// its namespace, then the bridge and the working directory.
struct Cluster {
    apps: Vec<HttpServer>,
    capture: Option<Capture>,
    a: Pod,
    b: Option<Pod>,
    outside: Option<Host>,
    control_plane: ControlPlane,
    lab: Lab,
}

impl Cluster {
    async fn start(setup: Setup<'_>) -> anyhow::Result<Cluster> {
        let lab = Lab::new()?;
        let cp_host = lab.host("cp", 10)?;
        let control_plane = ControlPlane::start(&lab, cp_host, setup.control_plane).await?;
        let outside = if setup.outside {
            Some(lab.host("outside", 100)?)
        } else {
            None
        };
        let a = lab.host("pod-a", 1)?;
        let a = Pod::start(&lab, a, &control_plane, setup.init_a).await?;
        let b = match setup.init_b {
            Some(init) => {
                let b = lab.host("pod-b", 2)?;
                Some(Pod::start(&lab, b, &control_plane, init).await?)
            }
            None => None,
        };
        Ok(Cluster {
            apps: Vec::new(),
            capture: None,
            a,
            b,
            outside,
            control_plane,
            lab,
        })
    }

    fn b(&self) -> &Pod {
        self.b.as_ref().expect("this test has a pod B")
    }

    fn outside(&self) -> &Host {
        self.outside
            .as_ref()
            .expect("this test has an outside host")
    }

    /// Waits until pod A's sidecar has a snapshot that lists both pods at
    /// every address (IPv4, and IPv6 where the pods have it), so it knows
    /// pod B's addresses belong to the mesh.
    async fn a_knows_b(&mut self) -> anyhow::Result<()> {
        let addresses = |pod: &Pod| 1 + usize::from(pod.host().ipv6().is_some());
        let endpoints = addresses(&self.a) + addresses(self.b());
        let endpoints = format!("endpoints={endpoints}");
        self.a
            .wait_for_sidecar_log(&["snapshot applied", &endpoints], SOON)
            .await
            .map(drop)
    }

    /// Pod A's app calls `url` in plain HTTP.
    async fn a_calls(&self, url: &str) -> anyhow::Result<netns::Reply> {
        self.a.host().http_get(Some(APP_UID), url).await
    }

    /// Starts recording the wire.
    async fn capture(&mut self) -> anyhow::Result<()> {
        self.capture = Some(self.lab.capture().await?);
        Ok(())
    }

    fn segments(&self) -> Vec<Segment> {
        self.capture
            .as_ref()
            .expect("the capture was started")
            .segments()
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Whether a payload holds plaintext HTTP.
fn is_plain_http(payload: &[u8]) -> bool {
    contains(payload, b"GET /") || contains(payload, b"HTTP/1.")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_between_pods_crosses_the_wire_as_mtls_and_names_the_caller() {
    if skipped() {
        return;
    }
    let mut cluster = Cluster::start(Setup {
        control_plane: &["--default-policy", "allow-mesh"],
        init_b: Some(&[]),
        ..Setup::default()
    })
    .await
    .unwrap();
    let b_app = cluster
        .b()
        .host()
        .serve_http(APP_PORT, "hello from pod-b")
        .await
        .unwrap();
    cluster.apps.push(b_app);
    cluster.capture().await.unwrap();
    cluster.a_knows_b().await.unwrap();

    // Pod A's app calls pod B's address and port and gets pod B's answer.
    let b_url = format!("http://{}/", cluster.b().host().addr(APP_PORT));
    let reply = cluster.a_calls(&b_url).await.unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.body, "hello from pod-b");

    // Both sidecars were on the path, and pod B's knows who called.
    let a_id = cluster.a.identity().to_string();
    let b_id = cluster.b().identity().to_string();
    let b = cluster.b.as_mut().unwrap();
    let line = b
        .wait_for_sidecar_log(
            &[
                "inbound connection",
                "decision=allow",
                &format!("peer={a_id}"),
            ],
            SOON,
        )
        .await
        .unwrap();
    assert!(line.contains(&format!(":{APP_PORT}")), "{line}");
    cluster
        .a
        .wait_for_sidecar_log(&["outbound connection", &format!("peer={b_id}")], SOON)
        .await
        .unwrap();
    // The app saw its own sidecar as the client, not pod A.
    let requests = cluster.apps[0].requests();
    assert!(
        requests.len() == 1 && requests[0].starts_with("127.0.0.1 "),
        "{requests:?}"
    );

    // On the wire: TLS records toward pod B, and no plaintext HTTP at all.
    assert_only_tls_toward(&cluster, cluster.b().host().addr(APP_PORT)).await;
}

/// Asserts that the capture saw a call to `dst` both ways, that its first
/// bytes toward `dst` are a TLS handshake record, and that no plaintext
/// HTTP crossed the wire at all.
async fn assert_only_tls_toward(cluster: &Cluster, dst: SocketAddr) {
    let what = format!("a call to {dst} in the capture");
    let segments = eventually(&what, SOON, || {
        let segments = cluster.segments();
        let both_ways = segments
            .iter()
            .any(|s| s.dst == dst && !s.payload.is_empty())
            && segments
                .iter()
                .any(|s| s.src == dst && !s.payload.is_empty());
        std::future::ready(match both_ways {
            true => Ok(segments),
            false => Err(format!("{} segments, not both ways yet", segments.len())),
        })
    })
    .await
    .unwrap();
    let first = segments
        .iter()
        .find(|s| s.dst == dst && !s.payload.is_empty())
        .unwrap();
    assert!(
        first.payload.starts_with(&[0x16, 0x03]),
        "the first bytes toward {dst} are not a TLS handshake record: {:?}",
        String::from_utf8_lossy(&first.payload)
    );
    let plain: Vec<&Segment> = segments
        .iter()
        .filter(|s| is_plain_http(&s.payload))
        .collect();
    assert!(plain.is_empty(), "plaintext HTTP on the wire: {plain:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_between_pods_over_ipv6_crosses_the_wire_as_mtls() {
    if skipped() {
        return;
    }
    let mut cluster = Cluster::start(Setup {
        control_plane: &["--default-policy", "allow-mesh"],
        init_b: Some(&[]),
        ..Setup::default()
    })
    .await
    .unwrap();
    let Some(b_ipv6) = cluster.b().host().ipv6() else {
        println!("skipped: IPv6 is off");
        return;
    };
    // Not the sidecar's default --app port: reaching it shows pod B's
    // sidecar read the IPv6 original destination.
    const PORT: u16 = 8181;
    let b_app = cluster
        .b()
        .host()
        .serve_http_on(Ipv6Addr::UNSPECIFIED.into(), PORT, "hello from pod-b")
        .await
        .unwrap();
    cluster.apps.push(b_app);
    cluster.capture().await.unwrap();
    cluster.a_knows_b().await.unwrap();

    let b_app_addr = SocketAddr::new(b_ipv6.into(), PORT);
    let reply = cluster
        .a_calls(&format!("http://{b_app_addr}/"))
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.body, "hello from pod-b");
    let (a_id, b_id) = (
        cluster.a.identity().to_string(),
        cluster.b().identity().to_string(),
    );
    let b = cluster.b.as_mut().unwrap();
    let line = b
        .wait_for_sidecar_log(
            &[
                "inbound connection",
                "decision=allow",
                &format!("peer={a_id}"),
            ],
            SOON,
        )
        .await
        .unwrap();
    assert!(line.contains(&format!(":{PORT}")), "{line}");
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

/// A cluster of two pods under `--default-policy default_policy`, with pod
/// B's app serving on [`APP_PORT`], once pod A knows pod B.
async fn two_pods(default_policy: &str) -> Cluster {
    let mut cluster = Cluster::start(Setup {
        control_plane: &["--default-policy", default_policy],
        init_b: Some(&[]),
        ..Setup::default()
    })
    .await
    .unwrap();
    let b_app = cluster
        .b()
        .host()
        .serve_http(APP_PORT, "hello from pod-b")
        .await
        .unwrap();
    cluster.apps.push(b_app);
    cluster.a_knows_b().await.unwrap();
    cluster
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_default_deny_blocks_pod_a_to_pod_b() {
    if skipped() {
        return;
    }
    // No policy allows anything and the mesh default is deny.
    let mut cluster = two_pods("deny").await;

    let b_url = format!("http://{}/", cluster.b().host().addr(APP_PORT));
    let call = cluster.a_calls(&b_url).await;
    assert!(call.is_err(), "pod A reached pod B: {call:?}");

    let a_id = cluster.a.identity().to_string();
    let b = cluster.b.as_mut().unwrap();
    b.wait_for_sidecar_log(
        &["inbound connection denied", &format!("peer={a_id}")],
        SOON,
    )
    .await
    .unwrap();
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
    assert_eq!(reply.body, "hello from pod-b");

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
            Err(_) => Ok(()),
            Ok(reply) => Err(format!("pod B still answered {}", reply.status)),
        }
    })
    .await
    .unwrap();
    // From now on every call is refused before pod B's app.
    let reached = cluster.apps[0].requests().len();
    let call = cluster.a_calls(&b_url).await;
    assert!(call.is_err(), "pod A reached pod B: {call:?}");
    let a_id = a_id.to_string();
    let b = cluster.b.as_mut().unwrap();
    b.wait_for_sidecar_log(
        &[
            "inbound connection denied",
            &format!("peer={a_id}"),
            "deny-pod-a",
        ],
        SOON,
    )
    .await
    .unwrap();
    let requests = cluster.apps[0].requests();
    assert_eq!(requests.len(), reached, "the app was reached: {requests:?}");

    // Without the policy pod A gets through again.
    cluster
        .control_plane
        .ctl(&["policy", "delete", "default/deny-pod-a"])
        .await
        .unwrap();
    eventually("pod A to reach pod B again", SOON, || async {
        cluster.a_calls(&b_url).await.map(|r| r.body)
    })
    .await
    .unwrap();
}

/// Pod A (no pod B) and an `outside` server under `--outbound-policy`.
async fn outside_cluster(outbound_policy: &str) -> Cluster {
    let mut cluster = Cluster::start(Setup {
        control_plane: &[
            "--default-policy",
            "allow-mesh",
            "--outbound-policy",
            outbound_policy,
        ],
        outside: true,
        ..Setup::default()
    })
    .await
    .unwrap();
    let server = cluster
        .outside()
        .serve_http(APP_PORT, "hello from outside")
        .await
        .unwrap();
    cluster.apps.push(server);
    cluster
        .a
        .wait_for_sidecar_log(&["snapshot applied"], SOON)
        .await
        .unwrap();
    cluster
}

/// Waits until `pod`'s `trellis_connections_total{direction, outcome}` is
/// at least 1.
async fn counted(pod: &Pod, direction: &str, outcome: &str) {
    let what = format!("a {direction} connection counted as {outcome}");
    eventually(&what, SOON, || async {
        let metrics = pod.metrics().await?;
        let n = metrics.counter(
            "trellis_connections_total",
            &[("direction", direction), ("outcome", outcome)],
        );
        anyhow::ensure!(n >= 1.0, "{n}");
        anyhow::Ok(())
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

    let call = cluster.a_calls(&format!("http://{outside}/")).await;
    assert!(call.is_err(), "pod A reached the outside server: {call:?}");

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
    for (port, body) in [
        (APP_PORT, "hello from pod-b"),
        (EXCLUDED, "pod-b, unmeshed"),
    ] {
        let app = cluster.b().host().serve_http(port, body).await.unwrap();
        cluster.apps.push(app);
    }
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
    let meshed = cluster.b().host().addr(APP_PORT);
    let reply = cluster.a_calls(&format!("http://{meshed}/")).await.unwrap();
    assert_eq!(reply.body, "hello from pod-b");
    let a_id = cluster.a.identity().to_string();
    let b = cluster.b.as_mut().unwrap();
    b.wait_for_sidecar_log(
        &[
            "inbound connection",
            "decision=allow",
            &format!("peer={a_id}"),
        ],
        SOON,
    )
    .await
    .unwrap();

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
    let mut cluster = Cluster::start(Setup {
        control_plane: &["--default-policy", "allow-mesh"],
        init_b: Some(&[]),
        ..Setup::default()
    })
    .await
    .unwrap();
    cluster.a_knows_b().await.unwrap();

    // Redirected into pod B's inbound listener, whose original port is pod
    // B's own outbound listener: a loop.
    let port = netns::OUTBOUND_PORT;
    let target = cluster.b().host().addr(port);
    let call = cluster.a_calls(&format!("http://{target}/")).await;
    assert!(call.is_err(), "pod A reached {target}: {call:?}");
    let b = cluster.b.as_mut().unwrap();
    b.wait_for_sidecar_log(
        &["inbound connection refused", &format!("own port {port}")],
        SOON,
    )
    .await
    .unwrap();
    counted(cluster.b(), "inbound", "loop").await;
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
