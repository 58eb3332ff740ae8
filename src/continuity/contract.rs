//! The worker contract's HTTP calls: export a thread (capture), import a
//! thread (restore), poll the change feed.

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

use crate::backends::Backend;
use crate::config::State;

/// A contract call that failed.
#[derive(Debug, thiserror::Error)]
pub enum ContractError {
    /// No answer (connect, reset, timeout).
    #[error("worker {backend}: {message}")]
    Transport {
        /// Backend id.
        backend: String,
        /// What happened.
        message: String,
    },
    /// An answer outside the contract.
    #[error("worker {backend} answered {status} to {what}")]
    Status {
        /// Backend id.
        backend: String,
        /// The call.
        what: &'static str,
        /// The status.
        status: StatusCode,
    },
    /// A body that is not the contract's JSON.
    #[error("worker {backend}: bad {what} body: {message}")]
    Body {
        /// Backend id.
        backend: String,
        /// The call.
        what: &'static str,
        /// The parse error.
        message: String,
    },
}

/// What an import (`PUT`) came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Imported {
    /// `201`: the worker had no such thread.
    Created,
    /// `200`: it already held it, or appended the missing tail.
    Merged,
    /// `409`: it holds a divergent thread, kept as it is.
    Diverged,
}

/// A thread export (`GET …/threads/T?after=N`).
#[derive(Debug, Deserialize)]
pub struct Export {
    /// The worker's head seq.
    pub seq: u64,
    /// Entries after `N`, raw JSON each.
    pub entries: Vec<Box<serde_json::value::RawValue>>,
    /// Opaque state.
    #[serde(default)]
    pub state: Option<Box<serde_json::value::RawValue>>,
}

/// One change-feed answer.
#[derive(Debug, Deserialize)]
pub struct Changes {
    /// Cursor for the next poll.
    pub cursor: serde_json::Value,
    /// Changed threads.
    #[serde(default)]
    pub changes: Vec<Change>,
}

/// A changed thread.
#[derive(Debug, Deserialize)]
pub struct Change {
    /// Session id.
    pub session: String,
    /// Thread id.
    pub thread: String,
    /// Its seq now.
    pub seq: u64,
}

/// One contract request.
struct Call<'a> {
    method: Method,
    path_and_query: String,
    headers: &'a [(&'static str, String)],
    body: Bytes,
    timeout: Duration,
}

/// The HTTP client for contract calls.
#[derive(Debug, Clone)]
pub struct Contract {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for Contract {
    fn default() -> Self {
        Self::new()
    }
}

impl Contract {
    /// A pooled client.
    pub fn new() -> Contract {
        let mut c = HttpConnector::new();
        c.set_nodelay(true);
        c.set_connect_timeout(Some(Duration::from_secs(5)));
        Contract {
            client: Client::builder(TokioExecutor::new()).build(c),
        }
    }

    async fn call(
        &self,
        backend: &Backend,
        state: &State,
        call: Call<'_>,
    ) -> Result<(StatusCode, Bytes), ContractError> {
        let Call {
            method,
            path_and_query,
            headers,
            body,
            timeout,
        } = call;
        let transport = |m: String| ContractError::Transport {
            backend: backend.id.clone(),
            message: m,
        };
        let uri = Uri::builder()
            .scheme("http")
            .authority(backend.authority.clone())
            .path_and_query(path_and_query)
            .build()
            .map_err(|e| transport(e.to_string()))?;
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        let h = req.headers_mut();
        for (k, v) in headers {
            if let Ok(v) = HeaderValue::from_str(v) {
                h.insert(*k, v);
            }
        }
        if let Some(token) = &state.token {
            if let Ok(v) = HeaderValue::from_str(&format!("Bearer {}", token.expose())) {
                h.insert(AUTHORIZATION, v);
            }
        }
        let fut = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| transport(e.to_string()))?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), state.max_export_bytes)
                .collect()
                .await
                .map_err(|e| transport(e.to_string()))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| transport(format!("no answer within {timeout:?}")))?
    }

    /// `GET {path}/threads/{thread}?after={after}`; `None` on a typed 404.
    pub async fn export(
        &self,
        backend: &Backend,
        state: &State,
        session: &str,
        thread: &str,
        after: u64,
    ) -> Result<Option<Export>, ContractError> {
        let pq = format!("{}/threads/{}?after={after}", state.path, encode(thread));
        let (status, body) = self
            .call(
                backend,
                state,
                Call {
                    method: Method::GET,
                    path_and_query: pq,
                    headers: &[("tether-session", session.to_owned())],
                    body: Bytes::new(),
                    timeout: state.restore_timeout,
                },
            )
            .await?;
        match status {
            StatusCode::OK => {
                serde_json::from_slice(&body)
                    .map(Some)
                    .map_err(|e| ContractError::Body {
                        backend: backend.id.clone(),
                        what: "export",
                        message: e.to_string(),
                    })
            }
            StatusCode::NOT_FOUND if is_thread_not_found(&body) => Ok(None),
            status => Err(ContractError::Status {
                backend: backend.id.clone(),
                what: "export",
                status,
            }),
        }
    }

    /// `PUT {path}/threads/{thread}` with the whole stored thread. Only a
    /// typed answer counts; anything else is a failed import.
    pub async fn import(
        &self,
        backend: &Backend,
        state: &State,
        session: &str,
        epoch: u64,
        thread: &str,
        body: Bytes,
    ) -> Result<Imported, ContractError> {
        let pq = format!("{}/threads/{}", state.path, encode(thread));
        let (status, _) = self
            .call(
                backend,
                state,
                Call {
                    method: Method::PUT,
                    path_and_query: pq,
                    headers: &[
                        ("tether-session", session.to_owned()),
                        ("tether-epoch", epoch.to_string()),
                        (CONTENT_TYPE.as_str(), "application/json".to_owned()),
                    ],
                    body,
                    timeout: state.restore_timeout,
                },
            )
            .await?;
        match status {
            StatusCode::CREATED => Ok(Imported::Created),
            StatusCode::OK => Ok(Imported::Merged),
            StatusCode::CONFLICT => Ok(Imported::Diverged),
            status => Err(ContractError::Status {
                backend: backend.id.clone(),
                what: "import",
                status,
            }),
        }
    }

    /// One long poll of the change feed; `None` when the worker has none
    /// (`404`).
    pub async fn changes(
        &self,
        backend: &Backend,
        state: &State,
        cursor: &str,
        wait: Duration,
    ) -> Result<Option<Changes>, ContractError> {
        let pq = format!(
            "{}/changes?after={}&wait={}s",
            state.path,
            encode(cursor),
            wait.as_secs()
        );
        let (status, body) = self
            .call(
                backend,
                state,
                Call {
                    method: Method::GET,
                    path_and_query: pq,
                    headers: &[],
                    body: Bytes::new(),
                    timeout: wait + Duration::from_secs(10),
                },
            )
            .await?;
        match status {
            StatusCode::OK => {
                serde_json::from_slice(&body)
                    .map(Some)
                    .map_err(|e| ContractError::Body {
                        backend: backend.id.clone(),
                        what: "changes",
                        message: e.to_string(),
                    })
            }
            StatusCode::NOT_FOUND => Ok(None),
            status => Err(ContractError::Status {
                backend: backend.id.clone(),
                what: "changes",
                status,
            }),
        }
    }
}

fn is_thread_not_found(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.get("code")
                .and_then(|c| c.as_str())
                .map(|c| c == "thread_not_found")
        })
        .unwrap_or(false)
}

/// Percent-encodes a path segment or query value (RFC 3986 unreserved kept).
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
