//! `ktk produce`: records from standard input put into a stream through [`ktk_producer::Producer`].
//!
//! Data flow: a reader thread turns input lines into records (or a reason the line is unusable)
//! and hands them over in small batches through a bounded channel; the async side puts each one
//! (`put` waits while the producer is at its outstanding limit) and keeps its receipt, tagged
//! with the line number, in a window of at most `max_outstanding` unresolved receipts. Every
//! channel and window is bounded, so memory stays flat however large the input. At the end of
//! the input (or when `stop` fires) the producer is shut down, which sends what is buffered, and
//! the remaining receipts are settled. Unusable lines and records that could not be put are
//! reported on the error stream with their line numbers; the [`Report`] counts both, so the
//! caller can exit non-zero.
//!
//! A sampler task reads the producer's stats every [`SAMPLE_EVERY`] and keeps each change of the
//! adaptive `PutRecords` concurrency limit and request timeout (the [`Report`]'s `concurrency`),
//! and with `progress` prints one line of progress every so often.

use std::future::Future;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::{FutureExt, future};
use ktk_producer::{Producer, ProducerConfig, ProducerStats, PutError, PutErrorKind, PutOutcome, Record};
use serde::Serialize;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use tokio::sync::mpsc;

/// Most lines the reader hands over at once: enough to make the channel's cost negligible, few
/// enough that a batch never holds much memory. A batch also goes as soon as the input has nothing
/// more ready, so slow input (`tail -f`) is not held back.
const LINES_PER_BATCH: usize = 256;
/// The reader's buffer.
const INPUT_BUFFER: usize = 256 * 1024;
/// Batches waiting between the reader and the producer.
const BATCHES_IN_CHANNEL: usize = 8;
/// At the end of the input, how long the producer may go without resolving any record before
/// the run gives up on what is left. Not a deadline for the whole rest: records waiting for room
/// in their shard's window do not expire, and a slow stream may take minutes to take them all;
/// but one call takes at most the longest request timeout (30 s) plus a backoff, so a minute
/// without any record resolved means no progress.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the shutdown after the final flush (or after giving up on it) waits.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the concurrency limit and the request timeout are sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// Most changes of the concurrency limit kept for the summary (the first ones); later ones only
/// move the lowest, highest and last values.
const MAX_CONCURRENCY_CHANGES: usize = 1_000;
/// How far the request timeout must move, as a share of the last one kept, to be a change.
const TIMEOUT_CHANGE: f64 = 0.2;
/// Changes of the concurrency limit written in the text summary; the JSON summary has them all.
const TEXT_CONCURRENCY_CHANGES: usize = 20;

/// How input lines become records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputFormat {
    /// One user record per line, as `ktk agg encode` reads them:
    /// `{"partition_key", "explicit_hash_key"?, "data": "<base64>"}`, other fields refused.
    JsonLines,
    /// Each line's bytes (without its line terminator) are one record's data. The partition key
    /// is the value of `key_field` when the line is a JSON object with that field as a string or
    /// a number, else a random UUID.
    Text { key_field: Option<String> },
}

/// What `ktk produce` was asked to do, beyond the producer's own settings.
#[derive(Debug, Clone)]
pub struct Options {
    pub input: InputFormat,
    /// Most receipts awaited at once (and the producer's outstanding records limit).
    pub max_outstanding: usize,
    /// Print a line of progress (records put, the concurrency limit, the request timeout) on the
    /// error stream this often.
    pub progress: Option<Duration>,
}

/// The adaptive concurrency of `PutRecords` at one moment of a run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ConcurrencySample {
    /// Seconds since the run started.
    #[serde(rename = "t")]
    pub seconds: f64,
    /// Calls that may be in flight.
    pub limit: u64,
    /// The timeout the next call gets.
    pub request_timeout_ms: u64,
}

/// How the concurrency limit moved during a run.
#[derive(Debug, Clone, Default)]
pub struct ConcurrencyHistory {
    /// The first sample and each change after it (at most [`MAX_CONCURRENCY_CHANGES`]): a new
    /// limit, or a request timeout at least [`TIMEOUT_CHANGE`] away from the last one kept (it
    /// moves a little with every answer).
    pub changes: Vec<ConcurrencySample>,
    /// Changes not kept in `changes`.
    pub changes_dropped: u64,
    pub lowest_limit: u64,
    pub highest_limit: u64,
    pub highest_timeout_ms: u64,
    /// The last change's limit and timeout.
    last: Option<(u64, u64)>,
}

impl ConcurrencyHistory {
    fn note(&mut self, sample: ConcurrencySample) {
        let changed = self.last.is_none_or(|(limit, timeout_ms)| {
            let moved = sample.request_timeout_ms.abs_diff(timeout_ms) as f64;
            limit != sample.limit || moved >= timeout_ms as f64 * TIMEOUT_CHANGE
        });
        if self.last.is_none() {
            self.lowest_limit = sample.limit;
        }
        self.lowest_limit = self.lowest_limit.min(sample.limit);
        self.highest_limit = self.highest_limit.max(sample.limit);
        self.highest_timeout_ms = self.highest_timeout_ms.max(sample.request_timeout_ms);
        if !changed {
            return;
        }
        self.last = Some((sample.limit, sample.request_timeout_ms));
        if self.changes.len() < MAX_CONCURRENCY_CHANGES {
            self.changes.push(sample);
        } else {
            self.changes_dropped += 1;
        }
    }
}

/// What a run did.
#[derive(Debug)]
pub struct Report {
    /// Non-blank input lines read.
    pub lines: u64,
    pub malformed_lines: u64,
    /// Records that could not be put (each reported on the error stream).
    pub failed: u64,
    /// The input was not read to its end because the run was stopped.
    pub interrupted: bool,
    /// Reading the input failed part way; what was read before was still put.
    pub read_error: Option<io::Error>,
    pub stats: ProducerStats,
    pub elapsed: Duration,
    /// The concurrency limit over the run.
    pub concurrency: ConcurrencyHistory,
}

impl Report {
    /// Whether every input line became a record that Kinesis accepted.
    pub fn all_put(&self) -> bool {
        self.malformed_lines == 0 && self.failed == 0 && !self.interrupted && self.read_error.is_none()
    }

    pub fn user_records_per_second(&self) -> f64 {
        let seconds = self.elapsed.as_secs_f64();
        if seconds > 0.0 { self.stats.user_records_put as f64 / seconds } else { 0.0 }
    }

    /// One human-readable paragraph for the error stream.
    pub fn write_text(&self, out: &mut impl Write) -> io::Result<()> {
        let s = &self.stats;
        writeln!(
            out,
            "ktk produce: {} user records put in {:.2} s ({:.0}/s) as {} Kinesis records ({:.1} user records each) \
             in {} PutRecords calls; {} retries, {} throttled, {} failed ({} expired), {} malformed lines",
            s.user_records_put,
            self.elapsed.as_secs_f64(),
            self.user_records_per_second(),
            s.kinesis_records_put,
            s.user_records_per_kinesis_record(),
            s.put_records_calls,
            s.retries,
            s.throttled,
            self.failed,
            s.user_records_expired,
            self.malformed_lines,
        )?;
        let c = &self.concurrency;
        writeln!(
            out,
            "ktk produce: PutRecords calls in flight: at most {} at the lowest, {} at the highest, {} at the end; \
             request timeout up to {:.1} s; {} calls timed out ({} answered late and settled by their answer, \
             {} given up on), {} user records sent again after a call given up on (each may be in the stream twice)",
            c.lowest_limit,
            c.highest_limit,
            s.concurrency_limit,
            c.highest_timeout_ms as f64 / 1000.0,
            s.timed_out_calls,
            s.late_answers,
            s.abandoned_calls,
            s.resent_after_timeout,
        )?;
        if c.changes.len() > 1 {
            let shown: Vec<String> = c
                .changes
                .iter()
                .take(TEXT_CONCURRENCY_CHANGES)
                .map(|x| format!("{:.1} s: {} ({:.1} s)", x.seconds, x.limit, x.request_timeout_ms as f64 / 1000.0))
                .collect();
            let more = (c.changes.len() - shown.len()) as u64 + c.changes_dropped;
            write!(out, "ktk produce: concurrency limit over time (request timeout): {}", shown.join(", "))?;
            if more > 0 {
                write!(out, ", and {more} more changes")?;
            }
            writeln!(out)?;
        }
        if let Some(error) = &self.read_error {
            writeln!(out, "ktk produce: reading the input failed, the rest of it was not put: {error}")?;
        }
        if self.interrupted {
            writeln!(out, "ktk produce: interrupted; the rest of the input was not read")?;
        }
        Ok(())
    }

    /// The summary as one JSON object (the field names are a public interface).
    pub fn to_json(&self) -> serde_json::Value {
        let s = &self.stats;
        let summary = SummaryJson {
            lines: self.lines,
            malformed_lines: self.malformed_lines,
            user_records: s.user_records_put,
            kinesis_records: s.kinesis_records_put,
            put_records_calls: s.put_records_calls,
            retries: s.retries,
            throttled: s.throttled,
            failures: self.failed,
            expired: s.user_records_expired,
            elapsed_seconds: self.elapsed.as_secs_f64(),
            user_records_per_second: self.user_records_per_second(),
            user_records_per_kinesis_record: s.user_records_per_kinesis_record(),
            interrupted: self.interrupted,
            timed_out_calls: s.timed_out_calls,
            late_answers: s.late_answers,
            abandoned_calls: s.abandoned_calls,
            resent_after_timeout: s.resent_after_timeout,
            concurrency_limit: s.concurrency_limit,
            concurrency_limit_lowest: self.concurrency.lowest_limit,
            concurrency_limit_highest: self.concurrency.highest_limit,
            request_timeout_ms_highest: self.concurrency.highest_timeout_ms,
            concurrency: &self.concurrency.changes,
        };
        serde_json::to_value(summary).unwrap_or_default()
    }
}

#[derive(Debug, Serialize)]
struct SummaryJson<'a> {
    lines: u64,
    malformed_lines: u64,
    user_records: u64,
    kinesis_records: u64,
    put_records_calls: u64,
    retries: u64,
    throttled: u64,
    failures: u64,
    expired: u64,
    elapsed_seconds: f64,
    user_records_per_second: f64,
    user_records_per_kinesis_record: f64,
    interrupted: bool,
    timed_out_calls: u64,
    late_answers: u64,
    abandoned_calls: u64,
    resent_after_timeout: u64,
    concurrency_limit: u64,
    concurrency_limit_lowest: u64,
    concurrency_limit_highest: u64,
    request_timeout_ms_highest: u64,
    /// The first sample and every change of the limit or the timeout, in order.
    concurrency: &'a [ConcurrencySample],
}

/// The producer settings `ktk produce` passes on; the rest keep the KPL defaults.
pub fn producer_config(
    stream: &str,
    aggregation: bool,
    max_buffered: Duration,
    rate_limit_percent: u32,
    max_outstanding: usize,
) -> ProducerConfig {
    ProducerConfig::new(stream)
        .with_aggregation(aggregation)
        .with_record_max_buffered_time(max_buffered)
        .with_rate_limit_percent(rate_limit_percent)
        .with_max_outstanding_records(max_outstanding)
}

/// Resolves at the first Ctrl-C (after which the run stops reading and sends what it has); a
/// second Ctrl-C ends the process at once. Never resolves if the signal cannot be watched.
pub fn interrupt() -> impl Future<Output = ()> {
    let (stopped, stop) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("ktk produce: interrupted; sending what was read (Ctrl-C again to quit now)");
            let _ = stopped.send(());
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(130);
            }
        }
    });
    async move {
        if stop.await.is_err() {
            future::pending::<()>().await;
        }
    }
}

/// One input line, parsed.
#[derive(Debug)]
struct Line {
    number: u64,
    parsed: Result<Record, String>,
}

type Batch = io::Result<Vec<Line>>;

/// Puts every record of `input` through `producer`, then shuts the producer down. Returns early
/// only if the error stream cannot be written.
pub async fn run(
    producer: &Producer,
    options: &Options,
    input: impl Read + Send + 'static,
    err: &mut impl Write,
    stop: impl Future<Output = ()>,
) -> io::Result<Report> {
    let started = Instant::now();
    let (batches, mut incoming) = mpsc::channel::<Batch>(BATCHES_IN_CHANNEL);
    let format = options.input.clone();
    // A plain thread, not `spawn_blocking`: a read blocked on a terminal must not keep the
    // runtime from shutting down after an interrupt.
    std::thread::Builder::new().name("ktk-produce-input".into()).spawn(move || read_input(input, &format, batches))?;

    let max_outstanding = options.max_outstanding.max(1);
    let mut receipts = FuturesUnordered::new();
    let mut report = Report {
        lines: 0,
        malformed_lines: 0,
        failed: 0,
        interrupted: false,
        read_error: None,
        stats: ProducerStats::default(),
        elapsed: Duration::ZERO,
        concurrency: ConcurrencyHistory::default(),
    };
    let history = Arc::new(Mutex::new(ConcurrencyHistory::default()));
    let sampler = tokio::spawn(sample_concurrency(producer.clone(), started, Arc::clone(&history), options.progress));
    tokio::pin!(stop);
    loop {
        let batch = tokio::select! {
            biased;
            () = &mut stop => {
                report.interrupted = true;
                break;
            }
            batch = incoming.recv() => batch,
        };
        let lines = match batch {
            None => break,
            Some(Err(error)) => {
                report.read_error = Some(error);
                break;
            }
            Some(Ok(lines)) => lines,
        };
        for Line { number, parsed } in lines {
            report.lines += 1;
            let record = match parsed {
                Ok(record) => record,
                Err(reason) => {
                    report.malformed_lines += 1;
                    writeln!(err, "line {number}: {reason}")?;
                    continue;
                }
            };
            while receipts.len() >= max_outstanding {
                if let Some((number, result)) = receipts.next().await {
                    settle(&mut report, number, result, err)?;
                }
            }
            match producer.put(record).await {
                Ok(receipt) => receipts.push(receipt.map(move |result| (number, result))),
                Err(error) => settle(&mut report, number, Err(error), err)?,
            }
            // Settle whatever has resolved meanwhile, without waiting, so failures are reported
            // while the run goes on and the window frees up.
            while let Some(Some((number, result))) = receipts.next().now_or_never() {
                settle(&mut report, number, result, err)?;
            }
        }
    }
    drop(incoming);

    // Flushing sends what is buffered at once instead of after the buffering time; shutting
    // down then answers every receipt left.
    flush_while_progressing(producer).await;
    producer.shutdown(SHUTDOWN_TIMEOUT).await;
    while let Some((number, result)) = receipts.next().await {
        settle(&mut report, number, result, err)?;
    }
    report.stats = producer.stats();
    report.elapsed = started.elapsed();
    sampler.abort();
    let mut history = history.lock().map(|mut h| std::mem::take(&mut *h)).unwrap_or_default();
    history.note(concurrency_sample(&report.stats, report.elapsed));
    report.concurrency = history;
    Ok(report)
}

/// Flushes the producer, for as long as it keeps resolving records: returns when everything is
/// resolved, or after [`STALL_TIMEOUT`] without any record resolved.
async fn flush_while_progressing(producer: &Producer) {
    let resolved = |s: ProducerStats| s.user_records_put + s.user_records_failed;
    let flushed = producer.flush();
    tokio::pin!(flushed);
    let (mut last, mut progress_at) = (resolved(producer.stats()), Instant::now());
    loop {
        tokio::select! {
            () = &mut flushed => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {
                let now = resolved(producer.stats());
                if now != last {
                    (last, progress_at) = (now, Instant::now());
                } else if progress_at.elapsed() >= STALL_TIMEOUT {
                    return;
                }
            }
        }
    }
}

fn concurrency_sample(stats: &ProducerStats, elapsed: Duration) -> ConcurrencySample {
    ConcurrencySample {
        seconds: (elapsed.as_secs_f64() * 10.0).round() / 10.0,
        limit: stats.concurrency_limit,
        request_timeout_ms: stats.request_timeout_ms,
    }
}

/// Notes the concurrency limit every [`SAMPLE_EVERY`] until aborted; with `progress`, prints a
/// line of progress on the error stream that often.
async fn sample_concurrency(
    producer: Producer,
    started: Instant,
    history: Arc<Mutex<ConcurrencyHistory>>,
    progress: Option<Duration>,
) {
    let mut last_progress = Instant::now();
    loop {
        let stats = producer.stats();
        let sample = concurrency_sample(&stats, started.elapsed());
        if let Ok(mut history) = history.lock() {
            history.note(sample);
        }
        if let Some(every) = progress
            && last_progress.elapsed() >= every
        {
            last_progress = Instant::now();
            eprintln!(
                "ktk produce: {:.0} s: {} put, {} failed ({} expired), {} retries; {} calls in flight at most, \
                 request timeout {:.1} s",
                sample.seconds,
                stats.user_records_put,
                stats.user_records_failed,
                stats.user_records_expired,
                stats.retries,
                sample.limit,
                sample.request_timeout_ms as f64 / 1000.0,
            );
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
}

fn settle(
    report: &mut Report,
    number: u64,
    result: Result<PutOutcome, PutError>,
    err: &mut impl Write,
) -> io::Result<()> {
    let Err(error) = result else { return Ok(()) };
    report.failed += 1;
    write!(err, "line {number}: not put: {error}")?;
    // An expired record's own error says only that time ran out; the last attempt says why.
    let last_failure = error.attempts().iter().rev().find_map(|a| a.error_code.as_deref().map(|c| (c, a)));
    if let Some((code, attempt)) = last_failure
        && !matches!(error.kind(), PutErrorKind::Rejected { .. })
    {
        write!(err, "; last error {code}: {}", attempt.error_message.as_deref().unwrap_or(""))?;
    }
    writeln!(err)
}

/// The reader thread: lines to records, in batches, until the input ends, a read fails, or the
/// other side hangs up.
fn read_input(input: impl Read, format: &InputFormat, batches: mpsc::Sender<Batch>) {
    let mut input = BufReader::with_capacity(INPUT_BUFFER, input);
    let mut batch = Vec::with_capacity(LINES_PER_BATCH);
    let mut number = 0u64;
    loop {
        let mut line = Vec::new();
        match input.read_until(b'\n', &mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => {
                let _ = batches.blocking_send(Ok(std::mem::take(&mut batch)));
                let _ = batches.blocking_send(Err(error));
                return;
            }
        }
        number += 1;
        strip_line_terminator(&mut line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let parsed = match format {
            InputFormat::JsonLines => parse_user_record(&line),
            InputFormat::Text { key_field } => text_record(line, key_field.as_deref()),
        };
        batch.push(Line { number, parsed });
        // An empty buffer means the next read may block: hand over what there is first.
        if (batch.len() == LINES_PER_BATCH || input.buffer().is_empty())
            && batches.blocking_send(Ok(std::mem::replace(&mut batch, Vec::with_capacity(LINES_PER_BATCH)))).is_err()
        {
            return;
        }
    }
    if !batch.is_empty() {
        let _ = batches.blocking_send(Ok(batch));
    }
}

fn strip_line_terminator(line: &mut Vec<u8>) {
    if line.last() == Some(&b'\n') {
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
    }
}

/// A `ktk agg encode` input line as a record, with its keys checked, so that a bad key is a
/// malformed line, as it is for `ktk agg encode`.
fn parse_user_record(line: &[u8]) -> Result<Record, String> {
    let (partition_key, explicit_hash_key, data) = crate::agg::parse_user_record(line)?.into_parts();
    Ok(Record { partition_key, explicit_hash_key, data })
}

/// A text line as a record: its bytes as data, keyed by `key_field` when the line has it.
fn text_record(line: Vec<u8>, key_field: Option<&str>) -> Result<Record, String> {
    let key = match key_field.and_then(|field| key_from_field(&line, field).map(|key| (field, key))) {
        Some((field, key)) => {
            ktk_proto::keys::validate_partition_key(&key).map_err(|e| format!("field {field:?}: {e}"))?;
            key
        }
        None => uuid::Uuid::new_v4().to_string(),
    };
    Ok(Record::new(key, Bytes::from(line)))
}

/// The value of `field` when `line` is a JSON object that has it as a string or a number. Only
/// that one field is materialised; the rest of the object is skipped.
fn key_from_field(line: &[u8], field: &str) -> Option<String> {
    if line.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return None;
    }
    let mut deserializer = serde_json::Deserializer::from_slice(line);
    let key = FieldValue(field).deserialize(&mut deserializer).ok()?;
    deserializer.end().ok()?;
    key
}

/// Finds one top-level field of a JSON object: `Some(text)` for a string or a number.
struct FieldValue<'f>(&'f str);

impl<'de> DeserializeSeed<'de> for FieldValue<'_> {
    type Value = Option<String>;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for FieldValue<'_> {
    type Value = Option<String>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        while let Some(is_field) = map.next_key_seed(FieldName(self.0))? {
            if is_field && found.is_none() {
                found = match map.next_value::<serde_json::Value>()? {
                    serde_json::Value::String(text) => Some(text),
                    serde_json::Value::Number(number) => Some(number.to_string()),
                    _ => None,
                };
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }
}

/// Whether an object key is the wanted field, without allocating it.
struct FieldName<'f>(&'f str);

impl<'de> DeserializeSeed<'de> for FieldName<'_> {
    type Value = bool;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for FieldName<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<bool, E> {
        Ok(key == self.0)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;

    use futures::future::BoxFuture;
    use ktk_producer::api::{CallError, Entry, EntryResult, KinesisApi, Retry, ShardInfo};
    use ktk_proto::aggregation::Deaggregator;
    use ktk_proto::keys::HashKeyRange;

    use super::*;

    #[test]
    fn user_record_lines_are_strict() {
        let ok =
            parse_user_record(br#"{"partition_key": "k", "explicit_hash_key": "5", "data": "aGk="}"#).expect("valid");
        assert_eq!((ok.partition_key.as_str(), ok.explicit_hash_key.as_deref()), ("k", Some("5")));
        assert_eq!(&ok.data[..], b"hi");
        assert_eq!(&parse_user_record(br#"{"partition_key": "k", "data": "aGk"}"#).expect("unpadded").data[..], b"hi");
        for (line, why) in [
            (&br#"{"partition_key": "k", "data": "aGk=", "extra": 1}"#[..], "unknown field"),
            (br#"{"partition_key": "", "data": "aGk="}"#, "partition key"),
            (br#"{"partition_key": "k", "data": "%%"}"#, "base64"),
            (br#"{"partition_key": "k", "explicit_hash_key": "01", "data": "aGk="}"#, "leading zero"),
            (b"not json", "not a user record"),
        ] {
            let error = parse_user_record(line).expect_err(why);
            assert!(error.contains(why), "{error}");
        }
    }

    #[test]
    fn text_lines_are_keyed_by_their_field_or_at_random() {
        let key = |line: &str| text_record(line.as_bytes().to_vec(), Some("user_id")).map(|r| r.partition_key);
        assert_eq!(key(r#"{"user_id": "u-1", "x": [1, {"user_id": 2}]}"#), Ok("u-1".into()));
        assert_eq!(key(r#"{"a": {"user_id": "nested"}, "user_id": 42}"#), Ok("42".into()));
        assert_eq!(key(r#"{"us\u0065r_id": "escaped"}"#), Ok("escaped".into()));
        for random in [r#"{"user_id": null}"#, r#"{"other": "x"}"#, "plain text", r#"{"user_id": "a"} trailing"#] {
            let key = key(random).expect("a random key");
            assert_eq!(uuid::Uuid::parse_str(&key).map(|u| u.get_version_num()), Ok(4), "{random}");
        }
        assert!(key(r#"{"user_id": ""}"#).expect_err("empty key").contains("user_id"));
        let record = text_record(b"raw \xff bytes".to_vec(), None).expect("any bytes");
        assert_eq!(&record.data[..], b"raw \xff bytes");
    }

    #[test]
    fn line_terminators_are_not_data() {
        for (raw, want) in [(&b"a\n"[..], &b"a"[..]), (b"a\r\n", b"a"), (b"a", b"a"), (b"a\r", b"a\r")] {
            let mut line = raw.to_vec();
            strip_line_terminator(&mut line);
            assert_eq!(line, want);
        }
    }

    /// Accepts every entry on one shard and keeps what it was sent.
    #[derive(Debug, Default)]
    struct Sink {
        entries: Mutex<Vec<Entry>>,
    }

    impl KinesisApi for Sink {
        fn put_records<'a>(
            &'a self,
            _stream: &'a str,
            entries: Vec<Entry>,
        ) -> BoxFuture<'a, Result<Vec<EntryResult>, CallError>> {
            Box::pin(async move {
                let mut kept = self.entries.lock().map_err(|_| CallError {
                    code: "Poisoned".into(),
                    message: String::new(),
                    retry: Retry::No,
                })?;
                let results = (0..entries.len())
                    .map(|i| EntryResult::Put {
                        shard_id: "shardId-000000000000".into(),
                        sequence_number: format!("{}", kept.len() + i),
                    })
                    .collect();
                kept.extend(entries);
                Ok(results)
            })
        }

        fn list_shards<'a>(&'a self, _stream: &'a str) -> BoxFuture<'a, Result<Vec<ShardInfo>, CallError>> {
            Box::pin(async {
                Ok(vec![ShardInfo { shard_id: "shardId-000000000000".into(), range: HashKeyRange::FULL, open: true }])
            })
        }
    }

    #[test]
    fn the_concurrency_history_keeps_changes_and_extremes_and_is_in_both_summaries() {
        let mut history = ConcurrencyHistory::default();
        let sample = |seconds: f64, limit: u64, request_timeout_ms: u64| ConcurrencySample {
            seconds,
            limit,
            request_timeout_ms,
        };
        for (t, limit, timeout) in [
            (0.0, 24, 6_000),
            (0.2, 24, 6_000),
            (0.4, 24, 6_500),
            (0.6, 24, 7_000),
            (3.0, 2, 12_000),
            (9.0, 1, 24_000),
            (20.0, 8, 6_000),
        ] {
            history.note(sample(t, limit, timeout));
        }
        let kept: Vec<f64> = history.changes.iter().map(|c| c.seconds).collect();
        assert_eq!(kept, [0.0, 3.0, 9.0, 20.0], "a repeated sample and small moves of the timeout are no change");
        assert_eq!((history.lowest_limit, history.highest_limit, history.highest_timeout_ms), (1, 24, 24_000));
        for i in 0..2 * MAX_CONCURRENCY_CHANGES {
            history.note(sample(30.0 + i as f64, 1 + (i % 2) as u64, 6_000));
        }
        assert_eq!(history.changes.len(), MAX_CONCURRENCY_CHANGES);
        assert_eq!(history.changes_dropped, (2 * MAX_CONCURRENCY_CHANGES + 4 - MAX_CONCURRENCY_CHANGES) as u64);

        let stats = ProducerStats {
            concurrency_limit: 8,
            timed_out_calls: 3,
            late_answers: 2,
            abandoned_calls: 1,
            resent_after_timeout: 1_500,
            ..Default::default()
        };
        let report = Report {
            lines: 0,
            malformed_lines: 0,
            failed: 0,
            interrupted: false,
            read_error: None,
            stats,
            elapsed: Duration::from_secs(30),
            concurrency: history,
        };
        let mut text = Vec::new();
        report.write_text(&mut text).expect("write");
        let text = String::from_utf8(text).expect("utf8");
        assert!(text.contains("at most 1 at the lowest, 24 at the highest, 8 at the end"), "{text}");
        assert!(
            text.contains(
                "3 calls timed out (2 answered late and settled by their answer, 1 given up on), \
                 1500 user records sent again after a call given up on"
            ),
            "{text}"
        );
        assert!(text.contains("0.0 s: 24 (6.0 s), 3.0 s: 2 (12.0 s)"), "{text}");
        let json = report.to_json();
        assert_eq!((json["concurrency_limit"].as_u64(), json["concurrency_limit_lowest"].as_u64()), (Some(8), Some(1)));
        assert_eq!(json["concurrency"][2], serde_json::json!({"t": 9.0, "limit": 1, "request_timeout_ms": 24_000}));
        assert_eq!(json["resent_after_timeout"], 1_500);
        assert_eq!((json["late_answers"].as_u64(), json["abandoned_calls"].as_u64()), (Some(2), Some(1)));
    }

    #[tokio::test]
    async fn every_line_is_put_or_reported_with_its_number() {
        let sink = Arc::new(Sink::default());
        let config = producer_config("s", true, Duration::from_millis(5), 150, 7);
        let producer = Producer::with_api(config, sink.clone()).await.expect("producer");
        let mut input: Vec<String> = (0..100)
            .map(|i| format!(r#"{{"partition_key": "k{}", "data": "{}"}}"#, i % 3, STANDARD.encode([i])))
            .collect();
        input.insert(10, "{broken".into());
        input.insert(20, String::new());
        let input = input.join("\n").into_bytes();
        let options = Options { input: InputFormat::JsonLines, max_outstanding: 7, progress: None };
        let mut err = Vec::new();
        let report = run(&producer, &options, io::Cursor::new(input), &mut err, future::pending()).await.expect("run");
        let err = String::from_utf8(err).expect("utf8");
        assert_eq!(err.lines().collect::<Vec<_>>().len(), 1, "{err}");
        assert!(err.starts_with("line 11: not a user record object"), "{err}");
        assert_eq!((report.lines, report.malformed_lines, report.failed), (101, 1, 0));
        assert_eq!(report.stats.user_records_put, 100);
        assert!(!report.all_put());
        assert_eq!(report.to_json()["user_records"], 100);

        let mut data = Vec::new();
        for entry in sink.entries.lock().expect("entries").iter() {
            let out = Deaggregator::new().deaggregate(entry.data.clone(), &entry.partition_key, None);
            data.extend(out.records.iter().map(|r| r.data[0]));
        }
        data.sort_unstable();
        assert_eq!(data, (0..100).collect::<Vec<u8>>());
    }

    #[tokio::test]
    async fn slow_input_is_put_as_it_comes_and_stopping_sends_what_was_read() {
        let producer = Producer::with_api(ProducerConfig::new("s"), Arc::new(Sink::default())).await.expect("start");
        let options = Options { input: InputFormat::Text { key_field: None }, max_outstanding: 10, progress: None };
        let mut err = Vec::new();
        // Three lines, then an input that stays open: the lines must reach the producer without
        // waiting for a full batch, and the stop signal is what ends the run.
        let (reader, mut writer) = std::io::pipe().expect("pipe");
        writer.write_all(b"one\ntwo\nthree\n").expect("write");
        let stop = async {
            while producer.stats().user_records_received < 3 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        let report = tokio::time::timeout(Duration::from_secs(10), run(&producer, &options, reader, &mut err, stop))
            .await
            .expect("the three lines arrive without more input")
            .expect("run");
        assert!(report.interrupted && !report.all_put());
        assert_eq!(report.stats.user_records_put, 3);
        assert_eq!(report.to_json()["interrupted"], true);
        drop(writer);
    }
}
