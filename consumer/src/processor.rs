//! The application's side of the consumer: a [`RecordProcessor`] per shard, made by a
//! [`ProcessorFactory`], and the [`Checkpointer`] it records its progress with.
//!
//! The life of a processor is documented on [`RecordProcessor`].

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::lease::{ExtendedSequenceNumber, HeldLease, LeaseTable, SequenceNumber};
use crate::retrieval::ConsumerRecord;

/// What a processor's method may fail with: anything; the worker logs it and retries.
pub type ProcessorError = Box<dyn std::error::Error + Send + Sync>;

/// Where a processor starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitializeInput {
    pub shard_id: String,
    /// The lease's checkpoint: records after it are delivered (`TRIM_HORIZON`, `LATEST` and
    /// `AT_TIMESTAMP` for a shard not checkpointed yet).
    pub checkpoint: ExtendedSequenceNumber,
    /// 0 at the first start; otherwise how many times processing failed and the shard was re-read
    /// from its checkpoint.
    pub restarts: u32,
}

/// One batch of records, in shard order.
#[derive(Debug, Clone, Default)]
pub struct ProcessRecordsInput {
    pub shard_id: String,
    pub records: Vec<ConsumerRecord>,
    /// How far the batch's read was behind the tip of the shard.
    pub millis_behind_latest: Option<i64>,
}

/// The application's code for one shard. Methods return futures that are `Send`, so a processor
/// written with `async fn` works as long as what it holds across `.await`s is `Send`.
///
/// The life of a processor, for one lease of one shard on one worker:
/// 1. [`initialize`](RecordProcessor::initialize), with the shard and the checkpoint it starts
///    after (again, with `restarts` counted, after a failed batch: see below);
/// 2. [`process_records`](RecordProcessor::process_records) for each batch, in shard order, never
///    two at once;
/// 3. one ending:
///    - [`shard_ended`](RecordProcessor::shard_ended): the shard was read to its end (after a split
///      or merge); the processor must checkpoint, which records `SHARD_END` and lets the shard's
///      children start;
///    - [`shutdown_requested`](RecordProcessor::shutdown_requested): the worker is shutting down, or
///      another worker asked for the lease to balance the load; the processor may checkpoint (what
///      it checkpoints is where the next owner starts), then the lease is handed over at once;
///    - [`lease_lost`](RecordProcessor::lease_lost): another worker has the lease now; nothing more
///      may be written for the shard (checkpoints are refused).
///
/// A batch whose processing fails is not skipped: the worker backs off, re-reads the shard from the
/// last checkpoint, calls `initialize` again (with `restarts` one higher), and delivers the records
/// again. A processor that keeps state between batches should reset it in `initialize`.
pub trait RecordProcessor: Send + 'static {
    /// Called before the first batch, and again after a failed batch before the records after the
    /// checkpoint are delivered again.
    fn initialize(&mut self, input: &InitializeInput) -> impl Future<Output = Result<(), ProcessorError>> + Send;

    /// Processes a batch. Checkpoint through `checkpointer` when what was processed is durable
    /// (every batch, every few batches, or on a timer); an error makes the worker re-read from the
    /// last checkpoint.
    fn process_records(
        &mut self,
        input: ProcessRecordsInput,
        checkpointer: &Checkpointer,
    ) -> impl Future<Output = Result<(), ProcessorError>> + Send;

    /// The shard was read to its end. The processor must [`Checkpointer::checkpoint`], which
    /// writes `SHARD_END`; until it does, the worker calls this again (with a backoff) and the
    /// shard's children wait. The default checkpoints and nothing else.
    fn shard_ended(&mut self, checkpointer: &Checkpointer) -> impl Future<Output = Result<(), ProcessorError>> + Send {
        async move { checkpointer.checkpoint().await.map_err(ProcessorError::from) }
    }

    /// The worker is shutting down, or the lease is being handed to another worker. Checkpoint
    /// what is durable; the lease is released right after. The default checkpoints nothing (the
    /// next owner starts from the last checkpoint the processor made).
    fn shutdown_requested(
        &mut self,
        checkpointer: &Checkpointer,
    ) -> impl Future<Output = Result<(), ProcessorError>> + Send {
        let _ = checkpointer;
        async { Ok(()) }
    }

    /// Another worker has the lease; stop. Checkpoints are refused from now on.
    fn lease_lost(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// Makes a processor for each shard a worker starts processing.
pub trait ProcessorFactory: Send + Sync + 'static {
    type Processor: RecordProcessor;

    fn create(&self, shard_id: &str) -> Self::Processor;
}

impl<F, P> ProcessorFactory for F
where
    F: Fn(&str) -> P + Send + Sync + 'static,
    P: RecordProcessor,
{
    type Processor = P;

    fn create(&self, shard_id: &str) -> P {
        self(shard_id)
    }
}

/// Records how far a shard has been processed, in the lease table, while this worker holds the
/// shard's lease.
///
/// A checkpoint is conditional on the lease (so a worker that lost it cannot write one), never
/// moves backwards ([`Error::CheckpointBackwards`]), and never goes past what was delivered
/// ([`Error::InvalidRequest`]). Checkpointing the same position twice writes once.
#[derive(Debug)]
pub struct Checkpointer {
    shard_id: String,
    table: LeaseTable,
    held: Arc<HeldLease>,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// The last user record delivered to the processor.
    delivered: Option<ExtendedSequenceNumber>,
    /// The checkpoint in the table, as far as this worker knows.
    checkpointed: ExtendedSequenceNumber,
    /// Set once the shard has been read to its end: its children.
    shard_end: Option<BTreeSet<String>>,
}

impl Checkpointer {
    pub(crate) fn new(table: LeaseTable, held: Arc<HeldLease>, checkpoint: ExtendedSequenceNumber) -> Self {
        Checkpointer {
            shard_id: held.shard_id().to_owned(),
            table,
            held,
            state: Mutex::new(State { delivered: None, checkpointed: checkpoint, shard_end: None }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn shard_id(&self) -> &str {
        &self.shard_id
    }

    /// The last checkpoint written (or the one the shard started from).
    pub fn last_checkpoint(&self) -> ExtendedSequenceNumber {
        self.state().checkpointed.clone()
    }

    /// Whether this worker has lost the lease (checkpoints will be refused).
    pub fn is_lease_lost(&self) -> bool {
        self.held.is_lost()
    }

    /// Whether the lease is being handed to another worker: the batch in hand should be finished
    /// and checkpointed soon; no more batches come.
    pub fn is_handoff_requested(&self) -> bool {
        self.held.is_handoff_requested()
    }

    /// Checkpoints everything delivered so far; at the end of the shard (in
    /// [`RecordProcessor::shard_ended`]), `SHARD_END`.
    pub async fn checkpoint(&self) -> Result<()> {
        let (target, children) = {
            let state = self.state();
            match (&state.shard_end, &state.delivered) {
                (Some(children), _) => (ExtendedSequenceNumber::SHARD_END, Some(children.clone())),
                (None, Some(delivered)) => (delivered.clone(), None),
                (None, None) => return Ok(()),
            }
        };
        self.write(target, children).await
    }

    /// Checkpoints up to and including this record (which must have been delivered).
    pub async fn checkpoint_record(&self, record: &ConsumerRecord) -> Result<()> {
        self.checkpoint_at(&record.sequence_number, record.sub_sequence_number).await
    }

    /// Checkpoints up to and including the user record at `sequence_number`/`sub_sequence_number`,
    /// which must have been delivered already.
    pub async fn checkpoint_at(&self, sequence_number: &str, sub_sequence_number: u64) -> Result<()> {
        let target = ExtendedSequenceNumber::at(sequence_number, sub_sequence_number).map_err(|problem| {
            Error::InvalidRequest {
                shard: self.shard_id.clone(),
                operation: "checkpoint",
                problem: format!("{sequence_number:?} is not a sequence number: {problem}"),
            }
        })?;
        let delivered = self.state().delivered.clone();
        if delivered.as_ref().is_none_or(|delivered| &target > delivered) {
            return Err(Error::InvalidRequest {
                shard: self.shard_id.clone(),
                operation: "checkpoint",
                problem: format!(
                    "{target} has not been delivered yet (last delivered: {}); checkpoint only records that were \
                     processed",
                    delivered.map_or_else(|| "none".to_owned(), |d| d.to_string())
                ),
            });
        }
        self.write(target, None).await
    }

    async fn write(&self, target: ExtendedSequenceNumber, shard_end: Option<BTreeSet<String>>) -> Result<()> {
        if self.state().checkpointed == target {
            return Ok(());
        }
        match &shard_end {
            Some(children) => self.held.checkpoint_shard_end(&self.table, children).await?,
            None => self.held.checkpoint(&self.table, target.clone()).await?,
        }
        metrics::counter!("Checkpoints", "shard" => self.shard_id.clone()).increment(1);
        self.state().checkpointed = target;
        Ok(())
    }

    /// The records up to `last` are being handed to the processor.
    pub(crate) fn delivered(&self, last: &ConsumerRecord) {
        if let Ok(position) = ExtendedSequenceNumber::at(last.sequence_number.clone(), last.sub_sequence_number) {
            self.state().delivered = Some(position);
        }
    }

    /// The shard is re-read from its checkpoint after a failed batch: nothing after it counts as
    /// delivered any more.
    pub(crate) fn rewind(&self) {
        let mut state = self.state();
        state.delivered = match &state.checkpointed.sequence {
            SequenceNumber::Number(_) => Some(state.checkpointed.clone()),
            _ => None,
        };
    }

    pub(crate) fn set_shard_end(&self, children: BTreeSet<String>) {
        self.state().shard_end = Some(children);
    }

    pub(crate) fn is_shard_end_checkpointed(&self) -> bool {
        self.state().checkpointed.is_shard_end()
    }
}
