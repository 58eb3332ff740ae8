//! The real binary: `check` exit codes and SIGTERM with a request in flight.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_tether");

fn write_config(dir: &tempfile::TempDir, text: &str) -> std::path::PathBuf {
    let p = dir.path().join("tether.toml");
    std::fs::write(&p, with_store(text, dir.path())).unwrap();
    p
}

#[tokio::test]
async fn check_exit_codes() {
    let a = Worker::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let good = write_config(&dir, &config_text(&[&a], ""));
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let bad_text = config_text(&[&a, &a], "");
    let bad = write_config(&dir, &bad_text);
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("backends[1].id"), "{err}");

    let typo = write_config(&dir, &config_text(&[&a], "[limits]\nmax_conections = 5\n"));
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&typo)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_conections"));

    let missing = dir.path().join("nope.toml");
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&missing)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}

/// The binary running with JSON logs; log lines arrive on `lines`.
struct Running {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<serde_json::Value>,
    http: String,
}

async fn run_binary(cfg: &std::path::Path) -> Running {
    let mut child = Command::new(BIN)
        .current_dir(cfg.parent().unwrap())
        .args(["--log-format", "json", "--config"])
        .arg(cfg)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                if tx.send(v).is_err() {
                    return;
                }
            }
        }
    });
    let (rx, http) = tokio::task::spawn_blocking(move || {
        while let Ok(v) = rx.recv_timeout(Duration::from_secs(20)) {
            if let Some(http) = v.get("http").and_then(|h| h.as_str()) {
                let http = http.to_owned();
                return (rx, Some(http));
            }
        }
        (rx, None)
    })
    .await
    .unwrap();
    Running {
        child,
        lines: rx,
        http: http.expect("tether did not report its address"),
    }
}

impl Running {
    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Waits (bounded) for a log line whose message contains `text`.
    async fn wait_log(self, text: &'static str) -> Self {
        tokio::task::spawn_blocking(move || {
            while let Ok(v) = self.lines.recv_timeout(Duration::from_secs(10)) {
                if v.get("message")
                    .and_then(|m| m.as_str())
                    .is_some_and(|m| m.contains(text))
                {
                    return self;
                }
            }
            panic!("no log line containing {text:?}");
        })
        .await
        .unwrap()
    }

    /// Waits up to 10 s for the process to exit.
    async fn exit_code(mut self) -> Option<i32> {
        for _ in 0..100 {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("tether did not exit within 10 s");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn sigterm_finishes_the_request_in_flight_and_exits_0() {
    let a = Worker::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(&dir, &config_text(&[&a], "[shutdown]\ngrace = \"10s\"\n"));
    let running = run_binary(&cfg).await;
    let url = format!("http://{}/slow?ms=1500", running.http);
    let slow = tokio::spawn(async move { plain().get(url).send().await });
    eventually("the slow request reaches the worker", || {
        !a.seen().is_empty()
    })
    .await;
    running.signal("-TERM");
    let resp = slow
        .await
        .unwrap()
        .expect("in-flight request cut by SIGTERM");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "a\n");
    assert_eq!(running.exit_code().await, Some(0));
}

#[tokio::test]
async fn sighup_with_a_broken_config_keeps_the_old_one_serving() {
    let (a, b) = (Worker::start("a").await, Worker::start("b").await);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(&dir, &config_text(&[&a], ""));
    let running = run_binary(&cfg).await;
    let url = format!("http://{}/", running.http);
    assert_eq!(worker_of(&plain().get(&url).send().await.unwrap()), "a");

    std::fs::write(&cfg, "[listen\nthis is not toml").unwrap();
    running.signal("-HUP");
    let running = running.wait_log("reload refused").await;
    assert_eq!(worker_of(&plain().get(&url).send().await.unwrap()), "a");

    // A valid change is applied: b replaces a.
    std::fs::write(&cfg, with_store(&config_text(&[&b], ""), dir.path())).unwrap();
    running.signal("-HUP");
    let running = running.wait_log("config reloaded").await;
    assert_eq!(worker_of(&plain().get(&url).send().await.unwrap()), "b");
    running.signal("-TERM");
    assert_eq!(running.exit_code().await, Some(0));
}
