//! The capture ledger: for every (session, thread) a worker announced
//! (`Tether-Checkpoint` on a response, or its change feed), the highest seq
//! tether saw acknowledged, where to pull it from, and whether a pull is
//! waiting or running. One pull per thread at a time; bounded (a full
//! ledger drops its oldest waiting thread and counts it).
//!
//! The ledger is also the move's memory of what was acknowledged: a record
//! stays until the store holds its acknowledged seq, so a move can tell a
//! complete restore from one that would silently miss a turn.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::store::Fence;

/// Most attempts for one pull (store or worker failing).
const MAX_ATTEMPTS: u32 = 10;

/// A thread of a session.
pub(crate) type Key = (Arc<str>, Arc<str>);

/// Where a pull goes and under which pin its writes are fenced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Source {
    /// The worker holding the change.
    pub backend: String,
    /// Its process, when known: a pull never reads another process.
    pub instance: Option<Arc<str>>,
    /// The pin the change was made under.
    pub fence: Fence,
}

/// One announced change: `thread` of `session` reached `seq` on `source`.
#[derive(Debug, Clone)]
pub(crate) struct Hint {
    pub session: Arc<str>,
    pub thread: Arc<str>,
    pub seq: u64,
    pub source: Source,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pull {
    /// Nothing to do now (stored, failed for good, or lost).
    Idle,
    /// In the queue.
    Queued,
    /// Being pulled; `again` when a newer hint came meanwhile.
    Busy { again: bool },
}

#[derive(Debug)]
struct Record {
    acked: u64,
    source: Source,
    pull: Pull,
    attempts: u32,
    /// The process that held the unstored turns is gone for sure.
    lost: bool,
    /// When a move first found this thread's acknowledged turns missing.
    missing_since: Option<Instant>,
    /// The ledger's generation when this record was last announced.
    noted: u64,
    /// The highest seq announced by responses already delivered (async
    /// checkpoints, the change feed).
    acked_delivered: u64,
    /// Seqs of synchronous captures whose responses wait for them: not
    /// acknowledged unless their capture keeps them.
    claims: Vec<u64>,
}

/// What a move needs to know about one thread.
#[derive(Debug, Clone)]
pub(crate) struct Pending {
    pub thread: Arc<str>,
    pub acked: u64,
    pub source: Source,
    pub lost: bool,
}

/// How a pull ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pulled {
    /// The store holds the thread up to this seq.
    Head(u64),
    /// The outage buffer holds it up to this seq: the record stays until
    /// the buffer is flushed into the store.
    Buffered,
    /// The write was refused: the session moved on; nothing left to do.
    Fenced,
    /// The holder's process is gone (restarted, or forgot the thread).
    Lost,
    /// It failed; `retry` when it may be tried again.
    Failed,
}

#[derive(Debug, Default)]
struct Inner {
    records: HashMap<Key, Record>,
    order: VecDeque<Key>,
    /// Counts announcements: a move settles only what it has seen.
    generation: u64,
}

/// The bounded ledger.
#[derive(Debug)]
pub(crate) struct CaptureQueue {
    inner: Mutex<Inner>,
    ready: Notify,
    /// Woken whenever a pull ends (a move waits for running pulls).
    settled: Notify,
    cap: usize,
}

impl CaptureQueue {
    /// A ledger of at most `cap` threads.
    pub(crate) fn new(cap: usize) -> CaptureQueue {
        CaptureQueue {
            inner: Mutex::new(Inner::default()),
            ready: Notify::new(),
            settled: Notify::new(),
            cap: cap.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records an announced change and queues its pull. When the ledger is
    /// full a record is dropped to make room: its session is returned, so
    /// its client can be told its history may be partial.
    pub(crate) fn push(&self, hint: Hint) -> Option<Arc<str>> {
        self.record(hint, false)
    }

    /// Like [`CaptureQueue::push`], for a synchronous capture whose
    /// response waits: the claim counts as acknowledged only once kept
    /// (see [`CaptureQueue::withdraw`]).
    pub(crate) fn claim(&self, hint: Hint) -> Option<Arc<str>> {
        self.record(hint, true)
    }

    fn record(&self, hint: Hint, claim: bool) -> Option<Arc<str>> {
        let key: Key = (hint.session, hint.thread);
        let mut dropped = None;
        {
            let mut q = self.lock();
            if !q.records.contains_key(&key) && q.records.len() >= self.cap {
                dropped = q.evict();
            }
            let q = &mut *q;
            q.generation += 1;
            let generation = q.generation;
            let rec = q.records.entry(key.clone()).or_insert(Record {
                acked: 0,
                source: hint.source.clone(),
                pull: Pull::Idle,
                attempts: 0,
                lost: false,
                missing_since: None,
                noted: generation,
                acked_delivered: 0,
                claims: Vec::new(),
            });
            rec.noted = generation;
            if claim {
                rec.claims.push(hint.seq);
            } else {
                rec.acked_delivered = rec.acked_delivered.max(hint.seq);
            }
            if hint.seq >= rec.acked || rec.source.backend != hint.source.backend {
                // The newest announcement says where the thread lives now.
                rec.source = hint.source;
                rec.lost = false;
            }
            rec.acked = rec.acked.max(hint.seq);
            match rec.pull {
                Pull::Idle => {
                    rec.pull = Pull::Queued;
                    rec.attempts = 0;
                    q.order.push_back(key);
                }
                Pull::Queued => {}
                Pull::Busy { .. } => rec.pull = Pull::Busy { again: true },
            }
        }
        self.ready.notify_one();
        dropped
    }

    /// Queues a failed pull again (after its back-off), unless something
    /// else already did or it has failed too often.
    pub(crate) fn retry(&self, key: &Key) {
        {
            let mut q = self.lock();
            let q = &mut *q;
            let Some(rec) = q.records.get_mut(key) else {
                return;
            };
            if rec.pull != Pull::Idle || rec.attempts >= MAX_ATTEMPTS {
                return;
            }
            rec.pull = Pull::Queued;
            q.order.push_back(key.clone());
        }
        self.ready.notify_one();
    }

    /// Takes the oldest queued thread, waiting for one; call
    /// [`CaptureQueue::done`] when its pull ends.
    pub(crate) async fn pop(&self) -> (Key, Source, u32) {
        loop {
            let notified = self.ready.notified();
            if let Some(taken) = self.take_front() {
                return taken;
            }
            notified.await;
        }
    }

    fn take_front(&self) -> Option<(Key, Source, u32)> {
        let mut q = self.lock();
        let q = &mut *q;
        while let Some(key) = q.order.pop_front() {
            if let Some(rec) = q.records.get_mut(&key) {
                if rec.pull == Pull::Queued {
                    rec.pull = Pull::Busy { again: false };
                    return Some((key, rec.source.clone(), rec.attempts));
                }
            }
        }
        None
    }

    /// Ends a pull; returns the back-off before a retry when it failed
    /// and may be tried again.
    pub(crate) fn done(&self, key: &Key, pulled: Pulled) -> Option<Duration> {
        let mut retry = None;
        {
            let mut q = self.lock();
            let q = &mut *q;
            if let Some(rec) = q.records.get_mut(key) {
                let again = matches!(rec.pull, Pull::Busy { again: true });
                rec.pull = Pull::Idle;
                match pulled {
                    Pulled::Head(head) if head >= rec.acked && !again => {
                        q.records.remove(key);
                    }
                    Pulled::Fenced if !again => {
                        q.records.remove(key);
                    }
                    Pulled::Head(_) | Pulled::Fenced | Pulled::Buffered => {}
                    Pulled::Lost => rec.lost = true,
                    Pulled::Failed => {
                        rec.attempts += 1;
                        if rec.attempts < MAX_ATTEMPTS {
                            retry = Some(backoff(rec.attempts));
                        }
                    }
                }
                if again {
                    if let Some(rec) = q.records.get_mut(key) {
                        rec.pull = Pull::Queued;
                        q.order.push_back(key.clone());
                    }
                }
            }
        }
        self.ready.notify_one();
        self.settled.notify_waiters();
        retry
    }

    /// For a synchronous capture: takes `key`'s pull (marking it running)
    /// unless it is stored already or another task runs it.
    pub(crate) fn take(&self, key: &Key) -> Take {
        let mut q = self.lock();
        match q.records.get_mut(key) {
            None => Take::Stored,
            Some(rec) => match rec.pull {
                Pull::Busy { .. } => Take::Running,
                Pull::Queued | Pull::Idle => {
                    rec.pull = Pull::Busy { again: false };
                    Take::Taken(rec.source.clone())
                }
            },
        }
    }

    /// A synchronous capture ended: its response is delivered (`kept`) or
    /// not. A claim not kept was never acknowledged: what the record says
    /// was acknowledged falls back to the other claims and what delivered
    /// responses announced.
    pub(crate) fn settle_claim(&self, key: &Key, seq: u64, kept: bool) {
        let mut q = self.lock();
        let Some(rec) = q.records.get_mut(key) else {
            return;
        };
        if let Some(i) = rec.claims.iter().position(|&c| c == seq) {
            rec.claims.swap_remove(i);
        }
        if kept {
            rec.acked_delivered = rec.acked_delivered.max(seq);
            return;
        }
        let still = rec
            .claims
            .iter()
            .copied()
            .max()
            .unwrap_or(0)
            .max(rec.acked_delivered);
        rec.acked = still;
        if still == 0 && rec.pull == Pull::Idle {
            q.records.remove(key);
        }
    }

    /// Drops the record of `key` (its turns were refused for good).
    pub(crate) fn forget(&self, key: &Key) {
        let mut q = self.lock();
        if q.records.get(key).is_some_and(|r| r.pull == Pull::Idle) {
            q.records.remove(key);
        }
    }

    /// The store now holds `key` up to `head` (a flushed buffer write):
    /// the record goes when that covers what was acknowledged.
    pub(crate) fn stored(&self, key: &Key, head: u64) {
        let mut q = self.lock();
        if let Some(rec) = q.records.get(key) {
            if rec.pull == Pull::Idle && head >= rec.acked {
                q.records.remove(key);
            }
        }
    }

    /// For a move: takes the session's queued pulls (marking them running:
    /// the caller pulls them and calls `done`) and lists every record.
    /// `running` is how many pulls other tasks are running for it.
    pub(crate) fn take_session(&self, session: &str) -> SessionPulls {
        let mut q = self.lock();
        let mut out = SessionPulls::default();
        for (key, rec) in q.records.iter_mut() {
            if &*key.0 != session {
                continue;
            }
            match rec.pull {
                Pull::Queued => {
                    rec.pull = Pull::Busy { again: false };
                    out.taken.push((key.clone(), rec.source.clone()));
                }
                Pull::Busy { .. } => out.running += 1,
                Pull::Idle => out.idle.push((key.clone(), rec.source.clone())),
            }
        }
        out
    }

    /// Takes every queued pull (marking it running): a graceful stop runs
    /// them itself.
    pub(crate) fn take_all(&self) -> Vec<(Key, Source)> {
        let mut q = self.lock();
        let q = &mut *q;
        q.order.clear();
        // Queued ones, and idle ones waiting for a retry (not the lost).
        q.records
            .iter_mut()
            .filter(|(_, r)| r.pull == Pull::Queued || (r.pull == Pull::Idle && !r.lost))
            .map(|(k, r)| {
                r.pull = Pull::Busy { again: false };
                (k.clone(), r.source.clone())
            })
            .collect()
    }

    /// Whether the ledger holds no record at all.
    pub(crate) fn is_clear(&self) -> bool {
        self.lock().records.is_empty()
    }

    /// Whether any pull is running.
    pub(crate) fn running_any(&self) -> bool {
        self.lock()
            .records
            .values()
            .any(|r| matches!(r.pull, Pull::Busy { .. }))
    }

    /// Pulls other tasks are running for `session`.
    pub(crate) fn running(&self, session: &str) -> usize {
        self.lock()
            .records
            .iter()
            .filter(|(k, r)| &*k.0 == session && matches!(r.pull, Pull::Busy { .. }))
            .count()
    }

    /// Waits until some pull ends (bounded by the caller).
    pub(crate) async fn settled(&self) {
        self.settled.notified().await;
    }

    /// The highest seq acknowledged for a thread not known stored yet.
    pub(crate) fn acked(&self, key: &Key) -> Option<u64> {
        self.lock().records.get(key).map(|r| r.acked)
    }

    /// What was acknowledged for `session` and is not known stored yet.
    pub(crate) fn pending(&self, session: &str) -> Vec<Pending> {
        self.lock()
            .records
            .iter()
            .filter(|(k, _)| &*k.0 == session)
            .map(|(k, r)| Pending {
                thread: k.1.clone(),
                acked: r.acked,
                source: r.source.clone(),
                lost: r.lost,
            })
            .collect()
    }

    /// Notes that a move found these threads' acknowledged turns missing;
    /// returns since when the earliest of them has been missing.
    pub(crate) fn missing_since(
        &self,
        session: &str,
        threads: &[Arc<str>],
        now: Instant,
    ) -> Instant {
        let mut q = self.lock();
        let mut earliest = now;
        for t in threads {
            let key: Key = (Arc::from(session), t.clone());
            if let Some(r) = q.records.get_mut(&key) {
                earliest = earliest.min(*r.missing_since.get_or_insert(now));
            }
        }
        earliest
    }

    /// The current generation (a move reads it when it checks).
    pub(crate) fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// After a move: what was acknowledged for `session` up to the
    /// generation the move checked is now either stored or reported
    /// missing; forget it (not what was announced since).
    pub(crate) fn settle_session(&self, session: &str, upto: u64) {
        self.lock().records.retain(|k, r| {
            &*k.0 != session || matches!(r.pull, Pull::Busy { .. }) || r.noted > upto
        });
    }

    /// Threads with a pull waiting or running.
    pub(crate) fn len(&self) -> usize {
        self.lock()
            .records
            .values()
            .filter(|r| r.pull != Pull::Idle)
            .count()
    }
}

impl Inner {
    /// Makes room: drops a record that no pull is waiting for (lost, or
    /// out of retries) first, else the oldest queued thread; returns the
    /// session it belonged to.
    fn evict(&mut self) -> Option<Arc<str>> {
        let idle = self
            .records
            .iter()
            .find(|(_, r)| r.pull == Pull::Idle)
            .map(|(k, _)| k.clone());
        if let Some(k) = idle {
            self.records.remove(&k);
            return Some(k.0);
        }
        while let Some(key) = self.order.pop_front() {
            if self
                .records
                .get(&key)
                .is_some_and(|r| r.pull == Pull::Queued)
            {
                self.records.remove(&key);
                return Some(key.0);
            }
        }
        None
    }
}

/// What [`CaptureQueue::take`] found.
#[derive(Debug)]
pub(crate) enum Take {
    /// No record: what was announced is stored.
    Stored,
    /// Taken: pull it, then call `done`.
    Taken(Source),
    /// Another task is pulling it now.
    Running,
}

/// A move's view of its session's pulls.
#[derive(Debug, Default)]
pub(crate) struct SessionPulls {
    /// Queued pulls the move now runs itself.
    pub taken: Vec<(Key, Source)>,
    /// Records with no pull queued (failed, lost, or pulled short).
    pub idle: Vec<(Key, Source)>,
    /// Pulls other tasks are running.
    pub running: usize,
}

/// Most threads one `Tether-Checkpoint` may announce (more are ignored: a
/// response changes a few threads, and the ledger is shared by everyone).
const MAX_CHECKPOINT_ITEMS: usize = 64;

/// Parses `Tether-Checkpoint: t1;seq=4, t2;seq=9` into (thread, seq).
/// Malformed items are skipped (a worker bug must not fail the response).
pub(crate) fn parse_checkpoint(value: &str) -> Vec<(String, u64)> {
    value
        .split(',')
        .take(MAX_CHECKPOINT_ITEMS)
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
pub(crate) fn entries_with_seq(
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
pub(crate) fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(200u64.saturating_mul(1 << attempt.min(6))).min(Duration::from_secs(10))
}

#[cfg(test)]
mod tests;
