//! `cookies::strip` against the plain reading of its rule (the version
//! before its one-pair shortcut), over arbitrary `Cookie` headers.

use http::header::{HeaderMap, HeaderValue, COOKIE};
use proptest::prelude::*;

use super::super::cookies;

/// Every pair split out, ours dropped, the rest joined into one header;
/// a header that is not text dropped; nothing changed when nothing is ours.
fn reference(headers: &mut HeaderMap, name: &str) {
    if !headers.contains_key(COOKIE) {
        return;
    }
    let mut kept: Vec<String> = Vec::new();
    let mut changed = false;
    for value in headers.get_all(COOKIE) {
        let Ok(text) = value.to_str() else {
            changed = true;
            continue;
        };
        let mut rest: Vec<&str> = Vec::new();
        for pair in text.split(';') {
            let pair = pair.trim();
            let is_ours = pair
                .split_once('=')
                .map(|(k, _)| k.trim() == name)
                .unwrap_or(false);
            if is_ours {
                changed = true;
            } else if !pair.is_empty() {
                rest.push(pair);
            }
        }
        if !rest.is_empty() {
            kept.push(rest.join("; "));
        }
    }
    if !changed {
        return;
    }
    headers.remove(COOKIE);
    if !kept.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&kept.join("; ")) {
            headers.insert(COOKIE, v);
        }
    }
}

/// One `name=value` pair as clients write them, and as they should not:
/// spaces around the name, no `=`, quotes, a name that only starts like ours.
fn pair() -> impl Strategy<Value = String> {
    let name = prop_oneof![
        Just("tether"),
        Just(" tether"),
        Just("tether "),
        Just("t"),
        Just("te"),
        Just("tetherx"),
        Just("x"),
        Just("\ttether"),
        Just("a,tether"),
        Just("\"tether\""),
        Just(""),
    ];
    let eq = prop_oneof![Just("="), Just(" = "), Just("")];
    let value = prop_oneof![Just(""), Just("v"), Just("\"q\""), Just("a=b")];
    (name, eq, value).prop_map(|(n, e, v)| format!("{n}{e}{v}"))
}

/// Header values: pairs joined with `;` (with or without a space, empty
/// ones too), or raw bytes over the characters that matter, including a
/// byte that is not text.
fn value() -> impl Strategy<Value = Vec<u8>> {
    let joined = (
        proptest::collection::vec(pair(), 0..4),
        prop_oneof![Just(";"), Just("; "), Just(" ;"), Just(",")],
    )
        .prop_map(|(pairs, sep)| pairs.join(sep).into_bytes());
    let raw = proptest::collection::vec(
        prop_oneof![
            Just(b't'),
            Just(b'e'),
            Just(b'='),
            Just(b';'),
            Just(b' '),
            Just(b'\t'),
            Just(b','),
            Just(0xe9u8),
        ],
        0..12,
    );
    prop_oneof![3 => joined, 1 => raw]
}

proptest! {
    #[test]
    fn strip_does_what_the_plain_rule_does(
        values in proptest::collection::vec(value(), 0..3),
        ours in prop_oneof![Just("tether"), Just("t"), Just("te")],
    ) {
        let mut h = HeaderMap::new();
        for v in &values {
            if let Ok(v) = HeaderValue::from_bytes(v) {
                h.append(COOKIE, v);
            }
        }
        let mut want = h.clone();
        reference(&mut want, ours);
        cookies::strip(&mut h, ours);
        prop_assert_eq!(h, want);
    }
}
