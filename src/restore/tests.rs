//! The move's decision table: what is known → the next step.

use super::machine::*;
use crate::config::OnRestoreFailure::{Continue, Unavailable};

fn facts() -> Facts {
    Facts::new(Unavailable)
}

const MISSING_MAY_RETURN: Captures = Captures::Missing {
    certain: false,
    overdue: false,
};
const MISSING_FOR_GOOD: Captures = Captures::Missing {
    certain: true,
    overdue: false,
};
const MISSING_TOO_LONG: Captures = Captures::Missing {
    certain: false,
    overdue: true,
};

#[test]
fn the_move_decision_table() {
    let cases: Vec<(&str, Facts, Step)> = vec![
        (
            "nothing known: captures first",
            facts(),
            Step::CompleteCaptures,
        ),
        (
            "deadline passed wins over everything",
            Facts {
                expired: true,
                captures: Some(Captures::Complete),
                cas: Some(Cas::Won),
                ..facts()
            },
            Step::Fail(Failure::Timeout),
        ),
        (
            "complete: compare-and-set",
            Facts {
                captures: Some(Captures::Complete),
                ..facts()
            },
            Step::CompareAndSet,
        ),
        (
            "missing turns that may come back: wait (503)",
            Facts {
                captures: Some(MISSING_MAY_RETURN),
                ..facts()
            },
            Step::Fail(Failure::Incomplete),
        ),
        (
            "missing turns, continue policy: go on",
            Facts {
                captures: Some(MISSING_MAY_RETURN),
                ..Facts::new(Continue)
            },
            Step::CompareAndSet,
        ),
        (
            "missing turns whose holder is gone: go on",
            Facts {
                captures: Some(MISSING_FOR_GOOD),
                ..facts()
            },
            Step::CompareAndSet,
        ),
        (
            "missing turns past partial_after: go on",
            Facts {
                captures: Some(MISSING_TOO_LONG),
                ..facts()
            },
            Step::CompareAndSet,
        ),
        (
            "won: restore",
            Facts {
                captures: Some(Captures::Complete),
                cas: Some(Cas::Won),
                rounds: 1,
                ..facts()
            },
            Step::Restore,
        ),
        (
            "won and restored",
            Facts {
                captures: Some(Captures::Complete),
                cas: Some(Cas::Won),
                rounds: 1,
                restored: Some(true),
                ..facts()
            },
            Step::Done(RestoreOutcome::Restored),
        ),
        (
            "won and restored without lost turns: partial",
            Facts {
                captures: Some(MISSING_FOR_GOOD),
                cas: Some(Cas::Won),
                rounds: 1,
                restored: Some(true),
                ..facts()
            },
            Step::Done(RestoreOutcome::Partial),
        ),
        (
            "won, restore failed",
            Facts {
                captures: Some(Captures::Complete),
                cas: Some(Cas::Won),
                rounds: 1,
                restored: Some(false),
                ..facts()
            },
            Step::Fail(Failure::Restore),
        ),
        (
            "store behind: compare-and-set again",
            Facts {
                captures: Some(Captures::Complete),
                cas: Some(Cas::Behind),
                rounds: 1,
                ..facts()
            },
            Step::CompareAndSet,
        ),
        (
            "store behind, rounds used up",
            Facts {
                captures: Some(Captures::Complete),
                cas: Some(Cas::Behind),
                rounds: MAX_ROUNDS,
                ..facts()
            },
            Step::Fail(Failure::Contended),
        ),
        (
            "lost to a usable worker: follow",
            Facts {
                captures: Some(Captures::Complete),
                cas: Some(Cas::LostToUsable),
                rounds: 1,
                ..facts()
            },
            Step::FollowWinner,
        ),
        (
            "the winner restored",
            Facts {
                captures: Some(Captures::Complete),
                cas: Some(Cas::LostToUsable),
                rounds: 1,
                winner: Some(Winner::Done),
                ..facts()
            },
            Step::Done(RestoreOutcome::Followed),
        ),
        (
            "the winner failed: restore ourselves",
            Facts {
                captures: Some(Captures::Complete),
                cas: Some(Cas::LostToUsable),
                rounds: 1,
                winner: Some(Winner::NotDone),
                ..facts()
            },
            Step::Restore,
        ),
        (
            "the winner failed, ours worked",
            Facts {
                captures: Some(Captures::Complete),
                cas: Some(Cas::LostToUsable),
                rounds: 1,
                winner: Some(Winner::NotDone),
                restored: Some(true),
                ..facts()
            },
            Step::Done(RestoreOutcome::Restored),
        ),
        (
            "lost to a worker gone here: pick another",
            Facts {
                captures: Some(Captures::Complete),
                cas: Some(Cas::LostToGone),
                rounds: 1,
                ..facts()
            },
            Step::Repick,
        ),
        (
            "picked another: compare-and-set again",
            Facts {
                captures: Some(Captures::Complete),
                cas: Some(Cas::LostToGone),
                rounds: 1,
                repicked: Some(true),
                ..facts()
            },
            Step::CompareAndSet,
        ),
        (
            "no worker left",
            Facts {
                captures: Some(Captures::Complete),
                cas: Some(Cas::LostToGone),
                rounds: 1,
                repicked: Some(false),
                ..facts()
            },
            Step::Fail(Failure::Contended),
        ),
    ];
    for (why, f, want) in cases {
        assert_eq!(next(&f), want, "{why}");
    }
}

#[test]
fn outcome_labels_round_trip() {
    for o in [
        RestoreOutcome::Running,
        RestoreOutcome::Restored,
        RestoreOutcome::Followed,
        RestoreOutcome::Partial,
        RestoreOutcome::Failed,
    ] {
        assert_eq!(RestoreOutcome::parse(o.as_str()), Some(o));
    }
    assert_eq!(RestoreOutcome::parse("bogus"), None);
}
