//! Model rollouts end to end: three agents on one broker, a real relay (the cloud model and the
//! candidates' files), requests streaming from the digits test split, and the operator's
//! commands run as the `tether` binary. A worse candidate is rolled back and a better one
//! promoted fleet-wide, each decided by `tether fleet rollout status --wait --apply` on audited
//! samples alone: the test split's labels play no part in any decision.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../agent/tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use agent::config::RawConfig;
use common::{Requester, TestAgent, scratch_dir};
use serde_json::{Value, json};

fn cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(args)
        .output()
        .expect("tether runs")
}

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "tether failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

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
/// and remembers the model version of the latest.
struct Load {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<String>>,
}

impl Load {
    async fn start(addr: SocketAddr, devices: &[&str]) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let bodies = Arc::new(payloads());
        let mut tasks = Vec::new();
        for (d, device) in devices.iter().enumerate() {
            let mut r = Requester::connect(addr, &format!("load-{device}")).await;
            let (stop, answered, bodies) = (stop.clone(), answered.clone(), bodies.clone());
            let topic = format!("tether/{device}/infer/digits");
            tasks.push(tokio::spawn(async move {
                let mut i = d * 97;
                let mut version = String::new();
                while !stop.load(Ordering::Relaxed) {
                    let body = &bodies[i % bodies.len()];
                    r.send(&topic, body, &i.to_le_bytes()).await;
                    let reply = r.next(Duration::from_secs(10)).await;
                    assert!(reply.body.get("outputs").is_some(), "{}", reply.body);
                    version = reply.body["model_version"]
                        .as_str()
                        .unwrap_or("?")
                        .to_owned();
                    answered.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(4)).await;
                }
                version
            }));
        }
        Load {
            stop,
            answered,
            tasks,
        }
    }

    /// Stops the stream; returns each device's latest model version.
    async fn stop(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        let mut versions = Vec::new();
        for t in self.tasks {
            versions.push(t.await.unwrap());
        }
        versions
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
    let keys = scratch_dir("rollout-keys");
    let printed = ok(&cli(&[
        "fleet",
        "keygen",
        "--name",
        "ops",
        "--out",
        keys.to_str().unwrap(),
    ]));
    let public = printed
        .lines()
        .find_map(|l| l.strip_prefix("ops = \""))
        .and_then(|l| l.strip_suffix('"'))
        .unwrap()
        .to_owned();
    let key = keys.join("ops.key").to_str().unwrap().to_owned();
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
    let zoo = models::default_zoo_dir();
    let zoo = zoo.to_str().unwrap();
    let load = Load::start(addr, &devices).await;

    // 1. The worse candidate (trained on corrupted labels), shadowed by the canary group.
    let out = ok(&cli(&[
        "--models",
        zoo,
        "fleet",
        "rollout",
        "start",
        "--broker",
        &broker,
        "--group",
        "lab",
        "--model",
        "digits",
        "--version",
        "1.1.0",
        "--relay",
        &format!("http://{relay}"),
        "--cohort-group",
        "canary",
        "--min-samples",
        "300",
        "--margin",
        "0.03",
        "--key",
        &key,
    ]));
    let _ = out;
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
    let before = load.answered.load(Ordering::Relaxed);
    let (standing, took) = decide(&broker, &key).await;
    let answered = load.answered.load(Ordering::Relaxed) - before;
    eprintln!(
        "1.1.0: {} in {:.1} s over {answered} requests: serving {} ({}), candidate {} ({})",
        standing["verdict"]["verdict"],
        took.as_secs_f64(),
        standing["serving"]["audited"],
        standing["serving"]["agree"],
        standing["candidate"]["audited"],
        standing["candidate"]["agree"]
    );
    assert_eq!(standing["verdict"]["verdict"], "roll_back", "{standing:#}");
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
    ok(&cli(&[
        "--models",
        zoo,
        "fleet",
        "rollout",
        "start",
        "--broker",
        &broker,
        "--group",
        "lab",
        "--model",
        "digits",
        "--version",
        "1.2.0",
        "--relay",
        &format!("http://{relay}"),
        "--share",
        &share,
        "--min-samples",
        "300",
        "--margin",
        "0.03",
        "--key",
        &key,
    ]));
    let before = load.answered.load(Ordering::Relaxed);
    let (standing, took) = decide(&broker, &key).await;
    let answered = load.answered.load(Ordering::Relaxed) - before;
    eprintln!(
        "1.2.0: {} in {:.1} s over {answered} requests: serving {} ({}), candidate {} ({})",
        standing["verdict"]["verdict"],
        took.as_secs_f64(),
        standing["serving"]["audited"],
        standing["serving"]["agree"],
        standing["candidate"]["audited"],
        standing["candidate"]["agree"]
    );
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
    tokio::time::sleep(Duration::from_millis(500)).await;
    let versions = load.stop().await;
    assert_eq!(
        versions,
        vec!["1.2.0"; 3],
        "every device serves the promoted version"
    );

    // The fleet table shows each device's rollout and agreement.
    let table = ok(&cli(&[
        "fleet", "status", "--broker", &broker, "--once", "2",
    ]));
    assert!(table.contains("digits-1.2.0 promoted serve"), "{table}");
    assert!(table.contains("digits@1.0.0"), "{table}");

    for o in others {
        o.stop().await;
    }
    a.stop().await;
}
