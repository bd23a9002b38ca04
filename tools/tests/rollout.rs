//! Model rollouts end to end: three agents on one broker, a real relay (the cloud model and the
//! candidates' files), requests streaming from the digits test split, and the operator's
//! commands run as the `tether` binary. A worse candidate is rolled back and a better one
//! promoted fleet-wide, each decided by `tether fleet rollout status --wait --apply` on audited
//! samples alone: the test split's labels play no part in any decision.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../agent/tests/common/mod.rs"]
mod common;
mod operator;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent::config::RawConfig;
use common::{Requester, TestAgent, scratch_dir};
use operator::{cli, ok};
use serde_json::{Value, json};

/// Digits requests from the test split, uncached (a cached answer is not a local run).
fn payloads() -> Vec<Vec<u8>> {
    let manifest = models::Manifest::load(models::default_zoo_dir()).unwrap();
    let split = manifest
        .test_split(manifest.model("digits").unwrap())
        .unwrap();
    (0..split.len())
        .map(|i| {
            serde_json::to_vec(&json!({
                "parameters": {"cache": false},
                "inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                            "data": split.samples(i, i + 1)}],
            }))
            .unwrap()
        })
        .collect()
}

/// Streams requests to each device until stopped, one in flight per device; counts replies
/// and remembers, per device, the model version of its latest local answer.
struct Load {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    /// Per device: the version of its latest local answer since `forget` (a busy device sends
    /// some requests to the relay, whose cloud model has versions of its own).
    versions: Arc<Mutex<Vec<Option<String>>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    async fn start(addr: SocketAddr, devices: &[&str]) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let versions = Arc::new(Mutex::new(vec![None; devices.len()]));
        let bodies = Arc::new(payloads());
        let mut tasks = Vec::new();
        for (d, device) in devices.iter().enumerate() {
            let mut r = Requester::connect(addr, &format!("load-{device}")).await;
            let (stop, answered, bodies, versions) = (
                stop.clone(),
                answered.clone(),
                bodies.clone(),
                versions.clone(),
            );
            let topic = format!("tether/{device}/infer/digits");
            tasks.push(tokio::spawn(async move {
                let mut i = d * 97;
                while !stop.load(Ordering::Relaxed) {
                    let body = &bodies[i % bodies.len()];
                    r.send(&topic, body, &i.to_le_bytes()).await;
                    let reply = r.next(Duration::from_secs(10)).await;
                    assert!(reply.body.get("outputs").is_some(), "{}", reply.body);
                    if reply.body["parameters"]["route"] == "local" {
                        let version = reply.body["model_version"].as_str().unwrap_or("?");
                        versions.lock().unwrap()[d] = Some(version.to_owned());
                    }
                    answered.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(4)).await;
                }
            }));
        }
        Load {
            stop,
            answered,
            versions,
            tasks,
        }
    }

    /// Forgets the versions seen so far; then waits (up to `within`) until every device has
    /// answered locally again, and returns each one's version.
    async fn fresh_versions(&self, within: Duration) -> Vec<Option<String>> {
        self.versions.lock().unwrap().fill(None);
        let until = Instant::now() + within;
        loop {
            let seen = self.versions.lock().unwrap().clone();
            if seen.iter().all(Option::is_some) || Instant::now() > until {
                return seen;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
    }
}

/// Where the rollouts go: the broker, the relay serving the candidates, the zoo, the key.
struct Fleet {
    broker: String,
    relay: String,
    zoo: String,
    key: String,
}

impl Fleet {
    /// `tether fleet rollout start` of the zoo's candidate `version` of digits, with `cohort`'s
    /// flags, 300 audited samples a side and a margin of 3 points.
    fn start(&self, version: &str, cohort: &[&str]) {
        let mut args = vec![
            "--models",
            &self.zoo,
            "fleet",
            "rollout",
            "start",
            "--broker",
            &self.broker,
            "--group",
            "lab",
            "--model",
            "digits",
            "--version",
            version,
            "--relay",
            &self.relay,
            "--min-samples",
            "300",
            "--margin",
            "0.03",
            "--key",
            &self.key,
        ];
        args.extend_from_slice(cohort);
        ok(&cli(&args));
    }

    /// `status --wait --apply` while `load` runs: the standing it decided on, printed with
    /// the time it took and the requests answered meanwhile.
    async fn decide(&self, load: &Load, what: &str) -> Value {
        let before = load.answered.load(Ordering::Relaxed);
        let (standing, took) = decide(&self.broker, &self.key).await;
        let answered = load.answered.load(Ordering::Relaxed) - before;
        eprintln!(
            "{what}: {} in {:.1} s over {answered} requests: serving {} ({}), candidate {} ({})",
            standing["verdict"]["verdict"],
            took.as_secs_f64(),
            standing["serving"]["audited"],
            standing["serving"]["agree"],
            standing["candidate"]["audited"],
            standing["candidate"]["agree"]
        );
        standing
    }
}

/// Runs `tether fleet rollout status --wait --apply --json` off the runtime; returns the
/// standing it decided on and how long it took.
async fn decide(broker: &str, key: &str) -> (Value, Duration) {
    let (broker, key) = (broker.to_owned(), key.to_owned());
    let started = Instant::now();
    let out = tokio::task::spawn_blocking(move || {
        cli(&[
            "fleet", "rollout", "status", "--broker", &broker, "--group", "lab", "--wait", "240",
            "--apply", "--key", &key, "--json", "--listen", "1",
        ])
    })
    .await
    .unwrap();
    let standing: Value = serde_json::from_str(&ok(&out)).unwrap();
    (standing, started.elapsed())
}

/// Waits until every device's quality report shows `check`.
async fn reports_show(addr: SocketAddr, devices: &[&str], check: impl Fn(&Value) -> bool) {
    let mut seen = common::subscribe(addr, "tether/+/quality").await;
    let mut ok: std::collections::BTreeSet<String> = Default::default();
    let deadline = Instant::now() + Duration::from_secs(30);
    while ok.len() < devices.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let s = tokio::time::timeout(left, seen.recv())
            .await
            .expect("the devices report within 30 s")
            .unwrap();
        let id = s.body["device_id"].as_str().unwrap_or("").to_owned();
        if check(&s.body) {
            ok.insert(id);
        } else {
            ok.remove(&id);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worse_candidate_is_rolled_back_and_a_better_one_promoted_on_audits_alone() {
    let (relay, _relay_stop) = common::relay().await;
    let (public, key) = operator::keygen(&scratch_dir("rollout-keys"));
    let key = key.to_str().unwrap().to_owned();
    let relay_url = format!("http://{relay}");
    let configure = move |raw: &mut RawConfig, groups: &[&str]| {
        raw.fleet.keys.insert("ops".into(), public.clone());
        raw.fleet.groups = groups.iter().map(|g| (*g).to_owned()).collect();
        raw.fleet.telemetry_interval_secs = 1;
        raw.fleet.allow_http = true;
        raw.fleet.models_dir = Some(scratch_dir("rollout-models"));
        raw.relay = Some(agent::config::RawRelay::new(relay_url.clone()));
        raw.policy.models.insert(
            "digits".into(),
            agent::config::RawModelPolicy {
                audit_rate: Some(0.5),
                ..Default::default()
            },
        );
        raw.policy.audit_max_per_s = 200.0;
        // Three agents, a relay and their requesters share this machine's cores: at the
        // default 95 % the devices would send their work to the relay (and audit nothing)
        // whenever a busy CI machine peaks. Holding back under load is tested in the pipeline.
        raw.policy.cpu_limit_percent = 100.0;
        raw.metrics.listen = Some("127.0.0.1:0".into());
    };
    // ro-a is also in the `canary` group: the first rollout's cohort.
    let c = configure.clone();
    let a = TestAgent::start("ro-a", move |raw| c(raw, &["lab", "canary"])).await;
    let addr = a.v5_addr();
    let broker = format!("mqtt://{addr}");
    let mut others = Vec::new();
    for id in ["ro-b", "ro-c"] {
        let c = configure.clone();
        others.push(
            TestAgent::start(id, move |raw| {
                c(raw, &["lab"]);
                raw.embedded_broker = None;
                raw.mqtt.broker = format!("mqtt://{addr}");
            })
            .await,
        );
    }
    let devices = ["ro-a", "ro-b", "ro-c"];

    let fleet = Fleet {
        broker: broker.clone(),
        relay: format!("http://{relay}"),
        zoo: models::default_zoo_dir().to_str().unwrap().to_owned(),
        key: key.clone(),
    };
    let load = Load::start(addr, &devices).await;

    // 1. The worse candidate (trained on corrupted labels), shadowed by the canary group.
    fleet.start("1.1.0", &["--cohort-group", "canary"]);
    reports_show(addr, &devices, |r| {
        let role = r["rollouts"][0]["role"].as_str().unwrap_or("");
        let want = if r["device_id"] == "ro-a" {
            "shadow"
        } else {
            "none"
        };
        role == want && r["rollouts"][0]["id"] == "digits-1.1.0"
    })
    .await;
    let standing = fleet.decide(&load, "1.1.0").await;
    assert_eq!(standing["verdict"]["verdict"], "roll_back", "{standing:#}");
    // What an operator reads (the document is rolled back by now; the counts are the ones decided on).
    let text = ok(&cli(&[
        "fleet", "rollout", "status", "--broker", &broker, "--group", "lab", "--listen", "1",
    ]));
    eprintln!("{text}");
    assert!(text.contains("Verdict: roll back 1.1.0"), "{text}");
    assert!(standing["candidate"]["audited"].as_u64().unwrap() >= 300);
    assert!(standing["serving"]["audited"].as_u64().unwrap() >= 300);
    // The rollback reaches the cohort: nobody shadows 1.1.0 any more.
    reports_show(addr, &devices, |r| {
        r["rollouts"][0]["state"] == "rolled_back"
            && r["rollouts"][0]["role"] == "none"
            && r["models"]["digits"]["shadow"].is_null()
    })
    .await;

    // 2. The better candidate, to a share of the devices picked by hash: a share between the
    // lowest and the highest point puts at least one device in and one out.
    let points: Vec<f64> = devices
        .iter()
        .map(|d| agent::rollout::cohort_point("digits-1.2.0", d))
        .collect();
    let lo = points.iter().copied().fold(f64::MAX, f64::min);
    let hi = points.iter().copied().fold(f64::MIN, f64::max);
    let share = format!("{}", (lo + hi) / 2.0);
    fleet.start("1.2.0", &["--share", &share]);
    let standing = fleet.decide(&load, "1.2.0").await;
    assert_eq!(standing["verdict"]["verdict"], "promote", "{standing:#}");
    let cohort: Vec<bool> = standing["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["in_cohort"].as_bool().unwrap())
        .collect();
    assert!(
        cohort.contains(&true) && cohort.contains(&false),
        "{cohort:?}"
    );
    // Promoted: every device answers with 1.2.0.
    reports_show(addr, &devices, |r| {
        r["models"]["digits"]["serving"] == "1.2.0" && r["rollouts"][0]["state"] == "promoted"
    })
    .await;
    // Answers from before the switch may still be on their way: then only local answers that
    // come after it count.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Each device's own report says 1.2.0 (above); its answers must agree. A device whose CPU
    // reads at its limit sends every request to the relay and answers nothing locally: with
    // three CPU-bound processes beside the tests one device did so for 30 s. Its answers then
    // say nothing either way, so only the devices that answered locally are held to it.
    let versions = load.fresh_versions(Duration::from_secs(30)).await;
    load.stop().await;
    let answered: Vec<&String> = versions.iter().flatten().collect();
    assert!(
        !answered.is_empty() && answered.iter().all(|v| *v == "1.2.0"),
        "every device that answers locally serves the promoted version (None: no local answer from it within 30 s): {versions:?}"
    );

    // The fleet table shows each device's rollout and agreement.
    let table = ok(&cli(&[
        "fleet", "status", "--broker", &broker, "--once", "2",
    ]));
    eprintln!("{table}");
    let mut reports = common::subscribe(addr, "tether/ro-a/quality").await;
    let report = tokio::time::timeout(Duration::from_secs(10), reports.recv())
        .await
        .unwrap()
        .unwrap();
    eprintln!("{}", report.body);
    assert!(table.contains("digits-1.2.0 promoted serve"), "{table}");
    assert!(table.contains("digits@1.0.0"), "{table}");
    // Audits and shadow runs are on each device's /metrics too.
    let metrics = common::scrape(a.running.metrics_addr.unwrap()).await;
    for family in [
        "tether_agent_audits_total{outcome=\"ok\"} ",
        "tether_agent_shadow_runs_total{outcome=\"ok\"} ",
    ] {
        let n: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(family))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {family} in {metrics}"));
        assert!(n > 0.0, "{family}{n}");
    }

    for o in others {
        o.stop().await;
    }
    a.stop().await;
}
