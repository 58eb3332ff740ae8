//! The move as a pure state machine: what is known so far ([`Facts`]) →
//! what to do next ([`Step`]). The driver in [`super`] performs each step's
//! I/O under the move's one deadline and records what it learned; this
//! function alone decides the order, so the whole protocol is readable
//! (and table-tested) here:
//!
//! ```text
//! complete the session's pending captures from the worker it leaves
//!   └─ turns acknowledged but not stored?  wait (fail) unless the loss is
//!      certain, partial_after has passed, or on_restore_failure = continue
//! compare-and-set the pin's epoch in the store
//!   ├─ won            ─▶ restore every stored thread into the new worker ─▶ done
//!   ├─ store behind   ─▶ compare-and-set again against the stored epoch
//!   ├─ lost, usable   ─▶ wait for the winner's restore ─▶ followed
//!   │                     (failed or silent: restore into its worker ourselves)
//!   └─ lost, gone     ─▶ pick the next worker, compare-and-set again
//! ```

use crate::config::OnRestoreFailure;

/// Most compare-and-set rounds in one move.
pub(crate) const MAX_ROUNDS: u32 = 3;

/// How a move ended; stored in `tether_restores.outcome` and used as the
/// `outcome` label of `tether_restores_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RestoreOutcome {
    /// Still running (only ever stored, while it runs).
    Running,
    /// This replica restored every stored thread, which held every turn
    /// tether saw acknowledged.
    Restored,
    /// Another request or replica did the restore; this one followed it.
    Followed,
    /// Restored, but without turns tether saw acknowledged that never
    /// reached the store (the client gets `Tether-Restore: partial`).
    Partial,
    /// The move did not complete.
    Failed,
}

impl RestoreOutcome {
    /// The stable label.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            RestoreOutcome::Running => "running",
            RestoreOutcome::Restored => "ok",
            RestoreOutcome::Followed => "followed",
            RestoreOutcome::Partial => "partial",
            RestoreOutcome::Failed => "failed",
        }
    }

    /// The outcome a stored label names.
    pub(crate) fn parse(label: &str) -> Option<RestoreOutcome> {
        [
            RestoreOutcome::Running,
            RestoreOutcome::Restored,
            RestoreOutcome::Followed,
            RestoreOutcome::Partial,
            RestoreOutcome::Failed,
        ]
        .into_iter()
        .find(|o| o.as_str() == label)
    }
}

/// What completing the pending captures showed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Captures {
    /// The store holds every turn tether saw acknowledged.
    Complete,
    /// Some acknowledged turns are not stored. `certain` when the process
    /// that held them is gone (restarted or removed); `overdue` when the
    /// session has waited `state.partial_after` for them already.
    Missing { certain: bool, overdue: bool },
}

/// The compare-and-set's answer, as the next step needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cas {
    /// This move re-pinned the session: it restores.
    Won,
    /// The store's epoch is older than the pin's (its writes were dropped):
    /// retry against the stored epoch.
    Behind,
    /// Another move won, onto a worker that is usable here.
    LostToUsable,
    /// Another move won, onto a worker that is not usable here.
    LostToGone,
}

/// The winner's restore, as this replica sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Winner {
    /// It completed.
    Done,
    /// It failed, or did not finish before the wait ended.
    NotDone,
}

/// Everything the move has learned; `None` = that step has not run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Facts {
    /// `state.on_restore_failure`.
    pub policy: OnRestoreFailure,
    /// The move's deadline has passed.
    pub expired: bool,
    pub captures: Option<Captures>,
    pub cas: Option<Cas>,
    /// Compare-and-set rounds so far.
    pub rounds: u32,
    pub winner: Option<Winner>,
    /// Whether the restore into the target worker worked.
    pub restored: Option<bool>,
    /// A replica picked another worker (no usable worker left: `false`).
    pub repicked: Option<bool>,
}

impl Facts {
    /// Nothing known yet.
    pub(crate) fn new(policy: OnRestoreFailure) -> Facts {
        Facts {
            policy,
            expired: false,
            captures: None,
            cas: None,
            rounds: 0,
            winner: None,
            restored: None,
            repicked: None,
        }
    }

    /// Whether the restore goes on without some acknowledged turns.
    pub(crate) fn partial(&self) -> bool {
        matches!(self.captures, Some(Captures::Missing { .. }))
    }
}

/// Why a move gives up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The deadline passed.
    Timeout,
    /// Acknowledged turns are missing and may still come back: wait.
    Incomplete,
    /// The restore into the worker failed.
    Restore,
    /// Other replicas kept winning, or no worker is left.
    Contended,
}

/// What to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Pull the session's pending captures into the store and compare what
    /// is stored with what was acknowledged.
    CompleteCaptures,
    /// Compare-and-set the pin's epoch.
    CompareAndSet,
    /// Send every stored thread to the target worker.
    Restore,
    /// Wait for the winning replica's restore outcome.
    FollowWinner,
    /// Choose another worker (the winner's is gone here).
    Repick,
    /// The move is over.
    Done(RestoreOutcome),
    /// The move gives up.
    Fail(Failure),
}

/// The next step, given what is known.
pub(crate) fn next(f: &Facts) -> Step {
    if f.expired {
        return Step::Fail(Failure::Timeout);
    }
    let Some(captures) = f.captures else {
        return Step::CompleteCaptures;
    };
    if let Captures::Missing { certain, overdue } = captures {
        let wait = f.policy == OnRestoreFailure::Unavailable && !certain && !overdue;
        if wait {
            return Step::Fail(Failure::Incomplete);
        }
    }
    let done = if f.partial() {
        RestoreOutcome::Partial
    } else {
        RestoreOutcome::Restored
    };
    let again = if f.rounds >= MAX_ROUNDS {
        Step::Fail(Failure::Contended)
    } else {
        Step::CompareAndSet
    };
    match f.cas {
        None => again,
        Some(Cas::Won) => match f.restored {
            None => Step::Restore,
            Some(true) => Step::Done(done),
            Some(false) => Step::Fail(Failure::Restore),
        },
        Some(Cas::Behind) => again,
        Some(Cas::LostToUsable) => match (f.winner, f.restored) {
            (None, _) => Step::FollowWinner,
            (Some(Winner::Done), _) => Step::Done(RestoreOutcome::Followed),
            // The winner failed or vanished: an import is safe to repeat
            // (the worker keeps what it holds), so restore ourselves.
            (Some(Winner::NotDone), None) => Step::Restore,
            (Some(Winner::NotDone), Some(true)) => Step::Done(done),
            (Some(Winner::NotDone), Some(false)) => Step::Fail(Failure::Restore),
        },
        Some(Cas::LostToGone) => match f.repicked {
            None => Step::Repick,
            Some(true) => again,
            Some(false) => Step::Fail(Failure::Contended),
        },
    }
}
