//! The collector's settings, and how the `collector` binary reads them (and the producer's) from
//! environment variables.

use std::net::SocketAddr;
use std::time::Duration;

use crate::config::ProducerConfig;

/// How the Event API behaves. Build with `CollectorConfig::default()` and the `with_*` methods;
/// every method documents its default and its environment variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectorConfig {
    pub(crate) max_body_bytes: usize,
    pub(crate) max_event_age: Duration,
    pub(crate) retry_after: Duration,
    pub(crate) max_concurrent_requests: usize,
    pub(crate) drain_timeout: Duration,
    pub(crate) flush_timeout: Duration,
}

impl Default for CollectorConfig {
    fn default() -> Self {
        CollectorConfig {
            max_body_bytes: 1024 * 1024,
            max_event_age: Duration::from_secs(7 * 24 * 60 * 60),
            retry_after: Duration::from_secs(1),
            max_concurrent_requests: 256,
            drain_timeout: Duration::from_secs(10),
            flush_timeout: Duration::from_secs(15),
        }
    }
}

impl CollectorConfig {
    /// Largest request body accepted; a larger one is answered 413 (`KTK_MAX_BODY_BYTES`,
    /// default 1 MiB).
    pub fn with_max_body_bytes(mut self, bytes: usize) -> Self {
        self.max_body_bytes = bytes;
        self
    }

    /// Oldest `occurred_at_ms` accepted, relative to the server clock (`KTK_MAX_EVENT_AGE_SECS`,
    /// default 7 days: an app that was offline for a week can still send what it kept).
    pub fn with_max_event_age(mut self, age: Duration) -> Self {
        self.max_event_age = age;
        self
    }

    /// The `Retry-After` of a 503 answer, rounded up to whole seconds (`KTK_RETRY_AFTER_SECS`,
    /// default 1 s).
    pub fn with_retry_after(mut self, delay: Duration) -> Self {
        self.retry_after = delay;
        self
    }

    /// Most `POST /v1/events` requests handled at once; more are answered 503 at once, before
    /// their bodies are read, so memory stays bounded by this times the body limit
    /// (`KTK_MAX_CONCURRENT_REQUESTS`, default 256).
    pub fn with_max_concurrent_requests(mut self, requests: usize) -> Self {
        self.max_concurrent_requests = requests;
        self
    }

    /// At shutdown, how long open connections may take to finish their requests before they are
    /// abandoned (`KTK_DRAIN_TIMEOUT_SECS`, default 10 s).
    pub fn with_drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// At shutdown, after the connections, how long the producer may take to send what it holds
    /// (`KTK_FLUSH_TIMEOUT_SECS`, default 15 s; with the drain timeout, under the 30 s ECS and
    /// Kubernetes give a task between SIGTERM and SIGKILL).
    pub fn with_flush_timeout(mut self, timeout: Duration) -> Self {
        self.flush_timeout = timeout;
        self
    }

    /// `Retry-After` in whole seconds, at least 1.
    pub(crate) fn retry_after_secs(&self) -> u64 {
        self.retry_after.as_secs() + u64::from(self.retry_after.subsec_nanos() > 0 || self.retry_after.is_zero())
    }
}

/// A setting from the environment that is missing or unusable; the message names the variable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("environment variable {variable}: {problem}")]
pub struct EnvError {
    pub variable: &'static str,
    pub problem: String,
}

/// How the `collector` binary writes its logs (`KTK_LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines (default).
    #[default]
    Text,
    /// One JSON object per line, for log collectors (`KTK_LOG_FORMAT=json`).
    Json,
}

/// Everything the `collector` binary reads from its environment. AWS settings are not here: they
/// come from the standard chain (`AWS_REGION`, `AWS_ENDPOINT_URL`, profiles, task roles...).
///
/// | variable | meaning | default |
/// | --- | --- | --- |
/// | `KTK_STREAM` | stream name or ARN | required |
/// | `KTK_LISTEN` | address to listen on | `127.0.0.1:8080` |
/// | `KTK_MAX_BODY_BYTES` | [`CollectorConfig::with_max_body_bytes`] | 1048576 |
/// | `KTK_MAX_EVENT_AGE_SECS` | [`CollectorConfig::with_max_event_age`] | 604800 |
/// | `KTK_RETRY_AFTER_SECS` | [`CollectorConfig::with_retry_after`] | 1 |
/// | `KTK_MAX_CONCURRENT_REQUESTS` | [`CollectorConfig::with_max_concurrent_requests`] | 256 |
/// | `KTK_DRAIN_TIMEOUT_SECS` | [`CollectorConfig::with_drain_timeout`] | 10 |
/// | `KTK_FLUSH_TIMEOUT_SECS` | [`CollectorConfig::with_flush_timeout`] | 15 |
/// | `KTK_RECORD_MAX_BUFFERED_MS` | [`ProducerConfig::with_record_max_buffered_time`] | 100 |
/// | `KTK_MAX_OUTSTANDING_RECORDS` | [`ProducerConfig::with_max_outstanding_records`] | 250000 |
/// | `KTK_LOG_FORMAT` | `text` or `json` | `text` |
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub listen: SocketAddr,
    pub collector: CollectorConfig,
    pub producer: ProducerConfig,
    pub log_format: LogFormat,
}

impl Settings {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, EnvError> {
        Self::from_vars(|name| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned()))
    }

    /// Reads settings through `var` (the environment, or a map in tests). Empty values count as
    /// unset.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, EnvError> {
        let get = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let stream = get("KTK_STREAM").ok_or_else(|| EnvError {
            variable: "KTK_STREAM",
            problem: "is not set; give the name or ARN of the Kinesis stream to put events into".into(),
        })?;
        let listen = match get("KTK_LISTEN") {
            None => SocketAddr::from(([127, 0, 0, 1], 8080)),
            Some(v) => v.trim().parse().map_err(|e| EnvError {
                variable: "KTK_LISTEN",
                problem: format!("{v:?} is not an address and port such as 0.0.0.0:8080 ({e})"),
            })?,
        };
        let number = |name: &'static str| -> Result<Option<u64>, EnvError> {
            let Some(v) = get(name) else { return Ok(None) };
            match v.trim().parse::<u64>() {
                Ok(0) => Err(EnvError { variable: name, problem: "is 0; give a positive whole number".into() }),
                Ok(n) => Ok(Some(n)),
                Err(_) => Err(EnvError { variable: name, problem: format!("{v:?} is not a positive whole number") }),
            }
        };
        let size = |name: &'static str| -> Result<Option<usize>, EnvError> {
            number(name)?
                .map(|n| {
                    usize::try_from(n).map_err(|_| EnvError { variable: name, problem: format!("{n} is too large") })
                })
                .transpose()
        };

        let mut collector = CollectorConfig::default();
        if let Some(n) = size("KTK_MAX_BODY_BYTES")? {
            collector = collector.with_max_body_bytes(n);
        }
        if let Some(n) = number("KTK_MAX_EVENT_AGE_SECS")? {
            collector = collector.with_max_event_age(Duration::from_secs(n));
        }
        if let Some(n) = number("KTK_RETRY_AFTER_SECS")? {
            collector = collector.with_retry_after(Duration::from_secs(n));
        }
        if let Some(n) = size("KTK_MAX_CONCURRENT_REQUESTS")? {
            collector = collector.with_max_concurrent_requests(n);
        }
        if let Some(n) = number("KTK_DRAIN_TIMEOUT_SECS")? {
            collector = collector.with_drain_timeout(Duration::from_secs(n));
        }
        if let Some(n) = number("KTK_FLUSH_TIMEOUT_SECS")? {
            collector = collector.with_flush_timeout(Duration::from_secs(n));
        }

        let mut producer = ProducerConfig::new(stream);
        if let Some(n) = number("KTK_RECORD_MAX_BUFFERED_MS")? {
            producer = producer.with_record_max_buffered_time(Duration::from_millis(n));
        }
        if let Some(n) = size("KTK_MAX_OUTSTANDING_RECORDS")? {
            producer = producer.with_max_outstanding_records(n);
        }
        producer.validate().map_err(|e| EnvError {
            variable: match e.setting {
                "stream" => "KTK_STREAM",
                "max_outstanding_records" => "KTK_MAX_OUTSTANDING_RECORDS",
                _ => "KTK_*",
            },
            problem: e.to_string(),
        })?;

        let log_format = match get("KTK_LOG_FORMAT").map(|v| v.trim().to_ascii_lowercase()).as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(EnvError {
                    variable: "KTK_LOG_FORMAT",
                    problem: format!("{other:?} is not `text` or `json`"),
                });
            }
        };
        Ok(Settings { listen, collector, producer, log_format })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn settings(vars: &[(&str, &str)]) -> Result<Settings, EnvError> {
        let vars: HashMap<String, String> = vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        Settings::from_vars(|name| vars.get(name).cloned())
    }

    #[test]
    fn only_the_stream_is_required() {
        let s = settings(&[("KTK_STREAM", "events")]).expect("valid");
        assert_eq!(s.listen, SocketAddr::from(([127, 0, 0, 1], 8080)));
        assert_eq!(s.collector, CollectorConfig::default());
        assert_eq!(s.producer, ProducerConfig::new("events"));
        assert_eq!(s.log_format, LogFormat::Text);
        assert_eq!(s.collector.max_body_bytes, 1024 * 1024);
        assert_eq!(s.collector.max_event_age, Duration::from_secs(604_800));
        assert_eq!(s.collector.retry_after_secs(), 1);

        let missing = settings(&[]).expect_err("no stream");
        assert_eq!(missing.variable, "KTK_STREAM");
        assert!(missing.to_string().contains("KTK_STREAM"));
    }

    #[test]
    fn every_variable_is_read() {
        let s = settings(&[
            ("KTK_STREAM", "arn:aws:kinesis:us-east-1:123456789012:stream/events"),
            ("KTK_LISTEN", "0.0.0.0:9000"),
            ("KTK_MAX_BODY_BYTES", "2048"),
            ("KTK_MAX_EVENT_AGE_SECS", "3600"),
            ("KTK_RETRY_AFTER_SECS", "5"),
            ("KTK_MAX_CONCURRENT_REQUESTS", "8"),
            ("KTK_DRAIN_TIMEOUT_SECS", "2"),
            ("KTK_FLUSH_TIMEOUT_SECS", "3"),
            ("KTK_RECORD_MAX_BUFFERED_MS", "250"),
            ("KTK_MAX_OUTSTANDING_RECORDS", "1000"),
            ("KTK_LOG_FORMAT", "JSON"),
        ])
        .expect("valid");
        assert_eq!(s.listen, SocketAddr::from(([0, 0, 0, 0], 9000)));
        assert_eq!(
            s.collector,
            CollectorConfig::default()
                .with_max_body_bytes(2048)
                .with_max_event_age(Duration::from_secs(3600))
                .with_retry_after(Duration::from_secs(5))
                .with_max_concurrent_requests(8)
                .with_drain_timeout(Duration::from_secs(2))
                .with_flush_timeout(Duration::from_secs(3))
        );
        assert_eq!(s.producer.record_max_buffered_time, Duration::from_millis(250));
        assert_eq!(s.producer.max_outstanding_records, 1000);
        assert_eq!(s.log_format, LogFormat::Json);
    }

    #[test]
    fn bad_values_name_their_variable() {
        let cases = [
            ("KTK_LISTEN", "localhost"),
            ("KTK_MAX_BODY_BYTES", "1MB"),
            ("KTK_MAX_EVENT_AGE_SECS", "-1"),
            ("KTK_RETRY_AFTER_SECS", "0"),
            ("KTK_RECORD_MAX_BUFFERED_MS", "soon"),
            ("KTK_MAX_OUTSTANDING_RECORDS", "0"),
            ("KTK_LOG_FORMAT", "xml"),
        ];
        for (variable, value) in cases {
            let error = settings(&[("KTK_STREAM", "events"), (variable, value)]).expect_err(variable);
            assert_eq!(error.variable, variable);
            assert!(error.to_string().starts_with(&format!("environment variable {variable}: ")), "{error}");
        }
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let secs = |ms| CollectorConfig::default().with_retry_after(Duration::from_millis(ms)).retry_after_secs();
        assert_eq!((secs(0), secs(1), secs(1000), secs(1001), secs(2500)), (1, 1, 1, 2, 3));
    }
}
