//! Gateway-issued API keys: stored only as SHA-256 hashes, several per client with expiry.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;

use arc_swap::ArcSwap;
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

/// A presented key whose SHA-256 is a configured hash, with that key's record (its index in
/// [`KeyStore`]'s records, which a store never reorders or removes).
struct SeenKey {
    key: Box<[u8]>,
    record: usize,
}

/// Presented keys already found, so that a known key is not hashed again: SHA-256 of a key
/// is ~300 instructions with the CPU's SHA extensions and ~3,500 without, against a fast
/// hash and a 32–64 byte comparison here.
///
/// Only keys whose SHA-256 is a configured hash get in, at most one per configured hash, so
/// the cache is bounded by the key store and unknown keys can neither grow it nor evict
/// from it. An entry is found by a per-process randomly seeded 64-bit hash of the presented
/// bytes and then compared in full in constant time (`constant_time_eq`, a word at a time);
/// two keys sharing a 64-bit hash are both still answered, the second by SHA-256. An entry
/// yields the key's record, whose expiry is checked as without the cache (the digest map is
/// not searched again: ~150 instructions a request). Trade-off: the plain text of every key that was presented and
/// accepted stays in memory for as long as this configuration (it is dropped with it on a
/// reload); without the cache only its hash does, and the presented key only for the
/// request's lifetime.
struct SeenKeys {
    seed: foldhash::fast::RandomState,
    /// Replaced whole on insertion (rare: once per configured key at most); read without a
    /// lock on every request.
    map: ArcSwap<HashMap<u64, Arc<SeenKey>, foldhash::fast::RandomState>>,
}

impl Default for SeenKeys {
    fn default() -> Self {
        SeenKeys {
            seed: foldhash::fast::RandomState::default(),
            map: ArcSwap::from_pointee(HashMap::default()),
        }
    }
}

impl std::fmt::Debug for SeenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys themselves.
        f.debug_struct("SeenKeys")
            .field("len", &self.map.load().len())
            .finish()
    }
}

impl SeenKeys {
    /// The record cached for exactly these bytes.
    fn get(&self, hash: u64, key: &[u8]) -> Option<usize> {
        let map = self.map.load();
        let seen = map.get(&hash)?;
        constant_time_eq::constant_time_eq(&seen.key, key).then_some(seen.record)
    }

    /// Remembers `key` (whose SHA-256 is the configured hash of `record`) unless its 64-bit
    /// hash is taken or `cap` entries are there.
    fn insert(&self, hash: u64, key: &[u8], record: usize, cap: usize) {
        let entry = Arc::new(SeenKey {
            key: key.into(),
            record,
        });
        self.map.rcu(|map| {
            if map.len() >= cap || map.contains_key(&hash) {
                return Arc::clone(map);
            }
            let mut next = HashMap::clone(map);
            next.insert(hash, Arc::clone(&entry));
            Arc::new(next)
        });
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.load().len()
    }
}

/// All configured keys, looked up by the SHA-256 of the presented key.
#[derive(Debug, Default)]
pub struct KeyStore {
    /// The keys are SHA-256 digests of configured keys: a fast hash suffices. The value is the
    /// index of the key's record in `records`.
    by_hash: HashMap<[u8; 32], usize, foldhash::fast::RandomState>,
    records: Vec<KeyRecord>,
    seen: SeenKeys,
}

impl Clone for KeyStore {
    /// A clone starts with no presented keys remembered.
    fn clone(&self) -> Self {
        KeyStore {
            by_hash: self.by_hash.clone(),
            records: self.records.clone(),
            seen: SeenKeys::default(),
        }
    }
}

impl KeyStore {
    /// Adds a key; returns `false` if the same hash was already present (its record is then
    /// replaced, in place: a remembered key's index stays right).
    pub fn insert(&mut self, hash: [u8; 32], record: KeyRecord) -> bool {
        match self.by_hash.get(&hash) {
            Some(&i) => {
                self.records[i] = record;
                false
            }
            None => {
                self.by_hash.insert(hash, self.records.len());
                self.records.push(record);
                true
            }
        }
    }

    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    pub fn records(&self) -> impl Iterator<Item = &KeyRecord> {
        self.records.iter()
    }

    /// Finds the key's record; unknown and expired keys are both `InvalidCredential`.
    pub fn lookup(&self, key: &str, now_unix: i64) -> Result<&KeyRecord, FilterError> {
        let key = key.as_bytes();
        let hash = self.seen.seed.hash_one(key);
        let index = match self.seen.get(hash, key) {
            Some(i) => i,
            None => {
                let digest: [u8; 32] = Sha256::digest(key).into();
                let &i = self
                    .by_hash
                    .get(&digest)
                    .ok_or(FilterError::InvalidCredential)?;
                self.seen.insert(hash, key, i, self.records.len());
                i
            }
        };
        match self.records.get(index) {
            Some(rec) if rec.expires_at.is_none_or(|exp| now_unix < exp) => Ok(rec),
            _ => Err(FilterError::InvalidCredential),
        }
    }

    /// Presented keys remembered (for tests).
    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.seen.len()
    }

    /// The lookup as it is without the cache: the oracle of the tests.
    #[cfg(test)]
    fn lookup_uncached(&self, key: &str, now_unix: i64) -> Result<&KeyRecord, FilterError> {
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        match self.by_hash.get(&digest).map(|&i| &self.records[i]) {
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

    #[test]
    fn cache_answers_as_the_uncached_lookup() {
        // Oracle: every lookup, first or repeated, equals the SHA-256 lookup.
        let s = store();
        let cases = [
            ("agw_good", 0),
            ("agw_good", 0),
            ("agw_nope", 0),
            ("agw_nope", 0),
            ("agw_old", 999),
            ("agw_old", 999),
            ("agw_old", 1_000),
            ("agw_goo", 0),
            ("agw_goodx", 0),
            ("", 0),
            ("agw_good", 5_000),
        ];
        for (key, now) in cases {
            assert_eq!(
                s.lookup(key, now),
                s.lookup_uncached(key, now),
                "{key} at {now}"
            );
        }
        // The two configured keys, each once; unknown keys never.
        assert_eq!(s.remembered(), 2);
    }

    #[test]
    fn unknown_keys_are_never_remembered() {
        let s = store();
        for i in 0..100 {
            let _ = s.lookup(&format!("agw_{i}"), 0);
        }
        assert_eq!(s.remembered(), 0);
        assert_eq!(s.lookup("agw_good", 0).unwrap().client, 0);
        assert_eq!(s.remembered(), 1);
    }

    #[test]
    fn a_remembered_key_answers_only_its_exact_bytes() {
        let s = store();
        s.lookup("agw_good", 0).unwrap();
        // Same length, one byte off; a prefix; an extension.
        for k in ["agw_gooe", "agw_goo", "agw_good ", "Agw_good"] {
            assert_eq!(s.lookup(k, 0), Err(FilterError::InvalidCredential), "{k}");
        }
        // A cached entry whose 64-bit hash is forced equal still compares the bytes.
        let hash = s.seen.seed.hash_one(b"agw_good".as_slice());
        assert_eq!(s.seen.get(hash, b"agw_gooe"), None);
        assert!(s.seen.get(hash, b"agw_good").is_some());
    }

    #[test]
    fn a_remembered_key_still_expires() {
        let s = store();
        assert_eq!(s.lookup("agw_old", 10).unwrap().client, 1);
        assert_eq!(s.remembered(), 1);
        assert_eq!(
            s.lookup("agw_old", 1_000),
            Err(FilterError::InvalidCredential)
        );
    }

    #[test]
    fn a_replaced_record_is_what_a_remembered_key_answers() {
        let mut s = store();
        assert_eq!(s.lookup("agw_good", 0).unwrap().client, 0);
        let h = parse_hash(&hash_key("agw_good")).unwrap();
        let replaced = KeyRecord {
            client: 7,
            expires_at: Some(5),
            key_id: "y".into(),
        };
        assert!(!s.insert(h, replaced.clone()));
        assert_eq!(s.len(), 2);
        assert_eq!(s.lookup("agw_good", 0), Ok(&replaced));
        assert_eq!(s.lookup("agw_good", 5), Err(FilterError::InvalidCredential));
        assert_eq!(s.lookup("agw_good", 0), s.lookup_uncached("agw_good", 0));
        assert_eq!(s.records().filter(|r| r.client == 7).count(), 1);
    }

    #[test]
    fn the_cache_is_bounded_by_the_configured_keys() {
        let s = store();
        let hash = s.seen.seed.hash_one(b"x".as_slice());
        for i in 0..10u8 {
            s.seen
                .insert(hash ^ u64::from(i), b"x", usize::from(i), s.len());
        }
        assert_eq!(s.remembered(), 2);
    }

    #[test]
    fn a_clone_starts_empty() {
        let s = store();
        s.lookup("agw_good", 0).unwrap();
        let c = s.clone();
        assert_eq!(c.remembered(), 0);
        assert_eq!(c.lookup("agw_good", 0).unwrap().client, 0);
        assert!(!format!("{s:?}").contains("agw_good"));
    }
}
