//! What the control plane says this sidecar must enforce: the last good
//! discovery [`Snapshot`] and the authorization decision made from it.
//!
//! `watch` keeps the Discovery stream open and publishes snapshots; this
//! file compiles a snapshot (rejecting it whole if any part is invalid) and
//! decides. Deciding must stay cheap and lock-free: the caller holds an
//! `Arc<Snapshot>` taken from a `watch::Receiver`.

pub mod watch;

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use trellis_core::SpiffeId;
use trellis_proto::discovery::v1 as pb;

/// What happens to an outbound connection whose destination is not a mesh
/// endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutboundPolicy {
    #[default]
    Deny,
    Passthrough,
}

/// A validated discovery snapshot.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub version: u64,
    /// DER roots; may be empty when the control plane sent none.
    pub trust_bundle: Vec<CertificateDer<'static>>,
    /// Mesh endpoints: sidecar inbound address -> its SPIFFE ID.
    pub endpoints: HashMap<SocketAddr, SpiffeId>,
    /// Endpoint IPs that belong to exactly one identity (a pod address):
    /// a redirected connection to any port of that IP goes to that identity.
    endpoint_ips: HashMap<IpAddr, SpiffeId>,
    pub outbound_policy: OutboundPolicy,
    /// "deny", "allow-same-namespace" or "allow-mesh" (empty: unset).
    pub default_policy: String,
    /// The policies selecting this sidecar, as sent.
    pub policies: Vec<trellis_proto::policy::v1::Policy>,
}

/// Why a snapshot was refused (sent back as the NACK reason).
#[derive(Debug, thiserror::Error)]
pub enum InvalidSnapshot {
    #[error("trust_bundle[{index}] is not a certificate: {reason}")]
    Bundle { index: usize, reason: String },
    #[error("endpoints[{index}].address {address:?} is not ip:port")]
    EndpointAddress { index: usize, address: String },
    #[error("endpoints[{index}].spiffe_id {id:?}: {reason}")]
    EndpointId {
        index: usize,
        id: String,
        reason: trellis_core::spiffe::InvalidSpiffeId,
    },
    #[error("mesh.outbound_policy {0:?} is not \"deny\" or \"passthrough\"")]
    OutboundPolicy(String),
}

impl Snapshot {
    /// Validates and compiles a snapshot as received.
    pub fn compile(raw: pb::Snapshot) -> Result<Self, InvalidSnapshot> {
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
        let mut endpoints = HashMap::with_capacity(raw.endpoints.len());
        for (index, ep) in raw.endpoints.into_iter().enumerate() {
            let address: SocketAddr =
                ep.address
                    .parse()
                    .map_err(|_| InvalidSnapshot::EndpointAddress {
                        index,
                        address: ep.address.clone(),
                    })?;
            let id =
                SpiffeId::parse(&ep.spiffe_id).map_err(|reason| InvalidSnapshot::EndpointId {
                    index,
                    id: ep.spiffe_id.clone(),
                    reason,
                })?;
            endpoints.insert(address, id);
        }
        let endpoint_ips = pod_ips(&endpoints);
        let mesh = raw.mesh.unwrap_or_default();
        let outbound_policy = match mesh.outbound_policy.as_str() {
            "" | "deny" => OutboundPolicy::Deny,
            "passthrough" => OutboundPolicy::Passthrough,
            other => return Err(InvalidSnapshot::OutboundPolicy(other.to_string())),
        };
        Ok(Snapshot {
            version: raw.version,
            trust_bundle,
            endpoints,
            endpoint_ips,
            outbound_policy,
            default_policy: mesh.default_policy,
            policies: raw.policies,
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

/// The outcome of authorizing one inbound connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow { reason: Arc<str> },
    Deny { reason: Arc<str> },
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Allow { reason } => write!(f, "allow ({reason})"),
            Decision::Deny { reason } => write!(f, "deny ({reason})"),
        }
    }
}

/// Decides whether `peer` may connect to local `port` under `snapshot`.
///
/// For now every authenticated peer is allowed; the policy engine replaces
/// the body of this one function.
pub fn authorize(_snapshot: Option<&Snapshot>, _peer: &SpiffeId, _port: u16) -> Decision {
    static AUTHENTICATED: std::sync::LazyLock<Arc<str>> =
        std::sync::LazyLock::new(|| Arc::from("authenticated peer"));
    Decision::Allow {
        reason: AUTHENTICATED.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(address: &str, id: &str) -> pb::Endpoint {
        pb::Endpoint {
            address: address.into(),
            spiffe_id: id.into(),
        }
    }

    #[test]
    fn compiles_endpoints_and_mesh_config() {
        let s = Snapshot::compile(pb::Snapshot {
            version: 7,
            endpoints: vec![endpoint("10.0.0.1:15006", "spiffe://td/ns/a/sa/b")],
            mesh: Some(pb::MeshConfig {
                default_policy: "deny".into(),
                outbound_policy: "passthrough".into(),
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
        let s = Snapshot::compile(pb::Snapshot::default()).unwrap();
        assert_eq!(s.outbound_policy, OutboundPolicy::Deny);
    }

    #[test]
    fn rejects_invalid_snapshots_with_the_field() {
        let bad = |s: pb::Snapshot| Snapshot::compile(s).unwrap_err().to_string();
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
        let e = bad(pb::Snapshot {
            mesh: Some(pb::MeshConfig {
                outbound_policy: "maybe".into(),
                ..Default::default()
            }),
            ..Default::default()
        });
        assert!(e.contains("outbound_policy"), "{e}");
    }

    #[test]
    fn allows_every_authenticated_peer_for_now() {
        let peer = SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap();
        assert!(authorize(None, &peer, 8080).is_allowed());
    }
}
