//! The agent's one exponential backoff: re-sending pending snapshots, reconnecting the control stream, retrying a
//! scheduled sync, and polling GHES while it builds the report.
//!
//! Attempt `k` (from 0) has the window `min(max, initial × 2^k)`. Two jitters spread agents that failed at the same
//! moment so that they do not retry in step:
//!
//! - [`Jitter::Full`] waits a uniformly random time in `[0, window]` (retries against the aggregator);
//! - [`Jitter::Proportional`] waits `window × [1 − f, 1 + f]` (the GHES 202 polling, which must not collapse to 0).

use std::time::Duration;

use rand::Rng as _;

/// How the delay of one attempt is drawn from its window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Jitter {
    /// Uniform in `[0, window]`.
    Full,
    /// Uniform in `window × [1 − fraction, 1 + fraction]`.
    Proportional { fraction: f64 },
}

/// ±20%: the GHES report polling's jitter.
pub const POLL_JITTER: Jitter = Jitter::Proportional { fraction: 0.2 };

#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    jitter: Jitter,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration, jitter: Jitter) -> Self {
        // A zero window would retry in a hot loop.
        let initial = initial.max(Duration::from_millis(1));
        Backoff {
            initial,
            max: max.max(initial),
            jitter,
            attempt: 0,
        }
    }

    /// Exponential backoff with full jitter.
    pub fn full_jitter(initial: Duration, max: Duration) -> Self {
        Backoff::new(initial, max, Jitter::Full)
    }

    /// The window of the next delay: `min(max, initial × 2^attempt)`.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The next delay, and the window grows for the attempt after.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        match self.jitter {
            Jitter::Full => {
                let millis = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
                Duration::from_millis(rand::rng().random_range(0..=millis))
            }
            Jitter::Proportional { fraction } => {
                ceiling.mul_f64(rand::rng().random_range((1.0 - fraction)..=(1.0 + fraction)))
            }
        }
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
        let mut backoff =
            Backoff::full_jitter(Duration::from_millis(100), Duration::from_millis(1_000));
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
                Backoff::full_jitter(Duration::from_millis(1_000), Duration::from_millis(1_000));
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
        let mut backoff = Backoff::full_jitter(Duration::from_secs(1), Duration::from_secs(300));
        for _ in 0..100 {
            assert!(backoff.next_delay() <= Duration::from_secs(300));
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum_with_bounded_jitter() {
        let mut backoff = Backoff::new(
            Duration::from_millis(100),
            Duration::from_millis(350),
            POLL_JITTER,
        );
        let delays: Vec<Duration> = (0..5).map(|_| backoff.next_delay()).collect();
        for (delay, base) in delays.iter().zip([100u64, 200, 350, 350, 350]) {
            let base = Duration::from_millis(base);
            assert!(
                *delay >= base.mul_f64(0.79) && *delay <= base.mul_f64(1.21),
                "{delay:?} vs {base:?}"
            );
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(121));
    }
}
