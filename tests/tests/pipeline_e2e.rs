//! End to end, against LocalStack (Kinesis, DynamoDB, S3) and a real PostgreSQL: the producer puts
//! 50,000 events with 2% of their event ids put twice into an 8-shard stream; two `consumer`
//! processes (the ECS binary) deliver them to S3 and PostgreSQL. The store holds exactly the unique
//! events, S3 read back through the reader yields exactly the unique events, and the duplicates the
//! processes counted equal the number injected (plus any reprocessed, reported).

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ktk_pipeline::s3::read_events;
use ktk_producer::{Producer, ProducerConfig, Record};
use ktk_proto::events::v1::{Event, EventType, Platform};
use ktk_tests::consumer_support::{ConsumerProcess, ConsumerSpec, database_url};
use ktk_tests::{aws_config, create_stream, delete_stream, dynamodb, kinesis, unique_name};
use prost::Message as _;

fn event(i: usize) -> Event {
    Event {
        event_id: format!("e2e-{i:06}"),
        r#type: if i.is_multiple_of(3) { EventType::Play } else { EventType::Pause } as i32,
        occurred_at_ms: 1_760_000_000_000 + (i as i64) * 10,
        user_id: format!("user-{}", i % 500),
        platform: Platform::Roku as i32,
        content_id: format!("content-{}", i % 40),
        position_ms: (i as i64) * 1000,
        // When it was put: the store's `stored_at` minus this is the delay from put to store.
        received_at_ms: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0),
        ..Event::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumer_processes_deliver_fifty_thousand_events_exactly_once_to_s3_and_postgres() {
    const UNIQUE: usize = 50_000;
    let client = kinesis().await;
    let _ = dynamodb().await;
    let aws = aws_config().await;
    let s3 = ktk_pipeline::s3::client(&aws, true);
    let stream = unique_name("ktk-e2e");
    let app = unique_name("ktk-e2e-app");
    let bucket = unique_name("ktk-e2e").to_lowercase();
    let table = format!("e2e_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    create_stream(&client, &stream, 8).await;
    s3.create_bucket().bucket(&bucket).send().await.expect("create bucket");

    let a = ConsumerProcess::spawn(&ConsumerSpec::new(&stream, &app, "consumer-a", &bucket, "e2e", &table));
    let b = ConsumerProcess::spawn(&ConsumerSpec::new(&stream, &app, "consumer-b", &bucket, "e2e", &table));

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
        let (ha, hb) = (a.health().await, b.health().await);
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
    let rss_mib = [&a, &b].map(|p| p.peak_rss_kib().map_or(f64::NAN, |kib| kib as f64 / 1024.0));
    tokio::join!(a.stop(Duration::from_secs(30)), b.stop(Duration::from_secs(30)));

    // The store: exactly the unique events.
    let pool = sqlx::PgPool::connect(&database_url()).await.expect("PostgreSQL");
    let count: i64 =
        sqlx::query_scalar(&format!("SELECT count(*) FROM \"{table}\"")).fetch_one(&pool).await.expect("count");
    assert_eq!(count, UNIQUE as i64, "the store holds each unique event once");
    // The delay from put to store (the producer buffers up to 100 ms; the consumers poll every 300 ms).
    let sql = format!(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY d), percentile_cont(0.99) WITHIN GROUP (ORDER BY d), max(d) \
         FROM (SELECT (extract(epoch FROM stored_at - received_at) * 1000)::float8 AS d FROM \"{table}\") AS delays"
    );
    let (p50, p99, max): (f64, f64, f64) = sqlx::query_as(&sql).fetch_one(&pool).await.expect("delays");
    println!(
        "e2e: put -> store delay p50 {p50:.0} ms, p99 {p99:.0} ms, max {max:.0} ms; peak RSS per consumer process \
         {:.1} MiB and {:.1} MiB",
        rss_mib[0], rss_mib[1]
    );
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
