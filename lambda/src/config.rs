//! The function's settings, from `KTK_*` environment variables, read once at init.
//!
//! | variable | meaning | default |
//! | --- | --- | --- |
//! | `KTK_S3_BUCKET`, `KTK_S3_PREFIX`, `KTK_S3_FORMAT`, `KTK_S3_PATH_STYLE` | the S3 sink, as for the ECS consumer | off |
//! | `KTK_POSTGRES_URL`, `KTK_MYSQL_URL`, `KTK_STORE_TABLE` | the real-time stores, as for the ECS consumer | off, off, `events` |
//! | `KTK_STREAM` | the stream name written with the events | from each record's `eventSourceARN` |
//! | `KTK_BATCH_MAX_RECORDS`, `KTK_BATCH_MAX_BYTES` | sink batch limits within an invocation | 10,000, 16 MiB |
//! | `KTK_DEDUP_WINDOW` | event ids per shard a warm container remembers | 100,000 |
//! | `KTK_SINK_MAX_ATTEMPTS` | attempts at one sink write within an invocation | 5 |
//! | `KTK_DEADLINE_MARGIN_MS` | stop writing this long before the invocation's deadline | 1,000 |
//! | `KTK_STORE_MAX_CONNECTIONS` | connections per store pool and container | 2 |
//!
//! At least one sink is required. A missing or bad setting fails the init, naming the variable.

use ktk_consumer::app::{SettingError, SinkSettings, millis, number, optional, positive};
use ktk_consumer::pipeline::postgres::StoreConfig;

use crate::handler::HandlerConfig;

/// Everything the `bootstrap` binary reads from the environment.
#[derive(Debug, Clone)]
pub struct LambdaSettings {
    pub sinks: SinkSettings,
    pub handler: HandlerConfig,
    /// Pool size of each store. An invocation writes one batch at a time, and a container runs one
    /// invocation at a time, so two connections are plenty (and many containers stay within the
    /// database's connection limit).
    pub store_max_connections: u32,
}

impl LambdaSettings {
    /// From the process environment.
    pub fn from_env() -> Result<Self, SettingError> {
        LambdaSettings::from_lookup(|name| std::env::var(name).ok())
    }

    /// From any lookup (tests pass a map).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, SettingError> {
        let sinks = SinkSettings::from_lookup(&get)?;
        let mut handler = HandlerConfig::default();
        if let Some(stream) = optional(&get, "KTK_STREAM") {
            handler = handler.with_stream(stream);
        }
        if let Some(n) = positive(&get, "KTK_BATCH_MAX_RECORDS")? {
            handler = handler.with_max_batch_records(n);
        }
        if let Some(n) = positive(&get, "KTK_BATCH_MAX_BYTES")? {
            handler = handler.with_max_batch_bytes(n);
        }
        if let Some(n) = number(&get, "KTK_DEDUP_WINDOW")? {
            handler = handler.with_dedup_window(n);
        }
        if let Some(n) = positive(&get, "KTK_SINK_MAX_ATTEMPTS")? {
            handler = handler.with_max_attempts(n);
        }
        if let Some(margin) = millis(&get, "KTK_DEADLINE_MARGIN_MS")? {
            handler = handler.with_deadline_margin(margin);
        }
        let store_max_connections = positive(&get, "KTK_STORE_MAX_CONNECTIONS")?.unwrap_or(2);
        Ok(LambdaSettings { sinks, handler, store_max_connections })
    }

    /// The stores' pool settings.
    pub fn store_config(&self) -> StoreConfig {
        StoreConfig::default().with_max_connections(self.store_max_connections)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::Duration;

    use super::*;

    fn settings(vars: &[(&str, &str)]) -> Result<LambdaSettings, SettingError> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        LambdaSettings::from_lookup(|name| map.get(name).cloned())
    }

    #[test]
    fn a_sink_is_enough_and_the_stream_comes_from_the_event() {
        let s = settings(&[("KTK_S3_BUCKET", "b"), ("KTK_S3_PATH_STYLE", "true")]).expect("valid");
        let s3 = s.sinks.s3.clone().expect("s3");
        assert_eq!((s3.bucket.as_str(), s3.path_style), ("b", true));
        assert_eq!(s.sinks.store_table, "events");
        assert_eq!(s.handler.max_batch_records(), 10_000);
        assert_eq!(s.handler.deadline_margin(), Duration::from_secs(1));
        assert_eq!(s.store_config().max_connections(), 2);

        let s = settings(&[
            ("KTK_POSTGRES_URL", "postgres://x"),
            ("KTK_BATCH_MAX_RECORDS", "500"),
            ("KTK_DEDUP_WINDOW", "0"),
            ("KTK_SINK_MAX_ATTEMPTS", "3"),
            ("KTK_DEADLINE_MARGIN_MS", "2500"),
            ("KTK_STORE_MAX_CONNECTIONS", "4"),
        ])
        .expect("valid");
        assert_eq!(s.handler.max_batch_records(), 500);
        assert_eq!(s.handler.dedup_window(), 0);
        assert_eq!(s.handler.max_attempts(), 3);
        assert_eq!(s.handler.deadline_margin(), Duration::from_millis(2500));
        assert_eq!(s.store_max_connections, 4);
    }

    #[test]
    fn bad_values_name_their_variable() {
        assert!(settings(&[]).expect_err("no sink").problem.contains("no sink"));
        for (variable, value) in [
            ("KTK_S3_FORMAT", "csv"),
            ("KTK_BATCH_MAX_RECORDS", "many"),
            ("KTK_BATCH_MAX_BYTES", "0"),
            ("KTK_SINK_MAX_ATTEMPTS", "-1"),
            ("KTK_DEADLINE_MARGIN_MS", "1s"),
            ("KTK_STORE_MAX_CONNECTIONS", "0"),
        ] {
            let error = settings(&[("KTK_S3_BUCKET", "b"), (variable, value)]).expect_err("bad");
            assert_eq!(error.variable, variable, "{error}");
        }
    }
}
