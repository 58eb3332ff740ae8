//! The background tasks of continuity: connecting the store, the session
//! writer, capture workers, one change-feed poller per worker, the
//! re-pin listener (PostgreSQL `LISTEN`) and the janitor.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::capture::{self, Hint};
use super::overrides::Override;
use crate::affinity::SessionId;
use crate::backends::Backend;
use crate::metrics::ReasonLabel;
use crate::proxy::Proxy;
use crate::store::{self, Store};

/// Long-poll wait asked of workers.
const FEED_WAIT: Duration = Duration::from_secs(25);
/// Concurrent capture pulls.
const CAPTURE_WORKERS: usize = 4;

/// Starts every continuity task under `cancel`. The store is tried once
/// here (bounded by `state.restore_timeout`) so a healthy start serves
/// with its store from the first request; an unreachable store is retried
/// in the background while pinned users are served.
pub async fn start(proxy: Proxy, cancel: CancellationToken) {
    let live = proxy.shared.live.load_full();
    let url = live.config.state.store.expose().to_owned();
    let timeout = live.config.state.restore_timeout;
    drop(live);
    match tokio::time::timeout(timeout, store::connect(&url, timeout)).await {
        Ok(Ok(s)) => {
            tracing::info!(kind = s.kind(), "store connected");
            proxy.shared.store.set(s.clone());
            if s.notifies() {
                tokio::spawn(listen(proxy.clone(), s.clone(), cancel.clone()));
            }
            tokio::spawn(janitor(proxy.clone(), s, cancel.clone()));
        }
        Ok(Err(e)) => {
            tracing::error!(store = %store::redact(&url), error = %e, "store unavailable at start: retrying in the background");
            tokio::spawn(connect_store(proxy.clone(), cancel.clone()));
        }
        Err(_) => {
            tracing::error!(store = %store::redact(&url), "store did not answer at start: retrying in the background");
            tokio::spawn(connect_store(proxy.clone(), cancel.clone()));
        }
    }
    tokio::spawn(write_sessions(proxy.clone(), cancel.clone()));
    for _ in 0..CAPTURE_WORKERS {
        tokio::spawn(capture_loop(proxy.clone(), cancel.clone()));
    }
    tokio::spawn(feeds(proxy, cancel));
}

async fn connect_store(proxy: Proxy, cancel: CancellationToken) {
    let mut attempt = 0u32;
    let store = loop {
        let live = proxy.shared.live.load_full();
        let url = live.config.state.store.expose().to_owned();
        let timeout = live.config.state.restore_timeout;
        drop(live);
        match store::connect(&url, timeout).await {
            Ok(s) => break s,
            Err(e) => {
                let wait = capture::backoff(attempt).max(Duration::from_secs(1));
                tracing::error!(store = %store::redact(&url), error = %e, retry_in = ?wait, "store unavailable");
                attempt = attempt.saturating_add(1);
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    };
    tracing::info!(kind = store.kind(), "store connected");
    proxy.shared.store.set(store.clone());
    if store.notifies() {
        tokio::spawn(listen(proxy.clone(), store.clone(), cancel.clone()));
    }
    janitor(proxy, store, cancel).await;
}

async fn write_sessions(proxy: Proxy, cancel: CancellationToken) {
    let Some(mut rx) = proxy.shared.writer.take_receiver() else {
        return;
    };
    loop {
        let batch = tokio::select! {
            _ = cancel.cancelled() => return,
            b = super::writer::next_batch(&mut rx, Duration::from_millis(50)) => b,
        };
        let Some(batch) = batch else { return };
        let Some(store) = proxy.shared.store.get() else {
            proxy
                .shared
                .metrics
                .store_writes_dropped
                .inc_by(batch.len() as u64);
            continue;
        };
        if let Err(e) = store.touch_sessions(&batch).await {
            // Losing last-seen updates is harmless: the next touch rewrites.
            tracing::warn!(error = %e, rows = batch.len(), "session writes failed");
            proxy
                .shared
                .metrics
                .store_writes_dropped
                .inc_by(batch.len() as u64);
        }
    }
}

async fn capture_loop(proxy: Proxy, cancel: CancellationToken) {
    loop {
        let (hint, seq, attempts) = tokio::select! {
            _ = cancel.cancelled() => return,
            h = proxy.shared.capture.pop() => h,
        };
        let result = capture_one(&proxy, &hint, seq).await;
        proxy.shared.capture.done(&hint);
        if let Err(e) = result {
            let m = &proxy.shared.metrics;
            m.captures
                .get_or_create(&ReasonLabel { reason: "error" })
                .inc();
            if capture::may_retry(attempts) {
                let wait = capture::backoff(attempts);
                tracing::debug!(session = %hint.session, thread = %hint.thread, error = %e, retry_in = ?wait, "capture failed");
                let p = proxy.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(wait).await;
                    p.queue_capture(hint, seq, attempts + 1);
                });
            } else {
                tracing::warn!(session = %hint.session, thread = %hint.thread, error = %e, "capture given up");
            }
        }
    }
}

/// Pulls what the worker has after the stored head into the store.
pub(crate) async fn capture_one(proxy: &Proxy, hint: &Hint, seq: u64) -> Result<(), String> {
    let store = proxy.shared.store.get().ok_or("store unavailable")?;
    let stored = store
        .thread_seq(&hint.session, &hint.thread)
        .await
        .map_err(|e| e.to_string())?;
    if seq <= stored {
        return Ok(());
    }
    let live = proxy.shared.live.load_full();
    let Some(backend) = live.backends.get(&hint.backend).cloned() else {
        return Ok(());
    };
    let state = &live.config.state;
    let export = proxy
        .shared
        .contract
        .export(&backend, state, &hint.session, &hint.thread, stored)
        .await
        .map_err(|e| e.to_string())?;
    let Some(export) = export else {
        return Ok(());
    };
    let entries = capture::entries_with_seq(&export.entries).ok_or("export entry without a seq")?;
    let entries: Vec<(u64, String)> = entries.into_iter().filter(|(s, _)| *s > stored).collect();
    let now = proxy.shared.clock.now_unix();
    let head = store
        .append(
            &hint.session,
            &hint.thread,
            &entries,
            export.state.as_ref().map(|s| s.get()),
            now,
        )
        .await
        .map_err(|e| e.to_string())?;
    let m = &proxy.shared.metrics;
    m.captures
        .get_or_create(&ReasonLabel { reason: "ok" })
        .inc();
    m.captured_entries.inc_by(head.saturating_sub(stored));
    if head < export.seq.min(seq) && seq != u64::MAX {
        return Err(format!(
            "stored head {head} behind the worker's {}",
            export.seq
        ));
    }
    Ok(())
}

/// Keeps one change-feed poller per worker, following reloads.
async fn feeds(proxy: Proxy, cancel: CancellationToken) {
    let mut running: HashMap<usize, CancellationToken> = HashMap::new();
    loop {
        let live = proxy.shared.live.load_full();
        let current: HashMap<usize, Arc<Backend>> = live
            .backends
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
                tokio::spawn(feed(proxy.clone(), b, t.clone()));
                t
            });
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

async fn feed(proxy: Proxy, backend: Arc<Backend>, cancel: CancellationToken) {
    let mut cursor = "0".to_owned();
    let mut instance = backend.instance();
    let mut failures = 0u32;
    loop {
        if cancel.is_cancelled() {
            return;
        }
        if backend.instance() != instance {
            // A restarted worker starts a new feed.
            instance = backend.instance();
            cursor = "0".to_owned();
        }
        let state = proxy.shared.live.load().config.state.clone();
        let polled = tokio::select! {
            _ = cancel.cancelled() => return,
            r = proxy.shared.contract.changes(&backend, &state, &cursor, FEED_WAIT) => r,
        };
        match polled {
            Ok(Some(changes)) => {
                failures = 0;
                for c in changes.changes {
                    let hint = Hint {
                        session: c.session,
                        thread: c.thread,
                        backend: backend.id.clone(),
                    };
                    proxy.queue_capture(hint, c.seq, 0);
                }
                cursor = match changes.cursor {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                };
            }
            Ok(None) => {
                // No feed on this worker: ask again only after it restarts.
                tracing::debug!(backend = %backend.id, "worker has no change feed");
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    }
                    if backend.instance() != instance {
                        break;
                    }
                }
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
async fn listen(proxy: Proxy, store: Arc<dyn Store>, cancel: CancellationToken) {
    let Some(pool) = store.pg_pool() else { return };
    let mut failures = 0u32;
    loop {
        let mut listener = match sqlx::postgres::PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                failures = failures.saturating_add(1);
                tracing::warn!(error = %e, "cannot LISTEN for re-pins");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(capture::backoff(failures)) => {}
                }
                continue;
            }
        };
        if let Err(e) = listener.listen("tether_repin").await {
            tracing::warn!(error = %e, "LISTEN tether_repin failed");
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
                Ok(n) => apply_notification(&proxy, n.payload()),
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
pub fn apply_notification(proxy: &Proxy, payload: &str) {
    let mut parts = payload.split(' ');
    let (Some(session), Some(epoch), Some(backend)) = (parts.next(), parts.next(), parts.next())
    else {
        return;
    };
    let (Some(id), Ok(epoch)) = (SessionId::from_hex(session), epoch.parse::<u64>()) else {
        return;
    };
    proxy.shared.overrides.offer(
        id,
        Override {
            epoch,
            backend: backend.to_owned(),
            instance: parts.next().unwrap_or("").to_owned(),
            restored: true,
        },
    );
}

async fn janitor(proxy: Proxy, store: Arc<dyn Store>, cancel: CancellationToken) {
    loop {
        let retention = proxy.shared.live.load().config.state.retention;
        let now = proxy.shared.clock.now_unix();
        match store.expire(now.saturating_sub(retention.as_secs())).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(sessions = n, "janitor deleted expired sessions"),
            Err(e) => tracing::warn!(error = %e, "janitor failed"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(600)) => {}
        }
    }
}
