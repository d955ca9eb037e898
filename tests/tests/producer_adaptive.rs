//! The producer's adaptive concurrency against Kinesis APIs that answer late or throttle: plain
//! (non-aggregated) records through a proxy that holds some `PutRecords` answers for 3-8 s, past
//! the default 6 s request timeout, in front of LocalStack; and through the throttling LocalStack
//! (`KTK_FLAKY_ENDPOINT_URL`, 30% of `PutRecords` calls refused). In both, no record expires and
//! every record is in the stream exactly once, read back with `GetRecords` over all shards: a
//! call past its timeout lowers the limit and lengthens the timeout, and the producer waits for
//! its answer (up to twice its timeout) instead of sending its records again.
//!
//! `KTK_TEST_ADAPTIVE_RECORDS` sets how many records each test puts (default 5,000: LocalStack
//! takes longer for each `PutRecords` call as a stream grows, and reading plain records back is
//! slow too; `docs/producer.md` gives a run with 100,000).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ktk_producer::{Producer, ProducerConfig, ProducerStats, PutError, PutOutcome, Record};
use ktk_tests::{
    aws_config_at, create_stream, delete_stream, flaky_aws_config, flaky_kinesis, index_in, kinesis, numbered_data,
    read_stream, unique_name,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

const SHARDS: i32 = 4;
const KEYS: usize = 1_000;

/// A bound on one test: two minutes, plus 30 ms per record (`ktk produce --no-aggregation` put
/// 100,000 records into LocalStack in 1,292 s, 13 ms each, on a loaded 2-core machine; reading
/// them back takes longer still).
fn test_timeout(records: usize) -> Duration {
    Duration::from_secs(120) + Duration::from_millis(30) * records as u32
}

fn records_to_put() -> usize {
    std::env::var("KTK_TEST_ADAPTIVE_RECORDS").ok().and_then(|n| n.parse().ok()).unwrap_or(5_000)
}

fn numbered(index: usize) -> Record {
    let key = format!("user-{:04}", index % KEYS);
    Record::new(key.clone(), numbered_data(&key, index, 100))
}

/// A loopback TCP proxy in front of an HTTP/1.1 endpoint that, while `slow` is set, holds the
/// answer to some `PutRecords` requests for 3-8 s. The request itself goes through at once, so
/// the call is written and only its answer is late: what a client that times out cannot tell
/// from a call that was lost. At most `MAX_CONNECTIONS` connections at once; it stops when
/// dropped, and by itself after `lifetime`.
struct SlowProxy {
    addr: SocketAddr,
    slow: Arc<AtomicBool>,
    /// Answers held back, and connections the client dropped while one was held.
    delayed: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl SlowProxy {
    const MAX_CONNECTIONS: usize = 64;
    /// Share of `PutRecords` answers held while slow.
    const HELD_SHARE: f64 = 0.4;

    async fn start(upstream: SocketAddr, lifetime: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let slow = Arc::new(AtomicBool::new(false));
        let delayed = Arc::new(AtomicU64::new(0));
        let permits = Arc::new(Semaphore::new(Self::MAX_CONNECTIONS));
        let task = tokio::spawn({
            let (slow, delayed) = (Arc::clone(&slow), Arc::clone(&delayed));
            async move {
                let accept = async {
                    loop {
                        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else { return };
                        let Ok((client, _)) = listener.accept().await else { return };
                        let (slow, delayed) = (Arc::clone(&slow), Arc::clone(&delayed));
                        tokio::spawn(async move {
                            let _permit = permit;
                            let _ = tokio::time::timeout(lifetime, relay(client, upstream, slow, delayed)).await;
                        });
                    }
                };
                let _ = tokio::time::timeout(lifetime, accept).await;
            }
        });
        SlowProxy { addr, slow, delayed, task }
    }

    fn set_slow(&self, slow: bool) {
        self.slow.store(slow, Ordering::SeqCst);
    }
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One client connection: requests go upstream as they come; the first bytes of each answer to a
/// `PutRecords` request may wait 3-8 s while `slow` is set.
async fn relay(mut client: TcpStream, upstream: SocketAddr, slow: Arc<AtomicBool>, delayed: Arc<AtomicU64>) {
    let Ok(mut server) = TcpStream::connect(upstream).await else { return };
    let (mut client_read, mut client_write) = client.split();
    let (mut server_read, mut server_write) = server.split();
    // Set when a request (or part of one) went upstream and its answer has not started yet; the
    // value says whether it was a `PutRecords` call.
    let answer_due: Mutex<Option<bool>> = Mutex::new(None);
    let requests = async {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = match client_read.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let chunk = &buffer[..n];
            let put_records = chunk.windows(28).any(|w| w == b"Kinesis_20131202.PutRecords\r");
            {
                let mut due = answer_due.lock().expect("lock");
                *due = Some(due.unwrap_or(false) || put_records);
            }
            if server_write.write_all(chunk).await.is_err() {
                return;
            }
        }
    };
    let answers = async {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = match server_read.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let starting = answer_due.lock().expect("lock").take();
            if starting == Some(true) && slow.load(Ordering::SeqCst) && fastrand::f64() < SlowProxy::HELD_SHARE {
                delayed.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(fastrand::u64(3_000..=8_000))).await;
            }
            if client_write.write_all(&buffer[..n]).await.is_err() {
                return;
            }
        }
    };
    // Either side closing ends the connection (the client gives up on a held answer by closing).
    tokio::select! {
        () = requests => {}
        () = answers => {}
    }
}

/// The concurrency limit every 250 ms while a run lasts: (seconds since start, limit, timeout ms).
struct LimitLog {
    seen: Arc<Mutex<Vec<(f64, u64, u64)>>>,
    task: JoinHandle<()>,
}

impl LimitLog {
    fn start(producer: &Producer) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let (producer, seen) = (producer.clone(), Arc::clone(&seen));
            let started = Instant::now();
            async move {
                loop {
                    let stats = producer.stats();
                    seen.lock().expect("lock").push((
                        started.elapsed().as_secs_f64(),
                        stats.concurrency_limit,
                        stats.request_timeout_ms,
                    ));
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        });
        LimitLog { seen, task }
    }

    fn so_far(&self) -> Vec<(f64, u64, u64)> {
        self.seen.lock().expect("lock").clone()
    }

    fn stop(self) -> Vec<(f64, u64, u64)> {
        self.task.abort();
        self.so_far()
    }
}

/// The limit's changes, for messages: `t: limit (timeout)`.
fn changes(log: &[(f64, u64, u64)]) -> String {
    let mut out = Vec::new();
    let mut last = None;
    for (t, limit, timeout) in log {
        if last != Some((*limit, *timeout)) {
            out.push(format!("{t:.1} s: {limit} ({:.1} s)", *timeout as f64 / 1000.0));
            last = Some((*limit, *timeout));
        }
    }
    out.join(", ")
}

/// Puts records `range` and returns their receipts' results, in order. `put` waits for room: the
/// producer slows the caller down instead of letting records expire.
async fn put_range(producer: &Producer, range: std::ops::Range<usize>) -> Vec<Result<PutOutcome, PutError>> {
    let mut receipts = Vec::with_capacity(range.len());
    for i in range {
        receipts.push(producer.put(numbered(i)).await.unwrap_or_else(|e| panic!("record {i} accepted: {e}")));
    }
    let mut results = Vec::with_capacity(receipts.len());
    for receipt in receipts {
        results.push(receipt.await);
    }
    results
}

/// What came back, checked against the stream: nothing expired, every record either acknowledged
/// and in the stream or failed with its typed error (and its record), and every copy explained by
/// a call given up on (the tests then require there are none).
async fn check_delivery(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
    results: &[Result<PutOutcome, PutError>],
    stats: &ProducerStats,
) -> (usize, usize) {
    let n = results.len();
    assert_eq!(stats.user_records_expired, 0, "nothing expires: {stats:?}");
    let mut failed = 0;
    let mut resent_after_timeout = vec![false; n];
    for (i, result) in results.iter().enumerate() {
        match result {
            Ok(outcome) => {
                let timed_out = outcome.attempts().iter().any(|a| a.error_code.as_deref() == Some("RequestTimeout"));
                resent_after_timeout[i] = timed_out;
            }
            Err(error) => {
                assert!(!matches!(error.kind(), ktk_producer::PutErrorKind::Expired), "record {i} expired: {error}");
                assert_eq!(index_in(&error.record().data), i, "the error carries its own record");
                failed += 1;
            }
        }
    }
    let stored = read_stream(client, stream).await;
    let mut seen = vec![0u32; n];
    for record in &stored {
        seen[index_in(&record.data)] += 1;
        assert!(record.in_shard_range, "record on the shard its key belongs to");
        assert!(!record.aggregated, "plain records");
    }
    let missing: Vec<usize> = (0..n).filter(|i| seen[*i] == 0 && results[*i].is_ok()).take(10).collect();
    assert!(missing.is_empty(), "acknowledged but not in the stream: {missing:?} (first ten)");
    let duplicated: Vec<usize> = (0..n).filter(|i| seen[*i] > 1).collect();
    let unexplained: Vec<usize> = duplicated.iter().copied().filter(|i| !resent_after_timeout[*i]).take(10).collect();
    assert!(
        unexplained.is_empty(),
        "stored more than once without a timed-out call to explain it: {unexplained:?} (first ten)"
    );
    assert!(
        duplicated.len() as u64 <= stats.resent_after_timeout,
        "{} duplicated, {} sent again after a timeout",
        duplicated.len(),
        stats.resent_after_timeout
    );
    (duplicated.len(), failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_held_past_the_timeout_lower_the_limit_lengthen_timeouts_and_nothing_expires() {
    let n = records_to_put();
    let client = kinesis().await;
    let stream = unique_name("ktk-prod-slow");
    create_stream(&client, &stream, SHARDS).await;
    let upstream: SocketAddr = {
        let endpoint = std::env::var("AWS_ENDPOINT_URL").unwrap_or_else(|_| ktk_tests::DEFAULT_ENDPOINT.to_owned());
        let host = endpoint.trim_start_matches("http://").trim_end_matches('/');
        tokio::net::lookup_host(host).await.expect("LocalStack's address").next().expect("an address")
    };
    let proxy = SlowProxy::start(upstream, test_timeout(n)).await;
    let run = tokio::time::timeout(test_timeout(n), async {
        // The default 6 s request timeout: the answers the proxy holds longer than that are
        // late. Each lowers the limit and doubles the timeout (up to 16 s here); the producer
        // gives up on a call only at twice its timeout (12 s at first), past the proxy's 8 s plus
        // LocalStack's own time, so every late answer comes back and nothing is sent twice.
        // Calls of 100 records, so that LocalStack answers the others well within half the
        // timeout (healthy) even on a loaded machine, and the limit can grow again once the
        // proxy stops holding answers.
        let config = ProducerConfig::new(&stream)
            .with_aggregation(false)
            .with_collection_max_count(100)
            .with_max_request_timeout(Duration::from_secs(16))
            .with_max_outstanding_records(10_000);
        let aws = aws_config_at(&format!("http://{}", proxy.addr)).await;
        let producer = Producer::new(config, &aws).await.expect("producer starts");
        let start = producer.stats();
        let log = LimitLog::start(&producer);

        // The first fifth while the proxy holds answers (with the limit at 1 or 2 and 40% of the
        // calls held 3-8 s, that is the slow part of the test), the rest with fast answers.
        let started = Instant::now();
        proxy.set_slow(true);
        let mut results = put_range(&producer, 0..n / 5).await;
        let slow_phase = log.so_far();
        let held = proxy.delayed.load(Ordering::SeqCst);
        proxy.set_slow(false);
        results.extend(put_range(&producer, n / 5..n).await);
        let stats = producer.shutdown(Duration::from_secs(30)).await;
        let took = started.elapsed().as_secs_f64();
        let log = log.stop();
        println!(
            "slow proxy: {n} records put in {took:.1} s ({:.0}/s), {held} answers held; {stats:?}",
            n as f64 / took
        );
        println!("slow proxy: concurrency limit over time (request timeout): {}", changes(&log));

        let read = Instant::now();
        let (duplicated, failed) = check_delivery(&client, &stream, &results, &stats).await;
        println!(
            "slow proxy: {duplicated} records stored twice (sent again after a call given up on), {failed} failed; \
             read back in {:.1} s",
            read.elapsed().as_secs_f64()
        );
        assert!(held > 0 && stats.timed_out_calls > 0, "the proxy held answers past the timeout: {stats:?}");
        assert!(stats.late_answers > 0, "and the producer waited for them: {stats:?}");
        let lowest = slow_phase.iter().map(|(_, limit, _)| *limit).min().unwrap_or(start.concurrency_limit);
        assert!(
            lowest < start.concurrency_limit,
            "the limit went down while answers were held: {}",
            changes(&slow_phase)
        );
        let longest = slow_phase.iter().map(|(_, _, timeout)| *timeout).max().unwrap_or(0);
        assert!(longest > 6_000 && longest <= 16_000, "timeouts grew, within their bound: {}", changes(&slow_phase));
        let after = &log[slow_phase.len()..];
        assert!(
            after.iter().any(|(_, limit, _)| *limit > lowest),
            "and back up once answers were fast: {}",
            changes(&log)
        );
        assert_eq!((failed, duplicated), (0, 0), "every record in once: {stats:?}");
        assert_eq!(stats.abandoned_calls, 0, "every late answer came back: {stats:?}");
    })
    .await;
    drop(proxy);
    delete_stream(&client, &stream).await;
    run.expect("the test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttling_kinesis_lowers_the_limit_and_nothing_expires() {
    let n = records_to_put();
    let client = flaky_kinesis().await;
    let stream = unique_name("ktk-prod-adaptive-throttled");
    create_stream(&client, &stream, SHARDS).await;
    let run = tokio::time::timeout(test_timeout(n), async {
        // Calls of 100 records: LocalStack takes about 15 ms per plain record of a 100,000-record
        // stream, so a 500-record call takes 5-8 s there, and a record refused four or five times
        // in a row (30% each time) ran out its 30 s TTL: 2% of 100,000 did. A record refused
        // that often at Kinesis's speed would not; short calls keep each attempt short here too.
        let config = ProducerConfig::new(&stream)
            .with_aggregation(false)
            .with_collection_max_count(100)
            // Calls are answered, only refused: a long timeout keeps a slow LocalStack from
            // adding timeouts (and copies) to the throttling this test is about.
            .with_request_timeout(Duration::from_secs(30))
            .with_backoff(Duration::from_millis(20), Duration::from_millis(500))
            .with_max_outstanding_records(10_000);
        let producer = Producer::new(config, &flaky_aws_config().await).await.expect("producer starts");
        let start = producer.stats();
        let log = LimitLog::start(&producer);
        let started = Instant::now();
        let results = put_range(&producer, 0..n).await;
        let stats = producer.shutdown(Duration::from_secs(30)).await;
        let took = started.elapsed().as_secs_f64();
        let log = log.stop();
        println!("throttling: {n} records put in {took:.1} s ({:.0}/s); {stats:?}", n as f64 / took);
        println!("throttling: concurrency limit over time (request timeout): {}", changes(&log));
        let read = Instant::now();
        let (duplicated, failed) = check_delivery(&client, &stream, &results, &stats).await;
        println!(
            "throttling: {duplicated} records stored twice, {failed} failed; read back in {:.1} s",
            read.elapsed().as_secs_f64()
        );
        assert!(stats.throttled > 0, "LocalStack throttled (is KTK_FLAKY_ENDPOINT_URL the flaky one?): {stats:?}");
        let lowest = log.iter().map(|(_, limit, _)| *limit).min().unwrap_or(start.concurrency_limit);
        assert!(lowest < start.concurrency_limit, "the limit went down: {}", changes(&log));
        assert_eq!((failed, duplicated), (0, 0), "every record in once: {stats:?}");
    })
    .await;
    delete_stream(&client, &stream).await;
    run.expect("the test finished in time");
}
