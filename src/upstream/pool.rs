//! One worker address and its idle connections.
//!
//! The idle list is LIFO (the most recently used connection is the one
//! least likely to have been closed by the worker) under a std mutex held
//! only for a few loads and moves, never across an `.await`. Entries are
//! kept oldest first, so the expired ones are a prefix.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http::header::{HeaderValue, CONNECTION, HOST};
use http::uri::{Authority, PathAndQuery};
use http::Request;
use hyper::client::conn::http1::SendRequest;
use tokio::time::Instant;

use super::body::OutBody;
use super::Counters;
use crate::proxy::body::ReplayBody;

/// How long a connection taken from the idle list may take to become ready.
/// A connection whose response body just ended is ready as soon as its task
/// has run once more (microseconds); one that is not by then is dropped.
const READY_WAIT: Duration = Duration::from_millis(100);

/// One worker address with its idle connections.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    pool: Arc<Pool>,
}

/// What an [`Endpoint`] shares with the response bodies that return
/// connections to it.
#[derive(Debug)]
pub(super) struct Pool {
    authority: Authority,
    /// Host without IPv6 brackets, and port (80 when the URL has none).
    host: Box<str>,
    port: u16,
    host_header: HeaderValue,
    /// The worker answered verification without `Tether-Instance`: new
    /// connections skip it until a probe sees the header.
    silent: AtomicBool,
    /// The worker has shown a `Tether-Instance` (sticky).
    reported: AtomicBool,
    idle: Mutex<Vec<Idle>>,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// An HTTP/1.1 connection to one worker process.
pub(super) struct Conn {
    pub(super) tx: SendRequest<OutBody>,
    /// The process it reaches (`Tether-Instance` of its verification).
    pub(super) instance: Option<Arc<str>>,
}

impl Endpoint {
    /// An endpoint for `authority` (`host:port`), with no connections yet.
    pub(crate) fn new(authority: Authority) -> Endpoint {
        let host = authority.host();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        Endpoint {
            pool: Arc::new(Pool {
                host: host.into(),
                port: authority.port_u16().unwrap_or(80),
                host_header: super::host_value(&authority),
                authority,
                silent: AtomicBool::new(false),
                reported: AtomicBool::new(false),
                idle: Mutex::new(Vec::new()),
            }),
        }
    }

    /// A response of this worker carried a `Tether-Instance`: new
    /// connections are verified from now on.
    pub(crate) fn saw_instance(&self) {
        self.pool.set_silent(false);
    }

    /// The worker's `host:port`.
    pub(crate) fn authority(&self) -> &Authority {
        &self.pool.authority
    }

    /// Idle connections kept now (closed ones included until next looked at).
    #[cfg(test)]
    pub(crate) fn idle_count(&self) -> usize {
        self.pool.lock().len()
    }

    /// Closes idle connections older than `idle_timeout`. Checkout and
    /// return do this too; this is for an endpoint no request visits.
    pub(crate) fn prune(&self, idle_timeout: Duration) {
        let now = Instant::now();
        let mut idle = self.pool.lock();
        expire(&mut idle, now, idle_timeout);
        idle.retain(|e| !e.conn.tx.is_closed());
    }

    pub(super) fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Idle connections not yet seen closed.
    #[cfg(test)]
    pub(super) fn idle_open(&self) -> usize {
        let idle = self.pool.lock();
        idle.iter().filter(|e| !e.conn.tx.is_closed()).count()
    }

    /// The instances of the idle connections, oldest first.
    #[cfg(test)]
    pub(super) fn idle_instances(&self) -> Vec<String> {
        let idle = self.pool.lock();
        let label = |e: &Idle| e.conn.instance.as_deref().unwrap_or("-").to_owned();
        idle.iter().map(label).collect()
    }

    /// An idle connection ready for a request, if there is one. At most
    /// one wait, so a checkout costs at most [`READY_WAIT`] more than a
    /// new connection would.
    pub(super) async fn checkout(
        &self,
        idle_timeout: Duration,
        connect_timeout: Duration,
        counters: &Counters,
    ) -> Option<Conn> {
        let mut may_wait = true;
        loop {
            let mut conn = match self.pool.take(idle_timeout, may_wait)? {
                Taken::Ready(conn) => return Some(conn),
                Taken::Transitioning(conn) => conn,
            };
            may_wait = false;
            // Its last response body ended but its task has not yet asked
            // for the next request.
            counters.ready_waits.fetch_add(1, Ordering::Relaxed);
            let wait = READY_WAIT.min(connect_timeout);
            match tokio::time::timeout(wait, conn.tx.ready()).await {
                Ok(Ok(())) => return Some(conn),
                // Closed meanwhile, or stuck: dropping it closes it.
                Ok(Err(_)) | Err(_) => continue,
            }
        }
    }
}

/// A connection from the idle list.
pub(super) enum Taken {
    Ready(Conn),
    Transitioning(Conn),
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, Vec<Idle>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn authority(&self) -> &Authority {
        &self.authority
    }

    pub(super) fn addr(&self) -> (&str, u16) {
        (&self.host, self.port)
    }

    pub(super) fn is_silent(&self) -> bool {
        self.silent.load(Ordering::Relaxed)
    }

    /// Marks the worker silent (its verification answer had no
    /// instance) or not; once it has shown an instance anywhere, it is
    /// never treated as silent again.
    pub(super) fn set_silent(&self, silent: bool) {
        if silent && self.reported.load(Ordering::Relaxed) {
            return;
        }
        if !silent {
            self.reported.store(true, Ordering::Relaxed);
        }
        self.silent.store(silent, Ordering::Relaxed);
    }

    /// The most recent idle connection that is ready; failing that (and if
    /// the caller `may_wait`), the most recent one still transitioning to
    /// its next request. Closed and expired entries are dropped on the way.
    pub(super) fn take(&self, idle_timeout: Duration, may_wait: bool) -> Option<Taken> {
        let mut idle = self.lock();
        expire(&mut idle, Instant::now(), idle_timeout);
        let mut transitioning: Vec<Idle> = Vec::new();
        let mut ready = None;
        while let Some(entry) = idle.pop() {
            if entry.conn.tx.is_ready() {
                ready = Some(entry.conn);
                break;
            }
            if !entry.conn.tx.is_closed() {
                transitioning.push(entry);
            }
        }
        if let Some(conn) = ready {
            // Back in their order, on top of what is left.
            idle.extend(transitioning.into_iter().rev());
            return Some(Taken::Ready(conn));
        }
        if !may_wait {
            idle.extend(transitioning.into_iter().rev());
            return None;
        }
        let mut rest = transitioning.into_iter();
        let first = rest.next()?;
        idle.extend(rest.rev());
        Some(Taken::Transitioning(first.conn))
    }

    /// Keeps `conn` for the next request, unless it is closed; the oldest
    /// entry makes room when `max_idle` are kept.
    pub(super) fn checkin(&self, conn: Conn, idle_timeout: Duration, max_idle: usize) {
        if conn.tx.is_closed() || max_idle == 0 {
            return;
        }
        let mut idle = self.lock();
        let now = Instant::now();
        expire(&mut idle, now, idle_timeout);
        if idle.len() >= max_idle {
            idle.retain(|e| !e.conn.tx.is_closed());
            let over = (idle.len() + 1).saturating_sub(max_idle);
            idle.drain(..over);
        }
        idle.push(Idle { conn, since: now });
    }

    /// A `GET path` for this worker: the verification probe (kept alive)
    /// or a health probe (`close`: the worker closes, so the TIME_WAIT
    /// lands on its side).
    pub(super) fn get(&self, path: &str, close: bool) -> Result<Request<OutBody>, http::Error> {
        let target = super::origin_form(&PathAndQuery::try_from(path)?);
        let mut req = Request::get(target).header(HOST, self.host_header.clone());
        if close {
            req = req.header(CONNECTION, HeaderValue::from_static("close"));
        }
        req.body(OutBody::new(ReplayBody::empty()))
    }
}

/// Drops the entries idle for `idle_timeout` or longer (a prefix).
fn expire(idle: &mut Vec<Idle>, now: Instant, idle_timeout: Duration) {
    let expired = |e: &Idle| now.saturating_duration_since(e.since) >= idle_timeout;
    // Usually the oldest is fresh, and so are all the others.
    if !idle.first().is_some_and(expired) {
        return;
    }
    let n = idle.partition_point(expired);
    idle.drain(..n);
}

impl std::fmt::Debug for Idle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idle")
            .field("instance", &self.conn.instance)
            .field("since", &self.since)
            .finish()
    }
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}
