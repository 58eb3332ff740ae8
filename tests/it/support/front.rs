//! `Front` is a reference worker (the whole contract, in-process) behind a
//! tiny HTTP front that can, on command: answer health probes with a given
//! status, answer imports (`PUT /_tether/threads/*`) with a given status,
//! hold a request (`&delay=MS`) before passing it on, drop a request's
//! connection unanswered (`?reset=<worker id>`), or die (listener closed).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::support::turns::{user_texts, Outcome};
use crate::support::*;

pub const FAST: &str = "[health]\ninterval = \"100ms\"\ntimeout = \"200ms\"\nfall = 2\nrise = 2\n";

pub struct Front {
    pub id: String,
    pub addr: SocketAddr,
    pub ctl: Ctl,
    pub cancel: CancellationToken,
    pub conns: Arc<Mutex<JoinSet<()>>>,
}

/// The worker process behind the front (a restart swaps it).
pub struct Proc {
    pub addr: SocketAddr,
    pub instance: String,
    pub refs: Vec<Ref>,
}

#[derive(Clone)]
pub struct Ctl {
    pub id: String,
    pub proc: Arc<Mutex<Proc>>,
    pub health: Arc<AtomicU16>,
    pub import: Arc<AtomicU16>,
    pub export: Arc<AtomicU16>,
    pub export_delay: Arc<AtomicU64>,
    pub import_delay: Arc<AtomicU64>,
    pub restart_after_import: Arc<AtomicBool>,
    pub health_no_instance: Arc<AtomicBool>,
    pub http: reqwest::Client,
}

impl Front {
    pub async fn start(id: &str) -> Front {
        let inner = Ref::start(id).await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let ctl = Ctl {
            id: id.to_owned(),
            proc: Arc::new(Mutex::new(Proc {
                addr: inner.addr,
                instance: inner.worker.instance().to_owned(),
                refs: vec![inner],
            })),
            health: Arc::new(AtomicU16::new(0)),
            import: Arc::new(AtomicU16::new(0)),
            export: Arc::new(AtomicU16::new(0)),
            export_delay: Arc::new(AtomicU64::new(0)),
            import_delay: Arc::new(AtomicU64::new(0)),
            restart_after_import: Arc::new(AtomicBool::new(false)),
            health_no_instance: Arc::new(AtomicBool::new(false)),
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
        };
        let cancel = CancellationToken::new();
        let conns = Arc::new(Mutex::new(JoinSet::new()));
        let (c2, conns2, ctl2) = (cancel.clone(), conns.clone(), ctl.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = c2.cancelled() => return,
                    r = listener.accept() => match r { Ok(s) => s, Err(_) => continue },
                };
                let ctl = ctl2.clone();
                // A connection reaches the process that served the address
                // when it was accepted (a restart means new connections).
                let bound = {
                    let p = ctl.proc.lock().unwrap();
                    (p.addr, p.instance.clone())
                };
                conns2.lock().unwrap().spawn(async move {
                    let svc = service_fn(move |req| {
                        let (ctl, bound) = (ctl.clone(), bound.clone());
                        async move { front(&ctl, bound, req).await }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Front {
            id: id.to_owned(),
            addr,
            ctl,
            cancel,
            conns,
        }
    }

    pub fn toml(&self) -> String {
        format!(
            "[[backends]]\nid = \"{}\"\nurl = \"http://{}\"\n\n",
            self.id, self.addr
        )
    }

    /// Dies: listener closed, connections dropped (refused from now on).
    pub fn kill(&self) {
        self.cancel.cancel();
        self.conns.lock().unwrap().abort_all();
        for r in &self.ctl.proc.lock().unwrap().refs {
            r.kill();
        }
    }

    /// The thread as the current process holds it (user texts).
    pub fn held(&self, session: &str) -> Vec<String> {
        self.held_thread(session, "main")
    }

    pub fn held_thread(&self, session: &str, thread: &str) -> Vec<String> {
        let p = self.ctl.proc.lock().unwrap();
        user_texts(&p.refs.last().unwrap().worker.entries(session, thread))
    }

    /// The process dies and a new one (empty memory, new instance) takes
    /// the address at once.
    pub async fn restart(&self) {
        let fresh = Ref::start(&self.id).await;
        let mut p = self.ctl.proc.lock().unwrap();
        for old in &p.refs {
            old.kill();
        }
        // Its connections die with it.
        self.conns.lock().unwrap().abort_all();
        p.addr = fresh.addr;
        p.instance = fresh.worker.instance().to_owned();
        p.refs.push(fresh);
    }

    pub fn set(&self, what: &AtomicU16, v: u16) {
        what.store(v, Ordering::SeqCst);
    }
}

pub async fn front(
    ctl: &Ctl,
    bound: (SocketAddr, String),
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let (inner, instance) = bound;
    // A connection to a process that is no longer the address's current
    // one belongs to a draining process: it answers, then closes.
    let draining = ctl.proc.lock().unwrap().instance != instance;
    let status = |code: u16| {
        let mut r = Response::new(Full::new(Bytes::from_static(b"{\"code\":\"front\"}")));
        *r.status_mut() = StatusCode::from_u16(code).unwrap();
        r.headers_mut()
            .insert("tether-instance", instance.parse().unwrap());
        Ok(r)
    };
    let h = ctl.health.load(Ordering::SeqCst);
    if path == "/health" && h != 0 {
        return status(h);
    }
    let is_import = req.method() == http::Method::PUT && path.starts_with("/_tether/threads/");
    let is_export = req.method() == http::Method::GET && path.starts_with("/_tether/threads/");
    let i = ctl.import.load(Ordering::SeqCst);
    if is_import && i != 0 {
        return status(i);
    }
    let e = ctl.export.load(Ordering::SeqCst);
    if is_export && e != 0 {
        return status(e);
    }
    if is_import && !draining {
        let d = ctl.import_delay.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(d)).await;
    }
    if is_export {
        let d = ctl.export_delay.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(d)).await;
    }
    if query.split('&').any(|kv| kv == format!("reset={}", ctl.id)) {
        // The request reached this worker, which drops the connection.
        return Err(std::io::Error::other("reset on command"));
    }
    if let Some(ms) = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("delay="))
        .and_then(|v| v.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let method = req.method().clone();
    let headers = req.headers().clone();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let pq = if query.is_empty() {
        path.clone()
    } else {
        format!("{path}?{query}")
    };
    let mut out = ctl
        .http
        .request(method, format!("http://{inner}{pq}"))
        .body(body);
    for (k, v) in &headers {
        if !matches!(
            k.as_str(),
            "host" | "content-length" | "connection" | "transfer-encoding"
        ) {
            out = out.header(k, v);
        }
    }
    let r = out.send().await.map_err(std::io::Error::other)?;
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = r.status();
    for (k, v) in r.headers() {
        if !matches!(
            k.as_str(),
            "content-length" | "connection" | "transfer-encoding"
        ) {
            resp.headers_mut().append(k, v.clone());
        }
    }
    let bytes = r.bytes().await.map_err(std::io::Error::other)?;
    *resp.body_mut() = Full::new(bytes);
    if path == "/health" && ctl.health_no_instance.load(Ordering::SeqCst) {
        resp.headers_mut().remove("tether-instance");
    }
    if draining {
        resp.headers_mut()
            .insert("connection", "close".parse().unwrap());
    }
    if is_import && ctl.restart_after_import.swap(false, Ordering::SeqCst) {
        // A graceful restart begins right after this import: a new process
        // (empty memory, new instance, a little slow to take its first
        // imports) takes new connections; the old one finishes what it has
        // and answers `Connection: close` (SO_REUSEPORT hand-over, or
        // several pods behind one address).
        let fresh = Ref::start(&ctl.id).await;
        let mut p = ctl.proc.lock().unwrap();
        p.addr = fresh.addr;
        p.instance = fresh.worker.instance().to_owned();
        p.refs.push(fresh);
        ctl.import_delay.store(500, Ordering::SeqCst);
        resp.headers_mut()
            .insert("connection", "close".parse().unwrap());
    }
    Ok(resp)
}

pub fn cfg(workers: &[&Front], extra: &str) -> String {
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

/// A user with one acknowledged turn on `worker`.
pub async fn chat_on(base: &str, worker: &str) -> Chat {
    for i in 0..60 {
        let mut c = Chat::new(&format!("u{i}"));
        let m = c.next_message();
        match c.turn(base, &m).await {
            Outcome::Ok { worker: w, .. } if w == worker => return c,
            Outcome::Ok { .. } => {}
            other => panic!("first turn: {other:?}"),
        }
    }
    panic!("no user landed on {worker}");
}

pub async fn stored_users(t: &Tether, session: &str) -> Vec<String> {
    let url = format!("sqlite://{}/tether.db", t.dir.path().display());
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    let bodies: Vec<String> = sqlx::query_scalar(
        "SELECT body FROM tether_entries WHERE session_id = $1 AND thread_id = 'main' ORDER BY seq",
    )
    .bind(session)
    .fetch_all(&pool)
    .await
    .unwrap();
    let v: Vec<Value> = bodies
        .iter()
        .map(|b| serde_json::from_str(b).unwrap())
        .collect();
    user_texts(&v)
}

/// A POST /chat turn that the client sends with extra query text; returns
/// (status, worker, Tether-Restore, user texts of the history).
pub async fn raw_turn(
    c: &reqwest::Client,
    base: &str,
    msg: &str,
    extra: &str,
) -> (u16, String, Option<String>, Vec<String>) {
    let r = c
        .post(format!("{base}/chat?thread=main&message={msg}{extra}"))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let restore = r
        .headers()
        .get("tether-restore")
        .map(|v| v.to_str().unwrap().to_owned());
    let v: Value = r.json().await.unwrap_or(Value::Null);
    let worker = v["worker"].as_str().unwrap_or("").to_owned();
    let hist = v["history"].as_array().cloned().unwrap_or_default();
    (status, worker, restore, user_texts(&hist))
}
