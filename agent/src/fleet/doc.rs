//! Fleet documents: what one says, how a device's group documents and its own combine, and
//! what may change while the agent runs. Pure: no IO, every rule unit-tested.
//!
//! A document is a JSON object:
//!
//! ```json
//! {
//!   "target": "group/lab",      (or "device/pi-7": where it was signed for)
//!   "version": 7,
//!   "rollback": false,          (true, with "rollback_from": N, to go back to this version)
//!   "policy": {"mode": "local-first", "models": {"digits": {"budget_ms": 80}}},
//!   "store": {"cache": {"ttl_secs": 600}, "outbox": {"max_rows": 50000}},
//!   "models": {"digits": {"version": "2", "sha256": "…", "url": "https://…"}, "vad": null},
//!   "telemetry": {"interval_secs": 30},
//!   "log_level": "info,agent=debug"
//! }
//! ```
//!
//! `target` binds the signature to one topic: a document arriving on another topic than the one
//! it names is refused (`wrong_target`), so a group's document cannot be replayed as a device's
//! or another group's. `policy` and `store` use agent.toml's names and rules and are merged over it (JSON merge
//! patch: a `null` restores the local value); groups apply in the order agent.toml lists them,
//! then the device's own document. Under `models` each entry replaces the earlier one whole;
//! `null` removes the model.
//!
//! A model entry may also name a candidate to run in the shadow of the serving model, after the
//! reply, on a share of requests: `"digits": {"version": "1", …, "shadow": {"version": "2",
//! "sha256": "…", "url": "…", "bytes": 7664, "share": 0.5}}` (an entry with only `shadow` keeps
//! the serving model in force). Rollout documents (`rollout/GROUP`, see [`crate::rollout`])
//! apply after the groups' documents and before the device's own.

use std::collections::BTreeMap;
use std::time::Duration;

use models::manifest::{Manifest, ModelSpec};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::Rejection;
use crate::config::{Config, RawConfig, is_plain_name};
use crate::rollout::{Effect, Rollout, RolloutView};

/// Where a document comes from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    /// `{prefix}/fleet/{group}/config`.
    Group(String),
    /// `{prefix}/fleet/{group}/rollout`: a rollout for the group's devices.
    Rollout(String),
    /// `{prefix}/{device_id}/config`: overrides the groups.
    Device,
}

impl Source {
    /// What a document for this source names as its `target`: `group/lab` or `device/pi-7`.
    pub fn target(&self, device_id: &str) -> String {
        match self {
            Source::Group(g) => format!("group/{g}"),
            Source::Rollout(g) => format!("rollout/{g}"),
            Source::Device => format!("device/{device_id}"),
        }
    }

    /// How the source is named in statuses and the database: `group/lab` or `device`.
    pub fn label(&self) -> String {
        match self {
            Source::Group(g) => format!("group/{g}"),
            Source::Rollout(g) => format!("rollout/{g}"),
            Source::Device => "device".to_owned(),
        }
    }

    pub fn from_label(label: &str) -> Option<Source> {
        match label {
            "device" => Some(Source::Device),
            _ => label
                .strip_prefix("group/")
                .map(|g| Source::Group(g.to_owned()))
                .or_else(|| {
                    label
                        .strip_prefix("rollout/")
                        .map(|g| Source::Rollout(g.to_owned()))
                }),
        }
    }
}

/// The topics a device listens to for documents.
#[derive(Debug, Clone)]
pub struct DocTopics {
    prefix: String,
    device_id: String,
    groups: Vec<String>,
}

impl DocTopics {
    pub fn new(prefix: &str, device_id: &str, groups: &[String]) -> DocTopics {
        DocTopics {
            prefix: prefix.to_owned(),
            device_id: device_id.to_owned(),
            groups: groups.to_vec(),
        }
    }

    pub fn group(prefix: &str, group: &str) -> String {
        format!("{prefix}/fleet/{group}/config")
    }

    pub fn rollout(prefix: &str, group: &str) -> String {
        format!("{prefix}/fleet/{group}/rollout")
    }

    pub fn device(prefix: &str, device_id: &str) -> String {
        format!("{prefix}/{device_id}/config")
    }

    pub fn status(prefix: &str, device_id: &str) -> String {
        format!("{prefix}/{device_id}/config/status")
    }

    /// Every topic to subscribe to.
    pub fn filters(&self) -> Vec<String> {
        let mut f: Vec<String> = self
            .groups
            .iter()
            .map(|g| Self::group(&self.prefix, g))
            .collect();
        f.extend(self.groups.iter().map(|g| Self::rollout(&self.prefix, g)));
        f.push(Self::device(&self.prefix, &self.device_id));
        f
    }

    pub fn groups(&self) -> &[String] {
        &self.groups
    }

    pub fn source_of(&self, topic: &str) -> Option<Source> {
        if topic == Self::device(&self.prefix, &self.device_id) {
            return Some(Source::Device);
        }
        self.groups.iter().find_map(|g| {
            if topic == Self::group(&self.prefix, g) {
                Some(Source::Group(g.clone()))
            } else if topic == Self::rollout(&self.prefix, g) {
                Some(Source::Rollout(g.clone()))
            } else {
                None
            }
        })
    }

    /// The order documents apply in: groups as configured, then their rollouts, then the
    /// device.
    pub fn rank(&self, source: &Source) -> usize {
        let n = self.groups.len();
        let at = |g: &String| self.groups.iter().position(|x| x == g).unwrap_or(0);
        match source {
            Source::Group(g) => at(g),
            Source::Rollout(g) => n + at(g),
            Source::Device => 2 * n,
        }
    }
}

/// One verified document.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// Where it was signed for: `group/NAME`, `rollout/GROUP` or `device/ID`.
    pub target: String,
    pub version: u64,
    /// An explicit, signed return to an older version: allowed at or below the version taken,
    /// but only in place of the version it names in `rollback_from` (so it cannot be replayed
    /// once a newer version was taken).
    pub rollback: bool,
    pub rollback_from: Option<u64>,
    /// Everything else.
    pub body: Map<String, Value>,
}

/// Keys a document may carry besides `version` and `rollback`.
const KEYS: &[&str] = &["policy", "store", "models", "telemetry", "log_level"];
/// What a rollout document (`rollout/GROUP`) carries instead.
const ROLLOUT_KEYS: &[&str] = &["rollout"];

impl Document {
    pub fn parse(payload: &str) -> Result<Document, Rejection> {
        let bad = |m: String| Rejection::BadDocument(m);
        let value: Value = serde_json::from_str(payload)
            .map_err(|e| bad(format!("the signed payload is not JSON: {e}")))?;
        let Value::Object(mut body) = value else {
            return Err(bad("the signed payload must be a JSON object".into()));
        };
        let target = match body.remove("target") {
            Some(Value::String(t))
                if t.strip_prefix("group/")
                    .or_else(|| t.strip_prefix("rollout/"))
                    .or_else(|| t.strip_prefix("device/"))
                    .is_some_and(|rest| !rest.is_empty() && !rest.contains(['/', '+', '#'])) =>
            {
                t
            }
            _ => {
                return Err(bad(
                    "the document needs a `target`: \"group/NAME\", \"rollout/GROUP\" or \"device/ID\", the topic it was signed for (`tether fleet sign` fills it in)".into(),
                ));
            }
        };
        let version = match body.remove("version") {
            Some(Value::Number(n)) => n.as_u64().filter(|v| *v > 0),
            _ => None,
        }
        .ok_or_else(|| bad("the document needs a `version`: a whole number above 0".into()))?;
        let rollback = match body.remove("rollback") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => b,
            Some(_) => return Err(bad("`rollback` must be true or false".into())),
        };
        let rollback_from = match body.remove("rollback_from") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) if n.as_u64().is_some() => n.as_u64(),
            Some(_) => return Err(bad("`rollback_from` must be a version number".into())),
        };
        match (rollback, rollback_from) {
            (true, None) => {
                return Err(bad(
                    "a rollback must name the version it replaces: \"rollback_from\": N".into(),
                ));
            }
            (false, Some(_)) => {
                return Err(bad(
                    "`rollback_from` is only for rollbacks: add \"rollback\": true".into(),
                ));
            }
            _ => {}
        }
        let is_rollout = target.starts_with("rollout/");
        let keys = if is_rollout { ROLLOUT_KEYS } else { KEYS };
        if let Some(k) = body.keys().find(|k| !keys.contains(&k.as_str())) {
            return Err(Rejection::Invalid(if is_rollout || k == "rollout" {
                format!(
                    "`{k}` does not belong in this document: a rollout document (target rollout/GROUP) carries only `rollout`, and only it may"
                )
            } else {
                format!(
                    "`{k}` cannot be set by the fleet; a document may set {}",
                    KEYS.join(", ")
                )
            }));
        }
        if is_rollout {
            match body.get("rollout") {
                Some(r) => {
                    Rollout::parse(r).map_err(Rejection::Invalid)?;
                }
                None => {
                    return Err(Rejection::Invalid(
                        "a rollout document needs a `rollout` section".into(),
                    ));
                }
            }
        }
        Ok(Document {
            target,
            version,
            rollback,
            rollback_from,
            body,
        })
    }
}

/// A model the fleet wants on the device.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelUpdate {
    pub version: String,
    /// Of the file; checked after the download and before anything switches.
    pub sha256: String,
    /// `http(s)://…`: the relay's `/v2/models/{name}/versions/{v}/artifact` or any server.
    pub url: String,
    /// The file's size: checked against the free disk space before downloading, and no more
    /// than this is ever written.
    pub bytes: u64,
    /// The manifest entry (interface, labels) of a model the zoo does not have.
    #[serde(default)]
    pub spec: Option<ModelSpec>,
}

/// A candidate run in the shadow of the serving model: after the reply, on `share` of the
/// local requests, its answer compared with the serving model's (and the cloud's, when the
/// request is audited). Written as a model entry with `share`; downloaded and verified like
/// any model.
#[derive(Debug, Clone)]
pub struct ShadowUpdate {
    pub model: ModelUpdate,
    /// The share of local requests it runs on, above 0 and at most 1.
    pub share: f64,
}

/// Everything the documents in force ask for, validated.
#[derive(Debug, Clone)]
pub struct Desired {
    /// agent.toml with the documents' `policy` and `store` merged in, validated.
    pub config: Config,
    /// Per model: `Some` to install that file, `None` to remove the model.
    pub models: BTreeMap<String, Option<ModelUpdate>>,
    /// Per model: a candidate to run in the serving model's shadow.
    pub shadows: BTreeMap<String, ShadowUpdate>,
    /// The rollouts in force and what each does on this device.
    pub rollouts: Vec<RolloutView>,
    /// `None`: agent.toml's `fleet.telemetry_interval_secs`.
    pub telemetry_interval: Option<Duration>,
    /// `None`: the log filter the agent started with.
    pub log_level: Option<String>,
}

/// Merges `docs` (in application order) over the local configuration and checks the result.
pub fn desired(
    base: &RawConfig,
    device_id: &str,
    docs: &[&Document],
    zoo: &Manifest,
) -> Result<Desired, Rejection> {
    let mut merged = Map::new();
    let mut model_entries: BTreeMap<String, Value> = BTreeMap::new();
    let mut rollouts = Vec::new();
    for doc in docs {
        for (k, v) in &doc.body {
            if k == "rollout" {
                let r = Rollout::parse(v).map_err(Rejection::Invalid)?;
                let effect = r.effect(device_id, &base.fleet.groups);
                if let Some(entry) = r.apply(&effect, model_entries.get(&r.model)) {
                    model_entries.insert(r.model.clone(), entry);
                }
                rollouts.push(RolloutView {
                    id: r.id.clone(),
                    group: doc
                        .target
                        .strip_prefix("rollout/")
                        .unwrap_or(&doc.target)
                        .to_owned(),
                    version: doc.version,
                    model: r.model.clone(),
                    candidate_version: r.candidate_version(),
                    state: r.state,
                    in_cohort: r.in_cohort(device_id, &base.fleet.groups),
                    role: match effect {
                        Effect::None => "none",
                        Effect::Shadow { .. } => "shadow",
                        Effect::Serve => "serve",
                    },
                });
            } else if k == "models" {
                let Value::Object(entries) = v else {
                    return Err(invalid("`models` must be an object of model name to entry"));
                };
                for (name, entry) in entries {
                    if !is_plain_name(name) {
                        return Err(invalid(&format!(
                            "`models` names `{}`, which is not a model name: use letters, digits, `.`, `_` and `-`",
                            name.escape_debug()
                        )));
                    }
                    model_entries.insert(name.clone(), entry.clone());
                }
            } else {
                let slot = merged.entry(k.clone()).or_insert(Value::Null);
                merge_patch(slot, v);
            }
        }
    }
    let mut errors = Vec::new();

    // policy and store: agent.toml's own rules.
    if let Some(Value::Object(p)) = merged.get("policy")
        && p.contains_key("monitor_interval_ms")
    {
        errors.push("policy.monitor_interval_ms cannot change while the agent runs".to_owned());
    }
    if let Some(Value::Object(s)) = merged.get("store")
        && let Some(k) = s.keys().find(|k| !matches!(k.as_str(), "cache" | "outbox"))
    {
        errors.push(format!(
            "store.{k} cannot be set by the fleet; only store.cache and store.outbox can"
        ));
    }
    let mut raw = serde_json::to_value(base).map_err(|e| invalid(&e.to_string()))?;
    for key in ["policy", "store"] {
        if let Some(v) = merged.get(key)
            && let Some(slot) = raw.get_mut(key)
        {
            merge_patch(slot, v);
        }
    }
    let config = match serde_json::from_value::<RawConfig>(raw) {
        Ok(raw) => match raw.validate(|| Some(device_id.to_owned())) {
            Ok(c) => Some(c),
            Err(e) => {
                errors.extend(e.0);
                None
            }
        },
        Err(e) => {
            errors.push(format!("{e}"));
            None
        }
    };

    let telemetry_interval = match merged.get("telemetry") {
        None | Some(Value::Null) => None,
        Some(Value::Object(t)) => match t.get("interval_secs").and_then(Value::as_u64) {
            Some(s) if s <= 86_400 => Some(Duration::from_secs(s)),
            _ => {
                errors.push(
                    "telemetry.interval_secs must be a whole number of seconds from 0 (off) to 86400"
                        .into(),
                );
                None
            }
        },
        Some(_) => {
            errors.push("`telemetry` must be an object: {\"interval_secs\": 30}".into());
            None
        }
    };
    let log_level = match merged.get("log_level") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => {
            if tracing_subscriber::EnvFilter::try_new(s).is_err() {
                errors.push(format!(
                    "log_level `{s}` is not a log filter; write for example `info` or `info,agent=debug`"
                ));
            }
            Some(s.clone())
        }
        Some(_) => {
            errors.push("log_level must be a string such as `info`".into());
            None
        }
    };

    let mut models = BTreeMap::new();
    let mut shadows = BTreeMap::new();
    for (name, mut entry) in model_entries {
        if entry.is_null() {
            models.insert(name, None);
            continue;
        }
        if let Value::Object(m) = &mut entry
            && let Some(shadow) = m.remove("shadow")
        {
            let field = format!("models.{name}.shadow");
            let mut shadow = shadow;
            let share = shadow
                .as_object_mut()
                .and_then(|o| o.remove("share"))
                .and_then(|v| v.as_f64())
                .filter(|s| *s > 0.0 && *s <= 1.0);
            match (serde_json::from_value::<ModelUpdate>(shadow), share) {
                (Ok(model), Some(share)) => {
                    check_update(&name, &field, &model, zoo, base.fleet.allow_http, &mut errors);
                    shadows.insert(name.clone(), ShadowUpdate { model, share });
                }
                (Err(e), _) => errors.push(format!("{field}: {e}")),
                (Ok(_), None) => errors.push(format!(
                    "{field}.share must be the share of requests the shadow runs on, above 0 and at most 1"
                )),
            }
            if m.is_empty() {
                // Only a shadow: the serving model in force stays.
                continue;
            }
        }
        match serde_json::from_value::<ModelUpdate>(entry) {
            Ok(u) => {
                let field = format!("models.{name}");
                check_update(&name, &field, &u, zoo, base.fleet.allow_http, &mut errors);
                models.insert(name, Some(u));
            }
            Err(e) => errors.push(format!("models.{name}: {e}")),
        }
    }
    if !errors.is_empty() {
        return Err(Rejection::Invalid(errors.join("; ")));
    }
    let Some(config) = config else {
        return Err(invalid("the merged configuration is invalid"));
    };
    Ok(Desired {
        config,
        models,
        shadows,
        rollouts,
        telemetry_interval,
        log_level,
    })
}

fn check_update(
    name: &str,
    field: &str,
    u: &ModelUpdate,
    zoo: &Manifest,
    allow_http: bool,
    errors: &mut Vec<String>,
) {
    if u.version.trim().is_empty() {
        errors.push(format!("{field}.version is empty"));
    }
    if u.sha256.len() != 64 || !u.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        errors.push(format!(
            "{field}.sha256 must be the file's sha256 in 64 hex digits"
        ));
    }
    if u.bytes == 0 {
        errors.push(format!("{field}.bytes must be the file's size in bytes"));
    }
    if let Err(e) = check_url(&u.url, allow_http) {
        errors.push(format!("{field}.url: {e}"));
    }
    match &u.spec {
        Some(spec) if spec.name != name => errors.push(format!(
            "{field}.spec names the model `{}`",
            spec.name
        )),
        Some(_) => {}
        None if zoo.model(name).is_err() => errors.push(format!(
            "model `{name}` is not in this device's zoo ({}): give its manifest entry as `spec` to add it",
            zoo.model_names()
        )),
        None => {}
    }
}

/// A model URL the agent may download from: `https://` with a host, or `http://` when allowed.
pub fn check_url(text: &str, allow_http: bool) -> Result<url::Url, String> {
    match url::Url::parse(text) {
        Ok(url) if url.host_str().is_none() => Err(format!("the model URL `{text}` names no host")),
        Ok(url) if url.scheme() == "https" => Ok(url),
        Ok(url) if url.scheme() == "http" && allow_http => Ok(url),
        Ok(url) if url.scheme() == "http" => Err(format!(
            "the model URL `{text}` is plain http: models are downloaded over https unless fleet.allow_http = true"
        )),
        Ok(_) | Err(_) => Err(format!("the model URL `{text}` is not an https URL")),
    }
}

fn invalid(m: &str) -> Rejection {
    Rejection::Invalid(m.to_owned())
}

/// RFC 7396 JSON merge patch: objects merge key by key, `null` deletes, anything else replaces.
/// (Ten lines; not worth a dependency.)
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(t) = target {
        for (k, v) in patch {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use serde_json::json;

    /// A document for group `lab` unless it names its target.
    fn doc(mut v: Value) -> Document {
        if v.get("target").is_none() {
            v["target"] = json!("group/lab");
        }
        Document::parse(&v.to_string()).unwrap()
    }

    fn base() -> RawConfig {
        let mut raw = RawConfig {
            models_dir: Some(models::default_zoo_dir()),
            ..RawConfig::default()
        };
        raw.store.path = Some("/tmp/unused.db".into());
        raw
    }

    fn zoo() -> Manifest {
        Manifest::load(models::default_zoo_dir()).unwrap()
    }

    const SHA: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn merge_patch_follows_rfc_7396() {
        let mut t = json!({"a": {"b": 1, "c": 2}, "d": [1]});
        merge_patch(&mut t, &json!({"a": {"b": null, "e": 3}, "d": [2, 3]}));
        assert_eq!(t, json!({"a": {"c": 2, "e": 3}, "d": [2, 3]}));
    }

    #[test]
    fn parse_needs_a_target_a_version_and_known_keys() {
        assert!(matches!(
            Document::parse(r#"{"target": "group/lab", "policy": {}}"#),
            Err(Rejection::BadDocument(_))
        ));
        assert!(matches!(
            Document::parse(r#"{"target": "group/lab", "version": 0}"#),
            Err(Rejection::BadDocument(_))
        ));
        for target in [
            None,
            Some(json!("lab")),
            Some(json!("group/")),
            Some(json!("device/")),
            Some(json!("group/a/b")),
            Some(json!("group/#")),
            Some(json!("fleet/lab")),
            Some(json!(7)),
        ] {
            let mut v = json!({"version": 3});
            if let Some(t) = &target {
                v["target"] = t.clone();
            }
            let Err(Rejection::BadDocument(m)) = Document::parse(&v.to_string()) else {
                panic!("target {target:?} accepted")
            };
            assert!(m.contains("target"), "{m}");
        }
        assert_eq!(
            doc(json!({"version": 1, "target": "device/pi-7"})).target,
            "device/pi-7"
        );
        assert!(matches!(
            Document::parse("[1]"),
            Err(Rejection::BadDocument(_))
        ));
        let Err(Rejection::Invalid(m)) =
            Document::parse(r#"{"target": "device/x", "version": 2, "mqtt": {}}"#)
        else {
            panic!("mqtt accepted")
        };
        assert!(m.contains("`mqtt`"), "{m}");
        let d =
            doc(json!({"version": 4, "rollback": true, "rollback_from": 6, "log_level": "debug"}));
        assert_eq!((d.version, d.rollback, d.rollback_from), (4, true, Some(6)));
        assert!(matches!(
            Document::parse(r#"{"target": "device/x", "version": 4, "rollback": true}"#),
            Err(Rejection::BadDocument(_))
        ));
        assert!(matches!(
            Document::parse(r#"{"target": "device/x", "version": 4, "rollback_from": 5}"#),
            Err(Rejection::BadDocument(_))
        ));
        assert!(!d.body.contains_key("version"));
    }

    #[test]
    fn the_device_document_overrides_its_groups_and_null_restores_the_local_value() {
        let group = doc(
            json!({"version": 1, "policy": {"default_budget_ms": 300, "mode": "local-only"},
            "store": {"cache": {"ttl_secs": 60}}}),
        );
        let device = doc(json!({"version": 9, "policy": {"default_budget_ms": 120, "mode": null}}));
        let d = desired(&base(), "pi-1", &[&group, &device], &zoo()).unwrap();
        assert_eq!(d.config.policy.default_budget, Duration::from_millis(120));
        // mode: null in the device document restores agent.toml's (local-first).
        assert_eq!(d.config.policy.policy.mode, crate::policy::Mode::LocalFirst);
        assert_eq!(d.config.store.cache.ttl, Duration::from_secs(60));
        // Only the group: its mode stands.
        let d = desired(&base(), "pi-1", &[&group], &zoo()).unwrap();
        assert_eq!(d.config.policy.policy.mode, crate::policy::Mode::LocalOnly);
    }

    #[test]
    fn invalid_values_are_each_named() {
        let bad = doc(json!({"version": 2,
            "policy": {"headroom": 3.0, "monitor_interval_ms": 100},
            "store": {"path": "/elsewhere.db", "outbox": {"max_rows": 0}},
            "telemetry": {"interval_secs": -1},
            "log_level": "=x=",
            "models": {"digits": {"version": "2", "sha256": "nope", "url": "ftp://x/y", "bytes": 0},
                        "brand_new": {"version": "1", "sha256": SHA, "url": "https://relay/x", "bytes": 5},
                        "plain": {"version": "1", "sha256": SHA, "url": "http://relay/x", "bytes": 5}}}));
        let Err(Rejection::Invalid(m)) = desired(&base(), "pi-1", &[&bad], &zoo()) else {
            panic!("accepted")
        };
        for needle in [
            "policy.headroom",
            "monitor_interval_ms",
            "store.path",
            "store.outbox.max_rows",
            "telemetry.interval_secs",
            "log_level",
            "models.digits.sha256",
            "models.digits.url",
            "models.digits.bytes",
            "brand_new",
            "fleet.allow_http",
        ] {
            assert!(m.contains(needle), "`{needle}` missing from: {m}");
        }
    }

    #[test]
    fn model_entries_replace_whole_and_null_removes() {
        let group = doc(json!({"version": 1, "models": {
            "digits": {"version": "2", "sha256": SHA, "url": "https://relay/a", "bytes": 10},
            "vad": null}}));
        let device = doc(json!({"version": 1, "models": {
            "digits": {"version": "3", "sha256": SHA, "url": "https://relay/b", "bytes": 12}}}));
        let d = desired(&base(), "pi-1", &[&group, &device], &zoo()).unwrap();
        let digits = d.models["digits"].as_ref().unwrap();
        assert_eq!((digits.version.as_str(), digits.bytes), ("3", 12));
        assert!(d.models["vad"].is_none());
        // Plain http only when the device allows it.
        let plain = doc(json!({"version": 2, "models": {
            "digits": {"version": "3", "sha256": SHA, "url": "http://relay/b", "bytes": 12}}}));
        assert!(desired(&base(), "pi-1", &[&plain], &zoo()).is_err());
        let mut lab = base();
        lab.fleet.allow_http = true;
        assert!(desired(&lab, "pi-1", &[&plain], &zoo()).is_ok());
    }

    #[test]
    fn model_names_that_could_leave_the_model_directory_are_refused() {
        for name in ["../../x", "a/b", ".x", "", "x\\y", "é"] {
            let mut models = Map::new();
            models.insert(
                name.to_owned(),
                json!({"version": "1", "sha256": SHA, "url": "https://relay/x", "bytes": 5,
                       "spec": null}),
            );
            let d = doc(json!({"version": 1, "models": models}));
            let Err(Rejection::Invalid(m)) = desired(&base(), "pi-1", &[&d], &zoo()) else {
                panic!("{name:?} accepted")
            };
            assert!(m.contains("not a model name"), "{m}");
        }
    }

    #[test]
    fn sources_and_topics() {
        let t = DocTopics::new("tether", "pi-1", &["lab".into(), "eu".into()]);
        assert_eq!(
            t.filters(),
            vec![
                "tether/fleet/lab/config",
                "tether/fleet/eu/config",
                "tether/fleet/lab/rollout",
                "tether/fleet/eu/rollout",
                "tether/pi-1/config"
            ]
        );
        assert_eq!(
            t.source_of("tether/fleet/eu/rollout"),
            Some(Source::Rollout("eu".into()))
        );
        assert_eq!(t.source_of("tether/fleet/other/rollout"), None);
        // Groups, then their rollouts, then the device.
        assert!(t.rank(&Source::Group("eu".into())) < t.rank(&Source::Rollout("lab".into())));
        assert!(t.rank(&Source::Rollout("eu".into())) < t.rank(&Source::Device));
        assert_eq!(Source::Rollout("lab".into()).target("pi-1"), "rollout/lab");
        let r = Source::Rollout("lab".into());
        assert_eq!(Source::from_label(&r.label()), Some(r));
        assert_eq!(t.source_of("tether/pi-1/config"), Some(Source::Device));
        assert_eq!(
            t.source_of("tether/fleet/eu/config"),
            Some(Source::Group("eu".into()))
        );
        assert_eq!(t.source_of("tether/fleet/other/config"), None);
        assert!(t.rank(&Source::Group("lab".into())) < t.rank(&Source::Device));
        for s in [Source::Device, Source::Group("lab".into())] {
            assert_eq!(Source::from_label(&s.label()), Some(s));
        }
        assert_eq!(Source::Device.target("pi-1"), "device/pi-1");
        assert_eq!(Source::Group("lab".into()).target("pi-1"), "group/lab");
    }

    fn rollout_doc(rollout: Value, version: u64) -> Document {
        doc(json!({"target": "rollout/lab", "version": version, "rollout": rollout}))
    }

    fn rollout(cohort: Value, state: &str, serve: bool) -> Value {
        json!({
            "id": "digits-2", "model": "digits",
            "candidate": {"version": "2.0.0", "sha256": SHA, "url": "https://relay/d2", "bytes": 7},
            "cohort": cohort, "state": state, "serve": serve, "shadow_share": 0.5,
        })
    }

    #[test]
    fn rollout_documents_carry_only_a_rollout_and_only_they_may() {
        let ok = json!({"target": "rollout/lab", "version": 1,
                        "rollout": rollout(json!({"share": 1.0}), "running", false)});
        assert!(Document::parse(&ok.to_string()).is_ok());
        let mut extra = ok.clone();
        extra["policy"] = json!({});
        let cases = [
            (extra, "only `rollout`"),
            (
                json!({"target": "rollout/lab", "version": 1}),
                "needs a `rollout`",
            ),
            (
                json!({"target": "group/lab", "version": 1,
                       "rollout": rollout(json!({"share": 1.0}), "running", false)}),
                "only `rollout`",
            ),
            (
                json!({"target": "rollout/lab", "version": 1,
                       "rollout": rollout(json!({"share": 7}), "running", false)}),
                "cohort.share",
            ),
            (
                json!({"target": "rollout/a/b", "version": 1}),
                "needs a `target`",
            ),
        ];
        for (d, want) in cases {
            let e = Document::parse(&d.to_string()).expect_err(&d.to_string());
            assert!(e.message().contains(want), "{d}: {e}");
        }
    }

    #[test]
    fn a_rollout_shadows_serves_or_leaves_the_model_by_state_and_cohort() {
        let serving =
            json!({"version": "1.5.0", "sha256": SHA, "url": "https://relay/d15", "bytes": 7});
        let group = doc(json!({"version": 3, "models": {"digits": serving}}));
        let mut canary = base();
        canary.fleet.groups = vec!["lab".into(), "canary".into()];
        let cohort = json!({"group": "canary"});
        // (state, serve, base config, expected serving version, expected shadow, role)
        let cases = [
            (
                "running",
                false,
                canary.clone(),
                Some("1.5.0"),
                Some("2.0.0"),
                "shadow",
            ),
            ("running", false, base(), Some("1.5.0"), None, "none"),
            (
                "running",
                true,
                canary.clone(),
                Some("2.0.0"),
                None,
                "serve",
            ),
            ("promoted", false, base(), Some("2.0.0"), None, "serve"),
            (
                "rolled_back",
                false,
                canary.clone(),
                Some("1.5.0"),
                None,
                "none",
            ),
        ];
        for (state, serve, raw, want_serving, want_shadow, role) in cases {
            let r = rollout_doc(rollout(cohort.clone(), state, serve), 2);
            let d = desired(&raw, "pi-1", &[&group, &r], &zoo()).unwrap();
            let label = format!("{state} serve={serve} groups={:?}", raw.fleet.groups);
            assert_eq!(
                d.models["digits"].as_ref().map(|u| u.version.as_str()),
                want_serving,
                "{label}"
            );
            assert_eq!(
                d.shadows.get("digits").map(|s| s.model.version.as_str()),
                want_shadow,
                "{label}"
            );
            if let Some(s) = d.shadows.get("digits") {
                assert_eq!(s.share, 0.5);
            }
            assert_eq!(d.rollouts.len(), 1);
            assert_eq!(d.rollouts[0].role, role, "{label}");
            assert_eq!(d.rollouts[0].group, "lab");
            assert_eq!(d.rollouts[0].version, 2);
        }
        // Over the zoo's model (no group entry), a shadow leaves the serving model alone.
        let r = rollout_doc(rollout(json!({"share": 1.0}), "running", false), 1);
        let d = desired(&base(), "pi-1", &[&r], &zoo()).unwrap();
        assert!(!d.models.contains_key("digits"), "{:?}", d.models);
        assert_eq!(d.shadows["digits"].model.version, "2.0.0");
    }

    #[test]
    fn shadow_entries_are_checked_like_models() {
        let shadow = |extra: Value| {
            let mut s = json!({"version": "2", "sha256": SHA, "url": "https://relay/x", "bytes": 5, "share": 0.5});
            for (k, v) in extra.as_object().unwrap() {
                s[k] = v.clone();
            }
            doc(json!({"version": 1, "models": {"digits": {"shadow": s}}}))
        };
        assert!(desired(&base(), "pi-1", &[&shadow(json!({}))], &zoo()).is_ok());
        let cases = [
            (json!({"share": 0.0}), "shadow.share"),
            (json!({"share": 1.5}), "shadow.share"),
            (json!({"sha256": "zz"}), "shadow.sha256"),
            (json!({"url": "http://relay/x"}), "shadow.url"),
            (json!({"bytes": 0}), "shadow.bytes"),
            (json!({"extra": 1}), "shadow"),
        ];
        for (extra, want) in cases {
            let Err(Rejection::Invalid(m)) =
                desired(&base(), "pi-1", &[&shadow(extra.clone())], &zoo())
            else {
                panic!("{extra} accepted")
            };
            assert!(m.contains(want), "{extra}: {m}");
        }
    }
}
