//! Choosing a worker for a new or moved session. Pure functions over the
//! current backend set; randomness and the round-robin counter are passed in.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rand::Rng;

use crate::backends::{Backend, BackendSet};
use crate::config::Policy;

/// Picks a worker for a new session, among workers that accept new
/// sessions, skipping `exclude` (a worker that just failed).
pub fn choose_new(
    policy: Policy,
    key: &[u8],
    set: &BackendSet,
    rr: &AtomicUsize,
    exclude: Option<&str>,
) -> Option<Arc<Backend>> {
    let mut candidates: Vec<&Arc<Backend>> = set
        .all()
        .iter()
        .filter(|b| b.accepts_new() && Some(b.id.as_str()) != exclude)
        .collect();
    // Workers at `max_inflight` take no new session while another has
    // room; when all are full, the least loaded one queues it.
    if candidates.iter().any(|b| !b.slots.has_room()) {
        let roomy: Vec<&Arc<Backend>> = candidates
            .iter()
            .copied()
            .filter(|b| b.slots.has_room())
            .collect();
        candidates = if roomy.is_empty() {
            least_loaded(&candidates).into_iter().collect()
        } else {
            roomy
        };
    }
    match policy {
        Policy::LeastSessions => least_sessions(&candidates, &mut rand::thread_rng()),
        Policy::Rendezvous => rendezvous(&candidates, key),
        Policy::RoundRobin => round_robin(&candidates, rr.fetch_add(1, Ordering::Relaxed)),
    }
    .cloned()
}

/// Picks the worker for a session whose worker was lost: rendezvous on the
/// session id over workers that accept sessions, so replicas that see the
/// same health agree without talking.
pub fn choose_repin(
    session: &[u8],
    set: &BackendSet,
    exclude: Option<&str>,
) -> Option<Arc<Backend>> {
    let candidates: Vec<&Arc<Backend>> = set
        .all()
        .iter()
        .filter(|b| b.accepts_new() && Some(b.id.as_str()) != exclude)
        .collect();
    rendezvous(&candidates, session).cloned()
}

/// Power of two choices on live sessions per unit of weight.
pub fn least_sessions<'a>(c: &[&'a Arc<Backend>], rng: &mut impl Rng) -> Option<&'a Arc<Backend>> {
    match c.len() {
        0 => None,
        1 => Some(c[0]),
        n => {
            let i = rng.gen_range(0..n);
            let mut j = rng.gen_range(0..n - 1);
            if j >= i {
                j += 1;
            }
            let (a, b) = (c[i], c[j]);
            // Compare sessions/weight by cross-multiplying (no floats).
            let la = a.sessions().max(0) as i128 * b.weight() as i128;
            let lb = b.sessions().max(0) as i128 * a.weight() as i128;
            Some(if lb < la { b } else { a })
        }
    }
}

/// The worker with the fewest requests in flight and queued per slot.
pub fn least_loaded<'a>(c: &[&'a Arc<Backend>]) -> Option<&'a Arc<Backend>> {
    c.iter()
        .min_by(|a, b| {
            let (la, ca) = a.slots.load();
            let (lb, cb) = b.slots.load();
            // la/ca < lb/cb, cross-multiplied.
            (la as u128 * cb as u128).cmp(&(lb as u128 * ca as u128))
        })
        .copied()
}

/// Weighted highest-random-weight: each worker scores
/// `-weight / ln(u)` with `u` a stable hash of (key, id) in (0, 1).
pub fn rendezvous<'a>(c: &[&'a Arc<Backend>], key: &[u8]) -> Option<&'a Arc<Backend>> {
    c.iter()
        .map(|b| (score(key, &b.id, b.weight()), *b))
        .max_by(|x, y| x.0.total_cmp(&y.0).then_with(|| y.1.id.cmp(&x.1.id)))
        .map(|(_, b)| b)
}

fn score(key: &[u8], id: &str, weight: u32) -> f64 {
    let h = stable_hash(key, id.as_bytes());
    // 53 high bits → (0, 1), never 0 or 1.
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -(weight as f64) / u.ln()
}

/// FNV-1a over both inputs, finished with the splitmix64 mixer. Stable
/// across builds and machines (replicas must agree), unlike `std`'s hasher.
pub fn stable_hash(a: &[u8], b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &x in a.iter().chain([0xffu8].iter()).chain(b.iter()) {
        h ^= x as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Weighted round robin over the candidates.
pub fn round_robin<'a>(c: &[&'a Arc<Backend>], n: usize) -> Option<&'a Arc<Backend>> {
    let total: usize = c.iter().map(|b| b.weight() as usize).sum();
    if total == 0 {
        return None;
    }
    let mut pos = n % total;
    for b in c {
        let w = b.weight() as usize;
        if pos < w {
            return Some(b);
        }
        pos -= w;
    }
    None
}

#[cfg(test)]
mod tests;
