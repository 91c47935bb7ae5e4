//! `trellisctl`: the operators' command line over the Admin API.
//!
//! It authenticates with the operator credential (`DIR/admin.crt`,
//! `DIR/admin.key`, trusting `DIR/bundle.pem`, or `--ca/--cert/--key`) and
//! verifies the server as `spiffe://TD/trellis/control-plane`, the trust
//! domain taken from the credential's own SPIFFE ID. Results go to stdout,
//! errors to stderr as one line (policy diagnostics: one line each). It never
//! prints or logs the private key. The `policy` subcommands are in
//! [`policy`]. `policy lint` reads files only, and takes neither the
//! control plane's address nor a credential: it ignores their environment
//! variables, whatever they hold.

pub mod check;
pub mod policy;
pub mod wait;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::builder::Resettable;
use clap::parser::ValueSource;
use clap::{Arg, ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::Channel;
use trellis_core::flags::{FlagNames, Given};
use trellis_core::io_error::stdout_closed;
use trellis_core::tls::{
    ExpectedServer, PROTOCOL_VERSIONS, SpiffeServerVerifier, provider, root_store, spiffe_id_of,
};
use trellis_core::{SpiffeId, TrustDomain};
use trellis_proto::admin::v1::admin_client::AdminClient;
use trellis_proto::admin::v1::{
    CreateJoinTokenRequest, IssuedCertificate, ListIssuedCertificatesRequest, ListPoliciesRequest,
    ListRevocationsRequest, ListWorkloadsRequest, ListWorkloadsResponse, ReplicaStatus, Revocation,
    RevokeIdentityRequest, SnapshotSync, UnrevokeIdentityRequest, Workload,
};

use self::policy::{PolicyCommand, RemotePolicyCommand};

use crate::api::admin::{ISSUED_DEFAULT_LIMIT, ISSUED_MAX_LIMIT};
use crate::config::{EXIT_USAGE, Parsed, classify_clap_error, with_program_name};
use crate::discovery::SyncState;
pub use crate::escape::escape_controls;
use crate::escape::shown;

/// The command line client of the Trellis control plane: operate a
/// Trellis mesh through the control plane's Admin API.
#[derive(Debug, Parser)]
#[command(name = "trellisctl", version)]
pub struct Cli {
    /// Address of the control plane's gRPC API.
    #[arg(
        long,
        env = "TRELLIS_CONTROL_PLANE",
        default_value = "127.0.0.1:15012",
        global = true,
        value_parser = host_port
    )]
    pub control_plane: String,

    /// The control plane's state dir: uses bundle.pem, admin.crt, admin.key in it.
    #[arg(long, env = "TRELLIS_STATE_DIR", global = true)]
    pub state_dir: Option<PathBuf>,

    /// Trust bundle (PEM) to verify the control plane with (instead of --state-dir).
    #[arg(long, env = "TRELLIS_CA", global = true)]
    pub ca: Option<PathBuf>,

    /// Operator certificate (PEM) (instead of --state-dir).
    #[arg(long, env = "TRELLIS_CERT", global = true)]
    pub cert: Option<PathBuf>,

    /// Operator private key (PEM) (instead of --state-dir).
    #[arg(long, env = "TRELLIS_KEY", global = true)]
    pub key: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands: those of [`RemoteCommand`], then `policy`.
#[derive(Debug, Subcommand)]
pub enum Command {
    #[command(flatten)]
    Remote(RemoteCommand),
    /// Policies (AuthorizationPolicy and RateLimitPolicy documents): apply,
    /// get, list, delete, explain, lint.
    #[command(subcommand)]
    Policy(PolicyCommand),
}

/// The subcommands besides `policy`; each maps to Admin API calls.
#[derive(Debug, Subcommand)]
pub enum RemoteCommand {
    /// Join tokens for a workload's first certificate.
    #[command(subcommand)]
    Token(TokenCommand),
    /// The workloads the control plane has seen. A snapshot version is
    /// shown with `@` and the epoch it was set in, in hex, when it has one
    /// (the embedded store's): after a restore from a backup, versions
    /// count again in another epoch, so `12@1f..` and `12@9c..` name
    /// different snapshots. When a revocation covers any workload's
    /// certificate, a REVOKED column says whose, as `certs` does.
    /// `OPAQUE PORTS` lists the ports the
    /// workload's connected sidecars declare opaque themselves (their
    /// --opaque-ports), every one any of them declares.
    Workloads {
        /// Output format.
        #[arg(short = 'o', long, env = "TRELLIS_OUTPUT", value_enum, default_value_t)]
        output: Output,
    },
    /// The certificates the control plane issued, newest first.
    Certs {
        /// Only those for this SPIFFE ID.
        #[arg(long, env = "TRELLIS_SPIFFE_ID", value_parser = spiffe_id)]
        spiffe_id: Option<String>,
        /// Only the one with this serial number (hex, with or without
        /// colons, as `openssl x509 -serial` prints it).
        #[arg(long, env = "TRELLIS_SERIAL", value_parser = serial)]
        serial: Option<String>,
        /// At most this many, the newest (at most 10000).
        #[arg(
            long,
            env = "TRELLIS_LIMIT",
            default_value_t = ISSUED_DEFAULT_LIMIT as u32,
            value_parser = clap::value_parser!(u32).range(1..=ISSUED_MAX_LIMIT as i64)
        )]
        limit: u32,
        /// Output format.
        #[arg(short = 'o', long, env = "TRELLIS_OUTPUT", value_enum, default_value_t)]
        output: Output,
    },
    /// Revocations: stop a workload's certificates from renewing and
    /// every sidecar from accepting them.
    #[command(subcommand)]
    Identity(IdentityCommand),
    /// Whether the mesh is healthy: every replica answers and serves one
    /// snapshot (a version, with its epoch where both sides have one),
    /// every connected sidecar holds it and has renewed its
    /// certificate, none is revoked (a warning), no pod was admitted without a sidecar because of a
    /// mistyped `trellis.io/inject` label, no root of the trust bundle or
    /// the operator credential expires soon. A line per finding
    /// (`ok`, `warn`, `FAIL`); exit 1 on any `FAIL`.
    Check {
        /// Warn about a root of the trust bundle, or the operator
        /// credential, that expires within this.
        #[arg(
            long,
            env = "TRELLIS_EXPIRY_WARNING",
            default_value = "30d",
            value_parser = trellis_core::duration::parse
        )]
        expiry_warning: Duration,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a single-use join token; prints only the token.
    Create {
        /// The SPIFFE ID the token proves, e.g. spiffe://cluster.local/ns/default/sa/web.
        #[arg(long, env = "TRELLIS_SPIFFE_ID", value_parser = workload_id)]
        spiffe_id: String,
        /// Token lifetime (default 1h, at most 24h), whole seconds.
        #[arg(long, env = "TRELLIS_TTL", value_parser = token_ttl)]
        ttl: Option<Duration>,
    },
}

#[derive(Debug, Subcommand)]
pub enum IdentityCommand {
    /// Stop every certificate of SPIFFE_ID issued until now from renewing,
    /// and every sidecar from accepting it as a peer: new connections by
    /// it or to it are refused and open ones, by it or to it, are closed,
    /// as soon as the sidecars hold the snapshot the revocation is in. A new join
    /// token for it still obtains a certificate, which renews and is
    /// accepted. Its Watch streams end, and a Watch with a revoked
    /// certificate is refused. Revoking it again moves the revocation to
    /// now. An ID no certificate was issued to is revoked too, with a
    /// warning to check its spelling. The embedded store only: with the
    /// Kubernetes store, delete the pod or its ServiceAccount.
    Revoke {
        /// The SPIFFE ID, e.g. spiffe://cluster.local/ns/default/sa/web.
        #[arg(value_parser = workload_id)]
        spiffe_id: String,
        /// Why, as `identity revocations` lists it (at most 1024 bytes, one
        /// line).
        #[arg(long, env = "TRELLIS_REASON", value_parser = revocation_reason)]
        reason: Option<String>,
    },
    /// Remove SPIFFE_ID's revocation: its certificates renew again and
    /// sidecars accept them.
    Unrevoke {
        /// The SPIFFE ID revoked.
        #[arg(value_parser = workload_id)]
        spiffe_id: String,
    },
    /// The revoked SPIFFE IDs, each with when it was revoked and why. A
    /// revocation older than 30 days and 30 s (the longest certificate
    /// lifetime, backdating included) covers only expired certificates and
    /// is dropped.
    Revocations {
        /// Output format.
        #[arg(short = 'o', long, env = "TRELLIS_OUTPUT", value_enum, default_value_t)]
        output: Output,
    },
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    #[default]
    Table,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("{0}")]
    Usage(String),
    #[error(
        "cannot read {}: {}",
        shown(path),
        trellis_core::io_error::IoWords(source)
    )]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `--state-dir` holds no `bundle.pem`: most likely a mistyped
    /// directory, or one that is not the control plane's state dir.
    #[error(
        "cannot read {}: {}: {flag} names no control plane's state dir: give the one the \
         control plane was started with, where it writes bundle.pem, admin.crt and admin.key",
        shown(path),
        trellis_core::io_error::IoWords(source)
    )]
    NotStateDir {
        path: PathBuf,
        /// `--state-dir`, or its variable when the value came from it.
        flag: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {reason}", shown(path))]
    Invalid { path: PathBuf, reason: String },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("cannot reach the control plane at {addr}: {reason}")]
    Connect { addr: String, reason: String },
    /// The control plane refused the operator credential in the handshake.
    #[error("{0}")]
    Refused(String),
    /// The control plane refused the call: its code in words
    /// ([`trellis_core::grpc::status_words`]), then its message, escaped
    /// ([`escape_controls`]).
    #[error("{}", escape_controls(&trellis_core::grpc::status_words(.0)))]
    Rpc(#[from] tonic::Status),
    /// Already formatted for the operator (policy diagnostics); printed as is.
    #[error("{0}")]
    Reported(String),
}

/// What a subcommand prints, and whether it failed (exit 1).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Printed {
    pub stdout: String,
    pub stderr: String,
    pub failed: bool,
}

impl Printed {
    pub fn out(stdout: String) -> Self {
        Self {
            stdout,
            ..Self::default()
        }
    }

    /// Only `stderr`: an error, whose exit code [`cli_main`] picks.
    fn err(stderr: String) -> Self {
        Self {
            stderr,
            ..Self::default()
        }
    }
}

/// Where the operator credential and the trust bundle are.
#[derive(Clone, Debug)]
pub struct AdminCredentials {
    pub bundle: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl AdminCredentials {
    /// The files the control plane writes into its state dir.
    pub fn in_state_dir(dir: &Path) -> Self {
        Self {
            bundle: dir.join(crate::ca::files::BUNDLE),
            cert: dir.join(crate::ca::files::ADMIN_CERT),
            key: dir.join(crate::ca::files::ADMIN_KEY),
        }
    }

    /// A TLS client config presenting the operator SVID and accepting only
    /// the control plane of the credential's trust domain.
    pub fn client_config(&self) -> Result<ClientConfig, CtlError> {
        let bundle = read_certs(&self.bundle)?;
        let chain = read_certs(&self.cert)?;
        let key_pem = read(&self.key)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| CtlError::Invalid {
            path: self.key.clone(),
            reason: format!("no PEM private key: {e}"),
        })?;
        let id = spiffe_id_of(&chain[0]).map_err(|e| CtlError::Invalid {
            path: self.cert.clone(),
            reason: e.to_string(),
        })?;
        let roots = root_store(&bundle)?;
        let verifier = SpiffeServerVerifier::new(
            roots,
            ExpectedServer::Exact(SpiffeId::control_plane(&id.trust_domain())),
        );
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(PROTOCOL_VERSIONS)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(chain, key)
            .map_err(|e| match e {
                rustls::Error::InconsistentKeys(_) => CtlError::Invalid {
                    path: self.key.clone(),
                    reason: format!(
                        "not the private key of the certificate in {}",
                        shown(&self.cert)
                    ),
                },
                e => CtlError::Tls(e),
            })?;
        Ok(trellis_core::grpc::with_h2_alpn(config))
    }

    /// The trust domain of the operator credential's SPIFFE ID.
    pub fn trust_domain(&self) -> Result<TrustDomain, CtlError> {
        let chain = read_certs(&self.cert)?;
        let id = spiffe_id_of(&chain[0]).map_err(|e| CtlError::Invalid {
            path: self.cert.clone(),
            reason: e.to_string(),
        })?;
        Ok(id.trust_domain())
    }

    /// An Admin API client connected now.
    pub async fn connect(&self, addr: &str) -> Result<AdminClient<Channel>, CtlError> {
        let tls = Arc::new(self.client_config()?);
        let channel =
            trellis_core::grpc::connect(addr, tls)
                .await
                .map_err(|e| CtlError::Connect {
                    addr: addr.to_string(),
                    reason: trellis_core::grpc::why_unreachable(
                        &e,
                        &format!("the CA in {}", shown(&self.bundle)),
                    ),
                })?;
        Ok(AdminClient::new(channel).max_decoding_message_size(crate::api::MAX_LISTING_BYTES))
    }

    /// Why the control plane hung up on a call, when it refused this
    /// credential. In TLS 1.3 the server checks the client's certificate
    /// after the client has finished its handshake, so a refused operator
    /// certificate reaches the call only as a closed connection; one more
    /// handshake, reading the server's first bytes, gets the alert that
    /// says why. `None` when that handshake is accepted or fails otherwise.
    pub async fn refusal(&self, addr: &str) -> Option<String> {
        const PATIENCE: Duration = Duration::from_secs(5);
        let tls = Arc::new(self.client_config().ok()?);
        let dial = trellis_core::grpc::dial(addr, tls);
        let mut stream = tokio::time::timeout(PATIENCE, dial).await.ok()?.ok()?;
        let mut first = [0u8; 1];
        let read = tokio::time::timeout(
            PATIENCE,
            tokio::io::AsyncReadExt::read(&mut stream, &mut first),
        )
        .await
        .ok()?;
        let alert = match read
            .err()
            .as_ref()
            .and_then(|e| trellis_core::tls::rustls_error(e))
        {
            Some(rustls::Error::AlertReceived(alert)) => *alert,
            _ => return None,
        };
        let cert = shown(&self.cert);
        let why = match alert {
            rustls::AlertDescription::CertificateExpired => {
                "it has expired, or the control plane's clock is ahead".to_string()
            }
            rustls::AlertDescription::BadCertificate
            | rustls::AlertDescription::UnknownCA
            | rustls::AlertDescription::DecryptError
            | rustls::AlertDescription::CertificateUnknown => {
                "it was not issued by this control plane's CA, or is not a SPIFFE certificate \
                 of its trust domain"
                    .to_string()
            }
            _ => "it ended the handshake".to_string(),
        };
        Some(format!(
            "the control plane at {addr} refused the operator certificate {cert}: {why} \
             (TLS alert {alert:?})"
        ))
    }
}

fn read(path: &Path) -> Result<Vec<u8>, CtlError> {
    std::fs::read(path).map_err(|source| CtlError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CtlError> {
    let certs = CertificateDer::pem_slice_iter(&read(path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CtlError::Invalid {
            path: path.to_path_buf(),
            reason: format!("bad PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(CtlError::Invalid {
            path: path.to_path_buf(),
            reason: "no PEM certificate found".into(),
        });
    }
    Ok(certs)
}

/// `token create --ttl`: whole seconds from 1s to the control plane's
/// maximum, refused here in the units it was given rather than by the
/// control plane in seconds.
fn token_ttl(s: &str) -> Result<Duration, String> {
    let ttl = trellis_core::duration::parse(s)?;
    if ttl < Duration::from_secs(1) {
        return Err(format!("{s:?} is shorter than the minimum of 1 second"));
    }
    if ttl.subsec_nanos() != 0 {
        return Err(format!("{s:?} is not a whole number of seconds"));
    }
    if ttl > crate::authn::MAX_TOKEN_TTL {
        return Err(format!(
            "{s:?} is longer than the maximum of {}",
            trellis_core::duration::words(crate::authn::MAX_TOKEN_TTL)
        ));
    }
    Ok(ttl)
}

/// A SPIFFE ID flag's value, refused here as the control plane would
/// refuse it, so a mistake is a usage error before any call.
pub fn spiffe_id(s: &str) -> Result<String, String> {
    SpiffeId::parse(s)
        .map(|_| s.to_owned())
        .map_err(|e| e.to_string())
}

/// A workload's SPIFFE ID (`token create`, `identity revoke`): checked as
/// the control plane checks it ([`crate::api::admin::workload_id`]) but
/// for its trust domain, which only the credential says.
fn workload_id(s: &str) -> Result<String, String> {
    crate::api::admin::workload_id(s)?;
    Ok(s.to_owned())
}

/// `certs --serial`, checked as the control plane checks it
/// ([`crate::api::admin::normalize_serial`]).
fn serial(s: &str) -> Result<String, String> {
    crate::api::admin::normalize_serial(s)?;
    Ok(s.to_owned())
}

/// `identity revoke --reason`, checked as the control plane checks it
/// ([`crate::api::admin::revocation_reason`]).
fn revocation_reason(s: &str) -> Result<String, String> {
    crate::api::admin::revocation_reason(s).map(str::to_owned)
}

/// `--control-plane` as `host:port`: a missing port would be dialled as
/// 443, never the control plane's 15012.
fn host_port(s: &str) -> Result<String, String> {
    trellis_core::grpc::check_host_port(s)?;
    Ok(s.to_owned())
}

impl Cli {
    /// `error`, or, when it is that `--state-dir` holds no `bundle.pem`
    /// and no `admin.crt` either (or is no directory), one that says what
    /// `--state-dir` must be. A state dir that lost only some of its files
    /// (`bundle.pem`, `admin.crt` or `admin.key`), or whose `bundle.pem`
    /// cannot be read, is named as it is.
    fn not_state_dir(&self, names: &dyn FlagNames, error: CtlError) -> CtlError {
        use std::io::ErrorKind;
        match (error, &self.state_dir) {
            (CtlError::Read { path, source }, Some(dir))
                if path == dir.join(crate::ca::files::BUNDLE)
                    && match source.kind() {
                        ErrorKind::NotADirectory => true,
                        ErrorKind::NotFound => !dir.join(crate::ca::files::ADMIN_CERT).exists(),
                        _ => false,
                    } =>
            {
                CtlError::NotStateDir {
                    path,
                    flag: names.name("state-dir"),
                    source,
                }
            }
            (error, _) => error,
        }
    }

    /// The operator credential the flags give; a refusal names each flag
    /// as `names` does.
    fn credentials(&self, names: &dyn FlagNames) -> Result<AdminCredentials, CtlError> {
        let n = |flag: &str| names.name(flag);
        match (&self.state_dir, &self.ca, &self.cert, &self.key) {
            (Some(dir), None, None, None) => Ok(AdminCredentials::in_state_dir(dir)),
            (None, Some(ca), Some(cert), Some(key)) => Ok(AdminCredentials {
                bundle: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            }),
            (Some(_), _, _, _) => Err(CtlError::Usage(format!(
                "{} cannot be combined with {}/{}/{}",
                n("state-dir"),
                n("ca"),
                n("cert"),
                n("key")
            ))),
            _ => Err(CtlError::Usage(format!(
                "give {} DIR, or all of {}, {} and {}",
                n("state-dir"),
                n("ca"),
                n("cert"),
                n("key")
            ))),
        }
    }
}

/// The flags naming the control plane and the operator credential: their
/// argument ids, names and value names. They are global, so a subcommand that talks to
/// the control plane takes them after its name too; `policy lint`, which
/// reads files only, takes none of them ([`offline_flags`]).
const CONNECTION_FLAGS: [(&str, &str, &str); 5] = [
    ("control_plane", "--control-plane", "CONTROL_PLANE"),
    ("state_dir", "--state-dir", "STATE_DIR"),
    ("ca", "--ca", "CA"),
    ("cert", "--cert", "CERT"),
    ("key", "--key", "KEY"),
];

/// The connection flags as an offline subcommand (`policy lint`) declares
/// them itself: hidden, and without their environment variables (an
/// operator's shell may export them; lint ignores them). clap gives a
/// subcommand no global argument whose id it declares, so its help lists
/// none of them; one given on the command line is refused
/// ([`offline_refusal`]). Each takes a value of its global's type, which
/// clap carries up to the global.
pub(crate) fn offline_flags() -> Vec<Arg> {
    CONNECTION_FLAGS
        .iter()
        .map(|&(id, flag, value)| {
            let arg = Arg::new(id).long(&flag[2..]).value_name(value).hide(true);
            match id {
                "control_plane" => arg.value_parser(clap::value_parser!(String)),
                _ => arg.value_parser(clap::value_parser!(PathBuf)),
            }
        })
        .collect()
}

/// Why `matches` are refused, if they are: `policy lint` given a
/// connection flag on the command line, before or after its name. It runs
/// before any [`Given`]; the flags it names are those typed on the command
/// line (`lint` reads no variable of theirs), so named as typed.
fn offline_refusal(matches: &ArgMatches) -> Option<String> {
    let lint = matches
        .subcommand_matches("policy")?
        .subcommand_matches("lint")?;
    let (_, flag, _) = CONNECTION_FLAGS
        .iter()
        .find(|(id, _, _)| lint.value_source(id) == Some(ValueSource::CommandLine))?;
    Some(format!(
        "{flag}: policy lint reads files only and never connects to a control plane: it takes \
         no --control-plane, --state-dir, --ca, --cert or --key"
    ))
}

/// `args` as a [`Cli`], with where each value came from, or the exit code
/// after saying why not (or after printing the help or version asked for).
fn parse(args: Vec<OsString>) -> Result<(Cli, Given), ExitCode> {
    let usage = |message: String| {
        to_stderr(&message);
        ExitCode::from(EXIT_USAGE)
    };
    let args = with_program_name("trellisctl", args);
    let clap_error = |e: clap::Error, command: &clap::Command| {
        if let Some(refusal) = policy::wait_without_equals(&e, &args) {
            return usage(format!("error: {refusal}\n"));
        }
        match classify_clap_error(without_header_value(e), command, &args) {
            Parsed::Invalid(message) => usage(message),
            _ => ExitCode::SUCCESS,
        }
    };
    let mut command = Cli::command();
    // A connection flag's environment variable holding a value the flag
    // would refuse is not given to clap, which would refuse it whatever the
    // subcommand: `policy lint` ignores it, any other subcommand that would
    // read it is refused naming it.
    let mut unread = Vec::new();
    for (id, _, _) in CONNECTION_FLAGS {
        if let Some(refusal) = env_refusal(&command, id) {
            command = command.mut_arg(id, |arg| arg.env(Resettable::Reset));
            unread.push((id, refusal));
        }
    }
    let mut matches = match command.try_get_matches_from_mut(&args) {
        Ok(matches) => matches,
        Err(e) => return Err(clap_error(e, &command)),
    };
    if let Some(refusal) = offline_refusal(&matches) {
        return Err(usage(format!("error: {refusal}\n")));
    }
    if !is_lint(&matches)
        && let Some((_, refusal)) = unread
            .iter()
            .find(|(id, _)| !given_on_command_line(&matches, id))
    {
        return Err(usage(format!("error: {refusal}\n")));
    }
    let given = matches.clone();
    let cli = Cli::from_arg_matches_mut(&mut matches).map_err(|e| {
        let e = e.format(&mut command);
        clap_error(e, &command)
    })?;
    Ok((cli, Given::new(command, given)))
}

/// `e` with the value of a `policy explain --header` it refuses left out
/// of what it says back (clap's `invalid value 'NAME: VALUE'`): a header's
/// value may be a credential, and the refusal names the header's name
/// alone, or without a `:` the first word, as the parser's own words do.
fn without_header_value(mut e: clap::Error) -> clap::Error {
    use clap::error::{ContextKind, ContextValue};
    let header = matches!(
        e.get(ContextKind::InvalidArg),
        Some(ContextValue::String(arg)) if arg.starts_with("--header ")
    );
    let Some(ContextValue::String(given)) = e.get(ContextKind::InvalidValue) else {
        return e;
    };
    if !header {
        return e;
    }
    let shown = match given.split_once(':') {
        Some((name, _)) => format!("{}: (value not shown)", name.trim()),
        None => {
            let mut words = given.split_whitespace();
            let first = words.next().unwrap_or_default();
            match words.next() {
                Some(_) => format!("{first} (the rest not shown)"),
                None => first.to_owned(),
            }
        }
    };
    e.insert(ContextKind::InvalidValue, ContextValue::String(shown));
    e
}

/// Whether `matches` are of `policy lint`.
fn is_lint(matches: &ArgMatches) -> bool {
    matches
        .subcommand_matches("policy")
        .and_then(|policy| policy.subcommand_matches("lint"))
        .is_some()
}

/// Whether the argument `id` was given on the command line, before or after
/// any subcommand's name.
fn given_on_command_line(matches: &ArgMatches, id: &str) -> bool {
    let mut level = Some(matches);
    while let Some(matches) = level {
        if matches.try_contains_id(id).unwrap_or(false)
            && matches.value_source(id) == Some(ValueSource::CommandLine)
        {
            return true;
        }
        level = matches.subcommand().map(|(_, sub)| sub);
    }
    false
}

/// Why the value of the environment variable of the connection flag `id`
/// (of `command`) would be refused, naming the variable and its flag; or
/// `None` when the variable is unset or its value is one the flag takes.
/// It runs before clap took the flags, so before any [`Given`]: the name
/// is made here, the variable's beside its flag's.
fn env_refusal(command: &clap::Command, id: &str) -> Option<String> {
    let (_, flag, _) = CONNECTION_FLAGS.iter().find(|(each, _, _)| *each == id)?;
    let name = command
        .get_arguments()
        .find(|arg| arg.get_id() == id)?
        .get_env()?;
    let value = std::env::var_os(name)?;
    let name = name.to_string_lossy();
    if value.is_empty() {
        return Some(format!(
            "{name} ({flag}) is set but empty: set it to a value for {flag}, or unset it"
        ));
    }
    if id != "control_plane" {
        return None;
    }
    let Some(text) = value.to_str() else {
        return Some(format!("{name} ({flag}) is not UTF-8"));
    };
    host_port(text).err().map(|why| {
        format!(
            "invalid value '{}' in {name} ({flag}): {why}",
            escape_controls(text)
        )
    })
}

/// Exit code of `trellisctl` when the reader of its stdout went away before
/// all was written (`trellisctl policy lint DIR | head -1`), as of every
/// Trellis program.
pub use trellis_core::io_error::EXIT_STDOUT_CLOSED;

/// Runs `trellisctl` with `args` (argv, including a program name).
/// Exit codes: 0 success, 64 usage error, 141 stdout closed by its reader
/// ([`EXIT_STDOUT_CLOSED`]), 1 any other failure.
pub fn cli_main(args: Vec<OsString>) -> ExitCode {
    let (cli, given) = match parse(args) {
        Ok(parsed) => parsed,
        Err(code) => return code,
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            to_stderr(&format!("error: cannot start the async runtime: {e}\n"));
            return ExitCode::FAILURE;
        }
    };
    let (printed, code) = match runtime.block_on(execute(&cli, &given)) {
        Ok(printed) => {
            let code = if printed.failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
            (printed, code)
        }
        Err(CtlError::Reported(report)) => (Printed::err(report), ExitCode::FAILURE),
        // A flag whose value came from its environment variable is named
        // with it where the message was made (`execute` names through
        // `given`).
        Err(CtlError::Usage(message)) => (
            Printed::err(format!("error: {message}\n")),
            ExitCode::from(EXIT_USAGE),
        ),
        Err(e) => (Printed::err(format!("error: {e}\n")), ExitCode::FAILURE),
    };
    finish(&printed, code)
}

/// Writes what a subcommand printed, stdout then stderr, and returns
/// `code`, the exit code it earned; or [`EXIT_STDOUT_CLOSED`] if stdout's
/// reader went away, with stdout cut short but stderr still written and no
/// panic (`print!` panics on a closed pipe, as Rust ignores `SIGPIPE`); or
/// 1 if stdout could not be written for another reason, said on stderr.
fn finish(printed: &Printed, code: ExitCode) -> ExitCode {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_all(printed.stdout.as_bytes())
        .and_then(|()| stdout.flush());
    drop(stdout);
    to_stderr(&printed.stderr);
    match written {
        Ok(()) => code,
        Err(e) if stdout_closed(&e) => ExitCode::from(EXIT_STDOUT_CLOSED),
        Err(e) => {
            to_stderr(&format!("error: cannot write to stdout: {e}\n"));
            ExitCode::FAILURE
        }
    }
}

/// Writes `text` to stderr; if that fails there is nowhere left to say so,
/// and `trellisctl` ends with the exit code it has rather than a panic.
fn to_stderr(text: &str) {
    use std::io::Write;
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

/// Text of several lines, each through [`escape_controls`], the line
/// breaks kept: a policy as YAML, the trace of `policy explain`.
pub fn escape_lines(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for (i, line) in text.split('\n').enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&escape_controls(line));
    }
    out
}

/// Runs one subcommand; returns what to print. `policy lint` reads files
/// only; every other subcommand calls the control plane. A usage error
/// names each flag as `names` does.
pub async fn execute(cli: &Cli, names: &dyn FlagNames) -> Result<Printed, CtlError> {
    match &cli.command {
        Command::Policy(PolicyCommand::Lint {
            paths,
            recursive,
            trust_domain,
            root,
        }) => policy::lint(paths, recursive, trust_domain, &root.root_namespace, names),
        Command::Policy(PolicyCommand::Remote(command)) => remote_policy(cli, command, names).await,
        Command::Remote(command) => {
            connected(cli, names, async |credentials, client| {
                run(cli, command, credentials, client).await
            })
            .await
        }
    }
}

/// A `policy` subcommand that calls the control plane.
async fn remote_policy(
    cli: &Cli,
    command: &RemotePolicyCommand,
    names: &dyn FlagNames,
) -> Result<Printed, CtlError> {
    // Checked here, not by clap: an environment twin such as
    // TRELLIS_DRY_RUN=false counts as given to clap's conflicts, and would
    // refuse a plain `--wait`.
    if let RemotePolicyCommand::Apply {
        dry_run: true,
        wait,
        ..
    } = command
        && wait.is_set()
    {
        return Err(CtlError::Usage(format!(
            "the argument '{}' cannot be used with '{}': a dry run writes nothing to wait for",
            names.name("dry-run"),
            names.name("wait")
        )));
    }
    // A directory without policy files is a usage error before any
    // credential is read.
    let found = match command {
        RemotePolicyCommand::Apply {
            files, recursive, ..
        } => policy::policy_files(files, recursive)?,
        _ => policy::PolicyInput::default(),
    };
    connected(cli, names, async |credentials, client| {
        let td = credentials.trust_domain()?;
        policy::run(client, &td, command, found, names).await
    })
    .await
}

/// Connects to the control plane with the operator credential and makes
/// `calls` over the connection.
async fn connected(
    cli: &Cli,
    names: &dyn FlagNames,
    calls: impl AsyncFnOnce(&AdminCredentials, &mut AdminClient<Channel>) -> Result<Printed, CtlError>,
) -> Result<Printed, CtlError> {
    let credentials = cli.credentials(names)?;
    let mut client = credentials
        .connect(&cli.control_plane)
        .await
        .map_err(|e| cli.not_state_dir(names, e))?;
    match calls(&credentials, &mut client).await {
        // A connection closed under the call: if the control plane refused
        // the operator certificate, say so rather than "canceled".
        Err(CtlError::Rpc(status))
            if matches!(
                status.code(),
                tonic::Code::Cancelled | tonic::Code::Unavailable | tonic::Code::Unknown
            ) =>
        {
            match credentials.refusal(&cli.control_plane).await {
                Some(refusal) => Err(CtlError::Refused(refusal)),
                None => Err(CtlError::Rpc(status)),
            }
        }
        result => result,
    }
}

/// The calls of a subcommand besides `policy` over `client`.
async fn run(
    cli: &Cli,
    command: &RemoteCommand,
    credentials: &AdminCredentials,
    client: &mut AdminClient<Channel>,
) -> Result<Printed, CtlError> {
    match command {
        RemoteCommand::Token(TokenCommand::Create { spiffe_id, ttl }) => {
            let response = client
                .create_join_token(CreateJoinTokenRequest {
                    spiffe_id: spiffe_id.clone(),
                    ttl_seconds: ttl.map(|t| t.as_secs()).unwrap_or(0),
                })
                .await?
                .into_inner();
            Ok(Printed::out(format!(
                "{}\n",
                escape_controls(&response.token)
            )))
        }
        RemoteCommand::Workloads { output } => {
            let mut answer = client
                .list_workloads(ListWorkloadsRequest::default())
                .await?
                .into_inner();
            answer
                .workloads
                .sort_by(|a, b| a.spiffe_id.cmp(&b.spiffe_id));
            Ok(match output {
                Output::Table => Printed::out(workloads_table(&answer)),
                // The JSON stays an array of workloads; a replica that did
                // not answer is said on stderr.
                Output::Json => Printed {
                    stdout: workloads_json(&answer.workloads),
                    stderr: silent_replicas(&answer.replicas, SILENT_STREAMS),
                    failed: false,
                },
            })
        }
        RemoteCommand::Certs {
            spiffe_id,
            serial,
            limit,
            output,
        } => {
            let response = client
                .list_issued_certificates(ListIssuedCertificatesRequest {
                    spiffe_id: spiffe_id.clone().unwrap_or_default(),
                    serial: serial.clone().unwrap_or_default(),
                    limit: *limit,
                })
                .await?
                .into_inner();
            let mut stderr = silent_replicas(
                &response.replicas,
                ["the certificates it issued are not listed"; 2],
            );
            if response.truncated {
                stderr.push_str(&format!(
                    "more certificates match: these are the newest {limit} (--limit)\n"
                ));
            }
            Ok(Printed {
                stdout: match output {
                    Output::Table => certs_table(&response.certificates, response.replicas.len()),
                    Output::Json => certs_json(&response.certificates),
                },
                stderr,
                failed: false,
            })
        }
        RemoteCommand::Identity(command) => identity(client, command).await,
        RemoteCommand::Check { expiry_warning } => {
            let answer = client
                .list_workloads(ListWorkloadsRequest::default())
                .await?
                .into_inner();
            let policies = client
                .list_policies(ListPoliciesRequest::default())
                .await?
                .into_inner();
            let bundle = read_certs(&credentials.bundle)?;
            let operator = read_certs(&credentials.cert)?;
            let found = check::findings(&check::Inputs {
                address: &cli.control_plane,
                answer: &answer,
                stored_warnings: &policies.stored_warnings,
                bundle: &bundle,
                operator: &operator[0],
                now: crate::unix_now(),
                soon: *expiry_warning,
            });
            let (stdout, failed) = check::report(&found);
            Ok(Printed {
                stdout,
                stderr: String::new(),
                failed,
            })
        }
    }
}

/// `trellisctl identity ...`.
async fn identity(
    client: &mut AdminClient<Channel>,
    command: &IdentityCommand,
) -> Result<Printed, CtlError> {
    match command {
        IdentityCommand::Revoke { spiffe_id, reason } => {
            let response = client
                .revoke_identity(RevokeIdentityRequest {
                    spiffe_id: spiffe_id.clone(),
                    reason: reason.clone().unwrap_or_default(),
                })
                .await?
                .into_inner();
            let revoked = response.revocation.unwrap_or_default();
            let mut out = format!(
                "revoked {} at {}: its certificates issued until then no longer renew, and sidecars \
                 refuse them as peers\n",
                escape_controls(&revoked.spiffe_id),
                rfc3339(revoked.revoked_at_unix)
            );
            if response.previously_revoked_at_unix != 0 {
                out.push_str(&format!(
                    "(it was revoked before, at {})\n",
                    rfc3339(response.previously_revoked_at_unix)
                ));
            }
            for warning in &response.warnings {
                out.push_str(&format!("  warning: {}\n", warning.escape_debug()));
            }
            Ok(Printed::out(out))
        }
        IdentityCommand::Unrevoke { spiffe_id } => {
            let response = client
                .unrevoke_identity(UnrevokeIdentityRequest {
                    spiffe_id: spiffe_id.clone(),
                })
                .await?
                .into_inner();
            let removed = response.revocation.unwrap_or_default();
            Ok(Printed::out(format!(
                "removed the revocation of {} (revoked at {}): its certificates renew again, and \
                 sidecars accept them as peers\n",
                escape_controls(&removed.spiffe_id),
                rfc3339(removed.revoked_at_unix)
            )))
        }
        IdentityCommand::Revocations { output } => {
            let response = client
                .list_revocations(ListRevocationsRequest::default())
                .await?
                .into_inner();
            Ok(Printed::out(match output {
                Output::Table => revocations_table(&response.revocations),
                Output::Json => revocations_json(&response.revocations),
            }))
        }
    }
}

/// Revocations as an aligned text table, in the order given.
pub fn revocations_table(revocations: &[Revocation]) -> String {
    let mut rows = vec![
        ["SPIFFE ID", "REVOKED", "REASON"]
            .into_iter()
            .map(String::from)
            .collect(),
    ];
    for r in revocations {
        rows.push(vec![
            r.spiffe_id.clone(),
            rfc3339(r.revoked_at_unix),
            match r.reason.is_empty() {
                true => "-".into(),
                false => r.reason.clone(),
            },
        ]);
    }
    table(rows)
}

/// Revocations as a JSON array, in the order given.
pub fn revocations_json(revocations: &[Revocation]) -> String {
    let items: serde_json::Value = revocations
        .iter()
        .map(|r| {
            serde_json::json!({
                "spiffe_id": r.spiffe_id,
                "revoked_at_unix": r.revoked_at_unix,
                "revoked_at": rfc3339(r.revoked_at_unix),
                "reason": r.reason,
            })
        })
        .collect();
    pretty(&items)
}

/// A time for people ([`trellis_core::clock::rfc3339_checked`]), or `-` for none: 0, or
/// one without an RFC 3339 form, such as beyond year 9999 (the Kubernetes
/// store's Pod endpoints, which no certificate expiry ends).
fn rfc3339(unix: i64) -> String {
    match unix {
        0 => "-".into(),
        _ => trellis_core::clock::rfc3339_checked(unix).unwrap_or_else(|| "-".into()),
    }
}

/// A snapshot version as `trellisctl` shows it: followed by `@` and the
/// epoch it was set in ([`epoch_hex`]) when it has one, as versions of the
/// embedded store do (the Kubernetes store's have none).
pub fn version_shown(version: u64, epoch: u64) -> String {
    match epoch {
        0 => version.to_string(),
        _ => format!("{version}@{}", epoch_hex(epoch)),
    }
}

/// A snapshot version's epoch as `trellisctl` and the sidecar's `/config`
/// show it: 16 hex digits (a string in JSON, which cannot hold every u64
/// as a number exactly).
pub fn epoch_hex(epoch: u64) -> String {
    format!("{epoch:016x}")
}

/// Whether `a` and `b`, each a snapshot version with the epoch it was set
/// in, name one snapshot: the same number, set in the same epoch when both
/// epochs are known. An epoch of 0 is not known (a store that sets none,
/// as the Kubernetes store; a replica, or a sidecar's stream, that
/// predates epochs), and then the numbers alone are compared, as before
/// there were epochs.
pub fn same_snapshot(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 == b.0 && (a.1 == 0 || b.1 == 0 || a.1 == b.1)
}

/// Whether `held` is the number of `served` set in another epoch, both
/// known: after a restore of the embedded database from a backup, or on a
/// replica with another database, "the same" version holds other content.
pub fn same_number_other_epoch(held: (u64, u64), served: (u64, u64)) -> bool {
    held.0 == served.0 && !same_snapshot(held, served)
}

/// How `trellisctl workloads` names a sidecar's [`SnapshotSync`]: as the
/// control plane's metrics name the state.
fn sync_name(w: &Workload) -> &'static str {
    let state = match w.sync() {
        SnapshotSync::Synced => SyncState::Synced,
        SnapshotSync::Pending => SyncState::Pending,
        SnapshotSync::Refused => SyncState::Refused,
        SnapshotSync::NotConnected => SyncState::NotConnected,
        SnapshotSync::Unspecified => return "unknown",
    };
    state.label()
}

/// The workloads as an aligned text table, then why each sidecar that
/// refused its newest snapshot refused it. When the answer joins several
/// control-plane replicas, a `REPLICA` column says which one each sidecar
/// streams to, and a line per replica what it serves.
pub fn workloads_table(answer: &ListWorkloadsResponse) -> String {
    let several = answer.replicas.len() > 1;
    let mut header = vec![
        "SPIFFE ID",
        "ADDRESS",
        "CERT EXPIRES",
        "ACKED VERSION",
        "SNAPSHOT",
        "CONNECTED",
        "OPAQUE PORTS",
    ];
    if several {
        header.push("REPLICA");
    }
    // As `certs` does: a REVOKED column when any is revoked.
    let any_revoked = answer.workloads.iter().any(|w| w.revoked);
    if any_revoked {
        header.push("REVOKED");
    }
    let mut rows = vec![header.into_iter().map(String::from).collect()];
    for w in &answer.workloads {
        let mut row = vec![
            w.spiffe_id.clone(),
            match (w.addresses.is_empty(), w.address.is_empty()) {
                (false, _) => w.addresses.join(","),
                (true, false) => w.address.clone(),
                (true, true) => "-".into(),
            },
            rfc3339(w.cert_expires_at_unix),
            version_shown(w.acked_version, w.acked_version_epoch),
            sync_name(w).into(),
            if w.connected { "yes" } else { "no" }.into(),
            match w.opaque_ports.is_empty() {
                true => "-".into(),
                false => crate::inject::join(&w.opaque_ports),
            },
        ];
        if several {
            row.push(match w.replicas.is_empty() {
                true => "-".into(),
                false => w.replicas.join(","),
            });
        }
        if any_revoked {
            row.push(if w.revoked { "yes" } else { "no" }.into());
        }
        rows.push(row);
    }
    let mut out = table(rows);
    // The sidecar's reason and warnings, and the SPIFFE ID, are escaped
    // ([`escape_controls`]), as the table's cells are.
    for w in answer
        .workloads
        .iter()
        .filter(|w| w.sync() == SnapshotSync::Refused)
    {
        out.push_str(&escape_controls(&format!(
            "{} refused its newest snapshot: {}",
            w.spiffe_id, w.last_nack
        )));
        out.push('\n');
    }
    for w in &answer.workloads {
        for warning in &w.ack_warnings {
            out.push_str(&escape_controls(&format!(
                "{} enforces its snapshot with a warning: {warning}",
                w.spiffe_id
            )));
            out.push('\n');
        }
    }
    if several {
        for (i, r) in answer.replicas.iter().enumerate() {
            if r.error.is_empty() {
                out.push_str(&format!(
                    "{}{}: snapshot {}, {} connected\n",
                    replica_label(r),
                    if i == 0 { " (answering)" } else { "" },
                    version_shown(r.snapshot_version, r.snapshot_version_epoch),
                    r.connected
                ));
            }
        }
    }
    out.push_str(&silent_replicas(&answer.replicas, SILENT_STREAMS));
    out
}

/// A replica as every command names it: by its name and address, or by
/// its address alone when it gave no name (it did not answer); escaped
/// ([`escape_controls`]).
pub fn replica_label(r: &ReplicaStatus) -> String {
    escape_controls(&match r.name.is_empty() {
        true => format!("replica at {}", r.address),
        false => format!("replica {} at {}", r.name, r.address),
    })
}

/// A replica that did not answer, as every command names it: why, and
/// whether nothing listened for it (`not_listening`).
pub fn unanswered(r: &ReplicaStatus) -> String {
    let (label, error) = (replica_label(r), escape_controls(&r.error));
    match r.not_listening {
        true => format!("{label} is not listening ({error})"),
        false => format!("{label} did not answer ({error})"),
    }
}

/// What a replica that did not answer takes out of `trellisctl
/// workloads`: one silent, and one nothing listens for.
const SILENT_STREAMS: [&str; 2] = [
    "the sidecars streaming to it show as not connected",
    "it holds no sidecar stream",
];

/// What a replica that did not answer takes out of `trellisctl policy
/// explain`: one silent, and one nothing listens for.
const SILENT_OPAQUE_PORTS: [&str; 2] = [
    "the opaque ports of the sidecars streaming to it are not known, and one of the \
     destination's may hold the port opaque",
    "it holds no sidecar stream",
];

/// A line for each replica that did not answer, with what that takes out
/// of the answer: `silent` for one that did not answer in time, `gone`
/// for one nothing listens for (it is starting, stopping or gone).
fn silent_replicas(replicas: &[ReplicaStatus], [silent, gone]: [&str; 2]) -> String {
    replicas
        .iter()
        .filter(|r| !r.error.is_empty())
        .map(|r| match r.not_listening {
            true => format!(
                "{}, so it is starting, stopping or gone: {gone}\n",
                unanswered(r)
            ),
            false => format!("{}: {silent}\n", unanswered(r)),
        })
        .collect()
}

/// Issued certificates as an aligned text table, in the order given.
/// With several control-plane replicas, a `REPLICA` column says which one
/// issued each; when any is revoked, a `REVOKED` column says which.
pub fn certs_table(certs: &[IssuedCertificate], replicas: usize) -> String {
    let mut header = vec!["SERIAL", "SPIFFE ID", "ISSUED", "EXPIRES"];
    if replicas > 1 {
        header.push("REPLICA");
    }
    let any_revoked = certs.iter().any(|c| c.revoked);
    if any_revoked {
        header.push("REVOKED");
    }
    let mut rows = vec![header.into_iter().map(String::from).collect()];
    for c in certs {
        let mut row = vec![
            c.serial.clone(),
            c.spiffe_id.clone(),
            rfc3339(c.issued_at_unix),
            rfc3339(c.not_after_unix),
        ];
        if replicas > 1 {
            row.push(c.replica.clone());
        }
        if any_revoked {
            row.push(if c.revoked { "yes" } else { "no" }.into());
        }
        rows.push(row);
    }
    table(rows)
}

/// Issued certificates as a JSON array, in the order given.
pub fn certs_json(certs: &[IssuedCertificate]) -> String {
    let items: serde_json::Value = certs
        .iter()
        .map(|c| {
            serde_json::json!({
                "serial": c.serial,
                "spiffe_id": c.spiffe_id,
                "issued_at_unix": c.issued_at_unix,
                "issued_at": rfc3339(c.issued_at_unix),
                "not_after_unix": c.not_after_unix,
                "not_after": rfc3339(c.not_after_unix),
                "replica": c.replica,
                "revoked": c.revoked,
            })
        })
        .collect();
    pretty(&items)
}

/// `value` as indented JSON, ending in a newline.
fn pretty(value: &serde_json::Value) -> String {
    let mut out = serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
    out.push('\n');
    out
}

/// Rows (the first is the header) as aligned text columns, each cell
/// escaped ([`escape_controls`]): cells hold what the control plane sent.
pub fn table(rows: Vec<Vec<String>>) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|cell| escape_controls(cell)).collect())
        .collect();
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The workloads as a JSON array.
pub fn workloads_json(workloads: &[Workload]) -> String {
    let now = crate::unix_now();
    let items: serde_json::Value = workloads
        .iter()
        .map(|w| {
            serde_json::json!({
                "spiffe_id": w.spiffe_id,
                "address": w.address,
                "addresses": w.addresses,
                "cert_expires_at_unix": w.cert_expires_at_unix,
                "cert_expires": rfc3339(w.cert_expires_at_unix),
                "cert_expired": w.cert_expires_at_unix <= now,
                "cert_expiry_unknown": w.cert_expiry_unknown,
                "cert_issued_at_unix": w.cert_issued_at_unix,
                "cert_issued": rfc3339(w.cert_issued_at_unix),
                "cert_renewal_unknown": w.cert_renewal_unknown,
                "revoked": w.revoked,
                "acked_version": w.acked_version,
                "acked_version_epoch": epoch_hex(w.acked_version_epoch),
                "synced_version": w.synced_version,
                "synced_version_epoch": epoch_hex(w.synced_version_epoch),
                "snapshot": sync_name(w),
                "connected": w.connected,
                "last_nack": w.last_nack,
                "ack_warnings": w.ack_warnings,
                "opaque_ports": w.opaque_ports,
                "replicas": w.replicas,
            })
        })
        .collect();
    pretty(&items)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_shown_in_rfc3339_or_as_a_dash_for_none() {
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        for none in [0, -1, 253_402_300_800, i64::MAX] {
            assert_eq!(rfc3339(none), "-", "{none}");
        }
    }

    /// `--ttl` says the bound it is out of, in the words of the others.
    #[test]
    fn a_token_ttl_out_of_bounds_names_the_bound() {
        for (ttl, problem) in [
            ("0", "\"0\" is shorter than the minimum of 1 second"),
            ("0s", "\"0s\" is shorter than the minimum of 1 second"),
            ("500ms", "\"500ms\" is shorter than the minimum of 1 second"),
            ("1.5s", "\"1.5s\" is not a whole number of seconds"),
            ("25h", "\"25h\" is longer than the maximum of 1 day"),
        ] {
            assert_eq!(token_ttl(ttl).unwrap_err(), problem);
        }
        assert_eq!(token_ttl("1s").unwrap(), Duration::from_secs(1));
    }

    /// The README's rule: every flag of the control plane and of trellisctl
    /// has the environment twin `TRELLIS_<FLAG>`, but the flags of the one
    /// request `policy explain` decides, which the README names as the
    /// exception.
    #[test]
    fn every_flag_has_its_environment_twin_but_the_explained_request_s() {
        use clap::CommandFactory;

        const REQUEST_FLAGS: [&str; 4] = ["path", "method", "header", "http2"];
        fn flags(command: &clap::Command, at: &str, found: &mut Vec<String>) {
            let at = format!("{at} {}", command.get_name());
            for arg in command.get_arguments() {
                let (Some(long), false) = (arg.get_long(), arg.is_hide_set()) else {
                    continue;
                };
                if ["help", "version"].contains(&long) {
                    continue;
                }
                let twin = format!("TRELLIS_{}", long.to_uppercase().replace('-', "_"));
                let env = arg.get_env().and_then(|e| e.to_str());
                let request = at.ends_with("policy explain") && REQUEST_FLAGS.contains(&long);
                match (env, request) {
                    (Some(env), false) if env == twin => {}
                    (None, true) => {}
                    _ => found.push(format!("{at} --{long}: {env:?}")),
                }
            }
            for sub in command.get_subcommands() {
                flags(sub, &at, found);
            }
        }
        let mut wrong = Vec::new();
        flags(&Cli::command(), "", &mut wrong);
        flags(&crate::config::Config::command(), "", &mut wrong);
        assert!(wrong.is_empty(), "{wrong:#?}");
    }

    /// `--reason` is checked before any call, by the server's own rule.
    #[test]
    fn a_reason_with_a_bidi_override_is_refused_before_any_call() {
        let args = [
            "trellisctl",
            "identity",
            "revoke",
            "spiffe://cluster.local/ns/default/sa/web",
            "--reason",
            "key \u{202E}deipoc",
        ];
        let err = Cli::try_parse_from(args).unwrap_err().to_string();
        assert!(
            err.contains("holds the invisible format character U+202E; give plain text"),
            "{err}"
        );
    }
}
