//! The producer's metrics, named as the KPL names them, through the `metrics` facade: the
//! application installs whatever exporter it likes (Prometheus, CloudWatch...), or none, in
//! which case recording costs next to nothing.
//!
//! | metric | kind | labels |
//! | --- | --- | --- |
//! | `UserRecordsReceived` | counter | stream |
//! | `UserRecordsPending` | gauge | stream |
//! | `UserRecordsPut` | counter | stream |
//! | `KinesisRecordsPut` | counter | stream |
//! | `UserRecordsPerKinesisRecord` | histogram | stream |
//! | `KinesisRecordsPerPutRecordsRequest` | histogram | stream |
//! | `RetriesPerRecord` | histogram | stream |
//! | `UserRecordExpired` | counter | stream |
//! | `BufferingTime` (ms) | histogram | stream |
//! | `RequestTime` (ms) | histogram | stream |
//! | `ErrorsByCode` | counter | stream, code |

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
    errors: HashMap<String, Counter>,
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
            errors: HashMap::new(),
            stream: s,
        }
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
