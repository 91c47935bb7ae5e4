//! Snapshots sent as protobuf encoded ahead of time, so that what every
//! sidecar shares at a version (the trust bundle, the mesh endpoints, the
//! mesh config) is encoded once per version, not once per Watch stream.
//!
//! Protobuf lets a message's fields come in any order and in separate runs
//! (a decoder appends the elements of repeated fields and merges message
//! fields), so the concatenation of encoded `Snapshot`s that each set
//! different fields is the encoding of the one `Snapshot` that sets all of
//! them. The wire format is therefore exactly the `Snapshot` of
//! `discovery.proto`: sidecars, grpcurl and any other client decode it as
//! before. This module only joins bytes; it never decides what a snapshot
//! holds, and a part must never set a field another part sets.

use prost::Message;
use prost::bytes::Bytes;

use super::Snapshot;

/// A `Snapshot` as the bytes of its encoding, held in parts so that the
/// parts every stream shares are reference-counted, never copied, until
/// they are written to a connection.
#[derive(Clone, Debug, Default)]
pub struct EncodedSnapshot {
    parts: Vec<Bytes>,
}

impl EncodedSnapshot {
    /// The encoding of a `Snapshot` that sets only some fields: one part of
    /// an [`EncodedSnapshot`].
    pub fn part(fields: &Snapshot) -> Bytes {
        fields.encode_to_vec().into()
    }

    /// The snapshot whose encoding is `parts` one after the other; each is
    /// from [`EncodedSnapshot::part`], and no field is set in two parts.
    pub fn from_parts(parts: Vec<Bytes>) -> Self {
        Self { parts }
    }

    /// The parts, in the order they are written.
    pub fn into_parts(self) -> Vec<Bytes> {
        self.parts
    }

    /// The length of the encoded message.
    pub fn encoded_len(&self) -> usize {
        self.parts.iter().map(Bytes::len).sum()
    }

    /// The snapshot as a receiver decodes it.
    pub fn decode(&self) -> Result<Snapshot, prost::DecodeError> {
        let mut bytes = Vec::with_capacity(self.encoded_len());
        for part in &self.parts {
            bytes.extend_from_slice(part);
        }
        Snapshot::decode(bytes.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::v1::{Endpoint, MeshConfig, Revocation, Service};
    use crate::policy::v1::Policy;

    fn endpoint(address: &str, id: &str) -> Endpoint {
        Endpoint {
            address: address.into(),
            spiffe_id: id.into(),
        }
    }

    #[test]
    fn parts_decode_as_the_snapshot_that_sets_every_field() {
        let whole = Snapshot {
            version: 42,
            trust_bundle: vec![vec![1, 2, 3], vec![4]],
            endpoints: vec![
                endpoint("10.0.0.1:15006", "spiffe://td/ns/a/sa/web"),
                endpoint("10.0.0.2:15006", "spiffe://td/ns/a/sa/db"),
            ],
            policies: vec![Policy {
                name: "p".into(),
                namespace: "a".into(),
                ..Policy::default()
            }],
            mesh: Some(MeshConfig {
                default_policy: "deny".into(),
                outbound_policy: "passthrough".into(),
                opaque_ports: vec![5432],
            }),
            rate_limits: Vec::new(),
            endpoints_version: 0,
            services: vec![Service {
                address: "10.96.0.10:80".into(),
                name: "a/web".into(),
                backends: vec!["10.0.0.1:8080".into()],
                client_affinity: false,
            }],
            endpoint_changes: None,
            version_epoch: 7,
            revocations: vec![Revocation {
                spiffe_id: "spiffe://td/ns/a/sa/web".into(),
                revoked_at_unix: 1_800_000_000,
            }],
        };
        // The per-sidecar fields first, then the shared ones, as the control
        // plane sends them: the order of fields does not matter.
        let own = Snapshot {
            version: whole.version,
            version_epoch: whole.version_epoch,
            policies: whole.policies.clone(),
            ..Snapshot::default()
        };
        let shared = Snapshot {
            trust_bundle: whole.trust_bundle.clone(),
            endpoints: whole.endpoints.clone(),
            services: whole.services.clone(),
            mesh: whole.mesh.clone(),
            ..Snapshot::default()
        };
        let revocations = Snapshot {
            revocations: whole.revocations.clone(),
            ..Snapshot::default()
        };
        let encoded = EncodedSnapshot::from_parts(vec![
            EncodedSnapshot::part(&own),
            EncodedSnapshot::part(&shared),
            EncodedSnapshot::part(&revocations),
        ]);
        assert_eq!(encoded.encoded_len(), whole.encoded_len());
        assert_eq!(encoded.decode().unwrap(), whole);
    }
}
