//! The upstream path against real sockets on 127.0.0.1:0 and a small hyper
//! worker ([`mock`]): [`reuse`], [`instances`], [`failures`]. The idle list
//! and hyper's error mapping are tested piece by piece in [`units`].

mod failures;
mod instances;
mod mock;
mod reuse;
mod units;

use std::time::Duration;

use bytes::Bytes;
use http::header::HOST;
use http::{Request, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::{Endpoint, Expect, Fresh, Sent, Settings, Upstream, UpstreamError};
use crate::proxy::body::{BoxError, ReplayBody};
use mock::Worker;

fn settings() -> Settings {
    Settings {
        connect_timeout: Duration::from_secs(2),
        idle_timeout: Duration::from_secs(60),
        verify_path: "/health".into(),
        max_idle: super::MAX_IDLE,
        max_response_head: 16 * 1024,
    }
}

fn get(path: &str) -> Request<ReplayBody> {
    Request::get(path)
        .header(HOST, "worker")
        .body(ReplayBody::empty())
        .unwrap()
}

fn post(path: &str, body: ReplayBody) -> Request<ReplayBody> {
    Request::post(path)
        .header(HOST, "worker")
        .body(body)
        .unwrap()
}

/// A request body fed by the test: frames (or an error) sent one by one.
fn streamed(
    path: &str,
) -> (
    tokio::sync::mpsc::Sender<Result<Frame<Bytes>, BoxError>>,
    Request<ReplayBody>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let body = ReplayBody::new(StreamBody::new(stream).boxed(), 1024);
    (tx, post(path, body))
}

async fn read(sent: Sent) -> Bytes {
    sent.response
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
}

/// Waits (bounded) for something another task or the kernel does.
async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
