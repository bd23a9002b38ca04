//! The store seen from outside, through a real broker: answers from the result cache, a model
//! update that must never be answered from it, and a damaged database. The outbox across a
//! broker restart, a cut link and killed agents is in `mosquitto.rs` (rumqttd 0.20 does not
//! resume a persistent session reliably, so those faults run against Mosquitto).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{Requester, TestAgent, golden, golden_with, scratch_dir};
use serde_json::{Value, json};

const WITHIN: Duration = Duration::from_secs(20);

fn route(reply: &Value) -> &str {
    reply["parameters"]["route"].as_str().unwrap_or("?")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_request_is_answered_from_the_cache_unless_bypassed() {
    let agent = TestAgent::start("cache-dev", |_| {}).await;
    let mut req = Requester::connect(agent.v5_addr(), "cache").await;
    let topic = "tether/cache-dev/infer/digits";
    req.send(topic, &golden("digits"), b"1").await;
    let first = req.next(WITHIN).await.body;
    assert_eq!(route(&first), "local", "{first}");
    req.send(topic, &golden("digits"), b"2").await;
    let second = req.next(WITHIN).await.body;
    assert_eq!(route(&second), "cache", "{second}");
    assert_eq!(first["outputs"], second["outputs"]);
    assert_eq!(
        first["parameters"]["classes"],
        second["parameters"]["classes"]
    );
    assert_eq!(second["id"], first["id"], "the id is the request's");

    // `"cache": false` runs the model, and reply_to and the like do not change the key.
    req.send(topic, &golden_with("digits", json!({"cache": false})), b"3")
        .await;
    assert_eq!(route(&req.next(WITHIN).await.body), "local");
    req.send(
        topic,
        &golden_with("digits", json!({"budget_ms": 500})),
        b"4",
    )
    .await;
    assert_eq!(route(&req.next(WITHIN).await.body), "cache");
    // Another input is another key.
    let mut other: Value = serde_json::from_slice(&golden("digits")).unwrap();
    other["inputs"][0]["data"][10] = json!(0.5);
    req.send(topic, &serde_json::to_vec(&other).unwrap(), b"5")
        .await;
    assert_eq!(route(&req.next(WITHIN).await.body), "local");
    let counters = &agent.running.store.counters;
    assert_eq!(counters.cache_hits.load(Ordering::Relaxed), 2);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_can_be_left_out_of_the_cache() {
    let agent = TestAgent::start("nocache-dev", |raw| {
        raw.store.cache.models.insert(
            "digits".into(),
            agent::config::RawModelCache {
                enabled: Some(false),
                ttl_secs: None,
            },
        );
    })
    .await;
    let mut req = Requester::connect(agent.v5_addr(), "nocache").await;
    for i in 0..3u8 {
        req.send("tether/nocache-dev/infer/digits", &golden("digits"), &[i])
            .await;
        assert_eq!(route(&req.next(WITHIN).await.body), "local");
    }
    req.send(
        "tether/nocache-dev/infer/vibration",
        &golden("vibration"),
        b"v1",
    )
    .await;
    req.next(WITHIN).await;
    req.send(
        "tether/nocache-dev/infer/vibration",
        &golden("vibration"),
        b"v2",
    )
    .await;
    assert_eq!(
        route(&req.next(WITHIN).await.body),
        "cache",
        "other models still cache"
    );
    agent.stop().await;
}

/// A copy of the zoo whose digits device file is the cloud model: the same name, another
/// sha256 — a model update.
fn updated_zoo() -> std::path::PathBuf {
    let zoo = models::default_zoo_dir();
    let dir = scratch_dir("zoo");
    for entry in std::fs::read_dir(&zoo).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
        }
    }
    std::os::unix::fs::symlink(zoo.join("golden"), dir.join("golden")).unwrap();
    let manifest = std::fs::read_to_string(zoo.join("MANIFEST.toml")).unwrap();
    let mut doc: toml::Table = toml::from_str(&manifest).unwrap();
    let models = doc["model"].as_array_mut().unwrap();
    let digits = models
        .iter_mut()
        .find(|m| m["name"].as_str() == Some("digits"))
        .unwrap();
    let variants = digits["variants"].as_array_mut().unwrap();
    let cloud = variants
        .iter()
        .find(|v| v["variant"].as_str() == Some("cloud"))
        .unwrap()
        .clone();
    let device = variants
        .iter_mut()
        .find(|v| v["variant"].as_str() == Some("device"))
        .unwrap();
    for k in ["file", "sha256", "bytes", "parameters", "precision"] {
        device[k] = cloud[k].clone();
    }
    std::fs::write(dir.join("MANIFEST.toml"), toml::to_string(&doc).unwrap()).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_update_never_serves_an_old_result() {
    let db = scratch_dir("update").join("tether.db");
    let zoo = updated_zoo();
    let first_db = db.clone();
    let agent = TestAgent::start("update-dev", |raw| raw.store.path = Some(first_db)).await;
    let mut req = Requester::connect(agent.v5_addr(), "update").await;
    let topic = "tether/update-dev/infer/digits";
    req.send(topic, &golden("digits"), b"1").await;
    let old = req.next(WITHIN).await.body;
    req.send(topic, &golden("digits"), b"2").await;
    assert_eq!(route(&req.next(WITHIN).await.body), "cache");
    agent.stop().await;

    // Same database, same model name, new model file.
    let agent = TestAgent::start("update-dev", |raw| {
        raw.store.path = Some(db);
        raw.models_dir = Some(zoo.clone());
    })
    .await;
    let mut req = Requester::connect(agent.v5_addr(), "update2").await;
    req.send(topic, &golden("digits"), b"3").await;
    let new = req.next(WITHIN).await.body;
    assert_eq!(route(&new), "local", "a new model must run: {new}");
    assert_ne!(
        old["outputs"], new["outputs"],
        "the new model answers differently"
    );
    let expected: Value = serde_json::from_slice(
        &std::fs::read(models::default_zoo_dir().join("golden/digits.cloud.response.json"))
            .unwrap(),
    )
    .unwrap();
    let got = new["outputs"][0]["data"].as_array().unwrap();
    let want = expected["outputs"][0]["data"].as_array().unwrap();
    for (g, w) in got.iter().zip(want) {
        assert!(
            (g.as_f64().unwrap() - w.as_f64().unwrap()).abs() < 1e-4,
            "{g} vs {w}"
        );
    }
    req.send(topic, &golden("digits"), b"4").await;
    let again = req.next(WITHIN).await.body;
    assert_eq!(route(&again), "cache");
    assert_eq!(
        again["outputs"], new["outputs"],
        "the cache holds the new model's answer"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_database_is_moved_aside_and_the_agent_serves() {
    let dir = scratch_dir("damaged");
    let db = dir.join("tether.db");
    std::fs::write(
        &db,
        b"this is not a database, it is what a failing SD card left",
    )
    .unwrap();
    let path = db.clone();
    let agent = TestAgent::start("damaged-dev", |raw| raw.store.path = Some(path)).await;
    let mut req = Requester::connect(agent.v5_addr(), "damaged").await;
    req.send("tether/damaged-dev/infer/digits", &golden("digits"), b"1")
        .await;
    let reply = req.next(WITHIN).await.body;
    assert_eq!(reply["model_name"], "digits", "{reply}");
    agent.stop().await;
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().any(|n| n.starts_with("tether.db.corrupt-")),
        "{names:?}"
    );
    let fresh = inspects_cleanly(&db);
    assert_eq!(fresh, "ok");
}

/// "ok" when `tether-agent cache stats --db` opens the file (it runs `PRAGMA quick_check`), else its error.
fn inspects_cleanly(db: &std::path::Path) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tether-agent"))
        .args(["cache", "stats", "--json", "--db"])
        .arg(db)
        .output()
        .unwrap();
    if out.status.success() {
        "ok".into()
    } else {
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_routes_cache_hits_and_the_outbox() {
    let agent = TestAgent::start("metrics-dev", |raw| {
        raw.metrics.listen = Some("127.0.0.1:0".into());
    })
    .await;
    let addr = agent.running.metrics_addr.expect("metrics are served");
    let mut req = Requester::connect(agent.v5_addr(), "metrics").await;
    for i in 0..3u8 {
        req.send("tether/metrics-dev/infer/digits", &golden("digits"), &[i])
            .await;
        req.next(WITHIN).await;
    }
    let text = common::scrape(addr).await;
    for line in [
        r#"tether_agent_requests_total{route="local",reason="within_budget"} 1"#,
        r#"tether_agent_requests_total{route="cache",reason="cached"} 2"#,
        "tether_agent_cache_hits_total 2",
        "tether_agent_relay_circuit -1",
        "tether_agent_queue_depth 0",
    ] {
        assert!(text.contains(line), "`{line}` missing from:\n{text}");
    }
    assert!(
        text.contains("tether_agent_latency_seconds_bucket{"),
        "{text}"
    );
    assert!(text.contains("tether_agent_outbox_rows "), "{text}");
    agent.stop().await;
}
