//! What goes into the producer and what comes back.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::error::{PutError, PutErrorKind};

/// A user record as the application gives it. Keys are checked when it is put.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub partition_key: String,
    pub explicit_hash_key: Option<String>,
    pub data: Bytes,
}

impl Record {
    pub fn new(partition_key: impl Into<String>, data: impl Into<Bytes>) -> Self {
        Record { partition_key: partition_key.into(), explicit_hash_key: None, data: data.into() }
    }

    /// Routes the record by a 128-bit hash key in decimal instead of its partition key's hash.
    pub fn with_explicit_hash_key(mut self, explicit_hash_key: impl Into<String>) -> Self {
        self.explicit_hash_key = Some(explicit_hash_key.into());
        self
    }

    /// Bytes Kinesis counts for it: data plus partition key.
    pub fn size(&self) -> usize {
        self.data.len() + self.partition_key.len()
    }
}

/// One `PutRecords` attempt that carried a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub started_at: SystemTime,
    pub duration: Duration,
    /// `None` for the attempt that succeeded; otherwise Kinesis's error code
    /// (`ProvisionedThroughputExceededException`, `InternalFailure`, ...) or ours
    /// (`RequestTimeout`, `ConnectionError`).
    pub error_code: Option<String>,
    pub error_message: Option<String>,
}

impl Attempt {
    pub fn succeeded(&self) -> bool {
        self.error_code.is_none()
    }
}

/// Where a record landed. Cheap to clone: what the user records of one Kinesis record have in
/// common is shared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutOutcome {
    landing: Arc<Landing>,
    sub_sequence_number: u64,
}

/// The part of an outcome shared by the user records of one Kinesis record.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Landing {
    pub(crate) shard_id: String,
    pub(crate) sequence_number: String,
    pub(crate) aggregated: bool,
    pub(crate) attempts: Vec<Attempt>,
}

impl PutOutcome {
    pub(crate) fn new(landing: Arc<Landing>, sub_sequence_number: u64) -> Self {
        PutOutcome { landing, sub_sequence_number }
    }

    pub fn shard_id(&self) -> &str {
        &self.landing.shard_id
    }

    pub fn sequence_number(&self) -> &str {
        &self.landing.sequence_number
    }

    /// Position in its aggregate (0 for a record sent alone); with the sequence number, the
    /// record's unique position in the stream, as the KCL reports it.
    pub fn sub_sequence_number(&self) -> u64 {
        self.sub_sequence_number
    }

    /// Whether it went in a KPL aggregate.
    pub fn aggregated(&self) -> bool {
        self.landing.aggregated
    }

    /// Every attempt, oldest first; the last one succeeded.
    pub fn attempts(&self) -> &[Attempt] {
        &self.landing.attempts
    }
}

pub(crate) type PutResult = Result<PutOutcome, PutError>;

/// Resolves when the record has been put or has failed; never stays pending, even when the
/// producer is shut down or dropped.
#[derive(Debug)]
#[must_use = "a receipt does nothing unless awaited; dropping it does not cancel the record"]
pub struct PutReceipt {
    rx: oneshot::Receiver<PutResult>,
}

impl PutReceipt {
    pub(crate) fn new(rx: oneshot::Receiver<PutResult>) -> Self {
        PutReceipt { rx }
    }
}

impl Future for PutReceipt {
    type Output = PutResult;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<PutResult> {
        match Pin::new(&mut self.get_mut().rx).poll(cx) {
            Poll::Ready(Ok(result)) => Poll::Ready(result),
            // Every pending record answers its receipt when it is dropped, with the record
            // (see `engine::Pending`), so a closed channel without an answer cannot happen; if
            // it ever did, say so rather than hang.
            Poll::Ready(Err(_)) => Poll::Ready(Err(PutError::new(
                PutErrorKind::ShutDown { in_flight: true },
                Record::new("unknown", Bytes::new()),
                Vec::new(),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}
