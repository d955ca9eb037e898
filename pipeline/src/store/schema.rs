//! What both store dialects share: the columns of the events and dead-letter tables (with each
//! column's type in either dialect), the mapping of an event or a dead letter to one value per
//! column, table names, splitting a batch into statements, the pool settings ([`StoreConfig`]),
//! what a migration changed ([`MigrationReport`]), and the classification of the errors that do
//! not come from the database server.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::time::{Duration, SystemTime};

use ktk_proto::events::v1::{Event, EventType, Platform};

use crate::time::unix_millis as system_time_ms;
use crate::{DeadLetter, EventRecord, SinkError};

/// The earliest time the store sinks store: 1000-01-01T00:00:00Z, in milliseconds since the Unix
/// epoch (the start of MySQL's `DATETIME` range). An earlier time is stored as NULL.
pub const MIN_STORED_TIME_MS: i64 = -30_610_224_000_000;

/// The latest time the store sinks store: 9999-12-31T23:59:59.999Z, in milliseconds since the
/// Unix epoch (the end of MySQL's `DATETIME` range). A later time is stored as NULL.
pub const MAX_STORED_TIME_MS: i64 = 253_402_300_799_999;

/// The longest table name the sinks accept: PostgreSQL's identifier limit (63 bytes) less the
/// `_dead_letters` suffix of the dead-letter table.
pub const MAX_TABLE_NAME_LEN: usize = 63 - DEAD_LETTER_SUFFIX.len();

/// The dead-letter table's name is the events table's name with this suffix.
pub const DEAD_LETTER_SUFFIX: &str = "_dead_letters";

/// Connection pool settings of a store sink.
///
/// Defaults: 8 connections (a worker writes at most one batch per shard at a time, and a
/// consumer process rarely holds more shards than that), 10 s to get a connection (which also
/// bounds connecting to a database that is down: connecting is retried until then), 60 s for a
/// whole batch write, idle connections closed after 10 minutes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    max_connections: u32,
    acquire_timeout: Duration,
    write_timeout: Duration,
    idle_timeout: Option<Duration>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            max_connections: 8,
            acquire_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(60),
            idle_timeout: Some(Duration::from_secs(600)),
        }
    }
}

impl StoreConfig {
    /// The most connections the pool opens (at least 1).
    pub fn with_max_connections(mut self, max: u32) -> Self {
        self.max_connections = max.max(1);
        self
    }

    /// How long a write waits for a connection, including opening one: a database that refuses
    /// connections or does not answer fails the write (retryably) after this long.
    pub fn with_acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// How long one batch write may take in all (connection, statements); past it the write
    /// fails retryably. The statement may still complete on the server: the retry then finds
    /// its events and reports them as duplicates.
    pub fn with_write_timeout(mut self, timeout: Duration) -> Self {
        self.write_timeout = timeout;
        self
    }

    /// Closes connections idle for this long (`None`: never).
    pub fn with_idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.idle_timeout = timeout;
        self
    }

    pub fn max_connections(&self) -> u32 {
        self.max_connections
    }

    pub fn acquire_timeout(&self) -> Duration {
        self.acquire_timeout
    }

    pub fn write_timeout(&self) -> Duration {
        self.write_timeout
    }

    pub fn idle_timeout(&self) -> Option<Duration> {
        self.idle_timeout
    }
}

/// What a store sink's `migrate` (`PostgresSink::migrate`, `MySqlSink::migrate`) changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationReport {
    /// Tables created.
    pub created_tables: Vec<String>,
    /// Columns added to existing tables, as `table.column`.
    pub added_columns: Vec<String>,
    /// Indexes created, as `table.index`.
    pub created_indexes: Vec<String>,
}

/// A secondary index `migrate` creates (beside the unique key the writes rely on): what readers
/// of the store (the dashboard, ad-hoc queries over recent events) filter on, so they read a range
/// of an index instead of scanning the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Index {
    /// The end of its name (`<table>_<suffix>`).
    pub(crate) suffix: &'static str,
    /// Its columns, each with the prefix length MySQL needs for a `LONGTEXT` column (PostgreSQL
    /// indexes whole values).
    pub(crate) columns: &'static [(&'static str, Option<u32>)],
}

/// The events table's indexes: events by when they happened, by when they were stored, a user's
/// events by time (for "had this user been seen before" lookups), and events of one type by time
/// (the plays of a day without reading its heartbeats).
pub(crate) const EVENT_INDEXES: [Index; 4] = [
    Index { suffix: "occurred_idx", columns: &[("occurred_at", None)] },
    Index { suffix: "stored_idx", columns: &[("stored_at", None)] },
    Index { suffix: "user_occurred_idx", columns: &[("user_id", Some(64)), ("occurred_at", None)] },
    Index { suffix: "type_occurred_idx", columns: &[("event_type", None), ("occurred_at", None)] },
];

/// The dead-letter table's index: dead letters by when they were stored.
pub(crate) const DEAD_LETTER_INDEXES: [Index; 1] = [Index { suffix: "stored_idx", columns: &[("stored_at", None)] }];

/// The name of `index` on `table`: `<table>_<suffix>`, or, where that is longer than the 63
/// bytes both servers allow, the table name cut short with a digest of the whole of it, so two
/// long table names never share an index name.
pub(crate) fn index_name(table: &TableName, index: &Index) -> String {
    const MAX: usize = 63;
    let name = format!("{}_{}", table.name(), index.suffix);
    if name.len() <= MAX {
        return name;
    }
    // FNV-1a: stable across builds and platforms, unlike std's hasher.
    let digest =
        table.name().bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    let keep = MAX - index.suffix.len() - 10;
    format!("{}_{:08x}_{}", &table.name()[..keep], digest as u32, index.suffix)
}

/// What a store column holds; each sink maps a kind to its own SQL type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ColumnKind {
    Text,
    BigInt,
    /// Stored as BIGINT in PostgreSQL (checked), BIGINT UNSIGNED in MySQL.
    UnsignedBigInt,
    Double,
    /// A UTC instant, millisecond precision; the value is milliseconds since the Unix epoch.
    Time,
    /// A JSON object; the value is its text.
    Json,
    Bytes,
}

/// A column the sinks write, with its type as each store creates it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Column {
    pub(crate) name: &'static str,
    pub(crate) kind: ColumnKind,
    /// The column's type as PostgreSQL creates it. Each dialect reads only its own type, so
    /// with one dialect's feature alone the other's is never read.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) postgres: &'static str,
    /// The column's type as MySQL creates it.
    #[cfg_attr(not(feature = "mysql"), allow(dead_code))]
    pub(crate) mysql: &'static str,
}

const fn column(name: &'static str, kind: ColumnKind, postgres: &'static str, mysql: &'static str) -> Column {
    Column { name, kind, postgres, mysql }
}

/// Free text in MySQL: LONGTEXT, so that no value of a Kinesis record (at most 10 MiB) can be
/// too long for its column.
const MYSQL_TEXT: &str = "LONGTEXT";
/// A Kinesis stream name, shard id or sequence number (each at most 128 characters), compared
/// byte for byte.
const MYSQL_KINESIS_ID: &str = "VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin";

const fn text(name: &'static str) -> Column {
    column(name, ColumnKind::Text, "TEXT", MYSQL_TEXT)
}

const fn time(name: &'static str) -> Column {
    column(name, ColumnKind::Time, "TIMESTAMPTZ", "DATETIME(3)")
}

/// When the store first took the row; filled by the store, never written by the sinks.
pub(crate) const STORED_AT: Column = column(
    "stored_at",
    ColumnKind::Time,
    "TIMESTAMPTZ NOT NULL DEFAULT now()",
    // CURRENT_TIMESTAMP is in the session's time zone: UTC, as sqlx sets it.
    "DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3)",
);

/// How many columns the sinks write to the events table.
pub(crate) const EVENT_COLUMN_COUNT: usize = 33;

/// The events table's columns, in the order of [`event_values`]. [`STORED_AT`] (and MySQL's
/// `duplicate_count`) come on top, filled by the store. A table created before a column existed
/// gets it from `migrate` (nullable, so its older rows hold NULL there).
pub(crate) const EVENT_COLUMNS: [Column; EVENT_COLUMN_COUNT] = [
    // The key: the MySQL sink refuses longer ids (MAX_EVENT_ID_CHARS), and compares them byte for
    // byte like PostgreSQL does.
    column(
        "event_id",
        ColumnKind::Text,
        "TEXT NOT NULL",
        "VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL",
    ),
    column("event_type", ColumnKind::Text, "TEXT", "VARCHAR(64)"),
    time("occurred_at"),
    time("received_at"),
    text("user_id"),
    text("device_id"),
    text("session_id"),
    column("platform", ColumnKind::Text, "TEXT", "VARCHAR(64)"),
    text("app_version"),
    text("os_version"),
    text("device_model"),
    text("content_id"),
    text("content_title"),
    column("position_ms", ColumnKind::BigInt, "BIGINT", "BIGINT"),
    column("duration_ms", ColumnKind::BigInt, "BIGINT", "BIGINT"),
    text("ad_id"),
    text("ad_break"),
    text("page"),
    text("target"),
    text("error_code"),
    text("error_message"),
    column("geo_lat", ColumnKind::Double, "DOUBLE PRECISION", "DOUBLE"),
    column("geo_lon", ColumnKind::Double, "DOUBLE PRECISION", "DOUBLE"),
    text("geo_country"),
    text("geo_region"),
    // MariaDB's JSON is LONGTEXT with a JSON_VALID check.
    column("attributes", ColumnKind::Json, "JSONB", "JSON"),
    text("schema_version"),
    text("app_id"),
    column("stream", ColumnKind::Text, "TEXT", MYSQL_KINESIS_ID),
    column("shard_id", ColumnKind::Text, "TEXT", MYSQL_KINESIS_ID),
    column("sequence_number", ColumnKind::Text, "TEXT", MYSQL_KINESIS_ID),
    column("sub_sequence_number", ColumnKind::UnsignedBigInt, "BIGINT", "BIGINT UNSIGNED"),
    time("arrival"),
];

/// The dead-letter table's key: a user record's position in its shard.
pub(crate) const DEAD_LETTER_KEY: [&str; 3] = ["shard_id", "sequence_number", "sub_sequence_number"];

/// The dead-letter table's columns, in the order of [`dead_letter_values`].
pub(crate) const DEAD_LETTER_COLUMNS: [Column; 8] = [
    column(
        "shard_id",
        ColumnKind::Text,
        "TEXT NOT NULL",
        "VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL",
    ),
    column(
        "sequence_number",
        ColumnKind::Text,
        "TEXT NOT NULL",
        "VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL",
    ),
    column("sub_sequence_number", ColumnKind::UnsignedBigInt, "BIGINT NOT NULL", "BIGINT UNSIGNED NOT NULL"),
    column("stream", ColumnKind::Text, "TEXT", MYSQL_KINESIS_ID),
    // Partition keys inside an aggregate are not checked by Kinesis: any length.
    text("partition_key"),
    column("data", ColumnKind::Bytes, "BYTEA", "LONGBLOB"),
    text("reason"),
    time("arrival"),
];

/// One column's value for one row.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value<'a> {
    Text(Option<Cow<'a, str>>),
    BigInt(Option<i64>),
    UnsignedBigInt(u64),
    Double(Option<f64>),
    /// Milliseconds since the Unix epoch, within [`MIN_STORED_TIME_MS`]..=[`MAX_STORED_TIME_MS`].
    Time(Option<i64>),
    Json(Option<String>),
    Bytes(&'a [u8]),
}

impl Value<'_> {
    #[cfg(test)]
    pub(crate) fn kind(&self) -> ColumnKind {
        match self {
            Value::Text(_) => ColumnKind::Text,
            Value::BigInt(_) => ColumnKind::BigInt,
            Value::UnsignedBigInt(_) => ColumnKind::UnsignedBigInt,
            Value::Double(_) => ColumnKind::Double,
            Value::Time(_) => ColumnKind::Time,
            Value::Json(_) => ColumnKind::Json,
            Value::Bytes(_) => ColumnKind::Bytes,
        }
    }

    /// The text of a `Text` or `Json` value (`None` for NULL and for other kinds).
    pub(crate) fn as_text(&self) -> Option<&str> {
        match self {
            Value::Text(text) => text.as_deref(),
            Value::Json(json) => json.as_deref(),
            _ => None,
        }
    }

    /// The number of a `BigInt` or `Time` value. This and the accessors below serve the
    /// PostgreSQL dialect, which binds one typed array per column; MySQL binds each value by kind.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn as_i64(&self) -> Option<i64> {
        match self {
            Value::BigInt(n) | Value::Time(n) => *n,
            _ => None,
        }
    }

    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn as_u64(&self) -> u64 {
        match self {
            Value::UnsignedBigInt(n) => *n,
            _ => 0,
        }
    }

    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Double(n) => *n,
            _ => None,
        }
    }

    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn as_bytes(&self) -> &[u8] {
        match self {
            Value::Bytes(bytes) => bytes,
            _ => &[],
        }
    }

    /// About how many bytes the value takes on the wire, for splitting large batches.
    fn wire_size(&self) -> usize {
        8 + match self {
            Value::Text(text) => text.as_ref().map_or(0, |t| t.len()),
            Value::Json(json) => json.as_ref().map_or(0, String::len),
            Value::Bytes(bytes) => bytes.len(),
            _ => 8,
        }
    }
}

/// An empty string is proto3's "absent": NULL.
fn text_value(text: &str) -> Value<'_> {
    Value::Text((!text.is_empty()).then(|| without_nul(text)))
}

/// The text with each NUL character replaced by U+FFFD. PostgreSQL's `TEXT` and `JSONB` cannot hold
/// NUL (a row with one is refused, and the batch with it could never be written); both stores get
/// the same text. Event ids with control characters never get here: they are dead letters.
fn without_nul(text: &str) -> Cow<'_, str> {
    if text.contains('\0') { Cow::Owned(text.replace('\0', "\u{FFFD}")) } else { Cow::Borrowed(text) }
}

/// An enum's name, or its number for a value this build does not know (kept, never lost).
fn enum_value(number: i32, name: Option<&'static str>) -> Value<'static> {
    Value::Text(Some(name.map_or_else(|| Cow::Owned(number.to_string()), Cow::Borrowed)))
}

/// A time field of the event: 0 is proto3's "absent", and a time the stores cannot hold is NULL.
fn event_time_value(ms: i64) -> Value<'static> {
    Value::Time((ms != 0).then_some(ms).and_then(storable_time))
}

/// `ms` if both stores can hold it (see [`MIN_STORED_TIME_MS`]).
pub(crate) fn storable_time(ms: i64) -> Option<i64> {
    (MIN_STORED_TIME_MS..=MAX_STORED_TIME_MS).contains(&ms).then_some(ms)
}

fn arrival_value(arrival: Option<SystemTime>) -> Value<'static> {
    Value::Time(arrival.map(system_time_ms).and_then(storable_time))
}

/// The values of one event's row, in the order of [`EVENT_COLUMNS`]. An event without an id
/// cannot be stored (the decoder sends those to the dead letters): an error saying so.
pub(crate) fn event_values<'a>(
    stream: &'a str,
    record: &'a EventRecord,
) -> Result<[Value<'a>; EVENT_COLUMN_COUNT], String> {
    let event: &Event = &record.event;
    if event.event_id.is_empty() {
        return Err(format!(
            "the event at shard {} sequence {}/{} has no event_id and cannot be stored; the decoder should have \
             sent it to the dead letters",
            record.shard_id, record.sequence_number, record.sub_sequence_number
        ));
    }
    let geo = event.geo.as_ref();
    let finite = |n: f64| n.is_finite().then_some(n);
    let attributes = (!event.attributes.is_empty()).then(|| {
        let sorted: BTreeMap<Cow<'_, str>, Cow<'_, str>> =
            event.attributes.iter().map(|(k, v)| (without_nul(k), without_nul(v))).collect();
        serde_json::to_string(&sorted).unwrap_or_else(|_| "{}".to_owned())
    });
    Ok([
        text_value(&event.event_id),
        enum_value(event.r#type, EventType::try_from(event.r#type).ok().map(|t| t.as_str_name())),
        event_time_value(event.occurred_at_ms),
        event_time_value(event.received_at_ms),
        text_value(&event.user_id),
        text_value(&event.device_id),
        text_value(&event.session_id),
        enum_value(event.platform, Platform::try_from(event.platform).ok().map(|p| p.as_str_name())),
        text_value(&event.app_version),
        text_value(&event.os_version),
        text_value(&event.device_model),
        text_value(&event.content_id),
        text_value(&event.content_title),
        Value::BigInt(Some(event.position_ms)),
        Value::BigInt(Some(event.duration_ms)),
        text_value(&event.ad_id),
        text_value(&event.ad_break),
        text_value(&event.page),
        text_value(&event.target),
        text_value(&event.error_code),
        text_value(&event.error_message),
        Value::Double(geo.and_then(|g| finite(g.lat))),
        Value::Double(geo.and_then(|g| finite(g.lon))),
        geo.map_or(Value::Text(None), |g| text_value(&g.country)),
        geo.map_or(Value::Text(None), |g| text_value(&g.region)),
        Value::Json(attributes),
        text_value(&event.schema_version),
        text_value(&event.app_id),
        text_value(stream),
        text_value(&record.shard_id),
        text_value(&record.sequence_number),
        Value::UnsignedBigInt(record.sub_sequence_number),
        arrival_value(record.arrival),
    ])
}

/// Every event's values, or the first event that cannot be stored.
pub(crate) fn event_rows<'a>(
    stream: &'a str,
    events: &'a [EventRecord],
) -> Result<Vec<[Value<'a>; EVENT_COLUMN_COUNT]>, String> {
    events.iter().map(|record| event_values(stream, record)).collect()
}

/// Where a stored event was read: `stream`, `shard_id`, `sequence_number`, `sub_sequence_number`
/// of its row, keyed by `event_id` (what the stores read back to tell re-read records from resent
/// events).
pub(crate) type StoredPosition = (String, Option<String>, Option<String>, Option<String>, Option<u64>);

/// The columns of a [`StoredPosition`], in its order.
pub(crate) const POSITION_COLUMNS: &str = "event_id, stream, shard_id, sequence_number, sub_sequence_number";

/// How many of `stream`'s `events` are stored at the position they were read from: those just
/// written, and those an earlier read of the same records wrote.
pub(crate) fn same_position(stream: &str, events: &[EventRecord], stored: &[StoredPosition]) -> u64 {
    let stored: std::collections::HashMap<&str, &StoredPosition> =
        stored.iter().map(|row| (row.0.as_str(), row)).collect();
    events
        .iter()
        .filter(|record| {
            stored.get(record.event.event_id.as_str()).is_some_and(|(_, s, shard, sequence, sub)| {
                s.as_deref() == Some(stream)
                    && shard.as_deref() == Some(record.shard_id.as_str())
                    && sequence.as_deref() == Some(record.sequence_number.as_str())
                    && *sub == Some(record.sub_sequence_number)
            })
        })
        .count() as u64
}

/// The report of a write of `events` events of which `written` were new and `matching` are stored
/// at the position they were read from (see [`same_position`]).
pub(crate) fn sink_report(events: u64, written: u64, matching: u64) -> crate::SinkReport {
    let duplicates = events.saturating_sub(written);
    crate::SinkReport { written, duplicates, reread: matching.saturating_sub(written).min(duplicates) }
}

/// The values of one dead letter's row, in the order of [`DEAD_LETTER_COLUMNS`].
pub(crate) fn dead_letter_values<'a>(stream: &'a str, dead: &'a DeadLetter) -> [Value<'a>; 8] {
    [
        Value::Text(Some(Cow::Borrowed(&dead.shard_id))),
        Value::Text(Some(Cow::Borrowed(&dead.sequence_number))),
        Value::UnsignedBigInt(dead.sub_sequence_number),
        text_value(stream),
        text_value(&dead.partition_key),
        Value::Bytes(&dead.data),
        text_value(&dead.reason),
        arrival_value(dead.arrival),
    ]
}

/// Splits rows into runs of at most `max_rows` rows and about `max_bytes` bytes (a single row
/// larger than that is a run of its own).
pub(crate) fn chunk_ranges<const N: usize>(
    rows: &[[Value<'_>; N]],
    max_rows: usize,
    max_bytes: usize,
) -> Vec<Range<usize>> {
    let mut ranges = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (index, row) in rows.iter().enumerate() {
        let size: usize = row.iter().map(Value::wire_size).sum();
        if index > start && (index - start >= max_rows || bytes + size > max_bytes) {
            ranges.push(start..index);
            start = index;
            bytes = 0;
        }
        bytes += size;
    }
    if start < rows.len() {
        ranges.push(start..rows.len());
    }
    ranges
}

/// A table name the sinks accept: lower-case ASCII letters, digits and `_`, not starting with a
/// digit, optionally after a schema (PostgreSQL) or database (MySQL) name of the same form and a
/// dot. Always quoted in SQL, so a reserved word is fine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TableName {
    schema: Option<String>,
    name: String,
}

impl TableName {
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let (schema, name) = match text.split_once('.') {
            Some((schema, name)) => (Some(schema), name),
            None => (None, text),
        };
        let valid = |part: &str, max: usize| {
            !part.is_empty()
                && part.len() <= max
                && !part.starts_with(|c: char| c.is_ascii_digit())
                && part.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        };
        if !valid(name, MAX_TABLE_NAME_LEN) || schema.is_some_and(|s| !valid(s, 63)) {
            return Err(format!(
                "table name {text:?} is not usable: use lower-case letters, digits and _ (not first), at most \
                 {MAX_TABLE_NAME_LEN} characters (room for the {DEAD_LETTER_SUFFIX} table), optionally after \
                 schema_name."
            ));
        }
        Ok(TableName { schema: schema.map(str::to_owned), name: name.to_owned() })
    }

    pub(crate) fn with_suffix(&self, suffix: &str) -> Self {
        TableName { schema: self.schema.clone(), name: format!("{}{suffix}", self.name) }
    }

    /// The schema (PostgreSQL) or database (MySQL) part, if given; MySQL looks tables up by it.
    #[cfg_attr(not(feature = "mysql"), allow(dead_code))]
    pub(crate) fn schema(&self) -> Option<&str> {
        self.schema.as_deref()
    }

    #[cfg_attr(not(feature = "mysql"), allow(dead_code))]
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The name quoted for SQL with `quote` (`"` for PostgreSQL, `` ` `` for MySQL). The parts
    /// hold no quote characters (checked by `parse`), so nothing needs escaping.
    pub(crate) fn quoted(&self, quote: char) -> String {
        match &self.schema {
            Some(schema) => format!("{quote}{schema}{quote}.{quote}{}{quote}", self.name),
            None => format!("{quote}{}{quote}", self.name),
        }
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(schema) => write!(f, "{schema}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// Refuses a URL for another database (sqlx itself does not look at the scheme), without
/// repeating the URL, which may hold a password.
pub(crate) fn check_scheme(url: &str, schemes: &[&str], sink: &str) -> Result<(), SinkError> {
    let scheme = url.split_once("://").map(|(scheme, _)| scheme.to_ascii_lowercase());
    match scheme {
        Some(scheme) if schemes.contains(&scheme.as_str()) => Ok(()),
        _ => Err(SinkError::misconfigured(
            sink,
            format!("the database URL for the {sink} sink must start with {}://", schemes.join(":// or ")),
        )),
    }
}

/// Retryability and message of an error that did not come from the database server itself:
/// the network, the pool, TLS, the URL, or values the driver could not encode or decode.
pub(crate) fn transport_error(error: &sqlx::Error, store: &str, target: &str, config: &StoreConfig) -> (bool, String) {
    match error {
        sqlx::Error::Io(e) => {
            (true, format!("lost or could not open the connection to {store} at {target}: {e}; will retry"))
        }
        sqlx::Error::PoolTimedOut => (
            true,
            format!(
                "no connection to {store} at {target} within {:?} (refused, unreachable, or all {} connections \
                 busy): check that the database is up and reachable; will retry",
                config.acquire_timeout, config.max_connections
            ),
        ),
        sqlx::Error::PoolClosed => {
            (false, format!("the connection pool to {target} was closed (the sink was shut down)"))
        }
        sqlx::Error::Tls(e) => (
            false,
            format!(
                "TLS to {store} at {target} failed: {e}: check the URL's ssl mode and the server certificate \
                 (TLS needs ktk-consumer's store-tls feature)"
            ),
        ),
        sqlx::Error::Protocol(e) => (true, format!("protocol error talking to {store} at {target}: {e}; will retry")),
        sqlx::Error::WorkerCrashed => (true, format!("the connection to {store} at {target} broke down; will retry")),
        sqlx::Error::Configuration(e) => {
            (false, format!("the connection settings for {store} at {target} are not usable: {e}: fix the URL"))
        }
        other => (
            false,
            format!(
                "{store} at {target}: {other}: the table's columns do not match what the sink writes; run \
                 migrate() to see what to change"
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::UNIX_EPOCH;

    use ktk_proto::events::v1::Geo;

    use super::*;

    fn record(event: Event) -> EventRecord {
        EventRecord {
            event,
            shard_id: "shardId-000000000001".to_owned(),
            sequence_number: "49590338271490256608559692538361571095921575989136588898".to_owned(),
            sub_sequence_number: 3,
            arrival: Some(UNIX_EPOCH + Duration::from_millis(1_700_000_000_123)),
        }
    }

    #[test]
    fn index_names_fit_and_stay_apart() {
        let short = TableName::parse("events").expect("valid");
        assert_eq!(index_name(&short, &EVENT_INDEXES[2]), "events_user_occurred_idx");
        let long_a = TableName::parse(&"a".repeat(MAX_TABLE_NAME_LEN)).expect("valid").with_suffix(DEAD_LETTER_SUFFIX);
        let long_b = TableName::parse(&format!("{}b", "a".repeat(MAX_TABLE_NAME_LEN - 1)))
            .expect("valid")
            .with_suffix(DEAD_LETTER_SUFFIX);
        for index in EVENT_INDEXES.iter().chain(&DEAD_LETTER_INDEXES) {
            let (a, b) = (index_name(&long_a, index), index_name(&long_b, index));
            assert!(a.len() <= 63 && b.len() <= 63, "{a} {b}");
            assert_ne!(a, b);
            assert!(a.ends_with(index.suffix));
        }
    }

    #[test]
    fn a_duplicate_stored_where_it_was_read_is_a_reread() {
        let at = |id: &str, sub| {
            let mut r = record(Event { event_id: id.to_owned(), ..Event::default() });
            r.sub_sequence_number = sub;
            r
        };
        let events = [at("a", 0), at("b", 1), at("c", 2), at("d", 3)];
        let row = |id: &str, stream: &str, sub| -> StoredPosition {
            let r = at(id, sub);
            (id.to_owned(), Some(stream.to_owned()), Some(r.shard_id), Some(r.sequence_number), Some(sub))
        };
        // "a" and "b" where they were read, "c" at another sub-sequence number (sent again),
        // "d" in another stream, "e" not in the batch.
        let stored = [row("a", "s", 0), row("b", "s", 1), row("c", "s", 7), row("d", "t", 3), row("e", "s", 4)];
        assert_eq!(same_position("s", &events, &stored), 2);
        // Of four events, one new ("a", matching too), so one of three duplicates was re-read.
        assert_eq!(sink_report(4, 1, 2), crate::SinkReport { written: 1, duplicates: 3, reread: 1 });
        assert_eq!(sink_report(4, 4, 4), crate::SinkReport { written: 4, duplicates: 0, reread: 0 });
        assert_eq!(sink_report(2, 0, 5), crate::SinkReport { written: 0, duplicates: 2, reread: 2 });
    }

    fn full_event() -> Event {
        Event {
            event_id: "e-1".to_owned(),
            r#type: EventType::AdStart as i32,
            occurred_at_ms: 1_700_000_000_001,
            received_at_ms: 1_700_000_000_002,
            user_id: "u".to_owned(),
            device_id: "d".to_owned(),
            session_id: "s".to_owned(),
            platform: Platform::Roku as i32,
            app_version: "1.2.3".to_owned(),
            os_version: "14".to_owned(),
            device_model: "m".to_owned(),
            content_id: "c".to_owned(),
            content_title: "Título ✓".to_owned(),
            position_ms: 0,
            duration_ms: 90_000,
            ad_id: "ad".to_owned(),
            ad_break: "preroll".to_owned(),
            page: "/home".to_owned(),
            target: "play".to_owned(),
            error_code: "E1".to_owned(),
            error_message: "boom".to_owned(),
            geo: Some(Geo { lat: 40.7, lon: -74.0, country: "US".to_owned(), region: "US-NY".to_owned() }),
            attributes: HashMap::from([("z".to_owned(), "1".to_owned()), ("a".to_owned(), "\"q\"".to_owned())]),
            schema_version: "1.0".to_owned(),
            app_id: "tv-roku".to_owned(),
        }
    }

    fn value<'r>(row: &'r [Value<'_>; EVENT_COLUMN_COUNT], name: &str) -> &'r Value<'r> {
        let index = EVENT_COLUMNS.iter().position(|c| c.name == name).expect("a column of that name");
        &row[index]
    }

    fn text(s: &str) -> Value<'_> {
        Value::Text(Some(Cow::Borrowed(s)))
    }

    #[test]
    fn values_follow_the_columns_kinds() {
        let events = [record(full_event()), record(Event { event_id: "x".to_owned(), ..Event::default() })];
        for rec in &events {
            let row = event_values("s", rec).expect("storable");
            for (column, value) in EVENT_COLUMNS.iter().zip(&row) {
                assert_eq!(column.kind, value.kind(), "column {}", column.name);
            }
        }
        let dead = DeadLetter {
            shard_id: "s".to_owned(),
            sequence_number: "1".to_owned(),
            sub_sequence_number: 0,
            partition_key: "pk".to_owned(),
            data: bytes::Bytes::from_static(b"\xff"),
            reason: "bad".to_owned(),
            arrival: None,
        };
        for (column, value) in DEAD_LETTER_COLUMNS.iter().zip(&dead_letter_values("s", &dead)) {
            assert_eq!(column.kind, value.kind(), "column {}", column.name);
        }
        for key in DEAD_LETTER_KEY {
            assert!(DEAD_LETTER_COLUMNS.iter().any(|c| c.name == key));
        }
    }

    #[test]
    fn a_full_event_maps_to_typed_values() {
        let rec = record(full_event());
        let row = event_values("clicks", &rec).expect("storable");
        assert_eq!(value(&row, "event_id"), &text("e-1"));
        assert_eq!(value(&row, "event_type"), &text("EVENT_TYPE_AD_START"));
        assert_eq!(value(&row, "platform"), &text("PLATFORM_ROKU"));
        assert_eq!(value(&row, "occurred_at"), &Value::Time(Some(1_700_000_000_001)));
        assert_eq!(value(&row, "received_at"), &Value::Time(Some(1_700_000_000_002)));
        assert_eq!(value(&row, "content_title"), &text("Título ✓"));
        assert_eq!(value(&row, "position_ms"), &Value::BigInt(Some(0)));
        assert_eq!(value(&row, "duration_ms"), &Value::BigInt(Some(90_000)));
        assert_eq!(value(&row, "geo_lat"), &Value::Double(Some(40.7)));
        assert_eq!(value(&row, "geo_lon"), &Value::Double(Some(-74.0)));
        assert_eq!(value(&row, "geo_region"), &text("US-NY"));
        assert_eq!(value(&row, "app_id"), &text("tv-roku"));
        // Keys sorted, values escaped.
        assert_eq!(value(&row, "attributes"), &Value::Json(Some(r#"{"a":"\"q\"","z":"1"}"#.to_owned())));
        assert_eq!(value(&row, "stream"), &text("clicks"));
        assert_eq!(value(&row, "shard_id"), &text("shardId-000000000001"));
        assert_eq!(value(&row, "sub_sequence_number"), &Value::UnsignedBigInt(3));
        assert_eq!(value(&row, "arrival"), &Value::Time(Some(1_700_000_000_123)));
    }

    #[test]
    fn proto3_defaults_are_null() {
        let rec = record(Event { event_id: "only-an-id".to_owned(), ..Event::default() });
        let row = event_values("s", &rec).expect("storable");
        assert_eq!(value(&row, "event_type"), &text("EVENT_TYPE_UNSPECIFIED"));
        assert_eq!(value(&row, "platform"), &text("PLATFORM_UNSPECIFIED"));
        assert_eq!(value(&row, "occurred_at"), &Value::Time(None));
        assert_eq!(value(&row, "user_id"), &Value::Text(None));
        assert_eq!(value(&row, "position_ms"), &Value::BigInt(Some(0)));
        for geo in ["geo_lat", "geo_lon"] {
            assert_eq!(value(&row, geo), &Value::Double(None));
        }
        assert_eq!(value(&row, "geo_country"), &Value::Text(None));
        assert_eq!(value(&row, "attributes"), &Value::Json(None));
        assert_eq!(value(&row, "app_id"), &Value::Text(None));
    }

    #[test]
    fn geo_at_zero_zero_is_kept_and_non_finite_coordinates_are_null() {
        let rec = record(Event { event_id: "g".to_owned(), geo: Some(Geo::default()), ..Event::default() });
        let row = event_values("s", &rec).expect("storable");
        assert_eq!(value(&row, "geo_lat"), &Value::Double(Some(0.0)));
        assert_eq!(value(&row, "geo_lon"), &Value::Double(Some(0.0)));
        assert_eq!(value(&row, "geo_country"), &Value::Text(None));
        let geo = Geo { lat: f64::NAN, lon: f64::INFINITY, ..Geo::default() };
        let rec = record(Event { event_id: "g".to_owned(), geo: Some(geo), ..Event::default() });
        let row = event_values("s", &rec).expect("storable");
        assert_eq!(value(&row, "geo_lat"), &Value::Double(None));
        assert_eq!(value(&row, "geo_lon"), &Value::Double(None));
    }

    #[test]
    fn unknown_enum_numbers_are_kept_as_digits() {
        let rec = record(Event { event_id: "n".to_owned(), r#type: 61, platform: -3, ..Event::default() });
        let row = event_values("s", &rec).expect("storable");
        assert_eq!(value(&row, "event_type"), &text("61"));
        assert_eq!(value(&row, "platform"), &text("-3"));
    }

    #[test]
    fn times_outside_the_storable_range_are_null() {
        for (ms, stored) in [
            (MIN_STORED_TIME_MS, Some(MIN_STORED_TIME_MS)),
            (MAX_STORED_TIME_MS, Some(MAX_STORED_TIME_MS)),
            (MIN_STORED_TIME_MS - 1, None),
            (MAX_STORED_TIME_MS + 1, None),
            (i64::MAX, None),
            (-1, Some(-1)),
        ] {
            let rec = record(Event { event_id: "t".to_owned(), occurred_at_ms: ms, ..Event::default() });
            let row = event_values("s", &rec).expect("storable");
            assert_eq!(value(&row, "occurred_at"), &Value::Time(stored), "{ms}");
        }
    }

    #[test]
    fn arrivals_outside_what_both_stores_hold_are_null() {
        let arrival = arrival_value(Some(UNIX_EPOCH + Duration::from_secs(400_000_000_000)));
        assert_eq!(arrival, Value::Time(None));
    }

    #[test]
    fn an_event_without_an_id_is_refused() {
        let rec = record(Event::default());
        let error = event_values("s", &rec).expect_err("no id");
        assert!(error.contains("no event_id") && error.contains("shardId-000000000001"), "{error}");
    }

    #[test]
    fn table_names_are_checked_and_quoted() {
        let table = TableName::parse("events").expect("valid");
        assert_eq!(table.quoted('"'), "\"events\"");
        assert_eq!(table.with_suffix(DEAD_LETTER_SUFFIX).to_string(), "events_dead_letters");
        let qualified = TableName::parse("analytics.events_2").expect("valid");
        assert_eq!(qualified.quoted('`'), "`analytics`.`events_2`");
        assert_eq!(qualified.schema(), Some("analytics"));
        assert_eq!(qualified.name(), "events_2");
        let longest = "e".repeat(MAX_TABLE_NAME_LEN);
        assert!(TableName::parse(&longest).is_ok());
        for bad in ["", "Events", "1events", "ev\"ents", "a.b.c", "ev ents", "x;drop", &format!("{longest}e"), ".e"] {
            assert!(TableName::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn large_batches_are_split_by_size() {
        let big = "x".repeat(1000);
        let events: Vec<EventRecord> = (0..10)
            .map(|i| record(Event { event_id: format!("{i}"), content_title: big.clone(), ..Event::default() }))
            .collect();
        let rows = event_rows("s", &events).expect("storable");
        assert_eq!(chunk_ranges(&rows, usize::MAX, usize::MAX), vec![0..10]);
        assert_eq!(chunk_ranges(&rows, 4, usize::MAX), vec![0..4, 4..8, 8..10]);
        let ranges = chunk_ranges(&rows, usize::MAX, 3_000);
        assert!(ranges.len() >= 4 && ranges.iter().all(|r| !r.is_empty()), "{ranges:?}");
        assert_eq!(ranges.last().map(|r| r.end), Some(10));
        // A row larger than the limit is a chunk of its own, never dropped.
        assert_eq!(chunk_ranges(&rows, usize::MAX, 10).len(), 10);
        assert!(chunk_ranges::<EVENT_COLUMN_COUNT>(&[], 1, 1).is_empty());
    }
}
