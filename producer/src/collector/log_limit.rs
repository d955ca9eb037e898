//! Warnings that cannot flood the log: a [`LogLimit`] lets one line of a kind through per
//! interval and counts the ones it holds back, so the next line says how many were suppressed.
//! Metrics carry the per-event detail; the log only says that something keeps happening.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How often a repeated warning of one kind is written: once per this interval at most.
pub(crate) const WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// One kind of warning, written at most once per interval.
#[derive(Debug)]
pub(crate) struct LogLimit {
    interval: Duration,
    state: Mutex<Window>,
}

#[derive(Debug, Default)]
struct Window {
    /// When a line was last let through.
    last: Option<Instant>,
    /// Lines held back since then.
    suppressed: u64,
}

impl LogLimit {
    pub(crate) fn new(interval: Duration) -> Self {
        LogLimit { interval, state: Mutex::new(Window::default()) }
    }

    /// Whether a line may be written now: `Some(n)` with the number of lines held back since the
    /// last one written, or `None` (and this one is counted as held back).
    pub(crate) fn admit(&self) -> Option<u64> {
        let now = Instant::now();
        // A poisoned lock only means another thread panicked mid-update of two integers.
        let mut window = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match window.last {
            Some(last) if now.duration_since(last) < self.interval => {
                window.suppressed += 1;
                None
            }
            _ => {
                window.last = Some(now);
                Some(std::mem::take(&mut window.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_line_per_interval_and_the_next_counts_the_rest() {
        let limit = LogLimit::new(Duration::from_secs(10));
        assert_eq!(limit.admit(), Some(0));
        let held: Vec<Option<u64>> = (0..1000).map(|_| limit.admit()).collect();
        assert!(held.iter().all(Option::is_none));
        tokio::time::advance(Duration::from_millis(9_999)).await;
        assert_eq!(limit.admit(), None);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(limit.admit(), Some(1001));
        assert_eq!(limit.admit(), None);
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(limit.admit(), Some(1));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(limit.admit(), Some(0));
    }
}
