//! The dashboard's admin endpoints over plain HTTP: the page at `/`, what
//! `/api/overview` and `/api/moves` report around a real move, the token,
//! and drain control refused to other sites' pages.

use serde_json::Value;

use crate::support::{plain, ref_config, user, wait_state, Ref, Tether};

const TOKEN: &str = "api-test-token";

async fn get(t: &Tether, path: &str, token: Option<&str>) -> reqwest::Response {
    let mut r = plain().get(t.admin_url(path));
    if let Some(tok) = token {
        r = r.bearer_auth(tok);
    }
    r.send().await.unwrap()
}

async fn json(t: &Tether, path: &str) -> Value {
    let r = get(t, path, Some(TOKEN)).await;
    assert_eq!(r.status(), 200, "{path}");
    r.json().await.unwrap()
}

/// One chat turn of the `main` thread from the user `u` (its cookie jar).
async fn say(u: &reqwest::Client, t: &Tether, message: &str) -> reqwest::Response {
    u.post(t.url(&format!("/chat?thread=main&message={message}")))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn the_page_is_open_and_every_data_endpoint_needs_the_token() {
    let a = Ref::start("a").await;
    let t = Tether::start(&ref_config(
        &[&a],
        &format!("[admin]\ntoken = \"{TOKEN}\"\n"),
    ))
    .await;
    let page = get(&t, "/", None).await;
    assert_eq!(page.status(), 200);
    let ct = page.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("text/html"), "{ct}");
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    let html = page.text().await.unwrap();
    assert!(
        html.contains("/api/overview"),
        "the page polls the overview"
    );
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "nothing external"
    );
    for path in ["/api/overview", "/api/moves", "/backends", "/metrics"] {
        assert_eq!(
            get(&t, path, None).await.status(),
            401,
            "{path} without token"
        );
        assert_eq!(
            get(&t, path, Some("wrong")).await.status(),
            401,
            "{path} wrong token"
        );
        assert_eq!(
            get(&t, path, Some(TOKEN)).await.status(),
            200,
            "{path} with token"
        );
    }
    assert_eq!(get(&t, "/healthz", None).await.status(), 200);
}

#[tokio::test]
async fn overview_and_moves_report_a_worker_loss_and_the_move_it_caused() {
    let a = Ref::start("a").await;
    let b = Ref::start("b").await;
    // No token here (`wait_state` reads `/backends` without one). Sync
    // capture: the kill follows the first answer at once, and with the
    // default async capture a turn not yet pulled when its worker dies is
    // the documented window (a `partial` move), not what this test is about.
    let extra =
        "[health]\ninterval = \"100ms\"\nfall = 2\nrise = 2\n\n[state]\ncapture = \"sync\"\n";
    let t = Tether::start(&ref_config(&[&a, &b], extra)).await;
    let o = json(&t, "/api/overview").await;
    assert_eq!(o["workers"].as_array().unwrap().len(), 2);
    assert_eq!(o["store"]["state"], "connected");
    assert_eq!(o["store"]["capture_lag"]["threads"], 0);
    assert_eq!(o["moves"], serde_json::json!([]));
    let total_before = o["requests"]["total"].as_u64().unwrap();

    let u = user();
    let first = say(&u, &t, "one").await.json::<Value>().await.unwrap();
    let from = first["worker"].as_str().unwrap().to_owned();
    let (gone, to) = if from == "a" { (&a, "b") } else { (&b, "a") };
    let o = json(&t, "/api/overview").await;
    assert_eq!(o["requests"]["total"].as_u64().unwrap(), total_before + 1);
    let row = |o: &Value, id: &str| {
        o["workers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["id"] == id)
            .cloned()
            .unwrap()
    };
    assert_eq!(row(&o, &from)["sessions"], 1);
    let up_since = row(&o, &from)["changed_at"].as_u64().unwrap();

    gone.kill();
    wait_state(&t, &from, "down").await;
    let o = json(&t, "/api/overview").await;
    assert_eq!(row(&o, &from)["state"], "down");
    assert!(row(&o, &from)["changed_at"].as_u64().unwrap() >= up_since);

    let again = say(&u, &t, "two").await;
    assert!(again.headers().get("tether-restore").is_none(), "{again:?}");
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["worker"], to);
    assert_eq!(again["history"].as_array().unwrap().len(), 4, "{again}");
    let moves = json(&t, "/api/moves").await;
    let moves = moves.as_array().unwrap();
    assert_eq!(moves.len(), 1, "{moves:?}");
    let m = &moves[0];
    assert_eq!(m["from"], from.as_str());
    assert_eq!(m["to"], to);
    assert_eq!(m["reason"], "down");
    assert_eq!(m["outcome"], "ok");
    assert_eq!(m["session"].as_str().unwrap().len(), 32, "{m}");
    assert!(m["duration_ms"].is_u64() && m["at"].is_u64(), "{m}");
    let o = json(&t, "/api/overview").await;
    assert_eq!(o["moves"][0], *m, "the overview carries the same move");
}

#[tokio::test]
async fn drain_from_another_site_is_refused_and_from_the_dashboard_accepted() {
    let a = Ref::start("a").await;
    let t = Tether::start(&ref_config(&[&a], "")).await;
    let post = |origin: &str| {
        plain()
            .post(t.admin_url("/backends/a/drain"))
            .header("origin", origin)
            .send()
    };
    let r = post("http://evil.example").await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(json_state(&t).await, "up");
    let r = post(&format!("http://{}", t.admin)).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(json_state(&t).await, "draining");
}

async fn json_state(t: &Tether) -> String {
    let v: Value = plain()
        .get(t.admin_url("/backends"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v[0]["state"].as_str().unwrap().to_owned()
}

#[test]
fn recent_moves_out_of_range_names_the_key() {
    let text = ref_config_text("[admin]\nrecent_moves = 0\n");
    let err = tether::config::Config::from_toml_str(&text, std::path::Path::new("<test>"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("admin.recent_moves"), "{err}");
}

fn ref_config_text(extra: &str) -> String {
    format!(
        "[listen]\nhttp = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n[affinity]\nkeys = [\"{}\"]\n\n\
         [[backends]]\nid = \"a\"\nurl = \"http://127.0.0.1:1\"\n\n{extra}",
        crate::support::key_b64(1)
    )
}

/// `tether demo` (the real binary, in its own process group, stopped with
/// its workers at the end) prints the chat and dashboard URLs, and both
/// answer with their pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tether_demo_prints_both_urls_and_both_pages_answer() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};

    let listen = crate::support::binproc::free_port();
    let admin = crate::support::binproc::free_port();
    let workers = three_free_ports();
    let data = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tether"));
    cmd.arg("demo")
        .args([
            "--listen",
            &listen.to_string(),
            "--admin",
            &admin.to_string(),
        ])
        .args(["--worker-port", &workers.to_string()])
        .arg("--data")
        .arg(data.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut demo = DemoGroup(cmd.spawn().unwrap());
    let out = demo.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let chat = format!("http://{listen}/");
    let dash = format!("http://{admin}/");
    let (mut saw_chat, mut saw_dash) = (false, false);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !(saw_chat && saw_dash) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("tether demo did not print {chat} and {dash}"));
        saw_chat |= line.contains("chat") && line.contains(&chat);
        saw_dash |= line.contains("dashboard") && line.contains(&dash);
    }
    crate::support::binproc::ready(admin).await;
    let page = |url: String| async move {
        let r = plain().get(&url).send().await.unwrap();
        let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
        (r.status(), ct, r.text().await.unwrap())
    };
    let (status, ct, html) = page(chat.clone()).await;
    assert_eq!(status, 200);
    assert!(ct.starts_with("text/html"), "{ct}");
    assert!(html.contains("kill this worker"), "the chat page");
    assert!(html.contains(&dash), "the chat page links to the dashboard");
    assert!(
        html.contains("\"kill\":true"),
        "the demo enables the kill button"
    );
    let (status, ct, html) = page(dash).await;
    assert_eq!(status, 200);
    assert!(ct.starts_with("text/html"), "{ct}");
    assert!(html.contains("/api/overview"), "the dashboard");
}

/// The first of three consecutive free loopback ports.
fn three_free_ports() -> u16 {
    for _ in 0..50 {
        let first = crate::support::binproc::free_port().port();
        let Some(last) = first.checked_add(2) else {
            continue;
        };
        let all = (first..=last).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok());
        if all {
            return first;
        }
    }
    panic!("no three consecutive free ports");
}

/// The demo's process group (tether and its workers), killed at the end.
struct DemoGroup(std::process::Child);

impl Drop for DemoGroup {
    fn drop(&mut self) {
        let pid = self.0.id();
        let _ = std::process::Command::new("sh")
            .args(["-c", &format!("kill -KILL -{pid} 2>/dev/null")])
            .status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The interleaving CI hit in the move test above with the default async
/// capture: a new session's first turn, its worker killed at once (before
/// or while tether pulls the turn). The next answer either carries the
/// whole history or says `Tether-Restore: partial`; never a silent loss.
#[tokio::test]
async fn a_kill_right_after_a_first_turn_is_kept_or_marked() {
    let mut marked = 0;
    for round in 0..6 {
        let a = Ref::start("a").await;
        let b = Ref::start("b").await;
        let extra = "[health]\ninterval = \"100ms\"\nfall = 2\nrise = 2\n";
        let t = Tether::start(&ref_config(&[&a, &b], extra)).await;
        let u = user();
        let first = say(&u, &t, "one").await.json::<Value>().await.unwrap();
        let gone = if first["worker"] == "a" { &a } else { &b };
        gone.kill();
        let again = say(&u, &t, "two").await;
        let status = again.status();
        let mark = again
            .headers()
            .get("tether-restore")
            .map(|v| v.to_str().unwrap().to_owned());
        let body = again.text().await.unwrap();
        if status.is_success() {
            let v: Value = serde_json::from_str(&body).unwrap();
            let n = v["history"].as_array().unwrap().len();
            assert!(
                n == 4 || mark.as_deref() == Some("partial"),
                "round {round}: {n} entries unmarked: {body}"
            );
            if n < 4 {
                marked += 1;
            }
        } else {
            // A 503 while the lost turn may still come back is allowed.
            assert_eq!(status, 503, "round {round}: {body}");
        }
        t.stop().await;
    }
    println!("{marked} of 6 rounds marked partial");
}
