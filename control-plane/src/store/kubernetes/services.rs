//! Kubernetes Services as virtual addresses: what a Service and an
//! EndpointSlice contribute to the cache, and the join that turns them into
//! the snapshot's [`Service`]s (each cluster IP and port with the ready
//! backends behind it).
//!
//! An app calls `api.shop.svc:8080`; its sidecar reads the Service's cluster
//! IP as the original destination (kube-proxy has not translated it yet),
//! which is no mesh endpoint. The snapshot tells it which backends stand
//! behind that address, so it dials one of them itself.
//!
//! Kubernetes semantics kept here, as kube-proxy reads the same objects:
//! - Only TCP ports (a port without `protocol` is TCP): the sidecar only
//!   intercepts TCP.
//! - A Service port is matched to an EndpointSlice port by name (the single
//!   unnamed port is `""`); the slice port holds the target port the
//!   EndpointSlice controller resolved for those endpoints, so a named
//!   `targetPort` needs nothing more.
//! - A backend is an endpoint whose `conditions.ready` is not false (unset
//!   means ready). `serving` and `terminating` are not read: the controller
//!   sets `ready` false for a terminating endpoint, so new connections go to
//!   ready ones only, and sets it true for every endpoint of a Service with
//!   `publishNotReadyAddresses`. kube-proxy's fallback to terminating
//!   endpoints when none is ready is not copied: such a call is refused
//!   with the reason that no backend is ready.
//! - A cluster IP takes backends of its own family only (the slice's
//!   `addressType`); FQDN slices are not read.
//!
//! This module never talks to the API server; odd objects (an unparseable
//! IP, a port out of range) lose the odd part and never panic.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::Service as KubeService;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;
use trellis_proto::discovery::v1::Service;

/// The label that names the Service an EndpointSlice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The address family of a cluster IP or of an EndpointSlice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: &IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

/// A TCP port with its name: a Service's port and an EndpointSlice's are
/// paired by name (`""` for the single unnamed port).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct NamedPort {
    pub name: String,
    pub port: u16,
}

/// What a Service with cluster IPs contributes: its virtual addresses.
/// Both lists are sorted and without duplicates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterIpService {
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<NamedPort>,
}

/// What an EndpointSlice contributes: ready backends of one Service in one
/// address family, at its (resolved) target ports. Lists are sorted and
/// without duplicates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceBackends {
    /// `namespace/name` of the Service the slice belongs to.
    pub service: String,
    pub family: Family,
    pub ports: Vec<NamedPort>,
    /// The addresses of the endpoints that are ready.
    pub ready: Vec<IpAddr>,
}

/// The virtual addresses of a Service: `None` for a headless Service
/// (`clusterIP: None`), an ExternalName one, one without a cluster IP, or
/// one without TCP ports, none of which a sidecar can see as a destination.
pub fn cluster_ip_service(service: &KubeService) -> Option<ClusterIpService> {
    let spec = service.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    // `clusterIPs` (dual-stack) holds `clusterIP` first; older objects only
    // have `clusterIP`.
    let ips: Vec<&String> = match spec.cluster_ips.as_deref() {
        Some(ips) if !ips.is_empty() => ips.iter().collect(),
        _ => spec.cluster_ip.iter().collect(),
    };
    let mut cluster_ips: Vec<IpAddr> = ips
        .into_iter()
        // "None" (headless) and "" (not allocated) do not parse.
        .filter_map(|ip| ip.parse().ok())
        .collect();
    cluster_ips.sort();
    cluster_ips.dedup();
    let mut ports: Vec<NamedPort> = spec
        .ports
        .iter()
        .flatten()
        .filter(|p| is_tcp(p.protocol.as_deref()))
        .filter_map(|p| named_port(p.name.as_deref(), Some(p.port)))
        .collect();
    ports.sort();
    ports.dedup();
    (!cluster_ips.is_empty() && !ports.is_empty())
        .then_some(ClusterIpService { cluster_ips, ports })
}

/// The ready backends an EndpointSlice lists: `None` for a slice that names
/// no Service (label `kubernetes.io/service-name`), an FQDN slice, or one
/// without a TCP port or a ready endpoint, none of which adds a backend.
pub fn slice_backends(slice: &EndpointSlice) -> Option<SliceBackends> {
    let service = slice
        .labels()
        .get(SERVICE_NAME_LABEL)
        .filter(|name| !name.is_empty())?;
    let family = match slice.address_type.as_str() {
        "IPv4" => Family::V4,
        "IPv6" => Family::V6,
        _ => return None,
    };
    let mut ports: Vec<NamedPort> = slice
        .ports
        .iter()
        .flatten()
        .filter(|p| is_tcp(p.protocol.as_deref()))
        // A port without a number ("all ports", selectorless Services)
        // gives no address to dial.
        .filter_map(|p| named_port(p.name.as_deref(), p.port))
        .collect();
    ports.sort();
    ports.dedup();
    let mut ready: Vec<IpAddr> = slice
        .endpoints
        .iter()
        .flatten()
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
        .flat_map(|e| &e.addresses)
        .filter_map(|a| a.parse::<IpAddr>().ok())
        .filter(|ip| Family::of(ip) == family)
        .collect();
    ready.sort();
    ready.dedup();
    if ports.is_empty() || ready.is_empty() {
        return None;
    }
    Some(SliceBackends {
        service: format!("{}/{service}", slice.namespace().unwrap_or_default()),
        family,
        ports,
        ready,
    })
}

fn is_tcp(protocol: Option<&str>) -> bool {
    protocol.is_none_or(|p| p == "TCP")
}

fn named_port(name: Option<&str>, port: Option<i32>) -> Option<NamedPort> {
    let port = u16::try_from(port?).ok().filter(|p| *p != 0)?;
    Some(NamedPort {
        name: name.unwrap_or_default().to_owned(),
        port,
    })
}

/// One [`Service`] per cluster IP and port of every Service in `services`
/// (`namespace/name` and what it contributes), with the ready backends the
/// `slices` of that Service list for the port's name in the IP's family,
/// sorted; a port no slice serves has none (a sidecar then refuses the call
/// and says why). The list is ordered by address, one entry per address:
/// the API server never gives two Services one cluster IP, and should two
/// objects claim one anyway, the first by name is kept.
///
/// The work is linear in the objects (plus sorting), as for Pods: slices
/// are grouped by Service once, not searched per port.
pub fn virtual_services<'a>(
    services: impl Iterator<Item = (&'a str, &'a ClusterIpService)>,
    slices: impl Iterator<Item = &'a SliceBackends>,
) -> Vec<Service> {
    let mut by_service: BTreeMap<&str, Vec<&SliceBackends>> = BTreeMap::new();
    for slice in slices {
        by_service
            .entry(slice.service.as_str())
            .or_default()
            .push(slice);
    }
    let mut out = Vec::new();
    for (name, service) in services {
        let slices = by_service.get(name).map_or(&[][..], Vec::as_slice);
        for port in &service.ports {
            for ip in &service.cluster_ips {
                let family = Family::of(ip);
                let mut backends: Vec<SocketAddr> = slices
                    .iter()
                    .filter(|s| s.family == family)
                    .flat_map(|s| {
                        s.ports
                            .iter()
                            .filter(|p| p.name == port.name)
                            .flat_map(|p| s.ready.iter().map(|a| SocketAddr::new(*a, p.port)))
                    })
                    .collect();
                backends.sort();
                backends.dedup();
                out.push(Service {
                    address: SocketAddr::new(*ip, port.port).to_string(),
                    name: name.to_owned(),
                    backends: backends.iter().map(ToString::to_string).collect(),
                    client_affinity: false,
                });
            }
        }
    }
    out.sort_by(|a, b| (&a.address, &a.name).cmp(&(&b.address, &b.name)));
    out.dedup_by(|later, kept| {
        let shared = later.address == kept.address;
        if shared {
            tracing::warn!(
                address = %kept.address,
                kept = %kept.name,
                left_out = %later.name,
                "two Services claim one cluster IP and port; only one is published"
            );
        }
        shared
    });
    out
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn service(spec: Value) -> KubeService {
        serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "api", "namespace": "shop", "resourceVersion": "4100"},
            "spec": spec,
        }))
        .unwrap()
    }

    fn slice(name: &str, address_type: &str, ports: Value, endpoints: Value) -> EndpointSlice {
        serde_json::from_value(json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": "shop", "resourceVersion": "4200",
                         "labels": {"kubernetes.io/service-name": "api",
                                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
            "addressType": address_type,
            "ports": ports,
            "endpoints": endpoints,
        }))
        .unwrap()
    }

    fn port(name: &str, port: u16) -> NamedPort {
        NamedPort {
            name: name.into(),
            port,
        }
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|ip| ip.parse().unwrap()).collect()
    }

    /// A dual-stack Service with two named TCP ports (targetPorts by name)
    /// and a UDP one, as the API server returns it.
    fn dual_stack_api() -> KubeService {
        service(json!({
            "type": "ClusterIP",
            "clusterIP": "10.96.14.2",
            "clusterIPs": ["10.96.14.2", "fd00:10:96::e02"],
            "ipFamilies": ["IPv4", "IPv6"],
            "ipFamilyPolicy": "PreferDualStack",
            "selector": {"app": "api"},
            "ports": [
                {"name": "http", "port": 8080, "targetPort": "web", "protocol": "TCP"},
                {"name": "grpc", "port": 9090, "targetPort": "rpc"},
                {"name": "stats", "port": 8125, "targetPort": 8125, "protocol": "UDP"},
            ],
        }))
    }

    #[test]
    fn a_dual_stack_service_is_its_cluster_ips_and_tcp_ports() {
        let converted = cluster_ip_service(&dual_stack_api()).unwrap();
        assert_eq!(
            converted.cluster_ips,
            ips(&["10.96.14.2", "fd00:10:96::e02"])
        );
        assert_eq!(converted.ports, [port("grpc", 9090), port("http", 8080)]);
    }

    #[test]
    fn an_older_service_with_only_a_cluster_ip_is_read_from_it() {
        let converted = cluster_ip_service(&service(json!({
            "clusterIP": "10.96.0.10",
            "ports": [{"port": 53, "protocol": "UDP"}, {"port": 9153}],
        })))
        .unwrap();
        assert_eq!(converted.cluster_ips, ips(&["10.96.0.10"]));
        assert_eq!(converted.ports, [port("", 9153)], "no protocol is TCP");
    }

    #[test]
    fn headless_external_name_and_odd_services_are_no_virtual_address() {
        let headless = service(json!({
            "clusterIP": "None", "clusterIPs": ["None"], "selector": {"app": "db"},
            "ports": [{"name": "pg", "port": 5432}],
        }));
        assert_eq!(cluster_ip_service(&headless), None);
        let external = service(json!({
            "type": "ExternalName", "externalName": "db.example.com",
            "ports": [{"port": 5432}],
        }));
        assert_eq!(cluster_ip_service(&external), None);
        let unallocated = service(json!({"clusterIP": "", "ports": [{"port": 80}]}));
        assert_eq!(cluster_ip_service(&unallocated), None);
        let udp_only = service(json!({"clusterIP": "10.96.0.10",
                                      "ports": [{"port": 53, "protocol": "UDP"}]}));
        assert_eq!(cluster_ip_service(&udp_only), None);
        let odd = service(json!({"clusterIPs": ["10.96.0.300", "10.96.0.11"],
                                 "ports": [{"port": 70000}, {"port": 0}, {"port": 80}]}));
        assert_eq!(
            cluster_ip_service(&odd),
            Some(ClusterIpService {
                cluster_ips: ips(&["10.96.0.11"]),
                ports: vec![port("", 80)],
            }),
            "the odd parts are dropped, the rest kept"
        );
        assert_eq!(cluster_ip_service(&KubeService::default()), None);
    }

    #[test]
    fn a_slice_lists_ready_and_unset_ready_endpoints_only() {
        let slice = slice(
            "api-x7k2p",
            "IPv4",
            json!([{"name": "http", "port": 8080, "protocol": "TCP"},
                   {"name": "stats", "port": 8125, "protocol": "UDP"}]),
            json!([
                {"addresses": ["10.244.2.9"], "conditions": {"ready": true, "serving": true, "terminating": false}},
                {"addresses": ["10.244.1.40"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["10.244.1.41"], "conditions": {"ready": false}},
                {"addresses": ["10.244.3.5"], "conditions": {}},
                {"addresses": ["10.244.3.6"]},
                {"addresses": ["not-an-ip", "fd00::7"]},
            ]),
        );
        let backends = slice_backends(&slice).unwrap();
        assert_eq!(backends.service, "shop/api");
        assert_eq!(backends.family, Family::V4);
        assert_eq!(backends.ports, [port("http", 8080)]);
        assert_eq!(
            backends.ready,
            ips(&["10.244.2.9", "10.244.3.5", "10.244.3.6"]),
            "not ready (terminating included), unparseable and the other family are left out"
        );
    }

    #[test]
    fn slices_that_add_no_backend_are_left_out() {
        let ready = json!([{"addresses": ["10.244.2.9"]}]);
        let http = json!([{"name": "http", "port": 8080}]);
        let mut unlabelled = slice("api-1", "IPv4", http.clone(), ready.clone());
        unlabelled.metadata.labels = None;
        assert_eq!(slice_backends(&unlabelled), None);
        let fqdn = slice(
            "api-2",
            "FQDN",
            http.clone(),
            json!([{"addresses": ["db.example.com"]}]),
        );
        assert_eq!(slice_backends(&fqdn), None);
        let all_ports = slice("api-3", "IPv4", json!([{"name": ""}]), ready.clone());
        assert_eq!(slice_backends(&all_ports), None);
        let none_ready = slice(
            "api-4",
            "IPv4",
            http,
            json!([{"addresses": ["10.244.2.9"], "conditions": {"ready": false}}]),
        );
        assert_eq!(slice_backends(&none_ready), None);
        assert_eq!(slice_backends(&EndpointSlice::default()), None);
    }

    fn backends(
        service: &str,
        family: Family,
        ports: &[(&str, u16)],
        ready: &[&str],
    ) -> SliceBackends {
        SliceBackends {
            service: service.into(),
            family,
            ports: ports.iter().map(|(n, p)| port(n, *p)).collect(),
            ready: ips(ready),
        }
    }

    fn entries(services: &[Service]) -> Vec<(&str, &str, Vec<&str>)> {
        services
            .iter()
            .map(|s| {
                let backends = s.backends.iter().map(String::as_str).collect();
                (s.address.as_str(), s.name.as_str(), backends)
            })
            .collect()
    }

    #[test]
    fn each_cluster_ip_and_port_gets_the_ready_backends_of_its_family_and_port_name() {
        let api = cluster_ip_service(&dual_stack_api()).unwrap();
        let web = ClusterIpService {
            cluster_ips: ips(&["10.96.30.7"]),
            ports: vec![port("", 80)],
        };
        // The targetPorts "web" and "rpc" were resolved by the controller:
        // 8080 and 9000 on one set of pods, 8081 on a second slice's pod.
        let slices = [
            backends(
                "shop/api",
                Family::V4,
                &[("http", 8080), ("grpc", 9000)],
                &["10.244.2.9"],
            ),
            backends(
                "shop/api",
                Family::V4,
                &[("http", 8081)],
                &["10.244.1.50", "10.244.2.9"],
            ),
            backends(
                "shop/api",
                Family::V6,
                &[("http", 8080)],
                &["fd00:10:244:2::9"],
            ),
            backends("other/api", Family::V4, &[("http", 7000)], &["10.244.9.9"]),
        ];
        let joined = virtual_services(
            [("shop/api", &api), ("shop/web", &web)].into_iter(),
            slices.iter(),
        );
        assert_eq!(
            entries(&joined),
            [
                (
                    "10.96.14.2:8080",
                    "shop/api",
                    vec!["10.244.1.50:8081", "10.244.2.9:8080", "10.244.2.9:8081"]
                ),
                ("10.96.14.2:9090", "shop/api", vec!["10.244.2.9:9000"]),
                ("10.96.30.7:80", "shop/web", vec![]),
                (
                    "[fd00:10:96::e02]:8080",
                    "shop/api",
                    vec!["[fd00:10:244:2::9]:8080"]
                ),
                ("[fd00:10:96::e02]:9090", "shop/api", vec![]),
            ],
            "a Service without slices, or a port no slice of the family serves, has no backends"
        );
    }

    #[test]
    fn two_services_claiming_one_address_publish_one() {
        let one = ClusterIpService {
            cluster_ips: ips(&["10.96.0.5"]),
            ports: vec![port("", 80)],
        };
        let joined = virtual_services(
            [("b/second", &one), ("a/first", &one)].into_iter(),
            std::iter::empty(),
        );
        assert_eq!(entries(&joined), [("10.96.0.5:80", "a/first", vec![])]);
    }
}
