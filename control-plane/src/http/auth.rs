//! Request authentication by API key: the [`Principal`] extractor and the [`KeyCache`].
//!
//! Invariants:
//! - Every `/v1` handler takes a [`Principal`]; there is no unauthenticated `/v1` route.
//! - What a key may do is decided once, before the handler runs, by the route table of
//!   [`super::policy`] and the key's [`Role`]; the authorising middleware leaves the
//!   [`Principal`] in the request's extensions and this extractor takes it from there.
//! - An organisation key can only reach its own organisation: [`Principal::org_scope`] answers
//!   404 (not 403) for another organisation, so a key cannot even learn that it exists.
//! - A key revoked through this process stops working on the next request: revocation and
//!   organisation deletion drop the affected entries from the [`KeyCache`] before they answer,
//!   and a PostgreSQL read of a key that began before them does not put its answer back
//!   (a generation counter).
//!   A key revoked through another replica keeps working on this one for at most
//!   `auth.key_cache_ttl_ms` (default 5 s; 0 turns the cache off and every request reads
//!   PostgreSQL).
//! - An entry is never used past `auth.key_cache_ttl_ms` after the PostgreSQL read that
//!   made it. Once it is half that old, exactly one request (the first to see it so) reads
//!   PostgreSQL again while every other request keeps using the entry, so a busy key's
//!   refresh costs one request a round trip instead of sending every request that arrives
//!   during the read to PostgreSQL at once (a burst every TTL that showed as the LLM
//!   gateway's tail latency). A refresh that finds the key gone removes the entry.
//! - The cache holds sha256 digests of presented keys, never the keys, and only keys that
//!   authenticated, so a flood of bad keys cannot evict good ones. Unknown keys go to
//!   PostgreSQL unless the [`AuthGuard`] (negative cache, per-IP failure limit) refuses them
//!   first.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    extract::{FromRef, FromRequestParts},
    http::request::Parts,
};
use sqlx::PgPool;
use uuid::Uuid;

use super::{
    ApiError,
    auth_guard::{AuthGuard, AuthGuardConfig},
    policy::Role,
};
use crate::keys;

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Operator key: manages organisations, may act within any organisation.
    Platform,
    /// Tenant key: acts only within this organisation.
    Org(Uuid),
}

/// The authenticated caller.
#[derive(Debug, Clone, Copy)]
pub struct Principal {
    pub key_id: Uuid,
    pub scope: Scope,
    /// What the key may do (checked by [`super::policy::authorize`]).
    pub role: Role,
}

/// A [`Principal`] with the key's name (for the audit log).
#[derive(Debug, Clone)]
pub struct Authenticated {
    pub principal: Principal,
    pub key_name: Arc<str>,
}

impl Principal {
    /// Checks that the caller may act within `org_id`; otherwise the organisation "does not
    /// exist" for this caller.
    pub fn org_scope(&self, org_id: Uuid) -> Result<Uuid, ApiError> {
        match self.scope {
            Scope::Platform => Ok(org_id),
            Scope::Org(own) if own == org_id => Ok(org_id),
            Scope::Org(_) => Err(ApiError::NotFound("organisation")),
        }
    }

    pub fn require_platform(&self) -> Result<(), ApiError> {
        match self.scope {
            Scope::Platform => Ok(()),
            Scope::Org(_) => Err(ApiError::Forbidden(
                "this operation needs a platform-admin key",
            )),
        }
    }
}

/// A cached key: who it is, when PostgreSQL last confirmed it, and whether a request is
/// confirming it again now.
#[derive(Debug)]
struct Entry {
    auth: Authenticated,
    at: Instant,
    refreshing: bool,
}

/// What the cache knows of a presented key.
#[derive(Debug)]
enum Cached {
    /// Confirmed less than half the TTL ago, or being confirmed by another request.
    Fresh(Authenticated),
    /// Older than half the TTL: this caller was chosen to read PostgreSQL again; the entry
    /// still serves every other request until the TTL.
    Refresh(Authenticated),
    /// Unknown or expired.
    Miss,
}

/// Authenticated keys seen recently, so a request does not need a PostgreSQL round trip
/// (the largest part of the LLM gateway's overhead without it).
#[derive(Debug)]
pub struct KeyCache {
    ttl: Duration,
    max_entries: usize,
    entries: Mutex<HashMap<[u8; 32], Entry>>,
    /// Bumped (under the `entries` lock) by every revocation and organisation deletion: a
    /// PostgreSQL read that began before one must not put its now outdated answer back.
    generation: AtomicU64,
    /// Failed authentications (see [`AuthGuard`]); off unless set by [`KeyCache::with_guard`].
    guard: AuthGuard,
}

impl KeyCache {
    /// `ttl` zero disables caching.
    pub fn new(ttl: Duration, max_entries: usize) -> Self {
        Self {
            ttl,
            max_entries,
            entries: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            guard: AuthGuard::new(AuthGuardConfig::OFF),
        }
    }

    /// Puts the failed-authentication guard in front of PostgreSQL.
    pub fn with_guard(mut self, cfg: AuthGuardConfig) -> Self {
        self.guard = AuthGuard::new(cfg);
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Entry>> {
        // The map holds no invariant a panicking holder could break halfway.
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn get(&self, digest: &[u8; 32], now: Instant) -> Cached {
        if self.ttl.is_zero() {
            return Cached::Miss;
        }
        let mut map = self.lock();
        let Some(e) = map.get_mut(digest) else {
            return Cached::Miss;
        };
        let age = now.saturating_duration_since(e.at);
        if age >= self.ttl {
            map.remove(digest);
            return Cached::Miss;
        }
        if age >= self.ttl / 2 && !e.refreshing {
            e.refreshing = true;
            return Cached::Refresh(e.auth.clone());
        }
        Cached::Fresh(e.auth.clone())
    }

    /// A refresh ended without an answer from PostgreSQL: the next request past half the TTL
    /// tries again.
    fn refresh_failed(&self, digest: &[u8; 32]) {
        if let Some(e) = self.lock().get_mut(digest) {
            e.refreshing = false;
        }
    }

    /// The key is no longer valid (revoked or deleted, found by a refresh).
    fn remove(&self, digest: &[u8; 32]) {
        self.lock().remove(digest);
    }

    /// The current generation, taken before a PostgreSQL read for [`KeyCache::insert`].
    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Caches a key read from PostgreSQL at `now`, unless a key was revoked or an
    /// organisation deleted since `generation` was taken (the read may predate it).
    fn insert(&self, digest: [u8; 32], p: Authenticated, now: Instant, generation: u64) {
        if self.ttl.is_zero() {
            return;
        }
        let mut map = self.lock();
        if self.generation.load(Ordering::Acquire) != generation {
            map.remove(&digest);
            return;
        }
        if map.len() >= self.max_entries {
            let ttl = self.ttl;
            map.retain(|_, e| now.saturating_duration_since(e.at) < ttl);
            if map.len() >= self.max_entries {
                // Still full of live keys: serve this one uncached rather than grow.
                return;
            }
        }
        map.insert(
            digest,
            Entry {
                auth: p,
                at: now,
                refreshing: false,
            },
        );
    }

    /// Forgets one key (it was revoked).
    pub fn forget_key(&self, key_id: Uuid) {
        let mut map = self.lock();
        self.generation.fetch_add(1, Ordering::AcqRel);
        map.retain(|_, e| e.auth.principal.key_id != key_id);
    }

    /// Forgets every key of an organisation (it was deleted).
    pub fn forget_org(&self, org_id: Uuid) {
        let mut map = self.lock();
        self.generation.fetch_add(1, Ordering::AcqRel);
        map.retain(|_, e| e.auth.principal.scope != Scope::Org(org_id));
    }

    /// Number of cached keys (for tests and metrics).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(sqlx::FromRow)]
struct KeyRow {
    id: Uuid,
    org_id: Option<Uuid>,
    key_sha256: Vec<u8>,
    name: String,
    role: String,
}

/// Authenticates the bearer key of a request (cache first, then PostgreSQL).
pub async fn authenticate(
    parts: &Parts,
    pool: &PgPool,
    cache: &KeyCache,
) -> Result<Authenticated, ApiError> {
    let header = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or(ApiError::Unauthorized)?;
    let key = header
        .strip_prefix("Bearer ")
        .map(str::trim)
        .ok_or(ApiError::Unauthorized)?;
    let prefix = keys::prefix_of(key).ok_or(ApiError::Unauthorized)?;
    let digest = keys::hash(key);
    let now = Instant::now();
    let ip = parts
        .extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip());
    let refreshing = match cache.get(&digest, now) {
        Cached::Fresh(a) => return Ok(a),
        Cached::Refresh(a) => Some(a),
        Cached::Miss => {
            // Unknown keys and addresses that keep failing are refused before PostgreSQL.
            cache.guard.check(&digest, ip, now)?;
            None
        }
    };
    let generation = cache.generation();
    let read = sqlx::query_as::<_, KeyRow>(
        "SELECT id, org_id, key_sha256, name, role FROM api_keys \
         WHERE prefix = $1 AND revoked_at IS NULL",
    )
    .bind(prefix)
    .fetch_optional(pool)
    .await;
    let row = match (read, refreshing) {
        (Ok(row), _) => row,
        // The entry is still within its TTL: a failed refresh does not fail the request.
        (Err(e), Some(a)) => {
            tracing::warn!(error = %e, "API key refresh failed; the cached entry is used");
            cache.refresh_failed(&digest);
            return Ok(a);
        }
        (Err(e), None) => return Err(e.into()),
    };
    let Some(row) = row.filter(|r| keys::digest_eq(&r.key_sha256, &digest)) else {
        cache.remove(&digest);
        cache.guard.record_failure(digest, ip, now);
        return Err(ApiError::Unauthorized);
    };
    let role = Role::parse(&row.role)
        .ok_or_else(|| ApiError::internal(anyhow::anyhow!("api key has unknown role")))?;
    let a = Authenticated {
        principal: Principal {
            key_id: row.id,
            scope: row.org_id.map_or(Scope::Platform, Scope::Org),
            role,
        },
        key_name: row.name.into(),
    };
    cache.guard.record_success(digest, now);
    cache.insert(digest, a.clone(), now, generation);
    Ok(a)
}

impl<S> FromRequestParts<S> for Principal
where
    PgPool: FromRef<S>,
    Arc<KeyCache>: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        // The authorising middleware already checked this request's key and role.
        if let Some(p) = parts.extensions.get::<Principal>() {
            return Ok(*p);
        }
        let cache = Arc::<KeyCache>::from_ref(state);
        authenticate(parts, &PgPool::from_ref(state), &cache)
            .await
            .map(|a| a.principal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The entry a request would be authenticated with (fresh or while it refreshes it).
    fn found(c: &KeyCache, d: &[u8; 32], now: Instant) -> Option<Authenticated> {
        match c.get(d, now) {
            Cached::Fresh(a) | Cached::Refresh(a) => Some(a),
            Cached::Miss => None,
        }
    }

    fn principal(org: Option<Uuid>) -> Authenticated {
        Authenticated {
            principal: Principal {
                key_id: Uuid::new_v4(),
                scope: org.map_or(Scope::Platform, Scope::Org),
                role: org.map_or(Role::PlatformAdmin, |_| Role::OrgAdmin),
            },
            key_name: "k".into(),
        }
    }

    #[test]
    fn entries_expire_after_the_ttl() {
        let c = KeyCache::new(Duration::from_secs(5), 10);
        let t0 = Instant::now();
        let p = principal(None);
        let id = p.principal.key_id;
        c.insert([1; 32], p, t0, c.generation());
        assert_eq!(
            found(&c, &[1; 32], t0 + Duration::from_secs(4)).map(|p| p.principal.key_id),
            Some(id)
        );
        assert!(found(&c, &[1; 32], t0 + Duration::from_secs(5)).is_none());
        assert!(c.is_empty(), "an expired entry is removed when it is found");
    }

    #[test]
    fn zero_ttl_caches_nothing() {
        let c = KeyCache::new(Duration::ZERO, 10);
        let t0 = Instant::now();
        c.insert([1; 32], principal(None), t0, c.generation());
        assert!(found(&c, &[1; 32], t0).is_none());
        assert!(c.is_empty());
    }

    #[test]
    fn revocation_and_org_deletion_forget_entries() {
        let c = KeyCache::new(Duration::from_secs(60), 10);
        let t0 = Instant::now();
        let org = Uuid::new_v4();
        let (a, b, admin) = (principal(Some(org)), principal(Some(org)), principal(None));
        let a_id = a.principal.key_id;
        c.insert([1; 32], a, t0, c.generation());
        c.insert([2; 32], b, t0, c.generation());
        c.insert([3; 32], admin, t0, c.generation());
        c.forget_key(a_id);
        assert!(found(&c, &[1; 32], t0).is_none());
        assert!(found(&c, &[2; 32], t0).is_some());
        c.forget_org(org);
        assert!(found(&c, &[2; 32], t0).is_none());
        assert!(
            found(&c, &[3; 32], t0).is_some(),
            "other scopes stay cached"
        );
    }

    #[test]
    fn a_full_cache_drops_expired_entries_and_never_grows_past_its_bound() {
        let c = KeyCache::new(Duration::from_secs(1), 2);
        let t0 = Instant::now();
        c.insert([1; 32], principal(None), t0, c.generation());
        c.insert([2; 32], principal(None), t0, c.generation());
        c.insert([3; 32], principal(None), t0, c.generation());
        assert_eq!(
            c.len(),
            2,
            "full of live entries: the new key is served uncached"
        );
        let later = t0 + Duration::from_secs(2);
        c.insert([3; 32], principal(None), later, c.generation());
        assert_eq!(c.len(), 1, "expired entries make room");
        assert!(found(&c, &[3; 32], later).is_some());
    }

    #[test]
    fn past_half_the_ttl_one_request_refreshes_while_the_others_use_the_entry() {
        let c = KeyCache::new(Duration::from_secs(4), 10);
        let t0 = Instant::now();
        c.insert([1; 32], principal(None), t0, c.generation());
        assert!(matches!(
            c.get(&[1; 32], t0 + Duration::from_secs(1)),
            Cached::Fresh(_)
        ));
        let half = t0 + Duration::from_secs(2);
        assert!(
            matches!(c.get(&[1; 32], half), Cached::Refresh(_)),
            "the first request past half the TTL reads PostgreSQL"
        );
        for _ in 0..3 {
            assert!(
                matches!(c.get(&[1; 32], half), Cached::Fresh(_)),
                "the others do not while that read is out"
            );
        }
        // The refresh failed (no answer): the next request tries again.
        c.refresh_failed(&[1; 32]);
        assert!(matches!(c.get(&[1; 32], half), Cached::Refresh(_)));
        // However busy the key, it is never used past the TTL without a new read.
        assert!(matches!(
            c.get(&[1; 32], t0 + Duration::from_secs(4)),
            Cached::Miss
        ));
        // A successful refresh starts a new TTL.
        let t1 = t0 + Duration::from_secs(3);
        c.insert([2; 32], principal(None), t0, c.generation());
        assert!(matches!(c.get(&[2; 32], t1), Cached::Refresh(_)));
        c.insert([2; 32], principal(None), t1, c.generation());
        assert!(matches!(
            c.get(&[2; 32], t0 + Duration::from_secs(4)),
            Cached::Fresh(_)
        ));
        // A refresh that found the key revoked removes it.
        c.remove(&[2; 32]);
        assert!(matches!(c.get(&[2; 32], t1), Cached::Miss));
    }

    #[test]
    fn a_read_that_began_before_a_revocation_is_not_cached() {
        let c = KeyCache::new(Duration::from_secs(60), 10);
        let t0 = Instant::now();
        let p = principal(None);
        let id = p.principal.key_id;
        // A request reads the key from PostgreSQL; meanwhile the key is revoked here.
        let before_read = c.generation();
        c.forget_key(id);
        c.insert([1; 32], p, t0, before_read);
        assert!(c.is_empty(), "the outdated answer stayed out of the cache");
    }
}
