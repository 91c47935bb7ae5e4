//! Graceful shutdown in two steps. When it starts, the listeners that
//! stop first (inbound) close, so callers go to another replica, and every
//! open connection is told; the outbound listeners ([`Drain::until_exit`])
//! keep accepting, so an app that is shutting down beside the sidecar can
//! still make its last calls. The drain ends once no connection has been
//! open for a quiet period, or at a deadline; then the outbound listeners
//! close too. Every open connection holds a [`Tracker`], which is how the
//! drain counts them. The admin port ([`Drain::until_exit_uncounted`])
//! also serves until the drain ends, its connections not counted, so that
//! probes and scrapes neither fail nor hold the drain open, and its
//! `/ready` says where the drain is ([`Status`]).
//!
//! This module never closes a connection itself: when the deadline passes the
//! process exits and the sockets close with it, a TCP connection cut
//! mid-copy reset at its app (`net::ResetIfCut`), not ended with a FIN.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};

/// How long a listener waits after a failed accept (out of file descriptors,
/// say) before it tries again, so the failure neither spins a core nor floods
/// the log.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// How long a listener that has reached its limit of connections being
/// set up says so in the log, at most.
const LIMIT_WARNING_PAUSE: Duration = Duration::from_secs(10);

/// Where shutdown is; listeners stop at one of the later two.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Serving,
    /// Shutdown has started: inbound listeners close, open connections
    /// are told.
    Draining,
    /// The drain is over: every listener closes.
    Exiting,
}

/// The connections open, counted by their trackers.
#[derive(Default)]
struct Open {
    now: AtomicUsize,
    /// How many of `now` came in on the listeners that stop when the
    /// drain starts (inbound), so what a drain cuts can be told by side.
    inbound: AtomicUsize,
    /// How many have ever opened, so a drain waiting for quiet sees one
    /// that opened and closed while it waited.
    opened: AtomicU64,
    /// Woken, once the drain has started, when a connection opens and
    /// when the last one closes.
    changed: Notify,
    /// Whether the drain has started: until then nothing waits on
    /// `changed`, so an accept takes no lock to wake it.
    draining: AtomicBool,
    /// When the drain started, by the wall clock (for people) and the
    /// monotonic one (for how long ago).
    started: OnceLock<(SystemTime, Instant)>,
}

impl Open {
    /// Wakes the drain's wait, if one can be waiting.
    fn changed(&self) {
        if self.draining.load(Ordering::SeqCst) {
            self.changed.notify_waiters();
        }
    }
}

/// Held by a listener: tells it when to stop, and hands each connection a
/// tracker.
#[derive(Clone)]
pub struct Drain {
    phase: watch::Receiver<Phase>,
    /// When this listener stops accepting.
    stops_at: Phase,
    open: Arc<Open>,
    /// Whether the drain waits for this listener's connections.
    counted: bool,
}

/// Held by one open connection until it ends; tells it when shutdown has
/// started, so a connection that can end cleanly early (an HTTP one,
/// between requests) does.
pub struct Tracker {
    /// `None` for a connection the drain does not wait for.
    open: Option<Arc<Open>>,
    /// Whether it came in on a listener that stops when the drain starts.
    inbound: bool,
    phase: watch::Receiver<Phase>,
}

impl Tracker {
    /// Resolves once shutdown has started.
    pub async fn draining(&self) {
        let mut phase = self.phase.clone();
        // An error means the Shutdown is gone: the process is stopping.
        let _ = phase.wait_for(|p| *p >= Phase::Draining).await;
    }
}

impl Clone for Tracker {
    fn clone(&self) -> Self {
        if let Some(open) = &self.open {
            if self.inbound {
                open.inbound.fetch_add(1, Ordering::AcqRel);
            }
            open.now.fetch_add(1, Ordering::AcqRel);
        }
        Tracker {
            open: self.open.clone(),
            inbound: self.inbound,
            phase: self.phase.clone(),
        }
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        let Some(open) = &self.open else { return };
        if self.inbound {
            open.inbound.fetch_sub(1, Ordering::AcqRel);
        }
        if open.now.fetch_sub(1, Ordering::SeqCst) == 1 {
            open.changed();
        }
    }
}

/// Reads where the drain is, for the admin port's `/ready`.
#[derive(Clone)]
pub struct Status {
    open: Arc<Open>,
}

/// A drain under way, as [`Status::draining`] tells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Draining {
    /// When it started, by the wall clock.
    pub since: SystemTime,
    /// How long ago it started.
    pub elapsed: Duration,
    /// The connections it waits for that are open now.
    pub open: usize,
}

/// The connections the drain waits for, by the side of the pod they
/// came in on: what a drain that ends at its deadline or at a second
/// signal cuts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenConnections {
    /// Accepted on an inbound listener: callers from other pods.
    pub inbound: usize,
    /// Accepted on an outbound listener or a route: the app's own calls.
    pub outbound: usize,
}

impl Open {
    fn by_side(&self) -> OpenConnections {
        // Read apart, so a connection opening or closing between the two
        // reads may be miscounted by one; the numbers are for the log.
        let inbound = self.inbound.load(Ordering::Acquire);
        let now = self.now.load(Ordering::Acquire);
        OpenConnections {
            inbound: inbound.min(now),
            outbound: now.saturating_sub(inbound),
        }
    }
}

impl Status {
    /// The connections the drain waits for that are open now, by side.
    pub fn open_connections(&self) -> OpenConnections {
        self.open.by_side()
    }

    /// The drain under way, or `None` before it starts.
    pub fn draining(&self) -> Option<Draining> {
        let (since, started) = *self.open.started.get()?;
        Some(Draining {
            since,
            elapsed: started.elapsed(),
            open: self.open.now.load(Ordering::Acquire),
        })
    }
}

/// Owned by the process: starts the drain and waits for it.
pub struct Shutdown {
    phase: watch::Sender<Phase>,
    open: Arc<Open>,
}

/// A drain pair: the `Drain` is cloned into every listener.
pub fn channel() -> (Shutdown, Drain) {
    let (phase, phase_rx) = watch::channel(Phase::Serving);
    let open = Arc::new(Open::default());
    (
        Shutdown {
            phase,
            open: open.clone(),
        },
        Drain {
            phase: phase_rx,
            stops_at: Phase::Draining,
            open,
            counted: true,
        },
    )
}

impl Drain {
    /// A `Drain` for a listener that keeps accepting while the drain runs
    /// and stops only when it ends: an outbound one, which the app may
    /// still need while it shuts down.
    pub fn until_exit(&self) -> Drain {
        Drain {
            stops_at: Phase::Exiting,
            ..self.clone()
        }
    }

    /// A `Drain` for a listener that, as [`until_exit`](Self::until_exit),
    /// keeps accepting until the drain ends, and whose connections the
    /// drain neither waits for nor counts as activity: the admin port, so
    /// the kubelet's probes and Prometheus's scrapes are answered through
    /// the drain without keeping it from ending.
    pub fn until_exit_uncounted(&self) -> Drain {
        Drain {
            stops_at: Phase::Exiting,
            counted: false,
            ..self.clone()
        }
    }

    /// Reads where the drain is.
    pub fn status(&self) -> Status {
        Status {
            open: self.open.clone(),
        }
    }

    /// Resolves once this listener is to stop: when shutdown starts, or
    /// for one made by [`until_exit`](Self::until_exit), when it ends.
    pub async fn signaled(&mut self) {
        let stops_at = self.stops_at;
        // An error means the Shutdown is gone: stop too.
        let _ = self.phase.wait_for(|p| *p >= stops_at).await;
    }

    /// The tracker of a connection just accepted; the drain counts it
    /// open until it and its clones are dropped (unless this `Drain` was
    /// made by [`until_exit_uncounted`](Self::until_exit_uncounted)).
    pub fn tracker(&self) -> Tracker {
        if !self.counted {
            return Tracker {
                open: None,
                inbound: false,
                phase: self.phase.clone(),
            };
        }
        let inbound = self.stops_at == Phase::Draining;
        self.open.opened.fetch_add(1, Ordering::AcqRel);
        if inbound {
            self.open.inbound.fetch_add(1, Ordering::AcqRel);
        }
        self.open.now.fetch_add(1, Ordering::SeqCst);
        self.open.changed();
        Tracker {
            open: Some(self.open.clone()),
            inbound,
            phase: self.phase.clone(),
        }
    }

    /// Accepts on `listener` until it is to stop, handing every connection
    /// to `serve` with its tracker, then closes it: a new connection is
    /// refused from then on. `what` names the listener in the log.
    pub async fn accept(
        self,
        listener: TcpListener,
        what: &'static str,
        mut serve: impl FnMut(TcpStream, SocketAddr, Tracker),
    ) {
        self.accept_when(
            listener,
            what,
            || std::future::ready(()),
            |tcp, client, tracker, ()| serve(tcp, client, tracker),
        )
        .await
    }

    /// Accepts as [`accept`](Self::accept) does, each connection only once
    /// `permits` has one for it, handed to `serve` with the connection to
    /// hold for as long as it counts against the limit. While every permit
    /// is held the listener accepts nothing: new connections wait in the
    /// listen backlog, where they cost the sidecar no memory.
    pub async fn accept_with_permits(
        self,
        listener: TcpListener,
        what: &'static str,
        permits: &Arc<Semaphore>,
        serve: impl FnMut(TcpStream, SocketAddr, Tracker, OwnedSemaphorePermit),
    ) {
        let mut warned: Option<Instant> = None;
        let mut permit = move || {
            let permits = permits.clone();
            let full = permits.available_permits() == 0;
            if full && warned.is_none_or(|at| at.elapsed() >= LIMIT_WARNING_PAUSE) {
                warned = Some(Instant::now());
                tracing::warn!(
                    listener = what,
                    "as many connections as this listener sets up at once are being set up; new ones wait to be accepted"
                );
            }
            async move {
                permits
                    .acquire_owned()
                    .await
                    .expect("the permits of a listener are never closed")
            }
        };
        self.accept_when(listener, what, &mut permit, serve).await
    }

    /// The accept loop: waits for `admit` before each accept, and hands
    /// what it gave to `serve` with the connection.
    async fn accept_when<T, F: Future<Output = T>>(
        mut self,
        listener: TcpListener,
        what: &'static str,
        mut admit: impl FnMut() -> F,
        mut serve: impl FnMut(TcpStream, SocketAddr, Tracker, T),
    ) {
        loop {
            let admitted = tokio::select! {
                _ = self.signaled() => break,
                admitted = admit() => admitted,
            };
            let accepted = tokio::select! {
                _ = self.signaled() => break,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((tcp, client)) => serve(tcp, client, self.tracker(), admitted),
                Err(e) => {
                    tracing::warn!(listener = what, error = %e, "accept failed; pausing");
                    tokio::select! {
                        _ = self.signaled() => break,
                        _ = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => {}
                    }
                }
            }
        }
        // Closed before it says so: whoever reads the line finds new
        // connections refused.
        drop(listener);
        tracing::info!(listener = what, "listener stopped accepting");
    }
}

impl Shutdown {
    /// Starts the drain: the listeners that stop first close and every
    /// open connection is told. Those made by [`Drain::until_exit`] keep
    /// accepting until [`exit`](Self::exit).
    pub fn start(&self) {
        let _ = self.open.started.set((SystemTime::now(), Instant::now()));
        // Set before anything waits on `changed` (`quiet` comes after).
        self.open.draining.store(true, Ordering::SeqCst);
        self.phase.send_replace(Phase::Draining);
    }

    /// Resolves once no connection has been open for `quiet`: at once for
    /// a zero `quiet` when none is open, and never while one stays open.
    /// A connection that opens meanwhile starts the wait again once it
    /// ends.
    pub async fn quiet(&self, quiet: Duration) {
        let open = &*self.open;
        loop {
            // Registered before the count is read, so a change between
            // the read and the wait is not missed.
            let changed = open.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let opened = open.opened.load(Ordering::Acquire);
            if open.now.load(Ordering::Acquire) > 0 {
                changed.await;
                continue;
            }
            if quiet.is_zero() {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep(quiet) => {
                    if open.opened.load(Ordering::Acquire) == opened {
                        return;
                    }
                }
                () = changed => {}
            }
        }
    }

    /// How many connections are open.
    pub fn open(&self) -> usize {
        self.open.now.load(Ordering::Acquire)
    }

    /// The connections open, by side.
    pub fn open_connections(&self) -> OpenConnections {
        self.open.by_side()
    }

    /// Ends the drain: every listener still accepting closes.
    pub fn exit(self) {
        self.phase.send_replace(Phase::Exiting);
    }

    /// Drains in one go: [`start`](Self::start), then waits until no
    /// connection is open, or `timeout` passes, then [`exit`](Self::exit).
    /// Returns whether every connection closed in time.
    pub async fn drain(self, timeout: Duration) -> bool {
        self.start();
        let drained = tokio::time::timeout(timeout, self.quiet(Duration::ZERO))
            .await
            .is_ok();
        self.exit();
        drained
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_for_open_connections() {
        let (shutdown, mut drain) = channel();
        let tracker = drain.tracker();
        let listener = tokio::spawn(async move { drain.signaled().await });
        let conn = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(tracker);
        });
        assert!(shutdown.drain(Duration::from_secs(30)).await);
        listener.await.unwrap();
        conn.await.unwrap();
    }

    #[tokio::test]
    async fn gives_up_at_the_deadline() {
        let (shutdown, drain) = channel();
        let _stuck = drain.tracker();
        drop(drain);
        assert!(!shutdown.drain(Duration::from_millis(10)).await);
    }

    /// Inbound listeners stop when the drain starts, outbound ones only
    /// when it ends.
    #[tokio::test]
    async fn outbound_listeners_accept_until_the_drain_ends() {
        let (shutdown, inbound) = channel();
        let mut outbound = inbound.until_exit();
        let mut inbound = inbound;
        shutdown.start();
        inbound.signaled().await;
        let outbound = tokio::spawn(async move { outbound.signaled().await });
        tokio::task::yield_now().await;
        assert!(!outbound.is_finished(), "outbound stopped with inbound");
        shutdown.exit();
        outbound.await.unwrap();
    }

    /// The drain ends once no connection has been open for the quiet
    /// period; one opened meanwhile starts it again when it closes.
    #[tokio::test(start_paused = true)]
    async fn quiet_waits_out_connections_opened_meanwhile() {
        let quiet = Duration::from_secs(1);
        let (shutdown, drain) = channel();
        shutdown.start();
        let started = tokio::time::Instant::now();
        shutdown.quiet(quiet).await;
        assert_eq!(started.elapsed(), quiet, "nothing open");

        let started = tokio::time::Instant::now();
        let call = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let tracker = drain.tracker();
            tokio::time::sleep(Duration::from_millis(200)).await;
            drop(tracker);
        });
        shutdown.quiet(quiet).await;
        assert_eq!(started.elapsed(), Duration::from_millis(700) + quiet);
        call.await.unwrap();
    }

    /// The admin port's connections neither hold the drain open nor
    /// start its quiet period again; it accepts until the drain ends, and
    /// its status says since when the drain runs and what it waits for.
    #[tokio::test(start_paused = true)]
    async fn uncounted_connections_do_not_hold_the_drain() {
        let quiet = Duration::from_secs(1);
        let (shutdown, drain) = channel();
        let mut admin = drain.until_exit_uncounted();
        let status = admin.status();
        assert_eq!(status.draining(), None);
        let call = drain.tracker();
        shutdown.start();
        let draining = status.draining().expect("the drain started");
        assert_eq!(draining.open, 1);
        assert!(draining.since <= SystemTime::now());

        let started = tokio::time::Instant::now();
        let probes = tokio::spawn({
            let admin = admin.clone();
            async move {
                // Held across the drain's end, and one accepted meanwhile.
                let held = admin.tracker();
                tokio::time::sleep(Duration::from_millis(500)).await;
                drop(admin.tracker());
                held
            }
        });
        drop(call);
        // On the paused clock: fails at once, rather than hangs, when an
        // admin connection holds the drain open.
        tokio::time::timeout(10 * quiet, shutdown.quiet(quiet))
            .await
            .expect("an admin connection held the drain open");
        assert_eq!(started.elapsed(), quiet, "an admin connection counted");
        assert_eq!(status.draining().map(|d| d.open), Some(0));
        let admin_listener = tokio::spawn(async move { admin.signaled().await });
        tokio::task::yield_now().await;
        assert!(!admin_listener.is_finished(), "admin stopped with inbound");
        shutdown.exit();
        admin_listener.await.unwrap();
        drop(probes.await.unwrap());
    }

    /// What a drain cuts is told by side: connections accepted inbound
    /// (and their clones) apart from the app's outbound ones; the admin
    /// port's are neither.
    #[test]
    fn open_connections_are_told_apart_by_side() {
        let (shutdown, inbound) = channel();
        let outbound = inbound.until_exit();
        let admin = inbound.until_exit_uncounted();
        let caller = inbound.tracker();
        let caller_clone = caller.clone();
        let app = outbound.tracker();
        let _probe = admin.tracker();
        let second_app = outbound.tracker();
        let both = |inbound, outbound| OpenConnections { inbound, outbound };
        // A clone counts as the original does, as the drain counts it.
        assert_eq!(shutdown.open_connections(), both(2, 2));
        drop(caller);
        assert_eq!(
            shutdown.open_connections(),
            both(1, 2),
            "a clone still open"
        );
        drop(caller_clone);
        assert_eq!(shutdown.open_connections(), both(0, 2));
        drop(app);
        assert_eq!(inbound.status().open_connections(), both(0, 1));
        drop(second_app);
        assert_eq!(shutdown.open_connections(), both(0, 0));
    }
}
