//! The capture queue: checkpoint hints and change-feed entries, coalesced
//! per (session, thread, worker), bounded (a full queue drops the oldest
//! hint and counts it), drained by background tasks that pull the new
//! entries from the worker into the store.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::Notify;

/// Most attempts for one hint (store or worker failing).
const MAX_ATTEMPTS: u32 = 10;

/// Which thread changed, on which worker.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Hint {
    /// Session id (hex).
    pub session: String,
    /// Thread id.
    pub thread: String,
    /// Backend id holding the change.
    pub backend: String,
}

#[derive(Debug, Default)]
struct Inner {
    order: VecDeque<Hint>,
    pending: HashMap<Hint, (u64, u32)>,
    /// Hints being pulled now: one pull per thread at a time.
    busy: HashSet<Hint>,
}

/// The bounded, coalescing queue.
#[derive(Debug)]
pub struct CaptureQueue {
    inner: Mutex<Inner>,
    ready: Notify,
    cap: usize,
}

impl CaptureQueue {
    /// A queue of at most `cap` distinct hints.
    pub fn new(cap: usize) -> CaptureQueue {
        CaptureQueue {
            inner: Mutex::new(Inner::default()),
            ready: Notify::new(),
            cap: cap.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a hint; returns `true` when the oldest hint was dropped to
    /// make room.
    pub fn push(&self, hint: Hint, seq: u64, attempts: u32) -> bool {
        let mut dropped = false;
        {
            let mut q = self.lock();
            if let Some(p) = q.pending.get_mut(&hint) {
                p.0 = p.0.max(seq);
                p.1 = p.1.max(attempts);
            } else {
                if q.order.len() >= self.cap {
                    if let Some(old) = q.order.pop_front() {
                        q.pending.remove(&old);
                        dropped = true;
                    }
                }
                q.order.push_back(hint.clone());
                q.pending.insert(hint, (seq, attempts));
            }
        }
        self.ready.notify_one();
        dropped
    }

    /// Takes the oldest hint whose thread is not being pulled, waiting for
    /// one. Call [`CaptureQueue::done`] when the pull ends.
    pub async fn pop(&self) -> (Hint, u64, u32) {
        loop {
            let notified = self.ready.notified();
            {
                let mut q = self.lock();
                let pos = q.order.iter().position(|h| !q.busy.contains(h));
                if let Some(h) = pos.and_then(|i| q.order.remove(i)) {
                    if let Some((seq, attempts)) = q.pending.remove(&h) {
                        q.busy.insert(h.clone());
                        return (h, seq, attempts);
                    }
                    continue;
                }
            }
            notified.await;
        }
    }

    /// Ends the pull of `hint`; a hint queued meanwhile becomes ready.
    pub fn done(&self, hint: &Hint) {
        self.lock().busy.remove(hint);
        self.ready.notify_one();
    }

    /// Hints waiting.
    pub fn len(&self) -> usize {
        self.lock().order.len()
    }

    /// Whether no hint waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Parses `Tether-Checkpoint: t1;seq=4, t2;seq=9` into (thread, seq).
/// Malformed items are skipped (a worker bug must not fail the response).
pub fn parse_checkpoint(value: &str) -> Vec<(String, u64)> {
    value
        .split(',')
        .filter_map(|item| {
            let mut parts = item.split(';').map(str::trim);
            let thread = parts.next().filter(|t| !t.is_empty())?;
            let seq = parts
                .filter_map(|p| p.strip_prefix("seq="))
                .find_map(|s| s.parse::<u64>().ok())?;
            Some((thread.to_owned(), seq))
        })
        .collect()
}

/// The `seq` of one exported entry.
#[derive(Deserialize)]
struct EntrySeq {
    seq: u64,
}

/// Pairs each raw entry with its `seq`; entries without one are invalid.
pub fn entries_with_seq(
    entries: &[Box<serde_json::value::RawValue>],
) -> Option<Vec<(u64, String)>> {
    entries
        .iter()
        .map(|raw| {
            let s: EntrySeq = serde_json::from_str(raw.get()).ok()?;
            Some((s.seq, raw.get().to_owned()))
        })
        .collect()
}

/// Back-off before the `attempt`-th retry.
pub fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(200u64.saturating_mul(1 << attempt.min(6))).min(Duration::from_secs(10))
}

/// Whether a hint may be tried again.
pub fn may_retry(attempts: u32) -> bool {
    attempts < MAX_ATTEMPTS
}

/// Shared handle.
pub type SharedQueue = Arc<CaptureQueue>;

#[cfg(test)]
mod tests {
    use super::*;

    fn hint(t: &str) -> Hint {
        Hint {
            session: "s".into(),
            thread: t.into(),
            backend: "a".into(),
        }
    }

    #[tokio::test]
    async fn coalesces_and_drops_oldest_when_full() {
        let q = CaptureQueue::new(2);
        assert!(!q.push(hint("t1"), 1, 0));
        assert!(!q.push(hint("t1"), 3, 0), "same thread coalesces");
        assert!(!q.push(hint("t2"), 1, 0));
        assert!(q.push(hint("t3"), 1, 0), "full: oldest dropped");
        assert_eq!(q.len(), 2);
        let (h, seq, _) = q.pop().await;
        assert_eq!((h.thread.as_str(), seq), ("t2", 1));
        // While t2 is pulled, a new t2 hint waits behind t3.
        q.push(hint("t2"), 2, 0);
        let (h3, _, _) = q.pop().await;
        assert_eq!(h3.thread, "t3");
        q.done(&h);
        let (again, seq, _) = q.pop().await;
        assert_eq!((again.thread.as_str(), seq), ("t2", 2));
    }

    #[test]
    fn checkpoint_header_parsing() {
        assert_eq!(
            parse_checkpoint("t1;seq=4, t2 ; seq=9,bad,;seq=3,t3;seq=x"),
            vec![("t1".to_owned(), 4), ("t2".to_owned(), 9)]
        );
    }
}
