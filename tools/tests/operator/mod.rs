//! The operator CLI as a test runs it: the `tether` binary of this build.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

/// Runs `tether` with `args`.
pub fn cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(args)
        .output()
        .expect("tether runs")
}

/// Its stdout, after checking it succeeded (showing both streams when it did not).
pub fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "tether failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// `tether fleet keygen --name ops` into `dir`: the public key from the printed
/// `[fleet.keys]` line, and the private key's path.
pub fn keygen(dir: &Path) -> (String, PathBuf) {
    let printed = ok(&cli(&[
        "fleet",
        "keygen",
        "--name",
        "ops",
        "--out",
        dir.to_str().unwrap(),
    ]));
    let public = printed
        .lines()
        .find_map(|l| l.strip_prefix("ops = \""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("the [fleet.keys] line")
        .to_owned();
    (public, dir.join("ops.key"))
}
