//! Slow clients (issue 10, rows 5 and 6). A client that trickles its
//! request body, or stops sending it, gets `408` and its connection closed
//! within `limits.body_timeout` (plus what `limits.min_body_rate` grants
//! for the bytes it did send), and the worker is not blamed. A client that
//! stops reading a response is closed after `limits.send_timeout`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

const SLOW: &str = "[limits]\nbody_timeout = \"1s\"\nmin_body_rate = 200\n\n[passive]\nfailures = 1\ncooldown = \"30s\"\n";

/// Sends a head announcing `len` body bytes, then one byte every `every`
/// until the server answers or closes (bounded by `within`). Returns what
/// the server sent and when its answer started.
async fn trickle(
    addr: SocketAddr,
    len: usize,
    every: Duration,
    within: Duration,
) -> (String, Duration) {
    let started = Instant::now();
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head = format!("POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: {len}\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let mut sent = 0;
    let mut answered = None;
    let deadline = tokio::time::Instant::now() + within;
    while started.elapsed() < within {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => break,
            r = s.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    answered.get_or_insert_with(|| started.elapsed());
                    out.extend_from_slice(&buf[..n]);
                }
            },
            _ = tokio::time::sleep(every), if !every.is_zero() && sent < len => {
                if s.write_all(b"x").await.is_err() {
                    break;
                }
                sent += 1;
            }
        }
    }
    (
        String::from_utf8_lossy(&out).into_owned(),
        answered.unwrap_or(within),
    )
}

#[tokio::test]
async fn a_trickled_body_gets_408_and_the_connection_closes() {
    let a = Worker::start("a").await;
    let t = Tether::start(&config_text(&[&a], SLOW)).await;
    // 1 byte every 300 ms: never silent for `body_timeout`, far below the
    // minimum rate.
    let (out, at) = trickle(
        t.http,
        8192,
        Duration::from_millis(300),
        Duration::from_secs(6),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 408"), "{out:?}");
    assert!(
        out.to_ascii_lowercase().contains("connection: close"),
        "{out}"
    );
    assert!(at < Duration::from_secs(3), "answered after {at:?}");
    assert_eq!(state_of(&t, "a").await, "up", "the worker is not blamed");
    t.stop().await;
}

#[tokio::test]
async fn a_body_that_stops_gets_408_after_body_timeout() {
    let a = Worker::start("a").await;
    let t = Tether::start(&config_text(&[&a], SLOW)).await;
    let (out, at) = trickle(t.http, 100, Duration::ZERO, Duration::from_secs(6)).await;
    assert!(out.starts_with("HTTP/1.1 408"), "{out:?}");
    assert!(at < Duration::from_secs(3), "answered after {at:?}");
    assert_eq!(state_of(&t, "a").await, "up", "the worker is not blamed");
    t.stop().await;
}

#[tokio::test]
async fn a_body_at_the_minimum_rate_goes_through() {
    let a = Worker::start("a").await;
    let t = Tether::start(&config_text(&[&a], SLOW)).await;
    // 20 bytes every 50 ms = 400 B/s for 1.5 s: slower than `body_timeout`
    // in total, faster than the minimum rate.
    let mut s = TcpStream::connect(t.http).await.unwrap();
    let len = 600;
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    for _ in 0..len / 20 {
        s.write_all(&[b'y'; 20]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let seen = a.seen();
    assert_eq!(seen.last().map(|s| s.body.len()), Some(len));
    t.stop().await;
}

#[tokio::test]
async fn many_slow_bodies_are_all_closed() {
    let a = Worker::start("a").await;
    let t = Tether::start(&config_text(&[&a], SLOW)).await;
    let clients = (0..100).map(|_| {
        trickle(
            t.http,
            8192,
            Duration::from_millis(500),
            Duration::from_secs(8),
        )
    });
    let outs = futures_util::future::join_all(clients).await;
    let refused: Vec<_> = outs
        .iter()
        .filter(|(out, at)| !out.starts_with("HTTP/1.1 408") || *at >= Duration::from_secs(4))
        .collect();
    assert!(
        refused.is_empty(),
        "{} of 100 not closed with 408 in time: {:?}",
        refused.len(),
        refused.first()
    );
    let resp = plain().get(t.url("/after")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    t.stop().await;
}

/// Connects with a 4 KiB receive buffer (so tether's writes block soon)
/// and asks for `bytes` bytes.
async fn ask_big(addr: SocketAddr, bytes: usize) -> TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut s = sock.connect(addr).await.unwrap();
    let req = format!("GET /big?bytes={bytes} HTTP/1.1\r\nHost: t\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    s
}

/// Reads until the end (bounded): the bytes read.
async fn drain(s: &mut TcpStream, within: Duration) -> usize {
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0;
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return total,
            Ok(Ok(n)) => total += n,
        }
    }
}

const BIG: usize = 64 << 20;

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_after_send_timeout() {
    let a = Worker::start("a").await;
    let t = Tether::start(&config_text(&[&a], "[limits]\nsend_timeout = \"1s\"\n")).await;
    let mut s = ask_big(t.http, BIG).await;
    // Reads nothing for 3 s: tether's writes block, then it gives up.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let got = drain(&mut s, Duration::from_secs(20)).await;
    assert!(
        got < BIG / 2,
        "the stalled connection kept going: {got} bytes"
    );
    assert_eq!(state_of(&t, "a").await, "up", "the worker is not blamed");
    let resp = plain().get(t.url("/after")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    t.stop().await;
}

#[tokio::test]
async fn a_slow_reader_that_keeps_reading_is_served_whole() {
    let a = Worker::start("a").await;
    let t = Tether::start(&config_text(&[&a], "[limits]\nsend_timeout = \"1s\"\n")).await;
    let len = 4 << 20;
    let mut s = ask_big(t.http, len).await;
    // Slow (4 KiB reads, paused) but never silent for `send_timeout`.
    let mut buf = vec![0u8; 4096];
    let mut total = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < deadline {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n,
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    total += drain(&mut s, Duration::from_secs(20)).await;
    assert!(
        total > len,
        "{total} bytes of a {len}-byte body and its head"
    );
    t.stop().await;
}
