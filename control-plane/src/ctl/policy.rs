//! `trellisctl policy ...`: policy documents (AuthorizationPolicy and
//! RateLimitPolicy, mixed freely in files) from files to the Admin API, and
//! `policy lint`, which needs no control plane at all.
//!
//! A directory given names its own `*.yaml`, `*.yml` and `*.json` files,
//! not hidden ones, as `kubectl -f DIR` reads them, and with `-R` those of
//! its subdirectories too (`trellis_core::policy::find_policy_files`); one
//! that holds none is a usage error naming it. The files are read in sorted
//! order; `-` reads standard input ([`policy_files`]), once, in its place:
//! after the files of the paths given before it, before those of the paths
//! after it, its diagnostics named `<stdin>` (a file whose path is
//! `<stdin>` is named `./<stdin>`). All are validated here
//! first, by the same library function the control plane runs
//! (`trellis_core::policy::load_given_in`), so a mistake is reported at `file:line:column: field.path: message` before anything is
//! sent; if any document is invalid nothing is applied. The valid documents
//! of every file go to the control plane in one ApplyPolicy request, so a
//! multi-file apply is all or nothing there too with the embedded store.
//! The Kubernetes store writes one object after another: a write the API
//! server refuses stops the rest, and the error names those written before
//! it, which stay.
//!
//! `policy lint` prints its diagnostics on stdout, one per line (at most
//! [`MAX_DIAGNOSTICS`](trellis_core::policy::MAX_DIAGNOSTICS), then how
//! many more there were), and a summary counting them all on stderr; it
//! exits 1 when there is any error, 64 when the files hold no document at
//! all (as `apply` does, naming the first few), 0 otherwise (also with
//! warnings).

use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use tonic::transport::Channel;
use trellis_core::TrustDomain;
use trellis_core::flags::FlagNames;
use trellis_core::policy::{
    AuthorizationPolicy, Decision, Document, Explanation, GivenText, Loaded, PolicyFiles,
    RateLimitPolicy, Reason, RequestAnswer, RequestOutcome, RuleRef, SelectorScope,
    ValidationContext, Walk, document_from_proto, find_policy_files, load_given_in, policy_key,
};
use trellis_proto::admin::v1::RateLimitRecord;
use trellis_proto::admin::v1::admin_client::AdminClient;
use trellis_proto::admin::v1::{
    ApplyPolicyRequest, ApplyPolicyResponse, DeletePolicyRequest, ExplainRequest, ExplainResponse,
    ExplainedHttpRequest, GetPolicyRequest, HttpHeader, ListPoliciesRequest, PolicyOutcome,
};
use trellis_proto::policy::v1::{Action, Policy, RateLimit};

use super::wait::Written;
use super::{CtlError, Output, Printed, pretty};
use crate::api::admin::MAX_ADMIN_REQUEST_BYTES;
use crate::api::policy::policy_errors_of;
use crate::config::RootNamespaceArg;

/// `--wait` of the commands that write.
#[derive(Debug, Args)]
pub struct Wait {
    /// Then wait (at most DURATION, 60s if none is given) until every
    /// connected sidecar, on every control-plane replica, holds the
    /// snapshot that carries the write; exit 1 naming those that do not (a
    /// refusal that stands 2s ends the wait at once).
    #[arg(
        long,
        env = "TRELLIS_WAIT",
        value_name = "DURATION",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "60s",
        value_parser = trellis_core::duration::parse
    )]
    wait: Option<Duration>,
}

impl Wait {
    /// Whether a wait was asked for.
    pub fn is_set(&self) -> bool {
        self.wait.is_some()
    }

    /// After a write that `printed` reports: waits if asked, and adds what
    /// the wait found.
    async fn then(
        &self,
        client: &mut AdminClient<Channel>,
        mut printed: Printed,
        written: Written,
    ) -> Result<Printed, CtlError> {
        if let Some(timeout) = self.wait {
            let (text, failed) = super::wait::wait_for(client, written, timeout).await?;
            printed.stderr.push_str(&text);
            printed.failed |= failed;
        }
        Ok(printed)
    }
}

/// Why `e` refused `args`, when it is a duration given to `--wait` after a
/// space (`--wait 30s`): the duration is optional, so it must follow an
/// `=`, and clap says only that `30s` is an unexpected argument. It runs on
/// clap's refusal, before any `Given`: the `--wait` it names was typed on
/// the command line, so it is named as typed.
pub fn wait_without_equals(e: &clap::Error, args: &[std::ffi::OsString]) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if e.kind() != ErrorKind::UnknownArgument {
        return None;
    }
    let Some(ContextValue::String(given)) = e.get(ContextKind::InvalidArg) else {
        return None;
    };
    trellis_core::duration::parse(given).ok()?;
    let after_wait = args
        .windows(2)
        .any(|pair| pair[0] == "--wait" && pair[1] == given.as_str());
    after_wait.then(|| {
        format!(
            "--wait takes its duration after an '=': give --wait={given} ({given:?} after a \
             space is no argument of this command)"
        )
    })
}

/// `-R` of the commands that read policy files.
#[derive(Debug, Args)]
pub struct Recursive {
    /// Read the policy files of each directory's subdirectories too, at
    /// every depth (not hidden ones; symbolic links to directories are not
    /// followed).
    #[arg(short = 'R', long = "recursive", env = "TRELLIS_RECURSIVE")]
    recursive: bool,
}

impl Recursive {
    /// How directories are read.
    fn walk(&self) -> Walk {
        match self.recursive {
            true => Walk::Recursive,
            false => Walk::Directory,
        }
    }
}

/// What diagnostics and errors name standard input (`-` among the paths).
pub const STDIN: &str = "<stdin>";

/// What `apply` and `lint` read: the files the paths name and, when `-` is
/// among them, standard input, in its place.
#[derive(Debug, Default)]
pub struct PolicyInput {
    found: PolicyFiles,
    stdin: Option<Stdin>,
}

/// Standard input, read to its end, and how many of the files are read
/// before it.
#[derive(Debug)]
struct Stdin {
    after: usize,
    text: String,
}

impl PolicyInput {
    /// Reads and validates every file and standard input, in order.
    fn load(&self, td: &TrustDomain, context: &ValidationContext) -> Loaded {
        let given = self.stdin.as_ref().map(|s| GivenText {
            name: STDIN,
            after: s.after,
            text: &s.text,
        });
        load_given_in(&self.found, given, td, context)
    }

    /// What is read, in order: each file's name as diagnostics give it, or
    /// `None` for standard input.
    fn sources(&self) -> Vec<Option<&Path>> {
        let mut sources: Vec<_> = self.found.files.iter().map(|f| Some(f.as_path())).collect();
        if let Some(stdin) = &self.stdin {
            sources.insert(stdin.after.min(sources.len()), None);
        }
        sources
    }

    /// The names of what is read, in order, as diagnostics give them.
    fn names(&self) -> Vec<String> {
        let name = |s: Option<&Path>| match s {
            Some(file) => file.display().to_string(),
            None => STDIN.to_owned(),
        };
        self.sources().into_iter().map(name).collect()
    }

    /// Each file (or standard input) that holds valid documents, with its
    /// text, in the order read.
    fn texts_with_documents(&self, loaded: &Loaded) -> Result<Vec<(String, String)>, CtlError> {
        let holding = files_with_documents(loaded);
        let mut texts = Vec::with_capacity(holding.len());
        for source in self.sources() {
            let text = match source {
                None if holding.iter().any(|n| n == STDIN) => {
                    let stdin = self.stdin.as_ref().map(|s| s.text.clone());
                    (STDIN.to_owned(), stdin.unwrap_or_default())
                }
                Some(file) if holding.contains(&file.display().to_string()) => read_file(file)?,
                _ => continue,
            };
            texts.push(text);
        }
        Ok(texts)
    }
}

/// What the paths name, directories read as `recursive` says, and `-`
/// standard input: the files of the paths given before it are read before
/// it, those of the paths after it after it (each set in sorted order). A
/// directory that holds none is a usage error naming it, and `-` given
/// twice one too, before anything else is read, and `-` with standard
/// input closed or `/dev/null` (what a closed one is given) too; standard input
/// is read to its end, at most [`MAX_ADMIN_REQUEST_BYTES`] (more could not
/// be applied in one request), and must be UTF-8 text.
pub fn policy_files(paths: &[PathBuf], recursive: &Recursive) -> Result<PolicyInput, CtlError> {
    let walk = recursive.walk();
    let paths: Vec<PathBuf> = paths.iter().map(|p| told_from_stdin(p)).collect();
    let paths = &paths[..];
    let dashes: Vec<usize> = (paths.iter().enumerate())
        .filter(|(_, p)| p.as_os_str() == "-")
        .map(|(i, _)| i)
        .collect();
    if dashes.len() > 1 {
        return Err(CtlError::Usage(
            "- (standard input) is given twice: it can be read only once (a file named - is \
             ./-)"
                .into(),
        ));
    }
    let (found, after) = match dashes.first() {
        None => (find_policy_files(paths, walk), None),
        Some(&at) => {
            let mut found = find_policy_files(&paths[..at], walk);
            let after = found.files.len();
            found.append(find_policy_files(&paths[at + 1..], walk));
            (found, Some(after))
        }
    };
    if let Some(dir) = found.empty_directories.first() {
        let deeper = match walk {
            Walk::Directory => " (-R reads its subdirectories too)",
            Walk::Recursive => " or its subdirectories",
        };
        return Err(CtlError::Usage(format!(
            "{}: no policy file (*.yaml, *.yml, *.json, not hidden) in it{deeper}",
            super::shown(dir)
        )));
    }
    let stdin = match after {
        Some(after) => {
            let input = std::io::stdin();
            if is_dev_null(&input) {
                return Err(CtlError::Usage(format!(
                    "{STDIN}: standard input is closed (or /dev/null), so - has nothing to \
                     read: pipe the documents in, or leave - out"
                )));
            }
            Some(Stdin {
                after,
                text: read_stdin(&mut input.lock())?,
            })
        }
        None => None,
    };
    Ok(PolicyInput { found, stdin })
}

/// `path`, or `./<stdin>` for a file whose path is [`STDIN`], the name
/// standard input goes by: a file's diagnostics and errors never read as
/// standard input's, whether `-` is given too or not.
fn told_from_stdin(path: &Path) -> PathBuf {
    if path.as_os_str() == STDIN {
        Path::new(".").join(STDIN)
    } else {
        path.to_owned()
    }
}

/// Whether `input` is `/dev/null`: what a process started with its
/// standard input closed is given in its place (by Rust's runtime, before
/// `main`), and what a caller gets that runs trellisctl from a script or a
/// service without one. `-` cannot have been meant to read it.
fn is_dev_null(input: &impl AsFd) -> bool {
    let Ok(fd) = input.as_fd().try_clone_to_owned() else {
        return false;
    };
    match (
        std::fs::File::from(fd).metadata(),
        std::fs::metadata("/dev/null"),
    ) {
        (Ok(given), Ok(null)) => given.file_type().is_char_device() && given.rdev() == null.rdev(),
        _ => false,
    }
}

/// All of `input` (standard input) as text: at most
/// [`MAX_ADMIN_REQUEST_BYTES`], the most the control plane reads in one
/// ApplyPolicy request, refused past that before anything is sent.
fn read_stdin(input: &mut impl Read) -> Result<String, CtlError> {
    let limit = MAX_ADMIN_REQUEST_BYTES;
    let mut bytes = Vec::new();
    let read = input.take(limit as u64 + 1).read_to_end(&mut bytes);
    read.map_err(|e| {
        CtlError::Reported(format!(
            "error: {STDIN}: cannot read: {}\n",
            trellis_core::io_error::IoWords(&e)
        ))
    })?;
    if bytes.len() > limit {
        return Err(CtlError::Reported(format!(
            "error: {STDIN}: more than {limit} bytes (4 MiB), the most the control plane reads \
             in one ApplyPolicy request: nothing applied; give the documents a few at a time\n"
        )));
    }
    String::from_utf8(bytes)
        .map_err(|_| CtlError::Reported(format!("error: {STDIN}: cannot read: not UTF-8 text\n")))
}

/// The `policy` subcommands: those of [`RemotePolicyCommand`], then `lint`.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    #[command(flatten)]
    Remote(RemotePolicyCommand),
    /// Check policy files offline (no control plane needed). Diagnostics go to
    /// stdout as `file:line:column: field.path: message`; exit 1 on any
    /// error, 64 when the files hold no document (as `apply` refuses
    /// them), 0 otherwise.
    #[command(args = super::offline_flags())]
    Lint {
        /// Policy files or directories, read as `apply -f` reads them; `-`
        /// reads standard input: `kustomize build | trellisctl policy lint -`.
        #[arg(value_name = "FILE|DIR", required = true)]
        paths: Vec<PathBuf>,
        #[command(flatten)]
        recursive: Recursive,
        /// The mesh's trust domain, which SPIFFE IDs in the policies must use.
        #[arg(long, env = "TRELLIS_TRUST_DOMAIN", default_value = "cluster.local")]
        trust_domain: String,
        #[command(flatten)]
        root: RootNamespaceArg,
    },
}

/// The `policy` subcommands that call the control plane.
#[derive(Debug, Subcommand)]
pub enum RemotePolicyCommand {
    /// Create or update policies from YAML/JSON files (several documents per
    /// file), read in sorted order, and standard input (`-f -`) in its
    /// place among them. Nothing is applied if any document is invalid.
    Apply {
        /// A policy file, or a directory: its own *.yaml, *.yml and *.json
        /// files, not hidden ones (with -R, its subdirectories' too);
        /// repeatable. `-` reads standard input, once, in its place among
        /// the paths (a file named - is ./-):
        /// `helm template ... | trellisctl policy apply -f -`.
        #[arg(
            short = 'f',
            long = "filename",
            value_name = "FILE|DIR",
            required = true,
            env = "TRELLIS_FILENAME"
        )]
        files: Vec<PathBuf>,
        #[command(flatten)]
        recursive: Recursive,
        /// Validate and show what would change and whom it would select.
        #[arg(long, env = "TRELLIS_DRY_RUN")]
        dry_run: bool,
        /// Output format.
        #[arg(short = 'o', long, env = "TRELLIS_OUTPUT", value_enum, default_value_t)]
        output: Output,
        #[command(flatten)]
        wait: Wait,
    },
    /// Print one policy as a YAML document.
    Get {
        /// NAMESPACE/NAME
        #[arg(value_parser = split_name)]
        name: (String, String),
        /// The document kind.
        #[arg(long, env = "TRELLIS_KIND", value_parser = KINDS, default_value = AuthorizationPolicy::KIND)]
        kind: String,
    },
    /// List every policy.
    List {
        /// Output format.
        #[arg(short = 'o', long, env = "TRELLIS_OUTPUT", value_enum, default_value_t)]
        output: Output,
    },
    /// Delete one policy.
    Delete {
        /// NAMESPACE/NAME
        #[arg(value_parser = split_name)]
        name: (String, String),
        /// The document kind.
        #[arg(long, env = "TRELLIS_KIND", value_parser = KINDS, default_value = AuthorizationPolicy::KIND)]
        kind: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Explain which rule decides a connection, and why; first whether a
    /// revocation of either end refuses it whatever the policies say, and
    /// last the rate limits on the destination's requests.
    Explain {
        /// SPIFFE ID of the connecting workload.
        #[arg(long, value_name = "ID", env = "TRELLIS_FROM", value_parser = super::spiffe_id)]
        from: String,
        /// SPIFFE ID of the workload connected to.
        #[arg(long, value_name = "ID", env = "TRELLIS_TO", value_parser = super::spiffe_id)]
        to: String,
        /// Destination port. On a port parsed as HTTP, the verdict names
        /// the L7 rules that decide (or audit) its requests one by one, and
        /// what a connection that is not HTTP gets. On an opaque port (never
        /// parsed as HTTP), a rule's HTTP conditions fail closed as the
        /// sidecars enforce them (a DENY rule denies the whole
        /// connection). The destination's
        /// opaque ports are the mesh's, those its connected sidecars
        /// declare (their --opaque-ports), and --opaque-ports here; the
        /// trace says which made the port opaque, and names any replica
        /// that did not answer (its sidecars' opaque ports are not known).
        #[arg(
            long,
            value_name = "P",
            env = "TRELLIS_PORT",
            value_parser = trellis_core::tcp::parse_port
        )]
        port: u16,
        /// Ports to explain as opaque for the destination, besides the
        /// mesh's and those its connected sidecars declare: what a sidecar
        /// not connected now would declare with --opaque-ports.
        #[arg(
            long,
            env = "TRELLIS_OPAQUE_PORTS",
            value_name = "PORT,...",
            value_delimiter = ',',
            value_parser = trellis_core::tcp::parse_port
        )]
        opaque_ports: Vec<u16>,
        /// Also decide one HTTP request with this target on the
        /// connection, as the destination's sidecar would: the answer
        /// names the deciding rule and the outcome (allowed, denied with
        /// 403, or refused before any rule, e.g. a path an app could read
        /// as another one), and the rules' HTTP conditions are evaluated
        /// against it. A query after `?` is matched by no rule, but counts
        /// towards the sidecar's bounds on the request's head. An
        /// absolute-form target (`http://host:port/path?query`, HTTP/1.1
        /// only) is taken as the sidecar takes it: the rules match its
        /// path, and a `Host` header must name the same host and port.
        /// `@FILE` reads the target from FILE (`@-`: standard input), one
        /// line end after it left out: a long one does not fit on a
        /// command line.
        #[arg(long, value_name = "PATH", value_parser = explained_target)]
        path: Option<String>,
        /// The method of the request --path names (default GET).
        #[arg(long, value_name = "M", requires = "path", value_parser = crate::api::policy::http_method)]
        method: Option<String>,
        /// A header of the request --path names, `NAME: VALUE`; repeat for
        /// more (a name given twice is sent twice). An HTTP/1.1 request in
        /// origin form needs a `Host` (`--header 'Host: api'`): the sidecar
        /// refuses one without with 400, and so does the answer.
        #[arg(long, value_name = "NAME: VALUE", requires = "path", value_parser = crate::api::policy::http_header)]
        header: Vec<(String, String)>,
        /// The request --path names comes in HTTP/2 (default HTTP/1.1):
        /// a `--header 'Host: ...'` stands for its `:authority` (HTTP/2
        /// clients send that instead) and is counted as one; a second
        /// `Host` must name the same authority. The sidecar answers 431 to
        /// an HTTP/2 header list over 16 KiB (its HTTP/2 layer refuses one
        /// of 64 KiB or more itself: 431 with no body, nothing logged),
        /// and to an HTTP/1.1 head over 408 KiB or with more than 100
        /// header fields (414 to an HTTP/1.1 target over 65,534 bytes).
        #[arg(long, requires = "path")]
        http2: bool,
        /// Output format: `table` prints the trace as text.
        #[arg(short = 'o', long, env = "TRELLIS_OUTPUT", value_enum, default_value_t)]
        output: Output,
    },
}

/// The kinds `--kind` accepts.
const KINDS: [&str; 2] = [AuthorizationPolicy::KIND, RateLimitPolicy::KIND];

fn get_request(namespace: &str, name: &str, kind: &str) -> GetPolicyRequest {
    GetPolicyRequest {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        kind: kind.to_owned(),
    }
}

/// `refused`, the control plane's answer to a `get` or `delete` of the
/// `kind` asked, with a hint when it is NOT_FOUND and a policy of the other
/// kind has that name: `policy list` shows both kinds, and `get` and
/// `delete` read `AuthorizationPolicy` unless `--kind` says otherwise, so a
/// rate limit's name copied from the list is otherwise "not found".
async fn other_kind_hint(
    client: &mut AdminClient<Channel>,
    namespace: &str,
    name: &str,
    kind: &str,
    refused: tonic::Status,
) -> CtlError {
    let other = KINDS.into_iter().find(|k| *k != kind);
    let Some(other) = other.filter(|_| refused.code() == tonic::Code::NotFound) else {
        return refused.into();
    };
    match client.get_policy(get_request(namespace, name, other)).await {
        Ok(_) => tonic::Status::not_found(format!(
            "{} ({} is a {other}: add --kind {other})",
            refused.message(),
            policy_key(namespace, name)
        ))
        .into(),
        Err(_) => refused.into(),
    }
}

/// Why `apply` and `lint` refuse files without errors that hold no
/// document (empty, or only comments), naming the first few of `names`
/// and counting the rest.
fn no_documents(names: &[String]) -> CtlError {
    const NAMED: usize = 3;
    let mut listed = (names.iter().take(NAMED))
        .map(|n| super::escape_controls(n))
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > NAMED {
        listed.push_str(&format!(" and {} more", names.len() - NAMED));
    }
    CtlError::Usage(format!(
        "no AuthorizationPolicy or RateLimitPolicy documents found in the given files: {listed}"
    ))
}

/// `policy lint`: no credentials, no network.
pub fn lint(
    paths: &[PathBuf],
    recursive: &Recursive,
    trust_domain: &str,
    root_namespace: &str,
    names: &dyn FlagNames,
) -> Result<Printed, CtlError> {
    let td = TrustDomain::new(trust_domain).map_err(|e| {
        let flag = names.name("trust-domain");
        CtlError::Usage(format!("{flag} {trust_domain:?}: {e}"))
    })?;
    let input = policy_files(paths, recursive)?;
    let context = ValidationContext {
        scope: SelectorScope::root(root_namespace),
        ..ValidationContext::default()
    };
    let loaded = input.load(&td, &context);
    // What `apply` would refuse to send, refused alike.
    if !loaded.has_errors() && files_with_documents(&loaded).is_empty() {
        return Err(no_documents(&input.names()));
    }
    let (errors, warnings) = (loaded.errors(), loaded.warnings());
    let stderr = format!(
        "{errors} error{}, {warnings} warning{}\n",
        plural(errors),
        plural(warnings)
    );
    Ok(Printed {
        stdout: listing(&loaded),
        stderr,
        failed: loaded.has_errors(),
    })
}

/// The diagnostics reading kept, one a line (at most
/// [`MAX_DIAGNOSTICS`](trellis_core::policy::MAX_DIAGNOSTICS): past that
/// many a file is usually one mistake repeated), then how many more there
/// were. A file's name, or the text a message quotes, is shown with its
/// control characters escaped ([`super::escape_controls`]).
fn listing(loaded: &Loaded) -> String {
    let mut out = String::new();
    for d in &loaded.diagnostics {
        out.push_str(&super::escape_controls(&d.to_string()));
        out.push('\n');
    }
    let more = loaded.omitted;
    if more.total() > 0 {
        out.push_str(&format!(
            "and {} more diagnostic{} ({} error{}, {} warning{})\n",
            more.total(),
            plural(more.total()),
            more.errors,
            plural(more.errors),
            more.warnings,
            plural(more.warnings)
        ));
    }
    out
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// Runs a subcommand that talks to the control plane; `td` is the trust
/// domain of the operator credential, `input` what `apply` reads, which
/// [`policy_files`] found (and read from standard input) before the
/// credential was read (nothing for the other subcommands).
pub async fn run(
    client: &mut AdminClient<Channel>,
    td: &TrustDomain,
    command: &RemotePolicyCommand,
    input: PolicyInput,
    names: &dyn FlagNames,
) -> Result<Printed, CtlError> {
    match command {
        RemotePolicyCommand::Apply {
            dry_run,
            output,
            wait,
            ..
        } => {
            let (printed, written) = apply(client, td, &input, *dry_run, *output).await?;
            wait.then(client, printed, written).await
        }
        RemotePolicyCommand::Get { name, kind } => {
            let (namespace, name) = name.clone();
            let response = match client
                .get_policy(get_request(&namespace, &name, kind))
                .await
            {
                Ok(response) => response.into_inner(),
                Err(refused) => {
                    return Err(other_kind_hint(client, &namespace, &name, kind, refused).await);
                }
            };
            let revision = match (&response.policy, &response.rate_limit) {
                (Some(p), _) => p.revision,
                (None, Some(r)) => r.revision,
                (None, None) => 0,
            };
            Ok(Printed::out(format!(
                "# revision {revision}\n{}",
                super::escape_lines(&response.yaml)
            )))
        }
        RemotePolicyCommand::List { output } => {
            let response = client
                .list_policies(ListPoliciesRequest {})
                .await?
                .into_inner();
            Ok(Printed::out(match output {
                Output::Table => policies_table(&response.policies, &response.rate_limits),
                Output::Json => policies_json(
                    &response.policies,
                    &response.rate_limits,
                    response.generation,
                ),
            }))
        }
        RemotePolicyCommand::Delete { name, kind, wait } => {
            let (namespace, name) = name.clone();
            let key = policy_key(&namespace, &name);
            let request = DeletePolicyRequest {
                namespace: namespace.clone(),
                name: name.clone(),
                kind: kind.clone(),
            };
            let response = match client.delete_policy(request).await {
                Ok(response) => response.into_inner(),
                Err(refused) => {
                    return Err(other_kind_hint(client, &namespace, &name, kind, refused).await);
                }
            };
            let printed = Printed::out(format!(
                "{kind} {}: deleted\nsnapshot version {}\n",
                super::escape_controls(&key),
                super::version_shown(response.snapshot_version, response.snapshot_version_epoch)
            ));
            let written = Written {
                version: response.snapshot_version,
                epoch: response.snapshot_version_epoch,
                position: response.position,
            };
            wait.then(client, printed, written).await
        }
        RemotePolicyCommand::Explain {
            from,
            to,
            port,
            opaque_ports,
            path,
            method,
            header,
            http2,
            output,
        } => {
            if *http2
                && let Some(path) = path
                && crate::api::policy::is_absolute_target(path)
            {
                return Err(CtlError::Usage(format!(
                    "{} {}: {}",
                    names.name("path"),
                    crate::api::quoted(path),
                    crate::api::policy::NO_ABSOLUTE_H2
                )));
            }
            if *http2
                && let Some(path) = path
                && path.contains('#')
            {
                return Err(CtlError::Usage(format!(
                    "{} {}: {}",
                    names.name("path"),
                    crate::api::quoted(path),
                    crate::api::policy::NO_FRAGMENT_H2
                )));
            }
            let request = path.as_ref().map(|path| ExplainedHttpRequest {
                method: method.clone().unwrap_or_else(|| "GET".to_owned()),
                path: path.clone(),
                headers: (header.iter())
                    .map(|(name, value)| HttpHeader {
                        name: name.clone(),
                        value: value.clone(),
                    })
                    .collect(),
                http2: *http2,
            });
            let asked = request.is_some();
            let mut response = client
                .explain(ExplainRequest {
                    source: from.clone(),
                    destination: to.clone(),
                    port: u32::from(*port),
                    opaque_ports: opaque_ports.iter().map(|&p| p.into()).collect(),
                    request,
                })
                .await?
                .into_inner();
            let proto = response.explanation.take().unwrap_or_default();
            let explanation = Explanation::from_proto(&proto).map_err(|e| {
                CtlError::Usage(super::escape_controls(&format!(
                    "the control plane sent an unreadable answer: {e}"
                )))
            })?;
            if asked && explanation.request.is_none() {
                // A control plane older than --path answers the connection
                // alone: saying nothing of the request would read as if
                // the connection's verdict were the request's.
                return Err(CtlError::Usage(format!(
                    "the control plane does not decide HTTP requests (it predates {}): \
                     upgrade it, or explain the connection alone",
                    names.name("path")
                )));
            }
            let mut printed = explained(&explanation, &response, *output, *http2);
            if let Some(warning) = trellis_core::policy::sidecar_port_warning(*port) {
                printed
                    .stderr
                    .push_str(&format!("warning: --port {warning}\n"));
            }
            Ok(printed)
        }
    }
}

/// `policy explain --path`: a request target
/// ([`http_target`](crate::api::policy::http_target)), or `@FILE` for the
/// one FILE holds (`@-`: standard input), without one line end after it.
/// Why not, naming the file (the target is quoted cut short: it may be
/// long).
fn explained_target(text: &str) -> Result<String, String> {
    let Some(file) = text.strip_prefix('@') else {
        return crate::api::policy::http_target(text);
    };
    let (name, read) = match file {
        "-" => ("standard input".to_owned(), {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut bytes).map(|_| bytes)
        }),
        _ => (super::escape_controls(file), std::fs::read(file)),
    };
    let bytes = read.map_err(|e| {
        format!(
            "{name}: cannot read: {}",
            trellis_core::io_error::IoWords(&e)
        )
    })?;
    let text = String::from_utf8(bytes).map_err(|_| format!("{name}: not UTF-8 text"))?;
    let target = (text.strip_suffix('\n'))
        .map(|t| t.strip_suffix('\r').unwrap_or(t))
        .unwrap_or(&text);
    crate::api::policy::http_target(target).map_err(|e| format!("{name}: {e}"))
}

/// A policy's `NAMESPACE/NAME`, each set (as the control plane requires).
fn split_name(text: &str) -> Result<(String, String), String> {
    match text.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_owned(), name.to_owned()))
        }
        _ => Err(format!(
            "{text:?} is not NAMESPACE/NAME, e.g. default/web-to-api"
        )),
    }
}

async fn apply(
    client: &mut AdminClient<Channel>,
    td: &TrustDomain,
    input: &PolicyInput,
    dry_run: bool,
    output: Output,
) -> Result<(Printed, Written), CtlError> {
    // Which namespace may select which workloads is the control plane's
    // to say (its --root-namespace): it checks that, and refuses with the
    // file and line all the same.
    let context = ValidationContext {
        scope: SelectorScope::Unchecked,
        ..ValidationContext::default()
    };
    let loaded = input.load(td, &context);
    let mut report = listing(&loaded);
    if loaded.has_errors() {
        return Err(CtlError::Reported(format!(
            "{report}nothing applied: fix the errors above\n"
        )));
    }
    if files_with_documents(&loaded).is_empty() {
        return Err(no_documents(&input.names()));
    }
    let files = input.texts_with_documents(&loaded)?;
    let (document, starts) = join_files(&files);
    let response = match client
        .apply_policy(ApplyPolicyRequest { document, dry_run })
        .await
    {
        Ok(response) => response.into_inner(),
        Err(status) => match policy_errors_of(&status) {
            Some(errors) => {
                for e in errors.errors {
                    let v = e.violation.unwrap_or_default();
                    if e.line == 0 {
                        // Not a place: how many errors the refusal left out.
                        report.push_str(&super::escape_controls(&v.message));
                        report.push('\n');
                        continue;
                    }
                    let place = place(&files, &starts, e.line as usize, e.column);
                    let path = if v.path.is_empty() {
                        String::new()
                    } else {
                        format!("{}: ", v.path)
                    };
                    let warning = if v.warning { "warning: " } else { "" };
                    let line = format!("{place}: {warning}{path}{}", v.message);
                    report.push_str(&super::escape_controls(&line));
                    report.push('\n');
                }
                return Err(CtlError::Reported(format!(
                    "{report}nothing applied: the control plane refused the policies\n"
                )));
            }
            None => return Err(status.into()),
        },
    };
    let printed = Printed {
        stdout: match output {
            Output::Table => apply_text(&response),
            Output::Json => apply_json(&response),
        },
        stderr: report,
        failed: false,
    };
    let written = Written {
        version: response.snapshot_version,
        epoch: response.snapshot_version_epoch,
        position: response.position,
    };
    Ok((printed, written))
}

/// The files (or `<stdin>`) that hold valid documents of either kind, by
/// name.
fn files_with_documents(loaded: &Loaded) -> Vec<String> {
    let policies = loaded.policies.iter().map(|p| p.file.clone());
    let limits = loaded.rate_limits.iter().map(|r| r.file.clone());
    let mut files: Vec<String> = policies.chain(limits).collect();
    files.sort();
    files.dedup();
    files
}

/// A file's name, as diagnostics give it, with its text.
fn read_file(file: &Path) -> Result<(String, String), CtlError> {
    let name = file.display().to_string();
    std::fs::read_to_string(file)
        .map(|text| (name.clone(), text))
        .map_err(|e| {
            CtlError::Usage(format!(
                "{}: cannot read: {}",
                super::escape_controls(&name),
                trellis_core::io_error::IoWords(&e)
            ))
        })
}

/// The files as one YAML stream, each as it was written but for a leading
/// byte order mark, and the line each starts on: a position the control
/// plane reports in the stream maps back to `file:line:column` ([`place`]).
/// (The control plane validates every document again.)
///
/// Each file but the last ends with a document end marker (`...`), after
/// which a new document may begin with directives (`%YAML 1.2`) as at the
/// top of a file; a `---` would leave that directive inside a document.
/// A byte order mark may only start the stream, so none is kept.
fn join_files(files: &[(String, String)]) -> (String, Vec<usize>) {
    let mut text = String::new();
    let mut lines = 0;
    let mut starts = Vec::with_capacity(files.len());
    for (_, contents) in files {
        if !text.is_empty() {
            text.push_str("...\n");
            lines += 1;
        }
        starts.push(lines + 1);
        let contents = contents.strip_prefix('\u{feff}').unwrap_or(contents);
        text.push_str(contents);
        lines += yaml_lines(contents);
        if !text.ends_with('\n') {
            text.push('\n');
        }
    }
    (text, starts)
}

/// How many lines YAML reads in `text`: its line breaks are LF, CRLF and a
/// CR alone (a file saved with old Mac line ends), and a last line without
/// one counts too. `str::lines` would miss the lone CRs, and every position
/// in the files after such a file would be said lines too early.
fn yaml_lines(text: &str) -> usize {
    let bytes = text.as_bytes();
    let breaks = bytes
        .iter()
        .enumerate()
        .filter(|&(i, &b)| b == b'\n' || (b == b'\r' && bytes.get(i + 1) != Some(&b'\n')))
        .count();
    let unended = !matches!(bytes.last(), None | Some(b'\n' | b'\r'));
    breaks + usize::from(unended)
}

/// `file:line:column` of a position in the stream [`join_files`] made.
fn place(files: &[(String, String)], starts: &[usize], line: usize, column: u32) -> String {
    match starts.iter().rposition(|&s| s <= line) {
        Some(i) => format!("{}:{}:{column}", files[i].0, line - starts[i] + 1),
        None => format!("document:{line}:{column}"),
    }
}

fn outcome_word(outcome: i32, dry_run: bool) -> &'static str {
    match (PolicyOutcome::try_from(outcome), dry_run) {
        (Ok(PolicyOutcome::Created), false) => "created",
        (Ok(PolicyOutcome::Created), true) => "would be created",
        (Ok(PolicyOutcome::Updated), false) => "updated",
        (Ok(PolicyOutcome::Updated), true) => "would be updated",
        (Ok(PolicyOutcome::Unchanged), _) => "unchanged",
        _ => "unknown",
    }
}

fn apply_text(response: &ApplyPolicyResponse) -> String {
    let mut out = String::new();
    for r in &response.results {
        let key = format!("{} {}", r.kind, policy_key(&r.namespace, &r.name));
        let word = outcome_word(r.outcome, response.dry_run);
        let selects = if r.selected_workloads.is_empty() {
            "selects no known workload".to_owned()
        } else {
            format!("selects {}", r.selected_workloads.join(", "))
        };
        // The names, the workloads selected and the warnings are the
        // control plane's text: escaped.
        let line = format!("{key}: {word} (revision {}); {selects}", r.revision);
        out.push_str(&super::escape_controls(&line));
        out.push('\n');
        for w in &r.warnings {
            out.push_str("  warning: ");
            out.push_str(&super::escape_controls(&path_message(w)));
            out.push('\n');
        }
    }
    if response.dry_run {
        out.push_str("dry run: nothing was stored\n");
    } else {
        out.push_str(&format!(
            "policy generation {}, snapshot version {}\n",
            response.generation,
            super::version_shown(response.snapshot_version, response.snapshot_version_epoch)
        ));
    }
    out
}

/// `path: message`, or the message alone when it names no field (how many
/// more warnings there were).
fn path_message(v: &trellis_proto::policy::v1::Violation) -> String {
    if v.path.is_empty() {
        v.message.clone()
    } else {
        format!("{}: {}", v.path, v.message)
    }
}

fn apply_json(response: &ApplyPolicyResponse) -> String {
    let results: Vec<serde_json::Value> = response
        .results
        .iter()
        .map(|r| {
            serde_json::json!({
                "kind": r.kind,
                "policy": policy_key(&r.namespace, &r.name),
                "revision": r.revision,
                "outcome": outcome_word(r.outcome, false),
                "selected_workloads": r.selected_workloads,
                "warnings": r.warnings.iter().map(path_message).collect::<Vec<_>>(),
            })
        })
        .collect();
    pretty(&serde_json::json!({
        "results": results,
        "dry_run": response.dry_run,
        "generation": response.generation,
        "snapshot_version": response.snapshot_version,
        "snapshot_version_epoch": super::epoch_hex(response.snapshot_version_epoch),
    }))
}

fn action_name(action: i32) -> &'static str {
    match Action::try_from(action) {
        Ok(Action::Allow) => "ALLOW",
        Ok(Action::Deny) => "DENY",
        Ok(Action::Audit) => "AUDIT",
        _ => "?",
    }
}

/// Both kinds in one table: a rate limit's ACTION is its limit, its RULES
/// the number of `match` entries.
fn policies_table(policies: &[Policy], rate_limits: &[RateLimitRecord]) -> String {
    let mut rows = vec![
        ["KIND", "POLICY", "ACTION", "REVISION", "RULES", "SELECTOR"]
            .map(String::from)
            .to_vec(),
    ];
    for p in policies {
        rows.push(vec![
            AuthorizationPolicy::KIND.to_owned(),
            policy_key(&p.namespace, &p.name),
            action_name(p.action).to_owned(),
            p.revision.to_string(),
            p.rules.len().to_string(),
            p.selector
                .as_ref()
                .map(|s| s.spiffe_ids.join(","))
                .unwrap_or_default(),
        ]);
    }
    for r in rate_limits {
        let l = r.rate_limit.clone().unwrap_or_default();
        rows.push(vec![
            RateLimitPolicy::KIND.to_owned(),
            policy_key(&l.namespace, &l.name),
            format!("{}/s burst {} by {}", l.requests_per_second, l.burst, l.key),
            r.revision.to_string(),
            l.matches.len().to_string(),
            l.selector
                .as_ref()
                .map(|s| s.spiffe_ids.join(","))
                .unwrap_or_default(),
        ]);
    }
    super::table(rows)
}

fn policies_json(policies: &[Policy], rate_limits: &[RateLimitRecord], generation: u64) -> String {
    let items: Vec<serde_json::Value> = policies
        .iter()
        .map(|p| {
            let document = document_from_proto(p)
                .map(|d| Document::AuthorizationPolicy(d).to_value())
                .unwrap_or_default();
            serde_json::json!({
                "policy": policy_key(&p.namespace, &p.name),
                "revision": p.revision,
                "document": document,
            })
        })
        .collect();
    let limits: Vec<serde_json::Value> = rate_limits
        .iter()
        .map(|r| {
            let l = r.rate_limit.clone().unwrap_or_default();
            let document = RateLimitPolicy::from_proto(&l)
                .map(|d| Document::RateLimitPolicy(d).to_value())
                .unwrap_or_default();
            serde_json::json!({
                "policy": policy_key(&l.namespace, &l.name),
                "revision": r.revision,
                "document": document,
            })
        })
        .collect();
    pretty(&serde_json::json!({
        "generation": generation,
        "policies": items,
        "rate_limits": limits,
    }))
}

/// Who a revocation of `explain` covers, as its lines say.
fn revoked_role(e: &Explanation, id: &str) -> &'static str {
    match (e.source.as_str() == id, e.destination.as_str() == id) {
        (true, true) => "source and destination",
        (true, false) => "source",
        _ => "destination",
    }
}

/// What `policy explain` prints of `response` (`explanation` read from
/// it) in `output`; `http2`: whether the request named was asked about in
/// HTTP/2, which stderr warns of when the answer does not confirm it was
/// evaluated so (a control plane that predates it sizes it as HTTP/1.1).
fn explained(
    explanation: &Explanation,
    response: &ExplainResponse,
    output: Output,
    http2: bool,
) -> Printed {
    let stdout = match output {
        Output::Table => format!(
            "{}{}",
            super::escape_lines(&explanation_table(explanation, response)),
            super::silent_replicas(&response.unanswered_replicas, super::SILENT_OPAQUE_PORTS)
        ),
        Output::Json => explanation_json(explanation, response),
    };
    let stderr = match http2 && !response.http2_evaluated {
        true => format!("{HTTP2_UNCONFIRMED}\n"),
        false => String::new(),
    };
    Printed {
        stdout,
        stderr,
        failed: false,
    }
}

/// What `policy explain --http2` warns when the control plane does not
/// confirm it evaluated the request as HTTP/2.
const HTTP2_UNCONFIRMED: &str = "warning: the control plane did not evaluate the request as HTTP/2 \
     (it predates --http2): its head was sized as HTTP/1.1, and the rate limits counting it may \
     not be marked; upgrade the control plane";

/// The trace of `policy explain`: first the revocations that refuse the
/// connection whatever the policies say (and so the connection's verdict),
/// then the policies' account, then the rate limits on the destination.
fn explanation_table(e: &Explanation, response: &ExplainResponse) -> String {
    let mut out = String::new();
    for r in &response.revocations {
        out.push_str(&format!(
            "{} {} is revoked since {}: every sidecar refuses it (its certificates issued at \
             or before then), whatever the policies say\n",
            revoked_role(e, &r.spiffe_id),
            r.spiffe_id,
            super::rfc3339(r.revoked_at_unix)
        ));
    }
    if !response.revocations.is_empty() {
        out.push_str("decision: refused (revoked); the policies alone would decide:\n");
    }
    out.push_str(&e.to_string());
    let unchecked: Vec<String> = (not_evaluated(e).iter()).map(ToString::to_string).collect();
    if !unchecked.is_empty() {
        out.push_str(&format!(
            "not evaluated: the HTTP conditions (methods, paths, headers, gRPC calls) of {}, \
             which the sidecar checks on each request\n",
            unchecked.join(", ")
        ));
    }
    let limits = &response.rate_limits;
    match (limits.is_empty(), e.opaque) {
        (true, _) => out.push_str("rate limits: none selects the destination\n"),
        (false, Some(_)) => out.push_str(&format!(
            "rate limits selecting the destination (none applies on port {}: it is opaque, \
             it carries no HTTP requests):\n",
            e.port
        )),
        (false, None) => out.push_str(&format!(
            "rate limits on the HTTP requests of port {}:\n",
            e.port
        )),
    }
    for (i, l) in limits.iter().enumerate() {
        let paths = rate_limit_paths(l);
        let on = match paths.is_empty() {
            true => "every request".to_owned(),
            false => format!("paths {}", paths.join(", ")),
        };
        let counting = match (&e.request, counts_request(response, i)) {
            (Some(r), Some(true)) => format!(": counts request {} {}", r.method, r.path),
            (Some(r), Some(false)) if r.reaches_rate_limits() => format!(
                ": does not count request {} {} (no path of it matches)",
                r.method, r.path
            ),
            (Some(r), Some(false)) => format!(
                ": does not count request {} {} (it does not get to the rate limits)",
                r.method, r.path
            ),
            _ => String::new(),
        };
        out.push_str(&format!(
            "  {}: {}/s burst {} per {}, on {on}{counting}\n",
            policy_key(&l.namespace, &l.name),
            l.requests_per_second,
            l.burst,
            rate_limit_key(l)
        ));
    }
    out
}

/// Whether the `i`th rate limit of `response` counts the request explained;
/// `None` when no request was named (or the control plane predates the
/// answer).
fn counts_request(response: &ExplainResponse, i: usize) -> Option<bool> {
    let counting = &response.rate_limits_counting;
    (counting.len() == response.rate_limits.len())
        .then(|| counting.get(i).copied())
        .flatten()
}

/// The rules whose source and port match and whose HTTP conditions decide
/// each request, when the explanation evaluated no request against them
/// (none was named, or the one named was refused before any rule).
fn not_evaluated(e: &Explanation) -> Vec<RuleRef> {
    if matches!(&e.request, Some(r) if matches!(r.outcome, RequestOutcome::Decided(_))) {
        return Vec::new();
    }
    (e.policies.iter())
        .flat_map(|p| {
            (p.rules.iter()).filter(|r| r.per_request).map(|r| RuleRef {
                policy: p.policy.clone(),
                rule: r.index,
            })
        })
        .collect()
}

/// The paths a rate limit counts requests on (any of them); none: every
/// request.
fn rate_limit_paths(l: &RateLimit) -> Vec<&str> {
    (l.matches.iter().flat_map(|m| &m.paths))
        .map(String::as_str)
        .collect()
}

/// What a rate limit keeps a bucket per (`source` when unset).
fn rate_limit_key(l: &RateLimit) -> &str {
    match l.key.as_str() {
        "" => "source",
        key => key,
    }
}

/// `response`: the explanation's answer, with the peer replicas that did
/// not answer (whose sidecars' opaque ports are not known), the
/// revocations and the rate limits.
fn explanation_json(e: &Explanation, response: &ExplainResponse) -> String {
    let unanswered = &response.unanswered_replicas;
    let mut out = serde_json::json!({
        "source": e.source.as_str(),
        "destination": e.destination.as_str(),
        "port": e.port,
        // Where the port being opaque comes from; null when it is not.
        "opaque": e.opaque.map(|o| serde_json::json!({
            "mesh": o.mesh,
            "declaring_sidecars": o.declaring_sidecars,
            "connected_sidecars": o.connected_sidecars,
            "requested": o.requested,
        })),
        // The L7 rules deciding HTTP requests one by one when the verdict
        // is not the whole story for them, and the verdict on a connection
        // that is not HTTP then; null when each request gets the verdict.
        "per_request": e.per_request.as_ref().map(|p| serde_json::json!({
            "allowed_by": p.allowed_by.as_ref().map(rule_json),
            "denied_by": p.denied_by().map(rule_json),
            "audited_by": p.audited_by.iter().map(rule_json).collect::<Vec<_>>(),
            "not_http": e.not_http()
            .map(|d| serde_json::Value::Object(decision_json(&d, "connection"))),
        })),
        // The replicas whose sidecars' opaque ports are not known.
        "unanswered_replicas": unanswered.iter().map(|r| serde_json::json!({
            "name": r.name,
            "address": r.address,
            "error": r.error,
            "not_listening": r.not_listening,
        })).collect::<Vec<_>>(),
        "trace": e.to_string(),
        // The revocations of the source and the destination: any refuses
        // the connection, whatever `verdict` says.
        "revocations": response.revocations.iter().map(|r| serde_json::json!({
            "spiffe_id": r.spiffe_id,
            "role": revoked_role(e, &r.spiffe_id),
            "revoked_at": super::rfc3339(r.revoked_at_unix),
            "revoked_at_unix": r.revoked_at_unix,
        })).collect::<Vec<_>>(),
        // What the sidecars do: "refused" when a revocation covers either
        // end, else `verdict`.
        "outcome": match response.revocations.is_empty() {
            true => e.decision.verdict.as_str(),
            false => "refused",
        },
        // The rules whose HTTP conditions decide each request, which no
        // request was evaluated against.
        "not_evaluated": not_evaluated(e).iter().map(rule_json).collect::<Vec<_>>(),
        // What the destination's sidecar does with the request named
        // (--path); null when none was.
        "request": e.request.as_ref().map(request_json),
        // The rate limits selecting the destination; none applies on an
        // opaque port.
        // `counts_request`: whether it counts the request named (--path);
        // null when none was.
        "rate_limits": response.rate_limits.iter().enumerate().map(|(i, l)| serde_json::json!({
            "policy": policy_key(&l.namespace, &l.name),
            "requests_per_second": l.requests_per_second,
            "burst": l.burst,
            "key": rate_limit_key(l),
            "paths": rate_limit_paths(l),
            "counts_request": counts_request(response, i),
        })).collect::<Vec<_>>(),
    });
    if let Some(fields) = out.as_object_mut() {
        fields.extend(decision_json(&e.decision, "connection"));
    }
    pretty(&out)
}

/// The fields saying one decision, in an explanation and in its verdict on
/// a connection that is not HTTP alike: the verdict, the policy that
/// decided (or the default), the rule (null for a default), the audits,
/// and for a denial by the mesh default why, in the words the sidecar's
/// answer has, of a `what` (`request`, `connection`; null otherwise).
fn decision_json(d: &Decision, what: &str) -> serde_json::Map<String, serde_json::Value> {
    let rule = match &d.reason {
        Reason::Rule(r) => Some(rule_json(r)),
        Reason::Default(_) | Reason::NoSnapshot => None,
    };
    let audits: Vec<String> = d.audits.iter().map(ToString::to_string).collect();
    serde_json::Map::from_iter([
        ("verdict".to_owned(), d.verdict.as_str().into()),
        ("decided_by".to_owned(), d.policy_label().into()),
        ("deciding_rule".to_owned(), rule.into()),
        ("audits".to_owned(), audits.into()),
        ("denied_because".to_owned(), d.denied_because(what).into()),
    ])
}

/// A request's outcome ("allow", "deny", "refused" or "opaque"), the status
/// the sidecar answers with (null when the app answers, or nothing does),
/// and why: the deciding rule and audits of a decision, the words of a
/// refusal.
fn request_json(r: &RequestAnswer) -> serde_json::Value {
    let mut out = serde_json::json!({
        "method": r.method,
        "path": r.path,
        "answer": r.to_string(),
    });
    let fields = match &r.outcome {
        RequestOutcome::Decided(d) => {
            let mut fields = decision_json(d, "request");
            let status = (!d.is_allowed()).then_some(403);
            fields.insert("outcome".to_owned(), d.verdict.as_str().into());
            fields.insert("status".to_owned(), status.into());
            fields
        }
        RequestOutcome::Refused { status, why } => serde_json::Map::from_iter([
            ("outcome".to_owned(), "refused".into()),
            (
                "status".to_owned(),
                (*status != 0).then_some(*status).into(),
            ),
            ("refusal".to_owned(), why.as_str().into()),
        ]),
        RequestOutcome::Opaque => serde_json::Map::from_iter([
            ("outcome".to_owned(), "opaque".into()),
            ("status".to_owned(), serde_json::Value::Null),
        ]),
    };
    if let Some(out) = out.as_object_mut() {
        out.extend(fields);
    }
    out
}

fn rule_json(r: &RuleRef) -> serde_json::Value {
    serde_json::json!({"policy": &*r.policy, "rule": r.rule})
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_core::policy::{MAX_DIAGNOSTICS, load_source};

    /// An answer to `--http2` that does not confirm the request was
    /// evaluated as HTTP/2 (from a control plane that predates it) is
    /// warned of on stderr, the explanation printed all the same; one that
    /// confirms it, or a request in HTTP/1.1, is not.
    #[test]
    fn an_answer_not_confirming_http2_is_warned_of() {
        let web = trellis_core::SpiffeId::parse("spiffe://td/ns/a/sa/web").unwrap();
        let api = trellis_core::SpiffeId::parse("spiffe://td/ns/b/sa/api").unwrap();
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::HOST, http::HeaderValue::from_static("api"));
        let http = trellis_core::policy::ExplainedHttp {
            request: trellis_core::policy::HttpRequest {
                method: "GET",
                path: "/x",
                headers: &headers,
            },
            query: "",
            absolute: "",
            limits_read_paths: false,
            http2: false,
        };
        let explanation = trellis_core::policy::explain_http(
            &web,
            &api,
            8080,
            &[],
            trellis_core::policy::DefaultPolicy::AllowMesh,
            &trellis_core::policy::OpaquePorts::default(),
            &http,
        )
        .unwrap();
        let older = ExplainResponse::default();
        for output in [Output::Table, Output::Json] {
            let printed = explained(&explanation, &older, output, true);
            assert_eq!(
                printed.stderr,
                "warning: the control plane did not evaluate the request as HTTP/2 (it \
                 predates --http2): its head was sized as HTTP/1.1, and the rate limits \
                 counting it may not be marked; upgrade the control plane\n"
            );
            assert!(!printed.failed);
            assert!(
                printed.stdout.contains("request GET /x: allow"),
                "{}",
                printed.stdout
            );
            assert_eq!(explained(&explanation, &older, output, false).stderr, "");
        }
        let confirmed = ExplainResponse {
            http2_evaluated: true,
            ..ExplainResponse::default()
        };
        assert_eq!(
            explained(&explanation, &confirmed, Output::Table, true).stderr,
            ""
        );
    }

    #[test]
    fn joined_files_map_positions_back_to_each_file() {
        let td = TrustDomain::new("cluster.local").unwrap();
        let one = "apiVersion: trellis.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: a, namespace: default}
spec:
  selector: {spiffeIds: [\"spiffe://cluster.local/ns/default/sa/api\"]}
  action: DENY
  rules: [{}]
";
        let limit = "# rate limits\napiVersion: trellis.io/v1alpha1
kind: RateLimitPolicy
metadata: {name: a, namespace: default}
spec:
  selector: {spiffeIds: [\"spiffe://cluster.local/ns/default/sa/api\"]}
  limit: {requestsPerSecond: 5, burst: 10}";
        let first = format!("{one}---\n{}", one.replace("name: a", "name: b"));
        let files = [
            ("a.yaml".to_owned(), first),
            ("b.yaml".to_owned(), limit.to_owned()),
        ];
        let (joined, starts) = join_files(&files);
        assert_eq!(starts, [1, 17]);
        let again = load_source("document", &joined, &td);
        assert_eq!(again.diagnostics, []);
        assert_eq!(again.policies.len(), 2);
        // The rate limit's document starts on line 2 of b.yaml.
        let line = again.rate_limits[0].line;
        assert_eq!(line - starts[1] + 1, 2);
        let mut loaded = load_source("b.yaml", limit, &td);
        loaded.policies = load_source("a.yaml", &files[0].1, &td).policies;
        assert_eq!(files_with_documents(&loaded), ["a.yaml", "b.yaml"]);
    }

    #[test]
    fn joined_files_may_start_with_a_byte_order_mark_or_a_directive() {
        let td = TrustDomain::new("cluster.local").unwrap();
        let policy = |name: &str, port: u32| {
            format!(
                "apiVersion: trellis.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: default}}
spec:
  selector: {{spiffeIds: [\"spiffe://cluster.local/ns/default/sa/api\"]}}
  action: ALLOW
  rules: [{{to: [{{ports: [{port}]}}]}}]
"
            )
        };
        let files = |third: String| {
            vec![
                ("a.yaml".to_owned(), policy("a", 80)),
                ("b.yaml".to_owned(), format!("\u{feff}{}", policy("b", 80))),
                ("c.yaml".to_owned(), format!("%YAML 1.2\n---\n{third}")),
            ]
        };
        let valid = files(policy("c", 80));
        for (name, text) in &valid {
            assert_eq!(load_source(name, text, &td).diagnostics, [], "{name}");
        }
        let (joined, starts) = join_files(&valid);
        assert_eq!(starts, [1, 9, 17]);
        let loaded = load_source("document", &joined, &td);
        assert_eq!(loaded.diagnostics, []);
        let names: Vec<_> = loaded.policies.iter().map(|p| p.policy.key()).collect();
        assert_eq!(names, ["default/a", "default/b", "default/c"]);

        // Port 70000 is on line 9, column 26 of c.yaml.
        let invalid = files(policy("c", 70000));
        let alone = load_source("c.yaml", &invalid[2].1, &td).diagnostics;
        assert_eq!((alone[0].line, alone[0].column), (9, 26));
        let (joined, starts) = join_files(&invalid);
        let again = load_source("document", &joined, &td).diagnostics;
        assert_eq!(again.len(), 1, "{again:?}");
        let at = place(&invalid, &starts, again[0].line, again[0].column as u32);
        assert_eq!(at, "c.yaml:9:26");
    }

    /// A file of one mistake repeated lists the first thousand and counts
    /// the rest; the summary counts them all.
    #[test]
    fn lint_lists_a_thousand_diagnostics_and_counts_the_rest() {
        let dir = std::env::temp_dir().join(format!("trellis-lint-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("many.yaml");
        std::fs::write(&file, "---\nx: 1\n".repeat(MAX_DIAGNOSTICS + 3)).unwrap();
        let printed = lint(
            std::slice::from_ref(&file),
            &Recursive { recursive: false },
            "cluster.local",
            "trellis-system",
            &trellis_core::flags::AsTyped,
        )
        .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(printed.failed);
        let lines: Vec<&str> = printed.stdout.lines().collect();
        assert_eq!(lines.len(), MAX_DIAGNOSTICS + 1);
        let name = file.display().to_string();
        assert_eq!(lines[0], format!("{name}:2:1: missing field `apiVersion`"));
        assert_eq!(
            lines[MAX_DIAGNOSTICS - 1],
            format!("{name}:2000:1: missing field `apiVersion`")
        );
        assert_eq!(
            lines[MAX_DIAGNOSTICS],
            "and 3 more diagnostics (3 errors, 0 warnings)"
        );
        assert_eq!(printed.stderr, "1003 errors, 0 warnings\n");
    }
}
