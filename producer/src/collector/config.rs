//! The collector's settings, and how the `collector` binary reads them (and the producer's) from
//! its command line and environment.
//!
//! [`Settings::parse`] builds a clap command (`Flags`) in which every setting is a `--flag` and a
//! `KTK_*` environment variable; clap checks each value against its type and range, then the
//! flags are converted into the typed [`CollectorConfig`] and [`ProducerConfig`] and validated
//! with [`ProducerConfig::validate`]. Every error names the setting (the variable when a bad value
//! came from the environment, otherwise the flag), and the binary exits with status 2.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::time::Duration;

use clap::builder::RangedU64ValueParser;
use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{Arg, Command, CommandFactory, FromArgMatches};

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
    pub(crate) header_timeout: Duration,
    pub(crate) body_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) max_connections: usize,
    pub(crate) max_events_per_request: usize,
    pub(crate) max_event_bytes: usize,
    pub(crate) write_timeout: Duration,
    pub(crate) max_body_bytes_in_flight: usize,
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
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_connections: 4096,
            max_events_per_request: 500,
            max_event_bytes: 32 * 1024,
            write_timeout: Duration::from_secs(10),
            max_body_bytes_in_flight: 256 * 1024 * 1024,
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

    /// Most `POST /v1/events` requests handled at once, counted from the moment a body has
    /// arrived whole; more are answered 503 (`KTK_MAX_CONCURRENT_REQUESTS`, default 256). A
    /// request still sending its body holds a connection, not one of these.
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

    /// How long a client has to send a request's head (request line and headers), counted from
    /// the connection's opening, or from the first byte of a later request on a kept-alive
    /// connection; a slower one is disconnected (`KTK_HEADER_TIMEOUT_SECS`, default 10 s, as
    /// Envoy's `request_headers_timeout` is commonly set; nginx's `client_header_timeout` is 60 s).
    pub fn with_header_timeout(mut self, timeout: Duration) -> Self {
        self.header_timeout = timeout;
        self
    }

    /// How long a client has to send a whole body once its head has arrived; a slower one is
    /// answered 408 and disconnected (`KTK_BODY_TIMEOUT_SECS`, default 30 s).
    pub fn with_body_timeout(mut self, timeout: Duration) -> Self {
        self.body_timeout = timeout;
        self
    }

    /// How long a kept-alive connection may wait, after an answer, for the next request before
    /// it is closed (`KTK_IDLE_TIMEOUT_SECS`, default 60 s; nginx's `keepalive_timeout` is 75 s,
    /// Envoy's `idle_timeout` 1 h).
    pub fn with_idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Most connections open at once (`KTK_MAX_CONNECTIONS`, default 4096). Further ones wait in
    /// the listen backlog until one closes. Keep it under the process's open-file limit. Memory
    /// for request bodies is bounded by this times the body limit.
    pub fn with_max_connections(mut self, connections: usize) -> Self {
        self.max_connections = connections;
        self
    }

    /// Most events in one request; a batch with more is answered 413 `too_many_events`
    /// (`KTK_MAX_EVENTS_PER_REQUEST`, default 500, as Segment's batch API and Kinesis
    /// `PutRecords`).
    pub fn with_max_events_per_request(mut self, events: usize) -> Self {
        self.max_events_per_request = events;
        self
    }

    /// Largest event, in bytes of its binary protobuf encoding (the record put into Kinesis); a
    /// batch holding a larger one is answered 413 `event_too_large` (`KTK_MAX_EVENT_BYTES`,
    /// default 32 KiB, Segment's per-event limit).
    pub fn with_max_event_bytes(mut self, bytes: usize) -> Self {
        self.max_event_bytes = bytes;
        self
    }

    /// How long a write to a client may wait for the client to take what was sent before (its
    /// socket's buffers full, because it reads nothing); then the connection is dropped
    /// (`KTK_WRITE_TIMEOUT_SECS`, default 10 s, as Envoy's and nginx's `send_timeout` is commonly
    /// set; nginx's default is 60 s).
    pub fn with_write_timeout(mut self, timeout: Duration) -> Self {
        self.write_timeout = timeout;
        self
    }

    /// Most bytes of request bodies held in memory at once, over all connections, counted as
    /// they arrive; a request whose next bytes would go over it is answered 503 `busy` with
    /// `Retry-After` and its connection closed (`KTK_MAX_BODY_BYTES_IN_FLIGHT`, default 256 MiB).
    /// With it, what bodies being read can take is this budget, not `max_connections` times the
    /// body limit.
    pub fn with_max_body_bytes_in_flight(mut self, bytes: usize) -> Self {
        self.max_body_bytes_in_flight = bytes;
        self
    }

    /// `Retry-After` in whole seconds, at least 1.
    pub(crate) fn retry_after_secs(&self) -> u64 {
        self.retry_after.as_secs() + u64::from(self.retry_after.subsec_nanos() > 0 || self.retry_after.is_zero())
    }
}

/// Where the `collector` binary reads its write keys document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySetting {
    /// `--keys-file`.
    File(std::path::PathBuf),
    /// `--keys-secret`: a Secrets Manager secret's name or ARN.
    Secret(String),
}

/// How the `collector` binary writes its logs (`--log-format`, `KTK_LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (default).
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Largest `--max-body-bytes`: 64 MiB. Memory is bounded by this times the concurrent requests.
const MAX_BODY_BYTES: u64 = 64 * 1024 * 1024;
/// Largest `--max-body-bytes-in-flight`: 64 GiB.
const MAX_BODY_BYTES_IN_FLIGHT: u64 = 64 * 1024 * 1024 * 1024;
/// Largest `--max-event-age-secs`: 365 days, the longest a Kinesis stream retains records.
const MAX_EVENT_AGE_SECS: u64 = 365 * 24 * 60 * 60;
/// Largest value of every other duration setting: 1 day.
const MAX_DURATION_SECS: u64 = 24 * 60 * 60;
/// Largest `--max-concurrent-requests`.
const MAX_CONCURRENT_REQUESTS: u64 = 65_536;
/// Largest `--header-timeout-secs`, `--body-timeout-secs` and `--idle-timeout-secs`: 1 hour.
const MAX_TIMEOUT_SECS: u64 = 60 * 60;
/// Largest `--max-connections`: 1 million.
const MAX_CONNECTIONS: u64 = 1_000_000;
/// Largest `--max-events-per-request`.
const MAX_EVENTS_PER_REQUEST: u64 = 100_000;
/// Largest `--max-event-bytes`: 1 MiB, the largest Kinesis record.
const MAX_EVENT_BYTES: u64 = 1024 * 1024;
/// Largest `--max-outstanding-records`: 100 million.
const MAX_OUTSTANDING_RECORDS: u64 = 100_000_000;

/// The Event API (`POST /v1/events`) in front of a Kinesis stream.
///
/// Every setting is a flag and a KTK_* environment variable; the flag wins, and an empty variable
/// counts as unset. AWS settings come from the standard chain (AWS_REGION, AWS_ENDPOINT_URL,
/// profiles, task roles...). Stops on SIGTERM or SIGINT: no new connections, open requests
/// finish, the producer flushes. A bad setting exits with status 2.
// The defaults repeat `CollectorConfig::default()` and `ProducerConfig::new`; the test
// `only_the_stream_is_required` keeps them equal.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "collector", version)]
struct Flags {
    /// Name or ARN of the Kinesis stream to put events into. Required.
    #[arg(long, env = "KTK_STREAM", value_name = "NAME_OR_ARN")]
    stream: Option<String>,

    /// Address and port to listen on, for apps (the public listener).
    #[arg(long, env = "KTK_LISTEN", value_name = "ADDR:PORT", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,

    /// Address and port of the admin listener: `GET /metrics` and `GET /health`, for the
    /// operators' network only.
    #[arg(long, env = "KTK_ADMIN_LISTEN", value_name = "ADDR:PORT", default_value = "127.0.0.1:9090")]
    admin_listen: SocketAddr,

    /// The write keys document (JSON): which keys may post, as which app, from which web
    /// origins, how fast. Read again every --keys-reload-secs and on SIGHUP. One of --keys-file
    /// and --keys-secret is required.
    #[arg(long, env = "KTK_KEYS_FILE", value_name = "PATH")]
    keys_file: Option<std::path::PathBuf>,

    /// Name or ARN of a Secrets Manager secret whose SecretString is the write keys document.
    #[arg(long, env = "KTK_KEYS_SECRET", value_name = "NAME_OR_ARN")]
    keys_secret: Option<String>,

    /// How often the write keys document is read again, in seconds (up to 1 day).
    #[arg(long, env = "KTK_KEYS_RELOAD_SECS", value_name = "SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=MAX_DURATION_SECS))]
    keys_reload_secs: u64,

    /// Largest request body accepted, in bytes (up to 64 MiB); a larger one is answered 413.
    #[arg(long, env = "KTK_MAX_BODY_BYTES", value_name = "BYTES", default_value_t = 1024 * 1024,
          value_parser = RangedU64ValueParser::<usize>::new().range(1..=MAX_BODY_BYTES))]
    max_body_bytes: usize,

    /// Most bytes of request bodies held in memory at once over all connections (up to 64 GiB);
    /// past it, requests are answered 503.
    #[arg(long, env = "KTK_MAX_BODY_BYTES_IN_FLIGHT", value_name = "BYTES", default_value_t = 256 * 1024 * 1024,
          value_parser = RangedU64ValueParser::<usize>::new().range(1..=MAX_BODY_BYTES_IN_FLIGHT))]
    max_body_bytes_in_flight: usize,

    /// Oldest `occurred_at_ms` accepted, in seconds before the server clock (up to 365 days).
    #[arg(long, env = "KTK_MAX_EVENT_AGE_SECS", value_name = "SECS", default_value_t = 7 * 24 * 60 * 60,
          value_parser = clap::value_parser!(u64).range(1..=MAX_EVENT_AGE_SECS))]
    max_event_age_secs: u64,

    /// `Retry-After` of a 503 answer, in seconds (up to 1 day).
    #[arg(long, env = "KTK_RETRY_AFTER_SECS", value_name = "SECS", default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(1..=MAX_DURATION_SECS))]
    retry_after_secs: u64,

    /// Most `POST /v1/events` requests handled at the same time, counted from when a body has
    /// arrived whole (up to 65,536); more are answered 503.
    #[arg(long, env = "KTK_MAX_CONCURRENT_REQUESTS", value_name = "REQUESTS", default_value_t = 256,
          value_parser = RangedU64ValueParser::<usize>::new().range(1..=MAX_CONCURRENT_REQUESTS))]
    max_concurrent_requests: usize,

    /// At shutdown, how long open requests may take to finish, in seconds (up to 1 day).
    #[arg(long, env = "KTK_DRAIN_TIMEOUT_SECS", value_name = "SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=MAX_DURATION_SECS))]
    drain_timeout_secs: u64,

    /// At shutdown, after the drain, how long the producer may take to send what it holds, in
    /// seconds (up to 1 day).
    #[arg(long, env = "KTK_FLUSH_TIMEOUT_SECS", value_name = "SECS", default_value_t = 15,
          value_parser = clap::value_parser!(u64).range(1..=MAX_DURATION_SECS))]
    flush_timeout_secs: u64,

    /// Most connections open at once (up to 1 million); more wait in the listen backlog. Keep it
    /// under the open-file limit.
    #[arg(long, env = "KTK_MAX_CONNECTIONS", value_name = "CONNECTIONS", default_value_t = 4096,
          value_parser = RangedU64ValueParser::<usize>::new().range(1..=MAX_CONNECTIONS))]
    max_connections: usize,

    /// Time a client has to send a request's head (line and headers), in seconds (up to 1 hour);
    /// a slower one is disconnected.
    #[arg(long, env = "KTK_HEADER_TIMEOUT_SECS", value_name = "SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=MAX_TIMEOUT_SECS))]
    header_timeout_secs: u64,

    /// Time a client has to send a whole body once its head has arrived, in seconds (up to 1
    /// hour); a slower one is answered 408.
    #[arg(long, env = "KTK_BODY_TIMEOUT_SECS", value_name = "SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=MAX_TIMEOUT_SECS))]
    body_timeout_secs: u64,

    /// Time a write to a client that reads nothing may wait before the connection is dropped,
    /// in seconds (up to 1 hour).
    #[arg(long, env = "KTK_WRITE_TIMEOUT_SECS", value_name = "SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=MAX_TIMEOUT_SECS))]
    write_timeout_secs: u64,

    /// Time a kept-alive connection may wait for its next request before it is closed, in
    /// seconds (up to 1 hour).
    #[arg(long, env = "KTK_IDLE_TIMEOUT_SECS", value_name = "SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=MAX_TIMEOUT_SECS))]
    idle_timeout_secs: u64,

    /// Most events in one request (up to 100,000); a batch with more is answered 413.
    #[arg(long, env = "KTK_MAX_EVENTS_PER_REQUEST", value_name = "EVENTS", default_value_t = 500,
          value_parser = RangedU64ValueParser::<usize>::new().range(1..=MAX_EVENTS_PER_REQUEST))]
    max_events_per_request: usize,

    /// Largest event, in bytes of its protobuf encoding (up to 1 MiB); a batch holding a larger
    /// one is answered 413.
    #[arg(long, env = "KTK_MAX_EVENT_BYTES", value_name = "BYTES", default_value_t = 32 * 1024,
          value_parser = RangedU64ValueParser::<usize>::new().range(1..=MAX_EVENT_BYTES))]
    max_event_bytes: usize,

    /// Longest a record waits in the producer's buffers before it is sent, in milliseconds (up to
    /// 1 day; KPL RecordMaxBufferedTime).
    #[arg(long, env = "KTK_RECORD_MAX_BUFFERED_MS", value_name = "MS", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(1..=MAX_DURATION_SECS * 1000))]
    record_max_buffered_ms: u64,

    /// Most events accepted and not yet acknowledged by Kinesis, in records (up to 100 million);
    /// when reached, requests are answered 503.
    #[arg(long, env = "KTK_MAX_OUTSTANDING_RECORDS", value_name = "RECORDS", default_value_t = 250_000,
          value_parser = RangedU64ValueParser::<usize>::new().range(1..=MAX_OUTSTANDING_RECORDS))]
    max_outstanding_records: usize,

    /// Log format.
    #[arg(long, env = "KTK_LOG_FORMAT", value_name = "FORMAT", value_enum, ignore_case = true,
          default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// Everything the `collector` binary reads from its command line and environment, typed and
/// validated. AWS settings are not here: they come from the standard chain (`AWS_REGION`,
/// `AWS_ENDPOINT_URL`, profiles, task roles...).
///
/// | flag | variable | meaning | default |
/// | --- | --- | --- | --- |
/// | `--stream` | `KTK_STREAM` | stream name or ARN | required |
/// | `--listen` | `KTK_LISTEN` | address to listen on for apps | `127.0.0.1:8080` |
/// | `--admin-listen` | `KTK_ADMIN_LISTEN` | address for `/metrics` and `/health` | `127.0.0.1:9090` |
/// | `--keys-file` | `KTK_KEYS_FILE` | write keys document (see [`keys`](super::keys)) | one of the two |
/// | `--keys-secret` | `KTK_KEYS_SECRET` | Secrets Manager secret holding that document | one of the two |
/// | `--keys-reload-secs` | `KTK_KEYS_RELOAD_SECS` | how often the keys are read again | 30 |
/// | `--max-body-bytes` | `KTK_MAX_BODY_BYTES` | [`CollectorConfig::with_max_body_bytes`] | 1048576 |
/// | `--max-body-bytes-in-flight` | `KTK_MAX_BODY_BYTES_IN_FLIGHT` | [`CollectorConfig::with_max_body_bytes_in_flight`] | 268435456 |
/// | `--max-event-age-secs` | `KTK_MAX_EVENT_AGE_SECS` | [`CollectorConfig::with_max_event_age`] | 604800 |
/// | `--retry-after-secs` | `KTK_RETRY_AFTER_SECS` | [`CollectorConfig::with_retry_after`] | 1 |
/// | `--max-concurrent-requests` | `KTK_MAX_CONCURRENT_REQUESTS` | [`CollectorConfig::with_max_concurrent_requests`] | 256 |
/// | `--drain-timeout-secs` | `KTK_DRAIN_TIMEOUT_SECS` | [`CollectorConfig::with_drain_timeout`] | 10 |
/// | `--flush-timeout-secs` | `KTK_FLUSH_TIMEOUT_SECS` | [`CollectorConfig::with_flush_timeout`] | 15 |
/// | `--max-connections` | `KTK_MAX_CONNECTIONS` | [`CollectorConfig::with_max_connections`] | 4096 |
/// | `--header-timeout-secs` | `KTK_HEADER_TIMEOUT_SECS` | [`CollectorConfig::with_header_timeout`] | 10 |
/// | `--body-timeout-secs` | `KTK_BODY_TIMEOUT_SECS` | [`CollectorConfig::with_body_timeout`] | 30 |
/// | `--idle-timeout-secs` | `KTK_IDLE_TIMEOUT_SECS` | [`CollectorConfig::with_idle_timeout`] | 60 |
/// | `--write-timeout-secs` | `KTK_WRITE_TIMEOUT_SECS` | [`CollectorConfig::with_write_timeout`] | 10 |
/// | `--max-events-per-request` | `KTK_MAX_EVENTS_PER_REQUEST` | [`CollectorConfig::with_max_events_per_request`] | 500 |
/// | `--max-event-bytes` | `KTK_MAX_EVENT_BYTES` | [`CollectorConfig::with_max_event_bytes`] | 32768 |
/// | `--record-max-buffered-ms` | `KTK_RECORD_MAX_BUFFERED_MS` | [`ProducerConfig::with_record_max_buffered_time`] | 100 |
/// | `--max-outstanding-records` | `KTK_MAX_OUTSTANDING_RECORDS` | [`ProducerConfig::with_max_outstanding_records`] | 250000 |
/// | `--log-format` | `KTK_LOG_FORMAT` | `text` or `json` (any case) | `text` |
///
/// A flag wins over its variable; an empty variable counts as unset. Every number is a positive
/// whole number within a range (`collector --help` shows each), so no setting is 0 and no
/// duration can overflow the clock.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub keys: KeySetting,
    pub keys_reload: Duration,
    pub collector: CollectorConfig,
    pub producer: ProducerConfig,
    pub log_format: LogFormat,
}

impl Settings {
    /// Reads the process's arguments and environment. On `--help` or `--version` prints and exits
    /// 0; on a bad setting, or a `KTK_*` variable that is not a setting (named with the nearest
    /// one, see [`ktk_settings::check_environment`]), prints what is wrong and exits 2.
    pub fn parse() -> Self {
        let parsed = Self::try_parse_from(std::env::args_os());
        if let Err(e) = &parsed
            && !e.use_stderr()
        {
            e.exit();
        }
        // Unknown variables first: a misspelt one is often why a required setting is missing.
        if let Err(line) = ktk_settings::check_environment(&Flags::command()) {
            ktk_settings::stdio::eprint_line(&line);
            std::process::exit(2);
        }
        parsed.unwrap_or_else(|e| e.exit())
    }

    /// Reads `args` (the first is the program name) and the `KTK_*` variables of the process
    /// environment. The error is clap's: `--help` and `--version` come back as errors too (see
    /// [`clap::Error::exit`]).
    pub fn try_parse_from<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString>,
    {
        Self::try_parse_with(Self::command(), args)
    }

    /// The clap command behind [`Settings::parse`]: every flag with its variable, default, unit
    /// and range. Variables set to an empty (or blank) value are left out, so they count as unset.
    pub fn command() -> Command {
        Flags::command().mut_args(|arg| {
            let blank =
                arg.get_env().and_then(std::env::var_os).is_some_and(|value| value.to_string_lossy().trim().is_empty());
            if blank { arg.env(None) } else { arg }
        })
    }

    fn try_parse_with<I, T>(mut command: Command, args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString>,
    {
        let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
        let flags = command
            .try_get_matches_from_mut(&args)
            .and_then(|matches| Flags::from_arg_matches(&matches))
            .map_err(|e| name_the_variable(e, &command, &args))?;
        flags.into_settings()
    }
}

impl Flags {
    /// The typed, validated settings; an error names the flag and its variable.
    fn into_settings(self) -> Result<Settings, clap::Error> {
        let stream = self.stream.ok_or_else(|| {
            clap::Error::raw(
                ErrorKind::MissingRequiredArgument,
                "--stream (KTK_STREAM) is not set; give the name or ARN of the Kinesis stream to put events into\n",
            )
        })?;
        let collector = CollectorConfig::default()
            .with_max_body_bytes(self.max_body_bytes)
            .with_max_event_age(Duration::from_secs(self.max_event_age_secs))
            .with_retry_after(Duration::from_secs(self.retry_after_secs))
            .with_max_concurrent_requests(self.max_concurrent_requests)
            .with_drain_timeout(Duration::from_secs(self.drain_timeout_secs))
            .with_flush_timeout(Duration::from_secs(self.flush_timeout_secs))
            .with_max_connections(self.max_connections)
            .with_header_timeout(Duration::from_secs(self.header_timeout_secs))
            .with_body_timeout(Duration::from_secs(self.body_timeout_secs))
            .with_idle_timeout(Duration::from_secs(self.idle_timeout_secs))
            .with_max_events_per_request(self.max_events_per_request)
            .with_max_event_bytes(self.max_event_bytes)
            .with_write_timeout(Duration::from_secs(self.write_timeout_secs))
            .with_max_body_bytes_in_flight(self.max_body_bytes_in_flight);
        let keys = match (self.keys_file, self.keys_secret) {
            (Some(path), None) => KeySetting::File(path),
            (None, Some(secret)) => KeySetting::Secret(secret),
            (None, None) => {
                return Err(clap::Error::raw(
                    ErrorKind::MissingRequiredArgument,
                    "neither --keys-file (KTK_KEYS_FILE) nor --keys-secret (KTK_KEYS_SECRET) is set; give the write \
                     keys document (a document with only an `anonymous` entry lets anyone post)\n",
                ));
            }
            (Some(_), Some(_)) => {
                return Err(clap::Error::raw(
                    ErrorKind::ArgumentConflict,
                    "--keys-file (KTK_KEYS_FILE) and --keys-secret (KTK_KEYS_SECRET) are both set; give one\n",
                ));
            }
        };
        if self.admin_listen == self.listen {
            return Err(clap::Error::raw(
                ErrorKind::ValueValidation,
                format!(
                    "--admin-listen (KTK_ADMIN_LISTEN) is {}, the same as --listen (KTK_LISTEN); the admin routes \
                     need their own address\n",
                    self.admin_listen
                ),
            ));
        }
        let producer = ProducerConfig::new(stream)
            .with_record_max_buffered_time(Duration::from_millis(self.record_max_buffered_ms))
            .with_max_outstanding_records(self.max_outstanding_records);
        producer.validate().map_err(|e| {
            let flag = match e.setting {
                "stream" => "--stream (KTK_STREAM)",
                "record_max_buffered_time" => "--record-max-buffered-ms (KTK_RECORD_MAX_BUFFERED_MS)",
                "max_outstanding_records" => "--max-outstanding-records (KTK_MAX_OUTSTANDING_RECORDS)",
                // A setting the collector does not expose keeps its default, which is valid.
                _ => "a producer default",
            };
            clap::Error::raw(ErrorKind::ValueValidation, format!("{flag}: {e}\n"))
        })?;
        Ok(Settings {
            listen: self.listen,
            admin_listen: self.admin_listen,
            keys,
            keys_reload: Duration::from_secs(self.keys_reload_secs),
            collector,
            producer,
            log_format: self.log_format,
        })
    }
}

/// clap names the flag of a bad value (`'--listen <ADDR:PORT>'`) even when the value came from
/// the environment; then this names the variable instead (`'KTK_LISTEN'`).
fn name_the_variable(mut error: clap::Error, command: &Command, args: &[OsString]) -> clap::Error {
    let Some(ContextValue::String(invalid)) = error.get(ContextKind::InvalidArg) else { return error };
    let Some(long) = invalid.strip_prefix("--").and_then(|s| s.split([' ', '=']).next()) else { return error };
    let Some(arg) = command.get_arguments().find(|arg| arg.get_long() == Some(long)) else { return error };
    let Some(variable) = Arg::get_env(arg).map(|v| v.to_string_lossy().into_owned()) else { return error };
    let flag = format!("--{long}");
    let on_command_line = args
        .iter()
        .skip(1)
        .filter_map(|a| a.to_str())
        .any(|a| a == flag || a.strip_prefix(flag.as_str()).is_some_and(|rest| rest.starts_with('=')));
    if !on_command_line {
        error.insert(ContextKind::InvalidArg, ContextValue::String(variable));
    }
    error
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `flags` after a program name, with every variable ignored, so a `KTK_*` variable in
    /// the environment of the test run changes nothing (`tests/collector_bin.rs` covers them).
    fn settings(flags: &[&str]) -> Result<Settings, clap::Error> {
        let command = Settings::command().mut_args(|arg| arg.env(None));
        let keys = ["--keys-file", "keys.json"];
        let keys = if flags.iter().any(|f| f.starts_with("--keys-file") || f.starts_with("--keys-secret")) {
            &[][..]
        } else {
            &keys[..]
        };
        Settings::try_parse_with(
            command,
            std::iter::once("collector").chain(keys.iter().copied()).chain(flags.iter().copied()),
        )
    }

    /// Like [`settings`], without adding `--keys-file`.
    fn bare_settings(flags: &[&str]) -> Result<Settings, clap::Error> {
        let command = Settings::command().mut_args(|arg| arg.env(None));
        Settings::try_parse_with(command, std::iter::once("collector").chain(flags.iter().copied()))
    }

    #[test]
    fn only_the_stream_is_required() {
        let s = settings(&["--stream", "events"]).expect("valid");
        assert_eq!(s.listen, SocketAddr::from(([127, 0, 0, 1], 8080)));
        assert_eq!(s.admin_listen, SocketAddr::from(([127, 0, 0, 1], 9090)));
        assert_eq!(s.keys, KeySetting::File("keys.json".into()));
        assert_eq!(s.keys_reload, Duration::from_secs(30));
        assert_eq!(s.collector, CollectorConfig::default());
        assert_eq!(s.producer, ProducerConfig::new("events"));
        assert_eq!(s.log_format, LogFormat::Text);
        assert_eq!(s.collector.max_body_bytes, 1024 * 1024);
        assert_eq!(s.collector.max_event_age, Duration::from_secs(604_800));
        assert_eq!(s.collector.retry_after_secs(), 1);

        let missing = settings(&[]).expect_err("no stream");
        let no_keys = bare_settings(&["--stream", "events"]).expect_err("no keys");
        assert_eq!(no_keys.exit_code(), 2);
        assert!(no_keys.to_string().contains("--keys-file (KTK_KEYS_FILE)"), "{no_keys}");
        let both =
            bare_settings(&["--stream", "events", "--keys-file", "k.json", "--keys-secret", "k"]).expect_err("both");
        assert!(both.to_string().contains("both set"), "{both}");
        let secret = bare_settings(&["--stream", "events", "--keys-secret", "collector/keys"]).expect("valid");
        assert_eq!(secret.keys, KeySetting::Secret("collector/keys".to_owned()));
        let same = settings(&["--stream", "events", "--admin-listen", "127.0.0.1:8080"]).expect_err("same address");
        assert!(same.to_string().contains("--admin-listen (KTK_ADMIN_LISTEN)"), "{same}");
        assert_eq!(missing.kind(), ErrorKind::MissingRequiredArgument);
        assert_eq!(missing.exit_code(), 2);
        assert!(missing.to_string().contains("--stream (KTK_STREAM)"), "{missing}");

        let empty = settings(&["--stream", ""]).expect_err("empty stream");
        assert_eq!(empty.exit_code(), 2);
        assert!(empty.to_string().contains("--stream (KTK_STREAM)"), "{empty}");
        assert_eq!(empty.to_string().trim_end().lines().count(), 1, "{empty}");
    }

    #[test]
    fn every_flag_is_read() {
        let s = settings(&[
            "--stream=arn:aws:kinesis:us-east-1:123456789012:stream/events",
            "--listen=0.0.0.0:9000",
            "--admin-listen=10.0.0.1:9100",
            "--keys-secret=collector/keys",
            "--keys-reload-secs=5",
            "--write-timeout-secs=7",
            "--max-body-bytes-in-flight=4096",
            "--max-body-bytes=2048",
            "--max-event-age-secs=3600",
            "--retry-after-secs=5",
            "--max-concurrent-requests=8",
            "--drain-timeout-secs=2",
            "--flush-timeout-secs=3",
            "--max-connections=100",
            "--header-timeout-secs=4",
            "--body-timeout-secs=5",
            "--idle-timeout-secs=6",
            "--max-events-per-request=50",
            "--max-event-bytes=1000",
            "--record-max-buffered-ms=250",
            "--max-outstanding-records=1000",
            "--log-format=JSON",
        ])
        .expect("valid");
        assert_eq!(s.listen, SocketAddr::from(([0, 0, 0, 0], 9000)));
        assert_eq!(s.admin_listen, SocketAddr::from(([10, 0, 0, 1], 9100)));
        assert_eq!(s.keys, KeySetting::Secret("collector/keys".to_owned()));
        assert_eq!(s.keys_reload, Duration::from_secs(5));
        assert_eq!(
            s.collector,
            CollectorConfig::default()
                .with_max_body_bytes(2048)
                .with_max_event_age(Duration::from_secs(3600))
                .with_retry_after(Duration::from_secs(5))
                .with_max_concurrent_requests(8)
                .with_drain_timeout(Duration::from_secs(2))
                .with_flush_timeout(Duration::from_secs(3))
                .with_max_connections(100)
                .with_header_timeout(Duration::from_secs(4))
                .with_body_timeout(Duration::from_secs(5))
                .with_idle_timeout(Duration::from_secs(6))
                .with_max_events_per_request(50)
                .with_max_event_bytes(1000)
                .with_write_timeout(Duration::from_secs(7))
                .with_max_body_bytes_in_flight(4096)
        );
        assert_eq!(s.producer.stream(), "arn:aws:kinesis:us-east-1:123456789012:stream/events");
        assert_eq!(s.producer.record_max_buffered_time, Duration::from_millis(250));
        assert_eq!(s.producer.max_outstanding_records, 1000);
        assert_eq!(s.log_format, LogFormat::Json);
    }

    #[test]
    fn every_flag_has_its_variable() {
        let command = Settings::command();
        let variables: Vec<String> = command
            .get_arguments()
            .filter_map(|arg| arg.get_long().map(|long| (long, arg.get_env())))
            .filter(|(long, _)| !matches!(*long, "help" | "version"))
            .map(|(long, env)| {
                let env = env.map(|v| v.to_string_lossy().into_owned());
                assert_eq!(env.as_deref(), Some(format!("KTK_{}", long.replace('-', "_").to_uppercase()).as_str()));
                long.to_owned()
            })
            .collect();
        assert_eq!(variables.len(), 23, "{variables:?}");
    }

    #[test]
    fn bad_values_name_their_flag() {
        let cases = [
            ("--listen", "localhost"),
            ("--max-body-bytes", "1MB"),
            ("--max-body-bytes", "0"),
            ("--max-body-bytes", "67108865"),
            ("--max-event-age-secs", "-1"),
            ("--max-event-age-secs", "31536001"),
            ("--retry-after-secs", "0"),
            ("--max-concurrent-requests", "0"),
            ("--drain-timeout-secs", "0"),
            ("--flush-timeout-secs", "86401"),
            ("--max-connections", "0"),
            ("--header-timeout-secs", "3601"),
            ("--body-timeout-secs", "0"),
            ("--idle-timeout-secs", "3601"),
            ("--write-timeout-secs", "0"),
            ("--max-body-bytes-in-flight", "0"),
            ("--keys-reload-secs", "0"),
            ("--admin-listen", "9090"),
            ("--max-events-per-request", "100001"),
            ("--max-event-bytes", "1048577"),
            ("--record-max-buffered-ms", "soon"),
            ("--record-max-buffered-ms", "18446744073709551615"),
            ("--max-outstanding-records", "0"),
            ("--log-format", "xml"),
        ];
        for (flag, value) in cases {
            let error = settings(&["--stream", "events", &format!("{flag}={value}")]).expect_err(flag);
            assert!(matches!(error.kind(), ErrorKind::InvalidValue | ErrorKind::ValueValidation), "{flag}: {error}");
            assert_eq!(error.exit_code(), 2, "{flag}");
            let message = error.to_string();
            let first = message.lines().next().unwrap_or_default();
            assert!(first.contains(&format!("'{flag} <")) && first.contains(value), "{flag}: {message}");
        }
    }

    #[test]
    fn a_bad_value_from_the_environment_names_the_variable() {
        // clap reports the flag; the value came from KTK_LISTEN, so the error says that instead.
        let mut command = Settings::command().mut_args(|arg| arg.env(None));
        let mut bad_address = || {
            command
                .try_get_matches_from_mut(["collector", "--stream", "events", "--listen", "localhost"])
                .expect_err("bad address")
        };
        let (from_env, from_flag) = (bad_address(), bad_address());
        let named = Flags::command();
        let renamed = name_the_variable(from_env, &named, &[OsString::from("collector")]);
        assert!(renamed.to_string().contains("'KTK_LISTEN'"), "{renamed}");
        let args = [OsString::from("collector"), OsString::from("--listen=localhost")];
        let kept = name_the_variable(from_flag, &named, &args);
        assert!(kept.to_string().contains("'--listen <ADDR:PORT>'"), "{kept}");
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let secs = |ms| CollectorConfig::default().with_retry_after(Duration::from_millis(ms)).retry_after_secs();
        assert_eq!((secs(0), secs(1), secs(1000), secs(1001), secs(2500)), (1, 1, 1, 2, 3));
    }
}
