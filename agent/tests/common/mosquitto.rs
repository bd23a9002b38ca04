//! A Mosquitto broker for the opt-in tests that need one (`cargo test -p agent --test mosquitto
//! -- --ignored`, and the `rpc` and `hostile` suites): on a free loopback port, with
//! persistence and a full log in a temporary directory, stopped and started at will.

#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub fn require(binary: &str) {
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
pub struct Mosquitto {
    pub port: u16,
    pub dir: PathBuf,
    child: Option<Child>,
}

impl Mosquitto {
    pub fn start() -> Mosquitto {
        Mosquitto::start_with(|_| "allow_anonymous true\n".to_owned())
    }

    /// Starts Mosquitto with extra configuration lines, which `extra` writes knowing the
    /// broker's directory (for certificates and password files).
    pub fn start_with(extra: impl FnOnce(&std::path::Path) -> String) -> Mosquitto {
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

    pub fn spawn(&mut self) {
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
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status()
                .unwrap();
            child.wait().unwrap();
        }
    }

    pub fn url(&self) -> String {
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

impl Mosquitto {
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Mosquitto's log so far (`log_type all`: every packet it sends and receives).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
    }
}
