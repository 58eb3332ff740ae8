//! Opening a connection: TCP connect, the HTTP/1.1 handshake with its
//! connection task, and the probe exchange that verification and health
//! probes share.

use std::time::Duration;

use http::{Request, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};

use super::body::OutBody;
use super::error::UpstreamError;
use super::pool::Pool;
use crate::proxy::body::BoxError;
use crate::wire::instance_of;

/// The most of a probe's answer body read (and thrown away).
const MAX_PROBE_BODY: usize = 64 * 1024;

/// A probe's answer: any status counts.
#[derive(Debug)]
pub(super) struct Answer {
    pub(super) status: StatusCode,
    pub(super) instance: Option<String>,
}

/// TCP connect to the worker by `deadline` (`budget` is what the error
/// reports), with `TCP_NODELAY`.
pub(super) async fn dial(
    pool: &Pool,
    deadline: Instant,
    budget: Duration,
) -> Result<TcpStream, UpstreamError> {
    let tcp = match timeout_at(deadline, TcpStream::connect(pool.addr())).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(source)) if is_local_shortage(&source) => {
            return Err(UpstreamError::Local { source })
        }
        Ok(Err(source)) => return Err(UpstreamError::Refused { source }),
        Err(_) => return Err(UpstreamError::ConnectTimeout { after: budget }),
    };
    tcp.set_nodelay(true)
        .map_err(|source| UpstreamError::Refused { source })?;
    Ok(tcp)
}

/// Whether a connect error is tether's own shortage (out of file
/// descriptors, local ports or buffers), not anything the worker did.
fn is_local_shortage(e: &std::io::Error) -> bool {
    // EMFILE, ENFILE, ENOMEM, EADDRNOTAVAIL, ENOBUFS (Linux numbers).
    matches!(e.raw_os_error(), Some(24 | 23 | 12 | 99 | 105))
}

/// The smallest read-ahead buffer of an upstream connection (hyper's
/// minimum is 8 KiB).
const UPSTREAM_MIN_BUF: usize = 16 << 10;

/// The HTTP/1.1 handshake (no I/O) and the connection's task. The task
/// lives as long as the connection: it ends when the worker closes it, on
/// an error, or once the [`SendRequest`] is dropped while it is idle.
pub(super) async fn handshake(
    tcp: TcpStream,
    pool: &Pool,
    max_response_head: usize,
) -> Result<SendRequest<OutBody>, UpstreamError> {
    let (tx, conn) = http1::Builder::new()
        .max_header_size(max_response_head)
        // A slow client holds back the response; what tether reads ahead
        // from the worker meanwhile is bounded by this buffer (hyper's
        // default grows to ~400 KiB per connection).
        .max_buf_size(max_response_head.max(UPSTREAM_MIN_BUF))
        .handshake(TokioIo::new(tcp))
        .await
        .map_err(|source| UpstreamError::NotSent { source })?;
    let authority = pool.authority().clone();
    tokio::spawn(async move {
        if let Err(error) = conn.with_upgrades().await {
            tracing::debug!(upstream = %authority, %error, "upstream connection ended with an error");
        }
    });
    Ok(tx)
}

/// Sends a probe and reads its answer whole (bounded), so the connection
/// can carry the next request.
pub(super) async fn exchange(
    tx: &mut SendRequest<OutBody>,
    req: Request<OutBody>,
) -> Result<Answer, BoxError> {
    let resp = tx.send_request(req).await?;
    let status = resp.status();
    let instance = instance_of(resp.headers());
    Limited::new(resp.into_body(), MAX_PROBE_BODY)
        .collect()
        .await?;
    Ok(Answer { status, instance })
}

/// Connects and sends `GET path` under one `deadline`: the verification of
/// a new connection (`close` false) or a health probe (`close` true).
pub(super) async fn probe(
    pool: &Pool,
    path: &str,
    close: bool,
    max_response_head: usize,
    deadline: Instant,
    budget: Duration,
) -> Result<(SendRequest<OutBody>, Answer), UpstreamError> {
    let tcp = dial(pool, deadline, budget).await?;
    let mut tx = handshake(tcp, pool, max_response_head).await?;
    let verify = |source: BoxError| UpstreamError::Verify { source };
    let req = pool.get(path, close).map_err(|e| verify(e.into()))?;
    let answer = timeout_at(deadline, exchange(&mut tx, req))
        .await
        .map_err(|_| verify(Box::new(super::error::TimedOut(budget))))?
        .map_err(verify)?;
    Ok((tx, answer))
}
