//! Bounded in-memory tables: request-key pins, and the live sessions per
//! worker that the least-sessions policy balances on.
//!
//! Both are sharded so that the hot path takes one short, uncontended lock;
//! no lock is ever held across an `.await`.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{Pin, SessionId};
use crate::backends::Backend;

const SHARDS: usize = 64;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
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

/// 32 bytes with its key: unix seconds fit in `u32` until 2106 (and
/// saturate after), which keeps 100k sessions near 3 MiB.
struct Live {
    backend: Arc<Backend>,
    expires_at: u32,
    written_at: u32,
}

const _: () = assert!(std::mem::size_of::<(u128, Live)>() == 32);

fn secs32(t: u64) -> u32 {
    u32::try_from(t).unwrap_or(u32::MAX)
}

/// Session ids are uniformly random: their high half is already a good
/// hash (the low bits pick the shard), so no SipHash per request.
#[derive(Default, Clone, Copy)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only reached for non-u128 keys, which this table does not use.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u128(&mut self, n: u128) {
        self.0 = (n >> 64) as u64;
    }
}

type IdMap = HashMap<u128, Live, std::hash::BuildHasherDefault<IdHasher>>;

/// How often a kept session's last-seen is written to the store.
const WRITE_EVERY_SECS: u64 = 60;

/// Live sessions and the worker each is pinned to, so every worker knows
/// how many sessions it holds. Bounded: past the capacity new sessions are
/// not tracked (counts become approximate, routing is unaffected).
pub struct SessionTable {
    shards: Vec<Mutex<IdMap>>,
    per_shard: usize,
}

impl std::fmt::Debug for SessionTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionTable")
            .field("len", &self.len())
            .finish()
    }
}

impl SessionTable {
    /// A table tracking at most about `capacity` sessions.
    pub fn new(capacity: usize) -> SessionTable {
        SessionTable {
            shards: (0..SHARDS).map(|_| Mutex::new(IdMap::default())).collect(),
            per_shard: capacity.div_ceil(SHARDS).max(1),
        }
    }

    fn shard(&self, id: SessionId) -> &Mutex<IdMap> {
        // Session ids are uniformly random: their low bits are a fine hash.
        &self.shards[(id.as_u128() as usize) % SHARDS]
    }

    /// Records that `id` is pinned to `backend` until `expires_at`.
    /// Returns whether the session is due to be written to the store (new,
    /// moved, or last written long ago).
    pub fn touch(&self, id: SessionId, backend: &Arc<Backend>, expires_at: u64, now: u64) -> bool {
        let mut shard = lock(self.shard(id));
        let full = shard.len() >= self.per_shard;
        match shard.get_mut(&id.as_u128()) {
            Some(live) => {
                let mut due = now.saturating_sub(u64::from(live.written_at)) >= WRITE_EVERY_SECS;
                if !Arc::ptr_eq(&live.backend, backend) {
                    live.backend.sessions_dec();
                    backend.sessions_inc();
                    live.backend = backend.clone();
                    due = true;
                }
                live.expires_at = secs32(expires_at);
                if due {
                    live.written_at = secs32(now);
                }
                due
            }
            None if !full => {
                backend.sessions_inc();
                shard.insert(
                    id.as_u128(),
                    Live {
                        backend: backend.clone(),
                        expires_at: secs32(expires_at),
                        written_at: secs32(now),
                    },
                );
                true
            }
            None => true,
        }
    }

    /// Forgets sessions that expired before `now`.
    pub fn expire(&self, now: u64) {
        for s in &self.shards {
            lock(s).retain(|_, live| {
                let keep = u64::from(live.expires_at) > now;
                if !keep {
                    live.backend.sessions_dec();
                }
                keep
            });
        }
    }

    /// Number of tracked sessions.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    /// Whether no session is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
