//! What a running worker tells a health check, read without waiting on the worker.
//!
//! The worker writes a [`WorkerStatus`] as it goes: after every lease-table scan (the leases in
//! the table, those it could take, the workers it saw, the leases it holds), after every renewal
//! round, and after every Kinesis call its loops make (`ListShards` in the shard sync, and the
//! reads of each shard: `GetShardIterator`/`GetRecords` when polling, `SubscribeToShard` and its
//! events with enhanced fan-out). Writes are atomic stores; only a failure also takes a lock, to
//! keep its message. A health check takes a [`WorkerSnapshot`] whenever it likes and asks it for
//! [`unhealthy_reasons`](WorkerSnapshot::unhealthy_reasons).
//!
//! # What counts as unhealthy
//! Each condition must have lasted longer than the check's `unhealthy_after`:
//! - **the lease table is unreachable**: every scan of the lease table has failed since the first
//!   failure after the latest success (the scan runs every discovery interval, 1 s by default, so
//!   it is the worker's steady probe of DynamoDB);
//! - **renewals fail**: every renewal of a held lease has failed (for another reason than another
//!   worker taking it) since the first failure after the latest success;
//! - **no lease while some are free**: the worker holds no lease, and every scan since then showed
//!   leases this worker could take (unowned, expired on its clock, or assigned to it by a finished
//!   hand-off) — it should hold one and does not, so taking fails or its shard tasks die. A worker
//!   that holds none because live workers hold them all (more workers than shards) is healthy;
//! - **the stream is unreachable**: every Kinesis call has failed since the first failure after
//!   the latest success. A throttled call counts as a success here: the stream answered. A worker
//!   that holds no lease only calls `ListShards` (every shard-sync interval, 60 s by default), so
//!   its verdict on the stream moves at that pace.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// The worker's live status, shared with whoever watches it (cheap to clone). Get it from
/// [`Worker::status`](crate::Worker::status) before running the worker.
#[derive(Debug, Clone)]
pub struct WorkerStatus {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// Every time is kept as nanoseconds after this instant, plus one (zero means never).
    origin: Instant,
    leases_held: AtomicUsize,
    leases_in_table: AtomicUsize,
    leases_takeable: AtomicUsize,
    workers_seen: AtomicUsize,
    idle_with_takeable_since: AtomicU64,
    scans: Calls,
    renewals: Calls,
    kinesis: Calls,
}

/// The outcome of one kind of call.
#[derive(Debug, Default)]
struct Calls {
    last_success: AtomicU64,
    failing_since: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl Calls {
    fn succeeded(&self, at: u64) {
        self.last_success.store(at, Ordering::Relaxed);
        self.failing_since.store(0, Ordering::Relaxed);
    }

    fn failed(&self, at: u64, error: String) {
        // Only the first failure after a success sets the start.
        let _ = self.failing_since.compare_exchange(0, at, Ordering::Relaxed, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(error);
    }

    /// Nothing was called: whatever failed before is not failing now.
    fn idle(&self) {
        self.failing_since.store(0, Ordering::Relaxed);
    }

    fn health(&self, origin: Instant) -> CallHealth {
        let last_success = instant(origin, self.last_success.load(Ordering::Relaxed));
        let failing_since = instant(origin, self.failing_since.load(Ordering::Relaxed))
            // Calls of several tasks interleave: a failure stored after a later success is over.
            .filter(|since| last_success.is_none_or(|ok| ok <= *since));
        let last_error = self.last_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        CallHealth { last_success, failing_since, last_error }
    }
}

fn instant(origin: Instant, stored: u64) -> Option<Instant> {
    stored.checked_sub(1).map(|nanos| origin + Duration::from_nanos(nanos))
}

/// The outcome of one kind of call the worker makes, as of a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallHealth {
    /// The latest call that succeeded.
    pub last_success: Option<Instant>,
    /// The first failed call since the latest success; `None` while the latest call succeeded
    /// (or none was made).
    pub failing_since: Option<Instant>,
    /// The latest failure's error.
    pub last_error: Option<String>,
}

impl CallHealth {
    /// How long every call has failed, as of `now`, if the latest one failed.
    pub fn failing_for(&self, now: Instant) -> Option<Duration> {
        self.failing_since.map(|since| now.saturating_duration_since(since))
    }
}

/// The worker's status at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerSnapshot {
    /// Leases this worker holds now (a shard task runs for each).
    pub leases_held: usize,
    /// Unfinished leases in the table at the latest successful scan.
    pub leases_in_table: usize,
    /// Of those, leases this worker could take at that scan and did not hold: unowned, expired on
    /// its clock, or assigned to it by a finished hand-off.
    pub leases_takeable: usize,
    /// Live workers at that scan (owners of unexpired leases, and this worker).
    pub workers_seen: usize,
    /// Since when this worker has held no lease while every scan showed leases it could take.
    pub idle_with_takeable_since: Option<Instant>,
    /// Scans of the lease table (the latest success is the latest successful scan).
    pub lease_scans: CallHealth,
    /// Renewals of held leases.
    pub lease_renewals: CallHealth,
    /// Kinesis calls: `ListShards`, `GetShardIterator`, `GetRecords`, `SubscribeToShard`.
    pub kinesis: CallHealth,
}

impl Default for WorkerStatus {
    fn default() -> Self {
        WorkerStatus::new()
    }
}

impl WorkerStatus {
    /// A status with nothing seen yet: healthy.
    pub fn new() -> Self {
        WorkerStatus {
            shared: Arc::new(Shared {
                origin: Instant::now(),
                leases_held: AtomicUsize::new(0),
                leases_in_table: AtomicUsize::new(0),
                leases_takeable: AtomicUsize::new(0),
                workers_seen: AtomicUsize::new(0),
                idle_with_takeable_since: AtomicU64::new(0),
                scans: Calls::default(),
                renewals: Calls::default(),
                kinesis: Calls::default(),
            }),
        }
    }

    /// The status now.
    pub fn snapshot(&self) -> WorkerSnapshot {
        let s = &self.shared;
        WorkerSnapshot {
            leases_held: s.leases_held.load(Ordering::Relaxed),
            leases_in_table: s.leases_in_table.load(Ordering::Relaxed),
            leases_takeable: s.leases_takeable.load(Ordering::Relaxed),
            workers_seen: s.workers_seen.load(Ordering::Relaxed),
            idle_with_takeable_since: instant(s.origin, s.idle_with_takeable_since.load(Ordering::Relaxed)),
            lease_scans: s.scans.health(s.origin),
            lease_renewals: s.renewals.health(s.origin),
            kinesis: s.kinesis.health(s.origin),
        }
    }

    fn now(&self) -> u64 {
        let nanos = Instant::now().saturating_duration_since(self.shared.origin).as_nanos();
        u64::try_from(nanos).unwrap_or(u64::MAX - 1).saturating_add(1)
    }

    /// A scan of the lease table succeeded: what it showed, and how many leases this worker holds
    /// after taking what it could.
    pub(crate) fn scanned(&self, in_table: usize, takeable: usize, workers: usize, held: usize) {
        let now = self.now();
        let s = &self.shared;
        s.leases_in_table.store(in_table, Ordering::Relaxed);
        s.leases_takeable.store(takeable, Ordering::Relaxed);
        s.workers_seen.store(workers, Ordering::Relaxed);
        s.leases_held.store(held, Ordering::Relaxed);
        if held == 0 && takeable > 0 {
            let _ = s.idle_with_takeable_since.compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
        } else {
            s.idle_with_takeable_since.store(0, Ordering::Relaxed);
        }
        s.scans.succeeded(now);
    }

    pub(crate) fn scan_failed(&self, error: String) {
        self.shared.scans.failed(self.now(), error);
    }

    /// The number of leases held changed (a task started or ended).
    pub(crate) fn set_held(&self, held: usize) {
        self.shared.leases_held.store(held, Ordering::Relaxed);
        if held > 0 {
            self.shared.idle_with_takeable_since.store(0, Ordering::Relaxed);
        }
    }

    pub(crate) fn renewed(&self) {
        self.shared.renewals.succeeded(self.now());
    }

    /// A renewal round found nothing to renew (no lease held, or every one written just before).
    pub(crate) fn nothing_to_renew(&self) {
        self.shared.renewals.idle();
    }

    pub(crate) fn renewal_failed(&self, error: String) {
        self.shared.renewals.failed(self.now(), error);
    }

    pub(crate) fn kinesis_answered(&self) {
        self.shared.kinesis.succeeded(self.now());
    }

    pub(crate) fn kinesis_failed(&self, error: String) {
        self.shared.kinesis.failed(self.now(), error);
    }
}

impl WorkerSnapshot {
    /// Why the worker is unhealthy as of `now`, one sentence per condition that has lasted longer
    /// than `unhealthy_after` (see the module's notes for the conditions); empty when healthy.
    pub fn unhealthy_reasons(&self, now: Instant, unhealthy_after: Duration) -> Vec<String> {
        let mut reasons = Vec::new();
        let error = |calls: &CallHealth| calls.last_error.clone().unwrap_or_else(|| "unknown error".to_owned());
        if let Some(failing) = self.lease_scans.failing_for(now).filter(|d| *d > unhealthy_after) {
            reasons.push(format!(
                "the lease table has failed every scan for {} s ({}): {}",
                failing.as_secs(),
                last_success(self.lease_scans.last_success, now, "scan"),
                error(&self.lease_scans)
            ));
        }
        if let Some(failing) = self.lease_renewals.failing_for(now).filter(|d| *d > unhealthy_after) {
            reasons.push(format!(
                "every lease renewal has failed for {} s: {}",
                failing.as_secs(),
                error(&self.lease_renewals)
            ));
        }
        if let Some(idle) = self
            .idle_with_takeable_since
            .map(|since| now.saturating_duration_since(since))
            .filter(|d| *d > unhealthy_after)
        {
            reasons.push(format!(
                "the worker has held no lease for {} s while the lease table has {} it could take (unowned or expired)",
                idle.as_secs(),
                self.leases_takeable
            ));
        }
        if let Some(failing) = self.kinesis.failing_for(now).filter(|d| *d > unhealthy_after) {
            reasons.push(format!(
                "every Kinesis call has failed for {} s ({}): {}",
                failing.as_secs(),
                last_success(self.kinesis.last_success, now, "call"),
                error(&self.kinesis)
            ));
        }
        reasons
    }
}

fn last_success(at: Option<Instant>, now: Instant, what: &str) -> String {
    match at {
        Some(at) => format!("the last successful {what} was {} s ago", now.saturating_duration_since(at).as_secs()),
        None => format!("no {what} has succeeded since the worker started"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AFTER: Duration = Duration::from_secs(5);

    async fn wait(seconds: u64) {
        tokio::time::sleep(Duration::from_secs(seconds)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_status_and_one_whose_calls_succeed_are_healthy() {
        let status = WorkerStatus::new();
        assert!(status.snapshot().unhealthy_reasons(Instant::now(), AFTER).is_empty());
        status.scanned(4, 0, 2, 2);
        status.renewed();
        status.kinesis_answered();
        wait(60).await;
        let snapshot = status.snapshot();
        assert_eq!((snapshot.leases_in_table, snapshot.leases_held, snapshot.workers_seen), (4, 2, 2));
        assert!(snapshot.unhealthy_reasons(Instant::now(), AFTER).is_empty(), "old successes are not failures");
    }

    #[tokio::test(start_paused = true)]
    async fn failing_scans_turn_unhealthy_only_after_the_time_and_a_success_mends_them() {
        let status = WorkerStatus::new();
        status.scanned(1, 0, 1, 1);
        wait(2).await;
        status.scan_failed("ResourceNotFoundException: table gone".into());
        wait(3).await;
        status.scan_failed("ResourceNotFoundException: still gone".into());
        assert!(status.snapshot().unhealthy_reasons(Instant::now(), AFTER).is_empty(), "3 s is not over 5 s");
        wait(3).await;
        let reasons = status.snapshot().unhealthy_reasons(Instant::now(), AFTER);
        assert_eq!(
            reasons,
            ["the lease table has failed every scan for 6 s (the last successful scan was 8 s ago): \
              ResourceNotFoundException: still gone"]
        );
        status.scanned(1, 0, 1, 1);
        assert!(status.snapshot().unhealthy_reasons(Instant::now(), AFTER).is_empty());
        assert_eq!(status.snapshot().lease_scans.last_error.as_deref(), Some("ResourceNotFoundException: still gone"));
    }

    #[tokio::test(start_paused = true)]
    async fn holding_no_lease_is_unhealthy_only_while_some_could_be_taken() {
        let status = WorkerStatus::new();
        // More workers than shards: every lease is held by a live worker.
        status.scanned(2, 0, 3, 0);
        wait(30).await;
        status.scanned(2, 0, 3, 0);
        assert!(status.snapshot().unhealthy_reasons(Instant::now(), AFTER).is_empty());

        // A lease is free, and this worker does not get it.
        status.scanned(2, 1, 3, 0);
        wait(4).await;
        status.scanned(2, 1, 3, 0);
        assert!(status.snapshot().unhealthy_reasons(Instant::now(), AFTER).is_empty());
        wait(2).await;
        status.scanned(2, 1, 3, 0);
        assert_eq!(
            status.snapshot().unhealthy_reasons(Instant::now(), AFTER),
            ["the worker has held no lease for 6 s while the lease table has 1 it could take (unowned or expired)"]
        );
        // It takes one.
        status.set_held(1);
        assert!(status.snapshot().unhealthy_reasons(Instant::now(), AFTER).is_empty());
        assert_eq!(status.snapshot().idle_with_takeable_since, None);
    }

    #[tokio::test(start_paused = true)]
    async fn every_kinesis_call_failing_is_unhealthy_and_one_success_among_failures_is_not() {
        let status = WorkerStatus::new();
        status.kinesis_failed("ResourceNotFoundException: Stream s not found".into());
        wait(6).await;
        let reasons = status.snapshot().unhealthy_reasons(Instant::now(), AFTER);
        assert_eq!(
            reasons,
            ["every Kinesis call has failed for 6 s (no call has succeeded since the worker started): \
              ResourceNotFoundException: Stream s not found"]
        );
        // Another shard's read succeeds: the stream answers.
        status.kinesis_answered();
        status.kinesis_failed("a transient error".into());
        wait(4).await;
        assert!(status.snapshot().unhealthy_reasons(Instant::now(), AFTER).is_empty());
        let kinesis = status.snapshot().kinesis;
        assert_eq!(kinesis.failing_for(Instant::now()), Some(Duration::from_secs(4)));
    }

    #[tokio::test(start_paused = true)]
    async fn renewals_failing_for_the_time_are_a_reason() {
        let status = WorkerStatus::new();
        status.renewed();
        status.renewal_failed("throttled".into());
        wait(10).await;
        assert_eq!(
            status.snapshot().unhealthy_reasons(Instant::now(), AFTER),
            ["every lease renewal has failed for 10 s: throttled"]
        );
    }
}
