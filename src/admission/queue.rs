//! A worker's slots: at most `max_inflight` requests at the worker, the
//! rest waiting in one FIFO queue. A slot is handed from the request that
//! frees it straight to the oldest waiter (never taken over by a newcomer),
//! and a waiter that leaves (timeout, worker lost, client gone) leaves the
//! queue at once.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::backends::Backend;

/// Why a request got no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// `queue.max_waiting` requests already wait for the worker.
    #[error("the worker's queue is full")]
    Full,
    /// No slot came free within `queue.timeout`.
    #[error("no slot came free in time")]
    Timeout,
    /// The worker stopped being usable while the request waited.
    #[error("the worker was lost while the request waited")]
    Lost,
}

impl Refused {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::Full => "queue_full",
            Refused::Timeout => "queue_timeout",
            Refused::Lost => "worker_lost",
        }
    }
}

/// One worker's slots and queue. Lives on the [`Backend`], so it survives
/// reloads with the worker.
#[derive(Debug, Default)]
pub struct Slots {
    state: Mutex<State>,
    /// Mirrors of the state for lock-free reads (balancer, metrics).
    in_flight: AtomicUsize,
    queued: AtomicUsize,
    /// The limit last applied; 0 = unlimited.
    limit: AtomicUsize,
}

#[derive(Debug, Default)]
struct State {
    in_flight: usize,
    /// 0 = unlimited.
    limit: usize,
    next_id: u64,
    waiting: VecDeque<Waiter>,
}

#[derive(Debug)]
struct Waiter {
    id: u64,
    grant: oneshot::Sender<()>,
}

/// A slot at a worker, freed when dropped (the response body, or the
/// tunnel, owns it).
#[derive(Debug)]
pub struct Slot {
    backend: Arc<Backend>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let slots = &self.backend.slots;
        let mut s = slots.lock();
        s.in_flight = s.in_flight.saturating_sub(1);
        slots.pump(&mut s);
    }
}

impl Slot {
    /// The worker the slot is at.
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }
}

/// A queued request; leaving the queue (or giving back a slot granted in
/// the meantime) happens in `Drop`, so a cancelled request cleans up too.
struct Waiting<'a> {
    backend: &'a Arc<Backend>,
    id: u64,
    granted: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.granted {
            return;
        }
        let slots = &self.backend.slots;
        let mut s = slots.lock();
        if let Some(i) = s.waiting.iter().position(|w| w.id == self.id) {
            s.waiting.remove(i);
            slots.mirror(&s);
        } else {
            // Popped and granted under the lock before we got it: the slot
            // is ours to give back.
            s.in_flight = s.in_flight.saturating_sub(1);
            slots.pump(&mut s);
        }
    }
}

/// Queue settings for one acquisition.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Wait {
    /// `queue.timeout`
    pub timeout: Duration,
    /// `queue.max_waiting`
    pub max_waiting: usize,
}

impl Slots {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn mirror(&self, s: &State) {
        self.in_flight.store(s.in_flight, Ordering::Relaxed);
        self.queued.store(s.waiting.len(), Ordering::Relaxed);
    }

    /// Hands free slots to the oldest waiters.
    fn pump(&self, s: &mut State) {
        while s.limit == 0 || s.in_flight < s.limit {
            let Some(w) = s.waiting.pop_front() else {
                break;
            };
            if w.grant.send(()).is_ok() {
                s.in_flight += 1;
            }
        }
        self.mirror(s);
    }

    /// Requests holding a slot.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Requests waiting for a slot.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Whether a new request would get a slot now (approximate, no lock).
    pub fn has_room(&self) -> bool {
        let limit = self.limit.load(Ordering::Relaxed);
        limit == 0 || (self.queued() == 0 && self.in_flight() < limit)
    }

    /// Load relative to the limit, for choosing among full workers:
    /// `(in_flight + queued, limit)`.
    pub fn load(&self) -> (usize, usize) {
        (
            self.in_flight() + self.queued(),
            self.limit.load(Ordering::Relaxed).max(1),
        )
    }

    /// Applies a (new) limit, 0 = unlimited; waiters get slots it frees.
    pub(crate) fn set_limit(&self, limit: usize) {
        if self.limit.load(Ordering::Relaxed) == limit {
            return;
        }
        let mut s = self.lock();
        s.limit = limit;
        self.limit.store(limit, Ordering::Relaxed);
        self.pump(&mut s);
    }
}

/// Takes a slot at `backend` (limit `limit`), waiting in its FIFO queue
/// for at most `wait.timeout`; gives up at once when the worker is lost.
pub(crate) async fn acquire(
    backend: &Arc<Backend>,
    limit: usize,
    wait: Wait,
) -> Result<(Slot, Option<Duration>), Refused> {
    let slots = &backend.slots;
    slots.set_limit(limit);
    let (id, rx) = {
        let mut s = slots.lock();
        if s.waiting.is_empty() && (s.limit == 0 || s.in_flight < s.limit) {
            s.in_flight += 1;
            slots.mirror(&s);
            let slot = Slot {
                backend: backend.clone(),
            };
            return Ok((slot, None));
        }
        if s.waiting.len() >= wait.max_waiting {
            return Err(Refused::Full);
        }
        let (tx, rx) = oneshot::channel();
        let id = s.next_id;
        s.next_id = s.next_id.wrapping_add(1);
        s.waiting.push_back(Waiter { id, grant: tx });
        slots.mirror(&s);
        (id, rx)
    };
    let started = tokio::time::Instant::now();
    let mut waiting = Waiting {
        backend,
        id,
        granted: false,
    };
    let lost = backend.lost();
    tokio::pin!(lost);
    lost.as_mut().enable();
    if !backend.is_usable() {
        return Err(Refused::Lost);
    }
    tokio::select! {
        r = rx => match r {
            Ok(()) => {
                waiting.granted = true;
                let slot = Slot { backend: backend.clone() };
                Ok((slot, Some(started.elapsed())))
            }
            // The sender went without a grant: only a dropped queue does that.
            Err(_) => Err(Refused::Lost),
        },
        _ = tokio::time::sleep(wait.timeout) => Err(Refused::Timeout),
        _ = &mut lost => Err(Refused::Lost),
    }
}
