//! Pinning: stickiness, cookie attributes, invalid cookies, key rotation,
//! request-key pins.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tether::affinity::{Codec, Pin, SessionId};
use tether::clock::ManualClock;
use tether::config::KeyMaterial;

use crate::support::*;

#[tokio::test]
async fn users_stay_on_one_worker_and_new_users_spread() {
    let (a, b, c) = (
        Worker::start("a").await,
        Worker::start("b").await,
        Worker::start("c").await,
    );
    let t = Tether::start(&config_text(&[&a, &b, &c], "")).await;
    let mut first_worker = HashMap::new();
    for u in 0..30 {
        let client = user();
        let mut seen = HashSet::new();
        for _ in 0..8 {
            let resp = client.get(t.url("/chat")).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            seen.insert(worker_of(&resp));
        }
        assert_eq!(seen.len(), 1, "user {u} reached {seen:?}");
        first_worker.insert(u, seen.into_iter().next().unwrap());
    }
    let used: HashSet<&String> = first_worker.values().collect();
    assert_eq!(
        used.len(),
        3,
        "30 new users should reach all 3 workers: {first_worker:?}"
    );
    // Each worker saw every request of its users: 8 per user.
    let total: usize = [&a, &b, &c].iter().map(|w| w.seen().len()).sum();
    assert_eq!(total, 240);
    t.stop().await;
}

#[tokio::test]
async fn cookie_attributes_and_no_resend_without_idle_timeout() {
    let a = Worker::start("a").await;
    let t = Tether::start(&config_text(&[&a], "")).await;
    let client = user();
    let first = client.get(t.url("/")).send().await.unwrap();
    let cookies = set_cookies(&first);
    assert_eq!(cookies.len(), 1, "{cookies:?}");
    let c = &cookies[0];
    for attr in ["HttpOnly", "SameSite=Lax", "Max-Age=86400", "Path=/"] {
        assert!(c.contains(attr), "{attr} missing in {c}");
    }
    assert!(!c.contains("Secure"), "plain HTTP must not get Secure: {c}");
    let second = client.get(t.url("/")).send().await.unwrap();
    assert!(
        set_cookies(&second).is_empty(),
        "cookie re-sent on a kept pin"
    );
    t.stop().await;
}

#[tokio::test]
async fn idle_timeout_reissues_the_cookie_after_refresh() {
    let a = Worker::start("a").await;
    let clock = ManualClock::new(1_800_000_000);
    let extra = "";
    let text = config_text(&[&a], extra).replace(
        "[affinity]\n",
        "[affinity]\nidle_timeout = \"30m\"\nrefresh = \"5m\"\n",
    );
    let t = Tether::start_with_clock(&text, Arc::new(clock.clone())).await;
    let client = user();
    let first = client.get(t.url("/")).send().await.unwrap();
    assert!(set_cookies(&first)[0].contains("Max-Age=1800"));
    clock.advance(60);
    let kept = client.get(t.url("/")).send().await.unwrap();
    assert!(set_cookies(&kept).is_empty(), "re-issued before refresh");
    clock.advance(300);
    let refreshed = client.get(t.url("/")).send().await.unwrap();
    assert_eq!(
        set_cookies(&refreshed).len(),
        1,
        "not re-issued after refresh"
    );
    assert_eq!(worker_of(&refreshed), "a");
    // Idle past the timeout: the pin ends, a new session starts.
    let before = tether_cookie(&refreshed).unwrap();
    clock.advance(1801);
    let expired = client.get(t.url("/")).send().await.unwrap();
    let after = tether_cookie(&expired).expect("a new pin");
    assert_ne!(before, after);
    t.stop().await;
}

fn seal_with(key: u8, pin: &Pin) -> String {
    Codec::new(&[KeyMaterial::new(vec![key; 32])], "tether").seal(pin)
}

#[tokio::test]
async fn invalid_cookies_get_a_fresh_pin_and_rotated_keys_still_open() {
    let (a, b) = (Worker::start("a").await, Worker::start("b").await);
    // Key 2 seals now; key 1 (the old one) is still listed.
    let text = config_text(&[&a, &b], "").replace(
        &format!("keys = [\"{}\"]", key_b64(1)),
        &format!("keys = [\"{}\", \"{}\"]", key_b64(2), key_b64(1)),
    );
    let clock = ManualClock::new(1_800_000_000);
    let t = Tether::start_with_clock(&text, Arc::new(clock.clone())).await;
    let now = 1_800_000_000;
    let pin = |issued: u64| Pin {
        session: SessionId([9; 16]),
        backend: "b".into(),
        instance: String::new(),
        epoch: 1,
        issued_at: issued,
        refreshed_at: issued,
    };
    let valid_old_key = seal_with(1, &pin(now));
    let mut tampered = valid_old_key.clone().into_bytes();
    tampered[30] = if tampered[30] == b'x' { b'y' } else { b'x' };
    let cases = [
        ("tampered", String::from_utf8(tampered).unwrap()),
        (
            "truncated",
            valid_old_key[..valid_old_key.len() - 10].to_owned(),
        ),
        ("garbage", "%%%garbage%%%".to_owned()),
        ("expired", seal_with(2, &pin(now - 86_400 - 1))),
        ("foreign key", seal_with(7, &pin(now))),
    ];
    let client = plain();
    for (what, value) in &cases {
        let resp = client
            .get(t.url("/"))
            .header("cookie", format!("tether={value}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{what}");
        let fresh = tether_cookie(&resp).unwrap_or_else(|| panic!("{what}: no fresh pin"));
        assert_ne!(&fresh, value, "{what}");
    }
    // A cookie sealed with the rotated-out-but-listed key opens and routes.
    for _ in 0..5 {
        let resp = client
            .get(t.url("/"))
            .header("cookie", format!("tether={valid_old_key}"))
            .send()
            .await
            .unwrap();
        assert_eq!(worker_of(&resp), "b");
        assert!(
            tether_cookie(&resp).is_none(),
            "a valid pin is kept, not re-issued"
        );
    }
    let metrics = plain()
        .get(t.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("tether_cookie_rejects_total{reason=\"expired\"} 1"),
        "{metrics}"
    );
    t.stop().await;
}

#[tokio::test]
async fn header_key_pins_without_cookies() {
    let (a, b, c) = (
        Worker::start("a").await,
        Worker::start("b").await,
        Worker::start("c").await,
    );
    let text = config_text(&[&a, &b, &c], "").replace(
        "[affinity]\n",
        "[affinity]\nkey = [\"header:x-conversation-id\", \"cookie\"]\n",
    );
    let t = Tether::start(&text).await;
    let client = plain();
    let mut used = HashSet::new();
    for conv in 0..12 {
        let mut seen = HashSet::new();
        for _ in 0..4 {
            let resp = client
                .get(t.url("/"))
                .header("x-conversation-id", format!("conv-{conv}"))
                .send()
                .await
                .unwrap();
            assert!(
                tether_cookie(&resp).is_none(),
                "header-keyed requests get no cookie"
            );
            seen.insert(worker_of(&resp));
        }
        assert_eq!(seen.len(), 1, "conversation {conv}: {seen:?}");
        used.extend(seen);
    }
    assert!(used.len() >= 2, "conversations spread: {used:?}");
    t.stop().await;
}
