//! Bodies: the boxed body type both directions use, a request body that can
//! be replayed on a retry, and an idle timeout for long streams.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use tokio::time::Instant;

use crate::deadline::LazyDeadline;

/// Errors inside bodies, boxed (hyper's and ours).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every request and response tether forwards.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// An empty body.
pub fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A body of fixed bytes.
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Error raised when a stream stays silent longer than `limits.stream_idle`.
#[derive(Debug, thiserror::Error)]
#[error("stream idle for longer than {0:?}")]
pub struct StreamIdle(pub Duration);

pin_project_lite::pin_project! {
    /// Ends a body with [`StreamIdle`] when no frame arrives for `idle`.
    /// A total timeout would cut long SSE streams; silence is what matters.
    /// The timer is made at the body's first wait (most bodies never wait)
    /// and moved only when it fires before the silence is long enough, so
    /// a frame costs a clock read, not a timer registration.
    pub struct IdleBody<B> {
        #[pin]
        inner: B,
        deadline: LazyDeadline,
        // When the last frame arrived, once the body has waited.
        last: Option<Instant>,
        idle: Duration,
    }
}

impl<B> IdleBody<B> {
    /// Wraps `inner`.
    pub fn new(inner: B, idle: Duration) -> Self {
        IdleBody {
            inner,
            deadline: LazyDeadline::default(),
            last: None,
            idle,
        }
    }
}

impl<B> Body for IdleBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(frame) => {
                if this.last.is_some() {
                    *this.last = Some(Instant::now());
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                // The silence starts now at the latest: the frame before
                // this wait was handed out in this poll loop.
                let last = *this.last.get_or_insert_with(Instant::now);
                ready!(this.deadline.poll_until(cx, last + *this.idle));
                Poll::Ready(Some(Err(Box::new(StreamIdle(*this.idle)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

struct ReplayState {
    source: Option<ProxyBody>,
    frames: Vec<Frame<Bytes>>,
    buffered: usize,
    cap: usize,
    overflowed: bool,
    started: bool,
    ended: bool,
    /// The client's body failed (framing error, cancelled upload).
    failed: bool,
    /// The failure was the client's pace (`limits.body_timeout`).
    slow: Option<super::pace::SlowBody>,
}

struct Shared {
    state: Mutex<ReplayState>,
    /// Woken when the source has been read to its end (or failed).
    finished: tokio::sync::Notify,
}

/// A request body that remembers what it sent (up to a cap) so a retry can
/// send it again. Every clone reads the same source: frames taken from it
/// by any attempt are recorded, and each attempt first replays the record.
pub struct ReplayBody {
    /// `None` for a request without a body: nothing to record or lock.
    state: Option<Arc<Shared>>,
    pos: usize,
    hint: SizeHint,
}

impl ReplayBody {
    /// Wraps `source`, remembering at most `cap` bytes.
    pub fn new(source: ProxyBody, cap: usize) -> ReplayBody {
        let hint = source.size_hint();
        ReplayBody {
            state: Some(Arc::new(Shared {
                state: Mutex::new(ReplayState {
                    source: Some(source),
                    frames: Vec::new(),
                    buffered: 0,
                    cap,
                    overflowed: false,
                    started: false,
                    ended: false,
                    failed: false,
                    slow: None,
                }),
                finished: tokio::sync::Notify::new(),
            })),
            pos: 0,
            hint,
        }
    }

    /// A body of fixed bytes (contract calls), replayable whole.
    pub fn from_bytes(bytes: Bytes) -> ReplayBody {
        if bytes.is_empty() {
            return ReplayBody::empty();
        }
        let cap = bytes.len();
        ReplayBody::new(full(bytes), cap)
    }

    /// The body of a request that has none (most GETs).
    pub fn empty() -> ReplayBody {
        ReplayBody {
            state: None,
            pos: 0,
            hint: SizeHint::with_exact(0),
        }
    }

    /// Another attempt at sending the same body, or `None` when it cannot be
    /// reproduced (more than the cap was already sent).
    pub fn try_clone(&self) -> Option<ReplayBody> {
        let Some(state) = &self.state else {
            return Some(ReplayBody::empty());
        };
        if lock(state).overflowed {
            return None;
        }
        Some(ReplayBody {
            state: Some(state.clone()),
            pos: 0,
            hint: self.hint,
        })
    }

    /// Whether any byte of the body has been taken from the client yet.
    pub fn started(&self) -> bool {
        self.state.as_ref().is_some_and(|s| lock(s).started)
    }

    /// A handle that watches this body while an attempt sends it.
    pub fn watch(&self) -> BodyWatch {
        BodyWatch(self.state.clone())
    }
}

/// Watches a [`ReplayBody`] being sent: whether the client's side failed,
/// and when it was read to its end.
#[derive(Clone)]
pub struct BodyWatch(Option<Arc<Shared>>);

impl BodyWatch {
    /// Whether the client's body failed (the client's fault, not the
    /// worker's).
    pub fn client_failed(&self) -> bool {
        self.0.as_ref().is_some_and(|s| lock(s).failed)
    }

    /// How the client's body fell behind its pace, if that is why it
    /// failed.
    pub(crate) fn client_slow(&self) -> Option<super::pace::SlowBody> {
        let shared = self.0.as_ref()?;
        let st = lock(shared);
        st.slow
    }

    /// Resolves once the client's body has been read to its end (or has
    /// failed): from then on, the worker owes a response.
    pub fn finished(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let shared = self.0.clone();
        async move {
            let Some(shared) = shared else { return };
            loop {
                let notified = shared.finished.notified();
                {
                    let st = lock(&shared);
                    if st.ended || st.failed {
                        return;
                    }
                }
                notified.await;
            }
        }
    }
}

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, ReplayState> {
    shared.state.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether the source has nothing more to give (a known-length body ends
/// without a final empty poll).
fn source_done(st: &ReplayState) -> bool {
    st.source.as_ref().is_none_or(|s| s.is_end_stream())
}

fn copy_frame(f: &Frame<Bytes>) -> Option<Frame<Bytes>> {
    if let Some(d) = f.data_ref() {
        Some(Frame::data(d.clone()))
    } else {
        f.trailers_ref().map(|t| Frame::trailers(t.clone()))
    }
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let pos = this.pos;
        let Some(state) = &this.state else {
            return Poll::Ready(None);
        };
        let mut st = lock(state);
        if pos < st.frames.len() {
            let frame = copy_frame(&st.frames[pos]);
            drop(st);
            this.pos += 1;
            return Poll::Ready(frame.map(Ok));
        }
        if st.ended {
            return Poll::Ready(None);
        }
        let Some(source) = st.source.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(source).poll_frame(cx);
        match polled {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                st.ended = true;
                drop(st);
                state.finished.notify_waiters();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                // A broken client body cannot be replayed either.
                st.overflowed = true;
                st.failed = true;
                st.slow = super::pace::SlowBody::find(e.as_ref());
                drop(st);
                state.finished.notify_waiters();
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Some(Ok(frame))) => {
                st.started = true;
                if source_done(&st) {
                    st.ended = true;
                    state.finished.notify_waiters();
                }
                let len = frame.data_ref().map(|d| d.len()).unwrap_or(0);
                let recorded = !st.overflowed && st.buffered + len <= st.cap;
                if recorded {
                    if let Some(copy) = copy_frame(&frame) {
                        st.buffered += len;
                        st.frames.push(copy);
                    }
                } else {
                    st.overflowed = true;
                }
                drop(st);
                if recorded {
                    this.pos += 1;
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let Some(state) = &self.state else {
            return true;
        };
        let st = lock(state);
        if self.pos < st.frames.len() {
            return false;
        }
        st.ended || st.source.as_ref().is_none_or(|s| s.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    /// A body fed frame by frame from a channel.
    struct Fed(mpsc::Receiver<Bytes>);

    impl Body for Fed {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_lives_while_frames_come_and_ends_after_idle_silence() {
        let (tx, rx) = mpsc::channel(4);
        let mut body = IdleBody::new(Fed(rx), Duration::from_secs(10));
        // A frame every 6 s for 60 s: never 10 s of silence.
        let feeder = tokio::spawn(async move {
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_secs(6)).await;
                tx.send(Bytes::from_static(b"event")).await.unwrap();
            }
            tx
        });
        for _ in 0..10 {
            let frame = body.frame().await.unwrap();
            assert!(frame.is_ok(), "cut while frames still came");
        }
        let _tx = feeder.await.unwrap();
        let silent_from = Instant::now();
        let end = body.frame().await.unwrap();
        assert!(end.unwrap_err().is::<StreamIdle>());
        let silence = silent_from.elapsed();
        assert!(
            silence >= Duration::from_secs(10) && silence < Duration::from_secs(11),
            "ended after {silence:?} of silence"
        );
    }
}
