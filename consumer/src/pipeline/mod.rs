//! The delivery pipeline: records become events, duplicates disappear, batches land in every
//! configured [`Sink`], and only then is the shard checkpointed.
//!
//! This module holds the types every part of the pipeline shares: a decoded event with where it
//! came from ([`EventRecord`]), a [`Batch`] of them from one shard, what failed to decode
//! ([`DeadLetter`]), and the [`Sink`] trait the S3 and real-time store sinks implement.

pub mod decode;
pub mod dedup;
pub mod delivery;
pub mod mysql;
pub mod postgres;
pub mod s3;

pub use decode::{EventEncoding, decode_event};
pub use delivery::{DeliveryProcessor, Pipeline, PipelineConfig, PipelineStats};

use std::time::SystemTime;

use bytes::Bytes;
use futures::future::BoxFuture;
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

/// What a sink did with a batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SinkReport {
    /// Events newly stored.
    pub written: u64,
    /// Events the sink already had (idempotent on `event_id`): duplicates.
    pub duplicates: u64,
}

/// Why a sink could not take a batch. The pipeline retries with a backoff and the shard waits;
/// nothing is skipped.
#[derive(Debug, thiserror::Error)]
#[error("sink {sink} failed: {message}")]
pub struct SinkError {
    pub sink: String,
    pub message: String,
    /// False for what retrying cannot mend (a missing bucket, a table with the wrong columns):
    /// still retried, but logged as an error an operator must act on.
    pub retryable: bool,
}

impl SinkError {
    pub fn new(sink: impl Into<String>, message: impl Into<String>, retryable: bool) -> Self {
        SinkError { sink: sink.into(), message: message.into(), retryable }
    }
}

/// When a sink is given events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SinkTiming {
    /// Whole batches, cut at boundaries that depend only on the records, so the same stretch of a
    /// shard read again makes the same batch (S3: the same object, byte for byte).
    #[default]
    Batch,
    /// As soon as records are read, in the pieces they were read in: a real-time store, idempotent
    /// on `event_id`, so a piece written again after a crash only adds duplicates to the count.
    /// The checkpoint still waits for the batch (and so for the batch sinks).
    Immediate,
}

/// Somewhere batches are delivered: written idempotently (writing the same batch twice stores each
/// event once and reports the second time as duplicates), then acknowledged by returning `Ok`.
pub trait Sink: Send + Sync + std::fmt::Debug {
    /// A short name for logs and metrics (`s3`, `postgres`, `mysql`).
    fn name(&self) -> &str;

    /// Whether the sink takes whole batches or events as soon as they are read.
    fn timing(&self) -> SinkTiming {
        SinkTiming::Batch
    }

    /// Writes the batch's events (and, where the sink keeps them, its dead letters).
    fn write<'a>(&'a self, batch: &'a Batch) -> BoxFuture<'a, Result<SinkReport, SinkError>>;
}
