//! The control plane's command line: flags, their `TRELLIS_*` environment
//! twins, and their validation.
//!
//! Parsing is pure: it never binds a port and never touches the state dir, so
//! invalid configuration exits (code 64, naming the flag) before anything
//! else happens.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::TypedValueParser;
use clap::{Parser, ValueEnum};
use rustls_pki_types::CertificateDer;
use trellis_core::TrustDomain;
use trellis_core::flags::{FlagNames, Given};
use trellis_core::logging::Format;
pub(crate) use trellis_core::policy::pattern::is_dns_label;
use trellis_core::policy::{DEFAULT_ROOT_NAMESPACE, SelectorScope, ValidationContext};
use trellis_core::tcp::parse_port;

use crate::authn::tokenreview::KubeApi;
use crate::ca::load_trust_anchors;
use crate::escape::shown;
use crate::inject::InjectConfig;

/// The shortest `--cert-ttl` accepted.
pub const MIN_CERT_TTL: Duration = Duration::from_secs(10);

/// The longest `--cert-ttl` accepted: 30 days. Workload certificates are
/// short-lived on purpose (the design's default is an hour): a leaf is
/// revoked only by `trellisctl identity revoke`, with the embedded store
/// (sidecars then refuse it as a peer); with the Kubernetes store it lives
/// until it expires. So its lifetime is how long a stolen key stays useful
/// to a thief nobody revoked. With `--renewal-proof token` (the default in Kubernetes) that
/// is any thief: a renewal needs the pod's ServiceAccount token too. With
/// renewals proved by the certificate (join tokens, `--renewal-proof
/// certificate`) it bounds only a thief who cannot reach the control plane
/// (one who can renews it as the sidecar does, until `trellisctl identity
/// revoke` stops that). Longer would also outlive the windows a CA rotation
/// is planned around.
pub const MAX_CERT_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// The exit code for invalid configuration (sysexits `EX_USAGE`).
pub const EXIT_USAGE: u8 = 64;

/// What happens when no policy decides, as pushed in every snapshot: the
/// engine's own type, so the flag and the sidecars agree on its values.
pub use trellis_core::policy::DefaultPolicy;

/// `--default-policy` values, listed in `--help` and in errors.
fn default_policy_parser() -> impl TypedValueParser<Value = DefaultPolicy> {
    clap::builder::PossibleValuesParser::new(["deny", "allow-same-namespace", "allow-mesh"])
        .try_map(|s| s.parse::<DefaultPolicy>())
}

/// `--root-namespace` (`TRELLIS_ROOT_NAMESPACE`), one flag for the control
/// plane and `trellisctl policy lint`, which must judge policies alike.
#[derive(Clone, Debug, clap::Args)]
pub struct RootNamespaceArg {
    /// The mesh's root namespace: a policy selects only workloads of its own
    /// namespace (spiffe://TD/ns/NAMESPACE/...), except one in this
    /// namespace, which may select any workload of the mesh; writing
    /// policies there is for the mesh's operators. The control plane and
    /// trellisctl policy lint must be given the same one; the chart passes
    /// the control plane's own namespace.
    #[arg(
        long,
        env = "TRELLIS_ROOT_NAMESPACE",
        value_name = "NAMESPACE",
        default_value = DEFAULT_ROOT_NAMESPACE,
        value_parser = parse_namespace
    )]
    pub root_namespace: String,
}

/// What happens to outbound traffic to a destination outside the mesh.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum OutboundPolicy {
    #[default]
    Deny,
    Passthrough,
}

impl OutboundPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deny => "deny",
            Self::Passthrough => "passthrough",
        }
    }
}

/// What proves a workload's identity for its first certificate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum IdentityProvider {
    /// Single-use join tokens made with `trellisctl token create` only.
    #[default]
    JoinToken,
    /// Join tokens, and projected ServiceAccount tokens checked with the
    /// Kubernetes TokenReview API (audience `trellis`).
    Kubernetes,
}

/// What proves a renewal: a Certify made with the current certificate as
/// the TLS client certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RenewalProof {
    /// The workload's ServiceAccount token, as for its first certificate:
    /// a certificate alone renews nothing, so a stolen key and certificate
    /// are useful only until the certificate expires, and a deleted pod's
    /// identity is not renewed.
    Token,
    /// The current certificate alone (sidecars of releases that renew
    /// without the token; join tokens, which are single-use).
    Certificate,
}

/// Where the control plane keeps its state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    /// One redb database and the CA files in --state-dir.
    #[default]
    Embedded,
    /// Policies as `trellis.io` CRDs, endpoints from Pods, the CA in the
    /// Secret --ca-secret: replicas are stateless.
    Kubernetes,
}

impl StoreKind {
    /// The value `--store` takes for it, as the log says it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Embedded => "embedded",
            Self::Kubernetes => "kubernetes",
        }
    }
}

/// Where the CA Secret's namespace is found inside a pod.
pub const IN_CLUSTER_NAMESPACE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// The Trellis control plane: CA, identity issuance and discovery.
#[derive(Clone, Debug, Parser)]
#[command(name = "trellis-control-plane", version, about)]
pub struct Config {
    /// Trust domain of the mesh (set once per mesh).
    #[arg(long, env = "TRELLIS_TRUST_DOMAIN", default_value = "cluster.local", value_parser = parse_trust_domain)]
    pub trust_domain: TrustDomain,

    /// Address of the gRPC API (TLS).
    #[arg(long, env = "TRELLIS_LISTEN", default_value = "127.0.0.1:15012")]
    pub listen: SocketAddr,

    /// Directory holding the embedded store, the CA and the operator credential.
    #[arg(long, env = "TRELLIS_STATE_DIR")]
    pub state_dir: PathBuf,

    /// Lifetime of issued workload certificates (at least 10s, at most 30
    /// days: with the embedded store `trellisctl identity revoke` makes
    /// sidecars refuse an identity's certificates and stops their renewal;
    /// with the Kubernetes store a certificate lives until it expires. So
    /// the lifetime bounds how long a stolen key is useful to a thief who
    /// cannot renew it and was not revoked; with --renewal-proof token, the
    /// Kubernetes default, no thief can renew it without the pod's
    /// ServiceAccount token).
    #[arg(long, env = "TRELLIS_CERT_TTL", default_value = "1h", value_parser = parse_cert_ttl)]
    pub cert_ttl: Duration,

    /// Address of the plain HTTP admin endpoint (/live, /ready, /metrics).
    #[arg(long, env = "TRELLIS_ADMIN", default_value = "127.0.0.1:15014")]
    pub admin: SocketAddr,

    /// Mesh default when no policy decides.
    #[arg(
        long,
        env = "TRELLIS_DEFAULT_POLICY",
        value_parser = default_policy_parser(),
        default_value = "deny"
    )]
    pub default_policy: DefaultPolicy,

    /// Outbound traffic to destinations outside the mesh.
    #[arg(long, env = "TRELLIS_OUTBOUND_POLICY", value_enum, default_value_t)]
    pub outbound_policy: OutboundPolicy,

    /// Inbound ports every sidecar treats as opaque TCP, never parsed as
    /// HTTP (databases, SMTP), besides each sidecar's own --opaque-ports;
    /// policies with L7 rules on them are refused.
    #[arg(
        long,
        env = "TRELLIS_OPAQUE_PORTS",
        value_name = "PORT,...",
        value_delimiter = ',',
        value_parser = parse_port
    )]
    pub opaque_ports: Vec<u16>,

    #[command(flatten)]
    pub root: RootNamespaceArg,

    /// Operator-supplied CA certificate (PEM: the signing CA first, then its
    /// chain up to the root). Requires --ca-key.
    #[arg(long, env = "TRELLIS_CA_CERT", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,

    /// Private key (PEM) of --ca-cert. Requires --ca-cert.
    #[arg(long, env = "TRELLIS_CA_KEY", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,

    /// With the embedded store: let the control plane generate a new root
    /// when `ca.crt` and `ca.key` are missing from --state-dir although its
    /// database shows a mesh lived on it (a lost CA, which is refused
    /// without it). Its sidecars trust the old root only: re-enroll them or
    /// make them trust the new root, and remove the flag.
    #[arg(long, env = "TRELLIS_NEW_ROOT")]
    pub new_root: bool,

    /// Roots (PEM CA certificates) to trust and publish in the trust bundle
    /// beside the signing CA's own: a new root before it signs, an old one
    /// until every certificate it signed has been renewed.
    #[arg(long, env = "TRELLIS_TRUST_ANCHORS", value_name = "FILE")]
    pub trust_anchors: Option<PathBuf>,

    /// The certificates of --trust-anchors, read and checked while parsing.
    #[arg(skip)]
    pub trust_anchor_roots: Vec<CertificateDer<'static>>,

    /// Extra DNS name for the control plane's serving certificate (repeatable).
    #[arg(long = "dns-name", env = "TRELLIS_DNS_NAME", value_name = "NAME", value_delimiter = ',', value_parser = parse_dns_name)]
    pub dns_names: Vec<String>,

    /// The other control-plane replicas' gRPC addresses (HOST:PORT, comma
    /// separated). `ListWorkloads` asks each for the sidecars streaming to
    /// it, so one answer covers every replica; a name is resolved on each
    /// call and every address it has is asked (a headless Service's name
    /// finds every replica, this one included, which recognises itself).
    #[arg(
        long,
        env = "TRELLIS_PEERS",
        value_name = "HOST:PORT,...",
        value_delimiter = ',',
        value_parser = parse_peer
    )]
    pub peers: Vec<String>,

    /// This replica's name in `ListWorkloads` answers [default: the host
    /// name, which in Kubernetes is the pod's name].
    #[arg(long, env = "TRELLIS_REPLICA_NAME", value_parser = parse_replica_name)]
    pub replica_name: Option<String>,

    /// Log output format.
    #[arg(long, env = "TRELLIS_LOG_FORMAT", value_enum, default_value_t)]
    pub log_format: Format,

    /// Address of the Kubernetes admission webhooks (HTTPS: /inject,
    /// /inject/unknown-pod-label, /inject/unknown-namespace-label,
    /// /validate); off unless given. Requires --webhook-cert and --webhook-key.
    #[arg(long, env = "TRELLIS_WEBHOOK", requires_all = ["webhook_cert", "webhook_key"])]
    pub webhook: Option<SocketAddr>,

    /// Serving certificate of --webhook (PEM, with its chain); re-read when it changes.
    #[arg(long, env = "TRELLIS_WEBHOOK_CERT", requires = "webhook")]
    pub webhook_cert: Option<PathBuf>,

    /// Private key (PEM) of --webhook-cert.
    #[arg(long, env = "TRELLIS_WEBHOOK_KEY", requires = "webhook")]
    pub webhook_key: Option<PathBuf>,

    /// Injection settings (JSON) for --webhook; defaults when not given.
    // Checked in `resolve`: clap's `requires` would name --webhook's own
    // requirements, not --webhook.
    #[arg(long, env = "TRELLIS_INJECT_CONFIG")]
    pub inject_config: Option<PathBuf>,

    /// The contents of --inject-config, read and checked while parsing.
    #[arg(skip)]
    pub inject_settings: Option<String>,

    /// What proves a workload's identity for its first certificate.
    /// `kubernetes` also accepts projected ServiceAccount tokens (TokenReview).
    #[arg(long, env = "TRELLIS_IDENTITY_PROVIDER", value_enum, default_value_t)]
    pub identity_provider: IdentityProvider,

    /// What proves a renewal besides the current certificate: `token` (the
    /// workload's ServiceAccount token, on every Certify; a renewal proved
    /// by the certificate alone is refused) or `certificate` (the
    /// certificate alone, for sidecars of releases that renew without the
    /// token, and join-token workloads) [default: token with
    /// --identity-provider kubernetes, else certificate; token needs
    /// --identity-provider kubernetes].
    #[arg(long, env = "TRELLIS_RENEWAL_PROOF", value_enum)]
    pub renewal_proof: Option<RenewalProof>,

    /// Record the inbound addresses sidecars report as reported. By default
    /// (embedded store) an address becomes a mesh endpoint only if the
    /// sidecar's Certify came from its IP (or, for a dual-stack sidecar,
    /// the address is of the other IP family and the report holds the IP it
    /// came from); others are logged and not recorded. Set this only where
    /// the control plane sees sidecars through NAT or a proxy: any workload
    /// with a certificate may then report any IP not already held. No
    /// effect with --store kubernetes (endpoints come from Pods).
    #[arg(long, env = "TRELLIS_TRUST_REPORTED_ADDRESSES")]
    pub trust_reported_addresses: bool,

    /// Connections to the gRPC port one client address may hold at once,
    /// from their accept (waiting for their TLS handshake, in it or
    /// served), from 1 to 65536; one more is closed as it is accepted.
    /// Sidecars dial from their pods' addresses and hold one or two each:
    /// raise it only where many reach the control plane from one address
    /// (through a NAT). Connections from the host's own address (127.0.0.1,
    /// ::1: a local mesh's sidecars) are spared it, but still count towards
    /// the port's 16384.
    #[arg(
        long,
        env = "TRELLIS_MAX_GRPC_CONNECTIONS_PER_CLIENT",
        value_name = "N",
        default_value_t = crate::server::MAX_CONNECTIONS_PER_CLIENT,
        value_parser = trellis_core::h2_limits::parse_total
    )]
    pub max_grpc_connections_per_client: usize,

    /// How long a connection to the gRPC port is kept with no request in
    /// flight (a Watch stream is one for as long as it lives), 1s or more;
    /// then it is closed gracefully (an HTTP/2 GOAWAY).
    #[arg(
        long,
        env = "TRELLIS_GRPC_IDLE_TIMEOUT",
        value_name = "DURATION",
        default_value = "5m",
        value_parser = parse_grpc_idle_timeout
    )]
    pub grpc_idle_timeout: Duration,

    /// Kubernetes API server URL (https://HOST:PORT); in a pod it defaults to
    /// https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT.
    #[arg(long, env = "TRELLIS_KUBE_API")]
    pub kube_api: Option<String>,

    /// CA (PEM) that verifies the Kubernetes API server [default: the pod's
    /// /var/run/secrets/kubernetes.io/serviceaccount/ca.crt].
    #[arg(long, env = "TRELLIS_KUBE_CA")]
    pub kube_ca: Option<PathBuf>,

    /// Bearer token for the Kubernetes API, re-read every minute [default:
    /// the pod's /var/run/secrets/kubernetes.io/serviceaccount/token].
    #[arg(long, env = "TRELLIS_KUBE_TOKEN_FILE")]
    pub kube_token_file: Option<PathBuf>,

    /// Where state lives: `embedded` (--state-dir) or `kubernetes` (CRDs,
    /// Pods and the CA Secret; needs --ca-secret and --identity-provider
    /// kubernetes).
    #[arg(long, env = "TRELLIS_STORE", value_enum, default_value_t)]
    pub store: StoreKind,

    /// Name of the Secret holding the mesh CA (`tls.crt`, `tls.key`) with
    /// --store kubernetes; an empty or missing Secret gets a new root.
    #[arg(long, env = "TRELLIS_CA_SECRET", value_parser = parse_object_name)]
    pub ca_secret: Option<String>,

    /// With --store kubernetes: let a replica generate a new root when
    /// --ca-secret is missing or empty although pods carry Trellis sidecars
    /// (a lost Secret, which is refused without it). Those sidecars trust
    /// the old root only: restart every meshed pod, and remove the flag.
    #[arg(long, env = "TRELLIS_CA_SECRET_NEW_ROOT")]
    pub ca_secret_new_root: bool,

    /// Namespace of --ca-secret [default: $POD_NAMESPACE, else the pod's
    /// service-account namespace file].
    #[arg(long, env = "TRELLIS_NAMESPACE", value_parser = parse_object_name)]
    pub namespace: Option<String>,

    /// With --store kubernetes: how long the watch of a policy kind may
    /// keep failing before the replica goes unready, if a peer replica
    /// (--peers) answers as healthy at two checks in a row, 5s apart; with
    /// none, it stays ready serving the policies it last saw, and says so
    /// (at least 1s).
    #[arg(
        long,
        env = "TRELLIS_WATCH_FAILURE_GRACE",
        default_value = "60s",
        value_parser = parse_watch_failure_grace
    )]
    pub watch_failure_grace: Duration,

    /// The Kubernetes API as resolved from the --kube-* flags and the pod's
    /// environment; set with --identity-provider kubernetes or --store
    /// kubernetes.
    #[arg(skip)]
    pub kube: Option<KubeApi>,
}

/// The outcome of parsing the command line.
pub enum Parsed {
    Run(Box<Config>),
    /// Help or version was printed; exit 0.
    Printed,
    /// The configuration is invalid; the message names the flag.
    Invalid(String),
}

impl Config {
    /// What policies written now are checked against: the mesh-wide opaque
    /// ports and the root namespace.
    pub fn validation_context(&self) -> ValidationContext {
        ValidationContext {
            opaque_ports: self.opaque_ports.clone(),
            stored: false,
            scope: SelectorScope::root(&self.root.root_namespace),
        }
    }

    pub fn parse_args(args: Vec<OsString>) -> Parsed {
        let args = with_program_name("trellis-control-plane", args);
        match Given::parse::<Self>(&args) {
            // A flag whose value came from its environment variable is
            // named with it: `resolve` names each flag through `given`.
            Ok((mut config, given)) => match config.resolve(&given) {
                Ok(()) => Parsed::Run(Box::new(config)),
                Err(message) => Parsed::Invalid(format!("error: {message}\n")),
            },
            Err(e) => classify_clap_error(e, &<Self as clap::CommandFactory>::command(), &args),
        }
    }

    /// Whether a renewal must prove the ServiceAccount token
    /// (`--renewal-proof token`, the default with `--identity-provider
    /// kubernetes`).
    pub fn renewals_need_token(&self) -> bool {
        self.renewal_proof == Some(RenewalProof::Token)
    }

    /// Checks what clap cannot: reads and validates `--inject-config`,
    /// `--webhook-cert`/`--webhook-key`, `--trust-anchors` and
    /// `--ca-cert`/`--ca-key`, resolves the Kubernetes API (its CA and token
    /// file read) for `--identity-provider kubernetes` and the default
    /// `--renewal-proof`. Each flag the error names is named by `names`.
    fn resolve(&mut self, names: &dyn FlagNames) -> Result<(), String> {
        let n = |flag: &str| names.name(flag);
        if self.inject_config.is_some() && self.webhook.is_none() {
            return Err(format!(
                "{} configures the injection webhook: it needs {} (with {} and {})",
                n("inject-config"),
                n("webhook"),
                n("webhook-cert"),
                n("webhook-key")
            ));
        }
        if let Some(path) = &self.trust_anchors {
            self.trust_anchor_roots =
                load_trust_anchors(path).map_err(|e| format!("{} {e}", n("trust-anchors")))?;
        }
        if let Some(path) = &self.inject_config {
            let json = std::fs::read_to_string(path).map_err(|e| {
                let e = trellis_core::io_error::IoWords(&e);
                format!("{} {}: {e}", n("inject-config"), shown(path))
            })?;
            InjectConfig::from_settings(&json, self.trust_domain.clone(), String::new())
                .map_err(|e| format!("{} {}: {e}", n("inject-config"), shown(path)))?;
            self.inject_settings = Some(json);
        }
        if let (Some(cert), Some(key)) = (&self.webhook_cert, &self.webhook_key) {
            crate::inject::server::check_serving_files(cert, key, names)?;
        }
        let kube_flags = [
            ("kube-api", self.kube_api.is_some()),
            ("kube-ca", self.kube_ca.is_some()),
            ("kube-token-file", self.kube_token_file.is_some()),
        ];
        match self.store {
            StoreKind::Kubernetes => self.resolve_kubernetes_store(names)?,
            StoreKind::Embedded => {
                // A flag combination: refused before the CA files are read,
                // so that it is the error whatever the files hold.
                if self.new_root && self.ca_cert.is_some() {
                    return Err(format!(
                        "{} is not used with {}/{}: it lets a generated CA lost from the \
                         state dir be replaced, and the CA is the operator's files",
                        n("new-root"),
                        n("ca-cert"),
                        n("ca-key")
                    ));
                }
                if let (Some(cert), Some(key)) = (&self.ca_cert, &self.ca_key) {
                    crate::ca::files::check_operator_ca(&self.trust_domain, cert, key, names)?;
                }
                for (flag, given) in [
                    ("ca-secret", self.ca_secret.is_some()),
                    ("ca-secret-new-root", self.ca_secret_new_root),
                    ("namespace", self.namespace.is_some()),
                ] {
                    if given {
                        return Err(format!(
                            "{} is only used with {} kubernetes",
                            n(flag),
                            n("store")
                        ));
                    }
                }
            }
        }
        self.renewal_proof = match (self.identity_provider, self.renewal_proof) {
            (IdentityProvider::Kubernetes, proof) => Some(proof.unwrap_or(RenewalProof::Token)),
            (_, Some(RenewalProof::Token)) => {
                return Err(format!(
                    "{} token needs {} kubernetes: without it no workload has a \
                     ServiceAccount token to prove, and renewals prove the current certificate",
                    n("renewal-proof"),
                    n("identity-provider")
                ));
            }
            (_, _) => Some(RenewalProof::Certificate),
        };
        let uses_kube = self.identity_provider == IdentityProvider::Kubernetes
            || self.store == StoreKind::Kubernetes;
        if uses_kube {
            self.kube = Some(KubeApi::resolve(
                self.kube_api.as_deref(),
                self.kube_ca.as_deref(),
                self.kube_token_file.as_deref(),
                names,
            )?);
        } else if let Some((flag, _)) = kube_flags.iter().find(|(_, given)| *given) {
            return Err(format!(
                "{} is only used with {} kubernetes or {} kubernetes",
                n(flag),
                n("identity-provider"),
                n("store")
            ));
        }
        Ok(())
    }

    /// Checks the flags `--store kubernetes` needs and finds the namespace
    /// of the CA Secret.
    fn resolve_kubernetes_store(&mut self, names: &dyn FlagNames) -> Result<(), String> {
        let n = |flag: &str| names.name(flag);
        if self.ca_secret.is_none() {
            return Err(format!(
                "{} kubernetes needs {} NAME (the Secret of the mesh CA)",
                n("store"),
                n("ca-secret")
            ));
        }
        if self.new_root {
            return Err(format!(
                "{} is only used with {} embedded: with {} kubernetes, use {}",
                n("new-root"),
                n("store"),
                n("store"),
                n("ca-secret-new-root")
            ));
        }
        if self.ca_cert.is_some() {
            return Err(format!(
                "{}/{} cannot be used with {} kubernetes: the CA lives in the Secret {}",
                n("ca-cert"),
                n("ca-key"),
                n("store"),
                n("ca-secret")
            ));
        }
        if self.identity_provider != IdentityProvider::Kubernetes {
            return Err(format!(
                "{} kubernetes needs {} kubernetes: the Kubernetes store keeps no join \
                 tokens, sidecars prove themselves with ServiceAccount tokens",
                n("store"),
                n("identity-provider")
            ));
        }
        if self.namespace.is_none() {
            let from_env = std::env::var("POD_NAMESPACE")
                .ok()
                .filter(|n| !n.is_empty());
            let from_file = || {
                std::fs::read_to_string(IN_CLUSTER_NAMESPACE)
                    .ok()
                    .map(|n| n.trim().to_owned())
                    .filter(|n| !n.is_empty())
            };
            let namespace = from_env.or_else(from_file).ok_or_else(|| {
                format!(
                    "{} kubernetes: no {} given (TRELLIS_NAMESPACE), POD_NAMESPACE is not set \
                     and {IN_CLUSTER_NAMESPACE} is missing (not running in a pod)",
                    n("store"),
                    n("namespace")
                )
            })?;
            self.namespace = Some(parse_object_name(&namespace).map_err(|e| {
                format!("the namespace {namespace:?} of the pod is not usable: {e}")
            })?);
        }
        Ok(())
    }
}

/// Puts a fixed program name in front of the flags: callers pass argv with its
/// first element, which may be any executable (the demo re-executes itself).
pub fn with_program_name(name: &str, mut args: Vec<OsString>) -> Vec<OsString> {
    if args.is_empty() {
        args.push(name.into());
    } else {
        args[0] = name.into();
    }
    args
}

/// Help or version asked for is printed (exit 0); anything else, a group
/// of subcommands called without one (`trellisctl policy`) included, is a
/// usage error whose text (there, the group's help) goes to stderr, so a
/// script that left the subcommand out does not pass for having run one;
/// what the user gave is shown escaped there (`escape_given`). A value
/// refused from a flag's environment variable, not from `args` (the
/// command line of `command`), names the variable too
/// (`environment_refusal`).
pub fn classify_clap_error(e: clap::Error, command: &clap::Command, args: &[OsString]) -> Parsed {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            Parsed::Printed
        }
        _ => match crate::escape::environment_refusal(&e, command, args) {
            Some(refusal) => Parsed::Invalid(format!("error: {refusal}\n")),
            None => Parsed::Invalid(crate::escape::escape_given(e).render().to_string()),
        },
    }
}

fn parse_trust_domain(s: &str) -> Result<TrustDomain, String> {
    TrustDomain::new(s).map_err(|e| e.to_string())
}

fn parse_watch_failure_grace(s: &str) -> Result<Duration, String> {
    const MIN: Duration = Duration::from_secs(1);
    let grace = trellis_core::duration::parse(s)?;
    if grace < MIN {
        return Err(format!(
            "{s} is shorter than the minimum of {}",
            trellis_core::duration::words(MIN)
        ));
    }
    Ok(grace)
}

fn parse_grpc_idle_timeout(s: &str) -> Result<Duration, String> {
    const MIN: Duration = Duration::from_secs(1);
    let timeout = trellis_core::duration::parse(s)?;
    if timeout < MIN {
        return Err(format!(
            "{s} is shorter than the minimum of {}",
            trellis_core::duration::words(MIN)
        ));
    }
    Ok(timeout)
}

fn parse_cert_ttl(s: &str) -> Result<Duration, String> {
    let ttl = trellis_core::duration::parse(s)?;
    if ttl < MIN_CERT_TTL {
        return Err(format!(
            "{s} is shorter than the minimum of {}",
            trellis_core::duration::words(MIN_CERT_TTL)
        ));
    }
    if ttl > MAX_CERT_TTL {
        return Err(format!(
            "{s} is longer than the maximum of {}: a workload certificate lives until it \
             expires unless its identity is revoked (trellisctl identity revoke, with the \
             embedded store only), so its lifetime bounds how long a stolen key is useful to a \
             thief who cannot renew it",
            trellis_core::duration::words(MAX_CERT_TTL)
        ));
    }
    Ok(ttl)
}

/// Whether `name` is a Kubernetes object name: an RFC 1123 DNS subdomain
/// (DNS labels joined by `.`, at most 253 bytes).
pub(crate) fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253 && name.split('.').all(is_dns_label)
}

/// A Kubernetes object or namespace name ([`is_dns_subdomain`]).
fn parse_object_name(s: &str) -> Result<String, String> {
    if is_dns_subdomain(s) {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?} is not a Kubernetes name (lower case letters, digits, '-' and '.')"
        ))
    }
}

/// A Kubernetes namespace name (RFC 1123 DNS label), as policies name
/// theirs.
pub fn parse_namespace(s: &str) -> Result<String, String> {
    if is_dns_label(s) {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?} is not a namespace name (at most 63 lower case letters, digits and '-', starting and ending with a letter or digit)"
        ))
    }
}

/// Letters, digits, `.`, `-` and `_`, as a pod or host name has them.
fn parse_replica_name(s: &str) -> Result<String, String> {
    let fine = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_');
    if s.is_empty() || s.len() > 253 || !s.chars().all(fine) {
        return Err(format!(
            "{s:?} is not a replica name (1 to 253 letters, digits, '.', '-' or '_')"
        ));
    }
    Ok(s.to_owned())
}

/// A peer replica: an IP address and port, or a DNS name and port.
fn parse_peer(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.parse::<SocketAddr>().is_ok() {
        return Ok(s.to_owned());
    }
    let invalid = || {
        format!(
            "{s:?} is not HOST:PORT (an IP address, or a DNS name such as a headless Service's, and the gRPC port)"
        )
    };
    let (host, port) = s.rsplit_once(':').ok_or_else(invalid)?;
    parse_port(port).map_err(|_| invalid())?;
    parse_dns_name(host).map_err(|_| invalid())?;
    Ok(s.to_ascii_lowercase())
}

fn parse_dns_name(s: &str) -> Result<String, String> {
    rustls_pki_types::DnsName::try_from(s)
        .map(|_| s.to_ascii_lowercase())
        .map_err(|_| format!("{s:?} is not a valid DNS name"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Parsed {
        Config::parse_args(args.iter().map(OsString::from).collect())
    }

    /// A directory holding a self-signed certificate and its key, as
    /// `tls.crt` and `tls.key` (serving files, or a CA), and the paths of
    /// both: the flags naming them are checked by reading them.
    fn pem_files() -> (tempfile::TempDir, String, String) {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let path = |name: &str| dir.path().join(name).display().to_string();
        let (cert_path, key_path) = (path("tls.crt"), path("tls.key"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (dir, cert_path, key_path)
    }

    /// A CA as [`pem_files`] makes it and a bearer token file beside it,
    /// and the paths of both: the `--kube-ca` and `--kube-token-file` files,
    /// checked by reading them.
    fn kube_files() -> (tempfile::TempDir, String, String) {
        let (dir, ca, _) = pem_files();
        let token = dir.path().join("token").display().to_string();
        std::fs::write(&token, "a-bearer-token\n").unwrap();
        (dir, ca, token)
    }

    /// The flags of the Kubernetes identity provider: the API server at
    /// `https://127.0.0.1:6443`, trusted with the CA file `ca`, called with
    /// the bearer token in the file `token`.
    fn kube_args<'a>(ca: &'a str, token: &'a str) -> [&'a str; 8] {
        [
            "--identity-provider",
            "kubernetes",
            "--kube-api",
            "https://127.0.0.1:6443",
            "--kube-ca",
            ca,
            "--kube-token-file",
            token,
        ]
    }

    #[test]
    fn peers_are_addresses_or_names_with_a_port() {
        let Parsed::Run(c) = parse(&[
            "x",
            "--state-dir",
            "d",
            "--peers",
            "10.0.0.7:15012,[fd00::7]:15012,Trellis-Peers.trellis.svc:15012",
        ]) else {
            panic!("should parse")
        };
        assert_eq!(
            c.peers,
            [
                "10.0.0.7:15012",
                "[fd00::7]:15012",
                "trellis-peers.trellis.svc:15012"
            ]
        );
        for bad in [
            "trellis-peers",
            "trellis-peers:0",
            "bad_name!:15012",
            "10.0.0.7",
        ] {
            let Parsed::Invalid(message) = parse(&["x", "--state-dir", "d", "--peers", bad]) else {
                panic!("{bad} should be refused")
            };
            assert!(
                message.contains("--peers") && message.contains("HOST:PORT"),
                "{message}"
            );
        }
    }

    #[test]
    fn defaults_match_the_design() {
        let Parsed::Run(c) = parse(&["x", "--state-dir", "d"]) else {
            panic!("should parse")
        };
        assert_eq!(c.trust_domain.as_str(), "cluster.local");
        assert_eq!(c.listen.to_string(), "127.0.0.1:15012");
        assert_eq!(c.admin.to_string(), "127.0.0.1:15014");
        assert_eq!(c.cert_ttl, Duration::from_secs(3600));
        assert_eq!(c.default_policy, DefaultPolicy::Deny);
        assert_eq!(c.outbound_policy, OutboundPolicy::Deny);
        assert_eq!(c.root.root_namespace, "trellis-system");
        assert_eq!(
            c.watch_failure_grace,
            crate::store::kubernetes::WATCH_FAILURE_GRACE
        );
    }

    #[test]
    fn the_watch_failure_grace_is_a_duration_of_a_second_or_more() {
        let Parsed::Run(c) = parse(&["x", "--state-dir", "d", "--watch-failure-grace", "5m"])
        else {
            panic!("should parse")
        };
        assert_eq!(c.watch_failure_grace, Duration::from_secs(300));
        for bad in ["500ms", "0s", "soon"] {
            let args = ["x", "--state-dir", "d", "--watch-failure-grace", bad];
            let Parsed::Invalid(message) = parse(&args) else {
                panic!("{bad} should be refused")
            };
            assert!(message.contains("--watch-failure-grace"), "{message}");
        }
    }

    #[test]
    fn the_grpc_idle_timeout_is_five_minutes_or_a_duration_of_a_second_or_more() {
        let Parsed::Run(c) = parse(&["x", "--state-dir", "d"]) else {
            panic!("should parse")
        };
        assert_eq!(c.grpc_idle_timeout, crate::server::DEFAULT_IDLE_TIMEOUT);
        let Parsed::Run(c) = parse(&["x", "--state-dir", "d", "--grpc-idle-timeout", "90s"]) else {
            panic!("should parse")
        };
        assert_eq!(c.grpc_idle_timeout, Duration::from_secs(90));
        for bad in ["500ms", "0s", "off", "soon"] {
            let args = ["x", "--state-dir", "d", "--grpc-idle-timeout", bad];
            let Parsed::Invalid(message) = parse(&args) else {
                panic!("{bad} should be refused")
            };
            assert!(message.contains("--grpc-idle-timeout"), "{message}");
        }
    }

    #[test]
    fn the_root_namespace_is_a_namespace_name_and_scopes_validation() {
        let Parsed::Run(c) = parse(&["x", "--state-dir", "d", "--root-namespace", "mesh-admin"])
        else {
            panic!("should parse")
        };
        assert_eq!(
            c.validation_context().scope,
            SelectorScope::root("mesh-admin")
        );
        for bad in ["", "Mesh", "mesh.admin", "-mesh"] {
            let flag = format!("--root-namespace={bad}");
            let Parsed::Invalid(msg) = parse(&["x", "--state-dir", "d", &flag]) else {
                panic!("{bad:?} must be refused")
            };
            assert!(msg.contains("--root-namespace"), "{msg}");
        }
        let command = <Config as clap::CommandFactory>::command();
        let flag = command
            .get_arguments()
            .find(|a| a.get_long() == Some("root-namespace"))
            .expect("--root-namespace is a flag");
        assert_eq!(
            flag.get_env(),
            Some(std::ffi::OsStr::new("TRELLIS_ROOT_NAMESPACE"))
        );
    }

    /// `trellisctl policy lint` must judge policies as the control plane
    /// does, so its `--root-namespace` is the control plane's flag: one help
    /// text in both `--help` outputs, one environment variable, one default.
    #[test]
    fn trellisctl_policy_lint_takes_the_control_plane_s_root_namespace_flag() {
        use clap::CommandFactory;

        let flag = |command: &clap::Command| {
            command
                .get_arguments()
                .find(|a| a.get_long() == Some("root-namespace"))
                .cloned()
                .unwrap_or_else(|| panic!("{} has no --root-namespace", command.get_name()))
        };
        let mut control_plane = Config::command();
        let mut ctl = crate::ctl::Cli::command();
        let lint = ctl
            .find_subcommand_mut("policy")
            .and_then(|policy| policy.find_subcommand_mut("lint"))
            .expect("trellisctl policy lint");
        let (ours, theirs) = (flag(&control_plane), flag(lint));
        let help = ours.get_help().expect("a help text").to_string();
        assert!(help.starts_with("The mesh's root namespace"), "{help}");
        assert_eq!(
            theirs.get_help().map(ToString::to_string),
            Some(help.clone())
        );
        assert_eq!(
            ours.get_long_help().map(ToString::to_string),
            theirs.get_long_help().map(ToString::to_string)
        );
        assert_eq!(ours.get_env(), theirs.get_env());
        assert_eq!(ours.get_default_values(), [DEFAULT_ROOT_NAMESPACE]);
        assert_eq!(theirs.get_default_values(), [DEFAULT_ROOT_NAMESPACE]);
        assert_eq!(ours.get_value_names(), theirs.get_value_names());
        for help_output in [
            control_plane.render_long_help().to_string(),
            lint.render_long_help().to_string(),
        ] {
            assert!(help_output.contains(&help), "{help_output}");
        }
    }

    #[test]
    fn rejects_short_ttl_naming_the_flag() {
        let Parsed::Invalid(msg) = parse(&["x", "--state-dir", "d", "--cert-ttl", "5s"]) else {
            panic!("5s must be refused")
        };
        assert!(msg.contains("--cert-ttl"), "{msg}");
    }

    #[test]
    fn rejects_a_ttl_above_thirty_days_naming_the_flag() {
        for long in ["31d", "1000y", "18446744073709551615s"] {
            let Parsed::Invalid(msg) = parse(&["x", "--state-dir", "d", "--cert-ttl", long]) else {
                panic!("{long} must be refused")
            };
            assert!(msg.contains("--cert-ttl"), "{long}: {msg}");
        }
        let Parsed::Run(c) = parse(&["x", "--state-dir", "d", "--cert-ttl", "30d"]) else {
            panic!("30 days is the longest lifetime accepted")
        };
        assert_eq!(c.cert_ttl, MAX_CERT_TTL);
    }

    #[test]
    fn webhook_needs_its_certificate_and_key() {
        let Parsed::Invalid(msg) = parse(&["x", "--state-dir", "d", "--webhook", "0.0.0.0:15017"])
        else {
            panic!("--webhook alone must be refused")
        };
        assert!(msg.contains("--webhook-cert"), "{msg}");
        let Parsed::Invalid(msg) = parse(&["x", "--state-dir", "d", "--webhook-cert", "c.pem"])
        else {
            panic!("--webhook-cert without --webhook must be refused")
        };
        assert!(msg.contains("--webhook"), "{msg}");
        let (_dir, cert, key) = pem_files();
        let Parsed::Run(c) = parse(&[
            "x",
            "--state-dir",
            "d",
            "--webhook",
            "0.0.0.0:15017",
            "--webhook-cert",
            &cert,
            "--webhook-key",
            &key,
        ]) else {
            panic!("a complete webhook should parse")
        };
        assert_eq!(c.webhook.unwrap().port(), 15017);
        assert!(c.inject_settings.is_none());
    }

    #[test]
    fn kubernetes_identity_takes_the_kube_flags() {
        let (_dir, ca, token) = kube_files();
        let Parsed::Run(c) =
            parse(&[&["x", "--state-dir", "d"], &kube_args(&ca, &token)[..]].concat())
        else {
            panic!("should parse")
        };
        let kube = c.kube.unwrap();
        assert_eq!(kube.url.to_string(), "https://127.0.0.1:6443/");
        assert_eq!(kube.ca, PathBuf::from(&ca));
        assert_eq!(kube.token_file, PathBuf::from(&token));
        let Parsed::Invalid(msg) = parse(&["x", "--state-dir", "d", "--kube-api", "https://h"])
        else {
            panic!("--kube-api without the kubernetes provider must be refused")
        };
        assert!(msg.contains("--identity-provider kubernetes"), "{msg}");
        let Parsed::Invalid(msg) = parse(&[
            "x",
            "--state-dir",
            "d",
            "--identity-provider",
            "kubernetes",
            "--kube-api",
            "http://h",
        ]) else {
            panic!("plain http must be refused")
        };
        assert!(msg.contains("--kube-api"), "{msg}");
    }

    /// The token file is re-read when used, but one that cannot be read or
    /// holds no token is invalid configuration at start, naming the flag and
    /// the file, never what the file holds.
    #[test]
    fn an_unusable_kube_token_file_is_invalid_configuration_naming_flag_and_file() {
        let (dir, ca, _) = kube_files();
        let path = |name: &str| dir.path().join(name).display().to_string();
        let (missing, empty, spaced) = (path("missing"), path("empty"), path("spaced"));
        std::fs::write(&empty, " \n").unwrap();
        std::fs::write(&spaced, "secret part\n").unwrap();
        for (file, why) in [
            (&missing, "no such file or directory"),
            (&empty, "the file is empty"),
            (
                &spaced,
                "the token has characters a bearer token cannot have",
            ),
        ] {
            let args = [&["x", "--state-dir", "d"], &kube_args(&ca, file)[..]].concat();
            let Parsed::Invalid(msg) = parse(&args) else {
                panic!("{file} must be refused")
            };
            assert!(
                msg.starts_with(&format!("error: --kube-token-file {file}: {why}")),
                "{msg}"
            );
            assert!(!msg.contains("secret"), "{msg}");
        }
    }

    /// In Kubernetes a renewal proves the ServiceAccount token unless told
    /// otherwise; without Kubernetes there is no such token, so asking for
    /// it is refused, naming the flag, and renewals prove the certificate.
    #[test]
    fn the_renewal_proof_is_the_token_in_kubernetes_only() {
        let (_dir, ca, token) = kube_files();
        let kube = kube_args(&ca, &token);
        let needs_token = |extra: &[&str]| {
            let args = [&["x", "--state-dir", "d"], extra].concat();
            match parse(&args) {
                Parsed::Run(c) => Ok(c.renewals_need_token()),
                Parsed::Invalid(message) => Err(message),
                Parsed::Printed => panic!("{args:?} printed"),
            }
        };
        assert_eq!(needs_token(&kube), Ok(true));
        let with = |proof: &'static str| [&kube[..], &["--renewal-proof", proof]].concat();
        assert_eq!(needs_token(&with("token")), Ok(true));
        assert_eq!(needs_token(&with("certificate")), Ok(false));
        assert_eq!(needs_token(&[]), Ok(false));
        assert_eq!(needs_token(&["--renewal-proof", "certificate"]), Ok(false));
        let refused = needs_token(&["--renewal-proof", "token"]).unwrap_err();
        assert!(
            refused.contains("--renewal-proof token needs --identity-provider kubernetes"),
            "{refused}"
        );
        let refused = needs_token(&with("signature")).unwrap_err();
        assert!(refused.contains("--renewal-proof"), "{refused}");
    }
    #[test]
    fn the_kubernetes_store_takes_its_flags_and_refuses_what_it_cannot_use() {
        let (_dir, ca, token) = kube_files();
        let kube = kube_args(&ca, &token);
        let with = |extra: &[&str]| {
            let mut args = vec!["x", "--state-dir", "d", "--store", "kubernetes"];
            args.extend(extra);
            parse(&args)
        };
        let mut complete = kube.to_vec();
        complete.extend(["--ca-secret", "trellis-ca", "--namespace", "trellis"]);
        let Parsed::Run(c) = with(&complete) else {
            panic!("should parse")
        };
        assert_eq!(c.store, StoreKind::Kubernetes);
        assert_eq!(c.ca_secret.as_deref(), Some("trellis-ca"));
        assert_eq!(c.namespace.as_deref(), Some("trellis"));
        assert!(c.kube.is_some());

        let Parsed::Invalid(msg) = with(&kube) else {
            panic!("a missing --ca-secret must be refused")
        };
        assert!(msg.contains("--ca-secret"), "{msg}");
        let Parsed::Invalid(msg) = with(&["--ca-secret", "c", "--namespace", "n"]) else {
            panic!("join tokens cannot be kept in the Kubernetes store")
        };
        assert!(msg.contains("--identity-provider kubernetes"), "{msg}");
        let mut operator_ca = complete.clone();
        operator_ca.extend(["--ca-cert", "c.pem", "--ca-key", "k.pem"]);
        let Parsed::Invalid(msg) = with(&operator_ca) else {
            panic!("an operator CA cannot be used with the Secret")
        };
        assert!(msg.contains("--ca-cert"), "{msg}");
        let mut bad_name = kube.to_vec();
        bad_name.extend(["--ca-secret", "Trellis_CA", "--namespace", "n"]);
        let Parsed::Invalid(msg) = with(&bad_name) else {
            panic!("an invalid Secret name must be refused")
        };
        assert!(msg.contains("--ca-secret"), "{msg}");

        let Parsed::Invalid(msg) = parse(&["x", "--state-dir", "d", "--ca-secret", "c"]) else {
            panic!("--ca-secret without the Kubernetes store must be refused")
        };
        assert!(msg.contains("--store kubernetes"), "{msg}");

        assert!(!c.ca_secret_new_root);
        let mut new_root = complete.clone();
        new_root.push("--ca-secret-new-root");
        let Parsed::Run(c) = with(&new_root) else {
            panic!("should parse")
        };
        assert!(c.ca_secret_new_root);
        let Parsed::Invalid(msg) = parse(&["x", "--state-dir", "d", "--ca-secret-new-root"]) else {
            panic!("--ca-secret-new-root without the Kubernetes store must be refused")
        };
        assert_eq!(
            msg,
            "error: --ca-secret-new-root is only used with --store kubernetes\n"
        );
    }

    #[test]
    fn opaque_ports_are_a_list_of_ports() {
        let Parsed::Run(c) = parse(&["x", "--state-dir", "d", "--opaque-ports", "5432,25"]) else {
            panic!("should parse")
        };
        assert_eq!(c.opaque_ports, [5432, 25]);
        for bad in ["0", "70000", "smtp", "25,", "5432-5440"] {
            let Parsed::Invalid(msg) = parse(&["x", "--state-dir", "d", "--opaque-ports", bad])
            else {
                panic!("{bad} must be refused")
            };
            assert!(msg.contains("--opaque-ports"), "{msg}");
        }
    }

    #[test]
    fn trust_anchors_are_read_from_the_flag_or_its_environment_twin() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("anchors.pem");
        let (ca, root_pem, _) =
            crate::ca::CertificateAuthority::generate(&TrustDomain::new("td").unwrap()).unwrap();
        std::fs::write(&file, root_pem).unwrap();
        let path = file.to_str().unwrap();
        let Parsed::Run(c) = parse(&["x", "--state-dir", "d", "--trust-anchors", path]) else {
            panic!("should parse")
        };
        assert_eq!(c.trust_anchors.as_deref(), Some(file.as_path()));
        assert_eq!(c.trust_anchor_roots, ca.bundle());
        let Parsed::Run(c) = parse(&["x", "--state-dir", "d"]) else {
            panic!("should parse")
        };
        assert!(c.trust_anchor_roots.is_empty());

        // The twin is read from the process environment (which tests leave
        // alone); the binary's tests set it.
        let command = <Config as clap::CommandFactory>::command();
        let flag = command
            .get_arguments()
            .find(|a| a.get_long() == Some("trust-anchors"))
            .expect("--trust-anchors is a flag");
        assert_eq!(
            flag.get_env(),
            Some(std::ffi::OsStr::new("TRELLIS_TRUST_ANCHORS"))
        );
    }

    #[test]
    fn unusable_trust_anchors_are_invalid_configuration_naming_flag_and_file() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("anchors.pem");
        std::fs::write(&file, "").unwrap();
        let path = file.to_str().unwrap();
        let missing = tmp.path().join("missing.pem");
        for (file, why) in [
            (path, "no certificate in it"),
            (missing.to_str().unwrap(), "cannot read it"),
        ] {
            let Parsed::Invalid(msg) = parse(&["x", "--state-dir", "d", "--trust-anchors", file])
            else {
                panic!("{file} must be refused")
            };
            assert!(
                msg.starts_with(&format!("error: --trust-anchors {file}: {why}")),
                "{msg}"
            );
        }
    }

    #[test]
    fn ca_cert_requires_ca_key() {
        let Parsed::Invalid(msg) = parse(&["x", "--state-dir", "d", "--ca-cert", "c.pem"]) else {
            panic!("--ca-cert alone must be refused")
        };
        assert!(msg.contains("--ca-key"), "{msg}");
    }

    /// `--inject-config` alone is refused naming `--webhook`, the flag it
    /// needs, not `--webhook`'s own requirements; its file is not read.
    #[test]
    fn inject_config_without_webhook_names_webhook() {
        let args = ["x", "--state-dir", "d", "--inject-config", "missing.json"];
        let Parsed::Invalid(msg) = parse(&args) else {
            panic!("--inject-config without --webhook must be refused")
        };
        assert!(msg.contains("it needs --webhook"), "{msg}");
        assert!(!msg.contains("missing.json"), "{msg}");
    }
}
