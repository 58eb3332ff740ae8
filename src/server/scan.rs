//! A read-side scanner for HTTP/1 request heads. hyper resolves a head that
//! carries both `Content-Length` and `Transfer-Encoding` by dropping the
//! length (RFC 9112 §6.3) and closing afterwards; HAProxy and Envoy refuse
//! it outright, and so does tether. hyper hides the dropped header, so this
//! wrapper follows the byte stream (heads, fixed and chunked bodies) and
//! raises a flag the service checks before the request is served.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use super::idle::IdleClock;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Head,
    Body(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkEnd(u8),
    Trailers,
    /// HTTP/2, an upgraded connection, or a head hyper will refuse anyway.
    Off,
}

/// The scanning state of one connection.
#[derive(Debug)]
pub(super) struct Scanner {
    state: State,
    line: Vec<u8>,
    limit: usize,
    flag: Arc<AtomicBool>,
    /// Set by the service when it answered `101`: the bytes that follow
    /// belong to the upgraded protocol.
    switched: Arc<AtomicBool>,
    /// Whether a first head completed (or the connection turned HTTP/2).
    started: bool,
    /// Bytes seen, up to the length of the HTTP/2 preface.
    seen: usize,
    /// The connection speaks HTTP/2 (its preface arrived).
    h2: bool,
}

/// Length of the whole HTTP/2 connection preface.
const H2_PREFACE_LEN: usize = 24;

impl Scanner {
    /// A scanner giving up on heads longer than `limit` (hyper answers 431).
    pub(super) fn new(limit: usize) -> Scanner {
        Scanner {
            state: State::Head,
            line: Vec::new(),
            limit: limit + 1024,
            flag: Arc::new(AtomicBool::new(false)),
            switched: Arc::new(AtomicBool::new(false)),
            started: false,
            seen: 0,
            h2: false,
        }
    }

    /// The switch the service flips when it answers `101 Switching
    /// Protocols`: scanning stops there.
    pub(super) fn switch(&self) -> Arc<AtomicBool> {
        self.switched.clone()
    }

    /// Set once a head carried both `Content-Length` and `Transfer-Encoding`.
    pub(super) fn flag(&self) -> Arc<AtomicBool> {
        self.flag.clone()
    }

    /// Whether a request head is due: part of one has arrived and not its
    /// end, or the connection has not yet sent its first head (nor the
    /// whole HTTP/2 preface).
    pub(super) fn head_pending(&self) -> bool {
        match self.state {
            State::Head => !self.started || !self.line.is_empty(),
            State::Off => !self.started,
            _ => false,
        }
    }

    /// Whether the keep-alive idle timeout applies while no response is
    /// running: HTTP/1, not upgraded (a tunnel has `limits.stream_idle`),
    /// and no head arriving (that one has `header_timeout`). Also when the
    /// scanner gave up on an over-long line: hyper may keep such a
    /// connection alive, and it must not live on without any deadline.
    pub(super) fn idle_applies(&self) -> bool {
        !self.h2 && !self.switched.load(Ordering::Relaxed) && !self.head_pending()
    }

    /// Feeds bytes read from the client.
    pub(super) fn feed(&mut self, mut bytes: &[u8]) {
        if self.switched.load(Ordering::Relaxed) {
            self.state = State::Off;
            self.started = true;
        }
        if !self.started && self.state == State::Off && self.seen > 0 {
            // An HTTP/2 preface (counted in `seen`) is done once all of it
            // has arrived; an oversized first head stays due however it
            // was split into reads.
            self.seen = self.seen.saturating_add(bytes.len());
            self.started = self.seen >= H2_PREFACE_LEN;
        }
        while !bytes.is_empty() {
            match self.state {
                State::Off => return,
                State::Body(n) => {
                    let take = (n.min(bytes.len() as u64)) as usize;
                    bytes = &bytes[take..];
                    self.state = if n - take as u64 == 0 {
                        State::Head
                    } else {
                        State::Body(n - take as u64)
                    };
                }
                State::ChunkData(n) => {
                    let take = (n.min(bytes.len() as u64)) as usize;
                    bytes = &bytes[take..];
                    self.state = if n - take as u64 == 0 {
                        State::ChunkEnd(2)
                    } else {
                        State::ChunkData(n - take as u64)
                    };
                }
                State::ChunkEnd(k) => {
                    bytes = &bytes[1..];
                    self.state = if k <= 1 {
                        State::ChunkSize
                    } else {
                        State::ChunkEnd(k - 1)
                    };
                }
                State::Head | State::ChunkSize | State::Trailers => {
                    // Whole line segments at a time: heads are scanned at
                    // memchr speed, not byte by byte.
                    let (chunk, found) = match memchr::memchr(b'\n', bytes) {
                        Some(i) => (&bytes[..=i], true),
                        None => (bytes, false),
                    };
                    bytes = &bytes[chunk.len()..];
                    self.line.extend_from_slice(chunk);
                    if self.line.len() > self.limit {
                        self.state = State::Off;
                        return;
                    }
                    if self.state == State::Head && self.line.starts_with(H2_PREFACE) {
                        self.state = State::Off;
                        self.h2 = true;
                        self.seen = self.line.len() + bytes.len();
                        self.started = self.seen >= H2_PREFACE_LEN;
                        return;
                    }
                    if found {
                        self.line_done();
                    }
                }
            }
        }
    }

    fn line_done(&mut self) {
        match self.state {
            State::Head => {
                // A head ends with an empty line; leading empty lines are
                // tolerated before the request line.
                // Bare LF line ends are accepted by hyper (and mixed with
                // CRLF: `\n\r\n`), so they end a head here too.
                let ends = self.line.ends_with(b"\n\r\n") || self.line.ends_with(b"\n\n");
                let only_crlf = self.line.iter().all(|&c| c == b'\r' || c == b'\n');
                if only_crlf {
                    self.line.clear();
                } else if ends {
                    self.state = self.head_done();
                    self.started = true;
                    self.line.clear();
                }
            }
            State::ChunkSize => {
                let text = String::from_utf8_lossy(&self.line);
                let size = text.split(';').next().unwrap_or("").trim();
                self.state = match u64::from_str_radix(size, 16) {
                    Ok(0) => State::Trailers,
                    Ok(n) => State::ChunkData(n),
                    Err(_) => State::Off,
                };
                self.line.clear();
            }
            State::Trailers => {
                if self.line == b"\r\n" || self.line == b"\n" {
                    self.state = State::Head;
                }
                self.line.clear();
            }
            State::Body(_) | State::ChunkData(_) | State::ChunkEnd(_) | State::Off => {}
        }
    }

    fn head_done(&mut self) -> State {
        let mut length: Option<u64> = None;
        let (mut has_cl, mut has_te) = (false, false);
        for line in lines(&self.line).skip(1) {
            let Some(colon) = memchr::memchr(b':', line) else {
                continue;
            };
            let name = line[..colon].trim_ascii_end();
            let value = line[colon + 1..].trim_ascii();
            if name.eq_ignore_ascii_case(b"content-length") {
                has_cl = true;
                length = std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.split(',').next())
                    .and_then(|v| v.trim().parse().ok());
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                has_te = true;
            }
        }
        if has_cl && has_te {
            self.flag.store(true, Ordering::Relaxed);
            return State::Off;
        }
        if has_te {
            return State::ChunkSize;
        }
        match length {
            Some(0) | None if !has_cl => State::Head,
            Some(0) => State::Head,
            Some(n) => State::Body(n),
            None => State::Off,
        }
    }
}

/// The `\n`-separated lines of `buf` (the last one may be empty), found
/// at memchr speed.
fn lines(buf: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut start = 0;
    memchr::memchr_iter(b'\n', buf)
        .chain(std::iter::once(buf.len()))
        .map(move |end| {
            let line = &buf[start..end];
            start = (end + 1).min(buf.len());
            line
        })
}

pin_project_lite::pin_project! {
    /// Client I/O with a [`Scanner`] on the read side. It also bounds a
    /// request head to `header_timeout` from its first byte (slowloris),
    /// and ends a kept-alive HTTP/1 connection idle for `idle_timeout`
    /// between requests ([`IdleClock`]: one timer per connection).
    pub struct Scanned<T> {
        #[pin]
        io: T,
        scanner: Scanner,
        header_timeout: Duration,
        deadline: Option<Pin<Box<Sleep>>>,
        idle: IdleClock,
    }
}

impl<T> Scanned<T> {
    /// Wraps `io`.
    /// The first head is due `header_timeout` after the connection opened.
    pub(super) fn new(io: T, scanner: Scanner, header_timeout: Duration, idle: IdleClock) -> Self {
        Scanned {
            io,
            scanner,
            header_timeout,
            deadline: Some(Box::pin(tokio::time::sleep(header_timeout))),
            idle,
        }
    }
}

impl<T: AsyncRead> AsyncRead for Scanned<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let r = this.io.poll_read(cx, buf);
        match r {
            Poll::Ready(Ok(())) => {
                this.scanner.feed(&buf.filled()[before..]);
                if !this.scanner.head_pending() {
                    *this.deadline = None;
                } else if this.deadline.is_none() {
                    // A kept-alive connection's head that arrives in one
                    // read never gets here.
                    *this.deadline = Some(Box::pin(tokio::time::sleep(*this.header_timeout)));
                }
                r
            }
            Poll::Pending => {
                let expired = this
                    .deadline
                    .as_mut()
                    .is_some_and(|d| d.as_mut().poll(cx).is_ready());
                if expired {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "request head not complete within limits.header_timeout",
                    )));
                }
                if this.scanner.idle_applies() && this.idle.expired(cx) {
                    // Idle for `limits.idle_timeout`: an end of stream, so
                    // hyper closes the connection as a client's close.
                    return Poll::Ready(Ok(()));
                }
                Poll::Pending
            }
            Poll::Ready(Err(_)) => r,
        }
    }
}

impl<T: AsyncWrite> AsyncWrite for Scanned<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flagged(chunks: &[&[u8]]) -> bool {
        let mut s = Scanner::new(65536);
        for c in chunks {
            s.feed(c);
        }
        s.flag().load(Ordering::Relaxed)
    }

    #[test]
    fn flags_length_with_chunked_in_any_order_and_split_reads() {
        assert!(flagged(&[b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"]));
        assert!(flagged(&[
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
        ]));
        assert!(flagged(&[
            b"POST / HTTP/1.1\r\nContent-Le",
            b"ngth: 5\r\nTransfer-Enco",
            b"ding: chunked\r\n\r\n"
        ]));
    }

    #[test]
    fn follows_bodies_so_body_bytes_are_never_read_as_heads() {
        let fixed = b"POST / HTTP/1.1\r\nContent-Length: 47\r\n\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n";
        assert!(!flagged(&[fixed, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"]));
        let chunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n1a\r\nContent-Length: 9\r\n\r\nxxxxx\r\n0\r\nTrailer: y\r\n\r\n";
        assert!(!flagged(&[
            chunked,
            b"GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n"
        ]));
        // …and the next head on the connection is still checked.
        assert!(flagged(&[
            chunked,
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
        ]));
    }

    fn pending_after(chunks: &[&[u8]]) -> bool {
        let mut s = Scanner::new(65536);
        for c in chunks {
            s.feed(c);
        }
        s.head_pending()
    }

    fn idle_after(chunks: &[&[u8]], switched: bool) -> bool {
        let mut s = Scanner::new(8192);
        for c in chunks {
            s.feed(c);
        }
        s.switch().store(switched, Ordering::Relaxed);
        s.idle_applies()
    }

    #[test]
    fn the_idle_timeout_applies_to_http1_between_requests_only() {
        let get = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        assert!(idle_after(&[get], false));
        assert!(!idle_after(&[get], true), "an upgraded connection");
        assert!(!idle_after(&[], false), "the first head is owed");
        assert!(
            !idle_after(&[get, b"GET /next"], false),
            "a head is arriving"
        );
        assert!(!idle_after(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"], false));
        // The scanner gave up on a chunk line longer than it follows.
        let long = format!("1;a={}\r\n", "b".repeat(10_000));
        let post = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(idle_after(&[post, long.as_bytes()], false));
    }

    #[test]
    fn a_head_is_due_until_the_first_one_and_while_one_is_partial() {
        assert!(pending_after(&[]), "a fresh connection owes its first head");
        assert!(pending_after(&[b"GET / HTTP/1.1\r\n"]));
        assert!(!pending_after(&[b"GET / HTTP/1.1\r\n\r\n"]));
        assert!(!pending_after(&[b"GET / HTTP/1.1\nHost: x\n\n"]));
        assert!(!pending_after(&[b"GET / HTTP/1.1\nHost: x\n\r\n"]));
        assert!(pending_after(&[b"GET / HTTP/1.1\r\n\r\n", b"GET /next"]));
        // A body is not a head.
        assert!(!pending_after(&[
            b"POST / HTTP/1.1\r\nContent-Length: 9\r\n\r\nabc"
        ]));
        // HTTP/2: due until the whole 24-byte preface arrived.
        assert!(pending_after(&[b"PRI * HTTP/2.0\r\n"]));
        assert!(pending_after(&[b"PRI * HTTP/2.0\r\n", b"\r\nSM"]));
        assert!(!pending_after(&[b"PRI * HTTP/2.0\r\n", b"\r\nSM\r\n\r\n"]));
    }

    #[test]
    fn an_upgrade_refused_by_the_worker_keeps_the_connection_scanned() {
        let mut s = Scanner::new(65536);
        s.feed(b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n");
        s.feed(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert!(s.flag().load(Ordering::Relaxed));
    }

    #[test]
    fn after_a_switch_the_bytes_are_not_heads() {
        let mut s = Scanner::new(65536);
        s.feed(b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n");
        s.switch().store(true, Ordering::Relaxed);
        s.feed(b"\x81\x05hello partial frame without newline");
        assert!(!s.head_pending());
        s.feed(b"Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert!(!s.flag().load(Ordering::Relaxed));
    }

    #[test]
    fn http2_is_left_alone() {
        assert!(!flagged(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"]));
    }
}
