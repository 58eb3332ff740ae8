//! The background tasks of continuity, all under one cancellation token:
//! connecting the store, the store watch (ping, then flush the outage
//! buffer when it answers again), the session writer, the capture pullers,
//! one change-feed poller per worker, the re-pin listener (PostgreSQL
//! `LISTEN`) and the janitor (live-session sweep, expired rows).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::capture::{self, Hint, Source};
use super::contract::ContractError;
use super::overrides::Override;
use super::{Continuity, StoreState};
use crate::affinity::sessions::Sessions;
use crate::affinity::SessionId;
use crate::backends::Backend;
use crate::store::{self, Fence, Store};

/// Long-poll wait asked of workers.
const FEED_WAIT: Duration = Duration::from_secs(25);
/// Concurrent capture pulls.
const PULLERS: usize = 4;
/// How often the store is pinged (and the buffer flushed once it answers).
const WATCH_EVERY: Duration = Duration::from_secs(1);
/// The longest one round of flushing the outage buffer runs.
const FLUSH_ROUND: Duration = Duration::from_secs(60);
/// How often the janitor sweeps live sessions.
const SWEEP_EVERY: Duration = Duration::from_secs(30);
/// How often expired rows are deleted from the store (every n sweeps).
const EXPIRE_EVERY_SWEEPS: u32 = 20;

/// Starts every task. The store is tried once here (bounded by
/// `state.restore_timeout`) so a healthy start serves with its store from
/// the first request; an unreachable store is retried in the background
/// while pinned users are served.
pub(super) async fn start(c: Continuity, sessions: Sessions, cancel: CancellationToken) {
    let timeout = c.0.live.load().config.state.restore_timeout;
    let url = c.0.live.load().config.state.store.expose().to_owned();
    match tokio::time::timeout(timeout, store::connect(&url, timeout)).await {
        Ok(Ok(s)) => installed(&c, s, &cancel),
        Ok(Err(e)) => {
            tracing::error!(store = %store::redact(&url), error = %e, "store unavailable at start: retrying in the background");
            tokio::spawn(connect(c.clone(), cancel.clone()));
        }
        Err(_) => {
            tracing::error!(store = %store::redact(&url), "store did not answer at start: retrying in the background");
            tokio::spawn(connect(c.clone(), cancel.clone()));
        }
    }
    tokio::spawn(watch(c.clone(), cancel.clone()));
    tokio::spawn(write_sessions(c.clone(), cancel.clone()));
    for _ in 0..PULLERS {
        tokio::spawn(pull_loop(c.clone(), cancel.clone()));
    }
    tokio::spawn(feeds(c.clone(), cancel.clone()));
    tokio::spawn(janitor(c, sessions, cancel));
}

fn installed(c: &Continuity, store: Arc<dyn Store>, cancel: &CancellationToken) {
    tracing::info!(kind = store.kind(), "store connected");
    c.0.link.set(store.clone());
    if store.notifies() {
        tokio::spawn(listen(c.clone(), store, cancel.clone()));
    }
}

async fn connect(c: Continuity, cancel: CancellationToken) {
    let mut attempt = 0u32;
    loop {
        let state = c.0.live.load().config.state.clone();
        let url = state.store.expose();
        let timeout = state.restore_timeout;
        match tokio::time::timeout(timeout, store::connect(url, timeout)).await {
            Ok(Ok(s)) => return installed(&c, s, &cancel),
            Ok(Err(e)) => {
                tracing::error!(store = %store::redact(url), error = %e, "store unavailable")
            }
            Err(_) => tracing::error!(store = %store::redact(url), "store did not answer"),
        }
        let wait = capture::backoff(attempt).max(Duration::from_secs(1));
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Pings the store so its state is known even when nothing writes, and
/// flushes the outage buffer as soon as it answers.
async fn watch(c: Continuity, cancel: CancellationToken) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(WATCH_EVERY) => {}
        }
        let Ok(store) = c.0.link.get() else { continue };
        let was = c.0.link.state();
        let deadline = Instant::now() + c.0.live.load().config.state.restore_timeout;
        let answered = c.0.link.call(deadline, store.ping()).await.is_ok();
        if was == StoreState::Degraded && answered {
            tracing::info!("store answers again");
        } else if was == StoreState::Connected && !answered {
            tracing::warn!("store degraded: captures are buffered in memory until it answers");
        }
        // The backlog is written one capture at a time (moves interleave),
        // for at most a minute per watch round.
        let backlog = Instant::now() + FLUSH_ROUND;
        if answered && c.0.buffer.usage().0 > 0 && c.flush(None, backlog).await {
            tracing::info!("outage buffer flushed to the store");
        }
    }
}

async fn write_sessions(c: Continuity, cancel: CancellationToken) {
    let Some(mut rx) = c.0.writer.take_receiver() else {
        return;
    };
    loop {
        let batch = tokio::select! {
            _ = cancel.cancelled() => return,
            b = super::writer::next_batch(&mut rx, Duration::from_millis(50)) => b,
        };
        let Some(batch) = batch else { return };
        let rows = batch.len() as u64;
        let written = match c.0.link.get() {
            Ok(store) => {
                let deadline = Instant::now() + c.0.live.load().config.state.restore_timeout;
                c.0.link.call(deadline, store.touch_sessions(&batch)).await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            // Losing last-seen updates is harmless: the next touch rewrites.
            tracing::debug!(error = %e, rows, "session writes failed");
            c.0.metrics.store_writes_dropped(rows);
        }
    }
}

async fn pull_loop(c: Continuity, cancel: CancellationToken) {
    loop {
        let (key, source, _attempts) = tokio::select! {
            _ = cancel.cancelled() => return,
            t = c.0.capture.pop() => t,
        };
        let deadline = Instant::now() + c.0.live.load().config.state.restore_timeout;
        let pulled = c.pull(&key, &source, deadline).await;
        if let Some(wait) = c.0.capture.done(&key, pulled) {
            let c = c.clone();
            let cancel = cancel.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = tokio::time::sleep(wait) => c.0.capture.retry(&key),
                }
            });
        }
    }
}

/// Keeps one change-feed poller per worker, following reloads and
/// discovery.
async fn feeds(c: Continuity, cancel: CancellationToken) {
    let mut running: HashMap<usize, CancellationToken> = HashMap::new();
    loop {
        let current: HashMap<usize, Arc<Backend>> =
            c.0.workers
                .load()
                .all()
                .iter()
                .map(|b| (Arc::as_ptr(b) as usize, b.clone()))
                .collect();
        running.retain(|k, t| {
            let keep = current.contains_key(k);
            if !keep {
                t.cancel();
            }
            keep
        });
        for (k, b) in current {
            running.entry(k).or_insert_with(|| {
                let t = cancel.child_token();
                tokio::spawn(feed(c.clone(), b, t.clone()));
                t
            });
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// One worker's change feed. A cursor belongs to one process: the poll
/// goes only to that process, and a new process (a restart) starts a new
/// cursor at once instead of being asked with the old one.
async fn feed(c: Continuity, backend: Arc<Backend>, cancel: CancellationToken) {
    let mut cursor = "0".to_owned();
    // The process the cursor belongs to (`None` until one answers).
    let mut process: Option<Arc<str>> = None;
    let mut failures = 0u32;
    loop {
        if cancel.is_cancelled() {
            return;
        }
        let live = c.0.live.load_full();
        let polled = tokio::select! {
            _ = cancel.cancelled() => return,
            r = c.0.contract.changes(&backend, &live, process.as_deref(), &cursor, FEED_WAIT) => r,
        };
        match polled {
            Err(ContractError::InstanceChanged { seen, .. }) => {
                tracing::debug!(backend = %backend.id, process = %seen, "worker restarted: its change feed starts over");
                process = Some(Arc::from(seen));
                cursor = "0".to_owned();
            }
            Ok((Some(changes), answered)) => {
                failures = 0;
                if process.is_none() {
                    process = answered.clone();
                }
                let source = Source {
                    backend: backend.id.clone(),
                    instance: answered,
                    fence: Fence::Holder(backend.id.clone()),
                };
                for change in changes.changes {
                    c.note(Hint {
                        session: Arc::from(change.session),
                        thread: Arc::from(change.thread),
                        seq: change.seq,
                        source: source.clone(),
                    });
                }
                cursor = match changes.cursor {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                };
            }
            Ok((None, answered)) => {
                // No feed on this process: ask again only after a restart.
                tracing::debug!(backend = %backend.id, "worker has no change feed");
                let without = answered.or_else(|| backend.instance().map(Arc::from));
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    }
                    if backend.instance().map(Arc::from) != without {
                        break;
                    }
                }
                (process, cursor) = (None, "0".to_owned());
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                let wait = capture::backoff(failures).min(Duration::from_secs(5));
                tracing::debug!(backend = %backend.id, error = %e, "change feed poll failed");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// Follows re-pins made by other replicas (`NOTIFY tether_repin`).
async fn listen(c: Continuity, store: Arc<dyn Store>, cancel: CancellationToken) {
    let Some(pool) = store.pg_pool() else { return };
    let mut failures = 0u32;
    loop {
        let connected = tokio::select! {
            _ = cancel.cancelled() => return,
            r = tokio::time::timeout(Duration::from_secs(10), sqlx::postgres::PgListener::connect_with(&pool)) => r,
        };
        let mut listener = match connected {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => {
                failures = failures.saturating_add(1);
                tracing::warn!(error = %e, "cannot LISTEN for re-pins");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(capture::backoff(failures)) => {}
                }
                continue;
            }
            Err(_) => {
                failures = failures.saturating_add(1);
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(capture::backoff(failures)) => {}
                }
                continue;
            }
        };
        let subscribed =
            tokio::time::timeout(Duration::from_secs(10), listener.listen("tether_repin")).await;
        if !matches!(subscribed, Ok(Ok(()))) {
            tracing::warn!("LISTEN tether_repin failed");
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        }
        failures = 0;
        loop {
            let n = tokio::select! {
                _ = cancel.cancelled() => return,
                n = listener.recv() => n,
            };
            match n {
                Ok(n) => apply_notification(&c, n.payload()),
                Err(e) => {
                    tracing::warn!(error = %e, "re-pin listener lost its connection");
                    break;
                }
            }
        }
    }
}

/// `"<session> <epoch> <backend> <instance>"` → an override (restored: the
/// winner announces after its restore completed).
fn apply_notification(c: &Continuity, payload: &str) {
    let mut parts = payload.split(' ');
    let (Some(session), Some(epoch), Some(backend)) = (parts.next(), parts.next(), parts.next())
    else {
        return;
    };
    let (Some(id), Ok(epoch)) = (SessionId::from_hex(session), epoch.parse::<u64>()) else {
        return;
    };
    c.0.overrides.offer(
        id,
        Override {
            epoch,
            backend: backend.to_owned(),
            instance: parts.next().unwrap_or("").to_owned(),
            restored: true,
            partial: false,
        },
    );
}

/// Sweeps live sessions every tick (so per-worker counts are live counts)
/// and deletes what expired longer than `state.retention` ago from the
/// store every few ticks.
async fn janitor(c: Continuity, sessions: Sessions, cancel: CancellationToken) {
    let mut tick = 0u32;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(SWEEP_EVERY) => {}
        }
        let live = c.0.live.load_full();
        let now = c.0.clock.now_unix();
        let gone = sessions.sweep(now, &live.lifetimes);
        if gone > 0 {
            tracing::debug!(sessions = gone, "janitor forgot expired sessions");
        }
        tick = tick.wrapping_add(1);
        if tick % EXPIRE_EVERY_SWEEPS != 1 {
            continue;
        }
        let Ok(store) = c.0.link.get() else { continue };
        let before = now.saturating_sub(live.config.state.retention.as_secs());
        let deadline = Instant::now() + Duration::from_secs(60);
        match c.0.link.call(deadline, store.expire(before)).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(sessions = n, "janitor deleted expired sessions"),
            Err(e) => tracing::warn!(error = %e, "janitor failed"),
        }
    }
}
