//! The Tether agent: the device process. `main.rs` is only the command line; each module here
//! owns one responsibility and is testable alone, and [`run`] wires them together.

pub mod bench;
pub mod broker;
pub mod client;
pub mod cloud;
pub mod config;
#[cfg(feature = "demo")]
pub mod demo;
pub mod escalation;
pub mod fleet;
pub mod infer;
pub mod live;
pub mod loadgen;
pub mod metrics;
pub mod monitor;
pub mod mqtt;
pub mod policy;
pub mod protocol;
pub mod sensors;
pub mod serve;
pub mod store;
pub mod store_bench;
pub mod stream;

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use models::{EngineConfig, ModelError, Variant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::protocol::Topics;

/// Outbox messages in flight on the device connection at once.
const OUTBOX_WINDOW: usize = 64;

/// The agent's version, as reported in its status.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

static LOG_CONTROL: std::sync::OnceLock<fleet::LogControl> = std::sync::OnceLock::new();

/// Lets fleet documents change the log filter (`main` installs it; `None` restores the filter
/// the process started with).
pub fn set_log_control(control: fleet::LogControl) {
    let _ = LOG_CONTROL.set(control);
}

/// Where the model zoo is: the explicit choice, else `./models/zoo` when run from a checkout,
/// else the zoo of the source tree this binary was built from.
pub fn models_dir(explicit: Option<PathBuf>) -> PathBuf {
    if let Some(dir) = explicit {
        return dir;
    }
    let local = PathBuf::from("models/zoo");
    if local.join(models::manifest::MANIFEST_FILE).exists() {
        return local;
    }
    models::default_zoo_dir()
}

async fn join_all(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for t in tasks {
        let _ = t.await;
    }
}

/// Why the agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Models(#[from] ModelError),
    #[error(transparent)]
    Broker(#[from] broker::BrokerError),
    #[error("cannot start the inference workers: {0}")]
    Workers(std::io::Error),
    #[error("the model loader thread failed: {0}")]
    Join(String),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("cannot set up the relay client: {0}")]
    Relay(#[from] cloud::CloudError),
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the load monitor: {0}")]
    Monitor(std::io::Error),
    #[error("{0}")]
    Fleet(String),
    #[error("{0}")]
    Sensors(String),
}

/// What a running agent tells the code that started it (tests, the demo).
#[derive(Debug, Clone)]
pub struct Running {
    /// True while connected to the broker with the device's subscription in place.
    pub connected: watch::Receiver<bool>,
    /// The same for the pool's connection, when the agent is in a pool.
    pub pool_connected: Option<watch::Receiver<bool>>,
    /// The embedded broker's addresses, if one was started.
    pub embedded_broker: Option<broker::EmbeddedBroker>,
    /// The agent's database, for its counters (outbox depth, cache hits).
    pub store: store::StoreHandle,
    /// Where `/metrics` is served, if it is.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// The models, policy and cache rules in force (fleet updates switch them).
    pub live: live::Live,
    /// The sensors' counters and simulated actuators' pins.
    pub sensors: sensors::SensorsView,
}

/// Runs the agent until `shutdown` completes, then stops taking requests, finishes those in
/// flight within the grace period, publishes its offline status and disconnects.
/// `started` receives the running agent's handles once it is serving.
pub async fn run(
    mut config: Config,
    shutdown: impl Future<Output = ()>,
    started: Option<tokio::sync::oneshot::Sender<Running>>,
) -> Result<(), AgentError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let embedded = match &config.embedded_broker {
        Some(b) => {
            let addrs = broker::start(b, config.mqtt.max_payload_bytes)?;
            if b.connect {
                let addr = match config.mqtt.protocol {
                    config::Protocol::V5 => addrs.v5,
                    config::Protocol::V311 => addrs.v311,
                };
                config.mqtt.host = addr.ip().to_string();
                config.mqtt.port = addr.port();
            }
            Some(addrs)
        }
        None => None,
    };

    let dir = config.models_dir.clone();
    let engine_config = EngineConfig {
        variant: Variant::Device,
        max_elements: config.inference.max_elements,
        runtime: config.inference.runtime.clone(),
        ..EngineConfig::default()
    };
    let build_config = engine_config.clone();
    let engine = tokio::task::spawn_blocking(move || build_config.build(dir))
        .await
        .map_err(|e| AgentError::Join(e.to_string()))??;
    tracing::info!(models = %engine.models().map(|m| m.name()).collect::<Vec<_>>().join(", "), "Models loaded.");

    let store_cfg = config.store.clone();
    let (store, store_thread) =
        tokio::task::spawn_blocking(move || store::open(&store_cfg, store::OpenMode::Agent))
            .await
            .map_err(|e| AgentError::Join(e.to_string()))??;
    {
        let c = &store.counters;
        tracing::info!(
            path = %config.store.path.display(),
            outbox_rows = c.outbox_rows.load(Ordering::Relaxed),
            cache_rows = c.cache_rows.load(Ordering::Relaxed),
            "Database open."
        );
    }

    let topics = Topics::new(
        &config.topic_prefix,
        &config.device_id,
        config.pool.as_deref(),
    );
    let started_at = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let live = live::Live::new(live::Settings {
        engine: engine.clone(),
        policy: config.policy.clone(),
        cache: config.store.cache.clone(),
        config_version: None,
    });
    let status = |online: bool| -> std::sync::Arc<dyn Fn() -> Vec<u8> + Send + Sync> {
        let (config, live, counters, started_at) = (
            config.clone(),
            live.clone(),
            store.counters.clone(),
            started_at.clone(),
        );
        std::sync::Arc::new(move || {
            fleet::device_status(online, &config, &live, &counters, &started_at)
        })
    };
    let cloud = config.relay.as_ref().map(cloud::Cloud::new).transpose()?;
    match &config.relay {
        Some(r) => {
            tracing::info!(relay = %r.url, mode = ?config.policy.policy.mode, "Offloading to the relay when the policy says so.")
        }
        None => tracing::info!("No relay configured (--relay URL): every request runs here."),
    }
    let load_rx = monitor::spawn(config.policy.monitor_interval).map_err(AgentError::Monitor)?;
    let load_rx_telemetry = load_rx.clone();
    let metrics = metrics::Metrics::default();
    let runs = std::sync::Arc::new(serve::RunCounters::default());
    let routing = serve::Routing {
        live: live.clone(),
        health: runs.clone(),
        cloud: cloud.clone(),
        load_rx,
        times: std::sync::Arc::new(serve::ServiceTimes::default()),
        in_service: std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        runtime: tokio::runtime::Handle::current(),
        metrics: metrics.clone(),
    };
    if !config.inference.emulated_service.is_zero() {
        tracing::warn!(
            ms = config.inference.emulated_service.as_secs_f64() * 1e3,
            "Every local inference is held to this long (inference.emulated_service_ms), to behave like a slower device."
        );
    }
    let pipeline = serve::Pipeline::start(
        &config.inference,
        config.mqtt.max_payload_bytes,
        serve::WorkerContext {
            device_id: config.device_id.clone(),
            topics: topics.clone(),
            top_k: config.inference.top_k,
            store: store.clone(),
            history: config.store.history.clone(),
            routing: routing.clone(),
            emulated_service: config.inference.emulated_service,
        },
    )
    .map_err(AgentError::Workers)?;
    let mut metrics_server = None;
    if let Some(addr) = config.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| AgentError::Metrics { addr, source })?;
        let bound = listener.local_addr().unwrap_or(addr);
        tracing::info!(addr = %bound, "Serving Prometheus metrics at /metrics.");
        let probe = pipeline.probe();
        let metrics = metrics.clone();
        let counters = store.counters.clone();
        let in_service = routing.in_service.clone();
        let cloud = cloud.clone();
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let snap = metrics::Snapshot {
                    queue_depth: probe.len(),
                    in_service: in_service.load(Ordering::Relaxed),
                    circuit: match cloud.as_ref().map(cloud::Cloud::circuit) {
                        None => -1,
                        Some(policy::BreakerState::Closed) => 0,
                        Some(policy::BreakerState::HalfOpen) => 1,
                        Some(policy::BreakerState::Open) => 2,
                    },
                };
                let text = metrics.render(snap, &counters);
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
        metrics_server = Some((
            bound,
            tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            }),
        ));
    }
    // Fleet documents: the last good configuration comes back from the database before the
    // first request is taken.
    let (status_refresh_tx, status_refresh_rx) = watch::channel(0u64);
    let (telemetry_tx, telemetry_rx) = watch::channel(config.fleet.telemetry_interval);
    let fleet = if config.fleet.keys.is_empty() {
        if !config.fleet.groups.is_empty() {
            tracing::warn!(
                "fleet.groups is set but fleet.keys is empty: without a trusted key no fleet document can be accepted, so none is listened for."
            );
        }
        None
    } else {
        let relay = config
            .relay
            .as_ref()
            .and_then(|r| r.token.clone().map(|t| (r.url.clone(), t)));
        let fetcher = fleet::download::Fetcher::new(
            config.fleet.models_dir.clone(),
            config.fleet.reserve_bytes,
            relay,
        )
        .map_err(AgentError::Fleet)?;
        let mut f = Box::new(fleet::Fleet::new(fleet::FleetContext {
            config: config.clone(),
            base_raw: config.raw.clone(),
            keys: config.fleet.keys.clone(),
            topics: fleet::doc::DocTopics::new(
                &config.topic_prefix,
                &config.device_id,
                &config.fleet.groups,
            ),
            live: live.clone(),
            base_engine: engine.clone(),
            engine_config: engine_config.clone(),
            store: store.clone(),
            fetcher,
            runs: runs.clone(),
            health: config.fleet.health,
            telemetry_interval: telemetry_tx.clone(),
            status_refresh: status_refresh_tx.clone(),
            log: LOG_CONTROL.get().cloned(),
        }));
        Box::pin(f.restore()).await;
        Some(f)
    };
    let stop_drivers = CancellationToken::new();
    let mut drivers = Vec::new();
    // The device's own connection; room in its client for every queued reply plus acks.
    let capacity = config.inference.queue * 2 + 64;
    let will = mqtt::Session::Device {
        will_topic: topics.status(),
        will_payload: status(false)(),
    };
    let (client, eventloop) = mqtt::connect(&config.mqtt, will, capacity);
    let (connected_tx, connected_rx) = watch::channel(false);
    let connected_rx_probe = connected_rx.clone();
    let intake = pipeline.intake(serve::Link::new(client.clone()));
    drivers.push(tokio::spawn(
        mqtt::Driver {
            eventloop,
            client: client.clone(),
            filters: vec![topics.device_filter()],
            on_connect: Some(mqtt::Retained {
                topic: topics.status(),
                payload: status(true),
            }),
            on_stop: Some(mqtt::Retained {
                topic: topics.status(),
                payload: status(false),
            }),
            dispatch: move |p| intake.dispatch(p),
            connected_tx,
            backoff: mqtt::Backoff::new(config.mqtt.reconnect_min, config.mqtt.reconnect_max),
            outbox: Some(mqtt::OutboxFeed {
                store: store.clone(),
                window: OUTBOX_WINDOW,
            }),
            refresh: Some(status_refresh_rx),
        }
        .run(stop_drivers.clone()),
    ));
    // Sensors feed the pipeline in process, on a link of their own (nothing to acknowledge).
    let mut sensor_threads = sensors::start(
        &config.sensors,
        &config.actuators,
        &config.topic_prefix,
        &config.device_id,
        &pipeline.intake(serve::Link::new(client.clone())),
        &store,
    )
    .map_err(AgentError::Sensors)?;
    drivers.push(tokio::spawn(fleet::telemetry_loop(
        client.clone(),
        topics.telemetry(),
        config.device_id.clone(),
        telemetry_rx,
        load_rx_telemetry,
        metrics.clone(),
        store.counters.clone(),
        live.clone(),
        sensor_threads.view(),
        stop_drivers.clone(),
    )));
    if let Some(f) = fleet {
        let (fclient, feventloop) = mqtt::connect(&config.mqtt, mqtt::Session::Fleet, 64);
        let (docs_tx, docs_rx) = tokio::sync::mpsc::channel(64);
        let (fleet_connected_tx, _) = watch::channel(false);
        drivers.push(tokio::spawn(
            mqtt::Driver {
                eventloop: feventloop,
                client: fclient.clone(),
                filters: f.filters(),
                on_connect: None,
                on_stop: None,
                dispatch: move |m: mqtt::Incoming| {
                    if docs_tx.try_send(m).is_err() {
                        tracing::warn!("Too many fleet documents at once; one waits for the broker to send it again.");
                    }
                },
                connected_tx: fleet_connected_tx,
                backoff: mqtt::Backoff::new(config.mqtt.reconnect_min, config.mqtt.reconnect_max),
                outbox: None,
                refresh: None,
            }
            .run(stop_drivers.clone()),
        ));
        drivers.push(tokio::spawn((*f).run(
            docs_rx,
            fclient,
            stop_drivers.clone(),
        )));
    }
    let mut pool_connected = None;
    if let Some(filter) = topics.pool_filter() {
        let (pclient, peventloop) = mqtt::connect(&config.mqtt, mqtt::Session::Pool, capacity);
        let intake = pipeline.intake(serve::Link::new(pclient.clone()));
        let (pool_connected_tx, pool_rx) = watch::channel(false);
        pool_connected = Some(pool_rx);
        drivers.push(tokio::spawn(
            mqtt::Driver {
                eventloop: peventloop,
                client: pclient.clone(),
                filters: vec![filter],
                on_connect: None,
                on_stop: None,
                dispatch: move |p| intake.dispatch(p),
                connected_tx: pool_connected_tx,
                backoff: mqtt::Backoff::new(config.mqtt.reconnect_min, config.mqtt.reconnect_max),
                outbox: None,
                refresh: None,
            }
            .run(stop_drivers.clone()),
        ));
    }
    tracing::info!(
        device_id = %config.device_id,
        broker = %format!("{}:{}", config.mqtt.host, config.mqtt.port),
        pool = ?config.pool,
        workers = config.inference.workers,
        "Agent serving."
    );
    if let Some(tx) = started {
        let _ = tx.send(Running {
            connected: connected_rx,
            pool_connected,
            embedded_broker: embedded,
            store: store.clone(),
            metrics_addr: metrics_server.as_ref().map(|(a, _)| *a),
            live: live.clone(),
            sensors: sensor_threads.view(),
        });
    }

    shutdown.await;
    tracing::info!(
        grace_ms = config.shutdown_grace.as_millis(),
        "Shutting down: finishing requests in flight."
    );
    // Sources first, so they stop making requests; each finishes the window in hand.
    let _ = tokio::task::spawn_blocking(move || sensor_threads.stop()).await;
    let drained = pipeline.drain(config.shutdown_grace).await;
    if !drained {
        tracing::warn!(
            "Grace period over with requests still running; they stay unacknowledged and will be delivered again."
        );
    }
    // Every reply is now in the outbox (and its request acknowledged); give the publisher a
    // moment to deliver them, as what is left waits in the database for the next start.
    store.flush().await;
    let deliver_until = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
    while *connected_rx_probe.borrow()
        && store.counters.outbox_rows.load(Ordering::Relaxed) > 0
        && tokio::time::Instant::now() < deliver_until
    {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    stop_drivers.cancel();
    // Each driver exits once its DISCONNECT is out; don't wait on a dead broker forever.
    let aborts: Vec<_> = drivers.iter().map(|d| d.abort_handle()).collect();
    if tokio::time::timeout(std::time::Duration::from_secs(2), join_all(drivers))
        .await
        .is_err()
    {
        for a in aborts {
            a.abort();
        }
    }
    store.stop().await;
    let _ = tokio::task::spawn_blocking(move || store_thread.join()).await;
    if let Some((_, server)) = metrics_server {
        server.abort();
    }
    let left = store.counters.outbox_rows.load(Ordering::Relaxed);
    if left > 0 {
        tracing::info!(
            outbox_rows = left,
            "Messages not yet delivered stay in the outbox for the next start."
        );
    }
    tracing::info!("Agent stopped.");
    Ok(())
}

/// A fresh directory under the system's temporary directory, for unit tests.
#[cfg(test)]
pub(crate) fn test_scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tether-unit-{name}-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    #[allow(clippy::expect_used)]
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    dir
}
