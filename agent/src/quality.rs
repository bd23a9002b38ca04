//! Knowing whether a model answers well without labels. Two kinds of evidence, both gathered
//! after the reply has gone, so neither delays it:
//!
//! - **Audited samples**: a random share of local answers (`[policy.models.NAME] audit_rate`)
//!   is also asked of the relay's bigger model; the pair is recorded, and agreement with the
//!   cloud is tallied per model version.
//! - **Shadow runs**: a candidate version named by the fleet runs on a share of requests; its
//!   answer is compared with the serving model's and, on audited samples, with the cloud's.
//!
//! What to audit or shadow is decided here, purely ([`choose`]), table-tested: nothing runs
//! while the device is over its CPU, temperature or queue limits or throttled, audits need the
//! relay's circuit closed, are rate-limited ([`TokenBucket`]) and bounded in flight.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde::Serialize;

use crate::policy::{Policy, Relay, Signals};
use crate::rollout::RolloutView;

/// Audits waiting for the relay at once; more are skipped (`busy`).
pub const MAX_AUDITS_IN_FLIGHT: usize = 8;

/// The shares configured for one request's model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rates {
    /// `audit_rate`: the share of local answers audited.
    pub audit: f64,
    /// The shadow's `share` (0 without a shadow).
    pub shadow: f64,
}

/// The device as the choice sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Conditions {
    /// Over a CPU, temperature or queue limit, or throttled ([`over_limits`]).
    pub over_limits: bool,
    /// The relay's circuit is closed (or half-open).
    pub relay_up: bool,
    pub audits_in_flight: usize,
    /// Requests wait for the front stage or a worker, or every worker is running one: a shadow
    /// run takes only idle time, so none runs then.
    pub busy: bool,
}

/// Why a chosen audit or shadow run did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Skip {
    OverLimits,
    RelayDown,
    RateLimited,
    Busy,
}

impl Skip {
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::OverLimits => "over_limits",
            Skip::RelayDown => "relay_down",
            Skip::RateLimited => "rate_limited",
            Skip::Busy => "busy",
        }
    }
}

/// What to do with one local answer, after its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Choice {
    pub audit: bool,
    pub shadow: bool,
    pub skipped: Option<Skip>,
}

/// The device is over one of the limits that force offloading (the policy's own): CPU,
/// temperature, throttling, or the local queue.
pub fn over_limits(policy: &Policy, s: &Signals) -> bool {
    s.throttled
        || s.temperature_c
            .is_some_and(|t| t >= policy.limits.temperature_c)
        || s.cpu_percent
            .is_some_and(|c| c >= policy.limits.cpu_percent)
        || s.queue_depth >= policy.limits.queue
        || s.queue_bytes_full
}

pub fn relay_up(relay: Relay) -> bool {
    matches!(relay, Relay::Up { .. })
}

/// Decides, from two uniform draws in [0, 1), whether a local answer is audited and whether
/// the shadow runs on it. An audited answer is also shadowed when a shadow is configured, so
/// the candidate and the serving model are judged on the same samples. A shadow run waits for
/// idle time: none while requests wait for a worker (`busy`). Takes a token from `bucket` only
/// for an audit that will run.
pub fn choose(
    rates: Rates,
    c: Conditions,
    draws: (f64, f64),
    bucket: &mut TokenBucket,
    now: Instant,
) -> Choice {
    let want_audit = draws.0 < rates.audit;
    let want_shadow = draws.1 < rates.shadow;
    if !want_audit && !want_shadow {
        return Choice::default();
    }
    if c.over_limits {
        return Choice {
            skipped: Some(Skip::OverLimits),
            ..Choice::default()
        };
    }
    let (audit, skipped) = if !want_audit {
        (false, None)
    } else if !c.relay_up {
        (false, Some(Skip::RelayDown))
    } else if c.audits_in_flight >= MAX_AUDITS_IN_FLIGHT {
        (false, Some(Skip::Busy))
    } else if !bucket.take(now) {
        (false, Some(Skip::RateLimited))
    } else {
        (true, None)
    };
    let shadow = want_shadow || (audit && rates.shadow > 0.0);
    if shadow && c.busy {
        return Choice {
            audit,
            shadow: false,
            skipped: skipped.or(Some(Skip::Busy)),
        };
    }
    Choice {
        audit,
        shadow,
        skipped,
    }
}

/// At most `per_s` a second on average, `burst` at once. Time is passed in.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    per_s: f64,
    burst: f64,
    tokens: f64,
    last: Option<Instant>,
}

impl TokenBucket {
    pub fn new(per_s: f64, burst: f64) -> TokenBucket {
        let per_s = if per_s.is_finite() {
            per_s.max(0.0)
        } else {
            0.0
        };
        let burst = if burst.is_finite() {
            burst.max(1.0)
        } else {
            1.0
        };
        TokenBucket {
            per_s,
            burst,
            tokens: burst,
            last: None,
        }
    }

    /// Tokens added per second.
    pub fn rate(&self) -> f64 {
        self.per_s
    }

    pub fn take(&mut self, now: Instant) -> bool {
        if let Some(last) = self.last {
            let dt = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + dt * self.per_s).min(self.burst);
        }
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The evidence about one model version on this device, since the database was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    /// Audited samples: answers also asked of the cloud model.
    pub audited: u64,
    /// ...whose top-1 class was the cloud's.
    pub agree_cloud: u64,
    /// Shadow runs compared with the serving model (for a shadowed version).
    pub compared: u64,
    /// ...whose top-1 class was the serving model's.
    pub agree_serving: u64,
}

impl Tally {
    pub fn agreement(&self) -> Option<f64> {
        ratio(self.agree_cloud, self.audited)
    }
}

fn ratio(n: u64, d: u64) -> Option<f64> {
    // Counts far below 2^53: exact as f64.
    (d > 0).then(|| n as f64 / d as f64)
}

/// What happened to the audits and shadow runs chosen, since start.
#[derive(Debug, Default)]
pub struct Counters {
    pub skipped_over_limits: AtomicU64,
    pub skipped_relay_down: AtomicU64,
    pub skipped_rate_limited: AtomicU64,
    pub skipped_busy: AtomicU64,
    /// The observer's queue was full: dropped.
    pub dropped: AtomicU64,
    pub audits_failed: AtomicU64,
    pub shadow_failed: AtomicU64,
    pub shadow_runs: AtomicU64,
    pub audits: AtomicU64,
    pub panics: AtomicU64,
}

impl Counters {
    pub fn skipped(&self, s: Skip) {
        let c = match s {
            Skip::OverLimits => &self.skipped_over_limits,
            Skip::RelayDown => &self.skipped_relay_down,
            Skip::RateLimited => &self.skipped_rate_limited,
            Skip::Busy => &self.skipped_busy,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn to_json(&self) -> serde_json::Value {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "audits": r(&self.audits),
            "shadow_runs": r(&self.shadow_runs),
            "skipped": {
                "over_limits": r(&self.skipped_over_limits),
                "relay_down": r(&self.skipped_relay_down),
                "rate_limited": r(&self.skipped_rate_limited),
                "busy": r(&self.skipped_busy),
                "queue_full": r(&self.dropped),
            },
            "failed": {"audits": r(&self.audits_failed), "shadow_runs": r(&self.shadow_failed)},
            "panics": r(&self.panics),
        })
    }
}

/// Tallies per (model, version), shared by the observer and the telemetry.
#[derive(Debug, Default)]
pub struct Quality {
    tallies: Mutex<BTreeMap<(String, String), Tally>>,
    pub counters: Counters,
}

impl Quality {
    fn with(&self, model: &str, version: &str, f: impl FnOnce(&mut Tally)) {
        let mut t = self.tallies.lock().unwrap_or_else(|p| p.into_inner());
        f(t.entry((model.to_owned(), version.to_owned())).or_default());
    }

    /// Seeds the tallies with what the database recorded before this start.
    pub fn seed(&self, rows: impl IntoIterator<Item = (String, String, u64, u64)>) {
        for (model, version, audited, agree) in rows {
            self.with(&model, &version, |t| {
                t.audited = t.audited.saturating_add(audited);
                t.agree_cloud = t.agree_cloud.saturating_add(agree);
            });
        }
    }

    pub fn audited(&self, model: &str, version: &str, agree: bool) {
        self.with(model, version, |t| {
            t.audited += 1;
            t.agree_cloud += u64::from(agree);
        });
    }

    pub fn compared(&self, model: &str, version: &str, agree: bool) {
        self.with(model, version, |t| {
            t.compared += 1;
            t.agree_serving += u64::from(agree);
        });
    }

    pub fn snapshot(&self) -> BTreeMap<(String, String), Tally> {
        self.tallies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// A classifier's top-1 answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Top1 {
    pub label: String,
    pub probability: f64,
}

/// The top-1 answer of a V2 response: from `parameters.classes` when the agent made it, else
/// the highest of the first output's first row (the relay's answers), named by `labels`.
pub fn top1_of(response: &models::v2::InferenceResponse, labels: &[String]) -> Option<Top1> {
    use models::v2::ResponseData;
    use serde_json::Value;
    if let Some(top) = response
        .parameters
        .as_ref()
        .and_then(|p| p.get("classes"))
        .and_then(|c| c.get(0))
        .and_then(|row| row.get(0))
    {
        return Some(Top1 {
            label: top.get("label")?.as_str()?.to_owned(),
            probability: top.get("probability")?.as_f64()?,
        });
    }
    if labels.is_empty() {
        return None;
    }
    let out = response.outputs.first()?;
    let row: Vec<f64> = match &out.data {
        ResponseData::Typed(models::TensorData::F32(v)) => {
            v.iter().take(labels.len()).map(|x| f64::from(*x)).collect()
        }
        ResponseData::Json(v) => {
            let mut flat = Vec::with_capacity(labels.len());
            let mut stack = vec![v];
            // Depth-first, in order: nested rows flatten row by row.
            while let Some(x) = stack.pop() {
                if flat.len() == labels.len() {
                    break;
                }
                match x {
                    Value::Array(items) => stack.extend(items.iter().rev()),
                    Value::Number(n) => flat.push(n.as_f64()?),
                    _ => return None,
                }
            }
            flat
        }
        ResponseData::Typed(_) => return None,
    };
    if row.len() != labels.len() {
        return None;
    }
    let (i, p) = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1))?;
    Some(Top1 {
        label: labels.get(i)?.clone(),
        probability: *p,
    })
}

/// What one quality report is made of.
#[derive(Debug)]
pub struct ReportInputs<'a> {
    pub device_id: &'a str,
    pub ts_ms: i64,
    pub config_version: Option<&'a str>,
    /// (model, serving version, audit rate).
    pub serving: Vec<(String, String, f64)>,
    /// (model, shadow version, share).
    pub shadows: Vec<(String, String, f64)>,
    pub rollouts: &'a [RolloutView],
    pub tallies: &'a BTreeMap<(String, String), Tally>,
    pub counters: &'a Counters,
}

/// The device's quality report, published retained on `{prefix}/{device_id}/quality`: per
/// model, what serves and what shadows, and per version the audited samples and agreements;
/// the rollouts this device takes part in; what was skipped and why.
pub fn report(i: &ReportInputs<'_>) -> serde_json::Value {
    use serde_json::{Map, Value, json};
    let mut models: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    for (model, version, rate) in &i.serving {
        let m = models.entry(model.clone()).or_default();
        m.insert("serving".into(), json!(version));
        m.insert("audit_rate".into(), json!(rate));
    }
    for (model, version, share) in &i.shadows {
        models
            .entry(model.clone())
            .or_default()
            .insert("shadow".into(), json!({"version": version, "share": share}));
    }
    for ((model, version), t) in i.tallies {
        let m = models.entry(model.clone()).or_default();
        let versions = m
            .entry("versions")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(v) = versions {
            v.insert(
                version.clone(),
                json!({
                    "audited": t.audited,
                    "agree_cloud": t.agree_cloud,
                    "agreement": t.agreement(),
                    "compared": t.compared,
                    "agree_serving": t.agree_serving,
                }),
            );
        }
    }
    json!({
        "device_id": i.device_id,
        "ts_ms": i.ts_ms,
        "config_version": i.config_version,
        "models": models,
        "rollouts": i.rollouts,
        "counters": i.counters.to_json(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::Duration;

    #[test]
    fn what_is_audited_and_shadowed() {
        let ok = Conditions {
            over_limits: false,
            relay_up: true,
            audits_in_flight: 0,
            busy: false,
        };
        let queued = Conditions { busy: true, ..ok };
        let over = Conditions {
            over_limits: true,
            ..ok
        };
        let down = Conditions {
            relay_up: false,
            ..ok
        };
        let busy = Conditions {
            audits_in_flight: MAX_AUDITS_IN_FLIGHT,
            ..ok
        };
        let both = Rates {
            audit: 0.05,
            shadow: 0.5,
        };
        let audit_only = Rates {
            audit: 0.05,
            shadow: 0.0,
        };
        let c = |audit, shadow, skipped| Choice {
            audit,
            shadow,
            skipped,
        };
        // (rates, conditions, draws, expected)
        let cases = [
            (both, ok, (0.9, 0.9), c(false, false, None)),
            (both, ok, (0.01, 0.9), c(true, true, None)),
            (both, ok, (0.9, 0.1), c(false, true, None)),
            (audit_only, ok, (0.01, 0.0), c(true, false, None)),
            (audit_only, ok, (0.9, 0.0), c(false, false, None)),
            (
                both,
                over,
                (0.01, 0.1),
                c(false, false, Some(Skip::OverLimits)),
            ),
            (
                both,
                over,
                (0.9, 0.1),
                c(false, false, Some(Skip::OverLimits)),
            ),
            (
                both,
                down,
                (0.01, 0.9),
                c(false, false, Some(Skip::RelayDown)),
            ),
            (
                both,
                down,
                (0.01, 0.1),
                c(false, true, Some(Skip::RelayDown)),
            ),
            (both, busy, (0.01, 0.9), c(false, false, Some(Skip::Busy))),
            // Requests waiting: audits go on, shadow runs wait for idle time.
            (both, queued, (0.01, 0.9), c(true, false, Some(Skip::Busy))),
            (both, queued, (0.9, 0.1), c(false, false, Some(Skip::Busy))),
            (audit_only, queued, (0.01, 0.0), c(true, false, None)),
            (
                Rates {
                    audit: 0.0,
                    shadow: 0.0,
                },
                ok,
                (0.0, 0.0),
                c(false, false, None),
            ),
            (
                Rates {
                    audit: 1.0,
                    shadow: 1.0,
                },
                ok,
                (0.999, 0.999),
                c(true, true, None),
            ),
        ];
        let now = Instant::now();
        for (rates, cond, draws, want) in cases {
            let mut bucket = TokenBucket::new(10.0, 10.0);
            assert_eq!(
                choose(rates, cond, draws, &mut bucket, now),
                want,
                "{rates:?} {cond:?} {draws:?}"
            );
        }
    }

    #[test]
    fn audits_are_rate_limited_and_shadows_are_not() {
        let now = Instant::now();
        let mut bucket = TokenBucket::new(2.0, 2.0);
        let cond = Conditions {
            over_limits: false,
            relay_up: true,
            audits_in_flight: 0,
            busy: false,
        };
        let rates = Rates {
            audit: 1.0,
            shadow: 1.0,
        };
        let picks: Vec<Choice> = (0..4)
            .map(|_| choose(rates, cond, (0.0, 0.0), &mut bucket, now))
            .collect();
        assert_eq!(picks.iter().filter(|c| c.audit).count(), 2, "the burst");
        assert!(picks.iter().all(|c| c.shadow));
        assert_eq!(picks[3].skipped, Some(Skip::RateLimited));
        // Half a second later: one more token at 2 a second.
        let later = now + Duration::from_millis(500);
        assert!(choose(rates, cond, (0.0, 0.0), &mut bucket, later).audit);
        assert!(!choose(rates, cond, (0.0, 0.0), &mut bucket, later).audit);
        // A clock that goes back never adds tokens, and hostile rates make a closed bucket.
        assert!(!bucket.take(now));
        let mut never = TokenBucket::new(f64::NAN, f64::INFINITY);
        assert!(never.take(now));
        assert!(!never.take(now + Duration::from_secs(3600)));
    }

    #[test]
    fn over_limits_follows_the_policy_limits() {
        let policy = Policy {
            mode: crate::config::Mode::LocalFirst,
            limits: crate::policy::Limits {
                cpu_percent: 80.0,
                temperature_c: 70.0,
                queue: 4,
            },
            headroom: 0.75,
        };
        let calm = Signals {
            local_p50_ms: Some(1.0),
            local_p95_ms: Some(1.0),
            queue_depth: 0,
            queue_capacity: 16,
            queue_bytes_full: false,
            workers: 1,
            cpu_percent: Some(10.0),
            temperature_c: Some(40.0),
            throttled: false,
            relay: Relay::Up { rtt_ms: None },
        };
        let cases = [
            (calm, false),
            (
                Signals {
                    cpu_percent: Some(80.0),
                    ..calm
                },
                true,
            ),
            (
                Signals {
                    cpu_percent: None,
                    temperature_c: None,
                    ..calm
                },
                false,
            ),
            (
                Signals {
                    temperature_c: Some(71.0),
                    ..calm
                },
                true,
            ),
            (
                Signals {
                    throttled: true,
                    ..calm
                },
                true,
            ),
            (
                Signals {
                    queue_depth: 4,
                    ..calm
                },
                true,
            ),
            (
                Signals {
                    queue_bytes_full: true,
                    ..calm
                },
                true,
            ),
        ];
        for (s, want) in cases {
            assert_eq!(over_limits(&policy, &s), want, "{s:?}");
        }
    }

    #[test]
    fn top1_from_classes_typed_and_json_outputs() {
        use models::v2::{InferenceResponse, ResponseData, ResponseOutput};
        let labels: Vec<String> = ["a", "b", "c"].iter().map(|s| (*s).to_owned()).collect();
        let resp = |data: ResponseData, params: Option<serde_json::Value>| InferenceResponse {
            model_name: "m".into(),
            model_version: None,
            id: None,
            parameters: params.and_then(|p| p.as_object().cloned()),
            outputs: vec![ResponseOutput {
                name: "p".into(),
                shape: vec![1, 3],
                datatype: "FP32".into(),
                parameters: None,
                data,
            }],
        };
        let typed = resp(
            ResponseData::Typed(models::TensorData::F32(vec![0.1, 0.7, 0.2])),
            None,
        );
        assert_eq!(top1_of(&typed, &labels).unwrap().label, "b");
        let nested = resp(
            ResponseData::Json(serde_json::json!([[0.1, 0.2, 0.7]])),
            None,
        );
        assert_eq!(top1_of(&nested, &labels).unwrap().label, "c");
        let classes = resp(
            ResponseData::Json(serde_json::Value::Null),
            Some(serde_json::json!({"classes": [[{"label": "a", "probability": 0.9}]]})),
        );
        let t = top1_of(&classes, &labels).unwrap();
        assert_eq!((t.label.as_str(), t.probability), ("a", 0.9));
        // Hostile or mismatched outputs name no class.
        for bad in [
            serde_json::json!([0.1, 0.2]),
            serde_json::json!(["x", 1, 2]),
            serde_json::json!(null),
            serde_json::json!({"a": 1}),
        ] {
            assert_eq!(
                top1_of(&resp(ResponseData::Json(bad.clone()), None), &labels),
                None,
                "{bad}"
            );
        }
        assert_eq!(top1_of(&typed, &[]), None);
    }

    #[test]
    fn tallies_add_up_per_version() {
        let q = Quality::default();
        q.seed([("digits".to_owned(), "1".to_owned(), 10, 9)]);
        q.audited("digits", "1", true);
        q.audited("digits", "1", false);
        q.compared("digits", "2", true);
        let s = q.snapshot();
        let v1 = s[&("digits".to_owned(), "1".to_owned())];
        assert_eq!((v1.audited, v1.agree_cloud), (12, 10));
        assert_eq!(v1.agreement(), Some(10.0 / 12.0));
        let v2 = s[&("digits".to_owned(), "2".to_owned())];
        assert_eq!((v2.compared, v2.agree_serving, v2.audited), (1, 1, 0));
        assert_eq!(v2.agreement(), None);
    }

    #[test]
    fn the_report_names_serving_shadow_versions_and_rollouts() {
        let q = Quality::default();
        q.audited("digits", "1.0.0", true);
        q.audited("digits", "1.2.0", false);
        q.compared("digits", "1.2.0", true);
        q.counters.skipped(Skip::RateLimited);
        let tallies = q.snapshot();
        let rollouts = vec![RolloutView {
            id: "digits-1.2.0".into(),
            group: "lab".into(),
            version: 2,
            model: "digits".into(),
            candidate_version: "1.2.0".into(),
            state: crate::rollout::RolloutState::Running,
            in_cohort: true,
            role: "shadow",
        }];
        let r = report(&ReportInputs {
            device_id: "pi-7",
            ts_ms: 5,
            config_version: Some("rollout/lab@2"),
            serving: vec![
                ("digits".into(), "1.0.0".into(), 0.05),
                ("vad".into(), "6".into(), 0.0),
            ],
            shadows: vec![("digits".into(), "1.2.0".into(), 0.5)],
            rollouts: &rollouts,
            tallies: &tallies,
            counters: &q.counters,
        });
        let d = &r["models"]["digits"];
        assert_eq!(d["serving"], "1.0.0");
        assert_eq!(d["audit_rate"], 0.05);
        assert_eq!(d["shadow"]["version"], "1.2.0");
        assert_eq!(d["versions"]["1.0.0"]["agreement"], 1.0);
        assert_eq!(d["versions"]["1.2.0"]["agreement"], 0.0);
        assert_eq!(d["versions"]["1.2.0"]["agree_serving"], 1);
        assert!(r["models"]["vad"]["versions"].is_null());
        assert_eq!(r["rollouts"][0]["role"], "shadow");
        assert_eq!(r["rollouts"][0]["state"], "running");
        assert_eq!(r["counters"]["skipped"]["rate_limited"], 1);
    }
}
