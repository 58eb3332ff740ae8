//! Admission control: what may reach a worker, and when.
//!
//! - **Rate limits** (`[[rate_limits]]`, [`rate`]): checked after routing,
//!   before anything moves or is forwarded; every rule that matches a
//!   request must admit it, else `429` with `Retry-After` from the bucket.
//! - **Slots** (`max_inflight`, `[queue]`, [`queue`]): a request takes a
//!   slot at its worker after routing and continuity, and holds it for the
//!   life of its response body (or tunnel); at a full worker it waits in
//!   that worker's FIFO queue, never moved elsewhere.
//!
//! With no rules and no `max_inflight` both checks are one atomic load and
//! a length test: no lock, no allocation.

pub(crate) mod queue;
pub(crate) mod rate;

#[cfg(test)]
mod tests;

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::HeaderMap;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use crate::backends::Backend;
use crate::config::{Config, RateKey, RateLimit};
use crate::metrics::Metrics;

pub use queue::{Refused, Slot, Slots};

/// A request refused by a rate-limit rule.
#[derive(Debug, Clone, thiserror::Error)]
#[error("rate limit {rule:?} exceeded")]
pub struct RateLimited {
    /// The rule's name (or index).
    pub rule: String,
    /// When its bucket admits a request again.
    pub retry_after: Duration,
}

/// What one request offers the rate-limit rules.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    /// The request headers.
    pub headers: &'a HeaderMap,
    /// The request path.
    pub path: &'a str,
    /// The client's address.
    pub ip: IpAddr,
    /// The session, when the request carries one.
    pub session: Option<&'a [u8]>,
}

/// The admission handle; cheap to clone.
#[derive(Debug, Clone)]
pub struct Admission(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    rules: ArcSwap<Vec<Arc<Rule>>>,
    metrics: Arc<Metrics>,
    /// Seeds the key hashes (clients cannot aim at one shard or key).
    seed: RandomState,
}

#[derive(Debug)]
struct Rule {
    config: RateLimit,
    max_keys: usize,
    limiter: rate::Limiter,
    limited: Counter,
    keys: Gauge,
}

impl Admission {
    /// The admission state for `config`.
    pub(crate) fn new(config: &Config, metrics: Arc<Metrics>) -> Admission {
        let a = Admission(Arc::new(Inner {
            rules: ArcSwap::from_pointee(Vec::new()),
            metrics,
            seed: RandomState::new(),
        }));
        a.reload(config);
        a
    }

    /// An admission state of its own (metrics not exported), for
    /// benchmarks.
    #[doc(hidden)]
    pub fn standalone(config: &Config) -> Admission {
        Admission::new(config, Arc::new(Metrics::new()))
    }

    /// Applies a new config's rules; a rule unchanged keeps its buckets.
    pub(crate) fn reload(&self, config: &Config) {
        let old = self.0.rules.load_full();
        let max_keys = config.rate_limit.max_keys;
        let rules = config
            .rate_limits
            .iter()
            .map(|c| {
                let same = old
                    .iter()
                    .find(|r| r.config == *c && r.max_keys == max_keys);
                match same {
                    Some(r) => r.clone(),
                    None => Arc::new(Rule {
                        config: c.clone(),
                        max_keys,
                        limiter: rate::Limiter::new(c, max_keys),
                        limited: self.0.metrics.rate_limited_counter(&c.name),
                        keys: self.0.metrics.rate_limit_keys_gauge(&c.name),
                    }),
                }
            })
            .collect();
        self.0.rules.store(Arc::new(rules));
    }

    /// Runs every rule that matches; the first that refuses answers.
    pub fn check_rates(&self, s: Subject<'_>) -> Result<(), RateLimited> {
        let rules = self.0.rules.load();
        if rules.is_empty() {
            return Ok(());
        }
        for rule in rules.iter() {
            let c = &rule.config;
            if c.path_prefix
                .as_deref()
                .is_some_and(|p| !s.path.starts_with(p))
            {
                continue;
            }
            let key = match &c.key {
                RateKey::Ip => self.0.seed.hash_one(s.ip),
                RateKey::Session => match s.session {
                    Some(id) => self.0.seed.hash_one(id),
                    None => continue,
                },
                RateKey::Header(name) => match s.headers.get(name) {
                    Some(v) => self.0.seed.hash_one(v.as_bytes()),
                    None => continue,
                },
            };
            let verdict = rule.limiter.check(key);
            rule.keys
                .set(i64::try_from(rule.limiter.keys()).unwrap_or(i64::MAX));
            if let Err(wait) = verdict {
                rule.limited.inc();
                return Err(RateLimited {
                    rule: c.name.clone(),
                    retry_after: wait,
                });
            }
        }
        Ok(())
    }

    /// Takes a slot at `backend` when it has a `max_inflight` (its own or
    /// `balance.max_inflight`), waiting in its queue as `[queue]` says.
    /// `None`: the worker is unlimited (nothing to hold).
    pub async fn admit(
        &self,
        backend: &Arc<Backend>,
        config: &Config,
    ) -> Result<Option<Slot>, Refused> {
        let Some(limit) = backend.max_inflight().or(config.balance.max_inflight) else {
            // Unlimited now; a limit removed by a reload frees any waiters.
            if backend.slots.queued() > 0 {
                backend.slots.set_limit(0);
            }
            return Ok(None);
        };
        let wait = queue::Wait {
            timeout: config.queue.timeout,
            max_waiting: config.queue.max_waiting,
        };
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        match queue::acquire(backend, limit, wait).await {
            Ok((slot, waited)) => {
                if let Some(waited) = waited {
                    self.0.metrics.queue_wait(&backend.id, waited.as_secs_f64());
                }
                Ok(Some(slot))
            }
            Err(refused) => {
                if refused != Refused::Lost {
                    self.0
                        .metrics
                        .admission_rejected(&backend.id, refused.as_str());
                }
                Err(refused)
            }
        }
    }

    /// After a reload: every worker's limit as now configured (raised
    /// limits hand slots to waiters at once).
    pub(crate) fn apply_limits(&self, workers: &[Arc<Backend>], config: &Config) {
        for b in workers {
            let limit = b.max_inflight().or(config.balance.max_inflight);
            let limit = limit.map_or(0, |n| usize::try_from(n).unwrap_or(usize::MAX));
            b.slots.set_limit(limit);
        }
    }
}

/// `Retry-After` seconds for a wait: rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}
