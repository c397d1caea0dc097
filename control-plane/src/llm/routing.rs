//! Routing state: circuit breakers, latency estimates, per-organisation rate limits and spend.
//!
//! Invariants:
//! - No lock here is ever held across an `.await` (all are short `std::sync::Mutex` sections).
//! - A breaker opens after `threshold` consecutive failures, refuses calls for `cooldown`, then
//!   lets exactly one probe through at a time (half-open): its success closes the breaker, its failure
//!   opens it again.
//! - Spend lives in [`super::spend`].

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use uuid::Uuid;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// `probe_since` is set while one probe is out; a probe that never reported (its caller
    /// went away) frees the slot after one cooldown, so the breaker cannot stick.
    HalfOpen {
        probe_since: Option<Instant>,
    },
}

/// Breaker state as a gauge value: 0 closed, 1 half-open, 2 open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerView {
    Closed = 0,
    HalfOpen = 1,
    Open = 2,
}

/// A per-provider circuit breaker.
#[derive(Debug)]
pub struct Breaker {
    state: Mutex<State>,
    threshold: u32,
    cooldown: Duration,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            state: Mutex::new(State::Closed { failures: 0 }),
            threshold: threshold.max(1),
            cooldown,
        }
    }

    /// Whether a call may go out now (takes the probe slot when half-open).
    pub fn allow(&self) -> bool {
        let mut s = lock(&self.state);
        match *s {
            State::Closed { .. } => true,
            State::Open { until } if Instant::now() >= until => {
                *s = State::HalfOpen {
                    probe_since: Some(Instant::now()),
                };
                true
            }
            State::Open { .. } => false,
            State::HalfOpen { probe_since } => {
                if probe_since.is_none_or(|t| t.elapsed() >= self.cooldown) {
                    *s = State::HalfOpen {
                        probe_since: Some(Instant::now()),
                    };
                    true
                } else {
                    false
                }
            }
        }
    }

    pub fn success(&self) {
        *lock(&self.state) = State::Closed { failures: 0 };
    }

    pub fn failure(&self) {
        let mut s = lock(&self.state);
        *s = match *s {
            State::Closed { failures } if failures + 1 < self.threshold => State::Closed {
                failures: failures + 1,
            },
            _ => State::Open {
                until: Instant::now() + self.cooldown,
            },
        };
    }

    pub fn view(&self) -> BreakerView {
        match *lock(&self.state) {
            State::Closed { .. } => BreakerView::Closed,
            State::HalfOpen { .. } => BreakerView::HalfOpen,
            State::Open { .. } => BreakerView::Open,
        }
    }
}

/// Exponentially weighted moving averages of latency per target. Bounded: targets carry
/// client-chosen model names, so at most [`EWMA_MAX_TARGETS`] are tracked; later ones go
/// unmeasured (treated as unknown) rather than growing memory.
#[derive(Debug, Default)]
pub struct Ewma {
    values: Mutex<HashMap<String, f64>>,
}

/// Weight of the newest observation.
const EWMA_ALPHA: f64 = 0.3;
/// Most targets tracked.
pub const EWMA_MAX_TARGETS: usize = 4096;

impl Ewma {
    pub fn observe(&self, target: &str, ms: f64) {
        let mut v = lock(&self.values);
        let full = v.len() >= EWMA_MAX_TARGETS;
        match v.get_mut(target) {
            Some(x) => *x = EWMA_ALPHA * ms + (1.0 - EWMA_ALPHA) * *x,
            None if !full => {
                v.insert(target.to_owned(), ms);
            }
            None => {}
        }
    }

    /// The estimate; `None` before the first observation (such targets are tried first, so
    /// every target gets measured).
    pub fn get(&self, target: &str) -> Option<f64> {
        lock(&self.values).get(target).copied()
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets per organisation.
#[derive(Debug, Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<Uuid, Bucket>>,
}

impl RateLimiter {
    /// Takes one token; `Err(wait)` says how long until one is available.
    pub fn take(&self, org: Uuid, per_minute: u32, burst: u32) -> Result<(), Duration> {
        let rate = f64::from(per_minute) / 60.0;
        let cap = f64::from(burst);
        let now = Instant::now();
        let mut b = lock(&self.buckets);
        let e = b.entry(org).or_insert(Bucket {
            tokens: cap,
            at: now,
        });
        e.tokens = (e.tokens + now.duration_since(e.at).as_secs_f64() * rate).min(cap);
        e.at = now;
        if e.tokens >= 1.0 {
            e.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - e.tokens) / rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_opens_after_threshold_then_lets_one_probe_through() {
        let b = Breaker::new(2, Duration::ZERO);
        assert!(b.allow());
        b.failure();
        assert_eq!(b.view(), BreakerView::Closed);
        b.failure();
        assert_eq!(b.view(), BreakerView::Open);
        // Cooldown zero: the next call is the probe.
        assert!(b.allow());
        assert_eq!(b.view(), BreakerView::HalfOpen);
        b.success();
        assert_eq!(b.view(), BreakerView::Closed);
        assert!(b.allow());
    }

    #[test]
    fn half_open_breaker_lets_only_one_probe_through() {
        let b = Breaker::new(1, Duration::from_secs(3600));
        *lock(&b.state) = State::Open {
            until: Instant::now(),
        };
        assert!(b.allow());
        assert!(!b.allow(), "a second concurrent probe is refused");
        b.failure();
        assert_eq!(b.view(), BreakerView::Open);
        assert!(!b.allow());
    }

    #[test]
    fn open_breaker_refuses_during_cooldown() {
        let b = Breaker::new(1, Duration::from_secs(3600));
        b.failure();
        assert!(!b.allow());
    }

    #[test]
    fn token_bucket_allows_burst_then_refuses_with_a_wait() {
        let r = RateLimiter::default();
        let org = Uuid::new_v4();
        for _ in 0..3 {
            assert!(r.take(org, 60, 3).is_ok());
        }
        let wait = r.take(org, 60, 3).unwrap_err();
        assert!(wait <= Duration::from_secs(1), "{wait:?}");
        assert!(
            r.take(Uuid::new_v4(), 60, 3).is_ok(),
            "buckets are per organisation"
        );
    }

    #[test]
    fn ewma_moves_toward_new_observations() {
        let e = Ewma::default();
        assert_eq!(e.get("a/b"), None);
        e.observe("a/b", 100.0);
        e.observe("a/b", 200.0);
        let v = e.get("a/b").unwrap();
        assert!(v > 100.0 && v < 200.0);
    }
}
