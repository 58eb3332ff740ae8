//! What `state.capture = "sync"` costs a chat turn: two tethers in one
//! process, one with `capture = "async"` (the default) and one with
//! `"sync"`, in front of the same two reference workers, each with its own
//! store; turns alternate between them in rounds so both see the same
//! machine at the same moments. Prints p50/p99 per mode and their ratio.
//!
//! ```text
//! cargo run --release --example capture_latency [ROUNDS] [TURNS] [STORE]
//! ```
//!
//! STORE is `sqlite` (default, a temp file each) or a `postgres://` URL
//! of a database tether may use (both tethers share it; their sessions
//! differ). Loopback only.

use std::time::{Duration, Instant};

use tether::clock::SystemClock;
use tether::config::Config;
use tether::worker::RefWorker;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

type Error = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rounds: usize = args.first().map_or(Ok(10), |v| v.parse())?;
    let turns: usize = args.get(1).map_or(Ok(50), |v| v.parse())?;
    let store = args.get(2).cloned().unwrap_or_else(|| "sqlite".into());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run(rounds, turns, &store))
}

async fn run(rounds: usize, turns: usize, store: &str) -> Result<(), Error> {
    let cancel = CancellationToken::new();
    let mut workers = Vec::new();
    for id in ["a", "b"] {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        workers.push((id, l.local_addr()?));
        tokio::spawn(RefWorker::new(id, None).serve(l, cancel.clone()));
    }
    let dir = tempfile::tempdir()?;
    let mut tethers = Vec::new();
    for mode in ["async", "sync"] {
        let url = match store {
            "sqlite" => format!("sqlite://{}/{mode}.db", dir.path().display()),
            pg => pg.to_owned(),
        };
        let mut text = format!(
            "[listen]\nhttp = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n\
             [affinity]\nkeys = [\"AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=\"]\n\n\
             [state]\nstore = \"{url}\"\ncapture = \"{mode}\"\n"
        );
        for (id, addr) in &workers {
            text.push_str(&format!(
                "\n[[backends]]\nid = \"{id}\"\nurl = \"http://{addr}\"\n"
            ));
        }
        let config = Config::from_toml_str(&text, std::path::Path::new("<capture_latency>"))?;
        let handle = tether::server::start(config, std::sync::Arc::new(SystemClock)).await?;
        let base = format!("http://{}", handle.http.ok_or("no http listener")?);
        tethers.push((mode, base, handle));
    }
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(), Vec::new()];
    for round in 0..rounds {
        for (i, (_, base, _)) in tethers.iter().enumerate() {
            // A new conversation per round: histories stay short, as in
            // real chats, so the figures are about the capture, not size.
            let client = reqwest::Client::builder().cookie_store(true).build()?;
            for turn in 0..turns {
                let url = format!("{base}/chat?thread=main&message=r{round}t{turn}");
                let started = Instant::now();
                let resp = client.post(&url).send().await?;
                let ok = resp.status().is_success();
                let _ = resp.bytes().await?;
                if !ok {
                    return Err(format!("turn {turn} of round {round} failed").into());
                }
                samples[i].push(started.elapsed());
            }
        }
    }
    let mut p = Vec::new();
    for (i, (mode, _, _)) in tethers.iter().enumerate() {
        let s = &mut samples[i];
        s.sort();
        let at = |q: f64| s[((s.len() as f64 * q) as usize).min(s.len() - 1)];
        let (p50, p99) = (at(0.5), at(0.99));
        println!(
            "capture = {mode:5}  turns {:5}  p50 {:7.3} ms  p99 {:7.3} ms",
            s.len(),
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3
        );
        p.push((p50, p99));
    }
    println!(
        "sync / async: p50 x{:.2} (+{:.3} ms), p99 x{:.2} (+{:.3} ms)",
        p[1].0.as_secs_f64() / p[0].0.as_secs_f64(),
        (p[1].0.as_secs_f64() - p[0].0.as_secs_f64()) * 1e3,
        p[1].1.as_secs_f64() / p[0].1.as_secs_f64(),
        (p[1].1.as_secs_f64() - p[0].1.as_secs_f64()) * 1e3,
    );
    for (_, _, handle) in tethers {
        handle.stop().await;
    }
    cancel.cancel();
    Ok(())
}
