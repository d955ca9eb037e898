//! The delivery pipeline of ktk, one copy for every runtime: user records of a shard become
//! events, duplicates disappear, batches land in every configured [`Sink`], and only then is the
//! runtime told the batch is delivered (the ECS consumer checkpoints; the Lambda answers the event
//! source mapping).
//!
//! # Layout
//! - [`delivery`]: [`Pipeline`] and [`ShardPipeline`], the core both runtimes drive: where batches
//!   are cut, which sink gets what when, retries, and what is counted ([`PipelineStats`]). The
//!   runtime plugs in through [`Acknowledge`].
//! - [`decode`]: a user record to an `events.v1.Event` (protobuf or JSON), or the reason it is a
//!   dead letter. [`dedup`]: the bounded window of recently delivered event ids.
//! - [`sink`]: the [`Sink`] trait, [`SinkReport`], and [`SinkError`] with `is_retryable`.
//! - `s3` (feature `s3`): the S3 sink (Parquet or gzip JSON Lines in hour partitions, written once
//!   with identical bytes on rewrite) and its reader.
//! - `store` (feature `postgres` or `mysql`): the real-time stores, idempotent on `event_id`: the
//!   table they share, and its dialects `postgres` and `mysql` (also at `ktk_pipeline::postgres`
//!   and `ktk_pipeline::mysql`), each behind its own feature.
//! - `settings` (feature `settings`): the `KTK_*` sink settings as flags and variables, shared by
//!   the `consumer` and `bootstrap` binaries, and `SinkSet` to connect them.
//! - [`time`]: Unix milliseconds and UTC civil dates.
//!
//! This crate depends on no runtime: neither the KCL-style worker (`ktk-consumer`) nor Lambda.
#![deny(unsafe_code)]

pub mod decode;
pub mod dedup;
pub mod delivery;
#[cfg(feature = "s3")]
pub mod s3;
#[cfg(feature = "settings")]
pub mod settings;
pub mod sink;
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub mod store;
pub mod time;

#[cfg(feature = "mysql")]
pub use store::mysql;
#[cfg(feature = "postgres")]
pub use store::postgres;

pub use decode::{EventEncoding, decode_event};
pub use delivery::{
    Acknowledge, BatchEnd, ConfigError, DeliveryError, Pipeline, PipelineConfig, PipelineStats, ShardPipeline,
    SinkWrites, UserRecord,
};
pub use sink::{Sink, SinkError, SinkReport, SinkTiming};

use std::time::SystemTime;

use bytes::Bytes;
use ktk_proto::events::v1::Event;

/// One event decoded from a user record, with its position in the stream.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    pub event: Event,
    pub shard_id: String,
    pub sequence_number: String,
    pub sub_sequence_number: u64,
    /// When Kinesis received the record (`ApproximateArrivalTimestamp`).
    pub arrival: Option<SystemTime>,
}

/// A user record that is not a valid event, kept with why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub shard_id: String,
    pub sequence_number: String,
    pub sub_sequence_number: u64,
    pub partition_key: String,
    pub data: Bytes,
    pub reason: String,
    pub arrival: Option<SystemTime>,
}

/// A batch of one shard's events, in shard order, after in-memory dedup; and the dead letters met
/// in the same stretch of the shard. Built from the records alone (never from wall-clock time), so
/// the same stretch of a shard read again after a crash makes the same batch.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    pub stream: String,
    pub shard_id: String,
    pub events: Vec<EventRecord>,
    pub dead_letters: Vec<DeadLetter>,
    /// The first and last user records of the stretch (events and dead letters alike) as
    /// (sequence number, sub-sequence number).
    pub first: (String, u64),
    pub last: (String, u64),
}
