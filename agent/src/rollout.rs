//! Rollouts: a candidate model tried on a cohort of devices, judged by the operator on audited
//! samples, then promoted to every device of the group or rolled back. Pure: no IO, every rule
//! unit-tested.
//!
//! A rollout document is signed for `rollout/GROUP` and published, retained, on
//! `{prefix}/fleet/GROUP/rollout`:
//!
//! ```json
//! {
//!   "target": "rollout/lab", "version": 1,
//!   "rollout": {
//!     "id": "digits-1.1.0",
//!     "model": "digits",
//!     "candidate": {"version": "1.1.0", "sha256": "…", "url": "https://…", "bytes": 7664},
//!     "cohort": {"share": 0.25},            (or {"group": "canary"})
//!     "serve": false,                       (true: the cohort answers with the candidate)
//!     "shadow_share": 0.5,                  (with serve false: the share of requests it shadows)
//!     "state": "running",                   (then "promoted" or "rolled_back")
//!     "rule": {"min_samples": 200, "margin": 0.02}
//!   }
//! }
//! ```
//!
//! What a document does to one device is [`Rollout::effect`]: while `running`, a device in the
//! cohort shadows the candidate (or serves it); once `promoted`, every device of the group
//! serves it; once `rolled_back`, none runs it. The `rule` is the operator's: a device reports
//! what it measured and never promotes itself.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::is_plain_name;

/// A rollout's stage, as its document says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    Running,
    Promoted,
    RolledBack,
}

impl RolloutState {
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Running => "running",
            RolloutState::Promoted => "promoted",
            RolloutState::RolledBack => "rolled_back",
        }
    }
}

/// Which devices try the candidate while the rollout runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged, try_from = "RawCohort")]
pub enum Cohort {
    /// A stable share of devices, by a hash of the rollout id and the device id: the same
    /// devices for the whole rollout, different devices for the next one.
    Share { share: f64 },
    /// The devices whose agent.toml lists this group in `fleet.groups`.
    Group { group: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCohort {
    share: Option<f64>,
    group: Option<String>,
}

impl TryFrom<RawCohort> for Cohort {
    type Error = String;

    fn try_from(raw: RawCohort) -> Result<Cohort, String> {
        match (raw.share, raw.group) {
            (Some(share), None) => Ok(Cohort::Share { share }),
            (None, Some(group)) => Ok(Cohort::Group { group }),
            _ => Err("a cohort is {\"share\": 0.25} or {\"group\": \"NAME\"}".into()),
        }
    }
}

/// The operator's rule (read by `tether fleet rollout status`, carried for it; the device does
/// not use it).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Audited samples each side needs before anything is decided.
    pub min_samples: u64,
    /// How much lower the candidate's agreement with the cloud may be than the serving
    /// model's and still be promoted (0.02: two percentage points).
    pub margin: f64,
}

impl Default for Rule {
    fn default() -> Rule {
        Rule {
            min_samples: 200,
            margin: 0.02,
        }
    }
}

/// A rollout section, validated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    pub id: String,
    pub model: String,
    /// A `models` entry: `version`, `sha256`, `url`, `bytes` (and `spec` for a model the zoo
    /// lacks), checked like any model update.
    pub candidate: Map<String, Value>,
    pub cohort: Cohort,
    #[serde(default)]
    pub serve: bool,
    #[serde(default = "default_shadow_share")]
    pub shadow_share: f64,
    pub state: RolloutState,
    #[serde(default)]
    pub rule: Rule,
}

fn default_shadow_share() -> f64 {
    1.0
}

/// What a rollout does to one device's model entries.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Nothing: not in the cohort, or rolled back.
    None,
    /// Run the candidate after the reply on this share of requests.
    Shadow { share: f64 },
    /// Answer with the candidate.
    Serve,
}

/// One rollout as a device reports it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RolloutView {
    pub id: String,
    pub group: String,
    pub version: u64,
    pub model: String,
    pub candidate_version: String,
    pub state: RolloutState,
    pub in_cohort: bool,
    /// `shadow`, `serve` or `none`: what this device does with the candidate.
    pub role: &'static str,
}

impl Rollout {
    /// Parses and checks a document's `rollout` section.
    pub fn parse(value: &Value) -> Result<Rollout, String> {
        let r: Rollout = serde_json::from_value(value.clone()).map_err(|e| {
            format!(
                "`rollout` is not a rollout: {e} (it needs id, model, candidate, cohort and state)"
            )
        })?;
        let mut errors = Vec::new();
        if !is_plain_name(&r.id) {
            errors.push(format!(
                "rollout.id `{}` is not a plain name (letters, digits, `.`, `_` and `-`)",
                r.id.escape_debug()
            ));
        }
        if !is_plain_name(&r.model) {
            errors.push(format!(
                "rollout.model `{}` is not a model name",
                r.model.escape_debug()
            ));
        }
        match &r.cohort {
            Cohort::Share { share } if !(0.0..=1.0).contains(share) => errors.push(format!(
                "rollout.cohort.share is {share}; use a share of devices from 0 to 1"
            )),
            Cohort::Group { group } if !is_plain_name(group) => errors.push(format!(
                "rollout.cohort.group `{}` is not a group name",
                group.escape_debug()
            )),
            _ => {}
        }
        if !(r.shadow_share > 0.0 && r.shadow_share <= 1.0) {
            errors.push(format!(
                "rollout.shadow_share is {}; use a share of requests above 0 and at most 1",
                r.shadow_share
            ));
        }
        if !(r.rule.margin.is_finite() && (0.0..=1.0).contains(&r.rule.margin)) {
            errors.push(format!(
                "rollout.rule.margin is {}; use a share from 0 to 1",
                r.rule.margin
            ));
        }
        if r.candidate.contains_key("shadow") {
            errors.push("rollout.candidate cannot itself name a shadow".into());
        }
        if errors.is_empty() {
            Ok(r)
        } else {
            Err(errors.join("; "))
        }
    }

    /// Whether `device_id`, a member of `groups`, is in the cohort.
    pub fn in_cohort(&self, device_id: &str, groups: &[String]) -> bool {
        match &self.cohort {
            Cohort::Share { share } => cohort_point(&self.id, device_id) < *share,
            Cohort::Group { group } => groups.iter().any(|g| g == group),
        }
    }

    /// What this rollout does to `device_id`.
    pub fn effect(&self, device_id: &str, groups: &[String]) -> Effect {
        match self.state {
            RolloutState::RolledBack => Effect::None,
            RolloutState::Promoted => Effect::Serve,
            RolloutState::Running if !self.in_cohort(device_id, groups) => Effect::None,
            RolloutState::Running if self.serve => Effect::Serve,
            RolloutState::Running => Effect::Shadow {
                share: self.shadow_share,
            },
        }
    }

    /// The candidate's version, as its entry names it.
    pub fn candidate_version(&self) -> String {
        self.candidate
            .get("version")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_owned()
    }

    /// Applies this rollout's effect to the model entry in force for its model (`None`: the
    /// zoo's), returning the entry that replaces it.
    pub fn apply(&self, effect: &Effect, entry: Option<&Value>) -> Option<Value> {
        match effect {
            Effect::None => None,
            Effect::Serve => Some(Value::Object(self.candidate.clone())),
            Effect::Shadow { share } => {
                let mut e = match entry {
                    Some(Value::Object(m)) => m.clone(),
                    _ => Map::new(),
                };
                let mut shadow = self.candidate.clone();
                shadow.insert("share".into(), Value::from(*share));
                e.insert("shadow".into(), Value::Object(shadow));
                Some(Value::Object(e))
            }
        }
    }
}

/// A device's stable point in [0, 1) for a rollout: the first four bytes of
/// sha256("{rollout id}/{device id}"). A cohort of share s is the devices below s.
pub fn cohort_point(rollout_id: &str, device_id: &str) -> f64 {
    let h = models::sha256::Sha256::digest(format!("{rollout_id}/{device_id}"));
    let top = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
    f64::from(top) / 4_294_967_296.0
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn doc(extra: Value) -> Value {
        let mut v = json!({
            "id": "digits-2", "model": "digits",
            "candidate": {"version": "2", "sha256": "ab", "url": "https://x/y", "bytes": 10},
            "cohort": {"share": 0.5}, "state": "running",
        });
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    }

    #[test]
    fn rollout_sections_are_checked() {
        let cases: &[(Value, Option<&str>)] = &[
            (json!({}), None),
            (json!({"cohort": {"group": "canary"}}), None),
            (json!({"cohort": {"share": 1.5}}), Some("cohort.share")),
            (json!({"cohort": {"share": -0.1}}), Some("cohort.share")),
            (json!({"cohort": {"group": "a/b"}}), Some("cohort.group")),
            (
                json!({"cohort": {"share": 0.5, "group": "x"}}),
                Some("not a rollout"),
            ),
            (json!({"id": "../x"}), Some("rollout.id")),
            (json!({"model": "a b"}), Some("rollout.model")),
            (json!({"shadow_share": 0.0}), Some("shadow_share")),
            (json!({"shadow_share": 2.0}), Some("shadow_share")),
            (json!({"state": "done"}), Some("not a rollout")),
            (
                json!({"rule": {"min_samples": 10, "margin": -1.0}}),
                Some("margin"),
            ),
            (
                json!({"rule": {"min_samples": -1, "margin": 0.1}}),
                Some("not a rollout"),
            ),
            (json!({"extra": 1}), Some("not a rollout")),
            (
                json!({"candidate": {"version": "2", "shadow": {}}}),
                Some("cannot itself name a shadow"),
            ),
        ];
        for (extra, want) in cases {
            let got = Rollout::parse(&doc(extra.clone()));
            match want {
                None => assert!(got.is_ok(), "{extra}: {got:?}"),
                Some(w) => {
                    let e = got.expect_err(&extra.to_string());
                    assert!(e.contains(w), "{extra}: {e}");
                }
            }
        }
    }

    #[test]
    fn a_share_cohort_is_stable_and_about_its_share() {
        let r = Rollout::parse(&doc(json!({"cohort": {"share": 0.3}}))).unwrap();
        let devices: Vec<String> = (0..2000).map(|i| format!("pi-{i}")).collect();
        let inside = devices.iter().filter(|d| r.in_cohort(d, &[])).count();
        assert!(
            (500..700).contains(&inside),
            "{inside} of 2000 in a 30 % cohort"
        );
        // The same device answers the same way every time; another rollout draws anew.
        assert_eq!(r.in_cohort("pi-7", &[]), r.in_cohort("pi-7", &[]));
        let other =
            Rollout::parse(&doc(json!({"id": "digits-3", "cohort": {"share": 0.3}}))).unwrap();
        let both = devices
            .iter()
            .filter(|d| r.in_cohort(d, &[]) && other.in_cohort(d, &[]))
            .count();
        assert!(both < inside, "a new rollout picks another cohort");
        let none = Rollout::parse(&doc(json!({"cohort": {"share": 0.0}}))).unwrap();
        let all = Rollout::parse(&doc(json!({"cohort": {"share": 1.0}}))).unwrap();
        assert!(
            devices
                .iter()
                .all(|d| !none.in_cohort(d, &[]) && all.in_cohort(d, &[]))
        );
    }

    #[test]
    fn effects_by_state_cohort_and_serve() {
        let groups = vec!["lab".to_owned(), "canary".to_owned()];
        let base = json!({"cohort": {"group": "canary"}, "shadow_share": 0.5});
        let with = |extra: Value| {
            let mut d = doc(base.clone());
            for (k, x) in extra.as_object().unwrap() {
                d[k] = x.clone();
            }
            Rollout::parse(&d).unwrap()
        };
        let cases: &[(Value, &[String], Effect)] = &[
            (json!({}), &groups, Effect::Shadow { share: 0.5 }),
            (json!({}), &groups[..1], Effect::None),
            (json!({"serve": true}), &groups, Effect::Serve),
            (json!({"serve": true}), &groups[..1], Effect::None),
            (json!({"state": "promoted"}), &groups[..1], Effect::Serve),
            (json!({"state": "promoted"}), &groups, Effect::Serve),
            (json!({"state": "rolled_back"}), &groups, Effect::None),
        ];
        for (extra, g, want) in cases {
            assert_eq!(
                &with(extra.clone()).effect("pi-1", g),
                want,
                "{extra} {g:?}"
            );
        }
    }

    #[test]
    fn a_shadow_keeps_the_serving_entry_and_serving_replaces_it() {
        let r = Rollout::parse(&doc(json!({}))).unwrap();
        let serving = json!({"version": "1", "sha256": "cd", "url": "https://x/1", "bytes": 9});
        let shadowed = r
            .apply(&Effect::Shadow { share: 0.25 }, Some(&serving))
            .unwrap();
        assert_eq!(shadowed["version"], "1");
        assert_eq!(shadowed["shadow"]["version"], "2");
        assert_eq!(shadowed["shadow"]["share"], 0.25);
        let zoo = r.apply(&Effect::Shadow { share: 1.0 }, None).unwrap();
        assert_eq!(zoo.as_object().unwrap().len(), 1, "only the shadow: {zoo}");
        assert_eq!(
            r.apply(&Effect::Serve, Some(&serving)).unwrap()["version"],
            "2"
        );
        assert_eq!(r.apply(&Effect::None, Some(&serving)), None);
    }
}
