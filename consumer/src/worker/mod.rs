//! The worker: one per process (an ECS task), many per application. It keeps the lease table in
//! step with the stream's shards, takes its share of leases, renews them, and runs one task per
//! lease that reads the shard and feeds the application's [`RecordProcessor`](crate::RecordProcessor).
//!
//! The loops and their timings are documented on [`Worker`], the part of this module applications
//! see.

mod balance;
mod config;
mod shard_consumer;
mod status;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use aws_config::SdkConfig;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use config::WorkerConfig;
pub use status::{CallHealth, WorkerSnapshot, WorkerStatus};

use crate::error::{Error, Result};
use crate::lease::taker::{LeaseTaker, TakePlan, TakerConfig};
use crate::lease::{Lease, LeaseRenewer, LeaseTable, ShardSyncer, TableCalls};
use crate::processor::ProcessorFactory;
use crate::retrieval::kinesis::KinesisReads;
use crate::retrieval::{FanOutConfig, ReaderConfig, register_consumer};
use balance::{BalanceSchedule, EarlyReason};
use ktk_backoff::Backoff;
use shard_consumer::{Ending, ShardContext};

/// What a worker did, returned when it stops.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerReport {
    /// Leases taken (unowned, expired, or completed hand-offs).
    pub leases_taken: u64,
    /// Hand-offs this worker asked other workers for.
    pub handoffs_requested: u64,
    /// Leases lost to other workers.
    pub leases_lost: u64,
    /// Shards this worker read to their end.
    pub shards_ended: u64,
    /// Leases released (hand-offs and the final shutdown).
    pub leases_released: u64,
    /// Lease renewals written.
    pub renewals: u64,
    /// Renewals skipped because a checkpoint had just moved the lease's counter.
    pub renewals_skipped: u64,
    /// DynamoDB item calls this worker made.
    pub table_calls: TableCalls,
}

/// A worker. Build it, then [`run`](Worker::run) it until its shutdown token is cancelled.
///
/// # Loops and their timings
/// | loop | default | KCL setting it matches |
/// | --- | --- | --- |
/// | renew held leases | failover time / 3 − 25 ms (3,308 ms); skipped for a lease checkpointed in the last half interval | `leaseRenewalIntervalMillis` (derived the same way; the KCL always renews) |
/// | lease expiry | 10 s without a counter change, on the local monotonic clock | `failoverTimeMillis` |
/// | balance (steal from workers above their share) | (failover time + 25 ms) × 2 (20,050 ms); at start; at the next scan when a new worker appears or a round lost a race, at least 1 s apart | `takerIntervalMillis` |
/// | shard sync (`ListShards`) | 60 s, and at once when a shard of this worker ends | `shardSyncIntervalMillis` |
/// | parent shard poll | 10 s, and at once when a parent on this worker ends | `parentShardPollIntervalMillis` |
/// | idle time between reads | 1,500 ms, only when caught up (the KCL waits before every read) | `idleTimeBetweenReadsInMillis` |
/// | read-ahead | the next batch read while the processor works, one per shard (polling) | `PrefetchRecordsPublisher` (up to `maxPendingProcessRecordsInput` = 3) |
/// | lease discovery (scan) | 1 s; every 250 ms while hand-offs to this worker wait for their release | none (ktk's own) |
///
/// Lease discovery is where ktk departs from the KCL: every second the worker scans the table
/// (one eventually-billed read per 4 KB, about 30 leases) and takes unowned and expired leases
/// at once, so a gracefully released lease is picked up within about a second, and a crashed
/// worker's leases within the failover time plus a second, not a whole taking interval later.
/// Balancing steals happen when the worker starts, every taking interval, and at the next scan
/// after one that shows a new worker in the table or a round that lost a race for a lease (workers
/// started together), never closer than the minimum balance interval (1 s): a rolling deploy or a
/// scale-out shares the shards within seconds, not a taking interval later. Each round asks for as
/// many leases as the worker is short of its share (bounded by `max_leases_to_steal_at_once`),
/// only from workers above their share, and by hand-off: the owner finishes its batch and
/// checkpoints before the thief starts, so moving a lease processes nothing twice.
#[derive(Debug)]
pub struct Worker<F> {
    config: WorkerConfig,
    /// `ListShards`, `GetShardIterator` and `GetRecords`.
    kinesis: Arc<dyn KinesisReads>,
    /// Enhanced fan-out registration and subscriptions (`None` in unit tests, which poll).
    fan_out_client: Option<aws_sdk_kinesis::Client>,
    table: LeaseTable,
    factory: Arc<F>,
    status: WorkerStatus,
}

impl<F: ProcessorFactory> Worker<F> {
    /// A worker with clients from the standard AWS configuration. The Kinesis client has the SDK's
    /// retries turned off: every Kinesis call the worker makes is already repeated by its own loops
    /// (reads back off and read again, shard sync runs again, fan-out subscribes again), and one
    /// retry layer must not stack on another.
    pub fn new(config: WorkerConfig, sdk: &SdkConfig, factory: F) -> Result<Self> {
        let kinesis = aws_sdk_kinesis::Client::from_conf(
            aws_sdk_kinesis::config::Builder::from(sdk)
                .retry_config(aws_sdk_kinesis::config::retry::RetryConfig::disabled())
                .build(),
        );
        let table = LeaseTable::new(sdk, config.table_name.clone());
        Worker::from_clients(config, kinesis, table, factory)
    }

    /// A worker with the given clients.
    pub fn from_clients(
        config: WorkerConfig,
        kinesis: aws_sdk_kinesis::Client,
        table: LeaseTable,
        factory: F,
    ) -> Result<Self> {
        config.validate()?;
        Ok(Worker {
            config,
            kinesis: Arc::new(kinesis.clone()),
            fan_out_client: Some(kinesis),
            table,
            factory: Arc::new(factory),
            status: WorkerStatus::new(),
        })
    }

    /// A worker that reads through `kinesis` (a fake, in unit tests) and polls.
    #[cfg(test)]
    pub(crate) fn with_api(
        config: WorkerConfig,
        kinesis: Arc<dyn KinesisReads>,
        table: LeaseTable,
        factory: F,
    ) -> Result<Self> {
        config.validate()?;
        Ok(Worker {
            config,
            kinesis,
            fan_out_client: None,
            table,
            factory: Arc::new(factory),
            status: WorkerStatus::new(),
        })
    }

    pub fn config(&self) -> &WorkerConfig {
        &self.config
    }

    /// The worker's live status (leases held and seen, the latest lease-table scan, the outcome
    /// of its Kinesis calls), for a health check: take it before [`run`](Self::run) and read
    /// [`WorkerStatus::snapshot`] while the worker runs.
    pub fn status(&self) -> WorkerStatus {
        self.status.clone()
    }

    /// Runs until `shutdown` is cancelled, then shuts down gracefully: no more leases are taken,
    /// each shard's processor finishes its batch and may checkpoint
    /// ([`shutdown_requested`](crate::processor::RecordProcessor::shutdown_requested)), and every
    /// lease is released so other workers take the shards at once. Fails only on what retrying
    /// cannot mend: the lease table cannot be created or used, or the stream cannot be read.
    pub async fn run(self, shutdown: CancellationToken) -> Result<WorkerReport> {
        let config = &self.config;
        let worker = config.worker_id.clone();
        info!(stream = %config.stream, table = %config.table_name, worker, "worker starting");
        self.table.ensure_table().await?;
        let syncer = ShardSyncer::with_api(
            Arc::clone(&self.kinesis),
            config.stream.clone(),
            self.table.clone(),
            config.initial_position,
        );
        let mut backoff = Backoff::new(config.retry_min, config.retry_max);
        // The first sync must work (it says whether the stream is there at all).
        let status = &self.status;
        loop {
            let synced = syncer.sync().await;
            observe_sync(status, &synced);
            match synced {
                Ok(_) => break,
                Err(error) if error.is_retryable() => {
                    warn!(stream = %config.stream, %error, "shard sync failed; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => return Ok(WorkerReport { table_calls: self.table.calls(), ..WorkerReport::default() }),
                        () = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                }
                Err(error @ Error::ListShards { .. }) => {
                    return Err(Error::Stream { stream: config.stream.clone(), message: error.to_string() });
                }
                Err(error) => return Err(error),
            }
        }

        let fan_out = match &config.fan_out {
            None => None,
            Some(name) => loop {
                let Some(client) = &self.fan_out_client else {
                    return Err(Error::Config {
                        setting: "enhanced_fan_out",
                        problem: "this worker has no Kinesis client for fan-out".into(),
                    });
                };
                match register_consumer(client, &config.stream, name).await {
                    Ok(consumer) => {
                        info!(stream = %config.stream, consumer = %consumer.consumer_arn, "reading with enhanced fan-out");
                        break Some(consumer.consumer_arn);
                    }
                    Err(error) if error.is_retryable() => {
                        warn!(stream = %config.stream, %error, "registering the stream consumer failed; retrying");
                        tokio::select! {
                            () = shutdown.cancelled() => return Ok(WorkerReport { table_calls: self.table.calls(), ..WorkerReport::default() }),
                            () = tokio::time::sleep(backoff.next_delay()) => {}
                        }
                    }
                    Err(error) => {
                        return Err(Error::Registration(error));
                    }
                }
            },
        };
        let renewer = Arc::new(
            LeaseRenewer::new(self.table.clone(), config.failover_time)
                .with_renewal_skipped_after_writes_within(config.renew_interval() / 2),
        );
        let shard_shutdown = CancellationToken::new();
        let shard_ended = Arc::new(Notify::new());
        let ctx = Arc::new(ShardContext {
            stream: config.stream.clone(),
            kinesis: Arc::clone(&self.kinesis),
            table: self.table.clone(),
            renewer: Arc::clone(&renewer),
            reader: ReaderConfig::default()
                .with_max_records(config.max_records)
                .with_shard_range_filter(config.shard_range_filter),
            fan_out: match (fan_out, &self.fan_out_client) {
                (Some(arn), Some(client)) => Some((
                    client.clone(),
                    arn,
                    FanOutConfig::default().with_shard_range_filter(config.shard_range_filter),
                )),
                _ => None,
            },
            initial_timestamp: config.initial_timestamp,
            parent_poll_interval: config.parent_poll_interval,
            idle_time_between_reads: config.idle_time_between_reads,
            empty_batches: config.empty_batches,
            read_ahead: config.read_ahead,
            retry_min: config.retry_min,
            retry_max: config.retry_max,
            shutdown: shard_shutdown.clone(),
            shard_ended: Arc::clone(&shard_ended),
            status: status.clone(),
        });

        // Renewals run on their own so a slow scan or sync never delays them. The task lives in a
        // JoinSet so that it stops with this future if the future is dropped instead of shut down:
        // a renewal task that outlived its worker would keep the leases alive with nobody
        // processing them.
        let renewals_stop = CancellationToken::new();
        let mut renewals = JoinSet::new();
        renewals.spawn(renew_loop(
            Arc::clone(&renewer),
            config.renew_interval(),
            renewals_stop.clone(),
            config.stream.clone(),
            status.clone(),
        ));

        let mut state = Loop {
            config,
            table: &self.table,
            taker: LeaseTaker::new(
                worker.clone(),
                TakerConfig::default()
                    .with_failover_time(config.failover_time)
                    .with_max_leases_per_worker(config.max_leases_per_worker)
                    .with_max_leases_to_steal_at_once(config.max_leases_to_steal_at_once),
            ),
            renewer: &renewer,
            running: HashSet::new(),
            task_shards: HashMap::new(),
            tasks: JoinSet::new(),
            report: WorkerReport::default(),
            labels: vec![("stream", config.stream.clone()), ("worker", worker.clone())],
            status: status.clone(),
        };
        let mut next_sync = Instant::now() + config.shard_sync_interval;
        // The first round balances at once (a worker that joins a group asks for its share right
        // away), then every taking interval, and early when a scan shows a new worker or a round
        // acted on a stale view (balance.rs).
        let mut balancing = BalanceSchedule::new(Instant::now(), config.taking_interval(), config.min_balance_interval);
        let mut discovery = tokio::time::interval(config.discovery_interval);
        discovery.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // While hand-offs to this worker wait for their owners to release, it scans four times as
        // often, to start each lease as soon as it is released.
        let mut handoff_scan: Option<Instant> = None;
        let mut sync_now = false;

        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = shard_ended.notified() => sync_now = true,
                _ = discovery.tick() => {}
                () = sleep_until_some(handoff_scan) => {}
                Some(joined) = state.tasks.join_next_with_id() => {
                    state.reap(joined);
                    continue;
                }
            }
            let now = Instant::now();
            if sync_now || now >= next_sync {
                sync_now = false;
                next_sync = now + config.shard_sync_interval;
                let synced = syncer.sync().await;
                observe_sync(status, &synced);
                match synced {
                    Ok(report) if !report.orphaned.is_empty() => {
                        warn!(stream = %config.stream, orphaned = ?report.orphaned, "leases of shards no longer in the stream were never finished (their records expired unprocessed)");
                    }
                    Ok(_) => {}
                    Err(error) => warn!(stream = %config.stream, %error, "shard sync failed; trying again later"),
                }
            }
            let balance = balancing.is_due(now);
            match state.take_leases(balance, &ctx, &self.factory).await {
                Ok(round) => {
                    handoff_scan = (round.incoming > 0).then(|| Instant::now() + config.discovery_interval / 4);
                    if let Some(EarlyReason::NewWorkers(new)) = balancing.scanned(now, balance, round.live, round.raced)
                    {
                        info!(stream = %config.stream, worker, new = ?new, "new workers in the lease table; balancing at the next scan");
                    }
                }
                Err(error) => {
                    handoff_scan = None;
                    balancing.failed(now, balance);
                    warn!(stream = %config.stream, %error, "lease taking failed; trying again next round");
                }
            }
        }

        // Graceful shutdown: the shard tasks finish their batch, checkpoint if their processor
        // does, and release their own lease; whatever is left is released below.
        info!(stream = %config.stream, worker, leases = state.running.len(), "worker shutting down");
        shard_shutdown.cancel();
        let deadline = Instant::now() + config.shutdown_timeout;
        while !state.tasks.is_empty() {
            match tokio::time::timeout_at(deadline, state.tasks.join_next_with_id()).await {
                Ok(Some(joined)) => state.reap(joined),
                Ok(None) => break,
                Err(_) => {
                    warn!(stream = %config.stream, tasks = state.tasks.len(), "shard tasks did not finish in the shutdown timeout; abandoning their batches");
                    state.tasks.abort_all();
                    while state.tasks.join_next_with_id().await.is_some() {}
                    break;
                }
            }
        }
        let released = renewer.release_all().await;
        state.report.leases_released += released.len() as u64;
        state.report.leases_released += state.release_incoming(deadline).await;
        renewals_stop.cancel();
        match renewals.join_next().await.unwrap_or(Ok((0, 0))) {
            Ok((renewed, skipped)) => {
                state.report.renewals = renewed;
                state.report.renewals_skipped = skipped;
            }
            Err(error) => warn!(%error, "the renewal task failed"),
        }
        let mut report = state.report;
        report.table_calls = self.table.calls();
        info!(stream = %config.stream, worker, ?report, "worker stopped");
        Ok(report)
    }
}

/// Records a shard sync's `ListShards` in the status: a sync that got past it heard from
/// Kinesis; one that failed on it did not (a sync that failed on the lease table says nothing
/// about the stream).
fn observe_sync<T>(status: &WorkerStatus, synced: &Result<T>) {
    match synced {
        Ok(_) => status.kinesis_answered(),
        Err(error @ Error::ListShards { .. }) => status.kinesis_failed(error.to_string()),
        Err(_) => {}
    }
}

/// Renews every `interval` until stopped; returns (renewals written, renewals skipped).
async fn renew_loop(
    renewer: Arc<LeaseRenewer>,
    interval: Duration,
    stop: CancellationToken,
    stream: String,
    status: WorkerStatus,
) -> (u64, u64) {
    let lost = metrics::counter!("LostLeases", "stream" => stream.clone());
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut renewed, mut skipped) = (0u64, 0u64);
    loop {
        tokio::select! {
            () = stop.cancelled() => return (renewed, skipped),
            _ = ticker.tick() => {}
        }
        let report = renewer.renew_all().await;
        renewed += report.renewed as u64;
        skipped += report.skipped as u64;
        // A lease skipped because a checkpoint just wrote it counts as renewed: the write succeeded.
        if report.renewed + report.skipped > 0 {
            status.renewed();
        } else if let Some(error) = report.last_error {
            status.renewal_failed(error);
        } else {
            status.nothing_to_renew();
        }
        if !report.lost.is_empty() {
            lost.increment(report.lost.len() as u64);
            info!(stream, shards = ?report.lost, "leases lost");
        }
    }
}

/// What one lease-taking round saw and met.
struct Round {
    /// The live workers in the table (this one included).
    live: BTreeSet<String>,
    /// A take or hand-off request lost its race: the round acted on a stale view.
    raced: bool,
    /// Hand-offs to this worker that wait for their owner's release.
    incoming: usize,
}

/// Sleeps until `at`; never wakes when `None`.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The main loop's state.
struct Loop<'a> {
    config: &'a WorkerConfig,
    table: &'a LeaseTable,
    taker: LeaseTaker,
    renewer: &'a Arc<LeaseRenewer>,
    /// Shards with a running task.
    running: HashSet<String>,
    /// Which task reads which shard (to know the shard of a task that panicked).
    task_shards: HashMap<tokio::task::Id, String>,
    tasks: JoinSet<(String, Ending)>,
    report: WorkerReport,
    labels: Vec<(&'static str, String)>,
    status: WorkerStatus,
}

impl Loop<'_> {
    fn reap(&mut self, joined: std::result::Result<(tokio::task::Id, (String, Ending)), tokio::task::JoinError>) {
        match joined {
            Ok((id, (shard, ending))) => {
                self.task_shards.remove(&id);
                self.running.remove(&shard);
                match ending {
                    Ending::ShardEnded => self.report.shards_ended += 1,
                    Ending::LeaseLost => self.report.leases_lost += 1,
                    Ending::Released { released } => self.report.leases_released += u64::from(released),
                }
            }
            Err(error) => {
                // A panicking processor. The lease is still ours in the table: the next round takes
                // it again and starts a new processor from the checkpoint.
                let shard = self.task_shards.remove(&error.id());
                warn!(shard = ?shard, %error, "a shard task panicked; restarting it from its checkpoint");
                if let Some(shard) = shard {
                    self.renewer.forget(&shard);
                    self.running.remove(&shard);
                }
            }
        }
        metrics::gauge!("CurrentLeases", &self.labels).set(self.running.len() as f64);
        self.status.set_held(self.running.len());
    }

    /// One round: scan the table, take unowned and expired leases, adopt completed hand-offs,
    /// and, when `steal`, ask for leases from workers above their share. The status learns how
    /// the scan went, what it showed, and how many leases the worker holds after the round.
    async fn take_leases<F: ProcessorFactory>(
        &mut self,
        steal: bool,
        ctx: &Arc<ShardContext>,
        factory: &Arc<F>,
    ) -> Result<Round> {
        let listing = match self.table.list().await {
            Ok(listing) => listing,
            Err(error) => {
                self.status.scan_failed(error.to_string());
                return Err(error);
            }
        };
        let now = Instant::now();
        let plan = self.taker.plan(&listing.leases, now);
        let me = self.config.worker_id.as_str();
        let active = listing.leases.iter().filter(|l| !l.is_finished()).count();
        let takeable = listing
            .leases
            .iter()
            .filter(|l| !l.is_finished() && !self.running.contains(&l.lease_key))
            .filter(|l| {
                self.taker.is_available(l, now) || (l.owner.as_deref() == Some(me) && l.checkpoint_owner.is_none())
            })
            .count();
        let live = plan.live.clone();
        let result = self.take_planned(&listing.leases, plan, now, steal, ctx, factory).await;
        self.status.scanned(active, takeable, live.len(), self.running.len());
        let (raced, requested) = result?;
        // Hand-offs to this worker still waiting for their owner's release, those asked for in
        // this round included.
        let waiting = listing
            .leases
            .iter()
            .filter(|l| l.owner.as_deref() == Some(me) && l.checkpoint_owner.is_some() && !l.is_finished())
            .count();
        Ok(Round { live, raced, incoming: waiting + requested })
    }

    /// Takes what `plan` (made from `listed` at `now`) names, and leases the table already gives
    /// this worker; asks for hand-offs when `steal`. Returns whether a take or a hand-off request
    /// lost its race (the lease changed since the scan), and how many hand-offs it asked for.
    async fn take_planned<F: ProcessorFactory>(
        &mut self,
        listed: &[Lease],
        plan: TakePlan,
        now: Instant,
        steal: bool,
        ctx: &Arc<ShardContext>,
        factory: &Arc<F>,
    ) -> Result<(bool, usize)> {
        let me = self.config.worker_id.clone();
        let mut raced = false;
        let mut requested = 0;
        let leases: BTreeMap<&str, &Lease> = listed.iter().map(|l| (l.lease_key.as_str(), l)).collect();
        for held in self.renewer.held() {
            if let Some(seen) = leases.get(held.shard_id()) {
                held.observe(seen);
            }
        }
        metrics::gauge!("TotalLeases", &self.labels).set(leases.values().filter(|l| !l.is_finished()).count() as f64);

        // Leases the table says are ours that no task runs: completed hand-offs (the previous owner
        // released), or hand-offs whose previous owner died (expired).
        let mut to_take: Vec<Lease> = leases
            .values()
            .filter(|l| l.owner.as_deref() == Some(me.as_str()) && !l.is_finished())
            .filter(|l| !self.running.contains(&l.lease_key))
            .filter(|l| l.checkpoint_owner.is_none() || self.taker.is_available(l, now))
            .map(|l| (*l).clone())
            .collect();
        to_take.extend(plan.available.iter().filter(|l| !self.running.contains(&l.lease_key)).cloned());
        for lease in to_take {
            match self.table.take(&lease, &me).await {
                Ok(taken) => self.start(taken, ctx, factory),
                Err(error) if error.is_condition_failure() => {
                    debug!(shard = %lease.lease_key, "another worker took the lease first");
                    raced = true;
                }
                Err(error) => return Err(error),
            }
        }
        if steal && !plan.steal.is_empty() {
            info!(stream = %self.config.stream, worker = %me, target = plan.target, steal = plan.steal.len(), "asking for leases to balance the load");
            for lease in &plan.steal {
                // The owner renews and checkpoints all the time, so the counter read in the scan is
                // often stale by the time of the write: ask again from the item the failed
                // condition returned, as long as the same worker still owns it outright.
                let mut target = lease.clone();
                for _ in 0..3 {
                    match self.table.request_handoff(&target, &me).await {
                        Ok(_) => {
                            requested += 1;
                            self.report.handoffs_requested += 1;
                            metrics::counter!("HandoffsRequested", &self.labels).increment(1);
                            break;
                        }
                        Err(error) if error.is_condition_failure() => match error.current_lease() {
                            Some(now) if now.owner == lease.owner && now.checkpoint_owner.is_none() => {
                                target = now.clone();
                            }
                            _ => {
                                debug!(shard = %lease.lease_key, "the lease changed hands; not asking for it");
                                raced = true;
                                break;
                            }
                        },
                        Err(Error::InvalidRequest { .. }) => break,
                        Err(error) => return Err(error),
                    }
                }
            }
        }
        Ok((raced, requested))
    }

    /// At shutdown, hand-offs this worker asked for and has not started: waits (until `deadline`)
    /// for their previous owners to finish and checkpoint, then releases them, so they do not sit
    /// owned by a worker that is gone until they expire. Returns how many were released.
    async fn release_incoming(&mut self, deadline: Instant) -> u64 {
        let me = self.config.worker_id.as_str();
        let mut released = 0;
        loop {
            let leases = match self.table.list().await {
                Ok(listing) => listing.leases,
                Err(error) => {
                    warn!(%error, "could not list leases to release pending hand-offs; they will expire");
                    return released;
                }
            };
            let incoming: Vec<Lease> =
                leases.into_iter().filter(|l| l.owner.as_deref() == Some(me) && !l.is_finished()).collect();
            let mut waiting = false;
            for lease in incoming {
                if lease.checkpoint_owner.is_some() {
                    waiting = true;
                    continue;
                }
                match self.table.release(&lease).await {
                    Ok(_) => released += 1,
                    Err(error) if error.is_condition_failure() => waiting = true,
                    Err(error) => {
                        warn!(shard = %lease.lease_key, %error, "could not release a pending hand-off; it will expire")
                    }
                }
            }
            if !waiting || Instant::now() >= deadline {
                return released;
            }
            tokio::time::sleep(Duration::from_millis(100).min(self.config.discovery_interval)).await;
        }
    }

    fn start<F: ProcessorFactory>(&mut self, lease: Lease, ctx: &Arc<ShardContext>, factory: &Arc<F>) {
        let shard = lease.lease_key.clone();
        self.report.leases_taken += 1;
        metrics::counter!("TakenLeases", &self.labels).increment(1);
        let held = self.renewer.add(lease);
        let processor = factory.create(&shard);
        let ctx = Arc::clone(ctx);
        self.running.insert(shard.clone());
        let task_shard = shard.clone();
        let handle = self.tasks.spawn(async move {
            let ending = shard_consumer::run(ctx, held, processor).await;
            (task_shard, ending)
        });
        self.task_shards.insert(handle.id(), shard);
        metrics::gauge!("CurrentLeases", &self.labels).set(self.running.len() as f64);
        self.status.set_held(self.running.len());
    }
}
