use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::fakes::{CheckpointWhen, Event, FakeKinesis, Log, Recorder};
use crate::error::{Error, Result};
use crate::lease::memory::{MemoryItems, Outage};
use crate::lease::{ExtendedSequenceNumber, Lease, LeaseTable};
use crate::worker::{Worker, WorkerConfig, WorkerReport, WorkerStatus};

const APP: &str = "app";

/// A stream, a lease table and a log shared by the workers of a test, whose processors take
/// `batch_time` over each batch.
#[derive(Default)]
struct Harness {
    kinesis: Arc<FakeKinesis>,
    items: Arc<MemoryItems>,
    log: Log,
    batch_time: Duration,
}

/// A worker running in a task of the test's runtime.
struct Running {
    shutdown: CancellationToken,
    handle: JoinHandle<Result<WorkerReport>>,
    status: WorkerStatus,
}

impl Running {
    /// Shuts the worker down gracefully and returns its report.
    async fn stop(self) -> WorkerReport {
        self.shutdown.cancel();
        self.handle.await.expect("the worker task").expect("the worker stops cleanly")
    }

    /// Kills the worker without a shutdown: nothing is released (a crashed task).
    async fn crash(self) {
        self.handle.abort();
        let _ = self.handle.await;
    }
}

impl Harness {
    fn table(&self) -> LeaseTable {
        LeaseTable::with_store(Arc::clone(&self.items) as _, APP)
    }

    fn lease(&self, shard: &str) -> Lease {
        self.items.lease(shard).unwrap_or_else(|| panic!("a lease for {shard}"))
    }

    fn start(&self, worker: &str, when: CheckpointWhen, fail_batch: Option<usize>) -> Running {
        self.start_with(worker, when, fail_batch, |config| config)
    }

    fn start_with(
        &self,
        worker: &str,
        when: CheckpointWhen,
        fail_batch: Option<usize>,
        configure: impl FnOnce(WorkerConfig) -> WorkerConfig,
    ) -> Running {
        let config = configure(WorkerConfig::new("stream", APP).with_worker_id(worker));
        let (log, name, batch_time) = (self.log.clone(), worker.to_owned(), self.batch_time);
        let factory = move |shard: &str| Recorder {
            worker: name.clone(),
            shard: shard.to_owned(),
            log: log.clone(),
            when,
            fail_batch,
            batches: 0,
            batch_time,
        };
        let worker = Worker::with_api(config, Arc::clone(&self.kinesis) as _, self.table(), factory).expect("config");
        let status = worker.status();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(worker.run(shutdown.clone()));
        Running { shutdown, handle, status }
    }
}

async fn wait(seconds: u64) {
    tokio::time::sleep(Duration::from_secs(seconds)).await;
}

fn pairs(shard: &str, sequences: &[String]) -> Vec<(String, String)> {
    sequences.iter().map(|s| (shard.to_owned(), s.clone())).collect()
}

fn at(sequence: &str) -> ExtendedSequenceNumber {
    ExtendedSequenceNumber::at(sequence, 0).expect("a sequence number")
}

#[tokio::test(start_paused = true)]
async fn a_lone_worker_takes_every_unowned_lease_and_processes_each_record_once() {
    let h = Harness::default();
    h.kinesis.add_shard("s0", &[]);
    h.kinesis.add_shard("s1", &[]);
    let mut expected = pairs("s0", &h.kinesis.put("s0", 5));
    expected.extend(pairs("s1", &h.kinesis.put("s1", 3)));
    expected.sort();

    let w1 = h.start("w1", CheckpointWhen::EveryBatch, None);
    wait(5).await;
    assert_eq!(h.log.processed(), expected, "every record once");
    assert_eq!(h.lease("s0").owner.as_deref(), Some("w1"));
    assert_eq!(h.lease("s0").checkpoint, at(&expected[4].1));
    assert_eq!(h.lease("s1").checkpoint, at(&expected[7].1));

    let report = w1.stop().await;
    assert_eq!(report.leases_taken, 2);
    assert_eq!(report.leases_released, 2);
    assert_eq!(h.lease("s0").owner, None, "released at shutdown");
    assert_eq!(h.lease("s1").owner, None);
}

#[tokio::test(start_paused = true)]
async fn a_crashed_workers_leases_are_taken_over_after_the_failover_time_from_its_checkpoint() {
    let h = Harness::default();
    h.kinesis.add_shard("s0", &[]);
    let first = h.kinesis.put("s0", 4);
    let w1 = h.start("w1", CheckpointWhen::EveryBatch, None);
    wait(3).await;
    assert_eq!(h.log.processed_by("w1"), pairs("s0", &first));
    w1.crash().await;
    assert_eq!(h.lease("s0").owner.as_deref(), Some("w1"), "a crash releases nothing");

    let second = h.kinesis.put("s0", 2);
    let w2 = h.start("w2", CheckpointWhen::EveryBatch, None);
    wait(8).await;
    assert!(h.log.processed_by("w2").is_empty(), "before the failover time the lease is w1's");
    assert_eq!(h.lease("s0").owner.as_deref(), Some("w1"));
    wait(5).await;
    assert_eq!(h.lease("s0").owner.as_deref(), Some("w2"), "expired after 10 s without a counter change");
    assert_eq!(h.log.processed_by("w2"), pairs("s0", &second), "from w1's checkpoint, nothing twice");
    let init = h.log.entries().into_iter().find(|e| e.worker == "w2").map(|e| e.event);
    assert_eq!(init, Some(Event::Init { checkpoint: at(&first[3]), restarts: 0 }));
    w2.stop().await;
}

#[tokio::test(start_paused = true)]
async fn renewals_keep_a_held_lease_alive_and_other_workers_off_it() {
    let h = Harness::default();
    h.kinesis.add_shard("s0", &[]);
    let w1 = h.start("w1", CheckpointWhen::EveryBatch, None);
    wait(2).await;
    let taken = h.lease("s0").counter;
    wait(30).await;
    let renewed = h.lease("s0").counter;
    // One renewal every 3,308 ms (failover time / 3 - 25 ms): 9 in 30 s.
    assert!(renewed >= taken + 8, "counter {taken} -> {renewed}");
    // A second worker sees the counter move and never takes the lease as expired; the one lease
    // is w1's share, so it does not steal it either.
    let w2 = h.start("w2", CheckpointWhen::EveryBatch, None);
    wait(45).await;
    assert_eq!(h.lease("s0").owner.as_deref(), Some("w1"));
    let report = w2.stop().await;
    assert_eq!(report.leases_taken, 0);
    let report = w1.stop().await;
    assert!(report.renewals >= 20, "{report:?}");
    assert_eq!(report.leases_lost, 0);
}

#[tokio::test(start_paused = true)]
async fn a_lost_lease_stops_the_shard_calls_lease_lost_and_checkpoints_nothing_after() {
    let h = Harness::default();
    h.kinesis.add_shard("s0", &[]);
    let first = h.kinesis.put("s0", 3);
    let w1 = h.start("w1", CheckpointWhen::EveryBatch, None);
    wait(3).await;
    assert_eq!(h.log.processed_by("w1"), pairs("s0", &first));

    // Another worker takes the lease (a conditional write on the counter, as a taker does).
    let table = h.table();
    let stolen = table.take(&h.lease("s0"), "thief").await.expect("take");
    let checkpoint_at_theft = stolen.checkpoint.clone();
    h.kinesis.put("s0", 3);
    // Less than the failover time: the thief (not running here) still counts as alive.
    wait(5).await;

    let w1_events: Vec<Event> = h.log.entries().into_iter().filter(|e| e.worker == "w1").map(|e| e.event).collect();
    assert!(w1_events.contains(&Event::LeaseLost), "{w1_events:?}");
    let lost_at = w1_events.iter().position(|e| *e == Event::LeaseLost).expect("lost");
    assert!(
        w1_events[lost_at..].iter().all(|e| !matches!(e, Event::Batch(_) | Event::Checkpointed(_))),
        "nothing processed or checkpointed after the loss: {w1_events:?}"
    );
    assert_eq!(h.log.processed_by("w1"), pairs("s0", &first), "the later records are the thief's");
    let now = h.lease("s0");
    assert_eq!(now.owner.as_deref(), Some("thief"));
    assert_eq!(now.checkpoint, checkpoint_at_theft, "w1 wrote no checkpoint after the theft");
    let report = w1.stop().await;
    assert_eq!(report.leases_lost, 1);
    assert_eq!(report.leases_released, 0, "a lost lease is not released");
}

#[tokio::test(start_paused = true)]
async fn a_hand_off_lets_the_owner_finish_and_checkpoint_before_the_new_owner_starts() {
    let h = Harness::default();
    for shard in ["s0", "s1"] {
        h.kinesis.add_shard(shard, &[]);
        h.kinesis.put(shard, 4);
    }
    // w1 checkpoints only when asked to shut down: if w2 started before that checkpoint, it would
    // read the shard again from TRIM_HORIZON.
    let w1 = h.start("w1", CheckpointWhen::AtShutdown, None);
    wait(3).await;
    assert_eq!(h.log.processed_by("w1").len(), 8);

    let w2 = h.start("w2", CheckpointWhen::EveryBatch, None);
    wait(5).await;
    // Two leases, two workers: w2 asked for one at once, w1 handed it over.
    let moved =
        ["s0", "s1"].into_iter().find(|s| h.lease(s).owner.as_deref() == Some("w2")).expect("one lease moved to w2");
    let stayed = if moved == "s0" { "s1" } else { "s0" };
    assert_eq!(h.lease(stayed).owner.as_deref(), Some("w1"));

    let handed = h
        .log
        .position(|e| e.worker == "w1" && e.shard == moved && e.event == Event::ShutdownRequested)
        .expect("w1 was asked to hand over");
    let checkpointed = h
        .log
        .position(|e| e.worker == "w1" && e.shard == moved && matches!(e.event, Event::Checkpointed(_)))
        .expect("w1 checkpointed the moved shard");
    let started = h.log.position(|e| e.worker == "w2" && e.shard == moved).expect("w2 started the moved shard");
    assert!(handed < checkpointed && checkpointed < started, "{:?}", h.log.entries());
    let init = h.log.entries().into_iter().nth(started).map(|e| e.event);
    assert!(
        matches!(&init, Some(Event::Init { checkpoint, .. }) if matches!(checkpoint.sequence, crate::lease::SequenceNumber::Number(_))),
        "w2 starts from w1's checkpoint: {init:?}"
    );

    let more_moved = h.kinesis.put(moved, 2);
    let more_stayed = h.kinesis.put(stayed, 2);
    wait(5).await;
    assert!(h.log.processed_by("w2").ends_with(&pairs(moved, &more_moved)));
    assert!(h.log.processed_by("w1").ends_with(&pairs(stayed, &more_stayed)));
    let all = h.log.processed();
    let mut unique = all.clone();
    unique.dedup();
    assert_eq!(all, unique, "nothing processed twice");
    assert_eq!(all.len(), 12);
    let report = w2.stop().await;
    assert_eq!(report.handoffs_requested, 1);
    w1.stop().await;
}

#[tokio::test(start_paused = true)]
async fn children_start_only_after_their_parents_reach_shard_end() {
    let h = Harness::default();
    h.kinesis.add_shard("s0", &[]);
    h.kinesis.add_shard("s1", &["s0"]);
    h.kinesis.add_shard("s2", &["s0"]);
    let parent = h.kinesis.put("s0", 3);
    h.kinesis.close("s0", &["s1", "s2"]);
    let left = h.kinesis.put("s1", 2);
    let right = h.kinesis.put("s2", 2);

    let w1 = h.start("w1", CheckpointWhen::EveryBatch, None);
    wait(15).await;
    let ended = h.log.position(|e| e.shard == "s0" && e.event == Event::ShardEnded).expect("s0 ended");
    for child in ["s1", "s2"] {
        let first_batch = h
            .log
            .position(|e| e.shard == child && matches!(e.event, Event::Batch(_)))
            .unwrap_or_else(|| panic!("{child} was processed"));
        assert!(ended < first_batch, "{child} before its parent's end: {:?}", h.log.entries());
    }
    assert!(h.lease("s0").checkpoint.is_shard_end());
    let mut expected = pairs("s0", &parent);
    expected.extend(pairs("s1", &left));
    expected.extend(pairs("s2", &right));
    expected.sort();
    assert_eq!(h.log.processed(), expected);
    let report = w1.stop().await;
    assert_eq!(report.shards_ended, 1);
}

#[tokio::test(start_paused = true)]
async fn a_failed_batch_is_retried_from_its_checkpoint_and_checkpoints_never_go_backwards() {
    let h = Harness::default();
    h.kinesis.add_shard("s0", &[]);
    let records = h.kinesis.put("s0", 6);
    // Two records a read: batches [0, 1], [2, 3] (fails once), [2, 3] again, [4, 5].
    let w1 = h.start_with("w1", CheckpointWhen::EveryBatch, Some(1), |c| c.with_max_records(2));
    wait(10).await;

    let events: Vec<Event> = h.log.entries().into_iter().map(|e| e.event).collect();
    let until_restart = [
        Event::Init { checkpoint: ExtendedSequenceNumber::TRIM_HORIZON, restarts: 0 },
        Event::Batch(records[0..2].to_vec()),
        Event::Checkpointed(at(&records[1])),
        Event::Failed(records[2..4].to_vec()),
        Event::Init { checkpoint: at(&records[1]), restarts: 1 },
    ];
    assert_eq!(events[..5], until_restart[..], "{events:?}");
    // After the restart: exactly the records after the checkpoint, in order, the failed batch's
    // among them (the reader reads the checkpoint's record again and skips it, so the batches
    // are cut differently the second time).
    let after: Vec<String> = events[5..]
        .iter()
        .flat_map(|e| match e {
            Event::Batch(records) => records.clone(),
            _ => Vec::new(),
        })
        .collect();
    assert_eq!(after, records[2..6].to_vec());
    let checkpoints: Vec<&ExtendedSequenceNumber> = events
        .iter()
        .filter_map(|e| match e {
            Event::Checkpointed(at) => Some(at),
            _ => None,
        })
        .collect();
    assert!(checkpoints.windows(2).all(|w| w[0] < w[1]), "checkpoints only move forward: {checkpoints:?}");
    assert_eq!(h.lease("s0").checkpoint, at(&records[5]));

    // The table refuses a checkpoint behind the current one.
    let table = h.table();
    let backwards = table.checkpoint(&h.lease("s0"), at(&records[2])).await;
    assert!(matches!(backwards, Err(Error::CheckpointBackwards { .. })), "{backwards:?}");
    w1.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_gracefully_stopped_workers_leases_are_taken_by_another_within_a_second() {
    let h = Harness::default();
    h.kinesis.add_shard("s0", &[]);
    let first = h.kinesis.put("s0", 3);
    let w1 = h.start("w1", CheckpointWhen::AtShutdown, None);
    wait(3).await;
    // Started once all of w1's leases are taken: its share is 0 until w1 leaves.
    let w2 = h.start("w2", CheckpointWhen::EveryBatch, None);
    wait(1).await;
    let report = w1.stop().await;
    assert_eq!(report.leases_released, 1);
    let second = h.kinesis.put("s0", 2);
    let stopped = tokio::time::Instant::now();
    while h.lease("s0").owner.as_deref() != Some("w2") {
        assert!(stopped.elapsed() < Duration::from_secs(2), "not taken within the discovery interval");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait(3).await;
    assert_eq!(h.log.processed_by("w1"), pairs("s0", &first));
    assert_eq!(h.log.processed_by("w2"), pairs("s0", &second), "from w1's shutdown checkpoint");
    w2.stop().await;
}

/// What a health check with a 5 s threshold says of `worker` now.
fn reasons(worker: &Running) -> Vec<String> {
    worker.status.snapshot().unhealthy_reasons(tokio::time::Instant::now(), Duration::from_secs(5))
}

#[tokio::test(start_paused = true)]
async fn a_worker_whose_lease_table_stops_answering_is_unhealthy_after_the_time_and_healthy_once_it_answers() {
    let h = Harness::default();
    h.kinesis.add_shard("s0", &[]);
    let w1 = h.start("w1", CheckpointWhen::EveryBatch, None);
    wait(3).await;
    let snapshot = w1.status.snapshot();
    assert_eq!((snapshot.leases_held, snapshot.leases_in_table, snapshot.workers_seen), (1, 1, 1));
    assert!(reasons(&w1).is_empty(), "{:?}", reasons(&w1));

    h.items.set_outage(Outage::All);
    wait(3).await;
    assert!(reasons(&w1).is_empty(), "3 s of failures is not over 5 s: {:?}", reasons(&w1));
    wait(5).await;
    let now = reasons(&w1);
    assert!(
        now.iter()
            .any(|r| r.starts_with("the lease table has failed every scan for ") && r.contains("ServiceUnavailable")),
        "{now:?}"
    );
    assert!(now.iter().all(|r| !r.contains("Kinesis")), "the stream answers: {now:?}");

    h.items.set_outage(Outage::None);
    wait(4).await;
    assert!(reasons(&w1).is_empty(), "{:?}", reasons(&w1));
    assert_eq!(w1.status.snapshot().leases_held, 1);
    w1.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_worker_that_cannot_take_a_free_lease_is_unhealthy() {
    let h = Harness::default();
    h.kinesis.add_shard("s0", &[]);
    h.table().create_if_absent(&Lease::new("s0", ExtendedSequenceNumber::TRIM_HORIZON)).await.expect("lease");
    // The table answers scans, but refuses the write that takes the lease.
    h.items.set_outage(Outage::Writes);
    let w1 = h.start("w1", CheckpointWhen::EveryBatch, None);
    wait(3).await;
    let snapshot = w1.status.snapshot();
    assert_eq!((snapshot.leases_held, snapshot.leases_takeable), (0, 1), "{snapshot:?}");
    assert!(reasons(&w1).is_empty(), "not for longer than 5 s yet: {:?}", reasons(&w1));
    wait(5).await;
    assert_eq!(
        reasons(&w1),
        ["the worker has held no lease for 8 s while the lease table has 1 it could take (unowned or expired)"]
    );
    h.items.set_outage(Outage::None);
    wait(2).await;
    assert_eq!(w1.status.snapshot().leases_held, 1);
    assert!(reasons(&w1).is_empty(), "{:?}", reasons(&w1));
    w1.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_worker_without_a_lease_because_live_workers_hold_them_all_is_healthy() {
    let h = Harness::default();
    h.kinesis.add_shard("s0", &[]);
    let w1 = h.start("w1", CheckpointWhen::EveryBatch, None);
    wait(2).await;
    let w2 = h.start("w2", CheckpointWhen::EveryBatch, None);
    // Past several taking intervals and failover times.
    wait(60).await;
    let snapshot = w2.status.snapshot();
    assert_eq!(
        (snapshot.leases_held, snapshot.leases_in_table, snapshot.leases_takeable, snapshot.workers_seen),
        (0, 1, 0, 2),
        "{snapshot:?}"
    );
    assert!(reasons(&w2).is_empty(), "{:?}", reasons(&w2));
    assert!(reasons(&w1).is_empty(), "{:?}", reasons(&w1));
    w2.stop().await;
    w1.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_worker_whose_stream_is_gone_is_unhealthy_naming_kinesis() {
    let h = Harness::default();
    h.kinesis.add_shard("s0", &[]);
    h.kinesis.put("s0", 2);
    let w1 = h.start("w1", CheckpointWhen::EveryBatch, None);
    wait(3).await;
    assert!(w1.status.snapshot().kinesis.last_success.is_some());
    assert!(reasons(&w1).is_empty(), "{:?}", reasons(&w1));

    h.kinesis.set_deleted(true);
    wait(10).await;
    let now = reasons(&w1);
    assert_eq!(now.len(), 1, "{now:?}");
    assert!(now[0].starts_with("every Kinesis call has failed for "), "{now:?}");
    assert!(now[0].contains("ResourceNotFoundException"), "{now:?}");

    h.kinesis.set_deleted(false);
    wait(5).await;
    assert!(reasons(&w1).is_empty(), "{:?}", reasons(&w1));
    w1.stop().await;
}

/// Unfinished leases per owner in the table, a hand-off in progress counted as "handoff".
fn owner_counts(h: &Harness, shards: &[String]) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for shard in shards {
        let Some(lease) = h.items.lease(shard) else {
            *counts.entry("no lease yet".to_owned()).or_default() += 1;
            continue;
        };
        let owner = match (&lease.owner, &lease.checkpoint_owner) {
            (_, Some(_)) => "handoff".to_owned(),
            (Some(owner), None) => owner.clone(),
            (None, None) => String::new(),
        };
        *counts.entry(owner).or_default() += 1;
    }
    counts
}

/// Polls every 50 ms until `check` holds; returns how long that took, or `None` after `limit`.
async fn time_until(limit: Duration, mut check: impl FnMut() -> bool) -> Option<Duration> {
    let started = tokio::time::Instant::now();
    while started.elapsed() <= limit {
        if check() {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// Eight shards with records, and a lease table whose calls take 10 ms, as DynamoDB's do: two
/// workers started together then race for the same unowned leases.
fn eight_shards_and_a_slow_table() -> (Harness, Vec<String>) {
    let h = Harness::default();
    let shards: Vec<String> = (0..8).map(|i| format!("s{i}")).collect();
    for shard in &shards {
        h.kinesis.add_shard(shard, &[]);
        h.kinesis.put(shard, 3);
    }
    h.items.set_latency(Duration::from_millis(10));
    (h, shards)
}

#[tokio::test(start_paused = true)]
async fn two_workers_started_together_share_evenly_within_seconds_not_a_taking_interval() {
    let (h, shards) = eight_shards_and_a_slow_table();
    let w1 = h.start("w1", CheckpointWhen::EveryBatch, None);
    // The second starts 5 ms later: both find the leases unowned, and the first wins every race.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let w2 = h.start("w2", CheckpointWhen::EveryBatch, None);
    let even = || {
        let counts = owner_counts(&h, &shards);
        counts.get("w1") == Some(&4) && counts.get("w2") == Some(&4)
    };
    let took = time_until(Duration::from_secs(30), even).await;
    let took = took.unwrap_or_else(|| panic!("no 4/4 split in 30 s: {:?}", owner_counts(&h, &shards)));
    // The second worker scans four times as often while hand-offs to it are pending, so it starts
    // the shards soon after their release.
    let started = time_until(Duration::from_secs(5), || w2.status.snapshot().leases_held == 4).await;
    let started = took + started.expect("w2 processing its four shards");
    println!(
        "two workers started 5 ms apart: 4/4, hand-offs done, {took:?} after the second started; \
         its four shards processing after {started:?}"
    );
    assert!(took <= Duration::from_secs(3), "4/4 with hand-offs done in {took:?}, not a taking interval (20 s)");
    assert!(started <= Duration::from_secs(3), "{started:?}");

    // Stable afterwards: nothing moves over several taking intervals, nothing is processed twice.
    wait(60).await;
    assert!(even(), "{:?}", owner_counts(&h, &shards));
    let all = h.log.processed();
    let mut unique = all.clone();
    unique.dedup();
    assert_eq!((all.len(), unique.len()), (24, 24), "every record once");
    let (r2, r1) = (w2.stop().await, w1.stop().await);
    assert_eq!(r1.handoffs_requested + r2.handoffs_requested, 4, "each lease moved once: {r1:?} {r2:?}");
    assert_eq!(r1.leases_lost + r2.leases_lost, 0, "hand-offs, not thefts: {r1:?} {r2:?}");
}

#[tokio::test(start_paused = true)]
async fn without_early_balancing_the_same_start_waits_a_whole_taking_interval() {
    // The scenario above with early rounds turned off: what the worker did before.
    let (h, shards) = eight_shards_and_a_slow_table();
    let never = |c: WorkerConfig| c.with_min_balance_interval(Duration::from_secs(3600));
    let w1 = h.start_with("w1", CheckpointWhen::EveryBatch, None, never);
    tokio::time::sleep(Duration::from_millis(5)).await;
    let w2 = h.start_with("w2", CheckpointWhen::EveryBatch, None, never);
    let took = time_until(Duration::from_secs(30), || {
        let counts = owner_counts(&h, &shards);
        counts.get("w1") == Some(&4) && counts.get("w2") == Some(&4)
    })
    .await;
    let took = took.expect("even at the taking interval");
    println!("without early balancing: 4/4 {took:?} after the second started");
    assert!(took >= Duration::from_secs(19), "{took:?}");
    w2.stop().await;
    w1.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_running_worker_balances_at_its_next_scan_when_a_new_worker_appears() {
    let h = Harness::default();
    let shards: Vec<String> = (0..8).map(|i| format!("s{i}")).collect();
    for shard in &shards {
        h.kinesis.add_shard(shard, &[]);
    }
    let w1 = h.start("w1", CheckpointWhen::EveryBatch, None);
    wait(5).await;
    assert_eq!(owner_counts(&h, &shards).get("w1"), Some(&8));

    // A new worker (played by the test) appears holding six of them, and renews them; it hands
    // over what it is asked for, as a worker does.
    let table = h.table();
    let w9 = Arc::new(crate::lease::LeaseRenewer::new(table.clone(), Duration::from_secs(10)));
    for shard in &shards[2..] {
        w9.add(table.take(&h.lease(shard), "w9").await.expect("w9 takes it"));
    }
    let renewing = {
        let w9 = Arc::clone(&w9);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                w9.renew_all().await;
                for held in w9.held() {
                    if held.is_handoff_requested() {
                        w9.release(held.shard_id()).await;
                    }
                }
            }
        })
    };
    // w1 holds 2 of 8 next to one other worker: its share is 4, and it asks w9 for 2 at its next
    // scans, not at its next taking interval (20 s after its start).
    let took = time_until(Duration::from_secs(30), || {
        let counts = owner_counts(&h, &shards);
        counts.get("w1") == Some(&4) && counts.get("w9") == Some(&4)
    })
    .await;
    let took = took.unwrap_or_else(|| panic!("no 4/4 split: {:?}", owner_counts(&h, &shards)));
    println!("a new worker appeared holding 6 of 8: 4/4 {took:?} later");
    assert!(took <= Duration::from_secs(3), "{took:?}");
    renewing.abort();
    let report = w1.stop().await;
    assert_eq!(report.handoffs_requested, 2, "{report:?}");
}

/// The times `worker` finished each batch of `shard`, with its records.
fn batches(h: &Harness, worker: &str, shard: &str) -> Vec<(tokio::time::Instant, Vec<String>)> {
    h.log
        .entries()
        .into_iter()
        .filter(|e| e.worker == worker && e.shard == shard)
        .filter_map(|e| match e.event {
            Event::Batch(records) => Some((e.at, records)),
            _ => None,
        })
        .collect()
}

/// One shard of ten records read two at a time by a processor that takes 1 s a batch, with
/// read-ahead on or off: when each `GetRecords` was made, and when each batch was done.
async fn slow_processor_run(
    read_ahead: bool,
) -> (Vec<crate::tests::fakes::Read>, Vec<(tokio::time::Instant, Vec<String>)>, Vec<String>) {
    let h = Harness { batch_time: Duration::from_secs(1), ..Harness::default() };
    h.kinesis.add_shard("s0", &[]);
    let records = h.kinesis.put("s0", 10);
    let w1 =
        h.start_with("w1", CheckpointWhen::EveryBatch, None, |c| c.with_max_records(2).with_read_ahead(read_ahead));
    wait(10).await;
    w1.stop().await;
    assert_eq!(h.lease("s0").checkpoint, at(&records[9]), "every batch checkpointed");
    (h.kinesis.reads("s0"), batches(&h, "w1", "s0"), records)
}

#[tokio::test(start_paused = true)]
async fn the_next_get_records_is_made_while_the_processor_works_and_order_is_kept() {
    let (reads, done, records) = slow_processor_run(true).await;
    // Batch n is done at the end of its second; the read of batch n + 1 (from record 2n + 2) was
    // made while batch n was being processed, 200 ms after the read of batch n.
    assert_eq!(done.len(), 5, "{done:?}");
    for (n, (finished, batch)) in done.iter().enumerate() {
        assert_eq!(batch, &records[2 * n..2 * n + 2].to_vec(), "batches in shard order");
        let next = reads.iter().find(|r| r.position == 2 * n + 2).expect("the next batch was read");
        assert!(next.at + Duration::from_millis(500) <= *finished, "batch {n}: {next:?} vs done at {finished:?}");
    }
    // Five 1 s batches back to back: the reads hide behind the processing.
    let took = done[4].0 - reads[0].at;
    assert!(took <= Duration::from_millis(5_100), "{took:?}");

    // Read-ahead off: each read waits for the batch before it.
    let (reads, done, _) = slow_processor_run(false).await;
    for (n, (finished, _)) in done.iter().enumerate() {
        let next = reads.iter().find(|r| r.position == 2 * n + 2).expect("the next batch was read");
        assert!(next.at >= *finished, "batch {n}: {next:?} made before the batch was done at {finished:?}");
    }
}

/// A shard of four records read two at a time by a processor that takes 2 s a batch and
/// checkpoints only when asked to shut down: the second batch has been read ahead when the first
/// is done.
fn shard_with_two_slow_batches() -> (Harness, Vec<String>, Running) {
    let h = Harness { batch_time: Duration::from_secs(2), ..Harness::default() };
    h.kinesis.add_shard("s0", &[]);
    let records = h.kinesis.put("s0", 4);
    let w1 = h.start_with("w1", CheckpointWhen::AtShutdown, None, |c| c.with_max_records(2));
    (h, records, w1)
}

#[tokio::test(start_paused = true)]
async fn a_lost_lease_drops_the_batch_read_ahead() {
    let (h, records, w1) = shard_with_two_slow_batches();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(h.kinesis.reads("s0").iter().any(|r| r.position == 2), "the second batch is read ahead");
    // Another worker takes the lease while the first batch is being processed.
    h.table().take(&h.lease("s0"), "thief").await.expect("the thief takes it");
    wait(5).await;
    let events: Vec<Event> = h.log.entries().into_iter().filter(|e| e.worker == "w1").map(|e| e.event).collect();
    assert!(events.contains(&Event::LeaseLost), "{events:?}");
    assert_eq!(h.log.processed_by("w1"), pairs("s0", &records[..2]), "the batch read ahead is not processed");
    let lease = h.lease("s0");
    assert_eq!((lease.owner.as_deref(), lease.checkpoint), (Some("thief"), ExtendedSequenceNumber::TRIM_HORIZON));
    w1.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_hand_off_drops_the_batch_read_ahead_and_checkpoints_only_what_was_processed() {
    let (h, records, w1) = shard_with_two_slow_batches();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(h.kinesis.reads("s0").iter().any(|r| r.position == 2), "the second batch is read ahead");
    h.table().request_handoff(&h.lease("s0"), "w2").await.expect("w2 asks for it");
    wait(5).await;
    assert_eq!(h.log.processed_by("w1"), pairs("s0", &records[..2]), "the batch read ahead is not processed");
    assert!(h.log.position(|e| e.worker == "w1" && e.event == Event::ShutdownRequested).is_some());
    // Handed over at the end of the first batch: the read-ahead's records were never delivered.
    let lease = h.lease("s0");
    assert_eq!((lease.owner.as_deref(), lease.checkpoint_owner, lease.checkpoint), (Some("w2"), None, at(&records[1])));
    let report = w1.stop().await;
    assert_eq!(report.leases_released, 1, "{report:?}");
}

#[tokio::test(start_paused = true)]
async fn reads_keep_the_idle_pause_and_the_throttling_backoff_with_read_ahead() {
    let h = Harness { batch_time: Duration::from_secs(1), ..Harness::default() };
    h.kinesis.add_shard("s0", &[]);
    h.kinesis.add_shard("idle", &[]);
    let records = h.kinesis.put("s0", 6);
    let w1 = h.start_with("w1", CheckpointWhen::EveryBatch, None, |c| c.with_max_records(2).with_empty_batches(true));
    // The read ahead of the second batch is throttled, and so is every read for 5 s.
    tokio::time::sleep(Duration::from_millis(100)).await;
    h.kinesis.set_throttled(true);
    wait(5).await;
    h.kinesis.set_throttled(false);
    let throttled = h.kinesis.reads("s0").iter().filter(|r| r.throttled).count();
    // Backed off from 100 ms, doubling: about six calls in 5 s, not one every 200 ms (25).
    assert!((4..=8).contains(&throttled), "{throttled} throttled reads");
    wait(10).await;
    assert_eq!(h.log.processed_by("w1"), pairs("s0", &records), "everything once, in order, after the throttling");
    // A caught-up shard is read once per idle time (1.5 s), read-ahead or not: about 10 in 15 s
    // (throttled ones included).
    let idle = h.kinesis.reads("idle").len();
    assert!((8..=12).contains(&idle), "{idle} reads of the idle shard");
    w1.stop().await;
}
