//! The handle applications hold: `put`, `try_put`, `flush`, `shutdown`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use aws_config::SdkConfig;
use ktk_proto::aggregation::{InvalidRecord, UserRecord};
use ktk_proto::keys::partition_key_hash;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::api::{AwsKinesis, KinesisApi, Retry};
use crate::config::ProducerConfig;
use crate::engine::{Command, Counters, Engine, Pending, Reply};
use crate::error::{PutError, PutErrorKind, StartError};
use crate::limits::{Limits, NoRoom};
use crate::record::{BatchReceipt, BatchSlot, PutReceipt, Record};

/// A KPL-style producer for one stream. Cheap to clone; every clone feeds the same engine.
///
/// ```no_run
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// use ktk_producer::{Producer, ProducerConfig, Record};
/// let aws = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
/// let producer = Producer::new(ProducerConfig::new("events"), &aws).await?;
/// let receipt = producer.put(Record::new("user-42", "play")).await?;
/// let outcome = receipt.await?;
/// println!("{} {} {}", outcome.shard_id(), outcome.sequence_number(), outcome.sub_sequence_number());
/// producer.shutdown(std::time::Duration::from_secs(10)).await;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Producer {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: Arc<ProducerConfig>,
    commands: mpsc::UnboundedSender<Command>,
    limits: Arc<Limits>,
    counters: Arc<Counters>,
}

/// What the producer has done so far (also exported as metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProducerStats {
    pub user_records_received: u64,
    pub user_records_put: u64,
    pub user_records_failed: u64,
    pub user_records_expired: u64,
    pub kinesis_records_put: u64,
    pub put_records_calls: u64,
    /// User records sent again after a failed attempt.
    pub retries: u64,
    /// User records throttled by Kinesis (each attempt counts).
    pub throttled: u64,
    pub shard_map_refreshes: u64,
    /// Kinesis records that landed on another shard than predicted (each triggers a refresh).
    pub mispredicted: u64,
    /// `PutRecords` calls that got no answer within their timeout. Each counts as congestion;
    /// the producer keeps waiting for its answer, up to twice its timeout.
    pub timed_out_calls: u64,
    /// Timed-out calls whose answer came before twice their timeout: their records were settled
    /// by the answer, not sent again.
    pub late_answers: u64,
    /// Timed-out calls given up on at twice their timeout: their records were sent again.
    pub abandoned_calls: u64,
    /// User records sent again after a call carrying them was given up on. Such a call may have
    /// been written, so this is how many user records may be in the stream twice (at-least-once;
    /// the consumer pipeline drops the copies by event id).
    pub resent_after_timeout: u64,
    /// `PutRecords` calls that may be in flight now (the adaptive limit, at most
    /// `max_connections`).
    pub concurrency_limit: u64,
    /// The timeout the next `PutRecords` call gets, in milliseconds (from `request_timeout` up
    /// to `max_request_timeout`).
    pub request_timeout_ms: u64,
}

impl ProducerStats {
    /// Average user records per Kinesis record: the aggregation factor.
    pub fn user_records_per_kinesis_record(&self) -> f64 {
        if self.kinesis_records_put == 0 { 0.0 } else { self.user_records_put as f64 / self.kinesis_records_put as f64 }
    }
}

/// What [`Producer::try_put_batch`] did with a batch at once.
#[derive(Debug)]
#[must_use = "the receipt says whether the records taken were put"]
pub struct BatchTaken {
    /// Resolves to one result per record taken, in the order of `taken`.
    pub receipt: BatchReceipt,
    /// Positions in the batch of the records taken, in order.
    pub taken: Vec<usize>,
    /// Records handed back at once, with their positions in the batch, in order.
    pub refused: Vec<(usize, PutError)>,
}

impl Producer {
    /// A producer for the stream in `config`, talking to Kinesis with clients built from `aws`
    /// (the standard configuration chain). Fails fast if the settings are invalid or the stream
    /// cannot be listed.
    pub async fn new(config: ProducerConfig, aws: &SdkConfig) -> Result<Self, StartError> {
        Self::with_api(config, AwsKinesis::new(aws).into_arc()).await
    }

    /// A producer over any [`KinesisApi`] (a fake in tests, a no-op sink in benchmarks).
    pub async fn with_api(config: ProducerConfig, api: Arc<dyn KinesisApi>) -> Result<Self, StartError> {
        config.validate()?;
        let shards = api.list_shards(&config.stream).await.map_err(|e| StartError::Stream {
            stream: config.stream.clone(),
            message: match e.retry {
                Retry::No => format!("{}: {} (check the stream name, region and permissions)", e.code, e.message),
                _ => format!("{}: {}", e.code, e.message),
            },
        })?;
        if !shards.iter().any(|s| s.open) {
            return Err(StartError::Stream { stream: config.stream.clone(), message: "it has no open shard".into() });
        }
        let config = Arc::new(config);
        let (commands, receiver) = mpsc::unbounded_channel();
        let counters = Arc::new(Counters::default());
        let limits = Arc::new(Limits::new(config.max_outstanding_records, config.max_outstanding_bytes));
        let engine =
            Engine::new(Arc::clone(&config), api, &shards, receiver, Arc::clone(&counters), Arc::clone(&limits));
        tokio::spawn(engine.run());
        Ok(Producer { inner: Arc::new(Inner { limits, config, commands, counters }) })
    }

    pub fn config(&self) -> &ProducerConfig {
        &self.inner.config
    }

    /// Accepts a record, waiting (up to the put timeout) while the producer is at its outstanding
    /// limit. The receipt resolves once Kinesis has the record or it has failed. Records put by
    /// one caller are sent in order per shard.
    pub async fn put(&self, record: Record) -> Result<PutReceipt, PutError> {
        let (user, size) = self.check(record)?;
        match self.inner.limits.take(size, self.inner.config.put_timeout).await {
            Ok(()) => self.submit(user),
            Err(no_room) => Err(rejected(no_room_kind(no_room), user)),
        }
    }

    /// Accepts a record only if there is room now; otherwise hands it back at once with
    /// [`PutErrorKind::Full`].
    pub fn try_put(&self, record: Record) -> Result<PutReceipt, PutError> {
        let (user, size) = self.check(record)?;
        match self.inner.limits.try_take(size) {
            Ok(()) => self.submit(user),
            Err(no_room) => Err(rejected(no_room_kind(no_room), user)),
        }
    }

    /// Accepts a batch of records at once: one hand-off and one receipt for the batch, which
    /// resolves to one result per record in the order given (the cheap way to put many records;
    /// the collector puts each request's events this way). Invalid records fail alone; the
    /// others are put in order. Waits up to the put timeout for room for the whole batch, and
    /// takes room record by record if the batch is larger than the limits.
    pub async fn put_batch(&self, records: Vec<Record>) -> BatchReceipt {
        let (slot, done) = BatchSlot::new(records.len());
        let now = Instant::now();
        // Checked, hashed and made pending in one pass: the records are touched once here.
        let mut batch: Vec<Pending> = Vec::with_capacity(records.len());
        let mut bytes = 0;
        HASH_CACHE.with(|cache| {
            let mut cache = cache.borrow_mut();
            for (index, record) in records.into_iter().enumerate() {
                match self.check(record) {
                    Ok((user, size)) => {
                        bytes += size;
                        let hash_key = hash_key_in(&mut cache, &user);
                        batch.push(Pending::new(user, hash_key, Reply::Batch(Arc::clone(&slot), index), now));
                    }
                    Err(error) => slot.set(index, Err(error)),
                }
            }
        });
        let limits = &self.inner.limits;
        let timeout = self.inner.config.put_timeout;
        if limits.could_fit(batch.len(), bytes) {
            match limits.take_many(batch.len(), bytes, timeout).await {
                Ok(()) => self.send_batch(batch),
                Err(no_room) => batch.into_iter().for_each(|pending| pending.refuse(no_room_kind(no_room))),
            }
        } else {
            // Larger than the limits: room record by record, handing over what has room before
            // waiting, so the engine can put it and free room for the rest.
            let mut chunk = Vec::new();
            for pending in batch {
                let size = pending.size();
                let room = match limits.try_take(size) {
                    Err(NoRoom::Full) => {
                        self.send_batch(std::mem::take(&mut chunk));
                        limits.take(size, timeout).await
                    }
                    other => other,
                };
                match room {
                    Ok(()) => chunk.push(pending),
                    Err(no_room) => pending.refuse(no_room_kind(no_room)),
                }
            }
            self.send_batch(chunk);
        }
        BatchReceipt::new(slot, done)
    }

    /// Like [`put_batch`](Self::put_batch), but never waits: takes the records in order while
    /// there is room, and hands back at once, with [`PutErrorKind::Full`] (or `ShutDown`), the
    /// first record that finds none and every valid record after it, so that a record is never
    /// taken after an earlier one of the same batch was turned away (order per key holds when
    /// the caller sends the refused ones again). Invalid records come back alone, as in
    /// `put_batch`. The receipt resolves to one result per record taken.
    pub fn try_put_batch(&self, records: Vec<Record>) -> BatchTaken {
        let now = Instant::now();
        let mut refused: Vec<(usize, PutError)> = Vec::new();
        let mut valid: Vec<(usize, UserRecord, usize)> = Vec::with_capacity(records.len());
        let mut bytes = 0;
        for (index, record) in records.into_iter().enumerate() {
            match self.check(record) {
                Ok((user, size)) => {
                    bytes += size;
                    valid.push((index, user, size));
                }
                Err(error) => refused.push((index, error)),
            }
        }
        let limits = &self.inner.limits;
        // Room for the whole batch in one step, or else record by record up to the first refusal.
        let room = limits.try_take_many(valid.len(), bytes);
        let mut no_room: Option<NoRoom> = None;
        let mut taken_users = Vec::with_capacity(valid.len());
        for (index, user, size) in valid {
            if room.is_err()
                && no_room.is_none()
                && let Err(refusal) = limits.try_take(size)
            {
                no_room = Some(refusal);
            }
            match no_room {
                Some(refusal) => refused.push((index, rejected(no_room_kind(refusal), user))),
                None => taken_users.push((index, user)),
            }
        }
        refused.sort_by_key(|(index, _)| *index);
        let (slot, done) = BatchSlot::new(taken_users.len());
        let mut taken = Vec::with_capacity(taken_users.len());
        let mut batch = Vec::with_capacity(taken_users.len());
        HASH_CACHE.with(|cache| {
            let mut cache = cache.borrow_mut();
            for (position, (index, user)) in taken_users.into_iter().enumerate() {
                let hash_key = hash_key_in(&mut cache, &user);
                batch.push(Pending::new(user, hash_key, Reply::Batch(Arc::clone(&slot), position), now));
                taken.push(index);
            }
        });
        self.send_batch(batch);
        BatchTaken { receipt: BatchReceipt::new(slot, done), taken, refused }
    }

    fn send_batch(&self, batch: Vec<Pending>) {
        if !batch.is_empty() {
            // If the engine is gone, dropping the records answers them with `ShutDown`.
            let _ = self.inner.commands.send(Command::PutBatch(batch));
        }
    }

    /// Sends everything buffered now and resolves when every record accepted before this call
    /// has been put or has failed.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.inner.commands.send(Command::Flush(done)).is_ok() {
            let _ = wait.await;
        }
    }

    /// Stops accepting records (new puts fail with `ShutDown`), sends everything buffered, and
    /// resolves when all of it is acknowledged or failed, or at `timeout`, when whatever is left
    /// fails with `ShutDown` and its record. No receipt is left pending.
    pub async fn shutdown(&self, timeout: Duration) -> ProducerStats {
        self.inner.limits.close();
        let (done, wait) = oneshot::channel();
        let deadline = Instant::now() + timeout;
        if self.inner.commands.send(Command::Shutdown { deadline, done }).is_ok() {
            // The engine answers at the deadline at the latest; the margin covers a stalled
            // runtime, so that shutdown itself always returns.
            let _ = tokio::time::timeout(timeout + Duration::from_secs(5), wait).await;
        }
        self.stats()
    }

    pub fn stats(&self) -> ProducerStats {
        let c = &self.inner.counters;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        ProducerStats {
            user_records_received: get(&c.user_records_received),
            user_records_put: get(&c.user_records_put),
            user_records_failed: get(&c.user_records_failed),
            user_records_expired: get(&c.user_records_expired),
            kinesis_records_put: get(&c.kinesis_records_put),
            put_records_calls: get(&c.put_records_calls),
            retries: get(&c.retries),
            throttled: get(&c.throttled),
            shard_map_refreshes: get(&c.shard_map_refreshes),
            mispredicted: get(&c.mispredicted),
            timed_out_calls: get(&c.timed_out_calls),
            late_answers: get(&c.late_answers),
            abandoned_calls: get(&c.abandoned_calls),
            resent_after_timeout: get(&c.resent_after_timeout),
            concurrency_limit: get(&c.concurrency_limit),
            request_timeout_ms: get(&c.request_timeout_ms),
        }
    }

    /// Validates keys and size; the error carries the record back.
    fn check(&self, record: Record) -> Result<(UserRecord, usize), PutError> {
        let size = record.size();
        let max = self.inner.config.max_record_size;
        if size > max {
            return Err(PutError::new(PutErrorKind::TooLarge { size, max }, record, Vec::new()));
        }
        let Record { partition_key, explicit_hash_key, data } = record;
        match UserRecord::from_parts(partition_key, explicit_hash_key, data) {
            Ok(user) => Ok((user, size)),
            Err(invalid) => {
                let InvalidRecord { error, partition_key, explicit_hash_key, data } = *invalid;
                let record = Record { partition_key, explicit_hash_key, data };
                Err(PutError::new(PutErrorKind::InvalidRecord(error), record, Vec::new()))
            }
        }
    }

    fn submit(&self, user: UserRecord) -> Result<PutReceipt, PutError> {
        let hash_key = HASH_CACHE.with(|cache| hash_key_in(&mut cache.borrow_mut(), &user));
        let (reply, receipt) = oneshot::channel();
        let pending = Pending::new(user, hash_key, Reply::One(reply), Instant::now());
        // If the engine is gone, the command comes back and dropping its record answers the
        // receipt with `ShutDown` and the record (see `Pending`'s drop), so nothing is lost.
        let _ = self.inner.commands.send(Command::Put(pending));
        Ok(PutReceipt::new(receipt))
    }
}

/// Partition keys this thread hashed lately, at most this many.
const HASH_CACHE_ENTRIES: usize = 4096;

type HashCache = HashMap<String, u128, foldhash::fast::FixedState>;

thread_local! {
    /// Recently hashed partition keys: applications put many records per key (a user, a
    /// device), and a lookup costs a fraction of an MD5. Per thread, so callers never contend.
    static HASH_CACHE: std::cell::RefCell<HashCache> = std::cell::RefCell::new(HashMap::default());
}

/// The record's hash key: its explicit hash key, or the MD5 of its partition key, remembered in
/// `cache` for recently seen keys.
fn hash_key_in(cache: &mut HashCache, user: &UserRecord) -> u128 {
    match user.explicit_hash_key() {
        Some(_) => user.hash_key(),
        None => cached_partition_key_hash_in(cache, user.partition_key()),
    }
}

/// MD5 of the partition key as Kinesis computes it, remembered for recently seen keys.
fn cached_partition_key_hash_in(cache: &mut HashCache, partition_key: &str) -> u128 {
    if let Some(hash) = cache.get(partition_key) {
        return *hash;
    }
    let hash = partition_key_hash(partition_key);
    if cache.len() >= HASH_CACHE_ENTRIES {
        // Crude but bounded: start over. Hot keys are back after one miss each.
        cache.clear();
    }
    cache.insert(partition_key.to_owned(), hash);
    hash
}

#[cfg(test)]
fn cached_partition_key_hash(partition_key: &str) -> u128 {
    HASH_CACHE.with(|cache| cached_partition_key_hash_in(&mut cache.borrow_mut(), partition_key))
}

fn no_room_kind(no_room: NoRoom) -> PutErrorKind {
    match no_room {
        NoRoom::Full => PutErrorKind::Full,
        NoRoom::Timeout => PutErrorKind::Timeout,
        NoRoom::Closed => PutErrorKind::ShutDown { in_flight: false },
    }
}

fn rejected(kind: PutErrorKind, user: UserRecord) -> PutError {
    let (partition_key, explicit_hash_key, data) = user.into_parts();
    PutError::new(kind, Record { partition_key, explicit_hash_key, data }, Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_cache_agrees_with_md5_and_stays_bounded() {
        for i in 0..(HASH_CACHE_ENTRIES * 2 + 10) {
            let key = format!("key-{i}");
            assert_eq!(cached_partition_key_hash(&key), partition_key_hash(&key));
            assert_eq!(cached_partition_key_hash(&key), partition_key_hash(&key), "cached value");
        }
        HASH_CACHE.with(|cache| assert!(cache.borrow().len() <= HASH_CACHE_ENTRIES));
    }
}
