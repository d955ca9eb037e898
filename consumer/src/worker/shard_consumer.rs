//! One task per lease a worker holds: wait for the shard's parents, read from the checkpoint,
//! hand batches to the application's processor in order, and end the right way (shard end, lease
//! lost, hand-off or shutdown).
//!
//! Read-ahead (polling only, on by default): while the processor works on a batch, the next
//! `GetRecords` runs in a task of its own ([`ReadAhead`]), so a slow processor and a slow read
//! overlap. At most one batch is read ahead per shard, and reads keep their pace (the reader spaces
//! its calls 200 ms apart, the shard's 5 calls/s). The batch read ahead is only a read: it counts
//! as delivered (and so may be checkpointed) when it is handed to the processor, and it is dropped
//! when the lease is lost, handed off or shut down, or when the processor fails (the shard is
//! read again from the checkpoint). No read goes ahead of a read that ended the shard, or of one
//! that found the shard caught up (the idle pause comes first).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ktk_proto::keys::HashKeyRange;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::lease::{ExtendedSequenceNumber, HeldLease, Lease, LeaseRenewer, LeaseTable, SequenceNumber};
use crate::processor::{Checkpointer, InitializeInput, ProcessRecordsInput, RecordProcessor};
use crate::retrieval::kinesis::KinesisReads;
use crate::retrieval::{
    FanOutConfig, FanOutReader, ReadResult, Reader, ReaderConfig, RetrievalError, ShardReader, StartingPosition,
};
use crate::worker::WorkerStatus;
use ktk_backoff::Backoff;

/// What every shard task of a worker shares.
#[derive(Debug)]
pub(crate) struct ShardContext {
    pub(crate) stream: String,
    pub(crate) kinesis: Arc<dyn KinesisReads>,
    pub(crate) table: LeaseTable,
    pub(crate) renewer: Arc<LeaseRenewer>,
    pub(crate) reader: ReaderConfig,
    /// Enhanced fan-out: the client, the consumer ARN and how to subscribe (polling when `None`).
    pub(crate) fan_out: Option<(aws_sdk_kinesis::Client, String, FanOutConfig)>,
    pub(crate) initial_timestamp: Option<SystemTime>,
    pub(crate) parent_poll_interval: Duration,
    pub(crate) idle_time_between_reads: Duration,
    /// Call the processor after reads that returned no records too.
    pub(crate) empty_batches: bool,
    /// Read the next batch while the processor works on one (polling only).
    pub(crate) read_ahead: bool,
    pub(crate) retry_min: Duration,
    pub(crate) retry_max: Duration,
    /// The worker is shutting down: finish the batch in hand, let the processor checkpoint,
    /// release.
    pub(crate) shutdown: CancellationToken,
    /// Woken when a shard of this worker reached its end: children may start, and the worker
    /// syncs shards at once.
    pub(crate) shard_ended: Arc<Notify>,
    /// Told how every read went (the worker's view of the stream, for health checks).
    pub(crate) status: WorkerStatus,
}

/// How a shard task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    ShardEnded,
    LeaseLost,
    /// Shut down or handed over: the lease was released (`released` says whether the table took
    /// the release; if not, it expires).
    Released {
        released: bool,
    },
}

/// Why the main loop stopped.
enum Stop {
    Lost,
    /// Shutdown or hand-off.
    Leave,
}

pub(crate) async fn run<P: RecordProcessor>(ctx: Arc<ShardContext>, held: Arc<HeldLease>, mut processor: P) -> Ending {
    let shard = held.shard_id().to_owned();
    let lease = held.snapshot().await;
    let checkpointer = Checkpointer::new(ctx.table.clone(), Arc::clone(&held), lease.checkpoint.clone());
    let stop = match wait_for_parents(&ctx, &held, &lease).await {
        Some(stop) => stop,
        None => match consume(&ctx, &held, &checkpointer, &mut processor, lease).await {
            Ok(()) => {
                info!(stream = %ctx.stream, shard, "shard ended; SHARD_END checkpointed");
                ctx.renewer.forget(&shard);
                ctx.shard_ended.notify_waiters();
                return Ending::ShardEnded;
            }
            Err(stop) => stop,
        },
    };
    match stop {
        Stop::Lost => {
            info!(stream = %ctx.stream, shard, "lease lost; stopping the shard");
            processor.lease_lost().await;
            ctx.renewer.forget(&shard);
            Ending::LeaseLost
        }
        Stop::Leave => {
            if let Err(error) = processor.shutdown_requested(&checkpointer).await {
                warn!(stream = %ctx.stream, shard, %error, "processor failed at shutdown; the next owner starts from the last checkpoint");
            }
            if held.is_lost() {
                processor.lease_lost().await;
                ctx.renewer.forget(&shard);
                return Ending::LeaseLost;
            }
            let released = ctx.renewer.release(&shard).await;
            debug!(stream = %ctx.stream, shard, released, "lease released");
            Ending::Released { released }
        }
    }
}

/// Why to stop now, if at all: lost first, then hand-off and shutdown.
fn should_stop(ctx: &ShardContext, held: &HeldLease) -> Option<Stop> {
    if held.is_lost() {
        Some(Stop::Lost)
    } else if ctx.shutdown.is_cancelled() || held.is_handoff_requested() {
        Some(Stop::Leave)
    } else {
        None
    }
}

/// Sleeps `duration`, or less if the lease is lost, handed off or the worker shuts down.
async fn pause(ctx: &ShardContext, held: &HeldLease, duration: Duration) -> Option<Stop> {
    tokio::select! {
        () = held.lost() => Some(Stop::Lost),
        () = held.handoff_requested() => Some(Stop::Leave),
        () = ctx.shutdown.cancelled() => Some(Stop::Leave),
        () = tokio::time::sleep(duration) => None,
    }
}

/// Waits until every parent of the shard is finished (or has no lease). `Some` if told to stop
/// meanwhile.
async fn wait_for_parents(ctx: &ShardContext, held: &HeldLease, lease: &Lease) -> Option<Stop> {
    let mut waiting: BTreeSet<String> = lease.parent_shard_ids.clone();
    let mut logged = false;
    while !waiting.is_empty() {
        let mut still = BTreeSet::new();
        for parent in &waiting {
            match ctx.table.get(parent).await {
                Ok(Some(parent_lease)) if !parent_lease.is_finished() => {
                    still.insert(parent.clone());
                }
                Ok(_) => {}
                Err(error) => {
                    debug!(shard = %lease.lease_key, parent, %error, "could not read the parent's lease; trying again");
                    still.insert(parent.clone());
                }
            }
        }
        waiting = still;
        if waiting.is_empty() {
            break;
        }
        if !logged {
            info!(stream = %ctx.stream, shard = %lease.lease_key, parents = ?waiting, "waiting for the parent shards to end");
            logged = true;
        }
        let notified = ctx.shard_ended.notified();
        tokio::select! {
            () = notified => {}
            stop = pause(ctx, held, ctx.parent_poll_interval) => if stop.is_some() { return stop },
        }
        if let Some(stop) = should_stop(ctx, held) {
            return Some(stop);
        }
    }
    should_stop(ctx, held)
}

fn starting_position(ctx: &ShardContext, checkpoint: &ExtendedSequenceNumber) -> StartingPosition {
    match &checkpoint.sequence {
        SequenceNumber::Number(sequence) => {
            StartingPosition::After { sequence_number: sequence.clone(), sub_sequence_number: checkpoint.sub_sequence }
        }
        SequenceNumber::Latest => StartingPosition::Latest,
        SequenceNumber::AtTimestamp => match ctx.initial_timestamp {
            Some(time) => StartingPosition::AtTimestamp(time),
            None => {
                warn!(stream = %ctx.stream, "a lease starts AT_TIMESTAMP but no timestamp is configured; reading from TRIM_HORIZON");
                StartingPosition::TrimHorizon
            }
        },
        // SHARD_END leases are never started; TRIM_HORIZON, and anything unexpected, reads it all.
        _ => StartingPosition::TrimHorizon,
    }
}

fn reader(ctx: &ShardContext, lease: &Lease) -> Reader {
    let range = lease.hash_key_range.unwrap_or(HashKeyRange::FULL);
    let start = starting_position(ctx, &lease.checkpoint);
    match &ctx.fan_out {
        Some((client, consumer_arn, config)) => Reader::from(FanOutReader::new(
            client.clone(),
            consumer_arn.clone(),
            lease.lease_key.clone(),
            range,
            start,
            config.clone(),
        )),
        None => Reader::from(ShardReader::with_api(
            Arc::clone(&ctx.kinesis),
            ctx.stream.clone(),
            lease.lease_key.clone(),
            range,
            start,
            ctx.reader.clone(),
        )),
    }
}

/// Initializes the processor, retrying with a backoff until it works or the task must stop.
async fn initialize<P: RecordProcessor>(
    ctx: &ShardContext,
    held: &HeldLease,
    processor: &mut P,
    input: &InitializeInput,
    backoff: &mut Backoff,
) -> Result<(), Stop> {
    loop {
        if let Some(stop) = should_stop(ctx, held) {
            return Err(stop);
        }
        match processor.initialize(input).await {
            Ok(()) => return Ok(()),
            Err(error) => {
                warn!(stream = %ctx.stream, shard = %input.shard_id, %error, "processor failed to initialize; retrying");
                if let Some(stop) = pause(ctx, held, backoff.next_delay()).await {
                    return Err(stop);
                }
            }
        }
    }
}

/// Reads and processes until the shard ends (`Ok`) or the task must stop.
async fn consume<P: RecordProcessor>(
    ctx: &ShardContext,
    held: &HeldLease,
    checkpointer: &Checkpointer,
    processor: &mut P,
    lease: Lease,
) -> Result<(), Stop> {
    let shard = lease.lease_key.clone();
    let labels = [("stream", ctx.stream.clone()), ("shard", shard.clone())];
    let behind = metrics::gauge!("MillisBehindLatest", &labels);
    let processed = metrics::counter!("RecordsProcessed", &labels);
    let processed_bytes = metrics::counter!("DataBytesProcessed", &labels);
    let out_of_range = metrics::counter!("RecordsOutOfShardRange", &labels);
    let read_errors = metrics::counter!("GetRecordsErrors", &labels);
    let processor_errors = metrics::counter!("ProcessorErrors", &labels);

    let mut restarts = 0u32;
    let mut backoff = Backoff::new(ctx.retry_min, ctx.retry_max);
    let mut read_backoff = Backoff::new(ctx.retry_min, ctx.retry_max);
    let mut start = InitializeInput { shard_id: shard.clone(), checkpoint: lease.checkpoint.clone(), restarts };
    initialize(ctx, held, processor, &start, &mut backoff).await?;
    // `None` after a failed batch: the shard is read again from the table's checkpoint.
    let mut reader = Some(self::reader(ctx, &lease));
    // The batch read while the processor worked on the previous one.
    let mut ahead: Option<Result<ReadResult, RetrievalError>> = None;
    debug!(stream = %ctx.stream, shard, checkpoint = %lease.checkpoint, "processing");

    loop {
        // A lease lost or handed over drops the batch read ahead with everything else.
        if let Some(stop) = should_stop(ctx, held) {
            return Err(stop);
        }
        let current = match &mut reader {
            Some(current) => current,
            None => reader.insert(self::reader(ctx, &held.snapshot().await)),
        };
        let read = match ahead.take() {
            Some(read) => read,
            None => tokio::select! {
                () = held.lost() => return Err(Stop::Lost),
                () = held.handoff_requested() => return Err(Stop::Leave),
                () = ctx.shutdown.cancelled() => return Err(Stop::Leave),
                read = current.read() => read,
            },
        };
        let ReadResult { records, millis_behind_latest, out_of_range: outside, shard_end, .. } = match read {
            Ok(result) => {
                ctx.status.kinesis_answered();
                read_backoff.reset();
                result
            }
            Err(error) => {
                // Throttling is Kinesis answering: the stream is there and reachable.
                if matches!(error, RetrievalError::Throttled { .. }) {
                    ctx.status.kinesis_answered();
                } else {
                    ctx.status.kinesis_failed(error.to_string());
                }
                read_errors.increment(1);
                log_read_error(ctx, &shard, &error);
                let delay = if error.is_retryable() { read_backoff.next_delay() } else { ctx.retry_max };
                if let Some(stop) = pause(ctx, held, delay).await {
                    return Err(stop);
                }
                continue;
            }
        };
        if let Some(ms) = millis_behind_latest {
            behind.set(ms as f64);
        }
        if !outside.is_empty() {
            out_of_range.increment(outside.len() as u64);
            warn!(stream = %ctx.stream, shard, records = outside.len(), "user records outside the shard's hash range set aside");
        }
        let caught_up = records.is_empty() && millis_behind_latest.is_none_or(|ms| ms == 0);
        if !records.is_empty() || ctx.empty_batches {
            if let Some(last) = records.last() {
                checkpointer.delivered(last);
            }
            let count = records.len() as u64;
            let bytes: usize = records.iter().map(|r| r.data.len()).sum();
            let input = ProcessRecordsInput { shard_id: shard.clone(), records, millis_behind_latest };
            let read_ahead =
                ctx.read_ahead && shard_end.is_none() && !caught_up && matches!(reader, Some(Reader::Polling(_)));
            let outcome = if read_ahead && let Some(polling) = reader.take() {
                let next = ReadAhead::start(polling);
                let outcome = processor.process_records(input, checkpointer).await;
                // After a failed batch the read is dropped with `next` (and the reader with it).
                if outcome.is_ok() {
                    let (back, read) = tokio::select! {
                        () = held.lost() => return Err(Stop::Lost),
                        () = held.handoff_requested() => return Err(Stop::Leave),
                        () = ctx.shutdown.cancelled() => return Err(Stop::Leave),
                        done = next.finish() => done,
                    };
                    ahead = Some(read);
                    reader = Some(back);
                }
                outcome
            } else {
                processor.process_records(input, checkpointer).await
            };
            if let Err(error) = outcome {
                processor_errors.increment(1);
                restarts = restarts.saturating_add(1);
                let delay = backoff.next_delay();
                warn!(stream = %ctx.stream, shard, %error, restarts, ?delay, "processor failed; re-reading the shard from its checkpoint");
                if let Some(stop) = pause(ctx, held, delay).await {
                    return Err(stop);
                }
                // From the table's checkpoint (the processor may have checkpointed inside the batch).
                let now = held.snapshot().await;
                checkpointer.rewind();
                start = InitializeInput { shard_id: shard.clone(), checkpoint: now.checkpoint.clone(), restarts };
                initialize(ctx, held, processor, &start, &mut backoff).await?;
                // The next round makes a reader from that checkpoint; a batch read ahead is dropped.
                reader = None;
                ahead = None;
                continue;
            }
            backoff.reset();
            processed.increment(count);
            processed_bytes.increment(bytes as u64);
        }
        if let Some(children) = shard_end {
            return finish_shard(ctx, held, checkpointer, processor, children.into_iter().collect(), &mut backoff)
                .await;
        }
        if caught_up && let Some(stop) = pause(ctx, held, ctx.idle_time_between_reads).await {
            return Err(stop);
        }
    }
}

/// The next read of a shard, running in a task of its own while the processor works, so that it
/// progresses whatever the processor does with its thread. Dropping it aborts the read.
struct ReadAhead {
    task: tokio::task::JoinHandle<(Reader, Result<ReadResult, RetrievalError>)>,
}

impl ReadAhead {
    /// Starts the next read of `reader`, which comes back with the result.
    fn start(mut reader: Reader) -> Self {
        ReadAhead {
            task: tokio::spawn(async move {
                let read = reader.read().await;
                (reader, read)
            }),
        }
    }

    /// The reader and what it read. A read that panicked panics here, in the shard's task (the
    /// worker restarts the shard from its checkpoint, as after a processor's panic).
    async fn finish(mut self) -> (Reader, Result<ReadResult, RetrievalError>) {
        match (&mut self.task).await {
            Ok(done) => done,
            Err(error) => match error.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                Err(error) => panic!("a shard's read-ahead task was cancelled: {error}"),
            },
        }
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The shard has been read to its end: the processor checkpoints `SHARD_END`, or is asked again.
async fn finish_shard<P: RecordProcessor>(
    ctx: &ShardContext,
    held: &HeldLease,
    checkpointer: &Checkpointer,
    processor: &mut P,
    children: BTreeSet<String>,
    backoff: &mut Backoff,
) -> Result<(), Stop> {
    let shard = checkpointer.shard_id().to_owned();
    checkpointer.set_shard_end(children);
    loop {
        if held.is_lost() {
            return Err(Stop::Lost);
        }
        match processor.shard_ended(checkpointer).await {
            Ok(()) if checkpointer.is_shard_end_checkpointed() => return Ok(()),
            Ok(()) => error!(
                stream = %ctx.stream, shard,
                "the processor returned from shard_ended without checkpointing; the shard's children wait until it does"
            ),
            Err(error) => warn!(stream = %ctx.stream, shard, %error, "processor failed at the shard's end; retrying"),
        }
        // A shutdown here leaves the lease to the next owner, which reads the (empty) rest and ends it.
        if let Some(stop) = pause(ctx, held, backoff.next_delay()).await {
            return Err(stop);
        }
    }
}

fn log_read_error(ctx: &ShardContext, shard: &str, error: &RetrievalError) {
    match error {
        RetrievalError::Throttled { .. } => debug!(stream = %ctx.stream, shard, %error, "read throttled; backing off"),
        error if error.is_retryable() => warn!(stream = %ctx.stream, shard, %error, "read failed; retrying"),
        error => error!(stream = %ctx.stream, shard, %error, "read failed; retrying slowly"),
    }
}
