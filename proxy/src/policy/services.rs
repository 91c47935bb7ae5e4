//! Services: virtual addresses (a Kubernetes Service's cluster IP and one
//! of its ports) and the backends behind each, as a snapshot carries them.
//!
//! An app that calls a Service connects to its cluster IP; the sidecar sees
//! that address as the original destination, which is no mesh endpoint. It
//! picks one of the service's backends ([`Service::pick`]) and treats it as
//! the destination.
//!
//! Who each backend is (its [`Peer`]: the SPIFFE ID expected there, found
//! as [`Snapshot::peer`](super::Snapshot::peer) finds it) is looked up
//! once, when the services are compiled, against the endpoints sent in the
//! same snapshot; a snapshot that keeps the endpoints of a held version
//! keeps that version's services with them, so the two always agree. The
//! backends are held sorted, the mesh ones first. Under outbound `deny`
//! only the mesh backends are picked: a backend outside the mesh (a
//! workload not yet migrated into it, or a pod whose EndpointSlice came
//! before its Pod) would be refused, and a call must not be a coin flip
//! between a peer and a refusal. Under `passthrough` every backend is.
//!
//! Among those candidates a service takes each in turn or, when it asks
//! for client affinity (`sessionAffinity: ClientIP`), always the one that
//! weighs most for this process's random seed (rendezvous hashing): every
//! call from this pod goes to one backend for as long as that backend is a
//! candidate, whatever else joins or leaves (only the pods of a backend that
//! left move, and a backend that joins takes its share from every other),
//! while pods spread over the backends. A call that could not connect to
//! its backend is offered the other candidates ([`Service::retry`]): the
//! ones after it in turn, with affinity too, passing over those it tried.
//!
//! Picking must stay lock-free and allocate nothing: it runs once per
//! connection. A retry reads the candidates and changes nothing. This module judges a backend by its identity alone: loops
//! and this pod's own addresses are the caller's to check.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};

use trellis_core::SpiffeId;
use trellis_proto::discovery::v1 as pb;

use super::{InvalidSnapshot, OutboundPolicy};

/// The services of a snapshot, by virtual address.
pub type Services = HashMap<SocketAddr, Service>;

/// Who is at an address, as the mesh endpoints say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// A sidecar's inbound address: that sidecar, with this identity.
    Endpoint(SpiffeId),
    /// Another port of a pod address that only this identity holds: the
    /// pod's sidecar redirects it to its inbound.
    Pod(SpiffeId),
    /// No mesh endpoint.
    Outside,
}

impl Peer {
    /// The SPIFFE ID expected at the address, `None` outside the mesh.
    pub fn id(&self) -> Option<&SpiffeId> {
        match self {
            Peer::Endpoint(id) | Peer::Pod(id) => Some(id),
            Peer::Outside => None,
        }
    }
}

/// One ready backend of a service, with who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub addr: SocketAddr,
    pub peer: Peer,
}

/// One virtual address with the addresses of its ready backends.
#[derive(Debug)]
pub struct Service {
    /// `namespace/name`, for logs and `/config`.
    pub name: Arc<str>,
    /// Every ready backend, sorted by address, the mesh ones first; empty
    /// when none is ready.
    backends: Box<[Backend]>,
    /// How many of `backends` are in the mesh.
    mesh: usize,
    /// Every call goes to the same candidate (`client_affinity`).
    affinity: bool,
    /// Counts picks; the next backend is this modulo their number.
    next: AtomicUsize,
}

/// What [`Service::pick`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Pick<'a> {
    Backend(&'a Backend),
    /// No backend is ready.
    NoBackend,
    /// Under outbound `deny`: backends are ready, none is in the mesh, and
    /// these are they.
    NoMeshBackend(&'a [Backend]),
}

/// How much the backend at `addr` weighs for the pod of `seed`: a pick by
/// affinity takes the candidate that weighs most (rendezvous hashing).
fn affinity_weight(seed: usize, addr: SocketAddr) -> u64 {
    fn mix(mut x: u64) -> u64 {
        // splitmix64's finalizer.
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    }
    let ip = match addr.ip() {
        std::net::IpAddr::V4(ip) => u128::from(u32::from(ip)),
        std::net::IpAddr::V6(ip) => u128::from(ip),
    };
    let weight = mix(seed as u64 ^ ip as u64);
    let weight = mix(weight ^ (ip >> 64) as u64);
    mix(weight ^ u64::from(addr.port()))
}

/// This process's seed for client affinity, drawn once: the same for
/// every pick for as long as the sidecar runs, different from one pod to
/// the next.
static AFFINITY_SEED: LazyLock<usize> = LazyLock::new(|| rand::random_range(0..=usize::MAX));

impl Service {
    /// A service of `backends` (in any order) whose first pick in turn is
    /// at a random place, so sidecars that receive the same list do not all
    /// start with the same backend; with `affinity`, every pick is the same
    /// one.
    pub fn new(name: Arc<str>, mut backends: Vec<Backend>, affinity: bool) -> Self {
        // Sorted, so a pick by affinity depends on which backends there
        // are, not on the order they were sent in.
        backends.sort_by_key(|b| (b.peer == Peer::Outside, b.addr));
        backends.dedup_by_key(|b| b.addr);
        let mesh = backends.partition_point(|b| b.peer != Peer::Outside);
        let start = match backends.len() {
            0 => 0,
            n => rand::random_range(0..n),
        };
        Service {
            name,
            backends: backends.into(),
            mesh,
            affinity,
            next: AtomicUsize::new(start),
        }
    }

    /// This service with each backend's peer looked up again by `peer`
    /// (the endpoints changed): a new service, its turn started afresh.
    pub(super) fn with_peers(&self, peer: impl Fn(SocketAddr) -> Peer) -> Service {
        let backends = self
            .backends
            .iter()
            .map(|b| Backend {
                addr: b.addr,
                peer: peer(b.addr),
            })
            .collect();
        Service::new(self.name.clone(), backends, self.affinity)
    }

    /// Every ready backend, the mesh ones first.
    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    /// The ready backends that are in the mesh.
    pub fn mesh_backends(&self) -> &[Backend] {
        &self.backends[..self.mesh]
    }

    /// Whether every call goes to one backend (`client_affinity`).
    pub fn has_affinity(&self) -> bool {
        self.affinity
    }

    /// The backends a call may go to under the outbound `policy`: the mesh
    /// backends under `deny`, every backend under `passthrough`.
    pub fn candidates(&self, policy: OutboundPolicy) -> &[Backend] {
        match policy {
            OutboundPolicy::Deny => self.mesh_backends(),
            OutboundPolicy::Passthrough => self.backends(),
        }
    }

    /// The backend for the next call under the outbound `policy`: among
    /// the mesh backends under `deny`, among all under `passthrough`; the
    /// next in turn, or the one of this process's seed with affinity.
    pub fn pick(&self, policy: OutboundPolicy) -> Pick<'_> {
        self.pick_seeded(policy, *AFFINITY_SEED)
    }

    fn pick_seeded(&self, policy: OutboundPolicy, seed: usize) -> Pick<'_> {
        let candidates = self.candidates(policy);
        if candidates.is_empty() {
            return if self.backends.is_empty() {
                Pick::NoBackend
            } else {
                Pick::NoMeshBackend(&self.backends[self.mesh..])
            };
        }
        if self.affinity {
            let heaviest = candidates
                .iter()
                .max_by_key(|b| affinity_weight(seed, b.addr))
                .expect("candidates are not empty");
            return Pick::Backend(heaviest);
        }
        // Relaxed: the counter orders nothing else; at worst two concurrent
        // picks see each other's increment late, and both still get a
        // candidate.
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        Pick::Backend(&candidates[n % candidates.len()])
    }

    /// The candidates under the outbound `policy` for another attempt at
    /// a call that could not connect to any of `tried` (in the order
    /// tried), in the order to try them: the ones after the last tried, in
    /// turn, those tried passed over (all from the first, when the last
    /// is no candidate any more). With affinity too: only the first pick
    /// is the seed's. The round robin is left alone: a dead backend's
    /// calls go on to the next one, while the calls after them are picked
    /// as if nothing had failed. Allocates nothing.
    pub fn retry<'a>(
        &'a self,
        policy: OutboundPolicy,
        tried: &'a [SocketAddr],
    ) -> impl Iterator<Item = &'a Backend> + 'a {
        let candidates = self.candidates(policy);
        let start = tried
            .last()
            .and_then(|last| candidates.iter().position(|b| b.addr == *last))
            .map_or(0, |i| i + 1);
        let (before, from) = candidates.split_at(start);
        from.iter()
            .chain(before)
            .filter(move |b| !tried.contains(&b.addr))
    }
}

/// Compiles the services of a snapshot that carries them, each backend's
/// [`Peer`] found by `peer` among the endpoints of the same snapshot. Every
/// address must be a dialable `ip:port` (no unspecified IP, no port 0), and
/// no virtual address may be given twice: which backends it stands for
/// would be a guess.
pub(super) fn compile(
    raw: Vec<pb::Service>,
    peer: impl Fn(SocketAddr) -> Peer,
) -> Result<Services, InvalidSnapshot> {
    let mut services = HashMap::with_capacity(raw.len());
    let mut index_of = HashMap::with_capacity(raw.len());
    for (index, service) in raw.into_iter().enumerate() {
        let address =
            dialable(&service.address).ok_or_else(|| InvalidSnapshot::ServiceAddress {
                index,
                address: quoted(&service.address),
            })?;
        let backends = service
            .backends
            .iter()
            .enumerate()
            .map(|(backend, raw)| match dialable(raw) {
                Some(addr) => Ok(Backend {
                    addr,
                    peer: peer(addr),
                }),
                None => Err(InvalidSnapshot::ServiceBackend {
                    index,
                    name: quoted(&service.name),
                    backend,
                    address: quoted(raw),
                }),
            })
            .collect::<Result<Vec<_>, _>>()?;
        match index_of.entry(address) {
            Entry::Occupied(first) => {
                return Err(InvalidSnapshot::DuplicateService {
                    index,
                    first: *first.get(),
                    address,
                });
            }
            Entry::Vacant(slot) => {
                slot.insert(index);
            }
        }
        let service = Service::new(service.name.into(), backends, service.client_affinity);
        services.insert(address, service);
    }
    Ok(services)
}

/// `raw` as an address a connection can be made to.
fn dialable(raw: &str) -> Option<SocketAddr> {
    raw.parse::<SocketAddr>()
        .ok()
        .filter(|a| !a.ip().is_unspecified() && a.port() != 0)
}

/// At most this many characters of a bad value are quoted in a refusal,
/// so a huge field costs neither a huge NACK nor a huge log line.
const QUOTED_CHARS: usize = 48;

/// `raw` quoted and escaped as `{:?}` does, cut after [`QUOTED_CHARS`]
/// escaped characters (marked with `...` and the full length in bytes).
pub(super) fn quoted(raw: &str) -> String {
    let mut out = String::from("\"");
    for c in raw.chars() {
        let escaped = c.escape_debug();
        if out.len() - 1 + escaped.len() > QUOTED_CHARS {
            out.push_str(&format!("\"... ({} bytes)", raw.len()));
            return out;
        }
        out.extend(escaped);
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::metrics::Metrics;
    use crate::policy::Snapshot;

    use OutboundPolicy::{Deny, Passthrough};

    fn service(address: &str, name: &str, backends: &[&str]) -> pb::Service {
        pb::Service {
            address: address.into(),
            name: name.into(),
            backends: backends.iter().map(|b| b.to_string()).collect(),
            ..Default::default()
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn endpoint(address: &str, id: &str) -> pb::Endpoint {
        pb::Endpoint {
            address: address.into(),
            spiffe_id: id.into(),
        }
    }

    /// Every backend outside the mesh.
    fn outside(_: SocketAddr) -> Peer {
        Peer::Outside
    }

    fn addrs(backends: &[Backend]) -> Vec<SocketAddr> {
        backends.iter().map(|b| b.addr).collect()
    }

    /// A service of backends whose peers are given, in that order.
    fn of(backends: &[(&str, Peer)], affinity: bool) -> Service {
        let backends = backends
            .iter()
            .map(|(a, peer)| Backend {
                addr: addr(a),
                peer: peer.clone(),
            })
            .collect();
        Service::new("shop/api".into(), backends, affinity)
    }

    fn picked(pick: Pick<'_>) -> SocketAddr {
        match pick {
            Pick::Backend(b) => b.addr,
            other => panic!("no backend picked: {other:?}"),
        }
    }

    #[test]
    fn compiles_virtual_addresses_with_their_backends() {
        let services = compile(
            vec![
                service(
                    "10.96.0.10:80",
                    "shop/web",
                    &["10.0.0.1:8080", "10.0.0.2:8080"],
                ),
                service("[fd00::10]:80", "shop/web", &["[fd00::1]:8080"]),
                service("10.96.0.11:5432", "shop/db", &[]),
            ],
            outside,
        )
        .unwrap();
        assert_eq!(services.len(), 3);
        let web = &services[&addr("10.96.0.10:80")];
        assert_eq!(&*web.name, "shop/web");
        assert_eq!(
            addrs(web.backends()),
            [addr("10.0.0.1:8080"), addr("10.0.0.2:8080")]
        );
        assert_eq!(
            addrs(services[&addr("[fd00::10]:80")].backends()),
            [addr("[fd00::1]:8080")]
        );
        assert!(services[&addr("10.96.0.11:5432")].backends().is_empty());
    }

    /// Each backend's identity is found once, against the endpoints of the
    /// same snapshot, as a direct call to its address would find it: the
    /// endpoint itself, another port of a pod with one identity, or none.
    #[test]
    fn backends_are_looked_up_in_the_endpoints_they_came_with() {
        let local = id("spiffe://td/ns/a/sa/web");
        let s = Snapshot::compile(
            pb::Snapshot {
                endpoints: vec![
                    endpoint("10.0.0.1:15006", "spiffe://td/ns/shop/sa/api"),
                    // Two identities on one address: neither owns its ports.
                    endpoint("10.0.0.9:15006", "spiffe://td/ns/shop/sa/one"),
                    endpoint("10.0.0.9:16006", "spiffe://td/ns/shop/sa/two"),
                ],
                services: vec![service(
                    "10.96.0.10:80",
                    "shop/api",
                    &[
                        "192.0.2.7:8080",
                        "10.0.0.1:8080",
                        "10.0.0.9:8080",
                        "10.0.0.1:15006",
                        "10.0.0.9:16006",
                    ],
                )],
                ..Default::default()
            },
            &local,
            &Metrics::new(),
        )
        .unwrap();
        let api = s.service_for(addr("10.96.0.10:80")).unwrap();
        let found: Vec<(SocketAddr, Peer)> = api
            .backends()
            .iter()
            .map(|b| (b.addr, b.peer.clone()))
            .collect();
        // Sorted by address, the mesh backends first.
        assert_eq!(
            found,
            [
                (
                    addr("10.0.0.1:8080"),
                    Peer::Pod(id("spiffe://td/ns/shop/sa/api"))
                ),
                (
                    addr("10.0.0.1:15006"),
                    Peer::Endpoint(id("spiffe://td/ns/shop/sa/api"))
                ),
                (
                    addr("10.0.0.9:16006"),
                    Peer::Endpoint(id("spiffe://td/ns/shop/sa/two"))
                ),
                (addr("10.0.0.9:8080"), Peer::Outside),
                (addr("192.0.2.7:8080"), Peer::Outside),
            ]
        );
        assert_eq!(api.mesh_backends().len(), 3);
        for b in api.backends() {
            assert_eq!(b.peer, s.peer(b.addr), "{}", b.addr);
            assert_eq!(b.peer.id(), s.endpoint_for(b.addr), "{}", b.addr);
        }
    }

    /// Services come with the endpoints: compiled when a snapshot carries
    /// them, kept (shared, with their round-robin place and the identities
    /// found in the endpoints kept with them) when it refers to the
    /// endpoints of the version held, and refused when it does both.
    #[test]
    fn services_are_compiled_and_kept_with_held_endpoints() {
        let local = id("spiffe://td/ns/a/sa/web");
        let metrics = Metrics::new();
        let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
        let held = Snapshot::compile(
            pb::Snapshot {
                version: 7,
                endpoints: vec![
                    endpoint("10.0.0.1:15006", "spiffe://td/ns/shop/sa/api"),
                    endpoint("10.0.0.2:15006", "spiffe://td/ns/shop/sa/api"),
                ],
                services: vec![service(
                    "10.96.0.10:80",
                    "shop/api",
                    &["10.0.0.1:8080", "10.0.0.2:8080"],
                )],
                ..Default::default()
            },
            &local,
            &metrics,
        )
        .unwrap();
        let api = held.service_for(vip).unwrap();
        assert_eq!(&*api.name, "shop/api");
        assert_eq!(api.backends().len(), 2);
        assert!(held.service_for("10.0.0.1:8080".parse().unwrap()).is_none());
        let first = picked(api.pick(Deny));

        let next = |services| pb::Snapshot {
            version: 9,
            endpoints_version: 7,
            services,
            ..Default::default()
        };
        let s = Snapshot::compile_in(next(vec![]), Some(&held), &local, &[], &metrics).unwrap();
        assert!(
            Arc::ptr_eq(&s.services, &held.services),
            "shared, not copied"
        );
        assert!(Arc::ptr_eq(&s.endpoints, &held.endpoints));
        let api = s.service_for(vip).unwrap();
        assert_ne!(picked(api.pick(Deny)), first, "the round robin goes on");
        for b in api.backends() {
            assert_eq!(b.peer, s.peer(b.addr), "{}", b.addr);
        }

        // Services sent with held endpoints would be judged against
        // endpoints they did not come with.
        let again = next(vec![service("10.96.0.10:80", "shop/api", &[])]);
        let e = Snapshot::compile_in(again, Some(&held), &local, &[], &metrics)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "endpoints_version is set and services are sent too: they come with the endpoints, \
             one or the other"
        );
        // A snapshot that carries its endpoints carries its services: none
        // sent, none known.
        let fresh = Snapshot::compile(
            pb::Snapshot {
                version: 10,
                endpoints: vec![endpoint("10.0.0.1:15006", "spiffe://td/ns/shop/sa/api")],
                ..Default::default()
            },
            &local,
            &metrics,
        )
        .unwrap();
        assert!(fresh.service_for(vip).is_none());
    }

    #[test]
    fn round_robin_cycles_through_every_backend() {
        let backends = [
            addr("10.0.0.1:80"),
            addr("10.0.0.2:80"),
            addr("10.0.0.3:80"),
        ];
        let service = of(
            &[
                ("10.0.0.3:80", Peer::Outside),
                ("10.0.0.1:80", Peer::Outside),
                ("10.0.0.2:80", Peer::Outside),
            ],
            false,
        );
        let first: Vec<SocketAddr> = (0..3).map(|_| picked(service.pick(Passthrough))).collect();
        let mut sorted = first.clone();
        sorted.sort();
        assert_eq!(sorted, backends, "each backend once per round");
        let second: Vec<SocketAddr> = (0..3).map(|_| picked(service.pick(Passthrough))).collect();
        assert_eq!(first, second, "the same order every round");

        let one = of(&[("10.0.0.9:80", Peer::Outside)], false);
        assert!((0..4).all(|_| picked(one.pick(Passthrough)) == addr("10.0.0.9:80")));
    }

    /// Under outbound `deny` a backend outside the mesh would be refused:
    /// while the service has mesh backends, only they are picked, so no
    /// call is a coin flip. Under `passthrough` every backend is picked.
    #[test]
    fn under_deny_only_mesh_backends_are_picked() {
        let api = || Peer::Pod(id("spiffe://td/ns/shop/sa/api"));
        let service = of(
            &[
                ("10.0.0.1:8080", api()),
                ("10.0.0.7:8080", Peer::Outside),
                ("10.0.0.2:8080", api()),
                ("10.0.0.8:8080", Peer::Outside),
            ],
            false,
        );
        let mut seen: Vec<SocketAddr> = (0..8).map(|_| picked(service.pick(Deny))).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen, [addr("10.0.0.1:8080"), addr("10.0.0.2:8080")]);

        let mut seen: Vec<SocketAddr> = (0..8).map(|_| picked(service.pick(Passthrough))).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 4, "{seen:?}");
    }

    #[test]
    fn a_service_without_mesh_backends_picks_none_under_deny() {
        let none = of(&[], false);
        assert_eq!(none.pick(Deny), Pick::NoBackend);
        assert_eq!(none.pick(Passthrough), Pick::NoBackend);

        let unmeshed = of(
            &[
                ("10.0.0.8:8080", Peer::Outside),
                ("10.0.0.7:8080", Peer::Outside),
            ],
            false,
        );
        match unmeshed.pick(Deny) {
            Pick::NoMeshBackend(outside) => assert_eq!(
                addrs(outside),
                [addr("10.0.0.7:8080"), addr("10.0.0.8:8080")]
            ),
            other => panic!("{other:?}"),
        }
        assert!(matches!(unmeshed.pick(Passthrough), Pick::Backend(_)));
    }

    /// With client affinity every call goes to one candidate for this
    /// process's seed: the same one call after call, and in a later
    /// snapshot with the same backends in any order; other processes
    /// (seeds) spread over every candidate. Under `deny` the candidates are
    /// the mesh backends, under `passthrough` every backend.
    #[test]
    fn client_affinity_keeps_to_one_backend_while_the_backends_stay() {
        let api = || Peer::Pod(id("spiffe://td/ns/shop/sa/api"));
        let listed = [
            ("10.0.0.3:8080", api()),
            ("10.0.0.1:8080", api()),
            ("10.0.0.9:8080", Peer::Outside),
            ("10.0.0.2:8080", api()),
        ];
        let service = of(&listed, true);
        let mesh = addrs(service.mesh_backends());
        assert_eq!(mesh.len(), 3);
        let expected = picked(service.pick(Deny));
        assert!(mesh.contains(&expected));
        assert!((0..10).all(|_| picked(service.pick(Deny)) == expected));
        let mut reordered = listed.clone();
        reordered.reverse();
        let later = of(&reordered, true);
        assert!((0..10).all(|_| picked(later.pick(Deny)) == expected));

        // Other pods' seeds spread over every candidate.
        let mut spread: Vec<SocketAddr> = (0..64)
            .map(|seed| picked(service.pick_seeded(Deny, seed)))
            .collect();
        spread.sort();
        spread.dedup();
        assert_eq!(spread, mesh);
        let mut spread: Vec<SocketAddr> = (0..64)
            .map(|seed| picked(service.pick_seeded(Passthrough, seed)))
            .collect();
        spread.sort();
        spread.dedup();
        assert_eq!(spread, addrs(service.backends()), "the one outside too");
    }

    /// A pod keeps to its backend while that backend stays, whatever else
    /// joins or leaves (a scale-up, each step of a rolling update); only
    /// the pods of a backend that left move, and one that joins takes pods
    /// from every other.
    #[test]
    fn client_affinity_moves_only_the_pods_whose_backend_left() {
        let api = || Peer::Pod(id("spiffe://td/ns/shop/sa/api"));
        let three = of(
            &[
                ("10.0.0.1:8080", api()),
                ("10.0.0.2:8080", api()),
                ("10.0.0.3:8080", api()),
            ],
            true,
        );
        let four = of(
            &[
                ("10.0.0.1:8080", api()),
                ("10.0.0.2:8080", api()),
                ("10.0.0.3:8080", api()),
                ("10.0.0.4:8080", api()),
            ],
            true,
        );
        let joined = addr("10.0.0.4:8080");
        let mut moved = 0;
        for seed in 0..1000 {
            let before = picked(three.pick_seeded(Deny, seed));
            let after = picked(four.pick_seeded(Deny, seed));
            if after != before {
                assert_eq!(
                    after, joined,
                    "seed {seed} moved between backends that stayed"
                );
                moved += 1;
            }
            // Scaled back down: every pod is where it was.
            assert_eq!(picked(three.pick_seeded(Deny, seed)), before);
        }
        assert!(
            (150..350).contains(&moved),
            "{moved} of 1000 moved to the new backend"
        );
    }

    /// A call that could not connect is offered every other candidate once,
    /// the ones after the last it tried first, never one it tried; the
    /// round robin goes on as if nothing had failed.
    #[test]
    fn a_retry_offers_each_untried_candidate_once_in_turn() {
        let service = of(
            &[
                ("10.0.0.4:80", Peer::Outside),
                ("10.0.0.2:80", Peer::Outside),
                ("10.0.0.1:80", Peer::Outside),
                ("10.0.0.3:80", Peer::Outside),
            ],
            false,
        );
        let offered = |tried: &[&str]| -> Vec<SocketAddr> {
            let tried: Vec<SocketAddr> = tried.iter().map(|a| addr(a)).collect();
            service.retry(Passthrough, &tried).map(|b| b.addr).collect()
        };
        let all = |s: &[&str]| -> Vec<SocketAddr> { s.iter().map(|a| addr(a)).collect() };
        assert_eq!(
            offered(&["10.0.0.2:80"]),
            all(&["10.0.0.3:80", "10.0.0.4:80", "10.0.0.1:80"])
        );
        assert_eq!(
            offered(&["10.0.0.2:80", "10.0.0.4:80"]),
            all(&["10.0.0.1:80", "10.0.0.3:80"])
        );
        assert_eq!(
            offered(&["10.0.0.4:80", "10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]),
            [],
            "every candidate was tried"
        );
        // The last one tried is no longer listed (the backends changed
        // meanwhile): every untried candidate, from the first.
        assert_eq!(
            offered(&["10.0.0.9:80"]),
            all(&["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.4:80"])
        );

        let first = picked(service.pick(Passthrough));
        let _ = service.retry(Passthrough, &[first]).next();
        let second = picked(service.pick(Passthrough));
        let backends = addrs(service.backends());
        let at = backends.iter().position(|a| *a == first).unwrap();
        assert_eq!(second, backends[(at + 1) % 4], "the round robin was moved");
    }

    /// With client affinity only the first pick is the seed's: a retry
    /// goes to the candidates after it, in order, and under `deny` never
    /// to a backend outside the mesh.
    #[test]
    fn a_retry_with_affinity_takes_the_candidates_after_the_seeds() {
        let api = || Peer::Pod(id("spiffe://td/ns/shop/sa/api"));
        let service = of(
            &[
                ("10.0.0.3:8080", api()),
                ("10.0.0.1:8080", api()),
                ("10.0.0.9:8080", Peer::Outside),
                ("10.0.0.2:8080", api()),
            ],
            true,
        );
        let mesh = addrs(service.mesh_backends());
        for seed in 0..3 {
            let first = picked(service.pick_seeded(Deny, seed));
            let at = mesh.iter().position(|a| *a == first).unwrap();
            let mut tried = vec![first];
            let offered: Vec<SocketAddr> = service.retry(Deny, &tried).map(|b| b.addr).collect();
            assert_eq!(offered, [mesh[(at + 1) % 3], mesh[(at + 2) % 3]]);
            tried.push(offered[0]);
            let next = service.retry(Deny, &tried).next().unwrap();
            assert_eq!(next.addr, mesh[(at + 2) % 3]);
            tried.push(next.addr);
            assert_eq!(
                service.retry(Deny, &tried).next(),
                None,
                "the backend outside the mesh is no candidate under deny"
            );
            assert_eq!(
                service
                    .retry(Passthrough, &tried)
                    .map(|b| b.addr)
                    .collect::<Vec<_>>(),
                [addr("10.0.0.9:8080")],
                "under passthrough it is"
            );
        }
    }

    /// Under `deny` a retry keeps to the mesh backends, as the pick does.
    #[test]
    fn under_deny_a_retry_offers_only_mesh_backends() {
        let api = || Peer::Pod(id("spiffe://td/ns/shop/sa/api"));
        let service = of(
            &[
                ("10.0.0.1:8080", api()),
                ("10.0.0.7:8080", Peer::Outside),
                ("10.0.0.2:8080", api()),
            ],
            false,
        );
        for _ in 0..4 {
            let offered: Vec<SocketAddr> = service
                .retry(Deny, &[addr("10.0.0.1:8080")])
                .map(|b| b.addr)
                .collect();
            assert_eq!(offered, [addr("10.0.0.2:8080")]);
        }
        let unmeshed = of(&[("10.0.0.7:8080", Peer::Outside)], false);
        assert_eq!(unmeshed.retry(Deny, &[]).next(), None);
        assert_eq!(of(&[], false).retry(Passthrough, &[]).next(), None);
    }

    #[test]
    fn a_backend_given_twice_counts_once() {
        let service = of(
            &[
                ("10.0.0.1:8080", Peer::Outside),
                ("10.0.0.2:8080", Peer::Outside),
                ("10.0.0.1:8080", Peer::Outside),
            ],
            false,
        );
        assert_eq!(
            addrs(service.backends()),
            [addr("10.0.0.1:8080"), addr("10.0.0.2:8080")]
        );
    }

    #[test]
    fn refuses_bad_addresses_and_backends_naming_them() {
        let bad = |raw| compile(raw, outside).unwrap_err().to_string();
        assert_eq!(
            bad(vec![
                service("10.96.0.10:80", "shop/web", &[]),
                service("api.shop.svc:80", "shop/api", &[]),
            ]),
            "services[1].address \"api.shop.svc:80\" is not a dialable ip:port"
        );
        assert_eq!(
            bad(vec![service("0.0.0.0:80", "shop/web", &[])]),
            "services[0].address \"0.0.0.0:80\" is not a dialable ip:port"
        );
        assert_eq!(
            bad(vec![service(
                "10.96.0.10:80",
                "shop/web",
                &["10.0.0.1:8080", "10.0.0.2:0"]
            )]),
            "services[0] (\"shop/web\"): backends[1] \"10.0.0.2:0\" is not a dialable ip:port"
        );
        let huge = "9".repeat(1 << 20);
        let e = bad(vec![service(&huge, "shop/web", &[])]);
        assert!(e.len() < 120, "{e}");
        assert!(e.contains(&format!("... ({} bytes)", huge.len())), "{e}");
    }

    #[test]
    fn refuses_a_virtual_address_given_twice() {
        let e = compile(
            vec![
                service("10.96.0.10:80", "shop/web", &["10.0.0.1:8080"]),
                service("10.96.0.11:80", "shop/api", &[]),
                service("10.96.0.10:80", "shop/other", &[]),
            ],
            outside,
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "services[2].address 10.96.0.10:80 is given twice (also services[0])"
        );
    }
}
