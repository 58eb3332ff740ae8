//! Before a request is forwarded: a stale cookie follows a newer pin this
//! replica knows, and a session whose worker is lost, drained, removed or
//! restarted empty moves ([`crate::restore`]) before anything reaches a
//! worker that lacks its history.

use std::sync::Arc;

use super::route::Route;
use super::{Proxy, ProxyError};
use crate::affinity::{MoveReason, PinOutcome};
use crate::backends::{Backend, BackendSet};
use crate::balancer;
use crate::config::OnRestoreFailure;
use crate::live::Live;
use crate::restore::{self, Move, MoveError};

/// Whether the request goes on with its whole history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum History {
    /// In place (or never needed).
    Whole,
    /// Restored without acknowledged turns the store never got
    /// (`Tether-Restore: partial`).
    Partial,
    /// `on_restore_failure = "continue"` after a failed move: forwarded
    /// without history (`Tether-Restore: failed`).
    Missing,
}

impl History {
    /// The `Tether-Restore` value the client gets, if any.
    pub(super) fn mark(self) -> Option<&'static str> {
        match self {
            History::Whole => None,
            History::Partial => Some("partial"),
            History::Missing => Some("failed"),
        }
    }
}

/// What a kept pin learns from this replica's newer pins.
enum Newer {
    /// Nothing newer; whether a partial restore is still owed.
    Same(History),
    /// A move re-pinned the session but did not finish its restore: finish
    /// it (onto this worker, or another if it is not usable).
    Unfinished(String),
}

impl Proxy {
    /// Runs after routing, before the first attempt.
    pub(super) async fn ensure_continuity(
        &self,
        route: &mut Route,
        live: &Live,
        workers: &Arc<BackendSet>,
    ) -> Result<History, ProxyError> {
        match route.outcome {
            PinOutcome::New | PinOutcome::Invalid(_) => Ok(History::Whole),
            PinOutcome::Moved(reason) => {
                let to = route.backend.clone();
                self.relocate(route, live, workers, to, reason).await
            }
            PinOutcome::Kept => match self.follow_newer_pin(route, workers) {
                Newer::Unfinished(backend) => {
                    let to = match workers.get(&backend).filter(|b| b.is_usable()) {
                        Some(b) => b.clone(),
                        None => {
                            balancer::choose_repin(&route.pin.session.0, workers, Some(&backend))
                                .ok_or(ProxyError::NoWorker)?
                        }
                    };
                    self.relocate(route, live, workers, to, MoveReason::Resumed)
                        .await
                }
                Newer::Same(owed) if !restarted_under(route) => Ok(owed),
                Newer::Same(_) => {
                    // The worker restarted with empty memory: restore into it.
                    let to = route.backend.clone();
                    self.relocate(route, live, workers, to, MoveReason::Restarted)
                        .await
                }
            },
        }
    }

    /// A stale cookie (older epoch) follows a newer pin this replica knows
    /// about, when that worker is usable. Also tells whether an earlier
    /// move restored the session without acknowledged turns and no 2xx
    /// response has said so yet (one lookup for both, on every kept pin).
    fn follow_newer_pin(&self, route: &mut Route, workers: &BackendSet) -> Newer {
        let Some(o) = self.0.continuity.newer_pin(route.pin.session) else {
            return Newer::Same(History::Whole);
        };
        let owed = if o.partial {
            History::Partial
        } else {
            History::Whole
        };
        if !o.restored && o.epoch > 0 && o.epoch >= route.pin.epoch {
            // Re-pinned (or forwarded without history under `continue`)
            // but never restored: finish the move first.
            return Newer::Unfinished(o.backend);
        }
        if o.epoch <= route.pin.epoch {
            return Newer::Same(owed);
        }
        let Some(b) = workers.get(&o.backend).filter(|b| b.is_usable()) else {
            return Newer::Same(owed);
        };
        let now = self.0.clock.now_unix();
        route.land(b.clone(), o.epoch, o.instance, now);
        Newer::Same(owed)
    }

    /// A 2xx response carried `Tether-Restore: partial`: the debt is paid.
    pub(super) fn partial_reported(&self, route: &Route) {
        self.0.continuity.partial_reported(route.pin.session);
    }

    /// Moves the route's session to `to` (restoring its threads there
    /// first) and points the route at where it landed. The move runs as its
    /// own task: a client that goes away cannot stop it half-way.
    pub(super) async fn relocate(
        &self,
        route: &mut Route,
        live: &Live,
        workers: &Arc<BackendSet>,
        to: Arc<Backend>,
        reason: MoveReason,
    ) -> Result<History, ProxyError> {
        self.0.metrics.repin(reason.as_str());
        let mv = Move {
            session: route.pin.session,
            from: route.pin.backend.clone(),
            from_epoch: route.pin.epoch,
            issued_at: route.pin.issued_at,
            reason,
        };
        route.outcome = PinOutcome::Moved(reason);
        route.from = Some(mv.from.clone());
        let task = {
            let (c, workers, live, mv, to) = (
                self.0.continuity.clone(),
                workers.clone(),
                self.0.live.load_full(),
                mv.clone(),
                to.clone(),
            );
            tokio::spawn(async move { restore::run(&c, &workers, &live, &mv, to).await })
        };
        let moved = task.await.unwrap_or(Err(MoveError::Aborted));
        let now = self.0.clock.now_unix();
        match moved {
            Ok(landing) => {
                let history = if landing.partial {
                    History::Partial
                } else {
                    History::Whole
                };
                route.landed(landing, now);
                Ok(history)
            }
            Err(e) => {
                let waiting = matches!(e, MoveError::Incomplete { .. });
                if waiting {
                    tracing::info!(session = %mv.session, from = %mv.from, error = %super::error::chain(&e), "move waits for acknowledged turns");
                } else {
                    tracing::warn!(session = %mv.session, from = %mv.from, to = %to.id, error = %super::error::chain(&e), "move failed");
                }
                match live.config.state.on_restore_failure {
                    OnRestoreFailure::Unavailable => Err(ProxyError::Restore(e)),
                    OnRestoreFailure::Continue => {
                        // Forwarded without history, and remembered: every
                        // later request tries the restore again first, and
                        // is marked until one works.
                        let instance = to.instance().unwrap_or_default();
                        let epoch = mv.from_epoch.saturating_add(1);
                        self.0.continuity.unrestored(mv.session, epoch, &to.id);
                        route.land(to, epoch, instance, now);
                        Ok(History::Missing)
                    }
                }
            }
        }
    }
}

/// Whether the pinned worker restarted (a new `Tether-Instance`) since
/// the pin was made.
fn restarted_under(route: &Route) -> bool {
    match route.backend.instance() {
        Some(now) => !route.pin.instance.is_empty() && now != route.pin.instance,
        None => false,
    }
}
