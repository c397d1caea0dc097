//! Failed-authentication guard in front of PostgreSQL: a bounded negative cache of unknown API
//! key digests and a per-IP limit on failed authentications (issue #13, hole 5).
//!
//! Without it every request with an unknown bearer key costs a PostgreSQL lookup, so a flood
//! of garbage keys queues on the connection pool and starves legitimate traffic.
//!
//! Invariants:
//! - Both structures are bounded (`max_entries` each): when full, expired entries are dropped;
//!   if it is still full, a new digest or address is simply not tracked (it then goes to
//!   PostgreSQL as before). Memory never grows with the attack.
//! - Only failures are recorded, only sha256 digests of presented keys are kept (never keys).
//! - The guard runs after the positive [`super::KeyCache`], and a key digest that authenticated
//!   within [`KNOWN_GOOD_TTL`] is exempt from the per-IP limit (it is still checked against
//!   PostgreSQL): legitimate clients behind the same address as an attacker (NAT, a shared
//!   proxy) keep working. Only a valid key never seen within that time, from a limited address,
//!   is answered 429 until the address's window ends (at most a minute).
//! - A digest in the negative cache stays refused for `negative_ttl` even if a key with that
//!   digest were created meanwhile; keys are 32 random bytes, so that cannot happen by chance.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use super::ApiError;

/// The per-IP window of [`AuthGuardConfig::failures_per_ip_per_minute`].
const IP_WINDOW: Duration = Duration::from_secs(60);

/// How long a key digest that authenticated stays exempt from the per-IP limit.
pub const KNOWN_GOOD_TTL: Duration = Duration::from_secs(3_600);

/// `[auth]` settings of the guard (validated).
#[derive(Debug, Clone, Copy)]
pub struct AuthGuardConfig {
    /// How long an unknown key digest is refused without asking PostgreSQL (0: off).
    pub negative_ttl: Duration,
    /// Bound on remembered digests and on tracked addresses (each).
    pub max_entries: usize,
    /// Failed authentications per client address per minute before the address is refused
    /// (429) without asking PostgreSQL (0: off).
    pub failures_per_ip_per_minute: u32,
}

impl AuthGuardConfig {
    /// Everything off: the behaviour before the guard existed (benchmarks compare with it).
    pub const OFF: Self = Self {
        negative_ttl: Duration::ZERO,
        max_entries: 0,
        failures_per_ip_per_minute: 0,
    };
}

/// See the module documentation.
#[derive(Debug)]
pub struct AuthGuard {
    cfg: AuthGuardConfig,
    negative: Mutex<HashMap<[u8; 32], Instant>>,
    /// Address -> (window start, failures in the window).
    per_ip: Mutex<HashMap<IpAddr, (Instant, u32)>>,
    /// Digests that authenticated recently (exempt from the per-IP limit).
    known_good: Mutex<HashMap<[u8; 32], Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The maps hold no invariant a panicking holder could break halfway.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl AuthGuard {
    pub fn new(cfg: AuthGuardConfig) -> Self {
        Self {
            cfg,
            negative: Mutex::new(HashMap::new()),
            per_ip: Mutex::new(HashMap::new()),
            known_good: Mutex::new(HashMap::new()),
        }
    }

    /// Records that `digest` authenticated (exempts it from the per-IP limit for a while).
    pub fn record_success(&self, digest: [u8; 32], now: Instant) {
        if self.cfg.failures_per_ip_per_minute == 0 {
            return;
        }
        insert_bounded(
            &mut lock(&self.known_good),
            digest,
            now,
            self.cfg.max_entries,
            |at| now.duration_since(*at) < KNOWN_GOOD_TTL,
        );
    }

    /// Refuses, before any database work, a key digest known to be bad (401) or a request
    /// from an address over its failure limit (429 with `Retry-After`).
    pub fn check(
        &self,
        digest: &[u8; 32],
        ip: Option<IpAddr>,
        now: Instant,
    ) -> Result<(), ApiError> {
        if !self.cfg.negative_ttl.is_zero() {
            let mut neg = lock(&self.negative);
            match neg.get(digest) {
                Some(at) if now.duration_since(*at) < self.cfg.negative_ttl => {
                    return Err(ApiError::Unauthorized);
                }
                Some(_) => {
                    neg.remove(digest);
                }
                None => {}
            }
        }
        let limit = self.cfg.failures_per_ip_per_minute;
        if let (Some(ip), true) = (ip, limit > 0)
            && let Some((start, n)) = lock(&self.per_ip).get(&ip).copied()
            && lock(&self.known_good)
                .get(digest)
                .is_none_or(|at| now.duration_since(*at) >= KNOWN_GOOD_TTL)
        {
            let elapsed = now.duration_since(start);
            if elapsed < IP_WINDOW && n >= limit {
                return Err(ApiError::TooManyRequests {
                    message: format!(
                        "too many failed authentications from this address \
                         (auth.failed_auth_per_ip_per_minute = {limit}); retry later"
                    ),
                    retry_after_s: (IP_WINDOW - elapsed).as_secs().max(1),
                });
            }
        }
        Ok(())
    }

    /// Records a failed authentication of `digest` from `ip`.
    pub fn record_failure(&self, digest: [u8; 32], ip: Option<IpAddr>, now: Instant) {
        let max = self.cfg.max_entries;
        if !self.cfg.negative_ttl.is_zero() {
            let ttl = self.cfg.negative_ttl;
            insert_bounded(&mut lock(&self.negative), digest, now, max, |at| {
                now.duration_since(*at) < ttl
            });
        }
        if let (Some(ip), true) = (ip, self.cfg.failures_per_ip_per_minute > 0) {
            let mut map = lock(&self.per_ip);
            if let Some((start, n)) = map.get_mut(&ip) {
                if now.duration_since(*start) < IP_WINDOW {
                    *n = n.saturating_add(1);
                } else {
                    (*start, *n) = (now, 1);
                }
                return;
            }
            insert_bounded(&mut map, ip, (now, 1), max, |(start, _)| {
                now.duration_since(*start) < IP_WINDOW
            });
        }
    }

    /// Remembered digests and tracked addresses (for tests).
    pub fn len(&self) -> (usize, usize) {
        (lock(&self.negative).len(), lock(&self.per_ip).len())
    }
}

/// Inserts unless the map is full of live entries (`live`), dropping dead ones first.
fn insert_bounded<K: std::hash::Hash + Eq, V>(
    map: &mut HashMap<K, V>,
    k: K,
    v: V,
    max: usize,
    live: impl Fn(&V) -> bool,
) {
    if map.len() >= max {
        map.retain(|_, v| live(v));
        if map.len() >= max {
            return;
        }
    }
    map.insert(k, v);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(ttl_s: u64, per_ip: u32, max: usize) -> AuthGuard {
        AuthGuard::new(AuthGuardConfig {
            negative_ttl: Duration::from_secs(ttl_s),
            max_entries: max,
            failures_per_ip_per_minute: per_ip,
        })
    }

    #[test]
    fn an_unknown_digest_is_refused_until_its_ttl_ends() {
        let g = guard(10, 0, 10);
        let t0 = Instant::now();
        assert!(g.check(&[1; 32], None, t0).is_ok());
        g.record_failure([1; 32], None, t0);
        assert!(matches!(
            g.check(&[1; 32], None, t0 + Duration::from_secs(9)),
            Err(ApiError::Unauthorized)
        ));
        assert!(g.check(&[2; 32], None, t0).is_ok());
        assert!(
            g.check(&[1; 32], None, t0 + Duration::from_secs(10))
                .is_ok()
        );
    }

    #[test]
    fn an_address_over_its_limit_is_refused_for_the_rest_of_the_minute() {
        let g = guard(0, 3, 10);
        let ip: IpAddr = [10, 0, 0, 1].into();
        let other: IpAddr = [10, 0, 0, 2].into();
        let t0 = Instant::now();
        for i in 0..3u8 {
            assert!(g.check(&[i; 32], Some(ip), t0).is_ok());
            g.record_failure([i; 32], Some(ip), t0);
        }
        match g.check(&[9; 32], Some(ip), t0 + Duration::from_secs(20)) {
            Err(ApiError::TooManyRequests { retry_after_s, .. }) => assert_eq!(retry_after_s, 40),
            other => panic!("{other:?}"),
        }
        assert!(g.check(&[9; 32], Some(other), t0).is_ok());
        // A key that authenticated before is exempt (PostgreSQL still checks it).
        g.record_success([7; 32], t0);
        assert!(
            g.check(&[7; 32], Some(ip), t0 + Duration::from_secs(20))
                .is_ok()
        );
        assert!(g.check(&[9; 32], Some(ip), t0 + IP_WINDOW).is_ok());
        g.record_failure([9; 32], Some(ip), t0 + IP_WINDOW);
        assert!(
            g.check(&[9; 32], Some(ip), t0 + IP_WINDOW).is_ok(),
            "a new window"
        );
    }

    #[test]
    fn the_maps_never_grow_past_their_bound() {
        let g = guard(60, 100, 4);
        let t0 = Instant::now();
        for i in 0..100u8 {
            g.record_failure([i; 32], Some([10, 0, 0, i].into()), t0);
        }
        assert_eq!(g.len(), (4, 4));
        // Expired entries make room.
        let later = t0 + Duration::from_secs(61);
        g.record_failure([200; 32], Some([10, 1, 0, 0].into()), later);
        assert_eq!(g.len(), (1, 1));
    }

    #[test]
    fn off_does_nothing() {
        let g = AuthGuard::new(AuthGuardConfig::OFF);
        let t0 = Instant::now();
        for _ in 0..10 {
            g.record_failure([1; 32], Some([10, 0, 0, 1].into()), t0);
        }
        assert!(g.check(&[1; 32], Some([10, 0, 0, 1].into()), t0).is_ok());
        assert_eq!(g.len(), (0, 0));
    }
}
