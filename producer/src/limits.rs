//! The outstanding-records and outstanding-bytes limits: what keeps the producer's memory flat.
//!
//! Two atomic counters and a `Notify`, rather than two semaphores: taking room is two atomic adds
//! in the common case, and giving it back wakes anyone only when someone waits. Room is taken by
//! `put` before a record enters the engine and given back by the engine when the record resolves.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use tokio::sync::Notify;

/// Why room was not given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NoRoom {
    Full,
    Timeout,
    Closed,
}

/// Longest a waiter sleeps before looking again, in case a refused attempt of another caller
/// hid room from it for a moment (see `try_take_inner`).
const RECHECK: Duration = Duration::from_millis(50);

#[derive(Debug)]
pub(crate) struct Limits {
    records: AtomicUsize,
    bytes: AtomicUsize,
    max_records: usize,
    max_bytes: usize,
    waiters: AtomicUsize,
    freed: Notify,
    closed: AtomicBool,
}

impl Limits {
    pub(crate) fn new(max_records: usize, max_bytes: usize) -> Self {
        Limits {
            records: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            max_records,
            max_bytes,
            waiters: AtomicUsize::new(0),
            freed: Notify::new(),
            closed: AtomicBool::new(false),
        }
    }

    /// Takes room for one record of `bytes` if there is some now.
    pub(crate) fn try_take(&self, bytes: usize) -> Result<(), NoRoom> {
        self.try_take_many(1, bytes)
    }

    /// Takes room for `records` records of `bytes` in all if there is some now.
    pub(crate) fn try_take_many(&self, records: usize, bytes: usize) -> Result<(), NoRoom> {
        self.try_take_inner(records, bytes, true)
    }

    /// `wake_others`: after a refusal, wake the waiters, in case this attempt's momentary excess
    /// made one of them give up. A waiter itself passes `false` (it would only wake itself) and
    /// instead looks again at least every [`RECHECK`].
    fn try_take_inner(&self, records: usize, bytes: usize, wake_others: bool) -> Result<(), NoRoom> {
        if self.closed.load(SeqCst) {
            return Err(NoRoom::Closed);
        }
        // Optimistic: add, and take it back if that went over. A concurrent caller may see the
        // transient excess and be refused, never the other way round, so the limit always holds.
        if self.records.fetch_add(records, SeqCst) + records > self.max_records {
            self.records.fetch_sub(records, SeqCst);
            if wake_others {
                self.wake();
            }
            return Err(NoRoom::Full);
        }
        if self.bytes.fetch_add(bytes, SeqCst) + bytes > self.max_bytes {
            self.bytes.fetch_sub(bytes, SeqCst);
            self.records.fetch_sub(records, SeqCst);
            if wake_others {
                self.wake();
            }
            return Err(NoRoom::Full);
        }
        Ok(())
    }

    /// Whether `records` records of `bytes` could ever fit at once.
    pub(crate) fn could_fit(&self, records: usize, bytes: usize) -> bool {
        records <= self.max_records && bytes <= self.max_bytes
    }

    /// Takes room, waiting up to `timeout` for some to be given back.
    pub(crate) async fn take(&self, bytes: usize, timeout: Duration) -> Result<(), NoRoom> {
        self.take_many(1, bytes, timeout).await
    }

    /// Takes room for `records` records of `bytes` in all, waiting up to `timeout`. The caller
    /// checks [`could_fit`](Self::could_fit) first: a request larger than the limits waits out
    /// its timeout.
    pub(crate) async fn take_many(&self, records: usize, bytes: usize, timeout: Duration) -> Result<(), NoRoom> {
        match self.try_take_many(records, bytes) {
            Err(NoRoom::Full) => {}
            other => return other,
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            // Registered before looking again: a give-back after the look wakes this waiter.
            freed.as_mut().enable();
            self.waiters.fetch_add(1, SeqCst);
            let taken = self.try_take_inner(records, bytes, false);
            if taken != Err(NoRoom::Full) {
                self.waiters.fetch_sub(1, SeqCst);
                return taken;
            }
            let recheck = deadline.min(tokio::time::Instant::now() + RECHECK);
            let _ = tokio::time::timeout_at(recheck, freed).await;
            self.waiters.fetch_sub(1, SeqCst);
            if tokio::time::Instant::now() >= deadline {
                // One last look: room may have come back just as the time ran out.
                return self.try_take_inner(records, bytes, false).map_err(|e| match e {
                    NoRoom::Full => NoRoom::Timeout,
                    other => other,
                });
            }
        }
    }

    /// Gives back the room of one record of `bytes`.
    #[cfg(test)]
    pub(crate) fn give_back(&self, bytes: usize) {
        self.give_back_many(1, bytes);
    }

    /// Gives back the room of `records` records of `bytes` in all.
    pub(crate) fn give_back_many(&self, records: usize, bytes: usize) {
        self.bytes.fetch_sub(bytes, SeqCst);
        self.records.fetch_sub(records, SeqCst);
        self.wake();
    }

    fn wake(&self) {
        if self.waiters.load(SeqCst) > 0 {
            self.freed.notify_waiters();
        }
    }

    /// Refuses all further room (shutdown); waiters are told at once.
    pub(crate) fn close(&self) {
        self.closed.store(true, SeqCst);
        self.freed.notify_waiters();
    }

    #[cfg(test)]
    fn taken(&self) -> (usize, usize) {
        (self.records.load(SeqCst), self.bytes.load(SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn refuses_past_either_limit_and_takes_nothing_when_refusing() {
        let limits = Limits::new(2, 100);
        assert_eq!(limits.try_take(60), Ok(()));
        assert_eq!(limits.try_take(60), Err(NoRoom::Full), "bytes limit");
        assert_eq!(limits.taken(), (1, 60));
        assert_eq!(limits.try_take(40), Ok(()));
        assert_eq!(limits.try_take(0), Err(NoRoom::Full), "records limit");
        limits.give_back(60);
        assert_eq!(limits.taken(), (1, 40));
        limits.close();
        assert_eq!(limits.try_take(1), Err(NoRoom::Closed));
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_gets_room_when_it_is_given_back_or_times_out() {
        let limits = Arc::new(Limits::new(1, 100));
        limits.try_take(10).expect("room");
        let waiter = tokio::spawn({
            let limits = Arc::clone(&limits);
            async move { limits.take(10, Duration::from_secs(5)).await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        limits.give_back(10);
        assert_eq!(waiter.await.expect("joined"), Ok(()));
        assert_eq!(limits.take(10, Duration::from_secs(1)).await, Err(NoRoom::Timeout));
        let closed = tokio::spawn({
            let limits = Arc::clone(&limits);
            async move { limits.take(10, Duration::from_secs(60)).await }
        });
        tokio::task::yield_now().await;
        limits.close();
        assert_eq!(closed.await.expect("joined"), Err(NoRoom::Closed));
    }
}
