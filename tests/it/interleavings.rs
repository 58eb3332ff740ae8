//! Interleavings found by a reliability review of the move and capture
//! paths, each driven at its worst moment through `Front` workers (a
//! reference worker behind a front that can fail probes, imports or
//! exports, hold, reset or restart on command). Each test asserts the
//! promise of README "What survives what" for its interleaving.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::front::*;
use crate::support::turns::{report, user_texts};
use crate::support::*;

/// A turn in flight on the worker a session is leaving: the client's own
/// concurrent GET is reset by `a` and, being idempotent, would be retried
/// on `b` (a move). The move waits for the slow turn (the GET gets 503),
/// so the turn is acknowledged and stored before the session leaves; when
/// `b` later dies, nothing is lost and the store never holds a thread
/// nobody saw.
#[tokio::test]
async fn a_turn_in_flight_on_the_worker_left_behind_is_waited_for() {
    let a = Front::start("a").await;
    let b = Front::start("b").await;
    let t = Tether::start(&cfg(&[&a, &b], "")).await;
    let base = t.url("");
    let mut u = chat_on(&base, "a").await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let (client, base2) = (u.client.clone(), base.clone());
    let slow = tokio::spawn(async move { raw_turn(&client, &base2, "SLOW", "&delay=1500").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = u
        .client
        .get(format!("{base}/x?reset=a"))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let moved_to = r.json::<Value>().await.unwrap_or(Value::Null)["worker"].clone();
    println!("the reset GET was answered {status} by {moved_to}");
    let (status, worker, restore, shown) = slow.await.unwrap();
    println!("slow turn: {status} from {worker} restore {restore:?} history {shown:?}");
    assert_eq!(
        (status, worker.as_str(), restore),
        (200, "a", None),
        "the slow turn was acknowledged by a"
    );
    u.acked.push("SLOW".into());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fenced = metric(&t, "tether_capture_fenced_total").await;
    println!("tether_capture_fenced_total = {fenced}");

    let m = u.next_message();
    let out = u.turn(&base, &m).await;
    println!("next turn: {out:?}");
    let session = u.session.clone().unwrap();
    // Let b's turn reach the store before b dies (no capture window here).
    for _ in 0..100 {
        if stored_users(&t, &session).await.contains(&m) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    println!(
        "a holds {:?}\nb holds {:?}\nstore holds {:?}",
        a.held(&session),
        b.held(&session),
        stored_users(&t, &session).await
    );

    // Part two: b dies; the session goes back to a.
    b.kill();
    let m = u.next_message();
    let out = u.turn(&base, &m).await;
    println!("after b died: {out:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held_a = a.held(&session);
    let stored = stored_users(&t, &session).await;
    println!("a holds {held_a:?}\nstore holds {stored:?}");
    let (violations, text) = report(&[&u]);
    println!("{text}");
    let diverged = !held_a.starts_with(&stored) && !stored.starts_with(&held_a);
    assert!(
        violations.is_empty() && !diverged,
        "{} silent loss(es); store diverged from what a serves: {diverged}\n{text}",
        violations.len()
    );
    t.stop().await;
}

/// The re-pin's compare-and-set is won, the restore into the new worker
/// fails (503 to the client), the old worker comes back: the next request
/// finishes the move instead of being served by the old worker under the
/// old epoch (whose captures the fence would refuse).
#[tokio::test]
async fn a_won_repin_whose_restore_failed_is_finished_by_the_next_request() {
    let a = Front::start("a").await;
    let b = Front::start("b").await;
    let t = Tether::start(&cfg(&[&a, &b], FAST)).await;
    let base = t.url("");
    let mut u = chat_on(&base, "a").await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    b.set(&b.ctl.import, 503);
    a.set(&a.ctl.health, 503);
    wait_state(&t, "a", "down").await;
    let m = u.next_message();
    let out = u.turn(&base, &m).await;
    println!("turn while a is down and b refuses imports: {out:?}");
    a.set(&a.ctl.health, 0);
    b.set(&b.ctl.import, 0);
    wait_state(&t, "a", "up").await;

    for _ in 0..3 {
        let m = u.next_message();
        let out = u.turn(&base, &m).await;
        println!("turn after a came back: {out:?}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fenced = metric(&t, "tether_capture_fenced_total").await;
    let session = u.session.clone().unwrap();
    println!(
        "fenced captures: {fenced}; store holds {:?}",
        stored_users(&t, &session).await
    );

    a.kill();
    let out = u
        .until_ok(&base, Duration::from_secs(5), Duration::from_millis(100))
        .await;
    println!("after a died: {out:?}");
    let (violations, text) = report(&[&u]);
    println!("{text}");
    assert!(violations.is_empty(), "{text}");
    t.stop().await;
}

/// `on_restore_failure = "continue"`: every answer from the history-less
/// worker is marked `failed` (not only the first), the restore is retried,
/// and its fresh thread is never spliced onto the stored one.
#[tokio::test]
async fn continue_marks_every_answer_without_history_and_never_splices_the_store() {
    let a = Front::start("a").await;
    let b = Front::start("b").await;
    let c = Front::start("c").await;
    let t = Tether::start(&cfg(
        &[&a, &b, &c],
        &format!("{FAST}\n[state]\non_restore_failure = \"continue\"\n"),
    ))
    .await;
    let base = t.url("");
    let mut u = chat_on(&base, "a").await;
    let m = u.next_message();
    assert!(u.turn(&base, &m).await.is_ok());
    tokio::time::sleep(Duration::from_millis(500)).await;

    b.set(&b.ctl.import, 503);
    c.set(&c.ctl.import, 503);
    a.kill();
    wait_state(&t, "a", "down").await;
    for _ in 0..4 {
        let m = u.next_message();
        let out = u.turn(&base, &m).await;
        println!("{out:?}");
    }
    b.set(&b.ctl.import, 0);
    c.set(&c.ctl.import, 0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let session = u.session.clone().unwrap();
    let on = u.worker.clone().unwrap();
    let (now, other) = if on == "b" { (&b, &c) } else { (&c, &b) };
    let stored = stored_users(&t, &session).await;
    let held = now.held(&session);
    println!("{on} holds {held:?}\nstore holds {stored:?}");

    now.kill();
    let out = u
        .until_ok(&base, Duration::from_secs(5), Duration::from_millis(100))
        .await;
    println!(
        "after {on} died: {out:?}\n{} holds {:?}",
        other.id,
        other.held(&session)
    );
    let (violations, text) = report(&[&u]);
    println!("{text}");
    // The store keeps the history that could not be restored; the
    // history-less worker's fresh thread is never spliced onto it.
    let spliced = stored.iter().any(|m| held.contains(m)) && !held.starts_with(&stored);
    assert!(
        violations.is_empty() && !spliced,
        "store spliced: {spliced}\n{text}"
    );
    t.stop().await;
}

/// Three concurrent requests of one client that make the worker drop the
/// connection (a request that crashes its handler) do not eject a healthy
/// worker: a probe must confirm, and the other users stay.
#[tokio::test]
async fn resets_one_client_provokes_do_not_eject_a_healthy_worker() {
    let (wa, wb, wc) = (
        Worker::start("a").await,
        Worker::start("b").await,
        Worker::start("c").await,
    );
    let t = Tether::start(&config_text(&[&wa, &wb, &wc], "[passive]\nfailures = 3\n")).await;
    // A bystander pinned to a.
    let bystander = loop {
        let c = user();
        let r = c.get(t.url("/")).send().await.unwrap();
        if worker_of(&r) == "a" {
            break c;
        }
    };
    let attacker = loop {
        let c = user();
        let r = c.get(t.url("/")).send().await.unwrap();
        if worker_of(&r) == "a" {
            break c;
        }
    };
    let shots = (0..3).map(|_| attacker.get(t.url("/x?reset=1")).send());
    let _ = futures_util::future::join_all(shots).await;
    let ejections = metric(&t, "tether_ejections_total").await;
    let r = bystander.get(t.url("/")).send().await.unwrap();
    let now = worker_of(&r);
    println!("ejections {ejections}; the bystander is now on {now}");
    assert!(
        ejections == 0.0 && now == "a",
        "a client ejected worker a and moved its users"
    );
    t.stop().await;
}

/// The same with slow answers a client asks for (response_timeout).
#[tokio::test]
async fn slow_requests_one_client_asks_for_do_not_eject_a_healthy_worker() {
    let (wa, wb) = (Worker::start("a").await, Worker::start("b").await);
    let t = Tether::start(&config_text(
        &[&wa, &wb],
        "[limits]\nresponse_timeout = \"300ms\"\n\n[passive]\nfailures = 3\n",
    ))
    .await;
    let attacker = loop {
        let c = user();
        let r = c.get(t.url("/")).send().await.unwrap();
        if worker_of(&r) == "a" {
            break c;
        }
    };
    let shots = (0..3).map(|_| attacker.get(t.url("/slow?ms=1000")).send());
    let _ = futures_util::future::join_all(shots).await;
    let ejections = metric(&t, "tether_ejections_total").await;
    println!("ejections {ejections}; a is {}", not_up_str(&t).await);
    assert!(ejections == 0.0, "three slow client requests ejected a");
    t.stop().await;
}

async fn not_up_str(t: &Tether) -> String {
    state_of(t, "a").await
}

// ---------------------------------------------------------------------------

/// A user whose requests go over HTTP/2 (prior knowledge), so a client
/// timeout resets the stream and tether drops the request's future.
struct H2User {
    client: reqwest::Client,
    cookie: String,
    acked: Vec<String>,
    n: usize,
}

impl H2User {
    async fn on(base: &str, worker: &str) -> H2User {
        for i in 0..60 {
            let mut u = H2User {
                client: reqwest::Client::builder()
                    .http2_prior_knowledge()
                    .timeout(Duration::from_secs(20))
                    .build()
                    .unwrap(),
                cookie: String::new(),
                acked: Vec::new(),
                n: i * 100,
            };
            if let Ok((200, w, _, _)) = u.turn(base, None).await {
                if w == worker {
                    return u;
                }
            }
        }
        panic!("no h2 user on {worker}");
    }

    /// One turn; `Err` when the client gave up (timeout) or failed.
    async fn turn(
        &mut self,
        base: &str,
        give_up: Option<Duration>,
    ) -> Result<(u16, String, Option<String>, Vec<String>), String> {
        self.n += 1;
        let msg = format!("h{}", self.n);
        let mut rb = self
            .client
            .post(format!("{base}/chat?thread=main&message={msg}"));
        if !self.cookie.is_empty() {
            rb = rb.header("cookie", format!("tether={}", self.cookie));
        }
        if let Some(d) = give_up {
            rb = rb.timeout(d);
        }
        let r = rb
            .send()
            .await
            .map_err(|e| crate::support::turns::chain(&e))?;
        if let Some(c) = tether_cookie(&r) {
            self.cookie = c;
        }
        let status = r.status().as_u16();
        let restore = r
            .headers()
            .get("tether-restore")
            .map(|v| v.to_str().unwrap().to_owned());
        let v: Value = r.json().await.unwrap_or(Value::Null);
        let hist = user_texts(v["history"].as_array().map(Vec::as_slice).unwrap_or(&[]));
        if status == 200 && restore.is_none() {
            self.acked.push(msg);
        }
        Ok((
            status,
            v["worker"].as_str().unwrap_or("").to_owned(),
            restore,
            hist,
        ))
    }
}

/// A move whose client goes away (an HTTP/2 reset) while it pulls a queued
/// capture still completes (it runs as its own task): the thread's later
/// turns keep being captured, and later moves do not wait for a pull that
/// never ends.
#[tokio::test]
async fn a_move_whose_client_went_away_still_completes_its_captures() {
    let a = Front::start("a").await;
    let b = Front::start("b").await;
    let t = Tether::start(&cfg(
        &[&a, &b],
        &format!("{FAST}\n[state]\npartial_after = \"1s\"\n"),
    ))
    .await;
    let base = t.url("");
    let mut u = H2User::on(&base, "a").await;
    let mut others = Vec::new();
    for _ in 0..4 {
        others.push(H2User::on(&base, "a").await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The four pullers get stuck on slow exports from a.
    a.ctl.export_delay.store(3000, Ordering::SeqCst);
    for o in &mut others {
        o.turn(&base, None).await.unwrap();
    }
    // This user's capture is queued behind them.
    let r = u.turn(&base, None).await.unwrap();
    println!("queued turn: {} from {}", r.0, r.1);
    a.set(&a.ctl.health, 503);
    wait_state(&t, "a", "down").await;
    let gave_up = u.turn(&base, Some(Duration::from_millis(500))).await;
    println!("the move's client gave up: {gave_up:?}");
    u.acked
        .retain(|m| gave_up.is_ok() || m != &format!("h{}", u.n));
    a.set(&a.ctl.health, 0);
    a.ctl.export_delay.store(0, Ordering::SeqCst);
    wait_state(&t, "a", "up").await;
    tokio::time::sleep(Duration::from_secs(4)).await;

    for _ in 0..3 {
        let r = u.turn(&base, None).await.unwrap();
        println!("turn on the healthy worker: {} from {}", r.0, r.1);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let queue = metric(&t, "tether_capture_queue").await;
    let cookie_session = {
        // The session id is the one the worker echoes.
        let r = u
            .client
            .get(format!("{base}/whoami"))
            .header("cookie", format!("tether={}", u.cookie))
            .send()
            .await
            .unwrap();
        let v: Value = r.json().await.unwrap();
        v["session"].as_str().unwrap().to_owned()
    };
    let stored = stored_users(&t, &cookie_session).await;
    println!(
        "capture_queue {queue}; a holds {:?}\nstore holds {stored:?}\nacked {:?}",
        a.held(&cookie_session),
        u.acked
    );

    let acked_on_a = u.acked.clone();
    a.kill();
    let mut after = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        let r = u.turn(&base, None).await;
        after.push(format!(
            "{:?} in {:?}",
            r.as_ref().map(|x| (x.0, x.1.clone(), x.2.clone())),
            started.elapsed()
        ));
        if matches!(r, Ok((200, ..))) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("after a died: {after:#?}");
    let missing: Vec<&String> = acked_on_a.iter().filter(|m| !stored.contains(m)).collect();
    assert!(
        missing.is_empty(),
        "turns acknowledged on a healthy worker never reached the store: {missing:?}"
    );
    t.stop().await;
}

/// A graceful restart begins during a restore: the old process takes the
/// first thread and closes its connection; the new one would take the
/// second. The restore fills one process only (it fails rather than split
/// the threads), and the pin names the process that holds them.
#[tokio::test]
async fn a_restore_fills_one_process_and_the_pin_names_it() {
    let a = Front::start("a").await;
    let b = Front::start("b").await;
    let t = Tether::start(&cfg(&[&a, &b], FAST)).await;
    let base = t.url("");
    let mut u = chat_on(&base, "a").await;
    let (s, w, _, _) = raw_turn(&u.client, &base, "other-thread", "&thread=t2").await;
    println!("t2 turn: {s} from {w}");
    tokio::time::sleep(Duration::from_millis(500)).await;

    b.ctl.restart_after_import.store(true, Ordering::SeqCst);
    a.kill();
    let m = u.next_message();
    let out = u.turn(&base, &m).await;
    println!("after a died: {out:?}");
    let session = u.session.clone().unwrap();
    println!(
        "b (new process) holds main {:?} t2 {:?}",
        b.held(&session),
        b.held_thread(&session, "t2")
    );
    let (violations, text) = report(&[&u]);
    println!("{text}");
    assert!(violations.is_empty(), "{text}");
    t.stop().await;
}

/// A `Tether-Instance` longer than the cookie can hold is kept as a digest:
/// plain requests do not look like a restart (no move, no epoch bump).
#[tokio::test]
async fn a_long_instance_tag_does_not_move_the_session() {
    let long = "i".repeat(300);
    let wa = Worker::start_at("a", "127.0.0.1:0".parse().unwrap(), Some(&long)).await;
    let wb = Worker::start("b").await;
    let t = Tether::start(&config_text(&[&wa, &wb], "")).await;
    let c = loop {
        let c = user();
        let r = c.get(t.url("/")).send().await.unwrap();
        if worker_of(&r) == "a" {
            break c;
        }
    };
    let before = metric(&t, "tether_repins_total").await;
    for _ in 0..5 {
        let r = c.get(t.url("/")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let after = metric(&t, "tether_repins_total").await;
    println!("repins during 5 plain requests: {}", after - before);
    assert_eq!(after - before, 0.0, "every request moved the session");
    t.stop().await;
}

/// After a restart, the change-feed poller asks only the process its
/// cursor belongs to: the new process gets a new cursor at once, so turns
/// it announces only on its feed are captured (and survive a crash loop).
#[tokio::test]
async fn a_restarted_workers_change_feed_starts_a_new_cursor() {
    let a = Front::start("a").await;
    let b = Front::start("b").await;
    let t = Tether::start(&cfg(&[&a, &b], "[health]\ninterval = \"30s\"\n")).await;
    let base = t.url("");
    let mut u = chat_on(&base, "a").await;
    for i in 0..3 {
        let (s, w, _, shown) = raw_turn(&u.client, &base, &format!("later{i}"), "&later=1").await;
        assert_eq!((s, w.as_str()), (200, "a"));
        if shown.last() == Some(&format!("later{i}")) {
            u.acked.push(format!("later{i}"));
        }
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let session = u.session.clone().unwrap();
    println!(
        "before the restart the store holds {:?}",
        stored_users(&t, &session).await
    );

    a.restart().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for i in 0..2 {
        let (s, w, r, shown) = raw_turn(&u.client, &base, &format!("new{i}"), "&later=1").await;
        println!("turn on the new process: {s} from {w} restore {r:?} {shown:?}");
        if s == 200 && r.is_none() {
            u.acked.push(format!("new{i}"));
        }
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    println!(
        "a holds {:?}\nstore holds {:?}",
        a.held(&session),
        stored_users(&t, &session).await
    );

    a.restart().await;
    let m = u.next_message();
    let out = u.turn(&base, &m).await;
    println!("after the second restart: {out:?}");
    let (violations, text) = report(&[&u]);
    println!("{text}");
    assert!(violations.is_empty(), "{text}");
    t.stop().await;
}

/// A capture buffered during a store outage and flushed after newer
/// captures of the same thread were written directly never rolls the
/// thread's state back to an older turn.
#[sqlx::test(migrations = false)]
async fn a_late_flush_never_rolls_the_thread_state_back(pool: sqlx::PgPool) {
    let a = Front::start("a").await;
    let b = Front::start("b").await;
    let relay = Relay::start().await;
    let db = pool.connect_options().get_database().unwrap().to_owned();
    let t = Tether::start(&cfg(
        &[&a, &b],
        &format!(
            "{FAST}\n[state]\nstore = \"{}\"\nrestore_timeout = \"1s\"\n",
            relay.url(&db)
        ),
    ))
    .await;
    let base = t.url("");
    let mut u = chat_on(&base, "a").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let session = u.session.clone().unwrap();

    relay.cut();
    let m = u.next_message();
    assert!(u.turn(&base, &m).await.is_ok());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let buffered = metric(&t, "tether_capture_buffered").await;
    println!("buffered captures: {buffered}");
    relay.heal();
    // Any store call that succeeds turns the link back to connected (here
    // the session writer, for a new user); the watch flushes up to 1 s later.
    let _ = plain().get(t.url("/")).send().await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    let m = u.next_message();
    assert!(u.turn(&base, &m).await.is_ok());
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (seq, state): (i64, Option<String>) = sqlx::query_as(
        "SELECT seq, state FROM tether_threads WHERE session_id = $1 AND thread_id = 'main'",
    )
    .bind(&session)
    .fetch_one(&pool)
    .await
    .unwrap();
    println!(
        "stored head {seq}, state {state:?}; a holds {:?}",
        a.held(&session)
    );
    let turns = state
        .and_then(|s| serde_json::from_str::<Value>(&s).ok())
        .and_then(|v| v["turns"].as_i64());
    assert_eq!(
        turns,
        Some(seq / 2),
        "the stored state belongs to an older turn than the stored entries"
    );
    t.stop().await;
}

/// Two requests of a session arrive together after its worker failed (down,
/// still listening, its export failing) with an acknowledged turn the store
/// lacks: the first moves (partial, marked); the second, finding the move
/// done, is marked too.
#[tokio::test]
async fn a_request_following_a_partial_move_is_marked_too() {
    let a = Front::start("a").await;
    let b = Front::start("b").await;
    let t = Tether::start(&cfg(
        &[&a, &b],
        &format!("{FAST}\n[state]\npartial_after = \"50ms\"\n"),
    ))
    .await;
    let base = t.url("");
    let mut u = chat_on(&base, "a").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.set(&a.ctl.export, 500);
    let m = u.next_message();
    assert!(u.turn(&base, &m).await.is_ok());
    // Not killed: a dead worker's port refuses, and the move would know at
    // once that the turn is gone.
    a.set(&a.ctl.health, 503);
    wait_state(&t, "a", "down").await;
    // One move finds the turn missing and waits (503): the clock starts.
    let first = u
        .client
        .get(format!("{base}/chat?thread=main"))
        .send()
        .await
        .unwrap();
    println!("first read: {}", first.status());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let reads = (0..2).map(|_| {
        let c = u.client.clone();
        let url = format!("{base}/chat?thread=main");
        async move {
            let r = c.get(url).send().await.unwrap();
            let restore = r
                .headers()
                .get("tether-restore")
                .map(|v| v.to_str().unwrap().to_owned());
            let status = r.status().as_u16();
            let v: Value = r.json().await.unwrap_or(Value::Null);
            (
                status,
                restore,
                user_texts(v["history"].as_array().map(Vec::as_slice).unwrap_or(&[])),
            )
        }
    });
    let outs = futures_util::future::join_all(reads).await;
    println!("acked {:?}", u.acked);
    let mut silent = Vec::new();
    for o in &outs {
        println!("read: {o:?}");
        let lacks = u.lacks(&o.2);
        if o.0 == 200 && o.1.is_none() && !lacks.is_empty() {
            silent.push(lacks);
        }
    }
    assert!(
        silent.is_empty(),
        "2xx without Tether-Restore lacking {silent:?}"
    );
    t.stop().await;
}

/// Encoded, doubled or cased spellings of the reserved prefix (which a
/// worker's router may decode or normalise into `/_tether/...`) never
/// reach the worker.
#[tokio::test]
async fn reserved_prefix_spellings_never_reach_the_worker() {
    let w = Worker::start("a").await;
    let t = Tether::start(&config_text(&[&w], "")).await;
    let mut reached = Vec::new();
    for p in [
        "/%5Ftether/changes",
        "//_tether/changes",
        "/_TETHER/changes",
        "/_tether%2Fchanges",
    ] {
        let r = plain().get(t.url(p)).send().await.unwrap();
        println!("{p}: {} from {:?}", r.status(), worker_of(&r));
        if worker_of(&r) == "a" {
            reached.push(p);
        }
    }
    assert!(reached.is_empty(), "reached the worker: {reached:?}");
    t.stop().await;
}

/// A turn answered during the shutdown grace period is captured before
/// tether exits: when its worker later dies, the next tether restores it.
#[tokio::test]
async fn turns_answered_during_shutdown_grace_are_captured() {
    let a = Front::start("a").await;
    let b = Front::start("b").await;
    let dir = tempfile::tempdir().unwrap();
    let text = cfg(
        &[&a, &b],
        &format!(
            "{FAST}\n[state]\nstore = \"sqlite://{}/tether.db\"\n",
            dir.path().display()
        ),
    );
    let t1 = Tether::start(&text).await;
    let base1 = t1.url("");
    let c = plain();
    let mut cookie = String::new();
    let mut session = String::new();
    for i in 0..40 {
        let r = c
            .post(format!("{base1}/chat?thread=main&message=first{i}"))
            .send()
            .await
            .unwrap();
        let k = tether_cookie(&r);
        let v: Value = r.json().await.unwrap();
        if v["worker"] == "a" {
            cookie = k.unwrap();
            session = v["session"].as_str().unwrap().to_owned();
            break;
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (c2, k2, b2) = (c.clone(), cookie.clone(), base1.clone());
    let slow = tokio::spawn(async move {
        let r = c2
            .post(format!(
                "{b2}/chat?thread=main&message=during-shutdown&delay=1500"
            ))
            .header("cookie", format!("tether={k2}"))
            .send()
            .await
            .unwrap();
        let s = r.status().as_u16();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        (
            s,
            user_texts(v["history"].as_array().map(Vec::as_slice).unwrap_or(&[])),
        )
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    t1.stop().await; // SIGTERM: returns once in-flight requests are done
    let acked = slow.await.unwrap();
    println!("answered during the grace period: {acked:?}");

    let t2 = Tether::start(&text).await;
    wait_state(&t2, "a", "up").await;
    let stored = {
        let url = format!("sqlite://{}/tether.db", dir.path().display());
        let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
        let bodies: Vec<String> = sqlx::query_scalar("SELECT body FROM tether_entries WHERE session_id = $1 AND thread_id = 'main' ORDER BY seq").bind(&session).fetch_all(&pool).await.unwrap();
        user_texts(
            &bodies
                .iter()
                .map(|b| serde_json::from_str(b).unwrap())
                .collect::<Vec<Value>>(),
        )
    };
    println!("after the restart the store holds {stored:?}");
    a.kill();
    let mut last = None;
    for _ in 0..20 {
        let r = c
            .post(format!("{}/chat?thread=main&message=after", t2.url("")))
            .header("cookie", format!("tether={cookie}"))
            .send()
            .await
            .unwrap();
        let s = r.status().as_u16();
        let restore = r
            .headers()
            .get("tether-restore")
            .map(|v| v.to_str().unwrap().to_owned());
        let v: Value = r.json().await.unwrap_or(Value::Null);
        last = Some((
            s,
            v["worker"].as_str().unwrap_or("").to_owned(),
            restore,
            user_texts(v["history"].as_array().map(Vec::as_slice).unwrap_or(&[])),
        ));
        if s == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("after a died: {last:?}");
    let (s, _, restore, hist) = last.unwrap();
    let silent = acked.0 == 200
        && s == 200
        && restore.is_none()
        && !hist.contains(&"during-shutdown".to_owned());
    assert!(
        !silent,
        "the turn acknowledged during shutdown is silently gone"
    );
    t2.stop().await;
}

/// A worker that shows `Tether-Instance` on its responses but not on its
/// health answer cannot be checked per connection: after its restart the
/// first answer comes from the empty process, and it is marked (never a
/// silent answer without history).
#[tokio::test]
async fn an_answer_from_an_unverified_new_process_is_marked() {
    let a = Front::start("a").await;
    let b = Front::start("b").await;
    a.ctl.health_no_instance.store(true, Ordering::SeqCst);
    b.ctl.health_no_instance.store(true, Ordering::SeqCst);
    let t = Tether::start(&cfg(&[&a, &b], "")).await;
    let base = t.url("");
    let mut u = chat_on(&base, "a").await;
    let m = u.next_message();
    assert!(u.turn(&base, &m).await.is_ok());
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.restart().await;
    let m = u.next_message();
    let out = u.turn(&base, &m).await;
    println!("first turn after the restart: {out:?}");
    let (violations, text) = report(&[&u]);
    println!("{text}");
    assert!(violations.is_empty(), "{text}");
    t.stop().await;
}
