//! [`WorkerConfig`]: how a worker runs, with every timing defaulted to the KCL's (see the table
//! on [`Worker`](crate::Worker)).

use std::time::{Duration, SystemTime};

use crate::error::{Error, Result};
use crate::lease::InitialPosition;
use crate::retrieval::GET_RECORDS_MAX_RECORDS;

const EPSILON: Duration = Duration::from_millis(25);

/// How a worker runs. Every timing defaults to the KCL's (see the table on [`Worker`](crate::Worker)).
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub(crate) stream: String,
    pub(crate) table_name: String,
    pub(crate) worker_id: String,
    pub(crate) initial_position: InitialPosition,
    pub(crate) initial_timestamp: Option<SystemTime>,
    pub(crate) failover_time: Duration,
    pub(crate) renew_interval: Option<Duration>,
    pub(crate) taking_interval: Option<Duration>,
    pub(crate) min_balance_interval: Duration,
    pub(crate) discovery_interval: Duration,
    pub(crate) shard_sync_interval: Duration,
    pub(crate) parent_poll_interval: Duration,
    pub(crate) idle_time_between_reads: Duration,
    pub(crate) empty_batches: bool,
    pub(crate) read_ahead: bool,
    pub(crate) max_records: i32,
    pub(crate) max_leases_per_worker: usize,
    pub(crate) max_leases_to_steal_at_once: usize,
    pub(crate) shard_range_filter: bool,
    /// Enhanced fan-out as this registered consumer name, instead of polling.
    pub(crate) fan_out: Option<String>,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) retry_min: Duration,
    pub(crate) retry_max: Duration,
}

impl WorkerConfig {
    /// A worker of application `application` (which names the lease table, as in the KCL) on
    /// `stream`, with a random worker id, starting new shards at `TRIM_HORIZON`.
    pub fn new(stream: impl Into<String>, application: impl Into<String>) -> Self {
        WorkerConfig {
            stream: stream.into(),
            table_name: application.into(),
            worker_id: uuid::Uuid::new_v4().to_string(),
            initial_position: InitialPosition::TrimHorizon,
            initial_timestamp: None,
            failover_time: Duration::from_secs(10),
            renew_interval: None,
            taking_interval: None,
            min_balance_interval: Duration::from_secs(1),
            discovery_interval: Duration::from_secs(1),
            shard_sync_interval: Duration::from_secs(60),
            parent_poll_interval: Duration::from_secs(10),
            idle_time_between_reads: Duration::from_millis(1500),
            empty_batches: false,
            read_ahead: true,
            max_records: GET_RECORDS_MAX_RECORDS,
            max_leases_per_worker: usize::MAX,
            max_leases_to_steal_at_once: 10,
            shard_range_filter: false,
            fan_out: None,
            shutdown_timeout: Duration::from_secs(20),
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(10),
        }
    }

    /// This worker's id in the lease table's `leaseOwner` (default: a random UUID, as the KCL).
    /// Must be unique among the application's live workers.
    pub fn with_worker_id(mut self, id: impl Into<String>) -> Self {
        self.worker_id = id.into();
        self
    }

    /// Where shards with no checkpoint and no processed parent start (KCL
    /// `initialPositionInStream`, default `TRIM_HORIZON`; the KCL's default is `LATEST`, which loses
    /// whatever was put before the first start).
    pub fn with_initial_position(mut self, position: InitialPosition) -> Self {
        self.initial_position = position;
        self
    }

    /// Starts new shards at the first record that arrived at or after `time` (`AT_TIMESTAMP`).
    pub fn with_initial_timestamp(mut self, time: SystemTime) -> Self {
        self.initial_position = InitialPosition::AtTimestamp;
        self.initial_timestamp = Some(time);
        self
    }

    /// A lease whose counter has not moved for this long is expired and may be taken (KCL
    /// `failoverTimeMillis`, default 10 s).
    pub fn with_failover_time(mut self, time: Duration) -> Self {
        self.failover_time = time;
        self
    }

    /// How often held leases are renewed (default failover time / 3 − 25 ms, as the KCL).
    pub fn with_renew_interval(mut self, interval: Duration) -> Self {
        self.renew_interval = Some(interval);
        self
    }

    /// How often the worker steals leases to reach its share (default (failover time + 25 ms) × 2,
    /// the KCL's `takerIntervalMillis`).
    pub fn with_taking_interval(mut self, interval: Duration) -> Self {
        self.taking_interval = Some(interval);
        self
    }

    /// Shortest time between two balance rounds (default 1 s; ktk's own). Besides every taking
    /// interval, a worker balances at its next scan when the scan shows a new worker, or when its
    /// previous round lost a race for a lease (workers that start together), but never closer than
    /// this to its previous round. Zero balances at the next scan.
    pub fn with_min_balance_interval(mut self, interval: Duration) -> Self {
        self.min_balance_interval = interval;
        self
    }

    /// How often the table is scanned for unowned and expired leases (default 1 s).
    pub fn with_discovery_interval(mut self, interval: Duration) -> Self {
        self.discovery_interval = interval;
        self
    }

    /// How often shards are listed to create leases for new ones (KCL `shardSyncIntervalMillis`,
    /// default 60 s).
    pub fn with_shard_sync_interval(mut self, interval: Duration) -> Self {
        self.shard_sync_interval = interval;
        self
    }

    /// How often a child shard checks whether its parents ended (KCL
    /// `parentShardPollIntervalMillis`, default 10 s; parents that end on this worker wake their
    /// children at once).
    pub fn with_parent_poll_interval(mut self, interval: Duration) -> Self {
        self.parent_poll_interval = interval;
        self
    }

    /// Pause after a read that found the shard caught up (KCL `idleTimeBetweenReadsInMillis`,
    /// default 1,500 ms). Reads of a shard that is behind follow each other as fast as its read
    /// quota allows (5 a second).
    pub fn with_idle_time_between_reads(mut self, time: Duration) -> Self {
        self.idle_time_between_reads = time;
        self
    }

    /// Calls the processor after reads that returned no records too, with an empty batch (KCL
    /// `callProcessRecordsEvenForEmptyRecordList`, default off): processors that flush on time
    /// (the delivery pipeline) need a call when the shard is quiet.
    pub fn with_empty_batches(mut self, empty: bool) -> Self {
        self.empty_batches = empty;
        self
    }

    /// Reads a shard's next batch while the processor works on the current one (default on):
    /// one batch ahead per shard at most, at the shard's read pace, dropped if the lease goes or
    /// the processor fails, never counted as delivered before the processor gets it. Polling only
    /// (enhanced fan-out pushes records as they come). The KCL's `PrefetchRecordsPublisher` does
    /// the same with up to `maxPendingProcessRecordsInput` (3) batches.
    pub fn with_read_ahead(mut self, read_ahead: bool) -> Self {
        self.read_ahead = read_ahead;
        self
    }

    /// Records per `GetRecords` call (KCL `maxRecords`, default 10,000).
    pub fn with_max_records(mut self, records: i32) -> Self {
        self.max_records = records;
        self
    }

    /// At most this many leases on this worker (KCL `maxLeasesForWorker`, default unlimited).
    pub fn with_max_leases_per_worker(mut self, leases: usize) -> Self {
        self.max_leases_per_worker = leases;
        self
    }

    /// At most this many leases stolen in one taking cycle (KCL `maxLeasesToStealAtOnce`, whose
    /// default of 1 makes a new worker take minutes to get its share; default here 10).
    pub fn with_max_leases_to_steal_at_once(mut self, leases: usize) -> Self {
        self.max_leases_to_steal_at_once = leases;
        self
    }

    /// Set aside (and count) user records whose hash key is outside their shard's range, as the
    /// KCL does (default off: such records exist only in that shard, and dropping them loses them).
    pub fn with_shard_range_filter(mut self, filter: bool) -> Self {
        self.shard_range_filter = filter;
        self
    }

    /// Reads with enhanced fan-out (`SubscribeToShard`, records pushed as they arrive, with a read
    /// throughput of its own per shard) as the stream consumer `consumer_name`, registered at start
    /// if missing (KCL `RetrievalConfig` with fan-out). Default: polling `GetRecords`.
    pub fn with_enhanced_fan_out(mut self, consumer_name: impl Into<String>) -> Self {
        self.fan_out = Some(consumer_name.into());
        self
    }

    /// How long a graceful shutdown waits for shard tasks to finish their batch and checkpoint
    /// before releasing every lease anyway (default 20 s, inside ECS's 30 s stop timeout).
    pub fn with_shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// Backoff for failed reads, processor errors and lease table calls (default 100 ms doubling
    /// to 10 s).
    pub fn with_retry_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.retry_min = min;
        self.retry_max = max;
        self
    }

    pub fn stream(&self) -> &str {
        &self.stream
    }

    pub fn table_name(&self) -> &str {
        &self.table_name
    }

    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// The renew interval in effect.
    pub fn renew_interval(&self) -> Duration {
        self.renew_interval.unwrap_or_else(|| (self.failover_time / 3).saturating_sub(EPSILON))
    }

    /// The taking interval in effect.
    pub fn taking_interval(&self) -> Duration {
        self.taking_interval.unwrap_or((self.failover_time + EPSILON) * 2)
    }

    /// The shortest time between two balance rounds.
    pub fn min_balance_interval(&self) -> Duration {
        self.min_balance_interval
    }

    /// Whether shards read one batch ahead of their processor.
    pub fn read_ahead(&self) -> bool {
        self.read_ahead
    }

    /// Checks the settings together; the error names the setting.
    pub fn validate(&self) -> Result<()> {
        let bad = |setting, problem: &str| Err(Error::Config { setting, problem: problem.to_owned() });
        if self.stream.is_empty() {
            return bad("stream", "the stream name is empty");
        }
        if self.table_name.is_empty() {
            return bad("application (lease table name)", "the name is empty");
        }
        if self.worker_id.is_empty() {
            return bad("worker_id", "the worker id is empty");
        }
        if self.failover_time < Duration::from_millis(100) {
            return bad("failover_time", "must be at least 100 ms");
        }
        let renew = self.renew_interval();
        if renew.is_zero() || renew >= self.failover_time {
            return bad(
                "renew_interval",
                "must be more than zero and less than the failover time (a third of it is usual)",
            );
        }
        if self.taking_interval().is_zero() || self.discovery_interval.is_zero() || self.shard_sync_interval.is_zero() {
            return bad("taking/discovery/shard sync interval", "must be more than zero");
        }
        if self.parent_poll_interval.is_zero() {
            return bad("parent_poll_interval", "must be more than zero");
        }
        if !(1..=GET_RECORDS_MAX_RECORDS).contains(&self.max_records) {
            return bad("max_records", "must be 1 to 10,000");
        }
        if self.max_leases_per_worker == 0 {
            return bad("max_leases_per_worker", "must be at least 1");
        }
        if self.initial_position == InitialPosition::AtTimestamp && self.initial_timestamp.is_none() {
            return bad("initial_timestamp", "AT_TIMESTAMP needs a timestamp (with_initial_timestamp)");
        }
        if self.fan_out.as_ref().is_some_and(|name| name.is_empty() || name.len() > 128) {
            return bad("enhanced_fan_out", "the consumer name must be 1 to 128 characters");
        }
        if self.retry_min.is_zero() || self.retry_max < self.retry_min {
            return bad("retry_backoff", "the minimum must be more than zero and at most the maximum");
        }
        Ok(())
    }
}
