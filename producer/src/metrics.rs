//! The producer's metrics, named as the KPL names them, through the `metrics` facade: the
//! application installs whatever exporter it likes (Prometheus, CloudWatch...), or none, in
//! which case recording costs next to nothing.
//!
//! | metric | kind | labels |
//! | --- | --- | --- |
//! | `UserRecordsReceived` | counter | stream |
//! | `UserRecordsPending` | gauge | stream |
//! | `UserRecordsPut` | counter | stream; and stream, shard |
//! | `KinesisRecordsPut` | counter | stream; and stream, shard |
//! | `UserRecordsPerKinesisRecord` | histogram | stream |
//! | `KinesisRecordsPerPutRecordsRequest` | histogram | stream |
//! | `RetriesPerRecord` | histogram | stream |
//! | `UserRecordExpired` | counter | stream |
//! | `BufferingTime` (ms: from admission into the shard's window to the call) | histogram | stream |
//! | `RequestTime` (ms) | histogram | stream |
//! | `ErrorsByCode` | counter | stream, code |
//! | `ConcurrencyLimit` | gauge | stream |
//! | `RequestTimeout` (ms) | gauge | stream |
//!
//! The last two are ours (the KPL has no adaptive concurrency): how many `PutRecords` calls may
//! be in flight now, and the timeout the next call gets (see `adaptive.rs`).

use std::collections::HashMap;

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};

pub(crate) struct Metrics {
    stream: String,
    pub(crate) user_records_received: Counter,
    pub(crate) user_records_pending: Gauge,
    pub(crate) user_records_put: Counter,
    pub(crate) kinesis_records_put: Counter,
    pub(crate) user_records_per_kinesis_record: Histogram,
    pub(crate) kinesis_records_per_request: Histogram,
    pub(crate) retries_per_record: Histogram,
    pub(crate) user_record_expired: Counter,
    pub(crate) buffering_time_ms: Histogram,
    pub(crate) request_time_ms: Histogram,
    pub(crate) concurrency_limit: Gauge,
    pub(crate) request_timeout_ms: Gauge,
    errors: HashMap<String, Counter>,
    /// (`UserRecordsPut`, `KinesisRecordsPut`) labelled with the shard, made once per shard.
    shards: HashMap<String, (Counter, Counter)>,
}

impl Metrics {
    pub(crate) fn new(stream: &str) -> Self {
        let s = stream.to_owned();
        Metrics {
            user_records_received: counter!("UserRecordsReceived", "stream" => s.clone()),
            user_records_pending: gauge!("UserRecordsPending", "stream" => s.clone()),
            user_records_put: counter!("UserRecordsPut", "stream" => s.clone()),
            kinesis_records_put: counter!("KinesisRecordsPut", "stream" => s.clone()),
            user_records_per_kinesis_record: histogram!("UserRecordsPerKinesisRecord", "stream" => s.clone()),
            kinesis_records_per_request: histogram!("KinesisRecordsPerPutRecordsRequest", "stream" => s.clone()),
            retries_per_record: histogram!("RetriesPerRecord", "stream" => s.clone()),
            user_record_expired: counter!("UserRecordExpired", "stream" => s.clone()),
            buffering_time_ms: histogram!("BufferingTime", "stream" => s.clone()),
            request_time_ms: histogram!("RequestTime", "stream" => s.clone()),
            concurrency_limit: gauge!("ConcurrencyLimit", "stream" => s.clone()),
            request_timeout_ms: gauge!("RequestTimeout", "stream" => s.clone()),
            errors: HashMap::new(),
            shards: HashMap::new(),
            stream: s,
        }
    }

    /// Counts one Kinesis record of `user_records` put on `shard`, per stream and per shard.
    pub(crate) fn put(&mut self, shard: &str, user_records: usize) {
        self.user_records_put.increment(user_records as u64);
        self.kinesis_records_put.increment(1);
        let stream = &self.stream;
        let (users, kinesis) = self.shards.entry(shard.to_owned()).or_insert_with(|| {
            let labels = [("stream", stream.clone()), ("shard", shard.to_owned())];
            (counter!("UserRecordsPut", &labels), counter!("KinesisRecordsPut", &labels))
        });
        users.increment(user_records as u64);
        kinesis.increment(1);
    }

    /// Counts an error by its code (`ErrorsByCode`).
    pub(crate) fn error(&mut self, code: &str) {
        let stream = &self.stream;
        self.errors
            .entry(code.to_owned())
            .or_insert_with(|| counter!("ErrorsByCode", "stream" => stream.clone(), "code" => code.to_owned()))
            .increment(1);
    }
}
