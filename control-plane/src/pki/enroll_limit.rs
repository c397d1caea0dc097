//! Per-address rate limit of `POST /enroll`, checked before any database work (issue #13,
//! hole 5: `/enroll` takes a row lock, so a flood of attempts must not reach PostgreSQL).
//!
//! Invariants:
//! - Fixed one-minute windows per client address; the map is bounded ([`MAX_ADDRESSES`]):
//!   when full, expired windows are dropped, and if it is still full a new address is not
//!   tracked (it is let through, as before the limit existed). Memory never grows with an
//!   attack.
//! - Every attempt counts, successful or not: a legitimate gateway enrolls once.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

/// Length of one window.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Most addresses tracked at once.
pub const MAX_ADDRESSES: usize = 100_000;

/// See the module documentation.
#[derive(Debug)]
pub struct IpRateLimit {
    per_minute: u32,
    windows: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl IpRateLimit {
    /// `per_minute` attempts per address per minute; 0 turns the limit off.
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute,
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// Counts an attempt from `ip`; `Err(retry_after)` when the address is over its limit.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        if self.per_minute == 0 {
            return Ok(());
        }
        // The map holds no invariant a panicking holder could break halfway.
        let mut map = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((start, n)) = map.get_mut(&ip) {
            let elapsed = now.duration_since(*start);
            if elapsed >= WINDOW {
                (*start, *n) = (now, 1);
                return Ok(());
            }
            if *n >= self.per_minute {
                return Err(WINDOW - elapsed);
            }
            *n += 1;
            return Ok(());
        }
        if map.len() >= MAX_ADDRESSES {
            map.retain(|_, (start, _)| now.duration_since(*start) < WINDOW);
            if map.len() >= MAX_ADDRESSES {
                return Ok(());
            }
        }
        map.insert(ip, (now, 1));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_limited_per_window_and_others_are_not() {
        let l = IpRateLimit::new(3);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t = Instant::now();
        for _ in 0..3 {
            l.check(a, t).unwrap();
        }
        let retry = l.check(a, t + Duration::from_secs(10)).unwrap_err();
        assert_eq!(retry, Duration::from_secs(50));
        l.check(b, t).unwrap();
        l.check(a, t + WINDOW).unwrap();
        assert!(IpRateLimit::new(0).check(a, t).is_ok());
    }
}
