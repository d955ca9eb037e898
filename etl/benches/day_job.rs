//! The embedded engine's share of a day's job: 100,000 events of a synthetic day, encoded as the
//! S3 sink's Parquet objects (one per hour), decoded and loaded into SQLite, then each shipped
//! job's query (and the decoding alone, to tell the two apart). S3 is left out here; `bench/etl/run.sh` measures whole runs over LocalStack.
//!
//! `cargo bench -p ktk-etl --bench day_job`

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ktk_etl::engine::Engine;
use ktk_etl::synthetic::day_of_events;
use ktk_etl::{Catalog, Day};
use ktk_pipeline::s3::{S3Sink, S3SinkConfig, decode_events_object};

const EVENTS: usize = 100_000;

fn objects(day: Day) -> Vec<(String, bytes::Bytes)> {
    let config = aws_sdk_s3::Config::builder().behavior_version(aws_sdk_s3::config::BehaviorVersion::latest()).build();
    let sink = S3Sink::with_client(aws_sdk_s3::Client::from_conf(config), S3SinkConfig::new("bench", "raw"));
    let events = day_of_events(day, EVENTS, 7);
    let batch = ktk_pipeline::Batch {
        stream: "bench".into(),
        shard_id: "shardId-000000000000".into(),
        first: (events[0].sequence_number.clone(), 0),
        last: (events[EVENTS - 1].sequence_number.clone(), 0),
        events,
        dead_letters: Vec::new(),
    };
    sink.objects(&batch).expect("encode").into_iter().map(|o| (o.key, o.body)).collect()
}

fn day_job(c: &mut Criterion) {
    let day: Day = "2026-03-01".parse().expect("day");
    let objects = objects(day);
    let catalog = Catalog::builtin().expect("jobs");
    let mut group = c.benchmark_group("day_job");
    group.sample_size(10);
    group.throughput(Throughput::Elements(EVENTS as u64));
    group.bench_function("decode_100k", |b| {
        b.iter(|| {
            objects
                .iter()
                .map(|(key, body)| decode_events_object("bench", key, body.clone()).expect("decode").len())
                .sum::<usize>()
        })
    });
    group.bench_function("decode_and_load_100k", |b| {
        b.iter(|| {
            let mut engine = Engine::open(ktk_etl::engine::DEFAULT_CACHE_MIB).expect("engine");
            for (key, body) in &objects {
                let records = decode_events_object("bench", key, body.clone()).expect("decode");
                let hour = key.split("hour=").nth(1).map(|h| &h[..2]).unwrap_or("00");
                engine.load(day, hour, &records).expect("load");
            }
            engine.finish_load().expect("commit")
        })
    });
    let mut engine = Engine::open(ktk_etl::engine::DEFAULT_CACHE_MIB).expect("engine");
    for (key, body) in &objects {
        let records = decode_events_object("bench", key, body.clone()).expect("decode");
        let hour = key.split("hour=").nth(1).map(|h| &h[..2]).unwrap_or("00");
        engine.load(day, hour, &records).expect("load");
    }
    engine.finish_load().expect("commit");
    for job in catalog.jobs.values() {
        let version = job.version(None).expect("latest");
        group.bench_function(format!("query_100k/{}", job.name), |b| {
            b.iter(|| engine.query(version, day, 10_000_000).expect("query").len())
        });
    }
    group.finish();
}

criterion_group!(benches, day_job);
criterion_main!(benches);
