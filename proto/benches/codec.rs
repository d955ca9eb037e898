//! Throughput of the aggregation codec against the one cost no implementation avoids: MD5 over
//! every aggregate. Run with `cargo bench -p ktk-proto --bench codec`.
//!
//! Every benchmark processes one full aggregate (the KPL's default cap, 51,200 bytes) and reports
//! throughput in aggregate bytes per second, so `encode MB/s / md5 MB/s` is directly the share of
//! the MD5 reference the codec reaches. Records per second = aggregates per second x records per
//! aggregate; the bench prints the records per aggregate at start.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use ktk_proto::aggregation::{Aggregator, Deaggregator, KinesisRecord, UserRecord};
use md5::{Digest, Md5};

/// User records of `size` data bytes, each with its own 36-character partition key (a user id):
/// the worst case for the key table, and the common one when partitioning by user.
fn records_for_one_aggregate(size: usize) -> (Vec<UserRecord>, KinesisRecord) {
    let mut aggregator = Aggregator::default();
    let mut records = Vec::new();
    for i in 0u64.. {
        let key = format!("{:08x}-{:04x}-4000-8000-{:012x}", i * 2_654_435_761 % (1 << 32), i % 65_536, i);
        let data: Vec<u8> = (0..size).map(|j| (i as usize + j) as u8).collect();
        let record = UserRecord::new(key, data).expect("valid key");
        if aggregator.size_with(&record) > aggregator.config().max_aggregate_size() {
            break;
        }
        records.push(record.clone());
        aggregator.try_add(record).expect("fits");
    }
    let aggregate = aggregator.finish().expect("aggregate");
    (records, aggregate)
}

fn codec(c: &mut Criterion) {
    for (label, size) in [("100B", 100), ("1KiB", 1024)] {
        let (records, aggregate) = records_for_one_aggregate(size);
        eprintln!("{label}: {} records per aggregate, aggregate {} bytes", records.len(), aggregate.data.len());
        let mut group = c.benchmark_group(format!("aggregate_{label}"));
        group.throughput(Throughput::BytesDecimal(aggregate.data.len() as u64));

        group.bench_function("md5_reference", |b| b.iter(|| Md5::digest(black_box(&aggregate.data[..]))));

        let mut aggregator = Aggregator::default();
        group.bench_function("encode", |b| {
            b.iter_batched(
                || records.clone(),
                |records| {
                    for record in records {
                        let _ = aggregator.try_add(record);
                    }
                    aggregator.finish()
                },
                BatchSize::SmallInput,
            )
        });

        let deaggregator = Deaggregator::new();
        let mut out = Vec::with_capacity(records.len());
        let mut out_of_range = Vec::new();
        let data: Bytes = aggregate.data.clone();
        group.bench_function("decode", |b| {
            b.iter(|| {
                out.clear();
                let format = deaggregator.deaggregate_into(data.clone(), "a", None, &mut out, &mut out_of_range);
                black_box(format);
                black_box(out.len())
            })
        });
        group.finish();
    }
}

criterion_group!(benches, codec);
criterion_main!(benches);
