//! The agent's Prometheus metrics (prometheus-client): requests by route and reason, latency
//! per route, errors by code, panics by stage, duplicates, expiries and deadlines, and at
//! scrape time the queue depth, cache hits, outbox depth and the relay's circuit. Served at
//! `/metrics` when `metrics.listen` is set.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::policy::Reason;
use crate::protocol::ErrorCode;

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
    cache_hits: Counter,
    cache_misses: Counter,
    outbox_rows: Gauge,
    outbox_dropped: Counter,
    circuit_open: Gauge,
    errors: Family<Labels, Counter>,
    panics: Family<Labels, Counter>,
    duplicates: Family<Labels, Counter>,
    lost: Counter,
    replies_expired: Counter,
    deadlines: Counter,
    late: Counter,
    inline: Counter,
    engine_fallbacks: Family<Labels, Counter>,
    outbox_expired: Counter,
    outbox_refused: Counter,
    audits: Family<Labels, Counter>,
    shadow_runs: Family<Labels, Counter>,
    observe_skipped: Family<Labels, Counter>,
    /// Held while a scrape brings the counters kept by the store up to date.
    scrape: std::sync::Mutex<()>,
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
        let (queue_depth, in_service, outbox_rows, circuit_open) = (g(), g(), g(), g());
        let (cache_hits, cache_misses, outbox_dropped) =
            (Counter::default(), Counter::default(), Counter::default());
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
        registry.register("cache_hits", "Result cache hits", cache_hits.clone());
        registry.register("cache_misses", "Result cache misses", cache_misses.clone());
        registry.register(
            "outbox_rows",
            "Messages waiting in the outbox",
            outbox_rows.clone(),
        );
        registry.register(
            "outbox_dropped",
            "Messages dropped because the outbox was full",
            outbox_dropped.clone(),
        );
        registry.register(
            "relay_circuit",
            "The relay's circuit: 0 closed, 1 half-open, 2 open, -1 no relay",
            circuit_open.clone(),
        );
        let errors = Family::<Labels, Counter>::default();
        registry.register(
            "errors",
            "Requests answered with an error, by code (overloaded ones are in requests{route=\"reject\"})",
            errors.clone(),
        );
        let panics = Family::<Labels, Counter>::default();
        registry.register(
            "panics",
            "Panics caught in a stage (front, worker, decode, observer); a request is answered internal and the stage goes on",
            panics.clone(),
        );
        let duplicates = Family::<Labels, Counter>::default();
        registry.register(
            "duplicates",
            "Requests delivered again (same response topic and correlation data, or reply_to and id): joined the first while it ran, or replayed its reply",
            duplicates.clone(),
        );
        let lost = Counter::default();
        registry.register(
            "lost_requests",
            "Requests dropped unanswered by a fault inside the agent (answered internal), or not taken in",
            lost.clone(),
        );
        let replies_expired = Counter::default();
        registry.register(
            "replies_expired",
            "Replies not published because their requester's Message Expiry had passed, when answered",
            replies_expired.clone(),
        );
        let deadlines = Counter::default();
        registry.register(
            "deadlines",
            "Requests answered overloaded the moment their budget ran out, queued or running",
            deadlines.clone(),
        );
        let inline = Counter::default();
        registry.register(
            "ran_inline",
            "Local requests run on the front stage's thread (a quick model, nothing waiting) instead of handed to a worker",
            inline.clone(),
        );
        let late = Counter::default();
        registry.register(
            "late_results",
            "Model results that came after their request's deadline and were dropped",
            late.clone(),
        );
        let engine_fallbacks = Family::<Labels, Counter>::default();
        registry.register(
            "engine_fallbacks",
            "Models whose accelerated runtime failed at run time and now run on the CPU",
            engine_fallbacks.clone(),
        );
        let outbox_expired = Counter::default();
        registry.register(
            "outbox_expired",
            "Stored replies not published because their requester's expiry passed",
            outbox_expired.clone(),
        );
        let outbox_refused = Counter::default();
        registry.register(
            "outbox_refused",
            "Stored messages dropped because the broker refused them",
            outbox_refused.clone(),
        );
        let audits = Family::<Labels, Counter>::default();
        registry.register(
            "audits",
            "Local answers asked of the relay's cloud model too and compared (policy.models.NAME.audit_rate), by outcome (ok, failed)",
            audits.clone(),
        );
        let shadow_runs = Family::<Labels, Counter>::default();
        registry.register(
            "shadow_runs",
            "Local answers run again on a candidate model named by the fleet and compared, by outcome (ok, failed)",
            shadow_runs.clone(),
        );
        let observe_skipped = Family::<Labels, Counter>::default();
        registry.register(
            "observe_skipped",
            "Audits and shadow runs drawn but not done, by reason (over_limits, relay_down, rate_limited, busy, queue_full)",
            observe_skipped.clone(),
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
                errors,
                panics,
                duplicates,
                lost,
                replies_expired,
                deadlines,
                late,
                inline,
                engine_fallbacks,
                outbox_expired,
                outbox_refused,
                audits,
                shadow_runs,
                observe_skipped,
                scrape: std::sync::Mutex::new(()),
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

    /// A request answered with an error of this code (`overloaded` is counted by route).
    pub fn refused(&self, code: ErrorCode) {
        let code = serde_json::to_value(code)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        self.inner
            .errors
            .get_or_create(&vec![("code".into(), code)])
            .inc();
    }

    /// A panic caught in `stage`.
    pub fn panic(&self, stage: &str) {
        self.inner
            .panics
            .get_or_create(&vec![("stage".into(), stage.into())])
            .inc();
    }

    /// A duplicate request: `joined` its first delivery, or `replayed` its reply.
    pub fn duplicate(&self, how: &str) {
        self.inner
            .duplicates
            .get_or_create(&vec![("how".into(), how.into())])
            .inc();
    }

    pub fn lost_request(&self) {
        self.inner.lost.inc();
    }

    pub fn reply_expired(&self) {
        self.inner.replies_expired.inc();
    }

    pub fn deadline_passed(&self) {
        self.inner.deadlines.inc();
    }

    pub fn ran_inline(&self) {
        self.inner.inline.inc();
    }

    pub fn late_result(&self) {
        self.inner.late.inc();
    }

    /// `model` fell back from its accelerated runtime to the CPU.
    pub fn engine_fallback(&self, model: &str) {
        self.inner
            .engine_fallbacks
            .get_or_create(&vec![("model".into(), model.into())])
            .inc();
    }

    /// Panics caught, over every stage (for the status).
    pub fn panics_total(&self) -> u64 {
        let mut total = 0;
        for stage in ["front", "worker", "decode", "observer"] {
            total += self
                .inner
                .panics
                .get_or_create(&vec![("stage".into(), stage.into())])
                .get();
        }
        total
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
    pub fn render(
        &self,
        snap: Snapshot,
        store: &crate::store::Counters,
        observed: &crate::quality::Counters,
    ) -> String {
        let i = &self.inner;
        let as_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        i.queue_depth.set(snap.queue_depth as i64);
        i.in_service.set(snap.in_service as i64);
        i.circuit_open.set(snap.circuit);
        i.outbox_rows
            .set(as_i64(store.outbox_rows.load(Ordering::Relaxed)));
        // The store keeps these as running totals; the counters catch up to them (under a lock,
        // so two scrapes at once cannot both add the same difference).
        let _scrape = i.scrape.lock().unwrap_or_else(|p| p.into_inner());
        for (counter, total) in [
            (&i.cache_hits, &store.cache_hits),
            (&i.cache_misses, &store.cache_misses),
            (&i.outbox_dropped, &store.outbox_dropped),
            (&i.outbox_expired, &store.outbox_expired),
            (&i.outbox_refused, &store.outbox_refused),
        ] {
            let total = total.load(Ordering::Relaxed);
            counter.inc_by(total.saturating_sub(counter.get()));
        }
        // So does the observer (audits and shadow runs), which counts for its reports.
        let label = |k: &str, v: &str| vec![(k.to_owned(), v.to_owned())];
        let o = observed;
        for (family, labels, total) in [
            (&i.audits, label("outcome", "ok"), &o.audits),
            (&i.audits, label("outcome", "failed"), &o.audits_failed),
            (&i.shadow_runs, label("outcome", "ok"), &o.shadow_runs),
            (&i.shadow_runs, label("outcome", "failed"), &o.shadow_failed),
            (
                &i.observe_skipped,
                label("reason", "over_limits"),
                &o.skipped_over_limits,
            ),
            (
                &i.observe_skipped,
                label("reason", "relay_down"),
                &o.skipped_relay_down,
            ),
            (
                &i.observe_skipped,
                label("reason", "rate_limited"),
                &o.skipped_rate_limited,
            ),
            (&i.observe_skipped, label("reason", "busy"), &o.skipped_busy),
            (
                &i.observe_skipped,
                label("reason", "queue_full"),
                &o.dropped,
            ),
        ] {
            let total = total.load(Ordering::Relaxed);
            if total > 0 {
                let counter = family.get_or_create(&labels);
                counter.inc_by(total.saturating_sub(counter.get()));
            }
        }
        let mut out = String::new();
        if encode(&mut out, &i.registry).is_err() {
            out.clear();
        }
        out
    }
}
