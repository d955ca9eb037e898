//! The one retry delay of the workspace: exponential, capped, jittered.
//!
//! Attempt `n` (1 for the first retry) waits a random time in `[max(min, c/2), c]`, where
//! `c = min(max, min * 2^(n-1))`. The first retry therefore waits exactly `min`; later ones grow
//! until they reach `max`, and each is spread over the upper half of its ceiling so callers that
//! failed together (every shard of a worker, every record of a throttled `PutRecords`) do not
//! retry together, while each still makes progress at the rate the ceiling promises.
//!
//! Used by the producer (records that failed a `PutRecords`), the consumer (reads, table calls,
//! processor retries), the delivery pipeline (sink writes) and `ktk tail`.
#![deny(unsafe_code)]

use std::time::Duration;

/// The delay before retry number `attempt` (1 or more; 0 is treated as 1).
pub fn delay(attempt: u32, min: Duration, max: Duration) -> Duration {
    let min = min.max(Duration::from_millis(1));
    let max = max.max(min);
    let exponent = attempt.saturating_sub(1).min(30);
    let ceiling = min.saturating_mul(1u32 << exponent).min(max);
    let floor = (ceiling / 2).max(min);
    floor + (ceiling - floor).mul_f64(fastrand::f64())
}

/// A running series of delays: [`next_delay`](Self::next_delay) after each failure,
/// [`reset`](Self::reset) after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// Delays from `min` (at least 1 ms) up to `max` (at least `min`).
    pub fn new(min: Duration, max: Duration) -> Self {
        let min = min.max(Duration::from_millis(1));
        Backoff { min, max: max.max(min), attempt: 0 }
    }

    /// The delay before the next attempt; the one after is drawn from a doubled ceiling.
    pub fn next_delay(&mut self) -> Duration {
        self.attempt = self.attempt.saturating_add(1);
        delay(self.attempt, self.min, self.max)
    }

    /// How many delays were handed out since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// The last attempt worked: start again from the minimum.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_reset() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        for _ in 0..50 {
            backoff.reset();
            let delays: Vec<Duration> = (0..6).map(|_| backoff.next_delay()).collect();
            assert_eq!(delays[0], Duration::from_millis(100), "the first retry waits the minimum");
            for (delay, cap) in delays.iter().zip([100u64, 200, 400, 800, 800, 800]) {
                let (low, high) = (Duration::from_millis((cap / 2).max(100)), Duration::from_millis(cap));
                assert!(*delay >= low && *delay <= high, "{delay:?} not in [{low:?}, {high:?}]");
            }
            assert_eq!(backoff.attempts(), 6);
        }
    }

    #[test]
    fn any_attempt_stays_within_bounds() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        for attempt in 0..200 {
            let d = delay(attempt, min, max);
            assert!(d >= min && d <= max, "attempt {attempt}: {d:?}");
        }
        let last = delay(u32::MAX, min, max);
        assert!(last >= max / 2 && last <= max, "{last:?}");
    }

    #[test]
    fn degenerate_bounds_are_mended() {
        let d = delay(3, Duration::ZERO, Duration::ZERO);
        assert_eq!(d, Duration::from_millis(1));
        let mut b = Backoff::new(Duration::from_secs(2), Duration::from_secs(1));
        assert_eq!(b.next_delay(), Duration::from_secs(2));
    }
}
