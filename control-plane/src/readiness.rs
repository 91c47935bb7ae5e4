//! Whether a replica on the Kubernetes store takes new sidecars (`/ready`)
//! while the watch of a policy kind keeps failing.
//!
//! Past its grace, the policies such a replica would push may be stale (a
//! deleted ALLOW policy still allowed), so it goes unready when a peer
//! replica (`--peers`) answers `Health` as healthy: the Service then
//! sends sidecars there. When no peer does (all of them fail too, as when
//! the API server is down or out of reach of every replica, or there is
//! no peer, or none answers), it stays ready and serves the policies it
//! last saw: going unready would leave the Service with no ready endpoint,
//! and sidecars could neither renew their certificates nor reconnect
//! their policy streams, turning an API server outage into a mesh outage.
//! It says so: `/ready`'s body, the `trellis_store_serving_stale_policies`
//! gauge, and a warning on entering that state.
//!
//! The peers are asked by a task every [`PEER_CHECK_INTERVAL`], only while
//! the replica's own policy watch is past its grace, and `/ready` reads
//! the last answer: probes never fan out, and never wait for a peer. Until
//! the first answer, the replica stays ready. A peer that does not answer
//! within its timeout, or that predates `Health`, is not healthy: going
//! unready is what can take the mesh down, so it takes a peer that says
//! it is better. `/ready` and the warning say why each peer is not
//! healthy, an older one too (`UNIMPLEMENTED`: it does not support the
//! health check), so that mid-upgrade "peer too old" is told apart from
//! "peer out of reach".
//!
//! Flapping: a replica goes unready only once [`HEALTHY_CHECKS`] checks in
//! a row have found a healthy peer, so a peer whose own watch is flaky,
//! healthy at one check and not at the next, never makes it unready; it
//! is ready again at the first check that finds no healthy peer (going
//! ready never takes the mesh down, and may be what leaves the Service a
//! ready endpoint), and at once when its own watches work again. A peer is
//! healthy only while each of its policy watches works, not merely within
//! its grace. When the API server comes back, the replica whose watch
//! recovers first is healthy and the others go unready until theirs
//! recover (within the watch backoff), as they should: their policies are
//! the stale ones.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use trellis_core::logging::throttle::Throttle;
use trellis_core::warn_throttled;

use crate::api::replica::{PeersHealth, Replicas};
use crate::store::kubernetes::WatchHealth;

/// How often a replica whose policy watch is past its grace asks its
/// peers whether one is healthy; `/ready` answers from the last answer.
pub const PEER_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// How many checks in a row must find a healthy peer before a replica
/// whose policy watch is past its grace goes unready.
pub const HEALTHY_CHECKS: u32 = 2;

/// At most one warning that every replica serves stale policies per this
/// long, however often the state is entered.
const STALE_LOG_PAUSE: Duration = Duration::from_secs(300);

/// What `/ready` answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    /// The watch of every policy kind works, or has failed for less than
    /// its grace.
    Current,
    /// Past the grace, and [`HEALTHY_CHECKS`] checks in a row found a
    /// healthy peer: not ready, why.
    Unready(String),
    /// Past the grace, and the last check found no healthy peer, or fewer
    /// than [`HEALTHY_CHECKS`] in a row did: ready all the same, serving
    /// the policies last seen; why.
    ServingStale(String),
}

/// What the peers last said, while the replica's policy watch was past
/// its grace.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Peers {
    /// Not asked since the replica's policies were last current.
    NotAsked,
    /// A peer answered as healthy at each of the last `checks` checks:
    /// `peer` (its name and address) at the last.
    Healthy { peer: String, checks: u32 },
    /// No peer answered as healthy: why not, one line a peer asked.
    NoneHealthy(Vec<String>),
}

/// A replica's readiness on the Kubernetes store: its watches and, when it
/// has any, its peers.
pub struct Readiness {
    watches: Arc<WatchHealth>,
    peers: Option<Arc<Replicas>>,
    last: Mutex<Peers>,
    lines: Throttle,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness")
            .field("last", &self.last)
            .finish_non_exhaustive()
    }
}

impl Readiness {
    /// `peers`: the replicas asked for a healthier one (none: the replica
    /// has no peer, and always stays ready).
    pub fn new(watches: Arc<WatchHealth>, peers: Option<Arc<Replicas>>) -> Self {
        Self {
            watches,
            peers,
            last: Mutex::new(Peers::NotAsked),
            lines: Throttle::new(STALE_LOG_PAUSE),
        }
    }

    /// How the watches fare.
    pub fn watches(&self) -> &WatchHealth {
        &self.watches
    }

    /// What `/ready` answers now, from the peers' last answer.
    pub fn check(&self) -> Check {
        let Some(reason) = self.watches.unready() else {
            return Check::Current;
        };
        match &*self.last.lock().expect("not poisoned") {
            Peers::Healthy { peer, checks } if *checks >= HEALTHY_CHECKS => Check::Unready(
                format!("{reason}; peer replica {peer} serves current policies"),
            ),
            Peers::Healthy { peer, checks } => Check::ServingStale(format!(
                "{reason}; peer replica {peer} answers as healthy, but this one goes unready \
                 only once {HEALTHY_CHECKS} checks in a row find a healthy peer ({checks} so \
                 far), so it stays ready and serves the policies it last saw"
            )),
            Peers::NotAsked => Check::ServingStale(stale(&reason, &[])),
            Peers::NoneHealthy(why_not) => Check::ServingStale(stale(&reason, why_not)),
        }
    }

    /// Asks the peers every [`PEER_CHECK_INTERVAL`] while the replica's
    /// policy watch is past its grace, until `shutdown` turns true.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(PEER_CHECK_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut before = Check::Current;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = crate::run::stopping(&mut shutdown) => return,
            }
            self.ask_peers().await;
            let now = self.check();
            match (&before, &now) {
                (Check::ServingStale(_), Check::ServingStale(_))
                | (Check::Unready(_), Check::Unready(_))
                | (Check::Current, Check::Current) => {}
                (_, Check::ServingStale(reason)) => warn_throttled!(
                    self.lines,
                    "serving_stale",
                    { reason = %reason },
                    "serving the policies last seen, which may be stale, and staying ready: no peer replica is known to serve current policies"
                ),
                (_, Check::Unready(reason)) => {
                    tracing::info!(%reason, "not ready: a peer replica serves current policies");
                }
                (_, Check::Current) => {
                    tracing::info!("the policy watches work again: serving current policies");
                }
            }
            before = now;
        }
    }

    /// Asks the peers for a healthy one when the replica's policy watch is
    /// past its grace, counting the checks in a row that find one; forgets
    /// their answers when its policies are current.
    async fn ask_peers(&self) {
        let answer = match (self.watches.unready(), &self.peers) {
            (None, _) => None,
            (Some(_), None) => Some(PeersHealth::NoneHealthy(Vec::new())),
            (Some(_), Some(peers)) => Some(peers.peers_health().await),
        };
        let mut last = self.last.lock().expect("not poisoned");
        *last = match answer {
            None => Peers::NotAsked,
            Some(PeersHealth::Healthy(peer)) => {
                let before = match &*last {
                    Peers::Healthy { checks, .. } => *checks,
                    Peers::NotAsked | Peers::NoneHealthy(_) => 0,
                };
                Peers::Healthy {
                    peer,
                    checks: before.saturating_add(1),
                }
            }
            Some(PeersHealth::NoneHealthy(why_not)) => Peers::NoneHealthy(why_not),
        };
    }
}

/// Why a replica past its grace stays ready: `reason`, its watches', and
/// `why_not`, why each peer asked is not healthy (an operator mid-upgrade
/// tells a peer too old to answer from one out of reach).
fn stale(reason: &str, why_not: &[String]) -> String {
    let mut why = format!(
        "{reason}; no peer replica answers as healthy, so this one stays ready and serves the \
         policies it last saw"
    );
    for peer in why_not {
        why.push_str("; ");
        why.push_str(peer);
    }
    why
}
