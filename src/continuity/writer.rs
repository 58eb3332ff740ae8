//! Session writes from the hot path (new pins, last-seen) go through a
//! bounded queue and reach the store in batches: a request never waits on
//! the database, and a full queue drops writes (counted) instead.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::store::SessionRow;

/// Most rows per batch.
const BATCH: usize = 500;

/// The sending side, used by requests.
#[derive(Debug)]
pub(crate) struct SessionWriter {
    tx: mpsc::Sender<SessionRow>,
    rx: Mutex<Option<mpsc::Receiver<SessionRow>>>,
}

impl SessionWriter {
    /// A queue of `cap` rows.
    pub(crate) fn new(cap: usize) -> SessionWriter {
        let (tx, rx) = mpsc::channel(cap.max(1));
        SessionWriter {
            tx,
            rx: Mutex::new(Some(rx)),
        }
    }

    /// Queues a row; `false` when the queue is full (the row is dropped).
    pub(crate) fn push(&self, row: SessionRow) -> bool {
        self.tx.try_send(row).is_ok()
    }

    /// The receiving side, taken once by the background writer.
    pub(crate) fn take_receiver(&self) -> Option<mpsc::Receiver<SessionRow>> {
        self.rx.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// Collects up to [`BATCH`] rows, waiting at most `linger` after the first.
pub(crate) async fn next_batch(
    rx: &mut mpsc::Receiver<SessionRow>,
    linger: Duration,
) -> Option<Vec<SessionRow>> {
    let first = rx.recv().await?;
    let mut batch = vec![first];
    let deadline = tokio::time::Instant::now() + linger;
    while batch.len() < BATCH {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(row)) => batch.push(row),
            Ok(None) | Err(_) => break,
        }
    }
    Some(batch)
}
