//! The fuzz corpus replayed on stable: every input the fuzzers kept (seeds,
//! and each crash once fixed) runs through the same entry point in every
//! `cargo test`, so a regression fails CI without nightly or cargo-fuzz.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use super::*;

/// Feeds every file in `fuzz/corpus/<target>/` to `run`; names the files
/// that panicked.
fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut failed = Vec::new();
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        count += 1;
        if catch_unwind(AssertUnwindSafe(|| run(&data))).is_err() {
            failed.push(path.display().to_string());
        }
    }
    assert!(count > 0, "no corpus in {}", dir.display());
    assert!(failed.is_empty(), "panicked on {failed:?}");
}

#[test]
fn scan_corpus() {
    replay("scan", scan);
}

#[test]
fn cookie_open_corpus() {
    replay("cookie_open", cookie_open);
}

#[test]
fn checkpoint_corpus() {
    replay("checkpoint", checkpoint);
}

#[test]
fn cookie_header_corpus() {
    replay("cookie_header", cookie_header);
}

#[test]
fn config_corpus() {
    replay("config", config);
}

/// The seeds are what they claim: the committed example config is valid,
/// the committed cookie opens under the fuzz codec.
#[test]
fn seeds_reach_the_deep_paths() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let toml = std::fs::read_to_string(dir.join("config/tether.toml")).unwrap();
    Config::from_toml_str(&toml, Path::new("tether.toml")).unwrap();
    let sealed = std::fs::read_to_string(dir.join("cookie_open/sealed")).unwrap();
    let pin = codec().open(&sealed).unwrap();
    assert_eq!(pin.backend, "worker-a");
    assert_eq!(codec().open(&seal_example()), Ok(pin));
}

/// Found by the `scan` target: a first head past the limit was still due
/// when it arrived in one read but not when it arrived in several (the
/// bytes after it were counted as an HTTP/2 preface), so whether its
/// header deadline kept running depended on how the client's bytes were
/// cut. It stays due either way.
#[test]
fn an_oversized_first_head_stays_due_whatever_the_reads() {
    let mut head = b"GET / HTTP/1.1\r\nX-Long: ".to_vec();
    head.resize(1100, b'a');
    let whole = crate::server::scan_chunks(0, &[&head]);
    let pieces: Vec<&[u8]> = head.chunks(7).collect();
    assert_eq!(whole, (false, true));
    assert_eq!(crate::server::scan_chunks(0, &pieces), (false, true));
    // The fuzzer's own input, replayed through the target.
    let mut input = vec![0, 6];
    input.extend_from_slice(&head);
    scan(&input);
}
