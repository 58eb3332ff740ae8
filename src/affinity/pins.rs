//! The bounded request-key pin table (`affinity.key = ["header:…"]`).
//!
//! Sharded so that the hot path takes one short, uncontended lock; no lock
//! is ever held across an `.await`.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Mutex, MutexGuard};

use super::Pin;

pub(super) const SHARDS: usize = 64;

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a shard lock cannot leave a map half-updated in
    // a way that matters here (single inserts/removes); keep serving.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Request-key pins (`affinity.key = ["header:…"]`): key → pin, bounded.
#[derive(Debug)]
pub struct PinTable {
    shards: Vec<Mutex<HashMap<String, Pin>>>,
    per_shard: usize,
    hasher: std::collections::hash_map::RandomState,
}

impl PinTable {
    /// A table holding at most about `capacity` keys.
    pub fn new(capacity: usize) -> PinTable {
        PinTable {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: capacity.div_ceil(SHARDS).max(1),
            hasher: Default::default(),
        }
    }

    fn shard(&self, key: &str) -> &Mutex<HashMap<String, Pin>> {
        let i = self.hasher.hash_one(key) as usize % SHARDS;
        &self.shards[i]
    }

    /// The pin of `key`, if any.
    pub fn get(&self, key: &str) -> Option<Pin> {
        lock(self.shard(key)).get(key).cloned()
    }

    /// Pins `key`; when the shard is full the least recently refreshed
    /// entry is evicted (that key re-pins on its next request).
    pub fn insert(&self, key: &str, pin: Pin) {
        let mut shard = lock(self.shard(key));
        if shard.len() >= self.per_shard && !shard.contains_key(key) {
            if let Some(oldest) = shard
                .iter()
                .min_by_key(|(_, p)| p.refreshed_at)
                .map(|(k, _)| k.clone())
            {
                shard.remove(&oldest);
            }
        }
        shard.insert(key.to_owned(), pin);
    }

    /// Number of pinned keys.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    /// Whether no key is pinned.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops pins for which `alive` is false.
    pub fn retain(&self, mut alive: impl FnMut(&Pin) -> bool) {
        for s in &self.shards {
            lock(s).retain(|_, p| alive(p));
        }
    }
}
