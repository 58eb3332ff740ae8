//! Upgraded connections (WebSocket): bytes copied both ways until either
//! side closes or the tunnel stays silent for `limits.stream_idle`.
//!
//! For a WebSocket tether follows the frame boundaries of what the worker
//! sends ([`frames`]), so that a tunnel it ends still ends with a Close
//! frame: `1011` when the worker's side ends without one (a crashed or
//! killed worker), `1001` when tether stops. A worker that dies in the
//! middle of a frame leaves nothing to do but close the connection (the
//! client sees `1006`); at a stop, tether lets the current frame finish
//! (within `shutdown.grace`) before it writes its Close frame.

mod frames;

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use frames::{close_frame, Frames, GOING_AWAY, WORKER_LOST};

/// How long the client may take to answer tether's Close frame (its own
/// Close) before the connection is dropped.
const LINGER: Duration = Duration::from_secs(2);
/// Deadline for writing tether's Close frame to a client.
const CLOSE_WRITE: Duration = Duration::from_secs(5);

/// The open tunnels: told to stop when tether stops, and counted so the
/// stop can wait for their Close frames to go out.
#[derive(Debug, Clone)]
pub(crate) struct Tunnels {
    stop: CancellationToken,
    open: Arc<Open>,
}

#[derive(Debug, Default)]
struct Open {
    count: AtomicUsize,
    none: Notify,
}

/// One tunnel counted as open until dropped.
struct Counted(Arc<Open>);

impl Drop for Counted {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.none.notify_waiters();
        }
    }
}

impl Tunnels {
    /// Tunnels that end (with `1001` for a WebSocket) when `stop` is
    /// cancelled.
    pub(crate) fn new(stop: CancellationToken) -> Tunnels {
        Tunnels {
            stop,
            open: Arc::default(),
        }
    }

    /// Waits until every tunnel has ended or `deadline` passed; `false`
    /// when some were still open.
    pub(crate) async fn closed(&self, deadline: Instant) -> bool {
        loop {
            let none = self.open.none.notified();
            tokio::pin!(none);
            none.as_mut().enable();
            if self.open.count.load(Ordering::Acquire) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, none).await.is_err() {
                return false;
            }
        }
    }

    fn enter(&self) -> Counted {
        self.open.count.fetch_add(1, Ordering::AcqRel);
        Counted(self.open.clone())
    }
}

/// What one tunnel is told besides its two ends.
#[derive(Debug)]
pub(super) struct Opts {
    /// `limits.stream_idle`.
    pub idle: Duration,
    /// `shutdown.grace`: at a stop, how long the worker's current frame may
    /// take to finish.
    pub grace: Duration,
    /// The worker, for logs.
    pub backend: String,
    /// Whether the worker agreed to `Upgrade: websocket`.
    pub websocket: bool,
    /// The request's slot at the worker, held while the tunnel runs
    /// (`queue.stream_slots`).
    pub slot: Option<crate::admission::Slot>,
}

/// Spawns the tunnel between the client's and the worker's upgraded
/// connections.
pub(super) fn spawn(client: OnUpgrade, upstream: OnUpgrade, tunnels: &Tunnels, opts: Opts) {
    let counted = tunnels.enter();
    let stop = tunnels.stop.clone();
    tokio::spawn(async move {
        let _counted = counted;
        let mut opts = opts;
        // Given back when the tunnel ends, however it ends.
        let _slot = opts.slot.take();
        let (client, upstream) = match tokio::join!(client, upstream) {
            (Ok(c), Ok(u)) => (c, u),
            (Err(e), _) | (_, Err(e)) => {
                tracing::debug!(backend = opts.backend, error = %e, "upgrade did not complete");
                return;
            }
        };
        run(TokioIo::new(client), TokioIo::new(upstream), &stop, &opts).await;
    });
}

/// Copies both ways until the worker's side ends (then lingers for the
/// client), a stop, or `opts.idle` of silence.
async fn run<C, U>(client: C, upstream: U, stop: &CancellationToken, opts: &Opts)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let (mut cr, mut cw) = tokio::io::split(Activity::new(client, last.clone(), start));
    let (mut ur, mut uw) = tokio::io::split(Activity::new(upstream, last.clone(), start));
    let both = async {
        let up = async {
            let r = tokio::io::copy(&mut cr, &mut uw).await;
            let _ = uw.shutdown().await;
            r
        };
        let down = downstream(&mut ur, &mut cw, stop, opts);
        tokio::pin!(up, down);
        let mut up_done = false;
        let ended = loop {
            tokio::select! {
                r = &mut up, if !up_done => {
                    up_done = true;
                    if let Err(e) = r {
                        tracing::debug!(backend = opts.backend, error = %e, "tunnel: client side failed");
                    }
                }
                r = &mut down => break r,
            }
        };
        if let Err(e) = ended {
            tracing::debug!(backend = opts.backend, error = %e, "tunnel: worker side failed");
        }
        // Let the client's answer to a Close frame through, briefly.
        if !up_done {
            let _ = tokio::time::timeout(LINGER, up).await;
        }
    };
    tokio::pin!(both);
    loop {
        let since = Duration::from_millis(last.load(Ordering::Relaxed));
        tokio::select! {
            _ = &mut both => return,
            _ = tokio::time::sleep_until(start + since + opts.idle) => {
                let now_ms = start.elapsed().as_millis() as u64;
                if now_ms.saturating_sub(last.load(Ordering::Relaxed)) >= opts.idle.as_millis() as u64 {
                    tracing::debug!(backend = opts.backend, "tunnel idle: closed");
                    return;
                }
            }
        }
    }
}

/// Copies the worker's bytes to the client. For a WebSocket, ends with a
/// Close frame of tether's own when the worker's side ends without one, or
/// when `stop` is cancelled (after the current frame).
async fn downstream<R, W>(
    from: &mut R,
    to: &mut W,
    stop: &CancellationToken,
    opts: &Opts,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut frames = opts.websocket.then(Frames::new);
    let mut buf = vec![0u8; 16 * 1024];
    // Set at a stop: the deadline for the current frame to finish.
    let mut stopping: Option<Instant> = None;
    loop {
        if let (Some(_), Some(f)) = (stopping, &frames) {
            if f.at_boundary() {
                if !f.closed() {
                    send_close(to, GOING_AWAY, "tether is stopping").await?;
                }
                return to.shutdown().await;
            }
        }
        // While stopping, never read past the end of the current frame.
        let limit = match (&frames, stopping) {
            (Some(f), Some(_)) => f.to_boundary().min(buf.len()),
            _ => buf.len(),
        };
        let far = Instant::now() + Duration::from_secs(86_400);
        let read = tokio::select! {
            biased;
            _ = stop.cancelled(), if stopping.is_none() => {
                if frames.is_none() {
                    return to.shutdown().await;
                }
                stopping = Some(Instant::now() + opts.grace);
                continue;
            }
            _ = tokio::time::sleep_until(stopping.unwrap_or(far)), if stopping.is_some() => {
                tracing::debug!(backend = opts.backend, "tunnel: frame unfinished at stop, closed without a Close frame");
                return to.shutdown().await;
            }
            r = from.read(&mut buf[..limit]) => r,
        };
        let n = match read {
            Ok(n) if n > 0 => n,
            ended => {
                if let Err(e) = ended {
                    tracing::debug!(backend = opts.backend, error = %e, "tunnel: worker side failed");
                }
                match &frames {
                    Some(f) if f.at_boundary() && !f.closed() => {
                        send_close(to, WORKER_LOST, "worker connection lost").await?;
                    }
                    Some(f) if !f.at_boundary() => tracing::debug!(
                        backend = opts.backend,
                        "tunnel: worker ended mid-frame, closed without a Close frame"
                    ),
                    _ => {}
                }
                return to.shutdown().await;
            }
        };
        if let Some(f) = frames.as_mut() {
            f.feed(&buf[..n]);
        }
        to.write_all(&buf[..n]).await?;
        to.flush().await?;
    }
}

async fn send_close<W: AsyncWrite + Unpin>(to: &mut W, code: u16, reason: &str) -> io::Result<()> {
    let frame = close_frame(code, reason);
    let write = async {
        to.write_all(&frame).await?;
        to.flush().await
    };
    tokio::time::timeout(CLOSE_WRITE, write)
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
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
