//! Screening and routing: which worker a request goes to, and the pin it
//! leaves behind.

use std::sync::Arc;

use http::header::{HeaderValue, CONTENT_LENGTH};
use http::{HeaderMap, Request, Version};
use hyper::body::Incoming;

use super::headers::{Peer, Smuggling};
use super::{headers, host, Proxy, ProxyError, Trace};
use crate::affinity::sessions::Touched;
use crate::affinity::{
    self, cookies, Decision, Pin, PinOutcome, PinnedState, RejectReason, SessionId,
};
use crate::backends::{Backend, BackendSet};
use crate::balancer;
use crate::config::{BalanceKey, KeySource};
use crate::live::Live;
use crate::restore::Landing;
use crate::store::SessionRow;

/// How a session is bound to its requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Binding {
    /// By the affinity cookie (re-issued on change).
    Cookie,
    /// By a request key, pinned in the pin table.
    Key(String),
}

/// The routing result for one request.
#[derive(Debug)]
pub(super) struct Route {
    pub backend: Arc<Backend>,
    pub pin: Pin,
    pub binding: Binding,
    pub outcome: PinOutcome,
    /// Whether the client must get a fresh cookie.
    pub set_cookie: bool,
    /// The backend the session left, when it moved.
    pub from: Option<String>,
}

impl Route {
    /// The session now lives where a move (or a newer pin) put it: the
    /// one place a route changes worker.
    pub(super) fn land(&mut self, backend: Arc<Backend>, epoch: u64, instance: String, now: u64) {
        self.pin.backend = backend.id.clone();
        self.pin.epoch = epoch;
        self.pin.instance = instance;
        self.pin.refreshed_at = now;
        self.backend = backend;
        self.set_cookie = self.binding == Binding::Cookie;
    }

    /// After a move.
    pub(super) fn landed(&mut self, l: Landing, now: u64) {
        self.land(l.backend, l.epoch, l.instance, now);
    }
}

/// The length of the request line `METHOD SP target SP HTTP/1.1` (on
/// HTTP/2, with `:path` as the target).
fn request_line_len<B>(req: &Request<B>) -> usize {
    let uri = req.uri();
    let path = uri.path_and_query().map_or(1, |p| p.as_str().len());
    let authority = match (req.version(), uri.authority()) {
        (Version::HTTP_2 | Version::HTTP_3, _) | (_, None) => 0,
        // Absolute form: "scheme://authority".
        (_, Some(a)) => uri.scheme_str().map_or(0, |s| s.len() + 3) + a.as_str().len(),
    };
    req.method().as_str().len() + 1 + authority + path + " HTTP/1.1".len()
}

impl Proxy {
    /// Refuses what must never reach a worker.
    /// Returns the host to forward (see [`host::effective_host`]).
    pub(super) fn screen(
        req: &Request<Incoming>,
        peer: &Peer,
        live: &Live,
    ) -> Result<Option<HeaderValue>, ProxyError> {
        // The connection's scanner saw a head hyper hides the ambiguity of.
        if let Some(refused) = req.extensions().get::<Smuggling>() {
            return Err(ProxyError::Smuggling(*refused));
        }
        let limit = live.config.limits.max_request_line_bytes;
        if request_line_len(req) > limit {
            return Err(ProxyError::UriTooLong { limit });
        }
        let host = host::effective_host(req, peer)?;
        if headers::is_reserved(req.uri().path(), &live.config.state.path) {
            return Err(ProxyError::ReservedPath);
        }
        headers::check_framing(req.headers())?;
        if let Some(limit) = live.config.limits.max_body_bytes {
            let declared = req
                .headers()
                .get(CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if declared.is_some_and(|n| n > limit) {
                return Err(ProxyError::BodyTooLarge { limit });
            }
        }
        Ok(host)
    }

    /// Reads the request's pin and decides where it goes.
    pub(super) fn route(
        &self,
        h: &HeaderMap,
        peer: &Peer,
        live: &Live,
        workers: &BackendSet,
        trace: &mut Trace,
    ) -> Result<Route, ProxyError> {
        let now = self.0.clock.now_unix();
        let (found, binding) = self.find_pin(h, peer, live, now);
        let (pin, rejected) = match found {
            Ok(pin) => (pin, None),
            Err(reason) => (None, reason),
        };
        if let Some(reason) = rejected {
            self.0.metrics.cookie_reject(reason.as_str());
        }
        // The pinned worker, looked up once.
        let pinned = pin.as_ref().and_then(|p| workers.get(&p.backend));
        let pinned_state = pin.as_ref().map(|_| match pinned {
            Some(b) if b.is_usable() => match b.draining_for() {
                Some(t) if t >= live.config.drain.timeout => PinnedState::Drained,
                _ => PinnedState::Usable,
            },
            Some(_) => PinnedState::Down,
            None => PinnedState::Removed,
        });
        let decision = affinity::decide(pinned_state, live.config.affinity.on_worker_loss);
        let route = match (decision, pin) {
            (Decision::Keep, Some(mut pin)) => {
                let backend = pinned.cloned().ok_or(ProxyError::NoWorker)?;
                let set_cookie =
                    binding == Binding::Cookie && live.lifetimes.needs_refresh(&pin, now);
                if set_cookie || binding != Binding::Cookie {
                    pin.refreshed_at = now;
                }
                Route {
                    backend,
                    pin,
                    binding,
                    outcome: PinOutcome::Kept,
                    set_cookie,
                    from: None,
                }
            }
            (Decision::Move(reason), Some(pin)) => {
                let backend = balancer::choose_repin(&pin.session.0, workers, Some(&pin.backend))
                    .ok_or(ProxyError::NoWorker)?;
                // The pin changes only when the move lands (or fails).
                Route {
                    set_cookie: binding == Binding::Cookie,
                    from: Some(pin.backend.clone()),
                    backend,
                    pin,
                    binding,
                    outcome: PinOutcome::Moved(reason),
                }
            }
            (Decision::Unavailable, Some(pin)) => {
                trace.session = Some(pin.session);
                return Err(ProxyError::PinnedUnavailable {
                    backend: pin.backend,
                });
            }
            // The table only keeps or moves when there is a pin.
            (Decision::Keep | Decision::Move(_) | Decision::Unavailable, None)
            | (Decision::NewSession, _) => {
                let session = match &binding {
                    Binding::Key(key) => SessionId::for_key(key),
                    Binding::Cookie => SessionId::random(),
                };
                let key = balance_key(h, live, &session);
                let backend = balancer::choose_new(
                    live.config.balance.policy,
                    &key,
                    workers,
                    self.0.sessions.rr(),
                    None,
                )
                .ok_or(ProxyError::NoWorker)?;
                let pin = Pin {
                    session,
                    backend: backend.id.clone(),
                    instance: backend.instance().unwrap_or_default(),
                    epoch: 1,
                    issued_at: now,
                    refreshed_at: now,
                };
                Route {
                    set_cookie: binding == Binding::Cookie,
                    from: None,
                    backend,
                    pin,
                    binding,
                    outcome: match rejected {
                        Some(r) => PinOutcome::Invalid(r),
                        None => PinOutcome::New,
                    },
                }
            }
        };
        Ok(route)
    }

    /// Records the route's pin in the in-memory tables (and, now and then,
    /// in the store).
    pub(super) fn remember(&self, route: &Route, live: &Live) {
        let now = self.0.clock.now_unix();
        let l = &live.lifetimes;
        let expires_at = match l.idle_timeout {
            Some(idle) => (now + idle.as_secs()).min(route.pin.issued_at + l.ttl.as_secs()),
            None => route.pin.issued_at + l.ttl.as_secs(),
        };
        let touched = self
            .0
            .sessions
            .touch(route.pin.session, &route.backend, expires_at, now);
        // A request key's pin must reach the store at once (other replicas
        // look it up there); a cookie session's waits for its second
        // request (a client that never returns costs no write).
        let due = match touched {
            Touched::Due => true,
            Touched::New => matches!(route.binding, Binding::Key(_)),
            Touched::Quiet => false,
        };
        if due {
            let row = SessionRow {
                session_id: route.pin.session.to_hex(),
                backend_id: route.backend.id.clone(),
                instance: route.pin.instance.clone(),
                epoch: route.pin.epoch,
                created_at: route.pin.issued_at,
                last_seen: now,
                expires_at,
            };
            self.0.continuity.remember(row);
        }
        if let Binding::Key(_) = &route.binding {
            self.0.sessions.set_pin(route.pin.clone());
        }
    }

    /// A request key this replica has not pinned yet is read from the store
    /// once, so every replica routes a key to the same worker. When the
    /// store cannot answer, the request is refused (`503`): a new pin made
    /// blind could send an existing conversation to a worker without its
    /// history.
    pub(super) async fn preload_key_pin(
        &self,
        h: &HeaderMap,
        live: &Live,
    ) -> Result<(), ProxyError> {
        let Some(KeySource::Header(name)) = live.config.affinity.key.iter().find(|s| match s {
            KeySource::Header(n) => h.contains_key(n),
            KeySource::Cookie => false,
        }) else {
            return Ok(());
        };
        let Some(key) = h.get(name).and_then(|v| v.to_str().ok()).map(str::trim) else {
            return Ok(());
        };
        if key.is_empty() || self.0.sessions.pin(key).is_some() {
            return Ok(());
        }
        let id = SessionId::for_key(key);
        let deadline = tokio::time::Instant::now() + live.config.state.restore_timeout;
        let row = self
            .0
            .continuity
            .stored_pin(&id.to_hex(), deadline)
            .await
            .map_err(ProxyError::KeyLookup)?;
        let now = self.0.clock.now_unix();
        if let Some(row) = row {
            // A key names one conversation for as long as the store keeps
            // it: a pin past its life starts a new one (its worker, or a
            // move with a restore) instead of a conversation with no past.
            let issued_at = if row.expires_at > now {
                row.created_at
            } else {
                now
            };
            self.0.sessions.set_pin(Pin {
                session: id,
                backend: row.backend_id,
                instance: row.instance,
                epoch: row.epoch,
                issued_at,
                refreshed_at: now,
            });
        }
        Ok(())
    }

    /// The pin named by the first key source present in the request.
    /// `Err` carries why a presented cookie was rejected.
    fn find_pin(
        &self,
        h: &HeaderMap,
        peer: &Peer,
        live: &Live,
        now: u64,
    ) -> (Result<Option<Pin>, Option<RejectReason>>, Binding) {
        let mut rejected = None;
        for source in &live.config.affinity.key {
            match source {
                KeySource::Header(name) => {
                    let Some(key) = h.get(name).and_then(|v| v.to_str().ok()) else {
                        continue;
                    };
                    let key = key.trim();
                    if key.is_empty() {
                        continue;
                    }
                    // A key names one conversation: a pin past its life
                    // starts again where it was (its worker, or a move
                    // with a restore), never as a conversation with no past.
                    let pin = self.0.sessions.pin(key).map(|p| {
                        if live.lifetimes.is_alive(&p, now) {
                            p
                        } else {
                            Pin {
                                issued_at: now,
                                refreshed_at: now,
                                ..p
                            }
                        }
                    });
                    return (Ok(pin), Binding::Key(key.to_owned()));
                }
                KeySource::Cookie => {
                    for value in cookies::find(h, live.codec.name()) {
                        let opened =
                            live.codec
                                .open_alive_cached(value, &live.lifetimes, now, &peer.cookie);
                        match opened {
                            Ok(pin) => return (Ok(Some(pin)), Binding::Cookie),
                            Err(reason) => rejected = Some(reason),
                        }
                    }
                }
            }
        }
        match rejected {
            Some(r) => (Err(Some(r)), Binding::Cookie),
            None => (Ok(None), Binding::Cookie),
        }
    }
}

/// The bytes rendezvous hashing uses for a new session: `balance.key` when
/// the request has it, else the session id.
fn balance_key(h: &HeaderMap, live: &Live, session: &SessionId) -> Vec<u8> {
    let found = match &live.config.balance.key {
        Some(BalanceKey::Header(name)) => h.get(name).map(|v| v.as_bytes().to_vec()),
        Some(BalanceKey::Cookie(name)) => {
            cookies::find(h, name).next().map(|v| v.as_bytes().to_vec())
        }
        None => None,
    };
    found
        .filter(|k| !k.is_empty())
        .unwrap_or_else(|| session.0.to_vec())
}
