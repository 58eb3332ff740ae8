//! Forwarding: the attempt loop and the response rewrite.
//!
//! Each attempt goes over a connection verified to reach the process the
//! pin names (a restarted worker is never sent a pinned request before the
//! session is restored into it). Failures are classified by who failed and
//! whether anything reached the worker:
//!
//! | failure | worker health | retry |
//! |---|---|---|
//! | connection refused | down at once (not the last usable one) | elsewhere, always |
//! | connect timeout, unanswered verification | one passive failure | elsewhere, always |
//! | connection reaches another process | instance learned, session restored in place | same worker |
//! | reused connection closed under the request | none (keep-alive race) | same worker, fresh connection, if idempotent |
//! | reset or closed after the request was written | one passive failure | elsewhere, if idempotent |
//! | no response head within `limits.response_timeout` | one passive failure | no (`504`) |
//! | health marked the worker down meanwhile | (already down) | no (`504`) |
//! | the client's body broke | none: the client's fault | no (`400`) |
//!
//! A request that already failed on one worker is never counted against
//! the next one: a poisonous request must not eject a second worker.

use std::sync::Arc;

use http::header::{HeaderValue, HOST, SET_COOKIE};
use http::uri::PathAndQuery;
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use super::admit::{self, Placed};
use super::body::{BodyWatch, BoxError, IdleBody, ReplayBody};
use super::continuity::History;
use super::headers::{self, Peer};
use super::pace::PacedBody;
use super::route::{Binding, Route};
use super::{tunnel, Proxy, ProxyBody, ProxyError, Trace};
use crate::admission::Slot;
use crate::affinity::{cookies, MoveReason};
use crate::backends::{Backend, BackendSet};
use crate::balancer;
use crate::config::Capture;
use crate::continuity::capture::Source;
use crate::live::Live;
use crate::store::Fence;
use crate::upstream::{self, Expect, Fresh, Sent, UpstreamBody, UpstreamError};
use crate::wire::{
    instance_of, is_tether_header, TETHER_CHECKPOINT, TETHER_EPOCH, TETHER_RESTORE, TETHER_SESSION,
};

/// How one attempt failed, and what the loop does about it.
#[derive(Debug)]
enum Attempt {
    /// The connection reaches another process than the pin names: restore
    /// into it, then send again (nothing was sent).
    Restarted,
    /// Send again to the same worker on a fresh connection.
    Again,
    /// Send to another worker (a move), when `nothing_sent` or the request
    /// is safe to repeat.
    Elsewhere {
        error: ProxyError,
        nothing_sent: bool,
    },
    /// Give up with this error.
    Fail(ProxyError),
}

impl Proxy {
    /// The inner handler: screen, route, continuity, forward, respond.
    pub(super) async fn run(
        &self,
        mut req: Request<Incoming>,
        peer: &Peer,
        live: &Live,
        trace: &mut Trace,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        if !live.config.limits.allow_underscore_headers {
            headers::drop_underscored(req.headers_mut());
        }
        let host = Self::screen(&req, peer, live)?;
        self.preload_key_pin(req.headers(), live).await?;
        // Route, rate limits, continuity, and a slot at the worker.
        let Placed {
            workers,
            mut route,
            mut history,
            mut slot,
        } = self.place(&req, peer, live, trace).await?;
        self.remember(&route, live);
        trace.outcome = Some(route.outcome);

        let upgrade = headers::is_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        // Only removals here: values tether adds go into each attempt's
        // copy, so copying the client's (parser-shared) values stays cheap.
        headers::strip_hop_by_hop(&mut parts.headers, upgrade);
        let outbound = Outbound {
            peer,
            host: host.as_ref(),
            cookie: live.codec.name(),
        };
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let body = if http_body::Body::is_end_stream(&body) {
            ReplayBody::empty()
        } else {
            let limits = &live.config.limits;
            let body = PacedBody::new(body, limits.body_timeout, limits.min_body_rate);
            let body: ProxyBody = match live.config.limits.max_body_bytes {
                Some(limit) => Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX))
                    .map_err(BoxError::from)
                    .boxed(),
                None => body.boxed(),
            };
            ReplayBody::new(body, live.config.limits.retry_body_bytes)
        };
        let retry_safe = headers::is_retry_safe(&parts.method, &parts.headers);

        let mut next_body = Some(body);
        let mut fresh = Fresh::Pooled;
        // The first worker a failure was counted against; later ones are
        // never blamed for the same request.
        let mut blamed = false;
        loop {
            trace.attempts += 1;
            trace.backend = Some(route.backend.clone());
            let Some(this_body) = next_body.take() else {
                return Err(ProxyError::NoWorker);
            };
            self.reslot(&mut slot, &route, live).await?;
            next_body = this_body.try_clone();
            let watch = this_body.watch();
            let req = upstream_request(&parts, &path, &route, &outbound, this_body);
            // A move of this session waits while the request is on its way
            // to the worker and until its checkpoint is recorded.
            let in_flight = self.0.continuity.in_flight(route.pin.session);
            let sent = self.send(live, &route, fresh, req, &watch).await;
            let failure = match sent {
                Ok(sent) => {
                    trace.reused = sent.reused;
                    if !blamed {
                        self.passive_outcome(
                            live,
                            &workers,
                            &route.backend,
                            sent.response.status(),
                        );
                    }
                    let (resp, stranger) = self
                        .respond(sent, &route, live, peer, client_upgrade, &mut slot.slot)
                        .await?;
                    let mut resp = admit::hold(resp, slot.slot.take(), live);
                    drop(in_flight);
                    if stranger {
                        history = History::Missing;
                    }
                    if let Some(mark) = history.mark() {
                        resp.headers_mut()
                            .insert(TETHER_RESTORE, HeaderValue::from_static(mark));
                        if history == History::Partial && resp.status().is_success() {
                            self.partial_reported(&route);
                        }
                    }
                    return Ok(resp);
                }
                Err(e) => self.classify(
                    e,
                    live,
                    &workers,
                    &route,
                    &watch,
                    retry_safe,
                    fresh,
                    &mut blamed,
                ),
            };
            drop(in_flight);
            let last = trace.attempts >= live.config.limits.max_attempts;
            match failure {
                Attempt::Fail(error) => return Err(error),
                Attempt::Restarted if !last && next_body.is_some() => {
                    let to = route.backend.clone();
                    // The landing says what the worker now holds.
                    history = self
                        .relocate(&mut route, live, &workers, to, MoveReason::Restarted)
                        .await?;
                    self.remember(&route, live);
                    fresh = Fresh::Pooled;
                }
                Attempt::Again if !last && next_body.is_some() => {
                    self.0.metrics.retry();
                    fresh = Fresh::New;
                }
                Attempt::Elsewhere {
                    error,
                    nothing_sent,
                } => {
                    let again = !last && next_body.is_some() && (nothing_sent || retry_safe);
                    let next = balancer::choose_repin(
                        &route.pin.session.0,
                        &workers,
                        Some(&route.backend.id),
                    );
                    let (true, Some(next)) = (again, next) else {
                        return Err(error);
                    };
                    tracing::info!(from = %route.backend.id, to = %next.id, error = %super::error::chain(&error), "retrying on another worker");
                    self.0.metrics.retry();
                    history = self
                        .relocate(&mut route, live, &workers, next, MoveReason::Failed)
                        .await?;
                    self.remember(&route, live);
                    trace.outcome = Some(route.outcome);
                    fresh = Fresh::Pooled;
                }
                Attempt::Restarted | Attempt::Again => {
                    return Err(ProxyError::Connect {
                        backend: route.backend.id.clone(),
                        source: "no attempt left".into(),
                    })
                }
            }
        }
    }

    /// One attempt: send and wait for the response head, at most
    /// `limits.response_timeout` after the request body was sent, and no
    /// longer than the worker stays usable.
    async fn send(
        &self,
        live: &Live,
        route: &Route,
        fresh: Fresh,
        req: Request<ReplayBody>,
        body: &BodyWatch,
    ) -> Result<Sent, SendError> {
        let backend = &route.backend;
        let limits = &live.config.limits;
        let settings = upstream::Settings::of(live);
        let expect = match route.pin.instance.as_str() {
            "" => Expect::Any,
            i => Expect::Instance(i),
        };
        let lost = backend.lost();
        tokio::pin!(lost);
        lost.as_mut().enable();
        if !backend.is_usable() {
            return Err(SendError::Lost);
        }
        let after = limits.response_timeout;
        let finished = body.finished();
        let head_deadline = async move {
            finished.await;
            tokio::time::sleep(after).await;
        };
        tokio::select! {
            r = self.0.upstream.send(&backend.endpoint, &settings, expect, fresh, req) => r.map_err(SendError::Upstream),
            _ = &mut lost => Err(SendError::Lost),
            _ = head_deadline => Err(SendError::Timeout),
        }
    }

    /// What a failed attempt means for the worker's health and the next
    /// attempt (see the table at the top of this file).
    #[allow(clippy::too_many_arguments)]
    fn classify(
        &self,
        e: SendError,
        live: &Live,
        workers: &BackendSet,
        route: &Route,
        body: &BodyWatch,
        retry_safe: bool,
        fresh: Fresh,
        blamed: &mut bool,
    ) -> Attempt {
        let backend = &route.backend;
        let id = || backend.id.clone();
        if let Some(slow) = body.client_slow() {
            return Attempt::Fail(ProxyError::ClientBody {
                source: Box::new(slow),
            });
        }
        if body.client_failed() {
            let source: BoxError = match e {
                SendError::Upstream(u) => Box::new(u),
                SendError::Lost | SendError::Timeout => "client body failed".into(),
            };
            return Attempt::Fail(ProxyError::ClientBody { source });
        }
        let blame = !*blamed;
        // Failures a client may provoke (a request that crashes its handler
        // or runs long) eject a worker only if a probe confirms it.
        let mut suspect = || {
            if blame {
                *blamed = true;
                self.passive_suspect(live, workers, backend);
            }
        };
        match e {
            SendError::Timeout => {
                suspect();
                Attempt::Fail(ProxyError::Timeout {
                    backend: id(),
                    after: live.config.limits.response_timeout,
                })
            }
            // Like HAProxy's `on-marked-down shutdown-sessions`: the request
            // reached a worker now judged dead; it is not sent again (it may
            // be slow anywhere). The session's next request moves.
            SendError::Lost => Attempt::Fail(ProxyError::WorkerLost { backend: id() }),
            SendError::Upstream(u) => match u {
                UpstreamError::InstanceChanged { ref seen } => {
                    if let Some(old) = backend.observe_instance(seen) {
                        self.instance_changed(backend, &old, seen);
                    }
                    Attempt::Restarted
                }
                UpstreamError::Refused { .. } => {
                    if blame {
                        *blamed = true;
                        self.lost(workers, backend);
                    }
                    Attempt::Elsewhere {
                        error: ProxyError::Connect {
                            backend: id(),
                            source: Box::new(u),
                        },
                        nothing_sent: true,
                    }
                }
                UpstreamError::ConnectTimeout { .. } | UpstreamError::Verify { .. } => {
                    // tether's own connection check failed: no client's doing.
                    if blame {
                        *blamed = true;
                        self.passive_failure(live, workers, backend);
                    }
                    Attempt::Elsewhere {
                        nothing_sent: u.nothing_sent(),
                        error: ProxyError::Connect {
                            backend: id(),
                            source: Box::new(u),
                        },
                    }
                }
                UpstreamError::NotSent { .. } => Attempt::Again,
                // tether's own shortage: the worker is not to blame, and
                // another worker would meet the same shortage.
                UpstreamError::Local { .. } => Attempt::Fail(ProxyError::Overloaded {
                    backend: id(),
                    source: Box::new(u),
                }),
                UpstreamError::ClientBody { source } => {
                    Attempt::Fail(ProxyError::ClientBody { source })
                }
                UpstreamError::Failed { reused, .. } => {
                    // A worker closing an idle keep-alive connection races
                    // the request written on it: not a worker failure.
                    if reused && fresh == Fresh::Pooled && retry_safe {
                        return Attempt::Again;
                    }
                    if u.worker_fault() {
                        suspect();
                    }
                    Attempt::Elsewhere {
                        nothing_sent: u.nothing_sent(),
                        error: ProxyError::Upstream {
                            backend: id(),
                            source: Box::new(u),
                        },
                    }
                }
            },
        }
    }

    /// Passive health from a response status: `502`/`503`/`504` count,
    /// anything else resets the count (a `500` any client can provoke
    /// must not eject a worker).
    /// A `502`, `503` or `504` answered by the worker counts as a passive
    /// failure, but a client can provoke each (an LLM API refusing its
    /// prompt, a busy conversation, a rate limit): they eject only if a
    /// probe confirms.
    fn passive_outcome(
        &self,
        live: &Live,
        workers: &BackendSet,
        backend: &Arc<Backend>,
        status: StatusCode,
    ) {
        match status {
            StatusCode::BAD_GATEWAY
            | StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::GATEWAY_TIMEOUT => self.passive_suspect(live, workers, backend),
            _ => backend.passive_success(),
        }
    }

    /// A refused connection: the worker is down now, unless it is the last
    /// usable one (then probes decide).
    fn lost(&self, workers: &BackendSet, backend: &Backend) {
        if backend.is_usable() && workers.usable_count() > 1 {
            tracing::warn!(backend = %backend.id, "worker refused a connection: marked down");
            backend.mark_down();
        }
    }

    /// A failure a client may have provoked: counted like any passive
    /// failure, but the circuit opens only if a probe on a fresh
    /// connection fails too (three client requests that crash their
    /// handler must not move every user of a healthy worker).
    fn passive_suspect(&self, live: &Live, workers: &BackendSet, backend: &Arc<Backend>) {
        if workers.usable_count() <= 1 && backend.is_usable() {
            return;
        }
        let p = &live.config.passive;
        if !backend.passive_suspect(p.failures) {
            return;
        }
        let (proxy, backend) = (self.clone(), backend.clone());
        let (settings, health) = (upstream::Settings::of(live), live.config.health.clone());
        let cooldown = p.cooldown;
        tokio::spawn(async move {
            let probe =
                proxy
                    .0
                    .upstream
                    .probe(&backend.endpoint, &settings, &health.path, health.timeout);
            let healthy = match tokio::time::timeout(health.timeout, probe).await {
                Ok(Ok((status, _))) => status.is_success(),
                // tether's own socket shortage is no verdict on the worker.
                Ok(Err(UpstreamError::Local { .. })) => true,
                Ok(Err(_)) | Err(_) => false,
            };
            if healthy {
                tracing::info!(backend = %backend.id, "consecutive failures not confirmed by a probe: worker kept");
                return;
            }
            let time = backend.eject(cooldown);
            tracing::warn!(backend = %backend.id, ejected_for = ?time, "worker ejected after consecutive failures and a failed probe");
            proxy.0.metrics.ejection(&backend.id);
        });
    }

    fn passive_failure(&self, live: &Live, workers: &BackendSet, backend: &Backend) {
        if workers.usable_count() <= 1 && backend.is_usable() {
            // Never eject the last usable worker passively.
            return;
        }
        let p = &live.config.passive;
        if let Some(time) = backend.passive_failure(p.failures, p.cooldown) {
            tracing::warn!(backend = %backend.id, ejected_for = ?time, "worker ejected after consecutive failures");
            self.0.metrics.ejection(&backend.id);
        }
    }

    /// The response rewrite: capture hints and the worker's instance read,
    /// hop-by-hop and `Tether-*` headers out, the worker's affinity cookie
    /// out, ours in, body streamed with an idle timeout; upgrades tunnelled.
    /// Also whether the answer came from another process than the pin
    /// names (so without the session's history).
    async fn respond(
        &self,
        sent: Sent,
        route: &Route,
        live: &Live,
        peer: &Peer,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
        slot: &mut Option<Slot>,
    ) -> Result<(Response<ProxyBody>, bool), ProxyError> {
        let Sent {
            response: mut resp,
            instance: conn_instance,
            ..
        } = sent;
        // Checked before anything of the response is used; the worker
        // answered, so this is no connection failure (no passive count).
        headers::check_response_framing(resp.headers()).map_err(|source| {
            ProxyError::ResponseFraming {
                backend: route.backend.id.clone(),
                source,
            }
        })?;
        let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        let said = instance_of(resp.headers()).map(Arc::<str>::from);
        // A response from another process than the pin names (a worker
        // that shows its instance on responses but not on the connection
        // check): it was produced without the session's history.
        let stranger = said.as_deref().is_some_and(|seen| {
            !route.pin.instance.is_empty() && conn_instance.is_none() && seen != route.pin.instance
        });
        if let Some(seen) = said.as_deref() {
            route.backend.endpoint.saw_instance();
            if let Some(old) = route.backend.observe_instance(seen) {
                self.instance_changed(&route.backend, &old, seen);
            }
        }
        // The process that answered: the connection's verified instance.
        let instance = conn_instance.or(said);
        if let Some(v) = resp
            .headers()
            .get(TETHER_CHECKPOINT)
            .and_then(|v| v.to_str().ok())
        {
            let source = Source {
                backend: route.backend.id.clone(),
                instance: instance.clone(),
                fence: Fence::Epoch(route.pin.epoch),
            };
            let state = &live.config.state;
            if state.capture == Capture::Sync && !switching && !is_event_stream(resp.headers()) {
                // The turn is stored before the client hears of it.
                let deadline = tokio::time::Instant::now() + state.restore_timeout;
                let c = &self.0.continuity;
                if !c
                    .checkpoint_now(route.pin.session, v, &source, deadline)
                    .await
                {
                    return Err(ProxyError::Uncaptured {
                        backend: route.backend.id.clone(),
                    });
                }
            } else {
                self.0.continuity.checkpoint(route.pin.session, v, &source);
            }
        }
        // The pin learns which process holds the session, so a restart
        // with empty memory is noticed later.
        let learned_pin = match instance.as_deref() {
            Some(i) if route.pin.instance.is_empty() => {
                let pin = crate::affinity::Pin {
                    instance: i.to_owned(),
                    ..route.pin.clone()
                };
                if let Binding::Key(_) = &route.binding {
                    self.0.sessions.set_pin(pin.clone());
                }
                Some(pin)
            }
            _ => None,
        };
        let pin = learned_pin.as_ref().unwrap_or(&route.pin);
        let set_cookie = route.set_cookie || learned_pin.is_some();
        let websocket = switching
            && resp
                .headers()
                .get(http::header::UPGRADE)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
        let h = resp.headers_mut();
        headers::strip_hop_by_hop(h, switching);
        strip_worker_headers(h, live.codec.name());
        if set_cookie && route.binding == Binding::Cookie {
            let now = self.0.clock.now_unix();
            let value = live.codec.seal(pin);
            let max_age = live.lifetimes.max_age(pin, now);
            if let Some(v) = cookies::set_cookie(&live.config.affinity, value, max_age, peer.tls) {
                h.append(SET_COOKIE, v);
            }
        }
        if switching {
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            if let Some(client_upgrade) = client_upgrade {
                let opts = tunnel::Opts {
                    idle: live.config.limits.stream_idle,
                    grace: live.config.shutdown.grace,
                    backend: route.backend.id.clone(),
                    websocket,
                    slot: if live.config.queue.stream_slots {
                        slot.take()
                    } else {
                        None
                    },
                };
                tunnel::spawn(client_upgrade, upstream_upgrade, &self.0.tunnels, opts);
            }
            let (parts, _) = resp.into_parts();
            return Ok((Response::from_parts(parts, super::body::empty()), stranger));
        }
        let idle = live.config.limits.stream_idle;
        let resp = resp.map(|b: UpstreamBody| BodyExt::boxed(IdleBody::new(b, idle)));
        Ok((resp, stranger))
    }

    /// A worker restarted behind the same address with empty memory.
    pub(crate) fn instance_changed(&self, backend: &Backend, old: &str, new: &str) {
        tracing::info!(backend = %backend.id, old, new, "worker instance changed");
        self.0.metrics.instance_change(&backend.id);
    }
}

/// Why `send` returned without a response.
#[derive(Debug)]
enum SendError {
    Upstream(UpstreamError),
    /// Health marked the worker down meanwhile.
    Lost,
    /// `limits.response_timeout` passed.
    Timeout,
}

/// What every attempt's request headers get from the client connection.
struct Outbound<'a> {
    peer: &'a Peer,
    host: Option<&'a HeaderValue>,
    cookie: &'a str,
}

/// Builds one attempt's request for `route.backend`: origin-form target,
/// the client's Host (or the worker's authority), forwarding headers from
/// the socket, `Tether-Session` and `Tether-Epoch`.
fn upstream_request(
    parts: &http::request::Parts,
    path: &PathAndQuery,
    route: &Route,
    out: &Outbound<'_>,
    body: ReplayBody,
) -> Request<ReplayBody> {
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = upstream::origin_form(path);
    *req.version_mut() = Version::HTTP_11;
    let h = req.headers_mut();
    *h = worker_headers(&parts.headers);
    headers::rewrite_request(h, out.peer, out.host);
    cookies::strip(h, out.cookie);
    match out.host {
        Some(host) => h.insert(HOST, host.clone()),
        None => h.insert(HOST, upstream::host_value(&route.backend.authority)),
    };
    if let Some(v) = out.peer.session_header(&route.pin.session) {
        h.insert(TETHER_SESSION, v);
    }
    h.insert(TETHER_EPOCH, out.peer.epoch_header(route.pin.epoch));
    req
}

/// Headers `upstream_request` may add to the client's: `X-Forwarded-For`,
/// `-Proto`, `-Host`, `Forwarded`, `Host`, `Tether-Session`, `Tether-Epoch`.
const ADDED_HEADERS: usize = 7;

/// A copy of the client's headers with room for [`ADDED_HEADERS`]: a clone
/// is full, and would reallocate as each added header goes in.
fn worker_headers(client: &HeaderMap) -> HeaderMap {
    let Ok(mut h) = HeaderMap::try_with_capacity(client.len() + ADDED_HEADERS) else {
        return client.clone();
    };
    for (name, value) in client {
        h.append(name.clone(), value.clone());
    }
    h
}

/// Whether a response is a Server-Sent Events stream (never held back).
pub(super) fn is_event_stream(h: &HeaderMap) -> bool {
    h.get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .get(..17)
                .is_some_and(|t| t.eq_ignore_ascii_case("text/event-stream"))
        })
}

/// Drops the worker's own copy of the affinity cookie and every `Tether-*`
/// header (meant for tether only).
fn strip_worker_headers(h: &mut HeaderMap, cookie_name: &str) {
    if h.contains_key(SET_COOKIE) {
        let kept: Vec<HeaderValue> = h
            .get_all(SET_COOKIE)
            .iter()
            .filter(|v| !cookies::sets_cookie_named(v, cookie_name))
            .cloned()
            .collect();
        h.remove(SET_COOKIE);
        for v in kept {
            h.append(SET_COOKIE, v);
        }
    }
    while let Some(name) = h.keys().find(|k| is_tether_header(k)).cloned() {
        h.remove(name);
    }
}
