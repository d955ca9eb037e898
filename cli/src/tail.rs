//! `ktk tail`: every shard of a stream read at once, its user records printed as JSON Lines.
//!
//! Data flow: the shards are listed once ([`list_shards`]); a [`Lineage`] decides which to read,
//! from where, and when: a shard waits until every parent it tracks has been read to its end, so
//! the records of one partition key come out in the order they were put, across splits and
//! merges. Each shard that may start gets its own task with a [`ShardReader`] (which keeps to the
//! shard's read quota and deaggregates); the task renders the records of each read as lines and
//! sends them, one batch per read, through a bounded channel to a single writer thread, so lines
//! never interleave and a slow reader of the output slows the shards down instead of filling
//! memory. When a shard ends, its children are started (listed again if they are new).
//!
//! The run ends when every task is done (without `--follow`: each shard caught up or ended), when
//! `--limit` records were written, when standard output is closed, when the `stop` future fires
//! (Ctrl-C, SIGTERM), or at the first error that retrying cannot cure. No lease is taken: `tail`
//! only reads, so it never disturbs a consumer application (beyond sharing the shards' quota).

use std::collections::BTreeMap;
use std::future::Future;
use std::io::{self, Write};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_kinesis::primitives::{DateTime, DateTimeFormat};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ktk_backoff::Backoff;
use ktk_consumer::retrieval::{ConsumerRecord, ReaderConfig, RetrievalError, ShardReader, StartingPosition};
use ktk_consumer::retrieval::{Shard, list_shards};
use ktk_proto::events::v1::Event;
use prost::Message as _;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

/// Batches (one per `GetRecords` call) waiting for the writer. A batch holds at most one call's
/// records (10 MiB of data at most), so this bounds what waits here.
const OUTPUT_BATCHES: usize = 8;
/// With `--follow`, how long a caught-up shard rests between reads: new records show within about
/// a second, and an idle shard uses one of its five reads a second, leaving the rest to the
/// stream's applications.
const IDLE_INTERVAL: Duration = Duration::from_secs(1);
/// First wait after a failed read; it doubles with each failure in a row, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Without `--follow`, failures in a row on one shard (other than throttling, which is always
/// waited out) before giving up; with `--follow` retryable failures are retried for ever.
const MAX_FAILURES_IN_A_ROW: u32 = 10;
/// Attempts at listing the shards when the failure is retryable.
const LIST_ATTEMPTS: u32 = 5;

/// Where the shards are read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// Every shard from its oldest record, parents before children.
    TrimHorizon,
    /// The open shards, from the records put after the start.
    Latest,
    /// Every shard, from the first record that arrived at or after this time.
    AtTimestamp(SystemTime),
}

/// What `ktk tail` was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    pub stream: String,
    pub start: Start,
    /// Keep reading (and follow resharding) until stopped; otherwise stop once caught up.
    pub follow: bool,
    /// Decode each record's data as an `events.v1` Event.
    pub events: bool,
    /// Stop after writing this many records.
    pub limit: Option<u64>,
}

/// How a run ended, when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Every shard was caught up or read to its end.
    CaughtUp,
    LimitReached,
    /// The stop future fired.
    Interrupted,
    /// Standard output was closed (the reader of a pipe went away).
    OutputClosed,
}

/// What a run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub ending: Ending,
    pub records: u64,
    /// When every shard was caught up: shards never read because a parent was not read to its end
    /// (only possible when a parent was caught up rather than ended, which a closed parent never is).
    pub shards_not_started: usize,
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TailError {
    #[error("{0}")]
    ListShards(String),
    #[error("{}", without_sdk_debug(&.0.to_string()))]
    Read(#[from] RetrievalError),
    #[error("cannot write to standard output: {0}")]
    Output(io::Error),
}

/// Parses `--timestamp`: an RFC 3339 date-time (`2025-01-31T12:00:00Z`, `...+01:00`, fractions
/// allowed) or Unix epoch milliseconds.
pub fn parse_timestamp(text: &str) -> Result<SystemTime, String> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        let millis: u64 = text.parse().map_err(|e| format!("{text:?} is not a number of milliseconds: {e}"))?;
        return UNIX_EPOCH
            .checked_add(Duration::from_millis(millis))
            .ok_or_else(|| format!("{text} milliseconds is too far in the future"));
    }
    let parsed = DateTime::from_str(text, DateTimeFormat::DateTimeWithOffset).map_err(|e| {
        format!("{text:?} is neither an RFC 3339 date-time (2025-01-31T12:00:00Z) nor epoch milliseconds: {e}")
    })?;
    SystemTime::try_from(parsed).map_err(|e| format!("{text:?} cannot be a time on this system: {e}"))
}

/// An SDK error message (`DisplayErrorContext`) without the debug dump of the raw response that
/// ends it: the error chain says what happened; the dump is for bug reports, not for a terminal.
pub fn without_sdk_debug(message: &str) -> &str {
    const DUMPS: [&str; 5] =
        [" (ServiceError(", " (DispatchFailure(", " (TimeoutError(", " (ResponseError(", " (ConstructionFailure("];
    let end = DUMPS.iter().filter_map(|dump| message.find(dump)).min().unwrap_or(message.len());
    &message[..end]
}

/// Completes on Ctrl-C or, on Unix, SIGTERM (the handlers are installed when it is first polled).
pub async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Reads the stream as `options` say and writes one line per user record to `out`, until the run
/// ends (see the module documentation). Messages about retries go to standard error.
pub async fn run(
    client: aws_sdk_kinesis::Client,
    options: Options,
    out: impl Write + Send + 'static,
    stop: impl Future<Output = ()>,
) -> Result<Summary, TailError> {
    let shards = list_with_retries(&client, &options.stream).await?;
    let mut lineage = Lineage::new(&shards, &options.start);

    let (lines, receiver) = mpsc::channel::<Vec<String>>(OUTPUT_BATCHES);
    let (writer_done, mut writer_end) = oneshot::channel();
    let limit = options.limit;
    std::thread::Builder::new()
        .name("ktk-tail-writer".into())
        .spawn(move || {
            let _ = writer_done.send(write_lines(receiver, out, limit));
        })
        .map_err(TailError::Output)?;

    let reading = Reading { client: client.clone(), options: options.clone(), lines };
    let mut tasks = JoinSet::new();
    reading.start(&mut tasks, lineage.take_ready());
    tokio::pin!(stop);
    // What ended the reading, if not the writer.
    let mut writer = None;
    let ended: Result<Ending, TailError> = loop {
        if tasks.is_empty() {
            break Ok(Ending::CaughtUp);
        }
        tokio::select! {
            () = &mut stop => break Ok(Ending::Interrupted),
            end = &mut writer_end => {
                writer = Some(end.unwrap_or(WriterEnd::Drained { records: 0 }));
                break Ok(Ending::CaughtUp);
            }
            Some(joined) = tasks.join_next() => {
                let (shard, outcome) = match joined {
                    Ok(done) => done,
                    Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
                    Err(_) => continue,
                };
                match outcome {
                    Ok(ShardOutcome::Ended(children)) => {
                        lineage.ended(&shard);
                        if lineage.needs_listing(&shard, &children) {
                            match list_with_retries(&client, &options.stream).await {
                                Ok(listing) => lineage.add_descendants(&listing),
                                Err(error) => break Err(error),
                            }
                        }
                        reading.start(&mut tasks, lineage.take_ready());
                    }
                    Ok(ShardOutcome::CaughtUp) => lineage.caught_up(&shard),
                    // The writer is gone; its end is picked up next.
                    Ok(ShardOutcome::OutputGone) => {}
                    Err(error) => break Err(error.into()),
                }
            }
        }
    };
    // Nothing is half done in a shard task (it only reads and sends), so stopping them is safe.
    tasks.shutdown().await;
    drop(reading);
    let writer = match writer {
        Some(end) => end,
        // Every sender is gone, so the writer drains what is queued and ends.
        None => writer_end.await.unwrap_or(WriterEnd::Drained { records: 0 }),
    };
    let ending = ended?;
    let summary = |ending, records| {
        // Shards still waiting when the run stopped early were simply not reached.
        let shards_not_started = if ending == Ending::CaughtUp { lineage.waiting() } else { 0 };
        Summary { ending, records, shards_not_started }
    };
    match writer {
        WriterEnd::Drained { records } => Ok(summary(ending, records)),
        WriterEnd::Limit { records } => Ok(summary(Ending::LimitReached, records)),
        WriterEnd::Closed { records } => Ok(summary(Ending::OutputClosed, records)),
        WriterEnd::Failed(error) => Err(TailError::Output(error)),
    }
}

/// What every shard task shares.
#[derive(Debug)]
struct Reading {
    client: aws_sdk_kinesis::Client,
    options: Options,
    lines: mpsc::Sender<Vec<String>>,
}

impl Reading {
    fn start(&self, tasks: &mut JoinSet<(String, Result<ShardOutcome, RetrievalError>)>, ready: Vec<ReadyShard>) {
        for shard in ready {
            let reader = ShardReader::new(
                self.client.clone(),
                &self.options.stream,
                &shard.shard_id,
                shard.range,
                shard.start,
                ReaderConfig::default(),
            );
            let task = ShardTask {
                reader,
                closed: shard.closed,
                follow: self.options.follow,
                events: self.options.events,
                lines: self.lines.clone(),
            };
            tasks.spawn(async move { (shard.shard_id, task.run().await) });
        }
    }
}

/// How a shard task finished.
#[derive(Debug)]
enum ShardOutcome {
    /// Read to its end; these are its children (as `GetRecords` named them; maybe none).
    Ended(Vec<String>),
    /// An open shard with nothing more to read now (only without `--follow`).
    CaughtUp,
    /// The writer stopped taking lines.
    OutputGone,
}

/// Reads one shard and sends its lines.
#[derive(Debug)]
struct ShardTask {
    reader: ShardReader,
    /// A closed shard is always read to its end: its children wait for that.
    closed: bool,
    follow: bool,
    events: bool,
    lines: mpsc::Sender<Vec<String>>,
}

impl ShardTask {
    async fn run(mut self) -> Result<ShardOutcome, RetrievalError> {
        let mut failures = 0u32;
        let mut backoff = Backoff::new(FIRST_BACKOFF, MAX_BACKOFF);
        loop {
            let result = match self.reader.read().await {
                Ok(result) => result,
                // A closed shard whose records are all past retention: nothing to read, and its
                // children may start.
                Err(_) if self.reader.ended() => return Ok(ShardOutcome::Ended(Vec::new())),
                Err(error) if error.is_retryable() => {
                    failures += 1;
                    let throttled = matches!(error, RetrievalError::Throttled { .. });
                    if !throttled && !self.follow && failures >= MAX_FAILURES_IN_A_ROW {
                        return Err(error);
                    }
                    let wait = backoff.next_delay();
                    if !throttled {
                        eprintln!("ktk tail: {error}; retrying in {} ms", wait.as_millis());
                    }
                    tokio::time::sleep(wait).await;
                    continue;
                }
                Err(error) => return Err(error),
            };
            failures = 0;
            backoff.reset();
            if !result.records.is_empty() {
                let shard = self.reader.shard_id();
                let batch = result.records.iter().map(|record| render(shard, record, self.events)).collect();
                if self.lines.send(batch).await.is_err() {
                    return Ok(ShardOutcome::OutputGone);
                }
            }
            if let Some(children) = result.shard_end {
                return Ok(ShardOutcome::Ended(children));
            }
            let idle = result.records.is_empty() && result.millis_behind_latest.unwrap_or(0) <= 0;
            if idle && self.follow {
                tokio::time::sleep(IDLE_INTERVAL).await;
            } else if idle && !self.closed {
                return Ok(ShardOutcome::CaughtUp);
            }
        }
    }
}

async fn list_with_retries(client: &aws_sdk_kinesis::Client, stream: &str) -> Result<Vec<Shard>, TailError> {
    let mut attempt = 0;
    let mut backoff = Backoff::new(FIRST_BACKOFF, MAX_BACKOFF);
    loop {
        attempt += 1;
        match list_shards(client, stream).await {
            Ok(shards) => return Ok(shards),
            Err(error) if error.is_retryable() && attempt < LIST_ATTEMPTS => {
                tokio::time::sleep(backoff.next_delay()).await;
            }
            // The SDK's full error context is long; the two usual causes get a short message.
            Err(ktk_consumer::Error::ListShards { message, .. }) if message.contains("ResourceNotFoundException") => {
                return Err(TailError::ListShards(format!(
                    "stream {stream:?} not found; check the stream name and the AWS region"
                )));
            }
            Err(ktk_consumer::Error::ListShards { message, .. }) if message.contains("AccessDenied") => {
                return Err(TailError::ListShards(format!(
                    "not allowed to list the shards of stream {stream:?}; grant kinesis:ListShards, \
                     GetShardIterator and GetRecords"
                )));
            }
            Err(ktk_consumer::Error::ListShards { message, .. }) => {
                return Err(TailError::ListShards(format!("cannot list the shards of stream {stream:?}: {message}")));
            }
            Err(other) => return Err(TailError::ListShards(other.to_string())),
        }
    }
}

/// One user record as `ktk tail` prints it. The field names are a public interface.
#[derive(Debug, Serialize)]
struct RecordLine<'a> {
    shard: &'a str,
    partition_key: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    explicit_hash_key: Option<&'a str>,
    sequence_number: &'a str,
    sub_sequence_number: u64,
    approximate_arrival_ms: Option<u64>,
    aggregated: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<Event>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// The JSON line for one record; with `events`, its data decoded as an `events.v1` Event (or, if
/// it is not one, the data as base64 and the reason).
fn render(shard: &str, record: &ConsumerRecord, events: bool) -> String {
    let mut line = RecordLine {
        shard,
        partition_key: &record.partition_key,
        explicit_hash_key: record.explicit_hash_key.as_deref(),
        sequence_number: &record.sequence_number,
        sub_sequence_number: record.sub_sequence_number,
        approximate_arrival_ms: record
            .approximate_arrival
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .and_then(|d| u64::try_from(d.as_millis()).ok()),
        aggregated: record.aggregated,
        data: None,
        event: None,
        error: None,
    };
    if events {
        match Event::decode(record.data.clone()) {
            Ok(event) => line.event = Some(event),
            Err(error) => line.error = Some(format!("not an events.v1 Event: {error}")),
        }
    }
    if line.event.is_none() {
        line.data = Some(STANDARD.encode(&record.data));
    }
    // Serializing plain strings, numbers and a generated message cannot fail.
    serde_json::to_string(&line).unwrap_or_default()
}

/// How the writer finished.
#[derive(Debug)]
enum WriterEnd {
    /// Every sender went away and everything sent was written.
    Drained {
        records: u64,
    },
    Limit {
        records: u64,
    },
    /// The output was closed by its reader (a broken pipe).
    Closed {
        records: u64,
    },
    Failed(io::Error),
}

/// Writes the batches as they come, flushing whenever nothing more is waiting (so a followed
/// stream shows up at once, and a bulk read is written in large blocks).
fn write_lines(mut batches: mpsc::Receiver<Vec<String>>, out: impl Write, limit: Option<u64>) -> WriterEnd {
    let mut out = io::BufWriter::with_capacity(256 * 1024, out);
    let mut records = 0u64;
    let ended = |error: io::Error, records| match error.kind() {
        io::ErrorKind::BrokenPipe => WriterEnd::Closed { records },
        _ => WriterEnd::Failed(error),
    };
    if limit == Some(0) {
        return WriterEnd::Limit { records };
    }
    let mut next = batches.blocking_recv();
    while let Some(batch) = next {
        for line in batch {
            if let Err(error) = out.write_all(line.as_bytes()).and_then(|()| out.write_all(b"\n")) {
                return ended(error, records);
            }
            records += 1;
            if limit == Some(records) {
                return match out.flush() {
                    Ok(()) => WriterEnd::Limit { records },
                    Err(error) => ended(error, records),
                };
            }
        }
        next = match batches.try_recv() {
            Ok(batch) => Some(batch),
            Err(_) => {
                if let Err(error) = out.flush() {
                    return ended(error, records);
                }
                batches.blocking_recv()
            }
        };
    }
    match out.flush() {
        Ok(()) => WriterEnd::Drained { records },
        Err(error) => ended(error, records),
    }
}

/// A shard that may be read now.
#[derive(Debug, Clone, PartialEq)]
struct ReadyShard {
    shard_id: String,
    range: ktk_proto::keys::HashKeyRange,
    start: StartingPosition,
    closed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for a parent to be read to its end.
    Waiting,
    Reading,
    Ended,
    CaughtUp,
}

#[derive(Debug, Clone)]
struct Tracked {
    shard: Shard,
    start: StartingPosition,
    state: State,
}

/// The shards a run reads and the order it may read them in: a shard starts only when every
/// parent that the run reads has ended. Parents the run does not read (expired, or closed ones
/// with `--from latest`) do not hold their children back.
#[derive(Debug, Default)]
struct Lineage {
    shards: BTreeMap<String, Tracked>,
}

impl Lineage {
    /// The shards to read from `listing`: all of them, except with [`Start::Latest`], where only
    /// the open ones (closed shards hold nothing newer than now).
    fn new(listing: &[Shard], start: &Start) -> Lineage {
        let position = match start {
            Start::TrimHorizon => StartingPosition::TrimHorizon,
            Start::Latest => StartingPosition::Latest,
            Start::AtTimestamp(time) => StartingPosition::AtTimestamp(*time),
        };
        let shards = listing
            .iter()
            .filter(|shard| shard.open || *start != Start::Latest)
            .map(|shard| {
                let tracked = Tracked { shard: shard.clone(), start: position.clone(), state: State::Waiting };
                (shard.shard_id.clone(), tracked)
            })
            .collect();
        Lineage { shards }
    }

    /// The waiting shards whose tracked parents have all ended, now marked as being read.
    fn take_ready(&mut self) -> Vec<ReadyShard> {
        let ready: Vec<String> = self
            .shards
            .values()
            .filter(|t| t.state == State::Waiting)
            .filter(|t| {
                t.shard.parents.iter().all(|p| self.shards.get(p).is_none_or(|parent| parent.state == State::Ended))
            })
            .map(|t| t.shard.shard_id.clone())
            .collect();
        ready
            .into_iter()
            .filter_map(|id| {
                let tracked = self.shards.get_mut(&id)?;
                tracked.state = State::Reading;
                Some(ReadyShard {
                    shard_id: id,
                    range: tracked.shard.range,
                    start: tracked.start.clone(),
                    closed: !tracked.shard.open,
                })
            })
            .collect()
    }

    fn ended(&mut self, shard: &str) {
        if let Some(tracked) = self.shards.get_mut(shard) {
            tracked.state = State::Ended;
        }
    }

    fn caught_up(&mut self, shard: &str) {
        if let Some(tracked) = self.shards.get_mut(shard) {
            tracked.state = State::CaughtUp;
        }
    }

    /// Whether the shards must be listed again to learn the children of `shard`, which ended:
    /// `GetRecords` named a child the run does not know, or named none and no known shard has
    /// `shard` as a parent.
    fn needs_listing(&self, shard: &str, children: &[String]) -> bool {
        if children.is_empty() {
            return !self.shards.values().any(|t| t.shard.parents.contains(shard));
        }
        children.iter().any(|child| !self.shards.contains_key(child))
    }

    /// Adds the shards of `listing` the run does not know yet that descend from a shard it reads;
    /// they are read from their first record, after their parents.
    fn add_descendants(&mut self, listing: &[Shard]) {
        loop {
            let mut added = false;
            for shard in listing {
                if self.shards.contains_key(&shard.shard_id)
                    || !shard.parents.iter().any(|p| self.shards.contains_key(p))
                {
                    continue;
                }
                let tracked =
                    Tracked { shard: shard.clone(), start: StartingPosition::TrimHorizon, state: State::Waiting };
                self.shards.insert(shard.shard_id.clone(), tracked);
                added = true;
            }
            if !added {
                return;
            }
        }
    }

    /// Shards still waiting for a parent.
    fn waiting(&self) -> usize {
        self.shards.values().filter(|t| t.state == State::Waiting).count()
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use ktk_proto::keys::HashKeyRange;

    use super::*;

    fn shard(id: &str, parents: &[&str], open: bool) -> Shard {
        Shard {
            shard_id: id.into(),
            parents: parents.iter().map(|p| (*p).to_owned()).collect(),
            range: HashKeyRange::FULL,
            open,
        }
    }

    fn ids(ready: &[ReadyShard]) -> Vec<&str> {
        ready.iter().map(|r| r.shard_id.as_str()).collect()
    }

    /// s0 split into s2 and s3, which merged into s4; s1 open all along.
    fn resharded() -> Vec<Shard> {
        vec![
            shard("s0", &[], false),
            shard("s1", &[], true),
            shard("s2", &["s0"], false),
            shard("s3", &["s0"], false),
            shard("s4", &["s2", "s3"], true),
        ]
    }

    #[test]
    fn parents_are_read_before_children() {
        let mut lineage = Lineage::new(&resharded(), &Start::TrimHorizon);
        let first = lineage.take_ready();
        assert_eq!(ids(&first), ["s0", "s1"]);
        assert!(first[0].closed && !first[1].closed);
        assert_eq!(first[0].start, StartingPosition::TrimHorizon);
        assert!(lineage.take_ready().is_empty(), "nothing twice, children wait");
        lineage.caught_up("s1");
        assert!(lineage.take_ready().is_empty());
        lineage.ended("s0");
        assert_eq!(ids(&lineage.take_ready()), ["s2", "s3"]);
        lineage.ended("s2");
        assert!(lineage.take_ready().is_empty(), "a merge waits for both parents");
        assert_eq!(lineage.waiting(), 1);
        lineage.ended("s3");
        assert_eq!(ids(&lineage.take_ready()), ["s4"]);
        assert_eq!(lineage.waiting(), 0);
    }

    #[test]
    fn latest_reads_open_shards_only_and_ignores_unread_parents() {
        let mut lineage = Lineage::new(&resharded(), &Start::Latest);
        let ready = lineage.take_ready();
        assert_eq!(ids(&ready), ["s1", "s4"]);
        assert!(ready.iter().all(|r| r.start == StartingPosition::Latest));
    }

    #[test]
    fn children_found_later_start_at_trim_horizon() {
        let at = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut lineage = Lineage::new(&[shard("s0", &[], true), shard("s1", &[], true)], &Start::AtTimestamp(at));
        let ready = lineage.take_ready();
        assert!(ready.iter().all(|r| r.start == StartingPosition::AtTimestamp(at)));
        lineage.ended("s0");
        assert!(lineage.needs_listing("s0", &["s2".into(), "s3".into()]));
        assert!(lineage.needs_listing("s0", &[]));
        // s5 descends from s1, which is still being read; s9 from a shard the run does not read.
        let later = [
            shard("s0", &[], false),
            shard("s1", &[], false),
            shard("s2", &["s0"], true),
            shard("s3", &["s0"], true),
            shard("s5", &["s1"], true),
            shard("s6", &["s5"], true),
            shard("s9", &["s8"], true),
        ];
        lineage.add_descendants(&later);
        assert!(!lineage.needs_listing("s0", &["s2".into(), "s3".into()]));
        assert!(!lineage.needs_listing("s0", &[]));
        let ready = lineage.take_ready();
        assert_eq!(ids(&ready), ["s2", "s3"]);
        assert!(ready.iter().all(|r| r.start == StartingPosition::TrimHorizon));
        lineage.ended("s1");
        assert_eq!(ids(&lineage.take_ready()), ["s5"]);
        lineage.ended("s5");
        assert_eq!(ids(&lineage.take_ready()), ["s6"]);
        assert!(!lineage.shards.contains_key("s9"));
    }

    #[test]
    fn timestamps() {
        assert_eq!(parse_timestamp("1700000000123"), Ok(UNIX_EPOCH + Duration::from_millis(1_700_000_000_123)));
        assert_eq!(parse_timestamp("2023-11-14T22:13:20Z"), Ok(UNIX_EPOCH + Duration::from_secs(1_700_000_000)));
        assert_eq!(
            parse_timestamp("2023-11-14T23:13:20.5+01:00"),
            Ok(UNIX_EPOCH + Duration::from_millis(1_700_000_000_500))
        );
        for bad in ["", "yesterday", "2023-11-14", "2023-11-14 22:13:20Z", "-5", "99999999999999999999999"] {
            assert!(parse_timestamp(bad).is_err(), "{bad:?}");
        }
    }

    fn record(data: &[u8]) -> ConsumerRecord {
        ConsumerRecord {
            sequence_number: "49600000000000000000000000000000000000000000000000000002".into(),
            sub_sequence_number: 3,
            partition_key: "user-1".into(),
            explicit_hash_key: None,
            data: Bytes::copy_from_slice(data),
            approximate_arrival: Some(UNIX_EPOCH + Duration::from_millis(1_700_000_000_123)),
            aggregated: true,
        }
    }

    #[test]
    fn record_lines() {
        let line: serde_json::Value =
            serde_json::from_str(&render("shardId-000000000001", &record(b"hello"), false)).expect("JSON");
        assert_eq!(
            line,
            serde_json::json!({
                "shard": "shardId-000000000001",
                "partition_key": "user-1",
                "sequence_number": "49600000000000000000000000000000000000000000000000000002",
                "sub_sequence_number": 3,
                "approximate_arrival_ms": 1_700_000_000_123u64,
                "aggregated": true,
                "data": "aGVsbG8=",
            })
        );
        let event = Event { event_id: "e-1".into(), user_id: "u".into(), app_id: "tv-ios".into(), ..Event::default() };
        let line: serde_json::Value =
            serde_json::from_str(&render("s", &record(&event.encode_to_vec()), true)).expect("JSON");
        assert_eq!(line["event"], serde_json::json!({"eventId": "e-1", "userId": "u", "appId": "tv-ios"}));
        assert!(line.get("data").is_none() && line.get("error").is_none(), "{line}");
        let line: serde_json::Value = serde_json::from_str(&render("s", &record(&[0xff, 0xff]), true)).expect("JSON");
        assert_eq!(line["data"], "//8=");
        assert!(line["error"].as_str().is_some_and(|e| e.contains("events.v1")), "{line}");
        assert!(line.get("event").is_none());
    }

    #[test]
    fn writer_stops_at_the_limit_and_on_a_broken_pipe() {
        let (sender, receiver) = mpsc::channel(4);
        sender.try_send(vec!["a".to_owned(), "b".to_owned()]).expect("room");
        sender.try_send(vec!["c".to_owned()]).expect("room");
        let mut out = Vec::new();
        assert!(matches!(write_lines(receiver, &mut out, Some(2)), WriterEnd::Limit { records: 2 }));
        assert_eq!(out, b"a\nb\n");

        struct ClosedPipe;
        impl Write for ClosedPipe {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> io::Result<()> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
        }
        let (sender, receiver) = mpsc::channel(4);
        sender.try_send(vec!["a".to_owned()]).expect("room");
        drop(sender);
        assert!(matches!(write_lines(receiver, ClosedPipe, None), WriterEnd::Closed { records: 1 }));
    }

    #[test]
    fn sdk_debug_dumps_are_cut() {
        let message = "reading shard s failed: InvalidArgumentException: service error: InvalidArgumentException: \
                       too late (ServiceError(ServiceError { source: InvalidArgumentException { .. } }))";
        assert_eq!(
            without_sdk_debug(message),
            "reading shard s failed: InvalidArgumentException: service error: InvalidArgumentException: too late"
        );
        assert_eq!(without_sdk_debug("plain"), "plain");
    }
}
