//! Rate-limit rules: one `governor` GCRA limiter per rule, over a keyed
//! state store of our own whose size is bounded (`rate_limit.max_keys`):
//! past the cap, keys whose bucket has refilled go first, then the idlest.
//!
//! Keys are 64-bit hashes (seeded per process) of the IP, session id or
//! header value, so a tracked key costs the same whatever the client sent:
//! about 40 bytes, so 100000 keys take about 4 MiB per rule.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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
        // A bucket untouched this long is full again: as good as new.
        let refill = interval.saturating_mul(burst.get());
        let clock = MonotonicClock;
        let store = Store::new(max_keys, refill);
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
    /// Time for an untouched bucket to refill.
    refill: Duration,
    start: Instant,
    len: AtomicUsize,
    ticks: AtomicU64,
}

#[derive(Clone, Copy)]
struct Entry {
    /// GCRA's theoretical arrival time.
    tat: Nanos,
    /// Last use, ms since `start` (a bucket idle past `refill` is full).
    seen: u64,
    /// Last use, as a store-wide count of uses (orders the idlest).
    tick: u64,
}

impl Store {
    fn new(max_keys: usize, refill: Duration) -> Store {
        Store(Arc::new(Inner {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            cap: max_keys.div_ceil(SHARDS).max(1),
            refill,
            start: Instant::now(),
            len: AtomicUsize::new(0),
            ticks: AtomicU64::new(0),
        }))
    }

    fn shard(&self, key: u64) -> MutexGuard<'_, HashMap<u64, Entry>> {
        // The low bits pick the shard; the map hashes the whole key again.
        let i = (key % SHARDS as u64) as usize;
        self.0.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.0.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// Makes room in a full shard: buckets that refilled go, then the idlest
/// eighth (so the scan runs once per `cap / 8` new keys, not per key).
fn evict(map: &mut HashMap<u64, Entry>, now_ms: u64, refill: Duration, cap: usize) {
    let refill_ms = u64::try_from(refill.as_millis()).unwrap_or(u64::MAX);
    map.retain(|_, e| now_ms.saturating_sub(e.seen) < refill_ms);
    if map.len() < cap {
        return;
    }
    let mut ticks: Vec<u64> = map.values().map(|e| e.tick).collect();
    let drop = (cap / 8).max(1).min(ticks.len());
    let (_, cutoff, _) = ticks.select_nth_unstable(drop - 1);
    let cutoff = *cutoff;
    map.retain(|_, e| e.tick > cutoff);
}

impl StateStore for Store {
    type Key = u64;

    fn measure_and_replace<T, F, E>(&self, key: &u64, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let now = self.now_ms();
        let tick = self.0.ticks.fetch_add(1, Ordering::Relaxed);
        let mut map = self.shard(*key);
        let before = map.len();
        let current = map.get(key).map(|e| e.tat);
        let result = match f(current) {
            Ok((t, tat)) => {
                if current.is_none() && map.len() >= self.0.cap {
                    evict(&mut map, now, self.0.refill, self.0.cap);
                }
                map.insert(
                    *key,
                    Entry {
                        tat,
                        seen: now,
                        tick,
                    },
                );
                Ok(t)
            }
            Err(e) => {
                if let Some(entry) = map.get_mut(key) {
                    entry.seen = now;
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
