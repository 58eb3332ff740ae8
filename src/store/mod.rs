//! The store: sessions (pins every replica agrees on), thread snapshots
//! and the restore log, in PostgreSQL (production, shared by replicas) or
//! SQLite (embedded single-node default).
//!
//! Both engines run the same SQL through one macro-generated
//! implementation ([`sql`]); migrations are embedded and applied at start
//! (sqlx takes an advisory lock on PostgreSQL).

mod sql;

#[cfg(test)]
mod tests;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

pub(crate) use sql::{PgStore, SqliteStore};

use crate::restore::RestoreOutcome;

/// A store operation's future.
pub(crate) type StoreFuture<'a, T> =
    Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    /// The database failed or could not be reached.
    #[error("store: {0}")]
    Db(#[from] sqlx::Error),
    /// Migrations failed.
    #[error("store migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The store URL is not understood.
    #[error("state.store: {0}")]
    Url(String),
    /// The operation did not finish before its deadline.
    #[error("store: no answer before the deadline")]
    Timeout,
    /// No store is connected (it was unreachable since tether started).
    #[error("store: not connected")]
    Unavailable,
}

/// What makes a capture write legitimate: the pin it was taken under. A
/// session that moved on (a newer epoch, or another worker) refuses writes
/// from the worker it left, so a late capture can never write into history
/// the session's new worker is extending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fence {
    /// Taken from a response to a request under this pin epoch: refused
    /// when the stored epoch is newer.
    Epoch(u64),
    /// Reported by this worker's change feed (no epoch known): refused when
    /// the session is pinned to another worker.
    Holder(String),
}

/// The result of a fenced append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Appended {
    /// Written; the thread's contiguous head seq now.
    Head(u64),
    /// Refused: the store holds another entry where the write builds on
    /// the worker's (`ThreadWrite::base`): the worker's thread diverged.
    Diverged,
    /// Refused: the session moved on to this pin.
    Fenced {
        /// The stored epoch.
        epoch: u64,
        /// The stored backend.
        backend: String,
    },
}

impl Fence {
    /// Whether a write under this fence is refused by the stored pin.
    pub(crate) fn refuses(&self, stored_epoch: u64, stored_backend: &str) -> bool {
        match self {
            Fence::Epoch(e) => stored_epoch > *e,
            Fence::Holder(b) => stored_backend != b,
        }
    }
}

/// A session's pin as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SessionRow {
    /// Session id (32 hex digits).
    pub session_id: String,
    /// Pinned backend.
    pub backend_id: String,
    /// Worker instance tag when pinned.
    pub instance: String,
    /// Pin epoch.
    pub epoch: u64,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds.
    pub last_seen: u64,
    /// Unix seconds.
    pub expires_at: u64,
}

/// The result of a re-pin compare-and-set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Repin {
    /// This replica moved the session: it must restore.
    Won,
    /// Another replica moved it first: follow its row.
    Lost(SessionRow),
}

/// A stored thread's head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ThreadRow {
    /// Thread id.
    pub thread_id: String,
    /// Highest contiguous stored seq.
    pub seq: u64,
    /// Opaque state JSON, if any.
    pub state: Option<String>,
}

/// New entries of one thread, as a capture pulled them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ThreadWrite {
    /// Session id (hex).
    pub session_id: String,
    /// Thread id.
    pub thread_id: String,
    /// `(seq, entry JSON)`, ascending.
    pub entries: Vec<(u64, String)>,
    /// The worker's entry the new ones build on (`seq`, JSON): the write
    /// is refused when the store holds another entry at that seq.
    pub base: Option<(u64, String)>,
    /// The thread's opaque state JSON, if the worker sent one.
    pub state: Option<String>,
    /// The worker's head seq when it exported that state: a state is kept
    /// only over an older one.
    pub state_seq: u64,
    /// Unix seconds.
    pub now: u64,
}

/// A stored thread's head: its contiguous seq and the body of that entry.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Head {
    /// Highest contiguous stored seq (0 when unknown).
    pub(crate) seq: u64,
    /// The entry at `seq`, to check a worker still holds the same thread.
    pub(crate) body: Option<String>,
}

/// One restore, as logged in `tether_restores`.
#[derive(Debug, Clone)]
pub(crate) struct RestoreRow {
    /// Session id.
    pub session_id: String,
    /// The epoch restored into.
    pub epoch: u64,
    /// Backend the session came from.
    pub from_backend: String,
    /// Backend restored into.
    pub to_backend: String,
    /// Threads sent.
    pub threads: u64,
    /// How it ended (`running` while it runs).
    pub outcome: RestoreOutcome,
    /// Unix seconds.
    pub started_at: u64,
    /// Duration.
    pub duration_ms: u64,
}

/// What tether needs from a store. Object-safe, so one `Arc<dyn Store>`
/// serves both engines.
pub(crate) trait Store: Send + Sync + std::fmt::Debug {
    /// `postgres` or `sqlite`.
    fn kind(&self) -> &'static str;
    /// Whether `LISTEN/NOTIFY` is available (PostgreSQL).
    fn notifies(&self) -> bool;
    /// A cheap round trip.
    fn ping(&self) -> StoreFuture<'_, ()>;
    /// The session's row.
    fn session<'a>(&'a self, session_id: &'a str) -> StoreFuture<'a, Option<SessionRow>>;
    /// Inserts new sessions and refreshes `last_seen`/`expires_at` of known
    /// ones (never lowers an epoch or moves a pin).
    fn touch_sessions<'a>(&'a self, rows: &'a [SessionRow]) -> StoreFuture<'a, ()>;
    /// Moves the session to `row` if its stored epoch is still `expected`
    /// (or it is not stored yet); `row.epoch` is the new epoch.
    fn repin<'a>(&'a self, row: &'a SessionRow, expected: u64) -> StoreFuture<'a, Repin>;
    /// The session's stored threads.
    fn threads<'a>(&'a self, session_id: &'a str) -> StoreFuture<'a, Vec<ThreadRow>>;
    /// Entry bodies `1..=upto` of a thread, in order.
    fn entries<'a>(
        &'a self,
        session_id: &'a str,
        thread_id: &'a str,
        upto: u64,
    ) -> StoreFuture<'a, Vec<String>>;
    /// The thread's stored head (seq 0 when unknown).
    fn thread_head<'a>(&'a self, session_id: &'a str, thread_id: &'a str) -> StoreFuture<'a, Head>;
    /// Appends entries (`ON CONFLICT DO NOTHING`), advances the thread's seq
    /// over contiguous entries only, stores `state` when given; returns the
    /// new head seq. Fenced: in the same transaction the session's row is
    /// locked (inserted from `seed` when absent) and the write is refused
    /// when `fence` says the session moved on.
    fn append<'a>(
        &'a self,
        write: &'a ThreadWrite,
        fence: &'a Fence,
        seed: &'a SessionRow,
    ) -> StoreFuture<'a, Appended>;
    /// Like [`Store::append`], but `write.entries` are the whole thread
    /// (from seq 1) and replace the stored ones: a worker that kept its own
    /// copy of a thread is what its user sees, so the store follows it.
    fn replace_thread<'a>(
        &'a self,
        write: &'a ThreadWrite,
        fence: &'a Fence,
        seed: &'a SessionRow,
    ) -> StoreFuture<'a, Appended>;
    /// Logs a restore; returns its id.
    fn record_restore<'a>(&'a self, row: &'a RestoreRow) -> StoreFuture<'a, i64>;
    /// Sets a logged restore's outcome, duration and threads sent.
    fn finish_restore(
        &self,
        id: i64,
        outcome: RestoreOutcome,
        duration_ms: u64,
        threads: u64,
    ) -> StoreFuture<'_, ()>;
    /// The latest outcome of restores of `session_id` into `epoch`
    /// (`None` when none was logged).
    fn restore_outcome<'a>(
        &'a self,
        session_id: &'a str,
        epoch: u64,
    ) -> StoreFuture<'a, Option<RestoreOutcome>>;
    /// Deletes sessions (and their threads) that expired before `before`.
    fn expire(&self, before: u64) -> StoreFuture<'_, u64>;
    /// The PostgreSQL pool, for `LISTEN` (None for SQLite).
    fn pg_pool(&self) -> Option<sqlx::PgPool>;
    /// Announces a re-pin to other replicas (no-op without NOTIFY).
    fn announce<'a>(&'a self, row: &'a SessionRow) -> StoreFuture<'a, ()>;
}

/// Whether two entry texts are the same JSON (a worker may re-serialise
/// what it was given: key order and spacing do not matter).
pub(crate) fn same_entry(a: &str, b: &str) -> bool {
    if a == b {
        return true;
    }
    match (
        serde_json::from_str::<serde_json::Value>(a),
        serde_json::from_str::<serde_json::Value>(b),
    ) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// Opens the store named by `state.store`, creating a SQLite file if
/// missing, and runs migrations.
pub(crate) async fn connect(
    url: &str,
    acquire_timeout: Duration,
) -> Result<Arc<dyn Store>, StoreError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PgStore::connect(url, acquire_timeout).await?))
    } else if url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::connect(url, acquire_timeout).await?))
    } else {
        Err(StoreError::Url(format!(
            "unsupported store URL scheme in {:?}",
            redact(url)
        )))
    }
}

/// A URL with any password replaced, for logs and errors.
pub(crate) fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{}:***{}", &url[..s + 3], user, &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}
