//! The Kubernetes store's issued-certificate log: a bounded ring in
//! memory, one per replica.
//!
//! Pods carry no certificate, so the log is also where a listing learns
//! each identity's newest certificate ([`IssuedRing::view`]). That needs to
//! know what the log cannot hold: certificates issued before the replica
//! started (a restart empties the ring) and those the ring has dropped to
//! stay within [`ISSUED_LOG_CAPACITY`]. The ring keeps the time since which
//! it holds every certificate it was given.

use std::collections::{HashMap, VecDeque};

use super::ISSUED_LOG_CAPACITY;
use crate::store::{IssuedCertRecord, IssuedLogView};

/// The newest [`ISSUED_LOG_CAPACITY`] issued certificates, newest last.
#[derive(Debug)]
pub(super) struct IssuedRing {
    records: VecDeque<IssuedCertRecord>,
    capacity: usize,
    /// Every certificate recorded since then (Unix seconds) is held.
    complete_since_unix: i64,
}

impl IssuedRing {
    /// An empty ring of a replica started at `now_unix`.
    pub(super) fn new(now_unix: i64) -> Self {
        Self::with_capacity(ISSUED_LOG_CAPACITY, now_unix)
    }

    fn with_capacity(capacity: usize, now_unix: i64) -> Self {
        IssuedRing {
            records: VecDeque::new(),
            capacity,
            complete_since_unix: now_unix,
        }
    }

    /// Adds `issued`, dropping the oldest record when full. Records arrive
    /// about in order of issuance, not exactly (concurrent Certify calls),
    /// so a dropped record moves the complete span past its own second,
    /// and never back.
    pub(super) fn push(&mut self, issued: &IssuedCertRecord) {
        if self.records.len() >= self.capacity
            && let Some(dropped) = self.records.pop_front()
        {
            self.complete_since_unix = self
                .complete_since_unix
                .max(dropped.issued_at_unix.saturating_add(1));
        }
        self.records.push_back(issued.clone());
    }

    /// Every record, newest first.
    pub(super) fn newest_first(&self) -> impl Iterator<Item = &IssuedCertRecord> {
        self.records.iter().rev()
    }

    /// The newest certificate of each identity, and since when the ring
    /// is complete.
    pub(super) fn view(&self) -> IssuedLogView {
        let mut newest: HashMap<&str, &IssuedCertRecord> = HashMap::new();
        for record in &self.records {
            let entry = newest.entry(record.spiffe_id.as_str()).or_insert(record);
            if record.not_after_unix > entry.not_after_unix {
                *entry = record;
            }
        }
        IssuedLogView {
            complete_since_unix: self.complete_since_unix,
            newest: newest.into_values().cloned().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, issued_at: i64) -> IssuedCertRecord {
        IssuedCertRecord {
            serial_hex: format!("{issued_at:x}"),
            spiffe_id: id.into(),
            issued_at_unix: issued_at,
            not_after_unix: issued_at + 3600,
        }
    }

    fn newest(view: &IssuedLogView, id: &str) -> Option<i64> {
        view.newest
            .iter()
            .find(|r| r.spiffe_id == id)
            .map(|r| r.issued_at_unix)
    }

    /// Until it is full the ring holds everything since the replica
    /// started; a dropped record moves that past its second, so an identity
    /// whose certificates all fell out is not taken for one never issued
    /// one.
    #[test]
    fn a_full_ring_is_complete_only_since_what_it_dropped() {
        let mut ring = IssuedRing::with_capacity(3, 1_000);
        ring.push(&record("spiffe://td/a", 1_010));
        ring.push(&record("spiffe://td/b", 1_020));
        ring.push(&record("spiffe://td/a", 1_030));
        let view = ring.view();
        assert_eq!(view.complete_since_unix, 1_000);
        assert_eq!(newest(&view, "spiffe://td/a"), Some(1_030));
        assert_eq!(newest(&view, "spiffe://td/b"), Some(1_020));

        ring.push(&record("spiffe://td/c", 1_040));
        ring.push(&record("spiffe://td/c", 1_050));
        let view = ring.view();
        assert_eq!(view.complete_since_unix, 1_021);
        assert_eq!(newest(&view, "spiffe://td/b"), None);
        assert_eq!(newest(&view, "spiffe://td/c"), Some(1_050));
        assert_eq!(view.newest.len(), 2, "{view:?}");

        // A record that arrived late does not move the span back when it
        // is dropped.
        ring.push(&record("spiffe://td/d", 1_005));
        ring.push(&record("spiffe://td/d", 1_060));
        ring.push(&record("spiffe://td/e", 1_070));
        assert_eq!(ring.view().complete_since_unix, 1_051);
        ring.push(&record("spiffe://td/e", 1_080));
        assert_eq!(ring.view().complete_since_unix, 1_051);
        let order: Vec<_> = ring.newest_first().map(|r| r.issued_at_unix).collect();
        assert_eq!(order, [1_080, 1_070, 1_060]);
    }
}
