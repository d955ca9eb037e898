//! The function's settings: every one a `--flag` and its `KTK_*` environment variable (Lambda sets
//! only the variables; `bootstrap --help` lists them). The sink and batch settings are the
//! pipeline's own, read the same way by the ECS `consumer`.
//!
//! At least one sink is required. A missing or bad setting fails the init, naming the variable.

use std::time::Duration;

use clap::Parser;
use ktk_pipeline::postgres::StoreConfig;
use ktk_pipeline::settings::{BatchSettings, SinkSettings};

use crate::handler::HandlerConfig;

/// The delivery pipeline as an AWS Lambda function behind a Kinesis event source mapping: the same
/// decoding, dedup, batches and sinks as the ECS consumer; a partial batch response names the
/// first record not delivered.
#[derive(Debug, Clone, Parser)]
#[command(name = "bootstrap", version, about, long_about = None)]
pub struct LambdaSettings {
    #[command(flatten)]
    pub sinks: SinkSettings,

    #[command(flatten)]
    pub batches: BatchSettings,

    /// The stream name written with the events [default: from each record's eventSourceARN].
    #[arg(long, env = "KTK_STREAM", value_name = "NAME", help_heading = "Lambda")]
    pub stream: Option<String>,
    /// Attempts at one sink write within an invocation.
    #[arg(long = "sink-max-attempts", env = "KTK_SINK_MAX_ATTEMPTS", value_name = "ATTEMPTS", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1_000), help_heading = "Lambda")]
    pub sink_max_attempts: u32,
    /// Stop writing this long before the invocation's deadline, in milliseconds.
    #[arg(long = "deadline-margin-ms", env = "KTK_DEADLINE_MARGIN_MS", value_name = "MS", default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(0..=900_000), help_heading = "Lambda")]
    pub deadline_margin_ms: u64,
    /// Connections per store pool and container (a container runs one invocation at a time).
    #[arg(long = "store-max-connections", env = "KTK_STORE_MAX_CONNECTIONS", value_name = "CONNECTIONS", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=100), help_heading = "Lambda")]
    pub store_max_connections: u32,
    /// The CloudWatch namespace of the metrics each invocation logs in embedded metric format (1 to 255 printable ASCII characters, not AWS/...).
    #[arg(long = "metrics-namespace", env = "KTK_METRICS_NAMESPACE", value_name = "NAMESPACE", default_value = crate::emf::DEFAULT_NAMESPACE, value_parser = crate::emf::parse_namespace, help_heading = "Lambda")]
    pub metrics_namespace: String,
}

impl LambdaSettings {
    /// The handler's configuration.
    pub fn handler_config(&self) -> HandlerConfig {
        let defaults = HandlerConfig::default();
        let (retry_min, retry_max) = (Duration::from_millis(100), Duration::from_secs(5));
        let mut handler = defaults
            .with_pipeline(self.batches.pipeline_config().with_retry_backoff(retry_min, retry_max))
            .with_max_attempts(self.sink_max_attempts)
            .with_deadline_margin(Duration::from_millis(self.deadline_margin_ms));
        if let Some(stream) = &self.stream {
            handler = handler.with_stream(stream);
        }
        handler
    }

    /// The stores' pool settings.
    pub fn store_config(&self) -> StoreConfig {
        StoreConfig::default().with_max_connections(self.store_max_connections)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(args: &[&str]) -> Result<LambdaSettings, clap::Error> {
        LambdaSettings::try_parse_from(std::iter::once("bootstrap").chain(args.iter().copied()))
    }

    #[test]
    fn a_sink_is_enough_and_the_stream_comes_from_the_event() {
        let s = settings(&["--s3-bucket", "b", "--s3-path-style", "true"]).expect("valid");
        let s3 = s.sinks.s3_config().expect("s3");
        assert_eq!((s3.bucket(), s3.path_style()), ("b", true));
        assert_eq!(s.sinks.store_table, "events");
        let handler = s.handler_config();
        assert_eq!(handler.pipeline().max_batch_records(), 10_000);
        assert_eq!(handler.deadline_margin(), Duration::from_secs(1));
        assert_eq!(handler, HandlerConfig::default());
        assert_eq!(s.store_config().max_connections(), 2);
        assert_eq!(s.metrics_namespace, "ktk/lambda");

        let s = settings(&[
            "--postgres-url",
            "postgres://x",
            "--batch-max-records",
            "500",
            "--dedup-window",
            "0",
            "--sink-max-attempts",
            "3",
            "--deadline-margin-ms",
            "2500",
            "--store-max-connections",
            "4",
            "--metrics-namespace",
            "analytics/delivery",
        ])
        .expect("valid");
        let handler = s.handler_config();
        assert_eq!(handler.pipeline().max_batch_records(), 500);
        assert_eq!(handler.pipeline().dedup_window(), 0);
        assert_eq!(handler.max_attempts(), 3);
        assert_eq!(handler.deadline_margin(), Duration::from_millis(2500));
        assert_eq!(s.store_max_connections, 4);
        assert_eq!(s.metrics_namespace, "analytics/delivery");
    }

    #[test]
    fn bad_values_name_their_setting() {
        let error = settings(&[]).expect_err("no sink");
        assert_eq!(error.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        for (flag, value) in [
            ("--s3-format", "csv"),
            ("--batch-max-records", "many"),
            ("--batch-max-bytes", "0"),
            ("--sink-max-attempts", "-1"),
            ("--deadline-margin-ms", "1s"),
            ("--store-max-connections", "0"),
            ("--metrics-namespace", "AWS/Lambda"),
        ] {
            let error = settings(&["--s3-bucket", "b", &format!("{flag}={value}")]).expect_err("bad");
            assert!(error.to_string().contains(flag), "{flag}: {error}");
        }
    }
}
