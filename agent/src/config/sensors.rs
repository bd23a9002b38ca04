//! `[[sensors]]` and `[[actuators]]`: sources the agent samples itself, and the outputs their
//! results drive.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The MPU-6050's I2C address with AD0 low.
pub const DEFAULT_MPU6050_ADDRESS: u8 = 0x68;

/// What a sensor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SensorKind {
    /// An MPU-6050 on a Linux I2C bus (`/dev/i2c-N`); needs the `hw` feature.
    Mpu6050,
    /// A simulated MPU-6050 on a simulated machine, with scheduled faults.
    Simulated,
    /// 16 kHz mono PCM (WAV, raw s16le, a named pipe or stdin) for the VAD model.
    Audio,
}

/// `[[sensors]]` in agent.toml.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSensor {
    /// The source's name: events go to `{prefix}/{device_id}/events/{name}`.
    pub name: String,
    pub kind: SensorKind,
    /// The model its windows go to (default: `vibration`, or `vad` for audio).
    #[serde(default)]
    pub model: Option<String>,
    /// `mpu6050`: the bus, such as `/dev/i2c-1`.
    #[serde(default)]
    pub i2c_bus: Option<PathBuf>,
    /// I2C address (0x68, or 0x69 with AD0 high).
    #[serde(default = "default_address")]
    pub address: u8,
    /// Full scale in g: 2, 4, 8 or 16.
    #[serde(default = "default_range")]
    pub range_g: u8,
    /// Samples per second (the vibration model was trained at 1000).
    #[serde(default = "default_rate")]
    pub rate_hz: u32,
    /// The latency budget of each window's inference.
    #[serde(default)]
    pub budget_ms: Option<u64>,
    /// `audio`: the input (`-` for stdin).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// `audio`: read a file at the pace of a microphone (a pipe or stdin sets its own pace).
    #[serde(default)]
    pub realtime: bool,
    /// `audio`: speech from this probability; silence this long ends a segment; segments
    /// shorter than `min_speech_ms` are ignored.
    #[serde(default = "default_vad_threshold")]
    pub vad_threshold: f64,
    #[serde(default = "default_min_silence")]
    pub min_silence_ms: u64,
    #[serde(default = "default_min_speech")]
    pub min_speech_ms: u64,
    /// `simulated`: the machine's condition over time, and faults to inject.
    #[serde(default)]
    pub condition: Vec<Phase>,
    #[serde(default)]
    pub faults: Vec<Fault>,
    #[serde(default)]
    pub seed: Option<u64>,
}

fn default_address() -> u8 {
    DEFAULT_MPU6050_ADDRESS
}
fn default_range() -> u8 {
    2
}
fn default_rate() -> u32 {
    1000
}
fn default_vad_threshold() -> f64 {
    0.5
}
fn default_min_silence() -> u64 {
    300
}
fn default_min_speech() -> u64 {
    150
}

/// What drives an actuator's pin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActuatorKind {
    /// A line of a GPIO chip (`/dev/gpiochipN`); needs the `hw` feature.
    Gpio,
    /// A simulated pin: its changes are logged and published.
    Simulated,
}

/// `[[actuators]]` in agent.toml.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawActuator {
    pub name: String,
    pub kind: ActuatorKind,
    #[serde(default)]
    pub chip: Option<PathBuf>,
    #[serde(default)]
    pub line: Option<u32>,
    #[serde(default)]
    pub active_low: bool,
    /// The sensor whose results drive it.
    pub source: String,
    /// Raised when this class is detected...
    pub on_class: String,
    /// ...with at least this probability...
    #[serde(default = "default_min_probability")]
    pub min_probability: f64,
    /// ...and held this long after the last detection...
    #[serde(default = "default_hold")]
    pub hold_ms: u64,
    /// ...once this many results in a row say so.
    #[serde(default = "default_confirm")]
    pub confirm_windows: u32,
}

fn default_confirm() -> u32 {
    2
}

fn default_min_probability() -> f64 {
    0.8
}
fn default_hold() -> u64 {
    5000
}

/// Checks `[[sensors]]` and `[[actuators]]`; one sentence per problem.
pub fn validate(sensors: &[RawSensor], actuators: &[RawActuator], errors: &mut Vec<String>) {
    let mut names = std::collections::BTreeSet::new();
    for s in sensors {
        if s.name.is_empty() || s.name.contains(['/', '+', '#']) {
            errors.push(format!(
                "sensor name `{}` must be a non-empty topic segment",
                s.name
            ));
        }
        if !names.insert(s.name.clone()) {
            errors.push(format!("two sensors are named `{}`", s.name));
        }
        match s.kind {
            SensorKind::Mpu6050 | SensorKind::Simulated => {
                if ![2, 4, 8, 16].contains(&s.range_g) {
                    errors.push(format!(
                        "sensors `{}`: range_g is {}; use 2, 4, 8 or 16",
                        s.name, s.range_g
                    ));
                }
                if !(4..=1000).contains(&s.rate_hz) || 1000 % s.rate_hz != 0 {
                    errors.push(format!(
                        "sensors `{}`: rate_hz is {}; use 1000 divided by a whole number (1000, 500, 250, ...), at least 4",
                        s.name, s.rate_hz
                    ));
                }
                if s.kind == SensorKind::Mpu6050 {
                    if s.i2c_bus.is_none() {
                        errors.push(format!(
                            "sensors `{}`: an mpu6050 needs i2c_bus, such as \"/dev/i2c-1\"",
                            s.name
                        ));
                    }
                    if !cfg!(feature = "hw") {
                        errors.push(format!(
                            "sensors `{}`: this tether-agent was built without the `hw` feature, so it cannot open I2C buses; build with --features hw or use kind = \"simulated\"",
                            s.name
                        ));
                    }
                }
            }
            SensorKind::Audio => {
                if s.path.is_none() {
                    errors.push(format!(
                        "sensors `{}`: an audio source needs path (a WAV or raw s16le file, a named pipe, or \"-\" for stdin)",
                        s.name
                    ));
                }
                if !(0.0..=1.0).contains(&s.vad_threshold) {
                    errors.push(format!(
                        "sensors `{}`: vad_threshold is {}; use a probability from 0 to 1",
                        s.name, s.vad_threshold
                    ));
                }
            }
        }
    }
    let mut actuator_names = std::collections::BTreeSet::new();
    for a in actuators {
        if !actuator_names.insert(a.name.clone()) {
            errors.push(format!("two actuators are named `{}`", a.name));
        }
        if !names.contains(&a.source) {
            errors.push(format!(
                "actuators `{}`: source `{}` is not one of [[sensors]]",
                a.name, a.source
            ));
        }
        if !(0.0..=1.0).contains(&a.min_probability) {
            errors.push(format!(
                "actuators `{}`: min_probability is {}; use 0 to 1",
                a.name, a.min_probability
            ));
        }
        if a.confirm_windows == 0 {
            errors.push(format!(
                "actuators `{}`: confirm_windows must be at least 1",
                a.name
            ));
        }
        if a.kind == ActuatorKind::Gpio {
            if a.chip.is_none() || a.line.is_none() {
                errors.push(format!(
                    "actuators `{}`: a gpio actuator needs chip (\"/dev/gpiochip0\") and line",
                    a.name
                ));
            }
            if !cfg!(feature = "hw") {
                errors.push(format!(
                    "actuators `{}`: this tether-agent was built without the `hw` feature, so it cannot drive GPIO lines; build with --features hw or use kind = \"simulated\"",
                    a.name
                ));
            }
        }
    }
}

/// The machine's condition, as the vibration model's classes name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Condition {
    Normal,
    Imbalance,
    BearingFault,
}

/// From `after_ms` on, the machine is in `state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Phase {
    pub after_ms: u64,
    pub state: Condition,
}

/// What can go wrong on the bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// The sensor does not acknowledge (unplugged, browned out).
    Nack,
    /// A bus error (noise, a stuck line).
    Bus,
    /// The sensor answers, but its output does not change.
    Stuck,
}

/// From `after_ms`, for `duration_ms`, the bus or the sensor fails this way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    pub after_ms: u64,
    pub kind: FaultKind,
    pub duration_ms: u64,
}
