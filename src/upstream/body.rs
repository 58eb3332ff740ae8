//! The two bodies on an upstream connection: [`OutBody`], the request body
//! as hyper sees it (it marks client-side failures and records whether it
//! was sent whole), and [`UpstreamBody`], the response body, which hands the
//! connection back to its endpoint when it ends cleanly.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::pool::{Conn, Pool};
use crate::proxy::body::{BoxError, ReplayBody};

/// The client's request body failed. Wrapping it lets [`super::error`]
/// tell it apart from the worker's failures in hyper's error chain.
#[derive(Debug, thiserror::Error)]
#[error("client request body failed")]
pub(crate) struct ClientBodyError(#[source] pub(crate) BoxError);

/// The request body handed to hyper.
pub(crate) struct OutBody {
    inner: ReplayBody,
    /// Set once the body reached its end; `None` for an empty body.
    sent: Option<Arc<AtomicBool>>,
}

/// Whether a request body was sent whole (read after the response).
#[derive(Debug, Clone)]
pub(super) struct Progress(Option<Arc<AtomicBool>>);

impl Progress {
    /// A worker may answer before reading the whole request body; hyper
    /// then keeps writing it, and the connection cannot carry another
    /// request until that ends (hyperium/hyper#4176), so it is not pooled.
    pub(super) fn sent_whole(&self) -> bool {
        self.0.as_ref().is_none_or(|s| s.load(Ordering::Acquire))
    }
}

impl OutBody {
    pub(super) fn new(inner: ReplayBody) -> OutBody {
        let sent = (!inner.is_end_stream()).then(|| Arc::new(AtomicBool::new(false)));
        OutBody { inner, sent }
    }

    pub(super) fn progress(&self) -> Progress {
        Progress(self.sent.clone())
    }

    fn mark_sent(&self) {
        if let Some(sent) = &self.sent {
            sent.store(true, Ordering::Release);
        }
    }
}

impl Body for OutBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        let this = self.get_mut();
        match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            None => {
                this.mark_sent();
                Poll::Ready(None)
            }
            Some(Ok(frame)) => Poll::Ready(Some(Ok(frame))),
            Some(Err(e)) => Poll::Ready(Some(Err(ClientBodyError(e)))),
        }
    }

    // hyper asks after every data frame; a body that knows its end says so
    // here and is never polled to `None`.
    fn is_end_stream(&self) -> bool {
        let end = self.inner.is_end_stream();
        if end {
            self.mark_sent();
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Where a connection goes when its response body ends cleanly.
pub(super) struct Return {
    pub(super) conn: Conn,
    pub(super) pool: Arc<Pool>,
    pub(super) request: Progress,
    pub(super) idle_timeout: Duration,
    pub(super) max_idle: usize,
}

impl Return {
    fn give_back(self) {
        if self.request.sent_whole() {
            self.pool
                .checkin(self.conn, self.idle_timeout, self.max_idle);
        }
    }
}

/// A worker's response body. Streams hyper's [`Incoming`]; when it ends
/// cleanly the connection goes back to its endpoint's idle list. After an
/// error, an upgrade or an early drop it never does (dropping it closes the
/// connection).
pub(crate) struct UpstreamBody {
    inner: Incoming,
    back: Option<Return>,
}

impl UpstreamBody {
    pub(super) fn new(inner: Incoming, back: Option<Return>) -> UpstreamBody {
        let mut body = UpstreamBody { inner, back };
        if body.inner.is_end_stream() {
            // Nobody polls an empty body (204, 304, HEAD, length 0).
            body.release();
        }
        body
    }

    fn release(&mut self) {
        if let Some(back) = self.back.take() {
            back.give_back();
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            None => this.release(),
            // The last frame of a body of known length: no need to wait for
            // the caller to poll once more.
            Some(Ok(_)) if this.inner.is_end_stream() => this.release(),
            Some(Ok(_)) => {}
            Some(Err(_)) => this.back = None,
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("pooled_at_end", &self.back.is_some())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for OutBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutBody").finish_non_exhaustive()
    }
}
