//! The `consumer` binary's library side: settings from `KTK_*` environment variables, the sinks
//! they describe, and the run loop with `GET /health` and `GET /metrics`.
//!
//! | variable | meaning | default |
//! | --- | --- | --- |
//! | `KTK_STREAM` | the stream to consume | required |
//! | `KTK_APPLICATION` | the application name, which names the lease table (as in the KCL) | required |
//! | `KTK_WORKER_ID` | this worker's id in the lease table | a random UUID |
//! | `KTK_INITIAL_POSITION` | `trim_horizon`, `latest` or `at_timestamp` for shards never checkpointed | `trim_horizon` |
//! | `KTK_INITIAL_TIMESTAMP_MS` | the time for `at_timestamp`, in milliseconds since the epoch | |
//! | `KTK_FAN_OUT` | read with enhanced fan-out as this consumer name | polling |
//! | `KTK_S3_BUCKET`, `KTK_S3_PREFIX` | the S3 sink | off |
//! | `KTK_S3_FORMAT` | `parquet` or `jsonl-gz` | `parquet` |
//! | `KTK_S3_PATH_STYLE` | `true` for path-style addressing (LocalStack, MinIO) | `false` |
//! | `KTK_POSTGRES_URL` | the PostgreSQL real-time store | off |
//! | `KTK_MYSQL_URL` | the MySQL-protocol real-time store (SingleStore, MySQL, MariaDB) | off |
//! | `KTK_STORE_TABLE` | the stores' events table | `events` |
//! | `KTK_BATCH_MAX_RECORDS`, `KTK_BATCH_MAX_BYTES` | batch size limits | 10,000, 16 MiB |
//! | `KTK_BATCH_WINDOW_MS`, `KTK_BATCH_GRACE_MS` | the arrival window batches are cut on, and its grace | 60,000, 5,000 |
//! | `KTK_FAILOVER_MS`, `KTK_RENEW_MS`, `KTK_TAKING_MS`, `KTK_DISCOVERY_MS`, `KTK_SHARD_SYNC_MS`, `KTK_PARENT_POLL_MS`, `KTK_IDLE_MS` | worker timings | the KCL's (see [`WorkerConfig`]) |
//! | `KTK_SHUTDOWN_TIMEOUT_MS` | how long SIGTERM waits for batches before releasing leases | 20,000 |
//! | `KTK_LISTEN` | address of `/health` and `/metrics` | `0.0.0.0:8080` |
//! | `KTK_LOG_FORMAT` | `json` or `text` | `json` |
//!
//! At least one sink is required. A missing or bad setting fails at start with the variable named.
//! The sink variables (`KTK_S3_*`, `KTK_POSTGRES_URL`, `KTK_MYSQL_URL`, `KTK_STORE_TABLE`) are read
//! by [`SinkSettings`] alone, so the Lambda (`ktk-lambda`) reads them the same way.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::pipeline::mysql::MySqlSink;
use crate::pipeline::postgres::{PostgresSink, StoreConfig};
use crate::pipeline::s3::{S3Format, S3Sink, S3SinkConfig};
use crate::pipeline::{Pipeline, PipelineConfig, PipelineStats, Sink};
use crate::shard_sync::InitialPosition;
use crate::worker::{Worker, WorkerConfig, WorkerReport};

/// A setting that is missing or wrong, named.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{variable}: {problem}")]
pub struct SettingError {
    pub variable: &'static str,
    pub problem: String,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

/// The S3 sink's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Settings {
    pub bucket: String,
    pub prefix: String,
    pub format: S3Format,
    pub path_style: bool,
}

/// Which sinks to deliver to, and where: the `KTK_S3_*`, `KTK_POSTGRES_URL`, `KTK_MYSQL_URL` and
/// `KTK_STORE_TABLE` variables. Shared by the `consumer` binary and the Lambda.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkSettings {
    pub s3: Option<S3Settings>,
    pub postgres_url: Option<String>,
    pub mysql_url: Option<String>,
    pub store_table: String,
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
    /// From any lookup (tests pass a map). At least one sink is required.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, SettingError> {
        let s3 = match optional(&get, "KTK_S3_BUCKET") {
            None => None,
            Some(bucket) => Some(S3Settings {
                bucket,
                prefix: optional(&get, "KTK_S3_PREFIX").unwrap_or_default(),
                format: match optional(&get, "KTK_S3_FORMAT").as_deref() {
                    None | Some("parquet") => S3Format::Parquet,
                    Some("jsonl-gz") => S3Format::JsonLinesGzip,
                    Some(other) => {
                        return Err(SettingError {
                            variable: "KTK_S3_FORMAT",
                            problem: format!("{other:?}: use parquet or jsonl-gz"),
                        });
                    }
                },
                path_style: match optional(&get, "KTK_S3_PATH_STYLE").as_deref() {
                    None | Some("false") | Some("0") => false,
                    Some("true") | Some("1") => true,
                    Some(other) => {
                        return Err(SettingError {
                            variable: "KTK_S3_PATH_STYLE",
                            problem: format!("{other:?}: use true or false"),
                        });
                    }
                },
            }),
        };
        let postgres_url = optional(&get, "KTK_POSTGRES_URL");
        let mysql_url = optional(&get, "KTK_MYSQL_URL");
        if s3.is_none() && postgres_url.is_none() && mysql_url.is_none() {
            return Err(SettingError {
                variable: "KTK_S3_BUCKET / KTK_POSTGRES_URL / KTK_MYSQL_URL",
                problem: "no sink configured; set at least one".into(),
            });
        }
        Ok(SinkSettings {
            s3,
            postgres_url,
            mysql_url,
            store_table: optional(&get, "KTK_STORE_TABLE").unwrap_or_else(|| "events".to_owned()),
        })
    }

    /// Connects the configured sinks (the stores with `store` pool settings, creating or
    /// migrating their tables). A store that cannot be reached or migrated is an error naming its
    /// variable.
    pub async fn connect(&self, aws: &aws_config::SdkConfig, store: StoreConfig) -> Result<SinkSet, SettingError> {
        let mut sinks = SinkSet::default();
        if let Some(s3) = &self.s3 {
            let config =
                S3SinkConfig::new(&s3.bucket, &s3.prefix).with_format(s3.format).with_path_style(s3.path_style);
            sinks.s3 = Some(Arc::new(S3Sink::new(aws, config)));
        }
        let problem = |variable: &'static str| {
            move |e: crate::pipeline::SinkError| SettingError { variable, problem: e.to_string() }
        };
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

/// Everything the binary needs, read from the environment.
#[derive(Debug, Clone)]
pub struct Settings {
    pub worker: WorkerConfig,
    pub pipeline: PipelineConfig,
    pub s3: Option<S3Settings>,
    pub postgres_url: Option<String>,
    pub mysql_url: Option<String>,
    pub store_table: String,
    pub listen: SocketAddr,
    pub log_format: LogFormat,
}

fn required(get: &impl Fn(&str) -> Option<String>, variable: &'static str) -> Result<String, SettingError> {
    match get(variable) {
        Some(value) if !value.trim().is_empty() => Ok(value.trim().to_owned()),
        _ => Err(SettingError { variable, problem: "is required".into() }),
    }
}

/// A setting's value, trimmed; `None` when unset or blank. (The `KTK_*` readers here are shared
/// with the Lambda's settings.)
pub fn optional(get: &impl Fn(&str) -> Option<String>, variable: &str) -> Option<String> {
    get(variable).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
}

/// A whole-number setting.
pub fn number<T: std::str::FromStr>(
    get: &impl Fn(&str) -> Option<String>,
    variable: &'static str,
) -> Result<Option<T>, SettingError> {
    optional(get, variable)
        .map(|v| v.parse::<T>().map_err(|_| SettingError { variable, problem: format!("{v:?} is not a whole number") }))
        .transpose()
}

/// A whole-number setting of at least 1.
pub fn positive<T: std::str::FromStr + PartialOrd + Default>(
    get: &impl Fn(&str) -> Option<String>,
    variable: &'static str,
) -> Result<Option<T>, SettingError> {
    match number::<T>(get, variable)? {
        Some(n) if n <= T::default() => Err(SettingError { variable, problem: "must be at least 1".into() }),
        n => Ok(n),
    }
}

/// A setting in milliseconds.
pub fn millis(get: &impl Fn(&str) -> Option<String>, variable: &'static str) -> Result<Option<Duration>, SettingError> {
    Ok(number::<u64>(get, variable)?.map(Duration::from_millis))
}

impl Settings {
    /// From the process environment.
    pub fn from_env() -> Result<Self, SettingError> {
        Settings::from_lookup(|name| std::env::var(name).ok())
    }

    /// From any lookup (tests pass a map).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, SettingError> {
        let stream = required(&get, "KTK_STREAM")?;
        let application = required(&get, "KTK_APPLICATION")?;
        let mut worker = WorkerConfig::new(&stream, application);
        if let Some(id) = optional(&get, "KTK_WORKER_ID") {
            worker = worker.with_worker_id(id);
        }
        match optional(&get, "KTK_INITIAL_POSITION").as_deref().map(str::to_ascii_lowercase).as_deref() {
            None | Some("trim_horizon") => {}
            Some("latest") => worker = worker.with_initial_position(InitialPosition::Latest),
            Some("at_timestamp") => {
                let ms: u64 = number(&get, "KTK_INITIAL_TIMESTAMP_MS")?.ok_or(SettingError {
                    variable: "KTK_INITIAL_TIMESTAMP_MS",
                    problem: "is required with KTK_INITIAL_POSITION=at_timestamp".into(),
                })?;
                worker = worker.with_initial_timestamp(UNIX_EPOCH + Duration::from_millis(ms));
            }
            Some(other) => {
                return Err(SettingError {
                    variable: "KTK_INITIAL_POSITION",
                    problem: format!("{other:?}: use trim_horizon, latest or at_timestamp"),
                });
            }
        }
        if let Some(name) = optional(&get, "KTK_FAN_OUT") {
            worker = worker.with_enhanced_fan_out(name);
        }
        if let Some(t) = millis(&get, "KTK_FAILOVER_MS")? {
            worker = worker.with_failover_time(t);
        }
        if let Some(t) = millis(&get, "KTK_RENEW_MS")? {
            worker = worker.with_renew_interval(t);
        }
        if let Some(t) = millis(&get, "KTK_TAKING_MS")? {
            worker = worker.with_taking_interval(t);
        }
        if let Some(t) = millis(&get, "KTK_DISCOVERY_MS")? {
            worker = worker.with_discovery_interval(t);
        }
        if let Some(t) = millis(&get, "KTK_SHARD_SYNC_MS")? {
            worker = worker.with_shard_sync_interval(t);
        }
        if let Some(t) = millis(&get, "KTK_PARENT_POLL_MS")? {
            worker = worker.with_parent_poll_interval(t);
        }
        if let Some(t) = millis(&get, "KTK_IDLE_MS")? {
            worker = worker.with_idle_time_between_reads(t);
        }
        worker = worker
            .with_empty_batches(true)
            .with_shutdown_timeout(millis(&get, "KTK_SHUTDOWN_TIMEOUT_MS")?.unwrap_or(Duration::from_secs(20)));
        worker.validate().map_err(|e| SettingError { variable: "KTK_* worker settings", problem: e.to_string() })?;

        let mut pipeline = PipelineConfig::new(&stream);
        if let Some(n) = number(&get, "KTK_BATCH_MAX_RECORDS")? {
            pipeline = pipeline.with_max_batch_records(n);
        }
        if let Some(n) = number(&get, "KTK_BATCH_MAX_BYTES")? {
            pipeline = pipeline.with_max_batch_bytes(n);
        }
        let window = millis(&get, "KTK_BATCH_WINDOW_MS")?.unwrap_or(Duration::from_secs(60));
        let grace = millis(&get, "KTK_BATCH_GRACE_MS")?.unwrap_or(Duration::from_secs(5));
        pipeline = pipeline.with_batch_window(window, grace);

        let SinkSettings { s3, postgres_url, mysql_url, store_table } = SinkSettings::from_lookup(&get)?;
        let listen = optional(&get, "KTK_LISTEN").unwrap_or_else(|| "0.0.0.0:8080".to_owned());
        let listen = listen.parse().map_err(|_| SettingError {
            variable: "KTK_LISTEN",
            problem: format!("{listen:?} is not an address:port"),
        })?;
        let log_format = match optional(&get, "KTK_LOG_FORMAT").as_deref() {
            None | Some("json") => LogFormat::Json,
            Some("text") => LogFormat::Text,
            Some(other) => {
                return Err(SettingError {
                    variable: "KTK_LOG_FORMAT",
                    problem: format!("{other:?}: use json or text"),
                });
            }
        };
        Ok(Settings { worker, pipeline, s3, postgres_url, mysql_url, store_table, listen, log_format })
    }

    /// The sink settings alone.
    pub fn sink_settings(&self) -> SinkSettings {
        SinkSettings {
            s3: self.s3.clone(),
            postgres_url: self.postgres_url.clone(),
            mysql_url: self.mysql_url.clone(),
            store_table: self.store_table.clone(),
        }
    }

    /// Connects the configured sinks (creating or migrating the stores' tables).
    pub async fn sinks(&self, aws: &aws_config::SdkConfig) -> Result<Vec<Arc<dyn Sink>>, Box<dyn std::error::Error>> {
        Ok(self.sink_settings().connect(aws, StoreConfig::default()).await?.all())
    }
}

/// What `/health` reports.
#[derive(Debug, Default)]
pub struct Health {
    running: AtomicBool,
}

impl Health {
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::Relaxed)
    }
}

/// Runs the worker with the delivery pipeline until `shutdown` resolves, serving `/health` and
/// `/metrics` (the Prometheus text `metrics` renders) on `listener`. Returns the worker's report
/// and the pipeline's counts.
pub async fn run(
    settings: Settings,
    aws: &aws_config::SdkConfig,
    listener: tokio::net::TcpListener,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(WorkerReport, PipelineStats), Box<dyn std::error::Error>> {
    let sinks = settings.sinks(aws).await?;
    let pipeline = Pipeline::new(settings.pipeline.clone(), sinks);
    let factory = {
        let pipeline = pipeline.clone();
        move |shard: &str| pipeline.processor(shard)
    };
    let worker = Worker::new(settings.worker.clone(), aws, factory)?;
    let health = Arc::new(Health::default());
    let stop = tokio_util::sync::CancellationToken::new();
    let server = {
        let (health, pipeline, stop) = (Arc::clone(&health), pipeline.clone(), stop.clone());
        let app = axum::Router::new()
            .route(
                "/health",
                axum::routing::get(move || {
                    let (health, pipeline) = (Arc::clone(&health), pipeline.clone());
                    async move {
                        let stats = pipeline.stats();
                        let body = serde_json::json!({
                            "status": if health.is_running() { "ok" } else { "stopped" },
                            "events_delivered": stats.events_delivered,
                            "duplicates": stats.duplicates(),
                            "dead_letters": stats.dead_letters,
                            "sink_errors": stats.sink_errors,
                            "at_ms": SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
                        });
                        let status = if health.is_running() {
                            axum::http::StatusCode::OK
                        } else {
                            axum::http::StatusCode::SERVICE_UNAVAILABLE
                        };
                        (status, axum::Json(body))
                    }
                }),
            )
            .route(
                "/metrics",
                axum::routing::get(move || {
                    let metrics = metrics.clone();
                    async move { metrics.map(|m| m.render()).unwrap_or_default() }
                }),
            );
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).with_graceful_shutdown(async move { stop.cancelled().await }).await;
        })
    };
    let worker_stop = tokio_util::sync::CancellationToken::new();
    {
        let worker_stop = worker_stop.clone();
        tokio::spawn(async move {
            shutdown.await;
            worker_stop.cancel();
        });
    }
    health.running.store(true, Ordering::Relaxed);
    let result = worker.run(worker_stop).await;
    health.running.store(false, Ordering::Relaxed);
    stop.cancel();
    let _ = server.await;
    Ok((result?, pipeline.stats()))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn settings(vars: &[(&str, &str)]) -> Result<Settings, SettingError> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        Settings::from_lookup(|name| map.get(name).cloned())
    }

    #[test]
    fn the_minimum_is_a_stream_an_application_and_a_sink() {
        let s = settings(&[("KTK_STREAM", "events"), ("KTK_APPLICATION", "app"), ("KTK_POSTGRES_URL", "postgres://x")])
            .expect("valid");
        assert_eq!(s.worker.stream(), "events");
        assert_eq!(s.worker.table_name(), "app");
        assert_eq!(s.store_table, "events");
        assert_eq!(s.listen, "0.0.0.0:8080".parse().expect("addr"));
        assert_eq!(settings(&[("KTK_APPLICATION", "app")]).expect_err("no stream").variable, "KTK_STREAM");
        assert!(
            settings(&[("KTK_STREAM", "s"), ("KTK_APPLICATION", "a")])
                .expect_err("no sink")
                .problem
                .contains("no sink")
        );
    }

    #[test]
    fn sink_settings_stand_alone_without_the_worker_settings() {
        let map: HashMap<&str, &str> = HashMap::from([("KTK_MYSQL_URL", "mysql://x"), ("KTK_STORE_TABLE", "t")]);
        let sinks = SinkSettings::from_lookup(|name| map.get(name).map(|v| (*v).to_owned())).expect("valid");
        assert_eq!((sinks.mysql_url.as_deref(), sinks.store_table.as_str(), sinks.s3), (Some("mysql://x"), "t", None));
        assert!(SinkSettings::from_lookup(|_| None).expect_err("no sink").problem.contains("no sink"));
        let all = settings(&[("KTK_STREAM", "s"), ("KTK_APPLICATION", "a"), ("KTK_POSTGRES_URL", "postgres://x")])
            .expect("valid");
        assert_eq!(all.sink_settings().postgres_url.as_deref(), Some("postgres://x"));
    }

    #[test]
    fn bad_values_name_their_variable() {
        let base = [("KTK_STREAM", "s"), ("KTK_APPLICATION", "a"), ("KTK_S3_BUCKET", "b")];
        for (variable, value) in [
            ("KTK_INITIAL_POSITION", "yesterday"),
            ("KTK_S3_FORMAT", "csv"),
            ("KTK_FAILOVER_MS", "ten"),
            ("KTK_LISTEN", "here"),
            ("KTK_LOG_FORMAT", "xml"),
            ("KTK_S3_PATH_STYLE", "maybe"),
        ] {
            let mut vars = base.to_vec();
            vars.push((variable, value));
            let error = settings(&vars).expect_err("bad");
            assert_eq!(error.variable, variable, "{error}");
        }
        let mut vars = base.to_vec();
        vars.push(("KTK_INITIAL_POSITION", "at_timestamp"));
        assert_eq!(settings(&vars).expect_err("no timestamp").variable, "KTK_INITIAL_TIMESTAMP_MS");
        let mut vars = base.to_vec();
        vars.extend([("KTK_FAILOVER_MS", "1000"), ("KTK_RENEW_MS", "5000")]);
        assert!(settings(&vars).expect_err("renew >= failover").problem.contains("renew_interval"));
    }
}
