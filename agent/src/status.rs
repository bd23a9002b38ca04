//! What the agent says about itself: the retained device status (`{prefix}/{device_id}/status`,
//! including whether every stage is alive), and the Prometheus `/metrics` endpoint.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde_json::json;

use crate::cloud::Cloud;
use crate::config::{Config, Mode};
use crate::live::Live;
use crate::metrics::{Metrics, Snapshot};
use crate::pipeline::{QueueProbe, StageHealth};
use crate::policy::BreakerState;
use crate::store::{Counters, StoreHandle};

/// Where the status reads the stages' health.
#[derive(Debug, Clone)]
pub struct Health {
    pub pipeline: StageHealth,
    pub store: StoreHandle,
    pub metrics: Metrics,
    pub live: Live,
}

/// The stages as the status reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stages {
    pub front: bool,
    pub workers: usize,
    pub store: bool,
    /// Models that left their accelerated runtime for the CPU.
    pub fallbacks: usize,
}

impl Stages {
    /// Every stage a request needs is alive.
    pub fn serving(&self) -> bool {
        self.front && self.workers > 0 && self.store
    }
}

impl Health {
    pub fn stages(&self) -> Stages {
        let (front, workers) = self.pipeline.alive();
        Stages {
            front,
            workers,
            store: self.store.is_alive(),
            fallbacks: self
                .live
                .get()
                .engine
                .models()
                .filter(|m| m.fallback().is_some())
                .count(),
        }
    }
}

/// The device's retained status (`{prefix}/{device_id}/status`), as of now.
pub fn device_status(
    online: bool,
    config: &Config,
    live: &Live,
    counters: &Counters,
    started_at: &str,
    health: &Health,
) -> Vec<u8> {
    use std::sync::atomic::Ordering::Relaxed;
    let settings = live.get();
    let models: Vec<_> = settings
        .engine
        .models()
        .map(|m| json!({"name": m.name(), "version": m.spec().version, "variant": m.variant().variant.as_str(), "sha256": m.sha256(), "runtime": m.runtime(), "fallback": m.fallback(), "loaded": m.is_loaded()}))
        .collect();
    let c = counters;
    let stages = health.stages();
    serde_json::to_vec(&json!({
        "online": online,
        "device_id": config.device_id,
        "agent_version": crate::VERSION,
        "models": models,
        "config_version": settings.config_version,
        "groups": config.fleet.groups,
        "pool": config.pool,
        "workers": config.inference.workers,
        "started_at": started_at,
        "relay": config.relay.as_ref().map(|r| r.url.to_string()),
        "local_only": config.relay.is_none() || settings.policy.policy.mode == Mode::LocalOnly,
        "policy": settings.policy.policy.mode,
        "outbox": {
            "rows": c.outbox_rows.load(Relaxed),
            "bytes": c.outbox_bytes.load(Relaxed),
            "dropped": c.outbox_dropped.load(Relaxed),
        },
        "cache": {
            "rows": c.cache_rows.load(Relaxed),
            "bytes": c.cache_bytes.load(Relaxed),
            "evicted": c.cache_evicted.load(Relaxed),
        },
        "serving": stages.serving(),
        "stages": {
            "front": stages.front,
            "workers": stages.workers,
            "workers_configured": config.inference.workers,
            "store": stages.store,
        },
        "panics": health.metrics.panics_total(),
    }))
    .unwrap_or_default()
}

/// Serves `/metrics` on `listener` until the task is aborted.
pub fn serve_metrics(
    listener: tokio::net::TcpListener,
    metrics: Metrics,
    counters: Arc<Counters>,
    probe: QueueProbe,
    in_service: Arc<std::sync::atomic::AtomicUsize>,
    cloud: Option<Cloud>,
    quality: Arc<crate::quality::Quality>,
) -> tokio::task::JoinHandle<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let snap = Snapshot {
                queue_depth: probe.len(),
                in_service: in_service.load(Ordering::Relaxed),
                circuit: match cloud.as_ref().map(Cloud::circuit) {
                    None => -1,
                    Some(BreakerState::Closed) => 0,
                    Some(BreakerState::HalfOpen) => 1,
                    Some(BreakerState::Open) => 2,
                },
            };
            let text = metrics.render(snap, &counters, &quality.counters);
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    text,
                )
            }
        }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    })
}

/// The address a listener is bound to, or the one asked for.
pub fn bound(listener: &tokio::net::TcpListener, asked: SocketAddr) -> SocketAddr {
    listener.local_addr().unwrap_or(asked)
}
