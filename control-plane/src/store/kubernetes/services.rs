//! Kubernetes Services as virtual addresses: what a Service and an
//! EndpointSlice contribute to the cache, and the join that turns them into
//! the snapshot's [`Service`]s (each virtual IP and port with the ready
//! backends behind it).
//!
//! An app calls `api.shop.svc:8080`; its sidecar reads the Service's cluster
//! IP as the original destination (kube-proxy has not translated it yet),
//! which is no mesh endpoint. The snapshot tells it which backends stand
//! behind that address, so it dials one of them itself.
//!
//! Which Services are published: those with at least one endpoint, ready
//! or not, that is a mesh endpoint (its IP is the IP of a running, injected
//! Pod). Only there does the sidecar gain anything: for any other Service
//! it would treat every backend as outside the mesh, exactly as it treats
//! the cluster IP itself (refused under the outbound policy `deny`; under
//! `passthrough` kube-proxy keeps handling it, node-local policies
//! included), and publishing it would only make snapshots grow with the
//! cluster. A published Service carries all its ready backends, meshed or
//! not; the sidecar chooses among them as the outbound policy says.
//! Endpoints that are not ready count toward the choice so that a meshed
//! Service whose pods all fail their readiness probe stays published with
//! no backend, and a call to it is refused as such, instead of flipping to
//! "outside the mesh" and back. A meshed Service whose endpoints are all
//! gone (scaled to zero, or only Pending pods) is no longer published: it
//! is outside the mesh.
//!
//! Kubernetes semantics kept here, as kube-proxy reads the same objects:
//! - The virtual IPs of a Service are its cluster IPs, its `externalIPs`
//!   and the IPs of `status.loadBalancer.ingress`, with the same ports and
//!   backends, each taking backends of its own family; an external or
//!   load-balancer IP of a family the Service has no cluster IP of is left
//!   out, as kube-proxy ignores it. A load-balancer IP with `ipMode: Proxy`
//!   (the load balancer must see the traffic) and the load-balancer IPs of a
//!   Service with `loadBalancerSourceRanges` (kube-proxy filters callers by
//!   source there) are left out too. `externalTrafficPolicy` is not read:
//!   kube-proxy too sends a pod's call to an external or load-balancer IP
//!   to any endpoint. Node ports are not published: a call to a node's IP
//!   follows the outbound policy.
//! - A Service with `internalTrafficPolicy: Local` is not published: the
//!   sidecar does not know which node a backend runs on, so it cannot keep
//!   to the local ones. A call to it follows the outbound policy: refused
//!   under `deny`, left to kube-proxy under `passthrough`.
//! - `sessionAffinity: ClientIP` is published as `client_affinity`.
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
//! - A virtual IP takes backends of its own family only (the slice's
//!   `addressType`); FQDN slices are not read.
//!
//! This module never talks to the API server; odd objects (an unparseable
//! IP, a port out of range) lose the odd part and never panic.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::Service as KubeService;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;
use trellis_proto::discovery::v1::Service;

use super::objects::object_key;

/// The label that names the Service an EndpointSlice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The address family of a virtual IP or of an EndpointSlice.
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

/// What a Service contributes: the addresses a caller in the cluster may
/// dial for it. Both lists are sorted and without duplicates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtualIps {
    /// Cluster IPs, external IPs and load-balancer IPs.
    pub ips: Vec<IpAddr>,
    pub ports: Vec<NamedPort>,
    /// `sessionAffinity: ClientIP`.
    pub client_affinity: bool,
}

/// What an EndpointSlice contributes: the endpoints of one Service in one
/// address family, at its (resolved) target ports. Lists are sorted and
/// without duplicates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceBackends {
    /// `namespace/name` of the Service the slice belongs to.
    pub service: String,
    pub family: Family,
    pub ports: Vec<NamedPort>,
    /// The addresses of the endpoints that are ready: the backends.
    pub ready: Vec<IpAddr>,
    /// The addresses of the endpoints that are not (starting, failing a
    /// probe, terminating): no backends, but they tell whether the Service
    /// is in the mesh.
    pub not_ready: Vec<IpAddr>,
    /// Those of `not_ready` that are terminating and still serving (a pod
    /// draining after its deletion, its readiness probe passing): the
    /// backends of last resort, when a Service has no ready one.
    pub terminating: Vec<IpAddr>,
}

impl SliceBackends {
    fn endpoints(&self) -> impl Iterator<Item = &IpAddr> {
        self.ready.iter().chain(&self.not_ready)
    }
}

/// The virtual IPs of a Service: `None` for a headless Service
/// (`clusterIP: None`), an ExternalName one, one without a cluster IP, one
/// without TCP ports, none of which a sidecar can see as a destination, and
/// one with `internalTrafficPolicy: Local`, which a sidecar cannot honour.
pub fn virtual_ips(service: &KubeService) -> Option<VirtualIps> {
    let spec = service.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    // `clusterIPs` (dual-stack) holds `clusterIP` first; older objects only
    // have `clusterIP`.
    let cluster_ips: Vec<&String> = match spec.cluster_ips.as_deref() {
        Some(ips) if !ips.is_empty() => ips.iter().collect(),
        _ => spec.cluster_ip.iter().collect(),
    };
    let mut ips: Vec<IpAddr> = cluster_ips
        .into_iter()
        // "None" (headless) and "" (not allocated) do not parse.
        .filter_map(|ip| ip.parse().ok())
        .collect();
    let families: Vec<Family> = ips.iter().map(Family::of).collect();
    let external = spec.external_ips.iter().flatten().map(String::as_str);
    // Callers the ranges leave out are dropped by kube-proxy, which the
    // sidecar cannot tell apart.
    let filtered = spec
        .load_balancer_source_ranges
        .as_ref()
        .is_some_and(|ranges| !ranges.is_empty());
    let load_balancer = service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter(|_| !filtered)
        .filter(|ingress| ingress.ip_mode.as_deref() != Some("Proxy"))
        .filter_map(|ingress| ingress.ip.as_deref());
    ips.extend(
        external
            .chain(load_balancer)
            .filter_map(|ip| ip.parse::<IpAddr>().ok())
            .filter(|ip| families.contains(&Family::of(ip))),
    );
    ips.sort();
    ips.dedup();
    let mut ports: Vec<NamedPort> = spec
        .ports
        .iter()
        .flatten()
        .filter(|p| is_tcp(p.protocol.as_deref()))
        .filter_map(|p| named_port(p.name.as_deref(), Some(p.port)))
        .collect();
    ports.sort();
    ports.dedup();
    if ips.is_empty() || ports.is_empty() {
        return None;
    }
    if spec.internal_traffic_policy.as_deref() == Some("Local") {
        tracing::debug!(
            service = %object_key(service),
            "Service not published: internalTrafficPolicy Local needs the caller's node, \
             which a sidecar does not know; kube-proxy keeps handling it"
        );
        return None;
    }
    Some(VirtualIps {
        ips,
        ports,
        client_affinity: spec.session_affinity.as_deref() == Some("ClientIP"),
    })
}

/// The endpoints an EndpointSlice lists: `None` for a slice that names no
/// Service (label `kubernetes.io/service-name`), an FQDN slice, or one
/// without an endpoint address of its family.
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
    let (mut ready, mut not_ready, mut terminating) = (Vec::new(), Vec::new(), Vec::new());
    for endpoint in slice.endpoints.iter().flatten() {
        let conditions = endpoint.conditions.as_ref();
        // Unset conditions are true, as the API documents for `ready` and
        // `serving`; `terminating` unset is false.
        let is_ready = conditions.and_then(|c| c.ready) != Some(false);
        let draining = conditions.and_then(|c| c.terminating) == Some(true)
            && conditions.and_then(|c| c.serving) != Some(false);
        let addresses = endpoint
            .addresses
            .iter()
            .filter_map(|a| a.parse::<IpAddr>().ok())
            .filter(|ip| Family::of(ip) == family);
        if is_ready {
            ready.extend(addresses);
        } else {
            let from = not_ready.len();
            not_ready.extend(addresses);
            if draining {
                terminating.extend_from_slice(&not_ready[from..]);
            }
        }
    }
    for list in [&mut ready, &mut not_ready, &mut terminating] {
        list.sort();
        list.dedup();
    }
    if ready.is_empty() && not_ready.is_empty() {
        return None;
    }
    Some(SliceBackends {
        service: format!("{}/{service}", slice.namespace().unwrap_or_default()),
        family,
        ports,
        ready,
        not_ready,
        terminating,
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

/// Two Services that claim one address and port (`ip:port`): `kept`, the
/// first by name, is published there, `left_out` is not.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Clash {
    pub address: String,
    pub kept: String,
    pub left_out: String,
}

impl Clash {
    /// Logs the clash. The join runs at every change of a Service, an
    /// EndpointSlice or a mesh endpoint, and at every list of them: the
    /// cache logs a clash when it begins, not at each join.
    pub fn warn(&self) {
        tracing::warn!(
            address = %self.address,
            kept = %self.kept,
            left_out = %self.left_out,
            "two Services claim one address and port; only one is published"
        );
    }
}

/// What [`virtual_services`] publishes, and the clashes it settled.
#[derive(Debug)]
pub struct Joined {
    pub services: Vec<Service>,
    pub clashes: BTreeSet<Clash>,
}

/// One [`Service`] per virtual IP and port of every Service in `services`
/// (`namespace/name` and what it contributes) that is in the mesh: one of
/// the endpoints its `slices` list, ready or not, has an IP in `mesh` (the
/// IPs of the mesh endpoints). Each gets the ready backends the slices of
/// that Service list for the port's name in the IP's family, sorted, or,
/// when none is ready, the terminating ones still serving (as kube-proxy
/// falls back to them); a port no slice serves has none (a sidecar then
/// refuses the call and says why).
/// The list is ordered by address, one entry per address: should two
/// Services claim one (the API server never gives two Services one cluster
/// IP, but external and load-balancer IPs are not checked), the first by
/// name is kept, and the clash is returned with the list, not logged.
///
/// The work is linear in the objects (plus sorting), as for Pods: slices
/// are grouped by Service once, not searched per port.
pub fn virtual_services<'a>(
    services: impl Iterator<Item = (&'a str, &'a VirtualIps)>,
    slices: impl Iterator<Item = &'a SliceBackends>,
    mesh: &HashSet<IpAddr>,
) -> Joined {
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
        let meshed = slices
            .iter()
            .flat_map(|s| s.endpoints())
            .any(|ip| mesh.contains(ip));
        if !meshed {
            continue;
        }
        for port in &service.ports {
            for ip in &service.ips {
                let family = Family::of(ip);
                let at_port = |pick: fn(&SliceBackends) -> &[IpAddr]| -> Vec<SocketAddr> {
                    slices
                        .iter()
                        .filter(|s| s.family == family)
                        .flat_map(|s| {
                            s.ports
                                .iter()
                                .filter(|p| p.name == port.name)
                                .flat_map(move |p| {
                                    pick(s).iter().map(|a| SocketAddr::new(*a, p.port))
                                })
                        })
                        .collect()
                };
                let mut backends = at_port(|s| &s.ready);
                if backends.is_empty() {
                    // As kube-proxy does: with no ready backend, the pods
                    // still draining their connections serve new ones too,
                    // so a rollout that leaves none ready drops no call.
                    backends = at_port(|s| &s.terminating);
                }
                backends.sort();
                backends.dedup();
                out.push(Service {
                    address: SocketAddr::new(*ip, port.port).to_string(),
                    name: name.to_owned(),
                    backends: backends.iter().map(ToString::to_string).collect(),
                    client_affinity: service.client_affinity,
                });
            }
        }
    }
    out.sort_by(|a, b| (&a.address, &a.name).cmp(&(&b.address, &b.name)));
    let mut clashes = BTreeSet::new();
    out.dedup_by(|later, kept| {
        let shared = later.address == kept.address;
        if shared {
            clashes.insert(Clash {
                address: kept.address.clone(),
                kept: kept.name.clone(),
                left_out: later.name.clone(),
            });
        }
        shared
    });
    Joined {
        services: out,
        clashes,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn service(spec: Value) -> KubeService {
        service_with_status(spec, json!({"loadBalancer": {}}))
    }

    fn service_with_status(spec: Value, status: Value) -> KubeService {
        serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "api", "namespace": "shop", "resourceVersion": "4100"},
            "spec": spec,
            "status": status,
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
            "sessionAffinity": "None",
            "internalTrafficPolicy": "Cluster",
        }))
    }

    #[test]
    fn a_dual_stack_service_is_its_cluster_ips_and_tcp_ports() {
        let converted = virtual_ips(&dual_stack_api()).unwrap();
        assert_eq!(converted.ips, ips(&["10.96.14.2", "fd00:10:96::e02"]));
        assert_eq!(converted.ports, [port("grpc", 9090), port("http", 8080)]);
        assert!(!converted.client_affinity);
    }

    #[test]
    fn an_older_service_with_only_a_cluster_ip_is_read_from_it() {
        let converted = virtual_ips(&service(json!({
            "clusterIP": "10.96.0.10",
            "ports": [{"port": 53, "protocol": "UDP"}, {"port": 9153}],
        })))
        .unwrap();
        assert_eq!(converted.ips, ips(&["10.96.0.10"]));
        assert_eq!(converted.ports, [port("", 9153)], "no protocol is TCP");
    }

    #[test]
    fn session_affinity_client_ip_asks_for_client_affinity() {
        let converted = virtual_ips(&service(json!({
            "clusterIP": "10.96.0.12",
            "ports": [{"port": 80}],
            "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 10800}},
        })))
        .unwrap();
        assert!(converted.client_affinity);
    }

    /// A LoadBalancer Service as a cloud (or MetalLB) leaves it: external
    /// IPs of both families on a single-stack IPv4 Service, an ingress IP
    /// and an ingress hostname.
    #[test]
    fn external_and_load_balancer_ips_of_the_services_family_are_virtual_ips() {
        let spec = json!({
            "type": "LoadBalancer",
            "clusterIP": "10.96.200.5",
            "clusterIPs": ["10.96.200.5"],
            "ipFamilies": ["IPv4"],
            "externalIPs": ["198.51.100.7", "2001:db8::7", "not-an-ip", "10.96.200.5"],
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 31380}],
        });
        let status = json!({"loadBalancer": {"ingress": [
            {"ip": "172.18.255.200", "ipMode": "VIP"},
            {"ip": "172.18.255.201"},
            {"ip": "172.18.255.202", "ipMode": "Proxy"},
            {"hostname": "storefront.example.com"},
        ]}});
        let converted = virtual_ips(&service_with_status(spec.clone(), status.clone())).unwrap();
        assert_eq!(
            converted.ips,
            ips(&[
                "10.96.200.5",
                "172.18.255.200",
                "172.18.255.201",
                "198.51.100.7"
            ]),
            "an IP of the other family, a hostname and an ingress the load balancer \
             must see (ipMode Proxy) are left out"
        );
        assert_eq!(converted.ports, [port("http", 80)], "node ports are not");

        let mut ranged = spec;
        ranged["loadBalancerSourceRanges"] = json!(["203.0.113.0/24"]);
        let converted = virtual_ips(&service_with_status(ranged, status)).unwrap();
        assert_eq!(
            converted.ips,
            ips(&["10.96.200.5", "198.51.100.7"]),
            "kube-proxy filters callers of the load-balancer IPs by source"
        );
    }

    #[test]
    fn a_service_with_internal_traffic_policy_local_is_not_published() {
        let mut local = dual_stack_api();
        local.spec.as_mut().unwrap().internal_traffic_policy = Some("Local".into());
        assert_eq!(virtual_ips(&local), None);
    }

    #[test]
    fn headless_external_name_and_odd_services_are_no_virtual_address() {
        let headless = service(json!({
            "clusterIP": "None", "clusterIPs": ["None"], "selector": {"app": "db"},
            "externalIPs": ["198.51.100.8"],
            "ports": [{"name": "pg", "port": 5432}],
        }));
        assert_eq!(virtual_ips(&headless), None);
        let external = service(json!({
            "type": "ExternalName", "externalName": "db.example.com",
            "ports": [{"port": 5432}],
        }));
        assert_eq!(virtual_ips(&external), None);
        let unallocated = service(json!({"clusterIP": "", "ports": [{"port": 80}]}));
        assert_eq!(virtual_ips(&unallocated), None);
        let udp_only = service(json!({"clusterIP": "10.96.0.10",
                                      "ports": [{"port": 53, "protocol": "UDP"}]}));
        assert_eq!(virtual_ips(&udp_only), None);
        let odd = service(json!({"clusterIPs": ["10.96.0.300", "10.96.0.11"],
                                 "ports": [{"port": 70000}, {"port": 0}, {"port": 80}]}));
        assert_eq!(
            virtual_ips(&odd),
            Some(VirtualIps {
                ips: ips(&["10.96.0.11"]),
                ports: vec![port("", 80)],
                client_affinity: false,
            }),
            "the odd parts are dropped, the rest kept"
        );
        assert_eq!(virtual_ips(&KubeService::default()), None);
    }

    #[test]
    fn a_slice_lists_ready_and_unset_ready_endpoints_as_backends() {
        let slice = slice(
            "api-x7k2p",
            "IPv4",
            json!([{"name": "http", "port": 8080, "protocol": "TCP"},
                   {"name": "stats", "port": 8125, "protocol": "UDP"}]),
            json!([
                {"addresses": ["10.244.2.9"], "conditions": {"ready": true, "serving": true, "terminating": false}},
                {"addresses": ["10.244.1.40"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["10.244.1.41"], "conditions": {"ready": false}},
                {"addresses": ["10.244.1.42"], "conditions": {"ready": false, "serving": false, "terminating": true}},
                {"addresses": ["10.244.1.43"], "conditions": {"ready": false, "terminating": true}},
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
        assert_eq!(
            backends.not_ready,
            ips(&["10.244.1.40", "10.244.1.41", "10.244.1.42", "10.244.1.43"])
        );
        assert_eq!(
            backends.terminating,
            ips(&["10.244.1.40", "10.244.1.43"]),
            "terminating and serving (unset is serving): the backends of last resort"
        );
    }

    #[test]
    fn slices_without_endpoints_are_left_out() {
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
        let placeholder = slice("api-3", "IPv4", Value::Null, Value::Null);
        assert_eq!(slice_backends(&placeholder), None);
        assert_eq!(slice_backends(&EndpointSlice::default()), None);

        // Slices whose endpoints give no backend still say which pods stand
        // behind the Service.
        let all_ports = slice("api-4", "IPv4", json!([{"name": ""}]), ready);
        let all_ports = slice_backends(&all_ports).unwrap();
        assert_eq!(
            (all_ports.ports.len(), all_ports.ready.len()),
            (0, 1),
            "a port without a number is no address to dial"
        );
        let none_ready = slice(
            "api-5",
            "IPv4",
            http,
            json!([{"addresses": ["10.244.2.9"], "conditions": {"ready": false}}]),
        );
        let none_ready = slice_backends(&none_ready).unwrap();
        assert!(none_ready.ready.is_empty());
        assert_eq!(none_ready.not_ready, ips(&["10.244.2.9"]));
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
            not_ready: Vec::new(),
            terminating: Vec::new(),
        }
    }

    fn mesh(list: &[&str]) -> HashSet<IpAddr> {
        ips(list).into_iter().collect()
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
    fn each_virtual_ip_and_port_gets_the_ready_backends_of_its_family_and_port_name() {
        let api = virtual_ips(&dual_stack_api()).unwrap();
        let web = VirtualIps {
            ips: ips(&["10.96.30.7", "198.51.100.7"]),
            ports: vec![port("", 80)],
            client_affinity: true,
        };
        // The targetPorts "web" and "rpc" were resolved by the controller:
        // 8080 and 9000 on one set of pods, 8081 on a second slice's pod.
        let mut starting = backends("shop/web", Family::V4, &[("", 8080)], &[]);
        starting.not_ready = ips(&["10.244.5.5"]);
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
            starting,
        ];
        let joined = virtual_services(
            [("shop/api", &api), ("shop/web", &web)].into_iter(),
            slices.iter(),
            &mesh(&["10.244.2.9", "10.244.5.5", "10.244.9.9"]),
        )
        .services;
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
                ("198.51.100.7:80", "shop/web", vec![]),
                (
                    "[fd00:10:96::e02]:8080",
                    "shop/api",
                    vec!["[fd00:10:244:2::9]:8080"]
                ),
                ("[fd00:10:96::e02]:9090", "shop/api", vec![]),
            ],
            "a Service whose endpoints are not ready, or a port no slice of the family \
             serves, has no backends"
        );
        let affinity: Vec<_> = joined.iter().map(|s| s.client_affinity).collect();
        assert_eq!(affinity, [false, false, true, true, false, false]);
    }

    /// A rollout that leaves a Service no ready pod: the pods draining
    /// after their deletion, still serving, take its calls until a new one
    /// is ready, as kube-proxy sends them; one that no longer serves never
    /// does, and a ready pod wins over every draining one.
    #[test]
    fn with_no_ready_backend_the_terminating_ones_still_serving_take_the_calls() {
        let endpoints = |list: Value| {
            slice_backends(&slice(
                "api-r0ll",
                "IPv4",
                json!([{"name": "http", "port": 8080}]),
                list,
            ))
            .unwrap()
        };
        let draining = json!({"addresses": ["10.244.1.40"],
            "conditions": {"ready": false, "serving": true, "terminating": true}});
        let stopped = json!({"addresses": ["10.244.1.41"],
            "conditions": {"ready": false, "serving": false, "terminating": true}});
        let starting = json!({"addresses": ["10.244.2.7"],
            "conditions": {"ready": false, "serving": false, "terminating": false}});
        let ready = json!({"addresses": ["10.244.2.8"],
            "conditions": {"ready": true, "serving": true, "terminating": false}});
        let api = VirtualIps {
            ips: ips(&["10.96.14.2"]),
            ports: vec![port("http", 80)],
            client_affinity: false,
        };
        let backends_of = |list: Value| {
            let slices = [endpoints(list)];
            let joined = virtual_services(
                [("shop/api", &api)].into_iter(),
                slices.iter(),
                &mesh(&["10.244.1.40", "10.244.1.41", "10.244.2.7", "10.244.2.8"]),
            )
            .services;
            assert_eq!(joined.len(), 1, "{joined:?}");
            joined[0].backends.clone()
        };
        assert_eq!(
            backends_of(json!([draining, stopped, starting])),
            ["10.244.1.40:8080"],
            "no ready pod: the draining one that still serves"
        );
        assert_eq!(
            backends_of(json!([draining, stopped, starting, ready])),
            ["10.244.2.8:8080"],
            "a ready pod: only it"
        );
        assert!(
            backends_of(json!([stopped, starting])).is_empty(),
            "none serving: no backend, and the sidecar says why"
        );
    }

    #[test]
    fn only_services_with_a_mesh_endpoint_are_published() {
        let one_port = |ip: &str| VirtualIps {
            ips: ips(&[ip]),
            ports: vec![port("", 80)],
            client_affinity: false,
        };
        let (mixed, unmeshed, empty) = (
            one_port("10.96.0.1"),
            one_port("10.96.0.2"),
            one_port("10.96.0.3"),
        );
        let slices = [
            backends(
                "shop/mixed",
                Family::V4,
                &[("", 8080)],
                &["10.244.1.1", "10.244.7.7"],
            ),
            backends(
                "kube-system/unmeshed",
                Family::V4,
                &[("", 53)],
                &["10.244.0.3"],
            ),
        ];
        let services = [
            ("kube-system/unmeshed", &unmeshed),
            ("shop/empty", &empty),
            ("shop/mixed", &mixed),
        ];
        let joined =
            virtual_services(services.into_iter(), slices.iter(), &mesh(&["10.244.1.1"])).services;
        assert_eq!(
            entries(&joined),
            [(
                "10.96.0.1:80",
                "shop/mixed",
                vec!["10.244.1.1:8080", "10.244.7.7:8080"]
            )],
            "a Service with a mesh endpoint keeps its other backends; one without \
             (no sidecar behind it, or no endpoint at all) is not published"
        );
        let joined = virtual_services(services.into_iter(), slices.iter(), &HashSet::new());
        assert!(joined.services.is_empty() && joined.clashes.is_empty());
    }

    #[test]
    fn two_services_claiming_one_address_publish_one() {
        let one = VirtualIps {
            ips: ips(&["198.51.100.5"]),
            ports: vec![port("", 80)],
            client_affinity: false,
        };
        let slices = [
            backends("a/first", Family::V4, &[("", 80)], &["10.244.1.1"]),
            backends("b/second", Family::V4, &[("", 80)], &["10.244.1.2"]),
        ];
        let joined = virtual_services(
            [("b/second", &one), ("a/first", &one)].into_iter(),
            slices.iter(),
            &mesh(&["10.244.1.1", "10.244.1.2"]),
        );
        assert_eq!(
            entries(&joined.services),
            [("198.51.100.5:80", "a/first", vec!["10.244.1.1:80"])]
        );
        let clash = Clash {
            address: "198.51.100.5:80".into(),
            kept: "a/first".into(),
            left_out: "b/second".into(),
        };
        assert_eq!(joined.clashes, BTreeSet::from([clash]));
    }
}
