//! The `consumer` binary's settings: every one a `--flag` and its `KTK_*` environment variable
//! (`consumer --help` lists them with their defaults and units). The sink and batch settings are
//! the pipeline's own ([`SinkSettings`], [`BatchSettings`]), shared with the Lambda's `bootstrap`.

use std::net::SocketAddr;
use std::time::{Duration, UNIX_EPOCH};

use clap::Parser;
use ktk_consumer::{InitialPosition, WorkerConfig};
use ktk_pipeline::PipelineConfig;
use ktk_pipeline::settings::{BatchSettings, SinkSettings};

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable lines.
    Text,
}

/// Where a worker starts in a shard that was never checkpointed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StartSetting {
    /// The oldest record still in the shard.
    #[value(name = "trim_horizon", alias = "trim-horizon")]
    TrimHorizon,
    /// Records put after the worker starts.
    Latest,
    /// The first record at or after --initial-timestamp-ms.
    #[value(name = "at_timestamp", alias = "at-timestamp")]
    AtTimestamp,
}

/// A setting that parses but cannot work with the others.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{setting}: {problem}")]
pub struct SettingError {
    pub setting: &'static str,
    pub problem: String,
}

/// The delivery pipeline as an ECS task: a KCL-style worker reads the stream with leases shared
/// by every task of the application, and the pipeline delivers its records to S3 and the
/// real-time stores, checkpointing after every sink acknowledged a batch.
#[derive(Debug, Clone, Parser)]
#[command(name = "consumer", version, about, long_about = None)]
pub struct Settings {
    /// The stream to consume.
    #[arg(long, env = "KTK_STREAM", value_name = "NAME", help_heading = "Stream and leases")]
    pub stream: String,
    /// The application name, which names the lease table (as in the KCL).
    #[arg(long, env = "KTK_APPLICATION", value_name = "NAME", help_heading = "Stream and leases")]
    pub application: String,
    /// This worker's id in the lease table [default: a random UUID].
    #[arg(long = "worker-id", env = "KTK_WORKER_ID", value_name = "ID", help_heading = "Stream and leases")]
    pub worker_id: Option<String>,
    /// Where to start in shards never checkpointed.
    #[arg(
        long = "initial-position",
        env = "KTK_INITIAL_POSITION",
        value_enum,
        ignore_case = true,
        default_value = "trim_horizon",
        help_heading = "Stream and leases"
    )]
    pub initial_position: StartSetting,
    /// The time for --initial-position at-timestamp, in milliseconds since the Unix epoch.
    #[arg(
        long = "initial-timestamp-ms",
        env = "KTK_INITIAL_TIMESTAMP_MS",
        value_name = "MS",
        required_if_eq("initial_position", "at_timestamp"),
        help_heading = "Stream and leases"
    )]
    pub initial_timestamp_ms: Option<u64>,
    /// Read with enhanced fan-out, registered as this consumer name [default: polling].
    #[arg(long = "fan-out", env = "KTK_FAN_OUT", value_name = "CONSUMER", help_heading = "Stream and leases")]
    pub fan_out: Option<String>,

    #[command(flatten)]
    pub timings: WorkerTimings,

    #[command(flatten)]
    pub sinks: SinkSettings,

    #[command(flatten)]
    pub batches: BatchSettings,

    /// Address of GET /health and GET /metrics.
    #[arg(
        long,
        env = "KTK_LISTEN",
        value_name = "ADDR:PORT",
        default_value = "0.0.0.0:8080",
        help_heading = "Process"
    )]
    pub listen: SocketAddr,
    /// GET /health answers 503 once a sink has failed every write, the lease table or the stream has failed every call, or the worker has held no lease while some were free, for this long, in milliseconds.
    #[arg(long = "unhealthy-after-ms", env = "KTK_UNHEALTHY_AFTER_MS", value_name = "MS", default_value_t = 60_000, value_parser = millis(), help_heading = "Process")]
    pub unhealthy_after_ms: u64,
    /// Log format.
    #[arg(long = "log-format", env = "KTK_LOG_FORMAT", value_enum, default_value = "json", help_heading = "Process")]
    pub log_format: LogFormat,
}

/// Milliseconds from 1 ms to a day: longer is a mistake (and would overflow clock arithmetic).
fn millis() -> clap::builder::RangedU64ValueParser<u64> {
    clap::value_parser!(u64).range(1..=86_400_000)
}

/// The worker's timings, in milliseconds; unset ones are the KCL's defaults.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct WorkerTimings {
    /// A lease not renewed for this long is taken over by another worker [default: 10000, the KCL's failoverTimeMillis].
    #[arg(long = "failover-ms", env = "KTK_FAILOVER_MS", value_name = "MS", value_parser = millis(), help_heading = "Worker timings")]
    pub failover_ms: Option<u64>,
    /// Leases are renewed this often [default: failover / 3 - 25].
    #[arg(long = "renew-ms", env = "KTK_RENEW_MS", value_name = "MS", value_parser = millis(), help_heading = "Worker timings")]
    pub renew_ms: Option<u64>,
    /// Balancing (taking leases from busier workers) runs this often [default: (failover + 25) * 2].
    #[arg(long = "taking-ms", env = "KTK_TAKING_MS", value_name = "MS", value_parser = millis(), help_heading = "Worker timings")]
    pub taking_ms: Option<u64>,
    /// Shortest time between two balance rounds: a worker balances early, at its next scan, when a new worker appears or its last round lost a race, but never closer than this to its previous round [default: 1000].
    #[arg(long = "min-balance-ms", env = "KTK_MIN_BALANCE_MS", value_name = "MS", value_parser = millis(), help_heading = "Worker timings")]
    pub min_balance_ms: Option<u64>,
    /// The lease table is scanned for unowned and expired leases this often [default: 1000].
    #[arg(long = "discovery-ms", env = "KTK_DISCOVERY_MS", value_name = "MS", value_parser = millis(), help_heading = "Worker timings")]
    pub discovery_ms: Option<u64>,
    /// Shards are listed into leases this often [default: 60000].
    #[arg(long = "shard-sync-ms", env = "KTK_SHARD_SYNC_MS", value_name = "MS", value_parser = millis(), help_heading = "Worker timings")]
    pub shard_sync_ms: Option<u64>,
    /// A child shard checks whether its parents are done this often [default: 10000].
    #[arg(long = "parent-poll-ms", env = "KTK_PARENT_POLL_MS", value_name = "MS", value_parser = millis(), help_heading = "Worker timings")]
    pub parent_poll_ms: Option<u64>,
    /// Pause between reads of a shard that returned nothing [default: 1500].
    #[arg(long = "idle-ms", env = "KTK_IDLE_MS", value_name = "MS", value_parser = millis(), help_heading = "Worker timings")]
    pub idle_ms: Option<u64>,
    /// Read a shard's next batch while the pipeline works on the current one (one batch ahead per shard; polling only).
    #[arg(long = "read-ahead", env = "KTK_READ_AHEAD", value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set, help_heading = "Worker timings")]
    pub read_ahead: bool,
    /// How long SIGTERM waits for shards to finish before releasing their leases.
    #[arg(long = "shutdown-timeout-ms", env = "KTK_SHUTDOWN_TIMEOUT_MS", value_name = "MS", default_value_t = 20_000, value_parser = millis(), help_heading = "Worker timings")]
    pub shutdown_timeout_ms: u64,
}

impl Settings {
    /// The worker's configuration, checked (e.g. renewals more often than the failover time).
    pub fn worker_config(&self) -> Result<WorkerConfig, SettingError> {
        let mut worker = WorkerConfig::new(&self.stream, &self.application);
        if let Some(id) = &self.worker_id {
            worker = worker.with_worker_id(id);
        }
        match self.initial_position {
            StartSetting::TrimHorizon => {}
            StartSetting::Latest => worker = worker.with_initial_position(InitialPosition::Latest),
            StartSetting::AtTimestamp => {
                let ms = self.initial_timestamp_ms.ok_or(SettingError {
                    setting: "KTK_INITIAL_TIMESTAMP_MS",
                    problem: "is required with KTK_INITIAL_POSITION=at_timestamp".into(),
                })?;
                worker = worker.with_initial_timestamp(UNIX_EPOCH + Duration::from_millis(ms));
            }
        }
        if let Some(name) = &self.fan_out {
            worker = worker.with_enhanced_fan_out(name);
        }
        let t = &self.timings;
        let ms = Duration::from_millis;
        if let Some(v) = t.failover_ms {
            worker = worker.with_failover_time(ms(v));
        }
        if let Some(v) = t.renew_ms {
            worker = worker.with_renew_interval(ms(v));
        }
        if let Some(v) = t.taking_ms {
            worker = worker.with_taking_interval(ms(v));
        }
        if let Some(v) = t.min_balance_ms {
            worker = worker.with_min_balance_interval(ms(v));
        }
        if let Some(v) = t.discovery_ms {
            worker = worker.with_discovery_interval(ms(v));
        }
        if let Some(v) = t.shard_sync_ms {
            worker = worker.with_shard_sync_interval(ms(v));
        }
        if let Some(v) = t.parent_poll_ms {
            worker = worker.with_parent_poll_interval(ms(v));
        }
        if let Some(v) = t.idle_ms {
            worker = worker.with_idle_time_between_reads(ms(v));
        }
        // The pipeline closes a quiet shard's batch window on empty reads.
        worker = worker
            .with_read_ahead(t.read_ahead)
            .with_empty_batches(true)
            .with_shutdown_timeout(ms(t.shutdown_timeout_ms));
        worker.validate().map_err(|e| SettingError { setting: "KTK_*_MS worker timings", problem: e.to_string() })?;
        Ok(worker)
    }

    /// The pipeline's configuration.
    pub fn pipeline_config(&self) -> PipelineConfig {
        self.batches.pipeline_config()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(args: &[&str]) -> Result<Settings, clap::Error> {
        Settings::try_parse_from(std::iter::once("consumer").chain(args.iter().copied()))
    }

    const BASE: [&str; 6] = ["--stream", "s", "--application", "a", "--s3-bucket", "b"];

    #[test]
    fn the_minimum_is_a_stream_an_application_and_a_sink() {
        let s =
            settings(&["--stream", "events", "--application", "app", "--postgres-url", "postgres://x"]).expect("valid");
        let worker = s.worker_config().expect("valid worker");
        assert_eq!((worker.stream(), worker.table_name()), ("events", "app"));
        assert_eq!(s.sinks.store_table, "events");
        assert_eq!(s.listen, "0.0.0.0:8080".parse().expect("addr"));
        assert_eq!(s.log_format, LogFormat::Json);
        assert_eq!(s.pipeline_config(), PipelineConfig::default());
        assert!(worker.read_ahead(), "read-ahead is on by default");
        assert_eq!(worker.min_balance_interval(), Duration::from_secs(1));
        let mut args = BASE.to_vec();
        args.extend(["--read-ahead", "false", "--min-balance-ms", "250"]);
        let tuned = settings(&args).expect("valid").worker_config().expect("valid worker");
        assert!(!tuned.read_ahead());
        assert_eq!(tuned.min_balance_interval(), Duration::from_millis(250));
        let no_stream = settings(&["--application", "app", "--s3-bucket", "b"]).expect_err("no stream");
        assert!(no_stream.to_string().contains("--stream"), "{no_stream}");
        let no_sink = settings(&["--stream", "s", "--application", "a"]).expect_err("no sink");
        assert_eq!(no_sink.kind(), clap::error::ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn bad_values_name_their_setting() {
        for (flag, value) in [
            ("--initial-position", "yesterday"),
            ("--s3-format", "csv"),
            ("--failover-ms", "ten"),
            ("--failover-ms", "18446744073709551615"),
            ("--failover-ms", "0"),
            ("--listen", "here"),
            ("--log-format", "xml"),
            ("--s3-path-style", "maybe"),
            ("--batch-max-records", "0"),
            ("--read-ahead", "maybe"),
            ("--min-balance-ms", "0"),
        ] {
            let mut args = BASE.to_vec();
            args.extend([flag, value]);
            let error = settings(&args).expect_err("bad");
            assert!(error.to_string().contains(flag), "{flag}={value}: {error}");
        }
        let mut args = BASE.to_vec();
        args.extend(["--initial-position", "at_timestamp"]);
        let error = settings(&args).expect_err("no timestamp");
        assert!(error.to_string().contains("--initial-timestamp-ms"), "{error}");
        let mut args = BASE.to_vec();
        args.extend(["--failover-ms", "1000", "--renew-ms", "5000"]);
        let error = settings(&args).expect("parses").worker_config().expect_err("renew >= failover");
        assert!(error.problem.contains("renew_interval"), "{error}");
    }
}
