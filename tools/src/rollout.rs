//! The operator's side of model rollouts (`tether fleet rollout start | status | promote |
//! abort`): writing rollout documents, reading what the devices report, and the rule that
//! decides. Devices only report; promotion and rollback are documents the operator pushes.
//!
//! The evidence is audited samples: local answers the devices also asked the relay's bigger
//! model about. Per model version, summed over the group's devices, agreement is the share of
//! audited samples whose top-1 class was the cloud's. The rule: once the candidate and the
//! serving version each have `min_samples`, promote when the candidate's agreement is no more
//! than `margin` below the serving version's, roll back otherwise. No labels are involved.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use agent::fleet::doc::{DocTopics, Document};
use agent::rollout::{Rollout, RolloutState, Rule};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event};
use serde::Serialize;
use serde_json::{Value, json};

/// Audited samples of one version, and how many agreed with the cloud.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub audited: u64,
    pub agree: u64,
}

impl Totals {
    pub fn agreement(&self) -> Option<f64> {
        // Counts come from device reports: past 2^53 the ratio only loses precision.
        (self.audited > 0).then(|| self.agree as f64 / self.audited as f64)
    }

    fn add(&mut self, other: Totals) {
        self.audited = self.audited.saturating_add(other.audited);
        self.agree = self.agree.saturating_add(other.agree);
    }
}

/// What the rule says.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "verdict")]
pub enum Verdict {
    /// Not enough audited samples yet.
    Pending {
        need: u64,
    },
    Promote,
    RollBack,
}

/// The rule, on the two versions' totals.
pub fn judge(rule: &Rule, serving: Totals, candidate: Totals) -> Verdict {
    let have = serving.audited.min(candidate.audited);
    if have < rule.min_samples.max(1) {
        return Verdict::Pending {
            need: rule.min_samples.max(1),
        };
    }
    match (candidate.agreement(), serving.agreement()) {
        (Some(c), Some(s)) if c + rule.margin >= s => Verdict::Promote,
        _ => Verdict::RollBack,
    }
}

/// One device's part in a rollout, from its quality report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceQuality {
    pub device_id: String,
    pub in_cohort: bool,
    /// `shadow`, `serve` or `none`.
    pub role: String,
    /// The rollout document version the device has in force.
    pub doc_version: u64,
    pub serving_version: Option<String>,
    pub shadow_version: Option<String>,
    /// Per version of the model: audited samples and agreement.
    pub versions: BTreeMap<String, Totals>,
    /// Shadow runs of the candidate compared with the serving model: (compared, agreed).
    pub shadow_compared: (u64, u64),
    pub ts_ms: Option<i64>,
}

/// The device's part in rollout `id` of `group`, or `None` when its report does not name it.
pub fn device_quality(report: &Value, group: &str, id: &str, model: &str) -> Option<DeviceQuality> {
    let device_id = report.get("device_id")?.as_str()?.to_owned();
    let part = report.get("rollouts")?.as_array()?.iter().find(|r| {
        r.get("group").and_then(Value::as_str) == Some(group)
            && r.get("id").and_then(Value::as_str) == Some(id)
    })?;
    let m = report.get("models").and_then(|m| m.get(model));
    let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
    let count = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    let mut versions = BTreeMap::new();
    let mut shadow_compared = (0, 0);
    let shadow_version = text(
        m.and_then(|m| m.get("shadow"))
            .and_then(|s| s.get("version")),
    );
    let candidate = part.get("candidate_version").and_then(Value::as_str);
    if let Some(Value::Object(vs)) = m.and_then(|m| m.get("versions")) {
        for (version, t) in vs {
            versions.insert(
                version.clone(),
                Totals {
                    audited: count(t, "audited"),
                    agree: count(t, "agree_cloud").min(count(t, "audited")),
                },
            );
            if Some(version.as_str()) == candidate {
                let compared = count(t, "compared");
                shadow_compared = (compared, count(t, "agree_serving").min(compared));
            }
        }
    }
    Some(DeviceQuality {
        device_id,
        in_cohort: part.get("in_cohort").and_then(Value::as_bool) == Some(true),
        role: text(part.get("role")).unwrap_or_else(|| "?".into()),
        doc_version: part.get("version").and_then(Value::as_u64).unwrap_or(0),
        serving_version: text(m.and_then(|m| m.get("serving"))),
        shadow_version,
        versions,
        shadow_compared,
        ts_ms: report.get("ts_ms").and_then(Value::as_i64),
    })
}

/// A rollout as the operator reads it: the document in force, what each device reports, the
/// totals and the verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Standing {
    pub group: String,
    pub doc_version: u64,
    pub rollout: Rollout,
    pub devices: Vec<DeviceQuality>,
    /// The version the devices not serving the candidate serve.
    pub serving_version: Option<String>,
    pub serving: Totals,
    pub candidate: Totals,
    pub verdict: Verdict,
}

/// Folds the devices' reports into the standing of `rollout`.
pub fn standing(group: &str, doc_version: u64, rollout: &Rollout, reports: &[Value]) -> Standing {
    let candidate_version = rollout.candidate_version();
    let devices: Vec<DeviceQuality> = reports
        .iter()
        .filter_map(|r| device_quality(r, group, &rollout.id, &rollout.model))
        .collect();
    // The serving version: the one most devices serve besides the candidate.
    let mut serving_count: BTreeMap<&str, usize> = BTreeMap::new();
    for d in &devices {
        if let Some(v) = d.serving_version.as_deref()
            && v != candidate_version
        {
            *serving_count.entry(v).or_default() += 1;
        }
    }
    let serving_version = serving_count
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(v, _)| (*v).to_owned());
    let (mut serving, mut candidate) = (Totals::default(), Totals::default());
    for d in &devices {
        if let Some(v) = &serving_version
            && let Some(t) = d.versions.get(v)
        {
            serving.add(*t);
        }
        if let Some(t) = d.versions.get(&candidate_version) {
            candidate.add(*t);
        }
    }
    Standing {
        group: group.to_owned(),
        doc_version,
        rollout: rollout.clone(),
        verdict: judge(&rollout.rule, serving, candidate),
        devices,
        serving_version,
        serving,
        candidate,
    }
}

fn percent(t: &Totals) -> String {
    t.agreement()
        .map_or_else(|| "-".to_owned(), |a| format!("{:.1} %", a * 100.0))
}

/// The standing as `rollout status` prints it.
pub fn render(s: &Standing) -> String {
    let r = &s.rollout;
    let candidate = r.candidate_version();
    let serving = s.serving_version.as_deref().unwrap_or("?");
    let mut out = format!(
        "Rollout {} of {} {candidate} in group {} (document version {}): {}; cohort {}; {}\n",
        r.id,
        r.model,
        s.group,
        s.doc_version,
        r.state.as_str(),
        match &r.cohort {
            agent::rollout::Cohort::Share { share } => format!("{:.0} % of devices", share * 100.0),
            agent::rollout::Cohort::Group { group } => format!("group {group}"),
        },
        if r.serve {
            "the cohort serves the candidate".to_owned()
        } else {
            format!(
                "the cohort shadows it on {:.0} % of requests",
                r.shadow_share * 100.0
            )
        }
    );
    out.push_str(&format!(
        "{:<20} {:<7} {:<7} {:<10} {:<22} {:<22} {}\n",
        "DEVICE",
        "COHORT",
        "ROLE",
        "SERVING",
        format!("AGREE {serving}"),
        format!("AGREE {candidate}"),
        "SAME AS SERVING"
    ));
    for d in &s.devices {
        let cell = |v: &str| {
            d.versions.get(v).map_or_else(
                || "-".to_owned(),
                |t| format!("{} ({})", percent(t), t.audited),
            )
        };
        let same = match d.shadow_compared {
            (0, _) => "-".to_owned(),
            (n, k) => format!("{:.1} % ({n})", k as f64 * 100.0 / n as f64),
        };
        out.push_str(&format!(
            "{:<20} {:<7} {:<7} {:<10} {:<22} {:<22} {}\n",
            d.device_id,
            if d.in_cohort { "yes" } else { "no" },
            d.role,
            d.serving_version.as_deref().unwrap_or("-"),
            cell(serving),
            cell(&candidate),
            same
        ));
    }
    if s.devices.is_empty() {
        out.push_str("(no device reports this rollout yet)\n");
    }
    out.push_str(&format!(
        "Fleet: {serving} {} over {} audited; {candidate} {} over {} audited. Rule: at least {} each, promote within {:.1} points.\n",
        percent(&s.serving),
        s.serving.audited,
        percent(&s.candidate),
        s.candidate.audited,
        r.rule.min_samples,
        r.rule.margin * 100.0
    ));
    out.push_str(&match s.verdict {
        Verdict::Pending { need } => format!(
            "Verdict: pending (each side needs {need} audited samples; raise audit_rate or wait)\n"
        ),
        Verdict::Promote => format!("Verdict: promote {candidate}\n"),
        Verdict::RollBack => format!("Verdict: roll back {candidate}\n"),
    });
    out
}

/// The rollout document for `group` at `version`, unsigned.
pub fn document(group: &str, version: u64, rollout: &Rollout) -> Result<String, String> {
    let text = serde_json::to_string_pretty(&json!({
        "target": format!("rollout/{group}"),
        "version": version,
        "rollout": rollout,
    }))
    .map_err(|e| e.to_string())?;
    // The device's own check, before anything is signed.
    Document::parse(&text).map_err(|e| format!("the rollout document is not valid: {e}"))?;
    Ok(text)
}

/// The version after `version`, the one the broker holds (read, not verified: anyone who may
/// publish there could have put it).
pub fn next_version(version: u64) -> Result<u64, String> {
    version.checked_add(1).ok_or_else(|| {
        format!(
            "the retained rollout document claims version {version}, the largest there is; clear the topic (publish an empty retained message) and start again"
        )
    })
}

/// The same rollout in another state.
pub fn with_state(rollout: &Rollout, state: RolloutState) -> Rollout {
    Rollout {
        state,
        ..rollout.clone()
    }
}

/// What the broker holds for a group: the rollout document in force (its version and rollout,
/// from the retained envelope) and every device's retained quality report.
#[derive(Debug, Clone, Default)]
pub struct Heard {
    pub current: Option<(u64, Rollout)>,
    pub reports: Vec<Value>,
}

/// Listens `listen` for the retained rollout document of `group` and the devices' quality
/// reports.
pub async fn gather(
    broker: SocketAddr,
    prefix: &str,
    group: &str,
    listen: Duration,
) -> Result<Heard, String> {
    let (client, mut eventloop) = AsyncClient::new(
        crate::client::options(broker, format!("tether-rollout-{:x}", fastrand::u64(..))),
        256,
    );
    let rollout_topic = DocTopics::rollout(prefix, group);
    let quality = format!("{prefix}/+/quality");
    let mut heard = Heard::default();
    let mut reports: BTreeMap<String, Value> = BTreeMap::new();
    let end = tokio::time::Instant::now() + listen;
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(end) => break,
            ev = eventloop.poll() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    for f in [&rollout_topic, &quality] {
                        client
                            .subscribe(f.clone(), QoS::AtLeastOnce)
                            .await
                            .map_err(|e| e.to_string())?;
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let topic = String::from_utf8_lossy(&p.topic).into_owned();
                    if topic == rollout_topic {
                        heard.current = parse_envelope(&p.payload);
                    } else if let Ok(v) = serde_json::from_slice::<Value>(&p.payload)
                        && let Some(id) = v.get("device_id").and_then(Value::as_str)
                    {
                        reports.insert(id.to_owned(), v);
                    }
                }
                Ok(_) => {}
                Err(e) => return Err(format!("cannot reach the broker at {broker}: {e}")),
            },
        }
    }
    let _ = client.try_disconnect();
    heard.reports = reports.into_values().collect();
    Ok(heard)
}

/// The version and rollout of a retained envelope (the operator's own document: read, not
/// verified; the devices verify).
pub fn parse_envelope(payload: &[u8]) -> Option<(u64, Rollout)> {
    let env: agent::fleet::envelope::Envelope = serde_json::from_slice(payload).ok()?;
    let doc = Document::parse(&env.payload).ok()?;
    let rollout = Rollout::parse(doc.body.get("rollout")?).ok()?;
    Some((doc.version, rollout))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn t(audited: u64, agree: u64) -> Totals {
        Totals { audited, agree }
    }

    #[test]
    fn the_rule() {
        let rule = Rule {
            min_samples: 100,
            margin: 0.02,
        };
        // (serving, candidate, verdict)
        let cases = [
            (t(99, 97), t(500, 500), Verdict::Pending { need: 100 }),
            (t(500, 490), t(99, 99), Verdict::Pending { need: 100 }),
            (t(100, 97), t(100, 95), Verdict::Promote),
            (t(100, 97), t(100, 96), Verdict::Promote),
            (t(100, 97), t(100, 100), Verdict::Promote),
            (t(100, 97), t(100, 94), Verdict::RollBack),
            (t(1000, 970), t(200, 170), Verdict::RollBack),
            (t(0, 0), t(0, 0), Verdict::Pending { need: 100 }),
        ];
        for (serving, candidate, want) in cases {
            assert_eq!(
                judge(&rule, serving, candidate),
                want,
                "{serving:?} {candidate:?}"
            );
        }
        // A zero minimum still needs one sample a side.
        let eager = Rule {
            min_samples: 0,
            margin: 0.0,
        };
        assert_eq!(
            judge(&eager, t(0, 0), t(5, 5)),
            Verdict::Pending { need: 1 }
        );
    }

    fn rollout() -> Rollout {
        Rollout::parse(&json!({
            "id": "digits-1.1.0", "model": "digits",
            "candidate": {"version": "1.1.0", "sha256": "ab", "url": "https://r/x", "bytes": 1},
            "cohort": {"share": 0.5}, "state": "running",
            "rule": {"min_samples": 10, "margin": 0.02},
        }))
        .unwrap()
    }

    fn report(device: &str, role: &str, versions: Value) -> Value {
        json!({
            "device_id": device, "ts_ms": 5,
            "models": {"digits": {"serving": "1.0.0", "versions": versions}},
            "rollouts": [{"id": "digits-1.1.0", "group": "lab", "version": 1, "model": "digits",
                          "candidate_version": "1.1.0", "state": "running",
                          "in_cohort": role != "none", "role": role}],
        })
    }

    #[test]
    fn standings_sum_the_devices_that_report_the_rollout() {
        let reports = vec![
            report(
                "pi-1",
                "shadow",
                json!({"1.0.0": {"audited": 10, "agree_cloud": 10},
                       "1.1.0": {"audited": 10, "agree_cloud": 7, "compared": 40, "agree_serving": 30}}),
            ),
            report(
                "pi-2",
                "none",
                json!({"1.0.0": {"audited": 12, "agree_cloud": 11}}),
            ),
            // Another rollout, or junk: left out.
            json!({"device_id": "pi-3", "rollouts": [{"id": "other", "group": "lab"}],
                   "models": {"digits": {"versions": {"1.0.0": {"audited": 1000, "agree_cloud": 0}}}}}),
            json!({"rollouts": "x"}),
            json!(null),
            // A hostile report claiming more agreements than audits (or comparisons) counts no
            // more than those.
            report(
                "pi-4",
                "shadow",
                json!({"1.1.0": {"audited": 2, "agree_cloud": 1000, "compared": 3, "agree_serving": 9}}),
            ),
        ];
        let s = standing("lab", 1, &rollout(), &reports);
        assert_eq!(s.devices.len(), 3, "{:?}", s.devices);
        assert_eq!(s.serving_version.as_deref(), Some("1.0.0"));
        assert_eq!(s.serving, t(22, 21));
        assert_eq!(s.candidate, t(12, 9));
        assert_eq!(s.verdict, Verdict::RollBack);
        assert_eq!(s.devices[0].shadow_compared, (40, 30));
        assert_eq!(s.devices[2].shadow_compared, (3, 3));
        let text = render(&s);
        assert!(text.contains("Verdict: roll back 1.1.0"), "{text}");
        assert!(text.contains("pi-2"), "{text}");
        assert!(!text.contains("pi-3"), "{text}");
    }

    #[test]
    fn the_next_version_of_a_hostile_retained_one_is_refused_not_wrapped() {
        assert_eq!(next_version(7), Ok(8));
        assert!(
            next_version(u64::MAX)
                .unwrap_err()
                .contains("clear the topic")
        );
        // A retained payload that is no envelope, or no rollout, reads as none.
        assert_eq!(parse_envelope(b"junk"), None);
        assert_eq!(
            parse_envelope(br#"{"key":"k","alg":"ed25519","signature":"","payload":"{}"}"#),
            None
        );
    }

    #[test]
    fn documents_carry_the_rollout_and_pass_the_devices_check() {
        let r = rollout();
        let text = document("lab", 3, &with_state(&r, RolloutState::Promoted)).unwrap();
        let doc = Document::parse(&text).unwrap();
        assert_eq!((doc.target.as_str(), doc.version), ("rollout/lab", 3));
        assert_eq!(doc.body["rollout"]["state"], "promoted");
        assert!(document("a/b", 1, &r).is_err());
    }
}
