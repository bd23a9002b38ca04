//! The Tether agent: the device process. `main.rs` is only the command line; each module here
//! owns one responsibility and is testable alone, and [`run`] wires them together.
//!
//! A request walks forward: an MQTT driver ([`mqtt`]) delivers it with a ticket, the pipeline
//! ([`pipeline`]) decodes, de-duplicates, answers from the cache or routes it ([`policy`]) to a
//! worker or the relay ([`cloud`]), the reply goes to the store ([`store`]: outbox, committed),
//! and the commit tells the driver, by the ticket ([`ticket`]), to acknowledge it; the driver
//! publishes the outbox. [`config`] sits below everything and imports nothing above it.

pub mod args;
pub mod broker;
pub mod cli;
pub mod cloud;
pub mod config;
pub mod exit;
pub mod fleet;
pub mod infer;
pub mod live;
pub mod metrics;
pub mod monitor;
pub mod mqtt;
pub mod pipeline;
pub mod policy;
pub mod protocol;
pub mod quality;
pub mod rollout;
pub mod sensors;
pub mod status;
pub mod store;
pub mod ticket;
pub mod watchdog;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use models::{EngineConfig, ModelError, Variant};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::protocol::Topics;

pub use config::models_dir;

/// Outbox messages in flight on the device connection at once (the broker's Receive Maximum
/// lowers it).
const OUTBOX_WINDOW: usize = 64;
/// Fleet documents in flight on the fleet connection at once.
const FLEET_WINDOW: usize = 8;

/// The agent's version, as reported in its status.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

static LOG_CONTROL: std::sync::OnceLock<fleet::LogControl> = std::sync::OnceLock::new();

/// Lets fleet documents change the log filter (`main` installs it; `None` restores the filter
/// the process started with).
pub fn set_log_control(control: fleet::LogControl) {
    let _ = LOG_CONTROL.set(control);
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
    /// Applies agent.toml read again (SIGHUP).
    pub reloader: Reloader,
}

/// Puts a configuration read again (SIGHUP) in force: what the live swap can change (routing
/// policy, cache rules and bounds, outbox bounds, telemetry interval) through the same switch
/// fleet documents use, beneath the fleet documents in force; the rest is reported as needing
/// a restart and left as it was.
#[derive(Debug, Clone)]
pub struct Reloader {
    switch: live::Switch,
    /// The configuration the agent started with: what a restart-only key still is.
    started_with: Arc<Config>,
    /// The fleet task, when there is one: it applies its documents again on the new base.
    fleet: Option<tokio::sync::mpsc::Sender<Config>>,
}

impl Reloader {
    /// Applies `config` (already validated); returns the keys that differ from the start-up
    /// configuration, split into applied and left for a restart.
    pub async fn reload(&self, config: Config) -> config::reload::Changes {
        let changes = config::reload::changes(&self.started_with.raw, &config.raw);
        match &self.fleet {
            Some(fleet) => {
                if fleet.send(config).await.is_err() {
                    tracing::warn!("The fleet task has stopped; the reload is not applied.");
                }
            }
            None => {
                let current = self.switch.live.get();
                let settings = live::Settings {
                    engine: current.engine.clone(),
                    policy: config.policy.clone(),
                    cache: config.store.cache.clone(),
                    config_version: current.config_version.clone(),
                    shadows: current.shadows.clone(),
                    rollouts: current.rollouts.clone(),
                };
                self.switch.apply(
                    Arc::new(settings),
                    &config,
                    config.fleet.telemetry_interval,
                    None,
                );
            }
        }
        if !changes.restart.is_empty() {
            tracing::warn!(
                keys = %changes.restart.join(", "),
                "agent.toml changed keys that only a restart applies; they stay as they were until then."
            );
        }
        tracing::info!(
            applied = %changes.live.join(", "),
            "agent.toml read again and applied."
        );
        changes
    }
}

/// Requests a connection's driver hands on before it stops reading (its flow control, and its
/// MQTT v5 Receive Maximum): what the local queue and the workers hold.
fn connection_limit(config: &Config) -> usize {
    (config.inference.queue + config.inference.workers).clamp(1, usize::from(u16::MAX))
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
    let embedded = start_embedded_broker(&mut config)?;
    let engine_config = EngineConfig {
        variant: Variant::Device,
        max_elements: config.inference.max_elements,
        runtime: config.inference.runtime.clone(),
        lazy: true,
        ..EngineConfig::default()
    };
    // Loading models can take longer than systemd's start timeout on a slow card.
    notify(&[sd_notify::NotifyState::ExtendTimeoutUsec(120_000_000)]);
    let engine = {
        let (dir, build) = (config.models_dir.clone(), engine_config.clone());
        let preload = config.inference.preload.clone();
        tokio::task::spawn_blocking(move || {
            let engine = build.build(dir)?;
            for name in &preload {
                engine.model(name)?.load()?;
            }
            Ok::<_, ModelError>(engine)
        })
        .await
        .map_err(|e| AgentError::Join(e.to_string()))??
    };
    tracing::info!(
        models = %engine.models().map(|m| m.name()).collect::<Vec<_>>().join(", "),
        preloaded = %config.inference.preload.join(", "),
        "Models verified; each is built on its first request unless preloaded (inference.preload)."
    );
    let (store, store_thread) = {
        let cfg = config.store.clone();
        tokio::task::spawn_blocking(move || store::open(&cfg, store::OpenMode::Agent))
            .await
            .map_err(|e| AgentError::Join(e.to_string()))??
    };
    tracing::info!(
        path = %config.store.path.display(),
        outbox_rows = store.counters.outbox_rows.load(Ordering::Relaxed),
        cache_rows = store.counters.cache_rows.load(Ordering::Relaxed),
        remembered_replies = store.counters.replies_rows.load(Ordering::Relaxed),
        "Database open."
    );
    let topics = Topics::new(
        &config.topic_prefix,
        &config.device_id,
        config.pool.as_deref(),
    )
    .with_reply_prefixes(config.mqtt.reply_topics.clone());
    let live = live::Live::new(live::Settings::local(engine.clone(), &config));
    let cloud = config.relay.as_ref().map(cloud::Cloud::new).transpose()?;
    match &config.relay {
        Some(r) => {
            tracing::info!(relay = %r.url, mode = ?config.policy.policy.mode, "Offloading to the relay when the policy says so.")
        }
        None => tracing::info!("No relay configured (--relay URL): every request runs here."),
    }
    let load_rx = monitor::spawn(config.policy.monitor_interval).map_err(AgentError::Monitor)?;
    let metrics = metrics::Metrics::default();
    let quality = Arc::new(quality::Quality::default());
    match store.audit_totals().await {
        Ok(rows) => quality.seed(rows),
        Err(e) => {
            tracing::warn!(error = %e, "Cannot read the audits recorded before; agreement counts start from zero.");
        }
    }
    let routing = pipeline::Routing {
        live: live.clone(),
        health: Arc::new(pipeline::RunCounters::default()),
        cloud: cloud.clone(),
        load_rx: load_rx.clone(),
        times: Arc::new(pipeline::ServiceTimes::default()),
        in_service: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        runtime: tokio::runtime::Handle::current(),
        metrics: metrics.clone(),
        quality: quality.clone(),
    };
    if !config.inference.emulated_service.is_zero() {
        tracing::warn!(
            ms = config.inference.emulated_service.as_secs_f64() * 1e3,
            "Every local inference is held to this long (inference.emulated_service_ms), to behave like a slower device."
        );
    }
    let limit = connection_limit(&config);
    let pools = usize::from(config.pool.is_some());
    let remembered = store.remembered_keys(store::now_ms()).await;
    let pipeline = pipeline::Pipeline::start(
        pipeline::PipelineConfig {
            device_id: config.device_id.clone(),
            topics: topics.clone(),
            inference: config.inference.clone(),
            limits: pipeline::decode::Limits {
                max_payload_bytes: config.mqtt.max_payload_bytes,
                max_budget: config.policy.max_budget,
                dedupe_window: config.store.dedupe.window,
                dedupe_max_window: config.store.dedupe.max_window,
            },
            history: config.store.history.clone(),
            dedupe: config.store.dedupe.clone(),
            admission: limit * (1 + pools) + config.sensors.len() + 1,
        },
        store.clone(),
        routing.clone(),
        remembered,
    )
    .map_err(AgentError::Workers)?;
    let mut metrics_server = None;
    if let Some(addr) = config.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| AgentError::Metrics { addr, source })?;
        let bound = status::bound(&listener, addr);
        tracing::info!(addr = %bound, "Serving Prometheus metrics at /metrics.");
        let server = status::serve_metrics(
            listener,
            metrics.clone(),
            store.counters.clone(),
            pipeline.probe(),
            routing.in_service.clone(),
            cloud.clone(),
            quality.clone(),
        );
        metrics_server = Some((bound, server));
    }
    let health = status::Health {
        pipeline: pipeline.health(),
        store: store.clone(),
        metrics: metrics.clone(),
        live: live.clone(),
    };
    let started_at = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let status = |online: bool| -> Arc<dyn Fn() -> Vec<u8> + Send + Sync> {
        let (config, live, counters, started_at, health) = (
            config.clone(),
            live.clone(),
            store.counters.clone(),
            started_at.clone(),
            health.clone(),
        );
        Arc::new(move || {
            status::device_status(online, &config, &live, &counters, &started_at, &health)
        })
    };
    // Fleet documents: the last good configuration comes back from the database before the
    // first request is taken.
    let (status_refresh_tx, status_refresh_rx) = watch::channel(0u64);
    let (telemetry_tx, telemetry_rx) = watch::channel(config.fleet.telemetry_interval);
    let stop_drivers = CancellationToken::new();
    // How settings are put in force, by fleet documents and by reloads of agent.toml alike.
    let switch = live::Switch {
        live: live.clone(),
        store: store.clone(),
        telemetry_interval: telemetry_tx.clone(),
        status_refresh: status_refresh_tx.clone(),
        log: LOG_CONTROL.get().cloned(),
    };
    let fleet = start_fleet(&config, &engine_config, &switch, &routing, &stop_drivers).await?;
    let mut drivers: Vec<JoinHandle<()>> = Vec::new();
    let intake = pipeline.intake();
    // The device's own connection: requests, the outbox, the status.
    let (client, eventloop) = mqtt::connect(
        &config.mqtt,
        mqtt::Session::Device {
            will_topic: topics.status(),
            will_payload: status(false)(),
        },
        u16::try_from(limit).unwrap_or(u16::MAX),
        // The outbox's window, plus the status and telemetry messages beside it.
        u16::try_from(OUTBOX_WINDOW + 16).unwrap_or(u16::MAX),
        limit + OUTBOX_WINDOW + 64,
    );
    let (connected_tx, connected_rx) = watch::channel(false);
    {
        let intake = intake.clone();
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
                dispatch: move |m| intake.dispatch(m),
                connected_tx,
                backoff: mqtt::Backoff::new(config.mqtt.reconnect_min, config.mqtt.reconnect_max),
                outbox: Some(mqtt::OutboxFeed {
                    store: store.clone(),
                    window: OUTBOX_WINDOW,
                }),
                refresh: Some(status_refresh_rx),
                limit,
            }
            .run(stop_drivers.clone()),
        ));
    }
    // Sensors submit typed requests to the pipeline; their events go through the outbox.
    let mut sensor_threads =
        sensors::start(&config.sensors, &config.actuators, &topics, &intake, &store)
            .map_err(AgentError::Sensors)?;
    drivers.push(tokio::spawn(
        fleet::Telemetry {
            client: client.clone(),
            topic: topics.telemetry(),
            quality_topic: topics.quality(),
            device_id: config.device_id.clone(),
            interval: telemetry_rx,
            load: load_rx,
            metrics: metrics.clone(),
            counters: store.counters.clone(),
            live: live.clone(),
            sensors: sensor_threads.view(),
            quality,
        }
        .run(stop_drivers.clone()),
    ));
    let mut fleet_reloads = None;
    if let Some(f) = fleet {
        let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
        fleet_reloads = Some(reload_tx);
        drivers.extend(start_fleet_connection(&config, f, reload_rx, &stop_drivers));
    }
    let reloader = Reloader {
        switch,
        started_with: Arc::new(config.clone()),
        fleet: fleet_reloads,
    };
    let mut pool_connected = None;
    if let Some(filter) = topics.pool_filter() {
        let (pclient, peventloop) = mqtt::connect(
            &config.mqtt,
            mqtt::Session::Pool,
            u16::try_from(limit).unwrap_or(u16::MAX),
            // The pool's connection publishes nothing of its own (replies go out on the device's).
            8,
            limit + 64,
        );
        let intake = intake.clone();
        let (pool_connected_tx, pool_rx) = watch::channel(false);
        pool_connected = Some(pool_rx);
        drivers.push(tokio::spawn(
            mqtt::Driver {
                eventloop: peventloop,
                client: pclient,
                filters: vec![filter],
                on_connect: None,
                on_stop: None,
                dispatch: move |m| intake.dispatch(m),
                connected_tx: pool_connected_tx,
                backoff: mqtt::Backoff::new(config.mqtt.reconnect_min, config.mqtt.reconnect_max),
                outbox: None,
                refresh: None,
                limit,
            }
            .run(stop_drivers.clone()),
        ));
    }
    // A stage that stops is reported: the status is published again when health changes.
    drivers.push(tokio::spawn(watch_health(
        health.clone(),
        status_refresh_tx,
        stop_drivers.clone(),
    )));
    tracing::info!(
        device_id = %config.device_id,
        broker = %format!("{}:{}", config.mqtt.host, config.mqtt.port),
        pool = ?config.pool,
        workers = config.inference.workers,
        receive_maximum = limit,
        "Agent serving."
    );
    // Stopped when shutdown starts: draining stops stages on purpose.
    let stop_watchdog = CancellationToken::new();
    drivers.push(tokio::spawn(systemd_watchdog(
        Stages {
            health: health.clone(),
            runs: routing.health.clone(),
            in_service: routing.in_service.clone(),
            queue: pipeline.probe(),
        },
        connected_rx.clone(),
        live.clone(),
        stop_watchdog.clone(),
    )));
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status("serving"),
    ]);
    if let Some(tx) = started {
        let _ = tx.send(Running {
            connected: connected_rx.clone(),
            pool_connected,
            embedded_broker: embedded,
            store: store.clone(),
            metrics_addr: metrics_server.as_ref().map(|(a, _)| *a),
            live: live.clone(),
            sensors: sensor_threads.view(),
            reloader,
        });
    }

    shutdown.await;
    stop_watchdog.cancel();
    tracing::info!(
        grace_ms = config.shutdown_grace.as_millis(),
        "Shutting down: finishing requests in flight."
    );
    let drain_usec = config
        .shutdown_grace
        .saturating_add(Duration::from_secs(10))
        .as_micros();
    notify(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status("stopping: finishing requests in flight"),
        sd_notify::NotifyState::ExtendTimeoutUsec(u32::try_from(drain_usec).unwrap_or(u32::MAX)),
    ]);
    // Sources first, so they stop making requests; each finishes the window in hand.
    let _ = tokio::task::spawn_blocking(move || sensor_threads.stop()).await;
    if !pipeline.drain(config.shutdown_grace).await {
        tracing::warn!(
            "Grace period over with requests still running; they stay unacknowledged and will be delivered again."
        );
    }
    // Every reply is now in the outbox (and its request acknowledged); give the publisher a
    // moment to deliver them, as what is left waits in the database for the next start.
    store.flush().await;
    let deliver_until = tokio::time::Instant::now() + Duration::from_secs(2);
    while *connected_rx.borrow()
        && store.counters.outbox_rows.load(Ordering::Relaxed) > 0
        && tokio::time::Instant::now() < deliver_until
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop_drivers.cancel();
    // Each driver exits once its DISCONNECT is out; don't wait on a dead broker forever.
    let aborts: Vec<_> = drivers.iter().map(JoinHandle::abort_handle).collect();
    if tokio::time::timeout(Duration::from_secs(2), join_all(drivers))
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

/// Tells systemd (when it started the agent with `Type=notify`; otherwise nothing happens).
fn notify(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::debug!(error = %e, "Cannot notify systemd.");
    }
}

/// What the watchdog looks at.
struct Stages {
    health: status::Health,
    runs: Arc<pipeline::RunCounters>,
    in_service: Arc<std::sync::atomic::AtomicUsize>,
    queue: pipeline::QueueProbe,
}

/// Pings systemd's watchdog every half `WatchdogSec` while the stages make progress
/// ([`watchdog::judge`]), and keeps `STATUS=` current. Runs on the async runtime, so a blocked
/// runtime (the MQTT driver's thread) also stops the pings.
async fn systemd_watchdog(
    stages: Stages,
    connected: watch::Receiver<bool>,
    live: live::Live,
    stop: CancellationToken,
) {
    let mut usec = 0u64;
    let enabled = sd_notify::watchdog_enabled(false, &mut usec);
    if !enabled && std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let every = if enabled {
        Duration::from_micros(usec / 2).max(Duration::from_millis(100))
    } else {
        Duration::from_secs(10)
    };
    let mut tick = tokio::time::interval(every);
    let mut previous: Option<watchdog::Observation> = None;
    let mut reported: Option<String> = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let store_answered = tokio::time::timeout(every, stages.health.store.flush())
            .await
            .is_ok();
        let (front_alive, workers_alive) = stages.health.pipeline.alive();
        let (ok, failed) = stages.runs.read();
        let now = watchdog::Observation {
            store_answered: store_answered && stages.health.store.is_alive(),
            front_alive,
            workers_alive,
            runs: ok.saturating_add(failed),
            waiting: stages
                .queue
                .len()
                .saturating_add(stages.in_service.load(Ordering::Relaxed)),
        };
        let verdict = watchdog::judge(previous.as_ref(), &now);
        previous = Some(now);
        let status = match &verdict {
            watchdog::Verdict::Healthy => format!(
                "serving; broker {}; {} models; outbox {} messages",
                if *connected.borrow() {
                    "connected"
                } else {
                    "not connected"
                },
                live.get().engine.models().count(),
                stages
                    .health
                    .store
                    .counters
                    .outbox_rows
                    .load(Ordering::Relaxed),
            ),
            watchdog::Verdict::Stuck(why) => format!("stuck: {why}"),
        };
        match &verdict {
            watchdog::Verdict::Healthy => {
                reported = None;
                let mut states = vec![sd_notify::NotifyState::Status(&status)];
                if enabled {
                    states.push(sd_notify::NotifyState::Watchdog);
                }
                notify(&states);
            }
            watchdog::Verdict::Stuck(why) => {
                if reported.as_deref() != Some(why.as_str()) {
                    tracing::error!(reason = %why, "A stage is stuck: not pinging systemd's watchdog, which will restart the agent.");
                    reported = Some(why.clone());
                }
                notify(&[sd_notify::NotifyState::Status(&status)]);
            }
        }
    }
}

async fn join_all(tasks: Vec<JoinHandle<()>>) {
    for t in tasks {
        let _ = t.await;
    }
}

/// Starts the embedded broker, if configured, and points the agent at it when asked to.
fn start_embedded_broker(
    config: &mut Config,
) -> Result<Option<broker::EmbeddedBroker>, AgentError> {
    let Some(b) = &config.embedded_broker else {
        return Ok(None);
    };
    let addrs = broker::start(b, config.mqtt.max_payload_bytes)?;
    if b.connect {
        let addr = match config.mqtt.protocol {
            config::Protocol::V5 => addrs.v5,
            config::Protocol::V311 => addrs.v311,
        };
        config.mqtt.host = addr.ip().to_string();
        config.mqtt.port = addr.port();
    }
    Ok(Some(addrs))
}

/// The fleet's side, when keys are configured: restored from the database before the first
/// request.
async fn start_fleet(
    config: &Config,
    engine_config: &EngineConfig,
    switch: &live::Switch,
    routing: &pipeline::Routing,
    stop: &CancellationToken,
) -> Result<Option<Box<fleet::Fleet>>, AgentError> {
    let (live, store) = (&switch.live, &switch.store);
    if config.fleet.keys.is_empty() {
        if !config.fleet.groups.is_empty() {
            tracing::warn!(
                "fleet.groups is set but fleet.keys is empty: without a trusted key no fleet document can be accepted, so none is listened for."
            );
        }
        return Ok(None);
    }
    let relay = config
        .relay
        .as_ref()
        .and_then(|r| r.token.clone().map(|t| (r.url.clone(), t)));
    let fetcher = fleet::download::Fetcher::new(
        config.fleet.models_dir.clone(),
        fleet::download::FetchLimits {
            reserve_bytes: config.fleet.reserve_bytes,
            allow_http: config.fleet.allow_http,
            timeout: config.fleet.download_timeout,
        },
        relay,
        config.relay.as_ref().and_then(|r| r.ca_pem.as_deref()),
        stop.clone(),
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
        switch: switch.clone(),
        base_engine: live.get().engine.clone(),
        engine_config: engine_config.clone(),
        store: store.clone(),
        fetcher,
        runs: routing.health.clone(),
        health: config.fleet.health,
    }));
    Box::pin(f.restore()).await;
    Ok(Some(f))
}

/// The fleet's connection and its task: documents handed to the fleet one at a time, each
/// acknowledged once handled.
fn start_fleet_connection(
    config: &Config,
    f: Box<fleet::Fleet>,
    reloads: tokio::sync::mpsc::Receiver<Config>,
    stop: &CancellationToken,
) -> Vec<JoinHandle<()>> {
    let (fclient, feventloop) = mqtt::connect(
        &config.mqtt,
        mqtt::Session::Fleet,
        u16::try_from(FLEET_WINDOW).unwrap_or(1),
        // Fleet statuses, one per document.
        u16::try_from(FLEET_WINDOW).unwrap_or(1),
        64,
    );
    let (docs_tx, docs_rx) = tokio::sync::mpsc::channel(FLEET_WINDOW);
    let (fleet_connected_tx, _) = watch::channel(false);
    let filters = f.filters();
    vec![
        tokio::spawn(
            mqtt::Driver {
                eventloop: feventloop,
                client: fclient.clone(),
                filters,
                on_connect: None,
                on_stop: None,
                dispatch: move |m: mqtt::Message| {
                    // The driver hands on at most FLEET_WINDOW documents, which the channel
                    // holds: this never refuses one.
                    if let Err(e) = docs_tx.try_send(m) {
                        tracing::warn!("The fleet task is not taking documents; the broker sends this one again later.");
                        drop(e);
                    }
                },
                connected_tx: fleet_connected_tx,
                backoff: mqtt::Backoff::new(config.mqtt.reconnect_min, config.mqtt.reconnect_max),
                outbox: None,
                refresh: None,
                limit: FLEET_WINDOW,
            }
            .run(stop.clone()),
        ),
        tokio::spawn((*f).run(docs_rx, reloads, fclient, stop.clone())),
    ]
}

/// Publishes the status again whenever a stage starts or stops.
async fn watch_health(
    health: status::Health,
    refresh: watch::Sender<u64>,
    stop: CancellationToken,
) {
    let mut last = health.stages();
    let mut every = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        let now = health.stages();
        if now != last {
            if !now.serving() {
                tracing::error!(
                    ?now,
                    "A stage of the request path is down; the status says so."
                );
            }
            last = now;
            refresh.send_modify(|n| *n += 1);
        }
    }
}

/// A fresh directory under the system's temporary directory, for unit tests.
#[cfg(test)]
pub(crate) fn test_scratch_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tether-unit-{name}-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    #[allow(clippy::expect_used)]
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    dir
}
