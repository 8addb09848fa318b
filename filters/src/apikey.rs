//! Gateway-issued API keys: stored only as SHA-256 hashes, several per client with expiry.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use crate::FilterError;

/// Prefix of every key the gateway issues.
pub const KEY_PREFIX: &str = "agw_";

/// SHA-256 of the whole key string (`agw_` included), as lower-case hex.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Parse a configured hash (64 hex characters, any case).
pub fn parse_hash(hex_str: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_str.trim(), &mut out).ok()?;
    Some(out)
}

/// One configured key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// Index of the owning client in the runtime configuration.
    pub client: usize,
    /// Unix seconds after which the key fails like an unknown one.
    pub expires_at: Option<i64>,
    /// First 8 hex characters of the hash, for logs and metrics.
    pub key_id: std::sync::Arc<str>,
}

/// All configured keys, looked up by the SHA-256 of the presented key.
#[derive(Debug, Default, Clone)]
pub struct KeyStore {
    /// The keys are SHA-256 digests of configured keys: a fast hash suffices.
    by_hash: HashMap<[u8; 32], KeyRecord, foldhash::fast::RandomState>,
}

impl KeyStore {
    /// Adds a key; returns `false` if the same hash was already present.
    pub fn insert(&mut self, hash: [u8; 32], record: KeyRecord) -> bool {
        self.by_hash.insert(hash, record).is_none()
    }

    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    pub fn records(&self) -> impl Iterator<Item = &KeyRecord> {
        self.by_hash.values()
    }

    /// Finds the key's record; unknown and expired keys are both `InvalidCredential`.
    pub fn lookup(&self, key: &str, now_unix: i64) -> Result<&KeyRecord, FilterError> {
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        match self.by_hash.get(&digest) {
            Some(rec) if rec.expires_at.is_none_or(|exp| now_unix < exp) => Ok(rec),
            _ => Err(FilterError::InvalidCredential),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> KeyStore {
        let mut s = KeyStore::default();
        let h = parse_hash(&hash_key("agw_good")).unwrap();
        s.insert(
            h,
            KeyRecord {
                client: 0,
                expires_at: None,
                key_id: hash_key("agw_good")[..8].into(),
            },
        );
        let h = parse_hash(&hash_key("agw_old")).unwrap();
        s.insert(
            h,
            KeyRecord {
                client: 1,
                expires_at: Some(1_000),
                key_id: "x".into(),
            },
        );
        s
    }

    #[test]
    fn hash_is_sha256_hex_of_whole_key() {
        // echo -n test | sha256sum
        assert_eq!(
            hash_key("test"),
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
    }

    #[test]
    fn parse_hash_accepts_upper_case_and_rejects_garbage() {
        let lower = hash_key("test");
        assert_eq!(parse_hash(&lower), parse_hash(&lower.to_uppercase()));
        assert!(parse_hash("abc").is_none());
        assert!(parse_hash(&"zz".repeat(32)).is_none());
    }

    #[test]
    fn known_key_is_found() {
        let s = store();
        assert_eq!(s.lookup("agw_good", 0).unwrap().client, 0);
    }

    #[test]
    fn unknown_key_is_invalid() {
        assert_eq!(
            store().lookup("agw_nope", 0),
            Err(FilterError::InvalidCredential)
        );
    }

    #[test]
    fn expired_key_fails_like_unknown() {
        let s = store();
        assert_eq!(s.lookup("agw_old", 999).unwrap().client, 1);
        assert_eq!(
            s.lookup("agw_old", 1_000),
            Err(FilterError::InvalidCredential)
        );
    }
}
