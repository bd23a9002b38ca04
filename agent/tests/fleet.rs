//! Fleet updates end to end: real agents on the embedded broker, documents signed with a real
//! key, model files served by a real relay over HTTP. (The operator CLI: `tools/tests/fleet_cli.rs`.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use agent::config::RawConfig;
use agent::fleet::envelope::SigningKey;
use common::{Requester, TestAgent, relay, scratch_dir};
use models::{Manifest, Variant};
use rumqttc::v5::mqttbytes::QoS;
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// An operator's key, and the agent.toml line that trusts it.
struct Operator {
    key: SigningKey,
    public: String,
}

impl Operator {
    fn new(name: &str) -> Operator {
        let dir = scratch_dir("operator");
        let (pem, public) = SigningKey::generate().unwrap();
        let path = dir.join(format!("{name}.key"));
        std::fs::write(&path, pem).unwrap();
        Operator {
            key: SigningKey::load(&path, name.into()).unwrap(),
            public,
        }
    }

    /// `doc` signed for `target` (`group/NAME` or `device/ID`).
    fn sign(&self, target: &str, doc: &Value) -> Vec<u8> {
        let mut doc = doc.clone();
        doc["target"] = json!(target);
        serde_json::to_vec(&self.key.sign(doc.to_string())).unwrap()
    }

    fn trust(&self, raw: &mut RawConfig) {
        raw.fleet
            .keys
            .insert(self.key.name.clone(), self.public.clone());
    }
}

fn zoo() -> Manifest {
    Manifest::load(models::default_zoo_dir()).unwrap()
}

/// A model entry for `name` that installs `file_of`'s `variant` file from the relay.
fn artifact(relay: SocketAddr, file_of: &str, variant: Variant, version: &str) -> Value {
    let zoo = zoo();
    let spec = zoo.model(file_of).unwrap();
    let file = spec.variant(variant).unwrap();
    json!({
        "version": version,
        "sha256": file.sha256,
        "bytes": file.bytes,
        "url": format!(
            "http://{relay}/v2/models/{file_of}/versions/{}/artifact?variant={}",
            spec.version,
            variant.as_str()
        ),
    })
}

/// Publishes retained, QoS 1, and returns once the broker has it.
async fn publish(addr: SocketAddr, topic: &str, payload: Vec<u8>) {
    common::publish_retained(addr, topic, payload).await;
}

/// Everything published on one device's configuration status topic from now on.
struct Statuses(mpsc::UnboundedReceiver<common::Seen>);

impl Statuses {
    async fn watch(addr: SocketAddr, device: &str) -> Statuses {
        Statuses(common::subscribe(addr, &format!("tether/{device}/config/status")).await)
    }

    async fn next(&mut self) -> Value {
        loop {
            let seen = tokio::time::timeout(Duration::from_secs(20), self.0.recv())
                .await
                .expect("a configuration status within 20 s")
                .unwrap();
            // A retained copy of an earlier outcome is not news.
            if !seen.retained {
                return seen.body;
            }
        }
    }
}

fn fleet_agent(
    op: &Operator,
    models_dir: &Path,
    tweak: impl FnOnce(&mut RawConfig),
) -> impl FnOnce(&mut RawConfig) {
    let public = op.public.clone();
    let name = op.key.name.clone();
    let models_dir = models_dir.to_path_buf();
    move |raw: &mut RawConfig| {
        raw.fleet.keys.insert(name, public);
        raw.fleet.models_dir = Some(models_dir);
        raw.fleet.health_window_secs = 2;
        raw.fleet.health_requests = 5;
        // The test relay serves artifacts over plain http.
        raw.fleet.allow_http = true;
        tweak(raw);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn groups_and_device_documents_apply_and_every_rejection_keeps_the_running_config() {
    let (relay, _relay_stop) = relay().await;
    let op = Operator::new("ops");
    let stranger = Operator::new("ops2");
    let dir = scratch_dir("fleet-models");
    let agent = TestAgent::start(
        "fleet-1",
        fleet_agent(&op, &dir, |raw| raw.fleet.groups = vec!["lab".into()]),
    )
    .await;
    let addr = agent.v5_addr();
    let mut statuses = Statuses::watch(addr, "fleet-1").await;
    let mut r = Requester::connect(addr, "fleet-1").await;
    assert_eq!(r.answered_budget("fleet-1").await, 1000);

    // The group's document, then the device's, which overrides it.
    publish(
        addr,
        "tether/fleet/lab/config",
        op.sign(
            "group/lab",
            &json!({"version": 1, "policy": {"default_budget_ms": 300},
                        "store": {"cache": {"ttl_secs": 30}}}),
        ),
    )
    .await;
    let s = statuses.next().await;
    assert_eq!(
        (
            s["state"].as_str(),
            s["source"].as_str(),
            s["version"].as_u64()
        ),
        (Some("applied"), Some("group/lab"), Some(1)),
        "{s}"
    );
    assert_eq!(r.answered_budget("fleet-1").await, 300);
    publish(
        addr,
        "tether/fleet-1/config",
        op.sign(
            "device/fleet-1",
            &json!({"version": 2, "policy": {"default_budget_ms": 500}}),
        ),
    )
    .await;
    let s = statuses.next().await;
    assert_eq!(s["state"], "applied", "{s}");
    assert_eq!(s["config_version"], "group/lab@1 device@2", "{s}");
    assert_eq!(r.answered_budget("fleet-1").await, 500);
    assert_eq!(
        agent.running.live.get().cache.ttl,
        Duration::from_secs(30),
        "the group's cache setting stands under the device's document"
    );

    let digits_fp32 = artifact(relay, "digits", Variant::Source, "2");
    let mut wrong_sha = digits_fp32.clone();
    wrong_sha["sha256"] = json!("ab".repeat(32));
    let mut tampered: Value = serde_json::from_slice(&op.sign(
        "device/fleet-1",
        &json!({"version": 9, "log_level": "debug"}),
    ))
    .unwrap();
    tampered["payload"] = json!(
        tampered["payload"]
            .as_str()
            .unwrap()
            .replace("debug", "trace")
    );
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("bad_signature", serde_json::to_vec(&tampered).unwrap()),
        (
            "unknown_key",
            stranger.sign(
                "device/fleet-1",
                &json!({"version": 10, "policy": {"default_budget_ms": 9}}),
            ),
        ),
        (
            "not_signed",
            json!({"version": 11, "policy": {"default_budget_ms": 9}})
                .to_string()
                .into_bytes(),
        ),
        (
            "stale_version",
            op.sign(
                "device/fleet-1",
                &json!({"version": 2, "policy": {"default_budget_ms": 9}}),
            ),
        ),
        (
            // A group's document replayed on the device's topic, and another device's.
            "wrong_target",
            op.sign(
                "group/lab",
                &json!({"version": 50, "policy": {"default_budget_ms": 9}}),
            ),
        ),
        (
            "wrong_target",
            op.sign(
                "device/fleet-2",
                &json!({"version": 51, "policy": {"default_budget_ms": 9}}),
            ),
        ),
        (
            "invalid",
            op.sign(
                "device/fleet-1",
                &json!({"version": 12, "policy": {"headroom": 3.0, "default_budget_ms": 9}}),
            ),
        ),
        (
            "download_failed",
            op.sign(
                "device/fleet-1",
                &json!({"version": 13, "policy": {"default_budget_ms": 9}, "models": {"digits": {
                "version": "2", "sha256": "cd".repeat(32), "bytes": 1000,
                "url": "http://127.0.0.1:9/digits.onnx"}}}),
            ),
        ),
        (
            "checksum_mismatch",
            op.sign(
                "device/fleet-1",
                &json!({"version": 14, "policy": {"default_budget_ms": 9},
                            "models": {"digits": wrong_sha}}),
            ),
        ),
    ];
    for (code, payload) in cases {
        publish(addr, "tether/fleet-1/config", payload).await;
        let s = statuses.next().await;
        assert_eq!(s["state"], "rejected", "{code}: {s}");
        assert_eq!(s["code"], code, "{s}");
        assert!(
            s["error"].as_str().is_some_and(|e| e.len() > 20),
            "{code}: a sentence: {s}"
        );
        assert_eq!(s["config_version"], "group/lab@1 device@2", "{code}: {s}");
        // Still serving, on the configuration in force.
        assert_eq!(r.answered_budget("fleet-1").await, 500, "{code}");
    }
    // The model files of refused documents are not left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_signed_rollback_replaces_the_version_it_names_and_cannot_be_replayed() {
    let op = Operator::new("ops");
    let dir = scratch_dir("fleet-rollback");
    let agent = TestAgent::start("fleet-rb", fleet_agent(&op, &dir, |_| {})).await;
    let addr = agent.v5_addr();
    let mut statuses = Statuses::watch(addr, "fleet-rb").await;
    let mut r = Requester::connect(addr, "fleet-rb").await;
    let topic = "tether/fleet-rb/config";
    let mut push = async |doc: Value| {
        publish(addr, topic, op.sign("device/fleet-rb", &doc)).await;
        statuses.next().await
    };
    let s = push(json!({"version": 1, "policy": {"default_budget_ms": 111}})).await;
    assert_eq!(s["state"], "applied", "{s}");
    let s = push(json!({"version": 2, "policy": {"default_budget_ms": 222}})).await;
    assert_eq!(s["state"], "applied", "{s}");
    assert_eq!(r.answered_budget("fleet-rb").await, 222);
    let rollback = json!({"version": 1, "rollback": true, "rollback_from": 2,
                          "policy": {"default_budget_ms": 111}});
    let s = push(rollback.clone()).await;
    assert_eq!(s["state"], "applied", "{s}");
    assert_eq!(s["config_version"], "device@1", "{s}");
    assert_eq!(r.answered_budget("fleet-rb").await, 111);
    // The old version 2 cannot come back, and a new version must be above 2.
    let s = push(json!({"version": 2, "policy": {"default_budget_ms": 999}})).await;
    assert_eq!(s["code"], "stale_version", "{s}");
    let s = push(json!({"version": 3, "policy": {"default_budget_ms": 333}})).await;
    assert_eq!(s["state"], "applied", "{s}");
    // The rollback, replayed now, replaces nothing.
    let s = push(rollback).await;
    assert_eq!(s["code"], "stale_version", "{s}");
    assert!(
        s["error"].as_str().unwrap().contains("replaces version 2"),
        "{s}"
    );
    assert_eq!(r.answered_budget("fleet-rb").await, 333);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_download_that_would_fill_the_disk_is_refused() {
    let (relay, _relay_stop) = relay().await;
    let op = Operator::new("ops");
    let dir = scratch_dir("fleet-full");
    let agent = TestAgent::start(
        "fleet-full",
        fleet_agent(&op, &dir, |raw| raw.fleet.reserve_bytes = u64::MAX / 4),
    )
    .await;
    let addr = agent.v5_addr();
    let mut statuses = Statuses::watch(addr, "fleet-full").await;
    publish(
        addr,
        "tether/fleet-full/config",
        op.sign("device/fleet-full", &json!({"version": 1, "models": {"digits": artifact(relay, "digits", Variant::Source, "2")}})),
    )
    .await;
    let s = statuses.next().await;
    assert_eq!(
        (s["state"].as_str(), s["code"].as_str()),
        (Some("rejected"), Some("no_space")),
        "{s}"
    );
    assert!(
        s["error"].as_str().unwrap().contains("not enough disk"),
        "{s}"
    );
    let mut r = Requester::connect(addr, "fleet-full").await;
    assert_eq!(r.answered_budget("fleet-full").await, 1000);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_model_update_hot_swaps_under_load_and_a_bad_model_rolls_back() {
    let (relay, _relay_stop) = relay().await;
    let op = Operator::new("ops");
    let dir = scratch_dir("fleet-swap");
    let agent = TestAgent::start("fleet-swap", fleet_agent(&op, &dir, |_| {})).await;
    let addr = agent.v5_addr();
    let mut statuses = Statuses::watch(addr, "fleet-swap").await;
    let mut r = Requester::connect(addr, "fleet-swap").await;
    let zoo = zoo();
    let int8 = zoo
        .model("digits")
        .unwrap()
        .variant(Variant::Device)
        .unwrap()
        .sha256
        .clone();
    let fp32 = zoo
        .model("digits")
        .unwrap()
        .variant(Variant::Source)
        .unwrap()
        .sha256
        .clone();

    // A steady stream of requests, with the update published in the middle of it.
    let topic = "tether/fleet-swap/infer/digits";
    // Past the cache: every request runs a model.
    let body = common::golden_with("digits", json!({"cache": false}));
    let total = 400;
    let sender = {
        let client = r.client.clone();
        let reply_topic = r.reply_topic.clone();
        tokio::spawn(async move {
            for i in 0..total {
                let props = rumqttc::v5::mqttbytes::v5::PublishProperties {
                    response_topic: Some(reply_topic.clone()),
                    correlation_data: Some(format!("{i}").into_bytes().into()),
                    ..Default::default()
                };
                client
                    .publish_with_properties(topic, QoS::AtLeastOnce, false, body.clone(), props)
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    publish(
        addr,
        "tether/fleet-swap/config",
        op.sign("device/fleet-swap", &json!({"version": 1, "models": {"digits": artifact(relay, "digits", Variant::Source, "2")}})),
    )
    .await;
    let replies = r.collect(total, Duration::from_secs(60)).await;
    sender.await.unwrap();
    assert_eq!(replies.len(), total, "every request answered once");
    let mut versions = std::collections::BTreeMap::<String, usize>::new();
    for (id, rs) in &replies {
        let b = &rs[0].body;
        assert!(
            b.get("error").is_none(),
            "request {id:?} failed during the swap: {b}"
        );
        assert_eq!(b["outputs"][0]["shape"], json!([4, 10]), "{b}");
        *versions
            .entry(b["model_version"].as_str().unwrap_or("?").to_owned())
            .or_default() += 1;
    }
    let s = statuses.next().await;
    assert_eq!(s["state"], "applied", "{s}");
    assert!(
        versions.get("2").copied().unwrap_or(0) > 0
            && versions.get("1.0.0").copied().unwrap_or(0) > 0,
        "answers from both versions across the switch: {versions:?}"
    );
    let live = agent.running.live.get();
    assert_eq!(live.engine.model("digits").unwrap().sha256(), fp32);
    assert_ne!(fp32, int8);
    drop(live);

    // A "digits" update whose file is the vibration model: it loads (same input name and
    // type) but every request fails on it, so the health check rolls it back.
    let bad = artifact(relay, "vibration", Variant::Device, "3");
    publish(
        addr,
        "tether/fleet-swap/config",
        op.sign(
            "device/fleet-swap",
            &json!({"version": 2, "models": {"digits": bad}}),
        ),
    )
    .await;
    let s = statuses.next().await;
    assert_eq!(
        (s["state"].as_str(), s["version"].as_u64()),
        (Some("applied"), Some(2)),
        "{s}"
    );
    // Junk on the configuration topic while the health check runs (anyone with publish
    // rights can send it): refused, and it neither cuts the check short nor changes the
    // retained status.
    publish(
        addr,
        "tether/fleet-swap/config",
        b"{\"not\": \"a signed document\"}".to_vec(),
    )
    .await;
    let s = statuses.next().await;
    assert_eq!(s["code"], "not_signed", "{s}");
    let uncached = common::golden_with("digits", json!({"cache": false}));
    let mut failed = 0;
    for i in 0..5 {
        r.send(topic, &uncached, format!("bad-{i}").as_bytes())
            .await;
        let reply = r.next(Duration::from_secs(10)).await;
        failed += usize::from(reply.body.get("error").is_some());
    }
    assert!(failed >= 3, "the bad model fails requests: {failed} of 5");
    let s = statuses.next().await;
    assert_eq!(
        (
            s["state"].as_str(),
            s["code"].as_str(),
            s["version"].as_u64()
        ),
        (Some("rolled_back"), Some("unhealthy"), Some(2)),
        "{s}"
    );
    assert_eq!(s["config_version"], "device@1", "{s}");
    assert_eq!(
        agent
            .running
            .live
            .get()
            .engine
            .model("digits")
            .unwrap()
            .sha256(),
        fp32
    );
    r.send(topic, &uncached, b"after-2").await;
    let reply = r.next(Duration::from_secs(10)).await;
    assert_eq!(reply.body["model_version"], "2", "{}", reply.body);

    // A "digits" update whose file is the VAD model (three inputs): it does not load, so
    // nothing switches and the device reports the rollback at once.
    publish(
        addr,
        "tether/fleet-swap/config",
        op.sign("device/fleet-swap", &json!({"version": 3, "models": {"digits": artifact(relay, "vad", Variant::Device, "4")}})),
    )
    .await;
    let s = statuses.next().await;
    assert_eq!(
        (
            s["state"].as_str(),
            s["code"].as_str(),
            s["version"].as_u64()
        ),
        (Some("rolled_back"), Some("model_load_failed"), Some(3)),
        "{s}"
    );
    assert_eq!(s["config_version"], "device@1", "{s}");
    r.send(topic, &uncached, b"after-3").await;
    let reply = r.next(Duration::from_secs(10)).await;
    assert_eq!(reply.body["model_version"], "2", "{}", reply.body);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_without_a_broker_comes_back_on_the_persisted_configuration() {
    let (relay, relay_stop) = relay().await;
    let op = Operator::new("ops");
    let dir = scratch_dir("fleet-persist");
    let db = scratch_dir("fleet-persist-db").join("tether.db");
    let db2 = db.clone();
    let agent = TestAgent::start(
        "fleet-persist",
        fleet_agent(&op, &dir, move |raw| {
            raw.store.path = Some(db2);
            raw.fleet.health_requests = 3;
        }),
    )
    .await;
    let addr = agent.v5_addr();
    let mut statuses = Statuses::watch(addr, "fleet-persist").await;
    publish(
        addr,
        "tether/fleet-persist/config",
        op.sign(
            "device/fleet-persist",
            &json!({"version": 3, "policy": {"default_budget_ms": 777},
                        "models": {"digits": artifact(relay, "digits", Variant::Source, "2")}}),
        ),
    )
    .await;
    assert_eq!(statuses.next().await["state"], "applied");
    // Three healthy runs make it the last good configuration.
    let mut r = Requester::connect(addr, "fleet-persist").await;
    for _ in 0..3 {
        assert_eq!(r.answered_budget("fleet-persist").await, 777);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    agent.stop().await;
    let _ = relay_stop.send(());

    // No broker (a port nobody listens on), no relay: only the database.
    let mut raw = RawConfig {
        device_id: Some("fleet-persist".into()),
        models_dir: Some(models::default_zoo_dir()),
        ..RawConfig::default()
    };
    raw.store.path = Some(db);
    raw.mqtt.broker = "mqtt://127.0.0.1:9".into();
    op.trust(&mut raw);
    raw.fleet.models_dir = Some(dir);
    raw.fleet.allow_http = true;
    let config = raw.validate(|| None).unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(agent::run(
        config,
        async move {
            let _ = stop_rx.await;
        },
        Some(started_tx),
    ));
    let running = tokio::time::timeout(Duration::from_secs(20), started_rx)
        .await
        .unwrap()
        .unwrap();
    assert!(!*running.connected.borrow(), "no broker to connect to");
    let live = running.live.get();
    assert_eq!(live.config_version.as_deref(), Some("device@3"));
    assert_eq!(live.policy.default_budget, Duration::from_millis(777));
    let zoo = zoo();
    assert_eq!(
        live.engine.model("digits").unwrap().sha256(),
        zoo.model("digits")
            .unwrap()
            .variant(Variant::Source)
            .unwrap()
            .sha256
    );
    drop(live);
    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(15), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
