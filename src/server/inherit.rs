//! Listening sockets handed over by the process that started this one:
//! systemd socket activation (`LISTEN_FDS`, fds from 3 on) or a tether
//! binary upgrade, which adds one more fd, a datagram socket named by
//! `TETHER_UPGRADE_READY=<index>`, on which the new process says "ready".
//!
//! An inherited listener replaces the bind of the configured address it is
//! bound to; the same socket (and its queue of connections not yet
//! accepted) then serves in both processes until the old one stops
//! accepting, so nothing is refused or reset during the hand-over.

use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixDatagram;

use listenfd::ListenFd;

/// The environment variable naming the readiness socket's index among the
/// `LISTEN_FDS` sockets (set by a tether that upgrades itself).
pub const READY_ENV: &str = "TETHER_UPGRADE_READY";

/// What the new process writes on the readiness socket.
pub const READY_MESSAGE: &[u8] = b"ready";

/// Why the inherited sockets cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum InheritError {
    /// `TETHER_UPGRADE_READY` is not an index.
    #[error("{READY_ENV}={0:?} is not a socket index")]
    ReadyIndex(String),
    /// An fd is not what its position promises.
    #[error("LISTEN_FDS socket {index} (fd {fd}): {source}")]
    Socket {
        /// Index among the inherited sockets.
        index: usize,
        /// The fd number (3 + index).
        fd: usize,
        /// The cause (not a TCP listener, not a datagram socket, ...).
        #[source]
        source: std::io::Error,
    },
}

/// Sockets inherited at start, not yet claimed by a configured address.
#[derive(Debug, Default)]
pub struct Inherited {
    listeners: Vec<(SocketAddr, TcpListener)>,
    ready: Option<ReadySignal>,
}

impl Inherited {
    /// Takes the sockets the environment names and clears `LISTEN_FDS`,
    /// `LISTEN_PID`, `LISTEN_FDNAMES` and `TETHER_UPGRADE_READY`, so no
    /// process tether starts later sees them. Call it before any thread
    /// starts (it changes the environment).
    pub fn from_env() -> Result<Inherited, InheritError> {
        let ready_index = match std::env::var(READY_ENV) {
            Ok(v) => Some(
                v.trim()
                    .parse::<usize>()
                    .map_err(|_| InheritError::ReadyIndex(v))?,
            ),
            Err(_) => None,
        };
        std::env::remove_var(READY_ENV);
        std::env::remove_var("LISTEN_FDNAMES");
        // `from_env` clears LISTEN_FDS and LISTEN_PID itself; an unset or
        // empty LISTEN_PID means the sockets are ours (a tether upgrade
        // cannot know its child's pid before it starts).
        let mut fds = ListenFd::from_env();
        let mut out = Inherited::default();
        for index in 0..fds.len() {
            let err = |source| InheritError::Socket {
                index,
                fd: index + 3,
                source,
            };
            if Some(index) == ready_index {
                if let Some(sock) = fds.take_unix_datagram(index).map_err(err)? {
                    out.ready = Some(ReadySignal(cloexec_datagram(sock).map_err(err)?));
                }
                continue;
            }
            let Some(l) = fds.take_tcp_listener(index).map_err(err)? else {
                continue;
            };
            let l = cloexec_listener(l).map_err(err)?;
            let addr = l.local_addr().map_err(err)?;
            out.listeners.push((addr, l));
        }
        Ok(out)
    }

    /// The inherited listener bound to `addr`, if any.
    pub(crate) fn take(&mut self, addr: SocketAddr) -> Option<TcpListener> {
        let i = self.listeners.iter().position(|(a, _)| *a == addr)?;
        Some(self.listeners.swap_remove(i).1)
    }

    /// The readiness socket of an upgrade, if this process is one.
    pub fn take_ready(&mut self) -> Option<ReadySignal> {
        self.ready.take()
    }

    /// Addresses of inherited listeners no configured address claimed
    /// (they are closed when `self` drops).
    pub(crate) fn unclaimed(&self) -> Vec<SocketAddr> {
        self.listeners.iter().map(|(a, _)| *a).collect()
    }
}

/// The new process's end of an upgrade's readiness channel.
#[derive(Debug)]
pub struct ReadySignal(UnixDatagram);

impl ReadySignal {
    /// Tells the old process that this one serves: it may stop accepting.
    pub fn send(self) -> std::io::Result<()> {
        // A few bytes into an empty socket buffer: never blocks.
        self.0.send(READY_MESSAGE).map(|_| ())
    }
}

// Inherited fds come without close-on-exec (they had to survive an exec).
// `try_clone` duplicates with close-on-exec set, so the sockets do not leak
// into processes tether starts later (workers of the demo, the next
// upgrade, which maps the ones it hands over explicitly).
fn cloexec_listener(l: TcpListener) -> std::io::Result<TcpListener> {
    l.try_clone()
}

fn cloexec_datagram(s: UnixDatagram) -> std::io::Result<UnixDatagram> {
    s.try_clone()
}
