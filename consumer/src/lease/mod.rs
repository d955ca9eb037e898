//! Shard leases in a DynamoDB table that the KCL can share: one item per shard, saying which
//! worker processes it ([`Lease::owner`]), whether that worker is alive ([`Lease::counter`],
//! incremented by every renewal) and how far it got ([`Lease::checkpoint`]).
//!
//! - [`model`]: [`Lease`], [`ExtendedSequenceNumber`] and [`SequenceNumber`] (with the KCL's
//!   sentinels and ordering).
//! - [`serializer`]: lease <-> DynamoDB item, attribute names and types exactly as the KCL's
//!   `DynamoDBLeaseSerializer` writes them.
//! - [`table`]: [`LeaseTable`], the conditional reads and writes (create, renew, take, release,
//!   checkpoint, delete), each one `UpdateItem`/`PutItem`/`DeleteItem` guarded by the lease's
//!   counter and owners.
//! - [`dynamo_json`]: items as DynamoDB JSON, for raw dumps and fixtures.
//!
//! Items of other kinds in the table (newer KCL releases keep their leader lock, migration state
//! and worker metrics there) are skipped by [`LeaseTable::list`] and never written.

pub mod dynamo_json;
pub mod model;
pub mod serializer;
pub mod table;

pub use model::{ExtendedSequenceNumber, Lease, SequenceNumber};
pub use table::{DEFAULT_TABLE_WAIT, LeaseListing, LeaseTable, SkippedItem, TableCalls, TableSetup};
