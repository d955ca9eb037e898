//! The producer's engine: one task that owns every buffered record.
//!
//! Data flow, for one user record:
//! 1. `Producer::put` checks the record, takes room from the outstanding limits, hashes the key and
//!    sends a [`Pending`] here.
//! 2. [`Engine::route`] finds the record's predicted shard in the [`ShardMap`]. If the shard has
//!    room in its window (see [`Window`]: what the calls can take from it next) the record is
//!    admitted, its TTL clock starts, and it goes into the shard's aggregator; otherwise it waits
//!    in the shard's backlog, unadmitted, and is admitted in order as calls take the shard's
//!    records (or, while the shard is backing off after a failure, it waits behind the held,
//!    failed ones, so order per shard is kept).
//! 3. An aggregate is finished when the next record does not fit or its first record has waited
//!    `record_max_buffered_time`; it then waits in the shard's ready queue.
//! 4. [`Engine::dispatch`] collects ready records of many shards into one `PutRecords` call, at most
//!    one call in flight per shard, at most [`CallLimit::limit`] calls in flight in all (adaptive:
//!    see `adaptive.rs`), within the per-shard rate limits, as soon as any shard is due (buffering
//!    time up, 256 KiB waiting, a full window, or a flush).
//! 5. The answer resolves every user record of every successful entry; the records of failed
//!    entries go back to the front of their shard, which backs off before sending again, or fail
//!    when retrying cannot help or their TTL would run out. How the call went (its latency, a
//!    timeout, throttling) moves the concurrency limit and the next calls' timeout.
//!
//! Every record ends in exactly one `resolve`, which answers its receipt and gives back its room
//! in the outstanding limits.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use ktk_proto::aggregation::{Aggregator, AggregatorConfig, KinesisRecord, RejectedRef, UserRecord};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{Instrument, debug, warn};

use crate::adaptive::{CallLimit, Change, Outcome};
use crate::api::{
    CallError, Entry, EntryResult, KinesisApi, REQUEST_TIMEOUT, Retry, ShardInfo, retry_for_entry, with_timeout,
};
use crate::config::{ProducerConfig, SHARD_EARLY_FLUSH_BYTES, SHARD_MAX_BYTES_PER_SEC, SHARD_MAX_RECORDS_PER_SEC};
use crate::error::{PutError, PutErrorKind};
use crate::limiter::ShardLimiter;
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::record::{Attempt, BatchSlot, Landing, PutOutcome, PutResult, Record};
use crate::shard_map::ShardMap;

/// Messages from the `Producer` handles.
pub(crate) enum Command {
    Put(Pending),
    /// Records of one `put_batch`, in order.
    PutBatch(Vec<Pending>),
    /// Answer once every record received before this command is resolved.
    Flush(oneshot::Sender<()>),
    /// Flush, then stop; at `deadline`, fail what is left.
    Shutdown {
        deadline: Instant,
        done: oneshot::Sender<()>,
    },
}

/// One accepted user record, until it is resolved.
#[derive(Debug)]
pub(crate) struct Pending {
    record: Option<UserRecord>,
    hash_key: u128,
    reply: Option<Reply>,
    /// When it was admitted into its shard's pipeline (until then, when `put` accepted it); it
    /// expires `record_ttl` after admission (see [`expires`](Self::expires)).
    arrived: Instant,
    attempts: Vec<Attempt>,
    epoch: u64,
    /// Admitted into its shard's pipeline: its TTL runs. Before that it waits in a backlog.
    admitted: bool,
}

/// Where a record's result goes.
#[derive(Debug)]
pub(crate) enum Reply {
    One(oneshot::Sender<PutResult>),
    Batch(Arc<BatchSlot>, usize),
}

impl Reply {
    fn send(self, result: PutResult) {
        match self {
            // The caller may have dropped its receipt: nothing to tell, nothing lost.
            Reply::One(sender) => drop(sender.send(result)),
            Reply::Batch(slot, index) => slot.set(index, result),
        }
    }
}

/// Results on their way to their receipts: consecutive results for the same `put_batch` are
/// written under one lock when the run ends, their room and counts given back once, just before;
/// a single `put`'s result goes at once.
#[derive(Debug, Default)]
struct Answers {
    /// The batch receipt of the current run, and the run's results.
    run_slot: Option<Arc<BatchSlot>>,
    run: Vec<(usize, PutResult)>,
    tally: Tally,
}

impl Answers {
    /// Answers a record, or adds it to the current run; `size` is the room it gives back.
    fn push(&mut self, reply: Reply, result: PutResult, size: usize, counters: &Counters, limits: &Limits) {
        match reply {
            Reply::Batch(slot, index) => {
                if !self.run_slot.as_ref().is_some_and(|current| Arc::ptr_eq(current, &slot)) {
                    self.end_run(counters, limits);
                    self.run_slot = Some(slot);
                }
                self.tally.add(result.is_ok(), size);
                self.run.push((index, result));
            }
            one => {
                let mut single = Tally::default();
                single.add(result.is_ok(), size);
                single.give_back(counters, limits);
                one.send(result);
            }
        }
    }

    /// Writes the current run's results to its receipt, after giving back their room.
    fn end_run(&mut self, counters: &Counters, limits: &Limits) {
        if let Some(slot) = self.run_slot.take() {
            self.tally.give_back(counters, limits);
            slot.set_many(self.run.drain(..));
        }
    }
}

/// Room and counts of records about to be answered.
#[derive(Debug, Default)]
struct Tally {
    put: u64,
    failed: u64,
    records: usize,
    bytes: usize,
}

impl Tally {
    fn add(&mut self, ok: bool, bytes: usize) {
        if ok {
            self.put += 1;
        } else {
            self.failed += 1;
        }
        self.records += 1;
        self.bytes += bytes;
    }

    /// Counts and room before the answers: whoever awaits a receipt may read the stats or put
    /// again at once.
    fn give_back(&mut self, counters: &Counters, limits: &Limits) {
        if self.records == 0 {
            return;
        }
        let Tally { put, failed, records, bytes } = std::mem::take(self);
        bump(&counters.user_records_put, put);
        bump(&counters.user_records_failed, failed);
        limits.give_back_many(records, bytes);
    }
}

impl Pending {
    pub(crate) fn new(record: UserRecord, hash_key: u128, reply: Reply, arrived: Instant) -> Self {
        Pending {
            record: Some(record),
            hash_key,
            reply: Some(reply),
            arrived,
            attempts: Vec::new(),
            epoch: 0,
            admitted: false,
        }
    }

    /// Size as Kinesis counts it: data plus partition key.
    pub(crate) fn size(&self) -> usize {
        self.record().plain_size()
    }

    /// Admitted into its shard's pipeline now: its TTL starts.
    fn admit(&mut self, now: Instant) {
        self.arrived = now;
        self.admitted = true;
    }

    /// Answers a record that was never accepted (no room for it): the error carries it back.
    pub(crate) fn refuse(self, kind: PutErrorKind) {
        if let Some((reply, result)) = self.into_answer(Err(kind)) {
            reply.send(result);
        }
    }

    /// When its TTL runs out (never, before it is admitted). Worked out rather than stored: a
    /// pending record is moved a few times on its way, and every byte less of it counts.
    fn expires(&self, ttl: Duration) -> Option<Instant> {
        self.admitted.then(|| self.arrived + ttl)
    }

    fn expired_by(&self, ttl: Duration, time: Instant) -> bool {
        self.expires(ttl).is_some_and(|expires| expires <= time)
    }

    fn record(&self) -> &UserRecord {
        // Present from creation until `into_answer`, which consumes the pending record.
        self.record.as_ref().expect("a pending record holds its record until answered")
    }

    /// The result for the receipt, and where it goes. Consumes the record, so it is answered
    /// exactly once.
    fn into_answer(mut self, result: Result<PutOutcome, PutErrorKind>) -> Option<(Reply, PutResult)> {
        let reply = self.reply.take()?;
        let result = match result {
            Ok(outcome) => Ok(outcome),
            Err(kind) => {
                let record = self.record.take().map_or_else(|| Record::new("unknown", bytes::Bytes::new()), to_record);
                Err(PutError::new(kind, record, std::mem::take(&mut self.attempts)))
            }
        };
        Some((reply, result))
    }
}

impl Drop for Pending {
    /// A safety net, not a code path: every record is answered by `Engine::resolve` before it is
    /// dropped. If the engine ever unwound past a record, its receipt still gets the record back
    /// instead of hanging.
    fn drop(&mut self) {
        if let (Some(reply), Some(record)) = (self.reply.take(), self.record.take()) {
            let error = PutError::new(
                PutErrorKind::ShutDown { in_flight: false },
                to_record(record),
                std::mem::take(&mut self.attempts),
            );
            reply.send(Err(error));
        }
    }
}

fn to_record(record: UserRecord) -> Record {
    let (partition_key, explicit_hash_key, data) = record.into_parts();
    Record { partition_key, explicit_hash_key, data }
}

/// A finished Kinesis record and the user records in it, in order.
#[derive(Debug)]
struct Ready {
    record: KinesisRecord,
    members: Vec<Pending>,
    /// When it must be sent: its oldest member's arrival plus the buffering time.
    due: Instant,
}

/// Everything the engine holds for one shard.
#[derive(Debug)]
struct ShardState {
    id: Arc<str>,
    aggregator: Aggregator,
    members: Vec<Pending>,
    /// Records in the last aggregate: the next one likely holds as many, so its members are
    /// allocated at once instead of regrown (and copied) on the way.
    members_hint: usize,
    aggregating_since: Option<Instant>,
    ready: VecDeque<Ready>,
    ready_bytes: usize,
    /// Admitted records waiting while the shard backs off (failed ones first, then newer ones),
    /// or waiting to be re-routed after a reshard.
    held: VecDeque<Pending>,
    /// Records routed here and not admitted yet, in order, behind everything above: they wait,
    /// their TTL not running, while the shard's window is full or it backs off.
    backlog: VecDeque<Pending>,
    blocked_until: Option<Instant>,
    /// Set when the rate limiter held the shard back: when to look again.
    limited_until: Option<Instant>,
    in_flight: bool,
    limiter: ShardLimiter,
}

impl ShardState {
    fn new(id: Arc<str>, config: &ProducerConfig, aggregator_config: AggregatorConfig, now: Instant) -> Self {
        ShardState {
            id,
            aggregator: Aggregator::new(aggregator_config),
            members: Vec::new(),
            members_hint: 0,
            aggregating_since: None,
            ready: VecDeque::new(),
            ready_bytes: 0,
            held: VecDeque::new(),
            backlog: VecDeque::new(),
            blocked_until: None,
            limited_until: None,
            in_flight: false,
            limiter: ShardLimiter::new(config.rate_limit_percent, now),
        }
    }

    fn is_idle(&self) -> bool {
        self.members.is_empty()
            && self.ready.is_empty()
            && self.held.is_empty()
            && self.backlog.is_empty()
            && !self.in_flight
    }

    /// Whether the next record admitted, of `size` bytes, may be admitted now: the shard is not
    /// backing off, and what is admitted and unsent stays within `window` (a shard with nothing
    /// unsent takes any record).
    fn room_for(&self, size: usize, window: Window) -> bool {
        if self.blocked_until.is_some() || !self.held.is_empty() {
            return false;
        }
        let records = self.ready.len();
        (records == 0 && self.aggregator.is_empty())
            || (self.ready_bytes + self.aggregator.size() + size <= window.bytes && records < window.records)
    }

    /// Admits records from the backlog, in order, while there is room. Hands back the records no
    /// aggregate takes.
    fn admit_backlog(
        &mut self,
        window: Window,
        now: Instant,
        buffered_time: Duration,
        aggregation: bool,
        spare: &mut Vec<Vec<Pending>>,
    ) -> Vec<Pending> {
        let mut refused = Vec::new();
        while let Some(front) = self.backlog.front() {
            if !self.room_for(front.size(), window) {
                break;
            }
            let Some(mut pending) = self.backlog.pop_front() else { break };
            pending.admit(now);
            if let Some(pending) = self.aggregate(pending, buffered_time, aggregation, spare) {
                refused.push(pending);
            }
        }
        refused
    }

    /// Finishes the current aggregate into the ready queue.
    fn finish_aggregate(&mut self, buffered_time: Duration) {
        let Some(record) = self.aggregator.finish() else {
            return;
        };
        self.members_hint = self.members.len();
        let members = std::mem::take(&mut self.members);
        let since = self.aggregating_since.take().unwrap_or_else(Instant::now);
        self.ready_bytes += record.size();
        self.ready.push_back(Ready { record, members, due: since + buffered_time });
    }

    /// Adds a record to the shard: an unadmitted one is admitted if there is room in `window`,
    /// else it joins the backlog; an admitted one goes to the current aggregate (finishing it
    /// first if the record does not fit), or to the held records while the shard backs off.
    /// Hands back a record no aggregate takes. `spare`: emptied member lists to reuse for a new
    /// aggregate.
    fn add(
        &mut self,
        mut pending: Pending,
        window: Window,
        now: Instant,
        buffered_time: Duration,
        aggregation: bool,
        spare: &mut Vec<Vec<Pending>>,
    ) -> Option<Pending> {
        if !pending.admitted {
            if !self.backlog.is_empty() || !self.room_for(pending.size(), window) {
                self.backlog.push_back(pending);
                return None;
            }
            pending.admit(now);
        }
        if self.blocked_until.is_some() || !self.held.is_empty() {
            self.held.push_back(pending);
            return None;
        }
        self.aggregate(pending, buffered_time, aggregation, spare)
    }

    /// Adds an admitted record to the current aggregate, finishing it first if the record does
    /// not fit. Hands back a record no aggregate takes.
    fn aggregate(
        &mut self,
        pending: Pending,
        buffered_time: Duration,
        aggregation: bool,
        spare: &mut Vec<Vec<Pending>>,
    ) -> Option<Pending> {
        let added = match self.aggregator.try_add_ref(pending.record()) {
            Err(RejectedRef::Full) => {
                self.finish_aggregate(buffered_time);
                self.aggregator.try_add_ref(pending.record())
            }
            other => other,
        };
        if added.is_err() {
            return Some(pending);
        }
        self.aggregating_since.get_or_insert(pending.arrived);
        if self.members.capacity() == 0 {
            self.members = spare.pop().unwrap_or_default();
            self.members.reserve(self.members_hint);
        }
        self.members.push(pending);
        if !aggregation {
            self.finish_aggregate(buffered_time);
        }
        None
    }

    /// Puts `records` (the oldest of the shard) back in front of everything admitted and not yet
    /// sent, and holds the shard until `until`: the way order per shard survives a failure. The
    /// backlog stays behind them.
    fn requeue_front(&mut self, records: Vec<Pending>, until: Instant) {
        let newer = self.drain_admitted();
        self.held.extend(records);
        self.held.extend(newer);
        self.blocked_until = Some(self.blocked_until.map_or(until, |t| t.max(until)));
    }

    /// Takes every admitted record that is not in flight, oldest first: held, then ready, then
    /// aggregating.
    fn drain_admitted(&mut self) -> Vec<Pending> {
        let mut out: Vec<Pending> = self.held.drain(..).collect();
        for ready in self.ready.drain(..) {
            out.extend(ready.members);
        }
        self.ready_bytes = 0;
        self.aggregator.reset();
        self.aggregating_since = None;
        out.append(&mut self.members);
        out
    }

    /// Sends the records admitted but never sent back to the front of the backlog, their TTL
    /// clock stopped (it starts again when they are admitted again): the window they were
    /// admitted under was larger than the one the calls can now take. Records already tried
    /// (the oldest of the shard, held or ready) keep their place and their clock.
    fn unadmit_unsent(&mut self) {
        // The aggregate being built holds the newest records: if one of them was tried, so was
        // everything before it.
        if self.members.iter().any(|m| !m.attempts.is_empty()) {
            return;
        }
        let mut newest_first: Vec<Pending> = self.members.drain(..).rev().collect();
        self.aggregator.reset();
        self.aggregating_since = None;
        while self.ready.back().is_some_and(|r| r.members.iter().all(|m| m.attempts.is_empty())) {
            let Some(ready) = self.ready.pop_back() else { break };
            self.ready_bytes -= ready.record.size();
            newest_first.extend(ready.members.into_iter().rev());
        }
        for mut pending in newest_first {
            pending.admitted = false;
            self.backlog.push_front(pending);
        }
    }

    /// Takes every record that is not in flight, oldest first: the admitted ones, then the
    /// backlog.
    fn drain_unsent(&mut self) -> Vec<Pending> {
        let mut out = self.drain_admitted();
        out.extend(self.backlog.drain(..));
        out
    }
}

/// How much a shard may hold admitted and unsent: what the calls can take from it next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Window {
    /// Kinesis records ready to send (the aggregate being built aside).
    records: usize,
    /// Bytes ready to send and aggregating.
    bytes: usize,
}

impl Window {
    /// The least of: one call's worth (`collection_max_count`, `collection_max_size`); one second
    /// of the shard's rate limit; and the shard's share of what `limit` calls carry at once when
    /// the stream has more open shards than that. So a record admitted goes out in the next call
    /// or two that carry its shard, whatever the limit, and its TTL measures the time Kinesis
    /// takes, not a queue. Never less than one record (a shard with nothing unsent admits any
    /// record, whatever its size).
    fn new(config: &ProducerConfig, limit: usize, open_shards: usize) -> Self {
        let scale = f64::from(config.rate_limit_percent) / 100.0;
        let share = |per_call: usize| (per_call.saturating_mul(limit.max(1))).div_ceil(open_shards.max(1));
        let records = config
            .collection_max_count
            .min(share(config.collection_max_count))
            .min((SHARD_MAX_RECORDS_PER_SEC * scale) as usize)
            .max(1);
        let bytes = config
            .collection_max_size
            .min(share(config.collection_max_size))
            .min((SHARD_MAX_BYTES_PER_SEC * scale) as usize)
            .max(1);
        Window { records, bytes }
    }
}

/// A `PutRecords` call in flight: the records it carries, per entry.
struct InFlight {
    entries: Vec<(Arc<str>, Ready)>,
    started_at: SystemTime,
    /// When it was sent, and the timeout it was given (for the concurrency limit).
    sent: Instant,
    timeout: Duration,
    /// Whether it passed its timeout without an answer (counted as congestion once; the engine
    /// still waits for its answer, up to twice the timeout).
    late: bool,
}

/// What a call's task tells the engine: that the call passed its timeout, then how it ended.
enum CallEvent {
    Late { id: u64 },
    Done(CallDone),
}

struct CallDone {
    id: u64,
    result: Result<Vec<EntryResult>, CallError>,
    duration: Duration,
}

/// Counters any caller can read without a metrics recorder (`Producer::stats`).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) user_records_received: AtomicU64,
    pub(crate) user_records_put: AtomicU64,
    pub(crate) user_records_failed: AtomicU64,
    pub(crate) user_records_expired: AtomicU64,
    pub(crate) kinesis_records_put: AtomicU64,
    pub(crate) put_records_calls: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) throttled: AtomicU64,
    pub(crate) shard_map_refreshes: AtomicU64,
    pub(crate) mispredicted: AtomicU64,
    pub(crate) timed_out_calls: AtomicU64,
    pub(crate) late_answers: AtomicU64,
    pub(crate) abandoned_calls: AtomicU64,
    pub(crate) resent_after_timeout: AtomicU64,
    /// Snapshots of the adaptive call limit and the next call's timeout.
    pub(crate) concurrency_limit: AtomicU64,
    pub(crate) request_timeout_ms: AtomicU64,
}

fn bump(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

pub(crate) struct Engine {
    config: Arc<ProducerConfig>,
    aggregator_config: AggregatorConfig,
    api: Arc<dyn KinesisApi>,
    stream: Arc<str>,
    commands: mpsc::UnboundedReceiver<Command>,
    commands_open: bool,
    map: ShardMap,
    shards: HashMap<Arc<str>, ShardState, foldhash::fast::FixedState>,
    /// Shard ids in a stable order, for fair round-robin batching.
    order: Vec<Arc<str>>,
    cursor: usize,
    in_flight: HashMap<u64, InFlight>,
    /// How many calls may be in flight, and their timeout (adaptive).
    calls: CallLimit,
    /// What each shard may hold admitted and unsent, for the current limit and shard map.
    window: Window,
    next_call_id: u64,
    calls_done_tx: mpsc::Sender<CallEvent>,
    calls_done: mpsc::Receiver<CallEvent>,
    refresh_tx: mpsc::Sender<Result<Vec<ShardInfo>, CallError>>,
    refresh_rx: mpsc::Receiver<Result<Vec<ShardInfo>, CallError>>,
    refreshing: bool,
    refresh_wanted: bool,
    last_refresh: Instant,
    /// Unresolved records per epoch, oldest first; a flush waits for every epoch up to its own.
    /// Epochs only change at flushes, so this stays a handful of entries.
    epochs: VecDeque<(u64, usize)>,
    /// Sum of `epochs`.
    outstanding: usize,
    epoch: u64,
    flush_waiters: Vec<(u64, oneshot::Sender<()>)>,
    shutdown: Option<(Instant, Vec<oneshot::Sender<()>>)>,
    counters: Arc<Counters>,
    metrics: Metrics,
    limits: Arc<Limits>,
    answers: Answers,
    /// Member lists of answered Kinesis records, emptied, for new aggregates: memory that is
    /// already allocated and likely in cache. At most [`SPARE_MEMBER_LISTS`].
    spare_members: Vec<Vec<Pending>>,
}

const SPARE_MEMBER_LISTS: usize = 8;

impl Engine {
    pub(crate) fn new(
        config: Arc<ProducerConfig>,
        api: Arc<dyn KinesisApi>,
        shards: &[ShardInfo],
        commands: mpsc::UnboundedReceiver<Command>,
        counters: Arc<Counters>,
        limits: Arc<Limits>,
    ) -> Self {
        let aggregator_config = AggregatorConfig::default()
            .with_max_record_size(config.max_record_size)
            .and_then(|c| c.with_max_aggregate_size(config.aggregation_max_size))
            // Validated by `ProducerConfig::validate` before the engine is built.
            .unwrap_or_default();
        // Each call sends at most two events (late, done); a full channel only makes a call's
        // task wait to report.
        let (calls_done_tx, calls_done) = mpsc::channel(2 * config.max_connections + 1);
        let (refresh_tx, refresh_rx) = mpsc::channel(1);
        let stream: Arc<str> = Arc::from(config.stream.as_str());
        let metrics = Metrics::new(&stream);
        let calls = CallLimit::new(config.max_connections, config.request_timeout, config.max_request_timeout);
        let window = Window::new(&config, calls.limit(), shards.iter().filter(|s| s.open).count());
        let mut engine = Engine {
            config,
            aggregator_config,
            api,
            stream,
            commands,
            commands_open: true,
            map: ShardMap::default(),
            shards: HashMap::default(),
            order: Vec::new(),
            cursor: 0,
            in_flight: HashMap::new(),
            calls,
            window,
            next_call_id: 0,
            calls_done_tx,
            calls_done,
            refresh_tx,
            refresh_rx,
            refreshing: false,
            refresh_wanted: false,
            last_refresh: Instant::now(),
            epochs: VecDeque::new(),
            outstanding: 0,
            epoch: 0,
            flush_waiters: Vec::new(),
            shutdown: None,
            counters,
            metrics,
            limits,
            answers: Answers::default(),
            spare_members: Vec::new(),
        };
        engine.install_map(ShardMap::new(shards), Instant::now());
        engine.publish_limit();
        engine
    }

    /// Makes the call limit and timeout visible (stats, gauges) and resizes the shards' windows.
    fn publish_limit(&mut self) {
        let (limit, timeout) = (self.calls.limit(), self.calls.timeout());
        self.counters.concurrency_limit.store(limit as u64, Ordering::Relaxed);
        self.counters.request_timeout_ms.store(timeout.as_millis() as u64, Ordering::Relaxed);
        self.metrics.concurrency_limit.set(limit as f64);
        self.metrics.request_timeout_ms.set(timeout.as_secs_f64() * 1000.0);
        self.window = Window::new(&self.config, limit, self.map.len());
    }

    pub(crate) async fn run(mut self) {
        loop {
            let wake = self.next_wake();
            tokio::select! {
                biased;
                Some(event) = self.calls_done.recv() => match event {
                    CallEvent::Late { id } => self.on_call_late(id, Instant::now()),
                    CallEvent::Done(done) => self.on_call_done(done),
                },
                Some(listing) = self.refresh_rx.recv() => self.on_refresh(listing),
                command = self.commands.recv(), if self.commands_open => match command {
                    Some(command) => {
                        self.on_command(command);
                        // Take what else is queued before dispatching, so records arriving
                        // together are aggregated together.
                        for _ in 0..1024 {
                            match self.commands.try_recv() {
                                Ok(command) => self.on_command(command),
                                Err(_) => break,
                            }
                        }
                    }
                    // Every handle is gone: finish what was accepted, then stop.
                    None => self.commands_open = false,
                },
                _ = sleep_until(wake) => {}
            }
            let now = Instant::now();
            self.dispatch(now);
            self.metrics.user_records_pending.set(self.outstanding() as f64);
            if self.finished(now) {
                break;
            }
        }
        debug!(stream = %self.stream, "producer engine stopped");
    }

    fn outstanding(&self) -> usize {
        self.outstanding
    }

    /// Counts a newly received record in the current epoch.
    fn count_in(&mut self, pending: &mut Pending) {
        pending.epoch = self.epoch;
        self.count_in_many(1);
    }

    /// Counts `n` newly received records in the current epoch (their `epoch` is set by the
    /// caller).
    fn count_in_many(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        match self.epochs.back_mut() {
            Some((epoch, count)) if *epoch == self.epoch => *count += n,
            _ => self.epochs.push_back((self.epoch, n)),
        }
        self.outstanding += n;
    }

    fn flushing(&self) -> bool {
        !self.flush_waiters.is_empty() || self.shutdown.is_some() || !self.commands_open
    }

    /// Whether the engine may stop: asked to, and nothing is left (or the deadline passed).
    fn finished(&mut self, now: Instant) -> bool {
        let stopping = self.shutdown.is_some() || !self.commands_open;
        if !stopping {
            return false;
        }
        let deadline_passed = self.shutdown.as_ref().is_some_and(|(deadline, _)| now >= *deadline);
        if deadline_passed {
            self.fail_everything();
        } else if self.outstanding() > 0 || !self.in_flight.is_empty() {
            return false;
        }
        if let Some((_, waiters)) = self.shutdown.take() {
            for waiter in waiters {
                let _ = waiter.send(());
            }
        }
        self.answer_flush_waiters_now();
        true
    }

    /// At the shutdown deadline: every record still held fails with `ShutDown`, the record
    /// handed back.
    fn fail_everything(&mut self) {
        let in_flight: Vec<InFlight> = self.in_flight.drain().map(|(_, call)| call).collect();
        for call in in_flight {
            for (_, ready) in call.entries {
                for member in ready.members {
                    self.resolve(member, Err(PutErrorKind::ShutDown { in_flight: true }));
                }
            }
        }
        let ids: Vec<Arc<str>> = self.shards.keys().cloned().collect();
        for id in ids {
            let unsent = match self.shards.get_mut(&id) {
                Some(state) => state.drain_unsent(),
                None => continue,
            };
            for member in unsent {
                self.resolve(member, Err(PutErrorKind::ShutDown { in_flight: false }));
            }
        }
        // Records still queued in the channel were accepted too.
        while let Ok(command) = self.commands.try_recv() {
            let queued = match command {
                Command::Put(pending) => vec![pending],
                Command::PutBatch(batch) => batch,
                _ => continue,
            };
            for mut pending in queued {
                self.count_in(&mut pending);
                self.resolve(pending, Err(PutErrorKind::ShutDown { in_flight: false }));
            }
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Put(mut pending) => {
                self.count_in(&mut pending);
                bump(&self.counters.user_records_received, 1);
                self.metrics.user_records_received.increment(1);
                self.route(pending, Instant::now());
            }
            Command::PutBatch(batch) => {
                bump(&self.counters.user_records_received, batch.len() as u64);
                self.metrics.user_records_received.increment(batch.len() as u64);
                let now = Instant::now();
                self.count_in_many(batch.len());
                let epoch = self.epoch;
                for mut pending in batch {
                    pending.epoch = epoch;
                    self.route(pending, now);
                }
            }
            Command::Flush(done) => {
                self.flush_waiters.push((self.epoch, done));
                self.epoch += 1;
                self.answer_flush_waiters_now();
            }
            Command::Shutdown { deadline, done } => {
                match &mut self.shutdown {
                    Some((existing, waiters)) => {
                        *existing = (*existing).min(deadline);
                        waiters.push(done);
                    }
                    None => self.shutdown = Some((deadline, vec![done])),
                }
                self.epoch += 1;
            }
        }
    }

    /// Puts a record in its predicted shard's buffers.
    fn route(&mut self, pending: Pending, now: Instant) {
        if pending.expired_by(self.config.record_ttl, now) {
            bump(&self.counters.user_records_expired, 1);
            self.metrics.user_record_expired.increment(1);
            self.resolve(pending, Err(PutErrorKind::Expired));
            return;
        }
        let Some(shard_id) = self.map.shard_for(pending.hash_key) else {
            // No open shard known: hold the record in a placeholder until the next listing.
            self.refresh_wanted = true;
            self.state_for(Arc::from(""), now).held.push_back(pending);
            return;
        };
        let (buffered_time, aggregation) = (self.config.record_max_buffered_time, self.config.aggregation_enabled);
        let window = self.window;
        // Every shard of the map has its state (see `install_map`): looked up without touching
        // the id's reference count.
        let refused = match self.shards.get_mut(&**shard_id) {
            Some(state) => state.add(pending, window, now, buffered_time, aggregation, &mut self.spare_members),
            None => {
                let shard_id = Arc::clone(shard_id);
                let mut spare = std::mem::take(&mut self.spare_members);
                let refused =
                    self.state_for(shard_id, now).add(pending, window, now, buffered_time, aggregation, &mut spare);
                self.spare_members = spare;
                refused
            }
        };
        // `put` checked the size, and an empty aggregator takes any record within it; fail
        // loudly rather than drop the record if that ever changed.
        if let Some(pending) = refused {
            let (size, max) = (pending.record().plain_size(), self.config.max_record_size);
            self.resolve(pending, Err(PutErrorKind::TooLarge { size, max }));
        }
    }

    fn state_for(&mut self, id: Arc<str>, now: Instant) -> &mut ShardState {
        let (config, aggregator_config) = (&self.config, self.aggregator_config);
        let order = &mut self.order;
        self.shards.entry(id.clone()).or_insert_with(|| {
            order.push(id.clone());
            ShardState::new(id, config, aggregator_config, now)
        })
    }

    /// Answers a record and accounts for it. Every record ends here (or in [`settle`](Self::settle)
    /// and then [`deliver`](Self::deliver)) exactly once.
    fn resolve(&mut self, pending: Pending, result: Result<PutOutcome, PutErrorKind>) {
        self.settle(pending, result);
        self.deliver();
    }

    /// Accounts for a record and answers it, or adds it to the current run of a batch receipt,
    /// written at the latest by the next [`deliver`](Self::deliver).
    fn settle(&mut self, pending: Pending, result: Result<PutOutcome, PutErrorKind>) {
        if let Some(position) = self.epochs.iter().position(|(epoch, _)| *epoch == pending.epoch) {
            self.epochs[position].1 -= 1;
            self.outstanding -= 1;
            if self.epochs[position].1 == 0 {
                self.epochs.remove(position);
            }
        }
        let (ok, size) = (result.is_ok(), pending.size());
        match pending.into_answer(result) {
            Some((reply, result)) => self.answers.push(reply, result, size, &self.counters, &self.limits),
            // Nobody to answer (cannot happen: a record keeps its reply until answered).
            None => {
                let mut tally = Tally::default();
                tally.add(ok, size);
                tally.give_back(&self.counters, &self.limits);
            }
        }
    }

    /// Answers what is left of the current run of results (see [`Answers`]).
    fn deliver(&mut self) {
        self.answers.end_run(&self.counters, &self.limits);
    }

    /// Sends what is due; finishes aggregates that waited long enough; ends backoffs.
    fn dispatch(&mut self, now: Instant) {
        let flushing = self.flushing();
        let buffered_time = self.config.record_max_buffered_time;
        // Aggregates whose first record has waited long enough (or everything, when flushing, or
        // when the shard's window is full and it can send: waiting would not fill the call more).
        for state in self.shards.values_mut() {
            if state.aggregating_since.is_some_and(|since| {
                flushing || since + buffered_time <= now || (!state.backlog.is_empty() && !state.in_flight)
            }) {
                state.finish_aggregate(buffered_time);
            }
        }
        // Shards whose backoff is over take their held records back, in order.
        let unblocked: Vec<Arc<str>> = self
            .shards
            .values_mut()
            .filter(|s| {
                s.blocked_until.is_some_and(|until| until <= now)
                    || (s.blocked_until.is_none() && !s.held.is_empty() && !s.in_flight)
            })
            .map(|s| {
                s.blocked_until = None;
                s.id.clone()
            })
            .collect();
        for id in unblocked {
            let held: Vec<Pending> = match self.shards.get_mut(&id) {
                Some(state) => state.held.drain(..).collect(),
                None => continue,
            };
            for pending in held {
                self.route(pending, now);
            }
            if flushing && let Some(state) = self.shards.get_mut(&id) {
                state.finish_aggregate(buffered_time);
            }
        }
        self.admit_backlogs(now);
        self.maybe_refresh(now);
        while self.in_flight.len() < self.calls.limit() {
            if !self.send_one_call(now, flushing) {
                break;
            }
        }
        // The calls just started took records out of their shards' windows: admit what fits.
        self.admit_backlogs(now);
        if flushing {
            for state in self.shards.values_mut() {
                if !state.in_flight && state.aggregating_since.is_some() {
                    state.finish_aggregate(buffered_time);
                }
            }
        }
        self.answer_flush_waiters_now();
        self.drop_idle_closed_shards();
    }

    /// Admits, shard by shard, the records of the backlogs that fit in the windows.
    fn admit_backlogs(&mut self, now: Instant) {
        let (buffered_time, aggregation, window) =
            (self.config.record_max_buffered_time, self.config.aggregation_enabled, self.window);
        let mut refused = Vec::new();
        for state in self.shards.values_mut() {
            if !state.backlog.is_empty() {
                refused.extend(state.admit_backlog(window, now, buffered_time, aggregation, &mut self.spare_members));
            }
        }
        // `put` checked the size, and an empty aggregator takes any record within it.
        for pending in refused {
            let (size, max) = (pending.record().plain_size(), self.config.max_record_size);
            self.resolve(pending, Err(PutErrorKind::TooLarge { size, max }));
        }
    }

    fn answer_flush_waiters_now(&mut self) {
        if self.flush_waiters.is_empty() {
            return;
        }
        let oldest_open = self.epochs.front().map(|(epoch, _)| *epoch);
        let waiters = std::mem::take(&mut self.flush_waiters);
        for (epoch, waiter) in waiters {
            if oldest_open.is_some_and(|open| open <= epoch) {
                self.flush_waiters.push((epoch, waiter));
            } else {
                let _ = waiter.send(());
            }
        }
    }

    /// Builds and starts one `PutRecords` call if any shard is due; false if none was started.
    fn send_one_call(&mut self, now: Instant, flushing: bool) -> bool {
        let due = |s: &ShardState| {
            !s.in_flight
                && s.blocked_until.is_none()
                && s.limited_until.is_none_or(|t| t <= now)
                && s.ready.front().is_some_and(|r| {
                    flushing || r.due <= now || s.ready_bytes >= SHARD_EARLY_FLUSH_BYTES || !s.backlog.is_empty()
                })
        };
        if !self.shards.values().any(due) {
            return false;
        }
        let (max_count, max_bytes) = (self.config.collection_max_count, self.config.collection_max_size);
        let (strict, ttl) = (self.config.strict_ordering, self.config.record_ttl);
        let mut expired_records: Vec<Pending> = Vec::new();
        let mut entries: Vec<(Arc<str>, Ready)> = Vec::new();
        let mut bytes = 0usize;
        let n = self.order.len();
        for step in 0..n {
            if entries.len() >= max_count {
                break;
            }
            let id = &self.order[(self.cursor + step) % n];
            let Some(state) = self.shards.get_mut(id) else {
                continue;
            };
            // Shards that are not yet due ride along when there is room: fewer calls later.
            if state.in_flight || state.blocked_until.is_some() || state.ready.is_empty() {
                continue;
            }
            if state.limited_until.is_some_and(|t| t > now) {
                continue;
            }
            let mut took = false;
            while let Some(front) = state.ready.front() {
                let size = front.record.size();
                if entries.len() >= max_count || bytes + size > max_bytes || (took && strict) {
                    break;
                }
                // A record can outlive its TTL waiting here (behind a rate limit): it fails as
                // expired instead of being sent late, and the rest of its aggregate goes back in
                // front of the shard, to be aggregated again.
                if front.members.iter().any(|m| m.expired_by(ttl, now)) {
                    let Some(stale) = state.ready.pop_front() else { break };
                    state.ready_bytes -= size;
                    let (expired, live): (Vec<Pending>, Vec<Pending>) =
                        stale.members.into_iter().partition(|m| m.expired_by(ttl, now));
                    expired_records.extend(expired);
                    state.requeue_front(live, now);
                    break;
                }
                let wait = state.limiter.wait_for(size, now);
                if !wait.is_zero() {
                    state.limited_until = Some(now + wait);
                    break;
                }
                state.limiter.take(size);
                state.limited_until = None;
                let Some(ready) = state.ready.pop_front() else {
                    break;
                };
                state.ready_bytes -= size;
                bytes += size;
                entries.push((state.id.clone(), ready));
                took = true;
            }
            if took {
                state.in_flight = true;
            }
        }
        self.cursor = if n == 0 { 0 } else { (self.cursor + 1) % n };
        let expired_any = !expired_records.is_empty();
        for pending in expired_records {
            bump(&self.counters.user_records_expired, 1);
            self.metrics.user_record_expired.increment(1);
            self.resolve(pending, Err(PutErrorKind::Expired));
        }
        if entries.is_empty() {
            // Expired records were taken out: look again (the shard's other records wait).
            return expired_any;
        }
        self.start_call(entries);
        true
    }

    fn start_call(&mut self, entries: Vec<(Arc<str>, Ready)>) {
        let id = self.next_call_id;
        self.next_call_id += 1;
        let request: Vec<Entry> = entries
            .iter()
            .map(|(_, ready)| Entry {
                partition_key: ready.record.partition_key.clone(),
                explicit_hash_key: ready.record.explicit_hash_key.clone(),
                data: ready.record.data.clone(),
            })
            .collect();
        let count = request.len();
        bump(&self.counters.put_records_calls, 1);
        self.metrics.kinesis_records_per_request.record(count as f64);
        let now = Instant::now();
        for (_, ready) in &entries {
            let oldest = ready.members.first().map_or(now, |m| m.arrived);
            self.metrics.buffering_time_ms.record(now.saturating_duration_since(oldest).as_secs_f64() * 1000.0);
        }
        let timeout = self.calls.timeout();
        self.in_flight.insert(id, InFlight { entries, started_at: SystemTime::now(), sent: now, timeout, late: false });
        let api = Arc::clone(&self.api);
        let stream = Arc::clone(&self.stream);
        let done = self.calls_done_tx.clone();
        let span = tracing::debug_span!("PutRecords", stream = %stream, records = count, call = id);
        tokio::spawn(
            async move {
                let started = Instant::now();
                let mut call = api.put_records(&stream, request);
                // Past its timeout the call is congestion (the engine lowers the limit and
                // lengthens the timeout) but not lost: its answer says which records were
                // written, where sending them again could store them twice. The engine gives up
                // on it, and sends its records again, only at twice its timeout.
                let result = match tokio::time::timeout(timeout, &mut call).await {
                    Ok(result) => result,
                    Err(_) => {
                        // A closed channel: the engine stopped and no longer wants the answer.
                        let _ = done.send(CallEvent::Late { id }).await;
                        let give_up = timeout.saturating_mul(2);
                        match tokio::time::timeout_at(started + give_up, call).await {
                            Ok(result) => result,
                            Err(_) => Err(CallError {
                                code: REQUEST_TIMEOUT.into(),
                                message: format!("no answer within {} ms", give_up.as_millis()),
                                retry: Retry::Yes,
                            }),
                        }
                    }
                };
                let duration = started.elapsed();
                if let Err(error) = &result {
                    debug!(code = %error.code, message = %error.message, "PutRecords failed");
                }
                // The engine outlives every call it starts (it waits for them before stopping,
                // or has given up on them at the shutdown deadline): a closed channel only means
                // the answer is no longer wanted.
                let _ = done.send(CallEvent::Done(CallDone { id, result, duration })).await;
            }
            .instrument(span),
        );
    }

    /// A call passed its timeout without an answer: congestion, learned now rather than when
    /// the answer (or the give-up) comes. Its records stay with it.
    fn on_call_late(&mut self, id: u64, now: Instant) {
        let in_flight = self.in_flight.len();
        let Some(call) = self.in_flight.get_mut(&id) else {
            return;
        };
        call.late = true;
        let (sent, given) = (call.sent, call.timeout);
        bump(&self.counters.timed_out_calls, 1);
        self.apply(Outcome::TimedOut, sent, given, in_flight, now);
    }

    fn on_call_done(&mut self, done: CallDone) {
        let in_flight = self.in_flight.len();
        let Some(call) = self.in_flight.remove(&done.id) else {
            return; // given up on at the shutdown deadline
        };
        let now = Instant::now();
        self.metrics.request_time_ms.record(done.duration.as_secs_f64() * 1000.0);
        self.learn(&done, &call, in_flight, now);
        for (shard, _) in &call.entries {
            if let Some(state) = self.shards.get_mut(shard) {
                state.in_flight = false;
            }
        }
        let results: Vec<Result<(String, String), CallError>> = match done.result {
            Ok(results) => {
                let mut results: Vec<Result<(String, String), CallError>> = results
                    .into_iter()
                    .map(|r| match r {
                        EntryResult::Put { shard_id, sequence_number } => Ok((shard_id, sequence_number)),
                        EntryResult::Failed { code, message } => {
                            let retry = retry_for_entry(&code);
                            Err(CallError { code, message, retry })
                        }
                    })
                    .collect();
                // A response with fewer results than entries: the missing ones were not put.
                while results.len() < call.entries.len() {
                    results.push(Err(CallError {
                        code: "MissingResult".into(),
                        message: "the response had fewer results than the request had records".into(),
                        retry: Retry::Yes,
                    }));
                }
                results
            }
            Err(error) => vec![Err(error); call.entries.len()],
        };
        let attempt = |error: Option<&CallError>| Attempt {
            started_at: call.started_at,
            duration: done.duration,
            error_code: error.map(|e| e.code.clone()),
            error_message: error.map(|e| e.message.clone()),
        };
        // Failed records per shard, in their order, to go back to the front of the shard.
        let mut failed: Vec<(Arc<str>, Vec<Pending>, CallError)> = Vec::new();
        for ((predicted, ready), result) in call.entries.into_iter().zip(results) {
            match result {
                Ok((shard_id, sequence_number)) => {
                    if *predicted != *shard_id {
                        bump(&self.counters.mispredicted, 1);
                        self.refresh_wanted = true;
                    }
                    bump(&self.counters.kinesis_records_put, 1);
                    self.metrics.put(&shard_id, ready.members.len());
                    let aggregated = ready.members.len() > 1;
                    self.metrics.user_records_per_kinesis_record.record(ready.members.len() as f64);
                    // Shared by every user record of this Kinesis record on its first attempt.
                    let landing = Arc::new(Landing {
                        shard_id: shard_id.clone(),
                        sequence_number: sequence_number.clone(),
                        aggregated,
                        attempts: vec![attempt(None)],
                    });
                    let mut first_try = 0u64;
                    let mut members = ready.members;
                    for (index, mut member) in members.drain(..).enumerate() {
                        // Records on their first attempt (nearly all) share the call's attempt list.
                        let landing = if member.attempts.is_empty() {
                            Arc::clone(&landing)
                        } else {
                            let mut attempts = std::mem::take(&mut member.attempts);
                            attempts.push(attempt(None));
                            Arc::new(Landing {
                                shard_id: shard_id.clone(),
                                sequence_number: sequence_number.clone(),
                                aggregated,
                                attempts,
                            })
                        };
                        match landing.attempts.len() {
                            1 => first_try += 1,
                            n => self.metrics.retries_per_record.record((n - 1) as f64),
                        }
                        let outcome = PutOutcome::new(landing, index as u64);
                        self.settle(member, Ok(outcome));
                    }
                    if self.spare_members.len() < SPARE_MEMBER_LISTS {
                        self.spare_members.push(members);
                    }
                    self.metrics.retries_per_record.record_many(0.0, first_try as usize);
                }
                Err(error) => {
                    self.metrics.error(&error.code);
                    let mut members = ready.members;
                    for member in &mut members {
                        member.attempts.push(attempt(Some(&error)));
                    }
                    match failed.iter_mut().find(|(id, _, _)| *id == predicted) {
                        Some((_, list, _)) => list.extend(members),
                        None => failed.push((predicted, members, error)),
                    }
                }
            }
        }
        self.deliver();
        for (shard, members, error) in failed {
            self.retry_or_fail(&shard, members, &error, now);
        }
    }

    /// Tells the call limit how a call went; `in_flight` counts the calls in flight with it.
    fn learn(&mut self, done: &CallDone, call: &InFlight, in_flight: usize, now: Instant) {
        if call.late {
            // Its timeout already counted as congestion: the limit learns nothing more from
            // it, the latency estimate learns how late it was.
            match &done.result {
                Err(error) if error.is_timeout() => bump(&self.counters.abandoned_calls, 1),
                Err(_) => {}
                Ok(_) => {
                    bump(&self.counters.late_answers, 1);
                    let timeout = self.calls.timeout();
                    self.calls.on_late_answer(done.duration);
                    if timeout != self.calls.timeout() {
                        self.publish_limit();
                    }
                }
            }
            return;
        }
        let outcome = match &done.result {
            Err(error) if error.is_timeout() => {
                // A timeout of the SDK's own, before the engine's: the call is given up on, and
                // its records are sent again, as at the engine's give-up.
                bump(&self.counters.timed_out_calls, 1);
                bump(&self.counters.abandoned_calls, 1);
                Outcome::TimedOut
            }
            Err(error) if error.retry == Retry::Throttled => Outcome::Throttled(done.duration),
            Err(_) => Outcome::Failed,
            Ok(results) => {
                let throttled = results
                    .iter()
                    .filter(
                        |r| matches!(r, EntryResult::Failed { code, .. } if retry_for_entry(code) == Retry::Throttled),
                    )
                    .count();
                if throttled > 0 && throttled * 2 >= call.entries.len() {
                    Outcome::Throttled(done.duration)
                } else {
                    Outcome::Answered(done.duration)
                }
            }
        };
        self.apply(outcome, call.sent, call.timeout, in_flight, now);
    }

    /// Moves the call limit and the timeout with one outcome; a decrease sends what was admitted
    /// but not sent back to the backlogs.
    fn apply(&mut self, outcome: Outcome, sent: Instant, given: Duration, in_flight: usize, now: Instant) {
        let (limit, timeout) = (self.calls.limit(), self.calls.timeout());
        let change = self.calls.on_answer(outcome, sent, given, in_flight, now);
        if change != Change::Unchanged || timeout != self.calls.timeout() {
            debug!(
                stream = %self.stream,
                ?outcome,
                limit_before = limit,
                limit = self.calls.limit(),
                timeout_ms = self.calls.timeout().as_millis() as u64,
                "PutRecords concurrency"
            );
            self.publish_limit();
        }
        if change == Change::Decreased {
            // What was admitted under the old limit would wait for calls that no longer go out
            // at once: back to the backlogs, to be admitted again within the new windows.
            for state in self.shards.values_mut() {
                state.unadmit_unsent();
            }
        }
    }

    /// Records of a failed entry: fail them if retrying cannot help or would outlive their TTL;
    /// otherwise put them back at the front of their shard, which backs off.
    fn retry_or_fail(&mut self, shard: &Arc<str>, members: Vec<Pending>, error: &CallError, now: Instant) {
        if error.retry == Retry::Throttled {
            bump(&self.counters.throttled, members.len() as u64);
        }
        let attempts = members.iter().map(|m| m.attempts.len()).max().unwrap_or(1);
        let delay = ktk_backoff::delay(
            u32::try_from(attempts).unwrap_or(u32::MAX),
            self.config.min_backoff,
            self.config.max_backoff,
        );
        let retry_at = now + delay;
        let mut keep = Vec::new();
        for member in members {
            let outcome = match error.retry {
                Retry::No => Some(PutErrorKind::Rejected { code: error.code.clone(), message: error.message.clone() }),
                Retry::Throttled if self.config.fail_if_throttled => Some(PutErrorKind::Throttled),
                _ if member.expired_by(self.config.record_ttl, retry_at) => Some(PutErrorKind::Expired),
                _ => None,
            };
            match outcome {
                Some(kind) => {
                    if kind == PutErrorKind::Expired {
                        bump(&self.counters.user_records_expired, 1);
                        self.metrics.user_record_expired.increment(1);
                    }
                    self.resolve(member, Err(kind));
                }
                None => keep.push(member),
            }
        }
        if keep.is_empty() {
            return;
        }
        bump(&self.counters.retries, keep.len() as u64);
        if error.is_timeout() {
            // The call may have been written: these may end up in the stream twice.
            bump(&self.counters.resent_after_timeout, keep.len() as u64);
        }
        let Some(state) = self.shards.get_mut(shard) else {
            for member in keep {
                self.route(member, now);
            }
            return;
        };
        state.requeue_front(keep, retry_at);
        debug!(shard = %shard, code = %error.code, delay_ms = delay.as_millis() as u64, "shard backs off");
    }

    fn maybe_refresh(&mut self, now: Instant) {
        if !self.refresh_wanted || self.refreshing {
            return;
        }
        if now < self.last_refresh + self.config.shard_map_min_refresh_interval {
            return;
        }
        self.refreshing = true;
        self.refresh_wanted = false;
        self.last_refresh = now;
        let api = Arc::clone(&self.api);
        let stream = Arc::clone(&self.stream);
        let tx = self.refresh_tx.clone();
        let timeout = self.config.request_timeout;
        tokio::spawn(async move {
            let listing = with_timeout(timeout * 2, api.list_shards(&stream)).await;
            let _ = tx.send(listing).await;
        });
    }

    fn on_refresh(&mut self, listing: Result<Vec<ShardInfo>, CallError>) {
        self.refreshing = false;
        let now = Instant::now();
        match listing {
            Ok(shards) => {
                bump(&self.counters.shard_map_refreshes, 1);
                let map = ShardMap::new(&shards);
                if map.is_empty() {
                    warn!(stream = %self.stream, "ListShards returned no open shard; keeping the old shard map");
                    self.refresh_wanted = true;
                    return;
                }
                if !map.same_as(&self.map) {
                    debug!(stream = %self.stream, shards = map.len(), "shard map changed");
                    self.install_map(map, now);
                }
            }
            Err(error) => {
                warn!(stream = %self.stream, code = %error.code, message = %error.message, "ListShards failed; will retry");
                self.refresh_wanted = true;
            }
        }
    }

    /// Switches to a new shard map; records buffered for shards that are gone are routed again.
    fn install_map(&mut self, map: ShardMap, now: Instant) {
        self.map = map;
        self.window = Window::new(&self.config, self.calls.limit(), self.map.len());
        let ids: Vec<Arc<str>> = self.map.ids().cloned().collect();
        for id in ids {
            self.state_for(id, now);
        }
        let gone: Vec<Arc<str>> = self.shards.keys().filter(|id| !self.map.contains(id)).cloned().collect();
        for id in gone {
            let unsent = match self.shards.get_mut(&id) {
                Some(state) => state.drain_unsent(),
                None => continue,
            };
            for pending in unsent {
                self.route(pending, now);
            }
        }
    }

    fn drop_idle_closed_shards(&mut self) {
        let map = &self.map;
        let before = self.shards.len();
        self.shards.retain(|id, state| map.contains(id) || !state.is_idle());
        if self.shards.len() != before {
            let shards = &self.shards;
            self.order.retain(|id| shards.contains_key(id));
            self.cursor = 0;
        }
    }

    /// The next moment something becomes due.
    fn next_wake(&self) -> Option<Instant> {
        let buffered_time = self.config.record_max_buffered_time;
        // With every connection busy, nothing can be sent before a call returns, which wakes the
        // loop anyway; due records must not make it spin meanwhile.
        let can_send = self.in_flight.len() < self.calls.limit();
        let mut wake: Option<Instant> = None;
        let mut consider = |t: Instant| wake = Some(wake.map_or(t, |w| w.min(t)));
        for state in self.shards.values() {
            if let Some(since) = state.aggregating_since {
                consider(since + buffered_time);
            }
            if let Some(until) = state.blocked_until {
                consider(until);
            } else if can_send
                && !state.in_flight
                && let Some(front) = state.ready.front()
            {
                let due = if state.ready_bytes >= SHARD_EARLY_FLUSH_BYTES || !state.backlog.is_empty() {
                    Instant::now()
                } else {
                    front.due
                };
                consider(state.limited_until.map_or(due, |t| t.max(due)));
            }
        }
        if let Some((deadline, _)) = &self.shutdown {
            consider(*deadline);
        }
        if self.refresh_wanted && !self.refreshing {
            consider(self.last_refresh + self.config.shard_map_min_refresh_interval);
        }
        wake
    }
}

async fn sleep_until(wake: Option<Instant>) {
    match wake {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
