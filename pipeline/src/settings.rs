//! The `KTK_*` settings of the pipeline, as clap arguments that the `consumer` (ECS) and `bootstrap`
//! (Lambda) binaries both flatten into their own: every setting is a `--flag` and its variable,
//! with the same names, defaults and limits in both runtimes.
//!
//! [`SinkSettings`] says where events go (S3, PostgreSQL, a MySQL-protocol store; at least one);
//! [`BatchSettings`] how they are batched and deduplicated. [`SinkSettings::connect`] builds the
//! sinks, connecting and migrating the stores, into a [`SinkSet`].

use std::sync::Arc;
use std::time::Duration;

use clap::builder::BoolishValueParser;

use crate::delivery::PipelineConfig;
use crate::mysql::MySqlSink;
use crate::postgres::{PostgresSink, StoreConfig};
use crate::s3::{S3Format, S3Sink, S3SinkConfig};
use crate::sink::{Sink, SinkError};

/// A setting that is missing or wrong, or a sink it describes that cannot be reached, named.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{variable}: {problem}")]
pub struct SettingError {
    pub variable: &'static str,
    pub problem: String,
}

/// The S3 object format, as a setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum S3FormatSetting {
    /// Parquet with zstd pages.
    Parquet,
    /// gzip JSON Lines.
    #[value(name = "jsonl-gz")]
    JsonlGz,
}

impl From<S3FormatSetting> for S3Format {
    fn from(format: S3FormatSetting) -> Self {
        match format {
            S3FormatSetting::Parquet => S3Format::Parquet,
            S3FormatSetting::JsonlGz => S3Format::JsonLinesGzip,
        }
    }
}

/// Where events are delivered: at least one of S3, PostgreSQL and a MySQL-protocol store.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
#[group(id = "sink", required = true, multiple = true, args = ["s3_bucket", "postgres_url", "mysql_url"])]
pub struct SinkSettings {
    /// S3 sink: the bucket events and dead letters are written to.
    #[arg(long = "s3-bucket", env = "KTK_S3_BUCKET", value_name = "BUCKET", help_heading = "Sinks (at least one)")]
    pub s3_bucket: Option<String>,
    /// S3 sink: the key prefix of every object.
    #[arg(
        long = "s3-prefix",
        env = "KTK_S3_PREFIX",
        value_name = "PREFIX",
        default_value = "",
        help_heading = "Sinks (at least one)"
    )]
    pub s3_prefix: String,
    /// S3 sink: the object format.
    #[arg(
        long = "s3-format",
        env = "KTK_S3_FORMAT",
        value_enum,
        default_value = "parquet",
        help_heading = "Sinks (at least one)"
    )]
    pub s3_format: S3FormatSetting,
    /// S3 sink: path-style addressing (LocalStack, MinIO).
    #[arg(long = "s3-path-style", env = "KTK_S3_PATH_STYLE", value_name = "BOOL", default_value = "false", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set, help_heading = "Sinks (at least one)")]
    pub s3_path_style: bool,
    /// The PostgreSQL real-time store (postgres://user:password@host:port/database).
    #[arg(
        long = "postgres-url",
        env = "KTK_POSTGRES_URL",
        value_name = "URL",
        hide_env_values = true,
        help_heading = "Sinks (at least one)"
    )]
    pub postgres_url: Option<String>,
    /// The MySQL-protocol real-time store: SingleStore, MySQL, MariaDB (mysql://user:password@host:port/database).
    #[arg(
        long = "mysql-url",
        env = "KTK_MYSQL_URL",
        value_name = "URL",
        hide_env_values = true,
        help_heading = "Sinks (at least one)"
    )]
    pub mysql_url: Option<String>,
    /// The stores' events table (dead letters go to `<TABLE>_dead_letters`).
    #[arg(
        long = "store-table",
        env = "KTK_STORE_TABLE",
        value_name = "TABLE",
        default_value = "events",
        help_heading = "Sinks (at least one)"
    )]
    pub store_table: String,
}

/// Every variable [`SinkSettings`] and [`BatchSettings`] read: the settings the `consumer` and
/// `bootstrap` binaries share.
pub const SHARED_VARIABLES: [&str; 12] = [
    "KTK_S3_BUCKET",
    "KTK_S3_PREFIX",
    "KTK_S3_FORMAT",
    "KTK_S3_PATH_STYLE",
    "KTK_POSTGRES_URL",
    "KTK_MYSQL_URL",
    "KTK_STORE_TABLE",
    "KTK_BATCH_MAX_RECORDS",
    "KTK_BATCH_MAX_BYTES",
    "KTK_BATCH_WINDOW_MS",
    "KTK_BATCH_GRACE_MS",
    "KTK_DEDUP_WINDOW",
];

/// How events are batched and deduplicated: the same on ECS and Lambda.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct BatchSettings {
    /// Most user records in a batch (a Kinesis record is never split, so one aggregate larger
    /// than this is a batch of its own).
    #[arg(long = "batch-max-records", env = "KTK_BATCH_MAX_RECORDS", value_name = "RECORDS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000), help_heading = "Batches")]
    pub max_records: u64,
    /// Most bytes of user record data in a batch.
    #[arg(long = "batch-max-bytes", env = "KTK_BATCH_MAX_BYTES", value_name = "BYTES", default_value_t = 16 << 20, value_parser = clap::value_parser!(u64).range(1..=1 << 30), help_heading = "Batches")]
    pub max_bytes: u64,
    /// The Kinesis arrival-time window batches are cut on, in milliseconds.
    #[arg(long = "batch-window-ms", env = "KTK_BATCH_WINDOW_MS", value_name = "MS", default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(1..=86_400_000), help_heading = "Batches")]
    pub window_ms: u64,
    /// How long after its end a window is closed when the reader is caught up, in milliseconds.
    #[arg(long = "batch-grace-ms", env = "KTK_BATCH_GRACE_MS", value_name = "MS", default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(0..=3_600_000), help_heading = "Batches")]
    pub grace_ms: u64,
    /// Event ids per shard the in-memory dedup remembers (0 turns it off).
    #[arg(long = "dedup-window", env = "KTK_DEDUP_WINDOW", value_name = "IDS", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(0..=10_000_000), help_heading = "Batches")]
    pub dedup_window: u64,
}

impl BatchSettings {
    /// The pipeline's configuration (every other setting at its default).
    pub fn pipeline_config(&self) -> PipelineConfig {
        let size = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        PipelineConfig::default()
            .with_max_batch_records(size(self.max_records))
            .with_max_batch_bytes(size(self.max_bytes))
            .with_batch_window(Duration::from_millis(self.window_ms), Duration::from_millis(self.grace_ms))
            .with_dedup_window(size(self.dedup_window))
    }
}

/// The connected sinks, by kind (to close the stores' pools at shutdown), and as the list the
/// pipeline takes ([`all`](Self::all)).
#[derive(Debug, Clone, Default)]
pub struct SinkSet {
    pub s3: Option<Arc<S3Sink>>,
    pub postgres: Option<Arc<PostgresSink>>,
    pub mysql: Option<Arc<MySqlSink>>,
}

impl SinkSet {
    /// Every sink, S3 first.
    pub fn all(&self) -> Vec<Arc<dyn Sink>> {
        let mut sinks: Vec<Arc<dyn Sink>> = Vec::new();
        if let Some(s3) = &self.s3 {
            sinks.push(Arc::clone(s3) as Arc<dyn Sink>);
        }
        if let Some(postgres) = &self.postgres {
            sinks.push(Arc::clone(postgres) as Arc<dyn Sink>);
        }
        if let Some(mysql) = &self.mysql {
            sinks.push(Arc::clone(mysql) as Arc<dyn Sink>);
        }
        sinks
    }

    /// Closes the stores' connection pools (after the last write).
    pub async fn close(&self) {
        if let Some(postgres) = &self.postgres {
            postgres.close().await;
        }
        if let Some(mysql) = &self.mysql {
            mysql.close().await;
        }
    }
}

impl SinkSettings {
    /// The S3 sink's configuration, if a bucket is set.
    pub fn s3_config(&self) -> Option<S3SinkConfig> {
        self.s3_bucket.as_ref().map(|bucket| {
            S3SinkConfig::new(bucket, &self.s3_prefix)
                .with_format(self.s3_format.into())
                .with_path_style(self.s3_path_style)
        })
    }

    /// Connects the configured sinks (the stores with `store` pool settings, creating or
    /// migrating their tables). A store that cannot be reached or migrated is an error naming its
    /// variable.
    pub async fn connect(&self, aws: &aws_config::SdkConfig, store: StoreConfig) -> Result<SinkSet, SettingError> {
        let mut sinks = SinkSet::default();
        if let Some(config) = self.s3_config() {
            sinks.s3 = Some(Arc::new(S3Sink::new(aws, config)));
        }
        let problem = |variable: &'static str| move |e: SinkError| SettingError { variable, problem: e.to_string() };
        if let Some(url) = &self.postgres_url {
            let sink = PostgresSink::connect_with(url, &self.store_table, store.clone())
                .await
                .map_err(problem("KTK_POSTGRES_URL"))?;
            sink.migrate().await.map_err(problem("KTK_POSTGRES_URL"))?;
            sinks.postgres = Some(Arc::new(sink));
        }
        if let Some(url) = &self.mysql_url {
            let sink =
                MySqlSink::connect_with(url, &self.store_table, store).await.map_err(problem("KTK_MYSQL_URL"))?;
            sink.migrate().await.map_err(problem("KTK_MYSQL_URL"))?;
            sinks.mysql = Some(Arc::new(sink));
        }
        Ok(sinks)
    }
}

// How a binary parses these settings (one line per error, unknown `KTK_*` variables refused) is
// shared with the collector, which does not use the pipeline: `ktk-settings`.
pub use ktk_settings::{check_environment, one_line, parse_or_exit};

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    #[derive(Debug, Parser)]
    struct Both {
        #[command(flatten)]
        sinks: SinkSettings,
        #[command(flatten)]
        batches: BatchSettings,
    }

    fn parse(args: &[&str]) -> Result<Both, clap::Error> {
        Both::try_parse_from(std::iter::once("test").chain(args.iter().copied()))
    }

    #[test]
    fn the_shared_variables_are_exactly_those_the_settings_read() {
        let command = Both::command();
        let mut read: Vec<String> =
            command.get_arguments().filter_map(|a| a.get_env()).map(|e| e.to_string_lossy().into_owned()).collect();
        let mut listed: Vec<String> = SHARED_VARIABLES.iter().map(|v| (*v).to_owned()).collect();
        read.sort();
        listed.sort();
        assert_eq!(read, listed);
    }

    #[test]
    fn one_sink_is_enough_and_defaults_match_the_pipeline() {
        let both = parse(&["--mysql-url", "mysql://x", "--store-table", "t"]).expect("valid");
        assert_eq!((both.sinks.mysql_url.as_deref(), both.sinks.store_table.as_str()), (Some("mysql://x"), "t"));
        assert!(both.sinks.s3_config().is_none());
        assert_eq!(both.batches.pipeline_config(), PipelineConfig::default());
        let s3 = parse(&["--s3-bucket", "b", "--s3-path-style", "true", "--s3-format", "jsonl-gz"]).expect("valid");
        let config = s3.sinks.s3_config().expect("s3");
        assert_eq!((config.bucket(), config.format(), config.path_style()), ("b", S3Format::JsonLinesGzip, true));
    }

    #[test]
    fn no_sink_and_bad_values_are_refused_naming_the_setting() {
        let error = parse(&[]).expect_err("no sink");
        assert_eq!(error.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        let line = one_line(&Both::command(), &error);
        assert!(
            line.contains("--s3-bucket / KTK_S3_BUCKET") && line.contains("--postgres-url / KTK_POSTGRES_URL"),
            "{line}"
        );
        assert!(!line.contains('\n'));
        for (flag, value) in [
            ("--s3-format", "csv"),
            ("--s3-path-style", "maybe"),
            ("--batch-max-records", "0"),
            ("--batch-max-records", "many"),
            ("--batch-max-bytes", "0"),
            ("--batch-window-ms", "0"),
            ("--batch-window-ms", "18446744073709551615"),
            ("--dedup-window", "-1"),
        ] {
            let error = parse(&["--s3-bucket", "b", &format!("{flag}={value}")]).expect_err("bad");
            let line = one_line(&Both::command(), &error);
            assert!(line.contains(flag) && line.contains("KTK_"), "{flag} {value}: {line}");
        }
    }
}
