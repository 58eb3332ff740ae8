//! Forwarding: the attempt loop (with safe retries on another worker) and
//! the response rewrite.

use std::sync::Arc;

use http::header::{HeaderValue, HOST, SET_COOKIE};
use http::uri::{PathAndQuery, Scheme};
use http::{HeaderMap, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use super::body::{BoxError, IdleBody, ReplayBody};
use super::continuity::Continuity;
use super::headers::{
    self, Peer, TETHER_CHECKPOINT, TETHER_EPOCH, TETHER_INSTANCE, TETHER_SESSION,
};
use super::route::{Binding, Route};
use super::{tunnel, Live, Proxy, ProxyBody, ProxyError, Trace};
use crate::affinity::{cookies, MoveReason, PinOutcome};
use crate::backends::Backend;
use crate::balancer;
use crate::continuity::capture::{parse_checkpoint, Hint};
use crate::metrics::BackendLabel;

/// `Tether-Restore: failed` on a response forwarded without history.
const TETHER_RESTORE: http::HeaderName = http::HeaderName::from_static("tether-restore");

impl Proxy {
    /// The inner handler: screen, route, forward, respond.
    pub(super) async fn run(
        &self,
        mut req: Request<Incoming>,
        peer: &Peer,
        live: &Live,
        trace: &mut Trace,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        self.screen(&req, live)?;
        self.preload_key_pin(req.headers(), live).await;
        let mut route = self.route(req.headers(), live, trace)?;
        trace.session = Some(route.pin.session);
        let mut continuity = self.ensure_continuity(&mut route, live).await?;
        if route.outcome != PinOutcome::New {
            let now = self.shared.clock.now_unix();
            self.remember(&route, live, now);
        }
        trace.outcome = Some(route.outcome);
        trace.restore_failed = continuity == Continuity::Degraded;

        let upgrade = headers::is_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let host = parts.headers.get(HOST).cloned().or_else(|| {
            parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
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
            let body: ProxyBody = match live.config.limits.max_body_bytes {
                Some(limit) => Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX))
                    .map_err(BoxError::from)
                    .boxed(),
                None => body.map_err(BoxError::from).boxed(),
            };
            ReplayBody::new(body, live.config.limits.retry_body_bytes)
        };
        let retry_safe = headers::is_retry_safe(&parts.method, &parts.headers);

        let mut attempt_body = Some(body);
        loop {
            trace.attempts += 1;
            trace.backend = Some(route.backend.clone());
            let Some(this_body) = attempt_body.take() else {
                return Err(ProxyError::NoWorker);
            };
            let next_body = this_body.try_clone();
            let req = upstream_request(&parts, &path, &route, &outbound, this_body)?;
            let result = self.send(live, &route.backend, req).await;
            let err = match result {
                Ok(resp) => {
                    let mut resp = self
                        .respond(resp, &route, live, peer, client_upgrade)
                        .await?;
                    if continuity == Continuity::Degraded {
                        resp.headers_mut()
                            .insert(TETHER_RESTORE, HeaderValue::from_static("failed"));
                    }
                    return Ok(resp);
                }
                Err(err) => err,
            };
            let retry = trace.attempts < live.config.limits.max_attempts
                && next_body.is_some()
                && (err.nothing_sent() || retry_safe);
            if !retry {
                return Err(err);
            }
            let failed = route.backend.id.clone();
            let Some(next) =
                balancer::choose_repin(&route.pin.session.0, &live.backends, Some(&failed))
            else {
                return Err(err);
            };
            tracing::info!(
                from = %failed,
                to = %next.id,
                error = %super::error::chain(&err),
                "retrying on another worker"
            );
            self.shared.metrics.retries.inc();
            let now = self.shared.clock.now_unix();
            route = self.moved(route.pin, next, route.binding, MoveReason::Failed, now);
            // The new worker gets the session's history before the retry.
            continuity = self.ensure_continuity(&mut route, live).await?;
            self.remember(&route, live, now);
            trace.outcome = Some(route.outcome);
            attempt_body = next_body;
        }
    }

    /// One attempt: send and wait for the response head, with passive
    /// health accounting.
    async fn send(
        &self,
        live: &Live,
        backend: &Arc<Backend>,
        req: Request<ReplayBody>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let limits = &live.config.limits;
        let passive = &live.config.passive;
        let outcome =
            tokio::time::timeout(limits.stream_idle, self.shared.client.request(req)).await;
        let err = match outcome {
            Ok(Ok(resp)) => {
                match resp.status() {
                    StatusCode::BAD_GATEWAY
                    | StatusCode::SERVICE_UNAVAILABLE
                    | StatusCode::GATEWAY_TIMEOUT => {
                        self.passive_failure(live, backend, passive.failures, passive.cooldown)
                    }
                    _ => backend.passive_success(),
                }
                return Ok(resp);
            }
            Ok(Err(e)) if e.is_connect() => {
                self.lost(live, backend);
                ProxyError::Connect {
                    backend: backend.id.clone(),
                    source: Box::new(e),
                }
            }
            Ok(Err(e)) => {
                if is_reset(&e) {
                    self.lost(live, backend);
                } else {
                    self.passive_failure(live, backend, passive.failures, passive.cooldown);
                }
                ProxyError::Upstream {
                    backend: backend.id.clone(),
                    source: Box::new(e),
                }
            }
            Err(_) => {
                self.passive_failure(live, backend, passive.failures, passive.cooldown);
                ProxyError::Timeout {
                    backend: backend.id.clone(),
                    after: limits.stream_idle,
                }
            }
        };
        Err(err)
    }

    /// A refused or reset connection: the worker is down now, unless it is
    /// the last usable one (then probes decide).
    fn lost(&self, live: &Live, backend: &Backend) {
        if backend.is_usable() && live.backends.usable_count() > 1 {
            tracing::warn!(backend = %backend.id, "worker refused or reset a connection: marked down");
            backend.mark_down();
        }
    }

    fn passive_failure(
        &self,
        live: &Live,
        backend: &Backend,
        threshold: u32,
        cooldown: std::time::Duration,
    ) {
        if live.backends.usable_count() <= 1 && backend.is_usable() {
            // Never eject the last usable worker passively.
            return;
        }
        if let Some(time) = backend.passive_failure(threshold, cooldown) {
            tracing::warn!(backend = %backend.id, ejected_for = ?time, "worker ejected after consecutive failures");
            self.shared
                .metrics
                .ejections
                .get_or_create(&BackendLabel {
                    backend: backend.id.clone(),
                })
                .inc();
        }
    }

    /// The response rewrite: hop-by-hop out, the worker's affinity cookie
    /// out, ours in, body streamed with an idle timeout; upgrades tunnelled.
    async fn respond(
        &self,
        mut resp: Response<Incoming>,
        route: &Route,
        live: &Live,
        peer: &Peer,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        if let Some(v) = resp
            .headers()
            .get(TETHER_CHECKPOINT)
            .and_then(|v| v.to_str().ok())
        {
            let session = route.pin.session.to_hex();
            for (thread, seq) in parse_checkpoint(v) {
                let hint = Hint {
                    session: session.clone(),
                    thread,
                    backend: route.backend.id.clone(),
                };
                self.queue_capture(hint, seq, 0);
            }
        }
        let mut learned = None;
        if let Some(seen) = resp
            .headers()
            .get(TETHER_INSTANCE)
            .and_then(|v| v.to_str().ok())
        {
            if let Some(old) = route.backend.observe_instance(seen) {
                self.instance_changed(&route.backend, &old, seen);
            }
            if route.pin.instance.is_empty() {
                // The pin learns which process holds the session, so a
                // restart with empty memory is noticed later.
                learned = Some(seen.to_owned());
            }
        }
        let learned_pin = learned.map(|instance| {
            let pin = crate::affinity::Pin {
                instance,
                ..route.pin.clone()
            };
            if let Binding::Key(key) = &route.binding {
                self.shared.pins.insert(key, pin.clone());
            }
            pin
        });
        let pin = learned_pin.as_ref().unwrap_or(&route.pin);
        let set_cookie = route.set_cookie || learned_pin.is_some();
        let h = resp.headers_mut();
        headers::strip_hop_by_hop(h, switching);
        strip_worker_headers(h, live.codec.name());
        if set_cookie && route.binding == Binding::Cookie {
            let now = self.shared.clock.now_unix();
            let value = live.codec.seal(pin);
            let max_age = live.lifetimes.max_age(pin, now);
            if let Some(v) = cookies::set_cookie(&live.config.affinity, value, max_age, peer.tls) {
                h.append(SET_COOKIE, v);
            }
        }
        if switching {
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            if let Some(client_upgrade) = client_upgrade {
                tunnel::spawn(
                    client_upgrade,
                    upstream_upgrade,
                    live.config.limits.stream_idle,
                    route.backend.id.clone(),
                );
            }
            let (parts, _) = resp.into_parts();
            return Ok(Response::from_parts(parts, super::body::empty()));
        }
        let idle = live.config.limits.stream_idle;
        Ok(resp.map(|b| http_body_util::BodyExt::boxed(IdleBody::new(b, idle))))
    }

    /// A worker restarted behind the same address with empty memory.
    pub(crate) fn instance_changed(&self, backend: &Backend, old: &str, new: &str) {
        tracing::info!(backend = %backend.id, old, new, "worker instance changed");
        self.shared
            .metrics
            .instance_changes
            .get_or_create(&BackendLabel {
                backend: backend.id.clone(),
            })
            .inc();
    }
}

/// What every attempt's request headers get from the client connection.
struct Outbound<'a> {
    peer: &'a Peer,
    host: Option<&'a HeaderValue>,
    cookie: &'a str,
}

/// Builds one attempt's request for `route.backend`.
fn upstream_request(
    parts: &http::request::Parts,
    path: &PathAndQuery,
    route: &Route,
    out: &Outbound<'_>,
    body: ReplayBody,
) -> Result<Request<ReplayBody>, ProxyError> {
    let uri = Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(route.backend.authority.clone())
        .path_and_query(path.clone())
        .build()
        .map_err(|e| ProxyError::Connect {
            backend: route.backend.id.clone(),
            source: Box::new(e),
        })?;
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    let h = req.headers_mut();
    *h = parts.headers.clone();
    headers::rewrite_request(h, out.peer, out.host);
    cookies::strip(h, out.cookie);
    if let Some(host) = out.host {
        h.insert(HOST, host.clone());
    }
    let session = bytes::Bytes::from(route.pin.session.to_hex().into_bytes());
    if let Ok(v) = HeaderValue::from_maybe_shared(session) {
        h.insert(TETHER_SESSION, v);
    }
    h.insert(TETHER_EPOCH, HeaderValue::from(route.pin.epoch));
    Ok(req)
}

/// Drops the worker's own copy of the affinity cookie and the headers of
/// the worker contract that are meant for tether only.
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
    h.remove(TETHER_INSTANCE);
    h.remove(TETHER_CHECKPOINT);
}

/// Whether a client error is a reset connection (the worker went away).
fn is_reset(e: &hyper_util::client::legacy::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionRefused
            ) {
                return true;
            }
        }
        cur = err.source();
    }
    false
}
