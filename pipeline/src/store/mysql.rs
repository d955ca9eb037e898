//! The MySQL dialect of the real-time store, for MySQL-protocol stores (MySQL, MariaDB,
//! SingleStore): [`MySqlSink`], its SQL, its type checks and its error numbers. The table and what
//! each column holds are the [store module](super)'s; this dialect adds one column,
//! `duplicate_count`.
//!
//! # How a batch flows
//! [`MySqlSink::write`] maps each event to its column values and inserts the batch as multi-row
//! INSERTs of at most [`MYSQL_MAX_PLACEHOLDERS`] parameters (1,985 events) and about
//! [`MYSQL_MAX_STATEMENT_BYTES`] each; a batch of ordinary events under 1,985 is one statement.
//! The statement is prepared once per connection and batch size and then cached, so a repeated
//! batch size is one round trip.
//!
//! # Counting what was inserted: `ON DUPLICATE KEY UPDATE duplicate_count = duplicate_count + 1`
//! - `INSERT IGNORE` would count right (rows affected = rows inserted), but IGNORE also turns
//!   every other error of the statement into a warning: a value too long for its column is
//!   silently truncated, a bad date becomes a zero date. An event would be stored wrong and
//!   nobody would know.
//! - `ON DUPLICATE KEY UPDATE event_id = event_id` keeps the errors, and MySQL counts 1 per
//!   inserted row and 0 per duplicate, but only when the client does not set `CLIENT_FOUND_ROWS`;
//!   sqlx always sets it, and then a duplicate counts 1 too: inserts and duplicates cannot be
//!   told apart.
//! - So a duplicate bumps a counter: MySQL counts 1 per inserted row and 2 per row that an
//!   update changed, with or without `CLIENT_FOUND_ROWS`, so for `n` rows `written = 2n -
//!   affected`. The counter is worth having in itself: `duplicate_count` says how many times an
//!   event arrived again after it was stored (producer retries, reprocessing after a takeover).
//!   The price is an update of the stored row per duplicate (rare outside replays), and a column
//!   the PostgreSQL table does not have.
//!
//! Every connection runs in strict mode (`STRICT_ALL_TABLES` added to the server's `sql_mode`),
//! so a value that does not fit fails the batch instead of being truncated with a warning. Values
//! are made to fit before they are sent: free text is LONGTEXT (no Kinesis record can overflow
//! it), times outside 1000-9999 are NULL, an event id longer than [`MAX_EVENT_ID_CHARS`] fails
//! the batch with a message saying so (the decoder should send such events to the dead letters).
//! Event ids are compared byte for byte (`utf8mb4_bin`): `abc` and `ABC` are two events. One
//! difference from PostgreSQL remains: `utf8mb4_bin` ignores trailing spaces, so `abc` and
//! `abc ` are one.
//!
//! Dead letters go to `<table>_dead_letters` with `ON DUPLICATE KEY UPDATE shard_id = shard_id`
//! (a no-op for a record already there; errors still surface).
//!
//! [`MySqlSink::migrate`] creates both tables, adds missing columns (`ALTER TABLE ... ADD COLUMN`,
//! as MySQL has no `ADD COLUMN IF NOT EXISTS`; a concurrent migration adding the same column is
//! tolerated) and checks column types and unique keys. MySQL's DDL is not transactional, so a
//! failed migration can leave a table half-migrated; running it again completes it.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Instant;

use futures::future::BoxFuture;
use sqlx::Executor;
use sqlx::mysql::{MySql, MySqlConnectOptions, MySqlDatabaseError, MySqlPool, MySqlPoolOptions};

use super::schema::{
    Column, ColumnKind, DEAD_LETTER_COLUMNS, DEAD_LETTER_INDEXES, DEAD_LETTER_KEY, EVENT_COLUMNS, EVENT_INDEXES,
    POSITION_COLUMNS, STORED_AT, StoredPosition, TableName, Value, check_scheme, chunk_ranges, dead_letter_values,
    event_rows, index_name, same_position, sink_report, transport_error,
};
pub use super::schema::{
    DEAD_LETTER_SUFFIX, MAX_STORED_TIME_MS, MAX_TABLE_NAME_LEN, MIN_STORED_TIME_MS, MigrationReport, StoreConfig,
};
use crate::{Batch, Sink, SinkError, SinkReport, SinkTiming};

/// The MySQL sink's name in logs, metrics and errors.
pub const MYSQL_SINK_NAME: &str = "mysql";

/// The longest `event_id` the MySQL table holds (its key is `VARCHAR(128)`), in characters.
pub const MAX_EVENT_ID_CHARS: usize = 128;

/// The most parameters one prepared statement may have (the protocol counts them in 16 bits).
/// See <https://dev.mysql.com/doc/dev/mysql-server/latest/page_protocol_com_stmt_prepare.html>.
pub const MYSQL_MAX_PLACEHOLDERS: usize = 65_535;

/// The most data (roughly, in bytes) one INSERT statement carries; a larger batch is split. Half
/// of MariaDB's default `max_allowed_packet` (16 MiB; MySQL 8's is 64 MiB), as the server refuses
/// a larger statement outright.
pub const MYSQL_MAX_STATEMENT_BYTES: usize = 8 * 1024 * 1024;

/// Times a duplicate of the event arrived after it was stored; what the sink's
/// `ON DUPLICATE KEY UPDATE` bumps, and how it counts inserts (see the [module](self) docs).
const DUPLICATE_COUNT: Column = Column {
    name: "duplicate_count",
    kind: ColumnKind::UnsignedBigInt,
    postgres: "",
    mysql: "BIGINT UNSIGNED NOT NULL DEFAULT 0",
};

/// Writes batches to a MySQL, MariaDB or SingleStore table, idempotently on `event_id`. See
/// the [module](self) docs.
pub struct MySqlSink {
    pool: MySqlPool,
    /// `mysql://user@host:port/database`: where, without the password.
    target: String,
    table: TableName,
    dead_letter_table: TableName,
    config: StoreConfig,
}

impl fmt::Debug for MySqlSink {
    // By hand: the connect options hold the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MySqlSink")
            .field("target", &self.target)
            .field("table", &self.table.to_string())
            .field("config", &self.config)
            .field("connections", &self.pool.size())
            .finish()
    }
}

impl MySqlSink {
    /// Connects to `url` (`mysql://user:password@host:port/database?ssl-mode=...`) with the
    /// default [`StoreConfig`], and opens one connection, so a wrong URL, password or database
    /// fails here. Does not create the table: call [`migrate`](Self::migrate).
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
        check_scheme(url, &["mysql", "mariadb"], MYSQL_SINK_NAME)?;
        let options = MySqlConnectOptions::from_str(url).map_err(|e| {
            SinkError::misconfigured(
                MYSQL_SINK_NAME,
                format!("the MySQL URL is not valid: {e}; expected mysql://user:password@host:port/database"),
            )
        })?;
        let target = format!(
            "mysql://{}@{}:{}/{}",
            options.get_username(),
            options.get_host(),
            options.get_port(),
            options.get_database().unwrap_or_default(),
        );
        let table = TableName::parse(table).map_err(|e| SinkError::misconfigured(MYSQL_SINK_NAME, e))?;
        let dead_letter_table = table.with_suffix(DEAD_LETTER_SUFFIX);
        let pool = MySqlPoolOptions::new()
            .max_connections(config.max_connections())
            .acquire_timeout(config.acquire_timeout())
            .idle_timeout(config.idle_timeout())
            .after_connect(|connection, _| {
                Box::pin(async move {
                    // Strict mode: a value that does not fit is an error, never a silent
                    // truncation (sqlx has already set the time zone to UTC).
                    connection
                        .execute("SET SESSION sql_mode = CONCAT(@@SESSION.sql_mode, ',STRICT_ALL_TABLES')")
                        .await?;
                    Ok(())
                })
            })
            .connect_lazy_with(options);
        Ok(MySqlSink { pool, target, table, dead_letter_table, config })
    }

    /// The events table, as given (`events` or `database.events`).
    pub fn table(&self) -> String {
        self.table.to_string()
    }

    /// The dead-letter table: the events table's name with [`DEAD_LETTER_SUFFIX`].
    pub fn dead_letter_table(&self) -> String {
        self.dead_letter_table.to_string()
    }

    /// The connection pool (for queries of the caller's own, such as the tests' read-backs).
    pub fn pool(&self) -> &MySqlPool {
        &self.pool
    }

    /// Closes the pool: waits for connections in use to come back, then closes them all. Call
    /// it at shutdown, after the last write.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Creates the events and dead-letter tables if they do not exist, adds the columns an
    /// older table lacks, and checks the columns' types and the unique keys the writes rely on.
    /// Safe to run again and from several consumers at once. A table that cannot work is a
    /// non-retryable error naming each problem and what to do about it.
    pub async fn migrate(&self) -> Result<MigrationReport, SinkError> {
        let mut report = MigrationReport::default();
        let mut problems = Vec::new();
        let mut connection = self.pool.acquire().await.map_err(|e| self.error("migrate", &e))?;
        for (table, columns, key, extras) in [
            (&self.table, &EVENT_COLUMNS[..], &["event_id"][..], &[DUPLICATE_COUNT, STORED_AT][..]),
            (&self.dead_letter_table, &DEAD_LETTER_COLUMNS[..], &DEAD_LETTER_KEY[..], &[STORED_AT][..]),
        ] {
            let quoted = table.quoted('`');
            let columns: Vec<Column> = columns.iter().chain(extras).copied().collect();
            let mut existing = self.existing_columns(&mut connection, table).await?;
            if existing.is_empty() {
                let sql = mysql_create_table_sql(table, &columns, key);
                connection.execute(sql.as_str()).await.map_err(|e| self.error("migrate", &e))?;
                report.created_tables.push(table.to_string());
                continue;
            }
            // Twice at most: a concurrent migration may add a column between reading and altering.
            for attempt in 0..2 {
                let missing: Vec<&Column> =
                    columns.iter().filter(|c| !existing.iter().any(|(name, ..)| name == c.name)).collect();
                if missing.is_empty() {
                    break;
                }
                let adds: Vec<String> =
                    missing.iter().map(|c| format!("ADD COLUMN `{}` {}", c.name, c.mysql)).collect();
                let sql = format!("ALTER TABLE {quoted} {}", adds.join(", "));
                match connection.execute(sql.as_str()).await {
                    Ok(_) => {
                        report.added_columns.extend(missing.iter().map(|c| format!("{table}.{}", c.name)));
                        existing = self.existing_columns(&mut connection, table).await?;
                        break;
                    }
                    Err(e) if attempt == 0 && mysql_error_number(&e) == Some(1060) => {
                        existing = self.existing_columns(&mut connection, table).await?;
                    }
                    Err(e) => return Err(self.error("migrate", &e)),
                }
            }
            for (name, data_type, column_type) in &existing {
                let Some(column) = columns.iter().find(|c| c.name == name) else { continue };
                if !mysql_type_fits(column.kind, data_type, column_type) {
                    problems.push(format!(
                        "column {name} of table {table} is {column_type}, but the sink writes {}: alter it \
                         (ALTER TABLE {quoted} MODIFY `{name}` {}) or use a new table",
                        column.mysql, column.mysql
                    ));
                }
            }
            let unique: Vec<(String, String)> = sqlx::query_as(
                "SELECT CAST(INDEX_NAME AS CHAR), CAST(COLUMN_NAME AS CHAR) FROM information_schema.STATISTICS \
                 WHERE TABLE_SCHEMA = COALESCE(?, DATABASE()) AND TABLE_NAME = ? AND NON_UNIQUE = 0",
            )
            .bind(table.schema())
            .bind(table.name())
            .fetch_all(&mut *connection)
            .await
            .map_err(|e| self.error("migrate", &e))?;
            let mut keys: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
            for (index, column) in &unique {
                keys.entry(index).or_default().push(column);
            }
            let mut wanted = key.to_vec();
            wanted.sort_unstable();
            if !keys.values_mut().any(|columns| {
                columns.sort_unstable();
                *columns == wanted
            }) {
                problems.push(format!(
                    "table {table} has no primary key or unique index on ({}), which the sink's \
                     ON DUPLICATE KEY UPDATE relies on: add one (ALTER TABLE {quoted} ADD PRIMARY KEY ({}))",
                    key.join(", "),
                    key.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")
                ));
            }
        }
        if !problems.is_empty() {
            return Err(SinkError::misconfigured(MYSQL_SINK_NAME, problems.join("; ")));
        }
        // The readers' indexes, found by name (InnoDB builds a secondary index without blocking
        // writes). A concurrent migration that adds one first makes ours fail with 1061, which is
        // as good as done.
        for (table, indexes) in [(&self.table, &EVENT_INDEXES[..]), (&self.dead_letter_table, &DEAD_LETTER_INDEXES[..])]
        {
            let existing: Vec<(String,)> = sqlx::query_as(
                "SELECT DISTINCT CAST(INDEX_NAME AS CHAR) FROM information_schema.STATISTICS \
                 WHERE TABLE_SCHEMA = COALESCE(?, DATABASE()) AND TABLE_NAME = ?",
            )
            .bind(table.schema())
            .bind(table.name())
            .fetch_all(&mut *connection)
            .await
            .map_err(|e| self.error("migrate", &e))?;
            for index in indexes {
                let name = index_name(table, index);
                if existing.iter().any(|(n,)| *n == name) {
                    continue;
                }
                let columns: Vec<String> = index
                    .columns
                    .iter()
                    .map(|(c, prefix)| match prefix {
                        Some(len) => format!("`{c}`({len})"),
                        None => format!("`{c}`"),
                    })
                    .collect();
                let sql = format!("ALTER TABLE {} ADD INDEX `{name}` ({})", table.quoted('`'), columns.join(", "));
                match connection.execute(sql.as_str()).await {
                    Ok(_) => report.created_indexes.push(format!("{table}.{name}")),
                    Err(e) if mysql_error_number(&e) == Some(1061) => {}
                    Err(e) => return Err(self.error("migrate", &e)),
                }
            }
        }
        if !report.created_tables.is_empty() || !report.added_columns.is_empty() || !report.created_indexes.is_empty() {
            tracing::info!(
                sink = MYSQL_SINK_NAME,
                created = ?report.created_tables,
                added = ?report.added_columns,
                indexes = ?report.created_indexes,
                "store tables migrated"
            );
        }
        Ok(report)
    }

    /// The table's columns as (name, DATA_TYPE, COLUMN_TYPE); none if it does not exist.
    async fn existing_columns(
        &self,
        connection: &mut sqlx::MySqlConnection,
        table: &TableName,
    ) -> Result<Vec<(String, String, String)>, SinkError> {
        // CAST: MySQL 8 reports some information_schema columns as binary strings.
        sqlx::query_as(
            "SELECT CAST(COLUMN_NAME AS CHAR), CAST(DATA_TYPE AS CHAR), CAST(COLUMN_TYPE AS CHAR) \
             FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = COALESCE(?, DATABASE()) AND TABLE_NAME = ?",
        )
        .bind(table.schema())
        .bind(table.name())
        .fetch_all(connection)
        .await
        .map_err(|e| self.error("migrate", &e))
    }

    async fn write_batch(&self, batch: &Batch) -> Result<SinkReport, SinkError> {
        let started = Instant::now();
        if let Some(record) = batch.events.iter().find(|r| r.event.event_id.chars().count() > MAX_EVENT_ID_CHARS) {
            return Err(SinkError::misconfigured(
                MYSQL_SINK_NAME,
                format!(
                    "the event at shard {} sequence {}/{} has an event_id of {} characters, longer than the \
                     {MAX_EVENT_ID_CHARS} the table's key holds ({:?}...): it cannot be stored without changing its \
                     id; the decoder should send such events to the dead letters",
                    record.shard_id,
                    record.sequence_number,
                    record.sub_sequence_number,
                    record.event.event_id.chars().count(),
                    record.event.event_id.chars().take(40).collect::<String>()
                ),
            ));
        }
        if !batch.dead_letters.is_empty() {
            let rows: Vec<_> = batch.dead_letters.iter().map(|d| dead_letter_values(&batch.stream, d)).collect();
            let max_rows = MYSQL_MAX_PLACEHOLDERS / DEAD_LETTER_COLUMNS.len();
            for range in chunk_ranges(&rows, max_rows, MYSQL_MAX_STATEMENT_BYTES) {
                self.insert(&self.dead_letter_table, &DEAD_LETTER_COLUMNS, &rows[range], "`shard_id` = `shard_id`")
                    .await?;
            }
        }
        let rows =
            event_rows(&batch.stream, &batch.events).map_err(|e| SinkError::misconfigured(MYSQL_SINK_NAME, e))?;
        let max_rows = MYSQL_MAX_PLACEHOLDERS / EVENT_COLUMNS.len();
        let mut written = 0;
        for range in chunk_ranges(&rows, max_rows, MYSQL_MAX_STATEMENT_BYTES) {
            let count = range.len() as u64;
            let affected = self
                .insert(&self.table, &EVENT_COLUMNS, &rows[range], "`duplicate_count` = `duplicate_count` + 1")
                .await?;
            written += inserted_rows(count, affected);
        }
        let events = batch.events.len() as u64;
        let matching = if written < events { self.same_position(batch).await? } else { written };
        let report = sink_report(events, written, matching);
        tracing::debug!(
            sink = MYSQL_SINK_NAME,
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

    /// How many of the batch's events are stored at the position they were read from (primary-key
    /// lookups, 1,000 ids a statement, run only when the batch had duplicates).
    async fn same_position(&self, batch: &Batch) -> Result<u64, SinkError> {
        let mut stored: Vec<StoredPosition> = Vec::new();
        for chunk in batch.events.chunks(1_000) {
            let sql = format!(
                "SELECT {POSITION_COLUMNS} FROM {} WHERE event_id IN ({})",
                self.table.quoted('`'),
                vec!["?"; chunk.len()].join(", ")
            );
            // The text columns' binary collation makes MySQL describe them as VARBINARY: read
            // their bytes (the sink wrote them from UTF-8 strings).
            type Row = (Vec<u8>, Option<Vec<u8>>, Option<Vec<u8>>, Option<Vec<u8>>, Option<u64>);
            let text = |bytes: Option<Vec<u8>>| bytes.map(|b| String::from_utf8_lossy(&b).into_owned());
            let mut query = sqlx::query_as::<MySql, Row>(&sql);
            for record in chunk {
                query = query.bind(record.event.event_id.as_str());
            }
            let rows = query.fetch_all(&self.pool).await.map_err(|e| self.error("read back", &e))?;
            stored.extend(rows.into_iter().map(|(id, stream, shard, sequence, sub)| -> StoredPosition {
                (String::from_utf8_lossy(&id).into_owned(), text(stream), text(shard), text(sequence), sub)
            }));
        }
        Ok(same_position(&batch.stream, &batch.events, &stored))
    }

    /// One multi-row INSERT; returns the rows affected as MySQL counts them.
    async fn insert<const N: usize>(
        &self,
        table: &TableName,
        columns: &[Column; N],
        rows: &[[Value<'_>; N]],
        on_duplicate: &str,
    ) -> Result<u64, SinkError> {
        let sql = mysql_insert_sql(table, columns, rows.len(), on_duplicate);
        let mut query = sqlx::query::<MySql>(&sql);
        for row in rows {
            for value in row {
                query = match value {
                    Value::Text(_) | Value::Json(_) => query.bind(value.as_text()),
                    Value::BigInt(n) => query.bind(*n),
                    Value::UnsignedBigInt(n) => query.bind(*n),
                    Value::Double(n) => query.bind(*n),
                    Value::Time(ms) => query.bind(ms.map(crate::time::datetime_millis)),
                    Value::Bytes(bytes) => query.bind(*bytes),
                };
            }
        }
        let result = query.execute(&self.pool).await.map_err(|e| self.error("write", &e))?;
        Ok(result.rows_affected())
    }

    fn error(&self, operation: &str, error: &sqlx::Error) -> SinkError {
        let (retryable, message) = match error {
            sqlx::Error::Database(db) => {
                let number = db.try_downcast_ref::<MySqlDatabaseError>().map_or(0, MySqlDatabaseError::number);
                let retryable = mysql_number_is_retryable(number);
                let hint = mysql_hint(number, &self.table, &self.dead_letter_table);
                (retryable, format!("{operation} on {}: {} (error {number}){hint}", self.table, db.message()))
            }
            other => transport_error(other, "MySQL", &self.target, &self.config),
        };
        SinkError::classified(MYSQL_SINK_NAME, message, retryable)
    }
}

impl Sink for MySqlSink {
    fn name(&self) -> &str {
        MYSQL_SINK_NAME
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
                    MYSQL_SINK_NAME,
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

/// Rows inserted by an `INSERT ... ON DUPLICATE KEY UPDATE` of `rows` rows whose every update
/// changes the row: MySQL counts 1 per insert and 2 per update, so `affected = inserted +
/// 2 * (rows - inserted)`.
fn inserted_rows(rows: u64, affected: u64) -> u64 {
    (2 * rows).saturating_sub(affected).min(rows)
}

/// The error number of a MySQL server error.
fn mysql_error_number(error: &sqlx::Error) -> Option<u16> {
    match error {
        sqlx::Error::Database(db) => db.try_downcast_ref::<MySqlDatabaseError>().map(MySqlDatabaseError::number),
        _ => None,
    }
}

/// Whether a MySQL or MariaDB server error may go away by itself: out of resources or
/// connections (1021, 1037, 1038, 1040, 1041, 1203, 1226), a server shutting down (1053),
/// network trouble and killed or aborted connections (1152, 1158-1161, 1184, 1927, 4031), lock
/// waits and deadlocks (1205, 1213), interrupted or timed-out statements (1317, 1969, 3024), a
/// read-only server after a failover (1290, 1836), a statement to prepare again after the table
/// changed (1615).
fn mysql_number_is_retryable(number: u16) -> bool {
    matches!(
        number,
        1021 | 1037 | 1038 | 1040 | 1041 | 1053 | 1152 | 1158
            ..=1161 | 1184 | 1203 | 1205 | 1213 | 1226 | 1290 | 1317 | 1615 | 1836 | 1927 | 1969 | 3024 | 4031
    )
}

/// What to do about a non-retryable MySQL error, by number (empty if nothing to add).
fn mysql_hint(number: u16, table: &TableName, dead_letters: &TableName) -> String {
    let hint = match number {
        1146 => format!(
            "table {table} or {dead_letters} does not exist: run migrate() at start-up (the consumer does), or fix \
             the table name"
        ),
        1054 => "the table is older than this sink: run migrate() to add the missing columns".to_owned(),
        1406 | 1264 | 1292 | 1366 | 3140 | 4025 => {
            "a value does not fit its column (strict mode refuses to truncate it): give the column the type \
             migrate() creates"
                .to_owned()
        }
        1062 => "the table has a unique key besides the sink's own: drop it".to_owned(),
        1153 => format!(
            "raise the server's max_allowed_packet (the sink sends statements of up to {} MiB; a larger single \
             event needs more)",
            MYSQL_MAX_STATEMENT_BYTES >> 20
        ),
        1044 | 1142 | 1143 => format!(
            "grant the database user INSERT, UPDATE and SELECT on {table} and {dead_letters} (and CREATE and ALTER \
             for migrate())"
        ),
        1045 => "fix the user or password in the URL".to_owned(),
        1049 => "create the database or fix its name in the URL".to_owned(),
        1046 => "name a database in the URL (mysql://host/database) or in the table name (database.table)".to_owned(),
        n if mysql_number_is_retryable(n) => "will retry".to_owned(),
        _ => return String::new(),
    };
    format!(": {hint}")
}

/// `CREATE TABLE IF NOT EXISTS` with `columns` and the primary key, in utf8mb4.
fn mysql_create_table_sql(table: &TableName, columns: &[Column], key: &[&str]) -> String {
    let mut lines: Vec<String> = columns.iter().map(|c| format!("`{}` {}", c.name, c.mysql)).collect();
    lines.push(format!("PRIMARY KEY ({})", key.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")));
    format!("CREATE TABLE IF NOT EXISTS {} ({}) DEFAULT CHARSET = utf8mb4", table.quoted('`'), lines.join(", "))
}

/// A multi-row INSERT of `rows` rows of `columns`, with `on_duplicate` as the
/// `ON DUPLICATE KEY UPDATE` assignment.
fn mysql_insert_sql(table: &TableName, columns: &[Column], rows: usize, on_duplicate: &str) -> String {
    let names: Vec<String> = columns.iter().map(|c| format!("`{}`", c.name)).collect();
    let row = format!("({})", vec!["?"; columns.len()].join(", "));
    let mut sql = format!("INSERT INTO {} ({}) VALUES ", table.quoted('`'), names.join(", "));
    sql.reserve((row.len() + 2) * rows + on_duplicate.len() + 32);
    for index in 0..rows {
        if index > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&row);
    }
    sql.push_str(" ON DUPLICATE KEY UPDATE ");
    sql.push_str(on_duplicate);
    sql
}

/// Whether an existing column (`DATA_TYPE`, `COLUMN_TYPE` from information_schema) takes what the
/// sink writes as `kind`.
fn mysql_type_fits(kind: ColumnKind, data_type: &str, column_type: &str) -> bool {
    let data_type = data_type.to_ascii_lowercase();
    let unsigned = column_type.to_ascii_lowercase().contains("unsigned");
    match kind {
        ColumnKind::Text => matches!(data_type.as_str(), "varchar" | "char" | "text" | "mediumtext" | "longtext"),
        ColumnKind::BigInt => data_type == "bigint" && !unsigned,
        ColumnKind::UnsignedBigInt => data_type == "bigint",
        ColumnKind::Double => data_type == "double",
        ColumnKind::Time => data_type == "datetime",
        // MariaDB's JSON is LONGTEXT (with a JSON_VALID check).
        ColumnKind::Json => matches!(data_type.as_str(), "json" | "longtext"),
        ColumnKind::Bytes => matches!(data_type.as_str(), "mediumblob" | "longblob"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datetimes_are_utc_with_milliseconds() {
        assert_eq!(crate::time::datetime_millis(0), "1970-01-01 00:00:00.000");
        assert_eq!(crate::time::datetime_millis(1_700_000_000_123), "2023-11-14 22:13:20.123");
        assert_eq!(crate::time::datetime_millis(-1), "1969-12-31 23:59:59.999");
        assert_eq!(crate::time::datetime_millis(951_782_400_000), "2000-02-29 00:00:00.000");
        assert_eq!(crate::time::datetime_millis(MIN_STORED_TIME_MS), "1000-01-01 00:00:00.000");
        assert_eq!(crate::time::datetime_millis(MAX_STORED_TIME_MS), "9999-12-31 23:59:59.999");
    }

    #[test]
    fn inserts_are_counted_from_rows_affected() {
        assert_eq!(inserted_rows(10, 10), 10);
        assert_eq!(inserted_rows(10, 20), 0);
        assert_eq!(inserted_rows(10, 13), 7);
        // Never more than the rows, never below zero, whatever the server says.
        assert_eq!(inserted_rows(10, 0), 10);
        assert_eq!(inserted_rows(10, 25), 0);
    }

    #[test]
    fn the_insert_has_a_placeholder_per_value_and_bumps_the_duplicate_count() {
        let table = TableName::parse("events").expect("valid");
        let sql = mysql_insert_sql(&table, &EVENT_COLUMNS, 3, "`duplicate_count` = `duplicate_count` + 1");
        assert_eq!(sql.matches('?').count(), 3 * EVENT_COLUMNS.len());
        assert!(sql.starts_with("INSERT INTO `events` (`event_id`, `event_type`,"), "{sql}");
        assert!(sql.ends_with("ON DUPLICATE KEY UPDATE `duplicate_count` = `duplicate_count` + 1"), "{sql}");
        assert!(!sql.contains("IGNORE"));
        assert_eq!(MYSQL_MAX_PLACEHOLDERS / EVENT_COLUMNS.len(), 1985);
        let columns: Vec<Column> = EVENT_COLUMNS.iter().chain(&[DUPLICATE_COUNT, STORED_AT]).copied().collect();
        let create = mysql_create_table_sql(&table, &columns, &["event_id"]);
        assert!(
            create.contains("`event_id` VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL"),
            "{create}"
        );
        assert!(create.contains("`duplicate_count` BIGINT UNSIGNED NOT NULL DEFAULT 0"), "{create}");
        assert!(create.contains("`attributes` JSON") && create.contains("`occurred_at` DATETIME(3)"), "{create}");
        assert!(create.ends_with("PRIMARY KEY (`event_id`)) DEFAULT CHARSET = utf8mb4"), "{create}");
    }

    #[test]
    fn column_types_are_checked_by_kind() {
        assert!(mysql_type_fits(ColumnKind::Json, "longtext", "longtext"));
        assert!(mysql_type_fits(ColumnKind::Json, "JSON", "json"));
        assert!(mysql_type_fits(ColumnKind::UnsignedBigInt, "bigint", "bigint(20) unsigned"));
        assert!(!mysql_type_fits(ColumnKind::BigInt, "bigint", "bigint(20) unsigned"));
        assert!(!mysql_type_fits(ColumnKind::Time, "timestamp", "timestamp(3)"));
        assert!(!mysql_type_fits(ColumnKind::Text, "int", "int(11)"));
        assert!(!mysql_type_fits(ColumnKind::Bytes, "blob", "blob"));
    }

    #[test]
    fn mysql_errors_are_retryable_when_they_can_mend() {
        for number in [1040, 1053, 1205, 1213, 1290, 1615, 1927, 1969, 3024] {
            assert!(mysql_number_is_retryable(number), "{number}");
        }
        for number in [1045, 1049, 1054, 1062, 1146, 1406, 1292, 1153, 0] {
            assert!(!mysql_number_is_retryable(number), "{number}");
        }
        let table = TableName::parse("events").expect("valid");
        let dead = table.with_suffix(DEAD_LETTER_SUFFIX);
        assert!(mysql_hint(1146, &table, &dead).contains("run migrate()"));
        assert!(mysql_hint(1406, &table, &dead).contains("strict mode"));
        assert_eq!(mysql_hint(1064, &table, &dead), "");
    }

    #[tokio::test]
    async fn debug_and_errors_never_show_the_password() {
        let sink =
            MySqlSink::connect_lazy("mysql://ktk:s3cret@db.example:3307/analytics", "events", StoreConfig::default())
                .expect("valid URL");
        let debug = format!("{sink:?}");
        assert!(debug.contains("mysql://ktk@db.example:3307/analytics") && !debug.contains("s3cret"), "{debug}");
        let error = sink.error("write", &sqlx::Error::PoolTimedOut);
        assert!(error.is_retryable() && !error.message().contains("s3cret"), "{error}");
        let error = MySqlSink::connect_lazy("postgres://ktk:s3cret@db/x", "events", StoreConfig::default())
            .expect_err("not a MySQL URL");
        assert!(!error.is_retryable() && !error.to_string().contains("s3cret"), "{error}");
        let error = MySqlSink::connect_lazy("mysql://ktk:s3cret@db:port/x", "events", StoreConfig::default())
            .expect_err("not a port");
        assert!(!error.is_retryable() && !error.to_string().contains("s3cret"), "{error}");
    }
}
