//! End to end, against LocalStack (Kinesis, DynamoDB, S3) and a real PostgreSQL: the producer puts
//! 50,000 events with 2% of their event ids put twice into an 8-shard stream; two `consumer`
//! processes (the ECS binary) deliver them to S3 and PostgreSQL. The store holds exactly the unique
//! events, S3 read back through the reader yields exactly the unique events, and the duplicates the
//! processes counted equal the number injected (plus any reprocessed, reported).

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use ktk_consumer::pipeline::s3::read_events;
use ktk_producer::{Producer, ProducerConfig, Record};
use ktk_proto::events::v1::{Event, EventType, Platform};
use ktk_tests::{aws_config, create_stream, delete_stream, dynamodb, kinesis, unique_name};
use prost::Message as _;
use tokio::process::{Child, Command};

const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The `consumer` binary of ktk-consumer, built by `cargo test --workspace` next to this test's
/// own executable.
fn consumer_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let dir = exe.parent().and_then(|deps| deps.parent()).expect("target dir");
    let binary = dir.join("consumer");
    assert!(
        binary.exists(),
        "{} is missing: run the tests with `cargo test --workspace` (or `cargo build -p ktk-consumer --bin consumer` first)",
        binary.display()
    );
    binary
}

fn spawn_consumer(stream: &str, app: &str, worker: &str, bucket: &str, table: &str, port: u16) -> Child {
    let database = std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned());
    Command::new(consumer_binary())
        .env("KTK_STREAM", stream)
        .env("KTK_APPLICATION", app)
        .env("KTK_WORKER_ID", worker)
        .env("KTK_S3_BUCKET", bucket)
        .env("KTK_S3_PREFIX", "e2e")
        .env("KTK_S3_PATH_STYLE", "true")
        .env("KTK_POSTGRES_URL", database)
        .env("KTK_STORE_TABLE", table)
        .env("KTK_BATCH_WINDOW_MS", "2000")
        .env("KTK_BATCH_GRACE_MS", "500")
        .env("KTK_FAILOVER_MS", "3000")
        .env("KTK_RENEW_MS", "1000")
        .env("KTK_TAKING_MS", "2000")
        .env("KTK_DISCOVERY_MS", "250")
        .env("KTK_SHARD_SYNC_MS", "5000")
        .env("KTK_PARENT_POLL_MS", "500")
        .env("KTK_IDLE_MS", "300")
        .env("KTK_LISTEN", format!("127.0.0.1:{port}"))
        .env("KTK_LOG_FORMAT", "text")
        .env("RUST_LOG", "warn")
        .envs(ktk_tests::child_aws_env())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start consumer")
}

async fn health(port: u16) -> Option<serde_json::Value> {
    let response = reqwest::get(format!("http://127.0.0.1:{port}/health")).await.ok()?;
    response.json().await.ok()
}

fn event(i: usize) -> Event {
    Event {
        event_id: format!("e2e-{i:06}"),
        r#type: if i.is_multiple_of(3) { EventType::Play } else { EventType::Pause } as i32,
        occurred_at_ms: 1_760_000_000_000 + (i as i64) * 10,
        user_id: format!("user-{}", i % 500),
        platform: Platform::Roku as i32,
        content_id: format!("content-{}", i % 40),
        position_ms: (i as i64) * 1000,
        ..Event::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumer_processes_deliver_fifty_thousand_events_exactly_once_to_s3_and_postgres() {
    const UNIQUE: usize = 50_000;
    let client = kinesis().await;
    let _ = dynamodb().await;
    let aws = aws_config().await;
    let s3 = ktk_consumer::pipeline::s3::client(&aws, true);
    let stream = unique_name("ktk-e2e");
    let app = unique_name("ktk-e2e-app");
    let bucket = unique_name("ktk-e2e").to_lowercase();
    let table = format!("e2e_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    create_stream(&client, &stream, 8).await;
    s3.create_bucket().bucket(&bucket).send().await.expect("create bucket");

    let (port_a, port_b) =
        (18_000 + (std::process::id() % 1000) as u16 * 2, 18_001 + (std::process::id() % 1000) as u16 * 2);
    let mut a = spawn_consumer(&stream, &app, "consumer-a", &bucket, &table, port_a);
    let mut b = spawn_consumer(&stream, &app, "consumer-b", &bucket, &table, port_b);

    // 2% of the events put twice, as a producer retry would.
    let started = Instant::now();
    let producer = Producer::new(ProducerConfig::new(&stream).with_request_timeout(Duration::from_secs(60)), &aws)
        .await
        .expect("producer");
    let mut receipts = Vec::with_capacity(UNIQUE + UNIQUE / 50);
    let mut injected = 0;
    for i in 0..UNIQUE {
        let e = event(i);
        let bytes = e.encode_to_vec();
        receipts.push(producer.put(Record::new(e.user_id.clone(), bytes.clone())).await.expect("put"));
        if i.is_multiple_of(50) {
            receipts.push(producer.put(Record::new(e.user_id.clone(), bytes)).await.expect("put"));
            injected += 1;
        }
    }
    for receipt in receipts {
        receipt.await.expect("acknowledged");
    }
    producer.shutdown(Duration::from_secs(10)).await;
    let put_took = started.elapsed();

    // Delivered when both processes together report every unique event.
    let mut last;
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let (ha, hb) = (health(port_a).await, health(port_b).await);
        let delivered =
            |h: &Option<serde_json::Value>| h.as_ref().and_then(|h| h["events_delivered"].as_u64()).unwrap_or(0);
        let duplicates = |h: &Option<serde_json::Value>| h.as_ref().and_then(|h| h["duplicates"].as_u64()).unwrap_or(0);
        last = (delivered(&ha) + delivered(&hb), duplicates(&ha) + duplicates(&hb));
        if last.0 >= UNIQUE as u64 {
            break;
        }
        assert!(Instant::now() < deadline, "delivery stalled at {last:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let delivered_in = started.elapsed();
    for child in [&a, &b] {
        let pid = child.id().expect("running").to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().await.expect("kill").success());
    }
    for child in [&mut a, &mut b] {
        let status =
            tokio::time::timeout(Duration::from_secs(30), child.wait()).await.expect("exits in 30 s").expect("status");
        assert!(status.success(), "exit 0 on SIGTERM: {status:?}");
    }

    // The store: exactly the unique events.
    let database = std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned());
    let pool = sqlx::PgPool::connect(&database).await.expect("PostgreSQL");
    let count: i64 =
        sqlx::query_scalar(&format!("SELECT count(*) FROM \"{table}\"")).fetch_one(&pool).await.expect("count");
    assert_eq!(count, UNIQUE as i64, "the store holds each unique event once");
    // S3: every unique event once through the reader.
    let read = read_events(&s3, &bucket, "e2e").await.expect("read S3");
    let ids: HashSet<String> = read.events.iter().map(|e| e.event.event_id.clone()).collect();
    assert_eq!(ids.len(), UNIQUE);
    assert_eq!(read.events.len(), UNIQUE, "the reader yields each event once");
    assert!(ids.iter().all(|id| id.starts_with("e2e-")));
    println!(
        "e2e: {UNIQUE} events (+{injected} duplicates) put in {put_took:?}, delivered by 2 processes in {delivered_in:?} \
         ({:.0} events/s end to end); duplicates counted {} (injected {injected}); S3: {} objects, {} bytes \
         ({:.1} objects and {:.0} bytes per 10,000 events); duplicates among S3 objects {}",
        UNIQUE as f64 / delivered_in.as_secs_f64(),
        last.1,
        read.objects,
        read.bytes,
        read.objects as f64 * 10_000.0 / UNIQUE as f64,
        read.bytes as f64 * 10_000.0 / UNIQUE as f64,
        read.duplicates,
    );
    assert!(last.1 >= injected as u64, "every injected duplicate counted: {} < {injected}", last.1);
    sqlx::query(&format!("DROP TABLE IF EXISTS \"{table}\", \"{table}_dead_letters\""))
        .execute(&pool)
        .await
        .expect("drop");
    delete_stream(&client, &stream).await;
}
