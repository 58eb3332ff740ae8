//! WebSocket tunnels that tether ends still end with a Close frame: `1011`
//! when the worker's side dies, `1001` when tether stops. Real clients
//! (tokio-tungstenite) against an in-process worker that can die on
//! command.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tether::proxy::body::{empty, full, ProxyBody};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::support::*;

/// A worker with an echo WebSocket on `/ws`; cancelling `kill` drops every
/// WebSocket's connection at once, without a Close frame (a crash).
struct WsWorker {
    addr: SocketAddr,
    kill: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl WsWorker {
    async fn start() -> WsWorker {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let kill = CancellationToken::new();
        let k = kill.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let k = k.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let k = k.clone();
                        async move { Ok::<_, Infallible>(answer(req, k)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades()
                        .await;
                });
            }
        });
        WsWorker { addr, kill, task }
    }

    fn toml(&self) -> String {
        format!(
            "[[backends]]\nid = \"w\"\nurl = \"http://{}\"\n\n",
            self.addr
        )
    }
}

impl Drop for WsWorker {
    fn drop(&mut self) {
        self.kill.cancel();
        self.task.abort();
    }
}

fn answer(mut req: Request<Incoming>, kill: CancellationToken) -> Response<ProxyBody> {
    if req.uri().path() != "/ws" {
        return Response::new(full("ok"));
    }
    let key = req.headers().get("sec-websocket-key").cloned();
    let key = key.map(|k| k.as_bytes().to_vec()).unwrap_or_default();
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(&key);
    let on_upgrade = hyper::upgrade::on(&mut req);
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
        loop {
            tokio::select! {
                // Dropping `ws` closes the socket: no Close frame.
                _ = kill.cancelled() => return,
                msg = ws.next() => match msg {
                    Some(Ok(Message::Text(t))) => {
                        if ws.send(Message::text(format!("echo: {t}"))).await.is_err() {
                            return;
                        }
                    }
                    Some(Ok(_)) => {}
                    _ => return,
                },
            }
        }
    });
    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert("upgrade", "websocket".parse().unwrap());
    h.insert("connection", "upgrade".parse().unwrap());
    h.insert("sec-websocket-accept", accept.parse().unwrap());
    resp
}

type Client =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A client with an open tunnel through `t` (one echo round trip done).
async fn open(t: &Tether) -> Client {
    let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://{}/ws", t.http))
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    ws.send(Message::text("hi")).await.unwrap();
    let echo = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
    assert_eq!(echo.unwrap().unwrap().unwrap(), Message::text("echo: hi"));
    ws
}

/// The close code the client receives next (`None`: the connection ended
/// without a Close frame, what browsers report as 1006).
async fn close_code(ws: &mut Client) -> Option<u16> {
    let next = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("no close within 10 s");
    match next {
        Some(Ok(Message::Close(Some(frame)))) => Some(u16::from(frame.code)),
        other => {
            println!("the tunnel ended with {other:?}");
            None
        }
    }
}

#[tokio::test]
async fn a_worker_that_dies_under_a_websocket_gets_the_client_a_1011_close() {
    let w = WsWorker::start().await;
    let t = Tether::start(&config_text(&[], &w.toml())).await;
    let mut ws = open(&t).await;
    w.kill.cancel();
    assert_eq!(close_code(&mut ws).await, Some(1011));
    // The client's answer ends the connection cleanly.
    let end = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
    assert!(matches!(end, Ok(None) | Ok(Some(Err(_)))), "{end:?}");
    t.stop().await;
}

#[tokio::test]
async fn stopping_tether_sends_open_websockets_a_1001_close() {
    let w = WsWorker::start().await;
    let t = Tether::start(&config_text(&[], &w.toml())).await;
    let mut ws = open(&t).await;
    let stopped = tokio::spawn(t.stop());
    assert_eq!(close_code(&mut ws).await, Some(1001));
    drop(ws);
    tokio::time::timeout(Duration::from_secs(10), stopped)
        .await
        .expect("tether did not stop")
        .unwrap();
}

/// On a paused clock: a WebSocket whose client sends nothing for longer
/// than `limits.idle_timeout` stays open (the keep-alive idle timeout is
/// for connections between HTTP/1 requests, not for tunnels, which have
/// `limits.stream_idle`).
#[tokio::test]
async fn a_silent_client_keeps_its_websocket_past_the_idle_timeout() {
    let w = WsWorker::start().await;
    let extra = format!("[limits]\nidle_timeout = \"5s\"\n\n{}", w.toml());
    let t = Tether::start(&config_text(&[], &extra)).await;
    let mut ws = open(&t).await;
    tokio::time::pause();
    tokio::time::sleep(Duration::from_secs(20)).await;
    ws.send(Message::text("still there")).await.unwrap();
    let echo = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
    assert_eq!(
        echo.expect("no echo").expect("tunnel ended").unwrap(),
        Message::text("echo: still there")
    );
    tokio::time::resume();
    drop(ws);
    t.stop().await;
}
