//! Exact response cache, per organisation.
//!
//! Invariants:
//! - The key is sha256(org id || canonical request JSON): objects are serialised with sorted
//!   keys, so field order does not matter, while any other difference (model, messages,
//!   options, tools) is a different key. The entry also stores its organisation and a lookup
//!   checks it, so one tenant can never read another's answer, even on a hash collision.
//! - Bounded: at most `max_entries`; the oldest entry is evicted first; expired entries are
//!   never returned and are evicted as they reach the front.
//! - Only complete, successful answers from real providers are stored (never the local
//!   fallback's, never an error, never a stream).

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::Value;
use sha2::{Digest as _, Sha256};
use uuid::Uuid;

use super::provider::Usage;

/// A stored answer.
#[derive(Debug, Clone)]
pub struct CachedAnswer {
    pub provider: String,
    pub model: String,
    pub body: Value,
    pub usage: Usage,
}

/// Cache key.
pub type Key = [u8; 32];

#[derive(Debug)]
struct Entry {
    org_id: Uuid,
    inserted: Instant,
    answer: Arc<CachedAnswer>,
}

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<Key, Entry>,
    order: VecDeque<(Key, Instant)>,
}

/// The cache.
#[derive(Debug)]
pub struct ResponseCache {
    inner: Mutex<Inner>,
    ttl: Duration,
    max_entries: usize,
}

/// Writes `v` with object keys sorted, recursively.
fn canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                if let Some(x) = m.get(k) {
                    canonical(x, out);
                }
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical(x, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// The cache key of `request` for `org_id`.
pub fn key(org_id: Uuid, request: &Value) -> Key {
    let mut s = String::new();
    canonical(request, &mut s);
    let mut h = Sha256::new();
    h.update(org_id.as_bytes());
    h.update([0u8]);
    h.update(s.as_bytes());
    h.finalize().into()
}

impl ResponseCache {
    pub fn new(ttl: Duration, max_entries: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            ttl,
            max_entries,
        }
    }

    /// Whether the cache stores anything at all.
    pub fn enabled(&self) -> bool {
        self.max_entries > 0
    }

    /// The live answer stored for (`org_id`, `key`).
    pub fn get(&self, org_id: Uuid, key: &Key) -> Option<Arc<CachedAnswer>> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let e = inner.map.get(key)?;
        (e.org_id == org_id && e.inserted.elapsed() < self.ttl).then(|| e.answer.clone())
    }

    /// Stores an answer, evicting expired and then oldest entries to stay within the bound.
    pub fn put(&self, org_id: Uuid, key: Key, answer: CachedAnswer) {
        if self.max_entries == 0 {
            return;
        }
        let now = Instant::now();
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Inner { map, order } = &mut *inner;
        while let Some((k, at)) = order.front().copied() {
            let stale = map.get(&k).is_none_or(|e| e.inserted != at);
            let expired = now.duration_since(at) >= self.ttl;
            if stale || expired || map.len() >= self.max_entries {
                order.pop_front();
                if !stale {
                    map.remove(&k);
                }
            } else {
                break;
            }
        }
        map.insert(
            key,
            Entry {
                org_id,
                inserted: now,
                answer: Arc::new(answer),
            },
        );
        order.push_back((key, now));
    }

    /// Number of stored entries.
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn answer(text: &str) -> CachedAnswer {
        CachedAnswer {
            provider: "p".into(),
            model: "m".into(),
            body: json!({ "text": text }),
            usage: Usage::default(),
        }
    }

    #[test]
    fn key_ignores_field_order_but_not_values_or_org() {
        let org = Uuid::new_v4();
        let a = key(
            org,
            &json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
        );
        let b = key(
            org,
            &json!({"messages": [{"content": "hi", "role": "user"}], "model": "m"}),
        );
        assert_eq!(a, b);
        assert_ne!(
            a,
            key(
                org,
                &json!({"model": "m", "messages": [{"role": "user", "content": "ho"}]})
            )
        );
        assert_ne!(
            a,
            key(
                Uuid::new_v4(),
                &json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
            )
        );
    }

    #[test]
    fn another_org_never_reads_an_entry() {
        let c = ResponseCache::new(Duration::from_secs(60), 10);
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let k = [7u8; 32];
        c.put(a, k, answer("x"));
        assert!(c.get(a, &k).is_some());
        assert!(c.get(b, &k).is_none());
    }

    #[test]
    fn size_stays_bounded_and_oldest_goes_first() {
        let c = ResponseCache::new(Duration::from_secs(60), 3);
        let org = Uuid::new_v4();
        for i in 0..10u8 {
            c.put(org, [i; 32], answer("x"));
        }
        assert_eq!(c.len(), 3);
        assert!(c.get(org, &[9; 32]).is_some());
        assert!(c.get(org, &[0; 32]).is_none());
    }

    #[test]
    fn expired_entries_are_not_returned() {
        let c = ResponseCache::new(Duration::ZERO, 3);
        let org = Uuid::new_v4();
        c.put(org, [1; 32], answer("x"));
        assert!(c.get(org, &[1; 32]).is_none());
    }
}
