//! A bounded cache of verified tokens, keyed by the SHA-256 of the whole token (signature
//! included, so a tampered token never hits).
//!
//! Measured (release, this 2-core machine, `tests::miss_pieces_timings`, fastest rounds): a
//! full RS256 `verify` of a ~650-byte token costs ≈ 17.7 µs (15.5 µs of it aws-lc's
//! signature check), a hit ≈ 1.4 µs (`measure_verify_cost`; 0.4 µs of it the SHA-256 of
//! the token). SDK clients reuse one access token for up to an hour, so nearly every
//! request of a hot client is a hit.
//!
//! An entry is served only while `now <= exp + leeway` (exactly what a fresh `verify` would
//! allow) and while its provider still holds the key set that verified it: any JWKS change
//! (refresh or refetch) makes entries re-verify once, so a key pulled from the JWKS stops
//! being honoured at the next refresh. Only successes are cached.
//!
//! Eviction is CLOCK (second chance), in 16 shards chosen by the key's first byte, each
//! behind its own lock: a hit marks its entry, a full shard sweeps its hand past marked
//! entries (unmarking them) and replaces the first unmarked or expired one. So a working set
//! that fits keeps hitting whatever its order — the old policy dropped an arbitrary eighth
//! of a full map, so a set just above the capacity verified nearly every request.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use super::VerifiedToken;

/// Default number of entries (`identity.token_cache_entries`). About 200 bytes each when
/// full: 65,536 tokens hold ≈ 13 MiB, and only when that many distinct tokens are live.
pub const DEFAULT_TOKEN_CACHE_CAPACITY: usize = 65_536;

/// Shards of a cache of at least [`SHARDED_FROM`] entries (a smaller one has one shard, so
/// its bound is exact; a sharded one holds at most `capacity + SHARDS - 1`).
const SHARDS: usize = 16;
const SHARDED_FROM: usize = 1024;

pub(crate) type CacheKey = [u8; 32];

pub(crate) fn cache_key(token: &str) -> CacheKey {
    Sha256::digest(token.as_bytes()).into()
}

/// A [`CacheKey`] in a shard's index, hashed by 8 of its bytes: the key is already a
/// SHA-256 digest, so SipHash over it again (the `HashMap` default, ~100 instructions a
/// lookup) adds nothing. Only verified tokens are inserted, and their digests cannot be
/// steered to one bucket. (The shard is chosen by byte 0; the hash uses bytes 8..16.)
#[derive(Clone, Copy, PartialEq, Eq)]
struct IndexKey(CacheKey);

impl Hash for IndexKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let [_, _, _, _, _, _, _, _, a, b, c, d, e, f, g, h, ..] = self.0;
        state.write_u64(u64::from_le_bytes([a, b, c, d, e, f, g, h]));
    }
}

/// The hasher of [`IndexKey`]: the 8 bytes it is given are the hash.
#[derive(Default)]
struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }

    fn write(&mut self, bytes: &[u8]) {
        // Not reached by `IndexKey`; a plain fold keeps the trait total.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
}

type Index = HashMap<IndexKey, usize, BuildHasherDefault<DigestHasher>>;

struct Entry {
    token: VerifiedToken,
    provider: usize,
    /// Key-set generation of `provider` that verified the token.
    generation: u64,
    /// `exp + leeway`.
    valid_until: u64,
}

struct Slot {
    key: CacheKey,
    entry: Entry,
    /// Hit since the hand last passed.
    referenced: bool,
}

/// One shard: slots in a ring swept by `hand`, and the index of each key's slot.
#[derive(Default)]
struct Shard {
    index: Index,
    slots: Vec<Slot>,
    hand: usize,
}

impl Shard {
    fn get(&mut self, key: &CacheKey) -> Option<&Entry> {
        let i = *self.index.get(&IndexKey(*key))?;
        let slot = &mut self.slots[i];
        slot.referenced = true;
        Some(&slot.entry)
    }

    fn insert(&mut self, key: CacheKey, entry: Entry, capacity: usize, now: u64) {
        if let Some(&i) = self.index.get(&IndexKey(key)) {
            self.slots[i] = Slot {
                key,
                entry,
                referenced: true,
            };
            return;
        }
        let slot = Slot {
            key,
            entry,
            referenced: false,
        };
        if self.slots.len() < capacity {
            self.index.insert(IndexKey(key), self.slots.len());
            self.slots.push(slot);
            return;
        }
        // Second chance: at most two turns (the first clears every mark).
        let n = self.slots.len();
        let victim = loop {
            let s = &mut self.slots[self.hand];
            if s.entry.valid_until < now || !s.referenced {
                break self.hand;
            }
            s.referenced = false;
            self.hand = (self.hand + 1) % n;
        };
        self.hand = (victim + 1) % n;
        self.index.remove(&IndexKey(self.slots[victim].key));
        self.index.insert(IndexKey(key), victim);
        self.slots[victim] = slot;
    }
}

pub(crate) struct TokenCache {
    /// Entries per shard (0: the cache is off).
    per_shard: usize,
    shards: Box<[Mutex<Shard>]>,
}

impl TokenCache {
    pub(crate) fn new(capacity: usize) -> Self {
        let shards = if capacity >= SHARDED_FROM { SHARDS } else { 1 };
        Self {
            per_shard: capacity.div_ceil(shards),
            shards: (0..shards).map(|_| Mutex::default()).collect(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        (0..self.shards.len())
            .map(|i| self.shard(i).slots.len())
            .sum()
    }

    fn shard(&self, i: usize) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    fn shard_of(&self, key: &CacheKey) -> std::sync::MutexGuard<'_, Shard> {
        self.shard(usize::from(key[0]) % self.shards.len())
    }

    /// The cached result for `key`, if still valid at `now` with the provider's current
    /// key-set generation (given by `generation_of(provider index)`).
    pub(crate) fn get(
        &self,
        key: &CacheKey,
        now: u64,
        generation_of: impl Fn(usize) -> u64,
    ) -> Option<VerifiedToken> {
        if self.per_shard == 0 {
            return None;
        }
        let mut shard = self.shard_of(key);
        let entry = shard.get(key)?;
        if now > entry.valid_until || generation_of(entry.provider) != entry.generation {
            return None;
        }
        Some(entry.token.clone())
    }

    pub(crate) fn insert(
        &self,
        key: CacheKey,
        token: VerifiedToken,
        provider: usize,
        generation: u64,
        valid_until: u64,
        now: u64,
    ) {
        if self.per_shard == 0 {
            return;
        }
        let entry = Entry {
            token,
            provider,
            generation,
            valid_until,
        };
        self.shard_of(&key).insert(key, entry, self.per_shard, now);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn token(n: u32) -> VerifiedToken {
        VerifiedToken {
            provider: Arc::from("p"),
            client_value: Arc::from(format!("app-{n}")),
            user: None,
            expires_at: 10_000,
            grants: None,
        }
    }

    /// Keys that all land in shard 0.
    fn key(n: u32) -> CacheKey {
        let mut k = [0u8; 32];
        k[1..5].copy_from_slice(&n.to_be_bytes());
        k
    }

    fn hit(c: &TokenCache, n: u32, now: u64) -> bool {
        c.get(&key(n), now, |_| 0).is_some()
    }

    fn put(c: &TokenCache, n: u32, valid_until: u64, now: u64) {
        c.insert(key(n), token(n), 0, 0, valid_until, now);
    }

    #[test]
    fn a_working_set_that_fits_keeps_hitting_whatever_its_order() {
        // A cycle over 4 keys after warming never misses.
        let c = TokenCache::new(4);
        for n in 0..4 {
            put(&c, n, 100, 1);
        }
        for round in 0..10 {
            for n in 0..4 {
                assert!(hit(&c, n, 2), "round {round}, key {n}");
            }
        }
    }

    #[test]
    fn clock_gives_referenced_entries_a_second_chance() {
        let c = TokenCache::new(3);
        for n in 0..3 {
            put(&c, n, 100, 1);
        }
        // 0 and 2 are used; 1 is not: the next insert takes 1's slot.
        assert!(hit(&c, 0, 2) && hit(&c, 2, 2));
        put(&c, 3, 100, 2);
        assert!(!hit(&c, 1, 3), "the unused entry stayed");
        assert!(hit(&c, 0, 3) && hit(&c, 2, 3) && hit(&c, 3, 3));
        // Everything referenced: the hand clears the marks and evicts where it started.
        put(&c, 4, 100, 3);
        assert_eq!(
            [0, 2, 3, 4].iter().filter(|&&n| hit(&c, n, 4)).count(),
            3,
            "exactly one entry made room"
        );
        assert_eq!(c.len(), 3);
    }

    #[test]
    fn expired_entries_go_first_and_are_never_served() {
        let c = TokenCache::new(2);
        put(&c, 0, 5, 1);
        put(&c, 1, 100, 1);
        assert!(hit(&c, 0, 5) && hit(&c, 1, 5));
        assert!(!hit(&c, 0, 6), "served after valid_until");
        // Both marked; 0 has expired: it makes room, 1 stays.
        put(&c, 2, 100, 6);
        assert!(hit(&c, 1, 7) && hit(&c, 2, 7));
    }

    #[test]
    fn a_key_set_change_makes_entries_verify_again() {
        let c = TokenCache::new(1);
        c.insert(key(0), token(0), 0, 7, 100, 1);
        assert!(c.get(&key(0), 2, |_| 7).is_some());
        assert!(c.get(&key(0), 2, |_| 8).is_none());
    }

    #[test]
    fn keys_that_share_the_index_hash_are_told_apart_by_the_whole_digest() {
        // key(n) differ only in bytes 1..5: the same shard (byte 0) and the same index hash
        // (bytes 8..16), so every lookup collides and only the full compare separates them.
        let hash = |k: CacheKey| {
            use std::hash::BuildHasher;
            BuildHasherDefault::<DigestHasher>::default().hash_one(IndexKey(k))
        };
        assert_eq!(hash(key(1)), hash(key(2)));
        let c = TokenCache::new(8);
        put(&c, 1, 100, 1);
        assert!(!hit(&c, 2, 2), "a colliding key hit another's entry");
        put(&c, 2, 100, 1);
        let client = |n: u32| c.get(&key(n), 2, |_| 0).map(|t| t.client_value);
        assert_eq!(client(1).as_deref(), Some("app-1"));
        assert_eq!(client(2).as_deref(), Some("app-2"));
        // Bytes 8..16 decide the index hash.
        let mut other = key(1);
        other[8] = 1;
        assert_ne!(hash(other), hash(key(1)));
    }

    #[test]
    fn capacity_zero_caches_nothing_and_size_is_bounded() {
        let off = TokenCache::new(0);
        put(&off, 0, 100, 1);
        assert!(!hit(&off, 0, 2));
        assert_eq!(off.len(), 0);
        for capacity in [64, 4096] {
            let c = TokenCache::new(capacity);
            for n in 0..10_000u32 {
                c.insert(cache_key(&n.to_string()), token(n), 0, 0, 100, 1);
            }
            let bound = if capacity >= SHARDED_FROM {
                capacity + SHARDS - 1
            } else {
                capacity
            };
            assert!(c.len() <= bound, "{} entries in {capacity}", c.len());
            assert!(
                c.len() >= capacity * 9 / 10,
                "{} entries in {capacity}",
                c.len()
            );
        }
    }
}
