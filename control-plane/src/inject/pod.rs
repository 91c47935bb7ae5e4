//! Injecting one Pod: whether to, and the containers, volumes and
//! annotations it gets (the module docs of [`super`] say what and why).
//!
//! The pod is handled as a `serde_json::Value`, never a typed struct, so
//! fields this version does not know survive untouched.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::{IpAddr, SocketAddr};

use serde_json::{Map, Value, json};

use super::annotations::{
    Exclusions, H2Limits, access_log, injected_containers, join, opaque_ports, tcp_user_timeout,
};
use super::probes;
use super::review::PatchOp;
use super::{
    ADMIN_PORT_NAME, IDENTITY_DIR, IDENTITY_VOLUME, INBOUND_PORT_NAME, INIT_CONTAINER, INJECT_KEY,
    INJECTED_ANNOTATION, INJECTED_CONTAINERS_ANNOTATION, InjectConfig, IpFamily,
    MAX_TOKEN_EXPIRATION_SECONDS, MIN_TOKEN_EXPIRATION_SECONDS, NamespaceScope, OutboundPolicy,
    PROXY_CONTAINER, Resources, TOKEN_AUDIENCE, TRUST_BUNDLE_ANNOTATION, TrustBundleSource,
    XTABLES_VOLUME,
};
use trellis_core::app_health::PATH_PREFIX;
use trellis_core::policy::{SIDECAR_INBOUND_PORT, SIDECAR_OUTBOUND_PORT};

const XTABLES_DIR: &str = "/run/trellis-xtables";
/// The sidecar's environment entries with the app's original checks and
/// the pod's hook token.
const TRELLIS_APP_PROBES: &str = "TRELLIS_APP_PROBES";
const TRELLIS_HOOK_TOKEN: &str = "TRELLIS_HOOK_TOKEN";

/// The index at which an entry of rank `rank` (its place among the
/// entries an injection writes, [`env_order`]) joins the sidecar's
/// environment, whose entries have the ranks `env`: right after the last
/// entry an injection writes before it, else before the first it writes
/// after it, else at the end. Entries the injector does not write (a later
/// webhook's, `None`) are passed over.
fn env_place(env: &[Option<usize>], rank: Option<usize>) -> usize {
    let Some(rank) = rank else {
        return env.len();
    };
    match env.iter().rposition(|r| r.is_some_and(|r| r < rank)) {
        Some(before) => before + 1,
        None => env
            .iter()
            .position(|r| r.is_some_and(|r| r > rank))
            .unwrap_or(env.len()),
    }
}

/// The sidecar's environment as an injection of a pod with `annotated`
/// under `config` writes it, with a check and a hook token, so that every
/// entry it may write is there: the order a review of a pod with its
/// sidecar puts an entry it adds in. It is [`proxy_env`]'s own, not a list
/// kept beside it, so an entry added there has its place here.
fn env_order(config: &InjectConfig, annotated: &[(&'static str, Option<String>)]) -> Vec<Value> {
    let check = BTreeMap::from([(String::new(), Value::Null)]);
    proxy_env(config, &check, Some(""), annotated)
}

/// Where the entry `entry` comes in `order` ([`env_order`]); `None` for one
/// the injector does not write.
fn env_rank(order: &[Value], entry: &Value) -> Option<usize> {
    let name = entry.get("name").and_then(Value::as_str)?;
    order
        .iter()
        .position(|known| known.get("name").and_then(Value::as_str) == Some(name))
}

/// Why a pod cannot be injected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InjectError {
    #[error("the webhook only injects Pods, not {0}")]
    NotAPod(String),
    #[error("the review has no object")]
    NoObject,
    #[error("{0} is not an object")]
    Malformed(&'static str),
    #[error(
        "the {PROXY_CONTAINER} container's environment variable {0} has no value as the \
         injector writes it, so the checks of the containers added since injection cannot be \
         added to it"
    )]
    SidecarEnv(&'static str),
    #[error("metadata.annotations[{key}]: {message}")]
    InvalidAnnotation { key: &'static str, message: String },
    #[error("metadata.labels[{INJECT_KEY}]: expected \"enabled\" or \"disabled\", got {0:?}")]
    InvalidLabel(String),
    #[error(
        "the injector has no trust bundle (the control plane has not loaded its CA, or injection.trustBundle is empty)"
    )]
    NoTrustBundle,
    #[error(
        "injection.tokenExpirationSeconds is {0}; Kubernetes requires {MIN_TOKEN_EXPIRATION_SECONDS} to {MAX_TOKEN_EXPIRATION_SECONDS}"
    )]
    TokenExpiration(i64),
    #[error(
        "container {container:?} declares TCP port {port}, the sidecar's {sidecar} port: the \
         sidecar listens there in the same network namespace, so the container could not bind \
         it and its clients would reach the sidecar; give the container another port"
    )]
    PortClash {
        container: String,
        port: u16,
        sidecar: &'static str,
    },
    #[error(
        "container {container:?} declares port {port} named {name:?}, the name of the sidecar's \
         {sidecar} port: whatever finds the sidecar's port by that name (a Service's targetPort, \
         a PodMonitor scraping sidecars) could reach the container instead; give the \
         container's port another name"
    )]
    PortNameClash {
        container: String,
        port: i64,
        name: &'static str,
        sidecar: &'static str,
    },
    #[error(
        "container {container:?} runs as UID {uid} ({set_by}), the sidecar's UID, whose traffic \
         is never intercepted: under the outbound policy deny it would reach destinations the \
         mesh refuses; {remedy}",
        remedy = ProxyUidRemedy { uid: *.uid, injected: *.injected }
    )]
    ProxyUid {
        container: String,
        uid: u32,
        set_by: &'static str,
        /// The pod carries its sidecar already (a reinvocation, or a
        /// manifest copied from an injected pod): that sidecar's UID is
        /// its `trellis-init`'s, which the settings no longer change.
        injected: bool,
    },
    #[error(
        "the pod has the container {INIT_CONTAINER} but not {PROXY_CONTAINER}: its traffic would \
         be redirected to a sidecar that is not there; create it without {INIT_CONTAINER} to have \
         both injected"
    )]
    InitWithoutProxy,
    #[error(
        "the pod has the container {PROXY_CONTAINER} but not {INIT_CONTAINER}: nothing would \
         redirect its traffic to the sidecar, so it would run outside the mesh; create it without \
         {PROXY_CONTAINER} to have both injected"
    )]
    ProxyWithoutInit,
    #[error(
        "the {PROXY_CONTAINER} container's environment variable {name} {problem}, so the port \
         {INIT_CONTAINER} must redirect the pod's traffic to is not known, and {INIT_CONTAINER}'s \
         args do not name it (they are missing, do not start with \"init\", or lack the \
         port's flag); give {INIT_CONTAINER} the args an injection wrote, or {name} as an \
         injection writes it"
    )]
    SidecarAddress { name: &'static str, problem: String },
}

/// What helps a pod refused with [`InjectError::ProxyUid`]: before
/// injection, the container or the sidecar may move; a pod that carries its
/// sidecar keeps that sidecar's UID whatever `injection.proxy.uid` says, so
/// only the container can.
struct ProxyUidRemedy {
    uid: u32,
    injected: bool,
}

impl std::fmt::Display for ProxyUidRemedy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.injected {
            write!(
                f,
                "run it as another UID: the pod carries its sidecar already, which runs as {} \
                 whatever injection.proxy.uid says now",
                self.uid
            )
        } else {
            f.write_str(
                "run it as another UID, or move the sidecar to one no image uses \
                 (injection.proxy.uid)",
            )
        }
    }
}

/// Why a pod was left as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// `trellis.io/inject: disabled` on the pod.
    OptedOut,
    /// Neither the namespace nor the pod opted in.
    NotEnabled,
    /// Injected before: `trellis-proxy` and `trellis-init` are among its
    /// containers (the marker annotation alone is not enough; one without
    /// the other is refused).
    AlreadyInjected,
    /// The pod shares the node's network namespace: iptables there would
    /// redirect the node's traffic, and the sidecar's ports would be the
    /// node's, one sidecar a node. Its author is warned.
    HostNetwork,
    /// The pod runs on Windows (`spec.os.name: windows`, or the node
    /// selector `kubernetes.io/os: windows`). The sidecar and its iptables
    /// init are Linux programs, and the API server refuses a Windows pod
    /// whose containers set Linux security settings (`runAsUser`,
    /// capabilities, seccomp), as both injected containers do.
    Windows,
}

impl Skip {
    /// What the pod's author is told when the pod is admitted without a
    /// sidecar they may have expected.
    pub fn warning(self) -> Option<&'static str> {
        match self {
            Self::Windows => Some(
                "trellis: sidecar not injected: a Windows pod (spec.os.name or the \
                 kubernetes.io/os node selector); the sidecar runs on Linux only, so this pod \
                 runs outside the mesh",
            ),
            Self::HostNetwork => Some(
                "trellis: sidecar not injected: the pod uses the node's network \
                 (spec.hostNetwork); the sidecar's iptables rules would redirect the whole \
                 node's traffic, so this pod runs outside the mesh",
            ),
            Self::OptedOut | Self::NotEnabled | Self::AlreadyInjected => None,
        }
    }
}

/// What [`inject_pod`] decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Injection {
    Injected {
        patch: Vec<PatchOp>,
        warnings: Vec<String>,
    },
    /// Injected before ([`Skip::AlreadyInjected`]), with containers the
    /// injection has not seen (added by a later webhook, the API server
    /// reinvoking this one; or to a manifest copied from an injected pod):
    /// their probes and hooks rewritten as the first injection rewrites
    /// them, and the sidecar told of their checks; or with settings
    /// annotations its sidecar and init do not reflect, which are patched.
    Rewritten {
        patch: Vec<PatchOp>,
        warnings: Vec<String>,
    },
    Skipped(Skip),
}

/// Decides and builds the injection of `pod`.
pub fn inject_pod(
    pod: &Value,
    scope: NamespaceScope<'_>,
    config: &InjectConfig,
) -> Result<Injection, InjectError> {
    let metadata = pod
        .get("metadata")
        .and_then(Value::as_object)
        .ok_or(InjectError::Malformed("metadata"))?;
    let annotations = string_map(metadata.get("annotations"));
    let labels = string_map(metadata.get("labels"));
    let spec = pod
        .get("spec")
        .and_then(Value::as_object)
        .ok_or(InjectError::Malformed("spec"))?;

    match skip_reason(&annotations, &labels, spec, scope)? {
        Some(Skip::AlreadyInjected) => {
            return rewrite_added(metadata, &annotations, spec, config);
        }
        Some(skip) => return Ok(Injection::Skipped(skip)),
        None => {}
    }
    if !(MIN_TOKEN_EXPIRATION_SECONDS..=MAX_TOKEN_EXPIRATION_SECONDS)
        .contains(&config.token_expiration_seconds)
    {
        return Err(InjectError::TokenExpiration(
            config.token_expiration_seconds,
        ));
    }
    let annotated = Annotated::read(&annotations, spec, config)?;
    check_port_clashes(all_containers(spec), config)?;
    check_proxy_uid(proxy_uid_containers(spec, config.proxy_uid), config, false)?;
    if matches!(&config.trust_bundle, TrustBundleSource::Annotation(pem) if pem.trim().is_empty()) {
        return Err(InjectError::NoTrustBundle);
    }

    let mut warnings = Vec::new();
    let mut containers = array(spec.get("containers"));
    let mut own_init_containers = array(spec.get("initContainers"));
    // The pod's own native sidecars run beside the app for the pod's whole
    // life and are probed on the pod IP like it; ordinary init containers
    // cannot have probes and are left as they are.
    // One token per pod, written into its hooks and its sidecar's
    // environment in this one patch. A pod is injected once: a later
    // admission of it (reinvoked, or its manifest copied) keeps it, and
    // gives it to the hooks of containers added since. One injected again
    // after its containers were removed has its earlier hooks given the
    // new token too, so its spec never holds two tokens.
    let hook_token = new_hook_token();
    let rewritten = probes::rewrite(
        containers.iter_mut().chain(
            own_init_containers
                .iter_mut()
                .filter(|c| is_native_sidecar(c)),
        ),
        config.admin_port,
        &hook_token,
    );
    warnings.extend(rewritten.warnings);
    warnings.extend(proxy_uid_warnings(
        proxy_uid_containers(spec, config.proxy_uid),
        config.proxy_uid,
    ));

    let mut init_containers = vec![
        init_container(config, &annotated.init_flags),
        proxy_container(
            config,
            &rewritten.probes,
            (rewritten.hooks > 0).then_some(hook_token.as_str()),
            &annotated.env,
        ),
    ];
    init_containers.extend(own_init_containers);

    // Ours of an earlier injection (a pod marked injected whose containers
    // were taken out) make way for the new ones: a name twice is refused.
    let mut volumes = array(spec.get("volumes"));
    volumes.retain(|v| {
        !matches!(v.get("name").and_then(Value::as_str),
                  Some(name) if name == IDENTITY_VOLUME || name == XTABLES_VOLUME)
    });
    volumes.push(identity_volume(config));
    volumes.push(
        json!({"name": XTABLES_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}}),
    );

    let mut new_annotations = metadata
        .get("annotations")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    new_annotations.insert(INJECTED_ANNOTATION.into(), json!("true"));
    new_annotations.insert(
        INJECTED_CONTAINERS_ANNOTATION.into(),
        json!(own_container_names(spec)),
    );
    if let TrustBundleSource::Annotation(pem) = &config.trust_bundle {
        new_annotations.insert(TRUST_BUNDLE_ANNOTATION.into(), json!(pem));
    }

    let mut patch = vec![
        PatchOp::add("/metadata/annotations", Value::Object(new_annotations)),
        PatchOp::add("/spec/initContainers", Value::Array(init_containers)),
    ];
    if Some(&Value::Array(containers.clone())) != spec.get("containers") {
        patch.push(PatchOp::add("/spec/containers", Value::Array(containers)));
    }
    patch.push(PatchOp::add("/spec/volumes", Value::Array(volumes)));
    if let Some(secrets) = pull_secrets(spec, config) {
        patch.push(PatchOp::add(
            "/spec/imagePullSecrets",
            Value::Array(secrets),
        ));
    }
    Ok(Injection::Injected { patch, warnings })
}

/// The names of the pod's own containers (app containers, then init
/// containers, native sidecars or not; never ours), comma-separated: the
/// value of [`INJECTED_CONTAINERS_ANNOTATION`].
fn own_container_names(spec: &Map<String, Value>) -> String {
    join(
        all_containers(spec)
            .filter(|c| !is_ours(c))
            .filter_map(|c| c.get("name").and_then(Value::as_str)),
    )
}

fn is_ours(container: &Value) -> bool {
    matches!(container.get("name").and_then(Value::as_str),
             Some(name) if name == PROXY_CONTAINER || name == INIT_CONTAINER)
}

/// The pod injected before (it has both our containers): the containers
/// the injection has not seen, which a webhook called after ours added (the
/// API server then reinvokes this one, `reinvocationPolicy: IfNeeded`), or
/// someone added to a manifest copied from an injected pod, are checked and
/// their probes and lifecycle hooks rewritten as [`inject_pod`] rewrites a
/// new pod's ([`probes::rewrite`]): the same admin paths, the pod's hook
/// token (a new one if the pod has none yet), and their original checks
/// added to the sidecar's `TRELLIS_APP_PROBES`, by patching that one entry
/// of its environment. [`INJECTED_CONTAINERS_ANNOTATION`] names the
/// containers seen; a pod without it (injected by hand, or by a version
/// that did not write it) is taken to have seen every container of which
/// a probe or hook already calls the sidecar's `/app-health/`, and its
/// ordinary init containers. A container with a check that does not call
/// the sidecar yet ([`probes::has_app_check`]) is never seen: named in the
/// annotation, it was replaced under that name (or given a probe more), and
/// its checks take the place of its namesake's but for those its probes and
/// hooks still call, which stay without a warning. Nor is one of which the
/// sidecar runs a check it no longer calls: its namesake's checks leave
/// `TRELLIS_APP_PROBES`, and any probe of it the injection leaves as it
/// is is warned of as at injection. The checks of a container the pod no
/// longer has leave `TRELLIS_APP_PROBES` by the same rule.
/// Everything seen is left as it is, and its warnings are not repeated.
/// The settings the annotations decide ([`Annotated`]) are read again, and
/// the sidecar's environment entries and `trellis-init`'s arguments that
/// differ from them patched (a later webhook changed an annotation, or the
/// containers an opaque port's name resolves against). Nothing unseen, no
/// check of a container gone and no setting differing:
/// [`Skip::AlreadyInjected`], no patch. The port and UID
/// checks ([`check_port_clashes`], [`check_proxy_uid`]) are applied to
/// every container of the pod, seen or new, first; they and the rewritten
/// probes are of the UID and ports of the sidecar the pod carries
/// ([`injected_settings`]), not the current settings'.
fn rewrite_added(
    metadata: &Map<String, Value>,
    annotations: &BTreeMap<String, String>,
    spec: &Map<String, Value>,
    config: &InjectConfig,
) -> Result<Injection, InjectError> {
    let recorded = injected_containers(annotations)?;
    // The pod runs with the sidecar it was injected with, whose ports and
    // UID may be other settings' (its manifest copied, or restored, since
    // they changed): its checks and rewritten probes are held to that one.
    let config = &injected_settings(spec, config)?;
    // The checks of the pod as it will run, of every container of its own,
    // seen or new: they rewrite nothing, and a container that passed them
    // at injection passes them again. A container the rule below takes as
    // seen (an ordinary init container a later webhook added to a pod
    // injected without the annotation) is held to them all the same.
    check_port_clashes(all_containers(spec).filter(|c| !is_ours(c)), config)?;
    check_proxy_uid(
        proxy_uid_containers(spec, config.proxy_uid).filter(|(c, _)| !is_ours(c)),
        config,
        true,
    )?;

    // What the annotations ask of the sidecar and its init now, as an
    // injection would write it: a later webhook may have added or changed
    // an annotation, or added or replaced a container declaring a port an
    // opaque-ports name names. The pod does not exist yet, so neither
    // has run: what differs is patched, and an invalid value refused.
    let annotated = Annotated::read(annotations, spec, config)
        .map_err(|e| changed_since_injection(e, recorded.as_ref(), spec))?;
    let (field, at, proxy) = located(spec, PROXY_CONTAINER).ok_or(InjectError::InitWithoutProxy)?;
    let (init_field, init_at, init) =
        located(spec, INIT_CONTAINER).ok_or(InjectError::ProxyWithoutInit)?;
    let init_args = slice(init.get("args"));
    // An init whose arguments do not start with `init` does not run what
    // the injector wrote: without arguments (written by hand) it would run
    // the sidecar's default command, and with others (another webhook or
    // a user changed them) something else, or `init` with flags that are
    // not the injector's. Neither is edited in place: it gets all of an
    // injection's arguments, of the sidecar the pod carries, which are
    // what the checks above took it to run with ([`injected_settings`]);
    // arguments that were there are warned of.
    let runs_init = init_args.first().and_then(Value::as_str) == Some("init");
    let new_init_args = if runs_init {
        Some(with_flags(init_args, &annotated.init_flags))
    } else {
        init_container(config, &annotated.init_flags)
            .get("args")
            .map(|args| slice(Some(args)).to_vec())
    }
    .filter(|args| args != init_args);
    let init_replaced = !runs_init && !init_args.is_empty();
    let env = slice(proxy.get("env"));
    let entry = |name: &str| {
        env.iter()
            .position(|e| e.get("name").and_then(Value::as_str) == Some(name))
    };
    // The entries the annotations decide are the injector's: one set by
    // other means (a later webhook writing `TRELLIS_ACCESS_LOG` on the
    // sidecar) is made what the annotations say. Of several entries of one
    // name the kubelet uses the last: the first is kept (replaced if its
    // value is not the one wanted), the others taken out, so the value in
    // force is the annotations' whatever the entries' order.
    let mut env_replaced: Vec<(usize, Value)> = Vec::new();
    let mut removed: Vec<usize> = Vec::new();
    let mut added: Vec<Value> = Vec::new();
    for (name, wanted) in &annotated.env {
        let wanted = wanted
            .as_ref()
            .map(|value| json!({"name": name, "value": value}));
        let mut ats = env
            .iter()
            .enumerate()
            .filter(|(_, e)| e.get("name").and_then(Value::as_str) == Some(name))
            .map(|(at, _)| at);
        match (ats.next(), wanted) {
            (Some(at), Some(wanted)) if env[at] != wanted => env_replaced.push((at, wanted)),
            (Some(_), Some(_)) => {}
            (Some(at), None) => removed.push(at),
            (None, Some(wanted)) => added.push(wanted),
            (None, None) => {}
        }
        removed.extend(ats);
    }
    let settings_differ = !(env_replaced.is_empty() && removed.is_empty() && added.is_empty());
    let env_value = |at: usize, name: &'static str| {
        env[at]
            .get("value")
            .and_then(Value::as_str)
            .ok_or(InjectError::SidecarEnv(name))
    };
    // The checks the sidecar runs; an error only once they must change.
    let probes_at = entry(TRELLIS_APP_PROBES);
    let served: Result<BTreeMap<String, Value>, InjectError> = match probes_at {
        Some(at) => env_value(at, TRELLIS_APP_PROBES).and_then(|probes| {
            read_app_probes(probes).ok_or(InjectError::SidecarEnv(TRELLIS_APP_PROBES))
        }),
        None => Ok(BTreeMap::new()),
    };
    // Whether the sidecar runs a check of `container`'s name that none of
    // its probes and hooks calls: the container the injection saw had a
    // check this one has not, so a later webhook replaced it under that
    // name (or took a probe of it away).
    let has_stale_checks = |container: &Value| {
        let Ok(served) = &served else {
            return false;
        };
        let prefix = probes::app_health_path(&container_name(container), "");
        let called: BTreeSet<&str> = probes::sidecar_paths(container, config.admin_port).collect();
        served
            .keys()
            .any(|path| path.starts_with(&prefix) && !called.contains(path.as_str()))
    };
    // Without the annotation, an ordinary init container cannot be told
    // new or seen: it has no probe or hook to tell by, and is taken as seen.
    let ordinary_init: Vec<&str> = slice(spec.get("initContainers"))
        .iter()
        .filter(|c| !is_native_sidecar(c))
        .filter_map(|c| c.get("name").and_then(Value::as_str))
        .collect();
    // A container with a check that does not call the sidecar yet is new,
    // whatever its name: named in the annotation, it is not the one the
    // injection saw but one a later webhook put in its place, whose probes
    // would reach the app through the mTLS port and fail. So is one of
    // which the sidecar runs a check it no longer calls: its checks are now
    // only those the injection leaves as they are (`exec`, another host, a
    // port it does not declare), and the sidecar's stale ones must go.
    // Without the annotation, a container with no check to tell by (no
    // probe or hook, or only `exec` ones) is new too: nothing in it
    // changes, but it joins the annotation.
    let seen = |container: &Value| {
        let name = container.get("name").and_then(Value::as_str);
        let known = match &recorded {
            Some(names) => name.is_some_and(|name| names.contains(name)),
            None => {
                probes::calls_sidecar(container, config.admin_port)
                    || name.is_some_and(|name| ordinary_init.contains(&name))
            }
        };
        known
            && !probes::has_app_check(container, config.admin_port)
            && !has_stale_checks(container)
    };
    let is_new = |container: &Value| !is_ours(container) && !seen(container);
    // The checks of a container the pod no longer has (a later webhook
    // took it out) leave the sidecar by the rule that takes a replaced
    // container's: no probe or hook of the pod calls them any more.
    let gone = |path: &str| {
        probes::container_of(path).is_some_and(|name| {
            !all_containers(spec).any(|c| c.get("name").and_then(Value::as_str) == Some(name))
        })
    };
    let any_new = all_containers(spec).any(is_new);
    let drops_gone = served.as_ref().is_ok_and(|served| {
        served.keys().any(|path| {
            gone(path)
                && !all_containers(spec)
                    .any(|c| probes::sidecar_paths(c, config.admin_port).any(|p| p == path))
        })
    });
    if !any_new && !drops_gone && new_init_args.is_none() && !settings_differ {
        return Ok(Injection::Skipped(Skip::AlreadyInjected));
    }
    let token_at = entry(TRELLIS_HOOK_TOKEN);
    let hook_token = match token_at {
        // Nothing is rewritten: no hook takes a token.
        _ if !any_new => String::new(),
        Some(at) => env_value(at, TRELLIS_HOOK_TOKEN)?.to_owned(),
        None => new_hook_token(),
    };

    // Only the new ones: the seen stay as they are, their warnings given.
    // A new one's probe or hook that calls a check the sidecar runs (a
    // seen container a later webhook gave another probe) stays as it is,
    // without the warning of a check no sidecar knows.
    let mut containers = array(spec.get("containers"));
    let mut init_containers = array(spec.get("initContainers"));
    let before = (containers.clone(), init_containers.clone());
    let rewritten = probes::rewrite_beside(
        containers.iter_mut().filter(|c| is_new(c)).chain(
            init_containers
                .iter_mut()
                .filter(|c| is_native_sidecar(c) && is_new(c)),
        ),
        config.admin_port,
        &hook_token,
        |path| {
            served
                .as_ref()
                .is_ok_and(|served| served.contains_key(path))
        },
    );
    let mut warnings = rewritten.warnings;
    if init_replaced {
        warnings.push(format!(
            "trellis: container \"{INIT_CONTAINER}\"'s args do not start with \"init\" (changed \
             by a webhook called after Trellis's, or by hand): they are replaced with the \
             arguments an injection writes"
        ));
    }
    warnings.extend(proxy_uid_warnings(
        proxy_uid_containers(spec, config.proxy_uid).filter(|(c, _)| is_new(c)),
        config.proxy_uid,
    ));

    let mut new_annotations = metadata
        .get("annotations")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    new_annotations.insert(
        INJECTED_CONTAINERS_ANNOTATION.into(),
        json!(own_container_names(spec)),
    );
    // Only the checks of containers gone: that one entry of the sidecar's
    // environment changes, and the annotation stays (a name of a container
    // the pod no longer has names nothing).
    let mut patch = Vec::new();
    if any_new {
        patch.push(PatchOp::add(
            "/metadata/annotations",
            Value::Object(new_annotations),
        ));
    }
    for (name, after, before) in [
        ("containers", &containers, &before.0),
        ("initContainers", &init_containers, &before.1),
    ] {
        for (i, (after, before)) in after.iter().zip(before).enumerate() {
            if after != before {
                patch.push(PatchOp::replace(format!("/spec/{name}/{i}"), after.clone()));
            }
        }
    }

    if let Some(args) = new_init_args {
        let path = format!("/spec/{init_field}/{init_at}/args");
        patch.push(match init.get("args") {
            Some(_) => PatchOp::replace(path, Value::Array(args)),
            None => PatchOp::add(path, Value::Array(args)),
        });
    }

    // The sidecar's environment: the new checks join the ones it has, and
    // a pod's first rewritten hook brings it the token. Entries are
    // replaced where they are, then the ones to go taken out from the last
    // (so no index moves before it is used), then new ones added where an
    // injection writes them ([`env_order`]).
    let env_path = format!("/spec/{field}/{at}/env");
    for (at, value) in env_replaced {
        patch.push(PatchOp::replace(format!("{env_path}/{at}"), value));
    }
    // A container replaced under a seen name leaves no checks of the one
    // it replaced behind; those a container still calls (a seen one given
    // a probe more) stay.
    let replaced: Vec<String> = all_containers(spec)
        .filter(|c| is_new(c))
        .map(|c| probes::app_health_path(&container_name(c), ""))
        .collect();
    let called: BTreeSet<&str> = containers
        .iter()
        .chain(&init_containers)
        .flat_map(|c| probes::sidecar_paths(c, config.admin_port))
        .collect();
    let is_stale = |path: &str| {
        !called.contains(path)
            && (replaced.iter().any(|prefix| path.starts_with(prefix)) || gone(path))
    };
    let drops = served
        .as_ref()
        .is_ok_and(|served| served.keys().any(|path| is_stale(path)));
    if !rewritten.probes.is_empty() || drops {
        let mut all = served?;
        all.retain(|path, _| !is_stale(path));
        all.extend(rewritten.probes);
        let value = json!({
            "name": TRELLIS_APP_PROBES,
            "value": serde_json::to_string(&all).unwrap_or_default(),
        });
        match probes_at {
            Some(at) => patch.push(PatchOp::replace(format!("{env_path}/{at}"), value)),
            None => added.push(value),
        }
    }
    if rewritten.hooks > 0 && token_at.is_none() {
        added.push(json!({"name": TRELLIS_HOOK_TOKEN, "value": hook_token}));
    }
    removed.sort_unstable_by(|a, b| b.cmp(a));
    removed.dedup();
    for at in &removed {
        patch.push(PatchOp::remove(format!("{env_path}/{at}")));
    }
    // Each added entry where an injection writes it ([`env_order`]), in
    // that order, so that each one's index is right for the environment
    // the operations before it left.
    let order = if added.is_empty() {
        Vec::new()
    } else {
        env_order(config, &annotated.env)
    };
    let env_rank = |entry: &Value| env_rank(&order, entry);
    added.sort_by_key(env_rank);
    if proxy.get("env").is_none() && !added.is_empty() {
        patch.push(PatchOp::add(env_path, Value::Array(added)));
    } else {
        let mut ranks: Vec<Option<usize>> = env
            .iter()
            .enumerate()
            .filter(|(at, _)| !removed.contains(at))
            .map(|(_, e)| env_rank(e))
            .collect();
        for value in added {
            let at = env_place(&ranks, env_rank(&value));
            let path = if at == ranks.len() {
                format!("{env_path}/-")
            } else {
                format!("{env_path}/{at}")
            };
            ranks.insert(at, env_rank(&value));
            patch.push(PatchOp::add(path, value));
        }
    }
    Ok(Injection::Rewritten { patch, warnings })
}

/// `e`, an annotation refused on a review of a pod that carries its
/// sidecar, saying so: its author submitted a pod the injector admitted,
/// and what was refused is what changed since (an annotation a mutating
/// webhook called after Trellis's set, or a container it took out that
/// declared a port `trellis.io/opaque-ports` names; or a copied
/// manifest), so the message names the containers the injection saw
/// that the pod no longer has.
fn changed_since_injection(
    e: InjectError,
    recorded: Option<&HashSet<&str>>,
    spec: &Map<String, Value>,
) -> InjectError {
    let InjectError::InvalidAnnotation { key, mut message } = e else {
        return e;
    };
    message.push_str(
        " (the pod carries its sidecar already: it was changed since injection, by a mutating \
         webhook called after Trellis's or in a copied manifest",
    );
    let mut gone: Vec<&str> = recorded
        .into_iter()
        .flatten()
        .copied()
        .filter(|name| {
            !all_containers(spec).any(|c| c.get("name").and_then(Value::as_str) == Some(name))
        })
        .collect();
    gone.sort_unstable();
    if !gone.is_empty() {
        message.push_str("; containers it had then and has no more: ");
        message.push_str(&gone.join(", "));
    }
    message.push(')');
    InjectError::InvalidAnnotation { key, message }
}

/// The container (or init container) `name` of the pod: the field it is
/// in, its index there, and it.
fn located<'a>(
    spec: &'a Map<String, Value>,
    name: &str,
) -> Option<(&'static str, usize, &'a Value)> {
    ["initContainers", "containers"]
        .into_iter()
        .find_map(|field| {
            slice(spec.get(field))
                .iter()
                .enumerate()
                .find(|(_, c)| c.get("name").and_then(Value::as_str) == Some(name))
                .map(|(at, container)| (field, at, container))
        })
}

/// `config` with the ports and UID of the sidecar the pod was injected
/// with: as its `trellis-init` arguments (`--proxy-uid`, `--inbound-port`,
/// `--outbound-port`) say them, when they are `init`'s; else as
/// `trellis-proxy` itself runs ([`sidecar_uid`], [`sidecar_port`]), as an
/// injection derives both from one setting; its admin port is its port
/// named [`ADMIN_PORT_NAME`]. What neither says (hand-written, or not a
/// number) is the current settings'. The outbound policy is the mesh's,
/// and stays the current one. An error when init's arguments do not say a
/// port and the sidecar's environment gives it in a form the injector
/// does not write ([`InjectError::SidecarAddress`]): init would be given a
/// guess, and redirect the pod's traffic where the sidecar may not listen.
fn injected_settings(
    spec: &Map<String, Value>,
    config: &InjectConfig,
) -> Result<InjectConfig, InjectError> {
    let named = |name: &str| {
        all_containers(spec).find(|c| c.get("name").and_then(Value::as_str) == Some(name))
    };
    let args: Vec<&str> = named(INIT_CONTAINER)
        .map(|init| {
            slice(init.get("args"))
                .iter()
                .filter_map(Value::as_str)
                .collect()
        })
        .filter(|args: &Vec<&str>| args.first() == Some(&"init"))
        .unwrap_or_default();
    let flag = |flag: &str| {
        args.iter()
            .enumerate()
            .find_map(|(at, arg)| match arg.strip_prefix(flag)? {
                "" => args.get(at + 1)?.parse::<u32>().ok(),
                value => value.strip_prefix('=')?.parse::<u32>().ok(),
            })
    };
    let port_flag = |name: &str| flag(name).and_then(|port| u16::try_from(port).ok());
    let proxy = named(PROXY_CONTAINER);
    let port_named = |name: &str| {
        slice(proxy?.get("ports"))
            .iter()
            .find(|p| p.get("name").and_then(Value::as_str) == Some(name))
            .and_then(|p| p.get("containerPort")?.as_u64())
            .and_then(|port| u16::try_from(port).ok())
    };
    let inbound_port = match port_flag("--inbound-port") {
        Some(port) => Some(port),
        None => sidecar_port(proxy, "TRELLIS_INBOUND", SIDECAR_INBOUND_PORT)?
            .or_else(|| port_named(INBOUND_PORT_NAME)),
    };
    let outbound_port = match port_flag("--outbound-port") {
        Some(port) => Some(port),
        None => sidecar_port(proxy, "TRELLIS_OUTBOUND", SIDECAR_OUTBOUND_PORT)?,
    };
    Ok(InjectConfig {
        proxy_uid: flag("--proxy-uid")
            .or_else(|| sidecar_uid(spec, proxy))
            .unwrap_or(config.proxy_uid),
        inbound_port: inbound_port.unwrap_or(config.inbound_port),
        outbound_port: outbound_port.unwrap_or(config.outbound_port),
        admin_port: port_named(ADMIN_PORT_NAME).unwrap_or(config.admin_port),
        ..config.clone()
    })
}

/// The UID `proxy` runs as: its own `securityContext.runAsUser`, else the
/// pod's, as the kubelet applies them; `None` where neither says one.
fn sidecar_uid(spec: &Map<String, Value>, proxy: Option<&Value>) -> Option<u32> {
    let run_as = |context: Option<&Value>| {
        context?
            .get("runAsUser")?
            .as_u64()
            .and_then(|uid| u32::try_from(uid).ok())
    };
    run_as(proxy.and_then(|p| p.get("securityContext")))
        .or_else(|| run_as(spec.get("securityContext")))
}

/// The port the sidecar `proxy` listens on as its environment entry `name`
/// (`TRELLIS_INBOUND`, `TRELLIS_OUTBOUND`) says: `ip:port` for each of the
/// cluster's families, one port, as an injection writes it; `default`, the
/// sidecar's own, without the entry; `None` for a sidecar without an
/// environment (written by hand), or no sidecar. Of several entries of
/// the name the kubelet uses the last, and so does this. An error, naming
/// the entry, for one set by `valueFrom` (its port is not in the pod) or
/// not of that form.
fn sidecar_port(
    proxy: Option<&Value>,
    name: &'static str,
    default: u16,
) -> Result<Option<u16>, InjectError> {
    let Some(env) = proxy.and_then(|p| p.get("env")) else {
        return Ok(None);
    };
    let Some(entry) = slice(Some(env))
        .iter()
        .rev()
        .find(|e| e.get("name").and_then(Value::as_str) == Some(name))
    else {
        return Ok(Some(default));
    };
    let refused = |problem: String| InjectError::SidecarAddress { name, problem };
    let Some(value) = entry.get("value").and_then(Value::as_str) else {
        return Err(refused(if entry.get("valueFrom").is_some() {
            "is set by valueFrom, which the injector cannot read".to_owned()
        } else {
            "has no value".to_owned()
        }));
    };
    let mut ports = value
        .split(',')
        .map(|addr| addr.trim().parse::<SocketAddr>().map(|addr| addr.port()));
    let first = ports.next().and_then(Result::ok);
    match first {
        Some(port) if port != 0 && ports.all(|p| p == Ok(port)) => Ok(Some(port)),
        _ => Err(refused(format!(
            "is {value:?}, not `ip:port` for each address with one port other than 0"
        ))),
    }
}

/// The checks of a sidecar's `TRELLIS_APP_PROBES` as the injector writes
/// them: a JSON object from admin paths under `/app-health/` to objects.
/// `None` for anything else (not JSON, another shape: edited by hand),
/// which the injector cannot add checks to or take them from. A blank
/// value is no checks, as the sidecar reads it.
fn read_app_probes(text: &str) -> Option<BTreeMap<String, Value>> {
    if text.trim().is_empty() {
        return Some(BTreeMap::new());
    }
    let checks: BTreeMap<String, Value> = serde_json::from_str(text).ok()?;
    checks
        .iter()
        .all(|(path, check)| path.starts_with(PATH_PREFIX) && check.is_object())
        .then_some(checks)
}

/// The elements of an array, none when it is not one.
fn slice(value: Option<&Value>) -> &[Value] {
    value
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// Where a value of `trellis.io/inject` that is neither `enabled` nor
/// `disabled` was found. Where the pod's own value decides, the pod is
/// denied ([`InjectError::InvalidAnnotation`], [`InjectError::InvalidLabel`]);
/// anywhere else (a label the pod's annotation overrides, a namespace's
/// label, a pod label the injecting webhooks are never sent) it decides
/// nothing, is never guessed at, and the pod's author is warned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum UnknownInjectValue {
    PodAnnotation,
    PodLabel,
    NamespaceLabel,
}

impl UnknownInjectValue {
    /// The metrics' label for it.
    pub fn reason(self) -> &'static str {
        match self {
            Self::PodAnnotation => "pod_annotation",
            Self::PodLabel => "pod_label",
            Self::NamespaceLabel => "namespace_label",
        }
    }

    /// What the pod's author is told: where, the `value` if known (the
    /// webhook cannot read a namespace's labels), the values allowed, and
    /// whether the pod got its sidecar all the same.
    pub fn warning(self, value: Option<&str>, injected: bool) -> String {
        let is = match value {
            Some(value) => format!("is {value:?}, neither"),
            None => "is neither".to_owned(),
        };
        let allowed = "\"enabled\" nor \"disabled\"";
        match self {
            Self::PodAnnotation | Self::PodLabel => {
                let field = if self == Self::PodLabel {
                    "labels"
                } else {
                    "annotations"
                };
                let outcome = if injected {
                    "the pod is injected"
                } else {
                    "the pod runs without a sidecar, outside the mesh"
                };
                format!(
                    "trellis: metadata.{field}[{INJECT_KEY}] {is} {allowed}: ignored, so {outcome}"
                )
            }
            Self::NamespaceLabel => {
                let outcome = if injected {
                    "this one opted in itself and is"
                } else {
                    "this one runs without a sidecar, outside the mesh"
                };
                format!(
                    "trellis: the namespace's label {INJECT_KEY} {is} {allowed}: pods here are not \
                     injected; {outcome}"
                )
            }
        }
    }
}

/// The values of `trellis.io/inject` that are neither `enabled` nor
/// `disabled` on `pod`'s labels (and its namespace's, when `scope` has
/// them). Not its annotation: an unknown one denies the pod
/// ([`InjectError::InvalidAnnotation`]) before anything is warned of.
pub(super) fn unknown_inject_values(
    pod: &Value,
    scope: NamespaceScope<'_>,
) -> Vec<(UnknownInjectValue, String)> {
    let label = pod
        .get("metadata")
        .and_then(|m| m.get("labels"))
        .and_then(|m| m.get(INJECT_KEY))
        .and_then(Value::as_str);
    let namespace = match scope {
        NamespaceScope::Labels(ns) => ns.get(INJECT_KEY).map(String::as_str),
        NamespaceScope::SelectedByWebhook => None,
    };
    [
        (UnknownInjectValue::PodLabel, label),
        (UnknownInjectValue::NamespaceLabel, namespace),
    ]
    .into_iter()
    .filter_map(|(found, value)| {
        let value = value?;
        parse_switch(value)
            .is_none()
            .then(|| (found, value.to_owned()))
    })
    .collect()
}

/// Whether to leave the pod alone; the pod's annotation decides first, then
/// its label, then the namespace.
fn skip_reason(
    annotations: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
    spec: &Map<String, Value>,
    scope: NamespaceScope<'_>,
) -> Result<Option<Skip>, InjectError> {
    // Our containers, not the marker annotation: a pod carrying the
    // annotation without them (copied by hand, or from a pod a later
    // webhook took them out of, which reinvokes this one) has no sidecar,
    // and is injected as any other.
    // Our init without the sidecar redirects the pod's traffic to ports
    // nothing listens on: no pod works so, whatever it asks. The sidecar
    // without our init (taken out by a later webhook, or by hand) is never
    // reached: the pod would run outside the mesh, yet look injected.
    match (
        has_container(spec, INIT_CONTAINER),
        has_container(spec, PROXY_CONTAINER),
    ) {
        (true, false) => return Err(InjectError::InitWithoutProxy),
        (false, true) => return Err(InjectError::ProxyWithoutInit),
        (true, true) => return Ok(Some(Skip::AlreadyInjected)),
        (false, false) => {}
    }
    // The pod's own value that is neither `enabled` nor `disabled` is an
    // error, never a guess: "false" may mean opted out, and the pod's
    // author fixes it. A label the annotation overrides decides nothing
    // (the answer warns of it, see [`unknown_inject_values`]), nor does a
    // namespace's mistyped label, which reads as not opted in.
    let pod_choice = match annotations.get(INJECT_KEY) {
        Some(value) => Some(
            parse_switch(value).ok_or_else(|| InjectError::InvalidAnnotation {
                key: INJECT_KEY,
                message: format!("expected \"enabled\" or \"disabled\", got {value:?}"),
            })?,
        ),
        None => match labels.get(INJECT_KEY) {
            Some(value) => {
                Some(parse_switch(value).ok_or_else(|| InjectError::InvalidLabel(value.clone()))?)
            }
            None => None,
        },
    };
    let enabled = match (pod_choice, scope) {
        (Some(choice), _) => choice,
        (None, NamespaceScope::SelectedByWebhook) => true,
        (None, NamespaceScope::Labels(ns)) => {
            ns.get(INJECT_KEY).and_then(|v| parse_switch(v)) == Some(true)
        }
    };
    if !enabled {
        return Ok(Some(if pod_choice == Some(false) {
            Skip::OptedOut
        } else {
            Skip::NotEnabled
        }));
    }
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        return Ok(Some(Skip::HostNetwork));
    }
    if is_windows(spec) {
        return Ok(Some(Skip::Windows));
    }
    Ok(None)
}

/// Whether the pod runs on Windows nodes: it says so in `spec.os.name`, or
/// its node selector picks them.
fn is_windows(spec: &Map<String, Value>) -> bool {
    let os = spec.get("os").and_then(|os| os.get("name"));
    let selected = spec
        .get("nodeSelector")
        .and_then(|selector| selector.get("kubernetes.io/os"));
    [os, selected]
        .into_iter()
        .flatten()
        .any(|name| name.as_str() == Some("windows"))
}

fn parse_switch(value: &str) -> Option<bool> {
    match value {
        "enabled" => Some(true),
        "disabled" => Some(false),
        _ => None,
    }
}

/// Whether `pod` runs in the mesh: it has the containers (or init
/// containers) `trellis-proxy` and `trellis-init`, the sidecar and what
/// redirects the pod's traffic to it. The marker annotation alone says
/// nothing: it may have been copied by hand, or the containers taken out
/// by another webhook.
pub(super) fn has_sidecar(pod: &Value) -> bool {
    pod.get("spec")
        .and_then(Value::as_object)
        .is_some_and(|spec| {
            has_container(spec, PROXY_CONTAINER) && has_container(spec, INIT_CONTAINER)
        })
}

fn has_container(spec: &Map<String, Value>, name: &str) -> bool {
    all_containers(spec).any(|c| c.get("name").and_then(Value::as_str) == Some(name))
}

/// Every container of the pod: its app containers, then its init
/// containers (ordinary ones and native sidecars alike).
fn all_containers(spec: &Map<String, Value>) -> impl Iterator<Item = &Value> {
    ["containers", "initContainers"]
        .into_iter()
        .flat_map(|field| {
            spec.get(field)
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_default()
        })
}

/// The containers that serve on the pod's ports: the app containers and
/// the pod's own native sidecars, whose named ports an annotation may use.
fn serving_containers(spec: &Map<String, Value>) -> impl Iterator<Item = &Value> + Clone {
    let of = |field| {
        spec.get(field)
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
    };
    of("containers")
        .iter()
        .chain(of("initContainers").iter().filter(|c| is_native_sidecar(c)))
}

/// Whether an init container is a native sidecar (`restartPolicy:
/// Always`): it keeps running beside the app containers, with probes.
fn is_native_sidecar(container: &Value) -> bool {
    container.get("restartPolicy").and_then(Value::as_str) == Some("Always")
}

/// Containers running as the proxy's UID bypass interception (init never
/// redirects that UID): say so rather than silently leak. The same
/// containers [`check_proxy_uid`] refuses under the outbound policy deny
/// (app containers, native sidecars and ordinary init containers, which
/// run after the sidecar has started); so only under passthrough.
fn proxy_uid_warnings<'a>(
    found: impl Iterator<Item = (&'a Value, &'static str)>,
    proxy_uid: u32,
) -> Vec<String> {
    found
        .map(|(c, _)| {
            let name = container_name(c);
            format!(
                "container {name:?} runs as UID {proxy_uid}, the proxy's UID: its traffic bypasses the sidecar"
            )
        })
        .collect()
}

/// Every container of the pod (app, native sidecar or ordinary init
/// container) that runs as `proxy_uid`, by its own
/// `securityContext.runAsUser` or the pod's, with which one sets it. A UID
/// the pod does not set (the image's `USER`) cannot be known here.
fn proxy_uid_containers(
    spec: &Map<String, Value>,
    proxy_uid: u32,
) -> impl Iterator<Item = (&Value, &'static str)> {
    let proxy_uid = u64::from(proxy_uid);
    let pod_uid = spec
        .get("securityContext")
        .and_then(|s| s.get("runAsUser"))
        .and_then(Value::as_u64);
    all_containers(spec).filter_map(move |container| {
        let own = container
            .get("securityContext")
            .and_then(|s| s.get("runAsUser"))
            .and_then(Value::as_u64);
        let set_by = match own {
            Some(uid) if uid == proxy_uid => "its securityContext.runAsUser",
            Some(_) => return None,
            None if pod_uid == Some(proxy_uid) => "the pod's securityContext.runAsUser",
            None => return None,
        };
        Some((container, set_by))
    })
}

/// A port the sidecar listens on: its number, which one it is, and the
/// name `trellis-proxy` declares it by (none for the outbound port, which
/// only the pod's own traffic reaches, redirected).
struct SidecarPort {
    port: u16,
    role: &'static str,
    name: Option<&'static str>,
}

fn sidecar_ports(config: &InjectConfig) -> [SidecarPort; 3] {
    let port = |port, role, name| SidecarPort { port, role, name };
    [
        port(config.outbound_port, "outbound", None),
        port(config.inbound_port, "inbound", Some(INBOUND_PORT_NAME)),
        port(config.admin_port, "admin", Some(ADMIN_PORT_NAME)),
    ]
}

/// Refuses a pod with a container that declares a TCP port the sidecar
/// listens on. Every container shares the pod's network namespace, and the
/// sidecar starts first: the container's own listener fails with "address
/// in use" (crash-looping), or, on the admin port, its clients reach the
/// sidecar instead. Init containers are checked too: the sidecar already
/// runs when they do.
///
/// Refuses as well a container port, of any protocol, named as one of the
/// sidecar's (`trellis-inbound`, `trellis-admin`): what finds the sidecar
/// by port name (a Service's `targetPort`, a PodMonitor scraping every
/// sidecar's admin port) would find two ports of that name in the pod, and
/// could take the container's for the sidecar's.
///
/// A `hostPort` is not checked: it is a port of the node, which the node
/// forwards to the pod IP's `containerPort` (checked here), and the sidecar
/// binds nothing on the node. Only with `hostNetwork` would the two be one
/// port (the API server then requires them equal), and such a pod is not
/// injected ([`Skip::HostNetwork`]).
fn check_port_clashes<'a>(
    containers: impl Iterator<Item = &'a Value>,
    config: &InjectConfig,
) -> Result<(), InjectError> {
    let sidecar = sidecar_ports(config);
    for container in containers {
        for declared in array(container.get("ports")) {
            let port = declared.get("containerPort");
            // The sidecar's listeners are TCP; UDP and SCTP ports are free.
            let protocol = declared.get("protocol").and_then(Value::as_str);
            let number = port.and_then(Value::as_u64);
            if matches!(protocol, None | Some("TCP"))
                && let Some(clash) = sidecar.iter().find(|s| number == Some(u64::from(s.port)))
            {
                return Err(InjectError::PortClash {
                    container: container_name(container),
                    port: clash.port,
                    sidecar: clash.role,
                });
            }
            if let Some(declared) = declared.get("name").and_then(Value::as_str)
                && let Some((name, role)) = sidecar
                    .iter()
                    .find_map(|s| Some((s.name.filter(|n| *n == declared)?, s.role)))
            {
                return Err(InjectError::PortNameClash {
                    container: container_name(container),
                    port: port.and_then(Value::as_i64).unwrap_or_default(),
                    name,
                    sidecar: role,
                });
            }
        }
    }
    Ok(())
}

/// Under the outbound policy `deny`, refuses a pod with a container (app,
/// native sidecar or ordinary init container) that runs as the sidecar's
/// UID, by its own `securityContext.runAsUser` or the pod's: init never
/// redirects that UID, so the container would reach any destination the
/// mesh refuses. Under `passthrough` such traffic leaves the pod as any
/// other would, and [`proxy_uid_warnings`] only warns. A UID the pod does
/// not set (the image's `USER`) cannot be known here.
fn check_proxy_uid<'a>(
    mut found: impl Iterator<Item = (&'a Value, &'static str)>,
    config: &InjectConfig,
    injected: bool,
) -> Result<(), InjectError> {
    if config.outbound_policy != OutboundPolicy::Deny {
        return Ok(());
    }
    match found.next() {
        Some((container, set_by)) => Err(InjectError::ProxyUid {
            container: container_name(container),
            uid: config.proxy_uid,
            set_by,
            injected,
        }),
        None => Ok(()),
    }
}

fn container_name(container: &Value) -> String {
    container
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

/// What the pod's annotations decide of its sidecar's environment and its
/// `trellis-init`'s arguments (each the settings' where the pod has none),
/// as an injection writes them: each entry or flag with its value, `None`
/// where none is written. Read at injection, and again on every review of
/// a pod with its sidecar ([`rewrite_added`]), which patches what differs.
struct Annotated {
    env: [(&'static str, Option<String>); 5],
    init_flags: [(&'static str, Option<String>); 3],
}

impl Annotated {
    /// Every value checked, in this order: the exclusions, the access log,
    /// the TCP user timeout, the HTTP/2 limits, the opaque ports.
    fn read(
        annotations: &BTreeMap<String, String>,
        spec: &Map<String, Value>,
        config: &InjectConfig,
    ) -> Result<Self, InjectError> {
        let exclusions = Exclusions::read(annotations, config)?;
        let access_log = access_log(annotations)?;
        let user_timeout = tcp_user_timeout(annotations, config)?;
        let h2_limits = H2Limits::read(annotations, config)?;
        // Port names resolved against the pod's own containers as they
        // are now: on a review of a pod with its sidecar, those a later
        // webhook added or replaced too (never ours, whose port names a
        // pod's port may not have).
        let opaque_ports = opaque_ports(
            annotations,
            serving_containers(spec).filter(|c| !is_ours(c)),
        )?;
        let listed = |items: &[u16]| (!items.is_empty()).then(|| join(items));
        Ok(Self {
            env: [
                // The sidecar logs requests unless told not to: only the
                // opt-out is set.
                ("TRELLIS_ACCESS_LOG", (!access_log).then(|| "false".into())),
                // Likewise the user timeout, when it is not the sidecar's
                // default.
                (
                    "TRELLIS_TCP_USER_TIMEOUT",
                    (user_timeout != Some(trellis_core::tcp::DEFAULT_USER_TIMEOUT)).then(|| {
                        trellis_core::duration::flag_value(user_timeout.unwrap_or_default())
                    }),
                ),
                // And the HTTP/2 connection limits, each when not the
                // sidecar's default.
                (
                    "TRELLIS_MAX_H2_CONNECTIONS_PER_PEER",
                    (h2_limits.per_peer != trellis_core::h2_limits::DEFAULT_PER_PEER)
                        .then(|| h2_limits.per_peer.to_string()),
                ),
                (
                    "TRELLIS_MAX_H2_CONNECTIONS",
                    (h2_limits.total != trellis_core::h2_limits::DEFAULT_TOTAL)
                        .then(|| h2_limits.total.to_string()),
                ),
                ("TRELLIS_OPAQUE_PORTS", listed(&opaque_ports)),
            ],
            init_flags: [
                // Always: it replaces init's default, and lists the admin port.
                ("--exclude-ports", Some(join(&exclusions.inbound_ports))),
                (
                    "--exclude-outbound-ports",
                    listed(&exclusions.outbound_ports),
                ),
                (
                    "--exclude-outbound-cidrs",
                    (!exclusions.outbound_cidrs.is_empty())
                        .then(|| join(&exclusions.outbound_cidrs)),
                ),
            ],
        })
    }
}

/// `args` with each flag of `flags` as its value says: the value set
/// (`--flag VALUE`, or `--flag=VALUE` where the arguments have that form),
/// the flag and value put after the flag before it in `flags` (else at the
/// end) when missing, taken out when `None`. The injector's own arguments
/// come out as an injection writes them.
fn with_flags(args: &[Value], flags: &[(&'static str, Option<String>)]) -> Vec<Value> {
    let mut args = args.to_vec();
    let mut after = None;
    for (flag, wanted) in flags {
        let joined = format!("{flag}=");
        let separate = |arg: &Value| arg.as_str() == Some(flag);
        let at = args
            .iter()
            .position(|a| separate(a) || a.as_str().is_some_and(|a| a.starts_with(&joined)));
        match (at, wanted) {
            (Some(at), Some(value)) if separate(&args[at]) => {
                match args.get_mut(at + 1) {
                    Some(arg) => *arg = json!(value),
                    None => args.push(json!(value)),
                }
                after = Some(at + 2);
            }
            (Some(at), Some(value)) => {
                args[at] = json!(format!("{joined}{value}"));
                after = Some(at + 1);
            }
            (Some(at), None) => {
                let end = if separate(&args[at]) { at + 2 } else { at + 1 };
                args.drain(at..end.min(args.len()));
                after = Some(at);
            }
            (None, Some(value)) => {
                let at = after.unwrap_or(args.len());
                args.splice(at..at, [json!(flag), json!(value)]);
                after = Some(at + 2);
            }
            (None, None) => {}
        }
    }
    args
}

fn init_container(config: &InjectConfig, flags: &[(&'static str, Option<String>)]) -> Value {
    let mut args = vec![
        "init".to_owned(),
        "--proxy-uid".to_owned(),
        config.proxy_uid.to_string(),
        "--inbound-port".to_owned(),
        config.inbound_port.to_string(),
        "--outbound-port".to_owned(),
        config.outbound_port.to_string(),
    ];
    for (flag, value) in flags {
        if let Some(value) = value {
            args.push((*flag).to_owned());
            args.push(value.clone());
        }
    }
    if config.exclude_outbound_dns {
        args.push("--exclude-outbound-dns".into());
    }
    args.push("--outbound-policy".into());
    args.push(config.outbound_policy.as_str().into());
    // In a cluster with IPv6 pods, IPv6 rules are required: without them
    // IPv6 connections would reach the app in plaintext, so an init that
    // cannot write them fails and the pod does not start unprotected.
    if config.ip_families.contains(&IpFamily::V6) {
        args.push("--ipv6".into());
        args.push("on".into());
    }
    let mut container = json!({
        "name": INIT_CONTAINER,
        "image": config.image,
        "command": ["trellis-proxy"],
        "args": args,
        "env": [{"name": "XTABLES_LOCKFILE", "value": format!("{XTABLES_DIR}/xtables.lock")}],
        "volumeMounts": [{"name": XTABLES_VOLUME, "mountPath": XTABLES_DIR}],
        "resources": resources(&config.init_resources),
        "securityContext": {
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": false,
            "privileged": false,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    });
    pull_policy(&mut container, config);
    container
}

/// A fresh secret for the lifecycle hooks of one pod: 32 random bytes, as
/// hex (a header value as it is).
fn new_hook_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

fn proxy_container(
    config: &InjectConfig,
    app_probes: &BTreeMap<String, Value>,
    hook_token: Option<&str>,
    annotated: &[(&'static str, Option<String>)],
) -> Value {
    let admin = config.admin_port;
    let ports: Vec<Value> = sidecar_ports(config)
        .into_iter()
        .filter_map(|p| Some(json!({"name": p.name?, "containerPort": p.port, "protocol": "TCP"})))
        .collect();
    let env = proxy_env(config, app_probes, hook_token, annotated);
    let mut container = json!({
        "name": PROXY_CONTAINER,
        "image": config.image,
        "command": ["trellis-proxy"],
        "restartPolicy": "Always",
        "ports": ports,
        "env": env,
        "volumeMounts": [{"name": IDENTITY_VOLUME, "mountPath": IDENTITY_DIR, "readOnly": true}],
        "resources": resources(&config.proxy_resources),
        // Up to two minutes for the first certificate and snapshot.
        "startupProbe": {
            "httpGet": {"path": "/ready", "port": admin, "scheme": "HTTP"},
            "periodSeconds": 1, "timeoutSeconds": 1, "failureThreshold": 120,
        },
        // The admin port answers until the sidecar exits: while it
        // drains after SIGTERM, /ready is 503 (saying why) and /live 200,
        // so a draining sidecar is neither probed "connection refused"
        // nor restarted.
        "readinessProbe": {
            "httpGet": {"path": "/ready", "port": admin, "scheme": "HTTP"},
            "periodSeconds": 5, "timeoutSeconds": 1, "failureThreshold": 3,
        },
        "livenessProbe": {
            "httpGet": {"path": "/live", "port": admin, "scheme": "HTTP"},
            "periodSeconds": 10, "timeoutSeconds": 1, "failureThreshold": 3,
        },
        "securityContext": {
            "runAsUser": config.proxy_uid,
            "runAsGroup": config.proxy_uid,
            "runAsNonRoot": true,
            "privileged": false,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    });
    pull_policy(&mut container, config);
    container
}

/// The sidecar's environment as an injection writes it, in its order: what
/// every sidecar has, what the pod's annotations decide ([`Annotated`]),
/// its ports when not its defaults, the app's checks and the hook token.
fn proxy_env(
    config: &InjectConfig,
    app_probes: &BTreeMap<String, Value>,
    hook_token: Option<&str>,
    annotated: &[(&'static str, Option<String>)],
) -> Vec<Value> {
    let td = config.trust_domain.as_str();
    let field = |name: &str, path: &str| json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}});
    let value = |name: &str, value: String| json!({"name": name, "value": value});
    let mut env = vec![
        field("TRELLIS_POD_NAME", "metadata.name"),
        field("TRELLIS_POD_NAMESPACE", "metadata.namespace"),
        field("TRELLIS_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        field("TRELLIS_POD_IP", "status.podIP"),
        // Every address of a dual-stack pod, comma-separated.
        field("TRELLIS_POD_IPS", "status.podIPs"),
        // $(VAR) is expanded by the kubelet from the variables above.
        value(
            "TRELLIS_IDENTITY",
            format!("spiffe://{td}/ns/$(TRELLIS_POD_NAMESPACE)/sa/$(TRELLIS_SERVICE_ACCOUNT)"),
        ),
        value("TRELLIS_CONTROL_PLANE", config.control_plane.clone()),
        value("TRELLIS_TRUST_BUNDLE", format!("{IDENTITY_DIR}/bundle.pem")),
        value("TRELLIS_TOKEN_FILE", format!("{IDENTITY_DIR}/token")),
        value("TRELLIS_TOKEN_TYPE", "service-account".to_string()),
        // The kubelet probes the pod IP (status.podIP, of the primary
        // family), so the admin port listens on every address of that
        // family; init leaves it out of interception.
        value("TRELLIS_ADMIN", admin_address(config).to_string()),
        // Bare IPs: the sidecar adds its inbound port to each.
        value(
            "TRELLIS_ADVERTISE_ADDRESS",
            "$(TRELLIS_POD_IPS)".to_string(),
        ),
        value("TRELLIS_LOG_FORMAT", log_format(config.log_format)),
    ];
    // What the pod's annotations decide ([`Annotated`]).
    for (name, set) in annotated {
        if let Some(set) = set {
            env.push(value(name, set.clone()));
        }
    }
    // On the default ports the sidecar's own defaults apply: both IP
    // families, the IPv6 half left out where the pod has no IPv6. Other
    // ports are named, for the cluster's families only: a named address
    // must bind, and ::1 is missing in pods with IPv6 disabled.
    if config.inbound_port != SIDECAR_INBOUND_PORT {
        let addrs = per_family(config, IpFamily::unspecified, config.inbound_port);
        env.push(value("TRELLIS_INBOUND", addrs));
    }
    if config.outbound_port != SIDECAR_OUTBOUND_PORT {
        let addrs = per_family(config, IpFamily::loopback, config.outbound_port);
        env.push(value("TRELLIS_OUTBOUND", addrs));
    }
    if !app_probes.is_empty() {
        let probes = serde_json::to_string(app_probes).unwrap_or_default();
        env.push(value(TRELLIS_APP_PROBES, probes));
    }
    // Only a pod with rewritten hooks has a token: the sidecar of one
    // without hooks has nothing to guard with it.
    if let Some(token) = hook_token {
        env.push(value(TRELLIS_HOOK_TOKEN, token.to_owned()));
    }
    env
}

/// Every address of the primary family, which the kubelet's probes reach:
/// `0.0.0.0:15020` or `[::]:15020`.
fn admin_address(config: &InjectConfig) -> SocketAddr {
    let primary = config.ip_families.first().copied().unwrap_or(IpFamily::V4);
    SocketAddr::new(primary.unspecified(), config.admin_port)
}

/// `ip:port` for each of the cluster's families, comma-separated.
fn per_family(config: &InjectConfig, ip: fn(IpFamily) -> IpAddr, port: u16) -> String {
    join(
        config
            .ip_families
            .iter()
            .map(|f| SocketAddr::new(ip(*f), port)),
    )
}

/// One projected volume for what the sidecar reads at start: the token and
/// the trust bundle. Mode 0444 because the kubelet would otherwise make the
/// token readable only by root or the pod's `fsGroup`; only the sidecar
/// mounts this volume, so no other container can read it.
fn identity_volume(config: &InjectConfig) -> Value {
    let token = json!({"serviceAccountToken": {
        "audience": TOKEN_AUDIENCE,
        "expirationSeconds": config.token_expiration_seconds,
        "path": "token",
    }});
    let bundle = match &config.trust_bundle {
        TrustBundleSource::Annotation(_) => json!({"downwardAPI": {"items": [{
            "path": "bundle.pem",
            "fieldRef": {"fieldPath": format!("metadata.annotations['{TRUST_BUNDLE_ANNOTATION}']")},
        }]}}),
        TrustBundleSource::ConfigMap(name) => json!({"configMap": {
            "name": name,
            "items": [{"key": "bundle.pem", "path": "bundle.pem"}],
        }}),
    };
    json!({"name": IDENTITY_VOLUME, "projected": {"defaultMode": 0o444, "sources": [token, bundle]}})
}

fn resources(r: &Resources) -> Value {
    let mut requests = Map::new();
    let mut limits = Map::new();
    for (name, request, limit) in r.by_name() {
        if let Some(request) = request {
            requests.insert(name.into(), json!(request));
        }
        if let Some(limit) = limit {
            limits.insert(name.into(), json!(limit));
        }
    }
    let mut out = Map::new();
    for (section, quantities) in [("requests", requests), ("limits", limits)] {
        if !quantities.is_empty() {
            out.insert(section.into(), Value::Object(quantities));
        }
    }
    Value::Object(out)
}

/// The pod's `imagePullSecrets` followed by the configured ones it does
/// not list yet; `None` when it lists them all (or none is configured).
fn pull_secrets(spec: &Map<String, Value>, config: &InjectConfig) -> Option<Vec<Value>> {
    let mut secrets = array(spec.get("imagePullSecrets"));
    let listed = secrets.len();
    for name in &config.image_pull_secrets {
        if !secrets
            .iter()
            .any(|s| s.get("name").and_then(Value::as_str) == Some(name))
        {
            secrets.push(json!({"name": name}));
        }
    }
    (secrets.len() > listed).then_some(secrets)
}

fn pull_policy(container: &mut Value, config: &InjectConfig) {
    if let Some(policy) = &config.image_pull_policy {
        container["imagePullPolicy"] = json!(policy);
    }
}

fn string_map(value: Option<&Value>) -> BTreeMap<String, String> {
    value
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

fn array(value: Option<&Value>) -> Vec<Value> {
    value.and_then(Value::as_array).cloned().unwrap_or_default()
}

/// `format` as the sidecar's `--log-format` takes it.
fn log_format(format: trellis_core::logging::Format) -> String {
    use clap::ValueEnum;
    format
        .to_possible_value()
        .map(|value| value.get_name().to_owned())
        .expect("every log format has a value")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An entry joins after the last one an injection writes before it,
    /// a later webhook's entries passed over; else before the first it
    /// writes after it; else at the end. The order is the injection's own
    /// ([`env_order`]): the checks and hook token come after what the
    /// annotations decide, and an entry it does not write has no place.
    #[test]
    fn an_added_entry_goes_where_an_injection_writes_it() {
        let order = env_order(
            &InjectConfig::default(),
            &[("TRELLIS_OPAQUE_PORTS", Some("9100".to_owned()))],
        );
        let rank = |name: &str| env_rank(&order, &json!({"name": name, "value": "x"}));
        let ranks =
            |names: &[&str]| -> Vec<Option<usize>> { names.iter().map(|n| rank(n)).collect() };
        assert_eq!(rank("OTHER"), None);
        let env = ranks(&["TRELLIS_LOG_FORMAT", "VAULT_ADDR", TRELLIS_APP_PROBES]);
        assert_eq!(env_place(&env, rank("TRELLIS_OPAQUE_PORTS")), 1);
        assert_eq!(env_place(&env, rank(TRELLIS_HOOK_TOKEN)), 3);
        let env = ranks(&["VAULT_ADDR", TRELLIS_APP_PROBES]);
        assert_eq!(env_place(&env, rank("TRELLIS_OPAQUE_PORTS")), 1);
        assert_eq!(env_place(&[], rank("TRELLIS_OPAQUE_PORTS")), 0);
        assert_eq!(env_place(&env, rank("OTHER")), 2);
    }

    /// Flags are set in the form the arguments have them, a missing one
    /// goes after the flag before it (or at the end), and one set to
    /// nothing leaves with its value.
    #[test]
    fn with_flags_sets_adds_and_takes_out_in_place() {
        let args = json!([
            "init",
            "--exclude-ports=15020",
            "--exclude-outbound-cidrs",
            "10.0.0.0/8",
            "--outbound-policy",
            "deny"
        ]);
        let flags = [
            ("--exclude-ports", Some("15020,22".to_owned())),
            ("--exclude-outbound-ports", Some("5432".to_owned())),
            ("--exclude-outbound-cidrs", None),
        ];
        assert_eq!(
            with_flags(args.as_array().unwrap(), &flags),
            json!([
                "init",
                "--exclude-ports=15020,22",
                "--exclude-outbound-ports",
                "5432",
                "--outbound-policy",
                "deny"
            ])
            .as_array()
            .unwrap()
            .clone()
        );
        let bare = json!(["init"]);
        assert_eq!(
            with_flags(bare.as_array().unwrap(), &flags[..1]),
            json!(["init", "--exclude-ports", "15020,22"])
                .as_array()
                .unwrap()
                .clone()
        );
    }
}
