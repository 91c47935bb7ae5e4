//! The pod network each interception test stands up ([`Cluster`]), and
//! the checks several tests make on it: what crossed the wire, what a
//! sidecar logged or counted. Owns no test of its own.

use std::net::SocketAddr;
use std::time::Duration;

use trellis_tests::netns::{
    APP_UID, Capture, ControlPlane, Credential, Host, HttpServer, Lab, Pod, Reply, Segment,
    unavailable,
};
use trellis_tests::{eventually, machine};

/// How long a test waits for something that should happen soon.
pub const SOON: Duration = Duration::from_secs(20);

/// What pod B's app answers.
pub const B_GREETING: &str = "hello from pod-b";

/// The port the apps serve on.
pub const APP_PORT: u16 = 8080;

/// Whether this machine lacks what the tests need; says which (see
/// [`machine::skip`]: under CI, fails the test instead).
pub fn skipped() -> bool {
    match unavailable() {
        Some(reason) => {
            machine::skip(&reason);
            true
        }
        None => false,
    }
}

/// What a test asks for.
#[derive(Default)]
pub struct Setup<'a> {
    pub control_plane: &'a [&'a str],
    pub init_a: &'a [&'a str],
    /// `None`: no pod B.
    pub init_b: Option<&'a [&'a str]>,
    pub outside: bool,
    /// What each sidecar proves its identity with; join tokens by default.
    pub credential_a: Credential,
    pub credential_b: Credential,
    /// More arguments for pod B's sidecar.
    pub sidecar_b: &'a [&'a str],
}

/// A running pod network. Fields drop in order: the apps and the capture
/// stop, then each pod's sidecar and namespace, then the control plane and
/// its namespace, then the bridge and the working directory.
pub struct Cluster {
    pub apps: Vec<HttpServer>,
    pub capture: Option<Capture>,
    pub a: Pod,
    pub b: Option<Pod>,
    pub outside: Option<Host>,
    pub control_plane: ControlPlane,
    pub lab: Lab,
}

impl Cluster {
    pub async fn start(setup: Setup<'_>) -> anyhow::Result<Cluster> {
        let lab = Lab::new()?;
        let cp_host = lab.host("cp", 10)?;
        Cluster::start_in(lab, cp_host, setup).await
    }

    /// Like [`Cluster::start`] in a lab the test made, with the control
    /// plane's host `cp_host` (`cp`, 192.0.2.10) already on its bridge, so
    /// that what the control plane needs there runs before it starts.
    pub async fn start_in(lab: Lab, cp_host: Host, setup: Setup<'_>) -> anyhow::Result<Cluster> {
        let control_plane = ControlPlane::start(&lab, cp_host, setup.control_plane).await?;
        let outside = if setup.outside {
            Some(lab.host("outside", 100)?)
        } else {
            None
        };
        let a = lab.host("pod-a", 1)?;
        let credential = &setup.credential_a;
        let a = Pod::start_with(&lab, a, &control_plane, setup.init_a, credential, &[]).await?;
        let b = match setup.init_b {
            Some(init) => {
                let b = lab.host("pod-b", 2)?;
                let credential = &setup.credential_b;
                let args = setup.sidecar_b;
                Some(Pod::start_with(&lab, b, &control_plane, init, credential, args).await?)
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

    pub fn b(&self) -> &Pod {
        self.b.as_ref().expect("this test has a pod B")
    }

    pub fn outside(&self) -> &Host {
        self.outside
            .as_ref()
            .expect("this test has an outside host")
    }

    /// Starts pod B's app on `port` (IPv4), answering `body`.
    pub async fn b_serves(&mut self, port: u16, body: &str) {
        let app = self.b().host().serve_http(port, body).await.unwrap();
        self.apps.push(app);
    }

    /// Waits until pod A's sidecar has a snapshot that lists both pods at
    /// every address (IPv4, and IPv6 where the pods have it), so it knows
    /// pod B's addresses belong to the mesh.
    pub async fn a_knows_b(&mut self) -> anyhow::Result<()> {
        let addresses = |pod: &Pod| 1 + usize::from(pod.host().ipv6().is_some());
        let endpoints = addresses(&self.a) + addresses(self.b());
        let endpoints = format!("endpoints={endpoints}");
        self.a
            .wait_for_sidecar_log(&["snapshot applied", &endpoints], SOON)
            .await
            .map(drop)
    }

    /// Waits until pod B's sidecar logs a line about an inbound connection
    /// from pod A that holds every one of `needles`, and returns that line.
    pub async fn b_logs_inbound_from_a(&mut self, needles: &[&str]) -> String {
        let peer = format!("peer={}", self.a.identity());
        let needles: Vec<&str> = needles.iter().copied().chain([peer.as_str()]).collect();
        let b = self.b.as_mut().expect("this test has a pod B");
        b.wait_for_sidecar_log(&needles, SOON).await.unwrap()
    }

    /// Asserts that pod A's app calling pod B's app at `b_app` in plain
    /// HTTP gets its answer, and that pod B's sidecar let pod A in there.
    pub async fn assert_a_reaches_b(&mut self, b_app: SocketAddr) {
        let reply = self.a_calls(&format!("http://{b_app}/")).await.unwrap();
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.body, B_GREETING);
        let line = self
            .b_logs_inbound_from_a(&["inbound connection", "decision=allow"])
            .await;
        assert!(line.contains(&format!(":{}", b_app.port())), "{line}");
    }

    /// Pod A's app calls `url` in plain HTTP.
    pub async fn a_calls(&self, url: &str) -> anyhow::Result<Reply> {
        self.a.host().http_get(Some(APP_UID), url).await
    }

    /// Like [`Cluster::a_calls`] over HTTP/2 with prior knowledge; `None`
    /// when no HTTP/2 client is installed.
    pub async fn a_calls_h2(&self, url: &str) -> anyhow::Result<Option<Reply>> {
        self.a.host().h2_get(APP_UID, url).await
    }

    /// Starts recording the wire.
    pub async fn capture(&mut self) -> anyhow::Result<()> {
        self.capture = Some(self.lab.capture().await?);
        Ok(())
    }

    pub fn segments(&self) -> Vec<Segment> {
        self.capture
            .as_ref()
            .expect("the capture was started")
            .segments()
    }
}

/// Asserts that a call was answered by a sidecar, not the app: `status`,
/// and a body saying `says`.
pub fn assert_refused(reply: &Reply, status: u16, says: &str) {
    assert_eq!(reply.status, status, "{reply:?}");
    assert!(reply.body.contains(says), "{says:?} not in {reply:?}");
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Whether a payload holds plaintext HTTP.
pub fn is_plain_http(payload: &[u8]) -> bool {
    contains(payload, b"GET /") || contains(payload, b"HTTP/1.")
}

/// Asserts that the capture saw a call to `dst` both ways, that its first
/// bytes toward `dst` are a TLS handshake record, and that no plaintext
/// HTTP crossed the wire at all.
pub async fn assert_only_tls_toward(cluster: &Cluster, dst: SocketAddr) {
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

/// A cluster of pods A and B under `--default-policy default_policy`,
/// nothing served yet.
pub async fn bare_two_pods(default_policy: &str) -> Cluster {
    Cluster::start(Setup {
        control_plane: &["--default-policy", default_policy],
        init_b: Some(&[]),
        ..Setup::default()
    })
    .await
    .unwrap()
}

/// A cluster of two pods under `--default-policy default_policy`, with pod
/// B's app serving on [`APP_PORT`], once pod A knows pod B.
pub async fn two_pods(default_policy: &str) -> Cluster {
    let mut cluster = bare_two_pods(default_policy).await;
    cluster.b_serves(APP_PORT, B_GREETING).await;
    cluster.a_knows_b().await.unwrap();
    cluster
}

/// Pod A (no pod B) and an `outside` server under `--outbound-policy`.
pub async fn outside_cluster(outbound_policy: &str) -> Cluster {
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
pub async fn counted(pod: &Pod, direction: &str, outcome: &str) {
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
