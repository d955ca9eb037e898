//! The embedded engine: SQLite, on a private temporary on-disk database (SQLite's own: on Unix it
//! unlinks the file as soon as it has opened it, so even a killed run leaves nothing behind), so a
//! large day spills to disk instead of growing the process: memory is bounded by the page cache
//! (`cache_mib`, 16 MiB by default) and the sort and group-by buffers SQLite takes from it.
//!
//! A run loads the day's events into the table `events` (one row per `event_id`: the first copy
//! in input key order, then object order; later copies are counted as duplicates), then runs a
//! job's SQL as `SELECT * FROM (<job>) ORDER BY 1, 2, ..., n`: ordered by every column, so the
//! rows come in one order whatever plan SQLite picks, and checks each row against the job's
//! declared columns.
//!
//! The `events` table has the columns of the sink's Parquet objects, with the same names and
//! text values (`type` and `platform` are the enum names, such as `EVENT_TYPE_PLAY`; a value of a
//! later schema version is its number), except `attributes`, and the partition columns `dt` and
//! `hour` as text. Times (`occurred_at_ms`, `received_at_ms`, `arrival_ms`) are integers of
//! milliseconds here and timestamps in Athena: the shipped jobs do not use them (docs/etl.md).

use ktk_pipeline::EventRecord;
use ktk_pipeline::time::unix_millis;
use ktk_proto::events::v1::{EventType, Platform};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, params};

use crate::job::{ColumnType, JobVersion};
use crate::output::Value;
use crate::{Day, EtlError};

/// SQLite's page cache for a run, by default: the bound on the engine's memory.
pub const DEFAULT_CACHE_MIB: u32 = 16;

/// The most rows a job may return for a day (they are held in memory to be written).
pub const DEFAULT_MAX_OUTPUT_ROWS: usize = 5_000_000;

const CREATE_EVENTS: &str = "
CREATE TABLE events (
  event_id TEXT NOT NULL PRIMARY KEY,
  type TEXT NOT NULL,
  occurred_at_ms INTEGER NOT NULL,
  received_at_ms INTEGER NOT NULL,
  user_id TEXT NOT NULL,
  device_id TEXT NOT NULL,
  session_id TEXT NOT NULL,
  platform TEXT NOT NULL,
  app_version TEXT NOT NULL,
  os_version TEXT NOT NULL,
  device_model TEXT NOT NULL,
  content_id TEXT NOT NULL,
  content_title TEXT NOT NULL,
  position_ms INTEGER NOT NULL,
  duration_ms INTEGER NOT NULL,
  ad_id TEXT NOT NULL,
  ad_break TEXT NOT NULL,
  page TEXT NOT NULL,
  target TEXT NOT NULL,
  error_code TEXT NOT NULL,
  error_message TEXT NOT NULL,
  geo_lat REAL,
  geo_lon REAL,
  geo_country TEXT,
  geo_region TEXT,
  schema_version TEXT NOT NULL,
  shard_id TEXT NOT NULL,
  sequence_number TEXT NOT NULL,
  sub_sequence_number INTEGER NOT NULL,
  arrival_ms INTEGER,
  app_id TEXT NOT NULL,
  dt TEXT NOT NULL,
  hour TEXT NOT NULL
)";

const INSERT_EVENT: &str = "INSERT OR IGNORE INTO events VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28, ?29, ?30, ?31, ?32, ?33)";

fn engine_error(error: rusqlite::Error) -> EtlError {
    EtlError::Engine(error.to_string())
}

/// The engine's name and version, as the manifest records it (`sqlite 3.x.y`).
pub fn engine_version() -> String {
    format!("sqlite {}", rusqlite::version())
}

/// What loading the day's events did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadCounts {
    /// Events in the table (distinct event ids).
    pub events: u64,
    /// Copies of an event id already loaded.
    pub duplicates: u64,
}

/// One run's database.
#[derive(Debug)]
pub struct Engine {
    connection: Connection,
    loading: bool,
    counts: LoadCounts,
}

fn enum_text(value: i32, name: Option<&'static str>) -> String {
    name.map(str::to_owned).unwrap_or_else(|| value.to_string())
}

impl Engine {
    /// A new, empty database with the `events` table, its page cache `cache_mib` MiB.
    pub fn open(cache_mib: u32) -> Result<Engine, EtlError> {
        // "" is SQLite's private temporary database: a file it creates and deletes itself, kept
        // in the page cache until the cache is full.
        let connection = Connection::open("").map_err(engine_error)?;
        let kib = i64::from(cache_mib.max(1)) * 1024;
        connection
            .execute_batch(&format!(
                "PRAGMA cache_size = -{kib}; PRAGMA temp_store = FILE; PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF;"
            ))
            .map_err(engine_error)?;
        connection.execute_batch(CREATE_EVENTS).map_err(engine_error)?;
        Ok(Engine { connection, loading: false, counts: LoadCounts::default() })
    }

    /// Loads the events of one object of partition `day`, hour `hour` (`HH`, from its key).
    pub fn load(&mut self, day: Day, hour: &str, records: &[EventRecord]) -> Result<(), EtlError> {
        if !self.loading {
            self.connection.execute_batch("BEGIN").map_err(engine_error)?;
            self.loading = true;
        }
        let dt = day.to_string();
        let mut insert = self.connection.prepare_cached(INSERT_EVENT).map_err(engine_error)?;
        for record in records {
            let e = &record.event;
            let geo = e.geo.as_ref();
            let inserted = insert
                .execute(params![
                    e.event_id,
                    enum_text(e.r#type, EventType::try_from(e.r#type).ok().map(|t| t.as_str_name())),
                    e.occurred_at_ms,
                    e.received_at_ms,
                    e.user_id,
                    e.device_id,
                    e.session_id,
                    enum_text(e.platform, Platform::try_from(e.platform).ok().map(|p| p.as_str_name())),
                    e.app_version,
                    e.os_version,
                    e.device_model,
                    e.content_id,
                    e.content_title,
                    e.position_ms,
                    e.duration_ms,
                    e.ad_id,
                    e.ad_break,
                    e.page,
                    e.target,
                    e.error_code,
                    e.error_message,
                    geo.map(|g| g.lat),
                    geo.map(|g| g.lon),
                    geo.map(|g| g.country.as_str()),
                    geo.map(|g| g.region.as_str()),
                    e.schema_version,
                    record.shard_id,
                    record.sequence_number,
                    // The bits of the unsigned sub-sequence number, as the Parquet column holds them.
                    record.sub_sequence_number as i64,
                    record.arrival.map(unix_millis),
                    e.app_id,
                    dt,
                    hour,
                ])
                .map_err(engine_error)?;
            if inserted == 1 {
                self.counts.events += 1;
            } else {
                self.counts.duplicates += 1;
            }
        }
        Ok(())
    }

    /// Ends the load (commits it); returns what was loaded.
    pub fn finish_load(&mut self) -> Result<LoadCounts, EtlError> {
        if self.loading {
            self.connection.execute_batch("COMMIT").map_err(engine_error)?;
            self.loading = false;
        }
        Ok(self.counts)
    }

    /// Runs `job` for `day` over the loaded events: its rows, ordered by every column, each
    /// checked against the declared columns (names, order, types; every column may be null).
    pub fn query(&self, job: &JobVersion, day: Day, max_rows: usize) -> Result<Vec<Vec<Value>>, EtlError> {
        let query_error = |message: String| EtlError::Query { job: job.job.clone(), version: job.version, message };
        let sql = job.sql_for(day);
        let body = sql.trim_end().trim_end_matches(';');
        let order: Vec<String> = (1..=job.columns.len()).map(|i| i.to_string()).collect();
        // The newline before `)` ends a trailing `--` comment of the job's SQL.
        let wrapped = format!("SELECT * FROM (\n{body}\n) AS job_result ORDER BY {}", order.join(", "));
        let mut statement = self.connection.prepare(&wrapped).map_err(|e| query_error(e.to_string()))?;
        let names: Vec<String> = statement.column_names().map(str::to_owned).collect();
        let declared: Vec<&str> = job.columns.iter().map(|c| c.name.as_str()).collect();
        if names != declared {
            return Err(query_error(format!("the query returns columns {names:?}; job.toml declares {declared:?}")));
        }
        let mut rows = statement.query([]).map_err(|e| query_error(e.to_string()))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(|e| query_error(e.to_string()))? {
            if out.len() == max_rows {
                return Err(query_error(format!("more than {max_rows} rows for one day")));
            }
            let mut values = Vec::with_capacity(job.columns.len());
            for (index, column) in job.columns.iter().enumerate() {
                let value = row.get_ref(index).map_err(|e| query_error(e.to_string()))?;
                let value = match (column.column_type, value) {
                    (_, ValueRef::Null) => Value::Null,
                    (ColumnType::Bigint, ValueRef::Integer(n)) => Value::Int(n),
                    (ColumnType::Double, ValueRef::Real(x)) => Value::Double(x),
                    (ColumnType::Double, ValueRef::Integer(n)) => Value::Double(n as f64),
                    (ColumnType::String, ValueRef::Text(text)) => Value::Text(
                        String::from_utf8(text.to_vec())
                            .map_err(|_| query_error(format!("column {} is not UTF-8 text", column.name)))?,
                    ),
                    (expected, found) => {
                        return Err(query_error(format!(
                            "row {} column {}: declared {} but the query returns {:?} (cast it in the SQL)",
                            out.len() + 1,
                            column.name,
                            expected.name(),
                            found.data_type()
                        )));
                    }
                };
                values.push(value);
            }
            out.push(values);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use ktk_proto::events::v1::Event;

    use super::*;
    use crate::job::Column;

    fn record(id: &str, user: &str, platform: Platform, kind: EventType) -> EventRecord {
        EventRecord {
            event: Event {
                event_id: id.into(),
                user_id: user.into(),
                platform: platform as i32,
                r#type: kind as i32,
                ..Event::default()
            },
            shard_id: "shardId-000000000000".into(),
            sequence_number: "1".into(),
            sub_sequence_number: 0,
            arrival: None,
        }
    }

    fn job(sql: &str, columns: &[(&str, ColumnType)]) -> JobVersion {
        JobVersion {
            job: "t".into(),
            version: 1,
            sql: sql.into(),
            columns: columns.iter().map(|(n, t)| Column { name: (*n).into(), column_type: *t }).collect(),
            sha256: String::new(),
        }
    }

    fn day() -> Day {
        "2026-03-01".parse().expect("day")
    }

    #[test]
    fn events_are_loaded_once_per_id_and_queried_in_order() {
        let mut engine = Engine::open(8).expect("open");
        let records = vec![
            record("e1", "u1", Platform::Web, EventType::Play),
            record("e2", "u2", Platform::Ios, EventType::Play),
            record("e1", "u9", Platform::Roku, EventType::Pause),
        ];
        engine.load(day(), "10", &records).expect("load");
        engine.load(day(), "11", &[record("e3", "u1", Platform::Ios, EventType::Pause)]).expect("load");
        assert_eq!(engine.finish_load().expect("commit"), LoadCounts { events: 3, duplicates: 1 });
        let rows = engine
            .query(
                &job(
                    "SELECT platform, COUNT(*) AS n, MIN(hour) AS h FROM events WHERE dt = '{{dt}}' GROUP BY platform -- trailing comment",
                    &[("platform", ColumnType::String), ("n", ColumnType::Bigint), ("h", ColumnType::String)],
                ),
                day(),
                100,
            )
            .expect("query");
        assert_eq!(
            rows,
            vec![
                vec![Value::Text("PLATFORM_IOS".into()), Value::Int(2), Value::Text("10".into())],
                vec![Value::Text("PLATFORM_WEB".into()), Value::Int(1), Value::Text("10".into())],
            ]
        );
        // Another day's filter sees nothing.
        let none = engine
            .query(
                &job("SELECT COUNT(*) AS n FROM events WHERE dt = '{{dt}}'", &[("n", ColumnType::Bigint)]),
                "2026-03-02".parse().expect("day"),
                10,
            )
            .expect("query");
        assert_eq!(none, vec![vec![Value::Int(0)]]);
    }

    #[test]
    fn results_that_do_not_match_the_declaration_are_refused() {
        let mut engine = Engine::open(8).expect("open");
        engine.load(day(), "00", &[record("e1", "u1", Platform::Web, EventType::Play)]).expect("load");
        engine.finish_load().expect("commit");
        let cases = [
            (job("SELECT user_id AS u FROM events WHERE dt = '{{dt}}'", &[("user", ColumnType::String)]), "declares"),
            (
                job("SELECT user_id AS u FROM events WHERE dt = '{{dt}}'", &[("u", ColumnType::Bigint)]),
                "declared bigint",
            ),
            (job("SELECT nope AS u FROM events WHERE dt = '{{dt}}'", &[("u", ColumnType::String)]), "no such column"),
            (
                job(
                    "SELECT user_id AS u FROM events WHERE dt = '{{dt}}' UNION ALL SELECT 'x'",
                    &[("u", ColumnType::String)],
                ),
                "more than 1 rows",
            ),
        ];
        for (job, expected) in cases {
            let error = engine.query(&job, day(), 1).expect_err("refused").to_string();
            assert!(error.contains(expected), "{error} should contain {expected}");
        }
    }

    #[test]
    fn a_later_schema_versions_enum_values_load_as_numbers() {
        let mut engine = Engine::open(8).expect("open");
        let mut newer = record("e1", "u1", Platform::Web, EventType::Play);
        newer.event.r#type = 61;
        newer.event.platform = 9;
        engine.load(day(), "00", &[newer]).expect("load");
        engine.finish_load().expect("commit");
        let rows = engine
            .query(
                &job(
                    "SELECT type, platform FROM events WHERE dt = '{{dt}}'",
                    &[("type", ColumnType::String), ("platform", ColumnType::String)],
                ),
                day(),
                10,
            )
            .expect("query");
        assert_eq!(rows, vec![vec![Value::Text("61".into()), Value::Text("9".into())]]);
    }
}
