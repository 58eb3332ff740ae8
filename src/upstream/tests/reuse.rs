//! Connection reuse: sequential and concurrent load (counted at the
//! worker), stale and expired idle connections, upgrades, cancellation.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_requests_share_one_connection() {
    let w = Worker::start(Some("A")).await;
    let (ep, up, s) = (w.endpoint(), Upstream::new(), settings());
    for i in 0..200 {
        // GETs, POSTs with a body, and 204s whose empty body nobody polls:
        // each must leave the connection reusable.
        let (req, expected) = match i % 3 {
            0 => (get("/x"), "hello"),
            1 => (
                post("/x", ReplayBody::from_bytes(Bytes::from_static(b"{}"))),
                "hello",
            ),
            _ => (get("/empty"), ""),
        };
        let sent = up
            .send(&ep, &s, Expect::Instance("A"), Fresh::Pooled, req)
            .await
            .unwrap();
        assert_eq!(sent.reused, i > 0, "request {i}");
        assert_eq!(sent.instance.as_deref(), Some("A"));
        if expected.is_empty() {
            assert_eq!(sent.response.status(), StatusCode::NO_CONTENT);
            drop(sent);
        } else {
            assert_eq!(read(sent).await, expected);
        }
    }
    assert_eq!(w.connections(), 1);
    assert_eq!(ep.idle_count(), 1);
    let stats = up.stats();
    eprintln!(
        "sequential, 200 requests: {} server connection(s), {stats:?}",
        w.connections()
    );
    assert_eq!(
        (stats.connects, stats.verifications, stats.reuses),
        (1, 1, 199)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_reuse_the_connections_they_opened() {
    const N: usize = 8;
    const ROUNDS: usize = 10;
    let w = Worker::start(Some("A")).await;
    // Every request waits at the worker until all N arrived: each round
    // needs N connections at once, so round 1 opens N and the others
    // must find all N back in the pool.
    w.gather(N);
    let (ep, up, s) = (w.endpoint(), Upstream::new(), settings());
    for round in 0..ROUNDS {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..N {
            let (ep, up, s) = (ep.clone(), up.clone(), s.clone());
            tasks.spawn(async move {
                let sent = up
                    .send(&ep, &s, Expect::Any, Fresh::Pooled, get("/gather"))
                    .await
                    .unwrap();
                let reused = sent.reused;
                assert_eq!(read(sent).await, "hello");
                reused
            });
        }
        let all = tokio::time::timeout(Duration::from_secs(10), tasks.join_all());
        let reused = all
            .await
            .expect("a round hung")
            .into_iter()
            .filter(|r| *r)
            .count();
        assert_eq!(reused, if round == 0 { 0 } else { N }, "round {round}");
        assert_eq!(ep.idle_count(), N, "round {round}: all back in the pool");
    }
    let stats = up.stats();
    eprintln!(
        "concurrent, {ROUNDS} rounds of {N}: {} server connections, {stats:?}",
        w.connections()
    );
    assert_eq!(w.connections(), N);
    assert_eq!(stats.reuses as usize, N * (ROUNDS - 1));
}

#[tokio::test]
async fn a_pooled_connection_found_closed_at_send_goes_again_on_a_new_one() {
    let w = Worker::start(Some("A")).await;
    let (ep, up, s) = (w.endpoint(), Upstream::new(), settings());
    // An idle connection that looks ready, whose worker has just closed it:
    // its task learns that only when it runs, after the request is queued.
    let (stale, held) = units::conn(units::State::Ready, "A").await;
    ep.pool().checkin(stale, s.idle_timeout, s.max_idle);
    drop(held.pipe);
    let sent = up
        .send(&ep, &s, Expect::Instance("A"), Fresh::Pooled, get("/x"))
        .await
        .unwrap();
    assert!(!sent.reused);
    read(sent).await;
    assert_eq!(w.paths(), ["/health", "/x"]);
    let stats = up.stats();
    assert_eq!((stats.connects, stats.reuses), (1, 0));
}

#[tokio::test]
async fn idle_connections_expire() {
    let w = Worker::start(Some("A")).await;
    let (ep, up, s) = (w.endpoint(), Upstream::new(), settings());
    read(
        up.send(&ep, &s, Expect::Any, Fresh::Pooled, get("/x"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(ep.idle_count(), 1);
    tokio::time::pause();
    tokio::time::advance(s.idle_timeout).await;
    tokio::time::resume();
    let sent = up
        .send(&ep, &s, Expect::Any, Fresh::Pooled, get("/x"))
        .await
        .unwrap();
    assert!(!sent.reused);
    read(sent).await;
    assert_eq!(w.connections(), 2);
    wait_for("the expired connection to close", || w.open() == 1).await;
}

#[tokio::test]
async fn an_upgrade_tunnels_bytes_both_ways_and_is_never_pooled() {
    let w = Worker::start(Some("A")).await;
    let (ep, up, s) = (w.endpoint(), Upstream::new(), settings());
    let req = Request::get("/ws")
        .header(HOST, "worker")
        .header("connection", "upgrade")
        .header("upgrade", "echo")
        .body(ReplayBody::empty())
        .unwrap();
    let mut sent = up
        .send(&ep, &s, Expect::Any, Fresh::Pooled, req)
        .await
        .unwrap();
    assert_eq!(sent.response.status(), StatusCode::SWITCHING_PROTOCOLS);
    let upgraded = hyper::upgrade::on(&mut sent.response).await.unwrap();
    drop(sent);
    let mut io = hyper_util::rt::TokioIo::new(upgraded);
    for msg in [&b"ping"[..], b"and pong"] {
        io.write_all(msg).await.unwrap();
        let mut back = vec![0; msg.len()];
        io.read_exact(&mut back).await.unwrap();
        assert_eq!(back, msg);
    }
    assert_eq!(ep.idle_count(), 0);
}

#[tokio::test]
async fn dropping_send_closes_its_connection() {
    let w = Worker::start(Some("A")).await;
    let (ep, up, s) = (w.endpoint(), Upstream::new(), settings());
    let send = up.send(&ep, &s, Expect::Any, Fresh::Pooled, get("/hang"));
    assert!(tokio::time::timeout(Duration::from_millis(200), send)
        .await
        .is_err());
    wait_for("the worker to see the close", || w.open() == 0).await;
    assert_eq!(ep.idle_count(), 0);
}
