//! Per-shard token buckets: records per second and bytes per second, as the shard quotas count
//! them (an aggregate is one record).

use std::time::Duration;

use tokio::time::Instant;

use crate::config::{SHARD_MAX_BYTES_PER_SEC, SHARD_MAX_RECORDS_PER_SEC};

/// A token bucket that refills continuously at `rate` per second up to `capacity` (one second's
/// worth), so a shard may burst up to its quota and then is held to it.
#[derive(Debug, Clone)]
struct Bucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    fn new(rate: f64, now: Instant) -> Self {
        Bucket { rate, capacity: rate, tokens: rate, updated: now }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        self.updated = now;
    }

    /// How long until `amount` tokens are there (zero if they are). An amount above the capacity
    /// waits for a full bucket and then drives it negative, so a record larger than one second's
    /// quota still goes, and pays for it afterwards.
    fn wait_for(&self, amount: f64) -> Duration {
        let needed = amount.min(self.capacity) - self.tokens;
        if needed <= 0.0 { Duration::ZERO } else { Duration::from_secs_f64(needed / self.rate) }
    }
}

/// The two buckets of one shard.
#[derive(Debug, Clone)]
pub(crate) struct ShardLimiter {
    records: Bucket,
    bytes: Bucket,
}

impl ShardLimiter {
    /// Limits at `percent` of the shard quota (KPL `RateLimit`).
    pub(crate) fn new(percent: u32, now: Instant) -> Self {
        let scale = f64::from(percent) / 100.0;
        ShardLimiter {
            records: Bucket::new(SHARD_MAX_RECORDS_PER_SEC * scale, now),
            bytes: Bucket::new(SHARD_MAX_BYTES_PER_SEC * scale, now),
        }
    }

    /// Time to wait before one record of `bytes` may be sent; zero when it may go now.
    pub(crate) fn wait_for(&mut self, bytes: usize, now: Instant) -> Duration {
        self.records.refill(now);
        self.bytes.refill(now);
        self.records.wait_for(1.0).max(self.bytes.wait_for(bytes as f64))
    }

    /// Takes the tokens for one record of `bytes` (after `wait_for` said zero).
    pub(crate) fn take(&mut self, bytes: usize) {
        self.records.tokens -= 1.0;
        self.bytes.tokens -= bytes as f64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_a_shard_to_its_quota() {
        let start = Instant::now();
        let mut limiter = ShardLimiter::new(100, start);
        // A full bucket: 1,000 small records go at once, the next one waits 1 ms.
        for _ in 0..1000 {
            assert_eq!(limiter.wait_for(10, start), Duration::ZERO);
            limiter.take(10);
        }
        let wait = limiter.wait_for(10, start);
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(1), "{wait:?}");
        // After that millisecond it may go.
        assert_eq!(limiter.wait_for(10, start + Duration::from_millis(1)), Duration::ZERO);
    }

    #[test]
    fn bytes_are_limited_too_and_scale_with_the_percentage() {
        let start = Instant::now();
        let mut limiter = ShardLimiter::new(50, start);
        // 512 KiB/s at 50%: one 512 KiB record empties the bucket.
        assert_eq!(limiter.wait_for(512 * 1024, start), Duration::ZERO);
        limiter.take(512 * 1024);
        let wait = limiter.wait_for(256 * 1024, start);
        assert!((wait.as_secs_f64() - 0.5).abs() < 0.01, "{wait:?}");
        // A record larger than a second's quota waits for a full bucket, not forever.
        let mut fresh = ShardLimiter::new(50, start);
        assert_eq!(fresh.wait_for(1024 * 1024, start), Duration::ZERO);
    }
}
