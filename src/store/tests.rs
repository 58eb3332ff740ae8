//! One suite, run against both engines: SQLite in a temp file and the real
//! PostgreSQL (a fresh database per test from `#[sqlx::test]`).

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::restore::RestoreOutcome;

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
    let w = |entries: Vec<(u64, String)>, state: Option<&str>| ThreadWrite {
        session_id: "s1".into(),
        thread_id: "t".into(),
        entries,
        base: None,
        state: state.map(str::to_owned),
        state_seq: 2,
        now: 10,
    };
    // s1 is at epoch 2 on b (the re-pin above).
    let fence = Fence::Epoch(2);
    let seed = row("s1", "b", 2);
    assert_eq!(
        s.append(&w(vec![e(1), e(2)], Some("{\"m\":1}")), &fence, &seed)
            .await
            .unwrap(),
        Appended::Head(2)
    );
    assert_eq!(
        s.append(&w(vec![e(2), e(4)], None), &fence, &seed)
            .await
            .unwrap(),
        Appended::Head(2),
        "gap at 3"
    );
    assert_eq!(
        s.append(&w(vec![e(3)], None), &fence, &seed).await.unwrap(),
        Appended::Head(4),
        "gap filled"
    );
    let head = s.thread_head("s1", "t").await.unwrap();
    assert_eq!((head.seq, head.body.as_deref()), (4, Some("{\"seq\":4}")));
    assert_eq!(s.thread_head("s1", "nope").await.unwrap(), Head::default());
    let threads = s.threads("s1").await.unwrap();
    assert_eq!(threads.len(), 1);
    assert_eq!(
        threads[0].state.as_deref(),
        Some("{\"m\":1}"),
        "state kept when not sent"
    );
    let bodies = s.entries("s1", "t", 4).await.unwrap();
    assert_eq!(bodies, (1..=4).map(|n| e(n).1).collect::<Vec<_>>());

    // The state follows the newest export: a late (older) one never rolls
    // it back.
    let with_state = |state: &str, state_seq: u64| ThreadWrite {
        state: Some(state.into()),
        state_seq,
        ..w(vec![], None)
    };
    s.append(&with_state("{\"v\":6}", 6), &fence, &seed)
        .await
        .unwrap();
    s.append(&with_state("{\"v\":4}", 4), &fence, &seed)
        .await
        .unwrap();
    assert_eq!(
        s.threads("s1").await.unwrap()[0].state.as_deref(),
        Some("{\"v\":6}"),
        "an older export's state is not written over a newer one"
    );

    // A write builds on the worker's entry at the stored head: another
    // entry there means the worker's thread diverged, and nothing is
    // written (no splice of two histories).
    let on = |at: u64, body: &str, entries: Vec<(u64, String)>| ThreadWrite {
        base: Some((at, body.into())),
        ..w(entries, None)
    };
    assert_eq!(
        s.append(
            &on(
                4,
                "{\"seq\":4,\"other\":1}",
                vec![(5, "{\"seq\":5}".into())]
            ),
            &fence,
            &seed
        )
        .await
        .unwrap(),
        Appended::Diverged
    );
    assert_eq!(
        s.thread_head("s1", "t").await.unwrap().seq,
        4,
        "nothing written"
    );
    // Nor on an entry the store does not hold: the entries would sit past
    // a gap that a later write could fill from another history.
    assert_eq!(
        s.append(
            &on(7, "{\"seq\":7}", vec![(8, "{\"seq\":8}".into())]),
            &fence,
            &seed
        )
        .await
        .unwrap(),
        Appended::Diverged
    );
    assert_eq!(
        s.entries("s1", "t", 9).await.unwrap().len(),
        4,
        "nothing written"
    );
    // The same JSON, re-serialised by the worker, is the same entry.
    assert_eq!(
        s.append(&on(4, "{ \"seq\" : 4 }", vec![]), &fence, &seed)
            .await
            .unwrap(),
        Appended::Head(4)
    );
    // The store follows a worker's diverged copy: replaced whole.
    let copy = ThreadWrite {
        entries: vec![
            (1, "{\"seq\":1,\"own\":true}".into()),
            (2, "{\"seq\":2}".into()),
        ],
        state: Some("{\"v\":1}".into()),
        state_seq: 2,
        ..w(vec![], None)
    };
    assert_eq!(
        s.replace_thread(&copy, &fence, &seed).await.unwrap(),
        Appended::Head(2)
    );
    assert_eq!(
        s.entries("s1", "t", 9).await.unwrap(),
        vec![
            "{\"seq\":1,\"own\":true}".to_owned(),
            "{\"seq\":2}".to_owned()
        ]
    );
    assert_eq!(
        s.threads("s1").await.unwrap()[0].state.as_deref(),
        Some("{\"v\":1}")
    );
    // Back to the four entries the rest of this suite expects.
    let four = ThreadWrite {
        entries: (1..=4).map(e).collect(),
        ..w(vec![], None)
    };
    s.replace_thread(&four, &fence, &seed).await.unwrap();
    // A copy without state replaces the old state too: the state belonged
    // to the history that was replaced.
    assert_eq!(s.threads("s1").await.unwrap()[0].state, None);

    // Fencing: a capture taken under an older pin, or from a worker the
    // session left, is refused and writes nothing.
    let stale = ThreadWrite {
        entries: vec![(5, "{\"seq\":5,\"from\":\"old\"}".into())],
        ..w(vec![], None)
    };
    assert_eq!(
        s.append(&stale, &Fence::Epoch(1), &seed).await.unwrap(),
        Appended::Fenced {
            epoch: 2,
            backend: "b".into()
        }
    );
    assert_eq!(
        s.append(&stale, &Fence::Holder("a".into()), &seed)
            .await
            .unwrap(),
        Appended::Fenced {
            epoch: 2,
            backend: "b".into()
        }
    );
    assert_eq!(
        s.thread_head("s1", "t").await.unwrap().seq,
        4,
        "nothing written"
    );
    assert_eq!(
        s.append(&stale, &Fence::Holder("b".into()), &seed)
            .await
            .unwrap(),
        Appended::Head(5),
        "the current holder writes"
    );
    // A capture of a session the store has no row for yet creates the row
    // from its seed, so a later re-pin fences it too.
    let fresh = ThreadWrite {
        session_id: "s3".into(),
        ..w(vec![e(1)], None)
    };
    assert_eq!(
        s.append(&fresh, &Fence::Epoch(1), &row("s3", "a", 1))
            .await
            .unwrap(),
        Appended::Head(1)
    );
    let got = s.session("s3").await.unwrap().unwrap();
    assert_eq!((got.backend_id.as_str(), got.epoch), ("a", 1));
    assert_eq!(s.repin(&row("s3", "b", 2), 1).await.unwrap(), Repin::Won);
    assert!(matches!(
        s.append(&fresh, &Fence::Epoch(1), &row("s3", "a", 1))
            .await
            .unwrap(),
        Appended::Fenced { epoch: 2, .. }
    ));

    // Restore log.
    let id = s
        .record_restore(&RestoreRow {
            session_id: "s1".into(),
            epoch: 2,
            from_backend: "a".into(),
            to_backend: "b".into(),
            threads: 0,
            outcome: RestoreOutcome::Running,
            started_at: 100,
            duration_ms: 0,
        })
        .await
        .unwrap();
    assert_eq!(
        s.restore_outcome("s1", 2).await.unwrap(),
        Some(RestoreOutcome::Running)
    );
    s.finish_restore(id, RestoreOutcome::Restored, 12, 3)
        .await
        .unwrap();
    assert_eq!(
        s.restore_outcome("s1", 2).await.unwrap(),
        Some(RestoreOutcome::Restored)
    );
    assert_eq!(s.restore_outcome("s1", 3).await.unwrap(), None);

    // Janitor.
    assert_eq!(s.expire(1001).await.unwrap(), 3);
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
