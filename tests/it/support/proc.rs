//! The reference worker as a real process (`tether worker --id ID --listen
//! ADDR`), for faults only a process has: `kill -9`, a restart with empty
//! memory on the same port, `SIGSTOP`/`SIGCONT`.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a new process may take to accept connections.
const READY_WITHIN: Duration = Duration::from_secs(10);
/// How long a restart may wait for the port to be free.
const PORT_FREE_WITHIN: Duration = Duration::from_secs(5);

/// A running (or stopped) reference-worker process.
pub struct WorkerProc {
    pub id: String,
    pub addr: SocketAddr,
    child: Option<Child>,
    stopped: bool,
    /// Extra `tether worker` arguments (kept for restarts).
    args: Vec<String>,
}

impl WorkerProc {
    /// Starts a worker on a free loopback port.
    pub async fn start(id: &str) -> WorkerProc {
        Self::start_with(id, &[]).await
    }

    /// Starts a worker with extra `tether worker` arguments
    /// (`--demo-page`, `--allow-kill`).
    pub async fn start_with(id: &str, args: &[&str]) -> WorkerProc {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        // Another process may take the port between the probe bind and the
        // worker's bind: then try another port.
        for _ in 0..5 {
            let addr = free_port();
            if let Some(child) = spawn_ready(id, addr, &args, READY_WITHIN).await {
                return WorkerProc {
                    id: id.to_owned(),
                    addr,
                    child: Some(child),
                    stopped: false,
                    args,
                };
            }
        }
        panic!("worker {id}: could not start on a free port");
    }

    /// Whether the process has exited (reaping it).
    pub fn exited(&mut self) -> bool {
        let done = match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(Some(_))),
            None => true,
        };
        if done {
            self.child = None;
        }
        done
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("worker not running").id()
    }

    /// The `[[backends]]` TOML entry.
    pub fn toml(&self) -> String {
        format!(
            "[[backends]]\nid = \"{}\"\nurl = \"http://{}\"\n\n",
            self.id, self.addr
        )
    }

    /// `kill -9` and reap: memory gone, connections reset by the kernel.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal("KILL", child.id());
            let _ = child.wait();
        }
        self.stopped = false;
    }

    /// A new process with empty memory on the same port (the old one is
    /// killed first if it still runs). Retries while the port is busy.
    pub async fn restart(&mut self) {
        self.kill9();
        let deadline = Instant::now() + PORT_FREE_WITHIN;
        while Instant::now() < deadline {
            if let Some(child) = spawn_ready(&self.id, self.addr, &self.args, READY_WITHIN).await {
                self.child = Some(child);
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("worker {}: cannot restart on {}", self.id, self.addr);
    }

    /// `SIGSTOP`: the process hangs; the kernel still accepts connections
    /// into its backlog, nothing is answered.
    pub fn stop(&mut self) {
        signal("STOP", self.pid());
        self.stopped = true;
    }

    /// `SIGCONT`: the process goes on where it stopped.
    pub fn cont(&mut self) {
        signal("CONT", self.pid());
        self.stopped = false;
    }

    /// The worker's own copy of `thread` for `session`, read directly (not
    /// through tether).
    pub async fn thread(&self, session: &str, thread: &str) -> Result<Vec<Value>, String> {
        read_thread(self.addr, session, thread).await
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.stopped {
                signal("CONT", child.id());
            }
            signal("KILL", child.id());
            let _ = child.wait();
        }
    }
}

/// Reads a worker's copy of a thread: `GET /chat?thread=T` with
/// `Tether-Session`, answered `{"history": [...]}`.
pub async fn read_thread(
    addr: SocketAddr,
    session: &str,
    thread: &str,
) -> Result<Vec<Value>, String> {
    let resp = super::plain()
        .get(format!("http://{addr}/chat?thread={thread}"))
        .header("tether-session", session)
        .timeout(Duration::from_secs(3))
        .send()
        .await
        .map_err(|e| format!("GET {addr}: {e}"))?;
    let status = resp.status();
    let v: Value = resp
        .json()
        .await
        .map_err(|e| format!("GET {addr}: {status}, body: {e}"))?;
    v["history"]
        .as_array()
        .cloned()
        .ok_or_else(|| format!("GET {addr}: {status}, no history in {v}"))
}

/// Config text for worker processes, with `extra` appended.
pub fn proc_config(workers: &[&WorkerProc], extra: &str) -> String {
    let mut s = format!(
        "[listen]\nhttp = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n[affinity]\nkeys = [\"{}\"]\n\n",
        super::key_b64(1)
    );
    for w in workers {
        s.push_str(&w.toml());
    }
    s.push_str(extra);
    s
}

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Spawns a worker on `addr` and waits until the port accepts. `None` when
/// the process exits first (the port was busy).
async fn spawn_ready(
    id: &str,
    addr: SocketAddr,
    args: &[String],
    within: Duration,
) -> Option<Child> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["worker", "--id", id, "--listen", &addr.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the tether binary");
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return None;
        }
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Some(child);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    signal("KILL", child.id());
    let _ = child.wait();
    panic!("worker {id} on {addr} did not accept within {within:?}");
}

/// Signals through the shell's builtin `kill` (POSIX `sh` has one; a
/// `kill` binary may not be installed).
fn signal(sig: &str, pid: u32) {
    let status = Command::new("sh")
        .args(["-c", &format!("kill -{sig} {pid}")])
        .stderr(Stdio::null())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{sig} {pid} failed");
}
