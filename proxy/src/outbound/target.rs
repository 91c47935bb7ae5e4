//! Where a redirected outbound connection goes, decided from the snapshot
//! and the proxy's own addresses alone: no socket, no I/O, so every case is
//! a unit test (the listener that acts on it needs iptables).
//!
//! A call to a service's virtual address is resolved to one backend
//! ([`Service::pick`](crate::policy::Service::pick): a mesh backend under
//! outbound `deny`, any under `passthrough`), whose identity was looked up
//! when the snapshot was compiled; the backend is then judged as a direct
//! destination is, with its port or the virtual address's marking the
//! connection opaque. A destination that is one of the proxy's own
//! listeners is always a loop, and an address of this pod that is no
//! endpoint's inbound always stays inside the pod, whatever the endpoints
//! say about it.
//!
//! A call whose connection to its backend could not be made is offered
//! another backend by [`retry`]: the next untried candidate
//! ([`Service::retry`](crate::policy::Service::retry)) in the snapshot in
//! force then, judged the same way; one that would be refused (a loop) is
//! passed over.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use trellis_core::SpiffeId;

use crate::policy::{Backend, OutboundPolicy, Peer, Pick, Snapshot};

/// Whether `dst` is one of the proxy's own listeners. An IPv4 address
/// written IPv4-mapped (`::ffff:127.0.0.1`) is taken as the IPv4 address
/// it maps: it is the same destination.
fn is_own(own: &[SocketAddr], dst: SocketAddr) -> bool {
    let ip = dst.ip().to_canonical();
    own.iter()
        .any(|a| a.port() == dst.port() && (a.ip().to_canonical() == ip || ip.is_loopback()))
}

/// Whether `ip` is an address of this pod: one the proxy listens on or
/// advertises, other than loopback or unspecified ones (IPv4-mapped
/// addresses taken as the IPv4 address they map).
fn is_own_ip(own: &[SocketAddr], ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    !ip.is_loopback() && !ip.is_unspecified() && own.iter().any(|a| a.ip().to_canonical() == ip)
}

/// Where a redirected connection goes, as [`resolve`] decides it.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Resolved {
    /// The service whose virtual address the app dialled, if it did; then
    /// the address of `target` is the backend picked.
    pub service: Option<Arc<str>>,
    /// How many backends of that service a call may go to under the
    /// outbound policy (0 for a destination that is no service's).
    pub candidates: usize,
    /// Whether the port the app dialled is declared opaque (never before
    /// the first snapshot): a refusal of the call is then only a closed
    /// connection, the app's bytes never looked at.
    pub opaque: bool,
    pub target: Target,
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum Target {
    /// One of the proxy's own listeners: refused, it would loop.
    Loop(SocketAddr),
    /// A service with no ready backend: refused.
    NoBackend,
    /// A service whose ready backends are all outside the mesh, under
    /// outbound `deny`: refused. `backends` is how many there are.
    NoMeshBackend { backends: usize },
    /// A mesh endpoint: mTLS to `addr`, the server must present `id`.
    /// `opaque` here and below: the port of `addr`, or of the address the
    /// app dialled, is declared opaque, so the connection is never parsed
    /// as HTTP, not even to answer a refusal.
    Mesh {
        addr: SocketAddr,
        id: SpiffeId,
        opaque: bool,
    },
    /// An address of this pod that is no endpoint's inbound: plain TCP,
    /// which never leaves the pod (the app's own call to it would not be
    /// redirected at all).
    SamePod { addr: SocketAddr, opaque: bool },
    /// Outside the mesh: refused or plain TCP, as `policy` says.
    Outside {
        addr: SocketAddr,
        policy: OutboundPolicy,
        opaque: bool,
    },
}

impl Target {
    /// The address a connection is made to (mTLS or plain TCP), `None`
    /// when the call is refused.
    pub(super) fn dialled(&self) -> Option<SocketAddr> {
        match self {
            Target::Mesh { addr, .. }
            | Target::SamePod { addr, .. }
            | Target::Outside {
                addr,
                policy: OutboundPolicy::Passthrough,
                ..
            } => Some(*addr),
            Target::Loop(_)
            | Target::NoBackend
            | Target::NoMeshBackend { .. }
            | Target::Outside {
                policy: OutboundPolicy::Deny,
                ..
            } => None,
        }
    }
}

/// Decides where a connection redirected from `dst` goes, from the snapshot
/// (`None` before the first: nothing is in the mesh, outbound `deny`) and
/// the proxy's own addresses. A service's virtual address is replaced by
/// the backend picked, which is then judged as any destination is.
pub(super) fn resolve(
    own: &[SocketAddr],
    snapshot: Option<&Snapshot>,
    dst: SocketAddr,
) -> Resolved {
    let opaque = snapshot.is_some_and(|s| s.policies.is_opaque(dst.port()));
    let direct = |target| Resolved {
        service: None,
        candidates: 0,
        opaque,
        target,
    };
    if is_own(own, dst) {
        return direct(Target::Loop(dst));
    }
    let Some(snapshot) = snapshot else {
        return direct(Target::Outside {
            addr: dst,
            policy: OutboundPolicy::default(),
            opaque,
        });
    };
    let Some(service) = snapshot.service_for(dst) else {
        return direct(destination(own, snapshot, dst, &snapshot.peer(dst), opaque));
    };
    let target = match service.pick(snapshot.outbound_policy) {
        Pick::Backend(backend) => destination(own, snapshot, backend.addr, &backend.peer, opaque),
        Pick::NoBackend => Target::NoBackend,
        // None of them would be allowed out, but one that is this pod
        // itself (its own endpoint not known yet, or its address shared
        // by several identities) never leaves it.
        Pick::NoMeshBackend(outside) => {
            match outside.iter().find(|b| is_own_ip(own, b.addr.ip())) {
                Some(Backend { addr, peer }) => destination(own, snapshot, *addr, peer, opaque),
                None => Target::NoMeshBackend {
                    backends: outside.len(),
                },
            }
        }
    };
    Resolved {
        service: Some(service.name.clone()),
        candidates: service.candidates(snapshot.outbound_policy).len(),
        opaque,
        target,
    }
}

/// Where another attempt at a call to the service at `dst` goes, once
/// connecting to each of `tried` (its backends so far) failed: the first
/// of the service's remaining candidates that a connection is made to,
/// judged as [`resolve`] judges a backend, in `snapshot`, the one in force
/// now (the backends may have changed since the first pick). `None` when
/// there is none: the service is gone, every candidate was tried, or the
/// rest would be refused.
pub(super) fn retry(
    own: &[SocketAddr],
    snapshot: Option<&Snapshot>,
    dst: SocketAddr,
    tried: &[SocketAddr],
) -> Option<Target> {
    let snapshot = snapshot?;
    let service = snapshot.service_for(dst)?;
    let opaque = snapshot.policies.is_opaque(dst.port());
    service
        .retry(snapshot.outbound_policy, tried)
        .map(|b| destination(own, snapshot, b.addr, &b.peer, opaque))
        .find(|target| target.dialled().is_some())
}

/// What `addr` is, `peer` being who the endpoints say is there;
/// `dst_opaque` is whether the port the app dialled (`addr` itself, or the
/// service's virtual address whose backend `addr` is) is declared opaque:
/// the connection is opaque if either port is.
fn destination(
    own: &[SocketAddr],
    snapshot: &Snapshot,
    addr: SocketAddr,
    peer: &Peer,
    dst_opaque: bool,
) -> Target {
    if is_own(own, addr) {
        return Target::Loop(addr);
    }
    // Another sidecar's inbound on an address this pod shares (several
    // sidecars on one host) is still a mesh peer; any other port of this
    // pod's address is the pod itself, whose one identity is this one.
    let opaque = dst_opaque || snapshot.policies.is_opaque(addr.port());
    if is_own_ip(own, addr.ip()) && !matches!(peer, Peer::Endpoint(_)) {
        return Target::SamePod { addr, opaque };
    }
    match peer.id() {
        Some(id) => Target::Mesh {
            addr,
            id: id.clone(),
            opaque,
        },
        None => Target::Outside {
            addr,
            policy: snapshot.outbound_policy,
            opaque,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_proto::discovery::v1 as pb;

    use crate::metrics::Metrics;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// This pod: 10.0.0.5, its inbound on every address, its outbound on
    /// loopback, as a pod's sidecar listens.
    fn own() -> Vec<SocketAddr> {
        ["0.0.0.0:15006", "127.0.0.1:15001", "10.0.0.5:15006"]
            .iter()
            .map(|a| addr(a))
            .collect()
    }

    /// A snapshot whose mesh has the pods 10.0.0.1 and 10.0.0.2 (api),
    /// 10.0.0.5 (this one, web) and, on 10.0.0.5:16006, another sidecar
    /// sharing the address; the service shop/api (10.96.0.10:80) stands
    /// for `backends`. Port 5432 is opaque.
    fn snapshot(outbound_policy: &str, backends: &[&str]) -> Snapshot {
        snapshot_of(outbound_policy, vec![api_service(VIP, backends)])
    }

    fn api_service(address: &str, backends: &[&str]) -> pb::Service {
        pb::Service {
            address: address.into(),
            name: "shop/api".into(),
            backends: backends.iter().map(|b| b.to_string()).collect(),
            ..Default::default()
        }
    }

    /// The mesh of [`snapshot`] with `services`.
    fn snapshot_of(outbound_policy: &str, services: Vec<pb::Service>) -> Snapshot {
        let endpoint = |address: &str, id: &str| pb::Endpoint {
            address: address.into(),
            spiffe_id: id.into(),
        };
        let raw = pb::Snapshot {
            version: 1,
            endpoints: vec![
                endpoint("10.0.0.1:15006", "spiffe://td/ns/shop/sa/api"),
                endpoint("10.0.0.2:15006", "spiffe://td/ns/shop/sa/api"),
                endpoint("10.0.0.5:15006", "spiffe://td/ns/shop/sa/web"),
                endpoint("10.0.0.5:16006", "spiffe://td/ns/shop/sa/other"),
            ],
            services,
            mesh: Some(pb::MeshConfig {
                outbound_policy: outbound_policy.into(),
                opaque_ports: vec![5432],
                ..Default::default()
            }),
            ..Default::default()
        };
        let local = SpiffeId::parse("spiffe://td/ns/shop/sa/web").unwrap();
        Snapshot::compile(raw, &local, &Metrics::new()).unwrap()
    }

    fn api() -> SpiffeId {
        SpiffeId::parse("spiffe://td/ns/shop/sa/api").unwrap()
    }

    /// A call to `shop/api`, which has `candidates` backends to go to.
    fn via_service(candidates: usize, target: Target) -> Resolved {
        Resolved {
            service: Some("shop/api".into()),
            candidates,
            opaque: false,
            target,
        }
    }

    const VIP: &str = "10.96.0.10:80";

    #[test]
    fn a_service_call_goes_to_its_backends_in_turn_over_mtls() {
        let s = snapshot("deny", &["10.0.0.1:8080", "10.0.0.1:5432"]);
        let mut seen: Vec<Resolved> = (0..4)
            .map(|_| resolve(&own(), Some(&s), addr(VIP)))
            .collect();
        let mesh = |a: &str, opaque| {
            via_service(
                2,
                Target::Mesh {
                    addr: addr(a),
                    id: api(),
                    opaque,
                },
            )
        };
        // The round robin starts anywhere; then it alternates.
        assert_eq!(seen[0], seen[2]);
        assert_eq!(seen[1], seen[3]);
        seen.truncate(2);
        seen.sort_by_key(|r| match r.target {
            Target::Mesh { addr, .. } => addr,
            _ => panic!("not a mesh target: {r:?}"),
        });
        // A backend on an opaque port is opaque.
        assert_eq!(
            seen,
            [mesh("10.0.0.1:5432", true), mesh("10.0.0.1:8080", false)]
        );
    }

    #[test]
    fn a_service_without_a_ready_backend_is_refused() {
        let s = snapshot("passthrough", &[]);
        assert_eq!(
            resolve(&own(), Some(&s), addr(VIP)),
            via_service(0, Target::NoBackend)
        );
    }

    /// Under `passthrough` a backend outside the mesh is reached in plain
    /// TCP; under `deny` a service whose backends are all outside is
    /// refused as such, never picked and then denied.
    #[test]
    fn a_backend_outside_the_mesh_follows_the_outbound_policy() {
        let s = snapshot("passthrough", &["192.0.2.7:8080"]);
        assert_eq!(
            resolve(&own(), Some(&s), addr(VIP)),
            via_service(
                1,
                Target::Outside {
                    addr: addr("192.0.2.7:8080"),
                    policy: OutboundPolicy::Passthrough,
                    opaque: false,
                }
            )
        );
        let s = snapshot("deny", &["192.0.2.7:8080", "192.0.2.8:8080"]);
        assert_eq!(
            resolve(&own(), Some(&s), addr(VIP)),
            via_service(0, Target::NoMeshBackend { backends: 2 })
        );
    }

    /// A service part in the mesh and part out (a migration under way, or a
    /// pod whose EndpointSlice came before its Pod): under `deny` every
    /// call goes to a mesh backend, none is a coin flip; under
    /// `passthrough` every backend takes calls.
    #[test]
    fn under_deny_a_mixed_service_sends_every_call_to_its_mesh_backends() {
        let backends = ["10.0.0.1:8080", "192.0.2.7:8080", "10.0.0.2:8080"];
        let s = snapshot("deny", &backends);
        let mut seen: Vec<SocketAddr> = (0..6)
            .map(|_| match resolve(&own(), Some(&s), addr(VIP)).target {
                Target::Mesh { addr, id, .. } => {
                    assert_eq!(id, api());
                    addr
                }
                other => panic!("not a mesh target: {other:?}"),
            })
            .collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen, [addr("10.0.0.1:8080"), addr("10.0.0.2:8080")]);

        let s = snapshot("passthrough", &backends);
        let outside = (0..3)
            .filter(|_| {
                matches!(
                    resolve(&own(), Some(&s), addr(VIP)).target,
                    Target::Outside { .. }
                )
            })
            .count();
        assert_eq!(outside, 1, "one call in three, in turn");
    }

    /// `sessionAffinity: ClientIP`: every call from this pod goes to one
    /// backend.
    #[test]
    fn a_service_with_client_affinity_keeps_to_one_backend() {
        let s = snapshot_of(
            "deny",
            vec![pb::Service {
                client_affinity: true,
                ..api_service(VIP, &["10.0.0.1:8080", "10.0.0.2:8080", "192.0.2.7:8080"])
            }],
        );
        let first = resolve(&own(), Some(&s), addr(VIP));
        assert!(matches!(first.target, Target::Mesh { .. }), "{first:?}");
        for _ in 0..10 {
            assert_eq!(resolve(&own(), Some(&s), addr(VIP)), first);
        }
    }

    /// A server-first protocol behind a Service whose port (not only the
    /// target port) is declared opaque must not wait for detection.
    #[test]
    fn a_service_port_declared_opaque_makes_its_calls_opaque() {
        let s = snapshot_of(
            "deny",
            vec![
                api_service("10.96.0.11:5432", &["10.0.0.1:5433"]),
                api_service("10.96.0.12:80", &["10.0.0.1:5432"]),
                api_service("10.96.0.13:80", &["10.0.0.1:8080"]),
            ],
        );
        let opaque = |vip| match resolve(&own(), Some(&s), addr(vip)).target {
            Target::Mesh { opaque, .. } => opaque,
            other => panic!("not a mesh target: {other:?}"),
        };
        assert!(opaque("10.96.0.11:5432"), "the service port");
        assert!(opaque("10.96.0.12:80"), "the backend port");
        assert!(!opaque("10.96.0.13:80"));
    }

    /// What a refusal needs to know is resolved with the call: whether the
    /// port the app dialled is opaque, for a call refused outright, and
    /// whether either port is, for one whose plain TCP dial failed.
    #[test]
    fn the_opaque_ports_a_refusal_keeps_to_are_resolved_with_the_call() {
        let s = snapshot_of(
            "passthrough",
            vec![
                api_service("10.96.0.11:5432", &[]),
                api_service("10.96.0.12:80", &["192.0.2.7:5432"]),
                api_service("10.96.0.13:5432", &["10.0.0.5:8080"]),
            ],
        );
        let resolved = |dst| resolve(&own(), Some(&s), addr(dst));
        let r = resolved("10.96.0.11:5432");
        assert_eq!((r.opaque, r.target), (true, Target::NoBackend));
        let r = resolved("10.96.0.12:80");
        assert!(!r.opaque, "the virtual address's port is not opaque");
        assert_eq!(
            r.target,
            Target::Outside {
                addr: addr("192.0.2.7:5432"),
                policy: OutboundPolicy::Passthrough,
                opaque: true,
            }
        );
        let r = resolved("10.96.0.13:5432");
        assert_eq!(
            (r.opaque, r.target),
            (
                true,
                Target::SamePod {
                    addr: addr("10.0.0.5:8080"),
                    opaque: true,
                }
            )
        );
        let s = snapshot("deny", &[]);
        let r = resolve(&own(), Some(&s), addr("192.0.2.7:5432"));
        assert_eq!(
            (r.opaque, r.target),
            (
                true,
                Target::Outside {
                    addr: addr("192.0.2.7:5432"),
                    policy: OutboundPolicy::Deny,
                    opaque: true,
                }
            )
        );
        assert!(!resolve(&own(), None, addr("192.0.2.7:5432")).opaque);
    }

    #[test]
    fn a_backend_that_is_this_pod_stays_inside_it() {
        // This pod's address holds two identities, so no endpoint stands for
        // its port 8080: under `deny` that backend is still this pod, and
        // taken although no backend is in the mesh.
        let s = snapshot("deny", &["10.0.0.5:8080", "192.0.2.7:8080"]);
        for _ in 0..2 {
            assert_eq!(
                resolve(&own(), Some(&s), addr(VIP)),
                via_service(
                    0,
                    Target::SamePod {
                        addr: addr("10.0.0.5:8080"),
                        opaque: false,
                    }
                )
            );
        }
        // A pod address with one identity makes a mesh backend, which is
        // still this pod when the pod is this one.
        let api_pod = [addr("0.0.0.0:15006"), addr("10.0.0.1:15006")];
        let s = snapshot("deny", &["10.0.0.1:8080"]);
        assert_eq!(
            resolve(&api_pod, Some(&s), addr(VIP)),
            via_service(
                1,
                Target::SamePod {
                    addr: addr("10.0.0.1:8080"),
                    opaque: false,
                }
            )
        );
        // Its own inbound listener is a loop, as a direct call to it is.
        let s = snapshot("passthrough", &["10.0.0.5:15006"]);
        assert_eq!(
            resolve(&own(), Some(&s), addr(VIP)),
            via_service(1, Target::Loop(addr("10.0.0.5:15006")))
        );
        // Another sidecar's inbound on the same address is a mesh peer.
        let s = snapshot("deny", &["10.0.0.5:16006"]);
        assert_eq!(
            resolve(&own(), Some(&s), addr(VIP)),
            via_service(
                1,
                Target::Mesh {
                    addr: addr("10.0.0.5:16006"),
                    id: SpiffeId::parse("spiffe://td/ns/shop/sa/other").unwrap(),
                    opaque: false,
                }
            )
        );
    }

    /// A call whose backend could not be reached goes to another one,
    /// judged as the first: never one it tried, nor one that would be a
    /// loop; none is left once every candidate was tried.
    #[test]
    fn a_retry_goes_to_an_untried_backend_judged_as_the_first() {
        let mesh = |a: &str| Target::Mesh {
            addr: addr(a),
            id: api(),
            opaque: false,
        };
        let s = snapshot("deny", &["10.0.0.1:8080", "10.0.0.2:8080"]);
        let after = |tried: &[&str]| {
            let tried: Vec<SocketAddr> = tried.iter().map(|a| addr(a)).collect();
            retry_in(&s, &tried)
        };
        for _ in 0..3 {
            assert_eq!(after(&["10.0.0.1:8080"]), Some(mesh("10.0.0.2:8080")));
            assert_eq!(after(&["10.0.0.2:8080"]), Some(mesh("10.0.0.1:8080")));
        }
        assert_eq!(after(&["10.0.0.1:8080", "10.0.0.2:8080"]), None);

        // Under passthrough a backend outside the mesh is plain TCP; this
        // pod's own inbound listener is never dialled.
        let s = snapshot(
            "passthrough",
            &["10.0.0.5:15006", "10.0.0.1:8080", "192.0.2.7:8080"],
        );
        let tried = [addr("10.0.0.1:8080")];
        for _ in 0..3 {
            assert_eq!(
                retry_in(&s, &tried),
                Some(Target::Outside {
                    addr: addr("192.0.2.7:8080"),
                    policy: OutboundPolicy::Passthrough,
                    opaque: false,
                })
            );
        }
        assert_eq!(
            retry_in(&s, &[addr("10.0.0.1:8080"), addr("192.0.2.7:8080")]),
            None,
            "the loop is left"
        );

        // A mesh backend that is this pod itself takes the retry in plain
        // TCP that never leaves the pod.
        let api_pod = [addr("0.0.0.0:15006"), addr("10.0.0.1:15006")];
        let s = snapshot("deny", &["10.0.0.1:8080", "10.0.0.2:8080"]);
        assert_eq!(
            retry(&api_pod, Some(&s), addr(VIP), &[addr("10.0.0.2:8080")]),
            Some(Target::SamePod {
                addr: addr("10.0.0.1:8080"),
                opaque: false,
            })
        );
    }

    fn retry_in(s: &Snapshot, tried: &[SocketAddr]) -> Option<Target> {
        retry(&own(), Some(s), addr(VIP), tried)
    }

    /// The retry reads the snapshot in force at its time: a backend the
    /// service lost since the first pick is not offered, and a service
    /// that is gone has none. A direct destination has no other.
    #[test]
    fn a_retry_takes_the_backends_in_force_then() {
        let newer = snapshot("deny", &["10.0.0.2:8080"]);
        let tried = [addr("10.0.0.2:8080")];
        assert_eq!(retry_in(&newer, &tried), None);
        let newer = snapshot("deny", &["10.0.0.1:8080", "10.0.0.2:8080"]);
        assert_eq!(
            retry_in(&newer, &[addr("10.0.0.9:8080")]).map(|t| t.dialled().is_some()),
            Some(true),
            "a backend tried that is no longer listed is no obstacle"
        );
        let gone = snapshot_of("deny", vec![]);
        assert_eq!(retry_in(&gone, &tried), None);
        assert_eq!(retry(&own(), None, addr(VIP), &tried), None);
        assert_eq!(
            retry(
                &own(),
                Some(&newer),
                addr("10.0.0.1:8080"),
                &[addr("10.0.0.1:8080")]
            ),
            None,
            "a direct destination is no service"
        );
    }

    #[test]
    fn direct_destinations_are_judged_as_before() {
        let s = snapshot("deny", &["10.0.0.1:8080"]);
        let direct = |target| Resolved {
            service: None,
            candidates: 0,
            opaque: false,
            target,
        };
        assert_eq!(
            resolve(&own(), Some(&s), addr("10.0.0.1:8080")),
            direct(Target::Mesh {
                addr: addr("10.0.0.1:8080"),
                id: api(),
                opaque: false,
            })
        );
        assert_eq!(
            resolve(&own(), Some(&s), addr("192.0.2.7:80")),
            direct(Target::Outside {
                addr: addr("192.0.2.7:80"),
                policy: OutboundPolicy::Deny,
                opaque: false,
            })
        );
        assert_eq!(
            resolve(&own(), Some(&s), addr("127.0.0.1:15001")),
            direct(Target::Loop(addr("127.0.0.1:15001")))
        );
        // Before the first snapshot nothing is in the mesh and outbound is
        // denied; no virtual address is known either.
        assert_eq!(
            resolve(&own(), None, addr(VIP)),
            direct(Target::Outside {
                addr: addr(VIP),
                policy: OutboundPolicy::Deny,
                opaque: false,
            })
        );
    }

    #[test]
    fn recognises_its_own_listeners() {
        let own: Vec<SocketAddr> = vec![
            "0.0.0.0:15006".parse().unwrap(),
            "127.0.0.1:15001".parse().unwrap(),
        ];
        assert!(is_own(&own, "127.0.0.1:15006".parse().unwrap()));
        assert!(!is_own(&own, "10.0.0.5:15006".parse().unwrap()));
        assert!(is_own(&own, "127.0.0.1:15001".parse().unwrap()));
        assert!(!is_own(&own, "10.0.0.5:15001".parse().unwrap()));
        assert!(!is_own(&own, "10.0.0.5:8080".parse().unwrap()));
    }

    /// An IPv4 address written IPv4-mapped is the address it maps: mapped
    /// loopback on a listener's port is this proxy (a loop), mapped
    /// loopback is never the pod's own address, and the pod's address
    /// mapped is.
    #[test]
    fn an_ipv4_mapped_address_is_the_address_it_maps() {
        let own = own();
        assert!(is_own(&own, addr("[::ffff:127.0.0.1]:15001")));
        assert!(is_own(&own, addr("[::ffff:10.0.0.5]:15006")));
        assert!(!is_own(&own, addr("[::ffff:10.0.0.5]:8080")));
        assert!(!is_own_ip(&own, "::ffff:127.0.0.1".parse().unwrap()));
        assert!(is_own_ip(&own, "::ffff:10.0.0.5".parse().unwrap()));
        assert!(!is_own_ip(&own, "::ffff:10.0.0.6".parse().unwrap()));
    }
}
