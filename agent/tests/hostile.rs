//! Nothing on the wire stops the agent. The `tether-agent` binary runs against Mosquitto, and
//! a requester sends it every malformed request we could think of — numbers out of range or of
//! the wrong type for each parameter, reply topics that are invalid or belong to the agents,
//! malformed, oversized and binary payloads, MQTT v5 properties at their limits — each followed
//! by a valid request that must be answered correctly. At the end the agent is serving, nothing
//! was published outside the reply namespace (a spy subscribed to `#` saw everything), no
//! panic was logged and /metrics counts none.
//!
//! Opt-in (needs Mosquitto): `cargo test -p agent --test hostile -- --ignored` (CI runs it).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::mosquitto::{Mosquitto, require};
use common::{Requester, Spied, golden, metric, scrape, scratch_dir, spy};
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use serde_json::{Value, json};

const DEVICE: &str = "hostile-dev";
const WAIT: Duration = Duration::from_secs(20);

/// A hostile input: where it goes, what it carries, which properties.
struct Case {
    name: String,
    topic: String,
    payload: Vec<u8>,
    /// `None`: the requester's own (response topic and correlation data).
    props: Option<PublishProperties>,
}

fn digits_topic() -> String {
    format!("tether/{DEVICE}/infer/digits")
}

/// The golden digits request with `parameters` set.
fn with_params(params: Value) -> Vec<u8> {
    let mut v: Value = serde_json::from_slice(&golden("digits")).unwrap();
    v["parameters"] = params;
    serde_json::to_vec(&v).unwrap()
}

/// The golden digits request with one input field replaced.
fn with_input(field: &str, value: Value) -> Vec<u8> {
    let mut v: Value = serde_json::from_slice(&golden("digits")).unwrap();
    v["inputs"][0][field] = value;
    serde_json::to_vec(&v).unwrap()
}

fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    let mut add = |name: &str, topic: String, payload: Vec<u8>, props| {
        out.push(Case {
            name: name.to_owned(),
            topic,
            payload,
            props,
        });
    };
    // Numbers from the wire, out of range or of the wrong type.
    for budget in [
        json!(1e22),
        json!(1e308),
        json!(-1),
        json!(0),
        json!(1e-320),
        json!(300_001),
        json!(18_446_744_073_709_551_615_u64),
        json!("50"),
        json!([1]),
        json!({"ms": 5}),
        json!(true),
    ] {
        add(
            &format!("budget_ms {budget}"),
            digits_topic(),
            with_params(json!({ "budget_ms": budget })),
            None,
        );
    }
    for cache in [json!("no"), json!(1), json!([])] {
        add(
            &format!("cache {cache}"),
            digits_topic(),
            with_params(json!({ "cache": cache })),
            None,
        );
    }
    // Reply topics named in the parameters (as an MQTT 3.1.1 requester does).
    let own = |s: &str| format!("tether/{DEVICE}/{s}");
    for reply_to in [
        json!("r\u{1}x"),
        json!("r\u{0}x"),
        json!("r\u{9f}x"),
        json!("r\u{fdd0}x"),
        json!("r\u{ffff}"),
        json!(own("config")),
        json!(own("status")),
        json!(own("config/status")),
        json!(own("telemetry")),
        json!(own("events/pump")),
        json!("tether/other-dev/infer/digits"),
        json!("tether/fleet/lab/config"),
        json!("$SYS/broker/x"),
        json!("a/+/b"),
        json!("#"),
        json!(""),
        json!("a".repeat(70_000)),
        json!(12),
        json!({"topic": "x"}),
    ] {
        let shown: String = reply_to.to_string().chars().take(40).collect();
        add(
            &format!("reply_to {shown}"),
            digits_topic(),
            with_params(json!({ "reply_to": reply_to })),
            Some(PublishProperties::default()),
        );
    }
    // MQTT v5 response topics that Mosquitto forwards but the agent must not publish to.
    for rt in [
        own("status"),
        own("config"),
        "tether/other-dev/telemetry".into(),
    ] {
        add(
            &format!("response topic {rt}"),
            digits_topic(),
            golden("digits"),
            Some(PublishProperties {
                response_topic: Some(rt),
                correlation_data: Some(b"hostile".to_vec().into()),
                ..Default::default()
            }),
        );
    }
    // Payloads.
    let nested = "[".repeat(100_000);
    for (name, payload) in [
        ("empty payload", Vec::new()),
        ("binary payload", vec![0xff, 0xfe, 0x00, 0x01, 0x80]),
        ("null", b"null".to_vec()),
        ("an array", b"[]".to_vec()),
        ("an empty object", b"{}".to_vec()),
        ("inputs is a number", br#"{"inputs": 5}"#.to_vec()),
        ("deep nesting", nested.into_bytes()),
        ("an id that is a number", {
            let mut v: Value = serde_json::from_slice(&golden("digits")).unwrap();
            v["id"] = json!(7);
            serde_json::to_vec(&v).unwrap()
        }),
        (
            "negative dimension",
            with_input("shape", json!([-1, 1, 8, 8])),
        ),
        (
            "dimensions whose product overflows",
            with_input("shape", json!([4_294_967_296_u64, 4_294_967_296_u64, 8, 8])),
        ),
        ("forty dimensions", with_input("shape", json!(vec![10; 40]))),
        ("unknown datatype", with_input("datatype", json!("FP99"))),
        ("strings as data", with_input("data", json!(vec!["a"; 64]))),
        ("data too short", with_input("data", json!([0.5]))),
        ("a number beyond f64", {
            let mut text = String::from_utf8(golden("digits")).unwrap();
            text = text.replacen("\"data\":[", "\"data\":[1e400,", 1);
            text.into_bytes()
        }),
        ("an unknown output", {
            let mut v: Value = serde_json::from_slice(&golden("digits")).unwrap();
            v["outputs"] = json!([{"name": "nope"}]);
            serde_json::to_vec(&v).unwrap()
        }),
        ("five mebibytes", vec![b' '; 5 << 20]),
    ] {
        add(name, digits_topic(), payload, None);
    }
    add(
        "an unknown model",
        format!("tether/{DEVICE}/infer/nonexistent"),
        golden("digits"),
        None,
    );
    add(
        "a model name of 2000 characters",
        format!("tether/{DEVICE}/infer/{}", "m".repeat(2000)),
        golden("digits"),
        None,
    );
    // Properties at their limits.
    add(
        "correlation data of 65535 bytes",
        digits_topic(),
        golden("digits"),
        Some(PublishProperties {
            correlation_data: Some(vec![0xab; 65_535].into()),
            ..Default::default()
        }),
    );
    for expiry in [1, u32::MAX] {
        add(
            &format!("message expiry {expiry}"),
            digits_topic(),
            golden("digits"),
            Some(PublishProperties {
                message_expiry_interval: Some(expiry),
                ..Default::default()
            }),
        );
    }
    add(
        "two hundred user properties and a long content type",
        digits_topic(),
        golden("digits"),
        Some(PublishProperties {
            user_properties: (0..200)
                .map(|i| (format!("k{i}"), "v".repeat(100)))
                .collect(),
            content_type: Some("x".repeat(10_000)),
            ..Default::default()
        }),
    );
    out
}

/// A free loopback port.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Sends a request with mosquitto_pub (a third-party client), MQTT v5.
fn mosquitto_pub(port: u16, topic: &str, response_topic: &str, body: &[u8]) {
    use std::io::Write;
    let mut child = Command::new("mosquitto_pub")
        .args([
            "-V",
            "5",
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-q",
            "1",
        ])
        .args([
            "-t",
            topic,
            "-D",
            "publish",
            "response-topic",
            response_topic,
        ])
        .args([
            "-D",
            "publish",
            "correlation-data",
            "from-mosquitto-pub",
            "-s",
        ])
        .stdin(Stdio::piped())
        .spawn()
        .expect("mosquitto_pub starts");
    child.stdin.take().unwrap().write_all(body).unwrap();
    assert!(child.wait().unwrap().success(), "mosquitto_pub failed");
}

/// Sends a valid request and waits for its answer; returns the other replies seen meanwhile.
async fn valid_round_trip(
    req: &mut Requester,
    correlation: &str,
    after: &str,
) -> Vec<common::Reply> {
    req.send(&digits_topic(), &golden("digits"), correlation.as_bytes())
        .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut others = Vec::new();
    loop {
        let r = tokio::time::timeout_at(deadline, req.next_any())
            .await
            .unwrap_or_else(|_| panic!("no answer to a valid request after `{after}`"));
        if r.correlation.as_deref() == Some(correlation.as_bytes()) {
            assert_eq!(
                r.body["model_name"], "digits",
                "after `{after}`: {}",
                r.body
            );
            assert_eq!(
                r.body["outputs"][0]["shape"][1], 10,
                "after `{after}`: ten classes"
            );
            return others;
        }
        others.push(r);
    }
}

/// The agent's process, killed if the test fails before stopping it.
struct AgentProcess(Option<Child>);

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What the agent logged, once it has stopped.
fn stop_agent(mut agent: AgentProcess, log: &std::path::Path) -> String {
    let mut child = agent.0.take().unwrap();
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    let text = std::fs::read_to_string(log).unwrap_or_default();
    assert!(status.success(), "the agent exited with {status}: {text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Mosquitto: cargo test -p agent --test hostile -- --ignored"]
async fn nothing_on_the_wire_stops_the_agent_or_leaves_the_reply_namespace() {
    require("mosquitto_pub");
    let broker = Mosquitto::start();
    let dir = scratch_dir("hostile");
    let log_path = dir.join("agent.log");
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let child = AgentProcess(Some(
        Command::new(env!("CARGO_BIN_EXE_tether-agent"))
            .args(["--models"])
            .arg(models::default_zoo_dir())
            .args(["run", "--broker", &broker.url(), "--device-id", DEVICE])
            .args(["--workers", "1", "--metrics", &metrics_addr, "--db"])
            .arg(dir.join("tether.db"))
            .env("RUST_LOG", "info,rumqttc=warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .unwrap(),
    ));
    let mut seen = spy(broker.addr(), "#").await;
    let mut req = Requester::connect(broker.addr(), "hostile").await;
    // Up and serving.
    let mut up = false;
    for i in 0..120 {
        req.send(
            &digits_topic(),
            &golden("digits"),
            format!("warm-{i}").as_bytes(),
        )
        .await;
        if tokio::time::timeout(Duration::from_millis(500), req.next_any())
            .await
            .is_ok()
        {
            up = true;
            break;
        }
    }
    assert!(
        up,
        "the agent did not start: {}",
        std::fs::read_to_string(&log_path).unwrap_or_default()
    );
    let mut refusals = Vec::new();
    let cases = cases();
    eprintln!(
        "{} hostile cases, each followed by a valid request",
        cases.len()
    );
    for (i, case) in cases.iter().enumerate() {
        let props = case
            .props
            .clone()
            .unwrap_or_else(|| req.props(format!("hostile-{i}").as_bytes()));
        req.send_with(&case.topic, &case.payload, props).await;
        refusals.extend(valid_round_trip(&mut req, &format!("valid-{i}"), &case.name).await);
    }
    // A third-party client naming the agent's own status topic as its response topic.
    mosquitto_pub(
        broker.port,
        &digits_topic(),
        &format!("tether/{DEVICE}/status"),
        &golden("digits"),
    );
    refusals.extend(valid_round_trip(&mut req, "valid-last", "mosquitto_pub").await);

    // Hostile requests that named our reply topic were answered there, as bad requests.
    let on_ours = |n: &str| {
        refusals
            .iter()
            .find(|r| r.correlation.as_deref() == Some(n.as_bytes()))
            .map(|r| r.body.clone())
            .unwrap_or_else(|| panic!("no reply to {n}"))
    };
    let b = on_ours("hostile-0");
    assert_eq!(b["code"], "bad_request", "budget_ms 1e22: {b}");
    assert!(b["error"].as_str().unwrap().contains("budget_ms"), "{b}");

    let m = scrape(metrics_addr.parse().unwrap()).await;
    assert_eq!(
        metric(&m, "tether_agent_panics_total{stage=\"front\"}"),
        0.0
    );
    assert_eq!(
        metric(&m, "tether_agent_panics_total{stage=\"worker\"}"),
        0.0
    );
    assert_eq!(metric(&m, "tether_agent_lost_requests_total"), 0.0, "{m}");
    let bad = metric(&m, "tether_agent_errors_total{code=\"bad_request\"}");
    assert!(
        bad >= 40.0,
        "the malformed requests were refused as bad requests: {bad}\n{m}"
    );
    let log = stop_agent(child, &log_path);
    assert!(!log.contains("panicked"), "a panic was logged:\n{log}");

    // Everything published, by anyone, while this ran.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut all: Vec<Spied> = Vec::new();
    while let Ok(s) = seen.try_recv() {
        all.push(s);
    }
    let mut statuses = 0;
    let mut refused_on_default = 0;
    for s in &all {
        let body: Value = serde_json::from_slice(&s.payload).unwrap_or(Value::Null);
        let is_reply = body.get("model_name").is_some() || body.get("code").is_some();
        let ours = s.topic.starts_with("replies/");
        let default = s.topic == format!("tether/{DEVICE}/result/digits")
            || s.topic.starts_with(&format!("tether/{DEVICE}/result/"));
        if is_reply {
            assert!(
                ours || default,
                "a reply was published outside the reply namespace, on `{}`: {body}",
                s.topic.chars().take(80).collect::<String>()
            );
            if default && body["code"] == "bad_request" {
                refused_on_default += 1;
            }
        } else if s.topic == format!("tether/{DEVICE}/status") {
            assert!(
                body.get("online").is_some() && body["device_id"] == DEVICE,
                "only the agent's status goes to its status topic: {body}"
            );
            statuses += 1;
        } else {
            assert!(
                s.topic.starts_with(&format!("tether/{DEVICE}/infer/")),
                "an unexpected publish on `{}`",
                s.topic.chars().take(80).collect::<String>()
            );
        }
    }
    assert!(statuses >= 1, "the agent's status was seen");
    assert!(
        refused_on_default >= 20,
        "refused reply topics are answered on the default result topic: {refused_on_default}"
    );
}
