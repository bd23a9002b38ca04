//! The agent over a real MQTT broker on loopback (the embedded rumqttd, on ports the OS picks):
//! request/response in MQTT v5 and 3.1.1, pools, coded errors, overload, graceful shutdown.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Requester, TestAgent, golden, golden_with};
use models::{Manifest, Variant};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);

fn top_labels(body: &Value) -> Vec<String> {
    body["parameters"]["classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row[0]["label"].as_str().unwrap().to_owned())
        .collect()
}

fn golden_top_labels(model: &str) -> Vec<String> {
    let manifest = Manifest::load(models::default_zoo_dir()).unwrap();
    let expected = models::golden::response(&manifest, model, Variant::Device).unwrap();
    let spec = manifest.model(model).unwrap();
    let labels = spec.labels.as_ref().unwrap();
    let probs = expected.outputs[0].to_tensor().unwrap().data().to_f64_vec();
    probs
        .chunks(labels.len())
        .map(|row| {
            let best = (0..row.len())
                .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                .unwrap();
            labels[best].clone()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_round_trip_copies_correlation_data_back() {
    let agent = TestAgent::start("dev-v5", |_| {}).await;
    let mut req = Requester::connect(agent.v5_addr(), "v5").await;
    let correlation = b"\x00\xffcorr-1".to_vec();
    req.send(
        "tether/dev-v5/infer/digits",
        &golden("digits"),
        &correlation,
    )
    .await;
    let reply = req.next(WAIT).await;
    assert_eq!(reply.topic, "replies/v5");
    assert_eq!(reply.correlation.as_deref(), Some(&correlation[..]));
    let body = reply.body;
    assert_eq!(body["model_name"], "digits");
    assert_eq!(body["id"], "golden-digits");
    assert_eq!(body["parameters"]["route"], "local");
    assert_eq!(body["parameters"]["model_version"], "1.0.0");
    assert_eq!(body["parameters"]["device_id"], "dev-v5");
    assert!(body["parameters"]["latency_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(body["outputs"][0]["shape"], json!([4, 10]));
    assert_eq!(top_labels(&body), golden_top_labels("digits"));
    agent.stop().await;
}

/// A 3.1.1 client asks `device` for a vibration result with `parameters.reply_to`.
async fn v311_round_trip(addr: std::net::SocketAddr, device: &str) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let mut options = MqttOptions::new(
        format!("test-v311-{device}"),
        addr.ip().to_string(),
        addr.port(),
    );
    options.set_max_packet_size(64 << 20, 64 << 20);
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    client
        .subscribe("my/replies", QoS::AtLeastOnce)
        .await
        .unwrap();
    let body = golden_with("vibration", json!({"reply_to": "my/replies"}));
    let topic = format!("tether/{device}/infer/vibration");
    let mut sent = false;
    let reply = tokio::time::timeout(WAIT, async {
        loop {
            match eventloop.poll().await.unwrap() {
                Event::Incoming(Packet::SubAck(_)) if !sent => {
                    client
                        .publish(topic.as_str(), QoS::AtLeastOnce, false, body.clone())
                        .await
                        .unwrap();
                    sent = true;
                }
                Event::Incoming(Packet::Publish(p)) => return p,
                _ => {}
            }
        }
    })
    .await
    .expect("a reply on reply_to");
    assert_eq!(reply.topic, "my/replies");
    let v: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(v["model_name"], "vibration");
    assert_eq!(v["parameters"]["device_id"], device);
    assert_eq!(top_labels(&v), golden_top_labels("vibration"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_round_trip_uses_reply_to() {
    let agent = TestAgent::start("dev-v311", |_| {}).await;
    v311_round_trip(agent.v311_addr(), "dev-v311").await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_5_and_311_clients_share_the_embedded_brokers_one_port() {
    let device = "dev-oneport";
    let agent = TestAgent::start(device, |_| {}).await;
    assert_eq!(agent.v311_addr(), agent.v5_addr(), "one listener for both");
    v311_round_trip(agent.v5_addr(), device).await;
    // A 3.1.1 client watching the requests that MQTT 5 clients send, properties and all
    // (rumqttd 0.20's 3.1.1 codec dropped such a subscriber at the first one).
    let mut watcher = common::subscribe(agent.v5_addr(), &format!("tether/{device}/infer/#")).await;
    let mut req = Requester::connect(agent.v5_addr(), "oneport-v5").await;
    for i in 0..2 {
        let correlation = format!("c{i}");
        req.send(
            &format!("tether/{device}/infer/digits"),
            &golden("digits"),
            correlation.as_bytes(),
        )
        .await;
        let reply = req.next(WAIT).await;
        assert_eq!(reply.correlation.as_deref(), Some(correlation.as_bytes()));
        assert_eq!(reply.body["model_name"], "digits");
        let seen = tokio::time::timeout(WAIT, watcher.recv())
            .await
            .expect("the 3.1.1 subscriber got the v5 request")
            .expect("and is still connected");
        assert_eq!(seen.body["id"], "golden-digits");
    }
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_311_only_listener_can_still_be_configured() {
    let device = "dev-v311-port";
    let agent = TestAgent::start(device, |raw| {
        if let Some(b) = raw.embedded_broker.as_mut() {
            b.listen_v311 = Some("127.0.0.1:0".into());
        }
    })
    .await;
    assert_ne!(agent.v311_addr(), agent.v5_addr());
    v311_round_trip(agent.v311_addr(), device).await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_speaking_v311_to_its_broker_serves_too() {
    let agent = TestAgent::start("dev-agent311", |raw| {
        raw.mqtt.protocol = agent::config::Protocol::V311
    })
    .await;
    v311_round_trip(agent.v311_addr(), "dev-agent311").await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_in_a_pool_share_the_load_and_each_request_gets_one_reply() {
    let a = TestAgent::start("pool-a", |raw| raw.pool = Some("line3".into())).await;
    let broker = format!("mqtt://{}", a.v5_addr());
    let b = TestAgent::start("pool-b", |raw| {
        raw.pool = Some("line3".into());
        raw.embedded_broker = None;
        raw.mqtt.broker = broker;
    })
    .await;
    let mut req = Requester::connect(a.v5_addr(), "pool").await;
    let n = 40;
    for i in 0..n {
        req.send(
            "tether/pool/infer/digits",
            &golden("digits"),
            format!("r{i}").as_bytes(),
        )
        .await;
    }
    let replies = req.collect(n, WAIT).await;
    assert!(
        req.quiet_for(Duration::from_millis(500)).await,
        "no duplicate replies"
    );
    assert_eq!(replies.len(), n, "every correlation answered");
    let mut by_device = std::collections::HashMap::<String, usize>::new();
    for (corr, rs) in &replies {
        assert_eq!(
            rs.len(),
            1,
            "exactly one reply for {}",
            String::from_utf8_lossy(corr)
        );
        let device = rs[0].body["parameters"]["device_id"]
            .as_str()
            .unwrap()
            .to_owned();
        *by_device.entry(device).or_default() += 1;
    }
    assert!(
        by_device.get("pool-a").copied().unwrap_or(0) > 0,
        "{by_device:?}"
    );
    assert!(
        by_device.get("pool-b").copied().unwrap_or(0) > 0,
        "{by_device:?}"
    );
    b.stop().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_coded_errors_and_the_agent_keeps_serving() {
    let agent = TestAgent::start("dev-err", |raw| raw.mqtt.max_payload_bytes = 4096).await;
    let mut req = Requester::connect(agent.v5_addr(), "err").await;
    let wrong_shape =
        br#"{"id":"w","inputs":[{"name":"input","shape":[1,64],"datatype":"FP32","data":[0]}]}"#;
    let cases: [(&str, Vec<u8>, &str, &str); 5] = [
        ("digits", b"{not json".to_vec(), "bad_request", "not a valid inference request"),
        ("digits", wrong_shape.to_vec(), "bad_request", "has 1 values in `data` but its shape [1,64] needs 64"),
        (
            "digits",
            br#"{"id":"s","inputs":[{"name":"input","shape":[1,64],"datatype":"FP32","data":[0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0]}]}"#.to_vec(),
            "bad_request",
            "input `input` has shape [1,64] where [N,1,8,8] is expected by model `digits`",
        ),
        ("resnet", golden("digits"), "unknown_model", "unknown model `resnet`"),
        ("digits", vec![b' '; 5000], "bad_request", "over this agent's limit of 4096 bytes"),
    ];
    for (i, (model, body, code, text)) in cases.iter().enumerate() {
        req.send(
            &format!("tether/dev-err/infer/{model}"),
            body,
            format!("e{i}").as_bytes(),
        )
        .await;
        let reply = req.next(WAIT).await;
        assert_eq!(
            reply.correlation.as_deref(),
            Some(format!("e{i}").as_bytes())
        );
        assert_eq!(reply.body["code"], *code, "{}", reply.body);
        let error = reply.body["error"].as_str().unwrap();
        assert!(error.contains(text), "`{text}` not in `{error}`");
    }
    // Still serving.
    req.send("tether/dev-err/infer/digits", &golden("digits"), b"ok")
        .await;
    let reply = req.next(WAIT).await;
    assert_eq!(reply.body["model_name"], "digits", "{}", reply.body);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_beyond_the_queue_is_taken_at_the_agents_pace_and_all_answered() {
    // One worker and a queue of 2: the agent takes 3 requests at a time (its Receive
    // Maximum, and it stops reading past it); the other 27 wait in the broker, not refused.
    let agent = TestAgent::start("dev-burst", |raw| {
        raw.inference.workers = Some(1);
        raw.inference.queue = 2;
    })
    .await;
    let mut req = Requester::connect(agent.v5_addr(), "burst").await;
    let n = 30;
    // The pace is what is tested, not the budget: behind 29 others on a busy machine (3
    // CPU-bound processes beside the tests), the golden request's 1,000 ms ran out.
    let body = golden_with("ocr_det", json!({"budget_ms": 60_000}));
    for i in 0..n {
        req.send(
            "tether/dev-burst/infer/ocr_det",
            &body,
            format!("b{i}").as_bytes(),
        )
        .await;
    }
    let replies = req.collect(n, Duration::from_secs(60)).await;
    assert_eq!(replies.len(), n, "one reply per request");
    let not_served: Vec<&Value> = replies
        .values()
        .map(|r| &r[0].body)
        .filter(|b| b["model_name"] != "ocr_det")
        .collect();
    assert!(
        not_served.is_empty(),
        "every request of the burst is served: {not_served:?}"
    );
    assert!(
        req.quiet_for(Duration::from_millis(300)).await,
        "and answered once"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_is_retained_and_shutdown_finishes_requests_in_flight() {
    use rumqttc::v5::mqttbytes::QoS;
    let agent = TestAgent::start("dev-status", |raw| {
        raw.inference.workers = Some(1);
        raw.inference.preload = vec!["vibration".into()];
    })
    .await;
    let addr = agent.v5_addr();
    let mut req = Requester::connect(addr, "status").await;
    req.client
        .subscribe("tether/dev-status/status", QoS::AtLeastOnce)
        .await
        .unwrap();
    let status = req.next(WAIT).await;
    assert_eq!(status.topic, "tether/dev-status/status");
    assert_eq!(status.body["online"], true);
    assert_eq!(status.body["device_id"], "dev-status");
    let models: Vec<&str> = status.body["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(models, ["digits", "ocr_det", "vad", "vibration"]);
    // Only what inference.preload names is built before its first request.
    let loaded: Vec<bool> = status.body["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["loaded"].as_bool().unwrap())
        .collect();
    assert_eq!(loaded, [false, false, false, true], "{}", status.body);

    // The budget is not what this test is about: ocr_det is built on its first request, and a
    // debug build on a busy machine (3 CPU-bound processes beside the tests) took more than
    // the golden request's 1,000 ms.
    let body = golden_with("ocr_det", json!({"budget_ms": 30_000}));
    for i in 0..3 {
        req.send(
            "tether/dev-status/infer/ocr_det",
            &body,
            format!("s{i}").as_bytes(),
        )
        .await;
    }
    // Let the requests reach the agent's queue, then stop it while they run.
    tokio::time::sleep(Duration::from_millis(100)).await;
    agent.stop().await;
    let mut served = 0;
    let mut offline = false;
    // Three replies and the offline status; an online status may come before them (the agent
    // republishes it when its settings or connection change), and is read past.
    for _ in 0..8 {
        if served == 3 && offline {
            break;
        }
        let r = req.next(WAIT).await;
        if r.topic == "tether/dev-status/status" {
            offline = r.body["online"] == false;
        } else {
            assert_eq!(r.body["model_name"], "ocr_det", "{}", r.body);
            served += 1;
        }
    }
    assert_eq!(served, 3, "requests in flight finish during shutdown");
    assert!(offline, "the agent marks itself offline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_that_fails_at_run_time_falls_back_to_the_cpu_and_says_so() {
    // `cpu` is a named tract runtime, standing in for CUDA; the fault is injected.
    let agent = TestAgent::start("dev-fallback", |raw| {
        raw.inference.runtime = Some("cpu".into());
        raw.metrics.listen = Some("127.0.0.1:0".into());
    })
    .await;
    let mut statuses = common::subscribe(agent.v5_addr(), "tether/dev-fallback/status").await;
    agent
        .running
        .live
        .get()
        .engine
        .model("digits")
        .unwrap()
        .inject_runtime_failures(1);
    let mut req = Requester::connect(agent.v5_addr(), "fallback").await;
    for i in 0..3 {
        req.send(
            "tether/dev-fallback/infer/digits",
            &golden_with("digits", serde_json::json!({"cache": false})),
            format!("f{i}").as_bytes(),
        )
        .await;
        let reply = req.next(WAIT).await;
        assert_eq!(
            reply.body["model_name"], "digits",
            "answered on the CPU: {}",
            reply.body
        );
    }
    let m = common::scrape(agent.running.metrics_addr.unwrap()).await;
    assert_eq!(
        common::metric(&m, "tether_agent_engine_fallbacks_total{model=\"digits\"}"),
        1.0,
        "{m}"
    );
    // The status is published again, saying so.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let seen = tokio::time::timeout_at(deadline, statuses.recv())
            .await
            .expect("a status naming the fallback")
            .unwrap();
        let digits = seen.body["models"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["name"] == "digits"))
            .cloned()
            .unwrap_or_default();
        if let Some(why) = digits["fallback"].as_str() {
            assert!(why.contains("injected fault"), "{why}");
            assert_eq!(digits["runtime"], "cpu");
            break;
        }
    }
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_mqtt_311_a_burst_is_also_taken_at_the_agents_pace() {
    // MQTT 3.1.1 has no Receive Maximum: the agent stops reading while it holds its limit.
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let agent = TestAgent::start("dev-burst311", |raw| {
        raw.mqtt.protocol = agent::config::Protocol::V311;
        raw.inference.workers = Some(1);
        raw.inference.queue = 2;
    })
    .await;
    let addr = agent.v311_addr();
    let mut options = MqttOptions::new("test-burst311", addr.ip().to_string(), addr.port());
    options.set_max_packet_size(64 << 20, 64 << 20);
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    client
        .subscribe("burst311/replies", QoS::AtLeastOnce)
        .await
        .unwrap();
    let n = 30;
    let mut ids = std::collections::HashSet::new();
    let mut sent = false;
    tokio::time::timeout(Duration::from_secs(60), async {
        while ids.len() < n {
            match eventloop.poll().await.unwrap() {
                Event::Incoming(Packet::SubAck(_)) if !sent => {
                    for i in 0..n {
                        let mut v: Value = serde_json::from_slice(&golden_with(
                            "ocr_det",
                            // The pace is what is tested, not the budget (the default
                            // 1,000 ms ran out behind 29 others on a busy machine).
                            json!({"reply_to": "burst311/replies", "budget_ms": 60_000}),
                        ))
                        .unwrap();
                        v["id"] = json!(format!("b{i}"));
                        client
                            .try_publish(
                                "tether/dev-burst311/infer/ocr_det",
                                QoS::AtLeastOnce,
                                false,
                                serde_json::to_vec(&v).unwrap(),
                            )
                            .unwrap();
                    }
                    sent = true;
                }
                Event::Incoming(Packet::Publish(p)) => {
                    let v: Value = serde_json::from_slice(&p.payload).unwrap();
                    assert_eq!(v["model_name"], "ocr_det", "served, not refused: {v}");
                    ids.insert(v["id"].as_str().unwrap().to_owned());
                }
                _ => {}
            }
        }
    })
    .await
    .expect("every request of the burst answered within 60 s");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_the_queues_bytes_find_it_full() {
    // ocr_det requests are about 1 MB of JSON and 0.2 MB of decoded frame each: with
    // inference.queue_bytes at its floor, one is held at a time and the others are refused at
    // once, although the queue has room for 64 by count.
    let agent = TestAgent::start("dev-bytes", |raw| {
        raw.inference.workers = Some(1);
        raw.inference.queue_bytes = 64 * 1024;
        raw.inference.emulated_service_ms = 300.0;
    })
    .await;
    let mut req = Requester::connect(agent.v5_addr(), "bytes").await;
    // A roomy budget: the first request also builds ocr_det, which on a busy machine took a
    // debug build past the default 1,000 ms.
    let body = golden_with("ocr_det", json!({"cache": false, "budget_ms": 30_000}));
    for i in 0..3 {
        req.send(
            "tether/dev-bytes/infer/ocr_det",
            &body,
            format!("b{i}").as_bytes(),
        )
        .await;
    }
    let mut codes = Vec::new();
    for _ in 0..3 {
        let r = req.next(WAIT).await;
        codes.push(
            r.body["code"]
                .as_str()
                .map_or_else(|| "ok".to_owned(), |c| format!("{c}: {}", r.body["reason"])),
        );
    }
    codes.sort();
    assert_eq!(codes[0], "ok", "{codes:?}");
    assert!(
        codes[1..]
            .iter()
            .all(|c| c.starts_with("overloaded") && c.contains("queue_full")),
        "{codes:?}"
    );
    // Once the held request is answered its bytes are given back: the next one is served.
    req.send("tether/dev-bytes/infer/ocr_det", &body, b"after")
        .await;
    let r = req.next(WAIT).await;
    assert!(r.body["outputs"].is_array(), "{}", r.body);
    agent.stop().await;
}
