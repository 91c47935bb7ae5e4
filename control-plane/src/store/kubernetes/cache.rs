//! The in-memory reflection of what the API server holds: per object
//! (kind, `namespace/name`), its resourceVersion and what it contributes to
//! snapshots (a validated policy or rate limit, a Pod's mesh endpoints, a
//! Service's virtual IPs and ports, an EndpointSlice's endpoints).
//! Services and EndpointSlices are held apart, as the API server holds
//! them, so an event changes one entry whatever the other kind holds; the
//! join that publishes them with the mesh endpoints ([`Cache::services`])
//! is rebuilt whenever a Service, an EndpointSlice or a mesh endpoint
//! changes (linear in those objects, once per change rather than once per
//! snapshot read).
//!
//! The snapshot version is a name of the published content, not a counter:
//! every policy, rate limit and Pod entry has a digest (SHA-256 of its kind,
//! key and canonical content), the digests are combined with XOR
//! (order-free, updated per event in O(1)), and the digest of the published
//! services and the mesh config are mixed in. Services and EndpointSlices
//! count only through what they publish: a change no sidecar would see (a
//! Service outside the mesh, a headless one, a slice's new resourceVersion)
//! moves no version and announces nothing. Two replicas holding the same
//! objects therefore announce the same version whatever order or history
//! brought them there, and different content gets a different version (a
//! 63-bit collision aside). Versions are not ordered: a deletion may lower
//! one.
//!
//! This module never talks to the API server and never validates a policy:
//! the reflector hands it finished entries.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::{IpAddr, SocketAddr};

use prost::Message;
use sha2::{Digest, Sha256};
use trellis_proto::discovery::v1::Service;
use trellis_proto::policy::v1::{Policy, RateLimit};

use super::services::{Clash, SliceBackends, VirtualIps, virtual_services};
use crate::store::{Position, WorkloadRecord};

/// The kinds the store reflects. A new kind is a variant here, an [`Entry`]
/// variant, a conversion (in `objects`, or `services` for Services and
/// EndpointSlices) and a watch in `connect`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    AuthorizationPolicy,
    RateLimitPolicy,
    Pod,
    Service,
    EndpointSlice,
}

impl Kind {
    /// Every kind, each with its watch.
    pub const ALL: [Kind; 5] = [
        Kind::AuthorizationPolicy,
        Kind::RateLimitPolicy,
        Kind::Pod,
        Kind::Service,
        Kind::EndpointSlice,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::RateLimitPolicy => "RateLimitPolicy",
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
        }
    }

    /// Whether the kind counts in the policy generation; the cache also
    /// keeps a position in these kinds' history, which writes wait for.
    pub fn is_policy(self) -> bool {
        matches!(self, Kind::AuthorizationPolicy | Kind::RateLimitPolicy)
    }

    /// Whether the kind's objects are joined into the published services.
    fn feeds_services(self) -> bool {
        matches!(self, Kind::Pod | Kind::Service | Kind::EndpointSlice)
    }
}

/// What one object contributes to snapshots.
#[derive(Clone, Debug, PartialEq)]
pub enum Entry {
    /// A valid policy; its revision is the object's `metadata.generation`.
    Policy(Policy),
    /// A valid rate limit and its revision (`metadata.generation`).
    RateLimit(RateLimit, u64),
    /// A running, injected Pod: one endpoint per pod IP.
    Endpoints(Vec<WorkloadRecord>),
    /// A Service with cluster IPs: its virtual IPs and ports.
    Service(VirtualIps),
    /// An EndpointSlice: the endpoints of one Service.
    Backends(SliceBackends),
}

/// An object as the reflector read it.
#[derive(Clone, Debug)]
pub struct Reflected {
    pub resource_version: String,
    pub entry: Entry,
}

#[derive(Debug)]
struct Slot {
    resource_version: String,
    entry: Entry,
    /// 0 for Services and EndpointSlices, which count through
    /// `services_digest`.
    digest: u64,
}

/// See the module docs.
#[derive(Debug)]
pub struct Cache {
    objects: BTreeMap<(Kind, String), Slot>,
    /// XOR of every slot's digest.
    content: u64,
    /// XOR of the policy and rate limit slots' digests.
    policy_content: u64,
    /// What Services and EndpointSlices publish, joined with the mesh
    /// endpoints.
    services: Vec<Service>,
    services_digest: u64,
    /// The claims of one address by two Services among `services`, each
    /// logged when it began: the join runs at every change and list of
    /// the kinds it reads.
    clashes: BTreeSet<Clash>,
    mesh_config: String,
    synced: BTreeSet<Kind>,
    /// The highest resourceVersion each policy kind's watch has delivered.
    position: Position,
    /// Objects this replica deleted, with the deletion's resourceVersion,
    /// until the watch delivers the deletion: an event older than it (the
    /// watch echoing the object's creation, say) must not bring the object
    /// back meanwhile.
    deleted: BTreeMap<(Kind, String), u64>,
}

impl Default for Cache {
    fn default() -> Self {
        Self {
            objects: BTreeMap::new(),
            content: 0,
            policy_content: 0,
            services: Vec::new(),
            services_digest: services_digest(&[]),
            clashes: BTreeSet::new(),
            mesh_config: String::new(),
            synced: BTreeSet::new(),
            deleted: BTreeMap::new(),
            position: Position::default(),
        }
    }
}

const VERSION_MASK: u64 = (1 << 63) - 1;

impl Cache {
    /// The snapshot version: a name of the content (never 0, below 2^63).
    pub fn version(&self) -> u64 {
        let mesh = digest_bytes(&[b"mesh", self.mesh_config.as_bytes()]);
        nonzero(self.content ^ self.services_digest ^ mesh)
    }

    /// The policy generation: a name of the policies and rate limits alone.
    pub fn policy_generation(&self) -> u64 {
        nonzero(self.policy_content)
    }

    /// How far into each policy kind's history the watches have brought
    /// the cache (see [`Position`]).
    pub fn position(&self) -> Position {
        self.position
    }

    /// Records that the watch of `kind` delivered an event at
    /// resourceVersion `at` ([`numeric`]; whatever the event did to the
    /// content); true when the position moved. Kinds other than the two
    /// policy kinds, and 0 (no resourceVersion that is a number), move
    /// nothing.
    pub fn reached(&mut self, kind: Kind, at: u64) -> bool {
        let held = match kind {
            Kind::AuthorizationPolicy => &mut self.position.policies,
            Kind::RateLimitPolicy => &mut self.position.rate_limits,
            _ => return false,
        };
        let moved = at > *held;
        *held = (*held).max(at);
        moved
    }

    /// Whether the first full list of `kind` has been read.
    pub fn is_synced(&self, kind: Kind) -> bool {
        self.synced.contains(&kind)
    }

    /// Stores the mesh config; true when it changed.
    pub fn set_mesh_config(&mut self, encoded: &str) -> bool {
        if self.mesh_config == encoded {
            return false;
        }
        encoded.clone_into(&mut self.mesh_config);
        true
    }

    /// Adds or updates one object; `None` (an invalid policy, a Pod that is
    /// no endpoint) removes it. An event older than what is held (by
    /// numeric resourceVersion, as every API server writes them) is ignored:
    /// a write's own answer may arrive before its watch event. True when the
    /// published content (so the version) changed.
    pub fn apply(&mut self, kind: Kind, key: &str, object: Option<Reflected>) -> bool {
        let before = self.version();
        if self.put(kind, key, object) && kind.feeds_services() {
            self.publish_services();
        }
        self.version() != before
    }

    /// Stores the API server's answer to this replica's write of one policy
    /// object, so the writer reads its write before its watch brings it.
    /// Nothing is stored when the position of `kind` is at or past the
    /// answer's resourceVersion: a watch delivers its kind in
    /// resourceVersion order, so the cache already holds this write or a
    /// later change of the object, perhaps another writer's deletion, of
    /// which nothing else is left to keep the answer out. True when the
    /// published content changed.
    pub fn apply_written(&mut self, kind: Kind, key: &str, written: Reflected) -> bool {
        let at = numeric(Some(&written.resource_version));
        if at != 0 && self.position_of(kind) >= at {
            return false;
        }
        self.apply(kind, key, Some(written))
    }

    /// The position of one policy kind; 0 for the other kinds.
    fn position_of(&self, kind: Kind) -> u64 {
        match kind {
            Kind::AuthorizationPolicy => self.position.policies,
            Kind::RateLimitPolicy => self.position.rate_limits,
            _ => 0,
        }
    }

    /// Removes one object, as its watch's deletion event says; true when
    /// the published content changed.
    pub fn remove(&mut self, kind: Kind, key: &str) -> bool {
        self.deleted.remove(&(kind, key.to_owned()));
        self.apply(kind, key, None)
    }

    /// Removes one object this replica deleted at resourceVersion `at`
    /// ([`numeric`]; 0 when unknown) before its watch says so: events older
    /// than the deletion are ignored until the watch delivers it. True when
    /// the published content changed.
    pub fn remove_written(&mut self, kind: Kind, key: &str, at: u64) -> bool {
        if at != 0 {
            self.deleted.insert((kind, key.to_owned()), at);
        }
        self.apply(kind, key, None)
    }

    /// Replaces every object of `kind` with a full list (the first list, or
    /// a re-list after the watch expired): objects missing from it are gone.
    /// Marks the kind synced. True when the published content changed.
    pub fn replace(&mut self, kind: Kind, listed: BTreeMap<String, Reflected>) -> bool {
        let before = self.version();
        let stale: Vec<String> = self
            .objects
            .range((kind, String::new())..)
            .take_while(|((k, _), _)| *k == kind)
            .map(|((_, key), _)| key.clone())
            .filter(|key| !listed.contains_key(key))
            .collect();
        for key in stale {
            self.take(kind, &key);
        }
        self.deleted.retain(|(k, _), _| *k != kind);
        for (key, object) in listed {
            // A re-list is the truth: no resourceVersion guard.
            self.take(kind, &key);
            self.put(kind, &key, Some(object));
        }
        if kind.feeds_services() {
            self.publish_services();
        }
        self.synced.insert(kind);
        self.version() != before
    }

    /// Stores one object (or removes it, for `None`) without rebuilding the
    /// published services; true when its entry changed.
    fn put(&mut self, kind: Kind, key: &str, object: Option<Reflected>) -> bool {
        let Some(object) = object else {
            return self.take(kind, key);
        };
        let slot_key = (kind, key.to_owned());
        if let Some(&deleted_at) = self.deleted.get(&slot_key) {
            if numeric(Some(&object.resource_version)) <= deleted_at {
                return false;
            }
            // Written again since: the deletion is history.
            self.deleted.remove(&slot_key);
        }
        let changed = match self.objects.get(&slot_key) {
            Some(held) if is_older(&object.resource_version, &held.resource_version) => {
                return false;
            }
            Some(held) => held.entry != object.entry,
            None => true,
        };
        let digest = entry_digest(kind, key, &object.entry);
        let slot = Slot {
            resource_version: object.resource_version,
            entry: object.entry,
            digest,
        };
        if let Some(old) = self.objects.insert(slot_key, slot) {
            self.xor(kind, old.digest);
        }
        self.xor(kind, digest);
        changed
    }

    /// Removes one object without rebuilding the published services; true
    /// when it was held.
    fn take(&mut self, kind: Kind, key: &str) -> bool {
        match self.objects.remove(&(kind, key.to_owned())) {
            Some(slot) => {
                self.xor(kind, slot.digest);
                true
            }
            None => false,
        }
    }

    /// Rebuilds the published services from the Services, the EndpointSlices
    /// and the mesh endpoints' IPs, and logs the clashes that were not
    /// there before (once each, however often the unchanged objects are
    /// joined or listed again; again if one ends and begins anew).
    fn publish_services(&mut self) {
        let mesh: HashSet<IpAddr> = self
            .workloads_iter()
            .flat_map(|w| &w.addresses)
            .filter_map(|a| a.address.parse::<SocketAddr>().ok())
            .map(|a| a.ip())
            .collect();
        let services = self
            .keyed_of_kind(Kind::Service)
            .filter_map(|(key, entry)| match entry {
                Entry::Service(service) => Some((key, service)),
                _ => None,
            });
        let slices = self
            .of_kind(Kind::EndpointSlice)
            .filter_map(|entry| match entry {
                Entry::Backends(backends) => Some(backends),
                _ => None,
            });
        let joined = virtual_services(services, slices, &mesh);
        for clash in joined.clashes.difference(&self.clashes) {
            clash.warn();
        }
        self.clashes = joined.clashes;
        self.services_digest = services_digest(&joined.services);
        self.services = joined.services;
    }

    /// What is held for an object, as the reflector read it.
    pub fn held(&self, kind: Kind, key: &str) -> Option<Reflected> {
        self.objects
            .get(&(kind, key.to_owned()))
            .map(|slot| Reflected {
                resource_version: slot.resource_version.clone(),
                entry: slot.entry.clone(),
            })
    }

    /// The resourceVersion held for an object.
    pub fn resource_version(&self, kind: Kind, key: &str) -> Option<&str> {
        self.objects
            .get(&(kind, key.to_owned()))
            .map(|s| s.resource_version.as_str())
    }

    /// Every valid policy, ordered by `namespace/name`.
    pub fn policies(&self) -> Vec<Policy> {
        self.of_kind(Kind::AuthorizationPolicy)
            .filter_map(|entry| match entry {
                Entry::Policy(p) => Some(p.clone()),
                _ => None,
            })
            .collect()
    }

    /// Every valid rate limit with its revision, ordered by `namespace/name`.
    pub fn rate_limits(&self) -> Vec<(RateLimit, u64)> {
        self.of_kind(Kind::RateLimitPolicy)
            .filter_map(|entry| match entry {
                Entry::RateLimit(limit, revision) => Some((limit.clone(), *revision)),
                _ => None,
            })
            .collect()
    }

    pub fn rate_limit(&self, key: &str) -> Option<(RateLimit, u64)> {
        match self.objects.get(&(Kind::RateLimitPolicy, key.to_owned())) {
            Some(Slot {
                entry: Entry::RateLimit(limit, revision),
                ..
            }) => Some((limit.clone(), *revision)),
            _ => None,
        }
    }

    pub fn policy(&self, key: &str) -> Option<Policy> {
        match self
            .objects
            .get(&(Kind::AuthorizationPolicy, key.to_owned()))
        {
            Some(Slot {
                entry: Entry::Policy(p),
                ..
            }) => Some(p.clone()),
            _ => None,
        }
    }

    /// Every endpoint of every running, injected Pod.
    pub fn workloads(&self) -> Vec<WorkloadRecord> {
        self.workloads_iter().cloned().collect()
    }

    fn workloads_iter(&self) -> impl Iterator<Item = &WorkloadRecord> {
        self.of_kind(Kind::Pod)
            .filter_map(|entry| match entry {
                Entry::Endpoints(e) => Some(e.iter()),
                _ => None,
            })
            .flatten()
    }

    /// The virtual IPs and ports of every Service in the mesh with the ready
    /// backends its EndpointSlices list, ordered by address (see
    /// [`virtual_services`]).
    pub fn services(&self) -> Vec<Service> {
        self.services.clone()
    }

    fn of_kind(&self, kind: Kind) -> impl Iterator<Item = &Entry> {
        self.keyed_of_kind(kind).map(|(_, entry)| entry)
    }

    /// The entries of `kind` with their `namespace/name`, in that order.
    fn keyed_of_kind(&self, kind: Kind) -> impl Iterator<Item = (&str, &Entry)> {
        self.objects
            .range((kind, String::new())..)
            .take_while(move |((k, _), _)| *k == kind)
            .map(|((_, key), slot)| (key.as_str(), &slot.entry))
    }

    fn xor(&mut self, kind: Kind, digest: u64) {
        self.content ^= digest;
        if kind.is_policy() {
            self.policy_content ^= digest;
        }
    }
}

fn nonzero(v: u64) -> u64 {
    match v & VERSION_MASK {
        0 => 1,
        v => v,
    }
}

/// Whether resourceVersion `new` is older than `held`. They are opaque
/// strings by contract; when either is not a number nothing is older.
/// A resourceVersion as a number; 0 for none, or one that is not a number.
pub fn numeric(resource_version: Option<&str>) -> u64 {
    resource_version.and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn is_older(new: &str, held: &str) -> bool {
    match (new.parse::<u64>(), held.parse::<u64>()) {
        (Ok(new), Ok(held)) => new < held,
        _ => false,
    }
}

fn digest_bytes(parts: &[&[u8]]) -> u64 {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    let out = hasher.finalize();
    u64::from_be_bytes(out[..8].try_into().expect("32 bytes"))
}

/// The digest of one entry, independent of the process: protobuf map fields
/// (HTTP header matches) are hashed in key order, not in the encoding's.
fn entry_digest(kind: Kind, key: &str, entry: &Entry) -> u64 {
    match entry {
        Entry::Policy(policy) => {
            let mut plain = policy.clone();
            let mut headers: Vec<(String, String)> = Vec::new();
            for rule in &mut plain.rules {
                for to in &mut rule.to {
                    let mut these: Vec<_> = to.headers.drain().collect();
                    these.sort();
                    headers.push((String::new(), String::new()));
                    headers.extend(these);
                }
            }
            let mut parts: Vec<Vec<u8>> = vec![plain.encode_to_vec()];
            for (k, v) in headers {
                parts.push(k.into_bytes());
                parts.push(v.into_bytes());
            }
            let mut refs: Vec<&[u8]> = vec![kind.as_str().as_bytes(), key.as_bytes()];
            refs.extend(parts.iter().map(Vec::as_slice));
            digest_bytes(&refs)
        }
        Entry::RateLimit(limit, revision) => {
            let encoded = limit.encode_to_vec();
            digest_bytes(&[
                kind.as_str().as_bytes(),
                key.as_bytes(),
                &encoded,
                &revision.to_be_bytes(),
            ])
        }
        Entry::Endpoints(records) => {
            let mut refs: Vec<&[u8]> = vec![kind.as_str().as_bytes(), key.as_bytes()];
            for r in records {
                refs.push(r.spiffe_id.as_bytes());
                refs.extend(r.addresses.iter().map(|a| a.address.as_bytes()));
            }
            digest_bytes(&refs)
        }
        // Counted through what they publish (`services_digest`).
        Entry::Service(_) | Entry::Backends(_) => 0,
    }
}

/// The digest of the published services. Their encoding is deterministic
/// (no map fields) and the list is ordered, so replicas agree on it.
fn services_digest(services: &[Service]) -> u64 {
    let encoded: Vec<Vec<u8>> = services.iter().map(Message::encode_to_vec).collect();
    let mut parts: Vec<&[u8]> = vec![b"services"];
    parts.extend(encoded.iter().map(Vec::as_slice));
    digest_bytes(&parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::kubernetes::services::{Family, NamedPort};

    fn endpoint(address: &str) -> Reflected {
        Reflected {
            resource_version: "10".into(),
            entry: Entry::Endpoints(vec![WorkloadRecord::new(
                "spiffe://td/ns/a/sa/b",
                [address.to_string()],
                i64::MAX,
                0,
            )]),
        }
    }

    fn policy(name: &str, rv: &str, port: u32) -> Reflected {
        use trellis_proto::policy::v1::{Destination, Rule};
        Reflected {
            resource_version: rv.into(),
            entry: Entry::Policy(Policy {
                name: name.into(),
                namespace: "default".into(),
                revision: 1,
                rules: vec![Rule {
                    from: vec![],
                    to: vec![Destination {
                        ports: vec![port],
                        headers: [("a".into(), "1".into()), ("b".into(), "2".into())].into(),
                        ..Destination::default()
                    }],
                }],
                ..Policy::default()
            }),
        }
    }

    #[test]
    fn the_version_names_the_content_whatever_the_history() {
        let mut one = Cache::default();
        one.set_mesh_config("m");
        one.apply(Kind::Pod, "a/p1", Some(endpoint("10.0.0.1:15006")));
        one.apply(
            Kind::AuthorizationPolicy,
            "default/x",
            Some(policy("x", "5", 80)),
        );
        one.apply(
            Kind::AuthorizationPolicy,
            "default/y",
            Some(policy("y", "6", 81)),
        );
        assert!(one.remove(Kind::AuthorizationPolicy, "default/y"));

        let mut two = Cache::default();
        two.set_mesh_config("m");
        two.replace(
            Kind::AuthorizationPolicy,
            [("default/x".to_owned(), policy("x", "5", 80))].into(),
        );
        two.replace(
            Kind::Pod,
            [("a/p1".to_owned(), endpoint("10.0.0.1:15006"))].into(),
        );
        assert_eq!(one.version(), two.version());
        assert_eq!(one.policy_generation(), two.policy_generation());

        let before = two.version();
        assert!(two.apply(Kind::Pod, "a/p1", Some(endpoint("10.0.0.2:15006"))));
        assert_ne!(two.version(), before);
        assert!(two.set_mesh_config("other"));
        assert_ne!(two.version(), one.version());
    }

    /// A policy this replica deleted does not come back when the watch then
    /// delivers its creation; a later write brings it back, and the
    /// watch's own deletion ends the guard.
    #[test]
    fn a_deleted_policy_is_not_brought_back_by_an_older_event() {
        let mut cache = Cache::default();
        let key = "default/x";
        assert!(cache.apply(Kind::AuthorizationPolicy, key, Some(policy("x", "20", 80))));
        assert!(cache.remove_written(Kind::AuthorizationPolicy, key, 21));
        assert!(!cache.apply(Kind::AuthorizationPolicy, key, Some(policy("x", "20", 80))));
        assert!(
            cache.policy(key).is_none(),
            "brought back by the creation's echo"
        );

        assert!(cache.apply(Kind::AuthorizationPolicy, key, Some(policy("x", "22", 81))));
        assert!(
            cache.policy(key).is_some(),
            "created again after the deletion"
        );

        assert!(cache.remove_written(Kind::AuthorizationPolicy, key, 23));
        cache.remove(Kind::AuthorizationPolicy, key);
        assert!(cache.deleted.is_empty(), "the watch delivered the deletion");
    }

    /// Each policy kind's position is the newest resourceVersion its watch
    /// delivered; other kinds, older events and resourceVersions that are
    /// not numbers leave it where it is.
    #[test]
    fn the_position_follows_each_policy_kind_on_its_own() {
        let mut cache = Cache::default();
        let at = |rv| numeric(Some(rv));
        assert!(cache.reached(Kind::AuthorizationPolicy, at("120")));
        assert!(!cache.reached(Kind::AuthorizationPolicy, at("90")), "older");
        assert!(
            !cache.reached(Kind::AuthorizationPolicy, at("120")),
            "the same"
        );
        assert!(!cache.reached(Kind::Pod, at("500")));
        assert!(!cache.reached(Kind::RateLimitPolicy, at("not-a-number")));
        assert!(cache.reached(Kind::RateLimitPolicy, at("95")));
        assert_eq!(
            cache.position(),
            Position {
                policies: 120,
                rate_limits: 95
            }
        );
    }

    /// The answer to a write arrives after the watch delivered the write
    /// and another writer's deletion: the deletion stands. An answer the
    /// watch has not reached yet is stored.
    #[test]
    fn a_write_answer_the_watch_has_passed_is_not_stored() {
        let mut cache = Cache::default();
        let key = "default/x";
        let kind = Kind::AuthorizationPolicy;
        cache.apply(kind, key, Some(policy("x", "20", 80)));
        cache.reached(kind, 20);
        cache.remove(kind, key);
        cache.reached(kind, 21);
        assert!(!cache.apply_written(kind, key, policy("x", "20", 80)));
        assert!(cache.policy(key).is_none(), "brought back by the answer");

        assert!(cache.apply_written(kind, key, policy("x", "22", 81)));
        assert!(cache.policy(key).is_some(), "an answer ahead of the watch");
    }

    #[test]
    fn an_older_event_does_not_undo_a_newer_write() {
        let mut cache = Cache::default();
        cache.apply(
            Kind::AuthorizationPolicy,
            "default/x",
            Some(policy("x", "20", 80)),
        );
        assert!(!cache.apply(
            Kind::AuthorizationPolicy,
            "default/x",
            Some(policy("x", "19", 81))
        ));
        assert_eq!(
            cache.policy("default/x").unwrap().rules[0].to[0].ports,
            [80]
        );
        assert_eq!(
            cache.resource_version(Kind::AuthorizationPolicy, "default/x"),
            Some("20")
        );
    }

    fn service(rv: &str, ip: &str) -> Reflected {
        Reflected {
            resource_version: rv.into(),
            entry: Entry::Service(VirtualIps {
                ips: vec![ip.parse().unwrap()],
                ports: vec![NamedPort {
                    name: "http".into(),
                    port: 8080,
                }],
                client_affinity: false,
            }),
        }
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|ip| ip.parse().unwrap()).collect()
    }

    /// A slice of `service` with `ready` and `not_ready` endpoints at port
    /// `http` = 8081.
    fn slice_of(service: &str, rv: &str, ready: &[&str], not_ready: &[&str]) -> Reflected {
        Reflected {
            resource_version: rv.into(),
            entry: Entry::Backends(SliceBackends {
                service: service.into(),
                family: Family::V4,
                ports: vec![NamedPort {
                    name: "http".into(),
                    port: 8081,
                }],
                ready: ips(ready),
                not_ready: ips(not_ready),
                terminating: Vec::new(),
            }),
        }
    }

    fn slice(rv: &str, ready: &[&str]) -> Reflected {
        slice_of("shop/api", rv, ready, &[])
    }

    fn backends_of(cache: &Cache) -> Vec<(String, Vec<String>)> {
        cache
            .services()
            .into_iter()
            .map(|s| (s.address, s.backends))
            .collect()
    }

    #[test]
    fn services_and_slices_join_and_name_the_version_whatever_the_order() {
        let mut slices_first = Cache::default();
        slices_first.apply(Kind::Pod, "shop/api-1", Some(endpoint("10.244.2.9:15006")));
        slices_first.apply(
            Kind::EndpointSlice,
            "shop/api-a",
            Some(slice("7", &["10.244.2.9"])),
        );
        slices_first.apply(
            Kind::EndpointSlice,
            "shop/api-b",
            Some(slice("8", &["10.244.1.50"])),
        );
        slices_first.apply(Kind::Service, "shop/api", Some(service("3", "10.96.14.2")));

        let mut service_first = Cache::default();
        service_first.replace(
            Kind::Service,
            [("shop/api".to_owned(), service("3", "10.96.14.2"))].into(),
        );
        service_first.apply(
            Kind::EndpointSlice,
            "shop/api-b",
            Some(slice("8", &["10.244.1.50"])),
        );
        service_first.apply(
            Kind::EndpointSlice,
            "shop/api-a",
            Some(slice("6", &["10.244.2.9", "10.244.2.10"])),
        );
        service_first.apply(
            Kind::EndpointSlice,
            "shop/api-a",
            Some(slice("7", &["10.244.2.9"])),
        );
        service_first.replace(
            Kind::Pod,
            [("shop/api-1".to_owned(), endpoint("10.244.2.9:15006"))].into(),
        );

        assert_eq!(slices_first.version(), service_first.version());
        let expected = vec![(
            "10.96.14.2:8080".to_owned(),
            vec!["10.244.1.50:8081".to_owned(), "10.244.2.9:8081".to_owned()],
        )];
        assert_eq!(backends_of(&slices_first), expected);
        assert_eq!(backends_of(&service_first), expected);

        // A backend that is no longer ready changes the content.
        let before = service_first.version();
        assert!(service_first.apply(
            Kind::EndpointSlice,
            "shop/api-b",
            Some(slice_of("shop/api", "9", &[], &["10.244.1.50"]))
        ));
        assert_ne!(service_first.version(), before);
        assert_eq!(
            backends_of(&service_first),
            [(
                "10.96.14.2:8080".to_owned(),
                vec!["10.244.2.9:8081".to_owned()]
            )]
        );
        // A change the entry does not see (a new resourceVersion only) does not.
        let after = service_first.version();
        assert!(!service_first.apply(
            Kind::EndpointSlice,
            "shop/api-b",
            Some(slice_of("shop/api", "10", &[], &["10.244.1.50"]))
        ));
        assert_eq!(service_first.version(), after);
        // The Service gone, its slices publish nothing.
        assert!(service_first.remove(Kind::Service, "shop/api"));
        assert!(service_first.services().is_empty());
        assert_ne!(service_first.version(), after);
        assert_eq!(
            service_first.policy_generation(),
            Cache::default().policy_generation(),
            "Services and slices are no policies"
        );
    }

    /// The meshed `shop/api` (pod 10.244.2.9 injected) and the unmeshed
    /// `kube-system/kube-dns`.
    fn meshed_and_unmeshed() -> Cache {
        let mut cache = Cache::default();
        cache.apply(Kind::Pod, "shop/api-1", Some(endpoint("10.244.2.9:15006")));
        cache.apply(Kind::Service, "shop/api", Some(service("3", "10.96.14.2")));
        cache.apply(
            Kind::EndpointSlice,
            "shop/api-a",
            Some(slice("7", &["10.244.2.9"])),
        );
        cache.apply(
            Kind::Service,
            "kube-system/kube-dns",
            Some(service("4", "10.96.0.10")),
        );
        cache.apply(
            Kind::EndpointSlice,
            "kube-system/kube-dns-x",
            Some(slice_of("kube-system/kube-dns", "8", &["10.244.0.3"], &[])),
        );
        cache
    }

    #[test]
    fn only_services_with_a_mesh_endpoint_are_published_and_move_the_version() {
        let mut cache = meshed_and_unmeshed();
        let published = vec![(
            "10.96.14.2:8080".to_owned(),
            vec!["10.244.2.9:8081".to_owned()],
        )];
        assert_eq!(backends_of(&cache), published);
        let first = cache.version();

        // Changes of the unmeshed Service are seen by no sidecar.
        assert!(!cache.apply(
            Kind::EndpointSlice,
            "kube-system/kube-dns-x",
            Some(slice_of("kube-system/kube-dns", "9", &[], &["10.244.0.3"]))
        ));
        assert!(!cache.remove(Kind::Service, "kube-system/kube-dns"));
        assert_eq!(cache.version(), first);
        let mut meshed_only = Cache::default();
        meshed_only.apply(Kind::Pod, "shop/api-1", Some(endpoint("10.244.2.9:15006")));
        meshed_only.apply(Kind::Service, "shop/api", Some(service("3", "10.96.14.2")));
        meshed_only.apply(
            Kind::EndpointSlice,
            "shop/api-a",
            Some(slice("7", &["10.244.2.9"])),
        );
        assert_eq!(
            meshed_only.version(),
            first,
            "a replica that never saw the unmeshed Service announces the same version"
        );

        // Its pod gone, shop/api has no mesh endpoint left; back, it is
        // published again under the first version.
        assert!(cache.remove(Kind::Pod, "shop/api-1"));
        assert!(cache.services().is_empty());
        assert_ne!(cache.version(), first);
        assert!(cache.apply(Kind::Pod, "shop/api-1", Some(endpoint("10.244.2.9:15006"))));
        assert_eq!(backends_of(&cache), published);
        assert_eq!(cache.version(), first);

        // A pod that is no mesh endpoint (none is held) changes nothing.
        assert!(!cache.apply(Kind::Pod, "kube-system/coredns", None));
    }

    #[test]
    fn a_meshed_service_whose_endpoints_are_not_ready_stays_published_without_backends() {
        let mut cache = meshed_and_unmeshed();
        assert!(cache.apply(
            Kind::EndpointSlice,
            "shop/api-a",
            Some(slice_of("shop/api", "8", &[], &["10.244.2.9"]))
        ));
        assert_eq!(
            backends_of(&cache),
            [("10.96.14.2:8080".to_owned(), vec![])],
            "the sidecar refuses the call as having no ready backend"
        );
    }

    #[test]
    fn a_relist_drops_what_it_does_not_name() {
        let mut cache = Cache::default();
        cache.apply(
            Kind::AuthorizationPolicy,
            "default/x",
            Some(policy("x", "5", 80)),
        );
        cache.apply(Kind::Pod, "a/p1", Some(endpoint("10.0.0.1:15006")));
        assert!(cache.replace(Kind::AuthorizationPolicy, BTreeMap::new()));
        assert!(cache.policies().is_empty());
        assert_eq!(cache.workloads().len(), 1, "other kinds are untouched");
        assert!(cache.is_synced(Kind::AuthorizationPolicy));
        assert!(!cache.is_synced(Kind::Pod));
    }
}
