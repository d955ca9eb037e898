//! Reading one shard by polling `GetRecords`, deaggregating as it goes.
//!
//! A [`ShardReader`] owns a shard iterator and hides its life cycle: it gets one from the
//! starting position, re-gets one from the last record it delivered when the iterator expires
//! (they live 5 minutes), keeps to the shard's read quota (5 calls a second), and says when the
//! shard has ended (a closed shard read to its end has no next iterator; its children are named).
//!
//! Resuming from a checkpoint inside an aggregate is exact: the reader asks for the checkpoint's
//! record again (`AT_SEQUENCE_NUMBER`) and skips the user records up to and including the
//! checkpoint's sub-sequence number, so neither the rest of the aggregate nor anything after it is
//! lost, and nothing before it is delivered twice.
//!
//! The conversion from Kinesis records to [`ConsumerRecord`]s (deaggregation, the optional
//! shard-range filter, skipping what was delivered already) lives in one place here and is shared
//! with the enhanced fan-out reader ([`FanOutReader`](crate::retrieval::FanOutReader)).

use std::time::{Duration, SystemTime};

use std::sync::Arc;

use aws_sdk_kinesis::primitives::DateTime;
use aws_sdk_kinesis::types::{Record, ShardIteratorType};
use bytes::Bytes;
use bytestring::ByteString;
use ktk_proto::aggregation::{DeaggregatedRecord, Deaggregator, RecordFormat};
use ktk_proto::keys::HashKeyRange;
use tokio::time::Instant;

use crate::retrieval::kinesis::{GetRecordsFailure, KinesisReads, RecordsPage};

/// Most records one `GetRecords` call returns
/// ([GetRecords](https://docs.aws.amazon.com/kinesis/latest/APIReference/API_GetRecords.html)).
pub const GET_RECORDS_MAX_RECORDS: i32 = 10_000;
/// `GetRecords` calls a shard serves per second; the reader keeps its calls this far apart.
pub const GET_RECORDS_MIN_INTERVAL: Duration = Duration::from_millis(200);

/// Where to start reading a shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartingPosition {
    /// The oldest record still in the shard.
    TrimHorizon,
    /// Only records put after the reader starts.
    Latest,
    /// The first record that arrived at or after this time.
    AtTimestamp(SystemTime),
    /// Right after this user record: how a checkpoint is resumed.
    After { sequence_number: String, sub_sequence_number: u64 },
}

/// One user record read from a shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerRecord {
    pub sequence_number: String,
    /// Position in its aggregate; 0 for a plain record.
    pub sub_sequence_number: u64,
    pub partition_key: ByteString,
    pub explicit_hash_key: Option<ByteString>,
    pub data: Bytes,
    pub approximate_arrival: Option<SystemTime>,
    pub aggregated: bool,
}

/// What one read returned.
#[derive(Debug, Default)]
pub struct ReadResult {
    pub records: Vec<ConsumerRecord>,
    /// How far behind the tip of the shard the reader is.
    pub millis_behind_latest: Option<i64>,
    /// Kinesis records that started with the KPL magic but were not valid aggregates (delivered
    /// as plain records): a producer bug worth a metric.
    pub suspicious_records: usize,
    /// Sub-records outside the shard's hash range (only with
    /// [`ReaderConfig::with_shard_range_filter`]); not delivered, handed back here.
    pub out_of_range: Vec<ConsumerRecord>,
    /// Set when the shard is closed and fully read: its child shards.
    pub shard_end: Option<Vec<String>>,
}

/// Why a read failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RetrievalError {
    #[error("shard {shard} is being read too often (throttled); back off and read again")]
    Throttled { shard: String },
    #[error("stream or shard not found ({shard}): {message}")]
    NotFound { shard: String, message: String },
    #[error(
        "not allowed to read shard {shard}: {message}; grant kinesis:GetRecords and kinesis:GetShardIterator \
         (polling) or kinesis:SubscribeToShard (enhanced fan-out)"
    )]
    AccessDenied { shard: String, message: String },
    #[error("reading shard {shard} failed: {code}: {message}")]
    Other { shard: String, code: String, message: String, retryable: bool },
}

impl RetrievalError {
    pub fn is_retryable(&self) -> bool {
        match self {
            RetrievalError::Throttled { .. } => true,
            RetrievalError::NotFound { .. } | RetrievalError::AccessDenied { .. } => false,
            RetrievalError::Other { retryable, .. } => *retryable,
        }
    }
}

/// How a [`ShardReader`] reads.
#[derive(Debug, Clone)]
pub struct ReaderConfig {
    max_records: i32,
    min_interval: Duration,
    shard_range_filter: bool,
}

impl Default for ReaderConfig {
    /// 10,000 records a call (KCL `maxRecords`), calls at least 200 ms apart (the shard quota).
    fn default() -> Self {
        ReaderConfig {
            max_records: GET_RECORDS_MAX_RECORDS,
            min_interval: GET_RECORDS_MIN_INTERVAL,
            shard_range_filter: false,
        }
    }
}

impl ReaderConfig {
    /// Records per `GetRecords` call, 1 to 10,000 (default 10,000).
    pub fn with_max_records(mut self, records: i32) -> Self {
        self.max_records = records.clamp(1, GET_RECORDS_MAX_RECORDS);
        self
    }

    /// Shortest time between two calls on the shard (default 200 ms, the 5 calls/s quota).
    pub fn with_min_interval(mut self, interval: Duration) -> Self {
        self.min_interval = interval;
        self
    }

    /// Set aside sub-records whose hash key is outside the shard's range, as the KCL does (off by
    /// default: every record in the shard is delivered; after a reshard, an aggregate built for the
    /// parent can hold records of both children, and it is stored only once).
    pub fn with_shard_range_filter(mut self, filter: bool) -> Self {
        self.shard_range_filter = filter;
        self
    }
}

/// Reads one shard, in order.
#[derive(Debug)]
pub struct ShardReader {
    client: Arc<dyn KinesisReads>,
    stream: String,
    shard_id: String,
    config: ReaderConfig,
    records: RecordConverter,
    /// Where a new iterator starts: the starting position, then after each delivered record.
    resume: StartingPosition,
    iterator: Option<String>,
    last_call: Option<Instant>,
    ended: bool,
}

impl ShardReader {
    pub fn new(
        client: aws_sdk_kinesis::Client,
        stream: impl Into<String>,
        shard_id: impl Into<String>,
        range: HashKeyRange,
        start: StartingPosition,
        config: ReaderConfig,
    ) -> Self {
        ShardReader::with_api(Arc::new(client), stream, shard_id, range, start, config)
    }

    /// A reader that reads through `client` (the SDK client, or a fake in tests).
    pub(crate) fn with_api(
        client: Arc<dyn KinesisReads>,
        stream: impl Into<String>,
        shard_id: impl Into<String>,
        range: HashKeyRange,
        start: StartingPosition,
        config: ReaderConfig,
    ) -> Self {
        let records = RecordConverter::new(range, config.shard_range_filter);
        ShardReader {
            client,
            stream: stream.into(),
            shard_id: shard_id.into(),
            config,
            records,
            resume: start,
            iterator: None,
            last_call: None,
            ended: false,
        }
    }

    pub fn shard_id(&self) -> &str {
        &self.shard_id
    }

    /// Whether the shard has been read to its end.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Reads the next records (possibly none, when caught up). Waits first if the last call was
    /// less than the minimum interval ago.
    pub async fn read(&mut self) -> Result<ReadResult, RetrievalError> {
        if self.ended {
            return Ok(ReadResult { shard_end: Some(Vec::new()), ..ReadResult::default() });
        }
        // An expired iterator is re-got once per read; a second expiry in a row is an error.
        for _ in 0..2 {
            let iterator = match self.iterator.take() {
                Some(iterator) => iterator,
                None => self.get_iterator().await?,
            };
            if let Some(last) = self.last_call {
                tokio::time::sleep_until(last + self.config.min_interval).await;
            }
            self.last_call = Some(Instant::now());
            let response = self.client.get_records(&self.shard_id, &iterator, self.config.max_records).await;
            match response {
                Ok(page) => return Ok(self.take_page(page)),
                Err(GetRecordsFailure::ExpiredIterator) => continue,
                Err(GetRecordsFailure::Failed(error)) => {
                    // Keep the iterator for the next read unless the error says it is unusable.
                    self.iterator = Some(iterator);
                    return Err(error);
                }
            }
        }
        Err(RetrievalError::Other {
            shard: self.shard_id.clone(),
            code: "ExpiredIteratorException".into(),
            message: "a fresh shard iterator expired at once".into(),
            retryable: true,
        })
    }

    fn take_page(&mut self, page: RecordsPage) -> ReadResult {
        let mut result = ReadResult { millis_behind_latest: page.millis_behind_latest, ..ReadResult::default() };
        self.records.convert(&page.records, &mut result);
        if let Some(last) = result.records.last() {
            self.resume = StartingPosition::After {
                sequence_number: last.sequence_number.clone(),
                sub_sequence_number: last.sub_sequence_number,
            };
        }
        match page.next_iterator {
            Some(next) => self.iterator = Some(next),
            None => {
                self.ended = true;
                result.shard_end = Some(page.child_shards);
            }
        }
        result
    }

    async fn get_iterator(&mut self) -> Result<String, RetrievalError> {
        let start = self.resume.iterator_start();
        // Asking for the record itself again (AT_SEQUENCE_NUMBER), then skipping what was
        // delivered of it, is exact even inside an aggregate.
        if let Some((sequence_number, sub_sequence_number)) = &start.skip_through {
            self.records.skip_through(sequence_number.clone(), *sub_sequence_number);
        }
        match self.client.get_shard_iterator(&self.stream, &self.shard_id, &start).await? {
            Some(iterator) => Ok(iterator),
            // No iterator for a closed shard whose records are all past retention: nothing to read.
            None => {
                self.ended = true;
                Err(RetrievalError::Other {
                    shard: self.shard_id.clone(),
                    code: "NoShardIterator".into(),
                    message: "the shard is closed and has nothing left to read".into(),
                    retryable: false,
                })
            }
        }
    }
}

/// How a shard iterator (or a `SubscribeToShard` subscription) starts for a [`StartingPosition`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct IteratorStart {
    pub(crate) kind: ShardIteratorType,
    pub(crate) sequence_number: Option<String>,
    pub(crate) timestamp: Option<DateTime>,
    /// User records up to and including this one were delivered already: skip them when they
    /// come back.
    pub(crate) skip_through: Option<(String, u64)>,
}

impl StartingPosition {
    pub(crate) fn iterator_start(&self) -> IteratorStart {
        let start = |kind| IteratorStart { kind, sequence_number: None, timestamp: None, skip_through: None };
        match self {
            StartingPosition::TrimHorizon => start(ShardIteratorType::TrimHorizon),
            StartingPosition::Latest => start(ShardIteratorType::Latest),
            StartingPosition::AtTimestamp(time) => {
                IteratorStart { timestamp: Some(DateTime::from(*time)), ..start(ShardIteratorType::AtTimestamp) }
            }
            // The record itself again, then skip what was delivered of it: `AFTER_SEQUENCE_NUMBER`
            // would lose the rest of an aggregate.
            StartingPosition::After { sequence_number, sub_sequence_number } => IteratorStart {
                sequence_number: Some(sequence_number.clone()),
                skip_through: Some((sequence_number.clone(), *sub_sequence_number)),
                ..start(ShardIteratorType::AtSequenceNumber)
            },
        }
    }
}

/// Turns the Kinesis records of one `GetRecords` response or `SubscribeToShard` event into user
/// records: deaggregates, sets aside sub-records outside the shard's range (when asked to), and
/// skips the user records a resumed position says were delivered already.
#[derive(Debug)]
pub(crate) struct RecordConverter {
    deaggregator: Deaggregator,
    /// User records up to and including this one were delivered already.
    skip_through: Option<(String, u64)>,
}

impl RecordConverter {
    pub(crate) fn new(range: HashKeyRange, shard_range_filter: bool) -> Self {
        let deaggregator =
            if shard_range_filter { Deaggregator::new().with_shard_range(range) } else { Deaggregator::new() };
        RecordConverter { deaggregator, skip_through: None }
    }

    /// Skip the user records up to and including this one when they come back (the next batch
    /// starts at this Kinesis record again).
    pub(crate) fn skip_through(&mut self, sequence_number: String, sub_sequence_number: u64) {
        self.skip_through = Some((sequence_number, sub_sequence_number));
    }

    /// Adds the user records of `records` to `result` (records, out of range, suspicious).
    pub(crate) fn convert(&mut self, records: &[Record], result: &mut ReadResult) {
        let mut user_records = Vec::new();
        let mut out_of_range = Vec::new();
        for record in records {
            user_records.clear();
            out_of_range.clear();
            let data = Bytes::copy_from_slice(record.data().as_ref());
            let format = self.deaggregator.deaggregate_into(
                data,
                record.partition_key().unwrap_or_default(),
                None,
                &mut user_records,
                &mut out_of_range,
            );
            if format.is_suspicious() {
                result.suspicious_records += 1;
            }
            let sequence_number = record.sequence_number().to_owned();
            let arrival = record.approximate_arrival_timestamp().and_then(|t| SystemTime::try_from(*t).ok());
            let convert = |user: &DeaggregatedRecord| ConsumerRecord {
                sequence_number: sequence_number.clone(),
                sub_sequence_number: user.sub_sequence_number,
                partition_key: user.partition_key.clone(),
                explicit_hash_key: user.explicit_hash_key.clone(),
                data: user.data.clone(),
                approximate_arrival: arrival,
                aggregated: format == RecordFormat::Aggregated,
            };
            for user in &user_records {
                if self.already_delivered(&sequence_number, user.sub_sequence_number) {
                    continue;
                }
                result.records.push(convert(user));
            }
            result.out_of_range.extend(out_of_range.iter().map(convert));
        }
        // The first record an AT_SEQUENCE_NUMBER position returns is the checkpoint's own; once
        // any record came back, nothing more can be a repeat.
        if !records.is_empty() {
            self.skip_through = None;
        }
    }

    fn already_delivered(&self, sequence_number: &str, sub_sequence_number: u64) -> bool {
        matches!(&self.skip_through, Some((seq, sub)) if seq == sequence_number && sub_sequence_number <= *sub)
    }
}
