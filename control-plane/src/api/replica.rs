//! `trellis.admin.v1.Replica`, and how one `ListWorkloads` answer covers
//! every control-plane replica.
//!
//! A sidecar keeps one Discovery stream, to whichever replica the Service
//! sent it, and only that replica knows whether the sidecar holds the
//! current snapshot. The replica answering `ListWorkloads` asks each peer
//! named by `--peers` for its streams ([`Replicas::fleet`]) and joins them
//! to its own, so an operator sees every sidecar's state whichever replica
//! `trellisctl` reached; `ListIssuedCertificates` joins their
//! issued-certificate logs the same way ([`Replicas::issued`]), as the
//! Kubernetes store keeps one per replica. Each peer's streams come with
//! the pods its admission webhooks admitted without a sidecar, as the API
//! server calls whichever replica the Service picks, joined by owner,
//! less those of owners any replica injected a pod of since
//! ([`Fleet::uninjected_pods`]). With that store, whose Pods carry
//! no certificate, each peer's streams come with the newest certificate of
//! each identity in its log, since when the log is complete, and the
//! certificate each open stream's sidecar presented when it connected, so
//! that `ListWorkloads` can say each workload's newest certificate, or that
//! it cannot ([`Fleet::certificate`]). A peer that does not answer within
//! [`PEER_TIMEOUT`] is named in the answer with why; the sidecars streaming
//! to it then show as not connected. Peers call each other with the control
//! plane's own SVID, and only that identity may call `Replica`
//! ([`super::OnlyCaller::control_plane`]).
//!
//! `Health` says whether a replica is a good place for sidecars to move
//! to; a replica whose own policy watch keeps failing asks its peers
//! ([`Replicas::peers_health`]) to know whether to go unready
//! ([`crate::readiness`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};
use trellis_core::duration::Words;
use trellis_proto::admin::v1::replica_client::ReplicaClient;
use trellis_proto::admin::v1::replica_server::Replica;
use trellis_proto::admin::v1::{
    HealthRequest, HealthResponse, InjectedPods, ListIssuedCertificatesRequest,
    ListIssuedCertificatesResponse, ListStreamsRequest, ListStreamsResponse, OpenStream,
    ReplicaHealth, ReplicaStatus, SnapshotSync, StreamStatus, UninjectedPods,
};

use super::admin::{issued_certificate, issued_here, issued_limit};
use super::{Mesh, rfc3339};
use crate::discovery::{SidecarStatus, SyncState, Write};
use crate::inject::Owner;
use crate::store::Position;
use crate::store::kubernetes::WatchHealth;

/// The metadata of every `Replica` answer that names the replica's
/// instance number.
const INSTANCE: &str = "trellis-replica-instance";

/// The longest a peer replica may take to answer, connection included.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(3);

/// The largest Replica request read, in bytes. A peer's requests hold at
/// most a SPIFFE ID, a serial number and a store position, far under
/// this; a larger one is refused as its length prefix arrives, with
/// RESOURCE_EXHAUSTED naming the call and this limit.
pub const MAX_REPLICA_REQUEST_BYTES: usize = 64 * 1024;

/// This replica, and the peers it asks.
pub struct Replicas {
    /// As `--replica-name` gives it, else the host name (the pod's name in
    /// Kubernetes).
    pub name: String,
    /// Drawn at start, and sent with every `Replica` answer: tells this
    /// replica's own answer apart when a peer name resolves to it too.
    pub instance: u64,
    /// Where it listens, as `trellisctl` is told.
    pub address: String,
    /// `HOST:PORT` entries; each name is resolved again on every call, so
    /// a headless Service's name follows the replicas as they come and go.
    peers: Vec<String>,
    tls: Arc<ClientConfig>,
}

impl std::fmt::Debug for Replicas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicas")
            .field("name", &self.name)
            .field("address", &self.address)
            .field("peers", &self.peers)
            .finish_non_exhaustive()
    }
}

impl Replicas {
    /// `tls` presents the control plane's SVID and accepts only the
    /// control plane's.
    pub fn new(
        name: Option<String>,
        address: String,
        peers: Vec<String>,
        tls: Arc<ClientConfig>,
    ) -> Self {
        Self {
            name: name.unwrap_or_else(host_name),
            instance: rand::random(),
            address,
            peers,
            tls,
        }
    }

    /// This replica's streams, as it answers its peers; with a write asked
    /// about (see [`asked`]), whether it and each stream have reached it
    /// ([`Discovery::reached`](crate::discovery::Discovery::reached)); with a
    /// store whose workloads carry no certificate, the newest of each
    /// identity in its issued-certificate log
    /// ([`Store::issued_log_view`](crate::store::Store::issued_log_view)).
    pub fn local(&self, mesh: &Mesh, request: &ListStreamsRequest) -> ListStreamsResponse {
        let discovery = &mesh.discovery;
        let served = discovery.current();
        let current = served.version;
        let write = asked(request);
        let reached = |version| discovery.reached(write, version);
        // One entry an identity, joined from its streams (pods sharing an
        // identity each have theirs) as the replicas' are: as synced as
        // its least synced stream, reached when every open stream has.
        let sidecars = discovery
            .statuses()
            .into_iter()
            .map(|(id, streams)| {
                let mut joined = Joined::default();
                let mut open = Vec::new();
                for status in streams {
                    if status.connected() {
                        open.push(open_stream(&status));
                    }
                    let stream = StreamStatus {
                        spiffe_id: String::new(),
                        streams: status.streams,
                        acked_version: status.acked_version,
                        synced_version: status.synced_version,
                        acked_version_epoch: status.acked_epoch,
                        synced_version_epoch: status.synced_epoch,
                        sync: snapshot_sync(status.sync(current)).into(),
                        reached: status.connected() && reached(status.synced_version),
                        last_nack: status.last_nack,
                        ack_warnings: status.ack_warnings,
                        open: Vec::new(),
                    };
                    join(&mut joined, &self.name, stream);
                }
                StreamStatus {
                    spiffe_id: id.to_string(),
                    streams: joined.streams,
                    acked_version: joined.acked_version,
                    synced_version: joined.synced_version,
                    acked_version_epoch: joined.acked_epoch,
                    synced_version_epoch: joined.synced_epoch,
                    sync: joined.sync.into(),
                    reached: joined.reached,
                    last_nack: joined.last_nack,
                    ack_warnings: joined.ack_warnings,
                    open,
                }
            })
            .collect();
        let (newest_issued, issued_log_since_unix) = match mesh.store.issued_log_view() {
            Some(view) => (
                view.newest
                    .into_iter()
                    .map(|r| issued_certificate(r, ""))
                    .collect(),
                // 0 says nothing: a log complete since the epoch is since 1.
                view.complete_since_unix.max(1),
            ),
            None => (Vec::new(), 0),
        };
        ListStreamsResponse {
            name: self.name.clone(),
            snapshot_version: current,
            snapshot_version_epoch: served.epoch,
            sidecars,
            reached: reached(current),
            newest_issued,
            issued_log_since_unix,
            uninjected_pods: uninjected_pods(&mesh.uninjected),
            injected_pods: injected_pods(&mesh.uninjected),
        }
    }

    /// This replica by its name and address, as a listing of issued
    /// certificates names the replicas it joins.
    fn named(&self) -> ReplicaStatus {
        ReplicaStatus {
            name: self.name.clone(),
            address: self.address.clone(),
            ..ReplicaStatus::default()
        }
    }

    /// `message` as this replica answers a peer: with its instance number.
    fn stamped<T>(&self, message: T) -> Response<T> {
        let mut response = Response::new(message);
        response
            .metadata_mut()
            .insert(INSTANCE, self.instance.to_string().parse().expect("digits"));
        response
    }

    /// This replica's streams joined with every peer's, asked at once.
    pub async fn fleet(&self, mesh: &Mesh, request: ListStreamsRequest) -> Fleet {
        let mut fleet = Fleet::default();
        let local = self.local(mesh, &request);
        fleet.logged = local.issued_log_since_unix != 0;
        fleet.add(self.address.clone(), Ok(local));
        let answers = self
            .ask_peers(true, move |mut peer| async move {
                peer.list_streams(request).await
            })
            .await;
        for (address, answer) in answers {
            fleet.add(address, answer);
        }
        fleet
    }

    /// This replica's issued certificates (`here`, as `request` selects
    /// them) joined with every peer's: newest first, at most the request's
    /// limit, truncated if any replica had more.
    pub async fn issued(
        &self,
        here: ListIssuedCertificatesResponse,
        request: ListIssuedCertificatesRequest,
    ) -> ListIssuedCertificatesResponse {
        let limit = issued_limit(&request);
        let answers = self
            .ask_peers(true, move |mut peer| {
                let request = request.clone();
                async move { peer.list_issued_certificates(request).await }
            })
            .await;
        let mut joined = ListIssuedCertificatesResponse {
            replicas: vec![self.named()],
            ..here
        };
        for (address, answer) in answers {
            let status = match answer {
                Ok(answer) => {
                    joined.truncated |= answer.truncated;
                    joined.certificates.extend(answer.certificates);
                    ReplicaStatus {
                        address,
                        name: answer
                            .replicas
                            .into_iter()
                            .next()
                            .map(|r| r.name)
                            .unwrap_or_default(),
                        ..ReplicaStatus::default()
                    }
                }
                Err(why) => why.status(address),
            };
            joined.replicas.push(status);
        }
        // Stable: a replica's own order stands between equal times.
        joined
            .certificates
            .sort_by_key(|c| std::cmp::Reverse(c.issued_at_unix));
        joined.truncated |= joined.certificates.len() > limit;
        joined.certificates.truncate(limit);
        joined
    }

    /// What the peers answer `Health`: one that is healthy, by name and
    /// address, or why none is. Every peer is asked at once, each within
    /// [`PEER_TIMEOUT`]. A peer that does not answer, or predates the call
    /// (`UNIMPLEMENTED`), is not healthy.
    pub async fn peers_health(&self) -> PeersHealth {
        let answers = self
            .ask_peers(false, |mut peer| async move {
                match peer.health(HealthRequest {}).await {
                    Ok(answer) => Ok(answer.map(Some)),
                    Err(status) if status.code() == Code::Unimplemented => Ok(Response::new(None)),
                    Err(status) => Err(status),
                }
            })
            .await;
        let mut why_not = Vec::with_capacity(answers.len());
        for (address, answer) in answers {
            let why = match answer {
                Ok(Some(answer)) => {
                    let peer = format!("{} at {address}", answer.name);
                    match answer.health() {
                        ReplicaHealth::Healthy => return PeersHealth::Healthy(peer),
                        ReplicaHealth::PoliciesStale => {
                            format!("{peer} serves stale policies too")
                        }
                        ReplicaHealth::Stopping => format!("{peer} is shutting down"),
                        ReplicaHealth::Unspecified => {
                            format!("{peer} does not say whether it is healthy")
                        }
                    }
                }
                Ok(None) => format!(
                    "{address} does not support the health check (an older release): \
                     it counts as not healthy"
                ),
                Err(why) => format!("{address} did not answer: {}", why.error),
            };
            why_not.push(why);
        }
        PeersHealth::NoneHealthy(why_not)
    }

    /// Asks every peer at once with `call`, each within [`PEER_TIMEOUT`]:
    /// each address asked with its answer or why there is none, by
    /// address. This replica's own answer, when a peer name resolves to
    /// it, is left out. A peer that does not answer is logged as a
    /// warning when `warn`, else at debug level (a question asked every
    /// few seconds).
    async fn ask_peers<T, F, Fut>(
        &self,
        warn: bool,
        call: F,
    ) -> Vec<(String, Result<T, Unanswered>)>
    where
        T: Send + 'static,
        F: Fn(ReplicaClient<Channel>) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = Result<Response<T>, Status>> + Send,
    {
        let mut asked = tokio::task::JoinSet::new();
        let mut answers = Vec::new();
        let mut seen = Vec::<SocketAddr>::new();
        for entry in &self.peers {
            let addrs =
                match tokio::time::timeout(PEER_TIMEOUT, tokio::net::lookup_host(entry)).await {
                    Ok(Ok(addrs)) => addrs,
                    Ok(Err(e)) => {
                        let why = Unanswered::because(format!("cannot resolve it: {e}"));
                        answers.push((entry.clone(), Err(why)));
                        continue;
                    }
                    Err(_) => {
                        let why = format!("cannot resolve it within {}", Words(PEER_TIMEOUT));
                        answers.push((entry.clone(), Err(Unanswered::because(why))));
                        continue;
                    }
                };
            for addr in addrs {
                if seen.contains(&addr) {
                    continue;
                }
                seen.push(addr);
                let (tls, call, me) = (self.tls.clone(), call.clone(), self.instance);
                asked.spawn(async move {
                    let answer = tokio::time::timeout(PEER_TIMEOUT, ask(addr, tls, call))
                        .await
                        .unwrap_or_else(|_| {
                            let why = format!("no answer within {}", Words(PEER_TIMEOUT));
                            Err(Unanswered::because(why))
                        });
                    match answer {
                        Ok((instance, _)) if instance == Some(me) => None,
                        Ok((_, answer)) => Some((addr.to_string(), Ok(answer))),
                        Err(why) => {
                            if warn {
                                tracing::warn!(
                                    peer = %addr,
                                    error = %why.error,
                                    not_listening = why.not_listening,
                                    "a peer replica did not answer"
                                );
                            } else {
                                tracing::debug!(
                                    peer = %addr,
                                    error = %why.error,
                                    not_listening = why.not_listening,
                                    "a peer replica did not answer"
                                );
                            }
                            Some((addr.to_string(), Err(why)))
                        }
                    }
                });
            }
        }
        while let Some(done) = asked.join_next().await {
            if let Ok(Some(answer)) = done {
                answers.push(answer);
            }
        }
        // By address, whatever order they answered in.
        answers.sort_by(|a, b| a.0.cmp(&b.0));
        answers
    }
}

/// What a replica's peers answer `Health` ([`Replicas::peers_health`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeersHealth {
    /// This peer, by name and address, answers as healthy.
    Healthy(String),
    /// No peer does: why not, one line a peer asked, by address (none
    /// when no peer was asked, or the only one was this replica).
    NoneHealthy(Vec<String>),
}

/// Why a peer gave no answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unanswered {
    /// What went wrong, for people.
    pub error: String,
    /// The connection was refused (see `ReplicaStatus.not_listening`).
    pub not_listening: bool,
}

impl Unanswered {
    fn because(error: String) -> Self {
        Unanswered {
            error,
            not_listening: false,
        }
    }

    /// A replica that did not answer, asked at `address`.
    fn status(self, address: String) -> ReplicaStatus {
        ReplicaStatus {
            address,
            error: self.error,
            not_listening: self.not_listening,
            ..ReplicaStatus::default()
        }
    }
}

/// One peer's answer to `call`, with the instance number it carried.
async fn ask<T, F, Fut>(
    addr: SocketAddr,
    tls: Arc<ClientConfig>,
    call: F,
) -> Result<(Option<u64>, T), Unanswered>
where
    F: FnOnce(ReplicaClient<Channel>) -> Fut,
    Fut: Future<Output = Result<Response<T>, Status>>,
{
    let channel = trellis_core::grpc::connect(&addr.to_string(), tls)
        .await
        .map_err(|e| Unanswered {
            error: format!("cannot connect: {}", trellis_core::grpc::error_chain(&e)),
            not_listening: trellis_core::grpc::refused(&e),
        })?;
    let client = ReplicaClient::new(channel).max_decoding_message_size(super::MAX_LISTING_BYTES);
    let response = call(client).await.map_err(|status| {
        Unanswered::because(format!("{:?}: {}", status.code(), status.message()))
    })?;
    let instance = response
        .metadata()
        .get(INSTANCE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    Ok((instance, response.into_inner()))
}

/// The host name (a pod's name), or `control-plane` when it cannot be read.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "control-plane".to_owned())
}

/// What a replica's webhooks admitted without a sidecar, as the API names
/// it (`replicas` left for the joining [`Fleet`] to fill).
fn uninjected_pods(recorded: &crate::inject::UninjectedPods) -> Vec<UninjectedPods> {
    recorded
        .recent()
        .into_iter()
        .map(|(pod, admitted)| UninjectedPods {
            namespace: pod.owner.namespace,
            owner_kind: pod.owner.kind,
            owner_name: pod.owner.name,
            reason: pod.found.reason().to_owned(),
            value: pod.value.unwrap_or_default(),
            admitted: admitted.count,
            last_admitted_unix: admitted.last_unix,
            replicas: Vec::new(),
        })
        .collect()
}

/// The owners a replica's `/inject` webhook injected a pod of lately, as
/// the API names them.
fn injected_pods(recorded: &crate::inject::UninjectedPods) -> Vec<InjectedPods> {
    recorded
        .injected_owners()
        .into_iter()
        .map(|(owner, at)| InjectedPods {
            namespace: owner.namespace,
            owner_kind: owner.kind,
            owner_name: owner.name,
            last_injected_unix: at,
        })
        .collect()
}

/// An open stream as the API names it.
fn open_stream(status: &SidecarStatus) -> OpenStream {
    let presented = status.presented.as_ref();
    OpenStream {
        opened_at_unix: status.opened_at_unix,
        cert_serial: presented.map(|c| c.serial.clone()).unwrap_or_default(),
        cert_not_before_unix: presented.map_or(0, |c| c.not_before_unix),
        cert_not_after_unix: presented.map_or(0, |c| c.not_after_unix),
        cert_presented_at_unix: presented.map_or(0, |c| c.presented_at_unix),
        opaque_ports: status.opaque_ports.iter().map(|&p| p.into()).collect(),
    }
}

/// A stream's [`SyncState`] as the API names it.
fn snapshot_sync(state: SyncState) -> SnapshotSync {
    match state {
        SyncState::NotConnected => SnapshotSync::NotConnected,
        SyncState::Synced => SnapshotSync::Synced,
        SyncState::Pending => SnapshotSync::Pending,
        SyncState::Refused => SnapshotSync::Refused,
    }
}

/// The `Replica` service: this replica's streams, issued-certificate log
/// and health, for its peers.
pub struct ReplicaService {
    mesh: Mesh,
    replicas: Arc<Replicas>,
    /// The Kubernetes store's watches (none with the embedded store).
    watches: Option<Arc<WatchHealth>>,
}

/// The write a listing asks about: by position when the request names
/// one, else by version (a `trellisctl` that predates positions, or a
/// store that gave the write no position: an API server whose
/// resourceVersions are not numbers).
pub fn asked(request: &ListStreamsRequest) -> Write {
    let position = request
        .reached_position
        .as_ref()
        .map(Position::from_proto)
        .filter(|p| *p != Position::default());
    match (position, request.reached_version) {
        (Some(position), _) => Write::Position(position),
        (None, 0) => Write::None,
        (None, version) => Write::Version(version),
    }
}

impl ReplicaService {
    pub fn new(mesh: Mesh, replicas: Arc<Replicas>) -> Self {
        Self {
            mesh,
            replicas,
            watches: None,
        }
    }

    /// Answers `Health` by how `watches` fare.
    pub fn with_watches(mut self, watches: Option<Arc<WatchHealth>>) -> Self {
        self.watches = watches;
        self
    }

    /// This replica as a peer deciding whether to go unready sees it.
    fn own_health(&self) -> ReplicaHealth {
        if *self.mesh.shutdown.borrow() {
            ReplicaHealth::Stopping
        } else if self.watches.as_ref().is_some_and(|w| !w.policies_current()) {
            ReplicaHealth::PoliciesStale
        } else {
            ReplicaHealth::Healthy
        }
    }
}

#[tonic::async_trait]
impl Replica for ReplicaService {
    async fn list_streams(
        &self,
        request: Request<ListStreamsRequest>,
    ) -> Result<Response<ListStreamsResponse>, Status> {
        let local = self.replicas.local(&self.mesh, request.get_ref());
        Ok(self.replicas.stamped(local))
    }

    async fn list_issued_certificates(
        &self,
        request: Request<ListIssuedCertificatesRequest>,
    ) -> Result<Response<ListIssuedCertificatesResponse>, Status> {
        let mut here = issued_here(&self.mesh, request.get_ref(), &self.replicas.name).await?;
        here.replicas = vec![self.replicas.named()];
        Ok(self.replicas.stamped(here))
    }

    async fn health(
        &self,
        _request: Request<HealthRequest>,
    ) -> Result<Response<HealthResponse>, Status> {
        let answer = HealthResponse {
            name: self.replicas.name.clone(),
            health: self.own_health().into(),
        };
        Ok(self.replicas.stamped(answer))
    }
}

/// The replicas' streams joined by SPIFFE ID, and what their
/// issued-certificate logs say.
#[derive(Debug, Default)]
pub struct Fleet {
    joined: HashMap<String, Joined>,
    /// Every replica added, in the order added.
    pub replicas: Vec<ReplicaStatus>,
    /// Whether this replica's store carries no certificate per workload
    /// (the Kubernetes store), so that workloads' certificates are what
    /// the logs tell ([`Fleet::certificate`]).
    pub logged: bool,
    /// The newest certificate of each identity in the logs of the replicas
    /// that answered: (issued at, notAfter).
    newest_issued: HashMap<String, (i64, i64)>,
    /// The latest time since which a log that answered is complete: every
    /// log is complete since then.
    logs_since: i64,
    /// The replicas whose logs were not read, each as the reason names it.
    logs_unread: BTreeSet<String>,
    /// What each identity's open streams presented, over the replicas
    /// that answered.
    presented: HashMap<String, Presented>,
    /// The pods the replicas that answered admitted without a sidecar,
    /// by namespace, owner kind and name, label and value: each replica's
    /// entry, in the order they answered.
    uninjected: BTreeMap<(Owner, String, String), Vec<Uninjected>>,
    /// When the replicas that answered last injected a pod of each owner.
    injected: HashMap<Owner, i64>,
}

/// How one replica admitted the pods of one owner without a sidecar, for
/// one label and value.
#[derive(Debug)]
struct Uninjected {
    replica: String,
    /// How many pods.
    admitted: u64,
    /// When the latest was admitted.
    last_admitted_unix: i64,
}

/// What one identity's open streams presented when they connected: their
/// certificates, and the ports they declared opaque.
#[derive(Clone, Debug)]
struct Presented {
    /// Whether every open stream says what it presented: a replica that
    /// predates `StreamStatus.open` does not, nor a stream on a resumed TLS
    /// session.
    all: bool,
    /// When the earliest was presented, and whether in the second its
    /// replica's log began: a certificate presented then came after every
    /// certificate that log lost, but may have come before some a log that
    /// began in the same second on another replica lost.
    earliest: (i64, bool),
    /// The newest: (issued at, notAfter).
    newest: (i64, i64),
    /// The ports each open stream declared opaque, one entry a stream
    /// (empty for one that declared none).
    opaque_ports: Vec<Vec<u16>>,
}

impl Presented {
    fn new() -> Self {
        Self {
            all: true,
            earliest: (i64::MAX, true),
            newest: (0, 0),
            opaque_ports: Vec::new(),
        }
    }

    /// The open streams of `stream`, on a replica whose log is complete
    /// since `log_since`.
    fn add(&mut self, stream: &StreamStatus, log_since: i64) {
        self.all &= stream.open.len() == stream.streams as usize;
        for open in &stream.open {
            let at = open.cert_presented_at_unix;
            self.all &= at != 0;
            self.earliest = self.earliest.min((at, at == log_since));
            if open.cert_not_after_unix > self.newest.1 {
                let issued_at = crate::ca::issued_at(open.cert_not_before_unix);
                self.newest = (issued_at, open.cert_not_after_unix);
            }
            // A peer sends only ports its sidecars declared.
            let ports = open.opaque_ports.iter().filter_map(|&p| super::port(p));
            self.opaque_ports.push(ports.collect());
        }
    }
}

/// What the replicas' issued-certificate logs tell of an identity's newest
/// certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Certificate {
    /// The newest found, issued at `issued_at` and expiring at `not_after`
    /// (at least then, when a log was not read and it has not expired).
    ExpiresAt {
        issued_at: i64,
        not_after: i64,
        /// Why a log may hold a newer one, when one may (it has not
        /// expired, and a log was not read or does not reach back to
        /// when it was issued): it being past its renewal time then says
        /// nothing of whether the sidecar renewed.
        maybe_newer: Option<String>,
    },
    /// No replica issued it a certificate since then, more than a
    /// certificate lifetime ago: any certificate it holds has expired.
    NoneSince(i64),
    /// The logs cannot tell: why.
    Unknown(String),
}

/// One identity's streams over every replica that answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Joined {
    pub streams: u32,
    pub acked_version: u64,
    pub synced_version: u64,
    /// The epochs `acked_version` and `synced_version` were set in.
    pub acked_epoch: u64,
    pub synced_epoch: u64,
    pub sync: SnapshotSync,
    pub last_nack: String,
    /// What the sidecar's last ACK said it enforces otherwise than sent.
    pub ack_warnings: Vec<String>,
    /// The replicas its open streams are on; with none open, the one that
    /// had its last stream.
    pub replicas: Vec<String>,
    /// Whether every open stream has reached the version asked about.
    pub reached: bool,
}

impl Default for Joined {
    fn default() -> Self {
        Self {
            streams: 0,
            acked_version: 0,
            synced_version: 0,
            acked_epoch: 0,
            synced_epoch: 0,
            sync: SnapshotSync::NotConnected,
            last_nack: String::new(),
            ack_warnings: Vec::new(),
            replicas: Vec::new(),
            reached: false,
        }
    }
}

impl From<SnapshotSync> for SyncState {
    /// A state a peer replica reports (unspecified, from a replica that
    /// does not say, is taken for not connected).
    fn from(sync: SnapshotSync) -> Self {
        match sync {
            SnapshotSync::Synced => SyncState::Synced,
            SnapshotSync::Pending => SyncState::Pending,
            SnapshotSync::Refused => SyncState::Refused,
            SnapshotSync::NotConnected | SnapshotSync::Unspecified => SyncState::NotConnected,
        }
    }
}

impl Fleet {
    /// One replica's answer, asked at `address`, or why there is none.
    pub fn add(&mut self, address: String, answer: Result<ListStreamsResponse, Unanswered>) {
        let answer = match answer {
            Ok(answer) => answer,
            Err(why) => {
                self.logs_unread
                    .insert(format!("the replica at {address} did not answer"));
                self.replicas.push(why.status(address));
                return;
            }
        };
        if answer.issued_log_since_unix == 0 {
            self.logs_unread.insert(format!(
                "the replica {} at {address} does not report its log (an older version)",
                answer.name
            ));
        }
        self.logs_since = self.logs_since.max(answer.issued_log_since_unix);
        for issued in answer.newest_issued {
            let newest = self
                .newest_issued
                .entry(issued.spiffe_id)
                .or_insert((issued.issued_at_unix, issued.not_after_unix));
            if issued.not_after_unix > newest.1 {
                *newest = (issued.issued_at_unix, issued.not_after_unix);
            }
        }
        for pods in answer.uninjected_pods {
            let owner = Owner {
                namespace: pods.namespace,
                kind: pods.owner_kind,
                name: pods.owner_name,
            };
            let key = (owner, pods.reason, pods.value);
            self.uninjected.entry(key).or_default().push(Uninjected {
                replica: answer.name.clone(),
                admitted: pods.admitted,
                last_admitted_unix: pods.last_admitted_unix,
            });
        }
        for pods in answer.injected_pods {
            let owner = Owner {
                namespace: pods.namespace,
                kind: pods.owner_kind,
                name: pods.owner_name,
            };
            let at = self
                .injected
                .entry(owner)
                .or_insert(pods.last_injected_unix);
            *at = (*at).max(pods.last_injected_unix);
        }
        let mut connected = 0;
        for stream in answer.sidecars {
            if stream.streams > 0 {
                connected += 1;
                self.presented
                    .entry(stream.spiffe_id.clone())
                    .or_insert_with(Presented::new)
                    .add(&stream, answer.issued_log_since_unix);
            }
            let joined = self.joined.entry(stream.spiffe_id.clone()).or_default();
            join(joined, &answer.name, stream);
        }
        self.replicas.push(ReplicaStatus {
            name: answer.name,
            address,
            snapshot_version: answer.snapshot_version,
            snapshot_version_epoch: answer.snapshot_version_epoch,
            connected,
            error: String::new(),
            reached: answer.reached,
            not_listening: false,
        });
    }

    /// The pods the replicas that answered admitted without a sidecar,
    /// joined: last admitted first, each naming its replicas in order. A
    /// replica's entry is left out when one of them injected a pod of its
    /// owner in the same second or later: the owner's pods are injected
    /// now, and a rollout replaces those admitted before. (In the same
    /// second either may have come first; a replica that admits a pod
    /// without a sidecar after its own injection in the same second says
    /// its injection was the second before.)
    pub fn uninjected_pods(&self) -> Vec<UninjectedPods> {
        let mut joined = Vec::with_capacity(self.uninjected.len());
        for (key, entries) in &self.uninjected {
            let (owner, reason, value) = key;
            let injected = self.injected.get(owner).copied();
            let mut left = entries
                .iter()
                .filter(|e| injected.is_none_or(|at| e.last_admitted_unix > at))
                .peekable();
            if left.peek().is_none() {
                continue;
            }
            let (mut admitted, mut last_admitted_unix) = (0u64, i64::MIN);
            let mut replicas = Vec::new();
            for e in left {
                admitted = admitted.saturating_add(e.admitted);
                last_admitted_unix = last_admitted_unix.max(e.last_admitted_unix);
                if !replicas.contains(&e.replica) {
                    replicas.push(e.replica.clone());
                }
            }
            replicas.sort();
            joined.push(UninjectedPods {
                namespace: owner.namespace.clone(),
                owner_kind: owner.kind.clone(),
                owner_name: owner.name.clone(),
                reason: reason.clone(),
                value: value.clone(),
                admitted,
                last_admitted_unix,
                replicas,
            });
        }
        // Stable: of those admitted last in the same second, key order.
        joined.sort_by_key(|p| std::cmp::Reverse(p.last_admitted_unix));
        joined
    }

    /// Where `spiffe_id`'s streams stand (not connected if no replica has
    /// seen one).
    pub fn status(&self, spiffe_id: &str) -> Joined {
        self.joined.get(spiffe_id).cloned().unwrap_or_default()
    }

    /// The ports each open stream of `spiffe_id` declared opaque, one
    /// entry a stream (empty for one that declared none).
    pub fn opaque_ports(&self, spiffe_id: &str) -> Vec<Vec<u16>> {
        (self.presented.get(spiffe_id))
            .map(|p| p.opaque_ports.clone())
            .unwrap_or_default()
    }

    /// Every port any open stream of `spiffe_id` declared opaque, once,
    /// sorted.
    pub fn declared_opaque_ports(&self, spiffe_id: &str) -> Vec<u32> {
        let declared = self.presented.get(spiffe_id).into_iter();
        let ports: BTreeSet<u16> = declared
            .flat_map(|p| p.opaque_ports.iter().flatten())
            .copied()
            .collect();
        ports.into_iter().map(u32::from).collect()
    }

    /// What the replicas' issued-certificate logs tell of `spiffe_id`'s
    /// newest certificate at `now`. One that has not expired is as good as
    /// any newer one (though whether it is the newest is said, for its
    /// renewal). That none is valid is said only when every replica's log
    /// was read and could hold what would say otherwise: each is complete
    /// since the newest one found was issued (a later one would be there),
    /// or since more than a certificate lifetime ago (any one it lost has
    /// expired). That lifetime is the newest found's own (replicas each
    /// issue theirs, `--cert-ttl`), or `lifetime`, this replica's, when
    /// none is found. A replica that is gone (not among the peers any
    /// more) takes its log with it: a sidecar that renewed with it last
    /// holds a certificate this does not see, until it renews again, at
    /// about half that certificate's life.
    ///
    /// The certificates the identity's open streams presented count too
    /// when every one of them was presented after every log began (as
    /// after a replica restarts, for the sidecars that connected since):
    /// the newest presented was the newest its sidecar held then, and any
    /// newer one was issued since, so is in a log.
    pub fn certificate(&self, spiffe_id: &str, now: i64, lifetime: i64) -> Certificate {
        let since = self.logs_since;
        let presented = self
            .presented
            .get(spiffe_id)
            .filter(|p| p.all && p.earliest >= (since, true))
            .map(|p| p.newest);
        let newest = match (self.newest_issued.get(spiffe_id).copied(), presented) {
            (Some(logged), Some(presented)) if presented.1 > logged.1 => Some(presented),
            (None, presented) => presented,
            (logged, _) => logged,
        };
        // Whether a log began after the newest certificate found was
        // issued, and may have lost a newer one.
        let lost_newer = |issued_at: i64| since > issued_at && presented.is_none();
        if let Some((issued_at, not_after)) = newest
            && not_after > now
        {
            let maybe_newer = self.unread().or_else(|| {
                lost_newer(issued_at).then(|| {
                    format!(
                        "the replicas' issued-certificate logs are complete only since {}, \
                         after its newest certificate found was issued (a replica started \
                         then, or a log dropped its oldest certificates): a newer one issued \
                         before then is in none",
                        rfc3339(since)
                    )
                })
            });
            return Certificate::ExpiresAt {
                issued_at,
                not_after,
                maybe_newer,
            };
        }
        if let Some(why) = self.unread() {
            return Certificate::Unknown(why);
        }
        // A certificate a log lost lived as long as the newest found, if
        // one was found (an issue time of 0 comes from no replica).
        let lifetime = match newest {
            Some((issued_at, not_after)) if 0 < issued_at && issued_at < not_after => {
                not_after - issued_at
            }
            _ => lifetime,
        };
        let long_enough = since.saturating_add(lifetime) <= now;
        match newest {
            Some((issued_at, not_after)) if !lost_newer(issued_at) => Certificate::ExpiresAt {
                issued_at,
                not_after,
                maybe_newer: None,
            },
            _ if long_enough => Certificate::NoneSince(since),
            _ => Certificate::Unknown(format!(
                "the replicas' issued-certificate logs are complete only since {}, less than \
                 a certificate lifetime ago (a replica started then, or a log dropped its \
                 oldest certificates): a certificate issued before may be the newest",
                rfc3339(since)
            )),
        }
    }

    /// Why some replica's log was not read, if one was not: that log may
    /// hold a newer certificate than any found.
    fn unread(&self) -> Option<String> {
        if self.logs_unread.is_empty() {
            return None;
        }
        let unread: Vec<_> = self.logs_unread.iter().map(String::as_str).collect();
        Some(format!(
            "{}, and {} may hold a newer certificate",
            unread.join("; "),
            match unread.len() {
                1 => "its issued-certificate log",
                _ => "their issued-certificate logs",
            }
        ))
    }
}

/// Joins one replica's streams of an identity into what the replicas
/// before it said. Open streams win over closed ones; over several
/// replicas the identity is as synced as its least synced stream, with the
/// versions and refusal of that one.
fn join(joined: &mut Joined, replica: &str, stream: StreamStatus) {
    let from = |stream: StreamStatus| Joined {
        streams: stream.streams,
        acked_version: stream.acked_version,
        synced_version: stream.synced_version,
        acked_epoch: stream.acked_version_epoch,
        synced_epoch: stream.synced_version_epoch,
        sync: stream.sync(),
        reached: stream.reached,
        last_nack: stream.last_nack,
        ack_warnings: stream.ack_warnings,
        replicas: vec![replica.to_owned()],
    };
    match (joined.streams > 0, stream.streams > 0) {
        // A closed stream says something only where nothing was known.
        (_, false) => {
            if joined.replicas.is_empty() {
                *joined = from(stream);
                joined.sync = SnapshotSync::NotConnected;
            }
        }
        (false, true) => *joined = from(stream),
        (true, true) => {
            let streams = joined.streams + stream.streams;
            let reached = joined.reached && stream.reached;
            let mut replicas = std::mem::take(&mut joined.replicas);
            replicas.push(replica.to_owned());
            if SyncState::from(stream.sync()) > SyncState::from(joined.sync) {
                *joined = from(stream);
            }
            joined.streams = streams;
            joined.reached = reached;
            joined.replicas = replicas;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_proto::admin::v1::{IssuedCertificate, StorePosition};

    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
    const API: &str = "spiffe://cluster.local/ns/shop/sa/api";
    const DB: &str = "spiffe://cluster.local/ns/shop/sa/db";

    /// A listing asks by the write's position when it names one, by its
    /// version otherwise, and by version too when the position is all
    /// zeros (a store that could not place the write): a zero position
    /// would be reached by everything.
    #[test]
    fn a_listing_asks_by_position_unless_there_is_none() {
        let ask = |version, position: Option<(u64, u64)>| {
            asked(&ListStreamsRequest {
                reached_version: version,
                reached_position: position.map(|(policies, rate_limits)| StorePosition {
                    policies,
                    rate_limits,
                }),
            })
        };
        let at = |policies, rate_limits| Position {
            policies,
            rate_limits,
        };
        assert_eq!(ask(7, Some((51, 0))), Write::Position(at(51, 0)));
        assert_eq!(ask(7, Some((0, 0))), Write::Version(7));
        assert_eq!(ask(7, None), Write::Version(7));
        assert_eq!(ask(0, None), Write::None);
    }

    fn stream(streams: u32, version: u64, sync: SnapshotSync, nack: &str) -> StreamStatus {
        StreamStatus {
            spiffe_id: WEB.into(),
            streams,
            acked_version: version,
            synced_version: version,
            acked_version_epoch: 0,
            synced_version_epoch: 0,
            sync: sync.into(),
            reached: sync == SnapshotSync::Synced,
            last_nack: nack.into(),
            ack_warnings: Vec::new(),
            open: Vec::new(),
        }
    }

    fn answer(name: &str, streams: Vec<StreamStatus>) -> Result<ListStreamsResponse, Unanswered> {
        Ok(ListStreamsResponse {
            name: name.into(),
            snapshot_version: 7,
            sidecars: streams,
            reached: true,
            ..ListStreamsResponse::default()
        })
    }

    const NOW: i64 = 1_900_000_000;
    const HOUR: i64 = 3600;

    /// Each replica knows the pods its own webhooks admitted without a
    /// sidecar: the fleet joins the entries of one namespace, owner, label
    /// and value, adding their counts, keeping the latest time, and naming
    /// the replicas; last admitted first. A replica that did not answer
    /// adds none.
    #[test]
    fn pods_admitted_without_a_sidecar_are_joined_over_the_replicas() {
        let pods = |owner: &str, reason: &str, admitted: u64, at: i64| UninjectedPods {
            namespace: "shop".into(),
            owner_kind: "ReplicaSet".into(),
            owner_name: owner.into(),
            reason: reason.into(),
            value: "true".into(),
            admitted,
            last_admitted_unix: at,
            replicas: Vec::new(),
        };
        let with = |name: &str, uninjected_pods| {
            Ok(ListStreamsResponse {
                uninjected_pods,
                ..answer(name, Vec::new()).unwrap()
            })
        };
        let mut fleet = Fleet::default();
        fleet.add(
            "10.0.0.1:15012".into(),
            with("cp-a", vec![pods("web-1", "pod_label", 2, NOW - 10)]),
        );
        fleet.add(
            "10.0.0.2:15012".into(),
            with(
                "cp-b",
                vec![
                    pods("api-1", "pod_label", 1, NOW - 20),
                    pods("web-1", "pod_label", 3, NOW - 30),
                    pods("web-1", "namespace_label", 1, NOW - 40),
                ],
            ),
        );
        fleet.add(
            "10.0.0.3:15012".into(),
            Err(Unanswered::because("no answer".into())),
        );
        let joined = fleet.uninjected_pods();
        let replicas = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        assert_eq!(
            joined,
            [
                UninjectedPods {
                    replicas: replicas(&["cp-a", "cp-b"]),
                    ..pods("web-1", "pod_label", 5, NOW - 10)
                },
                UninjectedPods {
                    replicas: replicas(&["cp-b"]),
                    ..pods("api-1", "pod_label", 1, NOW - 20)
                },
                UninjectedPods {
                    replicas: replicas(&["cp-b"]),
                    ..pods("web-1", "namespace_label", 1, NOW - 40)
                },
            ]
        );
    }

    /// An entry of any replica is left out once a replica injected a pod
    /// of its owner in the same second or later; one admitted after that
    /// stays, counting only the replicas whose entries are left.
    #[test]
    fn pods_of_an_owner_injected_since_are_left_out() {
        let pods = |owner: &str, admitted: u64, at: i64| UninjectedPods {
            namespace: "shop".into(),
            owner_kind: "Deployment".into(),
            owner_name: owner.into(),
            reason: "pod_label".into(),
            value: "true".into(),
            admitted,
            last_admitted_unix: at,
            replicas: Vec::new(),
        };
        let injected = |owner: &str, at: i64| InjectedPods {
            namespace: "shop".into(),
            owner_kind: "Deployment".into(),
            owner_name: owner.into(),
            last_injected_unix: at,
        };
        let mut fleet = Fleet::default();
        let a = ListStreamsResponse {
            uninjected_pods: vec![pods("web", 2, NOW - 30), pods("api", 1, NOW - 30)],
            ..answer("cp-a", Vec::new()).unwrap()
        };
        fleet.add("10.0.0.1:15012".into(), Ok(a));
        let b = ListStreamsResponse {
            uninjected_pods: vec![pods("api", 4, NOW)],
            injected_pods: vec![injected("web", NOW - 30), injected("api", NOW - 10)],
            ..answer("cp-b", Vec::new()).unwrap()
        };
        fleet.add("10.0.0.2:15012".into(), Ok(b));
        assert_eq!(
            fleet.uninjected_pods(),
            [UninjectedPods {
                replicas: vec!["cp-b".into()],
                ..pods("api", 4, NOW)
            }]
        );
    }

    /// A replica whose log is complete since `since` and holds `issued`
    /// (identity, issued at) certificates of an hour.
    fn logged(
        name: &str,
        since: i64,
        issued: &[(&str, i64)],
    ) -> Result<ListStreamsResponse, Unanswered> {
        let mut answer = answer(name, Vec::new())?;
        answer.issued_log_since_unix = since;
        answer.newest_issued = issued
            .iter()
            .map(|&(id, at)| IssuedCertificate {
                spiffe_id: id.into(),
                issued_at_unix: at,
                not_after_unix: at + HOUR,
                ..IssuedCertificate::default()
            })
            .collect();
        Ok(answer)
    }

    /// A certificate of an hour, issued at `issued_at`, found the newest;
    /// `maybe_newer` says why a newer one may be in a log.
    fn found(issued_at: i64, maybe_newer: Option<&str>) -> Certificate {
        Certificate::ExpiresAt {
            issued_at,
            not_after: issued_at + HOUR,
            maybe_newer: maybe_newer.map(String::from),
        }
    }

    /// The newest certificate is the newest of any replica's log, whichever
    /// issued it; one that has expired is said only when every log could
    /// hold a newer one, and no certificate at all only when the logs
    /// reach back more than a lifetime.
    #[test]
    fn the_newest_certificate_is_joined_over_the_replicas_logs() {
        let started = NOW - 3 * HOUR;
        let mut fleet = Fleet::default();
        fleet.add(
            "a".into(),
            logged(
                "cp-a",
                started,
                &[(WEB, NOW - HOUR + 60), (API, NOW - 2 * HOUR)],
            ),
        );
        fleet.add(
            "b".into(),
            logged("cp-b", started, &[(WEB, NOW - 600), (API, NOW - HOUR - 60)]),
        );
        let cert = |id| fleet.certificate(id, NOW, HOUR);
        // Renewed on cp-b: its certificate is the newest.
        assert_eq!(cert(WEB), found(NOW - 600, None));
        // Renewed last on cp-b, a minute past a lifetime ago.
        assert_eq!(cert(API), found(NOW - HOUR - 60, None));
        // Never issued one in the logs' three hours.
        assert_eq!(cert(DB), Certificate::NoneSince(started));

        // A replica that restarted a minute ago may have held api's newest
        // one; web's is valid whatever it held.
        let mut restarted = Fleet::default();
        restarted.add(
            "a".into(),
            logged("cp-a", started, &[(API, NOW - 2 * HOUR)]),
        );
        restarted.add("b".into(), logged("cp-b", NOW - 60, &[(WEB, NOW - 30)]));
        assert_eq!(restarted.certificate(WEB, NOW, HOUR), found(NOW - 30, None));
        for id in [API, DB] {
            let Certificate::Unknown(why) = restarted.certificate(id, NOW, HOUR) else {
                panic!("{id} is known");
            };
            assert!(
                why.starts_with("the replicas' issued-certificate logs are complete only since"),
                "{why}"
            );
        }
        // Once a lifetime has passed since, no certificate is a finding.
        assert_eq!(
            restarted.certificate(API, NOW - 60 + HOUR, HOUR),
            Certificate::NoneSince(NOW - 60)
        );
    }

    /// A replica that did not answer, or does not report its log, may hold
    /// the newest certificate: an expired or missing one is unknown, a
    /// valid one is still valid.
    #[test]
    fn a_log_not_read_leaves_an_expired_certificate_unknown() {
        let started = NOW - 3 * HOUR;
        let mut fleet = Fleet::default();
        fleet.add(
            "a".into(),
            logged("cp-a", started, &[(WEB, NOW - 2 * HOUR)]),
        );
        fleet.add(
            "10.0.0.2:15012".into(),
            Err(Unanswered::because("no answer within 3 seconds".into())),
        );
        let Certificate::Unknown(why) = fleet.certificate(WEB, NOW, HOUR) else {
            panic!("web is known");
        };
        assert_eq!(
            why,
            "the replica at 10.0.0.2:15012 did not answer, and its issued-certificate log may \
             hold a newer certificate"
        );
        // Valid, it is valid; but a newer one may be in the log not read.
        assert_eq!(
            fleet.certificate(WEB, NOW - 2 * HOUR, HOUR),
            found(NOW - 2 * HOUR, Some(&why))
        );

        let mut older = Fleet::default();
        older.add("a".into(), logged("cp-a", started, &[]));
        older.add("b".into(), answer("cp-b", Vec::new()));
        let Certificate::Unknown(why) = older.certificate(WEB, NOW, HOUR) else {
            panic!("web is known");
        };
        assert!(
            why.contains("does not report its log (an older version)"),
            "{why}"
        );
    }

    /// A valid certificate issued before a log began (a replica
    /// restarted since) is the newest found, but that log may have held a
    /// newer one: said, for its renewal.
    #[test]
    fn a_valid_certificate_older_than_a_log_may_not_be_the_newest() {
        let mut fleet = Fleet::default();
        fleet.add(
            "a".into(),
            logged("cp-a", NOW - 3 * HOUR, &[(WEB, NOW - 50 * 60)]),
        );
        fleet.add("b".into(), logged("cp-b", NOW - 60, &[]));
        let Certificate::ExpiresAt {
            issued_at,
            not_after,
            maybe_newer: Some(why),
        } = fleet.certificate(WEB, NOW, HOUR)
        else {
            panic!("web's certificate is said to be the newest");
        };
        assert_eq!((issued_at, not_after), (NOW - 50 * 60, NOW + 10 * 60));
        assert!(
            why.starts_with(&format!(
                "the replicas' issued-certificate logs are complete only since {}, after its \
                 newest certificate found was issued",
                rfc3339(NOW - 60)
            )),
            "{why}"
        );
    }

    /// An open stream of `id` whose sidecar presented, at `presented_at`,
    /// a certificate of an hour issued at `issued_at` (none presented
    /// when `presented_at` is 0, as on a resumed TLS session).
    fn presenting(id: &str, presented_at: i64, issued_at: i64) -> StreamStatus {
        let backdate = crate::ca::BACKDATE.as_secs() as i64;
        let mut stream = stream(1, 7, SnapshotSync::Synced, "");
        stream.spiffe_id = id.into();
        stream.open = vec![OpenStream {
            opened_at_unix: presented_at,
            cert_serial: "4f0e".into(),
            cert_not_before_unix: issued_at - backdate,
            cert_not_after_unix: issued_at + HOUR,
            cert_presented_at_unix: presented_at,
            opaque_ports: Vec::new(),
        }];
        if presented_at == 0 {
            stream.open[0] = OpenStream {
                opened_at_unix: NOW - 50,
                ..OpenStream::default()
            };
        }
        stream
    }

    /// After a replica restarts, a sidecar whose stream was opened since
    /// presented its newest certificate then: any newer one is in a log,
    /// so that certificate is its newest, though the logs lost it. One
    /// whose stream stayed open from before, on a replica that did not
    /// restart, or that did not say what it presented (a replica that
    /// predates it, a resumed TLS session), is as unknown as before.
    #[test]
    fn a_certificate_presented_since_the_logs_began_is_the_newest() {
        let restarted = NOW - 60;
        let with_streams = |name: &str, since: i64, streams: Vec<StreamStatus>| {
            let mut answer = logged(name, since, &[]);
            answer.as_mut().unwrap().sidecars = streams;
            answer
        };
        let mut fleet = Fleet::default();
        fleet.add(
            "a".into(),
            with_streams(
                "cp-a",
                restarted,
                // web reconnected to the restarted replica.
                vec![presenting(WEB, NOW - 50, NOW - 40 * 60)],
            ),
        );
        fleet.add(
            "b".into(),
            with_streams(
                "cp-b",
                NOW - 3 * HOUR,
                vec![
                    // api moved to cp-b since; db's stream stayed open.
                    presenting(API, NOW - 30, NOW - 45 * 60),
                    presenting(DB, NOW - HOUR, NOW - 80 * 60),
                ],
            ),
        );
        assert_eq!(
            fleet.certificate(WEB, NOW, HOUR),
            found(NOW - 40 * 60, None)
        );
        assert_eq!(
            fleet.certificate(API, NOW, HOUR),
            found(NOW - 45 * 60, None)
        );
        let Certificate::Unknown(why) = fleet.certificate(DB, NOW, HOUR) else {
            panic!("db is known");
        };
        assert!(why.contains("complete only since"), "{why}");

        // A presented certificate that expired is the newest too: its
        // sidecar has not renewed.
        let expired = NOW - HOUR - 60;
        let mut fleet = Fleet::default();
        fleet.add(
            "a".into(),
            with_streams("cp-a", restarted, vec![presenting(WEB, NOW - 50, expired)]),
        );
        let cert = fleet.certificate(WEB, NOW, HOUR);
        assert_eq!(cert, found(expired, None));

        // A replica that predates `open`, and a resumed session, say
        // nothing of what was presented; nor does a certificate presented
        // in the second a peer's log began.
        for (name, stream) in [
            ("older", {
                let mut older = presenting(WEB, NOW - 50, NOW - 40 * 60);
                older.open.clear();
                older
            }),
            ("resumed", presenting(WEB, 0, NOW - 40 * 60)),
            ("same second", presenting(WEB, restarted, NOW - 40 * 60)),
        ] {
            let mut fleet = Fleet::default();
            fleet.add("a".into(), with_streams("cp-a", restarted, Vec::new()));
            fleet.add(
                "b".into(),
                with_streams("cp-b", NOW - 3 * HOUR, vec![stream]),
            );
            let cert = fleet.certificate(WEB, NOW, HOUR);
            assert!(matches!(cert, Certificate::Unknown(_)), "{name}: {cert:?}");
        }
        // On the restarted replica itself, that second is after its log
        // began.
        let mut fleet = Fleet::default();
        let stream = presenting(WEB, restarted, NOW - 40 * 60);
        fleet.add("a".into(), with_streams("cp-a", restarted, vec![stream]));
        fleet.add("b".into(), with_streams("cp-b", NOW - 3 * HOUR, Vec::new()));
        assert_eq!(
            fleet.certificate(WEB, NOW, HOUR),
            found(NOW - 40 * 60, None)
        );
    }

    /// Replicas may issue certificates of different lifetimes
    /// (`--cert-ttl`): whether a certificate a log lost has expired is
    /// judged by the lifetime of the newest found, not the answering
    /// replica's. cp-a issues certificates of 10 minutes, cp-b restarted
    /// 15 minutes ago; web's newest is one of cp-a's, issued 20 minutes
    /// ago, and any newer one cp-b lost has expired by now. api's newest
    /// lived 2 hours and expired 5 minutes ago: one cp-b lost 15 minutes
    /// ago may be valid still.
    #[test]
    fn a_lost_certificate_lived_as_long_as_the_newest_found() {
        let with_life = |answer: Result<ListStreamsResponse, Unanswered>, life| {
            let mut answer = answer.unwrap();
            for issued in &mut answer.newest_issued {
                issued.not_after_unix = issued.issued_at_unix + life;
            }
            Ok(answer)
        };
        let mut fleet = Fleet::default();
        let short = logged("cp-a", NOW - 3 * HOUR, &[(WEB, NOW - 20 * 60)]);
        fleet.add("a".into(), with_life(short, 10 * 60));
        let long = logged("cp-c", NOW - 3 * HOUR, &[(API, NOW - 2 * HOUR - 5 * 60)]);
        fleet.add("c".into(), with_life(long, 2 * HOUR));
        fleet.add("b".into(), logged("cp-b", NOW - 15 * 60, &[]));
        // Asked of a replica issuing certificates of an hour, and of one
        // issuing them of a minute.
        for lifetime in [HOUR, 60] {
            assert_eq!(
                fleet.certificate(WEB, NOW, lifetime),
                Certificate::NoneSince(NOW - 15 * 60)
            );
            let api = fleet.certificate(API, NOW, lifetime);
            assert!(matches!(api, Certificate::Unknown(_)), "{api:?}");
        }
        // With none found, the answering replica's lifetime is all there
        // is.
        assert_eq!(
            fleet.certificate(DB, NOW, 10 * 60),
            Certificate::NoneSince(NOW - 15 * 60)
        );
        assert!(matches!(
            fleet.certificate(DB, NOW, HOUR),
            Certificate::Unknown(_)
        ));
    }

    /// The opaque ports each open stream of an identity declared, over
    /// every replica: one entry a stream, so Explain sees pods of one
    /// identity that disagree, wherever they are connected.
    #[test]
    fn the_opaque_ports_of_every_open_stream_are_joined() {
        let declaring = |ports: &[u32]| OpenStream {
            opaque_ports: ports.to_vec(),
            ..OpenStream::default()
        };
        let mut two = stream(2, 7, SnapshotSync::Synced, "");
        two.open = vec![declaring(&[5432]), declaring(&[])];
        let mut one = stream(1, 7, SnapshotSync::Synced, "");
        one.open = vec![declaring(&[5432, 6379])];
        let mut closed = stream(0, 7, SnapshotSync::NotConnected, "");
        closed.open = vec![declaring(&[25])];
        let mut fleet = Fleet::default();
        fleet.add("a".into(), answer("cp-a", vec![two]));
        fleet.add("b".into(), answer("cp-b", vec![one]));
        fleet.add("c".into(), answer("cp-c", vec![closed]));
        assert_eq!(
            fleet.opaque_ports(WEB),
            [vec![5432], vec![], vec![5432, 6379]]
        );
        assert!(fleet.opaque_ports(API).is_empty());
        assert_eq!(fleet.declared_opaque_ports(WEB), [5432, 6379]);
        assert!(fleet.declared_opaque_ports(API).is_empty());
    }

    #[test]
    fn an_open_stream_on_a_peer_wins_over_a_closed_one_here() {
        let mut fleet = Fleet::default();
        fleet.add(
            "10.0.0.1:15012".into(),
            answer("cp-a", vec![stream(0, 3, SnapshotSync::NotConnected, "")]),
        );
        fleet.add(
            "10.0.0.2:15012".into(),
            answer("cp-b", vec![stream(1, 7, SnapshotSync::Synced, "")]),
        );
        let web = fleet.status(WEB);
        assert_eq!(web.sync, SnapshotSync::Synced);
        assert_eq!((web.streams, web.acked_version), (1, 7));
        assert_eq!(web.replicas, ["cp-b"]);
        assert_eq!(fleet.replicas[0].connected, 0);
        assert_eq!(fleet.replicas[1].connected, 1);
    }

    #[test]
    fn streams_on_several_replicas_are_as_synced_as_the_least_synced() {
        let mut fleet = Fleet::default();
        fleet.add(
            "a".into(),
            answer("cp-a", vec![stream(2, 7, SnapshotSync::Synced, "")]),
        );
        fleet.add(
            "b".into(),
            answer(
                "cp-b",
                vec![stream(1, 5, SnapshotSync::Refused, "bad port")],
            ),
        );
        fleet.add(
            "c".into(),
            answer("cp-c", vec![stream(1, 6, SnapshotSync::Pending, "")]),
        );
        let web = fleet.status(WEB);
        assert_eq!(web.sync, SnapshotSync::Refused);
        assert_eq!(web.last_nack, "bad port");
        assert_eq!((web.streams, web.acked_version), (4, 5));
        assert_eq!(web.replicas, ["cp-a", "cp-b", "cp-c"]);
    }

    #[test]
    fn a_closed_stream_keeps_what_was_last_known_and_a_silent_peer_is_named() {
        let mut fleet = Fleet::default();
        fleet.add("a".into(), answer("cp-a", vec![]));
        fleet.add(
            "b".into(),
            answer("cp-b", vec![stream(0, 4, SnapshotSync::NotConnected, "")]),
        );
        let why = Unanswered::because("no answer within 3 seconds".into());
        fleet.add("10.0.0.3:15012".into(), Err(why));
        let web = fleet.status(WEB);
        assert_eq!(web.sync, SnapshotSync::NotConnected);
        assert_eq!((web.streams, web.acked_version), (0, 4));
        assert_eq!(web.replicas, ["cp-b"]);
        let silent = &fleet.replicas[2];
        assert_eq!(silent.address, "10.0.0.3:15012");
        assert_eq!(silent.error, "no answer within 3 seconds");
        assert_eq!(
            fleet.status("spiffe://cluster.local/ns/x/sa/y"),
            Joined::default()
        );
    }

    /// A replica answers `Health` as healthy while it serves (the embedded
    /// store has no watch to fail), and as stopping once it shuts down:
    /// a peer whose watch fails must not send sidecars to it.
    #[tokio::test]
    async fn health_says_stopping_once_the_replica_shuts_down() {
        use crate::discovery::Discovery;
        use crate::server::{ServingCert, peer_client_config};
        use crate::store::embedded::{DB_FILE, EmbeddedStore};
        use trellis_proto::discovery::v1::MeshConfig;

        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::open(&tmp.path().join(DB_FILE)).unwrap());
        let discovery =
            Arc::new(Discovery::new(store.clone(), Vec::new(), MeshConfig::default()).unwrap());
        let (mesh, stop) = Mesh::for_tests(store, discovery);
        let loopback = std::net::Ipv4Addr::LOCALHOST.into();
        let serving = ServingCert::new(mesh.ca.clone(), &[], loopback).unwrap();
        let tls = peer_client_config(&mesh.ca, serving).unwrap();
        let replicas = Replicas::new(Some("cp-a".into()), "127.0.0.1:15012".into(), vec![], tls);
        let service = ReplicaService::new(mesh, Arc::new(replicas));
        let ask = || async {
            let answer = service.health(Request::new(HealthRequest {})).await;
            let answer = answer.unwrap().into_inner();
            assert_eq!(answer.name, "cp-a");
            answer.health()
        };
        assert_eq!(ask().await, ReplicaHealth::Healthy);
        stop.send(true).unwrap();
        assert_eq!(ask().await, ReplicaHealth::Stopping);
    }
}
