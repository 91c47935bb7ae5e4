//! How the inbound side seals its session tickets: AES-256-GCM under a
//! key that lives only in this process.
//!
//! A ticket is the caller's session (its secret and its verified chain)
//! sealed under a key the caller does not hold, sent to it after the
//! handshake and brought back to resume. Every new connection from a
//! peer that resumes costs the server side two seals (the two tickets it
//! sends back) and one opening (the ticket it was offered). rustls' own
//! ticketer seals as RFC 5077 §4 recommends: AES-CBC, then HMAC-SHA-256
//! over the result, each a pass of its own over a ticket of about a
//! kilobyte, with three buffers allocated to seal one. AES-GCM encrypts
//! and authenticates in one pass, in place, in the one buffer the ticket
//! is sent from: about a tenth of the instructions a ticket (callgrind).
//!
//! A ticket is `key name (8) | sequence (8) | sealed session | tag (16)`.
//! The key name, random with the key, tells at once that a ticket is not
//! this key's; it is also the seal's associated data. The nonce is the
//! sequence number, counted per key, so no two tickets of a key share
//! one without any randomness drawn per ticket. rustls'
//! [`TicketRotator`] replaces the key every [`ROTATE_EVERY`] seconds and
//! keeps the one before, so a ticket opens for as long as rustls' own
//! ticketer lets it (at most [`LIFETIME`], the lifetime told to callers).
//! A key never leaves the process: a restart begins with a new one, and
//! a caller whose ticket no longer opens falls back to a full handshake.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use rustls::crypto::GetRandomFailed;
use rustls::server::ProducesTickets;
use rustls::ticketer::TicketRotator;

/// Seconds between two keys. The key before stays able to open tickets
/// for as long again.
pub const ROTATE_EVERY: u32 = 6 * 60 * 60;
/// The lifetime a ticket is sent with, in seconds: past it the caller
/// does not offer it.
pub const LIFETIME: u32 = 12 * 60 * 60;

const NAME_LEN: usize = 8;
const SEQUENCE_LEN: usize = 8;
const TAG_LEN: usize = 16;
/// What a ticket adds to the session it seals.
const OVERHEAD: usize = NAME_LEN + SEQUENCE_LEN + TAG_LEN;

/// The ticketer of a new inbound config: sealing under a fresh key,
/// replaced every [`ROTATE_EVERY`] seconds.
pub fn ticketer() -> Result<Arc<dyn ProducesTickets>, rustls::Error> {
    Ok(Arc::new(TicketRotator::new(ROTATE_EVERY, || {
        TicketKey::generate().map(|key| Box::new(key) as Box<dyn ProducesTickets>)
    })?))
}

/// One key's seal and opening of tickets.
struct TicketKey {
    name: [u8; NAME_LEN],
    key: LessSafeKey,
    /// The next ticket's sequence number, its nonce.
    next: AtomicU64,
    /// The longest ticket sealed: a longer one offered was not ours, and
    /// is refused before it is copied.
    longest: AtomicUsize,
}

impl TicketKey {
    fn generate() -> Result<Self, GetRandomFailed> {
        let random = SystemRandom::new();
        let mut name = [0u8; NAME_LEN];
        random.fill(&mut name).map_err(|_| GetRandomFailed)?;
        let mut secret = [0u8; 32];
        random.fill(&mut secret).map_err(|_| GetRandomFailed)?;
        let key = UnboundKey::new(&AES_256_GCM, &secret);
        // aws-lc holds its own copy, expanded; this one goes now.
        zeroize::Zeroize::zeroize(&mut secret);
        Ok(TicketKey {
            name,
            key: LessSafeKey::new(key.map_err(|_| GetRandomFailed)?),
            next: AtomicU64::new(0),
            longest: AtomicUsize::new(0),
        })
    }

    fn nonce(sequence: [u8; SEQUENCE_LEN]) -> Nonce {
        let mut nonce = [0u8; NONCE_LEN];
        nonce[NONCE_LEN - SEQUENCE_LEN..].copy_from_slice(&sequence);
        Nonce::assume_unique_for_key(nonce)
    }
}

impl ProducesTickets for TicketKey {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        LIFETIME
    }

    fn encrypt(&self, session: &[u8]) -> Option<Vec<u8>> {
        // A nonce used twice would give the key away: the count never
        // wraps. 2^64 tickets in six hours will not happen, but a key that
        // got there seals no more.
        let sequence = self
            .next
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_add(1))
            .ok()?
            .to_be_bytes();
        let mut ticket = Vec::with_capacity(session.len() + OVERHEAD);
        ticket.extend_from_slice(&self.name);
        ticket.extend_from_slice(&sequence);
        ticket.extend_from_slice(session);
        let tag = self
            .key
            .seal_in_place_separate_tag(
                Self::nonce(sequence),
                Aad::from(&self.name),
                &mut ticket[NAME_LEN + SEQUENCE_LEN..],
            )
            .ok()?;
        ticket.extend_from_slice(tag.as_ref());
        self.longest.fetch_max(ticket.len(), Ordering::Relaxed);
        Some(ticket)
    }

    fn decrypt(&self, ticket: &[u8]) -> Option<Vec<u8>> {
        if ticket.len() < OVERHEAD || ticket.len() > self.longest.load(Ordering::Relaxed) {
            return None;
        }
        let (name, rest) = ticket.split_at(NAME_LEN);
        if name != self.name {
            return None;
        }
        let (sequence, sealed) = rest.split_at(SEQUENCE_LEN);
        let sequence: [u8; SEQUENCE_LEN] = sequence.try_into().ok()?;
        let mut session = sealed.to_vec();
        let opened = self
            .key
            .open_in_place(Self::nonce(sequence), Aad::from(name), &mut session)
            .ok()?
            .len();
        session.truncate(opened);
        Some(session)
    }
}

impl fmt::Debug for TicketKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key itself is never shown.
        f.debug_struct("TicketKey")
            .field("sealed", &self.next.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> Vec<u8> {
        (0..900u32).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn a_ticket_opens_to_its_session_and_hides_it() {
        let key = TicketKey::generate().unwrap();
        let session = session();
        let ticket = key.encrypt(&session).unwrap();
        assert_eq!(ticket.len(), session.len() + OVERHEAD);
        assert!(
            !ticket
                .windows(32)
                .any(|w| session.windows(32).any(|s| s == w)),
            "the session shows through its ticket"
        );
        assert_eq!(key.decrypt(&ticket).unwrap(), session);
    }

    #[test]
    fn two_tickets_of_one_session_differ() {
        let key = TicketKey::generate().unwrap();
        let session = session();
        let first = key.encrypt(&session).unwrap();
        let second = key.encrypt(&session).unwrap();
        assert_ne!(first, second);
        assert_ne!(
            first[NAME_LEN..NAME_LEN + SEQUENCE_LEN],
            second[NAME_LEN..NAME_LEN + SEQUENCE_LEN],
            "a nonce was used twice"
        );
        assert_eq!(key.decrypt(&first).unwrap(), session);
        assert_eq!(key.decrypt(&second).unwrap(), session);
    }

    #[test]
    fn a_changed_byte_anywhere_is_refused() {
        let key = TicketKey::generate().unwrap();
        let ticket = key.encrypt(&session()).unwrap();
        for at in 0..ticket.len() {
            let mut changed = ticket.clone();
            changed[at] ^= 0x01;
            assert_eq!(key.decrypt(&changed), None, "byte {at} changed");
        }
    }

    #[test]
    fn cut_short_grown_or_empty_tickets_are_refused() {
        let key = TicketKey::generate().unwrap();
        let ticket = key.encrypt(&session()).unwrap();
        for len in [0, 1, NAME_LEN, OVERHEAD - 1, OVERHEAD, ticket.len() - 1] {
            assert_eq!(key.decrypt(&ticket[..len]), None, "{len} bytes");
        }
        let mut grown = ticket.clone();
        grown.push(0);
        assert_eq!(key.decrypt(&grown), None);
        // An empty session seals and opens too.
        let empty = key.encrypt(&[]).unwrap();
        assert_eq!(key.decrypt(&empty).unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn another_keys_ticket_is_refused() {
        let ours = TicketKey::generate().unwrap();
        let theirs = TicketKey::generate().unwrap();
        let session = session();
        // Ours has sealed one as long, so only the key can refuse it.
        ours.encrypt(&session).unwrap();
        let foreign = theirs.encrypt(&session).unwrap();
        assert_eq!(ours.decrypt(&foreign), None);
        // Even under our key's name: the tag is theirs.
        let mut renamed = foreign.clone();
        renamed[..NAME_LEN].copy_from_slice(&ours.name);
        assert_eq!(ours.decrypt(&renamed), None);
    }

    #[test]
    fn a_key_that_has_used_every_nonce_seals_no_more() {
        let key = TicketKey::generate().unwrap();
        key.next.store(u64::MAX - 1, Ordering::Relaxed);
        let last = key.encrypt(&session()).unwrap();
        assert_eq!(
            last[NAME_LEN..NAME_LEN + SEQUENCE_LEN],
            [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe]
        );
        assert_eq!(key.encrypt(&session()), None);
        assert_eq!(key.encrypt(&session()), None, "the count wrapped");
        assert_eq!(key.decrypt(&last).unwrap(), session());
    }

    #[test]
    fn the_rotating_ticketer_seals_and_opens() {
        let ticketer = ticketer().unwrap();
        assert!(ticketer.enabled());
        assert_eq!(ticketer.lifetime(), LIFETIME);
        let session = session();
        let ticket = ticketer.encrypt(&session).unwrap();
        assert_eq!(ticketer.decrypt(&ticket).unwrap(), session);
        let other = super::ticketer().unwrap();
        assert_eq!(other.decrypt(&ticket), None, "a new ticketer's key is new");
    }

    #[test]
    fn debug_shows_no_key() {
        let key = TicketKey::generate().unwrap();
        key.encrypt(&session()).unwrap();
        let shown = format!("{key:?}");
        assert_eq!(shown, "TicketKey { sealed: 1, .. }");
    }
}
