//! What the control plane says this sidecar must enforce: the last good
//! discovery [`Snapshot`], the [`Policies`] compiled from it, and the
//! decision on each inbound connection ([`authorize`]).
//!
//! `watch` keeps the Discovery stream open and publishes snapshots; this
//! file validates a snapshot (rejecting it whole if any part is invalid,
//! policies included), `authz` compiles and applies its policies and
//! `services` compiles its services.
//! Deciding must stay cheap and lock-free: a connection holds an
//! `Arc<Policies>` taken from a `watch::Receiver`.
//!
//! Where an outbound connection goes is read from the snapshot too: its
//! mesh endpoints ([`Snapshot::peer`]: address -> who is there, and the
//! SPIFFE ID expected) and its services ([`Snapshot::service_for`]: a
//! Kubernetes Service's cluster IP and port -> the backends behind it,
//! picked by [`Service::pick`]). Each backend's [`Peer`] is looked up once,
//! when the services are compiled against the endpoints of the same
//! snapshot. The endpoints and services travel together: a snapshot that
//! refers to the endpoints of a held version keeps that version's services
//! as well, and one that would pair services with endpoints they were not
//! sent with is refused. A snapshot that refers to a held version and
//! carries what changed since (`endpoint_changes`) makes those changes to
//! copies of that version's endpoints and services, and looks up every
//! backend's peer again against the endpoints that result.
//!
//! The snapshot's revocations (every revoked identity of the mesh, with
//! when) travel with the policies ([`Policies::revocations`]): the inbound
//! TLS configs' verifier refuses a caller they cover in a full handshake
//! and the inbound listener once any handshake is over ([`check_revoked`]),
//! the outbound
//! dial refuses such a peer ([`crate::tls::TlsState::revocations`]), and
//! an open connection either way is closed when new ones cover its peer
//! ([`closes_when`], which the inbound listener waits on for a deny too).

mod authz;
mod services;
pub mod watch;

pub use authz::{
    InvalidPolicies, OpaquePorts, Policies, admits_requests, audits_unless_http, authorize,
    authorize_request, count, count_audit, denies_unless_http,
};
pub use services::{Backend, Peer, Pick, Service, Services};

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use trellis_core::SpiffeId;
use trellis_core::revocation::Revocations;
use trellis_proto::discovery::v1 as pb;

use crate::metrics::Metrics;

/// Refuses `peer`, whose certificate began its validity at `not_before`
/// (Unix seconds), when a revocation in `policies` covers it: a caller
/// once its handshake is over, and an open connection's peer when new
/// policies arrive. With no policies yet, or nothing revoked, this is one
/// comparison: no lock, no allocation.
pub fn check_revoked(
    policies: Option<&Policies>,
    peer: &SpiffeId,
    not_before: i64,
) -> Result<(), trellis_core::revocation::Revoked> {
    policies.map_or(Ok(()), |p| p.revocations.check_issued(peer, not_before))
}

/// Waits for new policies in force for which `closes` says why an open
/// connection ends, and returns that; `closes` sees each new version once
/// (`None` before the first snapshot). Pends forever once the policies can
/// no longer change. The connection's only cost while nothing changes is
/// its place among the channel's waiters and one atomic load each time its
/// task wakes: the policies change only when what they enforce does
/// ([`Policies::same_as`]), not with the endpoints.
///
/// The future is polled beside the connection's copy, on every wake of its
/// task, but a wait on the channel polled again takes its waiters' lock.
/// So the wait is polled only once the channel holds a version it has not
/// seen; it stays registered with the task's waker meanwhile,
/// which is why the future must stay with the task that first polls it.
pub async fn closes_when<T>(
    policies: &mut tokio::sync::watch::Receiver<Option<Arc<Policies>>>,
    mut closes: impl FnMut(Option<Arc<Policies>>) -> Option<T>,
) -> T {
    let probe = policies.clone();
    let wait = async {
        loop {
            if policies.changed().await.is_err() {
                return std::future::pending().await;
            }
            let now = policies.borrow_and_update().clone();
            if let Some(closed) = closes(now) {
                return closed;
            }
        }
    };
    gated(probe, wait).await
}

/// `wait`, polled on its first poll and then only once `probe` sees a
/// version of its channel it has not (or the channel closed): between
/// those, a wake of the task costs one atomic load.
async fn gated<T, F: Future>(mut probe: tokio::sync::watch::Receiver<T>, wait: F) -> F::Output {
    let mut wait = std::pin::pin!(wait);
    let mut polled = false;
    std::future::poll_fn(|cx| {
        if polled && matches!(probe.has_changed(), Ok(false)) {
            return std::task::Poll::Pending;
        }
        polled = true;
        // Marked before `wait` looks, so a version sent while it does is
        // seen on the next wake.
        probe.mark_unchanged();
        wait.as_mut().poll(cx)
    })
    .await
}

/// What happens to an outbound connection whose destination is not a mesh
/// endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutboundPolicy {
    #[default]
    Deny,
    Passthrough,
}

/// A validated discovery snapshot.
#[derive(Debug)]
pub struct Snapshot {
    pub version: u64,
    /// The epoch the control plane set `version` in (0 for none): the
    /// version names this content only with it, and both are reported
    /// when the sidecar subscribes again.
    pub version_epoch: u64,
    /// DER roots; may be empty when the control plane sent none.
    pub trust_bundle: Vec<CertificateDer<'static>>,
    /// Mesh endpoints: sidecar inbound address -> its SPIFFE ID; shared
    /// with the snapshots after this one that leave them unchanged.
    pub endpoints: Arc<HashMap<SocketAddr, SpiffeId>>,
    /// Endpoint IPs that belong to exactly one identity (a pod address):
    /// a redirected connection to any port of that IP goes to that identity.
    endpoint_ips: Arc<HashMap<IpAddr, SpiffeId>>,
    /// Virtual addresses -> their backends, whose peers were looked up in
    /// `endpoints`; they come and are shared with the endpoints.
    pub services: Arc<Services>,
    pub outbound_policy: OutboundPolicy,
    /// The authorization policy: the mesh default and the policies that
    /// select this sidecar, compiled. Shared with the snapshots after this
    /// one for as long as they do not change it.
    pub policies: Arc<Policies>,
}

/// Why a snapshot was refused (sent back as the NACK reason).
#[derive(Debug, thiserror::Error)]
pub enum InvalidSnapshot {
    #[error("trust_bundle[{index}] is not a certificate: {reason}")]
    Bundle { index: usize, reason: String },
    #[error("trust_bundle cannot verify peers: {0}")]
    UnusableBundle(String),
    #[error("endpoints[{index}].address {address} is not ip:port")]
    EndpointAddress { index: usize, address: String },
    #[error("endpoints[{index}].spiffe_id {id:?}: {reason}")]
    EndpointId {
        index: usize,
        id: String,
        reason: trellis_core::spiffe::InvalidSpiffeId,
    },
    #[error("mesh.outbound_policy {0:?} is not \"deny\" or \"passthrough\"")]
    OutboundPolicy(String),
    #[error("mesh.opaque_ports: {0} is not a port number (1-65535)")]
    OpaquePort(u32),
    #[error(
        "endpoints_version {refers}: the endpoints of that version are not held here \
         (this sidecar holds {holds})"
    )]
    EndpointsNotHeld { refers: u64, holds: String },
    #[error("endpoints_version is set and endpoints are sent too: one or the other")]
    EndpointsTwice,
    #[error("services[{index}].address {address} is not a dialable ip:port")]
    ServiceAddress { index: usize, address: String },
    #[error("services[{index}] ({name}): backends[{backend}] {address} is not a dialable ip:port")]
    ServiceBackend {
        index: usize,
        name: String,
        backend: usize,
        address: String,
    },
    #[error("services[{index}].address {address} is given twice (also services[{first}])")]
    DuplicateService {
        index: usize,
        first: usize,
        address: SocketAddr,
    },
    #[error(
        "endpoints_version is set and services are sent too: they come with the endpoints, \
         one or the other"
    )]
    ServicesTwice,
    #[error("endpoint_changes without endpoints_version: changes to which endpoints?")]
    ChangesWithoutBase,
    #[error("{field}[{index}] {address} is not ip:port")]
    RemovedAddress {
        field: &'static str,
        index: usize,
        address: String,
    },
    #[error("endpoint_changes.{0}")]
    InChanges(Box<InvalidSnapshot>),
    #[error("revocations[{index}].spiffe_id {id:?}: {reason}")]
    RevocationId {
        index: usize,
        id: String,
        reason: trellis_core::spiffe::InvalidSpiffeId,
    },
    #[error(transparent)]
    Policies(#[from] InvalidPolicies),
}

impl Snapshot {
    /// Validates and compiles a snapshot as received by the sidecar `local`;
    /// `metrics` is where its policies' decisions will be counted.
    pub fn compile(
        raw: pb::Snapshot,
        local: &SpiffeId,
        metrics: &Metrics,
    ) -> Result<Self, InvalidSnapshot> {
        Self::compile_in(raw, None, local, &[], metrics)
    }

    /// [`compile`](Self::compile) for a sidecar whose `opaque_ports` are
    /// never parsed as HTTP; the mesh's opaque ports join them. Policies
    /// with L7 matches on the mesh's are refused (the control plane refuses
    /// them too); on the sidecar's own, which the control plane cannot
    /// know, they are enforced failing closed ([`Policies::opaque_fallbacks`]),
    /// so that one policy cannot stop every later snapshot. A snapshot whose
    /// `endpoints_version` is set takes its endpoints and services from
    /// `held`, which must be the snapshot of that version.
    pub fn compile_in(
        mut raw: pb::Snapshot,
        held: Option<&Snapshot>,
        local: &SpiffeId,
        opaque_ports: &[u16],
        metrics: &Metrics,
    ) -> Result<Self, InvalidSnapshot> {
        let changes = raw.endpoint_changes.take();
        let shared = match raw.endpoints_version {
            0 if changes.is_some() => return Err(InvalidSnapshot::ChangesWithoutBase),
            0 => None,
            _ if !raw.endpoints.is_empty() => return Err(InvalidSnapshot::EndpointsTwice),
            // A service's backends are judged against the endpoints sent
            // with it; held endpoints come with their own services.
            _ if !raw.services.is_empty() => return Err(InvalidSnapshot::ServicesTwice),
            refers => match held {
                Some(held) if held.version == refers => Some(match changes {
                    None => (
                        held.endpoints.clone(),
                        held.endpoint_ips.clone(),
                        held.services.clone(),
                    ),
                    Some(changes) => held
                        .changed(changes)
                        .map_err(|e| InvalidSnapshot::InChanges(Box::new(e)))?,
                }),
                _ => {
                    return Err(InvalidSnapshot::EndpointsNotHeld {
                        refers,
                        holds: held
                            .map_or("no snapshot".into(), |h| format!("version {}", h.version)),
                    });
                }
            },
        };
        let mut trust_bundle = Vec::with_capacity(raw.trust_bundle.len());
        for (index, der) in raw.trust_bundle.into_iter().enumerate() {
            if let Err(e) = x509_parser::parse_x509_certificate(&der) {
                return Err(InvalidSnapshot::Bundle {
                    index,
                    reason: e.to_string(),
                });
            }
            trust_bundle.push(CertificateDer::from(der));
        }
        // A bundle the verifiers cannot take (every root expired, a root
        // webpki refuses) is refused here, so the sidecar keeps the one it
        // holds and the control plane hears why.
        if !trust_bundle.is_empty() {
            trellis_core::tls::root_store(&trust_bundle).map_err(|e| {
                InvalidSnapshot::UnusableBundle(match e {
                    rustls::Error::General(reason) => reason,
                    other => other.to_string(),
                })
            })?;
        }
        let (endpoints, endpoint_ips, services) = match shared {
            Some(shared) => shared,
            None => {
                let endpoints = compile_endpoints(raw.endpoints)?;
                let endpoint_ips = pod_ips(&endpoints);
                let services =
                    services::compile(raw.services, |addr| peer(&endpoints, &endpoint_ips, addr))?;
                (
                    Arc::new(endpoints),
                    Arc::new(endpoint_ips),
                    Arc::new(services),
                )
            }
        };
        let mesh = raw.mesh.unwrap_or_default();
        let outbound_policy = match mesh.outbound_policy.as_str() {
            "" | "deny" => OutboundPolicy::Deny,
            "passthrough" => OutboundPolicy::Passthrough,
            other => return Err(InvalidSnapshot::OutboundPolicy(other.to_string())),
        };
        let mut opaque = OpaquePorts {
            own: opaque_ports.to_vec(),
            mesh: Vec::with_capacity(mesh.opaque_ports.len()),
        };
        for &port in &mesh.opaque_ports {
            let port = u16::try_from(port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or(InvalidSnapshot::OpaquePort(port))?;
            if !opaque.mesh.contains(&port) {
                opaque.mesh.push(port);
            }
        }
        let mut revoked = Vec::with_capacity(raw.revocations.len());
        for (index, r) in raw.revocations.into_iter().enumerate() {
            let id =
                SpiffeId::parse(&r.spiffe_id).map_err(|reason| InvalidSnapshot::RevocationId {
                    index,
                    id: r.spiffe_id.clone(),
                    reason,
                })?;
            revoked.push((id, r.revoked_at_unix));
        }
        let mut policies = Policies::compile_in(
            raw.version,
            local,
            mesh.default_policy,
            raw.policies,
            raw.rate_limits,
            &opaque,
            metrics,
        )?;
        policies.revocations = Arc::new(Revocations::new(revoked));
        Ok(Snapshot {
            version: raw.version,
            version_epoch: raw.version_epoch,
            trust_bundle,
            endpoints,
            endpoint_ips,
            services,
            outbound_policy,
            policies: Arc::new(policies),
        })
    }
}

impl Snapshot {
    /// The SPIFFE ID expected at `dst`: an exact endpoint, or else the one
    /// identity of the pod address `dst` belongs to.
    pub fn endpoint_for(&self, dst: SocketAddr) -> Option<&SpiffeId> {
        self.endpoints
            .get(&dst)
            .or_else(|| self.endpoint_ips.get(&dst.ip()))
    }

    /// Who is at `dst`, as [`endpoint_for`](Self::endpoint_for) finds it,
    /// and whether `dst` is the endpoint itself or another port of its pod.
    pub fn peer(&self, dst: SocketAddr) -> Peer {
        peer(&self.endpoints, &self.endpoint_ips, dst)
    }

    /// The service whose virtual address `dst` is.
    pub fn service_for(&self, dst: SocketAddr) -> Option<&Service> {
        self.services.get(&dst)
    }
}

/// The endpoints and services a snapshot shares with the ones after it.
type Shared = (
    Arc<HashMap<SocketAddr, SpiffeId>>,
    Arc<HashMap<IpAddr, SpiffeId>>,
    Arc<Services>,
);

impl Snapshot {
    /// This snapshot's endpoints and services with `changes` made: copies,
    /// so a refused change leaves this snapshot as it is. Every backend's
    /// peer is looked up again, against the endpoints that result.
    fn changed(&self, changes: pb::EndpointChanges) -> Result<Shared, InvalidSnapshot> {
        let mut endpoints = (*self.endpoints).clone();
        for (index, raw) in changes.removed_endpoints.iter().enumerate() {
            endpoints.remove(&removed_address("removed_endpoints", index, raw)?);
        }
        add_endpoints(&mut endpoints, changes.endpoints)?;
        let endpoint_ips = pod_ips(&endpoints);
        let lookup = |addr| peer(&endpoints, &endpoint_ips, addr);
        let mut gone = Vec::with_capacity(changes.removed_services.len());
        for (index, raw) in changes.removed_services.iter().enumerate() {
            gone.push(removed_address("removed_services", index, raw)?);
        }
        let added = services::compile(changes.services, lookup)?;
        let mut services: Services = self
            .services
            .iter()
            .filter(|(addr, _)| !gone.contains(addr) && !added.contains_key(addr))
            .map(|(addr, service)| (*addr, service.with_peers(lookup)))
            .collect();
        services.extend(added);
        Ok((
            Arc::new(endpoints),
            Arc::new(endpoint_ips),
            Arc::new(services),
        ))
    }
}

/// The address of something removed, from `field[index]`.
fn removed_address(
    field: &'static str,
    index: usize,
    raw: &str,
) -> Result<SocketAddr, InvalidSnapshot> {
    raw.parse().map_err(|_| InvalidSnapshot::RemovedAddress {
        field,
        index,
        address: services::quoted(raw),
    })
}

/// The endpoints of a snapshot that carries them, by address.
fn compile_endpoints(
    raw: Vec<pb::Endpoint>,
) -> Result<HashMap<SocketAddr, SpiffeId>, InvalidSnapshot> {
    let mut endpoints = HashMap::with_capacity(raw.len());
    add_endpoints(&mut endpoints, raw)?;
    Ok(endpoints)
}

/// Adds (or replaces, by address) each of `raw` to `endpoints`.
fn add_endpoints(
    endpoints: &mut HashMap<SocketAddr, SpiffeId>,
    raw: Vec<pb::Endpoint>,
) -> Result<(), InvalidSnapshot> {
    for (index, ep) in raw.into_iter().enumerate() {
        let address: SocketAddr =
            ep.address
                .parse()
                .map_err(|_| InvalidSnapshot::EndpointAddress {
                    index,
                    address: services::quoted(&ep.address),
                })?;
        let id = SpiffeId::parse(&ep.spiffe_id).map_err(|reason| InvalidSnapshot::EndpointId {
            index,
            id: ep.spiffe_id.clone(),
            reason,
        })?;
        endpoints.insert(address, id);
    }
    Ok(())
}

/// Who is at `dst` among `endpoints` and their `pod_ips`.
fn peer(
    endpoints: &HashMap<SocketAddr, SpiffeId>,
    pod_ips: &HashMap<IpAddr, SpiffeId>,
    dst: SocketAddr,
) -> Peer {
    match endpoints.get(&dst) {
        Some(id) => Peer::Endpoint(id.clone()),
        None => pod_ips
            .get(&dst.ip())
            .map_or(Peer::Outside, |id| Peer::Pod(id.clone())),
    }
}

/// Non-loopback endpoint IPs held by exactly one identity.
fn pod_ips(endpoints: &HashMap<SocketAddr, SpiffeId>) -> HashMap<IpAddr, SpiffeId> {
    let mut ips: HashMap<IpAddr, Option<SpiffeId>> = HashMap::new();
    for (addr, id) in endpoints {
        if addr.ip().is_loopback() || addr.ip().is_unspecified() {
            continue;
        }
        ips.entry(addr.ip())
            .and_modify(|held| {
                if held.as_ref() != Some(id) {
                    *held = None;
                }
            })
            .or_insert_with(|| Some(id.clone()));
    }
    ips.into_iter()
        .filter_map(|(ip, id)| Some((ip, id?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection's wait for new policies is polled on its first poll and
    /// then only when the channel has a version it has not seen: the wakes
    /// its copy causes cost no lock (a wait on the channel polled again
    /// takes the channel's waiters' lock).
    #[test]
    fn the_wait_for_new_policies_is_polled_only_when_they_change() {
        let (tx, rx) = tokio::sync::watch::channel(0u32);
        let polls = std::cell::Cell::new(0);
        let wait = std::future::poll_fn(|_| {
            polls.set(polls.get() + 1);
            std::task::Poll::<()>::Pending
        });
        let mut gated = std::pin::pin!(gated(rx, wait));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        for _ in 0..5 {
            assert!(gated.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(polls.get(), 1, "polled again while nothing changed");
        tx.send(1).unwrap();
        for _ in 0..5 {
            assert!(gated.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(polls.get(), 2, "polled once for the one change");
    }

    fn compile(raw: pb::Snapshot) -> Result<Snapshot, InvalidSnapshot> {
        let local = SpiffeId::parse("spiffe://td/ns/a/sa/web").unwrap();
        Snapshot::compile(raw, &local, &Metrics::new())
    }

    fn endpoint(address: &str, id: &str) -> pb::Endpoint {
        pb::Endpoint {
            address: address.into(),
            spiffe_id: id.into(),
        }
    }

    #[test]
    fn compiles_endpoints_and_mesh_config() {
        let s = compile(pb::Snapshot {
            version: 7,
            endpoints: vec![endpoint("10.0.0.1:15006", "spiffe://td/ns/a/sa/b")],
            mesh: Some(pb::MeshConfig {
                default_policy: "deny".into(),
                outbound_policy: "passthrough".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.version, 7);
        assert_eq!(
            s.endpoints[&"10.0.0.1:15006".parse().unwrap()].as_str(),
            "spiffe://td/ns/a/sa/b"
        );
        assert_eq!(s.outbound_policy, OutboundPolicy::Passthrough);
        // The pod address reaches the same identity on any port.
        let app_port = s.endpoint_for("10.0.0.1:8080".parse().unwrap()).unwrap();
        assert_eq!(app_port.as_str(), "spiffe://td/ns/a/sa/b");
        assert!(s.endpoint_for("10.0.0.2:8080".parse().unwrap()).is_none());
        let s = compile(pb::Snapshot::default()).unwrap();
        assert_eq!(s.outbound_policy, OutboundPolicy::Deny);
    }

    /// A snapshot that names the version its endpoints come from takes
    /// them from the snapshot held, shared; one that names a version not
    /// held, or sends endpoints as well, is refused with what was wrong.
    #[test]
    fn endpoints_of_a_held_version_are_kept() {
        let local = SpiffeId::parse("spiffe://td/ns/a/sa/web").unwrap();
        let metrics = Metrics::new();
        let held = compile(pb::Snapshot {
            version: 7,
            endpoints: vec![endpoint("10.0.0.1:15006", "spiffe://td/ns/a/sa/b")],
            ..Default::default()
        })
        .unwrap();
        let next = |endpoints_version, endpoints| pb::Snapshot {
            version: 9,
            endpoints,
            endpoints_version,
            mesh: Some(pb::MeshConfig {
                outbound_policy: "passthrough".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let s = Snapshot::compile_in(next(7, vec![]), Some(&held), &local, &[], &metrics).unwrap();
        assert_eq!(s.version, 9);
        assert_eq!(s.outbound_policy, OutboundPolicy::Passthrough);
        assert!(
            Arc::ptr_eq(&s.endpoints, &held.endpoints),
            "shared, not copied"
        );
        let pod = s.endpoint_for("10.0.0.1:8080".parse().unwrap()).unwrap();
        assert_eq!(pod.as_str(), "spiffe://td/ns/a/sa/b");

        let e = Snapshot::compile_in(next(6, vec![]), Some(&held), &local, &[], &metrics)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "endpoints_version 6: the endpoints of that version are not held here \
             (this sidecar holds version 7)"
        );
        let e = Snapshot::compile_in(next(7, vec![]), None, &local, &[], &metrics)
            .unwrap_err()
            .to_string();
        assert!(e.ends_with("(this sidecar holds no snapshot)"), "{e}");
        let both = next(7, vec![endpoint("10.0.0.2:15006", "spiffe://td/ns/a/sa/c")]);
        let e = Snapshot::compile_in(both, Some(&held), &local, &[], &metrics)
            .unwrap_err()
            .to_string();
        assert!(e.contains("one or the other"), "{e}");
    }

    /// A snapshot that names a held version and carries what changed
    /// since makes those changes to copies of that version's endpoints and
    /// services: endpoints join, move and leave, services appear, change
    /// and go, and every backend's peer is looked up again against the
    /// endpoints that result. Bad changes are refused naming the field,
    /// and the held snapshot is left as it was.
    #[test]
    fn endpoint_changes_are_made_to_the_held_version() {
        let local = SpiffeId::parse("spiffe://td/ns/a/sa/web").unwrap();
        let metrics = Metrics::new();
        let (b, c) = ("spiffe://td/ns/a/sa/b", "spiffe://td/ns/a/sa/c");
        let held = compile(pb::Snapshot {
            version: 7,
            endpoints: vec![
                endpoint("10.0.0.1:15006", b),
                endpoint("10.0.0.2:15006", "spiffe://td/ns/a/sa/gone"),
            ],
            services: vec![
                service(
                    "10.96.0.1:80",
                    "a/front",
                    &["10.0.0.1:8080", "10.0.0.3:8080"],
                ),
                service("10.96.0.2:80", "a/old", &["10.0.0.2:8080"]),
                service("10.96.0.3:80", "a/kept", &["10.0.0.2:8080"]),
            ],
            ..Default::default()
        })
        .unwrap();
        let next = |changes| pb::Snapshot {
            version: 9,
            endpoints_version: 7,
            endpoint_changes: Some(changes),
            ..Default::default()
        };
        let changes = pb::EndpointChanges {
            endpoints: vec![endpoint("10.0.0.3:15006", c)],
            removed_endpoints: vec!["10.0.0.2:15006".into()],
            services: vec![service("10.96.0.4:80", "a/new", &["10.0.0.1:8080"])],
            removed_services: vec!["10.96.0.2:80".into()],
        };
        let s = Snapshot::compile_in(next(changes), Some(&held), &local, &[], &metrics).unwrap();
        let addr = |a: &str| a.parse::<SocketAddr>().unwrap();
        let mut endpoints: Vec<_> = s
            .endpoints
            .iter()
            .map(|(a, id)| (*a, id.as_str()))
            .collect();
        endpoints.sort();
        assert_eq!(
            endpoints,
            [(addr("10.0.0.1:15006"), b), (addr("10.0.0.3:15006"), c)]
        );
        let peers = |service: &str| {
            s.service_for(addr(service))
                .unwrap_or_else(|| panic!("no service at {service}"))
                .backends()
                .iter()
                .map(|backend| (backend.addr, backend.peer.id().map(SpiffeId::as_str)))
                .collect::<Vec<_>>()
        };
        // 10.0.0.3 joined the mesh: the front service's backend there is
        // now known as c.
        assert_eq!(
            peers("10.96.0.1:80"),
            [
                (addr("10.0.0.1:8080"), Some(b)),
                (addr("10.0.0.3:8080"), Some(c))
            ]
        );
        // 10.0.0.2 left it: a service kept as it was now finds no one there.
        assert_eq!(peers("10.96.0.3:80"), [(addr("10.0.0.2:8080"), None)]);
        assert_eq!(peers("10.96.0.4:80"), [(addr("10.0.0.1:8080"), Some(b))]);
        assert!(s.service_for(addr("10.96.0.2:80")).is_none());
        assert_eq!(held.endpoints.len(), 2, "the held snapshot is unchanged");
        assert!(held.service_for(addr("10.96.0.2:80")).is_some());

        let refused = |changes| {
            Snapshot::compile_in(next(changes), Some(&held), &local, &[], &metrics)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            refused(pb::EndpointChanges {
                removed_endpoints: vec!["nowhere".into()],
                ..Default::default()
            }),
            "endpoint_changes.removed_endpoints[0] \"nowhere\" is not ip:port"
        );
        assert_eq!(
            refused(pb::EndpointChanges {
                endpoints: vec![endpoint("10.0.0.9:15006", "http://x")],
                ..Default::default()
            })
            .split(':')
            .next(),
            Some("endpoint_changes.endpoints[0].spiffe_id \"http")
        );
        assert!(
            refused(pb::EndpointChanges {
                services: vec![service("10.96.0.9:0", "a/x", &[])],
                ..Default::default()
            })
            .starts_with("endpoint_changes.services[0].address"),
        );
        let without_base = pb::Snapshot {
            endpoints_version: 0,
            ..next(pb::EndpointChanges::default())
        };
        let e = compile(without_base).unwrap_err().to_string();
        assert!(
            e.starts_with("endpoint_changes without endpoints_version"),
            "{e}"
        );
    }

    fn service(address: &str, name: &str, backends: &[&str]) -> pb::Service {
        pb::Service {
            address: address.into(),
            name: name.into(),
            backends: backends.iter().map(|b| b.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn rejects_invalid_snapshots_with_the_field() {
        let bad = |s: pb::Snapshot| compile(s).unwrap_err().to_string();
        let e = bad(pb::Snapshot {
            endpoints: vec![endpoint("nowhere", "spiffe://td/x")],
            ..Default::default()
        });
        assert!(e.contains("endpoints[0].address"), "{e}");
        let e = bad(pb::Snapshot {
            endpoints: vec![endpoint("1.2.3.4:5", "http://x")],
            ..Default::default()
        });
        assert!(e.contains("endpoints[0].spiffe_id"), "{e}");
        let e = bad(pb::Snapshot {
            trust_bundle: vec![b"junk".to_vec()],
            ..Default::default()
        });
        assert!(e.contains("trust_bundle[0]"), "{e}");
        let mut expired = rcgen::CertificateParams::default();
        expired.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        expired.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(30);
        expired.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let e = bad(pb::Snapshot {
            trust_bundle: vec![expired.self_signed(&key).unwrap().der().to_vec()],
            ..Default::default()
        });
        assert!(
            e.starts_with(
                "trust_bundle cannot verify peers: every root of the trust bundle has expired"
            ),
            "{e}"
        );
        let e = bad(pb::Snapshot {
            mesh: Some(pb::MeshConfig {
                outbound_policy: "maybe".into(),
                ..Default::default()
            }),
            ..Default::default()
        });
        assert!(e.contains("outbound_policy"), "{e}");
        let e = bad(pb::Snapshot {
            services: vec![service("10.96.0.10:80", "shop/api", &["pod-a:8080"])],
            ..Default::default()
        });
        assert_eq!(
            e,
            "services[0] (\"shop/api\"): backends[0] \"pod-a:8080\" is not a dialable ip:port"
        );
        let e = bad(pb::Snapshot {
            services: vec![
                service("10.96.0.10:80", "shop/api", &[]),
                service("10.96.0.10:80", "shop/web", &[]),
            ],
            ..Default::default()
        });
        assert!(e.contains("10.96.0.10:80 is given twice"), "{e}");
    }

    fn policy(yaml: &str) -> trellis_proto::policy::v1::Policy {
        let td = trellis_core::TrustDomain::new("td").unwrap();
        let loaded = trellis_core::policy::load_source("test.yaml", yaml, &td);
        assert!(!loaded.has_errors(), "{:?}", loaded.diagnostics);
        loaded.policies[0].policy.to_proto()
    }

    const WEB_TO_API: &str = "
apiVersion: trellis.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: web-in, namespace: a}
spec:
  selector: {spiffeIds: [\"spiffe://td/ns/a/sa/web\"]}
  action: ALLOW
  rules:
    - from: [{spiffeId: spiffe://td/ns/a/sa/client}]
      to: [{ports: [8080]}]
";

    #[test]
    fn mesh_opaque_ports_join_the_sidecars_own() {
        let local = SpiffeId::parse("spiffe://td/ns/a/sa/web").unwrap();
        let raw = |ports: Vec<u32>, policies| pb::Snapshot {
            mesh: Some(pb::MeshConfig {
                opaque_ports: ports,
                ..Default::default()
            }),
            policies,
            ..Default::default()
        };
        let s = Snapshot::compile_in(
            raw(vec![5432], vec![]),
            None,
            &local,
            &[25],
            &Metrics::new(),
        )
        .unwrap();
        assert!(s.policies.is_opaque(5432) && s.policies.is_opaque(25));
        assert!(!s.policies.is_opaque(8080));

        let l7 = WEB_TO_API.replace("{ports: [8080]}", "{ports: [5432], paths: [/x]}");
        let e = Snapshot::compile_in(
            raw(vec![5432], vec![policy(&l7)]),
            None,
            &local,
            &[],
            &Metrics::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("port 5432 is declared opaque"), "{e}");
        let e = Snapshot::compile_in(raw(vec![0], vec![]), None, &local, &[], &Metrics::new())
            .unwrap_err()
            .to_string();
        assert_eq!(e, "mesh.opaque_ports: 0 is not a port number (1-65535)");
    }

    /// L7 rules on a port this sidecar alone declares opaque, which the
    /// control plane cannot refuse, do not make it refuse the snapshot:
    /// they fail closed on that port, and the rest applies as sent.
    #[test]
    fn l7_rules_on_the_sidecars_own_opaque_port_fail_closed() {
        let local = SpiffeId::parse("spiffe://td/ns/a/sa/web").unwrap();
        let deny = WEB_TO_API
            .replace("web-in", "no-admin")
            .replace("ALLOW", "DENY")
            .replace("{ports: [8080]}", "{ports: [5432, 8080], paths: [/admin]}");
        let raw = pb::Snapshot {
            version: 4,
            policies: vec![policy(WEB_TO_API), policy(&deny)],
            ..Default::default()
        };
        let s = Snapshot::compile_in(raw, None, &local, &[5432], &Metrics::new()).unwrap();
        let client = SpiffeId::parse("spiffe://td/ns/a/sa/client").unwrap();
        let denied = authorize(Some(&s.policies), &client, 5432);
        assert_eq!(denied.to_string(), "deny by a/no-admin rule 0");
        let allowed = authorize(Some(&s.policies), &client, 8080);
        assert_eq!(allowed.to_string(), "allow by a/web-in rule 0");
        let fallbacks = s.policies.opaque_fallbacks();
        assert_eq!(fallbacks.len(), 1);
        assert_eq!(fallbacks[0].rule.to_string(), "a/no-admin rule 0");
        assert_eq!(fallbacks[0].ports, [5432]);
        assert!(s.policies.is_opaque(5432));
    }

    /// A DENY rule's HTTP conditions naming no ports cannot be checked on
    /// any opaque port, the mesh's or the sidecar's own: there it denies
    /// the whole connection from its sources, reported once per rule.
    #[test]
    fn l7_rules_naming_no_ports_fail_closed_on_every_opaque_port() {
        let local = SpiffeId::parse("spiffe://td/ns/a/sa/web").unwrap();
        let deny = WEB_TO_API
            .replace("web-in", "no-admin")
            .replace("ALLOW", "DENY")
            .replace("{ports: [8080]}", "{paths: [/admin]}");
        let raw = pb::Snapshot {
            version: 4,
            mesh: Some(pb::MeshConfig {
                default_policy: "allow-mesh".into(),
                opaque_ports: vec![6379],
                ..Default::default()
            }),
            policies: vec![policy(&deny)],
            ..Default::default()
        };
        let s = Snapshot::compile_in(raw, None, &local, &[5432], &Metrics::new()).unwrap();
        let client = SpiffeId::parse("spiffe://td/ns/a/sa/client").unwrap();
        for port in [5432, 6379] {
            let denied = authorize(Some(&s.policies), &client, port);
            assert_eq!(denied.to_string(), "deny by a/no-admin rule 0", "{port}");
        }
        let on_http = authorize(Some(&s.policies), &client, 8080);
        assert_eq!(on_http.to_string(), "allow by default:allow-mesh");
        let fallbacks = s.policies.opaque_fallbacks();
        assert_eq!(fallbacks.len(), 1);
        assert_eq!(fallbacks[0].rule.to_string(), "a/no-admin rule 0");
        assert_eq!(fallbacks[0].ports, [5432, 6379]);
    }

    #[test]
    fn rejects_invalid_policies_and_unknown_defaults() {
        let mesh = |default: &str| {
            Some(pb::MeshConfig {
                default_policy: default.into(),
                ..Default::default()
            })
        };
        let e = compile(pb::Snapshot {
            mesh: mesh("open"),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("mesh.default_policy: unknown default policy \"open\""),
            "{e}"
        );
        let mut invalid = policy(WEB_TO_API);
        invalid.rules[0].to[0].ports = vec![70000];
        let e = compile(pb::Snapshot {
            policies: vec![invalid],
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("policies: policy a/web-in is invalid"), "{e}");
        assert!(e.contains("70000"), "{e}");
    }

    #[test]
    fn decides_and_counts_by_policy() {
        let metrics = Metrics::new();
        let local = SpiffeId::parse("spiffe://td/ns/a/sa/web").unwrap();
        let s = Snapshot::compile(
            pb::Snapshot {
                version: 3,
                policies: vec![policy(WEB_TO_API)],
                ..Default::default()
            },
            &local,
            &metrics,
        )
        .unwrap();
        let client = SpiffeId::parse("spiffe://td/ns/a/sa/client").unwrap();
        let other = SpiffeId::parse("spiffe://td/ns/a/sa/other").unwrap();
        let allowed = authorize(Some(&s.policies), &client, 8080);
        assert_eq!(allowed.to_string(), "allow by a/web-in rule 0");
        let denied = authorize(Some(&s.policies), &other, 8080);
        assert_eq!(denied.to_string(), "deny by default:deny");
        for d in [&allowed, &allowed, &denied] {
            count(Some(&s.policies), d, &metrics);
        }
        let text = metrics.encode();
        for line in [
            "trellis_decisions_total{action=\"allow\",policy=\"a/web-in\"} 2",
            "trellis_decisions_total{action=\"deny\",policy=\"default:deny\"} 1",
            "trellis_decisions_total{action=\"allow\",policy=\"default:deny\"} 0",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        assert_eq!(s.policies.names().collect::<Vec<_>>(), ["a/web-in"]);
    }

    #[test]
    fn denies_everything_before_the_first_snapshot() {
        let metrics = Metrics::new();
        let peer = SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap();
        let decision = authorize(None, &peer, 8080);
        assert!(!decision.is_allowed());
        assert_eq!(decision.policy_label(), "default:no-snapshot");
        assert_eq!(decision.to_string(), "deny by default:no-snapshot");
        count(None, &decision, &metrics);
        let text = metrics.encode();
        assert!(
            text.contains(
                "trellis_decisions_total{action=\"deny\",policy=\"default:no-snapshot\"} 1"
            ),
            "{text}"
        );
        assert!(!text.contains("policy=\"default:deny\""), "{text}");
    }

    #[test]
    fn tells_unchanged_policies_apart_from_new_versions() {
        let a = compile(pb::Snapshot {
            version: 1,
            policies: vec![policy(WEB_TO_API)],
            ..Default::default()
        })
        .unwrap();
        let b = compile(pb::Snapshot {
            version: 2,
            policies: vec![policy(WEB_TO_API)],
            ..Default::default()
        })
        .unwrap();
        let c = compile(pb::Snapshot {
            version: 3,
            ..Default::default()
        })
        .unwrap();
        assert!(a.policies.same_as(&b.policies));
        assert!(!a.policies.same_as(&c.policies));
    }
}
