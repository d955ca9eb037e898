//! [`LeaseTable`]: the lease table in DynamoDB, written the way the KCL writes it
//! (`DynamoDBLeaseRefresher` and `DynamoDBLeaseSerializer` of amazon-kinesis-client 3.0.3).
//!
//! Every write to an existing lease is one conditional `UpdateItem` of named attributes, so
//! attributes ktk does not know (newer KCL fields, tags added by operators) stay as they are.
//! Each write increments `leaseCounter` and returns the lease as the table now holds it.
//!
//! Retries: the client keeps the SDK's standard retries (throttling, timeouts, 5xx); a failed
//! condition is a 400 the SDK never retries, and this module never retries it either. A retried
//! write can meet its own earlier success, though (the first attempt applied, its answer was
//! lost); so when a condition fails, the item is read back, and if it already shows exactly the
//! write that was attempted, the write counts as done (the KCL's "spurious renewal failure" check,
//! made for every owner write).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aws_config::SdkConfig;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::create_table::CreateTableError;
use aws_sdk_dynamodb::operation::delete_item::DeleteItemError;
use aws_sdk_dynamodb::operation::describe_table::DescribeTableError;
use aws_sdk_dynamodb::operation::get_item::GetItemError;
use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::operation::scan::ScanError;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, ReturnValue,
    ReturnValuesOnConditionCheckFailure, ScalarAttributeType, TableDescription, TableStatus,
};

use crate::error::{Error, ItemError, Result};
use crate::lease::model::{ExtendedSequenceNumber, Lease};
use crate::lease::serializer::{self, Item, attr, number, string_set};

/// How long [`LeaseTable::ensure_table`] waits for a table to become ACTIVE, by default.
pub const DEFAULT_TABLE_WAIT: Duration = Duration::from_secs(120);

/// The lease table of one application (by default, as in the KCL, named after the application).
#[derive(Debug, Clone)]
pub struct LeaseTable {
    client: Client,
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
        LeaseTable { client, name: name.into(), table_wait: DEFAULT_TABLE_WAIT, calls: Arc::default() }
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
        let started = Instant::now();
        let setup = match self.describe().await? {
            Some(table) => {
                self.check_key_schema(&table)?;
                if usable(&table) {
                    return Ok(TableSetup::Existed);
                }
                // Being created by another worker: wait for it below.
                TableSetup::Existed
            }
            None => self.create_table().await?,
        };
        self.wait_until_active(started).await?;
        Ok(setup)
    }

    /// Every lease, read with a consistent scan (all pages). Items that are not leases are
    /// skipped and listed in [`LeaseListing::skipped`].
    pub async fn list(&self) -> Result<LeaseListing> {
        let mut listing = LeaseListing::default();
        let mut start: Option<Item> = None;
        loop {
            self.count_read();
            let page = self
                .client
                .scan()
                .table_name(&self.name)
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| self.fail("Scan", e, scan_kind).into_error())?;
            for item in page.items() {
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
            match page.last_evaluated_key {
                Some(key) if !key.is_empty() => start = Some(key),
                _ => return Ok(listing),
            }
        }
    }

    /// The lease of one shard (consistent read), or `None` if there is none.
    pub async fn get(&self, shard_id: &str) -> Result<Option<Lease>> {
        self.count_read();
        let output = self
            .client
            .get_item()
            .table_name(&self.name)
            .set_key(Some(serializer::key(shard_id)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| self.fail("GetItem", e, get_kind).into_error())?;
        match output.item {
            Some(item) if !item.is_empty() => self.parse(shard_id, &item).map(Some),
            _ => Ok(None),
        }
    }

    /// Writes a new lease unless one exists for its shard (`attribute_not_exists(leaseKey)`).
    /// Returns whether it was written; an existing lease is left as it is.
    pub async fn create_if_absent(&self, lease: &Lease) -> Result<bool> {
        check_new_lease(lease)?;
        self.count_write();
        let result = self
            .client
            .put_item()
            .table_name(&self.name)
            .set_item(Some(serializer::to_item(lease)))
            .condition_expression("attribute_not_exists(#leaseKey)")
            .expression_attribute_names("#leaseKey", attr::LEASE_KEY)
            .send()
            .await;
        match result {
            Ok(_) => {
                tracing::debug!(table = %self.name, shard = %lease.lease_key, "created lease");
                Ok(true)
            }
            Err(e) => match self.fail("PutItem", e, put_kind) {
                Failure::Condition(_) => Ok(false),
                other => Err(other.into_error()),
            },
        }
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
        let result = self
            .client
            .delete_item()
            .table_name(&self.name)
            .set_key(Some(serializer::key(&lease.lease_key)))
            .condition_expression(
                "attribute_not_exists(#leaseKey) OR (#checkpoint = :checkpoint AND #subSequence = :subSequence)",
            )
            .expression_attribute_names("#leaseKey", attr::LEASE_KEY)
            .expression_attribute_names("#checkpoint", attr::CHECKPOINT)
            .expression_attribute_names("#subSequence", attr::CHECKPOINT_SUB_SEQUENCE)
            .expression_attribute_values(
                ":checkpoint",
                AttributeValue::S(lease.checkpoint.sequence.as_str().to_owned()),
            )
            .expression_attribute_values(":subSequence", number(lease.checkpoint.sub_sequence))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match result {
            Ok(_) => {
                tracing::info!(table = %self.name, shard = %lease.lease_key, "deleted lease");
                Ok(())
            }
            Err(e) => match self.fail("DeleteItem", e, delete_kind) {
                Failure::Condition(item) => {
                    let current = self.current(lease, item).await?;
                    Err(changed(lease, OP, CurrentOrError::Current(current)))
                }
                other => Err(other.into_error()),
            },
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
        let (expression, condition, names, values) = update.build();
        self.count_write();
        let result = self
            .client
            .update_item()
            .table_name(&self.name)
            .set_key(Some(serializer::key(&lease.lease_key)))
            .update_expression(expression)
            .condition_expression(condition)
            .set_expression_attribute_names(Some(names))
            .set_expression_attribute_values(Some(values))
            .return_values(ReturnValue::AllNew)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match result {
            Ok(output) => {
                let item = output.attributes.unwrap_or_default();
                tracing::debug!(table = %self.name, shard = %lease.lease_key, operation, "lease written");
                self.parse(&lease.lease_key, &item).map_err(CurrentOrError::Error)
            }
            Err(e) => match self.fail("UpdateItem", e, update_kind) {
                Failure::Condition(item) => {
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
                other => Err(CurrentOrError::Error(other.into_error())),
            },
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

    async fn describe(&self) -> Result<Option<TableDescription>> {
        match self.client.describe_table().table_name(&self.name).send().await {
            Ok(output) => Ok(output.table),
            Err(e) => match self.fail("DescribeTable", e, describe_kind) {
                Failure::Error(Error::TableNotFound { .. }) => Ok(None),
                other => Err(other.into_error()),
            },
        }
    }

    async fn create_table(&self) -> Result<TableSetup> {
        let key = KeySchemaElement::builder().attribute_name(attr::LEASE_KEY).key_type(KeyType::Hash).build();
        let definition = AttributeDefinition::builder()
            .attribute_name(attr::LEASE_KEY)
            .attribute_type(ScalarAttributeType::S)
            .build();
        let (key, definition) = match (key, definition) {
            (Ok(key), Ok(definition)) => (key, definition),
            (Err(e), _) | (_, Err(e)) => {
                return Err(Error::Service {
                    table: self.name.clone(),
                    action: "CreateTable",
                    code: "InvalidRequest".into(),
                    message: e.to_string(),
                    retryable: false,
                });
            }
        };
        let result = self
            .client
            .create_table()
            .table_name(&self.name)
            .key_schema(key)
            .attribute_definitions(definition)
            .billing_mode(BillingMode::PayPerRequest)
            .send()
            .await;
        match result {
            Ok(_) => {
                tracing::info!(table = %self.name, "created lease table (on-demand billing, key leaseKey)");
                Ok(TableSetup::Created)
            }
            Err(e) => match self.fail("CreateTable", e, create_kind) {
                // Another worker is creating it right now.
                Failure::InUse => Ok(TableSetup::Existed),
                other => Err(other.into_error()),
            },
        }
    }

    async fn wait_until_active(&self, started: Instant) -> Result<()> {
        let mut pause = Duration::from_millis(100);
        loop {
            let status = match self.describe().await? {
                Some(table) => {
                    self.check_key_schema(&table)?;
                    if usable(&table) {
                        return Ok(());
                    }
                    let status = table.table_status.clone();
                    if status != Some(TableStatus::Creating) {
                        // Deleting, archived, unreadable keys...: waiting will not help.
                        return Err(self.not_active(status, started));
                    }
                    status
                }
                // Just created, not yet visible: keep waiting.
                None => None,
            };
            if started.elapsed() >= self.table_wait {
                return Err(self.not_active(status, started));
            }
            tokio::time::sleep(pause.min(self.table_wait.saturating_sub(started.elapsed()))).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }

    fn not_active(&self, status: Option<TableStatus>, started: Instant) -> Error {
        Error::TableNotActive {
            table: self.name.clone(),
            status: status.map_or_else(|| "not yet visible".to_owned(), |s| s.as_str().to_owned()),
            waited: started.elapsed(),
        }
    }

    fn check_key_schema(&self, table: &TableDescription) -> Result<()> {
        let keys = table.key_schema();
        let lease_key_is_string = table
            .attribute_definitions()
            .iter()
            .any(|d| d.attribute_name() == attr::LEASE_KEY && d.attribute_type() == &ScalarAttributeType::S);
        let right = keys.len() == 1
            && keys[0].attribute_name() == attr::LEASE_KEY
            && keys[0].key_type() == &KeyType::Hash
            && lease_key_is_string;
        if right {
            return Ok(());
        }
        let type_of = |name: &str| {
            table
                .attribute_definitions()
                .iter()
                .find(|d| d.attribute_name() == name)
                .map_or("?", |d| d.attribute_type().as_str())
        };
        let found = keys
            .iter()
            .map(|k| format!("{} ({}, {})", k.attribute_name(), type_of(k.attribute_name()), k.key_type().as_str()))
            .collect::<Vec<_>>()
            .join(" + ");
        Err(Error::TableKeySchema { table: self.name.clone(), found })
    }

    /// What a failed call means, decided once from the SDK's typed error (`kind_of`), with the
    /// error codes DynamoDB does not model (access denied, validation...) read from the code.
    fn fail<E>(&self, action: &'static str, error: SdkError<E, HttpResponse>, kind_of: fn(&E) -> Kind) -> Failure
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let (kind, code) = match &error {
            SdkError::ServiceError(service) => {
                let kind = match kind_of(service.err()) {
                    Kind::Unmodeled => kind_for_code(service.err().code(), service.raw().status().is_server_error()),
                    kind => kind,
                };
                (kind, service.err().code().unwrap_or("ServiceError").to_owned())
            }
            SdkError::TimeoutError(_) => (Kind::Transient, "RequestTimeout".to_owned()),
            SdkError::DispatchFailure(_) => (Kind::Transient, "ConnectionError".to_owned()),
            SdkError::ResponseError(_) => (Kind::Transient, "ResponseError".to_owned()),
            // A request that could not even be built: a bug, not a condition of the service.
            _ => (Kind::Rejected, "ConstructionFailure".to_owned()),
        };
        let table = self.name.clone();
        let message = || match &error {
            SdkError::ServiceError(service) => service.err().message().unwrap_or("no message").to_owned(),
            _ => DisplayErrorContext(&error).to_string(),
        };
        match kind {
            Kind::Condition(item) => Failure::Condition(item),
            Kind::InUse => Failure::InUse,
            Kind::NotFound => Failure::Error(Error::TableNotFound { table }),
            Kind::AccessDenied => Failure::Error(Error::AccessDenied { table, action, message: message() }),
            Kind::Throttled => Failure::Error(Error::Throttled { table, action, message: message() }),
            Kind::Transient | Kind::Unmodeled => {
                Failure::Error(Error::Service { table, action, code, message: message(), retryable: true })
            }
            Kind::Rejected => {
                Failure::Error(Error::Service { table, action, code, message: message(), retryable: false })
            }
        }
    }
}

/// A table that takes reads and writes.
fn usable(table: &TableDescription) -> bool {
    matches!(table.table_status(), Some(TableStatus::Active | TableStatus::Updating))
}

/// What a failed DynamoDB call means for the lease table.
enum Kind {
    /// The condition of a conditional write was false (with the item, when DynamoDB returned it).
    Condition(Option<Item>),
    /// The table does not exist.
    NotFound,
    /// `CreateTable` of a table that is already there or being created.
    InUse,
    AccessDenied,
    Throttled,
    /// May work if made again: server errors, timeouts, connection failures, write conflicts.
    Transient,
    /// Will fail again the same way: a bad request.
    Rejected,
    /// A code the SDK does not model; decided by [`kind_for_code`].
    Unmodeled,
}

/// Codes DynamoDB returns without a modeled error type
/// ([common errors](https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/Programming.Errors.html)).
fn kind_for_code(code: Option<&str>, server_error: bool) -> Kind {
    match code {
        Some("AccessDeniedException") => Kind::AccessDenied,
        Some("ThrottlingException" | "Throttling" | "LimitExceededException" | "RequestLimitExceeded") => {
            Kind::Throttled
        }
        Some(
            "ValidationException"
            | "SerializationException"
            | "UnrecognizedClientException"
            | "InvalidSignatureException"
            | "MissingAuthenticationTokenException"
            | "IncompleteSignatureException",
        ) => Kind::Rejected,
        // Refreshed credentials may work next time.
        Some("ExpiredTokenException") => Kind::Transient,
        _ if server_error => Kind::Transient,
        _ => Kind::Rejected,
    }
}

fn update_kind(error: &UpdateItemError) -> Kind {
    match error {
        UpdateItemError::ConditionalCheckFailedException(e) => Kind::Condition(e.item.clone()),
        UpdateItemError::ResourceNotFoundException(_) => Kind::NotFound,
        UpdateItemError::ProvisionedThroughputExceededException(_)
        | UpdateItemError::RequestLimitExceeded(_)
        | UpdateItemError::ThrottlingException(_) => Kind::Throttled,
        UpdateItemError::InternalServerError(_)
        | UpdateItemError::TransactionConflictException(_)
        | UpdateItemError::ReplicatedWriteConflictException(_) => Kind::Transient,
        UpdateItemError::ItemCollectionSizeLimitExceededException(_) => Kind::Rejected,
        _ => Kind::Unmodeled,
    }
}

fn put_kind(error: &PutItemError) -> Kind {
    match error {
        PutItemError::ConditionalCheckFailedException(e) => Kind::Condition(e.item.clone()),
        PutItemError::ResourceNotFoundException(_) => Kind::NotFound,
        PutItemError::ProvisionedThroughputExceededException(_)
        | PutItemError::RequestLimitExceeded(_)
        | PutItemError::ThrottlingException(_) => Kind::Throttled,
        PutItemError::InternalServerError(_)
        | PutItemError::TransactionConflictException(_)
        | PutItemError::ReplicatedWriteConflictException(_) => Kind::Transient,
        PutItemError::ItemCollectionSizeLimitExceededException(_) => Kind::Rejected,
        _ => Kind::Unmodeled,
    }
}

fn delete_kind(error: &DeleteItemError) -> Kind {
    match error {
        DeleteItemError::ConditionalCheckFailedException(e) => Kind::Condition(e.item.clone()),
        DeleteItemError::ResourceNotFoundException(_) => Kind::NotFound,
        DeleteItemError::ProvisionedThroughputExceededException(_)
        | DeleteItemError::RequestLimitExceeded(_)
        | DeleteItemError::ThrottlingException(_) => Kind::Throttled,
        DeleteItemError::InternalServerError(_)
        | DeleteItemError::TransactionConflictException(_)
        | DeleteItemError::ReplicatedWriteConflictException(_) => Kind::Transient,
        DeleteItemError::ItemCollectionSizeLimitExceededException(_) => Kind::Rejected,
        _ => Kind::Unmodeled,
    }
}

fn get_kind(error: &GetItemError) -> Kind {
    match error {
        GetItemError::ResourceNotFoundException(_) => Kind::NotFound,
        GetItemError::ProvisionedThroughputExceededException(_)
        | GetItemError::RequestLimitExceeded(_)
        | GetItemError::ThrottlingException(_) => Kind::Throttled,
        GetItemError::InternalServerError(_) => Kind::Transient,
        _ => Kind::Unmodeled,
    }
}

fn scan_kind(error: &ScanError) -> Kind {
    match error {
        ScanError::ResourceNotFoundException(_) => Kind::NotFound,
        ScanError::ProvisionedThroughputExceededException(_)
        | ScanError::RequestLimitExceeded(_)
        | ScanError::ThrottlingException(_) => Kind::Throttled,
        ScanError::InternalServerError(_) => Kind::Transient,
        _ => Kind::Unmodeled,
    }
}

fn describe_kind(error: &DescribeTableError) -> Kind {
    match error {
        DescribeTableError::ResourceNotFoundException(_) => Kind::NotFound,
        DescribeTableError::InternalServerError(_) => Kind::Transient,
        _ => Kind::Unmodeled,
    }
}

fn create_kind(error: &CreateTableError) -> Kind {
    match error {
        CreateTableError::ResourceInUseException(_) => Kind::InUse,
        CreateTableError::LimitExceededException(_) => Kind::Throttled,
        CreateTableError::InternalServerError(_) => Kind::Transient,
        _ => Kind::Unmodeled,
    }
}

/// A failed call, classified.
enum Failure {
    Condition(Option<Item>),
    InUse,
    Error(Error),
}

impl Failure {
    /// For calls where a failed condition or "in use" cannot happen (no condition, no create).
    fn into_error(self) -> Error {
        match self {
            Failure::Error(error) => error,
            Failure::Condition(_) | Failure::InUse => Error::Service {
                table: String::new(),
                action: "DynamoDB",
                code: "Unexpected".into(),
                message: "a condition failed on a call that has none".into(),
                retryable: false,
            },
        }
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

/// An `UpdateItem` of named attributes: SET, REMOVE and ADD clauses and a condition, with
/// every name and value passed as a placeholder.
#[derive(Default)]
struct Update {
    set: Vec<String>,
    remove: Vec<String>,
    add: Vec<String>,
    conditions: Vec<String>,
    names: HashMap<String, String>,
    values: HashMap<String, AttributeValue>,
}

impl Update {
    fn name(&mut self, attribute: &str) -> String {
        let placeholder = format!("#{attribute}");
        self.names.insert(placeholder.clone(), attribute.to_owned());
        placeholder
    }

    fn value(&mut self, value: AttributeValue) -> String {
        let placeholder = format!(":v{}", self.values.len());
        self.values.insert(placeholder.clone(), value);
        placeholder
    }

    fn set(&mut self, attribute: &str, value: AttributeValue) {
        let (name, value) = (self.name(attribute), self.value(value));
        self.set.push(format!("{name} = {value}"));
    }

    fn remove(&mut self, attribute: &str) {
        let name = self.name(attribute);
        self.remove.push(name);
    }

    fn add(&mut self, attribute: &str, value: AttributeValue) {
        let (name, value) = (self.name(attribute), self.value(value));
        self.add.push(format!("{name} {value}"));
    }

    fn expect_equal_or_absent(&mut self, attribute: &str, value: Option<&str>) {
        let name = self.name(attribute);
        let condition = match value {
            Some(value) => format!("{name} = {}", self.value(AttributeValue::S(value.to_owned()))),
            None => format!("attribute_not_exists({name})"),
        };
        self.conditions.push(condition);
    }

    fn expect_counter(&mut self, counter: u64) {
        let (name, value) = (self.name(attr::LEASE_COUNTER), self.value(number(counter)));
        self.conditions.push(format!("{name} = {value}"));
    }

    /// `leaseOwner` and `checkpointOwner` as in `lease` (absent where it has none): the KCL's
    /// `getDynamoLeaseOwnerExpectation`.
    fn expect_owners(&mut self, lease: &Lease) {
        self.expect_equal_or_absent(attr::LEASE_OWNER, lease.owner.as_deref());
        self.expect_equal_or_absent(attr::CHECKPOINT_OWNER, lease.checkpoint_owner.as_deref());
    }

    fn expect_exists(&mut self) {
        let name = self.name(attr::LEASE_KEY);
        self.conditions.push(format!("attribute_exists({name})"));
    }

    /// (update expression, condition expression, names, values)
    fn build(self) -> (String, String, HashMap<String, String>, HashMap<String, AttributeValue>) {
        let mut clauses = Vec::new();
        for (keyword, parts) in [("SET", &self.set), ("REMOVE", &self.remove), ("ADD", &self.add)] {
            if !parts.is_empty() {
                clauses.push(format!("{keyword} {}", parts.join(", ")));
            }
        }
        (clauses.join(" "), self.conditions.join(" AND "), self.names, self.values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_expressions_name_every_attribute() {
        let mut lease = Lease::new("shardId-000000000001", ExtendedSequenceNumber::LATEST);
        lease.owner = Some("w1".into());
        lease.counter = 7;
        let mut update = Update::default();
        update.set(attr::LEASE_COUNTER, number(8));
        update.remove(attr::CHECKPOINT_OWNER);
        update.add(attr::OWNER_SWITCHES, number(1));
        update.expect_counter(7);
        update.expect_owners(&lease);
        let (expression, condition, names, values) = update.build();
        assert_eq!(expression, "SET #leaseCounter = :v0 REMOVE #checkpointOwner ADD #ownerSwitchesSinceCheckpoint :v1");
        assert_eq!(condition, "#leaseCounter = :v2 AND #leaseOwner = :v3 AND attribute_not_exists(#checkpointOwner)");
        assert_eq!(names.len(), 4);
        assert_eq!(values[":v2"], AttributeValue::N("7".into()));
        assert_eq!(values[":v3"], AttributeValue::S("w1".into()));
    }

    #[test]
    fn access_denied_and_validation_are_not_retryable() {
        assert!(matches!(kind_for_code(Some("AccessDeniedException"), false), Kind::AccessDenied));
        assert!(matches!(kind_for_code(Some("ValidationException"), false), Kind::Rejected));
        assert!(matches!(kind_for_code(Some("ThrottlingException"), false), Kind::Throttled));
        assert!(matches!(kind_for_code(Some("Whatever"), true), Kind::Transient));
        assert!(matches!(kind_for_code(None, false), Kind::Rejected));
    }

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
}
