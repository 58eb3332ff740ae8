//! A TCP relay to PostgreSQL that can be cut: the store becomes unreachable
//! for tether while the shared server keeps serving other tests.

use std::net::SocketAddr;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Where the relay forwards to.
const POSTGRES: &str = "127.0.0.1:5432";

/// A cuttable relay on an ephemeral loopback port.
pub struct Relay {
    pub addr: SocketAddr,
    cut: watch::Sender<bool>,
    stop: CancellationToken,
}

impl Relay {
    pub async fn start() -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, cut_rx) = watch::channel(false);
        let stop = CancellationToken::new();
        let stop2 = stop.clone();
        tokio::spawn(async move {
            loop {
                let (mut inbound, _) = tokio::select! {
                    _ = stop2.cancelled() => return,
                    r = listener.accept() => r.unwrap(),
                };
                if *cut_rx.borrow() {
                    let _ = inbound.shutdown().await;
                    continue;
                }
                let mut rx = cut_rx.clone();
                tokio::spawn(async move {
                    let Ok(mut out) = TcpStream::connect(POSTGRES).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut out) => {}
                        _ = rx.wait_for(|c| *c) => {}
                    }
                });
            }
        });
        Relay { addr, cut, stop }
    }

    /// The store URL of database `db` through the relay.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@{}/{db}", self.addr)
    }

    /// Cuts every connection and refuses new ones (store down).
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Lets connections through again (store back).
    pub fn heal(&self) {
        self.cut.send_replace(false);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
