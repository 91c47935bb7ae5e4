//! The limits on the HTTP/2 connections the inbound port serves at once,
//! from one peer and in all. Each such connection may hold up to
//! [`H2_STREAM_SEND_BUFFER`](crate::http::H2_STREAM_SEND_BUFFER) of
//! answers for each of its streams that its caller does not read, about
//! 13 MiB a connection: without a limit a few connections of one caller
//! that reads nothing could exhaust the sidecar's memory. A peer is one
//! SPIFFE ID calling from one address, one pod's sidecar: the replicas of
//! a workload, which share their identity, each have their own share, and
//! a normal peer, which multiplexes its requests over a few connections,
//! never meets it.
//!
//! A connection takes its slot once its HTTP/2 preface is in and holds it
//! until it ends; one past a limit is refused with a GOAWAY saying which
//! (`inbound::refuse_h2`) before the HTTP/2 server sees it. Taking and
//! giving back a slot locks once each: per connection, never per request.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};

use trellis_core::refusal::{H2_ENHANCE_YOUR_CALM, H2_REFUSED_STREAM};
use trellis_core::{SpiffeId, h2_limits};

/// The HTTP/2 connections held now, by peer.
pub struct H2Connections {
    held: Mutex<Held>,
    per_peer: usize,
    total: usize,
}

#[derive(Default)]
struct Held {
    total: usize,
    peers: HashMap<(SpiffeId, IpAddr), usize>,
}

/// Which limit refused an HTTP/2 connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum H2Refused {
    #[error("the peer holds {limit} HTTP/2 connections from its address already")]
    PerPeer { limit: usize },
    #[error("{limit} HTTP/2 connections are open already")]
    Total { limit: usize },
}

impl H2Refused {
    /// The limit as the metric's label names it: `per_peer` or `total`.
    pub fn reason(self) -> &'static str {
        match self {
            H2Refused::PerPeer { .. } => "per_peer",
            H2Refused::Total { .. } => "total",
        }
    }

    /// The error code of the GOAWAY that refuses the connection: a peer
    /// over its share is told to calm down; one refused because every
    /// slot is taken, that its requests were not processed and may go to
    /// another replica.
    pub fn goaway_code(self) -> u32 {
        match self {
            H2Refused::PerPeer { .. } => H2_ENHANCE_YOUR_CALM,
            H2Refused::Total { .. } => H2_REFUSED_STREAM,
        }
    }
}

/// One HTTP/2 connection's slot, given back when dropped.
pub struct H2Slot<'a> {
    owner: &'a H2Connections,
    peer: (SpiffeId, IpAddr),
}

impl H2Connections {
    /// At most `total` HTTP/2 connections at once, `per_peer` of them from
    /// one peer.
    ///
    /// # Panics
    ///
    /// If either is zero: no connection could ever be served.
    pub fn new(total: usize, per_peer: usize) -> Self {
        assert!(total > 0 && per_peer > 0, "HTTP/2 needs at least one slot");
        H2Connections {
            held: Mutex::default(),
            per_peer,
            total,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The slot of one more connection of `peer` from `client`, or the
    /// limit that refuses it.
    pub fn admit(&self, peer: &SpiffeId, client: IpAddr) -> Result<H2Slot<'_>, H2Refused> {
        let key = (peer.clone(), client);
        let mut held = self.lock();
        let mine = held.peers.get(&key).copied().unwrap_or(0);
        if mine >= self.per_peer {
            return Err(H2Refused::PerPeer {
                limit: self.per_peer,
            });
        }
        if held.total >= self.total {
            return Err(H2Refused::Total { limit: self.total });
        }
        held.total += 1;
        *held.peers.entry(key.clone()).or_default() += 1;
        Ok(H2Slot {
            owner: self,
            peer: key,
        })
    }
}

impl Default for H2Connections {
    fn default() -> Self {
        Self::new(h2_limits::DEFAULT_TOTAL, h2_limits::DEFAULT_PER_PEER)
    }
}

impl Drop for H2Slot<'_> {
    fn drop(&mut self) {
        let mut held = self.owner.lock();
        held.total -= 1;
        if let Some(mine) = held.peers.get_mut(&self.peer) {
            *mine -= 1;
            if *mine == 0 {
                held.peers.remove(&self.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(path: &str) -> SpiffeId {
        SpiffeId::parse(&format!("spiffe://td{path}")).unwrap()
    }

    #[test]
    fn a_peer_past_its_share_is_refused_and_others_are_not() {
        let limits = H2Connections::new(4, 2);
        let web = peer("/ns/a/sa/web");
        let here: IpAddr = "10.0.0.1".parse().unwrap();
        let there: IpAddr = "10.0.0.2".parse().unwrap();
        let first = limits.admit(&web, here).unwrap();
        let _second = limits.admit(&web, here).unwrap();
        assert_eq!(
            limits.admit(&web, here).err(),
            Some(H2Refused::PerPeer { limit: 2 })
        );
        // Another replica of the same workload has a share of its own.
        let _replica = limits.admit(&web, there).unwrap();
        let _other = limits.admit(&peer("/ns/b/sa/api"), here).unwrap();
        assert_eq!(
            limits.admit(&peer("/ns/c/sa/db"), here).err(),
            Some(H2Refused::Total { limit: 4 })
        );
        // A slot given back is taken again.
        drop(first);
        let _again = limits.admit(&web, here).unwrap();
        assert_eq!(limits.lock().total, 4);
    }

    #[test]
    fn nothing_is_kept_for_a_peer_that_holds_nothing() {
        let limits = H2Connections::new(4, 2);
        let slot = limits.admit(&peer("/ns/a/sa/web"), "10.0.0.1".parse().unwrap());
        drop(slot);
        let held = limits.lock();
        assert_eq!(held.total, 0);
        assert!(held.peers.is_empty());
    }
}
