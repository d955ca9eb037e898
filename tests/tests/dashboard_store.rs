//! The dashboard's answers against the real PostgreSQL and MariaDB: a table filled through the
//! pipeline's own sinks with a known set of events and dead letters, then every number of the
//! audience, segments and pipeline panels compared with what a plain Rust computation over the
//! same events gives. And the HTTP side: one computation per refresh however many ask at once, a
//! range outside the offered ones refused, a store that is down reported (503) without stopping
//! the server.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ktk_dashboard::store::{Audience, Chart, SEGMENTS, Segments, StorePipeline};
use ktk_dashboard::{Dashboard, DashboardConfig, Metrics, ScrapeConfig, Store, Window};
use ktk_pipeline::mysql::MySqlSink;
use ktk_pipeline::postgres::PostgresSink;
use ktk_pipeline::{Batch, DeadLetter, EventRecord, Sink};
use ktk_proto::events::v1::{Event, EventType, Platform};
use ktk_tests::consumer_support::database_url;
use ktk_tests::store_support::unique_table;

fn mysql_url() -> String {
    std::env::var("MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".to_owned())
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_millis() as i64
}

/// The fixture: who did what, how many seconds ago.
fn fixture(now_ms: i64) -> Vec<Event> {
    use EventType::*;
    use Platform::*;
    let mut events = Vec::new();
    let mut add = |ty: EventType,
                   user: &str,
                   device: &str,
                   session: &str,
                   platform: Platform,
                   content: (&str, &str),
                   ago_s: i64| {
        let n = events.len();
        events.push(Event {
            event_id: format!("dash-{n:04}"),
            r#type: ty as i32,
            occurred_at_ms: now_ms - ago_s * 1000,
            // Received 150 ms before the write: the delivery delay is that plus the write.
            received_at_ms: now_ms - 150,
            user_id: user.to_owned(),
            device_id: device.to_owned(),
            session_id: session.to_owned(),
            platform: platform as i32,
            content_id: content.0.to_owned(),
            content_title: content.1.to_owned(),
            ..Event::default()
        });
    };
    let (c1, c2, c3) = (("ep-1", "Harbor Lights S1E1"), ("ep-2", "Harbor Lights S1E2"), ("mv-3", "Paper Moons"));
    let none = ("", "");
    // u1: a binge (3 titles in one session) and a completed ad; watching now.
    add(Play, "u1", "d1", "s1", Ios, c1, 1800);
    add(Play, "u1", "d1", "s1", Ios, c2, 1700);
    add(AdComplete, "u1", "d1", "s1", Ios, none, 1650);
    add(Play, "u1", "d1", "s1", Ios, c3, 1600);
    add(Heartbeat, "u1", "d1", "s1", Ios, c3, 20);
    // u2: two platforms, a skipped ad.
    add(Play, "u2", "d2", "s2", Ios, c1, 1500);
    add(AdSkip, "u2", "d2", "s2", Ios, none, 1450);
    add(Play, "u2", "d3", "s3", Web, c2, 1400);
    add(PageView, "u2", "d3", "s3", Web, none, 600);
    // u3: completed and skipped ads (a skipper, not a completer); returning (seen 2 hours ago).
    add(AppOpen, "u3", "d4", "s0", Android, none, 7200);
    add(AdComplete, "u3", "d4", "s4", Android, none, 900);
    add(AdSkip, "u3", "d4", "s4", Android, none, 890);
    add(Play, "u3", "d4", "s4", Android, c1, 880);
    add(Heartbeat, "u3", "d4", "s4", Android, c1, 30);
    // u4: watching c1 now.
    add(Play, "u4", "d5", "s5", Roku, c1, 40);
    add(Heartbeat, "u4", "d5", "s5", Roku, c1, 10);
    // A device without a user: a viewer, not a user.
    add(Play, "", "d6", "s6", Web, c3, 1000);
    add(Heartbeat, "", "d6", "s6", Web, c3, 15);
    // Page views spread over the hour, from several users and platforms.
    let platforms = [Ios, Android, FireTv, Web, SmartTv];
    for i in 0..40_i64 {
        let user = format!("bulk-{}", i % 7);
        let device = format!("bulk-d{}", i % 9);
        add(PageView, &user, &device, "sb", platforms[(i % 5) as usize], none, 60 * i + 5);
    }
    events
}

fn batch(table_stream: &str, events: &[Event], dead_letters: Vec<DeadLetter>) -> Batch {
    let records: Vec<EventRecord> = events
        .iter()
        .enumerate()
        .map(|(n, e)| EventRecord {
            event: e.clone(),
            shard_id: "shardId-000000000000".to_owned(),
            sequence_number: format!("{:056}", n + 1),
            sub_sequence_number: 0,
            arrival: Some(SystemTime::now()),
        })
        .collect();
    Batch {
        stream: table_stream.to_owned(),
        shard_id: "shardId-000000000000".to_owned(),
        first: (records[0].sequence_number.clone(), 0),
        last: (records[records.len() - 1].sequence_number.clone(), 0),
        events: records,
        dead_letters,
    }
}

/// Dead letters with the decoder's reason texts: (reason, how many).
fn dead_letters() -> (Vec<DeadLetter>, BTreeMap<&'static str, f64>) {
    let reasons = [
        ("not an events.v1.Event in JSON: expected value at line 1 column 1", "bad_json", 3),
        ("not an events.v1.Event in protobuf: failed to decode", "bad_protobuf", 2),
        ("the event has no event_id", "no_event_id", 1),
        ("not a valid KPL aggregate, read as a plain record: bad checksum", "bad_aggregate", 1),
    ];
    let mut letters = Vec::new();
    let mut expected = BTreeMap::new();
    for (reason, class, n) in reasons {
        for _ in 0..n {
            letters.push(DeadLetter {
                shard_id: "shardId-000000000000".to_owned(),
                sequence_number: format!("9{:055}", letters.len()),
                sub_sequence_number: 0,
                partition_key: "pk".to_owned(),
                data: Bytes::from_static(b"\xff\x00 not an event"),
                reason: reason.to_owned(),
                arrival: Some(SystemTime::now()),
            });
        }
        *expected.entry(class).or_default() += n as f64;
    }
    (letters, expected)
}

fn in_window(ms: i64, from: i64, to: i64) -> bool {
    ms >= from * 1000 && ms < to * 1000
}

fn bucket_of(ms: i64, step: i64) -> i64 {
    ms.div_euclid(step * 1000) * step
}

fn type_name(e: &Event) -> String {
    EventType::try_from(e.r#type).expect("type").as_str_name().to_owned()
}

fn platform_name(e: &Event) -> String {
    Platform::try_from(e.platform).expect("platform").as_str_name().to_owned()
}

fn viewer(e: &Event) -> String {
    if e.user_id.is_empty() { e.device_id.clone() } else { e.user_id.clone() }
}

fn watching(e: &Event) -> bool {
    matches!(EventType::try_from(e.r#type), Ok(EventType::Play | EventType::Heartbeat))
}

/// The chart as {line: {bucket: value}} with the zero buckets left out.
fn chart_map(chart: &Chart) -> BTreeMap<String, BTreeMap<i64, f64>> {
    chart
        .series
        .iter()
        .map(|s| {
            let values = chart.times.iter().zip(&s.values).filter(|(_, v)| **v != 0.0).map(|(t, v)| (*t, *v)).collect();
            (s.name.clone(), values)
        })
        .filter(|(_, values): &(String, BTreeMap<i64, f64>)| !values.is_empty())
        .collect()
}

fn count_by(
    events: &[&Event],
    window: &Window,
    key: impl Fn(&Event) -> String,
) -> BTreeMap<String, BTreeMap<i64, f64>> {
    let mut out: BTreeMap<String, BTreeMap<i64, f64>> = BTreeMap::new();
    for e in events {
        *out.entry(key(e)).or_default().entry(bucket_of(e.occurred_at_ms, window.step)).or_default() += 1.0;
    }
    out
}

fn check_audience(events: &[Event], a: &Audience) {
    let w = a.window;
    assert_eq!(w.to - w.from, 3600);
    let inside: Vec<&Event> = events.iter().filter(|e| in_window(e.occurred_at_ms, w.from, w.to)).collect();
    assert_eq!(inside.len(), events.len() - 1, "all but the event two hours ago are in the last hour");
    assert_eq!(chart_map(&a.by_type), count_by(&inside, &w, type_name), "events by type");
    assert_eq!(chart_map(&a.by_platform), count_by(&inside, &w, platform_name), "events by platform");
    let total: f64 = a.by_type.series.iter().map(|s| s.total).sum();
    assert_eq!(total, inside.len() as f64);

    let mut viewers: BTreeMap<i64, BTreeSet<String>> = BTreeMap::new();
    for e in inside.iter().filter(|e| watching(e)) {
        viewers.entry(bucket_of(e.occurred_at_ms, w.step)).or_default().insert(viewer(e));
    }
    let expected: BTreeMap<i64, f64> = viewers.iter().map(|(b, v)| (*b, v.len() as f64)).collect();
    assert_eq!(chart_map(&a.viewers).remove("viewers").unwrap_or_default(), expected, "viewers per bucket");

    // Watching now: distinct viewers with a play or heartbeat in the last minute, per title.
    let mut now: BTreeMap<String, (i64, BTreeSet<String>)> = BTreeMap::new();
    for e in events.iter().filter(|e| watching(e) && in_window(e.occurred_at_ms, w.to - 60, w.to)) {
        let entry = now.entry(e.content_title.clone()).or_default();
        entry.0 += 1;
        entry.1.insert(viewer(e));
    }
    let got: BTreeMap<String, (i64, i64)> =
        a.watching_now.iter().map(|t| (t.title.clone(), (t.plays, t.viewers))).collect();
    let want: BTreeMap<String, (i64, i64)> = now.iter().map(|(t, (n, v))| (t.clone(), (*n, v.len() as i64))).collect();
    assert_eq!(got, want, "watching now");
    assert_eq!(want.get("Harbor Lights S1E1"), Some(&(3, 2)), "u3 and u4 watch S1E1 now");
    assert!(a.watching_now.windows(2).all(|p| p[0].viewers >= p[1].viewers), "ranked by viewers");

    // Top titles today: plays since midnight UTC.
    let midnight = w.to.div_euclid(86400) * 86400;
    let mut top: BTreeMap<String, (i64, BTreeSet<String>)> = BTreeMap::new();
    for e in events.iter().filter(|e| e.r#type == EventType::Play as i32 && in_window(e.occurred_at_ms, midnight, w.to))
    {
        let entry = top.entry(e.content_title.clone()).or_default();
        entry.0 += 1;
        entry.1.insert(viewer(e));
    }
    let got: BTreeMap<String, (i64, i64)> =
        a.top_titles_today.iter().map(|t| (t.title.clone(), (t.plays, t.viewers))).collect();
    let want: BTreeMap<String, (i64, i64)> = top.iter().map(|(t, (n, v))| (t.clone(), (*n, v.len() as i64))).collect();
    assert_eq!(got, want, "top titles today");
    assert!(a.top_titles_today.windows(2).all(|p| p[0].plays >= p[1].plays), "ranked by plays");

    // Users: identified users active in the window; returning when seen before it.
    let active: BTreeSet<&str> = inside.iter().filter(|e| !e.user_id.is_empty()).map(|e| e.user_id.as_str()).collect();
    let returning =
        active.iter().filter(|u| events.iter().any(|e| e.user_id == **u && e.occurred_at_ms < w.from * 1000)).count()
            as i64;
    assert_eq!(
        (a.users.active, a.users.returning, a.users.new),
        (active.len() as i64, returning, active.len() as i64 - returning)
    );
    assert_eq!(returning, 1, "u3 was seen two hours ago");
}

/// Users in each segment over `events` (already restricted to a window).
fn segment_users(events: &[&Event]) -> BTreeMap<&'static str, BTreeSet<String>> {
    let mut per_user: BTreeMap<String, (BTreeSet<String>, i64, i64)> = BTreeMap::new();
    let mut sessions: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for e in events.iter().filter(|e| !e.user_id.is_empty()) {
        let entry = per_user.entry(e.user_id.clone()).or_default();
        entry.0.insert(platform_name(e));
        entry.1 += i64::from(e.r#type == EventType::AdComplete as i32);
        entry.2 += i64::from(e.r#type == EventType::AdSkip as i32);
        if e.r#type == EventType::Play as i32 && !e.content_id.is_empty() {
            sessions.entry((e.user_id.clone(), e.session_id.clone())).or_default().insert(e.content_id.clone());
        }
    }
    let mut out: BTreeMap<&'static str, BTreeSet<String>> =
        SEGMENTS.iter().map(|(n, _)| (*n, BTreeSet::new())).collect();
    for ((user, _), titles) in &sessions {
        if titles.len() >= 3 {
            out.get_mut("binge_watcher").expect("segment").insert(user.clone());
        }
    }
    for (user, (platforms, completes, skips)) in &per_user {
        if *completes > 0 && *skips == 0 {
            out.get_mut("ad_completer").expect("segment").insert(user.clone());
        }
        if *skips > 0 {
            out.get_mut("ad_skipper").expect("segment").insert(user.clone());
        }
        if platforms.len() >= 2 {
            out.get_mut("multi_platform").expect("segment").insert(user.clone());
        }
    }
    out
}

fn check_segments(events: &[Event], s: &Segments) {
    let w = s.window;
    let inside: Vec<&Event> = events.iter().filter(|e| in_window(e.occurred_at_ms, w.from, w.to)).collect();
    let want = segment_users(&inside);
    let got: BTreeMap<&str, i64> = s.segments.iter().map(|seg| (seg.name, seg.users)).collect();
    let want_counts: BTreeMap<&str, i64> = want.iter().map(|(n, u)| (*n, u.len() as i64)).collect();
    assert_eq!(got, want_counts, "segment sizes over the window");
    assert_eq!(want_counts["binge_watcher"], 1);
    assert_eq!(want_counts["ad_completer"], 1);
    assert_eq!(want_counts["ad_skipper"], 2);
    assert!(want_counts["multi_platform"] >= 1);
    for seg in &s.segments {
        assert!(seg.sql.contains("occurred_at") && seg.sql.contains("GROUP BY"), "{}: {}", seg.name, seg.sql);
    }
    // Per bucket: the same definitions over each bucket's events.
    let mut per_bucket: BTreeMap<String, BTreeMap<i64, f64>> = BTreeMap::new();
    for bucket in w.buckets() {
        let events: Vec<&Event> =
            inside.iter().copied().filter(|e| bucket_of(e.occurred_at_ms, w.step) == bucket).collect();
        for (name, users) in segment_users(&events) {
            if !users.is_empty() {
                per_bucket.entry(name.to_owned()).or_default().insert(bucket, users.len() as f64);
            }
        }
    }
    assert_eq!(chart_map(&s.chart), per_bucket, "segments per bucket");
}

fn check_pipeline(events: &[Event], expected_dead: &BTreeMap<&str, f64>, p: &StorePipeline) {
    let stored: f64 = p.stored.series.iter().map(|s| s.total).sum();
    assert_eq!(stored, events.len() as f64, "every event was stored within the window");
    assert_eq!(p.delay.events, events.len() as i64);
    let p50 = p.delay.overall_p50.expect("p50");
    let p99 = p.delay.overall_p99.expect("p99");
    assert!((100.0..60_000.0).contains(&p50) && p99 >= p50, "delay p50 {p50} p99 {p99}");
    let got: BTreeMap<&str, f64> = p.dead_letters.series.iter().map(|s| (s.name.as_str(), s.total)).collect();
    assert_eq!(&got, expected_dead, "dead letters by reason");
}

async fn fill(sink: &dyn Sink, stream: &str) -> (Vec<Event>, BTreeMap<&'static str, f64>) {
    let events = fixture(now_ms());
    let (letters, expected) = dead_letters();
    let report = sink.write(&batch(stream, &events, letters)).await.expect("write the fixture");
    assert_eq!(report.written, events.len() as u64);
    (events, expected)
}

async fn check_store(store: &Store, events: &[Event], dead: &BTreeMap<&str, f64>) {
    // As the server does: windows end with the current second.
    let now = now_ms() / 1000 + 1;
    let audience = store.audience(&Window::ending(now, 3600, 60)).await.expect("audience");
    check_audience(events, &audience);
    let segments = store.segments(&Window::ending(now, 3600, 300)).await.expect("segments");
    check_segments(events, &segments);
    let pipeline = store.pipeline(&Window::ending(now, 3600, 60)).await.expect("pipeline");
    check_pipeline(events, dead, &pipeline);
    // A range with nothing in it (a day ahead) answers with empty charts, not an error.
    let later = store.audience(&Window::ending(now + 3 * 86400, 900, 60)).await.expect("empty audience");
    assert!(later.by_type.series.is_empty() && later.watching_now.is_empty() && later.users.active == 0);
}

#[tokio::test]
async fn postgres_answers_equal_a_computation_over_the_same_events() {
    let table = unique_table("dash");
    let sink = PostgresSink::connect(&database_url(), &table).await.expect("PostgreSQL (localstack/databases.sh)");
    sink.migrate().await.expect("migrate");
    let (events, dead) = fill(&sink, "dash").await;
    let store = Store::connect_lazy(&database_url(), &table).expect("store");
    check_store(&store, &events, &dead).await;
    // The dashboard's connections are read-only.
    let error = sqlx_write_attempt(&store).await;
    assert!(error.contains("read-only"), "{error}");
}

async fn sqlx_write_attempt(store: &Store) -> String {
    // Through the dashboard's own pool: the only way to try a write with its sessions' settings.
    match store.execute_for_test(&format!("DELETE FROM {}", store.table())).await {
        Ok(()) => "the DELETE went through".to_owned(),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn mysql_answers_equal_a_computation_over_the_same_events() {
    let table = unique_table("dash");
    let sink = MySqlSink::connect(&mysql_url(), &table).await.expect("MariaDB (localstack/databases.sh)");
    sink.migrate().await.expect("migrate");
    let (events, dead) = fill(&sink, "dash").await;
    let store = Store::connect_lazy(&mysql_url(), &table).expect("store");
    check_store(&store, &events, &dead).await;
    let error = sqlx_write_attempt(&store).await;
    assert!(error.to_lowercase().contains("read"), "{error}");
}

#[tokio::test]
async fn the_server_computes_each_answer_once_per_refresh_and_survives_a_dead_store() {
    let table = unique_table("dash");
    let sink = PostgresSink::connect(&database_url(), &table).await.expect("PostgreSQL (localstack/databases.sh)");
    sink.migrate().await.expect("migrate");
    fill(&sink, "dash").await;
    let store = Store::connect_lazy(&database_url(), &table).expect("store");
    let config = DashboardConfig {
        refresh: Duration::from_secs(60),
        title: "test".to_owned(),
        day_refresh: Duration::from_secs(60),
    };
    let dashboard = Dashboard::new(store, Metrics::new(ScrapeConfig::default()), config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("address"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(Arc::clone(&dashboard).serve(listener, async move {
        let _ = stopped.await;
    }));
    let client = reqwest::Client::new();
    // 200 viewers at once: one computation.
    let requests = (0..200).map(|_| client.get(format!("{base}/api/audience?range=3600")).send());
    let answers = futures::future::join_all(requests).await;
    for answer in answers {
        let answer = answer.expect("answer");
        assert_eq!(answer.status(), 200);
    }
    assert_eq!(dashboard.computed(), 1, "200 requests within one refresh are one computation");
    let page = client.get(format!("{base}/")).send().await.expect("page");
    assert_eq!(page.status(), 200);
    assert!(page.text().await.expect("html").contains("/assets/dashboard.js"));
    let bad = client.get(format!("{base}/api/segments?range=999999")).send().await.expect("bad range");
    assert_eq!(bad.status(), 400);
    let _ = stop.send(());
    server.await.expect("join").expect("serve");

    // A store that does not answer: the API says so (503 with the reason) and the server stays up.
    let dead = Store::connect_lazy("postgres://postgres@127.0.0.1:1/test", &table).expect("store");
    let dashboard = Dashboard::new(dead, Metrics::new(ScrapeConfig::default()), DashboardConfig::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("address"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(Arc::clone(&dashboard).serve(listener, async move {
        let _ = stopped.await;
    }));
    let answer = client.get(format!("{base}/api/audience?range=900")).send().await.expect("answer");
    assert_eq!(answer.status(), 503);
    let body: serde_json::Value = answer.json().await.expect("json");
    assert!(body["error"].as_str().is_some_and(|e| e.contains("127.0.0.1:1")), "{body}");
    let pipeline: serde_json::Value =
        client.get(format!("{base}/api/pipeline?range=900")).send().await.expect("answer").json().await.expect("json");
    assert!(pipeline["store_error"].as_str().is_some(), "{pipeline}");
    assert_eq!(client.get(format!("{base}/healthz")).send().await.expect("health").status(), 200);
    let _ = stop.send(());
    server.await.expect("join").expect("serve");
}
