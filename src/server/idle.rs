//! The keep-alive idle timeout of an HTTP/1 client connection, with one
//! timer per connection instead of one per request.
//!
//! hyper's own `header_read_timeout` boxes, registers and drops a timer for
//! every request on a kept-alive connection. Here the service counts the
//! requests it is answering ([`Activity`]), each response body records
//! when it ended ([`Tracked`]), and the connection's reader
//! ([`super::scan::Scanned`]) checks one lazily re-armed deadline while it
//! waits for the next head: the timer is touched only when it fires (at
//! most once per `idle_timeout`), not per request.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use crate::deadline::LazyDeadline;

/// What a connection's service shares with its reader.
#[derive(Debug)]
pub(super) struct Activity {
    /// Requests whose response has not ended yet.
    answering: AtomicUsize,
    /// When the last response ended, in ms after `start`.
    ended_ms: AtomicU64,
    start: Instant,
}

impl Activity {
    pub(super) fn new() -> Arc<Activity> {
        Arc::new(Activity {
            answering: AtomicUsize::new(0),
            ended_ms: AtomicU64::new(0),
            start: Instant::now(),
        })
    }

    /// A request arrived: the connection is busy until its response body
    /// (the returned guard) is dropped.
    pub(super) fn begin(self: &Arc<Self>) -> Answering {
        self.answering.fetch_add(1, Ordering::AcqRel);
        Answering(self.clone())
    }

    /// When the connection has been idle for `timeout`, if it is idle now.
    fn idle_until(&self, timeout: Duration) -> Option<Instant> {
        if self.answering.load(Ordering::Acquire) > 0 {
            return None;
        }
        let ended = Duration::from_millis(self.ended_ms.load(Ordering::Acquire));
        Some(self.start + ended + timeout)
    }
}

/// Held by a response body; its drop ends the request.
#[derive(Debug)]
pub(super) struct Answering(Arc<Activity>);

impl Drop for Answering {
    fn drop(&mut self) {
        let a = &self.0;
        let ms = u64::try_from(a.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        a.ended_ms.fetch_max(ms, Ordering::AcqRel);
        a.answering.fetch_sub(1, Ordering::AcqRel);
    }
}

pin_project_lite::pin_project! {
    /// A response body that ends its request when hyper drops it (written
    /// whole, or the connection closed).
    pub(super) struct Tracked<B> {
        #[pin]
        inner: B,
        answering: Answering,
    }
}

impl<B> Tracked<B> {
    pub(super) fn new(inner: B, answering: Answering) -> Tracked<B> {
        Tracked { inner, answering }
    }
}

impl<B: Body<Data = Bytes>> Body for Tracked<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The reader's side: one lazily moved timer per connection.
#[derive(Debug)]
pub(super) struct IdleClock {
    activity: Arc<Activity>,
    timeout: Duration,
    deadline: LazyDeadline,
}

impl IdleClock {
    pub(super) fn new(activity: Arc<Activity>, timeout: Duration) -> IdleClock {
        IdleClock {
            activity,
            timeout,
            deadline: LazyDeadline::default(),
        }
    }

    /// Called while the reader waits for the next head: whether the
    /// connection has now been idle for the timeout. Keeps the timer armed
    /// no later than that moment, so the reader is woken to check again
    /// even when the last response ends without any I/O on this side (a
    /// response still running ends no earlier than now).
    pub(super) fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        match self.activity.idle_until(self.timeout) {
            Some(due) => self.deadline.poll_until(cx, due).is_ready(),
            None => {
                let _ = self.deadline.poll_until(cx, Instant::now() + self.timeout);
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    fn cx() -> Context<'static> {
        Context::from_waker(Waker::noop())
    }

    #[tokio::test(start_paused = true)]
    async fn idle_runs_from_the_end_of_the_last_response_and_never_while_answering() {
        let activity = Activity::new();
        let mut clock = IdleClock::new(activity.clone(), Duration::from_secs(10));
        assert!(!clock.expired(&mut cx()));
        tokio::time::advance(Duration::from_secs(6)).await;
        let busy = activity.begin();
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(!clock.expired(&mut cx()), "a long answer is not idleness");
        drop(busy);
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(!clock.expired(&mut cx()), "9 s after the answer ended");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(clock.expired(&mut cx()), "11 s after the answer ended");
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_never_answered_is_idle_from_its_start() {
        let activity = Activity::new();
        let mut clock = IdleClock::new(activity, Duration::from_secs(5));
        tokio::time::advance(Duration::from_secs(4)).await;
        assert!(!clock.expired(&mut cx()));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(clock.expired(&mut cx()));
    }
}
