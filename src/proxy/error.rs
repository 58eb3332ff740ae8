//! `ProxyError`: everything that can go wrong with one request, which side
//! failed, whether a retry is safe, and the one place errors become
//! responses. Clients get a short generic body; the detail goes to the log.

use std::time::Duration;

use http::header::{HeaderValue, CONNECTION, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};

use super::body::{full, BoxError, ProxyBody};
use super::headers::{ResponseFraming, Smuggling};
use super::host::HostError;
use super::pace::SlowBody;

/// A failed request.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyError {
    /// A client asked for the reserved worker-contract prefix.
    #[error("client request under the reserved prefix")]
    ReservedPath,
    /// The request head is ambiguous (request smuggling).
    #[error("refused request head: {0}")]
    Smuggling(#[from] Smuggling),
    /// The request line is longer than `limits.max_request_line_bytes`.
    #[error("request line longer than {limit} bytes")]
    UriTooLong {
        /// The configured limit.
        limit: usize,
    },
    /// The request's `Host` is missing, repeated, invalid, or not the one
    /// the connection's TLS certificate was chosen for.
    #[error("refused host")]
    Host(#[from] HostError),
    /// The declared body is larger than `limits.max_body_bytes`.
    #[error("request body larger than {limit} bytes")]
    BodyTooLarge {
        /// The configured limit.
        limit: u64,
    },
    /// No worker can take the request.
    #[error("no usable worker")]
    NoWorker,
    /// `on_worker_loss = "fail"` and the pinned worker is down.
    #[error("pinned worker {backend} is unavailable")]
    PinnedUnavailable {
        /// The pinned backend id.
        backend: String,
    },
    /// The session could not move to its new worker with its history
    /// (`state.on_restore_failure = "unavailable"`).
    #[error("move failed")]
    Restore(#[source] crate::restore::MoveError),
    /// The client's request body broke (bad chunked framing, a cancelled
    /// upload): the client's fault, never counted against a worker.
    #[error("client request body failed")]
    ClientBody {
        /// The cause.
        #[source]
        source: BoxError,
    },
    /// Could not connect to the worker (nothing was sent).
    #[error("connect to worker {backend} failed")]
    Connect {
        /// The backend id.
        backend: String,
        /// The cause.
        #[source]
        source: BoxError,
    },
    /// The request reached the worker but no response came back.
    #[error("worker {backend} failed")]
    Upstream {
        /// The backend id.
        backend: String,
        /// The cause.
        #[source]
        source: BoxError,
    },
    /// The worker's response framing cannot be passed on unchanged (a
    /// `gzip` transfer coding, a length beside `Transfer-Encoding`).
    #[error("worker {backend} sent a response tether cannot forward")]
    ResponseFraming {
        /// The backend id.
        backend: String,
        /// What was wrong.
        #[source]
        source: ResponseFraming,
    },
    /// The worker sent no response head within `limits.response_timeout`.
    #[error("worker {backend} did not answer within {after:?}")]
    Timeout {
        /// The backend id.
        backend: String,
        /// The deadline that passed.
        after: Duration,
    },
    /// `state.capture = "sync"`: the worker answered a turn tether could
    /// not make durable (it did not export it in time).
    #[error("worker {backend} answered, but its turn could not be captured")]
    Uncaptured {
        /// The backend id.
        backend: String,
    },
    /// A request key this replica has not seen could not be looked up in
    /// the store: routing it blind could split a conversation.
    #[error("cannot look the request key's pin up in the store")]
    KeyLookup(#[source] crate::store::StoreError),
    /// tether ran out of local resources (file descriptors, ports) to
    /// reach the worker.
    #[error("no local resources to reach worker {backend}")]
    Overloaded {
        /// The backend id.
        backend: String,
        /// The cause.
        #[source]
        source: BoxError,
    },
    /// A rate-limit rule refused the request (nothing was forwarded).
    #[error("rate limited")]
    RateLimited(#[source] crate::admission::RateLimited),
    /// The worker is at `max_inflight` and the request got no slot: its
    /// queue was full or `queue.timeout` passed (nothing was forwarded).
    #[error("no slot at worker {backend}")]
    Queue {
        /// The backend id.
        backend: String,
        /// Why.
        #[source]
        reason: crate::admission::Refused,
    },
    /// Health marked the worker down while the request waited for it.
    #[error("worker {backend} was marked down while the request waited")]
    WorkerLost {
        /// The backend id.
        backend: String,
    },
}

impl ProxyError {
    /// The status the client sees.
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            ProxyError::ReservedPath => StatusCode::NOT_FOUND,
            ProxyError::Smuggling(_) => StatusCode::BAD_REQUEST,
            ProxyError::UriTooLong { .. } => StatusCode::URI_TOO_LONG,
            ProxyError::Host(HostError::Misdirected) => StatusCode::MISDIRECTED_REQUEST,
            ProxyError::Host(HostError::Missing | HostError::Duplicate | HostError::Invalid) => {
                StatusCode::BAD_REQUEST
            }
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::NoWorker => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::PinnedUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Restore(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::ClientBody { source } if is_body_limit(source.as_ref()) => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ProxyError::ClientBody { source } if SlowBody::is_in(source.as_ref()) => {
                StatusCode::REQUEST_TIMEOUT
            }
            ProxyError::ClientBody { .. } => StatusCode::BAD_REQUEST,
            ProxyError::Connect { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Upstream { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::ResponseFraming { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::WorkerLost { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Uncaptured { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Overloaded { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::KeyLookup(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::Queue { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// Whether the error is the worker's fault (worth logging at warn).
    pub(crate) fn is_worker_failure(&self) -> bool {
        match self {
            ProxyError::Connect { .. }
            | ProxyError::Upstream { .. }
            | ProxyError::ResponseFraming { .. }
            | ProxyError::Timeout { .. }
            | ProxyError::WorkerLost { .. }
            | ProxyError::Uncaptured { .. } => true,
            ProxyError::Overloaded { .. }
            | ProxyError::KeyLookup(_)
            | ProxyError::RateLimited(_)
            | ProxyError::Queue { .. } => false,
            ProxyError::ReservedPath
            | ProxyError::Smuggling(_)
            | ProxyError::UriTooLong { .. }
            | ProxyError::Host(_)
            | ProxyError::BodyTooLarge { .. }
            | ProxyError::NoWorker
            | ProxyError::Restore(_)
            | ProxyError::ClientBody { .. }
            | ProxyError::PinnedUnavailable { .. } => false,
        }
    }

    /// The response for the client: a short generic text, never the cause.
    pub(crate) fn to_response(&self) -> Response<ProxyBody> {
        let status = self.status();
        let text = match self {
            ProxyError::ReservedPath => "not found\n",
            ProxyError::Smuggling(_)
            | ProxyError::Host(HostError::Missing | HostError::Duplicate | HostError::Invalid) => {
                "bad request\n"
            }
            ProxyError::Host(HostError::Misdirected) => "misdirected request\n",
            ProxyError::UriTooLong { .. } => "request line too long\n",
            ProxyError::BodyTooLarge { .. } => "request body too large\n",
            ProxyError::ClientBody { .. } if status == StatusCode::PAYLOAD_TOO_LARGE => {
                "request body too large\n"
            }
            ProxyError::ClientBody { .. } if status == StatusCode::REQUEST_TIMEOUT => {
                "request body too slow\n"
            }
            ProxyError::ClientBody { .. } => "bad request body\n",
            ProxyError::NoWorker
            | ProxyError::PinnedUnavailable { .. }
            | ProxyError::Overloaded { .. }
            | ProxyError::KeyLookup(_)
            | ProxyError::Queue { .. }
            | ProxyError::Restore(_) => "service unavailable, retry shortly\n",
            ProxyError::RateLimited(_) => "too many requests\n",
            ProxyError::Connect { .. }
            | ProxyError::Upstream { .. }
            | ProxyError::ResponseFraming { .. }
            | ProxyError::Uncaptured { .. } => "bad gateway\n",
            ProxyError::Timeout { .. } | ProxyError::WorkerLost { .. } => "gateway timeout\n",
        };
        let mut resp = Response::new(full(text));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if let ProxyError::RateLimited(limited) = self {
            let secs = crate::admission::retry_after_secs(limited.retry_after);
            h.insert(RETRY_AFTER, HeaderValue::from(secs));
        } else if status == StatusCode::SERVICE_UNAVAILABLE {
            h.insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if matches!(
            self,
            ProxyError::Smuggling(_)
                | ProxyError::ClientBody { .. }
                | ProxyError::UriTooLong { .. }
        ) {
            // The framing is ambiguous or broken: nothing after this head
            // can be trusted.
            h.insert(CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

/// Whether a body error is `limits.max_body_bytes` being exceeded.
fn is_body_limit(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cur = err.source();
    }
    false
}

/// The error and its sources joined, for one structured log field.
pub(crate) fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        out.push_str(": ");
        out.push_str(&e.to_string());
        cur = e.source();
    }
    out
}
