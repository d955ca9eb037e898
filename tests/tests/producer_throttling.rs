//! The producer against a Kinesis that throttles for real: the second LocalStack, started with
//! `KINESIS_ERROR_PROBABILITY=0.3` (`KTK_LOCALSTACK_PORT=4567 KINESIS_ERROR_PROBABILITY=0.3
//! localstack/up.sh`, which `scripts/test.sh` does). About 30% of its `PutRecords` calls come back
//! with every entry failed as `ProvisionedThroughputExceededException`; `CreateStream`,
//! `ListShards` and the reads are not affected.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::time::Duration;

use ktk_producer::{Producer, ProducerConfig, PutErrorKind, PutReceipt, Record};
use ktk_tests::{
    StoredRecord, assert_exactly_once, create_stream, delete_stream, flaky_aws_config, flaky_kinesis, index_in,
    numbered_data, read_stream, unique_name,
};

const THROTTLED: &str = "ProvisionedThroughputExceededException";
const KEYS: usize = 100;
/// Hint for an assertion that fails because nothing was throttled.
const NOT_FLAKY: &str = "is the LocalStack behind KTK_FLAKY_ENDPOINT_URL started with KINESIS_ERROR_PROBABILITY=0.3?";

/// A record whose data says who it is (see `ktk_tests::numbered_data`).
fn numbered(key: &str, index: usize, size: usize) -> Record {
    Record::new(key, numbered_data(key, index, size))
}

fn index_of(record: &StoredRecord) -> usize {
    index_in(&record.data)
}

/// Runs a test body with a time bound, so a producer that never gives up cannot hang the suite.
async fn bounded<F: Future<Output = ()>>(body: F) {
    tokio::time::timeout(Duration::from_secs(120), body).await.expect("the test finished within 120 s");
}

/// The producer of these tests: retries start after 20 ms and back off up to 500 ms.
fn config(stream: &str) -> ProducerConfig {
    ProducerConfig::new(stream)
        .with_request_timeout(Duration::from_secs(60))
        .with_backoff(Duration::from_millis(20), Duration::from_millis(500))
}

/// Puts records `0..n` of 100 bytes over `KEYS` keys, 25 every 30 ms. Spread over 6 s, they go
/// out in about 60 `PutRecords` calls (one per 100 ms buffering window), so the chance that none
/// of them is throttled is 0.7^60, about 5e-10.
async fn put_paced(producer: &Producer, n: usize) -> Vec<PutReceipt> {
    let mut receipts = Vec::with_capacity(n);
    for i in 0..n {
        receipts.push(producer.put(numbered(&format!("user-{:03}", i % KEYS), i, 100)).await.expect("accepted"));
        if i % 25 == 24 {
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }
    receipts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_calls_are_retried_until_every_record_is_in_exactly_once() {
    bounded(async {
        const N: usize = 5_000;
        let client = flaky_kinesis().await;
        let stream = unique_name("ktk-prod-throttled");
        create_stream(&client, &stream, 2).await;
        let producer = Producer::new(config(&stream), &flaky_aws_config().await).await.expect("producer starts");

        let receipts = put_paced(&producer, N).await;
        let mut outcomes = Vec::with_capacity(N);
        for (i, receipt) in receipts.into_iter().enumerate() {
            outcomes.push(receipt.await.unwrap_or_else(|e| panic!("record {i}: {e}")));
        }
        let stats = producer.stats();
        producer.shutdown(Duration::from_secs(10)).await;
        println!("throttling test: {stats:?}");
        assert_eq!(stats.user_records_put, N as u64, "{stats:?}");
        assert!(
            stats.throttled > 0 && stats.retries > 0,
            "Kinesis throttled and the producer retried ({NOT_FLAKY}): {stats:?}"
        );

        // The last attempt of every record succeeded; every one before it was throttled.
        for (i, outcome) in outcomes.iter().enumerate() {
            let (last, failed) = outcome.attempts().split_last().expect("at least one attempt");
            assert!(last.succeeded(), "record {i}: the last attempt succeeded: {last:?}");
            for attempt in failed {
                assert_eq!(attempt.error_code.as_deref(), Some(THROTTLED), "record {i}: {attempt:?}");
            }
        }
        let retried = outcomes.iter().filter(|o| o.attempts().len() > 1).count();
        let most = outcomes.iter().map(|o| o.attempts().len()).max().unwrap_or(0);
        println!("throttling test: {retried} of {N} records needed more than one attempt, at most {most}");
        assert!(retried > 0, "some records needed more than one attempt ({NOT_FLAKY})");

        let stored = read_stream(&client, &stream).await;
        delete_stream(&client, &stream).await;
        assert_exactly_once(&stored, N);
        // A throttled call fails all its entries, so retrying keeps each key's order.
        let mut last: HashMap<&str, usize> = HashMap::new();
        for r in &stored {
            let i = index_of(r);
            if let Some(previous) = last.insert(&r.partition_key, i) {
                assert!(previous < i, "key {} out of order: {previous} then {i}", r.partition_key);
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_fail_if_throttled_throttled_records_come_back_and_only_the_others_are_in() {
    bounded(async {
        const N: usize = 5_000;
        let client = flaky_kinesis().await;
        let stream = unique_name("ktk-prod-fail-throttled");
        create_stream(&client, &stream, 2).await;
        let producer = Producer::new(config(&stream).with_fail_if_throttled(true), &flaky_aws_config().await)
            .await
            .expect("producer starts");

        let receipts = put_paced(&producer, N).await;
        let (mut put, mut throttled) = (BTreeSet::new(), BTreeSet::new());
        for (i, receipt) in receipts.into_iter().enumerate() {
            match receipt.await {
                Ok(_) => {
                    put.insert(i);
                }
                Err(e) => {
                    assert_eq!(e.kind(), &PutErrorKind::Throttled, "record {i}: {e}");
                    assert_eq!(index_in(&e.record().data), i, "the error carries its own record");
                    assert_eq!(e.record().partition_key, format!("user-{:03}", i % KEYS));
                    let last = e.attempts().last().expect("the throttled attempt");
                    assert_eq!(last.error_code.as_deref(), Some(THROTTLED), "record {i}: {last:?}");
                    throttled.insert(i);
                }
            }
        }
        let stats = producer.shutdown(Duration::from_secs(10)).await;
        println!("fail_if_throttled test: {} put, {} throttled; {stats:?}", put.len(), throttled.len());
        assert!(!throttled.is_empty(), "some records failed as throttled ({NOT_FLAKY})");
        assert!(!put.is_empty(), "the records of calls that were not throttled are put");
        assert_eq!(stats.user_records_put, put.len() as u64, "{stats:?}");
        assert_eq!(stats.user_records_failed, throttled.len() as u64, "{stats:?}");

        let stored = read_stream(&client, &stream).await;
        delete_stream(&client, &stream).await;
        let mut seen: HashMap<usize, usize> = HashMap::new();
        for r in &stored {
            *seen.entry(index_of(r)).or_default() += 1;
        }
        let doubled: Vec<usize> = seen.iter().filter(|(_, n)| **n > 1).map(|(i, _)| *i).take(10).collect();
        let in_stream: BTreeSet<usize> = seen.into_keys().collect();
        assert!(doubled.is_empty(), "stored more than once: {doubled:?} (first ten)");
        let missing: Vec<&usize> = put.difference(&in_stream).take(10).collect();
        let unexpected: Vec<&usize> = in_stream.difference(&put).take(10).collect();
        assert!(
            missing.is_empty() && unexpected.is_empty(),
            "exactly the records reported put are in the stream: missing {missing:?}, not reported put {unexpected:?}"
        );
    })
    .await;
}
