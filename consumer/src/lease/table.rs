//! [`LeaseTable`]: the lease table, written the way the KCL writes it (`DynamoDBLeaseRefresher`
//! and `DynamoDBLeaseSerializer` of amazon-kinesis-client 3.0.3).
//!
//! Every write to an existing lease is one conditional update of named attributes, so
//! attributes ktk does not know (newer KCL fields, tags added by operators) stay as they are.
//! Each write increments `leaseCounter` and returns the lease as the table now holds it. The
//! table decides each write and its condition here; the item operations themselves go through
//! an `ItemStore` (DynamoDB in production, an in-memory store in unit tests).
//!
//! A retried write can meet its own earlier success (the first attempt applied, its answer was
//! lost); so when a condition fails, the item is read back, and if it already shows exactly the
//! write that was attempted, the write counts as done (the KCL's "spurious renewal failure" check,
//! made for every owner write). A failed condition itself is never retried.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aws_config::SdkConfig;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::AttributeValue;

use crate::error::{Error, ItemError, Result};
use crate::lease::dynamodb::DynamoDbItems;
use crate::lease::item_store::{Condition, Failure, ItemStore, Update};
use crate::lease::model::{ExtendedSequenceNumber, Lease};
use crate::lease::serializer::{self, Item, attr, number, string_set};

/// How long [`LeaseTable::ensure_table`] waits for a table to become ACTIVE, by default.
pub const DEFAULT_TABLE_WAIT: Duration = Duration::from_secs(120);

/// The lease table of one application (by default, as in the KCL, named after the application).
#[derive(Debug, Clone)]
pub struct LeaseTable {
    store: Arc<dyn ItemStore>,
    name: String,
    table_wait: Duration,
    calls: Arc<CallCounts>,
}

/// DynamoDB item calls made through a [`LeaseTable`] (and its clones) so far: what the lease
/// table costs. Reads are `GetItem` calls and `Scan` pages; writes are `PutItem`, `UpdateItem`
/// and `DeleteItem` calls (a conditional write that fails still counts: DynamoDB bills it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableCalls {
    pub reads: u64,
    pub writes: u64,
}

#[derive(Debug, Default)]
struct CallCounts {
    reads: AtomicU64,
    writes: AtomicU64,
}

/// What [`LeaseTable::ensure_table`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableSetup {
    /// This call created the table.
    Created,
    /// The table was there already (or another worker created it at the same moment).
    Existed,
}

/// Every lease in the table, and what was passed over.
#[derive(Debug, Clone, Default)]
pub struct LeaseListing {
    /// The leases, in no particular order.
    pub leases: Vec<Lease>,
    /// Items that are not leases ktk can use, with the reason: items of other kinds
    /// ([`ItemError::is_other_kind`]), normal in KCL 3.x tables, and broken leases, which are not
    /// (they are logged as warnings).
    pub skipped: Vec<SkippedItem>,
}

/// An item [`LeaseTable::list`] did not return as a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedItem {
    /// Its `leaseKey` (empty if it has none, which DynamoDB does not allow).
    pub key: String,
    pub reason: ItemError,
}

impl LeaseTable {
    /// The lease table `name`, through a client built from the standard AWS configuration
    /// (`aws_config::load_defaults`), with the SDK's standard retries.
    pub fn new(config: &SdkConfig, name: impl Into<String>) -> Self {
        LeaseTable::from_client(Client::new(config), name)
    }

    /// The lease table `name`, through the given client.
    pub fn from_client(client: Client, name: impl Into<String>) -> Self {
        let name = name.into();
        LeaseTable::with_store(Arc::new(DynamoDbItems::new(client, name.clone())), name)
    }

    /// The lease table `name`, whose items live in `store` (DynamoDB, or an in-memory store in
    /// unit tests).
    pub(crate) fn with_store(store: Arc<dyn ItemStore>, name: impl Into<String>) -> Self {
        LeaseTable { store, name: name.into(), table_wait: DEFAULT_TABLE_WAIT, calls: Arc::default() }
    }

    /// The item calls made through this table and its clones so far.
    pub fn calls(&self) -> TableCalls {
        TableCalls {
            reads: self.calls.reads.load(Ordering::Relaxed),
            writes: self.calls.writes.load(Ordering::Relaxed),
        }
    }

    fn count_read(&self) {
        self.calls.reads.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("DynamoDBReads", "table" => self.name.clone()).increment(1);
    }

    fn count_write(&self) {
        self.calls.writes.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("DynamoDBWrites", "table" => self.name.clone()).increment(1);
    }

    /// How long [`ensure_table`](Self::ensure_table) waits for the table to become ACTIVE
    /// (default [`DEFAULT_TABLE_WAIT`], 2 minutes).
    pub fn with_table_wait(mut self, wait: Duration) -> Self {
        self.table_wait = wait;
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Makes sure the table exists with the lease table's key (`leaseKey`, S, hash), creating it
    /// with on-demand billing if it is missing, and waits until it is ACTIVE. A table of that name
    /// with another key is [`Error::TableKeySchema`]; missing permissions are
    /// [`Error::AccessDenied`].
    pub async fn ensure_table(&self) -> Result<TableSetup> {
        self.store.ensure_table(self.table_wait).await
    }

    /// skipped and listed in [`LeaseListing::skipped`].
    pub async fn list(&self) -> Result<LeaseListing> {
        let mut listing = LeaseListing::default();
        let mut start: Option<Item> = None;
        loop {
            self.count_read();
            let page = self.store.scan(start.take()).await?;
            for item in &page.items {
                match serializer::from_item(item) {
                    Ok(lease) => listing.leases.push(lease),
                    Err(reason) => {
                        let key = match item.get(attr::LEASE_KEY) {
                            Some(AttributeValue::S(key)) => key.clone(),
                            _ => String::new(),
                        };
                        if reason.is_other_kind() {
                            tracing::debug!(table = %self.name, key, %reason, "skipping an item that is not a lease");
                        } else {
                            tracing::warn!(table = %self.name, key, %reason, "skipping a lease item that cannot be read");
                        }
                        listing.skipped.push(SkippedItem { key, reason });
                    }
                }
            }
            match page.last_key {
                Some(key) => start = Some(key),
                None => return Ok(listing),
            }
        }
    }

    /// The lease of one shard (consistent read), or `None` if there is none.
    pub async fn get(&self, shard_id: &str) -> Result<Option<Lease>> {
        self.count_read();
        match self.store.get_item(shard_id).await? {
            Some(item) => self.parse(shard_id, &item).map(Some),
            None => Ok(None),
        }
    }

    /// Writes a new lease unless one exists for its shard (`attribute_not_exists(leaseKey)`).
    /// Returns whether it was written; an existing lease is left as it is.
    pub async fn create_if_absent(&self, lease: &Lease) -> Result<bool> {
        check_new_lease(lease)?;
        self.count_write();
        let created = self.store.put_if_absent(serializer::to_item(lease)).await?;
        if created {
            tracing::debug!(table = %self.name, shard = %lease.lease_key, "created lease");
        }
        Ok(created)
    }

    /// Renews a lease the caller holds: increments `leaseCounter` if the counter and the owners
    /// are still those of `lease`. Returns the renewed lease, or [`Error::LeaseLost`].
    pub async fn renew(&self, lease: &Lease) -> Result<Lease> {
        const OP: &str = "renew";
        require_owner(lease, OP)?;
        let next = next_counter(lease, OP)?;
        let mut update = Update::default();
        update.set(attr::LEASE_COUNTER, number(next));
        update.expect_counter(lease.counter);
        update.expect_owners(lease);
        self.update(lease, OP, update, |now| {
            now.counter == next && now.owner == lease.owner && now.checkpoint_owner == lease.checkpoint_owner
        })
        .await
        .map_err(|current| lost(lease, OP, current))
    }

    /// Takes a lease for `new_owner` (an unowned lease, an expired one, or one stolen for
    /// balance): sets `leaseOwner`, increments `leaseCounter`, and, as the KCL does, counts an
    /// owner switch when the lease passes from one worker to another. Conditional on the counter
    /// only; clears a KCL 3.x hand-off in progress (`checkpointOwner`). A lease changed since it
    /// was read is [`Error::LeaseChanged`] (another worker was first).
    pub async fn take(&self, lease: &Lease, new_owner: &str) -> Result<Lease> {
        const OP: &str = "take";
        if new_owner.is_empty() {
            return Err(invalid(lease, OP, "the new owner is empty; give each worker a non-empty id"));
        }
        let next = next_counter(lease, OP)?;
        let mut update = Update::default();
        update.set(attr::LEASE_OWNER, AttributeValue::S(new_owner.to_owned()));
        update.set(attr::LEASE_COUNTER, number(next));
        update.remove(attr::CHECKPOINT_OWNER);
        // DynamoDBLeaseSerializer.getDynamoTakeLeaseUpdate: a switch is counted when a lease goes
        // from one owner to another (not when an unowned lease is taken), or when a hand-off
        // completes to the worker it was meant for.
        let switch = matches!(&lease.owner, Some(old) if old != new_owner)
            || lease.checkpoint_owner.as_deref() == Some(new_owner);
        if switch {
            update.add(attr::OWNER_SWITCHES, number(1));
        }
        update.expect_counter(lease.counter);
        let taken = self
            .update(lease, OP, update, |now| {
                now.counter == next && now.owner.as_deref() == Some(new_owner) && now.checkpoint_owner.is_none()
            })
            .await
            .map_err(|current| changed(lease, OP, current))?;
        tracing::info!(table = %self.name, shard = %lease.lease_key, from = ?lease.owner, to = new_owner, "took lease");
        Ok(taken)
    }

    /// Asks the lease's owner to hand it over to `new_owner` (balancing without duplicates), the
    /// KCL 3.x way: `leaseOwner` becomes `new_owner`, `checkpointOwner` the current owner, and
    /// `leaseCounter` goes up, conditional on the counter and the owners of `lease` (an owned lease
    /// with no hand-off in progress). The current owner sees its next renewal fail on the counter,
    /// finds itself as `checkpointOwner`, finishes its batch, checkpoints, and then
    /// [`release`](Self::release)s, which clears `checkpointOwner`; only then does `new_owner`
    /// start, from that checkpoint. If the current owner died meanwhile, the counter stops moving
    /// and `new_owner` takes the lease once it expires. A lease changed since it was read is
    /// [`Error::LeaseChanged`].
    pub async fn request_handoff(&self, lease: &Lease, new_owner: &str) -> Result<Lease> {
        const OP: &str = "request a hand-off of";
        require_owner(lease, OP)?;
        if new_owner.is_empty() || lease.owner.as_deref() == Some(new_owner) {
            return Err(invalid(lease, OP, "the new owner must be another, non-empty worker id"));
        }
        if lease.checkpoint_owner.is_some() {
            return Err(invalid(lease, OP, "a hand-off is already in progress"));
        }
        let next = next_counter(lease, OP)?;
        let mut update = Update::default();
        update.set(attr::LEASE_OWNER, AttributeValue::S(new_owner.to_owned()));
        if let Some(owner) = &lease.owner {
            update.set(attr::CHECKPOINT_OWNER, AttributeValue::S(owner.clone()));
        }
        update.set(attr::LEASE_COUNTER, number(next));
        update.expect_counter(lease.counter);
        update.expect_owners(lease);
        let requested = self
            .update(lease, OP, update, |now| {
                now.counter == next && now.owner.as_deref() == Some(new_owner) && now.checkpoint_owner == lease.owner
            })
            .await
            .map_err(|current| changed(lease, OP, current))?;
        tracing::info!(table = %self.name, shard = %lease.lease_key, from = ?lease.owner, to = new_owner, "hand-off requested");
        Ok(requested)
    }

    /// Gives a lease up at once (graceful shutdown), so another worker can take it in its next
    /// cycle instead of waiting for it to expire. As the KCL's `evictLease`: removes `leaseOwner`
    /// (or, during a KCL 3.x hand-off, only `checkpointOwner`, leaving the lease to its next
    /// owner) and adds 1 to `leaseCounter`, conditional on the owners being those of `lease` and
    /// the lease existing, not on the counter, so a renewal racing the release cannot fail it.
    /// Checkpoint first: the checkpoint is what the next owner starts from.
    pub async fn release(&self, lease: &Lease) -> Result<Lease> {
        const OP: &str = "release";
        require_owner(lease, OP)?;
        let mut update = Update::default();
        let owner_after = if lease.checkpoint_owner.is_none() {
            update.remove(attr::LEASE_OWNER);
            None
        } else {
            lease.owner.clone()
        };
        update.remove(attr::CHECKPOINT_OWNER);
        update.add(attr::LEASE_COUNTER, number(1));
        update.expect_owners(lease);
        update.expect_exists();
        let released = self
            .update(lease, OP, update, |now| {
                now.owner == owner_after && now.checkpoint_owner.is_none() && now.counter > lease.counter
            })
            .await
            .map_err(|current| lost(lease, OP, current))?;
        tracing::info!(table = %self.name, shard = %lease.lease_key, owner = ?lease.owner, "released lease");
        Ok(released)
    }

    /// Records that the shard has been processed up to `to`: sets `checkpoint` and
    /// `checkpointSubSequenceNumber`, resets `ownerSwitchesSinceCheckpoint` to 0, removes any
    /// pending checkpoint, and increments `leaseCounter`; conditional on the counter and the owners
    /// being those of `lease` (else [`Error::LeaseLost`]). A checkpoint before the lease's current
    /// one is [`Error::CheckpointBackwards`]. For a finished shard use
    /// [`checkpoint_shard_end`](Self::checkpoint_shard_end).
    pub async fn checkpoint(&self, lease: &Lease, to: ExtendedSequenceNumber) -> Result<Lease> {
        self.write_checkpoint(lease, to, &BTreeSet::new()).await
    }

    /// Checkpoints `SHARD_END` for a shard read to its end, recording its children
    /// (`childShardIds`, from the last `GetRecords` or `ListShards`); its children may then start.
    pub async fn checkpoint_shard_end(&self, lease: &Lease, child_shard_ids: &BTreeSet<String>) -> Result<Lease> {
        self.write_checkpoint(lease, ExtendedSequenceNumber::SHARD_END, child_shard_ids).await
    }

    /// Records a prepared (two-phase) checkpoint (`pendingCheckpoint`,
    /// `pendingCheckpointSubSequenceNumber`, and `pendingCheckpointState` when given, removed when
    /// not); the committed checkpoint stays. Conditional like [`checkpoint`](Self::checkpoint).
    pub async fn prepare_checkpoint(
        &self,
        lease: &Lease,
        pending: ExtendedSequenceNumber,
        state: Option<Vec<u8>>,
    ) -> Result<Lease> {
        const OP: &str = "prepare a checkpoint for";
        require_owner(lease, OP)?;
        check_forward(lease, &pending, OP)?;
        let next = next_counter(lease, OP)?;
        let mut update = Update::default();
        update.set(attr::PENDING_CHECKPOINT, AttributeValue::S(pending.sequence.as_str().to_owned()));
        update.set(attr::PENDING_CHECKPOINT_SUB_SEQUENCE, number(pending.sub_sequence));
        match &state {
            Some(state) => update.set(attr::PENDING_CHECKPOINT_STATE, AttributeValue::B(Blob::new(state.clone()))),
            None => update.remove(attr::PENDING_CHECKPOINT_STATE),
        }
        update.set(attr::LEASE_COUNTER, number(next));
        update.expect_counter(lease.counter);
        update.expect_owners(lease);
        self.update(lease, OP, update, |now| {
            now.counter == next
                && now.owner == lease.owner
                && now.pending_checkpoint.as_ref() == Some(&pending)
                && now.pending_checkpoint_state == state
        })
        .await
        .map_err(|current| lost(lease, OP, current))
    }

    /// Deletes a lease (a shard past retention, or a finished shard whose children have
    /// started), unless its checkpoint moved since `lease` was read ([`Error::LeaseChanged`]).
    /// Deleting a lease that is already gone succeeds.
    pub async fn delete(&self, lease: &Lease) -> Result<()> {
        const OP: &str = "delete";
        self.count_write();
        let conditions = vec![
            Condition::Equals(
                attr::CHECKPOINT.to_owned(),
                AttributeValue::S(lease.checkpoint.sequence.as_str().to_owned()),
            ),
            Condition::Equals(attr::CHECKPOINT_SUB_SEQUENCE.to_owned(), number(lease.checkpoint.sub_sequence)),
        ];
        let result = self.store.delete_item(&lease.lease_key, conditions).await;
        match result {
            Ok(_) => {
                tracing::info!(table = %self.name, shard = %lease.lease_key, "deleted lease");
                Ok(())
            }
            Err(Failure::Condition(item)) => {
                let current = self.current(lease, item).await?;
                Err(changed(lease, OP, CurrentOrError::Current(current)))
            }
            Err(Failure::Error(error)) => Err(error),
        }
    }

    async fn write_checkpoint(
        &self,
        lease: &Lease,
        to: ExtendedSequenceNumber,
        child_shard_ids: &BTreeSet<String>,
    ) -> Result<Lease> {
        const OP: &str = "checkpoint";
        require_owner(lease, OP)?;
        check_forward(lease, &to, OP)?;
        let next = next_counter(lease, OP)?;
        let mut update = Update::default();
        // DynamoDBLeaseSerializer.getDynamoUpdateLeaseUpdate, after DynamoDBCheckpointer.setCheckpoint
        // cleared the pending checkpoint and the owner switches.
        update.set(attr::CHECKPOINT, AttributeValue::S(to.sequence.as_str().to_owned()));
        update.set(attr::CHECKPOINT_SUB_SEQUENCE, number(to.sub_sequence));
        update.set(attr::OWNER_SWITCHES, number(0));
        update.remove(attr::PENDING_CHECKPOINT);
        update.remove(attr::PENDING_CHECKPOINT_SUB_SEQUENCE);
        update.remove(attr::PENDING_CHECKPOINT_STATE);
        if let Some(children) = string_set(child_shard_ids) {
            update.set(attr::CHILD_SHARD_IDS, children);
        }
        update.set(attr::LEASE_COUNTER, number(next));
        update.expect_counter(lease.counter);
        update.expect_owners(lease);
        self.update(lease, OP, update, |now| now.counter == next && now.owner == lease.owner && now.checkpoint == to)
            .await
            .map_err(|current| lost(lease, OP, current))
    }

    /// Sends a conditional update. On success, the lease as it now is. When the condition fails:
    /// the same, if the item shows the update already made (`applied`), else `Err(Ok(current))`
    /// for the caller to turn into its own error; other failures are `Err(Err(error))`.
    async fn update(
        &self,
        lease: &Lease,
        operation: &'static str,
        update: Update,
        applied: impl Fn(&Lease) -> bool,
    ) -> std::result::Result<Lease, CurrentOrError> {
        self.count_write();
        let result = self.store.update_item(&lease.lease_key, update).await;
        match result {
            Ok(item) => {
                tracing::debug!(table = %self.name, shard = %lease.lease_key, operation, "lease written");
                self.parse(&lease.lease_key, &item).map_err(CurrentOrError::Error)
            }
            Err(Failure::Error(error)) => Err(CurrentOrError::Error(error)),
            Err(Failure::Condition(item)) => {
                let current = self.current(lease, item).await.map_err(CurrentOrError::Error)?;
                match current {
                    Some(now) if applied(&now) => {
                        tracing::info!(
                            table = %self.name, shard = %lease.lease_key, operation,
                            "condition failed on a retry of a write that had been applied; the write stands"
                        );
                        Ok(now)
                    }
                    current => Err(CurrentOrError::Current(current)),
                }
            }
        }
    }

    /// The lease as it is now: from the item a failed condition returned, else read again.
    async fn current(&self, lease: &Lease, returned: Option<Item>) -> Result<Option<Lease>> {
        match returned {
            Some(item) if !item.is_empty() => self.parse(&lease.lease_key, &item).map(Some),
            // DynamoDB Local does not return the item; nor does DynamoDB when there is none.
            _ => self.get(&lease.lease_key).await,
        }
    }

    fn parse(&self, key: &str, item: &Item) -> Result<Lease> {
        serializer::from_item(item).map_err(|source| Error::Item {
            table: self.name.clone(),
            key: key.to_owned(),
            source,
        })
    }
}

/// A failed conditional update: the lease as it is now, or another error.
enum CurrentOrError {
    Current(Option<Lease>),
    Error(Error),
}

fn lost(lease: &Lease, operation: &'static str, failure: CurrentOrError) -> Error {
    match failure {
        CurrentOrError::Current(current) => Error::LeaseLost {
            shard: lease.lease_key.clone(),
            operation,
            expected_counter: lease.counter,
            current: current.map(Box::new),
        },
        CurrentOrError::Error(error) => error,
    }
}

fn changed(lease: &Lease, operation: &'static str, failure: CurrentOrError) -> Error {
    match failure {
        CurrentOrError::Current(current) => Error::LeaseChanged {
            shard: lease.lease_key.clone(),
            operation,
            expected_counter: lease.counter,
            current: current.map(Box::new),
        },
        CurrentOrError::Error(error) => error,
    }
}

fn invalid(lease: &Lease, operation: &'static str, problem: impl Into<String>) -> Error {
    Error::InvalidRequest { shard: lease.lease_key.clone(), operation, problem: problem.into() }
}

fn require_owner(lease: &Lease, operation: &'static str) -> Result<()> {
    match lease.owner.as_deref() {
        Some(owner) if !owner.is_empty() => Ok(()),
        _ => Err(invalid(lease, operation, "the lease has no owner; take it first")),
    }
}

fn next_counter(lease: &Lease, operation: &'static str) -> Result<u64> {
    lease.counter.checked_add(1).ok_or_else(|| invalid(lease, operation, "leaseCounter is at its maximum"))
}

fn check_forward(lease: &Lease, to: &ExtendedSequenceNumber, operation: &'static str) -> Result<()> {
    to.sequence
        .validate()
        .map_err(|problem| invalid(lease, operation, format!("sequence number {}: {problem}", to.sequence)))?;
    if *to < lease.checkpoint {
        return Err(Error::CheckpointBackwards {
            shard: lease.lease_key.clone(),
            current: lease.checkpoint.clone(),
            requested: to.clone(),
        });
    }
    Ok(())
}

/// A lease about to be created must be one the KCL could have written.
fn check_new_lease(lease: &Lease) -> Result<()> {
    const OP: &str = "create";
    if lease.lease_key.is_empty() {
        return Err(invalid(lease, OP, "the lease key (shard id) is empty"));
    }
    lease.checkpoint.sequence.validate().map_err(|p| invalid(lease, OP, format!("checkpoint: {p}")))?;
    if let Some(pending) = &lease.pending_checkpoint {
        pending.sequence.validate().map_err(|p| invalid(lease, OP, format!("pending checkpoint: {p}")))?;
    }
    let empty = |s: &Option<String>| s.as_deref() == Some("");
    if empty(&lease.owner) || empty(&lease.checkpoint_owner) {
        return Err(invalid(lease, OP, "an owner is an empty string; leave it None instead"));
    }
    if lease.parent_shard_ids.contains("") || lease.child_shard_ids.contains("") {
        return Err(invalid(lease, OP, "a parent or child shard id is empty"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_only_move_forward() {
        let mut lease = Lease::new("shardId-000000000001", ExtendedSequenceNumber::TRIM_HORIZON);
        lease.checkpoint = ExtendedSequenceNumber::at("100", 2).expect("valid");
        let back = ExtendedSequenceNumber::at("100", 1).expect("valid");
        assert!(matches!(check_forward(&lease, &back, "checkpoint"), Err(Error::CheckpointBackwards { .. })));
        assert!(check_forward(&lease, &lease.checkpoint.clone(), "checkpoint").is_ok());
        assert!(check_forward(&lease, &ExtendedSequenceNumber::SHARD_END, "checkpoint").is_ok());
        let bad =
            ExtendedSequenceNumber { sequence: crate::lease::SequenceNumber::Number("0123".into()), sub_sequence: 0 };
        assert!(matches!(check_forward(&lease, &bad, "checkpoint"), Err(Error::InvalidRequest { .. })));
    }

    fn memory_table() -> LeaseTable {
        LeaseTable::with_store(Arc::new(crate::lease::memory::MemoryItems::default()), "app")
    }

    #[tokio::test]
    async fn two_workers_racing_for_a_lease_one_gets_it_the_other_is_told_it_changed() {
        let table = memory_table();
        let lease = Lease::new("s0", ExtendedSequenceNumber::TRIM_HORIZON);
        assert!(table.create_if_absent(&lease).await.expect("create"));
        assert!(!table.create_if_absent(&lease).await.expect("create again"), "an existing lease stays");
        let first = table.take(&lease, "w1").await.expect("w1 takes it");
        let second = table.take(&lease, "w2").await;
        match second {
            Err(Error::LeaseChanged { current: Some(current), .. }) => {
                assert_eq!(current.owner.as_deref(), Some("w1"));
                assert_eq!(current.counter, first.counter);
            }
            other => panic!("expected LeaseChanged, got {other:?}"),
        }
        // Once another worker has it, the former owner's renewal is a loss, not a retryable failure,
        // and its checkpoints are refused.
        let renewed = table.renew(&first).await.expect("renew");
        table.take(&renewed, "w2").await.expect("w2 steals it");
        let stale = table.renew(&renewed).await;
        assert!(matches!(&stale, Err(e @ Error::LeaseLost { .. }) if !e.is_retryable()), "{stale:?}");
        let refused = table.checkpoint(&renewed, ExtendedSequenceNumber::at("100", 0).expect("valid")).await;
        assert!(matches!(refused, Err(Error::LeaseLost { .. })), "{refused:?}");
    }

    #[tokio::test]
    async fn a_lease_is_deleted_only_if_its_checkpoint_did_not_move() {
        let table = memory_table();
        let lease = Lease::new("s0", ExtendedSequenceNumber::TRIM_HORIZON);
        table.create_if_absent(&lease).await.expect("create");
        let taken = table.take(&lease, "w1").await.expect("take");
        table.checkpoint(&taken, ExtendedSequenceNumber::at("100", 0).expect("valid")).await.expect("checkpoint");
        assert!(matches!(table.delete(&lease).await, Err(Error::LeaseChanged { .. })));
        let now = table.get("s0").await.expect("get").expect("lease");
        table.delete(&now).await.expect("delete");
        assert!(table.get("s0").await.expect("get").is_none());
        table.delete(&now).await.expect("deleting a lease that is gone succeeds");
    }
}
