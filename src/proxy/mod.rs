//! The request path. One request runs these phases:
//!
//! 1. **screen**: headers with `_` dropped, smuggling checks, request-line
//!    length, `Host` ([`host`]), reserved prefix, declared body size;
//! 2. **route**: read the pin (cookie or request key), run the decision
//!    table, choose a worker for a new or moved session ([`route`]);
//!    Rate limits ([`crate::admission`]) run right after routing;
//! 3. **continuity**: follow a newer pin, or move the session (restore its
//!    threads first) when its worker is lost or restarted ([`crate::restore`]);
//!    then the request takes a slot at its worker, queueing while the
//!    worker is at `max_inflight` ([`admit`]);
//! 4. **forward**: send to the worker over a connection verified to reach
//!    the pinned process, retrying when that is safe ([`forward`]);
//! 5. **respond**: strip hop-by-hop headers, drop the worker's copy of the
//!    affinity cookie, add ours, stream the body with an idle timeout.
//!
//! [`Proxy::handle`] is the outer handler: it maps a [`ProxyError`] to a
//! response and writes the one access-log line.

mod admit;
pub mod body;
mod continuity;
pub(crate) mod error;
mod forward;
pub mod headers;
pub mod host;
pub(crate) mod pace;
mod route;
mod tunnel;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use hyper::body::Incoming;

use crate::admission::Admission;
use crate::affinity::sessions::Sessions;
use crate::affinity::{PinOutcome, SessionId};
use crate::backends::{Backend, WorkerSet};
use crate::clock::SharedClock;
use crate::config::Config;
use crate::continuity::Continuity;
use crate::live::{Live, SharedLive};
use crate::metrics::Metrics;
use crate::upstream::Upstream;

pub use body::ProxyBody;
pub(crate) use error::ProxyError;
pub use headers::Peer;
pub(crate) use tunnel::Tunnels;

/// The proxy service; cheap to clone. It holds the handles the request
/// path needs and nothing else reaches into it.
#[derive(Debug, Clone)]
pub(crate) struct Proxy(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    live: SharedLive,
    workers: WorkerSet,
    sessions: Sessions,
    continuity: Continuity,
    upstream: Upstream,
    metrics: Arc<Metrics>,
    clock: SharedClock,
    tunnels: Tunnels,
    admission: Admission,
    requests: AtomicU64,
}

/// The handles a proxy is built from (the server builds them once).
#[derive(Debug, Clone)]
pub(crate) struct Parts {
    /// The config generation.
    pub live: SharedLive,
    /// The workers.
    pub workers: WorkerSet,
    /// Live sessions and request-key pins.
    pub sessions: Sessions,
    /// Capture, store and moves.
    pub continuity: Continuity,
    /// The upstream connection pools.
    pub upstream: Upstream,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Wall clock for pin lifetimes.
    pub clock: SharedClock,
    /// Open upgraded connections.
    pub tunnels: Tunnels,
}

impl Proxy {
    /// A proxy over `parts`.
    pub(crate) fn new(parts: Parts) -> Proxy {
        let config = parts.live.load_full().config.clone();
        let admission = Admission::new(&config, parts.metrics.clone());
        admission.apply_limits(parts.workers.load().all(), &config);
        Proxy(Arc::new(Inner {
            admission,
            live: parts.live,
            workers: parts.workers,
            sessions: parts.sessions,
            continuity: parts.continuity,
            upstream: parts.upstream,
            metrics: parts.metrics,
            clock: parts.clock,
            tunnels: parts.tunnels,
            requests: AtomicU64::new(0),
        }))
    }

    /// Swaps in a new config: limits and keys for new requests, and the
    /// declared workers (discovered ones stay).
    pub(crate) fn reload(&self, config: Arc<Config>) {
        self.0.workers.set_declared(&config.backends);
        self.0.admission.reload(&config);
        self.0
            .admission
            .apply_limits(self.0.workers.load().all(), &config);
        self.0.live.store(Arc::new(Live::new(config)));
    }

    /// The outer handler: runs the phases, maps errors to responses, logs
    /// once and counts.
    pub(crate) async fn handle(
        &self,
        req: http::Request<Incoming>,
        peer: &Peer,
    ) -> http::Response<ProxyBody> {
        let started = Instant::now();
        let request_id = self.0.requests.fetch_add(1, Ordering::Relaxed);
        let live = self.0.live.load_full();
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
        self.0.metrics.request(
            resp.status(),
            trace.backend.as_deref(),
            elapsed.as_secs_f64(),
        );
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
                reused = trace.reused,
                duration_ms = elapsed.as_secs_f64() * 1000.0,
                peer = %peer.addr,
            );
        }
        resp
    }
}

/// What one request did, for the access log and metrics.
#[derive(Debug, Default)]
struct Trace {
    /// The worker that answered (or the last one tried).
    backend: Option<Arc<Backend>>,
    /// How the pin came out.
    outcome: Option<PinOutcome>,
    /// The session.
    session: Option<SessionId>,
    /// Attempts made.
    attempts: u32,
    /// Whether the answer came over a reused upstream connection.
    reused: bool,
}
