//! A small hyper worker for the upstream tests. It counts connections,
//! records every request, and misbehaves by path:
//!
//! - `/health`: 200, with `Tether-Instance` when it has one;
//! - `/unwell`: 503, with `Tether-Instance`;
//! - `/gather`: answers once the configured number of requests wait here;
//! - `/empty`: 204, no body;
//! - `/hang`: never answers;
//! - `/early`: answers at once, without reading the request body;
//! - `/close-on-reuse`: the second such request on a connection is read,
//!   then the connection is closed without an answer;
//! - `/ws`: `101`, then echoes bytes;
//! - anything else: 200 after reading the body.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::uri::Authority;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Barrier};
use tokio::task::JoinSet;

use crate::upstream::Endpoint;

/// A running mock worker.
pub(super) struct Worker {
    pub(super) addr: SocketAddr,
    state: Arc<State>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct State {
    instance: Mutex<Option<String>>,
    gather: Mutex<Option<Arc<Barrier>>>,
    connections: AtomicUsize,
    open: AtomicUsize,
    paths: Mutex<Vec<String>>,
}

/// The connection closed on purpose (`/close-on-reuse`).
#[derive(Debug, thiserror::Error)]
#[error("closing on purpose")]
struct Closing;

impl Worker {
    /// A worker on a free loopback port.
    pub(super) async fn start(instance: Option<&str>) -> Worker {
        Worker::start_on("127.0.0.1:0".parse().unwrap(), instance).await
    }

    /// A worker on `addr` (a restart on the same port).
    pub(super) async fn start_on(addr: SocketAddr, instance: Option<&str>) -> Worker {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        *state.instance.lock().unwrap() = instance.map(str::to_owned);
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(accept(listener, state.clone(), stopped));
        Worker {
            addr,
            state,
            stop: Some(stop),
            task,
        }
    }

    /// An endpoint for this worker.
    pub(super) fn endpoint(&self) -> Endpoint {
        Endpoint::new(Authority::try_from(self.addr.to_string()).unwrap())
    }

    /// Connections accepted so far.
    pub(super) fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Connections open now.
    pub(super) fn open(&self) -> usize {
        self.state.open.load(Ordering::SeqCst)
    }

    /// Request paths in arrival order.
    pub(super) fn paths(&self) -> Vec<String> {
        self.state.paths.lock().unwrap().clone()
    }

    /// How many requests asked for `path`.
    pub(super) fn count(&self, path: &str) -> usize {
        self.paths().iter().filter(|p| *p == path).count()
    }

    pub(super) fn set_instance(&self, instance: Option<&str>) {
        *self.state.instance.lock().unwrap() = instance.map(str::to_owned);
    }

    /// `/gather` answers once `n` requests wait there.
    pub(super) fn gather(&self, n: usize) {
        *self.state.gather.lock().unwrap() = Some(Arc::new(Barrier::new(n)));
    }

    /// Stops listening and closes every connection (a killed process).
    pub(super) async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.unwrap();
    }
}

async fn accept(listener: TcpListener, state: Arc<State>, mut stopped: oneshot::Receiver<()>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            accepted = listener.accept() => {
                let Ok((tcp, _)) = accepted else { continue };
                conns.spawn(serve(tcp, state.clone()));
            }
        }
    }
    drop(listener);
    // Aborts and waits: every socket is closed when `stop` returns.
    conns.shutdown().await;
}

/// Counts a connection as open while it lives (also when aborted).
struct Open(Arc<State>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn serve(tcp: TcpStream, state: Arc<State>) {
    state.connections.fetch_add(1, Ordering::SeqCst);
    state.open.fetch_add(1, Ordering::SeqCst);
    let _open = Open(state.clone());
    let served = Arc::new(AtomicUsize::new(0));
    let svc = service_fn(move |req| handle(req, state.clone(), served.clone()));
    let _ = http1::Builder::new()
        .serve_connection(TokioIo::new(tcp), svc)
        .with_upgrades()
        .await;
}

async fn handle(
    mut req: Request<Incoming>,
    state: Arc<State>,
    served: Arc<AtomicUsize>,
) -> Result<Response<Full<Bytes>>, Closing> {
    let path = req.uri().path().to_owned();
    state.paths.lock().unwrap().push(path.clone());
    let instance = state.instance.lock().unwrap().clone();
    let answer = |status: StatusCode, body: &'static str| {
        let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
        *resp.status_mut() = status;
        if let Some(i) = &instance {
            resp.headers_mut()
                .insert("tether-instance", i.parse().unwrap());
        }
        resp
    };
    match path.as_str() {
        "/health" => return Ok(answer(StatusCode::OK, "ok")),
        "/unwell" => return Ok(answer(StatusCode::SERVICE_UNAVAILABLE, "unwell")),
        _ => {}
    }
    let nth = served.fetch_add(1, Ordering::SeqCst);
    match path.as_str() {
        "/gather" => {
            let barrier = state.gather.lock().unwrap().clone();
            if let Some(b) = barrier {
                b.wait().await;
            }
        }
        "/empty" => return Ok(answer(StatusCode::NO_CONTENT, "")),
        "/hang" => std::future::pending::<()>().await,
        "/early" => return Ok(answer(StatusCode::OK, "early")),
        "/close-on-reuse" if nth > 0 => {
            let _ = req.body_mut().collect().await;
            return Err(Closing);
        }
        "/ws" => {
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(echo(upgrade));
            let mut resp = answer(StatusCode::SWITCHING_PROTOCOLS, "");
            let h = resp.headers_mut();
            h.insert("connection", "upgrade".parse().unwrap());
            h.insert("upgrade", "echo".parse().unwrap());
            return Ok(resp);
        }
        _ => {}
    }
    let _ = req.body_mut().collect().await;
    Ok(answer(StatusCode::OK, "hello"))
}

async fn echo(upgrade: hyper::upgrade::OnUpgrade) {
    let Ok(upgraded) = upgrade.await else { return };
    let (mut r, mut w) = tokio::io::split(TokioIo::new(upgraded));
    let _ = tokio::time::timeout(Duration::from_secs(10), tokio::io::copy(&mut r, &mut w)).await;
}
