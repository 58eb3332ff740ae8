//! Re-pins this replica knows about, newer than what a client's cookie
//! says: a stale cookie (older epoch) follows the newest pin. An entry also
//! carries a debt: a move restored the session without acknowledged turns,
//! and no 2xx response has told the client yet (`Tether-Restore:
//! partial`); the debt outlives later moves until it is paid.

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
    /// A partial restore the client has not been told about yet.
    pub partial: bool,
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
    /// already known. A partial-restore debt is kept either way.
    pub(crate) fn offer(&self, id: SessionId, mut o: Override) {
        let per_shard = self.per_shard;
        let key = id.as_u128();
        let mut shard = self.shard(id);
        if let Some(cur) = shard.get_mut(&key) {
            if cur.epoch > o.epoch || (cur.epoch == o.epoch && cur.restored && !o.restored) {
                cur.partial |= o.partial;
            } else {
                o.partial |= cur.partial;
                *cur = o;
            }
            return;
        }
        if shard.len() >= per_shard {
            // Bounded: forget an entry that only says where a session went
            // (its session falls back to the store's compare-and-set, which
            // stays correct), never a debt or an unfinished move.
            let plain = shard
                .iter()
                .find(|(_, v)| v.restored && !v.partial)
                .map(|(k, _)| *k);
            // When every entry carries a debt, this one joins them: the map
            // grows past its bound by the debts outstanding.
            if let Some(k) = plain {
                shard.remove(&k);
            }
        }
        shard.insert(key, o);
    }

    /// Whether the client of `id` is owed a `Tether-Restore: partial`.
    pub(crate) fn owes_partial(&self, id: SessionId) -> bool {
        self.shard(id).get(&id.as_u128()).is_some_and(|o| o.partial)
    }

    /// Turns of `id` a client saw acknowledged were lost after all (a late
    /// capture refused by the fence): the next 2xx must say so.
    pub(crate) fn owe_partial(&self, id: SessionId) {
        self.offer(
            id,
            Override {
                epoch: 0,
                backend: String::new(),
                instance: String::new(),
                restored: false,
                partial: true,
            },
        );
    }

    /// A 2xx response told the client: the debt is paid.
    pub(crate) fn partial_reported(&self, id: SessionId) {
        if let Some(o) = self.shard(id).get_mut(&id.as_u128()) {
            o.partial = false;
        }
    }
}
