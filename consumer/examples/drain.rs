//! The read-ahead benchmark: one worker drains a backlog through a processor that takes a fixed
//! time per batch, with read-ahead off and on, over the same stream. `bench/consume/run.sh` runs it
//! against LocalStack; docs/consumer.md has its figures.
//!
//! ```text
//! drain [--records 100000] [--shards 4] [--record-bytes 100] [--aggregate 1] [--batch-ms 20]
//!       [--max-records 10000] [--runs 2] [--modes read,off,on] [--stream NAME]
//! ```
//!
//! It makes a stream of `--shards` shards and puts `--records` user records of `--record-bytes`
//! bytes (`PutRecords`, 500 a call, random partition keys), `--aggregate` of them in each Kinesis
//! record (KPL aggregates; 1: plain records). `--max-records` counts Kinesis records per
//! `GetRecords`, as Kinesis does. With `--stream`, a stream of that name
//! is used as it is if it exists (made and filled by an earlier run: LocalStack's Kinesis puts
//! records more slowly the more the stream holds, so 100,000 take minutes), and kept at the end.
//! Then, `--runs` times, for each mode:
//! - `read`: every shard read to its end with the polling reader alone (no lease, no processor):
//!   how fast `GetRecords` drains the backlog by itself;
//! - `off` / `on`: a worker with read-ahead off / on, on a lease table of its own, from
//!   `TRIM_HORIZON`, whose processor sleeps `--batch-ms` per batch and checkpoints after it.
//!
//! Each line gives the time from the start (the worker's: lease table, shard sync, leases taken)
//! to the last record processed, with the records per second over it, the drain time from the
//! end of the first batch to the end of the last, and how long a processor waited, on average,
//! between the end of a batch and the next batch of its shard (the read time that read-ahead
//! hides). The stream and the lease tables are deleted at the end.
//! Loopback only: it refuses an `AWS_ENDPOINT_URL` that is not on 127.0.0.1 or localhost.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, StreamStatus};
use ktk_consumer::retrieval::{ReaderConfig, ShardReader, StartingPosition, list_shards};
use ktk_consumer::{
    Checkpointer, InitializeInput, ProcessRecordsInput, ProcessorError, RecordProcessor, Worker, WorkerConfig,
};
use ktk_proto::aggregation::{Aggregator, UserRecord};
use tokio_util::sync::CancellationToken;

type Failure = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Clone)]
struct Options {
    records: usize,
    shards: i32,
    record_bytes: usize,
    aggregate: usize,
    batch_ms: u64,
    max_records: i32,
    runs: usize,
    modes: Vec<String>,
    stream: Option<String>,
}

fn options() -> Result<Options, Failure> {
    let mut options = Options {
        records: 100_000,
        shards: 4,
        record_bytes: 100,
        aggregate: 1,
        batch_ms: 20,
        max_records: 10_000,
        runs: 2,
        modes: vec!["read".into(), "off".into(), "on".into()],
        stream: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--records" => options.records = value.parse()?,
            "--shards" => options.shards = value.parse()?,
            "--record-bytes" => options.record_bytes = value.parse()?,
            "--aggregate" => options.aggregate = value.parse::<usize>()?.max(1),
            "--batch-ms" => options.batch_ms = value.parse()?,
            "--max-records" => options.max_records = value.parse()?,
            "--runs" => options.runs = value.parse()?,
            "--modes" => options.modes = value.split(',').map(str::to_owned).collect(),
            "--stream" => options.stream = Some(value),
            _ => return Err(format!("unknown flag {flag}").into()),
        }
    }
    if let Some(mode) = options.modes.iter().find(|m| !["read", "off", "on"].contains(&m.as_str())) {
        return Err(format!("unknown mode {mode}: read, off or on").into());
    }
    Ok(options)
}

/// One run of one mode.
#[derive(Debug, Clone, Copy)]
struct Measured {
    /// From the start to the last record.
    total: Duration,
    /// From the end of the first batch to the end of the last.
    drain: Duration,
    /// Batches (or reads, for the reader alone).
    batches: u64,
    /// The mean wait of a processor for its shard's next batch (none for the reader alone).
    wait: Option<Duration>,
}

/// What the processors of one run saw.
#[derive(Debug, Default)]
struct Progress {
    records: AtomicU64,
    batches: AtomicU64,
    /// When the first and the latest batch were done.
    first: Mutex<Option<Instant>>,
    last: Mutex<Option<Instant>>,
    /// Microseconds processors waited between the end of a batch and the next one of their shard.
    waited_micros: AtomicU64,
    /// Batches that followed another of their shard.
    waits: AtomicU64,
}

impl Progress {
    fn batch(&self, records: usize) {
        let now = Instant::now();
        self.first.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get_or_insert(now);
        *self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(now);
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.records.fetch_add(records as u64, Ordering::Relaxed);
    }

    fn waited(&self, wait: Duration) {
        self.waited_micros.fetch_add(u64::try_from(wait.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
        self.waits.fetch_add(1, Ordering::Relaxed);
    }

    /// The mean wait for the next batch of a shard.
    fn mean_wait(&self) -> Duration {
        let waits = self.waits.load(Ordering::Relaxed).max(1);
        Duration::from_micros(self.waited_micros.load(Ordering::Relaxed) / waits)
    }

    fn drain_time(&self) -> Duration {
        let first = *self.first.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let last = *self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match (first, last) {
            (Some(first), Some(last)) => last - first,
            _ => Duration::ZERO,
        }
    }
}

/// Sleeps `batch_time` per batch (the application's work), then checkpoints.
struct SlowProcessor {
    batch_time: Duration,
    progress: Arc<Progress>,
    /// When its previous batch was done.
    last_done: Option<Instant>,
}

impl RecordProcessor for SlowProcessor {
    async fn initialize(&mut self, _: &InitializeInput) -> Result<(), ProcessorError> {
        Ok(())
    }

    async fn process_records(
        &mut self,
        input: ProcessRecordsInput,
        checkpointer: &Checkpointer,
    ) -> Result<(), ProcessorError> {
        if let Some(done) = self.last_done {
            self.progress.waited(done.elapsed());
        }
        tokio::time::sleep(self.batch_time).await;
        checkpointer.checkpoint().await?;
        self.progress.batch(input.records.len());
        self.last_done = Some(Instant::now());
        Ok(())
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Failure> {
    let options = options()?;
    let endpoint = std::env::var("AWS_ENDPOINT_URL").unwrap_or_default();
    if !(endpoint.starts_with("http://127.0.0.1") || endpoint.starts_with("http://localhost")) {
        return Err(format!(
            "AWS_ENDPOINT_URL={endpoint:?}: this benchmark runs against a LocalStack on loopback only"
        )
        .into());
    }
    let aws = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let kinesis = aws_sdk_kinesis::Client::new(&aws);
    let dynamodb = aws_sdk_dynamodb::Client::new(&aws);
    let id = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis();
    let stream = options.stream.clone().unwrap_or_else(|| format!("ktk-bench-drain-{id}"));
    println!("{options:?}");
    let exists = kinesis.describe_stream_summary().stream_name(&stream).send().await.is_ok();
    if exists && options.stream.is_some() {
        println!("stream {stream}: reused as it is");
    } else {
        println!("stream {stream}: {} shards", options.shards);
        kinesis.create_stream().stream_name(&stream).shard_count(options.shards).send().await?;
        wait_active(&kinesis, &stream).await?;
        let started = Instant::now();
        let put = seed(&kinesis, &stream, &options).await?;
        println!(
            "put {} user records in {put} Kinesis records in {:.1} s",
            options.records,
            started.elapsed().as_secs_f64()
        );
    }

    let mut results: BTreeMap<String, Vec<Measured>> = BTreeMap::new();
    let mut tables = Vec::new();
    for run in 1..=options.runs {
        for mode in &options.modes {
            let measured = match mode.as_str() {
                "read" => read_only(&kinesis, &stream, &options).await?,
                _ => {
                    let table = format!("{stream}-{id}-{run}-{mode}");
                    tables.push(table.clone());
                    worker_drain(&aws, &stream, &table, mode == "on", &options).await?
                }
            };
            let Measured { total, drain, batches, wait } = measured;
            let rate = options.records as f64 / total.as_secs_f64();
            let wait_text =
                wait.map(|w| format!(", waits {} ms a batch for the next", w.as_millis())).unwrap_or_default();
            println!(
                "run {run} {mode:>4}: total {:6.2} s, drain {:6.2} s, {rate:8.0} records/s, {batches} batches{wait_text}",
                total.as_secs_f64(),
                drain.as_secs_f64()
            );
            results.entry(mode.clone()).or_default().push(measured);
        }
    }
    println!();
    println!(
        "| mode | runs | total s (each run) | median total s | records/s (median total) | mean wait for the next batch, ms |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    for mode in &options.modes {
        let Some(runs) = results.get(mode) else { continue };
        let totals: Vec<String> = runs.iter().map(|r| format!("{:.2}", r.total.as_secs_f64())).collect();
        let mut sorted: Vec<f64> = runs.iter().map(|r| r.total.as_secs_f64()).collect();
        sorted.sort_by(f64::total_cmp);
        let median = match sorted.len() {
            0 => 0.0,
            n if n % 2 == 1 => sorted[n / 2],
            n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
        };
        let rate = options.records as f64 / median;
        let waits: Vec<Duration> = runs.iter().filter_map(|r| r.wait).collect();
        let wait = if waits.is_empty() {
            "-".to_owned()
        } else {
            format!("{}", (waits.iter().sum::<Duration>() / waits.len() as u32).as_millis())
        };
        println!("| {mode} | {} | {} | {median:.2} | {rate:.0} | {wait} |", runs.len(), totals.join(", "));
    }
    for table in tables {
        let _ = dynamodb.delete_table().table_name(table).send().await;
    }
    if options.stream.is_none() {
        kinesis.delete_stream().stream_name(&stream).enforce_consumer_deletion(true).send().await?;
    }
    Ok(())
}

async fn wait_active(kinesis: &aws_sdk_kinesis::Client, stream: &str) -> Result<(), Failure> {
    for _ in 0..300 {
        let summary = kinesis.describe_stream_summary().stream_name(stream).send().await?;
        if summary.stream_description_summary().map(|s| s.stream_status()) == Some(&StreamStatus::Active) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("stream {stream} did not become active").into())
}

/// Puts the user records, `--aggregate` to a Kinesis record, 500 Kinesis records a call, four calls
/// at a time, resending what a call refused. Returns how many Kinesis records it put.
async fn seed(kinesis: &aws_sdk_kinesis::Client, stream: &str, options: &Options) -> Result<usize, Failure> {
    let mut entries = Vec::new();
    let mut aggregator = Aggregator::default();
    for i in 0..options.records {
        let mut data = format!("record {i:09} ").into_bytes();
        data.resize(options.record_bytes.max(data.len()), b'.');
        let record = UserRecord::new(format!("key-{:016x}", fastrand::u64(..)), data)?;
        if let Some(full) = aggregator.add(record).map_err(|e| format!("{e:?}"))? {
            return Err(
                format!("an aggregate filled up at {} user records; make them smaller", full.user_records).into()
            );
        }
        if (i + 1) % options.aggregate == 0
            && let Some(done) = aggregator.finish()
        {
            entries.push(done);
        }
    }
    entries.extend(aggregator.finish());
    let put = entries.len();
    let entries: Vec<PutRecordsRequestEntry> = entries
        .into_iter()
        .map(|record| {
            PutRecordsRequestEntry::builder()
                .partition_key(record.partition_key)
                .set_explicit_hash_key(record.explicit_hash_key)
                .data(Blob::new(record.data.to_vec()))
                .build()
                .map_err(|e| e.to_string())
        })
        .collect::<Result<_, _>>()?;
    let chunks: Vec<Vec<PutRecordsRequestEntry>> = entries.chunks(500).map(<[_]>::to_vec).collect();
    let mut puts = tokio::task::JoinSet::new();
    for group in chunks.chunks(chunks.len().div_ceil(4).max(1)) {
        let (kinesis, stream, group) = (kinesis.clone(), stream.to_owned(), group.to_vec());
        puts.spawn(async move {
            for mut chunk in group {
                while !chunk.is_empty() {
                    let output =
                        kinesis.put_records().stream_name(&stream).set_records(Some(chunk.clone())).send().await?;
                    chunk = chunk
                        .into_iter()
                        .zip(output.records())
                        .filter(|(_, result)| result.error_code().is_some())
                        .map(|(entry, _)| entry)
                        .collect();
                    if !chunk.is_empty() {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
            Ok::<(), Failure>(())
        });
    }
    while let Some(done) = puts.join_next().await {
        done??;
    }
    Ok(put)
}

/// Every shard read to its end by the polling reader, in parallel, with nothing else.
async fn read_only(kinesis: &aws_sdk_kinesis::Client, stream: &str, options: &Options) -> Result<Measured, Failure> {
    let started = Instant::now();
    let shards = list_shards(kinesis, stream).await?;
    let mut readers = tokio::task::JoinSet::new();
    let wanted = options.records;
    let read = Arc::new(AtomicU64::new(0));
    for shard in shards {
        let mut reader = ShardReader::new(
            kinesis.clone(),
            stream,
            shard.shard_id.clone(),
            shard.range,
            StartingPosition::TrimHorizon,
            ReaderConfig::default().with_max_records(options.max_records),
        );
        let read = Arc::clone(&read);
        readers.spawn(async move {
            let mut calls = 0u64;
            loop {
                let result = reader.read().await;
                calls += 1;
                match result {
                    Ok(result) => {
                        read.fetch_add(result.records.len() as u64, Ordering::Relaxed);
                        // An open shard is drained when a read comes back empty and caught up.
                        if result.records.is_empty() && result.millis_behind_latest.is_none_or(|ms| ms == 0) {
                            return Ok::<u64, Failure>(calls);
                        }
                    }
                    Err(error) if error.is_retryable() => tokio::time::sleep(Duration::from_millis(200)).await,
                    Err(error) => return Err(error.into()),
                }
            }
        });
    }
    let mut calls = 0;
    while let Some(done) = readers.join_next().await {
        calls += done??;
    }
    let took = started.elapsed();
    let read = read.load(Ordering::Relaxed) as usize;
    if read != wanted {
        return Err(format!("read {read} records, expected {wanted}").into());
    }
    Ok(Measured { total: took, drain: took, batches: calls, wait: None })
}

/// One worker drains the stream from `TRIM_HORIZON` on lease table `table`.
async fn worker_drain(
    aws: &aws_config::SdkConfig,
    stream: &str,
    table: &str,
    read_ahead: bool,
    options: &Options,
) -> Result<Measured, Failure> {
    let progress = Arc::new(Progress::default());
    let factory = {
        let (progress, batch_time) = (Arc::clone(&progress), Duration::from_millis(options.batch_ms));
        move |_: &str| SlowProcessor { batch_time, progress: Arc::clone(&progress), last_done: None }
    };
    let config = WorkerConfig::new(stream, table)
        .with_max_records(options.max_records)
        .with_read_ahead(read_ahead)
        .with_idle_time_between_reads(Duration::from_millis(200));
    let worker = Worker::new(config, aws, factory)?;
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let running = tokio::spawn(worker.run(shutdown.clone()));
    let wanted = options.records as u64;
    while progress.records.load(Ordering::Relaxed) < wanted {
        if started.elapsed() > Duration::from_secs(900) || running.is_finished() {
            return Err(format!(
                "processed {} of {wanted} records; giving up",
                progress.records.load(Ordering::Relaxed)
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let total = started.elapsed();
    shutdown.cancel();
    running.await??;
    let processed = progress.records.load(Ordering::Relaxed);
    if processed != wanted {
        return Err(format!("processed {processed} records, expected {wanted}").into());
    }
    Ok(Measured {
        total,
        drain: progress.drain_time(),
        batches: progress.batches.load(Ordering::Relaxed),
        wait: Some(progress.mean_wait()),
    })
}
