//! Sensors end to end: a simulated accelerometer (the real MPU-6050 driver on a simulated bus)
//! with injected faults, through the agent's pipeline, to MQTT events and an actuator's pin; and
//! the VAD over a committed speech clip, marking speech where the clip has it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use agent::config::{EmbeddedBrokerConfig, RawConfig};
use agent::sensors::sim::{Condition, Fault, FaultKind, Phase};
use agent::sensors::{ActuatorKind, RawActuator, RawSensor, SensorKind};
use common::{TestAgent, scratch_dir};
use serde_json::Value;
use tokio::sync::mpsc;

/// A broker of our own, so the events subscription is in place before the agent starts.
fn broker() -> SocketAddr {
    agent::broker::start(
        &EmbeddedBrokerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            listen_v311: None,
            connect: false,
        },
        1 << 20,
    )
    .unwrap()
    .v5
}

async fn events(addr: SocketAddr, filter: &str) -> mpsc::UnboundedReceiver<(Instant, Value)> {
    let mut seen = common::subscribe(addr, filter).await;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(s) = seen.recv().await {
            if tx.send((s.at, s.body)).is_err() {
                return;
            }
        }
    });
    rx
}

fn on(addr: SocketAddr) -> impl FnOnce(&mut RawConfig) {
    move |raw: &mut RawConfig| {
        raw.embedded_broker = None;
        raw.mqtt.broker = format!("mqtt://{addr}");
    }
}

fn sensor(name: &str, kind: SensorKind) -> RawSensor {
    let mut s: RawSensor =
        toml::from_str(&format!("name = \"{name}\"\nkind = \"{}\"", kind_str(kind))).unwrap();
    s.kind = kind;
    s
}

fn kind_str(k: SensorKind) -> &'static str {
    match k {
        SensorKind::Mpu6050 => "mpu6050",
        SensorKind::Simulated => "simulated",
        SensorKind::Audio => "audio",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_simulated_accelerometer_with_faults_reaches_mqtt_events_and_raises_the_alarm_pin() {
    let addr = broker();
    let mut rx = events(addr, "tether/sens-1/events/#").await;
    let start = Instant::now();
    let agent = TestAgent::start("sens-1", move |raw| {
        on(addr)(raw);
        let mut s = sensor("pump-1", SensorKind::Simulated);
        s.seed = Some(7);
        s.condition = vec![
            Phase {
                after_ms: 0,
                state: Condition::Normal,
            },
            Phase {
                after_ms: 2500,
                state: Condition::BearingFault,
            },
        ];
        s.faults = vec![
            Fault {
                after_ms: 800,
                kind: FaultKind::Nack,
                duration_ms: 300,
            },
            Fault {
                after_ms: 1600,
                kind: FaultKind::Stuck,
                duration_ms: 400,
            },
        ];
        raw.sensors = vec![s];
        raw.actuators = vec![RawActuator {
            name: "alarm".into(),
            kind: ActuatorKind::Simulated,
            chip: None,
            line: None,
            active_low: false,
            source: "pump-1".into(),
            on_class: "bearing_fault".into(),
            min_probability: 0.8,
            hold_ms: 60_000,
            confirm_windows: 2,
        }];
    })
    .await;
    let mut got = Vec::new();
    while start.elapsed() < Duration::from_millis(4500) {
        if let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(100), rx.recv()).await {
            got.push(e);
        }
    }
    let kind = |k: &str| -> Vec<&Value> {
        got.iter()
            .map(|e| &e.1)
            .filter(|e| e["kind"] == k)
            .collect()
    };
    for e in got.iter().map(|e| &e.1) {
        assert_eq!(e["source"], "pump-1", "{e}");
    }

    // The NACK and the stuck output: reported, counted, and followed by recovery.
    let faults = kind("sensor_fault");
    assert!(
        faults
            .iter()
            .any(|e| e["error"].as_str().unwrap().contains("NACK")),
        "{faults:?}"
    );
    assert!(
        faults
            .iter()
            .any(|e| e["error"].as_str().unwrap().contains("stuck")),
        "{faults:?}"
    );
    let recovered = kind("sensor_recovered");
    assert!(recovered.len() >= 2, "recovered from both: {recovered:?}");
    assert!(
        recovered.iter().all(|e| e["gap_ms"].as_u64().unwrap() > 0),
        "{recovered:?}"
    );
    let counters = &agent.running.sensors.counters["pump-1"];
    assert!(
        counters.failures.load(std::sync::atomic::Ordering::Relaxed) >= 2,
        "{:?}",
        counters.to_json()
    );

    // Windows classified: the normal machine as normal, the faulty one as a bearing fault.
    let classes = kind("classification");
    assert!(classes.len() >= 15, "{} windows", classes.len());
    let (mut normal_ok, mut normal_n, mut fault_ok, mut fault_n) = (0, 0, 0, 0);
    for (t, e) in &got {
        if e["kind"] != "classification" {
            continue;
        }
        assert_eq!(e["model"], "vibration");
        assert_eq!(e["route"], "local");
        let at = t.duration_since(start);
        if at < Duration::from_millis(700) {
            normal_n += 1;
            normal_ok += usize::from(e["label"] == "normal");
        } else if at > Duration::from_millis(3000) {
            fault_n += 1;
            fault_ok += usize::from(e["label"] == "bearing_fault");
        }
    }
    eprintln!(
        "normal windows classified normal: {normal_ok} of {normal_n}; faulty windows classified bearing_fault: {fault_ok} of {fault_n}; faults {}, recoveries {}",
        faults.len(),
        recovered.len()
    );
    assert!(normal_n > 0 && fault_n > 0, "{normal_n} {fault_n}");
    assert!(
        normal_ok * 10 >= normal_n * 8,
        "normal: {normal_ok} of {normal_n}"
    );
    assert!(
        fault_ok * 10 >= fault_n * 8,
        "bearing fault: {fault_ok} of {fault_n}"
    );

    // The alarm: an event, and the pin itself.
    let act = kind("actuator");
    assert!(
        act.iter()
            .any(|e| e["actuator"] == "alarm" && e["level"] == "high"),
        "{act:?}"
    );
    let pin = agent.running.sensors.pins["alarm"].state();
    assert!(pin.high, "the alarm pin is up");
    assert_eq!(
        pin.writes.iter().map(|w| w.1).collect::<Vec<_>>(),
        vec![false, true],
        "low at start, raised once"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_vad_marks_speech_in_the_committed_clip_at_the_right_times() {
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("speech.json")).unwrap()).unwrap();
    let addr = broker();
    let mut rx = events(addr, "tether/sens-vad/events/mic").await;
    let wav = data.join("speech.wav");
    let agent = TestAgent::start("sens-vad", move |raw| {
        on(addr)(raw);
        let mut s = sensor("mic", SensorKind::Audio);
        s.path = Some(wav);
        raw.sensors = vec![s];
        raw.store.path = Some(scratch_dir("vad").join("tether.db"));
    })
    .await;
    let mut got = Vec::new();
    loop {
        let (_, e) = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .expect("the clip is processed within 60 s")
            .unwrap();
        let end = e["kind"] == "stream_end";
        got.push(e);
        if end {
            break;
        }
    }
    let starts: Vec<f64> = got
        .iter()
        .filter(|e| e["kind"] == "speech_start")
        .map(|e| e["t_s"].as_f64().unwrap())
        .collect();
    let ends: Vec<f64> = got
        .iter()
        .filter(|e| e["kind"] == "speech_end")
        .map(|e| e["t_s"].as_f64().unwrap())
        .collect();
    let segs = expected["segments"].as_array().unwrap();
    eprintln!("VAD marked starts {starts:?}, ends {ends:?}; the clip has {segs:?}");
    assert_eq!(starts.len(), segs.len(), "starts {starts:?} ends {ends:?}");
    assert_eq!(ends.len(), segs.len(), "starts {starts:?} ends {ends:?}");
    for (i, s) in segs.iter().enumerate() {
        let (a, b) = (s["start_s"].as_f64().unwrap(), s["end_s"].as_f64().unwrap());
        assert!(
            (starts[i] - a).abs() <= 0.15,
            "segment {i}: speech marked from {} s, the clip has it from {a} s",
            starts[i]
        );
        assert!(
            (ends[i] - b).abs() <= 0.3,
            "segment {i}: speech marked until {} s, the clip has it until {b} s",
            ends[i]
        );
    }
    let chunks = got.last().unwrap()["chunks"].as_u64().unwrap();
    assert_eq!(
        chunks,
        (202_664f64 / 512.0).ceil() as u64,
        "every chunk ran"
    );
    assert!(
        got.iter().all(|e| e["kind"] != "inference_error"),
        "no failed window"
    );
    agent.stop().await;
}
