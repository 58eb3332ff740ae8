//! Listeners, the accept loop, TLS and shutdown.
//!
//! Plain and TLS connections run the same HTTP service: TLS only wraps the
//! transport. [`start`] binds everything and returns a [`Handle`] that tests
//! and `main` use to learn the bound addresses, reload and stop;
//! [`start_with`] first takes listeners handed over by a parent process
//! ([`Inherited`]: socket activation, binary upgrade).

mod accept;
mod idle;
mod inherit;
mod scan;
mod stall;
pub mod tls;

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, Admin};
use crate::affinity::sessions::Sessions;
use crate::backends::WorkerSet;
use crate::clock::SharedClock;
use crate::config::Config;
use crate::continuity::contract::Contract;
use crate::continuity::Continuity;
use crate::health::Health;
use crate::live::{Live, SharedLive};
use crate::metrics::Metrics;
use crate::proxy::{self, Proxy, Tunnels};
use crate::upstream::Upstream;
use accept::ConnLimit;
pub use inherit::{InheritError, Inherited, ReadySignal, READY_ENV, READY_MESSAGE};

/// What the head scanner concludes after reading `chunks` (the smuggling
/// flag, whether a head is still due): the fuzz targets' view of it.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn scan_chunks(limit: usize, chunks: &[&[u8]]) -> (bool, bool) {
    let mut s = scan::Scanner::new(limit);
    for c in chunks {
        s.feed(c);
    }
    (
        s.flag().load(std::sync::atomic::Ordering::Relaxed),
        s.head_pending(),
    )
}

/// Why the server could not start or reload.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A listener could not bind.
    #[error("cannot listen on {key} = {addr}: {source}")]
    Bind {
        /// The config key.
        key: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// An inherited listener could not be used.
    #[error("cannot use the inherited listener for {key} = {addr}: {source}")]
    Inherited {
        /// The config key.
        key: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// TLS setup failed.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// A reload changed something that needs a restart.
    #[error("{0} cannot change on reload; restart tether to apply it")]
    NeedsRestart(&'static str),
}

/// A running tether.
#[derive(Debug)]
pub struct Handle {
    /// Bound plain HTTP address.
    pub http: Option<SocketAddr>,
    /// Bound HTTPS address.
    pub https: Option<SocketAddr>,
    /// Bound admin address.
    pub admin: SocketAddr,
    proxy: Proxy,
    live: SharedLive,
    sessions: Sessions,
    tls: Arc<ArcSwapOption<rustls::ServerConfig>>,
    metrics: Arc<Metrics>,
    tunnels: Tunnels,
    health: Health,
    cancel: CancellationToken,
    serving: CancellationToken,
    continuity: Continuity,
    workers: WorkerSet,
    /// The listening sockets (http, https, admin), kept to hand them over.
    sockets: Vec<OwnedFd>,
    tasks: JoinSet<()>,
}

/// Binds the listeners of `config` and starts serving.
pub async fn start(config: Config, clock: SharedClock) -> Result<Handle, ServerError> {
    start_with(config, clock, Inherited::default()).await
}

/// Like [`start`], but a configured address for which `inherited` holds a
/// listener uses that listener instead of binding; the others are bound.
pub async fn start_with(
    config: Config,
    clock: SharedClock,
    mut inherited: Inherited,
) -> Result<Handle, ServerError> {
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::new());
    let live = Live::shared(config.clone());
    let workers = WorkerSet::new(&config.backends);
    let sessions = Sessions::new(config.limits.max_sessions);
    let upstream = Upstream::new();
    let continuity = Continuity::new(
        live.clone(),
        workers.clone(),
        Contract::new(upstream.clone()),
        metrics.clone(),
        clock.clone(),
    );
    // `cancel` stops everything at once; `serving` only the listeners and
    // the tunnels. A graceful stop ends serving first, lets in-flight
    // requests finish, captures what they announced, then stops the
    // background tasks.
    let cancel = CancellationToken::new();
    let serving = cancel.child_token();
    let tunnels = Tunnels::new(serving.clone());
    let proxy = Proxy::new(proxy::Parts {
        live: live.clone(),
        workers: workers.clone(),
        sessions: sessions.clone(),
        continuity: continuity.clone(),
        upstream: upstream.clone(),
        metrics: metrics.clone(),
        clock,
        tunnels: tunnels.clone(),
    });
    let tls = Arc::new(ArcSwapOption::from(match &config.tls {
        Some(t) => Some(tls::server_config(t)?),
        None => None,
    }));
    let limit = ConnLimit::new(config.limits.max_connections, metrics.clone());
    let mut tasks = JoinSet::new();

    let http = bind("listen.http", config.listen.http, &mut inherited).await?;
    let https = bind("listen.https", config.listen.https, &mut inherited).await?;
    let admin_listener = bind("listen.admin", Some(config.listen.admin), &mut inherited).await?;
    for addr in inherited.unclaimed() {
        tracing::warn!(addr = %addr, "inherited listener matches no [listen] address: closing it");
    }
    drop(inherited);
    let mut sockets = Vec::new();
    for l in [&http, &https, &admin_listener].into_iter().flatten() {
        if let Ok(fd) = l.as_fd().try_clone_to_owned() {
            sockets.push(fd);
        }
    }
    let local = |l: &Option<TcpListener>| l.as_ref().and_then(|l| l.local_addr().ok());
    let (http_addr, https_addr) = (local(&http), local(&https));
    let admin_addr = local(&admin_listener).unwrap_or(config.listen.admin);

    let health = Health::start(
        workers.clone(),
        live.clone(),
        upstream.clone(),
        metrics.clone(),
        cancel.clone(),
    );
    continuity.start(sessions.clone(), cancel.clone()).await;
    if config.discovery.is_some() {
        tokio::spawn(crate::discovery::run(
            workers.clone(),
            live.clone(),
            health.clone(),
            cancel.clone(),
        ));
    }
    for (listener, tls) in [(http, None), (https, Some(tls.clone()))] {
        if let Some(l) = listener {
            tasks.spawn(accept::serve(
                l,
                tls,
                proxy.clone(),
                live.clone(),
                limit.clone(),
                serving.clone(),
            ));
        }
    }
    let continuity_handle = continuity.clone();
    if let Some(l) = admin_listener {
        let admin = Admin {
            live: live.clone(),
            workers: workers.clone(),
            continuity,
            metrics: metrics.clone(),
            upstream,
        };
        tasks.spawn(admin::serve(l, admin, serving.clone()));
    }
    tracing::info!(
        http = http_addr.map(|a| a.to_string()).unwrap_or_default(),
        https = https_addr.map(|a| a.to_string()).unwrap_or_default(),
        admin = %admin_addr,
        backends = config.backends.len(),
        pid = std::process::id(),
        "tether listening"
    );
    Ok(Handle {
        http: http_addr,
        https: https_addr,
        admin: admin_addr,
        proxy,
        live,
        sessions,
        tls,
        metrics,
        tunnels,
        health,
        cancel,
        serving,
        continuity: continuity_handle,
        workers,
        sockets,
        tasks,
    })
}

async fn bind(
    key: &'static str,
    addr: Option<SocketAddr>,
    inherited: &mut Inherited,
) -> Result<Option<TcpListener>, ServerError> {
    let Some(addr) = addr else { return Ok(None) };
    if let Some(l) = inherited.take(addr) {
        let err = |source| ServerError::Inherited { key, addr, source };
        l.set_nonblocking(true).map_err(err)?;
        tracing::info!(key, addr = %addr, "using the inherited listener");
        return TcpListener::from_std(l).map(Some).map_err(err);
    }
    TcpListener::bind(addr)
        .await
        .map(Some)
        .map_err(|source| ServerError::Bind { key, addr, source })
}

impl Handle {
    /// Applies a new config: workers, cookie keys, TLS certificates and
    /// per-request limits. Listener addresses need a restart.
    pub fn reload(&self, config: Config) -> Result<(), ServerError> {
        let old = self.live.load_full();
        let same = |a: &crate::config::Listen, b: &crate::config::Listen| {
            a.http == b.http && a.https == b.https && a.admin == b.admin
        };
        if !same(&old.config.listen, &config.listen) {
            return Err(ServerError::NeedsRestart("[listen]"));
        }
        if config.tls.is_some() != old.config.tls.is_some() {
            return Err(ServerError::NeedsRestart("[tls]"));
        }
        // The discovery task starts with tether and ends without
        // [discovery]: turning it on or off needs a restart (its name,
        // port and interval may change on reload).
        if config.discovery.is_some() != old.config.discovery.is_some() {
            return Err(ServerError::NeedsRestart("[discovery]"));
        }
        // A certificate that does not parse or a key that does not match
        // would fail every new handshake: keep the running one.
        let new_tls = match config.tls.as_ref().map(tls::server_config).transpose() {
            Ok(t) => t,
            Err(e) => {
                self.metrics.tls_reload_refused();
                return Err(e.into());
            }
        };
        self.tls.store(new_tls);
        self.proxy.reload(Arc::new(config));
        self.health.sync();
        Ok(())
    }

    /// Copies of the listening sockets (http, https, admin, those
    /// configured), for a new process to serve on the same sockets.
    pub fn listening_sockets(&self) -> std::io::Result<Vec<OwnedFd>> {
        self.sockets.iter().map(|s| s.try_clone()).collect()
    }

    /// `shutdown.upgrade_timeout` as configured now.
    pub fn upgrade_timeout(&self) -> std::time::Duration {
        self.live.load().config.shutdown.upgrade_timeout
    }

    /// Whether `/readyz` would answer 200 (at least one worker is up).
    pub fn is_ready(&self) -> bool {
        self.workers.load().usable_count() > 0
    }

    /// Counts a binary upgrade in `tether_upgrades_total{outcome}`.
    pub fn count_upgrade(&self, ok: bool) {
        self.metrics.upgrade(if ok { "ok" } else { "failed" });
    }

    /// Live sessions (tests sweep them on a manual clock).
    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    /// A token that stops everything at once when cancelled (no grace).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Stops gracefully: stops accepting, lets in-flight requests finish
    /// within `shutdown.grace`, captures what their responses announced
    /// (and flushes the outage buffer) within `state.restore_timeout`, then
    /// stops the background tasks.
    pub async fn stop(mut self) {
        let grace = self.live.load().config.shutdown.grace;
        let drained = tokio::time::Instant::now() + grace;
        // Our copies of the listening sockets go first: without a process
        // that accepts (a new binary holds its own copies), the kernel
        // refuses new connections at once instead of queueing them.
        self.sockets.clear();
        // Also tells every WebSocket `1001 going away`.
        self.serving.cancel();
        while let Some(r) = self.tasks.join_next().await {
            if let Err(e) = r {
                tracing::error!(error = %e, "server task failed");
            }
        }
        if !self.tunnels.closed(drained).await {
            tracing::warn!(grace = ?grace, "shutdown grace period over: dropping open tunnels");
        }
        let within = self.live.load().config.state.restore_timeout;
        let deadline = tokio::time::Instant::now() + within;
        if !self.continuity.finish(deadline).await {
            tracing::warn!(
                within = ?within,
                "stopped before every announced change was captured"
            );
        }
        self.cancel.cancel();
    }
}
