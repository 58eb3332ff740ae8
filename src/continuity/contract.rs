//! The worker contract's HTTP calls: export a thread (capture), import a
//! thread (restore), poll the change feed.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use http::uri::PathAndQuery;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Limited};
use serde::Deserialize;
use tokio::time::Instant;

use crate::backends::Backend;
use crate::live::Live;
use crate::proxy::body::{BoxError, ReplayBody};
use crate::upstream::{self, Expect, Fresh, Upstream, UpstreamError};
use crate::wire::{TETHER_EPOCH, TETHER_SESSION};

/// A contract call that failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ContractError {
    /// The worker could not be reached, or dropped the call.
    #[error("worker {backend} did not answer {what}")]
    Unreachable {
        /// Backend id.
        backend: String,
        /// The call.
        what: &'static str,
        /// The cause.
        #[source]
        source: UpstreamError,
    },
    /// The call would reach another process than the one that holds the
    /// data (the worker restarted).
    #[error("worker {backend} is now process {seen}")]
    InstanceChanged {
        /// Backend id.
        backend: String,
        /// The instance the connection reached.
        seen: String,
    },
    /// No complete answer before the deadline.
    #[error("worker {backend} did not answer {what} in time")]
    Timeout {
        /// Backend id.
        backend: String,
        /// The call.
        what: &'static str,
    },
    /// The answer's body could not be read (or was larger than
    /// `state.max_export_bytes`).
    #[error("worker {backend}: cannot read the {what} answer")]
    Read {
        /// Backend id.
        backend: String,
        /// The call.
        what: &'static str,
        /// The cause.
        #[source]
        source: BoxError,
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
    #[error("worker {backend}: bad {what} body")]
    Body {
        /// Backend id.
        backend: String,
        /// The call.
        what: &'static str,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
}

/// What an import (`PUT`) came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Imported {
    /// `201`: the worker had no such thread.
    Created,
    /// `200`: it already held it, or appended the missing tail.
    Merged,
    /// `409`: it holds a divergent thread, kept as it is.
    Diverged,
}

/// What an export found.
#[derive(Debug)]
pub(crate) enum Exported {
    /// The worker's thread.
    Thread(Export),
    /// A typed `404 {"code":"thread_not_found"}`.
    NotFound,
}

/// A thread export (`GET …/threads/T?after=N`).
#[derive(Debug, Deserialize)]
pub(crate) struct Export {
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
pub(crate) struct Changes {
    /// Cursor for the next poll.
    pub cursor: serde_json::Value,
    /// Changed threads.
    #[serde(default)]
    pub changes: Vec<Change>,
}

/// A changed thread.
#[derive(Debug, Deserialize)]
pub(crate) struct Change {
    /// Session id.
    pub session: String,
    /// Thread id.
    pub thread: String,
    /// Its seq now.
    pub seq: u64,
}

/// A contract call's answer.
struct Answer {
    status: StatusCode,
    body: Bytes,
    /// The process that answered (the connection's verified instance).
    instance: Option<Arc<str>>,
}

/// One contract request.
struct Call<'a> {
    what: &'static str,
    method: Method,
    path_and_query: String,
    headers: &'a [(HeaderName, String)],
    body: Bytes,
    expect: Expect<'a>,
    deadline: Instant,
}

/// The client for contract calls: the same verified upstream connections
/// as forwarded requests.
#[derive(Debug, Clone)]
pub(crate) struct Contract {
    upstream: Upstream,
}

impl Contract {
    /// A client over `upstream`.
    pub(crate) fn new(upstream: Upstream) -> Contract {
        Contract { upstream }
    }

    async fn call(
        &self,
        backend: &Backend,
        live: &Live,
        call: Call<'_>,
    ) -> Result<Answer, ContractError> {
        let Call {
            what,
            method,
            path_and_query,
            headers,
            body,
            expect,
            deadline,
        } = call;
        let state = &live.config.state;
        let target = PathAndQuery::try_from(path_and_query).map_err(|e| ContractError::Read {
            backend: backend.id.clone(),
            what,
            source: Box::new(e),
        })?;
        let mut req = Request::new(ReplayBody::from_bytes(body));
        *req.method_mut() = method;
        *req.uri_mut() = upstream::origin_form(&target);
        let h = req.headers_mut();
        h.insert(HOST, upstream::host_value(&backend.authority));
        for (k, v) in headers {
            if let Ok(v) = HeaderValue::from_str(v) {
                h.insert(k.clone(), v);
            }
        }
        if let Some(token) = &state.token {
            if let Ok(v) = HeaderValue::from_str(&format!("Bearer {}", token.expose())) {
                h.insert(AUTHORIZATION, v);
            }
        }
        let settings = upstream::Settings::of(live);
        let exchange = async {
            let sent = self
                .upstream
                .send(&backend.endpoint, &settings, expect, Fresh::Pooled, req)
                .await
                .map_err(|e| match e {
                    UpstreamError::InstanceChanged { seen } => ContractError::InstanceChanged {
                        backend: backend.id.clone(),
                        seen,
                    },
                    source => ContractError::Unreachable {
                        backend: backend.id.clone(),
                        what,
                        source,
                    },
                })?;
            let status = sent.response.status();
            let instance = sent.instance.clone();
            let body = Limited::new(sent.response.into_body(), state.max_export_bytes)
                .collect()
                .await
                .map_err(|source| ContractError::Read {
                    backend: backend.id.clone(),
                    what,
                    source,
                })?
                .to_bytes();
            Ok(Answer {
                status,
                body,
                instance,
            })
        };
        tokio::time::timeout_at(deadline, exchange)
            .await
            .map_err(|_| ContractError::Timeout {
                backend: backend.id.clone(),
                what,
            })?
    }

    /// `GET {path}/threads/{thread}?after={after}` on the process `expect`
    /// (when known).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn export(
        &self,
        backend: &Backend,
        live: &Live,
        expect: Option<&str>,
        session: &str,
        thread: &str,
        after: u64,
        deadline: Instant,
    ) -> Result<Exported, ContractError> {
        let pq = format!(
            "{}/threads/{}?after={after}",
            live.config.state.path,
            encode(thread)
        );
        let Answer { status, body, .. } = self
            .call(
                backend,
                live,
                Call {
                    what: "export",
                    method: Method::GET,
                    path_and_query: pq,
                    headers: &[(TETHER_SESSION, session.to_owned())],
                    body: Bytes::new(),
                    expect: expect.map_or(Expect::Any, Expect::Instance),
                    deadline,
                },
            )
            .await?;
        match status {
            StatusCode::OK => {
                serde_json::from_slice(&body)
                    .map(Exported::Thread)
                    .map_err(|source| ContractError::Body {
                        backend: backend.id.clone(),
                        what: "export",
                        source,
                    })
            }
            StatusCode::NOT_FOUND if is_thread_not_found(&body) => Ok(Exported::NotFound),
            status => Err(ContractError::Status {
                backend: backend.id.clone(),
                what: "export",
                status,
            }),
        }
    }

    /// `PUT {path}/threads/{thread}` with the whole stored thread, on the
    /// process `expect` (when known). Only a typed answer counts; anything
    /// else is a failed import. Returns the process that took it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn import(
        &self,
        backend: &Backend,
        live: &Live,
        expect: Option<&str>,
        session: &str,
        epoch: u64,
        thread: &str,
        body: Bytes,
        deadline: Instant,
    ) -> Result<(Imported, Option<Arc<str>>), ContractError> {
        let pq = format!("{}/threads/{}", live.config.state.path, encode(thread));
        let Answer {
            status, instance, ..
        } = self
            .call(
                backend,
                live,
                Call {
                    what: "import",
                    method: Method::PUT,
                    path_and_query: pq,
                    headers: &[
                        (TETHER_SESSION, session.to_owned()),
                        (TETHER_EPOCH, epoch.to_string()),
                        (CONTENT_TYPE, "application/json".to_owned()),
                    ],
                    body,
                    expect: expect.map_or(Expect::Any, Expect::Instance),
                    deadline,
                },
            )
            .await?;
        match status {
            StatusCode::CREATED => Ok((Imported::Created, instance)),
            StatusCode::OK => Ok((Imported::Merged, instance)),
            StatusCode::CONFLICT => Ok((Imported::Diverged, instance)),
            status => Err(ContractError::Status {
                backend: backend.id.clone(),
                what: "import",
                status,
            }),
        }
    }

    /// One long poll of the change feed, on the process `expect` (the one
    /// the cursor belongs to, when known); `None` when the worker has none
    /// (`404`). Returns the process that answered.
    pub(crate) async fn changes(
        &self,
        backend: &Backend,
        live: &Live,
        expect: Option<&str>,
        cursor: &str,
        wait: Duration,
    ) -> Result<(Option<Changes>, Option<Arc<str>>), ContractError> {
        let pq = format!(
            "{}/changes?after={}&wait={}s",
            live.config.state.path,
            encode(cursor),
            wait.as_secs()
        );
        let Answer {
            status,
            body,
            instance,
        } = self
            .call(
                backend,
                live,
                Call {
                    what: "changes",
                    method: Method::GET,
                    path_and_query: pq,
                    headers: &[],
                    body: Bytes::new(),
                    expect: expect.map_or(Expect::Any, Expect::Instance),
                    deadline: Instant::now() + wait + Duration::from_secs(10),
                },
            )
            .await?;
        match status {
            StatusCode::OK => serde_json::from_slice(&body)
                .map(|c| (Some(c), instance))
                .map_err(|source| ContractError::Body {
                    backend: backend.id.clone(),
                    what: "changes",
                    source,
                }),
            StatusCode::NOT_FOUND => Ok((None, instance)),
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
pub(crate) fn encode(s: &str) -> String {
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
