//! A real headless Chromium driven through chromedriver (WebDriver) with
//! `fantoccini`. chromedriver runs on a free loopback port in its own
//! process group, and the whole group (chromedriver and the browser it
//! started) is killed when the [`Browser`] is dropped, also on a panic.
//!
//! Debian's `chromium` and `chromium-driver` packages must be installed
//! (`.ci/run` installs them): without them the tests fail and say so.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Map, Value};

/// How long chromedriver may take to listen.
const DRIVER_READY_WITHIN: Duration = Duration::from_secs(20);
/// How long a WebDriver command may take (the browser's first start is
/// the slowest).
const COMMAND_WITHIN: Duration = Duration::from_secs(60);

const INSTALL: &str = "the browser tests need Debian's chromium and chromedriver: \
     apt-get install -y chromium chromium-driver (.ci/run installs them)";

/// A headless Chromium session.
pub struct Browser {
    pub client: Client,
    driver: Child,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session.
    pub async fn start() -> Browser {
        let exe = find("chromedriver")
            .unwrap_or_else(|| panic!("chromedriver not found on PATH: {INSTALL}"));
        let port = free_port();
        let mut cmd = Command::new(exe);
        cmd.arg(format!("--port={}", port.port()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Its own process group: killing the group stops the browser too.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let driver = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start chromedriver ({e}): {INSTALL}"));
        let mut guard = DriverGuard(Some(driver));
        let deadline = Instant::now() + DRIVER_READY_WITHIN;
        while tokio::net::TcpStream::connect(port).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "chromedriver did not listen on {port} within {DRIVER_READY_WITHIN:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut options = Map::new();
        options.insert(
            "args".into(),
            json!([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-proxy-server",
                "--window-size=1280,900",
            ]),
        );
        if let Some(chromium) = find("chromium") {
            options.insert("binary".into(), json!(chromium));
        }
        let mut caps = Map::new();
        caps.insert("goog:chromeOptions".into(), Value::Object(options));
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = tokio::time::timeout(
            COMMAND_WITHIN,
            ClientBuilder::new(connector)
                .capabilities(caps)
                .connect(&format!("http://{port}")),
        )
        .await
        .unwrap_or_else(|_| panic!("chromium did not start within {COMMAND_WITHIN:?}"))
        .unwrap_or_else(|e| panic!("cannot open a chromium session ({e}): {INSTALL}"));
        let driver = guard.0.take().expect("driver held");
        Browser { client, driver }
    }

    /// Opens `url`.
    pub async fn goto(&self, url: &str) {
        within(self.client.goto(url))
            .await
            .unwrap_or_else(|e| panic!("goto {url}: {e}"));
    }

    /// The text of the first element matching `css`, or `None`.
    pub async fn text(&self, css: &str) -> Option<String> {
        let el = within(self.client.find(Locator::Css(css))).await.ok()?;
        within(el.text()).await.ok()
    }

    /// The texts of every element matching `css`.
    pub async fn texts(&self, css: &str) -> Vec<String> {
        let mut out = Vec::new();
        if let Ok(els) = within(self.client.find_all(Locator::Css(css))).await {
            for el in els {
                if let Ok(t) = within(el.text()).await {
                    out.push(t);
                }
            }
        }
        out
    }

    /// Clicks the first element matching `css`.
    pub async fn click(&self, css: &str) {
        let el = within(self.client.find(Locator::Css(css)))
            .await
            .unwrap_or_else(|e| panic!("no {css}: {e}"));
        within(el.click())
            .await
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    /// Types `text` into the first element matching `css`.
    pub async fn type_into(&self, css: &str, text: &str) {
        let el = within(self.client.find(Locator::Css(css)))
            .await
            .unwrap_or_else(|e| panic!("no {css}: {e}"));
        within(el.send_keys(text))
            .await
            .unwrap_or_else(|e| panic!("type into {css}: {e}"));
    }

    /// Whether the first element matching `css` is enabled.
    pub async fn enabled(&self, css: &str) -> bool {
        match within(self.client.find(Locator::Css(css))).await {
            Ok(el) => within(el.is_enabled()).await.unwrap_or(false),
            Err(_) => false,
        }
    }

    /// Waits (bounded by `within`) until `cond` holds on the page's
    /// texts; returns how long it took. Polls the page, never reloads it.
    pub async fn wait_until<F, Fut>(&self, what: &str, limit: Duration, mut cond: F) -> Duration
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let started = Instant::now();
        loop {
            if cond().await {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < limit,
                "timed out after {limit:?} waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A PNG of the page, written to `path` when `TETHER_SCREENSHOTS` names
    /// a directory (never into the repository).
    pub async fn screenshot(&self, name: &str) {
        let Ok(dir) = std::env::var("TETHER_SCREENSHOTS") else {
            return;
        };
        let png = within(self.client.screenshot()).await.expect("screenshot");
        std::fs::write(PathBuf::from(dir).join(name), png).expect("write screenshot");
    }

    /// Ends the session, then chromedriver.
    pub async fn close(mut self) {
        let _ = within(self.client.clone().close()).await;
        kill_group(&mut self.driver);
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        kill_group(&mut self.driver);
    }
}

/// Kills chromedriver's group if the session never opened.
struct DriverGuard(Option<Child>);

impl Drop for DriverGuard {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            kill_group(c);
        }
    }
}

fn kill_group(child: &mut Child) {
    // The group id is chromedriver's pid (process_group(0)).
    let _ = Command::new("sh")
        .args(["-c", &format!("kill -KILL -{} 2>/dev/null", child.id())])
        .status();
    let _ = child.kill();
    let _ = child.wait();
}

async fn within<T, E: std::fmt::Display>(
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(COMMAND_WITHIN, f).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {COMMAND_WITHIN:?}")),
    }
}

fn find(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}
