//! The agent's Prometheus metrics (prometheus-client): requests by route and reason, latency
//! per route, and at scrape time the queue depth, cache hits, outbox depth and the relay's
//! circuit. Served at `/metrics` when `metrics.listen` is set.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::policy::Reason;

type Labels = Vec<(String, String)>;
type Histograms = Family<Labels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 50 us .. ~13 s
    Histogram::new(exponential_buckets(0.000_05, 2.0, 19))
}

/// The cheap, cloneable metrics handle.
#[derive(Debug, Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    routes: Family<Labels, Counter>,
    latency: Histograms,
    queue_depth: Gauge,
    in_service: Gauge,
    cache_hits: Gauge,
    cache_misses: Gauge,
    outbox_rows: Gauge,
    outbox_dropped: Gauge,
    circuit_open: Gauge,
    /// Since the last telemetry message.
    window: std::sync::Mutex<Window>,
}

/// Latencies per model and requests per route since the window was last taken (telemetry).
#[derive(Debug, Default, Clone)]
pub struct Window {
    /// Milliseconds, the most recent [`WINDOW_SAMPLES`] per model.
    pub latency_ms: std::collections::BTreeMap<String, std::collections::VecDeque<f32>>,
    /// Requests by route: local, cloud, cache, reject.
    pub routes: std::collections::BTreeMap<String, u64>,
}

/// Latencies kept per model per telemetry window (bounds memory at any request rate).
pub const WINDOW_SAMPLES: usize = 4096;

/// What is read at scrape time.
#[derive(Debug, Clone, Copy, Default)]
pub struct Snapshot {
    pub queue_depth: usize,
    pub in_service: usize,
    /// 0 closed, 1 half-open, 2 open; -1 without a relay.
    pub circuit: i64,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tether_agent");
        let routes = Family::<Labels, Counter>::default();
        let latency: Histograms = Family::new_with_constructor(latency_histogram);
        let g = Gauge::default;
        let (
            queue_depth,
            in_service,
            cache_hits,
            cache_misses,
            outbox_rows,
            outbox_dropped,
            circuit_open,
        ) = (g(), g(), g(), g(), g(), g(), g());
        registry.register(
            "requests",
            "Requests answered or refused, by route (local, cache, cloud, reject) and reason",
            routes.clone(),
        );
        registry.register(
            "latency_seconds",
            "From arrival to reply, by route",
            latency.clone(),
        );
        registry.register(
            "queue_depth",
            "Requests waiting for a local worker",
            queue_depth.clone(),
        );
        registry.register(
            "in_service",
            "Requests a local worker is running",
            in_service.clone(),
        );
        registry.register(
            "cache_hits",
            "Result cache hits since start",
            cache_hits.clone(),
        );
        registry.register(
            "cache_misses",
            "Result cache misses since start",
            cache_misses.clone(),
        );
        registry.register(
            "outbox_rows",
            "Messages waiting in the outbox",
            outbox_rows.clone(),
        );
        registry.register(
            "outbox_dropped",
            "Messages ever dropped because the outbox was full",
            outbox_dropped.clone(),
        );
        registry.register(
            "relay_circuit",
            "The relay's circuit: 0 closed, 1 half-open, 2 open, -1 no relay",
            circuit_open.clone(),
        );
        Metrics {
            inner: Arc::new(Inner {
                registry,
                routes,
                latency,
                queue_depth,
                in_service,
                cache_hits,
                cache_misses,
                outbox_rows,
                outbox_dropped,
                circuit_open,
                window: Default::default(),
            }),
        }
    }
}

impl Metrics {
    /// Counts a request by where it went and why.
    pub fn routed(&self, route: &str, reason: Reason) {
        *self.window().routes.entry(route.to_owned()).or_default() += 1;
        self.inner
            .routes
            .get_or_create(&vec![
                ("route".into(), route.into()),
                ("reason".into(), reason.as_str().into()),
            ])
            .inc();
    }

    pub fn latency(&self, model: &str, route: &str, seconds: f64) {
        {
            let mut w = self.window();
            // On the request path: no allocation once the model has its queue, O(1) when full.
            let samples = match w.latency_ms.get_mut(model) {
                Some(s) => s,
                None => w.latency_ms.entry(model.to_owned()).or_default(),
            };
            if samples.len() >= WINDOW_SAMPLES {
                samples.pop_front();
            }
            samples.push_back((seconds * 1e3) as f32);
        }
        self.inner
            .latency
            .get_or_create(&vec![("route".into(), route.into())])
            .observe(seconds);
    }

    fn window(&self) -> std::sync::MutexGuard<'_, Window> {
        self.inner.window.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What was recorded since the last call, and a fresh window.
    pub fn take_window(&self) -> Window {
        std::mem::take(&mut *self.window())
    }

    /// The text exposition, with the scrape-time values filled in.
    pub fn render(&self, snap: Snapshot, store: &crate::store::Counters) -> String {
        let i = &self.inner;
        let as_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        i.queue_depth.set(snap.queue_depth as i64);
        i.in_service.set(snap.in_service as i64);
        i.circuit_open.set(snap.circuit);
        i.cache_hits
            .set(as_i64(store.cache_hits.load(Ordering::Relaxed)));
        i.cache_misses
            .set(as_i64(store.cache_misses.load(Ordering::Relaxed)));
        i.outbox_rows
            .set(as_i64(store.outbox_rows.load(Ordering::Relaxed)));
        i.outbox_dropped
            .set(as_i64(store.outbox_dropped.load(Ordering::Relaxed)));
        let mut out = String::new();
        if encode(&mut out, &i.registry).is_err() {
            out.clear();
        }
        out
    }
}
