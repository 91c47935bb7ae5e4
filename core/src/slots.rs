//! Per-client slots: how many connections one client address may hold at
//! once in some phase of their lives (the sidecar's inbound handshakes), so
//! that one client cannot take every connection a listener serves and
//! leave none for the others. The HTTP ports' limits, which also make way
//! for an address holding fewer, are [`crate::connections`].
//!
//! A slot is held until it is dropped. A connection may take one at once or
//! fail ([`ClientSlots::try_take`]), or wait a while for one
//! ([`ClientSlots::take_within`]), in the order the connections asked.
//! Nothing is kept for an address that holds no slot and waits for none.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::duration::Words;

/// The slots of every client address, the same number each.
pub struct ClientSlots {
    limit: usize,
    clients: Mutex<HashMap<IpAddr, Client>>,
}

/// One address's slots and the connections that count on them.
struct Client {
    /// `limit` permits, handed to waiting connections in the order they
    /// asked.
    slots: Arc<Semaphore>,
    held: usize,
    waiting: usize,
}

/// One connection's slot, given back when dropped.
pub struct ClientSlot {
    permit: Option<OwnedSemaphorePermit>,
    owner: Arc<ClientSlots>,
    ip: IpAddr,
}

/// Why a connection got no slot.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoSlot {
    #[error(
        "the address holds all {limit} of its slots and {waiting} more of its connections wait for one"
    )]
    Full { limit: usize, waiting: usize },
    #[error("the address held all {limit} of its slots for {}", Words(*patience))]
    TimedOut { limit: usize, patience: Duration },
}

impl ClientSlots {
    /// `limit` slots for each client address.
    ///
    /// # Panics
    ///
    /// If `limit` is zero: no connection could ever have one.
    pub fn new(limit: usize) -> Arc<Self> {
        assert!(limit > 0, "a client address needs at least one slot");
        Arc::new(ClientSlots {
            limit,
            clients: Mutex::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<IpAddr, Client>> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The entry of `ip`, made with every slot free if there is none.
    fn client<'c>(&self, clients: &'c mut HashMap<IpAddr, Client>, ip: IpAddr) -> &'c mut Client {
        clients.entry(ip).or_insert_with(|| Client {
            slots: Arc::new(Semaphore::new(self.limit)),
            held: 0,
            waiting: 0,
        })
    }

    /// A free slot of `client`, if it has one.
    fn free_slot(self: &Arc<Self>, client: &mut Client, ip: IpAddr) -> Option<ClientSlot> {
        let permit = client.slots.clone().try_acquire_owned().ok()?;
        client.held += 1;
        Some(ClientSlot {
            permit: Some(permit),
            owner: self.clone(),
            ip,
        })
    }

    /// A slot for one more connection from `ip`, unless the address holds
    /// all of its slots already.
    pub fn try_take(self: &Arc<Self>, ip: IpAddr) -> Option<ClientSlot> {
        let mut clients = self.lock();
        // A new entry has every slot free, so an entry without one was
        // there already: none is left behind empty.
        let client = self.client(&mut clients, ip);
        self.free_slot(client, ip)
    }

    /// A slot for one more connection from `ip`: at once if the address
    /// has one free, or else the first to come free within `patience`,
    /// after those of its connections that waited longer. When
    /// `max_waiting` of its connections wait already, this one does not.
    pub async fn take_within(
        self: &Arc<Self>,
        ip: IpAddr,
        patience: Duration,
        max_waiting: usize,
    ) -> Result<ClientSlot, NoSlot> {
        let slots = {
            let mut clients = self.lock();
            let client = self.client(&mut clients, ip);
            if let Some(slot) = self.free_slot(client, ip) {
                return Ok(slot);
            }
            if client.waiting >= max_waiting {
                return Err(NoSlot::Full {
                    limit: self.limit,
                    waiting: client.waiting,
                });
            }
            client.waiting += 1;
            client.slots.clone()
        };
        let waiting = Waiting {
            owner: self,
            ip,
            over: false,
        };
        let permit = tokio::time::timeout(patience, slots.acquire_owned())
            .await
            .ok()
            .map(|permit| permit.expect("a client's semaphore is never closed"));
        waiting.end(permit).ok_or(NoSlot::TimedOut {
            limit: self.limit,
            patience,
        })
    }

    /// Forgets `ip` if it holds no slot and waits for none.
    fn forget_if_unused(clients: &mut HashMap<IpAddr, Client>, ip: IpAddr) {
        if clients
            .get(&ip)
            .is_some_and(|c| c.held == 0 && c.waiting == 0)
        {
            clients.remove(&ip);
        }
    }
}

/// A connection counted as waiting for a slot of `ip` until its wait is
/// over, also when it is dropped while waiting.
struct Waiting<'a> {
    owner: &'a Arc<ClientSlots>,
    ip: IpAddr,
    over: bool,
}

impl Waiting<'_> {
    /// Ends the wait; the permit, if one came, becomes a held slot. Both
    /// change under one lock, so the address is never forgotten while a
    /// permit of its semaphore is out.
    fn end(mut self, permit: Option<OwnedSemaphorePermit>) -> Option<ClientSlot> {
        self.over = true;
        let mut clients = self.owner.lock();
        let client = clients
            .get_mut(&self.ip)
            .expect("an address is kept while a connection waits for it");
        client.waiting -= 1;
        match permit {
            Some(permit) => {
                client.held += 1;
                Some(ClientSlot {
                    permit: Some(permit),
                    owner: self.owner.clone(),
                    ip: self.ip,
                })
            }
            None => {
                ClientSlots::forget_if_unused(&mut clients, self.ip);
                None
            }
        }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.over {
            return;
        }
        let mut clients = self.owner.lock();
        if let Some(client) = clients.get_mut(&self.ip) {
            client.waiting -= 1;
        }
        ClientSlots::forget_if_unused(&mut clients, self.ip);
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut clients = self.owner.lock();
        // Given back under the lock: a connection it goes to is still
        // counted as waiting, so the address is not forgotten before that
        // connection counts it as held.
        drop(self.permit.take());
        if let Some(client) = clients.get_mut(&self.ip) {
            client.held -= 1;
        }
        ClientSlots::forget_if_unused(&mut clients, self.ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs() -> (IpAddr, IpAddr) {
        ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap())
    }

    fn is_empty(slots: &ClientSlots) -> bool {
        slots.lock().is_empty()
    }

    #[test]
    fn a_client_address_holds_at_most_its_share_of_slots() {
        let slots = ClientSlots::new(4);
        let (one, two) = addrs();
        let mut held: Vec<ClientSlot> = (0..4).map(|_| slots.try_take(one).unwrap()).collect();
        assert!(slots.try_take(one).is_none());
        let other = slots.try_take(two).expect("another address is served");
        held.pop();
        held.push(slots.try_take(one).expect("a slot came free"));
        drop((held, other));
        assert!(is_empty(&slots), "nothing kept for gone clients");
    }

    /// A connection over the address's slots waits for one, in turn;
    /// past `max_waiting` waiting, or once its patience is out, it is
    /// refused. Another address is served all along.
    #[tokio::test]
    async fn a_connection_waits_for_a_slot_of_its_address_in_turn() {
        let slots = ClientSlots::new(2);
        let (one, two) = addrs();
        let patience = Duration::from_secs(10);
        let held = [slots.try_take(one).unwrap(), slots.try_take(one).unwrap()];
        let first = tokio::spawn({
            let slots = slots.clone();
            async move { slots.take_within(one, patience, 2).await }
        });
        tokio::task::yield_now().await;
        let second = tokio::spawn({
            let slots = slots.clone();
            async move { slots.take_within(one, patience, 2).await }
        });
        while slots.lock()[&one].waiting < 2 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            slots.take_within(one, patience, 2).await.err(),
            Some(NoSlot::Full {
                limit: 2,
                waiting: 2
            }),
        );
        let other = slots
            .take_within(two, patience, 2)
            .await
            .expect("another address is served at once");

        let [a, b] = held;
        drop(a);
        let first = first
            .await
            .unwrap()
            .expect("the first to wait is served first");
        assert!(!second.is_finished());
        drop(b);
        let second = second.await.unwrap().expect("then the second");

        let late = slots
            .take_within(one, Duration::from_millis(50), 2)
            .await
            .err();
        assert_eq!(
            late,
            Some(NoSlot::TimedOut {
                limit: 2,
                patience: Duration::from_millis(50)
            })
        );
        drop((first, second, other));
        assert!(is_empty(&slots), "nothing kept for gone clients");
    }

    /// A connection dropped while it waits (its task ended) counts no
    /// longer, and leaves nothing behind.
    #[tokio::test]
    async fn a_wait_given_up_is_no_longer_counted() {
        let slots = ClientSlots::new(1);
        let (one, _) = addrs();
        let held = slots.try_take(one).unwrap();
        let waiter = tokio::spawn({
            let slots = slots.clone();
            async move { slots.take_within(one, Duration::from_secs(10), 1).await }
        });
        while slots.lock()[&one].waiting < 1 {
            tokio::task::yield_now().await;
        }
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(slots.lock()[&one].waiting, 0);
        drop(held);
        assert!(is_empty(&slots), "nothing kept for gone clients");
    }
}
