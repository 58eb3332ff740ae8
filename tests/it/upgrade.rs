//! Zero-downtime binary upgrade (`SIGUSR2`): the real binary on fixed free
//! ports in front of reference-worker processes, under ~500 requests/s from
//! clients that open a connection per request and from keep-alive clients
//! with cookies. Every request must succeed through every hand-over and
//! every cookie client must stay on its worker with its whole history.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::support::binproc::*;
use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_tether");
/// Clients of each kind; each sends one request every `PACE`.
const CLIENTS: usize = 5;
const PACE: Duration = Duration::from_millis(20);
const UPGRADES: usize = 3;

/// What the clients observed.
#[derive(Default)]
struct Stats {
    sent: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
    moved: AtomicU64,
    lost: AtomicU64,
    errors: Mutex<Vec<String>>,
}

impl Stats {
    fn error(&self, e: &reqwest::Error) {
        let mut source: Option<&dyn std::error::Error> = Some(e);
        while let Some(s) = source {
            if let Some(io) = s.downcast_ref::<std::io::Error>() {
                if io.kind() == std::io::ErrorKind::ConnectionRefused {
                    self.refused.fetch_add(1, Relaxed);
                    return;
                }
            }
            source = s.source();
        }
        self.fail(format!("{e:?}"));
    }

    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Relaxed);
        let mut errors = self.errors.lock().unwrap();
        if errors.len() < 10 {
            errors.push(what);
        }
    }
}

/// One request per `PACE` on a new connection each, until `stop`.
async fn fresh_client(url: String, stats: Arc<Stats>, stop: CancellationToken) {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut pace = tokio::time::interval(PACE);
    while !stop.is_cancelled() {
        pace.tick().await;
        stats.sent.fetch_add(1, Relaxed);
        match client.get(&url).send().await {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => stats.fail(format!("status {}", r.status())),
            Err(e) => stats.error(&e),
        }
    }
}

/// A keep-alive user with a cookie: a message every tenth request, reads
/// in between; the worker and the history must never change behind it.
async fn cookie_client(base: String, id: usize, stats: Arc<Stats>, stop: CancellationToken) {
    let client = user();
    let mut pace = tokio::time::interval(PACE);
    let (mut worker, mut posts) = (None::<String>, 0usize);
    for n in 0usize.. {
        if stop.is_cancelled() {
            break;
        }
        pace.tick().await;
        stats.sent.fetch_add(1, Relaxed);
        let req = if n % 10 == 0 {
            client.post(format!("{base}/chat?thread=main&message=u{id}m{posts}"))
        } else {
            client.get(format!("{base}/chat?thread=main"))
        };
        let resp = match req.send().await {
            Ok(r) if r.status().is_success() => r,
            Ok(r) => {
                stats.fail(format!("status {}", r.status()));
                continue;
            }
            Err(e) => {
                stats.error(&e);
                continue;
            }
        };
        if n % 10 == 0 {
            posts += 1;
        }
        let Ok(v) = resp.json::<Value>().await else {
            stats.fail("unreadable body".into());
            continue;
        };
        let answered = v["worker"].as_str().unwrap_or("").to_owned();
        if *worker.get_or_insert_with(|| answered.clone()) != answered {
            stats.moved.fetch_add(1, Relaxed);
        }
        if v["history"].as_array().map_or(0, Vec::len) != 2 * posts {
            stats.lost.fetch_add(1, Relaxed);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_under_load_refuse_nothing_and_keep_pins() {
    let (a, b) = (WorkerProc::start("a").await, WorkerProc::start("b").await);
    let dir = tempfile::tempdir().unwrap();
    let mut s = start(
        BIN.as_ref(),
        &[&a, &b],
        dir.path(),
        "[shutdown]\ngrace = \"10s\"\n",
    )
    .await;
    let base = format!("http://{}", s.http);
    let (stats, stop) = (Arc::new(Stats::default()), CancellationToken::new());
    let mut load = tokio::task::JoinSet::new();
    for id in 0..CLIENTS {
        let url = format!("{base}/chat?thread=t{id}");
        load.spawn(fresh_client(url, stats.clone(), stop.clone()));
        load.spawn(cookie_client(base.clone(), id, stats.clone(), stop.clone()));
    }
    let started = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut pid = s.procs.first.id();
    for _ in 0..UPGRADES {
        pid = upgrade(&mut s, pid).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    stop.cancel();
    while load.join_next().await.is_some() {}
    let secs = started.elapsed().as_secs_f64();
    let sent = stats.sent.load(Relaxed);
    let get = |c: &AtomicU64| c.load(Relaxed);
    eprintln!(
        "upgrade load: {sent} requests in {secs:.1} s ({:.0}/s) over {UPGRADES} upgrades: \
         refused {}, failed {}, moved {}, history lost {}; errors: {:?}",
        sent as f64 / secs,
        get(&stats.refused),
        get(&stats.failed),
        get(&stats.moved),
        get(&stats.lost),
        stats.errors.lock().unwrap()
    );
    assert!(
        sent as f64 / secs > 300.0,
        "the load was too thin to mean anything"
    );
    assert_eq!(get(&stats.refused), 0, "connections refused");
    assert_eq!(get(&stats.failed), 0, "failed requests");
    assert_eq!(
        get(&stats.moved),
        0,
        "cookie clients moved to another worker"
    );
    assert_eq!(
        get(&stats.lost),
        0,
        "cookie clients saw a different history"
    );
    assert!(alive(pid));
}

#[tokio::test]
async fn a_failed_upgrade_keeps_the_old_process_serving() {
    let a = WorkerProc::start("a").await;
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let exe = dir.path().join("tether");
    deploy(&exe, Ok(BIN));
    let extra = "[shutdown]\nupgrade_timeout = \"1s\"\n";
    let mut s = start(&exe, &[&a], dir.path(), extra).await;
    let old = s.procs.first.id();
    let url = format!("http://{}/chat?thread=main", s.http);
    let broken = [
        ("#!/bin/sh\nexit 3\n", "exited before it was ready"),
        ("#!/bin/sh\nexec sleep 30\n", "was not ready within 1s"),
    ];
    for (script, why) in broken {
        deploy(&exe, Err(script));
        kill(&old, "USR2");
        let line = wait_log(&mut s.logs, "upgrade failed").await;
        let error = line["error"].as_str().unwrap_or_default();
        assert!(error.contains(why), "{error}");
        assert!(alive(old));
        assert_eq!(plain().get(&url).send().await.unwrap().status(), 200);
    }
    assert_eq!(upgrades(s.admin, "failed").await, 2.0);

    deploy(&exe, Ok(BIN));
    let new = upgrade(&mut s, old).await;
    assert_ne!(new, old);
    assert_eq!(plain().get(&url).send().await.unwrap().status(), 200);
    assert_eq!(upgrades(s.admin, "ok").await, 1.0);
    assert_eq!(
        upgrades(s.admin, "failed").await,
        0.0,
        "a new process counts afresh"
    );
}

#[tokio::test]
async fn an_inherited_listener_is_used_instead_of_binding() {
    let a = WorkerProc::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    // Held open by the test too: tether could not bind this address itself.
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let held = socket.try_clone().unwrap();
    let mut s = start_on(BIN.as_ref(), &[&a], dir.path(), "", Some(socket)).await;
    wait_log(&mut s.logs, "using the inherited listener").await;
    let url = format!("http://{}/chat?thread=main", s.http);
    assert_eq!(plain().get(&url).send().await.unwrap().status(), 200);
    drop(held);
}
