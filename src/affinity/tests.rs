use std::time::Duration;

use super::*;
use crate::config::{KeyMaterial, OnWorkerLoss};

mod codec_props;
mod strip_props;

fn key(b: u8) -> KeyMaterial {
    KeyMaterial::new(vec![b; 32])
}

fn pin(now: u64) -> Pin {
    Pin {
        session: SessionId([7; 16]),
        backend: "worker-a".into(),
        instance: "inst-1".into(),
        epoch: 3,
        issued_at: now,
        refreshed_at: now,
    }
}

#[test]
fn seal_then_open_round_trips() {
    let c = Codec::new(&[key(1)], "tether");
    let p = pin(1_700_000_000);
    assert_eq!(c.open(&c.seal(&p)), Ok(p));
}

#[test]
fn two_seals_of_one_pin_differ() {
    // A fresh nonce per seal: cookies do not reveal that two pins are equal.
    let c = Codec::new(&[key(1)], "tether");
    let p = pin(1);
    assert_ne!(c.seal(&p), c.seal(&p));
}

#[test]
fn rotated_key_still_opens_and_new_key_seals() {
    let old = Codec::new(&[key(1)], "tether");
    let rotated = Codec::new(&[key(2), key(1)], "tether");
    let p = pin(5);
    assert_eq!(rotated.open(&old.seal(&p)), Ok(p.clone()));
    // The first key seals: a codec with only the old key cannot open it.
    assert_eq!(
        old.open(&rotated.seal(&p)),
        Err(RejectReason::Undecryptable)
    );
}

#[test]
fn rejects_tampered_truncated_garbage_and_foreign() {
    let c = Codec::new(&[key(1)], "tether");
    let sealed = c.seal(&pin(9));
    let mut bytes = sealed.clone().into_bytes();
    let mid = bytes.len() / 2;
    bytes[mid] = if bytes[mid] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(bytes).unwrap();
    // Truncated but still valid base64: the tag no longer authenticates.
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let raw = b64.decode(&sealed).unwrap();
    let truncated = b64.encode(&raw[..raw.len() - 3]);
    let cases = [
        (tampered.as_str(), RejectReason::Undecryptable),
        (truncated.as_str(), RejectReason::Undecryptable),
        (&sealed[..20], RejectReason::Malformed),
        ("not base64 at all!!", RejectReason::Malformed),
        ("", RejectReason::Malformed),
    ];
    for (value, want) in cases {
        assert_eq!(c.open(value), Err(want), "value {value:?}");
    }
    let foreign = Codec::new(&[key(3)], "tether");
    assert_eq!(foreign.open(&sealed), Err(RejectReason::Undecryptable));
}

#[test]
fn values_are_opened_on_the_stack_up_to_their_longest() {
    let c = Codec::new(&[key(1)], "tether");
    // The longest record tether seals opens from its stack buffers.
    let mut long = pin(1);
    long.backend = "b".repeat(255);
    long.instance = "i".repeat(255);
    assert_eq!(c.open(&c.seal(&long)), Ok(long));
    // Values that fill the buffer exactly, or would overflow it.
    for (len, want) in [
        (1023, RejectReason::Undecryptable),
        (1024, RejectReason::Undecryptable),
        (1025, RejectReason::Malformed),
        (4096, RejectReason::Malformed),
    ] {
        assert_eq!(c.open(&"A".repeat(len)), Err(want), "{len} chars");
    }
}

#[test]
fn the_open_cache_answers_only_the_same_value_under_the_same_codec_and_checks_life() {
    let day = Lifetimes {
        ttl: Duration::from_secs(86_400),
        idle_timeout: None,
        refresh: Duration::from_secs(3600),
    };
    let c = Codec::new(&[key(1)], "tether");
    let cache = OpenCache::default();
    let p = pin(1000);
    let value = c.seal(&p);
    assert_eq!(
        c.open_alive_cached(&value, &day, 1000, &cache),
        Ok(p.clone())
    );
    assert_eq!(
        c.open_alive_cached(&value, &day, 2000, &cache),
        Ok(p.clone())
    );
    // A hit is still checked for life.
    assert_eq!(
        c.open_alive_cached(&value, &day, 1000 + 86_400, &cache),
        Err(RejectReason::Expired)
    );
    // Another value is opened, not answered from the cache.
    let mut tampered = value.clone().into_bytes();
    tampered[value.len() / 2] ^= 1;
    let tampered = String::from_utf8(tampered).unwrap();
    assert_ne!(
        c.open_alive_cached(&tampered, &day, 1000, &cache).ok(),
        Some(p.clone())
    );
    // A reload with other keys makes a new codec: the value cached under
    // the old one must not open under it.
    assert_eq!(
        c.open_alive_cached(&value, &day, 1000, &cache),
        Ok(p.clone())
    );
    let reloaded = Codec::new(&[key(2)], "tether");
    assert_eq!(
        reloaded.open_alive_cached(&value, &day, 1000, &cache),
        Err(RejectReason::Undecryptable)
    );
}

#[test]
fn a_cookie_is_bound_to_its_name() {
    let a = Codec::new(&[key(1)], "tether");
    let b = Codec::new(&[key(1)], "other");
    assert_eq!(b.open(&a.seal(&pin(1))), Err(RejectReason::Undecryptable));
}

#[test]
fn lifetimes_ttl_idle_and_refresh() {
    let day = Duration::from_secs(86_400);
    let l = Lifetimes {
        ttl: day,
        idle_timeout: None,
        refresh: Duration::from_secs(3600),
    };
    let p = pin(1000);
    assert!(l.is_alive(&p, 1000));
    assert!(l.is_alive(&p, 1000 + 86_399));
    assert!(!l.is_alive(&p, 1000 + 86_400));
    assert!(
        !l.needs_refresh(&p, 1000 + 80_000),
        "no idle timeout: never re-issued"
    );
    assert_eq!(l.max_age(&p, 1000), 86_400);

    let idle = Lifetimes {
        idle_timeout: Some(Duration::from_secs(1800)),
        ..l
    };
    assert!(idle.is_alive(&p, 1000 + 1799));
    assert!(!idle.is_alive(&p, 1000 + 1800));
    assert!(!idle.needs_refresh(&p, 1000 + 100));
    let q = Pin {
        refreshed_at: 1000 + 86_000,
        ..p.clone()
    };
    assert!(idle.needs_refresh(&q, 1000 + 86_000 + 3600));
    // Max-Age is the smaller of idle and the remaining absolute life.
    assert_eq!(idle.max_age(&p, 1000), 1800);
    assert_eq!(idle.max_age(&q, 1000 + 86_000), 400);
}

#[test]
fn decision_table() {
    use Decision::*;
    use PinnedState::*;
    let cases = [
        (None, OnWorkerLoss::Move, NewSession),
        (Some(Usable), OnWorkerLoss::Move, Keep),
        (Some(Down), OnWorkerLoss::Move, Move(MoveReason::Down)),
        (Some(Removed), OnWorkerLoss::Move, Move(MoveReason::Removed)),
        (None, OnWorkerLoss::Fail, NewSession),
        (Some(Usable), OnWorkerLoss::Fail, Keep),
        (Some(Down), OnWorkerLoss::Fail, Unavailable),
        (Some(Removed), OnWorkerLoss::Fail, Move(MoveReason::Removed)),
        (Some(Drained), OnWorkerLoss::Move, Move(MoveReason::Drained)),
        (Some(Drained), OnWorkerLoss::Fail, Move(MoveReason::Drained)),
    ];
    for (state, loss, want) in cases {
        assert_eq!(decide(state, loss), want, "{state:?} {loss:?}");
    }
}

#[test]
fn cookie_find_and_strip_keep_other_cookies() {
    use http::header::{HeaderMap, HeaderValue, COOKIE};
    let mut h = HeaderMap::new();
    h.append(COOKIE, HeaderValue::from_static("a=1; tether=XYZ; b=2"));
    h.append(COOKIE, HeaderValue::from_static("tether=second"));
    assert_eq!(
        cookies::find(&h, "tether").collect::<Vec<_>>(),
        ["XYZ", "second"]
    );
    cookies::strip(&mut h, "tether");
    let left: Vec<_> = h.get_all(COOKIE).iter().collect();
    assert_eq!(left, vec![HeaderValue::from_static("a=1; b=2")]);

    let mut only = HeaderMap::new();
    only.insert(COOKIE, HeaderValue::from_static("tether=x"));
    cookies::strip(&mut only, "tether");
    assert!(!only.contains_key(COOKIE));
}

#[test]
fn pin_table_is_bounded() {
    let t = pins::PinTable::new(64);
    for i in 0..1000u64 {
        t.insert(Pin {
            session: SessionId::for_key(&format!("key-{i}")),
            refreshed_at: i,
            ..pin(i)
        });
    }
    assert!(t.len() <= 64, "len {}", t.len());
    // The most recent key survives eviction.
    assert!(t.get(SessionId::for_key("key-999")).is_some());
}

/// Live-session counts per worker follow the pins' lives: the janitor's
/// sweep (on the clock the pins use) forgets expired sessions and pins,
/// so least-sessions balancing and `/backends` see live counts.
#[test]
fn the_sweep_keeps_per_worker_counts_live() {
    use std::sync::Arc;

    use crate::backends::Backend;
    use crate::clock::{Clock, ManualClock};
    use crate::config::BackendConfig;

    let clock = ManualClock::new(1_800_000_000);
    let backend = |id: &str| {
        Arc::new(Backend::new(&BackendConfig {
            id: id.into(),
            url: "http://127.0.0.1:9".parse().unwrap(),
            weight: 1,
            max_inflight: None,
        }))
    };
    let (a, b) = (backend("a"), backend("b"));
    let lifetimes = Lifetimes {
        ttl: Duration::from_secs(3600),
        idle_timeout: Some(Duration::from_secs(600)),
        refresh: Duration::from_secs(60),
    };
    let s = sessions::Sessions::new(1000);
    let now = clock.now_unix();
    for i in 0..10u8 {
        let id = SessionId([i; 16]);
        // Half idle-expire in 600 s, half are refreshed later.
        s.touch(id, if i % 2 == 0 { &a } else { &b }, now + 600, now);
    }
    s.touch(SessionId([0; 16]), &b, now + 600, now); // moved a -> b
    assert_eq!((a.sessions(), b.sessions()), (4, 6));
    s.set_pin(Pin {
        session: SessionId::for_key("conv-1"),
        ..pin(now)
    });

    clock.advance(300);
    let later = clock.now_unix();
    for i in [1u8, 3] {
        s.touch(SessionId([i; 16]), &b, later + 600, later);
    }
    assert_eq!(
        s.sweep(clock.now_unix(), &lifetimes),
        0,
        "nothing expired yet"
    );

    clock.advance(301);
    assert_eq!(s.sweep(clock.now_unix(), &lifetimes), 8);
    assert_eq!(
        (a.sessions(), b.sessions()),
        (0, 2),
        "only the refreshed two live"
    );
    assert!(
        s.pin("conv-1").is_none(),
        "an idle request-key pin is forgotten too"
    );
    assert_eq!(s.len(), 2);
}
