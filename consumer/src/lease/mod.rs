//! Shard leases in a DynamoDB table that the KCL can share: one item per shard, saying which
//! worker processes it ([`Lease::owner`]), whether that worker is alive ([`Lease::counter`],
//! incremented by every renewal) and how far it got ([`Lease::checkpoint`]).
//!
//! - the model: [`Lease`], [`ExtendedSequenceNumber`] and [`SequenceNumber`] (with the KCL's
//!   sentinels and ordering);
//! - [`serializer`]: lease <-> DynamoDB item, attribute names and types exactly as the KCL's
//!   `DynamoDBLeaseSerializer` writes them; [`dynamo_json`]: items as DynamoDB JSON, for raw dumps
//!   and fixtures;
//! - [`LeaseTable`]: the conditional reads and writes (create, renew, take, hand-off, release,
//!   checkpoint, delete), each guarded by the lease's counter and owners, over the table's item
//!   operations (DynamoDB, or an in-memory store in unit tests);
//! - the taker (which leases a worker takes each cycle: unowned and expired first, on the local
//!   monotonic clock, then from workers above their fair share);
//! - [`LeaseRenewer`]: renews the leases a worker holds ([`HeldLease`]) and marks one lost the
//!   moment another worker has it; checkpoints go through the held lease; hand-offs and releases;
//! - [`ShardSyncer`]: `ListShards` into leases (parents, hash ranges; children at `TRIM_HORIZON`
//!   after their parents, roots at the [`InitialPosition`]), [`parents_done`] gating, and cleanup
//!   of finished leases of shards past retention.
//!
//! Items of other kinds in the table (newer KCL releases keep their leader lock, migration state
//! and worker metrics there) are skipped by [`LeaseTable::list`] and never written.

pub mod dynamo_json;
mod dynamodb;
pub(crate) mod item_store;
#[cfg(test)]
pub(crate) mod memory;
mod model;
mod renewer;
pub mod serializer;
mod shard_sync;
mod table;
pub(crate) mod taker;

pub use model::{ExtendedSequenceNumber, Lease, SequenceNumber};
pub use renewer::{HeldLease, LeaseRenewer, RenewReport};
pub use shard_sync::{InitialPosition, ShardSyncer, SyncReport, parents_done};
pub use table::{DEFAULT_TABLE_WAIT, LeaseListing, LeaseTable, SkippedItem, TableCalls, TableSetup};
