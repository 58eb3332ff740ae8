//! The pieces under the upstream path, without a worker: hyper's errors as
//! [`classify`] maps them (over in-memory pipes, so each case happens
//! exactly), and the idle list's choices (connections whose state the test
//! sets: ready, still opening up, closed).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::uri::Authority;
use http::Request;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::get;
use crate::proxy::body::{BoxError, ReplayBody};
use crate::upstream::body::OutBody;
use crate::upstream::error::{classify, Refusal};
use crate::upstream::pool::{Conn, Taken};
use crate::upstream::{reusable, Counters, Endpoint, UpstreamError};

type Io = TokioIo<DuplexStream>;

async fn client(io: DuplexStream) -> (SendRequest<OutBody>, Connection<Io, OutBody>) {
    http1::handshake(TokioIo::new(io)).await.unwrap()
}

fn out(path: &str) -> Request<OutBody> {
    get(path).map(OutBody::new)
}

/// Reads one request head on the worker's side of the pipe.
async fn read_head(server: &mut DuplexStream) {
    let mut seen = Vec::new();
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut buf = [0; 1024];
        let n = server.read(&mut buf).await.unwrap();
        assert!(n > 0, "pipe closed before a request head");
        seen.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test]
async fn a_request_on_a_connection_closed_before_writing_comes_back() {
    let (c, server) = duplex(4096);
    drop(server);
    let (mut tx, conn) = client(c).await;
    let sending = tx.try_send_request(out("/x"));
    tokio::spawn(conn);
    match classify(sending.await.unwrap_err(), true) {
        Refusal::Unsent { req, source } => {
            assert_eq!(req.uri(), "/x");
            assert!(source.is_canceled(), "{source:?}");
        }
        Refusal::Error(e) => panic!("{e:?}"),
    }
}

#[tokio::test]
async fn a_request_written_then_left_unanswered_failed() {
    for reused in [false, true] {
        let (c, mut server) = duplex(4096);
        let (mut tx, conn) = client(c).await;
        tokio::spawn(conn);
        let sending = tx.try_send_request(out("/x"));
        let worker = tokio::spawn(async move { read_head(&mut server).await });
        let err = sending.await.unwrap_err();
        worker.await.unwrap();
        match classify(err, reused) {
            Refusal::Error(UpstreamError::Failed { reused: r, source }) => {
                assert_eq!(r, reused);
                assert!(source.is_incomplete_message(), "{source:?}");
            }
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn an_oversized_response_head_failed() {
    let (c, mut server) = duplex(64 * 1024);
    let (mut tx, conn) = http1::Builder::new()
        .max_header_size(1024)
        .handshake::<_, OutBody>(TokioIo::new(c))
        .await
        .unwrap();
    tokio::spawn(conn);
    let sending = tx.try_send_request(out("/x"));
    tokio::spawn(async move {
        read_head(&mut server).await;
        let head = format!("HTTP/1.1 200 OK\r\nx-big: {}\r\n\r\n", "a".repeat(4096));
        server.write_all(head.as_bytes()).await.unwrap();
        std::future::pending::<()>().await;
    });
    match classify(sending.await.unwrap_err(), false) {
        Refusal::Error(UpstreamError::Failed {
            reused: false,
            source,
        }) => {
            assert!(source.is_parse(), "{source:?}");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_failing_request_body_is_told_apart() {
    let (c, mut server) = duplex(4096);
    let (mut tx, conn) = client(c).await;
    tokio::spawn(conn);
    let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
        Ok(Frame::data(Bytes::from_static(b"abc"))),
        Err("client went away".into()),
    ];
    let body = StreamBody::new(futures_util::stream::iter(frames)).boxed();
    let req = Request::post("/x")
        .body(OutBody::new(ReplayBody::new(body, 1024)))
        .unwrap();
    let sending = tx.try_send_request(req);
    tokio::spawn(async move {
        let mut sink = Vec::new();
        let _ = server.read_to_end(&mut sink).await;
    });
    let err = sending.await.unwrap_err();
    match classify(err, true) {
        Refusal::Error(e @ UpstreamError::ClientBody { .. }) => {
            let chain = crate::proxy::error::chain(&e);
            assert!(chain.contains("client went away"), "{chain}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn responses_that_end_their_connection_are_not_pooled() {
    use http::{Response, StatusCode, Version};
    let cases: &[(StatusCode, Version, Option<&str>, bool)] = &[
        (StatusCode::OK, Version::HTTP_11, None, true),
        (StatusCode::OK, Version::HTTP_11, Some("keep-alive"), true),
        (StatusCode::OK, Version::HTTP_11, Some("close"), false),
        (
            StatusCode::OK,
            Version::HTTP_11,
            Some("x-trace, Close"),
            false,
        ),
        (StatusCode::OK, Version::HTTP_10, None, false),
        (
            StatusCode::SWITCHING_PROTOCOLS,
            Version::HTTP_11,
            Some("upgrade"),
            false,
        ),
    ];
    for &(status, version, connection, expected) in cases {
        let mut resp = Response::builder().status(status).version(version);
        if let Some(c) = connection {
            resp = resp.header("connection", c);
        }
        let resp = resp.body(()).unwrap();
        assert_eq!(
            reusable(&resp),
            expected,
            "{status} {version:?} {connection:?}"
        );
    }
}

#[tokio::test]
async fn a_client_body_over_the_limit_stays_findable_in_the_chain() {
    // The proxy answers 413 when a `LengthLimitError` is in the chain.
    let (c, mut server) = duplex(4096);
    let (mut tx, conn) = client(c).await;
    tokio::spawn(conn);
    let frames: Vec<Result<Frame<Bytes>, BoxError>> =
        vec![Ok(Frame::data(Bytes::from_static(b"too long")))];
    let stream = StreamBody::new(futures_util::stream::iter(frames));
    let limited = http_body_util::Limited::new(stream, 4).boxed();
    let req = Request::post("/x")
        .body(OutBody::new(ReplayBody::new(limited, 1024)))
        .unwrap();
    let sending = tx.try_send_request(req);
    tokio::spawn(async move {
        let mut sink = Vec::new();
        let _ = server.read_to_end(&mut sink).await;
    });
    let Refusal::Error(e @ UpstreamError::ClientBody { .. }) =
        classify(sending.await.unwrap_err(), false)
    else {
        panic!("not a client body error");
    };
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    let mut found = false;
    while let Some(err) = cur {
        found |= err.is::<http_body_util::LengthLimitError>();
        cur = err.source();
    }
    assert!(found, "{}", crate::proxy::error::chain(&e));
}

// === the idle list ===

#[derive(Clone, Copy)]
pub(super) enum State {
    Ready,
    /// Its task has not yet asked for a request (as right after a body ends).
    Transitioning,
}

/// What keeps a test connection in its state: the pipe's other end, and the
/// connection future when it must stay unpolled.
pub(super) struct Held {
    unpolled: Option<Connection<Io, OutBody>>,
    pub(super) pipe: DuplexStream,
}

pub(super) async fn conn(state: State, label: &str) -> (Conn, Held) {
    let (c, server) = duplex(64);
    let (mut tx, conn) = client(c).await;
    let unpolled = match state {
        State::Ready => {
            tokio::spawn(conn);
            tx.ready().await.unwrap();
            None
        }
        State::Transitioning => Some(conn),
    };
    let conn = Conn {
        tx,
        instance: Some(Arc::from(label)),
    };
    let held = Held {
        unpolled,
        pipe: server,
    };
    (conn, held)
}

fn label(taken: Option<Taken>) -> String {
    match taken {
        Some(Taken::Ready(c)) => format!("ready {}", c.instance.unwrap()),
        Some(Taken::Transitioning(c)) => format!("transitioning {}", c.instance.unwrap()),
        None => "none".to_owned(),
    }
}

const HOUR: Duration = Duration::from_secs(3600);

fn endpoint() -> Endpoint {
    Endpoint::new(Authority::from_static("127.0.0.1:9"))
}

#[tokio::test]
async fn checkout_prefers_the_newest_ready_connection_and_keeps_the_order() {
    let ep = endpoint();
    let mut held = Vec::new();
    use State::*;
    for (state, name) in [
        (Ready, "a"),
        (Transitioning, "b"),
        (Transitioning, "c"),
        (Transitioning, "d"),
    ] {
        let (c, h) = conn(state, name).await;
        ep.pool().checkin(c, HOUR, 8);
        held.push(h);
    }
    // c closes while idle.
    drop(held[2].unpolled.take());
    assert_eq!(ep.idle_instances(), ["a", "b", "c", "d"]);
    assert_eq!(label(ep.pool().take(HOUR, true)), "ready a");
    assert_eq!(ep.idle_instances(), ["b", "d"]);
    // After one wait, a checkout takes only ready connections.
    assert_eq!(label(ep.pool().take(HOUR, false)), "none");
    assert_eq!(ep.idle_instances(), ["b", "d"]);
    assert_eq!(label(ep.pool().take(HOUR, true)), "transitioning d");
    assert_eq!(ep.idle_instances(), ["b"]);
}

#[tokio::test]
async fn checkout_waits_for_a_transitioning_connection() {
    let ep = endpoint();
    let (c, mut held) = conn(State::Transitioning, "a").await;
    ep.pool().checkin(c, HOUR, 8);
    let counters = Counters::default();
    let checkout = ep.checkout(HOUR, HOUR, &counters);
    let task = held.unpolled.take().unwrap();
    let (got, _) = tokio::join!(checkout, async move {
        tokio::task::yield_now().await;
        tokio::spawn(task);
    });
    assert_eq!(got.unwrap().instance.as_deref(), Some("a"));
    assert_eq!(counters.ready_waits.into_inner(), 1);
}

#[tokio::test(start_paused = true)]
async fn checkout_waits_once_and_drops_a_connection_that_stays_busy() {
    let ep = endpoint();
    let (a, _held_a) = conn(State::Transitioning, "a").await;
    let (b, _held_b) = conn(State::Transitioning, "b").await;
    ep.pool().checkin(a, HOUR, 8);
    ep.pool().checkin(b, HOUR, 8);
    let counters = Counters::default();
    assert!(ep.checkout(HOUR, HOUR, &counters).await.is_none());
    // b was waited for and dropped; a is left for a later checkout.
    assert_eq!(counters.ready_waits.into_inner(), 1);
    assert_eq!(ep.idle_instances(), ["a"]);
}

#[tokio::test(start_paused = true)]
async fn the_idle_list_drops_expired_entries_and_keeps_at_most_max_idle() {
    let ep = endpoint();
    let mut held = Vec::new();
    for name in ["a", "b", "c"] {
        let (c, h) = conn(State::Ready, name).await;
        ep.pool().checkin(c, HOUR, 8);
        held.push(h);
        tokio::time::advance(Duration::from_secs(10)).await;
    }
    // Idle for 30 s, 20 s and 10 s.
    ep.prune(Duration::from_secs(20));
    assert_eq!(ep.idle_instances(), ["c"]);
    let (d, _hd) = conn(State::Ready, "d").await;
    let (e, _he) = conn(State::Ready, "e").await;
    ep.pool().checkin(d, HOUR, 2);
    ep.pool().checkin(e, HOUR, 2);
    assert_eq!(ep.idle_instances(), ["d", "e"], "the oldest made room");
}
