//! Rate-limit rules: one `governor` GCRA limiter per rule, over a keyed
//! state store of our own whose size is bounded (`rate_limit.max_keys`):
//! past the cap, keys whose bucket has refilled go first, then the least
//! recently used.
//!
//! Keys are 64-bit hashes (seeded per process) of the IP, session id or
//! header value, so a tracked key costs the same whatever the client sent:
//! 24 bytes and a control byte in a table kept at most 7/8 full, so the
//! default 50000 keys take about 1.6 MiB per rule when full.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use governor::clock::{Clock, MonotonicClock};
use governor::nanos::Nanos;
use governor::state::StateStore;
use governor::{Quota, RateLimiter};

use crate::config::RateLimit;

/// Shards of a rule's key table (fewer lock collisions between cores).
const SHARDS: usize = 16;

/// One rule's limiter.
pub(crate) struct Limiter {
    limiter: RateLimiter<u64, Store, MonotonicClock>,
    store: Store,
    clock: MonotonicClock,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("keys", &self.keys())
            .finish()
    }
}

impl Limiter {
    /// A limiter for `rule`, tracking at most `max_keys` keys.
    pub(crate) fn new(rule: &RateLimit, max_keys: usize) -> Limiter {
        let count = NonZeroU32::new(rule.count).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(rule.burst).unwrap_or(NonZeroU32::MIN);
        // One cell every per/count; `burst` cells at once.
        let interval = rule.per / count.get();
        let quota = Quota::with_period(interval)
            .unwrap_or_else(|| Quota::per_second(count))
            .allow_burst(burst);
        let clock = MonotonicClock;
        let store = Store::new(max_keys);
        Limiter {
            limiter: RateLimiter::new(quota, store.clone(), clock.clone()),
            store,
            clock,
        }
    }

    /// Counts one request for `key`; `Err` carries how long until the
    /// bucket admits one again.
    pub(crate) fn check(&self, key: u64) -> Result<(), Duration> {
        match self.limiter.check_key(&key) {
            Ok(()) => Ok(()),
            Err(not_until) => Err(not_until.wait_time_from(self.clock.now())),
        }
    }

    /// Keys tracked now.
    pub(crate) fn keys(&self) -> usize {
        self.store.0.len.load(Ordering::Relaxed)
    }
}

/// The bounded keyed store (cheap to clone: the limiter holds one copy,
/// [`Limiter::keys`] reads the other).
#[derive(Clone)]
struct Store(Arc<Inner>);

struct Inner {
    shards: Vec<Mutex<HashMap<u64, Entry>>>,
    /// Keys per shard before eviction.
    cap: usize,
    /// Made just before the limiter (whose own start is private): a
    /// bucket's time read against it is at most that gap (microseconds)
    /// ahead of the limiter's.
    start: Instant,
    len: AtomicUsize,
    ticks: AtomicU32,
}

/// One key's bucket: 24 bytes in the table with its key.
#[derive(Clone, Copy)]
struct Entry {
    /// GCRA's theoretical arrival time (ns since the limiter's start): at
    /// or before now, the bucket is full, as good as new.
    tat: Nanos,
    /// Last use, as a count of uses of the store (wrapping; ages are
    /// compared as distances from the current count).
    tick: u32,
}

impl Store {
    fn new(max_keys: usize) -> Store {
        Store(Arc::new(Inner {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            cap: max_keys.div_ceil(SHARDS).max(1),
            start: Instant::now(),
            len: AtomicUsize::new(0),
            ticks: AtomicU32::new(0),
        }))
    }

    fn shard(&self, key: u64) -> MutexGuard<'_, HashMap<u64, Entry>> {
        // The low bits pick the shard; the map hashes the whole key again.
        let i = (key % SHARDS as u64) as usize;
        self.0.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now(&self) -> Nanos {
        let ns = u64::try_from(self.0.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        Nanos::new(ns)
    }
}

/// Makes room in a full shard: full buckets go (forgetting them changes
/// nothing), then the least recently used eighth (so the scan runs once
/// per `cap / 8` new keys, not per key).
fn evict(map: &mut HashMap<u64, Entry>, now: Nanos, tick: u32, cap: usize) {
    map.retain(|_, e| e.tat > now);
    if map.len() < cap {
        return;
    }
    let age = |e: &Entry| tick.wrapping_sub(e.tick);
    let mut ages: Vec<u32> = map.values().map(age).collect();
    let drop = (cap / 8).max(1).min(ages.len());
    // The `drop`-th largest age: that old or older goes.
    let (_, cutoff, _) = ages.select_nth_unstable_by(drop - 1, |a, b| b.cmp(a));
    let cutoff = *cutoff;
    map.retain(|_, e| age(e) < cutoff);
}

impl StateStore for Store {
    type Key = u64;

    fn measure_and_replace<T, F, E>(&self, key: &u64, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let tick = self.0.ticks.fetch_add(1, Ordering::Relaxed);
        let mut map = self.shard(*key);
        let before = map.len();
        let current = map.get(key).map(|e| e.tat);
        let result = match f(current) {
            Ok((t, tat)) => {
                if current.is_none() && map.len() >= self.0.cap {
                    evict(&mut map, self.now(), tick, self.0.cap);
                }
                map.insert(*key, Entry { tat, tick });
                Ok(t)
            }
            Err(e) => {
                // Refused keys count as used: a client that keeps asking
                // stays tracked (and limited).
                if let Some(entry) = map.get_mut(key) {
                    entry.tick = tick;
                }
                Err(e)
            }
        };
        let after = map.len();
        if after >= before {
            self.0.len.fetch_add(after - before, Ordering::Relaxed);
        } else {
            self.0.len.fetch_sub(before - after, Ordering::Relaxed);
        }
        result
    }
}

#[cfg(test)]
pub(super) fn tracked(l: &Limiter, key: u64) -> bool {
    l.store.shard(key).contains_key(&key)
}
