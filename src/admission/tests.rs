use std::sync::Arc;
use std::time::Duration;

use super::queue::{acquire, Refused, Wait};
use super::rate::{self, Limiter};
use crate::backends::Backend;
use crate::config::{BackendConfig, RateKey, RateLimit};

fn backend() -> Arc<Backend> {
    Arc::new(Backend::new(&BackendConfig {
        id: "a".into(),
        url: "http://127.0.0.1:9".parse().unwrap(),
        weight: 1,
        max_inflight: Some(1),
    }))
}

const WAIT: Wait = Wait {
    timeout: Duration::from_secs(30),
    max_waiting: 3,
};

#[tokio::test(start_paused = true)]
async fn a_freed_slot_goes_to_the_oldest_waiter() {
    let b = backend();
    let (first, waited) = acquire(&b, 1, WAIT).await.unwrap();
    assert!(waited.is_none());
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..3 {
        let (b2, order) = (b.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            let (slot, _) = acquire(&b2, 1, WAIT).await.unwrap();
            order.lock().unwrap().push(i);
            tokio::time::sleep(Duration::from_millis(10)).await;
            drop(slot);
        }));
        // Let it queue before the next one arrives.
        while b.slots.queued() < i + 1 {
            tokio::task::yield_now().await;
        }
    }
    assert_eq!(acquire(&b, 1, WAIT).await.unwrap_err(), Refused::Full);
    drop(first);
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), vec![0, 1, 2]);
    assert_eq!((b.slots.in_flight(), b.slots.queued()), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn a_waiter_times_out_and_a_cancelled_one_leaves_the_queue() {
    let b = backend();
    let (held, _) = acquire(&b, 1, WAIT).await.unwrap();
    let short = Wait {
        timeout: Duration::from_millis(50),
        ..WAIT
    };
    assert_eq!(acquire(&b, 1, short).await.unwrap_err(), Refused::Timeout);
    assert_eq!(b.slots.queued(), 0);
    let waiting = {
        let b = b.clone();
        tokio::spawn(async move { acquire(&b, 1, WAIT).await.map(|_| ()) })
    };
    while b.slots.queued() == 0 {
        tokio::task::yield_now().await;
    }
    waiting.abort();
    let _ = waiting.await;
    assert_eq!(b.slots.queued(), 0, "a cancelled waiter leaves at once");
    drop(held);
    assert_eq!(b.slots.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_lost_worker_releases_its_waiters_and_a_raised_limit_admits_them() {
    let b = backend();
    let (_held, _) = acquire(&b, 1, WAIT).await.unwrap();
    let waiting = {
        let b = b.clone();
        tokio::spawn(async move { acquire(&b, 1, WAIT).await.map(|_| ()) })
    };
    while b.slots.queued() == 0 {
        tokio::task::yield_now().await;
    }
    b.mark_down();
    assert_eq!(waiting.await.unwrap(), Err(Refused::Lost));
    assert_eq!(b.slots.queued(), 0);
    b.set_probe_up(true);
    let waiting = {
        let b = b.clone();
        tokio::spawn(async move { acquire(&b, 1, WAIT).await.map(|(s, _)| drop(s)) })
    };
    while b.slots.queued() == 0 {
        tokio::task::yield_now().await;
    }
    b.slots.set_limit(2);
    assert_eq!(waiting.await.unwrap(), Ok(()));
}

fn rule(count: u32, burst: u32) -> RateLimit {
    RateLimit {
        name: "0".into(),
        key: RateKey::Ip,
        count,
        per: Duration::from_secs(60),
        burst,
        path_prefix: None,
    }
}

#[test]
fn a_bucket_admits_its_burst_then_names_the_wait() {
    let l = Limiter::new(&rule(1, 2), 100);
    assert!(l.check(7).is_ok());
    assert!(l.check(7).is_ok());
    let wait = l.check(7).unwrap_err();
    assert!(
        wait > Duration::from_secs(59) && wait <= Duration::from_secs(60),
        "{wait:?}"
    );
    assert!(l.check(8).is_ok(), "another key has its own bucket");
}

#[test]
fn the_key_table_stays_under_its_cap_and_drops_the_idlest() {
    let max = 160;
    let l = Limiter::new(&rule(1, 1), max);
    for key in 0..10_000u64 {
        let _ = l.check(key);
        assert!(l.keys() <= max, "{} keys tracked", l.keys());
    }
    // A key in use survives while idle ones are dropped around it (all in
    // shard 0 of 16, which holds 10).
    let l = Limiter::new(&rule(1, 1), max);
    let busy = 0;
    let _ = l.check(busy);
    for key in 1..2_000u64 {
        if key % 3 == 0 {
            let _ = l.check(busy);
        }
        let _ = l.check(key * 16);
        assert!(rate::tracked(&l, busy), "the busy key was evicted at {key}");
    }
    assert!(!rate::tracked(&l, 16), "the idlest key is gone");
}

#[tokio::test]
async fn full_buckets_are_forgotten_first() {
    // 1000/s, burst 1: a bucket is full again 1 ms after its last use.
    let fast = RateLimit {
        count: 1000,
        per: Duration::from_secs(1),
        ..rule(1, 1)
    };
    let l = Limiter::new(&fast, 160); // 10 keys per shard
    for key in 0..10u64 {
        l.check(key * 16).unwrap();
    }
    assert_eq!(l.keys(), 10);
    // Real time: governor's clock is not tokio's.
    tokio::time::sleep(Duration::from_millis(5)).await;
    l.check(10 * 16).unwrap();
    assert_eq!(
        l.keys(),
        1,
        "the ten refilled buckets went, not just the oldest"
    );
}
