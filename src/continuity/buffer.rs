//! The outage buffer: captures pulled while the store is unreachable wait
//! here, in order, bounded by `state.buffer_bytes`, until the store
//! returns; then they are written, oldest first and fenced like any
//! capture. A move flushes its session's captures first. The buffer lives in
//! memory only: a replica that restarts during an outage loses it.
//!
//! It also remembers the last stored head of recent threads, so a pull
//! during an outage asks only for what is new.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use super::capture::{Key, Source};
use crate::store::ThreadWrite;

/// Heads remembered for pulls during an outage.
const HEADS: usize = 65_536;

/// One capture waiting for the store.
#[derive(Debug, Clone)]
pub(crate) struct Buffered {
    pub key: Key,
    pub write: ThreadWrite,
    pub source: Source,
}

impl Buffered {
    fn bytes(&self) -> usize {
        self.write
            .entries
            .iter()
            .map(|(_, e)| e.len() + 8)
            .sum::<usize>()
            + self.write.state.as_ref().map_or(0, String::len)
            + self.key.0.len()
            + self.key.1.len()
            + 64
    }
}

#[derive(Debug, Default)]
struct Inner {
    items: VecDeque<(Buffered, usize)>,
    bytes: usize,
    heads: HashMap<Key, u64>,
}

/// The bounded buffer.
#[derive(Debug)]
pub(crate) struct OutageBuffer {
    inner: Mutex<Inner>,
    cap: usize,
}

/// The buffer was full: the capture was not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Full;

impl OutageBuffer {
    /// A buffer of at most `cap` bytes.
    pub(crate) fn new(cap: usize) -> OutageBuffer {
        OutageBuffer {
            inner: Mutex::new(Inner::default()),
            cap,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps a capture for later; refused when it does not fit (the older
    /// captures stay: a gap at the end is recoverable, one before is not).
    pub(crate) fn push(&self, item: Buffered) -> Result<(), Full> {
        let size = item.bytes();
        let mut b = self.lock();
        if b.bytes + size > self.cap {
            return Err(Full);
        }
        if let Some(&(seq, _)) = item.write.entries.last() {
            b.note(&item.key, seq);
        }
        b.bytes += size;
        b.items.push_back((item, size));
        Ok(())
    }

    /// The highest seq known stored or buffered for a thread.
    pub(crate) fn known_head(&self, key: &Key) -> Option<u64> {
        self.lock().heads.get(key).copied()
    }

    /// Remembers a thread's stored head.
    pub(crate) fn note_head(&self, key: &Key, head: u64) {
        self.lock().note(key, head);
    }

    /// The oldest capture, taken out (put it back with [`Self::unpop`] if
    /// the store fails again).
    pub(crate) fn pop(&self) -> Option<Buffered> {
        let mut b = self.lock();
        let (item, size) = b.items.pop_front()?;
        b.bytes -= size;
        Some(item)
    }

    /// Puts a capture back at the front.
    pub(crate) fn unpop(&self, item: Buffered) {
        let size = item.bytes();
        let mut b = self.lock();
        b.bytes += size;
        b.items.push_front((item, size));
    }

    /// Takes every capture of `session`, oldest first.
    pub(crate) fn take_session(&self, session: &str) -> Vec<Buffered> {
        let mut b = self.lock();
        let (mine, rest): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut b.items)
            .into_iter()
            .partition(|(i, _)| &*i.key.0 == session);
        b.items = rest;
        b.bytes -= mine.iter().map(|(_, s)| s).sum::<usize>();
        mine.into_iter().map(|(i, _)| i).collect()
    }

    /// Captures waiting, and their bytes.
    pub(crate) fn usage(&self) -> (usize, usize) {
        let b = self.lock();
        (b.items.len(), b.bytes)
    }
}

impl Inner {
    fn note(&mut self, key: &Key, head: u64) {
        if self.heads.len() >= HEADS && !self.heads.contains_key(key) {
            // Bounded: forget one; its next outage pull asks for the whole
            // thread (duplicates are ignored by the store).
            if let Some(k) = self.heads.keys().next().cloned() {
                self.heads.remove(&k);
            }
        }
        let h = self.heads.entry(key.clone()).or_insert(0);
        *h = (*h).max(head);
    }
}
