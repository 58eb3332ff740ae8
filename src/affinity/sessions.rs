//! Live sessions: which worker each session is pinned to (so every worker
//! knows how many sessions it holds, for least-sessions balancing, metrics
//! and `/backends`), the request-key pins, and the sweep that forgets
//! expired ones. [`Sessions`] is the handle the proxy and the janitor share.

use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};

use super::pins::{lock, PinTable, SHARDS};
use super::{Lifetimes, Pin, SessionId};
use crate::backends::Backend;

/// Sessions and request-key pins; cheap to clone and share.
#[derive(Debug, Clone)]
pub struct Sessions(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    table: SessionTable,
    pins: PinTable,
    rr: AtomicUsize,
}

impl Sessions {
    /// Tables of at most about `capacity` sessions and pins each.
    pub fn new(capacity: usize) -> Sessions {
        Sessions(Arc::new(Inner {
            table: SessionTable::new(capacity),
            pins: PinTable::new(capacity),
            rr: AtomicUsize::new(0),
        }))
    }

    /// Records that `id` is pinned to `backend` until `expires_at`, and
    /// says whether the session is due to be written to the store.
    pub fn touch(
        &self,
        id: SessionId,
        backend: &Arc<Backend>,
        expires_at: u64,
        now: u64,
    ) -> Touched {
        self.0.table.touch(id, backend, expires_at, now)
    }

    /// The pin of a request key.
    pub fn pin(&self, key: &str) -> Option<Pin> {
        self.0.pins.get(SessionId::for_key(key))
    }

    /// Pins a request key (its session id is `pin.session`).
    pub fn set_pin(&self, pin: Pin) {
        self.0.pins.insert(pin);
    }

    /// The round-robin counter of new sessions.
    pub fn rr(&self) -> &AtomicUsize {
        &self.0.rr
    }

    /// Forgets sessions and pins that are no longer alive at `now`, so
    /// per-worker counts are live counts. Run on the janitor's tick.
    pub fn sweep(&self, now: u64, lifetimes: &Lifetimes) -> usize {
        self.0.pins.retain(|p| lifetimes.is_alive(p, now));
        self.0.table.expire(now)
    }

    /// Sessions tracked now.
    pub fn len(&self) -> usize {
        self.0.table.len()
    }

    /// Whether no session is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What recording a request of a session found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Touched {
    /// A session this table did not track (its row is written on its
    /// second request: a client that never comes back costs no write).
    New,
    /// Moved, or last written a while ago: write its row.
    Due,
    /// Nothing to write.
    Quiet,
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
struct SessionTable {
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
    fn new(capacity: usize) -> SessionTable {
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
    fn touch(&self, id: SessionId, backend: &Arc<Backend>, expires_at: u64, now: u64) -> Touched {
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
                    Touched::Due
                } else {
                    Touched::Quiet
                }
            }
            None if !full => {
                backend.sessions_inc();
                shard.insert(
                    id.as_u128(),
                    Live {
                        backend: backend.clone(),
                        expires_at: secs32(expires_at),
                        // Never written: its next request writes it.
                        written_at: 0,
                    },
                );
                Touched::New
            }
            None => Touched::New,
        }
    }

    /// Forgets sessions that expired at or before `now`; returns how many.
    fn expire(&self, now: u64) -> usize {
        let mut gone = 0;
        for s in &self.shards {
            lock(s).retain(|_, live| {
                let keep = u64::from(live.expires_at) > now;
                if !keep {
                    live.backend.sessions_dec();
                    gone += 1;
                }
                keep
            });
        }
        gone
    }

    /// Number of tracked sessions.
    fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }
}
