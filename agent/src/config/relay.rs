//! `[relay]`: the Tether relay (or any Open Inference Protocol server) requests are offloaded to.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::BreakerConfig;

/// `[relay]`: the Tether relay (or any Open Inference Protocol server).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRelay {
    /// `http://host:port` or `https://...`.
    pub url: String,
    /// The device's token (sent as `Authorization: Bearer`), from this file.
    pub token_file: Option<PathBuf>,
    /// PEM CA bundle that signs an `https://` relay (and model downloads from it); default: the
    /// system's root certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
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
            ca_file: None,
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

#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub url: url::Url,
    pub token: Option<String>,
    /// `relay.ca_file`'s PEM bundle: the only roots trusted for the relay when set.
    pub ca_pem: Option<Vec<u8>>,
    pub breaker: BreakerConfig,
}

impl RawRelay {
    pub(super) fn validate(&self, errors: &mut Vec<String>) -> Option<RelayConfig> {
        let r = self;
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
        let ca_pem = match &r.ca_file {
            Some(f) => match std::fs::read(f) {
                Ok(pem)
                    if reqwest::Certificate::from_pem_bundle(&pem).is_ok_and(|c| !c.is_empty()) =>
                {
                    Some(pem)
                }
                Ok(_) => {
                    errors.push(format!(
                        "relay.ca_file {} holds no readable PEM certificate",
                        f.display()
                    ));
                    None
                }
                Err(e) => {
                    errors.push(format!("relay.ca_file {}: {e}", f.display()));
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
            ca_pem,
            breaker: BreakerConfig {
                consecutive_failures: r.breaker_failures.max(1),
                error_rate: r.breaker_error_rate,
                window: r.breaker_window.max(1),
                open_for: Duration::from_millis(r.breaker_open_ms),
            },
        })
    }
}
