//! Zero-downtime binary upgrade, the old process's side.
//!
//! On `SIGUSR2` the running tether starts its executable again (the path
//! captured at start: after a deploy replaced the file by rename, that path
//! holds the new binary) with the same arguments, handing over its
//! listening sockets by the systemd protocol (`LISTEN_FDS`, fds from 3 on)
//! plus one datagram socket named by `TETHER_UPGRADE_READY`. The new
//! process serves on the same sockets and says "ready" on the datagram;
//! only then does the old one stop accepting and drain. A new process that
//! exits or stays silent past the deadline is stopped, and the old one
//! keeps serving: the sockets are shared, so nothing was closed.
//! The new process's side is [`crate::server::Inherited`].

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use command_fds::{CommandFdExt, FdMapping};
use tokio::process::{Child, Command};

use crate::server::{Handle, ReadySignal, READY_ENV, READY_MESSAGE};

/// The first fd of the systemd protocol.
const FIRST_FD: i32 = 3;
/// How long a stopped new process may take to exit.
const KILL_WITHIN: Duration = Duration::from_secs(5);

/// Why an upgrade did not happen (the old process keeps serving).
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// The sockets or the readiness channel could not be set up.
    #[error("cannot prepare the hand-over: {0}")]
    Prepare(#[source] std::io::Error),
    /// The new executable did not start.
    #[error("cannot start {exe}: {source}", exe = exe.display())]
    Spawn {
        /// The executable.
        exe: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The new process exited before it said ready.
    #[error("the new process (pid {pid}) exited before it was ready: {status}")]
    Exited {
        /// Its pid.
        pid: u32,
        /// How it exited.
        status: ExitStatus,
    },
    /// The new process said nothing within the deadline; it was stopped.
    #[error("the new process (pid {pid}) was not ready within {within:?} (shutdown.upgrade_timeout); stopped it")]
    Timeout {
        /// Its pid.
        pid: u32,
        /// The deadline.
        within: Duration,
    },
    /// The readiness channel failed or carried something else.
    #[error("the new process (pid {pid}) did not say ready: {reason}")]
    Channel {
        /// Its pid.
        pid: u32,
        /// What went wrong.
        reason: String,
    },
}

/// How to start this binary again, captured at start.
#[derive(Debug, Clone)]
pub struct Upgrader {
    exe: PathBuf,
    args: Vec<OsString>,
}

impl Upgrader {
    /// The executable path and arguments of this process. Call it at start:
    /// once a deploy renamed a new file over the path, the running
    /// executable reads as `... (deleted)`.
    pub fn capture() -> std::io::Result<Upgrader> {
        Ok(Upgrader {
            exe: std::env::current_exe()?,
            args: std::env::args_os().skip(1).collect(),
        })
    }

    /// Starts the new process with `sockets` and waits (up to `within`)
    /// until it says ready; returns its pid. On any failure the new process
    /// is stopped (if it runs) and the error says why.
    pub async fn run(&self, sockets: Vec<OwnedFd>, within: Duration) -> Result<u32, UpgradeError> {
        let (ours, theirs) = UnixDatagram::pair().map_err(UpgradeError::Prepare)?;
        ours.set_nonblocking(true).map_err(UpgradeError::Prepare)?;
        let ours = tokio::net::UnixDatagram::from_std(ours).map_err(UpgradeError::Prepare)?;
        let ready_index = sockets.len();
        let mut mappings: Vec<FdMapping> = Vec::with_capacity(sockets.len() + 1);
        for (parent_fd, child_fd) in sockets
            .into_iter()
            .chain([OwnedFd::from(theirs)])
            .zip(FIRST_FD..)
        {
            mappings.push(FdMapping {
                parent_fd,
                child_fd,
            });
        }
        let mut cmd = Command::new(&self.exe);
        cmd.args(&self.args)
            .env("LISTEN_FDS", (ready_index + 1).to_string())
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .env(READY_ENV, ready_index.to_string())
            .kill_on_drop(false)
            .fd_mappings(mappings)
            .map_err(|e| UpgradeError::Prepare(std::io::Error::other(e)))?;
        let spawned = cmd.spawn();
        // Closes our copies of what the child got (its readiness end).
        drop(cmd);
        let mut child = spawned.map_err(|source| UpgradeError::Spawn {
            exe: self.exe.clone(),
            source,
        })?;
        let pid = child.id().unwrap_or(0);
        let mut buf = [0u8; 16];
        let outcome = tokio::select! {
            r = ours.recv(&mut buf) => match r {
                Ok(n) if &buf[..n] == READY_MESSAGE => return Ok(pid),
                Ok(n) => Err(UpgradeError::Channel { pid, reason: format!("unexpected message of {n} bytes") }),
                Err(e) => Err(UpgradeError::Channel { pid, reason: e.to_string() }),
            },
            r = child.wait() => match r {
                Ok(status) => return Err(UpgradeError::Exited { pid, status }),
                Err(e) => Err(UpgradeError::Channel { pid, reason: format!("cannot watch it: {e}") }),
            },
            _ = tokio::time::sleep(within) => Err(UpgradeError::Timeout { pid, within }),
        };
        stop(&mut child, pid).await;
        outcome
    }
}

/// Kills a new process that will not take over, and reaps it.
async fn stop(child: &mut Child, pid: u32) {
    if let Err(e) = child.start_kill() {
        tracing::warn!(pid, error = %e, "cannot stop the new process");
        return;
    }
    if tokio::time::timeout(KILL_WITHIN, child.wait())
        .await
        .is_err()
    {
        tracing::warn!(pid, "the stopped new process did not exit");
    }
}

/// At most one upgrade at a time, awaited from the signal loop.
#[derive(Debug, Default)]
pub struct Pending(Option<tokio::task::JoinHandle<Result<u32, UpgradeError>>>);

impl Pending {
    /// Starts an upgrade unless one is under way (then `false`).
    pub fn start(&mut self, upgrader: &Upgrader, handle: &Handle) -> bool {
        if self.0.is_some() {
            return false;
        }
        let within = handle.upgrade_timeout();
        let sockets = handle.listening_sockets();
        let upgrader = upgrader.clone();
        self.0 = Some(tokio::spawn(async move {
            upgrader
                .run(sockets.map_err(UpgradeError::Prepare)?, within)
                .await
        }));
        true
    }

    /// Resolves when the upgrade under way ends (never when none is).
    pub async fn done(&mut self) -> Result<u32, UpgradeError> {
        let Some(task) = self.0.as_mut() else {
            return std::future::pending().await;
        };
        let r = task.await;
        self.0 = None;
        r.unwrap_or_else(|e| {
            Err(UpgradeError::Prepare(std::io::Error::other(format!(
                "upgrade task failed: {e}"
            ))))
        })
    }
}

/// The new process's side: once this process would answer `/readyz` with
/// 200, tells the old one to stop accepting. Gives up after
/// `shutdown.upgrade_timeout` (the old process has stopped this one by then).
pub async fn announce_ready(handle: &Handle, ready: ReadySignal) {
    let deadline = tokio::time::Instant::now() + handle.upgrade_timeout();
    while !handle.is_ready() {
        if tokio::time::Instant::now() >= deadline {
            tracing::error!("upgrade: not ready within shutdown.upgrade_timeout");
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    match ready.send() {
        Ok(()) => {
            handle.count_upgrade(true);
            tracing::info!(
                pid = std::process::id(),
                "upgrade: serving on the inherited listeners; the old process drains"
            );
        }
        // The old process is gone: this one serves alone.
        Err(e) => tracing::warn!(error = %e, "upgrade: cannot tell the old process"),
    }
}
