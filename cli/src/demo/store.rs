//! What `ktk demo` asks the real-time store (PostgreSQL) once the consumers are done: which events
//! it holds, its dead letters, the collector-to-store delay, the top titles and the platforms.
//! The consumers create the tables (`<table>` and `<table>_dead_letters`); the demo only reads them
//! and, at the end, drops them.

use std::collections::HashSet;
use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};

/// The longest table name the demo takes: the consumers' limit (63 bytes for the dead-letter
/// table's name) less `_dead_letters`.
pub const MAX_TABLE_NAME_LEN: usize = ktk_pipeline::postgres::MAX_TABLE_NAME_LEN;

/// Collector-to-store delay percentiles, in milliseconds (`stored_at - received_at`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Delays {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// From the first event received by the collector to the last one stored.
    pub span_ms: f64,
}

/// A row of a ranking: a name, a count, and a count of distinct viewers or devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ranked {
    pub name: String,
    pub count: i64,
    pub distinct: i64,
}

/// The demo's events table and its dead-letter table.
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
    table: String,
}

/// Checks a table name: letters, digits and underscores, not starting with a digit, so it needs
/// no quoting rules beyond double quotes.
pub fn check_table_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= MAX_TABLE_NAME_LEN
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit());
    if valid {
        Ok(())
    } else {
        Err(format!(
            "--table {name:?}: use 1 to {MAX_TABLE_NAME_LEN} letters, digits and underscores, not starting with a digit"
        ))
    }
}

fn sql_error(what: &str, error: &sqlx::Error) -> String {
    format!("PostgreSQL: {what}: {error}")
}

impl Store {
    /// Connects (one connection is opened at once, so a wrong URL or a stopped server fails here).
    pub async fn connect(url: &str, table: &str) -> Result<Self, String> {
        check_table_name(table)?;
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(5))
            .connect(url)
            .await
            .map_err(|e| sql_error("cannot connect", &e))?;
        Ok(Store { pool, table: table.to_owned() })
    }

    fn events(&self) -> String {
        format!("\"{}\"", self.table)
    }

    fn dead_letters(&self) -> String {
        format!("\"{}{}\"", self.table, ktk_pipeline::postgres::DEAD_LETTER_SUFFIX)
    }

    /// Whether the events table exists already.
    pub async fn exists(&self) -> Result<bool, String> {
        sqlx::query_scalar::<_, bool>("SELECT to_regclass($1) IS NOT NULL")
            .bind(self.events())
            .fetch_one(&self.pool)
            .await
            .map_err(|e| sql_error("cannot look the table up", &e))
    }

    /// `SELECT count(*)` of the events table.
    pub async fn count(&self) -> Result<u64, String> {
        let sql = format!("SELECT count(*) FROM {}", self.events());
        let n: i64 = sqlx::query_scalar(&sql).fetch_one(&self.pool).await.map_err(|e| sql_error("count", &e))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Every `event_id` of the events table.
    pub async fn event_ids(&self) -> Result<HashSet<String>, String> {
        let sql = format!("SELECT event_id FROM {}", self.events());
        let ids: Vec<String> =
            sqlx::query_scalar(&sql).fetch_all(&self.pool).await.map_err(|e| sql_error("event ids", &e))?;
        Ok(ids.into_iter().collect())
    }

    /// `SELECT count(*)` of the dead-letter table.
    pub async fn dead_letter_count(&self) -> Result<u64, String> {
        let sql = format!("SELECT count(*) FROM {}", self.dead_letters());
        let n: i64 =
            sqlx::query_scalar(&sql).fetch_one(&self.pool).await.map_err(|e| sql_error("count dead letters", &e))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// The collector-to-store delay of the stored events (`None` when there are none).
    pub async fn delays(&self) -> Result<Option<Delays>, String> {
        let sql = format!(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), percentile_cont(0.99) WITHIN GROUP (ORDER BY ms), \
             max(ms), (extract(epoch FROM max(stored_at) - min(received_at)) * 1000)::float8 \
             FROM (SELECT (extract(epoch FROM stored_at - received_at) * 1000)::float8 AS ms, stored_at, received_at \
                   FROM {} WHERE received_at IS NOT NULL) d",
            self.events()
        );
        let row: (Option<f64>, Option<f64>, Option<f64>, Option<f64>) =
            sqlx::query_as(&sql).fetch_one(&self.pool).await.map_err(|e| sql_error("delays", &e))?;
        Ok(match row {
            (Some(p50_ms), Some(p99_ms), Some(max_ms), Some(span_ms)) => {
                Some(Delays { p50_ms, p99_ms, max_ms, span_ms })
            }
            _ => None,
        })
    }

    /// The most played titles: plays and distinct viewers (user, else device).
    pub async fn top_titles(&self, limit: i64) -> Result<Vec<Ranked>, String> {
        let sql = format!(
            "SELECT content_title, count(*), count(DISTINCT coalesce(user_id, device_id)) FROM {} \
             WHERE event_type = 'EVENT_TYPE_PLAY' AND content_title IS NOT NULL \
             GROUP BY content_title ORDER BY 2 DESC, 1 LIMIT $1",
            self.events()
        );
        let rows: Vec<(String, i64, i64)> =
            sqlx::query_as(&sql).bind(limit).fetch_all(&self.pool).await.map_err(|e| sql_error("top titles", &e))?;
        Ok(rows.into_iter().map(|(name, count, distinct)| Ranked { name, count, distinct }).collect())
    }

    /// Events and distinct devices per platform, most events first.
    pub async fn platforms(&self) -> Result<Vec<Ranked>, String> {
        let sql = format!(
            "SELECT coalesce(platform, 'PLATFORM_UNSPECIFIED'), count(*), count(DISTINCT device_id) FROM {} \
             GROUP BY 1 ORDER BY 2 DESC, 1",
            self.events()
        );
        let rows: Vec<(String, i64, i64)> =
            sqlx::query_as(&sql).fetch_all(&self.pool).await.map_err(|e| sql_error("platforms", &e))?;
        Ok(rows.into_iter().map(|(name, count, distinct)| Ranked { name, count, distinct }).collect())
    }

    /// Drops both tables.
    pub async fn drop_tables(&self) -> Result<(), String> {
        let sql = format!("DROP TABLE IF EXISTS {}, {}", self.events(), self.dead_letters());
        sqlx::query(&sql).execute(&self.pool).await.map_err(|e| sql_error("drop the tables", &e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_need_no_quoting_rules() {
        assert!(check_table_name("demo_1a2b3c4d").is_ok());
        assert!(check_table_name("Events2").is_ok());
        for bad in ["", "1demo", "demo-x", "demo\"; DROP TABLE x; --", &"x".repeat(MAX_TABLE_NAME_LEN + 1)] {
            assert!(check_table_name(bad).is_err(), "{bad}");
        }
    }
}
