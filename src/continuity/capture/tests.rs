use super::*;

fn source(backend: &str, epoch: u64) -> Source {
    Source {
        backend: backend.into(),
        instance: Some(Arc::from("i1")),
        fence: Fence::Epoch(epoch),
    }
}

fn hint(session: &str, thread: &str, seq: u64) -> Hint {
    Hint {
        session: Arc::from(session),
        thread: Arc::from(thread),
        seq,
        source: source("a", 1),
    }
}

fn key(session: &str, thread: &str) -> Key {
    (Arc::from(session), Arc::from(thread))
}

#[tokio::test]
async fn a_stored_thread_leaves_the_ledger() {
    let q = CaptureQueue::new(10);
    q.push(hint("s", "t", 2));
    q.push(hint("s", "t", 4));
    assert_eq!(q.len(), 1, "one pull per thread");
    let (k, src, _) = q.pop().await;
    assert_eq!(src, source("a", 1));
    assert_eq!(q.pending("s")[0].acked, 4, "acknowledged = the highest seq");
    assert_eq!(q.done(&k, Pulled::Head(3)), None);
    assert_eq!(
        q.pending("s").len(),
        1,
        "stored short of what was acknowledged"
    );
    q.push(hint("s", "t", 4));
    let (k, _, _) = q.pop().await;
    q.done(&k, Pulled::Head(4));
    assert!(q.pending("s").is_empty());
    assert_eq!(q.len(), 0);
}

#[tokio::test]
async fn a_hint_during_a_pull_queues_the_thread_again() {
    let q = CaptureQueue::new(10);
    q.push(hint("s", "t", 2));
    let (k, _, _) = q.pop().await;
    q.push(hint("s", "t", 6));
    assert_eq!(q.running("s"), 1);
    q.done(&k, Pulled::Head(2));
    let (k2, _, _) = q.pop().await;
    assert_eq!(k2, k);
    q.done(&k2, Pulled::Head(6));
    assert!(q.pending("s").is_empty());
}

#[tokio::test]
async fn failures_back_off_then_stop_but_stay_acknowledged() {
    let q = CaptureQueue::new(10);
    q.push(hint("s", "t", 2));
    let mut waits = Vec::new();
    loop {
        let (k, _, _) = q.pop().await;
        match q.done(&k, Pulled::Failed) {
            Some(w) => {
                waits.push(w);
                q.retry(&k);
            }
            None => break,
        }
    }
    assert_eq!(waits.len() as u32, MAX_ATTEMPTS - 1);
    assert!(waits.windows(2).all(|w| w[0] <= w[1]), "{waits:?}");
    assert_eq!(q.len(), 0, "no pull queued any more");
    let p = q.pending("s");
    assert_eq!((p.len(), p[0].acked, p[0].lost), (1, 2, false));
}

#[tokio::test]
async fn a_lost_holder_is_remembered_until_the_move_settles() {
    let q = CaptureQueue::new(10);
    q.push(hint("s", "t", 3));
    let (k, _, _) = q.pop().await;
    q.done(&k, Pulled::Lost);
    assert!(q.pending("s")[0].lost);
    let now = Instant::now();
    let since = q.missing_since("s", &[Arc::from("t")], now);
    let later = q.missing_since("s", &[Arc::from("t")], now + Duration::from_secs(5));
    assert_eq!(since, later, "missing since the first time it was seen");
    let seen = q.generation();
    q.push(hint("s", "t2", 1));
    q.settle_session("s", seen);
    assert_eq!(
        q.pending("s").len(),
        1,
        "announced after the move looked: kept"
    );
    let (k2, _, _) = q.pop().await;
    q.done(&k2, Pulled::Head(1));
    assert!(q.pending("s").is_empty());
}

#[tokio::test]
async fn a_move_takes_its_sessions_queued_pulls() {
    let q = CaptureQueue::new(10);
    q.push(hint("s", "t1", 1));
    q.push(hint("s", "t2", 1));
    q.push(hint("other", "t", 1));
    let (k, _, _) = q.pop().await;
    assert_eq!(k, key("s", "t1"));
    let mine = q.take_session("s");
    assert_eq!(mine.taken.len(), 1);
    assert_eq!(mine.taken[0].0, key("s", "t2"));
    assert_eq!(mine.running, 1);
    // The other session's pull is still queued for the pullers.
    let (k, _, _) = q.pop().await;
    assert_eq!(k, key("other", "t"));
}

#[tokio::test]
async fn a_full_ledger_drops_its_oldest_queued_thread() {
    let q = CaptureQueue::new(2);
    assert!(q.push(hint("s", "t1", 1)).is_none());
    assert!(q.push(hint("s", "t2", 1)).is_none());
    assert!(
        q.push(hint("s", "t2", 5)).is_none(),
        "same thread coalesces"
    );
    assert_eq!(
        q.push(hint("s", "t3", 1)).as_deref(),
        Some("s"),
        "full: the oldest goes, and its session is named"
    );
    let threads: Vec<String> = q
        .pending("s")
        .iter()
        .map(|p| p.thread.to_string())
        .collect();
    assert!(!threads.contains(&"t1".to_owned()), "{threads:?}");
}

#[test]
fn checkpoint_header_parsing() {
    assert_eq!(
        parse_checkpoint("t1;seq=4, t2 ; seq=9,bad,;seq=3,t3;seq=x"),
        vec![("t1".to_owned(), 4), ("t2".to_owned(), 9)]
    );
}

/// Two synchronous turns of one thread (seq 6 = B, seq 4 = A; B's
/// response is processed first). B's pull fails, so B's claim is not kept;
/// that must not take A's claim with it: A, waiting for B's pull, still
/// finds its turn to pull.
#[tokio::test]
async fn a_claim_not_kept_does_not_take_another_claim_with_it() {
    let q = CaptureQueue::new(10);
    let k = key("s", "t");
    q.claim(hint("s", "t", 6)); // B
    q.claim(hint("s", "t", 4)); // A
    let Take::Taken(_) = q.take(&k) else {
        panic!("B pulls")
    };
    assert!(matches!(q.take(&k), Take::Running), "A waits for B's pull");
    q.done(&k, Pulled::Failed); // the worker died under B's pull
    q.settle_claim(&k, 6, false); // B answered 502
    assert!(
        matches!(q.take(&k), Take::Taken(_)),
        "A still pulls its turn"
    );
    assert_eq!(q.acked(&k), Some(4));
    q.done(&k, Pulled::Failed);
    q.settle_claim(&k, 4, false);
    assert!(q.pending("s").is_empty(), "neither turn was acknowledged");
}
