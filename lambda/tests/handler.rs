//! The handler on event fixtures, with in-process sinks: a plain record, a KPL aggregate, poison
//! records, duplicates, and sink failures in the middle of a batch (exact `batchItemFailures`,
//! exactly what each sink was given, and the health verdict naming the failing sink). Time is
//! paused, so retries take no real time.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_lambda_events::event::kinesis::KinesisEvent;
use futures::future::BoxFuture;
use ktk_lambda::{HandlerConfig, InvocationHealth, InvocationReport, KinesisHandler};
use ktk_pipeline::{Batch, Sink, SinkError, SinkReport};
use prost::Message as _;
use serde_json::json;
use tokio::time::Instant;

mod support;

use support::{SHARD, aggregate, batch_json, event, plain, sequence};

/// A sink that keeps what it was given, and fails the batches starting at a chosen Kinesis record
/// a chosen number of times.
#[derive(Debug, Default)]
struct FakeSink {
    name: &'static str,
    written: Mutex<Vec<Batch>>,
    fail_at: Option<String>,
    failures_left: AtomicU32,
    retryable: bool,
    attempts: AtomicU32,
}

impl FakeSink {
    fn ok(name: &'static str) -> Arc<Self> {
        Arc::new(FakeSink { name, ..FakeSink::default() })
    }

    fn failing(name: &'static str, at: &str, times: u32, retryable: bool) -> Arc<Self> {
        Arc::new(FakeSink {
            name,
            fail_at: Some(at.to_owned()),
            failures_left: AtomicU32::new(times),
            retryable,
            ..FakeSink::default()
        })
    }

    fn batches(&self) -> Vec<Batch> {
        self.written.lock().expect("lock").clone()
    }

    /// The event ids of every batch it took, batch by batch.
    fn event_ids(&self) -> Vec<Vec<String>> {
        self.batches().iter().map(|b| b.events.iter().map(|e| e.event.event_id.clone()).collect()).collect()
    }
}

impl Sink for FakeSink {
    fn name(&self) -> &str {
        self.name
    }

    fn write<'a>(&'a self, batch: &'a Batch) -> BoxFuture<'a, Result<SinkReport, SinkError>> {
        Box::pin(async move {
            self.attempts.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(5)).await;
            if self.fail_at.as_deref() == Some(batch.first.0.as_str())
                && self.failures_left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok()
            {
                return Err(SinkError::classified(self.name, "injected failure", self.retryable));
            }
            let mut written = self.written.lock().expect("lock");
            let duplicates = written
                .iter()
                .flat_map(|b| &b.events)
                .filter(|e| batch.events.iter().any(|n| n.event.event_id == e.event.event_id))
                .count() as u64;
            written.push(batch.clone());
            Ok(SinkReport { written: batch.events.len() as u64 - duplicates, duplicates, reread: 0 })
        })
    }
}

fn fixture(name: &str) -> KinesisEvent {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).expect("fixture");
    ktk_lambda::parse_event(serde_json::from_str(&text).expect("JSON")).expect("a KinesisEvent")
}

/// A mapping's batch: record `i` holds `data[i]`.
fn kinesis_event(data: &[Vec<u8>]) -> KinesisEvent {
    ktk_lambda::parse_event(batch_json(0, data)).expect("a KinesisEvent")
}

fn handler(config: HandlerConfig, sinks: &[&Arc<FakeSink>]) -> KinesisHandler {
    KinesisHandler::new(config, sinks.iter().map(|s| Arc::clone(s) as Arc<dyn Sink>).collect()).expect("valid handler")
}

fn in_a_minute() -> Instant {
    Instant::now() + Duration::from_secs(60)
}

fn failures(report: &InvocationReport) -> Vec<Option<String>> {
    report.response().batch_item_failures.into_iter().map(|f| f.item_identifier).collect()
}

#[tokio::test(start_paused = true)]
async fn a_plain_record_from_the_fixture_is_delivered() {
    let s3 = FakeSink::ok("s3");
    let store = FakeSink::ok("postgres");
    let report =
        handler(HandlerConfig::default(), &[&s3, &store]).handle(fixture("plain_record.json"), in_a_minute()).await;
    assert_eq!(failures(&report), Vec::<Option<String>>::new());
    assert_eq!(serde_json::to_value(report.response()).expect("json"), json!({ "batchItemFailures": [] }));
    assert_eq!(
        (report.records, report.user_records, report.delivery.events_delivered, report.delivery.batches),
        (1, 1, 1, 1)
    );
    for sink in [&s3, &store] {
        let batches = sink.batches();
        assert_eq!(batches.len(), 1);
        let batch = &batches[0];
        assert_eq!((batch.stream.as_str(), batch.shard_id.as_str()), ("app-events", SHARD));
        let seq = "49656910318244123456789012345678901234567890123456789012";
        assert_eq!((batch.first.clone(), batch.last.clone()), ((seq.to_owned(), 0), (seq.to_owned(), 0)));
        let record = &batch.events[0];
        assert_eq!(record.event.event_id, "plain-0001");
        assert_eq!(record.event.content_id, "content-42");
        assert_eq!(record.event.position_ms, 12_000);
        assert_eq!(record.sequence_number, seq);
        let arrival = record.arrival.expect("arrival").duration_since(std::time::UNIX_EPOCH).expect("after 1970");
        assert_eq!(arrival.as_millis(), 1_730_000_001_250);
        assert!(batch.dead_letters.is_empty());
    }
}

#[tokio::test(start_paused = true)]
async fn a_kpl_aggregate_is_deaggregated_with_sub_sequence_numbers() {
    let s3 = FakeSink::ok("s3");
    let event = kinesis_event(&[plain("p-0"), aggregate(&["a-0", "a-1", "a-2"]), plain("p-2")]);
    let report = handler(HandlerConfig::default(), &[&s3]).handle(event, in_a_minute()).await;
    assert!(report.failures.is_empty());
    assert_eq!((report.records, report.user_records, report.delivery.events_delivered), (3, 5, 5));
    let batches = s3.batches();
    assert_eq!(batches.len(), 1);
    let positions: Vec<_> = batches[0]
        .events
        .iter()
        .map(|e| (e.event.event_id.as_str(), e.sequence_number.clone(), e.sub_sequence_number))
        .collect();
    assert_eq!(
        positions,
        vec![
            ("p-0", sequence(0), 0),
            ("a-0", sequence(1), 0),
            ("a-1", sequence(1), 1),
            ("a-2", sequence(1), 2),
            ("p-2", sequence(2), 0),
        ]
    );
    assert_eq!(batches[0].first, (sequence(0), 0));
    assert_eq!(batches[0].last, (sequence(2), 0));
}

#[tokio::test(start_paused = true)]
async fn poison_records_go_to_the_dead_letters_and_are_not_failures() {
    let s3 = FakeSink::ok("s3");
    let mut truncated = aggregate(&["t-0", "t-1"]);
    truncated.truncate(truncated.len() - 7);
    let no_id = event("").encode_to_vec();
    let mut event = kinesis_event(&[plain("good-0"), vec![], no_id, truncated, plain("good-4")]);
    // The fixture's poison record (text, not an event) as a sixth record.
    let mut poison = fixture("poison_record.json").records.remove(0);
    poison.kinesis.sequence_number = sequence(5);
    event.records.push(poison);

    let report = handler(HandlerConfig::default(), &[&s3]).handle(event, in_a_minute()).await;
    assert_eq!(failures(&report), Vec::<Option<String>>::new(), "a poison record is never reported");
    assert_eq!((report.delivery.events_delivered, report.delivery.dead_letters, report.suspicious_records), (2, 4, 1));
    let batches = s3.batches();
    assert_eq!(batches.len(), 1);
    assert_eq!(s3.event_ids(), vec![vec!["good-0".to_owned(), "good-4".to_owned()]]);
    let letters: Vec<_> =
        batches[0].dead_letters.iter().map(|d| (d.sequence_number.clone(), d.reason.clone())).collect();
    assert_eq!(letters.len(), 4);
    assert_eq!(letters[0].0, sequence(1));
    assert!(letters[0].1.contains("no event_id"), "{letters:?}");
    assert_eq!(letters[1].0, sequence(2));
    assert!(letters[1].1.contains("no event_id"), "{letters:?}");
    assert_eq!(letters[2].0, sequence(3));
    assert!(letters[2].1.contains("not a valid KPL aggregate"), "{letters:?}");
    assert_eq!(letters[3].0, sequence(5));
    assert!(letters[3].1.contains("protobuf"), "{letters:?}");
    assert_eq!(batches[0].dead_letters[3].data.as_ref(), b"hello, not an event");
    assert_eq!(batches[0].dead_letters[3].partition_key, "user-7");
}

#[tokio::test(start_paused = true)]
async fn a_sink_failure_in_the_middle_reports_the_first_record_of_the_first_unwritten_batch() {
    // Six plain records, two per batch; the store fails the second batch (records 2 and 3) every
    // time. S3 takes it (sinks are written at once), but nothing after it is written anywhere.
    let s3 = FakeSink::ok("s3");
    let store = FakeSink::failing("postgres", &sequence(2), u32::MAX, true);
    let config = HandlerConfig::default().with_max_batch_records(2).with_max_attempts(3);
    let handler = handler(config, &[&s3, &store]);
    let ids = ["e-0", "e-1", "e-2", "e-3", "e-4", "e-5"];
    let data: Vec<_> = ids.iter().map(|id| plain(id)).collect();
    let started = Instant::now();
    let report = handler.handle(kinesis_event(&data), in_a_minute()).await;
    assert_eq!(failures(&report), vec![Some(sequence(2))]);
    assert_eq!(
        serde_json::to_value(report.response()).expect("json"),
        json!({ "batchItemFailures": [{ "itemIdentifier": sequence(2) }] })
    );
    assert_eq!(store.event_ids(), vec![vec!["e-0", "e-1"]]);
    assert_eq!(s3.event_ids(), vec![vec!["e-0", "e-1"], vec!["e-2", "e-3"]]);
    assert_eq!(store.attempts.load(Ordering::Relaxed), 1 + 3, "one write of batch 1, three of batch 2");
    assert_eq!((report.delivery.batches, report.delivery.events_delivered, report.delivery.sink_errors), (1, 2, 3));
    assert!(started.elapsed() < Duration::from_secs(10), "retried with a short backoff: {:?}", started.elapsed());
    // The health verdict: the store is failing, S3 is not.
    let failing: Vec<&str> = report.health.failing_sinks.iter().map(|f| f.sink.as_str()).collect();
    assert_eq!(failing, ["postgres"], "{report:?}");
    assert!(report.health.is_sink_failing());
    let reasons = report.health.reasons();
    assert!(reasons[0].starts_with("sink postgres has failed every write for "), "{reasons:?}");

    // The mapping retries from record 2. The store works again: everything from there is
    // written. S3 already had batch 2 but the store did not: an event is a sink duplicate only
    // when every sink had it, so batch 2 counts as delivered now (as on ECS).
    store.failures_left.store(0, Ordering::Relaxed);
    let report = handler.handle(retried_from(kinesis_event(&data), 2), in_a_minute()).await;
    assert!(report.failures.is_empty(), "{report:?}");
    assert!(!report.health.is_sink_failing(), "the store took a write since: {report:?}");
    assert_eq!(store.event_ids(), vec![vec!["e-0", "e-1"], vec!["e-2", "e-3"], vec!["e-4", "e-5"]]);
    assert_eq!(s3.event_ids()[2..], [vec!["e-2", "e-3"], vec!["e-4", "e-5"]]);
    assert_eq!((report.delivery.events_delivered, report.delivery.duplicates_in_sinks), (4, 0));
}

#[tokio::test(start_paused = true)]
async fn a_transient_sink_failure_is_retried_within_the_invocation() {
    let store = FakeSink::failing("postgres", &sequence(0), 2, true);
    let data: Vec<_> = ["e-0", "e-1"].iter().map(|id| plain(id)).collect();
    let report = handler(HandlerConfig::default(), &[&store]).handle(kinesis_event(&data), in_a_minute()).await;
    assert!(report.failures.is_empty());
    assert_eq!((report.delivery.sink_errors, report.delivery.events_delivered), (2, 2));
    assert_eq!(store.attempts.load(Ordering::Relaxed), 3);
    assert_eq!(report.health, InvocationHealth::default(), "the latest write succeeded");
}

#[tokio::test(start_paused = true)]
async fn a_non_retryable_failure_is_reported_at_once() {
    let store = FakeSink::failing("postgres", &sequence(0), u32::MAX, false);
    let data: Vec<_> = ["e-0", "e-1"].iter().map(|id| plain(id)).collect();
    let report = handler(HandlerConfig::default(), &[&store]).handle(kinesis_event(&data), in_a_minute()).await;
    assert_eq!(failures(&report), vec![Some(sequence(0))]);
    assert_eq!(store.attempts.load(Ordering::Relaxed), 1);
}

#[tokio::test(start_paused = true)]
async fn retries_stop_before_the_deadline() {
    // Many attempts allowed, but the invocation has 5 s: the handler answers before the deadline
    // less the margin, reporting the first record.
    let store = FakeSink::failing("postgres", &sequence(0), u32::MAX, true);
    let config = HandlerConfig::default()
        .with_max_attempts(1_000)
        .with_retry_backoff(Duration::from_millis(200), Duration::from_secs(1))
        .with_deadline_margin(Duration::from_secs(1));
    let deadline = Instant::now() + Duration::from_secs(5);
    let report = handler(config, &[&store]).handle(kinesis_event(&[plain("e-0")]), deadline).await;
    assert_eq!(failures(&report), vec![Some(sequence(0))]);
    assert!(Instant::now() <= deadline - Duration::from_secs(1), "answered {:?} late", Instant::now() - deadline);
    assert!(store.attempts.load(Ordering::Relaxed) > 3);

    // No time left at all: nothing is attempted.
    let store = FakeSink::ok("postgres");
    let report = handler(HandlerConfig::default(), &[&store])
        .handle(kinesis_event(&[plain("e-0")]), Instant::now() + Duration::from_millis(500))
        .await;
    assert_eq!(failures(&report), vec![Some(sequence(0))]);
    assert_eq!(store.attempts.load(Ordering::Relaxed), 0);
    assert_eq!(report.delivery.sink_errors, 0, "nothing attempted, nothing failed");
}

#[tokio::test(start_paused = true)]
async fn duplicates_are_dropped_within_an_invocation_and_across_warm_invocations() {
    let store = FakeSink::ok("postgres");
    let handler = handler(HandlerConfig::default(), &[&store]);
    let data = vec![plain("e-0"), plain("e-1"), plain("e-0"), aggregate(&["e-1", "e-2"])];
    let report = handler.handle(kinesis_event(&data), in_a_minute()).await;
    assert_eq!((report.delivery.events_delivered, report.delivery.duplicates_in_memory), (3, 2));
    assert_eq!(store.event_ids(), vec![vec!["e-0", "e-1", "e-2"]]);
    let batch = &store.batches()[0];
    assert_eq!(batch.last, (sequence(3), 1), "a batch spans its duplicates too");

    // The same records again (a producer retry, or the mapping after a timeout): the container
    // remembers them and counts them as duplicates. They stay in the batch a batch sink gets (so
    // S3 objects are the same bytes whoever writes them), and no real-time store gets them.
    let report = handler.handle(kinesis_event(&data), in_a_minute()).await;
    assert!(report.failures.is_empty());
    assert_eq!(
        (report.delivery.events_delivered, report.delivery.duplicates_in_memory, report.delivery.batches),
        (0, 5, 1)
    );
    assert_eq!(store.batches().len(), 2);
    assert_eq!(store.batches()[1], store.batches()[0], "the same batch, rebuilt");
}

#[tokio::test(start_paused = true)]
async fn batches_are_cut_between_kinesis_records_never_inside_an_aggregate() {
    let store = FakeSink::ok("postgres");
    let config = HandlerConfig::default().with_max_batch_records(2);
    let data = vec![plain("e-0"), aggregate(&["a-0", "a-1", "a-2"]), plain("e-4"), plain("e-5")];
    let report = handler(config, &[&store]).handle(kinesis_event(&data), in_a_minute()).await;
    assert!(report.failures.is_empty());
    // The aggregate would take the first batch past 2 records: it starts the next one, and, being
    // larger than the limit alone, is a batch of its own.
    assert_eq!(store.event_ids(), vec![vec!["e-0"], vec!["a-0", "a-1", "a-2"], vec!["e-4", "e-5"]]);
    assert_eq!(report.delivery.batches, 3);
}

#[tokio::test(start_paused = true)]
async fn each_shard_of_an_event_is_delivered_and_reported_on_its_own() {
    let store = FakeSink::failing("postgres", &sequence(1), u32::MAX, false);
    let mut event = kinesis_event(&[plain("e-0"), plain("e-1")]);
    event.records[1].event_id = Some(format!("shardId-000000000009:{}", sequence(1)));
    let report = handler(HandlerConfig::default().with_stream("renamed"), &[&store]).handle(event, in_a_minute()).await;
    assert_eq!(failures(&report), vec![Some(sequence(1))]);
    let batches = store.batches();
    assert_eq!(batches.len(), 1);
    assert_eq!((batches[0].stream.as_str(), batches[0].shard_id.as_str()), ("renamed", SHARD));
}

/// The mapping's retry of a batch from its `n`th record.
fn retried_from(mut event: KinesisEvent, n: usize) -> KinesisEvent {
    event.records.drain(..n);
    event
}
