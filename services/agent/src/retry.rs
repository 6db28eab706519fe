//! Exponential backoff with full jitter, for re-sending pending snapshots and reconnecting the control stream.
//!
//! Attempt `k` (from 0) waits a uniformly random time in `[0, min(max, initial × 2^k)]` ("full jitter"): agents that
//! lost the aggregator at the same moment spread their retries over the whole window instead of retrying in step.

use std::time::Duration;

use rand::Rng as _;

#[derive(Debug, Clone)]
pub struct FullJitter {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl FullJitter {
    pub fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.max(Duration::from_millis(1));
        FullJitter {
            initial,
            max: max.max(initial),
            attempt: 0,
        }
    }

    /// The upper bound of the next delay: `min(max, initial × 2^attempt)`.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The next delay, and the window grows for the attempt after.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let millis = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rand::rng().random_range(0..=millis))
    }

    /// Failed attempts since the last success.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_doubles_up_to_the_cap_and_delays_stay_inside() {
        let mut backoff = FullJitter::new(Duration::from_millis(100), Duration::from_millis(1_000));
        let mut ceilings = Vec::new();
        for _ in 0..8 {
            let ceiling = backoff.ceiling();
            ceilings.push(ceiling.as_millis());
            let delay = backoff.next_delay();
            assert!(delay <= ceiling, "{delay:?} > {ceiling:?}");
        }
        assert_eq!(ceilings, [100, 200, 400, 800, 1000, 1000, 1000, 1000]);
        assert_eq!(backoff.attempts(), 8);
        backoff.reset();
        assert_eq!(backoff.ceiling(), Duration::from_millis(100));
    }

    #[test]
    fn delays_are_spread_over_the_window() {
        let mut total = Duration::ZERO;
        let mut below_half = 0;
        for _ in 0..400 {
            let mut backoff =
                FullJitter::new(Duration::from_millis(1_000), Duration::from_millis(1_000));
            let delay = backoff.next_delay();
            total += delay;
            if delay < Duration::from_millis(500) {
                below_half += 1;
            }
        }
        assert!((100..300).contains(&below_half), "{below_half}");
        assert!(total > Duration::from_secs(120) && total < Duration::from_secs(280));
    }

    #[test]
    fn huge_attempt_counts_do_not_overflow() {
        let mut backoff = FullJitter::new(Duration::from_secs(1), Duration::from_secs(300));
        for _ in 0..100 {
            assert!(backoff.next_delay() <= Duration::from_secs(300));
        }
    }
}
