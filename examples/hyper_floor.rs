//! The floor of a hyper-based proxy, for the load comparison
//! (`bench/compare.sh`): what hyper's server and hyper's HTTP/1.1 client
//! cost per proxied request when the proxy does nothing else: no cookie,
//! no routing, no header rewrite, no admission, no continuity. tether is
//! built on the same two; whatever this does per request, tether cannot do
//! for less.
//!
//! ```text
//! hyper_floor LISTEN ORIGIN [CERT KEY]
//! ```
//!
//! Plain HTTP/1.1 on LISTEN, or with CERT and KEY (PEM) TLS with ALPN
//! `h2`/`http/1.1`. One thread (current-thread runtime). Each client
//! connection keeps its own upstream connections to ORIGIN (`host:port`):
//! no shared pool, no lock taken by two connections; a request takes one
//! that is ready or opens one.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use http::header::HOST;
use http::uri::PathAndQuery;
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

type Error = Box<dyn std::error::Error + Send + Sync>;
type Body = BoxBody<Bytes, hyper::Error>;
type Idle = Arc<Mutex<Vec<SendRequest<Incoming>>>>;

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (listen, origin, tls) = match args.as_slice() {
        [l, o] => (l, o, None),
        [l, o, cert, key] => (l, o, Some(acceptor(cert, key)?)),
        _ => {
            eprintln!("usage: hyper_floor LISTEN ORIGIN [CERT KEY]");
            std::process::exit(2)
        }
    };
    let origin: Arc<str> = Arc::from(origin.as_str());
    let host = HeaderValue::from_str(&origin)?;
    let h1_only = std::env::var_os("FLOOR_H1_ONLY").is_some();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(listen).await?;
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(_) => continue,
            };
            let _ = stream.set_nodelay(true);
            let (origin, host, tls) = (origin.clone(), host.clone(), tls.clone());
            tokio::spawn(async move {
                let idle: Idle = Arc::default();
                let svc =
                    service_fn(move |req| forward(req, idle.clone(), origin.clone(), host.clone()));
                let builder = auto::Builder::new(TokioExecutor::new());
                let _ = match tls {
                    // HTTP/1.1 only, without the version sniffing.
                    None if h1_only => {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                        return;
                    }
                    None => builder.serve_connection(TokioIo::new(stream), svc).await,
                    Some(tls) => match tls.accept(stream).await {
                        Ok(stream) => builder.serve_connection(TokioIo::new(stream), svc).await,
                        Err(_) => return,
                    },
                };
            });
        }
    })
}

fn acceptor(cert: &str, key: &str) -> Result<TlsAcceptor, Error> {
    let certs = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(key)?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

async fn forward(
    req: Request<Incoming>,
    idle: Idle,
    origin: Arc<str>,
    host: HeaderValue,
) -> Result<Response<Body>, Infallible> {
    let (mut parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    parts.uri = Uri::from(path);
    parts.version = Version::HTTP_11;
    parts.headers.insert(HOST, host);
    let req = Request::from_parts(parts, body);
    let ready = {
        let mut idle = idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain(|tx| !tx.is_closed());
        idle.iter()
            .position(SendRequest::is_ready)
            .map(|i| idle.swap_remove(i))
    };
    let mut tx = match ready {
        Some(tx) => tx,
        None => match connect(&origin).await {
            Ok(tx) => tx,
            Err(_) => return Ok(status(StatusCode::BAD_GATEWAY)),
        },
    };
    let sent = tx.send_request(req).await;
    idle.lock().unwrap_or_else(|p| p.into_inner()).push(tx);
    Ok(match sent {
        Ok(resp) => resp.map(BodyExt::boxed),
        Err(_) => status(StatusCode::BAD_GATEWAY),
    })
}

async fn connect(origin: &str) -> Result<SendRequest<Incoming>, Error> {
    let tcp = TcpStream::connect(origin).await?;
    tcp.set_nodelay(true)?;
    let (tx, conn) = http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    Ok(tx)
}

fn status(code: StatusCode) -> Response<Body> {
    let mut resp = Response::new(Empty::new().map_err(|never| match never {}).boxed());
    *resp.status_mut() = code;
    resp
}
