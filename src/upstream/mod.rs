#![allow(dead_code)]
//! PLACEHOLDER upstream path (one connection per request, verified) until
//! the pooled implementation lands. Same API.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery};
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::live::Live;
use crate::proxy::body::{BoxError, ReplayBody};
use crate::wire::TETHER_INSTANCE;

/// Idle connections kept per worker.
pub(crate) const MAX_IDLE: usize = 64;

/// One worker address.
#[derive(Debug)]
pub(crate) struct Endpoint {
    authority: Authority,
}

impl Endpoint {
    pub(crate) fn new(authority: Authority) -> Endpoint {
        Endpoint { authority }
    }
}

/// The upstream client.
#[derive(Debug, Clone, Default)]
pub(crate) struct Upstream;

/// Per-call settings.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub verify_path: String,
    pub max_idle: usize,
    pub max_response_head: usize,
}

impl Settings {
    /// The settings of a config generation.
    pub(crate) fn of(live: &Live) -> Settings {
        let c = &live.config;
        Settings {
            connect_timeout: c.limits.connect_timeout,
            idle_timeout: c.limits.idle_timeout,
            verify_path: c.health.path.clone(),
            max_idle: MAX_IDLE,
            max_response_head: c.limits.max_header_bytes,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Expect<'a> {
    Any,
    Instance(&'a str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fresh {
    Pooled,
    New,
}

pub(crate) struct Sent {
    pub response: Response<UpstreamBody>,
    pub instance: Option<Arc<str>>,
    pub reused: bool,
}

/// The response body.
pub(crate) struct UpstreamBody(Incoming);

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;
    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.0.size_hint()
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    #[error("connection refused")]
    Refused {
        #[source]
        source: std::io::Error,
    },
    #[error("connect timed out after {after:?}")]
    ConnectTimeout { after: Duration },
    #[error("connection verification failed")]
    Verify {
        #[source]
        source: BoxError,
    },
    #[error("connection reaches process {seen}")]
    InstanceChanged { seen: String },
    #[error("request not sent")]
    NotSent {
        #[source]
        source: hyper::Error,
    },
    #[error("client body failed")]
    ClientBody {
        #[source]
        source: BoxError,
    },
    #[error("request failed")]
    Failed {
        reused: bool,
        #[source]
        source: hyper::Error,
    },
}

/// The origin-form request target.
pub(crate) fn origin_form(path: &PathAndQuery) -> Uri {
    Uri::from(path.clone())
}

/// A Host header value for a worker's authority.
pub(crate) fn host_value(a: &Authority) -> HeaderValue {
    HeaderValue::from_str(a.as_str()).unwrap_or_else(|_| HeaderValue::from_static("localhost"))
}

type Conn = hyper::client::conn::http1::SendRequest<ReplayBody>;

impl Upstream {
    pub(crate) fn new() -> Upstream {
        Upstream
    }

    async fn connect(&self, ep: &Endpoint, s: &Settings) -> Result<Conn, UpstreamError> {
        let addr = ep.authority.as_str().to_owned();
        let tcp = match tokio::time::timeout(s.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(t)) => t,
            Ok(Err(source)) => return Err(UpstreamError::Refused { source }),
            Err(_) => {
                return Err(UpstreamError::ConnectTimeout {
                    after: s.connect_timeout,
                })
            }
        };
        let _ = tcp.set_nodelay(true);
        let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| UpstreamError::Verify {
                source: Box::new(e),
            })?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection error");
            }
        });
        Ok(tx)
    }

    async fn verify(
        &self,
        ep: &Endpoint,
        s: &Settings,
        tx: &mut Conn,
    ) -> Result<Option<String>, UpstreamError> {
        let mut req = Request::new(ReplayBody::empty());
        *req.uri_mut() =
            Uri::try_from(s.verify_path.as_str()).map_err(|e| UpstreamError::Verify {
                source: Box::new(e),
            })?;
        req.headers_mut()
            .insert(http::header::HOST, host_value(&ep.authority));
        let fut = async {
            let resp = tx.send_request(req).await?;
            let inst = resp
                .headers()
                .get(TETHER_INSTANCE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let _ = http_body_util::BodyExt::collect(resp.into_body()).await?;
            tx.ready().await?;
            Ok::<_, hyper::Error>(inst)
        };
        match tokio::time::timeout(s.connect_timeout, fut).await {
            Ok(Ok(i)) => Ok(i),
            Ok(Err(e)) => Err(UpstreamError::Verify {
                source: Box::new(e),
            }),
            Err(_) => Err(UpstreamError::Verify {
                source: "verification timed out".into(),
            }),
        }
    }

    pub(crate) async fn send(
        &self,
        ep: &Endpoint,
        s: &Settings,
        expect: Expect<'_>,
        _fresh: Fresh,
        req: Request<ReplayBody>,
    ) -> Result<Sent, UpstreamError> {
        let mut tx = self.connect(ep, s).await?;
        let instance = self.verify(ep, s, &mut tx).await?;
        if let (Expect::Instance(want), Some(seen)) = (expect, instance.as_deref()) {
            if want != seen {
                return Err(UpstreamError::InstanceChanged {
                    seen: seen.to_owned(),
                });
            }
        }
        match tx.send_request(req).await {
            Ok(resp) => Ok(Sent {
                response: resp.map(UpstreamBody),
                instance: instance.map(Arc::from),
                reused: false,
            }),
            Err(e) if e.is_canceled() => Err(UpstreamError::NotSent { source: e }),
            Err(e) if e.is_user() => Err(UpstreamError::ClientBody {
                source: Box::new(e),
            }),
            Err(e) => Err(UpstreamError::Failed {
                reused: false,
                source: e,
            }),
        }
    }

    pub(crate) async fn probe(
        &self,
        ep: &Endpoint,
        s: &Settings,
        path: &str,
        timeout: Duration,
    ) -> Result<(StatusCode, Option<String>), UpstreamError> {
        let mut tx = self.connect(ep, s).await?;
        let mut req = Request::new(ReplayBody::empty());
        *req.uri_mut() = Uri::try_from(path).map_err(|e| UpstreamError::Verify {
            source: Box::new(e),
        })?;
        req.headers_mut()
            .insert(http::header::HOST, host_value(&ep.authority));
        let fut = async {
            let resp = tx.send_request(req).await?;
            let inst = resp
                .headers()
                .get(TETHER_INSTANCE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let status = resp.status();
            let _ = http_body_util::BodyExt::collect(resp.into_body()).await?;
            Ok::<_, hyper::Error>((status, inst))
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(UpstreamError::Verify {
                source: Box::new(e),
            }),
            Err(_) => Err(UpstreamError::Verify {
                source: "probe timed out".into(),
            }),
        }
    }
}
