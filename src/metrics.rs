//! Prometheus metrics (prometheus-client): the registry and every family
//! tether exports. Per-worker gauges are filled in at scrape time.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::backends::{Backend, BackendSet};

/// Labels: status class and worker.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `2xx`, `3xx`, `4xx`, `5xx` (or `1xx`).
    pub class: &'static str,
    /// Backend id, or `none` when no worker was chosen.
    pub backend: String,
}

/// Label: one worker.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabel {
    /// Backend id.
    pub backend: String,
}

/// Label: a reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Stable reason label.
    pub reason: &'static str,
}

/// Label: an outcome (of a restore).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// Stable outcome label.
    pub outcome: &'static str,
}

/// Labels: a probe's worker and result.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabels {
    /// Backend id.
    pub backend: String,
    /// `ok` or `fail`.
    pub result: &'static str,
}

/// Every metric family.
pub struct Metrics {
    registry: Registry,
    /// Requests by status class and worker.
    pub requests: Family<RequestLabels, Counter>,
    /// Time to response head.
    pub latency: Histogram,
    /// Re-pins by reason.
    pub repins: Family<ReasonLabel, Counter>,
    /// Rejected affinity cookies by reason.
    pub cookie_rejects: Family<ReasonLabel, Counter>,
    /// Retries of a request on another worker.
    pub retries: Counter,
    /// Active probe results.
    pub probes: Family<ProbeLabels, Counter>,
    /// Passive ejections.
    pub ejections: Family<BackendLabel, Counter>,
    /// `Tether-Instance` changes (worker restarted with empty memory).
    pub instance_changes: Family<BackendLabel, Counter>,
    /// Worker state: 1 up, 0 not (scrape time).
    pub backend_up: Family<BackendLabel, Gauge>,
    /// Live pinned sessions per worker (scrape time).
    pub backend_sessions: Family<BackendLabel, Gauge>,
    /// Restores by outcome (`ok`, `failed`, `followed`).
    pub restores: Family<OutcomeLabel, Counter>,
    /// Restore duration.
    pub restore_duration: Histogram,
    /// Capture pulls by result.
    pub captures: Family<ReasonLabel, Counter>,
    /// Entries appended to the store by capture.
    pub captured_entries: Counter,
    /// Capture hints dropped because the queue was full.
    pub capture_dropped: Counter,
    /// Capture hints waiting (scrape time).
    pub capture_queue: Gauge,
    /// Session writes dropped (queue full or store down).
    pub store_writes_dropped: Counter,
    /// Client connections open now.
    pub connections: Gauge,
    /// Client connections refused at `limits.max_connections`.
    pub connections_refused: Counter,
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

impl Metrics {
    /// Registers every family.
    pub fn new() -> Metrics {
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
            capture_queue: Gauge::default(),
            store_writes_dropped: Counter::default(),
            connections: Gauge::default(),
            connections_refused: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Proxied requests by status class and worker",
            m.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request to response head",
            m.latency.clone(),
        );
        registry.register(
            "repins",
            "Sessions moved to another worker, by reason",
            m.repins.clone(),
        );
        registry.register(
            "cookie_rejects",
            "Affinity cookies treated as absent, by reason",
            m.cookie_rejects.clone(),
        );
        registry.register(
            "retries",
            "Requests retried on another worker",
            m.retries.clone(),
        );
        registry.register(
            "probes",
            "Active health probes by worker and result",
            m.probes.clone(),
        );
        registry.register(
            "ejections",
            "Passive ejections by worker",
            m.ejections.clone(),
        );
        registry.register(
            "instance_changes",
            "Worker restarts seen through Tether-Instance",
            m.instance_changes.clone(),
        );
        registry.register(
            "backend_up",
            "1 when the worker is usable",
            m.backend_up.clone(),
        );
        registry.register(
            "backend_sessions",
            "Live sessions pinned to the worker",
            m.backend_sessions.clone(),
        );
        registry.register("restores", "Thread restores by outcome", m.restores.clone());
        registry.register(
            "restore_duration_seconds",
            "Time to restore a session's threads into a worker",
            m.restore_duration.clone(),
        );
        registry.register("captures", "Capture pulls by result", m.captures.clone());
        registry.register(
            "captured_entries",
            "Thread entries stored by capture",
            m.captured_entries.clone(),
        );
        registry.register(
            "capture_dropped",
            "Capture hints dropped: queue full",
            m.capture_dropped.clone(),
        );
        registry.register(
            "capture_queue",
            "Capture hints waiting",
            m.capture_queue.clone(),
        );
        registry.register(
            "store_writes_dropped",
            "Session writes dropped: queue full or store down",
            m.store_writes_dropped.clone(),
        );
        registry.register(
            "connections",
            "Open client connections",
            m.connections.clone(),
        );
        registry.register(
            "connections_refused",
            "Client connections refused at limits.max_connections",
            m.connections_refused.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Renders the Prometheus text format, refreshing per-worker gauges.
    pub fn render(&self, set: &BackendSet, capture_queue: usize) -> String {
        self.capture_queue
            .set(i64::try_from(capture_queue).unwrap_or(i64::MAX));
        self.backend_up.clear();
        self.backend_sessions.clear();
        for b in set.all() {
            let label = BackendLabel {
                backend: b.id.clone(),
            };
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
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

impl Metrics {
    /// Counts one request. A worker's five counters are looked up once and
    /// kept on the worker: no label allocation or map lookup per request.
    pub fn count_request(&self, status: http::StatusCode, backend: Option<&Backend>) {
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
}

/// The status class label of a status code.
pub fn class(status: http::StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}
