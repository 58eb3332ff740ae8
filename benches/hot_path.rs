//! Micro-benchmarks of the per-request pieces: cookie seal/open, the pin
//! decision, the balancer pick and the header rewrites. Compare runs of the
//! same machine (`cargo bench -- --save-baseline before` / `--baseline before`).

// Fixed, valid inputs: a failure here is a broken benchmark, not input.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::atomic::AtomicUsize;

use criterion::{criterion_group, criterion_main, Criterion};
use http::header::{HeaderMap, HeaderValue};
use tether::affinity::{self, cookies, Codec, Lifetimes, Pin, PinnedState, SessionId};
use tether::backends::BackendSet;
use tether::balancer;
use tether::config::{BackendConfig, KeyMaterial, OnWorkerLoss, Policy};
use tether::proxy::headers::{self, Peer};

fn pin() -> Pin {
    Pin {
        session: SessionId([7; 16]),
        backend: "worker-a".into(),
        instance: "3f2a9c1d0b7e4f55".into(),
        epoch: 3,
        issued_at: 1_800_000_000,
        refreshed_at: 1_800_000_000,
    }
}

fn set(n: usize) -> BackendSet {
    let cfgs: Vec<BackendConfig> = (0..n)
        .map(|i| BackendConfig {
            id: format!("worker-{i}"),
            url: format!("http://127.0.0.1:{}", 9000 + i).parse().unwrap(),
            weight: 1,
            max_inflight: None,
        })
        .collect();
    BackendSet::build(&cfgs, None)
}

fn request_headers(cookie: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("host", HeaderValue::from_static("chat.example.com"));
    h.insert("user-agent", HeaderValue::from_static("bench/1.0"));
    h.insert("accept", HeaderValue::from_static("*/*"));
    h.insert("connection", HeaderValue::from_static("keep-alive"));
    h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
    h.insert(
        "cookie",
        HeaderValue::from_str(&format!("app=1; tether={cookie}; theme=dark")).unwrap(),
    );
    h
}

fn cookie(c: &mut Criterion) {
    let codec = Codec::new(
        &[KeyMaterial::new(vec![1; 32]), KeyMaterial::new(vec![2; 32])],
        "tether",
    );
    let p = pin();
    let sealed = codec.seal(&p);
    c.bench_function("cookie/seal", |b| b.iter(|| codec.seal(black_box(&p))));
    c.bench_function("cookie/open", |b| b.iter(|| codec.open(black_box(&sealed))));
    let rotated = Codec::new(
        &[KeyMaterial::new(vec![9; 32]), KeyMaterial::new(vec![1; 32])],
        "tether",
    );
    c.bench_function("cookie/open_second_key", |b| {
        b.iter(|| rotated.open(black_box(&sealed)))
    });
    c.bench_function("cookie/open_garbage", |b| {
        b.iter(|| codec.open(black_box("not-a-cookie-value-at-all")))
    });
}

fn decision(c: &mut Criterion) {
    let codec = Codec::new(&[KeyMaterial::new(vec![1; 32])], "tether");
    let sealed = codec.seal(&pin());
    let h = request_headers(&sealed);
    let backends = set(3);
    let life = Lifetimes {
        ttl: std::time::Duration::from_secs(86_400),
        idle_timeout: None,
        refresh: std::time::Duration::from_secs(3600),
    };
    // The whole pinned-request decision: find the cookie, open it, check
    // its life, look the worker up, run the table.
    c.bench_function("pin/decide_kept", |b| {
        b.iter(|| {
            let value = cookies::find(black_box(&h), "tether").next().unwrap();
            let p = codec.open(value).unwrap();
            let alive = life.is_alive(&p, 1_800_000_100);
            let state = backends.get("worker-0").map(|b| {
                if b.is_usable() {
                    PinnedState::Usable
                } else {
                    PinnedState::Down
                }
            });
            black_box((alive, affinity::decide(state, OnWorkerLoss::Move)))
        })
    });
}

fn balance(c: &mut Criterion) {
    let rr = AtomicUsize::new(0);
    for n in [3usize, 32] {
        let s = set(n);
        for (name, policy) in [
            ("least_sessions", Policy::LeastSessions),
            ("rendezvous", Policy::Rendezvous),
            ("round_robin", Policy::RoundRobin),
        ] {
            c.bench_function(&format!("balance/{name}/{n}"), |b| {
                b.iter(|| {
                    balancer::choose_new(policy, black_box(b"session-key-123"), &s, &rr, None)
                })
            });
        }
    }
}

fn rewrite(c: &mut Criterion) {
    let codec = Codec::new(&[KeyMaterial::new(vec![1; 32])], "tether");
    let h = request_headers(&codec.seal(&pin()));
    let peer = Peer::new("127.0.0.1:50000".parse().unwrap(), false);
    let host = HeaderValue::from_static("chat.example.com");
    c.bench_function("headers/request_rewrite", |b| {
        b.iter(|| {
            let mut h = h.clone();
            headers::check_framing(&h).unwrap();
            headers::strip_hop_by_hop(&mut h, false);
            headers::rewrite_request(&mut h, &peer, Some(&host));
            cookies::strip(&mut h, "tether");
            black_box(h)
        })
    });
    c.bench_function("headers/clone_only", |b| b.iter(|| black_box(h.clone())));
}

/// The admission hook a request passes through: rate-limit rules, then a
/// slot at its worker (taken and given back). `none`: no rule and no
/// `max_inflight` (the default); `limits`: two rules that match and admit
/// (by IP and by session) and `max_inflight` on the worker.
fn admission(c: &mut Criterion) {
    use futures_util::FutureExt;
    use tether::admission::{Admission, Subject};
    use tether::config::Config;

    let base = format!(
        "[listen]\nhttp = \"127.0.0.1:8080\"\n[affinity]\nkeys = [\"{}\"]\n\
         [[backends]]\nid = \"worker-0\"\nurl = \"http://127.0.0.1:9000\"\n",
        "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="
    );
    let limits = format!(
        "{base}max_inflight = 64\n\
         [[rate_limits]]\nkey = \"ip\"\nrate = \"1000000/s\"\nburst = 1000\n\
         [[rate_limits]]\nkey = \"session\"\nrate = \"1000000/s\"\nburst = 1000\n"
    );
    let h = request_headers("x");
    // 1024 clients, each with its own session: buckets are looked up in a
    // populated table and none runs dry (each key sees 1/1024 of the loop).
    let clients: Vec<(std::net::IpAddr, [u8; 16])> = (0..1024u32)
        .map(|i| {
            let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i).into();
            let mut session = [0u8; 16];
            session[..4].copy_from_slice(&i.to_le_bytes());
            (ip, session)
        })
        .collect();
    for (name, text) in [("none", base.clone()), ("limits", limits)] {
        let config = Config::from_toml_str(&text, std::path::Path::new("bench.toml")).unwrap();
        let set = BackendSet::build(&config.backends, None);
        let backend = set.get("worker-0").unwrap().clone();
        let a = Admission::standalone(&config);
        let mut n = 0usize;
        c.bench_function(&format!("admission/{name}"), |b| {
            b.iter(|| {
                n = (n + 1) % clients.len();
                let (ip, session) = &clients[n];
                let subject = Subject {
                    headers: &h,
                    path: "/chat",
                    ip: *ip,
                    session: Some(session),
                };
                a.check_rates(black_box(subject)).unwrap();
                let slot = a.admit(&backend, &config).now_or_never().unwrap().unwrap();
                black_box(slot)
            })
        });
    }
}

criterion_group!(benches, cookie, decision, balance, rewrite, admission);
criterion_main!(benches);
