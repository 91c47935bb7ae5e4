//! The Kubernetes admission webhooks, as pure functions from the body the API
//! server sends to the body it expects back: `/inject` (mutating: adds the
//! sidecar to a Pod), `/inject/unknown-pod-label` and
//! `/inject/unknown-namespace-label` (warning only: a mistyped
//! `trellis.io/inject`) and `/validate` (validating: Trellis policy objects).
//!
//! This module owns what is injected and why, and the verdict on policy
//! objects. It never talks to the API server, and holds no state but the
//! record of the pods the warning-only paths admitted without a sidecar
//! ([`UninjectedPods`]). Everything else but [`server`] is pure:
//! [`server::WebhookServer`] (HTTPS on port 15017)
//! reads a body, calls [`respond_pod_reporting`] (or, on the warning-only
//! paths, [`respond_unknown_label`]) or [`review_policy`], and writes
//! [`AdmissionResponse::to_body`] back (or HTTP 400 with the [`ReviewError`]).
//! [`review_pod`] is the same answer from a body, for callers without the
//! server.
//!
//! | module | owns |
//! | --- | --- |
//! | `review` | the `admission.k8s.io/v1` AdmissionReview envelope, the base64 JSONPatch |
//! | `pod` | whether a pod is injected, and what it gets |
//! | `annotations` | what a pod's `trellis.io/*` annotations ask of its injection, each checked; the names the injector knows, and warnings of others |
//! | `probes` | rewriting app probes to the sidecar's admin port |
//! | `policy` | the `/validate` verdict on Trellis policy objects |
//! | `settings` | the `--inject-config` file the chart renders |
//! | `uninjected` | the pods admitted without a sidecar lately, for `trellisctl check` |
//! | [`server`] | the HTTPS port: TLS from the mounted Secret, routing, limits |
//!
//! # What a Pod gets
//!
//! In this order in `spec.initContainers`, ahead of the pod's own init
//! containers (which may need the network, so the proxy must already run):
//!
//! 1. `trellis-init`: `trellis-proxy init` programs iptables in the pod's
//!    network namespace. Root (`runAsUser: 0`, `runAsNonRoot: false`) with
//!    only `NET_ADMIN` and `NET_RAW` added and `ALL` dropped, no privilege
//!    escalation, read-only root filesystem (iptables' lock file goes to a
//!    small `emptyDir`). The port-exclusion annotations become its flags.
//! 2. `trellis-proxy`: the sidecar as a native sidecar (`restartPolicy:
//!    Always`). Its `startupProbe` on the admin port's `/ready` makes the
//!    kubelet start the next container only once the proxy holds a
//!    certificate and a policy snapshot, and a Job's pod still completes
//!    (native sidecars are stopped when the app containers finish). UID 1337
//!    ([`InjectConfig::proxy_uid`], the chart's `injection.proxy.uid`),
//!    non-root, read-only root filesystem, no privilege escalation, all
//!    capabilities dropped, seccomp `RuntimeDefault`. Configured entirely
//!    through `TRELLIS_*` environment variables (the flags' twins):
//!    identity `spiffe://TD/ns/$(TRELLIS_POD_NAMESPACE)/sa/$(TRELLIS_SERVICE_ACCOUNT)`
//!    expanded by the kubelet from the downward API, so it always names the
//!    account the pod really runs as. The annotation `trellis.io/access-log:
//!    "false"` becomes `TRELLIS_ACCESS_LOG=false`, and
//!    `trellis.io/tcp-user-timeout` (else the settings' `tcpUserTimeout`)
//!    becomes `TRELLIS_TCP_USER_TIMEOUT` when it is not the sidecar's
//!    default; likewise `trellis.io/max-h2-connections-per-peer` and
//!    `trellis.io/max-h2-connections` (else the settings'
//!    `maxH2ConnectionsPerPeer` and `maxH2Connections`) become
//!    `TRELLIS_MAX_H2_CONNECTIONS_PER_PEER` and
//!    `TRELLIS_MAX_H2_CONNECTIONS`, the HTTP/2 connections the sidecar's
//!    inbound port serves at once from one peer and from all.
//!    `trellis.io/opaque-ports` becomes `TRELLIS_OPAQUE_PORTS`,
//!    a port name resolved to the number the pod's containers give it.
//!
//! The pull secrets of [`InjectConfig::image_pull_secrets`] (the chart's
//! `imagePullSecrets`, with which its control plane pulls the same image)
//! are added to `spec.imagePullSecrets` after the pod's own, skipping a
//! name the pod already lists, so the kubelet can pull the image of both
//! containers from a private registry. A pod reads Secrets of its own
//! namespace only: each must exist in every injected namespace.
//!
//! A projected volume `trellis-identity`, mounted read-only only in the
//! sidecar at `/var/run/trellis/identity`, holds `token` (a ServiceAccount
//! token for audience `trellis`, [`InjectConfig::token_expiration_seconds`])
//! and, by default, `bundle.pem`.
//!
//! # The trust bundle
//!
//! The sidecar needs the CA roots before its first contact with the control
//! plane. A ConfigMap volume can only name a ConfigMap in the pod's own
//! namespace, so a ConfigMap would have to be written into every meshed
//! namespace, and the control plane's RBAC grants no such write. By default
//! ([`TrustBundleSource::Annotation`]) the webhook therefore puts the PEM
//! bundle it serves in the pod annotation `trellis.io/trust-bundle` and the
//! projected volume turns that annotation into the file (downward API). The
//! bundle is public, small (a few KiB), and only used for first contact:
//! after that it arrives on the discovery stream. Operators who distribute a
//! ConfigMap themselves choose [`TrustBundleSource::ConfigMap`].
//!
//! # Who is injected
//!
//! The webhook's `namespaceSelector` sends Pods of namespaces labelled
//! `trellis.io/inject=enabled`; a second webhook entry sends Pods labelled
//! `trellis.io/inject=enabled` from other namespaces (the API server selects
//! on labels, never annotations). The server cannot see namespace labels
//! without an RBAC grant on namespaces, so it passes
//! [`NamespaceScope::SelectedByWebhook`]: being called means the namespace
//! opted in. Callers that know the labels pass [`NamespaceScope::Labels`].
//! Of the pods the webhook is sent, the annotation `trellis.io/inject`
//! (`enabled`/`disabled`) decides first, then the pod label of the same
//! name, then the namespace. The selectors act before that: a pod labelled
//! `disabled` is never sent, and outside a labelled namespace only pods
//! labelled `enabled` are, so the annotation alone cannot opt a pod in
//! there. Only CREATE is mutated.
//!
//! A value of `trellis.io/inject` that is neither `enabled` nor `disabled`
//! (`true`, `false`, `Enabled`) is never guessed at. On a pod the webhook is
//! sent, the annotation (or the label, when there is no annotation) with
//! such a value is an invalid annotation or label: the pod is denied naming
//! it (see Errors), so "false" meant as an opt-out neither gets a sidecar
//! nor silently runs without one. A value that decides nothing (a label the
//! annotation overrides; a namespace's label, which leaves the namespace
//! not opted in) is warned of, naming where the value is, the value and the
//! values allowed ([`UnknownInjectValue::warning`]). A typo that keeps the
//! API server from calling `/inject` at all (a pod's label outside an
//! opted-in namespace, a namespace's label) brings the pod to a
//! warning-only entry of the chart instead, whose path says which
//! ([`respond_unknown_label`]): the pod is admitted as it is, with the
//! warning, never changed or denied, since a stray label must not block the
//! pods of a namespace that never joined the mesh. The server counts every
//! such value, denied or warned of, and records each pod the warning-only
//! entries admit by its owner ([`UninjectedPods`]), until a pod of that
//! owner is injected: `kubectl` prints the
//! warning only for the pods it creates, not for a Deployment's, which
//! its controller creates, and `trellisctl check` names them instead. Pods on the host's network and Windows
//! pods are left alone (see [`Skip`]), and told so in a warning.
//!
//! A name under `trellis.io/` of the pod's annotations or labels that the
//! injector neither reads nor writes ([`POD_ANNOTATIONS`], [`POD_LABELS`])
//! is not read: a typo (`trellis.io/acces-log`) would be a setting the
//! author believes applied. It is no error, since a newer chart's
//! annotation must not block pods on an older control plane, but a
//! warning naming it, and the known name it is close to if one is
//! ([`UnknownName`]; at most [`MAX_UNKNOWN_NAME_WARNINGS`], then one that
//! stands for the rest), which the server counts. It is given when the
//! injector injects the pod, and again, in the same words, whenever it
//! reviews the pod with its sidecar (reinvoked after a later webhook,
//! which may have added such a name, changed the pod; or created from a
//! copied manifest): which names the first review saw is not known, but
//! the API server gives a client each warning text of one request once,
//! so a name warned of at injection is not printed twice. The line that
//! stands for the names past the first few says no number, so that it too
//! is the same text on both reviews when a later webhook added names, and
//! shows once. Such a review is not
//! counted again. A pod it leaves alone is told nothing.
//!
//! Idempotent: a pod with both containers `trellis-proxy` and
//! `trellis-init` is left as it is, so injecting twice equals injecting
//! once (a pod manifest copied from a running pod); a pod with only one of
//! them is denied. But for the containers the injection has not seen
//! (not named in [`INJECTED_CONTAINERS_ANNOTATION`], which it writes):
//! the chart's injecting entries are reinvoked (`reinvocationPolicy:
//! IfNeeded`), so when a webhook called after ours adds a container (a
//! Vault agent, a log shipper), the API server calls `/inject` again, and
//! the new container's probes and hooks are rewritten by the same code as
//! the first injection's (`probes`), its checks added to the sidecar's
//! `TRELLIS_APP_PROBES` (a `replace` of that one entry of its
//! environment) and its warnings given; it then joins the annotation, so a
//! further call has no patch ([`Injection::Rewritten`]). A container named
//! there with a probe or hook that does not call the sidecar was replaced
//! under the same name by a later webhook (or given a probe more by one),
//! and is rewritten as a new one, keeping the checks its probes and hooks
//! still call, without a warning for them. So is one named there of which
//! the sidecar runs a check that none of its probes and hooks calls: its
//! checks are now only ones injection leaves (`exec`, or a probe on a port
//! it does not declare, warned of as at injection), and its namesake's
//! checks leave `TRELLIS_APP_PROBES`, the other containers' staying. So
//! do the checks of a container the pod no longer has (a later webhook
//! took it out), by the same rule: none of the pod's probes and hooks
//! calls them. Nothing else new, the patch is the `replace` of that one
//! entry, the annotation left as it is (a name of a container the pod no
//! longer has names nothing). One
//! replaced by a container with nothing to rewrite, its namesake having
//! left no check in the sidecar, cannot be told from it and is taken as
//! seen, and nothing goes wrong in the pod: taken as new, nothing of it
//! would be rewritten (its probes and hooks are `exec` ones, of another
//! host, on a port it does not declare, or already call the sidecar) and
//! nothing added to or taken from `TRELLIS_APP_PROBES`, and the checks that
//! refuse a pod (ports, UID, below) run on it as on every container. What
//! it does not get are the warnings the first injection gives of such a
//! container: of a probe or hook on a port it does not declare (the kubelet
//! fails it with or without the sidecar), of one that calls an
//! `/app-health/` path the sidecar does not run (copied from another pod:
//! it fails either way, and such a hook keeps its token header rather than
//! take the pod's), and, under the outbound policy passthrough, of its
//! running as the sidecar's UID.
//! The settings the pod's annotations decide (`trellis.io/access-log`,
//! `trellis.io/tcp-user-timeout`, the two `trellis.io/max-h2-connections*`,
//! `trellis.io/opaque-ports` in the sidecar's environment; the three
//! `trellis.io/exclude-*` in `trellis-init`'s arguments) are derived again
//! on each such review, as an injection of the pod as it now is would
//! write them (the settings' own where it has no annotation), and what
//! differs is patched: each entry of the sidecar's environment in its
//! place (replaced, removed, or appended), and `trellis-init`'s `args`. So
//! an annotation a later webhook adds, changes or takes out is applied, not
//! silently dropped, and an opaque port's name is resolved against the
//! containers the pod has now (one a later webhook added or replaced
//! declaring it brings its number; one taken out takes it away). The pod
//! does not exist yet, so neither container has run: rewriting their
//! settings is as safe as the first injection writing them. An invalid
//! value (or a port name no container declares any more) is refused as at
//! injection, the message saying that the pod changed since injection and
//! naming the containers seen then that it has no more: refused rather
//! than admitted with a sidecar that runs otherwise than its annotations
//! say. Those entries are the injector's: one a later webhook writes on the
//! sidecar itself is made what the annotations say, and of several entries
//! of one name (the kubelet uses the last) all but the first go. A
//! `trellis-init` without arguments, or whose arguments do not start with
//! `init` (changed by a later webhook or by hand; then with a warning),
//! gets all of an injection's, of the sidecar's UID and ports. Nothing
//! differing, nothing is patched, so a third review has no patch. A manifest copied or restored from a pod injected under other
//! settings gets the current settings' values for these where it has no
//! annotation (the settings' `excludeInboundPorts`, `tcpUserTimeout`, ...),
//! as a new pod would; its UID and ports stay its sidecar's (below).
//! The first injection's checks (ports, UID) are checks of the pod as it
//! will run, not rewrites: each call applies them to every container of
//! the pod, seen or new, since one that passed them at injection passes
//! them again (they and the rewritten probes are of the sidecar the pod
//! carries: its `trellis-init` arguments' UID and ports and its
//! `trellis-admin` port, which a pod copied or restored after the settings
//! changed has from the earlier ones), and a container taken as seen (an ordinary init container a
//! later webhook added to a pod without the annotation) is held to them all
//! the same; only the warning of one running as the sidecar's UID under
//! passthrough is given for new containers alone, not to repeat it. A value of the annotation that is no
//! list of container names is an [`InjectError::InvalidAnnotation`], denied
//! whatever the failure policy. Without anything new
//! and no setting differing there is no patch. The annotation `trellis.io/injected` alone is not
//! enough: a pod that carries it without our containers (the annotation
//! copied by hand, or from a pod a later webhook took them out of, which
//! reinvokes this one) has no sidecar and is injected as any other, the
//! volumes of an earlier injection making way for the new ones. A pod runs in the
//! mesh, for the record of [`UninjectedPods`], when it has both
//! containers: one the warning-only entries admit with them (injected by
//! hand) is warned of its label but counts as injected, one without them
//! is recorded however it is annotated.
//!
//! # Errors
//!
//! A body that is not an `AdmissionReview` is a [`ReviewError`]: the server
//! answers HTTP 400 and the webhook's `failurePolicy` decides. A pod with an
//! invalid `trellis.io/*` annotation or label is denied, naming it, whatever
//! the failure policy: admitted, it would run outside the mesh, and only the
//! pod's author can fix it. So is a pod the mesh cannot serve as it is
//! ([`InjectError::PortClash`]: a container declares a TCP port the
//! sidecar listens on; [`InjectError::PortNameClash`]: a container declares
//! a port by a name the sidecar's ports have, `trellis-inbound` or
//! `trellis-admin`, which whatever finds the sidecar by name (a Service's
//! `targetPort`, the chart's sidecar PodMonitor) would take for it; [`InjectError::ProxyUid`]: under the outbound policy
//! deny, a container runs as the sidecar's UID, by its own or the pod's
//! `securityContext.runAsUser`, and would bypass it; under passthrough the
//! pod is injected with a warning; [`InjectError::InitWithoutProxy`]: our
//! init container without the sidecar; [`InjectError::ProxyWithoutInit`]:
//! the sidecar without our init, so nothing reaches it;
//! [`InjectError::SidecarAddress`]: reviewed with its sidecar, a
//! `trellis-init` whose arguments are missing or not `init`'s, beside a
//! sidecar whose `TRELLIS_INBOUND` or `TRELLIS_OUTBOUND` does not say its
//! port as an injection writes it, so init's could only be a guess). A pod that cannot
//! be injected for another reason (no trust bundle configured, not a Pod,
//! a sidecar environment a reinvocation cannot add checks to)
//! follows [`InjectConfig::failure_policy`], which the chart sets from the
//! same value as the webhook's `failurePolicy` (`Fail` by default there):
//! `Ignore` admits it unchanged with a warning that `kubectl` prints (a pod
//! injected before keeps its sidecar: `trellis: pod admitted as it is`);
//! `Fail`
//! (also the default of a settings file that names none) denies it with the
//! message. An object that is not a Pod is admitted with a warning whatever
//! the policy.
//!
//! The patch is a few `add` operations on whole fields
//! (`/metadata/annotations`, `/spec/initContainers`, `/spec/containers`,
//! `/spec/volumes`, `/spec/imagePullSecrets`); `add` replaces a member
//! that exists, so the patch applies whether or not the pod had them. A
//! reinvocation's patch `add`s `/metadata/annotations` (when a container
//! is new), `replace`s each new container it rewrote
//! (`/spec/containers/2`), the sidecar's environment entries that differ
//! (`TRELLIS_APP_PROBES`, a setting's `TRELLIS_*`) in their place and
//! `trellis-init`'s `args` (`add`s them where it has none), `remove`s the
//! entries to go, and `add`s what the sidecar's environment lacked where an
//! injection writes it (`/spec/initContainers/1/env/14`, or `env/-` when
//! that is the end), or the environment whole to a sidecar that has none.

mod annotations;
mod pod;
mod policy;
mod probes;
mod review;
pub mod server;
mod settings;
mod uninjected;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use trellis_core::TrustDomain;
use trellis_core::policy::ValidationContext;

pub use crate::config::OutboundPolicy;

pub(crate) use annotations::join;
use annotations::unknown_names;
pub use annotations::{
    MAX_LIST_ITEMS, MAX_UNKNOWN_NAME_WARNINGS, POD_ANNOTATIONS, POD_LABELS, UnknownName,
};
pub use pod::{InjectError, Injection, Skip, UnknownInjectValue, inject_pod};
use pod::{has_sidecar, unknown_inject_values};
pub use policy::{GROUP, respond_policy, review_policy};
pub use probes::{PROBE_KINDS, app_health_path};
pub use review::{
    ADMISSION_API_VERSION, AdmissionRequest, AdmissionResponse, GroupVersionKind, PatchKind,
    PatchOp, ReviewError,
};
pub use settings::InvalidSettings;
pub use uninjected::{Admitted, MAX_ENTRIES, MAX_INJECTED, Owner, UninjectedPod, UninjectedPods};

/// Label and annotation: `enabled` or `disabled`.
pub const INJECT_KEY: &str = "trellis.io/inject";
/// Annotation set on an injected pod.
pub const INJECTED_ANNOTATION: &str = "trellis.io/injected";
/// Annotation set on an injected pod: its own containers (app containers,
/// then init containers) the injection has seen, comma-separated. A
/// container missing from it (added by a later webhook, or to a copied
/// manifest), or named in it with a probe or hook that does not call the
/// sidecar (replaced under the same name, or given a probe more) or with a
/// check in the sidecar's `TRELLIS_APP_PROBES` it no longer calls (replaced
/// by one whose checks the injection leaves as they are), has its
/// probes and hooks rewritten when the pod is reviewed again, and joins it.
/// A value that is no comma list of container names (written by hand) is
/// refused naming it.
pub const INJECTED_CONTAINERS_ANNOTATION: &str = "trellis.io/injected-containers";
/// Annotation holding the PEM trust bundle ([`TrustBundleSource::Annotation`]).
pub const TRUST_BUNDLE_ANNOTATION: &str = "trellis.io/trust-bundle";
/// Comma lists of ports (inbound, outbound) and CIDRs that bypass the sidecar.
pub const EXCLUDE_INBOUND_PORTS: &str = "trellis.io/exclude-inbound-ports";
pub const EXCLUDE_OUTBOUND_PORTS: &str = "trellis.io/exclude-outbound-ports";
pub const EXCLUDE_OUTBOUND_CIDRS: &str = "trellis.io/exclude-outbound-cidrs";
/// Annotation: `"false"` turns the sidecar's access log off (default on).
pub const ACCESS_LOG_ANNOTATION: &str = "trellis.io/access-log";
/// Annotation: the sidecar's `--tcp-user-timeout` (`10m`; `0` for none).
pub const TCP_USER_TIMEOUT_ANNOTATION: &str = "trellis.io/tcp-user-timeout";
/// Annotation: the sidecar's `--max-h2-connections-per-peer` (`32`; 1 to
/// 1024).
pub const MAX_H2_CONNECTIONS_PER_PEER_ANNOTATION: &str = "trellis.io/max-h2-connections-per-peer";
/// Annotation: the sidecar's `--max-h2-connections` (`256`; 1 to 65536).
pub const MAX_H2_CONNECTIONS_ANNOTATION: &str = "trellis.io/max-h2-connections";
/// Annotation: the sidecar's own `--opaque-ports`, a comma list of ports
/// (`3306,6379`) or names of the pod's container ports (`mysql`).
pub const OPAQUE_PORTS_ANNOTATION: &str = "trellis.io/opaque-ports";

/// Names of what the injector adds.
pub const INIT_CONTAINER: &str = "trellis-init";
pub const PROXY_CONTAINER: &str = "trellis-proxy";
/// The names `trellis-proxy` declares its inbound and admin ports by; no
/// other container of the pod may declare a port so named.
pub const INBOUND_PORT_NAME: &str = "trellis-inbound";
pub const ADMIN_PORT_NAME: &str = "trellis-admin";
pub const IDENTITY_VOLUME: &str = "trellis-identity";
pub const XTABLES_VOLUME: &str = "trellis-xtables";
pub const IDENTITY_DIR: &str = "/var/run/trellis/identity";

/// The audience of the projected token; the control plane's TokenReview asks
/// for exactly this one.
pub const TOKEN_AUDIENCE: &str = "trellis";
/// The shortest token lifetime Kubernetes accepts for a projected token.
pub const MIN_TOKEN_EXPIRATION_SECONDS: i64 = 600;
/// The longest token lifetime Kubernetes accepts for a projected token
/// (2^32 seconds): the API server refuses a pod asking for more.
pub const MAX_TOKEN_EXPIRATION_SECONDS: i64 = 1 << 32;

/// What an injection failure does to the pod.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FailurePolicy {
    /// Admit the pod unchanged, with a warning.
    #[default]
    Ignore,
    /// Deny the pod with the message.
    Fail,
}

/// Where the sidecar finds the trust bundle for its first contact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrustBundleSource {
    /// This PEM, put in the pod annotation `trellis.io/trust-bundle` and
    /// projected as a file; the control plane passes the bundle it serves.
    Annotation(String),
    /// A ConfigMap of this name in the pod's namespace, key `bundle.pem`,
    /// distributed by the operator.
    ConfigMap(String),
}

/// Compute resources of one container, as Kubernetes quantities; `None`
/// leaves that one unset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resources {
    pub requests_cpu: Option<String>,
    pub requests_memory: Option<String>,
    /// Local disk (logs, writable layers, `emptyDir`), which clusters that
    /// enforce it (a LimitRange, a managed cluster) ask every container for.
    pub requests_ephemeral_storage: Option<String>,
    pub limits_cpu: Option<String>,
    pub limits_memory: Option<String>,
    pub limits_ephemeral_storage: Option<String>,
}

impl Resources {
    /// Each resource by its Kubernetes name, with its request and limit.
    pub fn by_name(&self) -> [(&'static str, &Option<String>, &Option<String>); 3] {
        [
            ("cpu", &self.requests_cpu, &self.limits_cpu),
            ("memory", &self.requests_memory, &self.limits_memory),
            (
                "ephemeral-storage",
                &self.requests_ephemeral_storage,
                &self.limits_ephemeral_storage,
            ),
        ]
    }

    fn quantities(
        requests_cpu: &str,
        requests_memory: &str,
        limits_cpu: &str,
        limits_memory: &str,
    ) -> Self {
        Self {
            requests_cpu: Some(requests_cpu.into()),
            requests_memory: Some(requests_memory.into()),
            limits_cpu: Some(limits_cpu.into()),
            limits_memory: Some(limits_memory.into()),
            ..Self::default()
        }
    }
}

/// An IP family of the cluster's pod addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    /// `0.0.0.0` or `::`: every address of the family.
    pub fn unspecified(self) -> IpAddr {
        match self {
            Self::V4 => Ipv4Addr::UNSPECIFIED.into(),
            Self::V6 => Ipv6Addr::UNSPECIFIED.into(),
        }
    }

    /// `127.0.0.1` or `::1`.
    pub fn loopback(self) -> IpAddr {
        match self {
            Self::V4 => Ipv4Addr::LOCALHOST.into(),
            Self::V6 => Ipv6Addr::LOCALHOST.into(),
        }
    }
}

/// Everything injection depends on besides the pod. The chart's values map
/// onto these fields one to one (`injection.*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectConfig {
    /// The one Trellis image; the sidecar and the init container run
    /// `trellis-proxy` from it.
    pub image: String,
    /// `Always`, `IfNotPresent`, `Never`, or `None` for the cluster default.
    pub image_pull_policy: Option<String>,
    /// Names of Secrets (`kubernetes.io/dockerconfigjson`) the kubelet pulls
    /// [`Self::image`] with, added to each injected pod's
    /// `spec.imagePullSecrets`; they must exist in every injected namespace.
    pub image_pull_secrets: Vec<String>,
    pub trust_domain: TrustDomain,
    /// The control plane's gRPC address as pods reach it (the Service).
    pub control_plane: String,
    pub trust_bundle: TrustBundleSource,
    /// Lifetime of the projected ServiceAccount token (at least 600).
    pub token_expiration_seconds: i64,
    pub proxy_resources: Resources,
    pub init_resources: Resources,
    /// The sidecar's UID (and GID), which init never redirects: a
    /// container of the pod running as it bypasses the sidecar. Not 0.
    pub proxy_uid: u32,
    /// The mesh's outbound policy (`--outbound-policy`), passed to init:
    /// under [`OutboundPolicy::Deny`] init drops the pod's UDP except DNS to
    /// its nameservers, and a pod with a container running as
    /// [`Self::proxy_uid`] is refused, since that container would reach
    /// what the mesh refuses; under `Passthrough` it is warned of.
    pub outbound_policy: OutboundPolicy,
    pub inbound_port: u16,
    pub outbound_port: u16,
    pub admin_port: u16,
    /// The IP families of the cluster's pod addresses, primary first, as
    /// Kubernetes orders `status.podIPs`; never empty. The kubelet probes
    /// `status.podIP`, an address of the first, so the sidecar's admin port
    /// listens on that family. The sidecar binds an IPv6 address for IPv6
    /// only, so no one address serves both.
    pub ip_families: Vec<IpFamily>,
    /// Excluded for every pod, before its own annotations.
    pub exclude_inbound_ports: Vec<u16>,
    pub exclude_outbound_ports: Vec<u16>,
    pub exclude_outbound_cidrs: Vec<String>,
    /// DNS (port 53) to the pod's nameservers, and to no other host, bypasses
    /// the sidecar (init's `--exclude-outbound-dns`).
    pub exclude_outbound_dns: bool,
    pub failure_policy: FailurePolicy,
    /// The sidecar's `--log-format`.
    pub log_format: trellis_core::logging::Format,
    /// The sidecar's `--tcp-user-timeout` for pods without the annotation
    /// `trellis.io/tcp-user-timeout`; `None`: none.
    pub tcp_user_timeout: Option<Duration>,
    /// The sidecar's `--max-h2-connections-per-peer` and
    /// `--max-h2-connections` for pods without the annotations
    /// `trellis.io/max-h2-connections-per-peer` and
    /// `trellis.io/max-h2-connections`.
    pub max_h2_connections_per_peer: usize,
    pub max_h2_connections: usize,
    /// What `/validate` checks policies against besides the trust domain:
    /// the mesh's opaque ports (`--opaque-ports`), on which L7 rules are
    /// refused, and its root namespace (`--root-namespace`), outside which
    /// a policy selects only workloads of its own namespace.
    pub validation: ValidationContext,
}

impl Default for InjectConfig {
    fn default() -> Self {
        Self {
            image: concat!("trellis/trellis:", env!("CARGO_PKG_VERSION")).to_owned(),
            image_pull_policy: None,
            image_pull_secrets: Vec::new(),
            trust_domain: TrustDomain::new("cluster.local").expect("a valid trust domain"),
            control_plane: "trellis-control-plane.trellis-system.svc:15012".to_owned(),
            trust_bundle: TrustBundleSource::Annotation(String::new()),
            token_expiration_seconds: 3600,
            proxy_resources: Resources::quantities("50m", "64Mi", "1", "256Mi"),
            init_resources: Resources::quantities("10m", "16Mi", "100m", "64Mi"),
            proxy_uid: 1337,
            outbound_policy: OutboundPolicy::Deny,
            inbound_port: trellis_core::policy::SIDECAR_INBOUND_PORT,
            outbound_port: trellis_core::policy::SIDECAR_OUTBOUND_PORT,
            admin_port: trellis_core::policy::SIDECAR_ADMIN_PORT,
            ip_families: vec![IpFamily::V4],
            exclude_inbound_ports: Vec::new(),
            exclude_outbound_ports: Vec::new(),
            exclude_outbound_cidrs: Vec::new(),
            // DNS reaches the cluster's DNS, which has no sidecar; port 53 of any
            // other host goes through the sidecar.
            exclude_outbound_dns: true,
            failure_policy: FailurePolicy::Fail,
            log_format: trellis_core::logging::Format::Json,
            tcp_user_timeout: Some(trellis_core::tcp::DEFAULT_USER_TIMEOUT),
            max_h2_connections_per_peer: trellis_core::h2_limits::DEFAULT_PER_PEER,
            max_h2_connections: trellis_core::h2_limits::DEFAULT_TOTAL,
            validation: ValidationContext::default(),
        }
    }
}

/// How the injector learns whether the pod's namespace opted in.
#[derive(Debug, Clone, Copy)]
pub enum NamespaceScope<'a> {
    /// The webhook's selectors already chose the namespace (the server).
    SelectedByWebhook,
    /// The namespace's labels; injection needs `trellis.io/inject=enabled`.
    Labels(&'a BTreeMap<String, String>),
}

/// The `/inject` webhook: reviews one Pod and answers with the patch that
/// injects it, no patch, or a denial (see the module docs).
pub fn review_pod(
    body: &[u8],
    scope: NamespaceScope<'_>,
    config: &InjectConfig,
) -> Result<AdmissionResponse, ReviewError> {
    let request = AdmissionRequest::parse(body)?;
    Ok(respond_pod(&request, scope, config))
}

/// [`review_pod`] for a request already read.
pub fn respond_pod(
    request: &AdmissionRequest,
    scope: NamespaceScope<'_>,
    config: &InjectConfig,
) -> AdmissionResponse {
    respond_pod_reporting(request, scope, config).response
}

/// [`respond_pod_reporting`]'s answer, and what the server counts and
/// records of it.
#[derive(Debug)]
pub struct PodReview {
    pub response: AdmissionResponse,
    /// The unknown values of `trellis.io/inject` the answer denies or
    /// warns about.
    pub unknown: Vec<UnknownInjectValue>,
    /// Where the pod injected by this answer has names under `trellis.io/`
    /// that are not the mesh's, which the answer warns of ([`UnknownName`]).
    /// A pod reviewed with its sidecar already is warned of them too, but
    /// not reported here: it was counted when injected.
    pub unknown_names: Vec<UnknownName>,
    /// The pod is created with the sidecar: injected by this answer, or
    /// before it ([`Skip::AlreadyInjected`]: the `trellis-proxy` and
    /// `trellis-init` containers, even when the pod is admitted as it is
    /// under `Ignore` because its sidecar cannot take the checks of the
    /// containers added since); its owner runs in the mesh.
    pub meshed: bool,
}

/// [`respond_pod`], with the unknown values of `trellis.io/inject` the
/// answer denies or warns about and the unknown names under `trellis.io/`
/// it warns of (for the server to count), and whether the pod created has
/// the sidecar.
pub fn respond_pod_reporting(
    request: &AdmissionRequest,
    scope: NamespaceScope<'_>,
    config: &InjectConfig,
) -> PodReview {
    let answer = |response, unknown| PodReview {
        response,
        unknown,
        unknown_names: Vec::new(),
        meshed: false,
    };
    let allow = AdmissionResponse::allow(&request.uid);
    let pod = match created_pod(request) {
        None => return answer(allow, Vec::new()),
        Some(Err(e)) => return answer(deny_or_warn(request, config, e), Vec::new()),
        Some(Ok(pod)) => pod,
    };
    let result = inject_pod(pod, scope, config);
    // Values that decided nothing are told of by the call that injects or
    // skips the pod. A pod created already injected (reinvoked after a
    // later webhook changed it, or its manifest copied from an injected
    // pod) is told nothing of them: whatever it carries was told of when
    // it, or the pod it came from, was injected. Only the containers the
    // injection had not seen are, by `Injection::Rewritten`.
    let unknown = |injected: bool| {
        unknown_inject_values(pod, scope)
            .into_iter()
            .map(|(found, value)| (found, found.warning(Some(&value), injected)))
            .unzip::<_, _, Vec<_>, Vec<_>>()
    };
    match result {
        Ok(Injection::Injected {
            patch,
            warnings: injection_warnings,
        }) => {
            let (found, mut warnings) = unknown(true);
            // Names the injector does not know are told of where it read
            // the pod's settings: a typo there is a setting not applied.
            let (unknown_names, names_warnings) = unknown_names(pod);
            warnings.extend(names_warnings);
            warnings.extend(injection_warnings);
            let response = AdmissionResponse {
                patch,
                warnings,
                ..allow
            };
            PodReview {
                meshed: true,
                unknown_names,
                ..answer(response, found)
            }
        }
        // Injected before, with containers the injection had not seen:
        // their probes and hooks rewritten, and the warnings about them.
        // Names the injector does not know are told of again (see
        // `told_again`).
        Ok(Injection::Rewritten {
            patch,
            warnings: rewrite_warnings,
        }) => {
            let mut warnings = told_again(pod);
            warnings.extend(rewrite_warnings);
            PodReview {
                meshed: true,
                ..answer(
                    AdmissionResponse {
                        patch,
                        warnings,
                        ..allow
                    },
                    Vec::new(),
                )
            }
        }
        // Both our containers: one without the other is refused.
        Ok(Injection::Skipped(Skip::AlreadyInjected)) => PodReview {
            meshed: true,
            ..answer(
                AdmissionResponse {
                    warnings: told_again(pod),
                    ..allow
                },
                Vec::new(),
            )
        },
        Ok(Injection::Skipped(skip)) => {
            let (found, mut warnings) = unknown(false);
            warnings.extend(skip.warning().map(str::to_owned));
            answer(AdmissionResponse { warnings, ..allow }, found)
        }
        Err(e) => {
            let found = match e {
                InjectError::InvalidAnnotation {
                    key: INJECT_KEY, ..
                } => vec![UnknownInjectValue::PodAnnotation],
                InjectError::InvalidLabel(_) => vec![UnknownInjectValue::PodLabel],
                _ => Vec::new(),
            };
            // Admitted all the same (a pod injected before, whose sidecar
            // cannot take its added containers' checks, under `Ignore`),
            // it runs in the mesh if it has the sidecar.
            let response = deny_or_warn(request, config, e);
            let meshed = response.allowed && has_sidecar(pod);
            PodReview {
                meshed,
                ..answer(response, found)
            }
        }
    }
}

/// The warnings of the names under `trellis.io/` that the injector does not
/// know, for a pod that carries its sidecar already: reinvoked after a
/// later webhook changed it, which may have added such a name, or created
/// from a copied manifest. Which of them the first review saw is not
/// known, so each is told of again in the same words: the API server
/// gives a client each text of one request's admission once, so a name
/// the injection warned of is not printed twice. The pod is not counted
/// again in the metrics ([`PodReview::unknown_names`] stays empty): it was
/// counted when injected, if it had such a name then.
fn told_again(pod: &serde_json::Value) -> Vec<String> {
    unknown_names(pod).1
}

/// The pod a review is about: `None` when the request is not a CREATE
/// (nothing to do), an error when it is not of a core `Pod` or carries no
/// object.
fn created_pod(request: &AdmissionRequest) -> Option<Result<&serde_json::Value, InjectError>> {
    if request.operation != "CREATE" {
        return None;
    }
    Some(
        if request.kind.group.is_empty() && request.kind.kind == "Pod" {
            request.object.as_ref().ok_or(InjectError::NoObject)
        } else {
            Err(InjectError::NotAPod(request.kind.to_string()))
        },
    )
}

/// The answer to a pod that cannot be injected.
fn deny_or_warn(
    request: &AdmissionRequest,
    config: &InjectConfig,
    e: InjectError,
) -> AdmissionResponse {
    let allow = AdmissionResponse::allow(&request.uid);
    match e {
        // The pod's own mistake: denied whatever the failure policy. It
        // is no outage to ride out, a retry never fixes it, and admitting
        // the pod would run it outside the mesh, open to plaintext and to
        // no policy; the denial shows as the ReplicaSet's FailedCreate.
        // Likewise a pod the mesh cannot serve as it is: a container on a
        // port of the sidecar's or on a port named as one of its, one
        // running as its UID under the outbound policy deny, our init
        // without the sidecar or the sidecar without our init.
        e @ (InjectError::InvalidAnnotation { .. }
        | InjectError::InvalidLabel(_)
        | InjectError::PortClash { .. }
        | InjectError::PortNameClash { .. }
        | InjectError::ProxyUid { .. }
        | InjectError::InitWithoutProxy
        | InjectError::ProxyWithoutInit
        | InjectError::SidecarAddress { .. }) => {
            AdmissionResponse::deny(&request.uid, format!("trellis: cannot inject: {e}"))
        }
        // Not a pod (a webhook rule widened by hand): nothing runs outside
        // the mesh by admitting it, and refusing it would block objects the
        // injector has no business with.
        e @ InjectError::NotAPod(_) => allow.with_warning(format!("trellis: {e}")),
        // A pod injected before, whose added containers' checks the
        // sidecar's environment cannot take: it keeps its sidecar.
        e @ InjectError::SidecarEnv(_) if config.failure_policy == FailurePolicy::Ignore => {
            allow.with_warning(format!("trellis: pod admitted as it is: {e}"))
        }
        e => match config.failure_policy {
            FailurePolicy::Ignore => {
                allow.with_warning(format!("trellis: sidecar not injected: {e}"))
            }
            FailurePolicy::Fail => {
                AdmissionResponse::deny(&request.uid, format!("trellis: cannot inject: {e}"))
            }
        },
    }
}

/// What a warning-only webhook admitted, for the server to record
/// ([`UninjectedPods`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelAdmission {
    /// A pod without the sidecar: it runs outside the mesh
    /// ([`UninjectedPods::record`]).
    Uninjected(UninjectedPod),
    /// A pod with the sidecar already (injected by hand, or created again
    /// from a running pod's manifest): its owner runs in the mesh
    /// ([`UninjectedPods::injected`]).
    Meshed(Owner),
}

/// The warning-only webhooks (`/inject/unknown-pod-label`,
/// `/inject/unknown-namespace-label`): the chart calls them for pods that
/// no injecting webhook is sent, because the pod's label `found` (or its
/// namespace's) has a value that is neither `enabled` nor `disabled`. The
/// pod is admitted as it is, never changed nor denied, with a warning that
/// it runs without a sidecar; what was admitted so is returned for the
/// server to count and record ([`UninjectedPods`]), by its owner at `now`
/// (Unix seconds; see [`Owner::of`]). A pod that has the sidecar already
/// (the `trellis-proxy` and `trellis-init` containers: the marker
/// annotation alone is not enough) is warned that it is injected all the same, and returned as
/// meshed. A pod whose label is
/// known by the time it is reviewed (a webhook before this one changed it)
/// gets no warning.
pub fn respond_unknown_label(
    request: &AdmissionRequest,
    found: UnknownInjectValue,
    now: i64,
) -> (AdmissionResponse, Option<LabelAdmission>) {
    let allow = AdmissionResponse::allow(&request.uid);
    let Some(Ok(pod)) = created_pod(request) else {
        return (allow, None);
    };
    let value = match found {
        UnknownInjectValue::NamespaceLabel => None,
        _ => match unknown_inject_values(pod, NamespaceScope::SelectedByWebhook).pop() {
            Some((_, value)) => Some(value),
            None => return (allow, None),
        },
    };
    let meshed = has_sidecar(pod);
    let warning = found.warning(value.as_deref(), meshed);
    let admitted = if meshed {
        LabelAdmission::Meshed(Owner::of(&request.namespace, pod, now))
    } else {
        LabelAdmission::Uninjected(UninjectedPod::of(
            &request.namespace,
            pod,
            now,
            found,
            value,
        ))
    };
    (allow.with_warning(warning), Some(admitted))
}
