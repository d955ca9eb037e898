//! Keeping the leases a worker holds, and knowing at once when one is lost.
//!
//! The worker hands every lease it took to the [`LeaseRenewer`] and gets back a [`HeldLease`],
//! shared with the task processing the shard. [`LeaseRenewer::renew_all`] renews each lease with a
//! conditional write on its counter; when the condition fails, another worker has taken the
//! lease, and the held lease is marked lost, which the processing task sees ([`HeldLease::lost`])
//! and stops on before it writes or checkpoints anything more.
//!
//! A lease whose renewals keep failing for other reasons (the table unreachable) is given up
//! locally once it has gone a failover time without a successful renewal: by then another worker
//! may rightly consider it expired and take it.
//!
//! Hand-offs: when another worker asks for a lease ([`LeaseTable::request_handoff`]), the next
//! renewal fails on the counter and the table shows this worker as `checkpointOwner`. That is not
//! a loss: the held lease takes the new snapshot, keeps being renewed (so the new owner does not
//! see it expire), and signals [`HeldLease::handoff_requested`]; the shard's task finishes its
//! batch, checkpoints, and [`LeaseRenewer::release`]s the lease, which lets the new owner start
//! from that checkpoint. Nothing is processed twice when leases move for balance.
//!
//! Renewals and checkpoints of one lease take turns (one lock per lease): both are conditional on
//! the lease's counter, and each must start from the snapshot the other left.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex as SyncMutex};
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::error::{Error, Result};
use crate::lease::{ExtendedSequenceNumber, Lease, LeaseTable};

/// A lease this worker holds, shared by the renewer and the task processing its shard.
#[derive(Debug)]
pub struct HeldLease {
    shard_id: String,
    /// The latest snapshot; every conditional write starts from it and replaces it.
    lease: Mutex<Lease>,
    last_renewed: SyncMutex<Instant>,
    lost: CancellationToken,
    handoff: CancellationToken,
}

impl HeldLease {
    fn new(lease: Lease, now: Instant) -> Self {
        HeldLease {
            shard_id: lease.lease_key.clone(),
            lease: Mutex::new(lease),
            last_renewed: SyncMutex::new(now),
            lost: CancellationToken::new(),
            handoff: CancellationToken::new(),
        }
    }

    pub fn shard_id(&self) -> &str {
        &self.shard_id
    }

    /// The latest snapshot of the lease.
    pub async fn snapshot(&self) -> Lease {
        self.lease.lock().await.clone()
    }

    /// Whether the lease is lost (taken by another worker, or given up).
    pub fn is_lost(&self) -> bool {
        self.lost.is_cancelled()
    }

    /// Resolves when the lease is lost: select on it while processing.
    pub async fn lost(&self) {
        self.lost.cancelled().await;
    }

    /// Whether another worker asked for this lease: finish the batch, checkpoint, release.
    pub fn is_handoff_requested(&self) -> bool {
        self.handoff.is_cancelled()
    }

    /// Resolves when another worker asks for this lease (see the module's notes on hand-offs).
    pub async fn handoff_requested(&self) {
        self.handoff.cancelled().await;
    }

    /// Looks at the lease as a table scan just showed it: a newer item that makes this worker the
    /// `checkpointOwner` of a hand-off signals [`handoff_requested`](Self::handoff_requested) at
    /// once, and one that another worker owns outright marks the lease lost at once, without
    /// waiting for the next renewal to find out. Skipped while a write of this lease is in flight
    /// (that write finds out itself).
    pub fn observe(&self, seen: &Lease) {
        let Ok(mut lease) = self.lease.try_lock() else { return };
        if seen.counter <= lease.counter || seen.lease_key != lease.lease_key {
            return;
        }
        if is_handoff_from(&lease, seen) {
            debug!(shard = %self.shard_id, to = ?seen.owner, "hand-off requested (seen in a scan)");
            *lease = seen.clone();
            self.handoff.cancel();
        } else if seen.actual_owner() != lease.actual_owner() {
            debug!(shard = %self.shard_id, owner = ?seen.owner, "lease taken by another worker (seen in a scan)");
            self.lost.cancel();
        }
    }

    /// Checkpoints the shard at `to`, as the lease holder. Fails with
    /// [`Error::LeaseLost`] (and marks the lease lost) if another worker has it now.
    pub async fn checkpoint(&self, table: &LeaseTable, to: ExtendedSequenceNumber) -> Result<()> {
        self.write(|lease| {
            let to = to.clone();
            async move { table.checkpoint(&lease, to).await }
        })
        .await
    }

    /// Records that the shard was read to its end, with its children.
    pub async fn checkpoint_shard_end(
        &self,
        table: &LeaseTable,
        children: &std::collections::BTreeSet<String>,
    ) -> Result<()> {
        self.write(|lease| async move { table.checkpoint_shard_end(&lease, children).await }).await
    }

    /// One conditional write from the current snapshot; the snapshot is replaced on success and
    /// the lease marked lost when the condition says someone else has it.
    async fn write<F, Fut>(&self, mut op: F) -> Result<()>
    where
        F: FnMut(Lease) -> Fut,
        Fut: std::future::Future<Output = Result<Lease>>,
    {
        if self.is_lost() {
            return Err(Error::InvalidRequest {
                shard: self.shard_id.clone(),
                operation: "write",
                problem: "the lease was lost; this worker no longer processes the shard".into(),
            });
        }
        let mut lease = self.lease.lock().await;
        let mut handoff_seen = false;
        loop {
            match op(lease.clone()).await {
                Ok(updated) => {
                    *lease = updated;
                    *self.last_renewed.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Instant::now();
                    return Ok(());
                }
                Err(error) if error.is_condition_failure() => {
                    // Asked to hand the lease over: still ours to finish, so write again from the
                    // table's snapshot (once; a second failure is a real loss).
                    if !handoff_seen
                        && let Some(current) = error.current_lease().filter(|now| is_handoff_from(&lease, now))
                    {
                        debug!(shard = %self.shard_id, to = ?current.owner, "hand-off requested");
                        *lease = current.clone();
                        handoff_seen = true;
                        self.handoff.cancel();
                        continue;
                    }
                    self.lost.cancel();
                    return Err(error);
                }
                Err(error) => return Err(error),
            }
        }
    }
}

/// Whether `now` is `mine` being handed over: another worker became `leaseOwner` and this one is
/// `checkpointOwner`.
fn is_handoff_from(mine: &Lease, now: &Lease) -> bool {
    mine.checkpoint_owner.is_none()
        && mine.owner.is_some()
        && now.checkpoint_owner == mine.owner
        && now.owner != mine.owner
}

/// What one renewal round did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RenewReport {
    pub renewed: usize,
    /// Leases not renewed because a checkpoint had just moved their counter.
    pub skipped: usize,
    /// Leases another worker took (or that went too long without a renewal): processing them
    /// must stop.
    pub lost: Vec<String>,
    /// Renewals that failed for another reason and will be tried again next round.
    pub failed: usize,
    /// The latest error of a renewal that failed for another reason than another worker taking
    /// the lease (counted in `failed`, or a lease given up after the failover time).
    pub last_error: Option<String>,
}

/// Renews the leases a worker holds.
#[derive(Debug)]
pub struct LeaseRenewer {
    table: LeaseTable,
    failover_time: Duration,
    /// A lease written (checkpointed) this recently is not renewed: the write moved its counter.
    skip_within: Duration,
    held: SyncMutex<BTreeMap<String, Arc<HeldLease>>>,
}

impl LeaseRenewer {
    /// A renewer for leases in `table`, giving a lease up when it has gone `failover_time`
    /// without a successful renewal.
    pub fn new(table: LeaseTable, failover_time: Duration) -> Self {
        LeaseRenewer { table, failover_time, skip_within: Duration::ZERO, held: SyncMutex::new(BTreeMap::new()) }
    }

    /// Skips the renewal of a lease that a checkpoint (or any write) moved less than `within`
    /// ago: other workers only look for a counter that stands still, and a checkpoint moves it
    /// just as well. With `within` at half the renew interval, the counter of a busy shard still
    /// moves at least every 1.5 renew intervals (5 s with the KCL's timings, inside its 10 s
    /// failover time), and a shard checkpointed often costs no renewal writes at all. Off (zero)
    /// by default; the worker turns it on.
    pub fn with_renewal_skipped_after_writes_within(mut self, within: Duration) -> Self {
        self.skip_within = within;
        self
    }

    fn held_map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<HeldLease>>> {
        // A poisoned lock only means a panic elsewhere while holding it; the map is still whole.
        self.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts holding a lease just taken (the snapshot `take` returned).
    pub fn add(&self, lease: Lease) -> Arc<HeldLease> {
        let held = Arc::new(HeldLease::new(lease, Instant::now()));
        self.held_map().insert(held.shard_id.clone(), Arc::clone(&held));
        held
    }

    /// The shards whose leases this worker holds.
    pub fn held(&self) -> Vec<Arc<HeldLease>> {
        self.held_map().values().cloned().collect()
    }

    /// Stops holding a lease without touching the table (its shard finished, or it was lost).
    pub fn forget(&self, shard_id: &str) {
        self.held_map().remove(shard_id);
    }

    /// Renews every held lease once.
    pub async fn renew_all(&self) -> RenewReport {
        let mut report = RenewReport::default();
        for held in self.held() {
            if held.is_lost() {
                self.forget(&held.shard_id);
                report.lost.push(held.shard_id.clone());
                continue;
            }
            let last = *held.last_renewed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if !self.skip_within.is_zero() && last.elapsed() < self.skip_within {
                report.skipped += 1;
                continue;
            }
            let table = &self.table;
            match held.write(|lease| async move { table.renew(&lease).await }).await {
                Ok(()) => {
                    report.renewed += 1;
                }
                Err(error) if error.is_condition_failure() => {
                    debug!(shard = %held.shard_id, "lease lost to another worker");
                    self.forget(&held.shard_id);
                    report.lost.push(held.shard_id.clone());
                }
                Err(error) => {
                    report.last_error = Some(error.to_string());
                    let last = *held.last_renewed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    if last.elapsed() >= self.failover_time {
                        warn!(shard = %held.shard_id, %error, "no renewal for the failover time: giving the lease up");
                        held.lost.cancel();
                        self.forget(&held.shard_id);
                        report.lost.push(held.shard_id.clone());
                    } else {
                        debug!(shard = %held.shard_id, %error, "renewal failed; trying again next round");
                        report.failed += 1;
                    }
                }
            }
        }
        report
    }

    /// Releases one lease (after its shard's task checkpointed: a hand-off, or a graceful
    /// shutdown), so its next owner can start at once. Returns whether the table took the release.
    pub async fn release(&self, shard_id: &str) -> bool {
        let Some(held) = self.held_map().get(shard_id).cloned() else { return false };
        self.forget(shard_id);
        if held.is_lost() {
            return false;
        }
        let table = &self.table;
        let result = held.write(|lease| async move { table.release(&lease).await }).await;
        held.lost.cancel();
        match result {
            Ok(()) => true,
            Err(error) => {
                warn!(shard = %shard_id, %error, "could not release the lease; it will expire");
                false
            }
        }
    }

    /// Gives every held lease back (graceful shutdown, after the last checkpoints), so other
    /// workers take them at their next cycle instead of waiting for them to expire. Returns the
    /// shards released.
    pub async fn release_all(&self) -> Vec<String> {
        let mut released = Vec::new();
        for held in self.held() {
            self.forget(&held.shard_id);
            if held.is_lost() {
                continue;
            }
            let table = &self.table;
            // Marks the lease lost for the processing task as well: it is not ours any more.
            let result = held.write(|lease| async move { table.release(&lease).await }).await;
            held.lost.cancel();
            match result {
                Ok(()) => released.push(held.shard_id.clone()),
                Err(error) => warn!(shard = %held.shard_id, %error, "could not release the lease; it will expire"),
            }
        }
        released
    }
}

#[cfg(test)]
mod tests {
    use futures::future::BoxFuture;

    use super::*;
    use crate::lease::TableSetup;
    use crate::lease::item_store::{Condition, Failure, ItemStore, ScanPage, Update};
    use crate::lease::memory::MemoryItems;
    use crate::lease::serializer::Item;

    /// A table whose every call fails as if DynamoDB could not be reached.
    #[derive(Debug)]
    struct Unreachable;

    fn down() -> Error {
        Error::Service {
            table: "app".into(),
            action: "UpdateItem",
            code: "ConnectionError".into(),
            message: "unreachable".into(),
            retryable: true,
        }
    }

    impl ItemStore for Unreachable {
        fn ensure_table(&self, _wait: Duration) -> BoxFuture<'_, Result<TableSetup>> {
            Box::pin(async { Err(down()) })
        }
        fn scan(&self, _start: Option<Item>) -> BoxFuture<'_, Result<ScanPage>> {
            Box::pin(async { Err(down()) })
        }
        fn get_item<'a>(&'a self, _key: &'a str) -> BoxFuture<'a, Result<Option<Item>>> {
            Box::pin(async { Err(down()) })
        }
        fn put_if_absent(&self, _item: Item) -> BoxFuture<'_, Result<bool>> {
            Box::pin(async { Err(down()) })
        }
        fn update_item<'a>(
            &'a self,
            _key: &'a str,
            _update: Update,
        ) -> BoxFuture<'a, std::result::Result<Item, Failure>> {
            Box::pin(async { Err(Failure::Error(down())) })
        }
        fn delete_item<'a>(
            &'a self,
            _key: &'a str,
            _conditions: Vec<Condition>,
        ) -> BoxFuture<'a, std::result::Result<(), Failure>> {
            Box::pin(async { Err(Failure::Error(down())) })
        }
    }

    async fn table_with_lease(owner: &str) -> (LeaseTable, Lease) {
        let table = LeaseTable::with_store(Arc::new(MemoryItems::default()), "app");
        let lease = Lease::new("s0", ExtendedSequenceNumber::TRIM_HORIZON);
        assert!(table.create_if_absent(&lease).await.expect("create"));
        let taken = table.take(&lease, owner).await.expect("take");
        (table, taken)
    }

    #[tokio::test(start_paused = true)]
    async fn renewals_move_the_counter_and_a_checkpoint_in_between_is_conditional_on_it() {
        let (table, taken) = table_with_lease("w1").await;
        let renewer = LeaseRenewer::new(table.clone(), Duration::from_secs(10));
        let held = renewer.add(taken.clone());
        assert_eq!(renewer.renew_all().await.renewed, 1);
        assert_eq!(held.snapshot().await.counter, taken.counter + 1);
        let to = ExtendedSequenceNumber::at("100", 0).expect("valid");
        held.checkpoint(&table, to.clone()).await.expect("checkpoint after a renewal");
        assert_eq!(renewer.renew_all().await.renewed, 1, "a renewal after the checkpoint");
        let now = table.get("s0").await.expect("get").expect("lease");
        assert_eq!((now.counter, now.checkpoint), (taken.counter + 3, to));
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_skipped_after_a_recent_checkpoint() {
        let (table, taken) = table_with_lease("w1").await;
        let renewer = LeaseRenewer::new(table.clone(), Duration::from_secs(10))
            .with_renewal_skipped_after_writes_within(Duration::from_secs(1));
        let held = renewer.add(taken);
        held.checkpoint(&table, ExtendedSequenceNumber::at("100", 0).expect("valid")).await.expect("checkpoint");
        assert_eq!(renewer.renew_all().await.skipped, 1);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(renewer.renew_all().await.renewed, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_taken_by_another_worker_is_lost_at_the_next_renewal_and_refuses_checkpoints() {
        let (table, taken) = table_with_lease("w1").await;
        let renewer = LeaseRenewer::new(table.clone(), Duration::from_secs(10));
        let held = renewer.add(taken.clone());
        table.take(&taken, "w2").await.expect("w2 takes it");
        let report = renewer.renew_all().await;
        assert_eq!(report.lost, ["s0"]);
        assert!(held.is_lost());
        assert!(renewer.held().is_empty());
        let refused = held.checkpoint(&table, ExtendedSequenceNumber::at("100", 0).expect("valid")).await;
        assert!(refused.is_err());
        let now = table.get("s0").await.expect("get").expect("lease");
        assert_eq!((now.owner.as_deref(), now.checkpoint), (Some("w2"), ExtendedSequenceNumber::TRIM_HORIZON));
    }

    #[tokio::test(start_paused = true)]
    async fn a_hand_off_request_is_not_a_loss_and_the_release_completes_it() {
        let (table, taken) = table_with_lease("w1").await;
        let renewer = LeaseRenewer::new(table.clone(), Duration::from_secs(10));
        let held = renewer.add(taken.clone());
        table.request_handoff(&taken, "w2").await.expect("w2 asks for it");
        let report = renewer.renew_all().await;
        assert_eq!((report.renewed, report.lost.len()), (1, 0), "{report:?}");
        assert!(held.is_handoff_requested() && !held.is_lost());
        let to = ExtendedSequenceNumber::at("100", 0).expect("valid");
        held.checkpoint(&table, to.clone()).await.expect("the owner still checkpoints");
        assert!(renewer.release("s0").await);
        let now = table.get("s0").await.expect("get").expect("lease");
        assert_eq!((now.owner.as_deref(), now.checkpoint_owner, now.checkpoint), (Some("w2"), None, to));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_not_renewed_for_the_failover_time_is_given_up() {
        let (_, taken) = table_with_lease("w1").await;
        let unreachable = LeaseTable::with_store(Arc::new(Unreachable), "app");
        let renewer = LeaseRenewer::new(unreachable, Duration::from_secs(10));
        let held = renewer.add(taken);
        tokio::time::sleep(Duration::from_secs(5)).await;
        let first = renewer.renew_all().await;
        assert_eq!((first.failed, first.lost.len()), (1, 0), "kept while inside the failover time");
        assert!(!held.is_lost());
        tokio::time::sleep(Duration::from_secs(6)).await;
        let later = renewer.renew_all().await;
        assert_eq!(later.lost, ["s0"]);
        assert!(held.is_lost());
    }

    #[tokio::test(start_paused = true)]
    async fn release_all_gives_every_lease_back_and_stops_its_processing() {
        let (table, taken) = table_with_lease("w1").await;
        let renewer = LeaseRenewer::new(table.clone(), Duration::from_secs(10));
        let held = renewer.add(taken);
        assert_eq!(renewer.release_all().await, ["s0"]);
        assert!(held.is_lost(), "the processing task is told to stop");
        let now = table.get("s0").await.expect("get").expect("lease");
        assert_eq!(now.owner, None);
        // Another worker takes a released lease at once, with no failover wait.
        table.take(&now, "w2").await.expect("take a released lease");
    }
}
