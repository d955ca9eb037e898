//! In-process fakes of what the worker talks to: a Kinesis stream ([`FakeKinesis`]: shards with
//! records, parents and children) and the lease table's items
//! ([`MemoryItems`](crate::lease::memory::MemoryItems)), plus a recording processor.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{Record, ShardIteratorType};
use futures::future::BoxFuture;
use ktk_proto::keys::HashKeyRange;
use tokio::time::{Duration, Instant};

use crate::error::Result;
use crate::lease::ExtendedSequenceNumber;
use crate::processor::{Checkpointer, InitializeInput, ProcessRecordsInput, ProcessorError, RecordProcessor};
use crate::retrieval::kinesis::{GetRecordsFailure, KinesisReads, RecordsPage};
use crate::retrieval::polling::IteratorStart;
use crate::retrieval::{RetrievalError, Shard};

#[derive(Debug, Default)]
struct FakeShard {
    parents: BTreeSet<String>,
    records: Vec<Record>,
    /// Closed shards end once read; their children are named at the end.
    children: Option<Vec<String>>,
}

/// A stream in memory. Iterators are `"{shard}/{position}"`; sequence numbers grow across the
/// stream, as in Kinesis. While [`deleted`](FakeKinesis::set_deleted), every call fails as on a
/// deleted stream; while [`throttled`](FakeKinesis::set_throttled), `GetRecords` is refused as
/// over the shard's quota. Every `GetRecords` call is recorded ([`FakeKinesis::reads`]).
#[derive(Debug)]
pub(crate) struct FakeKinesis {
    shards: Mutex<BTreeMap<String, FakeShard>>,
    next_sequence: AtomicU64,
    deleted: AtomicBool,
    throttled: AtomicBool,
    reads: Mutex<Vec<Read>>,
}

/// One `GetRecords` call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Read {
    pub(crate) at: Instant,
    pub(crate) shard: String,
    /// The index in the shard of the first record asked for.
    pub(crate) position: usize,
    pub(crate) throttled: bool,
}

impl Default for FakeKinesis {
    fn default() -> Self {
        FakeKinesis {
            shards: Mutex::default(),
            next_sequence: AtomicU64::new(100_000),
            deleted: AtomicBool::new(false),
            throttled: AtomicBool::new(false),
            reads: Mutex::default(),
        }
    }
}

impl FakeKinesis {
    /// `GetRecords` fails with `ProvisionedThroughputExceededException` while `throttled`.
    pub(crate) fn set_throttled(&self, throttled: bool) {
        self.throttled.store(throttled, Ordering::Relaxed);
    }

    /// The `GetRecords` calls made on `shard`, in order.
    pub(crate) fn reads(&self, shard: &str) -> Vec<Read> {
        let reads = self.reads.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        reads.iter().filter(|r| r.shard == shard).cloned().collect()
    }

    /// Every call fails with `ResourceNotFoundException` while `deleted`.
    pub(crate) fn set_deleted(&self, deleted: bool) {
        self.deleted.store(deleted, Ordering::Relaxed);
    }

    fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Relaxed)
    }

    fn gone(shard: &str) -> RetrievalError {
        RetrievalError::NotFound {
            shard: shard.to_owned(),
            message: "ResourceNotFoundException: no such stream".into(),
        }
    }

    fn shards(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, FakeShard>> {
        self.shards.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn add_shard(&self, shard: &str, parents: &[&str]) {
        let parents = parents.iter().map(|p| (*p).to_owned()).collect();
        self.shards().insert(shard.to_owned(), FakeShard { parents, ..FakeShard::default() });
    }

    /// Puts `count` records; returns their sequence numbers.
    pub(crate) fn put(&self, shard: &str, count: usize) -> Vec<String> {
        let mut shards = self.shards();
        let Some(target) = shards.get_mut(shard) else { panic!("no shard {shard}") };
        (0..count)
            .map(|_| {
                let sequence = self.next_sequence.fetch_add(1, Ordering::Relaxed).to_string();
                let record = Record::builder()
                    .sequence_number(&sequence)
                    .data(Blob::new(format!("{shard}:{sequence}")))
                    .partition_key("pk")
                    .build()
                    .expect("a complete record");
                target.records.push(record);
                sequence
            })
            .collect()
    }

    /// Closes `shard` (a split or merge): once read to its end, it ends, naming `children`.
    pub(crate) fn close(&self, shard: &str, children: &[&str]) {
        if let Some(target) = self.shards().get_mut(shard) {
            target.children = Some(children.iter().map(|c| (*c).to_owned()).collect());
        }
    }
}

impl KinesisReads for FakeKinesis {
    fn list_shards<'a>(&'a self, stream: &'a str) -> BoxFuture<'a, Result<Vec<Shard>>> {
        if self.is_deleted() {
            let error = crate::Error::ListShards {
                stream: stream.to_owned(),
                message: "ResourceNotFoundException: no such stream".into(),
                retryable: false,
            };
            return Box::pin(async move { Err(error) });
        }
        let shards = self
            .shards()
            .iter()
            .map(|(id, shard)| Shard {
                shard_id: id.clone(),
                parents: shard.parents.clone(),
                range: HashKeyRange::FULL,
                open: shard.children.is_none(),
            })
            .collect();
        Box::pin(async move { Ok(shards) })
    }

    fn get_shard_iterator<'a>(
        &'a self,
        _stream: &'a str,
        shard: &'a str,
        start: &'a IteratorStart,
    ) -> BoxFuture<'a, Result<Option<String>, RetrievalError>> {
        if self.is_deleted() {
            let error = Self::gone(shard);
            return Box::pin(async move { Err(error) });
        }
        let shards = self.shards();
        let result = match shards.get(shard) {
            None => Err(RetrievalError::NotFound { shard: shard.to_owned(), message: "no such shard".into() }),
            Some(target) => {
                let find = |sequence: &Option<String>| {
                    target.records.iter().position(|r| Some(r.sequence_number()) == sequence.as_deref())
                };
                let position = match start.kind {
                    ShardIteratorType::Latest => Some(target.records.len()),
                    ShardIteratorType::AtSequenceNumber => find(&start.sequence_number),
                    ShardIteratorType::AfterSequenceNumber => find(&start.sequence_number).map(|p| p + 1),
                    _ => Some(0),
                };
                match position {
                    Some(position) => Ok(Some(format!("{shard}/{position}"))),
                    None => Err(RetrievalError::Other {
                        shard: shard.to_owned(),
                        code: "InvalidArgumentException".into(),
                        message: format!("no record {:?}", start.sequence_number),
                        retryable: false,
                    }),
                }
            }
        };
        Box::pin(async move { result })
    }

    fn get_records<'a>(
        &'a self,
        shard: &'a str,
        iterator: &'a str,
        limit: i32,
    ) -> BoxFuture<'a, Result<RecordsPage, GetRecordsFailure>> {
        if self.is_deleted() {
            let error = GetRecordsFailure::Failed(Self::gone(shard));
            return Box::pin(async move { Err(error) });
        }
        let shards = self.shards();
        let position = iterator.rsplit_once('/').and_then(|(_, p)| p.parse::<usize>().ok());
        let throttled = self.throttled.load(Ordering::Relaxed);
        self.reads.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(Read {
            at: Instant::now(),
            shard: shard.to_owned(),
            position: position.unwrap_or(usize::MAX),
            throttled,
        });
        if throttled {
            let error = GetRecordsFailure::Failed(RetrievalError::Throttled { shard: shard.to_owned() });
            return Box::pin(async move { Err(error) });
        }
        let result = match (shards.get(shard), position) {
            (Some(target), Some(position)) => {
                let end = (position + usize::try_from(limit).unwrap_or(1)).min(target.records.len());
                let records = target.records.get(position..end).unwrap_or_default().to_vec();
                let at_end = end == target.records.len();
                let (next_iterator, child_shards) = match (&target.children, at_end) {
                    (Some(children), true) => (None, children.clone()),
                    _ => (Some(format!("{shard}/{end}")), Vec::new()),
                };
                let behind = if at_end { 0 } else { 1_000 };
                Ok(RecordsPage { records, next_iterator, millis_behind_latest: Some(behind), child_shards })
            }
            _ => Err(GetRecordsFailure::Failed(RetrievalError::Other {
                shard: shard.to_owned(),
                code: "InvalidArgumentException".into(),
                message: format!("bad iterator {iterator}"),
                retryable: false,
            })),
        };
        Box::pin(async move { result })
    }
}

/// What a processor was told and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    Init {
        checkpoint: ExtendedSequenceNumber,
        restarts: u32,
    },
    /// A batch processed (its sequence numbers).
    Batch(Vec<String>),
    /// A batch the processor failed.
    Failed(Vec<String>),
    /// A checkpoint written (the checkpointer's position after it).
    Checkpointed(ExtendedSequenceNumber),
    ShutdownRequested,
    ShardEnded,
    LeaseLost,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) worker: String,
    pub(crate) shard: String,
    pub(crate) event: Event,
    /// When it happened (a batch: when its processing ended).
    pub(crate) at: Instant,
}

/// Every processor's events, in the order they happened.
#[derive(Debug, Clone, Default)]
pub(crate) struct Log(Arc<Mutex<Vec<Entry>>>);

impl Log {
    fn push(&self, worker: &str, shard: &str, event: Event) {
        let entry = Entry { worker: worker.to_owned(), shard: shard.to_owned(), event, at: Instant::now() };
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(entry);
    }

    pub(crate) fn entries(&self) -> Vec<Entry> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// The records `worker` processed (batches that succeeded), as (shard, sequence number).
    pub(crate) fn processed_by(&self, worker: &str) -> Vec<(String, String)> {
        self.entries()
            .into_iter()
            .filter(|e| e.worker == worker)
            .flat_map(|e| match e.event {
                Event::Batch(records) => records.into_iter().map(|r| (e.shard.clone(), r)).collect(),
                _ => Vec::new(),
            })
            .collect()
    }

    /// The records processed by any worker, sorted, with repeats.
    pub(crate) fn processed(&self) -> Vec<(String, String)> {
        let mut all: Vec<(String, String)> = self
            .entries()
            .into_iter()
            .flat_map(|e| match e.event {
                Event::Batch(records) => records.into_iter().map(|r| (e.shard.clone(), r)).collect(),
                _ => Vec::new(),
            })
            .collect();
        all.sort();
        all
    }

    /// Index in the log of the first entry matching `pred`.
    pub(crate) fn position(&self, pred: impl Fn(&Entry) -> bool) -> Option<usize> {
        self.entries().iter().position(pred)
    }
}

/// When a [`Recorder`] checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CheckpointWhen {
    /// After every batch.
    EveryBatch,
    /// Only when asked to shut down (and at the shard's end).
    AtShutdown,
}

/// A processor that records what it is told in a [`Log`], checkpoints as configured, takes
/// `batch_time` over each batch, and fails the `fail_batch`-th batch it sees (counting from 0)
/// once.
#[derive(Debug)]
pub(crate) struct Recorder {
    pub(crate) worker: String,
    pub(crate) shard: String,
    pub(crate) log: Log,
    pub(crate) when: CheckpointWhen,
    pub(crate) fail_batch: Option<usize>,
    pub(crate) batches: usize,
    pub(crate) batch_time: Duration,
}

impl Recorder {
    async fn checkpoint(&self, checkpointer: &Checkpointer) -> Result<(), ProcessorError> {
        let before = checkpointer.last_checkpoint();
        checkpointer.checkpoint().await?;
        let after = checkpointer.last_checkpoint();
        if after != before {
            self.log.push(&self.worker, &self.shard, Event::Checkpointed(after));
        }
        Ok(())
    }
}

impl RecordProcessor for Recorder {
    async fn initialize(&mut self, input: &InitializeInput) -> Result<(), ProcessorError> {
        let event = Event::Init { checkpoint: input.checkpoint.clone(), restarts: input.restarts };
        self.log.push(&self.worker, &self.shard, event);
        Ok(())
    }

    async fn process_records(
        &mut self,
        input: ProcessRecordsInput,
        checkpointer: &Checkpointer,
    ) -> Result<(), ProcessorError> {
        let records: Vec<String> = input.records.iter().map(|r| r.sequence_number.clone()).collect();
        if !self.batch_time.is_zero() {
            tokio::time::sleep(self.batch_time).await;
        }
        let batch = self.batches;
        self.batches += 1;
        if self.fail_batch == Some(batch) {
            self.log.push(&self.worker, &self.shard, Event::Failed(records));
            return Err("the sink is down".into());
        }
        self.log.push(&self.worker, &self.shard, Event::Batch(records));
        if self.when == CheckpointWhen::EveryBatch {
            self.checkpoint(checkpointer).await?;
        }
        Ok(())
    }

    async fn shard_ended(&mut self, checkpointer: &Checkpointer) -> Result<(), ProcessorError> {
        self.log.push(&self.worker, &self.shard, Event::ShardEnded);
        self.checkpoint(checkpointer).await
    }

    async fn shutdown_requested(&mut self, checkpointer: &Checkpointer) -> Result<(), ProcessorError> {
        self.log.push(&self.worker, &self.shard, Event::ShutdownRequested);
        self.checkpoint(checkpointer).await
    }

    async fn lease_lost(&mut self) {
        self.log.push(&self.worker, &self.shard, Event::LeaseLost);
    }
}
