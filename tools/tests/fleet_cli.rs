//! The fleet operator's commands run as a binary against two real agents on the embedded
//! broker: `tether fleet keygen`, `sign`, `push --wait-secs` and `status`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../agent/tests/common/mod.rs"]
mod common;
mod operator;

use std::time::Duration;

use agent::config::RawConfig;
use common::{Requester, TestAgent, scratch_dir};
use serde_json::Value;

use operator::cli;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_operator_cli_signs_pushes_and_shows_two_agents() {
    let keys = scratch_dir("fleet-cli");
    let (public, _) = operator::keygen(&keys);
    let trust = move |raw: &mut RawConfig| {
        raw.fleet.keys.insert("ops".into(), public.clone());
        raw.fleet.telemetry_interval_secs = 1;
    };
    let a = TestAgent::start("cli-a", trust.clone()).await;
    let addr = a.v5_addr();
    let broker = format!("mqtt://{addr}");
    let b = TestAgent::start("cli-b", move |raw| {
        trust(raw);
        raw.embedded_broker = None;
        raw.mqtt.broker = format!("mqtt://{addr}");
    })
    .await;

    let doc = keys.join("doc.json");
    std::fs::write(
        &doc,
        r#"{"version": 5, "policy": {"default_budget_ms": 250}}"#,
    )
    .unwrap();
    let env = keys.join("doc.signed.json");
    let key = keys.join("ops.key");
    // A document names where it may be applied: without --target (and no `target` in it)
    // nothing is signed.
    let out = cli(&[
        "fleet",
        "sign",
        "--key",
        key.to_str().unwrap(),
        doc.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--target"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&[
        "fleet",
        "sign",
        "--key",
        key.to_str().unwrap(),
        "--target",
        "device/cli-a",
        doc.to_str().unwrap(),
        "--out",
        env.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Signed for cli-a: the CLI will not push it to cli-b (and cli-b would refuse it).
    let out = cli(&[
        "fleet",
        "push",
        "--broker",
        &broker,
        "--device",
        "cli-b",
        env.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("was signed for `device/cli-a`"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let broker2 = broker.clone();
    let env2 = env.clone();
    let out = tokio::task::spawn_blocking(move || {
        cli(&[
            "fleet",
            "push",
            "--broker",
            &broker2,
            "--device",
            "cli-a",
            "--wait-secs",
            "15",
            env2.to_str().unwrap(),
        ])
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["state"], "applied", "{status}");

    // Traffic on both while the operator looks, so telemetry has latencies.
    let traffic_stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut traffic = Vec::new();
    for id in ["cli-a", "cli-b"] {
        let stop = traffic_stop.clone();
        let mut r = Requester::connect(addr, &format!("{id}-r")).await;
        traffic.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                r.answered_budget(id).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
    }
    let broker3 = broker.clone();
    let out = tokio::task::spawn_blocking(move || {
        cli(&[
            "fleet", "status", "--broker", &broker3, "--once", "2.5", "--json",
        ])
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    traffic_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in traffic {
        t.await.unwrap();
    }
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let row = |id: &str| {
        rows.iter()
            .find(|r| r["device_id"] == id)
            .unwrap_or_else(|| panic!("{id} missing from {rows:?}"))
            .clone()
    };
    let (ra, rb) = (row("cli-a"), row("cli-b"));
    assert_eq!(ra["online"], true);
    assert_eq!(rb["online"], true);
    assert_eq!(ra["config_version"], "device@5", "{ra}");
    assert!(rb["config_version"].is_null(), "{rb}");
    assert_eq!(ra["last_update"], "applied device@5", "{ra}");
    for r in [&ra, &rb] {
        let models: Vec<&str> = r["models"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(
            models.contains(&"digits@1.0.0") && models.contains(&"vad@6.2.3"),
            "{r}"
        );
        assert!(
            r["p99_ms"].as_f64().is_some_and(|p| p > 0.0),
            "telemetry p99: {r}"
        );
        assert_eq!(r["offload_share"], 0.0, "{r}");
        assert!(r["last_seen_ms"].as_i64().is_some(), "{r}");
    }
    // The table form: a header and one line per device.
    let out = tokio::task::spawn_blocking(move || {
        cli(&["fleet", "status", "--broker", &broker, "--once", "1.5"])
    })
    .await
    .unwrap();
    let table = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("DEVICE"), "{table}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("cli-a") && l.contains("device@5")),
        "{table}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("cli-b") && l.contains("local")),
        "{table}"
    );
    b.stop().await;
    a.stop().await;
}
