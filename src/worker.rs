//! The reference worker: a small conversation server that implements the
//! whole worker contract (see the README). `tether demo` runs three, the
//! tests run it in-process, and a team can read it as the spec of the
//! adapter to write for their own worker.
//!
//! - `POST /chat?thread=T&message=M` appends the user's message and a reply
//!   and answers with the whole history and `Tether-Checkpoint: T;seq=N`.
//!   With `&later=1` the reply is appended after the response and announced
//!   only on the change feed (an agent that answers later).
//! - `GET /chat?thread=T` returns the history.
//! - `GET /_tether/threads/T?after=N` exports entries after `N`.
//! - `PUT /_tether/threads/T` imports `{"seq","entries","state"}`:
//!   `201` created, `200` already held or tail appended, `409` diverged.
//! - `GET /_tether/changes?after=C&wait=25s` long-polls the change feed.
//! - Every response carries `Tether-Instance` (random per process).
//!
//! With a [`DemoPage`] (`tether worker --demo-page`, what `tether demo`
//! runs) it also serves a chat page at `GET /` and, only when the demo
//! allows it (`--allow-kill`), `POST /demo/kill`, which ends the process.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rand::RngCore;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::wire::{TETHER_CHECKPOINT, TETHER_INSTANCE, TETHER_SESSION};

/// Largest request body the worker reads.
const MAX_BODY: usize = 16 * 1024 * 1024;
/// Changes remembered for the feed.
const MAX_CHANGES: usize = 10_000;

/// One thread: entries `{"seq": k, …}` with `seq` 1, 2, 3… and a state.
#[derive(Debug, Clone, Default)]
struct Thread {
    entries: Vec<Value>,
    state: Option<Value>,
}

/// What the worker has done, for tests and the demo.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Imports that created a thread (`201`).
    pub created: u64,
    /// Imports answered `200`.
    pub merged: u64,
    /// Imports refused as divergent (`409`).
    pub diverged: u64,
    /// Imports of an empty thread (must never happen).
    pub empty_imports: u64,
    /// DELETE requests received (must never happen).
    pub deletes: u64,
    /// Exports served.
    pub exports: u64,
}

#[derive(Debug, Default)]
struct Memory {
    /// session → thread → thread
    sessions: HashMap<String, HashMap<String, Thread>>,
    changes: Vec<(u64, String, String, u64)>,
    cursor: u64,
    stats: Stats,
}

/// A reference worker's shared state.
#[derive(Debug, Clone)]
pub struct RefWorker {
    id: Arc<str>,
    instance: Arc<str>,
    token: Option<Arc<str>>,
    memory: Arc<Mutex<Memory>>,
    changed: Arc<Notify>,
    demo: Option<Arc<DemoPage>>,
}

/// The demo's chat page (`GET /`), off unless set.
#[derive(Debug, Clone, Default)]
pub struct DemoPage {
    /// The dashboard's URL, linked from the page.
    pub dashboard: Option<String>,
    /// When set, the page's "kill this worker" button works:
    /// `POST /demo/kill` answers, then cancels this token (the process
    /// ends). Only the demo sets it.
    pub kill: Option<CancellationToken>,
}

/// The chat page; `__DEMO_CONFIG__` becomes the page's settings (JSON).
const CHAT_PAGE: &str = include_str!("worker/chat.html");

/// How long a killed worker lets its last answer reach the client.
const KILL_GRACE: Duration = Duration::from_millis(200);

impl RefWorker {
    /// A worker with empty memory and a fresh instance tag.
    pub fn new(id: &str, token: Option<&str>) -> RefWorker {
        let mut tag = [0u8; 8];
        rand::thread_rng().fill_bytes(&mut tag);
        RefWorker {
            id: id.into(),
            instance: tag
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
                .into(),
            token: token.map(Into::into),
            memory: Arc::new(Mutex::new(Memory::default())),
            changed: Arc::new(Notify::new()),
            demo: None,
        }
    }

    /// Serves the demo's chat page too.
    pub fn with_demo_page(mut self, page: DemoPage) -> RefWorker {
        self.demo = Some(Arc::new(page));
        self
    }

    /// The instance tag.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Counters of contract calls.
    pub fn stats(&self) -> Stats {
        self.mem().stats.clone()
    }

    /// A thread's entries as held now (empty when absent).
    pub fn entries(&self, session: &str, thread: &str) -> Vec<Value> {
        self.mem()
            .sessions
            .get(session)
            .and_then(|s| s.get(thread))
            .map(|t| t.entries.clone())
            .unwrap_or_default()
    }

    /// Seeds a thread directly (tests: a worker that already holds a copy).
    pub fn seed(&self, session: &str, thread: &str, entries: Vec<Value>) {
        let mut m = self.mem();
        m.sessions.entry(session.to_owned()).or_default().insert(
            thread.to_owned(),
            Thread {
                entries,
                state: None,
            },
        );
    }

    fn mem(&self) -> MutexGuard<'_, Memory> {
        self.memory.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves on `listener` until `cancel`.
    pub async fn serve(self, listener: TcpListener, cancel: CancellationToken) {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let (stream, _) = tokio::select! {
                _ = cancel.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "worker accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                },
            };
            let w = self.clone();
            conns.spawn(async move {
                let svc = service_fn(move |req| {
                    let w = w.clone();
                    async move { Ok::<_, Infallible>(w.handle(req).await) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
        // Dying drops every connection, like a killed process.
        conns.abort_all();
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let mut resp = self.route(req).await;
        if let Ok(v) = HeaderValue::from_str(&self.instance) {
            resp.headers_mut().insert(TETHER_INSTANCE, v);
        }
        resp
    }

    async fn route(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_owned();
        let q = query(req.uri().query());
        let session = header(&req, TETHER_SESSION.as_str()).unwrap_or_default();
        if req.method() == Method::DELETE {
            self.mem().stats.deletes += 1;
            return reply(
                StatusCode::METHOD_NOT_ALLOWED,
                json!({"code": "no_deletes"}),
            );
        }
        if let Some(rest) = path.strip_prefix("/_tether/") {
            if let Some(token) = &self.token {
                let ok =
                    header(&req, "authorization").is_some_and(|v| v == format!("Bearer {token}"));
                if !ok {
                    return reply(StatusCode::UNAUTHORIZED, json!({"code": "unauthorized"}));
                }
            }
            if rest == "changes" {
                return self.changes(&q).await;
            }
            let Some(thread) = rest.strip_prefix("threads/").map(str::to_owned) else {
                return reply(StatusCode::NOT_FOUND, json!({"code": "not_found"}));
            };
            return match *req.method() {
                Method::GET => self.export(&session, &thread, &q),
                Method::PUT => match read_json(req).await {
                    Some(body) => self.import(&session, &thread, body),
                    None => reply(StatusCode::BAD_REQUEST, json!({"code": "bad_json"})),
                },
                _ => reply(StatusCode::METHOD_NOT_ALLOWED, json!({"code": "method"})),
            };
        }
        match (req.method().clone(), path.as_str()) {
            (Method::GET, "/health") => reply(StatusCode::OK, json!({"ok": true})),
            (Method::GET, "/") if self.demo.is_some() => self.chat_page(),
            (Method::POST, "/demo/kill") if self.demo.is_some() => self.kill(),
            (Method::POST, "/chat") => self.chat(&session, &q),
            (Method::GET, "/chat") => {
                let thread = q.get("thread").cloned().unwrap_or_else(|| "main".into());
                let entries = self.entries(&session, &thread);
                reply(
                    StatusCode::OK,
                    json!({"worker": &*self.id, "thread": thread, "history": entries}),
                )
            }
            _ => reply(
                StatusCode::OK,
                json!({"worker": &*self.id, "session": session, "path": path}),
            ),
        }
    }

    fn chat_page(&self) -> Response<Full<Bytes>> {
        let demo = self.demo.as_deref().cloned().unwrap_or_default();
        let settings = json!({
            "dashboard": demo.dashboard,
            "kill": demo.kill.is_some(),
        })
        .to_string()
        // Inside a <script> element: no `</script>` can close it early.
        .replace('<', "\\u003c");
        let page = CHAT_PAGE.replacen("__DEMO_CONFIG__", &settings, 1);
        crate::admin::html_page(
            Bytes::from(page),
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        )
    }

    /// `POST /demo/kill`: answers, then dies (only when the demo allows).
    fn kill(&self) -> Response<Full<Bytes>> {
        let Some(token) = self.demo.as_ref().and_then(|d| d.kill.clone()) else {
            return reply(StatusCode::FORBIDDEN, json!({"code": "kill_disabled"}));
        };
        tracing::warn!(worker = %self.id, "killed from the demo page");
        tokio::spawn(async move {
            tokio::time::sleep(KILL_GRACE).await;
            token.cancel();
        });
        reply(StatusCode::OK, json!({"worker": &*self.id, "dying": true}))
    }

    fn chat(&self, session: &str, q: &HashMap<String, String>) -> Response<Full<Bytes>> {
        let thread = q.get("thread").cloned().unwrap_or_else(|| "main".into());
        if !is_thread_name(&thread) {
            // Thread names go into `Tether-Checkpoint` (`t;seq=N, …`).
            return reply(StatusCode::BAD_REQUEST, json!({"code": "bad_thread"}));
        }
        let message = q.get("message").cloned().unwrap_or_default();
        let later = q.contains_key("later");
        let (history, seq) = {
            let mut m = self.mem();
            let t = m
                .sessions
                .entry(session.to_owned())
                .or_default()
                .entry(thread.clone())
                .or_default();
            let seen = t.entries.len();
            let seq = seen as u64 + 1;
            t.entries
                .push(json!({"seq": seq, "role": "user", "text": message}));
            if !later {
                t.entries.push(json!({
                    "seq": seq + 1,
                    "role": "assistant",
                    "text": format!("{} heard {message:?} with {seen} earlier entries", self.id),
                }));
            }
            t.state = Some(json!({"turns": t.entries.len().div_ceil(2)}));
            (t.entries.clone(), t.entries.len() as u64)
        };
        if later {
            // The reply comes after the response: only the feed tells.
            self.record_change(session, &thread, seq);
            let w = self.clone();
            let (session, thread) = (session.to_owned(), thread.clone());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                w.append_reply(&session, &thread, &message);
            });
        }
        let mut resp = reply(
            StatusCode::OK,
            json!({"worker": &*self.id, "session": session, "thread": thread, "history": history}),
        );
        if !later {
            if let Ok(v) = HeaderValue::from_str(&format!("{thread};seq={seq}")) {
                resp.headers_mut().insert(TETHER_CHECKPOINT, v);
            }
        }
        resp
    }

    fn append_reply(&self, session: &str, thread: &str, message: &str) {
        let seq = {
            let mut m = self.mem();
            let Some(t) = m.sessions.get_mut(session).and_then(|s| s.get_mut(thread)) else {
                return;
            };
            let seq = t.entries.len() as u64 + 1;
            t.entries.push(json!({"seq": seq, "role": "assistant", "text": format!("{} answered {message:?} later", self.id)}));
            seq
        };
        self.record_change(session, thread, seq);
    }

    fn record_change(&self, session: &str, thread: &str, seq: u64) {
        let mut m = self.mem();
        m.cursor += 1;
        let c = m.cursor;
        m.changes
            .push((c, session.to_owned(), thread.to_owned(), seq));
        if m.changes.len() > MAX_CHANGES {
            m.changes.remove(0);
        }
        drop(m);
        self.changed.notify_waiters();
    }

    fn export(
        &self,
        session: &str,
        thread: &str,
        q: &HashMap<String, String>,
    ) -> Response<Full<Bytes>> {
        let after: usize = q.get("after").and_then(|v| v.parse().ok()).unwrap_or(0);
        let mut m = self.mem();
        m.stats.exports += 1;
        let Some(t) = m.sessions.get(session).and_then(|s| s.get(thread)) else {
            return reply(StatusCode::NOT_FOUND, json!({"code": "thread_not_found"}));
        };
        let entries: Vec<Value> = t.entries.iter().skip(after).cloned().collect();
        reply(
            StatusCode::OK,
            json!({"seq": t.entries.len(), "entries": entries, "state": t.state}),
        )
    }

    fn import(&self, session: &str, thread: &str, body: Value) -> Response<Full<Bytes>> {
        let seq = body.get("seq").and_then(Value::as_u64).unwrap_or(0) as usize;
        let entries: Vec<Value> = body
            .get("entries")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let state = body.get("state").cloned().filter(|s| !s.is_null());
        let valid = entries.len() == seq
            && entries
                .iter()
                .enumerate()
                .all(|(i, e)| e.get("seq").and_then(Value::as_u64) == Some(i as u64 + 1));
        let mut m = self.mem();
        if !valid {
            return reply(StatusCode::BAD_REQUEST, json!({"code": "bad_entries"}));
        }
        if entries.is_empty() {
            m.stats.empty_imports += 1;
        }
        let threads = m.sessions.entry(session.to_owned()).or_default();
        let (status, code) = match threads.get_mut(thread) {
            None => {
                threads.insert(thread.to_owned(), Thread { entries, state });
                (StatusCode::CREATED, "created")
            }
            Some(held) => {
                let common = held.entries.len().min(seq);
                if held.entries[..common] != entries[..common] {
                    (StatusCode::CONFLICT, "diverged")
                } else {
                    if seq > held.entries.len() {
                        held.entries
                            .extend_from_slice(&entries[held.entries.len()..]);
                        if state.is_some() {
                            held.state = state;
                        }
                    }
                    (StatusCode::OK, "merged")
                }
            }
        };
        match status {
            StatusCode::CREATED => m.stats.created += 1,
            StatusCode::CONFLICT => m.stats.diverged += 1,
            _ => m.stats.merged += 1,
        }
        let held = m
            .sessions
            .get(session)
            .and_then(|s| s.get(thread))
            .map(|t| t.entries.len())
            .unwrap_or(0);
        reply(status, json!({"code": code, "seq": held}))
    }

    async fn changes(&self, q: &HashMap<String, String>) -> Response<Full<Bytes>> {
        let after: u64 = q.get("after").and_then(|v| v.parse().ok()).unwrap_or(0);
        let wait = q
            .get("wait")
            .and_then(|v| humantime::parse_duration(v).ok())
            .unwrap_or(Duration::from_secs(25))
            .min(Duration::from_secs(60));
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.changed.notified();
            {
                let m = self.mem();
                let changes: Vec<Value> = m
                    .changes
                    .iter()
                    .filter(|(c, ..)| *c > after)
                    .map(|(_, s, t, seq)| json!({"session": s, "thread": t, "seq": seq}))
                    .collect();
                if !changes.is_empty() || tokio::time::Instant::now() >= deadline {
                    return reply(
                        StatusCode::OK,
                        json!({"cursor": m.cursor.max(after), "changes": changes}),
                    );
                }
            }
            let _ = tokio::time::timeout_at(deadline, notified).await;
        }
    }
}

/// A thread name the checkpoint header can carry: 1 to 64 of
/// `A-Z a-z 0-9 . _ -`.
fn is_thread_name(t: &str) -> bool {
    (1..=64).contains(&t.len())
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn header(req: &Request<Incoming>, name: &str) -> Option<String> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn query(q: Option<&str>) -> HashMap<String, String> {
    q.unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), percent_decode(v)))
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => match s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                Some(b) => {
                    out.push(b);
                    i += 2;
                }
                None => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn read_json(req: Request<Incoming>) -> Option<Value> {
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .ok()?
        .to_bytes();
    serde_json::from_slice(&body).ok()
}

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}
