//! Writes a synthetic day of events into S3 exactly as the consumer's S3 sink does (the sink's own
//! `write_batch`: Parquet objects per batch and hour, under `<prefix>/events/dt=D/hour=HH/`): the
//! input of `bench/etl/run.sh`.
//!
//! `cargo run --release -p ktk-etl --example seed_day -- <bucket> <prefix> <YYYY-MM-DD> <events> [batch] [seed]`
//!
//! Batches of `batch` events (default 50,000) of 4 shards in turn, like a consumer that cuts a
//! batch per shard; AWS settings from the environment; the bucket must exist.

use ktk_etl::Day;
use ktk_etl::synthetic::day_of_events;
use ktk_pipeline::Batch;
use ktk_pipeline::s3::{S3Sink, S3SinkConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [bucket, prefix, day, events, rest @ ..] = args.as_slice() else {
        return Err("usage: seed_day <bucket> <prefix> <YYYY-MM-DD> <events> [batch] [seed]".into());
    };
    let day: Day = day.parse()?;
    let events: usize = events.parse()?;
    let batch_size: usize = rest.first().map(|b| b.parse()).transpose()?.unwrap_or(50_000).max(1);
    let seed: u64 = rest.get(1).map(|s| s.parse()).transpose()?.unwrap_or(7);
    let aws = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let sink = S3Sink::new(&aws, S3SinkConfig::new(bucket, prefix).with_path_style(true));
    let all = day_of_events(day, events, seed);
    let (mut objects, mut bytes) = (0, 0);
    for (index, chunk) in all.chunks(batch_size).enumerate() {
        let shard = format!("shardId-{:012}", index % 4);
        let mut records = chunk.to_vec();
        for record in &mut records {
            record.shard_id = shard.clone();
        }
        let batch = Batch {
            stream: "seed".into(),
            shard_id: shard,
            first: (records[0].sequence_number.clone(), 0),
            last: (records[records.len() - 1].sequence_number.clone(), 0),
            events: records,
            dead_letters: Vec::new(),
        };
        let written = sink.write_batch(&batch).await?;
        objects += written.objects.len();
        bytes += written.objects.iter().map(|o| o.bytes).sum::<u64>();
    }
    println!("seeded {events} events of {day} into s3://{bucket}/{prefix}: {objects} objects, {bytes} bytes");
    Ok(())
}
