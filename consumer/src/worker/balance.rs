//! When a worker balances: [`BalanceSchedule`] decides, scan by scan, whether this scan's round
//! may ask other workers for leases (steal by hand-off) or only takes what is free.
//!
//! A balance round runs when the worker starts, then every taking interval (the KCL's
//! `takerIntervalMillis`, 20 s by default), and early, at the next scan, when:
//! - the scan shows a live worker that the previous scan did not (a worker that started, or came
//!   back): it has taken leases, or asked for some, and the shares have changed;
//! - the previous balance round lost a race (a lease it meant to take or ask for changed under
//!   it): it acted on a stale view, which is what happens when workers start together and all
//!   grab the same unowned leases;
//! - the previous balance round failed (the table did not answer).
//!
//! Early rounds are never closer than the minimum balance interval (1 s by default) to the
//! previous round. They cannot make leases flap: a round only asks workers above their share, for
//! no more than this worker lacks of its own (see [`LeaseTaker::plan`](crate::lease::taker::LeaseTaker::plan)),
//! so every hand-off moves a lease toward an even split, and a round with nothing to ask for
//! writes nothing.
//!
//! Times are passed in (`now`), so the schedule is tested without a clock.

use std::collections::BTreeSet;
use std::time::Duration;

use tokio::time::Instant;

/// Whether the next scan balances; see the module's notes.
#[derive(Debug)]
pub(crate) struct BalanceSchedule {
    taking_interval: Duration,
    min_interval: Duration,
    /// The next round on the timer.
    next: Instant,
    /// The latest balance round.
    last: Option<Instant>,
    /// An early round is wanted (a new worker, a lost race, a failed round).
    early: bool,
    /// The live workers the latest successful scan showed.
    live: BTreeSet<String>,
}

/// Why a round came early, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum EarlyReason {
    /// Workers live in this scan and not in the previous one.
    NewWorkers(Vec<String>),
}

impl BalanceSchedule {
    /// The first round is due at once (`now`): a worker that joins asks for its share right away.
    pub(crate) fn new(now: Instant, taking_interval: Duration, min_interval: Duration) -> Self {
        BalanceSchedule { taking_interval, min_interval, next: now, last: None, early: false, live: BTreeSet::new() }
    }

    /// Whether the scan at `now` balances.
    pub(crate) fn is_due(&self, now: Instant) -> bool {
        // An interval too long to add to an instant never comes round.
        let early_due = |last: Instant| last.checked_add(self.min_interval).is_some_and(|at| now >= at);
        now >= self.next || (self.early && self.last.is_none_or(early_due))
    }

    /// A scan at `now` showed `live` workers; `balanced` says whether its round balanced, and
    /// `raced` whether a take or a hand-off request of the round lost its race. Returns why the
    /// next round comes early, when a new worker is the reason.
    pub(crate) fn scanned(
        &mut self,
        now: Instant,
        balanced: bool,
        live: BTreeSet<String>,
        raced: bool,
    ) -> Option<EarlyReason> {
        let new: Vec<String> = live.difference(&self.live).cloned().collect();
        // The very first scan only learns who is there: its own round (due at start) saw them all.
        let first_scan = self.last.is_none() && self.live.is_empty();
        self.live = live;
        if balanced {
            self.balanced(now, raced);
            return None;
        }
        if raced {
            self.early = true;
        }
        if new.is_empty() || first_scan {
            return None;
        }
        self.early = true;
        Some(EarlyReason::NewWorkers(new))
    }

    /// The scan at `now` failed; a balance round it was to make is tried again after the minimum
    /// interval.
    pub(crate) fn failed(&mut self, now: Instant, balanced: bool) {
        if balanced {
            self.balanced(now, true);
        }
    }

    fn balanced(&mut self, now: Instant, again: bool) {
        self.last = Some(now);
        self.next = now.checked_add(self.taking_interval).unwrap_or(now + Duration::from_secs(86_400 * 365));
        self.early = again;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TAKING: Duration = Duration::from_secs(20);
    const MIN: Duration = Duration::from_secs(1);

    fn workers(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    fn secs(start: Instant, s: f64) -> Instant {
        start + Duration::from_secs_f64(s)
    }

    #[test]
    fn the_first_round_is_at_once_then_every_taking_interval() {
        let start = Instant::now();
        let mut schedule = BalanceSchedule::new(start, TAKING, MIN);
        assert!(schedule.is_due(start));
        assert_eq!(schedule.scanned(start, true, workers(&["me"]), false), None);
        for s in [1.0, 5.0, 19.9] {
            assert!(!schedule.is_due(secs(start, s)), "{s} s");
            schedule.scanned(secs(start, s), false, workers(&["me"]), false);
        }
        assert!(schedule.is_due(secs(start, 20.0)));
    }

    #[test]
    fn a_new_worker_in_the_table_brings_the_next_round_forward() {
        let start = Instant::now();
        let mut schedule = BalanceSchedule::new(start, TAKING, MIN);
        schedule.scanned(start, true, workers(&["me"]), false);
        schedule.scanned(secs(start, 5.0), false, workers(&["me"]), false);
        let reason = schedule.scanned(secs(start, 6.0), false, workers(&["me", "new"]), false);
        assert_eq!(reason, Some(EarlyReason::NewWorkers(vec!["new".to_owned()])));
        assert!(schedule.is_due(secs(start, 7.0)), "at the next scan");
        // That round balances; the worker is no longer new.
        schedule.scanned(secs(start, 7.0), true, workers(&["me", "new"]), false);
        assert!(!schedule.is_due(secs(start, 8.0)));
        assert_eq!(schedule.scanned(secs(start, 8.0), false, workers(&["me", "new"]), false), None);
        assert!(!schedule.is_due(secs(start, 26.9)));
        assert!(schedule.is_due(secs(start, 27.0)), "the timer restarts from the early round");
    }

    #[test]
    fn early_rounds_keep_the_minimum_interval_however_often_workers_appear() {
        let start = Instant::now();
        let mut schedule = BalanceSchedule::new(start, TAKING, Duration::from_secs(2));
        schedule.scanned(start, true, workers(&["me"]), false);
        let mut rounds = Vec::new();
        let mut live = vec!["me".to_owned()];
        // A new worker at every scan, four scans a second, for 10 s.
        for tick in 1..=40 {
            let now = secs(start, f64::from(tick) * 0.25);
            let due = schedule.is_due(now);
            if due {
                rounds.push(now);
            }
            live.push(format!("w{tick}"));
            schedule.scanned(now, due, live.iter().cloned().collect(), false);
        }
        assert!(rounds.windows(2).all(|w| w[1] - w[0] >= Duration::from_secs(2)), "{rounds:?}");
        assert!((4..=5).contains(&rounds.len()), "{} rounds in 10 s", rounds.len());
    }

    #[test]
    fn a_round_that_lost_a_race_is_followed_by_another() {
        let start = Instant::now();
        let mut schedule = BalanceSchedule::new(start, TAKING, MIN);
        // Both workers saw every lease unowned and grabbed: this one lost some of the races.
        schedule.scanned(start, true, workers(&["me"]), true);
        assert!(!schedule.is_due(secs(start, 0.5)), "not closer than the minimum interval");
        schedule.scanned(secs(start, 0.5), false, workers(&["me", "other"]), false);
        assert!(schedule.is_due(secs(start, 1.0)));
        schedule.scanned(secs(start, 1.0), true, workers(&["me", "other"]), false);
        assert!(!schedule.is_due(secs(start, 2.0)), "a round without a lost race ends it");
    }

    #[test]
    fn the_first_scan_does_not_count_every_worker_as_new_and_a_failed_round_is_tried_again() {
        let start = Instant::now();
        let mut schedule = BalanceSchedule::new(start, TAKING, MIN);
        schedule.failed(start, true);
        assert!(!schedule.is_due(secs(start, 0.5)));
        assert!(schedule.is_due(secs(start, 1.0)), "tried again after the minimum interval");
        assert_eq!(schedule.scanned(secs(start, 1.0), true, workers(&["me", "a", "b"]), false), None);
        assert!(!schedule.is_due(secs(start, 2.0)));
        // Workers that leave bring nothing forward (their leases expire, or were released).
        assert_eq!(schedule.scanned(secs(start, 2.0), false, workers(&["me"]), false), None);
        assert!(!schedule.is_due(secs(start, 3.0)));
    }
}
