//! The delivery processor behind a real worker against LocalStack: events decoded and deduplicated,
//! poison records dead-lettered, a failing sink retried without skipping, the checkpoint only after
//! the sink acknowledged, and batch boundaries that depend on the records alone (a second
//! application reading the same stream makes the same batches). The sink here records batches in
//! memory; the S3 and database sinks have their own tests against LocalStack, PostgreSQL and MariaDB.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use aws_sdk_kinesis::primitives::Blob;
use futures::future::BoxFuture;
use ktk_consumer::Worker;
use ktk_consumer::lease::{ExtendedSequenceNumber, LeaseTable};
use ktk_ecs::DeliveryProcessor;
use ktk_pipeline::{Batch, Pipeline, PipelineConfig, Sink, SinkError, SinkReport, SinkTiming};
use ktk_producer::{Producer, ProducerConfig, Record};
use ktk_proto::events::v1::{Event, EventType};
use ktk_tests::worker_support::fast_worker_config;
use ktk_tests::{aws_config, create_stream, delete_stream, kinesis, unique_name};
use prost::Message as _;
use tokio_util::sync::CancellationToken;

/// Records every batch; idempotent on event_id like a real sink; fails its first writes on demand.
#[derive(Debug, Default)]
struct RecordingSink {
    batches: Mutex<Vec<Batch>>,
    stored: Mutex<HashMap<String, u32>>,
    fail_next: AtomicU32,
    timing: SinkTiming,
}

impl Sink for RecordingSink {
    fn name(&self) -> &str {
        "recording"
    }

    fn timing(&self) -> SinkTiming {
        self.timing
    }

    fn write<'a>(&'a self, batch: &'a Batch) -> BoxFuture<'a, Result<SinkReport, SinkError>> {
        Box::pin(async move {
            if self.fail_next.load(Ordering::SeqCst) > 0 {
                self.fail_next.fetch_sub(1, Ordering::SeqCst);
                return Err(SinkError::unavailable("recording", "down on purpose"));
            }
            let mut stored = self.stored.lock().expect("lock");
            let mut report = SinkReport::default();
            for event in &batch.events {
                let count = stored.entry(event.event.event_id.clone()).or_default();
                *count += 1;
                if *count == 1 { report.written += 1 } else { report.duplicates += 1 }
            }
            self.batches.lock().expect("lock").push(batch.clone());
            Ok(report)
        })
    }
}

/// A batch's shard and first record; its last record and event ids.
type BatchStart = (String, String, u64);
type BatchRest = (String, u64, Vec<String>);

fn event(i: usize) -> Event {
    Event {
        event_id: format!("evt-{i:06}"),
        r#type: EventType::Play as i32,
        user_id: format!("user-{}", i % 50),
        occurred_at_ms: 1_700_000_000_000 + i as i64,
        ..Event::default()
    }
}

async fn run_pipeline(
    stream: &str,
    app: &str,
    sink: Arc<RecordingSink>,
    until_records: u64,
) -> ktk_pipeline::PipelineStats {
    let pipeline = Pipeline::new(
        PipelineConfig::default()
            .with_batch_window(Duration::from_secs(2), Duration::from_millis(500))
            .with_max_batch_records(300)
            .with_retry_backoff(Duration::from_millis(50), Duration::from_millis(200)),
        vec![sink.clone() as Arc<dyn Sink>],
    )
    .expect("valid pipeline");
    let factory = {
        let (pipeline, stream_name) = (pipeline.clone(), stream.to_string());
        move |shard: &str| DeliveryProcessor::new(&pipeline, &stream_name, shard)
    };
    let config = fast_worker_config(stream, app, "worker-a").with_empty_batches(true);
    let worker = Worker::new(config, &aws_config().await, factory).expect("config");
    let stop = CancellationToken::new();
    let handle = tokio::spawn(worker.run(stop.clone()));
    let started = std::time::Instant::now();
    loop {
        let stats = pipeline.stats();
        if stats.events_delivered + stats.dead_letters >= until_records {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "delivery stalled: {stats:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    handle.await.expect("task").expect("worker");
    pipeline.stats()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_delivered_once_poison_is_dead_lettered_and_batches_are_reproducible() {
    const UNIQUE: usize = 1_000;
    const DUPLICATED: usize = 20;
    let client = kinesis().await;
    let stream = unique_name("ktk-pipeline");
    create_stream(&client, &stream, 2).await;
    let producer =
        Producer::new(ProducerConfig::new(&stream).with_request_timeout(Duration::from_secs(60)), &aws_config().await)
            .await
            .expect("producer");
    let mut receipts = Vec::new();
    for i in 0..UNIQUE {
        let e = event(i);
        receipts.push(producer.put(Record::new(e.user_id.clone(), e.encode_to_vec())).await.expect("put"));
        // A producer retry that went through twice: the same event again.
        if i % 50 == 7 {
            receipts.push(producer.put(Record::new(e.user_id.clone(), e.encode_to_vec())).await.expect("put"));
        }
    }
    for r in receipts {
        r.await.expect("acknowledged");
    }
    producer.shutdown(Duration::from_secs(10)).await;
    let mut truncated = ktk_proto::aggregation::MAGIC.to_vec();
    truncated.extend_from_slice(&[0x0a, 0x05, b'a']);
    let no_id = Event { user_id: "u".into(), ..Event::default() }.encode_to_vec();
    for (key, data) in [("poison-1", vec![0xff, 0x00, 0x13, 0x37]), ("poison-2", no_id), ("poison-3", truncated)] {
        client.put_record().stream_name(&stream).partition_key(key).data(Blob::new(data)).send().await.expect("put");
    }

    let sink = Arc::new(RecordingSink::default());
    sink.fail_next.store(3, Ordering::SeqCst);
    let stats = run_pipeline(&stream, &unique_name("ktk-pipeline-app"), sink.clone(), (UNIQUE + 3) as u64).await;
    println!("first application: {stats:?}");
    assert_eq!(stats.events_delivered, UNIQUE as u64);
    assert_eq!(stats.duplicates(), DUPLICATED as u64, "every injected duplicate dropped and counted");
    assert_eq!(stats.dead_letters, 3);
    assert_eq!(stats.sink_errors, 3, "the failed writes were retried");
    let stored = sink.stored.lock().expect("lock").clone();
    assert_eq!(stored.len(), UNIQUE);
    // A duplicate in a later batch than its original stays in that batch (batches must not depend
    // on what this processor delivered before); only the injected duplicates can be there twice.
    for (id, n) in &stored {
        let i: usize = id.trim_start_matches("evt-").parse().expect("event id");
        assert!(*n == 1 || (*n == 2 && i % 50 == 7), "{id} reached the sink {n} times");
    }
    let batches = sink.batches.lock().expect("lock").clone();
    let reasons: Vec<String> = batches.iter().flat_map(|b| b.dead_letters.iter().map(|d| d.reason.clone())).collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("no event_id")), "{reasons:?}");

    // Another application over the same stream cuts the same batches.
    let again = Arc::new(RecordingSink::default());
    run_pipeline(&stream, &unique_name("ktk-pipeline-app2"), again.clone(), (UNIQUE + 3) as u64).await;
    let shape = |batches: &[Batch]| -> BTreeMap<BatchStart, BatchRest> {
        batches
            .iter()
            .map(|b| {
                (
                    (b.shard_id.clone(), b.first.0.clone(), b.first.1),
                    (b.last.0.clone(), b.last.1, b.events.iter().map(|e| e.event.event_id.clone()).collect()),
                )
            })
            .collect()
    };
    assert_eq!(shape(&again.batches.lock().expect("lock")), shape(&batches), "the same batches from the same records");
    delete_stream(&client, &stream).await;
}

/// A real-time store (an `Immediate` sink) gets the events as soon as they are read, long before
/// the batch window closes; the batch sink and the checkpoint wait for the batch. A graceful stop
/// abandons the open batch, so the checkpoint never passes what the batch sink holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn immediate_sinks_get_events_before_the_batch_closes_and_the_checkpoint_waits_for_the_batch() {
    const EVENTS: usize = 300;
    let client = kinesis().await;
    let stream = unique_name("ktk-pipeline-rt");
    create_stream(&client, &stream, 1).await;
    let producer =
        Producer::new(ProducerConfig::new(&stream).with_request_timeout(Duration::from_secs(60)), &aws_config().await)
            .await
            .expect("producer");
    let mut receipts = Vec::new();
    for i in 0..EVENTS {
        let e = event(i);
        receipts.push(producer.put(Record::new(e.user_id.clone(), e.encode_to_vec())).await.expect("put"));
    }
    for r in receipts {
        r.await.expect("acknowledged");
    }
    producer.shutdown(Duration::from_secs(10)).await;

    let store = Arc::new(RecordingSink { timing: SinkTiming::Immediate, ..RecordingSink::default() });
    let archive = Arc::new(RecordingSink::default());
    // A window far longer than the test: the batch never closes by time.
    let pipeline = Pipeline::new(
        PipelineConfig::default().with_batch_window(Duration::from_secs(3_600), Duration::from_secs(5)),
        vec![store.clone() as Arc<dyn Sink>, archive.clone() as Arc<dyn Sink>],
    )
    .expect("valid pipeline");
    let factory = {
        let (pipeline, stream_name) = (pipeline.clone(), stream.to_string());
        move |shard: &str| DeliveryProcessor::new(&pipeline, &stream_name, shard)
    };
    let app = unique_name("ktk-pipeline-rt-app");
    let config = fast_worker_config(&stream, &app, "worker-a").with_empty_batches(true);
    let worker = Worker::new(config, &aws_config().await, factory).expect("config");
    let stop = CancellationToken::new();
    let handle = tokio::spawn(worker.run(stop.clone()));
    let started = std::time::Instant::now();
    while store.stored.lock().expect("lock").len() < EVENTS {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the store did not get the events: {:?}",
            pipeline.stats()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("the immediate sink held all {EVENTS} events {:?} after the worker started", started.elapsed());
    assert!(archive.batches.lock().expect("lock").is_empty(), "the batch sink waits for the batch");
    assert_eq!(pipeline.stats().events_delivered, 0, "delivered counts acknowledged batches only");
    stop.cancel();
    handle.await.expect("task").expect("worker");

    let table = LeaseTable::new(&aws_config().await, &app);
    let listing = table.list().await.expect("leases");
    assert_eq!(listing.leases.len(), 1);
    assert_eq!(
        listing.leases[0].checkpoint,
        ExtendedSequenceNumber::TRIM_HORIZON,
        "no checkpoint before the batch sink acknowledged"
    );
    assert!(store.stored.lock().expect("lock").values().all(|n| *n == 1), "each event written once");
    delete_stream(&client, &stream).await;
}
