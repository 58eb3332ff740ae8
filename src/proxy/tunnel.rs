//! Upgraded connections (WebSocket): bytes copied both ways until either
//! side closes or the tunnel stays silent for `limits.stream_idle`.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Spawns the tunnel between the client's and the worker's upgraded
/// connections.
pub(super) fn spawn(client: OnUpgrade, upstream: OnUpgrade, idle: Duration, backend: String) {
    tokio::spawn(async move {
        let (client, upstream) = match tokio::join!(client, upstream) {
            (Ok(c), Ok(u)) => (c, u),
            (Err(e), _) | (_, Err(e)) => {
                tracing::debug!(backend, error = %e, "upgrade did not complete");
                return;
            }
        };
        let start = Instant::now();
        let last = Arc::new(AtomicU64::new(0));
        let mut a = Activity::new(TokioIo::new(client), last.clone(), start);
        let mut b = Activity::new(TokioIo::new(upstream), last.clone(), start);
        let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
        tokio::pin!(copy);
        loop {
            let since = Duration::from_millis(last.load(Ordering::Relaxed));
            let deadline = start + since + idle;
            tokio::select! {
                r = &mut copy => {
                    if let Err(e) = r {
                        tracing::debug!(backend, error = %e, "tunnel closed with error");
                    }
                    return;
                }
                _ = tokio::time::sleep_until(deadline) => {
                    let now_ms = start.elapsed().as_millis() as u64;
                    if now_ms.saturating_sub(last.load(Ordering::Relaxed)) >= idle.as_millis() as u64 {
                        tracing::debug!(backend, "tunnel idle: closed");
                        return;
                    }
                }
            }
        }
    });
}

/// An I/O wrapper that records the time of the last byte moved.
struct Activity<T> {
    io: T,
    last: Arc<AtomicU64>,
    start: Instant,
}

impl<T> Activity<T> {
    fn new(io: T, last: Arc<AtomicU64>, start: Instant) -> Self {
        Activity { io, last, start }
    }

    fn touch(&self) {
        self.last
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Activity<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Activity<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
