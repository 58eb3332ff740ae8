//! The bounded request-key pin table (`affinity.key = ["header:…"]`),
//! keyed by the key's session id (a digest): an entry's size does not
//! depend on how long a client makes its key.
//!
//! Sharded so that the hot path takes one short, uncontended lock; no lock
//! is ever held across an `.await`.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use super::{Pin, SessionId};

pub(super) const SHARDS: usize = 64;

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a shard lock cannot leave a map half-updated in
    // a way that matters here (single inserts/removes); keep serving.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Request-key pins (`affinity.key = ["header:…"]`): the key's session
/// id → pin, bounded.
#[derive(Debug)]
pub struct PinTable {
    shards: Vec<Mutex<HashMap<u128, Pin>>>,
    per_shard: usize,
}

/// Entries looked at to choose one to evict from a full shard.
const EVICTION_SAMPLE: usize = 8;

impl PinTable {
    /// A table holding at most about `capacity` keys.
    pub fn new(capacity: usize) -> PinTable {
        PinTable {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: capacity.div_ceil(SHARDS).max(1),
        }
    }

    fn shard(&self, id: SessionId) -> &Mutex<HashMap<u128, Pin>> {
        // Session ids are digests: their low bits are a fine hash.
        &self.shards[(id.as_u128() as usize) % SHARDS]
    }

    /// The pin of the key whose session id is `id`, if any.
    pub fn get(&self, id: SessionId) -> Option<Pin> {
        lock(self.shard(id)).get(&id.as_u128()).cloned()
    }

    /// Pins the key of `pin.session`; when the shard is full, the least
    /// recently refreshed of a few entries is evicted (that key re-pins on
    /// its next request, reading its pin from the store).
    pub fn insert(&self, pin: Pin) {
        let id = pin.session.as_u128();
        let mut shard = lock(self.shard(pin.session));
        if shard.len() >= self.per_shard && !shard.contains_key(&id) {
            if let Some(oldest) = shard
                .iter()
                .take(EVICTION_SAMPLE)
                .min_by_key(|(_, p)| p.refreshed_at)
                .map(|(k, _)| *k)
            {
                shard.remove(&oldest);
            }
        }
        shard.insert(id, pin);
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
