//! A fast origin for the load comparison (`bench/compare.sh`): answers
//! every request with a small fixed body over HTTP/1.1 (keep-alive).
//!
//! `cargo run --release --example origin -- 127.0.0.1:18081 [127.0.0.1:18082 …]`

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::Response;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

fn main() -> std::io::Result<()> {
    let addrs: Vec<String> = std::env::args().skip(1).collect();
    if addrs.is_empty() {
        eprintln!("usage: origin ADDR [ADDR …]");
        std::process::exit(2);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut tasks = Vec::new();
        for addr in addrs {
            let listener = TcpListener::bind(&addr).await?;
            tasks.push(tokio::spawn(serve(listener)));
        }
        for t in tasks {
            let _ = t.await;
        }
        Ok(())
    })
}

async fn serve(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let svc = service_fn(|_req| async {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                    b"hello from origin\n",
                ))))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
