//! The delivery pipeline under failure, with `consumer` processes (the ECS binary) against
//! LocalStack (Kinesis, DynamoDB, S3) and a real PostgreSQL:
//! - a consumer SIGKILLed in the middle of a batch: the other takes over, nothing is lost, the
//!   store holds each event once, and the S3 objects are reproducible byte for byte (a replay of
//!   the whole stream by a third application finds every object it builds already there, identical);
//! - a shard split during delivery: the children wait for their parent, nothing is lost;
//! - the database refusing connections in the middle (a proxy in front of PostgreSQL is shut,
//!   dropping its connections, and opened again): the shards wait, then catch up;
//! - poison records (random bytes, an event without event_id, a truncated aggregate) between good
//!   events: dead-lettered with reasons in S3 and the store, the events around them delivered.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_sdk_kinesis::primitives::Blob;
use ktk_consumer::lease::{ExtendedSequenceNumber, LeaseTable};
use ktk_pipeline::s3::{read_dead_letters, read_events};
use ktk_producer::{Producer, ProducerConfig, Record};
use ktk_proto::events::v1::{Event, EventType, Platform};
use ktk_tests::consumer_support::{ConsumerProcess, ConsumerSpec, database_url};
use ktk_tests::{aws_config, create_stream, delete_stream, kinesis, open_shards, unique_name, wait_stream_active};
use prost::Message as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn event(tag: &str, i: usize) -> Event {
    Event {
        event_id: format!("{tag}-{i:06}"),
        r#type: if i.is_multiple_of(3) { EventType::Play } else { EventType::Heartbeat } as i32,
        occurred_at_ms: 1_760_000_000_000 + (i as i64) * 10,
        received_at_ms: now_ms(),
        user_id: format!("user-{}", i % 300),
        platform: Platform::FireTv as i32,
        content_id: format!("content-{}", i % 25),
        position_ms: (i as i64) * 1000,
        ..Event::default()
    }
}

/// Puts `n` events over about `over`, 2% of them twice (a producer retry); returns how many were
/// put twice.
fn produce(stream: &str, tag: &'static str, n: usize, over: Duration) -> JoinHandle<usize> {
    let stream = stream.to_owned();
    tokio::spawn(async move {
        let producer = Producer::new(
            ProducerConfig::new(&stream).with_request_timeout(Duration::from_secs(60)),
            &aws_config().await,
        )
        .await
        .expect("producer");
        let started = Instant::now();
        let mut receipts = Vec::with_capacity(n + n / 50);
        let mut injected = 0;
        for i in 0..n {
            let due = over.mul_f64(i as f64 / n as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
            let e = event(tag, i);
            let bytes = e.encode_to_vec();
            receipts.push(producer.put(Record::new(e.user_id.clone(), bytes.clone())).await.expect("put"));
            if i % 50 == 17 {
                receipts.push(producer.put(Record::new(e.user_id.clone(), bytes)).await.expect("put"));
                injected += 1;
            }
        }
        for receipt in receipts {
            receipt.await.expect("acknowledged");
        }
        producer.shutdown(Duration::from_secs(10)).await;
        injected
    })
}

struct Fixture {
    kinesis: aws_sdk_kinesis::Client,
    s3: ktk_pipeline::s3::Client,
    pool: sqlx::PgPool,
    stream: String,
    app: String,
    bucket: String,
    table: String,
}

impl Fixture {
    async fn new(tag: &str, shards: i32) -> Self {
        let kinesis = kinesis().await;
        let aws = aws_config().await;
        let s3 = ktk_pipeline::s3::client(&aws, true);
        let stream = unique_name(&format!("ktk-{tag}"));
        let bucket = unique_name(&format!("ktk-{tag}")).to_lowercase();
        let table = format!("{}_{}", tag.replace('-', "_"), &uuid::Uuid::new_v4().simple().to_string()[..8]);
        create_stream(&kinesis, &stream, shards).await;
        s3.create_bucket().bucket(&bucket).send().await.expect("create bucket");
        let pool = sqlx::PgPool::connect(&database_url()).await.expect("PostgreSQL");
        Fixture { kinesis, s3, pool, stream, app: unique_name(&format!("ktk-{tag}-app")), bucket, table }
    }

    fn spec(&self, worker: &str) -> ConsumerSpec {
        ConsumerSpec::new(&self.stream, &self.app, worker, &self.bucket, "events", &self.table)
    }

    async fn stored(&self) -> i64 {
        // The table appears when the first consumer migrates the store.
        sqlx::query_scalar(&format!("SELECT count(*) FROM \"{}\"", self.table)).fetch_one(&self.pool).await.unwrap_or(0)
    }

    async fn wait_stored(&self, n: usize, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let stored = self.stored().await;
            if stored == n as i64 {
                return;
            }
            assert!(stored <= n as i64, "the store holds {stored} events, more than the {n} unique ones");
            assert!(Instant::now() < deadline, "the store holds {stored} of {n} events after {within:?}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Waits until S3, read back through the reader, yields exactly `n` events (each once).
    async fn wait_s3(&self, n: usize, within: Duration) -> ktk_pipeline::s3::ReadEvents {
        let deadline = Instant::now() + within;
        loop {
            let read = read_events(&self.s3, &self.bucket, "events").await.expect("read S3");
            let ids: HashSet<&str> = read.events.iter().map(|e| e.event.event_id.as_str()).collect();
            assert_eq!(ids.len(), read.events.len(), "the reader yields each event once");
            if read.events.len() == n {
                return read;
            }
            assert!(Instant::now() < deadline, "S3 holds {} of {n} events after {within:?}", read.events.len());
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn drop_all(self) {
        let sql = format!("DROP TABLE IF EXISTS \"{0}\", \"{0}_dead_letters\"", self.table);
        sqlx::query(&sql).execute(&self.pool).await.expect("drop tables");
        delete_stream(&self.kinesis, &self.stream).await;
    }
}

async fn wait_health(
    process: &ConsumerProcess,
    what: &str,
    within: Duration,
    done: impl Fn(&serde_json::Value) -> bool,
) {
    let deadline = Instant::now() + within;
    loop {
        if let Some(h) = process.health().await
            && done(&h)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{}: {what} not reached in {within:?}: {:?}",
            process.name,
            process.health().await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn count(h: &serde_json::Value, field: &str) -> u64 {
    h[field].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_killed_mid_batch_loses_nothing_and_its_s3_objects_come_back_byte_identical() {
    const UNIQUE: usize = 12_000;
    let f = Fixture::new("kill", 4).await;
    let a = ConsumerProcess::spawn(&f.spec("consumer-a"));
    let b = ConsumerProcess::spawn(&f.spec("consumer-b"));
    let producing = produce(&f.stream, "kill", UNIQUE, Duration::from_secs(12));

    // Kill A while it delivers (its batches of the current 2 s window are open).
    wait_health(&a, "1,500 events delivered", Duration::from_secs(90), |h| count(h, "events_delivered") >= 1_500).await;
    let a_delivered = a.health_count("events_delivered").await;
    a.kill().await;
    let killed = Instant::now();
    let injected = producing.await.expect("producer");

    f.wait_stored(UNIQUE, Duration::from_secs(120)).await;
    let read = f.wait_s3(UNIQUE, Duration::from_secs(60)).await;
    let rewritten = b.metric("S3Objects", &[("outcome", "identical")]).await;
    assert_eq!(b.metric("S3Objects", &[("outcome", "different")]).await, 0.0, "no S3 object rebuilt differently");
    println!(
        "kill: A delivered {a_delivered} events, then SIGKILL; B caught up and the store held all {UNIQUE} {:?} later; \
         B found {rewritten} of A's objects already written, identical; S3: {} objects, {} bytes; duplicates among \
         objects {}; injected duplicates {injected}; B counted {} duplicates",
        killed.elapsed(),
        read.objects,
        read.bytes,
        read.duplicates,
        b.health_count("duplicates").await,
    );
    b.stop(Duration::from_secs(30)).await;

    // A third application replays the whole stream into the same bucket and store: every batch
    // it cuts is an object that is already there with the same bytes, and no event is new.
    let replay =
        ConsumerProcess::spawn(&ConsumerSpec { application: unique_name("ktk-kill-replay"), ..f.spec("replay") });
    let total = (UNIQUE + injected) as u64;
    wait_health(&replay, "every record replayed", Duration::from_secs(120), |h| {
        count(h, "events_delivered") + count(h, "duplicates") >= total
    })
    .await;
    let objects = replay.metric("S3Objects", &[]).await;
    let identical = replay.metric("S3Objects", &[("outcome", "identical")]).await;
    println!("replay: {objects} objects built, {identical} already there byte-identical");
    assert!(objects > 0.0);
    assert_eq!(identical, objects, "every object the replay built was already there, identical");
    assert_eq!(replay.health_count("events_delivered").await, 0, "nothing new to the sinks");
    replay.stop(Duration::from_secs(30)).await;
    assert_eq!(f.stored().await, UNIQUE as i64);
    f.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_split_during_delivery_loses_nothing() {
    const UNIQUE: usize = 6_000;
    let f = Fixture::new("split", 2).await;
    let consumer = ConsumerProcess::spawn(&f.spec("consumer-a"));
    let producing = produce(&f.stream, "split", UNIQUE, Duration::from_secs(10));
    wait_health(&consumer, "1,000 events delivered", Duration::from_secs(90), |h| {
        count(h, "events_delivered") >= 1_000
    })
    .await;
    let before: Vec<String> = open_shards(&f.kinesis, &f.stream).await.into_iter().map(|s| s.0).collect();
    let (parent, start, end) = open_shards(&f.kinesis, &f.stream).await.remove(0);
    f.kinesis
        .split_shard()
        .stream_name(&f.stream)
        .shard_to_split(&parent)
        .new_starting_hash_key((start + (end - start) / 2).to_string())
        .send()
        .await
        .expect("split");
    wait_stream_active(&f.kinesis, &f.stream).await;
    producing.await.expect("producer");

    f.wait_stored(UNIQUE, Duration::from_secs(120)).await;
    f.wait_s3(UNIQUE, Duration::from_secs(60)).await;
    let children: Vec<String> =
        open_shards(&f.kinesis, &f.stream).await.into_iter().map(|s| s.0).filter(|id| !before.contains(id)).collect();
    assert_eq!(children.len(), 2, "the split made two children: {children:?}");
    let sql = format!("SELECT count(*) FROM \"{}\" WHERE shard_id = ANY($1)", f.table);
    let on_children: i64 =
        sqlx::query_scalar(&sql).bind(&children).fetch_one(&f.pool).await.expect("count on children");
    assert!(on_children > 0, "events after the split were read from the children ({children:?})");
    let table = LeaseTable::new(&aws_config().await, &f.app);
    let leases = table.list().await.expect("leases").leases;
    assert_eq!(leases.len(), 4, "two shards and the two children of the split: {leases:?}");
    let parent_lease = leases.iter().find(|l| l.shard_id() == parent).expect("parent lease");
    assert_eq!(parent_lease.checkpoint, ExtendedSequenceNumber::SHARD_END, "the parent was finished");
    consumer.stop(Duration::from_secs(30)).await;
    f.drop_all().await;
}

/// A TCP proxy in front of PostgreSQL that can be shut (every connection dropped, new ones
/// refused) and opened again.
struct Proxy {
    port: u16,
    open: Arc<AtomicBool>,
    shut: Arc<Notify>,
}

impl Proxy {
    async fn start(upstream: &'static str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("address").port();
        let open = Arc::new(AtomicBool::new(true));
        let shut = Arc::new(Notify::new());
        let proxy = Proxy { port, open: open.clone(), shut: shut.clone() };
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else { continue };
                if !open.load(Ordering::SeqCst) {
                    drop(client); // refused: closed at once
                    continue;
                }
                let shut = shut.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = shut.notified() => {}
                    }
                });
            }
        });
        proxy
    }

    fn shut(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.shut.notify_waiters();
    }

    fn reopen(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_refusing_connections_mid_run_makes_shards_wait_then_catch_up_and_poison_is_dead_lettered() {
    const UNIQUE: usize = 4_000;
    let f = Fixture::new("dbdown", 2).await;
    let proxy = Proxy::start("127.0.0.1:5432").await;
    let url = format!("postgres://postgres@127.0.0.1:{}/test", proxy.port);
    let consumer = ConsumerProcess::spawn(&ConsumerSpec { database_url: url, ..f.spec("consumer-a") });
    let producing = produce(&f.stream, "dbdown", UNIQUE, Duration::from_secs(10));

    // Poison between the good events: random bytes, an event without event_id, a truncated KPL
    // aggregate (the magic, then a broken protobuf).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut truncated = ktk_proto::aggregation::MAGIC.to_vec();
    truncated.extend_from_slice(&[0x0a, 0x05, b'a']);
    let no_id = Event { user_id: "u".into(), r#type: EventType::Play as i32, ..Event::default() }.encode_to_vec();
    let poison = [("poison-1", vec![0xff, 0x00, 0x13, 0x37, 0x42]), ("poison-2", no_id), ("poison-3", truncated)];
    for (key, data) in poison {
        f.kinesis
            .put_record()
            .stream_name(&f.stream)
            .partition_key(key)
            .data(Blob::new(data))
            .send()
            .await
            .expect("put");
    }

    wait_health(&consumer, "500 events delivered", Duration::from_secs(90), |h| count(h, "events_delivered") >= 500)
        .await;
    proxy.shut();
    let shut_at = Instant::now();
    // Writes already past the store may finish; after that, nothing is delivered while it is down.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stalled = consumer.health_count("events_delivered").await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let during = consumer.health().await.expect("health while the database is down");
    println!(
        "database down: delivered {stalled} 2 s in, {} 8 s in; sink errors {}",
        count(&during, "events_delivered"),
        count(&during, "sink_errors")
    );
    assert!(count(&during, "sink_errors") > 0, "the failing writes were seen: {during}");
    assert_eq!(count(&during, "events_delivered"), stalled, "no batch is acknowledged without the store: {during}");
    proxy.reopen();
    producing.await.expect("producer");

    f.wait_stored(UNIQUE, Duration::from_secs(120)).await;
    println!("the store caught up {:?} after the database went down", shut_at.elapsed());
    f.wait_s3(UNIQUE, Duration::from_secs(60)).await;
    wait_health(&consumer, "3 dead letters", Duration::from_secs(30), |h| count(h, "dead_letters") == 3).await;

    // Dead letters, with their reasons, in the store and in S3.
    let sql = format!("SELECT reason FROM \"{}_dead_letters\" ORDER BY reason", f.table);
    let reasons: Vec<String> = sqlx::query_scalar(&sql).fetch_all(&f.pool).await.expect("dead letters");
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("no event_id")), "{reasons:?}");
    let s3_dead = read_dead_letters(&f.s3, &f.bucket, "events").await.expect("read S3 dead letters");
    assert_eq!(s3_dead.dead_letters.len(), 3, "{s3_dead:?}");
    let keys: HashSet<&str> = s3_dead.dead_letters.iter().map(|d| d.partition_key.as_str()).collect();
    assert_eq!(keys, HashSet::from(["poison-1", "poison-2", "poison-3"]));
    consumer.stop(Duration::from_secs(30)).await;
    f.drop_all().await;
}
