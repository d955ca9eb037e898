//! Reading shards with `ShardReader` against LocalStack: order, deaggregation, exact resumption
//! inside an aggregate, LATEST, and the end of a split shard.

use std::time::Duration;

use aws_sdk_kinesis::primitives::Blob;
use ktk_consumer::retrieval::{ConsumerRecord, ReaderConfig, ShardReader, StartingPosition};
use ktk_proto::aggregation::{Aggregator, UserRecord};
use ktk_proto::keys::HashKeyRange;
use ktk_tests::{create_stream, delete_stream, kinesis, unique_name, wait_stream_active};

/// Puts `records` as one KPL aggregate (each `<prefix>-<i>`) on the stream.
async fn put_aggregate(client: &aws_sdk_kinesis::Client, stream: &str, prefix: &str, records: usize) {
    let mut aggregator = Aggregator::default();
    for i in 0..records {
        aggregator.try_add(UserRecord::new(format!("k{i}"), format!("{prefix}-{i}")).expect("valid")).expect("fits");
    }
    let record = aggregator.finish().expect("aggregate");
    client
        .put_record()
        .stream_name(stream)
        .partition_key(record.partition_key)
        .set_explicit_hash_key(record.explicit_hash_key)
        .data(Blob::new(record.data.to_vec()))
        .send()
        .await
        .expect("put aggregate");
}

async fn put_plain(client: &aws_sdk_kinesis::Client, stream: &str, data: &str) {
    client
        .put_record()
        .stream_name(stream)
        .partition_key("p")
        .data(Blob::new(data.as_bytes()))
        .send()
        .await
        .expect("put");
}

fn fast() -> ReaderConfig {
    ReaderConfig::default().with_min_interval(Duration::from_millis(20))
}

/// Reads until `n` records came back or 20 reads in a row were empty.
async fn read_n(reader: &mut ShardReader, n: usize) -> Vec<ConsumerRecord> {
    let mut out = Vec::new();
    let mut empty = 0;
    while out.len() < n && empty < 20 && !reader.ended() {
        let result = reader.read().await.expect("read");
        if result.records.is_empty() {
            empty += 1;
        }
        out.extend(result.records);
    }
    out
}

fn data(records: &[ConsumerRecord]) -> Vec<String> {
    records.iter().map(|r| String::from_utf8_lossy(&r.data).into_owned()).collect()
}

async fn only_shard(client: &aws_sdk_kinesis::Client, stream: &str) -> String {
    let shards = client.list_shards().stream_name(stream).send().await.expect("list");
    shards.shards()[0].shard_id().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_in_order_and_resumes_exactly_inside_an_aggregate() {
    let client = kinesis().await;
    let stream = unique_name("ktk-read");
    create_stream(&client, &stream, 1).await;
    let shard = only_shard(&client, &stream).await;
    put_plain(&client, &stream, "first").await;
    put_aggregate(&client, &stream, "agg", 5).await;
    put_plain(&client, &stream, "last").await;

    let mut reader =
        ShardReader::new(client.clone(), &stream, &shard, HashKeyRange::FULL, StartingPosition::TrimHorizon, fast());
    let all = read_n(&mut reader, 7).await;
    assert_eq!(data(&all), ["first", "agg-0", "agg-1", "agg-2", "agg-3", "agg-4", "last"]);
    assert!(all[1..6].iter().all(|r| r.aggregated) && !all[0].aggregated);
    assert_eq!(all[1..6].iter().map(|r| r.sub_sequence_number).collect::<Vec<_>>(), [0, 1, 2, 3, 4]);
    assert!(all.iter().all(|r| r.approximate_arrival.is_some()));

    // Resume after the third sub-record of the aggregate: the rest of it, then what follows.
    let checkpoint = StartingPosition::After {
        sequence_number: all[3].sequence_number.clone(),
        sub_sequence_number: all[3].sub_sequence_number,
    };
    let mut resumed = ShardReader::new(client.clone(), &stream, &shard, HashKeyRange::FULL, checkpoint, fast());
    assert_eq!(data(&read_n(&mut resumed, 3).await), ["agg-3", "agg-4", "last"]);

    // Resume after a plain record.
    let after_first =
        StartingPosition::After { sequence_number: all[0].sequence_number.clone(), sub_sequence_number: 0 };
    let mut resumed = ShardReader::new(client.clone(), &stream, &shard, HashKeyRange::FULL, after_first, fast());
    assert_eq!(data(&read_n(&mut resumed, 6).await)[0], "agg-0");

    // LATEST sees only what comes after it started.
    let mut latest =
        ShardReader::new(client.clone(), &stream, &shard, HashKeyRange::FULL, StartingPosition::Latest, fast());
    let before = latest.read().await.expect("read");
    assert!(before.records.is_empty());
    put_plain(&client, &stream, "new").await;
    assert_eq!(data(&read_n(&mut latest, 1).await), ["new"]);
    delete_stream(&client, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_parent_is_read_to_its_end_and_names_its_children() {
    let client = kinesis().await;
    let stream = unique_name("ktk-read-split");
    create_stream(&client, &stream, 1).await;
    let shard = only_shard(&client, &stream).await;
    for i in 0..3 {
        put_plain(&client, &stream, &format!("before-{i}")).await;
    }
    client
        .split_shard()
        .stream_name(&stream)
        .shard_to_split(&shard)
        .new_starting_hash_key((u128::MAX / 2).to_string())
        .send()
        .await
        .expect("split");
    wait_stream_active(&client, &stream).await;
    let mut reader =
        ShardReader::new(client.clone(), &stream, &shard, HashKeyRange::FULL, StartingPosition::TrimHorizon, fast());
    let mut records = Vec::new();
    let mut children = None;
    for _ in 0..50 {
        let result = reader.read().await.expect("read");
        records.extend(result.records);
        if let Some(end) = result.shard_end {
            children = Some(end);
            break;
        }
    }
    assert_eq!(data(&records), ["before-0", "before-1", "before-2"]);
    let children = children.expect("the closed parent ends");
    assert_eq!(children.len(), 2, "{children:?}");
    assert!(reader.ended());
    delete_stream(&client, &stream).await;
}
