//! Fleet documents: what one says, how a device's group documents and its own combine, and
//! what may change while the agent runs. Pure: no IO, every rule unit-tested.
//!
//! A document is a JSON object:
//!
//! ```json
//! {
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
//! `policy` and `store` use agent.toml's names and rules and are merged over it (JSON merge
//! patch: a `null` restores the local value); groups apply in the order agent.toml lists them,
//! then the device's own document. Under `models` each entry replaces the earlier one whole;
//! `null` removes the model.

use std::collections::BTreeMap;
use std::time::Duration;

use models::manifest::{Manifest, ModelSpec};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::Rejection;
use crate::config::{Config, RawConfig};

/// Where a document comes from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    /// `{prefix}/fleet/{group}/config`.
    Group(String),
    /// `{prefix}/{device_id}/config`: overrides the groups.
    Device,
}

impl Source {
    /// How the source is named in statuses and the database: `group/lab` or `device`.
    pub fn label(&self) -> String {
        match self {
            Source::Group(g) => format!("group/{g}"),
            Source::Device => "device".to_owned(),
        }
    }

    pub fn from_label(label: &str) -> Option<Source> {
        match label {
            "device" => Some(Source::Device),
            _ => label
                .strip_prefix("group/")
                .map(|g| Source::Group(g.to_owned())),
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
        f.push(Self::device(&self.prefix, &self.device_id));
        f
    }

    pub fn source_of(&self, topic: &str) -> Option<Source> {
        if topic == Self::device(&self.prefix, &self.device_id) {
            return Some(Source::Device);
        }
        self.groups
            .iter()
            .find(|g| topic == Self::group(&self.prefix, g))
            .map(|g| Source::Group(g.clone()))
    }

    /// The order documents apply in: groups as configured, then the device.
    pub fn rank(&self, source: &Source) -> usize {
        match source {
            Source::Group(g) => self.groups.iter().position(|x| x == g).unwrap_or(0),
            Source::Device => self.groups.len(),
        }
    }
}

/// One verified document.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
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

impl Document {
    pub fn parse(payload: &str) -> Result<Document, Rejection> {
        let bad = |m: String| Rejection::BadDocument(m);
        let value: Value = serde_json::from_str(payload)
            .map_err(|e| bad(format!("the signed payload is not JSON: {e}")))?;
        let Value::Object(mut body) = value else {
            return Err(bad("the signed payload must be a JSON object".into()));
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
        if let Some(k) = body.keys().find(|k| !KEYS.contains(&k.as_str())) {
            return Err(Rejection::Invalid(format!(
                "`{k}` cannot be set by the fleet; a document may set {}",
                KEYS.join(", ")
            )));
        }
        Ok(Document {
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
    /// The file's size, when known: checked against the free disk space before downloading.
    #[serde(default)]
    pub bytes: Option<u64>,
    /// The manifest entry (interface, labels) of a model the zoo does not have.
    #[serde(default)]
    pub spec: Option<ModelSpec>,
}

/// Everything the documents in force ask for, validated.
#[derive(Debug, Clone)]
pub struct Desired {
    /// agent.toml with the documents' `policy` and `store` merged in, validated.
    pub config: Config,
    /// Per model: `Some` to install that file, `None` to remove the model.
    pub models: BTreeMap<String, Option<ModelUpdate>>,
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
    for doc in docs {
        for (k, v) in &doc.body {
            if k == "models" {
                let Value::Object(entries) = v else {
                    return Err(invalid("`models` must be an object of model name to entry"));
                };
                for (name, entry) in entries {
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
    for (name, entry) in model_entries {
        if entry.is_null() {
            models.insert(name, None);
            continue;
        }
        match serde_json::from_value::<ModelUpdate>(entry) {
            Ok(u) => {
                check_update(&name, &u, zoo, &mut errors);
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
        telemetry_interval,
        log_level,
    })
}

fn check_update(name: &str, u: &ModelUpdate, zoo: &Manifest, errors: &mut Vec<String>) {
    if u.version.trim().is_empty() {
        errors.push(format!("models.{name}.version is empty"));
    }
    if u.sha256.len() != 64 || !u.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        errors.push(format!(
            "models.{name}.sha256 must be the file's sha256 in 64 hex digits"
        ));
    }
    match url::Url::parse(&u.url) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host_str().is_some() => {}
        _ => errors.push(format!(
            "models.{name}.url `{}` is not an http(s) URL",
            u.url
        )),
    }
    match &u.spec {
        Some(spec) if spec.name != name => errors.push(format!(
            "models.{name}.spec names the model `{}`",
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

    fn doc(v: Value) -> Document {
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
    fn parse_needs_a_version_and_known_keys() {
        assert!(matches!(
            Document::parse(r#"{"policy": {}}"#),
            Err(Rejection::BadDocument(_))
        ));
        assert!(matches!(
            Document::parse(r#"{"version": 0}"#),
            Err(Rejection::BadDocument(_))
        ));
        assert!(matches!(
            Document::parse("[1]"),
            Err(Rejection::BadDocument(_))
        ));
        let Err(Rejection::Invalid(m)) = Document::parse(r#"{"version": 2, "mqtt": {}}"#) else {
            panic!("mqtt accepted")
        };
        assert!(m.contains("`mqtt`"), "{m}");
        let d =
            doc(json!({"version": 4, "rollback": true, "rollback_from": 6, "log_level": "debug"}));
        assert_eq!((d.version, d.rollback, d.rollback_from), (4, true, Some(6)));
        assert!(matches!(
            Document::parse(r#"{"version": 4, "rollback": true}"#),
            Err(Rejection::BadDocument(_))
        ));
        assert!(matches!(
            Document::parse(r#"{"version": 4, "rollback_from": 5}"#),
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
            "models": {"digits": {"version": "2", "sha256": "nope", "url": "ftp://x/y"},
                        "brand_new": {"version": "1", "sha256": SHA, "url": "http://relay/x"}}}));
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
            "brand_new",
        ] {
            assert!(m.contains(needle), "`{needle}` missing from: {m}");
        }
    }

    #[test]
    fn model_entries_replace_whole_and_null_removes() {
        let group = doc(json!({"version": 1, "models": {
            "digits": {"version": "2", "sha256": SHA, "url": "http://relay/a", "bytes": 10},
            "vad": null}}));
        let device = doc(json!({"version": 1, "models": {
            "digits": {"version": "3", "sha256": SHA, "url": "http://relay/b"}}}));
        let d = desired(&base(), "pi-1", &[&group, &device], &zoo()).unwrap();
        let digits = d.models["digits"].as_ref().unwrap();
        assert_eq!((digits.version.as_str(), digits.bytes), ("3", None));
        assert!(d.models["vad"].is_none());
    }

    #[test]
    fn sources_and_topics() {
        let t = DocTopics::new("tether", "pi-1", &["lab".into(), "eu".into()]);
        assert_eq!(
            t.filters(),
            vec![
                "tether/fleet/lab/config",
                "tether/fleet/eu/config",
                "tether/pi-1/config"
            ]
        );
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
    }
}
