//! Admission control: per-worker `max_inflight` with a sticky FIFO queue,
//! and rate limits (`[[rate_limits]]`), seen from clients.

use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::support::*;

/// `(in_flight, queued)` of a worker as `/backends` shows them.
async fn slots(t: &Tether, id: &str) -> (u64, u64) {
    let b = &backends(t).await[id];
    (
        b["in_flight"].as_u64().unwrap(),
        b["queued"].as_u64().unwrap(),
    )
}

/// Waits (bounded, 5 s) until a worker's `(in_flight, queued)` is `want`.
async fn wait_slots(t: &Tether, id: &str, want: (u64, u64)) {
    let mut last = (0, 0);
    for _ in 0..200 {
        last = slots(t, id).await;
        if last == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{id}: (in_flight, queued) stayed {last:?}, never {want:?}");
}

/// A `[[backends]]` entry with its own `max_inflight`.
fn limited(w: &Worker, n: u32) -> String {
    format!("{}\nmax_inflight = {n}\n\n", w.toml().trim_end())
}

fn text_with(entries: &[String], extra: &str) -> String {
    let base = config_text(&[], "");
    format!("{base}{}{extra}", entries.concat())
}

/// The `n` query values in the order the worker received them.
fn order(w: &Worker, path: &str) -> Vec<String> {
    w.seen()
        .iter()
        .filter(|s| s.path == path)
        .map(|s| s.headers["x-n"].to_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn a_full_worker_serves_pinned_requests_two_at_a_time_in_arrival_order() {
    let (a, b) = (Worker::start("a").await, Worker::start("b").await);
    let t = Tether::start(&text_with(&[limited(&a, 2), limited(&b, 2)], "")).await;
    let client = user();
    let first = client.get(t.url("/hello")).send().await.unwrap();
    assert_eq!(first.status(), 200);
    let home = worker_of(&first);
    let (pinned, other) = if home == "a" { (&a, &b) } else { (&b, &a) };

    let mut answers = Vec::new();
    for i in 0..10u64 {
        let (client, url) = (client.clone(), t.url("/turn?ms=1000"));
        answers.push(tokio::spawn(async move {
            let resp = client
                .get(url)
                .header("x-n", i.to_string())
                .send()
                .await
                .unwrap();
            (resp.status().as_u16(), worker_of(&resp))
        }));
        // The next request is sent once this one holds a slot or queues,
        // so arrival order at tether is 0, 1, 2, ...
        let want = (i + 1).min(2);
        wait_slots(&t, &home, (want, (i + 1).saturating_sub(2))).await;
    }
    assert_eq!(slots(&t, &home).await, (2, 8), "2 in flight, 8 queued");
    for a in answers {
        assert_eq!(a.await.unwrap(), (200, home.clone()), "none moved");
    }
    assert_eq!(pinned.max_active(), 2, "never more than 2 at the worker");
    let want: Vec<String> = (0..10).map(|i| i.to_string()).collect();
    assert_eq!(order(pinned, "/turn"), want, "served in FIFO order");
    assert!(other.seen().is_empty(), "the other worker saw nothing");
    assert_eq!(metric(&t, "tether_repins_total").await, 0.0);
    assert_eq!(slots(&t, &home).await, (0, 0));
    // 8 requests waited (the first two found a free slot).
    assert_eq!(
        metric(&t, "tether_queue_wait_seconds_count").await,
        8.0,
        "queue waits observed"
    );
    t.stop().await;
}

#[tokio::test]
async fn past_queue_timeout_the_client_gets_503_with_retry_after_and_nothing_is_forwarded() {
    let a = Worker::start("a").await;
    let extra = "[queue]\ntimeout = \"300ms\"\n";
    let t = Tether::start(&text_with(&[limited(&a, 1)], extra)).await;
    let holder = {
        let url = t.url("/turn?ms=1500");
        tokio::spawn(async move { plain().get(url).header("x-n", "holder").send().await })
    };
    wait_slots(&t, "a", (1, 0)).await;
    let started = Instant::now();
    let refused = plain()
        .get(t.url("/turn"))
        .header("x-n", "late")
        .send()
        .await
        .unwrap();
    let waited = started.elapsed();
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_millis(1400),
        "answered after the queue timeout, before the slot freed: {waited:?}"
    );
    assert_eq!(holder.await.unwrap().unwrap().status(), 200);
    assert_eq!(
        order(&a, "/turn"),
        vec!["holder"],
        "the worker never saw it"
    );
    assert_eq!(metric(&t, "tether_admission_rejected_total").await, 1.0);
    t.stop().await;
}

#[tokio::test]
async fn with_the_queue_full_the_client_gets_503_at_once() {
    let a = Worker::start("a").await;
    let extra = "[queue]\nmax_waiting = 1\n";
    let t = Tether::start(&text_with(&[limited(&a, 1)], extra)).await;
    let mut held = Vec::new();
    for n in ["holder", "waiter"] {
        let url = t.url("/turn?ms=800");
        held.push(tokio::spawn(async move {
            plain().get(url).header("x-n", n).send().await
        }));
        if n == "holder" {
            wait_slots(&t, "a", (1, 0)).await;
        }
    }
    wait_slots(&t, "a", (1, 1)).await;
    let refused = plain()
        .get(t.url("/turn"))
        .header("x-n", "third")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    for h in held {
        assert_eq!(h.await.unwrap().unwrap().status(), 200);
    }
    assert_eq!(order(&a, "/turn"), vec!["holder", "waiter"]);
    t.stop().await;
}

#[tokio::test]
async fn a_client_that_leaves_the_queue_frees_its_place() {
    let a = Worker::start("a").await;
    let extra = "[queue]\nmax_waiting = 1\n";
    let t = Tether::start(&text_with(&[limited(&a, 1)], extra)).await;
    let holder = {
        let url = t.url("/turn?ms=1500");
        tokio::spawn(async move { plain().get(url).header("x-n", "holder").send().await })
    };
    wait_slots(&t, "a", (1, 0)).await;
    // A raw client that queues, then hangs up.
    let mut gone = TcpStream::connect(t.http).await.unwrap();
    gone.write_all(b"GET /turn HTTP/1.1\r\nHost: app\r\nX-N: gone\r\n\r\n")
        .await
        .unwrap();
    wait_slots(&t, "a", (1, 1)).await;
    drop(gone);
    wait_slots(&t, "a", (1, 0)).await;
    // Its place is free: the next client queues (not 503) and is served.
    let next = plain()
        .get(t.url("/turn"))
        .header("x-n", "next")
        .send()
        .await
        .unwrap();
    assert_eq!(next.status(), 200);
    assert_eq!(holder.await.unwrap().unwrap().status(), 200);
    assert_eq!(
        order(&a, "/turn"),
        vec!["holder", "next"],
        "never forwarded"
    );
    t.stop().await;
}

#[tokio::test]
async fn new_sessions_avoid_a_full_worker() {
    let (a, b) = (Worker::start("a").await, Worker::start("b").await);
    let t = Tether::start(&config_text(&[&a, &b], "[balance]\nmax_inflight = 1\n")).await;
    let busy_user = user();
    let first = busy_user.get(t.url("/hello")).send().await.unwrap();
    let full = worker_of(&first);
    let holder = {
        let url = t.url("/turn?ms=2000");
        tokio::spawn(async move { busy_user.get(url).header("x-n", "holder").send().await })
    };
    wait_slots(&t, &full, (1, 0)).await;
    for u in 0..12 {
        let resp = user().get(t.url("/new")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_ne!(
            worker_of(&resp),
            full,
            "new user {u} placed on the full worker"
        );
    }
    assert_eq!(holder.await.unwrap().unwrap().status(), 200);
    t.stop().await;
}

#[tokio::test]
async fn rate_limit_by_ip_answers_429_with_the_buckets_retry_after() {
    let a = Worker::start("a").await;
    let extra = "[[rate_limits]]\nkey = \"ip\"\nrate = \"1/m\"\nburst = 2\n";
    let t = Tether::start(&config_text(&[&a], extra)).await;
    let c = plain();
    for _ in 0..2 {
        assert_eq!(c.get(t.url("/x")).send().await.unwrap().status(), 200);
    }
    let limited = c.get(t.url("/x")).send().await.unwrap();
    assert_eq!(limited.status(), 429);
    // Two cells used, one comes back every 60 s.
    let retry: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((59..=60).contains(&retry), "Retry-After {retry}");
    assert_eq!(a.count("GET", "/x"), 2, "the 429 was not forwarded");
    assert_eq!(metric(&t, "tether_rate_limited_total").await, 1.0);
    assert_eq!(metric(&t, "tether_rate_limit_keys").await, 1.0);
    t.stop().await;
}

#[tokio::test]
async fn rate_limit_by_session_counts_each_user_apart() {
    let a = Worker::start("a").await;
    let extra =
        "[[rate_limits]]\nname = \"per-session\"\nkey = \"session\"\nrate = \"1/h\"\nburst = 2\n";
    let t = Tether::start(&config_text(&[&a], extra)).await;
    let (u1, u2) = (user(), user());
    // The first request has no session yet; the next two spend the burst.
    for _ in 0..3 {
        assert_eq!(u1.get(t.url("/x")).send().await.unwrap().status(), 200);
    }
    let limited = u1.get(t.url("/x")).send().await.unwrap();
    assert_eq!(limited.status(), 429);
    let retry: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((3599..=3600).contains(&retry), "Retry-After {retry}");
    // Another user (same IP) has a bucket of its own.
    for _ in 0..3 {
        assert_eq!(u2.get(t.url("/x")).send().await.unwrap().status(), 200);
    }
    assert_eq!(a.count("GET", "/x"), 6);
    t.stop().await;
}

#[tokio::test]
async fn rate_limit_by_header_under_a_path_prefix_and_retry_after_is_right() {
    let a = Worker::start("a").await;
    let extra = "[[rate_limits]]\nkey = \"header:X-Api-Key\"\nrate = \"2/s\"\nburst = 1\npath_prefix = \"/api\"\n";
    let t = Tether::start(&config_text(&[&a], extra)).await;
    let c = plain();
    let get = |path: &str, key: Option<&str>| {
        let mut r = c.get(t.url(path));
        if let Some(k) = key {
            r = r.header("x-api-key", k);
        }
        r.send()
    };
    assert_eq!(get("/api/a", Some("k1")).await.unwrap().status(), 200);
    let limited = get("/api/a", Some("k1")).await.unwrap();
    assert_eq!(limited.status(), 429);
    assert_eq!(limited.headers()["retry-after"], "1", "0.5 s rounded up");
    assert_eq!(get("/api/a", Some("k2")).await.unwrap().status(), 200);
    assert_eq!(get("/other", Some("k1")).await.unwrap().status(), 200);
    assert_eq!(get("/api/a", None).await.unwrap().status(), 200);
    // After the announced wait the key is admitted again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(get("/api/a", Some("k1")).await.unwrap().status(), 200);
    t.stop().await;
}

#[tokio::test]
async fn a_stream_holds_its_slot_unless_stream_slots_is_off() {
    for (stream_slots, held) in [(true, 1), (false, 0)] {
        let a = Worker::start("a").await;
        let extra = format!("[queue]\nstream_slots = {stream_slots}\n");
        let t = Tether::start(&text_with(&[limited(&a, 1)], &extra)).await;
        let mut resp = plain().get(t.url("/sse")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        // First event read: the stream is open.
        let chunk = resp.chunk().await.unwrap().unwrap();
        assert!(chunk.starts_with(b"data: a event 0"));
        assert_eq!(
            slots(&t, "a").await,
            (held, 0),
            "stream_slots = {stream_slots}"
        );
        while resp.chunk().await.unwrap().is_some() {}
        wait_slots(&t, "a", (0, 0)).await;
        t.stop().await;
    }
}

#[tokio::test]
async fn a_queued_request_whose_worker_is_lost_follows_the_move() {
    let (a, b) = (Worker::start("a").await, Worker::start("b").await);
    let extra = "[health]\ninterval = \"100ms\"\nfall = 1\n";
    let t = Tether::start(&text_with(&[limited(&a, 1), limited(&b, 1)], extra)).await;
    let client = user();
    let first = client.get(t.url("/hello")).send().await.unwrap();
    let home = worker_of(&first);
    let (pinned, other) = if home == "a" { (&a, &b) } else { (&b, &a) };
    let holder = {
        let (client, url) = (client.clone(), t.url("/turn?ms=3000"));
        tokio::spawn(async move { client.get(url).header("x-n", "holder").send().await })
    };
    wait_slots(&t, &home, (1, 0)).await;
    let queued = {
        let (client, url) = (client.clone(), t.url("/turn"));
        tokio::spawn(async move {
            let r = client
                .get(url)
                .header("x-n", "queued")
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), worker_of(&r))
        })
    };
    wait_slots(&t, &home, (1, 1)).await;
    let started = Instant::now();
    pinned.set_health(503);
    let (status, served_by) = queued.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(served_by, other.id, "moved with the session");
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "did not wait out the holder"
    );
    assert_eq!(order(other, "/turn"), vec!["queued"]);
    assert!(!order(pinned, "/turn").contains(&"queued".to_owned()));
    let _ = holder.await;
    t.stop().await;
}

#[tokio::test]
async fn a_reload_that_raises_max_inflight_admits_the_queued_requests_at_once() {
    let a = Worker::start("a").await;
    let t = Tether::start(&text_with(&[limited(&a, 1)], "")).await;
    let holder = {
        let url = t.url("/turn?ms=3000");
        tokio::spawn(async move { plain().get(url).header("x-n", "holder").send().await })
    };
    wait_slots(&t, "a", (1, 0)).await;
    let queued = {
        let url = t.url("/turn");
        tokio::spawn(async move {
            let started = Instant::now();
            let r = plain()
                .get(url)
                .header("x-n", "queued")
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), started.elapsed())
        })
    };
    wait_slots(&t, "a", (1, 1)).await;
    t.handle()
        .reload(config(&text_with(&[limited(&a, 2)], "")))
        .unwrap();
    let (status, waited) = queued.await.unwrap();
    assert_eq!(status, 200);
    assert!(
        waited < Duration::from_millis(2500),
        "waited out the holder: {waited:?}"
    );
    assert_eq!(a.max_active(), 2);
    assert_eq!(holder.await.unwrap().unwrap().status(), 200);
    t.stop().await;
}

#[tokio::test]
async fn a_retry_that_moves_to_another_worker_waits_for_a_slot_there() {
    let (a, b) = (Worker::start("a").await, Worker::start("b").await);
    let t = Tether::start(&text_with(&[limited(&a, 1), limited(&b, 1)], "")).await;
    // One user on each worker.
    let mut on = std::collections::HashMap::new();
    for _ in 0..40 {
        let u = user();
        let r = u.get(t.url("/hello")).send().await.unwrap();
        on.entry(worker_of(&r)).or_insert(u);
        if on.len() == 2 {
            break;
        }
    }
    let (on_a, on_b) = (on.remove("a").unwrap(), on.remove("b").unwrap());
    let holder = {
        let url = t.url("/turn?ms=1500");
        tokio::spawn(async move { on_b.get(url).header("x-n", "holder").send().await })
    };
    wait_slots(&t, "b", (1, 0)).await;
    // a drops its connections after reading the request: the GET is sent
    // again to b, where it must wait for the holder's slot.
    let retried = on_a
        .get(t.url("/turn?die=a"))
        .header("x-n", "retried")
        .send()
        .await
        .unwrap();
    assert_eq!(retried.status(), 200);
    assert_eq!(worker_of(&retried), "b");
    assert_eq!(b.max_active(), 1, "the retry waited for b's slot");
    assert_eq!(order(&b, "/turn"), vec!["holder", "retried"]);
    assert_eq!(holder.await.unwrap().unwrap().status(), 200);
    t.stop().await;
}
