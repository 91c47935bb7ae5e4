//! Services: virtual addresses (a Kubernetes Service's cluster IP and one
//! of its ports) and the backends behind each, as a snapshot carries them.
//!
//! An app that calls a Service connects to its cluster IP; the sidecar sees
//! that address as the original destination, which is no mesh endpoint. It
//! picks one of the service's backends in turn ([`Service::pick`]) and
//! treats it as the destination. Picking must stay lock-free and allocate
//! nothing: it runs once per connection.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use trellis_proto::discovery::v1 as pb;

use super::InvalidSnapshot;

/// The services of a snapshot, by virtual address.
pub type Services = HashMap<SocketAddr, Service>;

/// One virtual address with the addresses of its ready backends.
#[derive(Debug)]
pub struct Service {
    /// `namespace/name`, for logs and `/config`.
    pub name: Arc<str>,
    /// Where calls to the virtual address go; empty when none is ready.
    pub backends: Box<[SocketAddr]>,
    /// Counts picks; the next backend is this modulo their number.
    next: AtomicUsize,
}

impl Service {
    /// A service whose first pick is at a random place among its backends,
    /// so sidecars that receive the same list do not all start with the
    /// same backend.
    pub fn new(name: Arc<str>, backends: Box<[SocketAddr]>) -> Self {
        let start = match backends.len() {
            0 => 0,
            n => rand::random_range(0..n),
        };
        Service {
            name,
            backends,
            next: AtomicUsize::new(start),
        }
    }

    /// The next backend in turn, or `None` when none is ready.
    pub fn pick(&self) -> Option<SocketAddr> {
        if self.backends.is_empty() {
            return None;
        }
        // Relaxed: the counter orders nothing else; at worst two concurrent
        // picks see each other's increment late, and both still get a
        // backend of the list.
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        Some(self.backends[n % self.backends.len()])
    }
}

/// Compiles the services of a snapshot that carries them. Every address
/// must be a dialable `ip:port` (no unspecified IP, no port 0), and no
/// virtual address may be given twice: which backends it stands for would
/// be a guess.
pub(super) fn compile(raw: Vec<pb::Service>) -> Result<Services, InvalidSnapshot> {
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
            .map(|(backend, raw)| {
                dialable(raw).ok_or_else(|| InvalidSnapshot::ServiceBackend {
                    index,
                    name: quoted(&service.name),
                    backend,
                    address: quoted(raw),
                })
            })
            .collect::<Result<Box<[_]>, _>>()?;
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
        services.insert(address, Service::new(service.name.into(), backends));
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
    use trellis_core::SpiffeId;

    use crate::metrics::Metrics;
    use crate::policy::Snapshot;

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

    fn endpoint(address: &str, id: &str) -> pb::Endpoint {
        pb::Endpoint {
            address: address.into(),
            spiffe_id: id.into(),
        }
    }

    #[test]
    fn compiles_virtual_addresses_with_their_backends() {
        let services = compile(vec![
            service(
                "10.96.0.10:80",
                "shop/web",
                &["10.0.0.1:8080", "10.0.0.2:8080"],
            ),
            service("[fd00::10]:80", "shop/web", &["[fd00::1]:8080"]),
            service("10.96.0.11:5432", "shop/db", &[]),
        ])
        .unwrap();
        assert_eq!(services.len(), 3);
        let web = &services[&addr("10.96.0.10:80")];
        assert_eq!(&*web.name, "shop/web");
        assert_eq!(
            &*web.backends,
            [addr("10.0.0.1:8080"), addr("10.0.0.2:8080")]
        );
        assert_eq!(
            &*services[&addr("[fd00::10]:80")].backends,
            [addr("[fd00::1]:8080")]
        );
        assert!(services[&addr("10.96.0.11:5432")].backends.is_empty());
    }

    /// Services come with the endpoints: compiled when a snapshot carries
    /// them, kept (shared, with their round-robin place) when it refers to
    /// the endpoints of the version held, and refused when it does both.
    #[test]
    fn services_are_compiled_and_kept_with_held_endpoints() {
        let local = SpiffeId::parse("spiffe://td/ns/a/sa/web").unwrap();
        let metrics = Metrics::new();
        let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
        let held = Snapshot::compile(
            pb::Snapshot {
                version: 7,
                endpoints: vec![endpoint("10.0.0.1:15006", "spiffe://td/ns/shop/sa/api")],
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
        assert_eq!(api.backends.len(), 2);
        assert!(held.service_for("10.0.0.1:8080".parse().unwrap()).is_none());
        let first = api.pick().unwrap();

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
        let api = s.service_for(vip).unwrap();
        assert_ne!(api.pick(), Some(first), "the round robin goes on");

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
        let backends: Vec<SocketAddr> = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]
            .iter()
            .map(|a| addr(a))
            .collect();
        let service = Service::new("shop/web".into(), backends.clone().into());
        let first: Vec<SocketAddr> = (0..3).map(|_| service.pick().unwrap()).collect();
        let mut sorted = first.clone();
        sorted.sort();
        assert_eq!(sorted, backends, "each backend once per round");
        let second: Vec<SocketAddr> = (0..3).map(|_| service.pick().unwrap()).collect();
        assert_eq!(first, second, "the same order every round");

        let one = Service::new("shop/one".into(), vec![addr("10.0.0.9:80")].into());
        assert!((0..4).all(|_| one.pick() == Some(addr("10.0.0.9:80"))));
    }

    #[test]
    fn a_service_without_backends_picks_none() {
        let none = Service::new("shop/web".into(), Box::new([]));
        assert_eq!(none.pick(), None);
        assert_eq!(none.pick(), None);
    }

    #[test]
    fn refuses_bad_addresses_and_backends_naming_them() {
        let bad = |raw| compile(raw).unwrap_err().to_string();
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
        let e = compile(vec![
            service("10.96.0.10:80", "shop/web", &["10.0.0.1:8080"]),
            service("10.96.0.11:80", "shop/api", &[]),
            service("10.96.0.10:80", "shop/other", &[]),
        ])
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "services[2].address 10.96.0.10:80 is given twice (also services[0])"
        );
    }
}
