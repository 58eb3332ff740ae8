//! Recovery after the harder interleavings a second reliability review
//! found: a re-pin whose restore failed, workers that keep their own copy
//! of a thread, `continue` mode through a store outage, sync capture, a
//! graceful stop with captures waiting for a retry, and the bounds of
//! tether's memory of moves. Each test asserts README "What survives what".

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::Value;

use crate::support::front::*;
use crate::support::turns::{report, user_texts};
use crate::support::*;

async fn read(c: &reqwest::Client, base: &str) -> (u16, String, Option<String>, Vec<String>) {
    let r = c
        .get(format!("{base}/chat?thread=main"))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let restore = r
        .headers()
        .get("tether-restore")
        .map(|v| v.to_str().unwrap().to_owned());
    let v: Value = r.json().await.unwrap_or(Value::Null);
    let hist = v["history"].as_array().cloned().unwrap_or_default();
    (
        status,
        v["worker"].as_str().unwrap_or("").to_owned(),
        restore,
        user_texts(&hist),
    )
}

/// The re-pin's compare-and-set is won (store: epoch 2 on b) but the
/// import into b fails (503 to the client), and a comes back. The won
/// re-pin is remembered: the session's next request finishes the move
/// instead of being served by a under the old epoch (whose captures the
/// fence would refuse). When a later dies, nothing is lost unmarked.
#[tokio::test]
async fn a_repin_whose_restore_failed_is_finished_before_the_old_worker_serves_again() {
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
    println!(
        "turn while a is down, b refuses imports: {:?}",
        u.turn(&base, &m).await
    );
    a.set(&a.ctl.health, 0);
    b.set(&b.ctl.import, 0);
    wait_state(&t, "a", "up").await;

    // A human pace: each turn's capture ends (fenced) before the next turn.
    let mut marks = 0;
    for _ in 0..4 {
        let m = u.next_message();
        let out = u.turn(&base, &m).await;
        if let crate::support::turns::Outcome::Ok {
            restore: Some(_), ..
        } = &out
        {
            marks += 1;
        }
        println!("turn on a (epoch 1): {:?}", brief(&out));
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let (s, w, restore, shown) = read(&u.client, &base).await;
    println!("read: {s} from {w} restore {restore:?} shows {shown:?}");
    if restore.is_some() {
        // tether said so: the client goes on from what it was shown.
        u.acked = shown;
    }
    let session = u.session.clone().unwrap();
    println!(
        "partial marks on 4 turns at human pace: {marks}; fenced {}; store holds {:?}",
        metric(&t, "tether_capture_fenced_total").await,
        stored_users(&t, &session).await
    );

    a.kill();
    let out = u
        .until_ok(&base, Duration::from_secs(5), Duration::from_millis(100))
        .await;
    println!("after a died: {:?}", out.as_ref().map(brief));
    let (violations, text) = report(&[&u]);
    println!("{text}");
    assert!(violations.is_empty(), "{text}");
    t.stop().await;
}

fn brief(o: &crate::support::turns::Outcome) -> String {
    match o {
        crate::support::turns::Outcome::Ok {
            worker,
            history,
            restore,
        } => format!(
            "2xx from {worker} restore {restore:?} shows {:?}",
            user_texts(history)
        ),
        other => format!("{other:?}"),
    }
}

/// A worker answers 502 when its own upstream (an LLM API) rejects one
/// client's input: three such requests do not eject it (a probe must
/// confirm), and the other users on it stay.
#[tokio::test]
async fn a_client_provoked_502_does_not_eject_a_healthy_worker() {
    use http_body_util::Full;
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    async fn serve(id: &'static str) -> std::net::SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let svc = service_fn(
                        move |req: http::Request<hyper::body::Incoming>| async move {
                            // The worker's LLM call fails on this client's input: it
                            // answers 502 Bad Gateway (a common mapping).
                            let bad = req.uri().query().unwrap_or("").contains("prompt=too-long");
                            let mut r = http::Response::new(Full::new(bytes::Bytes::from(id)));
                            if bad {
                                *r.status_mut() = http::StatusCode::BAD_GATEWAY;
                            }
                            r.headers_mut().insert("x-worker", id.parse().unwrap());
                            Ok::<_, std::convert::Infallible>(r)
                        },
                    );
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        addr
    }
    let (aa, ab) = (serve("a").await, serve("b").await);
    let text = format!(
        "[listen]\nhttp = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n[affinity]\nkeys = [\"{}\"]\n\n\
         [[backends]]\nid = \"a\"\nurl = \"http://{aa}\"\n\n[[backends]]\nid = \"b\"\nurl = \"http://{ab}\"\n\n\
         [passive]\nfailures = 3\n",
        key_b64(1)
    );
    let t = Tether::start(&text).await;
    let on_a = || async {
        loop {
            let c = user();
            let r = c.get(t.url("/")).send().await.unwrap();
            if worker_of(&r) == "a" {
                return c;
            }
        }
    };
    let bystander = on_a().await;
    let attacker = on_a().await;
    for _ in 0..3 {
        let r = attacker
            .get(t.url("/chat?prompt=too-long"))
            .send()
            .await
            .unwrap();
        println!("attacker: {}", r.status());
    }
    let ejections = metric(&t, "tether_ejections_total").await;
    let r = bystander.get(t.url("/")).send().await.unwrap();
    let now = worker_of(&r);
    println!("ejections {ejections}; the bystander is now on {now}");
    assert!(
        ejections == 0.0 && now == "a",
        "three 502s one client provoked ejected worker a and moved its users"
    );
    t.stop().await;
}

/// Under `on_restore_failure = "continue"`, tether's memory that a session
/// was forwarded without its history is never evicted by other sessions'
/// moves (a tiny `max_sessions` makes the bound bite): its answers stay
/// marked and its restore keeps being retried.
#[tokio::test]
async fn memory_of_a_session_without_history_survives_many_other_moves() {
    let a = Front::start("a").await;
    let b = Front::start("b").await;
    let c = Front::start("c").await;
    let t = Tether::start(&cfg(
        &[&a, &b, &c],
        &format!(
            "{FAST}\n[state]\non_restore_failure = \"continue\"\n\n[limits]\nmax_sessions = 32\n"
        ),
    ))
    .await;
    let base = t.url("");
    let mut x = chat_on(&base, "a").await;
    let first = x.acked.clone();
    tokio::time::sleep(Duration::from_millis(500)).await;
    b.set(&b.ctl.import, 503);
    c.set(&c.ctl.import, 503);
    a.kill();
    wait_state(&t, "a", "down").await;
    let m = x.next_message();
    let out = x.turn(&base, &m).await;
    println!("x after a died, imports refused: {}", brief(&out));
    b.set(&b.ctl.import, 0);
    c.set(&c.ctl.import, 0);
    let w = x.worker.clone().unwrap();
    let (v, vid) = if w == "b" { (&c, "c") } else { (&b, "b") };
    // Other users' moves: 120 sessions on v, restarted in place.
    let mut others = Vec::new();
    while others.len() < 120 {
        let o = user();
        let r = o.get(t.url("/chat?thread=main")).send().await.unwrap();
        let v: Value = r.json().await.unwrap();
        if v["worker"] == vid {
            others.push(o);
        }
    }
    v.restart().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut moved = 0;
    for o in &others {
        if o.get(t.url("/chat?thread=main"))
            .send()
            .await
            .unwrap()
            .status()
            == 200
        {
            moved += 1;
        }
    }
    println!("{moved} other sessions moved (restored in place on {vid})");
    let (s, on, restore, shown) = read(&x.client, &base).await;
    println!("x now: {s} from {on} restore {restore:?} shows {shown:?} (acknowledged before the loss: {first:?})");
    let silent = s == 200 && restore.is_none() && !first.iter().all(|m| shown.contains(m));
    assert!(
        !silent,
        "2xx without history and without Tether-Restore after the override was evicted"
    );
    t.stop().await;
}

/// A capture whose first pull failed (a transient export error) waits for
/// its back-off retry when tether is stopped: the graceful stop pulls it
/// too, so the turn is stored for the next tether process.
#[tokio::test]
async fn a_capture_waiting_for_its_retry_is_pulled_on_a_graceful_stop() {
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
    let mut u = chat_on(&base1, "a").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.set(&a.ctl.export, 500);
    let m = u.next_message();
    assert!(u.turn(&base1, &m).await.is_ok());
    tokio::time::sleep(Duration::from_millis(100)).await;
    a.set(&a.ctl.export, 0); // the retry (in 400 ms) would succeed
    t1.stop().await; // SIGTERM
    let session = u.session.clone().unwrap();

    let t2 = Tether::start(&text).await;
    let base2 = t2.url("");
    wait_state(&t2, "a", "up").await;
    let stored = {
        let url = format!("sqlite://{}/tether.db", dir.path().display());
        let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
        let bodies: Vec<String> = sqlx::query_scalar(
            "SELECT body FROM tether_entries WHERE session_id = $1 AND thread_id = 'main' ORDER BY seq",
        )
        .bind(&session)
        .fetch_all(&pool)
        .await
        .unwrap();
        user_texts(
            &bodies
                .iter()
                .map(|b| serde_json::from_str(b).unwrap())
                .collect::<Vec<Value>>(),
        )
    };
    println!(
        "after the graceful stop the store holds {stored:?}; acked {:?}",
        u.acked
    );
    a.kill();
    let out = u
        .until_ok(&base2, Duration::from_secs(5), Duration::from_millis(100))
        .await;
    println!("after a died: {:?}", out.as_ref().map(brief));
    let (violations, text) = report(&[&u]);
    println!("{text}");
    assert!(violations.is_empty(), "{text}");
    t2.stop().await;
}

/// A restore into a worker that keeps its own copy (409) is marked partial
/// once; the stored thread follows the worker's copy, so the answers after
/// it (which show exactly what the user saw) are not marked again.
#[tokio::test]
async fn one_divergent_restore_is_marked_once() {
    let a = Front::start("a").await;
    let b = Front::start("b").await;
    let t = Tether::start(&cfg(&[&a, &b], FAST)).await;
    let base = t.url("");
    let mut u = chat_on(&base, "a").await;
    let m = u.next_message();
    assert!(u.turn(&base, &m).await.is_ok());
    tokio::time::sleep(Duration::from_millis(400)).await;
    let session = u.session.clone().unwrap();
    {
        let p = b.ctl.proc.lock().unwrap();
        p.refs.last().unwrap().worker.seed(
            &session,
            "main",
            vec![serde_json::json!({"seq": 1, "role": "user", "text": "b's own"})],
        );
    }
    a.kill();
    wait_state(&t, "a", "down").await;
    let mut marks = Vec::new();
    for _ in 0..6 {
        let m = u.next_message();
        let out = u.turn(&base, &m).await;
        marks.push(match &out {
            crate::support::turns::Outcome::Ok { restore, .. } => restore.clone(),
            other => Some(format!("{other:?}")),
        });
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    println!(
        "marks on 6 turns after one 409: {marks:?}; diverged captures {}",
        metric(&t, "tether_captures_total").await
    );
    let later = marks[1..].iter().filter(|m| m.is_some()).count();
    assert!(
        later == 0,
        "{later} of the 5 turns after the one partial restore were marked partial too"
    );
    t.stop().await;
}

/// `on_restore_failure = "continue"` and a store outage: the session's
/// worker dies during the outage and its requests go to W without history
/// (marked). W's captures, buffered during the outage, build on an entry
/// the store holds differently: the flush refuses them (no splice of two
/// histories) and the stored thread follows W's copy once the store is
/// back. When W dies too, nothing is lost unmarked.
#[sqlx::test(migrations = false)]
async fn continue_during_a_store_outage_never_splices_the_store(pool: sqlx::PgPool) {
    let a = Front::start("a").await;
    let b = Front::start("b").await;
    let c = Front::start("c").await;
    let relay = Relay::start().await;
    let db = pool.connect_options().get_database().unwrap().to_owned();
    let t = Tether::start(&cfg(
        &[&a, &b, &c],
        &format!(
            "{FAST}\n[state]\nstore = \"{}\"\nrestore_timeout = \"1s\"\non_restore_failure = \"continue\"\n",
            relay.url(&db)
        ),
    ))
    .await;
    let base = t.url("");
    let mut u = chat_on(&base, "a").await;
    for _ in 0..2 {
        let m = u.next_message();
        assert!(u.turn(&base, &m).await.is_ok());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let session = u.session.clone().unwrap();

    relay.cut();
    a.kill();
    wait_state(&t, "a", "down").await;
    for _ in 0..5 {
        let m = u.next_message();
        let out = u.turn(&base, &m).await;
        println!("during the outage: {}", brief(&out));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("buffered: {}", metric(&t, "tether_capture_buffered").await);
    relay.heal();
    let _ = plain().get(t.url("/")).send().await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let stored: Vec<String> = {
        let bodies: Vec<String> = sqlx::query_scalar(
            "SELECT body FROM tether_entries WHERE session_id = $1 AND thread_id = 'main' ORDER BY seq",
        )
        .bind(&session)
        .fetch_all(&pool)
        .await
        .unwrap();
        bodies
            .iter()
            .map(|b| {
                let v: Value = serde_json::from_str(b).unwrap();
                format!(
                    "{}:{}",
                    v["role"].as_str().unwrap_or(""),
                    v["text"].as_str().unwrap_or("")
                )
            })
            .collect()
    };
    let w = u.worker.clone().unwrap();
    println!("after the outage the store holds {stored:#?}");
    for _ in 0..3 {
        let m = u.next_message();
        let out = u.turn(&base, &m).await;
        println!("after the outage: {}", brief(&out));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let wf = if w == "b" { &b } else { &c };
    wf.kill();
    let out = u
        .until_ok(&base, Duration::from_secs(5), Duration::from_millis(100))
        .await;
    println!("after {w} died: {:?}", out.as_ref().map(brief));
    let (violations, text) = report(&[&u]);
    println!("{text}");
    let spliced = stored.iter().any(|e| e.contains(&format!("{w} heard")))
        && stored
            .iter()
            .take(6)
            .all(|e| !e.contains(&format!("{w} heard")));
    assert!(
        violations.is_empty() && !spliced,
        "store spliced: {spliced}\n{text}"
    );
    t.stop().await;
}

/// The same 409 with `state.capture = "sync"`: the stored thread follows
/// the worker's copy, so every later turn is captured and answered 2xx
/// (not 502 while the healthy worker runs it).
#[tokio::test]
async fn sync_capture_after_a_divergent_restore_keeps_answering() {
    let a = Front::start("a").await;
    let b = Front::start("b").await;
    let t = Tether::start(&cfg(
        &[&a, &b],
        &format!("{FAST}\n[state]\ncapture = \"sync\"\n"),
    ))
    .await;
    let base = t.url("");
    let mut u = chat_on(&base, "a").await;
    let m = u.next_message();
    assert!(u.turn(&base, &m).await.is_ok());
    let session = u.session.clone().unwrap();
    {
        let p = b.ctl.proc.lock().unwrap();
        p.refs.last().unwrap().worker.seed(
            &session,
            "main",
            vec![serde_json::json!({"seq": 1, "role": "user", "text": "b's own"})],
        );
    }
    a.kill();
    wait_state(&t, "a", "down").await;
    let mut outs = Vec::new();
    for _ in 0..6 {
        let m = u.next_message();
        let out = u.turn(&base, &m).await;
        outs.push(brief(&out));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("{outs:#?}\nb holds {:?}", b.held(&session));
    let ok = outs.iter().filter(|o| o.starts_with("2xx")).count();
    assert!(
        ok >= 5,
        "only {ok} of 6 turns after the 409 were answered 2xx"
    );
    t.stop().await;
}

/// After a 409 the worker keeps its own, shorter copy; its next turns have
/// seqs below the old stored head. They are stored all the same (the
/// stored thread follows the worker's copy), so when that worker dies the
/// next one gets them.
#[tokio::test]
async fn turns_on_a_shorter_divergent_copy_are_stored() {
    let a = Front::start("a").await;
    let b = Front::start("b").await;
    let c = Front::start("c").await;
    let t = Tether::start(&cfg(&[&a, &b, &c], FAST)).await;
    let base = t.url("");
    let mut u = chat_on(&base, "a").await;
    for _ in 0..3 {
        let m = u.next_message();
        assert!(u.turn(&base, &m).await.is_ok());
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let session = u.session.clone().unwrap();
    for w in [&b, &c] {
        let p = w.ctl.proc.lock().unwrap();
        p.refs.last().unwrap().worker.seed(
            &session,
            "main",
            vec![serde_json::json!({"seq": 1, "role": "user", "text": "own copy"})],
        );
    }
    a.kill();
    wait_state(&t, "a", "down").await;
    for _ in 0..3 {
        let m = u.next_message();
        let out = u.turn(&base, &m).await;
        println!("after a died: {}", brief(&out));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let x = u.worker.clone().unwrap();
    let (xf, yf) = if x == "b" { (&b, &c) } else { (&c, &b) };
    yf.restart().await; // the next worker holds nothing (201 on restore)
    tokio::time::sleep(Duration::from_millis(300)).await;
    xf.kill();
    let out = u
        .until_ok(&base, Duration::from_secs(5), Duration::from_millis(100))
        .await;
    println!("after {x} died: {:?}", out.as_ref().map(brief));
    let (violations, text) = report(&[&u]);
    println!("{text}");
    assert!(violations.is_empty(), "{text}");
    t.stop().await;
}

/// The failed-restore interleaving above with `state.capture = "sync"`:
/// once a is back, every turn is answered 2xx (the move is finished
/// first), not 502 while a runs it.
#[tokio::test]
async fn sync_turns_after_a_failed_restore_keep_answering() {
    let a = Front::start("a").await;
    let b = Front::start("b").await;
    let t = Tether::start(&cfg(
        &[&a, &b],
        &format!("{FAST}\n[state]\ncapture = \"sync\"\n"),
    ))
    .await;
    let base = t.url("");
    let mut u = chat_on(&base, "a").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    b.set(&b.ctl.import, 503);
    a.set(&a.ctl.health, 503);
    wait_state(&t, "a", "down").await;
    let m = u.next_message();
    println!(
        "turn while a is down, b refuses imports: {:?}",
        u.turn(&base, &m).await
    );
    a.set(&a.ctl.health, 0);
    b.set(&b.ctl.import, 0);
    wait_state(&t, "a", "up").await;
    let mut outs = Vec::new();
    for _ in 0..5 {
        let m = u.next_message();
        outs.push(brief(&u.turn(&base, &m).await));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let session = u.session.clone().unwrap();
    println!("{outs:#?}\na holds {:?}", a.held(&session));
    let ok = outs.iter().filter(|o| o.starts_with("2xx")).count();
    assert!(
        ok == 5,
        "only {ok} of 5 turns on the healthy worker were answered 2xx"
    );
    t.stop().await;
}

/// A worker without `Tether-Instance` on its health answer restarts: the
/// first answer comes from the empty process (marked), the restore that
/// follows meets that fresh thread (409), and the session recovers: when
/// the worker later dies, nothing is lost unmarked.
#[tokio::test]
async fn after_an_unverified_restart_the_session_recovers() {
    let a = Front::start("a").await;
    let b = Front::start("b").await;
    let c = Front::start("c").await;
    for f in [&a, &b, &c] {
        f.ctl.health_no_instance.store(true, Ordering::SeqCst);
    }
    let t = Tether::start(&cfg(&[&a, &b, &c], FAST)).await;
    let base = t.url("");
    let mut u = chat_on(&base, "a").await;
    for _ in 0..3 {
        let m = u.next_message();
        assert!(u.turn(&base, &m).await.is_ok());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.restart().await;
    let mut outs = Vec::new();
    for _ in 0..3 {
        let m = u.next_message();
        outs.push(brief(&u.turn(&base, &m).await));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    println!("{outs:#?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.kill();
    let out = u
        .until_ok(&base, Duration::from_secs(5), Duration::from_millis(100))
        .await;
    println!("after a died: {:?}", out.as_ref().map(brief));
    let (violations, text) = report(&[&u]);
    println!("{text}");
    assert!(violations.is_empty(), "{text}");
    t.stop().await;
}

/// A turn the worker acknowledged but could not export (its export failed)
/// when the worker is killed: the process that held it is gone (its port
/// refuses connections), so the move does not wait `state.partial_after`
/// for it; the next answer comes at once, marked partial.
#[tokio::test]
async fn a_killed_workers_unexported_turn_is_marked_at_once() {
    let a = Front::start("a").await;
    let b = Front::start("b").await;
    let t = Tether::start(&cfg(&[&a, &b], FAST)).await;
    let base = t.url("");
    let mut u = chat_on(&base, "a").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.set(&a.ctl.export, 500);
    let m = u.next_message();
    assert!(u.turn(&base, &m).await.is_ok());
    a.kill();
    let out = u
        .until_ok(&base, Duration::from_secs(5), Duration::from_millis(100))
        .await;
    println!("after a died: {:?}", out.as_ref().map(brief));
    let out = out.expect("a 2xx within 5 s after the worker died");
    let crate::support::turns::Outcome::Ok { restore, .. } = &out else {
        unreachable!("until_ok returns a 2xx");
    };
    assert_eq!(restore.as_deref(), Some("partial"), "{}", brief(&out));
    let (violations, text) = report(&[&u]);
    println!("{text}");
    assert!(violations.is_empty(), "{text}");
    t.stop().await;
}

/// Other clients flood the capture ledger (bounded by `state.queue`) with
/// announcing turns while this user's capture waits: records are dropped to
/// make room (the user's, or others'), and the user's next answer after its
/// worker dies is marked (never a silent loss).
#[tokio::test]
async fn a_flooded_capture_ledger_marks_the_sessions_it_drops() {
    let a = Front::start("a").await;
    let b = Front::start("b").await;
    let t = Tether::start(&cfg(&[&a, &b], &format!("{FAST}\n[state]\nqueue = 8\n"))).await;
    let base = t.url("");
    let mut u = chat_on(&base, "a").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The victim's next capture fails (and waits for a retry).
    a.set(&a.ctl.export, 500);
    let m = u.next_message();
    assert!(u.turn(&base, &m).await.is_ok());
    // The flood: new sessions, one announcing turn each.
    for i in 0..40 {
        let c = plain();
        let r = c
            .post(format!("{base}/chat?thread=main&message=flood{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    assert!(metric(&t, "tether_capture_dropped_total").await > 0.0);
    a.kill();
    let out = u
        .until_ok(&base, Duration::from_secs(5), Duration::from_millis(100))
        .await;
    println!("after a died: {:?}", out.as_ref().map(brief));
    assert!(out.is_some(), "no 2xx after the worker died");
    let (violations, text) = report(&[&u]);
    println!("{text}");
    assert!(violations.is_empty(), "{text}");
    t.stop().await;
}
