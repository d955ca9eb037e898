//! One invocation: a Kinesis event source mapping's batch in, a partial batch response out.
//!
//! # How a batch flows
//! 1. The records are grouped by shard (a mapping's batch holds one shard's records, in sequence
//!    order; the grouping only keeps a hand-made event with several shards correct).
//! 2. Each Kinesis record is deaggregated (`ktk_proto`'s KPL codec: a plain record is one user
//!    record, an aggregate many, a broken aggregate is delivered whole as one plain record) and each
//!    user record decoded into an `events.v1.Event` ([`decode_event`]). What does not decode (or
//!    has no usable `event_id`) becomes a [`DeadLetter`] with the reason.
//! 3. Duplicates are dropped in memory: an event id seen earlier in the invocation, or delivered
//!    recently on this shard by this container (a [`DedupWindow`] per shard, kept across warm
//!    invocations). The sinks, idempotent on `event_id`, catch the rest.
//! 4. The records become [`Batch`]es of at most `max_batch_records` user records and
//!    `max_batch_bytes` bytes, cut only between Kinesis records (never inside an aggregate), and are
//!    written one after another, each to every sink at once, each sink retried with a backoff while
//!    the invocation has time left.
//! 5. The first batch that a sink could not take stops the shard: its first Kinesis record's
//!    sequence number is the `itemIdentifier` of the response, so the mapping (with
//!    `ReportBatchItemFailures`) checkpoints everything before it and retries from it. Nothing after
//!    it was written, so nothing is skipped; what was written before it is not sent again.
//!
//! A poison record is never a failure: it is delivered as a dead letter (S3's `dead-letters/`
//! objects, the stores' `<table>_dead_letters`), or it would block its shard until it expired.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_lambda_events::event::kinesis::{KinesisEvent, KinesisEventRecord};
use aws_lambda_events::event::streams::KinesisEventResponse;
use bytes::Bytes;
use ktk_consumer::backoff::Backoff;
use ktk_consumer::pipeline::dedup::DedupWindow;
use ktk_consumer::pipeline::{
    Batch, DeadLetter, EventEncoding, EventRecord, Sink, SinkError, SinkReport, decode_event,
};
use ktk_proto::aggregation::{DeaggregatedRecord, Deaggregator};
use tokio::time::Instant;
use tracing::{error, info, warn};

/// Where the shard id ends in a record's `eventID` (`shardId-000000000000:<sequence number>`).
const EVENT_ID_SEPARATOR: char = ':';

/// How the handler batches, deduplicates and retries.
#[derive(Debug, Clone)]
pub struct HandlerConfig {
    stream: Option<String>,
    encoding: EventEncoding,
    max_batch_records: usize,
    max_batch_bytes: usize,
    dedup_window: usize,
    max_attempts: u32,
    retry_min: Duration,
    retry_max: Duration,
    deadline_margin: Duration,
}

impl Default for HandlerConfig {
    /// The ECS consumer's batch limits (10,000 records, 16 MiB: a mapping's batch, at most 10,000
    /// records and 6 MB, is then one sink batch) and dedup window (100,000 ids per shard); each sink
    /// write tried at most 5 times, 100 ms to 5 s apart; every retry stops 1 s before the
    /// invocation's deadline, leaving time to answer.
    fn default() -> Self {
        HandlerConfig {
            stream: None,
            encoding: EventEncoding::Auto,
            max_batch_records: 10_000,
            max_batch_bytes: 16 << 20,
            dedup_window: 100_000,
            max_attempts: 5,
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(5),
            deadline_margin: Duration::from_secs(1),
        }
    }
}

impl HandlerConfig {
    /// The stream name the batches carry (S3 object names, the stores' `stream` column). By default
    /// it is taken from each record's `eventSourceARN`.
    pub fn with_stream(mut self, stream: impl Into<String>) -> Self {
        self.stream = Some(stream.into());
        self
    }

    pub fn with_encoding(mut self, encoding: EventEncoding) -> Self {
        self.encoding = encoding;
        self
    }

    /// A batch is closed once it holds this many user records (at least 1); the Kinesis record
    /// that would pass it starts the next batch, so an aggregate is never split.
    pub fn with_max_batch_records(mut self, records: usize) -> Self {
        self.max_batch_records = records.max(1);
        self
    }

    /// A batch is closed before a Kinesis record whose data would take it past this many bytes.
    pub fn with_max_batch_bytes(mut self, bytes: usize) -> Self {
        self.max_batch_bytes = bytes.max(1);
        self
    }

    /// Event ids per shard the container remembers across invocations (0 turns it off).
    pub fn with_dedup_window(mut self, ids: usize) -> Self {
        self.dedup_window = ids;
        self
    }

    /// Attempts at writing one batch to one sink within an invocation (at least 1).
    pub fn with_max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// Backoff between attempts (doubling from `min` to `max`, with jitter).
    pub fn with_retry_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.retry_min = min;
        self.retry_max = max.max(min);
        self
    }

    /// How long before the invocation's deadline the handler stops writing and answers.
    pub fn with_deadline_margin(mut self, margin: Duration) -> Self {
        self.deadline_margin = margin;
        self
    }

    pub fn max_batch_records(&self) -> usize {
        self.max_batch_records
    }

    pub fn max_batch_bytes(&self) -> usize {
        self.max_batch_bytes
    }

    pub fn dedup_window(&self) -> usize {
        self.dedup_window
    }

    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    pub fn deadline_margin(&self) -> Duration {
        self.deadline_margin
    }
}

/// What one invocation did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InvocationReport {
    /// Kinesis records in the event.
    pub records: u64,
    /// User records they held (after deaggregation).
    pub user_records: u64,
    /// Events delivered, duplicates the sinks reported excluded.
    pub events_delivered: u64,
    /// Duplicates dropped before the sinks (within the invocation or the container's window).
    pub duplicates_in_memory: u64,
    /// Duplicates the sinks reported (the most any one sink reported, per batch).
    pub duplicates_in_sinks: u64,
    /// Dead letters delivered.
    pub dead_letters: u64,
    /// Batches every sink acknowledged.
    pub batches: u64,
    /// Failed sink writes (retried or not).
    pub sink_errors: u64,
    /// Kinesis records with the KPL magic that were not valid aggregates (delivered as plain
    /// records, so as dead letters unless they happen to hold an event).
    pub suspicious_records: u64,
    /// Per shard that stopped on a sink failure, the sequence number of its first Kinesis record
    /// not delivered: the response's `batchItemFailures`.
    pub failures: Vec<String>,
}

impl InvocationReport {
    /// The partial batch response: empty when everything was delivered.
    pub fn response(&self) -> KinesisEventResponse {
        let mut response = KinesisEventResponse::default();
        response.set_failures(self.failures.iter().cloned());
        response
    }
}

/// The function's handler: the sinks and the per-shard dedup windows, built once per container and
/// shared by every invocation.
#[derive(Debug)]
pub struct KinesisHandler {
    config: HandlerConfig,
    sinks: Vec<Arc<dyn Sink>>,
    deaggregator: Deaggregator,
    /// Taken out for the length of an invocation and put back after, so no lock is held across a
    /// write.
    windows: Mutex<HashMap<String, DedupWindow>>,
}

/// A sink batch and where it starts in the mapping's batch.
#[derive(Debug)]
struct PlannedBatch {
    batch: Batch,
    /// The sequence number of its first Kinesis record: what to report if it cannot be written.
    first_record: String,
    user_records: usize,
    bytes: usize,
    duplicates: u64,
}

impl KinesisHandler {
    pub fn new(config: HandlerConfig, sinks: Vec<Arc<dyn Sink>>) -> Self {
        KinesisHandler { config, sinks, deaggregator: Deaggregator::new(), windows: Mutex::default() }
    }

    pub fn config(&self) -> &HandlerConfig {
        &self.config
    }

    /// The sinks' names (`s3`, `postgres`, `mysql`).
    pub fn sink_names(&self) -> impl Iterator<Item = &str> {
        self.sinks.iter().map(|sink| sink.name())
    }

    /// Handles one invocation that must answer by `deadline` (the context's deadline, as a
    /// monotonic instant). Never fails: what could not be delivered is in the report's failures.
    pub async fn handle(&self, event: KinesisEvent, deadline: Instant) -> InvocationReport {
        let mut report = InvocationReport { records: event.records.len() as u64, ..InvocationReport::default() };
        let mut shards: Vec<(String, Vec<KinesisEventRecord>)> = Vec::new();
        for record in event.records {
            let shard = shard_of(&record);
            match shards.iter_mut().find(|(id, _)| *id == shard) {
                Some((_, records)) => records.push(record),
                None => shards.push((shard, vec![record])),
            }
        }
        for (shard_id, records) in shards {
            if let Some(failed) = self.deliver_shard(&shard_id, records, deadline, &mut report).await {
                report.failures.push(failed);
            }
        }
        report
    }

    /// [`handle`](Self::handle) with the deadline as Lambda gives it (wall-clock time).
    pub async fn handle_until(&self, event: KinesisEvent, deadline: SystemTime) -> InvocationReport {
        let remaining = deadline.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO);
        self.handle(event, Instant::now() + remaining).await
    }

    /// Delivers one shard's records in order; returns the first record not delivered, if any.
    async fn deliver_shard(
        &self,
        shard_id: &str,
        records: Vec<KinesisEventRecord>,
        deadline: Instant,
        report: &mut InvocationReport,
    ) -> Option<String> {
        let stream = match (&self.config.stream, records.first()) {
            (Some(stream), _) => stream.clone(),
            (None, Some(first)) => stream_of(first),
            (None, None) => return None,
        };
        let mut window = self.take_window(shard_id);
        let batches = self.plan(&stream, shard_id, records, &window, report);
        let mut failed = None;
        for planned in batches {
            let batch = &planned.batch;
            if batch.events.is_empty() && batch.dead_letters.is_empty() {
                // Only duplicates: nothing to write.
                report.duplicates_in_memory += planned.duplicates;
                continue;
            }
            match self.write_batch(batch, deadline, report).await {
                Ok((written, duplicates)) => {
                    for record in &batch.events {
                        window.insert(&record.event.event_id);
                    }
                    report.events_delivered += written;
                    report.duplicates_in_memory += planned.duplicates;
                    report.duplicates_in_sinks += duplicates;
                    report.dead_letters += batch.dead_letters.len() as u64;
                    report.batches += 1;
                }
                Err(e) => {
                    error!(
                        shard = shard_id,
                        first_record = %planned.first_record,
                        user_records = planned.user_records,
                        bytes = planned.bytes,
                        error = %e,
                        "batch not delivered; the mapping retries from its first record"
                    );
                    failed = Some(planned.first_record);
                    break;
                }
            }
        }
        self.put_window(shard_id, window);
        failed
    }

    /// Deaggregates, decodes and deduplicates one shard's records into batches.
    fn plan(
        &self,
        stream: &str,
        shard_id: &str,
        records: Vec<KinesisEventRecord>,
        window: &DedupWindow,
        report: &mut InvocationReport,
    ) -> Vec<PlannedBatch> {
        let mut batches: Vec<PlannedBatch> = Vec::new();
        let mut seen: HashSet<String> = HashSet::new();
        let mut user_records: Vec<DeaggregatedRecord> = Vec::new();
        let mut out_of_range = Vec::new();
        for record in records {
            let kinesis = record.kinesis;
            let sequence_number = kinesis.sequence_number;
            let arrival = Some(SystemTime::from(*kinesis.approximate_arrival_timestamp));
            let data = Bytes::from(kinesis.data.0);
            let size = data.len();
            user_records.clear();
            let format = self.deaggregator.deaggregate_into(
                data,
                &kinesis.partition_key,
                None,
                &mut user_records,
                &mut out_of_range,
            );
            let suspicious = format.is_suspicious().then(|| format!("{format:?}"));
            if let Some(format) = &suspicious {
                report.suspicious_records += 1;
                warn!(
                    shard = shard_id,
                    sequence_number, format, "a record has the KPL magic but is not a valid aggregate"
                );
            }
            report.user_records += user_records.len() as u64;

            let cut = batches.last().is_none_or(|last| {
                last.user_records >= self.config.max_batch_records
                    || (last.bytes > 0 && last.bytes + size > self.config.max_batch_bytes)
            });
            if cut {
                batches.push(PlannedBatch {
                    batch: Batch { stream: stream.to_owned(), shard_id: shard_id.to_owned(), ..Batch::default() },
                    first_record: sequence_number.clone(),
                    user_records: 0,
                    bytes: 0,
                    duplicates: 0,
                });
            }
            let Some(planned) = batches.last_mut() else { continue };
            planned.bytes += size;
            for user in user_records.drain(..) {
                let position = (sequence_number.clone(), user.sub_sequence_number);
                if planned.user_records == 0 {
                    planned.batch.first = position.clone();
                }
                planned.user_records += 1;
                planned.batch.last = position;
                match decode_event(&user.data, self.config.encoding) {
                    Ok(event) => {
                        if window.contains(&event.event_id) || !seen.insert(event.event_id.clone()) {
                            planned.duplicates += 1;
                            continue;
                        }
                        planned.batch.events.push(EventRecord {
                            event,
                            shard_id: shard_id.to_owned(),
                            sequence_number: sequence_number.clone(),
                            sub_sequence_number: user.sub_sequence_number,
                            arrival,
                        });
                    }
                    Err(reason) => {
                        let reason = match &suspicious {
                            Some(format) => {
                                format!("not a valid KPL aggregate ({format}), read as a plain record: {reason}")
                            }
                            None => reason,
                        };
                        planned.batch.dead_letters.push(DeadLetter {
                            shard_id: shard_id.to_owned(),
                            sequence_number: sequence_number.clone(),
                            sub_sequence_number: user.sub_sequence_number,
                            partition_key: user.partition_key.to_string(),
                            data: user.data,
                            reason,
                            arrival,
                        });
                    }
                }
            }
        }
        batches
    }

    /// Writes a batch to every sink at once; `Ok((written, duplicates))` once all acknowledged.
    async fn write_batch(
        &self,
        batch: &Batch,
        deadline: Instant,
        report: &mut InvocationReport,
    ) -> Result<(u64, u64), SinkError> {
        let writes = self.sinks.iter().map(|sink| self.write_with_retry(sink.as_ref(), batch, deadline));
        let results = futures::future::join_all(writes).await;
        let mut duplicates = 0;
        let mut first_error = None;
        for (result, errors) in results {
            report.sink_errors += errors;
            match result {
                Ok(sink) => duplicates = duplicates.max(sink.duplicates),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(((batch.events.len() as u64).saturating_sub(duplicates), duplicates)),
        }
    }

    /// Writes a batch to one sink, retrying retryable failures while attempts and time are left.
    /// Returns the outcome and the number of failed attempts.
    async fn write_with_retry(
        &self,
        sink: &dyn Sink,
        batch: &Batch,
        deadline: Instant,
    ) -> (Result<SinkReport, SinkError>, u64) {
        let margin = self.config.deadline_margin;
        let mut backoff = Backoff::new(self.config.retry_min, self.config.retry_max);
        let mut errors = 0;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let time_left = deadline.saturating_duration_since(Instant::now()).saturating_sub(margin);
            if time_left.is_zero() {
                let message = "no time left in the invocation to write the batch".to_owned();
                return (Err(SinkError::new(sink.name(), message, true)), errors);
            }
            let error = match tokio::time::timeout(time_left, sink.write(batch)).await {
                Ok(Ok(report)) => return (Ok(report), errors),
                Ok(Err(e)) => e,
                Err(_) => SinkError::new(
                    sink.name(),
                    format!("the write took longer than the invocation's time left ({time_left:?}); abandoned"),
                    true,
                ),
            };
            errors += 1;
            if !error.retryable {
                error!(sink = sink.name(), attempt, error = %error, "sink write failed and needs an operator");
                return (Err(error), errors);
            }
            let pause = backoff.next_delay();
            if attempt >= self.config.max_attempts || Instant::now() + pause + margin >= deadline {
                warn!(sink = sink.name(), attempt, error = %error, "sink write failed; no attempts or time left");
                return (Err(error), errors);
            }
            warn!(sink = sink.name(), attempt, error = %error, "sink write failed; retrying");
            tokio::time::sleep(pause).await;
        }
    }

    fn take_window(&self, shard_id: &str) -> DedupWindow {
        let mut windows = self.windows.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        windows.remove(shard_id).unwrap_or_else(|| DedupWindow::new(self.config.dedup_window))
    }

    fn put_window(&self, shard_id: &str, window: DedupWindow) {
        let mut windows = self.windows.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        windows.insert(shard_id.to_owned(), window);
    }

    /// Logs what an invocation did (one line per invocation).
    pub fn log(report: &InvocationReport, request_id: &str) {
        if report.failures.is_empty() {
            info!(
                request_id,
                records = report.records,
                user_records = report.user_records,
                delivered = report.events_delivered,
                duplicates = report.duplicates_in_memory + report.duplicates_in_sinks,
                dead_letters = report.dead_letters,
                batches = report.batches,
                "batch delivered"
            );
        } else {
            warn!(
                request_id,
                records = report.records,
                delivered = report.events_delivered,
                dead_letters = report.dead_letters,
                batches = report.batches,
                sink_errors = report.sink_errors,
                failures = ?report.failures,
                "batch partly delivered; the mapping retries from the first failure"
            );
        }
    }
}

/// Reads a mapping's event from its JSON, with exact arrival times.
///
/// `aws_lambda_events` (1.2) reads `approximateArrivalTimestamp` (seconds, a JSON number) by
/// taking the digits after the point as milliseconds, so `1730000001.25` becomes `.025` s and
/// more than three decimals overflow. The times are read here instead, rounded to the
/// millisecond, and set on the typed records (the typed parse is given whole seconds).
pub fn parse_event(mut json: serde_json::Value) -> Result<KinesisEvent, serde_json::Error> {
    let mut arrivals = Vec::new();
    if let Some(records) = json.get_mut("Records").and_then(serde_json::Value::as_array_mut) {
        for record in records {
            let slot = record.get_mut("kinesis").and_then(|kinesis| kinesis.get_mut("approximateArrivalTimestamp"));
            let arrival = slot.as_deref().and_then(arrival_from_seconds);
            if let (Some(slot), Some(time)) = (slot, arrival) {
                let whole_seconds = time.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
                *slot = serde_json::Value::from(whole_seconds);
            }
            arrivals.push(arrival);
        }
    }
    let mut event: KinesisEvent = serde_json::from_value(json)?;
    for (record, arrival) in event.records.iter_mut().zip(arrivals) {
        if let Some(time) = arrival {
            *record.kinesis.approximate_arrival_timestamp = time.into();
        }
    }
    Ok(event)
}

/// Seconds since the epoch (a number, or a string of one) to a time, to the millisecond.
fn arrival_from_seconds(value: &serde_json::Value) -> Option<SystemTime> {
    let seconds = match value {
        serde_json::Value::Number(n) => n.as_f64()?,
        serde_json::Value::String(s) => s.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    let millis = (seconds * 1000.0).round();
    // Up to the year 9999: anything else is not a Kinesis arrival time.
    (millis.is_finite() && (0.0..=253_402_300_799_999.0).contains(&millis))
        .then(|| SystemTime::UNIX_EPOCH + Duration::from_millis(millis as u64))
}

/// The shard of a record: the part of its `eventID` before the sequence number.
fn shard_of(record: &KinesisEventRecord) -> String {
    match record.event_id.as_deref().and_then(|id| id.split_once(EVENT_ID_SEPARATOR)) {
        Some((shard, _)) if !shard.is_empty() => shard.to_owned(),
        _ => "shardId-unknown".to_owned(),
    }
}

/// The stream's name from the record's `eventSourceARN`
/// (`arn:aws:kinesis:<region>:<account>:stream/<name>`, or a consumer's ARN under it).
fn stream_of(record: &KinesisEventRecord) -> String {
    record
        .event_source_arn
        .as_deref()
        .and_then(|arn| arn.split_once(":stream/"))
        .and_then(|(_, rest)| rest.split('/').next())
        .filter(|name| !name.is_empty())
        .unwrap_or("unknown-stream")
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(event_id: Option<&str>, arn: Option<&str>) -> KinesisEventRecord {
        let mut record = KinesisEventRecord::default();
        record.event_id = event_id.map(str::to_owned);
        record.event_source_arn = arn.map(str::to_owned);
        record
    }

    #[test]
    fn shard_and_stream_come_from_the_event_id_and_the_arn() {
        let r = record(
            Some("shardId-000000000007:4956816737"),
            Some("arn:aws:kinesis:eu-west-1:123456789012:stream/app-events"),
        );
        assert_eq!(shard_of(&r), "shardId-000000000007");
        assert_eq!(stream_of(&r), "app-events");
        let consumer = record(None, Some("arn:aws:kinesis:eu-west-1:1:stream/app-events/consumer/lambda:1700000000"));
        assert_eq!(stream_of(&consumer), "app-events");
        assert_eq!(shard_of(&consumer), "shardId-unknown");
        assert_eq!(stream_of(&record(None, Some("not an arn"))), "unknown-stream");
    }

    #[test]
    fn arrival_times_are_read_to_the_millisecond() {
        let times = serde_json::json!([1.25, 1.5, 1.007, "1.999", 1, 1.4771]);
        let records: Vec<_> = times
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| {
                let t = match t {
                    serde_json::Value::String(s) => serde_json::json!(format!("173000000{s}")),
                    n => serde_json::json!(1_730_000_000.0 + n.as_f64().unwrap_or(0.0)),
                };
                serde_json::json!({ "kinesis": { "approximateArrivalTimestamp": t, "data": "", "sequenceNumber": "1" } })
            })
            .collect();
        let json = serde_json::json!({ "Records": records });
        let event = parse_event(json).expect("parses");
        let millis: Vec<u128> = event
            .records
            .iter()
            .map(|r| {
                let time = SystemTime::from(*r.kinesis.approximate_arrival_timestamp);
                time.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
            })
            .collect();
        assert_eq!(
            millis,
            [
                1_730_000_001_250,
                1_730_000_001_500,
                1_730_000_001_007,
                1_730_000_001_999,
                1_730_000_001_000,
                1_730_000_001_477
            ]
        );
        assert!(arrival_from_seconds(&serde_json::json!(-1.0)).is_none());
        assert!(arrival_from_seconds(&serde_json::json!("soon")).is_none());
    }
}
