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
        self.settings.iter().find(|(i, _)| *i == id).map(|(_, v)| *v)
    }
}

/// Sends the client preface and reads frames until the server's SETTINGS
/// and its connection WINDOW_UPDATE (or 5 s).
async fn h2_greeting(io: &mut TlsStream<TcpStream>) -> H2Greeting {
    io.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
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
    assert_eq!(g.setting(SETTINGS_MAX_CONCURRENT_STREAMS), Some(100), "{g:?}");
    assert_eq!(g.setting(SETTINGS_INITIAL_WINDOW_SIZE), Some(65_536), "{g:?}");
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
    assert_eq!(g.setting(SETTINGS_INITIAL_WINDOW_SIZE), Some(32_768), "{g:?}");
    assert_eq!(g.connection_window, Some(262_144), "{g:?}");
    t.stop().await;
}
