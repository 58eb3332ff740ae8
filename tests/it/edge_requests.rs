//! Edge hygiene of request heads and bodies, over raw TCP (issue 10, rows
//! 1-4): chunked framing errors are the client's, underscores never smuggle
//! a header past the sanitiser, Host is validated, long request lines get
//! `414`; and a worker's response framing tether cannot pass on is `502`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

/// Sends `req` and reads until the server closes (bounded).
async fn raw(addr: SocketAddr, req: &[u8]) -> String {
    raw_pieces(addr, &[req]).await
}

/// Sends `pieces` one write at a time, a little apart (the first can reach
/// the worker before the next is read), and reads until the server closes.
async fn raw_pieces(addr: SocketAddr, pieces: &[&[u8]]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    for (i, p) in pieces.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if s.write_all(p).await.is_err() {
            break;
        }
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The status code of the first response in `out` (0 when none).
fn status(out: &str) -> u16 {
    out.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// Sends one request that the server answers and keeps the connection for:
/// its status, without waiting for a close.
async fn status_of(addr: SocketAddr, req: &[u8]) -> u16 {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(req).await.unwrap();
    let mut buf = vec![0u8; 16 * 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    status(&String::from_utf8_lossy(&buf[..n]))
}

// === Row 1: chunked framing ===

const CHUNKED_HEAD: &str =
    "POST /chunked HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n";

/// Malformed chunk framings: each is the client's fault.
const BAD_CHUNKS: [&str; 12] = [
    "zz\r\nhello\r\n0\r\n\r\n",
    "0x0\r\n\r\n",
    "+0\r\n\r\n",
    "0_0\r\n\r\n",
    "\r\nhello\r\n0\r\n\r\n",
    "fffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
    "5\r\nhelloXX0\r\n\r\n",
    "-1\r\nhello\r\n0\r\n\r\n",
    " 5\r\nhello\r\n0\r\n\r\n",
    "5\r\r\nhello\r\n0\r\n\r\n",
    "5\nhello\r\n0\r\n\r\n",
    "5;a\nb\r\nhello\r\n0\r\n\r\n",
];

#[tokio::test]
async fn malformed_chunked_framing_is_400_and_never_blamed_on_the_worker() {
    // Two workers: the last one up is never ejected, so with one the
    // ejection count below could not fail.
    let a = Worker::start("a").await;
    let b = Worker::start("b").await;
    let t = Tether::start(&config_text(&[&a, &b], "[passive]\nfailures = 1\n")).await;
    for body in BAD_CHUNKS {
        let out = raw(t.http, format!("{CHUNKED_HEAD}{body}").as_bytes()).await;
        assert_eq!(status(&out), 400, "{body:?} -> {out}");
        // The head reaches the worker before the broken body is read.
        let pieces = [CHUNKED_HEAD.as_bytes(), b"5\r\nhello\r\n", body.as_bytes()];
        let out = raw_pieces(t.http, &pieces).await;
        assert_eq!(status(&out), 400, "after the head: {body:?} -> {out}");
    }
    assert_eq!(
        metric(&t, "tether_ejections_total").await,
        0.0,
        "a client's framing ejected a worker"
    );
    let ok = raw(
        t.http,
        format!("{CHUNKED_HEAD}5\r\nhello\r\n0\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(status(&ok), 200, "{ok}");
    let bodies: Vec<_> = a
        .seen()
        .into_iter()
        .chain(b.seen())
        .map(|s| s.body)
        .collect();
    assert!(bodies.iter().any(|b| b.as_ref() == b"hello"), "{bodies:?}");
    assert_eq!(state_of(&t, "a").await, "up");
    assert_eq!(state_of(&t, "b").await, "up");
    t.stop().await;
}

#[tokio::test]
async fn chunked_twice_is_400_and_not_forwarded() {
    let a = Worker::start("a").await;
    let t = Tether::start(&config_text(&[&a], "")).await;
    for te in ["chunked, chunked", "chunked\r\nTransfer-Encoding: chunked"] {
        let req = format!(
            "POST /twice HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: {te}\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        );
        let out = raw(t.http, req.as_bytes()).await;
        assert_eq!(status(&out), 400, "{te:?} -> {out}");
    }
    assert_eq!(a.count("POST", "/twice"), 0);
    t.stop().await;
}

/// A worker speaking raw HTTP/1.1: `/health` is answered normally, any
/// other request with `canned`, then the connection closes. `served`
/// counts the requests for `/coded`.
struct RawWorker {
    addr: SocketAddr,
    served: Arc<Mutex<usize>>,
    task: tokio::task::JoinHandle<()>,
}

impl RawWorker {
    async fn start(canned: &'static str) -> RawWorker {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = Arc::new(Mutex::new(0));
        let count = served.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    continue;
                };
                let count = count.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                            continue;
                        };
                        let head: Vec<u8> = buf.drain(..end + 4).collect();
                        if head.starts_with(b"GET /health ") {
                            let ok = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                            if s.write_all(ok.as_bytes()).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        if head.starts_with(b"GET /coded ") {
                            *count.lock().unwrap() += 1;
                        }
                        let _ = s.write_all(canned.as_bytes()).await;
                        return;
                    }
                });
            }
        });
        RawWorker { addr, served, task }
    }

    fn toml(&self, id: &str) -> String {
        format!(
            "[[backends]]\nid = \"{id}\"\nurl = \"http://{}\"\n\n",
            self.addr
        )
    }
}

impl Drop for RawWorker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn a_response_coding_tether_cannot_pass_on_is_502() {
    let cases: [&'static str; 3] = [
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nnot-really-gzip",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    ];
    for canned in cases {
        let w = RawWorker::start(canned).await;
        let text = format!(
            "[listen]\nhttp = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n[affinity]\nkeys = [\"{}\"]\n\n{}",
            key_b64(1),
            w.toml("raw")
        );
        let t = Tether::start(&text).await;
        let out = raw(
            t.http,
            b"GET /coded HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(status(&out), 502, "{canned:?} -> {out}");
        assert_eq!(*w.served.lock().unwrap(), 1, "not retried: {canned:?}");
        t.stop().await;
    }
}

// === Row 2: underscores and X-Forwarded-For ===

#[tokio::test]
async fn headers_with_underscores_never_reach_the_worker() {
    let a = Worker::start("a").await;
    let t = Tether::start(&config_text(&[&a], "")).await;
    let req = "GET /u HTTP/1.1\r\nHost: t\r\nTether_Session: 00112233445566778899aabbccddeeff\r\nX_Forwarded_For: 6.6.6.6\r\nX_Real_IP: 6.6.6.6\r\nX-Kept: yes\r\n\r\n";
    assert_eq!(status_of(t.http, req.as_bytes()).await, 200);
    let seen = a.seen().pop().unwrap();
    let names: Vec<&str> = seen.headers.keys().map(|k| k.as_str()).collect();
    assert!(names.iter().all(|n| !n.contains('_')), "{names:?}");
    assert_eq!(seen.headers.get("x-kept").unwrap(), "yes");
    assert_eq!(seen.headers.get("x-forwarded-for").unwrap(), "127.0.0.1");
    t.stop().await;
}

#[tokio::test]
async fn underscores_pass_when_allowed() {
    let a = Worker::start("a").await;
    let t = Tether::start(&config_text(
        &[&a],
        "[limits]\nallow_underscore_headers = true\n",
    ))
    .await;
    let req = "GET /u HTTP/1.1\r\nHost: t\r\nX_Custom: 1\r\n\r\n";
    assert_eq!(status_of(t.http, req.as_bytes()).await, 200);
    let seen = a.seen().pop().unwrap();
    assert_eq!(seen.headers.get("x_custom").unwrap(), "1");
    t.stop().await;
}

async fn xff_seen(trusted: &str) -> String {
    let a = Worker::start("a").await;
    let text = config_text(&[&a], "").replace(
        "admin = \"127.0.0.1:0\"\n",
        &format!("admin = \"127.0.0.1:0\"\ntrusted_proxies = [{trusted}]\n"),
    );
    let t = Tether::start(&text).await;
    let req = "GET /x HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: 6.6.6.6, 203.0.113.7\r\n\r\n";
    assert_eq!(status_of(t.http, req.as_bytes()).await, 200);
    let seen = a.seen().pop().unwrap();
    t.stop().await;
    seen.headers
        .get_all("x-forwarded-for")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect::<Vec<_>>()
        .join(", ")
}

#[tokio::test]
async fn x_forwarded_for_is_kept_only_from_trusted_proxies() {
    assert_eq!(xff_seen("").await, "127.0.0.1");
    assert_eq!(xff_seen("\"10.0.0.0/8\"").await, "127.0.0.1");
    assert_eq!(
        xff_seen("\"10.0.0.0/8\", \"127.0.0.0/8\"").await,
        "6.6.6.6, 203.0.113.7, 127.0.0.1"
    );
}

// === Row 3: Host ===

#[tokio::test]
async fn missing_duplicate_or_invalid_host_is_400() {
    let a = Worker::start("a").await;
    let t = Tether::start(&config_text(&[&a], "")).await;
    let heads = [
        "GET /h HTTP/1.1\r\n\r\n",
        "GET /h HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        "GET /h HTTP/1.1\r\nHost: a b\r\n\r\n",
        "GET /h HTTP/1.1\r\nHost: a/evil\r\n\r\n",
        "GET /h HTTP/1.1\r\nHost: u@a\r\n\r\n",
        "GET /h HTTP/1.1\r\nHost: a:80x\r\n\r\n",
        "GET /h HTTP/1.1\r\nHost: \r\n\r\n",
    ];
    for head in heads {
        let out = raw(t.http, head.as_bytes()).await;
        assert_eq!(status(&out), 400, "{head:?} -> {out}");
    }
    assert_eq!(a.count("GET", "/h"), 0);
    // HTTP/1.0 needs no Host; a valid one with a port passes.
    assert_eq!(status_of(t.http, b"GET /h HTTP/1.0\r\n\r\n").await, 200);
    let ok = b"GET /h HTTP/1.1\r\nHost: Example.COM:8080\r\n\r\n";
    assert_eq!(status_of(t.http, ok).await, 200);
    assert_eq!(
        a.seen().pop().unwrap().headers.get("host").unwrap(),
        "Example.COM:8080"
    );
    t.stop().await;
}

#[tokio::test]
async fn an_absolute_target_wins_over_the_host_header() {
    let a = Worker::start("a").await;
    let t = Tether::start(&config_text(&[&a], "")).await;
    let req = b"GET http://real.example:81/abs?q=1 HTTP/1.1\r\nHost: other.example\r\n\r\n";
    assert_eq!(status_of(t.http, req).await, 200);
    let seen = a.seen().pop().unwrap();
    assert_eq!(seen.path, "/abs");
    assert_eq!(seen.headers.get("host").unwrap(), "real.example:81");
    assert_eq!(
        seen.headers.get("x-forwarded-host").unwrap(),
        "real.example:81"
    );
    t.stop().await;
}

#[tokio::test]
async fn h2_authority_wins_over_a_host_header() {
    let a = Worker::start("a").await;
    let t = Tether::start(&config_text(&[&a], "")).await;
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let resp = client
        .get(t.url("/h2"))
        .header("host", "other.example")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    let seen = a.seen().pop().unwrap();
    assert_eq!(
        seen.headers.get("host").unwrap().to_str().unwrap(),
        t.http.to_string()
    );
    t.stop().await;
}

#[tokio::test]
async fn a_host_other_than_the_named_certificate_is_421() {
    let a = Worker::start("a").await;
    let default = test_cert(&["localhost"]);
    let named = test_cert(&["chat.example"]);
    let mut text = config_text(&[&a], "").replace(
        "http = \"127.0.0.1:0\"\n",
        "http = \"127.0.0.1:0\"\nhttps = \"127.0.0.1:0\"\n",
    );
    text.push_str(&format!(
        "\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n\n[[tls.sni]]\nname = \"chat.example\"\ncert = \"{}\"\nkey = \"{}\"\n",
        default.cert.display(),
        default.key.display(),
        named.cert.display(),
        named.key.display()
    ));
    let t = Tether::start(&text).await;
    let https = t.https.unwrap();
    let client = reqwest::Client::builder()
        .http1_only()
        .resolve("chat.example", https)
        .add_root_certificate(reqwest::Certificate::from_pem(named.pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    let url = format!("https://chat.example:{}/sni", https.port());
    let same = client.get(&url).send().await.unwrap();
    assert_eq!(same.status(), 200);
    let other = client
        .get(&url)
        .header("host", "admin.example")
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 421);
    assert_eq!(a.count("GET", "/sni"), 1);
    t.stop().await;
}

// === Row 4: request line ===

#[tokio::test]
async fn a_request_line_over_the_limit_is_414() {
    let a = Worker::start("a").await;
    let t = Tether::start(&config_text(&[&a], "")).await;
    let long = format!("/long?{}", "q".repeat(8200));
    let out = raw(
        t.http,
        format!("GET {long} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(status(&out), 414, "{}", &out[..out.len().min(200)]);
    let fits = format!("/long?{}", "q".repeat(8000));
    let req = format!("GET {fits} HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(status_of(t.http, req.as_bytes()).await, 200);
    assert_eq!(a.count("GET", "/long"), 1);
    t.stop().await;

    let t = Tether::start(&config_text(
        &[&a],
        "[limits]\nmax_request_line_bytes = 1024\n",
    ))
    .await;
    let req = format!("GET /long?{} HTTP/1.1\r\nHost: t\r\n\r\n", "q".repeat(1100));
    assert_eq!(status(&raw(t.http, req.as_bytes()).await), 414);
    t.stop().await;
}

// === The accept shortcut ===

#[tokio::test]
async fn a_refused_smuggling_head_is_counted_like_any_request() {
    let a = Worker::start("a").await;
    let t = Tether::start(&config_text(&[&a], "")).await;
    let before = metric(&t, "tether_requests_total").await;
    let req = b"POST /s HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    assert_eq!(status(&raw(t.http, req).await), 400);
    assert_eq!(metric(&t, "tether_requests_total").await, before + 1.0);
    t.stop().await;
}
