//! A KCL-style consumer for Amazon Kinesis Data Streams: workers share a stream's shards through
//! leases in DynamoDB, in the KCL's own table layout, so a KCL application's table can be taken
//! over (and read back by the KCL).
//!
//! # Layout
//! What exists so far:
//! - [`lease`]: the lease table. [`Lease`](lease::Lease) and its checkpoint
//!   ([`ExtendedSequenceNumber`](lease::ExtendedSequenceNumber)); the item serializer that matches
//!   the KCL's `DynamoDBLeaseSerializer` attribute for attribute; [`LeaseTable`](lease::LeaseTable)
//!   with `ensure_table`, `list`, `get`, `create_if_absent`, `renew`, `take`, `release`,
//!   `checkpoint` and `delete`, every write conditional on the lease's counter and owners.
//! - [`lease_renewer`]: renews the leases a worker holds and marks a lease lost the moment
//!   another worker has it (or after a failover time without renewal), so its shard stops before
//!   writing anything more; checkpoints go through the held lease; `release_all` hands leases over
//!   on a graceful shutdown.
//! - [`lease_taker`]: which leases a worker takes each cycle: unowned and expired first (expiry
//!   on the local monotonic clock), then from workers above their fair share, several per cycle,
//!   never from a worker at or below its share.
//! - [`retrieval`]: [`ShardReader`](retrieval::ShardReader) reads one shard by polling
//!   `GetRecords`, deaggregates, keeps to the shard's read quota, re-gets expired iterators from
//!   the last delivered record, resumes exactly inside an aggregate, and reports the shard's end
//!   with its children.
//! - [`shard_sync`]: `ListShards` into leases (parents, hash ranges; children at `TRIM_HORIZON`
//!   after their parents, roots at the initial position), [`parents_done`](shard_sync::parents_done)
//!   gating, and cleanup of finished leases of shards past retention.
//! - [`Error`] (`error.rs`): one error enum; lost races ([`Error::is_condition_failure`]) are
//!   told apart from transient failures ([`Error::is_retryable`]).
//!
//! - [`processor`]: the application's [`RecordProcessor`] (made per shard by a
//!   [`ProcessorFactory`]) and the [`Checkpointer`] (conditional on the lease, never backwards,
//!   never past what was delivered).
//! - [`worker`]: the [`Worker`] loop: shard sync, a table scan every second that takes unowned and
//!   expired leases, balancing by hand-off (the owner finishes and checkpoints before the next one
//!   starts), renewals (skipped when a checkpoint just moved the counter), one task per lease, and
//!   a graceful shutdown that releases every lease at once. Timings default to the KCL's.
//! - [`fanout`]: enhanced fan-out (`SubscribeToShard`) beside polling.
//!
//! See `docs/consumer.md` for the design and the measurements.
#![deny(unsafe_code)]

pub mod error;
pub mod fanout;
pub mod lease;
pub mod lease_renewer;
pub mod lease_taker;
pub mod processor;
pub mod retrieval;
mod shard_consumer;
pub mod shard_sync;
pub mod worker;

pub use error::{Error, ItemError, Result};
pub use processor::{
    Checkpointer, InitializeInput, ProcessRecordsInput, ProcessorError, ProcessorFactory, RecordProcessor,
};
pub use retrieval::ConsumerRecord;
pub use shard_sync::InitialPosition;
pub use worker::{Worker, WorkerConfig, WorkerReport};
