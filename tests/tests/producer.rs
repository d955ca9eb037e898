//! The producer against a real Kinesis API (LocalStack): volume, resharding while producing,
//! TTL expiry behind the rate limit, backpressure, and a missing stream. (Slow and throttling
//! Kinesis: `producer_adaptive.rs`.)

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::FutureExt as _;

use ktk_producer::{Producer, ProducerConfig, PutErrorKind, PutReceipt, Record};
use ktk_proto::keys::{HashKeyRange, partition_key_hash};
use ktk_tests::{
    StoredRecord, assert_exactly_once, aws_config, create_stream, delete_stream, index_in, kinesis, numbered_data,
    read_stream, unique_name,
};

/// A record whose data says who it is (see `ktk_tests::numbered_data`).
fn numbered(key: &str, index: usize, size: usize) -> Record {
    Record::new(key, numbered_data(key, index, size))
}

fn index_of(record: &StoredRecord) -> usize {
    index_in(&record.data)
}

async fn shard_ranges(client: &aws_sdk_kinesis::Client, stream: &str) -> HashMap<String, HashKeyRange> {
    let listing = client.list_shards().stream_name(stream).send().await.expect("list shards");
    listing
        .shards()
        .iter()
        .map(|s| {
            let r = s.hash_key_range().expect("range");
            (s.shard_id().to_owned(), HashKeyRange::parse(r.starting_hash_key(), r.ending_hash_key()).expect("range"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_records_arrive_once_on_their_shard_in_order() {
    const N: usize = 100_000;
    const KEYS: usize = 1_000;
    let client = kinesis().await;
    let stream = unique_name("ktk-prod-volume");
    create_stream(&client, &stream, 4).await;
    // A PutRecords call that times out but was applied is retried and stored twice: Kinesis is
    // at-least-once, and ktk's consumers deduplicate. These tests count records stored exactly
    // once, so they give LocalStack on a loaded 2-core machine (one call took over 6 s, the KPL's
    // default request timeout, while the machine compiled) a minute per call.
    let config = ProducerConfig::new(&stream).with_request_timeout(Duration::from_secs(60));
    let producer = Producer::new(config, &aws_config().await).await.expect("producer starts");
    let ranges = shard_ranges(&client, &stream).await;

    let mut receipts: Vec<PutReceipt> = Vec::with_capacity(N);
    for i in 0..N {
        let key = format!("user-{:04}", i % KEYS);
        receipts.push(producer.put(numbered(&key, i, 100)).await.expect("accepted"));
    }
    for (i, receipt) in receipts.into_iter().enumerate() {
        let outcome = receipt.await.unwrap_or_else(|e| panic!("record {i}: {e}"));
        let hash = partition_key_hash(&format!("user-{:04}", i % KEYS));
        assert!(ranges[outcome.shard_id()].contains(hash), "record {i} acknowledged on the wrong shard");
    }
    let stats = producer.shutdown(Duration::from_secs(30)).await;
    assert_eq!(stats.user_records_put, N as u64);
    assert!(stats.user_records_per_kinesis_record() > 20.0, "aggregation happened: {stats:?}");
    println!("volume test: {stats:?}");

    let stored = read_stream(&client, &stream).await;
    delete_stream(&client, &stream).await;
    assert_exactly_once(&stored, N);
    assert!(stored.iter().all(|r| r.in_shard_range), "every record is on the shard its hash key belongs to");
    assert!(stored.iter().filter(|r| r.aggregated).count() > N * 9 / 10);
    // Per key, the order they were put in (a shard is read in stream order).
    let mut last: HashMap<&str, usize> = HashMap::new();
    for r in &stored {
        let i = index_of(r);
        if let Some(previous) = last.insert(&r.partition_key, i) {
            assert!(previous < i, "key {} out of order: {previous} then {i}", r.partition_key);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_while_producing_loses_nothing() {
    const N: usize = 20_000;
    let client = kinesis().await;
    let stream = unique_name("ktk-prod-split");
    create_stream(&client, &stream, 2).await;
    let config = ProducerConfig::new(&stream)
        .with_shard_map_min_refresh_interval(Duration::from_millis(100))
        .with_request_timeout(Duration::from_secs(60));
    let producer = Producer::new(config, &aws_config().await).await.expect("producer starts");
    let before = shard_ranges(&client, &stream).await;

    let progress = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (producer, progress) = (producer.clone(), Arc::clone(&progress));
        tokio::spawn(async move {
            let mut receipts = Vec::with_capacity(N);
            for i in 0..N {
                receipts.push(producer.put(numbered(&format!("k{}", i % 500), i, 60)).await.expect("accepted"));
                progress.store(i, Ordering::Relaxed);
                if i % 200 == 0 {
                    // Spread the writes over a few seconds so the split lands in the middle.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            let mut shards = Vec::with_capacity(N);
            for receipt in receipts {
                shards.push(receipt.await.expect("put").shard_id().to_owned());
            }
            shards
        })
    };
    while progress.load(Ordering::Relaxed) < N / 3 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (parent, range) = before.iter().min_by_key(|(_, r)| r.start).map(|(id, r)| (id.clone(), *r)).expect("shard");
    let middle = range.start + (range.end - range.start) / 2;
    client
        .split_shard()
        .stream_name(&stream)
        .shard_to_split(&parent)
        .new_starting_hash_key(middle.to_string())
        .send()
        .await
        .expect("split");
    let shards_used = writer.await.expect("writer");
    let stats = producer.shutdown(Duration::from_secs(30)).await;
    println!("split test: {stats:?}");

    let after = shard_ranges(&client, &stream).await;
    let children: Vec<&String> = after.keys().filter(|id| !before.contains_key(*id)).collect();
    assert_eq!(children.len(), 2, "the split made two children: {after:?}");
    assert!(shards_used.iter().any(|s| children.iter().any(|c| c == &s)), "later records land on the children");
    assert!(stats.shard_map_refreshes >= 1, "the producer noticed the split: {stats:?}");
    let stored = read_stream(&client, &stream).await;
    delete_stream(&client, &stream).await;
    assert_exactly_once(&stored, N);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_held_back_by_the_rate_limit_expire_with_their_record() {
    let client = kinesis().await;
    let stream = unique_name("ktk-prod-ttl");
    create_stream(&client, &stream, 1).await;
    // 1% of the shard quota (10 records/s), one user record per Kinesis record. The shard admits
    // one second's worth (10 records) at a time, and its TTL starts then: the last of each ten
    // wait up to a second for the rate limit, longer than the 300 ms TTL.
    let config = ProducerConfig::new(&stream)
        .with_aggregation(false)
        .with_rate_limit_percent(1)
        .with_record_ttl(Duration::from_millis(300));
    let producer = Producer::new(config, &aws_config().await).await.expect("producer starts");
    let mut receipts = Vec::new();
    for i in 0..60 {
        receipts.push(producer.put(numbered("ttl", i, 20)).await.expect("accepted"));
    }
    let (mut put, mut expired) = (Vec::new(), 0);
    for receipt in receipts {
        match receipt.await {
            Ok(outcome) => put.push(outcome),
            Err(e) => {
                assert_eq!(e.kind(), &PutErrorKind::Expired, "{e}");
                assert!(e.record().data.starts_with(b"ttl|"), "the record comes back");
                expired += 1;
            }
        }
    }
    assert!(expired > 0 && !put.is_empty(), "{} put, {expired} expired", put.len());
    let stats = producer.shutdown(Duration::from_secs(10)).await;
    assert_eq!(stats.user_records_expired, expired as u64);
    let stored = read_stream(&client, &stream).await;
    delete_stream(&client, &stream).await;
    assert_eq!(stored.len(), put.len(), "exactly the records reported put are in the stream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_caller_gets_records_back_and_memory_stays_bounded() {
    const N: usize = 3_000;
    const LIMIT: usize = 50;
    let client = kinesis().await;
    let stream = unique_name("ktk-prod-full");
    create_stream(&client, &stream, 1).await;
    let config =
        ProducerConfig::new(&stream).with_max_outstanding_records(LIMIT).with_request_timeout(Duration::from_secs(60));
    let producer = Producer::new(config, &aws_config().await).await.expect("producer starts");
    let mut pending: std::collections::VecDeque<PutReceipt> = std::collections::VecDeque::new();
    let (mut handed_back, mut most_unresolved) = (0usize, 0usize);
    for i in 0..N {
        let mut record = numbered("fast", i, 200);
        loop {
            match producer.try_put(record) {
                Ok(receipt) => {
                    pending.push_back(receipt);
                    // Receipts not resolved yet are records the producer still holds.
                    pending.retain_mut(|r| match r.now_or_never() {
                        None => true,
                        Some(result) => {
                            result.expect("put");
                            false
                        }
                    });
                    most_unresolved = most_unresolved.max(pending.len());
                    break;
                }
                Err(e) => {
                    assert_eq!(e.kind(), &PutErrorKind::Full);
                    handed_back += 1;
                    record = e.into_record();
                    // Make room the way a real caller would: wait for the oldest receipt.
                    if let Some(oldest) = pending.pop_front() {
                        oldest.await.expect("put");
                    }
                }
            }
        }
    }
    for receipt in pending {
        receipt.await.expect("put");
    }
    assert!(handed_back > 0, "the limit was reached");
    // The engine frees a record's room just before it answers its receipt (so a caller woken by
    // the answer always finds room); in that instant a put from another thread can be taken while
    // the receipt still looks unresolved here. The engine answers one record at a time, so this
    // view can exceed the limit by one, never more; the producer itself never holds more than LIMIT.
    assert!(
        most_unresolved <= LIMIT + 1,
        "never more than {LIMIT} outstanding (+1 being answered), saw {most_unresolved}"
    );
    producer.shutdown(Duration::from_secs(10)).await;
    let stored = read_stream(&client, &stream).await;
    delete_stream(&client, &stream).await;
    assert_exactly_once(&stored, N);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_stream_is_a_clear_error_at_start() {
    kinesis().await; // LocalStack must be there for this to mean anything
    let name = unique_name("ktk-no-such-stream");
    let error = Producer::new(ProducerConfig::new(&name), &aws_config().await).await.expect_err("no stream");
    let message = error.to_string();
    assert!(message.contains(&name) && message.contains("ResourceNotFound"), "{message}");
}
