//! How long the dashboard's store queries take on a store holding 1,000,000 events of the last
//! 24 hours, in PostgreSQL (`DATABASE_URL`) and in a MySQL-protocol store (`MYSQL_URL`).
//!
//! Each run seeds a fresh table (`ktk_bench_dash_1m`, created by the pipeline's own `migrate`, so
//! with the indexes the sinks' tables have) with `EVENTS` events (default 1,000,000) spread over
//! the 24 hours before now: 50,000 users, 500 titles, eight platforms, a mix of plays, heartbeats,
//! ads and page views, and 1,000 dead letters. Then it times each panel's queries, as the
//! dashboard runs them on a cache miss, over the 15-minute, 1-hour and 24-hour ranges (the
//! audience without the top titles of the day, which are timed apart, as the server computes
//! them apart). The table is dropped at the end.
//!
//! `cargo bench -p ktk-dashboard --bench store_queries` (a missing database fails the run: there
//! is nothing to measure without it).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use criterion::{Criterion, criterion_group, criterion_main};
use ktk_dashboard::{Dialect, Store, Window};

const TABLE: &str = "ktk_bench_dash_1m";

fn events() -> u64 {
    std::env::var("EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000)
}

/// Event types by weight (a tenth each): heartbeats dominate, as in real traffic.
const TYPES: &str = "'EVENT_TYPE_PLAY','EVENT_TYPE_HEARTBEAT','EVENT_TYPE_HEARTBEAT','EVENT_TYPE_HEARTBEAT',\
'EVENT_TYPE_PAUSE','EVENT_TYPE_PAGE_VIEW','EVENT_TYPE_AD_START','EVENT_TYPE_AD_COMPLETE','EVENT_TYPE_AD_SKIP',\
'EVENT_TYPE_APP_OPEN'";
const PLATFORMS: &str = "'PLATFORM_IOS','PLATFORM_ANDROID','PLATFORM_FIRE_TV','PLATFORM_APPLE_TV',\
'PLATFORM_ANDROID_TV','PLATFORM_ROKU','PLATFORM_WEB','PLATFORM_SMART_TV'";

/// The seeding statement: event `g` (0-based) of `n`, its fields spread by multiplicative hashing
/// so neighbouring rows differ; each user keeps one platform in three of four events.
fn seed_sql(dialect: Dialect, n: u64) -> String {
    match dialect {
        Dialect::Postgres => format!(
            "INSERT INTO {TABLE} (event_id, event_type, occurred_at, received_at, stored_at, user_id, device_id, \
             session_id, platform, content_id, content_title, stream, shard_id, sequence_number, sub_sequence_number) \
             SELECT 'bench-' || g, (ARRAY[{TYPES}])[(1 + g % 10)::int], at, at + interval '150 milliseconds', \
             at + interval '150 milliseconds' + make_interval(secs => (g % 997) / 1000.0), \
             'user-' || u, 'device-' || u, 'user-' || u || '-' || (extract(epoch FROM at)::bigint / 3600), \
             (ARRAY[{PLATFORMS}])[(1 + CASE WHEN g % 4 = 0 THEN g % 8 ELSE u % 8 END)::int], \
             'title-' || c, 'Title ' || c, 'bench', 'shardId-' || (g % 4), (g * 1000)::text, 0 \
             FROM (SELECT g, (g * 104729) % 50000 AS u, (g * 31) % 500 AS c, \
                   now() - make_interval(secs => ((g * 7919) % 86400000) / 1000.0) AS at \
                   FROM generate_series(0::bigint, {last}::bigint) AS g) s",
            last = n - 1
        ),
        // A recursive CTE of 1,000 numbers, crossed with itself: what MySQL 8 and MariaDB both run.
        Dialect::MySql => format!(
            "INSERT INTO {TABLE} (event_id, event_type, occurred_at, received_at, stored_at, user_id, device_id, \
             session_id, platform, content_id, content_title, stream, shard_id, sequence_number, sub_sequence_number) \
             SELECT CONCAT('bench-', g), ELT(1 + g % 10, {TYPES}), at, at + INTERVAL 150000 MICROSECOND, \
             at + INTERVAL (150 + g % 997) * 1000 MICROSECOND, \
             CONCAT('user-', u), CONCAT('device-', u), CONCAT('user-', u, '-', FLOOR(UNIX_TIMESTAMP(at) / 3600)), \
             ELT(1 + CASE WHEN g % 4 = 0 THEN g % 8 ELSE u % 8 END, {PLATFORMS}), \
             CONCAT('title-', c), CONCAT('Title ', c), 'bench', CONCAT('shardId-', g % 4), CAST(g * 1000 AS CHAR), 0 \
             FROM (SELECT g, (g * 104729) % 50000 AS u, (g * 31) % 500 AS c, \
                   UTC_TIMESTAMP(3) - INTERVAL ((g * 7919) % 86400000) * 1000 MICROSECOND AS at \
                   FROM (WITH RECURSIVE d (n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM d WHERE n < 999) \
                         SELECT a.n * 1000 + b.n AS g FROM d a CROSS JOIN d b) numbers WHERE g < {n}) s"
        ),
    }
}

fn dead_letter_sql(dialect: Dialect) -> String {
    let dead = format!("{TABLE}_dead_letters");
    match dialect {
        Dialect::Postgres => format!(
            "INSERT INTO {dead} (shard_id, sequence_number, sub_sequence_number, stream, reason, stored_at) \
             SELECT 'shardId-0', 'dead-' || g, 0, 'bench', \
             CASE WHEN g % 2 = 0 THEN 'not an events.v1.Event in protobuf: bad wire type' \
             ELSE 'the event has no event_id' END, now() - make_interval(secs => (g * 86.4)) \
             FROM generate_series(0, 999) AS g"
        ),
        Dialect::MySql => format!(
            "INSERT INTO {dead} (shard_id, sequence_number, sub_sequence_number, stream, reason, stored_at) \
             SELECT 'shardId-0', CONCAT('dead-', n), 0, 'bench', \
             IF(n % 2 = 0, 'not an events.v1.Event in protobuf: bad wire type', 'the event has no event_id'), \
             UTC_TIMESTAMP(3) - INTERVAL n * 86400000 MICROSECOND FROM \
             (WITH RECURSIVE d (n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM d WHERE n < 999) SELECT n FROM d) numbers"
        ),
    }
}

/// A fresh table of `n` events in the store at `url`, with the sinks' schema and indexes.
async fn seed(url: &str, dialect: Dialect, n: u64) {
    let started = std::time::Instant::now();
    let statements = [format!("DROP TABLE IF EXISTS {TABLE}"), format!("DROP TABLE IF EXISTS {TABLE}_dead_letters")];
    match dialect {
        Dialect::Postgres => {
            let sink = ktk_pipeline::postgres::PostgresSink::connect(url, TABLE)
                .await
                .unwrap_or_else(|e| panic!("PostgreSQL at {url}: {e}"));
            for sql in statements.iter().chain([&"SET statement_timeout = 0".to_owned()]) {
                sqlx::query(sql).execute(sink.pool()).await.expect("drop");
            }
            sink.migrate().await.expect("migrate");
            sqlx::query(&seed_sql(dialect, n)).execute(sink.pool()).await.expect("seed events");
            sqlx::query(&dead_letter_sql(dialect)).execute(sink.pool()).await.expect("seed dead letters");
            sqlx::query(&format!("ANALYZE {TABLE}")).execute(sink.pool()).await.expect("analyze");
            sink.close().await;
        }
        Dialect::MySql => {
            let sink = ktk_pipeline::mysql::MySqlSink::connect(url, TABLE)
                .await
                .unwrap_or_else(|e| panic!("MySQL at {url}: {e}"));
            for sql in &statements {
                sqlx::query(sql).execute(sink.pool()).await.expect("drop");
            }
            sink.migrate().await.expect("migrate");
            sqlx::query(&seed_sql(dialect, n)).execute(sink.pool()).await.expect("seed events");
            sqlx::query(&dead_letter_sql(dialect)).execute(sink.pool()).await.expect("seed dead letters");
            sqlx::query(&format!("ANALYZE TABLE {TABLE}")).execute(sink.pool()).await.expect("analyze");
            sink.close().await;
        }
    }
    eprintln!("{dialect:?}: seeded {n} events in {:.1} s", started.elapsed().as_secs_f64());
}

async fn drop_tables(url: &str, dialect: Dialect) {
    let drop = |t: &str| format!("DROP TABLE IF EXISTS {t}");
    match dialect {
        Dialect::Postgres => {
            let pool = sqlx::PgPool::connect(url).await.expect("connect");
            for t in [TABLE.to_owned(), format!("{TABLE}_dead_letters")] {
                sqlx::query(&drop(&t)).execute(&pool).await.expect("drop");
            }
        }
        Dialect::MySql => {
            let pool = sqlx::MySqlPool::connect(url).await.expect("connect");
            for t in [TABLE.to_owned(), format!("{TABLE}_dead_letters")] {
                sqlx::query(&drop(&t)).execute(&pool).await.expect("drop");
            }
        }
    }
}

fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

fn store_queries(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let n = events();
    for (name, variable, dialect) in
        [("postgres", "DATABASE_URL", Dialect::Postgres), ("mysql", "MYSQL_URL", Dialect::MySql)]
    {
        let url = std::env::var(variable).unwrap_or_else(|_| panic!("set {variable} to the store to measure"));
        runtime.block_on(seed(&url, dialect, n));
        let store = runtime.block_on(async { Store::connect_lazy(&url, TABLE).expect("store") });
        let mut group = c.benchmark_group(format!("dashboard_{name}_{}k_events", n / 1000));
        group.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(10));
        // The top titles of the day: the same query whatever the range (the server runs it apart).
        group.bench_function("top_titles_today", |b| {
            b.to_async(&runtime).iter(|| async { store.top_titles_today(now_secs() + 1).await.expect("top titles") })
        });
        for range in [900, 3600, 86_400] {
            let min_step = if range <= 900 { 10 } else { 60 };
            let window = || Window::ending(now_secs() + 1, range, min_step);
            // One run first: a panel that exceeds the store's statement limit (10 s) is reported,
            // not timed (the dashboard shows the store's error for it).
            let probe = |name: &str, result: Result<(), ktk_dashboard::StoreError>, took: Duration| match result {
                Ok(()) => true,
                Err(e) => {
                    eprintln!("{dialect:?} {name}_{range}s: no answer after {:.1} s: {e}", took.as_secs_f64());
                    false
                }
            };
            let started = std::time::Instant::now();
            let audience = runtime.block_on(store.audience_parts(&window(), false)).map(drop);
            if probe("audience", audience, started.elapsed()) {
                group.bench_function(format!("audience_{range}s"), |b| {
                    b.to_async(&runtime)
                        .iter(|| async { store.audience_parts(&window(), false).await.expect("audience") })
                });
            }
            let started = std::time::Instant::now();
            let segments = runtime.block_on(store.segments(&window())).map(drop);
            if probe("segments", segments, started.elapsed()) {
                group.bench_function(format!("segments_{range}s"), |b| {
                    b.to_async(&runtime).iter(|| async { store.segments(&window()).await.expect("segments") })
                });
            }
            let started = std::time::Instant::now();
            let pipeline = runtime.block_on(store.pipeline(&window())).map(drop);
            if probe("pipeline", pipeline, started.elapsed()) {
                group.bench_function(format!("pipeline_{range}s"), |b| {
                    b.to_async(&runtime).iter(|| async { store.pipeline(&window()).await.expect("pipeline") })
                });
            }
        }
        group.finish();
        // What an hour's answer holds: a check that the seeded data reached the queries.
        let hour = runtime.block_on(store.audience_parts(&Window::ending(now_secs() + 1, 3600, 60), false));
        let total: f64 = hour.expect("audience").by_type.series.iter().map(|s| s.total).sum();
        eprintln!("{name}: the 1-hour audience counts {total} events");
        runtime.block_on(store.close());
        runtime.block_on(drop_tables(&url, dialect));
    }
}

criterion_group!(benches, store_queries);
criterion_main!(benches);
