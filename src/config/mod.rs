//! Configuration: the TOML file as plain serde structs (`raw`), turned into a
//! validated [`Config`] whose errors name the offending key.
//!
//! `raw::RawConfig` mirrors the file one to one (`deny_unknown_fields`
//! everywhere, so a misspelt key is reported with its line by the toml
//! crate). `TryFrom<RawConfig> for Config` does the semantic checks.

mod raw;
mod secret;
mod validate;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use raw::RawConfig;
pub use secret::{KeyMaterial, Secret};

/// Errors met while loading a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The path that was read.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The TOML did not parse or did not match the schema (the message names
    /// the key, line and column).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The toml crate's message, with line, column and key.
        message: String,
    },
    /// `${VAR}` named an environment variable that is not set.
    #[error("{key}: environment variable {var} is not set")]
    MissingEnv {
        /// The dotted key whose value referenced the variable.
        key: String,
        /// The variable name.
        var: String,
    },
    /// A value is syntactically fine but not acceptable.
    #[error("{key}: {message}")]
    Invalid {
        /// The dotted key path, e.g. `backends[1].id`.
        key: String,
        /// What is wrong with it.
        message: String,
    },
}

impl ConfigError {
    pub(crate) fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// `[runtime]`
    pub runtime: Runtime,
    /// `[listen]`
    pub listen: Listen,
    /// `[tls]`, required when `listen.https` is set.
    pub tls: Option<Tls>,
    /// `[admin]`
    pub admin: Admin,
    /// `[affinity]`
    pub affinity: Affinity,
    /// `[balance]`
    pub balance: Balance,
    /// `[[backends]]`, at least one unless discovery is configured.
    pub backends: Vec<BackendConfig>,
    /// `[discovery]`
    pub discovery: Option<Discovery>,
    /// `[health]`
    pub health: Health,
    /// `[passive]`
    pub passive: Passive,
    /// `[drain]`
    pub drain: Drain,
    /// `[state]`
    pub state: State,
    /// `[limits]`
    pub limits: Limits,
    /// `[shutdown]`
    pub shutdown: Shutdown,
    /// `[queue]`
    pub queue: Queue,
    /// `[[rate_limits]]`, all applied to every request they match.
    pub rate_limits: Vec<RateLimit>,
    /// `[rate_limit]`
    pub rate_limit: RateLimitSettings,
}

/// `[runtime]`
#[derive(Debug, Clone)]
pub struct Runtime {
    /// Tokio worker threads; `None` means one per core.
    pub threads: Option<usize>,
}

/// `[listen]`
#[derive(Debug, Clone)]
pub struct Listen {
    /// Plain HTTP listener.
    pub http: Option<SocketAddr>,
    /// HTTPS listener (needs `[tls]`).
    pub https: Option<SocketAddr>,
    /// Admin listener (default `127.0.0.1:9900`).
    pub admin: SocketAddr,
    /// Peers whose `X-Forwarded-For` is kept and appended to (default
    /// none: every client's copy is replaced by the peer address).
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

/// `[tls]`
#[derive(Debug, Clone)]
pub struct Tls {
    /// Default certificate chain (PEM).
    pub cert: PathBuf,
    /// Default private key (PEM).
    pub key: PathBuf,
    /// Extra certificates chosen by SNI.
    pub sni: Vec<SniCert>,
}

/// `[[tls.sni]]`
#[derive(Debug, Clone)]
pub struct SniCert {
    /// Server name (lower-case DNS name).
    pub name: String,
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
}

/// `[admin]`
#[derive(Debug, Clone)]
pub struct Admin {
    /// Optional bearer token for the admin API.
    pub token: Option<Secret>,
    /// Moves kept for `/api/moves` and the dashboard (default 100).
    pub recent_moves: usize,
}

/// `affinity.same_site`
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SameSite {
    /// `SameSite=Strict`
    Strict,
    /// `SameSite=Lax` (default)
    Lax,
    /// `SameSite=None` (requires `Secure`)
    None,
}

/// `affinity.secure`
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecureMode {
    /// Set `Secure` when the request came over TLS (default).
    Auto,
    /// Always set `Secure`.
    Always,
    /// Never set `Secure`.
    Never,
}

/// Where a request's affinity key comes from (`affinity.key` entries).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// `"cookie"`: the sealed affinity cookie.
    Cookie,
    /// `"header:NAME"`: a request header (name lower-cased).
    Header(http::HeaderName),
}

/// `balance.key`: what rendezvous hashing hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BalanceKey {
    /// `"header:NAME"`
    Header(http::HeaderName),
    /// `"cookie:NAME"`: a (non-affinity) cookie of the request.
    Cookie(String),
}

/// `affinity.on_worker_loss`
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnWorkerLoss {
    /// Re-pin and restore (default).
    Move,
    /// Answer `503` until the pinned worker returns.
    Fail,
}

/// `[affinity]`
#[derive(Debug, Clone)]
pub struct Affinity {
    /// Cookie name (default `tether`).
    pub cookie: String,
    /// Decoded key material, each ≥ 32 bytes; the first seals, all open.
    pub keys: Vec<KeyMaterial>,
    /// Absolute life of a pin (default 24 h).
    pub ttl: Duration,
    /// Optional idle timeout.
    pub idle_timeout: Option<Duration>,
    /// Minimum interval between cookie re-issues (default 1 h).
    pub refresh: Duration,
    /// `SameSite` attribute.
    pub same_site: SameSite,
    /// `Secure` attribute mode.
    pub secure: SecureMode,
    /// `HttpOnly` attribute (default true).
    pub http_only: bool,
    /// `Path` attribute (default `/`).
    pub path: String,
    /// Optional `Domain` attribute.
    pub domain: Option<String>,
    /// Key sources tried in order (default `["cookie"]`).
    pub key: Vec<KeySource>,
    /// What happens when the pinned worker is lost.
    pub on_worker_loss: OnWorkerLoss,
}

/// `balance.policy`
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Fewest live sessions per weight, power of two choices (default).
    LeastSessions,
    /// Highest-random-weight hashing of `balance.key`.
    Rendezvous,
    /// Weighted round robin.
    RoundRobin,
}

/// `[balance]`
#[derive(Debug, Clone)]
pub struct Balance {
    /// Policy for new sessions.
    pub policy: Policy,
    /// Key for rendezvous hashing; falls back to the session id.
    pub key: Option<BalanceKey>,
    /// Default `max_inflight` of every worker; `None` means unlimited.
    pub max_inflight: Option<u32>,
}

/// One `[[backends]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    /// Stable id, named by cookies.
    pub id: String,
    /// Base URL, `http://host:port` (no path).
    pub url: http::Uri,
    /// Weight (default 1, ≥ 1).
    pub weight: u32,
    /// Requests at the worker at once; `None` means `balance.max_inflight`.
    pub max_inflight: Option<u32>,
}

/// `[discovery]`
#[derive(Debug, Clone)]
pub struct Discovery {
    /// DNS name to resolve.
    pub dns: String,
    /// Port of every discovered worker.
    pub port: u16,
    /// Re-resolve interval (default 10 s).
    pub interval: Duration,
}

/// `[health]`
#[derive(Debug, Clone)]
pub struct Health {
    /// Probe path (default `/health`); shared, as every request's
    /// [`crate::upstream::Settings`] holds it.
    pub path: Arc<str>,
    /// Probe interval (default 2 s).
    pub interval: Duration,
    /// Probe timeout (default 1 s).
    pub timeout: Duration,
    /// Failures that mark a worker down (default 3).
    pub fall: u32,
    /// Successes that mark a worker up (default 2).
    pub rise: u32,
}

/// `[passive]`
#[derive(Debug, Clone)]
pub struct Passive {
    /// Consecutive 502/503/504/timeouts that open the circuit (default 3).
    pub failures: u32,
    /// First ejection time (default 30 s), doubled for repeat offenders.
    pub cooldown: Duration,
}

/// `[drain]`
#[derive(Debug, Clone)]
pub struct Drain {
    /// How long pinned users may stay on a draining worker (default 10 min).
    pub timeout: Duration,
}

/// `state.on_restore_failure`
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnRestoreFailure {
    /// `503` with `Retry-After` (default).
    Unavailable,
    /// Forward without history, with `Tether-Restore: failed`.
    Continue,
}

/// `[state]`
#[derive(Debug, Clone)]
pub struct State {
    /// Store URL: `sqlite://…` (default `sqlite://tether.db`) or `postgres://…`.
    pub store: Secret,
    /// Reserved worker-contract prefix (default `/_tether`), no trailing slash.
    pub path: String,
    /// Optional bearer token sent to workers on contract calls.
    pub token: Option<Secret>,
    /// What a failed restore does.
    pub on_restore_failure: OnRestoreFailure,
    /// Deadline for one session's restore (default 5 s).
    pub restore_timeout: Duration,
    /// How long expired rows are kept (default 7 d).
    pub retention: Duration,
    /// Bound of the background queues (default 10000).
    pub queue: usize,
    /// Largest thread export read from a worker (default 64 MiB).
    pub max_export_bytes: usize,
    /// How long a move waits for a lost worker to hand over acknowledged
    /// turns the store lacks, before restoring without them (marked
    /// `Tether-Restore: partial`); default 30 s.
    pub partial_after: Duration,
    /// Captures held in memory while the store is unreachable, in bytes
    /// (default 32 MiB, read at start); 0 turns the buffer off.
    pub buffer_bytes: usize,
    /// When a response's announced changes are captured.
    pub capture: Capture,
}

/// `state.capture`
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capture {
    /// Right after the response is delivered (default): no added latency;
    /// a worker that dies in the few milliseconds before the pull takes
    /// the turn with it (the next response says so).
    Async,
    /// Before a non-streaming response with `Tether-Checkpoint` is
    /// delivered: its 2xx means the turn is stored (or in the outage
    /// buffer); a turn tether could not pull gets `502` instead.
    Sync,
}

/// `[limits]`
#[derive(Debug, Clone)]
pub struct Limits {
    /// Concurrent client connections (default 10000).
    pub max_connections: usize,
    /// Largest request head (default 65536).
    pub max_header_bytes: usize,
    /// Deadline for a whole request head (default 10 s).
    pub header_timeout: Duration,
    /// Keep-alive idle time of a client connection (default 60 s).
    pub idle_timeout: Duration,
    /// Longest silence on a streaming body or tunnel (default 15 min).
    pub stream_idle: Duration,
    /// Largest request body; `None` means unlimited (streamed).
    pub max_body_bytes: Option<u64>,
    /// Deadline to connect to a worker (default 5 s).
    pub connect_timeout: Duration,
    /// Request-body bytes kept so a retry can resend them (default 65536;
    /// a longer body is not retried once it started to flow).
    pub retry_body_bytes: usize,
    /// Most attempts for one request, the first included (default 3).
    pub max_attempts: u32,
    /// Live sessions and request-key pins held in memory (default
    /// 1000000; read at start).
    pub max_sessions: usize,
    /// Deadline for a worker's response head after the request was sent
    /// (default 60 s); past it the client gets `504`.
    pub response_timeout: Duration,
    /// Longest silence within a request body (default 30 s); past it the
    /// client gets `408` and the connection closes.
    pub body_timeout: Duration,
    /// Bytes per second a request body must average once `body_timeout`
    /// has passed since it began (default 1024; 0: no minimum): a body may
    /// take `body_timeout + bytes / min_body_rate` in all.
    pub min_body_rate: u64,
    /// Longest a client may accept no bytes of a response while tether
    /// has some to write (default 60 s); then the connection closes.
    pub send_timeout: Duration,
    /// Longest request line, method and target included (default 8192);
    /// a longer one gets `414`.
    pub max_request_line_bytes: usize,
    /// Whether request headers whose name holds `_` are forwarded
    /// (default false: dropped, since CGI/WSGI workers read `_` as `-`).
    pub allow_underscore_headers: bool,
    /// HTTP/2 streams a client may have open on one connection (default
    /// 100, advertised in SETTINGS).
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2 receive window per stream in bytes (default 65536): what a
    /// client may send on a stream before tether reads it.
    pub h2_initial_stream_window: u32,
    /// HTTP/2 receive window per connection in bytes (default 1048576).
    pub h2_initial_connection_window: u32,
}

/// `[shutdown]`
#[derive(Debug, Clone)]
pub struct Shutdown {
    /// How long in-flight requests may run after SIGTERM (default 30 s).
    pub grace: Duration,
    /// How long a new binary started by `SIGUSR2` may take to report ready
    /// before the running process gives up on it (default 60 s).
    pub upgrade_timeout: Duration,
}

/// `[queue]`: requests for a worker at its `max_inflight` wait here.
#[derive(Debug, Clone)]
pub struct Queue {
    /// Longest wait for a slot (default 30 s); then `503` + `Retry-After`.
    pub timeout: Duration,
    /// Requests waiting per worker (default 1000); more get `503` at once.
    pub max_waiting: usize,
    /// Whether SSE responses and WebSocket tunnels hold their slot while
    /// they run (default true).
    pub stream_slots: bool,
}

/// What a rate-limit rule counts by (`rate_limits[].key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateKey {
    /// `"ip"`: the client address (from `X-Forwarded-For` behind a
    /// trusted proxy).
    Ip,
    /// `"session"`: the affinity session of a request that carries one.
    Session,
    /// `"header:NAME"`: a request header's value (requests without it are
    /// not counted by the rule).
    Header(http::HeaderName),
}

/// One `[[rate_limits]]` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimit {
    /// Metric label: `name`, or the rule's index.
    pub name: String,
    /// What is counted.
    pub key: RateKey,
    /// Requests per `per`.
    pub count: u32,
    /// The rate's period (1 s, 1 min or 1 h).
    pub per: Duration,
    /// Requests allowed at once (default `count`).
    pub burst: u32,
    /// Only requests whose path starts with this.
    pub path_prefix: Option<String>,
}

/// `[rate_limit]`
#[derive(Debug, Clone)]
pub struct RateLimitSettings {
    /// Keys tracked per rule (default 50000); past it, full buckets go,
    /// then the least recently used.
    pub max_keys: usize,
}

impl Config {
    /// Reads, interpolates and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml_str(&text, path)
    }

    /// Parses and validates TOML text; `origin` names the file in errors.
    pub fn from_toml_str(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_path_buf(),
            message: e.to_string(),
        })?;
        Config::try_from(raw)
    }
}
