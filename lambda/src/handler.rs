//! One invocation: a Kinesis event source mapping's batch in, a partial batch response out.
//!
//! # How a batch flows
//! 1. The records are grouped by shard (a mapping's batch holds one shard's records, in sequence
//!    order; the grouping only keeps a hand-made event with several shards correct).
//! 2. Each Kinesis record is deaggregated (`ktk_proto`'s KPL codec: a plain record is one user
//!    record, an aggregate many, a broken aggregate is delivered whole as one plain record).
//! 3. The user records go through the delivery pipeline (`ktk_pipeline::ShardPipeline`), the same
//!    code the ECS consumer drives: decoding, dedup, batches cut only between Kinesis records,
//!    every sink written and retried, the same counts. Each shard's pipeline, with its dedup
//!    window, is kept across warm invocations. The invocation's end also ends a batch: a Lambda
//!    cannot hold records over to the next invocation.
//! 4. Retries stop when the runtime's budget is spent: `max_attempts` writes of one batch to one
//!    sink, the invocation's deadline less a margin, or at once for an error an operator must mend.
//!    The batch being filled is then abandoned and the sequence number of its first Kinesis record
//!    is the `itemIdentifier` of the response, so the mapping (with `ReportBatchItemFailures`)
//!    checkpoints everything before it and retries from it. Nothing after it was acknowledged, so
//!    nothing is skipped; what was delivered before it is not sent again.
//!
//! A poison record is never a failure: it is delivered as a dead letter (S3's `dead-letters/`
//! objects, the stores' `<table>_dead_letters`), or it would block its shard until it expired.
//!
//! Each report carries the invocation's health verdict ([`InvocationHealth`]): the sinks whose
//! latest write in this container failed, with how long every write of theirs has failed. The
//! binary logs it as an embedded-metric-format line ([`crate::emf`]) that CloudWatch turns into
//! the `SinkFailing` metric an alarm watches.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_lambda_events::event::kinesis::{KinesisEvent, KinesisEventRecord};
use aws_lambda_events::event::streams::KinesisEventResponse;
use bytes::Bytes;
use ktk_pipeline::{
    Acknowledge, BatchEnd, ConfigError, DeliveryError, EventEncoding, Pipeline, PipelineConfig, PipelineStats,
    ShardPipeline, Sink, SinkError, SinkWrites, UserRecord,
};
use ktk_proto::aggregation::{DeaggregatedRecord, Deaggregator};
use tokio::time::Instant;
use tracing::{error, info, warn};

/// Where the shard id ends in a record's `eventID` (`shardId-000000000000:<sequence number>`).
const EVENT_ID_SEPARATOR: char = ':';

/// How the handler batches, deduplicates and retries: the pipeline's configuration (the same
/// defaults as the ECS consumer) and what only a Lambda needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerConfig {
    pipeline: PipelineConfig,
    stream: Option<String>,
    max_attempts: u32,
    deadline_margin: Duration,
}

impl Default for HandlerConfig {
    /// The pipeline's defaults (see `ktk_pipeline::PipelineConfig`; a mapping's batch, at most
    /// 10,000 records and 6 MB, then fits in one sink batch) with sink retries 100 ms to 5 s apart;
    /// each sink write tried at most 5 times; every retry stops 1 s before the invocation's
    /// deadline, leaving time to answer.
    fn default() -> Self {
        HandlerConfig {
            pipeline: PipelineConfig::default().with_retry_backoff(Duration::from_millis(100), Duration::from_secs(5)),
            stream: None,
            max_attempts: 5,
            deadline_margin: Duration::from_secs(1),
        }
    }
}

impl HandlerConfig {
    /// The pipeline's configuration (batches, dedup window, encoding, retry backoff).
    pub fn with_pipeline(mut self, pipeline: PipelineConfig) -> Self {
        self.pipeline = pipeline;
        self
    }

    /// The stream name the batches carry (S3 object names, the stores' `stream` column). By default
    /// it is taken from each record's `eventSourceARN`.
    pub fn with_stream(mut self, stream: impl Into<String>) -> Self {
        self.stream = Some(stream.into());
        self
    }

    pub fn with_encoding(mut self, encoding: EventEncoding) -> Self {
        self.pipeline = self.pipeline.with_encoding(encoding);
        self
    }

    /// See `PipelineConfig::with_max_batch_records`.
    pub fn with_max_batch_records(mut self, records: usize) -> Self {
        self.pipeline = self.pipeline.with_max_batch_records(records);
        self
    }

    /// See `PipelineConfig::with_max_batch_bytes`.
    pub fn with_max_batch_bytes(mut self, bytes: usize) -> Self {
        self.pipeline = self.pipeline.with_max_batch_bytes(bytes);
        self
    }

    /// Event ids per shard the container remembers across invocations (0 turns it off).
    pub fn with_dedup_window(mut self, ids: usize) -> Self {
        self.pipeline = self.pipeline.with_dedup_window(ids);
        self
    }

    /// Attempts at writing one batch to one sink within an invocation (at least 1).
    pub fn with_max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// Backoff between attempts (`ktk_backoff`: doubling from `min` to `max`, with jitter).
    pub fn with_retry_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.pipeline = self.pipeline.with_retry_backoff(min, max);
        self
    }

    /// How long before the invocation's deadline the handler stops writing and answers.
    pub fn with_deadline_margin(mut self, margin: Duration) -> Self {
        self.deadline_margin = margin;
        self
    }

    pub fn pipeline(&self) -> &PipelineConfig {
        &self.pipeline
    }

    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    pub fn deadline_margin(&self) -> Duration {
        self.deadline_margin
    }
}

/// What one invocation did. The delivery counts are `ktk_pipeline::PipelineStats`, the same as on
/// ECS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InvocationReport {
    /// Kinesis records in the event.
    pub records: u64,
    /// User records they held (after deaggregation).
    pub user_records: u64,
    /// What the pipeline delivered and counted in this invocation.
    pub delivery: PipelineStats,
    /// Kinesis records with the KPL magic that were not valid aggregates (delivered as plain
    /// records, so as dead letters unless they happen to hold an event).
    pub suspicious_records: u64,
    /// Per shard that stopped on a sink failure, the sequence number of its first Kinesis record
    /// not delivered: the response's `batchItemFailures`.
    pub failures: Vec<String>,
    /// The sinks failing when the invocation ended.
    pub health: InvocationHealth,
}

/// The health verdict of an invocation: the sinks whose latest write in this container (in this
/// invocation or an earlier one) failed. A sink that failed and then took a write is not failing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InvocationHealth {
    /// The failing sinks, in the pipeline's order.
    pub failing_sinks: Vec<FailingSink>,
}

/// A sink whose every write has failed for a while.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailingSink {
    /// `s3`, `postgres`, `mysql`.
    pub sink: String,
    /// How long every write of it has failed in this container, at the end of the invocation.
    pub failing_for: Duration,
    /// The latest failure's error.
    pub last_error: String,
}

impl InvocationHealth {
    /// The verdict from the pipeline's `sink_writes` as of `now`.
    pub fn from_sink_writes(writes: &[SinkWrites], now: std::time::Instant) -> Self {
        let failing_sinks = writes
            .iter()
            .filter_map(|w| {
                Some(FailingSink {
                    sink: w.sink.clone(),
                    failing_for: now.saturating_duration_since(w.failing_since?),
                    last_error: w.last_error.clone().unwrap_or_else(|| "unknown error".to_owned()),
                })
            })
            .collect();
        InvocationHealth { failing_sinks }
    }

    /// Whether a sink is failing.
    pub fn is_sink_failing(&self) -> bool {
        !self.failing_sinks.is_empty()
    }

    /// The longest time a sink has been failing (zero when none is).
    pub fn longest_failing(&self) -> Duration {
        self.failing_sinks.iter().map(|f| f.failing_for).max().unwrap_or_default()
    }

    /// One sentence per failing sink, as the ECS consumer's `/health` words it.
    pub fn reasons(&self) -> Vec<String> {
        self.failing_sinks
            .iter()
            .map(|f| {
                format!("sink {} has failed every write for {} s: {}", f.sink, f.failing_for.as_secs(), f.last_error)
            })
            .collect()
    }
}

impl InvocationReport {
    /// The partial batch response: empty when everything was delivered.
    pub fn response(&self) -> KinesisEventResponse {
        let mut response = KinesisEventResponse::default();
        response.set_failures(self.failures.iter().cloned());
        response
    }
}

/// The function's handler: the pipeline and each shard's delivery state, built once per container
/// and shared by every invocation.
#[derive(Debug)]
pub struct KinesisHandler {
    config: HandlerConfig,
    pipeline: Pipeline,
    deaggregator: Deaggregator,
    /// Per (stream, shard): taken out for the length of an invocation and put back after, so no
    /// lock is held across a write.
    shards: Mutex<HashMap<(String, String), ShardPipeline>>,
}

/// The invocation's side of the pipeline: a budget of attempts and time.
struct Invocation {
    deadline: Instant,
    margin: Duration,
    max_attempts: u32,
}

impl Acknowledge for Invocation {
    fn may_retry(&self, attempt: u32, error: &SinkError, pause: Duration) -> Result<(), String> {
        if !error.is_retryable() {
            return Err("it needs an operator; the mapping retries the batch later".to_owned());
        }
        if attempt >= self.max_attempts {
            return Err(format!("{attempt} attempts made, the most one invocation makes"));
        }
        if Instant::now() + pause + self.margin >= self.deadline {
            return Err("no time left in the invocation".to_owned());
        }
        Ok(())
    }

    fn time_left(&self) -> Option<Duration> {
        Some(self.deadline.saturating_duration_since(Instant::now()).saturating_sub(self.margin))
    }

    /// Nothing to do: the answer to the mapping is the checkpoint.
    async fn batch_delivered(&mut self, _end: &BatchEnd) -> Result<(), DeliveryError> {
        Ok(())
    }
}

impl KinesisHandler {
    /// A handler that delivers to `sinks` (at least one).
    pub fn new(config: HandlerConfig, sinks: Vec<Arc<dyn Sink>>) -> Result<Self, ConfigError> {
        let pipeline = Pipeline::new(config.pipeline.clone(), sinks)?;
        Ok(KinesisHandler { config, pipeline, deaggregator: Deaggregator::new(), shards: Mutex::default() })
    }

    pub fn config(&self) -> &HandlerConfig {
        &self.config
    }

    /// The sinks' names (`s3`, `postgres`, `mysql`).
    pub fn sink_names(&self) -> impl Iterator<Item = &str> {
        self.pipeline.sink_names()
    }

    /// Counts over every invocation of this container.
    pub fn stats(&self) -> PipelineStats {
        self.pipeline.stats()
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
        report.health = InvocationHealth::from_sink_writes(&self.pipeline.sink_writes(), std::time::Instant::now());
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
        let first_record = records.first().map(|r| r.kinesis.sequence_number.clone());
        let user_records = self.deaggregate(shard_id, records, report);
        let mut shard = self.take_shard(&stream, shard_id);
        let before = shard.stats();
        let mut invocation =
            Invocation { deadline, margin: self.config.deadline_margin, max_attempts: self.config.max_attempts };
        let outcome = match shard.process(user_records, &mut invocation).await {
            // The invocation's end ends the batch.
            Ok(()) => shard.flush(&mut invocation).await,
            Err(e) => Err(e),
        };
        let failed = match outcome {
            Ok(()) => None,
            Err(e) => {
                let start = shard.pending_start().map(str::to_owned).or(first_record);
                error!(
                    shard = shard_id,
                    first_record = start.as_deref().unwrap_or(""),
                    error = %e,
                    "batch not delivered; the mapping retries from its first record"
                );
                shard.abandon();
                start
            }
        };
        report.delivery.add(&shard.stats().since(&before));
        self.put_shard(&stream, shard);
        failed
    }

    /// Deaggregates one shard's Kinesis records into user records, counting them.
    fn deaggregate(
        &self,
        shard_id: &str,
        records: Vec<KinesisEventRecord>,
        report: &mut InvocationReport,
    ) -> Vec<UserRecord> {
        let mut users: Vec<UserRecord> = Vec::with_capacity(records.len());
        let mut deaggregated: Vec<DeaggregatedRecord> = Vec::new();
        let mut out_of_range = Vec::new();
        for record in records {
            let kinesis = record.kinesis;
            let arrival = Some(SystemTime::from(*kinesis.approximate_arrival_timestamp));
            deaggregated.clear();
            let format = self.deaggregator.deaggregate_into(
                Bytes::from(kinesis.data.0),
                &kinesis.partition_key,
                None,
                &mut deaggregated,
                &mut out_of_range,
            );
            if format.is_suspicious() {
                report.suspicious_records += 1;
                warn!(
                    shard = shard_id,
                    sequence_number = kinesis.sequence_number,
                    format = ?format,
                    "a record has the KPL magic but is not a valid aggregate; delivered as a plain record"
                );
            }
            report.user_records += deaggregated.len() as u64;
            users.extend(deaggregated.drain(..).map(|user| UserRecord {
                sequence_number: kinesis.sequence_number.clone(),
                sub_sequence_number: user.sub_sequence_number,
                partition_key: user.partition_key.to_string(),
                data: user.data,
                arrival,
            }));
        }
        users
    }

    fn take_shard(&self, stream: &str, shard_id: &str) -> ShardPipeline {
        let mut shards = self.shards.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        shards
            .remove(&(stream.to_owned(), shard_id.to_owned()))
            .unwrap_or_else(|| self.pipeline.shard(stream, shard_id))
    }

    fn put_shard(&self, stream: &str, shard: ShardPipeline) {
        let mut shards = self.shards.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        shards.insert((stream.to_owned(), shard.shard_id().to_owned()), shard);
    }

    /// Logs what an invocation did (one line per invocation).
    pub fn log(report: &InvocationReport, request_id: &str) {
        if report.failures.is_empty() {
            info!(
                request_id,
                records = report.records,
                user_records = report.user_records,
                delivered = report.delivery.events_delivered,
                duplicates = report.delivery.duplicates(),
                duplicates_reread = report.delivery.duplicates_reread,
                dead_letters = report.delivery.dead_letters,
                batches = report.delivery.batches,
                "batch delivered"
            );
        } else {
            warn!(
                request_id,
                records = report.records,
                delivered = report.delivery.events_delivered,
                dead_letters = report.delivery.dead_letters,
                batches = report.delivery.batches,
                sink_errors = report.delivery.sink_errors,
                failures = ?report.failures,
                unhealthy = ?report.health.reasons(),
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
