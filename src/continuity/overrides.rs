//! Re-pins this replica knows about, newer than what a client's cookie
//! says: a stale cookie (older epoch) follows the newest pin.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use crate::affinity::SessionId;

const SHARDS: usize = 32;

/// The newest known pin of a moved session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Override {
    /// Pin epoch.
    pub epoch: u64,
    /// Backend id.
    pub backend: String,
    /// Instance tag restored into.
    pub instance: String,
    /// Whether the restore into this epoch completed.
    pub restored: bool,
}

/// Sharded session → override map, bounded.
#[derive(Debug)]
pub(crate) struct Overrides {
    shards: Vec<Mutex<HashMap<u128, Override>>>,
    per_shard: usize,
}

impl Overrides {
    /// A map holding at most about `capacity` sessions.
    pub(crate) fn new(capacity: usize) -> Overrides {
        Overrides {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: capacity.div_ceil(SHARDS).max(1),
        }
    }

    fn shard(&self, id: SessionId) -> MutexGuard<'_, HashMap<u128, Override>> {
        self.shards[(id.as_u128() as usize) % SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The override of `id`, if any.
    pub(crate) fn get(&self, id: SessionId) -> Option<Override> {
        self.shard(id).get(&id.as_u128()).cloned()
    }

    /// Records `o` unless a newer epoch (or the same epoch, restored) is
    /// already known.
    pub(crate) fn offer(&self, id: SessionId, o: Override) {
        let per_shard = self.per_shard;
        let mut shard = self.shard(id);
        match shard.get(&id.as_u128()) {
            Some(cur)
                if cur.epoch > o.epoch || (cur.epoch == o.epoch && cur.restored && !o.restored) => {
            }
            _ => {
                if shard.len() >= per_shard && !shard.contains_key(&id.as_u128()) {
                    // Bounded: forget an arbitrary entry; its session falls
                    // back to the store's CAS, which stays correct.
                    if let Some(k) = shard.keys().next().copied() {
                        shard.remove(&k);
                    }
                }
                shard.insert(id.as_u128(), o);
            }
        }
    }
}
