//! The producer's logic against an in-process fake Kinesis that can fail, throttle, stall and
//! reshard on cue. (The same behaviour is tested against LocalStack in `tests/`.) Time is paused,
//! so backoffs, TTLs and buffering times run instantly and deterministically.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use ktk_producer::api::{CallError, Entry, EntryResult, KinesisApi, Retry, ShardInfo, even_shards};
use ktk_producer::{Producer, ProducerConfig, PutErrorKind, Record};
use ktk_proto::aggregation::Deaggregator;
use ktk_proto::keys::{HashKeyRange, effective_hash_key};

/// What the fake does with one call.
#[derive(Clone, Debug)]
enum Plan {
    /// Fail the whole call.
    Call(CallError),
    /// Fail the entries at these indices with this code.
    Entries(Vec<usize>, &'static str),
    /// Take `Duration` to answer (then succeed).
    Stall(Duration),
    /// Store the records at once, then take `Duration` to answer: the answer is late, the
    /// records are already in the stream (what a client that gives up cannot tell from a loss).
    AnswerLate(Duration),
}

#[derive(Default)]
struct FakeKinesis {
    shards: Mutex<Vec<ShardInfo>>,
    /// Accepted entries per shard, with their sequence numbers, in sequence order.
    stored: Mutex<HashMap<String, Vec<(u64, Entry)>>>,
    plans: Mutex<VecDeque<Plan>>,
    /// When set, every call fails like this (after the plans are used up).
    always: Mutex<Option<Plan>>,
    calls: AtomicUsize,
    list_calls: AtomicUsize,
    sequence: AtomicU64,
}

impl FakeKinesis {
    fn new(shards: usize) -> Arc<Self> {
        let fake = FakeKinesis::default();
        *fake.shards.lock().expect("lock") = even_shards(shards);
        Arc::new(fake)
    }

    fn plan(&self, plan: Plan) {
        self.plans.lock().expect("lock").push_back(plan);
    }

    /// Splits the shard that owns hash key 0 into two children.
    fn split_first_shard(&self) {
        let mut shards = self.shards.lock().expect("lock");
        let parent = shards.iter_mut().find(|s| s.open && s.range.contains(0)).expect("a first shard");
        parent.open = false;
        let (start, end) = (parent.range.start, parent.range.end);
        let middle = start + (end - start) / 2;
        shards.push(ShardInfo { shard_id: "child-a".into(), range: HashKeyRange { start, end: middle }, open: true });
        shards.push(ShardInfo {
            shard_id: "child-b".into(),
            range: HashKeyRange { start: middle + 1, end },
            open: true,
        });
    }

    /// Every user record stored, deaggregated: (shard, partition key, data), in the order of
    /// their sequence and sub-sequence numbers (the order a consumer sees them per shard).
    fn user_records(&self) -> Vec<(String, String, Bytes)> {
        let stored = self.stored.lock().expect("lock");
        let mut entries: Vec<(u64, &String, &Entry)> =
            stored.iter().flat_map(|(shard, list)| list.iter().map(move |(seq, e)| (*seq, shard, e))).collect();
        entries.sort_by_key(|(seq, _, _)| *seq);
        let mut out = Vec::new();
        for (_, shard, entry) in entries {
            let d = Deaggregator::new().deaggregate(
                entry.data.clone(),
                &entry.partition_key,
                entry.explicit_hash_key.as_deref(),
            );
            for r in d.records {
                out.push((shard.clone(), r.partition_key.to_string(), r.data));
            }
        }
        out
    }

    fn kinesis_records(&self) -> usize {
        self.stored.lock().expect("lock").values().map(Vec::len).sum()
    }
}

impl KinesisApi for FakeKinesis {
    fn put_records<'a>(
        &'a self,
        _stream: &'a str,
        entries: Vec<Entry>,
    ) -> BoxFuture<'a, Result<Vec<EntryResult>, CallError>> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let plan = {
                let next = self.plans.lock().expect("lock").pop_front();
                next.or_else(|| self.always.lock().expect("lock").clone())
            };
            let mut failing: Vec<usize> = Vec::new();
            let mut code = "";
            let mut answer_after = None;
            match plan {
                Some(Plan::Call(error)) => return Err(error),
                Some(Plan::Entries(indices, c)) => {
                    failing = indices;
                    code = c;
                }
                Some(Plan::Stall(duration)) => tokio::time::sleep(duration).await,
                Some(Plan::AnswerLate(duration)) => answer_after = Some(duration),
                None => {}
            }
            let results = self.store(entries, &failing, code);
            if let Some(duration) = answer_after {
                tokio::time::sleep(duration).await;
            }
            Ok(results)
        })
    }

    fn list_shards<'a>(&'a self, _stream: &'a str) -> BoxFuture<'a, Result<Vec<ShardInfo>, CallError>> {
        Box::pin(async move {
            self.list_calls.fetch_add(1, Ordering::SeqCst);
            Ok(self.shards.lock().expect("lock").clone())
        })
    }
}

impl FakeKinesis {
    /// Stores the entries (but those at `failing`, which fail with `code`) and gives their results.
    fn store(&self, entries: Vec<Entry>, failing: &[usize], code: &str) -> Vec<EntryResult> {
        let shards = self.shards.lock().expect("lock").clone();
        let mut stored = self.stored.lock().expect("lock");
        entries
            .into_iter()
            .enumerate()
            .map(|(i, entry)| {
                if std::env::var("FAKE_DEBUG").is_ok() {
                    let d = Deaggregator::new().deaggregate(entry.data.clone(), &entry.partition_key, None);
                    let ids: Vec<String> =
                        d.records.iter().map(|r| String::from_utf8_lossy(&r.data[6..]).into_owned()).collect();
                    eprintln!(
                        "call {} entry {i} ehk {:?} failing {} ids {:?}",
                        self.calls.load(Ordering::SeqCst),
                        entry.explicit_hash_key.as_deref().map(|s| &s[..4]),
                        failing.contains(&i),
                        &ids[..ids.len().min(4)]
                    );
                }
                if failing.contains(&i) {
                    return EntryResult::Failed { code: code.into(), message: "injected".into() };
                }
                let hash = effective_hash_key(&entry.partition_key, entry.explicit_hash_key.as_deref()).expect("valid");
                let shard =
                    shards.iter().find(|s| s.open && s.range.contains(hash)).expect("open shards cover the space");
                let sequence = self.sequence.fetch_add(1, Ordering::SeqCst);
                stored.entry(shard.shard_id.clone()).or_default().push((sequence, entry));
                EntryResult::Put { shard_id: shard.shard_id.clone(), sequence_number: format!("{sequence:020}") }
            })
            .collect()
    }
}

fn key_index(key: &str) -> usize {
    key.trim_start_matches("user-").parse().expect("user-N")
}

fn record(i: usize, keys: usize) -> Record {
    Record::new(format!("user-{}", i % keys), format!("event-{i:06}"))
}

/// Puts `n` records from one task and awaits every receipt; returns the outcomes in order.
async fn put_all(
    producer: &Producer,
    n: usize,
    keys: usize,
) -> Vec<Result<ktk_producer::PutOutcome, ktk_producer::PutError>> {
    let mut receipts = Vec::with_capacity(n);
    for i in 0..n {
        receipts.push(producer.put(record(i, keys)).await.expect("accepted"));
    }
    let mut out = Vec::with_capacity(n);
    for receipt in receipts {
        out.push(receipt.await);
    }
    out
}

/// Every record stored exactly once, and per key in the order put.
fn assert_exactly_once_in_order(fake: &FakeKinesis, n: usize, keys: usize) {
    assert_exactly_once(fake, n, keys, true);
}

fn assert_exactly_once(fake: &FakeKinesis, n: usize, keys: usize, in_order: bool) {
    let stored = fake.user_records();
    assert_eq!(stored.len(), n, "every record stored once");
    let mut per_key: HashMap<String, Vec<usize>> = HashMap::new();
    for (_, key, data) in &stored {
        let i: usize = std::str::from_utf8(&data[6..]).expect("utf8").parse().expect("number");
        per_key.entry(key.clone()).or_default().push(i);
    }
    assert_eq!(per_key.len(), keys.min(n));
    for (key, mut ids) in per_key {
        if in_order {
            assert!(ids.windows(2).all(|w| w[0] < w[1]), "key {key} out of order: {ids:?}");
        }
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), n / keys + usize::from(key_index(&key) < n % keys), "key {key}: duplicates or gaps");
    }
}

#[tokio::test(start_paused = true)]
async fn every_record_lands_once_aggregated_and_in_order() {
    let fake = FakeKinesis::new(4);
    let producer = Producer::with_api(ProducerConfig::new("s"), fake.clone()).await.expect("starts");
    let n = 20_000;
    let outcomes = put_all(&producer, n, 100).await;
    for (i, outcome) in outcomes.iter().enumerate() {
        let outcome = outcome.as_ref().unwrap_or_else(|e| panic!("record {i}: {e}"));
        assert!(outcome.aggregated());
        assert_eq!(outcome.attempts().len(), 1);
        assert!(outcome.attempts()[0].succeeded());
        // The receipt names the shard the record's hash key belongs to.
        let hash = effective_hash_key(&format!("user-{}", i % 100), None).expect("hash");
        let shard = even_shards(4).into_iter().find(|s| s.range.contains(hash)).expect("shard");
        assert_eq!(outcome.shard_id(), shard.shard_id.as_str());
    }
    assert_exactly_once_in_order(&fake, n, 100);
    // Each stored user record sits on the shard its hash key belongs to.
    for (shard, key, _) in fake.user_records() {
        let hash = effective_hash_key(&key, None).expect("hash");
        let owner = even_shards(4).into_iter().find(|s| s.range.contains(hash)).expect("shard");
        assert_eq!(owner.shard_id, shard);
    }
    // Counted as soon as the receipts resolve, not only after shutdown.
    assert_eq!(producer.stats().user_records_put, n as u64);
    let stats = producer.shutdown(Duration::from_secs(5)).await;
    assert_eq!(stats.user_records_put, n as u64);
    assert!(stats.user_records_per_kinesis_record() > 50.0, "aggregation happened: {stats:?}");
    assert!(stats.put_records_calls < 100, "few calls: {stats:?}");
    assert_eq!(stats.kinesis_records_put as usize, fake.kinesis_records());
}

/// Without strict ordering, a call with several entries for one shard can have one fail and the
/// next succeed (Kinesis writes the rest): nothing is lost or doubled, but order can break.
#[tokio::test(start_paused = true)]
async fn partial_failures_lose_nothing() {
    let fake = FakeKinesis::new(2);
    for _ in 0..5 {
        fake.plan(Plan::Entries(vec![0, 3], "ProvisionedThroughputExceededException"));
    }
    fake.plan(Plan::Entries(vec![1], "InternalFailure"));
    let config = ProducerConfig::new("s").with_aggregation_max_size(1024);
    let producer = Producer::with_api(config, fake.clone()).await.expect("starts");
    let outcomes = put_all(&producer, 3_000, 50).await;
    assert!(outcomes.iter().all(Result::is_ok));
    assert_exactly_once(&fake, 3_000, 50, false);
    let stats = producer.shutdown(Duration::from_secs(5)).await;
    assert!(stats.retries > 0 && stats.throttled > 0, "{stats:?}");
    assert_eq!(stats.user_records_put, 3_000);
}

#[tokio::test(start_paused = true)]
async fn with_strict_ordering_failed_records_go_before_newer_ones_of_their_shard() {
    let fake = FakeKinesis::new(2);
    for _ in 0..5 {
        fake.plan(Plan::Entries(vec![0], "ProvisionedThroughputExceededException"));
    }
    fake.plan(Plan::Call(CallError { code: "InternalFailure".into(), message: "boom".into(), retry: Retry::Yes }));
    let config = ProducerConfig::new("s").with_aggregation_max_size(1024).with_strict_ordering(true);
    let producer = Producer::with_api(config, fake.clone()).await.expect("starts");
    let n = 3_000;
    let outcomes = put_all(&producer, n, 50).await;
    let retried = outcomes.iter().filter(|o| o.as_ref().map(|o| o.attempts().len() > 1).unwrap_or(false)).count();
    assert!(outcomes.iter().all(Result::is_ok));
    assert!(retried > 0, "some records needed more than one attempt");
    let with_throttle = outcomes
        .iter()
        .filter_map(|o| o.as_ref().ok())
        .find(|o| {
            o.attempts().iter().any(|a| a.error_code.as_deref() == Some("ProvisionedThroughputExceededException"))
        })
        .expect("a throttled record");
    assert!(with_throttle.attempts().last().is_some_and(|a| a.succeeded()));
    assert_exactly_once_in_order(&fake, n, 50);
    let stats = producer.shutdown(Duration::from_secs(5)).await;
    assert!(stats.retries > 0 && stats.throttled > 0, "{stats:?}");
}

#[tokio::test(start_paused = true)]
async fn records_expire_with_their_attempts_when_kinesis_keeps_throttling() {
    let fake = FakeKinesis::new(1);
    *fake.always.lock().expect("lock") = Some(Plan::Call(CallError {
        code: "ProvisionedThroughputExceededException".into(),
        message: "slow down".into(),
        retry: Retry::Throttled,
    }));
    let config = ProducerConfig::new("s").with_record_ttl(Duration::from_secs(2));
    let producer = Producer::with_api(config, fake.clone()).await.expect("starts");
    let receipt = producer.put(Record::new("k", "payload")).await.expect("accepted");
    let error = receipt.await.expect_err("expires");
    assert_eq!(error.kind(), &PutErrorKind::Expired);
    assert_eq!(error.record().data, Bytes::from_static(b"payload"));
    assert!(error.attempts().len() >= 2, "retried before expiring: {:?}", error.attempts());
    assert!(error.attempts().iter().all(|a| a.error_code.as_deref() == Some("ProvisionedThroughputExceededException")));
    let stats = producer.stats();
    assert_eq!((stats.user_records_expired, stats.user_records_put), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn fail_if_throttled_fails_at_the_first_throttle() {
    let fake = FakeKinesis::new(1);
    fake.plan(Plan::Entries(vec![0], "ProvisionedThroughputExceededException"));
    let producer =
        Producer::with_api(ProducerConfig::new("s").with_fail_if_throttled(true), fake.clone()).await.expect("starts");
    let error = producer.put(Record::new("k", "x")).await.expect("accepted").await.expect_err("throttled");
    assert_eq!(error.kind(), &PutErrorKind::Throttled);
    assert_eq!(error.attempts().len(), 1);
    assert!(!error.is_retryable() || error.kind() == &PutErrorKind::Throttled);
}

#[tokio::test(start_paused = true)]
async fn errors_retrying_cannot_fix_fail_at_once_with_the_record() {
    let fake = FakeKinesis::new(1);
    fake.plan(Plan::Call(CallError {
        code: "ResourceNotFoundException".into(),
        message: "no stream".into(),
        retry: Retry::No,
    }));
    let producer = Producer::with_api(ProducerConfig::new("s"), fake.clone()).await.expect("starts");
    let error = producer.put(Record::new("k", "x")).await.expect("accepted").await.expect_err("rejected");
    assert!(matches!(error.kind(), PutErrorKind::Rejected { code, .. } if code == "ResourceNotFoundException"));
    assert_eq!(error.record().partition_key, "k");
    assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn bad_records_come_back_at_once() {
    let fake = FakeKinesis::new(1);
    let producer = Producer::with_api(ProducerConfig::new("s"), fake.clone()).await.expect("starts");
    let empty_key = producer.put(Record::new("", "x")).await.expect_err("invalid");
    assert!(matches!(empty_key.kind(), PutErrorKind::InvalidRecord(ktk_proto::Error::EmptyPartitionKey)));
    let bad_hash = producer.put(Record::new("k", "x").with_explicit_hash_key("-1")).await.expect_err("invalid");
    assert!(matches!(bad_hash.kind(), PutErrorKind::InvalidRecord(_)));
    assert_eq!(bad_hash.record().explicit_hash_key.as_deref(), Some("-1"));
    let big = producer.try_put(Record::new("k", vec![0u8; 1024 * 1024])).expect_err("too large");
    assert!(
        matches!(big.kind(), PutErrorKind::TooLarge { size, max } if *size == 1024 * 1024 + 1 && *max == 1024 * 1024)
    );
    assert_eq!(big.into_record().data.len(), 1024 * 1024);
    assert_eq!(fake.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn a_full_producer_hands_records_back_and_put_waits_for_room() {
    let fake = FakeKinesis::new(1);
    fake.plan(Plan::Stall(Duration::from_millis(1_500)));
    let config = ProducerConfig::new("s").with_max_outstanding_records(10).with_put_timeout(Duration::from_secs(1));
    let producer = Producer::with_api(config, fake.clone()).await.expect("starts");
    let mut receipts = Vec::new();
    for i in 0..10 {
        receipts.push(producer.try_put(record(i, 3)).expect("room for ten"));
    }
    let full = producer.try_put(record(10, 3)).expect_err("full");
    assert_eq!(full.kind(), &PutErrorKind::Full);
    assert_eq!(full.record(), &record(10, 3));
    // `put` waits up to its timeout, then hands the record back too.
    let timed_out = producer.put(record(11, 3)).await.expect_err("timeout");
    assert_eq!(timed_out.kind(), &PutErrorKind::Timeout);
    // Once the stalled call returns, there is room again and `put` goes through.
    let late = producer.put(record(12, 3)).await.expect("room after the stall");
    for receipt in receipts {
        receipt.await.expect("put");
    }
    late.await.expect("put");
}

#[tokio::test(start_paused = true)]
async fn flush_resolves_once_everything_before_it_is_put() {
    let fake = FakeKinesis::new(2);
    let config = ProducerConfig::new("s").with_record_max_buffered_time(Duration::from_secs(3600));
    let producer = Producer::with_api(config, fake.clone()).await.expect("starts");
    let receipts: Vec<_> = (0..100).map(|i| producer.try_put(record(i, 7)).expect("room")).collect();
    // An hour of buffering time: only the flush sends them.
    producer.flush().await;
    assert_eq!(fake.user_records().len(), 100);
    // The counts are up to date when the flush returns.
    assert_eq!(producer.stats().user_records_put, 100);
    for receipt in receipts {
        receipt.await.expect("put");
    }
}

#[tokio::test(start_paused = true)]
async fn shutdown_answers_every_receipt_even_when_kinesis_hangs() {
    let fake = FakeKinesis::new(1);
    *fake.always.lock().expect("lock") = Some(Plan::Stall(Duration::from_secs(3600)));
    let producer = Producer::with_api(ProducerConfig::new("s"), fake.clone()).await.expect("starts");
    let receipts: Vec<_> = (0..50).map(|i| producer.try_put(record(i, 5)).expect("room")).collect();
    tokio::time::sleep(Duration::from_millis(500)).await; // let the first call go out
    let stats = producer.shutdown(Duration::from_secs(2)).await;
    let mut in_flight = 0;
    for receipt in receipts {
        let error = receipt.await.expect_err("shut down");
        match error.kind() {
            PutErrorKind::ShutDown { in_flight: true } => in_flight += 1,
            PutErrorKind::ShutDown { in_flight: false } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(in_flight > 0, "the stalled call's records are reported as possibly put");
    assert_eq!(stats.user_records_failed, 50);
    let after = producer.put(record(0, 1)).await.expect_err("closed");
    assert_eq!(after.kind(), &PutErrorKind::ShutDown { in_flight: false });
}

#[tokio::test(start_paused = true)]
async fn a_split_while_producing_loses_nothing_and_later_records_use_the_children() {
    let fake = FakeKinesis::new(2);
    let config = ProducerConfig::new("s").with_shard_map_min_refresh_interval(Duration::from_millis(10));
    let producer = Producer::with_api(config, fake.clone()).await.expect("starts");
    let first = put_all(&producer, 2_000, 200).await;
    assert!(first.iter().all(Result::is_ok));
    fake.split_first_shard();
    // Records predicted for the closed parent land on a child: the producer notices and
    // refreshes its map, and the records after that are aggregated for the children.
    let mut receipts = Vec::new();
    for i in 2_000..6_000 {
        receipts.push(producer.put(record(i, 200)).await.expect("accepted"));
        if i % 500 == 0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let mut on_children = 0;
    for receipt in receipts {
        let outcome = receipt.await.expect("put");
        if outcome.shard_id().starts_with("child-") {
            on_children += 1;
        }
    }
    assert!(on_children > 0);
    assert_exactly_once_in_order(&fake, 6_000, 200);
    let stats = producer.shutdown(Duration::from_secs(5)).await;
    assert!(stats.shard_map_refreshes >= 1 && stats.mispredicted >= 1, "{stats:?}");
    assert!(fake.list_calls.load(Ordering::SeqCst) >= 2);
}

#[tokio::test(start_paused = true)]
async fn aggregation_off_sends_one_kinesis_record_per_user_record() {
    let fake = FakeKinesis::new(2);
    let producer =
        Producer::with_api(ProducerConfig::new("s").with_aggregation(false), fake.clone()).await.expect("starts");
    let outcomes = put_all(&producer, 300, 10).await;
    assert!(outcomes.iter().all(|o| { o.as_ref().is_ok_and(|o| !o.aggregated() && o.sub_sequence_number() == 0) }));
    assert_eq!(fake.kinesis_records(), 300);
    assert_exactly_once_in_order(&fake, 300, 10);
}

#[tokio::test(start_paused = true)]
async fn the_rate_limit_holds_a_shard_to_its_quota() {
    let fake = FakeKinesis::new(1);
    // 10% of 1,000 records/s: 100 Kinesis records per second, one user record each.
    let config = ProducerConfig::new("s").with_aggregation(false).with_rate_limit_percent(10);
    let producer = Producer::with_api(config, fake.clone()).await.expect("starts");
    let start = tokio::time::Instant::now();
    let outcomes = put_all(&producer, 300, 10).await;
    assert!(outcomes.iter().all(Result::is_ok));
    let elapsed = start.elapsed();
    // 100 go at once (a full bucket), the other 200 take two seconds.
    assert!(elapsed >= Duration::from_millis(1_900) && elapsed <= Duration::from_secs(3), "{elapsed:?}");
}

#[tokio::test(start_paused = true)]
async fn a_missing_stream_fails_at_start_with_a_clear_message() {
    struct Missing;
    impl KinesisApi for Missing {
        fn put_records<'a>(&'a self, _: &'a str, _: Vec<Entry>) -> BoxFuture<'a, Result<Vec<EntryResult>, CallError>> {
            Box::pin(async { Ok(vec![]) })
        }
        fn list_shards<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<Vec<ShardInfo>, CallError>> {
            Box::pin(async {
                Err(CallError {
                    code: "ResourceNotFoundException".into(),
                    message: "Stream nope not found".into(),
                    retry: Retry::No,
                })
            })
        }
    }
    let error = Producer::with_api(ProducerConfig::new("nope"), Arc::new(Missing)).await.expect_err("no stream");
    let message = error.to_string();
    assert!(message.contains("nope") && message.contains("ResourceNotFoundException"), "{message}");
    let bad = Producer::with_api(ProducerConfig::new("s").with_collection_max_count(0), FakeKinesis::new(1)).await;
    assert!(bad.expect_err("invalid").to_string().contains("collection_max_count"));
}

#[tokio::test(start_paused = true)]
async fn records_behind_the_rate_limit_wait_unadmitted_and_none_expire() {
    let fake = FakeKinesis::new(1);
    // 1% of the quota: 10 Kinesis records per second; one user record per Kinesis record. The
    // shard admits one second's worth (10) at a time; the rest wait without their TTL running.
    let config = ProducerConfig::new("s")
        .with_aggregation(false)
        .with_rate_limit_percent(1)
        .with_record_ttl(Duration::from_millis(1_500));
    let producer = Producer::with_api(config, fake.clone()).await.expect("starts");
    let start = tokio::time::Instant::now();
    let outcomes = put_all(&producer, 60, 6).await;
    assert!(outcomes.iter().all(Result::is_ok), "the caller is slowed down, nothing expires");
    // A full bucket (10) at once, then 10/s: the last of 60 after about 5 s.
    let elapsed = start.elapsed();
    assert!(elapsed >= Duration::from_millis(4_500) && elapsed <= Duration::from_secs(7), "{elapsed:?}");
    assert_exactly_once_in_order(&fake, 60, 6);
    assert_eq!(producer.stats().user_records_expired, 0);
}

#[tokio::test(start_paused = true)]
async fn records_the_rate_limit_holds_longer_than_their_ttl_expire_instead_of_going_late() {
    let fake = FakeKinesis::new(1);
    // 10 records/s; a window of 10 admitted at once takes up to a second to go, more than the
    // TTL of 300 ms: the last ones of each window expire, never sent.
    let config = ProducerConfig::new("s")
        .with_aggregation(false)
        .with_rate_limit_percent(1)
        .with_record_ttl(Duration::from_millis(300));
    let producer = Producer::with_api(config, fake.clone()).await.expect("starts");
    let outcomes = put_all(&producer, 60, 6).await;
    let put = outcomes.iter().filter(|o| o.is_ok()).count();
    let expired: Vec<_> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    assert!(expired.iter().all(|e| e.kind() == &PutErrorKind::Expired && e.attempts().is_empty()));
    assert!(put >= 10 && !expired.is_empty(), "{put} put, {} expired", expired.len());
    assert_eq!(put + expired.len(), 60);
    assert_eq!(fake.user_records().len(), put, "expired records were never sent");
    assert_eq!(producer.stats().user_records_expired as usize, expired.len());
}

/// Puts `n` records and awaits them while noting the concurrency limit every 100 ms; returns
/// the outcomes and the limits seen.
async fn put_all_sampling(
    producer: &Producer,
    n: usize,
    keys: usize,
) -> (Vec<Result<ktk_producer::PutOutcome, ktk_producer::PutError>>, Vec<u64>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sampler = {
        let (producer, seen) = (producer.clone(), Arc::clone(&seen));
        tokio::spawn(async move {
            loop {
                seen.lock().expect("lock").push(producer.stats().concurrency_limit);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let outcomes = put_all(producer, n, keys).await;
    sampler.abort();
    let mut seen = std::mem::take(&mut *seen.lock().expect("lock"));
    seen.push(producer.stats().concurrency_limit);
    (outcomes, seen)
}

#[tokio::test(start_paused = true)]
async fn a_kinesis_slower_than_the_timeout_gets_fewer_calls_and_longer_timeouts_and_nothing_expires() {
    // Enough records that the fast phase takes a few hundred calls: the limit grows back by one
    // per window of healthy answers.
    const N: usize = 40_000;
    let fake = FakeKinesis::new(8);
    // Every call takes 3 s, three times the request timeout; 8 shards, up to 8 calls at once.
    *fake.always.lock().expect("lock") = Some(Plan::Stall(Duration::from_secs(3)));
    let config = ProducerConfig::new("s")
        .with_aggregation(false)
        .with_max_connections(8)
        .with_request_timeout(Duration::from_secs(1))
        .with_max_request_timeout(Duration::from_secs(8))
        .with_backoff(Duration::from_millis(100), Duration::from_millis(500));
    let producer = Producer::with_api(config, fake.clone()).await.expect("starts");
    assert_eq!((producer.stats().concurrency_limit, producer.stats().request_timeout_ms), (8, 1_000));
    let writer = {
        let producer = producer.clone();
        tokio::spawn(async move { put_all_sampling(&producer, N, 400).await })
    };
    // Slow for 60 s (every record of the first windows would have expired after 30 s in a queue),
    // then fast again.
    tokio::time::sleep(Duration::from_secs(60)).await;
    let slow = producer.stats();
    *fake.always.lock().expect("lock") = None;
    let (outcomes, limits) = writer.await.expect("writer");
    let stats = producer.shutdown(Duration::from_secs(5)).await;
    println!("slow phase {slow:?}; end {stats:?}");

    let failed: Vec<_> = outcomes.iter().filter_map(|o| o.as_ref().err()).take(3).collect();
    assert!(failed.is_empty(), "every record is put: {failed:?}");
    assert_eq!(stats.user_records_expired, 0);
    assert_exactly_once_in_order(&fake, N, 400);
    assert!(slow.timed_out_calls > 0, "the first calls timed out: {slow:?}");
    assert!(slow.request_timeout_ms >= 4_000, "the timeout grew above the 3 s calls: {slow:?}");
    assert!(slow.request_timeout_ms <= 8_000, "up to its bound: {slow:?}");
    let lowest = limits.iter().copied().min().unwrap_or(8);
    assert!(lowest <= 2, "the limit came down from 8: {limits:?}");
    let after = limits.iter().rposition(|l| *l == lowest).map_or(&[][..], |i| &limits[i..]);
    assert!(after.iter().any(|l| *l >= 6), "and went back up once calls were fast: {limits:?}");
    assert!(stats.request_timeout_ms < slow.request_timeout_ms, "the timeout came back down: {stats:?}");
}

#[tokio::test(start_paused = true)]
async fn answers_later_than_the_timeout_settle_their_records_without_copies() {
    const N: usize = 10_000;
    let fake = FakeKinesis::new(4);
    // Every call is written at once and answered 1.5 s later: past the 1 s timeout, within twice
    // it. The producer learns congestion from the timeout but waits for the answer, so nothing
    // is sent twice.
    *fake.always.lock().expect("lock") = Some(Plan::AnswerLate(Duration::from_millis(1_500)));
    let config = ProducerConfig::new("s")
        .with_aggregation(false)
        .with_max_connections(8)
        .with_request_timeout(Duration::from_secs(1))
        .with_max_request_timeout(Duration::from_secs(8));
    let producer = Producer::with_api(config, fake.clone()).await.expect("starts");
    let writer = {
        let producer = producer.clone();
        tokio::spawn(async move { put_all_sampling(&producer, N, 400).await })
    };
    tokio::time::sleep(Duration::from_secs(20)).await;
    let slow = producer.stats();
    *fake.always.lock().expect("lock") = None;
    let (outcomes, limits) = writer.await.expect("writer");
    let stats = producer.shutdown(Duration::from_secs(5)).await;
    println!("slow phase {slow:?}; end {stats:?}");
    assert!(outcomes.iter().all(Result::is_ok), "every record is put");
    assert!(slow.timed_out_calls > 0 && slow.late_answers > 0, "calls passed their timeout, answered late: {slow:?}");
    assert_eq!((stats.abandoned_calls, stats.resent_after_timeout, stats.retries), (0, 0, 0), "{stats:?}");
    assert!(slow.request_timeout_ms >= 3_000, "the timeout follows the 1.5 s answers: {slow:?}");
    assert!(limits.iter().any(|l| *l < 8), "the limit came down: {limits:?}");
    assert_exactly_once_in_order(&fake, N, 400);
}

#[tokio::test(start_paused = true)]
async fn a_call_without_an_answer_by_twice_its_timeout_is_given_up_and_resent() {
    let fake = FakeKinesis::new(1);
    // The first call is written and answered after an hour; the producer gives up on it at 2 s
    // (twice the 1 s timeout) and sends its records again: they are stored twice, and counted.
    fake.plan(Plan::AnswerLate(Duration::from_secs(3_600)));
    let config = ProducerConfig::new("s")
        .with_aggregation(false)
        .with_request_timeout(Duration::from_secs(1))
        .with_max_request_timeout(Duration::from_secs(8))
        .with_backoff(Duration::from_millis(100), Duration::from_millis(100));
    let producer = Producer::with_api(config, fake.clone()).await.expect("starts");
    let receipts: Vec<_> = (0..10).map(|i| producer.try_put(record(i, 1)).expect("room")).collect();
    let started = tokio::time::Instant::now();
    for receipt in receipts {
        let outcome = receipt.await.expect("put on the second call");
        let codes: Vec<_> = outcome.attempts().iter().map(|a| a.error_code.clone()).collect();
        assert_eq!(codes, [Some("RequestTimeout".to_owned()), None]);
        let message = outcome.attempts()[0].error_message.as_deref().unwrap_or_default();
        assert!(message.contains("2000 ms"), "given up on at twice the timeout: {message}");
    }
    assert!(started.elapsed() >= Duration::from_secs(2));
    let stats = producer.shutdown(Duration::from_secs(1)).await;
    assert_eq!((stats.timed_out_calls, stats.late_answers, stats.abandoned_calls), (1, 0, 1), "{stats:?}");
    assert_eq!(stats.resent_after_timeout, 10);
    assert_eq!(fake.user_records().len(), 20, "the given-up call was written: every record twice");
}

#[tokio::test(start_paused = true)]
async fn a_timeout_of_the_sdk_counts_as_a_call_given_up_on() {
    let fake = FakeKinesis::new(1);
    // The SDK's own timeout (its operation timeout) ends the call before the engine's does.
    fake.plan(Plan::Call(CallError { code: "RequestTimeout".into(), message: "sdk".into(), retry: Retry::Yes }));
    let config = ProducerConfig::new("s")
        .with_aggregation(false)
        .with_backoff(Duration::from_millis(100), Duration::from_millis(100));
    let producer = Producer::with_api(config, fake.clone()).await.expect("starts");
    let receipts: Vec<_> = (0..10).map(|i| producer.try_put(record(i, 1)).expect("room")).collect();
    for receipt in receipts {
        receipt.await.expect("put on the second call");
    }
    let stats = producer.shutdown(Duration::from_secs(1)).await;
    assert_eq!((stats.timed_out_calls, stats.late_answers, stats.abandoned_calls), (1, 0, 1), "{stats:?}");
    assert_eq!(stats.resent_after_timeout, 10);
    assert_exactly_once_in_order(&fake, 10, 1);
}

#[tokio::test(start_paused = true)]
async fn throttled_calls_lower_the_limit_and_fast_answers_raise_it_again() {
    let fake = FakeKinesis::new(8);
    let config = ProducerConfig::new("s").with_aggregation(false).with_max_connections(8);
    let producer = Producer::with_api(config, fake.clone()).await.expect("starts");
    // Every call throttled for the first 2 s.
    *fake.always.lock().expect("lock") = Some(Plan::Call(CallError {
        code: "ProvisionedThroughputExceededException".into(),
        message: "injected".into(),
        retry: Retry::Throttled,
    }));
    let writer = {
        let producer = producer.clone();
        tokio::spawn(async move { put_all_sampling(&producer, 20_000, 400).await })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let throttled = producer.stats();
    *fake.always.lock().expect("lock") = None;
    let (outcomes, limits) = writer.await.expect("writer");
    assert!(outcomes.iter().all(Result::is_ok));
    assert!(throttled.concurrency_limit <= 2, "down from 8: {throttled:?}");
    assert_eq!(throttled.request_timeout_ms, 6_000, "throttling leaves the timeout: {throttled:?}");
    assert!(limits.last().is_some_and(|l| *l >= 4), "back up: {limits:?}");
    assert_exactly_once_in_order(&fake, 20_000, 400);
}

#[tokio::test(start_paused = true)]
async fn a_batch_resolves_per_record_in_order_with_invalid_records_failing_alone() {
    let fake = FakeKinesis::new(3);
    let producer = Producer::with_api(ProducerConfig::new("s"), fake.clone()).await.expect("starts");
    let mut records: Vec<Record> = (0..2_000).map(|i| record(i, 40)).collect();
    records[7] = Record::new("", "no key");
    records[1_500] = Record::new("k", "x").with_explicit_hash_key("nope");
    let results = producer.put_batch(records).await.await;
    assert_eq!(results.len(), 2_000);
    for (i, result) in results.iter().enumerate() {
        match i {
            7 | 1_500 => {
                let error = result.as_ref().expect_err("invalid");
                assert!(matches!(error.kind(), PutErrorKind::InvalidRecord(_)), "{i}: {error}");
            }
            _ => assert!(result.as_ref().is_ok_and(|o| o.attempts().len() == 1), "{i}: {result:?}"),
        }
    }
    let stored = fake.user_records();
    assert_eq!(stored.len(), 1_998);
    // Per key, in the order of the batch.
    let mut last: HashMap<String, usize> = HashMap::new();
    for (_, key, data) in &stored {
        let i: usize = std::str::from_utf8(&data[6..]).expect("utf8").parse().expect("number");
        if let Some(previous) = last.insert(key.clone(), i) {
            assert!(previous < i, "{key}: {previous} then {i}");
        }
    }
    assert!(producer.put_batch(Vec::new()).await.await.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_batch_larger_than_the_limits_still_goes_through_in_pieces() {
    let fake = FakeKinesis::new(1);
    let config = ProducerConfig::new("s").with_max_outstanding_records(100);
    let producer = Producer::with_api(config, fake.clone()).await.expect("starts");
    let results = producer.put_batch((0..1_000).map(|i| record(i, 10)).collect()).await.await;
    assert!(results.iter().all(Result::is_ok));
    assert_exactly_once_in_order(&fake, 1_000, 10);
}

#[tokio::test(start_paused = true)]
async fn a_batch_that_cannot_get_room_comes_back_whole() {
    let fake = FakeKinesis::new(1);
    *fake.always.lock().expect("lock") = Some(Plan::Stall(Duration::from_secs(3600)));
    let config = ProducerConfig::new("s").with_max_outstanding_records(10).with_put_timeout(Duration::from_secs(1));
    let producer = Producer::with_api(config, fake.clone()).await.expect("starts");
    let first = producer.put_batch((0..10).map(|i| record(i, 2)).collect()).await;
    let second = producer.put_batch((10..15).map(|i| record(i, 2)).collect()).await.await;
    assert!(second.iter().all(|r| r.as_ref().is_err_and(|e| e.kind() == &PutErrorKind::Timeout)));
    assert_eq!(second[0].as_ref().expect_err("timeout").record(), &record(10, 2));
    producer.shutdown(Duration::from_secs(1)).await;
    assert!(first.await.iter().all(|r| r.as_ref().is_err_and(|e| matches!(e.kind(), PutErrorKind::ShutDown { .. }))));
}

#[tokio::test(start_paused = true)]
async fn try_put_batch_takes_a_prefix_and_hands_back_the_rest_at_once() {
    let fake = FakeKinesis::new(2);
    fake.plan(Plan::Stall(Duration::from_millis(500)));
    let config = ProducerConfig::new("s").with_max_outstanding_records(10);
    let producer = Producer::with_api(config, fake.clone()).await.expect("starts");
    let mut records: Vec<Record> = (0..15).map(|i| record(i, 4)).collect();
    records[2] = Record::new("", "no key");
    let batch = producer.try_put_batch(records);
    // Room for ten: the valid records 0, 1, 3..=10 are taken; 2 is invalid; 11..=14 have no room.
    assert_eq!(batch.taken, [0, 1, 3, 4, 5, 6, 7, 8, 9, 10]);
    let refused: Vec<(usize, PutErrorKind)> = batch.refused.iter().map(|(i, e)| (*i, e.kind().clone())).collect();
    assert!(matches!(refused[0], (2, PutErrorKind::InvalidRecord(_))), "{refused:?}");
    assert_eq!(refused[1..], [11, 12, 13, 14].map(|i| (i, PutErrorKind::Full)));
    assert_eq!(batch.refused[4].1.record(), &record(14, 4), "the record comes back");
    // Full now: the next batch is handed back whole, without waiting.
    let full = producer.try_put_batch(vec![record(20, 4)]);
    assert!(full.taken.is_empty() && full.receipt.await.is_empty());
    assert_eq!(full.refused[0].1.kind(), &PutErrorKind::Full);
    let results = batch.receipt.await;
    assert_eq!(results.len(), 10);
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(fake.user_records().len(), 10);
    // Room again once they are put.
    let again = producer.try_put_batch((11..15).map(|i| record(i, 4)).collect());
    assert_eq!(again.taken, [0, 1, 2, 3]);
    assert!(again.receipt.await.iter().all(Result::is_ok));
    producer.shutdown(Duration::from_secs(1)).await;
    let closed = producer.try_put_batch(vec![record(30, 4)]);
    assert!(matches!(closed.refused[0].1.kind(), PutErrorKind::ShutDown { .. }));
}
