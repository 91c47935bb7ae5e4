//! The admin server on `--admin`: `/live`, `/ready`, `/metrics`, `/config`
//! and the app's own probes under `/app-health/` ([`probes`]), plain
//! HTTP/1.1 meant for the kubelet, Prometheus and operators on the same
//! host. Every pod of the cluster reaches it: `/config` is served to
//! loopback peers only, and the app's lifecycle hooks to requests with the
//! pod's hook token ([`access`]); any other request gets 403 saying why,
//! with `trellis-proxy-error: denied`. A path it serves nothing at gets
//! 404 with `trellis-proxy-error: not_found`, a method other than `GET`
//! or `HEAD` 405 with `trellis-proxy-error: method_not_allowed` and
//! `Allow: GET, HEAD`. `/ready`
//! answers 503 with `trellis-proxy-error: not_ready` while the sidecar is
//! not ready, saying why (without a valid certificate, why the last
//! Certify failed), and an app probe that fails 503 with `probe_failed`.
//!
//! Every request head of a connection is read before hyper's server sees
//! it (`head`: the first, and each later one on a kept-alive connection),
//! and checked as the sidecar's HTTP/1.1 forwarder checks a head: one that
//! does not parse (a bad request line, a bare CR, a header line without a
//! colon), with more than 100 fields or over 408 KiB (431), with a target
//! over 65534 bytes (414) or one that is not a URI or holds a raw `#`, or
//! an invalid method, is answered as the forwarder answers it: 400, 414 or
//! 431 with `trellis-proxy-error: invalid_request`, one line of text
//! naming what was wrong, and the connection closed. A head begun and not
//! whole within [`HEAD_TIMEOUT`] is answered 408 with
//! `trellis-proxy-error: request_timeout`; a connection idle that long is
//! closed without a word. A head hyper refuses for what is not checked
//! first (a field name the `http` crate refuses, a `Content-Length` or
//! `Transfer-Encoding` it cannot read), or one after a chunked body hyper
//! refuses (one that does not parse, or over hyper's bounds on chunk
//! extensions or trailers),
//! gets hyper's own answer, a status alone: hyper writes it with no hook to add words.
//! Either way the refusal is counted by its kind
//! (`trellis_admin_malformed_requests_total`, `reason`: `malformed` (a 408
//! among them), `head_too_large`, `target_too_long`) and logged as a
//! warning ([`MALFORMED`]) naming the client and the fault (never a
//! header's value: the hook token travels in one), at most once per kind
//! per [`REFUSAL_LOG_PAUSE`], hyper's marked `answered="status only"`.
//! The port switches protocols for nothing: its answer to a `CONNECT` or
//! an HTTP/1.1 request with an `Upgrade`, after which no head is checked,
//! says `connection: close` and ends the connection.
//!
//! It reads the published state (SVID, bundle, snapshot, metrics) and never
//! changes it. It must never expose key material or the join token.
//!
//! It serves until the process exits, through the drain that follows
//! SIGTERM: `/ready` then answers 503 saying since when the sidecar drains
//! and what it waits for, `/live` stays 200 (a draining sidecar must not
//! be restarted), and every other endpoint answers as before. Its
//! connections do not count towards the drain: a probe or a scrape never
//! holds it open. A drain refuses nothing there: who may reach each path
//! (`/config` loopback peers only, the app's lifecycle hooks only with the
//! pod's hook token) is decided as always, in `access`.
//!
//! A connection closed as it is accepted, past the port's connection
//! limits, is counted by the limit that refused it
//! (`trellis_admin_connections_refused_total`) and logged as a warning
//! naming the client and the limit, at most once per limit per
//! [`REFUSAL_LOG_PAUSE`]: a kubelet probe refused here restarts the pod or
//! takes it out of its Service, which must not go unseen at the default
//! log level. A connection admitted costs nothing more for it.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use trellis_core::connections::ConnectionLimits;
use trellis_core::duration::Words;
use trellis_core::logging::throttle::Throttle;
use trellis_core::refusal::token;
use trellis_core::warn_throttled;

pub mod access;
mod head;
pub mod probes;

pub use head::{HEAD_TIMED_OUT, MALFORMED};

use crate::config::Config;
use crate::drain::{self, Drain};
use crate::identity::{Svid, TrustBundle, rfc3339};
use crate::inbound::REFUSAL_LOG_PAUSE;
use crate::metrics::Metrics;
use crate::policy::Snapshot;

/// What the admin endpoints read.
pub struct State {
    pub config: Arc<Config>,
    pub svid: watch::Receiver<Option<Arc<Svid>>>,
    /// Why the last Certify failed, until one succeeds.
    pub certify_failure: watch::Receiver<Option<Arc<str>>>,
    pub bundle: watch::Receiver<TrustBundle>,
    pub snapshot: watch::Receiver<Option<Arc<Snapshot>>>,
    pub metrics: Arc<Metrics>,
    /// Where the drain is: `/ready` answers 503 once it has started.
    pub drain: drain::Status,
}

/// How long a client of the admin port has to send a request's head,
/// and how long an idle connection is kept waiting for the next one: the
/// kubelet and Prometheus send theirs at once.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// Admin connections served at once; more are closed as they are
/// accepted. The port is reachable from every pod of the cluster (it is
/// the kubelet's probe target), so a client that opens connections and
/// sends nothing must not grow the sidecar's memory without bound.
pub const MAX_CONNECTIONS: usize = 128;

/// Admin connections one client address may hold at once. The kubelet
/// (from the node's address) and a Prometheus need a few; one pod of the
/// cluster must not take every slot and leave the kubelet's probes
/// refused.
pub const MAX_CONNECTIONS_PER_CLIENT: usize = 16;

/// How long one admin connection is served: then it closes after the
/// answer in progress, or [`HEAD_TIMEOUT`] later if that answer cannot be
/// written (a client that pipelines requests and never reads would
/// otherwise hold its slot for ever). A scraper simply reconnects.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// How a connection closed as it was accepted, past the admin port's
/// connection limits, is logged, with the limit (`reason`, `error`) and
/// client.
const OVER_LIMITS: &str = "admin connection refused: past the port's connection limits";

/// Binds the admin port; [`Admin::run`] serves it.
pub struct Admin {
    listener: TcpListener,
    state: Arc<State>,
    drain: Drain,
}

impl Admin {
    /// Binds `addr`. The port serves until the drain of `drain` ends, its
    /// connections not counted in it.
    pub async fn new(addr: SocketAddr, state: State, drain: Drain) -> io::Result<Self> {
        Ok(Admin {
            listener: crate::net::bind(addr)?,
            state: Arc::new(state),
            drain: drain.until_exit_uncounted(),
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub async fn run(self) {
        let Admin {
            listener,
            state,
            drain,
        } = self;
        let limits = ConnectionLimits::new(MAX_CONNECTIONS, MAX_CONNECTIONS_PER_CLIENT);
        let refusals = Arc::new(Throttle::new(REFUSAL_LOG_PAUSE));
        // Named in the answer to `/config` from elsewhere.
        let port = listener.local_addr().map_or(0, |a| a.port());
        drain
            .accept(listener, "admin", |tcp, client, _tracker| {
                let admitted = match limits.admit(client.ip()) {
                    Ok(admitted) => admitted,
                    Err(refused) => {
                        let reason = refused.reason();
                        warn_throttled!(
                            refusals,
                            reason,
                            { %client, reason = %reason, error = %refused },
                            "{OVER_LIMITS}"
                        );
                        // Counted once its line, if any, is in the log's
                        // queue: a refusal the metric shows has been
                        // logged, or counted as not.
                        state.metrics.admin_connection_refused(refused);
                        return;
                    }
                };
                let state = state.clone();
                let refusals = refusals.clone();
                // The kubelet's probes reach the pod IP: the app's are run
                // there too.
                let app = probes::app_host(tcp.local_addr().ok());
                tokio::spawn(async move {
                    let admitted = admitted;
                    let evicted = std::pin::pin!(admitted.evicted());
                    let metrics = state.metrics.clone();
                    let service = service_fn(move |req: Request<Incoming>| {
                        let state = state.clone();
                        async move {
                            let ends = trellis_core::http1::may_switch(&req);
                            let version = req.version();
                            let allowed = access::check(
                                req.uri().path(),
                                client.ip(),
                                port,
                                req.headers().get(access::HOOK_TOKEN_HEADER),
                                state.config.hook_token.as_ref(),
                            );
                            let mut response = if let Err(refused) = allowed {
                                forbidden(&refused)
                            } else if req.uri().path().starts_with(probes::PATH_PREFIX) {
                                app_health(&state, &req, app).await
                            } else {
                                route(&state, &req)
                            };
                            // The port never answers `101`, nor `2xx` to a
                            // `CONNECT`: hyper would read on after such an
                            // answer, taking heads no check read (a raw `#`
                            // in a target among them).
                            if ends {
                                trellis_core::http1::end_connection(&mut response, version);
                            }
                            Ok::<_, Infallible>(response)
                        }
                    });
                    head::serve(tcp, client, &metrics, &refusals, evicted, service).await;
                });
            })
            .await;
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(body.into()))
        .expect("static response parts are valid")
}

/// The 403 of a request [`access`] refuses: why, as its text, and
/// `trellis-proxy-error: denied`, as the sidecar's other refusals carry.
fn forbidden(refused: &access::Refusal) -> Response<Full<Bytes>> {
    refusal(StatusCode::FORBIDDEN, token::DENIED, refused.to_string())
}

/// The 405 of a request whose method is neither `GET` nor `HEAD`, with
/// `trellis-proxy-error: method_not_allowed` and `Allow: GET, HEAD`
/// (RFC 9110 section 15.5.6).
fn method_not_allowed() -> Response<Full<Bytes>> {
    let mut answer = refusal(
        StatusCode::METHOD_NOT_ALLOWED,
        token::METHOD_NOT_ALLOWED,
        "GET only",
    );
    answer
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    answer
}

/// The 404 of a path the port serves nothing at, with
/// `trellis-proxy-error: not_found` (under `/app-health/`, a path no app
/// probe is registered at).
fn not_found(body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    refusal(StatusCode::NOT_FOUND, token::NOT_FOUND, body)
}

/// The 503 of `/ready` while the sidecar is not ready (or drains), saying
/// why, with `trellis-proxy-error: not_ready`.
fn unready(why: impl std::fmt::Display) -> Response<Full<Bytes>> {
    refusal(
        StatusCode::SERVICE_UNAVAILABLE,
        token::NOT_READY,
        format!("not ready: {why}"),
    )
}

/// A refusal of the admin port: `status` with `message` (and a newline) as
/// its text, marked as the sidecar's own answer as its other refusals are:
/// `trellis-proxy-error: token`, and the text begins with `trellis: `
/// ([`trellis_core::refusal::local_answer`]).
fn refusal(
    status: StatusCode,
    token: &'static str,
    message: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    // A refusal of the admin port is never gRPC: the code is not used.
    let grpc_code = trellis_core::refusal::GRPC_PERMISSION_DENIED;
    trellis_core::refusal::local_answer(false, status, grpc_code, Some(token), message.into())
}

fn route(state: &State, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return method_not_allowed();
    }
    match req.uri().path() {
        "/live" => text(StatusCode::OK, "live\n"),
        "/ready" => match (state.drain.draining(), not_ready(state, SystemTime::now())) {
            (Some(draining), _) => unready(draining_reason(
                &draining,
                state.config.drain_idle,
                state.config.drain_timeout,
            )),
            (None, None) => text(StatusCode::OK, "ready\n"),
            (None, Some(reason)) => unready(reason),
        },
        "/metrics" => Response::builder()
            .header(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
            .body(Full::new(state.metrics.encode().into()))
            .expect("static response parts are valid"),
        "/config" => {
            let mut body = serde_json::to_vec_pretty(&config_view(state)).expect("serializable");
            // Ended by a newline, as every other answer of this port: the
            // shell's prompt after an operator's curl starts on its own line.
            body.push(b'\n');
            Response::builder()
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(body.into()))
                .expect("static response parts are valid")
        }
        _ => not_found("not found: try /live /ready /metrics /config"),
    }
}

/// Runs the app probe registered at the request's path against the app at
/// `app`: 200 when the app passes it, 503 with the reason when not, 404 for
/// a path no probe has.
async fn app_health(
    state: &State,
    req: &Request<Incoming>,
    app: std::net::IpAddr,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return method_not_allowed();
    }
    let path = req.uri().path();
    let Some(check) = state.config.app_probes.get(path) else {
        return not_found(format!("no app probe at {path}"));
    };
    match probes::run(check, app, probes::TIMEOUT).await {
        Ok(()) => text(StatusCode::OK, "ok\n"),
        Err(e) => {
            tracing::info!(probe = %path, reason = %e, "app probe failed");
            refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                token::PROBE_FAILED,
                e.to_string(),
            )
        }
    }
}

/// What `/ready` says of a drain under way: since when (and how long ago,
/// in whole seconds, in words), and what it waits for before the process
/// exits (`--drain-idle`, `--drain-timeout`).
fn draining_reason(draining: &drain::Draining, idle: Duration, timeout: Duration) -> String {
    format!(
        "draining since {} ({} ago): inbound refuses new connections; the sidecar exits \
         once no connection has been open for {} ({} open now), or {} after the drain started",
        humantime::format_rfc3339_seconds(draining.since),
        Words(Duration::from_secs(draining.elapsed.as_secs())),
        Words(idle),
        draining.open,
        Words(timeout),
    )
}

/// Why the sidecar is not ready, or `None` when it is. Without a valid
/// certificate, also why the last Certify failed (as the log's `certify
/// failed` says it), so that whoever reads the probe's answer learns what
/// to fix: a used join token, a wrong `--trust-bundle` or
/// `--control-plane`.
pub fn not_ready(state: &State, now: SystemTime) -> Option<String> {
    let missing = match state.svid.borrow().as_deref() {
        None => "no certificate yet",
        Some(svid) if !svid.is_valid_at(now) => "the certificate has expired",
        Some(_) if state.snapshot.borrow().is_none() => {
            return Some("no discovery snapshot yet".to_string());
        }
        Some(_) => return None,
    };
    Some(match state.certify_failure.borrow().as_deref() {
        Some(failure) => format!("{missing}: the last Certify failed: {failure}"),
        None => missing.to_string(),
    })
}

#[derive(Serialize)]
struct ConfigView {
    identity: String,
    certificate: Option<CertificateView>,
    bundle_size: usize,
    snapshot_version: Option<u64>,
    /// The epoch `snapshot_version` was set in, as 16 hex digits (a
    /// string: JSON numbers do not hold every u64). A version names the
    /// snapshot's content only with it: after the control plane's database
    /// is restored from a backup, versions count again in another epoch.
    snapshot_version_epoch: Option<String>,
    /// The authorization policy in force (null before the first snapshot).
    policy: Option<PolicyView>,
    /// How many mesh endpoints the snapshot in force knows (null before
    /// the first snapshot).
    endpoints: Option<usize>,
    /// The services a call may be addressed to (null before the first
    /// snapshot): an operator checks here that a Service resolved.
    services: Option<ServicesView>,
    /// The revoked identities whose certificates this sidecar refuses as
    /// peers, by SPIFFE ID (null before the first snapshot).
    revocations: Option<Vec<RevocationView>>,
    close_denied_connections: bool,
    /// The ports never parsed as HTTP: the sidecar's own and, once a
    /// snapshot is in force, the mesh's.
    opaque_ports: Vec<u16>,
    access_log: bool,
    /// `TCP_USER_TIMEOUT` of the connections to and from beyond the pod,
    /// as `--tcp-user-timeout` takes it (`2m`; `0s`: none).
    tcp_user_timeout: String,
    /// HTTP/2 connections the inbound port serves at once from one peer
    /// and in all.
    max_h2_connections_per_peer: usize,
    max_h2_connections: usize,
    /// The admin paths of the app probes.
    app_probes: Vec<String>,
    control_plane: String,
    inbound: Vec<String>,
    advertise_addresses: Vec<String>,
    outbound: Vec<String>,
    app: String,
    admin: String,
    routes: Vec<RouteView>,
}

#[derive(Serialize)]
struct PolicyView {
    /// The snapshot version the policies in force came with.
    version: u64,
    default_policy: &'static str,
    /// `namespace/name` of each policy selecting this workload.
    policies: Vec<String>,
    /// Each rule with HTTP conditions on a port this sidecar declares
    /// opaque, and how it is enforced there instead (failing closed).
    opaque_fallbacks: Vec<String>,
}

/// At most this many services are listed in `/config`; the count says
/// how many there are. The page stays small in a cluster of thousands.
pub const SERVICES_SHOWN: usize = 100;

#[derive(Serialize)]
struct ServicesView {
    /// How many virtual addresses the snapshot has.
    count: usize,
    /// The first [`SERVICES_SHOWN`] of them, by name and address.
    shown: Vec<ServiceView>,
}

#[derive(Serialize)]
struct ServiceView {
    name: String,
    address: String,
    /// How many ready backends `address` has (0: calls are refused).
    backends: usize,
    /// How many of them are in the mesh: under outbound `deny`, the only
    /// ones calls go to (0: calls are refused).
    mesh_backends: usize,
    /// Every call from this pod goes to one backend (`sessionAffinity:
    /// ClientIP`) instead of each in turn.
    client_affinity: bool,
}

impl ServicesView {
    fn of(snapshot: &Snapshot) -> Self {
        let mut all: Vec<_> = snapshot.services.iter().collect();
        all.sort_unstable_by(|(a, sa), (b, sb)| (&sa.name, a).cmp(&(&sb.name, b)));
        ServicesView {
            count: all.len(),
            shown: all
                .into_iter()
                .take(SERVICES_SHOWN)
                .map(|(address, s)| ServiceView {
                    name: s.name.to_string(),
                    address: address.to_string(),
                    backends: s.backends().len(),
                    mesh_backends: s.mesh_backends().len(),
                    client_affinity: s.has_affinity(),
                })
                .collect(),
        }
    }
}

#[derive(Serialize)]
struct RevocationView {
    spiffe_id: String,
    /// Every certificate of `spiffe_id` issued then or before is refused.
    revoked_at_unix: i64,
    /// The same, as RFC 3339 ([`rfc3339`]).
    revoked_at: String,
}

impl RevocationView {
    fn all(revocations: &trellis_core::revocation::Revocations) -> Vec<Self> {
        let mut all: Vec<_> = revocations
            .iter()
            .map(|(id, at)| RevocationView {
                spiffe_id: id.to_string(),
                revoked_at_unix: at,
                revoked_at: rfc3339(at),
            })
            .collect();
        all.sort_unstable_by(|a, b| a.spiffe_id.cmp(&b.spiffe_id));
        all
    }
}

#[derive(Serialize)]
struct CertificateView {
    serial: String,
    /// The certificate's notBefore, in Unix seconds and as RFC 3339
    /// ([`rfc3339`]: `-` for a time it cannot write).
    not_before_unix: u64,
    not_before: String,
    /// Its notAfter, likewise.
    expires_at_unix: u64,
    expires_at: String,
}

impl CertificateView {
    fn of(svid: &Svid) -> Self {
        let (not_before, expires_at) = (svid.not_before_unix(), svid.expires_at_unix());
        CertificateView {
            serial: svid.serial.clone(),
            not_before_unix: not_before,
            not_before: rfc3339(not_before as i64),
            expires_at_unix: expires_at,
            expires_at: rfc3339(expires_at as i64),
        }
    }
}

#[derive(Serialize)]
struct RouteView {
    local: String,
    spiffe_id: String,
    remote: String,
}

fn config_view(state: &State) -> ConfigView {
    let c = &state.config;
    // One `Arc` taken out: no channel lock held while building the view.
    let snapshot = state.snapshot.borrow().clone();
    ConfigView {
        identity: c.identity.to_string(),
        certificate: state.svid.borrow().as_deref().map(CertificateView::of),
        bundle_size: state.bundle.borrow().len(),
        snapshot_version: snapshot.as_ref().map(|s| s.version),
        snapshot_version_epoch: snapshot
            .as_ref()
            .map(|s| format!("{:016x}", s.version_epoch)),
        policy: snapshot.as_ref().map(|s| PolicyView {
            version: s.policies.version,
            default_policy: s.policies.set.default_policy().as_str(),
            policies: s.policies.names().map(str::to_owned).collect(),
            opaque_fallbacks: (s.policies.opaque_fallbacks().iter())
                .map(ToString::to_string)
                .collect(),
        }),
        endpoints: snapshot.as_ref().map(|s| s.endpoints.len()),
        services: snapshot.as_deref().map(ServicesView::of),
        revocations: (snapshot.as_ref()).map(|s| RevocationView::all(&s.policies.revocations)),
        close_denied_connections: c.close_denied_connections,
        opaque_ports: snapshot.as_ref().map_or_else(
            || c.opaque_ports.clone(),
            |s| s.policies.opaque_ports().to_vec(),
        ),
        access_log: c.access_log,
        tcp_user_timeout: trellis_core::duration::flag_value(
            c.tcp_user_timeout.unwrap_or_default(),
        ),
        max_h2_connections_per_peer: c.max_h2_connections_per_peer,
        max_h2_connections: c.max_h2_connections,
        app_probes: c.app_probes.paths(),
        control_plane: c.control_plane.clone(),
        inbound: c.inbound.iter().map(|l| l.addr.to_string()).collect(),
        advertise_addresses: c
            .advertise_addresses
            .iter()
            .map(|a| a.to_string())
            .collect(),
        outbound: c.outbound.iter().map(|l| l.addr.to_string()).collect(),
        app: c.app.to_string(),
        admin: c.admin.to_string(),
        routes: c
            .routes
            .iter()
            .map(|r| RouteView {
                local: r.local.to_string(),
                spiffe_id: r.spiffe_id.to_string(),
                remote: r.remote.clone(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_core::SpiffeId;
    use trellis_proto::discovery::v1 as pb;

    /// How long ago the drain started is said in words, as its limits
    /// are, to the whole second.
    #[test]
    fn a_drain_is_said_in_words() {
        let since = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let draining = drain::Draining {
            since,
            elapsed: Duration::from_millis(185_400),
            open: 2,
        };
        assert_eq!(
            draining_reason(
                &draining,
                Duration::from_secs(1),
                Duration::from_secs(3_600)
            ),
            "draining since 2023-11-14T22:13:20Z (3 minutes 5 seconds ago): inbound refuses \
             new connections; the sidecar exits once no connection has been open for 1 second \
             (2 open now), or 1 hour after the drain started"
        );
    }

    #[test]
    fn config_lists_services_by_name_up_to_a_bound() {
        let service = |i: usize, backends: usize| pb::Service {
            address: format!("10.96.{}.{}:80", i / 250, i % 250 + 1),
            name: format!("shop/svc-{i:04}"),
            backends: (0..backends)
                .map(|b| format!("10.0.0.{}:8080", b + 1))
                .collect(),
            ..Default::default()
        };
        let mut services: Vec<pb::Service> = (0..SERVICES_SHOWN + 20)
            .rev()
            .map(|i| service(i, i % 3))
            .collect();
        services.push(pb::Service {
            address: "10.96.9.9:443".into(),
            client_affinity: true,
            ..service(0, 1)
        });
        let local = SpiffeId::parse("spiffe://td/ns/shop/sa/web").unwrap();
        // Only the pod 10.0.0.1 is in the mesh.
        let raw = pb::Snapshot {
            endpoints: vec![pb::Endpoint {
                address: "10.0.0.1:15006".into(),
                spiffe_id: "spiffe://td/ns/shop/sa/api".into(),
            }],
            services,
            ..Default::default()
        };
        let snapshot = Snapshot::compile(raw, &local, &Metrics::new()).unwrap();
        let view = serde_json::to_value(ServicesView::of(&snapshot)).unwrap();
        assert_eq!(view["count"], SERVICES_SHOWN + 21);
        let shown = view["shown"].as_array().unwrap();
        assert_eq!(shown.len(), SERVICES_SHOWN);
        // One name, two ports: both listed, by address.
        assert_eq!(
            shown[0],
            serde_json::json!({
                "name": "shop/svc-0000",
                "address": "10.96.0.1:80",
                "backends": 0,
                "mesh_backends": 0,
                "client_affinity": false,
            })
        );
        assert_eq!(
            shown[1],
            serde_json::json!({
                "name": "shop/svc-0000",
                "address": "10.96.9.9:443",
                "backends": 1,
                "mesh_backends": 1,
                "client_affinity": true,
            })
        );
        assert_eq!(shown[2]["name"], "shop/svc-0001");
        assert_eq!(shown[2]["backends"], 1);
        assert_eq!(shown[3]["name"], "shop/svc-0002");
        assert_eq!(shown[3]["backends"], 2);
        assert_eq!(shown[3]["mesh_backends"], 1, "10.0.0.2 is outside");
    }
}
