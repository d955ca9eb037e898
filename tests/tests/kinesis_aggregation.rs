//! Aggregated records made by the codec go through a real Kinesis API (LocalStack) and come back
//! intact: every user record exactly once, each on the shard its hash key belongs to.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, ShardIteratorType};
use bytes::Bytes;
use ktk_proto::aggregation::{Aggregator, Deaggregator, KinesisRecord, RecordFormat, UserRecord};
use ktk_proto::keys::HashKeyRange;
use ktk_tests::{create_stream, delete_stream, kinesis, unique_name};

const SHARDS: i32 = 4;
const USER_RECORDS: usize = 3_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregated_records_round_trip_through_kinesis() {
    let client = kinesis().await;
    let stream = unique_name("ktk-agg");
    create_stream(&client, &stream, SHARDS).await;
    let result = tokio::time::timeout(Duration::from_secs(240), round_trip(&client, &stream)).await;
    delete_stream(&client, &stream).await;
    result.expect("round trip finished within 4 minutes");
}

async fn round_trip(client: &aws_sdk_kinesis::Client, stream: &str) {
    // The shard map, as a producer would learn it.
    let shards = client.list_shards().stream_name(stream).send().await.expect("list shards");
    let shards: Vec<(String, HashKeyRange)> = shards
        .shards()
        .iter()
        .map(|s| {
            let range = s.hash_key_range().expect("hash key range");
            let range = HashKeyRange::parse(range.starting_hash_key(), range.ending_hash_key()).expect("decimal range");
            (s.shard_id().to_owned(), range)
        })
        .collect();
    assert_eq!(shards.len(), SHARDS as usize);

    // User records: varied keys and sizes, a few routed by explicit hash keys, each with a unique id.
    let mut expected: HashMap<String, (String, Option<String>)> = HashMap::new();
    let mut user_records = Vec::new();
    for i in 0..USER_RECORDS {
        let id = format!("event-{i:05}");
        let partition_key = format!("user-{}", i % 257);
        let mut data = id.clone().into_bytes();
        data.resize(40 + (i * 37) % 400, b'.');
        let mut record = UserRecord::new(partition_key.clone(), data).expect("valid key");
        let mut ehk = None;
        if i % 100 == 7 {
            let key = (u128::MAX / 1000 * (i as u128 % 1000)).to_string();
            record = record.with_explicit_hash_key(key.clone()).expect("valid hash key");
            ehk = Some(key);
        }
        expected.insert(id, (partition_key, ehk));
        user_records.push(record);
    }

    // Aggregate per predicted shard, as the KPL does.
    let mut aggregators: Vec<Aggregator> = shards.iter().map(|_| Aggregator::default()).collect();
    let mut kinesis_records: Vec<KinesisRecord> = Vec::new();
    for record in user_records {
        let hash = record.hash_key();
        let shard = shards.iter().position(|(_, r)| r.contains(hash)).expect("shards cover the key space");
        if let Some(done) = aggregators[shard].add(record).expect("record fits") {
            kinesis_records.push(done);
        }
    }
    kinesis_records.extend(aggregators.iter_mut().filter_map(Aggregator::finish));
    // And one plain record put by someone else, not aggregated at all.
    kinesis_records.push(KinesisRecord {
        partition_key: "plain-writer".into(),
        explicit_hash_key: None,
        data: Bytes::from_static(b"not an aggregate"),
        user_records: 1,
    });
    assert!(kinesis_records.iter().filter(|r| r.is_aggregated()).count() >= SHARDS as usize);

    // PutRecords: at most 500 entries a call; failed entries are resent by index.
    for chunk in kinesis_records.chunks(500) {
        let mut pending: Vec<&KinesisRecord> = chunk.iter().collect();
        for attempt in 0.. {
            assert!(attempt < 10, "PutRecords kept failing entries");
            let entries: Vec<PutRecordsRequestEntry> = pending
                .iter()
                .map(|r| {
                    PutRecordsRequestEntry::builder()
                        .partition_key(&r.partition_key)
                        .set_explicit_hash_key(r.explicit_hash_key.clone())
                        .data(Blob::new(r.data.to_vec()))
                        .build()
                        .expect("entry")
                })
                .collect();
            let out =
                client.put_records().stream_name(stream).set_records(Some(entries)).send().await.expect("put records");
            let failed: Vec<&KinesisRecord> =
                out.records().iter().zip(&pending).filter(|(e, _)| e.error_code().is_some()).map(|(_, r)| *r).collect();
            if failed.is_empty() {
                break;
            }
            pending = failed;
            tokio::time::sleep(Duration::from_millis(100 << attempt.min(4))).await;
        }
    }

    // Read every shard from the start and deaggregate with the shard's range: every sub-record
    // must be in range (the aggregates were routed by the first record's hash key).
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut plain = 0;
    for (shard_id, range) in &shards {
        let deaggregator = Deaggregator::new().with_shard_range(*range);
        let mut iterator = client
            .get_shard_iterator()
            .stream_name(stream)
            .shard_id(shard_id)
            .shard_iterator_type(ShardIteratorType::TrimHorizon)
            .send()
            .await
            .expect("shard iterator")
            .shard_iterator
            .expect("iterator");
        let mut empty_reads = 0;
        while empty_reads < 3 {
            let out = client.get_records().shard_iterator(&iterator).limit(10_000).send().await.expect("get records");
            if out.records().is_empty() {
                empty_reads += 1;
            }
            for record in out.records() {
                let data = Bytes::copy_from_slice(record.data().as_ref());
                let result = deaggregator.deaggregate(data, record.partition_key().unwrap_or_default(), None);
                assert!(result.out_of_range.is_empty(), "sub-records outside shard {shard_id}");
                match result.format {
                    RecordFormat::Aggregated => {
                        for user in &result.records {
                            let id = String::from_utf8_lossy(&user.data).trim_end_matches('.').to_owned();
                            let (pk, ehk) = expected.get(&id).unwrap_or_else(|| panic!("unexpected record {id}"));
                            assert_eq!(&*user.partition_key, pk.as_str());
                            assert_eq!(user.explicit_hash_key.as_deref(), ehk.as_deref());
                            *seen.entry(id).or_default() += 1;
                        }
                    }
                    RecordFormat::Plain => {
                        // A lone user record (plain) or the foreign plain record.
                        let user = &result.records[0];
                        if &user.data[..] == b"not an aggregate" {
                            plain += 1;
                        } else {
                            let id = String::from_utf8_lossy(&user.data).trim_end_matches('.').to_owned();
                            assert!(expected.contains_key(&id), "unexpected plain record {id}");
                            *seen.entry(id).or_default() += 1;
                        }
                    }
                    other => panic!("record on {shard_id} decoded as {other:?}"),
                }
            }
            iterator = out.next_shard_iterator.expect("open shard has a next iterator");
        }
    }
    assert_eq!(plain, 1, "the foreign plain record arrives once");
    assert_eq!(seen.len(), USER_RECORDS, "every user record arrives");
    let duplicates: Vec<_> = seen.iter().filter(|(_, n)| **n != 1).collect();
    assert!(duplicates.is_empty(), "records seen more than once: {duplicates:?}");
}
