//! The `tether-relay` binary: relay.toml keys set from the environment, as a Kubernetes
//! Deployment sets them, override the file; a bad value is refused with its key named.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts the relay `cmd` describes (serving the zoo) and waits until it listens on `port`.
fn start(cmd: &mut Command, port: u16) -> std::process::Child {
    let child = cmd
        .env("TETHER_RELAY_MODELS", models::default_zoo_dir())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "the relay did not start listening"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

/// One POST on a fresh connection: the whole response.
fn post(port: u16, path: &str, body: &[u8], extra: &str) -> String {
    let mut sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    write!(
        sock,
        "POST {path} HTTP/1.1\r\nhost: relay\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n{extra}\r\n",
        body.len()
    )
    .unwrap();
    let _ = sock.write_all(body);
    let mut out = Vec::new();
    let _ = sock.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn environment_variables_set_relay_toml_keys() {
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("tether-relay-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // The file says 1 MiB; the environment says 2 KiB, and wins.
    let file = dir.join("relay.toml");
    std::fs::write(&file, "[limits]\nmax_body_bytes = 1048576\n").unwrap();
    let mut relay = start(
        Command::new(env!("CARGO_BIN_EXE_tether-relay"))
            .env("TETHER_RELAY_CONFIG", &file)
            .env("TETHER_RELAY_LISTEN", format!("127.0.0.1:{port}"))
            .env("TETHER_RELAY_MAX_BODY_BYTES", "2048"),
        port,
    );
    let response = post(port, "/v2/models/digits/infer", &[b' '; 4096], "");
    let _ = relay.kill();
    let _ = relay.wait();
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(response.contains("limit of 2048 bytes"), "{response}");

    // A value the key cannot take: refused at start, the key named.
    let out = Command::new(env!("CARGO_BIN_EXE_tether-relay"))
        .env_remove("TETHER_RELAY_CONFIG")
        .env("TETHER_RELAY_LISTEN", "127.0.0.1:0")
        .env("TETHER_RELAY_MODELS", models::default_zoo_dir())
        .env("TETHER_RELAY_MAX_CONNECTIONS", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("limits.max_connections"), "{err}");
    // Not a number at all: clap names the variable's flag.
    let out = Command::new(env!("CARGO_BIN_EXE_tether-relay"))
        .env("TETHER_RELAY_WORKERS", "many")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--workers"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

fn infer_with(port: u16, token: &str) -> String {
    let body = serde_json::json!({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": vec![0.5f32; 64]}]}).to_string();
    post(
        port,
        "/v2/models/digits/infer",
        body.as_bytes(),
        &format!("authorization: Bearer {token}\r\n"),
    )
}

#[test]
fn sighup_replaces_tokens_and_limits() {
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("tether-relay-hup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("relay.toml");
    let write = |token: &str, max_body: usize| {
        std::fs::write(
            &file,
            format!(
                "[limits]\nmax_body_bytes = {max_body}\n[[auth.tokens]]\ndevice_id = \"pi-1\"\nsha256 = \"{}\"\n",
                cloud_relay::auth::hash_token(token)
            ),
        )
        .unwrap();
    };
    write("tok-a", 1 << 20);
    let mut relay = start(
        Command::new(env!("CARGO_BIN_EXE_tether-relay"))
            .args(["--config", file.to_str().unwrap()])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env_remove("TETHER_RELAY_MAX_BODY_BYTES"),
        port,
    );
    let a = infer_with(port, "tok-a");
    assert!(a.starts_with("HTTP/1.1 200"), "{a}");
    assert!(infer_with(port, "tok-b").starts_with("HTTP/1.1 401"));

    write("tok-b", 2048);
    let hup = Command::new("kill")
        .args(["-HUP", &relay.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    while !infer_with(port, "tok-b").starts_with("HTTP/1.1 200") {
        assert!(Instant::now() < deadline, "the new token was not taken");
        std::thread::sleep(Duration::from_millis(50));
    }
    let a = infer_with(port, "tok-a");
    let big = post(
        port,
        "/v2/models/digits/infer",
        &[b' '; 4096],
        "authorization: Bearer tok-b\r\n",
    );
    let alive = relay.try_wait().unwrap().is_none();
    let _ = relay.kill();
    let _ = relay.wait();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(alive, "SIGHUP must not stop the relay");
    assert!(a.starts_with("HTTP/1.1 401"), "the old token is gone: {a}");
    assert!(
        big.starts_with("HTTP/1.1 413"),
        "the new body limit holds: {big}"
    );
}
