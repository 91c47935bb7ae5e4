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
//! ready endpoint), and at once when its own watches work again. The count
//! starts again whenever its own watches recover, even when they recover
//! and fail again between two checks (with a grace shorter than
//! [`PEER_CHECK_INTERVAL`]): a check of one outage never counts towards
//! the next. A peer is
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
    /// A peer answered as healthy at each of the last `checks` checks of
    /// this outage: `peer` (its name and address) at the last. `outage`
    /// is [`WatchHealth::recoveries`] when they were made: once it moves,
    /// the replica's watches have recovered since, and the checks belong
    /// to an outage that is over.
    Healthy {
        peer: String,
        checks: u32,
        outage: u64,
    },
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
        let outage_now = self.watches.recoveries();
        match &*self.last.lock().expect("not poisoned") {
            Peers::Healthy { outage, .. } if *outage != outage_now => {
                Check::ServingStale(stale(&reason, &[]))
            }
            Peers::Healthy { peer, checks, .. } if *checks >= HEALTHY_CHECKS => Check::Unready(
                format!("{reason}; peer replica {peer} serves current policies"),
            ),
            Peers::Healthy { peer, checks, .. } => Check::ServingStale(format!(
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
    /// past its grace, and records their answer.
    async fn ask_peers(&self) {
        // Read before asking: a recovery while the peers answer makes the
        // answer one of the outage that ended.
        let outage = self.watches.recoveries();
        let answer = match (self.watches.unready(), &self.peers) {
            (None, _) => None,
            (Some(_), None) => Some(PeersHealth::NoneHealthy(Vec::new())),
            (Some(_), Some(peers)) => Some(peers.peers_health().await),
        };
        self.record(answer, outage);
    }

    /// Records the peers' `answer` (`None`: not asked, the replica's
    /// policies being current) to a check made during `outage` (see
    /// [`WatchHealth::recoveries`]), counting the checks in a row of that
    /// outage that found a healthy peer.
    fn record(&self, answer: Option<PeersHealth>, outage: u64) {
        let mut last = self.last.lock().expect("not poisoned");
        *last = match answer {
            None => Peers::NotAsked,
            Some(PeersHealth::Healthy(peer)) => {
                let before = match &*last {
                    Peers::Healthy {
                        checks,
                        outage: counted_in,
                        ..
                    } if *counted_in == outage => *checks,
                    Peers::Healthy { .. } | Peers::NotAsked | Peers::NoneHealthy(_) => 0,
                };
                Peers::Healthy {
                    peer,
                    checks: before.saturating_add(1),
                    outage,
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

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::store::kubernetes::cache::Kind;

    const GRACE: Duration = Duration::from_millis(1);

    /// When a watch that fails now failed first: long enough ago to be
    /// past [`GRACE`].
    fn past_the_grace() -> Instant {
        Instant::now() - Duration::from_secs(1)
    }

    /// How long a policy kind's watch has been failing is said in words,
    /// to the whole second, as every duration in a message is.
    #[test]
    fn a_failing_watch_is_said_in_words() {
        let watches = WatchHealth::new(GRACE);
        let failed_at = Instant::now() - Duration::from_secs(185);
        watches.failed(Kind::AuthorizationPolicy, failed_at);
        assert_eq!(
            watches.unready().as_deref(),
            Some(
                "the AuthorizationPolicy watch has been failing for 3 minutes 5 seconds: the \
                 policies served may be stale"
            )
        );
    }

    fn healthy_peer() -> Option<PeersHealth> {
        Some(PeersHealth::Healthy("cp-b at 10.0.0.2:8443".into()))
    }

    /// The replica's own watch recovers and fails again between two
    /// checks: the check before the recovery belongs to the outage that
    /// ended, and the replica goes unready only after two checks of the
    /// new one find a healthy peer, whether it was unready already or not.
    #[test]
    fn a_recovery_between_two_checks_starts_the_count_again() {
        let watches = Arc::new(WatchHealth::new(GRACE));
        let readiness = Readiness::new(watches.clone(), None);
        let check = || {
            readiness.record(healthy_peer(), watches.recoveries());
            readiness.check()
        };
        let flap = || {
            watches.succeeded(Kind::AuthorizationPolicy);
            watches.failed(Kind::AuthorizationPolicy, past_the_grace());
        };

        watches.failed(Kind::AuthorizationPolicy, past_the_grace());
        let first = check();
        assert!(
            matches!(&first, Check::ServingStale(why) if why.contains("(1 so far)")),
            "{first:?}"
        );
        flap();
        let after_flap = readiness.check();
        assert!(
            matches!(&after_flap, Check::ServingStale(why) if why.contains("no peer replica answers")),
            "{after_flap:?}"
        );
        let second = check();
        assert!(
            matches!(&second, Check::ServingStale(why) if why.contains("(1 so far)")),
            "a check before the recovery counted: {second:?}"
        );
        let third = check();
        assert!(
            matches!(&third, Check::Unready(why) if why.contains("peer replica cp-b")),
            "{third:?}"
        );

        // Unready, then a recovery and a new failure between two checks:
        // ready again at once, and until two checks of the new outage.
        flap();
        let after_flap = readiness.check();
        assert!(
            matches!(after_flap, Check::ServingStale(_)),
            "still unready from the outage that ended: {after_flap:?}"
        );
        let next = check();
        assert!(matches!(next, Check::ServingStale(_)), "{next:?}");
        assert!(matches!(check(), Check::Unready(_)));
    }

    /// A policy watch that recovers while another is still failing past
    /// its grace does not end the outage: the count goes on.
    #[test]
    fn a_recovery_of_one_policy_kind_while_another_fails_keeps_the_count() {
        let watches = Arc::new(WatchHealth::new(GRACE));
        let readiness = Readiness::new(watches.clone(), None);
        watches.failed(Kind::AuthorizationPolicy, past_the_grace());
        watches.failed(Kind::RateLimitPolicy, past_the_grace());
        readiness.record(healthy_peer(), watches.recoveries());
        watches.succeeded(Kind::AuthorizationPolicy);
        readiness.record(healthy_peer(), watches.recoveries());
        let check = readiness.check();
        assert!(
            matches!(&check, Check::Unready(why) if why.contains("RateLimitPolicy")),
            "{check:?}"
        );
    }
}
