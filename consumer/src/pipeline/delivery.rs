//! The delivery processor: a [`RecordProcessor`] that decodes records into events, drops
//! duplicates, cuts batches at boundaries that depend only on the records, writes each batch to
//! every sink (retrying, never skipping), and checkpoints only after all of them acknowledged it.
//!
//! # Batch boundaries
//! A batch is one shard's records whose Kinesis arrival times fall in the same window (default one
//! minute, aligned to the epoch), cut further every `max_batch_records` records or
//! `max_batch_bytes` bytes. A batch is written when the next record belongs to another window or
//! would pass a limit, when the shard ends, or when the reader is caught up and the window closed
//! a grace period ago (arrival times grow with sequence numbers in a shard, so nothing more can
//! fall in it). The same stretch of a shard read again (after a crash or a hand-off) therefore makes
//! the same batches, and an S3 sink writes the same objects with the same bytes.
//!
//! # Real-time stores
//! Sinks whose [`SinkTiming`] is `Immediate` (the PostgreSQL and MySQL stores) are not made to
//! wait for the batch: the events of every read are written to them as soon as they are decoded
//! and deduplicated, so the store is a second or two behind the stream, not a batch window. The
//! checkpoint at the end of a batch still comes only after every sink holds all of it: the
//! immediate sinks got its pieces before the batch sinks get the whole. A piece written again
//! after a crash is absorbed by the store's idempotence and counted as duplicates.
//!
//! # Dedup
//! Two layers: in memory, and sinks that are idempotent on `event_id`. Both count what they drop.
//! In memory, an event id met twice within a batch is dropped from it; an event id among the last
//! delivered events of the shard (a bounded window) is kept in the batch but not sent to the
//! immediate sinks. The window depends on what this processor delivered before, which a new owner
//! of the shard does not know, so it must not change the batch: S3 objects stay the same bytes
//! whoever writes them, and the S3 reader drops an event found in two objects.
//!
//! # Shutdown and hand-off
//! The batch being filled is abandoned (not written): the last checkpoint is at the end of the
//! last written batch, and the next owner starts there and rebuilds the same batch.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::{error, warn};

use crate::backoff::Backoff;
use crate::pipeline::decode::{EventEncoding, decode_event};
use crate::pipeline::dedup::DedupWindow;
use crate::pipeline::{Batch, DeadLetter, EventRecord, Sink, SinkReport, SinkTiming};
use crate::processor::{Checkpointer, InitializeInput, ProcessRecordsInput, ProcessorError, RecordProcessor};
use crate::retrieval::ConsumerRecord;

/// How the pipeline batches and decodes.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    stream: String,
    encoding: EventEncoding,
    max_batch_records: usize,
    max_batch_bytes: usize,
    batch_window: Duration,
    window_grace: Duration,
    dedup_window: usize,
    retry_min: Duration,
    retry_max: Duration,
}

impl PipelineConfig {
    /// Defaults: events encoded as protobuf or JSON (told apart per record), batches of at most
    /// 10,000 records and 16 MiB within one-minute arrival windows closed 5 s after their end, the
    /// ids of the last 100,000 events of each shard remembered, sink retries from 100 ms to 30 s.
    pub fn new(stream: impl Into<String>) -> Self {
        PipelineConfig {
            stream: stream.into(),
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

    pub fn with_encoding(mut self, encoding: EventEncoding) -> Self {
        self.encoding = encoding;
        self
    }

    /// At most this many user records in a batch (events, duplicates and dead letters alike).
    pub fn with_max_batch_records(mut self, records: usize) -> Self {
        self.max_batch_records = records.max(1);
        self
    }

    /// At most this many bytes of user record data in a batch.
    pub fn with_max_batch_bytes(mut self, bytes: usize) -> Self {
        self.max_batch_bytes = bytes.max(1);
        self
    }

    /// The arrival-time window batches are cut on, and how long after its end a window is closed
    /// when the shard is quiet.
    pub fn with_batch_window(mut self, window: Duration, grace: Duration) -> Self {
        self.batch_window = window.max(Duration::from_millis(1));
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
}

/// Counts over every shard of a pipeline.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PipelineStats {
    /// Events written (acknowledged by every sink), duplicates excluded.
    pub events_delivered: u64,
    /// Duplicates dropped by the in-memory window.
    pub duplicates_in_memory: u64,
    /// Duplicates the sinks reported: per batch, the fewest any one sink reported (an event is a
    /// duplicate when every sink already had it; one that a sink stored for the first time, e.g.
    /// a real-time store holding a piece of a batch that was abandoned at a hand-off and S3 not yet,
    /// counts as delivered).
    pub duplicates_in_sinks: u64,
    pub dead_letters: u64,
    pub batches: u64,
    /// Failed sink writes (each was retried).
    pub sink_errors: u64,
}

impl PipelineStats {
    /// Every duplicate dropped, by either layer.
    pub fn duplicates(&self) -> u64 {
        self.duplicates_in_memory + self.duplicates_in_sinks
    }
}

#[derive(Debug, Default)]
struct Counters {
    events_delivered: AtomicU64,
    duplicates_in_memory: AtomicU64,
    duplicates_in_sinks: AtomicU64,
    dead_letters: AtomicU64,
    batches: AtomicU64,
    sink_errors: AtomicU64,
}

/// The pipeline of one application: its sinks and counts; makes a [`DeliveryProcessor`] per shard.
#[derive(Debug, Clone)]
pub struct Pipeline {
    config: Arc<PipelineConfig>,
    sinks: Arc<Vec<Arc<dyn Sink>>>,
    counters: Arc<Counters>,
}

impl Pipeline {
    pub fn new(config: PipelineConfig, sinks: Vec<Arc<dyn Sink>>) -> Self {
        Pipeline { config: Arc::new(config), sinks: Arc::new(sinks), counters: Arc::default() }
    }

    /// The processor for one shard (use as the worker's processor factory:
    /// `move |shard: &str| pipeline.processor(shard)`).
    pub fn processor(&self, shard_id: &str) -> DeliveryProcessor {
        DeliveryProcessor {
            shard_id: shard_id.to_owned(),
            config: Arc::clone(&self.config),
            sinks: Arc::clone(&self.sinks),
            counters: Arc::clone(&self.counters),
            window: DedupWindow::new(self.config.dedup_window),
            pending: None,
        }
    }

    pub fn stats(&self) -> PipelineStats {
        let c = &self.counters;
        PipelineStats {
            events_delivered: c.events_delivered.load(Ordering::Relaxed),
            duplicates_in_memory: c.duplicates_in_memory.load(Ordering::Relaxed),
            duplicates_in_sinks: c.duplicates_in_sinks.load(Ordering::Relaxed),
            dead_letters: c.dead_letters.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            sink_errors: c.sink_errors.load(Ordering::Relaxed),
        }
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
    ids: HashSet<String>,
    duplicates: u64,
    /// Per event of the batch: whether the dedup window knew its id (delivered in an earlier batch).
    seen: Vec<bool>,
    seen_count: u64,
    /// How many of the batch's events and dead letters the immediate sinks already have.
    sent_events: usize,
    sent_dead_letters: usize,
    /// Duplicates reported by each sink (by index) for the pieces of this batch.
    sink_duplicates: Vec<u64>,
}

/// Delivers one shard (see the module's notes).
#[derive(Debug)]
pub struct DeliveryProcessor {
    shard_id: String,
    config: Arc<PipelineConfig>,
    sinks: Arc<Vec<Arc<dyn Sink>>>,
    counters: Arc<Counters>,
    window: DedupWindow,
    pending: Option<Pending>,
}

fn millis(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

impl DeliveryProcessor {
    fn window_of(&self, record: &ConsumerRecord) -> Option<i64> {
        let width = i64::try_from(self.config.batch_window.as_millis()).unwrap_or(i64::MAX).max(1);
        record.approximate_arrival.map(|t| millis(t).div_euclid(width))
    }

    /// Whether `record` starts a new batch.
    fn cuts(&self, record: &ConsumerRecord, window: Option<i64>) -> bool {
        self.pending.as_ref().is_some_and(|p| {
            window.is_some_and(|w| w != p.window)
                || p.records >= self.config.max_batch_records
                || p.bytes + record.data.len() > self.config.max_batch_bytes
        })
    }

    fn add(&mut self, record: ConsumerRecord, window: Option<i64>) {
        let position = (record.sequence_number.clone(), record.sub_sequence_number);
        let pending = self.pending.get_or_insert_with(|| Pending {
            batch: Batch {
                stream: self.config.stream.clone(),
                shard_id: self.shard_id.clone(),
                first: position.clone(),
                ..Batch::default()
            },
            window: window.unwrap_or(0),
            records: 0,
            bytes: 0,
            ids: HashSet::new(),
            duplicates: 0,
            seen: Vec::new(),
            seen_count: 0,
            sent_events: 0,
            sent_dead_letters: 0,
            sink_duplicates: vec![0; self.sinks.len()],
        });
        pending.records += 1;
        pending.bytes += record.data.len();
        pending.batch.last = position;
        match decode_event(&record.data, self.config.encoding) {
            Ok(event) => {
                if !pending.ids.insert(event.event_id.clone()) {
                    pending.duplicates += 1;
                    return;
                }
                let seen = self.window.contains(&event.event_id);
                pending.seen.push(seen);
                pending.seen_count += u64::from(seen);
                pending.batch.events.push(EventRecord {
                    event,
                    shard_id: self.shard_id.clone(),
                    sequence_number: record.sequence_number,
                    sub_sequence_number: record.sub_sequence_number,
                    arrival: record.approximate_arrival,
                });
            }
            Err(reason) => pending.batch.dead_letters.push(DeadLetter {
                shard_id: self.shard_id.clone(),
                sequence_number: record.sequence_number,
                sub_sequence_number: record.sub_sequence_number,
                partition_key: record.partition_key.to_string(),
                data: record.data,
                reason,
                arrival: record.approximate_arrival,
            }),
        }
    }

    /// Writes what the immediate sinks do not have yet of the pending batch to them.
    async fn send_immediate(&mut self, checkpointer: &Checkpointer) -> Result<(), ProcessorError> {
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
        let this = &*self;
        let writes =
            this.sinks.iter().enumerate().filter(|(_, s)| s.timing() == SinkTiming::Immediate).map(|(i, sink)| {
                let piece = &piece;
                async move { (i, this.write_until_done(sink.as_ref(), piece, checkpointer).await) }
            });
        let reports = futures::future::join_all(writes).await;
        let mut duplicates = Vec::with_capacity(reports.len());
        for (i, report) in reports {
            duplicates.push((i, report?.duplicates));
        }
        if let Some(pending) = self.pending.as_mut() {
            for (i, d) in duplicates {
                pending.sink_duplicates[i] += d;
            }
            pending.sent_events = pending.batch.events.len();
            pending.sent_dead_letters = pending.batch.dead_letters.len();
        }
        Ok(())
    }

    /// Makes sure every sink has the pending batch (the rest of it to the immediate sinks, all of
    /// it to the batch sinks; each retried until it works, or until the lease is lost or handed
    /// off), then checkpoints its end.
    async fn flush(&mut self, checkpointer: &Checkpointer) -> Result<(), ProcessorError> {
        self.send_immediate(checkpointer).await?;
        let Some(mut pending) = self.pending.take() else { return Ok(()) };
        let batch = &pending.batch;
        let this = &*self;
        let writes = this
            .sinks
            .iter()
            .enumerate()
            .filter(|(_, s)| s.timing() == SinkTiming::Batch)
            .map(|(i, sink)| async move { (i, this.write_until_done(sink.as_ref(), batch, checkpointer).await) });
        // Not written everywhere: the batch is rebuilt from the checkpoint by whoever reads the
        // shard next.
        for (i, report) in futures::future::join_all(writes).await {
            // The window's events are in the batch (and so in what a batch sink reports as
            // already stored) but counted by the window.
            pending.sink_duplicates[i] += report?.duplicates.saturating_sub(pending.seen_count);
        }
        let batch = &pending.batch;
        let sink_duplicates = pending.sink_duplicates.iter().copied().min().unwrap_or(0);
        let memory_duplicates = pending.duplicates + pending.seen_count;
        checkpointer.checkpoint_at(&batch.last.0, batch.last.1).await?;
        for event in &batch.events {
            self.window.insert(&event.event.event_id);
        }
        let c = &self.counters;
        let delivered = (batch.events.len() as u64).saturating_sub(pending.seen_count + sink_duplicates);
        c.events_delivered.fetch_add(delivered, Ordering::Relaxed);
        c.duplicates_in_memory.fetch_add(memory_duplicates, Ordering::Relaxed);
        c.duplicates_in_sinks.fetch_add(sink_duplicates, Ordering::Relaxed);
        c.dead_letters.fetch_add(batch.dead_letters.len() as u64, Ordering::Relaxed);
        c.batches.fetch_add(1, Ordering::Relaxed);
        let labels = [("stream", self.config.stream.clone()), ("shard", self.shard_id.clone())];
        metrics::counter!("EventsDelivered", &labels).increment(delivered);
        metrics::counter!("DuplicatesDropped", &labels).increment(memory_duplicates + sink_duplicates);
        metrics::counter!("DeadLetters", &labels).increment(batch.dead_letters.len() as u64);
        Ok(())
    }

    async fn write_until_done(
        &self,
        sink: &dyn Sink,
        batch: &Batch,
        checkpointer: &Checkpointer,
    ) -> Result<SinkReport, ProcessorError> {
        let mut backoff = Backoff::new(self.config.retry_min, self.config.retry_max);
        loop {
            match sink.write(batch).await {
                Ok(report) => return Ok(report),
                Err(e) => {
                    self.counters.sink_errors.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("SinkErrors", "stream" => self.config.stream.clone(), "sink" => sink.name().to_owned())
                        .increment(1);
                    if e.retryable {
                        warn!(shard = %self.shard_id, sink = sink.name(), error = %e, "sink write failed; the shard waits and retries");
                    } else {
                        error!(shard = %self.shard_id, sink = sink.name(), error = %e, "sink write failed and needs an operator; the shard waits and retries");
                    }
                    if checkpointer.is_lease_lost() || checkpointer.is_handoff_requested() {
                        return Err(
                            format!("sink {} failed and the lease is leaving this worker: {e}", sink.name()).into()
                        );
                    }
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }

    /// Whether the pending batch's window has closed (the reader being caught up).
    fn window_closed(&self, now: SystemTime) -> bool {
        self.pending.as_ref().is_some_and(|p| {
            let width = i64::try_from(self.config.batch_window.as_millis()).unwrap_or(i64::MAX).max(1);
            let grace = i64::try_from(self.config.window_grace.as_millis()).unwrap_or(i64::MAX);
            millis(now) >= (p.window.saturating_add(1)).saturating_mul(width).saturating_add(grace)
        })
    }
}

impl RecordProcessor for DeliveryProcessor {
    async fn initialize(&mut self, _input: &InitializeInput) -> Result<(), ProcessorError> {
        // After a failure the shard is read again from the checkpoint: start the batch afresh.
        // The dedup window holds only delivered events, so it stays.
        self.pending = None;
        Ok(())
    }

    async fn process_records(
        &mut self,
        input: ProcessRecordsInput,
        checkpointer: &Checkpointer,
    ) -> Result<(), ProcessorError> {
        for record in input.records {
            let window = self.window_of(&record);
            if self.cuts(&record, window) {
                self.flush(checkpointer).await?;
            }
            self.add(record, window);
        }
        self.send_immediate(checkpointer).await?;
        if input.millis_behind_latest == Some(0) && self.window_closed(SystemTime::now()) {
            self.flush(checkpointer).await?;
        }
        Ok(())
    }

    async fn shard_ended(&mut self, checkpointer: &Checkpointer) -> Result<(), ProcessorError> {
        self.flush(checkpointer).await?;
        checkpointer.checkpoint().await?;
        Ok(())
    }

    async fn shutdown_requested(&mut self, _checkpointer: &Checkpointer) -> Result<(), ProcessorError> {
        // Abandon the batch being filled: its records are after the checkpoint and make the same
        // batch for the next owner.
        self.pending = None;
        Ok(())
    }

    async fn lease_lost(&mut self) {
        self.pending = None;
    }
}
