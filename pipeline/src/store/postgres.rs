//! The PostgreSQL dialect of the real-time store: [`PostgresSink`], its SQL, its type checks and
//! its error codes. The table and what each column holds are the [store module](super)'s.
//!
//! # How a batch flows
//! [`PostgresSink::write`] maps each [`EventRecord`](crate::EventRecord) of the [`Batch`] to one
//! value per column, turns the rows into one array per column and inserts them all with one
//! statement:
//!
//! ```sql
//! INSERT INTO "events" ("event_id", ...) SELECT ... FROM unnest($1::text[], ...) AS r(...)
//! ON CONFLICT ("event_id") DO NOTHING
//! ```
//!
//! The statement's text depends only on the table, so each connection parses it once and every
//! later batch is one round trip, whatever its size; it has one parameter per column (33), never
//! one per value, so the protocol's limit of 65,535 parameters never applies. The only split is
//! by size: a batch over [`POSTGRES_MAX_STATEMENT_BYTES`] of event data becomes several
//! statements. The rows PostgreSQL reports as inserted are [`SinkReport::written`]; the rest of
//! the batch were stored already, by an earlier attempt or by another consumer
//! ([`SinkReport::duplicates`]), including an event id seen twice in the same batch.
//!
//! Dead letters go to `<table>_dead_letters` the same way (`ON CONFLICT (shard_id,
//! sequence_number, sub_sequence_number) DO NOTHING`), so writing them again is a no-op.
//!
//! # Tables
//! [`PostgresSink::migrate`] does all its work in one transaction under an advisory lock, so
//! consumers starting together do not race, and a migration that finds a problem leaves nothing
//! half-done.

use std::fmt;
use std::str::FromStr;
use std::time::Instant;

use futures::future::BoxFuture;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use super::schema::{
    Column, ColumnKind, DEAD_LETTER_COLUMNS, DEAD_LETTER_INDEXES, DEAD_LETTER_KEY, EVENT_COLUMNS, EVENT_INDEXES,
    POSITION_COLUMNS, STORED_AT, StoredPosition, TableName, Value, check_scheme, chunk_ranges, dead_letter_values,
    event_rows, index_name, same_position, sink_report, transport_error,
};
pub use super::schema::{
    DEAD_LETTER_SUFFIX, MAX_STORED_TIME_MS, MAX_TABLE_NAME_LEN, MIN_STORED_TIME_MS, MigrationReport, StoreConfig,
};
use crate::{Batch, Sink, SinkError, SinkReport, SinkTiming};

/// The PostgreSQL sink's name in logs, metrics and errors.
pub const POSTGRES_SINK_NAME: &str = "postgres";

/// The most event data (roughly, in bytes) one INSERT statement carries; a larger batch is split.
/// PostgreSQL refuses a message or a field over 1 GiB (`MaxAllocSize`); far below that, this
/// bounds the memory one statement takes on both sides.
pub const POSTGRES_MAX_STATEMENT_BYTES: usize = 64 * 1024 * 1024;

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
            .max_connections(config.max_connections())
            .acquire_timeout(config.acquire_timeout())
            .idle_timeout(config.idle_timeout())
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
        // The readers' indexes, found by name: one made beforehand with CREATE INDEX CONCURRENTLY
        // under the same name (what a large live table needs) is left as it is.
        for (table, indexes) in [(&self.table, &EVENT_INDEXES[..]), (&self.dead_letter_table, &DEAD_LETTER_INDEXES[..])]
        {
            for index in indexes {
                let name = index_name(table, index);
                let qualified = match table.schema() {
                    Some(schema) => format!("\"{schema}\".\"{name}\""),
                    None => format!("\"{name}\""),
                };
                let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
                    .bind(&qualified)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(|e| self.error("migrate", &e))?;
                if exists.is_some() {
                    continue;
                }
                let columns: Vec<String> = index.columns.iter().map(|(c, _)| format!("\"{c}\"")).collect();
                let sql =
                    format!("CREATE INDEX IF NOT EXISTS \"{name}\" ON {} ({})", table.quoted('"'), columns.join(", "));
                sqlx::query(&sql).execute(&mut *tx).await.map_err(|e| self.error("migrate", &e))?;
                report.created_indexes.push(format!("{table}.{name}"));
            }
        }
        tx.commit().await.map_err(|e| self.error("migrate", &e))?;
        if !report.created_tables.is_empty() || !report.added_columns.is_empty() || !report.created_indexes.is_empty() {
            tracing::info!(
                sink = POSTGRES_SINK_NAME,
                created = ?report.created_tables,
                added = ?report.added_columns,
                indexes = ?report.created_indexes,
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
        let events = batch.events.len() as u64;
        let matching = if written < events { self.same_position(batch).await? } else { written };
        let report = sink_report(events, written, matching);
        tracing::debug!(
            sink = POSTGRES_SINK_NAME,
            shard = %batch.shard_id,
            written = report.written,
            duplicates = report.duplicates,
            reread = report.reread,
            dead_letters = batch.dead_letters.len(),
            elapsed = ?started.elapsed(),
            "batch stored"
        );
        Ok(report)
    }

    /// How many of the batch's events are stored at the position they were read from (one
    /// primary-key lookup per event, run only when the batch had duplicates).
    async fn same_position(&self, batch: &Batch) -> Result<u64, SinkError> {
        let sql = format!("SELECT {POSITION_COLUMNS} FROM {} WHERE event_id = ANY($1)", self.table.quoted('"'));
        let ids: Vec<&str> = batch.events.iter().map(|e| e.event.event_id.as_str()).collect();
        type Row = (String, Option<String>, Option<String>, Option<String>, Option<i64>);
        let rows: Vec<Row> =
            sqlx::query_as(&sql).bind(ids).fetch_all(&self.pool).await.map_err(|e| self.error("read back", &e))?;
        let stored: Vec<StoredPosition> = rows
            .into_iter()
            .map(|(id, stream, shard, sequence, sub)| {
                (id, stream, shard, sequence, sub.and_then(|n| u64::try_from(n).ok()))
            })
            .collect();
        Ok(same_position(&batch.stream, &batch.events, &stored))
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
            match tokio::time::timeout(self.config.write_timeout(), self.write_batch(batch)).await {
                Ok(result) => result,
                Err(_) => Err(SinkError::timed_out(
                    POSTGRES_SINK_NAME,
                    self.config.write_timeout(),
                    format!(
                        "writing {} events of shard {} to {} at {} took longer than {:?}; will retry \
                         (raise the write timeout if batches are this slow on a healthy database)",
                        batch.events.len(),
                        batch.shard_id,
                        self.table,
                        self.target,
                        self.config.write_timeout()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_insert_has_one_array_per_column_and_ignores_conflicts() {
        let sql = pg_insert_sql(&TableName::parse("events").expect("valid"), &EVENT_COLUMNS, &["event_id"]);
        assert!(sql.starts_with("INSERT INTO \"events\" (\"event_id\", \"event_type\""), "{sql}");
        assert!(sql.contains("$33::int8[]") && !sql.contains("$34"), "{sql}");
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
