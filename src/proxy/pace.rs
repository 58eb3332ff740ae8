//! A pace for request bodies: a client that stops sending, or trickles its
//! body far below `limits.min_body_rate`, is cut off with [`SlowBody`] (the
//! client gets `408`) instead of holding a connection and a worker's
//! connection for as long as it likes.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::body::BoxError;

/// A request body fell silent for `limits.body_timeout`, or fell behind
/// `limits.min_body_rate`.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("request body too slow: {bytes} bytes in {elapsed:?}")]
pub(crate) struct SlowBody {
    /// Bytes received before the cut.
    pub bytes: u64,
    /// Since the body's first poll.
    pub elapsed: Duration,
}

impl SlowBody {
    /// Whether `e` (or one of its sources) is a [`SlowBody`].
    pub(crate) fn is_in(e: &(dyn std::error::Error + 'static)) -> bool {
        Self::find(e).is_some()
    }

    /// The [`SlowBody`] in `e` or its sources.
    pub(crate) fn find(e: &(dyn std::error::Error + 'static)) -> Option<SlowBody> {
        let mut cur = Some(e);
        while let Some(err) = cur {
            if let Some(slow) = err.downcast_ref::<SlowBody>() {
                return Some(*slow);
            }
            cur = err.source();
        }
        None
    }
}

pin_project_lite::pin_project! {
    /// Ends a body with [`SlowBody`] at the earlier of: `idle` after the
    /// last frame, and `idle + bytes / rate` after the first poll (the
    /// body may take that long in all; `rate` 0 drops this rule).
    pub(crate) struct PacedBody<B> {
        #[pin]
        inner: B,
        #[pin]
        sleep: Sleep,
        started: Option<Instant>,
        bytes: u64,
        idle: Duration,
        rate: u64,
    }
}

impl<B> PacedBody<B> {
    /// Wraps `inner`; the clock starts at the first poll (a body is not
    /// read while its request waits for a restore).
    pub(crate) fn new(inner: B, idle: Duration, rate: u64) -> Self {
        PacedBody {
            inner,
            sleep: tokio::time::sleep(idle),
            started: None,
            bytes: 0,
            idle,
            rate,
        }
    }
}

/// The deadline after a frame at `now`.
fn deadline(started: Instant, now: Instant, bytes: u64, idle: Duration, rate: u64) -> Instant {
    let silent = now + idle;
    if rate == 0 {
        return silent;
    }
    let granted = Duration::from_secs(bytes / rate)
        + Duration::from_nanos((bytes % rate).saturating_mul(1_000_000_000) / rate);
    match started.checked_add(idle.saturating_add(granted)) {
        Some(at) => silent.min(at),
        None => silent,
    }
}

impl<B> Body for PacedBody<B>
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
        let mut this = self.project();
        let started = match *this.started {
            Some(at) => at,
            None => {
                let now = Instant::now();
                *this.started = Some(now);
                this.sleep.as_mut().reset(now + *this.idle);
                now
            }
        };
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let len = frame.data_ref().map_or(0, |d| d.len());
                *this.bytes += u64::try_from(len).unwrap_or(u64::MAX);
                let at = deadline(started, Instant::now(), *this.bytes, *this.idle, *this.rate);
                this.sleep.as_mut().reset(at);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(other) => Poll::Ready(other.map(|r| r.map_err(Into::into))),
            Poll::Pending => {
                ready!(this.sleep.poll(cx));
                Poll::Ready(Some(Err(Box::new(SlowBody {
                    bytes: *this.bytes,
                    elapsed: started.elapsed(),
                }))))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deadline_is_the_earlier_of_silence_and_rate() {
        let t0 = Instant::now();
        let idle = Duration::from_secs(30);
        // Fast enough: the silence rule decides.
        let now = t0 + Duration::from_secs(10);
        assert_eq!(deadline(t0, now, 1 << 20, idle, 1024), now + idle);
        // Trickled: 10 bytes in 100 s grant 30 s + 10/1024 s from the start.
        let now = t0 + Duration::from_secs(100);
        let at = deadline(t0, now, 10, idle, 1024);
        assert!(at < now, "already overdue");
        assert_eq!(
            at,
            t0 + idle + Duration::from_nanos(10 * 1_000_000_000 / 1024)
        );
        // No minimum rate: only silence counts.
        assert_eq!(deadline(t0, now, 10, idle, 0), now + idle);
        // Huge counts do not overflow.
        let _ = deadline(t0, now, u64::MAX, idle, 1);
    }
}
