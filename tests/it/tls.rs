//! HTTPS: HTTP/2 through ALPN, `Secure` cookies, SNI, old TLS refused.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

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

#[tokio::test]
async fn https_serves_h2_via_alpn_with_a_secure_cookie() {
    let a = Worker::start("a").await;
    let cert = test_cert(&["localhost"]);
    let t = Tether::start(&tls_text(&[&a], &cert, "")).await;
    let https = t.https.unwrap();
    let url = format!("https://localhost:{}/chat", https.port());
    let client = reqwest::Client::builder()
        .cookie_store(true)
        .resolve("localhost", https)
        .add_root_certificate(reqwest::Certificate::from_pem(cert.pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    let first = client.get(&url).send().await.unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(first.version(), reqwest::Version::HTTP_2);
    let c = set_cookies(&first)
        .into_iter()
        .find(|c| c.starts_with("tether="))
        .unwrap();
    assert!(c.contains("Secure"), "{c}");
    // The pin holds over h2, and the worker was told the request was https.
    let second = client.get(&url).send().await.unwrap();
    assert_eq!(worker_of(&second), "a");
    assert!(set_cookies(&second).is_empty());
    let seen = a.seen().pop().unwrap();
    assert_eq!(seen.headers.get("x-forwarded-proto").unwrap(), "https");
    t.stop().await;
}

#[tokio::test]
async fn sni_picks_the_matching_certificate() {
    let a = Worker::start("a").await;
    let default = test_cert(&["localhost"]);
    let other = test_cert(&["chat.example"]);
    let extra = format!(
        "\n[[tls.sni]]\nname = \"chat.example\"\ncert = \"{}\"\nkey = \"{}\"\n",
        other.cert.display(),
        other.key.display()
    );
    let text = tls_text(&[&a], &default, "") + &extra;
    let t = Tether::start(&text).await;
    let https = t.https.unwrap();
    // A client that trusts only the SNI certificate reaches chat.example.
    let client = reqwest::Client::builder()
        .resolve("chat.example", https)
        .add_root_certificate(reqwest::Certificate::from_pem(other.pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    let resp = client
        .get(format!("https://chat.example:{}/", https.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // The same client asking for localhost gets the default cert: untrusted.
    let wrong = client
        .get(format!("https://localhost:{}/", https.port()))
        .send()
        .await;
    assert!(wrong.is_err());
    t.stop().await;
}

/// A TLS 1.1 ClientHello (legacy_version 0x0302, no supported_versions).
fn tls11_client_hello() -> Vec<u8> {
    let mut body = vec![0x03, 0x02];
    body.extend_from_slice(&[0x11; 32]); // random
    body.push(0); // session id
    body.extend_from_slice(&[0x00, 0x04, 0xc0, 0x13, 0x00, 0x2f]); // suites
    body.extend_from_slice(&[0x01, 0x00]); // null compression
    let mut hs = vec![0x01, 0x00, 0x00, body.len() as u8];
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 0x03, 0x01, 0x00, hs.len() as u8];
    rec.extend_from_slice(&hs);
    rec
}

#[tokio::test]
async fn tls_1_1_is_refused() {
    let a = Worker::start("a").await;
    let cert = test_cert(&["localhost"]);
    let t = Tether::start(&tls_text(&[&a], &cert, "")).await;
    let mut s = TcpStream::connect(t.https.unwrap()).await.unwrap();
    s.write_all(&tls11_client_hello()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut out)).await;
    assert!(out.len() >= 7, "no answer: {out:?}");
    assert_eq!(out[0], 0x15, "expected an alert record, got {out:?}");
    assert_eq!(out[5], 2, "expected a fatal alert, got {out:?}");
    // protocol_version (70) or handshake_failure (40): no TLS 1.1 session.
    assert!([40, 70].contains(&out[6]), "unexpected alert {out:?}");
    t.stop().await;
}
