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
            let values = cookies::find(black_box(&h), "tether");
            let p = codec.open(values[0]).unwrap();
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

criterion_group!(benches, cookie, decision, balance, rewrite);
criterion_main!(benches);
