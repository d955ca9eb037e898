//! The in-memory layer of dedup: the event ids of the last N delivered events of a shard, each
//! with where in the shard it was read. Producer retries put the same event twice, usually close
//! together; this window catches them before they reach the sinks. The sinks, idempotent on
//! `event_id`, catch the rest.
//!
//! The position (a 64-bit hash of sequence and sub-sequence number) tells the two kinds of
//! duplicate apart: an id met again at **another** position was sent again (by a client or a
//! producer retrying: a second Kinesis record), one met again at the **same** position is the
//! same record read again (a retried Lambda invocation, a hand-off, a restart).

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};

/// Why a duplicate is one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DuplicateCause {
    /// The same event in another Kinesis record: sent again by a client or a producer.
    Resent,
    /// The same Kinesis record read again (after a failover, a restart or a retried invocation).
    Reread,
}

impl DuplicateCause {
    /// The label value of the `cause` label of `DuplicatesDropped`.
    pub fn label(self) -> &'static str {
        match self {
            DuplicateCause::Resent => "resent",
            DuplicateCause::Reread => "reread",
        }
    }
}

/// A 64-bit digest of a position in a shard (sequence number, sub-sequence number): equal
/// positions give equal digests; different positions collide with probability about 2^-64.
pub fn position_digest(sequence_number: &str, sub_sequence_number: u64) -> u64 {
    let mut hasher = DefaultHasher::new();
    sequence_number.hash(&mut hasher);
    sub_sequence_number.hash(&mut hasher);
    hasher.finish()
}

/// The most recent `capacity` event ids with the positions they were delivered from, forgetting
/// the oldest first.
#[derive(Debug, Clone)]
pub struct DedupWindow {
    capacity: usize,
    order: VecDeque<String>,
    seen: HashMap<String, u64>,
}

impl DedupWindow {
    pub fn new(capacity: usize) -> Self {
        DedupWindow { capacity, order: VecDeque::new(), seen: HashMap::new() }
    }

    pub fn contains(&self, id: &str) -> bool {
        self.seen.contains_key(id)
    }

    /// Whether `id` was delivered, and if so whether from `position` (a [`position_digest`]):
    /// the same record read again, or another one.
    pub fn check(&self, id: &str, position: u64) -> Option<DuplicateCause> {
        self.seen.get(id).map(|&p| if p == position { DuplicateCause::Reread } else { DuplicateCause::Resent })
    }

    /// Remembers an id delivered from `position` (a no-op for one already remembered: the first
    /// delivery's position stays).
    pub fn insert(&mut self, id: &str, position: u64) {
        if self.capacity == 0 || self.seen.contains_key(id) {
            return;
        }
        if self.order.len() == self.capacity
            && let Some(oldest) = self.order.pop_front()
        {
            self.seen.remove(&oldest);
        }
        self.order.push_back(id.to_owned());
        self.seen.insert(id.to_owned(), position);
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_the_most_recent_ids_only() {
        let mut window = DedupWindow::new(3);
        for (i, id) in ["a", "b", "c", "a"].into_iter().enumerate() {
            window.insert(id, i as u64);
        }
        assert_eq!(window.len(), 3);
        window.insert("d", 9);
        assert!(!window.contains("a") && window.contains("b") && window.contains("d"));
        let mut off = DedupWindow::new(0);
        off.insert("a", 0);
        assert!(!off.contains("a") && off.is_empty());
    }

    #[test]
    fn the_position_tells_a_record_read_again_from_an_event_sent_again() {
        let mut window = DedupWindow::new(10);
        let first = position_digest("49590338271490256608559692538361571095921575989136588898", 0);
        window.insert("a", first);
        assert_eq!(window.check("a", first), Some(DuplicateCause::Reread));
        let other_sub = position_digest("49590338271490256608559692538361571095921575989136588898", 1);
        let other_record = position_digest("49590338271490256608559692538361571095921575989136588899", 0);
        assert_eq!(window.check("a", other_sub), Some(DuplicateCause::Resent));
        assert_eq!(window.check("a", other_record), Some(DuplicateCause::Resent));
        assert_eq!(window.check("b", first), None);
        // The first delivery's position stays.
        window.insert("a", other_record);
        assert_eq!(window.check("a", first), Some(DuplicateCause::Reread));
        assert_eq!((DuplicateCause::Resent.label(), DuplicateCause::Reread.label()), ("resent", "reread"));
    }
}
