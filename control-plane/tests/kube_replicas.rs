//! Two control-plane replicas on the Kubernetes store, and one
//! `ListWorkloads` answer that covers both.
//!
//! No Kubernetes API server can run on these machines: both real
//! `trellis-control-plane --store kubernetes` binaries share the stand-in of
//! `kube_api`, which answers their lists and watches with the recorded
//! documents of `fixtures/k8s/store/` (so they list the same Pods, as
//! replicas sharing an API server do), keeps the CA Secret the first one
//! writes and the second one reads, and answers TokenReviews with recorded
//! reviews (the `shop/web` one, and the same document for `shop/api`).

mod common;
mod kube_api;

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use futures::future::BoxFuture;

use common::webhook::{WebhookCerts, webhook_addr};
use common::{
    ControlPlane, Svid, Takes, Watcher, assert_renewal_overdue, certify_with, eventually_async,
    listed, until,
};
use kube_api::{PODS, POLICIES, event, fixture_json, item, pods_list, recorded_cluster};
use tokio::sync::{mpsc, oneshot, watch};
use tonic::server::NamedService;
use tonic::{Code, Request, Response, Status};
use tower::Service;
use trellis_control_plane::ca::CertificateAuthority;
use trellis_control_plane::ca::anchors::expiries;
use trellis_control_plane::metrics::Metrics;
use trellis_control_plane::server::{GrpcListener, ServingCert, server_config};
use trellis_core::TrustDomain;
use trellis_proto::admin::v1::replica_server::{self, Replica, ReplicaServer};
use trellis_proto::admin::v1::{
    HealthRequest, HealthResponse, ListIssuedCertificatesRequest, ListIssuedCertificatesResponse,
    ListStreamsRequest, ListStreamsResponse, ListWorkloadsResponse, ReplicaHealth, SnapshotSync,
};
use trellis_proto::discovery::v1::{Endpoint, EndpointChanges};
use trellis_proto::identity::v1::certify_request::Proof;

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const API: &str = "spiffe://cluster.local/ns/shop/sa/api";
/// JWT-shaped tokens of `shop/web` and `shop/api`, unsigned: the stand-in
/// API server answers by token.
const WEB_TOKEN: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsifQ.eyJhdWQiOlsidHJlbGxpcyJdLCJleHAiOjQxMDI0NDQ4MDAsInN1YiI6InN5c3RlbTpzZXJ2aWNlYWNjb3VudDpzaG9wOndlYiJ9.c2lnbmF0dXJl";
const API_TOKEN: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsifQ.eyJhdWQiOlsidHJlbGxpcyJdLCJleHAiOjQxMDI0NDQ4MDAsInN1YiI6InN5c3RlbTpzZXJ2aWNlYWNjb3VudDpzaG9wOmFwaSJ9.c2lnbmF0dXJl";

/// A replica named `name` listening on `port`, whose peers are `peers`.
async fn replica(flags: &[String], name: &str, port: u16, peers: &str) -> ControlPlane {
    let mut flags = flags.to_vec();
    flags.extend(
        [
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--peers",
            peers,
            "--replica-name",
            name,
        ]
        .map(String::from),
    );
    tokio::task::spawn_blocking(move || {
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        ControlPlane::start(&flags)
    })
    .await
    .unwrap()
}

/// The sidecar of `id`, certified by its ServiceAccount token on `cp`.
async fn certify(cp: &ControlPlane, id: &str, token: &str, inbound: &str) -> Svid {
    let proof = Proof::ServiceAccountToken(token.into());
    certify_with(cp, id, proof, &[inbound]).await.unwrap()
}

/// Two replicas, cp-a and cp-b, on one stand-in API server, with web's
/// sidecar streaming to cp-a and api's to cp-b, each past its first
/// snapshot.
struct Fleet {
    fake: kube_api::FakeKube,
    a: ControlPlane,
    b: ControlPlane,
    port_a: u16,
    port_b: u16,
    /// web's stream, past its first snapshot, of `web_version`.
    web_stream: Watcher,
    web_version: u64,
    /// api's stream, its first snapshot not read yet; it takes endpoint
    /// changes, as a sidecar does.
    api_stream: Watcher,
}

/// The stand-in API server, with no CA Secret yet (a first install: the
/// first list of pods has none with a sidecar) and a TokenReview for each
/// of web's and api's tokens.
async fn cluster() -> kube_api::FakeKube {
    let fake = recorded_cluster().await;
    fake.set_secret(Some(fixture_json("store/secret-empty.json")));
    fake.first_install();
    let mut api_review = fixture_json("tokenreview/authenticated.json");
    let user = &mut api_review["status"]["user"];
    user["username"] = "system:serviceaccount:shop:api".into();
    user["extra"]["authentication.kubernetes.io/pod-name"][0] = "api-5f6d8b7c4-q9v7m".into();
    user["extra"]["authentication.kubernetes.io/pod-uid"][0] =
        "3e9d7b1a-6c42-4f05-b8e3-0a1c5d9f2e76".into();
    fake.review(API_TOKEN, api_review);
    fake
}

/// Replicas cp-a and cp-b on `fake`, each with `flags` and its own extra
/// flags, peers of each other; and their ports.
async fn pair(
    fake: &kube_api::FakeKube,
    extra_a: &[&str],
    extra_b: &[&str],
) -> (ControlPlane, ControlPlane, u16, u16) {
    // Told to each other beforehand.
    let free = common::ports::free_addrs(2);
    let (port_a, port_b) = (free[0].port(), free[1].port());
    // Both addresses for both, as a headless Service's name resolves to
    // every replica: each leaves its own answer out.
    let peers = format!("127.0.0.1:{port_a},127.0.0.1:{port_b}");
    let flags = fake.control_plane_flags();
    let with = |extra: &[&str]| [flags.clone(), extra.iter().map(|f| f.to_string()).collect()];
    let a = replica(&with(extra_a).concat(), "cp-a", port_a, &peers).await;
    // The second starts once the first has written the CA Secret, and
    // reads it: both issue from, and trust, one CA.
    let b = replica(&with(extra_b).concat(), "cp-b", port_b, &peers).await;
    assert_eq!(a.bundle(), b.bundle());
    (a, b, port_a, port_b)
}

impl Fleet {
    async fn start() -> Self {
        let fake = cluster().await;
        let (a, b, port_a, port_b) = pair(&fake, &[], &[]).await;

        let web = certify(&a, WEB, WEB_TOKEN, "10.244.1.17:15006").await;
        let api = certify(&b, API, API_TOKEN, "10.244.2.9:15006").await;
        let mut web_stream = Watcher::open(&a, &web, "10.244.1.17:15006").await;
        let api_stream =
            Watcher::open_with(&b, &api, "10.244.2.9:15006", Takes::EndpointChanges).await;
        let web_version = web_stream.next().await.version;
        Fleet {
            fake,
            a,
            b,
            port_a,
            port_b,
            web_stream,
            web_version,
            api_stream,
        }
    }
}

/// An API server out of reach of every replica (an upgrade, a partition
/// of the control plane) must not take the mesh down with it: each replica
/// serves the policies it last saw rather than leave the Service with no
/// ready endpoint. Each replica here has a stand-in API server of its own,
/// so that one can fail for one replica only, as a partition does; they
/// share the CA Secret. The AuthorizationPolicy watch fails for both past
/// the grace (shortened with `--watch-failure-grace`): neither peer
/// answers as healthy, so both stay ready, /ready saying that they serve
/// stale policies and why, `trellis_store_serving_stale_policies` 1, and
/// a warning logged. Once cp-a's API server answers again, cp-b, whose
/// watch still fails, has somewhere better to send sidecars: it answers
/// 503 naming the kind and cp-a, while cp-a is plainly ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_stay_ready_on_stale_policies_until_a_peer_is_healthy() {
    let fake_a = cluster().await;
    let fake_b = recorded_cluster().await;
    let free = common::ports::free_addrs(2);
    let (port_a, port_b) = (free[0].port(), free[1].port());
    let peers = format!("127.0.0.1:{port_a},127.0.0.1:{port_b}");
    let grace = ["--watch-failure-grace", "2s"].map(String::from).to_vec();
    let flags_a = [fake_a.control_plane_flags(), grace.clone()].concat();
    let a = replica(&flags_a, "cp-a", port_a, &peers).await;
    fake_b.set_secret(fake_a.secret());
    let flags_b = [fake_b.control_plane_flags(), grace].concat();
    let b = replica(&flags_b, "cp-b", port_b, &peers).await;
    assert_eq!(a.bundle(), b.bundle());
    let stale = |value: u8| format!("trellis_store_serving_stale_policies {value}\n");
    for cp in [&a, &b] {
        assert_eq!(cp.ready(), (200, "ready\n".into()));
        assert!(cp.metrics().contains(&stale(0)), "{}", cp.metrics());
    }

    fake_a.fail(POLICIES, 500);
    fake_b.fail(POLICIES, 500);
    for cp in [&a, &b] {
        eventually_async("/ready to say it serves stale policies", || async {
            let (status, body) = cp.ready();
            assert_eq!(status, 200, "ready with no healthy peer: {body}");
            (body != "ready\n").then_some(())
        })
        .await;
        // Logged once the peer has been asked and answered as stale.
        eventually_async("the replica to say it serves stale policies", || async {
            cp.log()
                .lines()
                .any(|l| l.contains("serving the policies last seen") && l.contains("WARN"))
                .then_some(())
        })
        .await;
        let (status, body) = cp.ready();
        assert_eq!(status, 200, "ready with no healthy peer: {body}");
        common::assert_serving_stale(&body, "AuthorizationPolicy");
        assert!(cp.metrics().contains(&stale(1)), "{}", cp.metrics());
    }

    fake_a.recover(POLICIES);
    let body = eventually_async("cp-b to go unready", || async {
        let (status, body) = b.ready();
        (status == 503).then_some(body)
    })
    .await;
    assert!(
        body.starts_with("not ready: the AuthorizationPolicy watch has been failing for"),
        "{body}"
    );
    assert!(
        body.contains(&format!(
            "peer replica cp-a at 127.0.0.1:{port_a} serves current policies"
        )),
        "{body}"
    );
    assert_eq!(a.ready(), (200, "ready\n".into()));
    for cp in [&a, &b] {
        assert!(cp.metrics().contains(&stale(0)), "{}", cp.metrics());
    }
}

/// A peer replica stood in by the test: the `Replica` service on a real
/// TLS port presenting the control plane's SVID, issued by the CA the
/// replicas under test read from the CA Secret. It answers `Health` as the
/// test says, call by call ([`StandInPeer::next_health_call`]); or, as a
/// release that predates `Health`, knows no such method.
struct StandInPeer {
    addr: SocketAddr,
    health_calls: mpsc::Receiver<oneshot::Sender<ReplicaHealth>>,
    _stop: watch::Sender<bool>,
}

/// The stand-in's name in its answers.
const STAND_IN: &str = "cp-peer";

impl StandInPeer {
    /// Puts a new CA in `fake`'s CA Secret, for the replicas started after,
    /// and serves with an SVID from it; `knows_health` false stands in for
    /// an older release.
    async fn start(fake: &kube_api::FakeKube, knows_health: bool) -> Self {
        let td = TrustDomain::new("cluster.local").unwrap();
        let (ca, cert, key) = CertificateAuthority::generate(&td).unwrap();
        let b64 = |pem: &str| base64::engine::general_purpose::STANDARD.encode(pem);
        let mut secret = fixture_json("store/secret-empty.json");
        secret["data"] = serde_json::json!({"tls.crt": b64(&cert), "tls.key": b64(&key)});
        fake.set_secret(Some(secret));
        let ca = Arc::new(ca);
        let serving = ServingCert::new(ca.clone(), &[], Ipv4Addr::LOCALHOST.into()).unwrap();
        let tls = server_config(&ca, serving).unwrap();
        let listener = GrpcListener::bind("127.0.0.1:0".parse().unwrap(), tls)
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = watch::channel(false);
        let incoming = listener.run(stopped, Arc::new(Metrics::default()));
        let (calls, health_calls) = mpsc::channel(1);
        let service = ReplicaServer::new(PeerReplica { health: calls });
        let mut server = tonic::transport::Server::builder();
        let router = if knows_health {
            server.add_service(service)
        } else {
            server.add_service(WithoutHealth(service))
        };
        tokio::spawn(router.serve_with_incoming(incoming));
        StandInPeer {
            addr,
            health_calls,
            _stop: stop,
        }
    }

    /// The next `Health` call, waiting for the answer sent on it: until
    /// then, the replica asking holds what it made of the answers before.
    async fn next_health_call(&mut self) -> oneshot::Sender<ReplicaHealth> {
        tokio::time::timeout(common::PATIENCE, self.health_calls.recv())
            .await
            .expect("a Health call within the patience")
            .expect("the stand-in serves")
    }
}

/// The stand-in's `Replica` service.
struct PeerReplica {
    health: mpsc::Sender<oneshot::Sender<ReplicaHealth>>,
}

#[tonic::async_trait]
impl Replica for PeerReplica {
    async fn list_streams(
        &self,
        _request: Request<ListStreamsRequest>,
    ) -> Result<Response<ListStreamsResponse>, Status> {
        Ok(Response::new(ListStreamsResponse {
            name: STAND_IN.into(),
            ..ListStreamsResponse::default()
        }))
    }

    async fn list_issued_certificates(
        &self,
        _request: Request<ListIssuedCertificatesRequest>,
    ) -> Result<Response<ListIssuedCertificatesResponse>, Status> {
        Ok(Response::new(ListIssuedCertificatesResponse::default()))
    }

    async fn health(
        &self,
        _request: Request<HealthRequest>,
    ) -> Result<Response<HealthResponse>, Status> {
        let (answer, answered) = oneshot::channel();
        let gone = || Status::unavailable("the test has ended");
        self.health.send(answer).await.map_err(|_| gone())?;
        let health = answered.await.map_err(|_| gone())?;
        Ok(Response::new(HealthResponse {
            name: STAND_IN.into(),
            health: health.into(),
        }))
    }
}

/// The `Replica` service of a release that predates `Health`: its other
/// methods are served, and `Health` is answered as the generated server of
/// such a release answers a method it does not know, `UNIMPLEMENTED`.
#[derive(Clone)]
struct WithoutHealth(ReplicaServer<PeerReplica>);

impl NamedService for WithoutHealth {
    const NAME: &'static str = replica_server::SERVICE_NAME;
}

impl Service<http::Request<tonic::body::Body>> for WithoutHealth {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Service::<http::Request<tonic::body::Body>>::poll_ready(&mut self.0, cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        if request.uri().path() != "/trellis.admin.v1.Replica/Health" {
            return self.0.call(request);
        }
        Box::pin(async {
            let mut response = http::Response::new(tonic::body::Body::default());
            let headers = response.headers_mut();
            headers.insert(Status::GRPC_STATUS, (Code::Unimplemented as i32).into());
            headers.insert(
                http::header::CONTENT_TYPE,
                tonic::metadata::GRPC_CONTENT_TYPE,
            );
            Ok(response)
        })
    }
}

/// A replica `cp-a` on `fake` whose only peer is `peer`, with a grace of
/// 2 s.
async fn beside(fake: &kube_api::FakeKube, peer: &StandInPeer) -> ControlPlane {
    let port = common::ports::free_addrs(1)[0].port();
    let grace = ["--watch-failure-grace", "2s"].map(String::from).to_vec();
    let flags = [fake.control_plane_flags(), grace].concat();
    replica(&flags, "cp-a", port, &peer.addr.to_string()).await
}

/// During an upgrade from a release without `Health`, the peers of a new
/// replica are older ones, which answer it `UNIMPLEMENTED`: an older peer
/// is not a healthy one, so a new replica whose AuthorizationPolicy watch
/// fails past its grace stays ready, serving stale policies, and says
/// which peer is too old to ask, as an operator mid-upgrade must tell it
/// from one out of reach: in `/ready`'s body and in the warning, with
/// `trellis_store_serving_stale_policies` 1. The older peer serves its
/// other `Replica` calls: `ListWorkloads` lists it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_peer_without_health_leaves_a_replica_ready_and_is_named() {
    let fake = recorded_cluster().await;
    let peer = StandInPeer::start(&fake, false).await;
    let cp = beside(&fake, &peer).await;
    let answer = cp.list_workloads().await;
    assert!(
        answer
            .replicas
            .iter()
            .any(|r| r.name == STAND_IN && r.error.is_empty()),
        "{:?}",
        answer.replicas
    );

    fake.fail(POLICIES, 500);
    let body = eventually_async("/ready to say why the peer is not healthy", || async {
        let (status, body) = cp.ready();
        assert_eq!(status, 200, "ready with no healthy peer: {body}");
        body.contains(&peer.addr.to_string()).then_some(body)
    })
    .await;
    common::assert_serving_stale(&body, "AuthorizationPolicy");
    let too_old = format!(
        "{} does not support the health check (an older release): it counts as not healthy",
        peer.addr
    );
    assert!(body.contains(&too_old), "{body}");
    assert!(
        cp.metrics().contains(
            "trellis_store_serving_stale_policies 1
"
        ),
        "{}",
        cp.metrics()
    );
    let warning = cp.wait_for_line("the warning that it serves stale policies", |l| {
        l.contains("WARN") && l.contains("serving the policies last seen")
    });
    assert!(warning.contains(&too_old), "{warning}");
}

/// A replica does not flap between ready and unready on a peer whose own
/// watch is flaky: past its grace, it goes unready only once two checks
/// in a row find a healthy peer, is ready again (serving stale policies)
/// at the first check that finds none, and plainly ready as soon as its
/// own watch works again, however healthy the peer. The stand-in peer
/// answers each check as the test says; while the next check waits for
/// its answer, `/ready` says what the replica made of the answers so far.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_goes_unready_only_once_a_peer_is_healthy_at_two_checks_in_a_row() {
    use ReplicaHealth::{Healthy, PoliciesStale};
    let fake = recorded_cluster().await;
    let mut peer = StandInPeer::start(&fake, true).await;
    let cp = beside(&fake, &peer).await;
    let stale = |value: u8| format!("trellis_store_serving_stale_policies {value}\n");
    let peer_named = format!("peer replica {STAND_IN} at {}", peer.addr);

    fake.fail(POLICIES, 500);
    // The first check once the watch is past its grace.
    let mut call = peer.next_health_call().await;
    // Each answer, and /ready once the replica has made of it what it
    // does: the peer alternating never makes it unready.
    let checks = [
        (Healthy, 200),
        (PoliciesStale, 200),
        (Healthy, 200),
        (Healthy, 503),
        (PoliciesStale, 200),
        (Healthy, 200),
        (Healthy, 503),
    ];
    for (i, (answer, status)) in checks.into_iter().enumerate() {
        call.send(answer).unwrap();
        call = peer.next_health_call().await;
        let (got, body) = cp.ready();
        assert_eq!(got, status, "after answer {i}, {answer:?}: {body}");
        let metrics = cp.metrics();
        if status == 503 {
            assert!(body.starts_with("not ready: "), "{body}");
            assert!(
                body.contains(&format!("{peer_named} serves current policies")),
                "{body}"
            );
            assert!(metrics.contains(&stale(0)), "{metrics}");
        } else {
            assert!(body.starts_with("ready, serving stale: "), "{body}");
            assert!(metrics.contains(&stale(1)), "{metrics}");
        }
        if answer == Healthy && status == 200 {
            assert!(
                body.contains(&format!(
                    "{peer_named} answers as healthy, but this one goes unready only once 2 \
                     checks in a row find a healthy peer (1 so far)"
                )),
                "{body}"
            );
        }
        if answer == PoliciesStale {
            common::assert_serving_stale(&body, "AuthorizationPolicy");
            assert!(
                body.contains(&format!(
                    "{STAND_IN} at {} serves stale policies too",
                    peer.addr
                )),
                "{body}"
            );
        }
    }

    // Unready, with a healthy peer: its own watch works again.
    call.send(Healthy).unwrap();
    fake.recover(POLICIES);
    eventually_async("/ready to answer plainly ready again", || async {
        (cp.ready() == (200, "ready\n".into())).then_some(())
    })
    .await;
    assert!(cp.metrics().contains(&stale(0)), "{}", cp.metrics());
}

/// The table row of `id` in `trellisctl workloads`, split into columns.
fn row<'a>(table: &'a str, id: &str) -> Vec<&'a str> {
    table
        .lines()
        .find(|l| l.starts_with(id))
        .unwrap_or_else(|| panic!("no row for {id} in\n{table}"))
        .split_whitespace()
        .collect()
}

/// Each sidecar streams to one replica, and either replica's ListWorkloads
/// (and `trellisctl workloads` on it) shows both sidecars synced, each
/// with the replica it streams to, and a line per replica; `trellisctl
/// certs` lists the certificates both replicas issued, and `trellisctl
/// check` finds the mesh healthy. When a peer stops, the answers name it
/// as not listening: its sidecar shows as not connected and its
/// certificates are not listed, instead of the whole call failing; `check`
/// warns naming it, and `policy apply --wait` does not wait for it. One
/// that takes connections and does not answer may hold streams: `check`
/// fails naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn either_replica_lists_the_sidecars_streaming_to_every_replica() {
    let Fleet {
        fake: _fake,
        a,
        b,
        port_b,
        port_a,
        mut web_stream,
        web_version,
        mut api_stream,
    } = Fleet::start().await;
    let api_version = api_stream.next().await.version;
    // One content, one version: the replicas' versions are digests of what
    // they serve.
    assert_eq!(web_version, api_version);

    for (asked, other) in [(&a, "cp-b"), (&b, "cp-a")] {
        let answer = eventually_async("both sidecars synced in one answer", || async {
            let answer = asked.list_workloads().await;
            let synced = |id| listed(&answer, id).sync() == SnapshotSync::Synced;
            (synced(WEB) && synced(API)).then_some(answer)
        })
        .await;
        assert_eq!(listed(&answer, WEB).replicas, ["cp-a"]);
        assert_eq!(listed(&answer, API).replicas, ["cp-b"]);
        assert_eq!(listed(&answer, API).acked_version, api_version);
        let replicas: Vec<_> = answer
            .replicas
            .iter()
            .map(|r| (r.name.as_str(), r.connected, r.error.as_str()))
            .collect();
        assert_eq!(replicas.len(), 2, "{replicas:?}");
        assert!(replicas.contains(&(other, 1, "")), "{replicas:?}");
        assert!(
            answer
                .replicas
                .iter()
                .all(|r| r.snapshot_version == web_version)
        );
    }

    let listing = a.ctl(&["workloads"]);
    let table = String::from_utf8_lossy(&listing.stdout);
    assert!(listing.status.success(), "{table}");
    assert_eq!(
        row(&table, WEB)[4..],
        ["synced", "yes", "-", "cp-a"],
        "{table}"
    );
    assert_eq!(
        row(&table, API)[4..],
        ["synced", "yes", "-", "cp-b"],
        "{table}"
    );
    assert!(
        table.contains(&format!(
            "replica cp-a at 127.0.0.1:{port_a} (answering): snapshot {web_version}, 1 connected"
        )) && table.contains(&format!(
            "replica cp-b at 127.0.0.1:{port_b}: snapshot {web_version}, 1 connected"
        )),
        "{table}"
    );

    // With the Kubernetes store each replica logs what it issues; the
    // listing joins them, and a serial is found whichever replica issued
    // it.
    let certs = a.ctl(&["certs", "-o", "json"]);
    assert!(certs.status.success(), "{certs:?}");
    let issued: serde_json::Value = serde_json::from_slice(&certs.stdout).unwrap();
    let issuer_of = |id: &str| {
        issued
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["spiffe_id"] == id)
            .unwrap_or_else(|| panic!("no certificate of {id} in {issued}"))
            .clone()
    };
    assert_eq!(issuer_of(WEB)["replica"], "cp-a");
    let api_cert = issuer_of(API);
    assert_eq!(api_cert["replica"], "cp-b");
    let serial = api_cert["serial"].as_str().unwrap();
    let found = a.ctl(&["certs", "--serial", serial]);
    let table = String::from_utf8_lossy(&found.stdout);
    assert!(found.status.success(), "{table}");
    assert_eq!(row(&table, serial)[1..2], [API], "{table}");
    assert_eq!(row(&table, serial).last(), Some(&"cp-b"), "{table}");

    // `trellisctl check` finds the mesh healthy over both replicas: each
    // sidecar's certificate is in the log of the replica that issued it.
    let check = a.ctl(&["check"]);
    let report = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{report}");
    for line in [
        format!("ok    2 replicas answered, all serving snapshot {web_version}\n"),
        "ok    2 of 2 connected sidecars hold the current snapshot (2 workloads known)\n".into(),
        "0 failures, 0 warnings\n".into(),
    ] {
        assert!(report.contains(&line), "no {line:?} in\n{report}");
    }
    assert!(!report.contains("certificate renewal"), "{report}");

    // With cp-b gone, cp-a still answers: nothing listens at cp-b's
    // address, so cp-b is named as not listening, and the sidecar that
    // streamed to it is not connected (a real one reconnects to cp-a).
    drop(api_stream);
    b.stop_async().await;
    let answer = a.list_workloads().await;
    assert_eq!(listed(&answer, WEB).sync(), SnapshotSync::Synced);
    assert_eq!(listed(&answer, API).sync(), SnapshotSync::NotConnected);
    assert!(!listed(&answer, API).connected);
    let silent: Vec<_> = answer
        .replicas
        .iter()
        .filter(|r| !r.error.is_empty())
        .collect();
    assert_eq!(silent.len(), 1, "{:?}", answer.replicas);
    assert_eq!(silent[0].address, format!("127.0.0.1:{port_b}"));
    assert!(silent[0].not_listening, "{:?}", silent[0]);
    let gone = format!("replica at 127.0.0.1:{port_b} is not listening (cannot connect: ");
    let listing = a.ctl(&["workloads"]);
    let table = String::from_utf8_lossy(&listing.stdout);
    assert!(listing.status.success(), "{table}");
    assert!(
        table.contains(&gone)
            && table.contains("so it is starting, stopping or gone: it holds no sidecar stream"),
        "{table}"
    );
    assert_eq!(
        row(&table, API)[4..],
        ["not", "connected", "no", "-", "-"],
        "{table}"
    );
    let check = a.ctl(&["check"]);
    let report = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{report}");
    assert!(
        report.contains(&format!("warn  {gone}"))
            && report.contains("holds no sidecar stream (check again once it serves)")
            && report.contains("0 failures, 1 warning\n"),
        "{report}"
    );
    let certs = a.ctl(&["certs"]);
    let (table, stderr) = (
        String::from_utf8_lossy(&certs.stdout),
        String::from_utf8_lossy(&certs.stderr),
    );
    assert!(certs.status.success(), "{stderr}");
    assert!(table.contains(WEB) && !table.contains(API), "{table}");
    assert!(
        stderr.contains(&gone) && stderr.contains("the certificates it issued are not listed"),
        "{stderr}"
    );

    // A write is waited for on the replicas that listen: cp-b holds no
    // stream, and loads the write if it starts.
    let web_task = tokio::spawn(async move {
        loop {
            web_stream.next().await;
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.yaml");
    std::fs::write(&file, allow_api_from_web()).unwrap();
    let path = file.to_str().unwrap();
    let applied =
        tokio::task::block_in_place(|| a.ctl(&["policy", "apply", "-f", path, "--wait=20s"]));
    let stderr = String::from_utf8_lossy(&applied.stderr);
    assert!(applied.status.success(), "{stderr}");
    let named = stderr
        .lines()
        .find(|line| line.starts_with(&format!("  {gone}")))
        .unwrap_or_else(|| panic!("cp-b is not named in {stderr}"));
    assert!(
        stderr.contains(" or a later one: 1 on 1 replica ")
            && named.ends_with("): it holds no sidecar stream, and loads the write if it starts"),
        "{stderr}"
    );
    web_task.abort();

    // Something that takes connections at cp-b's address and never
    // answers may be a replica holding streams: that fails the check.
    let _silent = std::net::TcpListener::bind(("127.0.0.1", port_b)).unwrap();
    let check = a.ctl(&["check"]);
    let report = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(1), "{report}");
    assert!(
        report.contains(&format!(
            "FAIL  replica at 127.0.0.1:{port_b} did not answer (no answer within 3 seconds): the \
             sidecars streaming to it are not seen, nor its webhook's record of the pods it let \
             through without a sidecar\n"
        )) && report.contains("1 failure, 0 warnings\n"),
        "{report}"
    );
}

/// When `svid`'s certificate expires, Unix seconds.
/// The API server calls whichever replica the webhook's Service picks,
/// and each knows only the pods its own warning-only webhook admitted
/// without a sidecar: `trellisctl check` on either replica names the pods
/// of a Deployment with a mistyped `trellis.io/inject` label that both
/// admitted, once, counted over both and naming both. With cp-b silent,
/// the check on cp-a says that cp-b's record is missing, and counts only
/// cp-a's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_on_either_replica_names_pods_every_replica_admitted_without_a_sidecar() {
    let fake = cluster().await;
    let certs = WebhookCerts::new();
    let flags = certs.flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (a, b, _, port_b) = pair(&fake, &flags, &flags).await;
    let (mistyped, _) = certs.deployment_reviews();
    tokio::task::block_in_place(|| {
        for (cp, times) in [(&a, 2), (&b, 1)] {
            for _ in 0..times {
                let (status, body) =
                    certs.post(&webhook_addr(cp), "/inject/unknown-pod-label", &mistyped);
                assert_eq!(status, 200, "{body}");
            }
        }
    });
    for cp in [&a, &b] {
        let (report, passed) = check(cp);
        assert!(passed, "{report}");
        let named: Vec<_> = report
            .lines()
            .filter(|l| l.contains("without a sidecar"))
            .collect();
        assert_eq!(named.len(), 1, "{report}");
        assert!(
            named[0].starts_with(
                "warn  namespace shop: the webhook let the pods of Deployment web through \
                 without a sidecar (3 pods, the last at "
            ) && named[0].ends_with(
                ", by cp-a, cp-b): their label trellis.io/inject is \"true\", neither \
                 \"enabled\" nor \"disabled\"; those created run outside the mesh"
            ),
            "{report}"
        );
    }

    // Something that takes connections at cp-b's address and never
    // answers: what cp-b alone knows is missing, and the check says so.
    b.stop_async().await;
    let _silent = std::net::TcpListener::bind(("127.0.0.1", port_b)).unwrap();
    let (report, passed) = check(&a);
    assert!(!passed, "{report}");
    assert!(
        report.contains(&format!(
            "FAIL  replica at 127.0.0.1:{port_b} did not answer (no answer within 3 seconds): the \
             sidecars streaming to it are not seen, nor its webhook's record of the pods it let \
             through without a sidecar\n"
        )) && report.contains("(2 pods, the last at ")
            && report.contains(", by cp-a): their label trellis.io/inject is \"true\""),
        "{report}"
    );
}

/// cp-a let a Deployment's pods through without a sidecar; its label
/// fixed, the Deployment rolls out, and the API server sends the new
/// ReplicaSet's pods to cp-b, which injects them: `trellisctl check` on
/// either replica no longer warns of the Deployment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_forgets_pods_of_a_deployment_another_replica_injected_since() {
    let fake = cluster().await;
    let certs = WebhookCerts::new();
    let flags = certs.flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (a, b, _, _) = pair(&fake, &flags, &flags).await;
    let (mistyped, fixed) = certs.deployment_reviews();
    let post = |cp: &ControlPlane, path: &str, review: &std::path::Path| {
        let (status, body) =
            tokio::task::block_in_place(|| certs.post(&webhook_addr(cp), path, review));
        assert_eq!(status, 200, "{body}");
        body
    };
    post(&a, "/inject/unknown-pod-label", &mistyped);
    let (report, _) = check(&b);
    assert!(
        report.contains("the webhook let the pods of Deployment web through without a sidecar"),
        "{report}"
    );
    let injected = post(&b, "/inject", &fixed);
    assert!(injected.contains("\"patch\""), "{injected}");
    for cp in [&a, &b] {
        let (report, passed) = check(cp);
        assert!(passed, "{report}");
        assert!(!report.contains("without a sidecar"), "{report}");
    }
}

fn not_after(svid: &Svid) -> i64 {
    expiries(&svid.chain[..1])[0].1
}

/// `trellisctl check` on `cp`: its report, and whether it passed.
fn check(cp: &ControlPlane) -> (String, bool) {
    let check = tokio::task::block_in_place(|| cp.ctl(&["check"]));
    let report = String::from_utf8_lossy(&check.stdout).into_owned();
    (report, check.status.success())
}

/// With the Kubernetes store, whose Pods carry no certificate, `check`
/// learns each sidecar's newest certificate from the issued-certificate
/// logs of every replica, whichever one it asks. cp-b issues certificates
/// of 10 seconds, cp-a of an hour. web's first certificate comes from
/// cp-b and is renewed on cp-a; api's only one comes from cp-b; both
/// sidecars stream to cp-b. Once cp-b's certificates have expired, `check`
/// on either replica fails api, naming when its newest certificate
/// expired, and finds web fine. With cp-a gone, cp-b cannot tell whether
/// cp-a renewed them: it says so, and fails neither. cp-a comes back with
/// an empty log, and web's sidecar reconnects to it, presenting the
/// certificate cp-a renewed before it restarted: a newer one would be in a
/// log, so both replicas know it for web's newest, and `check` finds web
/// fine and nothing unknown (api's sidecar, its certificate expired, is
/// gone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_sees_a_renewal_whichever_replica_issued_it() {
    let fake = cluster().await;
    let (a, b, port_a, port_b) = pair(&fake, &[], &["--cert-ttl", "10s"]).await;
    let web_first = certify(&b, WEB, WEB_TOKEN, "10.244.1.17:15006").await;
    let web_renewed = certify(&a, WEB, WEB_TOKEN, "10.244.1.17:15006").await;
    let api = certify(&b, API, API_TOKEN, "10.244.2.9:15006").await;
    let mut web_stream = Watcher::open(&b, &web_first, "10.244.1.17:15006").await;
    let mut api_stream = Watcher::open(&b, &api, "10.244.2.9:15006").await;
    web_stream.next().await;
    api_stream.next().await;
    eventually_async("both sidecars synced", || async {
        let answer = b.list_workloads().await;
        let synced = |id| listed(&answer, id).sync() == SnapshotSync::Synced;
        (synced(WEB) && synced(API)).then_some(())
    })
    .await;
    let (expired, renewed) = (not_after(&api), not_after(&web_renewed));

    // Either replica lists each sidecar's newest certificate, from its own
    // log or its peer's.
    for cp in [&a, &b] {
        let answer = cp.list_workloads().await;
        let web = listed(&answer, WEB);
        assert_eq!(web.cert_expires_at_unix, renewed, "{web:?}");
        assert_eq!(listed(&answer, API).cert_expires_at_unix, expired);
    }

    // The wall clock is what expires a certificate: wait for it to pass
    // cp-b's.
    let end = UNIX_EPOCH + Duration::from_secs(expired.max(not_after(&web_first)) as u64);
    if let Ok(left) = end.duration_since(SystemTime::now()) {
        tokio::time::sleep(left).await;
    }
    let failed = format!(
        "FAIL  {API} is connected, but its newest certificate expired at {}: it has not \
         renewed (see its sidecar's log), and its peers refuse it\n",
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(expired as u64))
    );
    for cp in [&a, &b] {
        let (report, passed) = check(cp);
        assert!(!passed, "{report}");
        assert!(report.contains(&failed), "no {failed:?} in\n{report}");
        assert!(
            !report.contains(WEB) && report.contains("1 failure, 0 warnings\n"),
            "{report}"
        );
    }

    // cp-a's log may hold newer certificates of both: cp-b does not fail
    // them without it.
    a.stop_async().await;
    let (report, passed) = check(&b);
    assert!(passed, "{report}");
    for line in [
        format!(
            "ok    certificate renewal not known for 2 connected sidecars: the replica at \
             127.0.0.1:{port_a} did not answer, and its issued-certificate log may hold a newer \
             certificate\n"
        ),
        format!("warn  replica at 127.0.0.1:{port_a} is not listening"),
        "0 failures, 1 warning\n".into(),
    ] {
        assert!(report.contains(&line), "no {line:?} in\n{report}");
    }

    // cp-a restarts, its log empty: web's renewal is in no log any more.
    drop((web_stream, api_stream));
    let peers = format!("127.0.0.1:{port_a},127.0.0.1:{port_b}");
    let a = replica(&fake.control_plane_flags(), "cp-a", port_a, &peers).await;
    let mut web_stream = Watcher::open(&a, &web_renewed, "10.244.1.17:15006").await;
    web_stream.next().await;
    eventually_async("web streaming to cp-a only, api to none", || async {
        let answer = b.list_workloads().await;
        let (web, api) = (listed(&answer, WEB), listed(&answer, API));
        (web.connected && web.replicas == ["cp-a"] && !api.connected).then_some(())
    })
    .await;
    for cp in [&a, &b] {
        let answer = cp.list_workloads().await;
        let web = listed(&answer, WEB);
        assert_eq!(web.cert_expires_at_unix, renewed, "{web:?}");
        assert!(
            web.cert_expiry_unknown.is_empty() && web.cert_renewal_unknown.is_empty(),
            "{web:?}"
        );
        let (report, passed) = check(cp);
        assert!(passed, "{report}");
        assert!(
            !report.contains(WEB)
                && !report.contains("not known")
                && report.contains("0 failures, 0 warnings\n"),
            "{report}"
        );
    }
}

/// With the Kubernetes store, the issue time of each sidecar's newest
/// certificate comes from the replicas' issued-certificate logs with its
/// expiry, and `check` names a sidecar that stopped renewing once three
/// quarters of its certificate's life have passed, before it expires.
/// cp-a issues certificates of a minute; cp-b, of an hour, starts after
/// cp-a issued api's, so its log does not reach back to it, and api's
/// stream opened before cp-b started, presenting that certificate: whether
/// api renewed on cp-b before then is not known, until a lifetime of api's
/// certificate has passed since cp-b started. Then any certificate cp-b
/// may have issued it has expired too, and `check` on cp-b fails it,
/// though cp-b's own certificates live an hour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_a_sidecar_that_stopped_renewing() {
    let fake = cluster().await;
    let free = common::ports::free_addrs(2);
    let (port_a, port_b) = (free[0].port(), free[1].port());
    let peers = format!("127.0.0.1:{port_a},127.0.0.1:{port_b}");
    let flags = fake.control_plane_flags();
    let short = [flags.clone(), vec!["--cert-ttl".into(), "60s".into()]].concat();
    let a = replica(&short, "cp-a", port_a, &peers).await;
    let api = certify(&a, API, API_TOKEN, "10.244.2.9:15006").await;
    let api_issued = listed(&a.list_workloads().await, API).cert_issued_at_unix;
    assert_eq!(not_after(&api) - api_issued, 60);
    let mut api_stream = Watcher::open(&a, &api, "10.244.2.9:15006").await;
    api_stream.next().await;
    let mut streams = vec![api_stream.answer_all()];
    // cp-b starts a second later at least: its log begins after api's
    // certificate was issued and presented.
    until(unix(SystemTime::now()) + 1).await;
    let b_starts = SystemTime::now();
    let b = replica(&flags, "cp-b", port_b, &peers).await;
    let b_started = SystemTime::now();
    let web = certify(&a, WEB, WEB_TOKEN, "10.244.1.17:15006").await;
    let mut web_stream = Watcher::open(&a, &web, "10.244.1.17:15006").await;
    web_stream.next().await;
    streams.push(web_stream.answer_all());
    let answer = b.list_workloads().await;
    let (web_issued, web_expires) = {
        let web = listed(&answer, WEB);
        (web.cert_issued_at_unix, web.cert_expires_at_unix)
    };
    assert_eq!(web_expires, not_after(&web), "{answer:?}");
    assert_eq!(web_expires - web_issued, 60, "{answer:?}");
    assert!(
        web_issued >= unix(b_starts) && listed(&answer, WEB).cert_renewal_unknown.is_empty(),
        "{answer:?}"
    );
    // api's certificate is older than cp-b's log: a newer one may have
    // been lost with it.
    let api_listed = listed(&answer, API);
    assert_eq!(api_listed.cert_issued_at_unix, api_issued, "{answer:?}");
    assert!(
        api_listed
            .cert_renewal_unknown
            .starts_with("the replicas' issued-certificate logs are complete only since "),
        "{answer:?}"
    );

    // Neither sidecar renews. Three quarters into web's certificate's
    // life, cp-b names it.
    until(web_issued + 46).await;
    let (report, passed) = check(&b);
    assert!(!passed, "{report}");
    assert_renewal_overdue(&report, WEB, web_issued, web_expires);

    // A lifetime of api's certificate after cp-b started, any certificate
    // cp-b issued api before its log began has expired.
    until(unix(b_started) + 61).await;
    let (report, passed) = check(&b);
    assert!(!passed, "{report}");
    let failed =
        format!("FAIL  {API} is connected, but no replica has issued it a certificate since ");
    assert!(
        report.lines().any(|line| line.starts_with(&failed)
            && line.contains("longer ago than a certificate's lifetime")),
        "no {failed:?} in\n{report}"
    );
    for stream in streams {
        stream.abort();
    }
}

/// Unix seconds of `at`.
fn unix(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// `policy apply --wait` on one replica ends once the other replica and
/// its sidecar hold the write, though that replica never serves the
/// snapshot version the write returned: its watch delivered a Pod the
/// writing replica had not seen yet, so its content (and the digest that
/// is its version) differs. The wait asks by store position, which the
/// write reaches on both replicas whatever else each has seen. (Asked by
/// version, the wait ran to its deadline naming cp-b.) The Pod reaches
/// api's sidecar, on cp-b, as one endpoint change, not the whole list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_is_found_on_a_replica_that_saw_other_changes_first() {
    let Fleet {
        fake,
        a,
        b,
        mut web_stream,
        web_version,
        mut api_stream,
        ..
    } = Fleet::start().await;
    let first = api_stream.next().await.version;
    let web_task = tokio::spawn(async move {
        loop {
            web_stream.next().await;
        }
    });
    eventually_async("api's ACK on cp-b", || async {
        let answer = b.list_workloads().await;
        (listed(&answer, API).acked_version == first).then_some(())
    })
    .await;

    // A second web pod starts; cp-b's watch (opened second) delivers it,
    // cp-a's has not yet. api's sidecar, on cp-b, is sent that pod's
    // endpoint alone.
    let mut pod = item(&pods_list(), "web-7d4b9c8f6d-x2x8q", 60_000);
    pod["metadata"]["name"] = "web-7d4b9c8f6d-7kq2z".into();
    pod["metadata"]["uid"] = "5a1c9e3b-2d47-4f68-9b0a-7e6d5c4b3a21".into();
    pod["status"]["podIP"] = "10.244.1.18".into();
    pod["status"]["podIPs"][0]["ip"] = "10.244.1.18".into();
    fake.publish_to(PODS, 1, event("ADDED", &pod));
    let changed = api_stream.next().await;
    assert_eq!(changed.endpoints_version, first);
    assert!(changed.endpoints.is_empty(), "{changed:?}");
    assert_eq!(
        changed.endpoint_changes,
        Some(EndpointChanges {
            endpoints: vec![Endpoint {
                address: "10.244.1.18:15006".into(),
                spiffe_id: WEB.into(),
            }],
            ..EndpointChanges::default()
        })
    );
    // Both sidecars accept whatever they are sent from now on.
    let api_task = tokio::spawn(async move {
        loop {
            api_stream.next().await;
        }
    });
    let versions = |answer: &ListWorkloadsResponse| {
        let of = |name| {
            answer
                .replicas
                .iter()
                .find(|r| r.name == name)
                .map(|r| r.snapshot_version)
        };
        (of("cp-a"), of("cp-b"))
    };
    eventually_async("cp-b serves the new pod, cp-a does not", || async {
        let (on_a, on_b) = versions(&a.list_workloads().await);
        (on_a == Some(web_version) && on_b.is_some_and(|v| v != web_version)).then_some(())
    })
    .await;

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.yaml");
    std::fs::write(&file, allow_api_from_web()).unwrap();
    let applied = tokio::task::block_in_place(|| {
        a.ctl(&[
            "policy",
            "apply",
            "-f",
            file.to_str().unwrap(),
            "--wait=20s",
        ])
    });
    let stderr = String::from_utf8_lossy(&applied.stderr);
    assert!(applied.status.success(), "{stderr}");
    let written: u64 = stderr
        .split_once("holds snapshot ")
        .and_then(|(_, rest)| rest.split_once(' '))
        .and_then(|(version, _)| version.parse().ok())
        .unwrap_or_else(|| panic!("no snapshot version in {stderr}"));
    assert!(
        stderr.contains(&format!(
            "every connected sidecar holds snapshot {written} or a later one: 2 on 2 replicas"
        )),
        "{stderr}"
    );
    // The premise: cp-b holds the write, and the Pod cp-a has not seen, so
    // it never served the version the write returned.
    let answer = a.list_workloads().await;
    let (on_a, on_b) = versions(&answer);
    assert_eq!(on_a, Some(written), "{:?}", answer.replicas);
    assert!(on_b.is_some_and(|v| v != written), "{:?}", answer.replicas);
    let api = listed(&answer, API);
    assert_eq!(api.sync(), SnapshotSync::Synced);
    assert_eq!(api.synced_version, on_b.unwrap());

    // A deletion is waited for the same way.
    let deleted = tokio::task::block_in_place(|| {
        a.ctl(&["policy", "delete", "shop/api-from-web", "--wait=20s"])
    });
    let stderr = String::from_utf8_lossy(&deleted.stderr);
    assert!(deleted.status.success(), "{stderr}");
    assert!(
        stderr.contains(" or a later one: 2 on 2 replicas"),
        "{stderr}"
    );
    let answer = a.list_workloads().await;
    let (on_a, on_b) = versions(&answer);
    assert!(on_a.is_some() && on_a != on_b, "{:?}", answer.replicas);

    web_task.abort();
    api_task.abort();
}

/// An AuthorizationPolicy letting web call api on port 8080.
fn allow_api_from_web() -> String {
    format!(
        "apiVersion: trellis.io/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: api-from-web
  namespace: shop
spec:
  selector:
    spiffeIds: [\"{API}\"]
  action: ALLOW
  rules:
    - from:
        - spiffeId: {WEB}
      to:
        - ports: [8080]
"
    )
}
