//! The real `trellis-control-plane --store kubernetes` binary against
//! recorded API server answers.
//!
//! No Kubernetes API server can run on these machines. The test stands one
//! in with a local HTTPS server (`kube_api`) that answers the binary's lists
//! and watches with recorded documents from `fixtures/k8s/store/`, keeps the
//! CA Secret as the API server does, and answers TokenReviews with the
//! recorded review of a `shop/web` token.

mod common;
mod kube_api;

use std::sync::Arc;

use base64::Engine as _;
use common::{ControlPlane, Svid, csr_for, eventually_async, p256};
use kube_api::{
    CA_NAMESPACE, CA_SECRET, POLICIES, event, fixture_json, item, policies_list, recorded_cluster,
    web_certify_request,
};
use rustls_pki_types::CertificateDer;
use tonic::Code;
use trellis_proto::admin::v1::ApplyPolicyRequest;
use trellis_proto::discovery::v1::discovery_client::DiscoveryClient;
use trellis_proto::discovery::v1::{Subscribe, WatchRequest, watch_request};

const API: &str = "spiffe://cluster.local/ns/shop/sa/api";
const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

/// No API server can run here: the real `trellis-control-plane --store
/// kubernetes` binary runs against the fake (lists, watches, the empty CA
/// Secret of a first install, TokenReview). It becomes ready, stores its CA in the Secret,
/// certifies a sidecar by its ServiceAccount token, serves the CRD policies
/// through the Admin API, logs the invalid one, pushes the Pods as
/// endpoints and the Services with their backends, and refuses join tokens
/// and revocations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_binary_runs_on_the_kubernetes_store() {
    let fake = recorded_cluster().await;
    fake.set_secret(Some(fixture_json("store/secret-empty.json")));
    fake.first_install();
    let flags = fake.control_plane_flags();
    let cp = tokio::task::spawn_blocking(move || {
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        ControlPlane::start(&flags)
    })
    .await
    .unwrap();
    let ready = std::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("http://{}/ready", cp.admin))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&ready.stdout), "200");

    let secret = fake.secret().unwrap();
    let stored = base64::engine::general_purpose::STANDARD
        .decode(secret["data"]["tls.crt"].as_str().unwrap())
        .unwrap();
    let bundle = std::fs::read_to_string(cp.state_dir.join("bundle.pem")).unwrap();
    assert_eq!(String::from_utf8(stored).unwrap(), bundle);

    let key = p256();
    let mut identity = cp.identity_client(None).await;
    let response = identity
        .certify(web_certify_request(csr_for(&key, WEB)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.spiffe_id, WEB);
    let svid = Svid {
        key,
        chain: response
            .chain
            .iter()
            .cloned()
            .map(CertificateDer::from)
            .collect(),
    };
    assert_eq!(
        response.trust_bundle,
        cp.bundle().iter().map(|c| c.to_vec()).collect::<Vec<_>>()
    );

    let listed = cp.ctl(&["policy", "list", "-o", "json"]);
    let stdout = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.status.success(), "{stdout}");
    assert!(
        stdout.contains("web-to-api") && stdout.contains("deny-legacy"),
        "{stdout}"
    );
    assert!(!stdout.contains("misspelt-port"), "{stdout}");
    cp.wait_for_line("the misspelt policy to be reported as skipped", |l| {
        l.contains("skipped an invalid object") && l.contains("shop/misspelt-port")
    });

    let workloads = cp.ctl(&["workloads"]);
    let stdout = String::from_utf8_lossy(&workloads.stdout);
    assert!(workloads.status.success(), "{stdout}");
    assert!(
        stdout.contains("10.244.1.17:15006") && stdout.contains(API),
        "{stdout}"
    );

    // The sidecar's snapshot: the policies that select it and the Pods as
    // endpoints; a DELETED event reaches it as a new snapshot.
    let channel = trellis_core::grpc::connect(&cp.grpc, Arc::new(cp.client_config(Some(&svid))))
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(WatchRequest {
        kind: Some(watch_request::Kind::Subscribe(Subscribe {
            inbound_address: "10.244.1.17:15006".into(),
            inbound_addresses: vec!["10.244.1.17:15006".into()],
            last_version: 0,
            accepts_endpoints_version: false,
            accepts_endpoint_changes: false,
            last_version_epoch: 0,
            warnings: Vec::new(),
            opaque_ports: Vec::new(),
        })),
    })
    .await
    .unwrap();
    let mut snapshots = DiscoveryClient::new(channel)
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = snapshots.message().await.unwrap().unwrap();
    let names: Vec<_> = first.policies.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["deny-legacy"]);
    let endpoints: Vec<_> = first.endpoints.iter().map(|e| e.address.as_str()).collect();
    assert_eq!(endpoints, ["10.244.1.17:15006", "10.244.2.9:15006"]);
    // The recorded Services in the mesh: each virtual IP and TCP port with
    // the ready endpoints of its EndpointSlices.
    let services: Vec<_> = first
        .services
        .iter()
        .map(|s| format!("{} {} [{}]", s.address, s.name, s.backends.join(" ")))
        .collect();
    assert_eq!(
        services,
        [
            "10.96.120.34:80 shop/web [10.244.1.17:8080]",
            "10.96.200.5:80 shop/storefront [10.244.1.17:8080]",
            "10.96.45.210:8080 shop/api [10.244.2.9:8080]",
            "10.96.45.210:9090 shop/api []",
            "172.18.255.200:80 shop/storefront [10.244.1.17:8080]",
            "198.51.100.7:80 shop/storefront [10.244.1.17:8080]",
        ]
    );
    eventually_async("the control plane to watch", || async {
        (fake.watching(POLICIES) == 1).then_some(())
    })
    .await;
    fake.publish(
        POLICIES,
        event("DELETED", &item(&policies_list(), "deny-legacy", 48700)),
    );
    let second = snapshots.message().await.unwrap().unwrap();
    assert!(second.policies.is_empty(), "{second:?}");
    assert_ne!(second.version, first.version);

    // An apply through the Admin API becomes an object on the API server;
    // a write the API server refuses (here: the validating webhook's denial)
    // keeps its meaning for the caller.
    let mut admin = cp.admin_client().await;
    let document = "apiVersion: trellis.io/v1alpha1\nkind: AuthorizationPolicy\n\
                    metadata: {name: from-shop, namespace: shop}\n\
                    spec:\n  selector: {spiffeIds: [\"spiffe://cluster.local/ns/shop/sa/api\"]}\n  \
                    action: ALLOW\n  rules: [{from: [{namespace: shop}], to: [{ports: [9090]}]}]\n";
    let applied = admin
        .apply_policy(ApplyPolicyRequest {
            document: document.into(),
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(applied.results[0].revision, 1);
    // Its versions are digests of the content, set in no epoch.
    assert_eq!(applied.snapshot_version_epoch, 0);
    let post = fake
        .requests()
        .into_iter()
        .find(|r| r.method == "POST" && r.path.ends_with("/namespaces/shop/authorizationpolicies"))
        .expect("the apply creates the object");
    assert_eq!(post.body["metadata"]["name"], "from-shop");
    let denial = "admission webhook \"validate.trellis.io\" denied the request: \
                  AuthorizationPolicy shop/from-shop is invalid";
    fake.refuse_writes(400, kube_api::status(400, "BadRequest", denial));
    let refused = admin
        .apply_policy(ApplyPolicyRequest {
            document: document.replace("9090", "9091"),
            dry_run: false,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("denied the request"),
        "{refused:?}"
    );

    // Join tokens have no place here: neither made nor accepted.
    let refused = cp
        .certify(
            csr_for(&p256(), WEB),
            Some("a-join-token"),
            None,
            "10.244.1.17:15006",
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    let status = admin
        .create_join_token(trellis_proto::admin::v1::CreateJoinTokenRequest {
            spiffe_id: WEB.into(),
            ttl_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("ServiceAccount token"),
        "{status:?}"
    );
    // Nor revocations: the operator is told what stops a pod renewing.
    for args in [
        &["identity", "revoke", WEB][..],
        &["identity", "revocations"][..],
    ] {
        let refused = cp.ctl(args);
        assert_eq!(refused.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(
            stderr.starts_with("error: failed precondition: ") && stderr.contains("delete the pod"),
            "{args:?}: {stderr}"
        );
    }
    cp.stop_async().await;
}

/// No API server can run here: with `--store kubernetes`, a start on a
/// state dir where a killed control plane left the temporary files of its
/// writes (one of another pid, one of pid 1 as a container's process has
/// at every restart, whose file the start finds unchanged and so does
/// not write again) removes them, and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_on_the_kubernetes_store_removes_the_temp_files_a_crash_left() {
    let fake = recorded_cluster().await;
    fake.set_secret(Some(fixture_json("store/secret-empty.json")));
    fake.first_install();
    let flags = fake.control_plane_flags();
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let start = |tmp: Arc<tempfile::TempDir>, flags: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            ControlPlane::start_in(tmp, &flags)
        })
    };
    let cp = start(tmp.clone(), flags.clone()).await.unwrap();
    let state = cp.state_dir.clone();
    // The state dir's lock, its only guard on this store, is held while
    // it runs and gone with the process.
    let probe = std::fs::File::open(&state).unwrap();
    assert!(
        matches!(probe.try_lock(), Err(std::fs::TryLockError::WouldBlock)),
        "a running control plane holds the state dir's lock"
    );
    drop(cp);
    probe.try_lock().expect("the lock freed at exit");
    drop(probe);
    let left = [".bundle.pem.tmp-1", ".admin.key.tmp-4194304"];
    for name in left {
        std::fs::write(state.join(name), b"half written").unwrap();
    }
    std::fs::write(state.join(".notes.tmp-7"), b"not ours").unwrap();
    let cp = start(tmp.clone(), flags).await.unwrap();
    for name in left {
        assert!(!state.join(name).exists(), "{name} left in {state:?}");
    }
    assert!(state.join(".notes.tmp-7").exists());
    let log = cp.log.lock().unwrap().clone();
    assert!(
        log.contains("removed a temporary file a write cut short by a crash left"),
        "{log}"
    );
}

/// No API server can run here: the fake lists a policy object with an L7
/// rule on port 5432, written past the webhook. Started with
/// `--opaque-ports 5432`, which every sidecar would then refuse that
/// policy for, the binary exits 64 naming the policy and the flag, as it
/// does for a policy of the embedded store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listed_policy_with_l7_rules_on_an_opaque_port_stops_the_start() {
    let fake = recorded_cluster().await;
    fake.set_secret(Some(fixture_json("store/secret-empty.json")));
    fake.first_install();
    let mut list = policies_list();
    let mut l7 = item(&list, "web-to-api", 48300);
    l7["spec"]["rules"][0]["to"] = serde_json::json!([{"ports": [5432], "methods": ["GET"]}]);
    list["items"] = serde_json::json!([l7]);
    fake.lists(POLICIES, vec![(200, list)]);
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(common::CP)
        .arg("--state-dir")
        .arg(tmp.path().join("state"))
        .args(fake.control_plane_flags())
        .args(["--opaque-ports", "5432"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("--opaque-ports"), "{stderr}");
    assert!(stderr.contains("shop/web-to-api"), "{stderr}");
}

/// No API server can run here: the fake only proves that nothing asks it
/// anything. Flags the Kubernetes store cannot work with exit 64 naming
/// the flag, before any port, file or API request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_store_flags_exit_64_before_asking_the_api_server() {
    let fake = recorded_cluster().await;
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let url = fake.url();
    let ca = fake.ca().display().to_string();
    let store = [
        "--store",
        "kubernetes",
        "--kube-api",
        url.as_str(),
        "--kube-ca",
        ca.as_str(),
    ];
    let provider = ["--identity-provider", "kubernetes"];
    let secret = ["--ca-secret", CA_SECRET, "--namespace", CA_NAMESPACE];
    let operator_ca = ["--ca-cert", "c.pem", "--ca-key", "k.pem"];
    let cases: Vec<(Vec<&str>, &str)> = vec![
        ([&store[..], &provider[..]].concat(), "--ca-secret"),
        (
            [&store[..], &secret[..]].concat(),
            "--identity-provider kubernetes",
        ),
        (
            [&store[..], &provider, &secret, &operator_ca].concat(),
            "--ca-cert",
        ),
        (
            [&store[..], &provider, &["--ca-secret", "Not_A_Name"]].concat(),
            "--ca-secret",
        ),
        (vec!["--ca-secret", CA_SECRET], "--store kubernetes"),
        (vec!["--store", "etcd"], "--store"),
    ];
    for (args, names) in cases {
        let out = std::process::Command::new(common::CP)
            .arg("--state-dir")
            .arg(&state)
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains(names), "{args:?}: {stderr}");
        assert!(!state.exists(), "{args:?} must not create the state dir");
    }
    assert!(fake.requests().is_empty(), "{:?}", fake.requests());
}
