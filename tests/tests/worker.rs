//! The consumer's worker against LocalStack (Kinesis and DynamoDB), with workers as tasks of this
//! process: sharing and rebalancing an 8-shard stream under a steady producer, graceful takeover,
//! resharding, resuming a KCL 2.x lease table, a stolen lease, processor retries, and a backlog
//! drained by one worker (records/s printed).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::AttributeValue;
use ktk_consumer::lease::{ExtendedSequenceNumber, LeaseTable};
use ktk_consumer::{Checkpointer, InitializeInput, ProcessRecordsInput, ProcessorError, RecordProcessor, Worker};
use ktk_producer::{Producer, ProducerConfig, Record};
use ktk_tests::worker_support::{Journal, Lifecycle, Processed, RecordingProcessor, fast_worker_config};
use ktk_tests::{aws_config, create_stream, delete_stream, dynamodb, index_in, kinesis, numbered_data, unique_name};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

struct Running {
    id: String,
    stop: CancellationToken,
    handle: JoinHandle<ktk_consumer::Result<ktk_consumer::WorkerReport>>,
}

impl Running {
    async fn stop(self) -> ktk_consumer::WorkerReport {
        self.stop.cancel();
        self.handle.await.expect("worker task").unwrap_or_else(|e| panic!("worker {} failed: {e}", self.id))
    }
}

async fn start_worker(stream: &str, table: &str, id: &str, journal: &Journal) -> Running {
    let config = aws_config().await;
    let factory = {
        let (journal, id) = (journal.clone(), id.to_owned());
        move |shard: &str| RecordingProcessor::new(&id, shard, journal.clone())
    };
    let worker = Worker::new(fast_worker_config(stream, table, id), &config, factory).expect("valid config");
    let stop = CancellationToken::new();
    let handle = tokio::spawn(worker.run(stop.clone()));
    Running { id: id.to_owned(), stop, handle }
}

/// Puts `n` numbered records over about `over`, with 200 partition keys, through the producer.
fn steady_producer(stream: &str, n: usize, over: Duration) -> JoinHandle<()> {
    let stream = stream.to_owned();
    tokio::spawn(async move {
        let producer = Producer::new(ProducerConfig::new(&stream), &aws_config().await).await.expect("producer");
        let started = Instant::now();
        let mut receipts = Vec::with_capacity(n);
        for i in 0..n {
            let due = over.mul_f64(i as f64 / n as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
            let key = format!("user-{:03}", i % 200);
            receipts.push(producer.put(Record::new(key.clone(), numbered_data(&key, i, 60))).await.expect("put"));
        }
        for receipt in receipts {
            receipt.await.expect("record acknowledged");
        }
        producer.shutdown(Duration::from_secs(10)).await;
    })
}

/// Unfinished leases per owner ("" for none, "handoff" while a hand-off is in progress).
async fn owners(table: &LeaseTable) -> BTreeMap<String, usize> {
    let mut owners = BTreeMap::new();
    let leases = match table.list().await {
        Ok(listing) => listing.leases,
        // Not created yet by the first worker.
        Err(ktk_consumer::Error::TableNotFound { .. }) => Vec::new(),
        Err(error) => panic!("list leases: {error}"),
    };
    for lease in leases.into_iter().filter(|l| !l.is_finished()) {
        let owner =
            if lease.checkpoint_owner.is_some() { "handoff".to_owned() } else { lease.owner.unwrap_or_default() };
        *owners.entry(owner).or_default() += 1;
    }
    owners
}

/// Polls `check` every 100 ms until it holds; panics after `timeout` with `what`.
async fn wait_for<F, Fut>(timeout: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if check().await {
            return started.elapsed();
        }
        assert!(started.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_for_count(journal: &Journal, n: usize, timeout: Duration) {
    let what = format!("{n} records processed");
    wait_for(timeout, &what, || async { journal.record_count() >= n }).await;
}

/// Every index in 0..n processed exactly once, and per shard in stream order.
fn assert_exactly_once_in_order(records: &[Processed], n: usize) {
    let mut seen = vec![0u32; n];
    for r in records {
        seen[index_in(&r.data)] += 1;
    }
    let missing: Vec<usize> = (0..n).filter(|i| seen[*i] == 0).take(10).collect();
    let doubled: Vec<usize> = (0..n).filter(|i| seen[*i] > 1).take(10).collect();
    assert!(missing.is_empty() && doubled.is_empty(), "missing {missing:?}, doubled {doubled:?} (first ten)");
    assert_eq!(records.len(), n);
    assert_shard_order(records);
}

/// Sequence numbers are decimal strings of up to 128 digits: ordered by length, then text.
fn position(r: &Processed) -> (usize, String, u64) {
    (r.sequence_number.len(), r.sequence_number.clone(), r.sub_sequence_number)
}

fn assert_shard_order(records: &[Processed]) {
    let mut last: HashMap<&str, (usize, String, u64)> = HashMap::new();
    for r in records {
        let here = position(r);
        if let Some(previous) = last.insert(&r.shard, here.clone()) {
            assert!(here > previous, "shard {} went from {previous:?} back to {here:?}", r.shard);
        }
    }
}

fn lost_leases(journal: &Journal) -> Vec<Lifecycle> {
    journal.events().into_iter().map(|(_, e)| e).filter(|e| matches!(e, Lifecycle::LeaseLost { .. })).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_join_share_evenly_and_leave_gracefully_without_processing_anything_twice() {
    const N: usize = 6_000;
    let client = kinesis().await;
    let _ = dynamodb().await;
    let stream = unique_name("ktk-worker-share");
    let table_name = unique_name("ktk-worker-share-app");
    create_stream(&client, &stream, 8).await;
    let table = LeaseTable::new(&aws_config().await, &table_name);
    let journal = Journal::default();
    let producer = steady_producer(&stream, N, Duration::from_secs(12));

    let a = start_worker(&stream, &table_name, "worker-a", &journal).await;
    wait_for(Duration::from_secs(30), "worker-a to hold all 8 leases", || async {
        owners(&table).await.get("worker-a") == Some(&8)
    })
    .await;

    // A second worker gets its share by hand-offs.
    let b = start_worker(&stream, &table_name, "worker-b", &journal).await;
    let two = wait_for(Duration::from_secs(20), "a 4/4 split, hand-offs done", || async {
        let o = owners(&table).await;
        o.get("worker-a") == Some(&4) && o.get("worker-b") == Some(&4)
    })
    .await;

    // A third one: 3/3/2.
    let c = start_worker(&stream, &table_name, "worker-c", &journal).await;
    let three = wait_for(Duration::from_secs(20), "a 3/3/2 split, worker-c processing its two", || async {
        let started = journal
            .events()
            .iter()
            .filter(|(_, e)| matches!(e, Lifecycle::Initialized { worker, .. } if worker == "worker-c"))
            .count();
        if started < 2 {
            return false;
        }
        let o = owners(&table).await;
        let mut counts: Vec<usize> =
            ["worker-a", "worker-b", "worker-c"].iter().map(|w| o.get(*w).copied().unwrap_or(0)).collect();
        counts.sort_unstable();
        counts == [2, 3, 3]
    })
    .await;

    // The third leaves gracefully: its shards are taken over at once.
    let c_stopped = Instant::now();
    let report_c = c.stop().await;
    let shutdown_took = c_stopped.elapsed();
    wait_for(Duration::from_secs(10), "worker-c's leases taken over", || async {
        let o = owners(&table).await;
        o.get("worker-a").copied().unwrap_or(0) + o.get("worker-b").copied().unwrap_or(0) == 8
    })
    .await;
    let takeover_from_signal = c_stopped.elapsed();

    producer.await.expect("producer");
    wait_for_count(&journal, N, Duration::from_secs(60)).await;
    let report_a = a.stop().await;
    let report_b = b.stop().await;
    println!(
        "rebalance to 2 workers: {two:?}; to 3 workers: {three:?}; graceful shutdown {shutdown_took:?}, \
         takeover from the shutdown signal {takeover_from_signal:?}; reports: a {report_a:?} b {report_b:?} c {report_c:?}"
    );
    assert!(two <= Duration::from_secs(4), "even share within two taking cycles (2 s each), took {two:?}");
    assert!(three <= Duration::from_secs(4), "even share within two taking cycles (2 s each), took {three:?}");
    assert!(
        takeover_from_signal <= Duration::from_secs(2),
        "graceful takeover within 2 s, took {takeover_from_signal:?}"
    );
    assert_eq!(report_c.leases_released, 2, "worker-c released its leases");
    assert!(lost_leases(&journal).is_empty(), "no lease was lost: {:?}", lost_leases(&journal));
    assert_exactly_once_in_order(&journal.records(), N);
    // After everyone stopped, every lease is free and checkpointed.
    let leases = table.list().await.expect("list").leases;
    assert_eq!(leases.len(), 8);
    assert!(leases.iter().all(|l| l.owner.is_none()), "all released: {leases:?}");
    delete_stream(&client, &stream).await;
}
