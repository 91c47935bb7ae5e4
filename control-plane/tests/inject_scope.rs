//! Which pods the `/inject` webhook changes: opt-outs, namespace selection,
//! host-network pods, invalid annotations under each failure policy, and
//! pods it cannot inject.
//!
//! No Kubernetes API server can run on these machines. The fixtures in
//! `fixtures/k8s/` are real `admission.k8s.io/v1` AdmissionReview documents
//! as the API server sends them to a webhook.

mod admission;

use admission::*;
use serde_json::json;
use trellis_control_plane::inject::{FailurePolicy, InjectConfig, NamespaceScope};

/// `trellis.io/inject: disabled` on a pod in an enabled namespace leaves it
/// alone. Real AdmissionReview from the Job controller; no API server here.
#[test]
fn an_opted_out_pod_is_untouched() {
    let review = fixture("pod-opt-out.json");
    let enabled = labels(&[("trellis.io/inject", "enabled")]);
    for scope in [
        NamespaceScope::SelectedByWebhook,
        NamespaceScope::Labels(&enabled),
    ] {
        let reply = answer(&review, scope, &config());
        assert_eq!(reply["response"]["allowed"], true);
        assert!(patch_of(&reply).is_none(), "{reply}");
    }
}

/// A pod in a namespace without `trellis.io/inject=enabled` is untouched,
/// unless the pod opts in itself. Real AdmissionReview from `kubectl run`;
/// no API server here (the namespace's labels are given as the chart's
/// namespaceSelector would see them).
#[test]
fn a_pod_in_an_unlabelled_namespace_is_untouched_unless_it_opts_in() {
    let review = fixture("pod-unlabelled-namespace.json");
    let ns = labels(&[("kubernetes.io/metadata.name", "legacy")]);
    let answer1 = answer(&review, NamespaceScope::Labels(&ns), &config());
    assert_eq!(answer1["response"]["allowed"], true);
    assert!(patch_of(&answer1).is_none());

    let disabled = labels(&[("trellis.io/inject", "disabled")]);
    let answer2 = answer(&review, NamespaceScope::Labels(&disabled), &config());
    assert!(patch_of(&answer2).is_none());

    // Opting in by pod label (what the chart's second webhook selects on)
    // or by annotation.
    for field in ["labels", "annotations"] {
        let mut pod = review["request"]["object"].clone();
        pod["metadata"][field] = json!({"trellis.io/inject": "enabled"});
        let reply = answer(
            &with_object(&review, pod.clone()),
            NamespaceScope::Labels(&ns),
            &config(),
        );
        let patched = apply(&pod, &patch_of(&reply).expect("opted in"));
        assert_eq!(
            names(&patched["spec"]["initContainers"]),
            ["trellis-init", "trellis-proxy"]
        );
    }
}

/// A pod in the host's network namespace is never injected: iptables there
/// would capture the node's traffic.
/// Real AdmissionReview documents (fixtures/k8s) as the API server sends them; no
/// Kubernetes API server can run here.
#[test]
fn a_host_network_pod_is_untouched() {
    let review = fixture("pod-deployment-http-probes.json");
    let mut pod = review["request"]["object"].clone();
    pod["spec"]["hostNetwork"] = json!(true);
    assert!(patch_of(&answer_for(&with_object(&review, pod))).is_none());
}

/// A Windows pod is admitted without a sidecar, saying why: the sidecar
/// and its init are Linux programs, and the API server refuses a pod with
/// `spec.os.name: windows` whose containers set `runAsUser`, capabilities
/// or seccomp, as the injected ones do, so the pod could not be created at
/// all. Windows is named by `spec.os.name` or by the node selector
/// `kubernetes.io/os`; a pod naming Linux either way is injected.
/// Real AdmissionReview documents (fixtures/k8s) as the API server sends them; no
/// Kubernetes API server can run here.
#[test]
fn a_windows_pod_is_admitted_without_a_sidecar_saying_why() {
    let review = fixture("pod-deployment-http-probes.json");
    let by_os = |name: &str| {
        let mut pod = review["request"]["object"].clone();
        pod["spec"]["os"] = json!({"name": name});
        pod
    };
    let by_selector = |name: &str| {
        let mut pod = review["request"]["object"].clone();
        pod["spec"]["nodeSelector"] = json!({"kubernetes.io/os": name});
        pod
    };
    for pod in [by_os("windows"), by_selector("windows")] {
        let reply = answer_for(&with_object(&review, pod));
        assert_eq!(reply["response"]["allowed"], true);
        assert!(patch_of(&reply).is_none(), "{reply}");
        let warnings = reply["response"]["warnings"].to_string();
        assert!(
            warnings.contains("sidecar not injected: a Windows pod"),
            "{warnings}"
        );
    }
    for pod in [by_os("linux"), by_selector("linux")] {
        let reply = answer_for(&with_object(&review, pod.clone()));
        let patched = apply(&pod, &patch_of(&reply).expect("a Linux pod is injected"));
        assert_eq!(
            names(&patched["spec"]["initContainers"]),
            ["trellis-init", "trellis-proxy", "wait-for-db"]
        );
    }
}

/// A bad exclusion annotation is denied naming the annotation, whatever
/// the failure policy: admitted under `Ignore`, the pod would run outside
/// the mesh (plaintext accepted, no policy enforced), and only its author
/// can fix it.
/// Real AdmissionReview documents (fixtures/k8s) as the API server sends them; no
/// Kubernetes API server can run here.
#[test]
fn an_invalid_annotation_is_denied_whatever_the_failure_policy() {
    let review = fixture("pod-deployment-http-probes.json");
    let mut pod = review["request"]["object"].clone();
    pod["metadata"]["annotations"]["trellis.io/exclude-outbound-ports"] = json!("443,https");
    let review = with_object(&review, pod);

    for message in denials(&review, "443,https") {
        assert_eq!(
            message,
            "trellis: cannot inject: metadata.annotations[trellis.io/exclude-outbound-ports]: \"https\" is not a port (1-65535)"
        );
    }
}

/// `trellis.io/access-log: "false"` turns the sidecar's access log off;
/// without the annotation (or with "true") the sidecar's default, on, holds.
/// Real AdmissionReview documents (fixtures/k8s) as the API server sends them;
/// no Kubernetes API server can run here.
#[test]
fn the_access_log_annotation_reaches_the_sidecar() {
    let review = fixture("pod-deployment-http-probes.json");
    let proxy_env = |value: Option<&str>| {
        let mut pod = review["request"]["object"].clone();
        if let Some(value) = value {
            pod["metadata"]["annotations"]["trellis.io/access-log"] = json!(value);
        }
        let pod = injected(&with_object(&review, pod));
        env(container(&pod, "initContainers", "trellis-proxy"))
    };
    assert_eq!(proxy_env(Some("false"))["TRELLIS_ACCESS_LOG"], "false");
    assert!(!proxy_env(None).contains_key("TRELLIS_ACCESS_LOG"));
    assert!(!proxy_env(Some("true")).contains_key("TRELLIS_ACCESS_LOG"));
}

/// Anything but "true" or "false" is refused with an AdmissionReview error
/// naming the annotation, not read as a guess.
/// Real AdmissionReview documents (fixtures/k8s); no API server here.
#[test]
fn an_invalid_access_log_annotation_is_refused() {
    let review = fixture("pod-deployment-http-probes.json");
    let mut pod = review["request"]["object"].clone();
    pod["metadata"]["annotations"]["trellis.io/access-log"] = json!("off");
    let review = with_object(&review, pod);
    let denied = answer(&review, NamespaceScope::SelectedByWebhook, &config());
    assert_eq!(denied["response"]["allowed"], false);
    assert_eq!(
        denied["response"]["status"]["message"],
        "trellis: cannot inject: metadata.annotations[trellis.io/access-log]: expected \"true\" or \"false\", got \"off\""
    );
    assert!(patch_of(&denied).is_none());
}

/// `trellis.io/tcp-user-timeout` sets the sidecar's `TCP_USER_TIMEOUT`
/// for the workload (`0` turns it off), over the injection settings'
/// default; a pod with neither gets no variable and the sidecar's default.
/// Real AdmissionReview documents (fixtures/k8s) as the API server sends
/// them; no Kubernetes API server can run here.
#[test]
fn the_tcp_user_timeout_annotation_reaches_the_sidecar() {
    let review = fixture("pod-deployment-http-probes.json");
    let proxy_env = |value: Option<&str>, config: &InjectConfig| {
        let mut pod = review["request"]["object"].clone();
        if let Some(value) = value {
            pod["metadata"]["annotations"]["trellis.io/tcp-user-timeout"] = json!(value);
        }
        let reply = answer(
            &with_object(&review, pod.clone()),
            NamespaceScope::SelectedByWebhook,
            config,
        );
        assert_eq!(reply["response"]["allowed"], true, "{reply}");
        let pod = apply(&pod, &patch_of(&reply).expect("a patch"));
        env(container(&pod, "initContainers", "trellis-proxy"))
            .get("TRELLIS_TCP_USER_TIMEOUT")
            .cloned()
    };
    let default = config();
    assert_eq!(proxy_env(None, &default), None);
    assert_eq!(
        proxy_env(Some("2m"), &default),
        None,
        "the sidecar's default"
    );
    assert_eq!(proxy_env(Some("10m"), &default), Some(json!("10m")));
    assert_eq!(proxy_env(Some("0"), &default), Some(json!("0s")));

    // The chart's `injection.tcpUserTimeout`, which a pod's annotation
    // overrides.
    let chart = InjectConfig::from_settings(
        r#"{"tcpUserTimeout": "0"}"#,
        "cluster.local".parse().unwrap(),
        BUNDLE.into(),
    )
    .unwrap();
    assert_eq!(proxy_env(None, &chart), Some(json!("0s")));
    assert_eq!(proxy_env(Some("5m"), &chart), Some(json!("5m")));
}

/// A user timeout the sidecar would refuse (not a duration, or out of its
/// range) is refused with an AdmissionReview error naming the annotation,
/// whatever the failure policy: the sidecar would never start.
/// Real AdmissionReview documents (fixtures/k8s); no API server here.
#[test]
fn an_invalid_tcp_user_timeout_annotation_is_refused() {
    let review = fixture("pod-deployment-http-probes.json");
    for (value, says) in [
        ("two minutes", "\"two minutes\" is not a duration"),
        ("600", "\"600\" is not a duration"),
        ("10s", "\"10s\" is out of range: 0 (off) or 80s to 1h"),
        ("2h", "\"2h\" is out of range"),
    ] {
        let mut pod = review["request"]["object"].clone();
        pod["metadata"]["annotations"]["trellis.io/tcp-user-timeout"] = json!(value);
        let review = with_object(&review, pod);
        for message in denials(&review, value) {
            assert!(
                message.starts_with(
                    "trellis: cannot inject: metadata.annotations[trellis.io/tcp-user-timeout]: "
                ) && message.contains(says),
                "{value}: {message}"
            );
        }
    }
}

/// `trellis.io/max-h2-connections-per-peer` and
/// `trellis.io/max-h2-connections` set the sidecar's HTTP/2 connection
/// limits for the workload, over the injection settings' (the chart's
/// `injection.proxy.maxH2ConnectionsPerPeer` and `maxH2Connections`); a
/// limit at the sidecar's default gets no variable. Real AdmissionReview
/// documents (fixtures/k8s) as the API server sends them; no Kubernetes
/// API server can run here.
#[test]
fn the_h2_connection_limits_reach_the_sidecar() {
    let review = fixture("pod-deployment-http-probes.json");
    let proxy_env = |annotations: &[(&str, &str)], config: &InjectConfig| {
        let mut pod = review["request"]["object"].clone();
        for (key, value) in annotations {
            pod["metadata"]["annotations"][*key] = json!(value);
        }
        let reply = answer(
            &with_object(&review, pod.clone()),
            NamespaceScope::SelectedByWebhook,
            config,
        );
        assert_eq!(reply["response"]["allowed"], true, "{reply}");
        let pod = apply(&pod, &patch_of(&reply).expect("a patch"));
        let env = env(container(&pod, "initContainers", "trellis-proxy"));
        (
            env.get("TRELLIS_MAX_H2_CONNECTIONS_PER_PEER").cloned(),
            env.get("TRELLIS_MAX_H2_CONNECTIONS").cloned(),
        )
    };
    let per_peer = "trellis.io/max-h2-connections-per-peer";
    let total = "trellis.io/max-h2-connections";
    let default = config();
    assert_eq!(proxy_env(&[], &default), (None, None));
    assert_eq!(
        proxy_env(&[(per_peer, "8"), (total, "1024")], &default),
        (None, None),
        "the sidecar's defaults"
    );
    assert_eq!(
        proxy_env(&[(per_peer, "64")], &default),
        (Some(json!("64")), None)
    );
    assert_eq!(
        proxy_env(&[(total, "256")], &default),
        (None, Some(json!("256")))
    );

    // The chart's values, which a pod's annotations override, back to the
    // sidecar's defaults too.
    let chart = InjectConfig::from_settings(
        r#"{"maxH2ConnectionsPerPeer": 32, "maxH2Connections": 512}"#,
        "cluster.local".parse().unwrap(),
        BUNDLE.into(),
    )
    .unwrap();
    assert_eq!(
        proxy_env(&[], &chart),
        (Some(json!("32")), Some(json!("512")))
    );
    assert_eq!(
        proxy_env(&[(per_peer, "128")], &chart),
        (Some(json!("128")), Some(json!("512")))
    );
    assert_eq!(
        proxy_env(&[(per_peer, "8"), (total, "1024")], &chart),
        (None, None)
    );
}

/// An HTTP/2 connection limit the sidecar would refuse is refused with an
/// AdmissionReview error naming the annotation and what it may be,
/// whatever the failure policy: the sidecar would never start.
/// Real AdmissionReview documents (fixtures/k8s); no API server here.
#[test]
fn an_invalid_h2_connection_limit_annotation_is_refused() {
    let review = fixture("pod-deployment-http-probes.json");
    for (key, value, allowed) in [
        ("trellis.io/max-h2-connections-per-peer", "0", "1 to 1024"),
        (
            "trellis.io/max-h2-connections-per-peer",
            "4096",
            "1 to 1024",
        ),
        (
            "trellis.io/max-h2-connections-per-peer",
            "lots",
            "1 to 1024",
        ),
        ("trellis.io/max-h2-connections", "-1", "1 to 65536"),
        ("trellis.io/max-h2-connections", "100000", "1 to 65536"),
        ("trellis.io/max-h2-connections", "1k", "1 to 65536"),
    ] {
        let mut pod = review["request"]["object"].clone();
        pod["metadata"]["annotations"][key] = json!(value);
        let review = with_object(&review, pod);
        for message in denials(&review, &format!("{key}: {value}")) {
            assert_eq!(
                message,
                format!(
                    "trellis: cannot inject: metadata.annotations[{key}]: {value:?} is not a \
                     number of connections from {allowed}"
                )
            );
        }
    }
}

/// `trellis.io/opaque-ports` becomes the sidecar's `TRELLIS_OPAQUE_PORTS`,
/// a port name resolved to the number a container of the pod gives it (an
/// app container's, or a native sidecar's); a pod without the annotation
/// gets no variable, and injecting the injected pod again changes nothing.
/// Real AdmissionReview documents (fixtures/k8s) as the API server sends
/// them; no Kubernetes API server can run here.
#[test]
fn the_opaque_ports_annotation_reaches_the_sidecar() {
    let opaque_ports = |fixture_name: &str, value: Option<&str>| {
        let review = fixture(fixture_name);
        let mut pod = review["request"]["object"].clone();
        // The app also serves MySQL, on a port it names.
        pod["spec"]["containers"][0]["ports"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "mysql", "containerPort": 3306, "protocol": "TCP"}));
        if let Some(value) = value {
            pod["metadata"]["annotations"]["trellis.io/opaque-ports"] = json!(value);
        }
        let review = with_object(&review, pod);
        let injected = injected(&review);
        let again = answer_for(&with_object(&review, injected.clone()));
        assert!(patch_of(&again).is_none(), "injected twice: {again}");
        env(container(&injected, "initContainers", "trellis-proxy"))
            .get("TRELLIS_OPAQUE_PORTS")
            .cloned()
    };
    let deployment = "pod-deployment-http-probes.json";
    assert_eq!(opaque_ports(deployment, None), None);
    assert_eq!(
        opaque_ports(deployment, Some("mysql, 25,3306")),
        Some(json!("3306,25"))
    );
    // The port the pod's own native sidecar names.
    assert_eq!(
        opaque_ports("pod-native-sidecar-probes.json", Some("health")),
        Some(json!("9090"))
    );
}

/// A port the sidecar would refuse (0, out of range, a range), or a name
/// no container of the pod gives a port, is refused with an
/// AdmissionReview error naming the annotation, whatever the failure
/// policy: the sidecar would never start, or the port would be inspected.
/// Real AdmissionReview documents (fixtures/k8s); no API server here.
#[test]
fn an_invalid_opaque_ports_annotation_is_refused() {
    let review = fixture("pod-deployment-http-probes.json");
    for (value, says) in [
        ("5432,0", "\"0\" is not a port (1-65535)"),
        ("65536", "\"65536\" is not a port (1-65535)"),
        (
            "3306-3310",
            "\"3306-3310\" is not a port (1-65535): ranges are not taken, list each port",
        ),
        (
            "mysql",
            "\"mysql\" is neither a port (1-65535) nor the name of a TCP port a container of \
             the pod declares",
        ),
    ] {
        let mut pod = review["request"]["object"].clone();
        pod["metadata"]["annotations"]["trellis.io/opaque-ports"] = json!(value);
        let review = with_object(&review, pod);
        for message in denials(&review, value) {
            assert_eq!(
                message,
                format!(
                    "trellis: cannot inject: metadata.annotations[trellis.io/opaque-ports]: {says}"
                ),
                "{value}"
            );
        }
    }
}

/// A value of `trellis.io/inject` on a pod that is neither `enabled` nor
/// `disabled` (a typo: `true`, `Enabled`, or `false` meant as an opt-out)
/// is an error, never a guess: where it decides (the annotation, or the
/// label of a pod without one), the pod is denied naming the field and the
/// value, whatever the failure policy, as an invalid `trellis.io/*`
/// annotation is; admitted, its author would get a sidecar, or none,
/// unasked. A mistyped label the annotation overrides decides nothing and
/// is warned of, once: a re-invocation for the injected pod says nothing
/// again. A mistyped namespace label leaves the namespace not opted in,
/// with a warning.
/// Real AdmissionReview documents (fixtures/k8s) as the API server sends them; no
/// Kubernetes API server can run here.
#[test]
fn an_unknown_inject_value_on_the_pod_is_denied() {
    let review = fixture("pod-deployment-http-probes.json");
    let with = |field: &str, value: &str| {
        let mut pod = review["request"]["object"].clone();
        pod["metadata"][field]["trellis.io/inject"] = json!(value);
        pod
    };
    let warnings = |reply: &serde_json::Value| -> Vec<String> {
        reply["response"]["warnings"]
            .as_array()
            .map(|w| w.iter().map(|w| w.as_str().unwrap().to_owned()).collect())
            .unwrap_or_default()
    };
    let assert_denied = |reply: &serde_json::Value, field: &str, value: &str| {
        assert_eq!(reply["response"]["allowed"], false, "{reply}");
        assert_eq!(reply["response"]["status"]["code"], 403, "{reply}");
        assert_eq!(
            reply["response"]["status"]["message"],
            format!(
                "trellis: cannot inject: metadata.{field}[trellis.io/inject]: expected \"enabled\" \
                 or \"disabled\", got {value:?}"
            ),
            "{reply}"
        );
        assert!(patch_of(reply).is_none(), "{reply}");
    };

    // In a namespace that opted in (the webhook was called), under either
    // failure policy.
    for (field, value) in [
        ("annotations", "yes"),
        ("labels", "true"),
        ("labels", "Enabled"),
        ("labels", "false"),
    ] {
        for failure_policy in [FailurePolicy::Ignore, FailurePolicy::Fail] {
            let config = InjectConfig {
                failure_policy,
                ..config()
            };
            let reply = answer(
                &with_object(&review, with(field, value)),
                NamespaceScope::SelectedByWebhook,
                &config,
            );
            assert_denied(&reply, field, value);
        }
    }
    // The annotation decides first, even over a label that opts out.
    let mut pod = with("annotations", "off");
    pod["metadata"]["labels"]["trellis.io/inject"] = json!("disabled");
    assert_denied(
        &answer_for(&with_object(&review, pod)),
        "annotations",
        "off",
    );
    // Where the namespace's labels are known, one that did not opt in.
    let plain = labels(&[("kubernetes.io/metadata.name", "legacy")]);
    let reply = answer(
        &with_object(&review, with("labels", "true")),
        NamespaceScope::Labels(&plain),
        &config(),
    );
    assert_denied(&reply, "labels", "true");

    // A mistyped label under an annotation that decides: warned of.
    for (annotation, outcome) in [
        ("enabled", "the pod is injected"),
        (
            "disabled",
            "the pod runs without a sidecar, outside the mesh",
        ),
    ] {
        let mut pod = with("labels", "true");
        pod["metadata"]["annotations"]["trellis.io/inject"] = json!(annotation);
        let reply = answer_for(&with_object(&review, pod.clone()));
        assert_eq!(reply["response"]["allowed"], true, "{reply}");
        assert_eq!(
            warnings(&reply)[0],
            format!(
                "trellis: metadata.labels[trellis.io/inject] is \"true\", neither \"enabled\" \
                 nor \"disabled\": ignored, so {outcome}"
            )
        );
        match patch_of(&reply) {
            Some(patch) => {
                assert_eq!(annotation, "enabled");
                let patched = apply(&pod, &patch);
                assert_eq!(
                    names(&patched["spec"]["initContainers"]),
                    ["trellis-init", "trellis-proxy", "wait-for-db"]
                );
                let again = answer_for(&with_object(&review, patched));
                assert!(patch_of(&again).is_none(), "{again}");
                assert!(warnings(&again).is_empty(), "told once: {again}");
            }
            None => assert_eq!(annotation, "disabled"),
        }
    }

    // A mistyped namespace is named, and its pods left alone.
    let mistyped = labels(&[("trellis.io/inject", "enable")]);
    let reply = answer(&review, NamespaceScope::Labels(&mistyped), &config());
    assert_eq!(reply["response"]["allowed"], true, "{reply}");
    assert!(patch_of(&reply).is_none(), "{reply}");
    assert_eq!(
        warnings(&reply),
        [
            "trellis: the namespace's label trellis.io/inject is \"enable\", neither \"enabled\" \
          nor \"disabled\": pods here are not injected; this one runs without a sidecar, outside \
          the mesh"
        ]
    );
}

/// The answers to `review` under each failure policy (an invalid
/// annotation denies whatever it is), each a 403 denial without a patch;
/// their messages. `what` names the case in a failed assertion.
fn denials(review: &serde_json::Value, what: &str) -> Vec<String> {
    [FailurePolicy::Ignore, FailurePolicy::Fail]
        .into_iter()
        .map(|failure_policy| {
            let config = InjectConfig {
                failure_policy,
                ..config()
            };
            let denied = answer(review, NamespaceScope::SelectedByWebhook, &config);
            assert_eq!(
                denied["response"]["allowed"], false,
                "{what} ({failure_policy:?})"
            );
            assert_eq!(denied["response"]["status"]["code"], 403, "{what}");
            assert!(patch_of(&denied).is_none(), "{what}");
            let message = denied["response"]["status"]["message"].as_str();
            message.expect("a denial's message").to_owned()
        })
        .collect()
}
