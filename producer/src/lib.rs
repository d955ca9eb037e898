//! A KPL-style producer for Amazon Kinesis Data Streams, without the KPL's native daemon.
//!
//! # Layout
//! - [`Producer`] (`producer.rs`): the handle applications hold: `put` (waits for room),
//!   `try_put` (hands the record back when full), `flush`, `shutdown(timeout)`.
//! - [`ProducerConfig`] (`config.rs`): every setting, defaulted as the KPL defaults it.
//! - `engine.rs`: the one task that owns buffered records: per-shard backlogs and windows
//!   (admission), aggregation per predicted shard, collection into `PutRecords` calls, per-shard
//!   rate limits, retries, TTLs, flushes.
//! - `adaptive.rs`: how many `PutRecords` calls may be in flight and how long each may take,
//!   learned from timeouts, throttling and latency (AIMD).
//! - `shard_map.rs`, `limiter.rs`, `limits.rs`: shard prediction, token buckets, the outstanding
//!   limits `put` waits on. Retry delays come from `ktk_backoff`.
//! - [`api`]: the Kinesis calls behind a trait, with retryability decided once per error.
//! - `metrics.rs`: KPL-named metrics through the `metrics` facade.
//! - [`collector`] (feature `collector`, on by default): the HTTP Event API that apps send
//!   `events.v1` batches to, over a `Producer`; the `collector` binary runs it.
//!
//! # Guarantees
//! - Every accepted record's [`PutReceipt`] resolves: with where it landed and every attempt, or
//!   with a [`PutError`] that carries the record back. Nothing is dropped silently.
//! - Memory is bounded by the outstanding records/bytes limits, whatever the put rate. When
//!   Kinesis is slow, records wait in their shard's backlog (their TTL not running) and `put`
//!   waits for room: the caller slows down instead of records expiring.
//! - At least once: a call past its timeout is waited for (its late answer settles its records),
//!   up to twice its timeout; a record whose call was given up on then is sent again, and may be
//!   in the stream twice (`ProducerStats::resent_after_timeout` counts them).
//! - Records of one shard are sent in the order they were put, at most one call per shard at a
//!   time, and a failed record is retried before anything newer of its shard is sent. Kinesis can
//!   still reorder records of one call when only some of them fail;
//!   [`ProducerConfig::with_strict_ordering`] rules that out too.
#![deny(unsafe_code)]

mod adaptive;
pub mod api;
#[cfg(feature = "collector")]
pub mod collector;
mod config;
mod engine;
mod error;
mod limiter;
mod limits;
mod metrics;
mod producer;
mod record;
mod shard_map;

pub use config::{
    PUT_RECORDS_MAX_BYTES, PUT_RECORDS_MAX_RECORDS, ProducerConfig, SHARD_EARLY_FLUSH_BYTES, SHARD_MAX_BYTES_PER_SEC,
    SHARD_MAX_RECORDS_PER_SEC,
};
pub use error::{ConfigError, PutError, PutErrorKind, StartError};
pub use producer::{BatchTaken, Producer, ProducerStats};
pub use record::{Attempt, BatchReceipt, PutOutcome, PutReceipt, Record};
