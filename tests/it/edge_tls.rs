//! The TLS edge: the HTTP/2 settings a client is offered, a broken
//! certificate refused on reload (the old one keeps serving), and
//! malformed-SNI handshakes that cannot flood the log.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_tether");

fn tls_text(workers: &[&Worker], cert: &TestCert, extra: &str) -> String {
    let mut s = config_text(workers, extra);
    s = s.replace(
        "http = \"127.0.0.1:0\"\n",
        "http = \"127.0.0.1:0\"\nhttps = \"127.0.0.1:0\"\n",
    );
    s.push_str(&format!(
        "\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        cert.cert.display(),
        cert.key.display()
    ));
    s
}

/// A TLS connection to `addr` trusting only `cert`, offering `alpn`.
async fn connect(
    addr: std::net::SocketAddr,
    cert: &TestCert,
    alpn: &[u8],
) -> std::io::Result<TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    let der = CertificateDer::from_pem_slice(cert.pem.as_bytes()).unwrap();
    roots.add(der).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::other("handshake timed out"))?
}

/// What an HTTP/2 server says first: its SETTINGS and the connection
/// window it opens with a WINDOW_UPDATE on stream 0.
#[derive(Debug, Default)]
struct H2Greeting {
    settings: Vec<(u16, u32)>,
    connection_window: Option<u32>,
}

impl H2Greeting {
    fn setting(&self, id: u16) -> Option<u32> {
        self.settings
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, v)| *v)
    }
}

/// Sends the client preface and reads frames until the server's SETTINGS
/// and its connection WINDOW_UPDATE (or 5 s).
async fn h2_greeting(io: &mut TlsStream<TcpStream>) -> H2Greeting {
    io.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    io.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    let mut g = H2Greeting::default();
    let read = async {
        let mut settings_seen = false;
        while !(settings_seen && g.connection_window.is_some()) {
            let mut head = [0u8; 9];
            io.read_exact(&mut head).await.unwrap();
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let (kind, flags) = (head[3], head[4]);
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            let mut payload = vec![0u8; len];
            io.read_exact(&mut payload).await.unwrap();
            match kind {
                4 if flags & 1 == 0 => {
                    settings_seen = true;
                    for p in payload.chunks_exact(6) {
                        let id = u16::from_be_bytes([p[0], p[1]]);
                        let v = u32::from_be_bytes([p[2], p[3], p[4], p[5]]);
                        g.settings.push((id, v));
                    }
                }
                8 if stream == 0 => {
                    let inc = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                    // The connection window starts at 65535 (RFC 9113 6.9.2).
                    g.connection_window = Some(65_535 + (inc & 0x7fff_ffff));
                }
                _ => {}
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
    g
}

const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;

#[tokio::test]
async fn h2_clients_are_offered_100_streams_and_a_64k_stream_window() {
    let a = Worker::start("a").await;
    let cert = test_cert(&["localhost"]);
    let t = Tether::start(&tls_text(&[&a], &cert, "")).await;
    let mut io = connect(t.https.unwrap(), &cert, b"h2").await.unwrap();
    let g = h2_greeting(&mut io).await;
    assert_eq!(
        g.setting(SETTINGS_MAX_CONCURRENT_STREAMS),
        Some(100),
        "{g:?}"
    );
    assert_eq!(
        g.setting(SETTINGS_INITIAL_WINDOW_SIZE),
        Some(65_536),
        "{g:?}"
    );
    assert_eq!(g.connection_window, Some(1 << 20), "{g:?}");
    t.stop().await;
}

#[tokio::test]
async fn h2_settings_follow_the_config() {
    let a = Worker::start("a").await;
    let cert = test_cert(&["localhost"]);
    let extra = "[limits]\nh2_max_concurrent_streams = 8\n\
                 h2_initial_stream_window = 32768\nh2_initial_connection_window = 262144\n";
    let t = Tether::start(&tls_text(&[&a], &cert, extra)).await;
    let mut io = connect(t.https.unwrap(), &cert, b"h2").await.unwrap();
    let g = h2_greeting(&mut io).await;
    assert_eq!(g.setting(SETTINGS_MAX_CONCURRENT_STREAMS), Some(8), "{g:?}");
    assert_eq!(
        g.setting(SETTINGS_INITIAL_WINDOW_SIZE),
        Some(32_768),
        "{g:?}"
    );
    assert_eq!(g.connection_window, Some(262_144), "{g:?}");
    t.stop().await;
}

/// Writes `pem` as the certificate PEM of garbage DER.
fn garbage_cert() -> String {
    use base64::Engine;
    let junk = base64::engine::general_purpose::STANDARD.encode([0x5a_u8; 300]);
    format!("-----BEGIN CERTIFICATE-----\n{junk}\n-----END CERTIFICATE-----\n")
}

/// A fresh key pair's private key, which matches no certificate in use.
fn other_key() -> String {
    rcgen::KeyPair::generate().unwrap().serialize_pem()
}

/// An HTTPS request trusting only `cert`: the status, or the error.
async fn get(t: &Tether, cert: &TestCert) -> Result<u16, String> {
    let https = t.https.unwrap();
    let client = reqwest::Client::builder()
        .resolve("localhost", https)
        .add_root_certificate(reqwest::Certificate::from_pem(cert.pem.as_bytes()).unwrap())
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let url = format!("https://localhost:{}/", https.port());
    match client.get(url).send().await {
        Ok(r) => Ok(r.status().as_u16()),
        Err(e) => Err(format!("{e:?}")),
    }
}

#[tokio::test]
async fn a_broken_certificate_is_refused_on_reload_and_the_old_one_keeps_serving() {
    let a = Worker::start("a").await;
    let cert = test_cert(&["localhost"]);
    let text = tls_text(&[&a], &cert, "");
    let t = Tether::start(&text).await;
    assert_eq!(get(&t, &cert).await, Ok(200));
    let (good_cert, good_key) = (
        std::fs::read(&cert.cert).unwrap(),
        std::fs::read(&cert.key).unwrap(),
    );
    let reload = || t.handle().reload(config(&with_store(&text, t.dir.path())));

    // Garbage inside the PEM armour: the file names the certificate.
    std::fs::write(&cert.cert, garbage_cert()).unwrap();
    let err = reload()
        .expect_err("a garbage certificate was accepted")
        .to_string();
    assert!(err.contains(&cert.cert.display().to_string()), "{err}");
    assert_eq!(
        get(&t, &cert).await,
        Ok(200),
        "the old certificate stopped serving"
    );
    assert_eq!(metric(&t, "tether_tls_reload_refused_total").await, 1.0);

    // A key that is not the certificate's: the error names the key.
    std::fs::write(&cert.cert, &good_cert).unwrap();
    std::fs::write(&cert.key, other_key()).unwrap();
    let err = reload()
        .expect_err("a mismatched key was accepted")
        .to_string();
    assert!(err.contains(&cert.key.display().to_string()), "{err}");
    assert_eq!(
        get(&t, &cert).await,
        Ok(200),
        "the old certificate stopped serving"
    );
    assert_eq!(metric(&t, "tether_tls_reload_refused_total").await, 2.0);

    // Good files again: the reload goes through.
    std::fs::write(&cert.key, &good_key).unwrap();
    reload().unwrap();
    assert_eq!(get(&t, &cert).await, Ok(200));
    assert_eq!(metric(&t, "tether_tls_reload_refused_total").await, 2.0);
    t.stop().await;
}

#[tokio::test]
async fn check_fails_on_a_broken_certificate_naming_the_file() {
    let a = Worker::start("a").await;
    let cert = test_cert(&["localhost"]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("tether.toml");
    std::fs::write(&cfg, with_store(&tls_text(&[&a], &cert, ""), dir.path())).unwrap();
    let check = || {
        Command::new(BIN)
            .args(["check", "--config"])
            .arg(&cfg)
            .output()
            .unwrap()
    };
    assert!(check().status.success());

    std::fs::write(&cert.key, other_key()).unwrap();
    let out = check();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tls.key") && err.contains(&cert.key.display().to_string()),
        "{err}"
    );

    std::fs::write(&cert.cert, garbage_cert()).unwrap();
    let out = check();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tls.cert") && err.contains(&cert.cert.display().to_string()),
        "{err}"
    );
}

/// A TLS 1.2 ClientHello whose SNI host name is `name` (any bytes).
fn client_hello_with_sni(name: &[u8]) -> Vec<u8> {
    let u16b = |n: usize| (n as u16).to_be_bytes();
    let mut list = vec![0];
    list.extend_from_slice(&u16b(name.len()));
    list.extend_from_slice(name);
    let mut sni = u16b(list.len()).to_vec();
    sni.extend_from_slice(&list);
    let mut ext = vec![0, 0];
    ext.extend_from_slice(&u16b(sni.len()));
    ext.extend_from_slice(&sni);
    let mut body = vec![3, 3];
    body.extend_from_slice(&[0x11; 32]); // random
    body.push(0); // session id
    body.extend_from_slice(&[0, 2, 0xc0, 0x2f]); // one suite
    body.extend_from_slice(&[1, 0]); // null compression
    body.extend_from_slice(&u16b(ext.len()));
    body.extend_from_slice(&ext);
    let mut hs = vec![1, 0];
    hs.extend_from_slice(&u16b(body.len()));
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 3, 1];
    rec.extend_from_slice(&u16b(hs.len()));
    rec.extend_from_slice(&hs);
    rec
}

#[tokio::test]
async fn a_malformed_sni_flood_is_counted_not_logged_line_by_line() {
    let a = Worker::start("a").await;
    let cert = test_cert(&["localhost"]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("tether.toml");
    std::fs::write(&cfg, with_store(&tls_text(&[&a], &cert, ""), dir.path())).unwrap();
    let mut child = Command::new(BIN)
        .current_dir(dir.path())
        .args(["--log-format", "json", "--config"])
        .arg(&cfg)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let (https, admin) = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("tether did not start");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if let (Some(h), Some(a)) = (v["https"].as_str(), v["admin"].as_str()) {
            break (h.parse::<std::net::SocketAddr>().unwrap(), a.to_owned());
        }
    };
    const FLOOD: usize = 50;
    for _ in 0..FLOOD {
        let mut s = TcpStream::connect(https).await.unwrap();
        s.write_all(&client_hello_with_sni(b"bad name!"))
            .await
            .unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        assert_eq!(out.first(), Some(&0x15), "expected an alert: {out:?}");
    }
    let text = plain()
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let failures = text
        .lines()
        .find(|l| l.starts_with("tether_tls_handshake_failures_total "))
        .unwrap_or_else(|| panic!("no handshake metric:\n{text}"));
    assert_eq!(
        failures,
        format!("tether_tls_handshake_failures_total {FLOOD}")
    );
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let lines: Vec<String> = rx.try_iter().collect();
    let sni = lines.iter().filter(|l| l.contains("SNI")).count();
    let ours = lines
        .iter()
        .filter(|l| l.contains("TLS handshakes failed"))
        .count();
    assert_eq!((sni, ours), (0, 1), "{lines:#?}");
}
