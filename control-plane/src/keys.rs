//! API keys: generation, hashing and parsing.
//!
//! Format: `kip_<prefix>_<secret>` where `prefix` is 12 hex characters (stored in clear, used to
//! find the row and shown in listings) and `secret` is 32 random bytes, base64url.
//! Invariant: only sha256 of the whole key is stored; the key is returned exactly once.
//! A fast hash is enough because the secret has 256 bits of entropy (no dictionary to attack).

use base64::Engine as _;
use rand::RngCore as _;
use sha2::{Digest as _, Sha256};

/// A freshly generated key, before it is stored.
pub struct NewKey {
    /// The full key; give it to the user once, then drop it.
    pub key: String,
    pub prefix: String,
    pub sha256: [u8; 32],
}

impl std::fmt::Debug for NewKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewKey")
            .field("key", &"...")
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// Generates a new random key.
pub fn generate() -> NewKey {
    let mut rng = rand::rng();
    let mut prefix = [0u8; 6];
    let mut secret = [0u8; 32];
    rng.fill_bytes(&mut prefix);
    rng.fill_bytes(&mut secret);
    let prefix = hex::encode(prefix);
    let key = format!(
        "kip_{prefix}_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
    );
    let sha256 = hash(&key);
    NewKey {
        key,
        prefix,
        sha256,
    }
}

/// sha256 of a presented key.
pub fn hash(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Extracts the lookup prefix from a presented key, or `None` if it is not shaped like one.
pub fn prefix_of(key: &str) -> Option<&str> {
    let rest = key.strip_prefix("kip_")?;
    let (prefix, secret) = rest.split_once('_')?;
    (prefix.len() == 12 && prefix.bytes().all(|b| b.is_ascii_hexdigit()) && secret.len() == 43)
        .then_some(prefix)
}

/// Compares two digests in constant time, so response timing reveals nothing about the hash.
pub fn digest_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_and_hash_consistently() {
        let k = generate();
        assert_eq!(prefix_of(&k.key), Some(k.prefix.as_str()));
        assert!(digest_eq(&hash(&k.key), &k.sha256));
        assert_ne!(generate().key, k.key);
        assert!(!format!("{k:?}").contains(&k.key));
    }

    #[test]
    fn malformed_keys_have_no_prefix() {
        for bad in ["", "kip_", "kip_abc_def", "xyz_0123456789ab_", "Bearer kip"] {
            assert_eq!(prefix_of(bad), None, "{bad}");
        }
    }

    #[test]
    fn digest_eq_detects_any_difference() {
        assert!(digest_eq(&[1, 2, 3], &[1, 2, 3]));
        assert!(!digest_eq(&[1, 2, 3], &[1, 2, 4]));
        assert!(!digest_eq(&[1, 2], &[1, 2, 3]));
    }
}
