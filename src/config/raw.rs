//! The file as written: plain serde structs that mirror `config/tether.toml`
//! one to one.
//!
//! Every struct is `deny_unknown_fields`, so the toml crate reports a misspelt
//! key with its path, line and column. Every optional key gets the default
//! from DESIGN.md's table through its section's `Default` impl, so this file
//! is also the one place that lists the defaults. Values stay strings wherever
//! `${VAR}` may appear (addresses, durations, enum names) and integers stay
//! `i64`, so that `validate` can interpolate, range-check and name the key.

use serde::Deserialize;

/// The whole file. Every section may be left out; `validate` then demands
/// what has no default (a listener, `affinity.keys`, a worker).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    /// `[runtime]`
    pub runtime: RawRuntime,
    /// `[listen]`
    pub listen: RawListen,
    /// `[tls]`, needed by `listen.https`.
    pub tls: Option<RawTls>,
    /// `[admin]`
    pub admin: RawAdmin,
    /// `[affinity]`
    pub affinity: RawAffinity,
    /// `[balance]`
    pub balance: RawBalance,
    /// `[[backends]]`
    pub backends: Vec<RawBackend>,
    /// `[discovery]`
    pub discovery: Option<RawDiscovery>,
    /// `[health]`
    pub health: RawHealth,
    /// `[passive]`
    pub passive: RawPassive,
    /// `[drain]`
    pub drain: RawDrain,
    /// `[state]`
    pub state: RawState,
    /// `[limits]`
    pub limits: RawLimits,
    /// `[shutdown]`
    pub shutdown: RawShutdown,
    /// `[queue]`: waiting for a worker at `max_inflight`.
    pub queue: RawQueue,
    /// `[[rate_limits]]`
    pub rate_limits: Vec<RawRateLimit>,
    /// `[rate_limit]`: settings shared by the rules.
    pub rate_limit: RawRateLimitSettings,
}

/// `[runtime]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRuntime {
    /// `threads`: tokio worker threads; none means one per core.
    pub threads: Option<i64>,
}

/// `[listen]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawListen {
    /// `http`: plain HTTP listener address.
    pub http: Option<String>,
    /// `https`: TLS listener address.
    pub https: Option<String>,
    /// `admin`: admin API address.
    pub admin: String,
    /// `trusted_proxies`: CIDRs whose `X-Forwarded-For` is kept.
    pub trusted_proxies: Vec<String>,
}

impl Default for RawListen {
    fn default() -> Self {
        RawListen {
            http: None,
            https: None,
            admin: "127.0.0.1:9900".into(),
            trusted_proxies: Vec::new(),
        }
    }
}

/// `[tls]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// `cert`: default certificate chain (PEM path), required.
    pub cert: Option<String>,
    /// `key`: its private key (PEM path), required.
    pub key: Option<String>,
    /// `[[tls.sni]]`
    #[serde(default)]
    pub sni: Vec<RawSni>,
}

/// `[[tls.sni]]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSni {
    /// `name`: the server name that selects this certificate.
    pub name: Option<String>,
    /// `cert`: certificate chain (PEM path).
    pub cert: Option<String>,
    /// `key`: private key (PEM path).
    pub key: Option<String>,
}

/// `[admin]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAdmin {
    /// `token`: bearer token for the admin API.
    pub token: Option<String>,
    /// `recent_moves`: moves kept for `/api/moves` and the dashboard.
    pub recent_moves: Option<i64>,
}

/// A string, or a TOML boolean where the key also accepts one (`secure`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(
    untagged,
    expecting = "expected \"auto\", \"true\", \"false\" or a boolean"
)]
pub enum StrOrBool {
    /// `"auto"`, `"true"`, `"false"`, or `${VAR}`.
    Str(String),
    /// `true` or `false`.
    Bool(bool),
}

/// `[affinity]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAffinity {
    /// `cookie`: cookie name.
    pub cookie: String,
    /// `keys`: base64 cookie keys, required; the first seals, all open.
    pub keys: Vec<String>,
    /// `ttl`: absolute life of a pin.
    pub ttl: String,
    /// `idle_timeout`: ends a pin unused this long.
    pub idle_timeout: Option<String>,
    /// `refresh`: minimum interval between cookie re-issues.
    pub refresh: String,
    /// `same_site`: `strict`, `lax` or `none`.
    pub same_site: String,
    /// `secure`: `auto`, `true` or `false`.
    pub secure: StrOrBool,
    /// `http_only`
    pub http_only: bool,
    /// `path`
    pub path: String,
    /// `domain`
    pub domain: Option<String>,
    /// `key`: request-key sources, `"cookie"` or `"header:NAME"`.
    pub key: Vec<String>,
    /// `on_worker_loss`: `move` or `fail`.
    pub on_worker_loss: String,
}

impl Default for RawAffinity {
    fn default() -> Self {
        RawAffinity {
            cookie: "tether".into(),
            keys: Vec::new(),
            ttl: "24h".into(),
            idle_timeout: None,
            refresh: "1h".into(),
            same_site: "lax".into(),
            secure: StrOrBool::Str("auto".into()),
            http_only: true,
            path: "/".into(),
            domain: None,
            key: vec!["cookie".into()],
            on_worker_loss: "move".into(),
        }
    }
}

/// `[balance]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawBalance {
    /// `policy`: `least-sessions`, `rendezvous` or `round-robin`.
    pub policy: String,
    /// `key`: `"header:NAME"` or `"cookie:NAME"`, hashed by rendezvous.
    pub key: Option<String>,
    /// `max_inflight`: default per-worker concurrency; none means unlimited.
    pub max_inflight: Option<i64>,
}

impl Default for RawBalance {
    fn default() -> Self {
        RawBalance {
            policy: "least-sessions".into(),
            key: None,
            max_inflight: None,
        }
    }
}

/// One `[[backends]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawBackend {
    /// `id`: stable id, required.
    pub id: Option<String>,
    /// `url`: `http://host:port`, required.
    pub url: Option<String>,
    /// `weight`
    pub weight: i64,
    /// `max_inflight`: requests at the worker at once; none means
    /// `balance.max_inflight`.
    pub max_inflight: Option<i64>,
}

impl Default for RawBackend {
    fn default() -> Self {
        RawBackend {
            id: None,
            url: None,
            weight: 1,
            max_inflight: None,
        }
    }
}

/// `[discovery]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawDiscovery {
    /// `dns`: name to resolve, required.
    pub dns: Option<String>,
    /// `port`: port of every discovered worker, required.
    pub port: Option<i64>,
    /// `interval`: re-resolve interval.
    pub interval: String,
}

impl Default for RawDiscovery {
    fn default() -> Self {
        RawDiscovery {
            dns: None,
            port: None,
            interval: "10s".into(),
        }
    }
}

/// `[health]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawHealth {
    /// `path`: probe path.
    pub path: String,
    /// `interval`
    pub interval: String,
    /// `timeout`
    pub timeout: String,
    /// `fall`: failures that mark a worker down.
    pub fall: i64,
    /// `rise`: successes that mark a worker up.
    pub rise: i64,
}

impl Default for RawHealth {
    fn default() -> Self {
        RawHealth {
            path: "/health".into(),
            interval: "2s".into(),
            timeout: "1s".into(),
            fall: 3,
            rise: 2,
        }
    }
}

/// `[passive]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawPassive {
    /// `failures`: consecutive failures that open the circuit.
    pub failures: i64,
    /// `cooldown`: first ejection time.
    pub cooldown: String,
}

impl Default for RawPassive {
    fn default() -> Self {
        RawPassive {
            failures: 3,
            cooldown: "30s".into(),
        }
    }
}

/// `[drain]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawDrain {
    /// `timeout`: how long pinned users stay on a draining worker.
    pub timeout: String,
}

impl Default for RawDrain {
    fn default() -> Self {
        RawDrain {
            timeout: "10m".into(),
        }
    }
}

/// `[state]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawState {
    /// `store`: `sqlite://…` or `postgres://…`.
    pub store: String,
    /// `path`: the worker-contract prefix.
    pub path: String,
    /// `token`: bearer token sent on contract calls.
    pub token: Option<String>,
    /// `on_restore_failure`: `unavailable` or `continue`.
    pub on_restore_failure: String,
    /// `restore_timeout`
    pub restore_timeout: String,
    /// `retention`: how long expired rows are kept.
    pub retention: String,
    /// `queue`: bound of the background queues.
    pub queue: i64,
    /// `max_export_bytes`: largest thread export read from a worker.
    pub max_export_bytes: i64,
    /// `partial_after`: how long a move waits for acknowledged turns the
    /// store lacks before it restores without them.
    pub partial_after: String,
    /// `buffer_bytes`: captures held in memory while the store is down.
    pub buffer_bytes: i64,
    /// `capture`: `async` (after the response) or `sync` (before it).
    pub capture: String,
}

impl Default for RawState {
    fn default() -> Self {
        RawState {
            store: "sqlite://tether.db".into(),
            path: "/_tether".into(),
            token: None,
            on_restore_failure: "unavailable".into(),
            restore_timeout: "5s".into(),
            retention: "7d".into(),
            queue: 10_000,
            max_export_bytes: 64 << 20,
            partial_after: "30s".into(),
            buffer_bytes: 32 << 20,
            capture: "async".into(),
        }
    }
}

/// `[limits]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    /// `max_connections`
    pub max_connections: i64,
    /// `max_header_bytes`
    pub max_header_bytes: i64,
    /// `header_timeout`: deadline for a whole request head.
    pub header_timeout: String,
    /// `idle_timeout`: keep-alive idle time.
    pub idle_timeout: String,
    /// `stream_idle`: longest silence on a stream.
    pub stream_idle: String,
    /// `max_body_bytes`: none means unlimited.
    pub max_body_bytes: Option<i64>,
    /// `connect_timeout`: deadline for connecting to a worker.
    pub connect_timeout: String,
    /// `retry_body_bytes`: request-body bytes kept for a retry.
    pub retry_body_bytes: i64,
    /// `max_attempts`: attempts per request, the first included.
    pub max_attempts: i64,
    /// `max_sessions`: sessions and pins held in memory.
    pub max_sessions: i64,
    /// `response_timeout`: deadline for a worker's response head.
    pub response_timeout: String,
    /// `body_timeout`: longest silence within a request body.
    pub body_timeout: String,
    /// `min_body_rate`: bytes per second a request body must keep up.
    pub min_body_rate: i64,
    /// `send_timeout`: longest a client may accept no bytes.
    pub send_timeout: String,
    /// `max_request_line_bytes`: longest request line.
    pub max_request_line_bytes: i64,
    /// `allow_underscore_headers`: forward header names with `_`.
    pub allow_underscore_headers: bool,
    /// `h2_max_concurrent_streams`: HTTP/2 streams a client may open at once.
    pub h2_max_concurrent_streams: i64,
    /// `h2_initial_stream_window`: HTTP/2 receive window per stream, bytes.
    pub h2_initial_stream_window: i64,
    /// `h2_initial_connection_window`: HTTP/2 receive window per connection.
    pub h2_initial_connection_window: i64,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_connections: 10_000,
            max_header_bytes: 65_536,
            header_timeout: "10s".into(),
            idle_timeout: "60s".into(),
            stream_idle: "15m".into(),
            max_body_bytes: None,
            connect_timeout: "5s".into(),
            retry_body_bytes: 65_536,
            max_attempts: 3,
            max_sessions: 1_000_000,
            response_timeout: "60s".into(),
            body_timeout: "30s".into(),
            min_body_rate: 1024,
            send_timeout: "60s".into(),
            max_request_line_bytes: 8192,
            allow_underscore_headers: false,
            h2_max_concurrent_streams: 100,
            h2_initial_stream_window: 64 << 10,
            h2_initial_connection_window: 1 << 20,
        }
    }
}

/// `[shutdown]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawShutdown {
    /// `grace`: how long in-flight requests may run after SIGTERM.
    pub grace: String,
    /// `upgrade_timeout`: how long a new binary may take to report ready.
    pub upgrade_timeout: String,
}

impl Default for RawShutdown {
    fn default() -> Self {
        RawShutdown {
            grace: "30s".into(),
            upgrade_timeout: "60s".into(),
        }
    }
}

/// `[queue]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawQueue {
    /// `timeout`: longest wait for a slot at a full worker.
    pub timeout: String,
    /// `max_waiting`: requests waiting per worker.
    pub max_waiting: i64,
    /// `stream_slots`: whether SSE and WebSocket hold their slot while
    /// they run.
    pub stream_slots: bool,
}

impl Default for RawQueue {
    fn default() -> Self {
        RawQueue {
            timeout: "30s".into(),
            max_waiting: 1000,
            stream_slots: true,
        }
    }
}

/// One `[[rate_limits]]` rule.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRateLimit {
    /// `name`: the metric label; default the rule's index.
    pub name: Option<String>,
    /// `key`: `"ip"`, `"session"` or `"header:NAME"`, required.
    pub key: Option<String>,
    /// `rate`: `"N/s"`, `"N/m"` or `"N/h"`, required.
    pub rate: Option<String>,
    /// `burst`: requests allowed at once; default N.
    pub burst: Option<i64>,
    /// `path_prefix`: the rule applies only under this path.
    pub path_prefix: Option<String>,
}

/// `[rate_limit]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRateLimitSettings {
    /// `max_keys`: keys tracked per rule; full buckets, then the least
    /// recently used, go first.
    pub max_keys: i64,
}

impl Default for RawRateLimitSettings {
    fn default() -> Self {
        RawRateLimitSettings { max_keys: 50_000 }
    }
}
