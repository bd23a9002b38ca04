//! The operator's side: publishing signed documents and the live table of devices that
//! `tether-agent fleet status` prints. The table is built from the retained device statuses,
//! the configuration statuses and telemetry; folding messages into it is pure.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event};
use serde::Serialize;
use serde_json::Value;

use agent::fleet::doc::DocTopics;

/// One device as the operator sees it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DeviceRow {
    pub device_id: String,
    pub online: Option<bool>,
    pub config_version: Option<String>,
    /// `name@version`.
    pub models: Vec<String>,
    /// The slowest model's p99 in the last telemetry window.
    pub p99_ms: Option<f64>,
    /// The share of requests answered by the relay in the last telemetry window.
    pub offload_share: Option<f64>,
    /// The latest timestamp any message from the device carried (ms since the epoch).
    pub last_seen_ms: Option<i64>,
    /// The outcome of the latest fleet document: `applied device@7`, `rejected …`.
    pub last_update: Option<String>,
    /// The rollouts the device takes part in: `digits-1.1.0 running shadow` (its role:
    /// shadow, serve or none when it is outside the cohort).
    pub rollouts: Vec<String>,
    /// Per model version with audited samples: `digits@1.0.0 97.5 % (400)`, agreement with
    /// the cloud model over that many audited samples.
    pub agreement: Vec<String>,
}

/// Every device heard from.
#[derive(Debug, Default, Clone)]
pub struct Board {
    prefix: String,
    pub devices: BTreeMap<String, DeviceRow>,
}

impl Board {
    pub fn new(prefix: &str) -> Board {
        Board {
            prefix: prefix.to_owned(),
            devices: BTreeMap::new(),
        }
    }

    /// The subscriptions that feed the board.
    pub fn filters(&self) -> Vec<String> {
        let p = &self.prefix;
        vec![
            format!("{p}/+/status"),
            format!("{p}/+/config/status"),
            format!("{p}/+/telemetry"),
            format!("{p}/+/quality"),
        ]
    }

    /// Folds one message in; other topics and malformed payloads are ignored.
    pub fn ingest(&mut self, topic: &str, payload: &[u8]) {
        let Some(rest) = topic
            .strip_prefix(&self.prefix)
            .and_then(|r| r.strip_prefix('/'))
        else {
            return;
        };
        let Some((device, kind)) = rest.split_once('/') else {
            return;
        };
        if device == "fleet" || payload.is_empty() {
            return;
        }
        let Ok(v) = serde_json::from_slice::<Value>(payload) else {
            return;
        };
        let row = self
            .devices
            .entry(device.to_owned())
            .or_insert_with(|| DeviceRow {
                device_id: device.to_owned(),
                ..DeviceRow::default()
            });
        let seen = |row: &mut DeviceRow, ts: Option<i64>| {
            if let Some(ts) = ts {
                row.last_seen_ms = Some(row.last_seen_ms.map_or(ts, |s| s.max(ts)));
            }
        };
        match kind {
            "status" => {
                row.online = v.get("online").and_then(Value::as_bool);
                row.config_version = v
                    .get("config_version")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                if let Some(models) = v.get("models").and_then(Value::as_array) {
                    row.models = models
                        .iter()
                        .filter_map(|m| {
                            Some(format!(
                                "{}@{}",
                                m.get("name")?.as_str()?,
                                m.get("version")?.as_str()?
                            ))
                        })
                        .collect();
                }
            }
            "config/status" => {
                let state = v.get("state").and_then(Value::as_str).unwrap_or("?");
                let source = v.get("source").and_then(Value::as_str).unwrap_or("?");
                let version = v
                    .get("version")
                    .and_then(Value::as_u64)
                    .map_or_else(|| "?".to_owned(), |n| n.to_string());
                let mut s = format!("{state} {source}@{version}");
                if let Some(code) = v.get("code").and_then(Value::as_str) {
                    s.push_str(&format!(" ({code})"));
                }
                row.last_update = Some(s);
                if let Some(c) = v.get("config_version").and_then(Value::as_str) {
                    row.config_version = Some(c.to_owned());
                }
                seen(row, v.get("ts_ms").and_then(Value::as_i64));
            }
            "telemetry" => {
                row.p99_ms = v.get("models").and_then(Value::as_object).and_then(|m| {
                    m.values()
                        .filter_map(|x| x.get("p99_ms").and_then(Value::as_f64))
                        .reduce(f64::max)
                });
                row.offload_share = v
                    .get("routes")
                    .and_then(|r| r.get("cloud"))
                    .and_then(Value::as_f64);
                if let Some(c) = v.get("config_version").and_then(Value::as_str) {
                    row.config_version = Some(c.to_owned());
                }
                seen(row, v.get("ts_ms").and_then(Value::as_i64));
            }
            "quality" => {
                row.rollouts = v
                    .get("rollouts")
                    .and_then(Value::as_array)
                    .map(|rs| {
                        rs.iter()
                            .filter_map(|r| {
                                Some(format!(
                                    "{} {} {}",
                                    r.get("id")?.as_str()?,
                                    r.get("state")?.as_str()?,
                                    r.get("role")?.as_str()?
                                ))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                row.agreement.clear();
                if let Some(models) = v.get("models").and_then(Value::as_object) {
                    for (name, m) in models {
                        let Some(versions) = m.get("versions").and_then(Value::as_object) else {
                            continue;
                        };
                        for (version, t) in versions {
                            let audited = t.get("audited").and_then(Value::as_u64).unwrap_or(0);
                            if let Some(a) = t.get("agreement").and_then(Value::as_f64)
                                && audited > 0
                            {
                                row.agreement.push(format!(
                                    "{name}@{version} {:.1} % ({audited})",
                                    a * 100.0
                                ));
                            }
                        }
                    }
                }
                seen(row, v.get("ts_ms").and_then(Value::as_i64));
            }
            _ => {}
        }
    }

    /// The table, as `fleet status` prints it; `now_ms` dates "last seen".
    pub fn render(&self, now_ms: i64) -> String {
        let header = [
            "DEVICE",
            "ONLINE",
            "CONFIG",
            "MODELS",
            "P99 MS",
            "OFFLOAD",
            "LAST SEEN",
            "LAST UPDATE",
            "ROLLOUT",
            "AGREEMENT WITH CLOUD",
        ];
        let dash = || "-".to_owned();
        let rows: Vec<[String; 10]> = self
            .devices
            .values()
            .map(|d| {
                [
                    d.device_id.clone(),
                    match d.online {
                        Some(true) => "yes".into(),
                        Some(false) => "no".into(),
                        None => "?".into(),
                    },
                    d.config_version.clone().unwrap_or_else(|| "local".into()),
                    if d.models.is_empty() {
                        dash()
                    } else {
                        d.models.join(" ")
                    },
                    d.p99_ms.map_or_else(dash, |p| format!("{p:.1}")),
                    d.offload_share
                        .map_or_else(dash, |s| format!("{:.0} %", s * 100.0)),
                    d.last_seen_ms.map_or_else(dash, |t| {
                        format!("{} s ago", ((now_ms - t).max(0) as f64 / 1e3).round())
                    }),
                    d.last_update.clone().unwrap_or_else(dash),
                    if d.rollouts.is_empty() {
                        dash()
                    } else {
                        d.rollouts.join(", ")
                    },
                    if d.agreement.is_empty() {
                        dash()
                    } else {
                        d.agreement.join(", ")
                    },
                ]
            })
            .collect();
        let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
        for r in &rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |cells: Vec<&str>| {
            let mut s = String::new();
            for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
                if i + 1 == cells.len() {
                    s.push_str(c);
                } else {
                    s.push_str(&format!("{c:<w$}  "));
                }
            }
            s.trim_end().to_owned() + "\n"
        };
        let mut out = line(header.to_vec());
        for r in &rows {
            out.push_str(&line(r.iter().map(String::as_str).collect()));
        }
        if rows.is_empty() {
            out.push_str("(no devices heard from yet)\n");
        }
        out
    }
}

fn options(broker: SocketAddr, role: &str) -> rumqttc::v5::MqttOptions {
    crate::client::options(
        broker,
        format!("tether-fleet-{role}-{:x}", fastrand::u64(..)),
    )
}

/// Publishes `payload` retained at QoS 1 and returns once the broker has it. With `wait` (a
/// device's status topic, a version, how long), then waits for that device's outcome for that
/// version and returns it.
pub async fn push(
    broker: SocketAddr,
    topic: &str,
    payload: Vec<u8>,
    wait: Option<(String, u64, Duration)>,
) -> Result<Option<Value>, String> {
    let (client, mut eventloop) = AsyncClient::new(options(broker, "push"), 16);
    let reach = |e: String| format!("cannot reach the broker at {broker}: {e}");
    let mut published = false;
    let mut subscribed = wait.is_none();
    let work = async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => match &wait {
                    Some((status_topic, _, _)) => client
                        .subscribe(status_topic.clone(), QoS::AtLeastOnce)
                        .await
                        .map_err(|e| reach(e.to_string()))?,
                    None => client
                        .publish(topic, QoS::AtLeastOnce, true, payload.clone())
                        .await
                        .map_err(|e| reach(e.to_string()))?,
                },
                Ok(Event::Incoming(Packet::SubAck(_))) if !subscribed => {
                    subscribed = true;
                    client
                        .publish(topic, QoS::AtLeastOnce, true, payload.clone())
                        .await
                        .map_err(|e| reach(e.to_string()))?;
                }
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    published = true;
                    if wait.is_none() {
                        return Ok(None);
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if let Some((_, version, _)) = &wait
                        && published
                        && let Ok(v) = serde_json::from_slice::<Value>(&p.payload)
                        && v.get("version").and_then(Value::as_u64) == Some(*version)
                    {
                        return Ok(Some(v));
                    }
                }
                Ok(_) => {}
                Err(e) => return Err(reach(e.to_string())),
            }
        }
    };
    let limit = wait.as_ref().map_or(Duration::from_secs(10), |(_, _, t)| {
        *t + Duration::from_secs(5)
    });
    let out = tokio::time::timeout(limit, work).await.map_err(|_| {
        if published {
            format!(
                "published, but no status for this version within {} s: is the device online and does it trust the key?",
                limit.as_secs()
            )
        } else {
            format!("the broker at {broker} did not acknowledge the publish")
        }
    })?;
    let _ = client.try_disconnect();
    out
}

/// Listens for `listen`, folding every status and telemetry message into a board; calls
/// `each` with it every `refresh` (and once at the end).
pub async fn watch(
    broker: SocketAddr,
    prefix: &str,
    listen: Option<Duration>,
    refresh: Duration,
    mut each: impl FnMut(&Board),
) -> Result<Board, String> {
    let mut board = Board::new(prefix);
    let (client, mut eventloop) = AsyncClient::new(options(broker, "status"), 256);
    let filters = board.filters();
    let end = listen.map(|d| tokio::time::Instant::now() + d);
    let mut tick = tokio::time::interval(refresh);
    tick.tick().await;
    loop {
        let sleep_until = async {
            match end {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = sleep_until => break,
            _ = tick.tick(), if listen.is_none() => each(&board),
            ev = eventloop.poll() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    for f in &filters {
                        client
                            .subscribe(f.clone(), QoS::AtMostOnce)
                            .await
                            .map_err(|e| e.to_string())?;
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    board.ingest(&String::from_utf8_lossy(&p.topic), &p.payload);
                }
                Ok(_) => {}
                Err(e) => return Err(format!("cannot reach the broker at {broker}: {e}")),
            },
        }
    }
    let _ = client.try_disconnect();
    each(&board);
    Ok(board)
}

/// The document `text` with its `target` set: added when it names none, refused when it names
/// another. Leaves the text as written when nothing is added.
pub fn with_target(text: String, target: Option<&str>) -> Result<String, String> {
    let mut doc: Value =
        serde_json::from_str(&text).map_err(|e| format!("the document is not JSON: {e}"))?;
    let Some(object) = doc.as_object_mut() else {
        return Err("the document must be a JSON object".into());
    };
    match (object.get("target").and_then(Value::as_str), target) {
        (Some(t), Some(want)) if t != want => Err(format!(
            "the document names target `{t}`, not `{want}`; remove its `target` or sign it for `{t}`"
        )),
        (Some(_), _) => Ok(text),
        (None, Some(want)) => {
            object.insert("target".into(), Value::String(want.to_owned()));
            serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())
        }
        (None, None) => Err(
            "the document names no target: pass --target group/NAME or --target device/ID".into(),
        ),
    }
}

/// The topic a document for `group` or `device` goes to.
pub fn document_topic(prefix: &str, group: Option<&str>, device: Option<&str>) -> Option<String> {
    match (group, device) {
        (Some(g), None) => Some(DocTopics::group(prefix, g)),
        (None, Some(d)) => Some(DocTopics::device(prefix, d)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn the_board_folds_status_config_status_and_telemetry() {
        let mut b = Board::new("tether");
        b.ingest(
            "tether/pi-1/status",
            json!({"online": true, "config_version": null,
                   "models": [{"name": "digits", "version": "1"}, {"name": "vad", "version": "5"}]})
            .to_string()
            .as_bytes(),
        );
        b.ingest(
            "tether/pi-1/config/status",
            json!({"source": "device", "version": 4, "state": "rejected", "code": "bad_signature",
                   "config_version": "group/lab@2", "ts_ms": 1000})
            .to_string()
            .as_bytes(),
        );
        b.ingest(
            "tether/pi-1/telemetry",
            json!({"ts_ms": 5000, "config_version": "group/lab@2", "routes": {"cloud": 0.25},
                   "models": {"digits": {"p99_ms": 4.5}, "vad": {"p99_ms": 9.25}, "x": {"p99_ms": null}}})
            .to_string()
            .as_bytes(),
        );
        b.ingest(
            "tether/pi-1/quality",
            json!({"device_id": "pi-1", "ts_ms": 4000,
                   "models": {"digits": {"serving": "1.0.0", "versions": {
                       "1.0.0": {"audited": 400, "agreement": 0.975},
                       "1.1.0": {"audited": 0, "agreement": null}}}},
                   "rollouts": [{"id": "digits-1.1.0", "state": "running", "role": "shadow"}]})
            .to_string()
            .as_bytes(),
        );
        b.ingest("tether/pi-2/status", br#"{"online": false, "models": []}"#);
        b.ingest("tether/fleet/lab/config", b"{}");
        b.ingest("tether/pi-3/telemetry", b"not json");
        assert_eq!(b.devices.len(), 2);
        let r = &b.devices["pi-1"];
        assert_eq!(r.online, Some(true));
        assert_eq!(r.config_version.as_deref(), Some("group/lab@2"));
        assert_eq!(r.models, vec!["digits@1", "vad@5"]);
        assert_eq!(r.p99_ms, Some(9.25));
        assert_eq!(r.offload_share, Some(0.25));
        assert_eq!(r.last_seen_ms, Some(5000));
        assert_eq!(r.rollouts, vec!["digits-1.1.0 running shadow"]);
        assert_eq!(r.agreement, vec!["digits@1.0.0 97.5 % (400)"]);
        assert_eq!(
            r.last_update.as_deref(),
            Some("rejected device@4 (bad_signature)")
        );
        let table = b.render(7000);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(lines[0].starts_with("DEVICE"));
        assert!(
            lines[1].starts_with("pi-1")
                && lines[1].contains("25 %")
                && lines[1].contains("2 s ago"),
            "{table}"
        );
        assert!(
            lines[2].starts_with("pi-2") && lines[2].contains(" no "),
            "{table}"
        );
    }
}
