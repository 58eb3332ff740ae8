//! The accept loop: connection limit, TLS handshake in the spawned task
//! under a deadline, back-off on accept errors, graceful shutdown.
//!
//! The drain (a stop, or a binary upgrade handing the listener to a new
//! process) closes keep-alive connections without racing their clients:
//! each HTTP/1 response gets `Connection: close`, so a client that is
//! sending learns of the close from its own response; only connections
//! still idle after [`DRAIN_LINGER`] are closed from our side.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::idle::{Activity, IdleClock, Tracked};
use super::scan::{Scanned, Scanner};
use super::stall::Stall;
use super::tls::HandshakeLog;
use crate::config::Limits;
use crate::live::SharedLive;
use crate::metrics::Metrics;
use crate::proxy::headers::Smuggling;
use crate::proxy::{Peer, Proxy};

/// Most bytes queued to send per HTTP/2 stream (hyper's default is 400
/// KiB): a client that never reads cannot pin more than streams x this.
const H2_MAX_SEND_BUF: usize = 64 * 1024;
/// Most streams a client may reset before its connection is closed.
const H2_MAX_RESETS: usize = 100;
/// How long a drain waits for idle keep-alive connections to come back for
/// a `Connection: close` response before closing them (a request sent on an
/// idle connection at the instant it closes fails: the client cannot know
/// whether it was processed).
const DRAIN_LINGER: Duration = Duration::from_secs(1);

/// `limits.max_connections`, shared by the client listeners.
#[derive(Debug, Clone)]
pub(crate) struct ConnLimit {
    permits: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    handshakes: Arc<HandshakeLog>,
}

impl ConnLimit {
    /// A limit of `max` open connections.
    pub(crate) fn new(max: usize, metrics: Arc<Metrics>) -> ConnLimit {
        ConnLimit {
            permits: Arc::new(Semaphore::new(max)),
            metrics,
            handshakes: Arc::new(HandshakeLog::new()),
        }
    }

    fn try_take(&self) -> Option<OwnedSemaphorePermit> {
        self.permits.clone().try_acquire_owned().ok()
    }
}

/// Accepts connections on `listener` until `cancel`, then drains them
/// within `shutdown.grace`.
pub(super) async fn serve(
    listener: TcpListener,
    tls: Option<Arc<ArcSwapOption<rustls::ServerConfig>>>,
    proxy: Proxy,
    settings: SharedLive,
    limit: ConnLimit,
    cancel: CancellationToken,
) {
    let graceful = GracefulShutdown::new();
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => break,
            r = listener.accept() => r,
        };
        let (stream, addr) = match accepted {
            Ok(a) => {
                backoff = Duration::from_millis(5);
                a
            }
            Err(e) => {
                // EMFILE and friends: wait instead of spinning.
                tracing::warn!(error = %e, backoff = ?backoff, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let Some(permit) = limit.try_take() else {
            // Refuse instead of queueing: established connections keep going.
            limit.metrics.connection_refused();
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let live = settings.load();
        let limits = live.config.limits.clone();
        let trusted = live.config.listen.trusted_proxies.clone();
        // Names of the `[[tls.sni]]` certificates: a connection served with
        // one of them is for that host only (421 for others).
        let named: Vec<String> = live
            .config
            .tls
            .as_ref()
            .map(|t| t.sni.iter().map(|s| s.name.to_ascii_lowercase()).collect())
            .unwrap_or_default();
        drop(live);
        let tls_cfg = tls.as_ref().and_then(|t| t.load_full());
        let is_tls = tls.is_some();
        let watcher = Drain {
            watcher: graceful.watcher(),
            draining: cancel.clone(),
        };
        let proxy = proxy.clone();
        let metrics = limit.metrics.clone();
        let handshakes = limit.handshakes.clone();
        tokio::spawn(async move {
            metrics.connection(true);
            let mut peer = Peer::with_trust(addr, is_tls, &trusted);
            match (is_tls, tls_cfg) {
                (false, _) => serve_conn(stream, peer, proxy, &limits, watcher).await,
                (true, Some(cfg)) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
                    match tokio::time::timeout(limits.header_timeout, acceptor.accept(stream)).await
                    {
                        Ok(Ok(tls_stream)) => {
                            let sni = tls_stream.get_ref().1.server_name();
                            peer.sni = sni
                                .map(str::to_ascii_lowercase)
                                .filter(|n| named.contains(n))
                                .map(Into::into);
                            serve_conn(tls_stream, peer, proxy, &limits, watcher).await
                        }
                        Ok(Err(e)) => {
                            metrics.tls_handshake_failed();
                            tracing::debug!(peer = %addr, error = %e, "TLS handshake failed");
                            if let Some(n) = handshakes.failed(std::time::Instant::now()) {
                                tracing::warn!(
                                    failed = n,
                                    last_peer = %addr,
                                    last_error = %e,
                                    "TLS handshakes failed (one line a minute; see tether_tls_handshake_failures_total)"
                                );
                            }
                        }
                        Err(_) => tracing::debug!(peer = %addr, "TLS handshake timed out"),
                    }
                }
                (true, None) => tracing::error!("TLS listener without a TLS config"),
            }
            metrics.connection(false);
            drop(permit);
        });
    }
    drop(listener);
    let grace = settings.load().config.shutdown.grace;
    let deadline = tokio::time::Instant::now() + grace;
    let linger_until = tokio::time::Instant::now() + DRAIN_LINGER.min(grace);
    while graceful.count() > 0 && tokio::time::Instant::now() < linger_until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if tokio::time::timeout_at(deadline, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?grace, "shutdown grace period over: closing remaining connections");
    }
}

/// The HTTP server builder for one connection: h1 + h2 with the limits.
fn builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        // Not hyper's head timer (a boxed timer made, registered and
        // dropped per request): `Scanned` bounds a head to
        // `header_timeout` from its first byte and the idle time between
        // requests to `idle_timeout`, with one timer per connection.
        .header_read_timeout(None)
        .max_buf_size(limits.max_header_bytes)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .initial_stream_window_size(limits.h2_initial_stream_window)
        .initial_connection_window_size(limits.h2_initial_connection_window)
        .max_send_buf_size(H2_MAX_SEND_BUF)
        .max_pending_accept_reset_streams(H2_MAX_RESETS)
        .max_local_error_reset_streams(H2_MAX_RESETS)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(limits.idle_timeout)
        .keep_alive_timeout(Duration::from_secs(20));
    b
}

/// A connection's view of the drain.
struct Drain {
    watcher: Watcher,
    /// Cancelled when the listener stops accepting.
    draining: CancellationToken,
}

async fn serve_conn<IO>(io: IO, peer: Peer, proxy: Proxy, limits: &Limits, drain: Drain)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let scanner = Scanner::new(limits.max_header_bytes);
    let smuggled = scanner.flag();
    let switched = scanner.switch();
    let draining = drain.draining;
    let peer = Arc::new(peer);
    let conn_peer = peer.clone();
    let activity = Activity::new();
    let idle = IdleClock::new(activity.clone(), limits.idle_timeout);
    let svc = service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
        let answering = activity.begin();
        let proxy = proxy.clone();
        let peer = conn_peer.clone();
        if smuggled.load(Ordering::Relaxed) {
            // Refused by the outer handler, which logs and counts it.
            req.extensions_mut().insert(Smuggling::LengthAndChunked);
        }
        let switched = switched.clone();
        let connect = req.method() == http::Method::CONNECT;
        let h1 = req.version() < http::Version::HTTP_2;
        let draining = draining.clone();
        async move {
            let mut resp = proxy.handle(req, &peer).await;
            // What follows a 101 (or a CONNECT's 2xx) is not HTTP/1:
            // stop scanning it for heads.
            let status = resp.status();
            if status == http::StatusCode::SWITCHING_PROTOCOLS || (connect && status.is_success()) {
                switched.store(true, Ordering::Relaxed);
            } else if h1 && draining.is_cancelled() {
                // hyper closes the connection after this response.
                resp.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
            }
            Ok::<_, Infallible>(resp.map(|body| Tracked::new(body, answering)))
        }
    });
    let b = builder(limits);
    let conn = b.serve_connection_with_upgrades(
        TokioIo::new(Scanned::new(
            Stall::new(io, limits.send_timeout),
            scanner,
            limits.header_timeout,
            idle,
        )),
        svc,
    );
    if let Err(e) = drain.watcher.watch(conn).await {
        tracing::debug!(peer = %peer.addr, error = %e, "connection ended with error");
    }
}
