//! When scheduled syncs run: the time arithmetic, free of I/O so that it can be tested with any clock.
//!
//! The schedule is anchored to the moment license sync was enabled. Slot `n` starts at `anchor + n × interval`
//! and runs at `due(n) = start(n) + jitter(n)`, where `jitter(n)` lies in `[0, sync_jitter]`. Slot 0 is the first
//! sync after enabling. The jitter of a slot is pseudo-random but derived from the instance's server id, the
//! anchor and the slot number, so that a fleet of agents spreads out, and a restart does not move a time that was
//! already announced in the status.
//!
//! After a restart (or a host sleep) the next slot is the first one not yet run that is not older than the slot
//! the current time falls in: a missed slot runs at once, but a long outage causes one catch-up sync, not one per
//! missed slot. Since `sync_jitter < sync_interval` (validated), due times are strictly increasing.

use std::time::Duration;

use time::OffsetDateTime;
use uuid::Uuid;

/// The source of "now" for the scheduler, so that tests can drive time.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> OffsetDateTime;
}

/// The system's wall clock (UTC).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }
}

/// The schedule of one enablement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    anchor: OffsetDateTime,
    interval: Duration,
    jitter: Duration,
    seed: u64,
}

/// The next scheduled run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Planned {
    pub slot: u64,
    pub due: OffsetDateTime,
}

impl Schedule {
    /// `interval` must be positive; a zero interval is treated as one second (configuration validation refuses it).
    pub fn new(
        anchor: OffsetDateTime,
        interval: Duration,
        jitter: Duration,
        server_id: Uuid,
    ) -> Self {
        let interval = interval.max(Duration::from_secs(1));
        let id = server_id.as_u128();
        let seed = (id as u64) ^ ((id >> 64) as u64) ^ (anchor.unix_timestamp() as u64);
        Schedule {
            anchor,
            interval,
            jitter: jitter.min(interval.saturating_sub(Duration::from_millis(1))),
            seed,
        }
    }

    pub fn anchor(&self) -> OffsetDateTime {
        self.anchor
    }

    /// Start of slot `n`: `anchor + n × interval`.
    pub fn slot_start(&self, slot: u64) -> OffsetDateTime {
        let offset = self
            .interval
            .checked_mul(u32::try_from(slot).unwrap_or(u32::MAX))
            .unwrap_or(Duration::MAX);
        self.anchor
            .checked_add(time::Duration::try_from(offset).unwrap_or(time::Duration::MAX))
            .unwrap_or(self.anchor)
    }

    /// The jitter of slot `n`, in `[0, sync_jitter]` with millisecond resolution.
    pub fn jitter_of(&self, slot: u64) -> Duration {
        let bound = u64::try_from(self.jitter.as_millis()).unwrap_or(u64::MAX);
        if bound == 0 {
            return Duration::ZERO;
        }
        let random = splitmix64(self.seed ^ slot.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        Duration::from_millis(random % (bound + 1))
    }

    /// When slot `n` runs.
    pub fn due(&self, slot: u64) -> OffsetDateTime {
        let jitter = time::Duration::try_from(self.jitter_of(slot)).unwrap_or(time::Duration::ZERO);
        self.slot_start(slot).saturating_add(jitter)
    }

    /// The slot whose window `[start(n), start(n+1))` holds `now`; 0 before the anchor.
    pub fn current_slot(&self, now: OffsetDateTime) -> u64 {
        if now <= self.anchor {
            return 0;
        }
        let elapsed = (now - self.anchor).whole_milliseconds();
        let interval = self.interval.as_millis() as i128;
        u64::try_from(elapsed / interval.max(1)).unwrap_or(u64::MAX)
    }

    /// The next slot to run, given the last one that ran (for this anchor). Its due time may be in the past: then
    /// it is overdue and runs at once.
    pub fn next(&self, now: OffsetDateTime, last_run: Option<u64>) -> Planned {
        let after_last = last_run.map_or(0, |slot| slot.saturating_add(1));
        let slot = after_last.max(self.current_slot(now));
        Planned {
            slot,
            due: self.due(slot),
        }
    }
}

/// SplitMix64: a small, well-mixed deterministic generator (one step).
fn splitmix64(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// How long to wait from `now` until `due` (zero when it is due), capped at `max_step` so that a sleeping
/// scheduler re-reads the clock regularly and follows wall-clock changes.
pub fn wait_for(now: OffsetDateTime, due: OffsetDateTime, max_step: Duration) -> Duration {
    if due <= now {
        return Duration::ZERO;
    }
    Duration::try_from(due - now)
        .unwrap_or(max_step)
        .min(max_step)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use time::macros::datetime;

    use super::*;

    /// A clock the test moves by hand.
    struct ManualClock(Mutex<OffsetDateTime>);

    impl ManualClock {
        fn new(start: OffsetDateTime) -> Self {
            ManualClock(Mutex::new(start))
        }
        fn set(&self, to: OffsetDateTime) {
            *self.0.lock().expect("clock") = to;
        }
        fn advance(&self, by: time::Duration) {
            *self.0.lock().expect("clock") += by;
        }
    }

    impl Clock for ManualClock {
        fn now(&self) -> OffsetDateTime {
            *self.0.lock().expect("clock")
        }
    }

    const WEEK: Duration = Duration::from_secs(7 * 24 * 3600);
    const HOUR: Duration = Duration::from_secs(3600);
    const ANCHOR: OffsetDateTime = datetime!(2025-03-03 09:00 UTC);

    fn weekly() -> Schedule {
        Schedule::new(ANCHOR, WEEK, HOUR, Uuid::from_u128(0x6f1c8a38))
    }

    #[test]
    fn every_due_time_lies_inside_its_slot_window() {
        let schedule = weekly();
        for slot in 0..500 {
            let start = schedule.slot_start(slot);
            assert_eq!(start, ANCHOR + time::Duration::weeks(slot as i64));
            let due = schedule.due(slot);
            assert!(due >= start, "slot {slot}");
            assert!(due <= start + time::Duration::hours(1), "slot {slot}");
        }
    }

    #[test]
    fn jitter_is_spread_deterministic_and_differs_between_instances() {
        let schedule = weekly();
        let jitters: Vec<Duration> = (0..200).map(|slot| schedule.jitter_of(slot)).collect();
        assert_eq!(
            jitters,
            (0..200)
                .map(|slot| weekly().jitter_of(slot))
                .collect::<Vec<_>>()
        );
        let (low, high) = jitters.iter().fold((0, 0), |(low, high), jitter| {
            if *jitter < HOUR / 2 {
                (low + 1, high)
            } else {
                (low, high + 1)
            }
        });
        assert!(
            low > 60 && high > 60,
            "jitter is not spread: {low} low, {high} high"
        );
        let other = Schedule::new(ANCHOR, WEEK, HOUR, Uuid::from_u128(0x1234));
        let same = (0..50)
            .filter(|slot| other.jitter_of(*slot) == schedule.jitter_of(*slot))
            .count();
        assert!(same < 5, "two instances share their jitter");
        // No jitter configured: exactly on the slot.
        let exact = Schedule::new(ANCHOR, WEEK, Duration::ZERO, Uuid::from_u128(1));
        assert_eq!(exact.due(3), ANCHOR + time::Duration::weeks(3));
    }

    #[test]
    fn the_first_run_is_anchored_to_enabling_and_runs_follow_on_time() {
        let clock = ManualClock::new(ANCHOR);
        let schedule = weekly();
        let mut last = None;
        for expected in 0..5u64 {
            let planned = schedule.next(clock.now(), last);
            assert_eq!(planned.slot, expected);
            assert!(planned.due >= clock.now() || expected == 0);
            // Before its time, nothing is due.
            let wait = wait_for(clock.now(), planned.due, Duration::MAX);
            if wait > Duration::ZERO {
                clock.set(planned.due - time::Duration::milliseconds(1));
                assert!(wait_for(clock.now(), planned.due, Duration::MAX) > Duration::ZERO);
            }
            clock.set(planned.due);
            assert_eq!(
                wait_for(clock.now(), planned.due, Duration::MAX),
                Duration::ZERO
            );
            last = Some(planned.slot);
            // The job runs for a while; the next plan is the next slot, not this one again.
            clock.advance(time::Duration::minutes(5));
            assert_eq!(schedule.next(clock.now(), last).slot, expected + 1);
        }
    }

    #[test]
    fn a_missed_slot_runs_once_at_restart_and_a_long_outage_catches_up_once() {
        let schedule = weekly();
        // Down over slot 1's due time; back in slot 1's window: slot 1 is overdue and runs at once.
        let now = schedule.due(1) + time::Duration::hours(2);
        let planned = schedule.next(now, Some(0));
        assert_eq!(planned.slot, 1);
        assert_eq!(wait_for(now, planned.due, Duration::MAX), Duration::ZERO);
        // Down for five weeks: one catch-up run (the current slot), not five.
        let now = ANCHOR + time::Duration::weeks(6) + time::Duration::days(2);
        let planned = schedule.next(now, Some(0));
        assert_eq!(planned.slot, 6);
        assert!(planned.due <= now);
        // And the slot after it is on the normal grid.
        assert_eq!(schedule.next(now, Some(6)).slot, 7);
        // Enabled but never ran (e.g. the agent was down since): the current slot runs.
        assert_eq!(schedule.next(now, None).slot, 6);
    }

    #[test]
    fn a_clock_that_goes_back_never_repeats_a_slot() {
        let schedule = weekly();
        let now = ANCHOR + time::Duration::weeks(3);
        let planned = schedule.next(now - time::Duration::weeks(2), Some(3));
        assert_eq!(planned.slot, 4);
        assert!(wait_for(now - time::Duration::weeks(2), planned.due, WEEK * 10) > WEEK);
        // Before the anchor: slot 0.
        assert_eq!(schedule.current_slot(ANCHOR - time::Duration::days(1)), 0);
    }

    #[test]
    fn waits_are_capped_so_the_clock_is_read_again() {
        let now = ANCHOR;
        assert_eq!(
            wait_for(now, now + time::Duration::days(6), Duration::from_secs(60)),
            Duration::from_secs(60)
        );
        assert_eq!(
            wait_for(
                now,
                now + time::Duration::seconds(2),
                Duration::from_secs(60)
            ),
            Duration::from_secs(2)
        );
        assert_eq!(
            wait_for(
                now,
                now - time::Duration::seconds(2),
                Duration::from_secs(60)
            ),
            Duration::ZERO
        );
    }

    #[test]
    fn short_test_intervals_work_at_millisecond_resolution() {
        let anchor = datetime!(2025-03-03 09:00:00.250 UTC);
        let schedule = Schedule::new(
            anchor,
            Duration::from_secs(2),
            Duration::from_secs(1),
            Uuid::from_u128(9),
        );
        for slot in 0..100 {
            let start = schedule.slot_start(slot);
            assert_eq!(start, anchor + time::Duration::seconds(2 * slot as i64));
            let due = schedule.due(slot);
            assert!(due >= start && due <= start + time::Duration::seconds(1));
            assert!(schedule.due(slot + 1) > due, "due times keep their order");
        }
        assert_eq!(
            schedule.current_slot(anchor + time::Duration::milliseconds(4_100)),
            2
        );
    }

    #[test]
    fn jitter_is_kept_below_the_interval() {
        let schedule = Schedule::new(ANCHOR, HOUR, HOUR * 2, Uuid::from_u128(1));
        for slot in 0..100 {
            assert!(schedule.jitter_of(slot) < HOUR);
        }
    }
}
