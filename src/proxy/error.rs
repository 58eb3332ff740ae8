//! `ProxyError`: everything that can go wrong with one request, which side
//! failed, whether a retry is safe, and the one place errors become
//! responses. Clients get a short generic body; the detail goes to the log.

use std::time::Duration;

use http::header::{HeaderValue, CONNECTION, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};

use super::body::{full, BoxError, ProxyBody};
use super::headers::Smuggling;

/// A failed request.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// A client asked for the reserved worker-contract prefix.
    #[error("client request under the reserved prefix")]
    ReservedPath,
    /// The request head is ambiguous (request smuggling).
    #[error("refused request head: {0}")]
    Smuggling(#[from] Smuggling),
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
    /// The session's threads could not be restored into its new worker
    /// (`state.on_restore_failure = "unavailable"`).
    #[error("restore failed")]
    Restore(#[source] crate::continuity::restore::RestoreError),
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
    /// The worker sent no response head in time.
    #[error("worker {backend} did not answer within {after:?}")]
    Timeout {
        /// The backend id.
        backend: String,
        /// The deadline that passed.
        after: Duration,
    },
}

impl ProxyError {
    /// The status the client sees.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::ReservedPath => StatusCode::NOT_FOUND,
            ProxyError::Smuggling(_) => StatusCode::BAD_REQUEST,
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::NoWorker => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::PinnedUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Restore(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Connect { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Upstream { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// Whether sending the request to another worker is safe regardless of
    /// its method: only when nothing reached the failed one.
    pub fn nothing_sent(&self) -> bool {
        match self {
            ProxyError::Connect { .. } => true,
            ProxyError::ReservedPath
            | ProxyError::Smuggling(_)
            | ProxyError::BodyTooLarge { .. }
            | ProxyError::NoWorker
            | ProxyError::PinnedUnavailable { .. }
            | ProxyError::Restore(_)
            | ProxyError::Upstream { .. }
            | ProxyError::Timeout { .. } => false,
        }
    }

    /// Whether the error is the worker's fault (worth logging at warn).
    pub fn is_worker_failure(&self) -> bool {
        match self {
            ProxyError::Connect { .. }
            | ProxyError::Upstream { .. }
            | ProxyError::Timeout { .. } => true,
            ProxyError::ReservedPath
            | ProxyError::Smuggling(_)
            | ProxyError::BodyTooLarge { .. }
            | ProxyError::NoWorker
            | ProxyError::Restore(_)
            | ProxyError::PinnedUnavailable { .. } => false,
        }
    }

    /// The response for the client: a short generic text, never the cause.
    pub fn to_response(&self) -> Response<ProxyBody> {
        let status = self.status();
        let text = match self {
            ProxyError::ReservedPath => "not found\n",
            ProxyError::Smuggling(_) => "bad request\n",
            ProxyError::BodyTooLarge { .. } => "request body too large\n",
            ProxyError::NoWorker
            | ProxyError::PinnedUnavailable { .. }
            | ProxyError::Restore(_) => "service unavailable, retry shortly\n",
            ProxyError::Connect { .. } | ProxyError::Upstream { .. } => "bad gateway\n",
            ProxyError::Timeout { .. } => "gateway timeout\n",
        };
        let mut resp = Response::new(full(text));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if status == StatusCode::SERVICE_UNAVAILABLE {
            h.insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if matches!(self, ProxyError::Smuggling(_)) {
            // The framing is ambiguous: nothing after this head can be trusted.
            h.insert(CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

/// The error and its sources joined, for one structured log field.
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        out.push_str(": ");
        out.push_str(&e.to_string());
        cur = e.source();
    }
    out
}
