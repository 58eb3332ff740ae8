//! Active health: one probe task per worker, `GET health.path` every
//! `interval` (jittered) with `timeout`; `fall` failures mark it down,
//! `rise` successes mark it up. The counting is the pure [`Counter`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio_util::sync::CancellationToken;

use crate::backends::{Backend, WorkerSet};
use crate::live::SharedLive;
use crate::metrics::Metrics;
use crate::upstream::Upstream;

#[cfg(test)]
mod tests;

/// A verdict change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transition {
    /// `fall` failures in a row: down.
    Down,
    /// `rise` successes in a row: up.
    Up,
}

/// HAProxy-style rise/fall counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counter {
    up: bool,
    run: u32,
}

impl Counter {
    /// A counter in the given state.
    pub(crate) fn new(up: bool) -> Counter {
        Counter { up, run: 0 }
    }

    /// Whether the worker counts as up.
    pub(crate) fn is_up(&self) -> bool {
        self.up
    }

    /// Records one probe; returns the transition it caused, if any.
    pub(crate) fn record(&mut self, ok: bool, rise: u32, fall: u32) -> Option<Transition> {
        if ok == self.up {
            // A result that agrees with the state breaks the opposite run.
            self.run = 0;
            return None;
        }
        self.run += 1;
        let needed = if self.up { fall } else { rise };
        if self.run < needed.max(1) {
            return None;
        }
        self.run = 0;
        self.up = ok;
        Some(if ok { Transition::Up } else { Transition::Down })
    }
}

/// The probe tasks, kept in step with the worker set.
#[derive(Debug, Clone)]
pub(crate) struct Health {
    workers: WorkerSet,
    live: SharedLive,
    upstream: Upstream,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
    tasks: Arc<Mutex<HashMap<usize, CancellationToken>>>,
}

impl Health {
    /// Starts a probe task for every worker.
    pub(crate) fn start(
        workers: WorkerSet,
        live: SharedLive,
        upstream: Upstream,
        metrics: Arc<Metrics>,
        cancel: CancellationToken,
    ) -> Health {
        let h = Health {
            workers,
            live,
            upstream,
            metrics,
            cancel,
            tasks: Arc::new(Mutex::new(HashMap::new())),
        };
        h.sync();
        h
    }

    /// Starts tasks for new workers and stops those of removed ones.
    pub(crate) fn sync(&self) {
        let set = self.workers.snapshot();
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        let current: HashMap<usize, Arc<Backend>> = set
            .all()
            .iter()
            .map(|b| (Arc::as_ptr(b) as usize, b.clone()))
            .collect();
        tasks.retain(|k, token| {
            let keep = current.contains_key(k);
            if !keep {
                token.cancel();
            }
            keep
        });
        for (k, backend) in current {
            if tasks.contains_key(&k) {
                continue;
            }
            let token = self.cancel.child_token();
            tasks.insert(k, token.clone());
            tokio::spawn(self.clone().probe_loop(backend, token));
        }
    }

    async fn probe_loop(self, backend: Arc<Backend>, token: CancellationToken) {
        let mut counter = Counter::new(backend.probe_up());
        loop {
            let live = self.live.load_full();
            let cfg = live.config.health.clone();
            let settings = crate::upstream::Settings::of(&live);
            drop(live);
            // ±10 % jitter so probes of many replicas do not line up.
            let jitter = rand::thread_rng().gen_range(0.9..1.1);
            let wait = cfg.interval.mul_f64(jitter);
            tokio::select! {
                _ = token.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            let Some(ok) = self
                .probe(&backend, &settings, &cfg.path, cfg.timeout)
                .await
            else {
                // tether itself is short of sockets: no verdict on the worker.
                continue;
            };
            self.metrics.probe(&backend.id, ok);
            // Passive marks (refused connections) move the state too.
            if counter.is_up() != backend.probe_up() {
                counter = Counter::new(backend.probe_up());
            }
            match counter.record(ok, cfg.rise, cfg.fall) {
                Some(Transition::Down) => {
                    tracing::warn!(backend = %backend.id, "worker down: health probes failing");
                    backend.set_probe_up(false);
                }
                Some(Transition::Up) => {
                    tracing::info!(backend = %backend.id, "worker up");
                    backend.set_probe_up(true);
                    backend.forgive();
                }
                None => {}
            }
            // Dates the state change for the admin API and the dashboard.
            backend.observe_state();
        }
    }

    /// One probe on a fresh connection; a 2xx answer is healthy. The
    /// answer's `Tether-Instance` tells a restart. `None` when tether could
    /// not even open a socket (its own shortage, not the worker's).
    async fn probe(
        &self,
        backend: &Backend,
        settings: &crate::upstream::Settings,
        path: &str,
        timeout: Duration,
    ) -> Option<bool> {
        let answer = tokio::time::timeout(
            timeout,
            self.upstream
                .probe(&backend.endpoint, settings, path, timeout),
        )
        .await;
        match answer {
            Ok(Ok((status, instance))) => {
                if let Some(seen) = instance.as_deref() {
                    if let Some(old) = backend.observe_instance(seen) {
                        tracing::info!(backend = %backend.id, old, new = seen, "worker instance changed");
                        self.metrics.instance_change(&backend.id);
                    }
                }
                Some(status.is_success())
            }
            Ok(Err(crate::upstream::UpstreamError::Local { .. })) => None,
            Ok(Err(_)) | Err(_) => Some(false),
        }
    }
}
