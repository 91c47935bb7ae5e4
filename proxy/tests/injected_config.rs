//! The environment the injector gives the sidecar container is a valid
//! sidecar configuration: in a dual-stack pod the sidecar listens on both
//! IP families and advertises every pod IP. The environment is taken from
//! the injector's own output, with the downward API values a kubelet would
//! fill in, so the two cannot drift.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use clap::Parser;
use common::injector::{sidecar_env, sidecar_env_with};
use serde_json::{Value, json};
use trellis_proxy::config::{Cli, Config, DEFAULT_INBOUND, DEFAULT_OUTBOUND};

/// What the kubelet makes of `env` in a pod with `pod_ips`: downward API
/// fields filled in, `$(VAR)` expanded from earlier variables.
fn kubelet_env(env: &[(String, Value)], pod_ips: &str) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in env {
        let value = match value {
            Value::String(s) => {
                let mut s = s.clone();
                for (earlier, v) in &out {
                    s = s.replace(&format!("$({earlier})"), v);
                }
                s
            }
            field => match field["fieldRef"]["fieldPath"].as_str().unwrap() {
                "metadata.name" => "web-1".into(),
                "metadata.namespace" => "default".into(),
                "spec.serviceAccountName" => "web".into(),
                "status.podIP" => pod_ips.split(',').next().unwrap().into(),
                "status.podIPs" => pod_ips.into(),
                other => panic!("no downward API value for {other}"),
            },
        };
        out.insert(name.clone(), value);
    }
    out
}

/// The sidecar's configuration from `env`, each `TRELLIS_<FLAG>` given as
/// its flag. The files in the pod's identity volume do not exist here, and
/// the pod-description variables are not flags.
fn config_from(env: &BTreeMap<String, String>) -> Config {
    let mut argv = vec!["trellis-proxy".to_string()];
    for (name, value) in env {
        let not_flags = [
            "TRELLIS_POD_NAME",
            "TRELLIS_POD_NAMESPACE",
            "TRELLIS_SERVICE_ACCOUNT",
            "TRELLIS_POD_IP",
            "TRELLIS_POD_IPS",
            "TRELLIS_TOKEN_FILE",
            "TRELLIS_TRUST_BUNDLE",
        ];
        if not_flags.contains(&name.as_str()) {
            continue;
        }
        let flag = name
            .strip_prefix("TRELLIS_")
            .unwrap()
            .to_ascii_lowercase()
            .replace('_', "-");
        argv.push(format!("--{flag}"));
        argv.push(value.clone());
    }
    // Files of the test's own in place of the identity volume's.
    argv.extend(common::sidecar::credential_flags().map(str::to_owned));
    let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    Config::from_args(&cli.proxy).unwrap_or_else(|e| panic!("{argv:?}: {e}"))
}

#[test]
fn an_injected_dual_stack_sidecar_listens_on_both_families_and_advertises_every_pod_ip() {
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web-1", "namespace": "default"},
        "spec": {
            "serviceAccountName": "web",
            "containers": [{
                "name": "web",
                "image": "web",
                "readinessProbe": {"httpGet": {"port": 8080, "path": "/ready"}},
            }],
        },
    });
    let env = sidecar_env(&pod);

    let config = config_from(&kubelet_env(&env, "10.0.0.7,fd00:10::7"));
    assert_eq!(
        config.identity.as_str(),
        "spiffe://cluster.local/ns/default/sa/web"
    );
    assert_eq!(config.inbound, DEFAULT_INBOUND);
    assert_eq!(config.outbound, DEFAULT_OUTBOUND);
    let advertised: Vec<String> = config
        .advertise_addresses
        .iter()
        .map(|a| a.to_string())
        .collect();
    assert_eq!(advertised, ["10.0.0.7:15006", "[fd00:10::7]:15006"]);
    assert!(config.app_probes.get("/app-health/web/readiness").is_some());

    // A single-stack pod has one address.
    let config = config_from(&kubelet_env(&env, "10.0.0.7"));
    assert_eq!(config.advertise_addresses.len(), 1);
}

/// The pod's `trellis.io/opaque-ports`, its port names resolved by the
/// injector, are the injected sidecar's own opaque ports.
#[test]
fn an_injected_sidecar_holds_the_pods_opaque_ports_opaque() {
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "db-0",
            "namespace": "default",
            "annotations": {"trellis.io/opaque-ports": "mysql,25"},
        },
        "spec": {
            "serviceAccountName": "db",
            "containers": [{
                "name": "db",
                "image": "mysql",
                "ports": [{"name": "mysql", "containerPort": 3306}],
            }],
        },
    });
    let config = config_from(&kubelet_env(&sidecar_env(&pod), "10.0.0.7"));
    assert_eq!(config.opaque_ports, [3306, 25]);
}

/// The pod's `trellis.io/tcp-user-timeout`, as the injector writes it into
/// the sidecar's environment, is the injected sidecar's own user timeout,
/// whichever way a duration the annotation takes is written.
#[test]
fn an_injected_sidecar_holds_the_pods_tcp_user_timeout() {
    for (annotation, expected) in [
        ("90s", Some(Duration::from_secs(90))),
        ("1m30s", Some(Duration::from_secs(90))),
        ("1m 30s", Some(Duration::from_secs(90))),
        ("90500ms", Some(Duration::from_millis(90_500))),
        ("10m", Some(Duration::from_secs(600))),
        ("1h", Some(Duration::from_secs(3600))),
        ("2m", Some(Duration::from_secs(120))),
        ("0", None),
    ] {
        let pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "db-0",
                "namespace": "default",
                "annotations": {"trellis.io/tcp-user-timeout": annotation},
            },
            "spec": {
                "serviceAccountName": "db",
                "containers": [{"name": "db", "image": "mysql"}],
            },
        });
        let config = config_from(&kubelet_env(&sidecar_env(&pod), "10.0.0.7"));
        assert_eq!(config.tcp_user_timeout, expected, "{annotation}");
    }
}

/// Each log format the injector's settings take reaches the sidecar as
/// one its `--log-format` takes, the same format.
#[test]
fn an_injected_sidecar_logs_in_the_settings_log_format() {
    use clap::ValueEnum;
    use trellis_core::logging::Format;
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web-1", "namespace": "default"},
        "spec": {
            "serviceAccountName": "web",
            "containers": [{"name": "web", "image": "nginx"}],
        },
    });
    for format in Format::value_variants() {
        let name = format.to_possible_value().unwrap().get_name().to_owned();
        let settings = format!(r#"{{"logFormat": "{name}"}}"#);
        let td = trellis_core::TrustDomain::new("cluster.local").unwrap();
        let settings =
            trellis_control_plane::inject::InjectConfig::from_settings(&settings, td, "PEM".into())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        let env = kubelet_env(&sidecar_env_with(&pod, settings), "10.0.0.7");
        assert_eq!(env["TRELLIS_LOG_FORMAT"], name);
        assert_eq!(config_from(&env).log_format, *format, "{name}");
    }
}
