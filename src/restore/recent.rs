//! The recent moves, newest first, for the admin API (`/api/moves`) and
//! the dashboard: a bounded ring, so a storm of moves costs a fixed amount
//! of memory (`admin.recent_moves` entries).

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::Serialize;

/// One finished move as operators see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct MoveRecord {
    /// The session (hex id).
    pub session: String,
    /// The worker it left.
    pub from: String,
    /// The worker it landed on (or was meant to, when it failed).
    pub to: String,
    /// Why it moved (`lost`, `drained`, ...).
    pub reason: &'static str,
    /// How it ended: `ok`, `partial`, `followed`, `failed`, or `waiting`
    /// (acknowledged turns not stored yet: the next request tries again).
    pub outcome: &'static str,
    /// How long the move took.
    pub duration_ms: u64,
    /// When it finished (Unix seconds).
    pub at: u64,
}

/// The bounded ring of recent moves.
#[derive(Debug)]
pub(crate) struct RecentMoves {
    ring: Mutex<VecDeque<MoveRecord>>,
    cap: usize,
}

impl RecentMoves {
    /// A ring of at most `cap` moves (at least one).
    pub(crate) fn new(cap: usize) -> RecentMoves {
        let cap = cap.max(1);
        RecentMoves {
            ring: Mutex::new(VecDeque::with_capacity(cap.min(1024))),
            cap,
        }
    }

    /// Records a finished move; the oldest falls out when full.
    pub(crate) fn record(&self, m: MoveRecord) {
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        while ring.len() >= self.cap {
            ring.pop_back();
        }
        ring.push_front(m);
    }

    /// The moves held, newest first.
    pub(crate) fn newest_first(&self) -> Vec<MoveRecord> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        ring.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(n: u64) -> MoveRecord {
        MoveRecord {
            session: format!("s{n}"),
            from: "a".into(),
            to: "b".into(),
            reason: "lost",
            outcome: "ok",
            duration_ms: n,
            at: n,
        }
    }

    #[test]
    fn keeps_the_newest_first_and_at_most_cap() {
        let r = RecentMoves::new(3);
        for n in 1..=5 {
            r.record(rec(n));
        }
        let held: Vec<u64> = r.newest_first().iter().map(|m| m.at).collect();
        assert_eq!(held, vec![5, 4, 3]);
    }

    #[test]
    fn a_zero_cap_still_keeps_the_last_move() {
        let r = RecentMoves::new(0);
        r.record(rec(1));
        r.record(rec(2));
        assert_eq!(r.newest_first(), vec![rec(2)]);
    }
}
