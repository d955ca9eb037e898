//! Exponential backoff with jitter, for what the worker (and the Lambda handler) repeats: reads,
//! processor retries, table calls, sink writes.

use std::time::Duration;

/// Delays that double from `min` up to `max`, each drawn uniformly from [delay/2, delay] so
/// workers that failed together do not retry together.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        let min = min.max(Duration::from_millis(1));
        Backoff { min, max: max.max(min), next: min }
    }

    /// The delay before the next attempt; doubles the one after.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        let half = delay / 2;
        half + half.mul_f64(fastrand::f64())
    }

    /// The last attempt worked: start again from the minimum.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_reset() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let delays: Vec<Duration> = (0..6).map(|_| backoff.next_delay()).collect();
        for (delay, cap) in delays.iter().zip([100u64, 200, 400, 800, 800, 800]) {
            assert!(*delay <= Duration::from_millis(cap) && *delay >= Duration::from_millis(cap / 2), "{delay:?}");
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }
}
