//! The delivery core, one copy for every runtime: user records of one shard in, batches in every
//! [`Sink`] out, and a call to the runtime's [`Acknowledge::batch_delivered`] after each batch.
//!
//! The ECS consumer (`ktk-ecs`) drives a [`ShardPipeline`] from a KCL-style record processor and
//! checkpoints in the lease table when a batch is delivered; the Lambda (`ktk-lambda`) drives one
//! per shard from an event source mapping's batch and answers with the first record it could not
//! deliver. Everything in between (decoding, dedup, where batches are cut, which sink gets what
//! when, retries, what is counted) lives here, so both runtimes deliver and count a stream the same
//! way.
//!
//! # Batch boundaries
//! A batch is one shard's records whose Kinesis arrival times fall in the same window (default one
//! minute, aligned to the epoch), cut further so it holds at most `max_batch_records` user records
//! and `max_batch_bytes` bytes of their data. Batches are cut only between Kinesis records, never
//! inside a KPL aggregate (an aggregate larger than a limit is a batch of its own), so a batch's
//! first record is always a whole Kinesis record: what a Lambda names in `batchItemFailures`.
//! A batch is written when the next Kinesis record belongs to another window or would pass a limit,
//! when the shard ends, when the runtime says the reader is caught up and the window closed a grace
//! period ago (arrival times grow with sequence numbers in a shard, so nothing more can fall in
//! it), and on Lambda at the end of each invocation. The same stretch of a shard read again (after
//! a crash, a hand-off or a retried invocation) therefore makes the same batches, and an S3 sink
//! writes the same objects with the same bytes.
//!
//! # Real-time stores
//! Sinks whose [`SinkTiming`] is `Immediate` (the PostgreSQL and MySQL stores) are not made to
//! wait for the batch: the events of every read are written to them as soon as they are decoded
//! and deduplicated. The acknowledgement of a batch still comes only after every sink holds all of
//! it. A piece written again after a crash is absorbed by the store's idempotence.
//!
//! # Dedup and what is counted
//! Two layers: in memory, and sinks that are idempotent on `event_id`.
//! - An event id met twice within a batch is dropped from it (`duplicates_in_memory`).
//! - An event id among the last delivered events of this shard (a bounded [`DedupWindow`], which a
//!   Lambda container keeps across warm invocations) stays in the batch but is not sent to the
//!   immediate sinks, and is counted in `duplicates_in_memory`. The window depends on the process's
//!   history, which a new owner of the shard does not share, so it must not change the batch: S3
//!   objects stay the same bytes whoever writes them.
//! - `duplicates_in_sinks` counts, per batch, the events that **every** sink already had (the
//!   fewest any one sink reported). An event that one sink stored for the first time is delivered.
//! - `events_delivered` = events of the batch − window hits − sink duplicates.
//!
//! Every duplicate has a cause ([`DuplicateCause`], the `cause` label of `DuplicatesDropped`):
//! **resent**, the same event in another Kinesis record (a client or producer sent it again), or
//! **reread**, the same Kinesis record read again (a retried Lambda invocation, a hand-off, a
//! restart after a crash). Within a batch and in the window the position of the first copy tells
//! them apart; the sinks tell them apart by where the copy they hold was read from
//! ([`SinkReport::reread`]). `duplicates_reread` counts the second kind; a failover that re-reads
//! a stretch of a shard shows there, and resent events show in the rest.
//!
//! # Delivery delay
//! Each write that stores something new records, per event of the write, the seconds from the
//! collector's receipt (`received_at_ms`; events without it are skipped) to the write's success in
//! the histogram `DeliveryDelaySeconds{stream, sink}`.
//!
//! # Failures
//! A failed sink write is retried with the workspace's jittered backoff for as long as the
//! runtime's [`Acknowledge::may_retry`] allows: the ECS consumer until it works or the lease leaves
//! the worker; the Lambda while attempts and the invocation's time last. When the runtime gives up,
//! the pending batch is abandoned ([`ShardPipeline::abandon`]) and read again from its first record
//! by whoever reads the shard next. Nothing is ever skipped.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use ktk_backoff::Backoff;
use tracing::{error, warn};

use crate::decode::{EventEncoding, decode_event};
use crate::dedup::{DedupWindow, DuplicateCause, position_digest};
use crate::sink::{Sink, SinkError, SinkReport, SinkTiming};
use crate::time::unix_millis;
use crate::{Batch, DeadLetter, EventRecord};

/// One user record of a shard, as the runtime read it (deaggregated; a plain Kinesis record is one
/// user record with sub-sequence number 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    pub sequence_number: String,
    pub sub_sequence_number: u64,
    pub partition_key: String,
    pub data: Bytes,
    /// When Kinesis received its record (`ApproximateArrivalTimestamp`).
    pub arrival: Option<SystemTime>,
}

/// A setting of [`PipelineConfig`] that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("{setting} must be at least {minimum}")]
    TooSmall { setting: &'static str, minimum: &'static str },
    #[error("no sink: a pipeline needs at least one")]
    NoSink,
}

/// How the pipeline batches, decodes, deduplicates and retries. Every runtime uses the same
/// defaults, so a stream is batched the same way on ECS and on Lambda.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineConfig {
    encoding: EventEncoding,
    max_batch_records: usize,
    max_batch_bytes: usize,
    batch_window: Duration,
    window_grace: Duration,
    dedup_window: usize,
    retry_min: Duration,
    retry_max: Duration,
}

impl Default for PipelineConfig {
    /// Events encoded as protobuf or JSON (told apart per record); batches of at most 10,000 user
    /// records and 16 MiB within one-minute arrival windows closed 5 s after their end; the ids of
    /// the last 100,000 events of each shard remembered; sink retries from 100 ms to 30 s apart.
    fn default() -> Self {
        PipelineConfig {
            encoding: EventEncoding::Auto,
            max_batch_records: 10_000,
            max_batch_bytes: 16 << 20,
            batch_window: Duration::from_secs(60),
            window_grace: Duration::from_secs(5),
            dedup_window: 100_000,
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(30),
        }
    }
}

impl PipelineConfig {
    pub fn with_encoding(mut self, encoding: EventEncoding) -> Self {
        self.encoding = encoding;
        self
    }

    /// At most this many user records in a batch (events, duplicates and dead letters alike;
    /// at least 1), unless one Kinesis record alone holds more.
    pub fn with_max_batch_records(mut self, records: usize) -> Self {
        self.max_batch_records = records;
        self
    }

    /// At most this many bytes of user record data in a batch (at least 1), unless one Kinesis
    /// record alone holds more.
    pub fn with_max_batch_bytes(mut self, bytes: usize) -> Self {
        self.max_batch_bytes = bytes;
        self
    }

    /// The arrival-time window batches are cut on (at least 1 ms), and how long after its end a
    /// window is closed when the reader is caught up.
    pub fn with_batch_window(mut self, window: Duration, grace: Duration) -> Self {
        self.batch_window = window;
        self.window_grace = grace;
        self
    }

    /// How many recent event ids per shard the in-memory dedup remembers (0 turns it off).
    pub fn with_dedup_window(mut self, ids: usize) -> Self {
        self.dedup_window = ids;
        self
    }

    /// Backoff between attempts to write a batch to a failing sink.
    pub fn with_retry_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.retry_min = min;
        self.retry_max = max;
        self
    }

    pub fn encoding(&self) -> EventEncoding {
        self.encoding
    }

    pub fn max_batch_records(&self) -> usize {
        self.max_batch_records
    }

    pub fn max_batch_bytes(&self) -> usize {
        self.max_batch_bytes
    }

    pub fn batch_window(&self) -> (Duration, Duration) {
        (self.batch_window, self.window_grace)
    }

    pub fn dedup_window(&self) -> usize {
        self.dedup_window
    }

    /// Every limit that must be at least 1 is.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_batch_records == 0 {
            return Err(ConfigError::TooSmall { setting: "max_batch_records", minimum: "1" });
        }
        if self.max_batch_bytes == 0 {
            return Err(ConfigError::TooSmall { setting: "max_batch_bytes", minimum: "1" });
        }
        if self.batch_window < Duration::from_millis(1) {
            return Err(ConfigError::TooSmall { setting: "batch_window", minimum: "1 ms" });
        }
        Ok(())
    }

    fn window_millis(&self) -> i64 {
        i64::try_from(self.batch_window.as_millis()).unwrap_or(i64::MAX).max(1)
    }
}

/// Counts over every shard of a pipeline (or, from [`ShardPipeline::stats`], of one shard).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PipelineStats {
    /// Events written (acknowledged by every sink), duplicates excluded.
    pub events_delivered: u64,
    /// Duplicates dropped in memory: within a batch, or known to the shard's dedup window.
    pub duplicates_in_memory: u64,
    /// Events every sink already had (per batch, the fewest any one sink reported).
    pub duplicates_in_sinks: u64,
    /// Of the duplicates of both layers, those that were the same Kinesis record read again
    /// ([`DuplicateCause::Reread`]); the rest were sent again ([`duplicates_resent`](Self::duplicates_resent)).
    pub duplicates_reread: u64,
    /// Records that are not valid events, delivered as dead letters.
    pub dead_letters: u64,
    /// Batches every sink acknowledged.
    pub batches: u64,
    /// Failed sink writes (each retried or handed back to the runtime).
    pub sink_errors: u64,
}

impl PipelineStats {
    /// Every duplicate dropped, by either layer.
    pub fn duplicates(&self) -> u64 {
        self.duplicates_in_memory + self.duplicates_in_sinks
    }

    /// Duplicates that were the same event in another Kinesis record ([`DuplicateCause::Resent`]).
    pub fn duplicates_resent(&self) -> u64 {
        self.duplicates().saturating_sub(self.duplicates_reread)
    }

    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &PipelineStats) {
        self.events_delivered += other.events_delivered;
        self.duplicates_in_memory += other.duplicates_in_memory;
        self.duplicates_in_sinks += other.duplicates_in_sinks;
        self.duplicates_reread += other.duplicates_reread;
        self.dead_letters += other.dead_letters;
        self.batches += other.batches;
        self.sink_errors += other.sink_errors;
    }

    /// What happened between `earlier` (a snapshot of the same counts) and `self`.
    pub fn since(&self, earlier: &PipelineStats) -> PipelineStats {
        PipelineStats {
            events_delivered: self.events_delivered.saturating_sub(earlier.events_delivered),
            duplicates_in_memory: self.duplicates_in_memory.saturating_sub(earlier.duplicates_in_memory),
            duplicates_in_sinks: self.duplicates_in_sinks.saturating_sub(earlier.duplicates_in_sinks),
            duplicates_reread: self.duplicates_reread.saturating_sub(earlier.duplicates_reread),
            dead_letters: self.dead_letters.saturating_sub(earlier.dead_letters),
            batches: self.batches.saturating_sub(earlier.batches),
            sink_errors: self.sink_errors.saturating_sub(earlier.sink_errors),
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    events_delivered: AtomicU64,
    duplicates_in_memory: AtomicU64,
    duplicates_in_sinks: AtomicU64,
    duplicates_reread: AtomicU64,
    dead_letters: AtomicU64,
    batches: AtomicU64,
    sink_errors: AtomicU64,
    /// The outcome of the latest writes of each sink, by name: touched once per write attempt.
    writes: std::sync::Mutex<Vec<SinkWrites>>,
}

/// When a sink last succeeded and failed ([`Pipeline::sink_writes`]): what a health check needs
/// to tell a sink that keeps failing from one that failed once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkWrites {
    /// The sink's name (`s3`, `postgres`, `mysql`).
    pub sink: String,
    /// The latest successful write.
    pub last_success: Option<std::time::Instant>,
    /// The first failed write since the latest success; `None` while the latest write succeeded.
    pub failing_since: Option<std::time::Instant>,
    /// The latest failed write's error.
    pub last_error: Option<String>,
}

impl Counters {
    fn record_write(&self, sink: &str, outcome: Result<(), &SinkError>) {
        let now = std::time::Instant::now();
        // A poisoned lock only means another writer panicked mid-update of plain data.
        let mut writes = self.writes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = match writes.iter().position(|w| w.sink == sink) {
            Some(i) => &mut writes[i],
            None => {
                writes.push(SinkWrites {
                    sink: sink.to_owned(),
                    last_success: None,
                    failing_since: None,
                    last_error: None,
                });
                let last = writes.len() - 1;
                &mut writes[last]
            }
        };
        match outcome {
            Ok(()) => {
                entry.last_success = Some(now);
                entry.failing_since = None;
            }
            Err(error) => {
                entry.failing_since.get_or_insert(now);
                entry.last_error = Some(error.to_string());
            }
        }
    }
}

impl Counters {
    fn add(&self, s: &PipelineStats) {
        self.events_delivered.fetch_add(s.events_delivered, Ordering::Relaxed);
        self.duplicates_in_memory.fetch_add(s.duplicates_in_memory, Ordering::Relaxed);
        self.duplicates_in_sinks.fetch_add(s.duplicates_in_sinks, Ordering::Relaxed);
        self.duplicates_reread.fetch_add(s.duplicates_reread, Ordering::Relaxed);
        self.dead_letters.fetch_add(s.dead_letters, Ordering::Relaxed);
        self.batches.fetch_add(s.batches, Ordering::Relaxed);
        self.sink_errors.fetch_add(s.sink_errors, Ordering::Relaxed);
    }

    fn snapshot(&self) -> PipelineStats {
        PipelineStats {
            events_delivered: self.events_delivered.load(Ordering::Relaxed),
            duplicates_in_memory: self.duplicates_in_memory.load(Ordering::Relaxed),
            duplicates_in_sinks: self.duplicates_in_sinks.load(Ordering::Relaxed),
            duplicates_reread: self.duplicates_reread.load(Ordering::Relaxed),
            dead_letters: self.dead_letters.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            sink_errors: self.sink_errors.load(Ordering::Relaxed),
        }
    }
}

/// Why a shard's delivery stopped. The pending batch is then abandoned by the runtime and read
/// again from its first record.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeliveryError {
    /// A sink failed and the runtime stopped retrying it (the reason says why: the lease left the
    /// worker, no attempts or time left, an error an operator must mend).
    #[error("{error}; not retried further: {reason}")]
    SinkGaveUp { error: SinkError, reason: String },
    /// The runtime could not record a delivered batch (e.g. the checkpoint write failed).
    #[error("the delivered batch could not be acknowledged: {0}")]
    Acknowledge(Box<dyn std::error::Error + Send + Sync>),
}

/// Where a batch ends: its last user record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchEnd {
    pub sequence_number: String,
    pub sub_sequence_number: u64,
}

/// What the runtime decides around delivery: how long to keep retrying, and what "delivered"
/// makes durable (a checkpoint in the lease table; the Lambda's answer to the mapping).
pub trait Acknowledge: Send {
    /// After `attempt` failed writes of one batch (or piece) to one sink: `Ok(())` to wait `pause`
    /// and try again, `Err(reason)` to stop.
    fn may_retry(&self, attempt: u32, error: &SinkError, pause: Duration) -> Result<(), String>;

    /// How long one sink write may take (the Lambda's time left); `None` leaves it to the sink's
    /// own write timeout.
    fn time_left(&self) -> Option<Duration> {
        None
    }

    /// Every sink holds the batch that ends at `end`.
    fn batch_delivered(&mut self, end: &BatchEnd) -> impl Future<Output = Result<(), DeliveryError>> + Send;
}

/// The pipeline of one application: its configuration, sinks and counts; makes a
/// [`ShardPipeline`] per shard.
#[derive(Debug, Clone)]
pub struct Pipeline {
    config: Arc<PipelineConfig>,
    sinks: Arc<[Arc<dyn Sink>]>,
    counters: Arc<Counters>,
}

impl Pipeline {
    /// A pipeline that delivers to `sinks` (at least one), configured by a valid `config`.
    pub fn new(config: PipelineConfig, sinks: Vec<Arc<dyn Sink>>) -> Result<Self, ConfigError> {
        config.validate()?;
        if sinks.is_empty() {
            return Err(ConfigError::NoSink);
        }
        Ok(Pipeline { config: Arc::new(config), sinks: sinks.into(), counters: Arc::default() })
    }

    pub fn config(&self) -> &PipelineConfig {
        &self.config
    }

    /// The sinks' names (`s3`, `postgres`, `mysql`), in delivery order.
    pub fn sink_names(&self) -> impl Iterator<Item = &str> {
        self.sinks.iter().map(|sink| sink.name())
    }

    /// The delivery state of one shard of `stream`.
    pub fn shard(&self, stream: &str, shard_id: &str) -> ShardPipeline {
        ShardPipeline {
            stream: stream.to_owned(),
            shard_id: shard_id.to_owned(),
            config: Arc::clone(&self.config),
            sinks: Arc::clone(&self.sinks),
            counters: Arc::clone(&self.counters),
            window: DedupWindow::new(self.config.dedup_window),
            pending: None,
            stats: PipelineStats::default(),
        }
    }

    /// Counts over every shard since the pipeline was made.
    pub fn stats(&self) -> PipelineStats {
        self.counters.snapshot()
    }

    /// When each sink that was written to last succeeded and since when it has been failing.
    pub fn sink_writes(&self) -> Vec<SinkWrites> {
        self.counters.writes.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

/// The batch being filled.
#[derive(Debug)]
struct Pending {
    batch: Batch,
    /// The arrival window of its first record (milliseconds since the epoch / window).
    window: i64,
    records: usize,
    bytes: usize,
    /// The batch's event ids, each with the position digest of its first copy.
    ids: HashMap<String, u64>,
    /// Dropped within the batch (an id met twice in it), and of those, the same record twice.
    duplicates: u64,
    duplicates_reread: u64,
    /// Per event of the batch: whether the dedup window knew its id (delivered in an earlier batch).
    seen: Vec<bool>,
    seen_count: u64,
    /// Of `seen_count`, the events the window knew from the same position.
    seen_reread: u64,
    /// How many of the batch's events and dead letters the immediate sinks already have.
    sent_events: usize,
    sent_dead_letters: usize,
    /// Duplicates reported by each sink (by index) for the pieces of this batch, and of those,
    /// the ones the sink holds from the same position.
    sink_duplicates: Vec<u64>,
    sink_reread: Vec<u64>,
}

/// The delivery state of one shard: the batch being filled and the dedup window (see the module's
/// notes).
#[derive(Debug)]
pub struct ShardPipeline {
    stream: String,
    shard_id: String,
    config: Arc<PipelineConfig>,
    sinks: Arc<[Arc<dyn Sink>]>,
    counters: Arc<Counters>,
    window: DedupWindow,
    pending: Option<Pending>,
    stats: PipelineStats,
}

impl ShardPipeline {
    pub fn shard_id(&self) -> &str {
        &self.shard_id
    }

    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// Counts of this shard since it was made.
    pub fn stats(&self) -> PipelineStats {
        self.stats
    }

    /// The sequence number of the first Kinesis record of the batch being filled: where the shard
    /// must be read again from if the batch is abandoned.
    pub fn pending_start(&self) -> Option<&str> {
        self.pending.as_ref().map(|p| p.batch.first.0.as_str())
    }

    /// Drops the batch being filled (the runtime reads its records again from
    /// [`pending_start`](Self::pending_start), or leaves them to the next owner). The dedup window
    /// holds only delivered events, so it stays.
    pub fn abandon(&mut self) {
        self.pending = None;
    }

    /// Takes one read's user records, in shard order: adds them to the pending batch, delivers
    /// every batch they complete (acknowledging each), then gives the immediate sinks what they do
    /// not have yet of the pending batch.
    pub async fn process<A: Acknowledge>(
        &mut self,
        records: Vec<UserRecord>,
        ack: &mut A,
    ) -> Result<(), DeliveryError> {
        let mut records = records.into_iter().peekable();
        let mut group = Vec::new();
        while let Some(first) = records.next() {
            // One Kinesis record: its user records share a sequence number.
            group.clear();
            let sequence_number = first.sequence_number.clone();
            group.push(first);
            while let Some(next) = records.next_if(|r| r.sequence_number == sequence_number) {
                group.push(next);
            }
            let window = group[0].arrival.map(|t| unix_millis(t).div_euclid(self.config.window_millis()));
            let bytes: usize = group.iter().map(|r| r.data.len()).sum();
            if self.cuts(group.len(), bytes, window) {
                self.flush(ack).await?;
            }
            for record in group.drain(..) {
                self.add(record, window);
            }
        }
        self.send_immediate(ack).await
    }

    /// Delivers the pending batch if its arrival window closed (its end plus the grace) by `now`.
    /// Call it when the reader is caught up with the shard: nothing more can arrive in the window.
    pub async fn flush_if_window_closed<A: Acknowledge>(
        &mut self,
        now: SystemTime,
        ack: &mut A,
    ) -> Result<(), DeliveryError> {
        if self.window_closed(now) { self.flush(ack).await } else { Ok(()) }
    }

    /// Whether the pending batch's arrival window closed by `now`.
    pub fn window_closed(&self, now: SystemTime) -> bool {
        self.pending.as_ref().is_some_and(|p| {
            let width = self.config.window_millis();
            let grace = i64::try_from(self.config.window_grace.as_millis()).unwrap_or(i64::MAX);
            unix_millis(now) >= (p.window.saturating_add(1)).saturating_mul(width).saturating_add(grace)
        })
    }

    /// Makes sure every sink has the pending batch (the rest of it to the immediate sinks, all of
    /// it to the batch sinks), then acknowledges its end. Nothing pending: nothing to do.
    pub async fn flush<A: Acknowledge>(&mut self, ack: &mut A) -> Result<(), DeliveryError> {
        self.send_immediate(ack).await?;
        let Some(mut pending) = self.pending.take() else { return Ok(()) };
        let (failures, result) = {
            let batch = &pending.batch;
            let ack = &*ack;
            let (config, shard) = ((&*self.config, &*self.counters), &self.shard_id);
            let writes =
                self.sinks.iter().enumerate().filter(|(_, s)| s.timing() == SinkTiming::Batch).map(
                    |(i, sink)| async move { (i, write_until_done(sink.as_ref(), batch, ack, config, shard).await) },
                );
            let mut failures = 0;
            let mut result = Ok(());
            for (i, (report, errors)) in futures::future::join_all(writes).await {
                failures += errors;
                match report {
                    // The window's events are in the batch (and so in what a batch sink reports as
                    // already stored) but counted by the window.
                    Ok(report) => {
                        pending.sink_duplicates[i] += report.duplicates.saturating_sub(pending.seen_count);
                        pending.sink_reread[i] += report.reread.saturating_sub(pending.seen_count);
                    }
                    Err(e) => result = result.and(Err(e)),
                }
            }
            (failures, result)
        };
        self.count_errors(failures);
        let end = BatchEnd { sequence_number: pending.batch.last.0.clone(), sub_sequence_number: pending.batch.last.1 };
        if let Err(e) = match result {
            Ok(()) => ack.batch_delivered(&end).await,
            Err(e) => Err(e),
        } {
            // Not delivered everywhere, or not acknowledged: the batch stays pending, for the
            // runtime to abandon and read again.
            self.pending = Some(pending);
            return Err(e);
        }
        let batch = &pending.batch;
        for event in &batch.events {
            self.window
                .insert(&event.event.event_id, position_digest(&event.sequence_number, event.sub_sequence_number));
        }
        let sink_duplicates = pending.sink_duplicates.iter().copied().min().unwrap_or(0);
        let sink_reread = pending.sink_reread.iter().copied().min().unwrap_or(0).min(sink_duplicates);
        let done = PipelineStats {
            events_delivered: (batch.events.len() as u64).saturating_sub(pending.seen_count + sink_duplicates),
            duplicates_in_memory: pending.duplicates + pending.seen_count,
            duplicates_in_sinks: sink_duplicates,
            duplicates_reread: pending.duplicates_reread + pending.seen_reread + sink_reread,
            dead_letters: batch.dead_letters.len() as u64,
            batches: 1,
            sink_errors: 0,
        };
        self.stats.add(&done);
        self.counters.add(&done);
        let labels = [("stream", self.stream.clone()), ("shard", self.shard_id.clone())];
        metrics::counter!("EventsDelivered", &labels).increment(done.events_delivered);
        for (cause, count) in
            [(DuplicateCause::Resent, done.duplicates_resent()), (DuplicateCause::Reread, done.duplicates_reread)]
        {
            let labels = [labels[0].clone(), labels[1].clone(), ("cause", cause.label().to_owned())];
            metrics::counter!("DuplicatesDropped", &labels).increment(count);
        }
        metrics::counter!("DeadLetters", &labels).increment(done.dead_letters);
        Ok(())
    }

    /// Adds failed writes to this shard's counts (the pipeline's counted each as it happened).
    fn count_errors(&mut self, errors: u64) {
        self.stats.sink_errors += errors;
    }

    /// Whether a Kinesis record of `records` user records and `bytes` bytes in arrival window
    /// `window` starts a new batch.
    fn cuts(&self, records: usize, bytes: usize, window: Option<i64>) -> bool {
        self.pending.as_ref().is_some_and(|p| {
            window.is_some_and(|w| w != p.window)
                || p.records + records > self.config.max_batch_records
                || p.bytes + bytes > self.config.max_batch_bytes
        })
    }

    fn add(&mut self, record: UserRecord, window: Option<i64>) {
        let position = (record.sequence_number.clone(), record.sub_sequence_number);
        let pending = self.pending.get_or_insert_with(|| Pending {
            batch: Batch {
                stream: self.stream.clone(),
                shard_id: self.shard_id.clone(),
                first: position.clone(),
                ..Batch::default()
            },
            window: window.unwrap_or(0),
            records: 0,
            bytes: 0,
            ids: HashMap::new(),
            duplicates: 0,
            duplicates_reread: 0,
            seen: Vec::new(),
            seen_count: 0,
            seen_reread: 0,
            sent_events: 0,
            sent_dead_letters: 0,
            sink_duplicates: vec![0; self.sinks.len()],
            sink_reread: vec![0; self.sinks.len()],
        });
        pending.records += 1;
        pending.bytes += record.data.len();
        pending.batch.last = position;
        match decode_event(&record.data, self.config.encoding) {
            Ok(event) => {
                let digest = position_digest(&record.sequence_number, record.sub_sequence_number);
                if let Some(&first) = pending.ids.get(&event.event_id) {
                    pending.duplicates += 1;
                    pending.duplicates_reread += u64::from(first == digest);
                    return;
                }
                pending.ids.insert(event.event_id.clone(), digest);
                let seen = self.window.check(&event.event_id, digest);
                pending.seen.push(seen.is_some());
                pending.seen_count += u64::from(seen.is_some());
                pending.seen_reread += u64::from(seen == Some(DuplicateCause::Reread));
                pending.batch.events.push(EventRecord {
                    event,
                    shard_id: self.shard_id.clone(),
                    sequence_number: record.sequence_number,
                    sub_sequence_number: record.sub_sequence_number,
                    arrival: record.arrival,
                });
            }
            Err(reason) => pending.batch.dead_letters.push(DeadLetter {
                // A record with the KPL magic reached here only because it was not a valid
                // aggregate (the reader delivered it whole, as a plain record): say so.
                reason: if record.data.starts_with(&ktk_proto::aggregation::MAGIC) {
                    format!("not a valid KPL aggregate, read as a plain record: {reason}")
                } else {
                    reason
                },
                shard_id: self.shard_id.clone(),
                sequence_number: record.sequence_number,
                sub_sequence_number: record.sub_sequence_number,
                partition_key: record.partition_key,
                data: record.data,
                arrival: record.arrival,
            }),
        }
    }

    /// Writes what the immediate sinks do not have yet of the pending batch to them.
    async fn send_immediate<A: Acknowledge>(&mut self, ack: &A) -> Result<(), DeliveryError> {
        if !self.sinks.iter().any(|s| s.timing() == SinkTiming::Immediate) {
            return Ok(());
        }
        let Some(pending) = self.pending.as_ref() else { return Ok(()) };
        let (events, dead) = (pending.sent_events, pending.sent_dead_letters);
        if events == pending.batch.events.len() && dead == pending.batch.dead_letters.len() {
            return Ok(());
        }
        let fresh = pending.batch.events[events..].iter().zip(&pending.seen[events..]);
        let piece = Batch {
            stream: pending.batch.stream.clone(),
            shard_id: pending.batch.shard_id.clone(),
            events: fresh.filter(|(_, seen)| !**seen).map(|(e, _)| e.clone()).collect(),
            dead_letters: pending.batch.dead_letters[dead..].to_vec(),
            first: pending.batch.first.clone(),
            last: pending.batch.last.clone(),
        };
        let (config, shard) = ((&*self.config, &*self.counters), &self.shard_id);
        let writes =
            self.sinks.iter().enumerate().filter(|(_, s)| s.timing() == SinkTiming::Immediate).map(|(i, sink)| {
                let piece = &piece;
                async move { (i, write_until_done(sink.as_ref(), piece, ack, config, shard).await) }
            });
        let results = futures::future::join_all(writes).await;
        let mut failures = 0;
        let mut duplicates = Vec::with_capacity(results.len());
        let mut result = Ok(());
        for (i, (report, errors)) in results {
            failures += errors;
            match report {
                Ok(report) => duplicates.push((i, report.duplicates, report.reread)),
                Err(e) => result = result.and(Err(e)),
            }
        }
        self.count_errors(failures);
        result?;
        if let Some(pending) = self.pending.as_mut() {
            for (i, d, reread) in duplicates {
                pending.sink_duplicates[i] += d;
                pending.sink_reread[i] += reread;
            }
            pending.sent_events = pending.batch.events.len();
            pending.sent_dead_letters = pending.batch.dead_letters.len();
        }
        Ok(())
    }
}

/// Records, for every event of `batch` that has a receipt time, the seconds from the collector's
/// receipt to now in `DeliveryDelaySeconds{stream, sink}` (a clock behind the collector's counts
/// as no delay).
fn record_delivery_delay(sink: &str, batch: &Batch) {
    let now = unix_millis(SystemTime::now());
    let histogram =
        metrics::histogram!("DeliveryDelaySeconds", "stream" => batch.stream.clone(), "sink" => sink.to_owned());
    for record in &batch.events {
        let received = record.event.received_at_ms;
        if received > 0 {
            histogram.record(now.saturating_sub(received).max(0) as f64 / 1000.0);
        }
    }
}

/// Writes `batch` to one sink, retrying while the runtime allows; the outcome and the number of
/// failed attempts. Each failure is counted in the pipeline's counters at once, so `/health` shows
/// a sink that keeps failing while the shard waits on it.
async fn write_until_done<A: Acknowledge>(
    sink: &dyn Sink,
    batch: &Batch,
    ack: &A,
    (config, counters): (&PipelineConfig, &Counters),
    shard: &str,
) -> (Result<SinkReport, DeliveryError>, u64) {
    let mut backoff = Backoff::new(config.retry_min, config.retry_max);
    let mut errors = 0;
    loop {
        let outcome = match ack.time_left() {
            Some(left) if left.is_zero() => {
                // Nothing was attempted, so nothing failed: not a sink error.
                let error = SinkError::timed_out(sink.name(), left, "no time left to write the batch".to_owned());
                let reason = "no time left in the runtime's budget".to_owned();
                return (Err(DeliveryError::SinkGaveUp { error, reason }), errors);
            }
            Some(left) => match tokio::time::timeout(left, sink.write(batch)).await {
                Ok(outcome) => outcome,
                Err(_) => Err(SinkError::timed_out(sink.name(), left, "the write was abandoned".to_owned())),
            },
            None => sink.write(batch).await,
        };
        let error = match outcome {
            Ok(report) => {
                counters.record_write(sink.name(), Ok(()));
                if report.written > 0 {
                    record_delivery_delay(sink.name(), batch);
                }
                return (Ok(report), errors);
            }
            Err(e) => e,
        };
        counters.record_write(sink.name(), Err(&error));
        errors += 1;
        counters.sink_errors.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("SinkErrors", "stream" => batch.stream.clone(), "sink" => sink.name().to_owned())
            .increment(1);
        let pause = backoff.next_delay();
        if let Err(reason) = ack.may_retry(backoff.attempts(), &error, pause) {
            warn!(%shard, sink = sink.name(), error = %error, %reason, "sink write failed; not retried here");
            return (Err(DeliveryError::SinkGaveUp { error, reason }), errors);
        }
        if error.is_retryable() {
            warn!(%shard, sink = sink.name(), error = %error, "sink write failed; the shard waits and retries");
        } else {
            error!(%shard, sink = sink.name(), error = %error, "sink write failed and needs an operator; the shard waits and retries");
        }
        tokio::time::sleep(pause).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::UNIX_EPOCH;

    use futures::future::BoxFuture;
    use ktk_proto::events::v1::Event;
    use prost::Message as _;

    use super::*;

    /// Keeps what it is given; idempotent on event ids; refuses its first `fail` writes.
    #[derive(Debug, Default)]
    struct MemorySink {
        timing: SinkTiming,
        fail: Mutex<u32>,
        batches: Mutex<Vec<Batch>>,
        /// Event id to the position it was first stored from.
        stored: Mutex<HashMap<String, (String, u64)>>,
    }

    impl MemorySink {
        fn new(timing: SinkTiming) -> Arc<Self> {
            Arc::new(MemorySink { timing, ..MemorySink::default() })
        }

        fn event_ids(&self) -> Vec<Vec<String>> {
            let batches = self.batches.lock().expect("lock");
            batches.iter().map(|b| b.events.iter().map(|e| e.event.event_id.clone()).collect()).collect()
        }
    }

    impl Sink for MemorySink {
        fn name(&self) -> &str {
            if self.timing == SinkTiming::Batch { "batch" } else { "immediate" }
        }

        fn timing(&self) -> SinkTiming {
            self.timing
        }

        fn write<'a>(&'a self, batch: &'a Batch) -> BoxFuture<'a, Result<SinkReport, SinkError>> {
            Box::pin(async move {
                {
                    let mut fail = self.fail.lock().expect("lock");
                    if *fail > 0 {
                        *fail -= 1;
                        return Err(SinkError::unavailable(self.name(), "refused on purpose"));
                    }
                }
                let mut stored = self.stored.lock().expect("lock");
                let (mut duplicates, mut reread) = (0, 0);
                for e in &batch.events {
                    let position = (e.sequence_number.clone(), e.sub_sequence_number);
                    match stored.get(&e.event.event_id) {
                        Some(first) => {
                            duplicates += 1;
                            reread += u64::from(*first == position);
                        }
                        None => {
                            stored.insert(e.event.event_id.clone(), position);
                        }
                    }
                }
                self.batches.lock().expect("lock").push(batch.clone());
                Ok(SinkReport { written: batch.events.len() as u64 - duplicates, duplicates, reread })
            })
        }
    }

    /// Records acknowledged batch ends; gives up after `attempts` failed writes.
    #[derive(Debug, Default)]
    struct Recorder {
        attempts: u32,
        ends: Vec<BatchEnd>,
    }

    impl Acknowledge for Recorder {
        fn may_retry(&self, attempt: u32, _error: &SinkError, _pause: Duration) -> Result<(), String> {
            if attempt >= self.attempts { Err(format!("{attempt} attempts")) } else { Ok(()) }
        }

        async fn batch_delivered(&mut self, end: &BatchEnd) -> Result<(), DeliveryError> {
            self.ends.push(end.clone());
            Ok(())
        }
    }

    fn recorder() -> Recorder {
        Recorder { attempts: 100, ends: Vec::new() }
    }

    fn data(id: &str) -> Bytes {
        Bytes::from(Event { event_id: id.into(), user_id: "u".into(), ..Event::default() }.encode_to_vec())
    }

    /// User record `sub` of Kinesis record `seq`, arriving `at_ms` after the epoch.
    fn user(seq: u64, sub: u64, id: &str, at_ms: u64) -> UserRecord {
        UserRecord {
            sequence_number: format!("{seq:05}"),
            sub_sequence_number: sub,
            partition_key: "k".into(),
            data: data(id),
            arrival: Some(UNIX_EPOCH + Duration::from_millis(at_ms)),
        }
    }

    fn pipeline(config: PipelineConfig, sinks: &[&Arc<MemorySink>]) -> Pipeline {
        let sinks = sinks.iter().map(|s| Arc::clone(s) as Arc<dyn Sink>).collect();
        Pipeline::new(config.with_retry_backoff(Duration::from_millis(1), Duration::from_millis(1)), sinks)
            .expect("valid")
    }

    #[test]
    fn settings_that_cannot_work_are_refused() {
        let sink = MemorySink::new(SinkTiming::Batch) as Arc<dyn Sink>;
        for config in [
            PipelineConfig::default().with_max_batch_records(0),
            PipelineConfig::default().with_max_batch_bytes(0),
            PipelineConfig::default().with_batch_window(Duration::ZERO, Duration::ZERO),
        ] {
            assert!(matches!(Pipeline::new(config, vec![Arc::clone(&sink)]), Err(ConfigError::TooSmall { .. })));
        }
        assert!(matches!(Pipeline::new(PipelineConfig::default(), Vec::new()), Err(ConfigError::NoSink)));
    }

    #[tokio::test(start_paused = true)]
    async fn batches_are_cut_on_windows_and_limits_between_kinesis_records_only() {
        let sink = MemorySink::new(SinkTiming::Batch);
        let config = PipelineConfig::default()
            .with_max_batch_records(3)
            .with_batch_window(Duration::from_secs(1), Duration::ZERO);
        let mut shard = pipeline(config, &[&sink]).shard("s", "shard-0");
        let mut ack = recorder();
        let records = vec![
            user(1, 0, "a", 100),
            // An aggregate of three: 1 + 3 > 3, so it starts the next batch.
            user(2, 0, "b", 200),
            user(2, 1, "c", 200),
            user(2, 2, "d", 200),
            // Another arrival window.
            user(3, 0, "e", 1_100),
            user(4, 0, "f", 1_200),
        ];
        shard.process(records, &mut ack).await.expect("delivered");
        assert_eq!(sink.event_ids(), vec![vec!["a"], vec!["b", "c", "d"]]);
        assert_eq!(shard.pending_start(), Some("00003"));
        assert!(!shard.window_closed(UNIX_EPOCH + Duration::from_millis(1_999)));
        shard.flush_if_window_closed(UNIX_EPOCH + Duration::from_millis(2_000), &mut ack).await.expect("flushed");
        assert_eq!(sink.event_ids().last(), Some(&vec!["e".to_owned(), "f".to_owned()]));
        let ends: Vec<_> = ack.ends.iter().map(|e| (e.sequence_number.as_str(), e.sub_sequence_number)).collect();
        assert_eq!(ends, [("00001", 0), ("00002", 2), ("00004", 0)]);
        assert_eq!(shard.stats().batches, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn window_hits_stay_in_the_batch_but_skip_the_stores_and_are_counted_once() {
        let (s3, store) = (MemorySink::new(SinkTiming::Batch), MemorySink::new(SinkTiming::Immediate));
        let p = pipeline(PipelineConfig::default(), &[&s3, &store]);
        let mut shard = p.shard("s", "shard-0");
        let mut ack = recorder();
        shard.process(vec![user(1, 0, "a", 0), user(2, 0, "b", 0), user(3, 0, "a", 0)], &mut ack).await.expect("ok");
        shard.flush(&mut ack).await.expect("ok");
        // "a" again and "c" new, in the next batch: "a" is a window hit.
        shard.process(vec![user(4, 0, "a", 0), user(5, 0, "c", 0)], &mut ack).await.expect("ok");
        shard.flush(&mut ack).await.expect("ok");
        assert_eq!(s3.event_ids(), vec![vec!["a", "b"], vec!["a", "c"]], "batches do not depend on the window");
        assert_eq!(store.event_ids(), vec![vec!["a", "b"], vec!["c"]], "the stores do not get it again");
        let stats = p.stats();
        assert_eq!((stats.events_delivered, stats.duplicates_in_memory, stats.duplicates_in_sinks), (3, 2, 0));
        assert_eq!(stats, shard.stats());
    }

    #[tokio::test(start_paused = true)]
    async fn duplicates_are_told_apart_by_cause_in_every_layer() {
        let (s3, store) = (MemorySink::new(SinkTiming::Batch), MemorySink::new(SinkTiming::Immediate));
        let p = pipeline(PipelineConfig::default(), &[&s3, &store]);
        let mut shard = p.shard("s", "shard-0");
        let mut ack = recorder();
        // Within a batch: "a" sent again in record 2 (resent); record 1 delivered twice by the
        // reader (reread).
        let first = vec![user(1, 0, "a", 0), user(1, 0, "a", 0), user(2, 0, "a", 0), user(3, 0, "b", 0)];
        shard.process(first, &mut ack).await.expect("ok");
        shard.flush(&mut ack).await.expect("ok");
        assert_eq!((shard.stats().duplicates_reread, shard.stats().duplicates_resent()), (1, 1));
        // The window: record 3 read again ("b", reread) and "a" sent again in record 4 (resent).
        shard.process(vec![user(3, 0, "b", 0), user(4, 0, "a", 0), user(5, 0, "c", 0)], &mut ack).await.expect("ok");
        shard.flush(&mut ack).await.expect("ok");
        let stats = shard.stats();
        assert_eq!((stats.events_delivered, stats.duplicates_in_memory), (3, 4));
        assert_eq!((stats.duplicates_reread, stats.duplicates_resent()), (2, 2));
        // A new owner, without the window: the sinks tell. Record 5 read again ("c", stored from
        // there: reread) and "b" sent again in record 6 (stored from record 3: resent).
        let mut fresh = p.shard("s", "shard-0");
        fresh.process(vec![user(5, 0, "c", 0), user(6, 0, "b", 0)], &mut ack).await.expect("ok");
        fresh.flush(&mut ack).await.expect("ok");
        let stats = fresh.stats();
        assert_eq!((stats.events_delivered, stats.duplicates_in_sinks), (0, 2));
        assert_eq!((stats.duplicates_reread, stats.duplicates_resent()), (1, 1));
        let total = p.stats();
        assert_eq!(total.duplicates(), total.duplicates_reread + total.duplicates_resent());
    }

    #[tokio::test(start_paused = true)]
    async fn a_sink_duplicate_is_an_event_every_sink_already_had() {
        let (s3, store) = (MemorySink::new(SinkTiming::Batch), MemorySink::new(SinkTiming::Immediate));
        // "a" where it is read below (sequence 1), "b" from another record.
        store
            .stored
            .lock()
            .expect("lock")
            .extend([("a".to_owned(), ("00001".to_owned(), 0)), ("b".to_owned(), ("00009".to_owned(), 0))]);
        s3.stored.lock().expect("lock").insert("a".to_owned(), ("00001".to_owned(), 0));
        let p = pipeline(PipelineConfig::default().with_dedup_window(0), &[&s3, &store]);
        let mut shard = p.shard("s", "shard-0");
        shard
            .process(vec![user(1, 0, "a", 0), user(2, 0, "b", 0), user(3, 0, "c", 0)], &mut recorder())
            .await
            .expect("ok");
        shard.flush(&mut recorder()).await.expect("ok");
        let stats = shard.stats();
        // "a" was everywhere; "b" only in the store: delivered now that S3 has it too.
        assert_eq!((stats.events_delivered, stats.duplicates_in_sinks), (2, 1));
        assert_eq!(
            (stats.duplicates_reread, stats.duplicates_resent()),
            (1, 0),
            "\"a\" was stored from where it is read"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_runtime_that_gives_up_keeps_the_batch_pending_until_it_is_abandoned() {
        let sink = MemorySink::new(SinkTiming::Batch);
        *sink.fail.lock().expect("lock") = 5;
        let p = pipeline(PipelineConfig::default(), &[&sink]);
        let mut shard = p.shard("s", "shard-0");
        let mut ack = Recorder { attempts: 3, ends: Vec::new() };
        shard.process(vec![user(7, 0, "a", 0), user(8, 0, "b", 0)], &mut ack).await.expect("nothing to write yet");
        let error = shard.flush(&mut ack).await.expect_err("gives up");
        assert!(matches!(error, DeliveryError::SinkGaveUp { .. }), "{error}");
        assert!(ack.ends.is_empty(), "nothing acknowledged");
        assert_eq!(shard.pending_start(), Some("00007"), "read again from the batch's first record");
        assert_eq!(shard.stats().sink_errors, 3);
        shard.abandon();
        assert_eq!(shard.pending_start(), None);
        // Read again: the same batch, delivered once the sink works.
        let mut ack = recorder();
        shard.process(vec![user(7, 0, "a", 0), user(8, 0, "b", 0)], &mut ack).await.expect("ok");
        shard.flush(&mut ack).await.expect("delivered");
        assert_eq!(sink.event_ids(), vec![vec!["a", "b"]]);
        assert_eq!((shard.stats().events_delivered, shard.stats().sink_errors), (2, 5));
    }

    #[tokio::test(start_paused = true)]
    async fn poison_records_become_dead_letters_with_their_reason() {
        let sink = MemorySink::new(SinkTiming::Batch);
        let p = pipeline(PipelineConfig::default(), &[&sink]);
        let mut shard = p.shard("s", "shard-0");
        let mut magic = ktk_proto::aggregation::MAGIC.to_vec();
        magic.extend_from_slice(b"junk");
        let mut broken = user(2, 0, "x", 0);
        broken.data = Bytes::from(magic);
        let mut garbage = user(3, 0, "x", 0);
        garbage.data = Bytes::from_static(&[0xff, 0x00]);
        shard.process(vec![user(1, 0, "a", 0), broken, garbage], &mut recorder()).await.expect("ok");
        shard.flush(&mut recorder()).await.expect("ok");
        let batches = sink.batches.lock().expect("lock").clone();
        let reasons: Vec<&str> = batches[0].dead_letters.iter().map(|d| d.reason.as_str()).collect();
        assert_eq!(reasons.len(), 2);
        assert!(reasons[0].starts_with("not a valid KPL aggregate"), "{reasons:?}");
        assert!(!reasons[1].contains("KPL"), "{reasons:?}");
        assert_eq!(shard.stats().dead_letters, 2);
    }
}
