//! The upstream path: tether's own HTTP/1.1 connections to workers, one
//! idle list per worker address ([`Endpoint`]).
//!
//! A generic pooled client hides two things tether needs. Which worker
//! *process* a connection reaches: a worker restarted on the same port has
//! empty memory, and a pinned session must not reach it before its restore;
//! a restart always means new connections, so the process (its
//! `Tether-Instance`) is learned once per connection, by a probe on that
//! connection before its first request. And whether a failed request went
//! out on a reused connection: a worker closing an idle keep-alive
//! connection races new requests, which is no sign of a sick worker.
//!
//! ```text
//! send ─▶ checkout: LIFO idle list ──────────────── hit ──┐
//!     └─▶ connect: TCP ─▶ handshake ─▶ verify: GET verify_path on that
//!         connection learns its instance (skipped for silent workers) ─┤
//!     ◀── InstanceChanged (another process; request not sent) ◀─ expect ┘
//!     ──▶ request ─▶ response head ─▶ UpstreamBody streams the body and
//!         returns the connection to the idle list when it ends cleanly
//! ```
//!
//! No task per request: a connection's own task (spawned once) drives it,
//! and readiness after a response is checked when the connection is next
//! taken from the idle list ([`Endpoint`]).

mod body;
mod connect;
mod error;
mod pool;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderValue, CONNECTION};
use http::uri::{Authority, PathAndQuery};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use tokio::time::{timeout_at, Instant};

use crate::live::Live;
use crate::proxy::body::{BoxError, ReplayBody};
use body::{OutBody, Progress, Return};
use error::{classify, ClosedAfterProbe, Refusal, TimedOut};
use pool::Conn;

pub(crate) use body::UpstreamBody;
pub(crate) use error::UpstreamError;
pub(crate) use pool::Endpoint;

/// Idle connections kept per worker, unless the config says otherwise.
pub(crate) const MAX_IDLE: usize = 64;

/// The origin-form request target (`/path?query`) a worker expects.
pub(crate) fn origin_form(path: &PathAndQuery) -> Uri {
    Uri::from(path.clone())
}

/// A `Host` value for a worker's authority (always a valid header value:
/// an authority has no byte a header value forbids).
pub(crate) fn host_value(authority: &Authority) -> HeaderValue {
    HeaderValue::from_str(authority.as_str())
        .unwrap_or_else(|_| HeaderValue::from_static("localhost"))
}

/// Sends requests to workers; cheap to clone.
#[derive(Debug, Clone, Default)]
pub(crate) struct Upstream {
    counters: Arc<Counters>,
}

/// Per-call settings, read from the live config.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// TCP connect plus the verification probe.
    pub connect_timeout: Duration,
    /// How long an idle connection is kept.
    pub idle_timeout: Duration,
    /// The health path, probed on every new connection.
    pub verify_path: Arc<str>,
    /// Idle connections kept per endpoint.
    pub max_idle: usize,
    /// Response head size limit.
    pub max_response_head: usize,
}

impl Settings {
    /// The settings of a config generation.
    pub(crate) fn of(live: &Live) -> Settings {
        let c = &live.config;
        Settings {
            connect_timeout: c.limits.connect_timeout,
            idle_timeout: c.limits.idle_timeout,
            verify_path: c.health.path.clone(),
            max_idle: MAX_IDLE,
            max_response_head: c.limits.max_header_bytes,
        }
    }
}

/// Which worker process the request may reach.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Expect<'a> {
    /// Any.
    Any,
    /// Only this `Tether-Instance` (a connection to a worker that sends
    /// none is accepted).
    Instance(&'a str),
}

/// Whether an idle connection may carry the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fresh {
    /// The most recent idle connection, or a new one.
    Pooled,
    /// Always a new connection (a retry after a reused one failed).
    New,
}

/// A response head from the worker.
#[derive(Debug)]
pub(crate) struct Sent {
    /// The response; its body returns the connection to the pool.
    pub response: Response<UpstreamBody>,
    /// The worker process the connection reaches, when it says.
    pub instance: Option<Arc<str>>,
    /// Whether the connection came from the idle list.
    pub reused: bool,
}

/// Connection counters since start.
#[derive(Debug, Default)]
struct Counters {
    connects: AtomicU64,
    verifications: AtomicU64,
    reuses: AtomicU64,
    ready_waits: AtomicU64,
}

/// A snapshot of [`Upstream`]'s counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Stats {
    /// New connections attempted.
    pub connects: u64,
    /// Verification probes sent on new connections.
    pub verifications: u64,
    /// Responses that came over a reused connection.
    pub reuses: u64,
    /// Idle connections that had to be waited for at checkout.
    pub ready_waits: u64,
}

impl Upstream {
    /// An upstream with no connections.
    pub(crate) fn new() -> Upstream {
        Upstream::default()
    }

    /// Sends `req` (origin-form URI `/path?query`; the caller sets `Host`)
    /// to `endpoint`. The wait for the response head is the caller's to
    /// bound; dropping this future closes the connection it was using.
    pub(crate) async fn send(
        &self,
        endpoint: &Endpoint,
        s: &Settings,
        expect: Expect<'_>,
        fresh: Fresh,
        req: Request<ReplayBody>,
    ) -> Result<Sent, UpstreamError> {
        let mut req = req.map(OutBody::new);
        let mut pooled = match fresh {
            Fresh::Pooled => {
                let c = &self.counters;
                endpoint
                    .checkout(s.idle_timeout, s.connect_timeout, c)
                    .await
            }
            Fresh::New => None,
        };
        loop {
            let (mut conn, reused) = match pooled.take() {
                Some(conn) => (conn, true),
                // Boxed: the connect path is rare and its future large;
                // inline, every request's future would carry (and copy) it.
                None => (Box::pin(self.connect(endpoint, s)).await?, false),
            };
            if let (Expect::Instance(want), Some(seen)) = (expect, &conn.instance) {
                if **seen != *want {
                    let seen = seen.to_string();
                    // A good connection to the current process: keep it.
                    endpoint.pool().checkin(conn, s.idle_timeout, s.max_idle);
                    return Err(UpstreamError::InstanceChanged { seen });
                }
            }
            let progress = req.body().progress();
            let err = match conn.tx.try_send_request(req).await {
                Ok(response) => return Ok(self.sent(endpoint, s, conn, reused, progress, response)),
                Err(err) => err,
            };
            match classify(err, reused) {
                // The idle connection was closed under us, before a byte
                // went out: once more on a new connection.
                Refusal::Unsent { req: back, source } if reused => {
                    tracing::debug!(upstream = %endpoint.authority(), error = %source, "idle connection closed; sending on a new one");
                    req = *back;
                }
                Refusal::Unsent { source, .. } => return Err(UpstreamError::NotSent { source }),
                Refusal::Error(e) => return Err(e),
            }
        }
    }

    /// A health probe: `GET path` on a new connection, closed after, all
    /// within `timeout`. Returns the status and `Tether-Instance`. Seeing
    /// the header (again) makes new connections verify again; its absence
    /// lets them skip verification. Also closes expired idle connections.
    pub(crate) async fn probe(
        &self,
        endpoint: &Endpoint,
        s: &Settings,
        path: &str,
        timeout: Duration,
    ) -> Result<(StatusCode, Option<String>), UpstreamError> {
        let pool = endpoint.pool();
        let deadline = Instant::now() + timeout;
        let max_head = s.max_response_head;
        let (tx, answer) = connect::probe(pool, path, true, max_head, deadline, timeout).await?;
        drop(tx); // closes the connection
        pool.set_silent(answer.instance.is_none());
        endpoint.prune(s.idle_timeout);
        Ok((answer.status, answer.instance))
    }

    /// Wraps the response so that its body returns `conn` to the pool, if
    /// the connection can carry another request.
    fn sent(
        &self,
        endpoint: &Endpoint,
        s: &Settings,
        conn: Conn,
        reused: bool,
        request: Progress,
        response: Response<Incoming>,
    ) -> Sent {
        if reused {
            self.counters.reuses.fetch_add(1, Ordering::Relaxed);
        }
        let instance = conn.instance.clone();
        let back = reusable(&response).then(|| Return {
            conn,
            pool: endpoint.pool().clone(),
            request,
            idle_timeout: s.idle_timeout,
            max_idle: s.max_idle,
        });
        Sent {
            response: response.map(|b| UpstreamBody::new(b, back)),
            instance,
            reused,
        }
    }

    /// Counters since start.
    pub(crate) fn stats(&self) -> Stats {
        let c = &self.counters;
        Stats {
            connects: c.connects.load(Ordering::Relaxed),
            verifications: c.verifications.load(Ordering::Relaxed),
            reuses: c.reuses.load(Ordering::Relaxed),
            ready_waits: c.ready_waits.load(Ordering::Relaxed),
        }
    }

    /// A new connection, verified unless the worker is known to be silent.
    async fn connect(&self, endpoint: &Endpoint, s: &Settings) -> Result<Conn, UpstreamError> {
        let pool = endpoint.pool();
        let budget = s.connect_timeout;
        let deadline = Instant::now() + budget;
        self.counters.connects.fetch_add(1, Ordering::Relaxed);
        if pool.is_silent() {
            let tcp = connect::dial(pool, deadline, budget).await?;
            let tx = connect::handshake(tcp, pool, s.max_response_head).await?;
            return Ok(Conn { tx, instance: None });
        }
        self.counters.verifications.fetch_add(1, Ordering::Relaxed);
        let max_head = s.max_response_head;
        let (mut tx, answer) =
            connect::probe(pool, &s.verify_path, false, max_head, deadline, budget).await?;
        if answer.instance.is_none() {
            pool.set_silent(true);
        }
        // The request may go only once the task is back to idle.
        let ready = timeout_at(deadline, tx.ready()).await;
        let source: BoxError = match ready {
            Ok(Ok(())) => {
                let instance = answer.instance.map(Arc::from);
                return Ok(Conn { tx, instance });
            }
            Ok(Err(_)) => Box::new(ClosedAfterProbe),
            Err(_) => Box::new(TimedOut(budget)),
        };
        Err(UpstreamError::Verify { source })
    }
}

/// Whether the connection outlives this response: not after an upgrade,
/// nor when the worker announced it closes (hyper then closes it after the
/// body; pooling it would only cost the next request a wait).
fn reusable<B>(response: &Response<B>) -> bool {
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        return false;
    }
    let closes = response
        .headers()
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("close"));
    !closes && response.version() == Version::HTTP_11
}
