//! Entry points for the fuzz targets in `fuzz/` (built with the `fuzzing`
//! feature) and for the stable test that replays their corpus. Not an API:
//! each function takes the fuzzer's raw bytes, drives one parser that sees
//! client-, worker- or operator-controlled input, and panics only when an
//! invariant breaks (a panic is what the fuzzer reports).
//!
//! Input layouts, so corpus files can be written by hand:
//! - [`scan`]: byte 0 picks the head limit (`b0 * 16`), byte 1 the read
//!   size (`b1 % 32 + 1`); the rest is the client's byte stream.
//! - [`cookie_header`]: `Cookie` header values separated by `\n`.
//! - the others: the text itself.

use std::path::Path;

use http::header::{HeaderMap, HeaderValue, COOKIE};

use crate::affinity::{cookies, Codec, RejectReason};
use crate::config::{Config, KeyMaterial};

/// The cookie name every target uses.
const COOKIE_NAME: &str = "tether";

/// A codec with two fixed keys (the first seals, both open), so corpus
/// cookies sealed by [`seal_example`] keep opening.
fn codec() -> Codec {
    Codec::new(
        &[KeyMaterial::new(vec![7; 32]), KeyMaterial::new(vec![9; 32])],
        COOKIE_NAME,
    )
}

/// The HTTP/1 head scanner: whatever the bytes, it must not panic, and its
/// verdict must not depend on how the stream was cut into reads.
pub fn scan(data: &[u8]) {
    let [limit, read, stream @ ..] = data else {
        return;
    };
    let limit = usize::from(*limit) * 16;
    let read = usize::from(*read) % 32 + 1;
    let whole = crate::server::scan_chunks(limit, &[stream]);
    let pieces: Vec<&[u8]> = stream.chunks(read).collect();
    let split = crate::server::scan_chunks(limit, &pieces);
    assert_eq!(whole, split, "one read vs reads of {read} bytes");
    let bytes: Vec<&[u8]> = stream.chunks(1).collect();
    let single = crate::server::scan_chunks(limit, &bytes);
    assert_eq!(whole, single, "one read vs one byte at a time");
}

/// Opening a cookie value: never panics; anything that opens is a record
/// the codec itself wrote, so sealing it again round-trips. The bytes are
/// also parsed as a decrypted record (the fuzzer cannot forge a tag to get
/// there): whatever parses seals and opens back to itself.
pub fn cookie_open(data: &[u8]) {
    let codec = codec();
    if let Some(pin) = crate::affinity::codec::decode_record(data) {
        assert_eq!(codec.open(&codec.seal(&pin)), Ok(pin));
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match codec.open(text) {
        Ok(pin) => assert_eq!(codec.open(&codec.seal(&pin)), Ok(pin)),
        Err(RejectReason::Expired) => panic!("open never checks expiry"),
        Err(_) => {}
    }
}

/// `Tether-Checkpoint` parsing: never panics, bounded, no empty threads.
pub fn checkpoint(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let items = crate::continuity::capture::parse_checkpoint(text);
    assert!(items.len() <= 64, "{} items", items.len());
    for (thread, _) in &items {
        assert!(!thread.is_empty() && thread.trim() == thread, "{thread:?}");
        assert!(!thread.contains([',', ';']), "{thread:?}");
    }
}

/// Finding and stripping the affinity cookie among `Cookie` headers: after
/// [`cookies::strip`] no affinity cookie is left for a worker to see, and
/// every other cookie is.
pub fn cookie_header(data: &[u8]) {
    let mut headers = HeaderMap::new();
    for value in data.split(|&b| b == b'\n') {
        if let Ok(v) = HeaderValue::from_bytes(value) {
            headers.append(COOKIE, v);
        }
    }
    let codec = codec();
    for value in cookies::find(&headers, COOKIE_NAME) {
        // What the router does with each value found.
        let _ = codec.open(value);
    }
    let others = |h: &HeaderMap| -> Vec<String> {
        h.get_all(COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|t| t.split(';'))
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .filter(|p| p.split_once('=').map(|(k, _)| k.trim()) != Some(COOKIE_NAME))
            .map(str::to_owned)
            .collect()
    };
    let before = others(&headers);
    cookies::strip(&mut headers, COOKIE_NAME);
    assert!(
        cookies::find(&headers, COOKIE_NAME).next().is_none(),
        "left in"
    );
    assert_eq!(others(&headers), before, "other cookies changed");
}

/// TOML text to a validated [`Config`]: an error, never a panic.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = Config::from_toml_str(text, Path::new("fuzz.toml"));
}

/// A cookie value sealed by the fuzz codec (for seeding the corpus).
pub fn seal_example() -> String {
    codec().seal(&crate::affinity::Pin {
        session: crate::affinity::SessionId([0x5a; 16]),
        backend: "worker-a".into(),
        instance: "inst-1".into(),
        epoch: 3,
        issued_at: 1_800_000_000,
        refreshed_at: 1_800_000_600,
    })
}

#[cfg(test)]
mod tests;
