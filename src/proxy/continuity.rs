//! The proxy's side of continuity: before a request is forwarded, follow a
//! newer re-pin, and restore a moved (or restarted-worker) session's
//! threads exactly once. Single-flight per session inside this replica, a
//! compare-and-set on the session's epoch across replicas.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::route::{Binding, Route};
use super::{Live, Proxy, ProxyError};
use crate::affinity::{MoveReason, PinOutcome, SessionId};
use crate::config::OnRestoreFailure;
use crate::continuity::capture::Hint;
use crate::continuity::overrides::Override;
use crate::continuity::restore::{restore_threads, RestoreError};
use crate::metrics::OutcomeLabel;
use crate::store::{Repin, RestoreRow, SessionRow, Store};

/// How often a replica that lost the re-pin race checks the winner's
/// restore outcome.
const FOLLOW_POLL: Duration = Duration::from_millis(25);
/// Most compare-and-set rounds for one request.
const MAX_ROUNDS: u32 = 3;

/// Per-session locks: concurrent requests of one session wait for one
/// restore.
#[derive(Debug, Default)]
pub struct Flights(Mutex<HashMap<u128, Weak<tokio::sync::Mutex<()>>>>);

impl Flights {
    fn lock_for(&self, id: SessionId) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = map.get(&id.as_u128()).and_then(Weak::upgrade) {
            return l;
        }
        let l = Arc::new(tokio::sync::Mutex::new(()));
        map.retain(|_, w| w.strong_count() > 0);
        map.insert(id.as_u128(), Arc::downgrade(&l));
        l
    }
}

/// Whether the request goes on with or without its history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Continuity {
    /// History is (or already was) in place.
    Ready,
    /// `on_restore_failure = "continue"`: forwarded without history.
    Degraded,
}

impl Proxy {
    /// Runs before forwarding. Returns whether history is in place.
    pub(super) async fn ensure_continuity(
        &self,
        route: &mut Route,
        live: &Live,
    ) -> Result<Continuity, ProxyError> {
        let expected = match route.outcome {
            PinOutcome::Moved(_) => route.pin.epoch.saturating_sub(1),
            PinOutcome::Kept => {
                self.follow_override(route, live);
                if !self.instance_changed_under(route) {
                    return Ok(Continuity::Ready);
                }
                // Restore into the same worker, under the next epoch.
                let expected = route.pin.epoch;
                route.from = Some(route.pin.backend.clone());
                route.pin.epoch += 1;
                route.pin.instance = route.backend.instance().unwrap_or_default();
                route.set_cookie = route.binding == Binding::Cookie;
                route.outcome = PinOutcome::Moved(MoveReason::Restarted);
                expected
            }
            PinOutcome::New | PinOutcome::Invalid(_) => return Ok(Continuity::Ready),
        };
        if route.outcome == PinOutcome::Moved(MoveReason::Drained) {
            self.final_capture(route, live).await;
        }
        let started = Instant::now();
        let result = self.restore_session(route, live, expected).await;
        let m = &self.shared.metrics;
        m.restore_duration.observe(started.elapsed().as_secs_f64());
        match result {
            Ok(outcome) => {
                m.restores.get_or_create(&OutcomeLabel { outcome }).inc();
                Ok(Continuity::Ready)
            }
            Err(e) => {
                m.restores
                    .get_or_create(&OutcomeLabel { outcome: "failed" })
                    .inc();
                tracing::warn!(
                    session = %route.pin.session,
                    backend = %route.backend.id,
                    error = %crate::proxy::error::chain(&e),
                    "restore failed"
                );
                match live.config.state.on_restore_failure {
                    OnRestoreFailure::Unavailable => Err(ProxyError::Restore(e)),
                    OnRestoreFailure::Continue => Ok(Continuity::Degraded),
                }
            }
        }
    }

    /// Before a drained worker's session moves, pull what it holds beyond
    /// the store (best effort: the worker is still up).
    async fn final_capture(&self, route: &Route, live: &Live) {
        let (Some(store), Some(from)) = (self.shared.store.get(), route.from.as_deref()) else {
            return;
        };
        let session = route.pin.session.to_hex();
        let threads = match store.threads(&session).await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "final capture: cannot list threads");
                return;
            }
        };
        for t in threads {
            let hint = Hint {
                session: session.clone(),
                thread: t.thread_id,
                backend: from.to_owned(),
            };
            let pulled = tokio::time::timeout(
                live.config.state.restore_timeout,
                crate::continuity::feed::capture_one(self, &hint, u64::MAX),
            )
            .await;
            if !matches!(pulled, Ok(Ok(()))) {
                tracing::warn!(session = %session, thread = %hint.thread, "final capture from the drained worker failed");
            }
        }
    }

    /// A stale cookie (older epoch) follows a newer re-pin this replica
    /// knows about, when that worker is usable.
    fn follow_override(&self, route: &mut Route, live: &Live) {
        let Some(o) = self.shared.overrides.get(route.pin.session) else {
            return;
        };
        if o.epoch <= route.pin.epoch || !o.restored {
            return;
        }
        let Some(b) = live.backends.get(&o.backend).filter(|b| b.is_usable()) else {
            return;
        };
        route.backend = b.clone();
        route.pin.backend = o.backend;
        route.pin.epoch = o.epoch;
        route.pin.instance = o.instance;
        route.set_cookie = route.binding == Binding::Cookie;
    }

    /// Whether the pinned worker restarted (new `Tether-Instance`) since
    /// the pin was made.
    fn instance_changed_under(&self, route: &Route) -> bool {
        match route.backend.instance() {
            Some(now) => !route.pin.instance.is_empty() && now != route.pin.instance,
            None => false,
        }
    }

    /// The re-pin and restore, single-flight. Returns the metric label.
    async fn restore_session(
        &self,
        route: &mut Route,
        live: &Live,
        mut expected: u64,
    ) -> Result<&'static str, RestoreError> {
        let state = &live.config.state;
        let id = route.pin.session;
        let lock = self.shared.flights.lock_for(id);
        let _guard = tokio::time::timeout(state.restore_timeout, lock.lock())
            .await
            .map_err(|_| RestoreError::Timeout(state.restore_timeout))?;
        // Another request of this session may have finished the job while
        // this one waited.
        if let Some(o) = self.shared.overrides.get(id) {
            if o.restored && o.epoch >= route.pin.epoch {
                if let Some(b) = live.backends.get(&o.backend).filter(|b| b.is_usable()) {
                    route.backend = b.clone();
                    route.pin.backend = o.backend;
                    route.pin.epoch = o.epoch;
                    route.pin.instance = o.instance;
                    return Ok("followed");
                }
            }
        }
        let store = self.shared.store.get().ok_or(RestoreError::NoStore)?;
        let session = id.to_hex();
        for _ in 0..MAX_ROUNDS {
            let now = self.shared.clock.now_unix();
            let row = SessionRow {
                session_id: session.clone(),
                backend_id: route.backend.id.clone(),
                instance: route.pin.instance.clone(),
                epoch: route.pin.epoch,
                created_at: route.pin.issued_at,
                last_seen: now,
                expires_at: route.pin.issued_at + live.lifetimes.ttl.as_secs(),
            };
            let cas = tokio::time::timeout(state.restore_timeout, store.repin(&row, expected))
                .await
                .map_err(|_| RestoreError::Timeout(state.restore_timeout))??;
            match cas {
                Repin::Won => {
                    self.restore_into(route, live, &store, &row).await?;
                    return Ok("ok");
                }
                Repin::Lost(winner) if winner.epoch < route.pin.epoch => {
                    // The store is behind this pin (writes were dropped):
                    // take the stored epoch as the one to replace.
                    expected = winner.epoch;
                }
                Repin::Lost(winner) => {
                    match live
                        .backends
                        .get(&winner.backend_id)
                        .filter(|b| b.is_usable())
                    {
                        Some(b) => {
                            route.backend = b.clone();
                            route.pin.backend = winner.backend_id.clone();
                            route.pin.epoch = winner.epoch;
                            route.pin.instance = winner.instance.clone();
                            route.set_cookie = route.binding == Binding::Cookie;
                            return self.follow_winner(route, live, &store, &winner).await;
                        }
                        None => {
                            // The winner's worker is gone too: move again.
                            let next = crate::balancer::choose_repin(
                                &id.0,
                                &live.backends,
                                Some(&winner.backend_id),
                            )
                            .ok_or(RestoreError::Elsewhere)?;
                            expected = winner.epoch;
                            route.from = Some(winner.backend_id.clone());
                            route.pin.epoch = winner.epoch + 1;
                            route.pin.backend = next.id.clone();
                            route.pin.instance = next.instance().unwrap_or_default();
                            route.backend = next;
                        }
                    }
                }
            }
        }
        Err(RestoreError::Elsewhere)
    }

    /// This replica won the re-pin: restore, log, announce.
    async fn restore_into(
        &self,
        route: &Route,
        live: &Live,
        store: &Arc<dyn Store>,
        row: &SessionRow,
    ) -> Result<(), RestoreError> {
        let state = &live.config.state;
        let started = Instant::now();
        let log = RestoreRow {
            session_id: row.session_id.clone(),
            epoch: row.epoch,
            from_backend: route.from.clone().unwrap_or_default(),
            to_backend: row.backend_id.clone(),
            threads: 0,
            outcome: "running".into(),
            started_at: row.last_seen,
            duration_ms: 0,
        };
        let log_id = store.record_restore(&log).await?;
        let result = tokio::time::timeout(
            state.restore_timeout,
            restore_threads(
                store,
                &self.shared.contract,
                &route.backend,
                state,
                &row.session_id,
                row.epoch,
            ),
        )
        .await
        .unwrap_or(Err(RestoreError::Timeout(state.restore_timeout)));
        let ms = started.elapsed().as_millis() as u64;
        let outcome = if result.is_ok() { "ok" } else { "failed" };
        if let Err(e) = store.finish_restore(log_id, outcome, ms).await {
            tracing::warn!(error = %e, "cannot log the restore outcome");
        }
        let report = result?;
        tracing::info!(
            session = %row.session_id,
            from = %log.from_backend,
            to = %row.backend_id,
            epoch = row.epoch,
            threads = report.threads,
            created = report.created,
            kept = report.diverged,
            duration_ms = ms,
            "restored"
        );
        self.shared.overrides.offer(
            route.pin.session,
            Override {
                epoch: row.epoch,
                backend: row.backend_id.clone(),
                instance: row.instance.clone(),
                restored: true,
            },
        );
        if let Err(e) = store.announce(row).await {
            tracing::warn!(error = %e, "cannot announce the re-pin");
        }
        Ok(())
    }

    /// Another replica won: wait for its restore, or redo it if it failed
    /// or vanished (an import is safe to repeat: the worker keeps what it
    /// holds).
    async fn follow_winner(
        &self,
        route: &Route,
        live: &Live,
        store: &Arc<dyn Store>,
        winner: &SessionRow,
    ) -> Result<&'static str, RestoreError> {
        let deadline = Instant::now() + live.config.state.restore_timeout;
        loop {
            match store
                .restore_outcome(&winner.session_id, winner.epoch)
                .await?
                .as_deref()
            {
                Some("ok") => {
                    self.shared.overrides.offer(
                        route.pin.session,
                        Override {
                            epoch: winner.epoch,
                            backend: winner.backend_id.clone(),
                            instance: winner.instance.clone(),
                            restored: true,
                        },
                    );
                    return Ok("followed");
                }
                Some("failed") => break,
                _ if Instant::now() >= deadline => break,
                _ => tokio::time::sleep(FOLLOW_POLL).await,
            }
        }
        self.restore_into(route, live, store, winner).await?;
        Ok("ok")
    }

    /// Queues a capture hint, counting a drop when the queue was full.
    pub fn queue_capture(&self, hint: Hint, seq: u64, attempts: u32) {
        if self.shared.capture.push(hint, seq, attempts) {
            self.shared.metrics.capture_dropped.inc();
        }
    }
}
