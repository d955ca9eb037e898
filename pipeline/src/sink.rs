//! The [`Sink`] trait every destination implements, what a write reports ([`SinkReport`]), and
//! why it failed ([`SinkError`]).

use std::time::Duration;

use futures::future::BoxFuture;

use crate::Batch;

/// What a sink did with a batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SinkReport {
    /// Events newly stored.
    pub written: u64,
    /// Events the sink already had (idempotent on `event_id`): duplicates.
    pub duplicates: u64,
    /// Of `duplicates`, those the sink holds from the same position in the stream (stream, shard,
    /// sequence and sub-sequence number): the same record read again after a failover, a restart
    /// or a retried invocation. The rest were sent again (a client or producer retrying: another
    /// record with the same `event_id`).
    pub reread: u64,
}

/// Why a sink could not take a batch. The pipeline retries with a backoff and the shard waits;
/// nothing is skipped. [`is_retryable`](Self::is_retryable) tells a passing fault from one an
/// operator must mend (both are retried by the ECS consumer; the Lambda gives up on the second at
/// once and lets the event source mapping retry the batch later).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SinkError {
    /// A passing fault: a refused or lost connection, throttling, a server error, a lost race.
    #[error("sink {sink} is unavailable: {message}")]
    Unavailable { sink: String, message: String },
    /// What retrying cannot mend: a missing bucket or table, a table with the wrong columns, no
    /// access, a bad URL. Logged as an error an operator must act on.
    #[error("sink {sink} needs an operator: {message}")]
    Misconfigured { sink: String, message: String },
    /// The write did not finish in time (a sink's own write timeout, or a Lambda invocation's time
    /// left); it may still have been applied, which the sink's idempotence absorbs.
    #[error("sink {sink} did not answer within {after:?}: {message}")]
    TimedOut { sink: String, after: Duration, message: String },
}

impl SinkError {
    /// A passing fault (see [`SinkError::Unavailable`]).
    pub fn unavailable(sink: impl Into<String>, message: impl Into<String>) -> Self {
        SinkError::Unavailable { sink: sink.into(), message: message.into() }
    }

    /// A fault an operator must mend (see [`SinkError::Misconfigured`]).
    pub fn misconfigured(sink: impl Into<String>, message: impl Into<String>) -> Self {
        SinkError::Misconfigured { sink: sink.into(), message: message.into() }
    }

    /// A write that took longer than `after`.
    pub fn timed_out(sink: impl Into<String>, after: Duration, message: impl Into<String>) -> Self {
        SinkError::TimedOut { sink: sink.into(), after, message: message.into() }
    }

    /// `unavailable` when `retryable`, else `misconfigured`: for classifiers that decide per error.
    pub fn classified(sink: impl Into<String>, message: impl Into<String>, retryable: bool) -> Self {
        if retryable { SinkError::unavailable(sink, message) } else { SinkError::misconfigured(sink, message) }
    }

    /// Whether retrying may work without anyone acting.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, SinkError::Misconfigured { .. })
    }

    /// The sink's name (`s3`, `postgres`, `mysql`).
    pub fn sink(&self) -> &str {
        match self {
            SinkError::Unavailable { sink, .. }
            | SinkError::Misconfigured { sink, .. }
            | SinkError::TimedOut { sink, .. } => sink,
        }
    }

    /// What happened, without the sink's name.
    pub fn message(&self) -> &str {
        match self {
            SinkError::Unavailable { message, .. }
            | SinkError::Misconfigured { message, .. }
            | SinkError::TimedOut { message, .. } => message,
        }
    }
}

/// When a sink is given events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SinkTiming {
    /// Whole batches, cut at boundaries that depend only on the records, so the same stretch of a
    /// shard read again makes the same batch (S3: the same object, byte for byte).
    #[default]
    Batch,
    /// As soon as records are read, in the pieces they were read in: a real-time store, idempotent
    /// on `event_id`, so a piece written again after a crash only adds duplicates to the count.
    /// The checkpoint still waits for the batch (and so for the batch sinks).
    Immediate,
}

/// Somewhere batches are delivered: written idempotently (writing the same batch twice stores each
/// event once and reports the second time as duplicates), then acknowledged by returning `Ok`.
pub trait Sink: Send + Sync + std::fmt::Debug {
    /// A short name for logs and metrics (`s3`, `postgres`, `mysql`).
    fn name(&self) -> &str;

    /// Whether the sink takes whole batches or events as soon as they are read.
    fn timing(&self) -> SinkTiming {
        SinkTiming::Batch
    }

    /// Writes the batch's events (and, where the sink keeps them, its dead letters).
    fn write<'a>(&'a self, batch: &'a Batch) -> BoxFuture<'a, Result<SinkReport, SinkError>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_misconfiguration_is_not_retryable() {
        assert!(SinkError::unavailable("s3", "503").is_retryable());
        assert!(SinkError::timed_out("postgres", Duration::from_secs(30), "slow").is_retryable());
        let missing = SinkError::misconfigured("s3", "no bucket b");
        assert!(!missing.is_retryable());
        assert_eq!((missing.sink(), missing.message()), ("s3", "no bucket b"));
        assert_eq!(missing.to_string(), "sink s3 needs an operator: no bucket b");
        assert!(!SinkError::classified("mysql", "bad column", false).is_retryable());
        assert!(SinkError::classified("mysql", "gone away", true).is_retryable());
    }
}
