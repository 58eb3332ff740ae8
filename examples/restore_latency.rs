//! The restore-latency scenario of `bench/compare.sh`: what restoring a
//! conversation costs the first request after its worker is lost.
//!
//! ```text
//! restore_latency build   PROXY ADMIN SESSIONS ENTRIES STATE_FILE
//! restore_latency measure PROXY STATE_FILE KILLED_WORKER
//! ```
//!
//! `build` opens SESSIONS conversations through tether (reference workers
//! behind it), each grown to ENTRIES entries (user message + reply per
//! turn), waits until tether has captured every entry into its store, and
//! writes one `worker<TAB>history length<TAB>cookie` line per session. The script then kills
//! one worker with `kill -9`. `measure` sends, one session at a time, the
//! next message of every session twice: the first request of a session that
//! was on the killed worker is the one that pays for the re-pin and the
//! restore; the second request of the same session is the baseline measured
//! in the same run. It checks that every answer holds the whole history and
//! prints p50/p99/max of both and the difference.

use std::time::{Duration, Instant};

use reqwest::header::{COOKIE, SET_COOKIE};
use serde_json::Value;

type Error = Box<dyn std::error::Error + Send + Sync>;

const COOKIE_NAME: &str = "tether";
const BUILD_CONCURRENCY: usize = 8;

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["build", proxy, admin, sessions, entries, state] => rt.block_on(build(
            proxy,
            admin,
            sessions.parse()?,
            entries.parse()?,
            state,
        )),
        ["measure", proxy, state, killed] => rt.block_on(measure(proxy, state, killed)),
        _ => {
            eprintln!(
                "usage: restore_latency build PROXY ADMIN SESSIONS ENTRIES STATE_FILE\n       \
                 restore_latency measure PROXY STATE_FILE KILLED_WORKER"
            );
            std::process::exit(2)
        }
    }
}

/// One chat turn; returns the answering worker, the history length and the
/// cookie to send next.
async fn chat(
    client: &reqwest::Client,
    proxy: &str,
    cookie: Option<&str>,
    message: &str,
) -> Result<(String, usize, Option<String>), Error> {
    let mut req = client.post(format!("{proxy}/chat?thread=main&message={message}"));
    if let Some(c) = cookie {
        req = req.header(COOKIE, c);
    }
    let resp = req.send().await?;
    let status = resp.status();
    let set = resp
        .headers()
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.split(';').next())
        .find(|v| v.starts_with(&format!("{COOKIE_NAME}=")))
        .map(str::to_owned);
    // tether's own refusals (503, 429) are text: read before parsing, so
    // a failure names its status and reason.
    let text = resp.text().await?;
    if !status.is_success() {
        return Err(format!("{message}: {status}: {text}").into());
    }
    let body: Value = serde_json::from_str(&text)?;
    let worker = body["worker"].as_str().unwrap_or_default().to_owned();
    let len = body["history"].as_array().map_or(0, Vec::len);
    Ok((worker, len, set.or_else(|| cookie.map(str::to_owned))))
}

async fn build(
    proxy: &str,
    admin: &str,
    sessions: usize,
    entries: usize,
    state: &str,
) -> Result<(), Error> {
    let client = reqwest::Client::new();
    let turns = entries.div_ceil(2);
    let mut lines = Vec::with_capacity(sessions);
    for chunk_start in (0..sessions).step_by(BUILD_CONCURRENCY) {
        let chunk = chunk_start..sessions.min(chunk_start + BUILD_CONCURRENCY);
        let tasks = chunk.map(|_| {
            let client = client.clone();
            let proxy = proxy.to_owned();
            tokio::spawn(async move {
                let mut cookie: Option<String> = None;
                let mut worker = String::new();
                let mut len = 0;
                for turn in 0..turns {
                    let (w, l, c) =
                        chat(&client, &proxy, cookie.as_deref(), &format!("m{turn}")).await?;
                    (worker, len, cookie) = (w, l, c);
                }
                let cookie = cookie.ok_or("tether set no affinity cookie")?;
                Ok::<_, Error>(format!("{worker}\t{len}\t{cookie}"))
            })
        });
        for t in futures_util::future::join_all(tasks).await {
            lines.push(t??);
        }
    }
    std::fs::write(state, lines.join("\n") + "\n")?;

    // Wait (bounded) until tether captured every entry into its store.
    let want = (sessions * turns * 2) as f64;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let text = client
            .get(format!("{admin}/metrics"))
            .send()
            .await?
            .text()
            .await?;
        let captured: f64 = text
            .lines()
            .filter(|l| l.starts_with("tether_captured_entries_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        if captured >= want {
            eprintln!(
                "built {sessions} sessions of {} entries; captured {captured}",
                turns * 2
            );
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("only {captured} of {want} entries captured after 120 s").into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn measure(proxy: &str, state: &str, killed: &str) -> Result<(), Error> {
    let client = reqwest::Client::new();
    let text = std::fs::read_to_string(state)?;
    let mut first = Vec::new();
    let mut second = Vec::new();
    let mut lost = 0usize;
    for (i, line) in text.lines().enumerate() {
        let mut fields = line.splitn(3, '\t');
        let (Some(worker), Some(held), Some(cookie)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let held: usize = held.parse()?;
        if worker != killed {
            continue;
        }
        let started = Instant::now();
        let (w1, len1, cookie) = chat(&client, proxy, Some(cookie), &format!("after{i}")).await?;
        first.push(started.elapsed());
        let started = Instant::now();
        let (w2, len2, _) = chat(&client, proxy, cookie.as_deref(), &format!("again{i}")).await?;
        second.push(started.elapsed());
        if w1 == killed || w2 != w1 {
            return Err(format!("session {i}: answered by {w1} then {w2}").into());
        }
        // The history the killed worker held, plus one turn per request.
        if len1 != held + 2 || len2 != held + 4 {
            lost += 1;
        }
    }
    if first.is_empty() {
        return Err(format!("no session was on {killed}").into());
    }
    first.sort();
    second.sort();
    let (f50, f99, fmax) = (
        percentile(&first, 50.0),
        percentile(&first, 99.0),
        first[first.len() - 1],
    );
    let (s50, s99, smax) = (
        percentile(&second, 50.0),
        percentile(&second, 99.0),
        second[second.len() - 1],
    );
    println!(
        "restore scenario: {} sessions moved off {killed}",
        first.len()
    );
    println!(
        "  first request after failover (re-pin + restore): p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        ms(f50),
        ms(f99),
        ms(fmax)
    );
    println!(
        "  next request of the same session (baseline):     p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        ms(s50),
        ms(s99),
        ms(smax)
    );
    println!(
        "  added by the restore: p50 {:.2} ms  p99 {:.2} ms",
        ms(f50.saturating_sub(s50)),
        ms(f99.saturating_sub(s99))
    );
    println!("  sessions answered without their whole history: {lost}");
    Ok(())
}
