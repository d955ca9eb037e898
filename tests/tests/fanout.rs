//! Enhanced fan-out against LocalStack: registering consumers (idempotent, racing workers),
//! reading shards through `SubscribeToShard` (order, deaggregation, exact resumption inside an
//! aggregate, the same records as polling), and subscribing again without losing or repeating
//! anything (renewed by lifetime, dropped mid-read, ended by the service).

use std::time::Duration;

use aws_sdk_kinesis::primitives::Blob;
use ktk_consumer::retrieval::{ConsumerRecord, ReaderConfig, ShardReader, StartingPosition};
use ktk_consumer::retrieval::{
    FanOutConfig, FanOutReader, Reader, RegistrationError, StreamConsumer, deregister_consumer, register_consumer,
};
use ktk_proto::aggregation::{Aggregator, UserRecord};
use ktk_proto::keys::HashKeyRange;
use ktk_tests::{create_stream, delete_stream, index_in, kinesis, numbered_data, unique_name, wait_stream_active};

struct Shard {
    id: String,
    range: HashKeyRange,
    /// A hash key in the shard, to put records there.
    key: String,
}

async fn shards(client: &aws_sdk_kinesis::Client, stream: &str) -> Vec<Shard> {
    let listing = client.list_shards().stream_name(stream).send().await.expect("list shards");
    listing
        .shards()
        .iter()
        .map(|shard| {
            let range = shard.hash_key_range().expect("range");
            Shard {
                id: shard.shard_id().to_owned(),
                range: HashKeyRange::parse(range.starting_hash_key(), range.ending_hash_key()).expect("range"),
                key: range.starting_hash_key().to_owned(),
            }
        })
        .collect()
}

async fn put(client: &aws_sdk_kinesis::Client, stream: &str, hash_key: &str, data: Vec<u8>) {
    client
        .put_record()
        .stream_name(stream)
        .partition_key("p")
        .explicit_hash_key(hash_key)
        .data(Blob::new(data))
        .send()
        .await
        .expect("put record");
}

/// Puts user records `indices` (data from [`numbered_data`] under `key`) as one KPL aggregate.
async fn put_aggregate(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
    hash_key: &str,
    key: &str,
    indices: std::ops::Range<usize>,
) {
    let mut aggregator = Aggregator::default();
    for i in indices {
        let user = UserRecord::new(format!("pk-{i}"), numbered_data(key, i, 0)).expect("valid record");
        aggregator.try_add(user).expect("fits");
    }
    let record = aggregator.finish().expect("an aggregate");
    put(client, stream, hash_key, record.data.to_vec()).await;
}

/// Puts user records `first..first + 10` under `key`: plain, an aggregate of 4, plain, an
/// aggregate of 3, plain.
async fn put_mixed(client: &aws_sdk_kinesis::Client, stream: &str, hash_key: &str, key: &str, first: usize) {
    put(client, stream, hash_key, numbered_data(key, first, 0)).await;
    put_aggregate(client, stream, hash_key, key, first + 1..first + 5).await;
    put(client, stream, hash_key, numbered_data(key, first + 5, 0)).await;
    put_aggregate(client, stream, hash_key, key, first + 6..first + 9).await;
    put(client, stream, hash_key, numbered_data(key, first + 9, 0)).await;
}

/// Reads until at least `n` records came back; fails after 20 s.
async fn read_n(reader: &mut Reader, n: usize) -> Vec<ConsumerRecord> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut out = Vec::new();
    while out.len() < n {
        let result = tokio::time::timeout_at(deadline, reader.read())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} records within 20 s: {:?}", out.len(), indices(&out)))
            .expect("read");
        out.extend(result.records);
    }
    out
}

fn indices(records: &[ConsumerRecord]) -> Vec<usize> {
    records.iter().map(|r| index_in(&r.data)).collect()
}

fn fan_out(
    client: &aws_sdk_kinesis::Client,
    consumer: &StreamConsumer,
    shard: &Shard,
    start: StartingPosition,
) -> Reader {
    let config = FanOutConfig::default().with_min_subscribe_interval(Duration::from_millis(200));
    FanOutReader::new(client.clone(), &consumer.consumer_arn, &shard.id, shard.range, start, config).into()
}

fn after(record: &ConsumerRecord) -> StartingPosition {
    StartingPosition::After {
        sequence_number: record.sequence_number.clone(),
        sub_sequence_number: record.sub_sequence_number,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registering_a_consumer_is_idempotent_and_safe_to_race() {
    let client = kinesis().await;
    let stream = unique_name("ktk-efo-reg");
    create_stream(&client, &stream, 1).await;
    let name = unique_name("app");

    // Two workers registering the same consumer at once both get it, ACTIVE.
    let (first, second) =
        tokio::join!(register_consumer(&client, &stream, &name), register_consumer(&client, &stream, &name));
    let (first, second) = (first.expect("first worker"), second.expect("second worker"));
    assert_eq!(first.consumer_arn, second.consumer_arn);
    assert_eq!(first.consumer_name, name);
    assert!(first.stream_arn.ends_with(&format!(":stream/{stream}")), "{first:?}");
    assert!(first.created.is_some());
    let described = client.describe_stream_consumer().consumer_arn(&first.consumer_arn).send().await.expect("describe");
    assert_eq!(described.consumer_description().map(|d| d.consumer_status().as_str()), Some("ACTIVE"));
    // Once registered, registering again is a look-up.
    let again = register_consumer(&client, &stream, &name).await.expect("again");
    assert_eq!(again.consumer_arn, first.consumer_arn);

    let missing = register_consumer(&client, &unique_name("ktk-no-such-stream"), &name).await;
    match missing {
        Err(error @ RegistrationError::StreamNotFound { .. }) => {
            assert!(!error.is_retryable() && error.to_string().contains("check the stream name"), "{error}");
        }
        other => panic!("expected StreamNotFound, got {other:?}"),
    }

    deregister_consumer(&client, &stream, &name).await.expect("deregister");
    let listed = client.list_stream_consumers().stream_arn(&first.stream_arn).send().await.expect("list consumers");
    assert!(listed.consumers().iter().all(|c| c.consumer_name() != name || c.consumer_status().as_str() == "DELETING"));
    // Deregistering what is not there is fine, as is a stream that is gone.
    deregister_consumer(&client, &stream, &name).await.expect("deregister again");
    deregister_consumer(&client, &unique_name("ktk-no-such-stream"), &name).await.expect("no stream");
    // And the name can be registered anew.
    let renewed = register_consumer(&client, &stream, &name).await.expect("register after deregistering");
    assert_eq!(renewed.consumer_name, name);
    delete_stream(&client, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_two_shards_with_aggregates_and_resumes_exactly_inside_an_aggregate() {
    let client = kinesis().await;
    let stream = unique_name("ktk-efo-read");
    create_stream(&client, &stream, 2).await;
    let consumer = register_consumer(&client, &stream, "ktk-efo-read").await.expect("register");
    let shards = shards(&client, &stream).await;
    assert_eq!(shards.len(), 2);
    for (n, shard) in shards.iter().enumerate() {
        put_mixed(&client, &stream, &shard.key, &format!("s{n}"), 0).await;
    }

    for (n, shard) in shards.iter().enumerate() {
        let mut reader = fan_out(&client, &consumer, shard, StartingPosition::TrimHorizon);
        assert_eq!(reader.shard_id(), shard.id);
        let records = read_n(&mut reader, 10).await;
        assert_eq!(indices(&records), (0..10).collect::<Vec<_>>(), "shard {n}: every record once, in order");
        assert!(records.iter().all(|r| r.data.starts_with(format!("s{n}|").as_bytes())));
        let aggregated: Vec<bool> = records.iter().map(|r| r.aggregated).collect();
        assert_eq!(aggregated, [false, true, true, true, true, false, true, true, true, false]);
        assert_eq!(records[1..5].iter().map(|r| r.sub_sequence_number).collect::<Vec<_>>(), [0, 1, 2, 3]);
        assert!(records.iter().all(|r| r.approximate_arrival.is_some()));
        assert!(!reader.ended());

        // Polling delivers exactly the same records.
        let polling = ShardReader::new(
            client.clone(),
            &stream,
            &shard.id,
            shard.range,
            StartingPosition::TrimHorizon,
            ReaderConfig::default().with_min_interval(Duration::from_millis(20)),
        );
        let polled = read_n(&mut Reader::from(polling), 10).await;
        assert_eq!(polled, records, "shard {n}: fan-out and polling agree");

        // From inside the first aggregate (after its second record, index 2): the rest of it, then
        // everything after it.
        let mut resumed = fan_out(&client, &consumer, shard, after(&records[2]));
        assert_eq!(indices(&read_n(&mut resumed, 7).await), (3..10).collect::<Vec<_>>(), "shard {n}");
        // From the last record of an aggregate (index 8): only the plain record after it.
        let mut resumed = fan_out(&client, &consumer, shard, after(&records[8]));
        assert_eq!(indices(&read_n(&mut resumed, 1).await), [9], "shard {n}");
        // From a plain record (index 5): the whole second aggregate.
        let mut resumed = fan_out(&client, &consumer, shard, after(&records[5]));
        assert_eq!(indices(&read_n(&mut resumed, 4).await), (6..10).collect::<Vec<_>>(), "shard {n}");
    }
    deregister_consumer(&client, &stream, "ktk-efo-read").await.expect("deregister");
    delete_stream(&client, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribes_again_without_losing_or_repeating_records() {
    let client = kinesis().await;
    let stream = unique_name("ktk-efo-renew");
    create_stream(&client, &stream, 1).await;
    let consumer = register_consumer(&client, &stream, "ktk-efo-renew").await.expect("register");
    let shard = shards(&client, &stream).await.remove(0);
    // Subscriptions renewed after a second instead of five minutes.
    let config = FanOutConfig::default()
        .with_max_subscription(Duration::from_secs(1))
        .with_min_subscribe_interval(Duration::from_millis(200));
    let reader = FanOutReader::new(
        client.clone(),
        &consumer.consumer_arn,
        &shard.id,
        shard.range,
        StartingPosition::TrimHorizon,
        config,
    );
    let mut reader = Reader::FanOut(reader);
    let subscriptions = |reader: &Reader| match reader {
        Reader::FanOut(reader) => reader.subscriptions(),
        Reader::Polling(_) => unreachable!(),
    };

    put_mixed(&client, &stream, &shard.key, "r", 0).await;
    let mut records = read_n(&mut reader, 10).await;
    assert_eq!(subscriptions(&reader), 1);

    // The subscription outlives its lifetime: the next read makes a new one, from the
    // continuation of the last event.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    put_mixed(&client, &stream, &shard.key, "r", 10).await;
    records.extend(read_n(&mut reader, 10).await);
    assert!(subscriptions(&reader) >= 2, "renewed: {} subscriptions", subscriptions(&reader));

    // A read given up half-way (a timeout, a shutdown) drops its subscription; the next read
    // subscribes again from the last event returned. LocalStack sends an empty event only every
    // 3 s, so this read is cut off while waiting.
    let cut = tokio::time::timeout(Duration::from_millis(300), reader.read()).await;
    assert!(cut.is_err(), "expected the idle read to be waiting still: {cut:?}");
    let before = subscriptions(&reader);
    put_mixed(&client, &stream, &shard.key, "r", 20).await;
    records.extend(read_n(&mut reader, 10).await);
    assert!(subscriptions(&reader) > before);

    assert_eq!(indices(&records), (0..30).collect::<Vec<_>>(), "every record once, in order");
    delete_stream(&client, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_ended_by_the_service_is_made_again_from_its_continuation() {
    let client = kinesis().await;
    let stream = unique_name("ktk-efo-end");
    create_stream(&client, &stream, 1).await;
    let consumer = register_consumer(&client, &stream, "ktk-efo-end").await.expect("register");
    let parent = shards(&client, &stream).await.remove(0);
    put_mixed(&client, &stream, &parent.key, "p", 0).await;
    client
        .split_shard()
        .stream_name(&stream)
        .shard_to_split(&parent.id)
        .new_starting_hash_key((u128::MAX / 2).to_string())
        .send()
        .await
        .expect("split");
    wait_stream_active(&client, &stream).await;

    let config = FanOutConfig::default().with_min_subscribe_interval(Duration::from_millis(200));
    let mut reader = FanOutReader::new(
        client.clone(),
        &consumer.consumer_arn,
        &parent.id,
        parent.range,
        StartingPosition::TrimHorizon,
        config,
    );
    let mut records = Vec::new();
    let mut children = None;
    // The parent's records, and then either the end of the shard with its children (Kinesis), or,
    // where the service ends the subscription after the last records without saying that the
    // shard ended (LocalStack 2026.3), a new subscription after the last record that repeats
    // nothing.
    for _ in 0..2 {
        let result =
            tokio::time::timeout(Duration::from_secs(15), reader.read()).await.expect("an event").expect("read");
        records.extend(result.records);
        if let Some(end) = result.shard_end {
            children = Some(end);
            break;
        }
    }
    assert_eq!(indices(&records), (0..10).collect::<Vec<_>>(), "every record of the parent once, in order");
    match children {
        Some(children) => assert_eq!(children.len(), 2, "{children:?}"),
        None => assert!(reader.subscriptions() >= 2, "subscribed again: {}", reader.subscriptions()),
    }
    delete_stream(&client, &stream).await;
}
