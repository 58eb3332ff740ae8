//! The request path. One request runs these phases:
//!
//! 1. **screen**: reserved prefix, smuggling checks, declared body size;
//! 2. **route**: read the pin (cookie or request key), run the decision
//!    table, choose a worker for a new or moved session ([`route`]);
//! 3. **forward**: send to the worker over the pooled client, retrying on
//!    another worker when that is safe ([`forward`]);
//! 4. **respond**: strip hop-by-hop headers, drop the worker's copy of the
//!    affinity cookie, add ours, stream the body with an idle timeout.
//!
//! [`Proxy::handle`] is the outer handler: it maps a [`ProxyError`] to a
//! response and writes the one access-log line.

pub mod body;
mod connector;
mod continuity;
pub mod error;
mod forward;
pub mod headers;
mod route;
mod tunnel;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::affinity::pins::{PinTable, SessionTable};
use crate::affinity::{Codec, Lifetimes, PinOutcome};
use crate::backends::BackendSet;
use crate::clock::SharedClock;
use crate::config::{BackendConfig, Config};
use crate::continuity::capture::CaptureQueue;
use crate::continuity::contract::Contract;
use crate::continuity::overrides::Overrides;
use crate::continuity::writer::SessionWriter;
use crate::continuity::StoreSlot;
use crate::metrics::Metrics;

pub use body::ProxyBody;
pub use error::ProxyError;
pub use headers::Peer;

/// The reloadable part of the proxy: swapped whole on SIGHUP.
#[derive(Debug)]
pub struct Live {
    /// The validated config.
    pub config: Arc<Config>,
    /// Cookie codec over the configured keys.
    pub codec: Codec,
    /// The worker set.
    pub backends: BackendSet,
    /// Pin lifetimes.
    pub lifetimes: Lifetimes,
}

impl Live {
    /// Builds the live state, reusing backends of `previous`.
    pub fn build(config: Arc<Config>, previous: Option<&Live>) -> Live {
        let a = &config.affinity;
        Live {
            codec: Codec::new(&a.keys, &a.cookie),
            backends: BackendSet::build(&config.backends, previous.map(|p| &p.backends)),
            lifetimes: Lifetimes {
                ttl: a.ttl,
                idle_timeout: a.idle_timeout,
                refresh: a.refresh,
            },
            config,
        }
    }
}

/// Shared state of the proxy.
pub struct Shared {
    /// Config, keys and workers; swapped on reload. Its backends are the
    /// declared ones plus those discovery found.
    pub live: ArcSwap<Live>,
    /// The config as loaded (declared backends only), kept so a reload and
    /// a discovery change each replace only their own part.
    declared: ArcSwap<Config>,
    /// The backends DNS discovery found last (empty without discovery).
    discovered: ArcSwap<Vec<BackendConfig>>,
    /// Serializes rebuilds so a reload and a discovery change cannot
    /// overwrite each other's result.
    rebuilding: std::sync::Mutex<()>,
    client: Client<connector::Connector, body::ReplayBody>,
    /// Live sessions per worker.
    pub sessions: SessionTable,
    /// Request-key pins.
    pub pins: PinTable,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Wall clock for pin lifetimes.
    pub clock: SharedClock,
    rr: AtomicUsize,
    requests: AtomicU64,
    /// The store, once connected.
    pub store: StoreSlot,
    /// Newer re-pins than clients' cookies know.
    pub overrides: Overrides,
    /// Thread changes waiting to be captured.
    pub capture: CaptureQueue,
    /// Worker-contract client.
    pub contract: Contract,
    /// Session writes to the store.
    pub writer: SessionWriter,
    flights: continuity::Flights,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

/// The proxy service; cheap to clone.
#[derive(Debug, Clone)]
pub struct Proxy {
    /// Shared state.
    pub shared: Arc<Shared>,
}

impl Proxy {
    /// A proxy for `config`.
    pub fn new(config: Arc<Config>, metrics: Arc<Metrics>, clock: SharedClock) -> Proxy {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.limits.connect_timeout));
        connector.set_nodelay(true);
        connector.enforce_http(true);
        let queue = config.state.queue;
        let max_sessions = config.limits.max_sessions;
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(config.limits.idle_timeout)
            .build(connector::Connector(connector));
        Proxy {
            shared: Arc::new(Shared {
                live: ArcSwap::from_pointee(Live::build(config.clone(), None)),
                declared: ArcSwap::new(config),
                discovered: ArcSwap::from_pointee(Vec::new()),
                rebuilding: std::sync::Mutex::new(()),
                client,
                sessions: SessionTable::new(max_sessions),
                pins: PinTable::new(max_sessions),
                metrics,
                clock,
                rr: AtomicUsize::new(0),
                requests: AtomicU64::new(0),
                store: StoreSlot::default(),
                overrides: Overrides::new(max_sessions),
                capture: CaptureQueue::new(queue),
                contract: Contract::new(),
                writer: SessionWriter::new(queue),
                flights: continuity::Flights::default(),
            }),
        }
    }

    /// Swaps in a new config (backends, keys, limits that apply per
    /// request). Workers found by discovery stay while discovery is on.
    pub fn reload(&self, config: Arc<Config>) {
        self.shared.declared.store(config);
        self.rebuild();
    }

    /// Replaces the workers found by discovery (the declared ones stay).
    pub fn set_discovered(&self, found: Vec<BackendConfig>) {
        self.shared.discovered.store(Arc::new(found));
        self.rebuild();
    }

    fn rebuild(&self) {
        let _serial = self
            .shared
            .rebuilding
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let declared = self.shared.declared.load_full();
        let found = self.shared.discovered.load();
        let config = if declared.discovery.is_some() && !found.is_empty() {
            let mut merged = (*declared).clone();
            for b in found.iter() {
                if !merged.backends.iter().any(|s| s.id == b.id) {
                    merged.backends.push(b.clone());
                }
            }
            Arc::new(merged)
        } else {
            declared
        };
        let old = self.shared.live.load_full();
        self.shared
            .live
            .store(Arc::new(Live::build(config, Some(&old))));
    }

    /// The outer handler: runs the phases, maps errors to responses, logs
    /// once and counts.
    pub async fn handle(
        &self,
        req: http::Request<Incoming>,
        peer: &Peer,
    ) -> http::Response<ProxyBody> {
        let started = Instant::now();
        let request_id = self.shared.requests.fetch_add(1, Ordering::Relaxed);
        let live = self.shared.live.load_full();
        // The access line's inputs are copied only when it will be written.
        let access = tracing::enabled!(target: "tether::access", tracing::Level::INFO);
        let method = req.method().clone();
        let path = access.then(|| req.uri().path().to_owned());
        let mut trace = Trace::default();
        let resp = match self.run(req, peer, &live, &mut trace).await {
            Ok(resp) => resp,
            Err(err) => {
                if err.is_worker_failure() {
                    tracing::warn!(
                        request = request_id,
                        backend = trace.backend.as_ref().map_or("-", |b| b.id.as_str()),
                        error = %error::chain(&err),
                        "request failed"
                    );
                } else {
                    tracing::debug!(error = %error::chain(&err), "request refused");
                }
                err.to_response()
            }
        };
        let elapsed = started.elapsed();
        let m = &self.shared.metrics;
        m.latency.observe(elapsed.as_secs_f64());
        m.count_request(resp.status(), trace.backend.as_deref());
        if let Some(path) = path {
            tracing::info!(
                target: "tether::access",
                request = request_id,
                method = %method,
                path = %path,
                status = resp.status().as_u16(),
                backend = trace.backend.as_ref().map_or("-", |b| b.id.as_str()),
                pin = trace.outcome.map(|o| o.as_str()).unwrap_or("-"),
                session = %trace.session.map(|s| s.to_hex()).unwrap_or_default(),
                attempts = trace.attempts,
                duration_ms = elapsed.as_secs_f64() * 1000.0,
                peer = %peer.addr,
            );
        }
        resp
    }
}

/// What one request did, for the access log and metrics.
#[derive(Debug, Default)]
pub struct Trace {
    /// The worker that answered (or the last one tried).
    pub backend: Option<Arc<crate::backends::Backend>>,
    /// How the pin came out.
    pub outcome: Option<PinOutcome>,
    /// The session.
    pub session: Option<crate::affinity::SessionId>,
    /// Attempts made.
    pub attempts: u32,
    /// Forwarded without history after a failed restore.
    pub restore_failed: bool,
}
