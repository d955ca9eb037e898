//! What goes into the producer and what comes back.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
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

/// Where the records of one [`Producer::put_batch`](crate::Producer::put_batch) leave their
/// results: one allocation and one wake-up for the whole batch instead of one per record.
#[derive(Debug)]
pub(crate) struct BatchSlot {
    results: Mutex<Vec<Option<PutResult>>>,
    remaining: AtomicUsize,
    done: Mutex<Option<oneshot::Sender<()>>>,
}

impl BatchSlot {
    pub(crate) fn new(len: usize) -> (Arc<Self>, oneshot::Receiver<()>) {
        let (done, rx) = oneshot::channel();
        let slot = BatchSlot {
            results: Mutex::new((0..len).map(|_| None).collect()),
            remaining: AtomicUsize::new(len),
            done: Mutex::new(Some(done)),
        };
        if len == 0 {
            let _ = lock(&slot.done).take().map(|tx| tx.send(()));
        }
        (Arc::new(slot), rx)
    }

    /// Records the result of record `index`; the last one wakes the receipt.
    pub(crate) fn set(&self, index: usize, result: PutResult) {
        self.set_many(std::iter::once((index, result)));
    }

    /// Records the results of several records under one lock; the last one wakes the receipt.
    pub(crate) fn set_many(&self, results: impl IntoIterator<Item = (usize, PutResult)>) {
        let mut count = 0;
        {
            let mut cells = lock(&self.results);
            for (index, result) in results {
                if let Some(cell) = cells.get_mut(index) {
                    *cell = Some(result);
                }
                count += 1;
            }
        }
        if count > 0
            && self.remaining.fetch_sub(count, Ordering::AcqRel) == count
            && let Some(done) = lock(&self.done).take()
        {
            let _ = done.send(());
        }
    }

    fn take_results(&self) -> Vec<Option<PutResult>> {
        std::mem::take(&mut *lock(&self.results))
    }
}

/// A poisoned lock only means another thread panicked while holding it; the results in it are
/// still whole (each is written in one assignment), so keep going.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Resolves, once every record of a [`put_batch`](crate::Producer::put_batch) has been put or has
/// failed, to one result per record, in the order given.
#[derive(Debug)]
#[must_use = "a receipt does nothing unless awaited; dropping it does not cancel the records"]
pub struct BatchReceipt {
    slot: Arc<BatchSlot>,
    done: oneshot::Receiver<()>,
}

impl BatchReceipt {
    pub(crate) fn new(slot: Arc<BatchSlot>, done: oneshot::Receiver<()>) -> Self {
        BatchReceipt { slot, done }
    }
}

impl Future for BatchReceipt {
    type Output = Vec<PutResult>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Vec<PutResult>> {
        let this = self.get_mut();
        match Pin::new(&mut this.done).poll(cx) {
            Poll::Pending => Poll::Pending,
            // Closed without a send cannot happen while this receipt holds the slot; either way
            // every record has answered (or its place says so below).
            Poll::Ready(_) => Poll::Ready(
                this.slot
                    .take_results()
                    .into_iter()
                    .map(|result| {
                        result.unwrap_or_else(|| {
                            Err(PutError::new(
                                PutErrorKind::ShutDown { in_flight: true },
                                Record::new("unknown", Bytes::new()),
                                Vec::new(),
                            ))
                        })
                    })
                    .collect(),
            ),
        }
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(key: &str) -> PutResult {
        Err(PutError::new(PutErrorKind::Full, Record::new(key, "x"), Vec::new()))
    }

    #[tokio::test]
    async fn a_batch_receipt_resolves_once_every_result_is_in_whether_set_alone_or_together() {
        let (slot, done) = BatchSlot::new(3);
        let receipt = BatchReceipt::new(Arc::clone(&slot), done);
        slot.set_many([(2, failed("c")), (0, failed("a"))]);
        assert_eq!(slot.remaining.load(Ordering::Acquire), 1);
        slot.set_many(std::iter::empty());
        slot.set(1, failed("b"));
        let keys: Vec<String> =
            receipt.await.into_iter().map(|r| r.expect_err("failed").record().partition_key.clone()).collect();
        assert_eq!(keys, ["a", "b", "c"]);
    }
}
