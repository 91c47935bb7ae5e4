//! Wiring: [`Sidecar::bind`] binds every listener first; [`Sidecar::run`]
//! then starts the identity, TLS and discovery tasks and the listeners, and
//! drains when told to stop ([`run`]: on SIGTERM/SIGINT).
//!
//! This module owns the order of start-up and shutdown; it never handles a
//! connection itself.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::watch;
use trellis_core::io_error::IoWords;
use trellis_core::logging::throttle::Throttle;

use crate::config::{Config, Listen};
use crate::identity::{self, CertifyParams};
use crate::inbound::{self, Inbound};
use crate::metrics::Metrics;
use crate::outbound::{self, RouteListener, Transparent};
use crate::policy::watch::{Outputs, WatchParams};
use crate::tls::TlsState;
use crate::{admin, drain, policy, tls};

/// Why start-up failed after the configuration was valid: a listener
/// address of `--flag` that cannot be bound (in use, not on this host),
/// said as `--inbound 127.0.0.1:15006: address already in use`.
#[derive(Debug, thiserror::Error)]
#[error("--{flag} {addr}: {}", IoWords(source))]
pub struct Bind {
    flag: &'static str,
    addr: SocketAddr,
    source: std::io::Error,
}

fn bind_error(flag: &'static str, addr: SocketAddr) -> impl FnOnce(std::io::Error) -> Bind {
    move |source| Bind { flag, addr, source }
}

/// Binds one listener address of `--flag` with `new`. An optional address
/// (the IPv6 half of a default pair) that the namespace cannot have is
/// logged and skipped (`None`); every other failure stops start-up.
async fn bind_listen<L, F>(
    flag: &'static str,
    listen: Listen,
    new: impl FnOnce(SocketAddr) -> F,
) -> Result<Option<L>, Bind>
where
    F: Future<Output = std::io::Result<L>>,
{
    match new(listen.addr).await {
        Ok(listener) => Ok(Some(listener)),
        Err(e) if listen.optional && crate::net::ipv6_unavailable(&e) => {
            tracing::warn!(
                addr = %listen.addr,
                error = %e,
                "no IPv6 in this network namespace: --{flag} serves IPv4 only"
            );
            Ok(None)
        }
        Err(e) => Err(bind_error(flag, listen.addr)(e)),
    }
}

/// Runs a sidecar until SIGTERM or SIGINT, then drains it; a second
/// signal during the drain ends it at once. A listener that cannot be
/// bound ends it at once, with the error for the caller to say.
pub async fn run(config: Config) -> Result<(), Bind> {
    raise_open_files();
    let sidecar = Sidecar::bind(config).await?;
    let drain = sidecar.drain.status();
    // Both watched before anything is served, so neither signal
    // is missed.
    let mut first = StopSignals::watch(true);
    let mut again = StopSignals::watch(false);
    let serving = sidecar.run(async move { first.next().await });
    let second = async move {
        again.next().await;
        again.next().await
    };
    tokio::select! {
        // The second signal's watch sees the first before the
        // drain says it started.
        biased;
        signal = second => {
            let open = drain.open_connections();
            tracing::warn!(
                signal,
                inbound = open.inbound,
                outbound = open.outbound,
                "second signal: exiting without waiting for the drain; closing the remaining connections"
            )
        }
        () = serving => {}
    }
    Ok(())
}

/// Raises the soft open-files limit to the hard one, before any listener
/// is bound. Every proxied connection holds two descriptors (the caller's
/// and the upstream's), so the soft limit of 1,024 that container runtimes
/// give a container would make accepts fail with EMFILE past some 500
/// connections.
fn raise_open_files() {
    trellis_core::open_files::raise_and_log(
        "at most half as many connections as it allows are proxied at once",
    );
}

/// A sidecar with every listener bound, not serving yet.
pub struct Sidecar {
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    /// One per inbound address bound (IPv4, IPv6); never empty.
    inbound: Vec<Inbound>,
    admin: admin::Admin,
    /// One per outbound address bound; never empty.
    transparent: Vec<Transparent>,
    routes: Vec<RouteListener>,
    channels: Channels,
    shutdown: drain::Shutdown,
    drain: drain::Drain,
}

/// The channels the background tasks write; the listeners already hold
/// their receivers.
struct Channels {
    svid: watch::Sender<Option<Arc<identity::Svid>>>,
    bundle: watch::Sender<identity::TrustBundle>,
    snapshot: watch::Sender<Option<Arc<policy::Snapshot>>>,
    policies: watch::Sender<Option<Arc<policy::Policies>>>,
    tls: watch::Sender<Arc<TlsState>>,
    certify_failure: watch::Sender<Option<Arc<str>>>,
}

impl Sidecar {
    /// Binds every listener of `config`; nothing is served yet.
    pub async fn bind(config: Config) -> Result<Self, Bind> {
        bind(config).await
    }

    /// The first inbound address bound.
    pub fn inbound_addr(&self) -> Option<SocketAddr> {
        self.inbound.first().and_then(|l| l.local_addr().ok())
    }

    /// Every inbound address bound.
    pub fn inbound_addrs(&self) -> Vec<SocketAddr> {
        self.inbound
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// Every transparent outbound address bound.
    pub fn outbound_addrs(&self) -> Vec<SocketAddr> {
        self.transparent
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.local_addr().ok()
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Serves until `stop` resolves, then drains: the inbound listeners
    /// close, the outbound ones keep accepting until no connection has
    /// been open for `--drain-idle`, or `--drain-timeout` passes; the
    /// admin port serves until then too, `/ready` answering 503.
    pub async fn run(self, stop: impl Future<Output = &'static str>) {
        serve(self, stop).await
    }
}

async fn bind(config: Config) -> Result<Sidecar, Bind> {
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::new());
    let (svid_tx, svid_rx) = watch::channel(None);
    let (certify_failure_tx, certify_failure_rx) = watch::channel(None);
    let (bundle_tx, bundle_rx) = watch::channel(Arc::new(config.trust_bundle.clone()));
    let (snapshot_tx, snapshot_rx) = watch::channel(None);
    let (policies_tx, policies_rx) = watch::channel(None);
    let (tls_tx, tls_rx) = watch::channel(Arc::new(TlsState::default()));
    let (shutdown, drain) = drain::channel();

    // Bind everything before serving anything.
    let inbound_shared = Arc::new(inbound::Shared {
        app: config.app,
        own_ports: config
            .outbound
            .iter()
            .map(|l| l.addr.port())
            .chain(std::iter::once(config.admin.port()))
            .chain(config.routes.iter().map(|r| r.local.port()))
            .filter(|p| *p != 0)
            .collect(),
        pod_ips: config
            .advertise_addresses
            .iter()
            .map(|a| a.ip().to_canonical())
            .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
            .collect(),
        tls: tls_rx.clone(),
        policies: policies_rx.clone(),
        close_denied: config.close_denied_connections,
        opaque_ports: config.opaque_ports.clone(),
        user_timeout: config.tcp_user_timeout,
        http: Arc::new(crate::http::Http::with_access_log(
            metrics.clone(),
            config.access_log,
        )),
        metrics: metrics.clone(),
        handshakes: inbound::Handshakes::default(),
        h2: inbound::H2Connections::new(
            config.max_h2_connections,
            config.max_h2_connections_per_peer,
        ),
    });
    let mut inbound = Vec::with_capacity(config.inbound.len());
    for listen in &config.inbound {
        let bound = bind_listen("inbound", *listen, |addr| {
            Inbound::new(addr, inbound_shared.clone(), drain.clone())
        })
        .await?;
        inbound.extend(bound);
    }
    let admin = admin::Admin::new(
        config.admin,
        admin::State {
            config: config.clone(),
            svid: svid_rx,
            certify_failure: certify_failure_rx,
            bundle: bundle_rx,
            snapshot: snapshot_rx.clone(),
            metrics: metrics.clone(),
            drain: drain.status(),
        },
        drain.clone(),
    )
    .await
    .map_err(bind_error("admin", config.admin))?;
    let mut own_addrs = vec![config.admin];
    own_addrs.extend(config.inbound.iter().map(|l| l.addr));
    own_addrs.extend(config.outbound.iter().map(|l| l.addr));
    own_addrs.extend(&config.advertise_addresses);
    own_addrs.extend(inbound.iter().filter_map(|l| l.local_addr().ok()));
    own_addrs.extend(admin.local_addr().ok());
    own_addrs.extend(config.routes.iter().map(|r| r.local));
    let outbound_shared = Arc::new(outbound::Shared {
        tls: tls_rx.clone(),
        snapshot: snapshot_rx,
        policies: policies_rx,
        metrics: metrics.clone(),
        own_addrs,
        plaintext_listeners: config.plaintext_listeners().collect(),
        user_timeout: config.tcp_user_timeout,
        peer_refusals: Throttle::new(inbound::REFUSAL_LOG_PAUSE),
    });
    let mut transparent = Vec::with_capacity(config.outbound.len());
    for listen in &config.outbound {
        let bound = bind_listen("outbound", *listen, |addr| {
            Transparent::new(addr, outbound_shared.clone(), drain.until_exit())
        })
        .await?;
        transparent.extend(bound);
    }
    let mut routes = Vec::with_capacity(config.routes.len());
    for route in &config.routes {
        let local = route.local;
        let listener =
            RouteListener::new(route.clone(), outbound_shared.clone(), drain.until_exit())
                .await
                .map_err(bind_error("route", local))?;
        routes.push(listener);
    }
    Ok(Sidecar {
        config,
        metrics,
        inbound,
        admin,
        transparent,
        routes,
        channels: Channels {
            svid: svid_tx,
            bundle: bundle_tx,
            snapshot: snapshot_tx,
            policies: policies_tx,
            tls: tls_tx,
            certify_failure: certify_failure_tx,
        },
        shutdown,
        drain,
    })
}

async fn serve(sidecar: Sidecar, stop: impl Future<Output = &'static str>) {
    let Sidecar {
        config,
        metrics,
        inbound,
        admin,
        transparent,
        routes,
        channels,
        shutdown,
        drain,
    } = sidecar;
    let route_addrs: Vec<SocketAddr> = routes.iter().filter_map(|r| r.local_addr().ok()).collect();
    let inbound_addrs: Vec<String> = inbound.iter().map(|l| fmt_addr(l.local_addr())).collect();
    let outbound_addrs: Vec<String> = transparent
        .iter()
        .map(|l| fmt_addr(l.local_addr()))
        .collect();
    tracing::info!(
        identity = %config.identity,
        inbound = %inbound_addrs.join(","),
        outbound = %outbound_addrs.join(","),
        admin = %fmt_addr(admin.local_addr()),
        routes = %trellis_core::logging::List(&route_addrs),
        "listening"
    );
    let hooks: Vec<String> = (config.app_probes.paths().into_iter())
        .filter(|path| admin::access::is_hook(path))
        .collect();
    if config.hook_token.is_none() && !hooks.is_empty() {
        // A pod injected before hook tokens: its hooks work as they did.
        tracing::warn!(
            hooks = %hooks.join(","),
            "no --hook-token: the app's lifecycle hooks on the admin port run for any caller \
             that reaches it; re-create the pod to have the injector give it a token"
        );
    }

    // Identity, TLS configs and discovery.
    let Channels {
        svid,
        bundle,
        snapshot,
        policies,
        tls,
        certify_failure,
    } = channels;
    tokio::spawn(tls::run(
        config.trust_domain.clone(),
        config.routes.iter().map(|r| r.spiffe_id.clone()).collect(),
        svid.subscribe(),
        bundle.subscribe(),
        snapshot.subscribe(),
        tls,
    ));
    let svid_rx = svid.subscribe();
    tokio::spawn(identity::run(
        CertifyParams {
            control_plane: config.control_plane.clone(),
            identity: config.identity.clone(),
            token: config.token.clone(),
            advertise_addresses: config.advertise_addresses.clone(),
        },
        svid,
        bundle.clone(),
        certify_failure,
        metrics.clone(),
    ));
    tokio::spawn(policy::watch::run(
        WatchParams {
            control_plane: config.control_plane.clone(),
            identity: config.identity.clone(),
            advertise_addresses: config.advertise_addresses.clone(),
            opaque_ports: config.opaque_ports.clone(),
        },
        svid_rx,
        Outputs {
            snapshot,
            policies,
            bundle,
            metrics: metrics.clone(),
        },
    ));

    // Serve.
    let mut listeners = tokio::task::JoinSet::new();
    for listener in inbound {
        listeners.spawn(listener.run());
    }
    listeners.spawn(admin.run());
    for listener in transparent {
        listeners.spawn(listener.run());
    }
    for route in routes {
        listeners.spawn(route.run());
    }
    drop(drain);

    // Inbound closes at once, so callers go elsewhere; outbound keeps
    // accepting while the drain lasts, for an app that makes calls as it
    // shuts down beside the sidecar (outside Kubernetes, where both are
    // stopped together); admin keeps answering the kubelet's probes
    // (`/ready` 503, `/live` 200) and scrapes until the process exits.
    let signal = stop.await;
    tracing::info!(
        signal,
        drain_timeout = ?config.drain_timeout,
        drain_idle = ?config.drain_idle,
        open = shutdown.open(),
        "shutting down: inbound stops accepting and /ready answers 503; outbound and admin accept until no connection has been open for drain_idle"
    );
    metrics.drain_started();
    shutdown.start();
    let quiet = shutdown.quiet(config.drain_idle);
    if tokio::time::timeout(config.drain_timeout, quiet)
        .await
        .is_ok()
    {
        tracing::info!(drain_idle = ?config.drain_idle, "drained: no connection open for drain_idle; exiting");
    } else {
        // Said by side: inbound ones are callers cut mid-request or
        // mid-stream, outbound ones the app's own calls.
        let open = shutdown.open_connections();
        tracing::warn!(
            drain_timeout = ?config.drain_timeout,
            inbound = open.inbound,
            outbound = open.outbound,
            "drain timeout reached; closing the remaining connections"
        );
    }
    shutdown.exit();
    // Every listener stops at once now, each saying so.
    while listeners.join_next().await.is_some() {}
}

fn fmt_addr(addr: std::io::Result<SocketAddr>) -> String {
    addr.map(|a| a.to_string())
        .unwrap_or_else(|e| e.to_string())
}

/// SIGTERM and SIGINT, watched from when it is made.
struct StopSignals {
    term: Option<Signal>,
    int: Option<Signal>,
}

impl StopSignals {
    /// Watches both; a signal that cannot be watched is left out, and
    /// said so in the log when `log`.
    fn watch(log: bool) -> StopSignals {
        let watch = |kind, name: &'static str| match signal(kind) {
            Ok(signal) => Some(signal),
            Err(e) => {
                if log {
                    tracing::error!(error = %e, signal = name, "cannot watch a stop signal; only the other one stops the proxy");
                }
                None
            }
        };
        StopSignals {
            term: watch(SignalKind::terminate(), "SIGTERM"),
            int: watch(SignalKind::interrupt(), "SIGINT"),
        }
    }

    /// Resolves with the name of the next signal to arrive.
    async fn next(&mut self) -> &'static str {
        async fn recv(signal: &mut Option<Signal>) {
            match signal {
                Some(signal) => {
                    signal.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            () = recv(&mut self.term) => "SIGTERM",
            () = recv(&mut self.int) => "SIGINT",
        }
    }
}
