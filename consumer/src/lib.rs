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
//! What the consumer will add on top (issue 4):
//! - the worker loop: shard sync, taking by the taker's plans, renewing, one task per shard that
//!   waits for its parents, reads, processes and checkpoints; KCL-defaulted timings;
//! - retrieval: enhanced fan-out (`SubscribeToShard`) beside polling; throttling backoff in the
//!   shard consumer;
//! - the record-processor trait and the checkpointer (never backwards, only while owning);
//! - metrics, the sink pipeline, and the `consumer` binary.
#![deny(unsafe_code)]

mod backoff;
pub mod error;
pub mod fanout;
pub mod lease;
pub mod lease_renewer;
pub mod lease_taker;
pub mod pipeline;
pub mod processor;
pub mod retrieval;
mod shard_consumer;
pub mod shard_sync;
pub mod worker;

pub use error::{Error, ItemError, Result};
pub use processor::{
    Checkpointer, InitializeInput, ProcessRecordsInput, ProcessorError, ProcessorFactory, RecordProcessor,
};
pub use shard_sync::InitialPosition;
pub use worker::{Worker, WorkerConfig, WorkerReport};
