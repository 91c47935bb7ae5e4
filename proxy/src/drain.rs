//! Graceful shutdown: one signal tells every listener to stop accepting, and
//! every open connection holds a [`Tracker`] so shutdown can wait for them to
//! finish, up to a deadline.
//!
//! This module never closes a connection itself: when the deadline passes the
//! process exits and the sockets close with it.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};

/// How long a listener waits after a failed accept (out of file descriptors,
/// say) before it tries again, so the failure neither spins a core nor floods
/// the log.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// How often a listener that has reached its limit of connections being
/// set up says so in the log, at most.
const LIMIT_WARNING_PAUSE: Duration = Duration::from_secs(10);

/// Held by a listener: tells it when to stop, and hands each connection a
/// tracker.
#[derive(Clone)]
pub struct Drain {
    signal: watch::Receiver<bool>,
    tracker: mpsc::Sender<()>,
}

/// Held by one open connection until it ends; tells it when shutdown has
/// started, so a connection that can end cleanly early (an HTTP one,
/// between requests) does.
#[derive(Clone)]
pub struct Tracker {
    _open: mpsc::Sender<()>,
    signal: watch::Receiver<bool>,
}

impl Tracker {
    /// Resolves once shutdown has started.
    pub async fn draining(&self) {
        let mut signal = self.signal.clone();
        // An error means the Shutdown is gone: the process is stopping.
        let _ = signal.wait_for(|stop| *stop).await;
    }
}

/// Owned by the process: starts the drain and waits for it.
pub struct Shutdown {
    signal: watch::Sender<bool>,
    done: mpsc::Receiver<()>,
}

/// A drain pair: the `Drain` is cloned into every listener.
pub fn channel() -> (Shutdown, Drain) {
    let (signal, signal_rx) = watch::channel(false);
    let (tracker, done) = mpsc::channel(1);
    (
        Shutdown { signal, done },
        Drain {
            signal: signal_rx,
            tracker,
        },
    )
}

impl Drain {
    /// Resolves once shutdown has started.
    pub async fn signaled(&mut self) {
        // An error means the Shutdown is gone: stop too.
        let _ = self.signal.wait_for(|stop| *stop).await;
    }

    pub fn tracker(&self) -> Tracker {
        Tracker {
            _open: self.tracker.clone(),
            signal: self.signal.clone(),
        }
    }

    /// Accepts on `listener` until shutdown starts, handing every connection
    /// to `serve` with its tracker. `what` names the listener in the log.
    pub async fn accept(
        self,
        listener: &TcpListener,
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
        listener: &TcpListener,
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
        listener: &TcpListener,
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
        tracing::info!(listener = what, "listener stopped accepting");
    }
}

impl Shutdown {
    /// Tells every listener to stop and waits until every `Drain` and
    /// `Tracker` is dropped, or `timeout` passes. Returns whether everything
    /// closed in time.
    pub async fn drain(mut self, timeout: Duration) -> bool {
        self.signal.send_replace(true);
        // `recv` yields `None` once every sender is dropped; nothing is sent.
        tokio::time::timeout(timeout, self.done.recv())
            .await
            .is_ok()
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
}
