//! Worker loss: kills, passive ejection, instance changes, drain, all
//! workers down, metrics, reload.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::support::*;

/// Fast probes so state changes show within a test's time.
const FAST: &str = "[health]\ninterval = \"100ms\"\ntimeout = \"200ms\"\nfall = 2\nrise = 2\n\n[passive]\nfailures = 3\ncooldown = \"1s\"\n";

/// Waits (on the paused clock) until `at`, then checks `id`'s state.
async fn state_at(t: &Tether, at: tokio::time::Instant, id: &str, want: &str, why: &str) {
    tokio::time::sleep_until(at).await;
    assert_eq!(state_of(t, id).await, want, "{why}");
}

/// Users pinned per worker: (client, worker id).
async fn pinned_users(t: &Tether, n: usize) -> Vec<(reqwest::Client, String)> {
    let mut users = Vec::new();
    for _ in 0..n {
        let c = user();
        let r = c.get(t.url("/")).send().await.unwrap();
        let w = worker_of(&r);
        users.push((c, w));
    }
    users
}

#[tokio::test]
async fn killed_worker_users_move_and_others_stay() {
    let (mut a, b, c) = (
        Worker::start("a").await,
        Worker::start("b").await,
        Worker::start("c").await,
    );
    let t = Tether::start(&config_text(&[&a, &b, &c], "")).await;
    let users = pinned_users(&t, 24).await;
    assert!(users.iter().any(|(_, w)| w == "a"));
    a.kill();
    for (client, before) in &users {
        let resp = client.get(t.url("/")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let now = worker_of(&resp);
        if before == "a" {
            assert_ne!(now, "a");
            assert!(
                tether_cookie(&resp).is_some(),
                "a moved user gets a new cookie"
            );
        } else {
            assert_eq!(&now, before, "a user of a live worker moved");
            assert!(tether_cookie(&resp).is_none());
        }
    }
    // The moved users stay on their new worker.
    for (client, before) in users.iter().filter(|(_, w)| w == "a") {
        let first = worker_of(&client.get(t.url("/")).send().await.unwrap());
        let again = worker_of(&client.get(t.url("/")).send().await.unwrap());
        assert_eq!(first, again, "moved user of {before} flaps");
    }
    t.stop().await;
}

#[tokio::test]
async fn post_refused_at_connect_is_retried_once_and_arrives_once() {
    let (mut a, b) = (Worker::start("a").await, Worker::start("b").await);
    let t = Tether::start(&config_text(&[&a, &b], "")).await;
    let users = pinned_users(&t, 8).await;
    let (client, _) = users.iter().find(|(_, w)| w == "a").expect("a user on a");
    a.kill();
    let resp = client
        .post(t.url("/order"))
        .body("one")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(worker_of(&resp), "b");
    assert_eq!(b.count("POST", "/order"), 1);
    assert_eq!(b.seen().last().unwrap().body, "one");
    assert_eq!(b.seen().last().unwrap().headers["tether-epoch"], "2");
    t.stop().await;
}

#[tokio::test]
async fn after_the_worker_received_it_post_is_not_retried_but_get_is() {
    let (a, b) = (Worker::start("a").await, Worker::start("b").await);
    let t = Tether::start(&config_text(&[&a, &b], "")).await;
    let users = pinned_users(&t, 8).await;
    let (client, _) = users.iter().find(|(_, w)| w == "a").expect("a user on a");
    let post = client
        .post(t.url("/pay?die=a"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 502);
    assert_eq!(a.count("POST", "/pay"), 1);
    assert_eq!(
        b.count("POST", "/pay"),
        0,
        "a non-idempotent request was retried"
    );

    let keyed = client
        .post(t.url("/pay2?die=a"))
        .header("idempotency-key", "k1")
        .body("y")
        .send()
        .await
        .unwrap();
    assert_eq!(keyed.status(), 200, "Idempotency-Key makes a retry safe");
    assert_eq!(b.count("POST", "/pay2"), 1);
    assert_eq!(b.seen().last().unwrap().body, "y");

    let (client2, _) = users.iter().rfind(|(_, w)| w == "a").unwrap();
    let get = client2.get(t.url("/read?die=a")).send().await.unwrap();
    assert_eq!(get.status(), 200);
    assert_eq!(worker_of(&get), "b");
    t.stop().await;
}

/// The default timings (probes every 2 s, `fall` 3, `rise` 2, three 5xx
/// open the circuit for 30 s, doubling) on a paused tokio clock: the state is
/// read at exact points of virtual time, and the test takes no real minutes.
#[tokio::test]
async fn a_500_never_ejects_but_confirmed_503s_do_for_a_doubling_cooldown() {
    let (a, b) = (Worker::start("a").await, Worker::start("b").await);
    let t = Tether::start(&config_text(&[&a, &b], "")).await;
    let users = pinned_users(&t, 10).await;
    let on_a: Vec<&reqwest::Client> = users
        .iter()
        .filter(|(_, w)| w == "a")
        .map(|(c, _)| c)
        .collect();
    assert!(on_a.len() >= 2, "least-sessions puts half the users on a");
    tokio::time::pause();
    let get = |c: &reqwest::Client| c.get(t.url("/")).send();

    a.set_status(500);
    for _ in 0..10 {
        assert_eq!(get(on_a[0]).await.unwrap().status(), 500);
    }
    assert_eq!(state_of(&t, "a").await, "up", "500 must not eject");

    // Three 503s while its probes stay healthy: a client may have provoked
    // them (a busy conversation, a rate limit), so the confirming probe
    // keeps the worker.
    a.set_status(503);
    for _ in 0..3 {
        assert_eq!(get(on_a[0]).await.unwrap().status(), 503);
    }
    for _ in 0..5 {
        tokio::task::yield_now().await;
    }
    assert_eq!(state_of(&t, "a").await, "up", "a probe must confirm");

    // Three 503s and a failing probe eject a for the 30 s cooldown.
    // (No request here may re-pin: a re-pin reads the store, and while the
    // runtime waits on the store's thread the paused clock runs ahead.)
    a.set_health(503);
    for _ in 0..3 {
        assert_eq!(get(on_a[0]).await.unwrap().status(), 503);
    }
    wait_state(&t, "a", "down").await;
    let ejected = tokio::time::Instant::now();
    a.set_status(200);
    a.set_health(200);
    state_at(
        &t,
        ejected + Duration::from_secs(25),
        "a",
        "down",
        "still ejected at 25 s",
    )
    .await;
    state_at(
        &t,
        ejected + Duration::from_secs(35),
        "a",
        "up",
        "back after the 30 s cooldown",
    )
    .await;

    // Ejected again before a healthy probe streak forgave it: 60 s. Its
    // probes fail too this time, so it needs `rise` good probes at the end.
    let again = on_a[1];
    assert_eq!(worker_of(&get(again).await.unwrap()), "a");
    a.set_status(503);
    a.set_health(503);
    for _ in 0..3 {
        assert_eq!(get(again).await.unwrap().status(), 503);
    }
    let ejected = tokio::time::Instant::now();
    a.set_status(200);
    state_at(
        &t,
        ejected + Duration::from_secs(50),
        "a",
        "down",
        "the second cooldown doubles",
    )
    .await;
    state_at(
        &t,
        ejected + Duration::from_secs(62),
        "a",
        "down",
        "past the cooldown, failing probes keep it down",
    )
    .await;
    a.set_health(200);
    state_at(
        &t,
        ejected + Duration::from_secs(68),
        "a",
        "up",
        "back after `rise` good probes",
    )
    .await;
    let m = metrics(&t).await;
    assert_eq!(
        sample(&m, "tether_ejections_total", &[("backend", "a")]),
        Some(2.0)
    );
    t.stop().await;
}

#[tokio::test]
async fn the_last_worker_is_never_ejected_passively() {
    let a = Worker::start("a").await;
    let t = Tether::start(&config_text(&[&a], FAST)).await;
    a.set_status(503);
    for _ in 0..6 {
        assert_eq!(plain().get(t.url("/")).send().await.unwrap().status(), 503);
    }
    assert_eq!(state_of(&t, "a").await, "up");
    t.stop().await;
}

#[tokio::test]
async fn a_restarted_worker_with_a_new_instance_is_seen() {
    let mut a = Worker::start_at("a", "127.0.0.1:0".parse().unwrap(), Some("one")).await;
    let b = Worker::start("b").await;
    let t = Tether::start(&config_text(&[&a, &b], FAST)).await;
    let addr = a.addr;
    eventually_async(|| async { backends(&t).await["a"]["instance"] == "one" }).await;
    a.kill();
    let _a2 = Worker::start_at("a", addr, Some("two")).await;
    eventually_async(|| async { backends(&t).await["a"]["instance"] == "two" }).await;
    let m = metrics(&t).await;
    assert_eq!(
        sample(&m, "tether_instance_changes_total", &[("backend", "a")]),
        Some(1.0)
    );
    t.stop().await;
}

#[tokio::test]
async fn drain_stops_new_sessions_but_keeps_pinned_users() {
    let (a, b) = (Worker::start("a").await, Worker::start("b").await);
    let t = Tether::start(&config_text(&[&a, &b], "")).await;
    let users = pinned_users(&t, 10).await;
    let (on_a, _) = users.iter().find(|(_, w)| w == "a").expect("a user on a");
    let r = plain()
        .post(t.admin_url("/backends/a/drain"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(state_of(&t, "a").await, "draining");
    for _ in 0..20 {
        let r = plain().get(t.url("/")).send().await.unwrap();
        assert_eq!(
            worker_of(&r),
            "b",
            "a new session landed on a draining worker"
        );
    }
    for _ in 0..3 {
        assert_eq!(worker_of(&on_a.get(t.url("/")).send().await.unwrap()), "a");
    }
    plain()
        .post(t.admin_url("/backends/a/undrain"))
        .send()
        .await
        .unwrap();
    let mut reached = HashSet::new();
    for _ in 0..20 {
        reached.insert(worker_of(&plain().get(t.url("/")).send().await.unwrap()));
    }
    assert!(
        reached.contains("a"),
        "undrained worker gets new sessions again"
    );
    let missing = plain()
        .post(t.admin_url("/backends/nope/drain"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    t.stop().await;
}

#[tokio::test]
async fn all_workers_down_gives_fast_503_and_not_ready() {
    let (mut a, mut b) = (Worker::start("a").await, Worker::start("b").await);
    let t = Tether::start(&config_text(&[&a, &b], FAST)).await;
    assert_eq!(
        plain()
            .get(t.admin_url("/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    a.kill();
    b.kill();
    wait_state(&t, "a", "down").await;
    wait_state(&t, "b", "down").await;
    let ready = plain().get(t.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert!(body["reasons"][0].as_str().unwrap().contains("no worker"));
    let start = Instant::now();
    let resp = plain().get(t.url("/")).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "503 took {:?}",
        start.elapsed()
    );
    assert_eq!(
        plain()
            .get(t.admin_url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    t.stop().await;
}

#[tokio::test]
async fn metrics_parse_and_have_the_series() {
    let (mut a, b) = (Worker::start("a").await, Worker::start("b").await);
    let t = Tether::start(&config_text(&[&a, &b], FAST)).await;
    let users = pinned_users(&t, 6).await;
    plain()
        .get(t.url("/"))
        .header("cookie", "tether=garbage")
        .send()
        .await
        .unwrap();
    a.kill();
    for (c, _) in &users {
        c.get(t.url("/")).send().await.unwrap();
    }
    wait_state(&t, "a", "down").await;
    let mut m = metrics(&t).await;
    for _ in 0..100 {
        if sample(
            &m,
            "tether_probes_total",
            &[("backend", "a"), ("result", "fail")],
        )
        .is_some()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        m = metrics(&t).await;
    }
    let total: f64 = m
        .samples
        .iter()
        .filter(|s| s.metric == "tether_requests_total")
        .map(|s| value(&s.value))
        .sum();
    assert!(total >= 13.0, "requests counted: {total}");
    assert!(sample(
        &m,
        "tether_requests_total",
        &[("class", "2xx"), ("backend", "b")]
    )
    .is_some());
    assert_eq!(
        sample(&m, "tether_backend_up", &[("backend", "a")]),
        Some(0.0)
    );
    assert_eq!(
        sample(&m, "tether_backend_up", &[("backend", "b")]),
        Some(1.0)
    );
    assert!(sample(&m, "tether_backend_sessions", &[("backend", "b")]).unwrap() >= 1.0);
    assert!(
        sample(&m, "tether_repins_total", &[("reason", "failed")]).unwrap_or(0.0)
            + sample(&m, "tether_repins_total", &[("reason", "down")]).unwrap_or(0.0)
            >= 1.0
    );
    assert_eq!(
        sample(
            &m,
            "tether_cookie_rejects_total",
            &[("reason", "malformed")]
        ),
        Some(1.0)
    );
    assert!(sample(
        &m,
        "tether_probes_total",
        &[("backend", "a"), ("result", "fail")]
    )
    .is_some());
    assert!(m
        .samples
        .iter()
        .any(|s| s.metric == "tether_request_duration_seconds_count"));
    t.stop().await;
}

#[tokio::test]
async fn reload_adds_and_removes_workers_without_cutting_streams() {
    let (a, b) = (Worker::start("a").await, Worker::start("b").await);
    let t = Tether::start(&config_text(&[&a, &b], "")).await;
    let users = pinned_users(&t, 10).await;
    // An SSE stream on b, open across the reload.
    let mut sse = None;
    for (c, w) in &users {
        if w == "b" {
            sse = Some(c.get(t.url("/sse")).send().await.unwrap());
            break;
        }
    }
    let mut sse = sse.expect("a user on b");
    let first = sse.chunk().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("event 0"));

    let d = Worker::start("d").await;
    t.handle()
        .reload(config(&config_text(&[&b, &d], "")))
        .unwrap();

    let mut rest = String::new();
    while let Some(chunk) = sse.chunk().await.unwrap() {
        rest.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert_eq!(
        rest.matches("data: b event").count(),
        4,
        "stream cut by reload: {rest}"
    );
    for (c, w) in &users {
        let r = c.get(t.url("/")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        if w == "a" {
            assert_ne!(worker_of(&r), "a", "removed worker still reached");
            assert!(tether_cookie(&r).is_some());
        } else {
            assert_eq!(&worker_of(&r), w);
        }
    }
    let mut reached = HashSet::new();
    for _ in 0..20 {
        reached.insert(worker_of(&plain().get(t.url("/")).send().await.unwrap()));
    }
    assert!(
        reached.contains("d"),
        "added worker gets new sessions: {reached:?}"
    );
    assert!(!backends(&t).await.contains_key("a"));
    t.stop().await;
}

async fn metrics(t: &Tether) -> prometheus_parse::Scrape {
    let text = plain()
        .get(t.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    prometheus_parse::Scrape::parse(lines).unwrap()
}

fn value(v: &prometheus_parse::Value) -> f64 {
    match v {
        prometheus_parse::Value::Counter(x)
        | prometheus_parse::Value::Gauge(x)
        | prometheus_parse::Value::Untyped(x) => *x,
        _ => f64::NAN,
    }
}

fn sample(m: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    m.samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| value(&s.value))
}

async fn eventually_async<F, Fut>(mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..200 {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("condition never held");
}

#[tokio::test]
async fn dns_discovery_finds_workers() {
    let a = Worker::start("a").await;
    let text = config_text(
        &[],
        &format!(
            "[discovery]\ndns = \"localhost\"\nport = {}\ninterval = \"200ms\"\n",
            a.addr.port()
        ),
    );
    let t = Tether::start(&text).await;
    let id = format!("127.0.0.1:{}", a.addr.port());
    eventually_async(|| async { backends(&t).await.contains_key(&id) }).await;
    let resp = plain().get(t.url("/")).send().await.unwrap();
    // localhost may also resolve to ::1, where nothing listens: a request
    // that lands there is retried on the IPv4 worker.
    assert_eq!(resp.status(), 200);
    assert_eq!(worker_of(&resp), "a");

    // A reload (SIGHUP) replaces the declared part only: the discovered
    // worker is still there at once, not after the next lookup.
    t.handle()
        .reload(config(&with_store(&text, t.dir.path())))
        .unwrap();
    assert!(
        backends(&t).await.contains_key(&id),
        "reload dropped discovered workers"
    );
    // Turning discovery off needs a restart; the running config stays.
    let without = config(&with_store(&config_text(&[&a], ""), t.dir.path()));
    let refused = t.handle().reload(without).unwrap_err().to_string();
    assert!(refused.contains("[discovery]"), "{refused}");
    let resp = plain().get(t.url("/")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(worker_of(&resp), "a");
    t.stop().await;
}
