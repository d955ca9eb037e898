//! The dashboard in a real browser over a store filled by the real pipeline: events posted to the
//! `collector` binary go through a LocalStack Kinesis stream to a `consumer` process that writes
//! PostgreSQL; a batch is posted twice (the consumer drops the resends) and three poison records
//! go straight into the stream (dead letters). The dashboard is served over that table and the
//! two processes' `/metrics`, and `dashboard/web/test/browser.mjs` (headless Debian chromium,
//! playwright-core) reads the page.
//!
//! Checked: no console error, failed request or HTTP error; every card drawn with data, except
//! the sink errors, which say there were none (and the consumer's metrics agree); every number
//! the page shows equals a SQL count computed here over the same window (events by type and by
//! platform, titles watched now, top titles today, new and returning users, each segment, events
//! stored, dead letters by reason); 100 more events posted while the page is open appear in it
//! without a reload; a range switch; a full-page screenshot (kept at
//! `$CARGO_TARGET_DIR/dashboard-browser.png`).
//!
//! Needs what `dashboard/web/scripts/setup.sh --browser` prepares (scripts/test.sh runs it):
//! `node`, `dashboard/web/node_modules` and `/usr/bin/chromium`. Missing, the test fails and says so.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_sdk_kinesis::primitives::Blob;
use ktk_dashboard::{Dashboard, DashboardConfig, Metrics, ScrapeConfig, Store};
use ktk_tests::collector_support::CollectorProcess;
use ktk_tests::consumer_support::{ConsumerProcess, ConsumerSpec, database_url};
use ktk_tests::{aws_config, create_stream, delete_stream, dynamodb, kinesis, unique_name};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const KEY: &str = "wk_dashboard_test_0123456789abcdef";
const BOUND: Duration = Duration::from_secs(120);

const TYPES: [&str; 8] = [
    "EVENT_TYPE_PLAY",
    "EVENT_TYPE_HEARTBEAT",
    "EVENT_TYPE_HEARTBEAT",
    "EVENT_TYPE_PAUSE",
    "EVENT_TYPE_AD_COMPLETE",
    "EVENT_TYPE_AD_SKIP",
    "EVENT_TYPE_PAGE_VIEW",
    "EVENT_TYPE_PLAY",
];
const PLATFORMS: [&str; 5] = ["PLATFORM_IOS", "PLATFORM_ANDROID", "PLATFORM_ROKU", "PLATFORM_WEB", "PLATFORM_FIRE_TV"];
const TITLES: [(&str, &str); 5] = [
    ("ep-1", "Harbor Lights S1E1"),
    ("ep-2", "Harbor Lights S1E2"),
    ("mv-3", "Paper Moons"),
    ("ep-4", "Kitchen Wars S3E5"),
    ("mv-5", "Northbound"),
];

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_millis() as i64
}

fn web_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("dashboard").join("web")
}

/// Event `i` of a run: users, sessions, platforms, titles and types vary with `i`; it happened
/// `ago_s` seconds ago.
fn event(run: &str, i: usize, ago_s: i64) -> Value {
    let user = i % 37;
    let (content_id, title) = TITLES[(i / 3) % TITLES.len()];
    let mut e = json!({
        "eventId": format!("{run}-{i:05}"),
        "type": TYPES[i % TYPES.len()],
        "occurredAtMs": now_ms() - ago_s * 1000,
        "deviceId": format!("device-{}", i % 53),
        "sessionId": format!("session-{}-{}", user, i / 300),
        "platform": PLATFORMS[(i / 7 + user) % PLATFORMS.len()],
        "contentId": content_id,
        "contentTitle": title,
    });
    // Every eleventh event comes from a device without a user.
    if !i.is_multiple_of(11) {
        e["userId"] = json!(format!("user-{user}"));
    }
    e
}

async fn post_all(collector: &CollectorProcess, events: &[Value]) {
    for chunk in events.chunks(50) {
        let (status, body) = collector.post_batch(KEY, &json!({ "events": chunk })).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["accepted"].as_u64(), Some(chunk.len() as u64), "{body}");
    }
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar::<_, i64>(sql).fetch_one(pool).await.unwrap_or_else(|e| panic!("{sql}: {e}"))
}

async fn wait_for(pool: &PgPool, sql: &str, want: i64) {
    let started = Instant::now();
    loop {
        let got = count(pool, sql).await;
        if got == want {
            return;
        }
        assert!(started.elapsed() < BOUND, "{sql}: {got}, not {want}, after {BOUND:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `SELECT key, count` rows as a map.
async fn counts(pool: &PgPool, sql: &str) -> BTreeMap<String, i64> {
    let rows: Vec<(Option<String>, i64)> =
        sqlx::query_as(sql).fetch_all(pool).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    rows.into_iter().map(|(k, n)| (k.unwrap_or_default(), n)).collect()
}

fn totals(view: &Value, card: &str) -> BTreeMap<String, i64> {
    view["cards"][card]["totals"]
        .as_object()
        .unwrap_or_else(|| panic!("card {card} has no totals: {}", view["cards"][card]))
        .iter()
        .map(|(k, v)| (k.clone(), v.as_i64().expect("a number")))
        .collect()
}

fn titles(view: &Value, list: &str) -> BTreeMap<String, (i64, i64)> {
    view[list]
        .as_array()
        .expect("a list")
        .iter()
        .map(|t| {
            (
                t["title"].as_str().expect("title").to_owned(),
                (t["plays"].as_i64().expect("n"), t["viewers"].as_i64().expect("n")),
            )
        })
        .collect()
}

/// Compares what the page shows with SQL over the page's own window.
async fn check_numbers(pool: &PgPool, t: &str, view: &Value) {
    let (from, to) = (view["window"]["from"].as_i64().expect("from"), view["window"]["to"].as_i64().expect("to"));
    assert_eq!(to - from, 3600, "the default range is an hour");
    let range = format!("occurred_at >= to_timestamp({from}) AND occurred_at < to_timestamp({to})");
    let by_type = counts(pool, &format!("SELECT event_type, count(*) FROM \"{t}\" WHERE {range} GROUP BY 1")).await;
    assert_eq!(totals(view, "by-type"), by_type, "events by type");
    let by_platform = counts(pool, &format!("SELECT platform, count(*) FROM \"{t}\" WHERE {range} GROUP BY 1")).await;
    assert_eq!(totals(view, "by-platform"), by_platform, "events by platform");

    let viewer = "COALESCE(user_id, device_id)";
    let watching = "event_type IN ('EVENT_TYPE_PLAY', 'EVENT_TYPE_HEARTBEAT') AND content_title IS NOT NULL";
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(&format!(
        "SELECT content_title, count(*), count(DISTINCT {viewer}) FROM \"{t}\" WHERE {watching} \
         AND occurred_at >= to_timestamp({}) AND occurred_at < to_timestamp({to}) GROUP BY 1 \
         ORDER BY 3 DESC, 1 LIMIT 10",
        to - 60
    ))
    .fetch_all(pool)
    .await
    .expect("watching now");
    let want: BTreeMap<String, (i64, i64)> = rows.into_iter().map(|(t, n, v)| (t, (n, v))).collect();
    assert_eq!(titles(view, "watching_now"), want, "titles watched now");

    let midnight = to.div_euclid(86400) * 86400;
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(&format!(
        "SELECT content_title, count(*), count(DISTINCT {viewer}) FROM \"{t}\" WHERE event_type = 'EVENT_TYPE_PLAY' \
         AND content_title IS NOT NULL AND occurred_at >= to_timestamp({midnight}) AND occurred_at < to_timestamp({to}) \
         GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 10"
    ))
    .fetch_all(pool)
    .await
    .expect("top titles");
    let want: BTreeMap<String, (i64, i64)> = rows.into_iter().map(|(t, n, v)| (t, (n, v))).collect();
    assert!(!want.is_empty());
    assert_eq!(titles(view, "top_titles"), want, "top titles today");

    let active = count(pool, &format!("SELECT count(DISTINCT user_id) FROM \"{t}\" WHERE {range}")).await;
    let returning = count(
        pool,
        &format!(
            "SELECT count(DISTINCT user_id) FROM \"{t}\" a WHERE {range} AND EXISTS \
             (SELECT 1 FROM \"{t}\" b WHERE b.user_id = a.user_id AND b.occurred_at < to_timestamp({from}))"
        ),
    )
    .await;
    assert!(returning > 0, "some users were seen two hours ago");
    assert_eq!(view["users"], json!({"active": active, "new": active - returning, "returning": returning}), "users");

    // The segments, by the test's own SQL.
    let per_user = |having: &str| {
        format!(
            "SELECT count(*) FROM (SELECT user_id FROM \"{t}\" WHERE {range} AND user_id IS NOT NULL \
             GROUP BY user_id HAVING {having}) u"
        )
    };
    let segments = [
        (
            "binge_watcher",
            format!(
                "SELECT count(DISTINCT user_id) FROM (SELECT user_id, session_id FROM \"{t}\" WHERE {range} \
                 AND event_type = 'EVENT_TYPE_PLAY' AND user_id IS NOT NULL AND content_id IS NOT NULL \
                 GROUP BY 1, 2 HAVING count(DISTINCT content_id) >= 3) s"
            ),
        ),
        (
            "ad_completer",
            per_user(
                "bool_or(event_type = 'EVENT_TYPE_AD_COMPLETE') AND NOT bool_or(event_type = 'EVENT_TYPE_AD_SKIP')",
            ),
        ),
        ("ad_skipper", per_user("bool_or(event_type = 'EVENT_TYPE_AD_SKIP')")),
        ("multi_platform", per_user("count(DISTINCT platform) >= 2")),
    ];
    for (name, sql) in segments {
        let want = count(pool, &sql).await;
        assert_eq!(view["segments"][name]["users"].as_i64(), Some(want), "segment {name}");
        assert!(
            view["segments"][name]["sql"].as_str().is_some_and(|s| s.contains("GROUP BY")),
            "{name}'s SQL is shown"
        );
    }
    let binge = view["segments"]["binge_watcher"]["users"].as_i64().unwrap_or(0);
    assert!(binge > 0, "the traffic has binge watchers");

    let stored_range = format!("stored_at >= to_timestamp({from}) AND stored_at < to_timestamp({to})");
    let stored = count(pool, &format!("SELECT count(*) FROM \"{t}\" WHERE {stored_range}")).await;
    assert_eq!(totals(view, "stored"), BTreeMap::from([("stored".to_owned(), stored)]), "events stored");
    assert_eq!(view["delay"]["events"].as_i64(), Some(stored), "every stored event has a delivery delay");
    let dead = counts(
        pool,
        &format!(
            "SELECT CASE WHEN reason LIKE 'not an events.v1.Event in JSON%' THEN 'bad_json' \
             WHEN reason LIKE 'not an events.v1.Event in protobuf%' THEN 'bad_protobuf' ELSE 'other' END, count(*) \
             FROM \"{t}_dead_letters\" WHERE {stored_range} GROUP BY 1"
        ),
    )
    .await;
    assert_eq!(dead, BTreeMap::from([("bad_json".to_owned(), 1), ("bad_protobuf".to_owned(), 2)]));
    assert_eq!(totals(view, "dead-letters"), dead, "dead letters by reason");
}

fn check_page(view: &Value) {
    let problems = view["problems"].as_array().expect("problems");
    assert!(problems.is_empty(), "the page had errors: {problems:?}");
    let cards = view["cards"].as_object().expect("cards");
    for (name, card) in cards {
        let want = if name == "sink-errors" { "empty" } else { "ready" };
        assert_eq!(card["state"], want, "card {name}: {card}");
        let charted = !matches!(
            name.as_str(),
            "users" | "watching-now" | "top-titles" | "segments-table" | "targets" | "sink-errors"
        );
        if charted {
            assert_eq!(card["canvases"], 1, "card {name} draws one chart: {card}");
        }
    }
    assert!(
        cards["sink-errors"]["message"].as_str().is_some_and(|m| m.contains("No sink error")),
        "{}",
        cards["sink-errors"]
    );
    let legend: Vec<&str> =
        cards["duplicates"]["legend"].as_array().expect("legend").iter().filter_map(Value::as_str).collect();
    assert!(legend.contains(&"resent by clients or producers"), "the resends show as resent: {legend:?}");
    let throughput: Vec<&str> =
        cards["throughput"]["legend"].as_array().expect("legend").iter().filter_map(Value::as_str).collect();
    for line in ["received", "accepted", "delivered"] {
        assert!(throughput.contains(&line), "throughput has {line}: {throughput:?}");
    }
    let targets = view["targets"].as_array().expect("targets");
    assert_eq!(targets.len(), 2);
    assert!(targets.iter().all(|t| t["up"] == true), "{targets:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_in_chromium_shows_what_sql_counts_and_updates_live() {
    let web = web_dir();
    let setup = "run dashboard/web/scripts/setup.sh --browser (scripts/test.sh does)";
    assert!(web.join("node_modules").join("playwright-core").exists(), "playwright-core is missing: {setup}");
    let chromium = std::env::var("KTK_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned());
    assert!(std::path::Path::new(&chromium).exists(), "{chromium} is missing: {setup}");

    let client = kinesis().await;
    let _ = dynamodb().await;
    let aws = aws_config().await;
    let s3 = ktk_pipeline::s3::client(&aws, true);
    let stream = unique_name("ktk-dash");
    let bucket = unique_name("ktk-dash").to_lowercase();
    let table = format!("dash_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    create_stream(&client, &stream, 2).await;
    s3.create_bucket().bucket(&bucket).send().await.expect("create bucket");
    let consumer = ConsumerProcess::spawn(&ConsumerSpec::new(
        &stream,
        &unique_name("ktk-dash-app"),
        "dash-consumer",
        &bucket,
        "dash",
        &table,
    ));
    let keys = std::env::temp_dir().join(format!("{}.json", unique_name("ktk-dash-keys")));
    std::fs::write(&keys, json!({"keys": [{"app_id": "tv-dash", "key": KEY}]}).to_string()).expect("keys file");
    let collector = CollectorProcess::start(&stream, ("KTK_KEYS_FILE", keys.display().to_string()), 3600).await;

    // The traffic: 600 events over the last 5 minutes, 5 users seen two hours ago, one batch sent
    // twice, and three poison records.
    let run = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let events: Vec<Value> = (0..600).map(|i| event(run, i, (i % 290) as i64 + 3)).collect();
    post_all(&collector, &events).await;
    let old: Vec<Value> = (0..5).map(|i| event(&format!("{run}-old"), i * 38 + 1, 7200)).collect();
    post_all(&collector, &old).await;
    post_all(&collector, &events[..50]).await;
    for (n, data) in [&b"{broken json"[..], b"\x08\xff\xff\xff", b"\xff\xfe not protobuf"].iter().enumerate() {
        client
            .put_record()
            .stream_name(&stream)
            .partition_key(format!("poison-{n}"))
            .data(Blob::new(*data))
            .send()
            .await
            .expect("put a poison record");
    }
    let pool = PgPool::connect(&database_url()).await.expect("PostgreSQL");
    wait_for(&pool, &format!("SELECT count(*) FROM \"{table}\""), 605).await;
    wait_for(&pool, &format!("SELECT count(*) FROM \"{table}_dead_letters\""), 3).await;
    let started = Instant::now();
    while consumer.health_count("duplicates").await < 50 {
        assert!(started.elapsed() < BOUND, "the consumer did not drop the 50 resends");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // The dashboard, over the table and both processes' metrics, scraping every second.
    let store = Store::connect_lazy(&database_url(), &table).expect("store");
    let targets = vec![format!("http://127.0.0.1:{}/metrics", consumer.port), collector.metrics_url()];
    let metrics = Metrics::new(ScrapeConfig { targets, interval: Duration::from_secs(1), history: 600 });
    let config = DashboardConfig {
        refresh: Duration::from_secs(1),
        title: "dashboard test".to_owned(),
        day_refresh: Duration::from_secs(1),
    };
    let dashboard = Dashboard::new(store, metrics, config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/", listener.local_addr().expect("address"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(Arc::clone(&dashboard).serve(listener, async move {
        let _ = stopped.await;
    }));
    tokio::time::sleep(Duration::from_secs(3)).await;

    let target_dir =
        std::env::var("CARGO_TARGET_DIR").map_or_else(|_| web.join("..").join("..").join("target"), PathBuf::from);
    let screenshot = target_dir.join("dashboard-browser.png");
    let _ = std::fs::remove_file(&screenshot);
    let mut node = tokio::process::Command::new("node")
        .arg(web.join("test").join("browser.mjs"))
        .current_dir(&web)
        .env("KTK_DASHBOARD_URL", &url)
        .env("KTK_SCREENSHOT", &screenshot)
        .env("KTK_CHROMIUM", &chromium)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run node (install Node.js >= 20)");
    let mut stdin = node.stdin.take().expect("stdin");
    let mut lines = BufReader::new(node.stdout.take().expect("stdout")).lines();
    let mut next = async || -> Value {
        let line = tokio::time::timeout(BOUND, lines.next_line())
            .await
            .expect("the browser script answers in time")
            .expect("read")
            .expect("the browser script ended early");
        let view: Value = serde_json::from_str(&line).expect("a JSON line");
        assert_ne!(view["phase"], "failed", "the browser script failed: {}", view["error"]);
        view
    };

    let loaded = next().await;
    assert_eq!(loaded["phase"], "loaded");
    check_page(&loaded);
    check_numbers(&pool, &table, &loaded).await;
    let before: i64 = totals(&loaded, "by-type").values().sum();
    assert_eq!(before, 600, "the 600 events of the last 5 minutes (the 5 old ones are outside the hour)");

    // 100 more events while the page is open.
    let more: Vec<Value> = (600..700).map(|i| event(run, i, 2)).collect();
    post_all(&collector, &more).await;
    wait_for(&pool, &format!("SELECT count(*) FROM \"{table}\""), 705).await;
    stdin.write_all(format!("{}\n", json!({"total": 700})).as_bytes()).await.expect("tell the script");
    stdin.flush().await.expect("flush");
    let updated = next().await;
    assert_eq!(updated["phase"], "updated");
    assert!(updated["updated"].as_i64() > loaded["updated"].as_i64(), "the page refreshed by itself");
    check_page(&updated);
    check_numbers(&pool, &table, &updated).await;
    println!("dashboard: the page showed the 100 new events {} ms after they were stored", updated["waited_ms"]);

    let done = next().await;
    assert_eq!(done["phase"], "done");
    assert_eq!(done["range"], 900, "the range switched to 15 minutes");
    check_page(&done);
    let status = tokio::time::timeout(BOUND, node.wait()).await.expect("node exits").expect("status");
    assert!(status.success(), "the browser script failed: {status}");
    let png = std::fs::read(&screenshot).expect("the screenshot");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 50_000, "a full-page screenshot: {} bytes", png.len());
    println!("dashboard screenshot: {} ({} bytes)", screenshot.display(), png.len());

    // The consumer's metrics agree that no sink failed (the card said so).
    assert_eq!(consumer.metric("SinkErrors", &[]).await, 0.0);

    let _ = stop.send(());
    server.await.expect("join").expect("serve");
    collector.stop().await;
    consumer.stop(Duration::from_secs(30)).await;
    sqlx::query(&format!("DROP TABLE IF EXISTS \"{table}\", \"{table}_dead_letters\""))
        .execute(&pool)
        .await
        .expect("drop");
    delete_stream(&client, &stream).await;
    let _ = std::fs::remove_file(&keys);
}
