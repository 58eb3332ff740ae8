//! What people look at, in a real headless Chromium: the admin dashboard
//! follows a worker's death without a reload, and the demo chat keeps its
//! conversation when the worker it talks to is killed from the page.
//!
//! Screenshots: set `TETHER_SCREENSHOTS=/some/dir` (never the repository).

use std::time::Duration;

use crate::support::binproc::free_port;
use crate::support::browser::Browser;
use crate::support::{key_b64, plain, user, Tether, WorkerProc};

/// Health settings of these tests: a dead worker is `down` after `FALL`
/// failed probes `INTERVAL` apart.
const INTERVAL: Duration = Duration::from_secs(1);
const FALL: u32 = 2;
/// The dashboard polls every second.
const POLL: Duration = Duration::from_secs(1);
const TOKEN: &str = "dashboard-test-token";

fn config(workers: &[&WorkerProc], admin: &str, extra: &str) -> String {
    let mut s = format!(
        "[listen]\nhttp = \"127.0.0.1:0\"\nadmin = \"{admin}\"\n\n[affinity]\nkeys = [\"{}\"]\n\n\
         [health]\ninterval = \"{}ms\"\nfall = {FALL}\nrise = 2\n\n",
        key_b64(1),
        INTERVAL.as_millis()
    );
    for w in workers {
        s.push_str(&w.toml());
    }
    s.push_str(extra);
    s
}

/// The state cell of a worker's row, as the page shows it.
async fn shown_state(b: &Browser, id: &str) -> Option<String> {
    b.text(&format!("tr[data-worker=\"{id}\"] .worker-state"))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_lists_every_worker_and_turns_a_killed_one_down_without_reload() {
    let mut ws = Vec::new();
    for id in ["worker-a", "worker-b", "worker-c"] {
        ws.push(WorkerProc::start(id).await);
    }
    let refs: Vec<&WorkerProc> = ws.iter().collect();
    let t = Tether::start(&config(
        &refs,
        "127.0.0.1:0",
        &format!("[admin]\ntoken = \"{TOKEN}\"\n"),
    ))
    .await;
    // The JSON behind the page needs the token; the page itself does not.
    let denied = plain()
        .get(t.admin_url("/api/overview"))
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), 401);

    // One user talks, so a session is pinned and will have to move.
    let u = user();
    let first: serde_json::Value = u
        .post(t.url("/chat?thread=main&message=hello"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let victim = first["worker"].as_str().unwrap().to_owned();

    let b = Browser::start().await;
    b.goto(&t.admin_url("/")).await;
    // The page asks for the token once.
    b.wait_until("the token prompt", Duration::from_secs(10), || async {
        b.enabled("#token").await
    })
    .await;
    b.type_into("#token", TOKEN).await;
    b.click("#auth button").await;
    b.wait_until(
        "every worker listed as up",
        Duration::from_secs(10),
        || async {
            let mut all = true;
            for w in &ws {
                all &= shown_state(&b, &w.id).await.as_deref() == Some("up");
            }
            all
        },
    )
    .await;
    let rows = b.texts("#workers tbody tr").await;
    assert_eq!(rows.len(), 3, "one row per worker: {rows:?}");
    let victim_row = b
        .text(&format!("tr[data-worker=\"{victim}\"]"))
        .await
        .unwrap();
    assert!(
        victim_row.contains(&victim),
        "the row names the worker: {victim_row}"
    );
    b.screenshot("dashboard-before-kill.png").await;

    // Marks this page load: a reload would lose it.
    b.client
        .execute("window.__sameLoad = 'yes'; return true;", vec![])
        .await
        .unwrap();
    let pos = ws.iter().position(|w| w.id == victim).unwrap();
    ws[pos].kill9();
    // Down after FALL failed probes, then seen at the next poll (probes
    // are jittered by up to 10 %).
    let limit = INTERVAL * (FALL + 1) + POLL * 2;
    let took = b
        .wait_until(&format!("{victim} shown down"), limit, || async {
            shown_state(&b, &victim).await.as_deref() == Some("down")
        })
        .await;
    let same: serde_json::Value = b
        .client
        .execute("return window.__sameLoad || null;", vec![])
        .await
        .unwrap();
    assert_eq!(same, "yes", "the page was reloaded");
    for w in ws.iter().filter(|w| w.id != victim) {
        assert_eq!(shown_state(&b, &w.id).await.as_deref(), Some("up"));
    }
    eprintln!("{victim} shown down {took:?} after the kill");

    // The user talks again: the session moves, and the move is listed.
    let again: serde_json::Value = u
        .post(t.url("/chat?thread=main&message=again"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let landed = again["worker"].as_str().unwrap().to_owned();
    assert_ne!(landed, victim);
    let want = format!("{victim} → {landed}");
    b.wait_until("the move listed", Duration::from_secs(5), || async {
        let routes = b.texts("#moves tbody .move-route").await;
        let outcomes = b.texts("#moves tbody .move-outcome").await;
        routes
            .iter()
            .zip(&outcomes)
            .any(|(r, o)| *r == want && o == "ok")
    })
    .await;
    b.screenshot("dashboard-after-kill.png").await;

    // Drain from the page (a POST with the bearer token), then undrain.
    let other = ws.iter().find(|w| w.id != victim).unwrap().id.clone();
    b.click(&format!("tr[data-worker=\"{other}\"] button"))
        .await;
    b.wait_until(
        &format!("{other} draining"),
        Duration::from_secs(5),
        || async { shown_state(&b, &other).await.as_deref() == Some("draining") },
    )
    .await;
    b.click(&format!("tr[data-worker=\"{other}\"] button"))
        .await;
    b.wait_until(
        &format!("{other} up again"),
        Duration::from_secs(5),
        || async { shown_state(&b, &other).await.as_deref() == Some("up") },
    )
    .await;
    b.close().await;
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_chat_survives_killing_its_worker_from_the_page() {
    let admin = free_port();
    let dashboard = format!("http://{admin}/");
    let args = ["--demo-page", "--allow-kill", "--dashboard", &dashboard];
    let mut ws = Vec::new();
    for id in ["worker-a", "worker-b", "worker-c"] {
        ws.push(WorkerProc::start_with(id, &args).await);
    }
    let refs: Vec<&WorkerProc> = ws.iter().collect();
    // As `tether demo` runs: sync capture (the kill may follow an answer at
    // once; nothing the page showed may be lost).
    let t = Tether::start(&config(
        &refs,
        &admin.to_string(),
        "[state]\ncapture = \"sync\"\n",
    ))
    .await;

    let b = Browser::start().await;
    b.goto(&t.url("/")).await;
    let href = b
        .client
        .execute("return document.getElementById('dashboard').href;", vec![])
        .await
        .unwrap();
    assert_eq!(
        href,
        dashboard.as_str(),
        "the chat page links to the dashboard"
    );

    let turns = |n: usize| {
        let b = &b;
        async move { b.texts("#log .turn").await.len() == n }
    };
    for (i, m) in ["hello", "how are you"].iter().enumerate() {
        b.type_into("#message", m).await;
        b.click("#say button").await;
        b.wait_until("the answer", Duration::from_secs(10), || turns(2 * (i + 1)))
            .await;
    }
    let before = b.text("#worker").await.unwrap();
    assert!(
        ws.iter().any(|w| w.id == before),
        "the page names the worker: {before:?}"
    );
    assert!(b.enabled("#kill").await, "the demo enables the kill button");
    b.screenshot("demo-chat-before-kill.png").await;

    b.click("#kill").await;
    let pos = ws.iter().position(|w| w.id == before).unwrap();
    b.wait_until(&format!("{before} exits"), Duration::from_secs(5), || {
        let done = ws[pos].exited();
        async move { done }
    })
    .await;

    b.type_into("#message", "still there?").await;
    b.click("#say button").await;
    b.wait_until("the answer after the kill", Duration::from_secs(15), || {
        turns(6)
    })
    .await;
    let after = b.text("#worker").await.unwrap();
    assert_ne!(after, before, "another worker answers");
    assert!(
        ws.iter().any(|w| w.id == after),
        "the page names the new worker: {after:?}"
    );
    let said: Vec<String> = b.texts("#log .turn.user .text").await;
    assert_eq!(
        said,
        ["hello", "how are you", "still there?"],
        "the whole history is shown"
    );
    let by: Vec<String> = b.texts("#log .turn.assistant .by").await;
    assert_eq!(by, [before.clone(), before.clone(), after.clone()]);
    let last = b.texts("#log .turn.assistant .text").await;
    assert!(
        last[2].contains("with 4 earlier entries"),
        "the new worker answered knowing the history: {last:?}"
    );
    b.screenshot("demo-chat-after-kill.png").await;
    b.close().await;
    t.stop().await;
}
