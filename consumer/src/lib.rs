//! A KCL-style consumer for Amazon Kinesis Data Streams: workers share a stream's shards through
//! leases in DynamoDB, in the KCL's own table layout, so a KCL application's table can be taken
//! over (and read back by the KCL).
//!
//! # Layout
//! - [`worker`](Worker): the [`Worker`] loop and its [`WorkerConfig`]: shard sync, a table scan
//!   every second that takes unowned and expired leases, balancing by hand-off (the owner finishes
//!   and checkpoints before the next one starts) every taking interval and as soon as a new worker
//!   appears in the table, renewals, one shard consumer task per lease (reading the next batch
//!   while the processor works on one), and a graceful shutdown that releases every lease at once.
//!   Timings default to the KCL's. The worker's [`WorkerStatus`] (leases held and free, the latest
//!   lease-table scan, the outcome of its Kinesis calls) tells a health check why it is unhealthy
//!   ([`WorkerSnapshot::unhealthy_reasons`]).
//! - [`lease`]: the lease model and its KCL-compatible item layout, the [`LeaseTable`](lease::LeaseTable)
//!   (every write conditional on the lease's counter and owners), the taker, the
//!   [`LeaseRenewer`](lease::LeaseRenewer) and the [`ShardSyncer`](lease::ShardSyncer) (leases for
//!   new shards, children gated on their parents).
//! - [`retrieval`]: reading one shard, by polling ([`ShardReader`](retrieval::ShardReader)) or
//!   enhanced fan-out ([`FanOutReader`](retrieval::FanOutReader), [`register_consumer`](retrieval::register_consumer)),
//!   either behind [`Reader`](retrieval::Reader); deaggregation and exact resumption inside an
//!   aggregate.
//! - `processor`: the application's [`RecordProcessor`] (made per shard by a [`ProcessorFactory`])
//!   and the [`Checkpointer`] (conditional on the lease, never backwards, never past what was
//!   delivered).
//! - `error`: the crate's one [`Error`], with [`Error::is_retryable`] and
//!   [`Error::is_condition_failure`] (a lost race on the lease table).
//!
//! # How a record flows
//! A reader takes a batch of records from its shard (after the lease's checkpoint) and hands it to
//! the worker's shard consumer for that lease; the shard consumer gives the batch to the
//! application's [`RecordProcessor`]; the processor checkpoints through the [`Checkpointer`] once
//! the batch is durable, which writes the position to the lease table, conditional on this worker
//! still holding the lease. At the shard's end the processor checkpoints `SHARD_END` and the
//! shard's children start.
//!
//! The AWS calls go through narrow seams (the Kinesis reads and the lease table's item
//! operations), so the worker's timing logic is unit-tested in process with fakes and paused time.
//! See `docs/consumer.md` for the design and the measurements.
#![deny(unsafe_code)]

mod error;
pub mod lease;
mod processor;
pub mod retrieval;
mod worker;

#[cfg(test)]
mod tests;

pub use error::{Error, ItemError, Result};
pub use lease::InitialPosition;
pub use processor::{
    Checkpointer, InitializeInput, ProcessRecordsInput, ProcessorError, ProcessorFactory, RecordProcessor,
};
pub use retrieval::{ConsumerRecord, RegistrationError, RetrievalError};
pub use worker::{CallHealth, Worker, WorkerConfig, WorkerReport, WorkerSnapshot, WorkerStatus};
