//! The real tether binary as a process on fixed free ports, with its JSON
//! logs, for what only a process shows: `SIGUSR2` upgrades, inherited
//! listeners, a deploy that renames a new binary over the old path.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::{eventually, key_b64, plain, with_store, WorkerProc};

/// Every tether process of a test (the first and the ones upgrades start),
/// killed at the end, also when the test panics.
pub struct Procs {
    pub first: Child,
    pub pids: Vec<u32>,
}

impl Drop for Procs {
    fn drop(&mut self) {
        for pid in &self.pids {
            kill(pid, "KILL");
        }
        let _ = self.first.kill();
        let _ = self.first.wait();
    }
}

pub fn kill(pid: &u32, sig: &str) {
    let _ = Command::new("sh")
        .args(["-c", &format!("kill -{sig} {pid}")])
        .stderr(Stdio::null())
        .status();
}

/// Whether `pid` runs (a zombie nobody reaped has exited).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

pub fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

pub struct Setup {
    pub http: SocketAddr,
    pub admin: SocketAddr,
    pub procs: Procs,
    pub logs: UnboundedReceiver<Value>,
}

/// Starts `exe` with JSON logs (every generation writes to the same pipe)
/// and waits until it is ready.
pub async fn start(
    exe: &std::path::Path,
    workers: &[&WorkerProc],
    dir: &std::path::Path,
    extra: &str,
) -> Setup {
    start_on(exe, workers, dir, extra, None).await
}

/// [`start`], with `socket` handed over as fd 3 (`LISTEN_FDS=1`) and
/// configured as `listen.http`, the way systemd socket activation does.
pub async fn start_on(
    exe: &std::path::Path,
    workers: &[&WorkerProc],
    dir: &std::path::Path,
    extra: &str,
    socket: Option<std::net::TcpListener>,
) -> Setup {
    let http = match &socket {
        Some(l) => l.local_addr().unwrap(),
        None => free_port(),
    };
    let admin = free_port();
    let mut text = format!(
        "[listen]\nhttp = \"{http}\"\nadmin = \"{admin}\"\n\n[affinity]\nkeys = [\"{}\"]\n\n",
        key_b64(1)
    );
    for w in workers {
        text.push_str(&w.toml());
    }
    text.push_str(extra);
    let cfg = dir.join("tether.toml");
    std::fs::write(&cfg, with_store(&text, dir)).unwrap();
    let mut cmd = Command::new(exe);
    cmd.args(["--log-format", "json", "--config"])
        .arg(&cfg)
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(l) = socket {
        use command_fds::{CommandFdExt, FdMapping};
        cmd.env("LISTEN_FDS", "1")
            .fd_mappings(vec![FdMapping {
                parent_fd: l.into(),
                child_fd: 3,
            }])
            .unwrap();
    }
    let mut first = cmd.spawn().unwrap();
    drop(cmd);
    let stderr = first.stderr.take().unwrap();
    let (tx, logs) = unbounded_channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                let _ = tx.send(v);
            }
        }
    });
    let procs = Procs {
        first,
        pids: Vec::new(),
    };
    let setup = Setup {
        http,
        admin,
        procs,
        logs,
    };
    ready(admin).await;
    setup
}

pub async fn ready(admin: SocketAddr) {
    eventually("tether answers /readyz with 200", || {
        std::net::TcpStream::connect(admin).is_ok()
    })
    .await;
    let status = plain()
        .get(format!("http://{admin}/readyz"))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200);
}

/// The next log line whose message contains `text` (bounded).
pub async fn wait_log(logs: &mut UnboundedReceiver<Value>, text: &str) -> Value {
    let within = Duration::from_secs(30);
    tokio::time::timeout(within, async {
        while let Some(v) = logs.recv().await {
            if v["message"].as_str().is_some_and(|m| m.contains(text)) {
                return v;
            }
        }
        panic!("log closed before a line containing {text:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("no log line containing {text:?} within {within:?}"))
}

/// `SIGUSR2` to `old`; returns the new pid once `old` has exited.
pub async fn upgrade(s: &mut Setup, old: u32) -> u32 {
    kill(&old, "USR2");
    let line = wait_log(&mut s.logs, "the new process is ready").await;
    let new = u32::try_from(line["new_pid"].as_u64().unwrap()).unwrap();
    s.procs.pids.push(new);
    for _ in 0..300 {
        if !alive(old) {
            ready(s.admin).await;
            return new;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the old tether {old} did not exit within 15 s");
}

/// Puts `exe` in place the way a deploy does: a new file renamed over the
/// path (the running process keeps its old inode).
pub fn deploy(exe: &std::path::Path, from: Result<&str, &str>) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = exe.with_extension("new");
    match from {
        Ok(binary) => {
            if std::fs::hard_link(binary, &tmp).is_err() {
                std::fs::copy(binary, &tmp).unwrap();
            }
        }
        Err(script) => {
            std::fs::write(&tmp, script).unwrap();
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
    std::fs::rename(&tmp, exe).unwrap();
}

/// `tether_upgrades_total{outcome}` as the process on `admin` counts it.
pub async fn upgrades(admin: SocketAddr, outcome: &str) -> f64 {
    let text = plain()
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let name = format!("tether_upgrades_total{{outcome=\"{outcome}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&name))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}
