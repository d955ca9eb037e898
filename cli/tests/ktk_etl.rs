//! `ktk etl` against LocalStack S3, with events delivered by the real pipeline (the producer, an
//! 2-shard Kinesis stream and a `consumer` process writing Parquet to S3 and rows to PostgreSQL):
//! every shipped job's output equals the same aggregates computed here, in Rust, from the store's
//! rows; two runs make the same bytes; a second run does nothing; v2 is written beside v1 and v1
//! is untouched; a late object makes the day stale and the rerun says what changed; a backfill
//! resumes; dead letters are reported by reason. And runs killed (SIGKILL) at every step and at
//! random moments leave the old partition or the new one, never a mix, and nothing visible behind.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::process::Stdio;
use std::time::{Duration, Instant};

use aws_sdk_s3::Client as S3;
use ktk_etl::output::Value;
use ktk_etl::store::Layout;
use ktk_etl::{Day, Etl, EtlConfig};
use ktk_pipeline::s3::{S3Sink, S3SinkConfig};
use ktk_pipeline::{Batch, EventRecord};
use ktk_producer::{Producer, ProducerConfig, Record};
use ktk_proto::events::v1::{Event, EventType, Platform};
use ktk_tests::consumer_support::{ConsumerProcess, ConsumerSpec, database_url};
use ktk_tests::{aws_config, child_aws_env, create_stream, delete_stream, kinesis, unique_name};
use prost::Message as _;
use serde_json::Value as Json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const DAY_A: &str = "2026-03-01";
const DAY_B: &str = "2026-03-02";
const JOBS: [&str; 4] = ["plays_per_title", "daily_active_users", "ad_completion", "user_segments"];

fn day(text: &str) -> Day {
    text.parse().expect("day")
}

fn ktk() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ktk"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("KTK_") {
            command.env_remove(name);
        }
    }
    command.envs(child_aws_env()).env("KTK_S3_PATH_STYLE", "true").kill_on_drop(true);
    command
}

/// Runs `ktk etl <args>` to the end: (exit code, stdout, stderr).
async fn etl(args: &[&str]) -> (i32, String, String) {
    let output = ktk().arg("etl").args(args).output().await.expect("run ktk");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `ktk etl run --json` that must succeed: its JSON outcome.
async fn run(place: &[&str], job: &str, day: &str, extra: &[&str]) -> Json {
    let mut args = vec!["run", "--json", "--job", job, "--date", day];
    args.extend_from_slice(place);
    args.extend_from_slice(extra);
    let (code, stdout, stderr) = etl(&args).await;
    assert_eq!(code, 0, "ktk etl {args:?} failed: {stderr}");
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("JSON outcome ({e}): {stdout}"))
}

fn etl_lib(s3: &S3, bucket: &str, prefix: &str, derived: Option<&str>) -> Etl {
    Etl::new(s3.clone(), EtlConfig::new(Layout::new(bucket, prefix, derived)))
}

async fn rows(etl: &Etl, job: &str, version: u32, day: &str) -> Vec<Vec<Value>> {
    etl.read_partition(job, version, self::day(day)).await.expect("read partition").expect("committed").2
}

fn text(v: &str) -> Value {
    Value::Text(v.to_owned())
}

// --- the scenario's events ----------------------------------------------------------------------

const PLATFORMS: [Platform; 4] = [Platform::Ios, Platform::Roku, Platform::Web, Platform::FireTv];

/// The events of a day: 60 users, each with plays (users divisible by 4 play 3 titles in one
/// session: binge watchers), ads (divisible by 3 complete one, by 7 skip one), page views and
/// heartbeats; users divisible by 5 also use a second platform. `tag` keeps ids unique.
fn day_events(day: &str, tag: &str, users: std::ops::Range<u32>) -> Vec<Event> {
    let start = self::day(day).days() * 86_400_000;
    let mut events = Vec::new();
    let mut push = |user: u32, kind: EventType, platform: Platform, session: u32, title: Option<u32>| {
        let n = events.len() as i64;
        events.push(Event {
            event_id: format!("{tag}-{day}-{n:05}"),
            r#type: kind as i32,
            occurred_at_ms: start + 3_600_000 * i64::from(user % 20) + n * 1_000,
            user_id: format!("user-{user}"),
            device_id: format!("device-{user}-{}", platform as i32),
            session_id: format!("session-{day}-{user}-{session}"),
            platform: platform as i32,
            content_id: title.map(|t| format!("title-{t}")).unwrap_or_default(),
            content_title: title.map(|t| format!("Title {t}")).unwrap_or_default(),
            ..Event::default()
        });
    };
    for user in users {
        let platform = PLATFORMS[(user % 4) as usize];
        push(user, EventType::AppOpen, platform, 0, None);
        push(user, EventType::PageView, platform, 0, None);
        let titles = if user % 4 == 0 { 3 } else { 1 + user % 2 };
        for t in 0..titles {
            let title = (user + t) % 9;
            push(user, EventType::Play, platform, 0, Some(title));
            push(user, EventType::Heartbeat, platform, 0, Some(title));
            if (user + t) % 2 == 0 {
                push(user, EventType::Complete, platform, 0, Some(title));
            }
        }
        if user % 3 == 0 {
            push(user, EventType::AdStart, platform, 1, Some(1));
            push(user, EventType::AdImpression, platform, 1, Some(1));
            push(user, EventType::AdComplete, platform, 1, Some(1));
        }
        if user % 7 == 0 {
            push(user, EventType::AdStart, platform, 1, Some(2));
            push(user, EventType::AdSkip, platform, 1, Some(2));
        }
        if user % 5 == 0 {
            let other = PLATFORMS[((user + 1) % 4) as usize];
            push(user, EventType::Play, other, 2, Some(8));
        }
    }
    events
}

// --- the same aggregates, computed here from the store's rows -------------------------------------

#[derive(Debug, Clone)]
struct Row {
    kind: String,
    user: String,
    device: String,
    session: String,
    platform: String,
    content: String,
    title: String,
}

async fn store_rows(pool: &sqlx::PgPool, table: &str, day: &str) -> Vec<Row> {
    let sql = format!(
        "SELECT coalesce(event_type, ''), coalesce(user_id, ''), coalesce(device_id, ''), coalesce(session_id, ''), \
         coalesce(platform, ''), coalesce(content_id, ''), coalesce(content_title, '') FROM \"{table}\" \
         WHERE (occurred_at AT TIME ZONE 'UTC')::date = $1::date"
    );
    let rows: Vec<(String, String, String, String, String, String, String)> =
        sqlx::query_as(&sql).bind(day).fetch_all(pool).await.expect("store rows");
    rows.into_iter()
        .map(|(kind, user, device, session, platform, content, title)| Row {
            kind,
            user,
            device,
            session,
            platform,
            content,
            title,
        })
        .collect()
}

/// Per title: its greatest name, plays, completes, viewers, devices.
type TitleCounts = (Option<String>, i64, i64, BTreeSet<String>, BTreeSet<String>);

fn expected_plays(rows: &[Row]) -> Vec<Vec<Value>> {
    let mut titles: BTreeMap<String, TitleCounts> = BTreeMap::new();
    for r in rows.iter().filter(|r| !r.content.is_empty()) {
        let is_play = r.kind == "EVENT_TYPE_PLAY";
        if !is_play && r.kind != "EVENT_TYPE_COMPLETE" {
            continue;
        }
        let entry = titles.entry(r.content.clone()).or_default();
        if !r.title.is_empty() && entry.0.as_ref().is_none_or(|t| r.title > *t) {
            entry.0 = Some(r.title.clone());
        }
        if is_play {
            entry.1 += 1;
            entry.3.insert(r.user.clone());
            entry.4.insert(r.device.clone());
        } else {
            entry.2 += 1;
        }
    }
    titles
        .into_iter()
        .map(|(id, (title, plays, completes, users, devices))| {
            vec![
                text(&id),
                title.map_or(Value::Null, Value::Text),
                Value::Int(plays),
                Value::Int(completes),
                Value::Int(users.len() as i64),
                Value::Int(devices.len() as i64),
            ]
        })
        .collect()
}

fn expected_dau(rows: &[Row], with_sessions: bool) -> Vec<Vec<Value>> {
    let mut groups: BTreeMap<String, Vec<&Row>> = BTreeMap::new();
    for r in rows {
        groups.entry(r.platform.clone()).or_default().push(r);
        groups.entry("ALL".into()).or_default().push(r);
    }
    groups
        .into_iter()
        .map(|(platform, rows)| {
            let distinct = |f: fn(&Row) -> &str| {
                rows.iter().map(|r| f(r)).filter(|v| !v.is_empty()).collect::<BTreeSet<_>>().len() as i64
            };
            let mut row = vec![text(&platform), Value::Int(distinct(|r| &r.user)), Value::Int(distinct(|r| &r.device))];
            if with_sessions {
                row.push(Value::Int(distinct(|r| &r.session)));
            }
            row.push(Value::Int(rows.len() as i64));
            row
        })
        .collect()
}

fn expected_ads(rows: &[Row]) -> Vec<Vec<Value>> {
    let kinds = [
        "EVENT_TYPE_AD_START",
        "EVENT_TYPE_AD_COMPLETE",
        "EVENT_TYPE_AD_SKIP",
        "EVENT_TYPE_AD_IMPRESSION",
        "EVENT_TYPE_AD_CLICK",
    ];
    let mut platforms: BTreeMap<String, [i64; 5]> = BTreeMap::new();
    for r in rows {
        if let Some(i) = kinds.iter().position(|k| *k == r.kind) {
            platforms.entry(r.platform.clone()).or_default()[i] += 1;
        }
    }
    let rate = |part: i64, of: i64| {
        if of > 0 { Value::Double(((part as f64 / of as f64) * 10_000.0).round() / 10_000.0) } else { Value::Null }
    };
    platforms
        .into_iter()
        .map(|(platform, c)| {
            vec![
                text(&platform),
                Value::Int(c[0]),
                Value::Int(c[1]),
                Value::Int(c[2]),
                Value::Int(c[3]),
                Value::Int(c[4]),
                rate(c[1], c[0]),
                rate(c[2], c[0]),
            ]
        })
        .collect()
}

fn expected_segments(rows: &[Row]) -> Vec<Vec<Value>> {
    let mut platforms: HashMap<&str, BTreeSet<&str>> = HashMap::new();
    let mut completes: HashMap<&str, i64> = HashMap::new();
    let mut skips: HashMap<&str, i64> = HashMap::new();
    let mut session_titles: HashMap<(&str, &str), BTreeSet<&str>> = HashMap::new();
    for r in rows.iter().filter(|r| !r.user.is_empty()) {
        platforms.entry(&r.user).or_default().insert(&r.platform);
        *completes.entry(&r.user).or_default() += i64::from(r.kind == "EVENT_TYPE_AD_COMPLETE");
        *skips.entry(&r.user).or_default() += i64::from(r.kind == "EVENT_TYPE_AD_SKIP");
        if r.kind == "EVENT_TYPE_PLAY" && !r.content.is_empty() {
            session_titles.entry((&r.user, &r.session)).or_default().insert(&r.content);
        }
    }
    let mut segments: BTreeSet<(String, String)> = BTreeSet::new();
    for ((user, _), titles) in &session_titles {
        if titles.len() >= 3 {
            segments.insert(("binge_watcher".into(), (*user).into()));
        }
    }
    for (user, set) in &platforms {
        if completes[user] > 0 && skips[user] == 0 {
            segments.insert(("ad_completer".into(), (*user).into()));
        }
        if skips[user] > 0 {
            segments.insert(("ad_skipper".into(), (*user).into()));
        }
        if set.len() >= 2 {
            segments.insert(("multi_platform".into(), (*user).into()));
        }
    }
    segments.into_iter().map(|(s, u)| vec![Value::Text(s), Value::Text(u)]).collect()
}

async fn check_against_store(etl: &Etl, pool: &sqlx::PgPool, table: &str, day: &str) {
    let store = store_rows(pool, table, day).await;
    assert!(!store.is_empty(), "the store has events of {day}");
    assert_eq!(rows(etl, "plays_per_title", 1, day).await, expected_plays(&store), "plays_per_title {day}");
    assert_eq!(
        rows(etl, "daily_active_users", 1, day).await,
        expected_dau(&store, false),
        "daily_active_users v1 {day}"
    );
    assert_eq!(rows(etl, "ad_completion", 1, day).await, expected_ads(&store), "ad_completion {day}");
    let segments = rows(etl, "user_segments", 1, day).await;
    assert_eq!(segments, expected_segments(&store), "user_segments {day}");
    for segment in ["binge_watcher", "ad_completer", "ad_skipper", "multi_platform"] {
        assert!(segments.iter().any(|r| r[0] == text(segment)), "the scenario has {segment}s on {day}");
    }
}

// --- delivery through the real pipeline -------------------------------------------------------------

struct Pipeline {
    stream: String,
    app: String,
    bucket: String,
    table: String,
    producer: Producer,
    kinesis: aws_sdk_kinesis::Client,
}

impl Pipeline {
    fn consumer(&self, worker: &str) -> ConsumerProcess {
        ConsumerProcess::spawn(&ConsumerSpec::new(&self.stream, &self.app, worker, &self.bucket, "raw", &self.table))
    }

    /// Puts the events (and each `dup_every`-th again) and the poison records, then waits until
    /// a consumer process has stored `total_unique` events in all, and stops it (SIGTERM flushes
    /// its S3 batches).
    async fn deliver(
        &self,
        events: &[Event],
        dup_every: usize,
        poison: &[&[u8]],
        pool: &sqlx::PgPool,
        total_unique: i64,
        worker: &str,
    ) {
        let consumer = self.consumer(worker);
        let mut receipts = Vec::new();
        for (i, event) in events.iter().enumerate() {
            let bytes = event.encode_to_vec();
            receipts.push(self.producer.put(Record::new(event.user_id.clone(), bytes.clone())).await.expect("put"));
            if dup_every > 0 && i % dup_every == 0 {
                receipts.push(self.producer.put(Record::new(event.user_id.clone(), bytes)).await.expect("put"));
            }
        }
        for data in poison {
            receipts.push(self.producer.put(Record::new("poison", data.to_vec())).await.expect("put"));
        }
        for receipt in receipts {
            receipt.await.expect("acknowledged");
        }
        // Delivered to every sink (the S3 batches too) before the stop: a batch still open at a
        // stop is left to the next owner of the shard, not written.
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let count: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM \"{}\"", self.table))
                .fetch_one(pool)
                .await
                .unwrap_or(0);
            let delivered = consumer.health_count("events_delivered").await;
            if count >= total_unique && delivered >= events.len() as u64 {
                assert_eq!(count, total_unique, "the store holds each event once");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "delivery stalled at {count} of {total_unique} in the store, {delivered} delivered by {worker}"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        consumer.stop(Duration::from_secs(60)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daily_jobs_over_events_delivered_by_the_pipeline() {
    let kinesis = kinesis().await;
    let aws = aws_config().await;
    let s3 = ktk_pipeline::s3::client(&aws, true);
    let stream = unique_name("ktk-etl");
    let bucket = unique_name("ktk-etl").to_lowercase();
    let table = format!("etl_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    create_stream(&kinesis, &stream, 2).await;
    s3.create_bucket().bucket(&bucket).send().await.expect("create bucket");
    let producer = Producer::new(ProducerConfig::new(&stream).with_request_timeout(Duration::from_secs(60)), &aws)
        .await
        .expect("producer");
    let pipeline = Pipeline {
        stream: stream.clone(),
        app: unique_name("ktk-etl-app"),
        bucket: bucket.clone(),
        table: table.clone(),
        producer,
        kinesis,
    };
    let pool = sqlx::PgPool::connect(&database_url()).await.expect("PostgreSQL");

    // Two days of events, 1 in 25 put twice, and three records that are not events.
    let mut events = day_events(DAY_A, "a", 0..60);
    events.extend(day_events(DAY_B, "b", 20..70));
    let poison: [&[u8]; 3] = [b"\xff\xff\xff not protobuf", b"{\"eventId\": 7", b"\x0a\x00"];
    pipeline.deliver(&events, 25, &poison, &pool, events.len() as i64, "etl-a").await;

    let place = ["--bucket", bucket.as_str(), "--prefix", "raw"];
    let etl_lib = etl_lib(&s3, &bucket, "raw", None);

    // Every job, first run: computed from every events object of the day.
    let inputs_a = etl_lib.inputs(day(DAY_A)).await.expect("inputs");
    assert!(!inputs_a.is_empty(), "the sink wrote objects for {DAY_A}");
    let mut first = HashMap::new();
    for job in JOBS {
        let outcome = run(&place, job, DAY_A, &["--version", "1"]).await;
        assert_eq!(outcome["outcome"], "computed", "{job}: {outcome}");
        assert_eq!(outcome["first"], true);
        let manifest = &outcome["manifest"];
        assert_eq!(manifest["inputs"].as_array().map(Vec::len), Some(inputs_a.len()));
        assert_eq!(manifest["input_events"], events.iter().filter(|e| e.event_id.contains(DAY_A)).count() as u64);
        first.insert(job, manifest.clone());
    }
    check_against_store(&etl_lib, &pool, &table, DAY_A).await;

    // Idempotent: the same inputs and version do nothing.
    for job in JOBS {
        let outcome = run(&place, job, DAY_A, &["--version", "1"]).await;
        assert_eq!(outcome["outcome"], "up_to_date", "{job}: {outcome}");
    }
    // Deterministic: computed again (--force, and from scratch under another prefix), the same bytes.
    let (code, _, stderr) = etl(&[
        "backfill",
        "--job",
        "plays_per_title",
        "--version",
        "1",
        "--from",
        DAY_A,
        "--to",
        DAY_A,
        "--bucket",
        &bucket,
        "--prefix",
        "raw",
        "--derived-prefix",
        "again",
    ])
    .await;
    assert_eq!(code, 0, "{stderr}");
    for job in JOBS {
        let forced = run(&place, job, DAY_A, &["--version", "1", "--force"]).await;
        assert_eq!(forced["outcome"], "computed");
        assert_eq!(forced["manifest"]["output"], first[job]["output"], "{job}: same key, size and SHA-256");
    }
    let again = etl_lib_again(&s3, &bucket).await;
    assert_eq!(
        again["output"]["sha256"], first["plays_per_title"]["output"]["sha256"],
        "a fresh computation makes the same bytes"
    );

    // Versions: v2 of daily_active_users beside v1; v1 untouched.
    let v1_manifest =
        s3_bytes(&s3, &bucket, &format!("raw/derived/daily_active_users/v=1/dt={DAY_A}/_manifest.json")).await;
    let v2 = run(&place, "daily_active_users", DAY_A, &[]).await;
    assert_eq!(v2["manifest"]["version"], 2);
    assert_eq!(
        rows(&etl_lib, "daily_active_users", 2, DAY_A).await,
        expected_dau(&store_rows(&pool, &table, DAY_A).await, true)
    );
    assert_eq!(
        s3_bytes(&s3, &bucket, &format!("raw/derived/daily_active_users/v=1/dt={DAY_A}/_manifest.json")).await,
        v1_manifest
    );
    assert!(
        s3_bytes_opt(&s3, &bucket, first["daily_active_users"]["output"]["key"].as_str().expect("key")).await.is_some()
    );

    // Dead letters: reported by reason, on the day they arrived.
    let today = ktk_pipeline::time::date_and_hour(ktk_pipeline::time::unix_millis(std::time::SystemTime::now())).0;
    let (code, stdout, stderr) =
        etl(&["dead-letters", "--json", "--date", &today, "--bucket", &bucket, "--prefix", "raw"]).await;
    assert_eq!(code, 0, "{stderr}");
    let report: Json = serde_json::from_str(stdout.trim()).expect("report");
    assert_eq!(report["dead_letters"], 3, "{report}");
    let counted: u64 =
        report["reasons"].as_array().expect("reasons").iter().map(|r| r["count"].as_u64().unwrap_or(0)).sum();
    assert_eq!(counted, 3);
    assert!(
        report["reasons"]
            .as_array()
            .expect("reasons")
            .iter()
            .any(|r| r["class"].as_str().is_some_and(|c| c.contains("protobuf"))),
        "{report}"
    );

    // Late data: more events of day A arrive; status says stale; the rerun says what changed.
    let late = day_events(DAY_A, "late", 100..112);
    let total = (events.len() + late.len()) as i64;
    pipeline.deliver(&late, 0, &[], &pool, total, "etl-b").await;
    let (code, stdout, stderr) =
        etl(&["status", "--json", "--job", "plays_per_title", "--bucket", &bucket, "--prefix", "raw"]).await;
    assert_eq!(code, 0, "{stderr}");
    let states: Vec<Json> = stdout.lines().map(|l| serde_json::from_str(l).expect("status line")).collect();
    let a = states.iter().find(|s| s["dt"] == DAY_A).expect("day A in the status");
    assert_eq!(a["state"], "stale", "{a}");
    assert!(a["detail"].as_str().is_some_and(|d| d.contains("new input")), "{a}");
    let b = states.iter().find(|s| s["dt"] == DAY_B).expect("day B in the status");
    assert_eq!(b["state"], "missing", "{b}");
    let rerun = run(&place, "plays_per_title", DAY_A, &[]).await;
    assert_eq!(rerun["outcome"], "computed");
    assert!(!rerun["added_inputs"].as_array().expect("added").is_empty(), "{rerun}");
    assert!(rerun["reason"].as_str().is_some_and(|r| r.contains("late data")), "{rerun}");
    for job in ["daily_active_users", "ad_completion", "user_segments"] {
        run(&place, job, DAY_A, &["--version", "1"]).await;
    }
    check_against_store(&etl_lib, &pool, &table, DAY_A).await;

    // Backfill over both days: A is up to date, B computed; then every partition is fresh.
    for job in JOBS {
        let (code, stdout, stderr) = etl(&[
            "backfill",
            "--job",
            job,
            "--version",
            "1",
            "--from",
            DAY_A,
            "--to",
            DAY_B,
            "--bucket",
            &bucket,
            "--prefix",
            "raw",
        ])
        .await;
        assert_eq!(code, 0, "{stderr}");
        assert!(stdout.contains("2 days: 1 computed, 1 up to date, 0 failed"), "{job}: {stdout} {stderr}");
    }
    check_against_store(&etl_lib, &pool, &table, DAY_B).await;
    let (code, stdout, _) =
        etl(&["status", "--json", "--bucket", &bucket, "--prefix", "raw", "--job", "plays_per_title"]).await;
    assert_eq!(code, 0);
    assert!(stdout.lines().all(|l| l.contains("\"state\":\"fresh\"")), "{stdout}");

    // `show` prints the committed rows.
    let (code, stdout, _) =
        etl(&["show", "--job", "ad_completion", "--date", DAY_A, "--bucket", &bucket, "--prefix", "raw"]).await;
    assert_eq!(code, 0);
    assert!(stdout.starts_with("platform\tad_starts\tad_completes\tad_skips"), "{stdout}");

    sqlx::query(&format!("DROP TABLE IF EXISTS \"{table}\", \"{table}_dead_letters\""))
        .execute(&pool)
        .await
        .expect("drop");
    delete_stream(&pipeline.kinesis, &stream).await;
}

async fn etl_lib_again(s3: &S3, bucket: &str) -> Json {
    let bytes = s3_bytes(s3, bucket, &format!("again/plays_per_title/v=1/dt={DAY_A}/_manifest.json")).await;
    serde_json::from_slice(&bytes).expect("manifest")
}

async fn s3_bytes_opt(s3: &S3, bucket: &str, key: &str) -> Option<Vec<u8>> {
    let object = s3.get_object().bucket(bucket).key(key).send().await.ok()?;
    Some(object.body.collect().await.expect("body").into_bytes().to_vec())
}

async fn s3_bytes(s3: &S3, bucket: &str, key: &str) -> Vec<u8> {
    s3_bytes_opt(s3, bucket, key).await.unwrap_or_else(|| panic!("s3://{bucket}/{key} is there"))
}

// --- crashes ------------------------------------------------------------------------------------------

/// Writes `events` (of one day) as the S3 sink writes a batch of one shard.
async fn write_batch(sink: &S3Sink, shard: &str, first_sequence: u64, events: Vec<Event>) {
    let records: Vec<EventRecord> = events
        .into_iter()
        .enumerate()
        .map(|(i, event)| EventRecord {
            event,
            shard_id: shard.into(),
            sequence_number: format!("{:056}", first_sequence + i as u64),
            sub_sequence_number: 0,
            arrival: None,
        })
        .collect();
    let batch = Batch {
        stream: "crash".into(),
        shard_id: shard.into(),
        first: (records[0].sequence_number.clone(), 0),
        last: (records[records.len() - 1].sequence_number.clone(), 0),
        events: records,
        dead_letters: Vec::new(),
    };
    sink.write_batch(&batch).await.expect("write batch");
}

/// What a reader sees of a partition: the manifest's data file must be there with its SHA-256
/// (read_partition checks it), and Athena's pointer names a data file that is there.
async fn visible(etl: &Etl, s3: &S3, bucket: &str, derived: &str, job: &str) -> Option<(String, Vec<Vec<Value>>)> {
    let (manifest, _, rows) = etl.read_partition(job, 1, day(DAY_A)).await.expect("a consistent partition")?;
    let pointer =
        String::from_utf8(s3_bytes(s3, bucket, &format!("{derived}/_symlink/{job}/v=1/dt={DAY_A}/manifest")).await)
            .expect("utf-8");
    let pointed = pointer.trim().strip_prefix(&format!("s3://{bucket}/")).expect("an s3 URI").to_owned();
    assert!(s3_bytes_opt(s3, bucket, &pointed).await.is_some(), "Athena's pointer names a data file that is there");
    Some((manifest.output.key, rows))
}

async fn parts(s3: &S3, bucket: &str, derived: &str, job: &str) -> Vec<String> {
    let listed = s3
        .list_objects_v2()
        .bucket(bucket)
        .prefix(format!("{derived}/{job}/v=1/dt={DAY_A}/"))
        .send()
        .await
        .expect("list");
    listed.contents().iter().filter_map(|o| o.key()).filter(|k| k.contains("/part-")).map(str::to_owned).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_killed_at_any_point_leave_the_old_partition_or_the_new_one() {
    let aws = aws_config().await;
    let s3 = ktk_pipeline::s3::client(&aws, true);
    let bucket = unique_name("ktk-etl-kill").to_lowercase();
    s3.create_bucket().bucket(&bucket).send().await.expect("create bucket");
    let sink = S3Sink::with_client(s3.clone(), S3SinkConfig::new(&bucket, "raw").with_path_style(true));
    let job = "user_segments";
    let derived = "raw/derived";
    let etl = etl_lib(&s3, &bucket, "raw", None);
    let place = ["--bucket", bucket.as_str(), "--prefix", "raw"];

    // A day big enough that a run takes a while: 24,000 events over 8 objects.
    let base: Vec<Event> = (0..8)
        .flat_map(|k| day_events(DAY_A, &format!("base{k}"), (k * 400)..(k * 400 + 400)).into_iter().take(3_000))
        .collect();
    for (k, chunk) in base.chunks(3_000).enumerate() {
        write_batch(&sink, &format!("shardId-{k:012}"), 1, chunk.to_vec()).await;
    }
    let started = Instant::now();
    let first = run(&place, job, DAY_A, &[]).await;
    let clean_run = started.elapsed();
    assert_eq!(first["outcome"], "computed");
    println!("etl kill test: a clean run over {} events took {clean_run:?}", base.len());

    let points = ["listed", "loaded", "computed", "part-written", "manifest-committed", "symlink-written"];
    for (round, point) in points.iter().enumerate() {
        let before = visible(&etl, &s3, &bucket, derived, job).await.expect("committed before");
        // A late object, so the run has something new to commit.
        write_batch(
            &sink,
            "shardId-late",
            1_000 + round as u64 * 100,
            day_events(DAY_A, &format!("late{round}"), 5_000 + round as u32 * 10..5_000 + round as u32 * 10 + 10),
        )
        .await;
        let mut child = ktk()
            .args(["etl", "run", "--job", job, "--date", DAY_A])
            .args(place)
            .env("KTK_ETL_FAILPOINT", point)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("start ktk");
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let reached = tokio::time::timeout(Duration::from_secs(120), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("failpoint") {
                    return true;
                }
            }
            false
        })
        .await
        .unwrap_or(false);
        assert!(reached, "ktk etl run reached failpoint {point}");
        child.start_kill().expect("SIGKILL");
        let _ = child.wait().await;
        let after = visible(&etl, &s3, &bucket, derived, job).await.expect("a partition is visible");
        let committed = matches!(*point, "manifest-committed" | "symlink-written");
        if committed {
            assert_ne!(after.0, before.0, "killed after the commit: the new partition ({point})");
        } else {
            assert_eq!(after, before, "killed before the commit: the old partition, unchanged ({point})");
        }
        // The next run finishes the job: computed (or found committed), one data file left.
        let next = run(&place, job, DAY_A, &[]).await;
        assert_eq!(next["outcome"], if committed { "up_to_date" } else { "computed" }, "after {point}: {next}");
        let left = parts(&s3, &bucket, derived, job).await;
        assert_eq!(
            left,
            [next["manifest"]["output"]["key"].as_str().expect("key").to_owned()],
            "after {point}: only the committed data file is left"
        );
    }

    // Kills at random moments of forced runs: every time, a consistent partition.
    let expected = visible(&etl, &s3, &bucket, derived, job).await.expect("committed");
    let mut rng = fastrand::Rng::with_seed(15);
    let span = clean_run.as_millis().max(200) as u64;
    for _ in 0..6 {
        let mut child = ktk()
            .args(["etl", "run", "--force", "--job", job, "--date", DAY_A])
            .args(place)
            .stderr(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start ktk");
        tokio::time::sleep(Duration::from_millis(rng.u64(0..span))).await;
        let _ = child.start_kill();
        let _ = child.wait().await;
        let now = visible(&etl, &s3, &bucket, derived, job).await.expect("visible");
        assert_eq!(now, expected, "a forced run of the same inputs makes the same partition, killed or not");
    }
    let last = run(&place, job, DAY_A, &[]).await;
    assert_eq!(last["outcome"], "up_to_date");
    assert_eq!(parts(&s3, &bucket, derived, job).await.len(), 1, "no data file left behind");

    // A backfill killed in its second day resumes: the first day stays done, the rest is computed.
    const DAY_C: &str = "2026-03-03";
    write_batch(&sink, "shardId-000000000000", 90_000, day_events(DAY_B, "b", 0..40)).await;
    write_batch(&sink, "shardId-000000000000", 91_000, day_events(DAY_C, "c", 0..40)).await;
    let backfill = ["etl", "backfill", "--job", job, "--from", DAY_A, "--to", DAY_C];
    let mut child = ktk()
        .args(backfill)
        .args(place)
        .env("KTK_ETL_FAILPOINT", format!("manifest-committed@{DAY_B}"))
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start ktk");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let mut seen = Vec::new();
    let reached = tokio::time::timeout(Duration::from_secs(120), async {
        while let Ok(Some(line)) = lines.next_line().await {
            let stop = line.contains("failpoint");
            seen.push(line);
            if stop {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    assert!(reached, "the backfill reached {DAY_B}'s commit: {seen:?}");
    assert!(seen.iter().any(|l| l.contains(&format!("{DAY_A}: up to date"))), "{seen:?}");
    child.start_kill().expect("SIGKILL");
    let _ = child.wait().await;
    let output = ktk().args(backfill).args(place).output().await.expect("run ktk");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("3 days: 1 computed, 2 up to date, 0 failed"), "{stdout}");
}

#[tokio::test]
async fn bad_input_gets_a_clear_error_and_exit_status() {
    let (code, _, stderr) = etl(&["run", "--job", "plays_per_title", "--date", "2026-02-30", "--bucket", "b"]).await;
    assert_eq!((code, stderr.contains("not a day")), (2, true), "{stderr}");
    let (code, _, stderr) = etl(&["run", "--job", "nope", "--date", DAY_A, "--bucket", "b"]).await;
    assert_eq!((code, stderr.contains("no job named \"nope\"")), (2, true), "{stderr}");
    let (code, _, stderr) =
        etl(&["run", "--job", "plays_per_title", "--version", "9", "--date", DAY_A, "--bucket", "b"]).await;
    assert_eq!((code, stderr.contains("has no version 9")), (2, true), "{stderr}");
    let (code, _, stderr) =
        etl(&["backfill", "--job", "plays_per_title", "--from", DAY_B, "--to", DAY_A, "--bucket", "b"]).await;
    assert_eq!((code, stderr.contains("before")), (2, true), "{stderr}");
    let missing = unique_name("ktk-etl-missing").to_lowercase();
    let (code, _, stderr) = etl(&["run", "--job", "plays_per_title", "--date", DAY_A, "--bucket", &missing]).await;
    assert_eq!((code, stderr.contains("does not exist")), (1, true), "{stderr}");
    let (code, stdout, _) = etl(&["sql", "--job", "daily_active_users", "--date", DAY_A]).await;
    assert_eq!(code, 0);
    assert!(stdout.contains(&format!("dt = '{DAY_A}'")) && !stdout.contains("{{dt}}"), "{stdout}");
    let (code, stdout, _) = etl(&["jobs"]).await;
    assert_eq!(code, 0);
    for job in JOBS {
        assert!(stdout.contains(&format!("{job}: ")), "{stdout}");
    }
}
