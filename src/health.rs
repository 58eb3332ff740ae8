//! Active health: one probe task per worker, `GET health.path` every
//! `interval` (jittered) with `timeout`; `fall` failures mark it down,
//! `rise` successes mark it up. The counting is the pure [`Counter`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, StatusCode, Uri};
use http_body_util::Empty;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rand::Rng;
use tokio_util::sync::CancellationToken;

use crate::backends::Backend;
use crate::metrics::ProbeLabels;
use crate::proxy::headers::TETHER_INSTANCE;
use crate::proxy::Proxy;

#[cfg(test)]
mod tests;

/// A verdict change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// `fall` failures in a row: down.
    Down,
    /// `rise` successes in a row: up.
    Up,
}

/// HAProxy-style rise/fall counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counter {
    up: bool,
    run: u32,
}

impl Counter {
    /// A counter in the given state.
    pub fn new(up: bool) -> Counter {
        Counter { up, run: 0 }
    }

    /// Whether the worker counts as up.
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Records one probe; returns the transition it caused, if any.
    pub fn record(&mut self, ok: bool, rise: u32, fall: u32) -> Option<Transition> {
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
pub struct Health {
    proxy: Proxy,
    cancel: CancellationToken,
    tasks: Arc<Mutex<HashMap<usize, CancellationToken>>>,
    client: Client<HttpConnector, Empty<bytes::Bytes>>,
}

impl Health {
    /// Starts a probe task for every configured worker.
    pub fn start(proxy: Proxy, cancel: CancellationToken) -> Health {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(1)
            .build(connector);
        let h = Health {
            proxy,
            cancel,
            tasks: Arc::new(Mutex::new(HashMap::new())),
            client,
        };
        h.sync();
        h
    }

    /// Starts tasks for new workers and stops those of removed ones.
    pub fn sync(&self) {
        let live = self.proxy.shared.live.load_full();
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        let current: HashMap<usize, Arc<Backend>> = live
            .backends
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
            let live = self.proxy.shared.live.load_full();
            let cfg = live.config.health.clone();
            drop(live);
            // ±10 % jitter so probes of many replicas do not line up.
            let jitter = rand::thread_rng().gen_range(0.9..1.1);
            let wait = cfg.interval.mul_f64(jitter);
            tokio::select! {
                _ = token.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            let ok = self.probe(&backend, &cfg.path, cfg.timeout).await;
            self.proxy
                .shared
                .metrics
                .probes
                .get_or_create(&ProbeLabels {
                    backend: backend.id.clone(),
                    result: if ok { "ok" } else { "fail" },
                })
                .inc();
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
        }
    }

    async fn probe(&self, backend: &Backend, path: &str, timeout: Duration) -> bool {
        let uri = match Uri::builder()
            .scheme("http")
            .authority(backend.authority.clone())
            .path_and_query(path)
            .build()
        {
            Ok(u) => u,
            Err(_) => return false,
        };
        let req = match Request::get(uri).body(Empty::new()) {
            Ok(r) => r,
            Err(_) => return false,
        };
        match tokio::time::timeout(timeout, self.client.request(req)).await {
            Ok(Ok(resp)) => {
                if let Some(seen) = resp
                    .headers()
                    .get(TETHER_INSTANCE)
                    .and_then(|v| v.to_str().ok())
                {
                    if let Some(old) = backend.observe_instance(seen) {
                        self.proxy.instance_changed(backend, &old, seen);
                    }
                }
                resp.status() == StatusCode::OK || resp.status().is_success()
            }
            Ok(Err(_)) | Err(_) => false,
        }
    }
}
