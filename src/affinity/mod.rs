//! Affinity: which worker a request belongs to.
//!
//! A pin is sealed into the affinity cookie (see [`codec`]) or, for clients
//! that keep no cookies, held in the request-key [`pins`] table. [`decide`]
//! is the pure decision table the proxy runs per request.

pub mod codec;
pub mod cookies;
pub mod pins;
pub mod sessions;

#[cfg(test)]
mod tests;

use std::fmt;
use std::time::Duration;

use rand::RngCore;

pub use codec::{Codec, OpenCache, RejectReason};

/// 128 random bits naming one user's conversation session.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId(pub [u8; 16]);

impl SessionId {
    /// A fresh random id.
    pub fn random() -> SessionId {
        let mut b = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut b);
        SessionId(b)
    }

    /// The id as a `u128` (hashing, maps).
    pub fn as_u128(&self) -> u128 {
        u128::from_be_bytes(self.0)
    }

    /// Parses the 32-hex-digit form.
    pub fn from_hex(s: &str) -> Option<SessionId> {
        if s.len() != 32 {
            return None;
        }
        let mut b = [0u8; 16];
        for (i, out) in b.iter_mut().enumerate() {
            *out = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(SessionId(b))
    }

    /// The session id of a request key (`affinity.key = ["header:…"]`):
    /// a hash, so every replica derives the same id without talking.
    pub fn for_key(key: &str) -> SessionId {
        use sha2::Digest;
        let digest = sha2::Sha256::new()
            .chain_update(b"tether request key\0")
            .chain_update(key.as_bytes())
            .finalize();
        let mut b = [0u8; 16];
        b.copy_from_slice(&digest[..16]);
        SessionId(b)
    }

    /// Lower-case hex, the form sent to workers in `Tether-Session`.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(32);
        for b in self.0 {
            s.push(char::from(HEX[(b >> 4) as usize]));
            s.push(char::from(HEX[(b & 0xf) as usize]));
        }
        s
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({})", self.to_hex())
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// What a cookie (or a pin-table entry) records about a session's pin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    /// The session.
    pub session: SessionId,
    /// Backend id the session is pinned to.
    pub backend: String,
    /// Worker instance tag seen when pinned (empty when unknown).
    pub instance: String,
    /// Pin epoch: increases on every re-pin (fencing token for workers).
    pub epoch: u64,
    /// Unix seconds when the session was first pinned (absolute TTL).
    pub issued_at: u64,
    /// Unix seconds when the cookie was last (re-)issued (idle timeout).
    pub refreshed_at: u64,
}

/// Pin lifetime rules from `[affinity]`.
#[derive(Debug, Clone, Copy)]
pub struct Lifetimes {
    /// Absolute life of a pin.
    pub ttl: Duration,
    /// Optional idle timeout.
    pub idle_timeout: Option<Duration>,
    /// Minimum interval between re-issues.
    pub refresh: Duration,
}

impl Lifetimes {
    /// Whether `pin` is still alive at `now` (Unix seconds).
    pub fn is_alive(&self, pin: &Pin, now: u64) -> bool {
        // A pin from the future (clock skew between replicas beyond the ttl)
        // is accepted: `saturating_sub` reads it as age zero.
        if now.saturating_sub(pin.issued_at) >= self.ttl.as_secs() {
            return false;
        }
        match self.idle_timeout {
            Some(idle) => now.saturating_sub(pin.refreshed_at) < idle.as_secs(),
            None => true,
        }
    }

    /// Whether a live pin's cookie should be re-issued now. Without an idle
    /// timeout the cookie's Max-Age already covers the whole TTL.
    pub fn needs_refresh(&self, pin: &Pin, now: u64) -> bool {
        self.idle_timeout.is_some()
            && now.saturating_sub(pin.refreshed_at) >= self.refresh.as_secs()
    }

    /// `Max-Age` for a cookie carrying `pin` issued at `now`: the smaller of
    /// the idle timeout and the remaining absolute life.
    pub fn max_age(&self, pin: &Pin, now: u64) -> u64 {
        let remaining = self
            .ttl
            .as_secs()
            .saturating_sub(now.saturating_sub(pin.issued_at));
        match self.idle_timeout {
            Some(idle) => remaining.min(idle.as_secs()),
            None => remaining,
        }
    }
}

/// How a request's pin came out, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinOutcome {
    /// No pin: a new session.
    New,
    /// A cookie or key was presented but rejected: a new session.
    Invalid(RejectReason),
    /// The existing pin was used.
    Kept,
    /// The pinned worker was lost: re-pinned elsewhere.
    Moved(MoveReason),
}

impl PinOutcome {
    /// Stable label for logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            PinOutcome::New => "new",
            PinOutcome::Invalid(_) => "invalid-cookie",
            PinOutcome::Kept => "kept",
            PinOutcome::Moved(_) => "moved",
        }
    }
}

/// Why a pin moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoveReason {
    /// The backend id is no longer configured.
    Removed,
    /// The backend is down or ejected.
    Down,
    /// The request to the pinned backend failed and was retried elsewhere.
    Failed,
    /// The worker restarted with empty memory (new `Tether-Instance`).
    Restarted,
    /// The worker has been draining for longer than `drain.timeout`.
    Drained,
    /// A move that re-pinned the session but did not finish its restore
    /// (its request failed or was cancelled) is finished.
    Resumed,
}

impl MoveReason {
    /// Stable label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            MoveReason::Removed => "removed",
            MoveReason::Down => "down",
            MoveReason::Failed => "failed",
            MoveReason::Restarted => "restarted",
            MoveReason::Drained => "drained",
            MoveReason::Resumed => "resumed",
        }
    }
}

/// What the pinned backend looks like right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinnedState {
    /// Configured and accepting its pinned users (up or draining).
    Usable,
    /// Draining for longer than `drain.timeout`: its users migrate.
    Drained,
    /// Configured but down or ejected.
    Down,
    /// Not configured any more.
    Removed,
}

/// The decision for one request, before a worker is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Forward to the pinned backend.
    Keep,
    /// Choose a worker for a new session.
    NewSession,
    /// Choose another worker for this session (next epoch).
    Move(MoveReason),
    /// `affinity.on_worker_loss = "fail"`: answer 503.
    Unavailable,
}

/// The decision table: no pin / pin to usable / pin to lost worker.
pub fn decide(pinned: Option<PinnedState>, on_loss: crate::config::OnWorkerLoss) -> Decision {
    use crate::config::OnWorkerLoss;
    match (pinned, on_loss) {
        (None, _) => Decision::NewSession,
        (Some(PinnedState::Usable), _) => Decision::Keep,
        (Some(PinnedState::Down), OnWorkerLoss::Move) => Decision::Move(MoveReason::Down),
        // Draining is an operator's decision: users migrate in both modes.
        (Some(PinnedState::Drained), _) => Decision::Move(MoveReason::Drained),
        // A removed worker never returns: even strict mode moves its users.
        (Some(PinnedState::Removed), _) => Decision::Move(MoveReason::Removed),
        (Some(PinnedState::Down), OnWorkerLoss::Fail) => Decision::Unavailable,
    }
}
