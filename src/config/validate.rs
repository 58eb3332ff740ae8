//! `RawConfig` → `Config`: `${VAR}` interpolation and the checks (defaults are in
//! `raw`). Every error names its dotted key: `backends[1].id: duplicate id "a"`.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::raw::*;
use super::secret::interpolate;
use super::*;

type R<T> = Result<T, ConfigError>;

const STORE_SCHEMES: &[&str] = &["sqlite:", "postgres://", "postgresql://"];
const SAME_SITE: &[(&str, SameSite)] = &[
    ("strict", SameSite::Strict),
    ("lax", SameSite::Lax),
    ("none", SameSite::None),
];
const SECURE: &[(&str, SecureMode)] = &[
    ("auto", SecureMode::Auto),
    ("true", SecureMode::Always),
    ("false", SecureMode::Never),
];
const ON_WORKER_LOSS: &[(&str, OnWorkerLoss)] =
    &[("move", OnWorkerLoss::Move), ("fail", OnWorkerLoss::Fail)];
const POLICY: &[(&str, Policy)] = &[
    ("least-sessions", Policy::LeastSessions),
    ("rendezvous", Policy::Rendezvous),
    ("round-robin", Policy::RoundRobin),
];
const CAPTURE: &[(&str, Capture)] = &[("async", Capture::Async), ("sync", Capture::Sync)];
const ON_RESTORE_FAILURE: &[(&str, OnRestoreFailure)] = &[
    ("unavailable", OnRestoreFailure::Unavailable),
    ("continue", OnRestoreFailure::Continue),
];

impl TryFrom<RawConfig> for Config {
    type Error = ConfigError;

    fn try_from(raw: RawConfig) -> R<Config> {
        let runtime = Runtime {
            threads: opt(raw.runtime.threads, |n| int("runtime.threads", n, 1, 1024))?,
        };
        let listen = listen(&raw.listen)?;
        let tls = raw.tls.as_ref().map(tls).transpose()?;
        if listen.https.is_some() && tls.is_none() {
            return fail("tls", "listen.https needs [tls] with cert and key");
        }
        let admin = Admin {
            token: secret("admin.token", raw.admin.token.as_deref())?,
            recent_moves: opt(raw.admin.recent_moves, |n| {
                int("admin.recent_moves", n, 1, 10_000)
            })?
            .unwrap_or(100),
        };
        let affinity = affinity(&raw.affinity)?;
        let balance = balance(&raw.balance)?;
        let backends = backends(&raw.backends)?;
        let discovery = raw.discovery.as_ref().map(discovery).transpose()?;
        if backends.is_empty() && discovery.is_none() {
            return fail("backends", "add a [[backends]] entry or [discovery]");
        }
        let p = &raw.passive;
        Ok(Config {
            runtime,
            listen,
            tls,
            admin,
            affinity,
            balance,
            backends,
            discovery,
            health: health(&raw.health)?,
            passive: Passive {
                failures: int("passive.failures", p.failures, 1, 1000)?,
                cooldown: dur_pos("passive.cooldown", &p.cooldown)?,
            },
            drain: Drain {
                timeout: dur("drain.timeout", &raw.drain.timeout)?,
            },
            state: state(&raw.state)?,
            limits: limits(&raw.limits)?,
            shutdown: Shutdown {
                grace: dur("shutdown.grace", &raw.shutdown.grace)?,
                upgrade_timeout: dur_pos(
                    "shutdown.upgrade_timeout",
                    &raw.shutdown.upgrade_timeout,
                )?,
            },
            queue: queue(&raw.queue)?,
            rate_limits: rate_limits(&raw.rate_limits)?,
            rate_limit: RateLimitSettings {
                max_keys: int(
                    "rate_limit.max_keys",
                    raw.rate_limit.max_keys,
                    1,
                    10_000_000,
                )?,
            },
        })
    }
}

// === sections ===

fn listen(l: &RawListen) -> R<Listen> {
    let listen = Listen {
        http: opt(l.http.as_deref(), |v| addr("listen.http", v))?,
        https: opt(l.https.as_deref(), |v| addr("listen.https", v))?,
        admin: addr("listen.admin", &l.admin)?,
        trusted_proxies: l
            .trusted_proxies
            .iter()
            .enumerate()
            .map(|(i, v)| cidr(&format!("listen.trusted_proxies[{i}]"), v))
            .collect::<R<_>>()?,
    };
    if listen.http.is_none() && listen.https.is_none() {
        return fail("listen", "set at least one of http, https");
    }
    Ok(listen)
}

fn tls(t: &RawTls) -> R<Tls> {
    let cert = readable("tls.cert", t.cert.as_deref())?;
    let key = readable("tls.key", t.key.as_deref())?;
    let mut sni = Vec::with_capacity(t.sni.len());
    for (i, s) in t.sni.iter().enumerate() {
        let k = |f: &str| format!("tls.sni[{i}].{f}");
        let name = required(&k("name"), s.name.as_deref())?.to_ascii_lowercase();
        if name.contains(|c: char| c.is_whitespace() || c == '/' || c == ':') {
            return fail(k("name"), format!("{name:?} is not a DNS name"));
        }
        sni.push(SniCert {
            name,
            cert: readable(&k("cert"), s.cert.as_deref())?,
            key: readable(&k("key"), s.key.as_deref())?,
        });
    }
    Ok(Tls { cert, key, sni })
}

fn affinity(a: &RawAffinity) -> R<Affinity> {
    let cookie = interpolate("affinity.cookie", &a.cookie)?;
    if !is_token(&cookie) {
        let msg = format!("{cookie:?} is not a cookie name (no spaces, separators, ; or =)");
        return fail("affinity.cookie", msg);
    }
    if a.keys.is_empty() {
        return fail("affinity.keys", "required: base64 keys of 32 bytes or more");
    }
    let mut keys = Vec::with_capacity(a.keys.len());
    for (i, k) in a.keys.iter().enumerate() {
        let name = format!("affinity.keys[{i}]");
        let decoded = KeyMaterial::from_base64(&interpolate(&name, k)?);
        keys.push(decoded.or_else(|msg| fail(name, msg))?);
    }
    let same_site = choice("affinity.same_site", &a.same_site, SAME_SITE)?;
    let secure = match &a.secure {
        StrOrBool::Bool(true) => SecureMode::Always,
        StrOrBool::Bool(false) => SecureMode::Never,
        StrOrBool::Str(s) => choice("affinity.secure", s, SECURE)?,
    };
    // With "auto", plain HTTP would get SameSite=None without Secure: dropped.
    if same_site == SameSite::None && secure != SecureMode::Always {
        let msg = "\"none\" needs secure = \"true\": browsers drop SameSite=None without Secure";
        return fail("affinity.same_site", msg);
    }
    let path = abs_path("affinity.path", &a.path)?;
    let domain = opt(a.domain.as_deref(), |d| interpolate("affinity.domain", d))?;
    if let Some(d) = &domain {
        if d.is_empty() || d.contains(|c: char| c == ';' || c.is_whitespace() || c.is_control()) {
            return fail("affinity.domain", format!("{d:?} is not a domain"));
        }
    }
    if a.key.is_empty() {
        return fail("affinity.key", "needs a source, e.g. [\"cookie\"]");
    }
    let mut key = Vec::with_capacity(a.key.len());
    for (i, k) in a.key.iter().enumerate() {
        let name = format!("affinity.key[{i}]");
        let k = interpolate(&name, k)?;
        key.push(match (k.trim(), k.trim().strip_prefix("header:")) {
            ("cookie", _) => KeySource::Cookie,
            (_, Some(h)) => KeySource::Header(header_name(&name, h)?),
            _ => return fail(name, format!("{k:?}: write \"cookie\" or \"header:NAME\"")),
        });
    }
    let idle = |v| dur_pos("affinity.idle_timeout", v);
    Ok(Affinity {
        cookie,
        keys,
        ttl: dur_pos("affinity.ttl", &a.ttl)?,
        idle_timeout: opt(a.idle_timeout.as_deref(), idle)?,
        refresh: dur_pos("affinity.refresh", &a.refresh)?,
        same_site,
        secure,
        http_only: a.http_only,
        path,
        domain,
        key,
        on_worker_loss: choice("affinity.on_worker_loss", &a.on_worker_loss, ON_WORKER_LOSS)?,
    })
}

fn balance(b: &RawBalance) -> R<Balance> {
    let policy = choice("balance.policy", &b.policy, POLICY)?;
    let max_inflight = opt(b.max_inflight, |n| {
        int("balance.max_inflight", n, 1, 1_000_000)
    })?;
    let Some(k) = opt(b.key.as_deref(), |k| interpolate("balance.key", k))? else {
        return Ok(Balance {
            policy,
            key: None,
            max_inflight,
        });
    };
    let key = if let Some(h) = k.strip_prefix("header:") {
        BalanceKey::Header(header_name("balance.key", h)?)
    } else if let Some(c) = k.strip_prefix("cookie:").filter(|c| is_token(c.trim())) {
        BalanceKey::Cookie(c.trim().to_owned())
    } else {
        let msg = format!("{k:?}: write \"header:NAME\" or \"cookie:NAME\"");
        return fail("balance.key", msg);
    };
    let key = Some(key);
    Ok(Balance {
        policy,
        key,
        max_inflight,
    })
}

fn backends(raw: &[RawBackend]) -> R<Vec<BackendConfig>> {
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(raw.len());
    for (i, b) in raw.iter().enumerate() {
        let k = |f: &str| format!("backends[{i}].{f}");
        let id = required(&k("id"), b.id.as_deref())?;
        // Ids travel in cookies, metric labels and admin paths (`/backends/{id}`).
        let odd = |c: char| c == '/' || c.is_whitespace() || c.is_control();
        if id.len() > 200 || id.contains(odd) {
            let msg = format!("{id:?}: up to 200 characters, no spaces or /");
            return fail(k("id"), msg);
        }
        if !seen.insert(id.clone()) {
            return fail(k("id"), format!("duplicate id {id:?}"));
        }
        out.push(BackendConfig {
            id,
            url: worker_url(&k("url"), &required(&k("url"), b.url.as_deref())?)?,
            weight: int(&k("weight"), b.weight, 1, 10_000)?,
            max_inflight: opt(b.max_inflight, |n| int(&k("max_inflight"), n, 1, 1_000_000))?,
        });
    }
    Ok(out)
}

fn discovery(d: &RawDiscovery) -> R<Discovery> {
    let Some(port) = d.port else {
        return fail("discovery.port", "required in [discovery]");
    };
    Ok(Discovery {
        dns: required("discovery.dns", d.dns.as_deref())?,
        port: int("discovery.port", port, 1, 65_535)?,
        interval: dur_pos("discovery.interval", &d.interval)?,
    })
}

fn health(h: &RawHealth) -> R<Health> {
    Ok(Health {
        path: abs_path("health.path", &h.path)?.into(),
        interval: dur_pos("health.interval", &h.interval)?,
        timeout: dur_pos("health.timeout", &h.timeout)?,
        fall: int("health.fall", h.fall, 1, 1000)?,
        rise: int("health.rise", h.rise, 1, 1000)?,
    })
}

fn state(s: &RawState) -> R<State> {
    let store = interpolate("state.store", &s.store)?;
    // The URL may hold a password: the message never repeats it.
    if !STORE_SCHEMES.iter().any(|p| store.starts_with(p)) {
        return fail("state.store", "must start with sqlite:// or postgres://");
    }
    // A prefix, matched as `{path}/…`: "/_tether/" and "/" lose the slash.
    let path = abs_path("state.path", &s.path)?;
    let path = path.trim_end_matches('/').to_owned();
    if path.is_empty() || path.contains('?') {
        return fail("state.path", "must be a prefix like \"/_tether\" (no ?)");
    }
    let restore = &s.on_restore_failure;
    Ok(State {
        store: Secret::new(store),
        path,
        token: secret("state.token", s.token.as_deref())?,
        on_restore_failure: choice("state.on_restore_failure", restore, ON_RESTORE_FAILURE)?,
        restore_timeout: dur_pos("state.restore_timeout", &s.restore_timeout)?,
        retention: dur("state.retention", &s.retention)?,
        queue: int("state.queue", s.queue, 1, 10_000_000)?,
        max_export_bytes: int("state.max_export_bytes", s.max_export_bytes, 1024, 1 << 32)?,
        partial_after: dur("state.partial_after", &s.partial_after)?,
        buffer_bytes: int("state.buffer_bytes", s.buffer_bytes, 0, 1 << 34)?,
        capture: choice("state.capture", &s.capture, CAPTURE)?,
    })
}

fn queue(q: &RawQueue) -> R<Queue> {
    Ok(Queue {
        timeout: dur_pos("queue.timeout", &q.timeout)?,
        max_waiting: int("queue.max_waiting", q.max_waiting, 0, 1_000_000)?,
        stream_slots: q.stream_slots,
    })
}

fn rate_limits(raw: &[RawRateLimit]) -> R<Vec<RateLimit>> {
    let mut names = HashSet::new();
    let mut out = Vec::with_capacity(raw.len());
    for (i, r) in raw.iter().enumerate() {
        let k = |f: &str| format!("rate_limits[{i}].{f}");
        let name = match &r.name {
            Some(n) => required(&k("name"), Some(n))?,
            None => i.to_string(),
        };
        if !names.insert(name.clone()) {
            return fail(k("name"), format!("duplicate rule name {name:?}"));
        }
        let key_text = required(&k("key"), r.key.as_deref())?;
        let key = match (key_text.as_str(), key_text.strip_prefix("header:")) {
            ("ip", _) => RateKey::Ip,
            ("session", _) => RateKey::Session,
            (_, Some(h)) => RateKey::Header(header_name(&k("key"), h)?),
            _ => {
                let msg = format!("{key_text:?}: write \"ip\", \"session\" or \"header:NAME\"");
                return fail(k("key"), msg);
            }
        };
        let rate = required(&k("rate"), r.rate.as_deref())?;
        let bad_rate = || {
            fail(
                k("rate"),
                format!("{rate:?} is not a rate like \"10/s\", \"100/m\" or \"1000/h\""),
            )
        };
        let Some((n, unit)) = rate.split_once('/') else {
            return bad_rate();
        };
        let per = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return bad_rate(),
        };
        let Ok(count) = n.trim().parse::<i64>() else {
            return bad_rate();
        };
        let count: u32 = int(&k("rate"), count, 1, 1_000_000)?;
        let burst = match r.burst {
            Some(b) => int(&k("burst"), b, 1, 1_000_000)?,
            None => count,
        };
        let path_prefix = opt(r.path_prefix.as_deref(), |p| abs_path(&k("path_prefix"), p))?;
        out.push(RateLimit {
            name,
            key,
            count,
            per,
            burst,
            path_prefix,
        });
    }
    Ok(out)
}

/// The largest HTTP/2 flow-control window (2^31-1).
const H2_MAX_WINDOW: i64 = (1 << 31) - 1;

fn limits(l: &RawLimits) -> R<Limits> {
    let max_body = |n| int("limits.max_body_bytes", n, 1, i64::MAX);
    Ok(Limits {
        max_connections: int("limits.max_connections", l.max_connections, 1, 10_000_000)?,
        // hyper's smallest read buffer is 8192 bytes.
        max_header_bytes: int("limits.max_header_bytes", l.max_header_bytes, 8192, 1 << 20)?,
        header_timeout: dur_pos("limits.header_timeout", &l.header_timeout)?,
        idle_timeout: dur_pos("limits.idle_timeout", &l.idle_timeout)?,
        stream_idle: dur_pos("limits.stream_idle", &l.stream_idle)?,
        max_body_bytes: opt(l.max_body_bytes, max_body)?,
        connect_timeout: dur_pos("limits.connect_timeout", &l.connect_timeout)?,
        retry_body_bytes: int("limits.retry_body_bytes", l.retry_body_bytes, 0, 1 << 26)?,
        max_attempts: int("limits.max_attempts", l.max_attempts, 1, 10)?,
        max_sessions: int("limits.max_sessions", l.max_sessions, 1, 100_000_000)?,
        response_timeout: dur_pos("limits.response_timeout", &l.response_timeout)?,
        body_timeout: dur_pos("limits.body_timeout", &l.body_timeout)?,
        min_body_rate: int("limits.min_body_rate", l.min_body_rate, 0, 1 << 30)?,
        send_timeout: dur_pos("limits.send_timeout", &l.send_timeout)?,
        max_request_line_bytes: int(
            "limits.max_request_line_bytes",
            l.max_request_line_bytes,
            256,
            1 << 20,
        )?,
        allow_underscore_headers: l.allow_underscore_headers,
        h2_max_concurrent_streams: int(
            "limits.h2_max_concurrent_streams",
            l.h2_max_concurrent_streams,
            1,
            10_000,
        )?,
        // RFC 9113 6.5.2: windows are at most 2^31-1. The connection
        // window starts at 65535 and can only be raised.
        h2_initial_stream_window: int(
            "limits.h2_initial_stream_window",
            l.h2_initial_stream_window,
            1024,
            H2_MAX_WINDOW,
        )?,
        h2_initial_connection_window: int(
            "limits.h2_initial_connection_window",
            l.h2_initial_connection_window,
            65_535,
            H2_MAX_WINDOW,
        )?,
    })
}

// === values ===

/// `Some(v)` through a check; `None` stays `None`.
fn opt<V, T>(v: Option<V>, check: impl FnOnce(V) -> R<T>) -> R<Option<T>> {
    v.map(check).transpose()
}

fn fail<T>(key: impl Into<String>, message: impl Into<String>) -> R<T> {
    Err(ConfigError::invalid(key, message))
}

/// A string that must be present and non-empty, interpolated and trimmed.
fn required(key: &str, v: Option<&str>) -> R<String> {
    match opt(v, |v| interpolate(key, v))?.map(|s| s.trim().to_owned()) {
        Some(s) if !s.is_empty() => Ok(s),
        _ => fail(key, "required and non-empty"),
    }
}

/// An optional token; empty is refused: an empty `${VAR}` must not turn auth off.
fn secret(key: &str, v: Option<&str>) -> R<Option<Secret>> {
    match opt(v, |v| interpolate(key, v))? {
        Some(t) if t.trim().is_empty() => fail(key, "empty; leave the key out for no token"),
        t => Ok(t.map(Secret::new)),
    }
}

fn dur(key: &str, v: &str) -> R<Duration> {
    let text = interpolate(key, v)?;
    let msg = |e| format!("{text:?} is not a duration ({e}); write e.g. \"2s\", \"24h\"");
    humantime::parse_duration(text.trim()).or_else(|e| fail(key, msg(e)))
}

fn dur_pos(key: &str, v: &str) -> R<Duration> {
    match dur(key, v)? {
        d if d.is_zero() => fail(key, "must be greater than zero"),
        d => Ok(d),
    }
}

/// An integer in `min..=max`, converted to the field's type.
fn int<T: TryFrom<i64>>(key: &str, n: i64, min: i64, max: i64) -> R<T> {
    match T::try_from(n) {
        Ok(t) if (min..=max).contains(&n) => Ok(t),
        _ => fail(key, format!("{n} is out of range {min}..={max}")),
    }
}

/// A network like `"10.0.0.0/8"`; a bare address is a network of one.
fn cidr(key: &str, v: &str) -> R<ipnet::IpNet> {
    let s = interpolate(key, v)?;
    let s = s.trim();
    let msg = format!("{s:?} is not a network like \"10.0.0.0/8\" or an address");
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .or_else(|_| fail(key, msg))
}

fn addr(key: &str, v: &str) -> R<SocketAddr> {
    let s = interpolate(key, v)?;
    let msg = format!("{s:?} is not an address like \"127.0.0.1:8080\"");
    s.trim().parse().or_else(|_| fail(key, msg))
}

/// One of a fixed set of names (case-insensitive); the error lists them.
fn choice<T: Copy>(key: &str, v: &str, options: &[(&str, T)]) -> R<T> {
    let v = interpolate(key, v)?;
    for (name, t) in options {
        if name.eq_ignore_ascii_case(v.trim()) {
            return Ok(*t);
        }
    }
    let names: Vec<String> = options.iter().map(|(n, _)| format!("\"{n}\"")).collect();
    fail(key, format!("{v:?} is not one of {}", names.join(", ")))
}

/// A PEM path that must be set and readable; parsing happens in `server::tls`.
fn readable(key: &str, v: Option<&str>) -> R<PathBuf> {
    let p = PathBuf::from(required(key, v)?);
    match std::fs::File::open(&p) {
        Ok(_) => Ok(p),
        Err(e) => fail(key, format!("cannot read {}: {e}", p.display())),
    }
}

/// A URL path: starts with `/`, nothing that ends a cookie attribute or a URL.
fn abs_path(key: &str, v: &str) -> R<String> {
    let path = interpolate(key, v)?;
    let bad = |c: char| c == ';' || c == '#' || c.is_whitespace() || c.is_control();
    if !path.starts_with('/') || path.contains(bad) {
        return fail(key, format!("{path:?}: start with /; no spaces, ; or #"));
    }
    Ok(path)
}

/// `http://host[:port]` with nothing after the authority.
fn worker_url(key: &str, text: &str) -> R<http::Uri> {
    let bad = |why: &str| fail(key, format!("{text:?} {why}"));
    let Ok(url) = text.parse::<http::Uri>() else {
        return bad("is not a URL like \"http://127.0.0.1:9001\"");
    };
    match url.scheme_str() {
        Some("http") => {}
        Some("https") => return fail(key, "https to workers is not supported yet: use http://"),
        _ => return bad("must start with http://"),
    }
    match url.authority() {
        Some(a) if !a.host().is_empty() && !a.as_str().contains('@') => {}
        _ => return bad("needs a host (and no user info)"),
    }
    if !matches!(url.path(), "" | "/") || url.query().is_some() {
        return bad("has a path or query, which a worker URL cannot have");
    }
    Ok(url)
}

fn header_name(key: &str, name: &str) -> R<http::HeaderName> {
    http::HeaderName::from_bytes(name.trim().to_ascii_lowercase().as_bytes())
        .or_else(|_| fail(key, format!("{name:?} is not a valid header name")))
}

/// An RFC 6265 cookie-name token.
fn is_token(s: &str) -> bool {
    let separator = |b: u8| b"()<>@,;:\\\"/[]?={}".contains(&b);
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic() && !separator(b))
}
