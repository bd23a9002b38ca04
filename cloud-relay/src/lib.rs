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
pub mod tfserving;
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
    /// What a reload (SIGHUP) may change: tokens, rate limits, per-request limits.
    reloadable: std::sync::RwLock<Arc<Reloadable>>,
    pub metrics: Arc<Metrics>,
    /// Kibibytes of request bodies that may be parsed at once (`limits.max_parse_bytes`).
    pub parse_kib: Semaphore,
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
        let parse_kib = Semaphore::new(config.max_parse_bytes.div_ceil(1024));
        Ok(State(Arc::new(Inner {
            parse_kib,
            reloadable: std::sync::RwLock::new(Arc::new(Reloadable::from(&config))),
            config,
            engine,
            batchers,
            upstream,
            metrics,
        })))
    }

    /// The tokens and per-request limits in force (one `Arc` per request).
    pub fn now(&self) -> Arc<Reloadable> {
        self.0
            .reloadable
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Puts `config`'s tokens, rate limits and per-request limits in force (SIGHUP); returns
    /// the keys that differ but only a restart applies, which stay as they were.
    pub fn reload(&self, config: &Config) -> Vec<&'static str> {
        let now = Arc::new(Reloadable::from(config));
        *self.0.reloadable.write().unwrap_or_else(|p| p.into_inner()) = now;
        let old = &self.0.config;
        let mut restart = Vec::new();
        let mut differs = |key, changed: bool| {
            if changed {
                restart.push(key);
            }
        };
        differs("listen", old.listen != config.listen);
        differs("models_dir", old.models_dir != config.models_dir);
        differs("variant", old.variant != config.variant);
        differs("workers", old.workers != config.workers);
        differs(
            "shutdown_grace_ms",
            old.shutdown_grace != config.shutdown_grace,
        );
        differs(
            "limits.header_timeout_ms",
            old.header_timeout != config.header_timeout,
        );
        differs(
            "limits.max_connections",
            old.max_connections != config.max_connections,
        );
        differs(
            "limits.max_parse_bytes",
            old.max_parse_bytes != config.max_parse_bytes,
        );
        differs("batching", old.batching != config.batching);
        differs("models", old.models != config.models);
        restart
    }
}

/// The part of the configuration a reload changes in a running relay.
#[derive(Debug)]
pub struct Reloadable {
    pub auth: Auth,
    pub max_body_bytes: usize,
    pub max_elements: usize,
    pub request_timeout: std::time::Duration,
}

impl From<&Config> for Reloadable {
    fn from(config: &Config) -> Reloadable {
        Reloadable {
            auth: Auth::new(
                &config.tokens,
                config.rate_limit_rps,
                config.rate_limit_burst,
            ),
            max_body_bytes: config.max_body_bytes,
            max_elements: config.max_elements,
            request_timeout: config.request_timeout,
        }
    }
}

/// Serves until `shutdown` completes, then drains requests in flight within the grace period.
///
/// HTTP/1 with hyper's own connection loop rather than `axum::serve`, which sets neither a
/// header deadline nor a connection limit: a client must send its headers within
/// `limits.header_timeout_ms` (a slowloris is closed), at most `limits.max_connections` are open
/// at once (more wait in the listen backlog), and the rest of a request's time is bounded in the
/// routes (`limits.request_timeout_ms`, reading the body included).
pub async fn serve(
    state: State,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RelayError> {
    let config = &state.0.config;
    let grace = config.shutdown_grace;
    if !state.now().auth.enabled() {
        tracing::warn!(
            "No device tokens are configured: this relay serves anyone who can reach it. Add [[auth.tokens]] to relay.toml."
        );
    }
    let addr = listener.local_addr().map_err(RelayError::Serve)?;
    tracing::info!(%addr, models = %state.0.engine.models().map(|m| m.name()).collect::<Vec<_>>().join(", "), "Relay serving.");
    let connections = Arc::new(Semaphore::new(config.max_connections));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(config.header_timeout)
        .keep_alive(true);
    let router = app(state.clone());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            p = connections.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait for connections to close.
                    tracing::warn!(error = %e, "Cannot accept a connection; retrying shortly.");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let conn =
            graceful.watch(http.serve_connection(hyper_util::rt::TokioIo::new(stream), service));
        let metrics = state.0.metrics.clone();
        tokio::spawn(async move {
            metrics.connections.inc();
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "A connection ended with an error.");
            }
            metrics.connections.dec();
            drop(permit);
        });
    }
    drop(listener);
    tracing::info!(
        grace_ms = grace.as_millis(),
        "Shutting down: draining requests in flight."
    );
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(grace) => {
            tracing::warn!("Grace period over with requests still in flight; stopping anyway.");
        }
    }
    Ok(())
}
