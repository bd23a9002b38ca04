//! Prometheus metrics of the relay (prometheus-client): requests and errors by model and code,
//! latency with queue and compute apart, batch sizes. Rendered as text at `/metrics`.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;
type Histograms = Family<Labels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 50 us .. ~13 s
    Histogram::new(exponential_buckets(0.000_05, 2.0, 19))
}

fn batch_histogram() -> Histogram {
    Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0])
}

/// The relay's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<Labels, Counter>,
    latency: Histograms,
    queue: Histograms,
    compute: Histograms,
    batch: Histograms,
    /// Open client connections.
    pub connections: Gauge,
    /// Batches whose engine call panicked (their callers were answered 500).
    pub panics: Counter,
    /// Requests dropped from a queue because their deadline passed before they ran.
    pub expired: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tether_relay");
        let requests = Family::<Labels, Counter>::default();
        let latency: Histograms = Family::new_with_constructor(latency_histogram);
        let queue: Histograms = Family::new_with_constructor(latency_histogram);
        let compute: Histograms = Family::new_with_constructor(latency_histogram);
        let batch: Histograms = Family::new_with_constructor(batch_histogram);
        let connections = Gauge::default();
        let panics = Counter::default();
        let expired = Counter::default();
        registry.register(
            "connections",
            "Open client connections",
            connections.clone(),
        );
        registry.register(
            "batch_panics",
            "Batches whose engine call panicked; their requests were answered 500",
            panics.clone(),
        );
        registry.register(
            "expired",
            "Requests dropped from a queue because their deadline passed before they ran",
            expired.clone(),
        );
        registry.register(
            "requests",
            "Inference requests by model and outcome code",
            requests.clone(),
        );
        registry.register(
            "request_seconds",
            "Time from request to response, by model",
            latency.clone(),
        );
        registry.register(
            "queue_seconds",
            "Time requests wait for a batch and a worker, by model",
            queue.clone(),
        );
        registry.register(
            "compute_seconds",
            "Time of the batched engine call, by model",
            compute.clone(),
        );
        registry.register(
            "batch_rows",
            "Rows per engine call, by model",
            batch.clone(),
        );
        Metrics {
            registry,
            requests,
            latency,
            queue,
            compute,
            batch,
            connections,
            panics,
            expired,
        }
    }
}

fn model_label(model: &str) -> Labels {
    vec![("model".to_owned(), model.to_owned())]
}

impl Metrics {
    /// Counts one request with its outcome (`ok` or an error code).
    pub fn count(&self, model: &str, code: &str) {
        self.requests
            .get_or_create(&vec![
                ("model".to_owned(), model.to_owned()),
                ("code".to_owned(), code.to_owned()),
            ])
            .inc();
    }

    pub fn observe_latency(&self, model: &str, total: std::time::Duration) {
        self.latency
            .get_or_create(&model_label(model))
            .observe(total.as_secs_f64());
    }

    pub fn observe_parts(
        &self,
        model: &str,
        queue: std::time::Duration,
        compute: std::time::Duration,
    ) {
        self.queue
            .get_or_create(&model_label(model))
            .observe(queue.as_secs_f64());
        self.compute
            .get_or_create(&model_label(model))
            .observe(compute.as_secs_f64());
    }

    #[allow(clippy::cast_precision_loss)]
    pub fn observe_batch(&self, model: &str, rows: usize) {
        self.batch
            .get_or_create(&model_label(model))
            .observe(rows as f64);
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
