//! The `tether-agent` binary as a user runs it: `models` and `infer` against the zoo.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::process::{Command, Output, Stdio};

use models::v2::InferenceResponse;
use models::{Manifest, Variant, golden};

fn agent(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tether-agent"))
        .args(args)
        .env("TETHER_MODELS", models::default_zoo_dir())
        .env("RUST_LOG", "warn")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tether-agent starts");
    if let Some(bytes) = stdin {
        // The agent may refuse before reading its input (an unknown model): a closed pipe is fine.
        let written = child.stdin.take().unwrap().write_all(bytes);
        assert!(
            written.is_ok()
                || written
                    .as_ref()
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
        );
    }
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn models_lists_every_variant() {
    let out = agent(&["models"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for needle in [
        "digits     1.0.0    device  int8",
        "digits     1.0.0    cloud   fp32",
        "vibration  1.0.0    source  fp32",
        "input FP32 [N,1,8,8]",
        "x FP32 [N,3,?,?]",
        "input FP32 [1,576], state FP32 [2,1,128]",
    ] {
        assert!(
            stdout.contains(needle),
            "`{needle}` missing from:\n{stdout}"
        );
    }
    assert_eq!(
        stdout.lines().count(),
        1 + 10,
        "header plus one line per variant file:\n{stdout}"
    );
}

#[test]
fn infer_on_every_golden_request_matches_onnx_runtime() {
    let manifest = Manifest::load(models::default_zoo_dir()).unwrap();
    for spec in manifest.models() {
        let out = agent(&["infer", "--model", &spec.name, "--example"], None);
        assert!(out.status.success(), "{}: {}", spec.name, text(&out.stderr));
        let response: InferenceResponse = serde_json::from_slice(&out.stdout).unwrap();
        let expected = golden::response(&manifest, &spec.name, Variant::Device).unwrap();
        assert_eq!(response.model_name, spec.name);
        assert_eq!(
            response.model_version.as_deref(),
            Some(spec.version.as_str())
        );
        for (got, want) in response.outputs.iter().zip(&expected.outputs) {
            let (g, w) = (got.to_tensor().unwrap(), want.to_tensor().unwrap());
            assert_eq!(g.shape(), w.shape());
            let worst = g.max_abs_diff(&w);
            assert!(worst <= 1e-4, "{}: {worst}", spec.name);
        }
    }
}

#[test]
fn infer_reads_stdin_and_lists_top_classes() {
    let manifest = Manifest::load(models::default_zoo_dir()).unwrap();
    let request = std::fs::read(golden::request_path(&manifest, "vibration")).unwrap();
    let out = agent(
        &["infer", "--model", "vibration", "--top", "2"],
        Some(&request),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let classes = v["parameters"]["classes"].as_array().unwrap();
    let rows = v["outputs"][0]["shape"][0].as_u64().unwrap() as usize;
    assert_eq!(classes.len(), rows, "one list of classes per batch row");
    for row in classes {
        let row = row.as_array().unwrap();
        assert_eq!(row.len(), 2);
        let label = row[0]["label"].as_str().unwrap();
        assert!(
            ["normal", "imbalance", "bearing_fault"].contains(&label),
            "{label}"
        );
        assert!(row[0]["probability"].as_f64().unwrap() >= row[1]["probability"].as_f64().unwrap());
    }
}

#[test]
fn bad_input_is_a_sentence_and_a_failure_status() {
    let cases: [(&str, &[u8], &str); 4] = [
        (
            "digits",
            b"{not json",
            "the request is not a valid inference request",
        ),
        (
            "digits",
            br#"{"inputs":[{"name":"input","shape":[1,64],"datatype":"FP32","data":[0]}]}"#,
            "input `input` has 1 values in `data` but its shape [1,64] needs 64",
        ),
        (
            "digits",
            br#"{"inputs":[{"name":"input","shape":[1,2],"datatype":"FP32","data":[0,0]}]}"#,
            "input `input` has shape [1,2] where [N,1,8,8] is expected by model `digits`",
        ),
        ("resnet", b"{}", "unknown model `resnet`"),
    ];
    for (model, body, expected) in cases {
        let out = agent(&["infer", "--model", model], Some(body));
        assert!(!out.status.success());
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains(expected),
            "expected `{expected}` in: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn start_failures_exit_with_codes_a_service_manager_can_act_on() {
    let dir = std::env::temp_dir().join(format!("tether-cli-exit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("agent.toml");
    // 78 (EX_CONFIG): systemd's RestartPreventExitStatus=78 stops the restart loop.
    std::fs::write(&bad, "[inference]\nworkers = 0\nqueue = 0\n").unwrap();
    let out = agent(&["run", "--config", bad.to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("the configuration is invalid"),
        "{}",
        text(&out.stderr)
    );
    std::fs::write(&bad, "this is not = = toml").unwrap();
    let out = agent(&["run", "--config", bad.to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out.stderr));
    let missing = dir.join("missing.toml");
    let out = agent(&["run", "--config", missing.to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out.stderr));
    let out = agent(&["run", "--policy", "sideways"], None);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out.stderr));
    // 69 (EX_UNAVAILABLE): the metrics port is taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    std::fs::write(
        &bad,
        format!(
            "device_id = \"exit-test\"\n[store]\npath = \"{}\"\n[metrics]\nlisten = \"{addr}\"\n",
            dir.join("tether.db").display()
        ),
    )
    .unwrap();
    let out = agent(&["run", "--config", bad.to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(69), "{}", text(&out.stderr));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn config_check_finds_the_file_as_run_does_and_names_every_problem() {
    let dir = std::env::temp_dir().join(format!("tether-cli-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let check = |args: &[&str], env: &[(&str, &std::path::Path)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tether-agent"));
        cmd.args(args)
            .env("TETHER_MODELS", models::default_zoo_dir())
            .env("RUST_LOG", "warn")
            .env_remove("TETHER_CONFIG")
            .env_remove("CONFIGURATION_DIRECTORY");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        "device_id = \"pi-9\"\n[mqtt]\nbroker = \"mqtt://broker.lan:1883\"\n",
    )
    .unwrap();
    let out = check(&["config", "check", good.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("valid (device pi-9, broker broker.lan:1883"),
        "{}",
        text(&out.stdout)
    );
    // Found through $TETHER_CONFIG, then through systemd's $CONFIGURATION_DIRECTORY.
    let out = check(&["config", "check"], &[("TETHER_CONFIG", &good)]);
    assert!(
        text(&out.stdout).contains("good.toml: valid"),
        "{}",
        text(&out.stdout)
    );
    std::fs::copy(&good, dir.join("agent.toml")).unwrap();
    let out = check(&["config", "check"], &[("CONFIGURATION_DIRECTORY", &dir)]);
    assert!(
        text(&out.stdout).contains("agent.toml: valid"),
        "{}",
        text(&out.stdout)
    );
    // `config defaults` prints a file `config check` takes as it is.
    let out = check(&["config", "defaults"], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let defaults = dir.join("defaults.toml");
    std::fs::write(&defaults, &out.stdout).unwrap();
    assert!(text(&out.stdout).contains("queue_bytes = 33554432"));
    let out = check(&["config", "check", defaults.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("defaults.toml: valid"));
    // Every problem at once, exit 78.
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "device_id = \"a/b\"\n[inference]\nworkers = 0\n").unwrap();
    let out = check(&["config", "check", bad.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("device_id") && err.contains("inference.workers"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn logs_are_json_lines_on_request() {
    let dir = std::env::temp_dir().join(format!("tether-cli-json-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("agent.toml");
    std::fs::write(&file, "device_id = \"pi-1\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tether-agent"))
        .args(["config", "check", file.to_str().unwrap()])
        .env("TETHER_MODELS", models::default_zoo_dir())
        .env("RUST_LOG", "info")
        .env("TETHER_LOG_FORMAT", "json")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<serde_json::Value> = text(&out.stderr)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["level"] == "INFO" && l["fields"]["message"] == "Configuration file."),
        "{lines:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn systemd_hears_ready_status_watchdog_pings_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let dir = std::env::temp_dir().join(format!("tether-cli-notify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket_path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    // systemd sets WATCHDOG_PID to the service's pid: the shell's, kept by exec.
    let mut child = Command::new("sh")
        .args([
            "-c",
            "WATCHDOG_PID=$$ exec \"$0\" \"$@\"",
            env!("CARGO_BIN_EXE_tether-agent"),
            "run",
            "--embedded-broker",
            "127.0.0.1:0",
            "--device-id",
            "notify-test",
            "--db",
            dir.join("tether.db").to_str().unwrap(),
        ])
        .env("TETHER_MODELS", models::default_zoo_dir())
        .env("RUST_LOG", "warn")
        .env("NOTIFY_SOCKET", &socket_path)
        // A watchdog of 0.4 s: a ping every 0.2 s while the stages make progress.
        .env("WATCHDOG_USEC", "400000")
        .env_remove("TETHER_CONFIG")
        .env_remove("CONFIGURATION_DIRECTORY")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut heard = Vec::new();
    let mut buf = [0u8; 4096];
    let mut pings = 0;
    while pings < 3 {
        let n = socket.recv(&mut buf).expect("a notification within 30 s");
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        pings += msg.lines().filter(|l| *l == "WATCHDOG=1").count();
        heard.push(msg);
    }
    let all = heard.join("\n");
    assert!(all.contains("EXTEND_TIMEOUT_USEC="), "{all}");
    assert!(all.contains("READY=1"), "{all}");
    assert!(all.contains("STATUS=serving"), "{all}");
    let ready_at = all.find("READY=1").unwrap();
    assert!(
        all[ready_at..].contains("WATCHDOG=1"),
        "pings come after READY: {all}"
    );
    // SIGTERM: STOPPING=1, then a clean exit.
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let mut stopping = false;
    while !stopping {
        let n = socket.recv(&mut buf).expect("STOPPING within 30 s");
        stopping = String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1");
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The device's retained status, as a requester sees it, until `pred` holds or 30 s pass.
async fn status_until(
    port: u16,
    device: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> Option<serde_json::Value> {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions, mqttbytes::v5::Packet};
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let options = MqttOptions::new(format!("{device}-watch"), "127.0.0.1", port);
    let (client, mut events) = AsyncClient::new(options, 16);
    client
        .subscribe(format!("tether/{device}/status"), QoS::AtLeastOnce)
        .await
        .ok()?;
    loop {
        match tokio::time::timeout_at(deadline, events.poll()).await {
            Err(_) => return None,
            Ok(Err(_)) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&p.payload)
                    && pred(&v)
                {
                    let _ = client.disconnect().await;
                    return Some(v);
                }
            }
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_policy_change_and_reports_what_needs_a_restart() {
    let dir = std::env::temp_dir().join(format!("tether-cli-hup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let file = dir.join("agent.toml");
    let write = |text: &str| std::fs::write(&file, text).unwrap();
    write("device_id = \"hup-test\"\n[policy]\nmode = \"local-first\"\n");
    let log = std::fs::File::create(dir.join("agent.log")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tether-agent"))
        .args(["run", "--config", file.to_str().unwrap()])
        .args(["--embedded-broker", &format!("127.0.0.1:{port}")])
        .args(["--db", dir.join("tether.db").to_str().unwrap()])
        .env("TETHER_MODELS", models::default_zoo_dir())
        .env("RUST_LOG", "info,rumqttd=off")
        .env("TETHER_LOG_FORMAT", "text")
        .env_remove("TETHER_CONFIG")
        .env_remove("CONFIGURATION_DIRECTORY")
        .env_remove("JOURNAL_STREAM")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let hup = |pid: u32| {
        assert!(
            Command::new("kill")
                .args(["-HUP", &pid.to_string()])
                .status()
                .unwrap()
                .success()
        );
    };
    let first = status_until(port, "hup-test", |v| v["online"] == true).await;
    assert_eq!(first.expect("the agent's status")["policy"], "local-first");

    // A policy value changed, and a key only a restart applies.
    write("device_id = \"hup-test\"\n[policy]\nmode = \"local-only\"\n[inference]\nworkers = 1\n");
    hup(child.id());
    let changed = status_until(port, "hup-test", |v| v["policy"] == "local-only").await;
    assert!(changed.is_some(), "the running agent took the new policy");

    // An invalid file changes nothing; the agent keeps serving on what is in force.
    write("device_id = \"hup-test\"\n[policy]\nmode = \"sideways\"\n");
    hup(child.id());
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let still = status_until(port, "hup-test", |v| v["online"] == true).await;
    assert_eq!(still.expect("still serving")["policy"], "local-only");
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP must not stop the agent"
    );

    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    assert!(child.wait().unwrap().success());
    let log = std::fs::read_to_string(dir.join("agent.log")).unwrap();
    assert!(
        log.contains("only a restart applies") && log.contains("inference.workers"),
        "{log}"
    );
    assert!(log.contains("policy.mode"), "{log}");
    assert!(
        log.contains("not valid; the configuration in force stays"),
        "{log}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
