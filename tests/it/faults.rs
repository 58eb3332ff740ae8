//! Faults at the worst moment: a worker process killed and restarted on
//! its port before any probe, stopped right after acknowledging turns, lost
//! while the store is down; a hung worker; uploads cancelled by clients; a
//! reset; a worker closing a keep-alive connection. What a user sees is
//! checked turn by turn (`support::turns`): a 2xx never silently misses a
//! turn tether acknowledged before.
//!
//! Every wait is bounded; findings are collected and asserted at the end
//! with a report, so one run shows everything that went wrong.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use rand::Rng;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::turns::{report, user_texts, Outcome};
use crate::support::*;

/// Fast probes: a worker that stops answering is down in ~0.5 s.
const FAST: &str = "[health]\ninterval = \"100ms\"\ntimeout = \"200ms\"\nfall = 2\nrise = 2\n";
/// No probe during the test: only requests can notice a restart.
const NO_PROBES: &str = "[health]\ninterval = \"30s\"\n";

/// What went wrong, collected for one assertion at the end.
#[derive(Default)]
struct Findings(Vec<String>);

impl Findings {
    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.0.push(what());
        }
    }

    fn assert_none(&self, context: &str) {
        assert!(
            self.0.is_empty(),
            "{} finding(s):\n  - {}\n{context}",
            self.0.len(),
            self.0.join("\n  - ")
        );
    }
}

/// New users (one turn each) until `n` of them landed on `worker`. Returns
/// them and how many users were tried (each stored two entries).
async fn chats_on(base: &str, worker: &str, n: usize) -> (Vec<Chat>, usize) {
    let mut found = Vec::new();
    let mut tries = 0;
    while found.len() < n {
        assert!(
            tries < 20 * n,
            "fewer than {n} of {tries} users landed on {worker}"
        );
        tries += 1;
        let mut c = Chat::new(&format!("u{tries}"));
        let msg = c.next_message();
        match c.turn(base, &msg).await {
            Outcome::Ok { worker: w, .. } if w == worker => found.push(c),
            Outcome::Ok { .. } => {}
            other => panic!("pinning turn failed: {other:?}"),
        }
    }
    for (i, c) in found.iter_mut().enumerate() {
        c.name = format!("user{i}");
    }
    (found, tries)
}

/// A mock-worker user pinned to `worker`: (client, its `tether` cookie).
async fn pinned_to(t: &Tether, worker: &str) -> (reqwest::Client, String) {
    for _ in 0..40 {
        let c = user();
        let r = c.get(t.url("/")).send().await.unwrap();
        if worker_of(&r) == worker {
            let cookie = tether_cookie(&r).expect("a new session gets a cookie");
            return (c, cookie);
        }
    }
    panic!("no user landed on {worker}");
}

/// Workers whose state is not `up`, with their state.
async fn not_up(t: &Tether) -> Vec<String> {
    let mut out: Vec<String> = backends(t)
        .await
        .into_iter()
        .filter(|(_, b)| b["state"] != "up")
        .map(|(id, b)| format!("{id} is {}", b["state"]))
        .collect();
    out.sort();
    out
}

/// Polls `/backends` (bounded) until worker `id` is in state `want`.
async fn state_becomes(t: &Tether, id: &str, want: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if backends(t).await[id]["state"] == want {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn readyz(t: &Tether) -> (u16, Value) {
    let r = plain().get(t.admin_url("/readyz")).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Polls `/readyz` (bounded) until `store.state` is `want`; the last answer.
async fn readyz_store(t: &Tether, want: &str, within: Duration) -> (u16, Value) {
    let deadline = Instant::now() + within;
    loop {
        let (status, v) = readyz(t).await;
        if v["store"]["state"] == want || Instant::now() >= deadline {
            return (status, v);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls metric `name` (bounded) until it equals `want`; the last value.
async fn metric_becomes(t: &Tether, name: &str, want: f64, within: Duration) -> Option<f64> {
    let deadline = Instant::now() + within;
    loop {
        let v = metric_opt(t, name).await;
        if v == Some(want) || Instant::now() >= deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every acknowledged turn must be in the thread tether serves now.
/// Returns the worker serving each user (`None` when the read failed).
async fn final_histories(base: &str, users: &[&Chat], f: &mut Findings) -> Vec<Option<String>> {
    let mut served = Vec::new();
    for u in users {
        match u.read(base).await {
            Ok((worker, history)) => {
                let lacks = u.lacks(&user_texts(&history));
                f.check(lacks.is_empty(), || {
                    format!(
                        "{}: the final history (on {worker}) lacks acknowledged turns {lacks:?}",
                        u.name
                    )
                });
                served.push(Some(worker));
            }
            Err(e) => {
                f.0.push(format!("{}: final GET /chat failed: {e}", u.name));
                served.push(None);
            }
        }
    }
    served
}

// === worker processes: restart, stop, store outage ===

#[tokio::test]
async fn restart_on_the_same_port_before_any_probe_keeps_the_history() {
    let mut a = WorkerProc::start("a").await;
    let b = WorkerProc::start("b").await;
    let t = Tether::start(&proc_config(&[&a, &b], NO_PROBES)).await;
    let base = t.url("");
    let (mut users, tries) = chats_on(&base, "a", 1).await;
    let u = &mut users[0];
    let again = u.next_message();
    assert!(u.turn(&base, &again).await.is_ok());
    captured(&[&t], 2.0 * tries as f64 + 2.0).await;

    a.restart().await;
    let new = u.next_message();
    let out = u.turn(&base, &new).await;
    let Outcome::Ok {
        worker,
        history,
        restore,
    } = out
    else {
        panic!("the turn right after the restart got {out:?}");
    };
    let texts = user_texts(&history);
    assert_eq!(
        (worker.as_str(), restore.as_deref(), history.len()),
        ("a", None, 6),
        "wanted 6 entries from a without Tether-Restore; user entries were {texts:?}"
    );
    assert!(u.violations.is_empty(), "{:?}", u.violations);
    t.stop().await;
}

#[tokio::test]
async fn restarts_at_any_moment_never_serve_a_turn_without_history() {
    restart_storm(NO_PROBES).await;
}

/// With `state.capture = "sync"` a 2xx means the turn is stored: the same
/// restart storm loses nothing at all (a turn whose worker died before
/// tether pulled it is answered `502`, never acknowledged).
#[tokio::test]
async fn with_sync_capture_restarts_lose_no_acknowledged_turn_at_all() {
    let users = restart_storm(&format!("{NO_PROBES}\n[state]\ncapture = \"sync\"\n")).await;
    let partial: usize = users
        .iter()
        .map(|u| u.restore.values().sum::<usize>())
        .sum();
    assert_eq!(partial, 0, "a partial restore with sync capture");
}

/// Four users chat with worker a while a is killed -9 and restarted on the
/// same port four times at random moments; every 2xx is checked.
async fn restart_storm(extra: &str) -> Vec<Chat> {
    let mut a = WorkerProc::start("a").await;
    let b = WorkerProc::start("b").await;
    let t = Tether::start(&proc_config(&[&a, &b], extra)).await;
    let base = t.url("");
    let (users, _) = chats_on(&base, "a", 4).await;

    let (done_tx, done_rx) = tokio::sync::watch::channel(false);
    let tasks: Vec<_> = users
        .into_iter()
        .map(|mut u| {
            let base = base.clone();
            let mut done = done_rx.clone();
            tokio::spawn(async move {
                u.timeout = Duration::from_secs(5);
                let deadline = Instant::now() + Duration::from_secs(15);
                // Chat until the restarts are over, then three more turns.
                let mut after = 0;
                while after < 3 && Instant::now() < deadline {
                    if *done.borrow_and_update() {
                        after += 1;
                    }
                    let msg = u.next_message();
                    if !u.turn(&base, &msg).await.is_ok() {
                        tokio::time::sleep(Duration::from_millis(30)).await;
                    }
                }
                u
            })
        })
        .collect();
    for _ in 0..4 {
        let ms = rand::thread_rng().gen_range(50..300);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        a.restart().await;
    }
    done_tx.send_replace(true);
    let mut users = Vec::new();
    for task in tasks {
        users.push(task.await.unwrap());
    }
    let (violations, text) = report(&users.iter().collect::<Vec<_>>());
    assert!(violations.is_empty(), "{text}");
    println!("{text}");
    t.stop().await;
    users
}

#[sqlx::test(migrations = false)]
async fn a_stopped_worker_loses_no_acknowledged_turn(pool: sqlx::PgPool) {
    let mut a = WorkerProc::start("a").await;
    let b = WorkerProc::start("b").await;
    let text = proc_config(
        &[&a, &b],
        &format!(
            "{FAST}\n[state]\nstore = \"{}\"\nrestore_timeout = \"2s\"\n",
            pg_url(&pool)
        ),
    );
    let t = Tether::start(&text).await;
    let base = t.url("");
    let (mut users, _) = chats_on(&base, "a", 6).await;
    for u in &mut users {
        u.timeout = Duration::from_secs(5);
        let m = u.next_message();
        assert!(u.turn(&base, &m).await.is_ok(), "{}", u.summary());
    }

    // The worst moment: one more turn each, and `a` hangs right after the
    // last acknowledgement, before tether could pull those turns.
    let acks = std::sync::atomic::AtomicUsize::new(0);
    let outs = join_all(users.iter_mut().map(|u| {
        let (base, acks) = (&base, &acks);
        async move {
            let m = u.next_message();
            let out = u.turn(base, &m).await;
            (out, acks.fetch_add(1, std::sync::atomic::Ordering::SeqCst))
        }
    }))
    .await;
    a.stop();
    let mut f = Findings::default();
    for (u, (out, _)) in users.iter().zip(&outs) {
        f.check(out.is_ok(), || {
            format!("{}: last turn before the stop: {out:?}", u.name)
        });
    }

    // The two users acknowledged first talk again at once (their turn
    // reaches the stopped worker); the four acknowledged last wait until
    // probes mark it down (their turn moves while the stopped worker still
    // holds turns the store may not have got).
    let started = Instant::now();
    let tr = &t;
    let chat = join_all(users.iter_mut().zip(&outs).map(|(u, (_, rank))| {
        let (base, t, moves) = (&base, tr, *rank >= 2);
        async move {
            if moves && !state_becomes(t, "a", "down", Duration::from_secs(2)).await {
                eprintln!("{}: a was not marked down within 2 s", u.name);
            }
            let mut last_ok = false;
            while started.elapsed() < Duration::from_secs(8) {
                let m = u.next_message();
                last_ok = u.turn(base, &m).await.is_ok();
                let pause = if last_ok { 50 } else { 200 };
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            last_ok
                || u.until_ok(base, Duration::from_secs(6), Duration::from_millis(200))
                    .await
                    .is_some()
        }
    }));
    let wake = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        a.cont();
    };
    let (got_ok, ()) = tokio::join!(chat, wake);
    for (u, ok) in users.iter().zip(got_ok) {
        f.check(ok, || format!("{}: never got a 2xx again", u.name));
    }

    let refs: Vec<&Chat> = users.iter().collect();
    let served = final_histories(&base, &refs, &mut f).await;
    let addrs: HashMap<&str, std::net::SocketAddr> = [("a", a.addr), ("b", b.addr)].into();
    for (u, worker) in users.iter().zip(&served) {
        let Some(worker) = worker else {
            continue;
        };
        let Some(session) = u.session.as_deref() else {
            f.0.push(format!("{}: no session id seen", u.name));
            continue;
        };
        let Some(addr) = addrs.get(worker.as_str()) else {
            f.0.push(format!("{}: served by unknown worker {worker}", u.name));
            continue;
        };
        let held = match crate::support::proc::read_thread(*addr, session, "main").await {
            Ok(h) => h,
            Err(e) => {
                f.0.push(format!("{}: cannot read {worker}'s copy: {e}", u.name));
                continue;
            }
        };
        let bodies: Vec<String> = sqlx::query_scalar(
            "SELECT body FROM tether_entries WHERE session_id = $1 AND thread_id = 'main' ORDER BY seq",
        )
        .bind(session)
        .fetch_all(&pool)
        .await
        .unwrap();
        let stored: Vec<Value> = bodies
            .iter()
            .map(|b| serde_json::from_str(b).unwrap_or(Value::Null))
            .collect();
        let agree = stored.len() <= held.len() && held[..stored.len()] == stored[..];
        f.check(agree, || {
            let first = stored
                .iter()
                .zip(&held)
                .position(|(s, h)| s != h)
                .unwrap_or(stored.len().min(held.len()));
            format!(
                "{}: the stored thread diverges from {worker}'s: {} stored, {} held, first difference at entry {} (stored {}, held {})",
                u.name,
                stored.len(),
                held.len(),
                first + 1,
                stored.get(first).map_or("-".into(), Value::to_string),
                held.get(first).map_or("-".into(), Value::to_string),
            )
        });
    }
    let (violations, text) = report(&refs);
    f.check(violations.is_empty(), || {
        format!(
            "{} 2xx answer(s) silently missed acknowledged turns (below)",
            violations.len()
        )
    });
    f.assert_none(&text);
    println!("{text}");
    t.stop().await;
}

#[sqlx::test(migrations = false)]
async fn a_store_outage_and_a_lost_worker_lose_no_acknowledged_turn(pool: sqlx::PgPool) {
    let mut a = WorkerProc::start("a").await;
    let b = WorkerProc::start("b").await;
    let relay = Relay::start().await;
    let db = pool.connect_options().get_database().unwrap().to_owned();
    let text = proc_config(
        &[&a, &b],
        &format!(
            "{FAST}\n[state]\nstore = \"{}\"\nrestore_timeout = \"1s\"\n",
            relay.url(&db)
        ),
    );
    let t = Tether::start(&text).await;
    let base = t.url("");
    let (mut users, tries) = chats_on(&base, "a", 3).await;
    for u in &mut users {
        u.timeout = Duration::from_secs(5);
        let m = u.next_message();
        assert!(u.turn(&base, &m).await.is_ok(), "{}", u.summary());
    }
    captured(&[&t], 2.0 * tries as f64 + 2.0 * 3.0).await;

    let mut f = Findings::default();
    relay.cut();
    for u in &mut users {
        for _ in 0..2 {
            let m = u.next_message();
            let out = u.turn(&base, &m).await;
            f.check(out.is_ok(), || {
                format!(
                    "{}: a turn on a healthy worker while the store is down got {out:?}",
                    u.name
                )
            });
        }
    }
    let (status, ready) = readyz_store(&t, "degraded", Duration::from_secs(3)).await;
    f.check(status == 200, || {
        format!("/readyz during the store outage: {status} {ready}")
    });
    f.check(ready["store"]["state"] == "degraded", || {
        format!(
            "/readyz store during the outage: {}, wanted \"degraded\"",
            ready["store"]
        )
    });
    let up = metric_becomes(&t, "tether_store_up", 0.0, Duration::from_secs(1)).await;
    f.check(up == Some(0.0), || {
        format!("tether_store_up during the outage: {up:?}, wanted 0")
    });

    a.kill9();
    let started = Instant::now();
    join_all(users.iter_mut().map(|u| {
        let base = &base;
        async move {
            while started.elapsed() < Duration::from_secs(3) {
                let m = u.next_message();
                let pause = if u.turn(base, &m).await.is_ok() {
                    50
                } else {
                    100
                };
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
        }
    }))
    .await;
    relay.heal();
    let got = join_all(users.iter_mut().map(|u| {
        let base = &base;
        async move {
            u.until_ok(base, Duration::from_secs(12), Duration::from_millis(100))
                .await
                .is_some()
        }
    }))
    .await;
    for (u, ok) in users.iter().zip(got) {
        f.check(ok, || {
            format!("{}: no 2xx within 12 s after the store returned", u.name)
        });
    }
    let refs: Vec<&Chat> = users.iter().collect();
    final_histories(&base, &refs, &mut f).await;

    let (status, ready) = readyz_store(&t, "connected", Duration::from_secs(5)).await;
    f.check(
        ready["store"]["state"] == "connected" && status == 200,
        || format!("/readyz after the store returned: {status} {ready}"),
    );
    let up = metric_becomes(&t, "tether_store_up", 1.0, Duration::from_secs(3)).await;
    f.check(up == Some(1.0), || {
        format!("tether_store_up after the store returned: {up:?}, wanted 1")
    });

    let (violations, text) = report(&refs);
    f.check(violations.is_empty(), || {
        format!(
            "{} 2xx answer(s) silently missed acknowledged turns (below)",
            violations.len()
        )
    });
    f.assert_none(&text);
    println!("{text}");
    t.stop().await;
}

// === a hung worker ===

/// The flow of the response-timeout tests: a user pinned to `a` asks for a
/// 5 s answer. Returns the status (or the client's error) and the time.
async fn hung_request(t: &Tether) -> (Result<u16, String>, Duration) {
    let (client, _) = pinned_to(t, "a").await;
    let started = Instant::now();
    let r = client
        .get(t.url("/slow?ms=5000"))
        .timeout(Duration::from_secs(3))
        .send()
        .await;
    let out = r
        .map(|r| r.status().as_u16())
        .map_err(|e| crate::support::turns::chain(&e));
    (out, started.elapsed())
}

#[tokio::test]
async fn a_hung_worker_answers_504_after_response_timeout() {
    let (a, b) = (Worker::start("a").await, Worker::start("b").await);
    let t = Tether::start(&config_text(
        &[&a, &b],
        "[limits]\nresponse_timeout = \"300ms\"\n\n[passive]\nfailures = 3\n",
    ))
    .await;
    let (out, took) = hung_request(&t).await;
    assert_eq!(out, Ok(504), "after {took:?}");
    assert!(took < Duration::from_secs(2), "504 took {took:?}");
    let down = not_up(&t).await;
    assert!(down.is_empty(), "one timeout is no ejection: {down:?}");
    t.stop().await;
}

#[tokio::test]
async fn a_request_waiting_on_a_worker_that_health_marks_down_is_released() {
    let (a, b) = (Worker::start("a").await, Worker::start("b").await);
    let t = Tether::start(&config_text(&[&a, &b], FAST)).await;
    let (client, _) = pinned_to(&t, "a").await;
    let url = t.url("/slow?ms=30000");
    let request = tokio::spawn(async move {
        let r = client
            .get(url)
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        r.map(|r| (r.status().as_u16(), worker_of(&r)))
            .map_err(|e| crate::support::turns::chain(&e))
    });
    eventually("a holds the request", || a.count("GET", "/slow") == 1).await;
    a.set_health(503);
    let marked = Instant::now();
    let out = request.await.unwrap();
    let took = marked.elapsed();
    println!("answer {out:?} {took:?} after a's probes began failing");
    match &out {
        Ok((504, _)) | Ok((200, _)) => {}
        other => panic!("wanted 504 (or 200 from b), got {other:?} after {took:?}"),
    }
    if let Ok((200, w)) = &out {
        assert_eq!(w, "b", "a 200 can only come from a retry on b");
    }
    assert!(
        took < Duration::from_secs(3),
        "answered {took:?} after a went down"
    );
    t.stop().await;
}

// === failure classification ===

/// Fast probes, three passive failures eject.
const PASSIVE: &str = "[health]\ninterval = \"100ms\"\ntimeout = \"200ms\"\nfall = 2\nrise = 2\n\n[passive]\nfailures = 3\n";

/// Sends raw bytes on a new connection to tether and returns the first
/// line it answers (or why there was none).
async fn raw(t: &Tether, bytes: &[u8], read: bool) -> String {
    let mut s = TcpStream::connect(t.http).await.unwrap();
    s.write_all(bytes).await.unwrap();
    if !read {
        // The client goes away mid-body.
        drop(s);
        return "closed by the client".into();
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    let got = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.windows(2).any(|w| w == b"\r\n") {
                        break;
                    }
                }
            }
        }
    })
    .await;
    let line = String::from_utf8_lossy(&buf)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned();
    match (got, line.is_empty()) {
        (Err(_), true) => "no answer within 3 s".into(),
        (_, true) => "connection closed without an answer".into(),
        (_, false) => line,
    }
}

/// Worker states, ejections and repins now, for the log.
async fn effects(t: &Tether) -> String {
    format!(
        "not up {:?}, ejections {}, repins {}",
        not_up(t).await,
        metric(t, "tether_ejections_total").await,
        metric(t, "tether_repins_total").await
    )
}

/// Ejections, repins and worker states after the cases, watched for a
/// short while (the effects of a failure are asynchronous).
async fn no_eject_no_repin(t: &Tether, f: &mut Findings) {
    let deadline = Instant::now() + Duration::from_millis(600);
    loop {
        let down = not_up(t).await;
        let ejections = metric(t, "tether_ejections_total").await;
        let repins = metric(t, "tether_repins_total").await;
        let bad = !down.is_empty() || ejections > 0.0 || repins > 0.0;
        if bad || Instant::now() >= deadline {
            f.check(down.is_empty(), || format!("workers not up: {down:?}"));
            f.check(ejections == 0.0, || {
                format!("tether_ejections_total = {ejections}")
            });
            f.check(repins == 0.0, || format!("tether_repins_total = {repins}"));
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn cancelled_uploads_never_eject_a_worker() {
    let (a, b, c) = (
        Worker::start("a").await,
        Worker::start("b").await,
        Worker::start("c").await,
    );
    let t = Tether::start(&config_text(&[&a, &b, &c], PASSIVE)).await;
    let (client, cookie) = pinned_to(&t, "a").await;
    let mut f = Findings::default();
    let mut log = String::new();
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: tether\r\nCookie: tether={cookie}\r\nTransfer-Encoding: chunked\r\n\r\n"
    );

    // HTTP/1.1: one partial chunk, then the client closes.
    for i in 1..=3 {
        raw(&t, format!("{head}10\r\nabc").as_bytes(), false).await;
        let seen = tokio::time::timeout(Duration::from_secs(3), async {
            while a.count("POST", "/upload") < i {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .is_ok();
        writeln!(log, "partial upload {i}: a saw it: {seen}").unwrap();
    }
    writeln!(log, "after the partial uploads: {}", effects(&t).await).unwrap();
    // HTTP/1.1: a malformed chunk size is the client's error.
    for i in 1..=3 {
        let line = raw(&t, format!("{head}zz\r\n").as_bytes(), true).await;
        writeln!(log, "malformed chunk {i}: {line}").unwrap();
        f.check(line.contains(" 400"), || {
            format!("malformed chunk size {i}: {line:?}, wanted 400")
        });
    }
    writeln!(log, "after the malformed chunks: {}", effects(&t).await).unwrap();
    // HTTP/2: the client resets the stream mid-body.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    for i in 1..=3 {
        let chunks: Vec<Result<&'static str, std::io::Error>> = vec![
            Ok("part one,"),
            Err(std::io::Error::other("client gave up")),
        ];
        let r = h2
            .post(t.url("/upload"))
            .header("cookie", format!("tether={cookie}"))
            .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                chunks,
            )))
            .send()
            .await;
        let what = match r {
            Ok(r) => format!("{} from {:?}", r.status(), worker_of(&r)),
            Err(e) => format!("client error: {}", crate::support::turns::chain(&e)),
        };
        writeln!(log, "h2 reset upload {i}: {what}").unwrap();
    }
    writeln!(log, "after the h2 resets: {}", effects(&t).await).unwrap();

    no_eject_no_repin(&t, &mut f).await;
    let r = client.get(t.url("/")).send().await.unwrap();
    f.check(worker_of(&r) == "a", || {
        format!("the user now reaches {:?}, not a", worker_of(&r))
    });
    println!("{log}");
    f.assert_none(&log);
    t.stop().await;
}

#[tokio::test]
async fn one_reset_marks_no_worker_down() {
    let (a, b, c) = (
        Worker::start("a").await,
        Worker::start("b").await,
        Worker::start("c").await,
    );
    // Default probes (every 2 s, rise 2): a worker marked down stays down
    // for seconds, long enough to be seen.
    let t = Tether::start(&config_text(&[&a, &b, &c], "[passive]\nfailures = 3\n")).await;
    let mut users = Vec::new();
    for _ in 0..30 {
        let u = user();
        let r = u.get(t.url("/")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        users.push((u, worker_of(&r)));
    }
    for w in ["a", "b", "c"] {
        assert!(users.iter().any(|(_, p)| p == w), "no user on {w}");
    }
    let victim = users.iter().position(|(_, w)| w == "a").unwrap();
    let r = users[victim]
        .0
        .get(t.url("/x?reset=1"))
        .send()
        .await
        .unwrap();
    let answer = format!("{} from {:?}", r.status(), worker_of(&r));
    println!("the reset request got {answer}");

    let mut f = Findings::default();
    let down = not_up(&t).await;
    f.check(down.is_empty(), || format!("after one reset: {down:?}"));
    let mut moved = Vec::new();
    for (i, (u, pinned)) in users.iter().enumerate() {
        if i == victim {
            continue;
        }
        let r = u.get(t.url("/")).send().await.unwrap();
        let now = worker_of(&r);
        if r.status() != 200 || &now != pinned {
            moved.push(format!("{pinned}->{now} ({})", r.status()));
        }
    }
    f.check(moved.is_empty(), || {
        format!(
            "{} of {} other users moved: {moved:?}",
            moved.len(),
            users.len() - 1
        )
    });
    f.assert_none(&format!("the reset request got {answer}"));
    t.stop().await;
}

#[tokio::test]
async fn a_worker_closing_a_keep_alive_connection_is_not_a_failure() {
    let (a, b) = (Worker::start("a").await, Worker::start("b").await);
    let t = Tether::start(&config_text(&[&a, &b], "[passive]\nfailures = 3\n")).await;
    let (client, _) = pinned_to(&t, "a").await;
    a.set_close_second(true);
    let mut f = Findings::default();
    let mut log = Vec::new();
    for i in 1..=10 {
        let path = if i % 3 == 0 { "/sse" } else { "/" };
        let r = client.get(t.url(path)).send().await;
        let (status, worker, body) = match r {
            Ok(r) => {
                let (s, w) = (r.status().as_u16(), worker_of(&r));
                (s, w, r.text().await.map_err(|e| e.to_string()))
            }
            Err(e) => (0, String::new(), Err(crate::support::turns::chain(&e))),
        };
        let complete = match (&body, path) {
            (Ok(b), "/sse") => b.matches("event").count() == 5,
            (Ok(_), _) => true,
            (Err(_), _) => false,
        };
        log.push(format!("GET {path}: {status} from {worker:?}"));
        f.check(status == 200 && worker == "a" && complete, || {
            format!("request {i} (GET {path}): {status} from {worker:?}, body {body:?}")
        });
    }
    let down = not_up(&t).await;
    f.check(down.is_empty(), || format!("{down:?}"));
    let repins = metric(&t, "tether_repins_total").await;
    f.check(repins == 0.0, || format!("tether_repins_total = {repins}"));
    f.assert_none(&log.join("\n"));
    t.stop().await;
}
