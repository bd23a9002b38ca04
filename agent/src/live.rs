//! The settings the fleet can change while the agent runs: the models, the routing policy and
//! the cache's rules. Readers take a snapshot (one `Arc`) per request, so a request admitted
//! before a switch finishes on what it started with, and the next one sees the new settings.

use std::sync::{Arc, RwLock};

use models::Engine;

use crate::config::{CacheConfig, PolicyConfig};

/// One consistent set of live settings.
#[derive(Debug)]
pub struct Settings {
    pub engine: Engine,
    pub policy: PolicyConfig,
    pub cache: CacheConfig,
    /// The fleet configuration these came from (`None`: the local agent.toml only).
    pub config_version: Option<String>,
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
