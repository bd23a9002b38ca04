//! relay.toml: raw serde form (every key optional, unknown keys rejected) -> `validate()`, which
//! reports every problem at once and yields the typed [`Config`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// relay.toml as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    /// Address to listen on.
    pub listen: String,
    /// Model directory with MANIFEST.toml (default: the zoo).
    pub models_dir: Option<PathBuf>,
    /// Which file of each model to serve: `cloud` (default), `device` or `source`.
    pub variant: String,
    /// Inference threads running at once (default: one per core).
    pub workers: Option<usize>,
    /// How long shutdown may take to drain requests in flight, in milliseconds.
    pub shutdown_grace_ms: u64,
    pub limits: RawLimits,
    /// Dynamic batching defaults for every model.
    pub batching: RawBatching,
    /// Per-model settings: batching overrides and upstream forwarding.
    pub models: BTreeMap<String, RawModel>,
    pub auth: RawAuth,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    /// Largest request body, in bytes (413 beyond).
    pub max_body_bytes: usize,
    /// Largest input tensor, in elements.
    pub max_elements: usize,
    /// Per-request deadline, from the end of the headers through reading the body, the queue
    /// and compute, in milliseconds (408 while the body is still arriving, 504 after).
    pub request_timeout_ms: u64,
    /// A client must send a request's headers within this many milliseconds of the connection
    /// opening or of its previous response (slow clients are closed).
    pub header_timeout_ms: u64,
    /// Open connections at most; more wait in the listen backlog.
    pub max_connections: usize,
    /// Request bodies being parsed at once, in bytes: a large body waits its turn rather than
    /// adding its parse to everyone else's memory (default: `max_body_bytes`, so one body of
    /// the largest size is parsed at a time).
    pub max_parse_bytes: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawBatching {
    /// Rows gathered into one call at most; 1 turns batching off.
    pub max_batch_size: usize,
    /// How long the first request of a batch may wait for others, in microseconds.
    pub max_queue_delay_us: u64,
    /// Requests waiting per model; a full queue answers 503 at once.
    pub queue: usize,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawModel {
    pub max_batch_size: Option<usize>,
    pub max_queue_delay_us: Option<u64>,
    pub queue: Option<usize>,
    /// Serve this model by forwarding to another V2 server (Triton, KServe, MLServer, a relay):
    /// its base URL, e.g. `http://triton:8000`.
    pub upstream: Option<String>,
    /// The model's name upstream (default: the same name).
    pub upstream_model: Option<String>,
    /// Bearer token sent upstream.
    pub upstream_token: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAuth {
    /// Device tokens, stored as sha256 hex (`tether-relay hash-token` prints it). With none,
    /// the relay serves without authentication, and says so.
    pub tokens: Vec<RawToken>,
    /// Requests per second each device may make (sustained), and the burst above it.
    pub rate_limit_rps: f64,
    pub rate_limit_burst: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawToken {
    pub device_id: String,
    /// sha256 of the bearer token, in hex.
    pub sha256: String,
    /// Models this device may use (all when absent).
    #[serde(default)]
    pub models: Option<Vec<String>>,
}

impl Default for RawConfig {
    fn default() -> Self {
        RawConfig {
            listen: "127.0.0.1:8080".into(),
            models_dir: None,
            variant: "cloud".into(),
            workers: None,
            shutdown_grace_ms: 10_000,
            limits: RawLimits::default(),
            batching: RawBatching::default(),
            // Measured: tract runs a batch of 8 PP-OCR frames 2.4 times slower than 8 single
            // frames (README, "Batching"), so its default is one request per call.
            models: BTreeMap::from([(
                "ocr_det".to_owned(),
                RawModel {
                    max_batch_size: Some(1),
                    ..RawModel::default()
                },
            )]),
            auth: RawAuth::default(),
        }
    }
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_body_bytes: 64 << 20,
            max_elements: models::v2::DEFAULT_MAX_ELEMENTS,
            request_timeout_ms: 10_000,
            header_timeout_ms: 10_000,
            max_connections: 1024,
            max_parse_bytes: None,
        }
    }
}

impl Default for RawBatching {
    fn default() -> Self {
        RawBatching {
            max_batch_size: 8,
            max_queue_delay_us: 2_000,
            queue: 256,
        }
    }
}

impl Default for RawAuth {
    fn default() -> Self {
        RawAuth {
            tokens: Vec::new(),
            rate_limit_rps: 100.0,
            rate_limit_burst: 200.0,
        }
    }
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub models_dir: PathBuf,
    pub variant: models::Variant,
    pub workers: usize,
    pub shutdown_grace: Duration,
    pub max_body_bytes: usize,
    pub max_elements: usize,
    pub request_timeout: Duration,
    pub header_timeout: Duration,
    pub max_connections: usize,
    pub max_parse_bytes: usize,
    pub batching: BatchConfig,
    pub models: BTreeMap<String, ModelConfig>,
    pub tokens: Vec<Token>,
    pub rate_limit_rps: f64,
    pub rate_limit_burst: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    pub max_batch_size: usize,
    pub max_queue_delay: Duration,
    pub queue: usize,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelConfig {
    pub batching: Option<BatchConfig>,
    pub upstream: Option<Upstream>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    pub base_url: String,
    pub model: Option<String>,
    pub token: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Token {
    pub device_id: String,
    pub sha256: String,
    pub models: Option<Vec<String>>,
}

/// Every problem found, one sentence each.
#[derive(Debug, thiserror::Error)]
#[error("the configuration is invalid:\n  - {}", .0.join("\n  - "))]
pub struct ConfigErrors(pub Vec<String>);

impl RawConfig {
    /// Reads relay.toml; no path means all defaults.
    pub fn load(path: Option<&Path>) -> Result<RawConfig, ConfigErrors> {
        let Some(path) = path else {
            return Ok(RawConfig::default());
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigErrors(vec![format!("cannot read {}: {e}", path.display())]))?;
        toml::from_str(&text)
            .map_err(|e| ConfigErrors(vec![format!("{}: {}", path.display(), e.message())]))
    }

    pub fn validate(&self) -> Result<Config, ConfigErrors> {
        let mut errors = Vec::new();
        let listen = self
            .listen
            .parse()
            .map_err(|_| {
                errors.push(format!(
                    "listen `{}` is not an address such as 127.0.0.1:8080",
                    self.listen
                ))
            })
            .ok();
        let variant = self
            .variant
            .parse()
            .map_err(|e: String| errors.push(format!("variant: {e}")))
            .ok();
        let workers = self
            .workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        if !(1..=256).contains(&workers) {
            errors.push(format!("workers is {workers}; use 1 to 256"));
        }
        if self.limits.max_body_bytes < 1024 {
            errors.push("limits.max_body_bytes must be at least 1024".into());
        }
        if self.limits.max_elements == 0 {
            errors.push("limits.max_elements must be positive".into());
        }
        if !(1..=3_600_000).contains(&self.limits.request_timeout_ms) {
            errors.push("limits.request_timeout_ms must be from 1 to 3600000 (an hour)".into());
        }
        if !(1..=600_000).contains(&self.limits.header_timeout_ms) {
            errors.push("limits.header_timeout_ms must be from 1 to 600000 (ten minutes)".into());
        }
        if !(1..=1_000_000).contains(&self.limits.max_connections) {
            errors.push("limits.max_connections must be from 1 to 1000000".into());
        }
        let max_parse_bytes = self
            .limits
            .max_parse_bytes
            .unwrap_or(self.limits.max_body_bytes);
        if max_parse_bytes < self.limits.max_body_bytes {
            errors.push(format!(
                "limits.max_parse_bytes ({max_parse_bytes}) must be at least limits.max_body_bytes ({}), or the largest body could never be parsed",
                self.limits.max_body_bytes
            ));
        }
        let batching = check_batching("batching", &self.batching, &mut errors);
        let mut models = BTreeMap::new();
        for (name, m) in &self.models {
            let b = if m.max_batch_size.is_some()
                || m.max_queue_delay_us.is_some()
                || m.queue.is_some()
            {
                let raw = RawBatching {
                    max_batch_size: m.max_batch_size.unwrap_or(self.batching.max_batch_size),
                    max_queue_delay_us: m
                        .max_queue_delay_us
                        .unwrap_or(self.batching.max_queue_delay_us),
                    queue: m.queue.unwrap_or(self.batching.queue),
                };
                Some(check_batching(&format!("models.{name}"), &raw, &mut errors))
            } else {
                None
            };
            let upstream = m.upstream.as_ref().map(|u| {
                if !(u.starts_with("http://") || u.starts_with("https://")) {
                    errors.push(format!(
                        "models.{name}.upstream `{u}` must be an http:// or https:// URL"
                    ));
                }
                Upstream {
                    base_url: u.trim_end_matches('/').to_owned(),
                    model: m.upstream_model.clone(),
                    token: m.upstream_token.clone(),
                }
            });
            models.insert(
                name.clone(),
                ModelConfig {
                    batching: b,
                    upstream,
                },
            );
        }
        let mut seen = std::collections::HashSet::new();
        for t in &self.auth.tokens {
            if t.sha256.len() != 64 || !t.sha256.chars().all(|c| c.is_ascii_hexdigit()) {
                errors.push(format!("auth.tokens for `{}`: sha256 must be 64 hex digits (tether-relay hash-token prints it)", t.device_id));
            }
            if !seen.insert(t.sha256.to_ascii_lowercase()) {
                errors.push(format!(
                    "auth.tokens: the token of `{}` is listed twice",
                    t.device_id
                ));
            }
            if t.device_id.is_empty() {
                errors.push("auth.tokens: device_id is empty".into());
            }
        }
        if !(self.auth.rate_limit_rps > 0.0 && self.auth.rate_limit_burst >= 1.0) {
            errors.push(
                "auth.rate_limit_rps must be positive and auth.rate_limit_burst at least 1".into(),
            );
        }
        let models_dir = self
            .models_dir
            .clone()
            .unwrap_or_else(models::default_zoo_dir);
        if !models_dir.join(models::manifest::MANIFEST_FILE).exists() {
            errors.push(format!(
                "models_dir {} holds no {}",
                models_dir.display(),
                models::manifest::MANIFEST_FILE
            ));
        }
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        match (listen, variant) {
            (Some(listen), Some(variant)) => Ok(Config {
                listen,
                models_dir,
                variant,
                workers,
                shutdown_grace: Duration::from_millis(self.shutdown_grace_ms),
                max_body_bytes: self.limits.max_body_bytes,
                max_elements: self.limits.max_elements,
                request_timeout: Duration::from_millis(self.limits.request_timeout_ms),
                header_timeout: Duration::from_millis(self.limits.header_timeout_ms),
                max_connections: self.limits.max_connections,
                max_parse_bytes,
                batching,
                models,
                tokens: self
                    .auth
                    .tokens
                    .iter()
                    .map(|t| Token {
                        device_id: t.device_id.clone(),
                        sha256: t.sha256.to_ascii_lowercase(),
                        models: t.models.clone(),
                    })
                    .collect(),
                rate_limit_rps: self.auth.rate_limit_rps,
                rate_limit_burst: self.auth.rate_limit_burst,
            }),
            _ => Err(ConfigErrors(errors)),
        }
    }
}

fn check_batching(what: &str, b: &RawBatching, errors: &mut Vec<String>) -> BatchConfig {
    if !(1..=1024).contains(&b.max_batch_size) {
        errors.push(format!(
            "{what}.max_batch_size is {}; use 1 to 1024",
            b.max_batch_size
        ));
    }
    if b.max_queue_delay_us > 1_000_000 {
        errors.push(format!(
            "{what}.max_queue_delay_us is {}; use at most 1000000 (one second)",
            b.max_queue_delay_us
        ));
    }
    if !(1..=100_000).contains(&b.queue) {
        errors.push(format!("{what}.queue is {}; use 1 to 100000", b.queue));
    }
    BatchConfig {
        max_batch_size: b.max_batch_size.max(1),
        max_queue_delay: Duration::from_micros(b.max_queue_delay_us),
        queue: b.queue.max(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        let c = RawConfig::default().validate().unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.variant, models::Variant::Cloud);
        assert!(c.tokens.is_empty());
        assert_eq!(c.batching.max_batch_size, 8);
        assert_eq!(c.max_parse_bytes, c.max_body_bytes);
        assert_eq!(c.header_timeout, Duration::from_secs(10));
    }

    #[test]
    fn every_problem_at_once() {
        let raw: RawConfig = toml::from_str(
            r#"
listen = "nowhere"
variant = "edge"
[limits]
request_timeout_ms = 0
header_timeout_ms = 0
max_connections = 0
max_body_bytes = 4096
max_parse_bytes = 2048
[batching]
max_batch_size = 0
[models.digits]
upstream = "ftp://x"
[[auth.tokens]]
device_id = "d"
sha256 = "abc"
"#,
        )
        .unwrap();
        let err = raw.validate().unwrap_err();
        let text = err.to_string();
        for needle in [
            "listen `nowhere`",
            "unknown variant `edge`",
            "max_batch_size is 0",
            "request_timeout_ms must be from 1",
            "header_timeout_ms must be from 1",
            "max_connections must be from 1",
            "max_parse_bytes (2048) must be at least limits.max_body_bytes (4096)",
            "must be an http://",
            "64 hex digits",
        ] {
            assert!(text.contains(needle), "`{needle}` missing from {text}");
        }
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = toml::from_str::<RawConfig>("[batching]\nmax_batch = 4\n").unwrap_err();
        assert!(
            err.to_string().contains("unknown field `max_batch`"),
            "{err}"
        );
    }
}
