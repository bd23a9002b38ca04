//! Interoperability with Mosquitto, Debian's MQTT broker, and its command-line clients; and a
//! broker restart in the middle of a stream of QoS 1 requests.
//!
//! These need `mosquitto` and `mosquitto-clients` installed, so they are opt-in:
//! `cargo test -p agent --test mosquitto -- --ignored` (CI runs them). Opted in without
//! Mosquitto, they fail, saying what to install.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Requester, TestAgent, golden, golden_with};
use serde_json::{Value, json};

const NEEDS: &str = "needs Mosquitto: cargo test -p agent --test mosquitto -- --ignored";

fn require(binary: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {binary}"))
        .output()
        .unwrap();
    assert!(
        found.status.success(),
        "`{binary}` is not installed: these tests need Mosquitto (apt-get install mosquitto mosquitto-clients)"
    );
}

/// A Mosquitto broker on a free loopback port, with persistence in a temporary directory.
struct Mosquitto {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Mosquitto {
    fn start() -> Mosquitto {
        Mosquitto::start_with(|_| "allow_anonymous true\n".to_owned())
    }

    /// Starts Mosquitto with extra configuration lines, which `extra` writes knowing the
    /// broker's directory (for certificates and password files).
    fn start_with(extra: impl FnOnce(&std::path::Path) -> String) -> Mosquitto {
        require("mosquitto");
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir =
            std::env::temp_dir().join(format!("tether-mosquitto-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Mosquitto started as root drops to the `mosquitto` user: let it write its database.
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .unwrap();
        let extra = extra(&dir);
        let conf = format!(
            "listener {port} 127.0.0.1\n{extra}persistence true\npersistence_location {}/\nautosave_interval 1\nmax_queued_messages 10000\nlog_dest file {}/mosquitto.log\nlog_type all\n",
            dir.display(),
            dir.display()
        );
        std::fs::write(dir.join("mosquitto.conf"), conf).unwrap();
        let mut m = Mosquitto {
            port,
            dir,
            child: None,
        };
        m.spawn();
        m
    }

    fn spawn(&mut self) {
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(self.dir.join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto starts");
        self.child = Some(child);
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("mosquitto did not listen on port {}", self.port);
    }

    /// Stops the broker gracefully (SIGTERM: it saves its persistence file) and waits.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status()
                .unwrap();
            child.wait().unwrap();
        }
    }

    fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "mosquitto's log and data are kept in {}",
                self.dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

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
