//! Header hygiene: request-smuggling checks, hop-by-hop stripping both
//! ways, and the headers tether sets for workers.

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Method;

use crate::affinity::{OpenCache, SessionId};
use crate::last::Last;
use crate::wire::is_tether_header;

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1).
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Client-supplied forwarding headers: replaced, never trusted.
static FORWARDING: [HeaderName; 5] = [
    HeaderName::from_static("x-forwarded-for"),
    HeaderName::from_static("x-forwarded-proto"),
    HeaderName::from_static("x-forwarded-host"),
    header::FORWARDED,
    HeaderName::from_static("x-real-ip"),
];

/// `Idempotency-Key`: makes a non-idempotent request safe to retry.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// Why a request head was refused with `400`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Smuggling {
    /// Both `Content-Length` and `Transfer-Encoding`.
    #[error("both Content-Length and Transfer-Encoding")]
    LengthAndChunked,
    /// Several `Content-Length` values that differ, or one that is not a number.
    #[error("invalid or conflicting Content-Length")]
    BadContentLength,
    /// A `Transfer-Encoding` whose last coding is not `chunked`.
    #[error("Transfer-Encoding does not end in chunked")]
    TransferEncoding,
    /// `chunked` applied more than once (`chunked, chunked`).
    #[error("Transfer-Encoding names chunked more than once")]
    ChunkedTwice,
}

/// Checks the framing headers hyper leaves to us: whatever two parsers
/// could disagree on is refused (request smuggling).
pub fn check_framing(h: &HeaderMap) -> Result<(), Smuggling> {
    let has_te = h.contains_key(header::TRANSFER_ENCODING);
    let mut lengths = h.get_all(header::CONTENT_LENGTH).iter();
    if let Some(first) = lengths.next() {
        if has_te {
            return Err(Smuggling::LengthAndChunked);
        }
        let first = parse_length(first)?;
        for other in lengths {
            if parse_length(other)? != first {
                return Err(Smuggling::BadContentLength);
            }
        }
    }
    if has_te {
        let codings = codings(h);
        if !codings
            .last()
            .is_some_and(|c| c.eq_ignore_ascii_case("chunked"))
        {
            return Err(Smuggling::TransferEncoding);
        }
        // RFC 9112 §6.1: chunked is applied once; a second one is read by
        // one parser as a coding and by another as the framing.
        let chunked = codings.iter().filter(|c| c.eq_ignore_ascii_case("chunked"));
        if chunked.count() > 1 {
            return Err(Smuggling::ChunkedTwice);
        }
    }
    Ok(())
}

/// The transfer codings of all `Transfer-Encoding` lines, in order (an
/// unreadable value counts as one unknown coding).
fn codings(h: &HeaderMap) -> Vec<&str> {
    h.get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("?").split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

/// Why a worker's response cannot be passed on (answered `502`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ResponseFraming {
    /// A transfer coding besides `chunked` (`gzip`): tether re-frames the
    /// body and would silently drop the coding.
    #[error("response Transfer-Encoding other than chunked")]
    Coding,
    /// Both `Content-Length` and `Transfer-Encoding`.
    #[error("response with both Content-Length and Transfer-Encoding")]
    LengthAndChunked,
}

/// Checks a worker's response framing: only a plain `chunked` or a length
/// can be re-framed for the client without changing what it receives.
pub fn check_response_framing(h: &HeaderMap) -> Result<(), ResponseFraming> {
    if !h.contains_key(header::TRANSFER_ENCODING) {
        return Ok(());
    }
    if h.contains_key(header::CONTENT_LENGTH) {
        return Err(ResponseFraming::LengthAndChunked);
    }
    match codings(h).as_slice() {
        [only] if only.eq_ignore_ascii_case("chunked") => Ok(()),
        _ => Err(ResponseFraming::Coding),
    }
}

/// Drops every request header whose name holds `_`: CGI and WSGI workers
/// read `X_Real_IP` as `X-Real-IP` (nginx's `underscores_in_headers off`),
/// which would smuggle it past the forwarding-header rewrite.
pub fn drop_underscored(h: &mut HeaderMap) {
    while let Some(name) = h.keys().find(|k| k.as_str().contains('_')).cloned() {
        h.remove(name);
    }
}

fn parse_length(v: &HeaderValue) -> Result<u64, Smuggling> {
    // A list like "5, 5" is several values in one header.
    let mut value = None;
    for part in v
        .to_str()
        .map_err(|_| Smuggling::BadContentLength)?
        .split(',')
    {
        let part = part.trim();
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Smuggling::BadContentLength);
        }
        let n: u64 = part.parse().map_err(|_| Smuggling::BadContentLength)?;
        if value.is_some_and(|v| v != n) {
            return Err(Smuggling::BadContentLength);
        }
        value = Some(n);
    }
    value.ok_or(Smuggling::BadContentLength)
}

/// Whether the request asks for a protocol upgrade (WebSocket).
pub fn is_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE) && connection_has(h, "upgrade")
}

fn connection_has(h: &HeaderMap, token: &str) -> bool {
    h.get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Removes hop-by-hop headers and every header that `Connection` names.
/// With `keep_upgrade`, `Upgrade` and `Connection: upgrade` survive (the
/// upgrade handshake must reach the other side).
pub fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    // One pass over the few names a message carries, instead of a hash
    // lookup for each of the nine that are usually absent.
    let present = h
        .keys()
        .any(|k| k == header::UPGRADE || HOP_BY_HOP.contains(k));
    if present {
        if h.contains_key(header::CONNECTION) {
            // `close` names no header and `keep-alive` goes below: neither
            // is parsed into a (custom, allocated) header name.
            let named: Vec<HeaderName> = h
                .get_all(header::CONNECTION)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .map(str::trim)
                .filter(|t| {
                    !t.eq_ignore_ascii_case("close") && !t.eq_ignore_ascii_case("keep-alive")
                })
                .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
                .filter(|n| !(keep_upgrade && n == header::UPGRADE))
                .collect();
            for name in named {
                h.remove(name);
            }
        }
        for name in &HOP_BY_HOP {
            h.remove(name);
        }
        if !keep_upgrade {
            h.remove(header::UPGRADE);
        }
    }
    if keep_upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// What the proxy knows about the client connection, with the forwarding
/// values that depend only on it formatted once per connection.
#[derive(Debug)]
pub struct Peer {
    /// The client's socket address.
    pub addr: SocketAddr,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// `X-Forwarded-For`: the client's IP.
    xff: Option<HeaderValue>,
    /// `Forwarded` without its `host`: `for=…;proto=…`.
    forwarded: String,
    /// `listen.trusted_proxies`, when the peer is in one of them: its
    /// client's `X-Forwarded-For` is kept and appended to.
    trusted: Option<Arc<[IpNet]>>,
    /// The SNI name of a named certificate (`[[tls.sni]]`) that served the
    /// connection, lowercase: requests for another host get `421`.
    pub sni: Option<Arc<str>>,
    /// The connection's last affinity cookie and its pin.
    pub(crate) cookie: OpenCache,
    /// The connection's last `Tether-Session` value, by session.
    session: Last<SessionId, Option<HeaderValue>>,
    /// The connection's last `Tether-Epoch` value, by epoch.
    epoch: Last<u64, HeaderValue>,
    /// The connection's last `Forwarded` value (when it names the peer),
    /// by host.
    forwarded_last: Last<Option<Box<[u8]>>, Option<HeaderValue>>,
}

/// The longest host whose `Forwarded` value a connection keeps: a DNS name
/// (253) and a port.
const MAX_CACHED_HOST: usize = 253 + 6;

impl Peer {
    /// The peer of a connection from `addr`, over TLS or not.
    pub fn new(addr: SocketAddr, tls: bool) -> Peer {
        Peer::with_trust(addr, tls, &[])
    }

    /// The peer of a connection from `addr`, whose `X-Forwarded-For` is
    /// kept when `addr` is in one of the `trusted` networks.
    pub fn with_trust(addr: SocketAddr, tls: bool, trusted: &[IpNet]) -> Peer {
        // A v4 client on a dual-stack listener shows as its v4 address.
        let ip = addr.ip().to_canonical();
        let proto = if tls { "https" } else { "http" };
        let forwarded = match ip {
            IpAddr::V4(v4) => format!("for={v4};proto={proto}"),
            IpAddr::V6(v6) => format!("for=\"[{v6}]\";proto={proto}"),
        };
        Peer {
            addr,
            tls,
            xff: HeaderValue::from_str(&ip.to_string()).ok(),
            forwarded,
            trusted: trusted
                .iter()
                .any(|n| n.contains(&ip))
                .then(|| trusted.into()),
            sni: None,
            cookie: OpenCache::default(),
            session: Last::default(),
            epoch: Last::default(),
            forwarded_last: Last::default(),
        }
    }

    /// The scheme the client used.
    fn proto(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }

    /// `Forwarded` for a request to `host` that names this peer as the
    /// client.
    fn forwarded_value(&self, host: Option<&HeaderValue>) -> Option<HeaderValue> {
        let proto = self.proto();
        let host_bytes = host.map(HeaderValue::as_bytes);
        // What a connection keeps stays small whatever a client sends.
        if host_bytes.is_some_and(|h| h.len() > MAX_CACHED_HOST) {
            return forwarded(None, &self.forwarded, proto, host);
        }
        self.forwarded_last.get_or(
            |seen| seen.as_deref() == host_bytes,
            // The key is a copy: the client's value shares the buffer its
            // request was read into, which must not be kept past it.
            || {
                let key = host_bytes.map(Box::from);
                (key, forwarded(None, &self.forwarded, proto, host))
            },
        )
    }

    /// `Tether-Epoch` for `epoch`.
    pub(crate) fn epoch_header(&self, epoch: u64) -> HeaderValue {
        self.epoch
            .get_or(|&seen| seen == epoch, || (epoch, HeaderValue::from(epoch)))
    }

    /// `Tether-Session` for `id`: the connection's previous value when it
    /// names the same session, as a kept-alive client's requests do (a
    /// header value owns its bytes: made anew it costs an allocation).
    pub(crate) fn session_header(&self, id: &SessionId) -> Option<HeaderValue> {
        self.session.get_or(
            |seen| seen == id,
            || {
                let value = HeaderValue::from_maybe_shared(bytes::Bytes::from(id.to_hex()));
                (*id, value.ok())
            },
        )
    }

    /// `X-Forwarded-For` for the worker: the peer's address, after the
    /// client's chain when the peer is a trusted proxy.
    fn forwarded_for(&self, h: &HeaderMap) -> Option<HeaderValue> {
        let own = self.xff.as_ref()?;
        if self.trusted.is_none() || !h.contains_key(&FORWARDING[0]) {
            return Some(own.clone());
        }
        let mut chain = Vec::new();
        for v in h.get_all(&FORWARDING[0]) {
            let v = v.as_bytes().trim_ascii();
            if !v.is_empty() {
                chain.extend_from_slice(v);
                chain.extend_from_slice(b", ");
            }
        }
        chain.extend_from_slice(own.as_bytes());
        HeaderValue::from_bytes(&chain).ok().or(Some(own.clone()))
    }

    /// The client's address: from `X-Forwarded-For` behind a trusted
    /// proxy, else the peer's.
    pub fn client_ip(&self, h: &HeaderMap) -> IpAddr {
        self.client(h)
            .unwrap_or_else(|| self.addr.ip().to_canonical())
    }

    /// The client of a request from a trusted proxy: the right-most
    /// address of its `X-Forwarded-For` that is not in a trusted network.
    fn client(&self, h: &HeaderMap) -> Option<IpAddr> {
        let trusted = self.trusted.as_ref()?;
        h.get_all(&FORWARDING[0])
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .rev()
            .map(|item| item.trim().parse::<IpAddr>().ok())
            .find(|ip| !ip.is_some_and(|ip| trusted.iter().any(|n| n.contains(&ip))))
            .flatten()
    }
}

/// Rewrites a client request's headers for the worker: forwarding headers
/// from the socket (client copies replaced), `Tether-*` set by tether only.
pub fn rewrite_request(h: &mut HeaderMap, peer: &Peer, host: Option<&HeaderValue>) {
    let xff = peer.forwarded_for(h);
    let client = peer.client(h);
    // One pass over the names present; most requests carry none of these.
    let (forwarding, tether) = h.keys().fold((false, false), |(f, t), k| {
        (f || FORWARDING.contains(k), t || is_tether_header(k))
    });
    if forwarding {
        for name in &FORWARDING {
            h.remove(name);
        }
    }
    // Every Tether-* header is ours to set; a client's copy is dropped.
    if tether {
        while let Some(name) = h.keys().find(|k| is_tether_header(k)).cloned() {
            h.remove(name);
        }
    }
    if let Some(v) = xff {
        h.insert(FORWARDING[0].clone(), v);
    }
    let proto = peer.proto();
    h.insert(FORWARDING[1].clone(), HeaderValue::from_static(proto));
    if let Some(v) = host {
        h.insert(FORWARDING[2].clone(), v.clone());
    }
    let value = match client {
        Some(ip) => forwarded(Some(ip), &peer.forwarded, proto, host),
        // The same for every request of a connection with the same host.
        None => peer.forwarded_value(host),
    };
    if let Some(v) = value {
        h.insert(header::FORWARDED, v);
    }
}

/// `Forwarded`: `for=` the client behind a trusted proxy (`client`), else
/// `own` (the peer's `for=…;proto=…`), then `;host="…"` when the host can be
/// written as a quoted string.
fn forwarded(
    client: Option<IpAddr>,
    own: &str,
    proto: &str,
    host: Option<&HeaderValue>,
) -> Option<HeaderValue> {
    let host = host.and_then(|v| v.to_str().ok()).filter(|host| {
        host.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
    });
    let mut forwarded = Vec::with_capacity(own.len() + host.map_or(0, |h| h.len() + 8));
    match client {
        // Behind a trusted proxy, `for=` names the client it forwarded.
        Some(ip) => {
            // Writing into a Vec cannot fail.
            let _ = match ip.to_canonical() {
                IpAddr::V4(v4) => write!(forwarded, "for={v4};proto={proto}"),
                IpAddr::V6(v6) => write!(forwarded, "for=\"[{v6}]\";proto={proto}"),
            };
        }
        None => forwarded.extend_from_slice(own.as_bytes()),
    }
    if let Some(host) = host {
        forwarded.extend_from_slice(b";host=\"");
        forwarded.extend_from_slice(host.as_bytes());
        forwarded.push(b'"');
    }
    HeaderValue::from_maybe_shared(bytes::Bytes::from(forwarded)).ok()
}

/// Whether a request path falls under the reserved worker-contract prefix,
/// the way any worker's router might read it: percent-decoded, with
/// backslashes as slashes, runs of slashes as one, `.` and `..` segments
/// resolved, `;parameters` dropped from segments, and letters in any
/// case. (`/%5Ftether/x`, `//_tether/x`, `/_TETHER/x`, `/_tether%2Fx`,
/// `/_tether;p/x` and `/a/../_tether/x` all are.)
pub fn is_reserved(path: &str, prefix: &str) -> bool {
    let wanted = || prefix.split('/').filter(|seg| !seg.is_empty());
    // Walked without a copy of the path: only the depth of the resolved
    // path matters, and how many of its leading segments match `wanted`.
    let (mut depth, mut matched) = (0usize, 0);
    for seg in segments(path.as_bytes()) {
        // Servlet containers drop `;parameters` from a segment.
        let seg = seg.take_while(|&b| b != b';');
        match dots(seg.clone()) {
            Some(0 | 1) => {}
            Some(_) => {
                depth = depth.saturating_sub(1);
                matched = matched.min(depth);
            }
            None => {
                let same = |w: &str| seg.clone().eq(w.bytes().map(|b| b.to_ascii_lowercase()));
                if matched == depth && wanted().nth(depth).is_some_and(same) {
                    matched += 1;
                }
                depth += 1;
            }
        }
    }
    matched > 0 && matched == wanted().count()
}

/// A path's bytes the way a router reads them: percent-decoded,
/// lowercase, backslashes as slashes.
#[derive(Clone)]
struct Decoded<'a> {
    raw: &'a [u8],
    at: usize,
}

impl Iterator for Decoded<'_> {
    type Item = u8;

    fn next(&mut self) -> Option<u8> {
        let b = match *self.raw.get(self.at)? {
            b'%' => match self
                .raw
                .get(self.at + 1..self.at + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                Some(v) => {
                    self.at += 2;
                    v
                }
                None => b'%',
            },
            b => b,
        };
        self.at += 1;
        Some(if b == b'\\' {
            b'/'
        } else {
            b.to_ascii_lowercase()
        })
    }
}

/// The segments of a path, split at every `/` it decodes to. An escape
/// never spans a split, so each segment decodes on its own.
fn segments(path: &[u8]) -> impl Iterator<Item = Decoded<'_>> {
    let mut rest = Some(Decoded { raw: path, at: 0 });
    std::iter::from_fn(move || {
        let mut d = rest.take()?;
        let start = d.at;
        loop {
            let end = d.at;
            match d.next() {
                Some(b'/') => {
                    let seg = &path[start..end];
                    rest = Some(d);
                    return Some(Decoded { raw: seg, at: 0 });
                }
                Some(_) => {}
                None => {
                    return Some(Decoded {
                        raw: &path[start..],
                        at: 0,
                    })
                }
            }
        }
    })
}

/// `Some(n)` for a segment of `n` dots, `n` ≤ 2 (empty, `.` or `..`).
fn dots(seg: impl Iterator<Item = u8>) -> Option<usize> {
    let mut n = 0;
    for b in seg {
        if b != b'.' || n == 2 {
            return None;
        }
        n += 1;
    }
    Some(n)
}

/// Whether a request may be sent again after it reached a worker.
pub fn is_retry_safe(method: &Method, h: &HeaderMap) -> bool {
    method.is_idempotent() || h.contains_key(IDEMPOTENCY_KEY)
}

#[cfg(test)]
mod tests;
