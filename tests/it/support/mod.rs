//! Test support: mock workers, a tether started in-process on ephemeral
//! loopback ports, generated TLS certificates and real clients.

#![allow(dead_code)]

pub mod binproc;
pub mod browser;
pub mod front;
pub mod proc;
pub mod refworker;
pub mod relay;
pub mod turns;
pub mod worker;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use tether::clock::{Clock, SystemClock};
use tether::config::Config;
use tether::server::Handle;

pub use proc::{proc_config, WorkerProc};
pub use refworker::{ref_config, Ref};
pub use relay::Relay;
pub use turns::Chat;
pub use worker::Worker;

/// A fixed test cookie key (base64 of 32 bytes).
pub fn key_b64(byte: u8) -> String {
    base64::engine::general_purpose::STANDARD.encode([byte; 32])
}

/// Config text for `workers`, with `extra` TOML appended (sections that
/// are not already present).
pub fn config_text(workers: &[&Worker], extra: &str) -> String {
    let mut s = format!(
        "[listen]\nhttp = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n[affinity]\nkeys = [\"{}\"]\n\n",
        key_b64(1)
    );
    for w in workers {
        s.push_str(&w.toml());
    }
    s.push_str(extra);
    s
}

/// Parses config text.
pub fn config(text: &str) -> Config {
    Config::from_toml_str(text, std::path::Path::new("<test>"))
        .unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// A tether running in-process.
pub struct Tether {
    pub handle: Option<Handle>,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    pub https: Option<SocketAddr>,
    /// Holds the SQLite store when the config names none.
    pub dir: tempfile::TempDir,
}

/// Puts the store in `dir` unless the config names one.
pub fn with_store(text: &str, dir: &std::path::Path) -> String {
    if text.contains("store = ") {
        return text.to_owned();
    }
    let line = format!("store = \"sqlite://{}/tether.db\"\n", dir.display());
    if text.contains("[state]\n") {
        text.replacen("[state]\n", &format!("[state]\n{line}"), 1)
    } else {
        format!("{text}\n[state]\n{line}")
    }
}

impl Tether {
    pub async fn start(text: &str) -> Tether {
        Self::start_with_clock(text, Arc::new(SystemClock)).await
    }

    pub async fn start_with_clock(text: &str, clock: Arc<dyn Clock>) -> Tether {
        let dir = tempfile::tempdir().unwrap();
        let text = with_store(text, dir.path());
        let handle = tether::server::start(config(&text), clock).await.unwrap();
        Tether {
            dir,
            http: handle
                .http
                .unwrap_or_else(|| "127.0.0.1:1".parse().unwrap()),
            https: handle.https,
            admin: handle.admin,
            handle: Some(handle),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    pub fn handle(&self) -> &Handle {
        self.handle.as_ref().unwrap()
    }

    pub async fn stop(mut self) {
        if let Some(h) = self.handle.take() {
            h.stop().await;
        }
    }
}

impl Drop for Tether {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown_token().cancel();
        }
    }
}

/// A client with its own cookie jar (one simulated user).
pub fn user() -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// A client without cookies.
pub fn plain() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// Which worker answered.
pub fn worker_of(resp: &reqwest::Response) -> String {
    resp.headers()
        .get("x-worker")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// Every `Set-Cookie` of a response.
pub fn set_cookies(resp: &reqwest::Response) -> Vec<String> {
    resp.headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect()
}

/// The value of the `tether` cookie a response sets.
pub fn tether_cookie(resp: &reqwest::Response) -> Option<String> {
    set_cookies(resp).into_iter().find_map(|c| {
        c.split(';')
            .next()
            .and_then(|kv| kv.strip_prefix("tether="))
            .map(str::to_owned)
    })
}

/// A self-signed certificate for `localhost` and 127.0.0.1, written to a
/// temporary directory.
pub struct TestCert {
    pub dir: tempfile::TempDir,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub pem: String,
}

pub fn test_cert(names: &[&str]) -> TestCert {
    let mut sans: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    sans.push("127.0.0.1".into());
    let ck = rcgen::generate_simple_self_signed(sans).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    let pem = ck.cert.pem();
    std::fs::write(&cert, &pem).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    TestCert {
        dir,
        cert,
        key,
        pem,
    }
}

/// A TLS client trusting `cert`, with a cookie jar.
pub fn tls_user(cert: &TestCert) -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .add_root_certificate(reqwest::Certificate::from_pem(cert.pem.as_bytes()).unwrap())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// Waits (bounded) until `cond` holds.
pub async fn eventually<F: FnMut() -> bool>(what: &str, mut cond: F) {
    for _ in 0..200 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

/// The sum of every sample of metric `name` on tether's admin `/metrics`
/// (0 when absent).
pub async fn metric(t: &Tether, name: &str) -> f64 {
    metric_opt(t, name).await.unwrap_or(0.0)
}

/// The sum of every sample of metric `name`, or `None` when tether does not
/// export it at all.
pub async fn metric_opt(t: &Tether, name: &str) -> Option<f64> {
    let text = plain()
        .get(t.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let m = prometheus_parse::Scrape::parse(lines).unwrap();
    let mut found = None;
    for s in m.samples.iter().filter(|s| s.metric == name) {
        let x = match s.value {
            prometheus_parse::Value::Counter(x)
            | prometheus_parse::Value::Gauge(x)
            | prometheus_parse::Value::Untyped(x) => x,
            _ => 0.0,
        };
        *found.get_or_insert(0.0) += x;
    }
    found
}

/// Waits until the tethers have stored `n` entries.
pub async fn captured(ts: &[&Tether], n: f64) {
    for _ in 0..400 {
        let mut sum = 0.0;
        for t in ts {
            sum += metric(t, "tether_captured_entries_total").await;
        }
        if sum >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let text = plain()
        .get(ts[0].admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let interesting: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("capture") || l.contains("store"))
        .collect();
    panic!("fewer than {n} entries captured: {interesting:#?}");
}

/// The URL of the test's own PostgreSQL database.
pub fn pg_url(pool: &sqlx::PgPool) -> String {
    let db = pool.connect_options().get_database().unwrap().to_owned();
    format!("postgres://postgres@127.0.0.1:5432/{db}")
}

/// The workers as `/backends` lists them, by id.
pub async fn backends(t: &Tether) -> std::collections::HashMap<String, serde_json::Value> {
    let v: Vec<serde_json::Value> = plain()
        .get(t.admin_url("/backends"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v.into_iter()
        .map(|b| (b["id"].as_str().unwrap().to_owned(), b))
        .collect()
}

/// A worker's state (`up`, `down`, `draining`) as `/backends` shows it.
pub async fn state_of(t: &Tether, id: &str) -> String {
    backends(t).await[id]["state"].as_str().unwrap().to_owned()
}

/// Waits (bounded, 5 s) until a worker shows `want`.
pub async fn wait_state(t: &Tether, id: &str, want: &str) {
    for _ in 0..200 {
        if state_of(t, id).await == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{id} never became {want}");
}
