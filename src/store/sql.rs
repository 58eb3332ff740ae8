//! The SQL behind [`Store`], one implementation for both engines. The
//! statements are portable (`$n` placeholders in first-use order, `ON
//! CONFLICT`, `RETURNING`), so a macro stamps out the two pool types.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::Row;

use super::{
    same_entry, Appended, Fence, Head, Repin, RestoreRow, SessionRow, Store, StoreError,
    StoreFuture, ThreadRow, ThreadWrite,
};
use crate::restore::RestoreOutcome;

/// PostgreSQL store (shared by replicas).
#[derive(Debug, Clone)]
pub(crate) struct PgStore {
    pool: sqlx::PgPool,
}

/// SQLite store (single node).
#[derive(Debug, Clone)]
pub(crate) struct SqliteStore {
    pool: sqlx::SqlitePool,
}

impl PgStore {
    /// Connects and migrates.
    pub(crate) async fn connect(
        url: &str,
        acquire_timeout: Duration,
    ) -> Result<PgStore, StoreError> {
        let opts = PgConnectOptions::from_str(url)?;
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(acquire_timeout)
            .connect_with(opts)
            .await?;
        Self::from_pool(pool).await
    }

    /// Wraps an existing pool and migrates (tests use `#[sqlx::test]` pools).
    pub(crate) async fn from_pool(pool: sqlx::PgPool) -> Result<PgStore, StoreError> {
        sqlx::migrate!("migrations/postgres").run(&pool).await?;
        Ok(PgStore { pool })
    }
}

impl SqliteStore {
    /// Opens (creating if missing) and migrates.
    pub(crate) async fn connect(
        url: &str,
        acquire_timeout: Duration,
    ) -> Result<SqliteStore, StoreError> {
        let opts = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(acquire_timeout);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(acquire_timeout)
            .connect_with(opts)
            .await?;
        Self::from_pool(pool).await
    }

    /// Wraps an existing pool and migrates.
    pub(crate) async fn from_pool(pool: sqlx::SqlitePool) -> Result<SqliteStore, StoreError> {
        sqlx::migrate!("migrations/sqlite").run(&pool).await?;
        Ok(SqliteStore { pool })
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

const SESSION_COLUMNS: &str =
    "session_id, backend_id, instance, epoch, created_at, last_seen, expires_at";

macro_rules! session_from_row {
    ($row:expr) => {
        SessionRow {
            session_id: $row.try_get("session_id")?,
            backend_id: $row.try_get("backend_id")?,
            instance: $row.try_get("instance")?,
            epoch: to_u64($row.try_get("epoch")?),
            created_at: to_u64($row.try_get("created_at")?),
            last_seen: to_u64($row.try_get("last_seen")?),
            expires_at: to_u64($row.try_get("expires_at")?),
        }
    };
}

macro_rules! impl_store {
    ($ty:ty, $kind:literal, $notifies:expr, $pg:expr) => {
        impl $ty {
            /// A fenced write of a thread's new entries (`replace`: the
            /// entries are the whole thread and take the stored one's place).
            async fn write_thread(&self, w: &ThreadWrite, fence: &Fence, seed: &SessionRow, replace: bool) -> Result<Appended, StoreError> {
                {
                    let mut tx = self.pool.begin().await?;
                    // Lock the session's row first (a write: PostgreSQL takes
                    // the row lock, SQLite the database write lock), so a
                    // concurrent re-pin either commits before this check or
                    // waits for this transaction.
                    let pin = sqlx::query(
                        "INSERT INTO tether_sessions (session_id, backend_id, instance, epoch, created_at, last_seen, expires_at) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7) \
                         ON CONFLICT (session_id) DO UPDATE SET last_seen = tether_sessions.last_seen \
                         RETURNING epoch, backend_id",
                    )
                    .bind(&seed.session_id)
                    .bind(&seed.backend_id)
                    .bind(&seed.instance)
                    .bind(to_i64(seed.epoch))
                    .bind(to_i64(seed.created_at))
                    .bind(to_i64(seed.last_seen))
                    .bind(to_i64(seed.expires_at))
                    .fetch_one(&mut *tx)
                    .await?;
                    let epoch = to_u64(pin.try_get("epoch")?);
                    let backend: String = pin.try_get("backend_id")?;
                    if fence.refuses(epoch, &backend) {
                        tx.rollback().await?;
                        return Ok(Appended::Fenced { epoch, backend });
                    }
                    if replace {
                        // The worker's copy replaces the stored thread: the
                        // store mirrors what its user now sees.
                        sqlx::query("DELETE FROM tether_entries WHERE session_id = $1 AND thread_id = $2")
                            .bind(&w.session_id)
                            .bind(&w.thread_id)
                            .execute(&mut *tx)
                            .await?;
                    } else if let Some((at, theirs)) = &w.base {
                        // The entries build on the worker's entry at `at`:
                        // the store must hold the same one there.
                        let ours = sqlx::query("SELECT body FROM tether_entries WHERE session_id = $1 AND thread_id = $2 AND seq = $3")
                            .bind(&w.session_id)
                            .bind(&w.thread_id)
                            .bind(to_i64(*at))
                            .fetch_optional(&mut *tx)
                            .await?;
                        if let Some(row) = ours {
                            let ours: String = row.try_get("body")?;
                            if !same_entry(&ours, theirs) {
                                tx.rollback().await?;
                                return Ok(Appended::Diverged);
                            }
                        } else if *at > 0 {
                            // Built on an entry the store lacks: written, they
                            // would sit past a gap another history could fill.
                            tx.rollback().await?;
                            return Ok(Appended::Diverged);
                        }
                    }
                    for (seq, body) in &w.entries {
                        sqlx::query(
                            "INSERT INTO tether_entries (session_id, thread_id, seq, body) VALUES ($1, $2, $3, $4) \
                             ON CONFLICT (session_id, thread_id, seq) DO NOTHING",
                        )
                        .bind(&w.session_id)
                        .bind(&w.thread_id)
                        .bind(to_i64(*seq))
                        .bind(body)
                        .execute(&mut *tx)
                        .await?;
                    }
                    let head = sqlx::query("SELECT seq FROM tether_threads WHERE session_id = $1 AND thread_id = $2")
                        .bind(&w.session_id)
                        .bind(&w.thread_id)
                        .fetch_optional(&mut *tx)
                        .await?;
                    let mut seq = match head {
                        Some(r) if !replace => to_u64(r.try_get("seq")?),
                        _ => 0,
                    };
                    // Advance only over contiguous entries: a gap stops the head.
                    let later = sqlx::query(
                        "SELECT seq FROM tether_entries WHERE session_id = $1 AND thread_id = $2 AND seq > $3 ORDER BY seq",
                    )
                    .bind(&w.session_id)
                    .bind(&w.thread_id)
                    .bind(to_i64(seq))
                    .fetch_all(&mut *tx)
                    .await?;
                    for r in later {
                        let s = to_u64(r.try_get("seq")?);
                        if s != seq + 1 {
                            break;
                        }
                        seq = s;
                    }
                    // The state follows the newest export that carried one;
                    // a replaced thread takes the worker's state, even none.
                    sqlx::query(
                        "INSERT INTO tether_threads (session_id, thread_id, seq, state, state_seq, updated_at) VALUES ($1, $2, $3, $4, $5, $6) \
                         ON CONFLICT (session_id, thread_id) DO UPDATE SET \
                           seq = CASE WHEN $7 OR excluded.seq > tether_threads.seq THEN excluded.seq ELSE tether_threads.seq END, \
                           state = CASE WHEN $7 THEN excluded.state \
                                        WHEN excluded.state IS NOT NULL AND excluded.state_seq >= tether_threads.state_seq \
                                        THEN excluded.state ELSE tether_threads.state END, \
                           state_seq = CASE WHEN $7 THEN excluded.state_seq \
                                        WHEN excluded.state IS NOT NULL AND excluded.state_seq > tether_threads.state_seq \
                                        THEN excluded.state_seq ELSE tether_threads.state_seq END, \
                           updated_at = excluded.updated_at",
                    )
                    .bind(&w.session_id)
                    .bind(&w.thread_id)
                    .bind(to_i64(seq))
                    .bind(w.state.as_deref())
                    .bind(to_i64(if w.state.is_some() { w.state_seq } else { 0 }))
                    .bind(to_i64(w.now))
                    .bind(replace)
                    .execute(&mut *tx)
                    .await?;
                    tx.commit().await?;
                    Ok(Appended::Head(seq))
                }
            }
        }

        impl Store for $ty {
            fn pg_pool(&self) -> Option<sqlx::PgPool> {
                $pg(self)
            }

            fn kind(&self) -> &'static str {
                $kind
            }

            fn notifies(&self) -> bool {
                $notifies
            }

            fn ping(&self) -> StoreFuture<'_, ()> {
                Box::pin(async move {
                    sqlx::query("SELECT 1").execute(&self.pool).await?;
                    Ok(())
                })
            }

            fn session<'a>(&'a self, session_id: &'a str) -> StoreFuture<'a, Option<SessionRow>> {
                Box::pin(async move {
                    let sql = format!("SELECT {SESSION_COLUMNS} FROM tether_sessions WHERE session_id = $1");
                    let row = sqlx::query(&sql).bind(session_id).fetch_optional(&self.pool).await?;
                    Ok(match row {
                        Some(r) => Some(session_from_row!(r)),
                        None => None,
                    })
                })
            }

            fn touch_sessions<'a>(&'a self, rows: &'a [SessionRow]) -> StoreFuture<'a, ()> {
                Box::pin(async move {
                    let mut tx = self.pool.begin().await?;
                    for r in rows {
                        sqlx::query(
                            "INSERT INTO tether_sessions (session_id, backend_id, instance, epoch, created_at, last_seen, expires_at) \
                             VALUES ($1, $2, $3, $4, $5, $6, $7) \
                             ON CONFLICT (session_id) DO UPDATE SET \
                               last_seen = CASE WHEN excluded.last_seen > tether_sessions.last_seen THEN excluded.last_seen ELSE tether_sessions.last_seen END, \
                               expires_at = CASE WHEN excluded.expires_at > tether_sessions.expires_at THEN excluded.expires_at ELSE tether_sessions.expires_at END",
                        )
                        .bind(&r.session_id)
                        .bind(&r.backend_id)
                        .bind(&r.instance)
                        .bind(to_i64(r.epoch))
                        .bind(to_i64(r.created_at))
                        .bind(to_i64(r.last_seen))
                        .bind(to_i64(r.expires_at))
                        .execute(&mut *tx)
                        .await?;
                    }
                    tx.commit().await?;
                    Ok(())
                })
            }

            fn repin<'a>(&'a self, row: &'a SessionRow, expected: u64) -> StoreFuture<'a, Repin> {
                Box::pin(async move {
                    let won = sqlx::query(
                        "INSERT INTO tether_sessions (session_id, backend_id, instance, epoch, created_at, last_seen, expires_at) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7) \
                         ON CONFLICT (session_id) DO UPDATE SET \
                           backend_id = excluded.backend_id, instance = excluded.instance, \
                           epoch = excluded.epoch, last_seen = excluded.last_seen \
                         WHERE tether_sessions.epoch = $8 \
                         RETURNING epoch",
                    )
                    .bind(&row.session_id)
                    .bind(&row.backend_id)
                    .bind(&row.instance)
                    .bind(to_i64(row.epoch))
                    .bind(to_i64(row.created_at))
                    .bind(to_i64(row.last_seen))
                    .bind(to_i64(row.expires_at))
                    .bind(to_i64(expected))
                    .fetch_optional(&self.pool)
                    .await?;
                    if won.is_some() {
                        return Ok(Repin::Won);
                    }
                    match self.session(&row.session_id).await? {
                        Some(current) => Ok(Repin::Lost(current)),
                        // Deleted between the two statements (janitor): retry
                        // as a plain insert by reporting a win is unsafe, so
                        // report the row we tried as the winner's.
                        None => Ok(Repin::Lost(row.clone())),
                    }
                })
            }

            fn threads<'a>(&'a self, session_id: &'a str) -> StoreFuture<'a, Vec<ThreadRow>> {
                Box::pin(async move {
                    let rows = sqlx::query(
                        "SELECT thread_id, seq, state FROM tether_threads WHERE session_id = $1 ORDER BY thread_id",
                    )
                    .bind(session_id)
                    .fetch_all(&self.pool)
                    .await?;
                    let mut out = Vec::with_capacity(rows.len());
                    for r in rows {
                        out.push(ThreadRow {
                            thread_id: r.try_get("thread_id")?,
                            seq: to_u64(r.try_get("seq")?),
                            state: r.try_get("state")?,
                        });
                    }
                    Ok(out)
                })
            }

            fn entries<'a>(&'a self, session_id: &'a str, thread_id: &'a str, upto: u64) -> StoreFuture<'a, Vec<String>> {
                Box::pin(async move {
                    let rows = sqlx::query(
                        "SELECT body FROM tether_entries WHERE session_id = $1 AND thread_id = $2 AND seq <= $3 ORDER BY seq",
                    )
                    .bind(session_id)
                    .bind(thread_id)
                    .bind(to_i64(upto))
                    .fetch_all(&self.pool)
                    .await?;
                    rows.iter().map(|r| r.try_get("body").map_err(StoreError::from)).collect()
                })
            }

            fn thread_head<'a>(&'a self, session_id: &'a str, thread_id: &'a str) -> StoreFuture<'a, Head> {
                Box::pin(async move {
                    let row = sqlx::query(
                        "SELECT t.seq AS seq, e.body AS body FROM tether_threads t \
                         LEFT JOIN tether_entries e ON e.session_id = t.session_id AND e.thread_id = t.thread_id AND e.seq = t.seq \
                         WHERE t.session_id = $1 AND t.thread_id = $2",
                    )
                    .bind(session_id)
                    .bind(thread_id)
                    .fetch_optional(&self.pool)
                    .await?;
                    Ok(match row {
                        Some(r) => Head {
                            seq: to_u64(r.try_get("seq")?),
                            body: r.try_get("body")?,
                        },
                        None => Head::default(),
                    })
                })
            }

            fn append<'a>(&'a self, w: &'a ThreadWrite, fence: &'a Fence, seed: &'a SessionRow) -> StoreFuture<'a, Appended> {
                Box::pin(self.write_thread(w, fence, seed, false))
            }

            fn replace_thread<'a>(&'a self, w: &'a ThreadWrite, fence: &'a Fence, seed: &'a SessionRow) -> StoreFuture<'a, Appended> {
                Box::pin(self.write_thread(w, fence, seed, true))
            }

            fn record_restore<'a>(&'a self, r: &'a RestoreRow) -> StoreFuture<'a, i64> {
                Box::pin(async move {
                    let row = sqlx::query(
                        "INSERT INTO tether_restores (session_id, epoch, from_backend, to_backend, threads, outcome, started_at, duration_ms) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
                    )
                    .bind(&r.session_id)
                    .bind(to_i64(r.epoch))
                    .bind(&r.from_backend)
                    .bind(&r.to_backend)
                    .bind(to_i64(r.threads))
                    .bind(r.outcome.as_str())
                    .bind(to_i64(r.started_at))
                    .bind(to_i64(r.duration_ms))
                    .fetch_one(&self.pool)
                    .await?;
                    Ok(row.try_get("id")?)
                })
            }

            fn finish_restore(&self, id: i64, outcome: RestoreOutcome, duration_ms: u64, threads: u64) -> StoreFuture<'_, ()> {
                Box::pin(async move {
                    sqlx::query("UPDATE tether_restores SET outcome = $1, duration_ms = $2, threads = $3 WHERE id = $4")
                        .bind(outcome.as_str())
                        .bind(to_i64(duration_ms))
                        .bind(to_i64(threads))
                        .bind(id)
                        .execute(&self.pool)
                        .await?;
                    Ok(())
                })
            }

            fn restore_outcome<'a>(&'a self, session_id: &'a str, epoch: u64) -> StoreFuture<'a, Option<RestoreOutcome>> {
                Box::pin(async move {
                    let row = sqlx::query(
                        "SELECT outcome FROM tether_restores WHERE session_id = $1 AND epoch = $2 ORDER BY id DESC LIMIT 1",
                    )
                    .bind(session_id)
                    .bind(to_i64(epoch))
                    .fetch_optional(&self.pool)
                    .await?;
                    Ok(match row {
                        Some(r) => RestoreOutcome::parse(r.try_get("outcome")?),
                        None => None,
                    })
                })
            }

            fn expire(&self, before: u64) -> StoreFuture<'_, u64> {
                Box::pin(async move {
                    let mut tx = self.pool.begin().await?;
                    let gone = "SELECT session_id FROM tether_sessions WHERE expires_at < $1";
                    for table in ["tether_entries", "tether_threads", "tether_restores"] {
                        sqlx::query(&format!("DELETE FROM {table} WHERE session_id IN ({gone})"))
                            .bind(to_i64(before))
                            .execute(&mut *tx)
                            .await?;
                    }
                    let n = sqlx::query("DELETE FROM tether_sessions WHERE expires_at < $1")
                        .bind(to_i64(before))
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                    tx.commit().await?;
                    Ok(n)
                })
            }

            fn announce<'a>(&'a self, row: &'a SessionRow) -> StoreFuture<'a, ()> {
                Box::pin(async move {
                    if $notifies {
                        let payload = format!("{} {} {} {}", row.session_id, row.epoch, row.backend_id, row.instance);
                        sqlx::query("SELECT pg_notify('tether_repin', $1)")
                            .bind(payload)
                            .execute(&self.pool)
                            .await?;
                    }
                    Ok(())
                })
            }
        }
    };
}

impl_store!(PgStore, "postgres", true, |s: &PgStore| Some(
    s.pool.clone()
));
impl_store!(SqliteStore, "sqlite", false, |_: &SqliteStore| None);
