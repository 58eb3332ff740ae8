//! What workers receive and what clients get back: header hygiene, the
//! reserved prefix, streaming (SSE) and upgrades (WebSocket).

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

#[tokio::test]
async fn client_forwarding_and_tether_headers_never_reach_the_worker() {
    let a = Worker::start("a").await;
    let t = Tether::start(&config_text(&[&a], "")).await;
    let client = user();
    // First request pins; the second carries the affinity cookie.
    client.get(t.url("/")).send().await.unwrap();
    let resp = client
        .post(t.url("/echo?x=1"))
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-proto", "gopher")
        .header("forwarded", "for=6.6.6.6")
        .header("tether-session", "forged")
        .header("tether-epoch", "999")
        .header("cookie", "app=1")
        .header("connection", "x-drop-me")
        .header("x-drop-me", "secret")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = a.seen().pop().unwrap();
    let h = &seen.headers;
    assert_eq!(seen.path, "/echo");
    assert_eq!(seen.body, "hello");
    assert_eq!(h.get("x-forwarded-for").unwrap(), "127.0.0.1");
    assert_eq!(h.get("x-forwarded-proto").unwrap(), "http");
    assert_eq!(
        h.get("x-forwarded-host").unwrap(),
        t.http.to_string().as_str()
    );
    assert!(h
        .get("forwarded")
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("for=127.0.0.1;proto=http"));
    let session = h.get("tether-session").unwrap().to_str().unwrap();
    assert_eq!(
        session.len(),
        32,
        "tether sets its own session id: {session}"
    );
    assert_eq!(h.get("tether-epoch").unwrap(), "1");
    assert!(
        !h.contains_key("x-drop-me"),
        "Connection-named header forwarded"
    );
    assert!(!h.contains_key("connection"));
    let cookies: Vec<_> = h
        .get_all("cookie")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert!(
        cookies.iter().all(|c| !c.contains("tether=")),
        "affinity cookie forwarded: {cookies:?}"
    );
    assert!(
        cookies.iter().any(|c| c.contains("app=1")),
        "other cookies kept: {cookies:?}"
    );
    t.stop().await;
}

#[tokio::test]
async fn reserved_prefix_is_404_and_never_forwarded() {
    let a = Worker::start("a").await;
    let t = Tether::start(&config_text(&[&a], "")).await;
    for path in [
        "/_tether",
        "/_tether/threads/t1",
        "/_tether/changes?after=0",
    ] {
        let resp = plain().get(t.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 404, "{path}");
    }
    // A path that only starts with the same letters is a normal path.
    let resp = plain().get(t.url("/_tetherish")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let paths: Vec<String> = a.seen().into_iter().map(|s| s.path).collect();
    assert_eq!(paths, ["/_tetherish"]);
    // tether's own contract calls reach the prefix; no client request did.
    for call in a.contract_calls() {
        assert!(
            !call.headers.contains_key("x-forwarded-for"),
            "client request forwarded: {}",
            call.path
        );
    }
    t.stop().await;
}

#[tokio::test]
async fn worker_affinity_cookie_and_hop_headers_are_dropped_from_responses() {
    let a = Worker::start("a").await;
    let t = Tether::start(&config_text(&[&a], "")).await;
    let resp = plain()
        .get(t.url("/?set-affinity-cookie=1&connection-header=x-hop"))
        .send()
        .await
        .unwrap();
    let cookies = set_cookies(&resp);
    assert!(
        cookies.iter().all(|c| !c.contains("forged-by-worker")),
        "{cookies:?}"
    );
    assert!(
        cookies.iter().any(|c| c.starts_with("app=kept")),
        "{cookies:?}"
    );
    assert!(
        cookies.iter().any(|c| c.starts_with("tether=")),
        "{cookies:?}"
    );
    assert!(!resp.headers().contains_key("x-hop"));
    t.stop().await;
}

#[tokio::test]
async fn sse_first_event_arrives_at_once() {
    let a = Worker::start("a").await;
    let t = Tether::start(&config_text(&[&a], "")).await;
    let client = plain();
    let start = Instant::now();
    let mut resp = client.get(t.url("/sse")).send().await.unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let first = resp.chunk().await.unwrap().unwrap();
    let first_at = start.elapsed();
    assert!(String::from_utf8_lossy(&first).contains("event 0"));
    assert!(
        first_at < Duration::from_millis(100),
        "first event after {first_at:?}"
    );
    let mut text = String::from_utf8_lossy(&first).into_owned();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let last_at = start.elapsed();
    assert_eq!(text.matches("data: a event").count(), 5, "{text}");
    // The events were streamed as produced (200 ms apart), not buffered.
    assert!(
        last_at - first_at >= Duration::from_millis(700),
        "{first_at:?} {last_at:?}"
    );
    t.stop().await;
}

#[tokio::test]
async fn websocket_echo_on_the_pinned_worker_with_cookie_on_101() {
    let (a, b) = (Worker::start("a").await, Worker::start("b").await);
    let t = Tether::start(&config_text(&[&a, &b], "")).await;
    // Pin over plain HTTP first.
    let pinned = plain().get(t.url("/")).send().await.unwrap();
    let worker = worker_of(&pinned);
    let cookie = tether_cookie(&pinned).unwrap();

    let mut req = format!("ws://{}/ws", t.http).into_client_request().unwrap();
    req.headers_mut()
        .insert("cookie", format!("tether={cookie}").parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.status(), 101);
    assert_eq!(
        resp.headers()["x-worker"],
        worker.as_str(),
        "upgrade went to the pinned worker"
    );
    ws.send(Message::text("ping")).await.unwrap();
    let echo = ws.next().await.unwrap().unwrap();
    assert_eq!(
        echo.into_text().unwrap().as_str(),
        format!("{worker}: ping")
    );
    ws.close(None).await.unwrap();

    // A new user upgrading gets its pin on the 101 itself.
    let (_ws, resp) = tokio_tungstenite::connect_async(format!("ws://{}/ws", t.http))
        .await
        .unwrap();
    let set: Vec<_> = resp.headers().get_all("set-cookie").iter().collect();
    assert!(
        set.iter()
            .any(|v| v.to_str().unwrap().starts_with("tether=")),
        "{set:?}"
    );
    t.stop().await;
}
