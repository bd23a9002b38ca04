//! The agent's configuration: `agent.toml` (every key optional) -> `TETHER_*` environment
//! overrides -> command-line flags -> [`RawConfig::validate`], which reports every problem at
//! once and yields the typed [`Config`]. Owns no IO beyond reading the file and the environment.
//!
//! One file per section. Configuration sits below every component: it imports nothing from the
//! rest of the agent, and the components read their typed sections from here.

pub mod discover;
mod fleet;
mod inference;
mod mqtt;
mod policy;
mod relay;
pub mod reload;
mod sensors;
mod store;

pub use fleet::{FleetConfig, HealthRule, RawFleet, TrustedKeys};
pub use inference::{InferenceConfig, RawInference};
pub use mqtt::{MqttConfig, Protocol, RawMqtt, Roots, TlsConfig, client_auth_der};
pub use policy::{BreakerConfig, Limits, Mode, Policy, PolicyConfig, RawModelPolicy, RawPolicy};
pub use relay::{RawRelay, RelayConfig};
pub use sensors::{
    ActuatorKind, Condition, DEFAULT_MPU6050_ADDRESS, Fault, FaultKind, Phase, RawActuator,
    RawSensor, SensorKind,
};
pub use store::{
    CacheConfig, DedupeConfig, HistoryConfig, HistoryInputs, OutboxConfig, RawCache, RawDedupe,
    RawHistory, RawModelCache, RawOutbox, RawStore, StoreConfig, Synchronous, default_store_path,
};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Environment variables that override keys of agent.toml: `(variable, dotted key, type)`.
/// A value is typed by its key, never by how it looks: `TETHER_DEVICE_ID=1234` is the string
/// "1234", `TETHER_INFERENCE_WORKERS=x` an error naming the variable.
pub const ENV_OVERRIDES: &[(&str, &str, EnvType)] = &[
    ("TETHER_DEVICE_ID", "device_id", EnvType::Text),
    ("TETHER_TOPIC_PREFIX", "topic_prefix", EnvType::Text),
    ("TETHER_POOL", "pool", EnvType::Text),
    ("TETHER_MODELS", "models_dir", EnvType::Text),
    ("TETHER_MQTT_BROKER", "mqtt.broker", EnvType::Text),
    ("TETHER_MQTT_PROTOCOL", "mqtt.protocol", EnvType::Text),
    ("TETHER_MQTT_CLIENT_ID", "mqtt.client_id", EnvType::Text),
    ("TETHER_MQTT_USERNAME", "mqtt.username", EnvType::Text),
    ("TETHER_MQTT_PASSWORD", "mqtt.password", EnvType::Text),
    ("TETHER_MQTT_CA_FILE", "mqtt.ca_file", EnvType::Text),
    ("TETHER_MQTT_CLIENT_CERT", "mqtt.client_cert", EnvType::Text),
    ("TETHER_MQTT_CLIENT_KEY", "mqtt.client_key", EnvType::Text),
    (
        "TETHER_MQTT_MAX_PAYLOAD_BYTES",
        "mqtt.max_payload_bytes",
        EnvType::Integer,
    ),
    (
        "TETHER_INFERENCE_WORKERS",
        "inference.workers",
        EnvType::Integer,
    ),
    (
        "TETHER_INFERENCE_QUEUE",
        "inference.queue",
        EnvType::Integer,
    ),
    (
        "TETHER_EMBEDDED_BROKER_LISTEN",
        "embedded_broker.listen",
        EnvType::Text,
    ),
    (
        "TETHER_SHUTDOWN_GRACE_MS",
        "shutdown_grace_ms",
        EnvType::Integer,
    ),
    ("TETHER_STORE_PATH", "store.path", EnvType::Text),
    ("TETHER_RELAY_URL", "relay.url", EnvType::Text),
    ("TETHER_RELAY_TOKEN_FILE", "relay.token_file", EnvType::Text),
    ("TETHER_POLICY_MODE", "policy.mode", EnvType::Text),
    ("TETHER_METRICS_LISTEN", "metrics.listen", EnvType::Text),
    (
        "TETHER_STORE_SYNCHRONOUS",
        "store.synchronous",
        EnvType::Text,
    ),
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
    pub sensors: Vec<RawSensor>,
    /// `[[actuators]]`: outputs driven by the sensors' results.
    pub actuators: Vec<RawActuator>,
}

/// Every key with its default value and a comment, as `tether-agent config defaults` prints
/// it (a test holds it to [`RawConfig::default`]).
pub const DEFAULTS_TOML: &str = include_str!("../../deploy/agent.defaults.toml");

/// `[metrics]`: the Prometheus endpoint.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawMetrics {
    /// Serve `/metrics` here (for example `0.0.0.0:9464`); off when unset.
    pub listen: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawEmbeddedBroker {
    /// MQTT v5 listener (the agent connects here). Port 0 picks a free port.
    pub listen: String,
    /// An extra listener for MQTT 3.1.1 clients only. Default: none, `listen` serves 3.1.1
    /// clients as well (it used to be the v5 port plus one; README, "The embedded broker").
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
    pub sensors: Vec<RawSensor>,
    pub actuators: Vec<RawActuator>,
    /// agent.toml as read, with the device id resolved: what fleet documents merge over.
    pub raw: RawConfig,
}

#[derive(Debug, Clone)]
pub struct EmbeddedBrokerConfig {
    pub listen: SocketAddr,
    pub listen_v311: Option<SocketAddr>,
    pub connect: bool,
}

/// Where the model zoo is: the explicit choice, else as [`discover::zoo`] finds it.
pub fn models_dir(explicit: Option<PathBuf>) -> PathBuf {
    explicit.unwrap_or_else(|| discover::zoo(&|p: &Path| p.exists()))
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
        for (var, key, kind) in ENV_OVERRIDES {
            if let Some(text) = env(var) {
                match env_value(&text, *kind) {
                    Some(v) => set_dotted(&mut value, key, v),
                    None => errors.push(format!(
                        "{var}=`{text}` is not a whole number, which {key} must be"
                    )),
                }
            }
        }
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
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
        let mqtt = self.mqtt.validate(&device_id, &mut errors);
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
        if inference.queue_bytes < 64 * 1024 {
            errors.push(format!(
                "inference.queue_bytes is {}; use at least 65536",
                inference.queue_bytes
            ));
        }
        if inference.max_elements == 0 {
            errors.push("inference.max_elements must be positive".into());
        }
        for name in &inference.preload {
            if !is_plain_name(name) {
                errors.push(format!(
                    "inference.preload names `{}`, which is not a model name (letters, digits, `-`, `_` and `.`)",
                    name.escape_debug()
                ));
            }
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
        let models_dir = self.models_dir.clone().unwrap_or_else(|| models_dir(None));
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
        let store = self.store.validate(&mut errors);
        let fleet = self.fleet.validate(&store, &mut errors);
        sensors::validate(&self.sensors, &self.actuators, &mut errors);
        let policy = self.policy.validate(inference.queue, &mut errors);
        let relay = self.relay.as_ref().and_then(|r| r.validate(&mut errors));
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
                    queue_bytes: inference.queue_bytes,
                    max_elements: inference.max_elements,
                    top_k: inference.top_k,
                    emulated_service: Duration::from_secs_f64(
                        inference.emulated_service_ms.clamp(0.0, 60_000.0) / 1e3,
                    ),
                    runtime: inference.runtime.clone(),
                    preload: inference.preload.clone(),
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
}

/// A name that may become part of a file name: 1 to 64 ASCII letters, digits, `.`, `_` or `-`,
/// not starting with `.` (so never `..`, a path separator or a hidden file).
pub fn is_plain_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

pub(crate) fn check_segment(what: &str, s: &str, errors: &mut Vec<String>) {
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

/// What an overridable key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvType {
    Text,
    Integer,
}

/// An environment value as its key's type; `None` when it is not one.
fn env_value(text: &str, kind: EnvType) -> Option<toml::Value> {
    match kind {
        EnvType::Text => Some(toml::Value::String(text.to_owned())),
        EnvType::Integer => text.trim().parse::<i64>().ok().map(toml::Value::Integer),
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

    #[test]
    fn plain_names_never_leave_a_directory() {
        for (name, plain) in [
            ("digits", true),
            ("ocr_det-v4.1", true),
            ("a", true),
            (&"x".repeat(64) as &str, true),
            (&"x".repeat(65) as &str, false),
            ("", false),
            (".", false),
            ("..", false),
            (".hidden", false),
            ("../x", false),
            ("a/b", false),
            ("a\\b", false),
            ("a b", false),
            ("é", false),
            ("a\0", false),
        ] {
            assert_eq!(is_plain_name(name), plain, "{name:?}");
        }
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
    fn the_commented_defaults_are_exactly_the_defaults() {
        let text = DEFAULTS_TOML;
        let parsed: toml::Value = toml::from_str(text).unwrap();
        let defaults = toml::Value::try_from(RawConfig::default()).unwrap();
        assert_eq!(parsed, defaults, "agent/deploy/agent.defaults.toml drifted");
        assert!(from_toml(text).is_ok());
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
preload = ["digits", "../x"]
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
            "inference.preload names `../x`, which is not a model name",
        ] {
            assert!(text.contains(needle), "`{needle}` missing from:\n{text}");
        }
        assert_eq!(err.0.len(), 8, "{text}");
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
    fn environment_values_are_typed_by_their_key() {
        // Numeric-looking values of text keys stay text.
        let env = |k: &str| match k {
            "TETHER_DEVICE_ID" => Some("1234".to_owned()),
            "TETHER_MQTT_PASSWORD" => Some("123456".to_owned()),
            "TETHER_MQTT_USERNAME" => Some("true".to_owned()),
            "TETHER_SHUTDOWN_GRACE_MS" => Some(" 250 ".to_owned()),
            _ => None,
        };
        let raw = RawConfig::load(None, env).unwrap();
        assert_eq!(raw.mqtt.password.as_deref(), Some("123456"));
        assert_eq!(raw.mqtt.username.as_deref(), Some("true"));
        let cfg = raw.validate(|| None).unwrap();
        assert_eq!(cfg.device_id, "1234");
        assert_eq!(cfg.shutdown_grace, Duration::from_millis(250));
        // A number key given text is named.
        let env = |k: &str| (k == "TETHER_INFERENCE_WORKERS").then(|| "four".to_owned());
        let err = RawConfig::load(None, env).unwrap_err().to_string();
        assert!(
            err.contains("TETHER_INFERENCE_WORKERS=`four` is not a whole number"),
            "{err}"
        );
    }

    #[test]
    fn mqtts_needs_both_halves_of_a_client_cert_and_no_ca_file() {
        let raw = from_toml("[mqtt]\nbroker = \"mqtts://b\"\nclient_cert = \"/nonexistent.pem\"\n")
            .unwrap();
        let text = raw.validate(|| Some("d".into())).unwrap_err().to_string();
        assert!(text.contains("go together"), "{text}");
        // Without ca_file the system's roots are used (or their absence named).
        assert!(!text.contains("ca_file"), "{text}");
        let junk = std::env::temp_dir().join(format!("tether-junk-pem-{}", std::process::id()));
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let raw = from_toml(&format!(
            "[mqtt]\nbroker = \"mqtts://b\"\nclient_cert = \"{j}\"\nclient_key = \"{j}\"\nca_file = \"{j}\"\n",
            j = junk.display()
        ))
        .unwrap();
        let text = raw.validate(|| Some("d".into())).unwrap_err().to_string();
        std::fs::remove_file(&junk).unwrap();
        assert!(text.contains("mqtt.client_cert holds no"), "{text}");
        let junk = std::env::temp_dir().join(format!("tether-junk-ca-{}", std::process::id()));
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let raw = from_toml(&format!(
            "[relay]\nurl = \"https://relay.example\"\nca_file = \"{}\"\n",
            junk.display()
        ))
        .unwrap();
        let text = raw.validate(|| Some("d".into())).unwrap_err().to_string();
        std::fs::remove_file(&junk).unwrap();
        assert!(text.contains("relay.ca_file"), "{text}");
    }
}
