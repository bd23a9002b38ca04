//! `[fleet]`: signed configuration and model updates over MQTT, and telemetry.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{StoreConfig, check_segment};

/// `[fleet]`: signed configuration and model updates over MQTT, and telemetry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawFleet {
    /// The groups this device belongs to: it applies `{prefix}/fleet/{group}/config` for each,
    /// in this order, then its own `{prefix}/{device_id}/config`.
    pub groups: Vec<String>,
    /// Trusted signing keys: name = ed25519 public key in hex (`tether-agent fleet keygen`).
    /// Without any, fleet documents are not subscribed to.
    pub keys: BTreeMap<String, String>,
    /// Where downloaded models go (default: `models/` beside the database).
    pub models_dir: Option<PathBuf>,
    /// Bytes that must stay free after a model download.
    pub reserve_bytes: u64,
    /// Model URLs must be `https://` unless this is true (a lab without TLS).
    pub allow_http: bool,
    /// A model download, every attempt and pause included, gives up after this many seconds.
    pub download_timeout_secs: u64,
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
            allow_http: false,
            download_timeout_secs: 900,
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
    pub keys: TrustedKeys,
    pub models_dir: PathBuf,
    pub reserve_bytes: u64,
    pub allow_http: bool,
    pub download_timeout: Duration,
    pub telemetry_interval: Duration,
    pub health: HealthRule,
}

/// The ed25519 public keys an agent trusts, by name (`[fleet.keys]`, validated).
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys(BTreeMap<String, [u8; 32]>);

impl TrustedKeys {
    /// From `[fleet.keys]`: name = 64 hex digits. Errors are sentences naming the key.
    pub fn from_hex(keys: &BTreeMap<String, String>) -> Result<TrustedKeys, Vec<String>> {
        let mut out = BTreeMap::new();
        let mut errors = Vec::new();
        for (name, text) in keys {
            match hex::decode(text.trim())
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
            {
                Some(k) => {
                    out.insert(name.clone(), k);
                }
                None => errors.push(format!(
                    "fleet.keys.{name} is not an ed25519 public key: write the 64 hex digits `tether fleet keygen` printed"
                )),
            }
        }
        if errors.is_empty() {
            Ok(TrustedKeys(out))
        } else {
            Err(errors)
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The public key named `name`.
    pub fn get(&self, name: &str) -> Option<&[u8; 32]> {
        self.0.get(name)
    }

    /// The names of the trusted keys.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }
}

/// `[fleet]`'s health-check settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HealthRule {
    /// Local runs that decide (the first N after the switch).
    pub requests: usize,
    /// Roll back when more than this share of them failed.
    pub max_error_rate: f64,
    /// With fewer runs than `requests` by then, the configuration is judged on what ran (and
    /// kept when nothing did).
    pub window: Duration,
}

impl RawFleet {
    pub(super) fn validate(&self, store: &StoreConfig, errors: &mut Vec<String>) -> FleetConfig {
        let f = self;
        for g in &f.groups {
            check_segment("fleet.groups entry", g, errors);
        }
        let keys = TrustedKeys::from_hex(&f.keys).unwrap_or_else(|e| {
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
        if !(1..=86_400).contains(&f.download_timeout_secs) {
            errors.push(format!(
                "fleet.download_timeout_secs is {}; use 1 to 86400 seconds",
                f.download_timeout_secs
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
            allow_http: f.allow_http,
            download_timeout: Duration::from_secs(f.download_timeout_secs.clamp(1, 86_400)),
            telemetry_interval: Duration::from_secs(f.telemetry_interval_secs),
            health: HealthRule {
                requests: f.health_requests.max(1),
                max_error_rate: f.health_max_error_rate,
                window: Duration::from_secs(f.health_window_secs),
            },
        }
    }
}
