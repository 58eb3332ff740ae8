//! TLS: certificates from PEM files, chosen by SNI, TLS 1.2 and 1.3 only,
//! ALPN `h2` and `http/1.1`. The config is rebuilt on reload and swapped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

// ring by default; aws-lc-rs with the `aws-lc-rs` feature (compared in the
// README's Performance section).
#[cfg(feature = "aws-lc-rs")]
use rustls::crypto::aws_lc_rs as provider;
#[cfg(not(feature = "aws-lc-rs"))]
use rustls::crypto::ring as provider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{InconsistentKeys, ServerConfig};

use crate::config::Tls;

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file did not read or parse.
    #[error("{key}: cannot load {path}: {message}")]
    Pem {
        /// The config key naming the file.
        key: String,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The private key is not the key of the leaf certificate.
    #[error("{key_key} = {key} is not the private key of the certificate in {cert_key} = {cert}")]
    KeyMismatch {
        /// The config key naming the certificate.
        cert_key: String,
        /// The certificate file.
        cert: PathBuf,
        /// The config key naming the private key.
        key_key: String,
        /// The key file.
        key: PathBuf,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Builds the rustls server config for `[tls]`.
pub fn server_config(tls: &Tls) -> Result<Arc<ServerConfig>, TlsError> {
    let crypto = Arc::new(provider::default_provider());
    let default = load_key("tls.cert", &tls.cert, "tls.key", &tls.key)?;
    let mut by_name = HashMap::new();
    for (i, sni) in tls.sni.iter().enumerate() {
        let key = load_key(
            &format!("tls.sni[{i}].cert"),
            &sni.cert,
            &format!("tls.sni[{i}].key"),
            &sni.key,
        )?;
        by_name.insert(sni.name.to_ascii_lowercase(), key);
    }
    let mut cfg = ServerConfig::builder_with_provider(crypto)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SniResolver { default, by_name }));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

fn load_key(
    cert_key: &str,
    cert: &Path,
    key_key: &str,
    key: &Path,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let pem_err = |k: &str, p: &Path, m: String| TlsError::Pem {
        key: k.to_owned(),
        path: p.to_path_buf(),
        message: m,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| pem_err(cert_key, cert, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem_err(cert_key, cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(pem_err(cert_key, cert, "no certificate in file".into()));
    }
    // rustls reads the DER only during a handshake: parse it now, so a
    // broken file fails `check` and a reload instead of every handshake.
    for (i, der) in chain.iter().enumerate() {
        ParsedCertificate::try_from(der).map_err(|e| {
            let n = chain.len();
            pem_err(cert_key, cert, format!("certificate {} of {n}: {e}", i + 1))
        })?;
    }
    let private =
        PrivateKeyDer::from_pem_file(key).map_err(|e| pem_err(key_key, key, e.to_string()))?;
    let signing = provider::sign::any_supported_type(&private)
        .map_err(|e| pem_err(key_key, key, e.to_string()))?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) => Ok(Arc::new(certified)),
        Err(rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
            Err(TlsError::KeyMismatch {
                cert_key: cert_key.to_owned(),
                cert: cert.to_path_buf(),
                key_key: key_key.to_owned(),
                key: key.to_path_buf(),
            })
        }
        Err(e) => Err(pem_err(
            key_key,
            key,
            format!("cannot check it against {}: {e}", cert.display()),
        )),
    }
}

/// Picks the certificate whose name the client asked for, else the default.
#[derive(Debug)]
struct SniResolver {
    default: Arc<CertifiedKey>,
    by_name: HashMap<String, Arc<CertifiedKey>>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let chosen = hello
            .server_name()
            .and_then(|n| self.by_name.get(&n.to_ascii_lowercase()))
            .unwrap_or(&self.default);
        Some(chosen.clone())
    }
}

/// At most one log line about failed client handshakes per this period.
const HANDSHAKE_LOG_EVERY: Duration = Duration::from_secs(60);

/// Failed client handshakes, logged at most once per period so that a
/// scanner cannot flood the log (rustls's own per-handshake warnings, such
/// as a malformed SNI name, are filtered out in `main`).
#[derive(Debug)]
pub(crate) struct HandshakeLog {
    every: Duration,
    state: Mutex<LogState>,
}

#[derive(Debug, Default)]
struct LogState {
    /// When the last line was written.
    last: Option<Instant>,
    /// Failures since then.
    unlogged: u64,
}

impl HandshakeLog {
    /// One line per [`HANDSHAKE_LOG_EVERY`].
    pub(crate) fn new() -> HandshakeLog {
        HandshakeLog::every(HANDSHAKE_LOG_EVERY)
    }

    fn every(every: Duration) -> HandshakeLog {
        HandshakeLog {
            every,
            state: Mutex::default(),
        }
    }

    /// Records one failure at `now`; `Some(n)` when a line is due, `n`
    /// failures (this one included) since the last line.
    pub(crate) fn failed(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.unlogged += 1;
        if s.last.is_some_and(|t| now.duration_since(t) < self.every) {
            return None;
        }
        s.last = Some(now);
        Some(std::mem::take(&mut s.unlogged))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_period_counting_what_it_skipped() {
        let log = HandshakeLog::every(Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(log.failed(t0), Some(1));
        for i in 1..1000 {
            assert_eq!(log.failed(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(log.failed(t0 + Duration::from_secs(60)), Some(1000));
        assert_eq!(log.failed(t0 + Duration::from_secs(61)), None);
    }
}
