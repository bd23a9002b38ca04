//! tether-relay: the cloud side of Tether. An Open Inference Protocol (KServe V2) HTTP server for
//! the zoo's cloud models, with dynamic batching, per-device auth and rate limits, upstream
//! forwarding to other V2 servers, model artifacts for device updates, and Prometheus metrics.
//!
//! [`app`] builds the router from a [`State`]; [`serve`] runs it on a listener until shutdown.
//! The relay keeps no state between requests beyond its counters, so it scales out behind any
//! load balancer.

pub mod auth;
pub mod batcher;
pub mod bench;
pub mod binary;
pub mod config;
pub mod error;
pub mod metrics;
pub mod routes;
pub mod upstream;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use models::{Engine, EngineConfig};
use tokio::sync::Semaphore;

use crate::auth::Auth;
use crate::batcher::Batcher;
use crate::config::Config;
use crate::metrics::Metrics;

pub use routes::app;

/// The relay's version, reported at `GET /v2`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Everything a request handler needs; cheap to clone.
#[derive(Debug, Clone)]
pub struct State(pub Arc<Inner>);

#[derive(Debug)]
pub struct Inner {
    pub config: Config,
    pub engine: Engine,
    pub batchers: BTreeMap<String, Batcher>,
    pub upstream: upstream::Upstreams,
    pub auth: Auth,
    pub metrics: Arc<Metrics>,
}

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Models(#[from] models::ModelError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("the HTTP server failed: {0}")]
    Serve(std::io::Error),
    #[error("the model loader failed: {0}")]
    Join(String),
}

impl State {
    /// Loads the models and starts one batcher per locally served model. Must run inside a
    /// tokio runtime (the batchers are tasks).
    pub fn build(config: Config) -> Result<State, RelayError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let engine = EngineConfig {
            variant: config.variant,
            max_elements: config.max_elements,
            ..EngineConfig::default()
        }
        .build(&config.models_dir)?;
        let metrics = Arc::new(Metrics::default());
        let workers = Arc::new(Semaphore::new(config.workers));
        let mut batchers = BTreeMap::new();
        for model in engine.models() {
            let settings = config.models.get(model.name());
            if settings.is_some_and(|s| s.upstream.is_some()) {
                continue;
            }
            let batching = settings.and_then(|s| s.batching).unwrap_or(config.batching);
            batchers.insert(
                model.name().to_owned(),
                Batcher::spawn(model.clone(), batching, workers.clone(), metrics.clone()),
            );
        }
        let upstream = upstream::Upstreams::new(&config);
        let auth = Auth::new(
            &config.tokens,
            config.rate_limit_rps,
            config.rate_limit_burst,
        );
        Ok(State(Arc::new(Inner {
            config,
            engine,
            batchers,
            upstream,
            auth,
            metrics,
        })))
    }
}

/// Serves until `shutdown` completes, then drains requests in flight within the grace period.
pub async fn serve(
    state: State,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RelayError> {
    let grace = state.0.config.shutdown_grace;
    if !state.0.auth.enabled() {
        tracing::warn!(
            "No device tokens are configured: this relay serves anyone who can reach it. Add [[auth.tokens]] to relay.toml."
        );
    }
    let addr = listener.local_addr().map_err(RelayError::Serve)?;
    tracing::info!(%addr, models = %state.0.engine.models().map(|m| m.name()).collect::<Vec<_>>().join(", "), "Relay serving.");
    let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, app(state)).with_graceful_shutdown(async move {
        shutdown.await;
        tracing::info!(
            grace_ms = grace.as_millis(),
            "Shutting down: draining requests in flight."
        );
        let _ = drained_tx.send(());
    });
    let mut server = std::pin::pin!(server.into_future());
    tokio::select! {
        result = &mut server => result.map_err(RelayError::Serve),
        () = async {
            let _ = drained_rx.await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!("Grace period over with requests still in flight; stopping anyway.");
            Ok(())
        }
    }
}
