//! Where a redirected outbound connection goes, decided from the snapshot
//! and the proxy's own addresses alone: no socket, no I/O, so every case is
//! a unit test (the listener that acts on it needs iptables).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use trellis_core::SpiffeId;

use crate::policy::{OutboundPolicy, Snapshot};

/// Whether `dst` is one of the proxy's own listeners.
fn is_own(own: &[SocketAddr], dst: SocketAddr) -> bool {
    own.iter()
        .any(|a| a.port() == dst.port() && (a.ip() == dst.ip() || dst.ip().is_loopback()))
}

/// Whether `ip` is an address of this pod: one the proxy listens on or
/// advertises, other than loopback or unspecified ones.
fn is_own_ip(own: &[SocketAddr], ip: IpAddr) -> bool {
    !ip.is_loopback() && !ip.is_unspecified() && own.iter().any(|a| a.ip() == ip)
}

/// Where a redirected connection goes, as [`resolve`] decides it.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Resolved {
    /// The service whose virtual address the app dialled, if it did; then
    /// the address of `target` is the backend picked.
    pub service: Option<Arc<str>>,
    pub target: Target,
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum Target {
    /// One of the proxy's own listeners: refused, it would loop.
    Loop(SocketAddr),
    /// A service with no ready backend: refused.
    NoBackend,
    /// A mesh endpoint: mTLS to `addr`, the server must present `id`. An
    /// `opaque` port is never parsed as HTTP.
    Mesh {
        addr: SocketAddr,
        id: SpiffeId,
        opaque: bool,
    },
    /// An address of this pod that is no endpoint's inbound: plain TCP,
    /// which never leaves the pod (the app's own call to it would not be
    /// redirected at all).
    SamePod(SocketAddr),
    /// Outside the mesh: refused or plain TCP, as `policy` says.
    Outside {
        addr: SocketAddr,
        policy: OutboundPolicy,
    },
}

/// Decides where a connection redirected from `dst` goes, from the snapshot
/// (`None` before the first: nothing is in the mesh, outbound `deny`) and
/// the proxy's own addresses. A service's virtual address is replaced by
/// the next of its backends, which is then judged as any destination is.
pub(super) fn resolve(
    own: &[SocketAddr],
    snapshot: Option<&Snapshot>,
    dst: SocketAddr,
) -> Resolved {
    if is_own(own, dst) {
        return Resolved {
            service: None,
            target: Target::Loop(dst),
        };
    }
    let Some(service) = snapshot.and_then(|s| s.service_for(dst)) else {
        return Resolved {
            service: None,
            target: destination(own, snapshot, dst),
        };
    };
    let target = match service.pick() {
        Some(backend) => destination(own, snapshot, backend),
        None => Target::NoBackend,
    };
    Resolved {
        service: Some(service.name.clone()),
        target,
    }
}

/// What `addr`, a destination that is no virtual address, is.
fn destination(own: &[SocketAddr], snapshot: Option<&Snapshot>, addr: SocketAddr) -> Target {
    if is_own(own, addr) {
        return Target::Loop(addr);
    }
    let Some(snapshot) = snapshot else {
        return Target::Outside {
            addr,
            policy: OutboundPolicy::default(),
        };
    };
    // Another sidecar's inbound on an address this pod shares (several
    // sidecars on one host) is still a mesh peer; any other port of this
    // pod's address is the pod itself, whose one identity is this one.
    if is_own_ip(own, addr.ip()) && !snapshot.endpoints.contains_key(&addr) {
        return Target::SamePod(addr);
    }
    match snapshot.endpoint_for(addr) {
        Some(id) => Target::Mesh {
            addr,
            id: id.clone(),
            opaque: snapshot.policies.is_opaque(addr.port()),
        },
        None => Target::Outside {
            addr,
            policy: snapshot.outbound_policy,
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

    /// A snapshot whose mesh has the pods 10.0.0.1 (api), 10.0.0.5 (this
    /// one, web) and, on 10.0.0.5:16006, another sidecar sharing the
    /// address; the service shop/api (10.96.0.10:80) stands for `backends`.
    fn snapshot(outbound_policy: &str, backends: &[&str]) -> Snapshot {
        let endpoint = |address: &str, id: &str| pb::Endpoint {
            address: address.into(),
            spiffe_id: id.into(),
        };
        let raw = pb::Snapshot {
            version: 1,
            endpoints: vec![
                endpoint("10.0.0.1:15006", "spiffe://td/ns/shop/sa/api"),
                endpoint("10.0.0.5:15006", "spiffe://td/ns/shop/sa/web"),
                endpoint("10.0.0.5:16006", "spiffe://td/ns/shop/sa/other"),
            ],
            services: vec![pb::Service {
                address: "10.96.0.10:80".into(),
                name: "shop/api".into(),
                backends: backends.iter().map(|b| b.to_string()).collect(),
                ..Default::default()
            }],
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

    fn via_service(target: Target) -> Resolved {
        Resolved {
            service: Some("shop/api".into()),
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
            via_service(Target::Mesh {
                addr: addr(a),
                id: api(),
                opaque,
            })
        };
        // The round robin starts anywhere; then it alternates.
        assert_eq!(seen[0], seen[2]);
        assert_eq!(seen[1], seen[3]);
        seen.truncate(2);
        seen.sort_by_key(|r| match r.target {
            Target::Mesh { addr, .. } => addr,
            _ => panic!("not a mesh target: {r:?}"),
        });
        // The opaque port is the backend's, not the virtual address's.
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
            via_service(Target::NoBackend)
        );
    }

    #[test]
    fn a_backend_outside_the_mesh_follows_the_outbound_policy() {
        for (policy, expected) in [
            ("deny", OutboundPolicy::Deny),
            ("passthrough", OutboundPolicy::Passthrough),
        ] {
            let s = snapshot(policy, &["192.0.2.7:8080"]);
            assert_eq!(
                resolve(&own(), Some(&s), addr(VIP)),
                via_service(Target::Outside {
                    addr: addr("192.0.2.7:8080"),
                    policy: expected,
                }),
                "{policy}"
            );
        }
    }

    #[test]
    fn a_backend_that_is_this_pod_stays_inside_it() {
        let s = snapshot("deny", &["10.0.0.5:8080"]);
        assert_eq!(
            resolve(&own(), Some(&s), addr(VIP)),
            via_service(Target::SamePod(addr("10.0.0.5:8080")))
        );
        // Its own inbound listener is a loop, as a direct call to it is.
        let s = snapshot("passthrough", &["10.0.0.5:15006"]);
        assert_eq!(
            resolve(&own(), Some(&s), addr(VIP)),
            via_service(Target::Loop(addr("10.0.0.5:15006")))
        );
        // Another sidecar's inbound on the same address is a mesh peer.
        let s = snapshot("deny", &["10.0.0.5:16006"]);
        assert_eq!(
            resolve(&own(), Some(&s), addr(VIP)),
            via_service(Target::Mesh {
                addr: addr("10.0.0.5:16006"),
                id: SpiffeId::parse("spiffe://td/ns/shop/sa/other").unwrap(),
                opaque: false,
            })
        );
    }

    #[test]
    fn direct_destinations_are_judged_as_before() {
        let s = snapshot("deny", &["10.0.0.1:8080"]);
        let direct = |target| Resolved {
            service: None,
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
}
