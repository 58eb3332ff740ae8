//! `UpstreamError`: what went wrong on the way to a worker, and how much of
//! the request it saw. The mapping from hyper's errors lives here, in
//! [`classify`], so the rules can be read (and tested) in one place.

use std::time::Duration;

use http::Request;
use hyper::client::conn::TrySendError;

use super::body::{ClientBodyError, OutBody};
use crate::proxy::body::BoxError;

/// A request that did not get a response head from the worker.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    /// The TCP connect failed (refused, reset, unreachable, name not
    /// resolved): nothing was sent.
    #[error("connect failed")]
    Refused {
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// tether itself ran short (file descriptors, local ports): nothing was
    /// sent, and the worker is not to blame.
    #[error("connect failed for lack of local resources")]
    Local {
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// The TCP connect did not finish in time: nothing was sent.
    #[error("connect did not finish within {after:?}")]
    ConnectTimeout {
        /// `connect_timeout` (or the probe's timeout).
        after: Duration,
    },
    /// Connected, but the probe on that connection (the verification before
    /// a request, or [`super::Upstream::probe`]) got no usable answer: the
    /// request was not sent.
    #[error("health probe on a new connection failed")]
    Verify {
        /// hyper's error, the body limit, or [`TimedOut`].
        #[source]
        source: BoxError,
    },
    /// The connection reaches another worker process than the caller
    /// expects: the request was not sent (the connection stays pooled).
    #[error("the connection reaches worker instance {seen:?}, not the expected one")]
    InstanceChanged {
        /// The instance the connection reaches.
        seen: String,
    },
    /// hyper gave the request back before writing any of it (the
    /// connection closed first).
    #[error("request not sent: the connection closed first")]
    NotSent {
        /// hyper's error.
        #[source]
        source: hyper::Error,
    },
    /// The client's request body failed while it was being forwarded: not
    /// the worker's fault.
    #[error("client request body failed while being forwarded")]
    ClientBody {
        /// hyper's error; its source is a [`ClientBodyError`] holding the
        /// body's own error.
        #[source]
        source: BoxError,
    },
    /// The request was written (maybe partly), then no response head came.
    #[error("request sent on a {} connection, then no response head", if *reused { "reused" } else { "new" })]
    Failed {
        /// Whether the connection came from the idle list. A reused one may
        /// have been closed by the worker while the request was on its way:
        /// an idempotent request can go again on a fresh connection.
        reused: bool,
        /// hyper's error.
        #[source]
        source: hyper::Error,
    },
}

impl UpstreamError {
    /// Whether the worker saw none of the request, so sending it elsewhere
    /// is safe whatever its method.
    pub(crate) fn nothing_sent(&self) -> bool {
        match self {
            UpstreamError::Refused { .. }
            | UpstreamError::Local { .. }
            | UpstreamError::ConnectTimeout { .. }
            | UpstreamError::Verify { .. }
            | UpstreamError::InstanceChanged { .. }
            | UpstreamError::NotSent { .. } => true,
            UpstreamError::ClientBody { .. } | UpstreamError::Failed { .. } => false,
        }
    }

    /// Whether nothing listens on the worker's address (`ECONNREFUSED`):
    /// the process that was there is gone, and whatever only it held with
    /// it (a process restarted there is a new, empty one).
    pub(crate) fn no_listener(&self) -> bool {
        matches!(self, UpstreamError::Refused { source } if source.kind() == std::io::ErrorKind::ConnectionRefused)
    }

    /// Whether the worker (not the client, not a restart tether handles)
    /// is to blame: what passive health should count.
    pub(crate) fn worker_fault(&self) -> bool {
        match self {
            UpstreamError::Refused { .. }
            | UpstreamError::ConnectTimeout { .. }
            | UpstreamError::Verify { .. }
            | UpstreamError::NotSent { .. }
            | UpstreamError::Failed { reused: false, .. } => true,
            // A reused connection closed by the worker's idle timeout races
            // the request: no sign of a sick worker.
            UpstreamError::Failed { reused: true, .. }
            | UpstreamError::Local { .. }
            | UpstreamError::InstanceChanged { .. }
            | UpstreamError::ClientBody { .. } => false,
        }
    }
}

/// A deadline passed while waiting for the worker.
#[derive(Debug, thiserror::Error)]
#[error("no answer within {0:?}")]
pub(crate) struct TimedOut(pub(crate) Duration);

/// The worker closed the connection right after answering the
/// verification probe, so it cannot carry the request.
#[derive(Debug, thiserror::Error)]
#[error("worker closed the connection after the verification probe")]
pub(crate) struct ClosedAfterProbe;

/// What a failed `try_send_request` came to.
#[derive(Debug)]
pub(super) enum Refusal {
    /// hyper handed the request back unwritten: it may go on another
    /// connection as it is.
    Unsent {
        req: Box<Request<OutBody>>,
        source: hyper::Error,
    },
    /// Anything else.
    Error(UpstreamError),
}

/// Maps hyper's error for a request on a connection that was `reused` (or
/// not). The rules, from hyper 1.x's client dispatcher:
/// - the request comes back (`take_message`) only when it was never taken
///   off the queue, so nothing was written; `is_canceled` is the same case
///   when the request could not be returned;
/// - a failing request body ends the connection with `User::Body` (an
///   `is_user` error) whose source is the body's error, our
///   [`ClientBodyError`];
/// - everything else happened after the head was handed to the connection.
pub(super) fn classify(mut err: TrySendError<Request<OutBody>>, reused: bool) -> Refusal {
    if let Some(req) = err.take_message() {
        return Refusal::Unsent {
            req: Box::new(req),
            source: err.into_error(),
        };
    }
    let source = err.into_error();
    let error = if source.is_canceled() {
        UpstreamError::NotSent { source }
    } else if source.is_user() && caused_by_client_body(&source) {
        UpstreamError::ClientBody {
            source: Box::new(source),
        }
    } else {
        UpstreamError::Failed { reused, source }
    };
    Refusal::Error(error)
}

fn caused_by_client_body(err: &hyper::Error) -> bool {
    let mut cur = std::error::Error::source(err);
    while let Some(e) = cur {
        if e.is::<ClientBodyError>() {
            return true;
        }
        cur = e.source();
    }
    false
}
