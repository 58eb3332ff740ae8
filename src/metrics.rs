//! Prometheus metrics (prometheus-client). The families are private; the
//! rest of tether records through named methods (`metrics.repin(reason)`),
//! so every metric is defined, registered and labelled in this one file.
//! Per-worker gauges and the store's state are filled in at scrape time.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::backends::{Backend, BackendSet};
use crate::upstream::Stats;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    class: &'static str,
    backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabel {
    backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectLabels {
    backend: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabel {
    rule: String,
}

/// Queue waits: 1 ms to about 65 s.
fn queue_wait_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProbeLabels {
    backend: String,
    result: &'static str,
}

/// What the scrape reads from the continuity side.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ContinuityGauges {
    /// Threads with a capture waiting or running.
    pub capture_queue: usize,
    /// Whether the store answered its last operation.
    pub store_up: bool,
    /// Captures held in memory while the store is down.
    pub buffered: usize,
    /// Their size in bytes.
    pub buffered_bytes: usize,
}

/// Every metric family.
pub(crate) struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Histogram,
    repins: Family<ReasonLabel, Counter>,
    cookie_rejects: Family<ReasonLabel, Counter>,
    retries: Counter,
    probes: Family<ProbeLabels, Counter>,
    ejections: Family<BackendLabel, Counter>,
    instance_changes: Family<BackendLabel, Counter>,
    backend_up: Family<BackendLabel, Gauge>,
    backend_sessions: Family<BackendLabel, Gauge>,
    restores: Family<OutcomeLabel, Counter>,
    restore_duration: Histogram,
    captures: Family<ReasonLabel, Counter>,
    captured_entries: Counter,
    capture_dropped: Counter,
    capture_fenced: Counter,
    capture_queue: Gauge,
    buffer_dropped: Counter,
    buffered: Gauge,
    buffered_bytes: Gauge,
    store_up: Gauge,
    store_writes_dropped: Counter,
    connections: Gauge,
    connections_refused: Counter,
    tls_reload_refused: Counter,
    tls_handshake_failures: Counter,
    upgrades: Family<OutcomeLabel, Counter>,
    upstream_connects: Counter,
    upstream_verifications: Counter,
    upstream_reuses: Counter,
    backend_in_flight: Family<BackendLabel, Gauge>,
    backend_queued: Family<BackendLabel, Gauge>,
    queue_wait: Family<BackendLabel, Histogram, fn() -> Histogram>,
    admission_rejected: Family<RejectLabels, Counter>,
    rate_limited: Family<RuleLabel, Counter>,
    rate_limit_keys: Family<RuleLabel, Gauge>,
    /// The upstream counts last rendered (counters advance by the delta).
    upstream_seen: std::sync::Mutex<Stats>,
    /// Requests answered, and those answered 5xx (for the dashboard's
    /// rates, without walking the label families).
    answered: AtomicU64,
    answered_5xx: AtomicU64,
}

/// Requests answered since start, for `/api/overview`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RequestTotals {
    /// Every answered request.
    pub total: u64,
    /// Those answered with a 5xx status.
    pub errors: u64,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Registers a family under `name` with `help`, returning the struct field.
macro_rules! register {
    ($reg:expr, $m:expr, $($name:literal, $help:literal => $field:ident),* $(,)?) => {
        $( $reg.register($name, $help, $m.$field.clone()); )*
    };
}

impl Metrics {
    /// Registers every family.
    pub(crate) fn new() -> Metrics {
        let mut registry = Registry::with_prefix("tether");
        let m = Metrics {
            requests: Family::default(),
            latency: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            repins: Family::default(),
            cookie_rejects: Family::default(),
            retries: Counter::default(),
            probes: Family::default(),
            ejections: Family::default(),
            instance_changes: Family::default(),
            backend_up: Family::default(),
            backend_sessions: Family::default(),
            restores: Family::default(),
            restore_duration: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            captures: Family::default(),
            captured_entries: Counter::default(),
            capture_dropped: Counter::default(),
            capture_fenced: Counter::default(),
            capture_queue: Gauge::default(),
            buffer_dropped: Counter::default(),
            buffered: Gauge::default(),
            buffered_bytes: Gauge::default(),
            store_up: Gauge::default(),
            store_writes_dropped: Counter::default(),
            connections: Gauge::default(),
            connections_refused: Counter::default(),
            tls_reload_refused: Counter::default(),
            tls_handshake_failures: Counter::default(),
            upgrades: Family::default(),
            upstream_connects: Counter::default(),
            upstream_verifications: Counter::default(),
            upstream_reuses: Counter::default(),
            backend_in_flight: Family::default(),
            backend_queued: Family::default(),
            queue_wait: Family::new_with_constructor(queue_wait_histogram),
            admission_rejected: Family::default(),
            rate_limited: Family::default(),
            rate_limit_keys: Family::default(),
            upstream_seen: std::sync::Mutex::new(Stats::default()),
            answered: AtomicU64::new(0),
            answered_5xx: AtomicU64::new(0),
            registry: Registry::default(),
        };
        register!(registry, m,
            "requests", "Proxied requests by status class and worker" => requests,
            "request_duration_seconds", "Time from request to response head" => latency,
            "repins", "Sessions moved to another worker, by reason" => repins,
            "cookie_rejects", "Affinity cookies treated as absent, by reason" => cookie_rejects,
            "retries", "Requests sent again, on a fresh connection or another worker" => retries,
            "probes", "Active health probes by worker and result" => probes,
            "ejections", "Passive ejections by worker" => ejections,
            "instance_changes", "Worker restarts seen through Tether-Instance" => instance_changes,
            "backend_up", "1 when the worker is usable" => backend_up,
            "backend_sessions", "Live sessions pinned to the worker" => backend_sessions,
            "restores", "Session moves by outcome (ok, followed, partial, failed)" => restores,
            "restore_duration_seconds", "Time to move a session: pending captures, re-pin, restore" => restore_duration,
            "captures", "Capture pulls by result" => captures,
            "captured_entries", "Thread entries stored by capture" => captured_entries,
            "capture_dropped", "Capture hints dropped: queue full" => capture_dropped,
            "capture_fenced", "Capture writes refused: the session had moved on (older pin epoch)" => capture_fenced,
            "capture_queue", "Threads with a capture waiting or running" => capture_queue,
            "capture_buffer_dropped", "Captures dropped: the store was down and the buffer full" => buffer_dropped,
            "capture_buffered", "Captures held in memory while the store is down" => buffered,
            "capture_buffered_bytes", "Bytes of captures held in memory while the store is down" => buffered_bytes,
            "store_up", "1 when the store answered its last operation, 0 when degraded" => store_up,
            "store_writes_dropped", "Session writes dropped: queue full or store down" => store_writes_dropped,
            "connections", "Open client connections" => connections,
            "connections_refused", "Client connections refused at limits.max_connections" => connections_refused,
            "tls_reload_refused", "Reloads refused because a certificate or key did not load or match" => tls_reload_refused,
            "tls_handshake_failures", "Client TLS handshakes that failed (malformed SNI, no common version, ...)" => tls_handshake_failures,
            "upgrades", "Binary upgrades (SIGUSR2): ok counted by the new process, failed by the old" => upgrades,
            "upstream_connects", "New connections to workers" => upstream_connects,
            "upstream_verifications", "Connection checks (GET health.path) on new worker connections" => upstream_verifications,
            "upstream_reuses", "Requests sent over a reused worker connection" => upstream_reuses,
            "backend_in_flight", "Requests holding a slot at the worker (workers with max_inflight)" => backend_in_flight,
            "backend_queued", "Requests waiting for a slot at the worker" => backend_queued,
            "queue_wait_seconds", "Time requests that queued waited for a slot" => queue_wait,
            "admission_rejected", "Requests refused a slot, by worker and reason (queue_timeout, queue_full)" => admission_rejected,
            "rate_limited", "Requests refused by a rate-limit rule" => rate_limited,
            "rate_limit_keys", "Keys tracked by a rate-limit rule" => rate_limit_keys,
        );
        Metrics { registry, ..m }
    }

    /// Renders the Prometheus text format, refreshing the scrape-time
    /// gauges.
    pub(crate) fn render(&self, set: &BackendSet, c: ContinuityGauges, upstream: Stats) -> String {
        {
            let mut seen = self.upstream_seen.lock().unwrap_or_else(|p| p.into_inner());
            let delta = |now: u64, then: u64| now.saturating_sub(then);
            self.upstream_connects
                .inc_by(delta(upstream.connects, seen.connects));
            self.upstream_verifications
                .inc_by(delta(upstream.verifications, seen.verifications));
            self.upstream_reuses
                .inc_by(delta(upstream.reuses, seen.reuses));
            *seen = upstream;
        }
        let n = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        self.capture_queue.set(n(c.capture_queue));
        self.buffered.set(n(c.buffered));
        self.buffered_bytes.set(n(c.buffered_bytes));
        self.store_up.set(i64::from(c.store_up));
        self.backend_up.clear();
        self.backend_sessions.clear();
        self.backend_in_flight.clear();
        self.backend_queued.clear();
        for b in set.all() {
            let label = BackendLabel {
                backend: b.id.clone(),
            };
            self.backend_in_flight
                .get_or_create(&label)
                .set(n(b.slots.in_flight()));
            self.backend_queued
                .get_or_create(&label)
                .set(n(b.slots.queued()));
            self.backend_up
                .get_or_create(&label)
                .set(i64::from(b.is_usable()));
            self.backend_sessions
                .get_or_create(&label)
                .set(b.sessions());
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    // === recorders ===

    /// Counts one request and its latency. A worker's five counters are
    /// looked up once and kept on the worker: no label allocation or map
    /// lookup per request.
    pub(crate) fn request(&self, status: http::StatusCode, backend: Option<&Backend>, secs: f64) {
        self.latency.observe(secs);
        self.answered.fetch_add(1, Ordering::Relaxed);
        if status.is_server_error() {
            self.answered_5xx.fetch_add(1, Ordering::Relaxed);
        }
        let i = match status.as_u16() {
            100..=199 => 0,
            200..=299 => 1,
            300..=399 => 2,
            400..=499 => 3,
            _ => 4,
        };
        match backend {
            Some(b) => b.request_counters.get_or_init(|| {
                CLASSES.map(|class| {
                    self.requests
                        .get_or_create(&RequestLabels {
                            class,
                            backend: b.id.clone(),
                        })
                        .clone()
                })
            })[i]
                .inc(),
            None => self
                .requests
                .get_or_create(&RequestLabels {
                    class: CLASSES[i],
                    backend: "none".to_owned(),
                })
                .inc(),
        };
    }

    /// Requests answered so far, and how many with a 5xx.
    pub(crate) fn request_totals(&self) -> RequestTotals {
        RequestTotals {
            total: self.answered.load(Ordering::Relaxed),
            errors: self.answered_5xx.load(Ordering::Relaxed),
        }
    }

    /// A session moved to another worker (or restarted in place).
    pub(crate) fn repin(&self, reason: &'static str) {
        self.repins.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// An affinity cookie treated as absent.
    pub(crate) fn cookie_reject(&self, reason: &'static str) {
        self.cookie_rejects
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// A request sent again.
    pub(crate) fn retry(&self) {
        self.retries.inc();
    }

    /// One active probe.
    pub(crate) fn probe(&self, backend: &str, ok: bool) {
        self.probes
            .get_or_create(&ProbeLabels {
                backend: backend.to_owned(),
                result: if ok { "ok" } else { "fail" },
            })
            .inc();
    }

    /// A passive ejection.
    pub(crate) fn ejection(&self, backend: &str) {
        self.ejections
            .get_or_create(&BackendLabel {
                backend: backend.to_owned(),
            })
            .inc();
    }

    /// A worker restart seen through `Tether-Instance`.
    pub(crate) fn instance_change(&self, backend: &str) {
        self.instance_changes
            .get_or_create(&BackendLabel {
                backend: backend.to_owned(),
            })
            .inc();
    }

    /// One session move and how long it took.
    pub(crate) fn restore(&self, outcome: &'static str, secs: f64) {
        self.restore_duration.observe(secs);
        self.restores.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    /// One capture pull, by result (`ok`, `error`, `buffered`, `lost`).
    pub(crate) fn capture(&self, reason: &'static str) {
        self.captures.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// Entries newly stored by capture.
    pub(crate) fn captured_entries(&self, n: u64) {
        self.captured_entries.inc_by(n);
    }

    /// A capture hint dropped from a full queue.
    pub(crate) fn capture_dropped(&self) {
        self.capture_dropped.inc();
    }

    /// A capture write refused by the fence.
    pub(crate) fn capture_fenced(&self) {
        self.capture_fenced.inc();
    }

    /// A capture lost because the store was down and the buffer full.
    pub(crate) fn buffer_dropped(&self) {
        self.buffer_dropped.inc();
    }

    /// Session writes dropped.
    pub(crate) fn store_writes_dropped(&self, n: u64) {
        self.store_writes_dropped.inc_by(n);
    }

    /// A client connection opened (`true`) or closed (`false`).
    pub(crate) fn connection(&self, open: bool) {
        if open {
            self.connections.inc();
        } else {
            self.connections.dec();
        }
    }

    /// A client connection refused at `limits.max_connections`.
    pub(crate) fn connection_refused(&self) {
        self.connections_refused.inc();
    }

    /// A reload refused for its certificates (the old ones keep serving).
    pub(crate) fn tls_reload_refused(&self) {
        self.tls_reload_refused.inc();
    }

    /// A client TLS handshake that failed.
    pub(crate) fn tls_handshake_failed(&self) {
        self.tls_handshake_failures.inc();
    }

    /// A request that queued got its slot after `secs`.
    pub(crate) fn queue_wait(&self, backend: &str, secs: f64) {
        self.queue_wait
            .get_or_create(&BackendLabel {
                backend: backend.to_owned(),
            })
            .observe(secs);
    }

    /// A request refused a slot (`queue_timeout`, `queue_full`).
    pub(crate) fn admission_rejected(&self, backend: &str, reason: &'static str) {
        self.admission_rejected
            .get_or_create(&RejectLabels {
                backend: backend.to_owned(),
                reason,
            })
            .inc();
    }

    /// The counter of requests a rate-limit rule refused (resolved once
    /// per rule).
    pub(crate) fn rate_limited_counter(&self, rule: &str) -> Counter {
        self.rate_limited
            .get_or_create(&RuleLabel {
                rule: rule.to_owned(),
            })
            .clone()
    }

    /// The gauge of keys a rate-limit rule tracks (resolved once per rule).
    pub(crate) fn rate_limit_keys_gauge(&self, rule: &str) -> Gauge {
        self.rate_limit_keys
            .get_or_create(&RuleLabel {
                rule: rule.to_owned(),
            })
            .clone()
    }

    /// One binary upgrade: `ok` or `failed`.
    pub(crate) fn upgrade(&self, outcome: &'static str) {
        self.upgrades.get_or_create(&OutcomeLabel { outcome }).inc();
    }
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
