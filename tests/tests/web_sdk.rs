//! The web SDK (`sdk/web`) in a real browser, end to end: headless Debian chromium, driven by
//! playwright-core from `sdk/web/test/browser/run.mjs`, loads a test page that uses the built
//! SDK bundle and sends through the real `collector` binary into a LocalStack Kinesis stream,
//! which a real `consumer` process delivers to PostgreSQL.
//!
//! This test owns the stream, the consumer and the checks against the store and the stream; the
//! script owns the page, the collector (it stops and starts it), a fault proxy in front of it,
//! and the scenarios, each asserting what the page sees: 1,000 events; the collector killed for
//! 10 s while 500 are tracked; a reload with 200 queued and the collector unreachable; 503 and
//! 429 with `Retry-After` (the gaps measured); an invalid event reported to `onRejected` and not
//! retried; nothing sent while the browser is offline, everything once it is online; a page
//! closed with events waiting (they leave in its keepalive request); the queue cap with its drop
//! counter; two tabs at once, one of them closing with events queued. The script writes, per
//! scenario, which event ids must be stored, which must not, and whether the stream must hold
//! each exactly once (no resend can have happened).
//!
//! Needs what `sdk/web/scripts/setup.sh` prepares (scripts/test.sh runs it): `node`, the
//! SDK built in `sdk/web/dist`, `sdk/web/node_modules` and `/usr/bin/chromium`. Missing, the test
//! fails and says so.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ktk_proto::events::v1::Event;
use ktk_tests::consumer_support::{ConsumerProcess, ConsumerSpec, consumer_binary, database_url};
use ktk_tests::{aws_config, child_aws_env, create_stream, delete_stream, dynamodb, kinesis, read_stream, unique_name};
use prost::Message as _;

/// The whole browser run: a bound, not a measure (it takes about a minute).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(480);

fn web_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("sdk").join("web")
}

#[derive(Debug)]
struct Scenario {
    name: String,
    stored: Vec<String>,
    not_stored: Vec<String>,
    once_in_stream: bool,
}

fn strings(value: &serde_json::Value) -> Vec<String> {
    value.as_array().map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_sdk_in_chromium_delivers_every_event_once_through_collector_and_consumer() {
    let web = web_dir();
    let setup = "run sdk/web/scripts/setup.sh (scripts/test.sh does)";
    for (path, what) in [
        (web.join("dist").join("ktk-web.min.js"), "the built SDK bundle"),
        (web.join("dist").join("gen").join("events").join("v1").join("events_pb.js"), "the generated events.v1 code"),
        (web.join("node_modules").join("playwright-core"), "playwright-core"),
    ] {
        assert!(path.exists(), "{what} is missing ({}): {setup}", path.display());
    }
    let chromium = std::env::var("KTK_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned());
    assert!(std::path::Path::new(&chromium).exists(), "{chromium} is missing: {setup}");
    let collector = consumer_binary().with_file_name("collector");
    assert!(collector.exists(), "{} is missing: run `cargo build -p ktk-producer`", collector.display());

    let client = kinesis().await;
    let _ = dynamodb().await;
    let aws = aws_config().await;
    let s3 = ktk_pipeline::s3::client(&aws, true);
    let stream = unique_name("ktk-web");
    let app = unique_name("ktk-web-app");
    let bucket = unique_name("ktk-web").to_lowercase();
    let table = format!("web_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    create_stream(&client, &stream, 2).await;
    s3.create_bucket().bucket(&bucket).send().await.expect("create bucket");
    let consumer = ConsumerProcess::spawn(&ConsumerSpec::new(&stream, &app, "web-consumer", &bucket, "web", &table));

    // The browser scenarios.
    let results = std::env::temp_dir().join(format!("{}.json", unique_name("ktk-web-results")));
    let mut command = tokio::process::Command::new("node");
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("KTK_WEB_") {
            command.env_remove(name);
        }
    }
    command
        .arg(web.join("test").join("browser").join("run.mjs"))
        .current_dir(&web)
        .env("KTK_WEB_COLLECTOR_BIN", &collector)
        .env("KTK_WEB_STREAM", &stream)
        .env("KTK_WEB_RESULTS", &results)
        .env("KTK_CHROMIUM", &chromium)
        .envs(child_aws_env())
        .kill_on_drop(true);
    let status = tokio::time::timeout(SCRIPT_TIMEOUT, command.status())
        .await
        .unwrap_or_else(|_| panic!("the browser scenarios did not finish within {SCRIPT_TIMEOUT:?}"))
        .expect("run node (install Node.js >= 20)");
    let text = std::fs::read_to_string(&results).unwrap_or_else(|e| {
        panic!("the browser scenarios wrote no results to {} ({e}); exit {status}", results.display())
    });
    let _ = std::fs::remove_file(&results);
    let report: serde_json::Value = serde_json::from_str(&text).expect("results are JSON");
    assert!(status.success(), "the browser scenarios failed ({status}): {}", report["failure"]);
    println!("web SDK measures: {}", report["measures"]);
    let scenarios: Vec<Scenario> = report["scenarios"]
        .as_array()
        .expect("scenarios")
        .iter()
        .map(|s| Scenario {
            name: s["name"].as_str().unwrap_or_default().to_owned(),
            stored: strings(&s["stored"]),
            not_stored: strings(&s["not_stored"]),
            once_in_stream: s["once_in_stream"].as_bool().unwrap_or(false),
        })
        .collect();
    let names: Vec<&str> = scenarios.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        ["thousand", "outage", "reload", "retry_after", "invalid", "offline", "page_exit", "queue_cap", "two_tabs"]
    );
    let expected: HashSet<&str> = scenarios.iter().flat_map(|s| s.stored.iter().map(String::as_str)).collect();
    let total: usize = scenarios.iter().map(|s| s.stored.len()).sum();
    assert_eq!(expected.len(), total, "event ids are unique across scenarios");

    // The stream: every event the page saw accepted is there; resends are counted.
    let mut in_stream: HashMap<String, u32> = HashMap::new();
    let records = read_stream(&client, &stream).await;
    for record in &records {
        let event = Event::decode(record.data.clone()).expect("every record is an events.v1.Event");
        assert_eq!(event.app_id, "tv-web", "the collector stamps the app of the write key");
        *in_stream.entry(event.event_id).or_default() += 1;
    }
    for s in &scenarios {
        let missing = s.stored.iter().filter(|id| !in_stream.contains_key(*id)).count();
        assert_eq!(missing, 0, "{}: every accepted event is in the stream", s.name);
        let present = s.not_stored.iter().filter(|id| in_stream.contains_key(*id)).count();
        assert_eq!(present, 0, "{}: no rejected or dropped event is in the stream", s.name);
        let resent = s.stored.iter().filter(|id| in_stream[*id] > 1).count();
        if s.once_in_stream {
            assert_eq!(resent, 0, "{}: no event was sent twice", s.name);
        }
        println!("web SDK {}: {} events, {} in the stream more than once (resends)", s.name, s.stored.len(), resent);
    }
    assert_eq!(in_stream.len(), total, "the stream holds exactly the scenarios' events");
    let resends = records.len() - in_stream.len();

    // The store: each event exactly once, nothing else, and the consumer counted every resend
    // it dropped.
    let pool = sqlx::PgPool::connect(&database_url()).await.expect("PostgreSQL");
    let deadline = Instant::now() + Duration::from_secs(120);
    let (mut delivered, mut duplicates);
    loop {
        delivered = consumer.health_count("events_delivered").await;
        duplicates = consumer.health_count("duplicates").await;
        if delivered as usize >= total && (delivered + duplicates) as usize >= records.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "delivery stalled: {delivered} delivered, {duplicates} duplicates of {} records",
            records.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let rows: Vec<(String, String, String, String)> =
        sqlx::query_as(&format!("SELECT event_id, device_id, app_version, schema_version FROM \"{table}\""))
            .fetch_all(&pool)
            .await
            .expect("read the store");
    let stored: HashSet<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(rows.len(), stored.len(), "each event stored once");
    assert_eq!(stored, expected, "the store holds exactly the events the pages saw accepted");
    assert!(
        rows.iter().all(|r| !r.1.is_empty() && r.2 == "web-test-1.0" && r.3 == "1.0"),
        "the SDK's fields are stored"
    );
    println!(
        "web SDK: {total} events stored once each; {} records in the stream, {resends} of them resends; the consumer \
         delivered {delivered} and dropped {duplicates} duplicates",
        records.len()
    );
    assert_eq!(delivered as usize, total);
    assert_eq!(duplicates as usize, resends, "every resend was dropped by the pipeline and counted");

    consumer.stop(Duration::from_secs(30)).await;
    sqlx::query(&format!("DROP TABLE IF EXISTS \"{table}\", \"{table}_dead_letters\""))
        .execute(&pool)
        .await
        .expect("drop");
    delete_stream(&client, &stream).await;
}
