//! The dashboard's queries of the real-time store (PostgreSQL, or a MySQL-protocol store such as
//! MariaDB, MySQL or SingleStore), in both dialects.
//!
//! # What keeps them from slowing the store's ingest
//! - Every query filters on `occurred_at` or `stored_at` over a range of at most
//!   [`MAX_RANGE_SECS`] (or on `user_id` for the returning-user check), which the indexes that the
//!   sinks' `migrate` creates serve: `(occurred_at)`, `(stored_at)`, `(user_id, occurred_at)` on
//!   the events table and `(stored_at)` on the dead-letter table. Nothing scans the table.
//! - Every result is bounded: time series have at most [`MAX_POINTS`] buckets, title lists
//!   [`TOP_N`] rows, the delay histogram about 100 bins per bucket.
//! - The pool holds [`POOL_CONNECTIONS`] connections, each read-only (PostgreSQL
//!   `default_transaction_read_only`, MySQL `SET SESSION TRANSACTION READ ONLY`) with a statement
//!   time limit ([`STATEMENT_TIMEOUT`]: PostgreSQL `statement_timeout`, MariaDB
//!   `max_statement_time`, MySQL `max_execution_time`).
//! - The server in front caches each answer for a few seconds, so the number of viewers does not
//!   multiply the queries (see the crate docs).
//!
//! # Times
//! Bounds and buckets are in whole seconds since the Unix epoch, written into the SQL text as
//! numbers (they come from the server's clock, never from a request), so the SQL the page shows
//! is the SQL that ran. MySQL's `DATETIME` columns hold UTC (the sinks' sessions run in UTC, and
//! so do the dashboard's).

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;
use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions, MySqlRow};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Executor as _, Row as _};

/// The widest range a query covers: one day.
pub const MAX_RANGE_SECS: i64 = 24 * 3600;
/// The most buckets in a time series.
pub const MAX_POINTS: i64 = 360;
/// The most rows of a ranked list (titles watched now, top titles today).
pub const TOP_N: usize = 10;
/// Connections the dashboard opens to the store.
pub const POOL_CONNECTIONS: u32 = 2;
/// The longest a dashboard query may run before the store cancels it.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Event types that mean someone is watching.
const WATCHING: &str = "'EVENT_TYPE_PLAY', 'EVENT_TYPE_HEARTBEAT'";

/// Why a query of the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store URL is not valid: {0}; expected postgres://user:password@host:port/database or mysql://...")]
    BadUrl(String),
    #[error("the table name {0:?} is not valid: letters, digits and _ only, optionally schema.table")]
    BadTable(String),
    #[error("cannot connect to the store at {target}: {message}")]
    Connect { target: String, message: String },
    #[error("a dashboard query failed on {target}: {message}")]
    Query { target: String, message: String },
}

/// Which SQL dialect the store speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dialect {
    Postgres,
    MySql,
}

#[derive(Debug, Clone)]
enum Pool {
    Postgres(PgPool),
    MySql(MySqlPool),
}

/// The store the dashboard reads: a small read-only pool and the events table's name.
#[derive(Debug, Clone)]
pub struct Store {
    pool: Pool,
    dialect: Dialect,
    /// `postgres://user@host:port/database`: where, without the password.
    target: String,
    table: String,
    dead_letter_table: String,
}

/// A validated table name: `name` or `schema.name`, each part `[A-Za-z_][A-Za-z0-9_]*`.
fn check_table(table: &str) -> Result<(), StoreError> {
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.len() <= 63
            && p.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    let parts: Vec<&str> = table.split('.').collect();
    if parts.len() <= 2 && parts.iter().all(|p| part_ok(p)) {
        Ok(())
    } else {
        Err(StoreError::BadTable(table.to_owned()))
    }
}

fn quote(table: &str, dialect: Dialect) -> String {
    let q = if dialect == Dialect::Postgres { '"' } else { '`' };
    table.split('.').map(|p| format!("{q}{p}{q}")).collect::<Vec<_>>().join(".")
}

impl Store {
    /// A pool for `url` (`postgres://...` or `mysql://...`) reading `table` and
    /// `<table>_dead_letters`. Connects lazily: a store that is down fails the queries (and the
    /// page says so), not the start.
    pub fn connect_lazy(url: &str, table: &str) -> Result<Self, StoreError> {
        check_table(table)?;
        let scheme = url.split("://").next().unwrap_or_default();
        let timeout_ms = STATEMENT_TIMEOUT.as_millis();
        let (pool, dialect, target) = match scheme {
            "postgres" | "postgresql" => {
                let options: PgConnectOptions =
                    url.parse().map_err(|e: sqlx::Error| StoreError::BadUrl(e.to_string()))?;
                let target = format!(
                    "postgres://{}@{}:{}/{}",
                    options.get_username(),
                    options.get_host(),
                    options.get_port(),
                    options.get_database().unwrap_or(options.get_username())
                );
                let options = options.application_name("ktk-dashboard").options([
                    ("default_transaction_read_only", "on".to_owned()),
                    ("statement_timeout", format!("{timeout_ms}")),
                ]);
                let pool = PgPoolOptions::new()
                    .max_connections(POOL_CONNECTIONS)
                    .acquire_timeout(Duration::from_secs(5))
                    .idle_timeout(Some(Duration::from_secs(300)))
                    .connect_lazy_with(options);
                (Pool::Postgres(pool), Dialect::Postgres, target)
            }
            "mysql" | "mariadb" => {
                let url = url.replacen("mariadb://", "mysql://", 1);
                let options: MySqlConnectOptions =
                    url.parse().map_err(|e: sqlx::Error| StoreError::BadUrl(e.to_string()))?;
                let options = options.timezone(Some("+00:00".to_owned()));
                let target = format!("mysql://{url_host}", url_host = url.rsplit('@').next().unwrap_or("?"));
                let pool = MySqlPoolOptions::new()
                    .max_connections(POOL_CONNECTIONS)
                    .acquire_timeout(Duration::from_secs(5))
                    .idle_timeout(Some(Duration::from_secs(300)))
                    .after_connect(move |conn, _| {
                        Box::pin(async move {
                            conn.execute("SET SESSION TRANSACTION READ ONLY").await?;
                            // MariaDB's limit is in seconds, MySQL's in milliseconds; each server
                            // refuses the other's variable, which is fine.
                            let _ = conn
                                .execute(format!("SET SESSION max_statement_time = {}", timeout_ms / 1000).as_str())
                                .await;
                            let _ =
                                conn.execute(format!("SET SESSION max_execution_time = {timeout_ms}").as_str()).await;
                            Ok(())
                        })
                    })
                    .connect_lazy_with(options);
                (Pool::MySql(pool), Dialect::MySql, target)
            }
            _ => return Err(StoreError::BadUrl(format!("unknown scheme {scheme:?}"))),
        };
        Ok(Store {
            pool,
            dialect,
            target,
            dead_letter_table: quote(&format!("{table}_dead_letters"), dialect),
            table: quote(table, dialect),
        })
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// Where the store is, without the password.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The events table, quoted as the queries use it.
    pub fn table(&self) -> &str {
        &self.table
    }

    pub async fn close(&self) {
        match &self.pool {
            Pool::Postgres(p) => p.close().await,
            Pool::MySql(p) => p.close().await,
        }
    }

    /// Runs `sql` and reads every column of every row as an integer or a text (`kinds`).
    async fn rows(&self, sql: &str, kinds: &[Kind]) -> Result<Vec<Vec<Cell>>, StoreError> {
        let error = |e: sqlx::Error| StoreError::Query { target: self.target.clone(), message: e.to_string() };
        match &self.pool {
            Pool::Postgres(pool) => {
                let rows = sqlx::query(sql).persistent(false).fetch_all(pool).await.map_err(error)?;
                rows.iter().map(|row| cells_pg(row, kinds)).collect::<Result<_, _>>().map_err(error)
            }
            Pool::MySql(pool) => {
                let rows = sqlx::query(sql).persistent(false).fetch_all(pool).await.map_err(error)?;
                rows.iter().map(|row| cells_mysql(row, kinds)).collect::<Result<_, _>>().map_err(error)
            }
        }
    }

    /// Runs one statement on the dashboard's pool: for the tests that check its sessions refuse
    /// writes. Not part of the API.
    #[doc(hidden)]
    pub async fn execute_for_test(&self, sql: &str) -> Result<(), StoreError> {
        let error = |e: sqlx::Error| StoreError::Query { target: self.target.clone(), message: e.to_string() };
        match &self.pool {
            Pool::Postgres(pool) => sqlx::query(sql).execute(pool).await.map(drop).map_err(error),
            Pool::MySql(pool) => sqlx::query(sql).execute(pool).await.map(drop).map_err(error),
        }
    }

    /// Whether the store answers (a `SELECT 1`).
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.rows(&format!("SELECT {}", self.int("1")), &[Kind::Int]).await.map(drop)
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Int,
    Text,
}

#[derive(Debug, Clone, PartialEq)]
enum Cell {
    Int(i64),
    Text(Option<String>),
}

impl Cell {
    fn int(&self) -> i64 {
        match self {
            Cell::Int(n) => *n,
            Cell::Text(_) => 0,
        }
    }

    fn text(&self) -> String {
        match self {
            Cell::Text(t) => t.clone().unwrap_or_default(),
            Cell::Int(n) => n.to_string(),
        }
    }
}

fn cells_pg(row: &PgRow, kinds: &[Kind]) -> Result<Vec<Cell>, sqlx::Error> {
    kinds
        .iter()
        .enumerate()
        .map(|(i, kind)| match kind {
            Kind::Int => Ok(Cell::Int(row.try_get::<Option<i64>, _>(i)?.unwrap_or(0))),
            Kind::Text => Ok(Cell::Text(row.try_get::<Option<String>, _>(i)?)),
        })
        .collect()
}

fn cells_mysql(row: &MySqlRow, kinds: &[Kind]) -> Result<Vec<Cell>, sqlx::Error> {
    kinds
        .iter()
        .enumerate()
        .map(|(i, kind)| match kind {
            Kind::Int => Ok(Cell::Int(row.try_get::<Option<i64>, _>(i)?.unwrap_or(0))),
            Kind::Text => Ok(Cell::Text(row.try_get::<Option<String>, _>(i)?)),
        })
        .collect()
}

/// A time window: `[from, to)` in seconds since the epoch, cut into buckets of `step` seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Window {
    pub from: i64,
    pub to: i64,
    pub step: i64,
}

impl Window {
    /// The `range` seconds up to `now` (clamped to 60 s..[`MAX_RANGE_SECS`]), with buckets of at
    /// least `min_step` seconds (and 10 s) and at most [`MAX_POINTS`] of them, aligned to the epoch.
    pub fn ending(now: i64, range: i64, min_step: i64) -> Window {
        let range = range.clamp(60, MAX_RANGE_SECS);
        let step = nice_step(min_step.max((range + MAX_POINTS - 1) / MAX_POINTS));
        Window { from: now - range, to: now, step }
    }

    /// The bucket starts, oldest first: every bucket that overlaps the window.
    pub fn buckets(&self) -> Vec<i64> {
        let first = self.from.div_euclid(self.step) * self.step;
        (0..).map(|i| first + i * self.step).take_while(|t| *t < self.to).collect()
    }

    fn index(&self, bucket: i64) -> Option<usize> {
        let first = self.from.div_euclid(self.step) * self.step;
        let i = (bucket - first).div_euclid(self.step);
        (bucket >= first && bucket < self.to).then_some(i as usize)
    }
}

/// The smallest of 10, 15, 30 s, 1, 2, 5, 10, 15, 30 min, 1, 2, 3, 6, 12 h that is at least `secs`.
fn nice_step(secs: i64) -> i64 {
    const STEPS: [i64; 14] = [10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200];
    STEPS.into_iter().find(|s| *s >= secs).unwrap_or(86400)
}

/// One line of a chart: its name, one value per bucket, and the sum over the window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Series {
    pub name: String,
    pub values: Vec<f64>,
    pub total: f64,
}

/// Bucket starts and lines over them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Chart {
    pub times: Vec<i64>,
    pub series: Vec<Series>,
}

impl Chart {
    /// Lines from `(bucket, name, count)` rows, in descending order of their totals.
    fn from_rows(window: &Window, rows: &[Vec<Cell>]) -> Chart {
        let times = window.buckets();
        let mut series: Vec<Series> = Vec::new();
        for row in rows {
            let (bucket, name, count) = (row[0].int(), row[1].text(), row[2].int() as f64);
            let Some(i) = window.index(bucket) else { continue };
            let line = match series.iter().position(|s| s.name == name) {
                Some(p) => &mut series[p],
                None => {
                    series.push(Series { name, values: vec![0.0; times.len()], total: 0.0 });
                    series.last_mut().expect("just pushed")
                }
            };
            if let Some(v) = line.values.get_mut(i) {
                *v += count;
                line.total += count;
            }
        }
        series.sort_by(|a, b| b.total.total_cmp(&a.total).then_with(|| a.name.cmp(&b.name)));
        Chart { times, series }
    }
}

/// A ranked title.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Title {
    pub title: String,
    pub plays: i64,
    pub viewers: i64,
}

/// Users active in the window: first seen in it, or seen before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Users {
    pub active: i64,
    pub new: i64,
    pub returning: i64,
}

/// A documented segment: its users over the whole window, its SQL, and its line in the chart.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Segment {
    pub name: &'static str,
    pub description: &'static str,
    pub users: i64,
    pub sql: String,
}

/// Delivery delay (collector receipt to store) percentiles, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Delay {
    pub times: Vec<i64>,
    pub p50: Vec<Option<f64>>,
    pub p99: Vec<Option<f64>>,
    /// Over the whole window.
    pub overall_p50: Option<f64>,
    pub overall_p99: Option<f64>,
    pub events: i64,
}

/// What the store knows of the audience in a window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Audience {
    pub window: Window,
    pub by_type: Chart,
    pub by_platform: Chart,
    /// Distinct viewers (user, or device without a user) with a play or heartbeat per bucket.
    pub viewers: Chart,
    /// Titles by distinct viewers with a play or heartbeat in the last minute.
    pub watching_now: Vec<Title>,
    /// Titles by plays since midnight UTC.
    pub top_titles_today: Vec<Title>,
    pub users: Users,
}

/// The segments of a window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Segments {
    pub window: Window,
    pub chart: Chart,
    pub segments: Vec<Segment>,
}

/// What the store knows of the pipeline in a window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StorePipeline {
    pub window: Window,
    /// Events stored per bucket (by `stored_at`).
    pub stored: Chart,
    pub delay: Delay,
    /// Dead letters stored per bucket, by reason.
    pub dead_letters: Chart,
}

/// The reason classes of dead letters, from the texts the pipeline's decoder writes.
pub const DEAD_LETTER_REASONS: [(&str, &str); 6] = [
    ("bad_json", "not an events.v1.Event in JSON%"),
    ("bad_protobuf", "not an events.v1.Event in protobuf%"),
    ("no_event_id", "the event has no event_id%"),
    ("bad_event_id", "the event_id %"),
    ("bad_aggregate", "not a valid KPL aggregate%"),
    ("other", "%"),
];

/// The documented segments: (name, description).
pub const SEGMENTS: [(&str, &str); 4] = [
    ("binge_watcher", "played 3 or more distinct titles within one session"),
    ("ad_completer", "completed at least one ad and skipped none"),
    ("ad_skipper", "skipped at least one ad"),
    ("multi_platform", "sent events from 2 or more platforms"),
];

impl Store {
    fn ts(&self, secs: i64) -> String {
        match self.dialect {
            Dialect::Postgres => format!("to_timestamp({secs})"),
            Dialect::MySql => format!("FROM_UNIXTIME({secs})"),
        }
    }

    /// `column` in the window.
    fn between(&self, column: &str, window: &Window) -> String {
        format!("{column} >= {} AND {column} < {}", self.ts(window.from), self.ts(window.to))
    }

    /// The start of `column`'s bucket, in seconds since the epoch.
    fn bucket(&self, column: &str, step: i64) -> String {
        match self.dialect {
            Dialect::Postgres => format!("(floor(extract(epoch FROM {column}) / {step}) * {step})::bigint"),
            Dialect::MySql => format!("CAST(FLOOR(UNIX_TIMESTAMP({column}) / {step}) * {step} AS SIGNED)"),
        }
    }

    fn int(&self, expr: &str) -> String {
        match self.dialect {
            Dialect::Postgres => format!("({expr})::bigint"),
            Dialect::MySql => format!("CAST({expr} AS SIGNED)"),
        }
    }

    /// The audience panel's data.
    pub async fn audience(&self, window: &Window) -> Result<Audience, StoreError> {
        self.audience_parts(window, true).await
    }

    /// Titles by plays from midnight UTC to `to` (seconds since the epoch), the [`TOP_N`] first.
    /// It reads the day's plays whatever the range, which makes it the costliest audience query
    /// on a busy day: the server computes it apart, at most once per
    /// [`DashboardConfig::day_refresh`](crate::DashboardConfig::day_refresh).
    pub async fn top_titles_today(&self, to: i64) -> Result<Vec<Title>, StoreError> {
        let t = &self.table;
        let midnight = to.div_euclid(86400) * 86400;
        let today = Window { from: midnight, to, step: 86400 };
        let top_sql = format!(
            "SELECT content_title, COUNT(*) AS plays, COUNT(DISTINCT COALESCE(user_id, device_id)) FROM {t} \
             WHERE {} AND event_type = 'EVENT_TYPE_PLAY' AND content_title IS NOT NULL \
             GROUP BY content_title ORDER BY 2 DESC, 1 LIMIT {TOP_N}",
            self.between("occurred_at", &today)
        );
        let titles = [Kind::Text, Kind::Int, Kind::Int];
        Ok(self.rows(&top_sql, &titles).await?.iter().map(|r| title(r)).collect())
    }

    /// The audience, without its top titles of the day when `with_top` is false (the server
    /// computes those apart).
    pub async fn audience_parts(&self, window: &Window, with_top: bool) -> Result<Audience, StoreError> {
        let t = &self.table;
        let range = self.between("occurred_at", window);
        let bucket = self.bucket("occurred_at", window.step);
        // One read of the range for both charts: at most buckets x types x platforms rows.
        let by_sql = format!(
            "SELECT {bucket} AS bucket, event_type, platform, COUNT(*) FROM {t} WHERE {range} GROUP BY 1, 2, 3 ORDER BY 1"
        );
        let rows = self.rows(&by_sql, &[Kind::Int, Kind::Text, Kind::Text, Kind::Int]).await?;
        let pick = |column: usize| -> Vec<Vec<Cell>> {
            rows.iter().map(|r| vec![r[0].clone(), r[column].clone(), r[3].clone()]).collect()
        };
        let by_type = Chart::from_rows(window, &pick(1));
        let by_platform = Chart::from_rows(window, &pick(2));
        let counted = [Kind::Int, Kind::Text, Kind::Int];
        let viewers_sql = format!(
            "SELECT {bucket} AS bucket, 'viewers', COUNT(DISTINCT COALESCE(user_id, device_id)) FROM {t} \
             WHERE {range} AND event_type IN ({WATCHING}) GROUP BY 1 ORDER BY 1"
        );
        let viewers = Chart::from_rows(window, &self.rows(&viewers_sql, &counted).await?);
        let last_minute = Window { from: window.to - 60, to: window.to, step: 60 };
        let now_sql = format!(
            "SELECT content_title, COUNT(*), COUNT(DISTINCT COALESCE(user_id, device_id)) AS viewers FROM {t} \
             WHERE {} AND event_type IN ({WATCHING}) AND content_title IS NOT NULL \
             GROUP BY content_title ORDER BY 3 DESC, 1 LIMIT {TOP_N}",
            self.between("occurred_at", &last_minute)
        );
        let titles = [Kind::Text, Kind::Int, Kind::Int];
        let watching_now = self.rows(&now_sql, &titles).await?.iter().map(|r| title(r)).collect();
        let top_titles_today = if with_top { self.top_titles_today(window.to).await? } else { Vec::new() };
        let users_sql = self.users_sql(window);
        let users = self.rows(&users_sql, &[Kind::Int, Kind::Int]).await?;
        let (active, returning) = users.first().map_or((0, 0), |r| (r[0].int(), r[1].int()));
        Ok(Audience {
            window: *window,
            by_type,
            by_platform,
            viewers,
            watching_now,
            top_titles_today,
            users: Users { active, new: active - returning, returning },
        })
    }

    /// Users with a user id active in the window, and how many of them had an event before it
    /// (an index lookup per user on `(user_id, occurred_at)`).
    pub fn users_sql(&self, window: &Window) -> String {
        let t = &self.table;
        let returning = self.int(&format!(
            "COALESCE(SUM(CASE WHEN EXISTS (SELECT 1 FROM {t} p WHERE p.user_id = a.user_id AND p.occurred_at < {}) \
             THEN 1 ELSE 0 END), 0)",
            self.ts(window.from)
        ));
        format!(
            "SELECT COUNT(*), {returning} FROM (SELECT DISTINCT user_id FROM {t} WHERE {} AND user_id IS NOT NULL) a",
            self.between("occurred_at", window)
        )
    }

    /// The SQL of one segment over the window: one row, its users. With `bucket`, one row per
    /// bucket instead: (bucket start, segment, users qualifying on that bucket's events).
    pub fn segment_sql(&self, name: &str, window: &Window, bucketed: bool) -> String {
        let t = &self.table;
        let range = self.between("occurred_at", window);
        let (key, select, group, tail) = if bucketed {
            let b = self.bucket("occurred_at", window.step);
            (
                format!("{b} AS bucket, "),
                format!("bucket, '{name}', "),
                "bucket, ".to_owned(),
                " GROUP BY bucket ORDER BY bucket",
            )
        } else {
            (String::new(), String::new(), String::new(), "")
        };
        let per_user = |condition: &str| {
            format!(
                "SELECT {select}COUNT(*) AS users FROM (\n  SELECT {key}user_id FROM {t}\n  WHERE {range} AND user_id IS NOT NULL\n  \
                 GROUP BY {group}user_id\n  HAVING {condition}\n) per_user{tail}"
            )
        };
        match name {
            "binge_watcher" => format!(
                "SELECT {select}COUNT(DISTINCT user_id) AS users FROM (\n  SELECT {key}user_id, session_id FROM {t}\n  \
                 WHERE {range} AND event_type = 'EVENT_TYPE_PLAY'\n    AND user_id IS NOT NULL AND content_id IS NOT NULL\n  \
                 GROUP BY {group}user_id, session_id\n  HAVING COUNT(DISTINCT content_id) >= 3\n) sessions{tail}"
            ),
            "ad_completer" => per_user(
                "SUM(CASE WHEN event_type = 'EVENT_TYPE_AD_COMPLETE' THEN 1 ELSE 0 END) > 0\n     \
                 AND SUM(CASE WHEN event_type = 'EVENT_TYPE_AD_SKIP' THEN 1 ELSE 0 END) = 0",
            ),
            "ad_skipper" => per_user("SUM(CASE WHEN event_type = 'EVENT_TYPE_AD_SKIP' THEN 1 ELSE 0 END) > 0"),
            _ => per_user("COUNT(DISTINCT platform) >= 2"),
        }
    }

    /// The segments panel's data: each segment's users over the window (with its SQL) and per
    /// bucket.
    pub async fn segments(&self, window: &Window) -> Result<Segments, StoreError> {
        let mut segments = Vec::new();
        let mut rows = Vec::new();
        for (name, description) in SEGMENTS {
            let sql = self.segment_sql(name, window, false);
            let users = self.rows(&sql, &[Kind::Int]).await?.first().map_or(0, |r| r[0].int());
            rows.extend(self.rows(&self.segment_sql(name, window, true), &[Kind::Int, Kind::Text, Kind::Int]).await?);
            segments.push(Segment { name, description, users, sql });
        }
        let mut chart = Chart::from_rows(window, &rows);
        // Every segment has a line, in the documented order, even when empty.
        chart.series = SEGMENTS
            .iter()
            .map(|(name, _)| {
                chart.series.iter().find(|s| s.name == *name).cloned().unwrap_or_else(|| Series {
                    name: (*name).to_owned(),
                    values: vec![0.0; chart.times.len()],
                    total: 0.0,
                })
            })
            .collect();
        Ok(Segments { window: *window, chart, segments })
    }

    /// The reason class of a dead letter, as SQL.
    pub fn reason_sql(&self) -> String {
        let mut sql = String::from("CASE");
        for (class, pattern) in &DEAD_LETTER_REASONS[..DEAD_LETTER_REASONS.len() - 1] {
            let _ = write!(sql, " WHEN reason LIKE '{pattern}' THEN '{class}'");
        }
        sql.push_str(" ELSE 'other' END");
        sql
    }

    /// Delivery delay in milliseconds of a stored event, from the collector's receipt to the
    /// store's `stored_at` (at least 0).
    fn delay_ms(&self) -> String {
        match self.dialect {
            Dialect::Postgres => "GREATEST(extract(epoch FROM (stored_at - received_at)) * 1000, 0)".to_owned(),
            Dialect::MySql => "GREATEST(TIMESTAMPDIFF(MICROSECOND, received_at, stored_at) / 1000, 0)".to_owned(),
        }
    }

    /// The pipeline panel's store data.
    pub async fn pipeline(&self, window: &Window) -> Result<StorePipeline, StoreError> {
        let t = &self.table;
        let range = self.between("stored_at", window);
        let bucket = self.bucket("stored_at", window.step);
        let counted = [Kind::Int, Kind::Text, Kind::Int];
        let stored_sql =
            format!("SELECT {bucket} AS bucket, 'stored', COUNT(*) FROM {t} WHERE {range} GROUP BY 1 ORDER BY 1");
        let stored = Chart::from_rows(window, &self.rows(&stored_sql, &counted).await?);
        // A log-scale histogram per bucket: bin = floor(ln(1 + ms) * 8), so at most ~100 bins
        // (2 minutes is bin 93) of 13% width each.
        let bin = self.int(&format!("FLOOR(LN(1 + {}) * {DELAY_BINS_PER_E})", self.delay_ms()));
        let delay_sql = format!(
            "SELECT {bucket} AS bucket, {bin} AS bin, COUNT(*) FROM {t} WHERE {range} AND received_at IS NOT NULL \
             GROUP BY 1, 2 ORDER BY 1, 2"
        );
        let histogram = self.rows(&delay_sql, &[Kind::Int, Kind::Int, Kind::Int]).await?;
        let delay = delay_percentiles(window, &histogram);
        let dl = &self.dead_letter_table;
        let dead_sql = format!(
            "SELECT {bucket} AS bucket, {} AS reason, COUNT(*) FROM {dl} WHERE {range} GROUP BY 1, 2 ORDER BY 1",
            self.reason_sql()
        );
        let dead_letters = Chart::from_rows(window, &self.rows(&dead_sql, &counted).await?);
        Ok(StorePipeline { window: *window, stored, delay, dead_letters })
    }
}

/// Bins per factor e of the delay histogram.
const DELAY_BINS_PER_E: i64 = 8;

fn title(row: &[Cell]) -> Title {
    Title { title: row[0].text(), plays: row[1].int(), viewers: row[2].int() }
}

/// The delay a bin stands for: its geometric middle, in milliseconds.
fn bin_ms(bin: i64) -> f64 {
    ((bin as f64 + 0.5) / DELAY_BINS_PER_E as f64).exp() - 1.0
}

/// The `q` quantile of a histogram of (bin, count), as the middle of the bin it falls in.
fn quantile(bins: &[(i64, i64)], q: f64) -> Option<f64> {
    let total: i64 = bins.iter().map(|(_, n)| n).sum();
    if total == 0 {
        return None;
    }
    let rank = (q * total as f64).ceil().max(1.0) as i64;
    let mut seen = 0;
    for (bin, n) in bins {
        seen += n;
        if seen >= rank {
            return Some((bin_ms(*bin) * 10.0).round() / 10.0);
        }
    }
    bins.last().map(|(b, _)| bin_ms(*b))
}

/// p50 and p99 per bucket and over the window, from (bucket, bin, count) rows.
fn delay_percentiles(window: &Window, rows: &[Vec<Cell>]) -> Delay {
    let times = window.buckets();
    let mut per_bucket: Vec<Vec<(i64, i64)>> = vec![Vec::new(); times.len()];
    let mut overall: std::collections::BTreeMap<i64, i64> = std::collections::BTreeMap::new();
    for row in rows {
        let (bucket, bin, n) = (row[0].int(), row[1].int(), row[2].int());
        if let Some(bins) = window.index(bucket).and_then(|i| per_bucket.get_mut(i)) {
            bins.push((bin, n));
            *overall.entry(bin).or_default() += n;
        }
    }
    for bins in &mut per_bucket {
        bins.sort_unstable();
    }
    let overall: Vec<(i64, i64)> = overall.into_iter().collect();
    Delay {
        p50: per_bucket.iter().map(|b| quantile(b, 0.5)).collect(),
        p99: per_bucket.iter().map(|b| quantile(b, 0.99)).collect(),
        overall_p50: quantile(&overall, 0.5),
        overall_p99: quantile(&overall, 0.99),
        events: overall.iter().map(|(_, n)| n).sum(),
        times,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_have_bounded_aligned_buckets() {
        let w = Window::ending(10_000_000, 3600, 60);
        assert_eq!((w.from, w.to, w.step), (10_000_000 - 3600, 10_000_000, 60));
        let buckets = w.buckets();
        assert_eq!(buckets.len(), 61, "an hour that does not start on a minute touches 61 minutes");
        assert!(buckets.iter().all(|b| b % 60 == 0));
        let day = Window::ending(10_000_000, 10 * MAX_RANGE_SECS, 60);
        assert_eq!(day.to - day.from, MAX_RANGE_SECS, "ranges are clamped");
        assert!(day.buckets().len() as i64 <= MAX_POINTS + 1);
        assert_eq!(day.index(day.buckets()[3]), Some(3));
        assert_eq!(day.index(day.from - day.step * 2), None);
    }

    #[test]
    fn charts_fill_missing_buckets_and_sort_by_total() {
        let w = Window { from: 0, to: 180, step: 60 };
        let rows = vec![
            vec![Cell::Int(0), Cell::Text(Some("a".into())), Cell::Int(1)],
            vec![Cell::Int(120), Cell::Text(Some("b".into())), Cell::Int(5)],
            vec![Cell::Int(120), Cell::Text(Some("a".into())), Cell::Int(2)],
            vec![Cell::Int(999), Cell::Text(Some("a".into())), Cell::Int(7)],
        ];
        let chart = Chart::from_rows(&w, &rows);
        assert_eq!(chart.times, vec![0, 60, 120]);
        assert_eq!(chart.series[0], Series { name: "b".into(), values: vec![0.0, 0.0, 5.0], total: 5.0 });
        assert_eq!(chart.series[1], Series { name: "a".into(), values: vec![1.0, 0.0, 2.0], total: 3.0 });
    }

    #[test]
    fn delay_quantiles_come_from_the_log_histogram() {
        // 100 events: 98 at ~200 ms, 2 at ~2 s.
        let bin = |ms: f64| ((1.0 + ms).ln() * DELAY_BINS_PER_E as f64).floor() as i64;
        let w = Window { from: 0, to: 60, step: 60 };
        let rows = vec![
            vec![Cell::Int(0), Cell::Int(bin(200.0)), Cell::Int(98)],
            vec![Cell::Int(0), Cell::Int(bin(2000.0)), Cell::Int(2)],
        ];
        let delay = delay_percentiles(&w, &rows);
        let p50 = delay.overall_p50.expect("p50");
        let p99 = delay.overall_p99.expect("p99");
        assert!((p50 - 200.0).abs() / 200.0 < 0.07, "{p50}");
        assert!((p99 - 2000.0).abs() / 2000.0 < 0.07, "{p99}");
        assert_eq!(delay.events, 100);
        assert_eq!(delay.p50, vec![Some(p50)]);
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn table_names_are_checked_and_quoted() {
        assert!(check_table("events").is_ok() && check_table("analytics.events_1").is_ok());
        for bad in ["", "a.b.c", "1events", "ev-ents", "e\"; DROP TABLE x; --"] {
            assert!(check_table(bad).is_err(), "{bad}");
        }
        assert_eq!(quote("a.b", Dialect::Postgres), "\"a\".\"b\"");
        assert_eq!(quote("a", Dialect::MySql), "`a`");
    }
}
