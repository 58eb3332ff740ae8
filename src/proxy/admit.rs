//! The request path's hooks into [`crate::admission`]: rate limits right
//! after routing (before a move or anything is forwarded), a slot at the
//! worker after continuity, and the slot handed to the response body (or
//! the tunnel) so it is held exactly as long as the worker works for the
//! request.
//!
//! A request queued at a worker that is lost meanwhile leaves the queue
//! and is routed again: the decision table now moves its session (restore
//! first), and it queues at the new worker if that one is full too.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::body::{BoxError, ProxyBody};
use super::continuity::History;
use super::headers::Peer;
use super::route::{Binding, Route};
use super::{Proxy, ProxyError, Trace};
use crate::admission::{Refused, Slot, Subject};
use crate::affinity::PinOutcome;
use crate::backends::{Backend, BackendSet};
use crate::live::Live;

/// How often a request whose worker was lost while it queued is routed
/// again before it gives up.
const MAX_REROUTES: u32 = 2;

/// A routed request that may go to its worker.
#[derive(Debug)]
pub(super) struct Placed {
    /// The worker snapshot the route was made in.
    pub workers: Arc<BackendSet>,
    /// Where it goes.
    pub route: Route,
    /// What the worker holds of the session.
    pub history: History,
    /// Its slot at the worker.
    pub slot: Held,
}

/// Where a request was admitted, and its slot there (`None`: that worker
/// is unlimited).
#[derive(Debug)]
pub(super) struct Held {
    at: Arc<Backend>,
    /// The slot, until the response body or the tunnel takes it.
    pub slot: Option<Slot>,
}

impl Proxy {
    /// Phases 2 and 3 with admission: route, rate limits, continuity, then
    /// a slot at the worker (waiting in its queue when it is full).
    pub(super) async fn place(
        &self,
        req: &Request<Incoming>,
        peer: &Peer,
        live: &Live,
        trace: &mut Trace,
    ) -> Result<Placed, ProxyError> {
        let mut reroutes = 0;
        loop {
            let workers = self.0.workers.snapshot();
            let mut route = self.route(req.headers(), peer, live, &workers, trace)?;
            trace.session = Some(route.pin.session);
            if reroutes == 0 {
                self.check_rates(req, peer, &route)?;
            }
            let history = self.ensure_continuity(&mut route, live, &workers).await?;
            match self.0.admission.admit(&route.backend, &live.config).await {
                // The slot came free because the worker was lost (its
                // requests in flight were answered): route again, as for
                // a waiter woken by the loss.
                Ok(_) if !route.backend.is_usable() && reroutes < MAX_REROUTES => reroutes += 1,
                Ok(slot) => {
                    let slot = Held {
                        at: route.backend.clone(),
                        slot,
                    };
                    return Ok(Placed {
                        workers,
                        route,
                        history,
                        slot,
                    });
                }
                Err(Refused::Lost) if reroutes < MAX_REROUTES => reroutes += 1,
                Err(Refused::Lost) => {
                    return Err(ProxyError::WorkerLost {
                        backend: route.backend.id.clone(),
                    })
                }
                Err(reason) => {
                    trace.backend = Some(route.backend.clone());
                    return Err(ProxyError::Queue {
                        backend: route.backend.id.clone(),
                        reason,
                    });
                }
            }
        }
    }

    fn check_rates(
        &self,
        req: &Request<Incoming>,
        peer: &Peer,
        route: &Route,
    ) -> Result<(), ProxyError> {
        // A request without a session of its own (no cookie yet) has none
        // to count: each would get a fresh bucket.
        let fresh = route.binding == Binding::Cookie
            && matches!(route.outcome, PinOutcome::New | PinOutcome::Invalid(_));
        let subject = Subject {
            headers: req.headers(),
            path: req.uri().path(),
            ip: peer.client_ip(req.headers()),
            session: (!fresh).then_some(&route.pin.session.0[..]),
        };
        self.0
            .admission
            .check_rates(subject)
            .map_err(ProxyError::RateLimited)
    }

    /// Before an attempt: a retry that moved to another worker takes a
    /// slot there (and gives back the one it held).
    pub(super) async fn reslot(
        &self,
        held: &mut Held,
        route: &Route,
        live: &Live,
    ) -> Result<(), ProxyError> {
        if Arc::ptr_eq(&held.at, &route.backend) {
            return Ok(());
        }
        held.slot = None;
        held.at = route.backend.clone();
        held.slot = self
            .0
            .admission
            .admit(&route.backend, &live.config)
            .await
            .map_err(|reason| ProxyError::Queue {
                backend: route.backend.id.clone(),
                reason,
            })?;
        Ok(())
    }
}

/// Gives the slot to the response body, which frees it when it ends or is
/// dropped (the client went away). A stream (SSE) frees it at once when
/// `queue.stream_slots` is off; a `101` has handed it to its tunnel.
pub(super) fn hold(
    resp: Response<ProxyBody>,
    slot: Option<Slot>,
    live: &Live,
) -> Response<ProxyBody> {
    let Some(slot) = slot else {
        return resp;
    };
    let stream = super::forward::is_event_stream(resp.headers());
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        || (stream && !live.config.queue.stream_slots)
    {
        return resp;
    }
    resp.map(|inner| {
        SlotBody {
            inner,
            slot: Some(slot),
        }
        .boxed()
    })
}

/// A response body that holds its request's slot until it ends.
struct SlotBody {
    inner: ProxyBody,
    slot: Option<Slot>,
}

impl Body for SlotBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            self.slot = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
