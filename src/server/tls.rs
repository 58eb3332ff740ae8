//! TLS: certificates from PEM files, chosen by SNI, TLS 1.2 and 1.3 only,
//! ALPN `h2` and `http/1.1`. The config is rebuilt on reload and swapped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::ring;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

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
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Builds the rustls server config for `[tls]`.
pub fn server_config(tls: &Tls) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(ring::default_provider());
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
    let mut cfg = ServerConfig::builder_with_provider(provider)
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
    let private =
        PrivateKeyDer::from_pem_file(key).map_err(|e| pem_err(key_key, key, e.to_string()))?;
    let signing = ring::sign::any_supported_type(&private)
        .map_err(|e| pem_err(key_key, key, e.to_string()))?;
    Ok(Arc::new(CertifiedKey::new(chain, signing)))
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
