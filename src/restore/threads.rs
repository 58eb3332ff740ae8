//! Restoring a session's threads into a worker: every stored thread is
//! sent whole with `PUT`; the worker's existing thread always wins. Nothing
//! here can delete, empty or overwrite a thread.

use std::sync::Arc;

use bytes::Bytes;
use tokio::time::Instant;

use super::MoveError;
use crate::backends::Backend;
use crate::continuity::capture::{Key, Source};
use crate::continuity::contract::{ContractError, Imported};
use crate::continuity::Continuity;
use crate::live::Live;
use crate::store::Fence;

/// What a restore did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Report {
    /// Threads sent.
    pub threads: u64,
    /// Created on the worker (`201`).
    pub created: u64,
    /// Already held or tail appended (`200`).
    pub merged: u64,
    /// Divergent copies kept (`409`).
    pub diverged: u64,
    /// The one process that took every thread (the pin names it).
    pub instance: Option<Arc<str>>,
}

/// Sends every stored thread of `session` to `backend` under `epoch`, all
/// to one process: the one the worker's instance names now, or else the
/// first that answers. A restart half-way fails the restore (the next
/// request starts again) rather than leaving threads in a process the pin
/// does not name.
pub(crate) async fn restore_threads(
    c: &Continuity,
    backend: &Backend,
    live: &Live,
    session: &str,
    epoch: u64,
    deadline: Instant,
) -> Result<Report, MoveError> {
    let link = c.link();
    let store = link.get()?;
    let mut report = Report {
        instance: backend.instance().map(Arc::from),
        ..Report::default()
    };
    for thread in link.call(deadline, store.threads(session)).await? {
        if thread.seq == 0 {
            // Never send an empty thread: it could only create emptiness.
            continue;
        }
        let bodies = link
            .call(
                deadline,
                store.entries(session, &thread.thread_id, thread.seq),
            )
            .await?;
        if bodies.len() as u64 != thread.seq {
            // The head says T but fewer rows exist: send what is
            // contiguous from 1 (the worker accepts any prefix).
            tracing::warn!(session, thread = %thread.thread_id, head = thread.seq, rows = bodies.len(), "stored thread shorter than its head");
        }
        if bodies.is_empty() {
            continue;
        }
        let body = import_body(bodies.len() as u64, &bodies, thread.state.as_deref());
        let (outcome, took) = c
            .contract()
            .import(
                backend,
                live,
                report.instance.as_deref(),
                session,
                epoch,
                &thread.thread_id,
                body,
                deadline,
            )
            .await
            .map_err(|source| {
                if let ContractError::InstanceChanged { seen, .. } = &source {
                    // The worker restarted under the restore: the next
                    // move restores into the new process.
                    if backend.observe_instance(seen).is_some() {
                        c.metrics().instance_change(&backend.id);
                    }
                }
                MoveError::Restore {
                    backend: backend.id.clone(),
                    source,
                }
            })?;
        if report.instance.is_none() {
            report.instance = took;
        }
        report.threads += 1;
        match outcome {
            Imported::Created => report.created += 1,
            Imported::Merged => report.merged += 1,
            Imported::Diverged => {
                tracing::warn!(session, thread = %thread.thread_id, backend = %backend.id, "worker holds a divergent thread: kept as it is");
                report.diverged += 1;
                // Its copy is what its user sees from now on: the stored
                // thread follows it (the move's answer is marked partial).
                let key: Key = (Arc::from(session), Arc::from(thread.thread_id.as_str()));
                let source = Source {
                    backend: backend.id.clone(),
                    instance: report.instance.clone(),
                    fence: Fence::Epoch(epoch),
                };
                if let Err(e) = c
                    .rebase(&key, &source, backend, live, false, deadline)
                    .await
                {
                    tracing::warn!(session, thread = %key.1, error = %e, "cannot rebase the stored thread on the worker's copy");
                }
            }
        }
    }
    Ok(report)
}

/// `{"seq": T, "entries": [...], "state": ...}` from stored JSON texts,
/// without re-parsing them.
pub(crate) fn import_body(seq: u64, entries: &[String], state: Option<&str>) -> Bytes {
    let len: usize = entries.iter().map(|e| e.len() + 1).sum::<usize>() + 64;
    let mut out = String::with_capacity(len + state.map_or(4, str::len));
    out.push_str("{\"seq\":");
    out.push_str(&seq.to_string());
    out.push_str(",\"entries\":[");
    for (i, e) in entries.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(e);
    }
    out.push_str("],\"state\":");
    out.push_str(state.unwrap_or("null"));
    out.push('}');
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_body_is_valid_json() {
        let b = import_body(
            2,
            &["{\"seq\":1}".into(), "{\"seq\":2,\"x\":[1]}".into()],
            Some("{\"k\":1}"),
        );
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["seq"], 2);
        assert_eq!(v["entries"][1]["x"][0], 1);
        assert_eq!(v["state"]["k"], 1);
        let none = import_body(1, &["{\"seq\":1}".into()], None);
        let v: serde_json::Value = serde_json::from_slice(&none).unwrap();
        assert!(v["state"].is_null());
    }
}
