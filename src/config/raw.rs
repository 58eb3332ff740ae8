//! The file as written: plain serde structs, every one
//! `deny_unknown_fields`, so the toml crate reports a misspelt key with its
//! line and column. Values stay strings where `${VAR}` may appear.

use serde::Deserialize;

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub runtime: RawRuntime,
    #[serde(default)]
    pub listen: RawListen,
    pub tls: Option<RawTls>,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub affinity: RawAffinity,
    #[serde(default)]
    pub balance: RawBalance,
    #[serde(default)]
    pub backends: Vec<RawBackend>,
    pub discovery: Option<RawDiscovery>,
    #[serde(default)]
    pub health: RawHealth,
    #[serde(default)]
    pub passive: RawPassive,
    #[serde(default)]
    pub drain: RawDrain,
    #[serde(default)]
    pub state: RawState,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub shutdown: RawShutdown,
}

/// `[runtime]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRuntime {
    pub threads: Option<i64>,
}

/// `[listen]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListen {
    pub http: Option<String>,
    pub https: Option<String>,
    pub admin: Option<String>,
}

/// `[tls]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert: Option<String>,
    pub key: Option<String>,
    #[serde(default)]
    pub sni: Vec<RawSni>,
}

/// `[[tls.sni]]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSni {
    pub name: Option<String>,
    pub cert: Option<String>,
    pub key: Option<String>,
}

/// `[admin]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub token: Option<String>,
}

/// A string, or a boolean where the key also accepts one (`secure`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StrOrBool {
    /// `"auto"`, `"true"`, …
    Str(String),
    /// `true` / `false`
    Bool(bool),
}

/// `[affinity]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAffinity {
    pub cookie: Option<String>,
    pub keys: Option<Vec<String>>,
    pub ttl: Option<String>,
    pub idle_timeout: Option<String>,
    pub refresh: Option<String>,
    pub same_site: Option<String>,
    pub secure: Option<StrOrBool>,
    pub http_only: Option<bool>,
    pub path: Option<String>,
    pub domain: Option<String>,
    pub key: Option<Vec<String>>,
    pub on_worker_loss: Option<String>,
}

/// `[balance]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBalance {
    pub policy: Option<String>,
    pub key: Option<String>,
}

/// `[[backends]]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackend {
    pub id: Option<String>,
    pub url: Option<String>,
    pub weight: Option<i64>,
}

/// `[discovery]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDiscovery {
    pub dns: Option<String>,
    pub port: Option<i64>,
    pub interval: Option<String>,
}

/// `[health]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    pub path: Option<String>,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub fall: Option<i64>,
    pub rise: Option<i64>,
}

/// `[passive]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPassive {
    pub failures: Option<i64>,
    pub cooldown: Option<String>,
}

/// `[drain]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDrain {
    pub timeout: Option<String>,
}

/// `[state]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawState {
    pub store: Option<String>,
    pub path: Option<String>,
    pub token: Option<String>,
    pub on_restore_failure: Option<String>,
    pub restore_timeout: Option<String>,
    pub retention: Option<String>,
    pub queue: Option<i64>,
}

/// `[limits]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub max_connections: Option<i64>,
    pub max_header_bytes: Option<i64>,
    pub header_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub stream_idle: Option<String>,
    pub max_body_bytes: Option<i64>,
    pub connect_timeout: Option<String>,
}

/// `[shutdown]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawShutdown {
    pub grace: Option<String>,
}
