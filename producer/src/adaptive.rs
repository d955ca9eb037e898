//! Adaptive concurrency for `PutRecords`: how many calls may be in flight at once, and how long
//! each may take, learned from how the calls go, as TCP's congestion control and Netflix's
//! `concurrency-limits` learn them.
//!
//! The engine asks [`CallLimit::limit`] before starting a call and [`CallLimit::timeout`] for the
//! call's timeout, and tells [`CallLimit::on_answer`] how each call ended ([`Outcome`]). The rules,
//! AIMD (additive increase, multiplicative decrease):
//! - **Congestion** (a call timed out, was throttled, or answered later than the configured
//!   request timeout): the limit is halved, from the calls actually in flight when that is fewer
//!   than the limit (TCP halves its flight size, not its window), never below 1.
//! - **Health** (answered within half the configured request timeout, while the calls in flight
//!   used at least half the limit): the limit grows by `1 / limit`: one call per window of
//!   healthy answers, up to `max_connections`. A limit that is not used does not grow.
//! - Anything else (an answer between half and all of the request timeout, a connection error, a
//!   refused call) holds the limit.
//! - **One decrease per window.** After a decrease, the limit is [`Phase::Draining`]: the answers
//!   of calls sent before it describe the old limit, so they neither decrease it again nor
//!   increase it. The first answer of a call sent after the decrease reopens it
//!   ([`Phase::Open`]). A burst of calls that all time out together is one event, not a collapse
//!   to 1.
//!
//! The timeout of a call starts at the configured request timeout (KPL `RequestTimeout`). A call
//! that times out doubles the timeout of the calls after it (from the timeout it was given, so
//! calls timing out together double it once), up to `max_request_timeout`. Answers move it back
//! down by an eighth of the way per answer toward `srtt + 4 * rttvar` (the smoothed latency and
//! its variation, as TCP computes its retransmission timeout, RFC 6298) or twice the smoothed
//! latency, whichever is more (a backend that answers every call in exactly 3 s has no
//! variation, and its calls must not time out at 3 s), never below the configured request
//! timeout. A longer timeout is also the cheap way to fewer duplicates: a call
//! that timed out may have been written, and its records are sent again.
//!
//! Every method takes the time as an argument (no clock is read here), so the state machine is
//! tested with made-up instants.

use std::time::Duration;

use tokio::time::Instant;

/// Multiplicative decrease: the limit after a congestion event, as a share of the calls in flight.
const DECREASE: f64 = 0.5;
/// Smoothing of the latency estimate (RFC 6298's alpha) and of its variation (beta).
const SRTT_GAIN: f64 = 1.0 / 8.0;
const RTTVAR_GAIN: f64 = 1.0 / 4.0;
/// Share of the way from the current timeout to the estimated one that one answer moves it.
const TIMEOUT_DECAY: f64 = 1.0 / 8.0;
/// A timeout this close to its estimate is set to it.
const TIMEOUT_SNAP: Duration = Duration::from_millis(10);

/// How one `PutRecords` call ended, as far as congestion is concerned.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Outcome {
    /// Answered after `latency`, with fewer than half of its entries throttled.
    Answered(Duration),
    /// Throttled: the whole call, or at least half of its entries (answered after `latency`).
    /// A few throttled entries are one hot shard, which its own backoff and rate limiter handle.
    Throttled(Duration),
    /// No answer within the timeout it was given.
    TimedOut,
    /// Failed for another reason (connection refused, a 5xx, a refused call): no news on load.
    Failed,
}

/// Whether the limit may move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Healthy answers grow the limit; congestion halves it.
    Open,
    /// Halved at `since`: answers of calls sent before then are ignored for the limit.
    Draining { since: Instant },
}

/// The limit on calls in flight and the timeout of the next call.
#[derive(Debug, Clone)]
pub(crate) struct CallLimit {
    limit: f64,
    max: f64,
    phase: Phase,
    base_timeout: Duration,
    max_timeout: Duration,
    timeout: Duration,
    /// Smoothed latency and its mean deviation, in seconds; `None` before the first answer.
    srtt: Option<(f64, f64)>,
}

/// What changed with one answer, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Change {
    Unchanged,
    Increased,
    Decreased,
}

impl CallLimit {
    /// Starts at `max` calls (KPL `MaxConnections`: a healthy stream behaves as it would without
    /// adaptation) and `base_timeout` (KPL `RequestTimeout`); the timeout may grow to
    /// `max_timeout`, and never goes below `base_timeout`.
    pub(crate) fn new(max: usize, base_timeout: Duration, max_timeout: Duration) -> Self {
        let max = max.max(1) as f64;
        CallLimit {
            limit: max,
            max,
            phase: Phase::Open,
            base_timeout,
            max_timeout: max_timeout.max(base_timeout),
            timeout: base_timeout,
            srtt: None,
        }
    }

    /// Calls that may be in flight now: at least 1, at most `max_connections`.
    pub(crate) fn limit(&self) -> usize {
        self.limit as usize
    }

    /// The timeout to give the next call.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    #[cfg(test)]
    pub(crate) fn phase(&self) -> Phase {
        self.phase
    }

    /// Learns from one answered (or timed out) call: `sent_at` is when it started, `given` the
    /// timeout it had, `in_flight` the calls in flight when it ended (itself included), `now`
    /// the time of the answer.
    pub(crate) fn on_answer(
        &mut self,
        outcome: Outcome,
        sent_at: Instant,
        given: Duration,
        in_flight: usize,
        now: Instant,
    ) -> Change {
        match outcome {
            Outcome::Answered(latency) | Outcome::Throttled(latency) => self.learn_latency(latency),
            Outcome::TimedOut => {
                // Doubled from what this call had, so calls that time out together double it once.
                self.timeout = self.timeout.max(given.saturating_mul(2)).min(self.max_timeout);
            }
            Outcome::Failed => {}
        }
        if let Phase::Draining { since } = self.phase {
            if sent_at < since {
                return Change::Unchanged;
            }
            self.phase = Phase::Open;
        }
        let congested = match outcome {
            Outcome::TimedOut | Outcome::Throttled(_) => true,
            Outcome::Answered(latency) => latency > self.base_timeout,
            Outcome::Failed => false,
        };
        if congested {
            let flight = (in_flight.max(1) as f64).min(self.limit);
            let limit = (flight * DECREASE).floor().max(1.0);
            self.phase = Phase::Draining { since: now };
            if limit < self.limit {
                self.limit = limit;
                return Change::Decreased;
            }
            return Change::Unchanged;
        }
        let healthy = matches!(outcome, Outcome::Answered(latency) if latency <= self.base_timeout / 2);
        // A limit the load does not reach is no evidence it could carry more.
        let used = in_flight as f64 * 2.0 >= self.limit.floor();
        if healthy && used && self.limit < self.max {
            let before = self.limit();
            self.limit = (self.limit + 1.0 / self.limit.floor()).min(self.max);
            if self.limit() > before {
                return Change::Increased;
            }
        }
        Change::Unchanged
    }

    /// Learns the latency of a call whose timeout already counted as congestion (it passed its
    /// timeout, and the engine waited for its answer): the timeout follows it, the limit does not
    /// move again for the same call.
    pub(crate) fn on_late_answer(&mut self, latency: Duration) {
        self.learn_latency(latency);
    }

    /// Updates the latency estimate and moves the timeout toward `max(srtt + 4 * rttvar, 2 * srtt)`.
    fn learn_latency(&mut self, latency: Duration) {
        let sample = latency.as_secs_f64();
        let (srtt, rttvar) = match self.srtt {
            None => (sample, sample / 2.0),
            Some((srtt, rttvar)) => {
                let rttvar = (1.0 - RTTVAR_GAIN) * rttvar + RTTVAR_GAIN * (srtt - sample).abs();
                ((1.0 - SRTT_GAIN) * srtt + SRTT_GAIN * sample, rttvar)
            }
        };
        self.srtt = Some((srtt, rttvar));
        let target = Duration::try_from_secs_f64((srtt + 4.0 * rttvar).max(2.0 * srtt))
            .unwrap_or(self.max_timeout)
            .clamp(self.base_timeout, self.max_timeout);
        // Up at once when answers take longer than the timeout allows for; down gradually, and
        // all the way once within a few milliseconds of it.
        let gap = self.timeout.saturating_sub(target);
        self.timeout = if gap < TIMEOUT_SNAP { target } else { self.timeout - gap.mul_f64(TIMEOUT_DECAY) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: Duration = Duration::from_secs(2);
    const MAX_TIMEOUT: Duration = Duration::from_secs(16);
    const FAST: Duration = Duration::from_millis(50);

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    /// A limit of `max` calls, and a made-up clock starting at `t0`.
    fn limit(max: usize) -> (CallLimit, Instant) {
        (CallLimit::new(max, BASE, MAX_TIMEOUT), Instant::now())
    }

    #[test]
    fn starts_at_the_configured_maximum_and_timeout() {
        let (l, _) = limit(24);
        assert_eq!((l.limit(), l.timeout(), l.phase()), (24, BASE, Phase::Open));
        assert_eq!(CallLimit::new(0, BASE, MAX_TIMEOUT).limit(), 1, "at least one call");
        assert_eq!(CallLimit::new(4, BASE, Duration::from_secs(1)).max_timeout, BASE, "max below base: base");
    }

    #[test]
    fn a_timeout_halves_the_calls_in_flight_and_doubles_the_timeout() {
        let (mut l, t0) = limit(24);
        let change = l.on_answer(Outcome::TimedOut, t0, BASE, 8, t0 + BASE);
        assert_eq!(change, Change::Decreased);
        assert_eq!(l.limit(), 4, "half of the 8 in flight, not of the limit of 24");
        assert_eq!(l.timeout(), secs(4.0));
        assert_eq!(l.phase(), Phase::Draining { since: t0 + BASE });
    }

    #[test]
    fn throttling_halves_the_limit_and_leaves_the_timeout() {
        let (mut l, t0) = limit(8);
        assert_eq!(l.on_answer(Outcome::Throttled(FAST), t0, BASE, 8, t0 + FAST), Change::Decreased);
        assert_eq!(l.limit(), 4);
        assert_eq!(l.timeout(), BASE);
        // A throttled answer of a call sent later halves it again.
        let t1 = t0 + secs(1.0);
        assert_eq!(l.on_answer(Outcome::Throttled(FAST), t1, BASE, 4, t1 + FAST), Change::Decreased);
        assert_eq!(l.limit(), 2);
    }

    #[test]
    fn an_answer_slower_than_the_request_timeout_is_congestion() {
        // Given 4 s (the timeout grew after a timeout), the call answered in 3 s: over the 2 s
        // configured, so the backend is congested although nothing timed out.
        let (mut l, t0) = limit(8);
        assert_eq!(l.on_answer(Outcome::Answered(secs(3.0)), t0, secs(4.0), 8, t0 + secs(3.0)), Change::Decreased);
        assert_eq!(l.limit(), 4);
        assert!(l.timeout() > secs(3.0), "and the timeout allows for such answers: {:?}", l.timeout());
    }

    #[test]
    fn calls_failing_together_are_one_decrease_and_one_doubling() {
        let (mut l, t0) = limit(16);
        let sent = t0;
        let mut changes = Vec::new();
        for i in 0..16 {
            let now = t0 + BASE + secs(0.001 * f64::from(i));
            changes.push(l.on_answer(Outcome::TimedOut, sent, BASE, 16 - i as usize, now));
        }
        assert_eq!(changes.iter().filter(|c| **c == Change::Decreased).count(), 1, "{changes:?}");
        assert_eq!((l.limit(), l.timeout()), (8, secs(4.0)));
        // Nor do healthy answers of calls sent before the decrease grow it.
        assert_eq!(l.on_answer(Outcome::Answered(FAST), sent, BASE, 8, t0 + secs(3.0)), Change::Unchanged);
        assert_eq!(l.limit(), 8);
        assert!(matches!(l.phase(), Phase::Draining { .. }));
        // A call sent after the decrease reopens it.
        let later = t0 + secs(5.0);
        l.on_answer(Outcome::Answered(FAST), later, BASE, 8, later + FAST);
        assert_eq!(l.phase(), Phase::Open);
    }

    #[test]
    fn healthy_answers_grow_the_limit_by_one_per_window_up_to_the_maximum() {
        let (mut l, t0) = limit(6);
        l.on_answer(Outcome::TimedOut, t0, BASE, 2, t0 + BASE);
        assert_eq!(l.limit(), 1);
        let mut now = t0 + secs(10.0);
        let mut answers_per_step = Vec::new();
        let mut answers = 0;
        while l.limit() < 6 {
            let before = l.limit();
            now += FAST;
            let change = l.on_answer(Outcome::Answered(FAST), now - FAST, BASE, before, now);
            answers += 1;
            if change == Change::Increased {
                assert_eq!(l.limit(), before + 1, "one at a time");
                answers_per_step.push(answers);
                answers = 0;
            }
            assert!(answers < 100, "the limit grows");
        }
        // `limit` healthy answers per step (1/limit each; float rounding may need one more).
        assert_eq!(answers_per_step.len(), 5);
        for (step, answers) in answers_per_step.iter().enumerate() {
            let from = step + 1;
            assert!((from..=from + 1).contains(answers), "from {from}: {answers} answers: {answers_per_step:?}");
        }
        for _ in 0..100 {
            now += FAST;
            l.on_answer(Outcome::Answered(FAST), now - FAST, BASE, 6, now);
        }
        assert_eq!(l.limit(), 6, "never above max_connections");
    }

    #[test]
    fn an_unused_limit_does_not_grow() {
        let (mut l, t0) = limit(24);
        l.on_answer(Outcome::TimedOut, t0, BASE, 16, t0 + BASE);
        assert_eq!(l.limit(), 8);
        let mut now = t0 + secs(10.0);
        for _ in 0..1000 {
            now += FAST;
            // 3 in flight is less than half of 8.
            assert_eq!(l.on_answer(Outcome::Answered(FAST), now - FAST, BASE, 3, now), Change::Unchanged);
        }
        assert_eq!(l.limit(), 8);
        // Half of it is used: it grows.
        for _ in 0..8 {
            now += FAST;
            l.on_answer(Outcome::Answered(FAST), now - FAST, BASE, 4, now);
        }
        assert_eq!(l.limit(), 9);
    }

    #[test]
    fn slow_but_not_late_answers_and_other_failures_hold_the_limit() {
        let (mut l, t0) = limit(8);
        l.on_answer(Outcome::TimedOut, t0, BASE, 8, t0 + BASE);
        assert_eq!(l.limit(), 4);
        let mut now = t0 + secs(10.0);
        for outcome in [Outcome::Answered(secs(1.5)), Outcome::Failed, Outcome::Answered(BASE)] {
            for _ in 0..50 {
                now += FAST;
                assert_eq!(l.on_answer(outcome, now - FAST, BASE, 4, now), Change::Unchanged, "{outcome:?}");
            }
        }
        assert_eq!(l.limit(), 4);
    }

    #[test]
    fn the_limit_never_goes_below_one() {
        let (mut l, t0) = limit(4);
        let mut now = t0;
        for _ in 0..20 {
            now += secs(1.0);
            l.on_answer(Outcome::Throttled(FAST), now - FAST, BASE, 1, now);
            assert_eq!(l.limit(), 1);
        }
    }

    #[test]
    fn the_timeout_grows_up_to_its_bound_and_comes_back_down_to_the_base() {
        let (mut l, t0) = limit(4);
        let mut now = t0;
        let mut seen = Vec::new();
        for _ in 0..6 {
            let given = l.timeout();
            now += given;
            l.on_answer(Outcome::TimedOut, now - given, given, 1, now);
            seen.push(l.timeout().as_secs());
        }
        assert_eq!(seen, [4, 8, 16, 16, 16, 16], "doubling, bounded by max_request_timeout");
        // Fast answers bring it down gradually (an eighth of the way per answer), to the base.
        let mut previous = l.timeout();
        let mut answers = 0;
        while l.timeout() > BASE {
            now += FAST;
            l.on_answer(Outcome::Answered(FAST), now - FAST, l.timeout(), 1, now);
            assert!(l.timeout() < previous, "down with every fast answer");
            assert!(l.timeout() >= previous.mul_f64(0.8), "gradually: {previous:?} then {:?}", l.timeout());
            previous = l.timeout();
            answers += 1;
            assert!(answers < 1000, "reaches the base");
        }
        assert_eq!(l.timeout(), BASE, "never below the configured request timeout");
    }

    #[test]
    fn slow_answers_raise_the_timeout_above_them() {
        let (mut l, t0) = limit(4);
        let mut now = t0;
        // Answers of 5 s come back within a 16 s timeout after a first timeout or two.
        l.on_answer(Outcome::TimedOut, now, BASE, 1, now + BASE);
        now += secs(10.0);
        for _ in 0..20 {
            l.on_answer(Outcome::Answered(secs(5.0)), now, l.timeout(), 1, now + secs(5.0));
            now += secs(5.0);
        }
        assert!(l.timeout() > secs(5.0), "the timeout allows for the answers seen: {:?}", l.timeout());
        assert!(l.timeout() <= MAX_TIMEOUT);
    }

    #[test]
    fn a_timeout_during_a_drain_still_grows_the_timeout() {
        let (mut l, t0) = limit(8);
        l.on_answer(Outcome::Throttled(FAST), t0, BASE, 8, t0 + FAST);
        assert!(matches!(l.phase(), Phase::Draining { .. }));
        // Sent before the decrease, so no second decrease, but the timeout doubles.
        assert_eq!(l.on_answer(Outcome::TimedOut, t0, BASE, 4, t0 + BASE), Change::Unchanged);
        assert_eq!((l.limit(), l.timeout()), (4, secs(4.0)));
    }
}
