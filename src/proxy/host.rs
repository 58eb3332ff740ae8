//! The request's host (RFC 9112 §3.2, RFC 9113 §8.3.1): exactly one valid
//! `Host` on HTTP/1.1, the target's authority winning over it (an
//! absolute-form target, HTTP/2 `:authority`), and `421` for a host the
//! connection's named TLS certificate was not chosen for.

use http::header::{HeaderValue, HOST};
use http::uri::Authority;
use http::{Request, Version};

use super::headers::Peer;

/// Why a request's host was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// An HTTP/1.1 request without `Host`.
    #[error("HTTP/1.1 request without Host")]
    Missing,
    /// More than one `Host` line.
    #[error("more than one Host")]
    Duplicate,
    /// A `Host` (or target authority) that is not `host[:port]`.
    #[error("Host is not a valid authority")]
    Invalid,
    /// The host is not the one the connection's SNI certificate is for.
    #[error("Host does not match the TLS server name")]
    Misdirected,
}

/// The host to forward: the target's authority when it has one (absolute
/// form, HTTP/2), else the `Host` header; `None` when neither is there
/// (HTTP/1.0). Refuses what RFC 9112 §3.2 says a server must refuse.
pub fn effective_host<B>(req: &Request<B>, peer: &Peer) -> Result<Option<HeaderValue>, HostError> {
    let mut lines = req.headers().get_all(HOST).iter();
    let header = lines.next();
    if lines.next().is_some() {
        return Err(HostError::Duplicate);
    }
    if let Some(h) = header {
        valid_authority(h.as_bytes())?;
    }
    let host = match req.uri().authority() {
        Some(a) => {
            valid_authority(a.as_str().as_bytes())?;
            Some(HeaderValue::from_str(a.as_str()).map_err(|_| HostError::Invalid)?)
        }
        None if header.is_none() && req.version() == Version::HTTP_11 => {
            return Err(HostError::Missing)
        }
        None => header.cloned(),
    };
    if let (Some(sni), Some(host)) = (&peer.sni, &host) {
        if !hostname(host.as_bytes()).eq_ignore_ascii_case(sni.as_bytes()) {
            return Err(HostError::Misdirected);
        }
    }
    Ok(host)
}

/// `uri-host [ ":" port ]`, no user info, no path, no empty host.
fn valid_authority(v: &[u8]) -> Result<(), HostError> {
    // The common case is checked here: `Authority` copies what it parses.
    if is_plain(v) {
        return Ok(());
    }
    parsed_authority(v)
}

/// `name [ ":" digits ]` with a name of letters, digits, `-` and `.`: an
/// authority [`parsed_authority`] accepts too.
fn is_plain(v: &[u8]) -> bool {
    let (name, port) = match v.iter().position(|&b| b == b':') {
        Some(i) => (&v[..i], &v[i + 1..]),
        None => (v, &[][..]),
    };
    !name.is_empty()
        && name
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && port.iter().all(u8::is_ascii_digit)
}

/// [`valid_authority`] for any authority, by `http`'s parser.
fn parsed_authority(v: &[u8]) -> Result<(), HostError> {
    if v.is_empty() || v.contains(&b'@') {
        return Err(HostError::Invalid);
    }
    let a = Authority::try_from(v).map_err(|_| HostError::Invalid)?;
    // `Authority` takes "a:80x" and leaves the port unparsed: check it.
    let port = match v.iter().rposition(|&b| b == b':') {
        Some(i) if !v[i..].contains(&b']') => &v[i + 1..],
        _ => &[][..],
    };
    if !port.iter().all(u8::is_ascii_digit) || a.host().is_empty() {
        return Err(HostError::Invalid);
    }
    Ok(())
}

/// The host of an authority, without its port (an IPv6 literal keeps its
/// brackets).
fn hostname(v: &[u8]) -> &[u8] {
    match v.iter().rposition(|&b| b == b':') {
        Some(i) if !v[i..].contains(&b']') => &v[..i],
        _ => v,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(version: Version, target: &str, hosts: &[&str]) -> Result<Option<String>, HostError> {
        host_on(
            &Peer::new(([127, 0, 0, 1], 9).into(), false),
            version,
            target,
            hosts,
        )
    }

    fn host_on(
        peer: &Peer,
        version: Version,
        target: &str,
        hosts: &[&str],
    ) -> Result<Option<String>, HostError> {
        let mut b = Request::builder().version(version).uri(target);
        for h in hosts {
            b = b.header(HOST, *h);
        }
        let req = b.body(()).unwrap();
        effective_host(&req, peer).map(|h| h.map(|v| v.to_str().unwrap().to_owned()))
    }

    #[test]
    fn host_rules_of_rfc_9112() {
        use HostError::*;
        let v11 = Version::HTTP_11;
        type Row<'a> = (&'a str, &'a [&'a str], Result<Option<&'a str>, HostError>);
        let cases: &[Row] = &[
            ("/", &["a"], Ok(Some("a"))),
            ("/", &["a:8080"], Ok(Some("a:8080"))),
            ("/", &["[::1]:80"], Ok(Some("[::1]:80"))),
            ("/", &["a:"], Ok(Some("a:"))),
            ("/", &[], Err(Missing)),
            ("/", &["a", "a"], Err(Duplicate)),
            ("/", &[""], Err(Invalid)),
            ("/", &["a b"], Err(Invalid)),
            ("/", &["a/evil"], Err(Invalid)),
            ("/", &["u@a"], Err(Invalid)),
            ("/", &["a:80x"], Err(Invalid)),
            ("/", &[":80"], Err(Invalid)),
            ("http://b:81/x", &["a"], Ok(Some("b:81"))),
            ("http://b/x", &["a b"], Err(Invalid)),
            ("http://u@b/x", &["b"], Err(Invalid)),
        ];
        for (target, hosts, want) in cases {
            let got = host(v11, target, hosts);
            assert_eq!(
                got,
                want.map(|h| h.map(str::to_owned)),
                "{target} {hosts:?}"
            );
        }
        assert_eq!(host(Version::HTTP_10, "/", &[]), Ok(None));
        assert_eq!(
            host(Version::HTTP_2, "https://c/x", &["a"]),
            Ok(Some("c".into()))
        );
    }

    proptest::proptest! {
        #[test]
        fn a_plain_authority_is_one_the_parser_accepts(v in "[a-zA-Z0-9.:-]{0,12}") {
            if is_plain(v.as_bytes()) {
                proptest::prop_assert_eq!(parsed_authority(v.as_bytes()), Ok(()));
            }
        }
    }

    #[test]
    fn a_named_certificate_serves_only_its_host() {
        let mut peer = Peer::new(([127, 0, 0, 1], 9).into(), true);
        peer.sni = Some("chat.example".into());
        let v11 = Version::HTTP_11;
        assert!(host_on(&peer, v11, "/", &["Chat.Example:443"]).is_ok());
        assert_eq!(
            host_on(&peer, v11, "/", &["admin.example"]),
            Err(HostError::Misdirected)
        );
    }
}
