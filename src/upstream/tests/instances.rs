//! Which process a connection reaches: verification, a restart on the
//! same port, silent workers, health probes.

use super::*;

#[tokio::test]
async fn verification_learns_the_instance_before_the_request() {
    let w = Worker::start(Some("X")).await;
    let (ep, up, s) = (w.endpoint(), Upstream::new(), settings());
    let err = up
        .send(&ep, &s, Expect::Instance("Y"), Fresh::Pooled, get("/real"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, UpstreamError::InstanceChanged { seen } if seen == "X"),
        "{err:?}"
    );
    assert!(err.nothing_sent());
    assert_eq!(
        w.paths(),
        ["/health"],
        "the real request never reached the worker"
    );
    // The connection reaches the current process: kept for the next request.
    assert_eq!(ep.idle_count(), 1);
    let sent = up
        .send(&ep, &s, Expect::Instance("X"), Fresh::Pooled, get("/real"))
        .await
        .unwrap();
    assert!(sent.reused);
    assert_eq!(sent.instance.as_deref(), Some("X"));
    read(sent).await;
    assert_eq!(w.paths(), ["/health", "/real"]);
    assert_eq!(w.connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_on_the_same_port_is_caught_before_the_request() {
    let a = Worker::start(Some("A")).await;
    let addr = a.addr;
    let (ep, up, s) = (a.endpoint(), Upstream::new(), settings());
    let sent = up
        .send(&ep, &s, Expect::Instance("A"), Fresh::Pooled, get("/x"))
        .await
        .unwrap();
    read(sent).await;
    assert_eq!(ep.idle_count(), 1);
    a.stop().await;
    wait_for("the client to see the close", || ep.idle_open() == 0).await;
    let b = Worker::start_on(addr, Some("B")).await;
    let err = up
        .send(&ep, &s, Expect::Instance("A"), Fresh::Pooled, get("/x"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, UpstreamError::InstanceChanged { seen } if seen == "B"),
        "{err:?}"
    );
    assert_eq!(
        b.paths(),
        ["/health"],
        "the new process never saw the request"
    );
    assert_eq!(up.stats().connects, 2);
    // Once restored, the caller expects B: the verified connection serves it.
    let sent = up
        .send(&ep, &s, Expect::Instance("B"), Fresh::Pooled, get("/x"))
        .await
        .unwrap();
    assert!(sent.reused);
    read(sent).await;
    assert_eq!(b.connections(), 1);
}

#[tokio::test]
async fn a_silent_worker_is_verified_once_until_a_probe_sees_an_instance() {
    let w = Worker::start(None).await;
    let (ep, up, s) = (w.endpoint(), Upstream::new(), settings());
    for _ in 0..3 {
        let sent = up
            .send(&ep, &s, Expect::Instance("A"), Fresh::New, get("/x"))
            .await
            .unwrap();
        assert_eq!(sent.instance, None);
        assert!(!sent.reused);
        read(sent).await;
    }
    assert_eq!(w.connections(), 3);
    assert_eq!(w.count("/health"), 1, "one verification, then none");

    w.set_instance(Some("Z"));
    let (status, instance) = up
        .probe(&ep, &s, "/health", Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!((status, instance.as_deref()), (StatusCode::OK, Some("Z")));
    let err = up
        .send(&ep, &s, Expect::Instance("A"), Fresh::New, get("/x"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, UpstreamError::InstanceChanged { seen } if seen == "Z"),
        "{err:?}"
    );
    assert_eq!(w.count("/health"), 3, "verification, probe, verification");
}

#[tokio::test]
async fn a_probe_reports_status_and_instance_and_closes() {
    let w = Worker::start(Some("P")).await;
    let (ep, up, s) = (w.endpoint(), Upstream::new(), settings());
    let (status, instance) = up
        .probe(&ep, &s, "/unwell", Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(
        (status, instance.as_deref()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("P"))
    );
    assert_eq!(ep.idle_count(), 0);
    wait_for("the probe connection to close", || w.open() == 0).await;
}
