//! The settings the fleet can change while the agent runs: the models, the routing policy and
//! the cache's rules. Readers take a snapshot (one `Arc`) per request, so a request admitted
//! before a switch finishes on what it started with, and the next one sees the new settings.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use models::Engine;
use models::engine::LoadedModel;
use tokio::sync::watch;

use crate::config::{CacheConfig, Config, PolicyConfig};
use crate::rollout::RolloutView;
use crate::store::{Limits, StoreHandle};

/// Changes the log filter (`None`: back to the start-up filter), or says why it cannot.
pub type LogControl = Arc<dyn Fn(Option<&str>) -> Result<(), String> + Send + Sync>;

/// One consistent set of live settings.
#[derive(Debug)]
pub struct Settings {
    pub engine: Engine,
    pub policy: PolicyConfig,
    pub cache: CacheConfig,
    /// The fleet configuration these came from (`None`: the local agent.toml only).
    pub config_version: Option<String>,
    /// Per model: a candidate run after the reply on a share of requests.
    pub shadows: BTreeMap<String, Shadow>,
    /// The rollouts in force, as this device takes part in them.
    pub rollouts: Vec<RolloutView>,
}

/// A candidate model in the shadow of the serving one.
#[derive(Debug, Clone)]
pub struct Shadow {
    pub model: Arc<LoadedModel>,
    /// The share of local requests it runs on.
    pub share: f64,
}

impl Settings {
    /// Settings of the local configuration only: no fleet version, shadow or rollout.
    pub fn local(engine: Engine, config: &Config) -> Settings {
        Settings {
            engine,
            policy: config.policy.clone(),
            cache: config.store.cache.clone(),
            config_version: None,
            shadows: BTreeMap::new(),
            rollouts: Vec::new(),
        }
    }
}

/// The current [`Settings`], shared by every stage; cheap to clone.
#[derive(Debug, Clone)]
pub struct Live(Arc<RwLock<Arc<Settings>>>);

impl Live {
    pub fn new(settings: Settings) -> Live {
        Live(Arc::new(RwLock::new(Arc::new(settings))))
    }

    /// The settings now in force.
    pub fn get(&self) -> Arc<Settings> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Puts `settings` in force; returns what they replace.
    pub fn set(&self, settings: Settings) -> Arc<Settings> {
        self.set_arc(Arc::new(settings))
    }

    /// The same, for settings already shared (going back to a previous set).
    pub fn set_arc(&self, settings: Arc<Settings>) -> Arc<Settings> {
        let mut current = self.0.write().unwrap_or_else(|p| p.into_inner());
        std::mem::replace(&mut *current, settings)
    }
}

/// Everything a switch of settings reaches besides the settings read per request: the store's
/// bounds, the telemetry interval, the log level, and the retained status (published again).
/// Fleet documents and reloads of agent.toml (SIGHUP) both put settings in force through it.
#[derive(Clone)]
pub struct Switch {
    pub live: Live,
    pub store: StoreHandle,
    pub telemetry_interval: watch::Sender<Duration>,
    /// Bumped after every switch: the device's retained status is published again.
    pub status_refresh: watch::Sender<u64>,
    pub log: Option<LogControl>,
}

impl std::fmt::Debug for Switch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Switch").finish_non_exhaustive()
    }
}

impl Switch {
    /// Puts `settings` in force, with the bounds of `config`, the telemetry interval and the
    /// log level (`None`: the start-up filter).
    pub fn apply(
        &self,
        settings: Arc<Settings>,
        config: &Config,
        telemetry: Duration,
        log_level: Option<&str>,
    ) {
        self.live.set_arc(settings);
        let (c, o) = (&config.store.cache, &config.store.outbox);
        let store = self.store.clone();
        let limits = Limits {
            cache_max_rows: c.max_rows,
            cache_max_bytes: c.max_bytes,
            outbox_max_rows: o.max_rows,
            outbox_max_bytes: o.max_bytes,
        };
        tokio::spawn(async move { store.set_limits(limits).await });
        self.telemetry_interval.send_replace(telemetry);
        if let Some(log) = &self.log
            && let Err(e) = log(log_level)
        {
            tracing::warn!(error = %e, "Cannot change the log level.");
        }
        self.status_refresh.send_modify(|n| *n += 1);
    }
}
