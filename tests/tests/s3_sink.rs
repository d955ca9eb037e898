//! The S3 sink and its reader against LocalStack's S3: both formats, rewrites that change nothing,
//! hour partitions, multipart uploads (and their abort), a missing bucket, dead letters, and the
//! objects and bytes 10,000 events take. Each test makes its own bucket.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ktk_pipeline::s3::{
    self, BatchWrite, Client, S3Error, S3Format, S3Sink, S3SinkConfig, WriteOutcome, read_dead_letters, read_events,
};
use ktk_pipeline::{Batch, DeadLetter, EventRecord, Sink, SinkReport};
use ktk_proto::events::v1::{Event, EventType, Geo, Platform};
use ktk_tests::{DEFAULT_ENDPOINT, aws_config, unique_name};

/// 2026-03-01T10:00:00Z
const T_10_00: i64 = 1_772_359_200_000;
const MS_PER_HOUR: i64 = 3_600_000;
const MIB: usize = 1024 * 1024;

/// An S3 client for LocalStack (path-style addressing), after checking that S3 answers.
async fn s3_client() -> Client {
    let config = aws_config().await;
    let client = s3::client(&config, true);
    if let Err(error) = client.list_buckets().send().await {
        panic!(
            "S3 is not reachable at {}: {error:?}. Start LocalStack with `localstack/up.sh` (or set \
             AWS_ENDPOINT_URL); these tests never skip.",
            config.endpoint_url().unwrap_or(DEFAULT_ENDPOINT)
        );
    }
    client
}

async fn new_bucket(client: &Client) -> String {
    let bucket = unique_name("ktk-s3");
    client.create_bucket().bucket(&bucket).send().await.unwrap_or_else(|e| panic!("create bucket {bucket}: {e:?}"));
    bucket
}

fn sink(client: &Client, bucket: &str, prefix: &str, format: S3Format) -> S3Sink {
    S3Sink::with_client(client.clone(), S3SinkConfig::new(bucket, prefix).with_format(format))
}

async fn get(client: &Client, bucket: &str, key: &str) -> Bytes {
    let object =
        client.get_object().bucket(bucket).key(key).send().await.unwrap_or_else(|e| panic!("get {key}: {e:?}"));
    object.body.collect().await.expect("object body").into_bytes()
}

async fn keys(client: &Client, bucket: &str) -> Vec<String> {
    let listing = client.list_objects_v2().bucket(bucket).send().await.expect("list objects");
    listing.contents().iter().filter_map(|o| o.key().map(str::to_owned)).collect()
}

fn ms_time(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms as u64)
}

/// An event as an app would send it: ids from pools, a few attributes, geo for most.
fn event(index: u64, occurred_at_ms: i64) -> Event {
    let types = [EventType::Play, EventType::Heartbeat, EventType::Pause, EventType::AdImpression, EventType::PageView];
    let platforms = [Platform::Ios, Platform::Android, Platform::Roku, Platform::FireTv, Platform::Web];
    let mut attributes = HashMap::new();
    attributes.insert("bitrate_kbps".to_owned(), (1_500 + (index % 8) * 500).to_string());
    attributes.insert("cdn".to_owned(), ["akamai", "fastly", "cloudfront"][(index % 3) as usize].to_owned());
    if index.is_multiple_of(4) {
        attributes.insert("experiment".to_owned(), "player-v2".to_owned());
    }
    Event {
        event_id: uuid::Uuid::new_v4().to_string(),
        r#type: types[(index % 5) as usize] as i32,
        occurred_at_ms,
        received_at_ms: occurred_at_ms + 180 + (index % 50) as i64,
        user_id: if index.is_multiple_of(3) { String::new() } else { format!("user-{:06}", index % 997) },
        device_id: format!("device-{:08x}", (index % 211) * 7_919),
        session_id: format!("session-{:06}", index / 40),
        platform: platforms[(index % 5) as usize] as i32,
        app_version: "5.12.0".into(),
        os_version: ["17.4", "14", "12.5", "7.6", "124.0"][(index % 5) as usize].into(),
        device_model: ["iPhone15,2", "Pixel 8", "Roku Ultra", "AFTMM", "Chrome"][(index % 5) as usize].into(),
        content_id: format!("content-{:05}", index % 120),
        content_title: format!("Episode {} — «Ünïcode»", index % 120),
        position_ms: (index as i64 % 3_000) * 1_000,
        duration_ms: 2_700_000,
        ad_id: if index % 5 == 3 { format!("ad-{}", index % 17) } else { String::new() },
        ad_break: if index % 5 == 3 { "midroll-1".into() } else { String::new() },
        page: if index % 5 == 4 { "/browse/series".into() } else { String::new() },
        target: String::new(),
        error_code: String::new(),
        error_message: String::new(),
        geo: (!index.is_multiple_of(10)).then(|| Geo {
            lat: 40.0 + (index % 100) as f64 / 100.0,
            lon: -74.0 - (index % 50) as f64 / 50.0,
            country: "US".into(),
            region: "US-NY".into(),
        }),
        attributes,
        schema_version: "1.0".into(),
        // Some events came in without a write key: no app id.
        app_id: if index.is_multiple_of(7) {
            String::new()
        } else {
            ["tv-ios", "tv-android", "tv-roku", "tv-firetv", "tv-web"][(index % 5) as usize].into()
        },
    }
}

/// `count` records of `shard` from sequence index `from`, `spacing_ms` apart from `start_ms`.
fn records(shard: &str, from: u64, count: u64, start_ms: i64, spacing_ms: i64) -> Vec<EventRecord> {
    (from..from + count)
        .map(|i| {
            let occurred = start_ms + (i - from) as i64 * spacing_ms;
            EventRecord {
                event: event(i, occurred),
                shard_id: shard.to_owned(),
                sequence_number: format!("49663{i:051}"),
                sub_sequence_number: i % 3,
                arrival: (!i.is_multiple_of(97)).then(|| ms_time(occurred + 900)),
            }
        })
        .collect()
}

fn batch(stream: &str, events: Vec<EventRecord>) -> Batch {
    let position = |r: &EventRecord| (r.sequence_number.clone(), r.sub_sequence_number);
    Batch {
        stream: stream.to_owned(),
        shard_id: events[0].shard_id.clone(),
        first: position(&events[0]),
        last: position(&events[events.len() - 1]),
        events,
        dead_letters: vec![],
    }
}

/// Every written event read back exactly once, with every field equal.
fn assert_read_back(read: &[EventRecord], written: &[EventRecord]) {
    let by_id: HashMap<&str, &EventRecord> = read.iter().map(|r| (r.event.event_id.as_str(), r)).collect();
    assert_eq!(by_id.len(), read.len(), "an event_id read twice");
    assert_eq!(read.len(), written.len(), "events read back");
    for record in written {
        let found =
            by_id.get(record.event.event_id.as_str()).unwrap_or_else(|| panic!("{} missing", record.event.event_id));
        assert_eq!(*found, record);
    }
}

async fn write(sink: &S3Sink, batch: &Batch) -> BatchWrite {
    sink.write_batch(batch).await.unwrap_or_else(|e| panic!("write batch: {e}"))
}

#[tokio::test]
async fn both_formats_are_read_back_with_each_event_once() {
    let client = s3_client().await;
    let bucket = new_bucket(&client).await;
    let parquet = sink(&client, &bucket, "p", S3Format::Parquet);
    let json_lines = sink(&client, &bucket, "p", S3Format::JsonLinesGzip);

    let shard0 = records("shardId-000000000000", 0, 600, T_10_00, 1_000);
    let shard1 = records("shardId-000000000001", 10_000, 500, T_10_00, 1_200);
    let a = batch("clicks", shard0[..500].to_vec());
    let b = batch("clicks", shard1.clone());
    // Shard 0 read again after a takeover, cut elsewhere: 100 events already in `a`.
    let c = batch("clicks", shard0[400..].to_vec());

    assert_eq!(write(&parquet, &a).await.report(), SinkReport { written: 500, duplicates: 0, reread: 0 });
    assert_eq!(write(&json_lines, &b).await.report(), SinkReport { written: 500, duplicates: 0, reread: 0 });
    assert_eq!(json_lines.write(&c).await.expect("write c"), SinkReport { written: 200, duplicates: 0, reread: 0 });
    let stored = keys(&client, &bucket).await;
    assert_eq!(stored.len(), 3, "{stored:?}");
    assert_eq!(stored.iter().filter(|k| k.ends_with(".parquet")).count(), 1, "{stored:?}");

    let read = read_events(&client, &bucket, "p").await.expect("read events");
    assert_eq!((read.objects, read.duplicates), (3, 100));
    let written: Vec<EventRecord> = shard0.iter().chain(&shard1).cloned().collect();
    assert_read_back(&read.events, &written);
    let sizes: u64 = futures::future::join_all(stored.iter().map(|k| get(&client, &bucket, k)))
        .await
        .iter()
        .map(|b| b.len() as u64)
        .sum();
    assert_eq!(read.bytes, sizes);

    // A narrower prefix (one partition) reads only its objects; another prefix is empty.
    let one = read_events(&client, &bucket, "p/events/dt=2026-03-01/hour=10/clicks-shardId-000000000001").await;
    assert_eq!(one.expect("read one").events.len(), 500);
    assert_eq!(read_events(&client, &bucket, "q/").await.expect("read nothing").objects, 0);
}

#[tokio::test]
async fn the_same_batch_written_again_is_the_same_object_and_bytes() {
    let client = s3_client().await;
    let bucket = new_bucket(&client).await;
    for format in [S3Format::Parquet, S3Format::JsonLinesGzip] {
        let prefix = format!("again-{}", format.extension());
        let first_sink = sink(&client, &bucket, &prefix, format);
        let batch = batch("views", records("shardId-000000000002", 0, 300, T_10_00, 500));
        let first = write(&first_sink, &batch).await;
        assert_eq!(first.objects.len(), 1);
        assert_eq!(first.objects[0].outcome, WriteOutcome::Created);
        let key = first.objects[0].key.clone();
        let bytes = get(&client, &bucket, &key).await;
        assert_eq!(
            bytes,
            first_sink.objects(&batch).expect("encode")[0].body,
            "{format:?}: stored bytes are the encoded ones"
        );

        // Another process (a new sink on a new client) rebuilds the batch after a crash.
        let again = S3Sink::new(
            &aws_config().await,
            S3SinkConfig::new(&bucket, &prefix).with_format(format).with_path_style(true),
        );
        let second = write(&again, &batch).await;
        assert_eq!(second.objects[0].key, key);
        assert_eq!(second.objects[0].outcome, WriteOutcome::AlreadyExisted { identical: true });
        assert_eq!(second.report(), SinkReport { written: 0, duplicates: 300, reread: 300 });
        assert_eq!(get(&client, &bucket, &key).await, bytes, "{format:?}: the object was not modified");
        assert_eq!(
            again.write(&batch).await.expect("third write"),
            SinkReport { written: 0, duplicates: 300, reread: 300 }
        );

        let read = read_events(&client, &bucket, &prefix).await.expect("read");
        assert_eq!((read.objects, read.duplicates), (1, 0));
        assert_read_back(&read.events, &batch.events);
    }
}

#[tokio::test]
async fn a_batch_spanning_two_hours_is_one_object_per_hour() {
    let client = s3_client().await;
    let bucket = new_bucket(&client).await;
    // 10:58:20 to 11:01:40, one event a second.
    let events = records("shardId-000000000000", 0, 200, T_10_00 + MS_PER_HOUR - 100_000, 1_000);
    for format in [S3Format::Parquet, S3Format::JsonLinesGzip] {
        let prefix = format!("hours-{}", format.extension());
        let batch = batch("plays", events.clone());
        let written = write(&sink(&client, &bucket, &prefix, format), &batch).await;
        let name = format!(
            "plays-shardId-000000000000-{}-0-{}-1.{}",
            events[0].sequence_number,
            events[199].sequence_number,
            format.extension()
        );
        let keys: Vec<&str> = written.objects.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                format!("{prefix}/events/dt=2026-03-01/hour=10/{name}"),
                format!("{prefix}/events/dt=2026-03-01/hour=11/{name}")
            ]
        );
        assert_eq!(written.objects.iter().map(|o| o.events).collect::<Vec<_>>(), [100, 100]);
        let read =
            read_events(&client, &bucket, &format!("{prefix}/events/dt=2026-03-01/hour=11/")).await.expect("read");
        assert_read_back(&read.events, &events[100..]);
        let read = read_events(&client, &bucket, &prefix).await.expect("read");
        assert_eq!(read.objects, 2);
        assert_read_back(&read.events, &events);
    }
}

/// Events whose attributes do not compress, so that objects pass S3's 5 MiB part minimum with
/// few events.
fn bulky_records(shard: &str, from: u64, count: u64, seed: u64) -> Vec<EventRecord> {
    let mut state = seed | 1;
    let mut noise = move |len: usize| {
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                char::from(b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ+/"[(state % 64) as usize])
            })
            .collect::<String>()
    };
    let mut records = records(shard, from, count, T_10_00, 10);
    for record in &mut records {
        record.event.attributes.insert("payload".into(), noise(32 * 1024));
    }
    records
}

#[tokio::test]
async fn large_objects_go_up_in_parts_and_failed_uploads_are_aborted() {
    let client = s3_client().await;
    let bucket = new_bucket(&client).await;

    // Threshold 0: a small object is a multipart upload of one (last, so small) part.
    let small = batch("big", records("shardId-000000000000", 0, 50, T_10_00, 10));
    let config = S3SinkConfig::new(&bucket, "mp").with_multipart_threshold(0);
    let multipart = S3Sink::with_client(client.clone(), config.clone());
    let written = write(&multipart, &small).await;
    assert_eq!((written.objects[0].outcome, written.objects[0].parts), (WriteOutcome::Created, 1));
    let again = write(&multipart, &small).await;
    assert_eq!(again.objects[0].outcome, WriteOutcome::AlreadyExisted { identical: true });

    // About 6 MiB in 5 MiB parts: two parts, the first at S3's minimum.
    let config = config.with_multipart_threshold(5 * MIB).with_part_size(5 * MIB);
    let multipart = S3Sink::with_client(client.clone(), config.clone());
    let large = batch("big", bulky_records("shardId-000000000001", 0, 256, 7));
    let written = write(&multipart, &large).await;
    let object = &written.objects[0];
    assert!(object.bytes > 5 * MIB as u64 && object.bytes < 10 * MIB as u64, "{} bytes", object.bytes);
    assert_eq!((object.outcome, object.parts), (WriteOutcome::Created, 2));
    assert_eq!(get(&client, &bucket, &object.key).await, multipart.objects(&large).expect("encode")[0].body);
    let again = write(&multipart, &large).await;
    assert_eq!(
        (again.objects[0].outcome, again.objects[0].parts),
        (WriteOutcome::AlreadyExisted { identical: true }, 0)
    );

    // Two writers of the same large batch at once: one creates it; the other finds it there (if it
    // looked late) or has its completion refused (If-None-Match) and aborts its upload.
    let racing = batch("big", bulky_records("shardId-000000000002", 0, 256, 11));
    let other = S3Sink::with_client(client.clone(), config.clone());
    let (one, two) = tokio::join!(multipart.write_batch(&racing), other.write_batch(&racing));
    let (one, two) = (one.expect("writer one"), two.expect("writer two"));
    let mut outcomes = [one.objects[0].outcome, two.objects[0].outcome];
    outcomes.sort_by_key(|o| matches!(o, WriteOutcome::AlreadyExisted { .. }));
    // S3 refuses the second conditional completion; LocalStack checks If-None-Match before it
    // completes, not atomically with it, so two completions that overlap can both succeed there
    // (seen once in CI). Either way the object is the batch's bytes, whoever wrote it.
    assert_eq!(outcomes[0], WriteOutcome::Created, "{outcomes:?}");
    assert!(
        matches!(outcomes[1], WriteOutcome::AlreadyExisted { identical: true } | WriteOutcome::Created),
        "{outcomes:?}"
    );
    assert_eq!(get(&client, &bucket, &one.objects[0].key).await, multipart.objects(&racing).expect("encode")[0].body);
    let pending = client.list_multipart_uploads().bucket(&bucket).send().await.expect("list uploads");
    assert!(pending.uploads().is_empty(), "uploads left behind: {:?}", pending.uploads());

    let read = read_events(&client, &bucket, "mp").await.expect("read");
    assert_eq!(read.objects, 3);
    let written: Vec<EventRecord> = small.events.iter().chain(&large.events).chain(&racing.events).cloned().collect();
    assert_read_back(&read.events, &written);
}

#[tokio::test]
async fn a_missing_bucket_is_an_error_that_names_it_and_is_not_retryable() {
    let client = s3_client().await;
    let bucket = unique_name("ktk-s3-missing");
    let batch = batch("x", records("shardId-000000000000", 0, 10, T_10_00, 10));
    for threshold in [usize::MAX, 0] {
        let sink =
            S3Sink::with_client(client.clone(), S3SinkConfig::new(&bucket, "p").with_multipart_threshold(threshold));
        let error = sink.write(&batch).await.expect_err("no bucket");
        assert!(!error.is_retryable(), "{error}");
        assert!(error.message().contains(&bucket), "{error}");
        assert_eq!(error.sink(), "s3");
    }
    match read_events(&client, &bucket, "p").await {
        Err(error @ S3Error::NoSuchBucket { .. }) => {
            assert!(!error.is_retryable() && error.to_string().contains(&bucket))
        }
        other => panic!("expected NoSuchBucket, got {other:?}"),
    }
}

#[tokio::test]
async fn dead_letters_are_kept_apart_with_their_reason() {
    let client = s3_client().await;
    let bucket = new_bucket(&client).await;
    let mut with_letters = batch("mixed", records("shardId-000000000000", 0, 20, T_10_00, 10));
    with_letters.dead_letters = (0..3u8)
        .map(|i| DeadLetter {
            shard_id: "shardId-000000000000".into(),
            sequence_number: format!("49663{:051}", 100 + u64::from(i)),
            sub_sequence_number: u64::from(i),
            partition_key: format!("device-{i}"),
            data: Bytes::from(vec![0xde, 0xad, i, 0xff]),
            reason: "not an events.v1 Event: missing event_id".into(),
            arrival: if i == 2 { None } else { Some(ms_time(T_10_00 + i64::from(i))) },
        })
        .collect();
    for format in [S3Format::Parquet, S3Format::JsonLinesGzip] {
        let prefix = format!("dl-{}", format.extension());
        let written = write(&sink(&client, &bucket, &prefix, format), &with_letters).await;
        assert_eq!(written.objects.iter().map(|o| o.dead_letters).sum::<u64>(), 3);
        assert_eq!(written.report(), SinkReport { written: 20, duplicates: 0, reread: 0 });
        let letters = read_dead_letters(&client, &bucket, &prefix).await.expect("read dead letters");
        assert_eq!(letters.objects, 2, "one per arrival day, and dt=unknown");
        let mut read = letters.dead_letters;
        read.sort_by(|a, b| a.sequence_number.cmp(&b.sequence_number));
        assert_eq!(read, with_letters.dead_letters);
        let events = read_events(&client, &bucket, &prefix).await.expect("read events");
        assert_read_back(&events.events, &with_letters.events);
    }
}

#[tokio::test]
async fn objects_and_bytes_per_10000_events() {
    let client = s3_client().await;
    let bucket = new_bucket(&client).await;
    for format in [S3Format::Parquet, S3Format::JsonLinesGzip] {
        let prefix = format!("volume-{}", format.extension());
        let sink = sink(&client, &bucket, &prefix, format);
        // Ten batches of 1,000 from four shards; 20 ms apart, so one hour partition per batch.
        let mut written = Vec::new();
        let started = Instant::now();
        for b in 0..10u64 {
            let shard = format!("shardId-00000000000{}", b % 4);
            let events = records(&shard, b * 1_000, 1_000, T_10_00 + b as i64 * 20_000, 20);
            let batch = batch("volume", events);
            assert_eq!(
                sink.write(&batch).await.expect("write"),
                SinkReport { written: 1_000, duplicates: 0, reread: 0 }
            );
            written.extend(batch.events);
        }
        let write_time = started.elapsed();
        let started = Instant::now();
        let read = read_events(&client, &bucket, &prefix).await.expect("read");
        let read_time = started.elapsed();
        assert_read_back(&read.events, &written);
        println!(
            "{format:?}: 10,000 events -> {} S3 objects, {} bytes ({:.1} bytes/event); written in {write_time:?}, \
             read back in {read_time:?}",
            read.objects,
            read.bytes,
            read.bytes as f64 / 10_000.0
        );
        assert_eq!(read.objects, 10);
    }
}
