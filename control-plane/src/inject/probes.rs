//! Kubelet probes under strict mTLS: rewriting the app's network probes to
//! the sidecar's admin port.
//!
//! The kubelet probes a container from outside the pod network namespace,
//! without a client certificate. With every inbound port redirected to the
//! sidecar's mTLS listener, an `httpGet` probe would fail the TLS handshake,
//! and a `tcpSocket` probe would always pass (the sidecar accepts the TCP
//! connection itself, whatever the app's state). We do not exclude probe
//! ports from interception instead: that would open the app's port to
//! plaintext from anyone in the cluster, for every path, which strict mTLS
//! exists to prevent.
//!
//! So each `httpGet`, `tcpSocket` and `grpc` probe of an app container, and
//! of each of the pod's own native sidecars (init containers with
//! `restartPolicy: Always`, e.g. a database proxy, probed on the pod IP like
//! the app), becomes an `httpGet` on the sidecar's admin port (excluded from
//! interception by `trellis-proxy init`), path
//! `/app-health/<container>/<liveness|readiness|startup>`. The original
//! check is handed to the sidecar in `TRELLIS_APP_PROBES`, a JSON object from
//! that path to `{"httpGet": {port, path, scheme, httpHeaders}}`,
//! `{"tcpSocket": {port}}` or `{"grpc": {port, service}}` with named ports
//! resolved to numbers; the sidecar runs it against the app at the pod IP,
//! where the kubelet reached the admin port (the sidecar's own connections
//! are never intercepted), and answers 200 when it passes. Timing fields
//! (`periodSeconds`, `timeoutSeconds`, thresholds) stay as they were.
//!
//! A container's `lifecycle.postStart` and `lifecycle.preStop` hooks that
//! are `httpGet` (the kubelet calls them on the pod IP as well) go the same
//! way, path `/app-health/<container>/<post-start|pre-stop>`: the sidecar
//! makes the call to the app, as the kubelet would have (within the 10 s it
//! gives any check). A hook makes the app act (drain, deregister) and
//! every pod of the cluster reaches the admin port, so the rewritten hook
//! carries the pod's hook token in the [`HOOK_TOKEN_HEADER`] header, the
//! same token the sidecar gets in `TRELLIS_HOOK_TOKEN`; the sidecar runs a
//! hook only for a request carrying it.
//!
//! Left alone: `exec` probes (they run inside the container), probes with an
//! explicit `host` (they target another machine), and probes whose named port
//! the container does not declare (the kubelet would fail them already; a
//! warning says so). So is a probe or hook that already calls the sidecar's
//! `/app-health/` on the admin port (an earlier injection's, its containers
//! removed and the pod injected again): taken as the app's check, it would
//! have the sidecar call itself. The app's own check is not known, so a
//! warning says that it fails until it is put back. Such a hook still
//! carries the earlier injection's token, which the new sidecar does not
//! know: its [`HOOK_TOKEN_HEADER`] gets the new token, and it counts as a
//! rewritten hook, so the new sidecar gets the same token and keeps
//! refusing hook calls without it. Such a probe carries no token and is
//! left exactly as it is.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};
use trellis_core::app_health::{HOOK_TOKEN_HEADER, PATH_PREFIX, POST_START, PRE_STOP};

/// The probe fields of a container, and the path segment each becomes.
pub const PROBE_KINDS: [(&str, &str); 3] = [
    ("livenessProbe", "liveness"),
    ("readinessProbe", "readiness"),
    ("startupProbe", "startup"),
];

/// The lifecycle hooks of a container whose `httpGet` is rewritten like a
/// probe's, and the path segment each becomes.
pub const HOOK_KINDS: [(&str, &str); 2] = [("postStart", POST_START), ("preStop", PRE_STOP)];

/// The admin path the rewritten probe of `container` calls.
pub fn app_health_path(container: &str, kind: &str) -> String {
    format!("{PATH_PREFIX}{container}/{kind}")
}

/// The container an admin path under `/app-health/` is of
/// (`/app-health/<container>/<kind>`); `None` for a path not of that shape.
pub fn container_of(path: &str) -> Option<&str> {
    let (container, _kind) = path.strip_prefix(PATH_PREFIX)?.split_once('/')?;
    Some(container)
}

/// What rewriting the probes of a pod's containers gave.
#[derive(Debug, Default)]
pub struct Rewritten {
    /// Admin path -> the original check, for `TRELLIS_APP_PROBES`.
    pub probes: BTreeMap<String, Value>,
    /// How many lifecycle hooks carry the hook token: rewritten now, or
    /// rewritten by an earlier injection and given the new token.
    pub hooks: usize,
    pub warnings: Vec<String>,
}

/// Rewrites the network probes of every container in `containers` (the
/// pod's `spec.containers` and its own native sidecars) to `admin_port`.
/// Container names are unique across a pod's containers and init
/// containers, so every path names one probe. Each rewritten lifecycle
/// hook sends `hook_token` in [`HOOK_TOKEN_HEADER`].
pub fn rewrite<'a>(
    containers: impl IntoIterator<Item = &'a mut Value>,
    admin_port: u16,
    hook_token: &str,
) -> Rewritten {
    rewrite_beside(containers, admin_port, hook_token, |_| false)
}

/// [`rewrite`], for a pod whose sidecar already runs checks: a probe or hook
/// that calls an admin path `served` says the sidecar knows is left as it
/// is without a warning (an injection rewrote it, and a later webhook
/// changed something else of its container), as a hook carrying the pod's
/// token.
pub fn rewrite_beside<'a>(
    containers: impl IntoIterator<Item = &'a mut Value>,
    admin_port: u16,
    hook_token: &str,
    served: impl Fn(&str) -> bool,
) -> Rewritten {
    let mut out = Rewritten::default();
    for container in containers {
        let Some(container) = container.as_object_mut() else {
            continue;
        };
        let name = container
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let ports = container.get("ports").cloned().unwrap_or(Value::Null);
        for (field, kind) in PROBE_KINDS {
            let Some(probe) = container.get_mut(field).and_then(Value::as_object_mut) else {
                continue;
            };
            if let Some(path) = admin_path(probe, admin_port) {
                if !served(path) {
                    out.warnings.push(already_ours(&name, field, path));
                }
                continue;
            }
            match original_check(probe, &ports) {
                Ok(Some(check)) => {
                    let path = app_health_path(&name, kind);
                    for handler in ["httpGet", "tcpSocket", "grpc"] {
                        probe.remove(handler);
                    }
                    probe.insert(
                        "httpGet".into(),
                        json!({"path": path, "port": admin_port, "scheme": "HTTP"}),
                    );
                    out.probes.insert(path, check);
                }
                Ok(None) => {}
                Err(why) => out.warnings.push(format!(
                    "container {name:?} {field} is not rewritten for the sidecar ({why}); \
                     it will fail under strict mTLS"
                )),
            }
        }
        // The kubelet calls an `httpGet` hook on the pod IP too: the sidecar
        // would answer it in the app's place, and the app never see it (a
        // preStop that asks the app to drain). It goes through the admin
        // port the same way; the kubelet reads no answer of a hook.
        for (hook, kind) in HOOK_KINDS {
            let Some(handler) = container
                .get_mut("lifecycle")
                .and_then(Value::as_object_mut)
                .and_then(|lifecycle| lifecycle.get_mut(hook))
                .and_then(Value::as_object_mut)
                .filter(|handler| handler.contains_key("httpGet"))
            else {
                continue;
            };
            // An earlier injection's hook carries that injection's token,
            // which this pod's new sidecar does not know: it gets this
            // one's, and the sidecar the same, or the two would disagree.
            if let Some(path) = admin_path(handler, admin_port) {
                if !served(path) {
                    out.warnings.push(hook_already_ours(&name, hook, path));
                }
                set_hook_token(handler, hook_token);
                out.hooks += 1;
                continue;
            }
            match original_check(handler, &ports) {
                Ok(Some(check)) => {
                    let path = app_health_path(&name, kind);
                    handler.insert(
                        "httpGet".into(),
                        json!({
                            "path": path, "port": admin_port, "scheme": "HTTP",
                            "httpHeaders": [{"name": HOOK_TOKEN_HEADER, "value": hook_token}],
                        }),
                    );
                    out.probes.insert(path, check);
                    out.hooks += 1;
                }
                Ok(None) => {}
                Err(why) => out.warnings.push(format!(
                    "container {name:?} lifecycle.{hook} is not rewritten for the sidecar \
                     ({why}); the app will not receive it under strict mTLS"
                )),
            }
        }
    }
    out
}

/// Whether a probe or lifecycle hook of `container` already calls the
/// sidecar's `/app-health/` on `admin_port`: an injection rewrote it.
pub fn calls_sidecar(container: &Value, admin_port: u16) -> bool {
    sidecar_paths(container, admin_port).next().is_some()
}

/// The admin paths under `/app-health/` on `admin_port` that the probes and
/// lifecycle hooks of `container` call.
pub fn sidecar_paths(container: &Value, admin_port: u16) -> impl Iterator<Item = &str> {
    let probes = PROBE_KINDS
        .iter()
        .filter_map(|(field, _)| container.get(field));
    let hooks = HOOK_KINDS
        .iter()
        .filter_map(|(hook, _)| container.get("lifecycle")?.get(hook));
    probes
        .chain(hooks)
        .filter_map(Value::as_object)
        .filter_map(move |handler| admin_path(handler, admin_port))
}

/// Whether [`rewrite`] would turn a probe or lifecycle hook of `container`
/// into a call of the sidecar: an `httpGet`, `tcpSocket` or `grpc` probe, or
/// an `httpGet` hook, that checks the app itself (no other host, its port
/// known) and does not call the sidecar yet. An injected container has none
/// left; one that has was put in the pod since, if under a name seen before.
pub fn has_app_check(container: &Value, admin_port: u16) -> bool {
    let ports = container.get("ports").unwrap_or(&Value::Null);
    let probes = PROBE_KINDS
        .iter()
        .filter_map(|(field, _)| container.get(field));
    let hooks = HOOK_KINDS
        .iter()
        .filter_map(|(hook, _)| container.get("lifecycle")?.get(hook))
        .filter(|handler| handler.get("httpGet").is_some());
    probes
        .chain(hooks)
        .filter_map(Value::as_object)
        .any(|handler| {
            admin_path(handler, admin_port).is_none()
                && matches!(original_check(handler, ports), Ok(Some(_)))
        })
}

/// The admin path `handler` calls when it is already one of ours: an
/// `httpGet` on `admin_port` under `/app-health/`, as an earlier injection
/// rewrote it (its containers since removed, the pod injected again). Taken
/// as the app's own check, it would have the sidecar probe itself.
fn admin_path(handler: &Map<String, Value>, admin_port: u16) -> Option<&str> {
    let http = handler.get("httpGet").and_then(Value::as_object)?;
    let path = http.get("path").and_then(Value::as_str)?;
    let port = http.get("port").and_then(Value::as_u64)?;
    (!has_host(http) && port == u64::from(admin_port) && path.starts_with(PATH_PREFIX))
        .then_some(path)
}

/// The warning for a probe or hook of `container` (its `field`) that
/// already calls the sidecar's `path`.
fn already_ours(container: &str, field: &str, path: &str) -> String {
    format!(
        "container {container:?} {field} already calls the sidecar's {path:?}, from an \
         earlier injection; the app's own check is not known, so it is left as it is and \
         fails until the container's own check is put back"
    )
}

/// The warning for a lifecycle `hook` of `container` that already calls
/// the sidecar's `path`: given the new token, it still fails (the sidecar
/// knows no app hook at `path`).
fn hook_already_ours(container: &str, hook: &str, path: &str) -> String {
    format!(
        "container {container:?} lifecycle.{hook} already calls the sidecar's {path:?}, from \
         an earlier injection; the app's own hook is not known, so it is left as it is but for \
         the pod's new hook token, and fails until the container's own hook is put back"
    )
}

/// Puts `token` in the [`HOOK_TOKEN_HEADER`] header of an `httpGet`
/// handler, in place of any value it had; its other headers stay.
fn set_hook_token(handler: &mut Map<String, Value>, token: &str) {
    let Some(http) = handler.get_mut("httpGet").and_then(Value::as_object_mut) else {
        return;
    };
    let mut headers = http
        .get("httpHeaders")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    headers.retain(|header| {
        !header
            .get("name")
            .and_then(Value::as_str)
            .is_some_and(|name| name.eq_ignore_ascii_case(HOOK_TOKEN_HEADER))
    });
    headers.push(json!({"name": HOOK_TOKEN_HEADER, "value": token}));
    http.insert("httpHeaders".into(), Value::Array(headers));
}

/// The check a probe makes, with its port resolved, or `None` when the probe
/// is left as it is.
fn original_check(probe: &Map<String, Value>, ports: &Value) -> Result<Option<Value>, String> {
    if let Some(http) = probe.get("httpGet").and_then(Value::as_object) {
        if has_host(http) {
            return Ok(None);
        }
        let mut check = Map::new();
        check.insert("port".into(), json!(resolve_port(http.get("port"), ports)?));
        check.insert(
            "path".into(),
            http.get("path").cloned().unwrap_or_else(|| json!("/")),
        );
        check.insert(
            "scheme".into(),
            http.get("scheme").cloned().unwrap_or_else(|| json!("HTTP")),
        );
        if let Some(headers) = http.get("httpHeaders").filter(|h| !h.is_null()) {
            check.insert("httpHeaders".into(), headers.clone());
        }
        return Ok(Some(json!({"httpGet": check})));
    }
    if let Some(tcp) = probe.get("tcpSocket").and_then(Value::as_object) {
        if has_host(tcp) {
            return Ok(None);
        }
        let port = resolve_port(tcp.get("port"), ports)?;
        return Ok(Some(json!({"tcpSocket": {"port": port}})));
    }
    if let Some(grpc) = probe.get("grpc").and_then(Value::as_object) {
        let port = resolve_port(grpc.get("port"), ports)?;
        let mut check = json!({"port": port});
        if let Some(service) = grpc.get("service").filter(|s| !s.is_null()) {
            check["service"] = service.clone();
        }
        return Ok(Some(json!({"grpc": check})));
    }
    Ok(None)
}

fn has_host(handler: &Map<String, Value>) -> bool {
    handler
        .get("host")
        .and_then(Value::as_str)
        .is_some_and(|h| !h.is_empty())
}

/// A probe port: a number, or the name of one of the container's ports.
fn resolve_port(port: Option<&Value>, ports: &Value) -> Result<u16, String> {
    match port {
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("port {n} is out of range")),
        Some(Value::String(name)) => {
            if let Ok(n) = name.parse::<u16>() {
                return Ok(n);
            }
            ports
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p.get("name").and_then(Value::as_str) == Some(name))
                .and_then(|p| p.get("containerPort").and_then(Value::as_u64))
                .and_then(|n| u16::try_from(n).ok())
                .ok_or_else(|| format!("the container declares no port named {name:?}"))
        }
        _ => Err("it has no port".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_named_ports() {
        let ports = json!([{"name": "http", "containerPort": 8080}]);
        assert_eq!(resolve_port(Some(&json!("http")), &ports), Ok(8080));
        assert_eq!(resolve_port(Some(&json!(9090)), &ports), Ok(9090));
        assert!(resolve_port(Some(&json!("metrics")), &ports).is_err());
    }

    #[test]
    fn leaves_exec_and_host_probes_alone() {
        let mut containers = vec![json!({
            "name": "app",
            "livenessProbe": {"exec": {"command": ["true"]}},
            "readinessProbe": {"httpGet": {"host": "example.com", "port": 80}},
        })];
        let before = containers.clone();
        let out = rewrite(&mut containers, 15020, "t0ken");
        assert_eq!(containers, before);
        assert!(out.probes.is_empty() && out.warnings.is_empty());
    }

    /// An `httpGet` lifecycle hook reaches the app through the admin port,
    /// as a probe does; other hooks and those naming a host stay.
    #[test]
    fn rewrites_http_lifecycle_hooks() {
        let mut containers = vec![json!({
            "name": "web",
            "ports": [{"name": "http", "containerPort": 8080}],
            "lifecycle": {
                "preStop": {"httpGet": {"path": "/drain", "port": "http"}},
                "postStart": {"exec": {"command": ["true"]}},
            },
        })];
        let out = rewrite(&mut containers, 15020, "t0ken");
        assert_eq!(
            containers[0]["lifecycle"],
            json!({
                "preStop": {"httpGet": {"path": "/app-health/web/pre-stop", "port": 15020, "scheme": "HTTP",
                    "httpHeaders": [{"name": "x-trellis-hook-token", "value": "t0ken"}]}},
                "postStart": {"exec": {"command": ["true"]}},
            })
        );
        assert_eq!(out.hooks, 1);
        assert_eq!(
            out.probes["/app-health/web/pre-stop"],
            json!({"httpGet": {"port": 8080, "path": "/drain", "scheme": "HTTP"}})
        );
        assert!(out.warnings.is_empty());

        let mut elsewhere = vec![json!({
            "name": "web",
            "lifecycle": {"postStart": {"httpGet": {"host": "10.0.0.9", "port": 80}}},
        })];
        let before = elsewhere.clone();
        assert!(rewrite(&mut elsewhere, 15020, "t0ken").probes.is_empty());
        assert_eq!(elsewhere, before);
    }

    /// A hook an earlier injection rewrote gets the new token in place of
    /// its old one (whatever the case of the header's name), keeps its
    /// other headers, and counts as carrying the token; the sidecar is
    /// told of no app check for it.
    #[test]
    fn an_earlier_injections_hook_gets_the_new_token() {
        let mut containers = vec![json!({
            "name": "web",
            "lifecycle": {"preStop": {"httpGet": {
                "path": "/app-health/web/pre-stop", "port": 15020, "scheme": "HTTP",
                "httpHeaders": [
                    {"name": "X-Trellis-Hook-Token", "value": "old"},
                    {"name": "x-team", "value": "shop"},
                ],
            }}},
        })];
        let out = rewrite(&mut containers, 15020, "new");
        assert_eq!(
            containers[0]["lifecycle"]["preStop"]["httpGet"]["httpHeaders"],
            json!([
                {"name": "x-team", "value": "shop"},
                {"name": "x-trellis-hook-token", "value": "new"},
            ])
        );
        assert_eq!(out.hooks, 1);
        assert!(out.probes.is_empty());
        assert_eq!(out.warnings.len(), 1);
    }

    #[test]
    fn rewrites_tcp_and_grpc_probes() {
        let mut containers = vec![json!({
            "name": "db",
            "livenessProbe": {"tcpSocket": {"port": 5432}, "periodSeconds": 7},
            "readinessProbe": {"grpc": {"port": 9000, "service": "health"}},
        })];
        let out = rewrite(&mut containers, 15020, "t0ken");
        assert_eq!(
            containers[0]["livenessProbe"],
            json!({"httpGet": {"path": "/app-health/db/liveness", "port": 15020, "scheme": "HTTP"},
                   "periodSeconds": 7})
        );
        assert_eq!(
            out.probes["/app-health/db/readiness"],
            json!({"grpc": {"port": 9000, "service": "health"}})
        );
        assert_eq!(
            out.probes["/app-health/db/liveness"],
            json!({"tcpSocket": {"port": 5432}})
        );
    }
}
