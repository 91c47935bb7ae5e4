//! `trellis-proxy init`: programs iptables in the pod's network namespace so that every
//! TCP connection in and out of the pod passes through the sidecar.
//!
//! It owns four chains in the nat table, for IPv4 and IPv6 alike, and one jump rule into
//! them from `PREROUTING` and one from `OUTPUT`; it never changes any other rule:
//!
//! ```text
//! PREROUTING -p tcp -> TRELLIS_INBOUND:  excluded ports (--exclude-ports) RETURN,
//!                                        else -> TRELLIS_IN_REDIRECT: REDIRECT to --inbound-port
//! OUTPUT -p tcp     -> TRELLIS_OUTPUT:   the proxy's UID (and GID) RETURN, out via lo RETURN,
//!                                        to loopback RETURN, port 53 to a nameserver RETURN
//!                                        (--exclude-outbound-dns), excluded ports and CIDRs
//!                                        RETURN,
//!                                        else -> TRELLIS_OUT_REDIRECT: REDIRECT to --outbound-port
//! ```
//!
//! Under `--outbound-policy deny` it also owns one chain in the filter table, with one jump
//! from its `OUTPUT`:
//!
//! ```text
//! OUTPUT -p udp     -> TRELLIS_OUT_UDP:  the proxy's UID (and GID) RETURN, out via lo RETURN,
//!                                        to loopback RETURN, port 53 to a nameserver RETURN,
//!                                        excluded ports and CIDRs RETURN, else DROP
//! ```
//!
//! Decisions:
//! - `--exclude-ports` defaults to `15020`, the sidecar's admin port, so kubelet probes reach
//!   `/live` and `/ready` without a client certificate. Giving the flag replaces the
//!   default: list 15020 again to keep it excluded, or pass an empty list to redirect
//!   every port.
//! - Everything that leaves through `lo` is left alone. That includes the app calling its
//!   own pod address (the kernel routes it via lo): the connection never leaves the pod,
//!   there is no peer to authenticate and no pod boundary to protect, and redirecting it
//!   would make the sidecar authorise the pod against itself.
//! - The proxy's own connections (its UID, and its GID if given) are never redirected, so
//!   it cannot loop into itself; that rule comes first.
//! - `--exclude-outbound-dns` lets DNS (port 53) bypass the sidecar only towards the
//!   nameservers of the pod's resolv.conf (`--resolv-conf`), read when init runs: the
//!   cluster's DNS has no sidecar. `--exclude-outbound-ports 53` would let port 53 to any
//!   host bypass it, unauthenticated and unlogged.
//! - Only TCP is redirected. Under `--outbound-policy passthrough` UDP passes as before;
//!   under `deny` UDP leaving the pod is dropped except DNS to the nameservers, loopback,
//!   the proxy's own, and excluded ports and CIDRs: the sidecar cannot check UDP, so it
//!   must not leave the pod unchecked. Anything neither TCP nor UDP passes as before.
//! - With `--ipv6 auto`, when IPv6 rules cannot be written init fails if the pod has an
//!   IPv6 address that is neither loopback nor link-local (its IPv6 traffic would bypass
//!   the sidecar), and only warns when it has none.
//! - `REDIRECT` sends IPv6 connections to `[::1]:<outbound-port>` and
//!   `[pod address]:<inbound-port>`: with IPv6 rules the sidecar must listen on IPv6 too.
//! - `--backend auto` takes iptables-nft where it works and legacy otherwise, but keeps
//!   legacy when our rules already sit in a legacy table, so reruns and `--cleanup` find
//!   them.
//!
//! Each family is changed with one `iptables-restore --noflush` input that declares only
//! our chains. iptables-nft applies it whole or not at all; iptables-legacy commits it
//! table by table, so a failing filter table can leave the nat table changed. When a
//! change fails, what of ours every family held before is put back: the failing family's
//! tables that did change, and IPv4 when IPv6 fails after it. Our chains get their rules
//! back and each jump goes back to its number in its chain, so the pod's own rules after
//! it stay after it. The error names the table and line that failed; when a family cannot
//! be put back the others still are, and the error names which were and which were not
//! and says to delete the pod (its rules may be half changed). Running twice gives the
//! same rules; `--cleanup` removes exactly our chains and jumps and does nothing when
//! there are none.
//!
//! Exit codes: 0 done, 64 invalid flags, 69 an iptables program is missing, 77 not
//! allowed (not root / no NET_ADMIN), 1 anything else.
//!
//! It speaks on stderr as the sidecar does: a failure is one line, `error: ...`, the last;
//! what needs a look but does not stop it is `warning: ...`; what it did is said plainly
//! (`IPv4 rules installed (iptables-nft)`), with no prefix naming the program: the init
//! container's log holds only its own lines.

mod cidr;
mod iptables;
mod rules;

use std::io::Write;
use std::net::{IpAddr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use trellis_core::escape::shown;
use trellis_core::io_error::{EXIT_STDOUT_CLOSED, IoWords, stdout_closed};

use crate::config::{FlagNames, Given};

pub use cidr::{Cidr, CidrError, Family};
pub use iptables::{Backend, IptablesError, Tables};
pub use rules::{CHAINS, FILTER_CHAINS, Interception, NatTable, Table};

/// Flags of `trellis-proxy init`.
#[derive(Debug, Clone, clap::Args)]
pub struct InitArgs {
    /// UID the sidecar runs as; its connections are never redirected.
    #[arg(long, env = "TRELLIS_PROXY_UID", default_value_t = 1337)]
    pub proxy_uid: u32,

    /// GID the sidecar runs as; when given, its connections are not redirected either.
    #[arg(long, env = "TRELLIS_PROXY_GID")]
    pub proxy_gid: Option<u32>,

    /// Port of the sidecar's inbound listener; inbound TCP is redirected there.
    #[arg(long, env = "TRELLIS_INBOUND_PORT", default_value_t = 15006,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub inbound_port: u16,

    /// Port of the sidecar's outbound listener; outbound TCP is redirected there.
    #[arg(long, env = "TRELLIS_OUTBOUND_PORT", default_value_t = 15001,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub outbound_port: u16,

    /// Inbound ports that are not redirected (comma list). Replaces the default: keep
    /// 15020 in the list so probes reach the sidecar's admin port.
    #[arg(long, env = "TRELLIS_EXCLUDE_PORTS", default_value = "15020",
          value_parser = parse_ports, value_name = "PORTS")]
    pub exclude_ports: Ports,

    /// Destination ports of outbound connections that are not redirected (comma list).
    #[arg(long, env = "TRELLIS_EXCLUDE_OUTBOUND_PORTS", default_value = "",
          value_parser = parse_ports, value_name = "PORTS")]
    pub exclude_outbound_ports: Ports,

    /// Destination address blocks of outbound connections that are not redirected
    /// (comma list of CIDRs or addresses, IPv4 and IPv6 mixed).
    #[arg(long, env = "TRELLIS_EXCLUDE_OUTBOUND_CIDRS", default_value = "",
          value_parser = parse_cidrs, value_name = "CIDRS")]
    pub exclude_outbound_cidrs: Cidrs,

    /// DNS (port 53, TCP and UDP) to the nameservers of `--resolv-conf` is not redirected
    /// (nor dropped under `--outbound-policy deny`); to any other host it is.
    #[arg(long, env = "TRELLIS_EXCLUDE_OUTBOUND_DNS")]
    pub exclude_outbound_dns: bool,

    /// The pod's resolv.conf, whose `nameserver` lines `--exclude-outbound-dns` reads.
    #[arg(
        long,
        env = "TRELLIS_RESOLV_CONF",
        default_value = "/etc/resolv.conf",
        value_name = "FILE"
    )]
    pub resolv_conf: PathBuf,

    /// The mesh's outbound policy: under `deny` UDP leaving the pod is dropped, except DNS
    /// to the nameservers, loopback and the proxy's own; under `passthrough` UDP passes.
    #[arg(long, env = "TRELLIS_OUTBOUND_POLICY", value_enum,
          default_value_t = OutboundPolicy::Passthrough)]
    pub outbound_policy: OutboundPolicy,

    /// IPv6 rules: `auto` programs them when the namespace has IPv6 and ip6tables works.
    #[arg(long, env = "TRELLIS_IPV6", value_enum, default_value_t = Ipv6::Auto)]
    pub ipv6: Ipv6,

    /// Print the iptables-restore input that would be applied; change nothing.
    #[arg(long, env = "TRELLIS_DRY_RUN")]
    pub dry_run: bool,

    /// Remove our chains and jump rules (and nothing else) instead of installing them.
    #[arg(long, env = "TRELLIS_CLEANUP")]
    pub cleanup: bool,

    /// iptables implementation: `auto` uses iptables-nft where it works, else legacy.
    #[arg(long, env = "TRELLIS_BACKEND", value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,
}

impl Default for InitArgs {
    /// The defaults of the command line.
    fn default() -> InitArgs {
        InitArgs {
            proxy_uid: 1337,
            proxy_gid: None,
            inbound_port: 15006,
            outbound_port: 15001,
            exclude_ports: Ports(vec![15020]),
            exclude_outbound_ports: Ports::default(),
            exclude_outbound_cidrs: Cidrs::default(),
            exclude_outbound_dns: false,
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
            outbound_policy: OutboundPolicy::Passthrough,
            ipv6: Ipv6::Auto,
            dry_run: false,
            cleanup: false,
            backend: BackendChoice::Auto,
        }
    }
}

/// A comma-separated list of ports; empty is allowed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ports(pub Vec<u16>);

/// A comma-separated list of CIDRs; empty is allowed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cidrs(pub Vec<Cidr>);

/// Whether to program IPv6 (`ip6tables`) rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Ipv6 {
    Auto,
    On,
    Off,
}

/// `--outbound-policy`: what the mesh does with destinations outside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutboundPolicy {
    Deny,
    Passthrough,
}

/// `--backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    Auto,
    Nft,
    Legacy,
}

fn parse_ports(s: &str) -> Result<Ports, String> {
    let mut ports = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        match item.parse::<u16>() {
            Ok(port) if port != 0 => {
                if !ports.contains(&port) {
                    ports.push(port);
                }
            }
            _ => return Err(format!("{item:?} is not a port (1-65535)")),
        }
    }
    Ok(Ports(ports))
}

fn parse_cidrs(s: &str) -> Result<Cidrs, String> {
    let mut cidrs = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let cidr: Cidr = item.parse().map_err(|e: CidrError| e.to_string())?;
        if !cidrs.contains(&cidr) {
            cidrs.push(cidr);
        }
    }
    Ok(Cidrs(cidrs))
}

/// Why `trellis-proxy init` failed.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// Both given the one port: no connection could tell which way it goes.
    #[error("invalid flags: --inbound-port and --outbound-port are both {0}")]
    SamePorts(u16),
    #[error(transparent)]
    Iptables(#[from] IptablesError),
    #[error("IPv6 was asked for (--ipv6 on) but is not usable here: {0}")]
    Ipv6Unavailable(IptablesError),
    #[error(
        "the pod has the IPv6 address {address} but IPv6 rules could not be written \
         ({failed}): its IPv6 traffic would bypass the sidecar; make ip6tables work in the \
         pod's network namespace (the node's kernel needs IPv6 netfilter: ip6table_nat and \
         ip6table_filter, or nf_tables) or give the pod no IPv6 address"
    )]
    Ipv6Bypass {
        address: Ipv6Addr,
        failed: IptablesError,
    },
    /// The resolv.conf `--exclude-outbound-dns` reads, named as the sidecar's own files are
    /// (`invalid --token-file: PATH: ...`).
    #[error("invalid --resolv-conf: {0}")]
    ResolvConf(String),
    /// The resolv.conf `--exclude-outbound-dns` reads names no nameserver.
    #[error("invalid --resolv-conf: {}", no_nameserver(.0, "--exclude-outbound-dns"))]
    NoNameserver(PathBuf),
    #[error("{failed}; {} reverted, so nothing is left half done", changes(.reverted))]
    Reverted {
        failed: IptablesError,
        reverted: Vec<Family>,
    },
    #[error("{failed}; {}", partly_reverted(.reverted, .unreverted))]
    RevertFailed {
        failed: IptablesError,
        /// The families whose change was put back.
        reverted: Vec<Family>,
        /// The families whose change could not be put back, and why.
        unreverted: Vec<(Family, IptablesError)>,
    },
    #[error("could not write the rules: {0}")]
    Output(#[from] std::io::Error),
}

/// Why the resolv.conf at `path` is refused, `exclude_dns` naming the flag
/// that reads it.
fn no_nameserver(path: &Path, exclude_dns: &str) -> String {
    format!(
        "{} names no nameserver, so {exclude_dns} could not let DNS past the sidecar",
        shown(path)
    )
}

/// `the IPv4 change was`, `the IPv4 and IPv6 changes were`.
fn changes(families: &[Family]) -> String {
    let verb = if families.len() == 1 { "was" } else { "were" };
    format!("{} {verb}", changes_of(families))
}

/// `the IPv4 change`, `the IPv4 and IPv6 changes`.
fn changes_of(families: &[Family]) -> String {
    let names = names(families);
    match families.len() {
        1 => format!("the {names} change"),
        _ => format!("the {names} changes"),
    }
}

/// `IPv4`, `IPv4 and IPv6`.
fn names(families: &[Family]) -> String {
    let names: Vec<String> = families.iter().map(Family::to_string).collect();
    names.join(" and ")
}

/// What was put back and what could not be, and what the operator has to do about it.
fn partly_reverted(reverted: &[Family], unreverted: &[(Family, IptablesError)]) -> String {
    let put_back = if reverted.is_empty() {
        String::new()
    } else {
        format!("{} reverted, but ", changes(reverted))
    };
    let families: Vec<Family> = unreverted.iter().map(|(family, _)| *family).collect();
    let why = match unreverted {
        [(_, error)] => error.to_string(),
        _ => unreverted
            .iter()
            .map(|(family, error)| format!("{family}: {error}"))
            .collect::<Vec<_>>()
            .join("; "),
    };
    format!(
        "{put_back}reverting {} failed too ({why}): the pod's {} rules may be left half \
         changed, so some of its traffic may bypass the sidecar; delete the pod so that it \
         starts again in a new network namespace",
        changes_of(&families),
        names(&families),
    )
}

impl InitError {
    /// The process exit code for this error (sysexits: 64 usage, 69 unavailable, 77 no
    /// permission).
    pub fn exit_code(&self) -> u8 {
        let iptables = match self {
            InitError::SamePorts(_) | InitError::ResolvConf(_) | InitError::NoNameserver(_) => {
                return 64;
            }
            InitError::Iptables(e)
            | InitError::Ipv6Unavailable(e)
            | InitError::Ipv6Bypass { failed: e, .. } => e,
            InitError::Reverted { failed, .. } | InitError::RevertFailed { failed, .. } => failed,
            InitError::Output(_) => return 1,
        };
        match iptables {
            IptablesError::NotFound { .. } => 69,
            IptablesError::Permission { .. } => 77,
            _ => 1,
        }
    }
}

impl InitArgs {
    /// What to intercept, checked; reads `--resolv-conf` when `--exclude-outbound-dns`
    /// (and not `--cleanup`).
    pub fn interception(&self) -> Result<Interception, InitError> {
        if self.inbound_port == self.outbound_port {
            return Err(InitError::SamePorts(self.inbound_port));
        }
        // Removing our rules needs no nameserver.
        let nameservers = if self.exclude_outbound_dns && !self.cleanup {
            read_nameservers(&self.resolv_conf)?
        } else {
            Vec::new()
        };
        Ok(Interception {
            proxy_uid: self.proxy_uid,
            proxy_gid: self.proxy_gid,
            inbound_port: self.inbound_port,
            outbound_port: self.outbound_port,
            exclude_inbound_ports: self.exclude_ports.0.clone(),
            exclude_outbound_ports: self.exclude_outbound_ports.0.clone(),
            exclude_outbound_cidrs: self.exclude_outbound_cidrs.0.clone(),
            nameservers,
            drop_udp: self.outbound_policy == OutboundPolicy::Deny,
        })
    }
}

/// The [`nameservers`] of the resolv.conf at `path`; an error naming it when it cannot be
/// read (missing, not allowed, a directory: in the OS's words) or is not UTF-8 text.
pub fn read_nameservers(path: &Path) -> Result<Vec<IpAddr>, InitError> {
    let bytes = std::fs::read(path)
        .map_err(|e| InitError::ResolvConf(format!("{}: {}", shown(path), IoWords(&e))))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line = 1 + valid.iter().filter(|b| **b == b'\n').count();
        InitError::ResolvConf(format!("{} line {line} is not UTF-8 text", shown(path)))
    })?;
    nameservers(&text, path)
}

/// The addresses of the `nameserver` lines of a resolv.conf (`path` names it in errors).
/// A zone (`fe80::1%eth0`) is dropped: iptables matches the address on any interface.
pub fn nameservers(text: &str, path: &Path) -> Result<Vec<IpAddr>, InitError> {
    let mut found = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.split(['#', ';']).next().unwrap_or_default();
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let value = words.next().unwrap_or_default();
        let address = value.split('%').next().unwrap_or_default();
        let ip: IpAddr = address.parse().map_err(|_| {
            InitError::ResolvConf(format!(
                "{} line {}: nameserver {value:?} is not an IP address",
                shown(path),
                number + 1
            ))
        })?;
        if !found.contains(&ip) {
            found.push(ip);
        }
    }
    if found.is_empty() {
        return Err(InitError::NoNameserver(path.to_path_buf()));
    }
    Ok(found)
}

/// An IPv6 address of the pod that is neither loopback nor link-local, from
/// `/proc/net/if_inet6` (`address ifindex prefix scope flags name`, the address as 32 hex
/// digits): traffic from or to it passes the sidecar by unless IPv6 rules are written.
pub fn routable_ipv6(if_inet6: &str) -> Option<Ipv6Addr> {
    const HOST: u8 = 0x10;
    const LINK: u8 = 0x20;
    if_inet6.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let address = u128::from_str_radix(fields.next()?, 16).ok()?;
        let scope = u8::from_str_radix(fields.nth(2)?, 16).ok()?;
        let address = Ipv6Addr::from(address);
        (scope != HOST && scope != LINK && !address.is_loopback()).then_some(address)
    })
}

/// Under `--ipv6 auto`, what IPv6 rules that could not be written mean: nothing to worry
/// about when the pod has no routable IPv6 address (`if_inet6` lists its addresses), the
/// sidecar bypassed otherwise, which fails init.
fn ipv6_skipped(failed: IptablesError, if_inet6: &str) -> Result<String, InitError> {
    match routable_ipv6(if_inet6) {
        Some(address) => Err(InitError::Ipv6Bypass { address, failed }),
        None => Ok(format!(
            "IPv6 rules skipped: {failed} (the pod has no IPv6 address beyond link-local)"
        )),
    }
}

/// Runs `trellis-proxy init` with parsed flags (`given` says where each came from). A dry
/// run whose reader goes away before all is written (`--dry-run | head -1`) ends quietly
/// with [`EXIT_STDOUT_CLOSED`].
pub fn run(args: InitArgs, given: &Given) -> ExitCode {
    let mut stdout = std::io::stdout().lock();
    let done = execute(&args, &mut stdout).and_then(|()| stdout.flush().map_err(InitError::Output));
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(InitError::Output(e)) if stdout_closed(&e) => ExitCode::from(EXIT_STDOUT_CLOSED),
        Err(error) => {
            eprintln!("error: {}", said(&error, given));
            ExitCode::from(error.exit_code())
        }
    }
}

/// What to say of `error`: a flag whose value it refuses named by the environment variable
/// that value came from, if it did not come from the command line.
fn said(error: &InitError, given: &Given) -> String {
    match error {
        InitError::SamePorts(port) => format!(
            "invalid flags: {} and {} are both {port}",
            given.name("inbound-port"),
            given.name("outbound-port")
        ),
        InitError::ResolvConf(why) => given.refused("resolv-conf", why),
        InitError::NoNameserver(path) => given.refused(
            "resolv-conf",
            no_nameserver(path, &given.name("exclude-outbound-dns")),
        ),
        other => other.to_string(),
    }
}

/// Does what `run` does, writing the `--dry-run` output to `out`.
pub fn execute(args: &InitArgs, out: &mut dyn Write) -> Result<(), InitError> {
    let interception = args.interception()?;
    if args.proxy_uid == 0 {
        eprintln!("warning: --proxy-uid 0 exempts everything running as root from the mesh");
    }

    let (backend, v4_state) = match choose_backend(args.backend) {
        Ok(found) => found,
        // A dry run should still show the rules where the table cannot be read (not root,
        // no iptables): as they would be written into an empty table.
        Err(error) if args.dry_run => {
            writeln!(
                out,
                "# could not read the nat table ({error}); rules for an empty table"
            )?;
            (preferred(args.backend), String::new())
        }
        Err(error) => return Err(error.into()),
    };

    let mut families = vec![(Tables::new(backend, Family::V4), v4_state)];
    match ipv6_state(backend, args.ipv6) {
        Ok(Some(v6_state)) => families.push((Tables::new(backend, Family::V6), v6_state)),
        Ok(None) => {}
        Err(error) if args.dry_run && args.ipv6 != Ipv6::Off => {
            writeln!(
                out,
                "# could not read the IPv6 nat table ({error}); rules for an empty table"
            )?;
            families.push((Tables::new(backend, Family::V6), String::new()));
        }
        Err(error) if args.ipv6 == Ipv6::On => return Err(InitError::Ipv6Unavailable(error)),
        // With a routable IPv6 address the pod's IPv6 connections would pass the sidecar
        // by: that fails; without one there is nothing to intercept.
        // Cleaning up never makes a bypass worse.
        Err(error) if args.cleanup => eprintln!("warning: IPv6 rules skipped: {error}"),
        Err(error) => {
            let if_inet6 = std::fs::read_to_string("/proc/net/if_inet6").unwrap_or_default();
            let warning = ipv6_skipped(error, &if_inet6)?;
            eprintln!("warning: {warning}");
        }
    }
    if !args.cleanup
        && interception.drop_udp
        && interception.nameservers.is_empty()
        && !interception.exclude_outbound_ports.contains(&53)
    {
        eprintln!(
            "warning: --outbound-policy deny drops DNS over UDP: add --exclude-outbound-dns \
             to let DNS reach the pod's nameservers"
        );
    }

    let mut applied: Vec<(Tables, Saved)> = Vec::new();
    for (tables, state) in families {
        let filter_state = match tables.save_filter() {
            Ok(filter) => filter,
            Err(_) if args.dry_run => String::new(),
            Err(error) => return Err(revert(applied, error)),
        };
        let current = Saved::parse(&state, &filter_state);
        let input = if args.cleanup {
            rules::cleanup_all_input(&current.nat, &current.filter)
        } else {
            Some(interception.apply_all_input(tables.family, &current.nat, &current.filter))
        };
        let verb = if args.cleanup { "removed" } else { "installed" };
        let Some(input) = input else {
            if args.dry_run {
                writeln!(out, "# {}: nothing of ours to remove", tables.family)?;
            } else {
                eprintln!("{}: nothing of ours to remove", tables.family);
            }
            continue;
        };
        if args.dry_run {
            writeln!(
                out,
                "# {} ({} --noflush)\n{input}",
                tables.family,
                tables.restore_program()
            )?;
            continue;
        }
        if let Err(failed) = tables.restore(&input) {
            // iptables-legacy-restore commits table by table: when the filter table fails
            // the nat table of this family is already changed. Undo that too.
            applied.push((tables, current));
            return Err(revert(applied, failed));
        }
        eprintln!("{} rules {verb} ({})", tables.family, tables.backend.name());
        applied.push((tables, current));
    }
    Ok(())
}

/// What of ours a family's nat and filter tables held.
#[derive(PartialEq)]
struct Saved {
    nat: NatTable,
    filter: NatTable,
}

impl Saved {
    fn parse(nat: &str, filter: &str) -> Saved {
        Saved {
            nat: NatTable::parse(nat),
            filter: NatTable::parse_table(filter, Table::Filter),
        }
    }
}

/// Puts back what of ours each family held before (`applied`: the families changed, the
/// last one perhaps only in part) after a change failed.
fn revert(applied: Vec<(Tables, Saved)>, failed: IptablesError) -> InitError {
    let mut reverted = Vec::new();
    let mut unreverted = Vec::new();
    // Each family is put back on its own: one that cannot be must not keep the others
    // from being.
    for (tables, previous) in applied {
        let undo = tables
            .save_nat()
            .and_then(|nat| Ok(Saved::parse(&nat, &tables.save_filter()?)))
            .and_then(|now| {
                if now == previous {
                    return Ok(false);
                }
                let input = rules::revert_all_input(
                    (&previous.nat, &previous.filter),
                    (&now.nat, &now.filter),
                );
                tables.restore(&input).map(|()| true)
            });
        match undo {
            Ok(true) => reverted.push(tables.family),
            Ok(false) => {}
            Err(revert) => unreverted.push((tables.family, revert)),
        }
    }
    if !unreverted.is_empty() {
        InitError::RevertFailed {
            failed,
            reverted,
            unreverted,
        }
    } else if reverted.is_empty() {
        InitError::Iptables(failed)
    } else {
        InitError::Reverted { failed, reverted }
    }
}

fn preferred(choice: BackendChoice) -> Backend {
    match choice {
        BackendChoice::Legacy => Backend::Legacy,
        BackendChoice::Auto | BackendChoice::Nft => Backend::Nft,
    }
}

/// Picks the backend and reads its IPv4 nat table. `auto` takes iptables-nft when it
/// works here and legacy otherwise, except that rules of ours already in a legacy table
/// (from a run when nft did not work) keep legacy, so a rerun or `--cleanup` finds them.
/// When nothing works it reports the more telling failure (a refusal says more than a
/// missing legacy binary).
fn choose_backend(choice: BackendChoice) -> Result<(Backend, String), IptablesError> {
    let candidates: &[Backend] = match choice {
        BackendChoice::Auto => &[Backend::Nft, Backend::Legacy],
        BackendChoice::Nft => &[Backend::Nft],
        BackendChoice::Legacy => &[Backend::Legacy],
    };
    let mut errors = Vec::new();
    for &backend in candidates {
        match Tables::new(backend, Family::V4).save_nat() {
            Ok(state) if choice == BackendChoice::Auto && backend == Backend::Nft => {
                return Ok(legacy_if_ours_are_there(state));
            }
            Ok(state) => return Ok((backend, state)),
            Err(error) => errors.push(error),
        }
    }
    let rank = |e: &IptablesError| match e {
        IptablesError::Permission { .. } => 0,
        IptablesError::Failed { .. } | IptablesError::Io { .. } => 1,
        IptablesError::NotFound { .. } => 2,
    };
    errors.sort_by_key(rank);
    Err(errors.remove(0))
}

/// Legacy with its table when our rules are in a legacy table and not in the nft one
/// (`nft_state`), else nft.
fn legacy_if_ours_are_there(nft_state: String) -> (Backend, String) {
    if NatTable::parse(&nft_state).holds_ours() || !iptables::legacy_nat_exists() {
        return (Backend::Nft, nft_state);
    }
    match Tables::new(Backend::Legacy, Family::V4).save_nat() {
        Ok(legacy) if NatTable::parse(&legacy).holds_ours() => (Backend::Legacy, legacy),
        _ => (Backend::Nft, nft_state),
    }
}

/// The IPv6 nat table when IPv6 rules are to be programmed, `None` when they are not.
fn ipv6_state(backend: Backend, ipv6: Ipv6) -> Result<Option<String>, IptablesError> {
    if ipv6 == Ipv6::Off {
        return Ok(None);
    }
    if ipv6 == Ipv6::Auto && !iptables::namespace_has_ipv6() {
        return Ok(None);
    }
    Tables::new(backend, Family::V6).save_nat().map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: InitArgs,
    }

    fn parse(argv: &[&str]) -> Result<InitArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("init").chain(argv.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn defaults_match_the_design() {
        let args = parse(&[]).unwrap();
        let defaults = InitArgs::default();
        assert_eq!(
            args.interception().unwrap(),
            defaults.interception().unwrap()
        );
        assert_eq!(args.proxy_uid, 1337);
        assert_eq!(args.inbound_port, 15006);
        assert_eq!(args.outbound_port, 15001);
        assert_eq!(args.exclude_ports, Ports(vec![15020]));
        assert_eq!(args.ipv6, Ipv6::Auto);
        assert_eq!(args.backend, BackendChoice::Auto);
        assert!(!args.dry_run && !args.cleanup);
    }

    #[test]
    fn lists_are_comma_separated_and_may_be_empty() {
        let args = parse(&[
            "--exclude-ports",
            "22, 15020,22",
            "--exclude-outbound-ports=",
            "--exclude-outbound-cidrs",
            "10.0.0.0/8,fd00::/8",
        ])
        .unwrap();
        assert_eq!(args.exclude_ports, Ports(vec![22, 15020]));
        assert_eq!(args.exclude_outbound_ports, Ports(vec![]));
        assert_eq!(args.exclude_outbound_cidrs.0.len(), 2);
        assert_eq!(
            parse(&["--exclude-ports", ""]).unwrap().exclude_ports,
            Ports(vec![])
        );
    }

    #[test]
    fn bad_flags_are_rejected_with_the_value() {
        let error = parse(&["--exclude-ports", "22,http"])
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("\"http\" is not a port"), "{error}");
        let error = parse(&["--exclude-outbound-cidrs", "10.0.0.0/40"])
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("\"40\" is not a prefix length"), "{error}");
        assert!(parse(&["--inbound-port", "0"]).is_err());
        assert!(parse(&["--ipv6", "maybe"]).is_err());

        let same = parse(&["--inbound-port", "15001"]).unwrap();
        let error = same.interception().unwrap_err();
        assert_eq!(error.exit_code(), 64);
        assert!(error.to_string().contains("both 15001"), "{error}");
    }

    #[test]
    fn nameservers_are_read_from_resolv_conf() {
        let path = Path::new("/etc/resolv.conf");
        let text = "# kubelet\nsearch default.svc.cluster.local svc.cluster.local\n\
                    nameserver 10.96.0.10\nnameserver  fd00::a ; second\n\
                    nameserver 10.96.0.10\nnameserver fe80::1%eth0\noptions ndots:5\n";
        let found = nameservers(text, path).unwrap();
        let expected: Vec<IpAddr> = ["10.96.0.10", "fd00::a", "fe80::1"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(found, expected);

        let error = nameservers("search svc.cluster.local\n", path).unwrap_err();
        assert_eq!(
            error.to_string(),
            "invalid --resolv-conf: /etc/resolv.conf names no nameserver, so \
             --exclude-outbound-dns could not let DNS past the sidecar"
        );
        let error = nameservers("nameserver 10.96.0.10\nnameserver dns.local\n", path)
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            "invalid --resolv-conf: /etc/resolv.conf line 2: nameserver \"dns.local\" is not \
             an IP address"
        );
    }

    #[test]
    fn an_unreadable_resolv_conf_is_an_error_naming_it_only_when_asked_for() {
        let missing = "/nonexistent/trellis-test/resolv.conf";
        let args = parse(&["--exclude-outbound-dns", "--resolv-conf", missing]).unwrap();
        let error = args.interception().unwrap_err();
        assert_eq!(error.exit_code(), 64);
        assert_eq!(
            error.to_string(),
            format!("invalid --resolv-conf: {missing}: no such file or directory")
        );
        let args = parse(&["--resolv-conf", missing]).unwrap();
        assert!(args.interception().unwrap().nameservers.is_empty());
    }

    /// The resolv.conf's path is said back with its control characters
    /// escaped, as the sidecar's other errors say paths.
    #[test]
    fn a_resolv_conf_path_is_said_back_escaped() {
        let path = "/nonexistent/\u{1b}[31mresolv.conf";
        let escaped = "/nonexistent/\\u{1b}[31mresolv.conf";
        let args = parse(&["--exclude-outbound-dns", "--resolv-conf", path]).unwrap();
        let unreadable = args.interception().unwrap_err().to_string();
        let unnamed = nameservers("search svc.cluster.local\n", Path::new(path))
            .unwrap_err()
            .to_string();
        let unparsed = nameservers("nameserver dns.local\n", Path::new(path))
            .unwrap_err()
            .to_string();
        for said in [unreadable, unnamed, unparsed] {
            assert!(!said.contains('\u{1b}'), "{said:?}");
            assert!(said.contains(escaped), "{said}");
        }
    }

    #[test]
    fn the_outbound_policy_decides_whether_udp_is_dropped() {
        assert!(!parse(&[]).unwrap().interception().unwrap().drop_udp);
        let deny = parse(&["--outbound-policy", "deny"]).unwrap();
        assert!(deny.interception().unwrap().drop_udp);
        let passthrough = parse(&["--outbound-policy", "passthrough"]).unwrap();
        assert!(!passthrough.interception().unwrap().drop_udp);
        assert!(parse(&["--outbound-policy", "allow"]).is_err());
    }

    const IF_INET6_LINK_LOCAL: &str = "\
00000000000000000000000000000001 01 80 10 80       lo
fe800000000000000c1a2bfffe3d4e5f 02 40 20 80     eth0
";

    fn refused() -> IptablesError {
        IptablesError::Failed {
            program: "ip6tables-nft-restore",
            status: "exit status: 1".into(),
            detail: "no IPv6 nat table".into(),
        }
    }

    #[test]
    fn ipv6_rules_that_cannot_be_written_fail_init_when_the_pod_has_an_ipv6_address() {
        assert_eq!(routable_ipv6(IF_INET6_LINK_LOCAL), None);
        let warning = ipv6_skipped(refused(), IF_INET6_LINK_LOCAL).unwrap();
        assert!(warning.starts_with("IPv6 rules skipped: "), "{warning}");

        let global =
            format!("{IF_INET6_LINK_LOCAL}fd00000000000000000000000000000a 02 40 00 80     eth0\n");
        assert_eq!(routable_ipv6(&global), Some("fd00::a".parse().unwrap()));
        let error = ipv6_skipped(refused(), &global).unwrap_err();
        assert_eq!(error.exit_code(), 1);
        let text = error.to_string();
        assert!(
            text.starts_with(
                "the pod has the IPv6 address fd00::a but IPv6 rules could not be written \
                 (ip6tables-nft-restore failed (exit status: 1): no IPv6 nat table): its IPv6 \
                 traffic would bypass the sidecar; make ip6tables work"
            ),
            "{text}"
        );
        assert!(text.ends_with("or give the pod no IPv6 address"), "{text}");
    }

    #[test]
    fn a_reverted_change_names_every_family_put_back() {
        let reverted = |families: Vec<Family>| {
            InitError::Reverted {
                failed: refused(),
                reverted: families,
            }
            .to_string()
        };
        let failed = "ip6tables-nft-restore failed (exit status: 1): no IPv6 nat table";
        assert_eq!(
            reverted(vec![Family::V4]),
            format!("{failed}; the IPv4 change was reverted, so nothing is left half done")
        );
        assert_eq!(
            reverted(vec![Family::V4, Family::V6]),
            format!(
                "{failed}; the IPv4 and IPv6 changes were reverted, so nothing is left half done"
            )
        );
    }

    #[test]
    fn a_revert_that_fails_names_what_was_put_back_and_what_was_not() {
        let revert_refused = || IptablesError::Failed {
            program: "ip6tables-nft-restore",
            status: "exit status: 4".into(),
            detail: "Resource temporarily unavailable".into(),
        };
        let failed = "ip6tables-nft-restore failed (exit status: 1): no IPv6 nat table";
        let refusal = "ip6tables-nft-restore failed (exit status: 4): Resource temporarily \
                       unavailable";
        let advice = "delete the pod so that it starts again in a new network namespace";

        let error = InitError::RevertFailed {
            failed: refused(),
            reverted: vec![Family::V4],
            unreverted: vec![(Family::V6, revert_refused())],
        };
        assert_eq!(error.exit_code(), 1);
        assert_eq!(
            error.to_string(),
            format!(
                "{failed}; the IPv4 change was reverted, but reverting the IPv6 change failed \
                 too ({refusal}): the pod's IPv6 rules may be left half changed, so some of its \
                 traffic may bypass the sidecar; {advice}"
            )
        );

        let error = InitError::RevertFailed {
            failed: refused(),
            reverted: vec![],
            unreverted: vec![
                (Family::V4, revert_refused()),
                (Family::V6, revert_refused()),
            ],
        };
        assert_eq!(
            error.to_string(),
            format!(
                "{failed}; reverting the IPv4 and IPv6 changes failed too (IPv4: {refusal}; \
                 IPv6: {refusal}): the pod's IPv4 and IPv6 rules may be left half changed, so \
                 some of its traffic may bypass the sidecar; {advice}"
            )
        );
    }

    #[test]
    fn exit_codes_say_what_is_missing() {
        let missing = InitError::Iptables(IptablesError::NotFound {
            program: "iptables-nft-save",
        });
        assert_eq!(missing.exit_code(), 69);
        assert!(missing.to_string().contains("iptables-nft-save not found"));
        let refused = InitError::Iptables(IptablesError::Permission {
            program: "iptables-nft-save",
            detail: "Permission denied (you must be root)".into(),
        });
        assert_eq!(refused.exit_code(), 77);
        assert!(
            refused
                .to_string()
                .contains("needs root or the NET_ADMIN capability")
        );
    }
}
