//! Parity of the two runtimes: the same stretch of a stream, delivered once by the ECS path (a
//! KCL-style worker driving `ktk_ecs::DeliveryProcessor`) and once by the Lambda path
//! (`ktk_lambda::KinesisHandler` given the batch an event source mapping would send), ends in the
//! same S3 objects (byte for byte), the same PostgreSQL rows and dead letters, and the same counts.
//!
//! The input has what makes delivery interesting: KPL aggregates, an event put twice within a
//! batch, an event put again in a later batch (a dedup-window hit), poison records (random bytes,
//! an event without an id, a record with the KPL magic that is not an aggregate), two arrival
//! windows, and a real-time store that refuses its first two writes. Real services: LocalStack
//! (Kinesis, DynamoDB, S3) and PostgreSQL.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::ShardIteratorType;
use base64::Engine as _;
use futures::future::BoxFuture;
use ktk_consumer::Worker;
use ktk_ecs::DeliveryProcessor;
use ktk_lambda::{HandlerConfig, KinesisHandler};
use ktk_pipeline::postgres::PostgresSink;
use ktk_pipeline::s3::{S3Sink, S3SinkConfig};
use ktk_pipeline::{Batch, Pipeline, PipelineConfig, PipelineStats, Sink, SinkError, SinkReport, SinkTiming};
use ktk_producer::{Producer, ProducerConfig, Record};
use ktk_proto::events::v1::Event;
use ktk_tests::consumer_support::database_url;
use ktk_tests::store_support::{event, unique_table};
use ktk_tests::worker_support::fast_worker_config;
use ktk_tests::{aws_config, create_stream, delete_stream, kinesis, unique_name};
use prost::Message as _;
use sqlx::Row as _;
use tokio_util::sync::CancellationToken;

/// A sink that refuses its first `failures` writes (a store restarting), then writes through.
#[derive(Debug)]
struct Flaky<S> {
    inner: S,
    failures: AtomicU32,
}

impl<S: Sink> Sink for Flaky<S> {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn timing(&self) -> SinkTiming {
        self.inner.timing()
    }

    fn write<'a>(&'a self, batch: &'a Batch) -> BoxFuture<'a, Result<SinkReport, SinkError>> {
        if self.failures.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
            return Box::pin(async move { Err(SinkError::unavailable(self.inner.name(), "restarting, on purpose")) });
        }
        self.inner.write(batch)
    }
}

/// One runtime's destinations: a prefix of the shared bucket and its own store table.
struct Destination {
    prefix: String,
    table: String,
    s3: Arc<S3Sink>,
    store: Arc<Flaky<PostgresSink>>,
}

impl Destination {
    async fn new(aws: &aws_config::SdkConfig, bucket: &str, runtime: &str, failures: u32) -> Destination {
        let prefix = format!("parity/{runtime}");
        let table = unique_table(&format!("parity_{runtime}"));
        let s3 = Arc::new(S3Sink::new(aws, S3SinkConfig::new(bucket, &prefix).with_path_style(true)));
        let store = PostgresSink::connect(&database_url(), &table).await.expect("PostgreSQL");
        store.migrate().await.expect("migrate");
        let store = Arc::new(Flaky { inner: store, failures: AtomicU32::new(failures) });
        Destination { prefix, table, s3, store }
    }

    fn sinks(&self) -> Vec<Arc<dyn Sink>> {
        vec![Arc::clone(&self.s3) as Arc<dyn Sink>, Arc::clone(&self.store) as Arc<dyn Sink>]
    }
}

/// The pipeline configuration both runtimes use: one-second arrival windows closed at once, so
/// the two bursts of the input fall in two batches on either runtime.
fn pipeline_config() -> PipelineConfig {
    PipelineConfig::default()
        .with_batch_window(Duration::from_secs(1), Duration::ZERO)
        .with_retry_backoff(Duration::from_millis(50), Duration::from_millis(200))
}

async fn put_events(producer: &Producer, events: &[Event]) {
    let mut receipts = Vec::new();
    for e in events {
        receipts.push(producer.put(Record::new(e.user_id.clone(), e.encode_to_vec())).await.expect("put"));
    }
    producer.flush().await;
    for receipt in receipts {
        receipt.await.expect("acknowledged");
    }
}

/// The stream's Kinesis records, as an event source mapping's batch (`KinesisEvent` JSON).
async fn mapping_batch(client: &aws_sdk_kinesis::Client, stream: &str) -> (serde_json::Value, usize) {
    let shards = client.list_shards().stream_name(stream).send().await.expect("list shards");
    let shard = shards.shards()[0].shard_id().to_owned();
    let mut iterator = client
        .get_shard_iterator()
        .stream_name(stream)
        .shard_id(&shard)
        .shard_iterator_type(ShardIteratorType::TrimHorizon)
        .send()
        .await
        .expect("iterator")
        .shard_iterator;
    let mut records = Vec::new();
    while let Some(current) = iterator.take() {
        let page = client.get_records().shard_iterator(current).send().await.expect("get records");
        for record in page.records() {
            let arrival = record.approximate_arrival_timestamp().expect("arrival");
            // Whole milliseconds, as Kinesis keeps them.
            let millis = arrival.secs() * 1_000 + i64::from(arrival.subsec_nanos() / 1_000_000);
            records.push(serde_json::json!({
                "kinesis": {
                    "kinesisSchemaVersion": "1.0",
                    "partitionKey": record.partition_key(),
                    "sequenceNumber": record.sequence_number(),
                    "data": base64::engine::general_purpose::STANDARD.encode(record.data().as_ref()),
                    "approximateArrivalTimestamp": format!("{}.{:03}", millis / 1_000, millis % 1_000),
                },
                "eventSource": "aws:kinesis",
                "eventVersion": "1.0",
                "eventID": format!("{shard}:{}", record.sequence_number()),
                "eventName": "aws:kinesis:record",
                "awsRegion": "us-east-1",
                "eventSourceARN": format!("arn:aws:kinesis:us-east-1:000000000000:stream/{stream}"),
            }));
        }
        if page.records().is_empty() {
            break;
        }
        iterator = page.next_shard_iterator;
    }
    let count = records.len();
    (serde_json::json!({ "Records": records }), count)
}

/// The mapping's batch from the record with sequence number `first` on: what a mapping sends again
/// after a partial batch response that names it.
fn from_record(batch: &serde_json::Value, first: &str) -> serde_json::Value {
    let records = batch["Records"].as_array().cloned().unwrap_or_default();
    let start = records.iter().position(|r| r["kinesis"]["sequenceNumber"] == first).expect("the named record");
    serde_json::json!({ "Records": records[start..] })
}

/// Every object under `prefix`, by key relative to it.
async fn objects(client: &ktk_pipeline::s3::Client, bucket: &str, prefix: &str) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let listing = client.list_objects_v2().bucket(bucket).prefix(format!("{prefix}/")).send().await.expect("list");
    assert!(!listing.is_truncated().unwrap_or(false), "more objects than one page");
    for object in listing.contents() {
        let key = object.key().expect("key");
        let body = client.get_object().bucket(bucket).key(key).send().await.expect("get");
        let bytes = body.body.collect().await.expect("body").into_bytes();
        out.insert(key.trim_start_matches(prefix).to_owned(), bytes.to_vec());
    }
    out
}

/// Every row of a table as JSON text, without the time the store took it, in key order.
async fn rows(pool: &sqlx::PgPool, table: &str, key: &str) -> Vec<String> {
    let sql = format!("SELECT (to_jsonb(t) - 'stored_at')::text AS row FROM \"{table}\" t ORDER BY {key}");
    let rows = sqlx::query(&sql).fetch_all(pool).await.expect("select");
    rows.iter().map(|row| row.get::<String, _>("row")).collect()
}

/// The store refuses its first two writes: both runtimes retry them within the batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ecs_and_lambda_deliver_the_same_stream_to_the_same_objects_rows_and_counts() {
    deliver_both_ways(2).await;
}

/// The store refuses its first seven writes, more than one Lambda invocation tries (five): the
/// Lambda gives up, names the first record, and the mapping invokes it again from there, while the
/// ECS worker keeps retrying. Both end in the same place, with the same counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_down_longer_than_an_invocation_retries_ends_the_same_on_ecs_and_lambda() {
    deliver_both_ways(7).await;
}

async fn deliver_both_ways(store_failures: u32) {
    let aws = aws_config().await;
    let client = kinesis().await;
    let stream = unique_name("ktk-parity");
    create_stream(&client, &stream, 1).await;

    // Burst 1: 40 events, one put twice (a duplicate within the batch).
    let producer = Producer::new(ProducerConfig::new(&stream).with_request_timeout(Duration::from_secs(60)), &aws)
        .await
        .expect("producer");
    let mut first: Vec<Event> = (0..40).map(event).collect();
    first.push(event(7));
    put_events(&producer, &first).await;
    let mut truncated = ktk_proto::aggregation::MAGIC.to_vec();
    truncated.extend_from_slice(&[0x0a, 0x05, b'a']);
    let no_id = Event { user_id: "u".into(), ..Event::default() }.encode_to_vec();
    for (key, data) in [("poison-1", vec![0xff, 0x00, 0x13, 0x37]), ("poison-2", no_id), ("poison-3", truncated)] {
        client.put_record().stream_name(&stream).partition_key(key).data(Blob::new(data)).send().await.expect("put");
    }
    // Burst 2, in a later arrival window: 20 new events and one of burst 1 again (a dedup-window
    // hit: it stays in the batch for S3, and the store does not get it again).
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let mut second: Vec<Event> = (40..60).map(event).collect();
    second.push(event(3));
    put_events(&producer, &second).await;
    producer.shutdown(Duration::from_secs(10)).await;
    let user_records = (first.len() + 3 + second.len()) as u64;

    let s3_client = ktk_pipeline::s3::client(&aws, true);
    let bucket = unique_name("ktk-parity");
    s3_client.create_bucket().bucket(&bucket).send().await.expect("bucket");
    let pool = sqlx::PgPool::connect(&database_url()).await.expect("PostgreSQL");

    // The ECS path: a worker, its processors driving the pipeline, checkpoints in DynamoDB.
    let ecs = Destination::new(&aws, &bucket, "ecs", store_failures).await;
    let pipeline = Pipeline::new(pipeline_config(), ecs.sinks()).expect("pipeline");
    let factory = {
        let (pipeline, stream) = (pipeline.clone(), stream.clone());
        move |shard: &str| DeliveryProcessor::new(&pipeline, &stream, shard)
    };
    let config = fast_worker_config(&stream, &unique_name("ktk-parity-app"), "ecs").with_empty_batches(true);
    let worker = Worker::new(config, &aws, factory).expect("worker");
    let stop = CancellationToken::new();
    let running = tokio::spawn(worker.run(stop.clone()));
    let started = std::time::Instant::now();
    let accounted = |s: &PipelineStats| s.events_delivered + s.duplicates() + s.dead_letters;
    while accounted(&pipeline.stats()) < user_records {
        assert!(started.elapsed() < Duration::from_secs(90), "ECS delivery stalled: {:?}", pipeline.stats());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    running.await.expect("task").expect("worker");
    let ecs_stats = pipeline.stats();

    // The Lambda path: the same records as one mapping batch; retried from the reported record,
    // as a mapping with ReportBatchItemFailures does, until nothing is reported.
    let lambda = Destination::new(&aws, &bucket, "lambda", store_failures).await;
    let config = HandlerConfig::default().with_pipeline(pipeline_config());
    let handler = KinesisHandler::new(config, lambda.sinks()).expect("handler");
    let (json, kinesis_records) = mapping_batch(&client, &stream).await;
    let mut batch = json;
    let mut invocations = 0;
    loop {
        invocations += 1;
        let event = ktk_lambda::parse_event(batch.clone()).expect("a KinesisEvent");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let report = handler.handle(event, deadline).await;
        if invocations == 1 {
            assert_eq!((report.records, report.user_records), (kinesis_records as u64, user_records));
        }
        let Some(failed) = report.failures.first() else { break };
        assert!(invocations < 5, "the mapping retried {invocations} times: {report:?}");
        batch = from_record(&batch, failed);
    }
    assert_eq!(invocations, if store_failures > 5 { 2 } else { 1 }, "invocations");
    let lambda_stats = handler.stats();

    println!("ECS {ecs_stats:?}\nLambda {lambda_stats:?}");
    // The counts: the same, and right.
    assert_eq!(lambda_stats, ecs_stats);
    assert_eq!(ecs_stats.events_delivered, 60);
    assert_eq!(ecs_stats.duplicates_in_memory, 2, "event 7 within burst 1, event 3 again in burst 2");
    assert_eq!((ecs_stats.dead_letters, ecs_stats.sink_errors), (3, u64::from(store_failures)));
    assert!(ecs_stats.batches >= 2, "two arrival windows: {ecs_stats:?}");

    // The S3 objects: the same keys, the same bytes.
    let ecs_objects = objects(&s3_client, &bucket, &ecs.prefix).await;
    let lambda_objects = objects(&s3_client, &bucket, &lambda.prefix).await;
    assert!(ecs_objects.keys().any(|k| k.contains("/dead-letters/")), "{:?}", ecs_objects.keys());
    assert_eq!(lambda_objects.keys().collect::<Vec<_>>(), ecs_objects.keys().collect::<Vec<_>>(), "the same objects");
    for (key, bytes) in &ecs_objects {
        assert!(lambda_objects.get(key) == Some(bytes), "{key} differs between ECS and Lambda");
    }

    // The store: the same rows and dead letters.
    let ecs_rows = rows(&pool, &ecs.table, "event_id").await;
    assert_eq!(ecs_rows.len(), 60);
    assert_eq!(rows(&pool, &lambda.table, "event_id").await, ecs_rows);
    let dead = |table: &str| format!("{table}_dead_letters");
    let ecs_dead = rows(&pool, &dead(&ecs.table), "sequence_number, sub_sequence_number").await;
    assert_eq!(ecs_dead.len(), 3);
    assert!(ecs_dead.iter().any(|row| row.contains("not a valid KPL aggregate")), "{ecs_dead:?}");
    assert_eq!(rows(&pool, &dead(&lambda.table), "sequence_number, sub_sequence_number").await, ecs_dead);

    println!("parity: {} objects, {} rows, {} dead letters", ecs_objects.len(), ecs_rows.len(), ecs_dead.len());
    delete_stream(&client, &stream).await;
}
