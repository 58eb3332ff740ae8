//! The workers: each backend's identity, live state and counters
//! ([`Backend`]), an immutable snapshot of all of them ([`BackendSet`]) and
//! the handle that rebuilds the snapshot when the config or discovery
//! changes ([`WorkerSet`]).
//!
//! The [`Backend`]s inside a set are shared between snapshots (same id and
//! url) so their health, instance and session counts survive a reload.

mod set;
mod workers;

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use http::uri::Authority;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::BackendConfig;
use crate::upstream::Endpoint;

pub use set::BackendSet;
pub use workers::WorkerSet;

/// A backend's state as shown to operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Receives new sessions.
    Up,
    /// Failed probes or ejected: its users move.
    Down,
    /// No new sessions; pinned users stay until the drain timeout.
    Draining,
}

impl State {
    /// Stable label.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Up => "up",
            State::Down => "down",
            State::Draining => "draining",
        }
    }
}

/// One worker.
#[derive(Debug)]
pub struct Backend {
    /// Stable id (what cookies name).
    pub id: String,
    /// Base URL as configured.
    pub url: http::Uri,
    /// `host:port` to connect to.
    pub authority: Authority,
    /// Its upstream connections.
    pub(crate) endpoint: Endpoint,
    weight: AtomicU32,
    /// `max_inflight`, 0 = not set (see `balance.max_inflight`).
    max_inflight: AtomicU32,
    /// Requests at the worker and waiting for it (admission control).
    pub slots: crate::admission::Slots,
    probe_up: AtomicBool,
    /// Woken when the worker stops being usable (probes, a refused
    /// connection, an ejection): requests waiting on it give up at once.
    lost: Notify,
    draining: AtomicBool,
    /// Draining since (for the drain timeout).
    drain_started: Mutex<Option<Instant>>,
    /// Passive ejection: until this many ms after `epoch`, 0 = not ejected.
    ejected_until_ms: AtomicU64,
    ejections: AtomicU32,
    consecutive_failures: AtomicU32,
    sessions: AtomicI64,
    instance: Mutex<Option<String>>,
    /// The state last observed and since when (see
    /// [`Backend::observe_state`]).
    state_seen: Mutex<Option<(State, Instant)>>,
    born: Instant,
    /// Request counters by status class, resolved once (see metrics).
    pub(crate) request_counters:
        std::sync::OnceLock<[prometheus_client::metrics::counter::Counter; 5]>,
}

impl Backend {
    /// A backend from its config, initially up (probes adjust it).
    pub fn new(cfg: &BackendConfig) -> Backend {
        let authority = cfg
            .url
            .authority()
            .cloned()
            .unwrap_or_else(|| Authority::from_static("invalid:0"));
        Backend {
            id: cfg.id.clone(),
            url: cfg.url.clone(),
            endpoint: Endpoint::new(authority.clone()),
            authority,
            weight: AtomicU32::new(cfg.weight.max(1)),
            max_inflight: AtomicU32::new(cfg.max_inflight.unwrap_or(0)),
            slots: crate::admission::Slots::default(),
            probe_up: AtomicBool::new(true),
            lost: Notify::new(),
            draining: AtomicBool::new(false),
            drain_started: Mutex::new(None),
            ejected_until_ms: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            consecutive_failures: AtomicU32::new(0),
            sessions: AtomicI64::new(0),
            instance: Mutex::new(None),
            state_seen: Mutex::new(None),
            born: Instant::now(),
            request_counters: std::sync::OnceLock::new(),
        }
    }

    /// Balancing weight (≥ 1).
    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    /// The worker's own `max_inflight`, if set.
    pub fn max_inflight(&self) -> Option<u32> {
        match self.max_inflight.load(Ordering::Relaxed) {
            0 => None,
            n => Some(n),
        }
    }

    pub(crate) fn set_max_inflight(&self, n: Option<u32>) {
        self.max_inflight.store(n.unwrap_or(0), Ordering::Relaxed);
    }

    fn now_ms(&self) -> u64 {
        self.born.elapsed().as_millis() as u64
    }

    /// Whether pinned users may reach it (up or draining, not ejected).
    pub fn is_usable(&self) -> bool {
        self.probe_up.load(Ordering::Relaxed) && !self.is_ejected()
    }

    /// Whether new sessions may land on it.
    pub fn accepts_new(&self) -> bool {
        self.is_usable() && !self.draining.load(Ordering::Relaxed)
    }

    /// Whether a passive ejection is in force.
    pub fn is_ejected(&self) -> bool {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        until != 0 && self.now_ms() < until
    }

    /// The state shown to operators.
    pub fn state(&self) -> State {
        if !self.is_usable() {
            State::Down
        } else if self.draining.load(Ordering::Relaxed) {
            State::Draining
        } else {
            State::Up
        }
    }

    /// The state now and how long it has held. The state is derived
    /// (probes, ejection expiry, drain), so a change is noticed when it is
    /// observed: the health loop observes after every probe and the admin
    /// API on every read, which makes the time exact to a health interval.
    pub fn observe_state(&self) -> (State, Duration) {
        let now = self.state();
        let mut seen = self.state_seen.lock().unwrap_or_else(|p| p.into_inner());
        match *seen {
            Some((state, since)) if state == now => (now, since.elapsed()),
            _ => {
                *seen = Some((now, Instant::now()));
                (now, Duration::ZERO)
            }
        }
    }

    /// Sets the active-probe verdict.
    pub fn set_probe_up(&self, up: bool) {
        self.probe_up.store(up, Ordering::Relaxed);
        if up {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        } else {
            self.lost.notify_waiters();
        }
    }

    /// Resolves when the worker stops being usable. Create it before
    /// checking [`Backend::is_usable`] so no transition is missed.
    pub(crate) fn lost(&self) -> tokio::sync::futures::Notified<'_> {
        self.lost.notified()
    }

    /// Active-probe verdict.
    pub fn probe_up(&self) -> bool {
        self.probe_up.load(Ordering::Relaxed)
    }

    /// Marks the worker down at once (connection refused or reset).
    pub fn mark_down(&self) {
        self.probe_up.store(false, Ordering::Relaxed);
        self.lost.notify_waiters();
    }

    /// Starts or stops draining.
    pub fn set_draining(&self, on: bool) {
        self.draining.store(on, Ordering::Relaxed);
        let mut started = self.drain_started.lock().unwrap_or_else(|p| p.into_inner());
        *started = if on { Some(Instant::now()) } else { None };
    }

    /// How long the worker has been draining.
    pub fn draining_for(&self) -> Option<Duration> {
        let started = self.drain_started.lock().unwrap_or_else(|p| p.into_inner());
        started.map(|t| t.elapsed())
    }

    /// Counts a passive failure the worker declared itself (a
    /// 502/503/504 answer). Returns the ejection time when this failure
    /// opened the circuit.
    pub fn passive_failure(&self, threshold: u32, cooldown: Duration) -> Option<Duration> {
        self.passive_suspect(threshold)
            .then(|| self.eject(cooldown))
    }

    /// Counts a failure a client may have provoked (a reset after the
    /// request was written, no response head in time); `true` when it
    /// reaches `threshold` (the count starts over): the caller confirms
    /// with a probe before ejecting.
    pub fn passive_suspect(&self, threshold: u32) -> bool {
        let n = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n < threshold {
            return false;
        }
        self.consecutive_failures.store(0, Ordering::Relaxed);
        true
    }

    /// Opens the circuit now: ejected for `cooldown`, doubled for a worker
    /// that keeps failing. Returns the ejection time.
    pub fn eject(&self, cooldown: Duration) -> Duration {
        let k = self.ejections.fetch_add(1, Ordering::Relaxed).min(6);
        let time = cooldown.saturating_mul(1 << k);
        let until = self.now_ms() + time.as_millis() as u64;
        self.ejected_until_ms.store(until.max(1), Ordering::Relaxed);
        self.lost.notify_waiters();
        time
    }

    /// A success resets the consecutive-failure count. The ejection count
    /// (which doubles the cooldown) is reset only by a healthy probe streak.
    pub fn passive_success(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
    }

    /// Forgets past ejections (after `rise` successful probes).
    pub fn forgive(&self) {
        self.ejections.store(0, Ordering::Relaxed);
    }

    /// Live pinned sessions.
    pub fn sessions(&self) -> i64 {
        self.sessions.load(Ordering::Relaxed)
    }

    pub(crate) fn sessions_inc(&self) {
        self.sessions.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn sessions_dec(&self) {
        self.sessions.fetch_sub(1, Ordering::Relaxed);
    }

    /// The last `Tether-Instance` seen from this worker.
    pub fn instance(&self) -> Option<String> {
        self.instance
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records a `Tether-Instance` value; returns the previous one when it
    /// changed (the worker restarted with empty memory).
    pub fn observe_instance(&self, seen: &str) -> Option<String> {
        let mut cur = self.instance.lock().unwrap_or_else(|p| p.into_inner());
        match cur.as_deref() {
            Some(old) if old == seen => None,
            Some(old) => {
                let old = old.to_owned();
                *cur = Some(seen.to_owned());
                Some(old)
            }
            None => {
                *cur = Some(seen.to_owned());
                None
            }
        }
    }
}
