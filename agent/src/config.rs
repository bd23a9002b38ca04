//! The agent's configuration: `agent.toml` (every key optional) -> `TETHER_*` environment
//! overrides -> command-line flags -> [`RawConfig::validate`], which reports every problem at
//! once and yields the typed [`Config`]. Owns no IO beyond reading the file and the environment.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Environment variables that override keys of agent.toml: `(variable, dotted key)`.
pub const ENV_OVERRIDES: &[(&str, &str)] = &[
    ("TETHER_DEVICE_ID", "device_id"),
    ("TETHER_TOPIC_PREFIX", "topic_prefix"),
    ("TETHER_POOL", "pool"),
    ("TETHER_MODELS", "models_dir"),
    ("TETHER_MQTT_BROKER", "mqtt.broker"),
    ("TETHER_MQTT_PROTOCOL", "mqtt.protocol"),
    ("TETHER_MQTT_CLIENT_ID", "mqtt.client_id"),
    ("TETHER_MQTT_USERNAME", "mqtt.username"),
    ("TETHER_MQTT_PASSWORD", "mqtt.password"),
    ("TETHER_MQTT_CA_FILE", "mqtt.ca_file"),
    ("TETHER_MQTT_CLIENT_CERT", "mqtt.client_cert"),
    ("TETHER_MQTT_CLIENT_KEY", "mqtt.client_key"),
    ("TETHER_MQTT_MAX_PAYLOAD_BYTES", "mqtt.max_payload_bytes"),
    ("TETHER_INFERENCE_WORKERS", "inference.workers"),
    ("TETHER_INFERENCE_QUEUE", "inference.queue"),
    ("TETHER_EMBEDDED_BROKER_LISTEN", "embedded_broker.listen"),
    ("TETHER_SHUTDOWN_GRACE_MS", "shutdown_grace_ms"),
    ("TETHER_STORE_PATH", "store.path"),
    ("TETHER_RELAY_URL", "relay.url"),
    ("TETHER_RELAY_TOKEN_FILE", "relay.token_file"),
    ("TETHER_POLICY_MODE", "policy.mode"),
    ("TETHER_METRICS_LISTEN", "metrics.listen"),
    ("TETHER_STORE_SYNCHRONOUS", "store.synchronous"),
];

/// agent.toml as written. Every key has a default, so an empty file (or none) works on a laptop.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    /// This device's id, used in every topic (default: the hostname).
    pub device_id: Option<String>,
    /// First segment of every topic.
    pub topic_prefix: String,
    /// Join this pool: also take requests from `$share/{pool}/{prefix}/pool/infer/+`.
    pub pool: Option<String>,
    /// The model directory holding MANIFEST.toml (default: the zoo).
    pub models_dir: Option<PathBuf>,
    /// How long shutdown may take to finish requests in flight, in milliseconds.
    pub shutdown_grace_ms: u64,
    pub mqtt: RawMqtt,
    pub inference: RawInference,
    /// Start an in-process MQTT broker (rumqttd).
    pub embedded_broker: Option<RawEmbeddedBroker>,
    pub store: RawStore,
    pub policy: RawPolicy,
    /// The Tether relay to offload to; without one the agent is local-only.
    pub relay: Option<RawRelay>,
    pub metrics: RawMetrics,
    pub fleet: RawFleet,
    /// `[[sensors]]`: sources the agent samples itself.
    pub sensors: Vec<crate::sensors::RawSensor>,
    /// `[[actuators]]`: outputs driven by the sensors' results.
    pub actuators: Vec<crate::sensors::RawActuator>,
}

/// `[fleet]`: signed configuration and model updates over MQTT, and telemetry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawFleet {
    /// The groups this device belongs to: it applies `{prefix}/fleet/{group}/config` for each,
    /// in this order, then its own `{prefix}/{device_id}/config`.
    pub groups: Vec<String>,
    /// Trusted signing keys: name = ed25519 public key in hex (`tether-agent fleet keygen`).
    /// Without any, fleet documents are not subscribed to.
    pub keys: std::collections::BTreeMap<String, String>,
    /// Where downloaded models go (default: `models/` beside the database).
    pub models_dir: Option<PathBuf>,
    /// Bytes that must stay free after a model download.
    pub reserve_bytes: u64,
    /// Seconds between telemetry messages on `{prefix}/{device_id}/telemetry`; 0 for none.
    pub telemetry_interval_secs: u64,
    /// After a switch, the first this many local runs decide whether it stays...
    pub health_requests: usize,
    /// ...rolling it back when more than this share of them failed...
    pub health_max_error_rate: f64,
    /// ...or judged on what ran within this many seconds.
    pub health_window_secs: u64,
}

impl Default for RawFleet {
    fn default() -> Self {
        RawFleet {
            groups: Vec::new(),
            keys: Default::default(),
            models_dir: None,
            reserve_bytes: 64 << 20,
            telemetry_interval_secs: 30,
            health_requests: 20,
            health_max_error_rate: 0.5,
            health_window_secs: 120,
        }
    }
}

/// The validated `[fleet]`.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub groups: Vec<String>,
    pub keys: crate::fleet::envelope::TrustedKeys,
    pub models_dir: PathBuf,
    pub reserve_bytes: u64,
    pub telemetry_interval: Duration,
    pub health: crate::fleet::health::HealthRule,
}

/// `[policy]`: where requests go.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawPolicy {
    /// `local-first` (default), `local-only` or `cloud-first`.
    pub mode: crate::policy::Mode,
    /// The latency budget of a request that names none (`parameters.budget_ms`, else the MQTT
    /// v5 message expiry, else the model's `budget_ms`, else this).
    pub default_budget_ms: u64,
    /// Offload whatever the estimates say at or above these.
    pub cpu_limit_percent: f64,
    pub temperature_limit_c: f64,
    /// Offload when this many requests wait locally (default: half of inference.queue).
    pub queue_limit: Option<usize>,
    /// How often the load is sampled.
    pub monitor_interval_ms: u64,
    /// The share of a request's budget an estimate may fill and still count as meeting it;
    /// the rest is room for the estimate's error and the reply's way back.
    pub headroom: f64,
    /// Per model: `[policy.models.digits] budget_ms = 50, escalate_below = 0.6`.
    pub models: std::collections::BTreeMap<String, RawModelPolicy>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModelPolicy {
    pub budget_ms: Option<u64>,
    /// A classifier answer whose top-1 probability is below this goes to the relay's (bigger)
    /// model, when the budget and the circuit allow.
    pub escalate_below: Option<f64>,
}

/// `[relay]`: the Tether relay (or any Open Inference Protocol server).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRelay {
    /// `http://host:port` or `https://...`.
    pub url: String,
    /// The device's token (sent as `Authorization: Bearer`), from this file.
    pub token_file: Option<PathBuf>,
    /// Open the circuit after this many failures in a row...
    #[serde(default = "default_breaker_failures")]
    pub breaker_failures: u32,
    /// ...or when this share of the last `breaker_window` calls failed.
    #[serde(default = "default_breaker_error_rate")]
    pub breaker_error_rate: f64,
    #[serde(default = "default_breaker_window")]
    pub breaker_window: usize,
    /// How long the circuit stays open before one probe.
    #[serde(default = "default_breaker_open_ms")]
    pub breaker_open_ms: u64,
}

impl RawRelay {
    /// A relay at `url` with the default breaker.
    pub fn new(url: String) -> RawRelay {
        RawRelay {
            url,
            token_file: None,
            breaker_failures: default_breaker_failures(),
            breaker_error_rate: default_breaker_error_rate(),
            breaker_window: default_breaker_window(),
            breaker_open_ms: default_breaker_open_ms(),
        }
    }
}

fn default_breaker_failures() -> u32 {
    3
}
fn default_breaker_error_rate() -> f64 {
    0.5
}
fn default_breaker_window() -> usize {
    20
}
fn default_breaker_open_ms() -> u64 {
    2000
}

/// `[metrics]`: the Prometheus endpoint.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawMetrics {
    /// Serve `/metrics` here (for example `0.0.0.0:9464`); off when unset.
    pub listen: Option<String>,
}

impl Default for RawPolicy {
    fn default() -> Self {
        RawPolicy {
            mode: crate::policy::Mode::LocalFirst,
            default_budget_ms: 1000,
            cpu_limit_percent: 95.0,
            temperature_limit_c: 80.0,
            queue_limit: None,
            monitor_interval_ms: 1000,
            headroom: 0.75,
            models: Default::default(),
        }
    }
}

/// `[store]`: the agent's SQLite database (result cache, outbox, history).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawStore {
    /// The database file (default: `tether.db` in `$STATE_DIRECTORY` when systemd sets it, else
    /// in the working directory). Its `-wal` and `-shm` companions live beside it.
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
    /// Per model: `[store.cache.models.digits] enabled = false` or `ttl_secs = 60`.
    pub models: std::collections::BTreeMap<String, RawModelCache>,
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

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawMqtt {
    /// `mqtt://host:port` or `mqtts://host:port` (TLS).
    pub broker: String,
    /// `v5` (default: response topics, correlation data, shared-subscription pools) or `v311`
    /// for brokers that speak only MQTT 3.1.1 (requesters then use `parameters.reply_to`).
    pub protocol: Protocol,
    /// Default: `tether-{device_id}`. Must be stable across restarts for the persistent session.
    pub client_id: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Read the password from this file instead (trailing newline ignored).
    pub password_file: Option<PathBuf>,
    /// PEM CA bundle that signs the broker's certificate (mqtts).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and key, for mutual TLS.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub keep_alive_secs: u64,
    /// How long the broker keeps our session (and queues QoS 1 requests) while we are away.
    pub session_expiry_secs: u32,
    /// Requests larger than this get a `bad_request` reply without being parsed.
    pub max_payload_bytes: usize,
    /// Reconnect backoff: first delay and cap, in milliseconds (exponential, with jitter).
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawInference {
    /// Inference worker threads (default: the number of cores). Real devices often keep one
    /// core for other work.
    pub workers: Option<usize>,
    /// Requests waiting for a worker; beyond this a request gets `overloaded` at once.
    pub queue: usize,
    /// Largest input tensor accepted, in elements.
    pub max_elements: usize,
    /// Classes listed in classifier replies.
    pub top_k: usize,
    /// Development only: hold every local inference to at least this many milliseconds, so a
    /// fast development machine behaves like a slow device (the demo and the offload tests use
    /// it). 0, the default, in production.
    pub emulated_service_ms: f64,
    /// The tract runtime: unset for the CPU, `cuda` on a Jetson (a build with --features cuda).
    pub runtime: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawEmbeddedBroker {
    /// MQTT v5 listener (the agent connects here). Port 0 picks a free port.
    pub listen: String,
    /// MQTT 3.1.1 listener, for 3.1.1 clients (rumqttd serves each protocol on its own port).
    /// Default: the v5 port plus one.
    pub listen_v311: Option<String>,
    /// Connect the agent to this broker, instead of `mqtt.broker`.
    pub connect: bool,
}

impl Default for RawConfig {
    fn default() -> Self {
        RawConfig {
            device_id: None,
            topic_prefix: "tether".into(),
            pool: None,
            models_dir: None,
            shutdown_grace_ms: 10_000,
            mqtt: RawMqtt::default(),
            inference: RawInference::default(),
            embedded_broker: None,
            store: RawStore::default(),
            policy: RawPolicy::default(),
            relay: None,
            metrics: RawMetrics::default(),
            fleet: RawFleet::default(),
            sensors: Vec::new(),
            actuators: Vec::new(),
        }
    }
}

impl Default for RawMqtt {
    fn default() -> Self {
        RawMqtt {
            broker: "mqtt://127.0.0.1:1883".into(),
            protocol: Protocol::V5,
            client_id: None,
            username: None,
            password: None,
            password_file: None,
            ca_file: None,
            client_cert: None,
            client_key: None,
            keep_alive_secs: 30,
            session_expiry_secs: 3600,
            max_payload_bytes: 4 * 1024 * 1024,
            reconnect_min_ms: 200,
            reconnect_max_ms: 30_000,
        }
    }
}

impl Default for RawInference {
    fn default() -> Self {
        RawInference {
            workers: None,
            queue: 64,
            max_elements: models::v2::DEFAULT_MAX_ELEMENTS,
            top_k: 3,
            emulated_service_ms: 0.0,
            runtime: None,
        }
    }
}

impl Default for RawEmbeddedBroker {
    fn default() -> Self {
        RawEmbeddedBroker {
            listen: DEFAULT_EMBEDDED_LISTEN.into(),
            listen_v311: None,
            connect: true,
        }
    }
}

/// Where `--embedded-broker` listens when given no address.
pub const DEFAULT_EMBEDDED_LISTEN: &str = "127.0.0.1:1883";

/// The MQTT protocol version the agent speaks to its broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    V5,
    V311,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub device_id: String,
    pub topic_prefix: String,
    pub pool: Option<String>,
    pub models_dir: PathBuf,
    pub shutdown_grace: Duration,
    pub mqtt: MqttConfig,
    pub inference: InferenceConfig,
    pub embedded_broker: Option<EmbeddedBrokerConfig>,
    pub store: StoreConfig,
    pub policy: PolicyConfig,
    pub relay: Option<RelayConfig>,
    pub metrics_listen: Option<SocketAddr>,
    pub fleet: FleetConfig,
    pub sensors: Vec<crate::sensors::RawSensor>,
    pub actuators: Vec<crate::sensors::RawActuator>,
    /// agent.toml as read, with the device id resolved: what fleet documents merge over.
    pub raw: RawConfig,
}

#[derive(Debug, Clone)]
pub struct PolicyConfig {
    pub policy: crate::policy::Policy,
    pub default_budget: Duration,
    pub monitor_interval: Duration,
    pub models: std::collections::BTreeMap<String, RawModelPolicy>,
}

impl PolicyConfig {
    /// The budget of a request to `model` that names none.
    pub fn budget_for(&self, model: &str) -> Duration {
        self.models
            .get(model)
            .and_then(|m| m.budget_ms)
            .map_or(self.default_budget, Duration::from_millis)
    }

    pub fn escalate_below(&self, model: &str) -> Option<f64> {
        self.models.get(model).and_then(|m| m.escalate_below)
    }
}

#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub url: url::Url,
    pub token: Option<String>,
    pub breaker: crate::policy::BreakerConfig,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub path: PathBuf,
    pub synchronous: Synchronous,
    pub max_batch: usize,
    pub cache: CacheConfig,
    pub outbox: OutboxConfig,
    pub history: HistoryConfig,
}

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub enabled: bool,
    pub ttl: Duration,
    pub max_rows: u64,
    pub max_bytes: u64,
    pub memory_entries: usize,
    pub models: std::collections::BTreeMap<String, RawModelCache>,
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

/// The database file when `store.path` is not set.
pub fn default_store_path() -> PathBuf {
    match std::env::var_os("STATE_DIRECTORY") {
        // systemd may pass several, colon-separated; the first is ours.
        Some(dirs) => {
            let first = dirs
                .to_string_lossy()
                .split(':')
                .next()
                .unwrap_or("")
                .to_owned();
            PathBuf::from(first).join("tether.db")
        }
        None => PathBuf::from("tether.db"),
    }
}

#[derive(Debug, Clone)]
pub struct MqttConfig {
    pub protocol: Protocol,
    pub host: String,
    pub port: u16,
    pub tls: Option<TlsConfig>,
    pub client_id: String,
    pub credentials: Option<(String, String)>,
    pub keep_alive: Duration,
    pub session_expiry_secs: u32,
    pub max_payload_bytes: usize,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
}

#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// PEM CA bundle; `None` trusts nothing but what the client cert implies (refused at
    /// validation: mqtts needs a CA file).
    pub ca_pem: Vec<u8>,
    pub client_auth: Option<(Vec<u8>, Vec<u8>)>,
}

#[derive(Debug, Clone)]
pub struct InferenceConfig {
    pub workers: usize,
    pub queue: usize,
    pub max_elements: usize,
    pub top_k: usize,
    pub emulated_service: Duration,
    pub runtime: Option<String>,
}

#[derive(Debug, Clone)]
pub struct EmbeddedBrokerConfig {
    pub listen: SocketAddr,
    pub listen_v311: Option<SocketAddr>,
    pub connect: bool,
}

/// Every problem found, one sentence each.
#[derive(Debug, thiserror::Error)]
#[error("the configuration is invalid:\n  - {}", .0.join("\n  - "))]
pub struct ConfigErrors(pub Vec<String>);

impl RawConfig {
    /// Reads agent.toml (a missing explicit file is an error; no file at all means defaults)
    /// and applies the `TETHER_*` overrides from `env`.
    pub fn load(
        path: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<RawConfig, ConfigErrors> {
        let mut value: toml::Table = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigErrors(vec![format!("cannot read {}: {e}", path.display())])
                })?;
                toml::from_str(&text)
                    .map_err(|e| ConfigErrors(vec![format!("{}: {e}", path.display())]))?
            }
            None => toml::Table::new(),
        };
        let mut errors = Vec::new();
        for (var, key) in ENV_OVERRIDES {
            if let Some(text) = env(var) {
                set_dotted(&mut value, key, env_value(&text));
            }
        }
        let raw: RawConfig =
            toml::Value::Table(value)
                .try_into()
                .map_err(|e: toml::de::Error| {
                    errors.push(match path {
                        Some(p) => format!("{}: {}", p.display(), e.message()),
                        None => e.message().to_owned(),
                    });
                    ConfigErrors(errors.clone())
                })?;
        Ok(raw)
    }

    /// Checks everything and builds the typed configuration.
    pub fn validate(
        &self,
        hostname: impl FnOnce() -> Option<String>,
    ) -> Result<Config, ConfigErrors> {
        let mut errors = Vec::new();
        let device_id = self.device_id.clone().or_else(hostname).unwrap_or_default();
        check_segment("device_id", &device_id, &mut errors);
        for (i, seg) in self.topic_prefix.split('/').enumerate() {
            check_segment(&format!("topic_prefix segment {}", i + 1), seg, &mut errors);
        }
        if let Some(pool) = &self.pool {
            check_segment("pool", pool, &mut errors);
        }
        let mqtt = self.validate_mqtt(&device_id, &mut errors);
        let inference = &self.inference;
        let workers = inference
            .workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        if !(1..=256).contains(&workers) {
            errors.push(format!("inference.workers is {workers}; use 1 to 256"));
        }
        if !(1..=100_000).contains(&inference.queue) {
            errors.push(format!(
                "inference.queue is {}; use 1 to 100000",
                inference.queue
            ));
        }
        if inference.max_elements == 0 {
            errors.push("inference.max_elements must be positive".into());
        }
        let embedded_broker = self.embedded_broker.as_ref().and_then(|b| {
            let listen = parse_addr("embedded_broker.listen", &b.listen, &mut errors)?;
            let listen_v311 = match &b.listen_v311 {
                Some(a) => Some(parse_addr("embedded_broker.listen_v311", a, &mut errors)?),
                None => None,
            };
            Some(EmbeddedBrokerConfig {
                listen,
                listen_v311,
                connect: b.connect,
            })
        });
        if self.shutdown_grace_ms > 600_000 {
            errors.push(format!(
                "shutdown_grace_ms is {}; use at most 600000 (ten minutes)",
                self.shutdown_grace_ms
            ));
        }
        let models_dir = self
            .models_dir
            .clone()
            .unwrap_or_else(|| crate::models_dir(None));
        if !models_dir.join(models::manifest::MANIFEST_FILE).exists() {
            errors.push(format!(
                "models_dir {} holds no {}",
                models_dir.display(),
                models::manifest::MANIFEST_FILE
            ));
        }
        if device_id == "fleet" {
            errors.push("device_id `fleet` is reserved for group topics ({prefix}/fleet/{group}/config); choose another".into());
        }
        let store = self.validate_store(&mut errors);
        let fleet = self.validate_fleet(&store, &mut errors);
        crate::sensors::validate(&self.sensors, &self.actuators, &mut errors);
        let policy = self.validate_policy(inference.queue, &mut errors);
        let relay = self.validate_relay(&mut errors);
        let metrics_listen = self
            .metrics
            .listen
            .as_ref()
            .and_then(|a| parse_addr("metrics.listen", a, &mut errors));
        match (mqtt, errors.is_empty()) {
            (Some(mqtt), true) => Ok(Config {
                device_id: device_id.clone(),
                topic_prefix: self.topic_prefix.clone(),
                pool: self.pool.clone(),
                models_dir,
                shutdown_grace: Duration::from_millis(self.shutdown_grace_ms),
                mqtt,
                inference: InferenceConfig {
                    workers,
                    queue: inference.queue,
                    max_elements: inference.max_elements,
                    top_k: inference.top_k,
                    emulated_service: Duration::from_secs_f64(
                        inference.emulated_service_ms.clamp(0.0, 60_000.0) / 1e3,
                    ),
                    runtime: inference.runtime.clone(),
                },
                embedded_broker,
                store,
                policy,
                relay,
                metrics_listen,
                fleet,
                sensors: self.sensors.clone(),
                actuators: self.actuators.clone(),
                raw: RawConfig {
                    device_id: Some(device_id.clone()),
                    ..self.clone()
                },
            }),
            _ => Err(ConfigErrors(errors)),
        }
    }

    fn validate_fleet(&self, store: &StoreConfig, errors: &mut Vec<String>) -> FleetConfig {
        let f = &self.fleet;
        for g in &f.groups {
            check_segment("fleet.groups entry", g, errors);
        }
        let keys = crate::fleet::envelope::TrustedKeys::from_hex(&f.keys).unwrap_or_else(|e| {
            errors.extend(e);
            Default::default()
        });
        if f.health_requests == 0 {
            errors.push("fleet.health_requests must be positive".into());
        }
        if !(0.0..=1.0).contains(&f.health_max_error_rate) {
            errors.push(format!(
                "fleet.health_max_error_rate is {}; use a share from 0 to 1",
                f.health_max_error_rate
            ));
        }
        if f.telemetry_interval_secs > 86_400 {
            errors.push("fleet.telemetry_interval_secs must be at most 86400 (a day)".into());
        }
        let models_dir = f.models_dir.clone().unwrap_or_else(|| {
            store
                .path
                .parent()
                .map_or_else(|| PathBuf::from("models"), |p| p.join("models"))
        });
        FleetConfig {
            groups: f.groups.clone(),
            keys,
            models_dir,
            reserve_bytes: f.reserve_bytes,
            telemetry_interval: Duration::from_secs(f.telemetry_interval_secs),
            health: crate::fleet::health::HealthRule {
                requests: f.health_requests.max(1),
                max_error_rate: f.health_max_error_rate,
                window: Duration::from_secs(f.health_window_secs),
            },
        }
    }

    fn validate_policy(&self, queue: usize, errors: &mut Vec<String>) -> PolicyConfig {
        let p = &self.policy;
        if p.default_budget_ms == 0 {
            errors.push("policy.default_budget_ms must be positive".into());
        }
        if !(0.0..=100.0).contains(&p.cpu_limit_percent) {
            errors.push(format!(
                "policy.cpu_limit_percent is {}; use 0 to 100",
                p.cpu_limit_percent
            ));
        }
        if !(p.headroom > 0.0 && p.headroom <= 1.0) {
            errors.push(format!(
                "policy.headroom is {}; use a share above 0 and at most 1",
                p.headroom
            ));
        }
        if p.monitor_interval_ms < 50 {
            errors.push("policy.monitor_interval_ms must be at least 50".into());
        }
        for (name, m) in &p.models {
            if let Some(t) = m.escalate_below
                && !(0.0..=1.0).contains(&t)
            {
                errors.push(format!(
                    "policy.models.{name}.escalate_below is {t}; use a probability from 0 to 1"
                ));
            }
            if m.budget_ms == Some(0) {
                errors.push(format!("policy.models.{name}.budget_ms must be positive"));
            }
        }
        PolicyConfig {
            policy: crate::policy::Policy {
                mode: p.mode,
                limits: crate::policy::Limits {
                    cpu_percent: p.cpu_limit_percent,
                    temperature_c: p.temperature_limit_c,
                    queue: p.queue_limit.unwrap_or((queue / 2).max(1)),
                },
                headroom: p.headroom,
            },
            default_budget: Duration::from_millis(p.default_budget_ms),
            monitor_interval: Duration::from_millis(p.monitor_interval_ms),
            models: p.models.clone(),
        }
    }

    fn validate_relay(&self, errors: &mut Vec<String>) -> Option<RelayConfig> {
        let r = self.relay.as_ref()?;
        let url = match url::Url::parse(&r.url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => Some(u),
            Ok(u) => {
                errors.push(format!(
                    "relay.url `{u}` must be an http:// or https:// URL with a host"
                ));
                None
            }
            Err(e) => {
                errors.push(format!("relay.url `{}` is not a URL ({e})", r.url));
                None
            }
        };
        let token = match &r.token_file {
            Some(f) => match std::fs::read_to_string(f) {
                Ok(t) if !t.trim().is_empty() => Some(t.trim().to_owned()),
                Ok(_) => {
                    errors.push(format!("relay.token_file {} is empty", f.display()));
                    None
                }
                Err(e) => {
                    errors.push(format!("relay.token_file {}: {e}", f.display()));
                    None
                }
            },
            None => None,
        };
        if r.breaker_failures == 0
            || !(0.0..=1.0).contains(&r.breaker_error_rate)
            || r.breaker_window == 0
        {
            errors.push("relay.breaker_failures and breaker_window must be positive and breaker_error_rate 0 to 1".into());
        }
        Some(RelayConfig {
            url: url?,
            token,
            breaker: crate::policy::BreakerConfig {
                consecutive_failures: r.breaker_failures.max(1),
                error_rate: r.breaker_error_rate,
                window: r.breaker_window.max(1),
                open_for: Duration::from_millis(r.breaker_open_ms),
            },
        })
    }

    fn validate_store(&self, errors: &mut Vec<String>) -> StoreConfig {
        let s = &self.store;
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
        }
    }

    fn validate_mqtt(&self, device_id: &str, errors: &mut Vec<String>) -> Option<MqttConfig> {
        let m = &self.mqtt;
        let url = match url::Url::parse(&m.broker) {
            Ok(url) => Some(url),
            Err(e) => {
                errors.push(format!("mqtt.broker `{}` is not a URL ({e}); write mqtt://host:port or mqtts://host:port", m.broker));
                None
            }
        };
        let mut tls_wanted = false;
        let mut host_port = None;
        if let Some(url) = &url {
            match url.scheme() {
                "mqtt" | "tcp" => {}
                "mqtts" | "ssl" => tls_wanted = true,
                other => errors.push(format!(
                    "mqtt.broker has scheme `{other}`; use mqtt:// or mqtts://"
                )),
            }
            match url.host_str() {
                Some(host) if !host.is_empty() => {
                    let port = url.port().unwrap_or(if tls_wanted { 8883 } else { 1883 });
                    host_port = Some((host.trim_matches(['[', ']']).to_owned(), port));
                }
                _ => errors.push(format!("mqtt.broker `{}` names no host", m.broker)),
            }
        }
        let read = |what: &str, p: &Path, errors: &mut Vec<String>| match std::fs::read(p) {
            Ok(b) => Some(b),
            Err(e) => {
                errors.push(format!("mqtt.{what} {}: {e}", p.display()));
                None
            }
        };
        let tls = if tls_wanted {
            let ca = match &m.ca_file {
                Some(p) => read("ca_file", p, errors),
                None => {
                    errors.push("mqtt.broker is mqtts:// but mqtt.ca_file is not set: name the PEM CA that signs the broker".into());
                    None
                }
            };
            let client_auth = match (&m.client_cert, &m.client_key) {
                (Some(c), Some(k)) => {
                    read("client_cert", c, errors).zip(read("client_key", k, errors))
                }
                (None, None) => None,
                _ => {
                    errors.push(
                        "mqtt.client_cert and mqtt.client_key go together: set both for mutual TLS"
                            .into(),
                    );
                    None
                }
            };
            ca.map(|ca_pem| TlsConfig {
                ca_pem,
                client_auth,
            })
        } else {
            if m.ca_file.is_some() || m.client_cert.is_some() {
                errors.push("mqtt.ca_file and mqtt.client_cert need an mqtts:// broker".into());
            }
            None
        };
        let password = match (&m.password, &m.password_file) {
            (Some(_), Some(_)) => {
                errors.push("set mqtt.password or mqtt.password_file, not both".into());
                None
            }
            (Some(p), None) => Some(p.clone()),
            (None, Some(f)) => match std::fs::read_to_string(f) {
                Ok(s) => Some(s.trim_end_matches(['\n', '\r']).to_owned()),
                Err(e) => {
                    errors.push(format!("mqtt.password_file {}: {e}", f.display()));
                    None
                }
            },
            (None, None) => None,
        };
        let credentials = match (&m.username, password) {
            (Some(u), p) => Some((u.clone(), p.unwrap_or_default())),
            (None, Some(_)) => {
                errors.push("mqtt.password is set without mqtt.username".into());
                None
            }
            (None, None) => None,
        };
        if !(1..=65_535).contains(&m.keep_alive_secs) {
            errors.push(format!(
                "mqtt.keep_alive_secs is {}; use 1 to 65535",
                m.keep_alive_secs
            ));
        }
        if m.max_payload_bytes < 1024 || m.max_payload_bytes > 256 * 1024 * 1024 {
            errors.push(format!(
                "mqtt.max_payload_bytes is {}; use 1024 to 268435456",
                m.max_payload_bytes
            ));
        }
        if m.reconnect_min_ms == 0 || m.reconnect_min_ms > m.reconnect_max_ms {
            errors.push(format!(
                "mqtt.reconnect_min_ms ({}) must be positive and at most mqtt.reconnect_max_ms ({})",
                m.reconnect_min_ms, m.reconnect_max_ms
            ));
        }
        let client_id = m
            .client_id
            .clone()
            .unwrap_or_else(|| format!("tether-{device_id}"));
        if client_id.is_empty() || client_id.len() > 128 {
            errors.push("mqtt.client_id must be 1 to 128 characters".into());
        }
        let (host, port) = host_port?;
        if tls_wanted && tls.is_none() {
            return None;
        }
        Some(MqttConfig {
            protocol: m.protocol,
            host,
            port,
            tls,
            client_id,
            credentials,
            keep_alive: Duration::from_secs(m.keep_alive_secs),
            session_expiry_secs: m.session_expiry_secs,
            max_payload_bytes: m.max_payload_bytes,
            reconnect_min: Duration::from_millis(m.reconnect_min_ms),
            reconnect_max: Duration::from_millis(m.reconnect_max_ms),
        })
    }
}

fn check_segment(what: &str, s: &str, errors: &mut Vec<String>) {
    if s.is_empty() {
        errors.push(format!("{what} is empty"));
    } else if s.contains(['/', '+', '#', '\0']) || s.starts_with('$') {
        errors.push(format!(
            "{what} `{s}` cannot be an MQTT topic segment: no `/`, `+`, `#`, or leading `$`"
        ));
    }
}

fn parse_addr(what: &str, s: &str, errors: &mut Vec<String>) -> Option<SocketAddr> {
    match s.parse() {
        Ok(a) => Some(a),
        Err(_) => {
            errors.push(format!(
                "{what} `{s}` is not an address such as 127.0.0.1:1883"
            ));
            None
        }
    }
}

/// An environment value as TOML would read it: integers and booleans typed, the rest strings.
fn env_value(text: &str) -> toml::Value {
    if let Ok(i) = text.parse::<i64>() {
        return toml::Value::Integer(i);
    }
    match text {
        "true" => toml::Value::Boolean(true),
        "false" => toml::Value::Boolean(false),
        _ => toml::Value::String(text.to_owned()),
    }
}

fn set_dotted(table: &mut toml::Table, key: &str, value: toml::Value) {
    match key.split_once('.') {
        None => {
            table.insert(key.to_owned(), value);
        }
        Some((head, rest)) => {
            let entry = table
                .entry(head.to_owned())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if !entry.is_table() {
                *entry = toml::Value::Table(toml::Table::new());
            }
            if let toml::Value::Table(t) = entry {
                set_dotted(t, rest, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn from_toml(text: &str) -> Result<RawConfig, ConfigErrors> {
        let dir = std::env::temp_dir().join(format!(
            "tether-config-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.toml");
        std::fs::write(&path, text).unwrap();
        let r = RawConfig::load(Some(&path), no_env);
        std::fs::remove_dir_all(&dir).unwrap();
        r
    }

    #[test]
    fn no_file_gives_working_defaults() {
        let cfg = RawConfig::load(None, no_env)
            .unwrap()
            .validate(|| Some("pi-7".into()))
            .unwrap();
        assert_eq!(cfg.device_id, "pi-7");
        assert_eq!(cfg.topic_prefix, "tether");
        assert_eq!(cfg.mqtt.host, "127.0.0.1");
        assert_eq!(cfg.mqtt.port, 1883);
        assert_eq!(cfg.mqtt.client_id, "tether-pi-7");
        assert!(cfg.inference.workers >= 1);
        assert!(cfg.embedded_broker.is_none());
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = from_toml("[mqtt]\nbrokr = \"mqtt://x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `brokr`"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let raw = from_toml(
            r##"
device_id = "a/b"
pool = "#"
[mqtt]
broker = "http://x:1"
keep_alive_secs = 0
password = "p"
[inference]
workers = 0
queue = 0
"##,
        )
        .unwrap();
        let err = raw.validate(|| None).unwrap_err();
        let text = err.to_string();
        for needle in [
            "device_id `a/b` cannot be an MQTT topic segment",
            "pool `#` cannot be",
            "scheme `http`",
            "keep_alive_secs is 0",
            "password is set without mqtt.username",
            "inference.workers is 0",
            "inference.queue is 0",
        ] {
            assert!(text.contains(needle), "`{needle}` missing from:\n{text}");
        }
        assert_eq!(err.0.len(), 7, "{text}");
    }

    #[test]
    fn environment_overrides_the_file() {
        let env = |k: &str| match k {
            "TETHER_DEVICE_ID" => Some("env-dev".to_owned()),
            "TETHER_MQTT_BROKER" => Some("mqtt://broker.local:2883".to_owned()),
            "TETHER_INFERENCE_WORKERS" => Some("1".to_owned()),
            "TETHER_CI" => Some("1".to_owned()),
            _ => None,
        };
        let cfg = RawConfig::load(None, env)
            .unwrap()
            .validate(|| None)
            .unwrap();
        assert_eq!(cfg.device_id, "env-dev");
        assert_eq!(
            (cfg.mqtt.host.as_str(), cfg.mqtt.port),
            ("broker.local", 2883)
        );
        assert_eq!(cfg.inference.workers, 1);
    }

    #[test]
    fn mqtts_needs_a_ca_and_both_halves_of_a_client_cert() {
        let raw = from_toml("[mqtt]\nbroker = \"mqtts://b\"\nclient_cert = \"/nonexistent.pem\"\n")
            .unwrap();
        let text = raw.validate(|| Some("d".into())).unwrap_err().to_string();
        assert!(text.contains("mqtt.ca_file is not set"), "{text}");
        assert!(text.contains("go together"), "{text}");
    }
}
