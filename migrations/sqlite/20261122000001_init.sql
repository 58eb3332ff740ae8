-- tether store schema (SQLite). Times are Unix seconds from tether's
-- wall clock, so every replica and both engines agree.
CREATE TABLE IF NOT EXISTS tether_sessions (
    session_id TEXT PRIMARY KEY,
    backend_id TEXT NOT NULL,
    instance   TEXT NOT NULL DEFAULT '',
    epoch      BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    last_seen  BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS tether_sessions_expires ON tether_sessions (expires_at);

CREATE TABLE IF NOT EXISTS tether_threads (
    session_id TEXT NOT NULL,
    thread_id  TEXT NOT NULL,
    seq        BIGINT NOT NULL,
    state      TEXT,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (session_id, thread_id)
);

CREATE TABLE IF NOT EXISTS tether_entries (
    session_id TEXT NOT NULL,
    thread_id  TEXT NOT NULL,
    seq        BIGINT NOT NULL,
    body       TEXT NOT NULL,
    PRIMARY KEY (session_id, thread_id, seq)
);

CREATE TABLE IF NOT EXISTS tether_restores (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id   TEXT NOT NULL,
    epoch        BIGINT NOT NULL,
    from_backend TEXT NOT NULL,
    to_backend   TEXT NOT NULL,
    threads      BIGINT NOT NULL,
    outcome      TEXT NOT NULL,
    started_at   BIGINT NOT NULL,
    duration_ms  BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS tether_restores_session ON tether_restores (session_id, epoch);
