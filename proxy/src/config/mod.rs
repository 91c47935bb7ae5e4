//! Command-line flags (with `TRELLIS_<FLAG>` environment twins) and their
//! validation into a [`Config`].
//!
//! This module owns parsing and checking configuration. It must never bind a
//! socket or talk to the network: invalid configuration is reported (exit 64)
//! before any port is bound.

use std::ffi::OsString;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::{Parser, Subcommand};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use trellis_core::escape::{environment_refusal, escape_given, shown};
use trellis_core::io_error::IoWords;
use trellis_core::logging::Format;
use trellis_core::{SpiffeId, TrustDomain, h2_limits};

use crate::admin::access::HookToken;
use crate::admin::probes::AppProbes;

mod listen;

pub use listen::{DEFAULT_INBOUND, DEFAULT_OUTBOUND, Listen};
pub use trellis_core::flags::{AsTyped, FlagNames, Given};

/// `trellis-proxy`: the Trellis sidecar.
#[derive(Debug, Parser)]
#[command(name = "trellis-proxy", version, about = "The Trellis sidecar")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub proxy: ProxyArgs,
}

/// What clap says of flags it refuses in `args` (argv), with what the user
/// gave that it quotes escaped ([`escape_given`]), as the control plane and
/// trellisctl say it: a value refused from a flag's environment twin names
/// the variable ([`environment_refusal`]).
pub fn refusal_text(e: clap::Error, args: &[OsString]) -> String {
    match environment_refusal(&e, &<Cli as clap::CommandFactory>::command(), args) {
        Some(refusal) => format!("error: {refusal}\n"),
        None => escape_given(e).render().to_string(),
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Program iptables in the pod network namespace.
    Init(crate::init::InitArgs),
}

/// Flags of the sidecar itself.
#[derive(Debug, Clone, clap::Args)]
pub struct ProxyArgs {
    /// Control plane gRPC address (host:port).
    #[arg(long, env = "TRELLIS_CONTROL_PLANE", default_value = "127.0.0.1:15012")]
    pub control_plane: String,
    /// PEM roots used to verify the control plane on first contact
    /// (required).
    #[arg(long, env = "TRELLIS_TRUST_BUNDLE")]
    pub trust_bundle: Option<PathBuf>,
    /// This workload's SPIFFE ID (required); its trust domain is the
    /// mesh's.
    #[arg(long, env = "TRELLIS_IDENTITY")]
    pub identity: Option<String>,
    /// File holding the token that proves this workload's identity for its
    /// first certificate (required).
    #[arg(long, env = "TRELLIS_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// What --token-file holds: `join` (a single-use token from `trellisctl
    /// token create`) or `service-account` (a projected Kubernetes
    /// ServiceAccount token with audience `trellis`, re-read for every
    /// certificate because the kubelet rotates it, and sent with renewals
    /// too; a renewal whose file cannot be read is made with the
    /// certificate alone).
    #[arg(long, env = "TRELLIS_TOKEN_TYPE", default_value = "join")]
    pub token_type: String,
    /// Inbound mTLS listeners (repeatable; comma-separated in the
    /// environment). Default: `0.0.0.0:15006` and `[::]:15006`, the IPv6 one
    /// only where the network namespace has IPv6.
    #[arg(
        long,
        env = "TRELLIS_INBOUND",
        value_name = "ADDR",
        value_delimiter = ','
    )]
    pub inbound: Vec<String>,
    /// The local application that connections made straight to the inbound
    /// listener are forwarded to (a connection redirected by interception goes
    /// to the address its caller dialled).
    #[arg(long, env = "TRELLIS_APP", default_value = "127.0.0.1:8080")]
    pub app: String,
    /// Transparent outbound listeners, where iptables redirects the app's
    /// connections (repeatable; comma-separated in the environment).
    /// Default: `127.0.0.1:15001` and `[::1]:15001`, the IPv6 one only where
    /// the network namespace has IPv6.
    #[arg(
        long,
        env = "TRELLIS_OUTBOUND",
        value_name = "ADDR",
        value_delimiter = ','
    )]
    pub outbound: Vec<String>,
    /// Explicit outbound route LOCAL_ADDR=SPIFFE_ID@REMOTE_ADDR (repeatable;
    /// comma-separated in the environment).
    #[arg(
        long = "route",
        env = "TRELLIS_ROUTE",
        value_name = "ROUTE",
        value_delimiter = ','
    )]
    pub routes: Vec<String>,
    /// Let --route and --outbound listen on an address other than
    /// loopback. Such a listener lends this sidecar's identity to every
    /// client that reaches it: each connection it accepts, from any host,
    /// leaves over mTLS as this workload.
    #[arg(long, env = "TRELLIS_ALLOW_NON_LOOPBACK_LISTENERS")]
    pub allow_non_loopback_listeners: bool,
    /// Admin listener: /live /ready /metrics, /config (loopback peers only)
    /// and the app's probes and hooks under /app-health/.
    #[arg(long, env = "TRELLIS_ADMIN", default_value = "127.0.0.1:15020")]
    pub admin: String,
    /// Inbound address reported to the control plane, each a mesh endpoint
    /// (repeatable, e.g. a pod's IPv4 and IPv6 address; comma-separated in
    /// the environment). An IP without a port gets the port of the first
    /// --inbound address. Default: the inbound addresses, an unspecified
    /// one as loopback (recorded only where this sidecar reaches the
    /// control plane over loopback, on its host; elsewhere, give an
    /// address peers can reach).
    #[arg(
        long,
        env = "TRELLIS_ADVERTISE_ADDRESS",
        value_name = "ADDR",
        value_delimiter = ','
    )]
    pub advertise_address: Vec<String>,
    /// How long the drain after SIGTERM may last at most: the inbound
    /// listeners close at once, the outbound ones keep accepting (for an
    /// app making its last calls) until the drain ends, and the
    /// connections still open then are cut (a TCP connection reset at both
    /// apps). The admin port serves until
    /// exit (`/ready` answers 503 while draining).
    #[arg(long, env = "TRELLIS_DRAIN_TIMEOUT", default_value = "10s")]
    pub drain_timeout: String,
    /// The drain after SIGTERM ends once no connection has been open for
    /// this long (0: as soon as none is); at most --drain-timeout. Default:
    /// 1s, or --drain-timeout if that is shorter.
    #[arg(long, env = "TRELLIS_DRAIN_IDLE", value_name = "D")]
    pub drain_idle: Option<String>,
    /// How long data sent on a connection to or from beyond the pod may go
    /// unacknowledged, or the peer keep its receive window closed, before
    /// the kernel resets the connection (TCP_USER_TIMEOUT): 80s to 1h, or
    /// 0 for none. It also decides when keepalive gives up on a silent
    /// peer.
    #[arg(
        long,
        env = "TRELLIS_TCP_USER_TIMEOUT",
        default_value = "2m",
        value_name = "DURATION"
    )]
    pub tcp_user_timeout: String,
    /// Log format: text or json.
    #[arg(
        long,
        env = "TRELLIS_LOG_FORMAT",
        value_enum,
        default_value_t,
        hide_possible_values = true
    )]
    pub log_format: Format,
    /// Close open inbound connections that a new policy denies (true or
    /// false); new connections are always decided by the policies in force.
    #[arg(
        long,
        env = "TRELLIS_CLOSE_DENIED_CONNECTIONS",
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_name = "true|false"
    )]
    pub close_denied_connections: bool,
    /// Inbound ports never inspected as HTTP (databases, SMTP, server-first
    /// protocols): comma-separated; their traffic gets L4 decisions only.
    /// A policy's L7 rules on them fail closed: a DENY rule's deny the
    /// whole connection, an ALLOW rule's allow nothing.
    #[arg(
        long,
        env = "TRELLIS_OPAQUE_PORTS",
        value_name = "PORT,...",
        value_delimiter = ',',
        value_parser = trellis_core::tcp::parse_port
    )]
    pub opaque_ports: Vec<u16>,
    /// Write one JSON line per HTTP request to stdout (target
    /// `trellis::access`), whatever --log-format says.
    #[arg(
        long,
        env = "TRELLIS_ACCESS_LOG",
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_name = "true|false"
    )]
    pub access_log: bool,
    /// The app's own kubelet probes, served on the admin port at
    /// `/app-health/<container>/<kind>`: a JSON object from that path to
    /// {"httpGet": {...}}, {"tcpSocket": {...}} or {"grpc": {...}}, as the
    /// injector writes it.
    #[arg(long, env = "TRELLIS_APP_PROBES", value_name = "JSON")]
    pub app_probes: Option<String>,
    /// The secret the kubelet's calls of the app's lifecycle hooks
    /// (`/app-health/<container>/post-start|pre-stop`) carry in the
    /// `x-trellis-hook-token` header, as the injector writes it; a hook
    /// called without it is refused. Unset: hooks run for any caller.
    #[arg(
        long,
        env = "TRELLIS_HOOK_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub hook_token: Option<String>,
    /// HTTP/2 connections the inbound port serves at once from one peer
    /// (a SPIFFE ID calling from one address); one more is refused with
    /// GOAWAY (ENHANCE_YOUR_CALM). Each may hold about 13 MiB of answers
    /// its caller does not read. At most 1024.
    #[arg(
        long,
        env = "TRELLIS_MAX_H2_CONNECTIONS_PER_PEER",
        default_value_t = trellis_core::h2_limits::DEFAULT_PER_PEER.to_string(),
        value_name = "N"
    )]
    pub max_h2_connections_per_peer: String,
    /// HTTP/2 connections the inbound port serves at once from all peers;
    /// one more is refused with GOAWAY (REFUSED_STREAM). At most 65536.
    #[arg(
        long,
        env = "TRELLIS_MAX_H2_CONNECTIONS",
        default_value_t = trellis_core::h2_limits::DEFAULT_TOTAL.to_string(),
        value_name = "N"
    )]
    pub max_h2_connections: String,
}

/// The flags a sidecar cannot start without.
const REQUIRED: [&str; 3] = ["identity", "trust-bundle", "token-file"];

/// What the flag `flag` of [`REQUIRED`] holds, any other flag named as
/// `names` does.
fn holds(flag: &str, names: &dyn FlagNames) -> String {
    match flag {
        "identity" => "this workload's SPIFFE ID \
                       (spiffe://<trust domain>/ns/<namespace>/sa/<service account>)"
            .to_owned(),
        "trust-bundle" => {
            "the PEM roots that verify the control plane (its state dir's bundle.pem)".to_owned()
        }
        _ => format!(
            "the file of the token that proves this workload for its first certificate \
             (`trellisctl token create`, or a projected ServiceAccount token with {} \
             service-account)",
            names.name("token-type")
        ),
    }
}

/// The refusal of flags without one of [`REQUIRED`], if any is missing:
/// it names the first missing and what it holds, then every other one
/// missing, so a first start from the README learns of them all at once,
/// not one run after another.
fn missing_required(args: &ProxyArgs, names: &dyn FlagNames) -> Option<InvalidFlag> {
    let given = [
        args.identity.is_some(),
        args.trust_bundle.is_some(),
        args.token_file.is_some(),
    ];
    let mut missing = REQUIRED
        .iter()
        .zip(given)
        .filter(|(_, given)| !given)
        .map(|(flag, _)| *flag);
    let flag = missing.next()?;
    let holds = holds(flag, names);
    let others: Vec<String> = missing.map(|other| names.name(other)).collect();
    let also = match others.as_slice() {
        [] => String::new(),
        [one] => format!("; {one} is missing too"),
        [first @ .., last] => format!("; {} and {last} are missing too", first.join(", ")),
    };
    Some(invalid(flag, format!("is required: {holds}{also}")))
}

/// How long the drain waits with no connection open before it ends,
/// unless `--drain-idle` says otherwise (or `--drain-timeout` is shorter).
const DEFAULT_DRAIN_IDLE: Duration = Duration::from_secs(1);

/// An invalid flag: names the flag and says what is wrong with its value.
#[derive(Debug, thiserror::Error)]
#[error("invalid --{flag}: {reason}")]
pub struct InvalidFlag {
    pub flag: &'static str,
    pub reason: String,
}

fn invalid(flag: &'static str, reason: impl fmt::Display) -> InvalidFlag {
    InvalidFlag {
        flag,
        reason: reason.to_string(),
    }
}

/// An explicit outbound route: plaintext on `local`, mTLS to `remote`, whose
/// server must present `spiffe_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub local: SocketAddr,
    pub spiffe_id: SpiffeId,
    /// `host:port`; resolved when dialled.
    pub remote: String,
}

impl FromStr for Route {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (local, rest) = s
            .split_once('=')
            .ok_or("expected LOCAL_ADDR=SPIFFE_ID@REMOTE_ADDR")?;
        let (id, remote) = rest
            .rsplit_once('@')
            .ok_or("expected LOCAL_ADDR=SPIFFE_ID@REMOTE_ADDR")?;
        let local = local
            .parse()
            .map_err(|e| format!("local address {local:?}: {e}"))?;
        let spiffe_id = SpiffeId::parse(id).map_err(|e| format!("SPIFFE ID {id:?}: {e}"))?;
        trellis_core::grpc::check_host_port(remote)
            .map_err(|e| format!("remote address {remote:?}: {e}"))?;
        Ok(Route {
            local,
            spiffe_id,
            remote: remote.to_string(),
        })
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}@{}", self.local, self.spiffe_id, self.remote)
    }
}

/// The validated configuration of a sidecar.
#[derive(Debug, Clone)]
pub struct Config {
    pub control_plane: String,
    pub identity: SpiffeId,
    pub trust_domain: TrustDomain,
    /// DER roots from --trust-bundle; never empty.
    pub trust_bundle: Vec<CertificateDer<'static>>,
    /// How the first certificate is proved (always given). Never logged.
    pub token: Option<Credential>,
    /// Never empty.
    pub inbound: Vec<Listen>,
    pub app: SocketAddr,
    /// Never empty.
    pub outbound: Vec<Listen>,
    pub routes: Vec<Route>,
    pub admin: SocketAddr,
    /// Reported to the control plane; never empty.
    pub advertise_addresses: Vec<SocketAddr>,
    pub drain_timeout: Duration,
    /// The drain ends once no connection has been open this long; never
    /// longer than `drain_timeout`.
    pub drain_idle: Duration,
    /// `TCP_USER_TIMEOUT` of the connections to and from beyond the pod;
    /// `None`: none (`--tcp-user-timeout 0`).
    pub tcp_user_timeout: Option<Duration>,
    pub log_format: Format,
    /// Close open inbound connections that new policies deny.
    pub close_denied_connections: bool,
    /// Inbound ports whose traffic is never inspected as HTTP.
    pub opaque_ports: Vec<u16>,
    /// Whether HTTP requests are written to the access log.
    pub access_log: bool,
    /// The app probes the admin port runs (`--app-probes`).
    pub app_probes: AppProbes,
    /// What a request for one of the app's lifecycle hooks must carry
    /// (`--hook-token`); `None`: hooks run for any caller. Never logged.
    pub hook_token: Option<HookToken>,
    /// HTTP/2 connections served at once on the inbound port: from one
    /// peer, and in all; never zero.
    pub max_h2_connections_per_peer: usize,
    pub max_h2_connections: usize,
}

/// A join token; its `Debug` never shows the secret.
#[derive(Clone)]
pub struct Token(pub String);

/// What proves this workload's identity when it has no valid certificate.
#[derive(Clone, Debug)]
pub enum Credential {
    /// A single-use join token. The file is read again for each Certify
    /// that needs a token, so an operator can write a new one once the
    /// first was used and the certificate expired (the control plane away
    /// longer than its lifetime) without restarting the sidecar; the token
    /// read at start-up serves when the file is gone (removed once read).
    JoinToken { path: PathBuf, at_start: Token },
    /// The file of a projected ServiceAccount token. The kubelet rewrites it
    /// before it expires, so it is read again for every Certify.
    ServiceAccountToken(PathBuf),
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

fn addr(flag: &'static str, s: &str) -> Result<SocketAddr, InvalidFlag> {
    s.parse()
        .map_err(|e| invalid(flag, format_args!("{s:?} is not an ip:port address ({e})")))
}

/// The sidecar's plaintext listeners, as configured: the routes' and the
/// outbound ones. A route whose remote is one of them would dial itself.
fn plaintext_listeners<'a>(
    routes: &'a [Route],
    outbound: &'a [Listen],
) -> impl Iterator<Item = SocketAddr> + Clone + 'a {
    routes
        .iter()
        .map(|r| r.local)
        .chain(outbound.iter().map(|l| l.addr))
}

impl Config {
    /// The sidecar's plaintext listeners, as configured: the routes' and
    /// the outbound ones. A route whose remote is one of them would dial
    /// itself.
    pub fn plaintext_listeners(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        plaintext_listeners(&self.routes, &self.outbound)
    }

    /// Validates parsed flags, reading the bundle and token files; a
    /// refusal names any other flag as typed ([`AsTyped`]), for flags no
    /// environment variable gave.
    pub fn from_args(args: &ProxyArgs) -> Result<Self, InvalidFlag> {
        Self::from_given(args, &AsTyped)
    }

    /// Validates parsed flags, reading the bundle and token files; a
    /// refusal names any flag besides the one refused as `names` does
    /// (its [`Given`], for the flags of a run).
    pub fn from_given(args: &ProxyArgs, names: &dyn FlagNames) -> Result<Self, InvalidFlag> {
        let Some(id) = args.identity.as_deref() else {
            return Err(
                missing_required(args, names).unwrap_or_else(|| invalid("identity", "is required"))
            );
        };
        let identity = SpiffeId::parse(id).map_err(|e| invalid("identity", e))?;
        if let Some(missing) = missing_required(args, names) {
            return Err(missing);
        }
        let trust_domain = identity.trust_domain();
        trellis_core::grpc::check_host_port(&args.control_plane)
            .map_err(|e| invalid("control-plane", e))?;
        // Without a trust bundle or a token a sidecar could never certify:
        // it would run for ever, never ready. `missing_required` refused
        // flags without either above, before any port is bound.
        let trust_bundle = match &args.trust_bundle {
            None => return Err(invalid("trust-bundle", "is required")),
            Some(path) => read_bundle(path).map_err(|e| invalid("trust-bundle", e))?,
        };
        let token = match (&args.token_file, args.token_type.as_str()) {
            (None, "join" | "service-account") => {
                return Err(invalid("token-file", "is required"));
            }
            (Some(path), "join") => Some(Credential::JoinToken {
                path: path.clone(),
                at_start: Token(read_token(path)?),
            }),
            (Some(path), "service-account") => {
                // Read once now so a missing or empty file fails start-up.
                read_token(path)?;
                Some(Credential::ServiceAccountToken(path.clone()))
            }
            (_, other) => {
                return Err(invalid(
                    "token-type",
                    format_args!("{other:?} is not join or service-account"),
                ));
            }
        };
        let inbound = listen::listens("inbound", &args.inbound, &DEFAULT_INBOUND)?;
        let app = addr("app", &args.app)?;
        let outbound = listen::listens("outbound", &args.outbound, &DEFAULT_OUTBOUND)?;
        let admin = addr("admin", &args.admin)?;
        let routes = args
            .routes
            .iter()
            .map(|r| r.parse::<Route>().map_err(|e| invalid("route", e)))
            .collect::<Result<Vec<_>, _>>()?;
        // A route whose remote is one of the sidecar's own plaintext
        // listeners (a route's, or the outbound one) would dial itself, each
        // connection making another until file descriptors run out. A host
        // name is checked for each connection, once resolved
        // (`outbound::Shared::plaintext_listeners`).
        {
            let own = plaintext_listeners(&routes, &outbound);
            for route in &routes {
                let Ok(remote) = route.remote.parse::<SocketAddr>() else {
                    continue;
                };
                let loops = own
                    .clone()
                    .any(|listen| crate::net::reaches(listen, remote));
                if loops {
                    return Err(invalid(
                        "route",
                        format_args!(
                            "{route}: the remote {} is this sidecar's own listener, which would dial itself",
                            route.remote
                        ),
                    ));
                }
            }
        }
        // A plaintext listener leaves over mTLS as this workload, asking
        // its clients nothing: off loopback, any host that reaches it would
        // be served under this sidecar's identity.
        if !args.allow_non_loopback_listeners {
            let outbound = outbound.iter().map(|l| ("outbound", l.addr, String::new()));
            let routes = routes.iter().map(|r| ("route", r.local, format!("{r}: ")));
            if let Some((flag, addr, route)) = outbound
                .chain(routes)
                .find(|(_, addr, _)| !addr.ip().to_canonical().is_loopback())
            {
                return Err(invalid(
                    flag,
                    format_args!(
                        "{route}{addr} is not a loopback address: every client that reaches it \
                         would be served under this sidecar's identity; listen on 127.0.0.1 or \
                         [::1], or pass {} to lend the identity to every client that reaches it",
                        names.name("allow-non-loopback-listeners")
                    ),
                ));
            }
        }
        let advertise_addresses = listen::advertise(&args.advertise_address, &inbound)?;
        let drain_timeout = trellis_core::duration::parse(&args.drain_timeout)
            .map_err(|e| invalid("drain-timeout", e))?;
        let drain_idle = match &args.drain_idle {
            None => DEFAULT_DRAIN_IDLE.min(drain_timeout),
            Some(given) => {
                let idle =
                    trellis_core::duration::parse(given).map_err(|e| invalid("drain-idle", e))?;
                if idle > drain_timeout {
                    return Err(invalid(
                        "drain-idle",
                        format_args!(
                            "{given} is longer than {} {}: every drain would last the whole timeout",
                            names.name("drain-timeout"),
                            args.drain_timeout
                        ),
                    ));
                }
                idle
            }
        };
        let tcp_user_timeout = trellis_core::tcp::parse_user_timeout(&args.tcp_user_timeout)
            .map_err(|e| invalid("tcp-user-timeout", e))?;
        let app_probes = match args.app_probes.as_deref().map(str::trim) {
            None | Some("") => AppProbes::default(),
            Some(json) => AppProbes::parse(json).map_err(|e| invalid("app-probes", e))?,
        };
        let hook_token = match args.hook_token.as_deref() {
            None => None,
            Some(token) => Some(HookToken::parse(token).map_err(|e| invalid("hook-token", e))?),
        };
        let max_h2_connections_per_peer =
            h2_limits::parse_per_peer(&args.max_h2_connections_per_peer)
                .map_err(|e| invalid("max-h2-connections-per-peer", e))?;
        let max_h2_connections = h2_limits::parse_total(&args.max_h2_connections)
            .map_err(|e| invalid("max-h2-connections", e))?;
        Ok(Config {
            control_plane: args.control_plane.clone(),
            identity,
            trust_domain,
            trust_bundle,
            token,
            inbound,
            app,
            outbound,
            routes,
            admin,
            advertise_addresses,
            drain_timeout,
            drain_idle,
            tcp_user_timeout,
            log_format: args.log_format,
            close_denied_connections: args.close_denied_connections,
            opaque_ports: args.opaque_ports.clone(),
            access_log: args.access_log,
            app_probes,
            hook_token,
            max_h2_connections_per_peer,
            max_h2_connections,
        })
    }
}

/// The trimmed contents of a token file, which must not be empty.
pub fn read_token(path: &Path) -> Result<String, InvalidFlag> {
    let raw = std::fs::read_to_string(path).map_err(|e| {
        invalid(
            "token-file",
            format_args!("{}: {}", shown(path), IoWords(&e)),
        )
    })?;
    let token = raw.trim();
    if token.is_empty() {
        return Err(invalid(
            "token-file",
            format_args!("{} is empty", shown(path)),
        ));
    }
    Ok(token.to_string())
}

fn read_bundle(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{}: {}", shown(path), IoWords(&e)))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", shown(path)))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", shown(path)));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A trust bundle and a join token, as files, for configurations that
    /// need them.
    pub(super) fn credential_files() -> &'static (tempfile::TempDir, String, String) {
        static FILES: std::sync::OnceLock<(tempfile::TempDir, String, String)> =
            std::sync::OnceLock::new();
        FILES.get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::default();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let root = params.self_signed(&key).unwrap();
            let (bundle, token) = (dir.path().join("bundle.pem"), dir.path().join("token"));
            std::fs::write(&bundle, root.pem()).unwrap();
            std::fs::write(&token, "join-token\n").unwrap();
            let path = |p: std::path::PathBuf| p.to_str().unwrap().to_owned();
            (dir, path(bundle), path(token))
        })
    }

    /// The configuration of `trellis-proxy --identity spiffe://td/ns/a/sa/b
    /// --trust-bundle B --token-file T EXTRA`; also the listener tests'.
    pub(super) fn args(extra: &[&str]) -> Result<Config, InvalidFlag> {
        let cli = Cli::try_parse_from(argv(extra)).expect("clap parses");
        Config::from_args(&cli.proxy)
    }

    /// The command line [`args`] parses.
    fn argv<'a>(extra: &[&'a str]) -> Vec<&'a str> {
        let (_, bundle, token) = credential_files();
        let mut argv = vec![
            "trellis-proxy",
            "--identity",
            "spiffe://td/ns/a/sa/b",
            "--trust-bundle",
            bundle,
            "--token-file",
            token,
        ];
        argv.extend_from_slice(extra);
        argv
    }

    /// Without a trust bundle or a token a sidecar could never certify:
    /// refused naming the flag, not run for ever never ready.
    #[test]
    fn a_trust_bundle_and_a_token_are_required() {
        let (_, bundle, token) = credential_files();
        let without = |drop: &str| {
            let mut argv = vec!["trellis-proxy", "--identity", "spiffe://td/ns/a/sa/b"];
            if drop != "trust-bundle" {
                argv.extend(["--trust-bundle", bundle]);
            }
            if drop != "token-file" {
                argv.extend(["--token-file", token]);
            }
            let cli = Cli::try_parse_from(argv).expect("clap parses");
            Config::from_args(&cli.proxy).unwrap_err()
        };
        for flag in ["trust-bundle", "token-file"] {
            let e = without(flag);
            assert_eq!(e.flag, flag);
            assert!(e.to_string().contains("is required"), "{e}");
        }
    }

    /// A path said back in an error has its control characters escaped,
    /// as the control plane and trellisctl say them: a file name cannot
    /// drive the operator's terminal.
    #[test]
    fn credential_file_paths_are_said_back_escaped() {
        let (_, bundle, token) = credential_files();
        let dir = tempfile::tempdir().unwrap();
        let name = "\u{1b}[31mx";
        let missing = dir.path().join(name);
        let empty = dir.path().join(format!("{name}.empty"));
        std::fs::write(&empty, "").unwrap();
        let escaped = |path: &str| path.replace('\u{1b}', "\\u{1b}");
        for (flag, path, problem) in [
            ("trust-bundle", &missing, "no such file or directory"),
            ("trust-bundle", &empty, "holds no PEM certificate"),
            ("token-file", &missing, "no such file or directory"),
            ("token-file", &empty, "is empty"),
        ] {
            let path = path.to_str().unwrap();
            let mut argv = vec!["trellis-proxy", "--identity", "spiffe://td/ns/a/sa/b"];
            argv.extend([
                "--trust-bundle",
                if flag == "trust-bundle" { path } else { bundle },
            ]);
            argv.extend([
                "--token-file",
                if flag == "token-file" { path } else { token },
            ]);
            let cli = Cli::try_parse_from(argv).expect("clap parses");
            let e = Config::from_args(&cli.proxy).unwrap_err();
            assert_eq!(e.flag, flag);
            let said = e.to_string();
            assert!(!said.contains('\u{1b}'), "{said:?}");
            assert!(
                said.contains(&escaped(path)) && said.contains(problem),
                "{said}"
            );
        }
    }

    /// A hook token that cannot be sent as a header is refused naming the
    /// flag, without echoing the secret; a good one never shows in `Debug`.
    #[test]
    fn a_hook_token_must_be_a_header_value_and_never_shows() {
        for bad in ["", "se cret", "s\u{e9}cret"] {
            let e = args(&["--hook-token", bad]).unwrap_err();
            assert_eq!(e.flag, "hook-token");
            assert!(!bad.trim().is_empty() || e.reason == "is empty", "{e}");
            assert!(bad.is_empty() || !e.to_string().contains(bad), "{e}");
        }
        let config = args(&["--hook-token", "s3cret-h00k"]).unwrap();
        assert!(config.hook_token.is_some());
        assert!(!format!("{config:?}").contains("s3cret-h00k"));
        assert!(args(&[]).unwrap().hook_token.is_none());
    }

    #[test]
    fn parses_routes() {
        let r: Route = "127.0.0.1:9000=spiffe://td/ns/b/sa/c@10.0.0.2:15006"
            .parse()
            .unwrap();
        assert_eq!(r.local.port(), 9000);
        assert_eq!(r.spiffe_id.as_str(), "spiffe://td/ns/b/sa/c");
        assert_eq!(r.remote, "10.0.0.2:15006");
        assert!("127.0.0.1:9000=spiffe://td/x".parse::<Route>().is_err());
        assert!(
            "127.0.0.1:9000=http://td/x@1.2.3.4:5"
                .parse::<Route>()
                .is_err()
        );
        assert!("nope=spiffe://td/x@1.2.3.4:5".parse::<Route>().is_err());
    }

    #[test]
    fn refuses_a_route_to_the_sidecars_own_listeners() {
        for (route, other) in [
            ("127.0.0.1:9000=spiffe://td/ns/b/sa/c@127.0.0.1:9000", None),
            (
                "127.0.0.1:9000=spiffe://td/ns/b/sa/c@127.0.0.1:9001",
                Some("127.0.0.1:9001=spiffe://td/ns/b/sa/c@127.0.0.1:9000"),
            ),
            ("127.0.0.1:9000=spiffe://td/ns/b/sa/c@127.0.0.1:15001", None),
            // A wildcard listener is reached at any address of the host.
            ("0.0.0.0:9000=spiffe://td/ns/b/sa/c@127.0.0.1:9000", None),
        ] {
            let mut argv = vec!["--route", route];
            if let Some(other) = other {
                argv.extend(["--route", other]);
            }
            let e = args(&argv).unwrap_err();
            assert_eq!(e.flag, "route", "{route}");
            assert!(e.to_string().contains("would dial itself"), "{e}");
        }
        // Another port of the same host, or a peer elsewhere, is fine.
        assert!(
            args(&[
                "--route",
                "127.0.0.1:9000=spiffe://td/ns/b/sa/c@127.0.0.1:15006"
            ])
            .is_ok()
        );
        assert!(
            args(&[
                "--route",
                "127.0.0.1:9000=spiffe://td/ns/b/sa/c@10.0.0.2:9000"
            ])
            .is_ok()
        );
        // A host name is checked once resolved, for each connection.
        assert!(
            args(&[
                "--route",
                "127.0.0.1:9000=spiffe://td/ns/b/sa/c@localhost:9000"
            ])
            .is_ok()
        );
    }

    /// A plaintext listener off loopback would lend this sidecar's
    /// identity to any host reaching it: refused at start naming the flag,
    /// the address and the way out, unless the operator opts in.
    #[test]
    fn refuses_a_plaintext_listener_off_loopback_unless_told_to_allow_it() {
        let way_out = "is not a loopback address: every client that reaches it would be \
                       served under this sidecar's identity; listen on 127.0.0.1 or [::1], or \
                       pass --allow-non-loopback-listeners to lend the identity to every client \
                       that reaches it";
        let route = "0.0.0.0:9000=spiffe://td/ns/b/sa/c@10.0.0.2:15006";
        let e = args(&["--route", route]).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("invalid --route: {route}: 0.0.0.0:9000 {way_out}")
        );
        let e = args(&["--outbound", "127.0.0.1:15001,10.0.0.1:15001"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("invalid --outbound: 10.0.0.1:15001 {way_out}")
        );
        let e = args(&["--outbound", "[::]:15001"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("invalid --outbound: [::]:15001 {way_out}")
        );

        let opted_in = [
            "--allow-non-loopback-listeners",
            "--route",
            route,
            "--outbound",
            "0.0.0.0:15001",
        ];
        let c = args(&opted_in).unwrap();
        assert_eq!(c.routes[0].to_string(), route);
        // Loopback of either family, IPv4 as IPv6 included, needs nothing.
        assert!(
            args(&[
                "--route",
                "[::1]:9000=spiffe://td/ns/b/sa/c@10.0.0.2:15006",
                "--route",
                "[::ffff:127.0.0.1]:9001=spiffe://td/ns/b/sa/c@10.0.0.2:15006",
                "--outbound",
                "127.0.0.2:15001",
            ])
            .is_ok()
        );
    }

    #[test]
    fn closes_denied_connections_unless_told_not_to() {
        assert!(args(&[]).unwrap().close_denied_connections);
        let c = args(&["--close-denied-connections", "false"]).unwrap();
        assert!(!c.close_denied_connections);
        let argv = ["trellis-proxy", "--close-denied-connections", "no"];
        assert!(Cli::try_parse_from(argv).is_err());
    }

    /// The drain ends after a second with nothing open unless told
    /// otherwise (or the drain timeout is shorter); a quiet period given
    /// longer than the drain may last is refused naming both flags.
    #[test]
    fn reads_the_drain_idle_period() {
        let c = args(&[]).unwrap();
        assert_eq!(c.drain_idle, Duration::from_secs(1));
        assert_eq!(c.drain_timeout, Duration::from_secs(10));
        let c = args(&["--drain-idle", "0", "--drain-timeout", "0s"]).unwrap();
        assert_eq!(c.drain_idle, Duration::ZERO);
        // A drain timeout set below the default, as before the flag
        // existed, still starts.
        let c = args(&["--drain-timeout", "200ms"]).unwrap();
        assert_eq!(c.drain_idle, Duration::from_millis(200));
        let e = args(&["--drain-idle", "30s"]).unwrap_err();
        assert_eq!(e.flag, "drain-idle");
        let e = e.to_string();
        assert!(
            e.starts_with("invalid --drain-idle: 30s is longer than --drain-timeout 10s"),
            "{e}"
        );
    }

    /// Two minutes unless told otherwise, `0` for none, and a value that
    /// is no duration or out of range refused naming the flag.
    #[test]
    fn reads_the_tcp_user_timeout() {
        assert_eq!(
            args(&[]).unwrap().tcp_user_timeout,
            Some(Duration::from_secs(120))
        );
        for (value, expected) in [
            ("5m", Some(Duration::from_secs(300))),
            ("0", None),
            ("0s", None),
        ] {
            let c = args(&["--tcp-user-timeout", value]).unwrap();
            assert_eq!(c.tcp_user_timeout, expected, "{value}");
        }
        for (value, says) in [
            ("120", "not a duration"),
            ("10s", "out of range: 0 (off) or 80s to 1h"),
            ("2h", "out of range"),
        ] {
            let e = args(&["--tcp-user-timeout", value]).unwrap_err();
            assert_eq!(e.flag, "tcp-user-timeout", "{value}");
            let e = e.to_string();
            assert!(
                e.starts_with(&format!("invalid --tcp-user-timeout: \"{value}\""))
                    && e.contains(says),
                "{value}: {e}"
            );
        }
    }

    /// `--opaque-ports` takes each port as the injector's
    /// `trellis.io/opaque-ports` annotation does
    /// ([`trellis_core::tcp::parse_port`]): 1-65535, spaces around it
    /// ignored; 0 and ranges are refused naming the flag.
    #[test]
    fn reads_the_opaque_ports() {
        assert_eq!(args(&[]).unwrap().opaque_ports, [] as [u16; 0]);
        let c = args(&["--opaque-ports", "5432, 25", "--opaque-ports", "6379"]).unwrap();
        assert_eq!(c.opaque_ports, [5432, 25, 6379]);
        for (value, says) in [
            ("5432,0", "\"0\" is not a port (1-65535)"),
            ("3306-3310", "ranges are not taken, list each port"),
        ] {
            let argv = argv(&["--opaque-ports", value]);
            let e = Cli::try_parse_from(argv).unwrap_err().to_string();
            assert!(
                e.contains("--opaque-ports") && e.contains(says),
                "{value}: {e}"
            );
        }
    }

    /// A value clap refuses is said back with its control characters
    /// escaped, as the control plane and trellisctl say it, init's too.
    #[test]
    fn a_value_clap_refuses_is_said_back_escaped() {
        for extra in [
            &["--opaque-ports", "\u{1b}[31mx"][..],
            &["--access-log", "\u{1b}[31mx"],
            &["--\u{1b}[31mx"],
            &["init", "--backend", "\u{1b}[31mx"],
        ] {
            let argv = argv(extra);
            let args: Vec<OsString> = argv.iter().map(OsString::from).collect();
            let said = refusal_text(Cli::try_parse_from(argv).unwrap_err(), &args);
            assert!(!said.contains('\u{1b}'), "{said:?}");
            assert!(
                said.contains("'\\u{1b}[31mx'") || said.contains("'--\\u{1b}[31mx'"),
                "{said}"
            );
        }
    }

    /// The HTTP/2 connection limits: 8 a peer and 1,024 in all unless told
    /// otherwise; anything but a whole number from 1 to 1,024 a peer and
    /// 65,536 in all refused naming the flag.
    #[test]
    fn reads_the_http2_connection_limits() {
        let c = args(&[]).unwrap();
        assert_eq!(c.max_h2_connections_per_peer, 8);
        assert_eq!(c.max_h2_connections, 1024);
        let c = args(&[
            "--max-h2-connections-per-peer",
            "32",
            "--max-h2-connections",
            "4096",
        ])
        .unwrap();
        assert_eq!(
            (c.max_h2_connections_per_peer, c.max_h2_connections),
            (32, 4096)
        );
        let c = args(&[
            "--max-h2-connections-per-peer",
            "1024",
            "--max-h2-connections",
            "65536",
        ])
        .unwrap();
        assert_eq!(
            (c.max_h2_connections_per_peer, c.max_h2_connections),
            (1024, 65536)
        );
        for (flag, max, above) in [
            ("max-h2-connections-per-peer", 1024, "1025"),
            ("max-h2-connections", 65536, "65537"),
        ] {
            for value in ["0", "-1", "many", above] {
                let e = args(&[&format!("--{flag}={value}")]).unwrap_err();
                assert_eq!(e.flag, flag, "{value}");
                let e = e.to_string();
                assert!(
                    e.starts_with(&format!(
                        "invalid --{flag}: \"{value}\" is not a number of connections from 1 \
                         to {max}"
                    )),
                    "{e}"
                );
            }
        }
    }

    #[test]
    fn names_the_bad_flag() {
        assert_eq!(args(&["--inbound", "x"]).unwrap_err().flag, "inbound");
        assert_eq!(args(&["--route", "bad"]).unwrap_err().flag, "route");
        assert_eq!(
            args(&["--drain-timeout", "soon"]).unwrap_err().flag,
            "drain-timeout"
        );
        assert_eq!(
            args(&["--drain-idle", "soon"]).unwrap_err().flag,
            "drain-idle"
        );
        let (_, _, token) = credential_files();
        let cli = Cli::try_parse_from([
            "trellis-proxy",
            "--identity",
            "spiffe://td/ns/a/sa/b",
            "--trust-bundle",
            "/nonexistent/bundle.pem",
            "--token-file",
            token,
        ])
        .unwrap();
        assert_eq!(
            Config::from_args(&cli.proxy).unwrap_err().flag,
            "trust-bundle"
        );
        let cli = Cli::try_parse_from(["trellis-proxy"]).unwrap();
        assert_eq!(Config::from_args(&cli.proxy).unwrap_err().flag, "identity");
    }
}
