//! Properties of the sealed cookie, over arbitrary pins: a seal opens to the
//! same pin, no single flipped bit gets through, and a pin lives exactly
//! until its ttl or idle timeout on the injected clock.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use proptest::prelude::*;

use super::super::*;
use super::key;
use crate::clock::{Clock, ManualClock};

fn codec() -> Codec {
    Codec::new(&[key(1), key(2)], "tether")
}

prop_compose! {
    /// Any pin whose strings fit the record (ids ≤ 200 bytes and instance
    /// tags ≤ 128 bytes are all tether ever seals; 60 chars ≤ 240 bytes).
    fn any_pin()(
        session in any::<[u8; 16]>(),
        backend in "\\PC{0,60}",
        instance in "\\PC{0,60}",
        epoch in any::<u64>(),
        issued_at in any::<u64>(),
        refreshed_at in any::<u64>(),
    ) -> Pin {
        Pin { session: SessionId(session), backend, instance, epoch, issued_at, refreshed_at }
    }
}

proptest! {
    #[test]
    fn seal_then_open_gives_back_the_pin(p in any_pin()) {
        let c = codec();
        prop_assert_eq!(c.open(&c.seal(&p)), Ok(p.clone()));
        // The second key opens it too once a new key is prepended.
        let rotated = Codec::new(&[key(3), key(1)], "tether");
        prop_assert_eq!(rotated.open(&c.seal(&p)), Ok(p));
    }

    /// Longer strings are cut to at most 255 bytes at a char boundary: the
    /// record stays decodable and opens to a prefix.
    #[test]
    fn overlong_strings_open_as_a_prefix(p in any_pin(), long in "\\PC{200,400}") {
        let c = codec();
        let p = Pin { backend: long.clone(), ..p };
        let opened = c.open(&c.seal(&p));
        prop_assert!(opened.is_ok(), "{:?}", opened);
        let backend = opened.map(|o| o.backend).unwrap_or_default();
        prop_assert!(long.starts_with(&backend));
        if long.len() <= 255 {
            prop_assert_eq!(backend, long);
        } else {
            // Cut at most one char (≤ 4 bytes) short of the 255-byte limit.
            prop_assert!(backend.len() <= 255 && backend.len() > 251, "{}", backend.len());
        }
    }

    #[test]
    fn any_flipped_bit_of_the_sealed_bytes_is_rejected(p in any_pin(), bit in any::<prop::sample::Index>()) {
        let c = codec();
        let mut raw = URL_SAFE_NO_PAD.decode(c.seal(&p)).unwrap();
        let i = bit.index(raw.len() * 8);
        raw[i / 8] ^= 1 << (i % 8);
        prop_assert_eq!(c.open(&URL_SAFE_NO_PAD.encode(&raw)), Err(RejectReason::Undecryptable));
    }

    /// Flips in the cookie text itself (low seven bits keep it ASCII): a
    /// non-alphabet character, a different byte, or non-canonical trailing
    /// bits, never an accepted cookie.
    #[test]
    fn any_flipped_bit_of_the_cookie_text_is_rejected(p in any_pin(), bit in any::<prop::sample::Index>()) {
        let c = codec();
        let mut text = c.seal(&p).into_bytes();
        let i = bit.index(text.len() * 7);
        text[i / 7] ^= 1 << (i % 7);
        let text = String::from_utf8(text).unwrap();
        prop_assert!(c.open(&text).is_err(), "{text}");
    }

    /// Valid the second before the ttl ends, expired from its end on.
    #[test]
    fn a_pin_lives_until_its_ttl(
        p in any_pin(),
        issued in 0u64..4_000_000_000,
        ttl in 1u64..100_000_000,
        after in 0u64..1_000_000_000,
    ) {
        let c = codec();
        let lifetimes = Lifetimes { ttl: Duration::from_secs(ttl), idle_timeout: None, refresh: Duration::from_secs(60) };
        let p = Pin { issued_at: issued, refreshed_at: issued, ..p };
        let cookie = c.seal(&p);
        let clock = ManualClock::new(issued);
        prop_assert_eq!(c.open_alive(&cookie, &lifetimes, clock.now_unix()), Ok(p.clone()));
        clock.advance(ttl - 1);
        prop_assert_eq!(c.open_alive(&cookie, &lifetimes, clock.now_unix()), Ok(p.clone()));
        clock.advance(1);
        prop_assert_eq!(c.open_alive(&cookie, &lifetimes, clock.now_unix()), Err(RejectReason::Expired));
        clock.advance(after);
        prop_assert_eq!(c.open_alive(&cookie, &lifetimes, clock.now_unix()), Err(RejectReason::Expired));
    }

    /// With an idle timeout, a pin dies at `refreshed_at + idle` even with
    /// ttl to spare, and lives the second before.
    #[test]
    fn a_pin_lives_until_its_idle_timeout(
        p in any_pin(),
        issued in 0u64..4_000_000_000,
        since_issue in 0u64..1_000_000,
        idle in 1u64..1_000_000,
    ) {
        let c = codec();
        let lifetimes = Lifetimes {
            ttl: Duration::from_secs(since_issue + idle + 1),
            idle_timeout: Some(Duration::from_secs(idle)),
            refresh: Duration::from_secs(60),
        };
        let refreshed = issued + since_issue;
        let p = Pin { issued_at: issued, refreshed_at: refreshed, ..p };
        let cookie = c.seal(&p);
        let clock = ManualClock::new(refreshed + idle - 1);
        prop_assert_eq!(c.open_alive(&cookie, &lifetimes, clock.now_unix()), Ok(p.clone()));
        clock.advance(1);
        prop_assert_eq!(c.open_alive(&cookie, &lifetimes, clock.now_unix()), Err(RejectReason::Expired));
    }
}
