//! The reference worker (the whole contract) running in-process.

use std::net::SocketAddr;
use std::time::Duration;

use tether::worker::{RefWorker, Stats};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A reference worker with a kill switch.
pub struct Ref {
    pub id: String,
    pub addr: SocketAddr,
    pub worker: RefWorker,
    cancel: CancellationToken,
}

impl Ref {
    pub async fn start(id: &str) -> Ref {
        Self::serve(id, TcpListener::bind("127.0.0.1:0").await.unwrap())
    }

    /// A new process with empty memory on the address of a dead one.
    pub async fn start_at(id: &str, addr: SocketAddr) -> Ref {
        for _ in 0..100 {
            if let Ok(l) = TcpListener::bind(addr).await {
                return Self::serve(id, l);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("cannot bind {addr}");
    }

    fn serve(id: &str, listener: TcpListener) -> Ref {
        let addr = listener.local_addr().unwrap();
        let worker = RefWorker::new(id, None);
        let cancel = CancellationToken::new();
        tokio::spawn(worker.clone().serve(listener, cancel.clone()));
        Ref {
            id: id.to_owned(),
            addr,
            worker,
            cancel,
        }
    }

    pub fn toml(&self) -> String {
        format!(
            "[[backends]]\nid = \"{}\"\nurl = \"http://{}\"\n\n",
            self.id, self.addr
        )
    }

    /// Dies like a killed process: listener closed, connections dropped,
    /// memory gone.
    pub fn kill(&self) {
        self.cancel.cancel();
    }

    pub fn stats(&self) -> Stats {
        self.worker.stats()
    }
}

impl Drop for Ref {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Config text for reference workers.
pub fn ref_config(workers: &[&Ref], extra: &str) -> String {
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
