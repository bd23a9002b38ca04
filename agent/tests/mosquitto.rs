//! Interoperability with Mosquitto, Debian's MQTT broker, and its command-line clients; a
//! broker restart in the middle of a stream of QoS 1 requests; and the outbox through a broker
//! stopped and restarted, a cut link, and an agent killed with SIGKILL again and again.
//!
//! These need `mosquitto` and `mosquitto-clients` installed, so they are opt-in:
//! `cargo test -p agent --test mosquitto -- --ignored` (CI runs them). Opted in without
//! Mosquitto, they fail, saying what to install.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::mosquitto::{Mosquitto, require};
use common::{Proxy, Requester, TestAgent, golden, golden_with};
use serde_json::{Value, json};
use std::collections::HashSet;
use std::sync::atomic::Ordering;

const NEEDS: &str = "needs Mosquitto: cargo test -p agent --test mosquitto -- --ignored";

fn sub(port: u16, args: &[&str]) -> Child {
    Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-C",
            "1",
            "-W",
            "30",
        ])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub starts")
}

fn publish(port: u16, args: &[&str], body: &[u8]) {
    use std::io::Write;
    let mut child = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1", "-s"])
        .args(args)
        .stdin(Stdio::piped())
        .spawn()
        .expect("mosquitto_pub starts");
    child.stdin.take().unwrap().write_all(body).unwrap();
    assert!(child.wait().unwrap().success(), "mosquitto_pub failed");
}

fn output_of(child: Child) -> String {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "mosquitto_sub got nothing: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Mosquitto: cargo test -p agent --test mosquitto -- --ignored"]
async fn mosquitto_pub_and_sub_talk_to_the_agent_in_v5_and_v311() {
    let _ = NEEDS;
    require("mosquitto_pub");
    require("mosquitto_sub");
    let broker = Mosquitto::start();
    let url = broker.url();
    let agent = TestAgent::start("mosq-dev", |raw| {
        raw.embedded_broker = None;
        raw.mqtt.broker = url;
    })
    .await;
    let port = broker.port;

    // MQTT v5: response topic and correlation data (mosquitto_sub -F %D prints the correlation data).
    let reply = sub(port, &["-V", "5", "-t", "cli/replies", "-F", "%D %p"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let body = golden("digits");
    tokio::task::spawn_blocking(move || {
        publish(
            port,
            &[
                "-V",
                "5",
                "-t",
                "tether/mosq-dev/infer/digits",
                "-D",
                "publish",
                "response-topic",
                "cli/replies",
                "-D",
                "publish",
                "correlation-data",
                "corr-42",
            ],
            &body,
        )
    })
    .await
    .unwrap();
    let text = tokio::task::spawn_blocking(move || output_of(reply))
        .await
        .unwrap();
    let (corr, json_text) = text.trim_end().split_once(' ').unwrap();
    assert_eq!(corr, "corr-42");
    let v: Value = serde_json::from_str(json_text).unwrap();
    assert_eq!(v["model_name"], "digits");
    assert_eq!(v["outputs"][0]["shape"], json!([4, 10]));

    // MQTT 3.1.1: parameters.reply_to.
    let reply = sub(port, &["-V", "311", "-t", "cli/replies311"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let body = golden_with("vibration", json!({"reply_to": "cli/replies311"}));
    tokio::task::spawn_blocking(move || {
        publish(
            port,
            &["-V", "311", "-t", "tether/mosq-dev/infer/vibration"],
            &body,
        )
    })
    .await
    .unwrap();
    let text = tokio::task::spawn_blocking(move || output_of(reply))
        .await
        .unwrap();
    let v: Value = serde_json::from_str(text.trim_end()).unwrap();
    assert_eq!(v["model_name"], "vibration");

    // A coded error reaches a 3.1.1 client on the default result topic.
    let reply = sub(port, &["-V", "311", "-t", "tether/mosq-dev/result/resnet"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    tokio::task::spawn_blocking(move || {
        publish(
            port,
            &["-t", "tether/mosq-dev/infer/resnet"],
            b"{\"inputs\":[]}",
        )
    })
    .await
    .unwrap();
    let text = tokio::task::spawn_blocking(move || output_of(reply))
        .await
        .unwrap();
    let v: Value = serde_json::from_str(text.trim_end()).unwrap();
    assert_eq!(v["code"], "unknown_model");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Mosquitto: cargo test -p agent --test mosquitto -- --ignored"]
async fn a_broker_restart_mid_stream_loses_no_request() {
    let mut broker = Mosquitto::start();
    let url = broker.url();
    let agent = TestAgent::start("restart-dev", |raw| {
        raw.embedded_broker = None;
        raw.mqtt.broker = url;
    })
    .await;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", broker.port).parse().unwrap();
    let mut req = Requester::connect_persistent(addr, "restart").await;
    let n = 60;
    let body = golden("digits");
    for i in 0..n {
        if i == n / 2 {
            // Graceful restart: Mosquitto saves its sessions and queues, and loads them again.
            broker.stop();
            tokio::time::sleep(Duration::from_millis(300)).await;
            broker.spawn();
        }
        req.send(
            "tether/restart-dev/infer/digits",
            &body,
            format!("q{i}").as_bytes(),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut answered = std::collections::HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while answered.len() < n {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        assert!(
            !left.is_zero(),
            "only {} of {n} requests were answered: missing {:?}",
            answered.len(),
            (0..n)
                .filter(|i| !answered.contains(&format!("q{i}")))
                .collect::<Vec<_>>()
        );
        let Ok(r) = tokio::time::timeout(left, req.next_any()).await else {
            continue;
        };
        assert_eq!(r.body["model_name"], "digits", "{}", r.body);
        answered.insert(String::from_utf8(r.correlation.unwrap()).unwrap());
    }
    agent.stop().await;
}

/// Makes a CA, a server certificate for 127.0.0.1 and a client certificate with openssl.
fn make_certificates(dir: &std::path::Path) {
    require("openssl");
    let script = r#"
set -e
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=tether-test-ca 2>/dev/null
for name in server client; do
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout $name.key -out $name.csr -subj /CN=$name 2>/dev/null
done
printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > server.ext
printf 'extendedKeyUsage=clientAuth\n' > client.ext
for name in server client; do
  openssl x509 -req -in $name.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out $name.pem -days 2 -extfile $name.ext 2>/dev/null
done
chmod 644 *.key *.pem
"#;
    let status = Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "openssl could not make the test certificates"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Mosquitto: cargo test -p agent --test mosquitto -- --ignored"]
async fn mutual_tls_and_a_password_connect_and_a_wrong_password_does_not() {
    require("mosquitto_passwd");
    let broker = Mosquitto::start_with(|dir| {
        make_certificates(dir);
        let pw = dir.join("passwords");
        let status = Command::new("mosquitto_passwd")
            .arg("-b")
            .arg("-c")
            .arg(&pw)
            .args(["press-12", "s3cret"])
            .status()
            .unwrap();
        assert!(status.success());
        std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        format!(
            "cafile {d}/ca.pem\ncertfile {d}/server.pem\nkeyfile {d}/server.key\nrequire_certificate true\nallow_anonymous false\npassword_file {d}/passwords\n",
            d = dir.display()
        )
    });
    let dir = broker.dir.clone();
    let url = format!("mqtts://127.0.0.1:{}", broker.port);
    let tls = |raw: &mut agent::config::RawConfig, password: &str| {
        raw.embedded_broker = None;
        raw.mqtt.broker = url.clone();
        raw.mqtt.ca_file = Some(dir.join("ca.pem"));
        raw.mqtt.client_cert = Some(dir.join("client.pem"));
        raw.mqtt.client_key = Some(dir.join("client.key"));
        raw.mqtt.username = Some("press-12".into());
        raw.mqtt.password = Some(password.into());
    };

    // The right password: the agent connects over mutual TLS and serves.
    let agent = TestAgent::start("tls-dev", |raw| tls(raw, "s3cret")).await;
    let port = broker.port.to_string();
    let d = dir.display().to_string();
    let tls_args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "--cafile",
            &format!("{d}/ca.pem"),
            "--cert",
            &format!("{d}/client.pem"),
            "--key",
            &format!("{d}/client.key"),
            "-u",
            "press-12",
            "-P",
            "s3cret",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        v.extend(extra.iter().map(|s| (*s).to_owned()));
        v
    };
    let sub_args = tls_args(&["-V", "311", "-t", "tls/replies", "-C", "1", "-W", "30"]);
    let reply = Command::new("mosquitto_sub")
        .args(&sub_args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pub_args = tls_args(&[
        "-V",
        "311",
        "-q",
        "1",
        "-t",
        "tether/tls-dev/infer/digits",
        "-s",
    ]);
    let body = golden_with("digits", json!({"reply_to": "tls/replies"}));
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = Command::new("mosquitto_pub")
            .args(&pub_args)
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&body).unwrap();
        assert!(child.wait().unwrap().success());
    })
    .await
    .unwrap();
    let text = tokio::task::spawn_blocking(move || output_of(reply))
        .await
        .unwrap();
    let v: Value = serde_json::from_str(text.trim_end()).unwrap();
    assert_eq!(v["model_name"], "digits");
    agent.stop().await;

    // A wrong password: the broker refuses, and the agent keeps retrying without serving.
    let mut raw = agent::config::RawConfig {
        device_id: Some("tls-bad".into()),
        models_dir: Some(models::default_zoo_dir()),
        ..Default::default()
    };
    tls(&mut raw, "wrong");
    raw.store.path = Some(common::scratch_dir("tls-bad").join("tether.db"));
    let config = raw.validate(|| None).unwrap();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(agent::run(
        config,
        async move {
            let _ = stop_rx.await;
        },
        Some(started_tx),
    ));
    let running = started_rx.await.unwrap();
    let mut connected = running.connected.clone();
    let connected_in_time =
        tokio::time::timeout(Duration::from_secs(3), connected.wait_for(|c| *c)).await;
    assert!(
        connected_in_time.is_err(),
        "a wrong password must not get a session"
    );
    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(15), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Mosquitto: cargo test -p agent --test mosquitto -- --ignored"]
async fn an_agent_speaking_v311_serves_through_mosquitto() {
    require("mosquitto_pub");
    require("mosquitto_sub");
    let broker = Mosquitto::start();
    let url = broker.url();
    let agent = TestAgent::start("mosq-311", |raw| {
        raw.embedded_broker = None;
        raw.mqtt.broker = url;
        raw.mqtt.protocol = agent::config::Protocol::V311;
    })
    .await;
    let port = broker.port;
    let reply = sub(port, &["-V", "311", "-t", "cli/v311agent"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let body = golden_with("digits", json!({"reply_to": "cli/v311agent"}));
    tokio::task::spawn_blocking(move || {
        publish(
            port,
            &["-V", "311", "-t", "tether/mosq-311/infer/digits"],
            &body,
        )
    })
    .await
    .unwrap();
    let text = tokio::task::spawn_blocking(move || output_of(reply))
        .await
        .unwrap();
    let v: Value = serde_json::from_str(text.trim_end()).unwrap();
    assert_eq!(v["model_name"], "digits");
    assert_eq!(v["parameters"]["device_id"], "mosq-311");
    agent.stop().await;
}

/// The faults the outbox must ride out.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Mosquitto stopped (saving its sessions) and started again.
    StopBroker,
    /// The device's network link cut and restored, the broker running on.
    CutLink,
}

/// Streams PP-OCR requests at a one-worker agent, injects `fault` once the first reply is in,
/// waits while the rest of the backlog is answered into the outbox, heals the fault, and
/// checks that every reply arrives, in order, and that the outbox empties.
async fn outbox_rides_out(fault: Fault) {
    let mut broker = Mosquitto::start();
    let broker_addr: std::net::SocketAddr = format!("127.0.0.1:{}", broker.port).parse().unwrap();
    let proxy = Proxy::start(broker_addr).await;
    let url = match fault {
        Fault::StopBroker => broker.url(),
        Fault::CutLink => format!("mqtt://{}", proxy.addr),
    };
    let device = format!("outbox-{}", format!("{fault:?}").to_lowercase());
    let agent = TestAgent::start(&device, |raw| {
        raw.embedded_broker = None;
        raw.mqtt.broker = url;
        raw.inference.workers = Some(1);
        raw.inference.queue = 1000;
        // A backlog test, not a budget test: every request may wait its turn.
        raw.policy.default_budget_ms = 600_000;
        raw.policy.max_budget_ms = 600_000;
    })
    .await;
    let mut req = Requester::connect_persistent(broker_addr, &device).await;
    // PP-OCR takes milliseconds per image, so the agent is still working through the stream
    // when the fault strikes; `cache: false` keeps every request on the model.
    let body = golden_with("ocr_det", json!({"cache": false}));
    let n = 60;
    let topic = format!("tether/{device}/infer/ocr_det");
    for i in 0..n {
        req.send(&topic, &body, format!("{i:03}").as_bytes()).await;
    }
    let first = req.next(Duration::from_secs(30)).await;
    match fault {
        Fault::StopBroker => broker.stop(),
        Fault::CutLink => proxy.cut(),
    }
    let counters = agent.running.store.counters.clone();
    let mut most_waiting = 0;
    let mut last = u64::MAX;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    // The backlog is answered into the outbox: wait until it stops growing.
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let rows = counters.outbox_rows.load(Ordering::Relaxed);
        most_waiting = most_waiting.max(rows);
        if rows == last && rows > 0 {
            break;
        }
        last = rows;
        assert!(
            tokio::time::Instant::now() < deadline,
            "the outbox never settled"
        );
    }
    assert!(
        most_waiting > 0,
        "replies made during the fault must wait in the outbox"
    );
    match fault {
        Fault::StopBroker => broker.spawn(),
        Fault::CutLink => proxy.restore(),
    }

    let mut order = vec![String::from_utf8(first.correlation.unwrap()).unwrap()];
    let mut seen: HashSet<String> = order.iter().cloned().collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while seen.len() < n {
        let r = tokio::time::timeout_at(deadline, req.next_any())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "only {} of {n} replies arrived; {} still in the outbox",
                    seen.len(),
                    counters.outbox_rows.load(Ordering::Relaxed)
                )
            });
        assert_eq!(r.body["model_name"], "ocr_det", "{}", r.body);
        let c = String::from_utf8(r.correlation.unwrap()).unwrap();
        // Requests in flight when the fault struck are delivered again: a duplicate reply is
        // allowed (QoS 1 is at least once), disorder is not.
        if seen.insert(c.clone()) {
            order.push(c);
        }
    }
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(order, sorted, "replies arrived out of order");
    tokio::time::timeout(Duration::from_secs(20), async {
        while counters.outbox_rows.load(Ordering::Relaxed) > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("delivered messages are deleted from the outbox");
    eprintln!("{fault:?}: the outbox held up to {most_waiting} replies");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Mosquitto: cargo test -p agent --test mosquitto -- --ignored"]
async fn replies_made_while_the_broker_is_down_arrive_in_order_when_it_returns() {
    outbox_rides_out(Fault::StopBroker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Mosquitto: cargo test -p agent --test mosquitto -- --ignored"]
async fn replies_made_while_the_link_is_cut_arrive_in_order_when_it_returns() {
    outbox_rides_out(Fault::CutLink).await;
}

/// A digits request whose input differs with `i`, so every request is a cache miss and a write.
fn distinct_digits(i: usize) -> Vec<u8> {
    let mut v: Value = serde_json::from_slice(&golden("digits")).unwrap();
    v["inputs"][0]["data"][i % 64] = json!((i % 997) as f64 / 997.0);
    serde_json::to_vec(&v).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Mosquitto: cargo test -p agent --test mosquitto -- --ignored"]
async fn an_agent_killed_at_random_points_loses_no_acknowledged_reply() {
    let broker = Mosquitto::start();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", broker.port).parse().unwrap();
    let dir = common::scratch_dir("crash");
    let db = dir.join("tether.db");
    let config = dir.join("agent.toml");
    // Write-heavy and slow to write, so kills land in the middle of it: every request is
    // cached and recorded in the history with its input, each write is its own commit, and
    // each commit waits for the disk.
    std::fs::write(
        &config,
        "[inference]\nqueue = 10000\n[policy]\ndefault_budget_ms = 600000\nmax_budget_ms = 600000\n[store]\nsynchronous = \"full\"\nmax_batch = 1\n[store.history]\nsample = 1.0\ninputs = \"store\"\n",
    )
    .unwrap();
    let spawn = |round: usize| {
        let log = std::fs::File::create(dir.join(format!("agent-{round}.log"))).unwrap();
        Command::new(env!("CARGO_BIN_EXE_tether-agent"))
            .arg("run")
            .arg("--config")
            .arg(&config)
            .args([
                "--broker",
                &broker.url(),
                "--device-id",
                "crash-dev",
                "--workers",
                "1",
            ])
            .arg("--db")
            .arg(&db)
            .env("RUST_LOG", "info,rumqttc=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    };
    let mut req = Requester::connect_persistent(addr, "crash").await;
    let topic = "tether/crash-dev/infer/digits";

    // The first start makes the agent's persistent session; until then requests would go nowhere.
    let mut child = spawn(0);
    let mut warm = false;
    for _ in 0..120 {
        req.send(topic, &golden("digits"), b"warmup").await;
        if tokio::time::timeout(Duration::from_millis(500), req.next_any())
            .await
            .is_ok()
        {
            warm = true;
            break;
        }
    }
    assert!(
        warm,
        "the agent did not answer within a minute; its log: {}",
        std::fs::read_to_string(dir.join("agent-0.log")).unwrap_or_default()
    );
    let rounds = 20;
    let per_round = 250;
    let mut sent = 0;
    for round in 0..rounds {
        if round > 0 {
            child = spawn(round);
        }
        for _ in 0..per_round {
            req.send(
                topic,
                &distinct_digits(sent),
                format!("{sent:05}").as_bytes(),
            )
            .await;
            sent += 1;
        }
        // Anywhere from start-up (opening the database, loading models) to mid-stream.
        tokio::time::sleep(Duration::from_millis(fastrand::u64(20..700))).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // The database opens after every kill, and nothing was moved aside.
        let check = Command::new(env!("CARGO_BIN_EXE_tether-agent"))
            .args(["outbox", "list", "--limit", "0", "--db"])
            .arg(&db)
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "round {round}: the database does not open: {}",
            String::from_utf8_lossy(&check.stderr)
        );
        let aside: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".corrupt-"))
            .collect();
        assert!(aside.is_empty(), "round {round}: the database was damaged");
    }

    // Back once more: every request gets its reply, from the outbox or by redelivery.
    let mut last = spawn(rounds);
    let mut answered = HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while answered.len() < sent {
        let Ok(r) = tokio::time::timeout_at(deadline, req.next_any()).await else {
            let missing: Vec<usize> = (0..sent)
                .filter(|i| !answered.contains(&format!("{i:05}")))
                .collect();
            let _ = last.kill();
            panic!(
                "{} of {sent} requests never got a reply: {missing:?} (logs in {})",
                missing.len(),
                dir.display()
            );
        };
        let c = String::from_utf8(r.correlation.unwrap_or_default()).unwrap();
        if c != "warmup" {
            assert_eq!(r.body["model_name"], "digits", "{}", r.body);
            answered.insert(c);
        }
    }
    Command::new("kill")
        .arg("-TERM")
        .arg(last.id().to_string())
        .status()
        .unwrap();
    let status = last.wait().unwrap();
    assert!(
        status.success(),
        "the agent exits cleanly on SIGTERM: {status}"
    );
    // How much each start found waiting: the kills must have landed mid-stream, or this test
    // proved nothing.
    let mut resumed = Vec::new();
    for round in 1..=rounds {
        let log = std::fs::read_to_string(dir.join(format!("agent-{round}.log"))).unwrap();
        let rows = log
            .lines()
            .find(|l| l.contains("Database open."))
            .and_then(|l| l.split("outbox_rows=").nth(1))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok());
        resumed.push(rows);
    }
    let with_backlog = resumed
        .iter()
        .filter(|r| matches!(r, Some(n) if *n > 0))
        .count();
    eprintln!(
        "{sent} requests over {rounds} kills, all answered; outbox rows found at each start: {resumed:?}"
    );
    assert!(
        with_backlog > 0,
        "no start found unsent replies, so no kill landed mid-stream: {resumed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Mosquitto: cargo test -p agent --test mosquitto -- --ignored"]
async fn a_signed_document_retained_in_mosquitto_applies_at_connect_in_v311() {
    require("mosquitto_pub");
    require("mosquitto_sub");
    let broker = Mosquitto::start();
    let port = broker.port;
    let keys = common::scratch_dir("mosq-fleet-key");
    let (pem, public) = agent::fleet::envelope::SigningKey::generate().unwrap();
    std::fs::write(keys.join("ops.key"), pem).unwrap();
    let key =
        agent::fleet::envelope::SigningKey::load(&keys.join("ops.key"), "ops".into()).unwrap();
    let envelope = serde_json::to_vec(
        &key.sign(
            json!({"target": "device/mosq-fleet", "version": 4, "policy": {"default_budget_ms": 432}})
                .to_string(),
        ),
    )
    .unwrap();
    // Published (retained) before the agent exists: it gets it when it subscribes.
    tokio::task::spawn_blocking(move || {
        publish(port, &["-r", "-t", "tether/mosq-fleet/config"], &envelope)
    })
    .await
    .unwrap();
    let url = broker.url();
    let agent = TestAgent::start("mosq-fleet", move |raw| {
        raw.embedded_broker = None;
        raw.mqtt.broker = url;
        raw.mqtt.protocol = agent::config::Protocol::V311;
        raw.fleet.keys.insert("ops".into(), public);
        raw.fleet.telemetry_interval_secs = 1;
    })
    .await;
    let status = sub(
        port,
        &[
            "-V",
            "311",
            "-t",
            "tether/mosq-fleet/config/status",
            "-W",
            "15",
        ],
    );
    let text = tokio::task::spawn_blocking(move || output_of(status))
        .await
        .unwrap();
    let v: Value = serde_json::from_str(text.trim_end()).unwrap();
    assert_eq!(
        (v["state"].as_str(), v["version"].as_u64()),
        (Some("applied"), Some(4)),
        "{v}"
    );
    let telemetry = sub(port, &["-t", "tether/mosq-fleet/telemetry", "-W", "15"]);
    let text = tokio::task::spawn_blocking(move || output_of(telemetry))
        .await
        .unwrap();
    let t: Value = serde_json::from_str(text.trim_end()).unwrap();
    assert_eq!(t["device_id"], "mosq-fleet", "{t}");
    assert_eq!(t["config_version"], "device@4", "{t}");
    assert!(t["models"]["digits"].is_object(), "{t}");
    let reply = sub(port, &["-V", "311", "-t", "cli/fleet"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let body = golden_with("digits", json!({"reply_to": "cli/fleet"}));
    tokio::task::spawn_blocking(move || {
        publish(
            port,
            &["-V", "311", "-t", "tether/mosq-fleet/infer/digits"],
            &body,
        )
    })
    .await
    .unwrap();
    let text = tokio::task::spawn_blocking(move || output_of(reply))
        .await
        .unwrap();
    let v: Value = serde_json::from_str(text.trim_end()).unwrap();
    assert_eq!(v["parameters"]["budget_ms"], 432, "{v}");
    agent.stop().await;
}

/// Runs the agent binary against `url` with `SSL_CERT_FILE` set, and reads its log until it
/// connects or `within` passes; returns whether it connected, and the log.
fn agent_with_cert_file(
    url: &str,
    cert_file: &std::path::Path,
    within: Duration,
) -> (bool, String) {
    use std::io::Read;
    let db = common::scratch_dir("sys-roots").join("tether.db");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tether-agent"))
        .args(["--models"])
        .arg(models::default_zoo_dir())
        .args(["run", "--broker", url, "--device-id", "sys-roots", "--db"])
        .arg(&db)
        .env("SSL_CERT_FILE", cert_file)
        .env_remove("SSL_CERT_DIR")
        .env("RUST_LOG", "info")
        .env("TETHER_LOG_FORMAT", "text")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + within;
    let mut log = Vec::new();
    let mut connected = false;
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        if let Ok(chunk) = rx.recv_timeout(left.min(Duration::from_millis(100))) {
            log.extend(chunk);
        }
        if String::from_utf8_lossy(&log).contains("Connected to the MQTT broker") {
            connected = true;
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    (connected, String::from_utf8_lossy(&log).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Mosquitto: cargo test -p agent --test mosquitto -- --ignored"]
async fn mqtts_without_a_ca_file_verifies_against_the_system_roots() {
    let broker = Mosquitto::start_with(|dir| {
        make_certificates(dir);
        format!(
            "cafile {d}/ca.pem\ncertfile {d}/server.pem\nkeyfile {d}/server.key\nallow_anonymous true\n",
            d = dir.display()
        )
    });
    let url = format!("mqtts://127.0.0.1:{}", broker.port);
    // The test CA is the system's root store (rustls-native-certs reads SSL_CERT_FILE).
    let (connected, log) = tokio::task::spawn_blocking({
        let (url, ca) = (url.clone(), broker.dir.join("ca.pem"));
        move || agent_with_cert_file(&url, &ca, Duration::from_secs(20))
    })
    .await
    .unwrap();
    assert!(
        connected,
        "trusting the system's roots, it connects:\n{log}"
    );
    // A store without that CA: the broker's certificate is refused, and the agent never connects.
    let other = broker.dir.join("other-ca");
    std::fs::create_dir_all(&other).unwrap();
    let status = Command::new("sh")
        .arg("-c")
        .arg("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=another-ca 2>/dev/null")
        .current_dir(&other)
        .status()
        .unwrap();
    assert!(status.success());
    let (connected, log) = tokio::task::spawn_blocking(move || {
        agent_with_cert_file(&url, &other.join("ca.pem"), Duration::from_secs(4))
    })
    .await
    .unwrap();
    assert!(!connected, "an unknown issuer is refused:\n{log}");
    assert!(
        log.contains("UnknownIssuer")
            || log.contains("unknown issuer")
            || log.contains("certificate"),
        "the log names the certificate problem:\n{log}"
    );
}
