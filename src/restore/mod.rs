//! The move: a session leaves its worker (lost, drained, removed or
//! restarted empty) and lands on another one (or the restarted process)
//! with its whole conversation restored there first.
//!
//! [`run`] drives the pure state machine in [`machine`] under ONE deadline
//! (`state.restore_timeout`) that every await inherits: single-flight per
//! session in this replica, then the session's pending captures, the
//! compare-and-set on the pin's epoch that makes the move exactly-once
//! across replicas, the restore, and the announcement. A worker the session
//! left can no longer write into its history: every capture write is
//! fenced by the pin it was taken under (see [`crate::store::Fence`]).

mod machine;
pub(crate) mod recent;
mod threads;

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::affinity::{MoveReason, SessionId};
use crate::backends::{Backend, BackendSet};
use crate::balancer;
use crate::config::State;
use crate::continuity::capture::{Key, Pulled, Source};
use crate::continuity::contract::ContractError;
use crate::continuity::overrides::Override;
use crate::continuity::{Continuity, StoreState};
use crate::live::Live;
use crate::store::{Fence, Repin, RestoreRow, SessionRow, StoreError};
use machine::{Captures, Cas, Facts, Failure, Step, Winner};
use recent::MoveRecord;

pub(crate) use machine::RestoreOutcome;

/// How often a replica that lost the re-pin race checks the winner's
/// restore outcome.
const FOLLOW_POLL: Duration = Duration::from_millis(25);

/// A session leaving its worker.
#[derive(Debug, Clone)]
pub(crate) struct Move {
    pub session: SessionId,
    /// The worker the session leaves.
    pub from: String,
    /// The pin epoch it leaves: the compare-and-set expects it.
    pub from_epoch: u64,
    /// When the session was first pinned (Unix seconds).
    pub issued_at: u64,
    /// Why it moves (for logs).
    pub reason: MoveReason,
}

/// Where the session landed.
#[derive(Debug, Clone)]
pub(crate) struct Landing {
    pub backend: Arc<Backend>,
    pub epoch: u64,
    pub instance: String,
    pub outcome: RestoreOutcome,
    /// The history misses acknowledged turns (this move's or an earlier
    /// one's) and the client has not been told yet.
    pub partial: bool,
}

/// Why a move did not complete.
#[derive(Debug, thiserror::Error)]
pub(crate) enum MoveError {
    /// `state.restore_timeout` passed.
    #[error("the move did not finish within {0:?}")]
    Timeout(Duration),
    /// The store failed or is unreachable.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The new worker did not take a thread.
    #[error("restore into worker {backend} failed")]
    Restore {
        /// The worker restored into.
        backend: String,
        /// The failed contract call.
        #[source]
        source: ContractError,
    },
    /// Turns tether saw acknowledged are not stored and may still come
    /// back from the worker the session leaves.
    #[error("{threads} thread(s) of the session have acknowledged turns the store lacks; waiting for worker {backend}")]
    Incomplete {
        /// The worker that holds them.
        backend: String,
        /// How many threads miss turns.
        threads: usize,
    },
    /// Other replicas kept re-pinning, or no worker is left.
    #[error("the re-pin did not settle (other replicas kept moving it, or no worker is left)")]
    Contended,
    /// The move's task ended without an answer (it panicked).
    #[error("the move's task ended without an answer")]
    Aborted,
}

/// Moves `mv.session` to `to`, restoring its threads first.
pub(crate) async fn run(
    c: &Continuity,
    workers: &BackendSet,
    live: &Live,
    mv: &Move,
    to: Arc<Backend>,
) -> Result<Landing, MoveError> {
    let started = Instant::now();
    let deadline = started + live.config.state.restore_timeout;
    let to_id = to.id.clone();
    let result = drive(c, workers, live, mv, to, deadline).await;
    let took = started.elapsed();
    let (outcome, landed_on) = match &result {
        Ok(landing) => (landing.outcome.as_str(), landing.backend.id.clone()),
        Err(MoveError::Incomplete { .. }) => ("waiting", to_id),
        Err(_) => (RestoreOutcome::Failed.as_str(), to_id),
    };
    c.metrics().restore(outcome, took.as_secs_f64());
    c.recent_moves().record(MoveRecord {
        session: mv.session.to_hex(),
        from: mv.from.clone(),
        to: landed_on,
        reason: mv.reason.as_str(),
        outcome,
        duration_ms: u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
        at: c.now_unix(),
    });
    result
}

/// The target of the next compare-and-set.
struct Target {
    backend: Arc<Backend>,
    /// The epoch the store must still hold.
    expected: u64,
    /// The epoch the move writes.
    epoch: u64,
    /// The worker the session leaves.
    from: String,
    /// The winner's instance, when following another replica.
    instance: Option<String>,
}

impl Target {
    /// The session's pin as this target would store it.
    fn row(&self, session: &str, mv: &Move, now: u64, ttl: Duration) -> SessionRow {
        SessionRow {
            session_id: session.to_owned(),
            backend_id: self.backend.id.clone(),
            instance: self.backend.instance().unwrap_or_default(),
            epoch: self.epoch,
            created_at: mv.issued_at,
            last_seen: now,
            expires_at: mv.issued_at + ttl.as_secs(),
        }
    }
}

async fn drive(
    c: &Continuity,
    workers: &BackendSet,
    live: &Live,
    mv: &Move,
    to: Arc<Backend>,
    deadline: Instant,
) -> Result<Landing, MoveError> {
    let state = &live.config.state;
    let ttl = live.lifetimes.ttl;
    let flight = c.flight(mv.session);
    let _one_at_a_time = tokio::time::timeout_at(deadline, flight.lock())
        .await
        .map_err(|_| MoveError::Timeout(state.restore_timeout))?;
    // Another request of this session may have moved it while this one
    // waited for the flight.
    if let Some(landing) = already_moved(c, workers, mv) {
        return Ok(landing);
    }
    let session = mv.session.to_hex();
    let mut t = Target {
        backend: to,
        expected: mv.from_epoch,
        epoch: mv.from_epoch.saturating_add(1),
        from: mv.from.clone(),
        instance: None,
    };
    let mut facts = Facts::new(state.on_restore_failure);
    let mut restore_error = None;
    let mut missing = 0;
    // The ledger generation the capture check saw (what the move settles).
    let mut checked = 0;
    // The winning replica restored without acknowledged turns, or a worker
    // kept a divergent copy of a thread.
    let mut winner_partial = false;
    let mut diverged = false;
    loop {
        facts.expired = Instant::now() >= deadline;
        match machine::next(&facts) {
            Step::CompleteCaptures => {
                // A drained worker is still up: it hands over what it holds
                // even when nothing announced it.
                let handing_over = workers
                    .get(&mv.from)
                    .filter(|b| mv.reason == MoveReason::Drained && b.is_usable());
                let (captures, n, generation) =
                    complete_captures(c, mv.session, &session, handing_over, state, deadline)
                        .await?;
                facts.captures = Some(captures);
                missing = n;
                checked = generation;
            }
            Step::CompareAndSet => {
                facts.rounds += 1;
                let cas = compare_and_set(c, workers, &session, mv, ttl, &mut t, deadline).await?;
                if cas == Cas::Won {
                    // Re-pinned but not restored yet: until a restore
                    // lands, this session's next request here finishes the
                    // move (its old worker must not serve it under the old
                    // pin: every capture from there would be fenced).
                    c.overrides().offer(
                        mv.session,
                        Override {
                            epoch: t.epoch,
                            backend: t.backend.id.clone(),
                            instance: String::new(),
                            restored: false,
                            partial: false,
                        },
                    );
                }
                facts.cas = Some(cas);
                (facts.winner, facts.restored, facts.repicked) = (None, None, None);
            }
            Step::Restore => {
                let outcome = if facts.partial() {
                    RestoreOutcome::Partial
                } else {
                    RestoreOutcome::Restored
                };
                let restored = restore_into(c, live, &session, mv, &t, outcome, deadline).await;
                facts.restored = Some(restored.is_ok());
                // A worker that kept its own (divergent) copy of a thread
                // serves it: what the store held beyond it is not shown.
                if let Ok(report) = &restored {
                    diverged |= report.diverged > 0;
                    // The pin names the process that took the threads.
                    if let Some(i) = &report.instance {
                        t.instance = Some(i.to_string());
                    }
                }
                restore_error = restored.err();
            }
            Step::FollowWinner => {
                let (winner, partial) = follow_winner(c, &session, t.epoch, deadline).await?;
                facts.winner = Some(winner);
                winner_partial = partial;
            }
            Step::Repick => {
                // The winner's worker (`t.from` now) is gone here too.
                let next = balancer::choose_repin(&mv.session.0, workers, Some(&t.from));
                facts.repicked = Some(next.is_some());
                if let Some(next) = next {
                    t.epoch = t.expected.saturating_add(1);
                    t.backend = next;
                    t.instance = None;
                }
            }
            Step::Done(outcome) => {
                let known_missing = facts.partial();
                let partial = winner_partial || diverged || known_missing;
                return Ok(land(c, mv, t, outcome, (missing, checked), partial));
            }
            Step::Fail(why) => {
                return Err(match why {
                    Failure::Timeout => MoveError::Timeout(state.restore_timeout),
                    Failure::Incomplete => MoveError::Incomplete {
                        backend: mv.from.clone(),
                        threads: missing,
                    },
                    Failure::Restore => restore_error.unwrap_or(MoveError::Contended),
                    Failure::Contended => MoveError::Contended,
                })
            }
        }
    }
}

/// The landing of a move another request of this session finished.
fn already_moved(c: &Continuity, workers: &BackendSet, mv: &Move) -> Option<Landing> {
    let o = c.overrides().get(mv.session)?;
    if !o.restored || o.epoch <= mv.from_epoch {
        return None;
    }
    let backend = workers.get(&o.backend).filter(|b| b.is_usable())?.clone();
    Some(Landing {
        backend,
        epoch: o.epoch,
        instance: o.instance,
        outcome: RestoreOutcome::Followed,
        partial: o.partial,
    })
}

/// Pulls the session's pending captures into the store (its buffered ones
/// first), then compares what is stored with what was acknowledged.
/// Returns the verdict and how many threads miss turns.
async fn complete_captures(
    c: &Continuity,
    id: SessionId,
    session: &str,
    handing_over: Option<&Arc<Backend>>,
    state: &State,
    deadline: Instant,
) -> Result<(Captures, usize, u64), MoveError> {
    // A store known to be down fails the move at once (the watch finds out
    // within a second when it answers again) instead of at the deadline.
    if c.store_state() != StoreState::Connected {
        return Err(MoveError::Store(StoreError::Unavailable));
    }
    if !c.flush(Some(session), deadline).await {
        // Buffered turns cannot reach the store: restoring now would miss
        // them, and the store is down anyway.
        return Err(MoveError::Store(StoreError::Unavailable));
    }
    // The worker the session leaves is lost or going: give its pulls half
    // of what is left, so a hung worker still leaves time to decide.
    let now = Instant::now();
    let pulls_until = now + deadline.saturating_duration_since(now) / 2;
    let ledger = c.ledger();
    let pulls = ledger.take_session(session);
    for (key, source) in pulls.taken {
        let pulled = c.pull(&key, &source, pulls_until).await;
        ledger.done(&key, pulled);
    }
    for (key, source) in pulls.idle {
        if Instant::now() >= pulls_until {
            break;
        }
        let pulled = c.pull(&key, &source, pulls_until).await;
        ledger.done(&key, pulled);
    }
    while ledger.running(session) > 0 && Instant::now() < pulls_until {
        let _ = tokio::time::timeout_at(pulls_until, ledger.settled()).await;
    }
    // A request of this session still on its way to the worker it leaves
    // may bring a turn: the move waits for it (bounded).
    let mut in_flight = c.requests_in_flight(id);
    while in_flight > 0 && Instant::now() < pulls_until {
        let settled = c.request_settled();
        tokio::pin!(settled);
        settled.as_mut().enable();
        in_flight = c.requests_in_flight(id);
        if in_flight > 0 {
            let _ = tokio::time::timeout_at(pulls_until, settled).await;
            in_flight = c.requests_in_flight(id);
        }
    }
    // A pull above may have met a store blip and left its write in the
    // outage buffer: it must reach the store before the restore reads it.
    if !c.flush(Some(session), deadline).await {
        return Err(MoveError::Store(StoreError::Unavailable));
    }
    let link = c.link();
    let store = link.get()?;
    if let Some(from) = handing_over {
        let source = Source {
            backend: from.id.clone(),
            instance: from.instance().map(Arc::from),
            fence: Fence::Holder(from.id.clone()),
        };
        for t in link.call(deadline, store.threads(session)).await? {
            let key: Key = (Arc::from(session), Arc::from(t.thread_id));
            if let Pulled::Failed = c.pull(&key, &source, pulls_until).await {
                tracing::warn!(session, thread = %key.1, backend = %from.id, "final capture from the drained worker failed");
            }
        }
    }
    let heads = link.call(deadline, store.threads(session)).await?;
    let head = |t: &str| heads.iter().find(|h| h.thread_id == t).map_or(0, |h| h.seq);
    let checked = ledger.generation();
    let missing: Vec<_> = ledger
        .pending(session)
        .into_iter()
        .filter(|p| p.acked > head(&p.thread))
        .collect();
    if in_flight > 0 {
        tracing::info!(
            session,
            requests = in_flight,
            "requests still in flight to the worker the session leaves"
        );
        return Ok((
            Captures::Missing {
                certain: false,
                overdue: false,
            },
            missing.len().max(1),
            checked,
        ));
    }
    if missing.is_empty() {
        return Ok((Captures::Complete, 0, checked));
    }
    let threads: Vec<Arc<str>> = missing.iter().map(|p| p.thread.clone()).collect();
    let since = ledger.missing_since(session, &threads, Instant::now());
    let certain = missing.iter().all(|p| p.lost);
    let overdue = since.elapsed() >= state.partial_after;
    for p in &missing {
        tracing::info!(session, thread = %p.thread, acknowledged = p.acked, stored = head(&p.thread), holder = %p.source.backend, lost = p.lost, "acknowledged turns not in the store");
    }
    Ok((
        Captures::Missing { certain, overdue },
        missing.len(),
        checked,
    ))
}

/// One compare-and-set round; updates the target when another move won.
async fn compare_and_set(
    c: &Continuity,
    workers: &BackendSet,
    session: &str,
    mv: &Move,
    ttl: Duration,
    t: &mut Target,
    deadline: Instant,
) -> Result<Cas, MoveError> {
    let row = t.row(session, mv, c.now_unix(), ttl);
    let link = c.link();
    let store = link.get()?;
    let winner = match link.call(deadline, store.repin(&row, t.expected)).await? {
        Repin::Won => return Ok(Cas::Won),
        Repin::Lost(w) => w,
    };
    if winner.epoch < t.expected {
        // The store is behind this pin (its writes were dropped): replace
        // the epoch it holds.
        t.expected = winner.epoch;
        return Ok(Cas::Behind);
    }
    t.expected = winner.epoch;
    t.epoch = winner.epoch;
    match workers.get(&winner.backend_id).filter(|b| b.is_usable()) {
        Some(b) => {
            t.backend = b.clone();
            t.instance = Some(winner.instance);
            Ok(Cas::LostToUsable)
        }
        None => {
            // The next round moves the session on from the winner's worker.
            t.from = winner.backend_id;
            Ok(Cas::LostToGone)
        }
    }
}

/// This move won: restore, log it, and tell the other replicas.
async fn restore_into(
    c: &Continuity,
    live: &Live,
    session: &str,
    mv: &Move,
    t: &Target,
    done: RestoreOutcome,
    deadline: Instant,
) -> Result<threads::Report, MoveError> {
    let link = c.link();
    let store = link.get()?;
    let started = Instant::now();
    let log = RestoreRow {
        session_id: session.to_owned(),
        epoch: t.epoch,
        from_backend: t.from.clone(),
        to_backend: t.backend.id.clone(),
        threads: 0,
        outcome: RestoreOutcome::Running,
        started_at: c.now_unix(),
        duration_ms: 0,
    };
    let log_id = link.call(deadline, store.record_restore(&log)).await?;
    let result = threads::restore_threads(c, &t.backend, live, session, t.epoch, deadline).await;
    let ms = started.elapsed().as_millis() as u64;
    let (outcome, sent) = match &result {
        Ok(r) if r.diverged > 0 => (RestoreOutcome::Partial, r.threads),
        Ok(r) => (done, r.threads),
        Err(_) => (RestoreOutcome::Failed, 0),
    };
    // Logged past the deadline too: followers wait for this row.
    let log_deadline = Instant::now() + Duration::from_secs(2);
    if let Err(e) = link
        .call(
            log_deadline,
            store.finish_restore(log_id, outcome, ms, sent),
        )
        .await
    {
        tracing::warn!(error = %e, "cannot log the restore outcome");
    }
    let report = result?;
    tracing::info!(
        session,
        from = %t.from,
        to = %t.backend.id,
        reason = mv.reason.as_str(),
        epoch = t.epoch,
        threads = report.threads,
        created = report.created,
        merged = report.merged,
        kept = report.diverged,
        duration_ms = ms,
        "restored"
    );
    let row = t.row(session, mv, c.now_unix(), live.lifetimes.ttl);
    if let Err(e) = link.call(log_deadline, store.announce(&row)).await {
        tracing::warn!(error = %e, "cannot announce the re-pin");
    }
    Ok(report)
}

/// Another replica won the re-pin: wait (at most half of what is left) for
/// its restore outcome (and whether it was partial).
async fn follow_winner(
    c: &Continuity,
    session: &str,
    epoch: u64,
    deadline: Instant,
) -> Result<(Winner, bool), MoveError> {
    let now = Instant::now();
    let until = now + deadline.saturating_duration_since(now) / 2;
    let link = c.link();
    let store = link.get()?;
    loop {
        match link
            .call(deadline, store.restore_outcome(session, epoch))
            .await?
        {
            Some(RestoreOutcome::Restored | RestoreOutcome::Followed) => {
                return Ok((Winner::Done, false))
            }
            Some(RestoreOutcome::Partial) => return Ok((Winner::Done, true)),
            Some(RestoreOutcome::Failed) => return Ok((Winner::NotDone, false)),
            Some(RestoreOutcome::Running) | None if Instant::now() >= until => {
                return Ok((Winner::NotDone, false))
            }
            Some(RestoreOutcome::Running) | None => tokio::time::sleep(FOLLOW_POLL).await,
        }
    }
}

/// The move is over: remember the new pin, settle the ledger.
fn land(
    c: &Continuity,
    mv: &Move,
    t: Target,
    outcome: RestoreOutcome,
    (missing, checked): (usize, u64),
    winner_partial: bool,
) -> Landing {
    let instance = t
        .instance
        .unwrap_or_else(|| t.backend.instance().unwrap_or_default());
    // The debt of a partial restore outlives this move until a 2xx
    // response has told the client.
    c.overrides().offer(
        mv.session,
        Override {
            epoch: t.epoch,
            backend: t.backend.id.clone(),
            instance: instance.clone(),
            restored: true,
            partial: outcome == RestoreOutcome::Partial || winner_partial,
        },
    );
    let partial = c.overrides().owes_partial(mv.session);
    // What was acknowledged before the move is now stored, or reported
    // missing (once) with this partial restore.
    c.ledger().settle_session(&mv.session.to_hex(), checked);
    if outcome == RestoreOutcome::Partial || winner_partial {
        tracing::warn!(session = %mv.session, from = %mv.from, to = %t.backend.id, threads = missing, "restored without acknowledged turns that never reached the store");
    }
    Landing {
        backend: t.backend,
        epoch: t.epoch,
        instance,
        outcome,
        partial,
    }
}
