//! Calls to a Kubernetes Service, end to end: an app calls the Service's
//! cluster IP, pod A's `trellis-proxy init` rules redirect the call to its
//! sidecar, which reads the cluster IP as the original destination and
//! dials a ready backend of the Service in mutual TLS.
//!
//! No Kubernetes API server can run on these machines. The control plane
//! runs `--store kubernetes --identity-provider kubernetes` against the
//! stand-in the control plane's own tests use (`kube_api`), serving what
//! kube-apiserver would list for this lab: the two pods and a third one
//! that is not ready as Pods, the Services and their EndpointSlices
//! (written below, shaped like the recorded documents of
//! `control-plane/tests/fixtures/k8s/store/`), an empty CA Secret (a
//! first install: the first list of pods has none with a sidecar), and
//! for each sidecar's token the recorded TokenReview of a `shop/web`
//! token (renamed to `shop/api` for pod B). The
//! stand-in runs in this test process on a thread inside the `cp`
//! namespace, so the control plane reaches it at that namespace's
//! 127.0.0.1; nothing touches the machine's own network.
//!
//! One test lists a second ready pod of `shop/api` whose app is gone: a
//! host of the lab whose port nothing listens on, so connecting to it is
//! refused at once, as to a pod that died and is still listed until its
//! EndpointSlice is updated.
//!
//! Nothing in the lab answers at a cluster IP (there is no kube-proxy, and
//! pod A's default route leads nowhere): a call gets through only when pod
//! A's sidecar dials a backend itself. The outbound policy is the default,
//! deny, so a sidecar that ignored the snapshot's Services would refuse
//! every call to one as a destination outside the mesh.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;

use serde_json::{Value, json};
use trellis_tests::netns::{Credential, Lab, NetnsRuntime};

use crate::cluster::{
    APP_PORT, B_GREETING, Cluster, SOON, Setup, assert_only_tls_toward, assert_refused, counted,
    skipped,
};
use crate::kube_api::{ENDPOINT_SLICES, FakeKube, PODS, POLICIES, RATE_LIMITS, SERVICES};

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const API: &str = "spiffe://cluster.local/ns/shop/sa/api";
/// The projected tokens the sidecars present; the stand-in reviews each.
/// JWT-shaped, as the control plane requires, and unsigned: the stand-in
/// answers by token.
const WEB_TOKEN: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsifQ.eyJhdWQiOlsidHJlbGxpcyJdLCJleHAiOjQxMDI0NDQ4MDAsInN1YiI6InN5c3RlbTpzZXJ2aWNlYWNjb3VudDpzaG9wOndlYiJ9.c2lnbmF0dXJl";
const API_TOKEN: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsifQ.eyJhdWQiOlsidHJlbGxpcyJdLCJleHAiOjQxMDI0NDQ4MDAsInN1YiI6InN5c3RlbTpzZXJ2aWNlYWNjb3VudDpzaG9wOmFwaSJ9.c2lnbmF0dXJl";

/// `shop/api`: port 80 to the target port named `http`, pod B ready
/// behind it.
const API_SERVICE: &str = "10.96.0.10:80";
/// `shop/checkout`: its only pod runs with a sidecar but is not ready
/// (its readiness probe fails).
const CHECKOUT_SERVICE: &str = "10.96.0.11:80";
/// `shop/legacy`: its only pod is ready but has no sidecar, so the Service
/// is outside the mesh and not published.
const LEGACY_SERVICE: &str = "10.96.0.12:80";
/// A cluster IP no Service has.
const NO_SERVICE: &str = "10.96.0.99:80";

/// The lab's pods, as the lab numbers its hosts (`192.0.2.<n>`).
const POD_A: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const POD_B: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
/// The checkout pod that is not ready: no host has it.
const CHECKOUT_POD: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 3);
/// The legacy pod without a sidecar: no host has it either.
const LEGACY_POD: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 4);
/// A second pod of `shop/api`, listed where a test asks for it: its host
/// answers, but nothing listens on its port.
const GONE_API_POD: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 5);
const WEB_POD: &str = "web-7d4b9c8f6d-x2x8q";
const API_POD: &str = "api-5f6d8b7c4-q9v7m";
const GONE_API_POD_NAME: &str = "api-5f6d8b7c4-w7k2n";
const CHECKOUT_POD_NAME: &str = "checkout-6c9f4d7b8-p3j5r";

/// Pods A and B under a control plane on the Kubernetes store. Fields drop
/// in order: the cluster (apps, sidecars, control plane, namespaces), then
/// the stand-in, then the runtime it ran on.
struct ServiceCluster {
    cluster: Cluster,
    _kube: FakeKube,
    _runtime: NetnsRuntime,
}

/// Pod A's app calls the Service `shop/api` at its cluster IP, as an app in
/// a pod does; it gets pod B's answer. Pod A's sidecar dialled pod B (the
/// Service's ready backend) with pod B's SPIFFE ID expected, pod B's
/// sidecar let pod A's identity in, and only TLS crossed the wire toward
/// pod B. The Services come from the control plane's Kubernetes store,
/// run against a stand-in API server: none can run on these machines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_to_a_service_reaches_its_ready_backend_over_mtls() {
    if skipped() {
        return;
    }
    let mut lab = service_cluster().await;
    let cluster = &mut lab.cluster;
    cluster.capture().await.unwrap();

    a_reaches_b_through_the_api_service(cluster).await;

    let backend = SocketAddr::new(POD_B.into(), APP_PORT);
    cluster
        .a
        .wait_for_sidecar_log(
            &[
                "outbound connection",
                &format!("peer={API}"),
                &format!("remote={backend}"),
                "via=service",
                "shop/api",
                &format!("dst={API_SERVICE}"),
            ],
            SOON,
        )
        .await
        .unwrap();
    let line = cluster
        .b_logs_inbound_from_a(&["inbound connection", "decision=allow"])
        .await;
    assert!(line.contains(&format!(":{APP_PORT}")), "{line}");
    let requests = cluster.apps[0].requests();
    assert!(
        requests.len() == 1 && requests[0].starts_with(&format!("{POD_B} ")),
        "pod B's app should see its own sidecar as the client: {requests:?}"
    );

    assert_only_tls_toward(cluster, backend).await;
    let cluster_ip: SocketAddr = API_SERVICE.parse().unwrap();
    let toward_cluster_ip: Vec<_> = cluster
        .segments()
        .into_iter()
        .filter(|s| s.dst.ip() == cluster_ip.ip())
        .collect();
    assert!(
        toward_cluster_ip.is_empty(),
        "the cluster IP was dialled: {toward_cluster_ip:?}"
    );
}

/// A call to a Service in the mesh none of whose endpoints is ready is
/// refused by pod A's sidecar, which names the Service; a call to a
/// Service with no sidecar behind it (not published) and one to a cluster
/// IP that is no Service's are refused as destinations outside the mesh.
/// Nothing reaches pod B's app. As above, the control plane's Kubernetes
/// store reads a stand-in API server: none can run on these machines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_without_a_ready_backend_and_ones_outside_the_mesh_are_refused() {
    if skipped() {
        return;
    }
    let mut lab = service_cluster().await;
    let cluster = &mut lab.cluster;

    let url = format!("http://{CHECKOUT_SERVICE}/");
    let reply = cluster.a_calls(&url).await.unwrap();
    let says = format!(
        "outbound call to {CHECKOUT_SERVICE} refused: service shop/checkout has no ready backend"
    );
    assert_refused(&reply, 503, &says);
    // An HTTP/2 app is told the same on its first request.
    if let Some(reply) = cluster.a_calls_h2(&url).await.unwrap() {
        assert_refused(&reply, 503, &says);
    }
    cluster
        .a
        .wait_for_sidecar_log(
            &[
                "outbound connection refused: no ready backend",
                "shop/checkout",
                &format!("dst={CHECKOUT_SERVICE}"),
            ],
            SOON,
        )
        .await
        .unwrap();
    counted(&cluster.a, "outbound", "no_backend").await;

    for outside in [LEGACY_SERVICE, NO_SERVICE] {
        let reply = cluster
            .a_calls(&format!("http://{outside}/"))
            .await
            .unwrap();
        assert_refused(&reply, 403, "is outside the mesh");
        let line = cluster
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
        assert!(
            !line.contains("service="),
            "no published Service stands behind {outside}: {line}"
        );
    }

    let requests = cluster.apps[0].requests();
    assert!(requests.is_empty(), "pod B's app was reached: {requests:?}");
}

/// `shop/api` has a second ready pod whose app is gone: its address
/// answers, but nothing listens on its port any more (a pod that died is
/// listed until its EndpointSlice is updated). Every call pod A's app makes
/// to the Service still gets pod B's answer: a call picked for the gone
/// pod is refused at connect, before anything of the app's left, and pod
/// A's sidecar takes it to pod B, naming both backends in its log and
/// counting the detour. No call waits for a timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_picked_for_a_backend_that_is_gone_goes_to_another() {
    if skipped() {
        return;
    }
    let mut lab = service_cluster_with(&[(GONE_API_POD_NAME, GONE_API_POD)], &[]).await;
    let cluster = &mut lab.cluster;
    let gone_host = cluster.lab.host("pod-gone", 5).unwrap();
    assert_eq!(gone_host.ipv4(), GONE_API_POD);

    // The backends are taken in turn: half the calls are picked for the
    // gone pod.
    for _ in 0..4 {
        a_reaches_b_through_the_api_service(cluster).await;
    }

    let gone = SocketAddr::new(GONE_API_POD.into(), APP_PORT);
    let backend = SocketAddr::new(POD_B.into(), APP_PORT);
    cluster
        .a
        .wait_for_sidecar_log(
            &[
                "outbound connection",
                &format!("peer={API}"),
                &format!("remote={backend}"),
                "via=service",
                &format!("tried={gone}, {backend}"),
            ],
            SOON,
        )
        .await
        .unwrap();
    let metrics = cluster.a.metrics().await.unwrap();
    let retried = metrics.counter(
        "trellis_service_connect_retries_total",
        &[("reason", "refused")],
    );
    assert!(retried >= 1.0, "no detour counted: {retried}");
    let timed_out = metrics.counter(
        "trellis_service_connect_retries_total",
        &[("reason", "timeout")],
    );
    assert_eq!(
        timed_out, 0.0,
        "a connect to the gone pod timed out instead of being refused"
    );
    let forwarded = metrics.counter(
        "trellis_connections_total",
        &[("direction", "outbound"), ("outcome", "forwarded")],
    );
    assert_eq!(
        forwarded, 4.0,
        "every call counts once, by its last backend"
    );
    assert_eq!(cluster.apps[0].requests().len(), 4);
}

/// In Kubernetes the control plane refuses a renewal proved by the
/// certificate alone (`--renewal-proof token`, its default there): pod A's
/// sidecar renews its 10 s certificate with its ServiceAccount token, which
/// the stand-in API server reviews, and calls go on over the renewed one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_renews_with_its_service_account_token() {
    if skipped() {
        return;
    }
    let mut lab = service_cluster_with(&[], &["--cert-ttl", "10s"]).await;
    let cluster = &mut lab.cluster;
    cluster
        .a
        .wait_for_sidecar_log(&["certificate issued", "renewal=true"], SOON)
        .await
        .unwrap();
    // Renewed while the certificate was valid, not only once it expired
    // and the token alone proved a new one.
    let log = cluster.a.sidecar_log();
    assert!(!log.contains("certify failed"), "{log}");
    a_reaches_b_through_the_api_service(cluster).await;
}

/// The lab, the stand-in serving it in the `cp` namespace, the control
/// plane on the Kubernetes store, pods A (`shop/web`) and B (`shop/api`)
/// certified by their ServiceAccount tokens, pod B's app serving on
/// [`APP_PORT`]; returns once pod A's sidecar has the endpoints.
/// Pod A's app calls the api Service's virtual address and gets pod B's
/// answer.
async fn a_reaches_b_through_the_api_service(cluster: &Cluster) {
    let reply = cluster
        .a_calls(&format!("http://{API_SERVICE}/"))
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.body, B_GREETING);
}

async fn service_cluster() -> ServiceCluster {
    service_cluster_with(&[], &[]).await
}

/// [`service_cluster`] where the API server also lists `more_api_pods`
/// (name, address): Running pods of `shop/api` with a sidecar, ready
/// behind the Service beside pod B. No host of the lab is made for them.
/// The control plane also gets `more_flags`.
async fn service_cluster_with(
    more_api_pods: &[(&str, Ipv4Addr)],
    more_flags: &[&str],
) -> ServiceCluster {
    let lab = Lab::new().unwrap();
    let cp_host = lab.host("cp", 10).unwrap();
    let runtime = cp_host.netns().runtime().unwrap();
    let kube = runtime.run(FakeKube::start()).await.unwrap();

    kube.set_secret(Some(recorded("store/secret-empty.json")));
    kube.review(WEB_TOKEN, review("web", WEB_POD, POD_A));
    kube.review(API_TOKEN, review("api", API_POD, POD_B));

    kube.lists(
        POLICIES,
        vec![(
            200,
            list("trellis.io/v1alpha1", "AuthorizationPolicyList", vec![]),
        )],
    );
    kube.lists(
        RATE_LIMITS,
        vec![(
            200,
            list("trellis.io/v1alpha1", "RateLimitPolicyList", vec![]),
        )],
    );
    let mut pods = vec![
        pod(WEB_POD, "web", POD_A),
        pod(API_POD, "api", POD_B),
        pod(CHECKOUT_POD_NAME, "checkout", CHECKOUT_POD),
    ];
    pods.extend(more_api_pods.iter().map(|(name, ip)| pod(name, "api", *ip)));
    let mut api_pods = vec![(API_POD, POD_B)];
    api_pods.extend_from_slice(more_api_pods);
    kube.lists(PODS, vec![(200, list("v1", "PodList", pods))]);
    kube.first_install();
    let services = vec![
        service("api", API_SERVICE),
        service("checkout", CHECKOUT_SERVICE),
        service("legacy", LEGACY_SERVICE),
    ];
    kube.lists(SERVICES, vec![(200, list("v1", "ServiceList", services))]);
    let slices = vec![
        endpoint_slice("api", "api-7h5tq", &api_pods, true),
        endpoint_slice(
            "checkout",
            "checkout-c2n6w",
            &[(CHECKOUT_POD_NAME, CHECKOUT_POD)],
            false,
        ),
        endpoint_slice(
            "legacy",
            "legacy-q8w2d",
            &[("legacy-5d8f7c6b9-t4m2x", LEGACY_POD)],
            true,
        ),
    ];
    kube.lists(
        ENDPOINT_SLICES,
        vec![(
            200,
            list("discovery.k8s.io/v1", "EndpointSliceList", slices),
        )],
    );

    let mut flags = kube.control_plane_flags();
    flags.extend(["--default-policy".into(), "allow-mesh".into()]);
    flags.extend(more_flags.iter().map(|f| f.to_string()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let credential = |identity: &str, token: &str| Credential::ServiceAccountToken {
        identity: identity.into(),
        token: token.into(),
    };
    let mut cluster = Cluster::start_in(
        lab,
        cp_host,
        Setup {
            control_plane: &flags,
            init_b: Some(&[]),
            credential_a: credential(WEB, WEB_TOKEN),
            credential_b: credential(API, API_TOKEN),
            ..Setup::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(cluster.a.host().ipv4(), POD_A, "the Pods list pod A there");
    assert_eq!(
        cluster.b().host().ipv4(),
        POD_B,
        "the Pods list pod B there"
    );
    // An app's connect() needs a route to the cluster IP before the OUTPUT
    // rules redirect it; in Kubernetes the pod's default route is that.
    cluster
        .a
        .host()
        .netns()
        .ip(&["route", "add", "default", "dev", "eth0"])
        .unwrap();
    cluster.b_serves(APP_PORT, B_GREETING).await;
    // The Pods list IPv4 addresses only: one endpoint each. `shop/legacy`
    // has no mesh endpoint behind it: only `api` and `checkout` are
    // published.
    let endpoints = format!("endpoints={}", 3 + more_api_pods.len());
    cluster
        .a
        .wait_for_sidecar_log(&["snapshot applied", &endpoints, "services=2"], SOON)
        .await
        .unwrap();
    ServiceCluster {
        cluster,
        _kube: kube,
        _runtime: runtime,
    }
}

/// A recorded API server document of the control plane's tests.
fn recorded(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../control-plane/tests/fixtures/k8s")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// The recorded TokenReview of a `shop/web` token, for a token of pod
/// `pod` (at `ip`) under service account `shop/<account>`.
fn review(account: &str, pod: &str, ip: Ipv4Addr) -> Value {
    let mut review = recorded("tokenreview/authenticated.json");
    let user = &mut review["status"]["user"];
    user["username"] = json!(format!("system:serviceaccount:shop:{account}"));
    user["extra"]["authentication.kubernetes.io/pod-name"] = json!([pod]);
    user["extra"]["authentication.kubernetes.io/pod-uid"] = json!([pod_uid(ip)]);
    review
}

fn pod_uid(ip: Ipv4Addr) -> String {
    format!("00000000-0000-4000-8000-{:012}", u32::from(ip))
}

/// A list as kube-apiserver answers it.
fn list(api_version: &str, kind: &str, items: Vec<Value>) -> Value {
    json!({
        "kind": kind,
        "apiVersion": api_version,
        "metadata": {"resourceVersion": "48220"},
        "items": items,
    })
}

/// A Running pod of namespace `shop` under service account `account`, with
/// the injected `trellis-proxy` sidecar, at `ip`; its app container serves
/// port `http` ([`APP_PORT`]).
fn pod(name: &str, account: &str, ip: Ipv4Addr) -> Value {
    json!({
        "metadata": {
            "name": name,
            "namespace": "shop",
            "uid": pod_uid(ip),
            "resourceVersion": "46021",
            "labels": {"app": account},
            "annotations": {"trellis.io/injected": "true"}
        },
        "spec": {
            "serviceAccountName": account,
            "serviceAccount": account,
            "nodeName": "kind-worker",
            "initContainers": [
                {"name": "trellis-init", "image": "trellis/trellis:0.1.0",
                 "command": ["trellis-proxy", "init"]},
                {"name": "trellis-proxy", "image": "trellis/trellis:0.1.0",
                 "command": ["trellis-proxy"], "restartPolicy": "Always",
                 "ports": [
                     {"name": "trellis-inbound", "containerPort": 15006, "protocol": "TCP"},
                     {"name": "trellis-admin", "containerPort": 15020, "protocol": "TCP"}
                 ]}
            ],
            "containers": [
                {"name": account, "image": format!("registry.example/shop/{account}:1.0"),
                 "ports": [{"name": "http", "containerPort": APP_PORT, "protocol": "TCP"}]}
            ]
        },
        "status": {
            "phase": "Running",
            "podIP": ip.to_string(),
            "podIPs": [{"ip": ip.to_string()}]
        }
    })
}

/// A ClusterIP Service `shop/<name>` at `address` (`ip:port`) to the
/// target port named `http`.
fn service(name: &str, address: &str) -> Value {
    let address: SocketAddrV4 = address.parse().unwrap();
    json!({
        "metadata": {
            "name": name,
            "namespace": "shop",
            "uid": format!("00000000-0000-4000-9000-{:012}", u32::from(*address.ip())),
            "resourceVersion": "45822",
            "labels": {"app": name}
        },
        "spec": {
            "ports": [{"name": "http", "protocol": "TCP", "port": address.port(),
                       "targetPort": "http"}],
            "selector": {"app": name},
            "clusterIP": address.ip().to_string(),
            "clusterIPs": [address.ip().to_string()],
            "type": "ClusterIP",
            "sessionAffinity": "None",
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "internalTrafficPolicy": "Cluster"
        },
        "status": {"loadBalancer": {}}
    })
}

/// The EndpointSlice `name` of Service `shop/<service>`: each of `pods`
/// (name, address), ready or not, port `http` = [`APP_PORT`].
fn endpoint_slice(service: &str, name: &str, pods: &[(&str, Ipv4Addr)], ready: bool) -> Value {
    let endpoints: Vec<Value> = pods
        .iter()
        .map(|(pod, ip)| {
            json!({
                "addresses": [ip.to_string()],
                "conditions": {"ready": ready, "serving": ready, "terminating": false},
                "targetRef": {"kind": "Pod", "namespace": "shop", "name": pod},
                "nodeName": "kind-worker"
            })
        })
        .collect();
    json!({
        "metadata": {
            "name": name,
            "generateName": format!("{service}-"),
            "namespace": "shop",
            "resourceVersion": "46402",
            "labels": {
                "app": service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                "kubernetes.io/service-name": service
            },
            "ownerReferences": [
                {"apiVersion": "v1", "kind": "Service", "name": service, "controller": true,
                 "blockOwnerDeletion": true}
            ]
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "protocol": "TCP", "port": APP_PORT}]
    })
}
