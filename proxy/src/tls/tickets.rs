//! Session tickets a sidecar keeps for the peers it dials, so that a new
//! connection to a peer it has talked to resumes the session: no
//! certificate signing or chain verification on either side, while the
//! key exchange still runs (resumed sessions keep forward secrecy).
//!
//! rustls' own cache keeps at most 8 tickets per server, and a sidecar
//! opening connections to one peer faster than it gets tickets back ran
//! out (a fifth of new connections fell back to full handshakes with 16
//! dialling at once). [`PeerTickets`] keeps up to [`MAX_TICKETS`]. Each
//! expected peer identity has its own tickets, kept by the name of the
//! address they came from (the replicas of a workload share its identity
//! and each seals tickets with a key of its own), shared by its two client
//! configs (the hybrid one for full handshakes and the one for resuming,
//! see [`super::PeerClient`]), each config with its own store
//! remembering the key-exchange group it last used. Both stores keep the
//! tickets their sessions bring back; only the resuming config's
//! ([`PeerTickets::store`]) resumes with them, the hybrid config's
//! ([`PeerTickets::collecting_store`]) never does. The configs die when
//! the SVID or the trust bundle changes, so a ticket is never used with
//! another identity or after a rotation.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use rustls::NamedGroup;
use rustls::client::{ClientSessionStore, Tls12ClientSessionValue, Tls13ClientSessionValue};
use rustls::pki_types::{CertificateDer, ServerName};
use trellis_core::tls::SvidError;

/// Tickets kept per peer identity (newest first out). Each holds the
/// peer's certificate chain, about 1 KiB.
pub const MAX_TICKETS: usize = 32;

/// The tickets of one peer identity. Taken once per handshake, never per
/// request.
#[derive(Debug, Default)]
pub struct PeerTickets {
    inner: Mutex<Tickets<Tls13ClientSessionValue>>,
    /// The peer certificate a resumed session last brought back, with its
    /// validity period (Unix seconds): sessions resumed from one full
    /// handshake all bring back the same certificate, parsed once.
    checked: Mutex<Option<(CertificateDer<'static>, i64, i64)>>,
}

impl PeerTickets {
    /// The session store of the resuming config: it keeps the tickets its
    /// sessions bring back and resumes with them.
    pub fn store(self: &Arc<Self>) -> ConfigStore {
        ConfigStore {
            tickets: self.clone(),
            kx_hint: Mutex::default(),
            resumes: true,
        }
    }

    /// The session store of the hybrid config: it keeps the tickets its
    /// sessions bring back, for the resuming config, and never resumes
    /// with one. A dial that could not reserve a ticket begins a session;
    /// were it to take a ticket that came back while it connected, it
    /// would resume with the hybrid key exchange and could leave a dial
    /// that reserved a ticket without one.
    pub fn collecting_store(self: &Arc<Self>) -> ConfigStore {
        ConfigStore {
            resumes: false,
            ..self.store()
        }
    }

    /// Reserves a ticket for `name` for one dial, until the reservation
    /// is dropped: `None` when no ticket is held that another dial under
    /// way has not reserved (rustls takes the ticket only when it writes
    /// the ClientHello, after the TCP connect). The dial drops the
    /// reservation as soon as its session has taken the ticket, not when
    /// the handshake ends: a ticket gone from the store and still counted
    /// as reserved would leave another dial without one. Reservations are
    /// counted per name: the sidecar names each address of the peer
    /// identity on its own, as each replica seals its tickets with a key
    /// of its own.
    pub fn reserve(self: &Arc<Self>, name: &ServerName<'_>) -> Option<Reserved> {
        self.lock()
            .reserve(name)
            .then(|| Reserved(self.clone(), name.to_owned()))
    }

    /// Drops every ticket for `name` (the peer no longer accepts them).
    pub fn forget(&self, name: &ServerName<'_>) {
        self.lock().forget(name);
    }

    /// Whether the peer certificate `leaf` that a resumed session brought
    /// back is inside its validity period now. rustls restores it from the
    /// ticket and verifies nothing on resumption, so a certificate that
    /// expired after the session began is caught only here. Gives its
    /// notBefore (Unix seconds), which a revocation is checked against.
    pub fn still_valid(&self, leaf: &CertificateDer<'_>) -> Result<i64, SvidError> {
        let mut checked = self.checked.lock().unwrap_or_else(|e| e.into_inner());
        let (not_before, not_after) = match &*checked {
            Some((cert, not_before, not_after)) if cert.as_ref() == leaf.as_ref() => {
                (*not_before, *not_after)
            }
            _ => {
                let (not_before, not_after) = trellis_core::tls::validity_of(leaf)?;
                *checked = Some((leaf.clone().into_owned(), not_before, not_after));
                (not_before, not_after)
            }
        };
        drop(checked);
        trellis_core::tls::within_validity(not_before, not_after).map(|()| not_before)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tickets<Tls13ClientSessionValue>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The session store of one client config: the peer's shared tickets and
/// the group this config last settled with the peer (the key share its
/// next ClientHello sends).
#[derive(Debug)]
pub struct ConfigStore {
    tickets: Arc<PeerTickets>,
    kx_hint: Mutex<Option<(ServerName<'static>, NamedGroup)>>,
    /// Whether this config's handshakes take a ticket to resume.
    resumes: bool,
}

/// A ticket reserved for one dial to one name ([`PeerTickets::reserve`]).
#[derive(Debug)]
pub struct Reserved(Arc<PeerTickets>, ServerName<'static>);

impl Drop for Reserved {
    fn drop(&mut self) {
        self.0.lock().release(&self.1);
    }
}

/// Bounded tickets keyed by server name, oldest dropped first.
#[derive(Debug)]
struct Tickets<T> {
    queue: VecDeque<(ServerName<'static>, T)>,
    max: usize,
    /// Dials under way that hold a reservation, by name (a few names at
    /// once: the addresses being dialled).
    reserved: Vec<(ServerName<'static>, usize)>,
}

impl<T> Default for Tickets<T> {
    fn default() -> Self {
        Tickets {
            queue: VecDeque::new(),
            max: MAX_TICKETS,
            reserved: Vec::new(),
        }
    }
}

impl<T> Tickets<T> {
    fn insert(&mut self, name: ServerName<'static>, ticket: T) {
        if self.queue.len() >= self.max {
            self.queue.pop_front();
        }
        self.queue.push_back((name, ticket));
    }

    /// Counts one more dial counting on a ticket for `name`, if one is
    /// held beyond those already counted on.
    fn reserve(&mut self, name: &ServerName<'_>) -> bool {
        let held = self.queue.iter().filter(|(n, _)| n == name).count();
        let at = self.reserved.iter().position(|(n, _)| n == name);
        let reserved = at.map_or(0, |at| self.reserved[at].1);
        if held <= reserved {
            return false;
        }
        match at {
            Some(at) => self.reserved[at].1 += 1,
            None => self.reserved.push((name.to_owned(), 1)),
        }
        true
    }

    fn release(&mut self, name: &ServerName<'_>) {
        if let Some(at) = self.reserved.iter().position(|(n, _)| n == name) {
            self.reserved[at].1 -= 1;
            if self.reserved[at].1 == 0 {
                self.reserved.swap_remove(at);
            }
        }
    }

    fn forget(&mut self, name: &ServerName<'_>) {
        self.queue.retain(|(n, _)| n != name);
    }

    /// The newest ticket for `name`, removed: a ticket is used once.
    fn take(&mut self, name: &ServerName<'_>) -> Option<T> {
        let at = self.queue.iter().rposition(|(n, _)| n == name)?;
        self.queue.remove(at).map(|(_, ticket)| ticket)
    }
}

impl ClientSessionStore for ConfigStore {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        *self.kx_hint.lock().unwrap_or_else(|e| e.into_inner()) = Some((server_name, group));
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        match &*self.kx_hint.lock().unwrap_or_else(|e| e.into_inner()) {
            Some((name, group)) if name == server_name => Some(*group),
            _ => None,
        }
    }

    // TLS 1.2 is never negotiated between sidecars.
    fn set_tls12_session(&self, _: ServerName<'static>, _: Tls12ClientSessionValue) {}

    fn tls12_session(&self, _: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        None
    }

    fn remove_tls12_session(&self, _: &ServerName<'static>) {}

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: Tls13ClientSessionValue,
    ) {
        self.tickets.lock().insert(server_name, value);
    }

    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<Tls13ClientSessionValue> {
        if !self.resumes {
            return None;
        }
        self.tickets.lock().take(server_name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(n: &str) -> ServerName<'static> {
        ServerName::try_from(n.to_string()).unwrap()
    }

    #[test]
    fn keeps_the_newest_tickets_up_to_the_bound_and_gives_each_once() {
        let mut t = Tickets::default();
        for i in 0..MAX_TICKETS + 5 {
            t.insert(name("trellis.mesh"), i);
        }
        let mut taken = Vec::new();
        while let Some(i) = t.take(&name("trellis.mesh")) {
            taken.push(i);
        }
        let expected: Vec<usize> = (5..MAX_TICKETS + 5).rev().collect();
        assert_eq!(taken, expected, "newest first, the 5 oldest dropped");
    }

    #[test]
    fn a_dial_counts_on_a_ticket_no_other_dial_under_way_counts_on() {
        let mut t = Tickets::default();
        assert!(!t.reserve(&name("a.mesh")), "no ticket held");
        t.insert(name("a.mesh"), 1);
        t.insert(name("a.mesh"), 2);
        assert!(t.reserve(&name("a.mesh")));
        assert!(t.reserve(&name("a.mesh")));
        assert!(!t.reserve(&name("a.mesh")), "both are counted on");
        // Another name's tickets are counted apart.
        t.insert(name("b.mesh"), 3);
        assert!(t.reserve(&name("b.mesh")));
        assert!(!t.reserve(&name("b.mesh")));
        t.release(&name("b.mesh"));
        // One dial took its ticket and ended.
        assert_eq!(t.take(&name("a.mesh")), Some(2));
        t.release(&name("a.mesh"));
        assert!(!t.reserve(&name("a.mesh")), "the other is still counted on");
        t.release(&name("a.mesh"));
        assert!(t.reserve(&name("a.mesh")));
        t.release(&name("a.mesh"));
        t.forget(&name("a.mesh"));
        assert!(!t.reserve(&name("a.mesh")), "forgotten");
        assert_eq!(t.take(&name("a.mesh")), None);
        assert!(
            t.reserved.is_empty(),
            "nothing counted for names not dialled"
        );
    }

    /// Real handshakes in memory with a server that sends tickets: the
    /// hybrid config's store keeps what its sessions bring back and never
    /// resumes with it; the resuming config's store resumes with it.
    #[test]
    fn only_the_resuming_store_resumes() {
        use rustls::client::Resumption;
        use rustls::{
            ClientConfig, ClientConnection, HandshakeKind, ServerConfig, ServerConnection,
        };

        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let cert = rcgen::generate_simple_self_signed(vec!["a.mesh".into()]).unwrap();
        let key =
            rustls::pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der()).unwrap();
        let server = Arc::new(
            ServerConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![cert.cert.der().clone()], key)
                .unwrap(),
        );
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.cert.der().clone()).unwrap();
        let tickets = Arc::new(PeerTickets::default());
        // Two configs with one verifier and one client-certificate resolver,
        // as a peer's two configs share them: rustls resumes only then.
        let mut hybrid = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut resuming = hybrid.clone();
        hybrid.resumption = Resumption::store(Arc::new(tickets.collecting_store()));
        resuming.resumption = Resumption::store(Arc::new(tickets.store()));
        let (hybrid, resuming) = (Arc::new(hybrid), Arc::new(resuming));
        // One handshake, then the server's tickets read by the client.
        let handshake = |config: &Arc<ClientConfig>| {
            let mut c = ClientConnection::new(config.clone(), name("a.mesh")).unwrap();
            let mut s = ServerConnection::new(server.clone()).unwrap();
            for _ in 0..10 {
                let mut wire = Vec::new();
                c.write_tls(&mut wire).unwrap();
                s.read_tls(&mut &wire[..]).unwrap();
                s.process_new_packets().unwrap();
                wire.clear();
                s.write_tls(&mut wire).unwrap();
                c.read_tls(&mut &wire[..]).unwrap();
                c.process_new_packets().unwrap();
            }
            assert!(!c.is_handshaking() && !s.is_handshaking());
            c.handshake_kind().unwrap()
        };

        assert_eq!(handshake(&hybrid), HandshakeKind::Full);
        assert!(
            tickets.reserve(&name("a.mesh")).is_some(),
            "the hybrid config's session brought tickets back"
        );
        assert_eq!(
            handshake(&hybrid),
            HandshakeKind::Full,
            "the hybrid config never resumes, tickets held or not"
        );
        assert_eq!(handshake(&resuming), HandshakeKind::Resumed);
    }

    #[test]
    fn a_ticket_is_only_given_for_the_name_it_came_from() {
        let mut t = Tickets::default();
        t.insert(name("a.mesh"), 1);
        assert_eq!(t.take(&name("b.mesh")), None);
        assert_eq!(t.take(&name("a.mesh")), Some(1));
        assert_eq!(t.take(&name("a.mesh")), None);
    }
}
