//! The `/inject` mutating webhook as a specification: AdmissionReview in,
//! JSONPatch out, the patch applied to the pod and the pod checked.
//!
//! No Kubernetes API server can run on these machines. The fixtures in
//! `fixtures/k8s/` are real `admission.k8s.io/v1` AdmissionReview documents
//! as the API server sends them to a webhook (after its built-in admission
//! plugins ran: the ServiceAccount token volume and the default tolerations
//! are already there), and the patch is applied with an RFC 6902
//! implementation (`json-patch`), as the API server applies it.

mod admission;
mod chart;

use admission::*;
use serde_json::{Value, json};
use trellis_control_plane::inject::{
    AdmissionRequest, FailurePolicy, InjectConfig, IpFamily, MAX_UNKNOWN_NAME_WARNINGS,
    NamespaceScope, OutboundPolicy, POD_ANNOTATIONS, POD_LABELS, TrustBundleSource,
    respond_pod_reporting, review_pod,
};

/// A Deployment's pod gets the init container, then the native sidecar,
/// then its own init containers; its app containers stay where they were.
/// Real AdmissionReview from the ReplicaSet controller; no API server here.
#[test]
fn injects_init_container_then_native_sidecar_before_the_pods_own() {
    let review = fixture("pod-deployment-http-probes.json");
    let pod = injected(&review);
    assert_eq!(
        names(&pod["spec"]["initContainers"]),
        ["trellis-init", "trellis-proxy", "wait-for-db"]
    );
    assert_eq!(names(&pod["spec"]["containers"]), ["web", "log-shipper"]);
    let proxy = container(&pod, "initContainers", "trellis-proxy");
    assert_eq!(proxy["restartPolicy"], "Always");
    assert_eq!(proxy["image"], IMAGE);
    assert_eq!(
        proxy["startupProbe"]["httpGet"],
        json!({"path": "/ready", "port": 15020, "scheme": "HTTP"})
    );
    assert_eq!(proxy["readinessProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(proxy["livenessProbe"]["httpGet"]["path"], "/live");
    assert!(proxy["resources"]["requests"]["cpu"].is_string());
    assert!(proxy["resources"]["limits"]["memory"].is_string());
    // The pod's own init container is untouched.
    assert_eq!(
        container(&pod, "initContainers", "wait-for-db"),
        &review["request"]["object"]["spec"]["initContainers"][0]
    );
}

/// The init container is root with exactly NET_ADMIN and NET_RAW; the
/// sidecar is UID 1337 with nothing. Real AdmissionReview; no API server here.
#[test]
fn security_contexts_grant_only_what_each_container_needs() {
    let pod = injected(&fixture("pod-deployment-http-probes.json"));
    let init = container(&pod, "initContainers", "trellis-init");
    assert_eq!(
        init["securityContext"],
        json!({
            "runAsUser": 0, "runAsGroup": 0, "runAsNonRoot": false, "privileged": false,
            "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        })
    );
    let proxy = container(&pod, "initContainers", "trellis-proxy");
    assert_eq!(
        proxy["securityContext"],
        json!({
            "runAsUser": 1337, "runAsGroup": 1337, "runAsNonRoot": true, "privileged": false,
            "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        })
    );
}

/// `trellis-proxy init` gets the proxy UID, its ports, the admin port, DNS
/// to the pod's nameservers (and no other host) left to the cluster's DNS,
/// the pod's exclusion annotations and the mesh's outbound policy. Real
/// AdmissionReview; no API server here.
#[test]
fn exclusion_annotations_become_init_flags() {
    let pod = injected(&fixture("pod-deployment-http-probes.json"));
    let init = container(&pod, "initContainers", "trellis-init");
    assert_eq!(init["command"], json!(["trellis-proxy"]));
    assert_eq!(
        init["args"],
        json!([
            "init",
            "--proxy-uid",
            "1337",
            "--inbound-port",
            "15006",
            "--outbound-port",
            "15001",
            "--exclude-ports",
            "15020,9100",
            "--exclude-outbound-cidrs",
            "169.254.169.254/32",
            "--exclude-outbound-dns",
            "--outbound-policy",
            "deny"
        ])
    );
}

/// The sidecar's identity, token, bundle and addresses all come from the
/// pod itself (downward API) and one read-only projected volume.
/// Real AdmissionReview; no API server here.
#[test]
fn sidecar_gets_identity_token_and_bundle() {
    let review = fixture("pod-deployment-http-probes.json");
    let pod = injected(&review);
    let proxy = container(&pod, "initContainers", "trellis-proxy");
    let env = env(proxy);
    let field = |path: &str| json!({"fieldRef": {"fieldPath": path}});
    assert_eq!(env["TRELLIS_POD_NAME"], field("metadata.name"));
    assert_eq!(env["TRELLIS_POD_NAMESPACE"], field("metadata.namespace"));
    assert_eq!(
        env["TRELLIS_SERVICE_ACCOUNT"],
        field("spec.serviceAccountName")
    );
    assert_eq!(env["TRELLIS_POD_IP"], field("status.podIP"));
    assert_eq!(
        env["TRELLIS_IDENTITY"],
        "spiffe://cluster.local/ns/$(TRELLIS_POD_NAMESPACE)/sa/$(TRELLIS_SERVICE_ACCOUNT)"
    );
    assert_eq!(
        env["TRELLIS_CONTROL_PLANE"],
        "trellis-control-plane.trellis-system.svc:15012"
    );
    assert_eq!(env["TRELLIS_TOKEN_FILE"], "/var/run/trellis/identity/token");
    // The projected token is a ServiceAccount token, re-read for every Certify.
    assert_eq!(env["TRELLIS_TOKEN_TYPE"], "service-account");
    assert_eq!(
        env["TRELLIS_TRUST_BUNDLE"],
        "/var/run/trellis/identity/bundle.pem"
    );
    // IPv4 pods by default (`ip_families_decide_the_sidecars_addresses`).
    assert_eq!(env["TRELLIS_ADMIN"], "0.0.0.0:15020");
    assert_eq!(env["TRELLIS_POD_IPS"], field("status.podIPs"));
    // Every pod IP (IPv4 and IPv6 in a dual-stack cluster), each a mesh
    // endpoint on the sidecar's inbound port.
    assert_eq!(env["TRELLIS_ADVERTISE_ADDRESS"], "$(TRELLIS_POD_IPS)");
    // The default ports: the sidecar listens on both IP families.
    assert!(!env.contains_key("TRELLIS_INBOUND"), "{env:?}");
    assert!(!env.contains_key("TRELLIS_OUTBOUND"), "{env:?}");
    // Kubernetes expands $(VAR) only from variables defined earlier.
    let order: Vec<&str> = proxy["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    let at = |name| order.iter().position(|n| *n == name).unwrap();
    assert!(at("TRELLIS_POD_NAMESPACE") < at("TRELLIS_IDENTITY"));
    assert!(at("TRELLIS_SERVICE_ACCOUNT") < at("TRELLIS_IDENTITY"));
    assert!(at("TRELLIS_POD_IPS") < at("TRELLIS_ADVERTISE_ADDRESS"));

    assert_eq!(
        proxy["volumeMounts"],
        json!([{"name": "trellis-identity", "mountPath": "/var/run/trellis/identity", "readOnly": true}])
    );
    let volumes = pod["spec"]["volumes"].as_array().unwrap();
    assert_eq!(
        names(&pod["spec"]["volumes"]),
        [
            "cache",
            "kube-api-access-7xq2m",
            "trellis-identity",
            "trellis-xtables"
        ]
    );
    assert_eq!(
        volumes[2],
        json!({"name": "trellis-identity", "projected": {"defaultMode": 0o444, "sources": [
            {"serviceAccountToken": {"audience": "trellis", "expirationSeconds": 3600, "path": "token"}},
            {"downwardAPI": {"items": [{"path": "bundle.pem",
                "fieldRef": {"fieldPath": "metadata.annotations['trellis.io/trust-bundle']"}}]}},
        ]}})
    );
    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(annotations["trellis.io/injected"], "true");
    assert_eq!(annotations["trellis.io/trust-bundle"], BUNDLE);
    // The pod's own annotations stay.
    assert_eq!(
        annotations["kubectl.kubernetes.io/restartedAt"],
        "2026-11-20T09:12:44Z"
    );
    // No app container mounts the token.
    for app in pod["spec"]["containers"].as_array().unwrap() {
        let mounts = app["volumeMounts"].as_array().into_iter().flatten();
        assert!(mounts.into_iter().all(|m| m["name"] != "trellis-identity"));
    }
}

/// Everything the injector does not own is left exactly as it was.
/// Real AdmissionReview; no API server here.
#[test]
fn leaves_the_rest_of_the_pod_alone() {
    let review = fixture("pod-deployment-http-probes.json");
    let before = &review["request"]["object"];
    let after = injected(&review);
    for (key, value) in before["spec"].as_object().unwrap() {
        if !["initContainers", "containers", "volumes"].contains(&key.as_str()) {
            assert_eq!(&after["spec"][key], value, "spec.{key}");
        }
    }
    for (key, value) in before["metadata"].as_object().unwrap() {
        if key != "annotations" {
            assert_eq!(&after["metadata"][key], value, "metadata.{key}");
        }
    }
    assert_eq!(after["status"], before["status"]);
    // App containers differ only in their rewritten probes.
    let strip = |c: &Value| {
        let mut c = c.clone();
        for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
            c.as_object_mut().unwrap().remove(probe);
        }
        c
    };
    for (b, a) in before["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .zip(after["spec"]["containers"].as_array().unwrap())
    {
        assert_eq!(strip(a), strip(b));
    }
}

/// HTTP and TCP probes of app containers go to the sidecar's admin port,
/// which init leaves out of interception, and the sidecar learns the
/// original checks; exec probes are unchanged. Real AdmissionReview with
/// a named-port probe and a probe with headers; no API server here.
#[test]
fn rewrites_app_probes_to_the_sidecar_admin_port() {
    let review = fixture("pod-deployment-http-probes.json");
    let before = &review["request"]["object"];
    let pod = injected(&review);
    let web = container(&pod, "containers", "web");
    assert_eq!(
        web["livenessProbe"],
        json!({
            "httpGet": {"path": "/app-health/web/liveness", "port": 15020, "scheme": "HTTP"},
            "initialDelaySeconds": 5, "timeoutSeconds": 1, "periodSeconds": 10,
            "successThreshold": 1, "failureThreshold": 3,
        })
    );
    assert_eq!(
        web["readinessProbe"]["httpGet"],
        json!({"path": "/app-health/web/readiness", "port": 15020, "scheme": "HTTP"})
    );
    let shipper = container(&pod, "containers", "log-shipper");
    assert_eq!(
        shipper["livenessProbe"]["httpGet"]["path"],
        "/app-health/log-shipper/liveness"
    );
    assert!(shipper["livenessProbe"].get("tcpSocket").is_none());
    assert_eq!(
        shipper["readinessProbe"],
        before["spec"]["containers"][1]["readinessProbe"]
    );

    let probes = app_probes(&pod);
    assert_eq!(
        probes,
        json!({
            "/app-health/web/liveness": {"httpGet": {"port": 8080, "path": "/healthz", "scheme": "HTTP"}},
            "/app-health/web/readiness": {"httpGet": {"port": 8080, "path": "/ready", "scheme": "HTTP",
                "httpHeaders": [{"name": "X-Probe", "value": "kubelet"}]}},
            "/app-health/log-shipper/liveness": {"tcpSocket": {"port": 24224}},
        })
    );
    // The admin port the probes now use is excluded from interception.
    let init = container(&pod, "initContainers", "trellis-init");
    let args = init["args"].as_array().unwrap();
    let at = args.iter().position(|a| a == "--exclude-ports").unwrap();
    assert!(
        args[at + 1]
            .as_str()
            .unwrap()
            .split(',')
            .any(|p| p == "15020")
    );
}

/// An `httpGet` lifecycle hook goes through the sidecar's admin port,
/// which every pod of the cluster reaches: the rewritten hook carries a
/// token of the pod's own in `x-trellis-hook-token`, and the sidecar gets
/// the same one in `TRELLIS_HOOK_TOKEN`, so it runs the app's hook only for
/// the kubelet. Each pod gets its own; a reinvocation leaves it as it is;
/// a pod without hooks gets none. The real AdmissionReview of
/// `rewrites_app_probes_to_the_sidecar_admin_port`, its `web` container
/// given a preStop hook as the API server sends it (defaults filled in);
/// no API server here.
#[test]
fn a_rewritten_hook_carries_the_token_the_sidecar_is_given() {
    let mut review = fixture("pod-deployment-http-probes.json");
    review["request"]["object"]["spec"]["containers"][0]["lifecycle"] = json!({
        "preStop": {"httpGet": {"path": "/drain", "port": "http", "scheme": "HTTP"}},
    });
    let pod = injected(&review);
    let proxy = container(&pod, "initContainers", "trellis-proxy");
    let token = env(proxy)["TRELLIS_HOOK_TOKEN"]
        .as_str()
        .expect("the sidecar is given a hook token")
        .to_owned();
    assert_eq!(token.len(), 64, "{token}");
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()), "{token}");
    let web = container(&pod, "containers", "web");
    assert_eq!(
        web["lifecycle"],
        json!({"preStop": {"httpGet": {
            "path": "/app-health/web/pre-stop", "port": 15020, "scheme": "HTTP",
            "httpHeaders": [{"name": "x-trellis-hook-token", "value": token}],
        }}})
    );
    // The app's own request carries no token: the sidecar makes it from
    // the original hook.
    assert_eq!(
        app_probes(&pod)["/app-health/web/pre-stop"],
        json!({"httpGet": {"port": 8080, "path": "/drain", "scheme": "HTTP"}})
    );

    // Another pod of the same Deployment: another token.
    let other = injected(&review);
    let other =
        env(container(&other, "initContainers", "trellis-proxy"))["TRELLIS_HOOK_TOKEN"].clone();
    assert_ne!(other, json!(token));

    // Re-sent injected, as on reinvocation: nothing changes, the token
    // neither.
    let again = answer(
        &with_object(&review, pod.clone()),
        NamespaceScope::SelectedByWebhook,
        &config(),
    );
    assert!(patch_of(&again).is_none(), "{again}");

    // Without hooks the sidecar has nothing to guard, and no token.
    let plain = injected(&fixture("pod-deployment-http-probes.json"));
    let plain_env = env(container(&plain, "initContainers", "trellis-proxy"));
    assert!(
        !plain_env.contains_key("TRELLIS_HOOK_TOKEN"),
        "{plain_env:?}"
    );
}

/// The pod's own native sidecar (an init container with `restartPolicy:
/// Always`, here cloud-sql-proxy) is probed on the pod IP like an app
/// container, so its probes go to the sidecar's admin port too, or the
/// kubelet's probes would meet the mTLS port and the pod would never start;
/// an ordinary init container is left exactly as it was. Real
/// AdmissionReview from the ReplicaSet controller (fixtures/k8s); no
/// Kubernetes API server can run here.
#[test]
fn rewrites_probes_of_the_pods_own_native_sidecars() {
    let review = fixture("pod-native-sidecar-probes.json");
    let before = &review["request"]["object"];
    let pod = injected(&review);
    assert_eq!(
        names(&pod["spec"]["initContainers"]),
        [
            "trellis-init",
            "trellis-proxy",
            "cloud-sql-proxy",
            "migrate"
        ]
    );
    let sql = container(&pod, "initContainers", "cloud-sql-proxy");
    assert_eq!(sql["restartPolicy"], "Always");
    assert_eq!(
        sql["startupProbe"],
        json!({
            "httpGet": {"path": "/app-health/cloud-sql-proxy/startup", "port": 15020, "scheme": "HTTP"},
            "timeoutSeconds": 5, "periodSeconds": 1, "successThreshold": 1, "failureThreshold": 20,
        })
    );
    assert_eq!(
        sql["livenessProbe"]["httpGet"],
        json!({"path": "/app-health/cloud-sql-proxy/liveness", "port": 15020, "scheme": "HTTP"})
    );
    assert_eq!(
        sql["readinessProbe"]["httpGet"],
        json!({"path": "/app-health/cloud-sql-proxy/readiness", "port": 15020, "scheme": "HTTP"})
    );
    assert!(sql["readinessProbe"].get("tcpSocket").is_none());
    // Nothing else of it changes.
    let strip = |c: &Value| {
        let mut c = c.clone();
        for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
            c.as_object_mut().unwrap().remove(probe);
        }
        c
    };
    assert_eq!(strip(sql), strip(&before["spec"]["initContainers"][0]));
    // The ordinary init container is untouched.
    assert_eq!(
        container(&pod, "initContainers", "migrate"),
        &before["spec"]["initContainers"][1]
    );
    // The app container's probe is rewritten as before.
    assert_eq!(
        container(&pod, "containers", "orders")["readinessProbe"]["httpGet"]["path"],
        "/app-health/orders/readiness"
    );

    // The sidecar runs the original checks, named ports resolved.
    let probes = app_probes(&pod);
    assert_eq!(
        probes,
        json!({
            "/app-health/cloud-sql-proxy/startup": {"httpGet": {"port": 9090, "path": "/startup", "scheme": "HTTP"}},
            "/app-health/cloud-sql-proxy/liveness": {"httpGet": {"port": 9090, "path": "/liveness", "scheme": "HTTP"}},
            "/app-health/cloud-sql-proxy/readiness": {"tcpSocket": {"port": 5432}},
            "/app-health/orders/readiness": {"httpGet": {"port": 8080, "path": "/ready", "scheme": "HTTP"}},
        })
    );
    let reply = answer_for(&review);
    assert!(reply["response"].get("warnings").is_none(), "{reply}");
}

/// A native sidecar of the pod running as the proxy's UID bypasses the mesh
/// as an app container would, and so does an ordinary init container (it
/// runs after the sidecar has started): the warning names both. Real
/// AdmissionReview (fixtures/k8s); no Kubernetes API server can run here.
#[test]
fn warns_when_a_native_sidecar_runs_as_the_proxy_uid() {
    let review = fixture("pod-native-sidecar-probes.json");
    let mut pod = review["request"]["object"].clone();
    pod["spec"]["securityContext"]["runAsUser"] = json!(1337);
    pod["spec"]["containers"][0]["securityContext"] = json!({"runAsUser": 10001});
    let reply = answer(
        &with_object(&review, pod),
        NamespaceScope::SelectedByWebhook,
        &passthrough(),
    );
    assert!(patch_of(&reply).is_some());
    let says = |container: &str| {
        format!(
            "container \"{container}\" runs as UID 1337, the proxy's UID: its traffic bypasses \
             the sidecar"
        )
    };
    assert_eq!(
        reply["response"]["warnings"],
        json!([says("cloud-sql-proxy"), says("migrate")])
    );
}

/// The kubelet probes a pod at `status.podIP`, an address of the cluster's
/// primary family, and the sidecar binds an IPv6 address for IPv6 only: so
/// the admin port (where the rewritten probes go) listens on every address
/// of the primary family, and named listeners on each family the cluster
/// has. The admin address is bound as the sidecar binds it (`IPV6_V6ONLY`
/// on an IPv6 address) and dialled from that family's loopback, standing in
/// for the pod IP. Real AdmissionReview (fixtures/k8s); no Kubernetes API
/// server can run here.
#[test]
fn ip_families_decide_the_sidecars_addresses() {
    use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
    let review = fixture("pod-deployment-http-probes.json");
    let has_ipv6 = TcpListener::bind("[::1]:0").is_ok();
    if !has_ipv6 {
        chart::machine::note(
            "skipped: no IPv6 loopback (the [::] admin addresses are rendered, not dialled)",
        );
    }
    for (families, admin, loopback) in [
        (vec![IpFamily::V4], "0.0.0.0:15020", "127.0.0.1"),
        (vec![IpFamily::V6], "[::]:15020", "::1"),
        (
            vec![IpFamily::V4, IpFamily::V6],
            "0.0.0.0:15020",
            "127.0.0.1",
        ),
        (vec![IpFamily::V6, IpFamily::V4], "[::]:15020", "::1"),
    ] {
        let config = InjectConfig {
            ip_families: families.clone(),
            ..config()
        };
        let reply = answer(&review, NamespaceScope::SelectedByWebhook, &config);
        let pod = apply(&review["request"]["object"], &patch_of(&reply).unwrap());
        let env = env(container(&pod, "initContainers", "trellis-proxy"));
        assert_eq!(env["TRELLIS_ADMIN"], admin, "{families:?}");
        // IPv6 rules are required wherever pods have IPv6, never guessed.
        let args = &container(&pod, "initContainers", "trellis-init")["args"];
        let ipv6_on = args
            .as_array()
            .unwrap()
            .windows(2)
            .any(|w| w == [json!("--ipv6"), json!("on")]);
        assert_eq!(
            ipv6_on,
            families.contains(&IpFamily::V6),
            "{families:?}: {args}"
        );

        let mut addr: SocketAddr = admin.parse().unwrap();
        if addr.is_ipv6() && !has_ipv6 {
            continue;
        }
        addr.set_port(0);
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            None,
        )
        .unwrap();
        if addr.is_ipv6() {
            socket.set_only_v6(true).unwrap();
        }
        socket.bind(&addr.into()).unwrap();
        socket.listen(8).unwrap();
        let listener = TcpListener::from(socket);
        let port = listener.local_addr().unwrap().port();
        let peer: IpAddr = loopback.parse().unwrap();
        TcpStream::connect((peer, port))
            .unwrap_or_else(|e| panic!("{families:?}: {admin} refuses {peer}: {e}"));
    }

    // Ports other than the sidecar's defaults are named, once per family.
    let config = InjectConfig {
        ip_families: vec![IpFamily::V6, IpFamily::V4],
        inbound_port: 16006,
        outbound_port: 16001,
        ..config()
    };
    let reply = answer(&review, NamespaceScope::SelectedByWebhook, &config);
    let pod = apply(&review["request"]["object"], &patch_of(&reply).unwrap());
    let env = env(container(&pod, "initContainers", "trellis-proxy"));
    assert_eq!(env["TRELLIS_INBOUND"], "[::]:16006,0.0.0.0:16006");
    assert_eq!(env["TRELLIS_OUTBOUND"], "[::1]:16001,127.0.0.1:16001");
}

/// Injecting an injected pod changes nothing: the second answer has no
/// patch. Real AdmissionReview, re-sent with the patched pod as the API
/// server re-invokes webhooks (`reinvocationPolicy: IfNeeded`).
/// Real AdmissionReview documents (fixtures/k8s) as the API server sends them; no
/// Kubernetes API server can run here.
#[test]
fn injecting_twice_equals_injecting_once() {
    let review = fixture("pod-deployment-http-probes.json");
    let once = injected(&review);
    let again = answer(
        &with_object(&review, once.clone()),
        NamespaceScope::SelectedByWebhook,
        &config(),
    );
    assert_eq!(again["response"]["allowed"], true);
    assert!(patch_of(&again).is_none(), "{again}");
    assert!(again["response"].get("warnings").is_none());
}

/// A pod that already carries the sidecar gets no patch. The fixture is the
/// real AdmissionReview the API server sends when it re-invokes the webhook
/// (`reinvocationPolicy: IfNeeded`) after a later webhook added a label to
/// the injected pod; no API server here.
#[test]
fn an_already_injected_pod_gets_no_patch() {
    let review = fixture("pod-already-injected.json");
    let reply = answer(&review, NamespaceScope::SelectedByWebhook, &config());
    assert_eq!(
        reply,
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
               "response": {"uid": review["request"]["uid"], "allowed": true}})
    );
    // Our containers alone (marker annotation removed) are enough to tell.
    let mut pod = review["request"]["object"].clone();
    pod["metadata"]["annotations"]
        .as_object_mut()
        .unwrap()
        .remove("trellis.io/injected");
    let answer2 = answer_for(&with_object(&review, pod));
    assert!(patch_of(&answer2).is_none());
}

/// A container a mutating webhook called after ours adds (a Vault agent
/// with an `httpGet` readiness probe on a named port and an `httpGet`
/// preStop hook; a log forwarder as a native sidecar with a `tcpSocket`
/// liveness probe) would be probed in plaintext on the sidecar's mTLS port
/// and the pod never become Ready: the API server calls `/inject` again
/// (`reinvocationPolicy: IfNeeded`), and the added containers' probes and
/// hook are rewritten as the first injection rewrites them, the sidecar
/// told of their checks and given a hook token for the hook, the
/// containers of the first injection left exactly as they were. Reviewed
/// once more, the pod gets no patch. The documents are real AdmissionReview
/// documents (fixtures/k8s) as the API server sends them, the first
/// answer's patch applied as it applies it (`json-patch`) and the other
/// webhook's containers added as it would send them (defaults filled in);
/// no Kubernetes API server can run here.
#[test]
fn containers_a_later_webhook_adds_are_rewritten_on_reinvocation() {
    let review = fixture("pod-deployment-http-probes.json");
    let first = injected(&review);
    let mut pod = first.clone();
    pod["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(vault_agent());
    pod["spec"]["initContainers"]
        .as_array_mut()
        .unwrap()
        .push(log_forwarder());
    let reply = answer_for(&with_object(&review, pod.clone()));
    assert_eq!(reply["response"]["allowed"], true, "{reply}");
    assert!(reply["response"].get("warnings").is_none(), "{reply}");
    let again = apply(&pod, &patch_of(&reply).expect("a patch"));

    let token = hook_token(&again);
    assert_eq!(token.len(), 64, "{token}");
    let agent = container(&again, "containers", "vault-agent");
    assert_eq!(
        agent["readinessProbe"],
        json!({
            "httpGet": {"path": "/app-health/vault-agent/readiness", "port": 15020, "scheme": "HTTP"},
            "initialDelaySeconds": 2, "timeoutSeconds": 1, "periodSeconds": 5,
            "successThreshold": 1, "failureThreshold": 3,
        })
    );
    assert_eq!(
        agent["lifecycle"],
        json!({"preStop": {"httpGet": {
            "path": "/app-health/vault-agent/pre-stop", "port": 15020, "scheme": "HTTP",
            "httpHeaders": [{"name": "x-trellis-hook-token", "value": token}],
        }}})
    );
    let forwarder = container(&again, "initContainers", "log-forwarder");
    assert_eq!(
        forwarder["livenessProbe"]["httpGet"],
        json!({"path": "/app-health/log-forwarder/liveness", "port": 15020, "scheme": "HTTP"})
    );

    // The sidecar runs the added checks beside the first injection's.
    let mut expected = app_probes(&first);
    let added = json!({
        "/app-health/vault-agent/readiness": {"httpGet": {"port": 8200, "path": "/agent/v1/ready", "scheme": "HTTP"}},
        "/app-health/vault-agent/pre-stop": {"httpGet": {"port": 8200, "path": "/agent/v1/quit", "scheme": "HTTP"}},
        "/app-health/log-forwarder/liveness": {"tcpSocket": {"port": 24240}},
    });
    expected
        .as_object_mut()
        .unwrap()
        .extend(added.as_object().unwrap().clone());
    assert_eq!(app_probes(&again), expected);

    // The rest is the first injection's, untouched: the sidecar but for
    // the two entries of its environment, the other containers entirely.
    for name in ["web", "log-shipper"] {
        assert_eq!(
            container(&again, "containers", name),
            container(&first, "containers", name),
            "{name}"
        );
    }
    for name in ["trellis-init", "wait-for-db"] {
        assert_eq!(
            container(&again, "initContainers", name),
            container(&first, "initContainers", name),
            "{name}"
        );
    }
    let without_env = |pod: &Value| {
        let mut proxy = container(pod, "initContainers", "trellis-proxy").clone();
        proxy.as_object_mut().unwrap().remove("env");
        proxy
    };
    assert_eq!(without_env(&again), without_env(&first));
    let (mut before, mut after) = (
        env(container(&first, "initContainers", "trellis-proxy")),
        env(container(&again, "initContainers", "trellis-proxy")),
    );
    for changed in ["TRELLIS_APP_PROBES", "TRELLIS_HOOK_TOKEN"] {
        before.remove(changed);
        after.remove(changed);
    }
    assert_eq!(after, before);
    assert_eq!(again["spec"]["volumes"], first["spec"]["volumes"]);
    assert_eq!(
        again["metadata"]["annotations"]["trellis.io/injected-containers"],
        "web,log-shipper,vault-agent,wait-for-db,log-forwarder"
    );

    // Reviewed again (the API server reinvokes once; a manifest copied
    // from the pod), nothing is left to do.
    let third = settled(&review, again.clone());
    assert_eq!(third["response"]["allowed"], true, "{third}");
    assert!(third["response"].get("warnings").is_none(), "{third}");
}

/// A Vault agent as the API server sends a container another webhook
/// added: an `httpGet` readiness probe on a named port, an `httpGet`
/// preStop hook, defaults filled in.
fn vault_agent() -> Value {
    json!({
        "name": "vault-agent",
        "image": "hashicorp/vault:1.17",
        "args": ["agent", "-config=/vault/config/agent.hcl"],
        "ports": [{"name": "agent", "containerPort": 8200, "protocol": "TCP"}],
        "readinessProbe": {
            "httpGet": {"path": "/agent/v1/ready", "port": "agent", "scheme": "HTTP"},
            "initialDelaySeconds": 2, "timeoutSeconds": 1, "periodSeconds": 5,
            "successThreshold": 1, "failureThreshold": 3,
        },
        "lifecycle": {"preStop": {"httpGet": {"path": "/agent/v1/quit", "port": 8200, "scheme": "HTTP"}}},
        "resources": {},
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
        "imagePullPolicy": "IfNotPresent",
    })
}

/// A log forwarder another webhook added as a native sidecar, with a
/// `tcpSocket` liveness probe, as the API server sends it.
fn log_forwarder() -> Value {
    json!({
        "name": "log-forwarder",
        "image": "fluent/fluent-bit:3.1",
        "restartPolicy": "Always",
        "livenessProbe": {
            "tcpSocket": {"port": 24240},
            "timeoutSeconds": 1, "periodSeconds": 10, "successThreshold": 1, "failureThreshold": 3,
        },
        "resources": {},
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
        "imagePullPolicy": "IfNotPresent",
    })
}

/// A pod whose hooks have a token already: a hook another webhook's
/// container adds gets the same one, the sidecar's `TRELLIS_HOOK_TOKEN`
/// stays as it is, and only `TRELLIS_APP_PROBES` is patched. A warning the
/// first injection gives for a container (a probe on a port the container
/// does not declare) is given for the added one, and not again once it has
/// been seen. Real AdmissionReview documents (fixtures/k8s) as the API
/// server sends them, reinvoked with the patched pod; no Kubernetes API
/// server can run here.
#[test]
fn a_reinvocation_reuses_the_pods_hook_token_and_warns_of_the_added_container_once() {
    let mut review = fixture("pod-deployment-http-probes.json");
    review["request"]["object"]["spec"]["containers"][0]["lifecycle"] = json!({
        "preStop": {"httpGet": {"path": "/drain", "port": "http", "scheme": "HTTP"}},
    });
    let first = injected(&review);
    let token = hook_token(&first);
    let mut pod = first.clone();
    let mut agent = vault_agent();
    agent["livenessProbe"] =
        json!({"httpGet": {"path": "/live", "port": "admin", "scheme": "HTTP"}});
    pod["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(agent.clone());
    let reply = answer_for(&with_object(&review, pod.clone()));
    assert_eq!(
        reply["response"]["warnings"],
        json!([
            "container \"vault-agent\" livenessProbe is not rewritten for the sidecar (the \
             container declares no port named \"admin\"); it will fail under strict mTLS"
        ])
    );
    let patch = patch_of(&reply).expect("a patch");
    let paths = ops(&patch);
    let probes_at = container(&first, "initContainers", "trellis-proxy")["env"]
        .as_array()
        .unwrap()
        .iter()
        .position(|e| e["name"] == "TRELLIS_APP_PROBES")
        .unwrap();
    assert_eq!(
        paths,
        [
            "add /metadata/annotations".to_owned(),
            "replace /spec/containers/2".to_owned(),
            format!("replace /spec/initContainers/1/env/{probes_at}"),
        ]
    );
    let again = apply(&pod, &patch);
    assert_eq!(hook_token(&again), token);
    assert_eq!(
        container(&again, "containers", "vault-agent")["lifecycle"]["preStop"]["httpGet"]["httpHeaders"],
        json!([{"name": "x-trellis-hook-token", "value": token}])
    );
    assert_eq!(
        container(&again, "containers", "vault-agent")["livenessProbe"],
        agent["livenessProbe"]
    );

    let third = settled(&review, again);
    assert!(third["response"].get("warnings").is_none(), "{third}");
}

/// A container another webhook adds is held to the first injection's
/// rules: one declaring a port of the sidecar's is refused, naming it, and
/// so, under the outbound policy deny, is one running as the sidecar's UID;
/// under passthrough that one is warned of, and the first injection's
/// containers are not warned of again. Real AdmissionReview documents
/// (fixtures/k8s) as the API server sends them, reinvoked with the patched
/// pod; no Kubernetes API server can run here.
#[test]
fn a_container_a_later_webhook_adds_is_checked_as_at_injection() {
    let review = fixture("pod-deployment-http-probes.json");
    let first = injected(&review);
    let added = |agent: Value| {
        let mut pod = first.clone();
        pod["spec"]["containers"]
            .as_array_mut()
            .unwrap()
            .push(agent);
        with_object(&review, pod)
    };

    let mut on_inbound = vault_agent();
    on_inbound["ports"][0]["containerPort"] = json!(15006);
    let reply = answer_for(&added(on_inbound));
    assert!(
        denial(&reply).starts_with(
            "trellis: cannot inject: container \"vault-agent\" declares TCP port 15006, the \
             sidecar's inbound port"
        ),
        "{reply}"
    );

    let mut as_proxy = vault_agent();
    as_proxy["securityContext"] = json!({"runAsUser": 1337});
    let reply = answer_for(&added(as_proxy.clone()));
    assert!(
        denial(&reply).contains("container \"vault-agent\" runs as UID 1337"),
        "{reply}"
    );
    let reply = answer(
        &added(as_proxy),
        NamespaceScope::SelectedByWebhook,
        &passthrough(),
    );
    assert_eq!(
        reply["response"]["warnings"],
        json!([
            "container \"vault-agent\" runs as UID 1337, the proxy's UID: its traffic bypasses \
             the sidecar"
        ])
    );
    assert!(patch_of(&reply).is_some(), "{reply}");
}

/// A sidecar whose `TRELLIS_APP_PROBES` is not what the injector writes
/// (edited by hand: not JSON, or JSON of another shape) cannot take an
/// added container's checks: the pod follows the failure policy the
/// injector is configured with (the chart's `failurePolicy`, in its
/// settings file) rather than run with a probe that always fails. `Fail`
/// denies it naming the variable; `Ignore` admits it as it is (no patch)
/// with the same words in a warning, which `kubectl` prints, and counts
/// as meshed, its sidecar kept. Real
/// AdmissionReview documents (fixtures/k8s) as the API server sends them;
/// no Kubernetes API server can run here.
#[test]
fn a_sidecar_environment_the_injector_cannot_read_follows_the_failure_policy() {
    let review = fixture("pod-deployment-http-probes.json");
    let first = injected(&review);
    let why = "the trellis-proxy container's environment variable TRELLIS_APP_PROBES has no \
               value as the injector writes it, so the checks of the containers added since \
               injection cannot be added to it";
    let ignore = InjectConfig {
        failure_policy: FailurePolicy::Ignore,
        ..config()
    };
    for unreadable in [
        "not json",
        r#"["/app-health/web/liveness"]"#,
        r#"{"/app-health/web/liveness": 8080}"#,
        r#"{"/healthz": {"httpGet": {"port": 8080, "path": "/healthz", "scheme": "HTTP"}}}"#,
    ] {
        let mut pod = first.clone();
        let at = env_index(&pod, "TRELLIS_APP_PROBES");
        pod["spec"]["initContainers"][1]["env"][at]["value"] = json!(unreadable);
        pod["spec"]["containers"]
            .as_array_mut()
            .unwrap()
            .push(vault_agent());
        let review = with_object(&review, pod);

        let reply = answer_for(&review);
        assert_eq!(
            denial(&reply),
            format!("trellis: cannot inject: {why}"),
            "{unreadable}"
        );

        let reply = answer(&review, NamespaceScope::SelectedByWebhook, &ignore);
        assert_eq!(
            reply,
            json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                   "response": {"uid": review["request"]["uid"], "allowed": true,
                                "warnings": [format!("trellis: pod admitted as it is: {why}")]}}),
            "{unreadable}"
        );
        // Admitted with its sidecar, the pod runs in the mesh; denied, it
        // is not created.
        let request = AdmissionRequest::parse(&body(&review)).unwrap();
        let scope = NamespaceScope::SelectedByWebhook;
        assert!(respond_pod_reporting(&request, scope, &ignore).meshed);
        assert!(!respond_pod_reporting(&request, scope, &config()).meshed);
    }
}

/// A `TRELLIS_APP_PROBES` that is empty or blank is what the sidecar
/// starts with as no checks at all, so the injector reads it so too: an
/// added container's checks become its value, the pod is not refused.
#[test]
fn a_blank_app_probes_entry_reads_as_no_checks() {
    let review = fixture("pod-deployment-http-probes.json");
    let first = injected(&review);
    for blank in ["", "  "] {
        let mut pod = first.clone();
        let at = env_index(&pod, "TRELLIS_APP_PROBES");
        pod["spec"]["initContainers"][1]["env"][at]["value"] = json!(blank);
        pod["spec"]["containers"]
            .as_array_mut()
            .unwrap()
            .push(vault_agent());
        let reply = answer_for(&with_object(&review, pod.clone()));
        assert_eq!(reply["response"]["allowed"], true, "{blank:?}: {reply}");
        let pod = apply(&pod, &patch_of(&reply).expect("a patch"));
        let probes = app_probes(&pod);
        assert_eq!(
            probes.as_object().unwrap().keys().collect::<Vec<_>>(),
            [
                "/app-health/vault-agent/pre-stop",
                "/app-health/vault-agent/readiness"
            ],
            "{blank:?}"
        );
    }
}

/// Reinvoked after a later webhook changed the pod but added no container
/// (a label, an annotation), the injector has nothing to do: no patch, no
/// warning. Real AdmissionReview documents (fixtures/k8s) as the API
/// server sends them, the first patch applied; no Kubernetes API server can
/// run here.
#[test]
fn a_reinvocation_without_a_new_container_gets_no_patch() {
    let review = fixture("pod-deployment-http-probes.json");
    let mut pod = injected(&review);
    pod["metadata"]["labels"]["team"] = json!("shop");
    pod["metadata"]["annotations"]["vault.hashicorp.com/agent-inject-status"] = json!("injected");
    let reply = answer_for(&with_object(&review, pod));
    assert_eq!(
        reply,
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
               "response": {"uid": review["request"]["uid"], "allowed": true}})
    );
}

/// A later webhook that gives a seen container a probe more (a startup
/// probe on the app's port) leaves the container's rewritten probes as they
/// are: the sidecar keeps running their checks, the new probe is rewritten
/// beside them, and no warning says a check is unknown. Real
/// AdmissionReview documents (fixtures/k8s), the patch applied with
/// `json-patch`; no Kubernetes API server can run here.
#[test]
fn a_probe_a_later_webhook_adds_to_a_seen_container_keeps_its_other_checks() {
    let review = fixture("pod-deployment-http-probes.json");
    let first = injected(&review);
    let mut pod = first.clone();
    pod["spec"]["containers"][0]["startupProbe"] = json!({
        "httpGet": {"path": "/started", "port": "http", "scheme": "HTTP"},
        "timeoutSeconds": 1, "periodSeconds": 2, "successThreshold": 1, "failureThreshold": 30,
    });
    let reply = answer_for(&with_object(&review, pod.clone()));
    assert_eq!(reply["response"]["allowed"], true, "{reply}");
    assert!(reply["response"].get("warnings").is_none(), "{reply}");
    let again = apply(&pod, &patch_of(&reply).expect("a patch"));

    let web = container(&again, "containers", "web");
    let was = container(&first, "containers", "web");
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(web[probe], was[probe], "{probe}");
    }
    assert_eq!(
        web["startupProbe"]["httpGet"],
        json!({"path": "/app-health/web/startup", "port": 15020, "scheme": "HTTP"})
    );
    let mut expected = app_probes(&first);
    expected.as_object_mut().unwrap().insert(
        "/app-health/web/startup".into(),
        json!({"httpGet": {"port": 8080, "path": "/started", "scheme": "HTTP"}}),
    );
    assert_eq!(app_probes(&again), expected);

    let third = settled(&review, again);
    assert!(third["response"].get("warnings").is_none(), "{third}");
}

/// `trellis.io/injected-containers` set or edited by hand: blanks,
/// duplicates and names of containers the pod no longer has name what
/// they can and change nothing; a value that is no list of container names
/// is refused naming the annotation, as any invalid `trellis.io/*`
/// annotation, whatever the failure policy, and a long one is not said
/// back. Real AdmissionReview documents (fixtures/k8s); no Kubernetes API
/// server can run here.
#[test]
fn a_hand_written_injected_containers_annotation_is_read_or_refused_naming_it() {
    let review = fixture("pod-deployment-http-probes.json");
    let first = injected(&review);
    let with = |value: &str| {
        let mut pod = first.clone();
        pod["metadata"]["annotations"]["trellis.io/injected-containers"] = json!(value);
        with_object(&review, pod)
    };
    let ignore = InjectConfig {
        failure_policy: FailurePolicy::Ignore,
        ..config()
    };

    let reply = answer_for(&with(" web , log-shipper,web,,wait-for-db, gone-since "));
    assert_eq!(reply["response"]["allowed"], true, "{reply}");
    assert!(patch_of(&reply).is_none(), "{reply}");
    assert!(reply["response"].get("warnings").is_none(), "{reply}");

    let rule = "a container's name is at most 63 lowercase letters, digits and '-', starting \
                and ending with a letter or a digit";
    for (value, says) in [
        (
            "web;log-shipper,wait-for-db",
            "\"web;log-shipper\" is not a container name",
        ),
        ("web,log shipper", "\"log shipper\" is not a container name"),
        ("Web,log-shipper", "\"Web\" is not a container name"),
        ("web,-,log-shipper", "\"-\" is not a container name"),
        ("web,\u{1b}[31m", "\"\\u{1b}[31m\" is not a container name"),
    ] {
        for config in [config(), ignore.clone()] {
            let reply = answer(&with(value), NamespaceScope::SelectedByWebhook, &config);
            assert_eq!(
                denial(&reply),
                format!(
                    "trellis: cannot inject: metadata.annotations[trellis.io/injected-containers]: \
                     {says}: {rule}"
                ),
                "{value:?}"
            );
        }
    }
    let huge = format!("web,{}", "x".repeat(200_000));
    let reply = answer_for(&with(&huge));
    assert_eq!(
        denial(&reply),
        format!(
            "trellis: cannot inject: metadata.annotations[trellis.io/injected-containers]: \
             an item of 200000 bytes is not a container name: {rule}"
        )
    );
}

/// Where the sidecar's environment holds `name`.
fn env_index(pod: &Value, name: &str) -> usize {
    container(pod, "initContainers", "trellis-proxy")["env"]
        .as_array()
        .unwrap()
        .iter()
        .position(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("the sidecar has no {name}"))
}

/// A pod injected by a version that did not write
/// `trellis.io/injected-containers` (or by hand) counts as seen the
/// containers whose probes already call the sidecar, and its ordinary init
/// containers: reviewed with a container a later webhook added, only that
/// one is rewritten, the others not warned of again, and the annotation is
/// written naming them all. Real AdmissionReview documents (fixtures/k8s)
/// as the API server sends them, the patch applied as it applies it
/// (`json-patch`); no Kubernetes API server can run here.
#[test]
fn a_pod_injected_without_the_annotation_has_only_its_added_container_rewritten() {
    let review = fixture("pod-already-injected.json");
    let legacy = review["request"]["object"].clone();
    assert!(
        legacy["metadata"]["annotations"]
            .get("trellis.io/injected-containers")
            .is_none()
    );
    let mut pod = legacy.clone();
    pod["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(vault_agent());
    let reply = answer_for(&with_object(&review, pod.clone()));
    assert_eq!(reply["response"]["allowed"], true, "{reply}");
    assert!(reply["response"].get("warnings").is_none(), "{reply}");
    let patch = patch_of(&reply).expect("a patch");
    assert_eq!(
        ops(&patch),
        [
            "add /metadata/annotations".to_owned(),
            "replace /spec/containers/2".to_owned(),
            format!(
                "replace /spec/initContainers/1/env/{}",
                env_index(&legacy, "TRELLIS_APP_PROBES")
            ),
            "add /spec/initContainers/1/env/-".to_owned(),
        ]
    );
    let again = apply(&pod, &patch);
    assert_eq!(
        again["metadata"]["annotations"]["trellis.io/injected-containers"],
        "web,log-shipper,vault-agent,wait-for-db"
    );
    assert_eq!(
        container(&again, "containers", "vault-agent")["readinessProbe"]["httpGet"],
        json!({"path": "/app-health/vault-agent/readiness", "port": 15020, "scheme": "HTTP"})
    );
    for name in ["web", "log-shipper"] {
        assert_eq!(
            container(&again, "containers", name),
            container(&legacy, "containers", name),
            "{name}"
        );
    }
    assert_eq!(
        container(&again, "initContainers", "wait-for-db"),
        container(&legacy, "initContainers", "wait-for-db")
    );
    let mut expected = app_probes(&legacy);
    expected.as_object_mut().unwrap().extend(
        json!({
            "/app-health/vault-agent/readiness": {"httpGet": {"port": 8200, "path": "/agent/v1/ready", "scheme": "HTTP"}},
            "/app-health/vault-agent/pre-stop": {"httpGet": {"port": 8200, "path": "/agent/v1/quit", "scheme": "HTTP"}},
        })
        .as_object()
        .unwrap()
        .clone(),
    );
    assert_eq!(app_probes(&again), expected);
    assert_eq!(hook_token(&again).len(), 64);

    let third = settled(&review, again);
    assert!(third["response"].get("warnings").is_none(), "{third}");
}

/// In a pod injected without `trellis.io/injected-containers`, a container
/// with no probe or hook (or only `exec` ones) cannot be told seen or new:
/// it is taken as new, which changes nothing in it (it has nothing to
/// rewrite) but holds it to the port rules of injection and names it in the
/// annotation, the only operation of the patch. Real AdmissionReview
/// documents (fixtures/k8s), the patch applied with `json-patch`; no
/// Kubernetes API server can run here.
#[test]
fn a_container_without_checks_in_a_pod_injected_without_the_annotation_is_taken_as_new() {
    let review = fixture("pod-already-injected.json");
    let exporter = json!({
        "name": "exporter",
        "image": "registry.example.com/tools/exporter:1.2",
        "ports": [{"name": "scrape", "containerPort": 9102, "protocol": "TCP"}],
        "resources": {},
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
        "imagePullPolicy": "IfNotPresent",
    });
    let mut pod = review["request"]["object"].clone();
    pod["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(exporter.clone());
    let reply = answer_for(&with_object(&review, pod.clone()));
    assert_eq!(reply["response"]["allowed"], true, "{reply}");
    assert!(reply["response"].get("warnings").is_none(), "{reply}");
    let patch = patch_of(&reply).expect("a patch");
    assert_eq!(ops(&patch), ["add /metadata/annotations"]);
    let again = apply(&pod, &patch);
    assert_eq!(container(&again, "containers", "exporter"), &exporter);
    assert_eq!(
        again["metadata"]["annotations"]["trellis.io/injected-containers"],
        "web,log-shipper,exporter,wait-for-db"
    );
    settled(&review, again);

    // New, it is checked as at injection: on the sidecar's inbound port it
    // is refused, and the pod with it.
    pod["spec"]["containers"][2]["ports"][0]["containerPort"] = json!(15006);
    let reply = answer_for(&with_object(&review, pod));
    assert!(
        denial(&reply)
            .starts_with("trellis: cannot inject: container \"exporter\" declares TCP port 15006"),
        "{reply}"
    );
}

/// The port and UID checks of injection are checks of the pod as it will
/// run, and a reinvocation applies them to every container of the pod,
/// seen or new. So an ordinary init container a later webhook adds to a pod
/// injected without `trellis.io/injected-containers`, which the rule for
/// such pods takes as seen (it has no probe or hook to tell it by), is
/// refused as at injection when it declares the sidecar's inbound port, or
/// runs as the sidecar's UID under the outbound policy deny, whatever the
/// failure policy; without either it changes nothing (no patch). Real
/// AdmissionReview documents (fixtures/k8s); no Kubernetes API server can
/// run here.
#[test]
fn an_init_container_added_to_a_pod_injected_without_the_annotation_is_checked() {
    let review = fixture("pod-already-injected.json");
    let vault_init = json!({
        "name": "vault-agent-init",
        "image": "hashicorp/vault:1.17",
        "args": ["agent", "-config=/vault/config/agent.hcl", "-exit-after-auth"],
        "resources": {},
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
        "imagePullPolicy": "IfNotPresent",
    });
    let added = |init: &Value| {
        let mut pod = review["request"]["object"].clone();
        pod["spec"]["initContainers"]
            .as_array_mut()
            .unwrap()
            .push(init.clone());
        with_object(&review, pod)
    };
    settled(&review, added(&vault_init)["request"]["object"].clone());

    let ignore = InjectConfig {
        failure_policy: FailurePolicy::Ignore,
        ..config()
    };
    let mut on_inbound = vault_init.clone();
    on_inbound["ports"] = json!([{"name": "agent", "containerPort": 15006, "protocol": "TCP"}]);
    let mut as_proxy = vault_init.clone();
    as_proxy["securityContext"] = json!({"runAsUser": 1337});
    for (init, says) in [
        (
            on_inbound,
            "trellis: cannot inject: container \"vault-agent-init\" declares TCP port 15006, \
             the sidecar's inbound port",
        ),
        (
            as_proxy,
            "trellis: cannot inject: container \"vault-agent-init\" runs as UID 1337 (its \
             securityContext.runAsUser), the sidecar's UID",
        ),
    ] {
        for config in [config(), ignore.clone()] {
            let reply = answer(&added(&init), NamespaceScope::SelectedByWebhook, &config);
            assert!(denial(&reply).starts_with(says), "{reply}");
        }
        // As the first injection refuses the pod with it.
        let mut fresh = fixture("pod-deployment-http-probes.json");
        fresh["request"]["object"]["spec"]["initContainers"]
            .as_array_mut()
            .unwrap()
            .push(init.clone());
        assert!(denial(&answer_for(&fresh)).starts_with(says));
    }
}

/// A pod injected under other settings (its manifest copied, or restored
/// from a backup, after `injection.proxy.uid` or a sidecar port changed)
/// runs with the sidecar it carries: its containers are held to that
/// sidecar's UID and ports, as its `trellis-init` arguments and its
/// `trellis-proxy` ports say them, and an added container's probe is
/// rewritten to that sidecar's admin port, not the current settings'.
#[test]
fn a_pod_injected_under_other_settings_is_held_to_its_own_sidecar() {
    // Injected with UID 1337, inbound port 15006, admin port 15020.
    let review = fixture("pod-already-injected.json");
    let now = InjectConfig {
        proxy_uid: 2000,
        inbound_port: 16006,
        admin_port: 16020,
        ..config()
    };
    let with = |field: &str, added: Value| {
        let mut pod = review["request"]["object"].clone();
        pod["spec"][field].as_array_mut().unwrap().push(added);
        let reply = answer(
            &with_object(&review, pod.clone()),
            NamespaceScope::SelectedByWebhook,
            &now,
        );
        (pod, reply)
    };

    // Its own container, which the pod's sidecar leaves alone, stays
    // admitted though it runs as the UID and on a port of the new settings.
    let mut pod = review["request"]["object"].clone();
    let web = pod["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|c| c["name"] == "web")
        .unwrap();
    web["securityContext"] = json!({"runAsUser": 2000});
    web["ports"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "alt", "containerPort": 16006, "protocol": "TCP"}));
    let reply = answer(
        &with_object(&review, pod),
        NamespaceScope::SelectedByWebhook,
        &now,
    );
    assert_eq!(reply["response"]["allowed"], true, "{reply}");

    // One added running as the pod's sidecar's UID, or on its inbound
    // port, is refused naming them. Moving the sidecar with
    // injection.proxy.uid cannot help a pod that carries one, as the UID
    // of the settings here shows: the refusal says what does.
    let init = json!({"name": "vault-agent-init", "image": "hashicorp/vault:1.17"});
    let mut as_proxy = init.clone();
    as_proxy["securityContext"] = json!({"runAsUser": 1337});
    let (_, reply) = with("initContainers", as_proxy.clone());
    assert_eq!(
        denial(&reply),
        "trellis: cannot inject: container \"vault-agent-init\" runs as UID 1337 (its \
         securityContext.runAsUser), the sidecar's UID, whose traffic is never intercepted: \
         under the outbound policy deny it would reach destinations the mesh refuses; run it \
         as another UID: the pod carries its sidecar already, which runs as 1337 whatever \
         injection.proxy.uid says now"
    );
    let mut on_inbound = init.clone();
    on_inbound["ports"] = json!([{"containerPort": 15006, "protocol": "TCP"}]);
    for (added, says) in [
        (
            as_proxy,
            "trellis: cannot inject: container \"vault-agent-init\" runs as UID 1337",
        ),
        (
            on_inbound,
            "trellis: cannot inject: container \"vault-agent-init\" declares TCP port 15006, \
             the sidecar's inbound port",
        ),
    ] {
        let (_, reply) = with("initContainers", added);
        assert!(denial(&reply).starts_with(says), "{reply}");
    }

    // An added container's probe calls the pod's sidecar.
    let probed = json!({
        "name": "cache",
        "image": "redis:7",
        "readinessProbe": {"tcpSocket": {"port": 6379}},
    });
    let (pod, reply) = with("containers", probed);
    let pod = apply(&pod, &patch_of(&reply).expect("a patch"));
    assert_eq!(
        container(&pod, "containers", "cache")["readinessProbe"]["httpGet"],
        json!({"path": "/app-health/cache/readiness", "port": 15020, "scheme": "HTTP"})
    );
}

/// `review`'s pod without any probe or lifecycle hook.
fn without_checks(review: &Value) -> Value {
    let mut pod = review["request"]["object"].clone();
    for field in ["containers", "initContainers"] {
        for c in pod["spec"][field].as_array_mut().unwrap() {
            let c = c.as_object_mut().unwrap();
            for key in [
                "livenessProbe",
                "readinessProbe",
                "startupProbe",
                "lifecycle",
            ] {
                c.remove(key);
            }
        }
    }
    pod
}

/// A pod injected without probes or hooks has a sidecar without
/// `TRELLIS_APP_PROBES` or `TRELLIS_HOOK_TOKEN`: a container a later webhook
/// adds with a probe and a hook gets both entries `add`ed to the end of the
/// sidecar's environment, and the sidecar ends as the first injection
/// makes it for a pod that had the container from the start (the same
/// `TRELLIS_APP_PROBES` text, the token aside). Real AdmissionReview
/// documents (fixtures/k8s), the patch applied with `json-patch`; no
/// Kubernetes API server can run here.
#[test]
fn a_sidecar_without_app_probes_has_the_entry_added_on_reinvocation() {
    let review = fixture("pod-deployment-http-probes.json");
    let bare = without_checks(&review);
    let first = injected(&with_object(&review, bare.clone()));
    let before = env(container(&first, "initContainers", "trellis-proxy"));
    assert!(!before.contains_key("TRELLIS_APP_PROBES"), "{before:?}");
    assert!(!before.contains_key("TRELLIS_HOOK_TOKEN"), "{before:?}");

    let mut pod = first.clone();
    pod["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(vault_agent());
    let reply = answer_for(&with_object(&review, pod.clone()));
    assert!(reply["response"].get("warnings").is_none(), "{reply}");
    let patch = patch_of(&reply).expect("a patch");
    assert_eq!(
        ops(&patch),
        [
            "add /metadata/annotations",
            "replace /spec/containers/2",
            "add /spec/initContainers/1/env/-",
            "add /spec/initContainers/1/env/-",
        ]
    );
    let again = apply(&pod, &patch);

    let mut from_start = bare;
    from_start["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(vault_agent());
    let direct = injected(&with_object(&review, from_start));
    let token = hook_token(&again);
    assert_eq!(token.len(), 64, "{token}");
    let masked = |pod: &Value| {
        let mut proxy = container(pod, "initContainers", "trellis-proxy").clone();
        let at = env_index(pod, "TRELLIS_HOOK_TOKEN");
        proxy["env"][at]["value"] = json!("<token>");
        proxy
    };
    assert_eq!(masked(&again), masked(&direct));
    let mut agent = container(&direct, "containers", "vault-agent").clone();
    agent["lifecycle"]["preStop"]["httpGet"]["httpHeaders"][0]["value"] = json!(token);
    assert_eq!(container(&again, "containers", "vault-agent"), &agent);

    settled(&review, again);
}

/// A sidecar whose `env` was taken out (edited by hand) gets one: the patch
/// `add`s `env` whole, with the added container's checks and a hook token,
/// and the pod it gives is valid (`kubernetes-validate --strict`). Real
/// AdmissionReview documents (fixtures/k8s), the patch applied with
/// `json-patch`; no Kubernetes API server can run here.
#[test]
fn a_sidecar_without_env_gets_one_on_reinvocation() {
    let review = fixture("pod-deployment-http-probes.json");
    let mut pod = injected(&review);
    pod["spec"]["initContainers"][1]
        .as_object_mut()
        .unwrap()
        .remove("env");
    pod["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(vault_agent());
    let reply = answer_for(&with_object(&review, pod.clone()));
    let patch = patch_of(&reply).expect("a patch");
    assert_eq!(
        ops(&patch),
        [
            "add /metadata/annotations",
            "replace /spec/containers/2",
            "add /spec/initContainers/1/env",
        ]
    );
    let again = apply(&pod, &patch);
    let token = hook_token(&again);
    let sidecar_env = &container(&again, "initContainers", "trellis-proxy")["env"];
    assert_eq!(
        names(sidecar_env),
        ["TRELLIS_APP_PROBES", "TRELLIS_HOOK_TOKEN"]
    );
    assert_eq!(sidecar_env[1]["value"], token);
    assert_eq!(
        app_probes(&again),
        json!({
            "/app-health/vault-agent/pre-stop": {"httpGet": {"path": "/agent/v1/quit", "port": 8200, "scheme": "HTTP"}},
            "/app-health/vault-agent/readiness": {"httpGet": {"path": "/agent/v1/ready", "port": 8200, "scheme": "HTTP"}},
        })
    );
    settled(&review, again.clone());

    valid_as_stored(again, "web-6b7f9c5d8-x2x7k");
}

/// A container named in `trellis.io/injected-containers` whose probe does
/// not call the sidecar is not the one the injection saw: a later webhook
/// replaced it under the same name, and its probe would reach the app
/// through the mTLS port and fail. It is rewritten as a new one, and the
/// checks of the container it replaced leave `TRELLIS_APP_PROBES` for its
/// own. Real AdmissionReview documents (fixtures/k8s), the patch applied
/// with `json-patch`; no Kubernetes API server can run here.
#[test]
fn a_container_replaced_under_a_seen_name_is_rewritten() {
    let review = fixture("pod-deployment-http-probes.json");
    let first = injected(&review);
    let shipper = json!({
        "name": "log-shipper",
        "image": "fluent/fluent-bit:3.1",
        "ports": [{"name": "monitor", "containerPort": 2020, "protocol": "TCP"}],
        "readinessProbe": {
            "httpGet": {"path": "/api/v1/health", "port": "monitor", "scheme": "HTTP"},
            "timeoutSeconds": 1, "periodSeconds": 10, "successThreshold": 1, "failureThreshold": 3,
        },
        "resources": {},
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
        "imagePullPolicy": "IfNotPresent",
    });
    let mut pod = first.clone();
    pod["spec"]["containers"][1] = shipper.clone();
    let reply = answer_for(&with_object(&review, pod.clone()));
    assert_eq!(reply["response"]["allowed"], true, "{reply}");
    assert!(reply["response"].get("warnings").is_none(), "{reply}");
    let patch = patch_of(&reply).expect("a patch");
    assert_eq!(
        ops(&patch),
        [
            "add /metadata/annotations".to_owned(),
            "replace /spec/containers/1".to_owned(),
            format!(
                "replace /spec/initContainers/1/env/{}",
                env_index(&first, "TRELLIS_APP_PROBES")
            ),
        ]
    );
    let again = apply(&pod, &patch);
    let mut expected = shipper;
    expected["readinessProbe"]["httpGet"] =
        json!({"path": "/app-health/log-shipper/readiness", "port": 15020, "scheme": "HTTP"});
    assert_eq!(container(&again, "containers", "log-shipper"), &expected);
    assert_eq!(
        container(&again, "containers", "web"),
        container(&first, "containers", "web")
    );
    let mut probes = app_probes(&first);
    let probes = probes.as_object_mut().unwrap();
    assert!(probes.remove("/app-health/log-shipper/liveness").is_some());
    probes.insert(
        "/app-health/log-shipper/readiness".into(),
        json!({"httpGet": {"port": 2020, "path": "/api/v1/health", "scheme": "HTTP"}}),
    );
    assert_eq!(app_probes(&again), Value::Object(probes.clone()));
    assert_eq!(
        again["metadata"]["annotations"]["trellis.io/injected-containers"],
        first["metadata"]["annotations"]["trellis.io/injected-containers"]
    );

    let third = settled(&review, again);
    assert!(third["response"].get("warnings").is_none(), "{third}");
}

/// A fluent-bit log shipper as a later webhook puts it in the place of the
/// fixture's `log-shipper`, defaults filled in as the API server sends it,
/// with the probes `probes` (an object of probe fields).
fn shipper_with(probes: Value) -> Value {
    let mut shipper = json!({
        "name": "log-shipper",
        "image": "fluent/fluent-bit:3.1",
        "resources": {},
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
        "imagePullPolicy": "IfNotPresent",
    });
    shipper
        .as_object_mut()
        .unwrap()
        .extend(probes.as_object().unwrap().clone());
    shipper
}

/// `pod` with its `log-shipper` container (the second) replaced by
/// `shipper`.
fn with_shipper(pod: &Value, shipper: &Value) -> Value {
    let mut pod = pod.clone();
    pod["spec"]["containers"][1] = shipper.clone();
    pod
}

/// A container put in the place of a seen one whose HTTP probe names a
/// port it does not declare is handled as the first injection handles such
/// a probe: left as it is, with the same warning, and the checks of the
/// container it replaced leave `TRELLIS_APP_PROBES`. Reviewed again, it
/// gets no patch and no warning. Real AdmissionReview documents
/// (fixtures/k8s), the patch applied with `json-patch`, the pod checked
/// with `kubernetes-validate --strict`; no Kubernetes API server can run
/// here.
#[test]
fn a_replacement_probing_a_port_it_does_not_declare_is_warned_as_at_injection() {
    let review = fixture("pod-deployment-http-probes.json");
    let first = injected(&review);
    let shipper = shipper_with(json!({"readinessProbe": {
        "httpGet": {"path": "/api/v1/health", "port": "http", "scheme": "HTTP"},
        "timeoutSeconds": 1, "periodSeconds": 10, "successThreshold": 1, "failureThreshold": 3,
    }}));
    // What the first injection says of that container.
    let direct = answer_for(&with_object(
        &review,
        with_shipper(&review["request"]["object"], &shipper),
    ));
    assert_eq!(
        direct["response"]["warnings"],
        json!([
            "container \"log-shipper\" readinessProbe is not rewritten for the sidecar (the \
             container declares no port named \"http\"); it will fail under strict mTLS"
        ])
    );

    let again = shipper_replaced(
        &review,
        &first,
        &shipper,
        Some(&direct["response"]["warnings"]),
        &app_probes(&injected_as(&direct, &review, &shipper)),
    );

    let third = settled(&review, again.clone());
    assert!(third["response"].get("warnings").is_none(), "{third}");
    valid_as_stored(again, "web-6b7f9c5d8-x2x7k");
}

/// Reviews `first` (an injected pod) with `shipper` in the place of its
/// `log-shipper`, as a reinvocation sends it, and checks the answer: allowed,
/// with `warnings` (none at all when `None`), and a patch that adds the
/// annotations and replaces `TRELLIS_APP_PROBES` only. Applied, the pod holds
/// `shipper` as it came, and its app probes are `first`'s without the
/// liveness check of the container replaced, equal to `direct_probes` (those
/// of the first injection of a pod with `shipper`). The pod patched.
fn shipper_replaced(
    review: &Value,
    first: &Value,
    shipper: &Value,
    warnings: Option<&Value>,
    direct_probes: &Value,
) -> Value {
    let pod = with_shipper(first, shipper);
    let reply = answer_for(&with_object(review, pod.clone()));
    assert_eq!(reply["response"]["allowed"], true, "{reply}");
    match warnings {
        Some(warnings) => assert_eq!(&reply["response"]["warnings"], warnings),
        None => assert!(reply["response"].get("warnings").is_none(), "{reply}"),
    }
    let patch = patch_of(&reply).expect("a patch");
    assert_eq!(
        ops(&patch),
        [
            "add /metadata/annotations".to_owned(),
            format!(
                "replace /spec/initContainers/1/env/{}",
                env_index(first, "TRELLIS_APP_PROBES")
            ),
        ]
    );
    let again = apply(&pod, &patch);
    assert_eq!(container(&again, "containers", "log-shipper"), shipper);
    let mut probes = app_probes(first);
    let probes = probes.as_object_mut().unwrap();
    assert!(probes.remove("/app-health/log-shipper/liveness").is_some());
    assert_eq!(app_probes(&again), Value::Object(probes.clone()));
    assert_eq!(&app_probes(&again), direct_probes);
    again
}

/// The review's pod with `shipper` in the place of `log-shipper`, injected
/// by the answer `direct`.
fn injected_as(direct: &Value, review: &Value, shipper: &Value) -> Value {
    apply(
        &with_shipper(&review["request"]["object"], shipper),
        &patch_of(direct).expect("a patch"),
    )
}

/// A container put in the place of a seen one, or a seen one a later
/// webhook gave `exec` checks only (no HTTP probe, no `httpGet` hook),
/// leaves no checks of the one it replaced in `TRELLIS_APP_PROBES`: that
/// one entry is replaced without them, the checks of the other containers
/// untouched, and the sidecar says what the first injection would say of
/// the pod with that container. Without the annotation (a pod injected by
/// an older version) the same. Nothing of that container left in the
/// sidecar, there is nothing to change: no patch. Real AdmissionReview
/// documents (fixtures/k8s), the patch applied with `json-patch`, the pod
/// checked with `kubernetes-validate --strict`; no Kubernetes API server
/// can run here.
#[test]
fn a_replacement_with_only_exec_checks_leaves_none_of_its_namesakes_behind() {
    let review = fixture("pod-deployment-http-probes.json");
    let shipper = shipper_with(json!({"livenessProbe": {
        "exec": {"command": ["/fluent-bit/bin/healthcheck"]},
        "timeoutSeconds": 1, "periodSeconds": 20, "successThreshold": 1, "failureThreshold": 3,
    }}));
    let first = injected(&review);
    let legacy = fixture("pod-already-injected.json")["request"]["object"].clone();
    // The checks the first injection gives a pod with that container.
    let direct_probes = app_probes(&injected(&with_object(
        &review,
        with_shipper(&review["request"]["object"], &shipper),
    )));
    for first in [first, legacy] {
        let again = shipper_replaced(&review, &first, &shipper, None, &direct_probes);
        assert_eq!(
            again["metadata"]["annotations"]["trellis.io/injected-containers"],
            "web,log-shipper,wait-for-db"
        );
        let third = settled(&review, again.clone());
        assert!(third["response"].get("warnings").is_none(), "{third}");
        valid_as_stored(again.clone(), "web-6b7f9c5d8-x2x7k");

        // Replaced once more by another with `exec` checks only: nothing
        // of it is in the sidecar, so nothing changes.
        let mut other = shipper.clone();
        other["readinessProbe"] = json!({"exec": {"command": ["true"]}});
        settled(&review, with_shipper(&again, &other));
    }
}

/// A container put in the place of a seen one that left nothing in the
/// sidecar, with nothing to rewrite itself (`exec` checks, a probe of
/// another host), cannot be told from it and is taken as seen: no patch.
/// That is the pod a first injection gives with it: the container as it
/// came, the sidecar's checks the same. The checks that refuse a pod run
/// on it all the same: on a port of the sidecar's, or as the sidecar's UID
/// under the outbound policy deny, it is refused naming it. Real
/// AdmissionReview documents (fixtures/k8s), the patch applied with
/// `json-patch`; no API server here.
#[test]
fn a_replacement_with_nothing_to_rewrite_for_one_that_left_nothing_is_right_as_seen() {
    let review = fixture("pod-deployment-http-probes.json");
    let exec_only = shipper_with(json!({"livenessProbe": {
        "exec": {"command": ["/fluent-bit/bin/healthcheck"]},
        "timeoutSeconds": 1, "periodSeconds": 20, "successThreshold": 1, "failureThreshold": 3,
    }}));
    let first = injected(&with_object(
        &review,
        with_shipper(&review["request"]["object"], &exec_only),
    ));
    let replacement = shipper_with(json!({
        "image": "fluent/fluent-bit:3.2",
        "readinessProbe": {"exec": {"command": ["true"]}},
        "livenessProbe": {"httpGet": {"host": "10.0.0.9", "path": "/", "port": 2020}},
    }));
    let pod = with_shipper(&first, &replacement);
    let reply = settled(&review, pod.clone());
    assert_eq!(reply["response"]["allowed"], true, "{reply}");
    assert!(reply["response"].get("warnings").is_none(), "{reply}");
    // What a first injection of the pod with the replacement gives.
    let direct = injected(&with_object(
        &review,
        with_shipper(&review["request"]["object"], &replacement),
    ));
    assert_eq!(
        container(&direct, "containers", "log-shipper"),
        container(&pod, "containers", "log-shipper")
    );
    assert_eq!(app_probes(&direct), app_probes(&pod));

    for (change, says) in [
        (
            json!({"ports": [{"containerPort": 15020, "protocol": "TCP"}]}),
            "container \"log-shipper\" declares TCP port 15020, the sidecar's admin port",
        ),
        (
            json!({"securityContext": {"runAsUser": 1337}}),
            "container \"log-shipper\" runs as UID 1337 (its securityContext.runAsUser), the \
             sidecar's UID",
        ),
    ] {
        let mut refused = replacement.clone();
        refused
            .as_object_mut()
            .unwrap()
            .extend(change.as_object().unwrap().clone());
        let reply = answer_for(&with_object(&review, with_shipper(&first, &refused)));
        assert_eq!(reply["response"]["allowed"], false, "{reply}");
        assert!(denial(&reply).contains(says), "{reply}");
    }
}

/// A container a later webhook takes out of the pod altogether leaves no
/// checks in `TRELLIS_APP_PROBES`: that one entry is replaced without them,
/// the other containers' staying, and nothing else changes (the annotation
/// naming it names nothing). Taken out as another is added, the added one's
/// checks take their place. Without the annotation (a pod injected by an
/// older version) the same. Reviewed again, the pod gets no patch. Real
/// AdmissionReview documents (fixtures/k8s), the patch applied with
/// `json-patch`; no Kubernetes API server can run here.
#[test]
fn a_container_taken_out_leaves_none_of_its_checks_behind() {
    let review = fixture("pod-deployment-http-probes.json");
    let legacy = fixture("pod-already-injected.json")["request"]["object"].clone();
    for first in [injected(&review), legacy] {
        let shipper_checks = |pod: &Value| {
            app_probes(pod)
                .as_object()
                .unwrap()
                .keys()
                .filter(|path| path.starts_with("/app-health/log-shipper/"))
                .count()
        };
        assert!(shipper_checks(&first) > 0, "{first}");
        let mut pod = first.clone();
        pod["spec"]["containers"]
            .as_array_mut()
            .unwrap()
            .retain(|c| c["name"] != "log-shipper");
        let reply = answer_for(&with_object(&review, pod.clone()));
        assert_eq!(reply["response"]["allowed"], true, "{reply}");
        assert!(reply["response"].get("warnings").is_none(), "{reply}");
        let patch = patch_of(&reply).expect("a patch");
        let probes_at = env_index(&first, "TRELLIS_APP_PROBES");
        assert_eq!(
            ops(&patch),
            [format!("replace /spec/initContainers/1/env/{probes_at}")]
        );
        let again = apply(&pod, &patch);
        let mut expected = app_probes(&first);
        expected
            .as_object_mut()
            .unwrap()
            .retain(|path, _| !path.starts_with("/app-health/log-shipper/"));
        assert_eq!(app_probes(&again), expected);
        assert_eq!(shipper_checks(&again), 0);
        settled(&review, again);

        // Taken out as another is added: the added one's checks join the
        // others', the one taken out leaves none.
        let mut pod = pod.clone();
        pod["spec"]["containers"]
            .as_array_mut()
            .unwrap()
            .push(vault_agent());
        let again = apply(&pod, &reinvocation_patch(&review, &pod));
        let checks = app_probes(&again);
        let checks = checks.as_object().unwrap();
        assert!(
            checks.contains_key("/app-health/vault-agent/readiness"),
            "{checks:?}"
        );
        for path in expected.as_object().unwrap().keys() {
            assert!(checks.contains_key(path), "{path}: {checks:?}");
        }
        assert_eq!(shipper_checks(&again), 0);
        assert_eq!(
            again["metadata"]["annotations"]["trellis.io/injected-containers"],
            "web,vault-agent,wait-for-db"
        );
        settled(&review, again);
    }
}

/// The marker annotation `trellis.io/injected` without the sidecar (copied
/// into a manifest by hand, or the containers taken out by a later webhook,
/// which re-invokes this one) is no sidecar: the pod is injected as any
/// other, and the volumes of an earlier injection make way for the new
/// ones, each once, since the API server refuses a name twice.
#[test]
fn a_pod_marked_injected_without_the_sidecar_is_injected() {
    let review = fixture("pod-deployment-http-probes.json");
    let mut pod = review["request"]["object"].clone();
    pod["metadata"]["annotations"]["trellis.io/injected"] = json!("true");
    let pod = injected(&with_object(&review, pod));
    assert_eq!(
        names(&pod["spec"]["initContainers"]),
        ["trellis-init", "trellis-proxy", "wait-for-db"]
    );
    assert_eq!(
        pod["metadata"]["annotations"]["trellis.io/injected"],
        "true"
    );

    let review = fixture("pod-already-injected.json");
    let pod = without_init_containers(&review["request"]["object"], &OURS);
    let pod = injected(&with_object(&review, pod));
    assert_eq!(
        names(&pod["spec"]["initContainers"]),
        ["trellis-init", "trellis-proxy", "wait-for-db"]
    );
    assert_eq!(
        names(&pod["spec"]["volumes"]),
        [
            "cache",
            "kube-api-access-7xq2m",
            "trellis-identity",
            "trellis-xtables"
        ]
    );
}

/// Probes an earlier injection rewrote to the sidecar's admin port, in a
/// pod injected again after its containers were removed by hand, are not
/// the app's own checks: the sidecar is not told to run them (it would
/// probe itself), they stay as they are, and a warning says why they fail.
/// Real AdmissionReview (fixtures/k8s); no API server here.
#[test]
fn probes_already_pointing_at_the_sidecar_are_not_taken_as_the_apps() {
    let review = fixture("pod-already-injected.json");
    let pod = without_init_containers(&review["request"]["object"], &OURS);
    let reply = answer_for(&with_object(&review, pod.clone()));
    let injected = apply(&pod, &patch_of(&reply).expect("a patch"));
    let proxy = container(&injected, "initContainers", "trellis-proxy");
    assert!(!env(proxy).contains_key("TRELLIS_APP_PROBES"), "{proxy}");
    for (name, field) in [
        ("web", "livenessProbe"),
        ("web", "readinessProbe"),
        ("log-shipper", "livenessProbe"),
    ] {
        assert_eq!(
            container(&injected, "containers", name)[field],
            container(&pod, "containers", name)[field],
            "{name} {field}"
        );
    }
    assert_eq!(
        reply["response"]["warnings"][0],
        "container \"web\" livenessProbe already calls the sidecar's \
         \"/app-health/web/liveness\", from an earlier injection; the app's own check is \
         not known, so it is left as it is and fails until the container's own check is \
         put back"
    );
    assert_eq!(reply["response"]["warnings"].as_array().unwrap().len(), 3);
}

/// A hook an earlier injection rewrote, in a pod injected again after its
/// Trellis containers were removed, carries that injection's token, which
/// the new sidecar does not know: it is given the new sidecar's token in
/// place of the old one, so the two agree, and the sidecar keeps refusing
/// hook calls without it (given none, it would run hooks for anyone). The
/// app's own hook is no longer known: a warning says so. Real
/// AdmissionReview (fixtures/k8s); no API server here.
#[test]
fn a_hook_of_an_earlier_injection_gets_the_new_token() {
    let mut review = fixture("pod-deployment-http-probes.json");
    review["request"]["object"]["spec"]["containers"][0]["lifecycle"] = json!({
        "preStop": {"httpGet": {"path": "/drain", "port": "http", "scheme": "HTTP"}},
    });
    let first = injected(&review);
    let first_token = hook_token(&first);

    let pod = without_init_containers(&first, &OURS);
    let reply = answer_for(&with_object(&review, pod.clone()));
    let again = apply(&pod, &patch_of(&reply).expect("a patch"));
    let token = hook_token(&again);
    assert_ne!(token, first_token);
    assert_eq!(
        container(&again, "containers", "web")["lifecycle"],
        json!({"preStop": {"httpGet": {
            "path": "/app-health/web/pre-stop", "port": 15020, "scheme": "HTTP",
            "httpHeaders": [{"name": "x-trellis-hook-token", "value": token}],
        }}})
    );
    let warnings = reply["response"]["warnings"].as_array().unwrap();
    let says = "container \"web\" lifecycle.preStop already calls the sidecar's \
                \"/app-health/web/pre-stop\", from an earlier injection; the app's own hook \
                is not known, so it is left as it is but for the pod's new hook token, and \
                fails until the container's own hook is put back";
    assert!(warnings.contains(&json!(says)), "{warnings:?}");
}

/// The hook token the sidecar of the injected `pod` is given.
fn hook_token(pod: &Value) -> String {
    env(container(pod, "initContainers", "trellis-proxy"))["TRELLIS_HOOK_TOKEN"]
        .as_str()
        .expect("the sidecar is given a hook token")
        .to_owned()
}

/// Without a trust bundle the sidecar could never start: the injector
/// refuses rather than produce a pod that hangs.
/// Real AdmissionReview documents (fixtures/k8s) as the API server sends them; no
/// Kubernetes API server can run here.
#[test]
fn no_trust_bundle_no_injection() {
    let review = fixture("pod-deployment-http-probes.json");
    let config = InjectConfig {
        trust_bundle: TrustBundleSource::Annotation(String::new()),
        ..config()
    };
    // Fail, the default: the pod is refused, saying why.
    let reply = answer(&review, NamespaceScope::SelectedByWebhook, &config);
    assert!(patch_of(&reply).is_none());
    assert_eq!(reply["response"]["allowed"], false);
    let message = reply["response"]["status"]["message"].as_str().unwrap();
    assert!(message.contains("no trust bundle"), "{message}");
    // Ignore: admitted without the sidecar, with a warning saying why.
    let config = InjectConfig {
        failure_policy: FailurePolicy::Ignore,
        ..config
    };
    let reply = answer(&review, NamespaceScope::SelectedByWebhook, &config);
    assert!(patch_of(&reply).is_none());
    assert_eq!(reply["response"]["allowed"], true);
    assert!(
        reply["response"]["warnings"][0]
            .as_str()
            .unwrap()
            .contains("no trust bundle")
    );
}

/// Images, control plane, token lifetime, resources and a ConfigMap bundle
/// are configuration; a token shorter than Kubernetes allows is refused.
/// Real AdmissionReview documents (fixtures/k8s) as the API server sends them; no
/// Kubernetes API server can run here.
#[test]
fn configuration_reaches_the_pod() {
    let review = fixture("pod-deployment-http-probes.json");
    let config = InjectConfig {
        trust_bundle: TrustBundleSource::ConfigMap("trellis-trust-bundle".into()),
        token_expiration_seconds: 7200,
        control_plane: "cp.mesh.svc:15012".into(),
        image_pull_policy: Some("Always".into()),
        trust_domain: "example.org".parse().unwrap(),
        ..config()
    };
    let reply = answer(&review, NamespaceScope::SelectedByWebhook, &config);
    let pod = apply(&review["request"]["object"], &patch_of(&reply).unwrap());
    let volume = pod["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "trellis-identity")
        .unwrap();
    assert_eq!(
        volume["projected"]["sources"],
        json!([
            {"serviceAccountToken": {"audience": "trellis", "expirationSeconds": 7200, "path": "token"}},
            {"configMap": {"name": "trellis-trust-bundle", "items": [{"key": "bundle.pem", "path": "bundle.pem"}]}},
        ])
    );
    assert!(
        pod["metadata"]["annotations"]
            .get("trellis.io/trust-bundle")
            .is_none()
    );
    let proxy = container(&pod, "initContainers", "trellis-proxy");
    assert_eq!(proxy["imagePullPolicy"], "Always");
    let env = env(proxy);
    assert_eq!(env["TRELLIS_CONTROL_PLANE"], "cp.mesh.svc:15012");
    assert!(
        env["TRELLIS_IDENTITY"]
            .as_str()
            .unwrap()
            .starts_with("spiffe://example.org/ns/")
    );

    let short = InjectConfig {
        token_expiration_seconds: 300,
        ..config
    };
    let reply = answer(&review, NamespaceScope::SelectedByWebhook, &short);
    assert!(patch_of(&reply).is_none());
    assert_eq!(reply["response"]["allowed"], false);
    let message = reply["response"]["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("Kubernetes requires 600 to 4294967296"),
        "{message}"
    );
}

/// Ephemeral storage in the injection settings (the chart's
/// `injection.proxy.resources` and `injection.init.resources`, for clusters
/// that ask every container for it) reaches both injected containers beside
/// cpu and memory, and the pod passes strict schema validation. Real
/// AdmissionReview; no API server here.
#[test]
fn ephemeral_storage_reaches_the_injected_containers() {
    let settings = r#"{
        "proxyResources": {"requests": {"cpu": "50m", "memory": "64Mi", "ephemeral-storage": "100Mi"},
                           "limits": {"cpu": "1", "memory": "256Mi", "ephemeral-storage": "1Gi"}},
        "initResources": {"requests": {"ephemeral-storage": "10Mi"},
                          "limits": {"ephemeral-storage": 67108864}}
    }"#;
    let config = InjectConfig {
        image: IMAGE.into(),
        ..InjectConfig::from_settings(settings, "cluster.local".parse().unwrap(), BUNDLE.into())
            .unwrap()
    };
    let review = fixture("pod-deployment-http-probes.json");
    let reply = answer(&review, NamespaceScope::SelectedByWebhook, &config);
    let pod = apply(&review["request"]["object"], &patch_of(&reply).unwrap());
    assert_eq!(
        container(&pod, "initContainers", "trellis-proxy")["resources"],
        json!({
            "requests": {"cpu": "50m", "memory": "64Mi", "ephemeral-storage": "100Mi"},
            "limits": {"cpu": "1", "memory": "256Mi", "ephemeral-storage": "1Gi"},
        })
    );
    assert_eq!(
        container(&pod, "initContainers", "trellis-init")["resources"],
        json!({
            "requests": {"ephemeral-storage": "10Mi"},
            "limits": {"ephemeral-storage": "67108864"},
        })
    );
    valid_as_stored(pod, "web-6b7f9c5d8-x2x7k");
}

/// The configured pull secrets (the chart's `imagePullSecrets`) reach the
/// pod, so the kubelet pulls both injected containers' image from a private
/// registry: after the pod's own (as its ServiceAccount's reach it), never
/// repeating a name it lists, and the field is left alone when it lists
/// them all or none is configured. Real AdmissionReview; the pod's own
/// pull secrets are added to it as the ServiceAccount admission plugin
/// adds them; no API server here.
#[test]
fn pull_secrets_reach_the_pod_after_its_own() {
    let review = fixture("pod-deployment-http-probes.json");
    let config = InjectConfig {
        image_pull_secrets: vec!["mirror-pull".into(), "team-pull".into()],
        ..config()
    };
    let inject = |pod: &Value, config: &InjectConfig| {
        let review = with_object(&review, pod.clone());
        let reply = answer(&review, NamespaceScope::SelectedByWebhook, config);
        let patch = patch_of(&reply).expect("a patch");
        let touched = serde_json::to_value(&patch)
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .any(|op| op["path"] == "/spec/imagePullSecrets");
        (apply(pod, &patch), touched)
    };
    let mut pod = review["request"]["object"].clone();
    assert!(pod["spec"].get("imagePullSecrets").is_none());
    let (injected, _) = inject(&pod, &config);
    assert_eq!(
        injected["spec"]["imagePullSecrets"],
        json!([{"name": "mirror-pull"}, {"name": "team-pull"}])
    );

    pod["spec"]["imagePullSecrets"] = json!([{"name": "team-pull"}, {"name": "app-pull"}]);
    let (injected, _) = inject(&pod, &config);
    assert_eq!(
        injected["spec"]["imagePullSecrets"],
        json!([{"name": "team-pull"}, {"name": "app-pull"}, {"name": "mirror-pull"}])
    );

    pod["spec"]["imagePullSecrets"] = json!([{"name": "mirror-pull"}, {"name": "team-pull"}]);
    let (injected, touched) = inject(&pod, &config);
    assert!(!touched, "the pod lists them all");
    assert_eq!(
        injected["spec"]["imagePullSecrets"],
        pod["spec"]["imagePullSecrets"]
    );

    let (injected, touched) = inject(&pod, &admission::config());
    assert!(!touched, "none configured");
    assert_eq!(
        injected["spec"]["imagePullSecrets"],
        pod["spec"]["imagePullSecrets"]
    );
    let (injected, _) = inject(&review["request"]["object"], &admission::config());
    assert!(injected["spec"].get("imagePullSecrets").is_none());
}

/// The answer echoes the request's uid; only CREATE is mutated; a body that
/// is not an AdmissionReview is an error for the server to answer with 400.
/// Real AdmissionReview documents (fixtures/k8s) as the API server sends them; no
/// Kubernetes API server can run here.
#[test]
fn envelope_rules() {
    let review = fixture("pod-deployment-http-probes.json");
    let reply = answer_for(&review);
    assert_eq!(reply["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(reply["kind"], "AdmissionReview");
    assert_eq!(reply["response"]["uid"], review["request"]["uid"]);

    let mut update = review.clone();
    update["request"]["operation"] = json!("UPDATE");
    assert!(patch_of(&answer_for(&update)).is_none());

    let mut service = review.clone();
    service["request"]["kind"] = json!({"group": "", "version": "v1", "kind": "Service"});
    let reply = answer_for(&service);
    assert_eq!(reply["response"]["allowed"], true);
    assert!(patch_of(&reply).is_none());
    assert!(
        reply["response"]["warnings"][0]
            .as_str()
            .unwrap()
            .contains("only injects Pods, not v1/Service")
    );

    let scope = NamespaceScope::SelectedByWebhook;
    let e = review_pod(b"{not json", scope, &config()).unwrap_err();
    assert!(e.to_string().starts_with("the body is not JSON"), "{e}");
    let e = review_pod(br#"{"apiVersion": "v1", "kind": "Pod"}"#, scope, &config()).unwrap_err();
    assert!(e.to_string().contains("AdmissionReview"), "{e}");
}

/// A container running as the proxy's UID would bypass the mesh: under
/// the outbound policy passthrough the pod is injected, and the warning
/// names each such container, app and init alike (the same ones deny
/// refuses). Real AdmissionReview documents (fixtures/k8s) as the API
/// server sends them; no Kubernetes API server can run here.
#[test]
fn warns_when_an_app_runs_as_the_proxy_uid() {
    let review = fixture("pod-deployment-http-probes.json");
    let warned = |pod: Value| {
        let reply = answer(
            &with_object(&review, pod),
            NamespaceScope::SelectedByWebhook,
            &passthrough(),
        );
        assert!(patch_of(&reply).is_some(), "{reply}");
        reply["response"]["warnings"].clone()
    };
    let says = |container: &str| {
        format!(
            "container \"{container}\" runs as UID 1337, the proxy's UID: its traffic bypasses \
             the sidecar"
        )
    };
    // "web" sets its own UID; "log-shipper" and the init container
    // "wait-for-db" inherit the pod's.
    let mut pod = review["request"]["object"].clone();
    pod["spec"]["securityContext"]["runAsUser"] = json!(1337);
    assert_eq!(
        warned(pod),
        json!([says("log-shipper"), says("wait-for-db")])
    );
    // An ordinary init container alone, by its own UID.
    let mut pod = review["request"]["object"].clone();
    pod["spec"]["initContainers"][0]["securityContext"] = json!({"runAsUser": 1337});
    assert_eq!(warned(pod), json!([says("wait-for-db")]));
}

fn passthrough() -> InjectConfig {
    InjectConfig {
        outbound_policy: OutboundPolicy::Passthrough,
        ..config()
    }
}

/// The reply's denial message, after checking it denies with no patch.
fn denial(reply: &Value) -> &str {
    assert_eq!(reply["response"]["allowed"], false, "{reply}");
    assert!(patch_of(reply).is_none(), "{reply}");
    reply["response"]["status"]["message"].as_str().unwrap()
}

/// Under the outbound policy deny, a container running as the sidecar's
/// UID (its own `runAsUser` or the pod's; an app container, a native
/// sidecar or an ordinary init container) would reach destinations the mesh
/// refuses, since init never redirects that UID: the pod is refused naming
/// the container, whatever the failure policy. Moving the sidecar to
/// another UID admits it. Real AdmissionReview documents (fixtures/k8s); no
/// Kubernetes API server can run here.
#[test]
fn under_outbound_deny_a_container_running_as_the_proxy_uid_is_refused() {
    let review = fixture("pod-deployment-http-probes.json");
    let says = |container: &str, set_by: &str| {
        format!(
            "trellis: cannot inject: container \"{container}\" runs as UID 1337 ({set_by}), the \
             sidecar's UID, whose traffic is never intercepted: under the outbound policy deny \
             it would reach destinations the mesh refuses; run it as another UID, or move the \
             sidecar to one no image uses (injection.proxy.uid)"
        )
    };
    // "web" sets its own UID; "log-shipper" inherits the pod's.
    let mut pod = review["request"]["object"].clone();
    pod["spec"]["securityContext"]["runAsUser"] = json!(1337);
    let reply = answer_for(&with_object(&review, pod.clone()));
    assert_eq!(
        denial(&reply),
        says("log-shipper", "the pod's securityContext.runAsUser")
    );
    // The failure policy Ignore does not admit it either.
    let ignore = InjectConfig {
        failure_policy: FailurePolicy::Ignore,
        ..config()
    };
    let reply = answer(
        &with_object(&review, pod.clone()),
        NamespaceScope::SelectedByWebhook,
        &ignore,
    );
    assert_eq!(
        denial(&reply),
        says("log-shipper", "the pod's securityContext.runAsUser")
    );
    // Moved off that UID, the sidecar gets the pod, running as the new one.
    let moved = InjectConfig {
        proxy_uid: 2102,
        ..config()
    };
    let reply = answer(
        &with_object(&review, pod),
        NamespaceScope::SelectedByWebhook,
        &moved,
    );
    let pod = apply(&review["request"]["object"], &patch_of(&reply).unwrap());
    let proxy = container(&pod, "initContainers", "trellis-proxy");
    assert_eq!(proxy["securityContext"]["runAsUser"], 2102);
    let init = container(&pod, "initContainers", "trellis-init");
    let args = init["args"].as_array().unwrap();
    let at = args.iter().position(|a| a == "--proxy-uid").unwrap();
    assert_eq!(args[at + 1], "2102");

    // An ordinary init container, by its own securityContext.
    let mut pod = review["request"]["object"].clone();
    pod["spec"]["initContainers"][0]["securityContext"] = json!({"runAsUser": 1337});
    let reply = answer_for(&with_object(&review, pod));
    assert_eq!(
        denial(&reply),
        says("wait-for-db", "its securityContext.runAsUser")
    );

    // A native sidecar of the pod, by the pod's UID.
    let review = fixture("pod-native-sidecar-probes.json");
    let mut pod = review["request"]["object"].clone();
    pod["spec"]["securityContext"]["runAsUser"] = json!(1337);
    pod["spec"]["containers"][0]["securityContext"] = json!({"runAsUser": 10001});
    let reply = answer_for(&with_object(&review, pod));
    assert_eq!(
        denial(&reply),
        says("cloud-sql-proxy", "the pod's securityContext.runAsUser")
    );
}

/// A container declaring a TCP port the sidecar listens on would never
/// serve it: the sidecar binds first ("address in use", a crash loop), or,
/// on the admin port, the container's clients reach the sidecar. The pod is
/// refused naming the container, the port and the sidecar's port, whatever
/// the failure policy, and nothing records it as meshed. The same number
/// over UDP clashes with nothing. Real AdmissionReview documents
/// (fixtures/k8s); no Kubernetes API server can run here.
#[test]
fn a_container_on_a_port_of_the_sidecar_is_refused() {
    let review = fixture("pod-deployment-http-probes.json");
    for (field, index, port, sidecar) in [
        ("containers", 0, 15006, "inbound"),
        ("containers", 1, 15020, "admin"),
        ("initContainers", 0, 15001, "outbound"),
    ] {
        let mut pod = review["request"]["object"].clone();
        let target = &mut pod["spec"][field][index];
        let name = target["name"].as_str().unwrap().to_owned();
        target["ports"] = json!([{"name": "clash", "containerPort": port}]);
        let reply = answer_for(&with_object(&review, pod.clone()));
        assert_eq!(
            denial(&reply),
            format!(
                "trellis: cannot inject: container \"{name}\" declares TCP port {port}, the \
                 sidecar's {sidecar} port: the sidecar listens there in the same network \
                 namespace, so the container could not bind it and its clients would reach the \
                 sidecar; give the container another port"
            )
        );
        let request = AdmissionRequest::parse(&body(&with_object(&review, pod))).unwrap();
        let reviewed =
            respond_pod_reporting(&request, NamespaceScope::SelectedByWebhook, &config());
        assert!(!reviewed.meshed, "{port}: recorded as meshed");
    }
    let mut pod = review["request"]["object"].clone();
    pod["spec"]["containers"][0]["ports"] =
        json!([{"name": "dns", "containerPort": 15006, "protocol": "UDP"}]);
    assert!(patch_of(&answer_for(&with_object(&review, pod))).is_some());
}

/// The sidecar's ports are found by name: a Service's `targetPort`, a
/// PodMonitor scraping every sidecar's `trellis-admin`. A container (app
/// or init) declaring a port of either name, whatever its number and
/// protocol, would be taken for the sidecar: the pod is refused naming the
/// container, the port and the name, whatever the failure policy, and
/// nothing records it as meshed. A port named otherwise is injected, and
/// the sidecar is then the one container with those names. Real
/// AdmissionReview documents (fixtures/k8s); no Kubernetes API server can
/// run here.
#[test]
fn a_container_port_named_as_the_sidecars_is_refused() {
    let review = fixture("pod-deployment-http-probes.json");
    for (field, index, port, name, sidecar) in [
        (
            "containers",
            0,
            json!({"name": "trellis-admin", "containerPort": 9100}),
            "trellis-admin",
            "admin",
        ),
        (
            "containers",
            1,
            json!({"name": "trellis-inbound", "containerPort": 8443, "protocol": "TCP"}),
            "trellis-inbound",
            "inbound",
        ),
        (
            "initContainers",
            0,
            json!({"name": "trellis-admin", "containerPort": 9000, "protocol": "UDP"}),
            "trellis-admin",
            "admin",
        ),
    ] {
        let mut pod = review["request"]["object"].clone();
        let target = &mut pod["spec"][field][index];
        let container = target["name"].as_str().unwrap().to_owned();
        let number = &port["containerPort"];
        target["ports"] = json!([{"name": "http", "containerPort": 8080}, port]);
        let reply = answer_for(&with_object(&review, pod.clone()));
        assert_eq!(
            denial(&reply),
            format!(
                "trellis: cannot inject: container \"{container}\" declares port {number} named \
                 \"{name}\", the name of the sidecar's {sidecar} port: whatever finds the \
                 sidecar's port by that name (a Service's targetPort, a PodMonitor scraping \
                 sidecars) could reach the container instead; give the container's port another \
                 name"
            )
        );
        let ignore = InjectConfig {
            failure_policy: FailurePolicy::Ignore,
            ..config()
        };
        let reply = answer(
            &with_object(&review, pod.clone()),
            NamespaceScope::SelectedByWebhook,
            &ignore,
        );
        assert_eq!(
            reply["response"]["allowed"], false,
            "{name}: admitted under Ignore"
        );
        let request = AdmissionRequest::parse(&body(&with_object(&review, pod))).unwrap();
        let reviewed =
            respond_pod_reporting(&request, NamespaceScope::SelectedByWebhook, &config());
        assert!(!reviewed.meshed, "{name}: recorded as meshed");
    }

    let mut pod = review["request"]["object"].clone();
    pod["spec"]["containers"][0]["ports"][1]["name"] = json!("admin");
    pod["spec"]["containers"][1]["ports"] =
        json!([{"name": "trellis-metrics", "containerPort": 9102}]);
    let pod = injected(&with_object(&review, pod));
    let named = |wanted: &str| {
        ["containers", "initContainers"]
            .iter()
            .flat_map(|field| pod["spec"][field].as_array().unwrap())
            .filter(|c| {
                c["ports"]
                    .as_array()
                    .is_some_and(|ports| ports.iter().any(|p| p["name"] == wanted))
            })
            .map(|c| c["name"].as_str().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(named("trellis-admin"), ["trellis-proxy"]);
    assert_eq!(named("trellis-inbound"), ["trellis-proxy"]);
    assert_eq!(named("admin"), ["web"]);
}

/// A pod on the node's network in an opted-in namespace is admitted
/// without a sidecar (iptables there would capture the node's traffic), and
/// its author is told so rather than left to believe it meshed. Real
/// AdmissionReview documents (fixtures/k8s); no Kubernetes API server can
/// run here.
#[test]
fn a_host_network_pod_is_admitted_unmeshed_with_a_warning() {
    let review = fixture("pod-deployment-http-probes.json");
    let mut pod = review["request"]["object"].clone();
    pod["spec"]["hostNetwork"] = json!(true);
    let reply = answer_for(&with_object(&review, pod));
    assert_eq!(
        reply["response"],
        json!({"uid": review["request"]["uid"], "allowed": true, "warnings": [
            "trellis: sidecar not injected: the pod uses the node's network (spec.hostNetwork); \
             the sidecar's iptables rules would redirect the whole node's traffic, so this pod \
             runs outside the mesh"
        ]})
    );
}

/// Our init container without the sidecar (the sidecar taken out of an
/// injected pod's manifest) redirects the pod's traffic to ports nothing
/// listens on: the pod is refused naming the missing container, even
/// opted out, rather than admitted cut off. Real AdmissionReview documents
/// (fixtures/k8s); no Kubernetes API server can run here.
#[test]
fn our_init_without_the_sidecar_is_refused() {
    refused_even_opted_out(
        "trellis-proxy",
        "trellis: cannot inject: the pod has the container trellis-init but not \
         trellis-proxy: its traffic would be redirected to a sidecar that is not there; \
         create it without trellis-init to have both injected",
    );
}

/// The sidecar without our init container (the init taken out of an
/// injected pod by another mutating webhook or by hand) is never reached:
/// nothing redirects the pod's traffic to it. The pod is refused naming the
/// missing container, even opted out, rather than admitted looking meshed,
/// and nothing records it as meshed. Real AdmissionReview documents
/// (fixtures/k8s); no Kubernetes API server can run here.
#[test]
fn the_sidecar_without_our_init_is_refused() {
    refused_even_opted_out(
        "trellis-init",
        "trellis: cannot inject: the pod has the container trellis-proxy but not \
         trellis-init: nothing would redirect its traffic to the sidecar, so it would run \
         outside the mesh; create it without trellis-proxy to have both injected",
    );
}

/// The injected pod of the real AdmissionReview `pod-already-injected.json`,
/// its init container `removed` taken out, is refused saying `says`, and
/// recorded as not meshed; opted out, it is refused all the same.
fn refused_even_opted_out(removed: &str, says: &str) {
    let review = fixture("pod-already-injected.json");
    let mut pod = without_init_containers(&review["request"]["object"], &[removed]);
    assert_eq!(
        denial(&answer_for(&with_object(&review, pod.clone()))),
        says
    );
    let request = AdmissionRequest::parse(&body(&with_object(&review, pod.clone()))).unwrap();
    let reviewed = respond_pod_reporting(&request, NamespaceScope::SelectedByWebhook, &config());
    assert!(!reviewed.meshed, "{removed} removed: recorded as meshed");
    pod["metadata"]["annotations"]["trellis.io/inject"] = json!("disabled");
    assert_eq!(denial(&answer_for(&with_object(&review, pod))), says);
}

/// The containers the injector adds.
const OURS: [&str; 2] = ["trellis-init", "trellis-proxy"];

/// `pod` without its init containers named in `removed`.
fn without_init_containers(pod: &Value, removed: &[&str]) -> Value {
    let mut pod = pod.clone();
    pod["spec"]["initContainers"]
        .as_array_mut()
        .unwrap()
        .retain(|c| !removed.contains(&c["name"].as_str().unwrap()));
    pod
}

/// The injected pod is a valid Pod for the Kubernetes API (native sidecar
/// fields included), checked with `kubernetes-validate --strict` against the
/// OpenAPI schemas of the oldest supported release and the one where native
/// sidecars became stable. No API server here; without the tool (see
/// `scripts/install-helm.sh`) the test says `skipped:` and passes, except
/// under CI.
#[test]
fn the_injected_pod_passes_strict_schema_validation() {
    for (fixture_name, name) in [
        ("pod-deployment-http-probes.json", "web-6b7f9c5d8-x2x7k"),
        ("pod-native-sidecar-probes.json", "orders-5c9d7f8b6-q4w9z"),
    ] {
        valid_as_stored(injected(&fixture(fixture_name)), name);
    }
}

/// Asserts `pod` is a valid Pod (`kubernetes-validate --strict`, as the
/// chart tests validate) once named `name`, as the API server names a pod
/// from its `generateName` when it stores it; without the tool, says
/// `skipped:` (a failure under CI).
fn valid_as_stored(mut pod: Value, name: &str) {
    let Some(validate) = chart::tool("kubernetes-validate") else {
        chart::machine::skip(
            "skipped: kubernetes-validate not installed (run scripts/install-helm.sh)",
        );
        return;
    };
    pod["metadata"]["name"] = json!(name);
    // JSON is YAML: the pod goes through the chart tests' validation.
    chart::validate_manifests(&validate, &serde_json::to_string_pretty(&pod).unwrap());
}

/// `review` with these annotations and labels added to its pod.
fn with_names(review: &Value, annotations: &[(&str, &str)], labels: &[(&str, &str)]) -> Value {
    let mut pod = review["request"]["object"].clone();
    for (field, pairs) in [("annotations", annotations), ("labels", labels)] {
        for (name, value) in pairs {
            pod["metadata"][field][*name] = json!(value);
        }
    }
    with_object(review, pod)
}

/// A mistyped `trellis.io/` annotation is no setting: the pod is injected
/// exactly as without it (the same pod once patched, the typo kept as it
/// is), and its author is warned, naming the annotation and the name it
/// is close to (a letter missing, a singular for a plural); a name close
/// to none, and a pod label under `trellis.io/` other than
/// `trellis.io/inject`, are warned of without a suggestion. Told at
/// injection, and in the same words when the pod is reviewed again with
/// its sidecar (the API server prints a text once a request); a pod that
/// opted out is told nothing. Real AdmissionReview (fixtures/k8s); no API
/// server here.
#[test]
fn an_unknown_trellis_annotation_is_warned_of_with_the_name_it_is_close_to() {
    let review = fixture("pod-deployment-http-probes.json");
    let typos = [
        ("trellis.io/acces-log", "false"),
        ("trellis.io/exclude-outbound-port", "5432"),
        ("trellis.io/opaque-port", "3306"),
    ];
    let labels = [("trellis.io/Inject", "enabled"), ("trellis.io/tier", "web")];
    let typoed = with_names(&review, &typos, &labels);
    let reply = answer(&typoed, NamespaceScope::SelectedByWebhook, &config());
    assert_eq!(reply["response"]["allowed"], true, "{reply}");
    assert_eq!(
        reply["response"]["warnings"],
        json!([
            "trellis: metadata.annotations[trellis.io/acces-log] is not a Trellis annotation and \
             is ignored; did you mean trellis.io/access-log?",
            "trellis: metadata.annotations[trellis.io/exclude-outbound-port] is not a Trellis \
             annotation and is ignored; did you mean trellis.io/exclude-outbound-ports?",
            "trellis: metadata.annotations[trellis.io/opaque-port] is not a Trellis annotation \
             and is ignored; did you mean trellis.io/opaque-ports?",
            "trellis: metadata.labels[trellis.io/Inject] is not a Trellis label and is ignored; \
             did you mean trellis.io/inject?",
            "trellis: metadata.labels[trellis.io/tier] is not a Trellis label and is ignored",
        ]),
        "{reply}"
    );
    // Injected as without the typos: the sidecar's access log stays on,
    // no port is added to init's or the sidecar's flags.
    let pod = apply(&typoed["request"]["object"], &patch_of(&reply).unwrap());
    let expected = with_names(&with_object(&review, injected(&review)), &typos, &labels);
    assert_eq!(pod, expected["request"]["object"]);

    let again = answer(
        &with_object(&review, pod),
        NamespaceScope::SelectedByWebhook,
        &config(),
    );
    assert!(patch_of(&again).is_none(), "{again}");
    assert_eq!(
        again["response"]["warnings"], reply["response"]["warnings"],
        "{again}"
    );
    let opted_out = with_names(&typoed, &[("trellis.io/inject", "disabled")], &[]);
    let skipped = answer(&opted_out, NamespaceScope::SelectedByWebhook, &config());
    assert!(patch_of(&skipped).is_none(), "{skipped}");
    assert!(skipped["response"].get("warnings").is_none(), "{skipped}");
}

/// A name under `trellis.io/` that a webhook called after Trellis's puts
/// on the pod (the API server then reinvokes `/inject`) is warned of on
/// that review, as at injection: with nothing else new (no patch), and
/// with a container added beside it (its warnings after). The names of the
/// first injection are told again in its words, so the API server, which
/// prints a warning text once a request, prints each once. Real
/// AdmissionReview (fixtures/k8s), the patch applied with `json-patch`; no
/// API server here.
#[test]
fn an_unknown_trellis_name_a_later_webhook_adds_is_warned_of_on_reinvocation() {
    let review = fixture("pod-deployment-http-probes.json");
    let typoed = with_names(&review, &[("trellis.io/acces-log", "false")], &[]);
    let at_injection = answer_for(&typoed);
    let first = apply(
        &typoed["request"]["object"],
        &patch_of(&at_injection).expect("a patch"),
    );
    let acces_log = "trellis: metadata.annotations[trellis.io/acces-log] is not a Trellis \
                     annotation and is ignored; did you mean trellis.io/access-log?";
    assert_eq!(at_injection["response"]["warnings"], json!([acces_log]));

    // A later webhook adds a label and an annotation Trellis does not know.
    let later = with_names(
        &with_object(&review, first),
        &[("trellis.io/opaque-port", "3306")],
        &[("trellis.io/tier", "web")],
    );
    let added = [
        acces_log,
        "trellis: metadata.annotations[trellis.io/opaque-port] is not a Trellis annotation and \
         is ignored; did you mean trellis.io/opaque-ports?",
        "trellis: metadata.labels[trellis.io/tier] is not a Trellis label and is ignored",
    ];
    let reply = answer_for(&later);
    assert_eq!(reply["response"]["allowed"], true, "{reply}");
    assert!(patch_of(&reply).is_none(), "{reply}");
    assert_eq!(reply["response"]["warnings"], json!(added), "{reply}");

    // With a container added beside them: its warning follows theirs.
    let mut pod = later["request"]["object"].clone();
    let mut agent = vault_agent();
    agent["livenessProbe"] = json!({"httpGet": {"path": "/", "port": "metrics"}});
    pod["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(agent);
    let reply = answer_for(&with_object(&review, pod.clone()));
    assert_eq!(reply["response"]["allowed"], true, "{reply}");
    let mut expected = json!(added);
    expected.as_array_mut().unwrap().push(json!(
        "container \"vault-agent\" livenessProbe is not rewritten for the sidecar (the \
         container declares no port named \"metrics\"); it will fail under strict mTLS"
    ));
    assert_eq!(reply["response"]["warnings"], expected, "{reply}");
    let again = apply(&pod, &patch_of(&reply).expect("a patch"));
    let settled = settled(&review, again);
    assert_eq!(settled["response"]["warnings"], json!(added), "{settled}");
}

/// The names under `trellis.io/` the chart puts on pods (the control
/// plane's own Deployment) and selects pods by (its webhooks' object
/// selectors, its Deployment's, PodDisruptionBudget's, PodMonitors' and
/// NetworkPolicy's selectors) are the injector's own: no pod the mesh
/// labels or selects is warned of them. Every such name of the chart
/// rendered with its optional objects on, walking every selector and pod
/// template, is checked against `POD_LABELS` and `POD_ANNOTATIONS`.
#[test]
fn the_charts_names_on_pods_are_the_injectors_own() {
    let Some(helm) = chart::tool("helm") else {
        chart::machine::skip("skipped: helm not installed (run scripts/install-helm.sh)");
        return;
    };
    let rendered = chart::template(
        &helm,
        &[
            "networkPolicy.enabled=true",
            "metrics.podMonitor.enabled=true",
            "metrics.sidecarPodMonitor.enabled=true",
        ],
    )
    .unwrap();
    // (where, name) of each `trellis.io/` name a pod carries or is
    // selected by.
    fn walk(value: &Value, found: &mut Vec<(&'static str, String)>) {
        match value {
            Value::Object(map) => {
                for (key, inner) in map {
                    let names = |v: &Value| {
                        v.as_object()
                            .map(|m| m.keys().cloned().collect::<Vec<_>>())
                            .unwrap_or_default()
                    };
                    match key.as_str() {
                        "matchLabels" => {
                            found.extend(names(inner).into_iter().map(|n| ("label", n)));
                        }
                        "matchExpressions" => found.extend(
                            inner
                                .as_array()
                                .into_iter()
                                .flatten()
                                .filter_map(|e| e["key"].as_str())
                                .map(|n| ("label", n.to_owned())),
                        ),
                        "template" => {
                            let metadata = &inner["metadata"];
                            found.extend(
                                names(&metadata["labels"]).into_iter().map(|n| ("label", n)),
                            );
                            found.extend(
                                names(&metadata["annotations"])
                                    .into_iter()
                                    .map(|n| ("annotation", n)),
                            );
                        }
                        _ => {}
                    }
                    walk(inner, found);
                }
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, found)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    for doc in chart::documents(&rendered) {
        walk(&doc, &mut found);
    }
    let ours: Vec<_> = found
        .iter()
        .filter(|(_, name)| name.starts_with("trellis.io/"))
        .collect();
    assert!(
        ours.contains(&&("label", "trellis.io/inject".to_owned())),
        "{found:?}"
    );
    for (kind, name) in ours {
        let known = if *kind == "label" {
            POD_LABELS.contains(&name.as_str())
        } else {
            POD_ANNOTATIONS.contains(&name.as_str())
        };
        assert!(known, "the chart's pod {kind} {name} is not the injector's");
    }
}

/// A pod with a thousand names under `trellis.io/` that are not the
/// mesh's is warned of the first few by name and the rest in one count,
/// and injected all the same. Real AdmissionReview; no API server here.
#[test]
fn many_unknown_trellis_names_give_a_bounded_list_of_warnings() {
    let review = fixture("pod-deployment-http-probes.json");
    let names: Vec<String> = (0..1000).map(|i| format!("trellis.io/x{i:04}")).collect();
    let annotations: Vec<(&str, &str)> = names[..900].iter().map(|n| (&**n, "1")).collect();
    let labels: Vec<(&str, &str)> = names[900..].iter().map(|n| (&**n, "1")).collect();
    let reply = answer(
        &with_names(&review, &annotations, &labels),
        NamespaceScope::SelectedByWebhook,
        &config(),
    );
    assert_eq!(reply["response"]["allowed"], true, "{reply}");
    assert!(patch_of(&reply).is_some(), "{reply}");
    let warnings = reply["response"]["warnings"].as_array().unwrap();
    assert_eq!(warnings.len(), MAX_UNKNOWN_NAME_WARNINGS + 1, "{reply}");
    for (i, warning) in warnings[..MAX_UNKNOWN_NAME_WARNINGS].iter().enumerate() {
        assert_eq!(
            warning,
            &format!(
                "trellis: metadata.annotations[trellis.io/x{i:04}] is not a Trellis annotation \
                 and is ignored"
            )
        );
    }
    assert_eq!(warnings[MAX_UNKNOWN_NAME_WARNINGS], MORE_UNKNOWN_NAMES);
}

/// The warning that stands for the names under `trellis.io/` past the
/// first [`MAX_UNKNOWN_NAME_WARNINGS`].
const MORE_UNKNOWN_NAMES: &str = "trellis: and more names under trellis.io/ in \
                                  metadata.annotations or metadata.labels that Trellis does not \
                                  know, ignored";

/// The warnings a client is shown of one request whose webhook calls
/// answered `replies`: the API server passes each text on once.
fn shown(replies: &[&Value]) -> Vec<String> {
    let mut shown: Vec<String> = Vec::new();
    for reply in replies {
        for warning in reply["response"]["warnings"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let warning = warning.as_str().unwrap().to_owned();
            if !shown.contains(&warning) {
                shown.push(warning);
            }
        }
    }
    shown
}

/// A pod with more names under `trellis.io/` than are warned of one by
/// one is warned the same on its injection and on a review of it with
/// its sidecar; when a webhook called after Trellis's adds such names
/// (the API server reinvoking `/inject` in the same request), the line
/// that stands for the names past the first few is the same text on both
/// calls, so the client is shown it once, and each name once. Real
/// AdmissionReview (fixtures/k8s), patched with `json-patch`; no API
/// server here.
#[test]
fn the_line_for_the_names_past_the_first_shows_once_after_a_reinvocation() {
    let review = fixture("pod-deployment-http-probes.json");
    let names: Vec<String> = (1..=7).map(|i| format!("trellis.io/x{i}0")).collect();
    let annotations: Vec<(&str, &str)> = names.iter().map(|n| (&**n, "1")).collect();
    let typoed = with_names(&review, &annotations, &[]);
    let at_injection = answer_for(&typoed);
    let warnings = at_injection["response"]["warnings"].as_array().unwrap();
    assert_eq!(
        warnings.len(),
        MAX_UNKNOWN_NAME_WARNINGS + 1,
        "{at_injection}"
    );
    assert_eq!(warnings[MAX_UNKNOWN_NAME_WARNINGS], MORE_UNKNOWN_NAMES);
    let first = apply(
        &typoed["request"]["object"],
        &patch_of(&at_injection).expect("a patch"),
    );
    // Reviewed again as it is: the same warnings.
    let again = settled(&review, first.clone());
    assert_eq!(
        again["response"]["warnings"], at_injection["response"]["warnings"],
        "{again}"
    );

    // A later webhook adds two names, one before those shown.
    let later = with_names(
        &with_object(&review, first),
        &[("trellis.io/x05", "1"), ("trellis.io/x99", "1")],
        &[],
    );
    let reinvoked = answer_for(&later);
    assert_eq!(reinvoked["response"]["allowed"], true, "{reinvoked}");
    let shown = shown(&[&at_injection, &reinvoked]);
    let counted: Vec<&String> = shown.iter().filter(|w| w.contains("more names")).collect();
    assert_eq!(counted, [MORE_UNKNOWN_NAMES], "{shown:#?}");
    // The first five names of the injection, and the one added before them.
    assert_eq!(shown.len(), MAX_UNKNOWN_NAME_WARNINGS + 2, "{shown:#?}");
    assert!(
        shown[MAX_UNKNOWN_NAME_WARNINGS + 1].contains("[trellis.io/x05]"),
        "{shown:#?}"
    );
}

/// Every annotation the injector reads or writes, and the label
/// `trellis.io/inject`, each with a valid value, bring no warning. The
/// test names a value for each of `POD_ANNOTATIONS`, so one added there
/// must be added here. Real AdmissionReview; no API server here.
#[test]
fn the_meshs_own_names_bring_no_warning() {
    let review = fixture("pod-deployment-http-probes.json");
    let values = [
        ("trellis.io/inject", "enabled"),
        ("trellis.io/access-log", "true"),
        ("trellis.io/tcp-user-timeout", "10m"),
        ("trellis.io/opaque-ports", "3306"),
        ("trellis.io/exclude-inbound-ports", "22"),
        ("trellis.io/exclude-outbound-ports", "25"),
        ("trellis.io/exclude-outbound-cidrs", "10.0.0.0/8"),
        ("trellis.io/max-h2-connections-per-peer", "16"),
        ("trellis.io/max-h2-connections", "512"),
        ("trellis.io/injected", "true"),
        ("trellis.io/injected-containers", "web"),
        ("trellis.io/trust-bundle", BUNDLE),
    ];
    let mut named: Vec<&str> = values.iter().map(|(name, _)| *name).collect();
    named.sort_unstable();
    let mut known = POD_ANNOTATIONS.to_vec();
    known.sort_unstable();
    assert_eq!(named, known);
    assert_eq!(POD_LABELS, ["trellis.io/inject"]);
    let reply = answer(
        &with_names(&review, &values, &[("trellis.io/inject", "enabled")]),
        NamespaceScope::SelectedByWebhook,
        &config(),
    );
    assert_eq!(reply["response"]["allowed"], true, "{reply}");
    assert!(patch_of(&reply).is_some(), "{reply}");
    assert!(reply["response"].get("warnings").is_none(), "{reply}");
}

/// `review`'s pod with `annotations` set (an empty value: taken out).
fn annotated(pod: &Value, annotations: &[(&str, &str)]) -> Value {
    let mut pod = pod.clone();
    if pod["metadata"].get("annotations").is_none() {
        pod["metadata"]["annotations"] = json!({});
    }
    let map = pod["metadata"]["annotations"].as_object_mut().unwrap();
    for (key, value) in annotations {
        if value.is_empty() {
            map.remove(*key);
        } else {
            map.insert((*key).to_owned(), json!(value));
        }
    }
    pod
}

/// `review` injected with `annotations` set on its pod.
fn injected_annotated(review: &Value, annotations: &[(&str, &str)]) -> Value {
    injected(&with_object(
        review,
        annotated(&review["request"]["object"], annotations),
    ))
}

/// The patch the webhook answers `pod` with, reviewed again in `review` as
/// a reinvocation sends it, after asserting that it is admitted.
fn reinvocation_patch(review: &Value, pod: &Value) -> json_patch::Patch {
    let reply = answer_for(&with_object(review, pod.clone()));
    assert_eq!(reply["response"]["allowed"], true, "{reply}");
    patch_of(&reply).expect("a patch")
}

/// `pod`'s `trellis-init`, and its `trellis-proxy` with the value of its
/// hook token (random for each injection) left out, its environment
/// entry for entry in order: a reinvocation puts an entry it adds where
/// an injection writes it.
fn ours(pod: &Value) -> (Value, Value) {
    let mut proxy = container(pod, "initContainers", "trellis-proxy").clone();
    for entry in proxy["env"].as_array_mut().into_iter().flatten() {
        if entry["name"] == "TRELLIS_HOOK_TOKEN" {
            entry["value"] = json!("(a token)");
        }
    }
    (
        container(pod, "initContainers", "trellis-init").clone(),
        proxy,
    )
}

/// A settings annotation a mutating webhook called after ours adds or
/// changes (or takes out) is applied when the API server calls `/inject`
/// again: the sidecar's environment and `trellis-init`'s arguments become
/// what an injection of the pod as it now is writes, by a patch of only
/// what differs (each entry of the environment in its place, the init's
/// arguments), and the pod reviewed once more gets no patch. A value a
/// later webhook sets that an injection refuses is refused, naming it.
/// Real AdmissionReview documents (fixtures/k8s) as the API server sends
/// them, the patches applied as it applies them (`json-patch`); no
/// Kubernetes API server can run here.
#[test]
fn settings_annotations_a_later_webhook_sets_are_applied_on_reinvocation() {
    let review = fixture("pod-deployment-http-probes.json");
    let first = injected(&review);
    let later = [
        ("trellis.io/access-log", "false"),
        ("trellis.io/tcp-user-timeout", "10m"),
        ("trellis.io/max-h2-connections-per-peer", "64"),
        ("trellis.io/max-h2-connections", "2048"),
        ("trellis.io/exclude-inbound-ports", "9100,9200"),
        ("trellis.io/exclude-outbound-ports", "5432"),
        ("trellis.io/exclude-outbound-cidrs", ""),
        ("trellis.io/opaque-ports", "metrics,3306"),
    ];
    let pod = annotated(&first, &later);
    let reply = answer_for(&with_object(&review, pod.clone()));
    assert_eq!(reply["response"]["allowed"], true, "{reply}");
    assert!(reply["response"].get("warnings").is_none(), "{reply}");
    let patch = patch_of(&reply).expect("a patch");
    // The five entries after `TRELLIS_LOG_FORMAT`, before the checks, as
    // an injection writes them.
    let log_format = env_index(&first, "TRELLIS_LOG_FORMAT");
    assert_eq!(env_index(&first, "TRELLIS_APP_PROBES"), log_format + 1);
    let mut expected = vec!["replace /spec/initContainers/0/args".to_owned()];
    expected.extend((1..=5).map(|i| format!("add /spec/initContainers/1/env/{}", log_format + i)));
    assert_eq!(ops(&patch), expected);
    let again = apply(&pod, &patch);
    // As injected with those annotations from the start.
    let direct = injected_annotated(&review, &later);
    assert_eq!(ours(&again), ours(&direct));
    assert_eq!(
        container(&again, "initContainers", "trellis-init")["args"],
        json!([
            "init",
            "--proxy-uid",
            "1337",
            "--inbound-port",
            "15006",
            "--outbound-port",
            "15001",
            "--exclude-ports",
            "15020,9100,9200",
            "--exclude-outbound-ports",
            "5432",
            "--exclude-outbound-dns",
            "--outbound-policy",
            "deny"
        ])
    );
    let proxy = env(container(&again, "initContainers", "trellis-proxy"));
    for (name, value) in [
        ("TRELLIS_ACCESS_LOG", "false"),
        ("TRELLIS_TCP_USER_TIMEOUT", "10m"),
        ("TRELLIS_MAX_H2_CONNECTIONS_PER_PEER", "64"),
        ("TRELLIS_MAX_H2_CONNECTIONS", "2048"),
        ("TRELLIS_OPAQUE_PORTS", "9100,3306"),
    ] {
        assert_eq!(proxy[name], value, "{name}");
    }
    // The rest of the pod is the first injection's.
    let rest = |pod: &Value| {
        let mut pod = pod.clone();
        pod["metadata"]["annotations"] = json!(null);
        pod["spec"]["initContainers"][0]["args"] = json!(null);
        pod["spec"]["initContainers"][1]["env"] = json!(null);
        pod
    };
    assert_eq!(rest(&again), rest(&first));
    let settled_once = settled(&review, again.clone());
    assert!(settled_once["response"].get("warnings").is_none());

    // Changed again (values replaced in place), and taken out (entries
    // and flags removed), by a webhook of a later reinvocation.
    let changed = [
        ("trellis.io/access-log", ""),
        ("trellis.io/tcp-user-timeout", "0"),
        ("trellis.io/max-h2-connections-per-peer", ""),
        ("trellis.io/exclude-outbound-ports", ""),
        ("trellis.io/exclude-outbound-cidrs", "10.0.0.0/8"),
    ];
    let pod = annotated(&again, &changed);
    let patch = reinvocation_patch(&review, &pod);
    let ops = ops(&patch);
    assert_eq!(ops[0], "replace /spec/initContainers/0/args", "{ops:?}");
    assert!(
        ops[1..]
            .iter()
            .all(|op| op.starts_with("replace /spec/initContainers/1/env/")
                || op.starts_with("remove /spec/initContainers/1/env/")),
        "{ops:?}"
    );
    let third = apply(&pod, &patch);
    let mut all = later.to_vec();
    all.extend(changed);
    let direct = injected_annotated(&review, &all);
    assert_eq!(ours(&third), ours(&direct));
    assert_eq!(
        env(container(&third, "initContainers", "trellis-proxy"))["TRELLIS_TCP_USER_TIMEOUT"],
        "0s"
    );
    settled(&review, third);

    // A value an injection refuses is refused on reinvocation, naming it.
    let bad = annotated(&first, &[("trellis.io/access-log", "False")]);
    let reply = answer_for(&with_object(&review, bad));
    assert_eq!(
        denial(&reply),
        "trellis: cannot inject: metadata.annotations[trellis.io/access-log]: expected \"true\" \
         or \"false\", got \"False\" (the pod carries its sidecar already: it was changed \
         since injection, by a mutating webhook called after Trellis's or in a copied manifest)"
    );
}

/// A name of `trellis.io/opaque-ports` stands for the numbers the pod's
/// containers give it as they are when reviewed: a container a later
/// webhook adds (or puts in place of one) that declares the name brings
/// its number to the sidecar's `TRELLIS_OPAQUE_PORTS` on reinvocation,
/// a replacement without it takes its number away, and a name no
/// container declares any more is refused as at injection. Real
/// AdmissionReview documents (fixtures/k8s), patched as the API server
/// patches; no Kubernetes API server can run here.
#[test]
fn opaque_port_names_are_resolved_against_containers_a_later_webhook_adds() {
    let review = fixture("pod-deployment-http-probes.json");
    let opaque = [("trellis.io/opaque-ports", "metrics,agent")];
    let mut pod = annotated(&review["request"]["object"], &opaque);
    // The name `agent` is declared by an init container at first.
    pod["spec"]["initContainers"]
        .as_array_mut()
        .unwrap()
        .push(json!({
            "name": "agent-init", "image": "hashicorp/vault:1.17", "restartPolicy": "Always",
            "ports": [{"name": "agent", "containerPort": 8100, "protocol": "TCP"}],
        }));
    let first = injected(&with_object(&review, pod));
    let opaque_env = |pod: &Value| {
        env(container(pod, "initContainers", "trellis-proxy"))["TRELLIS_OPAQUE_PORTS"].clone()
    };
    assert_eq!(opaque_env(&first), "9100,8100");

    // A later webhook adds a container declaring `agent` on 8200.
    let mut pod = first.clone();
    pod["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(vault_agent());
    let again = apply(&pod, &reinvocation_patch(&review, &pod));
    assert_eq!(opaque_env(&again), "9100,8200,8100");
    settled(&review, again.clone());

    // And one takes the native sidecar declaring it on 8100 out.
    let mut pod = again.clone();
    pod["spec"]["initContainers"]
        .as_array_mut()
        .unwrap()
        .retain(|c| c["name"] != "agent-init");
    let patch = reinvocation_patch(&review, &pod);
    let at = env_index(&pod, "TRELLIS_OPAQUE_PORTS");
    assert_eq!(
        ops(&patch),
        [format!("replace /spec/initContainers/1/env/{at}")]
    );
    let third = apply(&pod, &patch);
    assert_eq!(opaque_env(&third), "9100,8200");
    settled(&review, third.clone());

    // With no container declaring `agent`, the pod is refused as an
    // injection of it would be.
    let mut pod = third;
    pod["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .retain(|c| c["name"] != "vault-agent");
    let reply = answer_for(&with_object(&review, pod));
    assert!(
        denial(&reply).starts_with(
            "trellis: cannot inject: metadata.annotations[trellis.io/opaque-ports]: \"agent\" is \
             neither a port (1-65535) nor the name of a TCP port a container of the pod declares"
        ),
        "{reply}"
    );
}

/// The sidecar's `trellis-proxy` environment as the kubelet reads it: of
/// several entries of one name the last counts.
fn env_in_force(pod: &Value) -> std::collections::BTreeMap<String, Value> {
    env(container(pod, "initContainers", "trellis-proxy"))
}

/// The `TRELLIS_*` entries the settings annotations decide are the
/// injector's: one a mutating webhook called after ours writes on the
/// sidecar directly (a second `TRELLIS_ACCESS_LOG` after the injector's,
/// which the kubelet would use; one the annotations do not ask for) is
/// made what the annotations say on reinvocation, whatever the entries'
/// order. In the same patch as entries taken out and added, a container's
/// checks joining `TRELLIS_APP_PROBES` and `trellis-init`'s arguments
/// rewritten, each operation's index is right for the pod as the earlier
/// ones left it (RFC 6902 applies them in order): applied with
/// `json-patch`, the sidecar and its init are a fresh injection's. Real
/// AdmissionReview documents (fixtures/k8s); no Kubernetes API server here.
#[test]
fn trellis_entries_a_later_webhook_writes_on_the_sidecar_are_the_annotations() {
    let review = fixture("pod-deployment-http-probes.json");
    let opted_out = [("trellis.io/access-log", "false")];
    let first = injected_annotated(&review, &opted_out);
    let with_entries = |pod: &Value, entries: &[Value]| {
        let mut pod = pod.clone();
        let proxy = pod["spec"]["initContainers"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|c| c["name"] == "trellis-proxy")
            .unwrap();
        proxy["env"]
            .as_array_mut()
            .unwrap()
            .extend_from_slice(entries);
        pod
    };

    // A second entry after the injector's, which the kubelet would use.
    let on = json!({"name": "TRELLIS_ACCESS_LOG", "value": "true"});
    let pod = with_entries(&first, std::slice::from_ref(&on));
    assert_eq!(env_in_force(&pod)["TRELLIS_ACCESS_LOG"], "true");
    let patch = reinvocation_patch(&review, &pod);
    let last = pod["spec"]["initContainers"][1]["env"]
        .as_array()
        .unwrap()
        .len()
        - 1;
    assert_eq!(
        ops(&patch),
        [format!("remove /spec/initContainers/1/env/{last}")]
    );
    let again = apply(&pod, &patch);
    assert_eq!(ours(&again), ours(&first));
    settled(&review, again);

    // Entries the annotations do not ask for, several taken out in one
    // patch beside an annotation taken out, one added, a container with
    // checks and a hook added, and the init's arguments changed.
    let mut pod = with_entries(
        &first,
        &[
            json!({"name": "TRELLIS_MAX_H2_CONNECTIONS", "value": "5"}),
            json!({"name": "TRELLIS_ACCESS_LOG", "value": "false"}),
        ],
    );
    pod["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(vault_agent());
    let changed = [
        ("trellis.io/access-log", ""),
        ("trellis.io/tcp-user-timeout", "10m"),
        ("trellis.io/exclude-outbound-ports", "5432"),
    ];
    let pod = annotated(&pod, &changed);
    let patch = reinvocation_patch(&review, &pod);
    let removes = ops(&patch)
        .into_iter()
        .filter(|op| op.starts_with("remove "))
        .count();
    assert_eq!(removes, 3, "{:?}", ops(&patch));
    let again = apply(&pod, &patch);
    let mut direct = annotated(&review["request"]["object"], &changed);
    direct["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(vault_agent());
    let direct = injected(&with_object(&review, direct));
    assert_eq!(ours(&again), ours(&direct));
    let names: Vec<&str> = again["spec"]["initContainers"][1]["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    let mut unique = names.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(names.len(), unique.len(), "{names:?}");
    settled(&review, again);
}

/// Several entries added in one patch beside entries a later webhook put
/// on the sidecar (one in the middle of the injector's, one at the end),
/// in the same patch as an entry replaced, duplicates taken out, the
/// checks of an added container joining `TRELLIS_APP_PROBES` (or that
/// entry added, on a sidecar without checks) and its hook's token added:
/// RFC 6902 applies the operations in order, and `json-patch`, applying
/// them as the API server does, gives the sidecar of an injection with
/// the annotations and the container from the start, the later webhook's
/// entries kept in their order. Real AdmissionReview documents
/// (fixtures/k8s); no Kubernetes API server here.
#[test]
fn entries_added_beside_a_later_webhooks_are_each_in_an_injections_place() {
    let review = fixture("pod-deployment-http-probes.json");
    let theirs = |name: &str| name == "VAULT_ADDR" || name == "OTEL_ENDPOINT";
    let names = |pod: &Value| -> Vec<String> {
        container(pod, "initContainers", "trellis-proxy")["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let before = [("trellis.io/max-h2-connections", "2048")];
    let after = [
        ("trellis.io/access-log", "false"),
        ("trellis.io/tcp-user-timeout", "10m"),
        ("trellis.io/max-h2-connections-per-peer", "64"),
        ("trellis.io/max-h2-connections", "4096"),
        ("trellis.io/opaque-ports", "3306"),
    ];
    for object in [review["request"]["object"].clone(), without_checks(&review)] {
        let review = with_object(&review, object.clone());
        let first = injected_annotated(&review, &before);
        // A later webhook's entries, one after `TRELLIS_LOG_FORMAT`, one
        // last, and a second `TRELLIS_MAX_H2_CONNECTIONS` of its own.
        let mut pod = annotated(&first, &after);
        let log_format = env_index(&first, "TRELLIS_LOG_FORMAT");
        let proxy = pod["spec"]["initContainers"][1]["env"]
            .as_array_mut()
            .unwrap();
        proxy.insert(
            log_format + 1,
            json!({"name": "VAULT_ADDR", "value": "https://vault:8200"}),
        );
        proxy.push(json!({"name": "TRELLIS_MAX_H2_CONNECTIONS", "value": "1"}));
        proxy.push(json!({"name": "OTEL_ENDPOINT", "value": "http://otel:4317"}));
        pod["spec"]["containers"]
            .as_array_mut()
            .unwrap()
            .push(vault_agent());
        let patch = reinvocation_patch(&review, &pod);
        let ops = ops(&patch);
        let adds = ops
            .iter()
            .filter(|op| op.starts_with("add /spec/initContainers/1/env/"))
            .count();
        assert!(adds >= 4, "{ops:?}");
        let again = apply(&pod, &patch);

        let mut direct = annotated(&object, &after);
        direct["spec"]["containers"]
            .as_array_mut()
            .unwrap()
            .push(vault_agent());
        let direct = injected(&with_object(&review, direct));
        let (init, mut proxy) = ours(&again);
        let (direct_init, direct_proxy) = ours(&direct);
        assert_eq!(init, direct_init);
        let env = proxy["env"].as_array_mut().unwrap();
        let kept: Vec<&str> = env
            .iter()
            .filter_map(|e| e["name"].as_str())
            .filter(|name| theirs(name))
            .collect();
        assert_eq!(kept, ["VAULT_ADDR", "OTEL_ENDPOINT"], "{:?}", names(&again));
        env.retain(|e| !theirs(e["name"].as_str().unwrap()));
        assert_eq!(proxy, direct_proxy, "{ops:?}\n{:?}", names(&again));
        settled(&review, again);
    }
}

/// A `trellis-init` without arguments (a manifest written by hand) would
/// run the sidecar's command with none but the exclusions, as a proxy
/// that never exits: on reinvocation it gets all the arguments an
/// injection writes. Real AdmissionReview documents; no API server here.
#[test]
fn an_init_without_arguments_gets_an_injections_on_reinvocation() {
    let review = fixture("pod-deployment-http-probes.json");
    let first = injected(&review);
    let mut pod = first.clone();
    pod["spec"]["initContainers"][0]
        .as_object_mut()
        .unwrap()
        .remove("args");
    let patch = reinvocation_patch(&review, &pod);
    assert_eq!(ops(&patch), ["add /spec/initContainers/0/args"]);
    let again = apply(&pod, &patch);
    assert_eq!(
        again["spec"]["initContainers"][0]["args"],
        first["spec"]["initContainers"][0]["args"]
    );
    assert_eq!(again, first);
    settled(&review, again);
}

/// A `trellis-init` whose arguments do not start with `init` (a webhook
/// called after ours, or a user, put a flag before it or replaced them)
/// does not run what the injector wrote, and is not edited in place: on
/// reinvocation its arguments become all of an injection's, the settings
/// annotations' among them, with a warning, and the pod reviewed once
/// more gets no patch and no warning. Real AdmissionReview documents
/// (fixtures/k8s), patched with `json-patch`; no API server here.
#[test]
fn an_init_whose_arguments_are_not_inits_gets_an_injections_on_reinvocation() {
    let review = fixture("pod-deployment-http-probes.json");
    let first = injected(&review);
    let replaced = "trellis: container \"trellis-init\"'s args do not start with \"init\" \
                    (changed by a webhook called after Trellis's, or by hand): they are replaced \
                    with the arguments an injection writes";
    let args = first["spec"]["initContainers"][0]["args"].clone();
    let mut prefixed = json!(["--log-level=debug"]);
    prefixed
        .as_array_mut()
        .unwrap()
        .extend(args.as_array().unwrap().iter().cloned());
    let set = [("trellis.io/exclude-outbound-ports", "5432")];
    for (changed, annotations) in [
        (prefixed, &[][..]),
        (json!(["sleep", "3600"]), &set[..]),
        (json!(["init-v2"]), &set[..]),
    ] {
        let mut pod = annotated(&first, annotations);
        pod["spec"]["initContainers"][0]["args"] = changed.clone();
        let reply = answer_for(&with_object(&review, pod.clone()));
        assert_eq!(reply["response"]["allowed"], true, "{reply}");
        assert_eq!(reply["response"]["warnings"], json!([replaced]), "{reply}");
        let patch = patch_of(&reply).expect("a patch");
        assert_eq!(
            ops(&patch),
            ["replace /spec/initContainers/0/args"],
            "{changed}"
        );
        let again = apply(&pod, &patch);
        let direct = injected_annotated(&review, annotations);
        assert_eq!(
            again["spec"]["initContainers"][0]["args"], direct["spec"]["initContainers"][0]["args"],
            "{changed}"
        );
        let settled = settled(&review, again);
        assert!(settled["response"].get("warnings").is_none(), "{settled}");
    }
}

/// An injection derives `trellis-init`'s `--proxy-uid`, `--inbound-port`
/// and `--outbound-port` from the settings the sidecar runs with, so the
/// two agree. A reinvocation that writes init's arguments whole (it had
/// none, or not `init`'s) takes them from the sidecar the pod carries (its
/// UID, its ports), not from the current settings: a manifest copied from
/// a pod injected under other settings keeps an init that leaves its
/// sidecar's own traffic alone, rather than one that would redirect that
/// traffic back to the sidecar. Real AdmissionReview documents; no API
/// server here.
#[test]
fn an_init_given_an_injections_arguments_keeps_to_the_sidecar_it_runs_beside() {
    let review = fixture("pod-deployment-http-probes.json");
    let then = InjectConfig {
        proxy_uid: 2102,
        inbound_port: 16006,
        outbound_port: 16001,
        admin_port: 16020,
        ..config()
    };
    let first = injected_under(&review, &then);
    let args = first["spec"]["initContainers"][0]["args"].clone();
    for arg in ["2102", "16006", "16001", "16020,9100"] {
        assert!(args.as_array().unwrap().contains(&json!(arg)), "{args}");
    }
    for changed in [None, Some(json!(["sleep", "3600"]))] {
        let mut pod = first.clone();
        let init = pod["spec"]["initContainers"][0].as_object_mut().unwrap();
        match &changed {
            None => init.remove("args"),
            Some(changed) => init.insert("args".into(), changed.clone()),
        };
        // Reviewed under today's settings (UID 1337, the default ports).
        let again = apply(&pod, &reinvocation_patch(&review, &pod));
        assert_eq!(
            again["spec"]["initContainers"][0]["args"], args,
            "{changed:?}"
        );
        assert_eq!(again, first, "{changed:?}");
        settled(&review, again);
    }
}

/// The pod of `review` patched as the webhook answers it in a namespace
/// it selects, under the settings `settings`.
fn injected_under(review: &Value, settings: &InjectConfig) -> Value {
    let reply = answer(review, NamespaceScope::SelectedByWebhook, settings);
    apply(
        &review["request"]["object"],
        &patch_of(&reply).expect("a patch"),
    )
}

/// Where a reinvocation writes `trellis-init`'s arguments whole, the UID
/// and ports are what the sidecar runs with, read as the kubelet reads
/// them: a sidecar without its own `runAsUser` runs as the pod's, and it
/// listens where its `TRELLIS_INBOUND` and `TRELLIS_OUTBOUND` say (its
/// `trellis-inbound` port renamed changes nothing). An entry whose port
/// the injector cannot read (`valueFrom`, not `ip:port`, two ports) is
/// refused, naming it, whatever the failure policy, rather than init
/// given the current settings' port, where the sidecar may not listen.
/// Real AdmissionReview documents; no API server here.
#[test]
fn an_init_given_an_injections_arguments_reads_the_sidecar_as_the_kubelet_runs_it() {
    let review = fixture("pod-deployment-http-probes.json");
    let then = InjectConfig {
        proxy_uid: 2102,
        inbound_port: 16006,
        outbound_port: 16001,
        ..config()
    };
    let first = injected_under(&review, &then);
    let args = first["spec"]["initContainers"][0]["args"].clone();
    let proxy_at = 1;
    assert_eq!(
        first["spec"]["initContainers"][proxy_at]["name"],
        "trellis-proxy"
    );
    let without_args = |pod: &Value| {
        let mut pod = pod.clone();
        pod["spec"]["initContainers"][0]["args"] = json!(["sleep", "3600"]);
        pod
    };

    // The sidecar's UID set on the pod, not on it; its inbound port
    // declared under another name.
    let mut pod = without_args(&first);
    pod["spec"]["initContainers"][proxy_at]["securityContext"]
        .as_object_mut()
        .unwrap()
        .remove("runAsUser");
    pod["spec"]["securityContext"] = json!({"runAsUser": 2102, "runAsGroup": 2102});
    for field in ["containers", "initContainers"] {
        for container in pod["spec"][field].as_array_mut().unwrap() {
            if !OURS.contains(&container["name"].as_str().unwrap()) {
                container["securityContext"]["runAsUser"] = json!(1000);
            }
        }
    }
    let ports = pod["spec"]["initContainers"][proxy_at]["ports"]
        .as_array_mut()
        .unwrap();
    let inbound = ports
        .iter_mut()
        .find(|p| p["name"] == "trellis-inbound")
        .unwrap();
    inbound["name"] = json!("mtls");
    let again = apply(&pod, &reinvocation_patch(&review, &pod));
    assert_eq!(again["spec"]["initContainers"][0]["args"], args);

    // An entry whose port cannot be read is refused, naming it.
    let outbound_at = env_index(&first, "TRELLIS_OUTBOUND");
    for (entry, problem) in [
        (
            json!({"name": "TRELLIS_OUTBOUND", "valueFrom": {"configMapKeyRef": {"name": "mesh", "key": "outbound"}}}),
            "is set by valueFrom, which the injector cannot read".to_owned(),
        ),
        (
            json!({"name": "TRELLIS_OUTBOUND", "value": "127.0.0.1:16001,[::1]:16002"}),
            "is \"127.0.0.1:16001,[::1]:16002\", not `ip:port` for each address with one \
             port other than 0"
                .to_owned(),
        ),
        (
            json!({"name": "TRELLIS_OUTBOUND", "value": "16001"}),
            "is \"16001\", not `ip:port` for each address with one port other than 0".to_owned(),
        ),
    ] {
        let mut pod = without_args(&first);
        pod["spec"]["initContainers"][proxy_at]["env"][outbound_at] = entry;
        for policy in [FailurePolicy::Fail, FailurePolicy::Ignore] {
            let settings = InjectConfig {
                failure_policy: policy,
                ..config()
            };
            let reply = answer(
                &with_object(&review, pod.clone()),
                NamespaceScope::SelectedByWebhook,
                &settings,
            );
            assert_eq!(
                denial(&reply),
                format!(
                    "trellis: cannot inject: the trellis-proxy container's environment \
                     variable TRELLIS_OUTBOUND {problem}, so the port trellis-init must \
                     redirect the pod's traffic to is not known, and trellis-init's args do \
                     not name it (they are missing, do not start with \"init\", or lack the \
                     port's flag); give trellis-init the args an injection wrote, or \
                     TRELLIS_OUTBOUND as an injection writes it"
                )
            );
        }
        // With init's own arguments, which say the port, it is admitted.
        pod["spec"]["initContainers"][0]["args"] = args.clone();
        let reply = answer_for(&with_object(&review, pod));
        assert_eq!(reply["response"]["allowed"], true, "{reply}");
    }
}

/// A settings annotation refused on reinvocation says that the pod was
/// changed since injection (its author submitted one that was admitted),
/// and names the containers the injection saw that are gone: a mutating
/// webhook called after ours that took out the container declaring a
/// port `trellis.io/opaque-ports` names is refused as an injection of the
/// pod as it now is would be, rather than its sidecar left treating
/// another port's traffic as opaque than the annotation says. Real
/// AdmissionReview documents; no API server here.
#[test]
fn a_setting_refused_on_reinvocation_says_what_changed_since_injection() {
    let review = fixture("pod-deployment-http-probes.json");
    let mut pod = annotated(
        &review["request"]["object"],
        &[("trellis.io/opaque-ports", "agent")],
    );
    pod["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(vault_agent());
    let first = injected(&with_object(&review, pod));
    let mut pod = first.clone();
    pod["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .retain(|c| c["name"] != "vault-agent");
    let reply = answer_for(&with_object(&review, pod));
    assert_eq!(
        denial(&reply),
        "trellis: cannot inject: metadata.annotations[trellis.io/opaque-ports]: \"agent\" is \
         neither a port (1-65535) nor the name of a TCP port a container of the pod declares \
         (the pod carries its sidecar already: it was changed since injection, by a mutating \
         webhook called after Trellis's or in a copied manifest; containers it had then and has \
         no more: vault-agent)"
    );

    let bad = annotated(&first, &[("trellis.io/max-h2-connections", "lots")]);
    let reply = answer_for(&with_object(&review, bad));
    assert!(
        denial(&reply).starts_with(
            "trellis: cannot inject: metadata.annotations[trellis.io/max-h2-connections]: "
        ),
        "{reply}"
    );
    assert!(
        denial(&reply).ends_with(
            " (the pod carries its sidecar already: it was changed since injection, by a \
             mutating webhook called after Trellis's or in a copied manifest)"
        ),
        "{reply}"
    );
}

/// An injection's own output, reviewed again as the API server reinvokes
/// the webhook, gets no patch, however many times: for each fixture pod,
/// under the default and other `injection.*` settings, with each
/// combination of settings annotations an injection reads (none, each
/// alone, all at once; an opaque port by number and by a container's port
/// name). A difference between what an injection writes and what a review
/// derives (an entry's form, a flag's place, the order of a list) would
/// show as a patch here. And the same annotations set by a later webhook
/// on the pod injected without them are applied by a patch of only the
/// init's arguments and sidecar's entries, which leaves the two entry for
/// entry, in order, as the injection with them wrote. Real AdmissionReview
/// documents; no API server.
#[test]
fn an_injections_output_reviewed_again_gets_no_patch_whatever_its_annotations() {
    let settings = [
        config(),
        InjectConfig {
            exclude_inbound_ports: vec![9090, 15021],
            exclude_outbound_ports: vec![25],
            exclude_outbound_cidrs: vec!["10.0.0.0/8".into()],
            tcp_user_timeout: Some(std::time::Duration::from_secs(90)),
            max_h2_connections_per_peer: 8,
            max_h2_connections: 100,
            ..config()
        },
    ];
    let each: &[&[(&str, &str)]] = &[
        &[],
        &[("trellis.io/access-log", "false")],
        &[("trellis.io/access-log", "true")],
        &[("trellis.io/tcp-user-timeout", "10m")],
        &[("trellis.io/tcp-user-timeout", "0")],
        &[("trellis.io/max-h2-connections-per-peer", "64")],
        &[("trellis.io/max-h2-connections", "2048")],
        &[("trellis.io/exclude-inbound-ports", "9200, 9100,9200")],
        &[("trellis.io/exclude-inbound-ports", "")],
        &[("trellis.io/exclude-outbound-ports", "5432,3306")],
        &[("trellis.io/exclude-outbound-cidrs", "")],
        &[(
            "trellis.io/exclude-outbound-cidrs",
            "192.168.0.0/16,fd00::/8",
        )],
        &[("trellis.io/opaque-ports", "3306")],
        &[("trellis.io/opaque-ports", "NAMED,3306")],
        &[
            ("trellis.io/access-log", "false"),
            ("trellis.io/tcp-user-timeout", "2m"),
            ("trellis.io/max-h2-connections-per-peer", "3"),
            ("trellis.io/max-h2-connections", "30"),
            ("trellis.io/exclude-inbound-ports", "9200"),
            ("trellis.io/exclude-outbound-ports", "5432"),
            ("trellis.io/exclude-outbound-cidrs", "10.1.0.0/16"),
            ("trellis.io/opaque-ports", "NAMED"),
        ],
    ];
    let mut tried = 0;
    for name in [
        "pod-deployment-http-probes.json",
        "pod-native-sidecar-probes.json",
    ] {
        let review = fixture(name);
        let object = &review["request"]["object"];
        // A TCP port name a container of the fixture declares.
        let named = ["containers", "initContainers"]
            .iter()
            .filter_map(|field| object["spec"][field].as_array())
            .flatten()
            .filter_map(|c| c["ports"].as_array())
            .flatten()
            .find_map(|p| p["name"].as_str())
            .expect("a named port")
            .to_owned();
        for settings in &settings {
            for annotations in each {
                let annotations: Vec<(&str, String)> = annotations
                    .iter()
                    .map(|(key, value)| (*key, value.replace("NAMED", &named)))
                    .collect();
                let annotations: Vec<(&str, &str)> = annotations
                    .iter()
                    .map(|(key, value)| (*key, value.as_str()))
                    .collect();
                let pod = annotated(object, &annotations);
                let reply = answer(
                    &with_object(&review, pod.clone()),
                    NamespaceScope::SelectedByWebhook,
                    settings,
                );
                assert_eq!(
                    reply["response"]["allowed"], true,
                    "{name} {annotations:?}: {reply}"
                );
                let direct = apply(&pod, &patch_of(&reply).expect("a patch"));
                // The same annotations set by a later webhook on the pod
                // injected without them: the reinvocation's patch, of
                // only the entries and arguments that differ, gives the
                // sidecar and init a first injection gives, each entry
                // in its place.
                let plain = answer(
                    &with_object(&review, object.clone()),
                    NamespaceScope::SelectedByWebhook,
                    settings,
                );
                let plain = apply(object, &patch_of(&plain).expect("a patch"));
                let later = annotated(&plain, &annotations);
                let reply = answer(
                    &with_object(&review, later.clone()),
                    NamespaceScope::SelectedByWebhook,
                    settings,
                );
                assert_eq!(reply["response"]["allowed"], true, "{reply}");
                if let Some(patch) = patch_of(&reply) {
                    let ops = ops(&patch);
                    assert!(
                        ops.iter()
                            .all(|op| op == "replace /spec/initContainers/0/args"
                                || op.starts_with("replace /spec/initContainers/1/env/")
                                || op.starts_with("remove /spec/initContainers/1/env/")
                                || op.starts_with("add /spec/initContainers/1/env/")),
                        "{name} {annotations:?}: {ops:?}"
                    );
                    assert_eq!(
                        ours(&apply(&later, &patch)),
                        ours(&direct),
                        "{name} {annotations:?}: {ops:?}"
                    );
                } else {
                    assert_eq!(ours(&later), ours(&direct), "{name} {annotations:?}");
                }
                let pod = direct;
                for reinvocation in 1..=3 {
                    let again = answer(
                        &with_object(&review, pod.clone()),
                        NamespaceScope::SelectedByWebhook,
                        settings,
                    );
                    assert_eq!(again["response"]["allowed"], true, "{again}");
                    assert!(
                        patch_of(&again).is_none(),
                        "{name} {annotations:?}, review {reinvocation} after injection: {again}"
                    );
                }
                tried += 1;
            }
        }
    }
    assert_eq!(tried, 2 * 2 * each.len());
}
