//! Failures, and what each tells the caller: refused, timed out, closed
//! under a reused request, a failing client body, an early answer.

use super::*;

#[tokio::test]
async fn a_refused_connect_sends_nothing() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let ep = Endpoint::new(addr.to_string().try_into().unwrap());
    let up = Upstream::new();
    let err = up
        .send(&ep, &settings(), Expect::Any, Fresh::Pooled, get("/x"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, UpstreamError::Refused { source } if source.kind() == std::io::ErrorKind::ConnectionRefused),
        "{err:?}"
    );
    assert!(err.nothing_sent());
}

#[tokio::test]
async fn a_connect_that_never_completes_times_out() {
    // A listener that never accepts, with its accept queue full: the
    // kernel drops further SYNs, so a connect hangs.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut queued = Vec::new();
    loop {
        let connect = tokio::net::TcpStream::connect(addr);
        // A loopback connect the kernel queues completes at once; one that
        // is still pending after a second was dropped.
        match tokio::time::timeout(Duration::from_secs(1), connect).await {
            Ok(Ok(tcp)) => queued.push(tcp),
            Ok(Err(e)) => panic!("{e}"),
            Err(_) => break,
        }
        assert!(queued.len() < 64, "the accept queue never filled");
    }
    let ep = Endpoint::new(addr.to_string().try_into().unwrap());
    let s = Settings {
        connect_timeout: Duration::from_millis(300),
        ..settings()
    };
    let err = Upstream::new()
        .send(&ep, &s, Expect::Any, Fresh::Pooled, get("/x"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, UpstreamError::ConnectTimeout { after } if after == s.connect_timeout),
        "{err:?}"
    );
    assert!(err.nothing_sent());
}

#[tokio::test]
async fn a_reused_connection_closed_under_the_request_fails_as_reused() {
    let w = Worker::start(Some("A")).await;
    let (ep, up, s) = (w.endpoint(), Upstream::new(), settings());
    let sent = up
        .send(&ep, &s, Expect::Any, Fresh::Pooled, get("/close-on-reuse"))
        .await
        .unwrap();
    read(sent).await;
    let err = up
        .send(&ep, &s, Expect::Any, Fresh::Pooled, get("/close-on-reuse"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, UpstreamError::Failed { reused: true, .. }),
        "{err:?}"
    );
    assert!(!err.nothing_sent());
    assert!(!err.worker_fault());
    // An idempotent request goes again on a fresh connection.
    let sent = up
        .send(&ep, &s, Expect::Any, Fresh::New, get("/close-on-reuse"))
        .await
        .unwrap();
    assert!(!sent.reused);
    read(sent).await;
    assert_eq!(w.connections(), 2);
}

#[tokio::test]
async fn a_failing_client_body_is_the_clients_fault() {
    let w = Worker::start(Some("A")).await;
    let (ep, up, s) = (w.endpoint(), Upstream::new(), settings());
    let (tx, req) = streamed("/upload");
    tx.send(Ok(Frame::data(Bytes::from_static(b"abc"))))
        .await
        .unwrap();
    tx.send(Err("client went away".into())).await.unwrap();
    let err = up
        .send(&ep, &s, Expect::Any, Fresh::Pooled, req)
        .await
        .unwrap_err();
    assert!(matches!(err, UpstreamError::ClientBody { .. }), "{err:?}");
    assert!(!err.nothing_sent());
    assert!(!err.worker_fault());
    let chain = crate::proxy::error::chain(&err);
    assert!(chain.contains("client went away"), "{chain}");
    assert_eq!(ep.idle_count(), 0);
}

#[tokio::test]
async fn an_answer_before_the_whole_request_body_is_not_pooled() {
    // A worker that answers `/early` at once and keeps reading the body on
    // a connection it keeps open (hyper's server would close it instead).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ep = Endpoint::new(
        listener
            .local_addr()
            .unwrap()
            .to_string()
            .try_into()
            .unwrap(),
    );
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut buf = vec![0; 4096];
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"GET /health"));
        tcp.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await
            .unwrap();
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"POST /early"));
        tcp.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nearly")
            .await
            .unwrap();
        while tcp.read(&mut buf).await.is_ok_and(|n| n > 0) {}
    });
    let up = Upstream::new();
    let (tx, req) = streamed("/early");
    tx.send(Ok(Frame::data(Bytes::from_static(b"part"))))
        .await
        .unwrap();
    let sent = up
        .send(&ep, &settings(), Expect::Any, Fresh::Pooled, req)
        .await
        .unwrap();
    assert_eq!(read(sent).await, "early");
    // hyper is still writing the body: that connection cannot carry another
    // request (hyperium/hyper#4176), so it is not kept.
    assert_eq!(ep.idle_count(), 0);
    drop(tx);
}
