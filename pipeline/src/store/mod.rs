//! The real-time stores: one row per event in an events table keyed by `event_id`, one row per
//! dead letter in `<table>_dead_letters` keyed by its position in the shard (`shard_id`,
//! `sequence_number`, `sub_sequence_number`). Writing a batch again stores nothing new, so the
//! store sinks take events as soon as they are read, in the pieces they were read in
//! ([`SinkTiming::Immediate`](crate::SinkTiming::Immediate)), not in whole batches.
//!
//! Two dialects write the same table: `postgres` (feature `postgres`: `PostgresSink`) and
//! `mysql` (feature `mysql`: `MySqlSink`, for MySQL, MariaDB and SingleStore). What they share
//! (the columns, the mapping of an event to column values, table names, [`StoreConfig`],
//! [`MigrationReport`], the transport errors) is in `schema`, compiled with either feature.
//!
//! # How a batch is written
//! Each dialect inserts a batch in as few statements as its protocol allows and lets the unique
//! key turn a row already stored into a no-op, never an error:
//! - PostgreSQL: `INSERT ... SELECT ... FROM unnest(...) ON CONFLICT (key) DO NOTHING`, one array
//!   parameter per column; the rows the server reports inserted are the events written.
//! - MySQL: multi-row `INSERT ... VALUES ... ON DUPLICATE KEY UPDATE duplicate_count =
//!   duplicate_count + 1`; the server counts 1 row affected per insert and 2 per duplicate whose
//!   counter it bumped, so the events written are `2 × rows - rows affected`. It deliberately
//!   does not use `INSERT IGNORE`, which would also turn a value that does not fit into a
//!   warning and store it truncated. Dead letters use `ON DUPLICATE KEY UPDATE shard_id =
//!   shard_id`, a no-op for a record already there.
//!
//! Either way [`SinkReport::written`](crate::SinkReport) counts the events the store did not have
//! yet and `duplicates` the rest of the batch: stored by an earlier attempt, by another consumer,
//! or seen twice in the same batch.
//!
//! # Tables
//! `migrate` (called once at start-up) creates both tables, adds the columns an older table lacks,
//! and checks that every column has a usable type and that the dedup key is a unique index.
//! Columns it adds are nullable, so older rows read as NULL. PostgreSQL migrates in one
//! transaction under an advisory lock; MySQL's DDL is not transactional, so a failed migration
//! there can leave a table half-migrated, and running it again completes it.
//!
//! # What is stored how
//! Both dialects store the same values:
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
//! - `app_id` (the app whose write key the collector took the event with) follows the rule above:
//!   NULL for an event that came without a key, and in rows stored before `migrate` added the
//!   column.
//! - text never holds NUL: each NUL character is replaced by U+FFFD (PostgreSQL refuses NUL in
//!   `TEXT` and `JSONB`, and both stores get the same text).
//! - `stream`, `shard_id`, `sequence_number`, `sub_sequence_number` and `arrival` say where in
//!   the stream the event was read; `stored_at` is when the store first took it.
//! - an event without an `event_id` cannot be stored: the batch fails, not retryably (the decoder
//!   sends such records to the dead letters, so none should get here).
//!
//! # Errors
//! Every failure is a [`SinkError`](crate::SinkError). Retryable: refused or lost connections,
//! a pool timeout (which also bounds connecting: see [`StoreConfig::with_acquire_timeout`]), a
//! server shutting down or in recovery, too many connections, deadlocks, lock and statement
//! timeouts, a read-only server after a failover. Not retryable: a wrong URL, password or
//! database, missing privileges, a missing table or column, a column of the wrong type, a value
//! that does not fit; their messages say what to change. Each dialect classifies its server's
//! error codes; `schema` classifies the rest (network, pool, TLS, URL).

#[cfg(feature = "mysql")]
pub mod mysql;
#[cfg(feature = "postgres")]
pub mod postgres;
mod schema;

#[cfg(feature = "mysql")]
pub use self::mysql::MySqlSink;
#[cfg(feature = "postgres")]
pub use self::postgres::PostgresSink;
pub use self::schema::{
    DEAD_LETTER_SUFFIX, MAX_STORED_TIME_MS, MAX_TABLE_NAME_LEN, MIN_STORED_TIME_MS, MigrationReport, StoreConfig,
};
