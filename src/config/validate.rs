//! `RawConfig` → `Config`: interpolation, defaults and the semantic checks.
//! Every error names its key (`backends[1].id`).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;

use super::raw::{RawConfig, StrOrBool};
use super::*;

type R<T> = Result<T, ConfigError>;

/// Replaces every `${VAR}` with the variable's value.
pub(crate) fn interpolate(key: &str, value: &str) -> R<String> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err(ConfigError::invalid(key, "unterminated ${ in value"));
        };
        let var = &after[..end];
        if var.is_empty() {
            return Err(ConfigError::invalid(key, "empty ${} in value"));
        }
        match std::env::var(var) {
            Ok(v) => out.push_str(&v),
            Err(_) => {
                return Err(ConfigError::MissingEnv {
                    key: key.to_owned(),
                    var: var.to_owned(),
                })
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn opt(key: &str, v: Option<&String>) -> R<Option<String>> {
    v.map(|v| interpolate(key, v)).transpose()
}

fn duration(key: &str, v: Option<&String>, default: &str) -> R<Duration> {
    let text = match v {
        Some(v) => interpolate(key, v)?,
        None => default.to_owned(),
    };
    humantime::parse_duration(text.trim()).map_err(|e| {
        ConfigError::invalid(
            key,
            format!("{text:?} is not a duration ({e}); write e.g. \"500ms\", \"2s\", \"24h\""),
        )
    })
}

fn positive(key: &str, d: Duration) -> R<Duration> {
    if d.is_zero() {
        return Err(ConfigError::invalid(key, "must be greater than zero"));
    }
    Ok(d)
}

fn addr(key: &str, v: Option<&String>) -> R<Option<SocketAddr>> {
    match opt(key, v)? {
        None => Ok(None),
        Some(s) => s.trim().parse().map(Some).map_err(|_| {
            ConfigError::invalid(
                key,
                format!("{s:?} is not an address like \"127.0.0.1:8080\""),
            )
        }),
    }
}

fn int(key: &str, v: Option<i64>, default: i64, min: i64, max: i64) -> R<i64> {
    let n = v.unwrap_or(default);
    if n < min || n > max {
        return Err(ConfigError::invalid(
            key,
            format!("{n} is out of range {min}..={max}"),
        ));
    }
    Ok(n)
}

fn choice<T: Copy>(key: &str, v: Option<&String>, default: T, options: &[(&str, T)]) -> R<T> {
    let Some(v) = opt(key, v)? else {
        return Ok(default);
    };
    options
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(v.trim()))
        .map(|(_, t)| *t)
        .ok_or_else(|| {
            let names: Vec<String> = options.iter().map(|(n, _)| format!("\"{n}\"")).collect();
            ConfigError::invalid(key, format!("{v:?} is not one of {}", names.join(", ")))
        })
}

fn readable(key: &str, path: &str) -> R<PathBuf> {
    let p = PathBuf::from(path);
    std::fs::File::open(&p)
        .map_err(|e| ConfigError::invalid(key, format!("cannot read {}: {e}", p.display())))?;
    Ok(p)
}

fn header_name(key: &str, name: &str) -> R<http::HeaderName> {
    http::HeaderName::from_bytes(name.trim().to_ascii_lowercase().as_bytes())
        .map_err(|_| ConfigError::invalid(key, format!("{name:?} is not a valid header name")))
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
}

fn decode_key(key: &str, text: &str) -> R<KeyMaterial> {
    let t = text.trim();
    let bytes = [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD]
        .iter()
        .find_map(|e| e.decode(t).ok())
        .ok_or_else(|| ConfigError::invalid(key, "not valid base64"))?;
    if bytes.len() < 32 {
        return Err(ConfigError::invalid(
            key,
            format!("decodes to {} bytes; at least 32 are needed (e.g. `head -c 32 /dev/urandom | base64`)", bytes.len()),
        ));
    }
    Ok(KeyMaterial::new(bytes))
}

impl TryFrom<RawConfig> for Config {
    type Error = ConfigError;

    fn try_from(raw: RawConfig) -> R<Config> {
        let runtime = Runtime {
            threads: match raw.runtime.threads {
                Some(n) => Some(int("runtime.threads", Some(n), 1, 1, 1024)? as usize),
                None => None,
            },
        };
        let listen = Listen {
            http: addr("listen.http", raw.listen.http.as_ref())?,
            https: addr("listen.https", raw.listen.https.as_ref())?,
            admin: addr("listen.admin", raw.listen.admin.as_ref())?
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9900))),
        };
        if listen.http.is_none() && listen.https.is_none() {
            return Err(ConfigError::invalid(
                "listen",
                "set at least one of http, https",
            ));
        }
        let tls = match &raw.tls {
            None => None,
            Some(t) => {
                let cert = opt("tls.cert", t.cert.as_ref())?
                    .ok_or_else(|| ConfigError::invalid("tls.cert", "required in [tls]"))?;
                let key = opt("tls.key", t.key.as_ref())?
                    .ok_or_else(|| ConfigError::invalid("tls.key", "required in [tls]"))?;
                let mut sni = Vec::new();
                for (i, s) in t.sni.iter().enumerate() {
                    let k = |f: &str| format!("tls.sni[{i}].{f}");
                    let name = opt(&k("name"), s.name.as_ref())?
                        .filter(|n| !n.trim().is_empty())
                        .ok_or_else(|| ConfigError::invalid(k("name"), "required"))?;
                    let c = opt(&k("cert"), s.cert.as_ref())?
                        .ok_or_else(|| ConfigError::invalid(k("cert"), "required"))?;
                    let kk = opt(&k("key"), s.key.as_ref())?
                        .ok_or_else(|| ConfigError::invalid(k("key"), "required"))?;
                    sni.push(SniCert {
                        name: name.trim().to_ascii_lowercase(),
                        cert: readable(&k("cert"), &c)?,
                        key: readable(&k("key"), &kk)?,
                    });
                }
                Some(Tls {
                    cert: readable("tls.cert", &cert)?,
                    key: readable("tls.key", &key)?,
                    sni,
                })
            }
        };
        if listen.https.is_some() && tls.is_none() {
            return Err(ConfigError::invalid(
                "tls",
                "listen.https is set but there is no [tls] section with cert and key",
            ));
        }
        let admin = Admin {
            token: opt("admin.token", raw.admin.token.as_ref())?
                .filter(|t| !t.is_empty())
                .map(Secret::new),
        };
        let affinity = affinity(&raw)?;
        let balance = Balance {
            policy: choice(
                "balance.policy",
                raw.balance.policy.as_ref(),
                Policy::LeastSessions,
                &[
                    ("least-sessions", Policy::LeastSessions),
                    ("rendezvous", Policy::Rendezvous),
                    ("round-robin", Policy::RoundRobin),
                ],
            )?,
            key: match opt("balance.key", raw.balance.key.as_ref())? {
                None => None,
                Some(k) => Some(if let Some(h) = k.strip_prefix("header:") {
                    BalanceKey::Header(header_name("balance.key", h)?)
                } else if let Some(c) = k.strip_prefix("cookie:").filter(|c| is_token(c)) {
                    BalanceKey::Cookie(c.to_owned())
                } else {
                    return Err(ConfigError::invalid(
                        "balance.key",
                        format!("{k:?}: write \"header:NAME\" or \"cookie:NAME\""),
                    ));
                }),
            },
        };
        let discovery = match &raw.discovery {
            None => None,
            Some(d) => {
                let dns = opt("discovery.dns", d.dns.as_ref())?
                    .filter(|s| !s.trim().is_empty())
                    .ok_or_else(|| {
                        ConfigError::invalid("discovery.dns", "required in [discovery]")
                    })?;
                let port = d.port.ok_or_else(|| {
                    ConfigError::invalid("discovery.port", "required in [discovery]")
                })?;
                Some(Discovery {
                    dns,
                    port: int("discovery.port", Some(port), 1, 1, 65535)? as u16,
                    interval: positive(
                        "discovery.interval",
                        duration("discovery.interval", d.interval.as_ref(), "10s")?,
                    )?,
                })
            }
        };
        let backends = backends(&raw)?;
        if backends.is_empty() && discovery.is_none() {
            return Err(ConfigError::invalid(
                "backends",
                "no [[backends]] and no [discovery]: tether needs at least one worker",
            ));
        }
        let h = &raw.health;
        let health = Health {
            path: match opt("health.path", h.path.as_ref())? {
                Some(p) if p.starts_with('/') => p,
                Some(p) => {
                    return Err(ConfigError::invalid(
                        "health.path",
                        format!("{p:?} must start with /"),
                    ))
                }
                None => "/health".to_owned(),
            },
            interval: positive(
                "health.interval",
                duration("health.interval", h.interval.as_ref(), "2s")?,
            )?,
            timeout: positive(
                "health.timeout",
                duration("health.timeout", h.timeout.as_ref(), "1s")?,
            )?,
            fall: int("health.fall", h.fall, 3, 1, 1000)? as u32,
            rise: int("health.rise", h.rise, 2, 1, 1000)? as u32,
        };
        let passive = Passive {
            failures: int("passive.failures", raw.passive.failures, 3, 1, 1000)? as u32,
            cooldown: positive(
                "passive.cooldown",
                duration("passive.cooldown", raw.passive.cooldown.as_ref(), "30s")?,
            )?,
        };
        let drain = Drain {
            timeout: duration("drain.timeout", raw.drain.timeout.as_ref(), "10m")?,
        };
        let state = state(&raw)?;
        let l = &raw.limits;
        let limits = Limits {
            max_connections: int(
                "limits.max_connections",
                l.max_connections,
                10_000,
                1,
                10_000_000,
            )? as usize,
            max_header_bytes: int(
                "limits.max_header_bytes",
                l.max_header_bytes,
                65_536,
                8192,
                1_048_576,
            )? as usize,
            header_timeout: positive(
                "limits.header_timeout",
                duration("limits.header_timeout", l.header_timeout.as_ref(), "10s")?,
            )?,
            idle_timeout: positive(
                "limits.idle_timeout",
                duration("limits.idle_timeout", l.idle_timeout.as_ref(), "60s")?,
            )?,
            stream_idle: positive(
                "limits.stream_idle",
                duration("limits.stream_idle", l.stream_idle.as_ref(), "15m")?,
            )?,
            max_body_bytes: match l.max_body_bytes {
                None => None,
                Some(n) => Some(int("limits.max_body_bytes", Some(n), 0, 1, i64::MAX)? as u64),
            },
            connect_timeout: positive(
                "limits.connect_timeout",
                duration("limits.connect_timeout", l.connect_timeout.as_ref(), "5s")?,
            )?,
        };
        let shutdown = Shutdown {
            grace: duration("shutdown.grace", raw.shutdown.grace.as_ref(), "30s")?,
        };
        Ok(Config {
            runtime,
            listen,
            tls,
            admin,
            affinity,
            balance,
            backends,
            discovery,
            health,
            passive,
            drain,
            state,
            limits,
            shutdown,
        })
    }
}

fn affinity(raw: &RawConfig) -> R<Affinity> {
    let a = &raw.affinity;
    let cookie = opt("affinity.cookie", a.cookie.as_ref())?.unwrap_or_else(|| "tether".to_owned());
    if !is_token(&cookie) {
        return Err(ConfigError::invalid(
            "affinity.cookie",
            format!("{cookie:?} is not a valid cookie name"),
        ));
    }
    let Some(key_texts) = a.keys.as_ref().filter(|k| !k.is_empty()) else {
        return Err(ConfigError::invalid(
            "affinity.keys",
            "required: at least one base64 key of 32 bytes or more",
        ));
    };
    let mut keys = Vec::with_capacity(key_texts.len());
    for (i, k) in key_texts.iter().enumerate() {
        let name = format!("affinity.keys[{i}]");
        keys.push(decode_key(&name, &interpolate(&name, k)?)?);
    }
    let same_site = choice(
        "affinity.same_site",
        a.same_site.as_ref(),
        SameSite::Lax,
        &[
            ("strict", SameSite::Strict),
            ("lax", SameSite::Lax),
            ("none", SameSite::None),
        ],
    )?;
    let secure = match &a.secure {
        None => SecureMode::Auto,
        Some(StrOrBool::Bool(true)) => SecureMode::Always,
        Some(StrOrBool::Bool(false)) => SecureMode::Never,
        Some(StrOrBool::Str(s)) => choice(
            "affinity.secure",
            Some(s),
            SecureMode::Auto,
            &[
                ("auto", SecureMode::Auto),
                ("true", SecureMode::Always),
                ("false", SecureMode::Never),
            ],
        )?,
    };
    if same_site == SameSite::None && secure != SecureMode::Always {
        return Err(ConfigError::invalid(
            "affinity.same_site",
            "\"none\" needs affinity.secure = \"true\": browsers reject SameSite=None cookies without Secure",
        ));
    }
    let path = opt("affinity.path", a.path.as_ref())?.unwrap_or_else(|| "/".to_owned());
    if !path.starts_with('/') || path.contains(';') {
        return Err(ConfigError::invalid(
            "affinity.path",
            format!("{path:?} must start with / and contain no ;"),
        ));
    }
    let domain = opt("affinity.domain", a.domain.as_ref())?.filter(|d| !d.is_empty());
    if let Some(d) = &domain {
        if d.contains(';') || d.contains(char::is_whitespace) {
            return Err(ConfigError::invalid(
                "affinity.domain",
                format!("{d:?} is not a domain"),
            ));
        }
    }
    let mut key = Vec::new();
    for (i, k) in a
        .key
        .clone()
        .unwrap_or_else(|| vec!["cookie".to_owned()])
        .iter()
        .enumerate()
    {
        let name = format!("affinity.key[{i}]");
        let k = interpolate(&name, k)?;
        key.push(if k == "cookie" {
            KeySource::Cookie
        } else if let Some(h) = k.strip_prefix("header:") {
            KeySource::Header(header_name(&name, h)?)
        } else {
            return Err(ConfigError::invalid(
                name,
                format!("{k:?}: write \"cookie\" or \"header:NAME\""),
            ));
        });
    }
    if key.is_empty() {
        return Err(ConfigError::invalid(
            "affinity.key",
            "needs at least one source",
        ));
    }
    Ok(Affinity {
        cookie,
        keys,
        ttl: positive(
            "affinity.ttl",
            duration("affinity.ttl", a.ttl.as_ref(), "24h")?,
        )?,
        idle_timeout: match &a.idle_timeout {
            None => None,
            Some(v) => Some(positive(
                "affinity.idle_timeout",
                duration("affinity.idle_timeout", Some(v), "0s")?,
            )?),
        },
        refresh: positive(
            "affinity.refresh",
            duration("affinity.refresh", a.refresh.as_ref(), "1h")?,
        )?,
        same_site,
        secure,
        http_only: a.http_only.unwrap_or(true),
        path,
        domain,
        key,
        on_worker_loss: choice(
            "affinity.on_worker_loss",
            a.on_worker_loss.as_ref(),
            OnWorkerLoss::Move,
            &[("move", OnWorkerLoss::Move), ("fail", OnWorkerLoss::Fail)],
        )?,
    })
}

fn backends(raw: &RawConfig) -> R<Vec<BackendConfig>> {
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(raw.backends.len());
    for (i, b) in raw.backends.iter().enumerate() {
        let k = |f: &str| format!("backends[{i}].{f}");
        let id = opt(&k("id"), b.id.as_ref())?
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| ConfigError::invalid(k("id"), "required and non-empty"))?;
        if id.len() > 200 || id.contains(char::is_whitespace) {
            return Err(ConfigError::invalid(
                k("id"),
                format!("{id:?}: at most 200 characters, no spaces"),
            ));
        }
        if !seen.insert(id.clone()) {
            return Err(ConfigError::invalid(
                k("id"),
                format!("duplicate id {id:?}"),
            ));
        }
        let url_text = opt(&k("url"), b.url.as_ref())?
            .ok_or_else(|| ConfigError::invalid(k("url"), "required"))?;
        let url: http::Uri = url_text.trim().parse().map_err(|_| {
            ConfigError::invalid(
                k("url"),
                format!("{url_text:?} is not a URL like \"http://127.0.0.1:9001\""),
            )
        })?;
        match url.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(ConfigError::invalid(
                    k("url"),
                    "https to workers is not supported yet: use http:// on a private network",
                ))
            }
            _ => {
                return Err(ConfigError::invalid(
                    k("url"),
                    format!("{url_text:?} must start with http://"),
                ))
            }
        }
        let Some(authority) = url.authority() else {
            return Err(ConfigError::invalid(
                k("url"),
                format!("{url_text:?} has no host"),
            ));
        };
        if authority.port_u16().is_none() && authority.host().is_empty() {
            return Err(ConfigError::invalid(
                k("url"),
                format!("{url_text:?} has no host"),
            ));
        }
        if url.path() != "/" && !url.path().is_empty() || url.query().is_some() {
            return Err(ConfigError::invalid(
                k("url"),
                format!("{url_text:?}: a worker URL has no path or query"),
            ));
        }
        out.push(BackendConfig {
            id,
            url,
            weight: int(&k("weight"), b.weight, 1, 1, 10_000)? as u32,
        });
    }
    Ok(out)
}

fn state(raw: &RawConfig) -> R<State> {
    let s = &raw.state;
    let store =
        opt("state.store", s.store.as_ref())?.unwrap_or_else(|| "sqlite://tether.db".to_owned());
    if !(store.starts_with("sqlite:")
        || store.starts_with("postgres://")
        || store.starts_with("postgresql://"))
    {
        return Err(ConfigError::invalid(
            "state.store",
            "must start with sqlite:// or postgres://",
        ));
    }
    let path = opt("state.path", s.path.as_ref())?.unwrap_or_else(|| "/_tether".to_owned());
    let path = path.trim_end_matches('/').to_owned();
    if !path.starts_with('/') || path.len() < 2 || path.contains(['?', '#', ' ']) {
        return Err(ConfigError::invalid(
            "state.path",
            format!("{path:?} must be a path like \"/_tether\""),
        ));
    }
    Ok(State {
        store: Secret::new(store),
        path,
        token: opt("state.token", s.token.as_ref())?
            .filter(|t| !t.is_empty())
            .map(Secret::new),
        on_restore_failure: choice(
            "state.on_restore_failure",
            s.on_restore_failure.as_ref(),
            OnRestoreFailure::Unavailable,
            &[
                ("unavailable", OnRestoreFailure::Unavailable),
                ("continue", OnRestoreFailure::Continue),
            ],
        )?,
        restore_timeout: positive(
            "state.restore_timeout",
            duration("state.restore_timeout", s.restore_timeout.as_ref(), "5s")?,
        )?,
        retention: duration("state.retention", s.retention.as_ref(), "7d")?,
        queue: int("state.queue", s.queue, 10_000, 1, 10_000_000)? as usize,
    })
}
