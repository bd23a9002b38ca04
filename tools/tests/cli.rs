//! The `tether` binary as a developer runs it: the engine benchmark.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};

fn tether(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(args)
        .env("TETHER_MODELS", models::default_zoo_dir())
        .env("RUST_LOG", "warn")
        .output()
        .expect("tether runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn bench_prints_percentiles_per_model_and_variant() {
    let out = tether(&[
        "bench",
        "--model",
        "digits",
        "--variant",
        "device,source",
        "--batch",
        "8",
        "--seconds",
        "0.2",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines[0].contains("p50 ms")
            && lines[0].contains("p99 ms")
            && lines[0].contains("samples/s")
    );
    assert_eq!(lines.len(), 3, "{stdout}");
    for (line, variant) in lines[1..].iter().zip(["device", "source"]) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields[0], "digits");
        assert_eq!(fields[1], variant);
        assert_eq!(fields[3], "8", "batch");
        let calls: usize = fields[5].parse().unwrap();
        let p50: f64 = fields[6].parse().unwrap();
        let p99: f64 = fields[8].parse().unwrap();
        let throughput: f64 = fields[9].parse().unwrap();
        assert!(
            calls > 0 && p50 > 0.0 && p99 >= p50 && throughput > 0.0,
            "{line}"
        );
    }
}
