//! One suite, run against both engines: SQLite in a temp file and the real
//! PostgreSQL (a fresh database per test from `#[sqlx::test]`).

use std::sync::Arc;
use std::time::Duration;

use super::*;

fn row(id: &str, backend: &str, epoch: u64) -> SessionRow {
    SessionRow {
        session_id: id.into(),
        backend_id: backend.into(),
        instance: String::new(),
        epoch,
        created_at: 100,
        last_seen: 100,
        expires_at: 1000,
    }
}

async fn suite(s: Arc<dyn Store>) {
    s.ping().await.unwrap();
    // Sessions: insert, touch never moves a pin.
    s.touch_sessions(&[row("s1", "a", 1)]).await.unwrap();
    let mut later = row("s1", "b", 5);
    later.last_seen = 200;
    s.touch_sessions(&[later]).await.unwrap();
    let got = s.session("s1").await.unwrap().unwrap();
    assert_eq!(
        (got.backend_id.as_str(), got.epoch, got.last_seen),
        ("a", 1, 200)
    );

    // Re-pin CAS: one winner per expected epoch.
    assert_eq!(s.repin(&row("s1", "b", 2), 1).await.unwrap(), Repin::Won);
    match s.repin(&row("s1", "c", 2), 1).await.unwrap() {
        Repin::Lost(w) => assert_eq!((w.backend_id.as_str(), w.epoch), ("b", 2)),
        Repin::Won => panic!("two winners for epoch 1"),
    }
    // An unknown session is won by insert.
    assert_eq!(s.repin(&row("s2", "a", 2), 1).await.unwrap(), Repin::Won);

    // Append: duplicates ignored, head advances over contiguous seqs only.
    let e = |n: u64| (n, format!("{{\"seq\":{n}}}"));
    assert_eq!(
        s.append("s1", "t", &[e(1), e(2)], Some("{\"m\":1}"), 10)
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        s.append("s1", "t", &[e(2), e(4)], None, 11).await.unwrap(),
        2,
        "gap at 3"
    );
    assert_eq!(
        s.append("s1", "t", &[e(3)], None, 12).await.unwrap(),
        4,
        "gap filled"
    );
    assert_eq!(s.thread_seq("s1", "t").await.unwrap(), 4);
    assert_eq!(s.thread_seq("s1", "nope").await.unwrap(), 0);
    let threads = s.threads("s1").await.unwrap();
    assert_eq!(threads.len(), 1);
    assert_eq!(
        threads[0].state.as_deref(),
        Some("{\"m\":1}"),
        "state kept when not sent"
    );
    let bodies = s.entries("s1", "t", 4).await.unwrap();
    assert_eq!(bodies, (1..=4).map(|n| e(n).1).collect::<Vec<_>>());

    // Restore log.
    let id = s
        .record_restore(&RestoreRow {
            session_id: "s1".into(),
            epoch: 2,
            from_backend: "a".into(),
            to_backend: "b".into(),
            threads: 1,
            outcome: "running".into(),
            started_at: 100,
            duration_ms: 0,
        })
        .await
        .unwrap();
    s.finish_restore(id, "ok", 12).await.unwrap();
    assert_eq!(
        s.restore_outcome("s1", 2).await.unwrap().as_deref(),
        Some("ok")
    );
    assert_eq!(s.restore_outcome("s1", 3).await.unwrap(), None);

    // Janitor.
    assert_eq!(s.expire(1001).await.unwrap(), 2);
    assert!(s.session("s1").await.unwrap().is_none());
    assert!(s.threads("s1").await.unwrap().is_empty());
}

#[tokio::test]
async fn sqlite_store() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/sub/tether.db", dir.path().display());
    std::fs::create_dir_all(dir.path().join("sub")).unwrap();
    let s = connect(&url, Duration::from_secs(5)).await.unwrap();
    assert_eq!(s.kind(), "sqlite");
    suite(s).await;
}

#[sqlx::test(migrations = false)]
async fn postgres_store(pool: sqlx::PgPool) {
    let s = PgStore::from_pool(pool).await.unwrap();
    suite(Arc::new(s)).await;
}

#[test]
fn redacts_passwords() {
    assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
    assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
    assert_eq!(redact("sqlite://x.db"), "sqlite://x.db");
}
