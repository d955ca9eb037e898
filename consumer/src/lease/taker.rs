//! Deciding which leases a worker takes: the KCL's lease taker, without its slow spots.
//!
//! Each taking cycle the worker lists the lease table and gives the leases to [`LeaseTaker::plan`],
//! which decides from what it has observed:
//! - a lease is *expired* when its counter has not moved for the failover time, judged on this
//!   worker's monotonic clock (no clock sync between workers is needed: only "did it change since
//!   I last looked, and how long ago was that"); a lease with no owner (released on a graceful
//!   shutdown, or new) is available at once, not after the failover time;
//! - the worker's fair share is `ceil(active leases / live workers)`, capped by
//!   `max_leases_per_worker`, where live workers are the owners of unexpired leases plus itself,
//!   and finished (`SHARD_END`) leases do not count;
//! - it takes available leases (unowned first, then expired) up to its share, then steals from
//!   workers above their share, as many as it needs in one cycle (bounded by
//!   `max_leases_to_steal_at_once`) rather than the KCL's one per cycle; it never steals from a
//!   worker that is at or below its share, so two workers cannot keep taking leases back and forth.
//!
//! The plan only names leases; taking each is a conditional write on its counter
//! ([`LeaseTable::take`](crate::lease::LeaseTable::take)), so two workers planning the same lease
//! cannot both get it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use tokio::time::Instant;

use crate::lease::Lease;

/// Settings of the taker, defaulted as the KCL's `LeaseManagementConfig`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TakerConfig {
    failover_time: Duration,
    max_leases_per_worker: usize,
    max_leases_to_steal_at_once: usize,
}

impl Default for TakerConfig {
    /// Failover time 10 s (KCL `failoverTimeMillis`); no cap per worker (KCL
    /// `maxLeasesForWorker` = Integer.MAX_VALUE); up to 10 leases stolen per cycle (the KCL's
    /// `maxLeasesToStealAtOneTime` is 1, which makes a new worker take many cycles to get its share).
    fn default() -> Self {
        TakerConfig {
            failover_time: Duration::from_secs(10),
            max_leases_per_worker: usize::MAX,
            max_leases_to_steal_at_once: 10,
        }
    }
}

impl TakerConfig {
    /// How long a lease's counter must stand still before its owner is taken for dead.
    pub fn with_failover_time(mut self, time: Duration) -> Self {
        self.failover_time = time;
        self
    }

    /// Most leases this worker holds.
    pub fn with_max_leases_per_worker(mut self, leases: usize) -> Self {
        self.max_leases_per_worker = leases.max(1);
        self
    }

    /// Most leases taken from other live workers in one cycle.
    pub fn with_max_leases_to_steal_at_once(mut self, leases: usize) -> Self {
        self.max_leases_to_steal_at_once = leases;
        self
    }
}

/// What the taker remembers of each lease: its counter and when it last saw it change.
#[derive(Debug, Clone, Copy)]
struct Seen {
    counter: u64,
    changed_at: Instant,
}

/// A worker's lease taker. Keep one per worker for its whole life: expiry is judged from what
/// it observed across cycles.
#[derive(Debug)]
pub(crate) struct LeaseTaker {
    worker_id: String,
    config: TakerConfig,
    seen: HashMap<String, Seen>,
}

/// Leases to take this cycle, in the order to try them.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct TakePlan {
    /// Unowned or expired leases.
    pub available: Vec<Lease>,
    /// Leases of live workers above their share.
    pub steal: Vec<Lease>,
    /// This worker's share this cycle.
    pub target: usize,
    /// Live workers: owners of unexpired leases (a worker asking for a hand-off is the lease's
    /// owner already), and this worker. A worker that holds no lease is not in the table.
    pub live: BTreeSet<String>,
}

impl TakePlan {
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.available.is_empty() && self.steal.is_empty()
    }
}

impl LeaseTaker {
    pub fn new(worker_id: impl Into<String>, config: TakerConfig) -> Self {
        LeaseTaker { worker_id: worker_id.into(), config, seen: HashMap::new() }
    }

    /// Records the counters of `leases` as seen `now`, and forgets leases no longer listed.
    fn observe(&mut self, leases: &[Lease], now: Instant) {
        let mut seen = HashMap::with_capacity(leases.len());
        for lease in leases {
            let entry = match self.seen.get(&lease.lease_key) {
                Some(previous) if previous.counter == lease.counter => *previous,
                // New to this worker, or moved since last time: alive as of now.
                _ => Seen { counter: lease.counter, changed_at: now },
            };
            seen.insert(lease.lease_key.clone(), entry);
        }
        self.seen = seen;
    }

    /// Whether `lease` is free for the taking: no owner, or an owner that stopped renewing it.
    pub fn is_available(&self, lease: &Lease, now: Instant) -> bool {
        if lease.owner.is_none() {
            return true;
        }
        self.seen.get(&lease.lease_key).is_some_and(|seen| {
            seen.counter == lease.counter && now.duration_since(seen.changed_at) >= self.config.failover_time
        })
    }

    /// Decides what to take, given every lease of the table as listed `now`.
    pub fn plan(&mut self, leases: &[Lease], now: Instant) -> TakePlan {
        self.observe(leases, now);
        let active: Vec<&Lease> = leases.iter().filter(|l| !l.is_finished()).collect();
        // Owners of leases that are alive, with how many each holds.
        let mut held: BTreeMap<&str, usize> = BTreeMap::new();
        held.insert(self.worker_id.as_str(), 0);
        for lease in &active {
            if let Some(owner) = lease.owner.as_deref()
                && !self.is_available(lease, now)
            {
                *held.entry(owner).or_default() += 1;
            }
        }
        let workers = held.len();
        let target = active.len().div_ceil(workers).min(self.config.max_leases_per_worker);
        let mine = held.get(self.worker_id.as_str()).copied().unwrap_or(0);
        let live = held.keys().map(|w| (*w).to_owned()).collect();
        let mut plan = TakePlan { target, live, ..TakePlan::default() };
        let mut wanted = target.saturating_sub(mine);
        if wanted == 0 {
            return plan;
        }

        // Free leases first: unowned ones (a graceful hand-over, or new), then expired ones.
        let mut available: Vec<&Lease> = active
            .iter()
            .copied()
            .filter(|l| l.owner.as_deref() != Some(self.worker_id.as_str()) && self.is_available(l, now))
            .collect();
        available.sort_by_key(|l| (l.owner.is_some(), l.lease_key.clone()));
        for lease in available.into_iter().take(wanted) {
            plan.available.push(lease.clone());
        }
        wanted -= plan.available.len();

        // Then from the most loaded live workers, while they stay above the share.
        let mut steal_budget = self.config.max_leases_to_steal_at_once;
        while wanted > 0 && steal_budget > 0 {
            let Some((&victim, &count)) = held
                .iter()
                .filter(|(owner, _)| **owner != self.worker_id)
                .max_by_key(|(owner, count)| (**count, *owner))
            else {
                break;
            };
            if count <= target {
                break;
            }
            let taken: Vec<&str> = plan.steal.iter().map(|l| l.lease_key.as_str()).collect();
            let Some(lease) = active
                .iter()
                .filter(|l| l.owner.as_deref() == Some(victim) && !taken.contains(&l.lease_key.as_str()))
                .min_by_key(|l| l.lease_key.clone())
            else {
                break;
            };
            plan.steal.push((*lease).clone());
            if let Some(count) = held.get_mut(victim) {
                *count -= 1;
            }
            wanted -= 1;
            steal_budget -= 1;
        }
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::ExtendedSequenceNumber;

    fn lease(key: &str, owner: Option<&str>, counter: u64) -> Lease {
        let mut lease = Lease::new(key, ExtendedSequenceNumber::TRIM_HORIZON);
        lease.owner = owner.map(str::to_owned);
        lease.counter = counter;
        lease
    }

    fn keys(leases: &[Lease]) -> Vec<&str> {
        leases.iter().map(|l| l.lease_key.as_str()).collect()
    }

    #[test]
    fn a_lone_worker_takes_every_unowned_lease_at_once() {
        let mut taker = LeaseTaker::new("w1", TakerConfig::default());
        let leases: Vec<Lease> = (0..8).map(|i| lease(&format!("s{i}"), None, 0)).collect();
        let plan = taker.plan(&leases, Instant::now());
        assert_eq!(plan.target, 8);
        assert_eq!(plan.available.len(), 8);
        assert!(plan.steal.is_empty());
    }

    #[test]
    fn a_new_worker_gets_its_share_in_one_cycle_from_a_loaded_one() {
        let mut taker = LeaseTaker::new("w2", TakerConfig::default());
        let leases: Vec<Lease> = (0..8).map(|i| lease(&format!("s{i}"), Some("w1"), 5)).collect();
        let plan = taker.plan(&leases, Instant::now());
        assert_eq!(plan.target, 4);
        assert_eq!(keys(&plan.steal), ["s0", "s1", "s2", "s3"], "four in one cycle, not one");
        // Capped by the steal budget.
        let mut slow = LeaseTaker::new("w2", TakerConfig::default().with_max_leases_to_steal_at_once(1));
        assert_eq!(slow.plan(&leases, Instant::now()).steal.len(), 1);
    }

    #[test]
    fn balanced_workers_take_nothing_and_never_flap() {
        let leases = vec![
            lease("s0", Some("a"), 1),
            lease("s1", Some("a"), 1),
            lease("s2", Some("a"), 1),
            lease("s3", Some("b"), 1),
            lease("s4", Some("b"), 1),
        ];
        // 5 leases, 2 workers: share 3. b (2) may not steal from a (3, at its share).
        let mut b = LeaseTaker::new("b", TakerConfig::default());
        assert!(b.plan(&leases, Instant::now()).is_empty());
        let mut a = LeaseTaker::new("a", TakerConfig::default());
        assert!(a.plan(&leases, Instant::now()).is_empty());
    }

    #[test]
    fn leases_expire_on_the_local_clock_only_when_their_counter_stands_still() {
        let failover = Duration::from_secs(10);
        let mut taker = LeaseTaker::new("w2", TakerConfig::default().with_failover_time(failover));
        let start = Instant::now();
        let mut leases = vec![lease("s0", Some("dead"), 7), lease("s1", Some("alive"), 3)];
        assert!(taker.plan(&leases, start).available.is_empty(), "seen for the first time: alive");
        // 11 s later, s1's owner has renewed it; s0's counter has not moved.
        leases[1].counter = 4;
        let plan = taker.plan(&leases, start + Duration::from_secs(11));
        assert_eq!(keys(&plan.available), ["s0"]);
        assert!(taker.is_available(&leases[0], start + Duration::from_secs(11)));
        assert!(!taker.is_available(&leases[1], start + Duration::from_secs(11)));
        // The dead worker does not count as live: w2's share is both leases.
        assert_eq!(plan.target, 1, "live workers: w2 and alive; 2 leases");
    }

    #[test]
    fn unowned_leases_go_before_expired_ones_and_finished_ones_do_not_count() {
        let start = Instant::now();
        let mut taker = LeaseTaker::new("w", TakerConfig::default().with_failover_time(Duration::from_secs(1)));
        let mut done = lease("s9", Some("x"), 1);
        done.checkpoint = ExtendedSequenceNumber::SHARD_END;
        let leases = vec![lease("s0", Some("gone"), 1), lease("s1", None, 0), done];
        taker.plan(&leases, start);
        let plan = taker.plan(&leases, start + Duration::from_secs(2));
        assert_eq!(keys(&plan.available), ["s1", "s0"]);
        assert_eq!(plan.target, 2, "two active leases, one live worker");
    }

    #[test]
    fn the_per_worker_cap_holds() {
        let mut taker = LeaseTaker::new("w", TakerConfig::default().with_max_leases_per_worker(3));
        let leases: Vec<Lease> = (0..10).map(|i| lease(&format!("s{i}"), None, 0)).collect();
        let plan = taker.plan(&leases, Instant::now());
        assert_eq!((plan.target, plan.available.len()), (3, 3));
    }
}
