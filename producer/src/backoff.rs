//! Jittered exponential backoff for records that failed: the one retry layer of the producer
//! (the SDK's own retries are turned off for `PutRecords`).

use std::time::Duration;

/// Delay before attempt number `attempt + 1`, after `attempt` failures (1 or more): "full jitter"
/// (a random point in `[min, min * 2^(attempt-1)]`, capped at `max`), which spreads retries of
/// many records out instead of synchronising them.
pub(crate) fn delay(attempt: usize, min: Duration, max: Duration) -> Duration {
    let exponent = attempt.saturating_sub(1).min(20) as u32;
    let ceiling = min.saturating_mul(1u32 << exponent).min(max);
    let span = ceiling.saturating_sub(min);
    min + span.mul_f64(fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_stays_within_bounds() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        for attempt in 1..40 {
            let d = delay(attempt, min, max);
            assert!(d >= min && d <= max, "attempt {attempt}: {d:?}");
            let ceiling = min.saturating_mul(1 << (attempt - 1).min(20)).min(max);
            assert!(d <= ceiling);
        }
        assert_eq!(delay(1, min, max), min, "the first retry waits the minimum");
    }
}
