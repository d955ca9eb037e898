//! The in-memory layer of dedup: the event ids of the last N delivered events of a shard.
//! Producer retries put the same event twice, usually close together; this window catches them
//! before they reach the sinks. The sinks, idempotent on `event_id`, catch the rest.

use std::collections::{HashSet, VecDeque};

/// The most recent `capacity` event ids, forgetting the oldest first.
#[derive(Debug, Clone)]
pub struct DedupWindow {
    capacity: usize,
    order: VecDeque<String>,
    seen: HashSet<String>,
}

impl DedupWindow {
    pub fn new(capacity: usize) -> Self {
        DedupWindow { capacity, order: VecDeque::new(), seen: HashSet::new() }
    }

    pub fn contains(&self, id: &str) -> bool {
        self.seen.contains(id)
    }

    /// Remembers an id (a no-op for one already remembered).
    pub fn insert(&mut self, id: &str) {
        if self.capacity == 0 || self.seen.contains(id) {
            return;
        }
        if self.order.len() == self.capacity
            && let Some(oldest) = self.order.pop_front()
        {
            self.seen.remove(&oldest);
        }
        self.order.push_back(id.to_owned());
        self.seen.insert(id.to_owned());
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
        for id in ["a", "b", "c", "a"] {
            window.insert(id);
        }
        assert_eq!(window.len(), 3);
        window.insert("d");
        assert!(!window.contains("a") && window.contains("b") && window.contains("d"));
        let mut off = DedupWindow::new(0);
        off.insert("a");
        assert!(!off.contains("a") && off.is_empty());
    }
}
