//! One retry backoff for every reconnect and retry loop of the agent and the control plane:
//! exponential from `min`, doubling per consecutive failure, capped at `max`, with "equal
//! jitter".
//!
//! Invariants:
//! - The `n`-th delay after a reset (1-based) lies in `[ceiling/2, ceiling]` where
//!   `ceiling = min(max, min * 2^(n-1))`: never more than `max`, never less than `min / 2`, so
//!   a flapping peer is not hammered and a fleet does not retry in lockstep after an outage.
//! - [`Backoff::reset`] (after a success) starts again at `min`.
//! - No clock and no sleeping here: callers sleep (tokio time), tests pass the random unit to
//!   [`Backoff::next_delay_with`].

use std::time::Duration;

/// Exponential backoff with equal jitter; see the module docs.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
}

/// Doubling stops here (2^20 times `min` is beyond any sensible `max`).
const MAX_DOUBLINGS: u32 = 20;

impl Backoff {
    /// A backoff from `min` up to `max` (a `max` below `min` is raised to `min`).
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            failures: 0,
        }
    }

    /// The smallest first delay.
    pub fn min(&self) -> Duration {
        self.min
    }

    /// The largest delay.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// Consecutive failures since the last reset.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// After a success: the next delay starts at `min` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// The upper bound of the delay after `failures` consecutive failures (1-based; 0 counts
    /// as 1), without jitter: `min(max, min * 2^(failures-1))`.
    pub fn ceiling(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(MAX_DOUBLINGS);
        self.min.saturating_mul(1u32 << doublings).min(self.max)
    }

    /// Counts one more failure and returns how long to wait before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        self.next_delay_with(rand::random::<f64>())
    }

    /// [`Backoff::next_delay`] with the random `unit` (in `[0, 1]`) given.
    pub fn next_delay_with(&mut self, unit: f64) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.delay_for(self.failures, unit)
    }

    /// The delay after `failures` consecutive failures for a caller that counts them itself:
    /// in `[ceiling/2, ceiling]`, placed by the random `unit` in `[0, 1]`.
    pub fn delay_for(&self, failures: u32, unit: f64) -> Duration {
        let ceiling = self.ceiling(failures);
        let half = ceiling / 2;
        half + (ceiling - half).mul_f64(unit.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn delays_double_up_to_the_cap_within_equal_jitter_and_reset() {
        let mut b = Backoff::new(MS(100), MS(1000));
        let top: Vec<_> = (0..6).map(|_| b.next_delay_with(1.0)).collect();
        assert_eq!(
            top,
            [MS(100), MS(200), MS(400), MS(800), MS(1000), MS(1000)]
        );
        assert_eq!(b.failures(), 6);
        b.reset();
        assert_eq!(
            b.next_delay_with(0.0),
            MS(50),
            "the lower half of the ceiling"
        );
        for _ in 0..100 {
            let d = b.next_delay();
            assert!(d >= MS(50) && d <= MS(1000), "{d:?}");
        }
    }

    #[test]
    fn a_maximum_below_the_minimum_is_raised_and_huge_counts_do_not_overflow() {
        let mut b = Backoff::new(MS(500), MS(10));
        assert_eq!(b.max(), MS(500));
        assert_eq!(b.next_delay_with(1.0), MS(500));
        let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(3600));
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(3600));
        assert_eq!(b.ceiling(0), Duration::from_secs(1));
    }
}
