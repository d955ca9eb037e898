//! The real-time store sink for PostgreSQL, and what both store sinks share (the column layout,
//! the mapping of an event to column values, the pool settings, the transport errors).
//!
//! # How a batch flows
//! [`PostgresSink::write`] maps each [`EventRecord`] of the [`Batch`] to one value per column
//! (see [What is stored how](#what-is-stored-how)), turns the rows into one array per column and
//! inserts them all with one statement:
//!
//! ```sql
//! INSERT INTO "events" ("event_id", ...) SELECT ... FROM unnest($1::text[], ...) AS r(...)
//! ON CONFLICT ("event_id") DO NOTHING
//! ```
//!
//! The statement's text depends only on the table, so each connection parses it once and every
//! later batch is one round trip, whatever its size; it has one parameter per column (32), never
//! one per value, so the protocol's limit of 65,535 parameters never applies. The only split is
//! by size: a batch over [`POSTGRES_MAX_STATEMENT_BYTES`] of event data becomes several
//! statements. The rows PostgreSQL reports as inserted are [`SinkReport::written`]; the rest of
//! the batch were stored already, by an earlier attempt or by another consumer
//! ([`SinkReport::duplicates`]), including an event id seen twice in the same batch.
//!
//! Dead letters go to `<table>_dead_letters` the same way, keyed by their position in the shard
//! (`shard_id`, `sequence_number`, `sub_sequence_number`), so writing them again is a no-op.
//!
//! # Tables
//! [`PostgresSink::migrate`] (called once at start-up) creates both tables, adds the columns an
//! older table lacks, and checks that every column has a usable type and that the dedup key is a
//! unique index, all in one transaction under an advisory lock, so consumers starting together
//! do not race. Columns it adds are nullable, so older rows read as NULL.
//!
//! # What is stored how
//! Shared with the MySQL sink ([`super::mysql`]):
//! - proto3 cannot tell an absent field from its default, so defaults are stored as NULL:
//!   empty strings, a time of 0 and an empty `attributes` map. `position_ms` and `duration_ms`
//!   are stored as they are (0 is a real playhead position).
//! - `event_type` and `platform` are the enum value's name (`"EVENT_TYPE_PLAY"`); a number this
//!   build does not know is stored as its decimal digits (`"61"`), so it is never lost.
//! - times are UTC instants with millisecond precision. A time outside the years 1000 to 9999
//!   (a device with a broken clock) is stored as NULL: both stores can hold that range, and no
//!   batch must fail for one bad clock. The S3 copy keeps the raw value.
//! - `geo_*` columns are all NULL when the event has no `geo`; when it has, `geo_lat` and
//!   `geo_lon` are numbers (NULL only if not finite) and the rest follows the rule above.
//! - `attributes` is a JSON object with its keys sorted.
//! - `stream`, `shard_id`, `sequence_number`, `sub_sequence_number` and `arrival` say where in
//!   the stream the event was read; `stored_at` is when the store first took it.
//!
//! # Errors
//! Every failure is a [`SinkError`]. Retryable (`retryable: true`): refused or lost connections,
//! a pool timeout (which also bounds connecting: see [`StoreConfig::with_acquire_timeout`]), a
//! server shutting down or in recovery, too many connections, deadlocks, lock and statement
//! timeouts, a read-only server after a failover. Not retryable: a wrong URL, password or
//! database, missing privileges, a missing table or column, a column of the wrong type, a value
//! that does not fit; their messages say what to change.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime};

use futures::future::BoxFuture;
use ktk_proto::events::v1::{Event, EventType, Platform};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use crate::time::unix_millis as system_time_ms;
use crate::{Batch, EventRecord, Sink, SinkError, SinkReport, SinkTiming};

/// The PostgreSQL sink's name in logs, metrics and errors.
pub const POSTGRES_SINK_NAME: &str = "postgres";

/// The most event data (roughly, in bytes) one INSERT statement carries; a larger batch is split.
/// PostgreSQL refuses a message or a field over 1 GiB (`MaxAllocSize`); far below that, this
/// bounds the memory one statement takes on both sides.
pub const POSTGRES_MAX_STATEMENT_BYTES: usize = 64 * 1024 * 1024;

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

/// What [`PostgresSink::migrate`] (or `MySqlSink::migrate`) changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationReport {
    /// Tables created.
    pub created_tables: Vec<String>,
    /// Columns added to existing tables, as `table.column`.
    pub added_columns: Vec<String>,
}

/// Writes batches to a PostgreSQL table, idempotently on `event_id`. See the [module](self) docs.
pub struct PostgresSink {
    pool: PgPool,
    /// `postgres://user@host:port/database`: where, without the password.
    target: String,
    table: TableName,
    dead_letter_table: TableName,
    config: StoreConfig,
    insert_events: String,
    insert_dead_letters: String,
}

impl fmt::Debug for PostgresSink {
    // By hand: the connect options hold the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresSink")
            .field("target", &self.target)
            .field("table", &self.table.to_string())
            .field("config", &self.config)
            .field("connections", &self.pool.size())
            .finish()
    }
}

impl PostgresSink {
    /// Connects to `url` (`postgres://user:password@host:port/database?sslmode=...`, any option
    /// `libpq` URLs take) with the default [`StoreConfig`], and opens one connection, so a wrong
    /// URL, password or database fails here. Does not create the table: call
    /// [`migrate`](Self::migrate).
    pub async fn connect(url: &str, table: &str) -> Result<Self, SinkError> {
        Self::connect_with(url, table, StoreConfig::default()).await
    }

    /// [`connect`](Self::connect) with pool settings.
    pub async fn connect_with(url: &str, table: &str, config: StoreConfig) -> Result<Self, SinkError> {
        let sink = Self::connect_lazy(url, table, config)?;
        let connection = sink.pool.acquire().await.map_err(|e| sink.error("connect", &e))?;
        drop(connection);
        Ok(sink)
    }

    /// Checks the URL and the table name and builds the pool without connecting: connections
    /// are opened by the first write. Must be called within a Tokio runtime.
    pub fn connect_lazy(url: &str, table: &str, config: StoreConfig) -> Result<Self, SinkError> {
        check_scheme(url, &["postgres", "postgresql"], POSTGRES_SINK_NAME)?;
        let options = PgConnectOptions::from_str(url).map_err(|e| {
            SinkError::misconfigured(
                POSTGRES_SINK_NAME,
                format!("the PostgreSQL URL is not valid: {e}; expected postgres://user:password@host:port/database"),
            )
        })?;
        let options =
            if options.get_application_name().is_none() { options.application_name("ktk-consumer") } else { options };
        let target = format!(
            "postgres://{}@{}:{}/{}",
            options.get_username(),
            options.get_host(),
            options.get_port(),
            options.get_database().unwrap_or(options.get_username()),
        );
        let table = TableName::parse(table).map_err(|e| SinkError::misconfigured(POSTGRES_SINK_NAME, e))?;
        let dead_letter_table = table.with_suffix(DEAD_LETTER_SUFFIX);
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections)
            .acquire_timeout(config.acquire_timeout)
            .idle_timeout(config.idle_timeout)
            .connect_lazy_with(options);
        Ok(PostgresSink {
            insert_events: pg_insert_sql(&table, &EVENT_COLUMNS, &["event_id"]),
            insert_dead_letters: pg_insert_sql(&dead_letter_table, &DEAD_LETTER_COLUMNS, &DEAD_LETTER_KEY),
            pool,
            target,
            table,
            dead_letter_table,
            config,
        })
    }

    /// The events table, as given (`events` or `schema.events`).
    pub fn table(&self) -> String {
        self.table.to_string()
    }

    /// The dead-letter table: the events table's name with [`DEAD_LETTER_SUFFIX`].
    pub fn dead_letter_table(&self) -> String {
        self.dead_letter_table.to_string()
    }

    /// The connection pool (for queries of the caller's own, such as the tests' read-backs).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Closes the pool: waits for connections in use to come back, then closes them all. Call
    /// it at shutdown, after the last write.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Creates the events and dead-letter tables if they do not exist, adds the columns an
    /// older table lacks, and checks the columns' types and the unique keys the writes rely on.
    /// Safe to run again and from several consumers at once (one transaction under an advisory
    /// lock). A table that cannot work (a column of another type, no unique key on `event_id`)
    /// is a non-retryable error naming each problem and what to do about it.
    pub async fn migrate(&self) -> Result<MigrationReport, SinkError> {
        let mut report = MigrationReport::default();
        let mut tx = self.pool.begin().await.map_err(|e| self.error("migrate", &e))?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(format!("ktk-store-migrate:{}", self.table))
            .execute(&mut *tx)
            .await
            .map_err(|e| self.error("migrate", &e))?;
        let mut problems = Vec::new();
        for (table, columns, key) in [
            (&self.table, &EVENT_COLUMNS[..], &["event_id"][..]),
            (&self.dead_letter_table, &DEAD_LETTER_COLUMNS[..], &DEAD_LETTER_KEY[..]),
        ] {
            let quoted = table.quoted('"');
            let columns: Vec<Column> = columns.iter().copied().chain([STORED_AT]).collect();
            let existing: Vec<(String, String)> = sqlx::query_as(
                "SELECT a.attname::text, t.typname::text FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
                 WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
            )
            .bind(&quoted)
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| self.error("migrate", &e))?;
            if existing.is_empty() {
                let sql = pg_create_table_sql(table, &columns, key);
                sqlx::query(&sql).execute(&mut *tx).await.map_err(|e| self.error("migrate", &e))?;
                report.created_tables.push(table.to_string());
                continue;
            }
            let missing: Vec<&Column> =
                columns.iter().filter(|c| !existing.iter().any(|(name, _)| name == c.name)).collect();
            if !missing.is_empty() {
                let adds: Vec<String> =
                    missing.iter().map(|c| format!("ADD COLUMN IF NOT EXISTS \"{}\" {}", c.name, c.postgres)).collect();
                let sql = format!("ALTER TABLE {quoted} {}", adds.join(", "));
                sqlx::query(&sql).execute(&mut *tx).await.map_err(|e| self.error("migrate", &e))?;
                report.added_columns.extend(missing.iter().map(|c| format!("{table}.{}", c.name)));
            }
            for (name, type_name) in &existing {
                let Some(column) = columns.iter().find(|c| c.name == name) else { continue };
                if !pg_type_fits(column.kind, type_name) {
                    problems.push(format!(
                        "column {name} of table {table} is {type_name}, but the sink writes {}: alter it \
                         (ALTER TABLE {quoted} ALTER COLUMN \"{name}\" TYPE {} USING ...) or use a new table",
                        column.postgres, column.postgres
                    ));
                }
            }
            let unique_keys: Vec<(Vec<String>,)> = sqlx::query_as(
                "SELECT array_agg(a.attname::text ORDER BY a.attname) FROM pg_index i \
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
                 WHERE i.indrelid = to_regclass($1) AND i.indisunique AND i.indpred IS NULL \
                 GROUP BY i.indexrelid",
            )
            .bind(&quoted)
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| self.error("migrate", &e))?;
            let mut wanted: Vec<&str> = key.to_vec();
            wanted.sort_unstable();
            if !unique_keys.iter().any(|(columns,)| columns.iter().map(String::as_str).eq(wanted.iter().copied())) {
                problems.push(format!(
                    "table {table} has no primary key or unique index on ({}), which the sink's \
                     ON CONFLICT relies on: add one (ALTER TABLE {quoted} ADD PRIMARY KEY ({}))",
                    key.join(", "),
                    key.iter().map(|k| format!("\"{k}\"")).collect::<Vec<_>>().join(", ")
                ));
            }
        }
        if !problems.is_empty() {
            // Nothing half-done stays behind: the transaction rolls back on drop.
            return Err(SinkError::misconfigured(POSTGRES_SINK_NAME, problems.join("; ")));
        }
        tx.commit().await.map_err(|e| self.error("migrate", &e))?;
        if !report.created_tables.is_empty() || !report.added_columns.is_empty() {
            tracing::info!(
                sink = POSTGRES_SINK_NAME,
                created = ?report.created_tables,
                added = ?report.added_columns,
                "store tables migrated"
            );
        }
        Ok(report)
    }

    async fn write_batch(&self, batch: &Batch) -> Result<SinkReport, SinkError> {
        let started = Instant::now();
        if !batch.dead_letters.is_empty() {
            let rows: Vec<_> = batch.dead_letters.iter().map(|d| dead_letter_values(&batch.stream, d)).collect();
            for range in chunk_ranges(&rows, usize::MAX, POSTGRES_MAX_STATEMENT_BYTES) {
                self.insert(&self.insert_dead_letters, &DEAD_LETTER_COLUMNS, &rows[range]).await?;
            }
        }
        let rows =
            event_rows(&batch.stream, &batch.events).map_err(|e| SinkError::misconfigured(POSTGRES_SINK_NAME, e))?;
        let mut written = 0;
        for range in chunk_ranges(&rows, usize::MAX, POSTGRES_MAX_STATEMENT_BYTES) {
            written += self.insert(&self.insert_events, &EVENT_COLUMNS, &rows[range]).await?;
        }
        let report = SinkReport { written, duplicates: (batch.events.len() as u64).saturating_sub(written) };
        tracing::debug!(
            sink = POSTGRES_SINK_NAME,
            shard = %batch.shard_id,
            written = report.written,
            duplicates = report.duplicates,
            dead_letters = batch.dead_letters.len(),
            elapsed = ?started.elapsed(),
            "batch stored"
        );
        Ok(report)
    }

    /// One INSERT of `rows` (one array per column); returns the rows inserted.
    async fn insert<const N: usize>(
        &self,
        sql: &str,
        columns: &[Column; N],
        rows: &[[Value<'_>; N]],
    ) -> Result<u64, SinkError> {
        let mut query = sqlx::query(sql);
        for (index, column) in columns.iter().enumerate() {
            let values = rows.iter().map(|row| &row[index]);
            query = match column.kind {
                ColumnKind::Text | ColumnKind::Json => query.bind(values.map(Value::as_text).collect::<Vec<_>>()),
                ColumnKind::BigInt | ColumnKind::Time => query.bind(values.map(Value::as_i64).collect::<Vec<_>>()),
                ColumnKind::UnsignedBigInt => {
                    let converted: Result<Vec<i64>, _> =
                        values.map(|v| i64::try_from(v.as_u64()).map_err(|_| v.as_u64())).collect();
                    let converted = converted.map_err(|value| {
                        SinkError::misconfigured(
                            POSTGRES_SINK_NAME,
                            format!("{} {value} does not fit PostgreSQL's BIGINT", column.name),
                        )
                    })?;
                    query.bind(converted)
                }
                ColumnKind::Double => query.bind(values.map(Value::as_f64).collect::<Vec<_>>()),
                ColumnKind::Bytes => query.bind(values.map(Value::as_bytes).collect::<Vec<_>>()),
            };
        }
        let result = query.execute(&self.pool).await.map_err(|e| self.error("write", &e))?;
        Ok(result.rows_affected())
    }

    fn error(&self, operation: &str, error: &sqlx::Error) -> SinkError {
        let (retryable, message) = match error {
            sqlx::Error::Database(db) => {
                let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
                let retryable = postgres_code_is_retryable(&code);
                let hint = postgres_hint(&code, &self.table, &self.dead_letter_table);
                (retryable, format!("{operation} on {}: {} (SQLSTATE {code}){hint}", self.table, db.message()))
            }
            other => transport_error(other, "PostgreSQL", &self.target, &self.config),
        };
        SinkError::classified(POSTGRES_SINK_NAME, message, retryable)
    }
}

impl Sink for PostgresSink {
    fn name(&self) -> &str {
        POSTGRES_SINK_NAME
    }

    /// Events reach the store as soon as they are read (the store is idempotent on `event_id`).
    fn timing(&self) -> SinkTiming {
        SinkTiming::Immediate
    }

    fn write<'a>(&'a self, batch: &'a Batch) -> BoxFuture<'a, Result<SinkReport, SinkError>> {
        Box::pin(async move {
            if batch.events.is_empty() && batch.dead_letters.is_empty() {
                return Ok(SinkReport::default());
            }
            match tokio::time::timeout(self.config.write_timeout, self.write_batch(batch)).await {
                Ok(result) => result,
                Err(_) => Err(SinkError::timed_out(
                    POSTGRES_SINK_NAME,
                    self.config.write_timeout,
                    format!(
                        "writing {} events of shard {} to {} at {} took longer than {:?}; will retry \
                         (raise the write timeout if batches are this slow on a healthy database)",
                        batch.events.len(),
                        batch.shard_id,
                        self.table,
                        self.target,
                        self.config.write_timeout
                    ),
                )),
            }
        })
    }
}

/// Whether a PostgreSQL error (by SQLSTATE) may go away by itself: connection trouble (08),
/// transaction rollbacks such as deadlocks and serialization failures (40), insufficient
/// resources such as too many connections or a full disk (53), a server shutting down, starting
/// or cancelling the statement (57), system errors (58), lock timeouts and objects in use (55P03,
/// 55006), and a read-only server after a failover (25006).
fn postgres_code_is_retryable(code: &str) -> bool {
    matches!(code.get(..2), Some("08" | "40" | "53" | "57" | "58")) || matches!(code, "55P03" | "55006" | "25006")
}

/// What to do about a non-retryable PostgreSQL error, by SQLSTATE (empty if nothing to add).
fn postgres_hint(code: &str, table: &TableName, dead_letters: &TableName) -> String {
    let hint = match code {
        "42P01" => format!(
            "table {table} or {dead_letters} does not exist: run migrate() at start-up (the consumer does), or fix \
             the table name"
        ),
        "42703" => "the table is older than this sink: run migrate() to add the missing columns".to_owned(),
        "42804" | "42846" => {
            "a column has another type than the sink writes: migrate() names it; alter it or use a new table".to_owned()
        }
        "42P10" => "the table needs a primary key on event_id (the sink's dedup key): run migrate() to see".to_owned(),
        "42501" => format!(
            "grant the database user INSERT and SELECT on {table} and {dead_letters} (and CREATE for migrate())"
        ),
        "3D000" => "create the database or fix its name in the URL".to_owned(),
        "28000" | "28P01" => "fix the user or password in the URL".to_owned(),
        c if c.starts_with("22") => {
            "a value does not fit its column: check the column's type against what migrate() creates".to_owned()
        }
        c if postgres_code_is_retryable(c) => "will retry".to_owned(),
        _ => return String::new(),
    };
    format!(": {hint}")
}

/// `CREATE TABLE IF NOT EXISTS` with `columns` and the primary key.
fn pg_create_table_sql(table: &TableName, columns: &[Column], key: &[&str]) -> String {
    let mut lines: Vec<String> = columns.iter().map(|c| format!("\"{}\" {}", c.name, c.postgres)).collect();
    lines.push(format!("PRIMARY KEY ({})", key.iter().map(|k| format!("\"{k}\"")).collect::<Vec<_>>().join(", ")));
    format!("CREATE TABLE IF NOT EXISTS {} ({})", table.quoted('"'), lines.join(", "))
}

/// The batch INSERT: one array parameter per column, unnested into rows, conflicts on `key`
/// ignored.
fn pg_insert_sql(table: &TableName, columns: &[Column], key: &[&str]) -> String {
    let names: Vec<String> = columns.iter().map(|c| format!("\"{}\"", c.name)).collect();
    let selected: Vec<String> = columns
        .iter()
        .map(|c| match c.kind {
            // Exact integer arithmetic: no float rounding of the milliseconds.
            ColumnKind::Time => format!("timestamptz 'epoch' + r.\"{}\" * interval '1 millisecond'", c.name),
            ColumnKind::Json => format!("r.\"{}\"::jsonb", c.name),
            _ => format!("r.\"{}\"", c.name),
        })
        .collect();
    let arrays: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let element = match c.kind {
                ColumnKind::Text | ColumnKind::Json => "text",
                ColumnKind::BigInt | ColumnKind::UnsignedBigInt | ColumnKind::Time => "int8",
                ColumnKind::Double => "float8",
                ColumnKind::Bytes => "bytea",
            };
            format!("${}::{element}[]", i + 1)
        })
        .collect();
    let names = names.join(", ");
    format!(
        "INSERT INTO {} ({names}) SELECT {} FROM unnest({}) AS r({names}) ON CONFLICT ({}) DO NOTHING",
        table.quoted('"'),
        selected.join(", "),
        arrays.join(", "),
        key.iter().map(|k| format!("\"{k}\"")).collect::<Vec<_>>().join(", ")
    )
}

/// Whether an existing column of PostgreSQL type `type_name` (`pg_type.typname`) takes what the
/// sink writes as `kind`.
fn pg_type_fits(kind: ColumnKind, type_name: &str) -> bool {
    match kind {
        ColumnKind::Text => matches!(type_name, "text" | "varchar"),
        ColumnKind::BigInt | ColumnKind::UnsignedBigInt => type_name == "int8",
        ColumnKind::Double => type_name == "float8",
        ColumnKind::Time => type_name == "timestamptz",
        ColumnKind::Json => matches!(type_name, "jsonb" | "json"),
        ColumnKind::Bytes => type_name == "bytea",
    }
}

// ---------------------------------------------------------------------------------------------
// Shared with the MySQL sink: the columns, an event's values, table names, chunking, transport
// errors.
// ---------------------------------------------------------------------------------------------

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
    pub(crate) postgres: &'static str,
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

/// The events table's columns, in the order of [`event_values`]. [`STORED_AT`] (and MySQL's
/// `duplicate_count`) come on top, filled by the store.
pub(crate) const EVENT_COLUMNS: [Column; 32] = [
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

    /// The number of a `BigInt` or `Time` value.
    pub(crate) fn as_i64(&self) -> Option<i64> {
        match self {
            Value::BigInt(n) | Value::Time(n) => *n,
            _ => None,
        }
    }

    pub(crate) fn as_u64(&self) -> u64 {
        match self {
            Value::UnsignedBigInt(n) => *n,
            _ => 0,
        }
    }

    pub(crate) fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Double(n) => *n,
            _ => None,
        }
    }

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
pub(crate) fn event_values<'a>(stream: &'a str, record: &'a EventRecord) -> Result<[Value<'a>; 32], String> {
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
        text_value(stream),
        text_value(&record.shard_id),
        text_value(&record.sequence_number),
        Value::UnsignedBigInt(record.sub_sequence_number),
        arrival_value(record.arrival),
    ])
}

/// Every event's values, or the first event that cannot be stored.
pub(crate) fn event_rows<'a>(stream: &'a str, events: &'a [EventRecord]) -> Result<Vec<[Value<'a>; 32]>, String> {
    events.iter().map(|record| event_values(stream, record)).collect()
}

/// The values of one dead letter's row, in the order of [`DEAD_LETTER_COLUMNS`].
pub(crate) fn dead_letter_values<'a>(stream: &'a str, dead: &'a super::DeadLetter) -> [Value<'a>; 8] {
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

    pub(crate) fn schema(&self) -> Option<&str> {
        self.schema.as_deref()
    }

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

    use ktk_proto::events::v1::Geo;

    use std::time::UNIX_EPOCH;

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
        }
    }

    fn value<'r>(row: &'r [Value<'_>; 32], name: &str) -> &'r Value<'r> {
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
        let dead = super::super::DeadLetter {
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
    fn the_insert_has_one_array_per_column_and_ignores_conflicts() {
        let sql = pg_insert_sql(&TableName::parse("events").expect("valid"), &EVENT_COLUMNS, &["event_id"]);
        assert!(sql.starts_with("INSERT INTO \"events\" (\"event_id\", \"event_type\""), "{sql}");
        assert!(sql.contains("$32::int8[]") && !sql.contains("$33"), "{sql}");
        assert!(sql.contains("timestamptz 'epoch' + r.\"occurred_at\" * interval '1 millisecond'"), "{sql}");
        assert!(sql.contains("r.\"attributes\"::jsonb"), "{sql}");
        assert!(sql.ends_with("ON CONFLICT (\"event_id\") DO NOTHING"), "{sql}");
        let columns: Vec<Column> = DEAD_LETTER_COLUMNS.iter().copied().chain([STORED_AT]).collect();
        let create = pg_create_table_sql(&TableName::parse("dl").expect("valid"), &columns, &DEAD_LETTER_KEY);
        assert!(
            create.contains("PRIMARY KEY (\"shard_id\", \"sequence_number\", \"sub_sequence_number\")"),
            "{create}"
        );
        assert!(create.contains("\"stored_at\" TIMESTAMPTZ NOT NULL DEFAULT now()"), "{create}");
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
        assert!(chunk_ranges::<32>(&[], 1, 1).is_empty());
    }

    #[test]
    fn postgres_errors_are_retryable_when_they_can_mend() {
        for code in ["08006", "08001", "57P01", "57P03", "53300", "40001", "40P01", "55P03", "25006", "57014"] {
            assert!(postgres_code_is_retryable(code), "{code}");
        }
        for code in ["42P01", "42703", "42804", "28P01", "3D000", "22001", "23505", "42501", "XX000", ""] {
            assert!(!postgres_code_is_retryable(code), "{code}");
        }
        let table = TableName::parse("events").expect("valid");
        let dead = table.with_suffix(DEAD_LETTER_SUFFIX);
        assert!(postgres_hint("42P01", &table, &dead).contains("run migrate()"));
        assert!(postgres_hint("42703", &table, &dead).contains("add the missing columns"));
        assert_eq!(postgres_hint("XX000", &table, &dead), "");
    }

    #[tokio::test]
    async fn debug_and_errors_never_show_the_password() {
        let sink = PostgresSink::connect_lazy(
            "postgres://ktk:s3cret@db.example:6543/analytics",
            "events",
            StoreConfig::default(),
        )
        .expect("valid URL");
        let debug = format!("{sink:?}");
        assert!(debug.contains("postgres://ktk@db.example:6543/analytics") && !debug.contains("s3cret"), "{debug}");
        let error = sink.error("write", &sqlx::Error::PoolTimedOut);
        assert!(error.is_retryable() && !error.message().contains("s3cret"), "{error}");
        let error = PostgresSink::connect_lazy("mysql://ktk:s3cret@db/x", "events", StoreConfig::default())
            .expect_err("not a PostgreSQL URL");
        assert!(!error.is_retryable() && !error.to_string().contains("s3cret"), "{error}");
        let error = PostgresSink::connect_lazy("postgres://ktk:s3cret@db:port/x", "events", StoreConfig::default())
            .expect_err("not a port");
        assert!(!error.is_retryable() && !error.to_string().contains("s3cret"), "{error}");
        let error =
            PostgresSink::connect_lazy("postgres://db/x", "Events", StoreConfig::default()).expect_err("bad table");
        assert!(error.message().contains("lower-case"), "{error}");
    }
}
