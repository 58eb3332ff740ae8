//! The admin API on `listen.admin`: liveness, readiness, metrics, the
//! worker list, drain control, the dashboard's JSON (`/api/overview`,
//! `/api/moves`) and the dashboard page itself at `/`. `/healthz` and
//! `/readyz` are open (an orchestrator probes them), and so is the page
//! (it holds no data); everything else needs `admin.token` when it is set.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST, ORIGIN};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::backends::WorkerSet;
use crate::continuity::{Continuity, StoreState};
use crate::live::SharedLive;
use crate::metrics::Metrics;
use crate::upstream::Upstream;

type AdminResponse = Response<Full<Bytes>>;

/// What the admin API reads and controls.
#[derive(Debug, Clone)]
pub(crate) struct Admin {
    /// The config generation (the admin token).
    pub live: SharedLive,
    /// The workers (state, drain).
    pub workers: WorkerSet,
    /// The store's state and capture gauges.
    pub continuity: Continuity,
    /// The metrics to render.
    pub metrics: Arc<Metrics>,
    /// Upstream connection counts.
    pub upstream: Upstream,
}

/// Serves the admin API until `cancel`.
pub(crate) async fn serve(listener: TcpListener, proxy: Admin, cancel: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let proxy = proxy.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let proxy = proxy.clone();
                async move { Ok::<_, Infallible>(route(&proxy, req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r {
                    tracing::debug!(error = %e, "admin connection error");
                },
                _ = cancel.cancelled() => {
                    // A request under way (a probe during an upgrade) gets
                    // its answer; an idle connection closes.
                    conn.as_mut().graceful_shutdown();
                    let within = std::time::Duration::from_secs(5);
                    if tokio::time::timeout(within, conn.as_mut()).await.is_err() {
                        tracing::debug!("admin connection cut at shutdown");
                    }
                }
            }
        });
    }
}

fn route(proxy: &Admin, req: Request<Incoming>) -> AdminResponse {
    let path = req.uri().path().trim_end_matches('/');
    let method = req.method();
    match (method, path) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => readyz(proxy),
        // The page holds no data: it asks for the token and sends it with
        // every call to the endpoints below.
        (&Method::GET, "") => dashboard(),
        (&Method::POST, _) if !same_origin(&req) => {
            // A page on another site cannot drain workers through a
            // browser that can reach this listener.
            text(StatusCode::FORBIDDEN, "cross-origin request refused\n")
        }
        _ if !authorized(proxy, &req) => {
            let mut r = text(StatusCode::UNAUTHORIZED, "unauthorized\n");
            r.headers_mut()
                .insert("www-authenticate", HeaderValue::from_static("Bearer"));
            r
        }
        (&Method::GET, "/metrics") => {
            let workers = proxy.workers.load();
            let body =
                proxy
                    .metrics
                    .render(&workers, proxy.continuity.gauges(), proxy.upstream.stats());
            let mut r = Response::new(Full::new(Bytes::from(body)));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        (&Method::GET, "/backends") => json_response(StatusCode::OK, &json!(workers(proxy))),
        (&Method::GET, "/api/overview") => overview(proxy),
        (&Method::GET, "/api/moves") => json_response(
            StatusCode::OK,
            &json!(proxy.continuity.recent_moves().newest_first()),
        ),
        (&Method::POST, p) if p.starts_with("/backends/") => drain(proxy, p),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn authorized(proxy: &Admin, req: &Request<Incoming>) -> bool {
    let live = proxy.live.load();
    let Some(token) = &live.config.admin.token else {
        return true;
    };
    let presented = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Compare in constant time: the token guards drain control.
    presented.is_some_and(|p| constant_eq(p.as_bytes(), token.expose().as_bytes()))
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn readyz(proxy: &Admin) -> AdminResponse {
    let workers = proxy.workers.load();
    let up = workers.usable_count();
    let mut reasons = Vec::new();
    if up == 0 {
        reasons.push("no worker is up".to_owned());
    }
    let ready = reasons.is_empty();
    // A store outage is reported, not made fatal: pinned users are served.
    let c = &proxy.continuity;
    let gauges = c.gauges();
    let store = json!({
        "kind": c.store_kind(),
        "state": c.store_state().as_str(),
        "buffered": gauges.buffered,
        "buffered_bytes": gauges.buffered_bytes,
    });
    let body = json!({
        "store": store,
        "ready": ready,
        "reasons": reasons,
        "workers_up": up,
        "workers": workers.all().len(),
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(status, &body)
}

/// The `/backends` entries (also the `workers` of `/api/overview`).
fn workers(proxy: &Admin) -> Vec<serde_json::Value> {
    let now = proxy.continuity.now_unix();
    let workers = proxy.workers.load();
    workers
        .all()
        .iter()
        .map(|b| {
            let (state, held) = b.observe_state();
            json!({
                "id": b.id,
                "url": b.url.to_string(),
                "weight": b.weight(),
                "state": state.as_str(),
                "changed_at": now.saturating_sub(held.as_secs()),
                "instance": b.instance(),
                "sessions": b.sessions(),
                "in_flight": b.slots.in_flight(),
                "queued": b.slots.queued(),
            })
        })
        .collect()
}

/// Moves `/api/overview` carries (the full ring is at `/api/moves`).
const OVERVIEW_MOVES: usize = 20;

/// Everything the dashboard shows, in one poll.
fn overview(proxy: &Admin) -> AdminResponse {
    let c = &proxy.continuity;
    let gauges = c.gauges();
    let store_state = match c.store_state() {
        StoreState::Connected => "connected",
        StoreState::Degraded => "degraded",
        StoreState::Unavailable => "down",
    };
    let requests = proxy.metrics.request_totals();
    let mut moves = c.recent_moves().newest_first();
    moves.truncate(OVERVIEW_MOVES);
    let body = json!({
        "now": c.now_unix(),
        "workers": workers(proxy),
        "store": {
            "kind": c.store_kind(),
            "state": store_state,
            "capture_lag": {
                "threads": gauges.capture_queue,
                "buffered": gauges.buffered,
                "buffered_bytes": gauges.buffered_bytes,
            },
        },
        "requests": {"total": requests.total, "errors": requests.errors},
        "moves": moves,
    });
    json_response(StatusCode::OK, &body)
}

/// The dashboard page (self-contained: styles and script inline).
const DASHBOARD: &str = include_str!("admin/dashboard.html");

fn dashboard() -> AdminResponse {
    html_page(
        Bytes::from_static(DASHBOARD.as_bytes()),
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
         connect-src 'self'; img-src data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    )
}

/// A self-contained HTML page (the dashboard, the demo chat) with its
/// content security policy; never cached, never sniffed.
pub(crate) fn html_page(page: Bytes, csp: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(page));
    let h = r.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert("content-security-policy", HeaderValue::from_static(csp));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("cache-control", HeaderValue::from_static("no-store"));
    r
}

/// Whether a request carries no `Origin`, or one naming this listener
/// (what a browser sends from the dashboard itself).
fn same_origin(req: &Request<Incoming>) -> bool {
    let Some(origin) = req.headers().get(ORIGIN) else {
        return true;
    };
    let host = req.headers().get(HOST).and_then(|h| h.to_str().ok());
    let origin = origin.to_str().ok().and_then(|o| {
        o.strip_prefix("http://")
            .or_else(|| o.strip_prefix("https://"))
    });
    matches!((origin, host), (Some(o), Some(h)) if o.eq_ignore_ascii_case(h))
}

fn drain(proxy: &Admin, path: &str) -> AdminResponse {
    let rest = path.trim_start_matches("/backends/");
    let (id, on) = if let Some(id) = rest.strip_suffix("/drain") {
        (id, true)
    } else if let Some(id) = rest.strip_suffix("/undrain") {
        (id, false)
    } else {
        return text(StatusCode::NOT_FOUND, "not found\n");
    };
    let workers = proxy.workers.load();
    let Some(b) = workers.get(id) else {
        return json_response(
            StatusCode::NOT_FOUND,
            &json!({"error": format!("no backend with id {id:?}")}),
        );
    };
    b.set_draining(on);
    tracing::info!(backend = %id, draining = on, "drain state changed by admin API");
    json_response(
        StatusCode::OK,
        &json!({"id": id, "state": b.state().as_str()}),
    )
}

fn text(status: StatusCode, body: &'static str) -> AdminResponse {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> AdminResponse {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}
