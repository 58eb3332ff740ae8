//! State continuity: conversations survive the loss of their worker.
//! Reference workers (the whole contract), SQLite for single-node tests,
//! the real PostgreSQL (a fresh database per test) for replicas.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;

use crate::support::*;

const FAST: &str = "[health]\ninterval = \"100ms\"\ntimeout = \"200ms\"\nfall = 2\nrise = 2\n";

async fn say(client: &reqwest::Client, base: &str, msg: &str) -> Value {
    let resp = client
        .post(format!("{base}/chat?thread=main&message={msg}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "message {msg}: {:?}", resp.headers());
    assert!(resp.headers().get("tether-restore").is_none());
    resp.json().await.unwrap()
}

fn texts(v: &Value) -> Vec<String> {
    v["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["text"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn killed_worker_conversations_continue_with_full_history() {
    let (a, b, c) = (
        Ref::start("a").await,
        Ref::start("b").await,
        Ref::start("c").await,
    );
    let t = Tether::start(&ref_config(&[&a, &b, &c], FAST)).await;
    let base = t.url("");
    let mut users = Vec::new();
    for _ in 0..9 {
        let client = user();
        let mut last = Value::Null;
        for m in 1..=4 {
            last = say(&client, &base, &format!("m{m}")).await;
        }
        users.push((
            client,
            last["worker"].as_str().unwrap().to_owned(),
            texts(&last),
        ));
    }
    captured(&[&t], 9.0 * 8.0).await;
    let mut per: HashMap<&str, usize> = HashMap::new();
    for (_, w, _) in &users {
        *per.entry(w.as_str()).or_default() += 1;
    }
    let victim = ["a", "b", "c"]
        .into_iter()
        .max_by_key(|w| per.get(w).copied().unwrap_or(0))
        .unwrap();
    let refs = [&a, &b, &c];
    refs.iter().find(|r| r.id == victim).unwrap().kill();

    for (client, before, history) in &users {
        let v = say(client, &base, "m5").await;
        let now = texts(&v);
        assert_eq!(now.len(), 10, "history after the loss: {now:?}");
        assert_eq!(&now[..8], &history[..], "history changed");
        if before == victim {
            assert_ne!(v["worker"], victim);
        } else {
            assert_eq!(
                v["worker"].as_str().unwrap(),
                before,
                "a user of a live worker moved"
            );
        }
    }
    let affected = per[victim] as u64;
    let survivors: Vec<_> = refs.iter().filter(|r| r.id != victim).collect();
    let created: u64 = survivors.iter().map(|r| r.stats().created).sum();
    let merged: u64 = survivors.iter().map(|r| r.stats().merged).sum();
    assert_eq!(created, affected, "exactly one 201 import per lost thread");
    assert_eq!(merged, 0);
    for r in refs {
        assert_eq!(r.stats().deletes, 0);
        assert_eq!(r.stats().empty_imports, 0);
    }
    assert!(metric(&t, "tether_restores_total").await >= affected as f64);
    t.stop().await;
}

#[tokio::test]
async fn a_worker_restarted_with_empty_memory_gets_the_history_back_first() {
    let (a, b) = (Ref::start("a").await, Ref::start("b").await);
    let t = Tether::start(&ref_config(&[&a, &b], FAST)).await;
    let base = t.url("");
    let mut tries = 0.0;
    let client = loop {
        let c = user();
        tries += 1.0;
        if say(&c, &base, "hello").await["worker"] == "a" {
            break c;
        }
    };
    say(&client, &base, "again").await;
    // Every try stored two entries; ours two more.
    captured(&[&t], 2.0 * tries + 2.0).await;
    let addr = a.addr;
    a.kill();
    let a2 = Ref::start_at("a", addr).await;
    let want = a2.worker.instance().to_owned();
    for _ in 0..200 {
        let list: Vec<Value> = plain()
            .get(t.admin_url("/backends"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if list
            .iter()
            .any(|b| b["id"] == "a" && b["instance"] == want.as_str())
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let v = say(&client, &base, "after restart").await;
    assert_eq!(v["worker"], "a");
    let now = texts(&v);
    assert_eq!(now.len(), 6, "{now:?}");
    assert!(now[0].contains("hello"));
    assert_eq!(a2.stats().created, 1);
    t.stop().await;
}

#[tokio::test]
async fn a_divergent_copy_on_the_new_worker_is_kept() {
    let (a, b) = (Ref::start("a").await, Ref::start("b").await);
    let t = Tether::start(&ref_config(&[&a, &b], FAST)).await;
    let base = t.url("");
    let mut tries = 0.0;
    let (client, session) = loop {
        let c = user();
        tries += 1.0;
        let v = say(&c, &base, "one").await;
        if v["worker"] == "a" {
            break (c, v["session"].as_str().unwrap().to_owned());
        }
    };
    say(&client, &base, "two").await;
    captured(&[&t], 2.0 * tries + 2.0).await;
    b.worker.seed(
        &session,
        "main",
        vec![serde_json::json!({"seq": 1, "role": "user", "text": "b's own copy"})],
    );
    a.kill();
    let resp = client
        .post(format!("{base}/chat?thread=main&message=three"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // b serves its own copy, without the turns the store holds: the client
    // is told its history is partial.
    assert_eq!(
        resp.headers()
            .get("tether-restore")
            .map(|v| v.to_str().unwrap()),
        Some("partial")
    );
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["worker"], "b");
    let now = texts(&v);
    assert_eq!(
        now[0], "b's own copy",
        "the worker's thread was overwritten: {now:?}"
    );
    assert_eq!(b.stats().diverged, 1);
    assert_eq!(b.stats().created, 0);
    t.stop().await;
}

#[tokio::test]
async fn a_reply_seen_only_on_the_change_feed_is_captured_and_restored() {
    let (a, b) = (Ref::start("a").await, Ref::start("b").await);
    let t = Tether::start(&ref_config(&[&a, &b], FAST)).await;
    let base = t.url("");
    let mut tries = 0.0;
    let client = loop {
        let c = user();
        tries += 1.0;
        let resp = c
            .post(format!("{base}/chat?thread=main&message=question&later=1"))
            .send()
            .await
            .unwrap();
        assert!(resp.headers().get("tether-checkpoint").is_none());
        let v: Value = resp.json().await.unwrap();
        if v["worker"] == "a" {
            assert_eq!(texts(&v).len(), 1, "the reply comes later");
            break c;
        }
    };
    // Each try's question and late reply reach the store.
    captured(&[&t], 2.0 * tries).await;
    a.kill();
    let v = say(&client, &base, "follow-up").await;
    assert_eq!(v["worker"], "b");
    let now = texts(&v);
    assert!(now[1].contains("answered"), "late reply lost: {now:?}");
    assert_eq!(now.len(), 4);
    t.stop().await;
}

#[sqlx::test(migrations = false)]
async fn two_replicas_route_alike_and_restore_exactly_once(pool: sqlx::PgPool) {
    let (a, b, c) = (
        Ref::start("a").await,
        Ref::start("b").await,
        Ref::start("c").await,
    );
    let text =
        ref_config(&[&a, &b, &c], FAST) + &format!("\n[state]\nstore = \"{}\"\n", pg_url(&pool));
    let (t1, t2) = (Tether::start(&text).await, Tether::start(&text).await);
    let client = user();
    let first = say(&client, &t1.url(""), "one").await;
    let worker = first["worker"].as_str().unwrap().to_owned();
    for m in ["two", "three"] {
        // The cookie from one replica routes identically on the other.
        assert_eq!(
            say(&client, &t2.url(""), m).await["worker"],
            worker.as_str()
        );
    }
    captured(&[&t1, &t2], 6.0).await;
    let refs = [&a, &b, &c];
    refs.iter().find(|r| r.id == worker).unwrap().kill();

    let (u1, u2) = (t1.url(""), t2.url(""));
    let (r1, r2) = tokio::join!(say(&client, &u1, "x1"), say(&client, &u2, "x2"));
    assert_eq!(
        r1["worker"], r2["worker"],
        "the replicas chose different workers"
    );
    for r in [&r1, &r2] {
        let now = texts(r);
        assert!(now.len() >= 8, "{now:?}");
        assert!(
            now[0].contains("one") && now[2].contains("two") && now[4].contains("three"),
            "{now:?}"
        );
    }
    let imports: u64 = refs
        .iter()
        .map(|r| r.stats().created + r.stats().merged)
        .sum();
    assert_eq!(
        imports, 1,
        "one thread, restored exactly once across replicas"
    );
    t1.stop().await;
    t2.stop().await;
}

#[sqlx::test(migrations = false)]
async fn header_keyed_conversations_route_alike_across_replicas_and_survive_a_kill(
    pool: sqlx::PgPool,
) {
    let (a, b) = (Ref::start("a").await, Ref::start("b").await);
    let text = ref_config(&[&a, &b], FAST).replace(
        "[affinity]\n",
        "[affinity]\nkey = [\"header:x-conversation-id\", \"cookie\"]\n",
    ) + &format!("\n[state]\nstore = \"{}\"\n", pg_url(&pool));
    let (t1, t2) = (Tether::start(&text).await, Tether::start(&text).await);
    let client = plain();
    let send = |t: &Tether, m: &str| {
        client
            .post(t.url(&format!("/chat?thread=main&message={m}")))
            .header("x-conversation-id", "conv-42")
            .send()
    };
    let v: Value = send(&t1, "one").await.unwrap().json().await.unwrap();
    let worker = v["worker"].as_str().unwrap().to_owned();
    send(&t1, "two").await.unwrap();
    // The pin reaches the store through the background writer.
    for _ in 0..200 {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM tether_sessions")
            .fetch_one(&pool)
            .await
            .unwrap();
        if n > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let v: Value = send(&t2, "three").await.unwrap().json().await.unwrap();
    assert_eq!(
        v["worker"],
        worker.as_str(),
        "the other replica routed the key elsewhere"
    );
    captured(&[&t1, &t2], 6.0).await;
    [&a, &b].iter().find(|r| r.id == worker).unwrap().kill();
    let resp = send(&t2, "four").await.unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_ne!(v["worker"], worker.as_str());
    let now = texts(&v);
    assert_eq!(now.len(), 8, "{now:?}");
    t1.stop().await;
    t2.stop().await;
}

#[sqlx::test(migrations = false)]
async fn store_outage_keeps_pinned_users_served_and_capture_catches_up(pool: sqlx::PgPool) {
    let a = Ref::start("a").await;
    let relay = Relay::start().await;
    let db = pool.connect_options().get_database().unwrap().to_owned();
    let url = relay.url(&db);
    let text = ref_config(&[&a], FAST)
        + &format!("\n[state]\nstore = \"{url}\"\nrestore_timeout = \"1s\"\n");
    let t = Tether::start(&text).await;
    let client = user();
    let v = say(&client, &t.url(""), "before").await;
    let session = v["session"].as_str().unwrap().to_owned();
    captured(&[&t], 2.0).await;

    relay.cut();
    for m in ["down1", "down2", "down3"] {
        say(&client, &t.url(""), m).await;
    }
    let ready: Value = plain()
        .get(t.admin_url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        ready["ready"], true,
        "a store outage must not make tether unready"
    );
    relay.heal();

    for _ in 0..600 {
        let (n, max): (i64, Option<i64>) = sqlx::query_as(
            "SELECT count(*), max(seq) FROM tether_entries WHERE session_id = $1 AND thread_id = 'main'",
        )
        .bind(&session)
        .fetch_one(&pool)
        .await
        .unwrap();
        if n == 8 {
            assert_eq!(max, Some(8), "entries are 1..=8 without duplicates");
            t.stop().await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("capture did not catch up after the store returned");
}

#[tokio::test]
async fn drained_worker_sessions_migrate_with_history_after_the_timeout() {
    let (a, b) = (Ref::start("a").await, Ref::start("b").await);
    let t = Tether::start(&ref_config(
        &[&a, &b],
        &format!("{FAST}\n[drain]\ntimeout = \"400ms\"\n"),
    ))
    .await;
    let base = t.url("");
    let mut tries = 0.0;
    let client = loop {
        let c = user();
        tries += 1.0;
        if say(&c, &base, "one").await["worker"] == "a" {
            break c;
        }
    };
    captured(&[&t], 2.0 * tries).await;
    let r = plain()
        .post(t.admin_url("/backends/a/drain"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Within the timeout the pinned user stays (and says something the
    // store has not captured yet when the drain ends: the final capture
    // must pull it).
    assert_eq!(say(&client, &base, "two").await["worker"], "a");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let v = say(&client, &base, "three").await;
    assert_eq!(
        v["worker"], "b",
        "a drained worker kept its user past the timeout"
    );
    let now = texts(&v);
    assert_eq!(now.len(), 6, "{now:?}");
    assert!(now[2].contains("two"));
    assert_eq!(b.stats().created, 1);
    t.stop().await;
}
