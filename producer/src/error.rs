//! The producer's errors. A record that could not be put always comes back inside its error.

use std::fmt;

use crate::record::{Attempt, Record};

/// A setting that is out of range; `setting` names it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid producer setting `{setting}`: {problem}")]
pub struct ConfigError {
    pub setting: &'static str,
    pub problem: String,
}

/// Why a [`Producer`](crate::Producer) could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The stream does not exist, is not readable with these credentials, or has no open shard.
    #[error("cannot use stream {stream:?}: {message}")]
    Stream { stream: String, message: String },
}

/// What went wrong with one record.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PutErrorKind {
    /// The partition key or explicit hash key is not valid (see [`ktk_proto::Error`]).
    InvalidRecord(ktk_proto::Error),
    /// The record is larger than the stream's maximum record size.
    TooLarge { size: usize, max: usize },
    /// `try_put` found the producer at its outstanding records or bytes limit.
    Full,
    /// `put` waited [`put_timeout`](crate::ProducerConfig::with_put_timeout) for room.
    Timeout,
    /// The record's TTL ran out before Kinesis accepted it (the attempts say why).
    Expired,
    /// Kinesis throttled the record and `fail_if_throttled` is set.
    Throttled,
    /// Kinesis refused the record for a reason retrying cannot fix (missing stream, access
    /// denied, KMS key problems...).
    Rejected { code: String, message: String },
    /// The producer was shut down before the record was put. If `in_flight`, a `PutRecords` call
    /// carrying it was still unanswered: it may or may not be in the stream.
    ShutDown { in_flight: bool },
}

impl fmt::Display for PutErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PutErrorKind::InvalidRecord(e) => write!(f, "invalid record: {e}"),
            PutErrorKind::TooLarge { size, max } => {
                write!(f, "record of {size} bytes (data plus partition key) is over the stream's maximum of {max}")
            }
            PutErrorKind::Full => f.write_str("the producer is at its outstanding records/bytes limit; retry later"),
            PutErrorKind::Timeout => f.write_str("timed out waiting for room in the producer"),
            PutErrorKind::Expired => f.write_str("the record's TTL expired before Kinesis accepted it"),
            PutErrorKind::Throttled => f.write_str("Kinesis throttled the record and fail_if_throttled is set"),
            PutErrorKind::Rejected { code, message } => write!(f, "Kinesis rejected the record: {code}: {message}"),
            PutErrorKind::ShutDown { in_flight: false } => {
                f.write_str("the producer was shut down before sending the record")
            }
            PutErrorKind::ShutDown { in_flight: true } => f.write_str(
                "the producer was shut down while a call carrying the record was unanswered; it may be in the stream",
            ),
        }
    }
}

/// A record the producer could not put, with the record itself and every attempt made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} (partition key {:?}, {} attempt(s))", .0.kind, .0.record.partition_key, .0.attempts.len())]
pub struct PutError(Box<Failure>);

#[derive(Debug, Clone, PartialEq, Eq)]
struct Failure {
    kind: PutErrorKind,
    record: Record,
    attempts: Vec<Attempt>,
}

impl PutError {
    pub(crate) fn new(kind: PutErrorKind, record: Record, attempts: Vec<Attempt>) -> Self {
        PutError(Box::new(Failure { kind, record, attempts }))
    }

    pub fn kind(&self) -> &PutErrorKind {
        &self.0.kind
    }

    pub fn record(&self) -> &Record {
        &self.0.record
    }

    pub fn into_record(self) -> Record {
        self.0.record
    }

    pub fn attempts(&self) -> &[Attempt] {
        &self.0.attempts
    }

    /// Whether putting the same record again later could succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.0.kind,
            PutErrorKind::Full | PutErrorKind::Timeout | PutErrorKind::Expired | PutErrorKind::Throttled
        )
    }
}
