use http::header::{HeaderMap, HeaderValue};

use super::*;

fn map(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

type Case<'a> = (&'a [(&'a str, &'a str)], Result<(), Smuggling>);

#[test]
fn framing_table() {
    let cases: &[Case] = &[
        (&[("content-length", "5")], Ok(())),
        (&[("content-length", "5"), ("content-length", "5")], Ok(())),
        (&[("content-length", "5, 5")], Ok(())),
        (
            &[("content-length", "5"), ("content-length", "6")],
            Err(Smuggling::BadContentLength),
        ),
        (
            &[("content-length", "5, 6")],
            Err(Smuggling::BadContentLength),
        ),
        (
            &[("content-length", "+5")],
            Err(Smuggling::BadContentLength),
        ),
        (
            &[("content-length", "5"), ("transfer-encoding", "chunked")],
            Err(Smuggling::LengthAndChunked),
        ),
        (&[("transfer-encoding", "chunked")], Ok(())),
        (&[("transfer-encoding", "gzip, chunked")], Ok(())),
        (
            &[("transfer-encoding", "chunked, gzip")],
            Err(Smuggling::TransferEncoding),
        ),
        (
            &[("transfer-encoding", "identity")],
            Err(Smuggling::TransferEncoding),
        ),
        (
            &[("transfer-encoding", "chunked, chunked")],
            Err(Smuggling::ChunkedTwice),
        ),
        (
            &[
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "Chunked"),
            ],
            Err(Smuggling::ChunkedTwice),
        ),
    ];
    for (pairs, want) in cases {
        assert_eq!(check_framing(&map(pairs)), *want, "{pairs:?}");
    }
}

#[test]
fn strips_hop_by_hop_and_connection_named_headers() {
    let mut h = map(&[
        ("connection", "keep-alive, x-secret"),
        ("keep-alive", "timeout=5"),
        ("x-secret", "1"),
        ("te", "trailers"),
        ("upgrade", "websocket"),
        ("x-kept", "yes"),
    ]);
    strip_hop_by_hop(&mut h, false);
    let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
    assert_eq!(names, ["x-kept"]);

    let mut up = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
    strip_hop_by_hop(&mut up, true);
    assert_eq!(up.get("upgrade").unwrap(), "websocket");
    assert_eq!(up.get("connection").unwrap(), "upgrade");
}

#[test]
fn strip_finds_each_hop_by_hop_header_alone_and_leaves_others_untouched() {
    let plain = [("host", "t"), ("accept", "*/*"), ("x-kept", "yes")];
    let mut h = map(&plain);
    strip_hop_by_hop(&mut h, false);
    assert_eq!(h, map(&plain));
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        let mut h = map(&[("x-kept", "yes"), (name, "close, X-Secret")]);
        h.insert("x-secret", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        let want: &[&str] = if name == "connection" {
            &["x-kept"]
        } else {
            &["x-kept", "x-secret"]
        };
        assert_eq!(left, want, "{name}");
    }
}

#[test]
fn a_lone_tether_header_or_forwarding_header_is_replaced() {
    let peer = Peer::new("192.0.2.7:4000".parse().unwrap(), false);
    let mut h = map(&[("tether-session", "forged"), ("x-kept", "yes")]);
    rewrite_request(&mut h, &peer, None);
    assert!(h.get("tether-session").is_none());
    let mut h = map(&[("x-real-ip", "6.6.6.6"), ("x-kept", "yes")]);
    rewrite_request(&mut h, &peer, None);
    assert!(h.get("x-real-ip").is_none());
    assert_eq!(h.get("x-forwarded-for").unwrap(), "192.0.2.7");
}

#[test]
fn forwarding_headers_are_replaced_from_the_socket() {
    let mut h = map(&[
        ("x-forwarded-for", "6.6.6.6"),
        ("forwarded", "for=6.6.6.6"),
        ("tether-session", "forged"),
        ("tether-epoch", "99"),
    ]);
    let peer = Peer::new("[::1]:4000".parse().unwrap(), true);
    rewrite_request(
        &mut h,
        &peer,
        Some(&HeaderValue::from_static("example.com")),
    );
    assert_eq!(h.get("x-forwarded-for").unwrap(), "::1");
    assert_eq!(h.get("x-forwarded-proto").unwrap(), "https");
    assert_eq!(h.get("x-forwarded-host").unwrap(), "example.com");
    assert_eq!(
        h.get("forwarded").unwrap(),
        "for=\"[::1]\";proto=https;host=\"example.com\""
    );
    assert!(!h.contains_key("tether-session"));
    assert!(!h.contains_key("tether-epoch"));
}

#[test]
fn v4_mapped_clients_show_as_v4_and_odd_hosts_stay_out_of_forwarded() {
    let mut h = map(&[]);
    let peer = Peer::new("[::ffff:10.1.2.3]:4000".parse().unwrap(), false);
    rewrite_request(&mut h, &peer, Some(&HeaderValue::from_static("a\\")));
    assert_eq!(h.get("x-forwarded-for").unwrap(), "10.1.2.3");
    assert_eq!(h.get("forwarded").unwrap(), "for=10.1.2.3;proto=http");
}

#[test]
fn reserved_prefix_in_every_spelling_a_router_might_decode() {
    for p in [
        "/_tether",
        "/_tether/",
        "/_tether/threads/x",
        "/%5Ftether/changes",
        "/%5ftether/changes",
        "//_tether/changes",
        "/_TETHER/changes",
        "/_tether%2Fchanges",
        "/./_tether/changes",
        "/x/../_tether/changes",
        "/x/%2e%2e/_tether/changes",
        "/_tether;x/changes",
        "/_tether;/threads/main",
        "/%5Ftether;jsessionid=1/changes",
        "/\\_tether/changes",
    ] {
        assert!(is_reserved(p, "/_tether"), "{p} must be reserved");
    }
    for p in [
        "/",
        "/_tetherx",
        "/_tethe",
        "/chat/_tether",
        "/%5Ftetherx/a",
    ] {
        assert!(!is_reserved(p, "/_tether"), "{p} is not reserved");
    }
    assert!(is_reserved("/Internal/State/x", "/internal/state"));
    assert!(!is_reserved("/internal/x", "/internal/state"));
}

/// The reserved-path check as first written (copies of the decoded path
/// and its segments): the allocation-free walk must agree with it.
fn reserved_by_copying(path: &str, prefix: &str) -> bool {
    let mut decoded = Vec::new();
    let bytes = path.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = match bytes[i] {
            b'%' => match path
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                Some(v) => {
                    i += 2;
                    v
                }
                None => b'%',
            },
            b => b,
        };
        decoded.push(if b == b'\\' {
            b'/'
        } else {
            b.to_ascii_lowercase()
        });
        i += 1;
    }
    let mut canonical: Vec<&[u8]> = Vec::new();
    for seg in decoded.split(|&b| b == b'/') {
        let seg = seg.split(|&b| b == b';').next().unwrap_or(seg);
        match seg {
            b"" | b"." => {}
            b".." => {
                canonical.pop();
            }
            seg => canonical.push(seg),
        }
    }
    let wanted: Vec<Vec<u8>> = prefix
        .split('/')
        .filter(|seg| !seg.is_empty())
        .map(|seg| seg.to_ascii_lowercase().into_bytes())
        .collect();
    !wanted.is_empty()
        && canonical.len() >= wanted.len()
        && canonical
            .iter()
            .zip(&wanted)
            .all(|(a, b)| *a == b.as_slice())
}

proptest::proptest! {
    #[test]
    fn reserved_walk_agrees_with_the_copying_check(
        parts in proptest::collection::vec(proptest::sample::select(vec![
            "/", "//", "\\", ".", "..", "%2e", "%2E%2e", "%2F", "%5C", "%5F", "%5f", "%", "%2",
            "%+f", "%é", "é", ";", ";p=1", "_", "_tether", "_TETHER", "tether", "internal",
            "State", "x", "a%",
        ]), 0..12),
        prefix in proptest::sample::select(vec!["/_tether", "/internal/state", "/", "", "_tether/x/"]),
    ) {
        let path = parts.concat();
        proptest::prop_assert_eq!(
            is_reserved(&path, prefix),
            reserved_by_copying(&path, prefix),
            "{} under {}", path, prefix
        );
    }
}

#[test]
fn response_framing_is_a_length_or_plain_chunked() {
    use ResponseFraming::*;
    type Row<'a> = (&'a [(&'a str, &'a str)], Result<(), ResponseFraming>);
    let cases: &[Row] = &[
        (&[("content-length", "3")], Ok(())),
        (&[("transfer-encoding", "chunked")], Ok(())),
        (&[("transfer-encoding", "gzip")], Err(Coding)),
        (&[("transfer-encoding", "gzip, chunked")], Err(Coding)),
        (
            &[("transfer-encoding", "chunked"), ("content-length", "3")],
            Err(LengthAndChunked),
        ),
    ];
    for (pairs, want) in cases {
        assert_eq!(check_response_framing(&map(pairs)), *want, "{pairs:?}");
    }
}

#[test]
fn names_with_underscores_are_dropped() {
    let mut h = map(&[("x_real_ip", "1"), ("tether_session", "2"), ("x-kept", "3")]);
    drop_underscored(&mut h);
    assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-kept"]);
}

#[test]
fn a_trusted_proxy_keeps_the_chain_and_names_the_client() {
    let nets: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
    let from = |ip: [u8; 4]| Peer::with_trust((ip, 9).into(), false, &nets);
    let client = map(&[("x-forwarded-for", "6.6.6.6, 203.0.113.7, 10.1.1.1")]);
    let mut h = client.clone();
    rewrite_request(&mut h, &from([10, 0, 0, 2]), None);
    assert_eq!(
        h["x-forwarded-for"],
        "6.6.6.6, 203.0.113.7, 10.1.1.1, 10.0.0.2"
    );
    assert_eq!(h["forwarded"], "for=203.0.113.7;proto=http");
    let mut h = client;
    rewrite_request(&mut h, &from([192, 0, 2, 1]), None);
    assert_eq!(h["x-forwarded-for"], "192.0.2.1");
    assert_eq!(h["forwarded"], "for=192.0.2.1;proto=http");
}

#[test]
fn the_session_header_follows_the_session_it_is_asked_for() {
    use crate::affinity::SessionId;
    let peer = Peer::new("192.0.2.7:4000".parse().unwrap(), false);
    let (a, b) = (SessionId([0xab; 16]), SessionId([0x01; 16]));
    for id in [a, a, b, a] {
        let v = peer.session_header(&id).unwrap();
        assert_eq!(v.to_str().unwrap(), id.to_hex());
    }
}

#[test]
fn forwarded_follows_the_host_of_each_request_on_a_connection() {
    let peer = Peer::new("192.0.2.7:4000".parse().unwrap(), true);
    let (a, b) = (
        HeaderValue::from_static("a.example"),
        HeaderValue::from_static("b.example"),
    );
    let long = HeaderValue::from_str(&"h".repeat(4000)).unwrap();
    for host in [
        Some(&a),
        Some(&a),
        Some(&b),
        None,
        Some(&a),
        Some(&long),
        Some(&long),
        None,
    ] {
        let mut h = map(&[]);
        rewrite_request(&mut h, &peer, host);
        let want = match host {
            Some(v) => format!("for=192.0.2.7;proto=https;host=\"{}\"", v.to_str().unwrap()),
            None => "for=192.0.2.7;proto=https".to_owned(),
        };
        assert_eq!(h["forwarded"], want.as_str());
    }
}
