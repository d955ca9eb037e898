//! The producer's own cost, with the network replaced by a sink that accepts everything at once
//! (`NoopKinesis`), on one core (a current-thread runtime). Run with
//! `cargo bench -p ktk-producer --bench producer`.
//!
//! Three figures for the same 20,000 user records of 100 bytes, 1,000 partition keys, 4 shards:
//! - `codec_only`: the KPL codec packing the records (`Aggregator`), nothing else;
//! - `codec_and_routing`: plus what any KPL-style producer must do per record: hash the partition
//!   key (MD5) and pick the shard's aggregator;
//! - `producer`: `Producer::put` for every record and a `flush`: validation, outstanding limits,
//!   the channel to the engine, aggregation per shard, `PutRecords` batching, rate limiting,
//!   per-record receipts resolved;
//! - `producer_put_batch`: the same through `Producer::put_batch`, 100 records a batch;
//! - `floor`: the least any producer that answers per record must add to the codec, in one loop
//!   with no engine, no channel, no limits, no retries: validate each record's keys, look its
//!   partition key's hash up in a cache (every key is cached), aggregate it by reference and keep
//!   it (to hand it back if the put fails), and give each record a result (its Kinesis record's
//!   shard and sequence number, shared, and its sub-sequence number). It is the yardstick for
//!   the producer's own overhead: what the producer costs above it is what its engine costs.

use std::hint::black_box;
use std::sync::Arc;

use std::collections::HashMap;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use ktk_producer::api::{NoopKinesis, even_shards};
use ktk_producer::{Producer, ProducerConfig, Record};
use ktk_proto::aggregation::{Aggregator, UserRecord};
use ktk_proto::keys::partition_key_hash;

const RECORDS: usize = 20_000;
const KEYS: usize = 1_000;
const SHARDS: usize = 4;

fn records() -> Vec<Record> {
    (0..RECORDS)
        .map(|i| {
            let mut data = format!("event-{i:08}").into_bytes();
            data.resize(100, b'.');
            Record::new(format!("user-{:06}", i % KEYS), data)
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let input = records();
    let users: Vec<UserRecord> =
        input.iter().map(|r| UserRecord::new(r.partition_key.clone(), r.data.clone()).expect("valid")).collect();
    let mut group = c.benchmark_group("producer_100B");
    group.throughput(Throughput::Elements(RECORDS as u64));
    group.sample_size(20);

    group.bench_function("codec_only", |b| {
        b.iter_batched(
            || users.clone(),
            |users| {
                let mut aggregator = Aggregator::default();
                let mut out = 0usize;
                for user in users {
                    if let Some(done) = aggregator.add(user).expect("fits") {
                        out += done.data.len();
                    }
                }
                black_box((out, aggregator.finish()))
            },
            BatchSize::LargeInput,
        )
    });

    let shards = even_shards(SHARDS);
    group.bench_function("codec_and_routing", |b| {
        b.iter_batched(
            || users.clone(),
            |users| {
                let mut aggregators: Vec<Aggregator> = (0..SHARDS).map(|_| Aggregator::default()).collect();
                let mut out = 0usize;
                for user in users {
                    let hash = partition_key_hash(user.partition_key());
                    let shard = shards.iter().position(|s| s.range.contains(hash)).unwrap_or(0);
                    if let Some(done) = aggregators[shard].add(user).expect("fits") {
                        out += done.data.len();
                    }
                }
                black_box((out, aggregators.iter_mut().filter_map(Aggregator::finish).count()))
            },
            BatchSize::LargeInput,
        )
    });

    // Every partition key's hash, as a warm cache holds them.
    let cache: HashMap<String, u128, foldhash::fast::FixedState> =
        input.iter().map(|r| (r.partition_key.clone(), partition_key_hash(&r.partition_key))).collect();
    group.bench_function("floor", |b| {
        b.iter_batched(
            || input.clone(),
            |records| {
                let mut aggregators: Vec<Aggregator> = (0..SHARDS).map(|_| Aggregator::default()).collect();
                let mut members: Vec<Vec<UserRecord>> = (0..SHARDS).map(|_| Vec::new()).collect();
                let mut results: Vec<(Arc<str>, u64)> = Vec::with_capacity(RECORDS);
                let mut answer = |record: ktk_proto::aggregation::KinesisRecord, members: &mut Vec<UserRecord>| {
                    let landing: Arc<str> = Arc::from(format!("{}", record.data.len()));
                    for (index, member) in members.drain(..).enumerate() {
                        results.push((Arc::clone(&landing), index as u64));
                        drop(member);
                    }
                };
                for record in records {
                    let Record { partition_key, explicit_hash_key, data } = record;
                    let user = UserRecord::from_parts(partition_key, explicit_hash_key, data).expect("valid");
                    let hash = cache.get(user.partition_key()).copied().unwrap_or_default();
                    let shard = shards.iter().position(|s| s.range.contains(hash)).unwrap_or(0);
                    if aggregators[shard].try_add_ref(&user).is_err() {
                        let done = aggregators[shard].finish().expect("full, so not empty");
                        answer(done, &mut members[shard]);
                        aggregators[shard].try_add_ref(&user).expect("fits an empty aggregate");
                    }
                    members[shard].push(user);
                }
                for (aggregator, members) in aggregators.iter_mut().zip(&mut members) {
                    if let Some(done) = aggregator.finish() {
                        answer(done, members);
                    }
                }
                assert_eq!(results.len(), RECORDS);
                black_box(results)
            },
            BatchSize::LargeInput,
        )
    });

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let producer = runtime.block_on(async {
        // Rate limits off the table (the sink does not throttle), defaults otherwise.
        let config = ProducerConfig::new("bench").with_rate_limit_percent(1_000_000);
        Producer::with_api(config, Arc::new(NoopKinesis::new(SHARDS))).await.expect("producer")
    });
    group.bench_function("producer", |b| {
        b.iter_batched(
            || input.clone(),
            |records| {
                runtime.block_on(async {
                    let mut receipts = Vec::with_capacity(RECORDS);
                    for record in records {
                        receipts.push(producer.put(record).await.expect("accepted"));
                    }
                    producer.flush().await;
                    let mut put = 0;
                    for receipt in receipts {
                        put += usize::from(receipt.await.is_ok());
                    }
                    assert_eq!(put, RECORDS);
                })
            },
            BatchSize::LargeInput,
        )
    });
    group.bench_function("producer_put_batch", |b| {
        b.iter_batched(
            || input.clone(),
            |records| {
                runtime.block_on(async {
                    // Batches of 100, as the collector puts a request's events.
                    let mut receipts = Vec::with_capacity(RECORDS / 100);
                    let mut records = records.into_iter();
                    loop {
                        let batch: Vec<Record> = records.by_ref().take(100).collect();
                        if batch.is_empty() {
                            break;
                        }
                        receipts.push(producer.put_batch(batch).await);
                    }
                    producer.flush().await;
                    let mut put = 0;
                    for receipt in receipts {
                        put += receipt.await.iter().filter(|r| r.is_ok()).count();
                    }
                    assert_eq!(put, RECORDS);
                })
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
