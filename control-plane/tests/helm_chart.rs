//! The Helm chart in `deploy/helm/trellis`, checked with the real tools:
//! `helm lint`, `helm template` with default and non-default values, and
//! `kubernetes-validate --strict` (the Kubernetes OpenAPI schemas, offline)
//! on every rendered manifest; the rendered RBAC is compared rule by rule
//! with the least-privilege list of issue 6.
//!
//! No Kubernetes API server can run on these machines, so nothing is
//! installed: the rendered manifests stand in for what `helm install` would
//! send. `scripts/install-helm.sh` installs helm (into target/tools/bin) and
//! kubernetes-validate; without them each test says
//! `skipped: helm not installed (run scripts/install-helm.sh)` and passes,
//! except under CI (`CI` set), where a missing tool fails the test.

mod chart;

use chart::*;
use serde_json::{Value, json};

/// `helm lint --strict` passes with the default values and with others.
#[test]
fn helm_lint_passes() {
    let Some((helm, _)) = tools() else { return };
    let chart = chart();
    let chart = chart.to_str().unwrap();
    run_helm(&helm, &["lint", "--strict", chart]).unwrap();
    run_helm(
        &helm,
        &[
            "lint",
            "--strict",
            chart,
            "--set",
            "trustDomain=example.org,replicas=3,defaultPolicy=allow-same-namespace",
        ],
    )
    .unwrap();
}

/// With the default values every manifest passes strict schema validation,
/// and the control plane gets the mesh defaults of DESIGN.md.
#[test]
fn default_values_render_valid_manifests() {
    let Some((helm, validate)) = tools() else {
        return;
    };
    let docs = validated(&helm, &validate, &[]);
    let mut kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    kinds.sort_unstable();
    assert_eq!(
        kinds,
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "CustomResourceDefinition",
            "CustomResourceDefinition",
            "Deployment",
            "MutatingWebhookConfiguration",
            "PodDisruptionBudget",
            "Role",
            "RoleBinding",
            // The webhooks' serving certificate; never the CA (the control
            // plane creates it).
            "Secret",
            "Service",
            "Service",
            "ServiceAccount",
            "ValidatingWebhookConfiguration",
        ]
    );
    let args = args(&docs);
    for expected in [
        "--trust-domain=cluster.local",
        "--cert-ttl=1h",
        "--renewal-proof=token",
        "--default-policy=deny",
        "--outbound-policy=deny",
        "--listen=[::]:15012",
        "--admin=[::]:15014",
        "--store=kubernetes",
        "--webhook=[::]:15017",
        "--peers=trellis-control-plane-peers.trellis-system.svc:15012",
        // The release's namespace is the root one: its policies may select
        // any workload.
        "--root-namespace=trellis-system",
        // The control plane's own default, written out.
        "--watch-failure-grace=60s",
        "--grpc-idle-timeout=5m",
    ] {
        assert!(args.iter().any(|a| a == expected), "{expected} in {args:?}");
    }
    assert!(
        !args.iter().any(|a| a.starts_with("--opaque-ports")),
        "no mesh-wide opaque ports unless asked: {args:?}"
    );
    assert!(
        !args
            .iter()
            .any(|a| a.starts_with("--max-grpc-connections-per-client")),
        "the control plane's own per-client cap unless asked: {args:?}"
    );
    assert_eq!(one(&docs, "Deployment")["spec"]["replicas"], 2);
}

/// Non-default values reach the control plane and still validate.
#[test]
fn custom_values_render_valid_manifests() {
    let Some((helm, validate)) = tools() else {
        return;
    };
    let docs = validated(
        &helm,
        &validate,
        &[
            "trustDomain=example.org",
            "replicas=3",
            "defaultPolicy=allow-same-namespace",
            "outboundPolicy=passthrough",
            "opaquePorts={5432,25}",
            "certTTL=30m",
            "renewalProof=certificate",
            "antiAffinity=hard",
            "injection.failurePolicy=Fail",
            "injection.excludeOutboundPorts={5432,6379}",
            "image.repository=registry.example.com/mesh/trellis",
            "image.tag=0.1.0-rc1",
            "crds.keep=false",
            "rootNamespace=mesh-admin",
            "watchFailureGrace=5m",
            "nodeSelector.node-pool=system",
            "injection.excludeNamespaces={monitoring,ingress-nginx}",
            "podDisruptionBudget.maxUnavailable=50%",
            "tolerations[0].key=node-role.kubernetes.io/control-plane",
            "tolerations[0].operator=Exists",
            "tolerations[0].effect=NoSchedule",
            "tolerations[1].key=dedicated",
            "tolerations[1].value=system",
            "tolerations[1].effect=NoExecute",
            "tolerations[1].tolerationSeconds=300",
            "priorityClassName=system-cluster-critical",
            "podAnnotations.example\\.com/team=mesh",
            "imagePullSecrets[0].name=registry.example.com",
        ],
    );
    let deployment = one(&docs, "Deployment");
    assert_eq!(deployment["spec"]["replicas"], 3);
    let args = args(&docs);
    for expected in [
        "--trust-domain=example.org",
        "--default-policy=allow-same-namespace",
        "--outbound-policy=passthrough",
        "--opaque-ports=5432,25",
        "--cert-ttl=30m",
        "--renewal-proof=certificate",
        "--root-namespace=mesh-admin",
        "--watch-failure-grace=5m",
    ] {
        assert!(args.iter().any(|a| a == expected), "{expected} in {args:?}");
    }
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(
        pod["containers"][0]["image"],
        "registry.example.com/mesh/trellis:0.1.0-rc1"
    );
    assert_eq!(
        pod["tolerations"],
        json!([
            {"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"},
            {"key": "dedicated", "value": "system", "effect": "NoExecute", "tolerationSeconds": 300},
        ])
    );
    assert_eq!(pod["priorityClassName"], "system-cluster-critical");
    assert_eq!(
        pod["imagePullSecrets"],
        json!([{"name": "registry.example.com"}])
    );
    assert_eq!(
        deployment["spec"]["template"]["metadata"]["annotations"]["example.com/team"],
        "mesh"
    );
    assert!(
        pod["affinity"]["podAntiAffinity"]
            .get("requiredDuringSchedulingIgnoredDuringExecution")
            .is_some()
    );
    // The node selector given, on Linux nodes still.
    assert_eq!(
        pod["nodeSelector"],
        json!({"node-pool": "system", "kubernetes.io/os": "linux"})
    );
    // The injecting webhooks follow the value; the ones that only warn of
    // a mistyped trellis.io/inject never block a pod.
    let mutating = one(&docs, "MutatingWebhookConfiguration");
    for webhook in mutating["webhooks"].as_array().unwrap() {
        let expected = if webhook["clientConfig"]["service"]["path"] == "/inject" {
            "Fail"
        } else {
            "Ignore"
        };
        assert_eq!(webhook["failurePolicy"], expected, "{webhook}");
    }
    for crd in find(&docs, "CustomResourceDefinition") {
        assert!(crd["metadata"].get("annotations").is_none());
    }
    let pdb = one(&docs, "PodDisruptionBudget");
    assert_eq!(pdb["spec"]["maxUnavailable"], "50%");
    let excluded = &mutating["webhooks"][0]["namespaceSelector"]["matchExpressions"][1];
    assert_eq!(
        excluded["values"],
        json!([
            "trellis-system",
            "kube-system",
            "monitoring",
            "ingress-nginx"
        ])
    );
}

/// Invalid values are refused by the chart's schema, naming the value.
#[test]
fn invalid_values_are_refused() {
    let Some((helm, _)) = tools() else { return };
    for (set, names) in [
        ("defaultPolicy=allow-all", "defaultPolicy"),
        ("renewalProof=signature", "renewalProof"),
        ("renewalProof=null", "renewalProof"),
        ("trustDomain=Example.ORG", "trustDomain"),
        (
            "injection.tokenExpirationSeconds=60",
            "tokenExpirationSeconds",
        ),
        ("replicas=0", "replicas"),
        // A certificate the expiry alert (30 days before) would fire for
        // before an upgrade renews it (two thirds into its validity).
        ("webhook.certValidityDays=30", "certValidityDays"),
        // The caBundle is the CA's PEM; the chart encodes it.
        ("webhook.caBundle=TUlJQ0V6Q0NBYnFn", "caBundle"),
        ("opaquePorts={0}", "opaquePorts"),
        ("injection.failurePolicy=Maybe", "failurePolicy"),
        ("injection.ipFamilies={IPv4,IPv4}", "ipFamilies"),
        ("injection.ipFamilies={ipv6}", "ipFamilies"),
        ("injection.tcpUserTimeout=two", "tcpUserTimeout"),
        ("injection.tcpUserTimeout=120", "tcpUserTimeout"),
        ("injection.tcpUserTimeout=30s", "tcpUserTimeout"),
        ("injection.tcpUserTimeout=1h1s", "tcpUserTimeout"),
        (
            "injection.proxy.maxH2ConnectionsPerPeer=0",
            "maxH2ConnectionsPerPeer",
        ),
        (
            "injection.proxy.maxH2ConnectionsPerPeer=1025",
            "maxH2ConnectionsPerPeer",
        ),
        ("injection.proxy.maxH2Connections=65537", "maxH2Connections"),
        ("injection.proxy.maxH2Connections=many", "maxH2Connections"),
        ("watchFailureGrace=soon", "watchFailureGrace"),
        ("watchFailureGrace=60", "watchFailureGrace"),
        ("watchFailureGrace=0.5s", "watchFailureGrace"),
        ("watchFailureGrace=null", "watchFailureGrace"),
        ("grpcIdleTimeout=soon", "grpcIdleTimeout"),
        ("grpcIdleTimeout=300", "grpcIdleTimeout"),
        ("grpcIdleTimeout=null", "grpcIdleTimeout"),
        (
            "maxGrpcConnectionsPerClient=0",
            "maxGrpcConnectionsPerClient",
        ),
        (
            "maxGrpcConnectionsPerClient=65537",
            "maxGrpcConnectionsPerClient",
        ),
        (
            "maxGrpcConnectionsPerClient=many",
            "maxGrpcConnectionsPerClient",
        ),
        // A pull secret name every injected pod would carry.
        (
            "imagePullSecrets[0].name=Registry_Creds",
            "imagePullSecrets",
        ),
        // The ConfigMap every injected pod's trust bundle is read from: a
        // name no ConfigMap can have leaves every sidecar without it.
        (
            "injection.trustBundleConfigMap=Trellis_Bundle",
            "trustBundleConfigMap",
        ),
        // Namespace names, as the webhooks' namespaceSelector matches them:
        // the API server refuses the configuration with a value that is no
        // label value (Team/A), and one that is no namespace's name
        // (Monitoring) would exclude nothing.
        ("injection.excludeNamespaces={Team/A}", "excludeNamespaces"),
        (
            "injection.excludeNamespaces={Monitoring}",
            "excludeNamespaces",
        ),
        // A PodDisruptionBudget the API server would refuse.
        ("podDisruptionBudget.maxUnavailable=one", "maxUnavailable"),
        ("podDisruptionBudget.maxUnavailable=-1", "maxUnavailable"),
        // Kubernetes quantities: 256MB would make every injected pod (or
        // the control plane's) invalid.
        ("injection.proxy.resources.limits.memory=256MB", "memory"),
        ("injection.init.resources.requests.cpu=1 core", "cpu"),
        ("resources.requests.memory=-1Gi", "memory"),
        // Kubernetes refuses a projected token asking for more than 2^32
        // seconds in every injected pod.
        (
            "injection.tokenExpirationSeconds=4294967297",
            "tokenExpirationSeconds",
        ),
        // A digest is no tag: repository:sha256:... is no image reference.
        (
            "image.tag=sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "tag",
        ),
        ("image.digest=sha256:abc", "digest"),
        ("image.digest=0123456789abcdef", "digest"),
        ("podDisruptionBudget.maxUnavailable=101%", "maxUnavailable"),
        // A pull secret is a name alone: the control plane refuses any
        // other field in its injection settings, and would exit at start.
        ("imagePullSecrets[0].namespace=mesh", "imagePullSecrets"),
        // A misspelt toleration field would be dropped by the API server,
        // leaving a toleration of every effect.
        ("tolerations[0].efect=NoSchedule", "tolerations"),
        ("tolerations[0].operator=exists", "tolerations"),
        // No PriorityClass can have this name: no replica would be created.
        ("priorityClassName=System_Critical", "priorityClassName"),
        // A tag in the repository: repository:tag:appVersion is no image
        // reference, so neither the control plane nor any injected pod
        // would start.
        ("image.repository=trellis/trellis:0.1.0", "repository"),
        ("image.repository=Trellis/Trellis", "repository"),
        // The image is Linux only: a replica on another OS never starts.
        ("nodeSelector.kubernetes\\.io/os=windows", "nodeSelector"),
    ] {
        let e = template(&helm, &[set]).unwrap_err();
        assert!(e.contains(names), "{set}: {e}");
    }
}

/// A request above its limit in the control plane's own resources (cpu,
/// memory or ephemeral storage) is refused at `helm template`, naming
/// both: the API server would refuse the Deployment. Raised together they
/// render, and validate.
#[test]
fn control_plane_resources_the_api_server_would_refuse_are_refused() {
    let Some((helm, validate)) = tools() else {
        return;
    };
    for (set, says) in [
        (
            "resources.limits.memory=64Mi",
            "resources: requests.memory 128Mi is above limits.memory 64Mi",
        ),
        (
            "resources.requests.cpu=1500m",
            "resources: requests.cpu 1500m is above limits.cpu 1",
        ),
        (
            "resources.requests.memory=1.5Gi,resources.limits.memory=1536Mi,resources.requests.cpu=2",
            "resources: requests.cpu 2 is above limits.cpu 1",
        ),
        (
            "resources.requests.ephemeral-storage=2Gi,resources.limits.ephemeral-storage=1Gi",
            "resources: requests.ephemeral-storage 2Gi is above limits.ephemeral-storage 1Gi",
        ),
    ] {
        let e = template(&helm, &[set]).unwrap_err();
        assert!(e.contains(says), "{set}: {e}");
    }
    // Equal quantities written differently, and a request raised with its
    // limit, are what the Deployment gets.
    let docs = validated(
        &helm,
        &validate,
        &[
            "resources.requests.cpu=0.3,resources.limits.cpu=300m",
            "resources.requests.memory=1Gi,resources.limits.memory=1024Mi",
        ],
    );
    let resources =
        &one(&docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["resources"];
    assert_eq!(
        resources,
        &json!({"requests": {"cpu": "0.3", "memory": "1Gi"}, "limits": {"cpu": "300m", "memory": "1024Mi"}})
    );
    // Ephemeral storage too, where a cluster asks every pod for it.
    let docs = validated(
        &helm,
        &validate,
        &["resources.requests.ephemeral-storage=100Mi,resources.limits.ephemeral-storage=1Gi"],
    );
    let resources =
        &one(&docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["resources"];
    assert_eq!(resources["requests"]["ephemeral-storage"], "100Mi");
    assert_eq!(resources["limits"]["ephemeral-storage"], "1Gi");
}

/// A PodDisruptionBudget that lets no replica go (maxUnavailable 0 or 0%)
/// would hold every drain of a node running one for ever: it is refused,
/// saying so; without the budget the value does not matter.
#[test]
fn a_disruption_budget_that_blocks_every_drain_is_refused() {
    let Some((helm, _)) = tools() else { return };
    for max in ["0", "0%"] {
        let e = template(
            &helm,
            &[&format!("podDisruptionBudget.maxUnavailable={max}")],
        )
        .unwrap_err();
        assert!(
            e.contains(&format!(
                "podDisruptionBudget.maxUnavailable {max} lets no control-plane replica be evicted"
            )),
            "{max}: {e}"
        );
    }
    let docs = documents(
        &template(
            &helm,
            &["podDisruptionBudget.enabled=false,podDisruptionBudget.maxUnavailable=0"],
        )
        .unwrap(),
    );
    assert!(find(&docs, "PodDisruptionBudget").is_empty());
    for max in ["1", "100%"] {
        let docs = documents(
            &template(
                &helm,
                &[&format!("podDisruptionBudget.maxUnavailable={max}")],
            )
            .unwrap(),
        );
        assert_eq!(
            one(&docs, "PodDisruptionBudget")["spec"]["maxUnavailable"].to_string(),
            if max == "1" { "1" } else { "\"100%\"" }
        );
    }
}

/// The ClusterRole and ClusterRoleBinding are cluster-scoped: releases of
/// one name in two namespaces get their own, each binding its namespace's
/// control plane to its own role, as the webhook configurations do.
#[test]
fn releases_of_one_name_in_two_namespaces_share_no_cluster_object() {
    let Some((helm, _)) = tools() else { return };
    let render = |namespace: &str| documents(&template_in(&helm, namespace, &[]).unwrap());
    let (a, b) = (render("mesh-a"), render("mesh-b"));
    let cluster_scoped = |docs: &[Value]| -> Vec<String> {
        docs.iter()
            .filter(|d| d["metadata"].get("namespace").is_none())
            .filter(|d| d["kind"] != "CustomResourceDefinition")
            .map(|d| format!("{}/{}", d["kind"], d["metadata"]["name"]))
            .collect()
    };
    let (names_a, names_b) = (cluster_scoped(&a), cluster_scoped(&b));
    assert_eq!(names_a.len(), 4, "{names_a:?}");
    for name in &names_a {
        assert!(!names_b.contains(name), "{name} in both releases");
    }
    for (docs, namespace) in [(&a, "mesh-a"), (&b, "mesh-b")] {
        let role = one(docs, "ClusterRole");
        let name = format!("trellis-control-plane-{namespace}");
        assert_eq!(role["metadata"]["name"], name.as_str());
        let binding = one(docs, "ClusterRoleBinding");
        assert_eq!(binding["metadata"]["name"], name.as_str());
        assert_eq!(binding["roleRef"]["name"], name.as_str());
        assert_eq!(
            binding["subjects"],
            json!([{"kind": "ServiceAccount", "name": "trellis-control-plane", "namespace": namespace}])
        );
    }
}

/// The rule list of a Role or ClusterRole, normalised for comparison.
fn rules(role: &Value) -> Vec<Value> {
    role["rules"].as_array().unwrap().clone()
}

/// The control plane may create tokenreviews, list and watch pods, services
/// and endpointslices (never get one), read the Trellis CRDs, write them (the Admin API's applies,
/// as creates and patches of the `spec`, and deletes with the Kubernetes store; never a full
/// update, which would erase what other tools set), read and update the one CA Secret, by
/// name, and create Secrets (the CA Secret, which the chart does not render), in its own
/// namespace: nothing else, compared rule by rule.
#[test]
fn rbac_grants_nothing_beyond_the_list() {
    let Some((helm, _)) = tools() else { return };
    let docs = documents(&template(&helm, &[]).unwrap());
    let cluster_role = one(&docs, "ClusterRole");
    assert_eq!(
        rules(cluster_role),
        [
            json!({"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]}),
            // Pods are only listed and watched (the endpoints watcher); no
            // single pod is ever read.
            json!({"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]}),
            // A call to a Service reaches the sidecar with the Service's
            // cluster IP as its destination: the cluster IP must resolve to
            // the ready backends its EndpointSlices list. Both are only
            // listed and watched.
            json!({"apiGroups": [""], "resources": ["services"], "verbs": ["list", "watch"]}),
            json!({"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                   "verbs": ["list", "watch"]}),
            json!({"apiGroups": ["trellis.io"], "resources": ["authorizationpolicies", "ratelimitpolicies"],
                   "verbs": ["get", "list", "watch"]}),
            json!({"apiGroups": ["trellis.io"], "resources": ["authorizationpolicies", "ratelimitpolicies"],
                   "verbs": ["create", "patch", "delete"]}),
        ]
    );
    assert!(
        cluster_role.get("aggregationRule").is_none(),
        "an aggregated ClusterRole could gain rules"
    );
    let role = one(&docs, "Role");
    assert_eq!(role["metadata"]["namespace"], NAMESPACE);
    assert_eq!(
        rules(role),
        [
            json!({"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["trellis-ca"],
                "verbs": ["get", "update"]}),
            // The control plane creates the CA Secret: RBAC cannot hold a
            // create to one name, so it may create any Secret, in its own
            // namespace only (a Role, never the ClusterRole).
            json!({"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]}),
        ]
    );
    // In another namespace, the Role (and so the create) moves with the
    // release.
    let elsewhere = documents(&template_in(&helm, "mesh-b", &[]).unwrap());
    assert_eq!(one(&elsewhere, "Role")["metadata"]["namespace"], "mesh-b");
    assert_eq!(rules(one(&elsewhere, "Role")), rules(role));
    // rbac.createCASecret=false leaves that create out (the CA Secret
    // exists): the control plane reads and updates its CA alone, and
    // creates nothing; the ClusterRole is as before.
    let narrowed = documents(&template(&helm, &["rbac.createCASecret=false"]).unwrap());
    assert_eq!(
        rules(one(&narrowed, "Role")),
        [
            json!({"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["trellis-ca"],
                "verbs": ["get", "update"]})
        ]
    );
    assert_eq!(rules(one(&narrowed, "ClusterRole")), rules(cluster_role));
    for set in ["rbac.createCASecret=no", "rbac.createCaSecret=false"] {
        let e = template(&helm, &[set]).unwrap_err();
        assert!(e.contains("rbac"), "{set}: {e}");
    }

    // Each binding gives its role to the control plane's account only.
    let subject = json!([{"kind": "ServiceAccount", "name": "trellis-control-plane", "namespace": NAMESPACE}]);
    for (binding, role_kind, role) in [
        ("ClusterRoleBinding", "ClusterRole", cluster_role),
        ("RoleBinding", "Role", role),
    ] {
        let binding = one(&docs, binding);
        assert_eq!(binding["subjects"], subject);
        assert_eq!(
            binding["roleRef"],
            json!({"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind,
                   "name": role["metadata"]["name"]})
        );
    }
    let account = one(&docs, "ServiceAccount");
    assert_eq!(account["metadata"]["name"], "trellis-control-plane");
    assert_eq!(account["automountServiceAccountToken"], false);
}

/// The control plane runs hardened: non-root, read-only root filesystem, no
/// privilege escalation, no capabilities, seccomp RuntimeDefault, probes on
/// the admin port, spread over nodes, with a disruption budget.
#[test]
fn control_plane_deployment_is_hardened() {
    let Some((helm, _)) = tools() else { return };
    let docs = documents(&template(&helm, &[]).unwrap());
    let pod = &one(&docs, "Deployment")["spec"]["template"];
    assert_eq!(pod["metadata"]["labels"]["trellis.io/inject"], "disabled");
    let spec = &pod["spec"];
    assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        spec["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    assert_eq!(spec["automountServiceAccountToken"], true);
    let container = &spec["containers"][0];
    assert_eq!(
        container["securityContext"],
        json!({"runAsNonRoot": true, "allowPrivilegeEscalation": false, "privileged": false,
               "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]},
               "seccompProfile": {"type": "RuntimeDefault"}})
    );
    for (probe, path) in [("livenessProbe", "/live"), ("readinessProbe", "/ready")] {
        assert_eq!(
            container[probe]["httpGet"],
            json!({"path": path, "port": "admin"})
        );
    }
    let admin = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "admin")
        .unwrap();
    assert_eq!(admin["containerPort"], 15014);
    // A stopping pod serves its webhooks until it has left the Service's
    // endpoints, within the grace period (Kubernetes' 30 s unless set).
    assert_eq!(
        container["lifecycle"]["preStop"],
        json!({"exec": {"command": ["sleep", "5"]}})
    );
    // SIGTERM then ends the Watch streams and drains the calls in flight,
    // each up to its deadline: the whole stop fits in the grace period.
    use trellis_control_plane::run::{DRAIN_DEADLINE, STREAMS_DEADLINE};
    let grace = spec["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
    let pre_stop: u64 = container["lifecycle"]["preStop"]["exec"]["command"][1]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("the preStop hook sleeps a number of seconds");
    let stop = std::time::Duration::from_secs(pre_stop) + STREAMS_DEADLINE + DRAIN_DEADLINE;
    assert!(
        std::time::Duration::from_secs(grace) >= stop,
        "a grace period of {grace}s is shorter than a stop of up to {stop:?}"
    );
    assert!(container["resources"]["requests"]["cpu"].is_string());
    assert!(container["resources"]["limits"]["memory"].is_string());
    assert!(
        spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
            .is_array()
    );
    // Linux nodes only: the image runs nowhere else, and a replica placed
    // on a Windows node of a mixed cluster would never start.
    assert_eq!(spec["nodeSelector"], json!({"kubernetes.io/os": "linux"}));
    let pdb = one(&docs, "PodDisruptionBudget");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        one(&docs, "Deployment")["spec"]["selector"]["matchLabels"]
    );

    let services = find(&docs, "Service");
    let service = services
        .iter()
        .find(|s| s["metadata"]["name"] == "trellis-control-plane")
        .expect("the control plane's Service");
    // The peers' Service: headless, every pod (ready or not) on the gRPC
    // port, under the name each replica's --peers resolves.
    let peers = services
        .iter()
        .find(|s| s["metadata"]["name"] == "trellis-control-plane-peers")
        .expect("the replicas' headless Service");
    assert_eq!(peers["spec"]["clusterIP"], "None");
    assert_eq!(peers["spec"]["publishNotReadyAddresses"], true);
    assert_eq!(peers["spec"]["selector"], service["spec"]["selector"]);
    assert_eq!(peers["spec"]["ports"][0]["port"], 15012);
    assert_eq!(peers["spec"]["ports"][0]["targetPort"], "grpc");
    let ports: Vec<(Value, Value)> = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["port"].clone(), p["targetPort"].clone()))
        .collect();
    assert_eq!(
        ports,
        [
            (json!(15012), json!("grpc")),
            (json!(15017), json!("webhook"))
        ]
    );
}

/// Required anti-affinity matches the old pods as well as the new: with as
/// many nodes as replicas a surge pod never schedules. So with
/// `antiAffinity: hard` an old pod may stop while it waits (maxSurge 1,
/// maxUnavailable 1, what the PodDisruptionBudget allows): the rollout
/// progresses without a spare node and uses one when there is. One replica
/// would then leave none, so the chart refuses hard with one replica,
/// naming both values. With soft or none a new pod starts first. Rendered
/// with the real helm; no API server here, so no rollout runs.
#[test]
fn hard_anti_affinity_rolls_out_with_a_replica_always_running() {
    let Some((helm, validate)) = tools() else {
        return;
    };
    for (value, surge, unavailable) in [("soft", 1, 0), ("none", 1, 0), ("hard", 1, 1)] {
        let docs = validated(&helm, &validate, &[&format!("antiAffinity={value}")]);
        let deployment = one(&docs, "Deployment");
        assert_eq!(
            deployment["spec"]["strategy"],
            json!({"type": "RollingUpdate",
                   "rollingUpdate": {"maxSurge": surge, "maxUnavailable": unavailable}}),
            "antiAffinity={value}"
        );
        let affinity = &deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"];
        let required = affinity.get("requiredDuringSchedulingIgnoredDuringExecution");
        assert_eq!(required.is_some(), value == "hard", "antiAffinity={value}");
        // The budget allows the one pod the rollout takes down.
        assert_eq!(
            one(&docs, "PodDisruptionBudget")["spec"]["maxUnavailable"],
            1
        );
    }
    // The default is soft: a new pod starts before an old one stops.
    let docs = documents(&template(&helm, &[]).unwrap());
    assert_eq!(
        one(&docs, "Deployment")["spec"]["strategy"]["rollingUpdate"],
        json!({"maxSurge": 1, "maxUnavailable": 0})
    );

    // One replica (accepted under the injection's Fail): soft may surge,
    // hard would stop the only one.
    let one_replica = ["replicas=1", "injection.singleReplicaAccepted=true"];
    template(&helm, &[&one_replica[..], &["antiAffinity=soft"]].concat()).unwrap();
    let e = template(&helm, &[&one_replica[..], &["antiAffinity=hard"]].concat()).unwrap_err();
    assert!(
        e.contains("antiAffinity: hard") && e.contains("replicas"),
        "{e}"
    );
    template(&helm, &["antiAffinity=hard", "replicas=3"]).unwrap();
}

/// The control plane refuses a `--cert-ttl` outside 10s..720h (30 days),
/// exiting before it serves anything; the chart refuses such a `certTTL`
/// at `helm template` instead, naming it, and renders what the binary
/// takes.
#[test]
fn cert_ttl_beyond_what_the_control_plane_accepts_is_refused() {
    let Some((helm, _)) = tools() else { return };
    for ttl in ["1000h", "721h", "31d", "9s", "0s", "99999999999h1h", "1h "] {
        let e = template(&helm, &[&format!("certTTL={ttl}")]).unwrap_err();
        assert!(e.contains("certTTL"), "{ttl}: {e}");
    }
    for ttl in ["10s", "1h", "1h30m", "720h", "719h30m", "2592000000ms"] {
        let args = args(&documents(
            &template(&helm, &[&format!("certTTL={ttl}")]).unwrap(),
        ));
        assert!(
            args.contains(&format!("--cert-ttl={ttl}")),
            "{ttl}: {args:?}"
        );
    }
}

/// The control plane refuses a `--watch-failure-grace` under 1s, exiting
/// before it serves anything; the chart refuses such a
/// `watchFailureGrace` at `helm template` instead, naming it, and what it
/// renders the control plane takes, as the same duration.
#[test]
fn watch_failure_grace_the_control_plane_refuses_is_refused() {
    let Some((helm, _)) = tools() else { return };
    for grace in ["0s", "999ms", "0m"] {
        let e = template(&helm, &[&format!("watchFailureGrace={grace}")]).unwrap_err();
        assert!(
            e.contains(&format!("watchFailureGrace {grace} is shorter than 1s")),
            "{grace}: {e}"
        );
    }
    for (grace, seconds) in [
        ("1s", 1),
        ("1000ms", 1),
        ("90s", 90),
        ("1m30s", 90),
        ("2h", 7200),
    ] {
        let config = rendered_and_taken(
            &helm,
            &format!("watchFailureGrace={grace}"),
            &format!("--watch-failure-grace={grace}"),
        );
        assert_eq!(
            config.watch_failure_grace,
            std::time::Duration::from_secs(seconds),
            "{grace}"
        );
    }
}

/// The chart refuses a `grpcIdleTimeout` under 1s, which the control
/// plane would refuse at start, naming it; what it renders reaches the
/// control plane as `--grpc-idle-timeout`, taken as the same duration.
#[test]
fn grpc_idle_timeout_reaches_the_control_plane() {
    let Some((helm, _)) = tools() else { return };
    for timeout in ["0s", "999ms"] {
        let e = template(&helm, &[&format!("grpcIdleTimeout={timeout}")]).unwrap_err();
        assert!(
            e.contains(&format!("grpcIdleTimeout {timeout} is shorter than 1s")),
            "{timeout}: {e}"
        );
    }
    for (timeout, seconds) in [("1s", 1), ("90s", 90), ("5m", 300), ("1h", 3600)] {
        let config = rendered_and_taken(
            &helm,
            &format!("grpcIdleTimeout={timeout}"),
            &format!("--grpc-idle-timeout={timeout}"),
        );
        assert_eq!(
            config.grpc_idle_timeout,
            std::time::Duration::from_secs(seconds),
            "{timeout}"
        );
    }
}

/// The control plane's config from `flag`, after asserting that the chart
/// rendered with `value` (`name=value`) passes it `flag` and that the
/// control plane takes it.
fn rendered_and_taken(
    helm: &std::path::Path,
    value: &str,
    flag: &str,
) -> trellis_control_plane::config::Config {
    use trellis_control_plane::config::{Config, Parsed};
    let args = args(&documents(&template(helm, &[value]).unwrap()));
    assert!(args.iter().any(|a| a == flag), "{value}: {args:?}");
    let parsed = Config::parse_args(
        ["trellis-control-plane", "--state-dir", "state", flag]
            .into_iter()
            .map(Into::into)
            .collect(),
    );
    let Parsed::Run(config) = parsed else {
        panic!("the control plane refuses {flag}")
    };
    *config
}

/// `maxGrpcConnectionsPerClient` reaches the control plane as
/// `--max-grpc-connections-per-client`, which it takes as the same number,
/// up to the largest it accepts.
#[test]
fn max_grpc_connections_per_client_reaches_the_control_plane() {
    let Some((helm, _)) = tools() else { return };
    for n in [1, 64, 65536] {
        let config = rendered_and_taken(
            &helm,
            &format!("maxGrpcConnectionsPerClient={n}"),
            &format!("--max-grpc-connections-per-client={n}"),
        );
        assert_eq!(config.max_grpc_connections_per_client, n, "{n}");
    }
}

/// The control plane's listeners take connections of both IP families, so
/// the kubelet's probes, the webhook calls and the sidecars reach it in
/// IPv4-only, IPv6-only and dual-stack clusters: each address the chart
/// passes is bound with the control plane's own binder (on a free port)
/// and dialled over 127.0.0.1 and ::1 with real sockets. Rendered with the
/// real helm; no API server here.
#[tokio::test]
async fn control_plane_listens_on_both_ip_families() {
    let Some((helm, _)) = tools() else { return };
    let args = args(&documents(&template(&helm, &[]).unwrap()));
    let mut peers = vec!["127.0.0.1"];
    if std::net::TcpListener::bind("[::1]:0").is_ok() {
        peers.push("::1");
    } else {
        machine::note("skipped: no IPv6 loopback (::1 not dialled, 127.0.0.1 only)");
    }
    for flag in ["--listen=", "--admin=", "--webhook="] {
        let value = args
            .iter()
            .find_map(|a| a.strip_prefix(flag))
            .unwrap_or_else(|| panic!("{flag} in {args:?}"));
        let mut addr: std::net::SocketAddr = value.parse().unwrap();
        addr.set_port(0);
        let listener = trellis_control_plane::net::bind(addr).unwrap();
        let port = listener.local_addr().unwrap().port();
        for peer in &peers {
            let peer: std::net::IpAddr = peer.parse().unwrap();
            tokio::net::TcpStream::connect((peer, port))
                .await
                .unwrap_or_else(|e| panic!("{flag}{value}: no connection from {peer}: {e}"));
            listener.accept().await.unwrap();
        }
    }
}

/// Replicas spread over zones as well as nodes: by default a
/// `topologySpreadConstraints` entry over `topology.kubernetes.io/zone`,
/// preferred (`ScheduleAnyway`, so a cluster of one zone still runs them),
/// on the Deployment's own pods. The key, skew and whether it is required
/// are values, and it can be turned off; a value the API server would
/// refuse is refused by the chart, naming it.
#[test]
fn control_plane_spreads_over_zones() {
    let Some((helm, validate)) = tools() else {
        return;
    };
    let docs = validated(&helm, &validate, &[]);
    let deployment = one(&docs, "Deployment");
    let spec = &deployment["spec"]["template"]["spec"];
    assert_eq!(
        spec["topologySpreadConstraints"],
        json!([{"topologyKey": "topology.kubernetes.io/zone", "maxSkew": 1,
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": deployment["spec"]["selector"]["matchLabels"]}}])
    );
    // Over nodes still, as before.
    assert!(
        spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
            .is_array()
    );

    let docs = validated(
        &helm,
        &validate,
        &[
            "topologySpread.whenUnsatisfiable=DoNotSchedule",
            "topologySpread.topologyKey=example.com/rack",
            "topologySpread.maxSkew=2",
            "replicas=3",
        ],
    );
    let constraint =
        &one(&docs, "Deployment")["spec"]["template"]["spec"]["topologySpreadConstraints"][0];
    assert_eq!(constraint["topologyKey"], "example.com/rack");
    assert_eq!(constraint["maxSkew"], 2);
    assert_eq!(constraint["whenUnsatisfiable"], "DoNotSchedule");

    let docs = documents(&template(&helm, &["topologySpread.enabled=false"]).unwrap());
    assert!(
        one(&docs, "Deployment")["spec"]["template"]["spec"]
            .get("topologySpreadConstraints")
            .is_none()
    );

    for (set, names) in [
        (
            "topologySpread.whenUnsatisfiable=Sometimes",
            "whenUnsatisfiable",
        ),
        ("topologySpread.maxSkew=0", "maxSkew"),
        ("topologySpread.topologyKey=", "topologyKey"),
        ("topologySpread.topologyKey=zone name", "topologyKey"),
    ] {
        let e = template(&helm, &[set]).unwrap_err();
        assert!(e.contains(names), "{set}: {e}");
    }
}

/// `networkPolicy.enabled` renders an ingress NetworkPolicy on the control
/// plane's pods: the gRPC port from every namespace (sidecars, and the
/// replicas between them), the webhook port from anywhere (the API
/// server's address is unknown), the admin port only from `metricsFrom`
/// (the kubelet's probes come from the node, which a NetworkPolicy never
/// blocks); egress is left alone. Each port it names is one the control
/// plane's container declares, with the number it listens on. Off by
/// default; a `metricsFrom` entry that is no NetworkPolicy peer is refused.
#[test]
fn network_policy_opens_each_port_to_what_must_reach_it() {
    let Some((helm, validate)) = tools() else {
        return;
    };
    let docs = documents(&template(&helm, &[]).unwrap());
    assert!(find(&docs, "NetworkPolicy").is_empty());

    let docs = validated(&helm, &validate, &["networkPolicy.enabled=true"]);
    let deployment = one(&docs, "Deployment");
    let policy = one(&docs, "NetworkPolicy");
    assert_eq!(policy["metadata"]["namespace"], NAMESPACE);
    assert_eq!(
        policy["spec"]["podSelector"]["matchLabels"],
        deployment["spec"]["selector"]["matchLabels"]
    );
    assert_eq!(policy["spec"]["policyTypes"], json!(["Ingress"]));
    assert_eq!(
        policy["spec"]["ingress"],
        json!([
            {"ports": [{"port": "grpc", "protocol": "TCP"}], "from": [{"namespaceSelector": {}}]},
            {"ports": [{"port": "webhook", "protocol": "TCP"}]},
        ])
    );
    let declared: Vec<(Value, Value)> =
        deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p["name"].clone(), p["containerPort"].clone()))
            .collect();
    assert_eq!(
        declared,
        [
            (json!("grpc"), json!(15012)),
            (json!("admin"), json!(15014)),
            (json!("webhook"), json!(15017)),
        ]
    );

    let docs = validated(
        &helm,
        &validate,
        &[
            "networkPolicy.enabled=true",
            "networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.kubernetes\\.io/metadata\\.name=monitoring",
            "networkPolicy.metricsFrom[0].podSelector.matchLabels.app\\.kubernetes\\.io/name=prometheus",
        ],
    );
    assert_eq!(
        one(&docs, "NetworkPolicy")["spec"]["ingress"][2],
        json!({"ports": [{"port": "admin", "protocol": "TCP"}],
               "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                         "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}]})
    );

    let e = template(
        &helm,
        &[
            "networkPolicy.enabled=true",
            "networkPolicy.metricsFrom[0].namespaceSelectors.matchLabels.team=monitoring",
        ],
    )
    .unwrap_err();
    assert!(
        e.contains("metricsFrom") && e.contains("namespaceSelectors"),
        "{e}"
    );

    // A misspelt field inside a peer is refused too: the API server would
    // drop it, and the selector left empty would open the admin port to
    // every namespace (or every pod of the release's). An ipBlock is a
    // CIDR, with exceptions.
    for (set, names) in [
        (
            "networkPolicy.metricsFrom[0].namespaceSelector.matchLabel.team=monitoring",
            "matchLabel",
        ),
        (
            "networkPolicy.metricsFrom[0].podSelector.matchExpressions[0].key=app",
            "operator",
        ),
        (
            "networkPolicy.metricsFrom[0].ipBlock.cidrs=10.0.0.0/8",
            "cidrs",
        ),
        (
            "networkPolicy.metricsFrom[0].ipBlock.cidr=10.0.0.0/33",
            "cidr",
        ),
    ] {
        let e = template(&helm, &["networkPolicy.enabled=true", set]).unwrap_err();
        assert!(e.contains("metricsFrom") && e.contains(names), "{set}: {e}");
    }
    let docs = validated(
        &helm,
        &validate,
        &[
            "networkPolicy.enabled=true",
            "networkPolicy.metricsFrom[0].podSelector.matchExpressions[0].key=app",
            "networkPolicy.metricsFrom[0].podSelector.matchExpressions[0].operator=In",
            "networkPolicy.metricsFrom[0].podSelector.matchExpressions[0].values={prometheus}",
            "networkPolicy.metricsFrom[1].ipBlock.cidr=10.0.0.0/8",
            "networkPolicy.metricsFrom[1].ipBlock.except={10.1.0.0/16}",
        ],
    );
    assert_eq!(
        one(&docs, "NetworkPolicy")["spec"]["ingress"][2]["from"],
        json!([{"podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["prometheus"]}]}},
               {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}])
    );
}

/// `metrics.podMonitor.enabled` renders a PodMonitor that selects the
/// control-plane pods (each replica scraped on its own) and scrapes
/// `/metrics` on the container port the control plane serves it on, with
/// the labels a Prometheus selects PodMonitors by. Off by default: its
/// kind exists only where the Prometheus Operator is installed.
#[test]
fn pod_monitor_scrapes_every_replica() {
    let Some((helm, validate)) = tools() else {
        return;
    };
    let docs = documents(&template(&helm, &[]).unwrap());
    assert!(find(&docs, "PodMonitor").is_empty());

    let docs = validated(
        &helm,
        &validate,
        &[
            "metrics.podMonitor.enabled=true",
            "metrics.podMonitor.interval=1m",
            "metrics.podMonitor.labels.release=kube-prometheus-stack",
        ],
    );
    let monitor = one(&docs, "PodMonitor");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(monitor["metadata"]["namespace"], NAMESPACE);
    assert_eq!(
        monitor["metadata"]["labels"]["release"],
        "kube-prometheus-stack"
    );
    let deployment = one(&docs, "Deployment");
    assert_eq!(
        monitor["spec"]["selector"]["matchLabels"],
        deployment["spec"]["selector"]["matchLabels"]
    );
    assert_eq!(
        monitor["spec"]["podMetricsEndpoints"],
        json!([{"port": "admin", "path": "/metrics", "scheme": "http", "interval": "1m"}])
    );
    // The port named is the admin port, where the control plane serves
    // /metrics.
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert!(
        container["ports"]
            .as_array()
            .unwrap()
            .contains(&json!({"name": "admin", "containerPort": 15014, "protocol": "TCP"})),
        "{}",
        container["ports"]
    );
    assert!(
        args(&docs).iter().any(|a| a == "--admin=[::]:15014"),
        "{:?}",
        args(&docs)
    );

    for (set, names) in [
        ("metrics.podMonitor.interval=30", "interval"),
        ("metrics.podMonitor.interval=half a minute", "interval"),
        ("metrics.podMonitor.labels.release=1", "labels"),
        ("metrics.podMonitor.enable=true", "enable"),
    ] {
        let e = template(&helm, &[set]).unwrap_err();
        assert!(e.contains(names), "{set}: {e}");
    }
}

/// The keys of a rendered object's `metadata.<field>`.
fn keys_of(object: &Value, field: &str) -> Vec<String> {
    object["metadata"][field]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

/// A key the chart writes itself, repeated in a map the operator gives
/// (`podAnnotations` on the control plane's pods, the `labels` of either
/// PodMonitor), would render that key twice: the later silently wins,
/// undoing the chart's checksum that rolls the pods or its own labels, or
/// the API server refuses the object. Every such key, as the rendered
/// manifests show them, is refused at `helm template`, naming the value and
/// the key and never echoing what was given; any other key joins the
/// chart's.
#[test]
fn operator_maps_repeating_a_key_the_chart_writes_are_refused() {
    let Some((helm, validate)) = tools() else {
        return;
    };
    // With trust anchors and both monitors, every key the chart may write.
    let dir = tempfile::tempdir().unwrap();
    let roots = dir.path().join("roots.pem");
    let root = rcgen::generate_simple_self_signed(vec!["root".to_owned()]).unwrap();
    std::fs::write(&roots, root.cert.pem()).unwrap();
    let roots = format!("trustAnchorsPEM={}", roots.display());
    let everything = |sets: &[&str]| {
        let mut args = vec!["--set-file", roots.as_str()];
        for set in [
            "metrics.podMonitor.enabled=true",
            "metrics.sidecarPodMonitor.enabled=true",
        ]
        .iter()
        .chain(sets)
        {
            args.extend(["--set", set]);
        }
        template_with(&helm, NAMESPACE, &args)
    };
    let docs = documents(&everything(&[]).unwrap());
    let pod = &one(&docs, "Deployment")["spec"]["template"];
    let annotations = keys_of(pod, "annotations");
    assert!(
        annotations.contains(&"checksum/inject-config".to_owned())
            && annotations.contains(&"checksum/trust-anchors".to_owned()),
        "{annotations:?}"
    );
    let monitor = |name: &str| {
        find(&docs, "PodMonitor")
            .into_iter()
            .find(|m| m["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("PodMonitor {name}"))
    };
    let mut owned = vec![("podAnnotations", annotations)];
    for (value, name) in [
        ("metrics.podMonitor.labels", "trellis-control-plane"),
        ("metrics.sidecarPodMonitor.labels", "trellis-sidecars"),
    ] {
        let labels = keys_of(monitor(name), "labels");
        assert!(
            labels.contains(&"app.kubernetes.io/managed-by".to_owned()),
            "{labels:?}"
        );
        owned.push((value, labels));
    }

    let given = "given-value-never-echoed";
    for (value, keys) in &owned {
        for key in keys {
            let set = format!("{value}.{}={given}", key.replace('.', "\\."));
            let e = everything(&[&set]).unwrap_err();
            assert!(
                e.contains(&format!("{value}: \"{key}\" is set by the chart itself")),
                "{set}: {e}"
            );
            // What helm says, after the arguments the test passed it.
            let said = e.split_once("Error:").map_or(e.as_str(), |(_, said)| said);
            assert!(!said.contains(given), "{set} echoed: {e}");
        }
    }

    // Keys of the operator's own are added beside the chart's, which keep
    // their values.
    let rendered = everything(&[
        "podAnnotations.example\\.com/team=mesh",
        "podAnnotations.checksum/config-of-ours=abc",
        "metrics.podMonitor.labels.release=kube-prometheus-stack",
        "metrics.sidecarPodMonitor.labels.release=kube-prometheus-stack",
    ])
    .unwrap();
    validate_manifests(&validate, &rendered);
    let with = documents(&rendered);
    let annotations_given =
        &one(&with, "Deployment")["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations_given["example.com/team"], "mesh");
    assert_eq!(annotations_given["checksum/config-of-ours"], "abc");
    for key in &owned[0].1 {
        assert_eq!(
            annotations_given[key], pod["metadata"]["annotations"][key],
            "{key}"
        );
    }
    for monitor in find(&with, "PodMonitor") {
        let labels = &monitor["metadata"]["labels"];
        assert_eq!(labels["release"], "kube-prometheus-stack");
        assert_eq!(labels["app.kubernetes.io/managed-by"], "Helm");
    }
    // A monitor left off renders no labels, and so refuses none.
    let docs = documents(
        &template_with(
            &helm,
            NAMESPACE,
            &["--set", "metrics.podMonitor.labels.helm\\.sh/chart=mine"],
        )
        .unwrap(),
    );
    assert!(find(&docs, "PodMonitor").is_empty());
}

/// Each chart value the Deployment passes to a control-plane flag that takes
/// a fixed list of words (`--log-format={{ .Values.logFormat }}`, ...) lists
/// in `values.schema.json` exactly the words that flag takes, as the
/// control plane's own `--help` names them: a word the schema allows and the
/// flag does not would pass `helm install` and then stop every replica at
/// start (exit 64), and a word the flag takes and the schema does not could
/// not be chosen. Reads the schema file and the flags' definitions; no helm.
#[test]
fn the_schemas_word_lists_are_the_control_planes_flags() {
    use clap::CommandFactory;
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/helm/trellis/values.schema.json"
        ))
        .expect("read values.schema.json"),
    )
    .expect("values.schema.json is JSON");
    let deployment = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/helm/trellis/templates/deployment.yaml"
    ))
    .expect("read the Deployment template");
    let command = trellis_control_plane::config::Config::command();
    for (value, flag) in [
        ("logFormat", "log-format"),
        ("renewalProof", "renewal-proof"),
        ("defaultPolicy", "default-policy"),
        ("outboundPolicy", "outbound-policy"),
    ] {
        assert!(
            deployment.contains(&format!("- --{flag}={{{{ .Values.{value} }}}}")),
            "the Deployment passes .Values.{value} to --{flag}"
        );
        let mut allowed: Vec<String> = schema["properties"][value]["enum"]
            .as_array()
            .unwrap_or_else(|| panic!("the schema lists the words of {value}"))
            .iter()
            .map(|word| word.as_str().expect("a word").to_owned())
            .collect();
        let arg = command
            .get_arguments()
            .find(|arg| arg.get_long() == Some(flag))
            .unwrap_or_else(|| panic!("the control plane has --{flag}"));
        let mut taken: Vec<String> = arg
            .get_possible_values()
            .iter()
            .map(|word| word.get_name().to_owned())
            .collect();
        allowed.sort();
        taken.sort();
        assert!(!taken.is_empty(), "--{flag} takes a fixed list of words");
        assert_eq!(
            allowed, taken,
            "{value} in values.schema.json against --{flag}"
        );
    }
}

/// Maps of values.yaml the README names as a whole (`resources`), not key by
/// key.
const VALUES_NAMED_WHOLE: [&str; 3] = [
    "resources",
    "injection.proxy.resources",
    "injection.init.resources",
];

/// The paths of values.yaml an operator sets: each key whose value is not a
/// map, or is an empty one (`nodeSelector: {}`), or one of
/// [`VALUES_NAMED_WHOLE`].
fn value_paths(value: &Value, prefix: &str, out: &mut Vec<String>) {
    let Value::Object(map) = value else { return };
    for (key, child) in map {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match child {
            Value::Object(inner)
                if !inner.is_empty() && !VALUES_NAMED_WHOLE.contains(&path.as_str()) =>
            {
                value_paths(child, &path, out)
            }
            _ => out.push(path),
        }
    }
}

/// The value paths written in `text`: the start of each `code` span
/// (`injection.failurePolicy: Fail`, `replicas`, or words that are no
/// value), and apart, what each `--set` or `--set-file` sets (`--set
/// 'imagePullSecrets[0].name=regcred'`), which must be a value.
fn written_value_paths(text: &str) -> (Vec<String>, Vec<String>) {
    let path_of = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || ".[]".contains(*c))
            .collect::<String>()
            .trim_end_matches('.')
            .to_owned()
    };
    let mut spans: Vec<String> = text.split('`').skip(1).step_by(2).map(path_of).collect();
    let mut sets = Vec::new();
    for flag in ["--set ", "--set-file "] {
        for (at, _) in text.match_indices(flag) {
            let rest = text[at + flag.len()..].trim_start_matches([' ', '\'', '"']);
            sets.push(path_of(rest));
        }
    }
    spans.retain(|p| p.starts_with(|c: char| c.is_ascii_alphabetic()));
    sets.retain(|p| p.starts_with(|c: char| c.is_ascii_alphabetic()));
    (spans, sets)
}

/// Whether `path` (list indices such as `[0]` allowed) leads somewhere in
/// `values`: through maps to any value, or into a list or an empty map,
/// whose entries are the operator's.
fn value_exists(values: &Value, path: &str) -> bool {
    let mut at = values;
    for segment in path.split('.') {
        let key = segment.split('[').next().unwrap_or(segment);
        match at {
            Value::Object(map) if map.is_empty() => return true,
            Value::Object(map) => match map.get(key) {
                Some(next) => at = next,
                None => return false,
            },
            _ => return true,
        }
    }
    true
}

/// An operator reads the README (and docs/ARCHITECTURE.md) to choose the
/// chart's values: every value of values.yaml is named there, and every
/// value named there (`injection.failurePolicy`, `--set trustDomain=...`)
/// is one the chart has: its schema refuses any other, so a `--set` copied
/// from the docs would fail the install. Reads the files; no helm.
#[test]
fn the_docs_name_every_chart_value_and_only_values_the_chart_has() {
    let read = |path: &str| {
        std::fs::read_to_string(workspace().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
    };
    let values = to_json(
        &yaml_rust2::YamlLoader::load_from_str(&read("deploy/helm/trellis/values.yaml"))
            .expect("values.yaml is YAML")[0],
    );
    let docs = read("README.md") + &read("docs/ARCHITECTURE.md");
    let (spans, sets) = written_value_paths(&docs);

    let mut paths = Vec::new();
    value_paths(&values, "", &mut paths);
    assert!(paths.len() > 20, "values.yaml read: {paths:?}");
    let unnamed: Vec<&String> = paths
        .iter()
        .filter(|p| !spans.contains(p) && !sets.contains(p))
        .collect();
    let top: Vec<&String> = values.as_object().unwrap().keys().collect();
    let unknown: Vec<&String> = spans
        .iter()
        .filter(|p| {
            top.iter()
                .any(|t| p.split(['.', '[']).next() == Some(t.as_str()))
        })
        .chain(&sets)
        .filter(|p| !value_exists(&values, p))
        .collect();
    assert!(
        unnamed.is_empty() && unknown.is_empty(),
        "values.yaml has values the README and docs/ARCHITECTURE.md do not name: {unnamed:?}; \
         they name values values.yaml does not have: {unknown:?}"
    );
}
