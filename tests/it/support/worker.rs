//! A mock worker: a small real HTTP server on 127.0.0.1:0 that records what
//! it receives and can fail, hang or die on command.
//!
//! Query switches: `?ms=N` sleeps N ms before answering (counted as
//! active meanwhile, see [`Worker::max_active`]); `?bytes=N`
//! answers N bytes, streamed; `?die=ID` (worker
//! ID reads the request, then drops every connection and hangs);
//! `?reset=1` reads the request, then resets just its connection (RST).
//! [`Worker::set_close_second`] makes the worker read the second request of
//! every connection and close that connection unanswered.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tether::proxy::body::{full, BoxError, ProxyBody};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// One request as the worker saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

#[derive(Debug, Default)]
struct State {
    seen: Vec<Seen>,
    /// Requests under /_tether (tether's own contract calls).
    contract: Vec<Seen>,
    instance: Option<String>,
    /// Requests being handled now, and the most at once (health probes
    /// and contract calls excluded).
    active: usize,
    max_active: usize,
}

/// Counts a request as active at the worker until dropped.
struct Active(Arc<Mutex<State>>);

impl Active {
    fn enter(state: &Arc<Mutex<State>>) -> Active {
        let mut s = state.lock().unwrap();
        s.active += 1;
        s.max_active = s.max_active.max(s.active);
        Active(state.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.lock().unwrap().active -= 1;
    }
}

/// A running mock worker.
pub struct Worker {
    pub id: String,
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    status: Arc<AtomicU16>,
    health: Arc<AtomicU16>,
    close_second: Arc<AtomicBool>,
    tasks: Option<JoinSet<()>>,
    conns: Arc<Mutex<JoinSet<()>>>,
}

impl Worker {
    /// Starts a worker on an ephemeral loopback port.
    pub async fn start(id: &str) -> Worker {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(id, listener, Arc::new(Mutex::new(State::default())))
    }

    /// Starts a worker on a given address (restart on the same port).
    pub async fn start_at(id: &str, addr: SocketAddr, instance: Option<&str>) -> Worker {
        let listener = bind_retry(addr).await;
        let state = State {
            instance: instance.map(str::to_owned),
            ..State::default()
        };
        Self::serve(id, listener, Arc::new(Mutex::new(state)))
    }

    fn serve(id: &str, listener: TcpListener, state: Arc<Mutex<State>>) -> Worker {
        let addr = listener.local_addr().unwrap();
        let status = Arc::new(AtomicU16::new(200));
        let health = Arc::new(AtomicU16::new(200));
        let close_second = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(JoinSet::new()));
        let mut tasks = JoinSet::new();
        let ctl = Ctl {
            id: id.to_owned(),
            state: state.clone(),
            status: status.clone(),
            health: health.clone(),
            close_second: close_second.clone(),
            conns: conns.clone(),
            conn: Conn::default(),
        };
        let conns2 = conns.clone();
        tasks.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                // Each connection gets its own switches (close, reset, count).
                let ctl = Ctl {
                    conn: Conn::default(),
                    ..ctl.clone()
                };
                conns2.lock().unwrap().spawn(async move {
                    let conn = ctl.conn.clone();
                    let io = ConnIo {
                        inner: stream,
                        reset: conn.reset.clone(),
                    };
                    let svc = service_fn(move |req| {
                        let ctl = ctl.clone();
                        async move { Ok::<_, Infallible>(handle(&ctl, req).await) }
                    });
                    let builder = auto::Builder::new(TokioExecutor::new());
                    let serve = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
                    tokio::select! {
                        _ = serve => {}
                        // Dropping the connection closes (or resets) it.
                        _ = conn.close.cancelled() => {}
                    }
                });
            }
        });
        Worker {
            id: id.to_owned(),
            addr,
            state,
            status,
            health,
            close_second,
            tasks: Some(tasks),
            conns,
        }
    }

    /// The `[[backends]]` TOML entry for this worker.
    pub fn toml(&self) -> String {
        format!(
            "[[backends]]\nid = \"{}\"\nurl = \"http://{}\"\n\n",
            self.id, self.addr
        )
    }

    /// Requests received so far (health probes excluded).
    pub fn seen(&self) -> Vec<Seen> {
        self.state
            .lock()
            .unwrap()
            .seen
            .iter()
            .filter(|s| s.path != "/health")
            .cloned()
            .collect()
    }

    /// The most requests the worker was handling at once.
    pub fn max_active(&self) -> usize {
        self.state.lock().unwrap().max_active
    }

    /// Requests under /_tether (this mock implements no contract: 404).
    pub fn contract_calls(&self) -> Vec<Seen> {
        self.state.lock().unwrap().contract.clone()
    }

    /// Makes every answer but health probes use `status`.
    pub fn set_status(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    /// Makes health probes answer `status`.
    pub fn set_health(&self, status: u16) {
        self.health.store(status, Ordering::SeqCst);
    }

    /// On: every connection's first request is answered (keep-alive), its
    /// second is read and the connection closed without an answer (a
    /// keep-alive timeout racing a new request). Health probes are exempt.
    pub fn set_close_second(&self, on: bool) {
        self.close_second.store(on, Ordering::SeqCst);
    }

    /// Requests received on `path`.
    pub fn count(&self, method: &str, path: &str) -> usize {
        self.seen()
            .iter()
            .filter(|s| s.method == method && s.path == path)
            .count()
    }

    /// Stops the worker: the listener closes and open connections drop.
    pub fn kill(&mut self) {
        if let Some(mut t) = self.tasks.take() {
            t.abort_all();
        }
        self.conns.lock().unwrap().abort_all();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn bind_retry(addr: SocketAddr) -> TcpListener {
    for _ in 0..100 {
        if let Ok(l) = TcpListener::bind(addr).await {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("cannot bind {addr}");
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[derive(Clone)]
struct Ctl {
    id: String,
    state: Arc<Mutex<State>>,
    status: Arc<AtomicU16>,
    health: Arc<AtomicU16>,
    close_second: Arc<AtomicBool>,
    conns: Arc<Mutex<JoinSet<()>>>,
    conn: Conn,
}

/// One connection's switches.
#[derive(Clone, Default)]
struct Conn {
    /// Cancelled: the connection is dropped unanswered.
    close: CancellationToken,
    /// Set: the drop is a reset (RST), not an orderly close.
    reset: Arc<AtomicBool>,
    /// Requests (health probes excluded) received on it.
    requests: Arc<AtomicUsize>,
}

/// The connection's socket; resets instead of closing when asked to.
struct ConnIo {
    inner: TcpStream,
    reset: Arc<AtomicBool>,
}

impl Drop for ConnIo {
    fn drop(&mut self) {
        if self.reset.load(Ordering::SeqCst) {
            let _ = self.inner.set_zero_linger();
        }
    }
}

impl AsyncRead for ConnIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for ConnIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

async fn handle(ctl: &Ctl, req: Request<Incoming>) -> Response<ProxyBody> {
    let (id, state) = (ctl.id.as_str(), &*ctl.state);
    let q = query(&req);
    let path = req.uri().path().to_owned();
    let method = req.method().to_string();
    let headers = req.headers().clone();
    let instance = state.lock().unwrap().instance.clone();
    let code = if path == "/health" {
        StatusCode::from_u16(ctl.health.load(Ordering::SeqCst)).unwrap()
    } else {
        StatusCode::from_u16(ctl.status.load(Ordering::SeqCst)).unwrap()
    };

    if path.starts_with("/_tether/") {
        state.lock().unwrap().contract.push(Seen {
            method,
            path,
            headers,
            body: Bytes::new(),
        });
        let mut r = Response::new(full("{\"code\":\"not_found\"}"));
        *r.status_mut() = StatusCode::NOT_FOUND;
        return r;
    }
    if path == "/ws" {
        state.lock().unwrap().seen.push(Seen {
            method,
            path,
            headers: headers.clone(),
            body: Bytes::new(),
        });
        return websocket(id, req);
    }
    let _active = (path != "/health").then(|| Active::enter(&ctl.state));
    let (parts, body) = req.into_parts();
    let _ = parts;
    let nth = if path == "/health" {
        0
    } else {
        ctl.conn.requests.fetch_add(1, Ordering::SeqCst) + 1
    };
    let reset = q.get("reset").map(String::as_str) == Some("1");
    let close = nth >= 2 && ctl.close_second.load(Ordering::SeqCst);
    let body = if reset || close {
        // Read the request, then drop just this connection unanswered.
        let _ = body.collect().await;
        state.lock().unwrap().seen.push(Seen {
            method,
            path,
            headers,
            body: Bytes::new(),
        });
        ctl.conn.reset.store(reset, Ordering::SeqCst);
        ctl.conn.close.cancel();
        std::future::pending::<()>().await;
        unreachable!()
    } else if q.get("die").map(String::as_str) == Some(id) {
        // Read the request, then die: every connection drops unanswered.
        let _ = body.collect().await;
        state.lock().unwrap().seen.push(Seen {
            method,
            path,
            headers,
            body: Bytes::new(),
        });
        ctl.conns.lock().unwrap().abort_all();
        std::future::pending::<()>().await;
        unreachable!()
    } else {
        body.collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default()
    };
    state.lock().unwrap().seen.push(Seen {
        method,
        path: path.clone(),
        headers: headers.clone(),
        body: body.clone(),
    });
    if let Some(ms) = q.get("ms").and_then(|v| v.parse::<u64>().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let mut resp = if path == "/sse" {
        sse(id)
    } else if let Some(n) = q.get("bytes").and_then(|v| v.parse::<usize>().ok()) {
        big(n)
    } else {
        Response::new(full(format!("{id}\n")))
    };
    if path != "/sse" {
        *resp.status_mut() = code;
    }
    let h = resp.headers_mut();
    h.insert("x-worker", id.parse().unwrap());
    if let Some(inst) = instance {
        h.insert("tether-instance", inst.parse().unwrap());
    }
    if q.contains_key("set-affinity-cookie") {
        h.append(
            "set-cookie",
            "tether=forged-by-worker; Path=/".parse().unwrap(),
        );
        h.append("set-cookie", "app=kept; Path=/".parse().unwrap());
    }
    if let Some(name) = q.get("connection-header") {
        h.insert("connection", name.parse().unwrap());
        h.insert(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            "hop".parse().unwrap(),
        );
    }
    resp
}

/// `n` bytes of `x`, streamed in 64 KiB frames (the worker holds one).
fn big(n: usize) -> Response<ProxyBody> {
    const FRAME: usize = 64 << 10;
    let chunk = Bytes::from(vec![b'x'; FRAME]);
    let stream = futures_util::stream::unfold(n, move |left| {
        let chunk = chunk.clone();
        async move {
            if left == 0 {
                return None;
            }
            let take = left.min(FRAME);
            Some((
                Ok::<_, BoxError>(Frame::data(chunk.slice(..take))),
                left - take,
            ))
        }
    });
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    resp.headers_mut()
        .insert("content-length", n.to_string().parse().unwrap());
    resp
}

fn sse(id: &str) -> Response<ProxyBody> {
    let id = id.to_owned();
    let stream = futures_util::stream::unfold(0u32, move |n| {
        let id = id.clone();
        async move {
            if n == 5 {
                return None;
            }
            if n > 0 {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let frame = Frame::data(Bytes::from(format!("data: {id} event {n}\n\n")));
            Some((Ok::<_, BoxError>(frame), n + 1))
        }
    });
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    resp.headers_mut()
        .insert("content-type", "text/event-stream".parse().unwrap());
    resp
}

fn websocket(id: &str, mut req: Request<Incoming>) -> Response<ProxyBody> {
    let key = req
        .headers()
        .get("sec-websocket-key")
        .cloned()
        .unwrap_or_else(|| "".parse().unwrap());
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(&mut req);
    let worker_id = id.to_owned();
    let id = id.to_owned();
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            Role::Server,
            None,
        )
        .await;
        while let Some(Ok(msg)) = ws.next().await {
            let reply = match msg {
                Message::Text(t) => Message::text(format!("{id}: {t}")),
                Message::Close(_) => return,
                _ => continue,
            };
            if ws.send(reply).await.is_err() {
                return;
            }
        }
    });
    let mut resp = Response::new(tether::proxy::body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert("upgrade", "websocket".parse().unwrap());
    h.insert("connection", "upgrade".parse().unwrap());
    h.insert("sec-websocket-accept", accept.parse().unwrap());
    h.insert("x-worker", worker_id.parse().unwrap());
    resp
}
