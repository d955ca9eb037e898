//! A record processor for the consumer's tests: it records every record it is handed (with the
//! worker and shard) and checkpoints after each batch, so tests can check exactly-once delivery,
//! per-shard order and who processed what. The `ktk-test-worker` binary runs it in its own
//! process and prints the same facts as JSON lines.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ktk_consumer::lease::LeaseTable;
use ktk_producer::{Producer, ProducerConfig, Record};
use tokio::task::JoinHandle;

use ktk_consumer::{Checkpointer, InitializeInput, ProcessRecordsInput, ProcessorError, RecordProcessor, WorkerConfig};

/// One user record as a processor saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Processed {
    /// When, in the order of everything the journal saw (records and lifecycle events).
    pub tick: u64,
    pub worker: String,
    pub shard: String,
    pub sequence_number: String,
    pub sub_sequence_number: u64,
    pub data: bytes::Bytes,
}

/// Something a processor was told, other than records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lifecycle {
    Initialized { worker: String, shard: String, checkpoint: String, restarts: u32 },
    ShardEnded { worker: String, shard: String },
    ShutdownRequested { worker: String, shard: String },
    LeaseLost { worker: String, shard: String },
}

/// What every processor of a test wrote, shared.
#[derive(Debug, Clone, Default)]
pub struct Journal {
    pub records: Arc<Mutex<Vec<Processed>>>,
    /// Lifecycle events with their tick.
    pub events: Arc<Mutex<Vec<(u64, Lifecycle)>>>,
    clock: Arc<AtomicU64>,
    /// How many records and events [`Journal::print_new`] printed already.
    printed: Arc<Mutex<(usize, usize)>>,
}

impl Journal {
    pub fn records(&self) -> Vec<Processed> {
        self.records.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    pub fn events(&self) -> Vec<(u64, Lifecycle)> {
        self.events.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    pub fn record_count(&self) -> usize {
        self.records.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len()
    }

    /// Prints the records and lifecycle events not printed yet as JSON lines on stdout, flushed
    /// (what the `ktk-test-worker` process reports to its test).
    pub fn print_new(&self, worker: &str) {
        use std::io::Write as _;
        let mut printed = self.printed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let records = self.records();
        let events = self.events();
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        for record in &records[printed.0.min(records.len())..] {
            let line = serde_json::json!({
                "event": "record", "worker": worker, "shard": record.shard,
                "sequence_number": record.sequence_number, "sub_sequence_number": record.sub_sequence_number,
                "data": String::from_utf8_lossy(&record.data),
            });
            let _ = writeln!(out, "{line}");
        }
        for (_, event) in &events[printed.1.min(events.len())..] {
            let line = serde_json::json!({ "event": "lifecycle", "worker": worker, "what": format!("{event:?}") });
            let _ = writeln!(out, "{line}");
        }
        let _ = out.flush();
        *printed = (records.len(), events.len());
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst)
    }

    fn push(&self, event: Lifecycle) {
        let tick = self.tick();
        self.events.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push((tick, event));
    }
}

/// Records everything into a [`Journal`] and checkpoints after every batch.
#[derive(Debug)]
pub struct RecordingProcessor {
    pub worker: String,
    pub shard: String,
    pub journal: Journal,
    /// Fail this many batches (before recording them) to test processor retries.
    pub fail_batches: u32,
    /// Print each batch ([`Journal::print_new`]) before checkpointing it, so a process killed
    /// right after a checkpoint has reported everything it checkpointed.
    pub echo: bool,
}

impl RecordingProcessor {
    pub fn new(worker: &str, shard: &str, journal: Journal) -> Self {
        RecordingProcessor { worker: worker.to_owned(), shard: shard.to_owned(), journal, fail_batches: 0, echo: false }
    }
}

impl RecordProcessor for RecordingProcessor {
    async fn initialize(&mut self, input: &InitializeInput) -> Result<(), ProcessorError> {
        self.journal.push(Lifecycle::Initialized {
            worker: self.worker.clone(),
            shard: input.shard_id.clone(),
            checkpoint: input.checkpoint.to_string(),
            restarts: input.restarts,
        });
        Ok(())
    }

    async fn process_records(
        &mut self,
        input: ProcessRecordsInput,
        checkpointer: &Checkpointer,
    ) -> Result<(), ProcessorError> {
        if self.fail_batches > 0 {
            self.fail_batches -= 1;
            return Err("the test processor fails this batch on purpose".into());
        }
        {
            let mut records = self.journal.records.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            records.extend(input.records.iter().map(|r| Processed {
                tick: self.journal.tick(),
                worker: self.worker.clone(),
                shard: input.shard_id.clone(),
                sequence_number: r.sequence_number.clone(),
                sub_sequence_number: r.sub_sequence_number,
                data: r.data.clone(),
            }));
        }
        if self.echo {
            self.journal.print_new(&self.worker);
        }
        checkpointer.checkpoint().await?;
        Ok(())
    }

    async fn shard_ended(&mut self, checkpointer: &Checkpointer) -> Result<(), ProcessorError> {
        self.journal.push(Lifecycle::ShardEnded { worker: self.worker.clone(), shard: self.shard.clone() });
        checkpointer.checkpoint().await?;
        Ok(())
    }

    async fn shutdown_requested(&mut self, checkpointer: &Checkpointer) -> Result<(), ProcessorError> {
        self.journal.push(Lifecycle::ShutdownRequested { worker: self.worker.clone(), shard: self.shard.clone() });
        checkpointer.checkpoint().await?;
        Ok(())
    }

    async fn lease_lost(&mut self) {
        self.journal.push(Lifecycle::LeaseLost { worker: self.worker.clone(), shard: self.shard.clone() });
    }
}

/// Worker timings for tests: a 3 s failover, renewals every second, steals every 2 s, discovery
/// every 250 ms, shard sync every 2 s, short idle and parent waits.
pub fn fast_worker_config(stream: &str, table: &str, worker: &str) -> WorkerConfig {
    WorkerConfig::new(stream, table)
        .with_worker_id(worker)
        .with_failover_time(Duration::from_secs(3))
        .with_renew_interval(Duration::from_millis(1000))
        .with_taking_interval(Duration::from_secs(2))
        .with_discovery_interval(Duration::from_millis(250))
        .with_shard_sync_interval(Duration::from_secs(2))
        .with_parent_poll_interval(Duration::from_millis(500))
        .with_idle_time_between_reads(Duration::from_millis(300))
        .with_retry_backoff(Duration::from_millis(100), Duration::from_secs(2))
        .with_shutdown_timeout(Duration::from_secs(10))
}

/// The shards of unfinished leases per owner ("" for none, "handoff" while a hand-off is in
/// progress); empty while the table does not exist yet.
pub async fn lease_owners(table: &LeaseTable) -> BTreeMap<String, Vec<String>> {
    let mut owners: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let leases = match table.list().await {
        Ok(listing) => listing.leases,
        Err(ktk_consumer::Error::TableNotFound { .. }) => Vec::new(),
        Err(error) => panic!("list leases: {error}"),
    };
    for lease in leases.into_iter().filter(|l| !l.is_finished()) {
        let owner =
            if lease.checkpoint_owner.is_some() { "handoff".to_owned() } else { lease.owner.unwrap_or_default() };
        owners.entry(owner).or_default().push(lease.lease_key);
    }
    owners
}

/// Polls `check` every 100 ms until it holds, and says how long that took; panics after `timeout`
/// naming `what`.
pub async fn wait_for<F, Fut>(timeout: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if check().await {
            return started.elapsed();
        }
        assert!(started.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Puts `n` numbered records over about `over`, with 200 partition keys, through the producer.
pub fn steady_producer(stream: &str, n: usize, over: Duration) -> JoinHandle<()> {
    let stream = stream.to_owned();
    tokio::spawn(async move {
        let producer = Producer::new(
            ProducerConfig::new(&stream).with_request_timeout(Duration::from_secs(60)),
            &crate::aws_config().await,
        )
        .await
        .expect("producer");
        let started = Instant::now();
        let mut receipts = Vec::with_capacity(n);
        for i in 0..n {
            let due = over.mul_f64(i as f64 / n as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
            let key = format!("user-{:03}", i % 200);
            receipts
                .push(producer.put(Record::new(key.clone(), crate::numbered_data(&key, i, 60))).await.expect("put"));
        }
        for receipt in receipts {
            receipt.await.expect("record acknowledged");
        }
        producer.shutdown(Duration::from_secs(10)).await;
    })
}
