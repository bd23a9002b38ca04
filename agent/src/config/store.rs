//! `[store]`: the agent's SQLite database (result cache, outbox, history).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `[store]`: the agent's SQLite database (result cache, outbox, history).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawStore {
    /// The database file (default: `tether.db` in `$STATE_DIRECTORY` when systemd sets it, else
    /// in /var/lib/tether when the service's database is there, else in the working directory).
    /// Its `-wal` and `-shm` companions live beside it.
    pub path: Option<PathBuf>,
    /// `normal` (default): a commit survives the agent being killed, and the database survives
    /// power loss intact, but the last commits before a power cut may roll back. `full`: every
    /// commit is on the storage medium before it counts (one fsync per batch of writes).
    pub synchronous: Synchronous,
    /// Most writes folded into one commit.
    pub max_batch: usize,
    pub cache: RawCache,
    pub outbox: RawOutbox,
    pub history: RawHistory,
    pub dedupe: RawDedupe,
}

/// `[store.dedupe]`: replies remembered so that a request delivered again (a requester's retry
/// with the same correlation data, or the broker's redelivery) is answered without running
/// again.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawDedupe {
    /// How long a reply is remembered when its request carries no MQTT v5 Message Expiry
    /// (with one, the expiry decides, up to `max_window_secs`); 0 turns de-duplication off.
    pub window_secs: u64,
    /// The longest a reply is remembered, whatever the request's expiry.
    pub max_window_secs: u64,
    /// Replies remembered in SQLite; beyond it the soonest to expire go first.
    pub max_rows: u64,
    /// Bytes of remembered replies also kept in memory (the rest are read back from SQLite).
    pub memory_bytes: usize,
}

impl Default for RawDedupe {
    fn default() -> Self {
        RawDedupe {
            window_secs: 600,
            max_window_secs: 86_400,
            max_rows: 10_000,
            memory_bytes: 4 << 20,
        }
    }
}

/// `[store.cache]`: results by (model, model sha256, inputs).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCache {
    pub enabled: bool,
    /// How long a result stays valid, unless the model sets its own.
    pub ttl_secs: u64,
    /// Bounds of the cache on disk; beyond either, the least recently used results go.
    pub max_rows: u64,
    pub max_bytes: u64,
    /// Results kept in memory in front of SQLite (least recently used go first); 0 for none.
    pub memory_entries: usize,
    /// Bytes of results kept in memory, whatever their number; a result larger than a quarter
    /// of it is served from SQLite only.
    pub memory_bytes: usize,
    /// Per model: `[store.cache.models.digits] enabled = false` or `ttl_secs = 60`.
    pub models: BTreeMap<String, RawModelCache>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModelCache {
    pub enabled: Option<bool>,
    pub ttl_secs: Option<u64>,
}

/// `[store.outbox]`: messages waiting for the broker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawOutbox {
    /// Bounds; beyond either the oldest messages are dropped, counted and logged.
    pub max_rows: u64,
    pub max_bytes: u64,
}

/// `[store.history]`: a sampled record of requests and results.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawHistory {
    /// Share of requests recorded, 0 (off, the default) to 1 (all).
    pub sample: f64,
    /// `hash` (default: only the inputs' sha256) or `store` (the inputs themselves).
    pub inputs: HistoryInputs,
    /// Rows kept; the oldest go first.
    pub max_rows: u64,
}

/// How durable a commit is; see [`RawStore::synchronous`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    Normal,
    Full,
}

/// What the history keeps of a request's inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HistoryInputs {
    Hash,
    Store,
}

impl Default for RawStore {
    fn default() -> Self {
        RawStore {
            path: None,
            synchronous: Synchronous::Normal,
            max_batch: 512,
            cache: RawCache::default(),
            outbox: RawOutbox::default(),
            history: RawHistory::default(),
            dedupe: RawDedupe::default(),
        }
    }
}

impl Default for RawCache {
    fn default() -> Self {
        RawCache {
            enabled: true,
            ttl_secs: 3600,
            max_rows: 10_000,
            max_bytes: 64 * 1024 * 1024,
            memory_entries: 256,
            memory_bytes: 4 << 20,
            models: Default::default(),
        }
    }
}

impl Default for RawOutbox {
    fn default() -> Self {
        RawOutbox {
            max_rows: 100_000,
            max_bytes: 256 * 1024 * 1024,
        }
    }
}

impl Default for RawHistory {
    fn default() -> Self {
        RawHistory {
            sample: 0.0,
            inputs: HistoryInputs::Hash,
            max_rows: 10_000,
        }
    }
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub path: PathBuf,
    pub synchronous: Synchronous,
    pub max_batch: usize,
    pub cache: CacheConfig,
    pub outbox: OutboxConfig,
    pub history: HistoryConfig,
    pub dedupe: DedupeConfig,
}

/// The validated `[store.dedupe]`.
#[derive(Debug, Clone)]
pub struct DedupeConfig {
    pub window: Duration,
    pub max_window: Duration,
    pub max_rows: u64,
    pub memory_bytes: usize,
}

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub enabled: bool,
    pub ttl: Duration,
    pub max_rows: u64,
    pub max_bytes: u64,
    pub memory_entries: usize,
    pub memory_bytes: usize,
    pub models: BTreeMap<String, RawModelCache>,
}

impl CacheConfig {
    /// How long results of `model` stay valid; `None` when they are not cached.
    pub fn ttl_for(&self, model: &str) -> Option<Duration> {
        let m = self.models.get(model);
        let enabled = m.and_then(|m| m.enabled).unwrap_or(self.enabled);
        let ttl = m
            .and_then(|m| m.ttl_secs)
            .map_or(self.ttl, Duration::from_secs);
        (enabled && !ttl.is_zero()).then_some(ttl)
    }
}

#[derive(Debug, Clone)]
pub struct OutboxConfig {
    pub max_rows: u64,
    pub max_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct HistoryConfig {
    pub sample: f64,
    pub inputs: HistoryInputs,
    pub max_rows: u64,
}

/// The database file when `store.path` is not set (see [`super::discover::store_path`]).
pub fn default_store_path() -> PathBuf {
    super::discover::store_path(&|k| std::env::var(k).ok(), &|p| p.exists())
}

impl RawStore {
    pub(super) fn validate(&self, errors: &mut Vec<String>) -> StoreConfig {
        let s = self;
        if !(1..=100_000).contains(&s.max_batch) {
            errors.push(format!(
                "store.max_batch is {}; use 1 to 100000",
                s.max_batch
            ));
        }
        if s.cache.max_rows == 0 || s.cache.max_bytes == 0 {
            errors.push("store.cache.max_rows and max_bytes must be positive (set store.cache.enabled = false to turn the cache off)".into());
        }
        if s.outbox.max_rows == 0 || s.outbox.max_bytes < 64 * 1024 {
            errors.push(format!(
                "store.outbox.max_rows ({}) must be positive and store.outbox.max_bytes ({}) at least 65536",
                s.outbox.max_rows, s.outbox.max_bytes
            ));
        }
        if !(0.0..=1.0).contains(&s.history.sample) {
            errors.push(format!(
                "store.history.sample is {}; use a share from 0 to 1",
                s.history.sample
            ));
        }
        if s.history.max_rows == 0 {
            errors.push("store.history.max_rows must be positive".into());
        }
        let d = &s.dedupe;
        if d.max_rows == 0 {
            errors.push(
                "store.dedupe.max_rows must be positive (window_secs = 0 turns de-duplication off)"
                    .into(),
            );
        }
        if d.window_secs > d.max_window_secs || d.max_window_secs > 30 * 86_400 {
            errors.push(format!(
                "store.dedupe.window_secs ({}) must be at most max_window_secs ({}), and that at most 2592000 (30 days)",
                d.window_secs, d.max_window_secs
            ));
        }
        let path = s.path.clone().unwrap_or_else(default_store_path);
        if path.as_os_str().is_empty() {
            errors.push("store.path is empty".into());
        }
        StoreConfig {
            path,
            synchronous: s.synchronous,
            max_batch: s.max_batch,
            cache: CacheConfig {
                enabled: s.cache.enabled,
                ttl: Duration::from_secs(s.cache.ttl_secs),
                max_rows: s.cache.max_rows,
                max_bytes: s.cache.max_bytes,
                memory_entries: s.cache.memory_entries,
                memory_bytes: s.cache.memory_bytes,
                models: s.cache.models.clone(),
            },
            outbox: OutboxConfig {
                max_rows: s.outbox.max_rows,
                max_bytes: s.outbox.max_bytes,
            },
            history: HistoryConfig {
                sample: s.history.sample,
                inputs: s.history.inputs,
                max_rows: s.history.max_rows,
            },
            dedupe: DedupeConfig {
                window: Duration::from_secs(d.window_secs),
                max_window: Duration::from_secs(d.max_window_secs),
                max_rows: d.max_rows.max(1),
                memory_bytes: d.memory_bytes,
            },
        }
    }
}
