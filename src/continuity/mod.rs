//! State continuity: capturing what workers announce into the store, and
//! what a move needs from it. [`Continuity`] is the handle the proxy, the
//! move ([`crate::restore`]) and the background tasks share; it owns the
//! store link, the capture ledger, the outage buffer, the re-pin overrides,
//! the per-session flights, the session writer and the contract client.
//!
//! ```text
//! response with Tether-Checkpoint ─┐
//! worker change feed (long poll) ──┴─▶ capture ledger (per thread, bounded)
//!        ──▶ GET {state.path}/threads/T?after=stored   (same worker process)
//!        ──▶ fenced append ──▶ store            (store down: outage buffer)
//! ```

mod buffer;
pub(crate) mod capture;
pub(crate) mod contract;
mod link;
pub(crate) mod overrides;
mod tasks;
pub(crate) mod writer;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::affinity::sessions::Sessions;
use crate::affinity::SessionId;
use crate::backends::{Backend, WorkerSet};
use crate::clock::SharedClock;
use crate::live::{Live, SharedLive};
use crate::metrics::{ContinuityGauges, Metrics};
use crate::restore::recent::RecentMoves;
use crate::store::{Appended, Fence, SessionRow, StoreError, ThreadWrite};
use buffer::{Buffered, OutageBuffer};
use capture::{CaptureQueue, Hint, Key, Pulled, Source, Take};
use contract::{Contract, ContractError, Export, Exported};
use overrides::{Override, Overrides};
use writer::SessionWriter;

pub(crate) use link::StoreLink;
pub(crate) use link::StoreState;

/// The continuity handle; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Continuity(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    link: StoreLink,
    flights: Flights,
    overrides: Overrides,
    capture: CaptureQueue,
    in_flight: Arc<InFlight>,
    buffer: OutageBuffer,
    /// One flush of the outage buffer at a time: a move that flushes its
    /// session's captures waits for a flush that already took them.
    flushing: tokio::sync::Mutex<()>,
    writer: SessionWriter,
    contract: Contract,
    workers: WorkerSet,
    live: SharedLive,
    metrics: Arc<Metrics>,
    clock: SharedClock,
    /// The recent moves, for the admin API.
    recent: RecentMoves,
}

impl Continuity {
    /// The handle, with bounds from the current config.
    pub(crate) fn new(
        live: SharedLive,
        workers: WorkerSet,
        contract: Contract,
        metrics: Arc<Metrics>,
        clock: SharedClock,
    ) -> Continuity {
        let config = live.load().config.clone();
        let (state, limits) = (&config.state, &config.limits);
        Continuity(Arc::new(Inner {
            link: StoreLink::default(),
            flights: Flights::default(),
            // Moves are rarer than sessions: newer pins for a tenth of them
            // (at most 100 000), debts and unfinished moves kept first.
            overrides: Overrides::new((limits.max_sessions / 10).clamp(1_000, 100_000)),
            capture: CaptureQueue::new(state.queue),
            in_flight: Arc::default(),
            buffer: OutageBuffer::new(state.buffer_bytes),
            flushing: tokio::sync::Mutex::new(()),
            writer: SessionWriter::new(state.queue),
            contract,
            workers,
            live,
            metrics,
            clock,
            recent: RecentMoves::new(config.admin.recent_moves),
        }))
    }

    /// Connects the store and starts the background tasks under `cancel`.
    pub(crate) async fn start(&self, sessions: Sessions, cancel: CancellationToken) {
        tasks::start(self.clone(), sessions, cancel).await;
    }

    /// On a graceful stop, after the last request: pulls every queued
    /// capture now and flushes the outage buffer, so turns answered during
    /// the grace period reach the store. Whether everything was stored.
    pub(crate) async fn finish(&self, deadline: Instant) -> bool {
        let ledger = &self.0.capture;
        for (key, source) in ledger.take_all() {
            let pulled = self.pull(&key, &source, deadline).await;
            ledger.done(&key, pulled);
        }
        while ledger.running_any() && Instant::now() < deadline {
            let _ = tokio::time::timeout_at(deadline, ledger.settled()).await;
        }
        let flushed = self.flush(None, deadline).await;
        flushed && ledger.is_clear()
    }

    // === what the proxy calls ===

    /// A response announced changed threads (`Tether-Checkpoint`): record
    /// them as acknowledged and queue their capture.
    pub(crate) fn checkpoint(&self, session: SessionId, value: &str, source: &Source) {
        let session: Arc<str> = Arc::from(session.to_hex());
        for (thread, seq) in capture::parse_checkpoint(value) {
            self.note(Hint {
                session: session.clone(),
                thread: Arc::from(thread),
                seq,
                source: source.clone(),
            });
        }
    }

    /// `state.capture = "sync"`: records the announced changes and pulls
    /// them into the store (or the outage buffer) before returning; whether
    /// every one of them is kept. Until `deadline`. Runs as its own task: a
    /// client that goes away cannot leave a pull half-done.
    pub(crate) async fn checkpoint_now(
        &self,
        session: SessionId,
        value: &str,
        source: &Source,
        deadline: Instant,
    ) -> bool {
        let (c, value, source) = (self.clone(), value.to_owned(), source.clone());
        let task =
            tokio::spawn(async move { c.capture_now(session, &value, &source, deadline).await });
        task.await.unwrap_or(false)
    }

    async fn capture_now(
        &self,
        session: SessionId,
        value: &str,
        source: &Source,
        deadline: Instant,
    ) -> bool {
        let id: Arc<str> = Arc::from(session.to_hex());
        let ledger = &self.0.capture;
        let mut keys = Vec::new();
        for (thread, seq) in capture::parse_checkpoint(value) {
            let thread: Arc<str> = Arc::from(thread);
            keys.push(((id.clone(), thread.clone()), seq));
            let hint = Hint {
                session: id.clone(),
                thread,
                seq,
                source: source.clone(),
            };
            if let Some(victim) = ledger.claim(hint) {
                self.0.metrics.capture_dropped();
                if let Some(v) = SessionId::from_hex(&victim) {
                    self.0.overrides.owe_partial(v);
                }
            }
        }
        let mut kept = true;
        for (key, seq) in &keys {
            loop {
                match ledger.take(key) {
                    Take::Stored => break,
                    Take::Taken(src) => {
                        let pulled = self.pull(key, &src, deadline).await;
                        ledger.done(key, pulled);
                        kept &= matches!(pulled, Pulled::Head(h) if h >= *seq)
                            || pulled == Pulled::Buffered;
                        break;
                    }
                    Take::Running => {
                        // A puller has it: wait for that pull, then look
                        // again (it may not have covered this seq).
                        let settled = ledger.settled();
                        if tokio::time::timeout_at(deadline, settled).await.is_err() {
                            kept = false;
                            break;
                        }
                    }
                }
            }
        }
        // Not kept: the response is not delivered, so its turns were never
        // acknowledged.
        for (key, seq) in &keys {
            ledger.settle_claim(key, *seq, kept);
        }
        kept
    }

    /// Records an announced change and queues its capture.
    fn note(&self, hint: Hint) {
        if let Some(victim) = self.0.capture.push(hint) {
            // The ledger was full: a record of unstored acknowledged turns
            // was dropped. Its client is told, not left unaware.
            self.0.metrics.capture_dropped();
            if let Some(id) = SessionId::from_hex(&victim) {
                self.0.overrides.owe_partial(id);
            }
        }
    }

    /// Counts a request of `session` in flight to a worker until the guard
    /// drops: a move waits for it (a turn may be on its way).
    pub(crate) fn in_flight(&self, session: SessionId) -> InFlightGuard {
        self.0.in_flight.enter(session)
    }

    /// A newer pin of `session` that this replica knows about.
    pub(crate) fn newer_pin(&self, session: SessionId) -> Option<Override> {
        self.0.overrides.get(session)
    }

    /// `session` was forwarded to `backend` under `epoch` without its
    /// history (`on_restore_failure = "continue"`): its next request
    /// tries the restore again.
    pub(crate) fn unrestored(&self, session: SessionId, epoch: u64, backend: &str) {
        self.0.overrides.offer(
            session,
            Override {
                epoch,
                backend: backend.to_owned(),
                instance: String::new(),
                restored: false,
                partial: false,
            },
        );
    }

    /// A 2xx response told the client its history is partial.
    pub(crate) fn partial_reported(&self, session: SessionId) {
        self.0.overrides.partial_reported(session);
    }

    /// Queues a session row for the store; counts a drop when full.
    pub(crate) fn remember(&self, row: SessionRow) {
        if !self.0.writer.push(row) {
            self.0.metrics.store_writes_dropped(1);
        }
    }

    /// The stored pin of a session (a request key another replica pinned).
    pub(crate) async fn stored_pin(
        &self,
        session: &str,
        deadline: Instant,
    ) -> Result<Option<SessionRow>, StoreError> {
        let store = self.0.link.get()?;
        self.0.link.call(deadline, store.session(session)).await
    }

    /// The store's state.
    pub(crate) fn store_state(&self) -> StoreState {
        self.0.link.state()
    }

    /// The store's kind (`postgres`, `sqlite`), once connected.
    pub(crate) fn store_kind(&self) -> Option<&'static str> {
        self.0.link.get().ok().map(|s| s.kind())
    }

    /// The scrape-time gauges.
    pub(crate) fn gauges(&self) -> ContinuityGauges {
        let (buffered, buffered_bytes) = self.0.buffer.usage();
        ContinuityGauges {
            capture_queue: self.0.capture.len(),
            store_up: self.store_state() == StoreState::Connected,
            buffered,
            buffered_bytes,
        }
    }

    // === what the move uses ===

    pub(crate) fn link(&self) -> &StoreLink {
        &self.0.link
    }

    pub(crate) fn ledger(&self) -> &CaptureQueue {
        &self.0.capture
    }

    pub(crate) fn contract(&self) -> &Contract {
        &self.0.contract
    }

    pub(crate) fn overrides(&self) -> &Overrides {
        &self.0.overrides
    }

    pub(crate) fn flight(&self, session: SessionId) -> Arc<tokio::sync::Mutex<()>> {
        self.0.flights.lock_for(session)
    }

    /// Requests of `session` in flight to a worker now.
    pub(crate) fn requests_in_flight(&self, session: SessionId) -> u32 {
        self.0.in_flight.count(session)
    }

    /// Resolves when some request's guard drops (bounded by the caller;
    /// enable it before checking the count).
    pub(crate) fn request_settled(&self) -> tokio::sync::futures::Notified<'_> {
        self.0.in_flight.settled.notified()
    }

    /// The recent moves (bounded ring, newest first).
    pub(crate) fn recent_moves(&self) -> &RecentMoves {
        &self.0.recent
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    pub(crate) fn now_unix(&self) -> u64 {
        self.0.clock.now_unix()
    }

    // === capture ===

    /// Pulls what `source` holds of a thread beyond the store's head and
    /// writes it, fenced; into the outage buffer when the store is down.
    pub(crate) async fn pull(&self, key: &Key, source: &Source, deadline: Instant) -> Pulled {
        let m = &self.0.metrics;
        let pulled = self.try_pull(key, source, deadline).await;
        match &pulled {
            Ok(Pulled::Head(_)) => m.capture("ok"),
            Ok(Pulled::Fenced) => m.capture_fenced(),
            Ok(Pulled::Lost) => m.capture("lost"),
            Ok(Pulled::Failed) => m.capture("buffer_full"),
            Ok(Pulled::Buffered) => {}
            Err(e) => {
                m.capture("error");
                tracing::debug!(session = %key.0, thread = %key.1, backend = %source.backend, error = %crate::proxy::error::chain(e), "capture failed");
            }
        }
        pulled.unwrap_or(Pulled::Failed)
    }

    async fn try_pull(
        &self,
        key: &Key,
        source: &Source,
        deadline: Instant,
    ) -> Result<Pulled, CaptureError> {
        let live = self.0.live.load_full();
        let link = &self.0.link;
        // A degraded store is not waited on: the pull must reach the worker
        // while it still answers, and its result waits in the buffer.
        let head = match link.get() {
            Ok(store) if link.state() == StoreState::Connected => {
                let now = Instant::now();
                let until = now + deadline.saturating_duration_since(now) / 3;
                link.call(until, store.thread_head(&key.0, &key.1)).await
            }
            Ok(_) => Err(crate::store::StoreError::Unavailable),
            Err(e) => Err(e),
        };
        let stored = match head {
            Ok(head) => {
                self.0.buffer.note_head(key, head.seq);
                head.seq
            }
            // Ask for what is new since the last head we know (or the
            // whole thread; the store ignores duplicates).
            Err(_) => self.0.buffer.known_head(key).unwrap_or(0),
        };
        if self.0.capture.acked(key).is_some_and(|a| a <= stored) {
            // Already stored (by an earlier pull of a coalesced hint).
            return Ok(Pulled::Head(stored));
        }
        let workers = self.0.workers.load();
        let Some(backend) = workers.get(&source.backend).cloned() else {
            // The worker was removed: what only it held is gone.
            return Ok(Pulled::Lost);
        };
        drop(workers);
        // One entry more than needed: the new entries build on the worker's
        // entry at the stored head, which the store must hold the same.
        let export = match self
            .export(
                &backend,
                &live,
                source,
                key,
                stored.saturating_sub(1),
                deadline,
            )
            .await?
        {
            Some(export) => export,
            None => return Ok(Pulled::Lost),
        };
        let entries = capture::entries_with_seq(&export.entries).ok_or(CaptureError::NoSeq)?;
        let base = match entries.iter().find(|(s, _)| *s == stored) {
            Some((s, body)) => Some((*s, body.clone())),
            None if stored == 0 => None,
            // The worker holds less than the store: its thread diverged.
            None => {
                return self
                    .rebase(key, source, &backend, &live, true, deadline)
                    .await
            }
        };
        let entries: Vec<(u64, String)> =
            entries.into_iter().filter(|(s, _)| *s > stored).collect();
        let write = ThreadWrite {
            session_id: key.0.to_string(),
            thread_id: key.1.to_string(),
            entries,
            base,
            state: export.state.map(|s| s.get().to_owned()),
            state_seq: export.seq,
            now: self.0.clock.now_unix(),
        };
        let before = stored;
        match self.write(key, &write, source, deadline).await? {
            Written::Stored(head) => {
                self.0.metrics.captured_entries(head.saturating_sub(before));
                self.0.buffer.note_head(key, head);
                Ok(Pulled::Head(head))
            }
            Written::Fenced => {
                // The session moved on. If the worker it left holds turns a
                // client saw acknowledged beyond the store, they are refused
                // for good: the client must be told its history is partial.
                let acked = self.0.capture.acked(key).unwrap_or(0);
                if !write.entries.is_empty() && acked > before {
                    tracing::warn!(session = %key.0, thread = %key.1, from = %source.backend, acknowledged = acked, stored = before, "acknowledged turns refused by the fence: the session moved on without them");
                    if let Some(id) = SessionId::from_hex(&key.0) {
                        self.0.overrides.owe_partial(id);
                    }
                }
                Ok(Pulled::Fenced)
            }
            Written::Buffered => {
                self.0.metrics.capture("buffered");
                Ok(Pulled::Buffered)
            }
            Written::Dropped => Ok(Pulled::Failed),
            // The worker kept (or made) its own copy of the thread: the
            // store follows it instead of splicing two histories.
            Written::Diverged => {
                self.rebase(key, source, &backend, &live, true, deadline)
                    .await
            }
        }
    }

    /// `GET …/threads/T?after=N` from the process that holds the change;
    /// `None` when that process is gone or forgot the thread.
    async fn export(
        &self,
        backend: &Backend,
        live: &Live,
        source: &Source,
        key: &Key,
        after: u64,
        deadline: Instant,
    ) -> Result<Option<Export>, CaptureError> {
        let expect = source.instance.as_deref();
        match self
            .0
            .contract
            .export(backend, live, expect, &key.0, &key.1, after, deadline)
            .await
        {
            Ok(Exported::Thread(e)) => Ok(Some(e)),
            Ok(Exported::NotFound) | Err(ContractError::InstanceChanged { .. }) => Ok(None),
            // Nothing listens there: the process that held the thread is
            // gone, so waiting for it would only delay the verdict.
            Err(ContractError::Unreachable { source, .. }) if source.no_listener() => Ok(None),
            Err(e) => Err(CaptureError::Contract(e)),
        }
    }

    /// The worker's thread diverges from the stored one (it kept its own
    /// copy over a restore, or lost entries): the stored thread becomes the
    /// worker's whole copy, since that is what its user sees. With `owe`,
    /// the client is told its history is partial (what the store held
    /// beyond the worker's copy is gone).
    pub(crate) async fn rebase(
        &self,
        key: &Key,
        source: &Source,
        backend: &Backend,
        live: &Live,
        owe: bool,
        deadline: Instant,
    ) -> Result<Pulled, CaptureError> {
        let link = &self.0.link;
        if link.state() != StoreState::Connected {
            // Retried once the store answers.
            return Ok(Pulled::Failed);
        }
        let Some(export) = self.export(backend, live, source, key, 0, deadline).await? else {
            return Ok(Pulled::Lost);
        };
        let entries = capture::entries_with_seq(&export.entries).ok_or(CaptureError::NoSeq)?;
        let write = ThreadWrite {
            session_id: key.0.to_string(),
            thread_id: key.1.to_string(),
            entries,
            base: None,
            state: export.state.map(|s| s.get().to_owned()),
            state_seq: export.seq,
            now: self.0.clock.now_unix(),
        };
        let store = link.get().map_err(CaptureError::Store)?;
        let seed = self.seed(&key.0, source);
        let written = link
            .call(deadline, store.replace_thread(&write, &source.fence, &seed))
            .await
            .map_err(CaptureError::Store)?;
        match written {
            Appended::Head(head) => {
                self.0.metrics.capture("rebased");
                self.0.buffer.note_head(key, head);
                tracing::warn!(session = %key.0, thread = %key.1, backend = %source.backend, head, "worker's thread diverged from the stored one: the store follows the worker's copy");
                if owe {
                    if let Some(id) = SessionId::from_hex(&key.0) {
                        self.0.overrides.owe_partial(id);
                    }
                }
                Ok(Pulled::Head(head))
            }
            Appended::Fenced { .. } => Ok(Pulled::Fenced),
            Appended::Diverged => Ok(Pulled::Failed),
        }
    }

    /// Writes a capture, fenced; keeps it for later when the store is down.
    async fn write(
        &self,
        key: &Key,
        write: &ThreadWrite,
        source: &Source,
        deadline: Instant,
    ) -> Result<Written, CaptureError> {
        let link = &self.0.link;
        let result = match link.get() {
            Ok(store) if link.state() == StoreState::Connected => {
                let seed = self.seed(&key.0, source);
                link.call(deadline, store.append(write, &source.fence, &seed))
                    .await
            }
            Ok(_) => Err(crate::store::StoreError::Unavailable),
            Err(e) => Err(e),
        };
        match result {
            Ok(Appended::Head(h)) => Ok(Written::Stored(h)),
            Ok(Appended::Diverged) => Ok(Written::Diverged),
            Ok(Appended::Fenced { epoch, backend }) => {
                tracing::info!(session = %key.0, thread = %key.1, from = %source.backend, now_on = %backend, epoch, "capture refused: the session moved on");
                Ok(Written::Fenced)
            }
            Err(e) => {
                let item = Buffered {
                    key: key.clone(),
                    write: write.clone(),
                    source: source.clone(),
                };
                match self.0.buffer.push(item) {
                    Ok(()) => {
                        tracing::debug!(session = %key.0, thread = %key.1, error = %e, "store down: capture buffered");
                        Ok(Written::Buffered)
                    }
                    Err(buffer::Full) => {
                        self.0.metrics.buffer_dropped();
                        tracing::warn!(session = %key.0, thread = %key.1, error = %e, "store down and capture buffer full: capture dropped");
                        Ok(Written::Dropped)
                    }
                }
            }
        }
    }

    /// The session row a capture inserts when the store has none yet.
    fn seed(&self, session: &str, source: &Source) -> SessionRow {
        let now = self.0.clock.now_unix();
        let ttl = self.0.live.load().lifetimes.ttl.as_secs();
        SessionRow {
            session_id: session.to_owned(),
            backend_id: source.backend.clone(),
            instance: source.instance.as_deref().unwrap_or("").to_owned(),
            epoch: match source.fence {
                Fence::Epoch(e) => e,
                Fence::Holder(_) => 0,
            },
            created_at: now,
            last_seen: now,
            expires_at: now + ttl,
        }
    }

    /// Writes buffered captures of `session` (all of them with `None`),
    /// oldest first, each under its own deadline (`state.restore_timeout`,
    /// within `deadline`); stops at the first store failure (what is left
    /// stays buffered). The whole buffer is flushed one capture at a time,
    /// so a move flushing its own session waits for one write, not for the
    /// backlog. Returns whether none of them is left.
    pub(crate) async fn flush(&self, session: Option<&str>, deadline: Instant) -> bool {
        let per_item = self.0.live.load().config.state.restore_timeout;
        loop {
            let Ok(one_flush) = tokio::time::timeout_at(deadline, self.0.flushing.lock()).await
            else {
                return false;
            };
            let mut items: std::collections::VecDeque<Buffered> = match session {
                Some(s) => self.0.buffer.take_session(s).into(),
                None => self.0.buffer.pop().into_iter().collect(),
            };
            if items.is_empty() {
                return true;
            }
            while let Some(item) = items.pop_front() {
                let until = deadline.min(Instant::now() + per_item);
                if let Err(e) = self.flush_one(&item, until).await {
                    tracing::debug!(error = %e, "store still down: captures stay buffered");
                    items.push_front(item);
                    for rest in items.into_iter().rev() {
                        self.0.buffer.unpop(rest);
                    }
                    return false;
                }
            }
            drop(one_flush);
            if session.is_some() {
                return true;
            }
        }
    }

    /// Writes one buffered capture, fenced.
    async fn flush_one(&self, item: &Buffered, until: Instant) -> Result<(), StoreError> {
        let store = self.0.link.get()?;
        let seed = self.seed(&item.key.0, &item.source);
        let written = self
            .0
            .link
            .call(until, store.append(&item.write, &item.source.fence, &seed))
            .await?;
        match written {
            Appended::Head(head) => {
                self.0.buffer.note_head(&item.key, head);
                self.0.capture.stored(&item.key, head);
            }
            Appended::Diverged => {
                // Written while the store was down on top of a thread the
                // worker no longer shares: pulled again (and the stored
                // thread rebased) now that the store answers.
                self.0.metrics.capture("diverged");
                self.0.capture.retry(&item.key);
            }
            Appended::Fenced { .. } => {
                // Turns a client saw acknowledged, refused for good.
                self.0.metrics.capture_fenced();
                tracing::warn!(session = %item.key.0, thread = %item.key.1, "buffered capture refused: the session moved on without it");
                self.0.capture.forget(&item.key);
                if let Some(id) = SessionId::from_hex(&item.key.0) {
                    self.0.overrides.owe_partial(id);
                }
            }
        }
        Ok(())
    }
}

/// What writing a capture came to.
enum Written {
    Stored(u64),
    Fenced,
    Buffered,
    Dropped,
    Diverged,
}

/// Why a capture pull failed (it is retried with back-off).
#[derive(Debug, thiserror::Error)]
pub(crate) enum CaptureError {
    /// The worker did not export the thread.
    #[error(transparent)]
    Contract(#[from] ContractError),
    /// The export had an entry without a `seq`.
    #[error("export entry without a seq")]
    NoSeq,
    /// The store failed while the stored thread was rebased.
    #[error(transparent)]
    Store(StoreError),
}

/// Requests in flight per session (sharded, bounded by the requests
/// themselves: an entry lives while a guard does).
#[derive(Debug, Default)]
struct InFlight {
    shards: [Mutex<HashMap<u128, u32>>; 16],
    settled: tokio::sync::Notify,
}

impl InFlight {
    fn shard(&self, id: SessionId) -> std::sync::MutexGuard<'_, HashMap<u128, u32>> {
        self.shards[(id.as_u128() as usize) % 16]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn enter(self: &Arc<Self>, id: SessionId) -> InFlightGuard {
        *self.shard(id).entry(id.as_u128()).or_insert(0) += 1;
        InFlightGuard {
            id,
            map: self.clone(),
        }
    }

    fn count(&self, id: SessionId) -> u32 {
        self.shard(id).get(&id.as_u128()).copied().unwrap_or(0)
    }
}

/// One request in flight; dropping it ends the count.
#[derive(Debug)]
pub(crate) struct InFlightGuard {
    id: SessionId,
    map: Arc<InFlight>,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        {
            let mut shard = self.map.shard(self.id);
            if let Some(n) = shard.get_mut(&self.id.as_u128()) {
                *n -= 1;
                if *n == 0 {
                    shard.remove(&self.id.as_u128());
                }
            }
        }
        self.map.settled.notify_waiters();
    }
}

/// Per-session locks: concurrent requests of one session wait for one
/// move. Entries are weak: a lock lives while someone holds it.
#[derive(Debug, Default)]
pub(crate) struct Flights(
    Mutex<HashMap<u128, Weak<tokio::sync::Mutex<()>>>>,
    /// The map size at which dead entries are swept next.
    std::sync::atomic::AtomicUsize,
);

impl Flights {
    fn lock_for(&self, id: SessionId) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = map.get(&id.as_u128()).and_then(Weak::upgrade) {
            return l;
        }
        let l = Arc::new(tokio::sync::Mutex::new(()));
        // Dead entries are swept when the map doubles, not on every insert
        // (a mass failover starts thousands of moves at once).
        if map.len() >= self.1.load(std::sync::atomic::Ordering::Relaxed) {
            map.retain(|_, w| w.strong_count() > 0);
            self.1.store(
                (map.len() * 2).max(64),
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        map.insert(id.as_u128(), Arc::downgrade(&l));
        l
    }
}
