//! The producer's settings, with the KPL's defaults.
//!
//! Each setting that the KPL has is named after its KPL property (`default_config.properties` of
//! amazon-kinesis-producer) and defaults to the KPL's value. Settings the KPL lacks (the memory
//! bound, the put timeout, the ordering guarantee) are ours and say so.

use std::time::Duration;

use ktk_proto::aggregation::{DEFAULT_MAX_AGGREGATE_SIZE, DEFAULT_MAX_RECORD_SIZE, LARGEST_MAX_RECORD_SIZE};

use crate::error::ConfigError;

/// Most records in one `PutRecords` call
/// ([PutRecords](https://docs.aws.amazon.com/kinesis/latest/APIReference/API_PutRecords.html)).
pub const PUT_RECORDS_MAX_RECORDS: usize = 500;
/// Most bytes (data plus partition keys) in one `PutRecords` call: 5 MiB.
pub const PUT_RECORDS_MAX_BYTES: usize = 5 * 1024 * 1024;
/// Records per second one shard accepts
/// ([quotas](https://docs.aws.amazon.com/streams/latest/dev/service-sizes-and-limits.html)).
pub const SHARD_MAX_RECORDS_PER_SEC: f64 = 1_000.0;
/// Bytes per second one shard accepts: 1 MiB.
pub const SHARD_MAX_BYTES_PER_SEC: f64 = 1024.0 * 1024.0;
/// A shard whose records waiting to be sent pass this many bytes is sent at once, without waiting
/// for the buffering time.
pub const SHARD_EARLY_FLUSH_BYTES: usize = 256 * 1024;

/// How a [`Producer`](crate::Producer) behaves. Build with `ProducerConfig::new(stream)` and the
/// `with_*` methods; every method documents its default.
#[derive(Debug, Clone, PartialEq)]
pub struct ProducerConfig {
    pub(crate) stream: String,
    pub(crate) aggregation_enabled: bool,
    pub(crate) aggregation_max_size: usize,
    pub(crate) max_record_size: usize,
    pub(crate) collection_max_count: usize,
    pub(crate) collection_max_size: usize,
    pub(crate) record_max_buffered_time: Duration,
    pub(crate) record_ttl: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) max_request_timeout: Duration,
    pub(crate) max_connections: usize,
    pub(crate) rate_limit_percent: u32,
    pub(crate) fail_if_throttled: bool,
    pub(crate) max_outstanding_records: usize,
    pub(crate) max_outstanding_bytes: usize,
    pub(crate) put_timeout: Duration,
    pub(crate) min_backoff: Duration,
    pub(crate) max_backoff: Duration,
    pub(crate) shard_map_min_refresh_interval: Duration,
    pub(crate) strict_ordering: bool,
}

impl ProducerConfig {
    /// Settings for putting into `stream` (a stream name or ARN), with every default.
    pub fn new(stream: impl Into<String>) -> Self {
        ProducerConfig {
            stream: stream.into(),
            aggregation_enabled: true,
            aggregation_max_size: DEFAULT_MAX_AGGREGATE_SIZE,
            max_record_size: DEFAULT_MAX_RECORD_SIZE,
            collection_max_count: PUT_RECORDS_MAX_RECORDS,
            collection_max_size: PUT_RECORDS_MAX_BYTES,
            record_max_buffered_time: Duration::from_millis(100),
            record_ttl: Duration::from_secs(30),
            request_timeout: Duration::from_secs(6),
            max_request_timeout: Duration::from_secs(30),
            max_connections: 24,
            rate_limit_percent: 150,
            fail_if_throttled: false,
            max_outstanding_records: 250_000,
            max_outstanding_bytes: 128 * 1024 * 1024,
            put_timeout: Duration::from_secs(30),
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            shard_map_min_refresh_interval: Duration::from_secs(1),
            strict_ordering: false,
        }
    }

    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// Whether user records are packed into KPL aggregates (KPL `AggregationEnabled`, default
    /// `true`). Off, each user record is its own Kinesis record.
    pub fn with_aggregation(mut self, enabled: bool) -> Self {
        self.aggregation_enabled = enabled;
        self
    }

    /// Largest aggregate, in bytes (KPL `AggregationMaxSize`, default 51,200). 64 bytes up to the
    /// maximum record size.
    pub fn with_aggregation_max_size(mut self, bytes: usize) -> Self {
        self.aggregation_max_size = bytes;
        self
    }

    /// The stream's maximum record size, data plus partition key (default 1 MiB; streams can be
    /// configured for up to 10 MiB).
    pub fn with_max_record_size(mut self, bytes: usize) -> Self {
        self.max_record_size = bytes;
        self
    }

    /// Most Kinesis records in one `PutRecords` call (KPL `CollectionMaxCount`, default 500, the
    /// service's maximum).
    pub fn with_collection_max_count(mut self, records: usize) -> Self {
        self.collection_max_count = records;
        self
    }

    /// Most bytes in one `PutRecords` call (KPL `CollectionMaxSize`, default 5 MiB, the service's
    /// maximum).
    pub fn with_collection_max_size(mut self, bytes: usize) -> Self {
        self.collection_max_size = bytes;
        self
    }

    /// Longest a record waits in the producer's buffers before it is sent (KPL
    /// `RecordMaxBufferedTime`, default 100 ms). Longer means bigger aggregates and fewer calls.
    pub fn with_record_max_buffered_time(mut self, time: Duration) -> Self {
        self.record_max_buffered_time = time;
        self
    }

    /// How long the producer keeps trying to put a record before it fails the record's future
    /// with [`PutErrorKind::Expired`](crate::PutErrorKind::Expired) (KPL `RecordTtl`, default 30 s).
    ///
    /// The clock starts when the record is admitted into its shard's pipeline (aggregation,
    /// batching, calls), not when `put` accepts it: a record waits unadmitted, its clock not
    /// running, while its shard already holds what the calls in flight can take next (its
    /// window: at most one call's worth, one second of the shard's rate limit, and its share of
    /// what the current concurrency limit lets out at once) or backs off after a failure. So
    /// when Kinesis answers slowly the producer slows down, `put` waits for room and the caller
    /// with it, and records do not expire in a queue; the TTL fails what cannot be sent: records
    /// whose calls keep failing, or that the rate limit holds back longer than the TTL.
    pub fn with_record_ttl(mut self, ttl: Duration) -> Self {
        self.record_ttl = ttl;
        self
    }

    /// Timeout of one `PutRecords` call while calls are answered in time (KPL `RequestTimeout`,
    /// default 6 s). A call past its timeout counts as congestion, and the producer waits for its
    /// answer up to twice its timeout before giving up on it and sending its records again
    /// (a late answer settles its records without copies). After a timeout the calls that follow
    /// get longer ones, up to [`with_max_request_timeout`](Self::with_max_request_timeout), and
    /// come back down to this as answers come back fast again. It is also the latency the concurrency limit measures
    /// health against: a call answered within half of it is healthy, one answered after it is
    /// congestion (see [`with_max_connections`](Self::with_max_connections)).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Longest timeout a `PutRecords` call is given after calls before it timed out (ours;
    /// default 30 s, and never less than the request timeout). Each timeout doubles the next
    /// calls' timeout up to this; the producer gives up on a call at twice the timeout it was
    /// given. A call given up on may still have been written, and its records are sent again
    /// (at-least-once; consumers drop the copies by event id).
    pub fn with_max_request_timeout(mut self, timeout: Duration) -> Self {
        self.max_request_timeout = timeout;
        self
    }

    /// Most `PutRecords` calls in flight at once (KPL `MaxConnections`, default 24), the ceiling
    /// of the adaptive concurrency limit. The producer starts at this many and adapts (AIMD):
    /// a call that times out, is throttled (as a whole or for at least half its entries) or is
    /// answered after the request timeout halves the calls in flight; each call answered within
    /// half the request timeout adds `1 / limit`, back up to this. `Producer::stats()` and the
    /// `ConcurrencyLimit` gauge give the current limit.
    pub fn with_max_connections(mut self, connections: usize) -> Self {
        self.max_connections = connections;
        self
    }

    /// Per-shard rate limit as a percentage of the shard's quota of 1,000 records/s and 1 MiB/s
    /// (KPL `RateLimit`, default 150: a little over the quota, so the producer finds the real
    /// limit while never hammering a shard). An aggregate counts as one record.
    pub fn with_rate_limit_percent(mut self, percent: u32) -> Self {
        self.rate_limit_percent = percent;
        self
    }

    /// Fail a record at its first throttling error instead of retrying it (KPL `FailIfThrottled`,
    /// default `false`).
    pub fn with_fail_if_throttled(mut self, fail: bool) -> Self {
        self.fail_if_throttled = fail;
        self
    }

    /// Most user records accepted and not yet resolved (ours; default 250,000). When reached,
    /// `put` waits and `try_put` hands the record back.
    pub fn with_max_outstanding_records(mut self, records: usize) -> Self {
        self.max_outstanding_records = records;
        self
    }

    /// Most bytes (data plus partition keys) of user records accepted and not yet resolved (ours;
    /// default 128 MiB). This is what keeps the producer's memory flat whatever the put rate.
    pub fn with_max_outstanding_bytes(mut self, bytes: usize) -> Self {
        self.max_outstanding_bytes = bytes;
        self
    }

    /// Longest `put` waits for room before handing the record back with
    /// [`PutErrorKind::Timeout`](crate::PutErrorKind::Timeout) (ours; default 30 s).
    pub fn with_put_timeout(mut self, timeout: Duration) -> Self {
        self.put_timeout = timeout;
        self
    }

    /// Backoff between attempts of a failed record: jittered, doubling from `min` up to `max`
    /// (`ktk_backoff::delay`; defaults 100 ms and 5 s).
    pub fn with_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.min_backoff = min;
        self.max_backoff = max;
        self
    }

    /// Shortest time between two shard-map refreshes (default 1 s), so a burst of mispredicted
    /// records causes one `ListShards`, not hundreds.
    pub fn with_shard_map_min_refresh_interval(mut self, interval: Duration) -> Self {
        self.shard_map_min_refresh_interval = interval;
        self
    }

    /// Keep records of one shard in the order they were put, even when Kinesis fails some
    /// entries of a call and accepts the next ones (ours; default `false`, as the KPL).
    ///
    /// Without it, records of a shard are still sent in order, one call at a time per shard, and
    /// a failed record is retried before anything newer of its shard; but when a call carries
    /// several Kinesis records for one shard and an early one fails while a later one succeeds,
    /// the later one is in the stream first. With it, a call carries at most one Kinesis record
    /// per shard, which caps a shard at one aggregate per round trip (51 KB per ~20-50 ms on AWS,
    /// above the shard's 1 MiB/s quota; use it with aggregation on).
    pub fn with_strict_ordering(mut self, strict: bool) -> Self {
        self.strict_ordering = strict;
        self
    }

    /// Checks every setting; the error names the one to fix.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |setting: &'static str, problem: String| Err(ConfigError { setting, problem });
        if self.stream.is_empty() {
            return bad("stream", "is empty; give the stream's name or ARN".into());
        }
        if !(1024..=LARGEST_MAX_RECORD_SIZE).contains(&self.max_record_size) {
            return bad("max_record_size", format!("{} is not between 1 KiB and 10 MiB", self.max_record_size));
        }
        if self.aggregation_max_size < 64 || self.aggregation_max_size > self.max_record_size {
            return bad(
                "aggregation_max_size",
                format!(
                    "{} is not between 64 and max_record_size ({})",
                    self.aggregation_max_size, self.max_record_size
                ),
            );
        }
        if !(1..=PUT_RECORDS_MAX_RECORDS).contains(&self.collection_max_count) {
            return bad("collection_max_count", format!("{} is not between 1 and 500", self.collection_max_count));
        }
        if self.collection_max_size < self.max_record_size || self.collection_max_size > PUT_RECORDS_MAX_BYTES {
            return bad(
                "collection_max_size",
                format!("{} is not between max_record_size and 5 MiB", self.collection_max_size),
            );
        }
        if self.record_ttl.is_zero() {
            return bad("record_ttl", "is zero".into());
        }
        if self.request_timeout.is_zero() {
            return bad("request_timeout", "is zero".into());
        }
        if self.max_request_timeout.is_zero() {
            return bad("max_request_timeout", "is zero".into());
        }
        if self.max_connections == 0 || self.max_connections > 256 {
            return bad("max_connections", format!("{} is not between 1 and 256", self.max_connections));
        }
        if self.rate_limit_percent == 0 {
            return bad("rate_limit_percent", "is zero: nothing could ever be sent".into());
        }
        if self.max_outstanding_records == 0 {
            return bad("max_outstanding_records", "is zero".into());
        }
        if self.max_outstanding_bytes < self.max_record_size {
            return bad(
                "max_outstanding_bytes",
                format!(
                    "{} is below max_record_size ({}): a large record could never be accepted",
                    self.max_outstanding_bytes, self.max_record_size
                ),
            );
        }
        if self.max_outstanding_bytes > u32::MAX as usize {
            return bad("max_outstanding_bytes", format!("{} is above 4 GiB", self.max_outstanding_bytes));
        }
        if self.min_backoff.is_zero() || self.min_backoff > self.max_backoff {
            return bad("backoff", "min must be above zero and at most max".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_kpls_and_valid() {
        let c = ProducerConfig::new("s");
        assert!(c.validate().is_ok());
        assert_eq!(c.record_max_buffered_time, Duration::from_millis(100));
        assert_eq!(c.record_ttl, Duration::from_secs(30));
        assert_eq!(c.aggregation_max_size, 51_200);
        assert_eq!((c.collection_max_count, c.collection_max_size), (500, 5 * 1024 * 1024));
        assert_eq!(c.rate_limit_percent, 150);
        assert_eq!(c.request_timeout, Duration::from_secs(6));
        assert_eq!(c.max_connections, 24);
    }

    #[test]
    fn bad_settings_name_themselves() {
        let cases = [
            (ProducerConfig::new(""), "stream"),
            (ProducerConfig::new("s").with_aggregation_max_size(10), "aggregation_max_size"),
            (ProducerConfig::new("s").with_collection_max_count(501), "collection_max_count"),
            (ProducerConfig::new("s").with_rate_limit_percent(0), "rate_limit_percent"),
            (ProducerConfig::new("s").with_max_outstanding_bytes(10), "max_outstanding_bytes"),
            (ProducerConfig::new("s").with_record_ttl(Duration::ZERO), "record_ttl"),
        ];
        for (config, setting) in cases {
            let error = config.validate().expect_err(setting);
            assert_eq!(error.setting, setting);
            assert!(error.to_string().contains(setting));
        }
    }
}
