//! `[policy]`: where requests go, and the relay's circuit breaker.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `[policy]`: where requests go.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawPolicy {
    /// `local-first` (default), `local-only` or `cloud-first`.
    pub mode: Mode,
    /// The latency budget of a request that names none (`parameters.budget_ms`, else the MQTT
    /// v5 message expiry, else the model's `budget_ms`, else this).
    pub default_budget_ms: u64,
    /// The largest budget a request may ask for (`parameters.budget_ms`, the model's, or its
    /// Message Expiry): a request asking more is refused as a bad request (an expiry longer
    /// than this is only capped).
    pub max_budget_ms: u64,
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
    /// Per model: `[policy.models.digits] budget_ms = 50, escalate_below = 0.6,
    /// audit_rate = 0.01`.
    pub models: BTreeMap<String, RawModelPolicy>,
    /// Audits (see `audit_rate`) sent to the relay per second at most, over all models.
    pub audit_max_per_s: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModelPolicy {
    pub budget_ms: Option<u64>,
    /// A classifier answer whose top-1 probability is below this goes to the relay's (bigger)
    /// model, when the budget and the circuit allow.
    pub escalate_below: Option<f64>,
    /// The share of local answers (0 to 1), chosen at random, also asked of the relay's model
    /// after the reply: their agreement is the evidence a model rollout is judged on.
    pub audit_rate: Option<f64>,
}

impl Default for RawPolicy {
    fn default() -> Self {
        RawPolicy {
            mode: Mode::LocalFirst,
            default_budget_ms: 1000,
            max_budget_ms: 300_000,
            cpu_limit_percent: 95.0,
            temperature_limit_c: 80.0,
            queue_limit: None,
            monitor_interval_ms: 1000,
            headroom: 0.75,
            models: Default::default(),
            audit_max_per_s: 5.0,
        }
    }
}

/// The policy's modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Local when it meets the budget, else the cloud when it does, else the faster estimate.
    LocalFirst,
    /// Never the cloud.
    LocalOnly,
    /// The cloud when it meets the budget, else local.
    CloudFirst,
}

impl std::str::FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "local-first" => Ok(Mode::LocalFirst),
            "local-only" => Ok(Mode::LocalOnly),
            "cloud-first" => Ok(Mode::CloudFirst),
            other => Err(format!(
                "the policy mode is `{other}`; use local-first, local-only or cloud-first"
            )),
        }
    }
}

/// Thresholds that force offloading, whatever the estimates say.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// CPU utilisation, 0 to 100.
    pub cpu_percent: f64,
    pub temperature_c: f64,
    /// Requests waiting for a local worker.
    pub queue: usize,
}

/// The policy configuration the decision needs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    pub mode: Mode,
    pub limits: Limits,
    /// The share of a budget an estimate may use and still "meet" it: the rest is room for
    /// the estimate's error and the way back to the requester.
    pub headroom: f64,
}

/// The circuit breaker's configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerConfig {
    /// Open after this many failures in a row...
    pub consecutive_failures: u32,
    /// ...or when this share of the last `window` calls failed.
    pub error_rate: f64,
    pub window: usize,
    /// How long it stays open before one probe is let through.
    pub open_for: Duration,
}

#[derive(Debug, Clone)]
pub struct PolicyConfig {
    pub policy: Policy,
    pub default_budget: Duration,
    pub max_budget: Duration,
    pub monitor_interval: Duration,
    pub models: BTreeMap<String, RawModelPolicy>,
    pub audit_max_per_s: f64,
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

    /// The share of `model`'s local answers audited (0: none).
    pub fn audit_rate(&self, model: &str) -> f64 {
        self.models
            .get(model)
            .and_then(|m| m.audit_rate)
            .unwrap_or(0.0)
    }
}

impl RawPolicy {
    pub(super) fn validate(&self, queue: usize, errors: &mut Vec<String>) -> PolicyConfig {
        let p = self;
        if p.default_budget_ms == 0 {
            errors.push("policy.default_budget_ms must be positive".into());
        }
        if p.max_budget_ms == 0 || p.max_budget_ms > 86_400_000 {
            errors.push(format!(
                "policy.max_budget_ms is {}; use 1 to 86400000 (a day)",
                p.max_budget_ms
            ));
        } else if p.default_budget_ms > p.max_budget_ms {
            errors.push(format!(
                "policy.default_budget_ms ({}) is over policy.max_budget_ms ({})",
                p.default_budget_ms, p.max_budget_ms
            ));
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
        if !(p.audit_max_per_s.is_finite() && (0.0..=1000.0).contains(&p.audit_max_per_s)) {
            errors.push(format!(
                "policy.audit_max_per_s is {}; use 0 to 1000 audits a second",
                p.audit_max_per_s
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
            if let Some(r) = m.audit_rate
                && !(0.0..=1.0).contains(&r)
            {
                errors.push(format!(
                    "policy.models.{name}.audit_rate is {r}; use a share of answers from 0 to 1"
                ));
            }
            if let Some(b) = m.budget_ms
                && (b == 0 || b > p.max_budget_ms)
            {
                errors.push(format!(
                    "policy.models.{name}.budget_ms is {b}; use 1 to policy.max_budget_ms ({})",
                    p.max_budget_ms
                ));
            }
        }
        PolicyConfig {
            policy: Policy {
                mode: p.mode,
                limits: Limits {
                    cpu_percent: p.cpu_limit_percent,
                    temperature_c: p.temperature_limit_c,
                    queue: p.queue_limit.unwrap_or((queue / 2).max(1)),
                },
                headroom: p.headroom,
            },
            default_budget: Duration::from_millis(p.default_budget_ms),
            max_budget: Duration::from_millis(p.max_budget_ms),
            monitor_interval: Duration::from_millis(p.monitor_interval_ms),
            models: p.models.clone(),
            audit_max_per_s: p.audit_max_per_s,
        }
    }
}
